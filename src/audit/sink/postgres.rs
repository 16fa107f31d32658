//! The fleet sink: one PostgreSQL database (optionally one schema of it)
//! that every sidecar writes to, each on its own hash chain.

use super::{
    ANCHOR, ANOMALY_COLUMNS, AnomalyRow, COLUMNS, Cell, Col, ColumnRead, N_COLUMNS, Retention,
    SCHEMA_TABLE, Sink, SinkError, Stored, WriteError, pending_steps,
};
use crate::config::is_schema_name;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{ToSql, Type};

pub(crate) struct Postgres {
    client: postgres::Client,
    url: String,
    schema: Option<String>,
}

/// Serialises schema migrations of every sidecar sharing the database.
const MIGRATION_LOCK: i64 = 7_426_550_042;

impl Postgres {
    pub(crate) fn open(url: &str, schema_name: Option<&str>) -> Result<Postgres, SinkError> {
        Ok(Postgres {
            client: Postgres::connect(url, schema_name)?,
            url: url.to_string(),
            schema: schema_name.map(str::to_string),
        })
    }

    /// A connection with the schema migrated and selected.
    fn connect(url: &str, schema_name: Option<&str>) -> Result<postgres::Client, SinkError> {
        let mut client =
            postgres::Client::connect(url, postgres::NoTls).map_err(SinkError::Connect)?;
        if let Some(s) = schema_name {
            // Written into SQL below, so never more than a plain name.
            if !is_schema_name(s) {
                return Err(SinkError::SchemaName(s.to_string()));
            }
            client.batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {s}; SET search_path TO {s}"
            ))?;
        }
        migrate(&mut client)?;
        Ok(client)
    }

    /// The client, connected again if the server closed the connection (a
    /// restart, a failover, an idle timeout): the writer retries a failed
    /// batch, and the retry goes over the new connection.
    fn client(&mut self) -> Result<&mut postgres::Client, SinkError> {
        if self.client.is_closed() {
            log::warn!("audit: the PostgreSQL connection was closed; connecting again");
            self.client = Postgres::connect(&self.url, self.schema.as_deref())?;
        }
        Ok(&mut self.client)
    }
}

/// Bring the schema to this build's version. Several sidecars may start at
/// once: a transaction-scoped advisory lock makes them take turns, and each
/// step commits with the version it reached.
fn migrate(client: &mut postgres::Client) -> Result<(), SinkError> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(SCHEMA_TABLE)?;
    let found: Option<i64> = tx
        .query_one("SELECT MAX(version) FROM audit_schema", &[])?
        .get(0);
    let found = match found {
        Some(v) => v,
        None => {
            // `to_regclass` looks along the search path: this schema's table.
            let legacy: bool = tx
                .query_one("SELECT to_regclass('audit_records') IS NOT NULL", &[])?
                .get(0);
            i64::from(legacy)
        }
    };
    for (version, step) in pending_steps(found, "DOUBLE PRECISION")? {
        for stmt in step {
            tx.batch_execute(&stmt)?;
        }
        tx.execute("DELETE FROM audit_schema", &[])?;
        tx.execute(
            "INSERT INTO audit_schema (version) VALUES ($1)",
            &[&version],
        )?;
        if version > 1 {
            log::info!("audit: trail schema migrated to version {version}");
        }
    }
    tx.commit().map_err(SinkError::from)
}

impl ColumnRead for postgres::Row {
    type Error = postgres::Error;
    fn text(&self, i: usize) -> Result<String, postgres::Error> {
        self.try_get(i)
    }
    fn maybe_text(&self, i: usize) -> Result<Option<String>, postgres::Error> {
        self.try_get(i)
    }
    fn int(&self, i: usize) -> Result<i64, postgres::Error> {
        self.try_get(i)
    }
    fn maybe_int(&self, i: usize) -> Result<Option<i64>, postgres::Error> {
        self.try_get(i)
    }
    fn real(&self, i: usize) -> Result<f64, postgres::Error> {
        self.try_get(i)
    }
    fn maybe_real(&self, i: usize) -> Result<Option<f64>, postgres::Error> {
        self.try_get(i)
    }
}

impl ToSql for Col<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match *self {
            Col::Text(v) => v.to_sql(ty, out),
            Col::MaybeText(v) => v.to_sql(ty, out),
            Col::Int(v) => v.to_sql(ty, out),
            Col::MaybeInt(v) => v.to_sql(ty, out),
            Col::Real(v) => v.to_sql(ty, out),
            Col::MaybeReal(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        <&str as ToSql>::accepts(ty) || <i64 as ToSql>::accepts(ty) || <f64 as ToSql>::accepts(ty)
    }

    postgres::types::to_sql_checked!();
}

fn is_unique_violation(e: &postgres::Error) -> bool {
    e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION)
}

/// Rows per INSERT statement: a round trip per batch, not per row, well
/// under the protocol's 65535 parameters.
const ROWS_PER_INSERT: usize = 1000;

fn insert_records(
    tx: &mut postgres::Transaction<'_>,
    records: &[Stored],
) -> Result<(), postgres::Error> {
    for chunk in records.chunks(ROWS_PER_INSERT) {
        let columns: Vec<[Col<'_>; N_COLUMNS]> = chunk.iter().map(Stored::columns).collect();
        let mut sql = format!("INSERT INTO audit_records ({COLUMNS}) VALUES ");
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(chunk.len() * N_COLUMNS);
        for (i, row) in columns.iter().enumerate() {
            if i > 0 {
                sql.push(',');
            }
            let base = i * N_COLUMNS;
            sql.push('(');
            for k in 1..=N_COLUMNS {
                if k > 1 {
                    sql.push(',');
                }
                sql.push('$');
                sql.push_str(&(base + k).to_string());
            }
            sql.push(')');
            params.extend(row.iter().map(|c| c as &(dyn ToSql + Sync)));
        }
        tx.execute(sql.as_str(), &params)?;
    }
    Ok(())
}

impl Sink for Postgres {
    fn write(&mut self, records: &[Stored], anomalies: &[AnomalyRow]) -> Result<(), WriteError> {
        let failed = |e: postgres::Error| WriteError::Failed(e.into());
        let client = self.client().map_err(WriteError::Failed)?;
        let mut tx = client.transaction().map_err(failed)?;
        match insert_records(&mut tx, records) {
            Ok(()) => {}
            Err(e) if is_unique_violation(&e) => {
                drop(tx);
                // Taken positions: either this very batch, committed before
                // its answer was lost (then it is done), or another
                // process's rows under the same sidecar id.
                let Some(last) = records.last() else {
                    return Err(WriteError::Conflict(e.into()));
                };
                let hash: Option<String> = client
                    .query_opt(
                        "SELECT hash FROM audit_records WHERE sidecar = $1 AND seq = $2",
                        &[&last.sidecar, &last.seq],
                    )
                    .map_err(failed)?
                    .map(|r| r.get(0));
                return if hash.as_deref() == Some(last.hash.as_str()) {
                    Ok(())
                } else {
                    Err(WriteError::Conflict(e.into()))
                };
            }
            Err(e) => return Err(failed(e)),
        }
        let insert = format!(
            "INSERT INTO audit_anomalies ({ANOMALY_COLUMNS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)"
        );
        for a in anomalies {
            tx.execute(
                insert.as_str(),
                &[
                    &a.ts_ms,
                    &a.sidecar,
                    &a.rule,
                    &a.tenant,
                    &a.detail,
                    &a.severity,
                    &a.scope,
                    &a.subject,
                    &a.recommendation,
                ],
            )
            .map_err(failed)?;
        }
        tx.commit().map_err(failed)
    }

    fn last_record(&mut self, sidecar: &str) -> Result<Option<(i64, String)>, SinkError> {
        let row = self.client()?.query_opt(
            "SELECT seq, hash FROM audit_records WHERE sidecar = $1 ORDER BY seq DESC LIMIT 1",
            &[&sidecar],
        )?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    fn each_record(
        &mut self,
        ts_ms: i64,
        tenant: Option<&str>,
        f: &mut dyn FnMut(Stored),
    ) -> Result<(), SinkError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM audit_records WHERE ts_ms >= $1 AND ($2::TEXT IS NULL OR tenant = $2) ORDER BY sidecar, seq"
        );
        let params: [&(dyn ToSql + Sync); 2] = [&ts_ms, &tenant];
        let mut rows = self.client()?.query_raw(sql.as_str(), params)?;
        while let Some(row) = rows.next()? {
            f(Stored::from_columns(&row)?);
        }
        Ok(())
    }

    fn anomalies_since(
        &mut self,
        ts_ms: i64,
        tenant: Option<&str>,
    ) -> Result<Vec<AnomalyRow>, SinkError> {
        let rows = self
            .client()?
            .query(
                format!("SELECT {ANOMALY_COLUMNS} FROM audit_anomalies WHERE ts_ms >= $1 AND ($2::TEXT IS NULL OR tenant = $2) ORDER BY ts_ms").as_str(),
                &[&ts_ms, &tenant],
            )?;
        Ok(rows
            .iter()
            .map(|r| AnomalyRow {
                ts_ms: r.get(0),
                sidecar: r.get(1),
                rule: r.get(2),
                tenant: r.get(3),
                detail: r.get(4),
                severity: r.get(5),
                scope: r.get(6),
                subject: r.get(7),
                recommendation: r.get(8),
            })
            .collect())
    }

    fn anchors(&mut self) -> Result<Vec<(String, i64, String)>, SinkError> {
        let rows = self
            .client()?
            .query("SELECT sidecar, seq, hash FROM audit_chain_anchor", &[])?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    fn prune(&mut self, keep: &Retention) -> Result<u64, SinkError> {
        let mut tx = self.client()?.transaction()?;
        let mut cut_ts = keep.before_ms.unwrap_or(i64::MIN);
        if let Some(max) = keep.max_rows {
            let row = tx.query_opt(
                "SELECT ts_ms FROM audit_records ORDER BY ts_ms DESC LIMIT 1 OFFSET $1",
                &[&max],
            )?;
            if let Some(r) = row {
                cut_ts = cut_ts.max(r.get::<_, i64>(0) + 1);
            }
        }
        if cut_ts == i64::MIN {
            return Ok(0);
        }
        let cuts = tx.query(
            "SELECT sidecar, MAX(seq) FROM audit_records WHERE ts_ms < $1 GROUP BY sidecar",
            &[&cut_ts],
        )?;
        let mut n = 0;
        for row in cuts {
            let (sidecar, seq): (String, i64) = (row.get(0), row.get(1));
            tx.execute(ANCHOR, &[&sidecar, &seq])?;
            n += tx.execute(
                "DELETE FROM audit_records WHERE sidecar = $1 AND seq <= $2",
                &[&sidecar, &seq],
            )?;
        }
        tx.execute("DELETE FROM audit_anomalies WHERE ts_ms < $1", &[&cut_ts])?;
        tx.commit()?;
        Ok(n)
    }

    fn query(
        &mut self,
        sql: &str,
        since_ms: i64,
        tenant: Option<&str>,
        f: &mut dyn FnMut(&[Cell]),
    ) -> Result<(), SinkError> {
        let params: [&(dyn ToSql + Sync); 2] = [&since_ms, &tenant];
        let mut rows = self.client()?.query_raw(sql, params)?;
        let mut cells = Vec::new();
        while let Some(row) = rows.next()? {
            cells.clear();
            for (i, col) in row.columns().iter().enumerate() {
                let t = col.type_();
                let cell = if *t == Type::INT8 {
                    row.try_get::<_, Option<i64>>(i).map(|v| v.map(Cell::Int))
                } else if *t == Type::INT4 {
                    row.try_get::<_, Option<i32>>(i)
                        .map(|v| v.map(|v| Cell::Int(i64::from(v))))
                } else if *t == Type::FLOAT8 {
                    row.try_get::<_, Option<f64>>(i).map(|v| v.map(Cell::Real))
                } else if *t == Type::BOOL {
                    row.try_get::<_, Option<bool>>(i)
                        .map(|v| v.map(|v| Cell::Int(i64::from(v))))
                } else {
                    row.try_get::<_, Option<String>>(i)
                        .map(|v| v.map(Cell::Text))
                };
                cells.push(cell?.unwrap_or(Cell::Null));
            }
            f(&cells);
        }
        Ok(())
    }

    fn schema_version(&mut self) -> Result<i64, SinkError> {
        self.client()?
            .query_one("SELECT MAX(version) FROM audit_schema", &[])?
            .try_get::<_, Option<i64>>(0)
            .map(|v| v.unwrap_or(0))
            .map_err(SinkError::from)
    }
}
