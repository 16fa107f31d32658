//! Tenant quotas over real sockets: budgets exact under concurrency,
//! settlement, rates and bursts, priority admission and the pool queue,
//! rebalancing, the rate headers and metrics, and the prompt estimate.
//! This file holds the set-up the topics share.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly"
)]

#[path = "../common/mod.rs"]
mod common;

use collie_mock::{Behavior, MockServer};
use common::*;
use futures::StreamExt;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod budgets;
mod estimate;
mod headers;
mod metrics;
mod priority;
mod queue;
mod rates;
mod rebalance;
mod settlement;

/// Tenants `alpha` (priority 1) and `beta` (priority 5, every model) with
/// these quotas; model `gpt` → pool `p` (→ mock `a`), and `gpt-fb` falling
/// back from `a` to `b`.
fn config(a: &MockServer, b: &MockServer, alpha_quota: Value, beta_quota: Value) -> Conf {
    Conf::new()
        .tenant(Tenant::alpha().quota(alpha_quota))
        .tenant(Tenant::new("beta", BETA_KEY).priority(5).quota(beta_quota))
        .model(Model::new("gpt", &["p"]))
        .model(Model::new("gpt-fb", &["p", "q"]))
        .pool(Pool::new("p", &["a"]))
        .pool(Pool::new("q", &["b"]))
        .deployment(Deployment::on("a", a, "gpt-a").timeouts(json!({"first_byte": "30s"})))
        .deployment(Deployment::on("b", b, "gpt-b"))
        .price("gpt-a", 1.0, 2.0)
        .price("gpt-b", 10.0, 20.0)
}

/// Pool `p` (mock `a` alone) with one more setting.
fn pool_p(conf: Conf, setting: &str, value: impl Into<Value>) -> Conf {
    conf.edit_pool("p", |p| p.set(setting, value))
}

fn as_beta(gw: &Gw, body: Value) -> reqwest::RequestBuilder {
    gw.post_as(CHAT, "beta", BETA_KEY).json(&body)
}

fn small(model: &str, max_tokens: u64, stream: bool) -> Value {
    json!({"model": model, "max_tokens": max_tokens, "stream": stream,
           "messages": [{"role": "user", "content": "hello there"}]})
}

/// The caller's quota report: (used, reserved) of one window of the tenant scope.
async fn window(gw: &Gw, tenant: &str, key: &str, name: &str) -> (f64, f64) {
    let v: Value = gw
        .get_as("/v1/collie/quota", tenant, key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let w = v["scopes"][0]["windows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["window"] == name)
        .unwrap_or_else(|| panic!("no window {name} in {v}"));
    (w["used"].as_f64().unwrap(), w["reserved"].as_f64().unwrap())
}

/// Settlement runs in the logging phase, just after the response: wait until
/// nothing is reserved any more.
async fn settled(gw: &Gw, tenant: &str, key: &str, name: &str) -> f64 {
    for _ in 0..500 {
        let (used, reserved) = window(gw, tenant, key, name).await;
        if reserved == 0.0 {
            return used;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{name} never settled");
}

/// Wait until `n` requests are queued at the gateway's pools (admin status).
async fn waiting(gw: &Gw, n: u64) {
    for _ in 0..500 {
        let v = gw.admin_json("/quota").await;
        let queued: u64 = v["pools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["waiting"].as_u64().unwrap())
            .sum();
        if queued == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never {n} requests queued");
}

/// Wait until a window's `used` satisfies `ok` (settlement runs just after
/// the response).
async fn until_used(gw: &Gw, tenant: &str, key: &str, name: &str, ok: impl Fn(f64) -> bool) {
    for _ in 0..500 {
        if ok(window(gw, tenant, key, name).await.0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{name} never got there: {:?}",
        window(gw, tenant, key, name).await
    );
}

/// The admin listener's `/quota`: every tenant's report and every pool.
async fn admin_quota(gw: &Gw) -> Value {
    gw.admin_json("/quota").await
}

/// One pool's gate as the admin listener shows it.
async fn pool(gw: &Gw, id: &str) -> Value {
    admin_quota(gw).await["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pool"] == id)
        .cloned()
        .unwrap()
}

/// Pin the calendar's clock (day and month windows) to an instant.
fn pin(gw: &Gw, at: &str) {
    gw.running.state.ledger.clock().pin(at.parse().unwrap());
}

/// What Collie estimates for a request body as `reqwest` sends it.
fn estimate(body: &Value, model: &str) -> u64 {
    use collie::quota::estimate::{Family, prompt_tokens};
    prompt_tokens(&serde_json::to_vec(body).unwrap(), Family::for_model(model))
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} in {:?}", r.headers()))
        .to_str()
        .unwrap()
        .to_string()
}

fn retry_after(r: &reqwest::Response) -> u64 {
    header(r, "retry-after").parse().unwrap()
}
