//! Output review in the browser, end to end: the real `noexit-operator gateway` (TLS, OIDC
//! code + PKCE sign-in, session store) with `--api-url` pointing at a stub of the
//! control-plane API's output endpoints, a test OIDC issuer whose ID tokens name both the
//! gateway (`noexit-gateway`) and the API (`noexit`) in `aud`, and headless Chromium
//! (Debian's, driven by playwright-core) as the output checker and as the requester.
//!
//! The stub verifies every bearer token with the API's own verifier
//! (`noexit_operator::api::oidc::Oidc`, audience `noexit`), so the audience configuration of
//! docs/admin.md is what is tested. It stands in for branch `outputs`' endpoints, which had not
//! landed when this test was written; it keeps their contract as branch `outputs` has it
//! (`OutputView`'s JSON, `{"reason"}` bodies, `selfReview` / `notAChecker` refusals with 403).
//!
//!   hack/install-deps.sh
//!   cargo test -p noexit-operator --test review_page -- --nocapture
//!
//! Needs chromium, node, noVNC (the gateway refuses to start without it) and
//! hack/test-support/browser/node_modules; skips with a message otherwise, unless
//! `NOEXIT_CI=1`, where it fails. Everything listens on 127.0.0.1.

use std::collections::HashMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use noexit_operator::api::oidc::{Oidc, OidcConfig};
use noexit_operator::audit::store::Filter;
use noexit_operator::audit::{Outcome, Store};
use noexit_test_support::net::{self, free_port};
use noexit_test_support::oidc::{Issuer, SignIn};
use noexit_test_support::process::{OnDrop, Proc};
use noexit_test_support::{browser, deps, pki};
use serde_json::{Value, json};
use sha2::Digest;

const BIN: &str = env!("CARGO_BIN_EXE_noexit-operator");
const ALICE: &str = "alice@ward7.example";
const BOB: &str = "bob@ward7.example";
const CLIENT_ID: &str = "noexit-gateway";
const API_AUDIENCE: &str = "noexit";
/// `ward-7`'s table: one cell of 7 (line 3, column 3) below the minimum of 10.
const TABLE: &str = "region,men,women\nNorth,25,31\nSouth,30,7\nEast,44,52\n";
const OUTPUT_ID: &str = "3f6c2a9e-review-e2e";

/// `true` if the test may run; prints why not, or panics under `NOEXIT_CI=1`.
fn ready() -> bool {
    deps::ready("review page e2e", &browser::missing(), "run hack/install-deps.sh")
}

// ---- a stub of the API's output endpoints, verifying tokens as the API does -----------------

struct Api {
    oidc: Arc<Oidc>,
    output: Mutex<Value>,
    /// (user, call) of every authenticated call; refusals as ("refused", why).
    calls: Mutex<Vec<(String, String)>>,
}

impl Api {
    async fn user(&self, headers: &HeaderMap, call: &str) -> Result<String, axum::response::Response> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        match self.oidc.verify(token).await {
            Ok(id) => {
                self.calls.lock().unwrap().push((id.user.clone(), call.to_owned()));
                Ok(id.user)
            }
            Err(e) => {
                self.calls.lock().unwrap().push(("refused".into(), format!("{call}: {e}")));
                Err((
                    StatusCode::UNAUTHORIZED,
                    axum::Json(json!({"code": "unauthenticated", "message": e.to_string()})),
                )
                    .into_response())
            }
        }
    }
}

fn api(rt: &tokio::runtime::Runtime, issuer: &str) -> (String, Arc<Api>) {
    let mut config = OidcConfig::new(issuer);
    config.audience = API_AUDIENCE.into();
    config.allow_http_loopback = true;
    let report = noexit_airlock::checks::run(
        &noexit_airlock::checks::Submission {
            file_name: "table.csv",
            bytes: TABLE.as_bytes(),
            metadata: None,
            acro_results: None,
        },
        &noexit_airlock::checks::Policy::default(),
    );
    let output = json!({"id": OUTPUT_ID, "workspace": "alice", "fileName": "table.csv", "size": TABLE.len(),
        "sha256": hex(&sha2::Sha256::digest(TABLE.as_bytes())), "requester": ALICE, "state": "checked",
        "checks": report, "reviews": [], "createdAt": "2026-12-07T01:00:00Z", "updatedAt": "2026-12-07T01:00:00Z"});
    let state = Arc::new(Api {
        oidc: Arc::new(Oidc::new(config).unwrap()),
        output: Mutex::new(output),
        calls: Mutex::default(),
    });
    type S = State<Arc<Api>>;
    let app = axum::Router::new()
        .route(
            "/v1/projects/{project}/outputs",
            axum::routing::get(
                |State(a): S,
                 h: HeaderMap,
                 UrlPath(p): UrlPath<String>,
                 axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>| async move {
                    if let Err(r) = a.user(&h, "list").await {
                        return r;
                    }
                    let o = a.output.lock().unwrap().clone();
                    let wanted = q.get("state").is_none_or(|s| o["state"] == json!(s));
                    let listed = if p == "ward-7" && wanted { vec![o] } else { vec![] };
                    axum::Json(listed).into_response()
                },
            ),
        )
        .route(
            "/v1/projects/{project}/outputs/{id}",
            axum::routing::get(|State(a): S, h: HeaderMap| async move {
                match a.user(&h, "get").await {
                    Ok(_) => axum::Json(a.output.lock().unwrap().clone()).into_response(),
                    Err(r) => r,
                }
            }),
        )
        .route(
            "/v1/projects/{project}/outputs/{id}/content",
            axum::routing::get(|State(a): S, h: HeaderMap| async move {
                match a.user(&h, "content").await {
                    Ok(u) if u == BOB => TABLE.into_response(),
                    Ok(u) => (
                        StatusCode::FORBIDDEN,
                        axum::Json(json!({"code": "notAChecker",
                        "message": format!("{u} is not an output checker of this project")})),
                    )
                        .into_response(),
                    Err(r) => r,
                }
            }),
        )
        .route(
            "/v1/projects/{project}/outputs/{id}/{decision}",
            axum::routing::post(
                |State(a): S,
                 h: HeaderMap,
                 UrlPath((_, _, d)): UrlPath<(String, String, String)>,
                 axum::Json(body): axum::Json<Value>| async move {
                    let user = match a.user(&h, &format!("decide {d}")).await {
                        Ok(u) => u,
                        Err(r) => return r,
                    };
                    let mut o = a.output.lock().unwrap();
                    // The API's refusal (noexit_airlock::lifecycle::Refusal::SelfReview).
                    if o["requester"] == json!(user) {
                        return (
                            StatusCode::FORBIDDEN,
                            axum::Json(json!({"code": "selfReview",
                            "message": format!("{user} submitted this request and may not review it")})),
                        )
                            .into_response();
                    }
                    o["reviews"].as_array_mut().unwrap().push(json!({"reviewer": user, "decision": d,
                        "reason": body["reason"], "at": chrono::Utc::now().to_rfc3339()}));
                    o["state"] = json!("inReview");
                    axum::Json(o.clone()).into_response()
                },
            ),
        )
        .with_state(state.clone());
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, state)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Run one browser scenario and return its result object.
fn run_browser(opts: Value) -> Value {
    browser::scenario("review-e2e.mjs", &opts, |v| eprintln!("browser: {v}"))
}

#[test]
fn a_checker_sees_the_failing_cell_marked_and_approves_in_the_browser() {
    if !ready() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // ID tokens name both the gateway (the client) and the API.
    let issuer = rt.block_on(Issuer::builder().also_audience(API_AUDIENCE).signing_in(BOB).start());
    let issuer_url = issuer.url.clone();
    let (api_url, api_state) = api(&rt, &issuer_url);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let cert = pki::self_signed(&["127.0.0.1"]);
    cert.write(d, "tls.crt", "tls.key");
    let spki = cert.spki_pin();
    std::fs::write(
        d.join("directory.yaml"),
        format!(
            "projects:\n- name: ward-7\n  members: [\"{ALICE}\", \"{BOB}\"]\n  outputCheckers: [\"{ALICE}\", \"{BOB}\"]\n  \
             approved: true\n  expires: \"2099-01-01T00:00:00Z\"\nworkspaces: []\n"
        ),
    )
    .unwrap();
    let db_url = format!("sqlite:{}", d.join("noexit.db").display());
    let port = free_port();
    let public = format!("https://127.0.0.1:{port}");
    let gateway = Command::new(BIN)
        .args(["gateway", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--tls-cert")
        .arg(d.join("tls.crt"))
        .arg("--tls-key")
        .arg(d.join("tls.key"))
        .args(["--public-url", &public, "--oidc-issuer", &issuer_url, "--oidc-client-id", CLIENT_ID])
        .arg("--directory")
        .arg(d.join("directory.yaml"))
        .args(["--api-url", &api_url, "--database-url", &db_url])
        .env("RUST_LOG", "info,noexit_gateway=debug")
        .stdout(Stdio::null())
        .stderr(File::create(d.join("gateway.log")).unwrap())
        .spawn()
        .unwrap();
    let mut gateway = Some(Proc::new(gateway).on_drop(OnDrop::Terminate));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    net::wait_for_listen("the gateway", addr, Duration::from_secs(30));
    let output_path = format!("/review/ward-7/{OUTPUT_ID}");
    let screenshot =
        std::env::var("NOEXIT_REVIEW_SCREENSHOT").map(PathBuf::from).unwrap_or_else(|_| d.join("review-checker.png"));
    let opts = |scenario: &str| {
        let profile = d.join(format!("profile-{scenario}"));
        json!({"scenario": scenario, "gateway": public, "spki": spki, "profile": profile, "outputPath": output_path,
            "screenshot": if scenario == "checker" { screenshot.clone() } else { d.join(format!("review-{scenario}.png")) },
            "reason": "one cell of 7: already suppressed in the published version; fine to release"})
    };

    let log_tail = || {
        let text = std::fs::read_to_string(d.join("gateway.log")).unwrap_or_default();
        text.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    };

    // Bob, an output checker: the list, the marked cell, a forged decision, the approval.
    let r = run_browser(opts("checker"));
    assert_eq!(r["listStatus"], json!(200), "{}", log_tail());
    assert_eq!(r["listed"], json!(1), "the output is not on /review: {r}");
    assert_eq!(r["user"], json!(BOB));
    let csp = r["csp"].as_str().unwrap_or_default();
    assert!(csp.contains("default-src 'none'") && csp.contains("img-src data:") && !csp.contains("unsafe"), "{csp}");
    assert_eq!(r["scripts"], json!(0));
    assert_eq!(r["cspViolations"], json!([]));
    let fails = r["failCells"].as_array().unwrap();
    assert_eq!(fails.len(), 1, "exactly the cell of 7 is marked: {r}");
    assert_eq!(fails[0]["text"], json!("7"));
    assert_eq!(fails[0]["title"], json!("minCellCount"));
    assert_eq!(fails[0]["line"], json!("3"));
    assert_eq!(fails[0]["column"], json!(3), "the 3rd field (after the line-number cell)");
    assert_eq!(fails[0]["background"], json!("rgb(248, 200, 200)"), "the stylesheet did not apply: {r}");
    assert!(screenshot.exists(), "no screenshot at {}", screenshot.display());
    for forged in ["forged", "forgedWrongToken"] {
        assert_eq!(r[forged]["status"], json!(403), "{forged}: {r}");
        assert_eq!(r[forged]["code"], json!("csrf"), "{forged}: {r}");
    }
    assert!(r["notice"].as_str().unwrap().contains("You approved this output"), "{r}");
    assert!(r["url"].as_str().unwrap().ends_with("?decided=approve"));
    assert!(r["reviews"].as_str().unwrap().contains(BOB) && r["reviews"].as_str().unwrap().contains("suppressed"));
    assert_eq!(r["formsAfter"], json!(0), "decisions are final: no forms after one");

    // Alice, the requester (also a checker of the project): no forms, the API's refusal shown.
    issuer.sign_in(SignIn::new(ALICE));
    let r = run_browser(opts("requester"));
    assert_eq!(r["own"], json!(1), "{r}");
    assert_eq!(r["forms"], json!(0), "{r}");
    assert_eq!(r["noContent"], json!("notAChecker"), "{r}");
    assert_eq!(r["selfReview"]["status"], json!(403), "{r}");
    assert_eq!(r["selfReview"]["code"], json!("selfReview"), "{r}");
    assert!(r["selfReview"]["text"].as_str().unwrap().contains("submitted this request and may not review it"), "{r}");

    // The API saw the people's own tokens (verified with its audience), never a refusal, and one
    // decision only: the forged ones never left the gateway.
    let calls = api_state.calls.lock().unwrap().clone();
    assert!(calls.iter().all(|(u, _)| u != "refused"), "{calls:?}");
    assert!(calls.iter().any(|(u, c)| u == BOB && c == "content"), "{calls:?}");
    let decisions: Vec<_> = calls.iter().filter(|(_, c)| c.starts_with("decide")).collect();
    assert_eq!(decisions.len(), 2, "Bob's approval and Alice's refused self-review: {calls:?}");
    assert!(decisions.iter().any(|(u, c)| u == BOB && c == "decide approve"));

    // The gateway's audit log has the relayed decision and each refusal.
    if let Some(g) = gateway.take() {
        drop(g);
    }
    let audit = rt.block_on(async {
        let store = Store::open_read_only(&db_url).await.unwrap();
        store.query(&Filter::default()).await.unwrap()
    });
    let has = |actor: &str, action: &str, refused: Option<&str>| {
        audit.iter().any(|e| {
            e.event.action == action
                && e.event.actor.contains(actor)
                && match (&e.event.outcome, refused) {
                    (Outcome::Allowed, None) => true,
                    (Outcome::Refused(r), Some(part)) => r.contains(part),
                    _ => false,
                }
        })
    };
    assert!(has(BOB, "gateway.review.approve", None), "relayed approval not audited");
    assert!(has(BOB, "gateway.review.approve", Some("CSRF")), "forged decision not audited");
    assert!(has(ALICE, "gateway.review.approve", Some("may not review it")), "self-review not audited");
    eprintln!("screenshot: {}", screenshot.display());
}
