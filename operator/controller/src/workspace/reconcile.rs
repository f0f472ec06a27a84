//! Workspace: load its project and datasets → validate → reuse or issue the agent certificate →
//! build → apply → prune → status. Deletion revokes the agent certificate (state outside the
//! cluster) before the finalizer lets the object go.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use noexit_crds::agent::WorkspaceIdentity;
use noexit_crds::common::condition;
use noexit_crds::{Dataset, Project, Workspace};

use super::build::{
    SERIAL_ANNOTATION, VncCredential, agent_secret_name, should_run, virtual_machine_resource, vnc_secret_name,
};
use super::{status, validate};
use crate::apply::{Scope, apply_all, prune};
use crate::children::Owner;
use crate::conditions::transitions;
use crate::context::{Context, Outcome, RESYNC, key_of};
use crate::error::Error;
use crate::finalizers;
use crate::revoke::Revocation;
use crate::{ca, workspace};

pub const KIND: &str = "Workspace";
/// Held while the agent certificate may still be valid at the API.
pub const FINALIZER: &str = "noexit.io/revoke-agent-certificate";
/// How often a running workspace is looked at for a stale agent heartbeat.
pub const AGENT_CHECK: Duration = Duration::from_secs(30);

pub async fn reconcile(guard: Arc<DeserializeGuard<Workspace>>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ws = match &guard.0 {
        Ok(ws) => ws,
        Err(bad) => return Ok(ctx.malformed::<Workspace>(KIND, bad).await),
    };
    let key = format!("{KIND} {}", key_of(ws));
    ctx.instrumented(KIND, &key, reconcile_workspace(ws, &ctx)).await
}

pub fn error_policy(guard: Arc<DeserializeGuard<Workspace>>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.retry_after_failure(&format!("{KIND} {}", key_of(guard.as_ref())), error)
}

/// Where a Workspace's children live (for pruning).
pub fn scopes(namespace: &str) -> Vec<Scope> {
    vec![
        Scope::of::<Secret>(Some(namespace)),
        Scope::of::<Role>(Some(namespace)),
        Scope::of::<RoleBinding>(Some(namespace)),
        Scope::of::<PersistentVolumeClaim>(Some(namespace)),
        Scope::of::<Service>(Some(namespace)),
        Scope::of::<Pod>(Some(namespace)),
        Scope { resource: virtual_machine_resource(), namespace: Some(namespace.to_owned()) },
    ]
}

async fn reconcile_workspace(ws: &Workspace, ctx: &Context) -> Result<Outcome, Error> {
    let ns = ws.namespace().ok_or_else(|| Error::Internal(format!("workspace {} has no namespace", ws.name_any())))?;
    let api: Api<Workspace> = Api::namespaced(ctx.client.clone(), &ns);
    let result = if ws.metadata.deletion_timestamp.is_some() {
        cleanup(ws, &api, ctx).await
    } else {
        match finalizers::ensure(&api, ws, FINALIZER).await {
            Ok(()) => apply(ws, &api, ctx).await,
            Err(e) => Err(e),
        }
    };
    if let Err(e) = &result {
        let live = ws.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
        ctx.report_failure(&api, ws, &live, e).await;
    }
    result
}

async fn apply(ws: &Workspace, api: &Api<Workspace>, ctx: &Context) -> Result<Outcome, Error> {
    let name = ws.name_any();
    let ns = ws.namespace().unwrap_or_default();
    let now = ctx.now();
    let project = Api::<Project>::all(ctx.client.clone())
        .get_opt(&ws.spec.project)
        .await
        .map_err(|e| Error::kube("read", format!("project {}", ws.spec.project), e))?;
    let dataset_api = Api::<Dataset>::all(ctx.client.clone());
    let mut datasets = Vec::new();
    for d in &ws.spec.datasets {
        if let Some(found) = dataset_api.get_opt(d).await.map_err(|e| Error::kube("read", format!("dataset {d}"), e))? {
            datasets.push(found);
        }
    }
    let resolved = validate(ws, project.as_ref(), &datasets, &ctx.site.workspace_images, now);

    let secret_name = agent_secret_name(&name);
    let live_secret = Api::<Secret>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&secret_name)
        .await
        .map_err(|e| Error::kube("read", format!("Secret {ns}/{secret_name}"), e))?;
    let authority = ctx.ca.get().await?;
    let id = WorkspaceIdentity { project: ws.spec.project.clone(), name: name.clone() };
    let validity = chrono::Duration::days(ctx.site.agent_cert_days.into());
    let (creds, issued) = ca::credentials(&authority, live_secret.as_ref(), &id, validity, now)?;

    // The VNC password is made once and kept (a new one would cut the live desktop session).
    let vnc_name = vnc_secret_name(&name);
    let live_vnc = Api::<Secret>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&vnc_name)
        .await
        .map_err(|e| Error::kube("read", format!("Secret {ns}/{vnc_name}"), e))?;
    let (vnc, vnc_new) = VncCredential::reuse_or_new(live_vnc.as_ref());

    let children = workspace::build(ws, &resolved, &ctx.site, &creds, &vnc)?;
    let mut applied = apply_all(&ctx.client, &children).await?;
    let owner = Owner::of(ws, &ws.spec.project);
    applied.pruned = prune(&ctx.client, &owner.selector(), &scopes(&ns), &children).await?;

    let regarding = ws.object_ref(&());
    if issued {
        let note = format!("issued agent certificate {} (valid until {})", creds.serial, creds.not_after);
        ctx.event(&regarding, false, "CertificateIssued", note).await;
    }
    if vnc_new {
        ctx.event(
            &regarding,
            false,
            "VncPasswordCreated",
            format!("made the desktop's VNC password (Secret {vnc_name})"),
        )
        .await;
    }
    if !applied.pruned.is_empty() {
        ctx.event(&regarding, false, "Pruned", format!("deleted {}", applied.pruned.join(", "))).await;
    }

    let seen = status::Observed {
        resolved: &resolved,
        applied: &applied,
        running: should_run(ws, &resolved),
        serial: &creds.serial,
        now,
    };
    let new = status::compute(ws, &ctx.site, &seen);
    let old = status::owned_part(ws);
    if new != old {
        let value = serde_json::to_value(&new).map_err(|e| Error::Internal(e.to_string()))?;
        ctx.apply_status(api, ws, value).await?;
        for c in transitions(&old.conditions, &new.conditions).into_iter().filter(|c| c.type_ == condition::READY) {
            let warning = c.status != "True" && resolved.blocked().is_some();
            ctx.event(&regarding, warning, &c.reason, c.message.clone()).await;
        }
    }

    Ok(if resolved.blocked().is_some() {
        // Wrong as written: a change to it, its project or a dataset wakes it, not a timer.
        Outcome::invalid()
    } else if !applied.waiting.is_empty() {
        Outcome::requeue(Duration::from_secs(5))
    } else if seen.running {
        // Heartbeat times do not wake the reconciler (see `run::workspace_trigger`): look
        // again before a heartbeat can go stale unnoticed.
        Outcome::requeue(AGENT_CHECK)
    } else {
        Outcome::requeue(RESYNC)
    })
}

/// The serial of the certificate the agent may hold: the live Secret's annotation, else the
/// one recorded in status.
async fn current_serial(ws: &Workspace, ctx: &Context) -> Result<Option<String>, Error> {
    let ns = ws.namespace().unwrap_or_default();
    let name = agent_secret_name(&ws.name_any());
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&name)
        .await
        .map_err(|e| Error::kube("read", format!("Secret {ns}/{name}"), e))?;
    let from_secret = secret.and_then(|s| s.annotations().get(SERIAL_ANNOTATION).cloned());
    Ok(from_secret.or_else(|| ws.status.as_ref().and_then(|s| s.agent_certificate_serial.clone())))
}

/// Whether the workspace's namespace is being deleted. Its deletion takes the controller's
/// RoleBinding there (the only grant of Secrets and children in a project namespace) at some
/// point, after which the Secret cannot be read nor the children listed; neither is needed then:
/// the namespace's deletion removes them.
async fn namespace_terminating(ns: &str, ctx: &Context) -> Result<bool, Error> {
    let namespace = Api::<Namespace>::all(ctx.client.clone())
        .get_opt(ns)
        .await
        .map_err(|e| Error::kube("read", format!("Namespace {ns}"), e))?;
    Ok(namespace.is_some_and(|n| n.metadata.deletion_timestamp.is_some()))
}

async fn cleanup(ws: &Workspace, api: &Api<Workspace>, ctx: &Context) -> Result<Outcome, Error> {
    if !ws.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Outcome::await_change());
    }
    let regarding = ws.object_ref(&());
    let ns = ws.namespace().unwrap_or_default();
    let terminating = namespace_terminating(&ns, ctx).await?;
    // In a namespace being deleted, the serial recorded in status (written whenever a
    // certificate is issued) is the one to revoke.
    let serial = if terminating {
        ws.status.as_ref().and_then(|s| s.agent_certificate_serial.clone())
    } else {
        current_serial(ws, ctx).await?
    };
    if let Some(serial) = serial {
        let revocation = Revocation {
            workspace: format!("{}/{}", ws.spec.project, ws.name_any()),
            serial: serial.clone(),
            reason: "workspace deleted".into(),
        };
        ctx.revoker.revoke(&revocation).await?;
        ctx.event(&regarding, false, "CertificateRevoked", format!("revoked agent certificate {serial}")).await;
    }
    if !terminating {
        let owner = Owner::of(ws, &ws.spec.project);
        prune(&ctx.client, &owner.selector(), &scopes(&ns), &[]).await?;
    }
    finalizers::remove(api, ws, FINALIZER).await?;
    Ok(Outcome::await_change())
}
