//! The admin listener: metrics as Prometheus text, health and readiness.

use crate::common::*;
use serde_json::json;

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
