//! Health probes: what they send and cost, when they mark a deployment
//! unhealthy and healthy again, and that an unproven one gets no traffic.

use super::*;

/// A deployment that starts refusing connections is unhealthy exactly when
/// `unhealthy_after` probes in a row have failed (every status view shows
/// both together), gets no traffic after that, and comes back when probes
/// pass again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_deployment_is_taken_out_by_probes_and_comes_back() {
    let a = mock().await;
    let b = mock().await;
    let z = mock().await;
    let addr = a.addr();
    let probes = json!({"interval": "150ms", "timeout": "300ms", "healthy_after": 1,
                        "unhealthy_after": 3, "cooldown": "60s"});
    let gw = gateway(&pool_config(
        &[
            member("a", &a).health(probes.clone()),
            member("b", &b).health(probes.clone()),
        ],
        |p| p,
        &z,
    ))
    .await;
    until(&gw, "a", "state", "healthy").await;
    until(&gw, "b", "state", "healthy").await;
    // `a` stops accepting connections.
    a.shutdown().await;
    let mut views = 0;
    loop {
        let d = deployment(&gw, "a").await;
        let failed = d["probe_failures"].as_u64().unwrap();
        assert_eq!(
            d["state"] == "unhealthy",
            failed >= 3,
            "unhealthy exactly after 3 failed probes: {d}"
        );
        if failed >= 3 {
            assert_eq!(d["last_probe"]["ok"], false);
            break;
        }
        views += 1;
        assert!(views < 1000, "never marked unhealthy: {d}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = b.completion_calls();
    let models = served_by(&gw, "m", 20).await;
    assert!(
        models.iter().all(|m| m == "model-b"),
        "no traffic to a: {models:?}"
    );
    assert_eq!(b.completion_calls() - before, 20);
    let m = gw.metrics_after(20).await;
    assert_eq!(
        metric_sum(&m, "collie_upstream_attempts_total", &[("deployment", "a")]),
        0.0,
        "not even a failed attempt reached a"
    );
    // It comes back on the same port; probes pass and traffic returns.
    let a = MockServer::start(MockConfig {
        listen: addr,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    until(&gw, "a", "state", "healthy").await;
    let models = served_by(&gw, "m", 20).await;
    assert!(models.iter().any(|m| m == "model-a"));
    assert!(a.completion_calls() > 0);
}

/// Each probe runs on its own: one waiting out a long timeout holds up no
/// other deployment's probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_probe_does_not_hold_up_other_probes() {
    let hanging = mock_with(Behavior::default().hang()).await;
    let b = mock().await;
    let z = mock().await;
    let gw = gateway(&pool_config(
        &[
            member("a", &hanging).health(json!({"interval": "100ms", "timeout": "60s"})),
            member("b", &b).health(json!({"interval": "100ms", "timeout": "1s"})),
        ],
        |p| p,
        &z,
    ))
    .await;
    eventually("b probed eight times", || b.request_count() >= 8).await;
    assert_eq!(hanging.request_count(), 1, "a's one probe is still waiting");
    assert_eq!(deployment(&gw, "a").await["state"], "unknown");
    drop(gw);
}

/// A reload that shortens a probe interval takes effect: the probe loop's
/// wake-ups follow the config now, not the one it started with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_probe_interval_takes_effect() {
    let a = mock().await;
    let z = mock().await;
    let gw = gateway(&pool_config(
        &[member("a", &a).health(json!({"interval": "1h"}))],
        |p| p,
        &z,
    ))
    .await;
    until(&gw, "a", "state", "healthy").await;
    assert_eq!(a.request_count(), 1, "one probe an hour");
    gw.reload(&pool_config(
        &[member("a", &a).health(json!({"interval": "50ms"}))],
        |p| p,
        &z,
    ));
    eventually("a probed every 50 ms", || a.request_count() >= 20).await;
    assert_eq!(a.completion_calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_probes_spend_no_tokens_and_completion_probes_are_opt_in() {
    let a = mock().await;
    let b = mock().await;
    let z = mock().await;
    let gw = gateway(&pool_config(
        &[
            member("a", &a).health(json!({"interval": "100ms"})),
            member("b", &b).health(json!({"probe": "completion", "interval": "100ms"})),
        ],
        |p| p,
        &z,
    ))
    .await;
    eventually("a probed several times", || a.request_count() >= 3).await;
    eventually("b probed several times", || b.completion_calls() >= 3).await;
    assert_eq!(a.completion_calls(), 0, "model-list probes cost nothing");
    assert!(
        posts(&b)
            .iter()
            .all(|r| String::from_utf8_lossy(&r.body).contains("\"max_tokens\":1"))
    );
    until(&gw, "a", "state", "healthy").await;
    let d = deployment(&gw, "a").await;
    assert_eq!(d["last_probe"]["ok"], true);
}

/// The default probe sends the deployment's provider key; no probe outcome
/// writes a key to the log, whatever the log level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_send_the_provider_key_and_never_log_it() {
    let a = mock().await;
    let z = mock().await;
    let gw = gateway(&pool_config(
        &[member("a", &a)
            .key("KEY_A")
            .health(json!({"interval": "100ms"}))],
        |p| p,
        &z,
    ))
    .await;
    until(&gw, "a", "state", "healthy").await;
    let probe = a
        .requests()
        .into_iter()
        .find(|r| r.method == "GET")
        .unwrap();
    assert!(probe.path.ends_with("/v1/models"));
    assert_eq!(
        recorded_header(&probe, "authorization").as_deref(),
        Some(format!("Bearer {PROVIDER_KEY_A}").as_str())
    );
    drop(gw);

    // The real binary at trace level: a key the provider refuses, a
    // provider that fails, one that is down, and one that answers.
    let refusing = mock_with(Behavior::default().status(401)).await;
    let failing = mock_with(Behavior::default().status(500)).await;
    let fine = mock().await;
    let down = format!("http://127.0.0.1:{}/v1", free_port());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("collie.log");
    let fast = json!({"interval": "100ms", "timeout": "500ms", "unhealthy_after": 1});
    let deployment = |id: &str, url: &str, key: &str| {
        Deployment::new(id, url, "m").key(key).health(fast.clone())
    };
    let conf = Conf::two_tenants(&[])
        .model(Model::new("m", &["p"]))
        .pool(Pool::new("p", &["r", "f", "d", "ok"]))
        .deployment(deployment("r", &refusing.base_url(), "KEY_A"))
        .deployment(deployment("f", &failing.base_url(), "KEY_B"))
        .deployment(deployment("d", &down, "KEY_A"))
        .deployment(deployment("ok", &fine.base_url(), "KEY_B"));
    let trace = Log {
        file: &log,
        rust_log: "trace",
    };
    let Process {
        mut child, admin, ..
    } = run_collie(dir.path(), &conf, Some(trace));
    let client = reqwest::Client::new();
    let mut last = Value::Null;
    for _ in 0..500 {
        if let Ok(r) = client.get(format!("{admin}/status")).send().await {
            if let Ok(json) = r.json::<Value>().await {
                last = json;
                let state = |id: &str| {
                    last["deployments"]
                        .as_array()
                        .and_then(|ds| ds.iter().find(|d| d["id"] == id))
                        .map(|d| d["state"].clone())
                };
                let down = ["r", "f", "d"]
                    .iter()
                    .all(|id| state(id).is_some_and(|s| s == "unhealthy"));
                if down && state("ok").is_some_and(|s| s == "healthy") {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("breaker closed → open"),
        "probe failures were logged: {last}\n{text}"
    );
    for key in [PROVIDER_KEY_A, PROVIDER_KEY_B] {
        assert!(!text.contains(key), "a provider key in the log");
    }
    assert!(
        !text.contains("canary"),
        "no part of a provider key in the log"
    );
}

/// A `/models` probe on a pooled connection the provider just closed tries
/// a fresh one instead of failing (with `unhealthy_after: 1` one such race
/// would open the breaker); a connect probe always makes a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_retry_a_stale_connection_and_connect_afresh() {
    let (models_addr, models_conns) = closing_provider().await;
    let (connect_addr, connect_conns) = closing_provider().await;
    let z = mock().await;
    let once = json!({"interval": "1h", "timeout": "2s", "healthy_after": 1, "unhealthy_after": 1});
    let mut connect = once.clone();
    connect["probe"] = json!("connect");
    let conf = Conf::two_tenants(&[])
        .model(Model::new("m", &["p"]))
        .pool(Pool::new("p", &["a", "c"]))
        .pool(Pool::new("q", &["z"]))
        .deployment(Deployment::new("a", &format!("http://{models_addr}/v1"), "m").health(once))
        .deployment(Deployment::new("c", &format!("http://{connect_addr}/v1"), "m").health(connect))
        .deployment(Deployment::on("z", &z, "m").health(json!({"probe": "off"})));
    let gw = gateway(&conf).await;
    until(&gw, "a", "state", "healthy").await;
    until(&gw, "c", "state", "healthy").await;
    let book = &gw.running.state.health;
    // The first probe's connection is pooled; the provider closes it when
    // it is used again. The probe still passes, on a new connection.
    let result = book.probe_now("a").await.unwrap();
    assert!(result.ok, "{result:?}");
    assert_eq!(models_conns.load(Ordering::SeqCst), 2);
    let d = deployment(&gw, "a").await;
    assert_eq!(d["breaker"], "closed");
    assert_eq!(d["state"], "healthy");
    // Every connect probe is a connect.
    let before = connect_conns.load(Ordering::SeqCst);
    for _ in 0..3 {
        assert!(book.probe_now("c").await.unwrap().ok);
    }
    eventually("three new connections", || {
        connect_conns.load(Ordering::SeqCst) == before + 3
    })
    .await;
}

/// A live success does not make an unknown deployment known: while a proven
/// sibling serves, a deployment no probe has passed gets no traffic —
/// also one added by a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_deployments_get_no_traffic_while_a_proven_sibling_serves() {
    let a = mock().await;
    // `c` serves completions, but its model list never answers: no probe
    // of it ever passes.
    let c = mock_with(Behavior::default().hang()).await;
    c.set_model_behavior("model-c", Behavior::default());
    let z = mock().await;
    let fast = json!({"interval": "100ms", "timeout": "1s"});
    let stuck = json!({"interval": "1h", "timeout": "60s"});
    let gw = gateway(&pool_config(
        &[
            member("a", &a).health(fast.clone()),
            member("c", &c).health(stuck.clone()),
        ],
        |p| p.set("retries", 1),
        &z,
    ))
    .await;
    until(&gw, "a", "state", "healthy").await;
    assert_eq!(deployment(&gw, "c").await["state"], "unknown");
    // `a` fails once: the retry inside the pool goes to `c` and succeeds.
    a.push(Behavior::default().status(500));
    let r = gw.chat(hello("m")).send().await.unwrap();
    assert_eq!(r.headers()["x-collie-model"], "model-c");
    let d = deployment(&gw, "c").await;
    assert_eq!(d["state"], "unknown", "one live success proves nothing");
    assert_eq!(d["served"], 1);
    let models = served_by(&gw, "m", 20).await;
    assert!(models.iter().all(|m| m == "model-a"), "{models:?}");
    assert_eq!(c.completion_calls(), 1);
    // Added on reload: unknown too, and left alone.
    let d2 = mock_with(Behavior::default().hang()).await;
    d2.set_model_behavior("model-d", Behavior::default());
    gw.reload(&pool_config(
        &[
            member("a", &a).health(fast.clone()),
            member("c", &c).health(stuck.clone()),
            member("d", &d2).health(stuck),
        ],
        |p| p.set("retries", 1),
        &z,
    ));
    assert_eq!(deployment(&gw, "d").await["state"], "unknown");
    let models = served_by(&gw, "m", 20).await;
    assert!(models.iter().all(|m| m == "model-a"), "{models:?}");
    assert_eq!(d2.completion_calls(), 0);
    assert_eq!(c.completion_calls(), 1);
}
