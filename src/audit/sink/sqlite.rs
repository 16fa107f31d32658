//! The embedded sink: one SQLite file in WAL mode, with incremental vacuum
//! so retention by size gives the space back to the file system.

use super::{
    ANCHOR, ANOMALY_COLUMNS, AnomalyRow, COLUMNS, Cell, Col, ColumnRead, HASH_INDEX, N_COLUMNS,
    Retention, SCHEMA_TABLE, Sink, SinkError, Stored, WriteError, pending_steps,
};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

/// An audit trail in one SQLite file.
pub struct Sqlite {
    conn: Connection,
    inserts: Inserts,
}

/// `PRAGMA auto_vacuum` value of incremental vacuum.
const INCREMENTAL: i64 = 2;

impl Sqlite {
    /// Open the file, creating it and its directory when missing, in WAL
    /// mode with its schema migrated to this build's version.
    pub fn open(path: &std::path::Path) -> Result<Sqlite, SinkError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| SinkError::CreateDir {
                dir: dir.to_path_buf(),
                source,
            })?;
        }
        let mut conn = Connection::open(path)?;
        // Before anything is created in a new file: freed pages can then be
        // given back to the file system (`retention.max_bytes`).
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL")?;
        // WAL: readers (reports) do not block the writer; NORMAL: a commit
        // survives the process being killed (only an OS crash may lose the
        // last transactions). mmap: pages are read from the file mapping,
        // not by a read call each; the request-hash index is touched at a
        // random page per record, so once the trail outgrows the page cache
        // this is most of its reads (measured: the writer's cost per record
        // at a 500 MB trail fell from ~14 µs to ~10 µs). The mapping is the
        // kernel's page cache, shared, not memory of the process's own.
        // temp_store: a batch's multi-row INSERT keeps a statement journal
        // (the pages it changed, to undo it alone on a constraint error);
        // on disk that was a new file under /var/tmp per statement and a
        // write per page (measured with `audit-cost`: 15.0 → 11.3 µs per
        // record). In memory it holds at most the pages one statement of
        // `ROWS_PER_INSERT` rows touches.
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000; PRAGMA mmap_size=268435456; PRAGMA temp_store=MEMORY;",
        )?;
        migrate(&mut conn)?;
        let mode: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
        if mode != INCREMENTAL {
            // A file made before incremental vacuum was asked for: the mode
            // only takes effect once the file is rebuilt (once, here).
            log::info!(
                "audit: rebuilding {} for incremental vacuum",
                path.display()
            );
            conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;")?;
        }
        // Room for the seven INSERTs besides the other statements kept.
        conn.set_prepared_statement_cache_capacity(32);
        Ok(Sqlite {
            conn,
            inserts: Inserts::new(),
        })
    }

    /// Keep the request-hash index, building it where it is missing, or
    /// drop it (`audit.request_hash_index`). Dropped, a lookup by hash
    /// bounded by time still finds its rows through the time index.
    pub fn keep_request_hash_index(&self, keep: bool) -> Result<(), SinkError> {
        let present: bool = self.conn.query_row(
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'index' AND name = 'audit_records_hash16'",
            [],
            |r| r.get(0),
        )?;
        match (keep, present) {
            (true, false) => {
                log::info!("audit: building the request-hash index (audit.request_hash_index)");
                self.conn.execute_batch(HASH_INDEX)?;
            }
            (false, true) => {
                log::info!(
                    "audit: dropping the request-hash index (audit.request_hash_index: false)"
                );
                self.conn
                    .execute_batch("DROP INDEX IF EXISTS audit_records_hash16")?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Bytes of the pages in use (what `max_bytes` bounds).
    fn used_bytes(&self) -> Result<u64, SinkError> {
        let pragma = |name: &str| -> Result<i64, SinkError> {
            self.conn
                .query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
                .map_err(SinkError::from)
        };
        let used = (pragma("page_count")? - pragma("freelist_count")?) * pragma("page_size")?;
        Ok(u64::try_from(used).unwrap_or(0))
    }

    /// Delete records older than `cut_ts`, each sidecar's chain cut at its
    /// last deleted record.
    fn prune_before(&mut self, cut_ts: i64) -> Result<u64, SinkError> {
        let tx = self.conn.transaction()?;
        // Per sidecar, the last record that goes (the time index finds them);
        // each chain is cut there, so what stays is always a suffix of it (a
        // long request may end after a newer one started).
        let cuts: Vec<(String, i64)> = {
            let mut stmt = tx.prepare(
                "SELECT sidecar, MAX(seq) FROM audit_records WHERE ts_ms < ?1 GROUP BY sidecar",
            )?;
            let rows = stmt.query_map([cut_ts], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut n = 0;
        for (sidecar, seq) in cuts {
            tx.execute(ANCHOR, params![sidecar, seq])?;
            n += tx.execute(
                "DELETE FROM audit_records WHERE sidecar = ?1 AND seq <= ?2",
                params![sidecar, seq],
            )?;
        }
        tx.execute("DELETE FROM audit_anomalies WHERE ts_ms < ?1", [cut_ts])?;
        tx.commit()?;
        Ok(n as u64)
    }

    /// The start time of the newest `keep` records' oldest, plus one: the
    /// cut that leaves `keep` records (fewer where start times tie).
    fn cut_keeping(&self, keep: i64) -> Result<Option<i64>, SinkError> {
        self.conn
            .query_row(
                "SELECT ts_ms FROM audit_records ORDER BY ts_ms DESC LIMIT 1 OFFSET ?1",
                [keep],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|ts| ts.map(|t| t + 1))
            .map_err(SinkError::from)
    }
}

/// Bring the file's schema to this build's version, one step per
/// transaction; the write lock is taken first so two processes opening one
/// file cannot both migrate it.
fn migrate(conn: &mut Connection) -> Result<(), SinkError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute(SCHEMA_TABLE, [])?;
    let found: Option<i64> =
        tx.query_row("SELECT MAX(version) FROM audit_schema", [], |r| r.get(0))?;
    let found = match found {
        Some(v) => v,
        None => {
            let legacy: bool = tx
                .query_row(
                    "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'audit_records'",
                    [],
                    |r| r.get(0),
                )?;
            i64::from(legacy)
        }
    };
    for (version, step) in pending_steps(found, "REAL")? {
        for stmt in step {
            tx.execute(&stmt, [])?;
        }
        tx.execute("DELETE FROM audit_schema", [])?;
        tx.execute("INSERT INTO audit_schema (version) VALUES (?1)", [version])?;
        if version > 1 {
            log::info!("audit: trail schema migrated to version {version}");
        }
    }
    tx.commit().map_err(SinkError::from)
}

impl ColumnRead for rusqlite::Row<'_> {
    type Error = rusqlite::Error;
    fn text(&self, i: usize) -> rusqlite::Result<String> {
        self.get(i)
    }
    fn maybe_text(&self, i: usize) -> rusqlite::Result<Option<String>> {
        self.get(i)
    }
    fn int(&self, i: usize) -> rusqlite::Result<i64> {
        self.get(i)
    }
    fn maybe_int(&self, i: usize) -> rusqlite::Result<Option<i64>> {
        self.get(i)
    }
    fn real(&self, i: usize) -> rusqlite::Result<f64> {
        self.get(i)
    }
    fn maybe_real(&self, i: usize) -> rusqlite::Result<Option<f64>> {
        self.get(i)
    }
}

impl rusqlite::ToSql for Col<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Col::Text(v) => v.to_sql(),
            Col::MaybeText(v) => v.to_sql(),
            Col::Int(v) => v.to_sql(),
            Col::MaybeInt(v) => v.to_sql(),
            Col::Real(v) => v.to_sql(),
            Col::MaybeReal(v) => v.to_sql(),
        }
    }
}

fn is_constraint(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation)
}

/// `(?1,…,?n)` for one row, `rows` times, comma-separated.
fn placeholders(rows: usize, per_row: usize) -> String {
    let mut sql = String::with_capacity(rows * per_row * 5);
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push('(');
        for k in 1..=per_row {
            if k > 1 {
                sql.push(',');
            }
            sql.push('?');
            sql.push_str(&(i * per_row + k).to_string());
        }
        sql.push(')');
    }
    sql
}

/// Rows per INSERT statement: SQLite binds at most 32766 parameters.
const ROWS_PER_INSERT: usize = 64;

/// The INSERT statements a batch is written with: one of
/// `ROWS_PER_INSERT` rows and one each of 32, 16, …, 1 rows (index k holds
/// 2^k rows). A batch of any size is cut into whole chunks, then the rest
/// by its binary digits, so only `SHAPES` statements ever exist and all of
/// them stay prepared. With one statement per batch size, as before, every
/// batch whose size was new to the cache had its SQL parsed again (14k
/// instructions per record under callgrind at a few records per batch).
struct Inserts([String; SHAPES]);

/// 64, 32, …, 1.
const SHAPES: usize = ROWS_PER_INSERT.ilog2() as usize + 1;

impl Inserts {
    /// `OR FAIL`: a row at a taken place stops the statement and keeps the
    /// rows before it, which the transaction's rollback then drops (the
    /// batch is all or nothing either way). The default `ABORT` would
    /// make SQLite copy each page a multi-row statement first changes into
    /// a statement journal, to undo only that statement: ~4 % of the
    /// commit's time without the request-hash index. (The index on
    /// `substr(…)` makes SQLite keep that journal anyway: a function in an
    /// index counts as a statement that may abort.)
    fn new() -> Inserts {
        Inserts(std::array::from_fn(|k| {
            format!(
                "INSERT OR FAIL INTO audit_records ({COLUMNS}) VALUES {}",
                placeholders(1 << k, N_COLUMNS)
            )
        }))
    }

    /// The statement for the next chunk of `left` rows, and its rows.
    fn next(&self, left: usize) -> (&str, usize) {
        let k = left.min(ROWS_PER_INSERT).ilog2();
        (&self.0[k as usize], 1 << k)
    }
}

fn insert_records(
    tx: &rusqlite::Transaction<'_>,
    inserts: &Inserts,
    records: &[Stored],
) -> rusqlite::Result<()> {
    let mut rest = records;
    while !rest.is_empty() {
        let (sql, rows) = inserts.next(rest.len());
        let (chunk, tail) = rest.split_at(rows);
        rest = tail;
        let mut stmt = tx.prepare_cached(sql)?;
        let mut k = 0;
        for s in chunk {
            for col in s.columns() {
                k += 1;
                stmt.raw_bind_parameter(k, col)?;
            }
        }
        stmt.raw_execute()?;
    }
    Ok(())
}

impl Sink for Sqlite {
    fn write(&mut self, records: &[Stored], anomalies: &[AnomalyRow]) -> Result<(), WriteError> {
        let failed = |e: rusqlite::Error| WriteError::Failed(e.into());
        let tx = self.conn.transaction().map_err(failed)?;
        match insert_records(&tx, &self.inserts, records) {
            Ok(()) => {}
            Err(e) if is_constraint(&e) => {
                drop(tx);
                return match records.last() {
                    Some(last) if stored_hash(&self.conn, last).map_err(failed)? => Ok(()),
                    _ => Err(WriteError::Conflict(e.into())),
                };
            }
            Err(e) => return Err(failed(e)),
        }
        {
            let mut stmt = tx
                .prepare_cached(&format!(
                    "INSERT INTO audit_anomalies ({ANOMALY_COLUMNS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9)"
                ))
                .map_err(failed)?;
            for a in anomalies {
                stmt.execute(params![
                    a.ts_ms,
                    a.sidecar,
                    a.rule,
                    a.tenant,
                    a.detail,
                    a.severity,
                    a.scope,
                    a.subject,
                    a.recommendation
                ])
                .map_err(failed)?;
            }
        }
        tx.commit().map_err(failed)
    }

    fn last_record(&mut self, sidecar: &str) -> Result<Option<(i64, String)>, SinkError> {
        self.conn
            .query_row(
                "SELECT seq, hash FROM audit_records WHERE sidecar = ?1 ORDER BY seq DESC LIMIT 1",
                [sidecar],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(SinkError::from)
    }

    fn each_record(
        &mut self,
        ts_ms: i64,
        tenant: Option<&str>,
        f: &mut dyn FnMut(Stored),
    ) -> Result<(), SinkError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM audit_records WHERE ts_ms >= ?1 AND (?2 IS NULL OR tenant = ?2) ORDER BY sidecar, seq"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let mut rows = stmt.query(params![ts_ms, tenant])?;
        while let Some(row) = rows.next()? {
            f(Stored::from_columns(row)?);
        }
        Ok(())
    }

    fn anomalies_since(
        &mut self,
        ts_ms: i64,
        tenant: Option<&str>,
    ) -> Result<Vec<AnomalyRow>, SinkError> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {ANOMALY_COLUMNS} FROM audit_anomalies WHERE ts_ms >= ?1 AND (?2 IS NULL OR tenant = ?2) ORDER BY ts_ms"))?;
        let rows = stmt.query_map(params![ts_ms, tenant], |r| {
            Ok(AnomalyRow {
                ts_ms: r.get(0)?,
                sidecar: r.get(1)?,
                rule: r.get(2)?,
                tenant: r.get(3)?,
                detail: r.get(4)?,
                severity: r.get(5)?,
                scope: r.get(6)?,
                subject: r.get(7)?,
                recommendation: r.get(8)?,
            })
        })?;
        rows.collect::<Result<Vec<_>, _>>().map_err(SinkError::from)
    }

    fn anchors(&mut self) -> Result<Vec<(String, i64, String)>, SinkError> {
        let mut stmt = self
            .conn
            .prepare("SELECT sidecar, seq, hash FROM audit_chain_anchor")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(SinkError::from)
    }

    fn prune(&mut self, keep: &Retention) -> Result<u64, SinkError> {
        // The cut: every record older than the age limit, and every record
        // before the newest `max_rows` (by time).
        let mut cut_ts = keep.before_ms.unwrap_or(i64::MIN);
        if let Some(max) = keep.max_rows {
            if let Some(ts) = self.cut_keeping(max)? {
                cut_ts = cut_ts.max(ts);
            }
        }
        let mut n = 0;
        if cut_ts != i64::MIN {
            n += self.prune_before(cut_ts)?;
        }
        let Some(max_bytes) = keep.max_bytes else {
            return Ok(n);
        };
        // By size: estimate the bytes a record takes from the file as it is
        // and keep as many as fit in nine tenths of the limit (room for the
        // records written until the next round). A few rounds at most: the
        // estimate is close once the file is mostly records.
        for _ in 0..4 {
            let used = self.used_bytes()?;
            if used <= max_bytes {
                break;
            }
            let rows: i64 = self
                .conn
                .query_row("SELECT COUNT(*) FROM audit_records", [], |r| r.get(0))?;
            if rows == 0 {
                break;
            }
            let fit = (rows as f64 * 0.9 * max_bytes as f64 / used as f64) as i64;
            let fit = fit.min(rows - 1).max(0);
            let Some(ts) = self.cut_keeping(fit)? else {
                break;
            };
            n += self.prune_before(ts)?;
        }
        // Give the freed pages back to the file system: the file shrinks at
        // the checkpoint that follows. The pragma frees one page per step.
        {
            let mut stmt = self.conn.prepare("PRAGMA incremental_vacuum")?;
            let mut rows = stmt.query([])?;
            while rows.next()?.is_some() {}
        }
        self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
        Ok(n)
    }

    fn query(
        &mut self,
        sql: &str,
        since_ms: i64,
        tenant: Option<&str>,
        f: &mut dyn FnMut(&[Cell]),
    ) -> Result<(), SinkError> {
        let mut stmt = self.conn.prepare(sql)?;
        let n = stmt.column_count();
        let mut rows = stmt.query(params![since_ms, tenant])?;
        let mut cells = Vec::with_capacity(n);
        while let Some(row) = rows.next()? {
            cells.clear();
            for i in 0..n {
                use rusqlite::types::ValueRef;
                cells.push(match row.get_ref(i)? {
                    ValueRef::Null => Cell::Null,
                    ValueRef::Integer(v) => Cell::Int(v),
                    ValueRef::Real(v) => Cell::Real(v),
                    ValueRef::Text(t) | ValueRef::Blob(t) => {
                        Cell::Text(String::from_utf8_lossy(t).into_owned())
                    }
                });
            }
            f(&cells);
        }
        Ok(())
    }

    fn schema_version(&mut self) -> Result<i64, SinkError> {
        self.conn
            .query_row("SELECT MAX(version) FROM audit_schema", [], |r| r.get(0))
            .map_err(SinkError::from)
    }
}

/// Whether the row at `s`'s place holds `s` (its hash): the batch ending
/// with `s` was written before.
fn stored_hash(conn: &Connection, s: &Stored) -> rusqlite::Result<bool> {
    let hash: Option<String> = conn
        .query_row(
            "SELECT hash FROM audit_records WHERE sidecar = ?1 AND seq = ?2",
            params![s.sidecar, s.seq],
            |r| r.get(0),
        )
        .optional()?;
    Ok(hash.as_deref() == Some(s.hash.as_str()))
}
