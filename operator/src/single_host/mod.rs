//! Single-host mode: `noexit-operator up -f FILE…`, `down`, `status`.
//!
//! One process on a Linux host with libvirt runs the control-plane API (SQLite), the package
//! mirror, the DNS server and a reconcile loop that turns the same Project / Dataset /
//! Workspace manifests as on Kubernetes (checked by the same validators) into libvirt networks
//! and domains and a host nftables table per project, through `noexit-host`.
//!
//! Pieces: [`check`] (which manifests can run here, pure), [`world`] (what must exist, pure),
//! [`reconcile`] (one pass of I/O), [`services`] (the API, mirror and DNS in-process),
//! [`gateway`] (the remote-desktop gateway in-process) and [`desktops`] (its directory, pure),
//! [`virt_type`] (KVM or TCG), [`status`], [`refusals`] (what `up` refused, in the audit log),
//! [`wall`] (the services table's changes, in the audit log).

pub mod audit;
pub mod check;
pub mod desktops;
pub mod gateway;
pub mod reconcile;
pub mod refusals;
pub mod services;
pub mod settle;
pub mod status;
pub mod virt_type;
pub mod wall;
pub mod world;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use noexit_host::libvirt::Libvirt;
use noexit_host::model::{DEFAULT_SUBNET_BASE, HostPorts, Ipv4Cidr};
use noexit_host::nft::Nft;
use noexit_host::state::State;

use self::reconcile::{Host, PassError};
use crate::pki::Ca;

/// Default state directory (home disks, seeds, databases, the CA).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/noexit/host";

#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// Where single-host mode keeps its state: databases, CA, home disks and seeds.
    #[arg(long, env = "NOEXIT_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// libvirt connection URI.
    #[arg(long, env = "NOEXIT_LIBVIRT_URI", default_value = "qemu:///system")]
    pub libvirt_uri: String,
}

/// Arguments of `noexit-operator up`.
#[derive(clap::Args, Debug, Clone)]
pub struct UpArgs {
    /// Manifest files (Projects, Datasets, Workspaces); re-read every --interval seconds.
    #[arg(short = 'f', long = "file", required = true)]
    pub files: Vec<PathBuf>,
    #[command(flatten)]
    pub common: Common,
    /// `kvm`, `qemu` (TCG emulation) or `auto` (KVM if /dev/kvm creates a VM, else TCG).
    #[arg(long, env = "NOEXIT_VIRT_TYPE", default_value = "auto")]
    pub virt_type: String,
    /// Address the API, mirror and DNS server listen on (the project tables let each project's
    /// VMs reach them on its gateway address only; the services table closes their ports to
    /// everything but loopback, the project bridges and --api-allow).
    #[arg(long, default_value = "0.0.0.0")]
    pub listen_address: Ipv4Addr,
    /// Also let this IPv4 network (CIDR, or one address) reach the API port, e.g. the admins'
    /// network for the `noexit` CLI. Repeatable. The mirror and DNS stay closed to it.
    #[arg(long = "api-allow", value_name = "CIDR")]
    pub api_allow: Vec<Ipv4Cidr>,
    #[arg(long, default_value_t = 8443)]
    pub api_port: u16,
    #[arg(long, default_value_t = 8080)]
    pub mirror_port: u16,
    /// Where the DNS server listens; guests ask port 53 on their gateway, redirected here.
    #[arg(long, default_value_t = 5353)]
    pub dns_port: u16,
    /// CRAN repository the mirror fetches from (none: it serves its cache only).
    #[arg(long)]
    pub mirror_upstream: Option<String>,
    /// First address of the range project subnets (/24 each) are cut from.
    #[arg(long, default_value_t = DEFAULT_SUBNET_BASE)]
    pub subnet_base: Ipv4Addr,
    /// TCP address for the VMs' VNC consoles, for a gateway that runs elsewhere. Default: each
    /// console is a unix socket in libvirt's private directory for the domain, which only root
    /// (the gateway in this process) can open.
    #[arg(long)]
    pub vnc_listen: Option<Ipv4Addr>,
    /// Seconds between reconcile passes.
    #[arg(long, default_value_t = 5)]
    pub interval: u64,
    #[command(flatten)]
    pub gateway: gateway::GatewayOptions,
    /// Reconcile once and exit (no services): for scripts and benchmarks.
    #[arg(long)]
    pub once: bool,
    /// With --once: run this many passes in the one process, each printed (benchmarks: the
    /// passes after the first find nothing to change).
    #[arg(long, default_value_t = 1, requires = "once")]
    pub passes: u32,
}

#[derive(clap::Args, Debug, Clone)]
pub struct DownArgs {
    #[command(flatten)]
    pub common: Common,
}

#[derive(clap::Args, Debug, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    pub common: Common,
}

fn pid_file(state_dir: &Path) -> PathBuf {
    state_dir.join("up.pid")
}

fn secure_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Traversable by qemu (its own user under qemu:///system), not listable.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .with_context(|| format!("chmod {}", dir.display()))
}

/// The CA (made on first start, kept in the state directory).
pub fn load_or_make_ca(state_dir: &Path) -> anyhow::Result<Ca> {
    let dir = state_dir.join("pki");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (cert, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    if cert.exists() && key.exists() {
        let c = std::fs::read_to_string(&cert)?;
        let k = std::fs::read_to_string(&key)?;
        return Ok(Ca::from_pem(&c, &k)?);
    }
    let ca = Ca::generate("noexit single-host CA")?;
    write_private(&key, ca.key_pem())?;
    std::fs::write(&cert, ca.cert_pem())?;
    Ok(ca)
}

pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    // Everything that can refuse comes before anything is made (but the audit entry saying so).
    let mut audit = refusals::Recorder::new(&args.common.state_dir, &args.files);
    let checked = match tokio::task::block_in_place(|| reconcile::checked(&args.files)) {
        Ok(c) => c,
        Err(e) => {
            let r = refusals::refusals_of(&e).unwrap_or_default();
            return Err(audit.refuse_start(r, anyhow::anyhow!("{e}")).await);
        }
    };
    let virt_type = match virt_type::decide(&args.virt_type) {
        Ok(v) => v,
        Err(e) => return Err(audit.refuse_start(refusals::host_refusal("virt-type", &e), e).await),
    };
    let desktop_gateway = match gateway::plan(
        &args.gateway,
        &args.common.state_dir,
        &services::Paths::new(&args.common.state_dir),
        services::api_address(&args),
    ) {
        Ok(g) => g,
        Err(e) => return Err(audit.refuse_start(refusals::host_refusal("gateway", &e), e).await),
    };
    let libvirt = match tokio::task::block_in_place(|| Libvirt::open(&args.common.libvirt_uri)) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            let e = anyhow::Error::from(e);
            let object = format!("libvirt:{}", args.common.libvirt_uri);
            return Err(audit.refuse_start(refusals::host_refusal(object, &e), e).await);
        }
    };
    let nft = Nft::default();
    if let Err(e) =
        tokio::task::block_in_place(|| nft.tables("noexit-")).context("nftables is needed for the project walls")
    {
        return Err(audit.refuse_start(refusals::host_refusal("nftables", &e), e).await);
    }
    tracing::info!(virt_type = virt_type.0.as_str(), reason = %virt_type.1, workspaces = checked.workspaces.len(), "single-host mode");

    let state_dir = &args.common.state_dir;
    secure_dir(state_dir)?;
    secure_dir(&state_dir.join("workspaces"))?;
    let state = State::open(&state_dir.join("host.db")).await?;
    let instance = state.instance().await?;
    let ca = Arc::new(load_or_make_ca(state_dir)?);
    state.set_setting("virt_type", virt_type.0.as_str()).await?;
    state.set_setting("virt_type_reason", &virt_type.1).await?;
    state.set_setting("libvirt_uri", &args.common.libvirt_uri).await?;
    let ports = HostPorts { api: args.api_port, mirror: args.mirror_port, dns: args.dns_port };
    let settings = world::Settings {
        instance,
        state_dir: state_dir.clone(),
        virt_type: virt_type.0,
        ports,
        subnet_base: args.subnet_base,
        vnc_listen: args.vnc_listen,
        // Nothing listens with --once: no services table (an earlier one is removed).
        services: (!args.once).then(|| args.api_allow.clone()),
    };
    let cluster = Arc::new(crate::api::MemoryCluster::new());
    let svc = services::Paths::new(state_dir);
    let gateway_line = desktop_gateway.as_ref().map_or_else(|| gateway::OFF.to_owned(), |g| g.describe());
    if !args.once {
        let services_line = services_line(&args, &settings.instance);
        println!("services: {services_line}");
        println!("gateway: {gateway_line}");
        state.set_setting("services", &services_line).await?;
        state.set_setting("gateway", &gateway_line).await?;
    }
    std::fs::create_dir_all(&svc.dir).with_context(|| format!("creating {}", svc.dir.display()))?;
    let host = Host {
        settings,
        libvirt,
        nft,
        state: state.clone(),
        ca: ca.clone(),
        manifests: args.files.clone(),
        cluster: Some(cluster.clone()),
        clients_file: Some(svc.clients.clone()),
        policy_file: Some(svc.policy.clone()),
        desktops: desktop_gateway.as_ref().map(|g| g.publish()),
    };
    let first = match host.pass().await {
        Ok(r) => r,
        Err(e) => {
            let error = anyhow::anyhow!("{e}");
            return Err(match refusals::refusals_of(&e) {
                Some(r) => audit.refuse_start(r, error).await,
                None => error,
            });
        }
    };
    print_pass(&first);
    audit.services_table(&first.services_table).await;
    if args.once {
        for _ in 1..args.passes {
            let pass = host.pass().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            audit.services_table(&pass.services_table).await;
            print_pass(&pass);
        }
        return Ok(());
    }
    std::fs::write(pid_file(state_dir), std::process::id().to_string())?;
    // Before any writer opens the shared database: its keys, and the migrations run once.
    audit::prepare(state_dir).await?;
    println!("audit: {}", audit::verify_command(state_dir));
    let desktop_gateway = match desktop_gateway {
        Some(g) => Some(g.prepare(&ca).await?),
        None => None,
    };
    let mut services = services::start(&args, &svc, &ca, cluster)?;
    if let Some(g) = desktop_gateway {
        services.spawn(g);
    }
    let mut tick = tokio::time::interval(Duration::from_secs(args.interval.max(1)));
    tick.tick().await;
    let shutdown = crate::telemetry::shutdown_signal();
    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            Some(done) = services.join_next() => {
                break Err(match done {
                    Ok(Ok(name)) => anyhow::anyhow!("{name} stopped"),
                    Ok(Err(e)) => e,
                    Err(e) => anyhow::anyhow!("a service panicked: {e}"),
                });
            }
            _ = tick.tick() => {
                let pass = host.pass().await;
                audit.pass(pass.as_ref().map(|_| ())).await;
                if let Ok(r) = &pass {
                    audit.services_table(&r.services_table).await;
                }
                match pass {
                    Ok(r) if r.steps.is_empty() && r.failed.is_empty() => {}
                    Ok(r) => print_pass(&r),
                    // A bad edit keeps what runs (fail closed, lose nothing), says why and is
                    // audited (once while the files stay the same).
                    Err(e @ (PassError::Refused(_) | PassError::Clash(_))) => tracing::error!("{e}"),
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "reconcile failed"),
                }
            }
        }
    };
    // Nothing of ours listens on the service ports any more: their table goes too. Only once
    // the services have stopped, so no port is ever open without it.
    let stopped = tokio::time::timeout(Duration::from_secs(10), services.shutdown()).await.is_ok();
    let removed = if stopped {
        reconcile::remove_services_table(&host.nft, &state).await
    } else {
        Err(anyhow::anyhow!("the services did not stop within 10 s; the table stays until `down`"))
    };
    match removed {
        Ok(Some(step)) => {
            println!("  {}", reconcile::describe(&step));
            audit.services_table(&wall::change_of(&step, None).into_iter().collect::<Vec<_>>()).await;
        }
        Ok(None) => {}
        Err(e) => tracing::error!(error = %format!("{e:#}"), "could not remove the services table"),
    }
    let _ = state.set_setting("services", SERVICES_OFF).await;
    let _ = state.set_setting("gateway", "off (`up` is not running)").await;
    let _ = std::fs::remove_file(pid_file(state_dir));
    result
}

/// What `status` says of the services when `up` is not running.
const SERVICES_OFF: &str = "off (`up` is not running; nothing listens, the services table is removed)";

/// What `up` says about the services table, before its first pass.
fn services_line(args: &UpArgs, instance: &str) -> String {
    let allow = if args.api_allow.is_empty() {
        String::new()
    } else {
        let nets: Vec<String> = args.api_allow.iter().map(ToString::to_string).collect();
        format!(", and the API from {}", nets.join(", "))
    };
    format!(
        "API tcp {}, mirror tcp {}, DNS {} on {}, reached from loopback and the project bridges only{allow} (table inet {})",
        args.api_port,
        args.mirror_port,
        args.dns_port,
        args.listen_address,
        noexit_host::render::services::table_name(instance)
    )
}

fn print_pass(r: &reconcile::PassReport) {
    for s in &r.steps {
        println!("  {s}");
    }
    for f in &r.failed {
        println!("  FAILED {f}");
    }
    println!(
        "reconciled {} workspace(s) in {} ms ({} step(s), {} failed)",
        r.workspaces,
        r.elapsed.as_millis(),
        r.steps.len(),
        r.failed.len()
    );
}

pub async fn down(args: DownArgs) -> anyhow::Result<()> {
    let state_dir = &args.common.state_dir;
    let pidf = pid_file(state_dir);
    if let Ok(text) = std::fs::read_to_string(&pidf)
        && let Ok(pid) = text.trim().parse::<i32>()
        && process_alive(pid)
    {
        // SAFETY: plain kill(2) on the pid `up` wrote.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while process_alive(pid) {
            anyhow::ensure!(std::time::Instant::now() < deadline, "`up` (pid {pid}) did not stop within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!("stopped noexit up (pid {pid})");
    }
    let db = state_dir.join("host.db");
    anyhow::ensure!(db.exists(), "{}: no single-host state here (nothing to bring down)", state_dir.display());
    let state = State::open(&db).await?;
    let libvirt = tokio::task::block_in_place(|| Libvirt::open(&args.common.libvirt_uri))?;
    let steps = reconcile::down(&libvirt, &Nft::default(), &state).await?;
    for s in &steps {
        println!("  {}", reconcile::describe(s));
    }
    let removed: Vec<_> = steps.iter().filter_map(|s| wall::change_of(s, None)).collect();
    refusals::Recorder::new(state_dir, &[]).services_table(&removed).await;
    state.set_setting("services", SERVICES_OFF).await?;
    state.set_setting("gateway", "off (`up` is not running)").await?;
    println!(
        "down: workspaces stopped, project networks, walls and the services table removed; home disks kept in {}",
        state_dir.join("workspaces").display()
    );
    Ok(())
}

fn process_alive(pid: i32) -> bool {
    // Zombies count as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
