//! SQLite and PostgreSQL hold the same rows; PostgreSQL reconnects, and
//! sidecars sharing one database keep their chains.

use super::*;
use collie::audit::sink::WriteError;

/// A record with what must match between two sinks for the same traffic:
/// every column but
/// - `ts_ms`, `latency_ms`, `ttft_ms`: clock readings (only whether a
///   first byte was seen is compared);
/// - `seq`, `prev_hash`, `hash`: the chain orders records by completion and
///   hashes those clock readings (each chain is verified instead);
/// - `request_id`: its prefix is random per process (its counter, the
///   request's place in the traffic, is compared).
fn comparable(s: &Stored) -> (String, Value) {
    let r = &s.record;
    let counter = r.request_id[r.request_id.len() - 12..].to_string();
    let v = json!({
        "sidecar": s.sidecar, "tenant": r.tenant, "claimed_tenant": r.claimed_tenant,
        "client_ip": r.client_ip, "endpoint": r.endpoint, "requested_model": r.requested_model,
        "served_model": r.served_model, "deployment": r.deployment, "attempts": r.attempts,
        "status": r.status, "decision": r.decision, "rule": r.rule,
        "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
        "total_tokens": r.total_tokens, "usage_estimated": r.usage_estimated,
        "cost_nano": r.cost_nano, "streamed": r.streamed, "truncated": r.truncated,
        "client_gone": r.client_gone, "request_hash": r.request_hash,
        "response_preview": r.response_preview, "error": r.error,
        "first_byte": r.ttft_ms.is_some(),
    });
    (counter, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_holds_the_same_rows_as_sqlite() {
    let schema = pg_schema();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let pg = pg_spec(&schema);
    let sqlite = SinkSpec::Sqlite(db.clone());
    // The same sidecar id (they are different databases).
    let same =
        json!({"sidecar_id": "same", "preview_bytes": 64, "anomalies": {"tenant_requests": 5}});
    for spec in [&pg, &sqlite] {
        let a = mock().await;
        let b = mock().await;
        let audit = match spec {
            SinkSpec::Postgres { .. } => pg_audit(&schema, same.clone()),
            SinkSpec::Sqlite(_) => with(
                json!({"sink": "sqlite", "sqlite_path": db, "flush_interval": "20ms"}),
                same.clone(),
            ),
        };
        let gw = gateway_with_env(&config(&a, &b, audit), &[("COLLIE_TEST_PG", PG_URL)]).await;
        every_kind(&gw, &a).await;
        until_rows(spec, 18).await;
    }
    let mut pg_rows: Vec<(String, Value)> = rows(&pg).iter().map(comparable).collect();
    let mut sqlite_rows: Vec<(String, Value)> = rows(&sqlite).iter().map(comparable).collect();
    pg_rows.sort_by(|x, y| x.0.cmp(&y.0));
    sqlite_rows.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(pg_rows.len(), 18);
    for (p, q) in pg_rows.iter().zip(&sqlite_rows) {
        assert_eq!(p, q);
    }
    // The traffic had every kind in it.
    let kinds = |f: fn(&Value) -> bool| sqlite_rows.iter().filter(|(_, v)| f(v)).count();
    assert_eq!(kinds(|v| v["truncated"] == true), 1);
    assert_eq!(kinds(|v| v["client_gone"] == true), 1);
    assert_eq!(kinds(|v| v["rule"] == "day.requests"), 1);
    assert_eq!(kinds(|v| v["served_model"] == "gpt-b"), 1, "a fallback");
    assert_eq!(kinds(|v| v["claimed_tenant"] == "alpha"), 2);
    assert_eq!(kinds(|v| v["response_preview"].is_string()), 12);
    for spec in [&pg, &sqlite] {
        assert!(blocking(|| intact(spec)));
    }
    // The same report from either, from the command line.
    let pg_sink = format!("{PG_URL}#{schema}");
    let sqlite_sink = format!("sqlite:{}", db.display());
    let strip = |mut r: Value| {
        fn clear(t: &mut Value) {
            t["latency_p50_ms"] = Value::Null;
            t["latency_p95_ms"] = Value::Null;
        }
        clear(&mut r["totals"]);
        for g in ["by_model", "by_tenant"] {
            r[g].as_object_mut().unwrap().values_mut().for_each(clear);
        }
        for a in r["anomalies"].as_array_mut().unwrap() {
            a["ts_ms"] = Value::Null;
        }
        r["since_ms"] = Value::Null;
        r
    };
    let from_pg = strip(report_json(&pg_sink, &["--since", "1h"]));
    let from_sqlite = strip(report_json(&sqlite_sink, &["--since", "1h"]));
    assert_eq!(from_pg["totals"]["requests"], 18);
    assert_eq!(from_pg, from_sqlite);
    let verified = collie_bin()
        .args(["audit", "verify", "--sink", &pg_sink])
        .output()
        .unwrap();
    assert!(verified.status.success());
    drop_schema(&schema);
}

/// `record` as the link at `seq` of `sidecar`'s chain after `prev` (which
/// becomes its hash).
fn linked(sidecar: &str, seq: i64, prev: &mut String, record: Record) -> Stored {
    let hash = record.chain_hash(sidecar, seq, prev);
    Stored {
        sidecar: sidecar.into(),
        seq,
        prev_hash: std::mem::replace(prev, hash.clone()),
        hash,
        record,
    }
}

/// Stored and read back, every column of every kind of value comes out of
/// either sink exactly as it went in (the columns the traffic comparison
/// leaves out included: times, floats, the chain).
#[test]
fn both_sinks_store_every_column_exactly() {
    let base = Record {
        claimed_tenant: Some("alpha".into()),
        error: Some("invalid_api_key".into()),
        response_preview: Some("{\"id\":\"x\", \u{e9}\u{1f600}".into()),
        latency_ms: 0.1 + 0.2,
        ttft_ms: Some(1e-7),
        ..v1_record()
    };
    let variants = [
        base.clone(),
        Record {
            tenant: None,
            client_ip: None,
            requested_model: None,
            served_model: None,
            deployment: None,
            rule: Some("day.requests".into()),
            prompt_tokens: None,
            completion_tokens: None,
            total_tokens: None,
            cost_nano: None,
            ttft_ms: None,
            request_hash: None,
            response_preview: None,
            error: None,
            claimed_tenant: None,
            user: None,
            usage_estimated: true,
            streamed: true,
            truncated: true,
            client_gone: true,
            status: 0,
            ..base.clone()
        },
        Record {
            cost_nano: Some(i64::MAX),
            total_tokens: Some(i64::MAX),
            latency_ms: f64::MAX,
            ts_ms: i64::MAX,
            ..base
        },
    ];
    let mut prev = String::new();
    let stored: Vec<Stored> = variants
        .into_iter()
        .enumerate()
        .map(|(i, record)| linked("exact", i as i64 + 1, &mut prev, record))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let schema = format!("collie_test_{:016x}", rand::random::<u64>());
    for spec in [SinkSpec::Sqlite(dir.path().join("a.db")), pg_spec(&schema)] {
        let mut sink = spec.open().unwrap();
        sink.write(&stored, &[]).unwrap();
        assert_eq!(all_records(&mut *sink), stored, "{spec:?}");
        // Written again (a commit whose answer was lost): not twice.
        sink.write(&stored, &[]).unwrap();
        assert_eq!(all_records(&mut *sink).len(), 3);
        assert!(chain_intact(&mut *sink));
    }
    drop_schema(&schema);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sink_connects_again_after_the_server_drops_it() {
    let schema = pg_schema();
    let a = mock().await;
    let b = mock().await;
    let app = format!("collie_reconnect_{:08x}", rand::random::<u32>());
    let url = format!("{PG_URL}?application_name={app}");
    let audit = pg_audit(&schema, json!({}));
    let gw = gateway_with_env(&config(&a, &b, audit), &[("COLLIE_TEST_PG", &url)]).await;
    let spec = SinkSpec::Postgres {
        url: PG_URL.into(),
        schema: Some(schema.clone()),
    };
    gw.chat(body()).send().await.unwrap().bytes().await.unwrap();
    until_rows(&spec, 1).await;
    // The server ends the sidecar's session, as a restart or failover would.
    let ended: i64 = blocking(|| {
        let mut c = postgres::Client::connect(PG_URL, postgres::NoTls).unwrap();
        c.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .unwrap()
        .len() as i64
    });
    assert_eq!(ended, 1, "the sidecar holds one connection");
    gw.chat(body()).send().await.unwrap().bytes().await.unwrap();
    gw.chat(body()).send().await.unwrap().bytes().await.unwrap();
    let rows = until_rows(&spec, 3).await;
    assert_eq!(rows.len(), 3);
    assert!(blocking(|| intact(&spec)));
    drop_schema(&schema);
}

/// Two sidecars given the same id on one database: each notices the
/// other's rows where it meant to put its own, says so, and chains its
/// batch after them. Nothing is lost and the one chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_with_one_id_lose_nothing_and_keep_one_chain() {
    let schema = pg_schema();
    let a = mock().await;
    let b = mock().await;
    let conf = config(&a, &b, pg_audit(&schema, json!({"sidecar_id": "twin"})));
    let env = [("COLLIE_TEST_PG", PG_URL)];
    // Both start before either writes: both read an empty chain.
    let one = gateway_with_env(&conf, &env).await;
    let two = gateway_with_env(&conf, &env).await;
    let spec = pg_spec(&schema);
    let mut sent = 0;
    for round in 0..3 {
        for gw in [&one, &two] {
            for _ in 0..3 {
                gw.chat(body()).send().await.unwrap().bytes().await.unwrap();
                sent += 1;
            }
            until_rows(&spec, sent).await;
        }
        assert_eq!(rows(&spec).len(), sent, "round {round}");
    }
    let all = rows(&spec);
    assert!(all.iter().all(|s| s.sidecar == "twin"));
    let seqs: Vec<i64> = all.iter().map(|s| s.seq).collect();
    assert_eq!(seqs, (1..=sent as i64).collect::<Vec<_>>());
    assert!(blocking(|| intact(&spec)));
    let (m1, m2) = (one.metrics().await, two.metrics().await);
    let total = |name: &str| metric_sum(&m1, name, &[]) + metric_sum(&m2, name, &[]);
    assert_eq!(total("collie_audit_written_total"), sent as f64);
    assert!(total("collie_audit_chain_conflicts_total") >= 1.0);
    assert_eq!(total("collie_audit_dropped_total"), 0.0);
    drop_schema(&schema);
}

/// Without a configured id, two sidecars on one host write chains of their
/// own: the host name and a suffix of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_sidecar_id_is_unique_per_process() {
    let schema = pg_schema();
    let a = mock().await;
    let b = mock().await;
    let conf = config(&a, &b, pg_audit(&schema, json!({})));
    let env = [("COLLIE_TEST_PG", PG_URL)];
    let one = gateway_with_env(&conf, &env).await;
    let two = gateway_with_env(&conf, &env).await;
    for gw in [&one, &two, &one, &two] {
        gw.chat(body()).send().await.unwrap().bytes().await.unwrap();
    }
    let spec = pg_spec(&schema);
    let all = until_rows(&spec, 4).await;
    let ids: std::collections::BTreeSet<&str> = all.iter().map(|s| s.sidecar.as_str()).collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| host.trim().to_string());
    assert!(
        ids.iter().all(|id| id.starts_with(&format!("{host}-"))),
        "{ids:?}"
    );
    assert!(all.iter().all(|s| s.seq <= 2));
    let m = one.metrics().await;
    assert_eq!(
        metric_sum(&m, "collie_audit_chain_conflicts_total", &[]),
        0.0
    );
    assert!(blocking(|| intact(&spec)));
    drop_schema(&schema);
}

/// Batches of every size — under, at and over one INSERT's rows, and sizes
/// that take every one of the smaller statements — are stored whole, in
/// order, as one chain that verifies; a batch written again is not stored
/// twice.
#[test]
fn sqlite_stores_batches_of_any_size_whole_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let spec = SinkSpec::Sqlite(dir.path().join("batches.db"));
    let mut sink = spec.open().unwrap();
    let (mut seq, mut prev) = (0i64, String::new());
    let mut written = 0usize;
    for size in [1usize, 2, 3, 63, 64, 65, 127, 128, 200, 1] {
        let batch: Vec<Stored> = (0..size)
            .map(|_| {
                seq += 1;
                let record = Record {
                    request_id: format!("r-{seq}"),
                    ..v1_record()
                };
                linked("batches", seq, &mut prev, record)
            })
            .collect();
        sink.write(&batch, &[]).unwrap();
        sink.write(&batch, &[]).unwrap();
        written += size;
        assert_eq!(all_records(&mut *sink).len(), written, "after {size}");
    }
    let stored = all_records(&mut *sink);
    let seqs: Vec<i64> = stored.iter().map(|s| s.seq).collect();
    assert_eq!(seqs, (1..=seq).collect::<Vec<_>>());
    assert!(
        stored
            .iter()
            .all(|s| s.record.request_id == format!("r-{}", s.seq))
    );
    assert!(chain_intact(&mut *sink));
}

/// A batch that runs into rows another writer put at its places is
/// refused whole, in either sink: none of its rows stay, whether the taken
/// place comes in the same INSERT as the new rows before it or in a later
/// one of the same batch; written again after the rows now there, it is
/// stored whole.
#[test]
fn a_batch_that_meets_taken_places_is_refused_whole() {
    let record = |seq: i64| Record {
        request_id: format!("r-{seq}"),
        ..v1_record()
    };
    let dir = tempfile::tempdir().unwrap();
    let schema = format!("collie_test_{:016x}", rand::random::<u64>());
    for spec in [
        SinkSpec::Sqlite(dir.path().join("taken.db")),
        pg_spec(&schema),
    ] {
        let mut sink = spec.open().unwrap();
        let mut prev = String::new();
        let first: Vec<Stored> = (1..=10)
            .map(|seq| linked("taken", seq, &mut prev, record(seq)))
            .collect();
        sink.write(&first, &[]).unwrap();
        // New places first, then one that is taken by another row: in the
        // same 4-row INSERT, then after a 64-row one and two smaller ones.
        for (new_rows, taken) in [(3, 7), (70, 9)] {
            let mut other = first[3].hash.clone();
            let mut batch: Vec<Stored> = (11..11 + new_rows)
                .map(|seq| linked("taken", seq, &mut other, record(seq)))
                .collect();
            let mut fork = first[taken as usize - 2].hash.clone();
            batch.push(linked("taken", taken, &mut fork, record(1000)));
            let refused = sink.write(&batch, &[]);
            assert!(
                matches!(refused, Err(WriteError::Conflict(_))),
                "{spec:?}: {refused:?}"
            );
            let kept: Vec<(i64, String)> = all_records(&mut *sink)
                .into_iter()
                .map(|s| (s.seq, s.hash))
                .collect();
            let before: Vec<(i64, String)> =
                first.iter().map(|s| (s.seq, s.hash.clone())).collect();
            assert_eq!(kept, before, "{spec:?}");
        }
        let mut prev = first[9].hash.clone();
        let after: Vec<Stored> = (11..=90)
            .map(|seq| linked("taken", seq, &mut prev, record(seq)))
            .collect();
        sink.write(&after, &[]).unwrap();
        assert_eq!(all_records(&mut *sink).len(), 90, "{spec:?}");
        assert!(chain_intact(&mut *sink));
    }
    drop_schema(&schema);
}
