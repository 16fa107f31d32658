//! Streams over real sockets: byte-exact pass-through, usage from the stream,
//! the usage chunk Collie asks for and hides, breaks and disconnects.

use crate::common::*;
use collie_mock::Behavior;
use futures::StreamExt;
use serde_json::json;
use std::time::Duration;

/// What the mock sends for a request body when asked directly.
async fn direct(mock: &collie_mock::MockServer, body: &[u8]) -> Vec<u8> {
    reqwest::Client::new()
        .post(format!("{}/chat/completions", mock.base_url()))
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec()
}

fn events(body: &[u8]) -> Vec<String> {
    String::from_utf8(body.to_vec())
        .unwrap()
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_passes_through_byte_exact_and_usage_is_counted() {
    let a = mock_with(Behavior::default().chunks(7)).await;
    let b = mock().await;
    let gw = gateway(&two_step(&a, &b, "5s")).await;
    let body = json!({"model": "gpt", "stream": true, "stream_options": {"include_usage": true},
                      "messages": [{"role": "user", "content": "count to seven"}]});
    let resp = gw.chat(body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let got = resp.bytes().await.unwrap().to_vec();

    let sent = posts(&a)[0].body.clone();
    let expected = direct(&a, &sent).await;
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&expected)
    );
    assert!(got.ends_with(b"data: [DONE]\n\n"));

    let usage_event = events(&got)
        .into_iter()
        .find(|e| e.contains("\"choices\":[]"))
        .expect("the client asked for usage and gets it");
    let v: serde_json::Value =
        serde_json::from_str(usage_event.trim_start_matches("data: ")).unwrap();
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 7);
    // Collie recorded exactly what the stream reported.
    let m = gw.metrics_after(1).await;
    let labels = |t| [("tenant", "alpha"), ("model", "gpt"), ("type", t)];
    assert_eq!(
        metric_sum(&m, "collie_tokens_total", &labels("input")),
        prompt as f64
    );
    assert_eq!(
        metric_sum(&m, "collie_tokens_total", &labels("output")),
        7.0
    );
    // gpt-a: $1/M in, $2/M out.
    let cost = metric_sum(
        &m,
        "collie_cost_usd_total",
        &[("tenant", "alpha"), ("model", "gpt")],
    );
    let want = (prompt as f64 * 1.0 + 7.0 * 2.0) / 1e6;
    assert!((cost - want).abs() < 1e-12, "cost {cost} vs {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_chunk_collie_asked_for_is_invisible_to_the_client() {
    let a = mock_with(Behavior::default().chunks(4)).await;
    let b = mock().await;
    let gw = gateway(&two_step(&a, &b, "5s")).await;
    let body =
        json!({"model": "gpt", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let got = gw
        .chat(body)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();

    // The upstream was asked for usage…
    let sent: serde_json::Value = serde_json::from_slice(&posts(&a)[0].body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    // …and sent it, but the client sees every event except that one.
    let upstream = events(&direct(&a, &posts(&a)[0].body).await);
    let client = events(&got);
    let hidden: Vec<&String> = upstream.iter().filter(|e| !client.contains(e)).collect();
    assert_eq!(hidden.len(), 1, "exactly one event withheld");
    assert!(hidden[0].contains("\"choices\":[]") && hidden[0].contains("\"usage\":{"));
    assert_eq!(client.last().map(String::as_str), Some("data: [DONE]"));
    // The usage still counted.
    let m = gw.metrics_after(1).await;
    assert_eq!(
        metric_sum(
            &m,
            "collie_tokens_total",
            &[("tenant", "alpha"), ("model", "gpt"), ("type", "output")]
        ),
        4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_arrives_chunk_by_chunk() {
    let a = mock_with(
        Behavior::default()
            .chunks(3)
            .interval(Duration::from_millis(300)),
    )
    .await;
    let b = mock().await;
    let gw = gateway(&two_step(&a, &b, "5s")).await;
    let body = streamed("gpt");
    let resp = gw.chat(body).send().await.unwrap();
    let mut stream = resp.bytes_stream();
    // The first content event arrives while the upstream is still generating.
    let mut seen = Vec::new();
    while let Some(chunk) = stream.next().await {
        seen.extend_from_slice(&chunk.unwrap());
        if String::from_utf8_lossy(&seen).contains("\"content\"") {
            break;
        }
    }
    assert!(
        a.streams_finished() == 0,
        "client saw content before the upstream finished"
    );
    while let Some(chunk) = stream.next().await {
        seen.extend_from_slice(&chunk.unwrap());
    }
    assert!(seen.ends_with(b"data: [DONE]\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_breaking_mid_stream_ends_with_an_error_event() {
    let a = mock_with(Behavior::default().chunks(10).break_after(3)).await;
    let b = mock().await;
    let gw = gateway(&two_step(&a, &b, "5s")).await;
    let body = json!({"model": "gpt", "stream": true, "stream_options": {"include_usage": true}, "messages": []});
    let resp = gw.chat(body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = resp
        .bytes()
        .await
        .expect("the client's stream ends cleanly");
    let ev = events(&got);
    let last = ev.last().unwrap();
    assert!(last.starts_with("data: {\"error\":"), "last event: {last}");
    let v: serde_json::Value = serde_json::from_str(last.trim_start_matches("data: ")).unwrap();
    assert_eq!(v["error"]["code"], "stream_interrupted");
    assert!(!String::from_utf8_lossy(&got).contains("[DONE]"));
    assert_eq!(b.completion_calls(), 0, "no retry after the first byte");
}

/// A client that goes away cancels the provider's stream: while events
/// flow, and also while the provider is silent (a long pause between
/// events), where it is noticed at once rather than at the next write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_the_upstream() {
    let cases = [
        ("flowing", 200, Duration::from_millis(20), 5),
        ("paused", 3, Duration::from_secs(60), 1),
    ];
    for (what, chunks, interval, read) in cases {
        let a = mock_with(Behavior::default().chunks(chunks).interval(interval)).await;
        let b = mock().await;
        // An idle timeout far beyond the wait below: only noticing the
        // client's departure can cancel the silent provider in time.
        let timeouts = json!({"connect": "1s", "first_byte": "5s", "idle": "120s"});
        let conf = two_step(&a, &b, "5s")
            .edit_deployment("a", |d| d.timeouts(timeouts.clone()))
            .edit_deployment("b", |d| d.timeouts(timeouts));
        let gw = gateway(&conf).await;
        let body = streamed("gpt");
        let resp = gw.chat(body).send().await.unwrap();
        let mut stream = resp.bytes_stream();
        for _ in 0..read {
            stream.next().await.unwrap().unwrap();
        }
        drop(stream);
        eventually(
            &format!("the upstream stream is cancelled ({what})"),
            || a.stream_cancellations() == 1,
        )
        .await;
        assert_eq!(a.streams_finished(), 0, "{what}");
    }
}

/// A graceful stop waits for a stream in flight: the client gets every
/// event and the end of the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_lets_a_stream_finish() {
    let a = mock_with(
        Behavior::default()
            .chunks(10)
            .interval(Duration::from_millis(100)),
    )
    .await;
    let b = mock().await;
    let gw = gateway(&two_step(&a, &b, "5s")).await;
    let body = streamed("gpt");
    let resp = gw.chat(body).send().await.unwrap();
    let mut stream = resp.bytes_stream();
    let mut seen = Vec::new();
    seen.extend_from_slice(&stream.next().await.unwrap().unwrap());
    let stopper = std::thread::spawn(move || gw.running.stop(true));
    while let Some(chunk) = stream.next().await {
        seen.extend_from_slice(&chunk.expect("the stream is not cut off"));
    }
    stopper.join().unwrap();
    assert!(
        seen.ends_with(b"data: [DONE]\n\n"),
        "the stream ran to its end"
    );
    assert_eq!(a.streams_finished(), 1);
}

/// A transcript under `tests/fixtures/transcripts/`.
fn transcript(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/transcripts/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// Provider streams in their own shapes (a filter-only first chunk, keep-alive
/// comments and usage on the last content chunk, CRLF event endings, the
/// Responses API's named events), cut at odd places: the client gets them
/// byte for byte, and the usage they report is what Collie counts. When
/// Collie asked for the usage chunk itself, only that usage-only chunk is
/// held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_transcripts_pass_through_byte_exact_with_usage() {
    // (file, endpoint, model, prompt tokens, completion tokens, has a usage-only chunk)
    let cases = [
        (
            "openai_chat_stream_include_usage.sse",
            "/v1/chat/completions",
            "gpt",
            19,
            9,
            true,
        ),
        (
            "azure_chat_stream_filters.sse",
            "/v1/chat/completions",
            "gpt",
            24,
            6,
            true,
        ),
        (
            "deepseek_reasoner_stream_keepalive.sse",
            "/v1/chat/completions",
            "gpt",
            11,
            42,
            false,
        ),
        (
            "local_server_stream_crlf.sse",
            "/v1/chat/completions",
            "gpt",
            31,
            2,
            true,
        ),
        (
            "responses_stream.sse",
            "/v1/responses",
            "resp",
            14,
            3,
            false,
        ),
    ];
    for (file, path, model, prompt, completion, hides) in cases {
        let body = transcript(file);
        for client_asks in [true, false] {
            let a = mock().await;
            let b = mock().await;
            a.push(Behavior::default().sse(body.clone(), 37));
            let gw = gateway(&two_step(&a, &b, "5s")).await;
            let mut request =
                json!({"model": model, "stream": true, "messages": [], "input": "hi"});
            if client_asks {
                request["stream_options"] = json!({"include_usage": true});
            }
            let resp = gw.post(path).json(&request).send().await.unwrap();
            assert_eq!(resp.status(), 200, "{file}");
            let got = String::from_utf8(resp.bytes().await.unwrap().to_vec()).unwrap();
            let sent = String::from_utf8(body.clone()).unwrap();
            let expected = if client_asks || !hides || path == "/v1/responses" {
                sent
            } else {
                let sep = if file.contains("crlf") {
                    "\r\n\r\n"
                } else {
                    "\n\n"
                };
                let usage_only: Vec<&str> = sent
                    .split(sep)
                    .filter(|e| e.contains("\"choices\":[]") && e.contains("\"usage\":{"))
                    .collect();
                assert_eq!(usage_only.len(), 1, "{file}");
                sent.replacen(&format!("{}{sep}", usage_only[0]), "", 1)
            };
            assert_eq!(
                got, expected,
                "{file} (client asked for usage: {client_asks})"
            );
            let text = gw.metrics_after(1).await;
            let tokens = |kind| {
                metric_sum(
                    &text,
                    "collie_tokens_total",
                    &[("tenant", "alpha"), ("type", kind)],
                )
            };
            assert_eq!(tokens("input"), f64::from(prompt), "{file}\n{text}");
            assert_eq!(tokens("output"), f64::from(completion), "{file}");
        }
    }
}

/// Non-streamed provider answers (pretty-printed chat, compact embeddings)
/// pass through byte for byte, and their usage is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_json_answers_pass_through_with_usage() {
    let cases = [
        (
            "openai_chat_completion.json",
            "/v1/chat/completions",
            "gpt",
            14.0,
            7.0,
        ),
        (
            "openai_embeddings.json",
            "/v1/embeddings",
            "embed",
            8.0,
            0.0,
        ),
    ];
    for (file, path, model, prompt, completion) in cases {
        let body = transcript(file);
        let a = mock().await;
        let b = mock().await;
        a.push(Behavior::default().body(body.clone()));
        let gw = gateway(&two_step(&a, &b, "5s")).await;
        let resp = gw
            .post(path)
            .json(&json!({"model": model, "messages": [], "input": ["a", "b"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{file}");
        assert_eq!(resp.bytes().await.unwrap(), body, "{file}");
        let text = gw.metrics_after(1).await;
        let tokens = |kind| metric_sum(&text, "collie_tokens_total", &[("type", kind)]);
        assert_eq!(tokens("input"), prompt, "{file}");
        assert_eq!(tokens("output"), completion, "{file}");
    }
}
