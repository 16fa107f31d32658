//! What a request is charged once it ends: reported usage, what was
//! delivered, a refund, an estimate, the served model's price.

use super::*;

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
    // Three chat requests counted (the quota pages read meanwhile are
    // requests too, so a plain count of 3 could come before the third).
    let mut m = gw.metrics().await;
    for _ in 0..500 {
        if metric_sum(&m, "collie_requests_total", &[("model", "gpt")]) >= 3.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        m = gw.metrics().await;
    }
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
