//! Who may call: tenant header plus key, refused before any upstream sees the
//! request; and the request-shape errors (body, model, endpoint).

use crate::common::*;
use serde_json::json;
use tokio::io::AsyncReadExt;

async fn error_code(resp: reqwest::Response) -> (u16, String, Option<String>) {
    let status = resp.status().as_u16();
    let marker = resp
        .headers()
        .get("x-collie-error")
        .map(|v| v.to_str().unwrap().to_string());
    let body: serde_json::Value = resp.json().await.unwrap();
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        body["error"]["message"].is_string(),
        "OpenAI-style error body: {body}"
    );
    (status, code, marker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_never_reach_an_upstream() {
    let a = mock().await;
    let b = mock().await;
    let gw = gateway(&two_step(&a, &b, "5s")).await;
    let url = gw.url(CHAT);
    let body = json!({"model": "gpt", "messages": [{"role": "user", "content": "hi"}]});
    let c = &gw.client;

    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            c.post(&url).bearer_auth(ALPHA_KEY).json(&body),
            401,
            "missing_tenant",
        ),
        (
            c.post(&url).header("x-tenant-id", "alpha").json(&body),
            401,
            "missing_api_key",
        ),
        (
            gw.chat_as("nobody", ALPHA_KEY, body.clone()),
            401,
            "invalid_api_key",
        ),
        (
            gw.chat_as("alpha", "sk-wrong", body.clone()),
            401,
            "invalid_api_key",
        ),
        (
            gw.chat_as("alpha", BETA_KEY, body.clone()),
            403,
            "tenant_mismatch",
        ),
        (
            gw.chat_as("beta", BETA_KEY, body.clone()),
            403,
            "model_not_allowed",
        ),
        (
            c.post(&url)
                .header("x-tenant-id", "alpha")
                .header("authorization", "Basic abc")
                .json(&body),
            401,
            "missing_api_key",
        ),
    ];
    for (i, (req, status, code)) in cases.into_iter().enumerate() {
        let (s, c, marker) = error_code(req.send().await.unwrap()).await;
        assert_eq!((s, c.as_str()), (status, code), "case {i}");
        assert_eq!(
            marker.as_deref(),
            Some(code),
            "case {i}: x-collie-error marks Collie's own errors"
        );
    }
    assert_eq!(
        a.completion_calls() + b.completion_calls(),
        0,
        "no upstream contact before admission"
    );

    // The `api-key` header is accepted too, also beside an `Authorization`
    // of another scheme.
    for authorization in [None, Some("Basic abc")] {
        let mut req = c
            .post(&url)
            .header("x-tenant-id", "alpha")
            .header("api-key", ALPHA_KEY);
        if let Some(v) = authorization {
            req = req.header("authorization", v);
        }
        let ok = req.json(&body).send().await.unwrap();
        assert_eq!(ok.status(), 200, "{authorization:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_get_clear_errors() {
    let a = mock().await;
    let b = mock().await;
    let gw = gateway(&two_step(&a, &b, "5s").set("max_body_bytes", 4096)).await;
    let send = |body: &'static str| {
        gw.post(CHAT)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for (body, status, code) in [
        ("{\"model\": ", 400, "invalid_body"),
        ("[]", 400, "invalid_body"),
        ("{\"messages\": []}", 400, "invalid_body"),
        ("{\"model\": 7}", 400, "invalid_body"),
        (
            "{\"model\": \"gpt\", \"model\": \"other\"}",
            400,
            "invalid_body",
        ),
        ("{\"model\": \"gpt-9\"}", 404, "model_not_found"),
    ] {
        let (s, c, _) = error_code(send(body).await.unwrap()).await;
        assert_eq!((s, c.as_str()), (status, code), "body {body}");
    }
    // Larger than max_body_bytes, sent chunked (no Content-Length).
    let big = format!("{{\"model\":\"gpt\",\"x\":\"{}\"}}", "y".repeat(8000));
    let stream = futures::stream::iter(vec![Ok::<_, std::io::Error>(big.into_bytes())]);
    let resp = gw
        .post(CHAT)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    let (s, c, _) = error_code(resp).await;
    assert_eq!((s, c.as_str()), (413, "request_too_large"));
    assert_eq!(a.completion_calls() + b.completion_calls(), 0);
}

/// A declared Content-Length over the limit is refused before the body is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_length_over_limit_is_refused_without_reading() {
    let a = mock().await;
    let b = mock().await;
    let gw = gateway(&two_step(&a, &b, "5s").set("max_body_bytes", 1024)).await;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-tenant-id: alpha\r\nauthorization: Bearer {ALPHA_KEY}\r\ncontent-type: application/json\r\ncontent-length: 50000000\r\n\r\n"
    );
    let mut s = send_raw(gw.running.listen, head.as_bytes()).await;
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("request_too_large"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_and_methods() {
    let a = mock().await;
    let b = mock().await;
    let gw = gateway(&two_step(&a, &b, "5s")).await;
    let resp = gw
        .post("/v1/images/generations")
        .json(&json!({"model": "gpt"}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await.1, "unknown_url");
    let resp = gw.get_as(CHAT, "alpha", ALPHA_KEY).send().await.unwrap();
    assert_eq!(error_code(resp).await.0, 405);

    // /v1/models answers from config with only the tenant's models.
    let list: serde_json::Value = gw
        .get_as("/v1/models", "beta", BETA_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["other"]);
    let resp = gw.client.get(gw.url("/v1/models")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(a.completion_calls() + b.completion_calls(), 0);
}
