//! `check-config`, `run` with a bad config, `hash-key`.

use crate::common::*;

#[test]
fn check_config_reports_every_error_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "tenants:\n  - {id: t, api_keys: [zz], models: [ghost]}\npools:\n  - {id: p, deployments: [{deployment: d, weight: 0}]}\ndeployments:\n  - {id: d, base_url: \"http://127.0.0.1:1/v1\", model: m, api_key_env: COLLIE_TEST_UNSET_VAR}\n",
    )
    .unwrap();
    let out = collie_bin()
        .arg("check-config")
        .arg(&bad)
        .env_remove("COLLIE_TEST_UNSET_VAR")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "deployments[0].api_key_env: environment variable `COLLIE_TEST_UNSET_VAR` is not set",
        "pools[0].deployments[0].weight: must be > 0",
        "tenants[0].api_keys[0]: must be a SHA-256 digest",
        "tenants[0].models[0]: unknown model `ghost`",
    ] {
        assert!(err.contains(expected), "missing `{expected}` in:\n{err}");
    }

    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/collie.yaml");
    let out = collie_bin()
        .args(["check-config", shipped])
        .env("OPENAI_API_KEY", "x")
        .env("AZURE_OPENAI_KEY", "x")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn run_refuses_a_bad_config_with_64() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "listen: nowhere\n").unwrap();
    let out = collie_bin()
        .args(["run", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn hash_key_prints_the_digest() {
    let out = collie_bin()
        .args(["hash-key", "sk-demo-team-a"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "50a734ef22b610c7ad5e602d7a1aa5e39a9a39a6f6cc38aa2415f9d58b52146e"
    );
}
