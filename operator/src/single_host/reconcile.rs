//! One reconcile pass: read the manifests, check them, allocate, render the world, read what
//! exists, plan, and run the steps. Refusals and clashes change nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use noexit_crds::agent::WorkspaceIdentity;
use noexit_host::libvirt::Libvirt;
use noexit_host::nft::Nft;
use noexit_host::plan::{self, Actual, Clash, Step};
use noexit_host::state::State;
use noexit_host::{files, model};

use super::check::{self, Checked, HostFiles};
use super::desktops::{self, LiveConsole};
use super::settle;
use super::wall;
use super::world::{self, Allocations, Settings, World};
use crate::api::MemoryCluster;
use crate::manifests::{Manifest, parse_documents};
use crate::pki::Ca;

/// Prefix of every libvirt object and nft table noexit makes.
pub const PREFIX: &str = "noexit-";

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("refused, nothing changed:\n  {}", .0.join("\n  "))]
    Refused(Vec<String>),
    #[error("name clash, nothing changed:\n  {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Clash(Vec<Clash>),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// What a pass did.
#[derive(Clone, Debug, Default)]
pub struct PassReport {
    pub steps: Vec<String>,
    pub failed: Vec<String>,
    pub elapsed: Duration,
    pub workspaces: usize,
    /// What the pass did to the services table (for the audit log).
    pub services_table: Vec<wall::Change>,
}

pub struct Host {
    pub settings: Settings,
    pub libvirt: Arc<Libvirt>,
    pub nft: Nft,
    pub state: State,
    pub ca: Arc<Ca>,
    pub manifests: Vec<PathBuf>,
    /// Refreshed after each pass for the API.
    pub cluster: Option<Arc<MemoryCluster>>,
    /// Written after each pass: the mirror's and DNS server's clients, the mirror's policy.
    pub clients_file: Option<PathBuf>,
    pub policy_file: Option<PathBuf>,
    /// Written after each pass when the gateway runs: its directory.
    pub desktops: Option<desktops::Publish>,
}

/// Every document of every file, read once the files have settled (see [`settle`]), errors
/// prefixed with the file.
pub fn read_manifests(paths: &[PathBuf]) -> Result<Vec<Manifest>, Vec<String>> {
    let files = settle::read_settled(paths, settle::SETTLE)?;
    let parsed = settle::every(
        files.iter().map(|(p, text)| parse_documents(text).map_err(|e| format!("{}: {e}", p.display()))),
    )?;
    Ok(parsed.into_iter().flatten().collect())
}

/// Parse and check the manifests (no side effects).
pub fn checked(paths: &[PathBuf]) -> Result<Checked, PassError> {
    let manifests = read_manifests(paths).map_err(PassError::Refused)?;
    check::check(&manifests, &HostFiles, chrono::Utc::now()).map_err(PassError::Refused)
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Read what exists: our prefix's domains and networks, our tables (with the hash recorded
/// when this instance applied them).
pub async fn actual(libvirt: &Libvirt, nft: &Nft, state: &State) -> anyhow::Result<Actual> {
    let (domains, networks) =
        blocking(|| Ok::<_, anyhow::Error>((libvirt.domains(PREFIX)?, libvirt.networks(PREFIX)?)))?;
    let live = blocking(|| nft.tables(PREFIX))?;
    let recorded: BTreeMap<String, String> = state.tables().await?.into_iter().collect();
    let tables = live.into_iter().map(|t| {
        let h = recorded.get(&t).cloned();
        (t, h)
    });
    Ok(Actual { domains, networks, tables: tables.collect() })
}

impl Host {
    async fn allocate(&self, checked: &Checked) -> anyhow::Result<Allocations> {
        let mut a = Allocations { ca_pem: self.ca.cert_pem().to_owned(), ..Default::default() };
        for p in &checked.projects {
            let name = kube::ResourceExt::name_any(p);
            a.projects.insert(name.clone(), self.state.project_index(&name).await?);
        }
        for w in &checked.workspaces {
            let key = (w.project.clone(), w.name.clone());
            a.workspaces.insert(key.clone(), self.state.workspace(&w.project, &w.name, vnc_password).await?);
            let creds = match self.state.credentials(&w.project, &w.name).await? {
                Some(c) => c,
                None => {
                    let id = WorkspaceIdentity { project: w.project.clone(), name: w.name.clone() };
                    let cert = self.ca.issue_workspace_client(&id, chrono::Duration::days(365))?;
                    self.state.set_credentials(&w.project, &w.name, &cert.cert_pem, &cert.key_pem).await?;
                    (cert.cert_pem, cert.key_pem)
                }
            };
            a.credentials.insert(key, creds);
        }
        Ok(a)
    }

    /// One pass. `Refused` and `Clash` change nothing on the host.
    pub async fn pass(&self) -> Result<PassReport, PassError> {
        let start = Instant::now();
        let checked = blocking(|| checked(&self.manifests))?;
        let alloc = self.allocate(&checked).await?;
        let world = world::world(&checked, &self.settings, &alloc);
        let actual = actual(&self.libvirt, &self.nft, &self.state).await?;
        let steps = plan::plan(&world.desired, &actual).map_err(PassError::Clash)?;
        let mut report = PassReport { workspaces: world.workspaces.len(), ..Default::default() };
        let known: BTreeMap<String, (String, String)> = self
            .state
            .workspaces()
            .await
            .map_err(anyhow::Error::from)?
            .into_iter()
            .map(|r| (model::domain_name(&r.project, &r.workspace), (r.project, r.workspace)))
            .collect();
        for step in steps {
            let what = describe(&step);
            match self.run_step(&step, &world, &known).await {
                Ok(()) => {
                    report.services_table.extend(wall::change_of(&step, world.services.as_ref()));
                    report.steps.push(what)
                }
                Err(e) => {
                    tracing::error!(step = %what, error = %format!("{e:#}"), "step failed");
                    if let Step::DefineDomain { name, .. } | Step::StartDomain { name } = &step
                        && let Some(f) = world.workspaces.get(name)
                    {
                        let _ = self.state.set_phase(&f.project, &f.workspace, "Failed", Some(&format!("{e:#}"))).await;
                    }
                    report.failed.push(format!("{what}: {e:#}"));
                }
            }
        }
        self.record_phases(&checked, &world).await?;
        self.publish(&checked, &world)?;
        if let Some(d) = &self.desktops {
            self.publish_desktops(d, &checked, &alloc, &world)?;
        }
        report.elapsed = start.elapsed();
        Ok(report)
    }

    async fn record_phases(&self, checked: &Checked, world: &World) -> anyhow::Result<()> {
        let live = blocking(|| self.libvirt.domains(PREFIX))?;
        let failed: Vec<(String, String)> = self
            .state
            .workspaces()
            .await?
            .into_iter()
            .filter(|r| r.phase == "Failed")
            .map(|r| (r.project, r.workspace))
            .collect();
        for w in &checked.workspaces {
            let name = model::domain_name(&w.project, &w.name);
            if !world.workspaces.contains_key(&name) {
                continue;
            }
            let active = live.get(&name).is_some_and(|d| d.active);
            let phase = match (w.running, active) {
                (_, true) => "Running",
                (false, false) => "Stopped",
                (true, false) if failed.contains(&(w.project.clone(), w.name.clone())) => continue,
                (true, false) => "Pending",
            };
            self.state.set_phase(&w.project, &w.name, phase, None).await?;
        }
        Ok(())
    }

    fn publish(&self, checked: &Checked, world: &World) -> anyhow::Result<()> {
        if let Some(cluster) = &self.cluster {
            cluster.replace_all(
                checked.projects.clone(),
                checked.workspaces.iter().map(|w| w.workspace.clone()).collect(),
            );
        }
        if let Some(path) = &self.clients_file {
            let entries: Vec<_> = world
                .clients
                .iter()
                .map(|(ip, p, w)| (*ip, crate::mirror::clients::ClientId { project: p.clone(), workspace: w.clone() }))
                .collect();
            write_if_changed(path, &crate::mirror::clients::clients_yaml(&entries))?;
        }
        if let Some(path) = &self.policy_file {
            write_if_changed(path, &crate::mirror::policy::policy_from_projects(&checked.projects).to_yaml())?;
        }
        Ok(())
    }

    /// The gateway's directory, with each domain's console as libvirt reports it now.
    fn publish_desktops(
        &self,
        d: &desktops::Publish,
        checked: &Checked,
        alloc: &Allocations,
        world: &World,
    ) -> anyhow::Result<()> {
        let live = blocking(|| -> anyhow::Result<BTreeMap<String, LiveConsole>> {
            let domains = self.libvirt.domains(PREFIX)?;
            Ok(world
                .workspaces
                .keys()
                .map(|name| {
                    let active = domains.get(name).is_some_and(|d| d.active);
                    let address = if active { self.libvirt.vnc_address(name) } else { None };
                    (name.clone(), LiveConsole { active, address })
                })
                .collect())
        })?;
        let file = desktops::directory(checked, alloc, &live, &d.site);
        write_private_if_changed(&d.path, &desktops::render(&file))
    }

    async fn run_step(
        &self,
        step: &Step,
        world: &World,
        known: &BTreeMap<String, (String, String)>,
    ) -> anyhow::Result<()> {
        let lv = &self.libvirt;
        match step {
            Step::DefineNetwork { name, xml, replace } => blocking(|| lv.define_network(name, xml, *replace))?,
            Step::AddLease { network, lease } => blocking(|| lv.update_lease(network, lease, true))?,
            Step::RemoveLease { network, lease } => blocking(|| lv.update_lease(network, lease, false))?,
            Step::ApplyTable { name, script, hash } => {
                blocking(|| self.nft.apply(&format!("applying table inet {name}"), script))?;
                self.state.set_table(name, Some(hash)).await?;
            }
            Step::DeleteTable { name } => delete_table(&self.nft, &self.state, name).await?,
            Step::DefineDomain { name, xml, replace } => {
                let f = world.workspaces.get(name).context("no files for the domain")?;
                let fresh = !f.dir.exists();
                let made = blocking(|| -> anyhow::Result<()> {
                    std::fs::create_dir_all(&f.dir).with_context(|| format!("creating {}", f.dir.display()))?;
                    // qemu (as its own user under qemu:///system) reaches the files through it.
                    set_mode(&f.dir, 0o711)?;
                    files::ensure_home(&f.home, f.home_bytes)?;
                    if let Some((base, overlay)) = &f.overlay {
                        files::ensure_overlay(overlay, base)?;
                    }
                    files::write_seed(&f.seed, &f.seed_files)?;
                    lv.define_domain(name, xml, *replace)?;
                    Ok(())
                });
                if let Err(e) = made {
                    // Nothing half-made: a new workspace's files go; an existing home stays.
                    if fresh {
                        let _ = files::remove_workspace(&f.dir);
                    }
                    return Err(e);
                }
            }
            Step::StartDomain { name } => {
                if let Some(f) = world.workspaces.get(name) {
                    // A stale socket from the last run would make qemu refuse to bind.
                    if let Some(sock) = &f.test_console {
                        let _ = std::fs::remove_file(sock);
                    }
                }
                blocking(|| lv.start_domain(name))?
            }
            Step::StopDomain { name } => blocking(|| lv.stop_domain(name))?,
            Step::DeleteDomain { name } => {
                blocking(|| lv.delete_domain(name))?;
                if let Some((project, workspace)) = known.get(name) {
                    files::remove_workspace(&world::workspace_dir(&self.settings.state_dir, project, workspace))?;
                    self.state.forget_workspace(project, workspace).await?;
                }
            }
            Step::DeleteNetwork { name } => {
                blocking(|| lv.delete_network(name))?;
                if let Some(project) = name.strip_prefix(PREFIX) {
                    self.state.forget_project(project).await?;
                }
            }
        }
        Ok(())
    }
}

/// Run `down`'s steps: stop our domains (files kept), remove our tables (the services table
/// too) and networks. The steps done, in order.
pub async fn down(libvirt: &Libvirt, nft: &Nft, state: &State) -> anyhow::Result<Vec<Step>> {
    let instance = state.instance().await?;
    let actual = actual(libvirt, nft, state).await?;
    let mut done = Vec::new();
    for step in plan::down(&instance, &actual) {
        match &step {
            Step::StopDomain { name } => blocking(|| libvirt.stop_domain(name))?,
            Step::DeleteTable { name } => delete_table(nft, state, name).await?,
            Step::DeleteNetwork { name } => blocking(|| libvirt.delete_network(name))?,
            _ => {}
        }
        done.push(step);
    }
    for row in state.workspaces().await? {
        state.set_phase(&row.project, &row.workspace, "Stopped", None).await?;
    }
    Ok(done)
}

/// Removes this instance's services table if this instance applied it (its hash recorded; no
/// error if it is gone already): when `up` stops serving, nothing of noexit's listens on those
/// ports any more. The step done, if any.
pub async fn remove_services_table(nft: &Nft, state: &State) -> anyhow::Result<Option<Step>> {
    let name = noexit_host::render::services::table_name(&state.instance().await?);
    let recorded: BTreeMap<String, String> = state.tables().await?.into_iter().collect();
    if !recorded.contains_key(&name) {
        return Ok(None);
    }
    delete_table(nft, state, &name).await?;
    Ok(Some(Step::DeleteTable { name }))
}

/// Removes one of our tables (no error if it is gone already) and forgets its recorded hash.
async fn delete_table(nft: &Nft, state: &State, name: &str) -> anyhow::Result<()> {
    blocking(|| nft.apply(&format!("deleting table inet {name}"), &noexit_host::render::nft::delete_script(name)))?;
    state.set_table(name, None).await?;
    Ok(())
}

pub fn describe(step: &Step) -> String {
    match step {
        Step::DefineNetwork { name, replace, .. } => {
            format!("{} network {name}", if *replace { "redefine" } else { "define" })
        }
        Step::AddLease { network, lease } => format!("lease {} → {} on {network}", lease.mac, lease.ip),
        Step::RemoveLease { network, lease } => format!("drop lease {} on {network}", lease.mac),
        Step::ApplyTable { name, .. } => format!("apply table inet {name}"),
        Step::DefineDomain { name, replace, .. } => {
            format!("{} domain {name}", if *replace { "redefine" } else { "define" })
        }
        Step::StartDomain { name } => format!("start {name}"),
        Step::StopDomain { name } => format!("stop {name}"),
        Step::DeleteDomain { name } => format!("delete domain {name} and its disks"),
        Step::DeleteTable { name } => format!("delete table inet {name}"),
        Step::DeleteNetwork { name } => format!("delete network {name}"),
    }
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

fn write_if_changed(path: &Path, text: &str) -> anyhow::Result<()> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(());
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Like [`write_if_changed`], readable by the owner only (it holds secrets): the temporary
/// file is made 0600 before anything is written to it.
fn write_private_if_changed(path: &Path, text: &str) -> anyhow::Result<()> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(());
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    super::write_private(&tmp, text)?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// A random VNC password: 8 characters, all VNC authentication uses
/// ([`desktops::VNC_PASSWORD_MAX`]), from 57 (about 46 bits).
pub fn vnc_password() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::thread_rng();
    (0..desktops::VNC_PASSWORD_MAX).map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())])).collect()
}
