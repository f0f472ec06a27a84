//! Who may call what: one table, deny by default. `docs/api.md` shows the same matrix and a
//! test iterates every principal × endpoint over real HTTPS.

use noexit_crds::Role;

/// How a caller proves who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Authn {
    /// Nobody (health checks only).
    None,
    /// Client certificate with URI SAN `noexit://workspace/<project>/<name>`.
    AgentCert,
    /// Client certificate with URI SAN `noexit://operator`.
    OperatorCert,
    /// OIDC bearer token; roles from the Project named in the path or query.
    Bearer,
}

/// Every endpoint the API serves. Adding one without a row in [`Endpoint::ALL`] and
/// [`Endpoint::allowed_roles`] is a compile error (exhaustive matches).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Health,
    AgentEvents,
    AgentHeartbeat,
    AgentOutbox,
    AgentOutboxContent,
    OperatorRevoke,
    WhoAmI,
    RequestCreate,
    RequestList,
    RequestGet,
    RequestApprove,
    RequestDeny,
    SessionList,
    WorkspaceRevoke,
    AuditQuery,
    AgentOutputs,
    OutputList,
    OutputGet,
    OutputContent,
    OutputReview,
    OutputApprove,
    OutputReject,
    OutputRequestChanges,
    OutputWithdraw,
    OutputDownloadLink,
    OutputDownload,
    OutputReceipt,
    // Ingress (the door in): kept together to ease merges.
    InboxSubmit,
    InboxList,
    InboxApprove,
    InboxReject,
    AgentInbox,
    AgentInboxContent,
    AgentInboxDelivered,
}

impl Endpoint {
    pub const ALL: [Endpoint; 34] = [
        Endpoint::Health,
        Endpoint::AgentEvents,
        Endpoint::AgentHeartbeat,
        Endpoint::AgentOutbox,
        Endpoint::AgentOutboxContent,
        Endpoint::OperatorRevoke,
        Endpoint::WhoAmI,
        Endpoint::RequestCreate,
        Endpoint::RequestList,
        Endpoint::RequestGet,
        Endpoint::RequestApprove,
        Endpoint::RequestDeny,
        Endpoint::SessionList,
        Endpoint::WorkspaceRevoke,
        Endpoint::AuditQuery,
        Endpoint::AgentOutputs,
        Endpoint::OutputList,
        Endpoint::OutputGet,
        Endpoint::OutputContent,
        Endpoint::OutputReview,
        Endpoint::OutputApprove,
        Endpoint::OutputReject,
        Endpoint::OutputRequestChanges,
        Endpoint::OutputWithdraw,
        Endpoint::OutputDownloadLink,
        Endpoint::OutputDownload,
        Endpoint::OutputReceipt,
        Endpoint::InboxSubmit,
        Endpoint::InboxList,
        Endpoint::InboxApprove,
        Endpoint::InboxReject,
        Endpoint::AgentInbox,
        Endpoint::AgentInboxContent,
        Endpoint::AgentInboxDelivered,
    ];

    /// Method and axum path pattern.
    pub fn route(self) -> (&'static str, &'static str) {
        match self {
            Endpoint::Health => ("GET", "/healthz"),
            Endpoint::AgentEvents => ("POST", "/v1/agent/events"),
            Endpoint::AgentHeartbeat => ("POST", "/v1/agent/heartbeat"),
            Endpoint::AgentOutbox => ("POST", "/v1/agent/outbox"),
            Endpoint::AgentOutboxContent => ("PUT", "/v1/agent/outbox/{id}/content"),
            Endpoint::OperatorRevoke => ("POST", "/v1/operator/revocations"),
            Endpoint::WhoAmI => ("GET", "/v1/projects/{project}/whoami"),
            Endpoint::RequestCreate => ("POST", "/v1/projects/{project}/workspacerequests"),
            Endpoint::RequestList => ("GET", "/v1/projects/{project}/workspacerequests"),
            Endpoint::RequestGet => ("GET", "/v1/projects/{project}/workspacerequests/{name}"),
            Endpoint::RequestApprove => ("POST", "/v1/projects/{project}/workspacerequests/{name}/approve"),
            Endpoint::RequestDeny => ("POST", "/v1/projects/{project}/workspacerequests/{name}/deny"),
            Endpoint::SessionList => ("GET", "/v1/projects/{project}/sessions"),
            Endpoint::WorkspaceRevoke => ("POST", "/v1/projects/{project}/workspaces/{name}/revoke"),
            Endpoint::AuditQuery => ("GET", "/v1/audit"),
            Endpoint::AgentOutputs => ("GET", "/v1/agent/outputs"),
            Endpoint::OutputList => ("GET", "/v1/projects/{project}/outputs"),
            Endpoint::OutputGet => ("GET", "/v1/projects/{project}/outputs/{id}"),
            Endpoint::OutputContent => ("GET", "/v1/projects/{project}/outputs/{id}/content"),
            Endpoint::OutputReview => ("GET", "/v1/projects/{project}/outputs/{id}/review"),
            Endpoint::OutputApprove => ("POST", "/v1/projects/{project}/outputs/{id}/approve"),
            Endpoint::OutputReject => ("POST", "/v1/projects/{project}/outputs/{id}/reject"),
            Endpoint::OutputRequestChanges => ("POST", "/v1/projects/{project}/outputs/{id}/request-changes"),
            Endpoint::OutputWithdraw => ("POST", "/v1/projects/{project}/outputs/{id}/withdraw"),
            Endpoint::OutputDownloadLink => ("POST", "/v1/projects/{project}/outputs/{id}/download-link"),
            // The project rides in the query (`?project=`): the link is what the CLI follows.
            Endpoint::OutputDownload => ("GET", "/v1/downloads/{token}"),
            Endpoint::OutputReceipt => ("GET", "/v1/projects/{project}/outputs/{id}/receipt"),
            // `{name}` is the workspace (axum needs one parameter name per path position).
            Endpoint::InboxSubmit => ("POST", "/v1/projects/{project}/workspaces/{name}/inbox"),
            Endpoint::InboxList => ("GET", "/v1/projects/{project}/inbox"),
            Endpoint::InboxApprove => ("POST", "/v1/projects/{project}/inbox/{id}/approve"),
            Endpoint::InboxReject => ("POST", "/v1/projects/{project}/inbox/{id}/reject"),
            Endpoint::AgentInbox => ("GET", "/v1/agent/inbox"),
            Endpoint::AgentInboxContent => ("GET", "/v1/agent/inbox/{id}/content"),
            Endpoint::AgentInboxDelivered => ("POST", "/v1/agent/inbox/{id}/delivered"),
        }
    }

    /// Audit action name.
    pub fn action(self) -> &'static str {
        match self {
            Endpoint::Health => "api.health",
            Endpoint::AgentEvents => "agent.events",
            Endpoint::AgentHeartbeat => "agent.heartbeat",
            Endpoint::AgentOutbox => "agent.outbox.submit",
            Endpoint::AgentOutboxContent => "agent.outbox.upload",
            Endpoint::OperatorRevoke => "certificate.revoke",
            Endpoint::WhoAmI => "api.whoami",
            Endpoint::RequestCreate => "request.create",
            Endpoint::RequestList => "request.list",
            Endpoint::RequestGet => "request.get",
            Endpoint::RequestApprove => "request.approve",
            Endpoint::RequestDeny => "request.deny",
            Endpoint::SessionList => "session.list",
            Endpoint::WorkspaceRevoke => "certificate.revoke",
            Endpoint::AuditQuery => "audit.query",
            Endpoint::AgentOutputs => "agent.outputs",
            Endpoint::OutputList => "output.list",
            Endpoint::OutputGet => "output.get",
            Endpoint::OutputContent => "output.content",
            Endpoint::OutputReview => "output.review",
            Endpoint::OutputApprove => "output.approve",
            Endpoint::OutputReject => "output.reject",
            Endpoint::OutputRequestChanges => "output.requestChanges",
            Endpoint::OutputWithdraw => "output.withdraw",
            Endpoint::OutputDownloadLink => "output.downloadLink",
            Endpoint::OutputDownload => "output.download",
            Endpoint::OutputReceipt => "output.receipt",
            Endpoint::InboxSubmit => "inbox.submit",
            Endpoint::InboxList => "inbox.list",
            Endpoint::InboxApprove => "inbox.approve",
            Endpoint::InboxReject => "inbox.reject",
            Endpoint::AgentInbox => "agent.inbox.list",
            Endpoint::AgentInboxContent => "agent.inbox.fetch",
            Endpoint::AgentInboxDelivered => "agent.inbox.deliver",
        }
    }

    pub fn authn(self) -> Authn {
        match self {
            Endpoint::Health => Authn::None,
            Endpoint::AgentEvents
            | Endpoint::AgentHeartbeat
            | Endpoint::AgentOutbox
            | Endpoint::AgentOutboxContent
            | Endpoint::AgentOutputs => Authn::AgentCert,
            Endpoint::AgentInbox | Endpoint::AgentInboxContent | Endpoint::AgentInboxDelivered => Authn::AgentCert,
            Endpoint::OperatorRevoke => Authn::OperatorCert,
            Endpoint::WhoAmI
            | Endpoint::RequestCreate
            | Endpoint::RequestList
            | Endpoint::RequestGet
            | Endpoint::RequestApprove
            | Endpoint::RequestDeny
            | Endpoint::SessionList
            | Endpoint::WorkspaceRevoke
            | Endpoint::AuditQuery
            | Endpoint::OutputList
            | Endpoint::OutputGet
            | Endpoint::OutputContent
            | Endpoint::OutputReview
            | Endpoint::OutputApprove
            | Endpoint::OutputReject
            | Endpoint::OutputRequestChanges
            | Endpoint::OutputWithdraw
            | Endpoint::OutputDownloadLink
            | Endpoint::OutputDownload
            | Endpoint::OutputReceipt
            | Endpoint::InboxSubmit
            | Endpoint::InboxList
            | Endpoint::InboxApprove
            | Endpoint::InboxReject => Authn::Bearer,
        }
    }

    /// Project roles that may call a bearer endpoint. Empty for certificate endpoints (the
    /// certificate kind is the whole grant).
    pub fn allowed_roles(self) -> &'static [Role] {
        use Role::*;
        match self {
            Endpoint::Health
            | Endpoint::AgentEvents
            | Endpoint::AgentHeartbeat
            | Endpoint::AgentOutbox
            | Endpoint::AgentOutboxContent
            | Endpoint::AgentOutputs
            | Endpoint::OperatorRevoke
            | Endpoint::AgentInbox
            | Endpoint::AgentInboxContent
            | Endpoint::AgentInboxDelivered => &[],
            Endpoint::WhoAmI => &[Researcher, DataAnalyst, Admin, OutputChecker, Auditor, Sre],
            Endpoint::RequestCreate => &[DataAnalyst],
            Endpoint::RequestList | Endpoint::RequestGet => &[DataAnalyst, Admin, Auditor],
            Endpoint::RequestApprove | Endpoint::RequestDeny => &[Admin],
            Endpoint::SessionList => &[Admin, Auditor, Sre],
            Endpoint::WorkspaceRevoke => &[Admin],
            Endpoint::AuditQuery => &[Auditor],
            // Checkers, admins and auditors see every output of the project; the others only
            // their own (the handler filters by requester).
            Endpoint::OutputList | Endpoint::OutputGet | Endpoint::OutputReceipt => {
                &[OutputChecker, Admin, Auditor, Researcher, DataAnalyst]
            }
            // The requester never reviews their own (the life cycle refuses it: selfReview).
            Endpoint::OutputContent
            | Endpoint::OutputReview
            | Endpoint::OutputApprove
            | Endpoint::OutputReject
            | Endpoint::OutputRequestChanges => &[OutputChecker],
            // Only the request's requester (the handler checks who).
            Endpoint::OutputWithdraw | Endpoint::OutputDownloadLink | Endpoint::OutputDownload => {
                &[Researcher, DataAnalyst]
            }
            // The submitter of an item may not approve it (checked by the handler).
            Endpoint::InboxSubmit => &[DataAnalyst, Admin],
            Endpoint::InboxList => &[DataAnalyst, Admin, Auditor],
            Endpoint::InboxApprove | Endpoint::InboxReject => &[Admin],
        }
    }

    /// Successful calls recorded by the audit middleware. Agent events are recorded one by one
    /// (with their idempotency key) by the handler; heartbeats are state, kept in their table.
    pub fn audit_success(self) -> bool {
        // The agent's polls (its decisions, its inbox) come every few seconds and change nothing;
        // what it fetches and places is recorded.
        !matches!(
            self,
            Endpoint::Health
                | Endpoint::AgentEvents
                | Endpoint::AgentHeartbeat
                | Endpoint::AgentOutputs
                | Endpoint::AgentInbox
        )
    }
}

/// The role a caller acts in for `endpoint`: the first granted role it holds, in the table's
/// order. `None` means refused.
pub fn acting_role(endpoint: Endpoint, held: &[Role]) -> Option<Role> {
    endpoint.allowed_roles().iter().copied().find(|r| held.contains(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_endpoint_once_with_distinct_routes() {
        let mut routes: Vec<_> = Endpoint::ALL.iter().map(|e| e.route()).collect();
        routes.sort();
        routes.dedup();
        assert_eq!(routes.len(), Endpoint::ALL.len());
    }

    #[test]
    fn deny_by_default() {
        assert_eq!(acting_role(Endpoint::RequestApprove, &[]), None);
        assert_eq!(acting_role(Endpoint::RequestApprove, &[Role::DataAnalyst, Role::Researcher]), None);
        assert_eq!(acting_role(Endpoint::RequestApprove, &[Role::DataAnalyst, Role::Admin]), Some(Role::Admin));
        assert_eq!(acting_role(Endpoint::AuditQuery, &[Role::Admin, Role::Sre]), None);
        // Certificate endpoints grant no person role.
        for role in Role::ALL {
            assert_eq!(acting_role(Endpoint::AgentEvents, &[role]), None);
            assert_eq!(acting_role(Endpoint::OperatorRevoke, &[role]), None);
        }
    }

    #[test]
    fn inbox_rows_analysts_and_admins_submit_only_admins_decide_only_agents_fetch() {
        use Role::*;
        assert_eq!(acting_role(Endpoint::InboxSubmit, &[DataAnalyst]), Some(DataAnalyst));
        assert_eq!(acting_role(Endpoint::InboxSubmit, &[Admin]), Some(Admin));
        for role in [Researcher, OutputChecker, Auditor, Sre] {
            assert_eq!(acting_role(Endpoint::InboxSubmit, &[role]), None, "{role:?}");
            assert_eq!(acting_role(Endpoint::InboxApprove, &[role]), None, "{role:?}");
            assert_eq!(acting_role(Endpoint::InboxReject, &[role]), None, "{role:?}");
        }
        assert_eq!(acting_role(Endpoint::InboxApprove, &[DataAnalyst]), None);
        assert_eq!(acting_role(Endpoint::InboxApprove, &[DataAnalyst, Admin]), Some(Admin));
        for e in [Endpoint::AgentInbox, Endpoint::AgentInboxContent, Endpoint::AgentInboxDelivered] {
            assert_eq!(e.authn(), Authn::AgentCert);
            assert!(Role::ALL.iter().all(|r| acting_role(e, &[*r]).is_none()));
        }
        // Fetches and deliveries are audited; the poll is not.
        assert!(Endpoint::AgentInboxContent.audit_success() && Endpoint::AgentInboxDelivered.audit_success());
        assert!(!Endpoint::AgentInbox.audit_success());
    }
}
