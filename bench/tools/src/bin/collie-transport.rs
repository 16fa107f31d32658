//! The "collie-transport" arm: Collie's own gateway with its policy off
//! (`Policy::TransportOnly`) — the listener and its guard, the bounded body
//! read, the inspection that finds `model`, routing, the exchange and its
//! relay, all as Collie runs them; no authentication, quota, per-request
//! metrics or audit record. Set against bare Pingora and the full policy in
//! the same run, it splits Collie's cost into transport and policy.

use clap::Parser;
use collie::server::{Collie, Policy};
use std::path::PathBuf;
use std::process::ExitCode;

/// As in the `collie` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// A Collie config (only its listeners, limits, models and deployments
    /// are used; the gateway must listen on a loopback address).
    #[arg(long)]
    config: PathBuf,
}

fn main() -> ExitCode {
    env_logger::init();
    let args = Args::parse();
    match Collie::load_with(&args.config, Policy::TransportOnly) {
        Ok(collie) => {
            collie.run_until_signalled();
            ExitCode::SUCCESS
        }
        Err(e) => {
            log::error!("cannot start: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
