//! Breakers open, half-open for one trial and close; `Retry-After` opens
//! one; with every member down, panic mode answers at once.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_half_opens_for_exactly_one_trial_and_closes() {
    let a = mock_with(Behavior::default().status(500)).await;
    let z = mock().await;
    let live_only = json!({"probe": "off", "failures_to_open": 3, "cooldown": "400ms"});
    let gw = gateway(&pool_config(
        &[member("a", &a).health(live_only.clone())],
        |p| p,
        &z,
    ))
    .await;
    for _ in 0..3 {
        let r = gw.chat(hello("fb")).send().await.unwrap();
        assert_eq!(r.headers()["x-collie-model"], "model-z");
    }
    until(&gw, "a", "breaker", "open").await;
    // While open, `a` gets nothing.
    served_by(&gw, "fb", 5).await;
    assert_eq!(a.completion_calls(), 3);
    // After the cooldown: one trial only, even with requests in parallel.
    a.set_default(Behavior::default().delay(Duration::from_millis(400)));
    tokio::time::sleep(Duration::from_millis(450)).await;
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let req = gw.chat(hello("fb"));
        tasks.push(tokio::spawn(async move {
            req.send().await.unwrap().headers()["x-collie-model"]
                .to_str()
                .unwrap()
                .to_string()
        }));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut to_a = 0;
    for t in tasks {
        if t.await.unwrap() == "model-a" {
            to_a += 1;
        }
    }
    assert_eq!(to_a, 1, "half-open admits exactly one request");
    assert_eq!(a.completion_calls(), 4);
    until(&gw, "a", "breaker", "closed").await;
    let m = gw.metrics().await;
    assert!(
        metric_sum(
            &m,
            "collie_breaker_transitions_total",
            &[("deployment", "a"), ("to", "open")]
        ) >= 1.0
    );
    assert!(
        metric_sum(
            &m,
            "collie_breaker_transitions_total",
            &[("deployment", "a"), ("to", "closed")]
        ) >= 1.0
    );
    // The cooldown's end is a transition too, logged and counted once.
    assert_eq!(
        metric_sum(
            &m,
            "collie_breaker_transitions_total",
            &[("deployment", "a"), ("to", "half_open")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_seven_keeps_traffic_away_for_seven_seconds() {
    let a = mock().await;
    let z = mock().await;
    a.push(Behavior::default().status(429).retry_after("7"));
    let gw = gateway(&pool_config(
        &[member("a", &a).health(json!({"probe": "off"}))],
        |p| p,
        &z,
    ))
    .await;
    let r = gw.chat(hello("fb")).send().await.unwrap();
    assert_eq!(r.headers()["x-collie-model"], "model-z");
    let d = deployment(&gw, "a").await;
    assert_eq!(d["breaker"], "open");
    let left = d["breaker_open_for_ms"].as_u64().unwrap();
    assert!((6000..=7000).contains(&left), "open for {left} ms");
    // Through the window: nothing reaches `a`.
    for _ in 0..6 {
        served_by(&gw, "fb", 2).await;
        assert_eq!(a.completion_calls(), 1);
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(served_by(&gw, "fb", 1).await, vec!["model-a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_unhealthy_answers_at_once_then_recovers() {
    let a = mock_with(Behavior::default().status(500)).await;
    let z = mock().await;
    let live = json!({"probe": "off", "failures_to_open": 1, "cooldown": "500ms"});
    let gw = gateway(&pool_config(
        &[member("a", &a).health(live.clone())],
        |p| p,
        &z,
    ))
    .await;
    let r = gw.chat(hello("m")).send().await.unwrap();
    assert_eq!(r.status(), 500);
    until(&gw, "a", "breaker", "open").await;
    // Panic mode: every deployment of the chain is unhealthy.
    let started = std::time::Instant::now();
    let r = gw.chat(hello("m")).send().await.unwrap();
    let took = started.elapsed();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-collie-error"], "no_healthy_upstream");
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(a.completion_calls(), 1, "answered without an upstream call");
    println!("panic-mode answer in {took:?}");
    // The provider recovers: after the cooldown one trial goes through and
    // closes the breaker.
    a.set_default(Behavior::default());
    tokio::time::sleep(Duration::from_millis(550)).await;
    let r = gw.chat(hello("m")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    until(&gw, "a", "breaker", "closed").await;
}

/// Panic mode with a concurrency limit: while the pool's one slot is held,
/// a request for a chain whose every member is unhealthy is answered 503
/// without queueing for the slot and without calling the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_mode_answers_without_queueing() {
    let a = mock().await;
    let z = mock().await;
    let probes =
        json!({"interval": "100ms", "timeout": "1s", "unhealthy_after": 1, "cooldown": "30s"});
    let conf = pool_config(
        &[member("a", &a)
            .health(probes)
            .timeouts(json!({"connect": "500ms", "first_byte": "60s"}))],
        |p| p.set("max_concurrency", 1),
        &z,
    );
    let gw = gateway(&conf).await;
    until(&gw, "a", "state", "healthy").await;
    // One slow request holds the pool's only slot throughout.
    a.push(Behavior::default().delay(Duration::from_secs(30)));
    let slow = tokio::spawn(gw.chat(hello("m")).send());
    eventually("the slow request reached a", || a.completion_calls() == 1).await;
    // Meanwhile the probes find `a` failing: the whole chain is unhealthy.
    a.set_default(Behavior::default().status(500));
    until(&gw, "a", "breaker", "open").await;
    let r = gw.chat(hello("m")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-collie-error"], "no_healthy_upstream");
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(a.completion_calls(), 1, "no upstream contact");
    let m = gw.metrics_after(1).await;
    assert_eq!(
        metric_sum(&m, "collie_queue_wait_seconds_count", &[]),
        0.0,
        "never queued for the slot"
    );
    assert!(!slow.is_finished(), "the slot was held all along");
    slow.abort();
}
