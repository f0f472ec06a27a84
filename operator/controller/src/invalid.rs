//! Why an object cannot be acted on. Shown to people (CLI, status message, render) and used as
//! the condition reason and the metrics category, so `Reason` is a fixed set.

/// A fixed set of reasons; `as_str` is a condition `reason` (CamelCase, stable).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    InvalidField,
    WrongNamespace,
    ProjectNotFound,
    ApprovalExpired,
    OwnerNotResearcher,
    DatasetNotFound,
    DatasetNotGranted,
    DatasetInvalid,
    SelfApproval,
    DecisionByNonAdmin,
    RequesterMismatch,
    RequesterNotAnalyst,
    /// The workspace image is not in the site's allowlist (or is not pinned by digest).
    ImageNotAllowed,
    /// The project's namespace exists and was not made by noexit for this project.
    NamespaceNotOwned,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidField => "InvalidField",
            Reason::WrongNamespace => "WrongNamespace",
            Reason::ProjectNotFound => "ProjectNotFound",
            Reason::ApprovalExpired => "ApprovalExpired",
            Reason::OwnerNotResearcher => "OwnerNotResearcher",
            Reason::DatasetNotFound => "DatasetNotFound",
            Reason::DatasetNotGranted => "DatasetNotGranted",
            Reason::DatasetInvalid => "DatasetInvalid",
            Reason::SelfApproval => "SelfApproval",
            Reason::DecisionByNonAdmin => "DecisionByNonAdmin",
            Reason::RequesterMismatch => "RequesterMismatch",
            Reason::RequesterNotAnalyst => "RequesterNotAnalyst",
            Reason::ImageNotAllowed => "ImageNotAllowed",
            Reason::NamespaceNotOwned => "NamespaceNotOwned",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One problem with one field of one object, e.g.
/// `workspace ward-7/alice: spec.datasets[1]: dataset "icu-2019" is not granted to project "ward-7"`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {message}")]
pub struct Invalid {
    /// `kind namespace/name` or `kind name`, lower-case kind.
    pub object: String,
    /// JSON path of the offending field (`spec.datasets[1]`).
    pub field: String,
    pub reason: Reason,
    pub message: String,
}

impl Invalid {
    pub fn new(
        object: impl Into<String>,
        field: impl Into<String>,
        reason: Reason,
        message: impl Into<String>,
    ) -> Self {
        Self { object: object.into(), field: field.into(), reason, message: message.into() }
    }
}

/// How an object is named in messages: `workspace ward-7/alice`, `project ward-7`.
pub fn describe(kind: &str, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{kind} {}/{name}", noexit_crds::names::project_of_namespace(ns).unwrap_or(ns)),
        None => format!("{kind} {name}"),
    }
}
