//! Admission reviews into noexit's audit log: what an admin does with kubectl (approving a
//! WorkspaceRequest, creating, changing or deleting a Workspace or Project) appears next to what
//! people do through the API, with the Kubernetes user name. One entry per review, allowed or
//! refused; the webhook writes them as writer `webhook` (actions `admission.*`).

use kube::core::DynamicObject;
use kube::core::admission::AdmissionRequest;
use serde_json::{Value, json};

use super::review::Outcome;
use noexit_audit::{AuditEvent, Outcome as AuditOutcome};

/// The project an object belongs to: a Project's own name, a Workspace's or WorkspaceRequest's
/// `spec.project` (`spec.workspace.project`), from the new object or, on delete, the old one.
pub fn project_of(req: &AdmissionRequest<DynamicObject>, kind: &str) -> Option<String> {
    let obj = req.object.as_ref().or(req.old_object.as_ref())?;
    let data = &obj.data;
    let text = |v: &Value| v.as_str().filter(|s| !s.is_empty() && s.len() <= 253).map(str::to_owned);
    match kind {
        "project" => Some(req.name.clone()).filter(|n| !n.is_empty()),
        "workspace" => text(&data["spec"]["project"]),
        "workspacerequest" => text(&data["spec"]["workspace"]["project"]).or_else(|| text(&data["spec"]["project"])),
        _ => None,
    }
}

/// `workspace:<project>/<name>`, `workspacerequest:<project>/<name>`, `project:<name>`,
/// `dataset:<name>`: the same objects the API names.
pub fn object_of(req: &AdmissionRequest<DynamicObject>, kind: &str, project: Option<&str>) -> String {
    let name = truncate(&req.name, 253);
    match (kind, project) {
        ("project", _) => format!("project:{name}"),
        ("dataset", _) => format!("dataset:{name}"),
        (k @ ("workspace" | "workspacerequest"), Some(p)) => format!("{k}:{p}/{name}"),
        (k, _) => {
            let ns = req.namespace.as_deref().unwrap_or("");
            format!("{k}:{}/{name}", truncate(ns, 63))
        }
    }
}

/// The decision a WorkspaceRequest status update records (`Approved`/`Denied`, from
/// `status.decision` or a true condition of that type), if this update makes it.
fn decision(req: &AdmissionRequest<DynamicObject>) -> Option<Value> {
    fn of(obj: Option<&DynamicObject>) -> Option<String> {
        let status = &obj?.data["status"];
        if let Some(d) = status["decision"].as_str() {
            return Some(d.to_owned());
        }
        status["conditions"].as_array()?.iter().find_map(|c| {
            let kind = c["type"].as_str()?;
            (matches!(kind, "Approved" | "Denied") && c["status"] == "True").then(|| kind.to_owned())
        })
    }
    let new = of(req.object.as_ref())?;
    (of(req.old_object.as_ref()).as_deref() != Some(new.as_str())).then(|| json!(new))
}

/// The audit entry of one review.
pub fn event(req: &AdmissionRequest<DynamicObject>, outcome: &Outcome) -> AuditEvent {
    let project = project_of(req, outcome.kind);
    let object = object_of(req, outcome.kind, project.as_deref());
    let result = if outcome.verdict.allowed() {
        AuditOutcome::Allowed
    } else {
        let reasons: Vec<String> = outcome.verdict.refusals.iter().map(ToString::to_string).collect();
        AuditOutcome::Refused(truncate(&reasons.join("; "), 2000).to_owned())
    };
    let mut detail = json!({
        "kind": outcome.kind,
        "operation": outcome.operation,
        "uid": truncate(&req.uid, 64),
        "groups": req.user_info.groups.clone().unwrap_or_default().into_iter().take(16).collect::<Vec<_>>(),
        "dryRun": req.dry_run,
    });
    if let Some(p) = &project {
        detail["project"] = json!(p);
    }
    if let Some(sub) = &req.sub_resource {
        detail["subResource"] = json!(truncate(sub, 32));
    }
    if outcome.kind == "workspacerequest"
        && let Some(d) = decision(req)
    {
        detail["decision"] = d;
        if let Some(by) = req.object.as_ref().and_then(|o| o.data["status"]["decidedBy"].as_str()) {
            detail["decidedBy"] = json!(truncate(by, 254));
        }
    }
    if !outcome.verdict.warnings.is_empty() {
        detail["warnings"] = json!(outcome.verdict.warnings.len());
    }
    let username = outcome.user.as_str();
    AuditEvent {
        actor: format!("kube:{}", truncate(if username.is_empty() { "unknown" } else { username }, 256)),
        role: None,
        action: format!("admission.{}", outcome.operation.to_ascii_lowercase()),
        object,
        outcome: result,
        source: Some("kube-apiserver".into()),
        detail,
    }
}

/// The entry of a review that could not be read (always refused).
pub fn unreadable(body: Option<&Value>, error: &str) -> AuditEvent {
    let text = |p: &str| body.and_then(|b| b.pointer(p)).and_then(|v| v.as_str()).map(|s| truncate(s, 256).to_owned());
    let user = text("/request/userInfo/username").unwrap_or_else(|| "unknown".into());
    AuditEvent {
        actor: format!("kube:{user}"),
        role: None,
        action: "admission.review".into(),
        object: format!("review:{}", text("/request/uid").unwrap_or_default()),
        outcome: AuditOutcome::Refused(format!("malformed admission review: {}", truncate(error, 500))),
        source: Some("kube-apiserver".into()),
        detail: json!({}),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((at, _)) => &s[..at],
        None => s,
    }
}
