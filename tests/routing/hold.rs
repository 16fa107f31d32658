//! Riding out an outage (`hold_when_down`): while every deployment of a
//! model is down, its requests wait instead of getting 503 at once, and go
//! out when one comes back — by a probe, or by a trial — in priority order;
//! bounded by the hold, the client's wait headers and `max_held_requests`.

use super::*;

/// Model `gpt` (held up to `hold`) → pool `p` → deployment `a`.
fn held_config(a: &MockServer, hold: &str, health: Value) -> Conf {
    Conf::two_tenants(&["gpt"])
        .model(Model::new("gpt", &["p"]).set("hold_when_down", hold))
        .pool(Pool::new("p", &["a"]))
        .deployment(member("a", a).health(health))
}

/// Probes every 100 ms; one failure takes `a` out, one pass brings it back.
fn probed() -> Value {
    json!({"interval": "100ms", "timeout": "300ms", "healthy_after": 1,
           "unhealthy_after": 1, "cooldown": "1h", "max_cooldown": "1h"})
}

/// Wait until `n` requests are held.
async fn holding(gw: &Gw, n: u64) {
    for _ in 0..500 {
        if metric_sum(&gw.metrics().await, "collie_held_requests", &[]) == n as f64 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never {n} requests held");
}

fn said(who: &str) -> Value {
    json!({"model": "gpt", "messages": [{"role": "user", "content": format!("from {who}")}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_goes_out_when_a_probe_brings_the_provider_back() {
    let a = mock().await;
    let gw = gateway(&held_config(&a, "30s", probed())).await;
    until(&gw, "a", "state", "healthy").await;
    // The provider goes down; its probes say so.
    a.set_default(Behavior::default().status(503));
    until(&gw, "a", "state", "unhealthy").await;
    let client = gw.client.clone();
    let url = gw.url(CHAT);
    let request = tokio::spawn(async move {
        client
            .post(url)
            .header("x-tenant-id", "alpha")
            .bearer_auth(ALPHA_KEY)
            .json(&said("alpha"))
            .send()
            .await
            .unwrap()
    });
    holding(&gw, 1).await;
    assert!(posts(&a).is_empty(), "nothing is sent while it is down");
    // Down for a while yet.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // It comes back: the next probe passes and the request goes out.
    a.set_default(Behavior::default());
    let r = request.await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-collie-attempts"], "1");
    assert_eq!(posts(&a).len(), 1);
    holding(&gw, 0).await;
    // Its latency average is the answer's, not the outage's.
    let mut ewma = None;
    for _ in 0..500 {
        ewma = deployment(&gw, "a").await["latency_ewma_ms"].as_f64();
        if ewma.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ewma = ewma.expect("a's latency is measured");
    assert!(ewma < 500.0, "the time held counted as latency: {ewma} ms");
}

/// With probes off, the breaker's trial brings a deployment back: the
/// held request of the highest priority takes it, and the others go once
/// it succeeded — priority 1 before priority 5, whatever their arrival.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trial_brings_it_back_and_held_requests_go_in_priority_order() {
    let a = mock().await;
    let health = json!({"probe": "off", "failures_to_open": 1, "cooldown": "2s"});
    let gw = gateway(&held_config(&a, "30s", health)).await;
    // One failure opens the breaker (that request is answered at once).
    a.push(Behavior::default().status(500));
    let r = gw.chat(said("nobody")).send().await.unwrap();
    assert_eq!(r.status(), 500);
    until(&gw, "a", "breaker", "open").await;
    let send = |tenant: &'static str, key: &'static str| {
        let client = gw.client.clone();
        let url = gw.url(CHAT);
        tokio::spawn(async move {
            client
                .post(url)
                .header("x-tenant-id", tenant)
                .bearer_auth(key)
                .json(&said(tenant))
                .send()
                .await
                .unwrap()
        })
    };
    // Priority 5 first, then priority 1.
    let beta = send("beta", BETA_KEY);
    holding(&gw, 1).await;
    let alpha = send("alpha", ALPHA_KEY);
    holding(&gw, 2).await;
    let (alpha, beta) = (alpha.await.unwrap(), beta.await.unwrap());
    assert_eq!(
        (alpha.status().as_u16(), beta.status().as_u16()),
        (200, 200)
    );
    let sent: Vec<String> = posts(&a)
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    assert_eq!(sent.len(), 3);
    assert!(sent[1].contains("from alpha"), "{sent:?}");
    assert!(sent[2].contains("from beta"), "{sent:?}");
}

/// The hold is bounded: beyond `max_held_requests` a request gets 503 at
/// once, and a held one gets it when its hold (here cut short by the
/// client's `x-collie-max-wait`) ends — with a Retry-After both times, and
/// nothing sent to the provider. A client that leaves while held leaves
/// the line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_are_bounded_by_the_cap_and_the_wait() {
    let a = mock().await;
    let conf = held_config(&a, "30s", probed()).set("max_held_requests", 1);
    let gw = gateway(&conf).await;
    until(&gw, "a", "state", "healthy").await;
    a.set_default(Behavior::default().status(503));
    until(&gw, "a", "state", "unhealthy").await;
    let client = gw.client.clone();
    let url = gw.url(CHAT);
    let first = tokio::spawn(async move {
        client
            .post(url)
            .header("x-tenant-id", "alpha")
            .bearer_auth(ALPHA_KEY)
            .header("x-collie-max-wait", "500ms")
            .json(&said("alpha"))
            .send()
            .await
            .unwrap()
    });
    holding(&gw, 1).await;
    for r in [
        gw.chat(said("alpha")).send().await.unwrap(),
        first.await.unwrap(),
    ] {
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["x-collie-error"], "no_healthy_upstream");
        assert!(r.headers().contains_key("retry-after"));
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "no_healthy_upstream");
    }
    assert!(posts(&a).is_empty());
    holding(&gw, 0).await;
    // A client that leaves while held leaves the line, and makes room.
    let client = reqwest::Client::new();
    let url = gw.url(CHAT);
    let leaving = tokio::spawn(async move {
        client
            .post(url)
            .header("x-tenant-id", "alpha")
            .bearer_auth(ALPHA_KEY)
            .json(&said("alpha"))
            .send()
            .await
    });
    holding(&gw, 1).await;
    leaving.abort();
    holding(&gw, 0).await;
    assert!(posts(&a).is_empty());
}
