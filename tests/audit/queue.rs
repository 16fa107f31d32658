//! A full queue behind a stalled writer: drop and count, or hold requests back.

use super::*;

/// Stall the writer as a slow or locked disk would: hold SQLite's write lock,
/// send one request, and wait until the writer has failed to commit it once.
async fn stall_writer(gw: &Gw, db: &Path) -> rusqlite::Connection {
    let lock = rusqlite::Connection::open(db).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    gw.chat(body()).send().await.unwrap().bytes().await.unwrap();
    for _ in 0..1500 {
        let m = gw.metrics().await;
        if metric_sum(&m, "collie_audit_write_errors_total", &[]) >= 1.0 {
            return lock;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the writer never met the lock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_and_counts_by_default() {
    let t = sqlite_trail(json!({"queue": 2})).await;
    let (gw, db, spec) = (&t.gw, &t.db, &t.spec);
    let lock = stall_writer(gw, db).await;
    // The queue holds two records; the rest are dropped, and no request waits.
    for _ in 0..10 {
        let r = gw.chat(body()).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    // Every record is queued or dropped once its request's logging phase
    // ran (which may be just after the client got its answer).
    let mut dropped = 0.0;
    for _ in 0..500 {
        let m = gw.metrics().await;
        dropped = metric_sum(&m, "collie_audit_dropped_total", &[]);
        if dropped + metric_sum(&m, "collie_audit_queued", &[]) >= 11.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(dropped >= 8.0, "dropped {dropped}");
    lock.execute_batch("COMMIT").unwrap();
    drop(lock);
    // Nothing is lost silently: written + dropped = requests.
    let written = until_rows(spec, 11 - dropped as usize).await.len();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(rows(spec).len(), written);
    assert_eq!(written + dropped as usize, 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_holds_requests_back_with_block() {
    let t = sqlite_trail(json!({"queue": 2, "when_full": "block"})).await;
    let (gw, db, spec, a) = (&t.gw, &t.db, &t.spec, &t.a);
    let lock = stall_writer(gw, db).await;
    // A connection whose request is waiting for room in the queue is not
    // ready for the next request (that is the back-pressure), so each request
    // here gets a connection of its own.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let sent: Vec<_> = (0..6)
        .map(|_| {
            let req = client
                .post(gw.url("/v1/chat/completions"))
                .header("x-tenant-id", "alpha")
                .bearer_auth(ALPHA_KEY)
                .json(&body());
            tokio::spawn(async move { req.send().await.unwrap().bytes().await.unwrap() })
        })
        .collect();
    eventually("the requests reached the provider", || posts(a).len() >= 7).await;
    lock.execute_batch("COMMIT").unwrap();
    drop(lock);
    for s in sent {
        s.await.unwrap();
    }
    // Every record waited for room; none was dropped.
    assert_eq!(until_rows(spec, 7).await.len(), 7);
    let m = gw.metrics().await;
    assert_eq!(metric_sum(&m, "collie_audit_dropped_total", &[]), 0.0);
}
