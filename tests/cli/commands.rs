//! `check-config`, `run` with a bad config or a dependency down, `audit`
//! with a trail that does not answer, `hash-key`: exit codes and messages.

use crate::common::*;
use serde_json::json;

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

/// `collie run` with `config`, the environment variable `COLLIE_TEST_PG`
/// set to `pg_url`; its exit code and standard error. Every case here
/// fails at start, so the process never stays up.
fn run_with(config: &Conf, pg_url: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("collie.yaml");
    std::fs::write(&file, config.yaml()).unwrap();
    let out = collie_bin()
        .args(["run", "--config"])
        .arg(&file)
        .current_dir(dir.path())
        .env("COLLIE_TEST_PG", pg_url)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A config with nothing but its listeners.
fn listen_on(port: u16, admin: u16) -> Conf {
    Conf::new()
        .set("listen", format!("127.0.0.1:{port}"))
        .set("admin_listen", format!("127.0.0.1:{admin}"))
}

#[test]
fn run_tells_a_dependency_that_is_down_from_a_bad_config() {
    // PostgreSQL where nothing listens: unavailable (69), not a bad config.
    let nowhere = format!("postgres://collie@127.0.0.1:{}/collie", free_port());
    let pg = listen_on(free_port(), free_port()).set(
        "audit",
        json!({"sink": "postgres", "postgres_url_env": "COLLIE_TEST_PG"}),
    );
    let (code, err) = run_with(&pg, &nowhere);
    assert_eq!(code, Some(69), "{err}");
    assert!(
        err.contains("the audit trail is unavailable: postgres: cannot connect"),
        "{err}"
    );

    // A listen port another process holds: unavailable too.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (code, err) = run_with(
        &listen_on(port, free_port()).set("audit", json!({"sink": "off"})),
        "",
    );
    assert_eq!(code, Some(69), "{err}");
    assert!(
        err.contains(&format!("listen address 127.0.0.1:{port} is unavailable")),
        "{err}"
    );
    drop(taken);

    // The same files with a mistake are still a bad config (64), reported
    // with its path, whatever the dependencies would have said.
    let (code, err) = run_with(&pg.set("threads", 0), &nowhere);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("threads: must be > 0"), "{err}");
}

/// A model name that cannot be a header value was accepted by
/// `check-config` and refused only by `run`, without its path.
#[test]
fn check_config_refuses_what_run_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("collie.yaml");
    let conf = Conf::new()
        .model(Model::new("m", &["p"]))
        .pool(Pool::new("p", &["d"]))
        .deployment(Deployment::new("d", "http://127.0.0.1:9/v1", "m\u{1}"))
        .set("audit", json!({"sink": "off"}));
    std::fs::write(&file, conf.yaml()).unwrap();
    for command in [&["check-config"][..], &["run", "--config"][..]] {
        let out = collie_bin().args(command).arg(&file).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{command:?}: {err}");
        assert!(
            err.contains("deployments[0].model: `m\\u{1}` cannot be sent as a header value"),
            "{command:?}: {err}"
        );
    }
}

#[test]
fn audit_commands_exit_69_when_the_trail_does_not_answer() {
    let nowhere = format!("postgres://collie@127.0.0.1:{}/collie", free_port());
    for command in ["verify", "report"] {
        let out = collie_bin()
            .args(["audit", command, "--sink", &nowhere])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(69), "{command}: {err}");
        assert!(err.contains("postgres: cannot connect"), "{command}: {err}");
    }
    // A sink that is not one is still a usage error.
    let out = collie_bin()
        .args(["audit", "verify", "--sink", "mysql://x"])
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
