//! Errors of the reconcilers. Every error has a `category()` from a fixed set: it is the
//! metrics label and the root of the condition reason, so it must never carry a name.

use crate::children::ConvertError;
use crate::invalid::Invalid;
use crate::revoke::RevokeError;
use noexit_common::pki::PkiError;

/// The fixed set of error categories (metric label values).
pub const CATEGORIES: [&str; 7] = ["invalid", "conflict", "api", "unavailable", "pki", "revoke", "internal"];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object itself is wrong; retrying cannot help until it changes.
    #[error("{0}")]
    Invalid(#[from] Invalid),
    /// A call to the Kubernetes API failed.
    #[error("cannot {action} {object}: {source}")]
    Kube { action: &'static str, object: String, source: kube::Error },
    #[error("certificate authority: {0}")]
    Pki(#[from] PkiError),
    #[error("{0}")]
    Revoke(#[from] RevokeError),
    /// A built object could not be serialised, or a stored object could not be read.
    #[error("{0}")]
    Internal(String),
}

impl From<ConvertError> for Error {
    fn from(e: ConvertError) -> Self {
        Error::Internal(e.to_string())
    }
}

impl Error {
    pub fn kube(action: &'static str, object: impl Into<String>, source: kube::Error) -> Self {
        Error::Kube { action, object: object.into(), source }
    }

    /// One of [`CATEGORIES`].
    pub fn category(&self) -> &'static str {
        match self {
            Error::Invalid(_) => "invalid",
            Error::Kube { source, .. } => kube_category(source),
            Error::Pki(_) => "pki",
            Error::Revoke(_) => "revoke",
            Error::Internal(_) => "internal",
        }
    }

    /// Condition reason for `Degraded` when a reconcile fails (CamelCase, stable).
    pub fn reason(&self) -> &'static str {
        match self.category() {
            "invalid" => "Invalid",
            "conflict" => "ApiConflict",
            "unavailable" => "ApiUnavailable",
            "pki" => "CertificateError",
            "revoke" => "RevocationFailed",
            "api" => "ApiError",
            _ => "InternalError",
        }
    }
}

/// 409 is a conflict (another writer, or a race we lose and retry); 429, 5xx and transport
/// failures mean the API is unavailable; everything else is an API refusal.
pub fn kube_category(e: &kube::Error) -> &'static str {
    match e {
        kube::Error::Api(status) if status.code == 409 => "conflict",
        kube::Error::Api(status) if status.code == 429 || status.code >= 500 => "unavailable",
        kube::Error::Api(_) => "api",
        kube::Error::SerdeError(_) => "internal",
        _ => "unavailable",
    }
}

/// Is this the API's 404?
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Is this the API's 409 AlreadyExists / Conflict?
pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invalid::Reason;

    fn api(code: u16) -> kube::Error {
        kube::Error::Api(kube::core::Status::failure("x", "y").with_code(code).boxed())
    }

    #[test]
    fn categories_come_from_the_fixed_set() {
        let errors = [
            Error::Invalid(Invalid::new("workspace a/b", "spec", Reason::InvalidField, "bad")),
            Error::kube("apply", "Pod a/b", api(409)),
            Error::kube("apply", "Pod a/b", api(500)),
            Error::kube("apply", "Pod a/b", api(429)),
            Error::kube("apply", "Pod a/b", api(403)),
            Error::Internal("x".into()),
        ];
        let got: Vec<_> = errors.iter().map(Error::category).collect();
        assert_eq!(got, ["invalid", "conflict", "unavailable", "unavailable", "api", "internal"]);
        assert!(errors.iter().all(|e| CATEGORIES.contains(&e.category())));
        assert_eq!(errors[1].reason(), "ApiConflict");
    }
}
