//! Shared by the integration tests: start mock upstreams and a real gateway
//! in-process on loopback, and talk to them over real sockets.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test support; not every test uses every helper"
)]

use collie::config::Config;
use collie::gateway::key_digest_hex;
use collie_mock::{Behavior, MockConfig, MockServer};
use collie::server::{Collie, Running};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

pub const ALPHA_KEY: &str = "sk-tenant-alpha-7Hq2";
pub const BETA_KEY: &str = "sk-tenant-beta-Vx81";
/// Provider keys: a test can search for them wherever they must not appear.
pub const PROVIDER_KEY_A: &str = "sk-provider-A-canary-5d1f";
pub const PROVIDER_KEY_B: &str = "sk-provider-B-canary-93ce";

/// A port nobody listens on right now. The gateway binds it by address, so
/// the OS picked it fresh and it is very unlikely to be taken in between.
pub fn free_port() -> u16 {
    // The OS may hand the same free port to two binds in a row once the
    // first is closed: never give one out twice in this process.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

pub async fn mock() -> MockServer {
    mock_with(Behavior::default()).await
}

pub async fn mock_with(default: Behavior) -> MockServer {
    MockServer::start(MockConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: None,
        h2c: true,
        default,
        record: true,
        dims: 4,
    })
    .await
    .unwrap()
}

/// A gateway under test and how to reach it.
pub struct Gw {
    pub running: Running,
    pub base: String,
    pub admin: String,
    pub client: reqwest::Client,
}

impl Gw {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A chat request as tenant alpha.
    pub fn chat(&self, body: serde_json::Value) -> reqwest::RequestBuilder {
        self.client
            .post(self.url("/v1/chat/completions"))
            .header("x-tenant-id", "alpha")
            .bearer_auth(ALPHA_KEY)
            .json(&body)
    }

    /// Metrics once `n` requests have been accounted: the logging phase runs
    /// just after the response is sent, so a scrape may come before it.
    pub async fn metrics_after(&self, n: usize) -> String {
        for _ in 0..500 {
            let text = self.metrics().await;
            if metric_sum(&text, "collie_requests_total", &[]) >= n as f64 {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("fewer than {n} requests were accounted");
    }

    /// A JSON page of the admin listener (`/status`, `/quota`).
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        self.client
            .get(format!("{}{path}", self.admin))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

pub fn provider_env() -> HashMap<String, String> {
    HashMap::from([
        ("KEY_A".to_string(), PROVIDER_KEY_A.to_string()),
        ("KEY_B".to_string(), PROVIDER_KEY_B.to_string()),
    ])
}

/// Start a gateway from a YAML body (everything but the listeners, which are
/// added here on fresh ports).
pub async fn gateway(yaml: &str) -> Gw {
    let listen = free_port();
    let admin = free_port();
    // Tests that are not about the audit trail keep it off (its default is
    // a SQLite file in the working directory).
    let audit = if yaml.contains("audit:") {
        ""
    } else {
        "audit: {sink: off}\n"
    };
    let text = format!(
        "listen: 127.0.0.1:{listen}\nadmin_listen: 127.0.0.1:{admin}\nthreads: 2\n{audit}{yaml}"
    );
    let env = provider_env();
    let config = Config::from_yaml(&text, &|name| env.get(name).cloned())
        .unwrap_or_else(|e| panic!("test config is invalid:\n{e}\n---\n{text}"));
    let running =
        tokio::task::spawn_blocking(move || Collie::build(config, None).unwrap().spawn().unwrap())
            .await
            .unwrap();
    Gw {
        base: format!("http://{}", running.listen),
        admin: format!("http://{}", running.admin_listen),
        running,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
    }
}

/// Tenant alpha (every model, priority 1) and beta (only the models listed).
pub fn tenants_with(beta_models: &str) -> String {
    format!(
        "tenants:\n  - id: alpha\n    api_keys: [\"{}\"]\n    models: [\"*\"]\n    priority: 1\n  - id: beta\n    api_keys: [\"{}\"]\n    models: [{beta_models}]\n    priority: 5\n",
        key_digest_hex(ALPHA_KEY),
        key_digest_hex(BETA_KEY)
    )
}

/// Tenants for configs with no model for beta.
pub fn tenants() -> String {
    tenants_with("")
}

/// Standard layout: model `gpt` falls back from deployment `a` (mock a,
/// upstream model `gpt-a`, key A) to `b` (mock b, `gpt-b`, key B).
pub fn two_step(a: &MockServer, b: &MockServer, first_byte: &str) -> String {
    format!(
        "{tenants}models:
  - {{name: gpt, fallback: [pa, pb]}}
  - {{name: other, fallback: [pb]}}
  - {{name: embed, fallback: [pa]}}
  - {{name: resp, fallback: [pa]}}
pools:
  - {{id: pa, deployments: [{{deployment: a}}]}}
  - {{id: pb, deployments: [{{deployment: b}}]}}
deployments:
  - id: a
    base_url: {a}
    api_key_env: KEY_A
    model: gpt-a
    timeouts: {{connect: 1s, first_byte: {first_byte}, idle: 2s}}
  - id: b
    base_url: {b}
    api_key_env: KEY_B
    model: gpt-b
    timeouts: {{connect: 1s, first_byte: {first_byte}, idle: 2s}}
pricing:
  gpt-a: {{input_per_mtok: 1.0, output_per_mtok: 2.0}}
  gpt-b: {{input_per_mtok: 10.0, output_per_mtok: 20.0}}
",
        tenants = tenants_with("other"),
        a = a.base_url(),
        b = b.base_url(),
    )
}

pub fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Poll until `f` holds (bounded; for counters updated by other tasks).
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Sum of a metric's samples whose labels include every `label="value"` given.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What a mock received, without the health probes' `GET /models`.
pub fn posts(mock: &MockServer) -> Vec<collie_mock::Recorded> {
    mock.requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect()
}

/// The value of one header recorded by a mock, if present.
pub fn recorded_header(req: &collie_mock::Recorded, name: &str) -> Option<String> {
    req.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

/// One HTTP/1.1 response as read off a raw socket.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The body was framed to its end (its length, or the last chunk).
    pub complete: bool,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The OpenAI-style error code of a response Collie generated.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// Every response in `data`, in order, as far as they parse; the last one
/// may be incomplete.
pub fn parse_responses(mut data: &[u8]) -> Vec<RawResponse> {
    let mut out = Vec::new();
    while let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&data[..end]).into_owned();
        data = &data[end + 4..];
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let mut r = RawResponse {
            status,
            headers: headers.clone(),
            body: Vec::new(),
            complete: false,
        };
        if (100..200).contains(&status) {
            continue;
        }
        if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
            let n = len.min(data.len());
            r.body = data[..n].to_vec();
            r.complete = n == len;
            data = &data[n..];
        } else if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            loop {
                let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
                    r.body.extend_from_slice(data);
                    data = &[];
                    break;
                };
                let size = usize::from_str_radix(String::from_utf8_lossy(&data[..eol]).trim(), 16)
                    .unwrap_or(usize::MAX);
                data = &data[eol + 2..];
                if size == 0 {
                    r.complete = data.starts_with(b"\r\n");
                    data = data.get(2..).unwrap_or_default();
                    break;
                }
                if data.len() < size + 2 {
                    r.body.extend_from_slice(&data[..size.min(data.len())]);
                    data = &[];
                    break;
                }
                r.body.extend_from_slice(&data[..size]);
                data = &data[size + 2..];
            }
        } else {
            r.body = data.to_vec();
            data = &[];
        }
        let done = !r.complete;
        out.push(r);
        if done {
            break;
        }
    }
    out
}

/// Send raw bytes on a new connection and read until the gateway closes it
/// (or `limit` passes, which a test treats as "never closed").
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], limit: Duration) -> (Vec<u8>, bool) {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    read_until_closed(&mut s, limit).await
}

/// Read until the peer closes (`true`) or `limit` passes (`false`).
pub async fn read_until_closed(s: &mut tokio::net::TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (out, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// A chat request as raw HTTP/1.1 from tenant alpha.
pub fn raw_chat(body: &str, extra_headers: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: collie\r\nX-Tenant-ID: alpha\r\nAuthorization: Bearer {ALPHA_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    )
}
