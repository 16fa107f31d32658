//! One alert pipeline: anomalies and health events deduplicated with a
//! cool-down, with severity and recommendation, in the trail, the metrics,
//! the status feed and the webhook.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_firing_again_within_its_cooldown_is_merged_not_delivered() {
    // A rule fires at most once per window; the cool-down (an hour here)
    // holds back the next window's alert too, and counts it.
    let t = rules_trail(json!({"window": "300ms", "tenant_requests": 2, "cooldown": "1h"})).await;
    t.send_n(3, Who::Alpha, question(0)).await;
    assert_eq!(
        t.fired_after(3).await,
        vec![fired("request_rate", Some("alpha"))]
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    t.send_n(3, Who::Alpha, question(1)).await;
    assert_eq!(t.fired_after(6).await.len(), 1, "merged, not stored again");
    let m = t.gw.metrics().await;
    assert_eq!(
        metric_sum(
            &m,
            "collie_alerts_total",
            &[("rule", "request_rate"), ("severity", "warning")]
        ),
        1.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "collie_alerts_deduplicated_total",
            &[("rule", "request_rate")]
        ),
        1.0
    );
    // The feed shows it once, with both occurrences.
    let status = t.gw.admin_json("/status").await;
    let feed = status["alerts"].as_array().unwrap();
    assert_eq!(feed.len(), 1, "{feed:?}");
    assert_eq!(feed[0]["count"], 2);
    assert_eq!(
        feed[0]["scope"],
        json!({"kind": "tenant", "tenant": "alpha"})
    );
    assert!(feed[0]["last_seen_ms"].as_i64() > feed[0]["first_seen_ms"].as_i64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_cooldown_every_firing_is_delivered() {
    let t = rules_trail(json!({"window": "300ms", "tenant_requests": 2, "cooldown": "0s"})).await;
    t.send_n(3, Who::Alpha, question(0)).await;
    t.fired_after(3).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    t.send_n(3, Who::Alpha, question(1)).await;
    assert_eq!(t.fired_after(6).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_preset_turns_every_seed_rule_on() {
    // One line; the one field given overrides its rule.
    let t = rules_trail(json!({"preset": "standard", "tokens_per_request": 900})).await;
    t.send(Who::Alpha, question(0)).await;
    assert_eq!(
        t.fired_after(1).await,
        vec![fired("large_request", Some("alpha"))]
    );
    // And 0 turns one off.
    let t = rules_trail(json!({"preset": "standard", "tokens_per_request": 0})).await;
    t.send(Who::Alpha, question(0)).await;
    assert_eq!(t.fired_after(1).await, vec![]);
}

/// Deployments `a` and `b` (model `gpt` → pool of both) probed every
/// 100 ms; the trail in SQLite; alerts to `hook`.
async fn probed(hook: &str) -> (Gw, SinkSpec, MockServer, MockServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let a = mock().await;
    let b = mock().await;
    let probes = json!({"interval": "100ms", "timeout": "300ms", "healthy_after": 1,
                        "unhealthy_after": 1, "cooldown": "60s"});
    let conf = Conf::new()
        .set(
            "audit",
            sqlite_audit(
                &db,
                json!({"anomalies": {"webhook": {"url": hook, "retries": 1, "backoff": "20ms"}}}),
            ),
        )
        .tenant(Tenant::alpha())
        .model(Model::new("gpt", &["p"]))
        .pool(Pool::new("p", &["a", "b"]))
        .deployment(
            Deployment::on("a", &a, "gpt-a")
                .key("KEY_A")
                .health(probes.clone()),
        )
        .deployment(Deployment::on("b", &b, "gpt-b").key("KEY_B").health(probes));
    let gw = gateway(&conf).await;
    (gw, SinkSpec::Sqlite(db), a, b, dir)
}

/// The alerts stored in a trail, as (rule, severity, scope, subject).
fn stored(spec: &SinkSpec) -> Vec<(String, String, String, String)> {
    blocking(|| {
        spec.open()
            .unwrap()
            .anomalies_since(i64::MIN, None)
            .unwrap()
    })
    .into_iter()
    .map(|a| {
        (
            a.rule,
            a.severity.unwrap_or_default(),
            a.scope.unwrap_or_default(),
            a.subject.unwrap_or_default(),
        )
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_events_are_alerts_in_the_trail_the_metrics_and_the_webhook() {
    let (hook, deliveries) = receiver(0).await;
    let (gw, spec, a, b, _dir) = probed(&hook).await;
    let (a_addr, b_addr) = (a.addr(), b.addr());
    eventually_async(&gw, |s| {
        s["deployments"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["state"] == "healthy")
    })
    .await;
    // `a` stops answering: unhealthy; then `b` too: the model is in panic.
    a.shutdown().await;
    eventually_async(&gw, |s| alerted(s, "deployment_unhealthy", "a")).await;
    b.shutdown().await;
    eventually_async(&gw, |s| alerted(s, "model_panic", "gpt")).await;
    let s = gw.admin_json("/status").await;
    assert_eq!(s["models"][0]["panic"], true);
    // Requests get 503 at once meanwhile.
    assert_eq!(gw.chat(body()).send().await.unwrap().status(), 503);
    // Both come back.
    let _a = restart(a_addr).await;
    let _b = restart(b_addr).await;
    eventually_async(&gw, |s| alerted(s, "model_recovered", "gpt")).await;
    eventually_async(&gw, |s| {
        alerted(s, "deployment_recovered", "a") && alerted(s, "deployment_recovered", "b")
    })
    .await;
    let feed = gw.admin_json("/status").await["alerts"].clone();
    let panic = feed
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["rule"] == "model_panic")
        .unwrap()
        .clone();
    assert_eq!(panic["severity"], "critical");
    assert!(
        panic["recommendation"]
            .as_str()
            .unwrap()
            .contains("fallback pool")
    );
    // Counted by rule and severity.
    let m = gw.metrics().await;
    for (rule, severity, n) in [
        ("deployment_unhealthy", "warning", 2.0),
        ("model_panic", "critical", 1.0),
        ("model_recovered", "info", 1.0),
    ] {
        assert_eq!(
            metric_sum(
                &m,
                "collie_alerts_total",
                &[("rule", rule), ("severity", severity)]
            ),
            n,
            "{rule}"
        );
    }
    assert_eq!(
        metric_sum(
            &m,
            "collie_alerts_total",
            &[("rule", "deployment_recovered")]
        ),
        2.0
    );
    // Not anomalies: the anomaly series stays for the rules over records.
    assert_eq!(metric_sum(&m, "collie_anomalies_total", &[]), 0.0);
    // Written to the trail like anomalies.
    let mut want = vec![
        ("deployment_unhealthy", "warning", "deployment", "a"),
        ("deployment_unhealthy", "warning", "deployment", "b"),
        ("model_panic", "critical", "model", "gpt"),
        ("deployment_recovered", "info", "deployment", "a"),
        ("deployment_recovered", "info", "deployment", "b"),
        ("model_recovered", "info", "model", "gpt"),
    ];
    want.sort();
    for _ in 0..200 {
        if stored(&spec).len() >= want.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut got = stored(&spec);
    got.sort();
    let got: Vec<(&str, &str, &str, &str)> = got
        .iter()
        .map(|(a, b, c, d)| (a.as_str(), b.as_str(), c.as_str(), d.as_str()))
        .collect();
    assert_eq!(got, want);
    // And to the webhook, each once, with its severity and advice.
    eventually("six alerts delivered", || {
        deliveries.lock().unwrap().len() >= 6
    })
    .await;
    let sent: Vec<Value> = deliveries
        .lock()
        .unwrap()
        .iter()
        .map(|d| serde_json::from_str(&d.body).unwrap())
        .collect();
    assert_eq!(sent.len(), 6);
    let panic = sent.iter().find(|v| v["rule"] == "model_panic").unwrap();
    assert_eq!(panic["severity"], "critical");
    assert_eq!(panic["scope"], json!({"kind": "model", "model": "gpt"}));
    assert!(
        panic["recommendation"]
            .as_str()
            .is_some_and(|r| !r.is_empty())
    );
    assert_eq!(panic["count"], 1);
}

async fn restart(addr: std::net::SocketAddr) -> MockServer {
    MockServer::start(collie_mock::MockConfig {
        listen: addr,
        ..collie_mock::MockConfig::default()
    })
    .await
    .unwrap()
}

fn alerted(status: &Value, rule: &str, subject: &str) -> bool {
    status["alerts"].as_array().unwrap().iter().any(|a| {
        a["rule"] == rule && (a["scope"]["deployment"] == subject || a["scope"]["model"] == subject)
    })
}

/// Poll `/status` until `f` holds.
async fn eventually_async(gw: &Gw, f: impl Fn(&Value) -> bool) {
    for _ in 0..500 {
        let s = gw.admin_json("/status").await;
        if f(&s) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never true: {}", gw.admin_json("/status").await);
}
