//! The `collie` command: parse arguments, validate config, run.

use clap::{Parser, Subcommand};
use collie::audit::report::TrailError;
use collie::config::Config;
use collie::server::{Collie, StartError};
use std::path::PathBuf;
use std::process::ExitCode;

mod demo;

/// A proxy allocates and frees a few buffers per request, many of them
/// large (whole bodies); mimalloc keeps those in per-thread pages instead of
/// the system allocator's mmap/munmap and page-fault round trips.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `EX_USAGE` from sysexits.h: the configuration or the command line is wrong.
const EX_USAGE: u8 = 64;
/// `EX_UNAVAILABLE`: something the process needs is not there (the audit
/// database, a listen port); a restart later may succeed.
const EX_UNAVAILABLE: u8 = 69;
/// `EX_SOFTWARE`: a fault of Collie's own.
const EX_SOFTWARE: u8 = 70;

#[derive(Parser)]
#[command(
    name = "collie",
    version,
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
        #[arg(short, long, env = "COLLIE_CONFIG")]
        config: PathBuf,
    },
    /// Validate config files without starting anything; exits 64 on a bad one.
    CheckConfig {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the SHA-256 digest of an API key, for a tenant's `api_keys`.
    /// Reads the key from standard input when not given.
    HashKey { key: Option<String> },
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
        #[arg(long)]
        tenant: Option<String>,
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
        Command::Run { config } => run(config),
        Command::CheckConfig { files } => check_config(&files),
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

fn run(path: PathBuf) -> ExitCode {
    match Collie::load(&path) {
        Ok(collie) => {
            collie.run_until_signalled();
            ExitCode::SUCCESS
        }
        Err(e) => {
            let code = match &e {
                StartError::Config { .. } => EX_USAGE,
                StartError::Unavailable { .. } => EX_UNAVAILABLE,
                StartError::Internal { .. } => EX_SOFTWARE,
            };
            log::error!("cannot start: {e}");
            ExitCode::from(code)
        }
    }
}

#[expect(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "command-line output"
)]
fn check_config(files: &[PathBuf]) -> ExitCode {
    let mut bad = false;
    for f in files {
        match Config::load(f) {
            Ok(_) => println!("{}: ok", f.display()),
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
    let open = |t: &TrailArgs| report::open_sink(t.sink.as_deref(), t.config.as_deref());
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
