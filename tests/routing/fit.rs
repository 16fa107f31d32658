//! Selection by what the request needs: deployments whose context window
//! cannot hold the prompt estimate and output allowance, whose worst-case
//! cost passes the client's `x-collie-max-cost-usd`, or whose average
//! latency passes its `x-collie-latency-budget-ms`, are skipped; when none
//! is left the client gets an OpenAI-style error and nothing is sent.

use super::*;

/// Model `gpt` tries pool `pa` (deployment `a`, a 100-token window) then
/// `pb` (`b`, 100000 tokens); `rev` tries `b` then `a`; `solo` is `b` only,
/// and its window comes from the model (`b`'s own is for the others).
/// `a` costs $1/$2 per million tokens, `b` ten times that.
fn fit_config(a: &MockServer, b: &MockServer) -> Conf {
    Conf::new()
        .tenant(Tenant::alpha())
        .model(Model::new("gpt", &["pa", "pb"]))
        .model(Model::new("rev", &["pb", "pa"]))
        .model(Model::new("solo", &["pc"]).set("context_window", 50))
        .pool(Pool::new("pa", &["a"]))
        .pool(Pool::new("pb", &["b"]))
        .pool(Pool::new("pc", &["c"]))
        .deployment(Deployment::on("a", a, "gpt-a").set("context_window", 100))
        .deployment(Deployment::on("b", b, "gpt-b").set("context_window", 100_000))
        .deployment(Deployment::on("c", b, "gpt-b"))
        .price("gpt-a", 1.0, 2.0)
        .price("gpt-b", 10.0, 20.0)
}

fn chat(model: &str, content: &str, max_tokens: u64) -> Value {
    json!({"model": model, "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": content}]})
}

async fn error_of(r: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(r.status(), status);
    assert_eq!(r.headers()["x-collie-error"], code);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], code, "{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_too_small_for_the_request_are_skipped() {
    let a = mock().await;
    let b = mock().await;
    let gw = gateway(&fit_config(&a, &b)).await;
    // A few tokens and a small allowance fit `a`.
    let r = gw.chat(chat("gpt", "hello", 10)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-collie-model"], "gpt-a");
    // About 500 prompt tokens do not: `b` serves, `a` never hears of it.
    let long = "lorem ipsum dolor ".repeat(120);
    let r = gw.chat(chat("gpt", &long, 10)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-collie-model"], "gpt-b");
    assert_eq!(r.headers()["x-collie-attempts"], "1");
    // Nor does a large output allowance on a small prompt.
    let r = gw.chat(chat("gpt", "hello", 500)).send().await.unwrap();
    assert_eq!(r.headers()["x-collie-model"], "gpt-b");
    assert_eq!(posts(&a).len(), 1);
    assert_eq!(posts(&b).len(), 2);
    // Nothing holds it: 400 in OpenAI's shape, nothing sent upstream.
    let v = error_of(
        gw.chat(chat("gpt", "hello", 200_000)).send().await.unwrap(),
        400,
        "context_length_exceeded",
    )
    .await;
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["param"], "messages");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("maximum context length is 100000 tokens"),
        "{message}"
    );
    // The model's window, for a deployment without its own.
    error_of(
        gw.chat(chat("solo", "hello", 100)).send().await.unwrap(),
        400,
        "context_length_exceeded",
    )
    .await;
    assert_eq!(
        gw.chat(chat("solo", "hello", 10))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(posts(&a).len(), 1);
    assert_eq!(posts(&b).len(), 3);
    // Counted as the client errors they are.
    let m = gw.metrics_after(6).await;
    assert_eq!(
        metric_sum(&m, "collie_requests_total", &[("status_class", "4xx")]),
        2.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cost_ceiling_skips_deployments_that_could_cost_more() {
    let a = mock().await;
    let b = mock().await;
    // Windows large enough for everything here.
    let conf = fit_config(&a, &b).edit_deployment("a", |d| d.unset("context_window"));
    let gw = gateway(&conf).await;
    // At most ~2000 tokens: up to ~0.002 USD on `a`, ~0.02 on `b`.
    let body = chat("rev", "hello", 1000);
    let r = gw.chat(body.clone()).send().await.unwrap();
    assert_eq!(r.headers()["x-collie-model"], "gpt-b");
    let r = gw
        .chat(body.clone())
        .header("x-collie-max-cost-usd", "0.01")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-collie-model"], "gpt-a");
    assert_eq!(r.headers()["x-collie-attempts"], "1");
    let v = error_of(
        gw.chat(body.clone())
            .header("x-collie-max-cost-usd", "0.0001")
            .send()
            .await
            .unwrap(),
        400,
        "cost_ceiling_exceeded",
    )
    .await;
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("0.000100000 USD"), "{message}");
    assert!(
        message.contains("the cheapest could cost up to 0.002"),
        "{message}"
    );
    assert_eq!((posts(&a).len(), posts(&b).len()), (1, 1));
}

/// Wait until deployment `id` has a latency average (recorded just after
/// the response).
async fn measured(gw: &Gw, id: &str) {
    for _ in 0..500 {
        let v = gw.admin_json("/status").await;
        let d = v["deployments"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .cloned()
            .unwrap();
        if d["latency_ewma_ms"].as_f64().is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{id} never measured");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latency_budget_skips_deployments_slower_on_average() {
    let a = mock().await;
    let b = mock_with(Behavior::default().delay(Duration::from_millis(300))).await;
    // Windows large enough for everything here.
    let conf = fit_config(&a, &b).edit_deployment("a", |d| d.unset("context_window"));
    let gw = gateway(&conf).await;
    // Before `b` has served anything it has no average: it is tried.
    let r = gw
        .chat(hello("rev"))
        .header("x-collie-latency-budget-ms", "100")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-collie-model"], "gpt-b");
    // Its average is now at least its 300 ms delay.
    measured(&gw, "b").await;
    let r = gw
        .chat(hello("rev"))
        .header("x-collie-latency-budget-ms", "100")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-collie-model"], "gpt-a");
    // Within a generous budget, `b` again.
    let r = gw
        .chat(hello("rev"))
        .header("x-collie-latency-budget-ms", "3600000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-collie-model"], "gpt-b");
    // Nothing fast enough: 503, nothing sent.
    let r = gw.chat(chat("solo", "hello", 10)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    measured(&gw, "c").await;
    let before = posts(&b).len();
    let v = error_of(
        gw.chat(chat("solo", "hello", 10))
            .header("x-collie-latency-budget-ms", "100")
            .send()
            .await
            .unwrap(),
        503,
        "latency_budget_exceeded",
    )
    .await;
    assert_eq!(v["error"]["type"], "server_error");
    assert_eq!(posts(&b).len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_budget_headers_are_refused() {
    let a = mock().await;
    let b = mock().await;
    let gw = gateway(&fit_config(&a, &b)).await;
    for (name, value) in [
        ("x-collie-max-cost-usd", "-1"),
        ("x-collie-max-cost-usd", "1e-3"),
        ("x-collie-max-cost-usd", "0.0000000001"),
        ("x-collie-max-cost-usd", "cheap"),
        ("x-collie-latency-budget-ms", "0"),
        ("x-collie-latency-budget-ms", "1.5"),
        ("x-collie-latency-budget-ms", "99999999999999999999999"),
    ] {
        let v = error_of(
            gw.chat(hello("gpt"))
                .header(name, value)
                .send()
                .await
                .unwrap(),
            400,
            "invalid_header",
        )
        .await;
        assert_eq!(v["error"]["param"], name, "{value}: {v}");
    }
    let r = gw
        .chat(hello("gpt"))
        .header("x-collie-max-cost-usd", "1")
        .header("x-collie-max-cost-usd", "2")
        .send()
        .await
        .unwrap();
    error_of(r, 400, "invalid_header").await;
    assert_eq!(posts(&a).len() + posts(&b).len(), 0);
}
