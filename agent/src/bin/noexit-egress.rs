//! noexit-egress: the agent's egress lock, probe and hardening as a standalone tool for
//! operators and tests. Output is JSON on stdout (one object per line for `watch`).
//!
//!   noexit-egress apply  --config /etc/noexit/agent.yaml   # exit 3 when not locked
//!   noexit-egress check  --config …                        # restore + report if changed
//!   noexit-egress watch  --config … --interval-ms 2000     # the agent's loop, JSON lines
//!   noexit-egress probe  --config …                        # pod mode: prove the wall
//!   noexit-egress harden --config … --root /               # desktop/device settings

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use noexit_agent::egress::{self, CheckOutcome, EgressLock, WatchOptions};
use noexit_agent::{hardening, probe};
use noexit_crds::agent::{AgentConfig, DEFAULT_CONFIG_PATH};
use serde_json::json;

/// Exit status when the wall is not confirmed.
const NOT_LOCKED: u8 = 3;

#[derive(Parser)]
#[command(name = "noexit-egress", version, about = "noexit egress lock, probe and hardening")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Common {
    /// Agent config (YAML).
    #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// nft executable.
    #[arg(long, default_value = "nft")]
    nft: String,
}

#[derive(Subcommand)]
enum Command {
    /// Replace the table `inet noexit` with the planned one and confirm it.
    Apply(Common),
    /// Compare the live table with the plan; restore it when it differs.
    Check(Common),
    /// Apply, then re-check every interval; print state changes and violations as JSON lines.
    Watch {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 2000)]
        interval_ms: u64,
        /// Minimum time between two `egressBlocked` reports.
        #[arg(long, default_value_t = 60_000)]
        report_every_ms: u64,
    },
    /// Print the planned ruleset (nft JSON) without applying it.
    Plan {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Pod mode: the canary must be unreachable and the mirror reachable.
    Probe {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Write and verify the desktop and device settings under ROOT.
    Harden {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
}

fn load(path: &PathBuf) -> anyhow::Result<AgentConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn lock(common: &Common) -> anyhow::Result<EgressLock> {
    Ok(EgressLock::new(&load(&common.config)?)?.with_nft(&common.nft))
}

fn print(value: serde_json::Value) {
    println!("{value}");
}

fn status(locked: bool) -> ExitCode {
    if locked { ExitCode::SUCCESS } else { ExitCode::from(NOT_LOCKED) }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    match Cli::parse().command {
        Command::Apply(common) => {
            let state = match lock(&common) {
                Ok(l) => l.apply().unwrap_or_else(|e| egress::not_locked(&e)),
                Err(e) => egress::not_locked(&e),
            };
            print(serde_json::to_value(&state)?);
            Ok(status(state.locked))
        }
        Command::Check(common) => {
            let (outcome, ok) = match lock(&common)?.check_and_restore() {
                CheckOutcome::Intact => (json!({"outcome": "intact"}), true),
                CheckOutcome::Restored { tamper } => (json!({"outcome": "restored", "tamper": tamper}), true),
                CheckOutcome::Failed { tamper, error } => {
                    (json!({"outcome": "failed", "tamper": tamper, "error": error}), false)
                }
            };
            print(outcome);
            Ok(status(ok))
        }
        Command::Watch { common, interval_ms, report_every_ms } => {
            let lock = lock(&common)?;
            let opts = WatchOptions {
                interval: Duration::from_millis(interval_ms.max(10)),
                blocked_report_every: Duration::from_millis(report_every_ms),
            };
            let (tx, mut rx) = tokio::sync::mpsc::channel(64);
            let (state_tx, mut state_rx) = tokio::sync::watch::channel(egress::not_locked(&"not applied yet"));
            let task = tokio::spawn(egress::watch_with(lock, opts, tx, state_tx));
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            loop {
                tokio::select! {
                    Some(v) = rx.recv() => print(json!({"event": "violation", "violation": v})),
                    changed = state_rx.changed() => {
                        if changed.is_err() { break; }
                        let s = state_rx.borrow_and_update().clone();
                        print(json!({"event": "state", "state": s}));
                    }
                    _ = tokio::signal::ctrl_c() => break,
                    _ = term.recv() => break,
                }
            }
            // Leaves the table in place: stopping the watcher never opens the wall.
            task.abort();
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan { config } => {
            let plan = egress::plan(&load(&config)?)?;
            println!("{}", serde_json::to_string_pretty(&plan.replace_batch())?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Probe { config } => {
            let cfg = load(&config)?;
            let state = tokio::task::spawn_blocking(move || probe::run(&cfg)).await?;
            print(serde_json::to_value(&state)?);
            Ok(status(state.locked))
        }
        Command::Harden { config, root } => {
            let report = hardening::apply_and_report(&load(&config)?, &root);
            let ok = report.problems.is_empty() && report.usb_modules_loaded.is_empty();
            print(json!({"state": report.state, "problems": report.problems, "violations": report.violations()}));
            Ok(status(ok))
        }
    }
}
