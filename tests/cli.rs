//! The `collie` command line and the admin listener.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly"
)]

mod common;

use common::*;
use serde_json::json;

#[test]
fn check_config_reports_every_error_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "tenants:\n  - {id: t, api_keys: [zz], models: [ghost]}\npools:\n  - {id: p, deployments: [{deployment: d, weight: 0}]}\ndeployments:\n  - {id: d, base_url: \"http://127.0.0.1:1/v1\", model: m, api_key_env: COLLIE_TEST_UNSET_VAR}\n",
    )
    .unwrap();
    let out = collie_bin()
        .arg("check-config")
        .arg(&bad)
        .env_remove("COLLIE_TEST_UNSET_VAR")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "deployments[0].api_key_env: environment variable `COLLIE_TEST_UNSET_VAR` is not set",
        "pools[0].deployments[0].weight: must be > 0",
        "tenants[0].api_keys[0]: must be a SHA-256 digest",
        "tenants[0].models[0]: unknown model `ghost`",
    ] {
        assert!(err.contains(expected), "missing `{expected}` in:\n{err}");
    }

    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/collie.yaml");
    let out = collie_bin()
        .args(["check-config", shipped])
        .env("OPENAI_API_KEY", "x")
        .env("AZURE_OPENAI_KEY", "x")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn run_refuses_a_bad_config_with_64() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "listen: nowhere\n").unwrap();
    let out = collie_bin()
        .args(["run", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn hash_key_prints_the_digest() {
    let out = collie_bin()
        .args(["hash-key", "sk-demo-team-a"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "50a734ef22b610c7ad5e602d7a1aa5e39a9a39a6f6cc38aa2415f9d58b52146e"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_health_answers() {
    let a = mock().await;
    let b = mock().await;
    let gw = gateway(&two_step(&a, &b, "5s")).await;
    let ok = gw
        .chat(json!({"model": "gpt", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let refused = gw
        .post_as(CHAT, "evil\"}tenant", "nope")
        .json(&json!({"model": "made-up-model"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    let text = gw.metrics_after(2).await;
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    let names: std::collections::HashSet<&str> =
        scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    for n in [
        "collie_requests_total",
        "collie_tokens_total",
        "collie_cost_usd_total",
        "gen_ai_server_request_duration_seconds",
        "gen_ai_server_time_to_first_token_seconds",
        "collie_upstream_attempts_total",
    ] {
        assert!(names.contains(n), "missing {n}");
    }
    // Label values come from config only.
    for s in &scrape.samples {
        for (k, v) in s.labels.iter() {
            if k == "tenant" {
                assert!(
                    ["alpha", "beta", "other"].contains(&v.as_str()),
                    "tenant label {v}"
                );
            }
        }
    }
    assert!(!text.contains("evil") && !text.contains("made-up-model"));
    assert_eq!(
        metric_sum(
            &text,
            "collie_requests_total",
            &[("tenant", "other"), ("status_class", "4xx")]
        ),
        1.0
    );
    assert!(!text.contains(PROVIDER_KEY_A) && !text.contains(ALPHA_KEY));

    for (path, status) in [("/healthz", 200), ("/readyz", 200), ("/nope", 404)] {
        let r = gw
            .client
            .get(format!("{}{path}", gw.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{path}");
    }
}
