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
    // It says so before anything claims to listen (nothing retries the
    // port in the background, nothing answers /readyz).
    assert!(!err.contains("collie listening"), "{err}");
    // Held on every interface, the port is taken for loopback too.
    drop(taken);
    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (code, err) = run_with(
        &listen_on(free_port(), port).set("audit", json!({"sink": "off"})),
        "",
    );
    assert_eq!(code, Some(69), "{err}");
    assert!(
        err.contains(&format!("listen address 127.0.0.1:{port} is unavailable")),
        "the admin port too: {err}"
    );
    assert!(!err.contains("collie listening"), "{err}");
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

/// `conf/collie.yaml` names provider keys CI does not have: refused
/// without them, accepted with `--allow-missing-env`, which lists them.
#[test]
fn check_config_can_validate_without_the_secrets() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/collie.yaml");
    let bare = || {
        let mut c = collie_bin();
        c.env_remove("OPENAI_API_KEY")
            .env_remove("AZURE_OPENAI_KEY");
        c
    };
    let out = bare().args(["check-config", shipped]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("environment variable `OPENAI_API_KEY` is not set"),
        "{err}"
    );

    let out = bare()
        .args(["check-config", "--allow-missing-env", shipped])
        .output()
        .unwrap();
    let (stdout, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{err}");
    assert_eq!(
        stdout.trim(),
        format!("{shipped}: ok, without environment variables OPENAI_API_KEY, AZURE_OPENAI_KEY")
    );

    // Every other mistake is still one, and so is a PostgreSQL sink
    // without the name of its URL's variable.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("collie.yaml");
    let conf = Conf::two_tenants(&["m"])
        .model(Model::new("m", &["p"]))
        .pool(Pool::new("p", &["d"]))
        .deployment(
            Deployment::new("d", "http://127.0.0.1:9/v1", "up").key("COLLIE_TEST_UNSET_VAR"),
        )
        .set("admin_token_env", "COLLIE_TEST_UNSET_TOKEN")
        .set("threads", 0);
    std::fs::write(&file, conf.yaml()).unwrap();
    let out = collie_bin()
        .args(["check-config", "--allow-missing-env"])
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("threads: must be > 0"), "{err}");
    assert!(!err.contains("COLLIE_TEST_UNSET"), "{err}");

    let pg = conf.set("threads", 1).set(
        "audit",
        json!({"sink": "postgres", "postgres_url_env": "COLLIE_TEST_UNSET_PG"}),
    );
    std::fs::write(&file, pg.yaml()).unwrap();
    let out = collie_bin()
        .args(["check-config", "--allow-missing-env"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(
            "ok, without environment variables COLLIE_TEST_UNSET_TOKEN, COLLIE_TEST_UNSET_PG, COLLIE_TEST_UNSET_VAR"
        ),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// An empty file is a valid config of defaults, and one without tenants
/// or models serves nobody: neither is `ok`.
#[test]
fn check_config_refuses_a_config_that_serves_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "empty.yaml",
            String::new(),
            &[
                "tenants: no tenant is configured",
                "models: no model is configured",
            ][..],
        ),
        (
            "comments.yaml",
            "# nothing yet\n".to_string(),
            &["tenants: no tenant is configured"][..],
        ),
        (
            "no-tenants.yaml",
            Conf::new()
                .model(Model::new("m", &["p"]))
                .pool(Pool::new("p", &["d"]))
                .deployment(Deployment::new("d", "http://127.0.0.1:9/v1", "up"))
                .set("tenants", json!([]))
                .yaml(),
            &["tenants: no tenant is configured, so every request would be refused (401)"][..],
        ),
    ];
    for (name, text, expected) in cases {
        let file = dir.path().join(name);
        std::fs::write(&file, text).unwrap();
        let out = collie_bin()
            .arg("check-config")
            .arg(&file)
            .output()
            .unwrap();
        let (stdout, err) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(64), "{name}: {stdout}{err}");
        assert!(!stdout.contains("ok"), "{name}: {stdout}");
        for e in expected {
            assert!(err.contains(e), "{name}: missing `{e}` in:\n{err}");
        }
    }
}

/// `audit report --config` reads only the audit section; the provider keys
/// need not be there with `--allow-missing-env`, a PostgreSQL URL must.
#[test]
fn audit_report_reads_a_config_without_its_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("collie.yaml");
    let trail = dir.path().join("trail.db");
    let conf = Conf::two_tenants(&["m"])
        .model(Model::new("m", &["p"]))
        .pool(Pool::new("p", &["d"]))
        .deployment(
            Deployment::new("d", "http://127.0.0.1:9/v1", "up").key("COLLIE_TEST_UNSET_VAR"),
        )
        .set(
            "audit",
            json!({"sink": "sqlite", "sqlite_path": trail.to_str().unwrap()}),
        );
    std::fs::write(&file, conf.yaml()).unwrap();
    let report = |extra: &[&str], file: &std::path::Path| {
        let out = collie_bin()
            .args(["audit", "report", "--config"])
            .arg(file)
            .args(extra)
            .env_remove("COLLIE_TEST_UNSET_VAR")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = report(&[], &file);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("`COLLIE_TEST_UNSET_VAR` is not set"), "{err}");
    // Accepted: what stops it now is that no trail was written yet.
    let (code, err) = report(&["--allow-missing-env"], &file);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("no audit trail at"), "{err}");

    let pg = conf.set(
        "audit",
        json!({"sink": "postgres", "postgres_url_env": "COLLIE_TEST_UNSET_PG"}),
    );
    std::fs::write(&file, pg.yaml()).unwrap();
    let (code, err) = report(&["--allow-missing-env"], &file);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("audit.postgres_url_env: environment variable `COLLIE_TEST_UNSET_PG` is not set: the trail's URL is needed to read it"),
        "{err}"
    );
}

/// Every option of every command says what it does; the mock lists its
/// `x-mock-*` headers; `--version` names the commit.
#[test]
fn help_describes_every_option_and_version_names_the_commit() {
    let commands: &[&[&str]] = &[
        &[],
        &["run"],
        &["check-config"],
        &["hash-key"],
        &["demo"],
        &["mock"],
        &["audit"],
        &["audit", "verify"],
        &["audit", "report"],
    ];
    for command in commands {
        let out = collie_bin().args(*command).arg("--help").output().unwrap();
        assert!(out.status.success(), "{command:?}");
        let help = String::from_utf8_lossy(&out.stdout);
        // Argument and option lines: `  -c, --config <CONFIG>  The config…`
        // or `  [KEY]  The tenant's…`; a name with nothing after it has no
        // description (clap puts a long one on the next line, indented).
        let lines: Vec<&str> = help.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim();
            let is_item = line.starts_with("  ")
                && !line.starts_with("        ")
                && (t.starts_with('-') || t.starts_with('[') || t.starts_with('<'));
            if !is_item {
                continue;
            }
            // Only `[env: …]` or `[default: …]` after the name is no description.
            let after = t.split_once("  ").map_or("", |(_, rest)| rest.trim());
            let described = (!after.is_empty() && !after.starts_with('['))
                || lines
                    .get(i + 1)
                    .is_some_and(|next| next.starts_with("          ") && !next.trim().is_empty());
            assert!(
                described,
                "{command:?}: `{}` has no description:\n{help}",
                t
            );
        }
        if command == &["mock"] {
            for header in [
                "x-mock-status",
                "x-mock-delay-ms",
                "x-mock-chunks",
                "x-mock-interval-ms",
                "x-mock-no-usage",
                "x-mock-break-after",
                "x-mock-retry-after",
                "x-mock-hang",
                "x-mock-reset",
                "x-mock-trickle-ms",
            ] {
                assert!(help.contains(header), "mock --help lacks {header}:\n{help}");
            }
        }
    }
    let out = collie_bin().arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        version.starts_with(&format!("collie {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    assert!(!version.contains("commit )"), "{version}");
}

/// `/readyz` and the "listening" line wait for the gateway listener itself
/// (the admin listener can be up first): once either says so, the gateway
/// accepts connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_and_listening_mean_the_gateway_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let conf = Conf::two_tenants(&["m"])
        .model(Model::new("m", &["p"]))
        .pool(Pool::new("p", &["d"]))
        .deployment(Deployment::new("d", "http://127.0.0.1:9/v1", "up").key("KEY_A"));
    let mut p = run_collie(
        dir.path(),
        &conf,
        Some(Log {
            file: &log,
            rust_log: "info",
        }),
    );
    let client = reqwest::Client::new();
    let mut ready = false;
    for _ in 0..250 {
        let r = client.get(format!("{}/readyz", p.admin)).send().await;
        if r.is_ok_and(|r| r.status() == 200) {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(ready, "never ready");
    let gateway = p.base.trim_start_matches("http://").to_string();
    assert!(std::net::TcpStream::connect(&gateway).is_ok());
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.matches(&format!("collie listening on {gateway} (admin on "))
            .count(),
        1,
        "{text}"
    );
    terminate(&mut p.child);
}
