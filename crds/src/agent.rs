//! The in-guest agent's configuration (written by the operator into the workspace Secret or the
//! VM's cloud-init) and the JSON it sends to the control-plane API over mTLS.
//!
//! Endpoints (all under the API's agent listener, client certificate required):
//! - `POST /v1/agent/events`    body [`EventBatch`]      → 200 [`EventBatchAck`]
//! - `POST /v1/agent/heartbeat` body [`Heartbeat`]       → 200 `{}`
//! - `POST /v1/agent/outbox`    body [`OutboxManifest`]  → 201 [`OutboxAck`]
//! - `PUT  /v1/agent/outbox/{id}/content` raw bytes (`application/octet-stream`), size and
//!   SHA-256 must match the manifest → 200 [`OutboxAck`]
//!
//! Every event carries an idempotency key (`id`); the API stores each key once, so an agent may
//! resend its spool after a crash without duplicates.

use std::net::IpAddr;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Name of the key holding [`AgentConfig`] (YAML) in the workspace Secret / cloud-init.
pub const CONFIG_KEY: &str = "agent.yaml";
/// Default path of the config file inside the guest.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/noexit/agent.yaml";

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    pub workspace: WorkspaceIdentity,
    pub control_plane: ControlPlane,
    pub egress: EgressAllowlist,
    /// Where researchers drop files for review.
    #[serde(default = "default_outbox")]
    pub outbox: PathBuf,
    /// Where approved ingress files appear, read-only (created by the agent).
    #[serde(default = "default_inbox")]
    pub inbox: PathBuf,
    /// Durable on-disk queue of events not yet acknowledged.
    #[serde(default = "default_spool")]
    pub spool: PathBuf,
    pub mode: AgentMode,
    pub desktop: DesktopKind,
    /// Allow pasting into the workspace (copy out is always off).
    #[serde(default)]
    pub clipboard_in: bool,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_seconds: u32,
    #[serde(default)]
    pub dlp: DlpConfig,
}

fn default_outbox() -> PathBuf {
    PathBuf::from("/outbox")
}
fn default_inbox() -> PathBuf {
    PathBuf::from("/inbox")
}
fn default_spool() -> PathBuf {
    PathBuf::from("/var/lib/noexit-agent/spool")
}
fn default_heartbeat() -> u32 {
    5
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkspaceIdentity {
    pub project: String,
    pub name: String,
}

impl WorkspaceIdentity {
    /// The identity as written in the agent's client certificate (URI SAN).
    pub fn uri(&self) -> String {
        format!("noexit://workspace/{}/{}", self.project, self.name)
    }

    /// Parse [`Self::uri`] back.
    pub fn from_uri(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix("noexit://workspace/")?;
        let (project, name) = rest.split_once('/')?;
        let label = |s: &str| crate::names::check_dns1123_label(s, 63).is_ok();
        (label(project) && label(name)).then(|| Self { project: project.into(), name: name.into() })
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControlPlane {
    /// e.g. `https://noexit-api.noexit-system.svc:8443`
    pub url: String,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// What the guest may reach. Everything else is dropped.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressAllowlist {
    /// DNS resolvers (UDP and TCP port 53); no other DNS server is reachable.
    pub resolvers: Vec<IpAddr>,
    /// Allowed TCP endpoints: the package mirror and the control plane.
    pub endpoints: Vec<Endpoint>,
    /// Where desktop connections come from (the gateway), as CIDRs.
    #[serde(default)]
    pub gateway_sources: Vec<String>,
    /// Port the desktop (VNC / RDP) listens on.
    pub desktop_port: u16,
    /// Address outside the allowlist that pod-mode probes must fail to reach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Endpoint>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    /// Role of the endpoint: `mirror`, `controlPlane`, or a site-defined name.
    pub name: String,
    /// IP address or CIDR (a Service ClusterIP in Kubernetes).
    pub address: String,
    pub port: u16,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AgentMode {
    /// Agent is root in a VM guest and owns the nftables egress table.
    Vm,
    /// Agent is an unprivileged process in a pod; NetworkPolicy is the wall, the agent probes it.
    Pod,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DesktopKind {
    Vnc,
    Xrdp,
    None,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DlpConfig {
    /// Extra patterns a site adds (name and regular expression).
    #[serde(default)]
    pub extra_patterns: Vec<NamedPattern>,
    /// Files larger than this are not scanned inline and go to manual review (bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_scan_bytes: Option<u64>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamedPattern {
    pub name: String,
    pub regex: String,
}

// ---- wire format -------------------------------------------------------------------------

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventBatch {
    pub events: Vec<AgentEvent>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventBatchAck {
    /// Newly stored events.
    pub accepted: u32,
    /// Events whose id was already stored (resent from a spool).
    pub duplicates: u32,
}

/// One thing that happened in the workspace. (`flatten` rules out `deny_unknown_fields` here;
/// the inner types are strict instead.)
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentEvent {
    /// Idempotency key, made once when the event is first spooled.
    pub id: Uuid,
    pub at: DateTime<Utc>,
    #[serde(flatten)]
    pub kind: EventKind,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum EventKind {
    Session(SessionEvent),
    Violation(Violation),
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionEvent {
    pub action: SessionAction,
    /// Local account or desktop user.
    pub user: String,
    /// tty, display or desktop connection id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Remote address of a desktop connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Seconds without input, for `idle`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_seconds: Option<u64>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SessionAction {
    Login,
    Logout,
    DesktopConnect,
    DesktopDisconnect,
    Idle,
    Active,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Violation {
    pub kind: ViolationKind,
    /// How many occurrences this event stands for (blocked packets are rate-limited).
    pub count: u64,
    /// Human-readable detail: destination, pattern name, rule that was changed.
    pub detail: String,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ViolationKind {
    /// Outbound traffic dropped by the egress lock.
    EgressBlocked,
    /// Sensitive pattern found in an outbox file.
    DlpHit,
    /// Someone changed or flushed the egress rules or hardening settings.
    Tamper,
    /// USB mass storage driver loaded despite the blacklist.
    UsbStorage,
    /// An outbox entry the agent will not touch (a link, FIFO, device, hard link, bad name) or an
    /// outbox that was tampered with (`.submitted` replaced).
    OutboxRefused,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Heartbeat {
    pub at: DateTime<Utc>,
    pub agent_version: String,
    pub egress: EgressState,
    pub hardening: HardeningState,
    /// Events waiting in the spool.
    pub spool_depth: u64,
    pub active_sessions: u32,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressState {
    /// The agent has confirmed the wall. False means the workspace is not Ready.
    pub locked: bool,
    pub mode: AgentMode,
    /// Why not locked, or what the probe saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Drops counted since the last heartbeat.
    #[serde(default)]
    pub blocked_since_last: u64,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HardeningState {
    pub clipboard_out_disabled: bool,
    pub drive_redirection_disabled: bool,
    /// VM only; `None` in pod mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usb_storage_blocked: Option<bool>,
}

/// A file the researcher placed in the outbox, as the agent found and scanned it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboxManifest {
    /// Idempotency key for this submission.
    pub id: Uuid,
    /// File name relative to the outbox (no `..`, no absolute paths).
    pub file_name: String,
    pub size: u64,
    /// Lower-case hex SHA-256 of the content.
    pub sha256: String,
    /// Local user who owns the file.
    pub submitted_by: String,
    pub scan: ScanReport,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScanReport {
    pub verdict: ScanVerdict,
    #[serde(default)]
    pub findings: Vec<Finding>,
    /// Why the file needs a person (binary, too large, unreadable encoding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ScanVerdict {
    /// No pattern found (still reviewed by people; never auto-released).
    Clean,
    /// Patterns found.
    Flagged,
    /// Could not be scanned automatically.
    ManualReview,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Finding {
    /// Pattern name, e.g. `nhsNumber`, `ssn`, `paymentCard`.
    pub kind: String,
    pub count: u64,
    /// Byte offset of the first occurrence (never the matched value itself).
    pub first_offset: u64,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboxAck {
    pub id: Uuid,
    /// `awaitingContent`, `pendingReview`
    pub state: String,
}

/// One output request's outcome as the agent shows it to the researcher
/// (`GET /v1/agent/outputs`). Unknown fields are ignored: the API may say more than the agent
/// writes.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutputDecision {
    /// The output request's id (a UUID; kept as text so one odd id cannot hide the others).
    pub id: String,
    pub file_name: String,
    /// `pendingReview`, `approved`, `rejected`, `changesRequested`, `released` …
    pub state: String,
    #[serde(default)]
    pub reasons: Vec<ReviewReason>,
    pub updated_at: DateTime<Utc>,
}

/// One reviewer's decision on an output request.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReviewReason {
    pub reviewer: String,
    pub decision: String,
    #[serde(default)]
    pub reason: String,
    pub at: DateTime<Utc>,
}

/// An approved ingress file waiting for the agent (`GET /v1/agent/inbox`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InboxItem {
    pub id: Uuid,
    pub file_name: String,
    pub size: u64,
    /// Lower-case hex SHA-256 of the content.
    pub sha256: String,
}

/// Body of `POST /v1/agent/inbox/{id}/delivered`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboxDelivered {
    /// The name the file got in `/inbox` (the submitted one unless it was taken).
    pub placed_as: String,
    /// SHA-256 of what was placed.
    pub sha256: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_uri_round_trips_and_rejects_junk() {
        let id = WorkspaceIdentity { project: "ward-7".into(), name: "alice-r".into() };
        assert_eq!(WorkspaceIdentity::from_uri(&id.uri()), Some(id));
        assert_eq!(WorkspaceIdentity::from_uri("noexit://workspace/ward-7"), None);
        assert_eq!(WorkspaceIdentity::from_uri("noexit://workspace/ward-7/../x"), None);
        assert_eq!(WorkspaceIdentity::from_uri("https://workspace/a/b"), None);
    }

    #[test]
    fn events_serialise_with_a_type_tag() {
        let ev = AgentEvent {
            id: Uuid::nil(),
            at: DateTime::<Utc>::from_timestamp(0, 0).unwrap_or_default(),
            kind: EventKind::Session(SessionEvent {
                action: SessionAction::Login,
                user: "alice".into(),
                session: Some("pts/0".into()),
                source: None,
                idle_seconds: None,
            }),
        };
        let json = serde_json::to_value(&ev).unwrap_or_default();
        assert_eq!(json["type"], "session");
        assert_eq!(json["action"], "login");
        let back: AgentEvent = serde_json::from_value(json).expect("round trip");
        assert_eq!(back, ev);
    }
}
