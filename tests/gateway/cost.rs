//! `x-collie-cost-usd`: what a non-streamed answer cost, in the head, exactly
//! what the ledger charged; never on a stream, nor where the cost is unknown.

use crate::common::*;
use collie_mock::Behavior;
use serde_json::{Value, json};
use std::time::Duration;

/// The USD the tenant's day window has charged, once nothing is reserved.
async fn charged_today(gw: &Gw) -> f64 {
    for _ in 0..500 {
        let v: Value = gw
            .get_as("/v1/collie/quota", "alpha", ALPHA_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let w = v["scopes"][0]["windows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["window"] == "day.usd")
            .cloned()
            .unwrap_or_else(|| panic!("no day.usd window in {v}"));
        if w["reserved"].as_f64() == Some(0.0) {
            return w["used"].as_f64().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the day's USD never settled");
}

fn priced(a: &collie_mock::MockServer, b: &collie_mock::MockServer) -> Conf {
    two_step(a, b, "5s").edit_tenant("alpha", |t| t.quota(json!({"usd_per_day": 100.0})))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_streamed_answer_says_what_it_cost_exactly() {
    let a = mock_with(Behavior::default().chunks(7)).await;
    let b = mock().await;
    let gw = gateway(&priced(&a, &b)).await;
    let r = gw.chat(hello("gpt")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let header = r.headers()["x-collie-cost-usd"]
        .to_str()
        .unwrap()
        .to_string();
    let v: Value = r.json().await.unwrap();
    let (p, c) = (
        v["usage"]["prompt_tokens"].as_u64().unwrap(),
        v["usage"]["completion_tokens"].as_u64().unwrap(),
    );
    assert_eq!(c, 7);
    // gpt-a: $1 / $2 per million tokens = 1000 / 2000 nanodollars a token.
    let nano = p * 1000 + c * 2000;
    assert_eq!(header, format!("0.{nano:09}"));
    let charged = charged_today(&gw).await;
    assert!(
        (charged - header.parse::<f64>().unwrap()).abs() < 1e-12,
        "charged {charged}, header {header}"
    );
    // Embeddings too.
    let r = gw
        .post("/v1/embeddings")
        .json(&json!({"model": "embed", "input": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let header = r.headers()["x-collie-cost-usd"]
        .to_str()
        .unwrap()
        .to_string();
    let v: Value = r.json().await.unwrap();
    let p = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(header, format!("0.{:09}", p * 1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cost_header_where_the_cost_is_not_known_before_the_head() {
    let a = mock().await;
    let b = mock().await;
    let gw = gateway(&priced(&a, &b)).await;
    // A stream: its head goes out before its usage exists.
    let r = gw.chat(streamed("gpt")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-collie-cost-usd").is_none());
    assert!(r.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    // No usage reported: the charge is an estimate, not a cost.
    a.push(Behavior::default().no_usage());
    let r = gw.chat(hello("gpt")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-collie-cost-usd").is_none());
    // An error passed through costs nothing to name.
    a.push(Behavior::default().status(400));
    let r = gw.chat(hello("gpt")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.headers().get("x-collie-cost-usd").is_none());

    // No price for the deployment that served.
    let unpriced = Conf::new()
        .tenant(Tenant::alpha())
        .model(Model::new("gpt", &["p"]))
        .pool(Pool::new("p", &["a"]))
        .deployment(Deployment::on("a", &a, "gpt-a"));
    let gw = gateway(&unpriced).await;
    let r = gw.chat(hello("gpt")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-collie-cost-usd").is_none());
}

/// A body larger than what is held back for the header passes through
/// whole, without it; a JSON answer followed by a body that never ends
/// gets its cost at once and is charged what the header said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_answers_are_bounded_and_complete_documents_go_out_at_once() {
    let a = mock().await;
    let b = mock().await;
    let gw = gateway(&priced(&a, &b)).await;
    let filler = "x".repeat(5 << 20);
    let big = format!(
        r#"{{"id":"big","object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"{filler}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}}}"#
    );
    a.push(Behavior::default().body(big.clone()));
    let r = gw.chat(hello("gpt")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-collie-cost-usd").is_none());
    assert_eq!(r.text().await.unwrap(), big);
    // Still charged exactly from the usage at its end.
    // 3 × 1000 + 4 × 2000 nanodollars.
    assert!((charged_today(&gw).await - 11e-6).abs() < 1e-12);

    a.push(
        Behavior::default()
            .chunks(3)
            .trickle(Duration::from_millis(20)),
    );
    let r = gw.chat(hello("gpt")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let header = r.headers()["x-collie-cost-usd"]
        .to_str()
        .unwrap()
        .to_string();
    let mut stream = r.bytes_stream();
    let mut got = Vec::new();
    let answer: Value = loop {
        use futures::StreamExt;
        got.extend_from_slice(&stream.next().await.unwrap().unwrap());
        if let Ok(v) = serde_json::from_slice::<Value>(got.trim_ascii()) {
            break v;
        }
    };
    drop(stream);
    let (p, c) = (
        answer["usage"]["prompt_tokens"].as_u64().unwrap(),
        answer["usage"]["completion_tokens"].as_u64().unwrap(),
    );
    assert_eq!(header, format!("0.{:09}", p * 1000 + c * 2000));
    eventually("collie hangs up on the provider", || a.trickling() == 0).await;
    let charged = charged_today(&gw).await - 11e-6;
    assert!(
        (charged - header.parse::<f64>().unwrap()).abs() < 1e-12,
        "charged {charged}, header {header}"
    );
}
