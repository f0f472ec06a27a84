//! From an `AdmissionReview` to a verdict and back: read the request, turn the objects into
//! typed resources (a malformed one is refused with the field serde stopped at), run the rule
//! for its kind, and write the response. No I/O here; [`super::http`] is the edge.

use chrono::{DateTime, Utc};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde::de::DeserializeOwned;

use super::lookup::Lookup;
use super::rules::{self, Caller, Refusal, Verdict, reason};
use crate::invalid::describe;

/// Who is trusted to act for others, and how to turn the API server's user name into the name
/// members are listed by.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// From the site file: the operator namespace and the workspace image allowlist.
    pub site: rules::SiteRules,
    /// User names (as the API server reports them) of services that act for people they
    /// authenticated themselves (the control-plane API's ServiceAccount).
    pub trusted_users: Vec<String>,
    /// Prefix the API server adds to OIDC user names (`--oidc-username-prefix`), removed
    /// before comparing with `spec.members[].user`.
    pub username_prefix: String,
}

impl Policy {
    pub fn caller(&self, username: &str) -> Caller {
        let trusted = self.trusted_users.iter().any(|t| t == username);
        // With a prefix configured, only a prefixed name is an OIDC user (and so may be a member).
        let (user, member_name) = match username.strip_prefix(self.username_prefix.as_str()) {
            Some(rest) if !rest.is_empty() => (rest.to_owned(), true),
            _ => (username.to_owned(), false),
        };
        Caller { user, trusted, member_name }
    }
}

/// The outcome of one review, for the response, the log line and the metrics.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// `project`, `dataset`, `workspace`, `workspacerequest` or `unknown` (a fixed set).
    pub kind: &'static str,
    /// `CREATE`, `UPDATE`, `DELETE`, `CONNECT`.
    pub operation: &'static str,
    pub user: String,
    pub verdict: Verdict,
}

/// Judge one review request. Never panics on any input.
pub fn review(
    req: &AdmissionRequest<DynamicObject>,
    lookup: &dyn Lookup,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Outcome {
    let username = req.user_info.username.clone().unwrap_or_default();
    let caller = policy.caller(&username);
    let (kind, operation) = (kind_of(req), operation_of(req));
    let verdict = if kind == "unknown" {
        let object = describe(kind, req.namespace.as_deref(), &req.name);
        let message = format!("the noexit webhook does not judge {}/{}", req.kind.group, req.kind.kind);
        Verdict { refusals: vec![Refusal::new(&object, "kind", reason::UNSUPPORTED, message)], warnings: vec![] }
    } else {
        judge(kind, req, &caller, lookup, &policy.site, now)
            .unwrap_or_else(|r| Verdict { refusals: vec![r], warnings: vec![] })
    };
    Outcome { kind, operation, user: username, verdict }
}

/// The outcome while the caches have not synced: refused, saying so (fail closed).
pub fn not_ready(req: &AdmissionRequest<DynamicObject>) -> Outcome {
    let kind = kind_of(req);
    let refusal = Refusal::new(
        &describe(kind, req.namespace.as_deref(), &req.name),
        "(webhook)",
        reason::NOT_READY,
        "the noexit webhook has not loaded projects and datasets yet; retry in a few seconds",
    );
    Outcome {
        kind,
        operation: operation_of(req),
        user: req.user_info.username.clone().unwrap_or_default(),
        verdict: Verdict { refusals: vec![refusal], warnings: vec![] },
    }
}

/// The kind as a fixed label: one of ours, or `unknown`.
fn kind_of(req: &AdmissionRequest<DynamicObject>) -> &'static str {
    if req.kind.group != noexit_crds::GROUP {
        return "unknown";
    }
    match req.kind.kind.as_str() {
        "Project" => "project",
        "Dataset" => "dataset",
        "Workspace" => "workspace",
        "WorkspaceRequest" => "workspacerequest",
        _ => "unknown",
    }
}

fn operation_of(req: &AdmissionRequest<DynamicObject>) -> &'static str {
    match req.operation {
        Operation::Create => "CREATE",
        Operation::Update => "UPDATE",
        Operation::Delete => "DELETE",
        Operation::Connect => "CONNECT",
    }
}

fn judge(
    kind: &str,
    req: &AdmissionRequest<DynamicObject>,
    caller: &Caller,
    lookup: &dyn Lookup,
    site: &rules::SiteRules,
    now: DateTime<Utc>,
) -> Result<Verdict, Refusal> {
    let object = describe(kind, req.namespace.as_deref(), &req.name);
    match req.operation {
        // Deleting is how access ends; it is never blocked here.
        Operation::Delete => return Ok(Verdict::default()),
        Operation::Connect => {
            return Err(Refusal::new(&object, "operation", reason::UNSUPPORTED, "CONNECT is not judged"));
        }
        Operation::Create | Operation::Update => {}
    }
    match (req.sub_resource.as_deref(), kind) {
        (None, _) | (Some("status"), "workspacerequest") => {}
        (Some(sub), _) => {
            // Status of other kinds is written by the operator and the API only; RBAC guards it.
            tracing::debug!(sub, kind, "sub-resource write passed without rules");
            return Ok(Verdict::default());
        }
    }
    Ok(match kind {
        "project" => {
            let (new, old) = objects(req, &object)?;
            rules::check_project(&new, old.as_ref(), lookup, site, now)
        }
        "dataset" => {
            let (new, old) = objects(req, &object)?;
            rules::check_dataset(&new, old.as_ref(), lookup)
        }
        "workspace" => {
            let (new, old) = objects(req, &object)?;
            rules::check_workspace(&new, old.as_ref(), lookup, site, now)
        }
        "workspacerequest" => {
            let (new, old) = objects(req, &object)?;
            rules::check_request(&new, old.as_ref(), caller, lookup, site, now)
        }
        // `review` refuses unknown kinds before judging.
        _ => Verdict::default(),
    })
}

/// The new object (required) and the old one (updates), typed.
fn objects<T: DeserializeOwned>(
    req: &AdmissionRequest<DynamicObject>,
    object: &str,
) -> Result<(T, Option<T>), Refusal> {
    let Some(new) = req.object.as_ref() else {
        return Err(Refusal::new(object, "object", reason::MALFORMED, "the review carries no object"));
    };
    let new = typed(new, object)?;
    let old = match (&req.operation, req.old_object.as_ref()) {
        (Operation::Update, Some(old)) => Some(typed(old, object)?),
        (Operation::Update, None) => {
            return Err(Refusal::new(object, "oldObject", reason::MALFORMED, "an update review carries no old object"));
        }
        _ => None,
    };
    Ok((new, old))
}

fn typed<T: DeserializeOwned>(obj: &DynamicObject, object: &str) -> Result<T, Refusal> {
    let value = serde_json::to_value(obj)
        .map_err(|e| Refusal::new(object, "(root)", reason::MALFORMED, format!("cannot read the object: {e}")))?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." { "(root)".to_owned() } else { field };
        Refusal::new(object, &field, reason::MALFORMED, e.into_inner().to_string())
    })
}

/// The response the API server expects: allowed with warnings, or denied (403) with every
/// refusal in the message.
pub fn respond(req: &AdmissionRequest<DynamicObject>, outcome: &Outcome) -> AdmissionReview<DynamicObject> {
    let mut response = AdmissionResponse::from(req);
    if !outcome.verdict.allowed() {
        let message: Vec<String> = outcome.verdict.refusals.iter().map(ToString::to_string).collect();
        response = response.deny(message.join("; "));
        response.result.code = 403;
        response.result.reason = outcome.verdict.refusals[0].reason.to_owned();
    }
    if !outcome.verdict.warnings.is_empty() {
        response.warnings = Some(outcome.verdict.warnings.clone());
    }
    response.into_review()
}

/// A review whose body could not be read as an `AdmissionReview`: deny with the reason, keeping
/// the uid if one can be found, so the API server shows the message instead of a webhook error.
pub fn respond_unreadable(body: &serde_json::Value, error: &str) -> Option<AdmissionReview<DynamicObject>> {
    let uid = body.pointer("/request/uid")?.as_str()?.to_owned();
    let mut response = AdmissionResponse::invalid(format!("malformed admission review: {error}"));
    response.uid = uid;
    response.result.code = 400;
    response.types.api_version =
        body.get("apiVersion").and_then(|v| v.as_str()).unwrap_or("admission.k8s.io/v1").to_owned();
    Some(response.into_review())
}

/// Parse a review body. `Err` carries the body as JSON (if it was JSON) and the error.
pub fn parse(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, (Option<serde_json::Value>, String)> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| (None, format!("not JSON: {e}")))?;
    let review: AdmissionReview<DynamicObject> =
        serde_path_to_error::deserialize(value.clone()).map_err(|e| (Some(value.clone()), e.to_string()))?;
    review.try_into().map_err(|_| (Some(value), "the review has no request".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oidc_prefix_is_removed_and_trust_is_by_exact_name() {
        let policy = Policy {
            site: rules::SiteRules::default(),
            trusted_users: vec!["system:serviceaccount:noexit-system:noexit-api".into()],
            username_prefix: "oidc:".into(),
        };
        assert_eq!(
            policy.caller("oidc:carol@ward7.example"),
            Caller { user: "carol@ward7.example".into(), trusted: false, member_name: true }
        );
        // Without the prefix the name is kept as it is but names no member.
        assert!(!policy.caller("carol@ward7.example").member_name);
        assert!(Policy::default().caller("carol@ward7.example").member_name);
        assert!(policy.caller("system:serviceaccount:noexit-system:noexit-api").trusted);
        assert!(!policy.caller("system:serviceaccount:noexit-system:noexit-api2").trusted);
        assert_eq!(policy.caller("carol").user, "carol");
    }

    #[test]
    fn unreadable_bodies_keep_the_uid_when_there_is_one() {
        let body = serde_json::json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "abc", "kind": 7}});
        let review = respond_unreadable(&body, "bad").expect("uid found");
        let response = review.response.expect("response");
        assert_eq!(response.uid, "abc");
        assert!(!response.allowed);
        assert!(respond_unreadable(&serde_json::json!({"request": {}}), "bad").is_none());
    }
}
