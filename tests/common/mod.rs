//! Shared by the integration tests: mock providers and a real gateway on
//! loopback, the config it runs (built from parts, see [`config`]), and
//! requests over real sockets.
//!
//! - [`config`]: tenants, models, pools, deployments, pricing and settings,
//!   written out as YAML; [`two_step`] is the layout most tests use;
//! - [`gateway`](mod@gateway): a gateway in this process, reloads, its
//!   admin pages;
//! - [`requests`]: requests as a tenant ([`Calls`]) and common bodies;
//! - [`raw`]: HTTP/1.1 on raw sockets;
//! - [`process`]: `collie` as a real process.

#![allow(
    dead_code,
    unused_imports,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test support; not every test uses every helper"
)]

pub(crate) mod config;
pub(crate) mod gateway;
pub(crate) mod process;
pub(crate) mod raw;
pub(crate) mod requests;

pub(crate) use config::{Conf, Deployment, Model, Part, Pool, Tenant, two_step};
pub(crate) use gateway::{
    Gw, full_config, gateway, gateway_with_env, gateway_with_policy, load, provider_env,
};
pub(crate) use process::{
    Log, Process, collie_bin, run_collie, run_collie_with, sighup, sigterm, terminate,
};
pub(crate) use raw::{
    RawResponse, closing_provider, parse_responses, raw_chat, raw_exchange, read_until_closed,
    send_raw,
};
pub(crate) use requests::{CHAT, Calls, Remote, hello, streamed};

use collie_mock::{Behavior, MockConfig, MockServer, Recorded};
use std::time::Duration;

pub(crate) const ALPHA_KEY: &str = "sk-tenant-alpha-7Hq2";
pub(crate) const BETA_KEY: &str = "sk-tenant-beta-Vx81";
/// Provider keys: a test can search for them wherever they must not appear.
pub(crate) const PROVIDER_KEY_A: &str = "sk-provider-A-canary-5d1f";
pub(crate) const PROVIDER_KEY_B: &str = "sk-provider-B-canary-93ce";

/// A port nobody listens on right now. The gateway binds it by address, so
/// the OS picked it fresh and it is very unlikely to be taken in between.
pub(crate) fn free_port() -> u16 {
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

/// A mock provider answering the default way (recording every request).
pub(crate) async fn mock() -> MockServer {
    mock_with(Behavior::default()).await
}

/// A mock provider answering `default`'s way unless told otherwise.
pub(crate) async fn mock_with(default: Behavior) -> MockServer {
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

/// Poll until `f` holds (bounded; for counters updated by other tasks).
pub(crate) async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Sum of a metric's samples whose labels include every `label="value"` given.
pub(crate) fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
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
pub(crate) fn posts(mock: &MockServer) -> Vec<Recorded> {
    mock.requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect()
}

/// The value of one header recorded by a mock, if present.
pub(crate) fn recorded_header(req: &Recorded, name: &str) -> Option<String> {
    req.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}
