//! Retries inside a pool before the next one, and their backoff.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_inside_a_pool_before_the_next_pool() {
    let a = mock_with(Behavior::default().status(500)).await;
    let b = mock_with(Behavior::default().status(502)).await;
    let c = mock().await;
    let z = mock().await;
    let off = json!({"probe": "off"});
    let conf = pool_config(
        &[
            member("a", &a).health(off.clone()),
            member("b", &b).health(off.clone()),
            member("c", &c).health(off),
        ],
        |p| p.set("retries", 2),
        &z,
    )
    .set("retry", json!({"backoff": "10ms", "max_backoff": "50ms"}));
    let gw = gateway(&conf).await;
    let r = gw.chat(hello("fb")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-collie-model"], "model-c");
    assert_eq!(r.headers()["x-collie-attempts"], "3");
    assert_eq!(z.completion_calls(), 0, "the pool's own members first");
}

/// The backoff before a retry comes before the next member is chosen:
/// nothing that choice takes (here: the member's one request of its
/// provider's per-minute limit) is held while the request sleeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backoff_holds_nothing_of_the_next_member() {
    let a = mock_with(Behavior::default().status(500)).await;
    let b = mock().await;
    let z = mock().await;
    let off = json!({"probe": "off"});
    // `a` is cheaper, so tried first; the backoff lasts past the deadline.
    let conf = pool_config(
        &[
            member("a", &a).health(off.clone()),
            member("b", &b).set("rpm", 1).health(off),
        ],
        |p| p.set("policy", "cost").set("retries", 1),
        &z,
    )
    .set("request_deadline", "3s")
    .set("retry", json!({"backoff": "1000h", "max_backoff": "1000h"}))
    .price("model-a", 0.1, 0.1)
    .model_first(Model::new("bonly", &["pb"]))
    .pool_first(Pool::new("pb", &["b"]));
    let gw = gateway(&conf).await;
    let first = tokio::spawn(gw.chat(hello("m")).send());
    eventually("the first request failed on a", || {
        a.completion_calls() == 1
    })
    .await;
    // While the first request backs off, `b`'s one request a minute is
    // still free for another request.
    let r = gw.chat(hello("bonly")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-collie-model"], "model-b");
    let r = first.await.unwrap().unwrap();
    assert_eq!(r.status(), 504, "the deadline passed during the backoff");
    assert_eq!(b.completion_calls(), 1);
}
