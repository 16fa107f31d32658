//! The request deadline: it cuts a waiting attempt and starts no new one.

use super::*;

/// The request deadline caps an attempt's wait for the response head, even
/// when the deployment's own first-byte timeout is longer, and the client
/// gets an OpenAI-style 504. A cut attempt is not held against the
/// deployment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_deadline_cuts_a_waiting_attempt() {
    let a = mock_with(Behavior::default().hang()).await;
    let z = mock().await;
    let conf = pool_config(
        &[member("a", &a).health(json!({"probe": "off"}))],
        |p| p,
        &z,
    )
    .set("request_deadline", "300ms");
    let gw = gateway(&conf).await;
    let r = gw.chat(hello("m")).send().await.unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(r.headers()["x-collie-error"], "deadline_exceeded");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "deadline_exceeded");
    assert_eq!(v["error"]["type"], "upstream_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("deadline"));
    assert_eq!(a.completion_calls(), 1);
    let m = gw.metrics_after(1).await;
    assert_eq!(
        metric_sum(
            &m,
            "collie_upstream_attempts_total",
            &[("deployment", "a"), ("outcome", "deadline")]
        ),
        1.0
    );
    let d = deployment(&gw, "a").await;
    assert_eq!(d["breaker"], "closed");
    assert_eq!(d["error_ratio"], Value::Null, "no outcome recorded");
}

/// No attempt starts once the deadline has passed, even if it passed during
/// the backoff before a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_attempt_starts_after_the_deadline() {
    let a = mock_with(Behavior::default().status(500)).await;
    let b = mock().await;
    let z = mock().await;
    let off = json!({"probe": "off"});
    // A backoff drawn from up to an hour: the deadline passes during it.
    let conf = pool_config(
        &[
            member("a", &a).health(off.clone()),
            member("b", &b).health(off),
        ],
        |p| p.set("policy", "cost").set("retries", 1),
        &z,
    )
    .set("request_deadline", "200ms")
    .set("retry", json!({"backoff": "1h", "max_backoff": "1h"}))
    .price("model-a", 0.1, 0.1);
    let gw = gateway(&conf).await;
    let r = gw.chat(hello("fb")).send().await.unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(r.headers()["x-collie-error"], "deadline_exceeded");
    assert_eq!(a.completion_calls(), 1);
    assert_eq!(b.completion_calls(), 0, "no attempt after the deadline");
    assert_eq!(z.completion_calls(), 0);
}

/// A half-open breaker's one trial, cut by the request deadline, gives its
/// slot back: the next request is the trial, not a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trial_cut_by_the_deadline_frees_the_trial_slot() {
    let a = mock_with(Behavior::default().status(500)).await;
    let z = mock().await;
    let live = json!({"probe": "off", "failures_to_open": 1, "cooldown": "200ms"});
    let conf =
        pool_config(&[member("a", &a).health(live)], |p| p, &z).set("request_deadline", "400ms");
    let gw = gateway(&conf).await;
    assert_eq!(gw.chat(hello("m")).send().await.unwrap().status(), 500);
    until(&gw, "a", "breaker", "open").await;
    a.set_default(Behavior::default().hang());
    until(&gw, "a", "breaker", "half_open").await;
    let r = gw.chat(hello("m")).send().await.unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(a.completion_calls(), 2, "the trial went out");
    assert_eq!(deployment(&gw, "a").await["breaker"], "half_open");
    a.set_default(Behavior::default());
    let r = gw.chat(hello("m")).send().await.unwrap();
    assert_eq!(r.status(), 200, "the slot was given back");
    assert_eq!(a.completion_calls(), 3);
    until(&gw, "a", "breaker", "closed").await;
}
