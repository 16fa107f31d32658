//! Tenant quotas over real sockets: exactness under concurrency, settlement,
//! bursts, priority admission and rebalancing.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly"
)]

mod common;

use collie::gateway::key_digest_hex;
use collie::mock::{Behavior, MockServer};
use common::*;
use futures::StreamExt;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Tenants `alpha` (priority 1) and `beta` (priority 5) with the given quota
/// blocks, one model `gpt` → pool `p` (→ mock `a`), and `gpt-fb` falling back
/// from `a` to `b`.
fn config(
    a: &MockServer,
    b: &MockServer,
    alpha_quota: &str,
    beta_quota: &str,
    extra: &str,
) -> String {
    format!(
        "{extra}
tenants:
  - id: alpha
    api_keys: [\"{ka}\"]
    models: [\"*\"]
    priority: 1
    quota: {alpha_quota}
  - id: beta
    api_keys: [\"{kb}\"]
    models: [\"*\"]
    priority: 5
    quota: {beta_quota}
models:
  - {{name: gpt, fallback: [p]}}
  - {{name: gpt-fb, fallback: [p, q]}}
pools:
  - id: p
    deployments: [{{deployment: a}}]
  - id: q
    deployments: [{{deployment: b}}]
deployments:
  - {{id: a, base_url: \"{}\", model: gpt-a, timeouts: {{first_byte: 30s}}}}
  - {{id: b, base_url: \"{}\", model: gpt-b}}
pricing:
  gpt-a: {{input_per_mtok: 1.0, output_per_mtok: 2.0}}
  gpt-b: {{input_per_mtok: 10.0, output_per_mtok: 20.0}}
",
        a.base_url(),
        b.base_url(),
        ka = key_digest_hex(ALPHA_KEY),
        kb = key_digest_hex(BETA_KEY),
    )
}

fn as_beta(gw: &Gw, body: Value) -> reqwest::RequestBuilder {
    gw.client
        .post(gw.url("/v1/chat/completions"))
        .header("x-tenant-id", "beta")
        .bearer_auth(BETA_KEY)
        .json(&body)
}

fn small(model: &str, max_tokens: u64, stream: bool) -> Value {
    json!({"model": model, "max_tokens": max_tokens, "stream": stream,
           "messages": [{"role": "user", "content": "hello there"}]})
}

/// The caller's quota report: (used, reserved) of one window of the tenant scope.
async fn window(gw: &Gw, tenant: &str, key: &str, name: &str) -> (f64, f64) {
    let v: Value = gw
        .client
        .get(gw.url("/v1/collie/quota"))
        .header("x-tenant-id", tenant)
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let w = v["scopes"][0]["windows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["window"] == name)
        .unwrap_or_else(|| panic!("no window {name} in {v}"));
    (w["used"].as_f64().unwrap(), w["reserved"].as_f64().unwrap())
}

/// Settlement runs in the logging phase, just after the response: wait until
/// nothing is reserved any more.
async fn settled(gw: &Gw, tenant: &str, key: &str, name: &str) -> f64 {
    for _ in 0..500 {
        let (used, reserved) = window(gw, tenant, key, name).await;
        if reserved == 0.0 {
            return used;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{name} never settled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_the_daily_request_limit_is_admitted_under_concurrency() {
    let a = mock().await;
    let b = mock().await;
    let gw = gateway(&config(&a, &b, "{requests_per_day: 100}", "{}", "")).await;
    let ok = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let body = small("gpt", 10, false);
    let requests = futures::stream::iter(0..500).map(|_| {
        let req = gw.chat(body.clone());
        let (ok, refused) = (Arc::clone(&ok), Arc::clone(&refused));
        async move {
            let r = req.send().await.unwrap();
            match r.status().as_u16() {
                200 => ok.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
                429 => {
                    assert_eq!(r.headers()["x-collie-error"], "quota_exceeded");
                    let v: Value = r.json().await.unwrap();
                    assert_eq!(v["error"]["type"], "quota_exceeded");
                    assert!(
                        v["error"]["message"]
                            .as_str()
                            .unwrap()
                            .contains("day.requests")
                    );
                    refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                }
                s => panic!("unexpected status {s}"),
            };
        }
    });
    requests.buffer_unordered(200).collect::<Vec<()>>().await;
    assert_eq!(ok.load(std::sync::atomic::Ordering::SeqCst), 100);
    assert_eq!(refused.load(std::sync::atomic::Ordering::SeqCst), 400);
    assert_eq!(a.completion_calls(), 100);
    assert_eq!(
        settled(&gw, "alpha", ALPHA_KEY, "day.requests").await,
        100.0
    );
}

/// Mixed streamed and non-streamed traffic against a token budget: the final
/// use never passes the budget by more than one request's reservation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_budget_holds_with_mixed_traffic() {
    for run in 0..3 {
        // Each request uses less than it reserves (10 of 40 output tokens).
        let a = mock_with(Behavior::default().chunks(10)).await;
        let b = mock().await;
        let budget = 3000.0;
        let gw = gateway(&config(&a, &b, "{tokens_per_day: 3000}", "{}", "")).await;
        let requests = futures::stream::iter(0..120).map(|i| {
            let req = gw.chat(small("gpt", 40, i % 2 == 0));
            async move {
                let r = req.send().await.unwrap();
                let status = r.status().as_u16();
                r.bytes().await.unwrap();
                status
            }
        });
        let statuses: Vec<u16> = requests.buffer_unordered(50).collect().await;
        assert!(statuses.iter().all(|s| [200, 429].contains(s)));
        assert!(statuses.contains(&429), "the budget was reached");
        let used = settled(&gw, "alpha", ALPHA_KEY, "day.tokens").await;
        // One reservation: the prompt estimate (~15) plus max_tokens (40).
        let one_reservation = 80.0;
        println!("token budget run {run}: used {used} of {budget}");
        assert!(used <= budget + one_reservation, "run {run}: used {used}");
        assert!(
            used >= budget - one_reservation,
            "run {run}: the budget was used, {used}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_usage_is_settled_exactly_as_reported() {
    let a = mock_with(Behavior::default().chunks(9)).await;
    let b = mock().await;
    let gw = gateway(&config(&a, &b, "{tokens_per_day: 100000}", "{}", "")).await;
    let r = gw.chat(small("gpt", 500, true)).send().await.unwrap();
    let text = r.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    let sent = posts(&a)[0].body.len() as f64;
    // The mock reports ceil(body/4) prompt tokens and one per chunk.
    let expected = (sent / 4.0).ceil() + 9.0;
    assert_eq!(
        settled(&gw, "alpha", ALPHA_KEY, "day.tokens").await,
        expected
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_settles_what_was_delivered() {
    let a = mock_with(
        Behavior::default()
            .chunks(500)
            .interval(Duration::from_millis(20)),
    )
    .await;
    let b = mock().await;
    let gw = gateway(&config(&a, &b, "{tokens_per_day: 100000}", "{}", "")).await;
    let r = gw.chat(small("gpt", 1000, true)).send().await.unwrap();
    let mut stream = r.bytes_stream();
    let mut content_events = 0;
    while let Some(chunk) = stream.next().await {
        content_events += String::from_utf8_lossy(&chunk.unwrap())
            .matches("\"content\":\"tok")
            .count();
        if content_events >= 5 {
            break;
        }
    }
    drop(stream);
    eventually("the upstream stream is cancelled", || {
        a.stream_cancellations() == 1
    })
    .await;
    let used = settled(&gw, "alpha", ALPHA_KEY, "day.tokens").await;
    // Prompt estimate (about 15) plus the handful of tokens delivered, far
    // below the 1000-token reservation.
    assert!((10.0..100.0).contains(&used), "used {used}");
    let m = gw.metrics_after(1).await;
    assert_eq!(
        metric_sum(&m, "collie_usage_estimated_total", &[("tenant", "alpha")]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_before_the_first_byte_refunds_everything() {
    let a = mock_with(Behavior::default().status(500)).await;
    let b = mock_with(Behavior::default().status(503)).await;
    let gw = gateway(&config(
        &a,
        &b,
        "{tokens_per_day: 100000, requests_per_day: 10, usd_per_day: 1.0}",
        "{}",
        "",
    ))
    .await;
    let r = gw.chat(small("gpt-fb", 100, false)).send().await.unwrap();
    assert_eq!(r.status(), 503);
    for w in ["day.requests", "day.tokens", "day.usd"] {
        assert_eq!(settled(&gw, "alpha", ALPHA_KEY, w).await, 0.0, "{w}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_is_billed_at_the_served_models_price() {
    let a = mock_with(Behavior::default().status(429)).await;
    let b = mock_with(Behavior::default().chunks(7)).await;
    let gw = gateway(&config(&a, &b, "{usd_per_day: 1.0}", "{}", "")).await;
    let r = gw.chat(small("gpt-fb", 100, false)).send().await.unwrap();
    assert_eq!(r.headers()["x-collie-model"], "gpt-b");
    let v: Value = r.json().await.unwrap();
    let (p, c) = (
        v["usage"]["prompt_tokens"].as_f64().unwrap(),
        v["usage"]["completion_tokens"].as_f64().unwrap(),
    );
    // gpt-b: $10 / $20 per million tokens, rounded up to the nanodollar.
    let expected = (p * 10_000.0 + c * 20_000.0) / 1e9;
    let used = settled(&gw, "alpha", ALPHA_KEY, "day.usd").await;
    assert!(
        (used - expected).abs() < 1e-9,
        "used {used}, expected {expected}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_then_refill_rate_with_rate_headers() {
    let a = mock().await;
    let b = mock().await;
    let gw = gateway(&config(&a, &b, "{rpm: 60, rpm_burst: 5}", "{}", "")).await;
    for i in 0..5 {
        let r = gw.chat(small("gpt", 10, false)).send().await.unwrap();
        assert_eq!(r.status(), 200, "burst request {i}");
        // The configured rate; the burst shows in what remains.
        assert_eq!(r.headers()["x-ratelimit-limit-requests"], "60");
        assert_eq!(
            r.headers()["x-ratelimit-remaining-requests"],
            (4 - i).to_string().as_str()
        );
    }
    let r = gw.chat(small("gpt", 10, false)).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-collie-error"], "rate_limited");
    assert_eq!(r.headers()["retry-after"], "1");
    assert!(r.headers().contains_key("x-ratelimit-reset-requests"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limited");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("minute.requests")
    );
    // Held to the refill rate: one more per second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        gw.chat(small("gpt", 10, false))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        gw.chat(small("gpt", 10, false))
            .send()
            .await
            .unwrap()
            .status(),
        429
    );
    assert_eq!(a.completion_calls(), 6);
}

/// With the pool saturated, priority-1 requests overtake priority-5 ones that
/// queued earlier, and the priority-5 ones still finish (no starvation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_admission_orders_the_queue_without_starving() {
    let a = mock_with(Behavior::default().delay(Duration::from_millis(60))).await;
    let b = mock().await;
    let extra = "quota: {max_wait: 60s, rebalance: {enabled: false}}";
    let yaml = config(&a, &b, "{}", "{}", extra).replace(
        "deployments: [{deployment: a}]",
        "deployments: [{deployment: a}]\n    max_concurrency: 1",
    );
    let gw = Arc::new(gateway(&yaml).await);
    let order = Arc::new(Mutex::new(Vec::new()));
    // Hold the only slot.
    let blocker = {
        let gw = Arc::clone(&gw);
        tokio::spawn(async move {
            gw.chat(small("gpt", 10, false))
                .header("x-mock-delay-ms", "700")
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    eventually("the slot is taken", || a.completion_calls() == 1).await;
    let mut tasks = Vec::new();
    let launch = |tenant: &'static str, n: usize, tasks: &mut Vec<tokio::task::JoinHandle<u16>>| {
        for i in 0..n {
            let gw = Arc::clone(&gw);
            let order = Arc::clone(&order);
            tasks.push(tokio::spawn(async move {
                let req = if tenant == "beta" {
                    as_beta(&gw, small("gpt", 10, false))
                } else {
                    gw.chat(small("gpt", 10, false))
                };
                let status = req.send().await.unwrap().status().as_u16();
                order.lock().unwrap().push((tenant, i));
                status
            }));
        }
    };
    launch("beta", 3, &mut tasks);
    waiting(&gw, 3).await;
    launch("alpha", 12, &mut tasks);
    waiting(&gw, 15).await;
    assert_eq!(blocker.await.unwrap(), 200);
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200, "every request completes");
    }
    let order = order.lock().unwrap().clone();
    let first_beta = order.iter().position(|(t, _)| *t == "beta").unwrap();
    assert_eq!(first_beta, 12, "all priority-1 requests first: {order:?}");
    // A priority-5 request whose wait would run out is told when to retry.
    let gw2 = Arc::clone(&gw);
    let hold = tokio::spawn(async move {
        gw2.chat(small("gpt", 10, false))
            .header("x-mock-delay-ms", "800")
            .send()
            .await
            .unwrap()
    });
    eventually("the slot is taken again", || a.completion_calls() == 17).await;
    let r = as_beta(&gw, small("gpt", 10, false))
        .header("x-collie-max-wait", "100ms")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-collie-error"], "queue_timeout");
    assert!(
        r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    hold.await.unwrap();
}

/// Wait until `n` requests are queued at the gateway's pools (admin status).
async fn waiting(gw: &Gw, n: u64) {
    for _ in 0..500 {
        let v: Value = gw
            .client
            .get(format!("{}/quota", gw.admin))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let queued: u64 = v["pools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["waiting"].as_u64().unwrap())
            .sum();
        if queued == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never {n} requests queued");
}

/// A busy pool: the high-priority tenant pressing on its rate borrows the
/// idle tenant's spare rate; it is reclaimed when the lender comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalancing_lends_idle_capacity_and_reclaims_it() {
    let a = mock_with(Behavior::default().delay(Duration::from_millis(1500))).await;
    let b = mock().await;
    let extra = "quota: {max_wait: 30s, rebalance: {interval: 100ms, threshold: 0.8}}";
    let yaml = config(
        &a,
        &b,
        "{rpm: 60, rpm_burst: 2}",
        "{rpm: 40, rpm_burst: 40}",
        extra,
    )
    .replace(
        "deployments: [{deployment: a}]",
        "deployments: [{deployment: a}]\n    max_concurrency: 2",
    );
    let gw = Arc::new(gateway(&yaml).await);
    let loan = |gw: Arc<Gw>, tenant: &'static str, key: &'static str| async move {
        let v: Value = gw
            .client
            .get(gw.url("/v1/collie/quota"))
            .header("x-tenant-id", tenant)
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["loan_rpm"].as_f64().unwrap()
    };
    // alpha fills the pool with its burst, then is refused by its own rate.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let gw = Arc::clone(&gw);
        slow.push(tokio::spawn(async move {
            gw.chat(small("gpt", 10, false))
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    eventually("the pool is full", || a.completion_calls() == 2).await;
    let r = gw.chat(small("gpt", 10, false)).send().await.unwrap();
    assert_eq!(r.status(), 429);
    // Within a few ticks the idle beta lends to alpha.
    let mut borrowed = 0.0;
    for _ in 0..100 {
        borrowed = loan(Arc::clone(&gw), "alpha", ALPHA_KEY).await;
        if borrowed > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(borrowed > 0.0, "alpha borrowed capacity");
    assert!(
        loan(Arc::clone(&gw), "beta", BETA_KEY).await < 0.0,
        "beta lent it"
    );
    let m = gw.metrics().await;
    assert!(
        metric_sum(
            &m,
            "collie_quota_loan_events_total",
            &[("tenant", "alpha"), ("event", "borrow")]
        ) >= 1.0
    );
    // beta's own traffic returns (while the pool stays busy): the loan ends.
    let mut beta = Vec::new();
    for _ in 0..12 {
        let gw = Arc::clone(&gw);
        beta.push(tokio::spawn(async move {
            as_beta(&gw, small("gpt", 10, false))
                .header("x-mock-delay-ms", "0")
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    let mut reclaimed = false;
    for _ in 0..100 {
        if loan(Arc::clone(&gw), "alpha", ALPHA_KEY).await == 0.0
            && loan(Arc::clone(&gw), "beta", BETA_KEY).await == 0.0
        {
            reclaimed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reclaimed, "the loan is reclaimed when the lender returns");
    let m = gw.metrics().await;
    assert!(
        metric_sum(
            &m,
            "collie_quota_loan_events_total",
            &[("tenant", "alpha"), ("event", "reclaim")]
        ) >= 1.0
    );
    for t in slow.into_iter().chain(beta) {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_key_limits_steer_traffic_away() {
    let a = mock().await;
    let b = mock().await;
    let yaml = config(&a, &b, "{}", "{}", "")
        .replace(
            "model: gpt-a, timeouts: {first_byte: 30s}",
            "model: gpt-a, rpm: 3",
        )
        .replace(
            "deployments: [{deployment: a}]",
            "deployments: [{deployment: a}, {deployment: b}]",
        );
    let gw = gateway(&yaml).await;
    for _ in 0..20 {
        assert_eq!(
            gw.chat(small("gpt", 10, false))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    assert_eq!(a.completion_calls(), 3, "never past the key's own limit");
    assert_eq!(b.completion_calls(), 17);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_what_was_counted() {
    let a = mock().await;
    let b = mock().await;
    let gw = gateway(&config(&a, &b, "{requests_per_day: 5}", "{}", "")).await;
    for _ in 0..3 {
        assert_eq!(
            gw.chat(small("gpt", 10, false))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    settled(&gw, "alpha", ALPHA_KEY, "day.requests").await;
    // Same tenants, lower limit: the three already count.
    let text = format!(
        "listen: {}\nadmin_listen: {}\n{}",
        gw.running.listen,
        gw.running.admin_listen,
        config(&a, &b, "{requests_per_day: 4}", "{}", "")
    );
    let env = provider_env();
    let c = collie::config::Config::from_yaml(&text, &|n| env.get(n).cloned()).unwrap();
    gw.running.state.reload(c).unwrap();
    assert_eq!(
        gw.chat(small("gpt", 10, false))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        gw.chat(small("gpt", 10, false))
            .send()
            .await
            .unwrap()
            .status(),
        429
    );
}
