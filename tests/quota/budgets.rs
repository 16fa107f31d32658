//! Budgets per day and month, in requests, tokens and USD: exact under
//! concurrency, per model, in the configured time zone, kept over a reload.

use super::*;

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
