//! Routing over real sockets: health probes, breakers, routing policies
//! and route aliases, retries inside a pool, the request deadline, panic
//! mode, the status view, and providers over HTTPS. This file holds the
//! set-up the topics share.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly"
)]

#[path = "../common/mod.rs"]
mod common;

use collie_mock::{Behavior, MockConfig, MockServer};
use common::*;
use serde_json::{Value, json};
use std::sync::atomic::Ordering;
use std::time::Duration;

mod breakers;
mod deadline;
mod fit;
mod hold;
mod policies;
mod probes;
mod retries;
mod status;
mod tls;

/// Deployment `id` on `mock`, serving `model-{id}` with short timeouts.
fn member(id: &str, mock: &MockServer) -> Deployment {
    Deployment::on(id, mock, &format!("model-{id}"))
        .timeouts(json!({"connect": "500ms", "first_byte": "2s"}))
}

/// One pool `p` of these deployments, set up further by `pool`; model `m`
/// → p, model `fb` → p then pool `q` (deployment `z`, on `fallback`).
fn pool_config(
    members: &[Deployment],
    pool: impl FnOnce(Pool) -> Pool,
    fallback: &MockServer,
) -> Conf {
    let ids: Vec<&str> = members.iter().map(Part::name).collect();
    let conf = Conf::two_tenants(&[])
        .model(Model::new("m", &["p"]))
        .model(Model::new("fb", &["p", "q"]))
        .pool(pool(Pool::new("p", &ids)))
        .pool(Pool::new("q", &["z"]));
    members
        .iter()
        .cloned()
        .fold(conf, Conf::deployment)
        .deployment(Deployment::on("z", fallback, "model-z").health(json!({"probe": "off"})))
        .price("model-a", 5.0, 15.0)
        .price("model-b", 0.5, 1.5)
}

/// What the status view recommends for `model` now.
async fn recommended(gw: &Gw, model: &str) -> Value {
    status(gw).await["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == model)
        .unwrap()["recommended"]
        .clone()
}

async fn status(gw: &Gw) -> Value {
    gw.admin_json("/status").await
}

async fn deployment(gw: &Gw, id: &str) -> Value {
    let s = status(gw).await;
    s["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == id)
        .cloned()
        .unwrap()
}

/// Poll the status until `id`'s `field` equals `want`.
async fn until(gw: &Gw, id: &str, field: &str, want: &str) {
    for _ in 0..500 {
        if deployment(gw, id).await[field] == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "{id}.{field} never became {want}: {}",
        deployment(gw, id).await
    );
}

async fn served_by(gw: &Gw, model: &str, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let r = gw.chat(hello(model)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        out.push(r.headers()["x-collie-model"].to_str().unwrap().to_string());
    }
    out
}
