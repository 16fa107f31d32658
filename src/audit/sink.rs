//! Where records are kept: SQLite (a file next to the sidecar, WAL mode) or
//! PostgreSQL (one database for a fleet). The same schema, brought up to
//! date by the same numbered migrations, and the same queries.

mod postgres;
mod sqlite;

pub(crate) use postgres::Postgres;
pub use sqlite::Sqlite;

use super::record::Record;
pub use crate::config::SinkSpec;
use std::path::PathBuf;

/// Why a sink could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The directory of the SQLite file could not be created.
    #[error("cannot create {}: {source}", dir.display())]
    CreateDir {
        /// The directory.
        dir: PathBuf,
        /// Why it could not be created.
        source: std::io::Error,
    },
    /// SQLite refused to open, read or write the file.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The PostgreSQL server could not be reached.
    #[error(
        "postgres: cannot connect ({}); is the server running and the URL right?",
        with_causes(.0)
    )]
    Connect(#[source] ::postgres::Error),
    /// A PostgreSQL statement failed once connected.
    #[error("postgres: {}", with_causes(.0))]
    Postgres(#[from] ::postgres::Error),
    /// The PostgreSQL schema name is not a plain name (it is written into SQL).
    #[error("postgres: schema `{0}` must be letters, digits and _")]
    SchemaName(String),
    /// The trail was migrated by a newer Collie: writing it would leave
    /// columns out, so it is refused.
    #[error(
        "the audit trail's schema is version {found}, newer than this collie knows ({known}); run a newer collie"
    )]
    NewerSchema {
        /// The trail's schema version.
        found: i64,
        /// The newest version this build knows ([`SCHEMA_VERSION`]).
        known: i64,
    },
}

/// An error and its causes, `: `-separated. The PostgreSQL client's own
/// text is only the kind ("db error", "error connecting to server"); what
/// happened (the server's message, "connection refused") is in its causes.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

// Opening is the audit module's work; the spec itself is config.
impl SinkSpec {
    /// Open the sink, its schema migrated to [`SCHEMA_VERSION`].
    pub fn open(&self) -> Result<Box<dyn Sink>, SinkError> {
        match self {
            SinkSpec::Sqlite(path) => Ok(Box::new(Sqlite::open(path)?)),
            SinkSpec::Postgres { url, schema } => {
                Ok(Box::new(Postgres::open(url, schema.as_deref())?))
            }
        }
    }

    /// Open the sink the writer writes to: as [`SinkSpec::open`], with a
    /// SQLite trail's request-hash index kept or dropped as asked.
    pub(crate) fn open_for_writing(
        &self,
        request_hash_index: bool,
    ) -> Result<Box<dyn Sink>, SinkError> {
        match self {
            SinkSpec::Sqlite(path) => {
                let sink = Sqlite::open(path)?;
                sink.keep_request_hash_index(request_hash_index)?;
                Ok(Box::new(sink))
            }
            SinkSpec::Postgres { .. } => self.open(),
        }
    }
}

/// A record as stored, with its place in the chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// The chain: the id of the sidecar that wrote the record.
    pub sidecar: String,
    /// The record's place in its sidecar's chain, from 1.
    pub seq: i64,
    /// Hex SHA-256 of the record before it in the chain (empty for the first).
    pub prev_hash: String,
    /// Hex SHA-256 over this record's fields, `seq` and `prev_hash`
    /// ([`Record::chain_hash`]).
    pub hash: String,
    /// The record itself.
    pub record: Record,
}

/// An alert as stored (the table keeps its first name, `audit_anomalies`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnomalyRow {
    /// When the rule fired, in milliseconds since the Unix epoch: the time of
    /// the newest record seen, or for `baseline_spike` the end of the period
    /// judged; for a health event, when it was noticed.
    pub ts_ms: i64,
    pub(crate) sidecar: String,
    /// The rule that fired: `request_rate`, `failure_ratio`, `hourly_cost`,
    /// `large_request`, `repeated_request`, `baseline_spike`, or a health
    /// event (`deployment_unhealthy`, `breaker_open`, `deployment_recovered`,
    /// `model_panic`, `model_recovered`).
    pub rule: String,
    /// The tenant it concerns; `None` for all tenants together, and for a
    /// deployment or a model.
    pub tenant: Option<String>,
    /// What was seen, in words (counts and the limit they passed).
    pub detail: String,
    /// `info`, `warning` or `critical` (`None` in rows from before schema v4).
    pub severity: Option<String>,
    /// `global`, `tenant`, `user`, `deployment` or `model` (`None` before v4).
    pub scope: Option<String>,
    /// The user, deployment or model the alert names.
    pub subject: Option<String>,
    /// What to do about it.
    pub recommendation: Option<String>,
}

impl AnomalyRow {
    /// The stored form of a delivered alert.
    pub(crate) fn of(a: &crate::alerts::Alert) -> AnomalyRow {
        AnomalyRow {
            ts_ms: a.last_seen_ms,
            sidecar: a.sidecar.clone(),
            rule: a.rule.clone(),
            tenant: a.scope.tenant().map(str::to_string),
            detail: a.message.clone(),
            severity: Some(a.severity.as_str().to_string()),
            scope: Some(a.scope.kind().to_string()),
            subject: a.scope.subject().map(str::to_string),
            recommendation: Some(a.recommendation.clone()),
        }
    }
}

/// The columns of `audit_anomalies`, in the order the sinks write and read them.
const ANOMALY_COLUMNS: &str =
    "ts_ms, sidecar, rule, tenant, detail, severity, scope, subject, recommendation";

/// Why a batch was not written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Positions of this sidecar's chain are taken by rows that are not
    /// this batch's: another process writes under the same sidecar id.
    #[error("chain conflict: {0}")]
    Conflict(#[source] SinkError),
    /// Anything else (a lost connection, a locked file…): worth a retry.
    #[error(transparent)]
    Failed(#[from] SinkError),
}

/// What retention keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Records that started before this go.
    pub(crate) before_ms: Option<i64>,
    /// At most this many records stay (the newest).
    pub(crate) max_rows: Option<i64>,
    /// SQLite: the pages in use stay under this many bytes.
    pub(crate) max_bytes: Option<u64>,
}

/// One value of a report query's row.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// SQL `NULL`.
    Null,
    /// An integer column or aggregate.
    Int(i64),
    /// A floating-point column or aggregate.
    Real(f64),
    /// A text column.
    Text(String),
}

impl Cell {
    pub(crate) fn int(&self) -> i64 {
        match self {
            Cell::Int(n) => *n,
            Cell::Real(v) => *v as i64,
            Cell::Null | Cell::Text(_) => 0,
        }
    }

    pub(crate) fn real(&self) -> f64 {
        match self {
            Cell::Int(n) => *n as f64,
            Cell::Real(v) => *v,
            Cell::Null | Cell::Text(_) => 0.0,
        }
    }

    pub(crate) fn text(&self) -> String {
        match self {
            Cell::Text(s) => s.clone(),
            Cell::Int(n) => n.to_string(),
            Cell::Real(v) => v.to_string(),
            Cell::Null => String::new(),
        }
    }
}

/// A database holding an audit trail: the writer appends records and
/// anomalies to it, retention prunes it, `audit report` and `audit verify`
/// read it back.
pub trait Sink: Send {
    /// Write records (and anomalies) in one transaction: all or nothing.
    /// A batch whose rows are all there already (its commit went through but
    /// the answer was lost) is not written twice.
    fn write(&mut self, records: &[Stored], anomalies: &[AnomalyRow]) -> Result<(), WriteError>;
    /// The (seq, hash) of a sidecar's last record in the trail.
    fn last_record(&mut self, sidecar: &str) -> Result<Option<(i64, String)>, SinkError>;
    /// Records since `ts_ms` (of `tenant`), in (sidecar, seq) order, one at a
    /// time: never all of them in memory.
    fn each_record(
        &mut self,
        ts_ms: i64,
        tenant: Option<&str>,
        f: &mut dyn FnMut(Stored),
    ) -> Result<(), SinkError>;
    /// Anomalies since `ts_ms` (of `tenant`), oldest first.
    fn anomalies_since(
        &mut self,
        ts_ms: i64,
        tenant: Option<&str>,
    ) -> Result<Vec<AnomalyRow>, SinkError>;
    /// Where each sidecar's chain starts now (after pruning): (sidecar, seq, hash).
    fn anchors(&mut self) -> Result<Vec<(String, i64, String)>, SinkError>;
    /// Delete what retention no longer keeps, moving each sidecar's anchor to
    /// its last deleted record. Returns the number of records deleted.
    fn prune(&mut self, keep: &Retention) -> Result<u64, SinkError>;
    /// Run a read-only query written for both databases (`$1` the cut-off in
    /// epoch ms, `$2` a tenant or NULL), one row at a time.
    fn query(
        &mut self,
        sql: &str,
        since_ms: i64,
        tenant: Option<&str>,
        f: &mut dyn FnMut(&[Cell]),
    ) -> Result<(), SinkError>;
    /// The schema version the trail is at.
    fn schema_version(&mut self) -> Result<i64, SinkError>;

    /// The last (seq, hash) written by a sidecar, to continue its chain:
    /// its last record, or where retention left its anchor when every
    /// record was pruned.
    fn chain_head(&mut self, sidecar: &str) -> Result<Option<(i64, String)>, SinkError> {
        if let Some(last) = self.last_record(sidecar)? {
            return Ok(Some(last));
        }
        Ok(self
            .anchors()?
            .into_iter()
            .find(|(s, _, _)| s == sidecar)
            .map(|(_, q, h)| (q, h)))
    }
}

/// The columns of `audit_records`, in the order every query reads them and
/// [`Stored::columns`] and [`Stored::from_columns`] list them: the one table
/// of columns both SQL sinks write and read.
const COLUMNS: &str = "sidecar, seq, prev_hash, hash, ts_ms, request_id, tenant, client_ip, endpoint, requested_model, served_model, deployment, attempts, status, decision, rule, prompt_tokens, completion_tokens, total_tokens, usage_estimated, cost_nano, latency_ms, ttft_ms, streamed, truncated, client_gone, request_hash, response_preview, error, claimed_tenant, user_id";
const N_COLUMNS: usize = 31;

/// One column's value as a sink writes it. Flags are stored as 0/1
/// integers (SQLite has no boolean; PostgreSQL keeps the same shape).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Col<'a> {
    Text(&'a str),
    MaybeText(Option<&'a str>),
    Int(i64),
    MaybeInt(Option<i64>),
    MaybeReal(Option<f64>),
    Real(f64),
}

/// How a sink reads one column of a row, by its position in [`COLUMNS`].
pub(crate) trait ColumnRead {
    type Error;
    fn text(&self, i: usize) -> Result<String, Self::Error>;
    fn maybe_text(&self, i: usize) -> Result<Option<String>, Self::Error>;
    fn int(&self, i: usize) -> Result<i64, Self::Error>;
    fn maybe_int(&self, i: usize) -> Result<Option<i64>, Self::Error>;
    fn real(&self, i: usize) -> Result<f64, Self::Error>;
    fn maybe_real(&self, i: usize) -> Result<Option<f64>, Self::Error>;
    fn flag(&self, i: usize) -> Result<bool, Self::Error> {
        self.int(i).map(|v| v != 0)
    }
}

impl Stored {
    /// Every column of the row, in the order of [`COLUMNS`].
    pub(crate) fn columns(&self) -> [Col<'_>; N_COLUMNS] {
        use Col::*;
        let r = &self.record;
        fn t(v: &Option<String>) -> Col<'_> {
            Col::MaybeText(v.as_deref())
        }
        let flag = |v: bool| Int(i64::from(v));
        [
            Text(&self.sidecar),
            Int(self.seq),
            Text(&self.prev_hash),
            Text(&self.hash),
            Int(r.ts_ms),
            Text(&r.request_id),
            t(&r.tenant),
            t(&r.client_ip),
            Text(&r.endpoint),
            t(&r.requested_model),
            t(&r.served_model),
            t(&r.deployment),
            Text(&r.attempts),
            Int(r.status),
            Text(&r.decision),
            t(&r.rule),
            MaybeInt(r.prompt_tokens),
            MaybeInt(r.completion_tokens),
            MaybeInt(r.total_tokens),
            flag(r.usage_estimated),
            MaybeInt(r.cost_nano),
            Real(r.latency_ms),
            MaybeReal(r.ttft_ms),
            flag(r.streamed),
            flag(r.truncated),
            flag(r.client_gone),
            t(&r.request_hash),
            t(&r.response_preview),
            t(&r.error),
            t(&r.claimed_tenant),
            t(&r.user),
        ]
    }

    /// A row read back, column by column in the order of [`COLUMNS`].
    pub(crate) fn from_columns<R: ColumnRead>(row: &R) -> Result<Stored, R::Error> {
        Ok(Stored {
            sidecar: row.text(0)?,
            seq: row.int(1)?,
            prev_hash: row.text(2)?,
            hash: row.text(3)?,
            record: Record {
                ts_ms: row.int(4)?,
                request_id: row.text(5)?,
                tenant: row.maybe_text(6)?,
                client_ip: row.maybe_text(7)?,
                endpoint: row.text(8)?,
                requested_model: row.maybe_text(9)?,
                served_model: row.maybe_text(10)?,
                deployment: row.maybe_text(11)?,
                attempts: row.text(12)?,
                status: row.int(13)?,
                decision: row.text(14)?,
                rule: row.maybe_text(15)?,
                prompt_tokens: row.maybe_int(16)?,
                completion_tokens: row.maybe_int(17)?,
                total_tokens: row.maybe_int(18)?,
                usage_estimated: row.flag(19)?,
                cost_nano: row.maybe_int(20)?,
                latency_ms: row.real(21)?,
                ttft_ms: row.maybe_real(22)?,
                streamed: row.flag(23)?,
                truncated: row.flag(24)?,
                client_gone: row.flag(25)?,
                request_hash: row.maybe_text(26)?,
                response_preview: row.maybe_text(27)?,
                error: row.maybe_text(28)?,
                claimed_tenant: row.maybe_text(29)?,
                user: row.maybe_text(30)?,
            },
        })
    }
}

/// The request-hash index (migration step 3). It is the trail's most
/// expensive to keep: its keys are random, so in a batch smaller than the
/// index nearly every record lands on an index page of its own (see
/// `audit.request_hash_index`).
pub(crate) const HASH_INDEX: &str = "CREATE INDEX IF NOT EXISTS audit_records_hash16 ON audit_records (substr(request_hash, 1, 16))";

/// The schema version this build writes. A trail at a newer version is
/// refused (an older collie must not write rows it cannot fully fill).
pub const SCHEMA_VERSION: i64 = 4;

/// The steps from each version to the next: `MIGRATIONS[i]` takes a trail
/// from version `i` to `i + 1`. A trail written before versions were kept
/// (an `audit_records` table but no `audit_schema`) is at version 1. Steps
/// are only ever appended; a released step never changes.
fn migrations(real: &str) -> Vec<Vec<String>> {
    vec![
        // 1: records, anomalies, chain anchors.
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS audit_records (
                sidecar TEXT NOT NULL, seq BIGINT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL,
                ts_ms BIGINT NOT NULL, request_id TEXT NOT NULL, tenant TEXT, client_ip TEXT,
                endpoint TEXT NOT NULL, requested_model TEXT, served_model TEXT, deployment TEXT,
                attempts TEXT NOT NULL, status BIGINT NOT NULL, decision TEXT NOT NULL, rule TEXT,
                prompt_tokens BIGINT, completion_tokens BIGINT, total_tokens BIGINT,
                usage_estimated BIGINT NOT NULL, cost_nano BIGINT, latency_ms {real} NOT NULL, ttft_ms {real},
                streamed BIGINT NOT NULL, truncated BIGINT NOT NULL, client_gone BIGINT NOT NULL,
                request_hash TEXT, response_preview TEXT, error TEXT,
                PRIMARY KEY (sidecar, seq))"
            ),
            "CREATE INDEX IF NOT EXISTS audit_records_ts ON audit_records (ts_ms)".into(),
            "CREATE INDEX IF NOT EXISTS audit_records_tenant ON audit_records (tenant, ts_ms)".into(),
            "CREATE INDEX IF NOT EXISTS audit_records_model ON audit_records (requested_model, ts_ms)"
                .into(),
            "CREATE INDEX IF NOT EXISTS audit_records_hash ON audit_records (request_hash)".into(),
            "CREATE TABLE IF NOT EXISTS audit_anomalies (
            ts_ms BIGINT NOT NULL, sidecar TEXT NOT NULL, rule TEXT NOT NULL, tenant TEXT, detail TEXT NOT NULL)"
                .into(),
            "CREATE INDEX IF NOT EXISTS audit_anomalies_ts ON audit_anomalies (ts_ms)".into(),
            "CREATE TABLE IF NOT EXISTS audit_chain_anchor (
            sidecar TEXT PRIMARY KEY, seq BIGINT NOT NULL, hash TEXT NOT NULL)"
                .into(),
        ],
        // 2: the tenant a request refused by authentication claimed to be.
        vec!["ALTER TABLE audit_records ADD COLUMN claimed_tenant TEXT".into()],
        // 3: the request hash indexed by its first 16 hex digits (64 bits):
        // a quarter of the full key, so each insert into this index (random
        // keys: a different page every time) writes fewer pages. Look a hash
        // up with `substr(request_hash, 1, 16) = substr($h, 1, 16) AND
        // request_hash = $h`.
        vec![
            "DROP INDEX IF EXISTS audit_records_hash".into(),
            HASH_INDEX.into(),
        ],
        // 4: the end user a request named; alerts with a severity, a scope
        // beyond the tenant (user, deployment, model) and a recommendation.
        // No index on the user: reports group a period's records (found by
        // the time index), and an index would cost every insert.
        vec![
            "ALTER TABLE audit_records ADD COLUMN user_id TEXT".into(),
            "ALTER TABLE audit_anomalies ADD COLUMN severity TEXT".into(),
            "ALTER TABLE audit_anomalies ADD COLUMN scope TEXT".into(),
            "ALTER TABLE audit_anomalies ADD COLUMN subject TEXT".into(),
            "ALTER TABLE audit_anomalies ADD COLUMN recommendation TEXT".into(),
        ],
    ]
}

const SCHEMA_TABLE: &str = "CREATE TABLE IF NOT EXISTS audit_schema (version BIGINT NOT NULL)";

/// Check a trail's version against this build's, and say which steps to run.
fn pending_steps(found: i64, real: &str) -> Result<Vec<(i64, Vec<String>)>, SinkError> {
    if found > SCHEMA_VERSION {
        return Err(SinkError::NewerSchema {
            found,
            known: SCHEMA_VERSION,
        });
    }
    Ok(migrations(real)
        .into_iter()
        .enumerate()
        .map(|(i, step)| (i as i64 + 1, step))
        .filter(|(to, _)| *to > found)
        .collect())
}

/// Move a sidecar's anchor to the record (sidecar, seq) about to be pruned.
const ANCHOR: &str = "INSERT INTO audit_chain_anchor (sidecar, seq, hash)
     SELECT sidecar, seq, hash FROM audit_records WHERE sidecar = $1 AND seq = $2
     ON CONFLICT (sidecar) DO UPDATE SET seq = excluded.seq, hash = excluded.hash";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_trail_is_refused_and_an_older_one_gets_the_missing_steps() {
        assert!(pending_steps(SCHEMA_VERSION + 1, "REAL").is_err());
        assert!(pending_steps(SCHEMA_VERSION, "REAL").unwrap().is_empty());
        let steps: Vec<i64> = pending_steps(1, "REAL")
            .unwrap()
            .into_iter()
            .map(|(v, _)| v)
            .collect();
        assert_eq!(steps, (2..=SCHEMA_VERSION).collect::<Vec<_>>());
        assert_eq!(migrations("REAL").len() as i64, SCHEMA_VERSION);
        assert_eq!(COLUMNS.split(',').count(), N_COLUMNS);
    }
}
