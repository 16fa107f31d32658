//! `collie run` reloading its config file, on SIGHUP and with
//! `--watch-config` when the file changes: a good file is swapped in, a bad
//! one refused, and both show in the reload metrics.

use crate::common::gateway::full_config;
use crate::common::*;
use std::time::Duration;

/// A config that serves `m` (and `extra` models) from a deployment nobody
/// needs to reach: reloading is what is tested, not traffic.
fn conf(extra: &[&str]) -> Conf {
    let mut c = Conf::two_tenants(&["m"])
        .model(Model::new("m", &["p"]))
        .pool(Pool::new("p", &["d"]))
        .deployment(
            Deployment::new("d", "http://127.0.0.1:9/v1", "up-m")
                .key("KEY_A")
                .health(serde_json::json!({"probe": "off"})),
        );
    for m in extra {
        c = c.model(Model::new(m, &["p"]));
    }
    c
}

/// The reload metrics as `/metrics` shows them now.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Reloads {
    success: f64,
    failure: f64,
    last_successful: f64,
    last_success_at: f64,
}

async fn reloads(admin: &str) -> Reloads {
    let text = reqwest::get(format!("{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |series: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
            .trim()
            .parse::<f64>()
            .unwrap()
    };
    Reloads {
        success: value(r#"collie_config_reloads_total{result="success"}"#),
        failure: value(r#"collie_config_reloads_total{result="failure"}"#),
        last_successful: value("collie_config_last_reload_successful"),
        last_success_at: value("collie_config_last_reload_success_timestamp_seconds"),
    }
}

/// Wait (up to 10 s) until the reload metrics satisfy `done`.
async fn reloads_until(admin: &str, what: &str, done: impl Fn(&Reloads) -> bool) -> Reloads {
    for _ in 0..200 {
        let r = reloads(admin).await;
        if done(&r) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: {:?}", reloads(admin).await);
}

/// Replace the config file at once, as the kubelet updates a ConfigMap
/// volume: a watcher never reads it half written.
fn replace(dir: &std::path::Path, text: &str) {
    let next = dir.join("collie.yaml.next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, dir.join("collie.yaml")).unwrap();
}

/// Rewrite the running process's config file (same listeners).
fn rewrite(dir: &std::path::Path, p: &Process, conf: &Conf) {
    let addr = |url: &str| url.trim_start_matches("http://").to_string();
    let full = full_config(conf, &addr(&p.base), &addr(&p.admin));
    replace(dir, &full.yaml());
}

async fn models(p: &Process) -> Vec<String> {
    let body: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/v1/models", p.base))
        .header("x-tenant-id", "alpha")
        .bearer_auth(ALPHA_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut ids: Vec<String> = body["data"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_reload_good_or_bad_moves_the_reload_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = run_collie(dir.path(), &conf(&[]), None);
    let start = reloads(&p.admin).await;
    assert_eq!(
        (start.success, start.failure, start.last_successful),
        (0.0, 0.0, 1.0),
        "{start:?}"
    );
    assert!(start.last_success_at > 1.7e9, "the start's time: {start:?}");

    rewrite(dir.path(), &p, &conf(&["extra"]));
    sighup(&p.child);
    let good = reloads_until(&p.admin, "a good file is reloaded", |r| r.success == 1.0).await;
    assert_eq!((good.failure, good.last_successful), (0.0, 1.0), "{good:?}");
    assert!(good.last_success_at > start.last_success_at, "{good:?}");
    assert_eq!(models(&p).await, ["extra", "m"]);

    replace(dir.path(), "threads: 0\n");
    sighup(&p.child);
    let bad = reloads_until(&p.admin, "a bad file is refused", |r| r.failure == 1.0).await;
    assert_eq!(bad.success, 1.0, "{bad:?}");
    assert_eq!(bad.last_successful, 0.0, "{bad:?}");
    assert_eq!(
        bad.last_success_at, good.last_success_at,
        "the running config is still the one loaded then"
    );
    assert_eq!(models(&p).await, ["extra", "m"], "the running config stays");

    terminate(&mut p.child);
}

/// A ConfigMap volume is updated in place by the kubelet, without a signal:
/// `--watch-config` notices the new content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_config_file_is_reloaded_when_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = run_collie_with(dir.path(), &conf(&[]), None, &["--watch-config", "100ms"]);
    // Unchanged content is not reloaded, however often it is looked at.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(reloads(&p.admin).await.success, 0.0);

    rewrite(dir.path(), &p, &conf(&["extra"]));
    reloads_until(&p.admin, "a changed file is reloaded", |r| r.success == 1.0).await;
    assert_eq!(models(&p).await, ["extra", "m"]);

    replace(dir.path(), "tenants: [\n");
    let bad = reloads_until(&p.admin, "a broken file is refused", |r| r.failure == 1.0).await;
    assert_eq!(bad.last_successful, 0.0, "{bad:?}");
    // Tried once: the same broken content is not tried again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = reloads(&p.admin).await;
    assert_eq!((later.success, later.failure), (1.0, 1.0), "{later:?}");
    assert_eq!(models(&p).await, ["extra", "m"], "the running config stays");

    // Fixed: reloaded, and the failure is over.
    rewrite(dir.path(), &p, &conf(&["extra", "third"]));
    let fixed = reloads_until(&p.admin, "a fixed file is reloaded", |r| r.success == 2.0).await;
    assert_eq!(fixed.last_successful, 1.0, "{fixed:?}");
    assert_eq!(models(&p).await, ["extra", "m", "third"]);

    terminate(&mut p.child);
}
