//! The `collie` command: parse arguments, validate config, run.

use clap::{Parser, Subcommand};
use collie::audit::report::TrailError;
use collie::config::{Config, MissingEnv};
use collie::server::{Collie, EX_SOFTWARE, EX_UNAVAILABLE, EX_USAGE};
use std::path::PathBuf;
use std::process::ExitCode;

mod demo;

/// A proxy allocates and frees a few buffers per request, many of them
/// large (whole bodies); mimalloc keeps those in per-thread pages instead of
/// the system allocator's mmap/munmap and page-fault round trips.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `--version`: the package version and the commit it was built from
/// (`build.rs`: `COLLIE_COMMIT`, else `git rev-parse`, else `unknown`).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("COLLIE_COMMIT"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "collie",
    version = VERSION,
    about = "Per-tenant sidecar gateway for OpenAI-style LLM traffic"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway with a config file (reloaded on SIGHUP).
    Run {
        /// The config file (conf/collie.yaml documents every field); the
        /// provider keys it names by `api_key_env` must be in the environment.
        #[arg(short, long, env = "COLLIE_CONFIG")]
        config: PathBuf,
        /// Also reload the config file when its content changes, checked
        /// this often (e.g. 10s): for a Kubernetes ConfigMap volume, which
        /// the kubelet updates in place without a signal. SIGHUP always reloads.
        #[arg(long, env = "COLLIE_WATCH_CONFIG", value_name = "INTERVAL", value_parser = humantime::parse_duration)]
        watch_config: Option<std::time::Duration>,
    },
    /// Validate config files without starting anything; exits 64 on a bad one.
    CheckConfig {
        /// The config files to validate.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Accept environment variables the files name (provider keys,
        /// admin token, PostgreSQL URL) but this environment lacks, and
        /// list them: for checking configs in CI without their secrets.
        #[arg(long)]
        allow_missing_env: bool,
    },
    /// Print the SHA-256 digest of an API key, for a tenant's `api_keys`.
    HashKey {
        /// The tenant's API key; read from standard input (one line) when
        /// not given, which keeps it out of the shell's history.
        key: Option<String>,
    },
    /// Run the demo: the embedded demo config in front of two local mock providers.
    Demo {
        /// Latency of the mock providers before their response head, in milliseconds.
        #[arg(long, default_value_t = 150)]
        latency_ms: u64,
        /// Address for the gateway, in place of the demo config's 127.0.0.1:8080.
        #[arg(long)]
        listen: Option<String>,
        /// Address for metrics and status, in place of 127.0.0.1:9090.
        #[arg(long)]
        admin_listen: Option<String>,
        /// Ports for the two mock providers, in place of 9101,9102.
        #[arg(long, value_delimiter = ',')]
        mock_ports: Option<Vec<u16>>,
    },
    /// Run an OpenAI-compatible mock provider (for tests and benchmarks).
    #[command(after_help = collie_mock::HEADERS_HELP)]
    Mock(collie_mock::MockArgs),
    /// Read the audit trail: verify its hash chains, or report on it.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(clap::Args)]
struct TrailArgs {
    /// The trail: sqlite:PATH or postgres://user@host/db[#schema].
    #[arg(long)]
    sink: Option<String>,
    /// Use the trail a config file names (its `audit` section).
    #[arg(long, env = "COLLIE_CONFIG")]
    config: Option<PathBuf>,
    /// With --config: accept the provider keys and admin token it names
    /// but this environment lacks (reading the trail needs none of them;
    /// a PostgreSQL trail still needs its URL).
    #[arg(long)]
    allow_missing_env: bool,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check every record's hash and link; exits 1 if a row was edited or deleted.
    Verify {
        #[command(flatten)]
        trail: TrailArgs,
    },
    /// Totals, per-model and per-tenant breakdowns, top errors, refusals, anomalies.
    Report {
        #[command(flatten)]
        trail: TrailArgs,
        /// How far back, e.g. 24h, 7d.
        #[arg(long, default_value = "24h")]
        since: String,
        /// Only this tenant's records (its id, as in the config).
        #[arg(long)]
        tenant: Option<String>,
        /// Output: text (for people), json or csv (for tools).
        #[arg(long, default_value = "text", value_parser = ["text", "json", "csv"])]
        format: String,
        /// Add a breakdown: `user` (per end user of each tenant, the 100 with the most requests).
        #[arg(long, value_parser = ["user"])]
        by: Option<String>,
    },
}

/// Libraries trace whole request heads and bodies (the HTTP stack does), which
/// carry keys and prompts: trace records are Collie's own only, whatever
/// `RUST_LOG` says. Every other record follows `RUST_LOG` (default `info`).
struct NoStackTrace(env_logger::Logger);

impl log::Log for NoStackTrace {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        (m.level() < log::Level::Trace || m.target().starts_with("collie")) && self.0.enabled(m)
    }

    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            self.0.log(r);
        }
    }

    fn flush(&self) {
        self.0.flush();
    }
}

fn main() -> ExitCode {
    let logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).build();
    log::set_max_level(logger.filter());
    if log::set_boxed_logger(Box::new(NoStackTrace(logger))).is_err() {
        return ExitCode::FAILURE;
    }
    match Cli::parse().command {
        Command::Run {
            config,
            watch_config,
        } => run(config, watch_config),
        Command::CheckConfig {
            files,
            allow_missing_env,
        } => check_config(&files, allow_missing_env),
        Command::HashKey { key } => hash_key(key),
        Command::Demo {
            latency_ms,
            listen,
            admin_listen,
            mock_ports,
        } => {
            let options = demo::DemoOptions {
                latency: std::time::Duration::from_millis(latency_ms),
                listen,
                admin_listen,
                mock_ports: match mock_ports.as_deref() {
                    None => demo::MOCK_PORTS,
                    Some(&[a, b]) => [a, b],
                    Some(_) => {
                        log::error!("--mock-ports takes two ports, e.g. 9101,9102");
                        return ExitCode::from(EX_USAGE);
                    }
                },
            };
            match demo::run(options) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    log::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Mock(args) => mock(args),
        Command::Audit { command } => audit(command),
    }
}

fn run(path: PathBuf, watch: Option<std::time::Duration>) -> ExitCode {
    match Collie::load(&path) {
        Ok(mut collie) => {
            if let Some(every) = watch {
                collie.watch_config(every);
            }
            collie.run_until_signalled();
            ExitCode::SUCCESS
        }
        Err(e) => {
            log::error!("cannot start: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

#[expect(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "command-line output"
)]
fn check_config(files: &[PathBuf], allow_missing_env: bool) -> ExitCode {
    let missing = missing_env(allow_missing_env);
    let mut bad = false;
    for f in files {
        // A valid file that serves nobody (empty, or no tenants) is what
        // an unfinished or truncated file looks like: not `ok`.
        let checked = Config::load_with(f, missing).and_then(|c| {
            let nobody = c.serves_nobody();
            if nobody.is_empty() {
                Ok(c)
            } else {
                Err(collie::config::ConfigErrors(nobody))
            }
        });
        match checked {
            Ok(c) if c.missing_env().is_empty() => println!("{}: ok", f.display()),
            Ok(c) => {
                let mut names: Vec<&str> = Vec::new();
                for (_, name) in c.missing_env() {
                    if !names.contains(&name.as_str()) {
                        names.push(name);
                    }
                }
                println!(
                    "{}: ok, without environment variables {}",
                    f.display(),
                    names.join(", ")
                );
            }
            Err(e) => {
                bad = true;
                eprintln!("{}:", f.display());
                for line in e.0 {
                    eprintln!("  {line}");
                }
            }
        }
    }
    if bad {
        ExitCode::from(EX_USAGE)
    } else {
        ExitCode::SUCCESS
    }
}

/// `--allow-missing-env` given or not.
fn missing_env(allowed: bool) -> MissingEnv {
    if allowed {
        MissingEnv::Allow
    } else {
        MissingEnv::Refuse
    }
}

#[expect(clippy::print_stdout, reason = "command-line output")]
fn hash_key(key: Option<String>) -> ExitCode {
    let key = match key {
        Some(k) => k,
        None => {
            let mut line = String::new();
            if std::io::stdin().read_line(&mut line).is_err() {
                return ExitCode::from(EX_USAGE);
            }
            line
        }
    };
    println!("{}", collie::gateway::key_digest_hex(&key));
    ExitCode::SUCCESS
}

fn mock(args: collie_mock::MockArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(collie_mock::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("mock: {e}");
            ExitCode::FAILURE
        }
    }
}

#[expect(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "command-line output"
)]
fn audit(command: AuditCommand) -> ExitCode {
    use collie::audit::report;
    let open = |t: &TrailArgs| {
        let missing = missing_env(t.allow_missing_env);
        report::open_sink(t.sink.as_deref(), t.config.as_deref(), missing)
    };
    let result: Result<ExitCode, TrailError> = match command {
        AuditCommand::Verify { trail } => open(&trail)
            .and_then(|mut sink| Ok(report::verify(&mut *sink)?))
            .map(|problems| {
                if problems.is_empty() {
                    println!("audit trail intact");
                    ExitCode::SUCCESS
                } else {
                    for p in &problems {
                        println!("{p}");
                    }
                    ExitCode::FAILURE
                }
            }),
        AuditCommand::Report {
            trail,
            since,
            tenant,
            format,
            by,
        } => report::since_ms(&since)
            .and_then(|cut| {
                let mut sink = open(&trail)?;
                let by_user = by.as_deref() == Some("user");
                Ok(report::build(&mut *sink, cut, tenant.as_deref(), by_user)?)
            })
            .map(|r| {
                let out = match format.as_str() {
                    "json" => serde_json::to_string_pretty(&r).unwrap_or_default(),
                    "csv" => report::csv(&r),
                    _ => report::text(&r),
                };
                println!("{out}");
                ExitCode::SUCCESS
            }),
    };
    result.unwrap_or_else(|e| {
        let code = match &e {
            TrailError::Spec(_)
            | TrailError::Config { .. }
            | TrailError::AuditOff
            | TrailError::Unnamed
            | TrailError::NoTrail(_)
            | TrailError::Since { .. } => EX_USAGE,
            TrailError::Sink(_) => EX_UNAVAILABLE,
            TrailError::Clock(_) => EX_SOFTWARE,
        };
        eprintln!("audit: {e}");
        ExitCode::from(code)
    })
}
