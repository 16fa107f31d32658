//! One record per request, whatever its kind, and what a record holds.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_request_gets_exactly_one_record() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let spec = SinkSpec::Sqlite(db.clone());
    let a = mock_with(
        Behavior::default()
            .chunks(50)
            .interval(Duration::from_millis(10)),
    )
    .await;
    let b = mock().await;
    let gw = gateway(&config(&a, &b, sqlite_audit(&db, json!({})))).await;
    let mut ids = Vec::new();

    // Admitted.
    let r = gw
        .chat(json!({"model": "gpt", "messages": []}))
        .send()
        .await
        .unwrap();
    ids.push(("admitted", id(&r)));
    r.bytes().await.unwrap();
    // Refused by auth.
    let r = gw
        .post_as(CHAT, "alpha", "sk-wrong")
        .json(&body())
        .send()
        .await
        .unwrap();
    ids.push(("auth", id(&r)));
    // Refused by quota: the second request of a tenant with one a day.
    let capped = |gw: &Gw| gw.post_as(CHAT, "capped", BETA_KEY).json(&body());
    capped(&gw).send().await.unwrap().bytes().await.unwrap();
    let r = capped(&gw).send().await.unwrap();
    ids.push(("quota", id(&r)));
    // Fallback: `a` answers 503 once.
    a.push(Behavior::default().status(503));
    let r = gw.chat(body()).send().await.unwrap();
    assert_eq!(r.headers()["x-collie-model"], "gpt-b");
    ids.push(("fallback", id(&r)));
    r.bytes().await.unwrap();
    // A stream the client cuts.
    let r = gw
        .chat(json!({"model": "gpt", "stream": true, "messages": []}))
        .send()
        .await
        .unwrap();
    ids.push(("client-cut", id(&r)));
    let mut s = r.bytes_stream();
    s.next().await.unwrap().unwrap();
    drop(s);
    eventually("the stream is cancelled", || a.stream_cancellations() == 1).await;
    // A stream the upstream breaks.
    a.push(Behavior::default().chunks(10).break_after(3));
    let r = gw
        .chat(json!({"model": "gpt", "stream": true, "messages": []}))
        .send()
        .await
        .unwrap();
    ids.push(("upstream-broke", id(&r)));
    r.bytes().await.unwrap();
    // Answered by Collie itself.
    let r = gw
        .get_as("/v1/models", "alpha", ALPHA_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    ids.push(("models", id(&r)));

    let total = 8; // the quota test sent one extra, admitted request
    let all = until_rows(&spec, total).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let all_again = rows(&spec);
    assert_eq!(all_again.len(), total, "exactly one record per request");
    for (_, request_id) in &ids {
        assert_eq!(
            all.iter()
                .filter(|s| &s.record.request_id == request_id)
                .count(),
            1
        );
    }
    let r = find(&all, &ids[0].1);
    assert_eq!(
        (r.decision.as_str(), r.status, r.tenant.as_deref()),
        ("admitted", 200, Some("alpha"))
    );
    assert_eq!(r.served_model.as_deref(), Some("gpt-a"));
    assert!(r.total_tokens.is_some() && r.cost_nano.is_some() && r.request_hash.is_some());
    assert_eq!(r.client_ip.as_deref(), Some("127.0.0.1"));
    let r = find(&all, &ids[1].1);
    assert_eq!(
        (r.decision.as_str(), r.status, r.rule.as_deref()),
        ("refused", 401, Some("invalid_api_key"))
    );
    assert_eq!(
        r.tenant, None,
        "an unproven tenant is not recorded as that tenant"
    );
    assert_eq!(
        r.claimed_tenant.as_deref(),
        Some("alpha"),
        "but whose id was named is"
    );
    assert!(r.failed());
    let r = find(&all, &ids[2].1);
    assert_eq!(
        (r.decision.as_str(), r.status, r.rule.as_deref()),
        ("refused", 429, Some("day.requests"))
    );
    let r = find(&all, &ids[3].1);
    assert_eq!(r.served_model.as_deref(), Some("gpt-b"));
    let attempts: Value = serde_json::from_str(&r.attempts).unwrap();
    assert_eq!(attempts[0]["outcome"], "HTTP 503");
    assert_eq!(attempts.as_array().unwrap().len(), 2);
    assert_eq!(r.claimed_tenant, None, "proven, not claimed");
    let r = find(&all, &ids[4].1);
    assert!(r.streamed && r.client_gone && !r.truncated);
    assert_eq!(r.error, None, "the client leaving is not a failure");
    assert!(!r.failed());
    assert!(
        r.usage_estimated,
        "no usage reported: estimated from what was delivered"
    );
    let r = find(&all, &ids[5].1);
    assert!(r.streamed && r.truncated);
    // The client got a 200 head and part of a stream: a failure, with a
    // short reason of Collie's own.
    assert_eq!(r.status, 200);
    assert!(r.failed());
    assert_eq!(
        r.error.as_deref(),
        Some("stream_interrupted: ConnectionClosed")
    );
    let r = find(&all, &ids[6].1);
    assert_eq!(
        (
            r.decision.as_str(),
            r.status,
            r.rule.as_deref(),
            r.endpoint.as_str()
        ),
        ("admitted", 200, None, "models")
    );
    let report = collie::audit::report::verify(&mut *spec.open().unwrap()).unwrap();
    assert!(report.is_empty(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_preview_is_off_by_default_and_bounded_when_on() {
    let t = sqlite_trail(json!({})).await;
    t.gw.chat(body())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        until_rows(&t.spec, 1).await[0].record.response_preview,
        None
    );

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let spec = SinkSpec::Sqlite(db.clone());
    let a = mock_with(Behavior::default().chunks(100)).await;
    // `flaky` is served by b, whose error body echoes its key.
    let b = mock_with(Behavior::default().status(401).body(format!(
        "{{\"error\":{{\"message\":\"Incorrect API key provided: {PROVIDER_KEY_B}\"}}}}"
    )))
    .await;
    let gw = gateway(&config(
        &a,
        &b,
        sqlite_audit(&db, json!({"preview_bytes": 40})),
    ))
    .await;
    let json_body = gw.chat(body()).send().await.unwrap().bytes().await.unwrap();
    let stream_body = gw
        .chat(json!({"model": "gpt", "stream": true, "messages": []}))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    a.push(Behavior::default().body("{\"short\":true}"));
    let short_body = gw.chat(body()).send().await.unwrap().bytes().await.unwrap();
    let failed = gw
        .chat(json!({"model": "flaky", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 401);
    let all = until_rows(&spec, 4).await;
    let preview = |i: usize| all[i].record.response_preview.clone();
    assert!(json_body.len() > 40 && stream_body.len() > 40);
    // The first 40 bytes the client got, of a JSON answer or of a stream.
    assert_eq!(preview(0).unwrap().as_bytes(), &json_body[..40]);
    assert_eq!(preview(1).unwrap().as_bytes(), &stream_body[..40]);
    // A shorter answer whole.
    assert_eq!(preview(2).unwrap().as_bytes(), &short_body[..]);
    // Never a provider's error body.
    assert_eq!(preview(3), None);
    assert_eq!(all[3].record.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_to_first_byte_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let spec = SinkSpec::Sqlite(db.clone());
    // 150 ms before the head, then five events 40 ms apart.
    let a = mock_with(
        Behavior::default()
            .delay(Duration::from_millis(150))
            .chunks(5)
            .interval(Duration::from_millis(40)),
    )
    .await;
    let b = mock().await;
    let gw = gateway(&config(&a, &b, sqlite_audit(&db, json!({})))).await;
    gw.chat(json!({"model": "gpt", "stream": true, "messages": []}))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    gw.chat(body()).send().await.unwrap().bytes().await.unwrap();
    gw.post_as(CHAT, "alpha", "wrong")
        .json(&body())
        .send()
        .await
        .unwrap();
    let all = until_rows(&spec, 3).await;
    let (stream, json, refused) = (&all[0].record, &all[1].record, &all[2].record);
    assert!(stream.streamed);
    // Lower bounds the provider sets: no byte before its head; the last
    // event at least four gaps after the first.
    let ttft = stream.ttft_ms.unwrap();
    assert!(ttft >= 150.0, "{ttft}");
    assert!(
        stream.latency_ms >= ttft + 150.0,
        "{} {ttft}",
        stream.latency_ms
    );
    let ttft = json.ttft_ms.unwrap();
    assert!(
        ttft >= 150.0 && ttft <= json.latency_ms,
        "{ttft} {}",
        json.latency_ms
    );
    assert_eq!(refused.ttft_ms, None, "nothing came from a provider");
}
