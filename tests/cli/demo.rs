//! The README's first command: `collie demo` answers curl-style requests and
//! the official OpenAI Python SDK unchanged, with the keys the README gives.

use crate::common::free_port;
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The demo process, stopped when the test ends however it ends.
struct Demo {
    child: Child,
    base: String,
    admin: String,
    _dir: tempfile::TempDir,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_demo() -> Demo {
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (free_port(), free_port());
    let mocks = format!("{},{}", free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_collie"))
        .args(["demo", "--latency-ms", "0"])
        .args(["--listen", &format!("127.0.0.1:{listen}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--mock-ports", &mocks])
        // The demo's audit trail is a file in the working directory.
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let demo = Demo {
        child,
        base: format!("http://127.0.0.1:{listen}"),
        admin: format!("http://127.0.0.1:{admin}"),
        _dir: dir,
    };
    let client = reqwest::Client::new();
    for _ in 0..300 {
        let ready = client.get(format!("{}/readyz", demo.admin)).send().await;
        if ready.is_ok_and(|r| r.status() == 200) {
            return demo;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the demo did not become ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_answers_the_readme_requests() {
    let demo = start_demo().await;
    let client = reqwest::Client::new();
    let chat = |tenant: &str, key: &str, model: &str| {
        client
            .post(format!("{}/v1/chat/completions", demo.base))
            .header("x-tenant-id", tenant)
            .bearer_auth(key)
            .json(&json!({"model": model, "messages": [{"role": "user", "content": "Hello"}]}))
    };
    let r = chat("team-a", "sk-demo-team-a", "gpt-4o-mini")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-collie-model"], "gpt-4o-mini-2024-07-18");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 0);

    let r = chat("guest", "sk-demo-guest", "gpt-4o-mini")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the guest key from the README works");
    let r = chat("guest", "sk-demo-guest", "text-embedding-3-small")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "guest may use gpt-4o-mini only");
    let r = chat("guest", "sk-demo-team-a", "gpt-4o-mini")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "team-a's key does not speak for guest");

    let metrics = client
        .get(format!("{}/metrics", demo.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("collie_requests_total"));
}

/// The README's quota example: the demo tenants have limits, so answers
/// carry rate headers, `/v1/collie/quota` lists filled windows, and the
/// guest's eleventh request in a minute is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_tenants_have_quotas_the_readme_shows() {
    let demo = start_demo().await;
    let client = reqwest::Client::new();
    let chat = |tenant: &str, key: &str| {
        client
            .post(format!("{}/v1/chat/completions", demo.base))
            .header("x-tenant-id", tenant)
            .bearer_auth(key)
            .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}))
    };
    let r = chat("team-a", "sk-demo-team-a").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-limit-requests"], "6000");
    assert_eq!(r.headers()["x-ratelimit-limit-tokens"], "5000000");

    for i in 1..=10 {
        let r = chat("guest", "sk-demo-guest").send().await.unwrap();
        assert_eq!(r.status(), 200, "guest request {i}");
        assert_eq!(r.headers()["x-ratelimit-limit-requests"], "10");
        assert!(r.headers().contains_key("x-ratelimit-remaining-requests"));
        assert!(r.headers().contains_key("x-ratelimit-reset-tokens"));
    }
    let r = chat("guest", "sk-demo-guest").send().await.unwrap();
    assert_eq!(r.status(), 429, "the eleventh in a minute");
    assert!(r.headers().contains_key("retry-after"));

    let quota: Value = client
        .get(format!("{}/v1/collie/quota", demo.base))
        .header("x-tenant-id", "guest")
        .bearer_auth("sk-demo-guest")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let windows: Vec<&str> = quota["scopes"][0]["windows"]
        .as_array()
        .unwrap_or_else(|| panic!("{quota}"))
        .iter()
        .map(|w| w["window"].as_str().unwrap())
        .collect();
    assert_eq!(
        windows,
        [
            "minute.requests",
            "minute.tokens",
            "day.requests",
            "day.usd"
        ],
        "{quota}"
    );
    let day = &quota["scopes"][0]["windows"][2];
    assert_eq!(day["used"], 10.0, "{quota}");
}

/// Where the OpenAI SDK lives: `deploy/test.sh` makes this virtualenv.
fn sdk_python() -> String {
    let python = std::env::var("COLLIE_SDK_PYTHON").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/sdk-venv/bin/python").to_string()
    });
    assert!(
        std::path::Path::new(&python).exists(),
        "the OpenAI Python SDK is missing: run ./deploy/test.sh, which creates {python} \
         (or set COLLIE_SDK_PYTHON to a python with `openai` installed)"
    );
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_works_unchanged() {
    let python = sdk_python();
    let demo = start_demo().await;
    let base = format!("{}/v1", demo.base);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/sdk/openai_client.py"
            ))
            .args([base.as_str(), "team-a", "sk-demo-team-a"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "the SDK script failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["chat"]["model"], "gpt-4o-mini-2024-07-18", "{seen}");
    assert!(seen["chat"]["total_tokens"].as_u64().unwrap() > 0);
    assert!(
        seen["long_chat_prompt_tokens"].as_u64().unwrap() > 100_000,
        "a 1.2 MB prompt with the model after it reached the provider: {seen}"
    );
    assert!(seen["stream"]["chunks"].as_u64().unwrap() >= 2, "{seen}");
    assert_eq!(
        seen["stream"]["usage_chunks"], 0,
        "no usage chunk for a client that did not ask: {seen}"
    );
    assert!(!seen["stream"]["text"].as_str().unwrap().is_empty());
    assert!(
        seen["stream_with_usage_total"].as_u64().unwrap() > 0,
        "{seen}"
    );
    assert_eq!(seen["embeddings"]["count"], 2);
    assert_eq!(
        seen["models"],
        json!(["gpt-4o-mini", "text-embedding-3-small"])
    );
    assert_eq!(seen["wrong_key"]["status"], 401, "{seen}");
    assert_eq!(seen["unknown_model"]["status"], 404, "{seen}");
    assert_eq!(seen["unknown_model"]["code"], "model_not_found");
}
