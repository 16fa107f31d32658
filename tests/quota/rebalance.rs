//! Idle capacity lent to a busy tenant and reclaimed.

use super::*;

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
