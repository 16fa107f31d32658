//! What each step of the audit writer costs per record, single thread, on
//! records shaped like the benchmark's small chat request: the request hash,
//! the chain hash, the anomaly rules and the SQLite commit (batches of 256,
//! the default). Usage: [BATCH=n|mixed] [HASH_INDEX=off] audit-cost [RECORDS] [TENANTS]

use collie::audit::anomaly::Detector;
use collie::audit::record::{Record, request_hash};
use collie::audit::sink::{Sink, Sqlite, Stored};
use collie::config::AnomalySettings;
use std::time::Instant;

fn record(i: usize, tenants: usize) -> Record {
    Record {
        ts_ms: 1_700_000_000_000 + i as i64 / 20,
        request_id: format!("{:032x}", i as u128 * 0x9e37_79b9_7f4a_7c15),
        tenant: Some(format!("tenant-{}", i % tenants)),
        claimed_tenant: None,
        user: None,
        client_ip: Some("127.0.0.1".into()),
        endpoint: "chat".into(),
        requested_model: Some("gpt-4o-mini".into()),
        served_model: Some("gpt-4o-mini".into()),
        deployment: Some("mock-a".into()),
        attempts: r#"[{"deployment":"mock-a","outcome":"200"}]"#.into(),
        status: 200,
        decision: "admitted".into(),
        rule: None,
        prompt_tokens: Some(12),
        completion_tokens: Some(9),
        total_tokens: Some(21),
        usage_estimated: false,
        cost_nano: Some(7_350),
        latency_ms: 0.41,
        ttft_ms: Some(0.39),
        streamed: false,
        truncated: false,
        client_gone: false,
        request_hash: None,
        response_preview: None,
        error: None,
    }
}

fn per_record(what: &str, start: Instant, n: usize) {
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    println!("{what:<16} {ns:>8.0} ns/record");
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let tenants: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let body = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one short sentence, please."}],"max_tokens":16}"#;
    let mut records: Vec<Record> = (0..n).map(|i| record(i, tenants)).collect();

    // BATCH=n: batches of n; BATCH=mixed: sizes 1, 2, …, 100 in turn, as
    // the writer's 100 ms batches come at a moderate, varying rate.
    let batch = std::env::var("BATCH").unwrap_or_default();
    let sizes: Box<dyn Iterator<Item = usize>> = match batch.as_str() {
        "mixed" => Box::new((1..=100).cycle()),
        n => Box::new(std::iter::repeat(n.parse().unwrap_or(256))),
    };
    let bodies: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let mut b = body.to_vec();
            b.truncate(b.len() - 1);
            b.extend_from_slice(format!(",\"user\":\"u{i}\"}}").as_bytes());
            b
        })
        .collect();
    let start = Instant::now();
    for (r, b) in records.iter_mut().zip(&bodies) {
        r.request_hash = Some(request_hash(b));
    }
    per_record("request hash", start, n);

    let start = Instant::now();
    let mut prev = String::new();
    let mut stored = Vec::with_capacity(n);
    for (i, r) in records.into_iter().enumerate() {
        let hash = r.chain_hash("bench", i as i64 + 1, &prev);
        stored.push(Stored {
            sidecar: "bench".into(),
            seq: i as i64 + 1,
            prev_hash: std::mem::replace(&mut prev, hash.clone()),
            hash,
            record: r,
        });
    }
    per_record("chain hash", start, n);

    let mut detector = Detector::new(AnomalySettings::default());
    let start = Instant::now();
    let mut alerts = 0;
    for s in &stored {
        alerts += detector.observe(&s.record).len();
    }
    per_record("anomaly rules", start, n);

    let dir = std::env::temp_dir().join(format!("collie-audit-cost-{}", std::process::id()));
    let path = dir.join("audit.db");
    let mut sink = Sqlite::open(&path).expect("open the trail");
    // HASH_INDEX=off: without the request-hash index (audit.request_hash_index: false).
    let hash_index = std::env::var("HASH_INDEX").map_or(true, |v| v != "off");
    sink.keep_request_hash_index(hash_index)
        .expect("keep or drop the request-hash index");
    let start = Instant::now();
    let mut rest = &stored[..];
    for size in sizes {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at(size.clamp(1, rest.len()));
        sink.write(chunk, &[]).expect("write");
        rest = tail;
    }
    per_record("sqlite commit", start, n);
    drop(sink);
    let size = std::fs::metadata(&path).map_or(0, |m| m.len())
        + std::fs::metadata(dir.join("audit.db-wal")).map_or(0, |m| m.len());
    println!(
        "{n} records, {tenants} tenants, {alerts} anomalies, {:.0} bytes/record on disk",
        size as f64 / n as f64
    );
    let _ = std::fs::remove_dir_all(&dir);
}
