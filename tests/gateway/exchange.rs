//! The upstream exchange over real sockets: rewriting, fallback, Retry-After,
//! failure reporting, weighted selection.

use crate::common::*;
use collie_mock::Behavior;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_body_with_model_last_is_routed_and_rewritten() {
    let a = mock().await;
    let b = mock().await;
    let gw = gateway(&two_step(&a, &b, "5s")).await;
    // The OpenAI SDK writes `model` after `messages`: 2 MiB of prompt first.
    let content = "lorem ipsum ".repeat(2 * 1024 * 1024 / 12);
    let body = format!(
        "{{\"messages\":[{{\"role\":\"user\",\"content\":\"{content}\"}}],\"temperature\":0.2,\"model\":\"gpt\"}}"
    );
    assert!(body.len() > 2 << 20);
    let resp = gw
        .post("/v1/chat/completions?api-version=2024-06-01")
        .header("content-type", "application/json")
        .header("x-custom", "kept")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-collie-model"], "gpt-a");
    assert_eq!(resp.headers()["x-collie-attempts"], "1");
    assert!(
        resp.headers()["x-collie-request-id"]
            .to_str()
            .unwrap()
            .starts_with("req_")
    );
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        answer["model"], "gpt-a",
        "the mock echoes the model it was sent"
    );

    let got = posts(&a);
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(r.path, "/v1/chat/completions?api-version=2024-06-01");
    // Every byte but the model value is the client's.
    let expected = body.replace("\"model\":\"gpt\"", "\"model\":\"gpt-a\"");
    assert_eq!(r.body.len(), expected.len());
    assert!(r.body == expected.as_bytes(), "body rewritten in place");
    assert_eq!(
        recorded_header(r, "authorization").as_deref(),
        Some(format!("Bearer {PROVIDER_KEY_A}").as_str())
    );
    assert_eq!(recorded_header(r, "x-custom").as_deref(), Some("kept"));
    assert_eq!(recorded_header(r, "x-tenant-id"), None);
    assert_eq!(
        recorded_header(r, "content-length"),
        Some(expected.len().to_string())
    );
}

/// Each failure kind moves the request to the next pool, which receives the
/// body rewritten for its own model and its own provider key. The failing
/// provider is reached over a kept-alive connection (a first request warms
/// it), and is contacted exactly once: a failure after the request was sent
/// is an attempt, never silently sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_on_each_failure_kind() {
    let b = mock().await;
    let kinds: Vec<(&str, Behavior)> = vec![
        ("429", Behavior::default().status(429)),
        ("503", Behavior::default().status(503)),
        ("first-byte timeout", Behavior::default().hang()),
        ("reset before the head", Behavior::default().reset()),
    ];
    for (what, behavior) in kinds {
        let a = mock().await;
        let gw = gateway(&two_step(&a, &b, "300ms")).await;
        let warm = gw.chat(hello("gpt")).send().await.unwrap();
        assert_eq!(warm.headers()["x-collie-model"], "gpt-a", "{what}");
        warm.bytes().await.unwrap();
        b.clear();
        a.push(behavior);
        let resp = gw.chat(hello("gpt")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{what}");
        assert_eq!(resp.headers()["x-collie-model"], "gpt-b", "{what}");
        assert_eq!(resp.headers()["x-collie-attempts"], "2", "{what}");
        assert_eq!(
            a.completion_calls(),
            2,
            "{what}: contacted once after the warm-up"
        );
        let got = posts(&b);
        assert_eq!(got.len(), 1, "{what}");
        let sent: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
        assert_eq!(sent["model"], "gpt-b", "{what}");
        assert_eq!(
            recorded_header(&got[0], "authorization").as_deref(),
            Some(format!("Bearer {PROVIDER_KEY_B}").as_str()),
            "{what}"
        );
    }

    // Connection refused: a deployment whose port has nobody listening.
    let dead = format!("http://127.0.0.1:{}/v1", free_port());
    b.clear();
    let conf = two_step(&b, &b, "1s").edit_deployment("a", |d| d.set("base_url", dead));
    let gw = gateway(&conf).await;
    let resp = gw.chat(hello("gpt")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-collie-model"], "gpt-b");
    assert_eq!(
        resp.headers()["x-collie-attempts"],
        "2",
        "the refused attempt counts"
    );
    let got = posts(&b);
    assert_eq!(got.len(), 1);
    let sent: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(sent["model"], "gpt-b");
    assert_eq!(
        recorded_header(&got[0], "authorization").as_deref(),
        Some(format!("Bearer {PROVIDER_KEY_B}").as_str())
    );
}

/// A pooled connection the provider closes as the next request arrives
/// (its idle timeout at the wrong moment) fails while the request is still
/// being written: the provider cannot have acted on it, so it is sent again
/// on a fresh connection to the same deployment and is not an attempt — no
/// fallback, one attempt counted. (A failure after the request was written
/// is an attempt: `falls_back_on_each_failure_kind`.) The body is larger
/// than the socket buffers, so the write is still going when the provider
/// hangs up and the failure is the write's, every run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_written_into_a_closed_pooled_connection_is_sent_again_on_a_fresh_one() {
    let (addr, connections) = closing_provider().await;
    let b = mock().await;
    let conf = two_step(&b, &b, "5s")
        .set("max_body_bytes", "32MiB")
        .edit_deployment("a", |d| {
            d.set("base_url", format!("http://{addr}/v1"))
                .health(json!({"probe": "off"}))
        });
    let gw = gateway(&conf).await;
    let warm = gw.chat(hello("gpt")).send().await.unwrap();
    assert_eq!(warm.status(), 200);
    assert_eq!(warm.headers()["x-collie-model"], "gpt-a");
    warm.bytes().await.unwrap();
    assert_eq!(connections.load(Ordering::SeqCst), 1);

    let content = "lorem ipsum ".repeat(8 * 1024 * 1024 / 12);
    let big = json!({"model": "gpt", "messages": [{"role": "user", "content": content}]});
    let resp = gw.chat(big).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-collie-model"], "gpt-a", "no fallback");
    assert_eq!(resp.headers()["x-collie-attempts"], "1", "not an attempt");
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], "hi");
    assert_eq!(
        connections.load(Ordering::SeqCst),
        2,
        "sent again on a new connection"
    );
    assert_eq!(b.completion_calls(), 0);
    let text = gw.metrics_after(2).await;
    assert_eq!(
        metric_sum(
            &text,
            "collie_upstream_attempts_total",
            &[("deployment", "a")]
        ),
        2.0
    );
    assert_eq!(
        metric_sum(
            &text,
            "collie_upstream_attempts_total",
            &[("deployment", "a"), ("outcome", "served")]
        ),
        2.0
    );
}

/// A 503 with `Retry-After` rests the deployment like a 429 does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_on_a_503_is_honoured() {
    let a = mock().await;
    let b = mock().await;
    a.push(Behavior::default().status(503).retry_after("30"));
    let gw = gateway(&two_step(&a, &b, "5s")).await;
    let first = gw.chat(hello("gpt")).send().await.unwrap();
    assert_eq!(first.headers()["x-collie-model"], "gpt-b");
    for _ in 0..3 {
        let r = gw.chat(hello("gpt")).send().await.unwrap();
        assert_eq!(r.headers()["x-collie-model"], "gpt-b");
        assert_eq!(r.headers()["x-collie-attempts"], "1", "`a` is not tried");
    }
    assert_eq!(a.completion_calls(), 1);
}

/// A client that leaves while the provider is still thinking cancels the
/// attempt: the provider's connection is closed (so it stops generating),
/// no fallback is tried for nobody, and the request is accounted as 499.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_before_the_answer_cancels_the_attempt() {
    let a = mock().await;
    let b = mock().await;
    let gw = gateway(&two_step(&a, &b, "60s")).await;
    a.push(Behavior::default().hang());
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let r = impatient
        .post(gw.url("/v1/chat/completions"))
        .header("x-tenant-id", "alpha")
        .bearer_auth(ALPHA_KEY)
        .json(&hello("gpt"))
        .send()
        .await;
    assert!(r.is_err(), "the client gave up");
    eventually("the provider's connection is closed", || a.abandoned() == 1).await;
    let text = gw.metrics_after(1).await;
    assert_eq!(
        metric_sum(&text, "collie_requests_total", &[("status_class", "4xx")]),
        1.0,
        "{text}"
    );
    assert_eq!(b.completion_calls(), 0, "no fallback for a client who left");
}

/// A provider that quotes its key in an error body must not hand it to the
/// tenant: the key is masked, the rest of the body and its length kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_key_quoted_in_an_error_body_is_masked() {
    let echo = format!(
        r#"{{"error":{{"message":"Incorrect API key provided: {PROVIDER_KEY_A}.","type":"invalid_request_error","code":"invalid_api_key"}}}}"#
    );
    let a = mock().await;
    let b = mock().await;
    let gw = gateway(&two_step(&a, &b, "5s")).await;
    for status in [401, 400] {
        a.push(Behavior::default().status(status).body(echo.clone()));
        let r = gw.chat(hello("gpt")).send().await.unwrap();
        assert_eq!(r.status(), status);
        let text = r.text().await.unwrap();
        assert!(!text.contains(PROVIDER_KEY_A), "{text}");
        assert_eq!(text.len(), echo.len());
        assert!(text.contains("Incorrect API key provided: ****"), "{text}");
    }
}

/// A failed attempt's error body is drained beside the request: the next
/// attempt does not wait for it, and a body that never ends is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_attempt_does_not_wait_for_an_error_body() {
    let a = mock().await;
    let b = mock().await;
    a.push(
        Behavior::default()
            .status(503)
            .trickle(Duration::from_millis(100)),
    );
    let gw = gateway(&two_step(&a, &b, "5s")).await;
    let resp = tokio::time::timeout(Duration::from_secs(30), gw.chat(hello("gpt")).send())
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-collie-model"], "gpt-b");
    assert_eq!(
        a.trickling(),
        1,
        "answered while the failed attempt's body was still coming"
    );
    eventually("the endless body is cut", || a.trickling() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_keeps_traffic_off_a_deployment() {
    let a = mock().await;
    let b = mock().await;
    a.push(Behavior::default().status(429).retry_after("3"));
    let gw = gateway(&two_step(&a, &b, "5s")).await;
    let first = gw.chat(hello("gpt")).send().await.unwrap();
    assert_eq!(first.headers()["x-collie-model"], "gpt-b");
    // Within the window: `a` is skipped without being contacted.
    for _ in 0..3 {
        let r = gw.chat(hello("gpt")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-collie-model"], "gpt-b");
        assert_eq!(r.headers()["x-collie-attempts"], "1");
    }
    assert_eq!(a.completion_calls(), 1);
    // Once it has passed, `a` is first again.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let r = gw.chat(hello("gpt")).send().await.unwrap();
    assert_eq!(r.headers()["x-collie-model"], "gpt-a");
    assert_eq!(a.completion_calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_deployment_waits_the_client_gets_429_with_retry_after() {
    let a = mock_with(Behavior::default().status(429).retry_after("20")).await;
    let gw = gateway(&two_step(&a, &a, "5s")).await;
    let r = gw.chat(hello("gpt")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let secs: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&secs));
    // Now both are blocked: answered without contacting anyone.
    let before = a.completion_calls();
    let r = gw.chat(hello("gpt")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-collie-error"], "upstream_rate_limited");
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(a.completion_calls(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_attempts_failing_names_them() {
    let a = mock_with(Behavior::default().status(500)).await;
    let b = mock_with(Behavior::default().status(502)).await;
    let gw = gateway(&two_step(&a, &b, "5s")).await;
    let r = gw.chat(hello("gpt")).send().await.unwrap();
    assert_eq!(r.status(), 502, "the last upstream status");
    assert_eq!(r.headers()["x-collie-error"], "upstream_failed");
    assert_eq!(r.headers()["x-collie-attempts"], "2");
    let body: serde_json::Value = r.json().await.unwrap();
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("a: HTTP 500") && msg.contains("b: HTTP 502"),
        "{msg}"
    );
    assert!(!msg.contains(PROVIDER_KEY_A) && !msg.contains(PROVIDER_KEY_B));

    // Transport failures: 504 for a timeout as the last failure.
    let c = mock_with(Behavior::default().hang()).await;
    let gw = gateway(&two_step(&a, &c, "200ms")).await;
    let r = gw.chat(hello("gpt")).send().await.unwrap();
    assert_eq!(r.status(), 504);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_from_the_provider_pass_through() {
    let a = mock_with(Behavior::default().status(400)).await;
    let b = mock().await;
    let gw = gateway(&two_step(&a, &b, "5s")).await;
    let r = gw.chat(hello("gpt")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(
        !r.headers().contains_key("x-collie-error"),
        "the provider's own answer"
    );
    assert_eq!(b.completion_calls(), 0, "a 400 is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_over_two_thousand_requests() {
    let a = mock().await;
    let b = mock().await;
    let conf = Conf::two_tenants(&[])
        .model(Model::new("weighted", &["p"]))
        .pool(Pool::weighted("p", &[("a", 3), ("b", 1)]))
        .deployment(Deployment::on("a", &a, "m"))
        .deployment(Deployment::on("b", &b, "m"));
    let gw = gateway(&conf).await;
    let body = json!({"model": "weighted", "messages": []});
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let req = gw.chat(body.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..250 {
                let r = req.try_clone().unwrap().send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (na, nb) = (a.completion_calls() as f64, b.completion_calls() as f64);
    assert_eq!(na + nb, 2000.0);
    let share = na / 2000.0;
    assert!(
        (share - 0.75).abs() <= 0.05,
        "a got {share:.3} of traffic, expected 0.75 ± 0.05"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_url_path_prefix_is_kept() {
    let a = mock().await;
    let b = mock().await;
    let prefixed = a.base_url().replace("/v1", "/openai/deployments/x/v1");
    let conf = two_step(&a, &b, "5s").edit_deployment("a", |d| d.set("base_url", prefixed));
    let gw = gateway(&conf).await;
    let r = gw.chat(hello("gpt")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        posts(&a)[0].path,
        "/openai/deployments/x/v1/chat/completions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_and_responses_are_routed() {
    let a = mock().await;
    let b = mock().await;
    let gw = gateway(&two_step(&a, &b, "5s")).await;
    let r = gw
        .post("/v1/embeddings")
        .json(&json!({"input": ["a", "b"], "model": "embed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(posts(&a)[0].path, "/v1/embeddings");
    let r = gw
        .post("/v1/responses")
        .json(&json!({"input": "hi", "model": "resp"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(posts(&a)[1].path, "/v1/responses");
    let m = gw.metrics_after(2).await;
    assert!(
        metric_sum(
            &m,
            "collie_tokens_total",
            &[("tenant", "alpha"), ("model", "embed"), ("type", "input")]
        ) > 0.0
    );
}

/// Hop-by-hop headers, and those a peer names in its `Connection` header,
/// stay on their hop in both directions; end-to-end ones pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_stay_on_their_hop() {
    let a = mock_with(
        Behavior::default()
            .header("connection", "x-provider-hop")
            .header("x-provider-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("x-provider-e2e", "kept"),
    )
    .await;
    let b = mock().await;
    let gw = gateway(&two_step(&a, &b, "5s")).await;
    let resp = gw
        .chat(hello("gpt"))
        .header("connection", "keep-alive, x-client-hop")
        .header("x-client-hop", "1")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("x-client-e2e", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(
        h.get("x-provider-e2e").map(|v| v.as_bytes()),
        Some(&b"kept"[..])
    );
    for gone in ["x-provider-hop", "keep-alive"] {
        assert!(h.get(gone).is_none(), "{gone} reached the client");
    }
    assert!(
        h.get_all("connection")
            .iter()
            .all(|v| !v.to_str().unwrap().contains("x-provider-hop")),
        "the provider's Connection header reached the client"
    );
    resp.bytes().await.unwrap();
    let got = posts(&a);
    assert_eq!(got.len(), 1);
    assert_eq!(
        recorded_header(&got[0], "x-client-e2e").as_deref(),
        Some("kept")
    );
    for gone in ["x-client-hop", "te", "proxy-authorization", "connection"] {
        assert_eq!(
            recorded_header(&got[0], gone),
            None,
            "{gone} reached the provider"
        );
    }
}

/// `/v1/completions` is routed by `model` like chat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_completions_are_routed() {
    let a = mock().await;
    let b = mock().await;
    let gw = gateway(&two_step(&a, &b, "5s")).await;
    let resp = gw
        .post("/v1/completions")
        .json(&json!({"prompt": "Say hi", "max_tokens": 4, "model": "gpt"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-collie-model"], "gpt-a");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "text_completion");
    let got = posts(&a);
    assert_eq!(got[0].path, "/v1/completions");
    let sent: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(sent["model"], "gpt-a");
}

/// A deployment whose host name does not resolve (DNS down at start, a name
/// not published yet) does not keep the gateway from starting: it fails
/// over like a refused connection until the name resolves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_does_not_resolve_fails_over_instead_of_stopping_the_start() {
    let a = mock().await;
    let b = mock().await;
    let conf = two_step(&a, &b, "5s")
        .edit_deployment("a", |d| d.set("base_url", "http://collie-test.invalid/v1"));
    let gw = gateway(&conf).await;
    for _ in 0..2 {
        let r = gw.chat(hello("gpt")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-collie-model"], "gpt-b");
    }
    let text = gw.metrics_after(2).await;
    assert!(
        metric_sum(
            &text,
            "collie_upstream_attempts_total",
            &[("deployment", "a"), ("outcome", "connect_error")]
        ) >= 1.0,
        "{text}"
    );
}

/// The benchmarks' transport arm (`Policy::TransportOnly`) carries a request
/// as the full gateway does — body rewritten for the deployment, the
/// provider's key, the answer passed back, streams too — with nothing of
/// the policy: no key asked for, nothing counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transport_arm_carries_requests_without_the_policy() {
    use collie::server::Policy;
    let a = mock().await;
    let b = mock().await;
    let conf = two_step(&a, &b, "5s");
    let gw = gateway_with_policy(&conf, &[], Policy::TransportOnly).await;
    let body = hello("gpt").to_string();
    let resp = gw
        .client
        .post(gw.url(CHAT))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "no tenant, no key: still carried");
    assert_eq!(resp.headers()["x-collie-model"], "gpt-a");
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(answer["model"], "gpt-a");
    let got = posts(&a);
    assert_eq!(got.len(), 1);
    assert!(got[0].body == body.replace("\"gpt\"", "\"gpt-a\"").as_bytes());
    assert_eq!(
        recorded_header(&got[0], "authorization").as_deref(),
        Some(format!("Bearer {PROVIDER_KEY_A}").as_str())
    );
    let stream = gw
        .client
        .post(gw.url(CHAT))
        .json(&streamed("gpt"))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let text = stream.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let metrics = gw.metrics().await;
    assert_eq!(metric_sum(&metrics, "collie_requests_total", &[]), 0.0);
    gw.stop().await;

    // The full policy refuses the same request.
    let full = gateway(&conf).await;
    let refused = full
        .client
        .post(full.url(CHAT))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    full.stop().await;
}

/// Without its policy the gateway serves loopback only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transport_arm_refuses_to_listen_beyond_loopback() {
    use collie::server::{Collie, Policy, StartError};
    let (a, b) = (mock().await, mock().await);
    let conf = two_step(&a, &b, "5s");
    let config = load(
        &full_config(
            &conf,
            &format!("0.0.0.0:{}", free_port()),
            &format!("127.0.0.1:{}", free_port()),
        ),
        &[],
    );
    match Collie::build_with(config, None, Policy::TransportOnly) {
        Err(StartError::Unavailable { what, .. }) => assert!(what.contains("0.0.0.0"), "{what}"),
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("a gateway without its policy listened beyond loopback"),
    }
}
