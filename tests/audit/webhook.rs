//! Alerts delivered to the webhook: retried with backoff, then given up.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_sends_the_same_alert_again_with_backoff_until_accepted() {
    let (hook, deliveries) = receiver(2).await;
    let t = rules_trail(json!({"tenant_requests": 2,
        "webhook": {"url": hook, "timeout": "2s", "retries": 3, "backoff": "50ms"}}))
    .await;
    t.send_n(3, Who::Alpha, question(0)).await;
    assert_eq!(
        t.fired_after(3).await,
        vec![fired("request_rate", Some("alpha"))]
    );
    eventually("the alert is accepted", || {
        deliveries.lock().unwrap().len() >= 3
    })
    .await;
    // Once accepted it is not sent again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = deliveries.lock().unwrap().clone();
    assert_eq!(
        got.len(),
        3,
        "two refusals and the accepted attempt: {got:?}"
    );
    assert!(
        got.iter()
            .all(|d| d.id == got[0].id && d.body == got[0].body)
    );
    let alert: Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(
        (alert["rule"].as_str(), alert["tenant"].as_str()),
        (Some("request_rate"), Some("alpha"))
    );
    // Backoff: each retry waits at least twice as long as the one before
    // (50 ms, then 100 ms).
    assert!(got[1].at - got[0].at >= Duration::from_millis(50));
    assert!(got[2].at - got[1].at >= Duration::from_millis(100));
    let m = t.gw.metrics().await;
    assert_eq!(
        metric_sum(&m, "collie_anomaly_webhook_failures_total", &[]),
        0.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "collie_anomalies_total",
            &[("rule", "request_rate"), ("tenant", "alpha")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_gives_up_after_its_retries_and_counts_the_failure() {
    let (hook, deliveries) = receiver(usize::MAX).await;
    let t = rules_trail(json!({"tenant_requests": 2,
        "webhook": {"url": hook, "timeout": "2s", "retries": 2, "backoff": "20ms"}}))
    .await;
    t.send_n(3, Who::Alpha, question(0)).await;
    t.fired_after(3).await;
    let mut failures = 0.0;
    for _ in 0..200 {
        failures = metric_sum(
            &t.gw.metrics().await,
            "collie_anomaly_webhook_failures_total",
            &[],
        );
        if failures > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(failures, 1.0);
    let got = deliveries.lock().unwrap().clone();
    assert_eq!(got.len(), 3, "the first attempt and two retries: {got:?}");
    assert!(got.iter().all(|d| d.id == got[0].id));
}
