//! Reading the trail back: `collie audit report` (who spent what on which
//! model, what failed, what looked wrong, who was refused) and `collie audit
//! verify` (every chain intact: no edited row, no deleted one).

use super::sink::{AnomalyRow, Sink, Stored};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// The sink named on the command line (`--sink`), else the one a config
/// file uses (`--config`).
pub fn open_sink(
    sink: Option<&str>,
    config: Option<&std::path::Path>,
) -> Result<Box<dyn Sink>, String> {
    let spec = match (sink, config) {
        (Some(s), _) => super::sink::SinkSpec::parse(s)?,
        (None, Some(path)) => crate::config::Config::load(path)
            .map_err(|e| format!("{}:\n{e}", path.display()))?
            .audit
            .sink
            .ok_or("auditing is off in that config")?,
        (None, None) => {
            return Err(
                "name the trail with --sink sqlite:PATH | postgres://… or --config FILE".into(),
            );
        }
    };
    // Reading must not create an empty trail where none was written.
    if let super::sink::SinkSpec::Sqlite(path) = &spec {
        if !path.is_file() {
            return Err(format!("no audit trail at {}", path.display()));
        }
    }
    spec.open()
}

/// `24h`, `7d`, `30m` → the cut-off in epoch milliseconds.
pub fn since_ms(since: &str) -> Result<i64, String> {
    let d = humantime::parse_duration(since).map_err(|e| format!("--since {since}: {e}"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?;
    Ok(i64::try_from(now.saturating_sub(d).as_millis()).unwrap_or(i64::MAX))
}

/// Totals of one group of records.
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct Totals {
    pub requests: u64,
    pub refused: u64,
    pub failures: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Requests whose tokens are Collie's estimate, not the provider's count.
    pub estimated: u64,
    pub cost_usd: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    #[serde(skip)]
    latencies: Vec<f64>,
    #[serde(skip)]
    cost_nano: i64,
}

impl Totals {
    fn add(&mut self, r: &super::record::Record) {
        self.requests += 1;
        self.refused += u64::from(r.decision == "refused");
        self.failures += u64::from(r.status >= 400 || r.status == 0);
        let n = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0);
        self.prompt_tokens += n(r.prompt_tokens);
        self.completion_tokens += n(r.completion_tokens);
        self.total_tokens += n(r.total_tokens);
        self.estimated += u64::from(r.usage_estimated);
        self.cost_nano = self.cost_nano.saturating_add(r.cost_nano.unwrap_or(0));
        self.latencies.push(r.latency_ms);
    }

    fn finish(&mut self) {
        self.cost_usd = self.cost_nano as f64 / 1e9;
        self.latencies.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            (!self.latencies.is_empty())
                .then(|| self.latencies[((self.latencies.len() - 1) as f64 * p).round() as usize])
        };
        self.latency_p50_ms = pct(0.5);
        self.latency_p95_ms = pct(0.95);
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub since_ms: i64,
    pub tenant: Option<String>,
    pub totals: Totals,
    pub by_model: BTreeMap<String, Totals>,
    pub by_tenant: BTreeMap<String, Totals>,
    /// (what, count), most frequent first.
    pub top_errors: Vec<(String, u64)>,
    /// Refusals by rule and by client address: the security view.
    pub refusals_by_rule: Vec<(String, u64)>,
    pub refusals_by_client: Vec<(String, u64)>,
    pub anomalies: Vec<AnomalyOut>,
}

#[derive(Debug, Serialize)]
pub struct AnomalyOut {
    pub ts_ms: i64,
    pub rule: String,
    pub tenant: Option<String>,
    pub detail: String,
}

fn top(counts: HashMap<String, u64>, n: usize) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

pub fn build(sink: &mut dyn Sink, since_ms: i64, tenant: Option<&str>) -> Result<Report, String> {
    let records = sink.records_since(since_ms, tenant)?;
    let anomalies = sink.anomalies_since(since_ms, tenant)?;
    Ok(summarize(&records, &anomalies, since_ms, tenant))
}

pub fn summarize(
    records: &[Stored],
    anomalies: &[AnomalyRow],
    since_ms: i64,
    tenant: Option<&str>,
) -> Report {
    let mut totals = Totals::default();
    let mut by_model: BTreeMap<String, Totals> = BTreeMap::new();
    let mut by_tenant: BTreeMap<String, Totals> = BTreeMap::new();
    let mut errors: HashMap<String, u64> = HashMap::new();
    let mut by_rule: HashMap<String, u64> = HashMap::new();
    let mut by_client: HashMap<String, u64> = HashMap::new();
    for s in records {
        let r = &s.record;
        totals.add(r);
        by_model
            .entry(r.requested_model.clone().unwrap_or_else(|| "(none)".into()))
            .or_default()
            .add(r);
        by_tenant
            .entry(
                r.tenant
                    .clone()
                    .unwrap_or_else(|| "(unauthenticated)".into()),
            )
            .or_default()
            .add(r);
        if r.status >= 400 || r.status == 0 {
            let what = r
                .error
                .clone()
                .or_else(|| r.rule.clone())
                .unwrap_or_else(|| format!("HTTP {}", r.status));
            *errors.entry(what).or_default() += 1;
        }
        if r.decision == "refused" {
            *by_rule
                .entry(r.rule.clone().unwrap_or_else(|| "?".into()))
                .or_default() += 1;
            *by_client
                .entry(r.client_ip.clone().unwrap_or_else(|| "?".into()))
                .or_default() += 1;
        }
    }
    totals.finish();
    by_model.values_mut().for_each(Totals::finish);
    by_tenant.values_mut().for_each(Totals::finish);
    Report {
        since_ms,
        tenant: tenant.map(str::to_string),
        totals,
        by_model,
        by_tenant,
        top_errors: top(errors, 10),
        refusals_by_rule: top(by_rule, 10),
        refusals_by_client: top(by_client, 10),
        anomalies: anomalies
            .iter()
            .map(|a| AnomalyOut {
                ts_ms: a.ts_ms,
                rule: a.rule.clone(),
                tenant: a.tenant.clone(),
                detail: a.detail.clone(),
            })
            .collect(),
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

pub fn text(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let row = |out: &mut String, name: &str, t: &Totals| {
        let _ = writeln!(
            out,
            "  {name:<28} {:>8} {:>8} {:>8} {:>12} {:>12} {:>10} {:>9} {:>9}",
            t.requests,
            t.failures,
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
            "  {:<28} {:>8} {:>8} {:>8} {:>12} {:>12} {:>10} {:>9} {:>9}",
            "",
            "requests",
            "failed",
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
        "Collie audit report{}",
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
    list(&mut out, "Refusals by rule", &r.refusals_by_rule);
    list(
        &mut out,
        "Refusals by client address",
        &r.refusals_by_client,
    );
    let _ = writeln!(out, "\nAnomalies");
    if r.anomalies.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for a in &r.anomalies {
        let _ = writeln!(out, "  {} {:<18} {}", a.ts_ms, a.rule, a.detail);
    }
    out
}

pub fn csv(r: &Report) -> String {
    let mut out = String::from(
        "section,name,requests,failures,refused,prompt_tokens,completion_tokens,total_tokens,estimated,cost_usd,latency_p50_ms,latency_p95_ms\n",
    );
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let mut row = |section: &str, name: &str, t: &Totals| {
        out.push_str(&format!(
            "{section},{},{},{},{},{},{},{},{},{:.9},{},{}\n",
            quote(name),
            t.requests,
            t.failures,
            t.refused,
            t.prompt_tokens,
            t.completion_tokens,
            t.total_tokens,
            t.estimated,
            t.cost_usd,
            t.latency_p50_ms
                .map_or(String::new(), |v| format!("{v:.3}")),
            t.latency_p95_ms
                .map_or(String::new(), |v| format!("{v:.3}")),
        ));
    };
    row("total", "all", &r.totals);
    for (m, t) in &r.by_model {
        row("model", m, t);
    }
    for (m, t) in &r.by_tenant {
        row("tenant", m, t);
    }
    for (k, n) in &r.top_errors {
        out.push_str(&format!("error,{},{n},,,,,,,,,\n", quote(k)));
    }
    for (k, n) in &r.refusals_by_rule {
        out.push_str(&format!("refusal_rule,{},{n},,,,,,,,,\n", quote(k)));
    }
    for (k, n) in &r.refusals_by_client {
        out.push_str(&format!("refusal_client,{},{n},,,,,,,,,\n", quote(k)));
    }
    for a in &r.anomalies {
        out.push_str(&format!(
            "anomaly,{},,,,,,,,,,{}\n",
            quote(&a.rule),
            quote(&a.detail)
        ));
    }
    out
}

/// Check every sidecar's chain: each record's hash recomputes, each links
/// to the one before it, and no position is missing. Returns the problems.
pub fn verify(sink: &mut dyn Sink) -> Result<Vec<String>, String> {
    let anchors: HashMap<String, (i64, String)> = sink
        .anchors()?
        .into_iter()
        .map(|(s, q, h)| (s, (q, h)))
        .collect();
    let records = sink.records_since(i64::MIN, None)?;
    let mut problems = Vec::new();
    let mut current: Option<&str> = None;
    let (mut expect_seq, mut expect_prev) = (1i64, String::new());
    for s in &records {
        if current != Some(s.sidecar.as_str()) {
            current = Some(&s.sidecar);
            let (seq, hash) = anchors
                .get(&s.sidecar)
                .cloned()
                .unwrap_or((0, String::new()));
            expect_seq = seq + 1;
            expect_prev = hash;
        }
        if s.seq != expect_seq {
            problems.push(format!(
                "{}: records {}..{} are missing (deleted?)",
                s.sidecar,
                expect_seq,
                s.seq - 1
            ));
        } else if s.prev_hash != expect_prev {
            problems.push(format!(
                "{}: record {} does not link to the one before it",
                s.sidecar, s.seq
            ));
        }
        if s.record.chain_hash(&s.sidecar, s.seq, &s.prev_hash) != s.hash {
            problems.push(format!(
                "{}: record {} ({}) was altered",
                s.sidecar, s.seq, s.record.request_id
            ));
        }
        expect_seq = s.seq + 1;
        expect_prev = s.hash.clone();
    }
    Ok(problems)
}
