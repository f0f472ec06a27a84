//! noexit-agent: runs inside a workspace (root in a VM, unprivileged in a pod).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use noexit_agent::sessions::{self, HookAction, utmp};
use noexit_agent::{agent, config, dlp, outbox, spool};

#[derive(Parser, Debug)]
#[command(name = "noexit-agent", version, about = "noexit in-guest agent")]
struct Cli {
    /// Agent config written by the operator.
    #[arg(long, global = true, env = "NOEXIT_AGENT_CONFIG", default_value = noexit_crds::agent::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Bound on the spool's disk use, in bytes; when full, new events are held back, not dropped.
    #[arg(long, global = true, default_value_t = spool::DEFAULT_MAX_BYTES)]
    spool_max_bytes: u64,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent (the default).
    Run(RunArgs),
    /// Report a desktop event; the desktop's session scripts call this.
    Session {
        action: HookAction,
        #[arg(long)]
        user: String,
        /// Display or connection id, e.g. `:1`.
        #[arg(long)]
        session: Option<String>,
        /// Remote address of the connection.
        #[arg(long)]
        source: Option<String>,
    },
    /// Scan files with the DLP detectors and print what the reviewers will see (JSON).
    Scan { files: Vec<PathBuf> },
    /// Load and check the config, then exit.
    CheckConfig,
}

#[derive(clap::Args, Debug, Default)]
struct RunArgs {
    #[arg(long, default_value = utmp::DEFAULT_WTMP)]
    wtmp: PathBuf,
    #[arg(long, default_value = utmp::DEFAULT_UTMP)]
    utmp: PathBuf,
    /// Seconds without input after which a user is reported idle.
    #[arg(long, default_value_t = 900)]
    idle_after: u64,
    /// Root for the desktop settings the hardening writes.
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Seconds between outbox passes.
    #[arg(long, default_value_t = 2)]
    outbox_interval: u64,
    /// Seconds between checks of the egress lock / probe and hardening.
    #[arg(long, default_value_t = 10)]
    guard_interval: u64,
    /// Seconds between polls for output decisions and approved inbox files.
    #[arg(long, default_value_t = 10)]
    poll_interval: u64,
    /// Owner of the outbox directory as UID:GID (the researcher's account in a VM). The agent,
    /// when root, creates the directory with this owner and puts it back if changed.
    #[arg(long, env = "NOEXIT_OUTBOX_OWNER", value_parser = parse_owner)]
    outbox_owner: Option<(u32, u32)>,
    /// Permission bits of the outbox directory, in octal.
    #[arg(long, env = "NOEXIT_OUTBOX_MODE", default_value = "1777", value_parser = parse_mode)]
    outbox_mode: u32,
}

fn parse_owner(s: &str) -> Result<(u32, u32), String> {
    let (u, g) = s.split_once(':').ok_or_else(|| format!("{s:?}: expected UID:GID, e.g. 1000:1000"))?;
    let num = |v: &str, what: &str| v.parse::<u32>().map_err(|e| format!("{s:?}: {what} {v:?}: {e}"));
    Ok((num(u, "uid")?, num(g, "gid")?))
}

fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s, 8) {
        Ok(m) if m <= 0o7777 => Ok(m),
        Ok(_) => Err(format!("{s:?}: a mode is at most 7777 (octal)")),
        Err(e) => Err(format!("{s:?}: not an octal mode: {e}")),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("noexit-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Scan { files }) = &cli.command {
        return scan(&cli.config, files);
    }
    let cfg = config::load(&cli.config)?;
    match cli.command.unwrap_or(Command::Run(RunArgs {
        wtmp: utmp::DEFAULT_WTMP.into(),
        utmp: utmp::DEFAULT_UTMP.into(),
        idle_after: 900,
        root: "/".into(),
        outbox_interval: 2,
        guard_interval: 10,
        poll_interval: 10,
        outbox_owner: None,
        outbox_mode: outbox::DEFAULT_MODE,
    })) {
        Command::Run(a) => {
            let opts = agent::Options {
                wtmp: a.wtmp,
                utmp: a.utmp,
                spool_max_bytes: cli.spool_max_bytes,
                idle_after: Duration::from_secs(a.idle_after),
                root: a.root,
                outbox_interval: Duration::from_secs(a.outbox_interval.max(1)),
                guard_interval: Duration::from_secs(a.guard_interval.max(1)),
                poll_interval: Duration::from_secs(a.poll_interval.max(1)),
                outbox_policy: outbox::OutboxPolicy { owner: a.outbox_owner, mode: a.outbox_mode },
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                tokio::select! {
                    r = agent::run(cfg, opts) => r.context("agent stopped"),
                    r = shutdown_signal() => r,
                }
            })
        }
        Command::Session { action, user, session, source } => {
            sessions::hook(&cfg.spool, cli.spool_max_bytes, action, &user, session, source)?;
            Ok(())
        }
        Command::Scan { files } => scan(&cli.config, &files),
        Command::CheckConfig => {
            println!("{}: ok (workspace {})", cli.config.display(), cfg.workspace.uri());
            Ok(())
        }
    }
}

/// `scan` works without the agent's config (researchers may not be able to read it): then only
/// the built-in detectors run, and the default size limit applies.
fn scan(config_path: &std::path::Path, files: &[PathBuf]) -> anyhow::Result<()> {
    let dlp_cfg = match config::load(config_path) {
        Ok(cfg) => cfg.dlp,
        Err(e) => {
            eprintln!("noexit-agent: {e}; scanning with the built-in detectors only");
            Default::default()
        }
    };
    let det = dlp::detectors(&dlp_cfg)?;
    let max = dlp_cfg.max_scan_bytes.unwrap_or(outbox::DEFAULT_MAX_SCAN_BYTES);
    for f in files {
        let (size, sha256, result) = outbox::hash_and_scan(f, &det, max).with_context(|| format!("{}", f.display()))?;
        let report = outbox::report(result.as_ref(), size, max);
        let out = serde_json::json!({ "file": f, "size": size, "sha256": sha256, "scan": report });
        println!("{out}");
    }
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    tracing::info!("stopping");
    Ok(())
}
