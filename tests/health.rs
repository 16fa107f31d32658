//! Health over real sockets: probes, breakers, routing policies, route
//! aliases, retries inside a pool, panic mode, the status view.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly"
)]

mod common;

use collie::mock::{Behavior, MockConfig, MockServer};
use common::*;
use serde_json::{Value, json};
use std::time::Duration;

fn hello(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello"}]})
}

/// One pool `p` with the given deployments (id, mock, extra fields) and
/// policy; model `m` → p, model `fb` → p then pool `q` (deployment `z`).
fn pool_config(
    members: &[(&str, &MockServer, &str)],
    pool_extra: &str,
    fallback: &MockServer,
) -> String {
    let mut deployments = String::new();
    let mut refs = Vec::new();
    for (id, mock, extra) in members {
        deployments.push_str(&format!(
            "  - {{id: {id}, base_url: \"{}\", model: \"model-{id}\", timeouts: {{connect: 500ms, first_byte: 2s}}{extra}}}\n",
            mock.base_url()
        ));
        refs.push(format!("{{deployment: {id}}}"));
    }
    format!(
        "{tenants}models:\n  - {{name: m, fallback: [p]}}\n  - {{name: fb, fallback: [p, q]}}\npools:\n  - {{id: p, deployments: [{refs}]{pool_extra}}}\n  - {{id: q, deployments: [{{deployment: z}}]}}\ndeployments:\n{deployments}  - {{id: z, base_url: \"{}\", model: model-z, health: {{probe: off}}}}\npricing:\n  model-a: {{input_per_mtok: 5.0, output_per_mtok: 15.0}}\n  model-b: {{input_per_mtok: 0.5, output_per_mtok: 1.5}}\n",
        fallback.base_url(),
        tenants = tenants(),
        refs = refs.join(", "),
    )
}

async fn status(gw: &Gw) -> Value {
    gw.client
        .get(format!("{}/status", gw.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
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

const FAST_PROBES: &str = ", health: {interval: 150ms, timeout: 300ms, healthy_after: 1, unhealthy_after: 1, cooldown: 300ms}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_deployment_is_taken_out_by_probes_and_comes_back() {
    let a = mock().await;
    let b = mock().await;
    let z = mock().await;
    let addr = a.addr();
    let gw = gateway(&pool_config(
        &[("a", &a, FAST_PROBES), ("b", &b, FAST_PROBES)],
        "",
        &z,
    ))
    .await;
    until(&gw, "a", "state", "healthy").await;
    until(&gw, "b", "state", "healthy").await;
    // `a` stops accepting connections.
    a.shutdown().await;
    until(&gw, "a", "state", "unhealthy").await;
    let before = b.completion_calls();
    let models = served_by(&gw, "m", 20).await;
    assert!(
        models.iter().all(|m| m == "model-b"),
        "no traffic to a: {models:?}"
    );
    assert_eq!(b.completion_calls() - before, 20);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_half_opens_for_exactly_one_trial_and_closes() {
    let a = mock_with(Behavior::default().status(500)).await;
    let z = mock().await;
    let live_only = ", health: {probe: off, failures_to_open: 3, cooldown: 400ms}";
    let gw = gateway(&pool_config(&[("a", &a, live_only)], "", &z)).await;
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_seven_keeps_traffic_away_for_seven_seconds() {
    let a = mock().await;
    let z = mock().await;
    a.push(Behavior::default().status(429).retry_after("7"));
    let gw = gateway(&pool_config(&[("a", &a, ", health: {probe: off}")], "", &z)).await;
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
    let off = ", health: {probe: off}";
    let gw = gateway(&pool_config(
        &[("a", &slow, off), ("b", &fast, off)],
        ", policy: least_latency",
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
    let live = ", health: {probe: off, failures_to_open: 1, cooldown: 30s}";
    let gw = gateway(&pool_config(
        &[("a", &pricey, live), ("b", &cheap, live)],
        ", policy: cost, retries: 1",
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
    let off = ", health: {probe: off}";
    let yaml = format!(
        "retry: {{backoff: 10ms, max_backoff: 50ms}}\n{}",
        pool_config(
            &[("a", &a, off), ("b", &b, off), ("c", &c, off)],
            ", retries: 2",
            &z
        )
    );
    let gw = gateway(&yaml).await;
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
    let live = ", health: {probe: off, failures_to_open: 1, cooldown: 500ms}";
    let gw = gateway(&pool_config(&[("a", &a, live)], "", &z)).await;
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
            ("a", &a, ", health: {interval: 100ms}"),
            ("b", &b, ", health: {probe: completion, interval: 100ms}"),
        ],
        "",
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
    let off = ", health: {probe: off}";
    let yaml = pool_config(&[("a", &a, off), ("b", &b, off)], "", &z).replace(
        "models:\n",
        "models:\n  - name: best\n    fallback: [q]\n    routes:\n      - {hint: code, fallback: [pa]}\n      - {priorities: [1, 2], fallback: [pb]}\n",
    ).replace("pools:\n", "pools:\n  - {id: pa, deployments: [{deployment: a}]}\n  - {id: pb, deployments: [{deployment: b}]}\n");
    let gw = gateway(&yaml).await;
    let ask = |hint: Option<&str>, tenant: &str, key: &str| {
        let mut r = gw
            .client
            .post(gw.url("/v1/chat/completions"))
            .header("x-tenant-id", tenant)
            .bearer_auth(key)
            .json(&hello("best"));
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

/// The status page in a real headless browser: it loads, lists every
/// deployment, and shows a breaker opening.
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
    let live = ", health: {probe: off, failures_to_open: 1, cooldown: 60s}";
    let gw = gateway(&pool_config(&[("a", &a, live), ("b", &b, live)], "", &z)).await;
    let render = |url: String| {
        let chromium = chromium.to_string();
        async move {
            let profile = tempfile::tempdir().unwrap();
            let out = tokio::process::Command::new(chromium)
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--virtual-time-budget=3000",
                    "--dump-dom",
                ])
                .arg(format!("--user-data-dir={}", profile.path().display()))
                .arg(url)
                .output()
                .await
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let dom = render(format!("{}/", gw.admin)).await;
    for id in ["<td>a</td>", "<td>b</td>", "<td>z</td>", "model-a"] {
        assert!(dom.contains(id), "page shows {id}:\n{dom}");
    }
    assert!(!dom.contains("badge open"), "no breaker open yet");
    // One failure opens `a`'s breaker; the page shows it.
    gw.chat(hello("m")).send().await.unwrap();
    gw.chat(hello("m")).send().await.unwrap();
    until(&gw, "a", "breaker", "open").await;
    let dom = render(format!("{}/", gw.admin)).await;
    assert!(dom.contains("badge open"), "breaker shown open:\n{dom}");
    assert!(dom.contains("badge unhealthy"));
}
