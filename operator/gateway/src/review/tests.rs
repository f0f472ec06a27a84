//! The review pages against a stub API (a small axum server speaking the output endpoints):
//! what they show, that everything is escaped, that the person's token is what reaches the
//! API, and that a decision without the session's CSRF token never leaves the gateway.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{Request, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;
use crate::directory::FileDirectory;
use crate::oidc::{Bearer, OidcClient, OidcSettings, SignedIn};
use crate::record::MemoryRecorder;
use crate::state::Config;

const ALICE: &str = "alice@ward7.example";
const BOB: &str = "bob@ward7.example";
const ORIGIN: &str = "https://gateway.test";
const TABLE: &str = "region,men,women\nNorth,25,7\nSouth,30,40\n";

#[derive(Default)]
struct Stub {
    /// (bearer, method path, body) of every call.
    calls: Mutex<Vec<(String, String, Value)>>,
    outputs: Mutex<HashMap<String, Value>>,
}

fn user_of(headers: &axum::http::HeaderMap) -> Option<&'static str> {
    match headers.get(header::AUTHORIZATION)?.to_str().ok()? {
        "Bearer tok-alice" => Some(ALICE),
        "Bearer tok-bob" => Some(BOB),
        _ => None,
    }
}

fn refused(status: StatusCode, code: &str, message: &str) -> axum::response::Response {
    (status, Json(json!({"code": code, "message": message}))).into_response()
}

fn record(stub: &Stub, headers: &axum::http::HeaderMap, what: String, body: Value) {
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    stub.calls.lock().unwrap().push((bearer, what, body));
}

async fn stub_api() -> (String, Arc<Stub>) {
    let stub = Arc::new(Stub::default());
    let report = noexit_airlock::checks::run(
        &noexit_airlock::checks::Submission {
            file_name: "table.csv",
            bytes: TABLE.as_bytes(),
            metadata: None,
            acro_results: None,
        },
        &noexit_airlock::checks::Policy::default(),
    );
    stub.outputs.lock().unwrap().insert(
        "o-1".into(),
        json!({"id": "o-1", "workspace": "alice", "fileName": "table.csv", "size": TABLE.len(), "sha256": "00",
               "requester": ALICE, "state": "checked", "checks": report, "reviews": [],
               "createdAt": "2026-12-07T01:00:00Z", "updatedAt": "2026-12-07T01:00:00Z"}),
    );
    let app = Router::new()
        .route(
            "/v1/projects/{project}/outputs",
            get(|State(s): State<Arc<Stub>>, headers: axum::http::HeaderMap, Path(p): Path<String>| async move {
                record(&s, &headers, format!("GET /v1/projects/{p}/outputs"), Value::Null);
                if user_of(&headers).is_none() {
                    return refused(StatusCode::UNAUTHORIZED, "unauthenticated", "no token");
                }
                Json(s.outputs.lock().unwrap().values().cloned().collect::<Vec<_>>()).into_response()
            }),
        )
        .route(
            "/v1/projects/{project}/outputs/{id}",
            get(|State(s): State<Arc<Stub>>, headers: axum::http::HeaderMap, Path((p, id)): Path<(String, String)>| async move {
                record(&s, &headers, format!("GET /v1/projects/{p}/outputs/{id}"), Value::Null);
                if user_of(&headers).is_none() {
                    return refused(StatusCode::UNAUTHORIZED, "unauthenticated", "no token");
                }
                match s.outputs.lock().unwrap().get(&id) {
                    Some(o) => Json(o.clone()).into_response(),
                    None => refused(StatusCode::NOT_FOUND, "notFound", "no such output"),
                }
            }),
        )
        .route(
            "/v1/projects/{project}/outputs/{id}/content",
            get(|headers: axum::http::HeaderMap| async move {
                match user_of(&headers) {
                    Some(BOB) => TABLE.into_response(),
                    _ => refused(StatusCode::FORBIDDEN, "notAChecker", "alice is not an output checker of this project"),
                }
            }),
        )
        .route(
            "/v1/projects/{project}/outputs/{id}/{decision}",
            post(
                |State(s): State<Arc<Stub>>,
                 headers: axum::http::HeaderMap,
                 Path((p, id, d)): Path<(String, String, String)>,
                 Json(body): Json<Value>| async move {
                    record(&s, &headers, format!("POST /v1/projects/{p}/outputs/{id}/{d}"), body.clone());
                    let Some(user) = user_of(&headers) else {
                        return refused(StatusCode::UNAUTHORIZED, "unauthenticated", "no token");
                    };
                    let mut outputs = s.outputs.lock().unwrap();
                    let Some(o) = outputs.get_mut(&id) else {
                        return refused(StatusCode::NOT_FOUND, "notFound", "no such output");
                    };
                    if o["requester"] == json!(user) {
                        return refused(StatusCode::FORBIDDEN, "selfReview", "alice submitted this request and may not review it");
                    }
                    o["reviews"].as_array_mut().unwrap().push(
                        json!({"reviewer": user, "decision": d, "reason": body["reason"], "at": "2026-12-07T01:05:00Z"}),
                    );
                    o["state"] = json!("inReview");
                    Json(o.clone()).into_response()
                },
            ),
        )
        .with_state(stub.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, stub)
}

struct Fixture {
    app: Router,
    gw: Arc<Gateway>,
    recorder: Arc<MemoryRecorder>,
    stub: Arc<Stub>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let directory = dir.path().join("directory.yaml");
        std::fs::write(
            &directory,
            format!(
                "projects:\n- name: ward-7\n  members: [\"{ALICE}\", \"{BOB}\"]\n  outputCheckers: [\"{ALICE}\", \"{BOB}\"]\n"
            ),
        )
        .unwrap();
        let (url, stub) = stub_api().await;
        let recorder = Arc::new(MemoryRecorder::default());
        let oidc = OidcClient::new(OidcSettings {
            issuer: "http://127.0.0.1:9".into(),
            client_id: "noexit-gateway".into(),
            client_secret: None,
            redirect_uri: format!("{ORIGIN}/callback"),
            user_claim: "email".into(),
            ca_pem: None,
        })
        .unwrap();
        let config = Config {
            public_origin: ORIGIN.into(),
            recheck: Duration::from_secs(15),
            require_mfa: true,
            max_signin: Duration::from_secs(3600),
            novnc_dir: "/usr/share/novnc".into(),
        };
        let gw = Gateway::new(Arc::new(FileDirectory::new(&directory)), recorder.clone(), oidc, config);
        for (id, user, token) in [("sess-alice", ALICE, "tok-alice"), ("sess-bob", BOB, "tok-bob")] {
            let ends = chrono::Utc::now() + chrono::Duration::hours(1);
            let who =
                SignedIn { user: user.into(), amr: vec!["otp".into()], expires: ends, bearer: Bearer(token.into()) };
            gw.signins.lock().unwrap().insert(id.into(), SignIn { who, csrf: format!("csrf-{id}"), ends });
        }
        let review = Arc::new(Review {
            gw: gw.clone(),
            api: ApiClient::new(&url, None).unwrap(),
            checkers: Arc::new(checkers::FileCheckers { path: directory }),
        });
        Fixture { app: router(review), gw, recorder, stub, _dir: dir }
    }

    async fn send(&self, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
        let res = self.app.clone().oneshot(req).await.unwrap();
        let (parts, body) = res.into_parts();
        let body = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
        (parts.status, parts.headers, body)
    }

    async fn get(&self, path: &str, session: Option<&str>) -> (StatusCode, axum::http::HeaderMap, String) {
        let mut req = Request::get(path);
        if let Some(s) = session {
            req = req.header(header::COOKIE, format!("{}={s}", crate::web::SESSION_COOKIE));
        }
        self.send(req.body(Body::empty()).unwrap()).await
    }

    async fn post(&self, path: &str, session: &str, form: &str, origin: Option<&str>) -> (StatusCode, String) {
        let mut req = Request::post(path)
            .header(header::COOKIE, format!("{}={session}", crate::web::SESSION_COOKIE))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(o) = origin {
            req = req.header(header::ORIGIN, o);
        }
        let (status, headers, body) = self.send(req.body(Body::from(form.to_owned())).unwrap()).await;
        let location = headers.get(header::LOCATION).and_then(|l| l.to_str().ok()).unwrap_or("").to_owned();
        (status, if location.is_empty() { body } else { location })
    }

    fn decisions(&self) -> Vec<(String, String, Value)> {
        self.stub.calls.lock().unwrap().iter().filter(|c| c.1.starts_with("POST")).cloned().collect()
    }

    fn audit(&self) -> Vec<crate::record::GatewayEvent> {
        self.recorder.events.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn anonymous_people_are_sent_to_sign_in() {
    let f = Fixture::new().await;
    let (status, headers, body) = f.get("/review", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("href=\"/login\""), "{body}");
    assert_eq!(headers[header::CONTENT_SECURITY_POLICY], CSP);
    let (status, _, _) = f.get("/review", Some("forged-session")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = f.post("/review/ward-7/o-1/approve", "forged-session", "csrf=x", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(f.decisions().is_empty());
    assert!(
        f.audit().iter().any(|e| e.actor == "anonymous" && e.action == "gateway.review.approve" && e.refused.is_some())
    );
}

#[tokio::test]
async fn a_checker_sees_the_list_and_the_marked_cell_with_their_own_token() {
    let f = Fixture::new().await;
    let (status, _, body) = f.get("/review", Some("sess-bob")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("href=\"/review/ward-7/o-1\""), "{body}");
    let (status, headers, body) = f.get("/review/ward-7/o-1", Some("sess-bob")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("<td class=\"fail\" title=\"minCellCount\">7</td>"), "{body}");
    assert!(body.contains("action=\"/review/ward-7/o-1/approve\""));
    assert!(!body.contains("tok-bob"), "the bearer token reached the page");
    assert_eq!(headers[header::CONTENT_SECURITY_POLICY], CSP);
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    assert_eq!(headers[header::REFERRER_POLICY], "same-origin");
    assert_eq!(headers[header::X_FRAME_OPTIONS], "DENY");
    let calls = f.stub.calls.lock().unwrap().clone();
    assert!(!calls.is_empty() && calls.iter().all(|c| c.0 == "Bearer tok-bob"), "{calls:?}");
    let (_, headers, css) = f.get("/review/review.css", None).await;
    assert!(
        css.contains(".noexit-review .fail") && headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/css")
    );
}

#[tokio::test]
async fn a_forged_form_without_the_token_is_refused_and_audited() {
    let f = Fixture::new().await;
    for form in ["reason=ok", "csrf=csrf-sess-alice&reason=ok", "csrf=&reason=ok"] {
        let (status, body) = f.post("/review/ward-7/o-1/approve", "sess-bob", form, None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{form}: {body}");
        assert!(body.contains("data-code=\"csrf\""), "{body}");
    }
    for origin in ["https://evil.test", "null"] {
        let (status, body) = f.post("/review/ward-7/o-1/approve", "sess-bob", "csrf=csrf-sess-bob", Some(origin)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{origin}");
        assert!(body.contains("data-code=\"wrongOrigin\""), "{body}");
    }
    assert!(f.decisions().is_empty(), "a forged decision reached the API");
    let refusals = f.audit().iter().filter(|e| e.refused.is_some() && e.actor == format!("user:{BOB}")).count();
    assert_eq!(refusals, 5);
    let _ = &f.gw;
}

#[tokio::test]
async fn a_decision_is_relayed_with_its_reason_and_audited() {
    let f = Fixture::new().await;
    let (status, body) = f.post("/review/ward-7/o-1/reject", "sess-bob", "csrf=csrf-sess-bob&reason=+", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a rejection without a reason: {body}");
    let (status, _) = f.post("/review/ward-7/o-1/delete", "sess-bob", "csrf=csrf-sess-bob", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(f.decisions().is_empty());

    let (status, location) = f
        .post("/review/ward-7/o-1/approve", "sess-bob", "csrf=csrf-sess-bob&reason=cell+7+is+fine", Some(ORIGIN))
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(location, "/review/ward-7/o-1?decided=approve");
    let decisions = f.decisions();
    assert_eq!(decisions.len(), 1);
    assert_eq!(decisions[0].0, "Bearer tok-bob");
    assert_eq!(decisions[0].1, "POST /v1/projects/ward-7/outputs/o-1/approve");
    assert_eq!(decisions[0].2, json!({"reason": "cell 7 is fine"}));
    assert!(f.audit().iter().any(|e| e.action == "gateway.review.approve" && e.refused.is_none()));

    let (_, _, page) = f.get(&location, Some("sess-bob")).await;
    assert!(page.contains("id=\"notice\"") && page.contains("You approved this output"), "{page}");
    assert!(page.contains("cell 7 is fine") && page.contains("id=\"already\""), "{page}");
}

#[tokio::test]
async fn the_requester_cannot_review_their_own_output() {
    let f = Fixture::new().await;
    let (status, _, page) = f.get("/review/ward-7/o-1", Some("sess-alice")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("id=\"own\"") && !page.contains("/approve\""), "{page}");
    assert!(page.contains("data-code=\"notAChecker\""), "the content refusal is not shown: {page}");
    // A hand-made form with a valid token: the API refuses, the page says so.
    let (status, body) = f.post("/review/ward-7/o-1/approve", "sess-alice", "csrf=csrf-sess-alice", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body.contains("data-code=\"selfReview\"") && body.contains("submitted this request and may not review it"),
        "{body}"
    );
    assert!(f.audit().iter().any(|e| e.action == "gateway.review.approve"
        && e.refused.as_deref().is_some_and(|r| r.contains("may not review it"))));
}

#[tokio::test]
async fn hostile_paths_are_refused_before_the_api() {
    let f = Fixture::new().await;
    for path in ["/review/Ward_7/o-1", "/review/ward-7/o.1", "/review/ward-7/%2e%2e"] {
        let (status, _, body) = f.get(path, Some("sess-bob")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
    }
    assert!(f.stub.calls.lock().unwrap().is_empty());
}
