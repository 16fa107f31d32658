//! `collie` as a real process: `collie run` on a config file, a command
//! line, a stop by signal.

use super::config::Conf;
use super::gateway::full_config;
use super::{PROVIDER_KEY_A, PROVIDER_KEY_B, free_port};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The `collie` binary under test.
pub(crate) fn collie_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_collie"))
}

/// A `collie run` process and where it listens.
pub(crate) struct Process {
    pub child: Child,
    /// `http://127.0.0.1:PORT` of the gateway.
    pub base: String,
    /// `http://127.0.0.1:PORT` of the admin listener.
    pub admin: String,
}

/// Where a process's log goes: its stderr to `file`, at the level
/// `rust_log` sets. Without one, stderr is dropped and `RUST_LOG` is left
/// as the test runs with.
pub(crate) struct Log<'a> {
    pub file: &'a Path,
    pub rust_log: &'a str,
}

/// Start `collie run` with this config (written to `dir/collie.yaml`, on
/// fresh ports, as [`full_config`] completes it) and the provider keys in
/// its environment; returns once both listeners accept connections.
pub(crate) fn run_collie(dir: &Path, conf: &Conf, log: Option<Log<'_>>) -> Process {
    run_collie_with(dir, conf, log, &[])
}

/// [`run_collie`] with more arguments after `run --config FILE`.
pub(crate) fn run_collie_with(
    dir: &Path,
    conf: &Conf,
    log: Option<Log<'_>>,
    args: &[&str],
) -> Process {
    let (listen_port, admin_port) = (free_port(), free_port());
    let path = dir.join("collie.yaml");
    let conf = full_config(
        conf,
        &format!("127.0.0.1:{listen_port}"),
        &format!("127.0.0.1:{admin_port}"),
    );
    std::fs::write(&path, conf.yaml()).unwrap();
    let mut command = collie_bin();
    command
        .args(["run", "--config"])
        .arg(&path)
        .args(args)
        .env("KEY_A", PROVIDER_KEY_A)
        .env("KEY_B", PROVIDER_KEY_B)
        .stdout(Stdio::null());
    match log {
        Some(log) => command
            .env("RUST_LOG", log.rust_log)
            .stderr(std::fs::File::create(log.file).unwrap()),
        None => command.stderr(Stdio::null()),
    };
    let child = command.spawn().unwrap();
    for port in [listen_port, admin_port] {
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Process {
        child,
        base: format!("http://127.0.0.1:{listen_port}"),
        admin: format!("http://127.0.0.1:{admin_port}"),
    }
}

/// Send SIGHUP: reload the config file.
pub(crate) fn sighup(child: &Child) {
    let _ = Command::new("kill")
        .arg("-HUP")
        .arg(child.id().to_string())
        .status();
}

/// Send SIGTERM.
pub(crate) fn sigterm(child: &Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
}

/// SIGTERM and wait (a graceful stop: the trail is flushed); SIGKILL if it
/// has not exited after 10 s.
pub(crate) fn terminate(child: &mut Child) {
    sigterm(child);
    for _ in 0..500 {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
}
