//! The one error type every handler returns. The body is always JSON `{code, message}` with a
//! stable `code` scripts can match and a `message` naming the object or field at fault.
//!
//! Server-side failures (5xx) are different: their detail names databases, tables, files and
//! cluster objects, which a caller has no use for and an attacker would like to see. Their
//! body says only what kind of failure it was and a correlation id; the detail goes to the
//! server's log under that id.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// Wire form of an error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No or unusable credentials (401).
    #[error("{message}")]
    Unauthenticated { code: &'static str, message: String },
    /// Authenticated but not allowed (403).
    #[error("{message}")]
    Forbidden { code: &'static str, message: String },
    /// The request itself is wrong (400, 404, 409, 413, 415, 422 ...).
    #[error("{message}")]
    BadRequest { status: StatusCode, code: &'static str, message: String },
    /// A store or the cluster is unavailable; the caller should retry (503). The message is
    /// logged, not shown.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected state (500); the message is logged, not shown.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn unauthenticated(code: &'static str, message: impl Into<String>) -> Self {
        Self::Unauthenticated { code, message: message.into() }
    }
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::Forbidden { code, message: message.into() }
    }
    pub fn bad(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest { status, code, message: message.into() }
    }
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::bad(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::bad(StatusCode::NOT_FOUND, "notFound", message)
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::bad(StatusCode::CONFLICT, code, message)
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::BadRequest { status, .. } => *status,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthenticated { code, .. } | Self::Forbidden { code, .. } | Self::BadRequest { code, .. } => code,
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    /// Whether the message stays on the server (5xx).
    pub fn is_server_side(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Internal(_))
    }

    /// The wire body. For 5xx it names only the kind of failure and `correlation`.
    pub fn body_with(&self, correlation: &str) -> ErrorBody {
        let message = match self {
            Self::Unavailable(_) => format!(
                "a service the API depends on is unavailable; retry with backoff (correlation id {correlation})"
            ),
            Self::Internal(_) => format!("internal error (correlation id {correlation})"),
            _ => self.to_string(),
        };
        ErrorBody { code: self.code().to_owned(), message }
    }

    /// The wire body of a 4xx error (tests; 5xx bodies need a correlation id, see `body_with`).
    pub fn body(&self) -> ErrorBody {
        self.body_with("-")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = if self.is_server_side() {
            let correlation = uuid::Uuid::new_v4().simple().to_string();
            tracing::error!(correlation_id = %correlation, code = self.code(), detail = %self, "request failed");
            self.body_with(&correlation)
        } else {
            self.body()
        };
        let mut response = (self.status(), Json(body.clone())).into_response();
        // The audit middleware reads the refusal from here instead of re-parsing the body.
        response.extensions_mut().insert(body);
        response
    }
}

impl From<noexit_audit::AuditError> for ApiError {
    fn from(e: noexit_audit::AuditError) -> Self {
        Self::Unavailable(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_status_and_stable_codes() {
        let e = ApiError::unauthenticated("tokenExpired", "token expired at 10:00");
        assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(e.body(), ErrorBody { code: "tokenExpired".into(), message: "token expired at 10:00".into() });
        assert_eq!(ApiError::Unavailable("db down".into()).status(), StatusCode::SERVICE_UNAVAILABLE);
        let r = ApiError::not_found("workspacerequest ward-7/x not found").into_response();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(r.extensions().get::<ErrorBody>().map(|b| b.code.as_str()), Some("notFound"));
    }

    #[test]
    fn server_side_errors_keep_their_detail_out_of_the_body() {
        for e in [
            ApiError::Unavailable("error returned from database: no such table: agent_heartbeats".into()),
            ApiError::Internal("/var/lib/noexit/api/outbox/x.tmp: Permission denied (os error 13)".into()),
        ] {
            let status = e.status();
            let r = e.into_response();
            assert_eq!(r.status(), status);
            let body = r.extensions().get::<ErrorBody>().cloned().unwrap();
            assert!(!body.message.contains("table") && !body.message.contains('/'), "{body:?}");
            let id = body.message.rsplit("correlation id ").next().unwrap().trim_end_matches(')');
            assert_eq!(id.len(), 32, "{body:?}");
        }
    }
}
