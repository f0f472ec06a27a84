//! `noexit-operator`: one binary, one subcommand per component.

use clap::{Parser, Subcommand};
use noexit_operator::{api, audit, controllers, dns, gateway_store, mirror, render, single_host, telemetry, webhook};

#[derive(Parser, Debug)]
#[command(name = "noexit-operator", version, about = "noexit: secure research workspaces on Kubernetes")]
struct Cli {
    /// Log as JSON lines (for log shippers) instead of human-readable text.
    #[arg(long, global = true, env = "NOEXIT_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controllers (Project, Workspace, Dataset, WorkspaceRequest).
    Controller(controllers::Args),
    /// Run the validating admission webhook.
    Webhook(webhook::Args),
    /// Run the control-plane API (agents, analysts, admins, auditors).
    Api(api::Args),
    /// Run the CRAN-only package mirror.
    Mirror(mirror::Args),
    /// Run the workspace DNS server (authoritative for the API's and mirror's names only).
    Dns(dns::Args),
    /// Run the browser remote-desktop gateway (OIDC sign-in, noVNC, filtering RFB proxy).
    Gateway(gateway_store::GatewayCommand),
    /// Print every object the operator would apply for the given manifests (no cluster needed).
    Render(render::Args),
    /// Single-host mode: run the API, mirror, DNS server and VM workspaces (libvirt) on this
    /// host from the same manifests. Runs in the foreground; re-reads the files as they change.
    Up(single_host::UpArgs),
    /// Single-host mode: stop `up` and its workspaces, remove the project networks and walls;
    /// home disks are kept.
    Down(single_host::DownArgs),
    /// Single-host mode: workspaces, phases, last heartbeats, sessions.
    Status(single_host::StatusArgs),
    #[command(name = "kvm-probe", hide = true)]
    KvmProbe,
    /// Write a new ed25519 key pair for signing audit checkpoints (PKCS#8 PEM).
    AuditKeygen(audit::keys::KeygenArgs),
    /// Migrate the database as its owner and give each audit writer (api, mirror, webhook,
    /// dns, gateway) its own PostgreSQL role that may only append its own kind of entry.
    AuditRoles(audit::roles::RolesArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Command::Render(args) = cli.command {
        // Render is synchronous and prints to stdout; keep logs off it.
        return render::main(args);
    }
    if let Command::KvmProbe = cli.command {
        return single_host::virt_type::run_probe();
    }
    if let Command::AuditKeygen(args) = &cli.command {
        return match audit::keys::keygen(args) {
            Ok(message) => {
                println!("{message}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("noexit-operator audit-keygen: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    telemetry::init_logging(cli.log_json);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("noexit-operator: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Controller(args) => controllers::run(args).await,
            Command::Webhook(args) => webhook::run(args).await,
            Command::Api(args) => api::run(args).await,
            Command::Mirror(args) => mirror::run(args).await,
            Command::AuditRoles(args) => {
                let message = audit::roles::run(&args).await?;
                println!("{message}");
                Ok(())
            }
            Command::Dns(args) => dns::run(args).await,
            Command::Gateway(args) => gateway_store::run(args).await,
            Command::Up(args) => single_host::up(args).await,
            Command::Down(args) => single_host::down(args).await,
            Command::Status(args) => {
                print!("{}", single_host::status::render(&args.common.state_dir).await?);
                Ok(())
            }
            Command::Render(_) | Command::AuditKeygen(_) | Command::KvmProbe => Ok(()),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("noexit-operator: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
