//! Priority-scaled rates: a tenant's per-minute rates (and bursts) times the
//! factor of its priority, as enforced, as reported and in the rate headers;
//! day and month budgets as written.

use super::*;

/// One window of the caller's quota report (tenant scope).
fn window_of(report: &Value, name: &str) -> Value {
    report["scopes"][0]["windows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["window"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no window {name} in {report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rates_scale_by_priority_and_budgets_do_not() {
    let a = mock().await;
    let b = mock().await;
    let limits = json!({"rpm": 6, "rpm_burst": 2, "tpm": 100000, "requests_per_day": 100,
                        "models": {"gpt": {"rpm": 60}}});
    // `{}`: the default factors (×2.0 for priority 1, ×0.5 for priority 5).
    let conf = config(&a, &b, limits.clone(), limits).set("quota", json!({"priority_factors": {}}));
    let gw = gateway(&conf).await;
    for (tenant, key, factor, rpm, burst, tpm) in [
        ("alpha", ALPHA_KEY, 2.0, 12.0, 4, 200000.0),
        ("beta", BETA_KEY, 0.5, 3.0, 1, 50000.0),
    ] {
        let report: Value = gw
            .get_as("/v1/collie/quota", tenant, key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(report["rate_factor"], factor, "{report}");
        assert_eq!(
            window_of(&report, "minute.requests")["limit"],
            rpm,
            "{report}"
        );
        assert_eq!(
            window_of(&report, "minute.tokens")["limit"],
            tpm,
            "{report}"
        );
        // Never the day's budget.
        assert_eq!(
            window_of(&report, "day.requests")["limit"],
            100.0,
            "{report}"
        );
        // The per-model rate is scaled too.
        let model = report["scopes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["model"] == "gpt")
            .unwrap_or_else(|| panic!("no gpt scope in {report}"));
        let model_rpm = model["windows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["window"] == "minute.requests")
            .unwrap()["limit"]
            .clone();
        assert_eq!(model_rpm, 60.0 * factor, "{report}");
        // The scaled burst is what is admitted at once; the scaled rate is
        // what the headers name.
        for i in 0..burst {
            let r = gw
                .chat_as(tenant, key, small("gpt", 10, false))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{tenant}: request {i} of its burst");
            assert_eq!(
                r.headers()["x-ratelimit-limit-requests"],
                (rpm as u64).to_string().as_str()
            );
        }
        let r = gw
            .chat_as(tenant, key, small("gpt", 10, false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 429, "{tenant}: past its burst");
        assert_eq!(r.headers()["x-collie-error"], "rate_limited");
    }
}

/// Factors can be set per priority; one left out keeps its default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn factors_are_configurable() {
    let a = mock().await;
    let b = mock().await;
    let limits = json!({"rpm": 10});
    let conf = config(&a, &b, limits.clone(), limits)
        .set("quota", json!({"priority_factors": {"1": 1.0, "3": 4.0}}));
    let gw = gateway(&conf).await;
    for (tenant, key, factor) in [("alpha", ALPHA_KEY, 1.0), ("beta", BETA_KEY, 0.5)] {
        let r = gw
            .chat_as(tenant, key, small("gpt", 10, false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["x-ratelimit-limit-requests"],
            ((10.0 * factor) as u64).to_string().as_str()
        );
    }
}
