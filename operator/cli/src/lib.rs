//! `noexit` (also `kubectl noexit`): the CLI for analysts, admins and auditors. Every command
//! but `audit` talks to the control-plane API with the caller's OIDC token; `audit` reads the
//! audit store directly (see [`audit`]).
//!
//! Exit codes: 0 ok · 1 refused or denied by the server · 2 usage (bad flags, unreadable files)
//! · 3 API unreachable or unavailable (retry). `noexit audit` keeps its own: 1 tampering found.

pub mod audit;
pub mod client;
pub mod escape;
pub mod outputs;
pub mod table;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use http::Method;
use serde_json::Value;

use client::{ApiClient, CliError};
use escape::term;
use noexit_api::people::{AdminRevocation, DecisionBody, NewRequest, RequestSummary, RevocationAck, Sessions};
use noexit_crds::workspace::Runtime;

#[derive(Parser, Debug)]
#[command(
    name = "noexit",
    version,
    about = "noexit: request, approve and inspect research workspaces",
    after_help = "Exit codes: 0 ok, 1 refused or denied by the server, 2 usage error, 3 API unreachable or unavailable.\nAlso runs as `kubectl noexit` when installed as kubectl-noexit on PATH."
)]
pub struct Cli {
    /// Control-plane API URL.
    #[arg(long, env = "NOEXIT_API", global = true, default_value = "https://noexit-api.noexit-system.svc:8443")]
    pub api_url: String,
    /// OIDC access token (prefer the environment variable: flags show up in `ps`).
    #[arg(long, env = "NOEXIT_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) that signed the API's certificate; default the system roots.
    #[arg(long, env = "NOEXIT_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Print the API's JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Ask for something that needs an admin's approval.
    #[command(subcommand)]
    Request(RequestKind),
    /// Workspace requests of a project.
    #[command(subcommand)]
    Requests(RequestsCommand),
    /// Approve a workspace request (admins; not your own).
    Approve {
        /// Name of the WorkspaceRequest.
        name: String,
        /// Project name.
        #[arg(long, short)]
        project: String,
        /// Why (kept in the audit log).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Deny a workspace request (admins; not your own).
    Deny {
        name: String,
        /// Project name.
        #[arg(long, short)]
        project: String,
        /// Why (required; shown to the requester and kept in the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Latest heartbeat of each workspace and recent session events of a project.
    Sessions {
        /// Project name.
        #[arg(long, short)]
        project: String,
        /// Most session events to show.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Revoke a workspace agent's certificate: the agent is refused from its next request.
    Revoke {
        /// Workspace name.
        workspace: String,
        /// Project name.
        #[arg(long, short)]
        project: String,
        #[arg(long)]
        reason: String,
        /// Certificate serial (hex); default the workspace's current agent certificate.
        #[arg(long)]
        serial: Option<String>,
    },
    /// Who the token says you are and your roles in a project.
    Whoami {
        /// Project name.
        #[arg(long, short)]
        project: String,
    },
    /// Read and verify the audit log (talks to the audit store, not the API).
    Audit(audit::AuditArgs),
    /// Output requests: review, release, download, verify receipts (the door out).
    #[command(subcommand)]
    Outputs(outputs::OutputsCommand),
    /// Files submitted into a workspace's /inbox (the door in).
    #[command(subcommand)]
    Inbox(outputs::InboxCommand),
}

#[derive(Subcommand, Debug)]
pub enum RequestKind {
    /// Request a workspace for a researcher (data analysts).
    Workspace(WorkspaceRequestArgs),
}

#[derive(clap::Args, Debug)]
pub struct WorkspaceRequestArgs {
    /// Project name.
    #[arg(long, short)]
    pub project: String,
    /// The researcher who will work in it.
    #[arg(long)]
    pub owner: String,
    /// `pod` (container) or `vm` (virtual machine).
    #[arg(long, value_enum)]
    pub runtime: RuntimeArg,
    /// Workspace image (container image for pod, containerDisk for vm).
    #[arg(long)]
    pub image: String,
    /// Why it is needed; the approving admin and the audit log see it.
    #[arg(long)]
    pub justification: String,
    /// Name of the Workspace to create; default `<owner's local part>-<runtime>`.
    #[arg(long)]
    pub workspace_name: Option<String>,
    /// Name of the request; default `<workspace-name>-<random>`.
    #[arg(long)]
    pub name: Option<String>,
    /// Dataset to attach read-only (repeat).
    #[arg(long = "dataset")]
    pub datasets: Vec<String>,
    #[arg(long)]
    pub profile: Option<String>,
    #[arg(long)]
    pub cpu: Option<String>,
    #[arg(long)]
    pub memory: Option<String>,
    #[arg(long)]
    pub home_size: Option<String>,
    #[arg(long)]
    pub idle_timeout_minutes: Option<u32>,
    /// Stop the workspace for good after this instant (RFC 3339).
    #[arg(long)]
    pub expires: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum RuntimeArg {
    Pod,
    Vm,
}

#[derive(Subcommand, Debug)]
pub enum RequestsCommand {
    /// List a project's workspace requests and their decisions.
    List {
        /// Project name.
        #[arg(long, short)]
        project: String,
    },
}

/// A DNS label from the local part of an e-mail address (`alice.smith@x` → `alice-smith`).
pub fn default_workspace_name(owner: &str, runtime: RuntimeArg) -> String {
    let local = owner.split('@').next().unwrap_or(owner);
    let mut label: String =
        local.to_ascii_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    label.truncate(34);
    let label = label.trim_matches('-');
    let suffix = match runtime {
        RuntimeArg::Pod => "r",
        RuntimeArg::Vm => "vm",
    };
    if label.is_empty() { format!("ws-{suffix}") } else { format!("{label}-{suffix}") }
}

fn encode(segment: &str) -> Result<&str, CliError> {
    // Names are DNS labels; anything else would change the path, so refuse it here.
    if segment.is_empty() || !segment.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') {
        return Err(CliError::Usage(format!("{segment:?} is not a valid name")));
    }
    Ok(segment)
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", escape::json(&serde_json::to_string_pretty(v).unwrap_or_default()));
}

fn print_requests(list: &[RequestSummary]) {
    println!(
        "{:<28} {:<20} {:<26} {:<26} {:<7} {:<9} DECIDED BY",
        "NAME", "WORKSPACE", "REQUESTER", "OWNER", "RUNTIME", "DECISION"
    );
    for r in list {
        let decision = r.decision.map(|d| format!("{d:?}")).unwrap_or_else(|| "Pending".into());
        println!(
            "{:<28} {:<20} {:<26} {:<26} {:<7} {:<9} {}",
            term(&r.name),
            term(&r.workspace_name),
            term(&r.requester),
            term(&r.owner),
            r.runtime.as_str(),
            decision,
            term(r.decided_by.as_deref().unwrap_or("-"))
        );
    }
}

async fn execute(cli: Cli) -> Result<(), CliError> {
    let api = || ApiClient::new(&cli.api_url, cli.token.clone(), cli.ca.as_deref());
    let none: Option<&()> = None;
    match &cli.command {
        // `main` hands `audit` to its own module; it never needs the API.
        Command::Audit(_) => return Err(CliError::Usage("noexit audit reads the audit store, not the API".into())),
        // Offline: no API client (and no token or CA) needed.
        Command::Outputs(outputs::OutputsCommand::VerifyReceipt { file, receipt, key }) => {
            println!("{}", outputs::verify_receipt(file, receipt, key.as_deref())?);
        }
        Command::Outputs(c) => outputs::outputs(&api()?, &cli.api_url, cli.json, c).await?,
        Command::Inbox(c) => outputs::inbox(&api()?, cli.json, c).await?,
        Command::Request(RequestKind::Workspace(a)) => {
            let workspace_name =
                a.workspace_name.clone().unwrap_or_else(|| default_workspace_name(&a.owner, a.runtime));
            let body = NewRequest {
                name: a.name.clone(),
                workspace_name,
                owner: a.owner.clone(),
                runtime: match a.runtime {
                    RuntimeArg::Pod => Runtime::Pod,
                    RuntimeArg::Vm => Runtime::Vm,
                },
                image: a.image.clone(),
                justification: a.justification.clone(),
                profile: a.profile.clone(),
                datasets: a.datasets.clone(),
                cpu: a.cpu.clone(),
                memory: a.memory.clone(),
                home_size: a.home_size.clone(),
                idle_timeout_minutes: a.idle_timeout_minutes,
                expires: a.expires,
            };
            let path = format!("/v1/projects/{}/workspacerequests", encode(&a.project)?);
            let created: Value = api()?.call(Method::POST, &path, Some(&body)).await?;
            if cli.json {
                print_json(&created);
            } else {
                let name = term(created["metadata"]["name"].as_str().unwrap_or_default());
                println!("workspacerequest {}/{name} created; an admin of {} must approve it:", a.project, a.project);
                println!("  noexit approve {name} --project {}", a.project);
            }
        }
        Command::Requests(RequestsCommand::List { project }) => {
            let path = format!("/v1/projects/{}/workspacerequests", encode(project)?);
            let list: Vec<RequestSummary> = api()?.call(Method::GET, &path, none).await?;
            if cli.json { print_json(&list) } else { print_requests(&list) }
        }
        Command::Approve { name, project, reason } => {
            let path = format!("/v1/projects/{}/workspacerequests/{}/approve", encode(project)?, encode(name)?);
            let body = DecisionBody { reason: reason.clone().unwrap_or_default() };
            let r: RequestSummary = api()?.call(Method::POST, &path, Some(&body)).await?;
            if cli.json { print_json(&r) } else { println!("workspacerequest {project}/{name} approved") }
        }
        Command::Deny { name, project, reason } => {
            let path = format!("/v1/projects/{}/workspacerequests/{}/deny", encode(project)?, encode(name)?);
            let body = DecisionBody { reason: reason.clone() };
            let r: RequestSummary = api()?.call(Method::POST, &path, Some(&body)).await?;
            if cli.json { print_json(&r) } else { println!("workspacerequest {project}/{name} denied") }
        }
        Command::Sessions { project, limit } => {
            let path = format!("/v1/projects/{}/sessions?limit={limit}", encode(project)?);
            let s: Sessions = api()?.call(Method::GET, &path, none).await?;
            if cli.json {
                print_json(&s);
            } else {
                println!("{:<24} {:<26} {:<8} {:<8} VERSION", "WORKSPACE", "LAST HEARTBEAT", "LOCKED", "SESSIONS");
                for w in &s.workspaces {
                    println!(
                        "{:<24} {:<26} {:<8} {:<8} {}",
                        term(&w.workspace),
                        w.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        w.egress_locked,
                        w.active_sessions,
                        term(&w.agent_version)
                    );
                }
                println!();
                println!("{:<26} {:<24} {:<18} {:<20} SESSION", "AT", "WORKSPACE", "ACTION", "USER");
                for e in &s.events {
                    println!(
                        "{:<26} {:<24} {:<18} {:<20} {}",
                        e.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        term(&e.workspace),
                        term(&e.action),
                        term(&e.username),
                        term(e.session.as_deref().unwrap_or("-"))
                    );
                }
            }
        }
        Command::Revoke { workspace, project, reason, serial } => {
            let path = format!("/v1/projects/{}/workspaces/{}/revoke", encode(project)?, encode(workspace)?);
            let body = AdminRevocation { serial: serial.clone(), reason: reason.clone() };
            let ack: RevocationAck = api()?.call(Method::POST, &path, Some(&body)).await?;
            if cli.json {
                print_json(&ack);
            } else if ack.new {
                println!("certificate {} of workspace {} revoked", term(&ack.serial), term(&ack.workspace));
            } else {
                println!("certificate {} of workspace {} was already revoked", term(&ack.serial), term(&ack.workspace));
            }
        }
        Command::Whoami { project } => {
            let path = format!("/v1/projects/{}/whoami", encode(project)?);
            let me: Value = api()?.call(Method::GET, &path, none).await?;
            if cli.json {
                print_json(&me);
            } else {
                let roles: Vec<&str> =
                    me["roles"].as_array().map(|r| r.iter().filter_map(|v| v.as_str()).collect()).unwrap_or_default();
                println!(
                    "{} in {}: {} (second factor: {})",
                    term(me["user"].as_str().unwrap_or("?")),
                    project,
                    term(&roles.join(", ")),
                    me["mfa"]
                );
            }
        }
    }
    Ok(())
}

/// Entry point of the `noexit` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("noexit: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    if let Command::Audit(args) = cli.command {
        return runtime.block_on(audit::run(args));
    }
    match runtime.block_on(execute(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The message can quote what the server was sent or holds.
            eprintln!("noexit: {}", term(&e.to_string()));
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid_and_names_default_sensibly() {
        Cli::command().debug_assert();
        assert_eq!(default_workspace_name("Alice.Smith@ward7.example", RuntimeArg::Vm), "alice-smith-vm");
        assert_eq!(default_workspace_name("@x", RuntimeArg::Pod), "ws-r");
        assert!(encode("../etc").is_err());
        assert!(encode("alice-r").is_ok());
    }
}
