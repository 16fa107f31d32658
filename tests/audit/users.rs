//! End users inside a tenant: `X-User-ID` or the body's `user` in the
//! record, bounded; per-user anomaly rules; `audit report --by user`.

use super::*;

impl RulesTrail {
    /// One request as alpha naming `user` in the header (`None`: no header).
    async fn send_user(&self, header: Option<&str>, body: Value) {
        let mut r = self
            .gw
            .client
            .post(self.gw.url("/v1/chat/completions"))
            .header("x-tenant-id", "alpha")
            .bearer_auth(ALPHA_KEY);
        if let Some(u) = header {
            r = r.header("x-user-id", u);
        }
        let r = r.json(&body).send().await.unwrap();
        r.bytes().await.unwrap();
    }
}

fn with_user(user: &str, i: usize) -> Value {
    json!({"model": "gpt", "user": user,
           "messages": [{"role": "user", "content": format!("question {i}")}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_user_is_recorded_from_the_header_or_the_body_within_bounds() {
    let t = rules_trail(json!({})).await;
    t.send_user(Some("u-header"), question(0)).await;
    t.send_user(None, with_user("u-body@example.com", 1)).await;
    // The header wins over the body.
    t.send_user(Some("u-header"), with_user("u-body@example.com", 2))
        .await;
    // Not an id (too long, spaces): only a fingerprint.
    let long = "a".repeat(129);
    t.send_user(None, with_user(&long, 3)).await;
    t.send_user(None, with_user("my whole name", 4)).await;
    // None, and a `user` that is not a string.
    t.send_user(None, question(5)).await;
    t.send_user(None, json!({"model": "gpt", "user": 42, "messages": []}))
        .await;
    // A refusal records no user: no tenant is proven.
    let refused =
        t.gw.client
            .post(t.gw.url("/v1/chat/completions"))
            .header("x-tenant-id", "alpha")
            .bearer_auth("sk-guessed")
            .header("x-user-id", "u-header")
            .json(&question(6))
            .send()
            .await
            .unwrap();
    assert_eq!(refused.status(), 401);
    // Two headers naming users: which one counts would depend on the reader.
    let two =
        t.gw.client
            .post(t.gw.url("/v1/chat/completions"))
            .header("x-tenant-id", "alpha")
            .bearer_auth(ALPHA_KEY)
            .header("x-user-id", "u-1")
            .header("x-user-id", "u-2")
            .json(&question(7))
            .send()
            .await
            .unwrap();
    assert_eq!(two.status(), 400);
    let all = until_rows(&t.spec, 9).await;
    let users: Vec<Option<String>> = all.iter().map(|s| s.record.user.clone()).collect();
    assert_eq!(users[0].as_deref(), Some("u-header"));
    assert_eq!(users[1].as_deref(), Some("u-body@example.com"));
    assert_eq!(users[2].as_deref(), Some("u-header"));
    for fingerprint in [&users[3], &users[4]] {
        let f = fingerprint.as_deref().unwrap();
        assert!(f.starts_with("invalid:") && f.len() == 20, "{f}");
    }
    assert!(!users[3].as_deref().unwrap().contains("aaaa"));
    assert_eq!(&users[5..], &[None, None, None, None]);
    assert!(intact(&t.spec));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashed_user_ids_keep_only_a_digest() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let a = mock().await;
    let b = mock().await;
    let audit = sqlite_audit(&db, json!({"user_ids": "hashed"}));
    let gw = gateway(&rules_config(&a, &b, audit)).await;
    for _ in 0..2 {
        gw.post_as(CHAT, "alpha", ALPHA_KEY)
            .header("x-user-id", "jane@example.com")
            .json(&body())
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
    }
    let all = until_rows(&SinkSpec::Sqlite(db.clone()), 2).await;
    let u = all[0].record.user.clone().unwrap();
    assert!(u.starts_with("sha256:") && !u.contains("jane"), "{u}");
    assert_eq!(all[1].record.user.as_deref(), Some(u.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_over_its_own_limit_is_an_alert_of_its_own_scope() {
    let t = rules_trail(json!({"window": "1m", "user_requests": 2, "tenant_requests": 10})).await;
    for i in 0..2 {
        t.send_user(Some("u-1"), question(i)).await;
        t.send_user(Some("u-2"), question(10 + i)).await;
    }
    assert_eq!(t.fired_after(4).await, vec![]);
    // u-1's third: over its own limit; alpha (5) is not over its own.
    t.send_user(Some("u-1"), question(2)).await;
    assert_eq!(
        t.fired_after(5).await,
        vec![fired("request_rate", Some("alpha"))]
    );
    let stored = blocking(|| {
        t.spec
            .open()
            .unwrap()
            .anomalies_since(i64::MIN, None)
            .unwrap()
    });
    let a = &stored[0];
    assert_eq!(
        (a.scope.as_deref(), a.subject.as_deref()),
        (Some("user"), Some("u-1"))
    );
    assert_eq!(a.severity.as_deref(), Some("warning"));
    assert!(a.detail.contains("user u-1 of alpha"), "{}", a.detail);
    assert!(a.recommendation.as_deref().is_some_and(|r| !r.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_breaks_down_by_user_in_every_format() {
    let t = rules_trail(json!({})).await;
    for i in 0..3 {
        t.send_user(Some("u-1"), question(i)).await;
    }
    t.send_user(Some("u-2"), question(3)).await;
    t.send_user(None, question(4)).await;
    until_rows(&t.spec, 5).await;
    let SinkSpec::Sqlite(db) = &t.spec else {
        unreachable!()
    };
    let sink = format!("sqlite:{}", db.display());
    let json = report_json(&sink, &["--by", "user"]);
    let by_user = json["by_user"].as_object().unwrap();
    assert_eq!(by_user["alpha/u-1"]["requests"], 3);
    assert_eq!(by_user["alpha/u-2"]["requests"], 1);
    assert_eq!(by_user["alpha/(none)"]["requests"], 1);
    assert_eq!(by_user["alpha/u-1"]["cost_usd"], 0.003);
    assert!(by_user["alpha/u-1"]["latency_p50_ms"].is_number());
    // Without --by user there is no such section.
    assert!(report_json(&sink, &[]).get("by_user").is_none());
    let text = report_cli(&sink, &["--by", "user"]);
    assert!(text.contains("By user"), "{text}");
    let line = text.lines().find(|l| l.contains("alpha/u-1")).unwrap();
    assert!(line.split_whitespace().nth(1) == Some("3"), "{line}");
    let csv = report_cli(&sink, &["--by", "user", "--format", "csv"]);
    assert!(
        csv.lines().any(|l| l.starts_with("user,\"alpha/u-2\",1,")),
        "{csv}"
    );
}
