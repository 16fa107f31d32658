//! Hostile clients and providers over raw sockets: budgets that cannot be
//! overflowed, keys that never come back, deadlines and size limits on
//! request heads and bodies, pipelining, ambiguous identities, malformed
//! bodies, request smuggling, streams cut short, and a graceful stop.
//! Each test here failed before the gateway was hardened against it.

use crate::common::*;
use collie_mock::{Behavior, MockServer};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Long enough for anything the gateway must do here; a test that waits
/// this long has found a connection that is never closed.
const NEVER: Duration = Duration::from_secs(20);

const HELLO: &str = r#"{"model":"gpt","messages":[{"role":"user","content":"hi"}]}"#;

/// The standard two-deployment layout with these tenants in place of its own.
fn layout(a: &MockServer, b: &MockServer, tenants: &[Tenant]) -> Conf {
    let conf = two_step(a, b, "5s").without_tenants();
    tenants.iter().cloned().fold(conf, Conf::tenant)
}

/// Tenant `id` with one key, every model, and this quota.
fn tenant(id: &str, key: &str, quota: Value) -> Tenant {
    Tenant::new(id, key).quota(quota)
}

/// The layout with tenant alpha alone (no quota) and these top-level
/// settings.
async fn standard(settings: impl FnOnce(Conf) -> Conf) -> (Gw, MockServer, MockServer) {
    let a = mock().await;
    let b = mock().await;
    let conf = layout(&a, &b, &[tenant("alpha", ALPHA_KEY, json!({}))]);
    let gw = gateway(&settings(conf)).await;
    (gw, a, b)
}

/// A gateway with a SQLite audit trail, and the trail's path (in `dir`).
async fn with_trail(
    dir: &tempfile::TempDir,
    settings: impl FnOnce(Conf) -> Conf,
) -> (Gw, MockServer, MockServer, std::path::PathBuf) {
    let a = mock().await;
    let b = mock().await;
    let db = dir.path().join("audit.db");
    let audit = json!({"sink": "sqlite", "sqlite_path": db, "flush_interval": "10ms"});
    let conf = layout(&a, &b, &[tenant("alpha", ALPHA_KEY, json!({}))]).set("audit", audit);
    let gw = gateway(&settings(conf)).await;
    (gw, a, b, db)
}

/// Stop the gateway gracefully (every record written) and open its trail.
async fn stopped_trail(gw: Gw, db: &std::path::Path) -> rusqlite::Connection {
    gw.stop().await;
    rusqlite::Connection::open(db).unwrap()
}

/// Write `head` at once and `trickle` a byte at a time, every `every`,
/// while reading what comes back until the gateway closes the connection.
async fn trickle(gw: &Gw, head: &[u8], trickle: Vec<u8>, every: Duration) -> Vec<u8> {
    let s = send_raw(gw.running.listen, head).await;
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        for b in trickle {
            if wr.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
    let mut data = Vec::new();
    let closed = tokio::time::timeout(NEVER, rd.read_to_end(&mut data))
        .await
        .is_ok();
    writer.abort();
    assert!(closed, "a slow client held its connection");
    data
}

async fn one_response(gw: &Gw, request: &[u8]) -> RawResponse {
    let (data, closed) = raw_exchange(gw.running.listen, request, NEVER).await;
    assert!(closed, "the gateway never closed the connection");
    parse_responses(&data)
        .into_iter()
        .next()
        .unwrap_or_else(|| {
            panic!(
                "no response, got {:?}",
                String::from_utf8_lossy(&data[..data.len().min(300)])
            )
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_max_tokens_near_the_integer_limit_cannot_pass_a_budget() {
    let a = mock().await;
    let b = mock().await;
    let tenants = [
        tenant("alpha", ALPHA_KEY, json!({"tokens_per_day": 1000})),
        tenant("beta", BETA_KEY, json!({"usd_per_day": 0.01})),
    ];
    let gw = gateway(&layout(&a, &b, &tenants)).await;
    let ask = |key: &'static str, id: &'static str, max_tokens: serde_json::Value| {
        gw.post_as(CHAT, id, key)
            .json(&json!({"model": "gpt", "max_tokens": max_tokens,
                          "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    let huge: [u64; 7] = [
        u64::MAX,
        u64::MAX - 1,
        u64::MAX - 20,
        1 << 63,
        (1 << 63) + 7,
        1 << 62,
        2000,
    ];
    for (key, id, window) in [
        (ALPHA_KEY, "alpha", "day.tokens"),
        (BETA_KEY, "beta", "day.usd"),
    ] {
        for n in huge {
            let resp = ask(key, id, json!(n)).await.unwrap();
            assert_eq!(resp.status(), 429, "{id} max_tokens {n}");
            let v: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(v["error"]["code"], "quota_exceeded", "{id} {n}");
            assert!(
                v["error"]["message"].as_str().unwrap().contains(window),
                "{v}"
            );
        }
        // Values no integer holds are not numbers of tokens at all.
        for bad in [json!(1e30), json!(-1), json!(18446744073709551616.0)] {
            let resp = ask(key, id, bad.clone()).await.unwrap();
            assert_eq!(resp.status(), 400, "{id} {bad}");
        }
        // The budgets still admit what fits.
        let resp = ask(key, id, json!(10)).await.unwrap();
        assert_eq!(resp.status(), 200, "{id}");
    }
    assert_eq!(posts(&a).len(), 2, "only the two small requests went out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_key_never_reaches_the_client_in_a_header_or_a_body() {
    let (gw, a, _b) = standard(|c| c).await;
    let key = PROVIDER_KEY_A;
    let echoed = format!(
        r#"{{"id":"x","object":"chat.completion","model":"gpt-a","choices":[{{"index":0,"message":{{"role":"assistant","content":"your key is {key}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}},"debug":"Bearer {key}"}}"#
    );
    let stream = format!(
        "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{key}\"}}}}]}}\n\ndata: {{\"choices\":[{{\"delta\":{{\"content\":\"again {key}\"}}}}]}}\n\ndata: [DONE]\n\n"
    );
    let echo = |b: Behavior| {
        b.header("x-echo-auth", &format!("Bearer {key}"))
            .header("x-debug-key", key)
            .header("x-kept", "fine")
    };
    let cases = [
        ("json 200", echo(Behavior::ok().body(echoed.clone())), false),
        ("sse 200", echo(Behavior::ok().sse(stream.clone(), 7)), true),
        (
            "400 passed through",
            echo(Behavior::ok().status(400).body(echoed.clone())),
            false,
        ),
    ];
    for (what, behavior, streamed) in cases {
        a.set_default(behavior);
        let resp = gw
            .chat(json!({"model": "gpt", "stream": streamed,
                         "messages": [{"role": "user", "content": "echo"}]}))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let headers = format!("{:?}", resp.headers());
        let length = resp.content_length();
        let body = resp.bytes().await.unwrap();
        let text = String::from_utf8_lossy(&body);
        assert!(!headers.contains(key), "{what}: a header carried the key");
        assert!(headers.contains("x-kept"), "{what}: other headers pass");
        assert!(!text.contains(key), "{what}: the body carried the key");
        assert!(!text.contains(&key[..8]) || text.contains("****"), "{what}");
        let masked = "*".repeat(key.len());
        if streamed {
            assert_eq!(status, 200);
            assert_eq!(text, stream.replace(key, &masked), "{what}: byte for byte");
        } else {
            assert_eq!(text, echoed.replace(key, &masked), "{what}: byte for byte");
            assert_eq!(length, Some(body.len() as u64), "{what}: length kept");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_key_sent_as_the_model_is_not_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, _a, _b, db) = with_trail(&dir, |c| c).await;
    let resp = gw
        .chat(json!({"model": ALPHA_KEY, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let conn = stopped_trail(gw, &db).await;
    let models: Vec<String> = conn
        .prepare("SELECT requested_model FROM audit_records")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(models.len(), 1);
    assert!(models[0].starts_with("unknown:"), "{models:?}");
    assert!(!models[0].contains(ALPHA_KEY) && !models[0].contains("sk-"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_sent_a_byte_at_a_time_is_cut_off_with_408() {
    let (gw, a, _b) = standard(|c| c.set("head_timeout", "1s")).await;
    // A header byte every 100 ms: each read succeeds, the head never ends.
    let mut slow = b"X-Slow: ".to_vec();
    slow.extend_from_slice(&[b'x'; 400]);
    let data = trickle(
        &gw,
        b"POST /v1/chat/completions HTTP/1.1\r\n",
        slow,
        Duration::from_millis(100),
    )
    .await;
    let r = &parse_responses(&data)[0];
    assert_eq!(r.status, 408);
    assert_eq!(r.error_code(), "head_timeout");
    assert_eq!(r.header("connection"), Some("close"));
    let m = gw.metrics().await;
    assert_eq!(
        metric_sum(
            &m,
            "collie_connection_refusals_total",
            &[("reason", "head_timeout")]
        ),
        1.0
    );
    assert!(posts(&a).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_before_and_between_requests() {
    let (gw, _a, _b) =
        standard(|c| c.set("head_timeout", "1s").set("keepalive_timeout", "1s")).await;
    // Nothing at all: closed, without an answer.
    let (data, closed) = raw_exchange(gw.running.listen, b"", NEVER).await;
    assert!(closed && data.is_empty(), "an idle connection stayed open");
    // Less than the 24 bytes the HTTP/2 check waits for: a slow head.
    let (data, closed) = raw_exchange(gw.running.listen, b"GET / HTTP/1.1\r\n", NEVER).await;
    assert!(closed);
    assert_eq!(parse_responses(&data)[0].status, 408);
    // One request answered, then silence: closed after the idle timeout.
    let (data, closed) =
        raw_exchange(gw.running.listen, raw_chat(HELLO, "").as_bytes(), NEVER).await;
    assert!(closed, "a kept-alive connection was never closed");
    let rs = parse_responses(&data);
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickled_a_byte_at_a_time_times_out_as_a_whole() {
    let (gw, a, _b) = standard(|c| c.set("client_timeout", "1s")).await;
    let body = format!("{:<400}", HELLO);
    let request = raw_chat(&body, "");
    let (head, body) = request.split_once("\r\n\r\n").unwrap();
    let data = trickle(
        &gw,
        format!("{head}\r\n\r\n").as_bytes(),
        body.as_bytes().to_vec(),
        Duration::from_millis(50),
    )
    .await;
    let r = &parse_responses(&data)[0];
    assert_eq!(r.status, 408);
    assert_eq!(r.error_code(), "client_timeout");
    assert!(posts(&a).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let (gw, a, b) = standard(|c| c).await;
    let second = r#"{"model":"other","messages":[{"role":"user","content":"two"}]}"#;
    // Two requests in one write.
    let both = format!(
        "{}{}",
        raw_chat(HELLO, ""),
        raw_chat(second, "Connection: close\r\n")
    );
    let (data, closed) = raw_exchange(gw.running.listen, both.as_bytes(), NEVER).await;
    assert!(closed);
    let rs = parse_responses(&data);
    assert_eq!(rs.len(), 2, "{}", String::from_utf8_lossy(&data));
    assert_eq!((rs[0].status, rs[1].status), (200, 200));
    assert_eq!(rs[0].json()["model"], "gpt-a");
    assert_eq!(rs[1].json()["model"], "gpt-b");

    // The second sent while the first is being answered: the first is not
    // taken for a client that left.
    a.set_default(Behavior::ok().delay(Duration::from_millis(800)));
    let mut s = send_raw(gw.running.listen, raw_chat(HELLO, "").as_bytes()).await;
    eventually("the first request reached its provider", || {
        posts(&a).len() == 2
    })
    .await;
    s.write_all(raw_chat(second, "Connection: close\r\n").as_bytes())
        .await
        .unwrap();
    let (data, closed) = read_until_closed(&mut s, NEVER).await;
    assert!(closed);
    let rs = parse_responses(&data);
    assert_eq!(rs.len(), 2, "{}", String::from_utf8_lossy(&data));
    assert_eq!((rs[0].status, rs[1].status), (200, 200));
    assert_eq!(rs[0].json()["model"], "gpt-a");
    assert_eq!(rs[1].json()["model"], "gpt-b");
    assert_eq!(posts(&b).len(), 2);
    let m = gw.metrics_after(4).await;
    assert_eq!(
        metric_sum(&m, "collie_requests_total", &[("status_class", "2xx")]),
        4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_identities_in_one_request_are_refused() {
    let (gw, a, _b) = standard(|c| c).await;
    let body = HELLO;
    let heads = [
        format!("X-Tenant-ID: alpha\r\nX-Tenant-ID: beta\r\nAuthorization: Bearer {ALPHA_KEY}\r\n"),
        format!(
            "X-Tenant-ID: alpha\r\nX-Tenant-ID: alpha\r\nAuthorization: Bearer {ALPHA_KEY}\r\n"
        ),
        format!(
            "X-Tenant-ID: alpha\r\nAuthorization: Bearer {ALPHA_KEY}\r\nAuthorization: Bearer {BETA_KEY}\r\n"
        ),
        format!(
            "X-Tenant-ID: alpha\r\nAuthorization: Bearer {ALPHA_KEY}\r\napi-key: {BETA_KEY}\r\n"
        ),
        format!("X-Tenant-ID: alpha\r\napi-key: {ALPHA_KEY}\r\napi-key: {ALPHA_KEY}\r\n"),
    ];
    for h in heads {
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: c\r\n{h}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let r = one_response(&gw, request.as_bytes()).await;
        assert_eq!(r.status, 400, "{h}");
        assert_eq!(r.error_code(), "ambiguous_identity", "{h}");
    }
    assert!(posts(&a).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_over_the_limits_get_431_and_reach_no_provider() {
    let (gw, a, _b) = standard(|c| c.set("max_header_bytes", "16KiB").set("max_headers", 40)).await;
    let big = format!("X-Big: {}\r\n", "a".repeat(20 << 10));
    let many: String = (0..60).map(|i| format!("X-H{i}: v\r\n")).collect();
    let megabyte = format!("X-Huge: {}\r\n", "b".repeat(1 << 20));
    for extra in [big, many, megabyte] {
        let request = raw_chat(HELLO, &format!("{extra}Connection: close\r\n"));
        let r = one_response(&gw, request.as_bytes()).await;
        assert_eq!(r.status, 431, "{}", &extra[..20]);
        assert_eq!(r.error_code(), "header_too_large");
    }
    // Under the limits: served.
    let fine = format!(
        "X-Fine: {}\r\n{}",
        "c".repeat(8 << 10),
        (0..30)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>()
    );
    let r = one_response(
        &gw,
        raw_chat(HELLO, &format!("{fine}Connection: close\r\n")).as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(posts(&a).len(), 1);
    // HTTP/2 (cleartext): the same count limit.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let mut req = h2
        .post(gw.url("/v1/chat/completions"))
        .header("x-tenant-id", "alpha")
        .bearer_auth(ALPHA_KEY)
        .body(HELLO);
    for i in 0..60 {
        req = req.header(format!("x-h{i}"), "v");
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 431);
    assert_eq!(posts(&a).len(), 1);
    let m = gw.metrics().await;
    assert_eq!(
        metric_sum(
            &m,
            "collie_connection_refusals_total",
            &[("reason", "header_too_large")]
        ),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_in_flight_are_held_to_their_budget() {
    let (gw, a, _b) = standard(|c| {
        c.set("max_body_bytes", "1MiB")
            .set("max_inflight_body_bytes", "1536KiB")
    })
    .await;
    let content = "x".repeat((1 << 20) - 200);
    let body = format!(r#"{{"model":"gpt","messages":[{{"role":"user","content":"{content}"}}]}}"#);
    assert!(body.len() <= 1 << 20);
    let request = raw_chat(&body, "Connection: close\r\n");
    let split = request.len() - body.len() / 2;
    // The first holds its whole declared length while it sends half.
    let mut first = send_raw(gw.running.listen, &request.as_bytes()[..split]).await;
    for _ in 0..500 {
        let m = gw.metrics().await;
        if metric_sum(&m, "collie_inflight_body_bytes", &[]) >= body.len() as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A second does not fit beside it: refused before its body is read.
    let r = one_response(&gw, request.as_bytes()).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.error_code(), "overloaded");
    assert!(r.header("retry-after").is_some());
    // The first finishes and is served; then there is room again.
    first.write_all(&request.as_bytes()[split..]).await.unwrap();
    let (data, _) = read_until_closed(&mut first, NEVER).await;
    assert_eq!(parse_responses(&data)[0].status, 200);
    let r = one_response(&gw, request.as_bytes()).await;
    assert_eq!(r.status, 200);
    assert_eq!(posts(&a).len(), 2);
    // A body's hold ends with its request, just after the answer went out.
    for _ in 0..500 {
        if metric_sum(&gw.metrics().await, "collie_inflight_body_bytes", &[]) == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let m = gw.metrics_after(3).await;
    assert_eq!(metric_sum(&m, "collie_inflight_body_bytes", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_anywhere_in_the_body_is_refused() {
    let (gw, a, _b) = standard(|c| c).await;
    for bad in [
        &b"{\"model\":\"gpt\",\"messages\":[{\"role\":\"user\",\"content\":\"caf\xe9\"}]}"[..],
        b"{\"model\":\"gpt\",\"x\":\"\xff\xfe\",\"messages\":[]}",
        b"{\"model\":\"gpt\",\"messages\":[],\"\xc0\xaf\":1}",
    ] {
        let mut request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: c\r\nX-Tenant-ID: alpha\r\nAuthorization: Bearer {ALPHA_KEY}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            bad.len()
        )
        .into_bytes();
        request.extend_from_slice(bad);
        let r = one_response(&gw, &request).await;
        assert_eq!(r.status, 400);
        assert_eq!(r.error_code(), "invalid_body");
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("UTF-8")
        );
    }
    assert!(posts(&a).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_usage_is_estimated_however_its_json_is_spaced() {
    let (gw, a, _b) = standard(|c| c).await;
    let event = "data: { \"choices\" : [ { \"index\" : 0 , \"delta\" : { \"content\" : \"hello\" } } ] }\n\n";
    let stream = format!("{}data: [DONE]\n\n", event.repeat(5));
    a.set_default(Behavior::ok().sse(stream, 11).no_usage());
    let resp = gw
        .chat(json!({"model": "gpt", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    let m = gw.metrics_after(1).await;
    // Five events of five bytes: at least a token per event, a token per
    // four bytes: seven.
    assert_eq!(
        metric_sum(
            &m,
            "collie_tokens_total",
            &[("type", "output"), ("usage", "estimated")]
        ),
        7.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_gets_a_cut_stream_never_a_clean_end() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, a, _b, db) = with_trail(&dir, |c| c.set("client_timeout", "1s")).await;
    // 32 MiB of events: more than the sockets between them can buffer.
    let event = format!(
        "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
        "z".repeat(16 << 10)
    );
    let stream = format!("{}data: [DONE]\n\n", event.repeat(2048));
    a.set_default(Behavior::ok().sse(stream, 64 << 10));
    let body = r#"{"model":"gpt","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut s = send_raw(gw.running.listen, raw_chat(body, "").as_bytes()).await;
    let mut first = [0u8; 1024];
    let n = s.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    // Stop reading for longer than a write to this client may block.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (rest, closed) = read_until_closed(&mut s, NEVER).await;
    assert!(closed, "the cut connection stayed open");
    let mut data = first[..n].to_vec();
    data.extend_from_slice(&rest);
    let r = &parse_responses(&data)[0];
    assert!(!r.complete, "the response ended as if it were whole");
    assert!(!data.ends_with(b"0\r\n\r\n"));
    assert!(!String::from_utf8_lossy(&r.body).contains("[DONE]"));
    let conn = stopped_trail(gw, &db).await;
    let (truncated, error): (i64, String) = conn
        .query_row(
            "SELECT truncated, error FROM audit_records WHERE status = 200",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(truncated, 1);
    assert!(error.contains("did not read in time"), "{error}");
}

/// A stream long enough to be in flight when a stop begins.
fn slow_stream() -> Behavior {
    Behavior::ok()
        .chunks(30)
        .interval(Duration::from_millis(100))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_fails_readiness_at_once_and_lets_streams_finish() {
    let (gw, a, _b) = standard(|c| c).await;
    a.set_default(slow_stream());
    let Gw {
        running,
        base,
        admin,
        client,
    } = gw;
    let stream = client
        .post(format!("{base}/v1/chat/completions"))
        .header("x-tenant-id", "alpha")
        .bearer_auth(ALPHA_KEY)
        .json(&json!({"model": "gpt", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let readyz = client.get(format!("{admin}/readyz")).send().await.unwrap();
    assert_eq!(readyz.status(), 200);
    let stopping = tokio::task::spawn_blocking(move || running.stop(true));
    let mut refused = false;
    for _ in 0..500 {
        let r = client.get(format!("{admin}/readyz")).send().await;
        if r.is_ok_and(|r| r.status() == 503) {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "/readyz kept answering 200 while stopping");
    // Liveness and scrapes go on answering on new connections meanwhile.
    for page in ["/healthz", "/metrics"] {
        let fresh = reqwest::Client::new();
        let r = fresh.get(format!("{admin}{page}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{page} while stopping");
    }
    // A request that arrives now is served, and told the connection closes.
    a.set_default(Behavior::ok());
    let fresh = reqwest::Client::new();
    let late = fresh
        .post(format!("{base}/v1/chat/completions"))
        .header("x-tenant-id", "alpha")
        .bearer_auth(ALPHA_KEY)
        .body(HELLO)
        .send()
        .await
        .unwrap();
    assert_eq!(late.status(), 200);
    assert_eq!(late.headers()["connection"], "close");
    let text = String::from_utf8(stream.bytes().await.unwrap().to_vec()).unwrap();
    assert!(
        text.ends_with("data: [DONE]\n\n"),
        "the stream was cut: {text}"
    );
    stopping.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_drain_timeout_a_stream_ends_with_an_error_event_and_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, a, _b, db) = with_trail(&dir, |c| c.set("drain_timeout", "1s")).await;
    a.set_default(
        Behavior::ok()
            .chunks(200)
            .interval(Duration::from_millis(100)),
    );
    let stream = gw
        .chat(json!({"model": "gpt", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let Gw { running, .. } = gw;
    let stopping = tokio::task::spawn_blocking(move || running.stop(true));
    let text = String::from_utf8(stream.bytes().await.unwrap().to_vec()).unwrap();
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.starts_with("data: {\"error\""), "{last}");
    assert!(last.contains("cut off by the gateway"), "{last}");
    assert!(!text.contains("[DONE]"));
    stopping.await.unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (truncated, error): (i64, String) = conn
        .query_row("SELECT truncated, error FROM audit_records", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(truncated, 1);
    assert!(error.contains("the gateway shut down"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_fails_readiness_at_once_and_the_process_exits_after_the_stream() {
    let a = mock().await;
    a.set_default(slow_stream());
    let b = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let Process {
        mut child,
        base,
        admin,
        ..
    } = run_collie(dir.path(), &two_step(&a, &b, "5s"), None);
    let client = reqwest::Client::new();
    let ready = format!("{admin}/readyz");
    eventually_async(|| async {
        client
            .get(&ready)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let stream = Remote::new(&base)
        .chat(json!({"model": "gpt", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    sigterm(&child);
    eventually_async(|| async {
        client
            .get(&ready)
            .send()
            .await
            .is_ok_and(|r| r.status() == 503)
    })
    .await;
    let text = String::from_utf8(stream.bytes().await.unwrap().to_vec()).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
}

/// Poll an async condition until it holds (bounded).
async fn eventually_async<F, Fut>(mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..500 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting");
}

/// Requests that try to hide a second request from one reader of the
/// connection: none of them may get a request past the gateway that the
/// gateway did not answer, and each is answered at most once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_variants_never_get_a_hidden_request_through() {
    let (gw, a, b) = standard(|c| c).await;
    let hidden = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: c\r\nX-Tenant-ID: alpha\r\nAuthorization: Bearer {ALPHA_KEY}\r\nContent-Length: {}\r\n\r\n{}",
        r#"{"model":"other","messages":[]}"#.len(),
        r#"{"model":"other","messages":[]}"#
    );
    let auth = format!("X-Tenant-ID: alpha\r\nAuthorization: Bearer {ALPHA_KEY}\r\n");
    let chunked_body = format!("{:x}\r\n{HELLO}\r\n0\r\n\r\n", HELLO.len());
    let variants = [
        // Content-Length and Transfer-Encoding together.
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: c\r\n{auth}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{chunked_body}{hidden}"
        ),
        // Two different lengths.
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: c\r\n{auth}Content-Length: {}\r\nContent-Length: 5\r\n\r\n{HELLO}{hidden}",
            HELLO.len()
        ),
        // A transfer coding that is not chunked.
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: c\r\n{auth}Transfer-Encoding: xchunked\r\n\r\n{chunked_body}{hidden}"
        ),
        // A negative and a signed length.
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: c\r\n{auth}Content-Length: -1\r\n\r\n{HELLO}{hidden}"
        ),
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: c\r\n{auth}Content-Length: +{}\r\n\r\n{HELLO}{hidden}",
            HELLO.len()
        ),
        // A chunk size no integer holds.
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: c\r\n{auth}Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\n{HELLO}\r\n0\r\n\r\n{hidden}"
        ),
        // A folded header line.
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: c\r\n{auth}X-Folded: a\r\n Content-Length: 9999\r\nContent-Length: {}\r\n\r\n{HELLO}{hidden}",
            HELLO.len()
        ),
    ];
    for (i, v) in variants.iter().enumerate() {
        a.clear();
        b.clear();
        let (data, closed) = raw_exchange(gw.running.listen, v.as_bytes(), NEVER).await;
        assert!(closed, "variant {i}: connection held");
        let rs = parse_responses(&data);
        // The hidden request is for model `other`, served by `b`. Whatever
        // the gateway made of the bytes, a request that reached a provider
        // was answered in the open — never sent without an answer.
        let answered = |model: &str| rs.iter().filter(|r| r.json()["model"] == model).count();
        assert_eq!(
            posts(&b).len(),
            answered("gpt-b"),
            "variant {i}: a request went upstream unanswered: {}",
            String::from_utf8_lossy(&data)
        );
        assert_eq!(posts(&a).len(), answered("gpt-a"), "variant {i}");
        assert!(
            rs.len() <= 2,
            "variant {i}: {} answers to at most two requests",
            rs.len()
        );
    }
}
