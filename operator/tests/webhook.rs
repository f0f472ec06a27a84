//! The admission webhook through its axum router (`oneshot`, no network) and through real
//! HTTPS with a certificate issued by the operator's CA (handshake, reload on rotation).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use noexit_operator::manifests::{Manifest, parse_documents};
use noexit_operator::pki::Ca;
use noexit_operator::webhook::{self, AppState, Lookup, Policy, Snapshot, router};
use serde_json::{Value, json};
use tower::ServiceExt;

const API: &str = "system:serviceaccount:noexit-system:noexit-api";

fn fixed_now() -> chrono::DateTime<chrono::Utc> {
    "2026-11-22T10:00:00Z".parse().unwrap()
}

/// The shipped example as JSON objects, by name.
fn example(name: &str) -> Value {
    let text =
        [include_str!("../../examples/ward-7.yaml"), include_str!("../../examples/request.yaml")].join("\n---\n");
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: Value = serde::Deserialize::deserialize(doc).unwrap();
        if value["metadata"]["name"] == name {
            return value;
        }
    }
    panic!("no example object {name}")
}

fn cluster() -> Snapshot {
    let mut s = Snapshot::new();
    for m in parse_documents(include_str!("../../examples/ward-7.yaml")).unwrap() {
        s = match m {
            Manifest::Project(p) => s.with_project(*p),
            Manifest::Dataset(d) => s.with_dataset(*d),
            Manifest::Workspace(w) => s.with_workspace(*w),
            Manifest::WorkspaceRequest(_) => s,
        };
    }
    s
}

fn state(lookup: impl Lookup + 'static) -> AppState {
    let site: noexit_operator::controllers::Site =
        serde_yaml::from_str(include_str!("../../examples/site.yaml")).expect("examples/site.yaml");
    let policy = Policy { site: (&site).into(), trusted_users: vec![API.into()], username_prefix: "oidc:".into() };
    let mut state = AppState::new(Arc::new(lookup), policy);
    state.clock = fixed_now;
    state
}

/// An AdmissionReview as the API server sends it.
struct Review {
    operation: &'static str,
    object: Value,
    old: Value,
    user: &'static str,
    sub_resource: Option<&'static str>,
}

impl Review {
    fn create(object: Value, user: &'static str) -> Self {
        Self { operation: "CREATE", object, old: Value::Null, user, sub_resource: None }
    }

    fn update(old: Value, object: Value, user: &'static str) -> Self {
        Self { operation: "UPDATE", object, old, user, sub_resource: None }
    }

    fn json(&self) -> Value {
        let kind = self.object["kind"].as_str().unwrap_or("Unknown");
        let (group, version) = self.object["apiVersion"].as_str().unwrap_or("v1").split_once('/').unwrap_or(("", "v1"));
        let resource = format!("{}s", kind.to_lowercase());
        let mut request = json!({
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "name": self.object["metadata"]["name"],
            "operation": self.operation,
            "userInfo": {"username": self.user, "groups": ["system:authenticated"]},
            "object": self.object,
            "oldObject": self.old,
            "dryRun": false,
        });
        if let Some(ns) = self.object["metadata"].get("namespace") {
            request["namespace"] = ns.clone();
        }
        if let Some(sub) = self.sub_resource {
            request["subResource"] = json!(sub);
        }
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request})
    }
}

async fn send(app: axum::Router, body: impl Into<Body>) -> (StatusCode, Value) {
    let req = Request::post("/validate").header("content-type", "application/json").body(body.into()).unwrap();
    let resp = app.oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn judge(lookup: impl Lookup + 'static, review: Review) -> Value {
    let (status, body) = send(router(state(lookup)), review.json().to_string()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["kind"], "AdmissionReview");
    assert_eq!(body["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(body["response"]["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    body["response"].clone()
}

fn message(response: &Value) -> &str {
    response["status"]["message"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn example_objects_are_admitted() {
    for (name, user) in [
        ("ward-7", "oidc:carol@ward7.example"),
        ("alice-r", "oidc:carol@ward7.example"),
        ("alice-vm", "oidc:carol@ward7.example"),
        ("alice-stats", "oidc:bob@ward7.example"),
    ] {
        let r = judge(cluster(), Review::create(example(name), user)).await;
        assert_eq!(r["allowed"], true, "{name}: {r}");
    }
}

#[tokio::test]
async fn a_workspace_with_an_ungranted_dataset_is_refused_with_object_and_field() {
    let mut ws = example("alice-r");
    ws["metadata"]["name"] = json!("alice");
    ws["spec"]["datasets"] = json!(["cohort-2024", "icu-2019"]);
    let mut p = example("ward-7");
    p["spec"]["datasets"] = json!(["cohort-2024"]);
    let lookup = cluster().with_project(serde_json::from_value(p).unwrap());
    let r = judge(lookup, Review::create(ws, "carol@ward7.example")).await;
    assert_eq!(r["allowed"], false);
    assert_eq!(r["status"]["code"], 403);
    assert_eq!(r["status"]["reason"], "DatasetNotGranted");
    assert_eq!(
        message(&r),
        r#"workspace ward-7/alice: spec.datasets[1]: dataset "icu-2019" is not granted to project "ward-7""#
    );
}

#[tokio::test]
async fn malformed_objects_are_refused_naming_the_field() {
    let mut ws = example("alice-r");
    ws["spec"]["runtime"] = json!("container");
    let r = judge(cluster(), Review::create(ws, "carol@ward7.example")).await;
    assert_eq!(r["allowed"], false);
    assert_eq!(r["status"]["reason"], "Malformed");
    assert!(message(&r).starts_with("workspace ward-7/alice-r: spec.runtime: unknown variant `container`"), "{r}");

    let mut p = example("ward-7");
    p["spec"]["members"][0]["roles"] = json!(["researcher", "root"]);
    let r = judge(cluster(), Review::create(p, "carol@ward7.example")).await;
    assert!(message(&r).starts_with("project ward-7: spec.members[0].roles[1]: unknown variant `root`"), "{r}");

    let mut d = example("icu-2019");
    d["spec"] = json!("everything");
    let r = judge(cluster(), Review::create(d, "carol@ward7.example")).await;
    assert_eq!(r["allowed"], false);
    assert!(message(&r).starts_with("dataset icu-2019: spec:"), "{r}");
}

#[tokio::test]
async fn an_update_without_an_old_object_is_refused() {
    let r = judge(cluster(), Review::update(Value::Null, example("alice-r"), "carol@ward7.example")).await;
    assert_eq!(r["allowed"], false);
    assert!(message(&r).contains("oldObject"), "{r}");
}

#[tokio::test]
async fn bodies_that_are_not_reviews_get_a_clear_error() {
    let (status, body) = send(router(state(cluster())), "{not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "bad_review");
    assert!(body["message"].as_str().unwrap().starts_with("not JSON"));

    // A review with a uid but an unreadable request is answered (denied), not failed.
    let review = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u-1", "kind": "Workspace"}});
    let (status, body) = send(router(state(cluster())), review.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["response"]["uid"], "u-1");
    assert_eq!(body["response"]["allowed"], false);
    assert!(body["response"]["status"]["message"].as_str().unwrap().starts_with("malformed admission review"));
}

#[tokio::test]
async fn oversized_bodies_are_rejected() {
    let big = vec![b' '; webhook::http::BODY_LIMIT + 1];
    let (status, _) = send(router(state(cluster())), big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn a_requester_approving_their_own_request_through_the_status_is_refused() {
    let old = example("alice-stats");
    let mut new = old.clone();
    new["status"] = json!({
        "conditions": [{"type": "Approved", "status": "True", "reason": "AdminDecision", "message": "",
                        "lastTransitionTime": "2026-11-22T10:00:00Z"}],
        "decidedBy": "bob@ward7.example",
    });
    let mut p = example("ward-7");
    p["spec"]["members"][1]["roles"] = json!(["dataAnalyst", "admin"]);
    let lookup = cluster().with_project(serde_json::from_value(p).unwrap());
    let mut review = Review::update(old.clone(), new.clone(), "oidc:bob@ward7.example");
    review.sub_resource = Some("status");
    let r = judge(lookup, review).await;
    assert_eq!(r["allowed"], false);
    assert_eq!(r["status"]["reason"], "SelfApproval");
    assert_eq!(
        message(&r),
        r#"workspacerequest ward-7/alice-stats: status.decidedBy: "bob@ward7.example" requested this workspace and may not decide on it"#
    );

    // The admin, under their own name, may.
    new["status"]["decidedBy"] = json!("carol@ward7.example");
    let mut review = Review::update(old, new, "oidc:carol@ward7.example");
    review.sub_resource = Some("status");
    assert_eq!(judge(cluster(), review).await["allowed"], true);
}

#[tokio::test]
async fn a_request_in_someone_elses_name_is_refused_unless_the_api_files_it() {
    let r = judge(cluster(), Review::create(example("alice-stats"), "oidc:carol@ward7.example")).await;
    assert_eq!(r["status"]["reason"], "RequesterMismatch");
    let r = judge(cluster(), Review::create(example("alice-stats"), API)).await;
    assert_eq!(r["allowed"], true, "{r}");
}

/// With `--username-prefix=oidc:`, `bob@ward7.example` from a client certificate or a static
/// token is not the OIDC member `bob@ward7.example`: it may neither file nor decide requests.
#[tokio::test]
async fn a_user_name_without_the_configured_prefix_is_refused() {
    let r = judge(cluster(), Review::create(example("alice-stats"), "bob@ward7.example")).await;
    assert_eq!(r["allowed"], false, "{r}");
    assert_eq!(r["status"]["reason"], "UsernamePrefixMissing");
    assert!(message(&r).starts_with("workspacerequest ward-7/alice-stats: userInfo.username:"), "{r}");

    let old = example("alice-stats");
    let mut new = old.clone();
    new["status"] = json!({
        "conditions": [{"type": "Approved", "status": "True", "reason": "AdminDecision", "message": "",
                        "lastTransitionTime": "2026-11-22T10:00:00Z"}],
        "decidedBy": "carol@ward7.example",
    });
    let mut review = Review::update(old, new, "carol@ward7.example");
    review.sub_resource = Some("status");
    let r = judge(cluster(), review).await;
    assert_eq!(r["allowed"], false, "{r}");
    assert_eq!(r["status"]["reason"], "UsernamePrefixMissing");
    // The prefixed name is the member (see a_requester_approving_their_own_request_...).
    let r = judge(cluster(), Review::create(example("alice-stats"), "oidc:bob@ward7.example")).await;
    assert_eq!(r["allowed"], true, "{r}");
}

/// examples/site.yaml lists the example images by digest: a tag, or another image, is refused
/// naming the field.
#[tokio::test]
async fn a_workspace_image_off_the_site_allowlist_is_refused() {
    let mut ws = example("alice-vm");
    ws["spec"]["image"] = json!("registry.ward7.example/noexit/r-desktop-vm:4.4");
    let r = judge(cluster(), Review::create(ws, "oidc:carol@ward7.example")).await;
    assert_eq!(r["allowed"], false, "{r}");
    assert_eq!(r["status"]["reason"], "ImageNotAllowed");
    assert!(message(&r).starts_with("workspace ward-7/alice-vm: spec.image: "), "{r}");
    assert!(message(&r).contains("workspaceImages.vm"), "{r}");

    let mut req = example("alice-stats");
    req["spec"]["workspace"]["image"] =
        json!("evil.example/r@sha256:e52fc2c04c00008eff4893909017748b11bc4f99d2b8a408a2b9fe5ac8f7e221");
    let r = judge(cluster(), Review::create(req, "oidc:bob@ward7.example")).await;
    assert_eq!(r["status"]["reason"], "ImageNotAllowed", "{r}");
    assert!(message(&r).contains("spec.workspace.image"), "{r}");
}

/// A Project named `system` would become the operator's namespace `noexit-system`.
#[tokio::test]
async fn a_project_named_system_is_refused() {
    let mut p = example("ward-7");
    p["metadata"]["name"] = json!("system");
    let r = judge(Snapshot::new(), Review::create(p, "oidc:carol@ward7.example")).await;
    assert_eq!(r["allowed"], false, "{r}");
    assert_eq!(r["status"]["reason"], "InvalidField");
    assert!(message(&r).starts_with(r#"project system: metadata.name: "system" is reserved"#), "{r}");
}

#[tokio::test]
async fn warnings_reach_the_client() {
    let mut p = example("ward-7");
    p["spec"]["datasets"] = json!(["icu-2019", "cohort-2024", "genomes-2025"]);
    let r = judge(cluster(), Review::create(p, "carol@ward7.example")).await;
    assert_eq!(r["allowed"], true);
    let warnings = r["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].as_str().unwrap().contains("genomes-2025"));
}

#[tokio::test]
async fn a_dataset_granted_to_a_missing_project_is_admitted_with_a_warning() {
    let r = judge(cluster(), Review::create(example("cohort-2024"), "steward@ward7.example")).await;
    assert_eq!(r["allowed"], true);
    let warning = r["warnings"][0].as_str().unwrap_or_default();
    assert!(warning.contains(r#"spec.grantedTo[1]: project "ward-9" does not exist (yet)"#), "{r}");
}

#[tokio::test]
async fn other_kinds_are_refused_and_deletes_pass() {
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", "namespace": "default"}});
    let r = judge(cluster(), Review::create(pod, "carol@ward7.example")).await;
    assert_eq!(r["allowed"], false);
    assert_eq!(r["status"]["reason"], "Unsupported");

    let mut delete = Review::create(example("ward-7"), "carol@ward7.example");
    delete.operation = "DELETE";
    assert_eq!(judge(Snapshot::new(), delete).await["allowed"], true);
}

#[tokio::test]
async fn refusals_are_counted_by_kind_and_reason() {
    let app = router(state(cluster()));
    let mut ws = example("alice-r");
    ws["spec"]["owner"] = json!("bob@ward7.example");
    let (status, _) = send(app.clone(), Review::create(ws, "carol@ward7.example").json().to_string()).await;
    assert_eq!(status, StatusCode::OK);
    let resp = app.oneshot(Request::get("/metrics").body(Body::empty()).unwrap()).await.unwrap();
    let text = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(
        text.contains(r#"noexit_admission_refusals_total{kind="workspace",reason="OwnerNotResearcher"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"noexit_admission_total{kind="workspace",operation="CREATE",outcome="refused"} 1"#),
        "{text}"
    );
}

/// A lookup whose caches have not synced yet.
struct Unsynced;

impl Lookup for Unsynced {
    fn project(&self, _: &str) -> Option<Arc<noexit_crds::Project>> {
        None
    }
    fn dataset(&self, _: &str) -> Option<Arc<noexit_crds::Dataset>> {
        None
    }
    fn workspaces_of(&self, _: &str) -> Vec<Arc<noexit_crds::Workspace>> {
        vec![]
    }
    fn ready(&self) -> bool {
        false
    }
}

#[tokio::test]
async fn health_and_readiness() {
    let get = |app: axum::Router, path: &'static str| async move {
        app.oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap().status()
    };
    assert_eq!(get(router(state(Unsynced)), "/healthz").await, StatusCode::OK);
    assert_eq!(get(router(state(Unsynced)), "/readyz").await, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(get(router(state(cluster())), "/readyz").await, StatusCode::OK);

    // Before the caches sync, reviews are refused saying so, not with "project not found".
    let r = judge(Unsynced, Review::create(example("alice-r"), "carol@ward7.example")).await;
    assert_eq!(r["allowed"], false);
    assert_eq!(r["status"]["reason"], "NotReady");
    assert!(message(&r).starts_with("workspace ward-7/alice-r: (webhook): the noexit webhook has not loaded"), "{r}");
}

// --- over TLS ---

struct Server {
    addr: std::net::SocketAddr,
    cert: Arc<webhook::tls::ReloadingCert>,
    dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

fn write_cert(ca: &Ca, dir: &std::path::Path) {
    let issued = ca.issue_server(&["localhost".into()], chrono::Duration::days(1)).unwrap();
    webhook::certs::write_pair(&issued, &dir.join("tls.crt"), &dir.join("tls.key")).unwrap();
}

async fn start(ca: &Ca) -> Server {
    start_limited(ca, Default::default()).await
}

async fn start_limited(ca: &Ca, limits: noexit_operator::serving::Limits) -> Server {
    let dir = tempfile::tempdir().unwrap();
    write_cert(ca, dir.path());
    let cert = webhook::tls::ReloadingCert::load(&dir.path().join("tls.crt"), &dir.path().join("tls.key")).unwrap();
    let acceptor = webhook::tls::acceptor(cert.clone()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let app = router(state(cluster()));
    let task = tokio::spawn(webhook::tls::serve(listener, acceptor, app, limits, async {
        let _ = rx.await;
    }));
    Server { addr, cert, dir, stop: Some(tx), task }
}

/// POST a review over HTTPS (HTTP/1.1), trusting only `ca`.
async fn post_tls(addr: std::net::SocketAddr, ca: &Ca, body: String) -> Result<Value, String> {
    post_tls_with(addr, ca, body, false).await
}

/// POST a review over HTTPS, trusting only `ca`; HTTP/2 (negotiated by ALPN) when `h2`.
async fn post_tls_with(addr: std::net::SocketAddr, ca: &Ca, body: String, h2: bool) -> Result<Value, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca.cert_pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    if h2 {
        config.alpn_protocols = vec![b"h2".to_vec()];
    }
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
    let io = hyper_util::rt::TokioIo::new(tls);
    let req = Request::post(if h2 { "https://localhost/validate" } else { "/validate" })
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = if h2 {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        sender.send_request(req).await.map_err(|e| e.to_string())?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        sender.send_request(req).await.map_err(|e| e.to_string())?
    };
    let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

#[tokio::test]
async fn reviews_over_https_with_a_certificate_from_the_operator_ca() {
    let ca = Ca::generate("noexit test CA").unwrap();
    let mut server = start(&ca).await;
    let mut ws = example("alice-r");
    ws["spec"]["datasets"] = json!(["icu-2020"]);
    let body = Review::create(ws, "carol@ward7.example").json().to_string();
    let r = post_tls(server.addr, &ca, body.clone()).await.unwrap();
    assert_eq!(r["response"]["allowed"], false);
    assert_eq!(r["response"]["status"]["reason"], "DatasetNotFound");
    // The API server may speak HTTP/2 (ALPN h2).
    let r = post_tls_with(server.addr, &ca, body.clone(), true).await.unwrap();
    assert_eq!(r["response"]["status"]["reason"], "DatasetNotFound");

    // A client that does not trust the operator's CA cannot talk to it.
    let stranger = Ca::generate("some other CA").unwrap();
    let err = post_tls(server.addr, &stranger, body).await.expect_err("untrusted");
    assert!(err.contains("certificate"), "{err}");

    if let Some(stop) = server.stop.take() {
        stop.send(()).unwrap();
    }
    tokio::time::timeout(Duration::from_secs(15), &mut server.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let old_ca = Ca::generate("old CA").unwrap();
    let server = start(&old_ca).await;
    let body = Review::create(example("alice-r"), "carol@ward7.example").json().to_string();
    assert_eq!(post_tls(server.addr, &old_ca, body.clone()).await.unwrap()["response"]["allowed"], true);

    // A broken pair (key and certificate from different issues) is refused; the old one stays.
    let new_ca = Ca::generate("new CA").unwrap();
    let a = new_ca.issue_server(&["localhost".into()], chrono::Duration::days(1)).unwrap();
    let b = new_ca.issue_server(&["localhost".into()], chrono::Duration::days(1)).unwrap();
    std::fs::write(server.dir.path().join("tls.crt"), &a.cert_pem).unwrap();
    std::fs::write(server.dir.path().join("tls.key"), &b.key_pem).unwrap();
    assert!(server.cert.reload().is_err());
    assert!(post_tls(server.addr, &old_ca, body.clone()).await.is_ok());

    // The watcher picks up a valid rotation by itself (polled, bounded).
    server.cert.watch(Duration::from_millis(50));
    write_cert(&new_ca, server.dir.path());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if post_tls(server.addr, &new_ca, body.clone()).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the new certificate was not served within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(post_tls(server.addr, &old_ca, body).await.is_err(), "the old CA no longer verifies");
}

// --- the real process, against a fake Kubernetes API ---

/// A fake API server: answers the webhook's list calls with the shipped example and holds its
/// watches open, like a quiet cluster.
async fn fake_api() -> std::net::SocketAddr {
    use axum::extract::{Path, RawQuery};
    async fn list(Path(plural): Path<String>, RawQuery(query): RawQuery) -> axum::response::Response {
        use axum::response::IntoResponse;
        if query.unwrap_or_default().contains("watch=true") {
            return Body::from_stream(futures::stream::pending::<Result<bytes::Bytes, std::io::Error>>())
                .into_response();
        }
        let kind = match plural.as_str() {
            "projects" => "Project",
            "datasets" => "Dataset",
            "workspaces" => "Workspace",
            _ => return StatusCode::NOT_FOUND.into_response(),
        };
        let text = include_str!("../../examples/ward-7.yaml");
        let mut items: Vec<Value> = serde_yaml::Deserializer::from_str(text)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .filter(|v: &Value| v["kind"] == kind)
            .map(|mut v| {
                v["metadata"]["resourceVersion"] = json!("1");
                v
            })
            .collect();
        // One object that no longer parses must not break the watch (and with it admission).
        items.push(json!({"apiVersion": "noexit.io/v1alpha1", "kind": kind,
            "metadata": {"name": "legacy", "namespace": "noexit-legacy", "resourceVersion": "1"},
            "spec": {"members": "everyone"}}));
        axum::Json(json!({"apiVersion": "noexit.io/v1alpha1", "kind": format!("{kind}List"),
            "metadata": {"resourceVersion": "1"}, "items": items}))
        .into_response()
    }
    let app = axum::Router::new().route("/apis/noexit.io/v1alpha1/{plural}", axum::routing::get(list));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test]
async fn the_webhook_process_serves_reviews_from_its_caches_and_stops_on_sigterm() {
    let api = fake_api().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kubeconfig(dir.path(), api);
    let ca = Ca::generate("noexit test CA").unwrap();
    write_cert(&ca, dir.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_noexit-operator"))
        .args(["webhook", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--tls-cert")
        .arg(dir.path().join("tls.crt"))
        .arg("--tls-key")
        .arg(dir.path().join("tls.key"))
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "error")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // Ready once the caches have listed the example; then a review is judged against them.
    let mut ws = example("alice-r");
    ws["spec"]["owner"] = json!("carol@ward7.example");
    let body = Review::create(ws, "carol@ward7.example").json().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    let response = loop {
        if let Ok(r) = post_tls(addr, &ca, body.clone()).await
            && r["response"]["status"]["reason"] == "OwnerNotResearcher"
        {
            break r;
        }
        assert!(Instant::now() < deadline, "the webhook did not judge with its caches within 20 s");
        assert!(child.try_wait().unwrap().is_none(), "the webhook exited");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(response["response"]["allowed"], false);

    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait()).await.expect("stops within 15 s").unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

/// What the fake API saw of the certificate bootstrap.
#[derive(Default)]
struct Recorded {
    tls_secret: Option<Value>,
    secret_writes: usize,
    vwc_patch: Option<(String, Value)>,
    vwc_reads: usize,
}

/// A fake API that serves the webhook's TLS Secret (absent at first) and the webhook
/// configuration, and empty lists of noexit objects.
async fn fake_api_with_pki(recorded: Arc<std::sync::Mutex<Recorded>>) -> std::net::SocketAddr {
    use axum::extract::State;
    use axum::response::IntoResponse;
    type Shared = Arc<std::sync::Mutex<Recorded>>;
    let vwc = || {
        json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": "noexit-webhook", "resourceVersion": "1"},
            "webhooks": [{"name": "validate.noexit.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                "clientConfig": {"service": {"name": "noexit-webhook", "namespace": "noexit-system", "path": "/validate"}}}]})
    };
    let get_secret = |State(s): State<Shared>| async move {
        match s.lock().unwrap().tls_secret.clone() {
            Some(secret) => axum::Json(secret).into_response(),
            None => (
                StatusCode::NOT_FOUND,
                axum::Json(json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "NotFound", "code": 404, "message": "secrets \"noexit-webhook-tls\" not found"})),
            )
                .into_response(),
        }
    };
    let write_secret = |State(s): State<Shared>, axum::Json(mut body): axum::Json<Value>| async move {
        let mut r = s.lock().unwrap();
        r.secret_writes += 1;
        body["metadata"]["resourceVersion"] = json!(r.secret_writes.to_string());
        r.tls_secret = Some(body.clone());
        (StatusCode::CREATED, axum::Json(body))
    };
    // The first read finds no configuration yet (the pod started before Helm created it).
    let get_vwc = move |State(s): State<Shared>| async move {
        let reads = {
            let mut r = s.lock().unwrap();
            r.vwc_reads += 1;
            r.vwc_reads
        };
        if reads == 1 {
            return (
                StatusCode::NOT_FOUND,
                axum::Json(json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "NotFound", "code": 404, "message": "not found"})),
            )
                .into_response();
        }
        axum::Json(vwc()).into_response()
    };
    let patch_vwc = move |State(s): State<Shared>, headers: http::HeaderMap, axum::Json(body): axum::Json<Value>| async move {
        let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        s.lock().unwrap().vwc_patch = Some((content_type, body));
        axum::Json(vwc())
    };
    let lists = |axum::extract::Path(plural): axum::extract::Path<String>, q: axum::extract::RawQuery| async move {
        if q.0.unwrap_or_default().contains("watch=true") {
            return Body::from_stream(futures::stream::pending::<Result<bytes::Bytes, std::io::Error>>())
                .into_response();
        }
        axum::Json(json!({"apiVersion": "noexit.io/v1alpha1", "kind": format!("{plural}List"),
            "metadata": {"resourceVersion": "1"}, "items": []}))
        .into_response()
    };
    let app = axum::Router::new()
        .route("/apis/noexit.io/v1alpha1/{plural}", axum::routing::get(lists))
        .route(
            "/api/v1/namespaces/noexit-system/secrets/noexit-webhook-tls",
            axum::routing::get(get_secret).put(write_secret),
        )
        .route("/api/v1/namespaces/noexit-system/secrets", axum::routing::post(write_secret))
        .route(
            "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/noexit-webhook",
            axum::routing::get(get_vwc).patch(patch_vwc),
        )
        .with_state(recorded);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn kubeconfig(dir: &std::path::Path, api: std::net::SocketAddr) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: 'http://{api}'}}}}]\n\
             users: [{{name: fake, user: {{token: test}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n\
             current-context: fake\n"
        ),
    )
    .unwrap();
    path
}

/// The controller issues the webhook's certificate into a Secret (no CA key in it) and sets the
/// caBundle; the webhook, given only the Secret's files (as the kubelet mounts them), serves
/// with it and has no way left to reach the CA (`--ca-secret` is gone).
#[tokio::test]
async fn the_controller_issues_the_webhook_certificate_and_the_webhook_only_reads_it() {
    use base64::Engine;
    let recorded = Arc::new(std::sync::Mutex::new(Recorded::default()));
    let api = fake_api_with_pki(recorded.clone()).await;
    let ca = Arc::new(Ca::generate("noexit operator CA").unwrap());
    let client = kube::Client::try_from(kube::Config::new(format!("http://{api}").parse().unwrap())).unwrap();
    let issuer = webhook::certs::ServingIssuer {
        client,
        namespace: "noexit-system".into(),
        secret: "noexit-webhook-tls".into(),
        dns_names: vec!["localhost".into()],
        ca: ca.clone(),
    };
    assert!(issuer.ensure(chrono::Utc::now()).await.unwrap(), "first pass issues");
    assert!(!issuer.ensure(chrono::Utc::now()).await.unwrap(), "a good certificate is kept");
    // Near expiry it is replaced in place.
    assert!(issuer.ensure(chrono::Utc::now() + chrono::Duration::days(80)).await.unwrap());
    assert_eq!(recorded.lock().unwrap().secret_writes, 2);
    let secret = recorded.lock().unwrap().tls_secret.clone().unwrap();
    assert_eq!(secret["type"], "kubernetes.io/tls");
    let field = |k: &str| {
        let b64 = secret["data"][k].as_str().unwrap_or_else(|| panic!("no {k}")).to_owned();
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap()
    };
    assert_eq!(field("ca.crt"), ca.cert_pem());
    assert!(secret["data"]["ca.key"].is_null(), "the CA key must not reach the webhook's Secret");

    // The caBundle, set in the background after a retry (the configuration was missing at first).
    tokio::spawn(issuer.clone().run(Some("noexit-webhook".into()), Duration::from_millis(200)));
    let deadline = Instant::now() + Duration::from_secs(20);
    let (content_type, patch) = loop {
        if let Some(p) = recorded.lock().unwrap().vwc_patch.clone() {
            break p;
        }
        assert!(Instant::now() < deadline, "the caBundle was not set");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(recorded.lock().unwrap().vwc_reads >= 2, "no retry after the 404");
    assert_eq!(content_type, "application/strategic-merge-patch+json");
    assert_eq!(patch["webhooks"][0]["name"], "validate.noexit.io");
    let bundle = patch["webhooks"][0]["clientConfig"]["caBundle"].as_str().unwrap();
    let bundle = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(bundle).unwrap()).unwrap();
    assert_eq!(bundle, ca.cert_pem());

    // The webhook with the mounted files only.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tls.crt"), field("tls.crt")).unwrap();
    std::fs::write(dir.path().join("tls.key"), field("tls.key")).unwrap();
    let old = tokio::process::Command::new(env!("CARGO_BIN_EXE_noexit-operator"))
        .args(["webhook", "--ca-secret", "noexit-ca", "--tls-cert", "x", "--tls-key", "y"])
        .output()
        .await
        .unwrap();
    assert_eq!(old.status.code(), Some(2), "the webhook still accepts --ca-secret");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_noexit-operator"))
        .args(["webhook", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--tls-cert")
        .arg(dir.path().join("tls.crt"))
        .arg("--tls-key")
        .arg(dir.path().join("tls.key"))
        .env("KUBECONFIG", kubeconfig(dir.path(), api))
        .env("RUST_LOG", "error")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let body = Review::create(example("alice-r"), "carol@ward7.example").json().to_string();
    loop {
        if let Ok(r) = post_tls(addr, &ca, body.clone()).await {
            // Empty caches: the project does not exist.
            assert_eq!(r["response"]["status"]["reason"], "ProjectNotFound", "{r}");
            break;
        }
        assert!(Instant::now() < deadline + Duration::from_secs(10), "the webhook did not serve its certificate");
        assert!(child.try_wait().unwrap().is_none(), "the webhook exited");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every leaf and object of `value`, as JSON pointers.
fn pointers(value: &Value, at: String, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                pointers(v, format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")), out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                pointers(v, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
    if !at.is_empty() {
        out.push(at);
    }
}

#[tokio::test]
async fn no_mangled_review_makes_the_webhook_fail() {
    let mut old = example("alice-stats");
    old["status"] = json!({"conditions": [{"type": "Approved", "status": "True", "reason": "R", "message": "",
        "lastTransitionTime": "2026-11-22T10:00:00Z"}], "decidedBy": "carol@ward7.example"});
    let mut review = Review::update(old.clone(), old, "carol@ward7.example");
    review.sub_resource = Some("status");
    let reviews = [
        Review::create(example("ward-7"), "carol@ward7.example").json(),
        Review::create(example("icu-2019"), "carol@ward7.example").json(),
        Review::update(example("alice-r"), example("alice-r"), "carol@ward7.example").json(),
        review.json(),
    ];
    let app = router(state(cluster()));
    let mut checked = 0;
    for original in reviews {
        let mut paths = Vec::new();
        pointers(&original, String::new(), &mut paths);
        for path in paths {
            for wrong in [Value::Null, json!(-1), json!("x"), json!([]), json!({}), json!(true)] {
                let mut mangled = original.clone();
                if let Some(slot) = mangled.pointer_mut(&path) {
                    *slot = wrong;
                }
                let (status, body) = send(app.clone(), mangled.to_string()).await;
                assert!(
                    status == StatusCode::OK || status == StatusCode::BAD_REQUEST,
                    "{path}: status {status}, body {body}"
                );
                if status == StatusCode::OK {
                    assert!(body["response"]["allowed"].is_boolean(), "{path}: {body}");
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 1000, "only {checked} mangled reviews");
}

// ---- the audit log -----------------------------------------------------------------------

#[tokio::test]
async fn kubectl_changes_reach_the_audit_log_with_the_kubernetes_user() {
    use noexit_operator::api::AuditQuery;
    use noexit_operator::audit::{MemorySink, Outcome};
    let sink = Arc::new(MemorySink::new());
    let app = router(state(cluster()).with_audit(sink.clone()));

    // An admin approves a request with kubectl (the status sub-resource).
    let old = example("alice-stats");
    let mut new = old.clone();
    new["status"] = json!({
        "conditions": [{"type": "Approved", "status": "True", "reason": "AdminDecision", "message": "",
                        "lastTransitionTime": "2026-11-22T10:00:00Z"}],
        "decidedBy": "carol@ward7.example",
    });
    let mut approve = Review::update(old.clone(), new.clone(), "oidc:carol@ward7.example");
    approve.sub_resource = Some("status");
    // The requester tries the same for themselves: refused, and recorded as refused.
    let mut own = new.clone();
    own["status"]["decidedBy"] = json!("bob@ward7.example");
    let mut p = example("ward-7");
    p["spec"]["members"][1]["roles"] = json!(["dataAnalyst", "admin"]);
    let mut self_approve = Review::update(old, own, "oidc:bob@ward7.example");
    self_approve.sub_resource = Some("status");
    // A Workspace created, and a Project deleted (the API server sends the old object).
    let create = Review::create(example("alice-r"), "oidc:carol@ward7.example");
    let mut delete = Review::create(example("ward-7"), "system:admin");
    delete.operation = "DELETE";
    let mut delete = delete.json();
    delete["request"]["oldObject"] = delete["request"]["object"].take();

    for review in [approve.json(), self_approve.json(), create.json(), delete] {
        let (status, body) = send(app.clone(), review.to_string()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let events = sink.events();
    let summary: Vec<(&str, &str, &str, bool)> = events
        .iter()
        .map(|e| (e.actor.as_str(), e.action.as_str(), e.object.as_str(), e.outcome == Outcome::Allowed))
        .collect();
    assert_eq!(
        summary,
        [
            ("kube:oidc:carol@ward7.example", "admission.update", "workspacerequest:ward-7/alice-stats", true),
            ("kube:oidc:bob@ward7.example", "admission.update", "workspacerequest:ward-7/alice-stats", false),
            ("kube:oidc:carol@ward7.example", "admission.create", "workspace:ward-7/alice-r", true),
            ("kube:system:admin", "admission.delete", "project:ward-7", true),
        ]
    );
    assert_eq!(events[0].detail["decision"], "Approved");
    assert_eq!(events[0].detail["decidedBy"], "carol@ward7.example");
    assert_eq!(events[0].detail["subResource"], "status");
    assert!(matches!(&events[1].outcome, Outcome::Refused(r) if r.contains("may not decide on it")), "{:?}", events[1]);
    // A project auditor's query (GET /v1/audit?project=ward-7) shows every one of them.
    let q = AuditQuery { project: "ward-7".into(), ..Default::default() };
    assert!(events.iter().all(|e| q.matches(e)), "{events:#?}");

    // A review that cannot even be read is refused, and recorded as such.
    let garbage = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u-1", "kind": 7, "userInfo": {"username": "mallory"}}});
    let (status, _) = send(app, garbage.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    let last = sink.events().pop().unwrap();
    assert_eq!((last.actor.as_str(), last.action.as_str()), ("kube:mallory", "admission.review"));
    assert!(matches!(&last.outcome, Outcome::Refused(r) if r.starts_with("malformed admission review")));
}

/// A sink that is down.
struct Down;

impl noexit_operator::audit::AuditSink for Down {
    fn record(
        &self,
        _: noexit_operator::audit::AuditEvent,
    ) -> futures::future::BoxFuture<'_, Result<(), noexit_operator::audit::AuditError>> {
        Box::pin(async { Err(noexit_operator::audit::AuditError::Unavailable("database down".into())) })
    }
}

#[tokio::test]
async fn nothing_is_admitted_that_the_audit_log_does_not_show() {
    let app = router(state(cluster()).with_audit(Arc::new(Down)));
    let (status, body) =
        send(app, Review::create(example("alice-r"), "oidc:carol@ward7.example").json().to_string()).await;
    assert_eq!(status, StatusCode::OK);
    let r = &body["response"];
    assert_eq!(r["allowed"], false, "{r}");
    assert_eq!(r["status"]["reason"], "AuditUnavailable");
    assert!(message(r).contains("database down"), "{r}");
}

/// A raw TLS connection to the webhook (no HTTP client in between).
async fn raw_tls(
    addr: std::net::SocketAddr,
    ca: &Ca,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca.cert_pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await
}

#[tokio::test]
async fn slow_headers_and_connections_over_the_per_address_limit_are_cut() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = Ca::generate("noexit test CA").unwrap();
    let limits = noexit_operator::serving::Limits {
        header_read: Duration::from_secs(1),
        max_per_address: 3,
        ..Default::default()
    };
    let server = start_limited(&ca, limits).await;

    // Slowloris: one header byte every 50 ms is cut after the 1 s header timeout.
    let mut slow = raw_tls(server.addr, &ca).await.unwrap();
    let started = Instant::now();
    let mut cut = None;
    for &byte in b"POST /validate HTTP/1.1\r\nHost: localhost\r\n".iter().chain(b"X-Slow: a\r\n".iter().cycle()) {
        let mut buf = [0u8; 64];
        let closed = slow.write_all(&[byte]).await.is_err()
            || tokio::time::timeout(Duration::from_millis(50), slow.read(&mut buf)).await.is_ok();
        if closed {
            cut = Some(started.elapsed());
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "slow headers still accepted after 10 s");
    }
    let cut = cut.unwrap();
    assert!(cut >= Duration::from_millis(900) && cut < Duration::from_secs(5), "cut after {cut:?}");
    drop(slow);

    // Three open connections from 127.0.0.1; the fourth is closed before its handshake ends.
    let mut open = Vec::new();
    for _ in 0..3 {
        let c = poll_until(|| raw_tls(server.addr, &ca)).await;
        open.push(c);
    }
    let fourth = raw_tls(server.addr, &ca).await;
    let refused = match fourth {
        Err(_) => true,
        Ok(mut s) => {
            let mut buf = [0u8; 16];
            matches!(tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
        }
    };
    assert!(refused, "a fourth connection from one address was served");
    drop(open.pop());
    let review = Review::create(example("ward-7"), "oidc:carol@ward7.example").json().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match post_tls(server.addr, &ca, review.clone()).await {
            Ok(v) => {
                assert_eq!(v["response"]["allowed"], true, "{v}");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no place freed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects until it succeeds (a slot of a just-closed connection frees asynchronously).
async fn poll_until<F, Fut, T>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match f().await {
            Ok(t) => return t,
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
