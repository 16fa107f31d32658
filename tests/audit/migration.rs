//! Trails written by an older release are migrated and their chains go on.

use super::*;

/// The schema as the first release created it (no version table).
const SCHEMA_V1: &[&str] = &[
    "CREATE TABLE audit_records (
        sidecar TEXT NOT NULL, seq BIGINT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL,
        ts_ms BIGINT NOT NULL, request_id TEXT NOT NULL, tenant TEXT, client_ip TEXT,
        endpoint TEXT NOT NULL, requested_model TEXT, served_model TEXT, deployment TEXT,
        attempts TEXT NOT NULL, status BIGINT NOT NULL, decision TEXT NOT NULL, rule TEXT,
        prompt_tokens BIGINT, completion_tokens BIGINT, total_tokens BIGINT,
        usage_estimated BIGINT NOT NULL, cost_nano BIGINT, latency_ms DOUBLE PRECISION NOT NULL, ttft_ms DOUBLE PRECISION,
        streamed BIGINT NOT NULL, truncated BIGINT NOT NULL, client_gone BIGINT NOT NULL,
        request_hash TEXT, response_preview TEXT, error TEXT,
        PRIMARY KEY (sidecar, seq))",
    "CREATE INDEX audit_records_ts ON audit_records (ts_ms)",
    "CREATE INDEX audit_records_tenant ON audit_records (tenant, ts_ms)",
    "CREATE INDEX audit_records_model ON audit_records (requested_model, ts_ms)",
    "CREATE INDEX audit_records_hash ON audit_records (request_hash)",
    "CREATE TABLE audit_anomalies (ts_ms BIGINT NOT NULL, sidecar TEXT NOT NULL, rule TEXT NOT NULL, tenant TEXT, detail TEXT NOT NULL)",
    "CREATE INDEX audit_anomalies_ts ON audit_anomalies (ts_ms)",
    "CREATE TABLE audit_chain_anchor (sidecar TEXT PRIMARY KEY, seq BIGINT NOT NULL, hash TEXT NOT NULL)",
];

/// The first record of sidecar `old`'s chain as the first release wrote
/// it, and that release's schema.
fn v1_row() -> (String, Vec<String>) {
    let r = v1_record();
    let hash = r.chain_hash("old", 1, "");
    let sql = format!(
        "INSERT INTO audit_records VALUES ('old', 1, '', '{hash}', {}, 'r-v1', 'alpha', '127.0.0.1', 'chat', 'gpt', 'gpt-a', 'a', '{}', 200, 'admitted', NULL, 10, 5, 15, 0, 20000, 1.5, 1.25, 0, 0, 0, '{}', NULL, NULL)",
        r.ts_ms,
        r.attempts,
        "ab".repeat(32)
    );
    (sql, SCHEMA_V1.iter().map(|s| s.to_string()).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_sqlite_trail_is_migrated_and_its_chain_continues() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let (row, schema) = v1_row();
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("PRAGMA journal_mode=WAL").unwrap();
        for stmt in &schema {
            conn.execute(stmt, []).unwrap();
        }
        conn.execute(&row, []).unwrap();
    }
    let spec = SinkSpec::Sqlite(db.clone());
    assert!(intact(&spec), "the old row verifies after the migration");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let version: i64 = conn
        .query_row("SELECT version FROM audit_schema", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, collie::audit::sink::SCHEMA_VERSION);
    // A request hash is found through the index of its prefix.
    let plan: String = conn
        .query_row(
            "EXPLAIN QUERY PLAN SELECT * FROM audit_records WHERE substr(request_hash, 1, 16) = substr(?1, 1, 16) AND request_hash = ?1",
            ["ab".repeat(32)],
            |r| r.get(3),
        )
        .unwrap();
    assert!(plan.contains("audit_records_hash16"), "{plan}");
    let auto_vacuum: i64 = conn
        .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
        .unwrap();
    assert_eq!(auto_vacuum, 2, "rebuilt for incremental vacuum");
    // The sidecar that wrote it goes on where it left off.
    let a = mock().await;
    let b = mock().await;
    let audit = sqlite_audit(&db, json!({"sidecar_id": "old"}));
    let gw = gateway(&config(&a, &b, audit)).await;
    gw.post_as(CHAT, "alpha", "guessed")
        .json(&body())
        .send()
        .await
        .unwrap();
    let all = until_rows(&spec, 2).await;
    assert_eq!(all[0].record.request_id, "r-v1");
    assert_eq!(all[0].record.claimed_tenant, None);
    assert_eq!(
        (all[1].seq, all[1].prev_hash.as_str()),
        (2, all[0].hash.as_str())
    );
    assert_eq!(all[1].record.claimed_tenant.as_deref(), Some("alpha"));
    assert!(intact(&spec));
    // Migrating is done once: opening again changes nothing.
    assert_eq!(
        blocking(|| spec.open().unwrap().schema_version().unwrap()),
        version
    );
    drop(gw);
    // A trail from a newer collie is refused, not written with missing columns.
    conn.execute("UPDATE audit_schema SET version = version + 1", [])
        .unwrap();
    let err = spec.open().err().unwrap().to_string();
    assert!(err.contains("newer than this collie knows"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_postgres_trail_is_migrated() {
    let schema = pg_schema();
    let (row, ddl) = v1_row();
    blocking(|| {
        let mut c = postgres::Client::connect(PG_URL, postgres::NoTls).unwrap();
        c.batch_execute(&format!(
            "CREATE SCHEMA {schema}; SET search_path TO {schema}"
        ))
        .unwrap();
        for stmt in &ddl {
            c.batch_execute(stmt).unwrap();
        }
        c.batch_execute(&row).unwrap();
    });
    let spec = pg_spec(&schema);
    // Several sidecars starting at once migrate it once.
    let opened: Vec<i64> = blocking(|| {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|_| s.spawn(|| spec.open().unwrap().schema_version().unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    });
    assert_eq!(opened, vec![collie::audit::sink::SCHEMA_VERSION; 3]);
    let all = rows(&spec);
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].record.claimed_tenant, None);
    assert!(blocking(|| intact(&spec)));
    let versions: i64 = blocking(|| {
        let mut c = postgres::Client::connect(PG_URL, postgres::NoTls).unwrap();
        c.query_one(&format!("SELECT COUNT(*) FROM {schema}.audit_schema"), &[])
            .unwrap()
            .get(0)
    });
    assert_eq!(versions, 1);
    drop_schema(&schema);
}

/// The steps from the first release's schema to version 3, as that
/// release's migrations ran them.
const TO_V3: &[&str] = &[
    "ALTER TABLE audit_records ADD COLUMN claimed_tenant TEXT",
    "DROP INDEX IF EXISTS audit_records_hash",
    "CREATE INDEX IF NOT EXISTS audit_records_hash16 ON audit_records (substr(request_hash, 1, 16))",
    "CREATE TABLE audit_schema (version BIGINT NOT NULL)",
    "INSERT INTO audit_schema (version) VALUES (3)",
];

/// A version-3 trail: sidecar `old`'s first record (a refusal that claimed
/// alpha) and an anomaly, as that release wrote them.
fn v3_trail() -> Vec<String> {
    let r = Record {
        claimed_tenant: Some("alpha".into()),
        ..v1_record()
    };
    let hash = r.chain_hash("old", 1, "");
    let mut ddl: Vec<String> = SCHEMA_V1.iter().map(|s| s.to_string()).collect();
    ddl.extend(TO_V3.iter().map(|s| s.to_string()));
    ddl.push(format!(
        "INSERT INTO audit_records VALUES ('old', 1, '', '{hash}', {}, 'r-v1', 'alpha', '127.0.0.1', 'chat', 'gpt', 'gpt-a', 'a', '{}', 200, 'admitted', NULL, 10, 5, 15, 0, 20000, 1.5, 1.25, 0, 0, 0, '{}', NULL, NULL, 'alpha')",
        r.ts_ms,
        r.attempts,
        "ab".repeat(32)
    ));
    ddl.push(format!(
        "INSERT INTO audit_anomalies VALUES ({}, 'old', 'request_rate', 'alpha', 'alpha: 6 requests in 60s (limit 5)')",
        r.ts_ms
    ));
    ddl
}

/// After the migration: the old rows read back as they were (no user, an
/// anomaly without severity), and the chain goes on with a record naming
/// its user.
async fn continues_after_v3(spec: &SinkSpec, audit: Value, env: &[(&str, &str)]) {
    assert_eq!(
        blocking(|| spec.open().unwrap().schema_version().unwrap()),
        4
    );
    let old = rows(spec);
    assert_eq!(old.len(), 1);
    assert_eq!(old[0].record.user, None);
    assert_eq!(old[0].record.claimed_tenant.as_deref(), Some("alpha"));
    let anomalies = blocking(|| {
        spec.open()
            .unwrap()
            .anomalies_since(i64::MIN, None)
            .unwrap()
    });
    assert_eq!(anomalies.len(), 1);
    assert_eq!(
        (anomalies[0].rule.as_str(), anomalies[0].severity.as_deref()),
        ("request_rate", None)
    );
    let a = mock().await;
    let b = mock().await;
    let gw = gateway_with_env(&config(&a, &b, audit), env).await;
    let r = gw
        .post(CHAT)
        .header("x-user-id", "u-7")
        .json(&body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let all = until_rows(spec, 2).await;
    assert_eq!(
        (all[1].seq, all[1].prev_hash.as_str()),
        (2, all[0].hash.as_str())
    );
    assert_eq!(all[1].record.user.as_deref(), Some("u-7"));
    assert!(blocking(|| intact(spec)));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_3_sqlite_trail_gets_users_and_its_chain_continues() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; PRAGMA journal_mode=WAL")
            .unwrap();
        for stmt in v3_trail() {
            conn.execute(&stmt, []).unwrap();
        }
    }
    let spec = SinkSpec::Sqlite(db.clone());
    let audit = sqlite_audit(&db, json!({"sidecar_id": "old"}));
    continues_after_v3(&spec, audit, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_3_postgres_trail_gets_users_and_its_chain_continues() {
    let schema = pg_schema();
    blocking(|| {
        let mut c = postgres::Client::connect(PG_URL, postgres::NoTls).unwrap();
        c.batch_execute(&format!(
            "CREATE SCHEMA {schema}; SET search_path TO {schema}"
        ))
        .unwrap();
        for stmt in v3_trail() {
            c.batch_execute(&stmt).unwrap();
        }
    });
    let spec = pg_spec(&schema);
    let audit = pg_audit(&schema, json!({"sidecar_id": "old"}));
    continues_after_v3(&spec, audit, &[("COLLIE_TEST_PG", PG_URL)]).await;
    drop_schema(&schema);
}

/// `request_hash_index: false` drops the request-hash index when the writer
/// opens the trail, and records still carry their hash (a lookup bounded by
/// time finds them through the time index); set again (the default), the
/// index is built again and serves the documented lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_hash_index_can_be_dropped_and_built_again() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let spec = SinkSpec::Sqlite(db.clone());
    let a = mock().await;
    let b = mock().await;
    let has_index = || {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'audit_records_hash16'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
            == 1
    };
    let plan = |sql: &str, hash: &str| -> String {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.query_row(&format!("EXPLAIN QUERY PLAN {sql}"), [hash], |r| r.get(3))
            .unwrap()
    };
    const BY_HASH: &str = "SELECT * FROM audit_records WHERE substr(request_hash, 1, 16) = substr(?1, 1, 16) AND request_hash = ?1";
    const BY_TIME_AND_HASH: &str =
        "SELECT * FROM audit_records WHERE ts_ms >= 0 AND request_hash = ?1";

    let off = sqlite_audit(&db, json!({"request_hash_index": false}));
    let gw = gateway(&config(&a, &b, off)).await;
    assert_eq!(gw.chat(body()).send().await.unwrap().status(), 200);
    let rows = until_rows(&spec, 1).await;
    let hash = rows[0].record.request_hash.clone().expect("hashed");
    assert!(!has_index(), "dropped");
    assert!(
        plan(BY_TIME_AND_HASH, &hash).contains("audit_records_ts"),
        "{}",
        plan(BY_TIME_AND_HASH, &hash)
    );
    gw.stop().await;

    let on = sqlite_audit(&db, json!({}));
    let gw = gateway(&config(&a, &b, on)).await;
    assert_eq!(gw.chat(body()).send().await.unwrap().status(), 200);
    let rows = until_rows(&spec, 2).await;
    assert!(has_index(), "built again");
    assert!(plan(BY_HASH, &hash).contains("audit_records_hash16"));
    let conn = rusqlite::Connection::open(&db).unwrap();
    let found: i64 = conn
        .query_row(
            &BY_HASH.replace("SELECT *", "SELECT COUNT(*)"),
            [&hash],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(found, 2, "both requests, through the index");
    assert!(
        rows.iter()
            .all(|s| s.record.request_hash.as_deref() == Some(hash.as_str()))
    );
    gw.stop().await;
}
