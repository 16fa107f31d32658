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
    // One failed request is shown with its count, and as too few to judge
    // by (not a bare "100.0 %" beside a state).
    page.until(&format!(
        "{}.includes('1 of 1 (100.0 %) · too few to judge')",
        row("a")
    ))
    .await;
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

/// The page with an admin token, loaded once: a deployment whose provider
/// stops answering goes unhealthy and comes back, driven by its probes,
/// and the page shows both — with the alerts in its feed — by push, never
/// reloaded; its "check now" button forces a probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_a_deployment_going_down_and_back_live_with_its_alerts() {
    let chromium = chromium();
    let a = mock().await;
    let addr = a.addr();
    let b = mock().await;
    let z = mock().await;
    let probes = json!({"interval": "100ms", "timeout": "300ms", "healthy_after": 1,
                        "unhealthy_after": 2, "cooldown": "60s"});
    let token = "page-admin-token-0123456789";
    let conf = pool_config(
        &[
            member("a", &a).health(probes.clone()),
            member("b", &b).health(json!({"interval": "1h"})),
        ],
        |p| p,
        &z,
    )
    .set("admin_token_env", "ADMIN_TOKEN");
    let gw = gateway_with_env(&conf, &[("ADMIN_TOKEN", token)]).await;
    let mut page = Browser::open(&chromium, &format!("{}/#token={token}", gw.admin)).await;
    let row = |id: &str| {
        format!(
            "((document.querySelector('#deployments tr[data-id=\"{id}\"]') || {{}}).innerHTML || '')"
        )
    };
    let alert = |rule: &str, scope: &str| {
        format!(
            "!!document.querySelector('#alerts li[data-rule=\"{rule}\"][data-scope=\"{scope}\"]')"
        )
    };
    page.until(&format!("{}.includes('badge healthy')", row("a")))
        .await;
    page.until("document.getElementById('link').textContent === 'live'")
        .await;
    page.eval("window.loadedOnce = 'yes'").await;
    // `a` stops accepting connections: two failed probes take it out.
    a.shutdown().await;
    page.until(&format!("{}.includes('badge unhealthy')", row("a")))
        .await;
    page.until(&alert("deployment_unhealthy", "a")).await;
    let item = page
        .eval(
            "document.querySelector('#alerts li[data-rule=\"deployment_unhealthy\"]').textContent",
        )
        .await;
    let item = item.as_str().unwrap();
    assert!(item.contains("warning"), "{item}");
    assert!(
        item.contains("Check the provider"),
        "the recommendation: {item}"
    );
    // It comes back on the same port; a passing probe brings it back.
    let _a = MockServer::start(MockConfig {
        listen: addr,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    page.until(&format!("{}.includes('badge healthy')", row("a")))
        .await;
    page.until(&alert("deployment_recovered", "a")).await;
    // Availability counts the failed probes with the passing ones.
    let a_row = page.eval(&row("a")).await;
    assert!(a_row.as_str().unwrap().contains(" % of "), "{a_row}");
    // `b` is probed once an hour; "check now" probes it at once.
    page.eval("document.querySelector('button.check[data-id=\"b\"]').click()")
        .await;
    page.until(&format!("{}.includes('forced check passed')", row("b")))
        .await;
    assert_eq!(page.eval("window.loadedOnce").await, "yes", "not reloaded");
    let _ = page.child.kill().await;
}

fn chromium() -> String {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or_else(|| {
            panic!(
                "Chromium is required for this test: run deploy/setup.sh (installs Debian's chromium)"
            )
        })
        .to_string()
}

/// Read `/status/events` events (their `data:` as JSON) until `n` came.
async fn events(r: &mut reqwest::Response, n: usize) -> Vec<Value> {
    let mut buf = String::new();
    let mut out = Vec::new();
    while out.len() < n {
        let chunk = tokio::time::timeout(Duration::from_secs(10), r.chunk())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .expect("the stream goes on");
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            assert!(block.contains("event: status"), "{block}");
            let data = block
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap();
            out.push(serde_json::from_str(data).unwrap());
        }
    }
    out
}

/// `/status/events` needs the admin token like `/status`, outlives the
/// connection guard's head and idle deadlines, holds up no other admin
/// request, pushes a change at once, and serves a bounded number of
/// streams; `POST /status/check` is protected the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_and_the_forced_check_are_protected_and_bounded() {
    let a = mock().await;
    let b = mock().await;
    let z = mock().await;
    let token = "stream-admin-token-0123456789";
    let conf = pool_config(
        &[
            member("a", &a).health(json!({"interval": "1h"})),
            member("b", &b).health(json!({"probe": "off"})),
        ],
        |p| p,
        &z,
    )
    .set("admin_token_env", "ADMIN_TOKEN")
    .set("head_timeout", "1s")
    .set("keepalive_timeout", "1s");
    let gw = gateway_with_env(&conf, &[("ADMIN_TOKEN", token)]).await;
    let bearer = format!("Bearer {token}");
    let stream = || {
        gw.client
            .get(format!("{}/status/events", gw.admin))
            .header("authorization", &bearer)
            .send()
    };
    let check = |id: &str| {
        gw.client
            .post(format!("{}/status/check?deployment={id}", gw.admin))
            .header("authorization", &bearer)
            .send()
    };
    // Refused without the token, and with a wrong one.
    for auth in [None, Some("Bearer wrong-token")] {
        let mut r = gw.client.get(format!("{}/status/events", gw.admin));
        let mut c = gw
            .client
            .post(format!("{}/status/check?deployment=a", gw.admin));
        if let Some(v) = auth {
            r = r.header("authorization", v);
            c = c.header("authorization", v);
        }
        assert_eq!(r.send().await.unwrap().status(), 401);
        assert_eq!(c.send().await.unwrap().status(), 401);
    }
    let r = stream().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    // Open longer than the head and idle deadlines (1 s each): events keep
    // coming (one at once, then at least every 2 s), and other requests to
    // the admin listener are answered meanwhile.
    let started = std::time::Instant::now();
    let reader = tokio::spawn(async move {
        let mut r = r;
        let got = events(&mut r, 3).await;
        (r, got)
    });
    for _ in 0..5 {
        let h = gw
            .client
            .get(format!("{}/healthz", gw.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(h.status(), 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (first, got) = reader.await.unwrap();
    assert!(started.elapsed() > Duration::from_secs(2));
    assert!(
        got.iter()
            .all(|v| v["deployments"].is_array() && v["alerts"].is_array())
    );
    // A forced check: probes `a` now (its interval is an hour), and the
    // stream shows it at once.
    let mut live = stream().await.unwrap();
    events(&mut live, 1).await;
    let probed = a.request_count();
    let r = check("a").await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(a.request_count(), probed + 1);
    let after = events(&mut live, 1).await;
    assert_eq!(after[0]["deployments"][0]["last_probe"]["ok"], true);
    // Refused: an unknown deployment, one without probes, another origin
    // (a page elsewhere cannot make a browser act here), a GET.
    assert_eq!(check("nope").await.unwrap().status(), 404);
    assert_eq!(check("b").await.unwrap().status(), 409);
    let foreign = gw
        .client
        .post(format!("{}/status/check?deployment=a", gw.admin))
        .header("authorization", &bearer)
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), 403);
    let get = gw
        .client
        .get(format!("{}/status/check?deployment=a", gw.admin))
        .header("authorization", &bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 405);
    // At most eight streams at once (two are open above; unread or not).
    let mut open = vec![first, live];
    let mut refused = None;
    for _ in 0..8 {
        let r = stream().await.unwrap();
        if r.status() == 503 {
            refused = Some(r);
            break;
        }
        open.push(r);
    }
    assert_eq!(open.len(), 8);
    let refused = refused.expect("the ninth stream is refused");
    assert_eq!(refused.headers()["retry-after"], "5");
    // A stream whose client left frees its place (noticed at its next write).
    drop(open);
    let mut again = None;
    for _ in 0..100 {
        let r = stream().await.unwrap();
        if r.status() == 200 {
            again = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(again.is_some(), "a place was freed");
}
