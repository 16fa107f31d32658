//! Tenant quotas over real sockets: exactness under concurrency, settlement,
//! bursts, priority admission and rebalancing.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly"
)]

mod common;

use collie_mock::{Behavior, MockServer};
use common::*;
use futures::StreamExt;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Tenants `alpha` (priority 1) and `beta` (priority 5, every model) with
/// these quotas; model `gpt` → pool `p` (→ mock `a`), and `gpt-fb` falling
/// back from `a` to `b`.
fn config(a: &MockServer, b: &MockServer, alpha_quota: Value, beta_quota: Value) -> Conf {
    Conf::new()
        .tenant(Tenant::alpha().quota(alpha_quota))
        .tenant(Tenant::new("beta", BETA_KEY).priority(5).quota(beta_quota))
        .model(Model::new("gpt", &["p"]))
        .model(Model::new("gpt-fb", &["p", "q"]))
        .pool(Pool::new("p", &["a"]))
        .pool(Pool::new("q", &["b"]))
        .deployment(Deployment::on("a", a, "gpt-a").timeouts(json!({"first_byte": "30s"})))
        .deployment(Deployment::on("b", b, "gpt-b"))
        .price("gpt-a", 1.0, 2.0)
        .price("gpt-b", 10.0, 20.0)
}

/// Pool `p` (mock `a` alone) with one more setting.
fn pool_p(conf: Conf, setting: &str, value: impl Into<Value>) -> Conf {
    conf.edit_pool("p", |p| p.set(setting, value))
}

fn as_beta(gw: &Gw, body: Value) -> reqwest::RequestBuilder {
    gw.post_as(CHAT, "beta", BETA_KEY).json(&body)
}

fn small(model: &str, max_tokens: u64, stream: bool) -> Value {
    json!({"model": model, "max_tokens": max_tokens, "stream": stream,
           "messages": [{"role": "user", "content": "hello there"}]})
}

/// The caller's quota report: (used, reserved) of one window of the tenant scope.
async fn window(gw: &Gw, tenant: &str, key: &str, name: &str) -> (f64, f64) {
    let v: Value = gw
        .get_as("/v1/collie/quota", tenant, key)
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
    let gw = gateway(&config(&a, &b, json!({"requests_per_day": 100}), json!({}))).await;
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
        let gw = gateway(&config(&a, &b, json!({"tokens_per_day": 3000}), json!({}))).await;
        let requests = futures::stream::iter(0..200).map(|i| {
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
        // Requests refused while others held larger reservations may leave
        // room; one at a time, the first refusal means less than one
        // reservation is left.
        for i in 0.. {
            settled(&gw, "alpha", ALPHA_KEY, "day.tokens").await;
            let r = gw.chat(small("gpt", 40, i % 2 == 0)).send().await.unwrap();
            let status = r.status().as_u16();
            r.bytes().await.unwrap();
            if status == 429 {
                break;
            }
        }
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
    let gw = gateway(&config(
        &a,
        &b,
        json!({"tokens_per_day": 100000}),
        json!({}),
    ))
    .await;
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
    let gw = gateway(&config(
        &a,
        &b,
        json!({"tokens_per_day": 100000}),
        json!({}),
    ))
    .await;
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
        json!({"tokens_per_day": 100000, "requests_per_day": 10, "usd_per_day": 1.0}),
        json!({}),
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
    let gw = gateway(&config(&a, &b, json!({"usd_per_day": 1.0}), json!({}))).await;
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
    let gw = gateway(&config(
        &a,
        &b,
        json!({"rpm": 60, "rpm_burst": 5}),
        json!({}),
    ))
    .await;
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
    let quota = json!({"max_wait": "60s", "rebalance": {"enabled": false}});
    let conf = config(&a, &b, json!({}), json!({})).set("quota", quota);
    let gw = Arc::new(gateway(&pool_p(conf, "max_concurrency", 1)).await);
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
        let v = gw.admin_json("/quota").await;
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
/// idle tenant's spare rate, and the loan admits requests its own rate
/// refuses. It is reclaimed when the lender's traffic comes back, while the
/// pool is still busy. Loans show in the tenant's quota, `/status` and the
/// metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalancing_lends_idle_capacity_and_reclaims_it() {
    let a = mock().await;
    let b = mock().await;
    let quota = json!({"max_wait": "30s", "rebalance": {"interval": "100ms", "threshold": 0.8}});
    // alpha refills one request per ten seconds: nothing refills during the
    // test, so only a loan can admit more.
    let conf = config(
        &a,
        &b,
        json!({"rpm": 6, "rpm_burst": 2}),
        json!({"rpm": 600, "rpm_burst": 600}),
    )
    .set("quota", quota);
    let gw = Arc::new(gateway(&pool_p(conf, "max_concurrency", 2)).await);
    let loan = |tenant: &'static str, key: &'static str| {
        let gw = Arc::clone(&gw);
        async move {
            let v: Value = gw
                .get_as("/v1/collie/quota", tenant, key)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["loan_rpm"].as_f64().unwrap()
        }
    };
    let spawn = |req: reqwest::RequestBuilder| {
        tokio::spawn(async move { req.send().await.unwrap().status() })
    };
    // alpha fills the pool with its burst (held for a while)...
    let mut tasks = Vec::new();
    for _ in 0..2 {
        tasks.push(spawn(
            gw.chat(small("gpt", 10, false))
                .header("x-mock-delay-ms", "6000"),
        ));
    }
    eventually("the pool is full", || a.completion_calls() == 2).await;
    // ...and its own rate refuses the next one.
    let r = gw.chat(small("gpt", 10, false)).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-collie-error"), "rate_limited");
    // Within a few ticks the idle beta lends to alpha.
    let mut borrowed = 0.0;
    for _ in 0..200 {
        borrowed = loan("alpha", ALPHA_KEY).await;
        if borrowed > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(borrowed > 0.0, "alpha borrowed capacity");
    assert!(loan("beta", BETA_KEY).await < 0.0, "beta lent it");
    let status = gw.admin_json("/status").await;
    let loans = status["loans"].as_array().unwrap();
    assert!(
        loans
            .iter()
            .any(|l| l["tenant"] == "alpha" && l["rpm"].as_f64().unwrap() > 0.0),
        "{status}"
    );
    assert!(
        loans
            .iter()
            .any(|l| l["tenant"] == "beta" && l["rpm"].as_f64().unwrap() < 0.0)
    );
    // The loan admits what alpha's own rate refused: three more requests
    // get past the ledger and queue for the pool.
    for _ in 0..3 {
        tasks.push(spawn(gw.chat(small("gpt", 10, false))));
    }
    waiting(&gw, 3).await;
    // While beta stays idle the loan stands, tick after tick.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(loan("alpha", ALPHA_KEY).await > 0.0, "the loan stands");
    }
    let m = gw.metrics().await;
    let events = |m: &str, e| {
        metric_sum(
            m,
            "collie_quota_loan_events_total",
            &[("tenant", "alpha"), ("event", e)],
        )
    };
    assert!(events(&m, "borrow") >= 1.0);
    assert_eq!(events(&m, "reclaim"), 0.0);
    // beta's own traffic returns; the pool is as busy as before.
    for _ in 0..3 {
        tasks.push(spawn(as_beta(&gw, small("gpt", 10, false))));
    }
    let mut reclaimed = false;
    for _ in 0..200 {
        if loan("alpha", ALPHA_KEY).await == 0.0 && loan("beta", BETA_KEY).await == 0.0 {
            reclaimed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(reclaimed, "the loan is reclaimed when the lender returns");
    let p = pool(&gw, "p").await;
    assert_eq!(p["inflight"], 2, "the pool has not calmed: {p}");
    assert!(p["waiting"].as_u64().unwrap() >= 3, "{p}");
    assert!(events(&gw.metrics().await, "reclaim") >= 1.0);
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_key_limits_steer_traffic_away() {
    let a = mock().await;
    let b = mock().await;
    let conf = config(&a, &b, json!({}), json!({}))
        .edit_deployment("a", |d| d.unset("timeouts").set("rpm", 3))
        .edit_pool("p", |_| Pool::new("p", &["a", "b"]));
    let gw = gateway(&conf).await;
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
    let gw = gateway(&config(&a, &b, json!({"requests_per_day": 5}), json!({}))).await;
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
    gw.reload(&config(&a, &b, json!({"requests_per_day": 4}), json!({})));
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

/// Wait until a window's `used` satisfies `ok` (settlement runs just after
/// the response).
async fn until_used(gw: &Gw, tenant: &str, key: &str, name: &str, ok: impl Fn(f64) -> bool) {
    for _ in 0..500 {
        if ok(window(gw, tenant, key, name).await.0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{name} never got there: {:?}",
        window(gw, tenant, key, name).await
    );
}

/// The admin listener's `/quota`: every tenant's report and every pool.
async fn admin_quota(gw: &Gw) -> Value {
    gw.admin_json("/quota").await
}

/// One pool's gate as the admin listener shows it.
async fn pool(gw: &Gw, id: &str) -> Value {
    admin_quota(gw).await["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pool"] == id)
        .cloned()
        .unwrap()
}

/// Pin the calendar's clock (day and month windows) to an instant.
fn pin(gw: &Gw, at: &str) {
    gw.running.state.ledger.clock().pin(at.parse().unwrap());
}

/// What Collie estimates for a request body as `reqwest` sends it.
fn estimate(body: &Value, model: &str) -> u64 {
    use collie::quota::estimate::{Family, prompt_tokens};
    prompt_tokens(&serde_json::to_vec(body).unwrap(), Family::for_model(model))
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} in {:?}", r.headers()))
        .to_str()
        .unwrap()
        .to_string()
}

fn retry_after(r: &reqwest::Response) -> u64 {
    header(r, "retry-after").parse().unwrap()
}

/// A client that hangs up while queued for a saturated pool leaves the
/// queue at once, gets its reservation back, and is never sent upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_in_the_queue_leaves_it() {
    let a = mock().await;
    let b = mock().await;
    let conf = config(&a, &b, json!({"requests_per_day": 10}), json!({}));
    let gw = Arc::new(gateway(&pool_p(conf, "max_concurrency", 1)).await);
    let holder = {
        let gw = Arc::clone(&gw);
        tokio::spawn(async move {
            gw.chat(small("gpt", 10, false))
                .header("x-mock-delay-ms", "2000")
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    eventually("the slot is taken", || a.completion_calls() == 1).await;
    let body = serde_json::to_string(&small("gpt", 10, false)).unwrap();
    let tcp = send_raw(gw.running.listen, raw_chat(&body, "").as_bytes()).await;
    waiting(&gw, 1).await;
    assert_eq!(
        window(&gw, "alpha", ALPHA_KEY, "day.requests").await,
        (0.0, 2.0)
    );
    drop(tcp);
    waiting(&gw, 0).await;
    assert!(!holder.is_finished(), "it left before the slot was free");
    for _ in 0..500 {
        if window(&gw, "alpha", ALPHA_KEY, "day.requests").await.1 == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        window(&gw, "alpha", ALPHA_KEY, "day.requests").await,
        (0.0, 1.0),
        "refunded while the other one is still in flight"
    );
    assert_eq!(holder.await.unwrap(), 200);
    assert_eq!(settled(&gw, "alpha", ALPHA_KEY, "day.requests").await, 1.0);
    assert_eq!(a.completion_calls(), 1, "nothing was sent for it");
    assert_eq!(pool(&gw, "p").await["inflight"], 0);
}

/// The client reads a whole JSON answer and leaves before the response
/// ends: the usage it carried is what is settled, not the reservation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_read_before_the_client_left_is_settled() {
    let a = mock_with(
        Behavior::default()
            .chunks(3)
            .trickle(Duration::from_millis(20)),
    )
    .await;
    let b = mock().await;
    let gw = gateway(&config(
        &a,
        &b,
        json!({"tokens_per_day": 100000}),
        json!({}),
    ))
    .await;
    let r = gw.chat(small("gpt", 1000, false)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let mut got = Vec::new();
    let answer: Value = loop {
        got.extend_from_slice(&stream.next().await.unwrap().unwrap());
        if let Ok(v) = serde_json::from_slice::<Value>(got.trim_ascii()) {
            break v;
        }
    };
    drop(stream);
    eventually("collie hangs up on the provider", || a.trickling() == 0).await;
    let reported = answer["usage"]["total_tokens"].as_f64().unwrap();
    assert_eq!(
        settled(&gw, "alpha", ALPHA_KEY, "day.tokens").await,
        reported
    );
    let m = gw.metrics_after(1).await;
    assert_eq!(
        metric_sum(
            &m,
            "collie_quota_settlements_total",
            &[("tenant", "alpha"), ("outcome", "reported")]
        ),
        1.0
    );
}

/// A provider that reports no usage: the ledger settles on Collie's count
/// (a finished stream: prompt estimate plus the tokens counted from its
/// deltas; a JSON answer: the reservation), and the metrics say it was
/// estimated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreported_usage_is_estimated_and_marked() {
    let a = mock_with(Behavior::default().chunks(9).no_usage()).await;
    let b = mock().await;
    let gw = gateway(&config(
        &a,
        &b,
        json!({"tokens_per_day": 100000}),
        json!({}),
    ))
    .await;
    let streamed = small("gpt", 1000, true);
    let text = gw
        .chat(streamed.clone())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.ends_with("data: [DONE]\n\n") && !text.contains("\"usage\":{"));
    // Nine events of "tokN " (5 bytes): 45 bytes, about 12 tokens.
    let stream_tokens = estimate(&streamed, "gpt") + 12;
    assert_eq!(
        settled(&gw, "alpha", ALPHA_KEY, "day.tokens").await,
        stream_tokens as f64,
        "not the 1000-token reservation"
    );
    let whole = small("gpt", 40, false);
    let r = gw.chat(whole.clone()).send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert!(v["usage"].is_null());
    let whole_tokens = estimate(&whole, "gpt") + 40;
    assert_eq!(
        settled(&gw, "alpha", ALPHA_KEY, "day.tokens").await,
        (stream_tokens + whole_tokens) as f64
    );
    // One reported request for comparison.
    a.push(Behavior::default().chunks(2));
    let r = gw.chat(small("gpt", 10, false)).send().await.unwrap();
    let reported: Value = r.json().await.unwrap();
    let m = gw.metrics_after(3).await;
    let tokens = |usage| {
        metric_sum(
            &m,
            "collie_tokens_total",
            &[("tenant", "alpha"), ("model", "gpt"), ("usage", usage)],
        )
    };
    assert_eq!(tokens("estimated"), (stream_tokens + whole_tokens) as f64);
    assert_eq!(
        tokens("reported"),
        reported["usage"]["total_tokens"].as_f64().unwrap()
    );
    assert_eq!(
        metric_sum(&m, "collie_usage_unknown_total", &[("model", "gpt")]),
        2.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "collie_quota_settlements_total",
            &[("tenant", "alpha"), ("outcome", "estimated")]
        ),
        2.0
    );
    assert!(
        metric_sum(
            &m,
            "collie_cost_usd_total",
            &[("tenant", "alpha"), ("usage", "estimated")]
        ) > 0.0,
        "money is counted either way"
    );
}

/// Out of the day's budget and of the minute's rate at once: the answer is
/// the budget, with the wait until the day ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_budget_is_reported_before_an_empty_rate() {
    let a = mock().await;
    let b = mock().await;
    let gw = gateway(&config(
        &a,
        &b,
        json!({"rpm": 60, "rpm_burst": 1, "requests_per_day": 1}),
        json!({}),
    ))
    .await;
    pin(&gw, "2026-05-04T12:00:00Z");
    assert_eq!(
        gw.chat(small("gpt", 10, false))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = gw.chat(small("gpt", 10, false)).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-collie-error"), "quota_exceeded");
    assert_eq!(retry_after(&r), 12 * 3600, "until midnight, not a second");
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("day.requests")
    );
}

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

/// A queued request whose wait runs out is told to retry after the time
/// the requests ahead of it (its own priority before it, and every higher
/// one) would take: with one slot and no slot released yet, one second
/// each — the configuration and the queue decide, not the clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_timeout_retry_after_follows_the_position() {
    let a = mock().await;
    let b = mock().await;
    let quota = json!({"max_wait": "30s", "rebalance": {"enabled": false}});
    let conf = config(&a, &b, json!({}), json!({})).set("quota", quota);
    let gw = Arc::new(gateway(&pool_p(conf, "max_concurrency", 1)).await);
    let send = |tenant: &'static str, wait: &'static str| {
        let gw = Arc::clone(&gw);
        async move {
            let req = if tenant == "beta" {
                as_beta(&gw, small("gpt", 10, false))
            } else {
                gw.chat(small("gpt", 10, false))
            };
            req.header("x-collie-max-wait", wait)
                .header("x-mock-delay-ms", "0")
                .send()
                .await
                .unwrap()
        }
    };
    let holder = tokio::spawn({
        let gw = Arc::clone(&gw);
        async move {
            gw.chat(small("gpt", 10, false))
                .header("x-mock-delay-ms", "4000")
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    eventually("the slot is taken", || a.completion_calls() == 1).await;
    let timed_out = |r: reqwest::Response| {
        assert_eq!(r.status(), 429);
        assert_eq!(header(&r, "x-collie-error"), "queue_timeout");
        retry_after(&r)
    };
    let mut patient = Vec::new();
    // Priority 5, nobody ahead: one second.
    assert_eq!(timed_out(send("beta", "100ms").await), 1);
    // One and then two priority-5 requests ahead.
    for n in 1..=2u64 {
        patient.push(tokio::spawn(send("beta", "30s")));
        waiting(&gw, n).await;
        assert_eq!(timed_out(send("beta", "100ms").await), n + 1);
    }
    // A priority-1 request queues too: ahead of every priority 5.
    patient.push(tokio::spawn(send("alpha", "30s")));
    waiting(&gw, 3).await;
    assert_eq!(timed_out(send("beta", "100ms").await), 4);
    assert_eq!(
        timed_out(send("alpha", "100ms").await),
        2,
        "priority 5 does not count ahead of priority 1"
    );
    assert_eq!(holder.await.unwrap(), 200);
    for p in patient {
        assert_eq!(p.await.unwrap().status(), 200);
    }
}

/// An adaptive pool learns from the provider's `x-ratelimit-*` headers:
/// fewer tokens left than the request needs cuts the budget, little left
/// holds it, plenty lets it grow back to the ceiling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_budget_learns_from_provider_rate_headers() {
    let a = mock().await;
    let b = mock().await;
    let conf = config(&a, &b, json!({}), json!({})).edit_pool("p", |p| {
        p.set("max_concurrency", 4)
            .set("adaptive_concurrency", true)
    });
    let gw = gateway(&conf).await;
    let limit = || async { pool(&gw, "p").await["limit"].as_f64().unwrap() };
    assert_eq!(limit().await, 4.0);
    a.push(
        Behavior::default()
            .header("x-ratelimit-limit-tokens", "1000")
            .header("x-ratelimit-remaining-tokens", "5"),
    );
    let r = gw.chat(small("gpt", 10, false)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        !r.headers().contains_key("x-ratelimit-remaining-tokens"),
        "the provider's own headers are not passed on"
    );
    assert_eq!(limit().await, 1.0, "cut: the next request would not fit");
    a.push(
        Behavior::default()
            .header("x-ratelimit-limit-requests", "100")
            .header("x-ratelimit-remaining-requests", "5"),
    );
    gw.chat(small("gpt", 10, false)).send().await.unwrap();
    assert_eq!(limit().await, 1.0, "held while little is left");
    a.push(
        Behavior::default()
            .header("x-ratelimit-limit-requests", "100")
            .header("x-ratelimit-remaining-requests", "99")
            .header("x-ratelimit-limit-tokens", "1000")
            .header("x-ratelimit-remaining-tokens", "990"),
    );
    let mut seen = vec![limit().await];
    for _ in 0..8 {
        gw.chat(small("gpt", 10, false)).send().await.unwrap();
        seen.push(limit().await);
    }
    assert!(
        seen.windows(2).all(|w| w[1] > w[0] || w[1] == 4.0),
        "{seen:?}"
    );
    assert_eq!(seen.last(), Some(&4.0), "regrown to the ceiling: {seen:?}");
}

/// Limits for one tenant on one model, beside its other models: a day
/// budget and a per-minute rate of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_tenant_per_model_limits() {
    let a = mock().await;
    let b = mock().await;
    let gw = gateway(&config(
        &a,
        &b,
        json!({"models": {"gpt": {"requests_per_day": 1}, "gpt-fb": {"rpm": 60, "rpm_burst": 1}}}),
        json!({}),
    ))
    .await;
    let status = |model: &'static str| {
        let req = gw.chat(small(model, 10, false));
        async move { req.send().await.unwrap() }
    };
    assert_eq!(status("gpt").await.status(), 200);
    let r = status("gpt").await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-collie-error"), "quota_exceeded");
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("model:gpt.day.requests")
    );
    assert_eq!(
        status("gpt-fb").await.status(),
        200,
        "other models are not held"
    );
    let r = status("gpt-fb").await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-collie-error"), "rate_limited");
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("model:gpt-fb.minute.requests")
    );
    // beta shares nothing with alpha.
    assert_eq!(
        as_beta(&gw, small("gpt", 10, false))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let m = gw.metrics_after(5).await;
    assert_eq!(
        metric_sum(
            &m,
            "collie_quota_refusals_total",
            &[("tenant", "alpha"), ("window", "day.requests")]
        ),
        1.0
    );
}

/// A monthly USD budget: spent, it refuses until the month ends (the
/// `Retry-After` says when), and a new month starts afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monthly_usd_budget() {
    let a = mock().await;
    let b = mock().await;
    // gpt-a costs $1/M in, $2/M out: a request reserving ~15 + 20 tokens
    // holds about $0.000055 and costs about $0.000035.
    let gw = gateway(&config(
        &a,
        &b,
        json!({"usd_per_month": 0.00008}),
        json!({}),
    ))
    .await;
    pin(&gw, "2026-01-31T23:00:00Z");
    assert_eq!(
        gw.chat(small("gpt", 20, false))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let spent = settled(&gw, "alpha", ALPHA_KEY, "month.usd").await;
    assert!(spent > 0.0);
    let r = gw.chat(small("gpt", 20, false)).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-collie-error"), "quota_exceeded");
    assert_eq!(retry_after(&r), 3600, "until February");
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("month.usd")
    );
    pin(&gw, "2026-02-01T00:00:01Z");
    assert_eq!(
        gw.chat(small("gpt", 20, false))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(settled(&gw, "alpha", ALPHA_KEY, "month.usd").await < spent * 1.5);
}

/// Day windows follow `quota.timezone`: 15:00 UTC is midnight in Tokyo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_day_ends_at_midnight_in_the_configured_zone() {
    let a = mock().await;
    let b = mock().await;
    let gw = gateway(
        &config(&a, &b, json!({"requests_per_day": 1}), json!({}))
            .set("quota", json!({"timezone": "Asia/Tokyo"})),
    )
    .await;
    pin(&gw, "2026-03-01T14:30:00Z");
    assert_eq!(
        gw.chat(small("gpt", 10, false))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = gw.chat(small("gpt", 10, false)).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(retry_after(&r), 1800, "half an hour to midnight in Tokyo");
    // Still March 1st in UTC, March 2nd in Tokyo.
    pin(&gw, "2026-03-01T15:00:01Z");
    assert_eq!(
        gw.chat(small("gpt", 10, false))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

/// Without `max_tokens` a request reserves the tenant's
/// `default_max_tokens`; a model's `max_output_tokens` caps what a request
/// asks for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_reservation_defaults_and_caps() {
    let a = mock().await;
    let b = mock().await;
    let conf = config(
        &a,
        &b,
        json!({"default_max_tokens": 50, "tokens_per_day": 100000}),
        json!({}),
    )
    .model(Model::new("capped", &["p"]).set("max_output_tokens", 30));
    let gw = Arc::new(gateway(&conf).await);
    let reserved_while_in_flight = |body: Value| {
        let gw = Arc::clone(&gw);
        async move {
            let req = gw.chat(body).header("x-mock-delay-ms", "600");
            let t = tokio::spawn(async move { req.send().await.unwrap().status() });
            let mut reserved = 0.0;
            for _ in 0..500 {
                reserved = window(&gw, "alpha", ALPHA_KEY, "day.tokens").await.1;
                if reserved > 0.0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(t.await.unwrap(), 200);
            settled(&gw, "alpha", ALPHA_KEY, "day.tokens").await;
            reserved
        }
    };
    let no_max = json!({"model": "gpt", "messages": [{"role": "user", "content": "hello there"}]});
    assert_eq!(
        reserved_while_in_flight(no_max.clone()).await,
        (estimate(&no_max, "gpt") + 50) as f64
    );
    let asks_more = small("capped", 1000, false);
    assert_eq!(
        reserved_while_in_flight(asks_more.clone()).await,
        (estimate(&asks_more, "capped") + 30) as f64
    );
}

/// A token bucket with a burst above its rate: an idle tenant spends most
/// of the burst on one request at once; the next is held to the rate until
/// the first settles and gives back what it did not use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_bucket_with_burst() {
    let a = mock().await;
    let b = mock().await;
    let gw = Arc::new(
        gateway(&config(
            &a,
            &b,
            json!({"tpm": 60, "tpm_burst": 100}),
            json!({}),
        ))
        .await,
    );
    // Leave two tokens in the bucket.
    let probe = small("gpt", 0, false);
    let big = small("gpt", 98 - estimate(&probe, "gpt"), false);
    let need = estimate(&big, "gpt") + big["max_tokens"].as_u64().unwrap();
    assert_eq!(need, 98, "{big}");
    let first = {
        let gw = Arc::clone(&gw);
        tokio::spawn(async move {
            gw.chat(big)
                .header("x-mock-delay-ms", "500")
                .send()
                .await
                .unwrap()
        })
    };
    eventually("the first is sent", || a.completion_calls() == 1).await;
    let r = gw.chat(small("gpt", 10, false)).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-collie-error"), "rate_limited");
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), "60");
    assert!(retry_after(&r) >= 5, "held to one token a second");
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("minute.tokens")
    );
    let r = first.await.unwrap();
    assert_eq!(r.status(), 200);
    // The mock used far less than 98: the rest comes back when it settles.
    until_used(&gw, "alpha", ALPHA_KEY, "minute.tokens", |used| used < 50.0).await;
    assert_eq!(
        gw.chat(small("gpt", 10, false))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

/// A deployment's own tokens-per-minute limit: a request that needs the
/// whole bucket takes it from a full one; until it has refilled, the pool's
/// other deployment serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_token_limit_steers_traffic_away() {
    let a = mock().await;
    let b = mock().await;
    let conf = config(&a, &b, json!({}), json!({}))
        .edit_deployment("a", |d| d.unset("timeouts").set("tpm", 100))
        .edit_pool("p", |_| Pool::new("p", &["a", "b"]));
    let gw = gateway(&conf).await;
    for _ in 0..10 {
        let r = gw.chat(small("gpt", 200, false)).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        a.completion_calls(),
        1,
        "one full bucket's worth, then none"
    );
    assert_eq!(b.completion_calls(), 9);
}

/// A provider that reports more than was reserved is charged in full: the
/// day budget counts it, and a token bucket goes into debt it must repay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_above_the_reservation_is_charged() {
    let big = json!({"id": "x", "object": "chat.completion", "created": 1, "model": "gpt-a",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "..."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5000, "total_tokens": 5010}});
    let a = mock_with(Behavior::default().body(serde_json::to_vec(&big).unwrap())).await;
    let b = mock().await;
    let gw = gateway(&config(
        &a,
        &b,
        json!({"tokens_per_day": 6000}),
        json!({"tpm": 60, "tpm_burst": 100}),
    ))
    .await;
    assert_eq!(
        gw.chat(small("gpt", 10, false))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(settled(&gw, "alpha", ALPHA_KEY, "day.tokens").await, 5010.0);
    // 5010 + one small reservation still fits 6000; after it, nothing does.
    assert_eq!(
        gw.chat(small("gpt", 10, false))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        settled(&gw, "alpha", ALPHA_KEY, "day.tokens").await,
        10020.0
    );
    let r = gw.chat(small("gpt", 10, false)).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-collie-error"), "quota_exceeded");
    // beta's bucket of 100 owes ~4900 tokens at one a second.
    assert_eq!(
        as_beta(&gw, small("gpt", 10, false))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    until_used(&gw, "beta", BETA_KEY, "minute.tokens", |used| used > 4000.0).await;
    let r = as_beta(&gw, small("gpt", 10, false)).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-collie-error"), "rate_limited");
    assert!(retry_after(&r) > 4800, "{}", retry_after(&r));
}

/// Under sustained priority-1 load on a saturated pool (more priority-1
/// requests always waiting than the 16:1 stride lets through before a
/// priority-5 turn), priority-5 requests still get their turns and finish
/// with 200 within the configured maximum wait, while priority 1 keeps
/// being served before, between and after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_priority_progresses_under_sustained_high_priority_load() {
    let a = mock_with(Behavior::default().delay(Duration::from_millis(5))).await;
    let b = mock().await;
    let quota = json!({"max_wait": "60s", "rebalance": {"enabled": false}});
    let conf = config(&a, &b, json!({}), json!({})).set("quota", quota);
    let gw = Arc::new(gateway(&pool_p(conf, "max_concurrency", 1)).await);
    let order = Arc::new(Mutex::new(Vec::<&'static str>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..6 {
        let (gw, order, stop) = (Arc::clone(&gw), Arc::clone(&order), Arc::clone(&stop));
        load.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let s = gw
                    .chat(small("gpt", 10, false))
                    .send()
                    .await
                    .unwrap()
                    .status();
                assert_eq!(s, 200);
                order.lock().unwrap().push("alpha");
            }
        }));
    }
    // The load is on: priority-1 requests are queued.
    for _ in 0..500 {
        if pool(&gw, "p").await["waiting"].as_u64().unwrap() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut low = Vec::new();
    for _ in 0..3 {
        let (gw, order) = (Arc::clone(&gw), Arc::clone(&order));
        low.push(tokio::spawn(async move {
            let s = as_beta(&gw, small("gpt", 10, false))
                .send()
                .await
                .unwrap()
                .status();
            order.lock().unwrap().push("beta");
            s
        }));
    }
    for t in low {
        assert_eq!(t.await.unwrap(), 200, "priority 5 is delayed, not starved");
    }
    let served_by_then = order.lock().unwrap().len();
    // The load lasts past the last priority-5 request.
    for _ in 0..500 {
        if order.lock().unwrap().len() >= served_by_then + 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    let betas: Vec<usize> = order
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == "beta")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(betas.len(), 3);
    // Priority 1 was served before the first, between each, and after the last.
    assert!(betas[0] > 0, "{order:?}");
    assert!(betas.windows(2).all(|w| w[1] > w[0] + 1), "{order:?}");
    assert!(*betas.last().unwrap() + 1 < order.len(), "{order:?}");
    assert!(
        a.completion_calls() >= 16 + 3,
        "more priority-1 requests than one stride round"
    );
}

/// A reload that changes a pool's concurrency keeps the requests in flight
/// counted (a fresh gate would admit a whole new budget on top of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_requests_in_flight_at_the_pool() {
    let a = mock().await;
    let b = mock().await;
    let quota = json!({"rebalance": {"enabled": false}});
    let conf = |n: u32| {
        let conf = config(&a, &b, json!({}), json!({})).set("quota", quota.clone());
        pool_p(conf, "max_concurrency", n)
    };
    let gw = Arc::new(gateway(&conf(2)).await);
    let slow = |gw: &Arc<Gw>| {
        let req = gw
            .chat(small("gpt", 10, false))
            .header("x-mock-delay-ms", "1500");
        tokio::spawn(async move { req.send().await.unwrap().status() })
    };
    let mut tasks = vec![slow(&gw), slow(&gw)];
    eventually("two in flight", || a.completion_calls() == 2).await;
    gw.reload(&conf(3));
    assert_eq!(pool(&gw, "p").await["inflight"], 2, "still counted");
    tasks.push(slow(&gw));
    tasks.push(slow(&gw));
    eventually("a third is sent", || a.completion_calls() == 3).await;
    waiting(&gw, 1).await;
    assert_eq!(a.completion_calls(), 3, "the fourth waits for a slot");
    assert_eq!(pool(&gw, "p").await["limit"], 3.0);
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(pool(&gw, "p").await["inflight"], 0);
}

/// A reload that raises a deployment's own per-minute limit keeps what the
/// key already used this minute: the raise is available, not a full bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_what_a_provider_key_used() {
    let a = mock().await;
    let b = mock().await;
    let conf = |rpm: u32| {
        config(&a, &b, json!({}), json!({}))
            .edit_deployment("a", |d| d.unset("timeouts").set("rpm", rpm))
    };
    let gw = gateway(&conf(2)).await;
    let status = || async { gw.chat(small("gpt", 10, false)).send().await.unwrap() };
    for _ in 0..2 {
        assert_eq!(status().await.status(), 200);
    }
    let r = status().await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-collie-error"), "upstream_rate_limited");
    gw.reload(&conf(3));
    assert_eq!(status().await.status(), 200, "one more: 3 in the minute");
    assert_eq!(status().await.status(), 429, "not 3 more");
    assert_eq!(a.completion_calls(), 3);
}

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
