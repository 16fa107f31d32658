//! How a pool chooses: least latency, cost, health state; route aliases.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_latency_prefers_the_faster_deployment() {
    let slow = mock_with(Behavior::default().delay(Duration::from_millis(80))).await;
    let fast = mock_with(Behavior::default().delay(Duration::from_millis(5))).await;
    let z = mock().await;
    let off = json!({"probe": "off"});
    let gw = gateway(&pool_config(
        &[
            member("a", &slow).health(off.clone()),
            member("b", &fast).health(off.clone()),
        ],
        |p| p.set("policy", "least_latency"),
        &z,
    ))
    .await;
    let models = served_by(&gw, "m", 100).await;
    let fast_share = models.iter().filter(|m| *m == "model-b").count();
    assert!(fast_share >= 80, "fast deployment got {fast_share} of 100");
    assert!(
        fast_share < 100,
        "the slower one is still measured now and then"
    );
}

/// Least-latency does not keep choosing a deployment that only fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_latency_does_not_prefer_a_failing_deployment() {
    let failing = mock_with(Behavior::default().status(500)).await;
    let ok = mock_with(Behavior::default().delay(Duration::from_millis(20))).await;
    let z = mock().await;
    let live = json!({"probe": "off", "failures_to_open": 1000, "degraded_error_ratio": 1.0});
    let gw = gateway(&pool_config(
        &[
            member("a", &failing).health(live.clone()),
            member("b", &ok).health(live.clone()),
        ],
        |p| p.set("policy", "least_latency").set("retries", 1),
        &z,
    ))
    .await;
    let models = served_by(&gw, "m", 40).await;
    assert!(models.iter().all(|m| m == "model-b"));
    // Tried first while unmeasured, then only by the policy's occasional
    // weighted pick.
    assert!(
        failing.completion_calls() <= 4,
        "the failing deployment was tried {} times in 40",
        failing.completion_calls()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_aware_prefers_the_cheaper_healthy_deployment() {
    let pricey = mock().await;
    let cheap = mock().await;
    let z = mock().await;
    let live = json!({"probe": "off", "failures_to_open": 1, "cooldown": "30s"});
    let gw = gateway(&pool_config(
        &[
            member("a", &pricey).health(live.clone()),
            member("b", &cheap).health(live.clone()),
        ],
        |p| p.set("policy", "cost").set("retries", 1),
        &z,
    ))
    .await;
    assert!(served_by(&gw, "m", 20).await.iter().all(|m| m == "model-b"));
    // The cheap one fails: its breaker opens and the pricier one serves.
    cheap.set_default(Behavior::default().status(503));
    let r = gw.chat(hello("m")).send().await.unwrap();
    assert_eq!(
        r.headers()["x-collie-model"],
        "model-a",
        "retried inside the pool"
    );
    assert_eq!(r.headers()["x-collie-attempts"], "2");
    assert!(served_by(&gw, "m", 5).await.iter().all(|m| m == "model-a"));
}

/// Degraded (slow) members are passed over while a healthy one serves, and
/// tried before the next pool when it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degraded_members_are_tried_after_healthy_ones() {
    let a = mock_with(Behavior::default().delay(Duration::from_millis(150))).await;
    let b = mock().await;
    let z = mock().await;
    let live = json!({"probe": "off", "slow_after": "50ms"});
    let gw = gateway(&pool_config(
        &[
            member("a", &a).health(live.clone()),
            member("b", &b).health(live.clone()),
        ],
        |p| p.set("retries", 1),
        &z,
    ))
    .await;
    // The round robin sends `a` one of the first two requests.
    served_by(&gw, "m", 2).await;
    assert_eq!(a.completion_calls(), 1);
    until(&gw, "a", "state", "degraded").await;
    assert_eq!(deployment(&gw, "b").await["state"], "healthy");
    let models = served_by(&gw, "m", 20).await;
    assert!(models.iter().all(|m| m == "model-b"), "{models:?}");
    assert_eq!(a.completion_calls(), 1);
    // `b` fails: the degraded `a` is next, before the next pool.
    b.set_default(Behavior::default().status(500));
    let r = gw.chat(hello("fb")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-collie-model"], "model-a");
    assert_eq!(r.headers()["x-collie-attempts"], "2");
    assert_eq!(z.completion_calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_aliases_follow_hints_and_priorities() {
    let a = mock().await;
    let b = mock().await;
    let z = mock().await;
    let off = json!({"probe": "off"});
    let routes = json!([
        {"hint": "code", "fallback": ["pa"]},
        {"priorities": [1, 2], "fallback": ["pb"]},
    ]);
    let conf = pool_config(
        &[
            member("a", &a).health(off.clone()),
            member("b", &b).health(off),
        ],
        |p| p,
        &z,
    )
    .model_first(Model::new("best", &["q"]).set("routes", routes))
    .pool_first(Pool::new("pb", &["b"]))
    .pool_first(Pool::new("pa", &["a"]));
    let gw = gateway(&conf).await;
    let ask = |hint: Option<&str>, tenant: &str, key: &str| {
        let mut r = gw.post_as(CHAT, tenant, key).json(&hello("best"));
        if let Some(h) = hint {
            r = r.header("x-collie-route", h);
        }
        r.send()
    };
    let model = |r: reqwest::Response| r.headers()["x-collie-model"].to_str().unwrap().to_string();
    assert_eq!(
        model(ask(Some("code"), "alpha", ALPHA_KEY).await.unwrap()),
        "model-a"
    );
    assert_eq!(
        model(ask(None, "alpha", ALPHA_KEY).await.unwrap()),
        "model-b",
        "priority 1"
    );
    let s = status(&gw).await;
    let best = s["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "best")
        .unwrap();
    assert_eq!(best["routes"][0]["hint"], "code");
    assert_eq!(best["routes"][0]["recommended"], "model-a");
}
