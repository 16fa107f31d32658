//! The quota gauges and counters.

use super::*;

/// Per tenant and window: the limit, what is used, reserved and left, set
/// from the ledger when scraped; settlements by outcome and refusals by
/// window are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_metrics_appear_and_move() {
    let a = mock().await;
    let b = mock().await;
    let gw = gateway(&config(
        &a,
        &b,
        json!({"rpm": 1, "rpm_burst": 10, "requests_per_day": 3, "usd_per_day": 1.0}),
        json!({"models": {"gpt": {"tokens_per_day": 1000}}}),
    ))
    .await;
    let gauge = |m: &str, name: &str, tenant: &str, model: &str, window: &str| {
        metric_sum(
            m,
            name,
            &[("tenant", tenant), ("model", model), ("window", window)],
        )
    };
    let m = gw.metrics().await;
    assert_eq!(
        gauge(&m, "collie_quota_limit", "alpha", "", "day.requests"),
        3.0
    );
    assert_eq!(
        gauge(&m, "collie_quota_used", "alpha", "", "day.requests"),
        0.0
    );
    assert_eq!(
        gauge(&m, "collie_quota_remaining", "alpha", "", "day.requests"),
        3.0
    );
    assert_eq!(gauge(&m, "collie_quota_limit", "alpha", "", "day.usd"), 1.0);
    assert_eq!(
        gauge(&m, "collie_quota_limit", "alpha", "", "minute.requests"),
        1.0
    );
    assert_eq!(
        gauge(&m, "collie_quota_limit", "beta", "gpt", "day.tokens"),
        1000.0
    );
    let send = |mock_status: &'static str| {
        let req = gw
            .chat(small("gpt", 10, false))
            .header("x-mock-status", mock_status);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(send("200").await, 200);
    // A provider 500 before any byte: refunded. A provider 400 passed on:
    // one request, no tokens.
    assert_eq!(send("500").await, 500);
    assert_eq!(send("400").await, 400);
    assert_eq!(send("200").await, 200);
    assert_eq!(send("200").await, 429, "three requests counted");
    settled(&gw, "alpha", ALPHA_KEY, "day.requests").await;
    let m = gw.metrics_after(5).await;
    assert_eq!(
        gauge(&m, "collie_quota_used", "alpha", "", "day.requests"),
        3.0
    );
    assert_eq!(
        gauge(&m, "collie_quota_reserved", "alpha", "", "day.requests"),
        0.0
    );
    assert_eq!(
        gauge(&m, "collie_quota_remaining", "alpha", "", "day.requests"),
        0.0
    );
    assert!(gauge(&m, "collie_quota_used", "alpha", "", "day.usd") > 0.0);
    // Four taken, one refunded; the bucket refills one a minute.
    let drawn = gauge(&m, "collie_quota_used", "alpha", "", "minute.requests");
    assert!((2.5..=3.0).contains(&drawn), "{drawn}");
    let settlements = |outcome| {
        metric_sum(
            &m,
            "collie_quota_settlements_total",
            &[("tenant", "alpha"), ("outcome", outcome)],
        )
    };
    assert_eq!(settlements("reported"), 2.0);
    assert_eq!(settlements("refunded"), 1.0);
    assert_eq!(settlements("failed"), 1.0);
    assert_eq!(
        metric_sum(
            &m,
            "collie_quota_refusals_total",
            &[("tenant", "alpha"), ("window", "day.requests")]
        ),
        1.0
    );
}
