//! `x-ratelimit-*` on every response, from the tightest window.

use super::*;

/// `x-ratelimit-*` on every response to an identified tenant — Collie's own
/// 4xx and 5xx too — from the tightest window that applies: a day budget,
/// a per-model budget, a token bucket (whose limit is its rate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_headers_on_every_response_from_the_tightest_window() {
    let a = mock().await;
    let b = mock().await;
    let gw = gateway(&config(
        &a,
        &b,
        json!({"tpm": 1, "tpm_burst": 1000, "requests_per_day": 50}),
        json!({"models": {"gpt": {"requests_per_day": 3}}}),
    ))
    .await;
    pin(&gw, "2026-05-04T12:00:00Z");
    let body = small("gpt", 100, false);
    let r = gw.chat(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // In flight while the head was written: one request of 50 for the day…
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "50");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "49");
    assert_eq!(header(&r, "x-ratelimit-reset-requests"), "12h0m0s");
    // …and its reservation out of the token bucket, whose limit is its rate.
    let reserved = estimate(&body, "gpt") + 100;
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), "1");
    assert_eq!(
        header(&r, "x-ratelimit-remaining-tokens"),
        (1000 - reserved).to_string()
    );
    assert!(header(&r, "x-ratelimit-reset-tokens").ends_with('s'));
    let used: Value = r.json().await.unwrap();
    let used = used["usage"]["total_tokens"].as_u64().unwrap();
    settled(&gw, "alpha", ALPHA_KEY, "day.requests").await;
    // Collie's own 404 (unknown model) and 500 (every attempt failed).
    let r = gw.chat(small("nope", 10, false)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.headers().contains_key("x-collie-error"));
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "49");
    assert_eq!(
        header(&r, "x-ratelimit-remaining-tokens"),
        (1000 - used).to_string()
    );
    let r = gw
        .chat(small("gpt", 10, false))
        .header("x-mock-status", "500")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(header(&r, "x-collie-error"), "upstream_failed");
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "50");
    // beta has only a budget for one model: headers for that model only.
    let r = as_beta(&gw, small("gpt", 10, false)).send().await.unwrap();
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "3");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "2");
    assert!(!r.headers().contains_key("x-ratelimit-limit-tokens"));
    let r = as_beta(&gw, small("gpt-fb", 10, false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        !r.headers().contains_key("x-ratelimit-limit-requests"),
        "no window limits beta on this model"
    );
}
