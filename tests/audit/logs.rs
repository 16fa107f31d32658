//! The process log follows `RUST_LOG`.

use super::*;

/// `RUST_LOG` is obeyed: at `warn` a request leaves no debug or trace lines
/// (the HTTP stack's own included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_rust_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let a = mock().await;
    let b = mock().await;
    let warn = Log {
        file: &log,
        rust_log: "warn",
    };
    let Process {
        mut child, base, ..
    } = run_collie(
        dir.path(),
        &config(&a, &b, json!({"sink": "off"})),
        Some(warn),
    );
    let client = reqwest::Client::new();
    for _ in 0..3 {
        let r = client
            .post(format!("{base}/v1/chat/completions"))
            .header("x-tenant-id", "alpha")
            .bearer_auth(ALPHA_KEY)
            .json(&body())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    terminate(&mut child);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains(" DEBUG ") && !text.contains(" TRACE ") && !text.contains(" INFO "),
        "{text}"
    );
}
