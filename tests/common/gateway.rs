//! A real gateway in this process, started from a [`Conf`] on fresh
//! loopback ports, and what its admin listener shows.

use super::config::Conf;
use super::{PROVIDER_KEY_A, PROVIDER_KEY_B, free_port, metric_sum};
use collie::config::Config;
use collie::server::{Collie, Policy, Running};
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

/// A gateway under test and how to reach it.
pub(crate) struct Gw {
    pub running: Running,
    pub base: String,
    pub admin: String,
    pub client: reqwest::Client,
}

/// The provider keys deployments name (`KEY_A`, `KEY_B`).
pub(crate) fn provider_env() -> HashMap<String, String> {
    HashMap::from([
        ("KEY_A".to_string(), PROVIDER_KEY_A.to_string()),
        ("KEY_B".to_string(), PROVIDER_KEY_B.to_string()),
    ])
}

/// The config as the gateway under test reads it: on these listeners, two
/// worker threads, and — for tests that are not about the audit trail,
/// whose default is a SQLite file in the working directory — no trail.
pub(crate) fn full_config(conf: &Conf, listen: &str, admin_listen: &str) -> Conf {
    let conf = conf
        .clone()
        .set("listen", listen)
        .set("admin_listen", admin_listen)
        .set("threads", 2);
    if conf.has("audit") {
        conf
    } else {
        conf.set("audit", serde_json::json!({"sink": "off"}))
    }
}

/// Validate a config as `collie run` would, with the provider keys and
/// `env` in its environment.
pub(crate) fn load(conf: &Conf, env: &[(&str, &str)]) -> Config {
    let mut vars = provider_env();
    for (k, v) in env {
        vars.insert(k.to_string(), v.to_string());
    }
    let text = conf.yaml();
    Config::from_yaml(&text, &|name| vars.get(name).cloned())
        .unwrap_or_else(|e| panic!("test config is invalid:\n{e}\n---\n{text}"))
}

/// Start a gateway with this config on fresh ports.
pub(crate) async fn gateway(conf: &Conf) -> Gw {
    gateway_with_env(conf, &[]).await
}

/// Start a gateway whose environment also holds `env` (a database URL).
pub(crate) async fn gateway_with_env(conf: &Conf, env: &[(&str, &str)]) -> Gw {
    gateway_with_policy(conf, env, Policy::Full).await
}

/// Start a gateway with its policy chosen (`Policy::TransportOnly`: the
/// benchmarks' transport arm).
pub(crate) async fn gateway_with_policy(conf: &Conf, env: &[(&str, &str)], policy: Policy) -> Gw {
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let config = load(&full_config(conf, &listen, &admin), env);
    let running = tokio::task::spawn_blocking(move || {
        Collie::build_with(config, None, policy)
            .unwrap()
            .spawn()
            .unwrap()
    })
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

impl Gw {
    /// Replace the running gateway's config, as SIGHUP does (same listeners).
    pub(crate) fn reload(&self, conf: &Conf) {
        let listen = self.running.listen.to_string();
        let admin = self.running.admin_listen.to_string();
        let config = load(&full_config(conf, &listen, &admin), &[]);
        self.running.state.reload(config).unwrap();
    }

    /// Stop gracefully (every record written), off the async workers.
    pub(crate) async fn stop(self) {
        let running = self.running;
        tokio::task::spawn_blocking(move || running.stop(true))
            .await
            .unwrap();
    }

    /// Metrics once `n` requests have been accounted: the logging phase runs
    /// just after the response is sent, so a scrape may come before it.
    pub(crate) async fn metrics_after(&self, n: usize) -> String {
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
    pub(crate) async fn admin_json(&self, path: &str) -> Value {
        self.client
            .get(format!("{}{path}", self.admin))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub(crate) async fn metrics(&self) -> String {
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
