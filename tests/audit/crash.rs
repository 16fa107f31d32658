//! Stops: a graceful one writes every record; after `kill -9` the file is
//! sound and no more is lost than the documented bound.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_under_load_writes_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let a = mock_with(Behavior::default().delay(Duration::from_millis(20))).await;
    let b = mock().await;
    // A slow flush, so records are still queued when the stop comes.
    let audit =
        json!({"sink": "sqlite", "sqlite_path": db, "flush_interval": "2s", "batch": 10000});
    let gw = gateway(&config(&a, &b, audit)).await;
    let client = gw.client.clone();
    let url = gw.url("/v1/chat/completions");
    let load = tokio::spawn(async move {
        let results = futures::stream::iter(0..400)
            .map(|_| {
                let req = client
                    .post(&url)
                    .header("x-tenant-id", "alpha")
                    .bearer_auth(ALPHA_KEY)
                    .json(&body());
                async move { req.send().await.map(|r| r.status().as_u16()).ok() }
            })
            .buffer_unordered(20)
            .collect::<Vec<_>>()
            .await;
        results.into_iter().flatten().count()
    });
    eventually("load is under way", || a.completion_calls() > 100).await;
    gw.stop().await;
    let answered = load.await.unwrap();
    let written = rows(&SinkSpec::Sqlite(db)).len();
    assert!(answered > 50, "answered {answered}");
    assert_eq!(
        written, answered,
        "every answered request has its record after a graceful stop"
    );
}

/// Requests sent without pause by `concurrency` clients, counting the
/// answers received.
fn load(
    base: &str,
    concurrency: usize,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let client = reqwest::Client::new();
    let url = format!("{base}/v1/chat/completions");
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = std::sync::Arc::clone(&answered);
    let task = tokio::spawn(async move {
        futures::stream::iter(0..1_000_000)
            .map(|_| {
                let req = client
                    .post(&url)
                    .header("x-tenant-id", "alpha")
                    .bearer_auth(ALPHA_KEY)
                    .json(&body());
                let count = std::sync::Arc::clone(&count);
                async move {
                    if let Ok(r) = req.send().await {
                        if r.bytes().await.is_ok() {
                            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                }
            })
            .buffer_unordered(concurrency)
            .collect::<Vec<_>>()
            .await;
    });
    (answered, task)
}

/// After `kill -9`: the file is sound and its chains intact; returns the
/// number of records in it.
fn after_kill(db: &Path) -> usize {
    let conn = rusqlite::Connection::open(db).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let problems =
        collie::audit::report::verify(&mut *SinkSpec::Sqlite(db.to_path_buf()).open().unwrap())
            .unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    conn.query_row("SELECT COUNT(*) FROM audit_records", [], |r| {
        r.get::<_, i64>(0)
    })
    .unwrap() as usize
}

/// The documented crash-loss bound: the queue, the one batch the writer
/// holds, and the requests answered whose record was not queued yet (at
/// most the requests in flight).
fn crash_bound(queue: usize, batch: usize, in_flight: usize) -> usize {
    queue + batch + in_flight
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_at_most_the_bound_and_the_file_is_sound() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let a = mock_with(Behavior::default().delay(Duration::from_millis(5))).await;
    let b = mock().await;
    let (queue, batch, flush_ms, concurrency) = (200usize, 50usize, 50u64, 16usize);
    let audit = json!({"sink": "sqlite", "sqlite_path": db, "queue": queue, "batch": batch,
                       "flush_interval": format!("{flush_ms}ms")});
    let log = dir.path().join("log");
    let Process {
        mut child, base, ..
    } = run_collie(
        dir.path(),
        &config(&a, &b, audit),
        Some(Log {
            file: &log,
            rust_log: "debug",
        }),
    );
    let (answered, task) = load(&base, concurrency);
    eventually("load is under way", || {
        answered.load(std::sync::atomic::Ordering::SeqCst) > 500
    })
    .await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    task.abort();
    let answered = answered.load(std::sync::atomic::Ordering::SeqCst);
    let written = after_kill(&db);
    let lost = answered.saturating_sub(written);
    let bound = crash_bound(queue, batch, concurrency);
    println!("kill -9: {answered} answered, {written} written, {lost} lost (bound {bound})");
    assert!(
        lost <= bound,
        "lost {lost} records, more than the bound {bound}"
    );
}

/// The bound holds when the writer is stuck (a locked or slow disk) and
/// requests wait for room in the queue: everything it held is lost, more
/// than one flush interval of traffic, but no more than the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_a_stalled_writer_loses_at_most_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let a = mock().await;
    let b = mock().await;
    let (queue, batch, concurrency) = (200usize, 50usize, 16usize);
    let audit = json!({"sink": "sqlite", "sqlite_path": db, "queue": queue, "batch": batch,
                       "flush_interval": "50ms", "when_full": "block"});
    let log = dir.path().join("log");
    let Process {
        mut child,
        base,
        admin,
        ..
    } = run_collie(
        dir.path(),
        &config(&a, &b, audit),
        Some(Log {
            file: &log,
            rust_log: "info",
        }),
    );
    let (answered, task) = load(&base, concurrency);
    let count = || answered.load(std::sync::atomic::Ordering::SeqCst);
    eventually("load is under way", || count() > 300).await;
    // The disk stalls: the writer cannot commit (it waits, then retries).
    let lock = rusqlite::Connection::open(&db).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let queued = || async {
        let m = reqwest::get(format!("{admin}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metric_sum(&m, "collie_audit_queued", &[]) as usize
    };
    for _ in 0..500 {
        if queued().await > queue {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        queued().await > queue,
        "the queue filled up behind the writer"
    );
    // Requests answered now wait in their logging phase for room.
    let mut last = count();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if count() == last {
            break;
        }
        last = count();
    }
    // Answered requests whose record waits for room: a client may open new
    // connections while earlier ones wait, so this is not bounded by its
    // concurrency; the gauge says how many there are.
    let m = reqwest::get(format!("{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let waiting = metric_sum(&m, "collie_audit_waiting", &[]) as usize;
    assert!(
        waiting >= concurrency / 2,
        "requests wait for room: {waiting}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    task.abort();
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    let answered = count();
    let written = after_kill(&db);
    let lost = answered.saturating_sub(written);
    let bound = crash_bound(queue, batch, waiting);
    println!(
        "kill -9, stalled writer: {answered} answered, {written} written, {lost} lost (bound {bound})"
    );
    assert!(
        lost <= bound,
        "lost {lost} records, more than the bound {bound}"
    );
    assert!(
        lost > queue,
        "the full queue and the held batch are lost: {lost}"
    );
}
