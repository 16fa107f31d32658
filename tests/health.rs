//! Health over real sockets: probes, breakers, routing policies, route
//! aliases, retries inside a pool, panic mode, the status view.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly"
)]

mod common;

use collie_mock::{Behavior, MockConfig, MockServer};
use common::*;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

fn hello(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello"}]})
}

/// Deployment `id` on `mock`, serving `model-{id}` with short timeouts.
fn member(id: &str, mock: &MockServer) -> Deployment {
    Deployment::on(id, mock, &format!("model-{id}"))
        .timeouts(json!({"connect": "500ms", "first_byte": "2s"}))
}

/// One pool `p` of these deployments, set up further by `pool`; model `m`
/// → p, model `fb` → p then pool `q` (deployment `z`, on `fallback`).
fn pool_config(
    members: &[Deployment],
    pool: impl FnOnce(Pool) -> Pool,
    fallback: &MockServer,
) -> Conf {
    let ids: Vec<&str> = members.iter().map(Part::name).collect();
    let conf = Conf::two_tenants(&[])
        .model(Model::new("m", &["p"]))
        .model(Model::new("fb", &["p", "q"]))
        .pool(pool(Pool::new("p", &ids)))
        .pool(Pool::new("q", &["z"]));
    members
        .iter()
        .cloned()
        .fold(conf, Conf::deployment)
        .deployment(Deployment::on("z", fallback, "model-z").health(json!({"probe": "off"})))
        .price("model-a", 5.0, 15.0)
        .price("model-b", 0.5, 1.5)
}

/// What the status view recommends for `model` now.
async fn recommended(gw: &Gw, model: &str) -> Value {
    status(gw).await["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == model)
        .unwrap()["recommended"]
        .clone()
}

async fn status(gw: &Gw) -> Value {
    gw.admin_json("/status").await
}

async fn deployment(gw: &Gw, id: &str) -> Value {
    let s = status(gw).await;
    s["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == id)
        .cloned()
        .unwrap()
}

/// Poll the status until `id`'s `field` equals `want`.
async fn until(gw: &Gw, id: &str, field: &str, want: &str) {
    for _ in 0..500 {
        if deployment(gw, id).await[field] == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "{id}.{field} never became {want}: {}",
        deployment(gw, id).await
    );
}

async fn served_by(gw: &Gw, model: &str, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let r = gw.chat(hello(model)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        out.push(r.headers()["x-collie-model"].to_str().unwrap().to_string());
    }
    out
}

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
async fn breaker_opens_half_opens_for_exactly_one_trial_and_closes() {
    let a = mock_with(Behavior::default().status(500)).await;
    let z = mock().await;
    let live_only = json!({"probe": "off", "failures_to_open": 3, "cooldown": "400ms"});
    let gw = gateway(&pool_config(
        &[member("a", &a).health(live_only.clone())],
        |p| p,
        &z,
    ))
    .await;
    for _ in 0..3 {
        let r = gw.chat(hello("fb")).send().await.unwrap();
        assert_eq!(r.headers()["x-collie-model"], "model-z");
    }
    until(&gw, "a", "breaker", "open").await;
    // While open, `a` gets nothing.
    served_by(&gw, "fb", 5).await;
    assert_eq!(a.completion_calls(), 3);
    // After the cooldown: one trial only, even with requests in parallel.
    a.set_default(Behavior::default().delay(Duration::from_millis(400)));
    tokio::time::sleep(Duration::from_millis(450)).await;
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let req = gw.chat(hello("fb"));
        tasks.push(tokio::spawn(async move {
            req.send().await.unwrap().headers()["x-collie-model"]
                .to_str()
                .unwrap()
                .to_string()
        }));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut to_a = 0;
    for t in tasks {
        if t.await.unwrap() == "model-a" {
            to_a += 1;
        }
    }
    assert_eq!(to_a, 1, "half-open admits exactly one request");
    assert_eq!(a.completion_calls(), 4);
    until(&gw, "a", "breaker", "closed").await;
    let m = gw.metrics().await;
    assert!(
        metric_sum(
            &m,
            "collie_breaker_transitions_total",
            &[("deployment", "a"), ("to", "open")]
        ) >= 1.0
    );
    assert!(
        metric_sum(
            &m,
            "collie_breaker_transitions_total",
            &[("deployment", "a"), ("to", "closed")]
        ) >= 1.0
    );
    // The cooldown's end is a transition too, logged and counted once.
    assert_eq!(
        metric_sum(
            &m,
            "collie_breaker_transitions_total",
            &[("deployment", "a"), ("to", "half_open")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_seven_keeps_traffic_away_for_seven_seconds() {
    let a = mock().await;
    let z = mock().await;
    a.push(Behavior::default().status(429).retry_after("7"));
    let gw = gateway(&pool_config(
        &[member("a", &a).health(json!({"probe": "off"}))],
        |p| p,
        &z,
    ))
    .await;
    let r = gw.chat(hello("fb")).send().await.unwrap();
    assert_eq!(r.headers()["x-collie-model"], "model-z");
    let d = deployment(&gw, "a").await;
    assert_eq!(d["breaker"], "open");
    let left = d["breaker_open_for_ms"].as_u64().unwrap();
    assert!((6000..=7000).contains(&left), "open for {left} ms");
    // Through the window: nothing reaches `a`.
    for _ in 0..6 {
        served_by(&gw, "fb", 2).await;
        assert_eq!(a.completion_calls(), 1);
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(served_by(&gw, "fb", 1).await, vec!["model-a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_latency_prefers_the_faster_deployment() {
    let slow = mock_with(Behavior::default().delay(Duration::from_millis(80))).await;
    let fast = mock_with(Behavior::default().delay(Duration::from_millis(5))).await;
    let z = mock().await;
    let off = json!({"probe": "off"});
    let gw = gateway(&pool_config(
        &[
            member("a", &slow).health(off.clone()),
            member("b", &fast).health(off.clone()),
        ],
        |p| p.set("policy", "least_latency"),
        &z,
    ))
    .await;
    let models = served_by(&gw, "m", 100).await;
    let fast_share = models.iter().filter(|m| *m == "model-b").count();
    assert!(fast_share >= 80, "fast deployment got {fast_share} of 100");
    assert!(
        fast_share < 100,
        "the slower one is still measured now and then"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_aware_prefers_the_cheaper_healthy_deployment() {
    let pricey = mock().await;
    let cheap = mock().await;
    let z = mock().await;
    let live = json!({"probe": "off", "failures_to_open": 1, "cooldown": "30s"});
    let gw = gateway(&pool_config(
        &[
            member("a", &pricey).health(live.clone()),
            member("b", &cheap).health(live.clone()),
        ],
        |p| p.set("policy", "cost").set("retries", 1),
        &z,
    ))
    .await;
    assert!(served_by(&gw, "m", 20).await.iter().all(|m| m == "model-b"));
    // The cheap one fails: its breaker opens and the pricier one serves.
    cheap.set_default(Behavior::default().status(503));
    let r = gw.chat(hello("m")).send().await.unwrap();
    assert_eq!(
        r.headers()["x-collie-model"],
        "model-a",
        "retried inside the pool"
    );
    assert_eq!(r.headers()["x-collie-attempts"], "2");
    assert!(served_by(&gw, "m", 5).await.iter().all(|m| m == "model-a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_inside_a_pool_before_the_next_pool() {
    let a = mock_with(Behavior::default().status(500)).await;
    let b = mock_with(Behavior::default().status(502)).await;
    let c = mock().await;
    let z = mock().await;
    let off = json!({"probe": "off"});
    let conf = pool_config(
        &[
            member("a", &a).health(off.clone()),
            member("b", &b).health(off.clone()),
            member("c", &c).health(off),
        ],
        |p| p.set("retries", 2),
        &z,
    )
    .set("retry", json!({"backoff": "10ms", "max_backoff": "50ms"}));
    let gw = gateway(&conf).await;
    let r = gw.chat(hello("fb")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-collie-model"], "model-c");
    assert_eq!(r.headers()["x-collie-attempts"], "3");
    assert_eq!(z.completion_calls(), 0, "the pool's own members first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_unhealthy_answers_at_once_then_recovers() {
    let a = mock_with(Behavior::default().status(500)).await;
    let z = mock().await;
    let live = json!({"probe": "off", "failures_to_open": 1, "cooldown": "500ms"});
    let gw = gateway(&pool_config(
        &[member("a", &a).health(live.clone())],
        |p| p,
        &z,
    ))
    .await;
    let r = gw.chat(hello("m")).send().await.unwrap();
    assert_eq!(r.status(), 500);
    until(&gw, "a", "breaker", "open").await;
    // Panic mode: every deployment of the chain is unhealthy.
    let started = std::time::Instant::now();
    let r = gw.chat(hello("m")).send().await.unwrap();
    let took = started.elapsed();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-collie-error"], "no_healthy_upstream");
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(a.completion_calls(), 1, "answered without an upstream call");
    println!("panic-mode answer in {took:?}");
    // The provider recovers: after the cooldown one trial goes through and
    // closes the breaker.
    a.set_default(Behavior::default());
    tokio::time::sleep(Duration::from_millis(550)).await;
    let r = gw.chat(hello("m")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    until(&gw, "a", "breaker", "closed").await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_aliases_follow_hints_and_priorities() {
    let a = mock().await;
    let b = mock().await;
    let z = mock().await;
    let off = json!({"probe": "off"});
    let routes = json!([
        {"hint": "code", "fallback": ["pa"]},
        {"priorities": [1, 2], "fallback": ["pb"]},
    ]);
    let conf = pool_config(
        &[
            member("a", &a).health(off.clone()),
            member("b", &b).health(off),
        ],
        |p| p,
        &z,
    )
    .model_first(Model::new("best", &["q"]).set("routes", routes))
    .pool_first(Pool::new("pb", &["b"]))
    .pool_first(Pool::new("pa", &["a"]));
    let gw = gateway(&conf).await;
    let ask = |hint: Option<&str>, tenant: &str, key: &str| {
        let mut r = gw.post_as(CHAT, tenant, key).json(&hello("best"));
        if let Some(h) = hint {
            r = r.header("x-collie-route", h);
        }
        r.send()
    };
    let model = |r: reqwest::Response| r.headers()["x-collie-model"].to_str().unwrap().to_string();
    assert_eq!(
        model(ask(Some("code"), "alpha", ALPHA_KEY).await.unwrap()),
        "model-a"
    );
    assert_eq!(
        model(ask(None, "alpha", ALPHA_KEY).await.unwrap()),
        "model-b",
        "priority 1"
    );
    let s = status(&gw).await;
    let best = s["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "best")
        .unwrap();
    assert_eq!(best["routes"][0]["hint"], "code");
    assert_eq!(best["routes"][0]["recommended"], "model-a");
}

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

/// The request deadline caps an attempt's wait for the response head, even
/// when the deployment's own first-byte timeout is longer, and the client
/// gets an OpenAI-style 504. A cut attempt is not held against the
/// deployment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_deadline_cuts_a_waiting_attempt() {
    let a = mock_with(Behavior::default().hang()).await;
    let z = mock().await;
    let conf = pool_config(
        &[member("a", &a).health(json!({"probe": "off"}))],
        |p| p,
        &z,
    )
    .set("request_deadline", "300ms");
    let gw = gateway(&conf).await;
    let r = gw.chat(hello("m")).send().await.unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(r.headers()["x-collie-error"], "deadline_exceeded");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "deadline_exceeded");
    assert_eq!(v["error"]["type"], "upstream_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("deadline"));
    assert_eq!(a.completion_calls(), 1);
    let m = gw.metrics_after(1).await;
    assert_eq!(
        metric_sum(
            &m,
            "collie_upstream_attempts_total",
            &[("deployment", "a"), ("outcome", "deadline")]
        ),
        1.0
    );
    let d = deployment(&gw, "a").await;
    assert_eq!(d["breaker"], "closed");
    assert_eq!(d["error_ratio"], Value::Null, "no outcome recorded");
}

/// No attempt starts once the deadline has passed, even if it passed during
/// the backoff before a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_attempt_starts_after_the_deadline() {
    let a = mock_with(Behavior::default().status(500)).await;
    let b = mock().await;
    let z = mock().await;
    let off = json!({"probe": "off"});
    // A backoff drawn from up to an hour: the deadline passes during it.
    let conf = pool_config(
        &[
            member("a", &a).health(off.clone()),
            member("b", &b).health(off),
        ],
        |p| p.set("policy", "cost").set("retries", 1),
        &z,
    )
    .set("request_deadline", "200ms")
    .set("retry", json!({"backoff": "1h", "max_backoff": "1h"}))
    .price("model-a", 0.1, 0.1);
    let gw = gateway(&conf).await;
    let r = gw.chat(hello("fb")).send().await.unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(r.headers()["x-collie-error"], "deadline_exceeded");
    assert_eq!(a.completion_calls(), 1);
    assert_eq!(b.completion_calls(), 0, "no attempt after the deadline");
    assert_eq!(z.completion_calls(), 0);
}

/// A half-open breaker's one trial, cut by the request deadline, gives its
/// slot back: the next request is the trial, not a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trial_cut_by_the_deadline_frees_the_trial_slot() {
    let a = mock_with(Behavior::default().status(500)).await;
    let z = mock().await;
    let live = json!({"probe": "off", "failures_to_open": 1, "cooldown": "200ms"});
    let conf =
        pool_config(&[member("a", &a).health(live)], |p| p, &z).set("request_deadline", "400ms");
    let gw = gateway(&conf).await;
    assert_eq!(gw.chat(hello("m")).send().await.unwrap().status(), 500);
    until(&gw, "a", "breaker", "open").await;
    a.set_default(Behavior::default().hang());
    until(&gw, "a", "breaker", "half_open").await;
    let r = gw.chat(hello("m")).send().await.unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(a.completion_calls(), 2, "the trial went out");
    assert_eq!(deployment(&gw, "a").await["breaker"], "half_open");
    a.set_default(Behavior::default());
    let r = gw.chat(hello("m")).send().await.unwrap();
    assert_eq!(r.status(), 200, "the slot was given back");
    assert_eq!(a.completion_calls(), 3);
    until(&gw, "a", "breaker", "closed").await;
}

/// Panic mode with a concurrency limit: while the pool's one slot is held,
/// a request for a chain whose every member is unhealthy is answered 503
/// without queueing for the slot and without calling the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_mode_answers_without_queueing() {
    let a = mock().await;
    let z = mock().await;
    let probes =
        json!({"interval": "100ms", "timeout": "1s", "unhealthy_after": 1, "cooldown": "30s"});
    let conf = pool_config(
        &[member("a", &a)
            .health(probes)
            .timeouts(json!({"connect": "500ms", "first_byte": "60s"}))],
        |p| p.set("max_concurrency", 1),
        &z,
    );
    let gw = gateway(&conf).await;
    until(&gw, "a", "state", "healthy").await;
    // One slow request holds the pool's only slot throughout.
    a.push(Behavior::default().delay(Duration::from_secs(30)));
    let slow = tokio::spawn(gw.chat(hello("m")).send());
    eventually("the slow request reached a", || a.completion_calls() == 1).await;
    // Meanwhile the probes find `a` failing: the whole chain is unhealthy.
    a.set_default(Behavior::default().status(500));
    until(&gw, "a", "breaker", "open").await;
    let r = gw.chat(hello("m")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-collie-error"], "no_healthy_upstream");
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(a.completion_calls(), 1, "no upstream contact");
    let m = gw.metrics_after(1).await;
    assert_eq!(
        metric_sum(&m, "collie_queue_wait_seconds_count", &[]),
        0.0,
        "never queued for the slot"
    );
    assert!(!slow.is_finished(), "the slot was held all along");
    slow.abort();
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

/// Degraded (slow) members are passed over while a healthy one serves, and
/// tried before the next pool when it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degraded_members_are_tried_after_healthy_ones() {
    let a = mock_with(Behavior::default().delay(Duration::from_millis(150))).await;
    let b = mock().await;
    let z = mock().await;
    let live = json!({"probe": "off", "slow_after": "50ms"});
    let gw = gateway(&pool_config(
        &[
            member("a", &a).health(live.clone()),
            member("b", &b).health(live.clone()),
        ],
        |p| p.set("retries", 1),
        &z,
    ))
    .await;
    // The round robin sends `a` one of the first two requests.
    served_by(&gw, "m", 2).await;
    assert_eq!(a.completion_calls(), 1);
    until(&gw, "a", "state", "degraded").await;
    assert_eq!(deployment(&gw, "b").await["state"], "healthy");
    let models = served_by(&gw, "m", 20).await;
    assert!(models.iter().all(|m| m == "model-b"), "{models:?}");
    assert_eq!(a.completion_calls(), 1);
    // `b` fails: the degraded `a` is next, before the next pool.
    b.set_default(Behavior::default().status(500));
    let r = gw.chat(hello("fb")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-collie-model"], "model-a");
    assert_eq!(r.headers()["x-collie-attempts"], "2");
    assert_eq!(z.completion_calls(), 0);
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

/// Least-latency does not keep choosing a deployment that only fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_latency_does_not_prefer_a_failing_deployment() {
    let failing = mock_with(Behavior::default().status(500)).await;
    let ok = mock_with(Behavior::default().delay(Duration::from_millis(20))).await;
    let z = mock().await;
    let live = json!({"probe": "off", "failures_to_open": 1000, "degraded_error_ratio": 1.0});
    let gw = gateway(&pool_config(
        &[
            member("a", &failing).health(live.clone()),
            member("b", &ok).health(live.clone()),
        ],
        |p| p.set("policy", "least_latency").set("retries", 1),
        &z,
    ))
    .await;
    let models = served_by(&gw, "m", 40).await;
    assert!(models.iter().all(|m| m == "model-b"));
    // Tried first while unmeasured, then only by the policy's occasional
    // weighted pick.
    assert!(
        failing.completion_calls() <= 4,
        "the failing deployment was tried {} times in 40",
        failing.completion_calls()
    );
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

/// A provider on raw sockets that answers `GET …/models` on kept-alive
/// connections, except that it closes its first connection, unanswered,
/// when a second request arrives on it: what a provider's idle timeout does
/// to a pooled connection at the wrong moment. Counts accepted connections.
async fn closing_provider() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let number = count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut requests = 0;
                loop {
                    let mut chunk = [0u8; 4096];
                    let Ok(n) = conn.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        requests += 1;
                        if number == 0 && requests == 2 {
                            return;
                        }
                        let body = br#"{"object":"list","data":[]}"#;
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                            body.len()
                        );
                        if conn.write_all(head.as_bytes()).await.is_err()
                            || conn.write_all(body).await.is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, accepted)
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

/// The backoff before a retry comes before the next member is chosen:
/// nothing that choice takes (here: the member's one request of its
/// provider's per-minute limit) is held while the request sleeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backoff_holds_nothing_of_the_next_member() {
    let a = mock_with(Behavior::default().status(500)).await;
    let b = mock().await;
    let z = mock().await;
    let off = json!({"probe": "off"});
    // `a` is cheaper, so tried first; the backoff lasts past the deadline.
    let conf = pool_config(
        &[
            member("a", &a).health(off.clone()),
            member("b", &b).set("rpm", 1).health(off),
        ],
        |p| p.set("policy", "cost").set("retries", 1),
        &z,
    )
    .set("request_deadline", "3s")
    .set("retry", json!({"backoff": "1000h", "max_backoff": "1000h"}))
    .price("model-a", 0.1, 0.1)
    .model_first(Model::new("bonly", &["pb"]))
    .pool_first(Pool::new("pb", &["b"]));
    let gw = gateway(&conf).await;
    let first = tokio::spawn(gw.chat(hello("m")).send());
    eventually("the first request failed on a", || {
        a.completion_calls() == 1
    })
    .await;
    // While the first request backs off, `b`'s one request a minute is
    // still free for another request.
    let r = gw.chat(hello("bonly")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-collie-model"], "model-b");
    let r = first.await.unwrap().unwrap();
    assert_eq!(r.status(), 504, "the deadline passed during the backoff");
    assert_eq!(b.completion_calls(), 1);
}
