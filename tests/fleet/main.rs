//! Fleet mode over real processes: three `collie run` sidecars sharing one
//! tenant's limits through a real Redis, Redis stopped and restarted under
//! both fault modes, a sidecar killed while it holds leases; and the lease
//! script itself under a virtual clock (expiry, and a simulated fleet of a
//! hundred sidecars).
//!
//! The tests that share the machine's Redis (127.0.0.1:6379, started by
//! `deploy/services.sh`) each use a namespace of their own; the fault tests
//! run a `redis-server` of their own on a free port, which they stop and
//! start.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly"
)]

#[path = "../common/mod.rs"]
mod common;

mod faults;
mod shared;
mod sidecars;
mod simulation;

use collie_mock::MockServer;
use common::*;
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The machine's Redis, as `.ci/run` provides it.
const REDIS_URL: &str = "redis://127.0.0.1:6379/0";

/// A connection to `url`; a clear failure when nothing answers there.
fn redis(url: &str) -> redis::Connection {
    let client = redis::Client::open(url).unwrap();
    client.get_connection().unwrap_or_else(|e| {
        panic!(
            "no Redis at {url} ({e}): these tests need a Redis server; \
             deploy/services.sh installs and starts one"
        )
    })
}

/// A namespace no other test run uses.
fn namespace(test: &str) -> String {
    format!("test-{test}-{:08x}", rand::random::<u32>())
}

/// One tenant (`alpha`, with `quota`), model `gpt` on mock `a`, priced, and
/// a `fleet` section sharing the quota through `redis_url`.
fn fleet_config(a: &MockServer, quota: Value, fleet: Value) -> Conf {
    Conf::new()
        .tenant(Tenant::alpha().quota(quota))
        .model(Model::new("gpt", &["p"]))
        .pool(Pool::new("p", &["a"]))
        .deployment(Deployment::on("a", a, "gpt-a").key("KEY_A"))
        .price("gpt-a", 1.0, 2.0)
        .set("fleet", fleet)
}

/// The `fleet` section: short leases, so tests see them move.
fn fleet_section(url: &str, ns: &str, extra: Value) -> Value {
    let mut f = json!({
        "redis_url": url,
        "namespace": ns,
        "lease": {"interval": "200ms", "ttl": "2s", "call_timeout": "1s", "top_up_wait": "2s"},
        // As many as the tests run (at most three), so the `local`
        // fallback, should a slow call trigger it, keeps the limit too.
        "expected_replicas": 3,
    });
    if let (Some(f), Some(extra)) = (f.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            f.insert(k.clone(), v.clone());
        }
    }
    f
}

/// Sidecar processes that are killed when the test ends, however it ends
/// (a failed assertion must not leave them running).
struct Sidecars(Vec<Process>);

impl std::ops::Deref for Sidecars {
    type Target = Vec<Process>;
    fn deref(&self) -> &Vec<Process> {
        &self.0
    }
}

impl std::ops::DerefMut for Sidecars {
    fn deref_mut(&mut self) -> &mut Vec<Process> {
        &mut self.0
    }
}

impl Drop for Sidecars {
    fn drop(&mut self) {
        for p in &mut self.0 {
            if p.child.try_wait().ok().flatten().is_none() {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        }
    }
}

/// `n` sidecars on one config, each with its own directory.
fn sidecars(conf: &Conf, n: usize) -> (Sidecars, Vec<tempfile::TempDir>) {
    let dirs: Vec<tempfile::TempDir> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let procs = dirs
        .iter()
        .map(|d| run_collie(d.path(), conf, None))
        .collect();
    (Sidecars(procs), dirs)
}

fn stop_all(procs: &mut [Process]) {
    for p in procs {
        terminate(&mut p.child);
    }
}

/// A chat request as alpha; the status, or 0 when no answer came.
async fn ask(client: &reqwest::Client, base: &str) -> (u16, Option<String>) {
    let r = client
        .post(format!("{base}{CHAT}"))
        .header("X-Tenant-ID", "alpha")
        .bearer_auth(ALPHA_KEY)
        .json(&json!({"model": "gpt", "max_tokens": 16,
                      "messages": [{"role": "user", "content": "hello"}]}))
        .timeout(Duration::from_secs(20))
        .send()
        .await;
    match r {
        Ok(r) => {
            let code = r
                .headers()
                .get("x-collie-error")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            (r.status().as_u16(), code)
        }
        Err(_) => (0, None),
    }
}

/// Send `counts[i]` requests to sidecar `i`, `concurrency` at a time on
/// each; every answer's (status, x-collie-error).
async fn flood(
    bases: &[String],
    counts: &[usize],
    concurrency: usize,
) -> Vec<(u16, Option<String>)> {
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for (base, &count) in bases.iter().zip(counts) {
        for worker in 0..concurrency {
            let (client, base) = (client.clone(), base.clone());
            let share = count / concurrency + usize::from(worker < count % concurrency);
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for _ in 0..share {
                    out.push(ask(&client, &base).await);
                }
                out
            }));
        }
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

fn admitted(answers: &[(u16, Option<String>)]) -> usize {
    answers.iter().filter(|(s, _)| *s == 200).count()
}

/// A gauge or counter from a sidecar's `/metrics`.
async fn metric(admin: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = reqwest::get(format!("{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metric_sum(&text, name, labels)
}

/// Poll until `f` holds, at most `limit` (the fault tests wait for leases
/// to expire and for Redis to come back).
async fn until<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < end {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A `redis-server` of a test's own, on a free port, with an append-only
/// file (so a restart keeps what it had, as a production Redis holding
/// budgets should); stopped when dropped.
struct OwnRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnRedis {
    fn start() -> OwnRedis {
        let mut r = OwnRedis {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        r.restart();
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--bind", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is not installed: deploy/services.sh installs it");
        self.child = Some(child);
        for _ in 0..250 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A relay between sidecars and the machine's Redis that can hold Redis's
/// answers back: while slow, each answer reaches the sidecar `delay` after
/// Redis sent it (past the sidecar's `call_timeout`), though Redis has
/// applied the call. Answers keep their order.
struct SlowRelay {
    port: u16,
    slow: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowRelay {
    async fn start(target: &'static str, delay: Duration) -> SlowRelay {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let slow = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&slow);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_client, &mut to_server).await;
                });
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let flag = std::sync::Arc::clone(&flag);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = from_server.read(&mut buf).await {
                        let wait = if flag.load(Ordering::SeqCst) {
                            delay
                        } else {
                            Duration::ZERO
                        };
                        let at = tokio::time::Instant::now() + wait;
                        if tx.send((at, buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    while let Some((at, bytes)) = rx.recv().await {
                        tokio::time::sleep_until(at).await;
                        if to_client.write_all(&bytes).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        SlowRelay { port, slow, task }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn set_slow(&self, on: bool) {
        self.slow.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for SlowRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
