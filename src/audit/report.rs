//! Reading the trail back: `collie audit report` (who spent what on which
//! model, what failed, what looked wrong, who was refused) and `collie audit
//! verify` (every chain intact: no edited row, no deleted one).

use super::sink::{Cell, Sink, SinkError, SinkSpec};
use crate::config::{Config, ConfigError, ConfigErrors, MissingEnv, SinkSpecError};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Why a trail could not be named, opened or read.
#[derive(Debug, thiserror::Error)]
pub enum TrailError {
    /// `--sink` names no sink.
    #[error(transparent)]
    Spec(#[from] SinkSpecError),
    /// The `--config` file is invalid.
    #[error("{}:\n{errors}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// Every problem found in it.
        errors: ConfigErrors,
    },
    /// The `--config` file turns auditing off, so it names no trail.
    #[error("auditing is off in that config")]
    AuditOff,
    /// Neither `--sink` nor `--config` was given.
    #[error("name the trail with --sink sqlite:PATH | postgres://… or --config FILE")]
    Unnamed,
    /// No SQLite file at the path (reading never creates one).
    #[error("no audit trail at {}", .0.display())]
    NoTrail(PathBuf),
    /// `--since` is not a duration.
    #[error("--since {since}: {source}")]
    Since {
        /// The text given.
        since: String,
        /// Why it is not a duration.
        source: humantime::DurationError,
    },
    /// The system clock is before the Unix epoch, so no cut-off can be computed.
    #[error("the system clock is before 1970: {0}")]
    Clock(#[source] std::time::SystemTimeError),
    /// The trail's database could not be reached or read.
    #[error(transparent)]
    Sink(#[from] SinkError),
}

/// The sink named on the command line (`--sink`), else the one a config
/// file uses (`--config`). `missing` decides about the environment variables
/// the config names and the process lacks: reading the trail needs none of
/// the provider keys, but a PostgreSQL trail needs its URL whatever it says.
pub fn open_sink(
    sink: Option<&str>,
    config: Option<&Path>,
    missing: MissingEnv,
) -> Result<Box<dyn Sink>, TrailError> {
    let spec = match (sink, config) {
        (Some(s), _) => SinkSpec::parse(s)?,
        (None, Some(path)) => {
            let invalid = |errors| TrailError::Config {
                path: path.to_path_buf(),
                errors,
            };
            let config = Config::load_with(path, missing).map_err(invalid)?;
            let url_env = config
                .missing_env()
                .iter()
                .find(|(field, _)| field == "audit.postgres_url_env");
            if let Some((field, name)) = url_env {
                return Err(invalid(ConfigErrors(vec![ConfigError {
                    path: field.clone(),
                    message: format!(
                        "environment variable `{name}` is not set: the trail's URL is needed to read it"
                    ),
                }])));
            }
            config.audit.sink.ok_or(TrailError::AuditOff)?
        }
        (None, None) => return Err(TrailError::Unnamed),
    };
    // Reading must not create an empty trail where none was written.
    if let SinkSpec::Sqlite(path) = &spec {
        if !path.is_file() {
            return Err(TrailError::NoTrail(path.clone()));
        }
    }
    Ok(spec.open()?)
}

/// `24h`, `7d`, `30m` → the cut-off in epoch milliseconds.
pub fn since_ms(since: &str) -> Result<i64, TrailError> {
    let d = humantime::parse_duration(since).map_err(|source| TrailError::Since {
        since: since.to_string(),
        source,
    })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(TrailError::Clock)?;
    Ok(i64::try_from(now.saturating_sub(d).as_millis()).unwrap_or(i64::MAX))
}

/// Totals of one group of records.
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub(crate) struct Totals {
    pub(crate) requests: u64,
    pub(crate) refused: u64,
    /// Error statuses, no answer, and responses the provider broke off.
    pub(crate) failures: u64,
    /// Of the failures: responses the provider broke off mid-way.
    pub(crate) truncated: u64,
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
    pub(crate) total_tokens: u64,
    /// Requests whose tokens are Collie's estimate, not the provider's count.
    pub(crate) estimated: u64,
    pub(crate) cost_usd: f64,
    /// Nearest-rank percentiles: the record at position round((n − 1) · p)
    /// of the group's latencies in ascending order.
    pub(crate) latency_p50_ms: Option<f64>,
    pub(crate) latency_p95_ms: Option<f64>,
}

/// What `collie audit report` prints for a period (and optionally one
/// tenant): totals, per-model and per-tenant breakdowns, top errors, the
/// security view and the anomalies.
#[derive(Debug, Serialize)]
pub struct Report {
    pub(crate) since_ms: i64,
    pub(crate) tenant: Option<String>,
    pub(crate) totals: Totals,
    pub(crate) by_model: BTreeMap<String, Totals>,
    pub(crate) by_tenant: BTreeMap<String, Totals>,
    /// With `--by user`: per end user of a tenant (`tenant/user`; records
    /// without a user are `tenant/(none)`), the [`TOP_USERS`] with the most
    /// requests, and the rest together as `(other users)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) by_user: Option<BTreeMap<String, Totals>>,
    /// (what, count), most frequent first.
    pub(crate) top_errors: Vec<(String, u64)>,
    pub(crate) security: Security,
    pub(crate) anomalies: Vec<AnomalyOut>,
}

/// Requests refused before they reached a provider: who was refused, from
/// where, and whose tenant id was named without its key.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Security {
    /// By the rule that refused (an error code or a quota window).
    pub(crate) refusals_by_rule: Vec<(String, u64)>,
    pub(crate) refusals_by_client: Vec<(String, u64)>,
    /// Refused by authentication, by the tenant id the request claimed
    /// (`(unknown)`: a name no tenant has). Claimed, not proven.
    pub(crate) auth_refusals_by_claimed_tenant: Vec<(String, u64)>,
}

#[derive(Debug, Serialize)]
pub(crate) struct AnomalyOut {
    pub(crate) ts_ms: i64,
    pub(crate) rule: String,
    pub(crate) tenant: Option<String>,
    pub(crate) detail: String,
}

/// Entries of each top list.
const TOP: usize = 10;
/// Anomalies listed at most (the newest).
const MAX_ANOMALIES: usize = 1000;
/// Problems `verify` lists one by one; past these it counts them.
const MAX_PROBLEMS: usize = 1000;

/// What counts as failed, as SQL (see [`super::record::Record::failed`]).
const FAILED: &str = "(status >= 400 OR status = 0 OR truncated = 1)";
/// The period and tenant a report covers.
const WHERE: &str = "ts_ms >= $1 AND (CAST($2 AS TEXT) IS NULL OR tenant = $2)";
/// The same for the security view, which also counts the tenant's id being
/// claimed by requests that were refused.
const WHERE_CLAIMED: &str =
    "ts_ms >= $1 AND (CAST($2 AS TEXT) IS NULL OR tenant = $2 OR claimed_tenant = $2)";

const BY_MODEL: &str = "COALESCE(requested_model, '(none)')";
const BY_TENANT: &str = "COALESCE(tenant, '(unauthenticated)')";
const BY_USER: &str = "COALESCE(tenant, '(unauthenticated)') || '/' || COALESCE(user_id, '(none)')";
/// End users listed one by one in a report, at most (the most requests
/// first): a trail may name millions, a report stays readable and its
/// memory bounded.
pub(crate) const TOP_USERS: usize = 100;
/// The row of the users past [`TOP_USERS`].
const OTHER_USERS: &str = "(other users)";

/// Sums per group, computed by the database: the report never holds the
/// records, only one row per group (with `limit`, the groups with the most
/// requests).
fn group_totals(
    sink: &mut dyn Sink,
    key: &str,
    since_ms: i64,
    tenant: Option<&str>,
    limit: Option<usize>,
) -> Result<BTreeMap<String, Totals>, SinkError> {
    let limit = limit.map_or(String::new(), |n| format!(" ORDER BY 2 DESC, 1 LIMIT {n}"));
    let sql = format!(
        "SELECT {key}, COUNT(*),
            CAST(SUM(CASE WHEN decision = 'refused' THEN 1 ELSE 0 END) AS BIGINT),
            CAST(SUM(CASE WHEN {FAILED} THEN 1 ELSE 0 END) AS BIGINT),
            CAST(SUM(truncated) AS BIGINT),
            CAST(SUM(COALESCE(prompt_tokens, 0)) AS BIGINT),
            CAST(SUM(COALESCE(completion_tokens, 0)) AS BIGINT),
            CAST(SUM(COALESCE(total_tokens, 0)) AS BIGINT),
            CAST(SUM(usage_estimated) AS BIGINT),
            CAST(SUM(COALESCE(cost_nano, 0)) AS BIGINT)
         FROM audit_records WHERE {WHERE} GROUP BY 1{limit}"
    );
    let mut out = BTreeMap::new();
    let n = |c: &Cell| u64::try_from(c.int()).unwrap_or(0);
    sink.query(&sql, since_ms, tenant, &mut |row| {
        out.insert(
            row[0].text(),
            Totals {
                requests: n(&row[1]),
                refused: n(&row[2]),
                failures: n(&row[3]),
                truncated: n(&row[4]),
                prompt_tokens: n(&row[5]),
                completion_tokens: n(&row[6]),
                total_tokens: n(&row[7]),
                estimated: n(&row[8]),
                cost_usd: row[9].int() as f64 / 1e9,
                latency_p50_ms: None,
                latency_p95_ms: None,
            },
        );
    })?;
    Ok(out)
}

/// The p50 and p95 latency of every group in one pass over the latencies in
/// ascending order, streamed from the database: each group's percentile is
/// the value at its rank, found by counting the group's rows as they pass.
/// `groups` are (key expression, groups by that key).
fn percentiles(
    sink: &mut dyn Sink,
    since_ms: i64,
    tenant: Option<&str>,
    totals: &mut Totals,
    groups: &mut [(&str, &mut BTreeMap<String, Totals>)],
) -> Result<(), SinkError> {
    fn ranks(n: u64) -> [u64; 2] {
        let last = n.saturating_sub(1) as f64;
        [(last * 0.5).round() as u64, (last * 0.95).round() as u64]
    }
    fn take(t: &mut Totals, seen: &mut u64, v: f64) {
        let [p50, p95] = ranks(t.requests);
        if *seen == p50 {
            t.latency_p50_ms = Some(v);
        }
        if *seen == p95 {
            t.latency_p95_ms = Some(v);
        }
        *seen += 1;
    }
    let keys: Vec<&str> = groups.iter().map(|(k, _)| *k).collect();
    let sql = format!(
        "SELECT {}, latency_ms FROM audit_records WHERE {WHERE} ORDER BY latency_ms",
        keys.join(", ")
    );
    let mut seen_all = 0u64;
    let mut seen: HashMap<(usize, String), u64> = HashMap::new();
    sink.query(&sql, since_ms, tenant, &mut |row| {
        let v = row[groups.len()].real();
        take(totals, &mut seen_all, v);
        for (i, (_, by)) in groups.iter_mut().enumerate() {
            let key = row[i].text();
            if let Some(t) = by.get_mut(&key) {
                take(t, seen.entry((i, key)).or_default(), v);
            }
        }
    })
}

/// The `TOP` most frequent values of `what` among the records `filter`
/// selects, most frequent first (ties by name).
fn top(
    sink: &mut dyn Sink,
    what: &str,
    filter: &str,
    scope: &str,
    since_ms: i64,
    tenant: Option<&str>,
) -> Result<Vec<(String, u64)>, SinkError> {
    let sql = format!(
        "SELECT {what}, COUNT(*) FROM audit_records WHERE {scope} AND {filter} GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT {TOP}"
    );
    let mut out = Vec::new();
    sink.query(&sql, since_ms, tenant, &mut |row| {
        out.push((row[0].text(), u64::try_from(row[1].int()).unwrap_or(0)));
    })?;
    Ok(out)
}

/// The report of records since `since_ms` (of `tenant`), aggregated by the
/// database: memory grows with the number of models and tenants, never with
/// the number of records.
pub fn build(
    sink: &mut dyn Sink,
    since_ms: i64,
    tenant: Option<&str>,
    by_user: bool,
) -> Result<Report, SinkError> {
    let mut totals = group_totals(sink, "'all'", since_ms, tenant, None)?
        .into_values()
        .next()
        .unwrap_or_default();
    let mut by_model = group_totals(sink, BY_MODEL, since_ms, tenant, None)?;
    let mut by_tenant = group_totals(sink, BY_TENANT, since_ms, tenant, None)?;
    let mut users = if by_user {
        group_totals(sink, BY_USER, since_ms, tenant, Some(TOP_USERS))?
    } else {
        BTreeMap::new()
    };
    {
        let mut groups: Vec<(&str, &mut BTreeMap<String, Totals>)> =
            vec![(BY_MODEL, &mut by_model), (BY_TENANT, &mut by_tenant)];
        if by_user {
            groups.push((BY_USER, &mut users));
        }
        percentiles(sink, since_ms, tenant, &mut totals, &mut groups)?;
    }
    let by_user = by_user.then(|| {
        let rest = rest_of(&totals, users.values());
        if rest.requests > 0 {
            users.insert(OTHER_USERS.to_string(), rest);
        }
        users
    });
    let top_errors = top(
        sink,
        "COALESCE(error, rule, 'HTTP ' || CAST(status AS TEXT))",
        FAILED,
        WHERE,
        since_ms,
        tenant,
    )?;
    let refused = "decision = 'refused'";
    let security = Security {
        refusals_by_rule: top(
            sink,
            "COALESCE(rule, '?')",
            refused,
            WHERE_CLAIMED,
            since_ms,
            tenant,
        )?,
        refusals_by_client: top(
            sink,
            "COALESCE(client_ip, '?')",
            refused,
            WHERE_CLAIMED,
            since_ms,
            tenant,
        )?,
        auth_refusals_by_claimed_tenant: top(
            sink,
            "claimed_tenant",
            "claimed_tenant IS NOT NULL",
            WHERE_CLAIMED,
            since_ms,
            tenant,
        )?,
    };
    // The newest, oldest first.
    let mut anomalies = Vec::new();
    sink.query(
        &format!(
            "SELECT ts_ms, rule, tenant, detail FROM audit_anomalies WHERE {WHERE} ORDER BY ts_ms DESC LIMIT {MAX_ANOMALIES}"
        ),
        since_ms,
        tenant,
        &mut |row| {
            anomalies.push(AnomalyOut {
                ts_ms: row[0].int(),
                rule: row[1].text(),
                tenant: match &row[2] {
                    Cell::Null => None,
                    c => Some(c.text()),
                },
                detail: row[3].text(),
            });
        },
    )?;
    anomalies.reverse();
    Ok(Report {
        since_ms,
        tenant: tenant.map(str::to_string),
        totals,
        by_model,
        by_tenant,
        by_user,
        top_errors,
        security,
        anomalies,
    })
}

/// What `all` holds beyond the groups listed (counts only: the rest's
/// latencies are not streamed apart).
fn rest_of<'a>(all: &Totals, listed: impl Iterator<Item = &'a Totals>) -> Totals {
    let mut rest = all.clone();
    rest.latency_p50_ms = None;
    rest.latency_p95_ms = None;
    for t in listed {
        rest.requests = rest.requests.saturating_sub(t.requests);
        rest.refused = rest.refused.saturating_sub(t.refused);
        rest.failures = rest.failures.saturating_sub(t.failures);
        rest.truncated = rest.truncated.saturating_sub(t.truncated);
        rest.prompt_tokens = rest.prompt_tokens.saturating_sub(t.prompt_tokens);
        rest.completion_tokens = rest.completion_tokens.saturating_sub(t.completion_tokens);
        rest.total_tokens = rest.total_tokens.saturating_sub(t.total_tokens);
        rest.estimated = rest.estimated.saturating_sub(t.estimated);
        rest.cost_usd -= t.cost_usd;
    }
    rest.cost_usd = rest.cost_usd.max(0.0);
    rest
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

/// The report as tables for a terminal.
pub fn text(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let row = |out: &mut String, name: &str, t: &Totals| {
        let _ = writeln!(
            out,
            "  {name:<28} {:>8} {:>8} {:>9} {:>8} {:>12} {:>9} {:>12} {:>9} {:>9}",
            t.requests,
            t.failures,
            t.truncated,
            t.refused,
            t.total_tokens,
            t.estimated,
            format!("{:.6}", t.cost_usd),
            ms(t.latency_p50_ms),
            ms(t.latency_p95_ms)
        );
    };
    let header = |out: &mut String, title: &str| {
        let _ = writeln!(out, "\n{title}");
        let _ = writeln!(
            out,
            "  {:<28} {:>8} {:>8} {:>9} {:>8} {:>12} {:>9} {:>12} {:>9} {:>9}",
            "",
            "requests",
            "failed",
            "truncated",
            "refused",
            "tokens",
            "estimated",
            "cost USD",
            "p50 ms",
            "p95 ms"
        );
    };
    let _ = writeln!(
        out,
        "Collie audit report since {}{}",
        since_text(r.since_ms),
        r.tenant
            .as_ref()
            .map(|t| format!(" for tenant {t}"))
            .unwrap_or_default()
    );
    header(&mut out, "Totals");
    row(&mut out, "all", &r.totals);
    header(&mut out, "By model");
    for (m, t) in &r.by_model {
        row(&mut out, m, t);
    }
    header(&mut out, "By tenant");
    for (m, t) in &r.by_tenant {
        row(&mut out, m, t);
    }
    if let Some(users) = &r.by_user {
        header(
            &mut out,
            &format!("By user (tenant/user; the {TOP_USERS} with the most requests)"),
        );
        for (u, t) in users {
            row(&mut out, u, t);
        }
    }
    let list = |out: &mut String, title: &str, items: &[(String, u64)]| {
        let _ = writeln!(out, "\n{title}");
        if items.is_empty() {
            let _ = writeln!(out, "  (none)");
        }
        for (k, n) in items {
            let _ = writeln!(out, "  {n:>8}  {k}");
        }
    };
    list(&mut out, "Top errors", &r.top_errors);
    let _ = writeln!(out, "\nSecurity");
    list(&mut out, "Refusals by rule", &r.security.refusals_by_rule);
    list(
        &mut out,
        "Refusals by client address",
        &r.security.refusals_by_client,
    );
    list(
        &mut out,
        "Authentication refusals by claimed tenant (claimed, not proven)",
        &r.security.auth_refusals_by_claimed_tenant,
    );
    let _ = writeln!(out, "\nAnomalies");
    if r.anomalies.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for a in &r.anomalies {
        let _ = writeln!(out, "  {} {:<18} {}", since_text(a.ts_ms), a.rule, a.detail);
    }
    out
}

/// An epoch-ms time as RFC 3339 UTC (to the second).
fn since_text(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| format!("{:.0}", t))
        .unwrap_or_else(|_| ms.to_string())
}

/// One line per group and list entry:
/// `section,name,requests,failures,truncated,refused,prompt_tokens,completion_tokens,total_tokens,estimated,cost_usd,latency_p50_ms,latency_p95_ms,detail`.
/// Sections: `total`, `model`, `tenant`, `user` (every column; `user` with
/// `--by user`, named `tenant/user`); `error`,
/// `refusal_rule`, `refusal_client`, `claimed_tenant` (a count in
/// `requests`); `anomaly` (its rule in `name`, its text in `detail`).
pub fn csv(r: &Report) -> String {
    const COLUMNS: usize = 14;
    let mut out = String::from(
        "section,name,requests,failures,truncated,refused,prompt_tokens,completion_tokens,total_tokens,estimated,cost_usd,latency_p50_ms,latency_p95_ms,detail\n",
    );
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let mut line = |cells: Vec<String>| {
        let n = cells.len();
        out.push_str(&cells.join(","));
        for _ in n..COLUMNS {
            out.push(',');
        }
        out.push('\n');
    };
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.3}"));
    let mut totals = |section: &str, name: &str, t: &Totals| {
        line(vec![
            section.into(),
            quote(name),
            t.requests.to_string(),
            t.failures.to_string(),
            t.truncated.to_string(),
            t.refused.to_string(),
            t.prompt_tokens.to_string(),
            t.completion_tokens.to_string(),
            t.total_tokens.to_string(),
            t.estimated.to_string(),
            format!("{:.9}", t.cost_usd),
            opt(t.latency_p50_ms),
            opt(t.latency_p95_ms),
        ]);
    };
    totals("total", "all", &r.totals);
    for (m, t) in &r.by_model {
        totals("model", m, t);
    }
    for (m, t) in &r.by_tenant {
        totals("tenant", m, t);
    }
    for (u, t) in r.by_user.iter().flatten() {
        totals("user", u, t);
    }
    for (section, items) in [
        ("error", &r.top_errors),
        ("refusal_rule", &r.security.refusals_by_rule),
        ("refusal_client", &r.security.refusals_by_client),
        (
            "claimed_tenant",
            &r.security.auth_refusals_by_claimed_tenant,
        ),
    ] {
        for (k, n) in items {
            line(vec![section.into(), quote(k), n.to_string()]);
        }
    }
    for a in &r.anomalies {
        let mut cells = vec!["anomaly".to_string(), quote(&a.rule)];
        cells.resize(COLUMNS - 1, String::new());
        cells.push(quote(&a.detail));
        line(cells);
    }
    out
}

/// Check every sidecar's chain: each record's hash recomputes, each links
/// to the one before it, and no position is missing. Returns the problems.
/// The records stream by in (sidecar, seq) order; only the previous one is
/// kept.
pub fn verify(sink: &mut dyn Sink) -> Result<Vec<String>, SinkError> {
    let anchors: HashMap<String, (i64, String)> = sink
        .anchors()?
        .into_iter()
        .map(|(s, q, h)| (s, (q, h)))
        .collect();
    let mut problems = Vec::new();
    let mut more = 0u64;
    let mut current: Option<String> = None;
    let (mut expect_seq, mut expect_prev) = (1i64, String::new());
    let mut problem = |p: String| {
        if problems.len() < MAX_PROBLEMS {
            problems.push(p);
        } else {
            more += 1;
        }
    };
    sink.each_record(i64::MIN, None, &mut |s| {
        if current.as_deref() != Some(s.sidecar.as_str()) {
            let (seq, hash) = anchors
                .get(&s.sidecar)
                .cloned()
                .unwrap_or((0, String::new()));
            expect_seq = seq + 1;
            expect_prev = hash;
            current = Some(s.sidecar.clone());
        }
        if s.seq != expect_seq {
            problem(format!(
                "{}: records {}..{} are missing (deleted?)",
                s.sidecar,
                expect_seq,
                s.seq - 1
            ));
        } else if s.prev_hash != expect_prev {
            problem(format!(
                "{}: record {} does not link to the one before it",
                s.sidecar, s.seq
            ));
        }
        if s.record.chain_hash(&s.sidecar, s.seq, &s.prev_hash) != s.hash {
            problem(format!(
                "{}: record {} ({}) was altered",
                s.sidecar, s.seq, s.record.request_id
            ));
        }
        expect_seq = s.seq + 1;
        expect_prev = s.hash;
    })?;
    if more > 0 {
        problems.push(format!("… and {more} more problems"));
    }
    Ok(problems)
}
