//! The audit trail over real sockets: one record per request of every kind,
//! flushing on graceful shutdown, the crash bound after `kill -9`, no key
//! anywhere, PostgreSQL holding the same rows as SQLite, anomaly rules and
//! the webhook, tamper detection, reports, retention, migrations.
//!
//! Trails are read the way `collie audit` reads them (through the sink's
//! record walk), with SQL, or with the command itself. This file holds the
//! set-up the topics share.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly"
)]

#[path = "../common/mod.rs"]
mod common;

use collie::audit::record::Record;
use collie::audit::sink::{Sink, SinkSpec, Stored};
use collie_mock::{Behavior, MockServer};
use common::*;
use futures::StreamExt;
use serde_json::{Value, json};
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod alerts;
mod chain;
mod crash;
mod logs;
mod migration;
mod queue;
mod records;
mod reports;
mod retention;
mod rules;
mod secrets;
mod sinks;
mod users;
mod webhook;

const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Tenants `alpha` (priority 1) and `capped` (one request a day, with
/// beta's key); model `gpt` falls back from `a` to `b`, `flaky` is `b`
/// only; no probes; auditing as `audit` says.
fn config(a: &MockServer, b: &MockServer, audit: Value) -> Conf {
    Conf::new()
        .set("audit", audit)
        .tenant(Tenant::alpha())
        .tenant(Tenant::new("capped", BETA_KEY).quota(json!({"requests_per_day": 1})))
        .model(Model::new("gpt", &["pa", "pb"]))
        .model(Model::new("flaky", &["pb"]))
        .pool(Pool::new("pa", &["a"]))
        .pool(Pool::new("pb", &["b"]))
        .deployment(provider("a", a, "gpt-a", "KEY_A"))
        .deployment(provider("b", b, "gpt-b", "KEY_B"))
        .price("gpt-a", 1.0, 2.0)
        .price("gpt-b", 10.0, 20.0)
}

/// A deployment on a mock provider, with no probes.
fn provider(id: &str, mock: &MockServer, model: &str, key: &str) -> Deployment {
    Deployment::on(id, mock, model)
        .key(key)
        .health(json!({"probe": "off"}))
}

/// `more` settings added to an audit section.
fn with(mut audit: Value, more: Value) -> Value {
    for (k, v) in more.as_object().unwrap() {
        audit[k] = v.clone();
    }
    audit
}

/// A SQLite trail at `path` flushed every 20 ms, sidecar `test`, and `more`.
fn sqlite_audit(path: &Path, more: Value) -> Value {
    let audit = json!({"sink": "sqlite", "sqlite_path": path, "flush_interval": "20ms",
                       "sidecar_id": "test"});
    with(audit, more)
}

/// Sink clients block (the PostgreSQL one runs its own runtime): keep them
/// off the test's async workers.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    // Off the runtime's worker inside one; a plain test has none to leave.
    match tokio::runtime::Handle::try_current() {
        Ok(_) => tokio::task::block_in_place(f),
        Err(_) => f(),
    }
}

/// Every record of a trail, in (sidecar, seq) order, read as `collie audit`
/// reads them.
fn all_records(sink: &mut dyn Sink) -> Vec<Stored> {
    let mut out = Vec::new();
    sink.each_record(i64::MIN, None, &mut |s| out.push(s))
        .unwrap();
    out
}

fn rows(spec: &SinkSpec) -> Vec<Stored> {
    blocking(|| all_records(&mut *spec.open().unwrap()))
}

/// Wait until the trail holds `n` records.
async fn until_rows(spec: &SinkSpec, n: usize) -> Vec<Stored> {
    for _ in 0..500 {
        let r = rows(spec);
        if r.len() >= n {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "the trail never held {n} records (has {})",
        rows(spec).len()
    );
}

fn find<'a>(rows: &'a [Stored], request_id: &str) -> &'a Record {
    &rows
        .iter()
        .find(|s| s.record.request_id == request_id)
        .unwrap()
        .record
}

fn id(r: &reqwest::Response) -> String {
    r.headers()["x-collie-request-id"]
        .to_str()
        .unwrap()
        .to_string()
}

fn body() -> Value {
    json!({"model": "gpt", "messages": [{"role": "user", "content": "hello"}]})
}

/// The epoch time in ms.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn intact(spec: &SinkSpec) -> bool {
    chain_intact(&mut *spec.open().unwrap())
}

/// Whether every chain in an open trail verifies.
fn chain_intact(sink: &mut dyn Sink) -> bool {
    collie::audit::report::verify(sink).unwrap().is_empty()
}

fn pg_schema() -> String {
    let schema = format!("collie_test_{:016x}", rand::random::<u64>());
    blocking(|| {
        let mut c = postgres::Client::connect(PG_URL, postgres::NoTls).unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is required at {PG_URL} ({e}); deploy/test.sh starts the local server"
            )
        });
        c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .unwrap();
    });
    schema
}

fn drop_schema(schema: &str) {
    blocking(|| {
        if let Ok(mut c) = postgres::Client::connect(PG_URL, postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
        }
    });
}

/// A PostgreSQL trail in `schema` (its URL in `COLLIE_TEST_PG`) flushed
/// every 20 ms, and `more`.
fn pg_audit(schema: &str, more: Value) -> Value {
    let audit = json!({"sink": "postgres", "postgres_url_env": "COLLIE_TEST_PG",
                       "postgres_schema": schema, "flush_interval": "20ms"});
    with(audit, more)
}

fn pg_spec(schema: &str) -> SinkSpec {
    SinkSpec::Postgres {
        url: PG_URL.into(),
        schema: Some(schema.to_string()),
    }
}

/// Run `collie audit report` on a trail; the parsed JSON, or the text.
fn report_cli(sink: &str, args: &[&str]) -> String {
    let out = collie_bin()
        .args(["audit", "report", "--sink", sink])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn report_json(sink: &str, args: &[&str]) -> Value {
    let mut all = vec!["--format", "json"];
    all.extend_from_slice(args);
    serde_json::from_str(&report_cli(sink, &all)).unwrap()
}

/// Every kind of request: [`report_traffic`], a stream the client cuts,
/// and a models listing.
async fn every_kind(gw: &impl Calls, a: &MockServer) {
    report_traffic(gw, a).await;
    a.push(
        Behavior::default()
            .chunks(50)
            .interval(Duration::from_millis(10)),
    );
    let r = gw
        .chat(json!({"model": "gpt", "stream": true, "messages": []}))
        .send()
        .await
        .unwrap();
    let mut s = r.bytes_stream();
    s.next().await.unwrap().unwrap();
    drop(s);
    eventually("the stream is cancelled", || a.stream_cancellations() == 1).await;
    gw.get_as("/v1/models", "alpha", ALPHA_KEY)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
}

/// Traffic of every kind for the report: successes of different sizes,
/// a fallback, a broken stream, an unknown model, refusals by
/// authentication (naming alpha, and naming nobody) and by quota.
async fn report_traffic(gw: &impl Calls, a: &MockServer) {
    for i in 0..8 {
        a.push(Behavior::default().chunks(1 + i * 3));
        gw.chat(
            json!({"model": "gpt", "messages": [{"role": "user", "content": format!("r{i}")}]}),
        )
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    }
    a.push(Behavior::default().status(503));
    gw.chat(body()).send().await.unwrap().bytes().await.unwrap();
    a.push(Behavior::default().chunks(10).break_after(3));
    gw.chat(json!({"model": "gpt", "stream": true, "messages": []}))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    gw.chat(json!({"model": "nope", "messages": []}))
        .send()
        .await
        .unwrap();
    for (tenant, key) in [("alpha", "bad-1"), ("alpha", "bad-2"), ("mallory", "bad-3")] {
        gw.post_as(CHAT, tenant, key)
            .json(&body())
            .send()
            .await
            .unwrap();
    }
    for _ in 0..2 {
        gw.post_as(CHAT, "capped", BETA_KEY)
            .json(&body())
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
    }
}

/// One attempt the webhook receiver saw.
#[derive(Clone, Debug)]
struct Delivery {
    id: String,
    body: String,
    at: std::time::Instant,
}

/// A one-route HTTP receiver for the webhook: answers 500 to the first
/// `fail_first` attempts of each alert (by its `id`), 200 after; keeps every
/// attempt.
async fn receiver(fail_first: usize) -> (String, std::sync::Arc<std::sync::Mutex<Vec<Delivery>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/alerts", listener.local_addr().unwrap());
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Delivery>::new()));
    let seen = std::sync::Arc::clone(&got);
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let body = loop {
                let k = s.read(&mut chunk).await.unwrap_or(0);
                if k == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..k]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some(head_end) = text.find("\r\n\r\n") {
                    let len: usize = text[..head_end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if buf.len() >= head_end + 4 + len {
                        break Some(text[head_end + 4..].to_string());
                    }
                }
            };
            let Some(body) = body else { continue };
            let id = serde_json::from_str::<Value>(&body).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string();
            let tries = {
                let mut seen = seen.lock().unwrap();
                seen.push(Delivery {
                    id: id.clone(),
                    body,
                    at: std::time::Instant::now(),
                });
                seen.iter().filter(|d| d.id == id).count()
            };
            let status = if tries <= fail_first {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let _ = s
                .write_all(
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await;
        }
    });
    (url, got)
}

/// A record as the first release could write it.
fn v1_record() -> Record {
    Record {
        ts_ms: now_ms() - 1000,
        request_id: "r-v1".into(),
        tenant: Some("alpha".into()),
        claimed_tenant: None,
        user: None,
        client_ip: Some("127.0.0.1".into()),
        endpoint: "chat".into(),
        requested_model: Some("gpt".into()),
        served_model: Some("gpt-a".into()),
        deployment: Some("a".into()),
        attempts: r#"[{"deployment":"a","outcome":"HTTP 200"}]"#.into(),
        status: 200,
        decision: "admitted".into(),
        rule: None,
        prompt_tokens: Some(10),
        completion_tokens: Some(5),
        total_tokens: Some(15),
        usage_estimated: false,
        cost_nano: Some(20_000),
        latency_ms: 1.5,
        ttft_ms: Some(1.25),
        streamed: false,
        truncated: false,
        client_gone: false,
        request_hash: Some("ab".repeat(32)),
        response_preview: None,
        error: None,
    }
}

/// A gateway over two mocks, auditing to a fresh SQLite file.
struct SqliteTrail {
    gw: Gw,
    db: PathBuf,
    spec: SinkSpec,
    a: MockServer,
    _b: MockServer,
    _dir: tempfile::TempDir,
}

async fn sqlite_trail(more: Value) -> SqliteTrail {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let a = mock().await;
    let b = mock().await;
    let gw = gateway(&config(&a, &b, sqlite_audit(&db, more))).await;
    SqliteTrail {
        gw,
        spec: SinkSpec::Sqlite(db.clone()),
        db,
        a,
        _b: b,
        _dir: dir,
    }
}

/// Tenants alpha and beta (any model, no quota); `gpt` served by mock `a`
/// (falling back to `b`), `flaky` by mock `b` only.
fn rules_config(a: &MockServer, b: &MockServer, audit: Value) -> Conf {
    Conf::new()
        .set("audit", audit)
        .tenant(Tenant::new("alpha", ALPHA_KEY))
        .tenant(Tenant::new("beta", BETA_KEY))
        .model(Model::new("gpt", &["pa", "pb"]))
        .model(Model::new("flaky", &["pb"]))
        .pool(Pool::new("pa", &["a"]))
        .pool(Pool::new("pb", &["b"]))
        .deployment(provider("a", a, "gpt-a", "KEY_A"))
        .deployment(provider("b", b, "gpt-b", "KEY_B"))
        .price("gpt-a", 1.0, 1.0)
        .price("gpt-b", 1.0, 1.0)
}

/// A chat completion reporting exactly this usage (at $1 per million
/// tokens, 1000 tokens cost $0.001).
fn usage_body(prompt: u64, completion: u64) -> String {
    json!({
        "id": "chatcmpl-fixed", "object": "chat.completion", "created": 0, "model": "gpt-a",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    })
    .to_string()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Who {
    Alpha,
    Beta,
    /// Names tenant alpha with a key nobody has.
    Guesser,
}

/// A gateway whose provider `a` answers every request with 1000 prompt
/// tokens (`b` answers 500), auditing to SQLite with these anomaly rules.
struct RulesTrail {
    gw: Gw,
    spec: SinkSpec,
    a: MockServer,
    _b: MockServer,
    _dir: tempfile::TempDir,
}

async fn rules_trail(rules: Value) -> RulesTrail {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let a = mock_with(Behavior::default().body(usage_body(1000, 0))).await;
    let b = mock_with(Behavior::default().status(500)).await;
    let audit = sqlite_audit(&db, json!({"anomalies": rules}));
    let gw = gateway(&rules_config(&a, &b, audit)).await;
    RulesTrail {
        gw,
        spec: SinkSpec::Sqlite(db),
        a,
        _b: b,
        _dir: dir,
    }
}

impl RulesTrail {
    /// Send one request and read the whole answer.
    async fn send(&self, who: Who, body: Value) -> reqwest::StatusCode {
        let (tenant, key) = match who {
            Who::Alpha => ("alpha", ALPHA_KEY),
            Who::Beta => ("beta", BETA_KEY),
            Who::Guesser => ("alpha", "sk-guessed"),
        };
        let r = self
            .gw
            .client
            .post(self.gw.url("/v1/chat/completions"))
            .header("x-tenant-id", tenant)
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        r.bytes().await.unwrap();
        status
    }

    async fn send_n(&self, n: usize, who: Who, body: Value) {
        for _ in 0..n {
            self.send(who, body.clone()).await;
        }
    }

    /// The anomalies stored once the trail holds `records` records (an
    /// anomaly is committed with the record that revealed it), as (rule,
    /// tenant) in the order they fired.
    async fn fired_after(&self, records: usize) -> Vec<(String, Option<String>)> {
        let all = until_rows(&self.spec, records).await;
        assert_eq!(all.len(), records, "one record per request");
        self.fired()
    }

    fn fired(&self) -> Vec<(String, Option<String>)> {
        blocking(|| {
            self.spec
                .open()
                .unwrap()
                .anomalies_since(i64::MIN, None)
                .unwrap()
        })
        .into_iter()
        .map(|a| (a.rule, a.tenant))
        .collect()
    }
}

fn fired(rule: &str, tenant: Option<&str>) -> (String, Option<String>) {
    (rule.to_string(), tenant.map(str::to_string))
}

fn question(i: usize) -> Value {
    json!({"model": "gpt", "messages": [{"role": "user", "content": format!("question {i}")}]})
}
