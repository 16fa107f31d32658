//! Where records are kept: SQLite (a file next to the sidecar, WAL mode) or
//! PostgreSQL (one database for a fleet). The same schema, the same queries.

use super::record::Record;
use std::path::PathBuf;

/// How to reach a sink (parsed from config or `--sink`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkSpec {
    Sqlite(PathBuf),
    Postgres { url: String, schema: Option<String> },
}

impl SinkSpec {
    /// `sqlite:PATH` or `postgres://…` (optionally `#schema`).
    pub fn parse(text: &str) -> Result<SinkSpec, String> {
        if let Some(path) = text.strip_prefix("sqlite:") {
            return Ok(SinkSpec::Sqlite(PathBuf::from(path)));
        }
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            let (url, schema) = match text.split_once('#') {
                Some((u, s)) => (u.to_string(), Some(s.to_string())),
                None => (text.to_string(), None),
            };
            return Ok(SinkSpec::Postgres { url, schema });
        }
        Err(format!(
            "`{text}` is not a sink: use sqlite:PATH or postgres://…"
        ))
    }

    pub fn open(&self) -> Result<Box<dyn Sink>, String> {
        match self {
            SinkSpec::Sqlite(path) => Ok(Box::new(Sqlite::open(path)?)),
            SinkSpec::Postgres { url, schema } => {
                Ok(Box::new(Postgres::open(url, schema.as_deref())?))
            }
        }
    }
}

/// A record as stored, with its place in the chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub sidecar: String,
    pub seq: i64,
    pub prev_hash: String,
    pub hash: String,
    pub record: Record,
}

/// An anomaly as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnomalyRow {
    pub ts_ms: i64,
    pub sidecar: String,
    pub rule: String,
    pub tenant: Option<String>,
    pub detail: String,
}

pub trait Sink: Send {
    /// Write records (and anomalies) in one transaction.
    fn write(&mut self, records: &[Stored], anomalies: &[AnomalyRow]) -> Result<(), String>;
    /// The last (seq, hash) written by a sidecar, to continue its chain.
    fn chain_head(&mut self, sidecar: &str) -> Result<Option<(i64, String)>, String>;
    /// Records since `ts_ms`, in (sidecar, seq) order.
    fn records_since(&mut self, ts_ms: i64, tenant: Option<&str>) -> Result<Vec<Stored>, String>;
    fn anomalies_since(
        &mut self,
        ts_ms: i64,
        tenant: Option<&str>,
    ) -> Result<Vec<AnomalyRow>, String>;
    /// Where each sidecar's chain starts now (after pruning): (sidecar, seq, hash).
    fn anchors(&mut self) -> Result<Vec<(String, i64, String)>, String>;
    /// Delete records older than `before_ms` and beyond the newest `max_rows`,
    /// moving each sidecar's anchor to its last deleted record. Returns the
    /// number deleted.
    fn prune(&mut self, before_ms: Option<i64>, max_rows: Option<i64>) -> Result<u64, String>;
}

const COLUMNS: &str = "sidecar, seq, prev_hash, hash, ts_ms, request_id, tenant, client_ip, endpoint, requested_model, served_model, deployment, attempts, status, decision, rule, prompt_tokens, completion_tokens, total_tokens, usage_estimated, cost_nano, latency_ms, ttft_ms, streamed, truncated, client_gone, request_hash, response_preview, error";

fn schema(real: &str) -> Vec<String> {
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
        "CREATE INDEX IF NOT EXISTS audit_records_model ON audit_records (requested_model, ts_ms)".into(),
        "CREATE INDEX IF NOT EXISTS audit_records_hash ON audit_records (request_hash)".into(),
        "CREATE TABLE IF NOT EXISTS audit_anomalies (
            ts_ms BIGINT NOT NULL, sidecar TEXT NOT NULL, rule TEXT NOT NULL, tenant TEXT, detail TEXT NOT NULL)"
            .into(),
        "CREATE INDEX IF NOT EXISTS audit_anomalies_ts ON audit_anomalies (ts_ms)".into(),
        "CREATE TABLE IF NOT EXISTS audit_chain_anchor (
            sidecar TEXT PRIMARY KEY, seq BIGINT NOT NULL, hash TEXT NOT NULL)"
            .into(),
    ]
}

/// Move a sidecar's anchor to the record (sidecar, seq) about to be pruned.
const ANCHOR_SQLITE: &str = "INSERT INTO audit_chain_anchor (sidecar, seq, hash)
     SELECT sidecar, seq, hash FROM audit_records WHERE sidecar = ?1 AND seq = ?2
     ON CONFLICT (sidecar) DO UPDATE SET seq = excluded.seq, hash = excluded.hash";
const ANCHOR_PG: &str = "INSERT INTO audit_chain_anchor (sidecar, seq, hash)
     SELECT sidecar, seq, hash FROM audit_records WHERE sidecar = $1 AND seq = $2
     ON CONFLICT (sidecar) DO UPDATE SET seq = excluded.seq, hash = excluded.hash";

fn b(v: bool) -> i64 {
    i64::from(v)
}

// ---------------------------------------------------------------- SQLite

pub struct Sqlite {
    conn: rusqlite::Connection,
}

fn sq(e: rusqlite::Error) -> String {
    format!("sqlite: {e}")
}

impl Sqlite {
    pub fn open(path: &std::path::Path) -> Result<Sqlite, String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let conn = rusqlite::Connection::open(path).map_err(sq)?;
        // WAL: readers (reports) do not block the writer; NORMAL: a commit
        // survives the process being killed (only an OS crash may lose the
        // last transactions).
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000;",
        )
        .map_err(sq)?;
        for stmt in schema("REAL") {
            conn.execute(&stmt, []).map_err(sq)?;
        }
        Ok(Sqlite { conn })
    }
}

fn stored_from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Stored> {
    Ok(Stored {
        sidecar: row.get(0)?,
        seq: row.get(1)?,
        prev_hash: row.get(2)?,
        hash: row.get(3)?,
        record: Record {
            ts_ms: row.get(4)?,
            request_id: row.get(5)?,
            tenant: row.get(6)?,
            client_ip: row.get(7)?,
            endpoint: row.get(8)?,
            requested_model: row.get(9)?,
            served_model: row.get(10)?,
            deployment: row.get(11)?,
            attempts: row.get(12)?,
            status: row.get(13)?,
            decision: row.get(14)?,
            rule: row.get(15)?,
            prompt_tokens: row.get(16)?,
            completion_tokens: row.get(17)?,
            total_tokens: row.get(18)?,
            usage_estimated: row.get::<_, i64>(19)? != 0,
            cost_nano: row.get(20)?,
            latency_ms: row.get(21)?,
            ttft_ms: row.get(22)?,
            streamed: row.get::<_, i64>(23)? != 0,
            truncated: row.get::<_, i64>(24)? != 0,
            client_gone: row.get::<_, i64>(25)? != 0,
            request_hash: row.get(26)?,
            response_preview: row.get(27)?,
            error: row.get(28)?,
        },
    })
}

impl Sink for Sqlite {
    fn write(&mut self, records: &[Stored], anomalies: &[AnomalyRow]) -> Result<(), String> {
        let tx = self.conn.transaction().map_err(sq)?;
        {
            let mut stmt = tx
                .prepare_cached(&format!(
                    "INSERT INTO audit_records ({COLUMNS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19,?20,?21,?22,?23,?24,?25,?26,?27,?28,?29)"
                ))
                .map_err(sq)?;
            for s in records {
                let r = &s.record;
                stmt.execute(rusqlite::params![
                    s.sidecar,
                    s.seq,
                    s.prev_hash,
                    s.hash,
                    r.ts_ms,
                    r.request_id,
                    r.tenant,
                    r.client_ip,
                    r.endpoint,
                    r.requested_model,
                    r.served_model,
                    r.deployment,
                    r.attempts,
                    r.status,
                    r.decision,
                    r.rule,
                    r.prompt_tokens,
                    r.completion_tokens,
                    r.total_tokens,
                    b(r.usage_estimated),
                    r.cost_nano,
                    r.latency_ms,
                    r.ttft_ms,
                    b(r.streamed),
                    b(r.truncated),
                    b(r.client_gone),
                    r.request_hash,
                    r.response_preview,
                    r.error
                ])
                .map_err(sq)?;
            }
            let mut stmt = tx
                .prepare_cached("INSERT INTO audit_anomalies (ts_ms, sidecar, rule, tenant, detail) VALUES (?1,?2,?3,?4,?5)")
                .map_err(sq)?;
            for a in anomalies {
                stmt.execute(rusqlite::params![
                    a.ts_ms, a.sidecar, a.rule, a.tenant, a.detail
                ])
                .map_err(sq)?;
            }
        }
        tx.commit().map_err(sq)
    }

    fn chain_head(&mut self, sidecar: &str) -> Result<Option<(i64, String)>, String> {
        let last = self
            .conn
            .query_row(
                "SELECT seq, hash FROM audit_records WHERE sidecar = ?1 ORDER BY seq DESC LIMIT 1",
                [sidecar],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(sq(e)),
            })?;
        if last.is_some() {
            return Ok(last);
        }
        // Everything pruned: continue from the anchor.
        Ok(self
            .anchors()?
            .into_iter()
            .find(|(s, _, _)| s == sidecar)
            .map(|(_, q, h)| (q, h)))
    }

    fn records_since(&mut self, ts_ms: i64, tenant: Option<&str>) -> Result<Vec<Stored>, String> {
        let sql = format!(
            "SELECT {COLUMNS} FROM audit_records WHERE ts_ms >= ?1 AND (?2 IS NULL OR tenant = ?2) ORDER BY sidecar, seq"
        );
        let mut stmt = self.conn.prepare(&sql).map_err(sq)?;
        let rows = stmt
            .query_map(rusqlite::params![ts_ms, tenant], stored_from_sqlite)
            .map_err(sq)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(sq)
    }

    fn anomalies_since(
        &mut self,
        ts_ms: i64,
        tenant: Option<&str>,
    ) -> Result<Vec<AnomalyRow>, String> {
        let mut stmt = self
            .conn
            .prepare("SELECT ts_ms, sidecar, rule, tenant, detail FROM audit_anomalies WHERE ts_ms >= ?1 AND (?2 IS NULL OR tenant = ?2) ORDER BY ts_ms")
            .map_err(sq)?;
        let rows = stmt
            .query_map(rusqlite::params![ts_ms, tenant], |r| {
                Ok(AnomalyRow {
                    ts_ms: r.get(0)?,
                    sidecar: r.get(1)?,
                    rule: r.get(2)?,
                    tenant: r.get(3)?,
                    detail: r.get(4)?,
                })
            })
            .map_err(sq)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(sq)
    }

    fn anchors(&mut self) -> Result<Vec<(String, i64, String)>, String> {
        let mut stmt = self
            .conn
            .prepare("SELECT sidecar, seq, hash FROM audit_chain_anchor")
            .map_err(sq)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(sq)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(sq)
    }

    fn prune(&mut self, before_ms: Option<i64>, max_rows: Option<i64>) -> Result<u64, String> {
        let tx = self.conn.transaction().map_err(sq)?;
        // The cut: every record older than the age limit, and every record
        // before the newest `max_rows` (by time).
        let mut cut_ts = before_ms.unwrap_or(i64::MIN);
        if let Some(max) = max_rows {
            let nth: Option<i64> = tx
                .query_row(
                    "SELECT ts_ms FROM audit_records ORDER BY ts_ms DESC LIMIT 1 OFFSET ?1",
                    [max],
                    |r| r.get(0),
                )
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(sq(e)),
                })?;
            if let Some(ts) = nth {
                cut_ts = cut_ts.max(ts + 1);
            }
        }
        if cut_ts == i64::MIN {
            return Ok(0);
        }
        // Per sidecar, the last record that goes (the time index finds them);
        // each chain is cut there, so what stays is always a suffix of it (a
        // long request may end after a newer one started).
        let cuts: Vec<(String, i64)> = {
            let mut stmt = tx
                .prepare(
                    "SELECT sidecar, MAX(seq) FROM audit_records WHERE ts_ms < ?1 GROUP BY sidecar",
                )
                .map_err(sq)?;
            let rows = stmt
                .query_map([cut_ts], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(sq)?;
            rows.collect::<Result<_, _>>().map_err(sq)?
        };
        let mut n = 0;
        for (sidecar, seq) in cuts {
            tx.execute(ANCHOR_SQLITE, rusqlite::params![sidecar, seq])
                .map_err(sq)?;
            n += tx
                .execute(
                    "DELETE FROM audit_records WHERE sidecar = ?1 AND seq <= ?2",
                    rusqlite::params![sidecar, seq],
                )
                .map_err(sq)?;
        }
        tx.execute("DELETE FROM audit_anomalies WHERE ts_ms < ?1", [cut_ts])
            .map_err(sq)?;
        tx.commit().map_err(sq)?;
        Ok(n as u64)
    }
}

// ------------------------------------------------------------ PostgreSQL

pub struct Postgres {
    client: postgres::Client,
    url: String,
    schema: Option<String>,
}

fn pg(e: postgres::Error) -> String {
    format!("postgres: {e}")
}

impl Postgres {
    pub fn open(url: &str, schema_name: Option<&str>) -> Result<Postgres, String> {
        Ok(Postgres {
            client: Postgres::connect(url, schema_name)?,
            url: url.to_string(),
            schema: schema_name.map(str::to_string),
        })
    }

    /// A connection with the schema migrated and selected.
    fn connect(url: &str, schema_name: Option<&str>) -> Result<postgres::Client, String> {
        let mut client = postgres::Client::connect(url, postgres::NoTls).map_err(|e| {
            format!("postgres: cannot connect ({e}); is the server running and the URL right?")
        })?;
        if let Some(s) = schema_name {
            if !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "postgres: schema `{s}` must be letters, digits and _"
                ));
            }
            client
                .batch_execute(&format!(
                    "CREATE SCHEMA IF NOT EXISTS {s}; SET search_path TO {s}"
                ))
                .map_err(pg)?;
        }
        // Several sidecars may start at once; the migration must not race.
        client
            .batch_execute("SELECT pg_advisory_lock(7426550042)")
            .map_err(pg)?;
        let migrated = schema("DOUBLE PRECISION")
            .iter()
            .try_for_each(|stmt| client.batch_execute(stmt).map_err(pg));
        client
            .batch_execute("SELECT pg_advisory_unlock(7426550042)")
            .map_err(pg)?;
        migrated?;
        Ok(client)
    }

    /// The client, connected again if the server closed the connection (a
    /// restart, a failover, an idle timeout): the writer retries a failed
    /// batch, and the retry goes over the new connection.
    fn client(&mut self) -> Result<&mut postgres::Client, String> {
        if self.client.is_closed() {
            log::warn!("audit: the PostgreSQL connection was closed; connecting again");
            self.client = Postgres::connect(&self.url, self.schema.as_deref())?;
        }
        Ok(&mut self.client)
    }
}

fn stored_from_pg(row: &postgres::Row) -> Stored {
    Stored {
        sidecar: row.get(0),
        seq: row.get(1),
        prev_hash: row.get(2),
        hash: row.get(3),
        record: Record {
            ts_ms: row.get(4),
            request_id: row.get(5),
            tenant: row.get(6),
            client_ip: row.get(7),
            endpoint: row.get(8),
            requested_model: row.get(9),
            served_model: row.get(10),
            deployment: row.get(11),
            attempts: row.get(12),
            status: row.get(13),
            decision: row.get(14),
            rule: row.get(15),
            prompt_tokens: row.get(16),
            completion_tokens: row.get(17),
            total_tokens: row.get(18),
            usage_estimated: row.get::<_, i64>(19) != 0,
            cost_nano: row.get(20),
            latency_ms: row.get(21),
            ttft_ms: row.get(22),
            streamed: row.get::<_, i64>(23) != 0,
            truncated: row.get::<_, i64>(24) != 0,
            client_gone: row.get::<_, i64>(25) != 0,
            request_hash: row.get(26),
            response_preview: row.get(27),
            error: row.get(28),
        },
    }
}

impl Sink for Postgres {
    fn write(&mut self, records: &[Stored], anomalies: &[AnomalyRow]) -> Result<(), String> {
        let mut tx = self.client()?.transaction().map_err(pg)?;
        // One statement per thousand rows: a round trip per batch, not per row.
        for chunk in records.chunks(1000) {
            let flags: Vec<[i64; 4]> = chunk
                .iter()
                .map(|s| {
                    let r = &s.record;
                    [
                        b(r.usage_estimated),
                        b(r.streamed),
                        b(r.truncated),
                        b(r.client_gone),
                    ]
                })
                .collect();
            let mut sql = format!("INSERT INTO audit_records ({COLUMNS}) VALUES ");
            let mut params: Vec<&(dyn postgres::types::ToSql + Sync)> =
                Vec::with_capacity(chunk.len() * 29);
            for (i, (s, f)) in chunk.iter().zip(&flags).enumerate() {
                let r = &s.record;
                if i > 0 {
                    sql.push(',');
                }
                let base = i * 29;
                sql.push('(');
                for k in 1..=29 {
                    if k > 1 {
                        sql.push(',');
                    }
                    sql.push_str(&format!("${}", base + k));
                }
                sql.push(')');
                params.extend_from_slice(&[
                    &s.sidecar,
                    &s.seq,
                    &s.prev_hash,
                    &s.hash,
                    &r.ts_ms,
                    &r.request_id,
                    &r.tenant,
                    &r.client_ip,
                    &r.endpoint,
                    &r.requested_model,
                    &r.served_model,
                    &r.deployment,
                    &r.attempts,
                    &r.status,
                    &r.decision,
                    &r.rule,
                    &r.prompt_tokens,
                    &r.completion_tokens,
                    &r.total_tokens,
                    &f[0],
                    &r.cost_nano,
                    &r.latency_ms,
                    &r.ttft_ms,
                    &f[1],
                    &f[2],
                    &f[3],
                    &r.request_hash,
                    &r.response_preview,
                    &r.error,
                ]);
            }
            // A batch whose commit reached the server but whose answer was
            // lost is retried by the writer: its rows are already there.
            sql.push_str(" ON CONFLICT (sidecar, seq) DO NOTHING");
            tx.execute(sql.as_str(), &params).map_err(pg)?;
        }
        for a in anomalies {
            tx.execute(
                "INSERT INTO audit_anomalies (ts_ms, sidecar, rule, tenant, detail) VALUES ($1,$2,$3,$4,$5)",
                &[&a.ts_ms, &a.sidecar, &a.rule, &a.tenant, &a.detail],
            )
            .map_err(pg)?;
        }
        tx.commit().map_err(pg)
    }

    fn chain_head(&mut self, sidecar: &str) -> Result<Option<(i64, String)>, String> {
        let row = self
            .client()?
            .query_opt(
                "SELECT seq, hash FROM audit_records WHERE sidecar = $1 ORDER BY seq DESC LIMIT 1",
                &[&sidecar],
            )
            .map_err(pg)?;
        if let Some(r) = row {
            return Ok(Some((r.get(0), r.get(1))));
        }
        Ok(self
            .anchors()?
            .into_iter()
            .find(|(s, _, _)| s == sidecar)
            .map(|(_, q, h)| (q, h)))
    }

    fn records_since(&mut self, ts_ms: i64, tenant: Option<&str>) -> Result<Vec<Stored>, String> {
        let sql = format!(
            "SELECT {COLUMNS} FROM audit_records WHERE ts_ms >= $1 AND ($2::TEXT IS NULL OR tenant = $2) ORDER BY sidecar, seq"
        );
        let rows = self.client()?.query(&sql, &[&ts_ms, &tenant]).map_err(pg)?;
        Ok(rows.iter().map(stored_from_pg).collect())
    }

    fn anomalies_since(
        &mut self,
        ts_ms: i64,
        tenant: Option<&str>,
    ) -> Result<Vec<AnomalyRow>, String> {
        let rows = self
            .client()?
            .query(
                "SELECT ts_ms, sidecar, rule, tenant, detail FROM audit_anomalies WHERE ts_ms >= $1 AND ($2::TEXT IS NULL OR tenant = $2) ORDER BY ts_ms",
                &[&ts_ms, &tenant],
            )
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| AnomalyRow {
                ts_ms: r.get(0),
                sidecar: r.get(1),
                rule: r.get(2),
                tenant: r.get(3),
                detail: r.get(4),
            })
            .collect())
    }

    fn anchors(&mut self) -> Result<Vec<(String, i64, String)>, String> {
        let rows = self
            .client()?
            .query("SELECT sidecar, seq, hash FROM audit_chain_anchor", &[])
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    fn prune(&mut self, before_ms: Option<i64>, max_rows: Option<i64>) -> Result<u64, String> {
        let mut tx = self.client()?.transaction().map_err(pg)?;
        let mut cut_ts = before_ms.unwrap_or(i64::MIN);
        if let Some(max) = max_rows {
            let row = tx
                .query_opt(
                    "SELECT ts_ms FROM audit_records ORDER BY ts_ms DESC LIMIT 1 OFFSET $1",
                    &[&max],
                )
                .map_err(pg)?;
            if let Some(r) = row {
                cut_ts = cut_ts.max(r.get::<_, i64>(0) + 1);
            }
        }
        if cut_ts == i64::MIN {
            return Ok(0);
        }
        let cuts = tx
            .query(
                "SELECT sidecar, MAX(seq) FROM audit_records WHERE ts_ms < $1 GROUP BY sidecar",
                &[&cut_ts],
            )
            .map_err(pg)?;
        let mut n = 0;
        for row in cuts {
            let (sidecar, seq): (String, i64) = (row.get(0), row.get(1));
            tx.execute(ANCHOR_PG, &[&sidecar, &seq]).map_err(pg)?;
            n += tx
                .execute(
                    "DELETE FROM audit_records WHERE sidecar = $1 AND seq <= $2",
                    &[&sidecar, &seq],
                )
                .map_err(pg)?;
        }
        tx.execute("DELETE FROM audit_anomalies WHERE ts_ms < $1", &[&cut_ts])
            .map_err(pg)?;
        tx.commit().map_err(pg)?;
        Ok(n)
    }
}
