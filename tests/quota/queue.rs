//! A saturated pool's queue: priority order without starvation, timeouts
//! with their `Retry-After`, clients that leave, reloads, adaptive limits.

use super::*;

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
    // A slot is given back just after its response went out: wait for it.
    for _ in 0..500 {
        if pool(&gw, "p").await["inflight"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(pool(&gw, "p").await["inflight"], 0);
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
