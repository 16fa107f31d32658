//! Anomaly rules fire just over their limits, per tenant and for all.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_rate_fires_per_tenant_and_globally_just_over_its_limits() {
    let t = rules_trail(json!({"window": "1m", "tenant_requests": 5, "global_requests": 8})).await;
    // At the limits, not over them: alpha 5 (its limit), 8 in all.
    for i in 0..5 {
        t.send(Who::Alpha, question(i)).await;
    }
    for i in 5..8 {
        t.send(Who::Beta, question(i)).await;
    }
    assert_eq!(t.fired_after(8).await, vec![]);
    // A ninth request, beta's fourth: over the global limit only.
    t.send(Who::Beta, question(8)).await;
    assert_eq!(t.fired_after(9).await, vec![fired("request_rate", None)]);
    // Alpha's sixth: over alpha's limit (all tenants already fired this window).
    t.send(Who::Alpha, question(9)).await;
    assert_eq!(
        t.fired_after(10).await,
        vec![
            fired("request_rate", None),
            fired("request_rate", Some("alpha"))
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_ratio_fires_per_tenant_and_globally_and_counts_broken_streams() {
    let t =
        rules_trail(json!({"window": "1m", "failure_ratio": 0.5, "failure_min_requests": 4})).await;
    t.send_n(5, Who::Alpha, question(0)).await;
    // Refused by authentication: no tenant is proven, so they count for
    // all tenants only. 4 of 9 failed: under half.
    for _ in 0..4 {
        assert_eq!(t.send(Who::Guesser, question(0)).await, 401);
    }
    assert_eq!(t.fired_after(9).await, vec![]);
    // 5 of 10: half.
    t.send(Who::Guesser, question(0)).await;
    assert_eq!(t.fired_after(10).await, vec![fired("failure_ratio", None)]);
    // Alpha: 5 good, then 3 provider errors and a stream the provider
    // broke off (a 200 head, then nothing): 4 of 9.
    let flaky = json!({"model": "flaky", "messages": []});
    for _ in 0..3 {
        assert_eq!(t.send(Who::Alpha, flaky.clone()).await, 500);
    }
    let stream = json!({"model": "gpt", "stream": true, "messages": []});
    t.a.push(Behavior::default().chunks(10).break_after(2));
    assert_eq!(t.send(Who::Alpha, stream.clone()).await, 200);
    assert_eq!(t.fired_after(14).await, vec![fired("failure_ratio", None)]);
    // One more broken stream: 5 of 10.
    t.a.push(Behavior::default().chunks(10).break_after(2));
    t.send(Who::Alpha, stream).await;
    assert_eq!(
        t.fired_after(15).await,
        vec![
            fired("failure_ratio", None),
            fired("failure_ratio", Some("alpha"))
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hourly_cost_fires_per_tenant_and_globally_just_over_its_limits() {
    // Each request costs $0.001 (1000 prompt tokens at $1 per million).
    let t =
        rules_trail(json!({"tenant_cost_per_hour_usd": 0.003, "global_cost_per_hour_usd": 0.005}))
            .await;
    t.send_n(3, Who::Alpha, question(0)).await;
    t.send_n(2, Who::Beta, question(0)).await;
    let all = until_rows(&t.spec, 5).await;
    assert!(all.iter().all(|s| s.record.cost_nano == Some(1_000_000)));
    // $0.003 for alpha and $0.005 in all: at the limits.
    assert_eq!(t.fired_after(5).await, vec![]);
    t.send(Who::Beta, question(0)).await;
    assert_eq!(t.fired_after(6).await, vec![fired("hourly_cost", None)]);
    t.send(Who::Alpha, question(0)).await;
    assert_eq!(
        t.fired_after(7).await,
        vec![
            fired("hourly_cost", None),
            fired("hourly_cost", Some("alpha"))
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_requests_fire_per_tenant_and_globally_just_over_their_limits() {
    let t = rules_trail(json!({"window": "1m", "repeats": 3, "global_repeats": 4})).await;
    // The same request, however it is laid out (the hash is of canonical JSON).
    let same = json!({"model": "gpt", "messages": [{"role": "user", "content": "again"}]});
    let same_reordered =
        json!({"messages": [{"content": "again", "role": "user"}], "model": "gpt"});
    t.send(Who::Alpha, same.clone()).await;
    t.send(Who::Alpha, same_reordered.clone()).await;
    t.send_n(2, Who::Beta, same.clone()).await;
    // Different requests do not count.
    for i in 0..5 {
        t.send(Who::Alpha, question(i)).await;
    }
    // Four in all (the global limit), two each.
    assert_eq!(t.fired_after(9).await, vec![]);
    t.send(Who::Beta, same.clone()).await;
    assert_eq!(
        t.fired_after(10).await,
        vec![fired("repeated_request", None)]
    );
    // Alpha's third is at its limit; its fourth over it.
    t.send(Who::Alpha, same.clone()).await;
    assert_eq!(t.fired_after(11).await.len(), 1);
    t.send(Who::Alpha, same_reordered).await;
    assert_eq!(
        t.fired_after(12).await,
        vec![
            fired("repeated_request", None),
            fired("repeated_request", Some("alpha"))
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_request_fires_for_one_request_over_the_token_limit() {
    // No cool-down: every firing is delivered (the pipeline's default
    // would merge the second into the first; see `alerts.rs`).
    let t = rules_trail(json!({"tokens_per_request": 1500, "cooldown": "0s"})).await;
    t.a.push(Behavior::default().body(usage_body(1000, 500)));
    t.send(Who::Alpha, question(0)).await;
    assert_eq!(t.fired_after(1).await, vec![]);
    t.a.push(Behavior::default().body(usage_body(1000, 501)));
    t.send(Who::Beta, question(1)).await;
    assert_eq!(
        t.fired_after(2).await,
        vec![fired("large_request", Some("beta"))]
    );
    // One per request: another one fires again.
    t.a.push(Behavior::default().body(usage_body(5000, 0)));
    t.send(Who::Beta, question(2)).await;
    assert_eq!(t.fired_after(3).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_flags_a_spike_after_steady_usage_even_when_silence_follows() {
    // Periods of 400 ms; judged after 5 of history; z of 5. A perfectly
    // steady tenant has no deviation: its floor (a quarter of the mean)
    // lets a period at twice the usual pass (z = 4) and flags 20 times it.
    const PERIOD: i64 = 400;
    let t =
        rules_trail(json!({"zscore": 5, "baseline_interval": "400ms", "baseline_min_history": 5}))
            .await;
    // One request a quarter into each period (the record's time is when
    // the gateway got it). A stall that pushes one into the next period
    // gives a period of 0 and one of 2: still under the limit.
    let next_period = || async {
        let now = now_ms();
        let at = (now / PERIOD + 1) * PERIOD + PERIOD / 4;
        tokio::time::sleep(Duration::from_millis((at - now) as u64)).await;
        at / PERIOD
    };
    for _ in 0..7 {
        next_period().await;
        t.send(Who::Alpha, question(0)).await;
    }
    // Twice the usual.
    next_period().await;
    t.a.push(Behavior::default().body(usage_body(2000, 0)));
    t.send(Who::Alpha, question(0)).await;
    // Twenty times the usual, and then nothing more: the period is judged
    // on the writer's clock.
    let spike = next_period().await;
    t.a.push(Behavior::default().body(usage_body(20_000, 0)));
    t.send(Who::Alpha, question(0)).await;
    let mut anomalies = Vec::new();
    for _ in 0..200 {
        anomalies = blocking(|| {
            t.spec
                .open()
                .unwrap()
                .anomalies_since(i64::MIN, None)
                .unwrap()
        });
        if !anomalies.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rows(&t.spec).len(), 9, "no record came after the spike");
    assert_eq!(anomalies.len(), 1, "{anomalies:?}");
    let a = &anomalies[0];
    assert_eq!(
        (a.rule.as_str(), a.tenant.as_deref()),
        ("baseline_spike", Some("alpha"))
    );
    // The spike's period, not the doubled one (which, had it fired, would
    // have held the rule's one alert of the window).
    // Found when the period ended (and the grace after it passed).
    assert_eq!(a.ts_ms, (spike + 1) * PERIOD, "{a:?}");
    assert!(
        a.detail.contains("tokens per 400ms 20000 is"),
        "{}",
        a.detail
    );
}
