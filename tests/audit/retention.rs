//! Retention by rows, size and age; the chain still verifies after it.

use super::*;

/// Poll the trail until its row count satisfies `done`; returns the last count.
async fn rows_until(spec: &SinkSpec, done: impl Fn(usize) -> bool) -> usize {
    let mut n = rows(spec).len();
    for _ in 0..500 {
        n = rows(spec).len();
        if done(n) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    n
}

/// Send 20 requests one after another (each starting a few ms after the
/// one before, so no two share a start time) and check that retention
/// keeps exactly the newest 5, and keeps them.
async fn keeps_exactly_the_newest_five(gw: &Gw, spec: &SinkSpec) {
    let mut ids = Vec::new();
    for i in 0..20 {
        let r = gw
            .chat(
                json!({"model": "gpt", "messages": [{"role": "user", "content": format!("p{i}")}]}),
            )
            .send()
            .await
            .unwrap();
        ids.push(id(&r));
        r.bytes().await.unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let kept = rows_until(spec, |n| n == 5).await;
    assert_eq!(kept, 5, "pruned to max_rows");
    // Several more rounds of retention change nothing.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let kept: Vec<String> = rows(spec)
        .into_iter()
        .map(|s| s.record.request_id)
        .collect();
    assert_eq!(kept, ids[15..], "the newest five");
    assert!(blocking(|| intact(spec)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_exactly_max_rows_and_the_chain_still_verifies() {
    let t = sqlite_trail(json!({"retention": {"max_rows": 5, "every": "100ms"}})).await;
    keeps_exactly_the_newest_five(&t.gw, &t.spec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_retention_keeps_exactly_max_rows_and_the_chain_still_verifies() {
    let schema = pg_schema();
    let a = mock().await;
    let b = mock().await;
    let audit = pg_audit(
        &schema,
        json!({"retention": {"max_rows": 5, "every": "100ms"}}),
    );
    let gw = gateway_with_env(&config(&a, &b, audit), &[("COLLIE_TEST_PG", PG_URL)]).await;
    keeps_exactly_the_newest_five(&gw, &pg_spec(&schema)).await;
    drop_schema(&schema);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_size_shrinks_the_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let spec = SinkSpec::Sqlite(db.clone());
    // Large rows: a 2000-byte preview of a long answer.
    let a = mock_with(Behavior::default().chunks(600)).await;
    let b = mock().await;
    let audit = |more: Value| {
        let audit = json!({"sink": "sqlite", "sqlite_path": db, "flush_interval": "20ms",
                           "sidecar_id": "s", "preview_bytes": 2000});
        with(audit, more)
    };
    let gw = gateway(&config(&a, &b, audit(json!({})))).await;
    for i in 0..150 {
        gw.chat(
            json!({"model": "gpt", "messages": [{"role": "user", "content": format!("s{i}")}]}),
        )
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    }
    gw.stop().await;
    let before = std::fs::metadata(&db).unwrap().len();
    let limit: u64 = 128 << 10;
    assert!(before > 2 * limit, "the trail is {before} bytes");

    // The same file under a size limit: pruned to it, and the file shrinks.
    let gw = gateway(&config(
        &a,
        &b,
        audit(json!({"retention": {"max_bytes": "128KiB", "every": "100ms"}})),
    ))
    .await;
    let mut size = before;
    for _ in 0..500 {
        size = std::fs::metadata(&db).unwrap().len();
        if size <= limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(size <= limit, "{size} bytes on disk, limit {limit}");
    let kept = rows(&spec);
    assert!(kept.len() >= 10 && kept.len() < 150, "kept {}", kept.len());
    assert_eq!(kept.last().unwrap().seq, 150, "the newest are kept");
    assert!(intact(&spec));
    let conn = rusqlite::Connection::open(&db).unwrap();
    let pragma = |p: &str| -> i64 {
        conn.query_row(&format!("PRAGMA {p}"), [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(pragma("freelist_count"), 0, "free pages were given back");
    assert!(pragma("page_count") * pragma("page_size") <= limit as i64);
    // New records keep coming in under the limit (retention may take a few
    // more old ones as they do).
    gw.chat(body()).send().await.unwrap().bytes().await.unwrap();
    eventually("the new record is written", || {
        rows(&spec).last().is_some_and(|s| s.seq == 151)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_age_prunes_and_the_chain_continues() {
    let t = sqlite_trail(json!({"retention": {"max_age": "1s", "every": "100ms"}})).await;
    let (gw, spec) = (&t.gw, &t.spec);
    for _ in 0..3 {
        gw.chat(body()).send().await.unwrap().bytes().await.unwrap();
    }
    let mut written = 0.0;
    for _ in 0..500 {
        written = metric_sum(&gw.metrics().await, "collie_audit_written_total", &[]);
        if written >= 3.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(written, 3.0);
    // Older than a second: pruned.
    let left = rows_until(spec, |n| n == 0).await;
    assert_eq!(left, 0, "records older than max_age are pruned");
    // The chain goes on from the anchor retention left.
    gw.chat(body()).send().await.unwrap().bytes().await.unwrap();
    let kept = until_rows(spec, 1).await;
    assert_eq!(kept[0].seq, 4);
    assert!(intact(spec));
}
