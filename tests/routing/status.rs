//! The status view and page, and the health metrics: current, and what
//! routing would choose.

use super::*;

/// Chromium driven through its DevTools pipe (`--remote-debugging-pipe`:
/// NUL-terminated JSON messages on descriptors 3 and 4), so a test can read
/// the live DOM of a page it loaded once.
struct Browser {
    child: tokio::process::Child,
    to: tokio::process::ChildStdin,
    from: tokio::io::BufReader<tokio::process::ChildStdout>,
    next_id: u64,
    session: Option<String>,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn open(chromium: &str, url: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        // The shell hands the pipes to Chromium as descriptors 3 and 4.
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg("exec \"$0\" \"$@\" 3<&0 4>&1 0</dev/null 1>/dev/null")
            .arg(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-pipe",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut b = Browser {
            to: child.stdin.take().unwrap(),
            from: tokio::io::BufReader::new(child.stdout.take().unwrap()),
            child,
            next_id: 0,
            session: None,
            _profile: profile,
        };
        let target = b.call("Target.createTarget", json!({"url": url})).await;
        let attached = b
            .call(
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        b.session = Some(attached["sessionId"].as_str().unwrap().to_string());
        b
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).await.unwrap();
        loop {
            let mut buf = Vec::new();
            let n =
                tokio::time::timeout(Duration::from_secs(30), self.from.read_until(0, &mut buf))
                    .await
                    .expect("Chromium answers")
                    .unwrap();
            assert!(n > 0, "Chromium closed its pipe");
            buf.pop();
            let reply: Value = serde_json::from_slice(&buf).unwrap();
            // Events have no id.
            if reply["id"] == id {
                assert!(reply["error"].is_null(), "{method}: {reply}");
                return reply["result"].clone();
            }
        }
    }

    /// Evaluate a JavaScript expression in the page.
    async fn eval(&mut self, expression: &str) -> Value {
        self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        )
        .await["result"]["value"]
            .clone()
    }

    /// Wait until the expression is true in the page.
    async fn until(&mut self, expression: &str) {
        for _ in 0..300 {
            if self.eval(expression).await == true {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let dom = self.eval("document.body.innerHTML").await;
        panic!("never true in the page: {expression}\n{dom}");
    }
}

/// The status page in a real headless browser: it loads, lists every
/// deployment, and — loaded once, never reloaded — shows a breaker opening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_renders_in_headless_chromium() {
    let Some(chromium) = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        panic!(
            "Chromium is required for this test: run deploy/setup.sh (installs Debian's chromium)"
        );
    };
    let a = mock_with(Behavior::default().status(500)).await;
    let b = mock().await;
    let z = mock().await;
    let live = json!({"probe": "off", "failures_to_open": 1, "cooldown": "60s"});
    let gw = gateway(&pool_config(
        &[
            member("a", &a).health(live.clone()),
            member("b", &b).health(live.clone()),
        ],
        |p| p,
        &z,
    ))
    .await;
    let mut page = Browser::open(chromium, &format!("{}/", gw.admin)).await;
    let row = |id: &str| {
        format!(
            "((document.querySelector('#deployments tr[data-id=\"{id}\"]') || {{}}).innerHTML || '')"
        )
    };
    page.until(&format!("{}.includes('model-a')", row("a")))
        .await;
    for id in ["a", "b", "z"] {
        page.until(&format!("{}.includes('<td>{id}</td>')", row(id)))
            .await;
    }
    let body = page.eval("document.body.innerHTML").await;
    assert!(
        !body.as_str().unwrap().contains("badge open"),
        "no breaker open yet"
    );
    // Marks this load of the page: a reload would lose it.
    page.eval("window.loadedOnce = 'yes'").await;
    // One failure opens `a`'s breaker; the page shows it by itself.
    gw.chat(hello("m")).send().await.unwrap();
    gw.chat(hello("m")).send().await.unwrap();
    until(&gw, "a", "breaker", "open").await;
    page.until(&format!("{}.includes('badge open')", row("a")))
        .await;
    assert!(
        page.eval(&row("a"))
            .await
            .as_str()
            .unwrap()
            .contains("badge unhealthy")
    );
    assert!(
        !page
            .eval(&row("b"))
            .await
            .as_str()
            .unwrap()
            .contains("badge open")
    );
    assert_eq!(page.eval("window.loadedOnce").await, "yes", "not reloaded");
    let _ = page.child.kill().await;
}

/// The status view's recommendation is routing's own choice: the pool's
/// policy, provider limits and `Retry-After` blocks all count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_recommends_what_routing_would_choose() {
    let a = mock().await;
    let b = mock().await;
    let c = mock().await;
    let z = mock().await;
    let off = json!({"probe": "off"});
    let conf = pool_config(
        &[
            member("a", &a).health(off.clone()),
            member("b", &b).set("rpm", 2).health(off.clone()),
            member("c", &c).health(off),
        ],
        |p| p.set("policy", "cost").set("retries", 2),
        &z,
    )
    .price("model-c", 1.0, 3.0);
    let gw = gateway(&conf).await;
    // Cheapest first, though `a` is listed first.
    assert_eq!(recommended(&gw, "m").await, "model-b");
    // `b`'s own per-minute limit is spent: the next cheapest.
    assert_eq!(served_by(&gw, "m", 2).await, ["model-b", "model-b"]);
    assert_eq!(recommended(&gw, "m").await, "model-c");
    // `c` asks for 30 s of rest: the pricey one is all that is left.
    c.push(Behavior::default().status(429).retry_after("30"));
    assert_eq!(served_by(&gw, "m", 1).await, ["model-a"]);
    assert_eq!(recommended(&gw, "m").await, "model-a");
}

/// Health gauges are current when scraped, fallbacks are counted when a
/// request moves down its chain (served or not) and not for retries inside
/// a pool, and a deployment dropped by a reload leaves no health series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_are_current_and_follow_the_config() {
    let a = mock().await;
    let b = mock_with(Behavior::default().status(500)).await;
    let z = mock().await;
    let probed = json!({"interval": "100ms"});
    let live = json!({"probe": "off", "failures_to_open": 1, "cooldown": "60s"});
    let gw = gateway(&pool_config(
        &[
            member("a", &a).health(probed.clone()),
            member("b", &b).health(live.clone()),
        ],
        |p| p.set("retries", 1),
        &z,
    ))
    .await;
    until(&gw, "a", "state", "healthy").await;
    // Until `b` has been tried once: a retry inside the pool, served by `a`.
    let mut sent = 0;
    while b.completion_calls() == 0 {
        let r = gw.chat(hello("m")).send().await.unwrap();
        assert_eq!(r.headers()["x-collie-model"], "model-a");
        sent += 1;
        assert!(sent < 5);
    }
    let m = gw.metrics_after(sent).await;
    assert_eq!(metric_sum(&m, "collie_fallbacks_total", &[]), 0.0);
    // Scraped at once, not at some later tick.
    let gauge = |m: &str, name: &str, id: &str| metric_sum(m, name, &[("deployment", id)]);
    assert_eq!(gauge(&m, "collie_breaker_state", "b"), 2.0, "open");
    assert_eq!(gauge(&m, "collie_deployment_health", "b"), 3.0);
    assert_eq!(gauge(&m, "collie_breaker_state", "a"), 0.0);
    assert_eq!(gauge(&m, "collie_deployment_health", "a"), 1.0);
    assert!(gauge(&m, "collie_probe_duration_seconds_count", "a") >= 1.0);
    assert_eq!(
        metric_sum(
            &m,
            "collie_breaker_transitions_total",
            &[("deployment", "b"), ("to", "open")]
        ),
        1.0
    );
    // `a` fails its requests (its probes still pass): `fb` falls back to `z`.
    a.set_model_behavior("model-a", Behavior::default().status(500));
    let r = gw.chat(hello("fb")).send().await.unwrap();
    assert_eq!(r.headers()["x-collie-model"], "model-z");
    // And when `z` fails too, the fallback is still counted.
    z.set_default(Behavior::default().status(500));
    assert_eq!(gw.chat(hello("fb")).send().await.unwrap().status(), 500);
    let m = gw.metrics_after(sent + 2).await;
    for outcome in ["served", "failed"] {
        assert_eq!(
            metric_sum(
                &m,
                "collie_fallbacks_total",
                &[("from", "model-a"), ("to", "model-z"), ("outcome", outcome)]
            ),
            1.0,
            "{outcome}"
        );
    }
    // `b` leaves the config: its health series go with it.
    gw.reload(&pool_config(
        &[member("a", &a).health(probed)],
        |p| p.set("retries", 1),
        &z,
    ));
    let m = gw.metrics().await;
    for name in [
        "collie_deployment_health",
        "collie_breaker_state",
        "collie_breaker_transitions_total",
        "collie_probe_duration_seconds",
    ] {
        assert!(
            !m.lines()
                .any(|l| l.starts_with(name) && l.contains("deployment=\"b\"")),
            "{name} still has b"
        );
    }
    assert_eq!(gauge(&m, "collie_deployment_health", "a"), 1.0);
}
