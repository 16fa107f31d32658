//! Per-minute rates: token buckets with bursts, tenants' and provider keys'.

use super::*;

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
