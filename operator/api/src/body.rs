//! Strict request bodies: the right content type, a size limit, and JSON that matches the type
//! exactly (unknown fields refused). Errors name the problem and the field.

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// Largest JSON body accepted (an agent's event batch is the biggest).
pub const MAX_JSON_BYTES: usize = 1024 * 1024;

/// A JSON body, refused unless `Content-Type: application/json`, at most [`MAX_JSON_BYTES`],
/// and deserialisable into `T` with no unknown fields.
#[derive(Debug)]
pub struct StrictJson<T>(pub T);

/// Whether the request's content type is `expected` (parameters such as charset allowed).
pub fn content_type_is(req: &Request, expected: &str) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(expected))
}

pub fn wrong_content_type(req: &Request, expected: &str) -> ApiError {
    let got = req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("none");
    ApiError::bad(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupportedMediaType",
        format!("Content-Type must be {expected}, got {got}"),
    )
}

/// Parse JSON into `T`, naming the path of the offending field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        let at = if path == "." { String::new() } else { format!(" at {path}") };
        if message.starts_with("unknown field") {
            ApiError::invalid("unknownField", format!("{message}{at}"))
        } else if inner.is_syntax() || inner.is_eof() {
            ApiError::invalid("malformedJson", format!("body is not valid JSON: {message}"))
        } else {
            ApiError::invalid("invalidBody", format!("{message}{at}"))
        }
    })
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for StrictJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        if !content_type_is(&req, "application/json") {
            return Err(wrong_content_type(&req, "application/json"));
        }
        let bytes = axum::body::to_bytes(req.into_body(), MAX_JSON_BYTES).await.map_err(|_| {
            ApiError::bad(
                StatusCode::PAYLOAD_TOO_LARGE,
                "bodyTooLarge",
                format!("body is larger than {MAX_JSON_BYTES} bytes"),
            )
        })?;
        parse_json(&bytes).map(StrictJson)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        reason: String,
        inner: Option<Inner>,
    }
    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        n: u32,
    }

    fn code(r: Result<Body, ApiError>) -> String {
        r.map(|_| "ok".to_owned()).unwrap_or_else(|e| format!("{}: {}", e.code(), e))
    }

    #[test]
    fn errors_name_the_problem_and_the_field() {
        assert_eq!(code(parse_json(br#"{"reason":"x"}"#)), "ok");
        let e = code(parse_json(br#"{"reason":"x","extra":1}"#));
        assert!(e.starts_with("unknownField: unknown field `extra`"), "{e}");
        let e = code(parse_json(br#"{"reason":"x","inner":{"n":"seven"}}"#));
        assert!(e.starts_with("invalidBody") && e.contains("inner.n"), "{e}");
        assert!(code(parse_json(br#"{"reason":"#)).starts_with("malformedJson"));
        assert!(code(parse_json(br#"{}"#)).contains("missing field `reason`"));
    }
}
