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

/// The pages with tenants' usage and deployments' state need the admin
/// token when one is configured; what probes and scrapers read does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_pages_refuse_without_the_admin_token() {
    let a = mock().await;
    let b = mock().await;
    let token = "admin-token-for-the-tests-5d1f";
    let conf = two_step(&a, &b, "5s").set("admin_token_env", "ADMIN_TOKEN");
    let gw = gateway_with_env(&conf, &[("ADMIN_TOKEN", token)]).await;
    let get = |path: &str, auth: Option<&str>| {
        let mut r = gw.client.get(format!("{}{path}", gw.admin));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send()
    };
    for page in ["/status", "/quota"] {
        let r = get(page, None).await.unwrap();
        assert_eq!(r.status(), 401, "{page} without a token");
        assert!(
            r.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer")
        );
        let body = r.text().await.unwrap();
        assert!(!body.contains("alpha"), "{page} leaked: {body}");
        for wrong in [
            "Bearer nope",
            "Basic YWRtaW46YWRtaW4=",
            "Bearer admin-token-for-the-tests-5d1",
        ] {
            assert_eq!(
                get(page, Some(wrong)).await.unwrap().status(),
                401,
                "{page} {wrong}"
            );
        }
        let r = get(page, Some(&format!("Bearer {token}"))).await.unwrap();
        assert_eq!(r.status(), 200, "{page} with the token");
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(v.is_object());
    }
    // The live stream and the forced check are protected the same way.
    assert_eq!(get("/status/events", None).await.unwrap().status(), 401);
    assert_eq!(
        get("/status/events", Some("Bearer nope"))
            .await
            .unwrap()
            .status(),
        401
    );
    let check = gw
        .client
        .post(format!("{}/status/check?deployment=a", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(check.status(), 401);
    // Probes, scrapes and the page itself (it holds no data) stay open.
    for page in ["/metrics", "/healthz", "/readyz", "/"] {
        assert_eq!(get(page, None).await.unwrap().status(), 200, "{page}");
    }
    // The token never shows where it must not.
    let metrics = gw.metrics().await;
    assert!(!metrics.contains(token));
}
