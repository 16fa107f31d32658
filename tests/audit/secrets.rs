//! No key, of a tenant or a provider, anywhere the audit trail reaches.

use super::*;

/// Every key used in a run with every kind of request — the tenants', the
/// providers', guessed ones, one sent as a tenant id — searched for in
/// everything the audit produced: the database, the logs (at trace level),
/// the metrics and status page, the webhook's alerts and the reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_appears_in_the_trail_logs_metrics_alerts_or_reports() {
    const GUESSED: &str = "sk-guessed-canary-key";
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let log = dir.path().join("log");
    let a = mock().await;
    let b = mock().await;
    let (hook, alerts) = receiver(1).await;
    let anomalies = json!({"tenant_requests": 3, "failure_ratio": 0.2, "failure_min_requests": 3,
                           "repeats": 2, "tokens_per_request": 10,
                           "webhook": {"url": hook, "backoff": "10ms"}});
    let audit = json!({"sink": "sqlite", "sqlite_path": db, "flush_interval": "20ms",
                       "preview_bytes": 4096, "anomalies": anomalies});
    // At trace level: the most the logs can ever say.
    let trace = Log {
        file: &log,
        rust_log: "trace",
    };
    let Process {
        mut child,
        base,
        admin,
        ..
    } = run_collie(dir.path(), &config(&a, &b, audit), Some(trace));
    let t = Remote::new(&base);
    every_kind(&t, &a).await;
    // A provider refusing its key, echoing it: the fallback goes on to b.
    a.push(Behavior::default().status(401).body(format!(
        "{{\"error\":{{\"message\":\"Incorrect API key provided: {PROVIDER_KEY_A}\"}}}}"
    )));
    t.chat(body()).send().await.unwrap().bytes().await.unwrap();
    // The same with nowhere to fall back to (`flaky` is b only), streamed.
    b.push(Behavior::default().status(401).body(format!(
        "{{\"error\":{{\"message\":\"Incorrect API key provided: {PROVIDER_KEY_B}\"}}}}"
    )));
    t.chat(json!({"model": "flaky", "stream": true, "messages": []}))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let post = |tenant: &str, auth: (&str, String)| {
        t.client
            .post(t.url("/v1/chat/completions"))
            .header("x-tenant-id", tenant)
            .header(auth.0, auth.1)
            .json(&body())
            .send()
    };
    for (tenant, auth) in [
        ("alpha", ("authorization", format!("Bearer {GUESSED}"))),
        ("alpha", ("api-key", GUESSED.to_string())),
        ("alpha", ("authorization", format!("Bearer {BETA_KEY}"))),
        // A key pasted where the tenant id goes.
        (ALPHA_KEY, ("authorization", format!("Bearer {ALPHA_KEY}"))),
        ("capped", ("api-key", BETA_KEY.to_string())),
    ] {
        post(tenant, auth).await.unwrap().bytes().await.unwrap();
    }
    let get = |url: String| async move { reqwest::get(url).await.unwrap().text().await.unwrap() };
    let metrics = get(format!("{admin}/metrics")).await;
    let status = get(format!("{admin}/status")).await;
    eventually("the webhook got alerts", || {
        alerts.lock().unwrap().len() >= 4
    })
    .await;
    terminate(&mut child);
    let spec = SinkSpec::Sqlite(db.clone());
    let all = rows(&spec);
    assert_eq!(all.len(), 25, "one record per request");
    let anomalies = blocking(|| {
        spec.open()
            .unwrap()
            .anomalies_since(i64::MIN, None)
            .unwrap()
    });
    let rules: std::collections::BTreeSet<&str> =
        anomalies.iter().map(|a| a.rule.as_str()).collect();
    assert_eq!(
        rules,
        [
            "failure_ratio",
            "large_request",
            "repeated_request",
            "request_rate"
        ]
        .into()
    );
    assert!(
        all.iter()
            .any(|s| s.record.claimed_tenant.as_deref() == Some("(unknown)"))
    );
    let mut haystack = std::fs::read(&db).unwrap();
    for extra in ["audit.db-wal", "log"] {
        haystack.extend(std::fs::read(dir.path().join(extra)).unwrap_or_default());
    }
    haystack.extend(metrics.as_bytes());
    haystack.extend(status.as_bytes());
    for d in alerts.lock().unwrap().iter() {
        haystack.extend(d.body.as_bytes());
    }
    let sink = format!("sqlite:{}", db.display());
    for format in ["text", "json", "csv"] {
        haystack.extend(report_cli(&sink, &["--since", "1h", "--format", format]).as_bytes());
    }
    haystack.extend(
        collie_bin()
            .args(["audit", "verify", "--sink", &sink])
            .output()
            .unwrap()
            .stdout,
    );
    for key in [ALPHA_KEY, BETA_KEY, PROVIDER_KEY_A, PROVIDER_KEY_B, GUESSED] {
        assert!(
            memchr::memmem::find(&haystack, key.as_bytes()).is_none(),
            "{key} leaked into the trail, the logs, the metrics, an alert or a report"
        );
    }
    // The search would have found them.
    assert!(memchr::memmem::find(&haystack, b"invalid_api_key").is_some());
}
