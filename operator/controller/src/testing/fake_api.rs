//! An in-memory Kubernetes API server, good enough for the controllers: GET, LIST (label
//! selectors, metadata-only lists), WATCH (replay from a resourceVersion, then live), POST,
//! PUT (optimistic concurrency), PATCH (server-side apply with merge semantics, JSON merge
//! patch, JSON patch), DELETE with finalizers, `deletionTimestamp` and owner-reference garbage
//! collection, the status subresource, and injected failures. Every call is recorded with its
//! field manager, so tests can check what the controller asked for.
//!
//! It is an axum `Router`: a `kube::Client` talks to it in-process (`client()`), or over
//! loopback HTTP (`serve()`).

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use kube::Resource;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

/// `api/v1` or `apis/<group>/<version>`, and the plural.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceKey {
    pub prefix: String,
    pub plural: String,
}

impl ResourceKey {
    pub fn of<K: Resource<DynamicType = ()>>() -> Self {
        let api_version = K::api_version(&());
        let prefix =
            if api_version.contains('/') { format!("apis/{api_version}") } else { format!("api/{api_version}") };
        Self { prefix, plural: K::plural(&()).into_owned() }
    }
}

/// One recorded request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub method: String,
    /// Path without the query.
    pub path: String,
    pub field_manager: Option<String>,
    /// `apply`, `merge`, `json` for PATCH.
    pub patch: Option<&'static str>,
    pub status: u16,
    pub at: std::time::Instant,
}

#[derive(Clone, Debug)]
struct Failure {
    method: Option<Method>,
    path_contains: String,
    status: u16,
    remaining: u32,
}

#[derive(Clone, Debug)]
struct WatchEvent {
    key: ResourceKey,
    namespace: String,
    rv: u64,
    type_: &'static str,
    object: Arc<Value>,
}

#[derive(Default)]
struct Store {
    objects: BTreeMap<ResourceKey, BTreeMap<(String, String), Value>>,
    rv: u64,
    history: VecDeque<WatchEvent>,
    /// Oldest resourceVersion still replayable.
    history_floor: u64,
    failures: Vec<Failure>,
    calls: Vec<Call>,
    record_calls: bool,
}

const HISTORY: usize = 20_000;

struct Inner {
    store: Mutex<Store>,
    events: broadcast::Sender<WatchEvent>,
}

/// The fake API server. Cheap to clone (shared state).
#[derive(Clone)]
pub struct FakeApi {
    inner: Arc<Inner>,
}

impl Default for FakeApi {
    fn default() -> Self {
        Self::new()
    }
}

fn status_body(code: u16, reason: &str, message: impl Into<String>) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
        "message": message.into(), "reason": reason, "code": code,
    })
}

fn error(code: u16, reason: &str, message: impl Into<String>) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(status_body(code, reason, message))).into_response()
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Labels of an object.
fn labels_of(obj: &Value) -> Option<&Map<String, Value>> {
    obj.pointer("/metadata/labels").and_then(Value::as_object)
}

/// Equality-based selectors: `k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-separated.
pub fn matches_selector(obj: &Value, selector: &str) -> bool {
    let labels = labels_of(obj);
    let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    selector.split(',').map(str::trim).filter(|t| !t.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            get(k.trim()) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            get(k.trim()) == Some(v.trim())
        } else if let Some(k) = term.strip_prefix('!') {
            get(k.trim()).is_none()
        } else {
            get(term).is_some()
        }
    })
}

/// Server-side apply with merge semantics: objects merge key by key, everything else replaces.
fn merge_apply(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                match t.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => merge_apply(existing, v),
                    _ => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        p => *target = p.clone(),
    }
}

/// The object without metadata and status: what `generation` tracks.
fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

fn metadata_only(obj: &Value) -> Value {
    json!({ "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": obj.get("metadata").cloned().unwrap_or(Value::Null) })
}

/// Parsed request path.
struct Target {
    key: ResourceKey,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match *segs.first()? {
        "api" if segs.len() >= 3 => (format!("api/{}", segs[1]), &segs[2..]),
        "apis" if segs.len() >= 4 => (format!("apis/{}/{}", segs[1], segs[2]), &segs[3..]),
        _ => return None,
    };
    let (namespace, rest) = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        (Some(rest[1].to_owned()), &rest[2..])
    } else {
        (None, rest)
    };
    Some(Target {
        key: ResourceKey { prefix, plural: (*rest.first()?).to_owned() },
        namespace,
        name: rest.get(1).map(|s| (*s).to_owned()),
        status: rest.get(2) == Some(&"status"),
    })
}

impl FakeApi {
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(65_536);
        let store = Store { record_calls: true, ..Store::default() };
        Self { inner: Arc::new(Inner { store: Mutex::new(store), events }) }
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        self.inner.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The router to serve or to hand to `kube::Client::new`.
    pub fn router(&self) -> axum::Router {
        axum::Router::new().fallback(handle).with_state(self.clone())
    }

    /// A client that talks to this server in-process.
    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.router(), "default")
    }

    /// Serve over HTTP on `listener` until the task is dropped.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        axum::serve(listener, self.router()).await
    }

    /// Stop recording calls (benchmarks).
    pub fn record_calls(&self, on: bool) {
        self.lock().record_calls = on;
    }

    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// The next `times` requests with `method` (any if `None`) whose path contains
    /// `path_contains` fail with `status`.
    pub fn fail_next(&self, method: Option<Method>, path_contains: &str, status: u16, times: u32) {
        self.lock().failures.push(Failure { method, path_contains: path_contains.into(), status, remaining: times });
    }

    /// Create an object directly (no failure injection, not recorded).
    pub fn create<K: Resource<DynamicType = ()> + Serialize>(&self, obj: &K) -> Result<Value, String> {
        let mut v = serde_json::to_value(obj).map_err(|e| e.to_string())?;
        if let Some(m) = v.as_object_mut() {
            m.insert("apiVersion".into(), K::api_version(&()).into());
            m.insert("kind".into(), K::kind(&()).into());
        }
        let ns = obj.meta().namespace.clone();
        let mut store = self.lock();
        let created = store.create(&self.inner.events, &ResourceKey::of::<K>(), ns.as_deref(), v, true)?;
        Ok(created)
    }

    /// Create a raw object (e.g. one that does not parse as its kind).
    pub fn create_raw(&self, key: &ResourceKey, ns: Option<&str>, obj: Value) -> Result<Value, String> {
        let mut store = self.lock();
        store.create(&self.inner.events, key, ns, obj, true)
    }

    pub fn get<K: Resource<DynamicType = ()> + DeserializeOwned>(&self, ns: Option<&str>, name: &str) -> Option<K> {
        let store = self.lock();
        let v =
            store.objects.get(&ResourceKey::of::<K>())?.get(&(ns.unwrap_or_default().to_owned(), name.to_owned()))?;
        serde_json::from_value(v.clone()).ok()
    }

    pub fn list<K: Resource<DynamicType = ()> + DeserializeOwned>(&self, ns: Option<&str>) -> Vec<K> {
        let store = self.lock();
        store
            .objects
            .get(&ResourceKey::of::<K>())
            .into_iter()
            .flatten()
            .filter(|((n, _), _)| ns.is_none_or(|ns| ns == n))
            .filter_map(|(_, v)| serde_json::from_value(v.clone()).ok())
            .collect()
    }

    /// Raw objects of a resource (e.g. KubeVirt VirtualMachines, Events).
    pub fn list_raw(&self, key: &ResourceKey, ns: Option<&str>) -> Vec<Value> {
        let store = self.lock();
        store
            .objects
            .get(key)
            .into_iter()
            .flatten()
            .filter(|((n, _), _)| ns.is_none_or(|ns| ns == n))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Total number of stored objects.
    pub fn object_count(&self) -> usize {
        self.lock().objects.values().map(BTreeMap::len).sum()
    }

    /// Events (events.k8s.io/v1) about the object named `name`: `(type, reason, note)`.
    pub fn events_about(&self, name: &str) -> Vec<(String, String, String)> {
        let key = ResourceKey { prefix: "apis/events.k8s.io/v1".into(), plural: "events".into() };
        let s = |v: &Value, p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or_default().to_owned();
        self.list_raw(&key, None)
            .into_iter()
            .filter(|e| e.pointer("/regarding/name").and_then(Value::as_str) == Some(name))
            .map(|e| (s(&e, "/type"), s(&e, "/reason"), s(&e, "/note")))
            .collect()
    }

    /// Delete directly (as `kubectl delete` would: finalizers respected).
    pub fn delete<K: Resource<DynamicType = ()>>(&self, ns: Option<&str>, name: &str) -> Result<(), String> {
        let mut store = self.lock();
        store.delete(&self.inner.events, &ResourceKey::of::<K>(), ns.unwrap_or_default(), name).map(|_| ())
    }

    /// Replace the status of an object directly, as another writer (the API, an admin) would.
    pub fn set_status<K: Resource<DynamicType = ()>>(
        &self,
        ns: Option<&str>,
        name: &str,
        status: Value,
    ) -> Result<(), String> {
        let mut store = self.lock();
        let key = ResourceKey::of::<K>();
        let id = (ns.unwrap_or_default().to_owned(), name.to_owned());
        let mut obj = store.objects.get(&key).and_then(|m| m.get(&id)).cloned().ok_or("not found")?;
        merge_apply(&mut obj, &json!({ "status": status }));
        store.write(&self.inner.events, &key, &id, obj, "MODIFIED");
        Ok(())
    }

    /// Change an object's spec (or labels) directly, as `kubectl apply` would.
    pub fn update<K: Resource<DynamicType = ()>>(
        &self,
        ns: Option<&str>,
        name: &str,
        patch: Value,
    ) -> Result<(), String> {
        let mut store = self.lock();
        let key = ResourceKey::of::<K>();
        let id = (ns.unwrap_or_default().to_owned(), name.to_owned());
        let old = store.objects.get(&key).and_then(|m| m.get(&id)).cloned().ok_or("not found")?;
        let mut obj = old.clone();
        merge_apply(&mut obj, &patch);
        store.finish_update(&self.inner.events, &key, &id, &old, obj);
        Ok(())
    }
}

impl Store {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn publish(&mut self, events: &broadcast::Sender<WatchEvent>, e: WatchEvent) {
        self.history.push_back(e.clone());
        while self.history.len() > HISTORY {
            if let Some(old) = self.history.pop_front() {
                self.history_floor = old.rv;
            }
        }
        let _ = events.send(e);
    }

    /// Store `obj` under `id` with a new resourceVersion and tell the watchers.
    fn write(
        &mut self,
        events: &broadcast::Sender<WatchEvent>,
        key: &ResourceKey,
        id: &(String, String),
        mut obj: Value,
        type_: &'static str,
    ) -> Value {
        let rv = self.next_rv();
        if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            m.insert("resourceVersion".into(), rv.to_string().into());
        }
        self.objects.entry(key.clone()).or_default().insert(id.clone(), obj.clone());
        let e = WatchEvent { key: key.clone(), namespace: id.0.clone(), rv, type_, object: Arc::new(obj.clone()) };
        self.publish(events, e);
        obj
    }

    fn create(
        &mut self,
        events: &broadcast::Sender<WatchEvent>,
        key: &ResourceKey,
        ns: Option<&str>,
        mut obj: Value,
        keep_status: bool,
    ) -> Result<Value, String> {
        let meta = obj.as_object_mut().ok_or("not an object")?.entry("metadata").or_insert_with(|| json!({}));
        let m = meta.as_object_mut().ok_or("metadata is not an object")?;
        let name = match m.get("name").and_then(Value::as_str) {
            Some(n) => n.to_owned(),
            None => match m.get("generateName").and_then(Value::as_str) {
                Some(g) => format!("{g}{}", &uuid::Uuid::new_v4().simple().to_string()[..5]),
                None => return Err("metadata.name is required".into()),
            },
        };
        m.insert("name".into(), name.clone().into());
        if let Some(ns) = ns {
            m.insert("namespace".into(), ns.into());
        }
        m.insert("uid".into(), uuid::Uuid::new_v4().to_string().into());
        m.insert("creationTimestamp".into(), now_rfc3339().into());
        m.insert("generation".into(), 1.into());
        m.remove("resourceVersion");
        m.remove("deletionTimestamp");
        if !keep_status && let Some(o) = obj.as_object_mut() {
            o.remove("status");
        }
        let id = (ns.unwrap_or_default().to_owned(), name);
        if self.objects.get(key).is_some_and(|m| m.contains_key(&id)) {
            return Err(format!("{} {:?} already exists", key.plural, id.1));
        }
        Ok(self.write(events, key, &id, obj, "ADDED"))
    }

    /// After a change to an existing object: keep identity, bump generation on spec changes,
    /// skip no-ops, and finish a deletion whose last finalizer went away.
    fn finish_update(
        &mut self,
        events: &broadcast::Sender<WatchEvent>,
        key: &ResourceKey,
        id: &(String, String),
        old: &Value,
        mut new: Value,
    ) -> Value {
        for field in ["uid", "creationTimestamp", "name", "namespace", "deletionTimestamp", "resourceVersion"] {
            match old.pointer(&format!("/metadata/{field}")) {
                Some(v) => {
                    if let Some(m) = new.get_mut("metadata").and_then(Value::as_object_mut) {
                        m.insert(field.into(), v.clone());
                    }
                }
                None => {
                    if let Some(m) = new.get_mut("metadata").and_then(Value::as_object_mut) {
                        m.remove(field);
                    }
                }
            }
        }
        let generation = old.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(1);
        let generation = if spec_part(old) != spec_part(&new) { generation + 1 } else { generation };
        if let Some(m) = new.get_mut("metadata").and_then(Value::as_object_mut) {
            m.insert("generation".into(), generation.into());
        }
        if new == *old {
            return new;
        }
        let finalizers_gone = new.pointer("/metadata/finalizers").and_then(Value::as_array).is_none_or(Vec::is_empty);
        if new.pointer("/metadata/deletionTimestamp").is_some() && finalizers_gone {
            self.objects.entry(key.clone()).or_default().insert(id.clone(), new.clone());
            self.remove(events, key, id);
            return new;
        }
        self.write(events, key, id, new, "MODIFIED")
    }

    /// DELETE: mark for deletion while finalizers remain, else remove (and collect dependents).
    fn delete(
        &mut self,
        events: &broadcast::Sender<WatchEvent>,
        key: &ResourceKey,
        ns: &str,
        name: &str,
    ) -> Result<Value, String> {
        let id = (ns.to_owned(), name.to_owned());
        let obj = self.objects.get(key).and_then(|m| m.get(&id)).cloned().ok_or_else(|| "not found".to_owned())?;
        let has_finalizers =
            obj.pointer("/metadata/finalizers").and_then(Value::as_array).is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if obj.pointer("/metadata/deletionTimestamp").is_some() {
                return Ok(obj);
            }
            let mut marked = obj;
            if let Some(m) = marked.get_mut("metadata").and_then(Value::as_object_mut) {
                m.insert("deletionTimestamp".into(), now_rfc3339().into());
            }
            return Ok(self.write(events, key, &id, marked, "MODIFIED"));
        }
        self.remove(events, key, &id);
        Ok(obj)
    }

    /// Remove for good, then garbage-collect: dependents by owner uid, and the contents of a
    /// deleted Namespace.
    fn remove(&mut self, events: &broadcast::Sender<WatchEvent>, key: &ResourceKey, id: &(String, String)) {
        let Some(obj) = self.objects.get_mut(key).and_then(|m| m.remove(id)) else { return };
        let rv = self.next_rv();
        let e = WatchEvent {
            key: key.clone(),
            namespace: id.0.clone(),
            rv,
            type_: "DELETED",
            object: Arc::new(obj.clone()),
        };
        self.publish(events, e);
        let uid = meta_str(&obj, "uid").unwrap_or_default().to_owned();
        let deleted_namespace = (key.prefix == "api/v1" && key.plural == "namespaces").then(|| id.1.clone());
        let mut dependents = Vec::new();
        for (k, objects) in &self.objects {
            for ((ns, name), o) in objects {
                let owned = o.pointer("/metadata/ownerReferences").and_then(Value::as_array).is_some_and(|refs| {
                    refs.iter().any(|r| r.get("uid").and_then(Value::as_str) == Some(uid.as_str()))
                });
                if owned || deleted_namespace.as_deref() == Some(ns.as_str()) {
                    dependents.push((k.clone(), ns.clone(), name.clone()));
                }
            }
        }
        for (k, ns, name) in dependents {
            let _ = self.delete(events, &k, &ns, &name);
        }
    }

    fn take_failure(&mut self, method: &Method, path: &str) -> Option<u16> {
        let f = self.failures.iter_mut().find(|f| {
            f.remaining > 0 && f.method.as_ref().is_none_or(|m| m == method) && path.contains(&f.path_contains)
        })?;
        f.remaining -= 1;
        Some(f.status)
    }
}

async fn handle(State(api): State<FakeApi>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let query: BTreeMap<String, String> = Query::try_from_uri(&uri).map(|q| q.0).unwrap_or_default();
    let path = uri.path().to_owned();
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let patch_kind = (method == Method::PATCH).then(|| {
        if content_type.contains("apply-patch") {
            "apply"
        } else if content_type.contains("json-patch") {
            "json"
        } else {
            "merge"
        }
    });
    let metadata_only = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"));
    let injected = api.lock().take_failure(&method, &path);
    let response = match injected {
        Some(code) => {
            let reason = if code == 409 { "Conflict" } else { "InternalError" };
            error(code, reason, format!("injected failure {code} on {method} {path}"))
        }
        None => dispatch(&api, &method, &path, &query, patch_kind, metadata_only, &body),
    };
    let mut store = api.lock();
    if store.record_calls {
        store.calls.push(Call {
            method: method.to_string(),
            path,
            field_manager: query.get("fieldManager").cloned(),
            patch: patch_kind,
            status: response.status().as_u16(),
            at: std::time::Instant::now(),
        });
    }
    response
}

fn dispatch(
    api: &FakeApi,
    method: &Method,
    path: &str,
    query: &BTreeMap<String, String>,
    patch_kind: Option<&'static str>,
    metadata_only: bool,
    body: &Bytes,
) -> Response {
    let Some(t) = parse_path(path) else { return error(404, "NotFound", format!("no route {path}")) };
    let ns = t.namespace.clone().unwrap_or_default();
    let events = &api.inner.events;
    let parse_body = || -> Result<Value, Box<Response>> {
        serde_json::from_slice::<Value>(body)
            .or_else(|_| serde_yaml::from_slice::<Value>(body))
            .map_err(|e| Box::new(error(400, "BadRequest", format!("cannot parse body: {e}"))))
    };
    match (method.clone(), t.name.clone()) {
        (Method::GET, None) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            watch(api, t, query, metadata_only)
        }
        (Method::GET, None) => {
            let store = api.lock();
            let selector = query.get("labelSelector").cloned().unwrap_or_default();
            let items: Vec<Value> = store
                .objects
                .get(&t.key)
                .into_iter()
                .flatten()
                .filter(|((n, _), _)| t.namespace.as_ref().is_none_or(|ns| ns == n))
                .filter(|(_, o)| matches_selector(o, &selector))
                .map(|(_, o)| if metadata_only { metadata_only_value(o) } else { o.clone() })
                .collect();
            let list = json!({
                "apiVersion": "v1", "kind": "List",
                "metadata": { "resourceVersion": store.rv.to_string() },
                "items": items,
            });
            (StatusCode::OK, axum::Json(list)).into_response()
        }
        (Method::GET, Some(name)) => {
            let store = api.lock();
            match store.objects.get(&t.key).and_then(|m| m.get(&(ns, name.clone()))) {
                Some(o) => (StatusCode::OK, axum::Json(o.clone())).into_response(),
                None => error(404, "NotFound", format!("{} {name:?} not found", t.key.plural)),
            }
        }
        (Method::POST, None) => {
            let obj = match parse_body() {
                Ok(v) => v,
                Err(r) => return *r,
            };
            let mut store = api.lock();
            match store.create(events, &t.key, t.namespace.as_deref(), obj, false) {
                Ok(created) => (StatusCode::CREATED, axum::Json(created)).into_response(),
                Err(e) if e.contains("already exists") => error(409, "AlreadyExists", e),
                Err(e) => error(422, "Invalid", e),
            }
        }
        (Method::PUT, Some(name)) => {
            let new = match parse_body() {
                Ok(v) => v,
                Err(r) => return *r,
            };
            let mut store = api.lock();
            let id = (ns, name.clone());
            let Some(old) = store.objects.get(&t.key).and_then(|m| m.get(&id)).cloned() else {
                return error(404, "NotFound", format!("{} {name:?} not found", t.key.plural));
            };
            if let Some(rv) = meta_str(&new, "resourceVersion")
                && Some(rv) != meta_str(&old, "resourceVersion")
            {
                return error(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version",
                );
            }
            let new = keep_other_half(&old, new, t.status);
            let written = store.finish_update(events, &t.key, &id, &old, new);
            (StatusCode::OK, axum::Json(written)).into_response()
        }
        (Method::PATCH, Some(name)) => {
            let patch = match parse_body() {
                Ok(v) => v,
                Err(r) => return *r,
            };
            let mut store = api.lock();
            let id = (ns, name.clone());
            let existing = store.objects.get(&t.key).and_then(|m| m.get(&id)).cloned();
            let manager = query.get("fieldManager").cloned();
            let Some(old) = existing else {
                if patch_kind == Some("apply") && !t.status {
                    let mut obj = patch;
                    record_manager(&mut obj, manager.as_deref(), false);
                    return match store.create(events, &t.key, t.namespace.as_deref(), obj, false) {
                        Ok(created) => (StatusCode::CREATED, axum::Json(created)).into_response(),
                        Err(e) => error(422, "Invalid", e),
                    };
                }
                return error(404, "NotFound", format!("{} {name:?} not found", t.key.plural));
            };
            let mut new = old.clone();
            match patch_kind {
                Some("json") => {
                    // Like the API server, a `test` for null passes on a missing path.
                    let patch = drop_null_tests_of_missing(&old, patch);
                    let ops: json_patch::Patch = match serde_json::from_value(patch) {
                        Ok(p) => p,
                        Err(e) => return error(400, "BadRequest", format!("bad JSON patch: {e}")),
                    };
                    if let Err(e) = json_patch::patch(&mut new, &ops) {
                        return error(422, "Invalid", format!("JSON patch failed: {e}"));
                    }
                }
                Some("apply") => merge_apply(&mut new, &restrict(patch, t.status)),
                _ => merge_patch(&mut new, &restrict(patch, t.status)),
            }
            if patch_kind == Some("apply") {
                record_manager(&mut new, manager.as_deref(), t.status);
            }
            let new = keep_other_half(&old, new, t.status);
            let written = store.finish_update(events, &t.key, &id, &old, new);
            (StatusCode::OK, axum::Json(written)).into_response()
        }
        (Method::DELETE, Some(name)) => {
            let mut store = api.lock();
            match store.delete(events, &t.key, &ns, &name) {
                Ok(obj) => (StatusCode::OK, axum::Json(obj)).into_response(),
                Err(_) => error(404, "NotFound", format!("{} {name:?} not found", t.key.plural)),
            }
        }
        _ => error(405, "MethodNotAllowed", format!("{method} {path} is not supported by the fake API")),
    }
}

fn drop_null_tests_of_missing(obj: &Value, mut patch: Value) -> Value {
    if let Some(ops) = patch.as_array_mut() {
        ops.retain(|op| {
            let is_null_test =
                op.get("op").and_then(Value::as_str) == Some("test") && op.get("value") == Some(&Value::Null);
            let path = op.get("path").and_then(Value::as_str).unwrap_or_default();
            !(is_null_test && obj.pointer(path).is_none())
        });
    }
    patch
}

fn metadata_only_value(o: &Value) -> Value {
    metadata_only(o)
}

/// A write to the main resource keeps the live status; a write to `/status` keeps the rest.
fn keep_other_half(old: &Value, mut new: Value, status_subresource: bool) -> Value {
    if status_subresource {
        let status = new.get("status").cloned();
        let mut out = old.clone();
        if let Some(o) = out.as_object_mut() {
            match status {
                Some(s) => o.insert("status".into(), s),
                None => o.remove("status"),
            };
        }
        out
    } else {
        if let Some(o) = new.as_object_mut() {
            match old.get("status") {
                Some(s) => o.insert("status".into(), s.clone()),
                None => o.remove("status"),
            };
        }
        new
    }
}

/// The part of a patch that applies to the addressed half (status or the rest).
fn restrict(mut patch: Value, status_subresource: bool) -> Value {
    if let Some(o) = patch.as_object_mut() {
        if status_subresource {
            o.retain(|k, _| k == "status");
        } else {
            o.remove("status");
        }
    }
    patch
}

/// Record the applying field manager in `metadata.managedFields` (names only, not field sets).
fn record_manager(obj: &mut Value, manager: Option<&str>, status: bool) {
    let Some(manager) = manager else { return };
    let Some(meta) = obj.as_object_mut().map(|o| o.entry("metadata").or_insert_with(|| json!({}))) else { return };
    let Some(meta) = meta.as_object_mut() else { return };
    let entries = meta.entry("managedFields").or_insert_with(|| json!([]));
    let Some(list) = entries.as_array_mut() else { return };
    let subresource = if status { "status" } else { "" };
    let known = list.iter().any(|e| {
        e.get("manager").and_then(Value::as_str) == Some(manager)
            && e.get("subresource").and_then(Value::as_str).unwrap_or_default() == subresource
    });
    if !known {
        let mut entry = json!({ "manager": manager, "operation": "Apply" });
        if status {
            entry["subresource"] = "status".into();
        }
        list.push(entry);
    }
}

fn watch(api: &FakeApi, t: Target, query: &BTreeMap<String, String>, metadata_only: bool) -> Response {
    let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let selector = query.get("labelSelector").cloned().unwrap_or_default();
    let (initial, receiver, expired) = {
        let store = api.lock();
        let receiver = api.inner.events.subscribe();
        let expired = from != 0 && from < store.history_floor;
        let initial: Vec<WatchEvent> = store.history.iter().filter(|e| e.rv > from).cloned().collect();
        (initial, receiver, expired)
    };
    let key = t.key;
    let namespace = t.namespace;
    let wanted = move |e: &WatchEvent| {
        e.key == key && namespace.as_ref().is_none_or(|ns| *ns == e.namespace) && matches_selector(&e.object, &selector)
    };
    let line = move |e: &WatchEvent| {
        let object = if metadata_only { metadata_only_value(&e.object) } else { (*e.object).clone() };
        let mut bytes = serde_json::to_vec(&json!({ "type": e.type_, "object": object })).unwrap_or_default();
        bytes.push(b'\n');
        Ok::<Bytes, Infallible>(Bytes::from(bytes))
    };
    let gone = || {
        let mut bytes = serde_json::to_vec(
            &json!({ "type": "ERROR", "object": status_body(410, "Expired", "too old resource version") }),
        )
        .unwrap_or_default();
        bytes.push(b'\n');
        Ok::<Bytes, Infallible>(Bytes::from(bytes))
    };
    if expired {
        return Response::new(Body::from_stream(futures::stream::iter([gone()])));
    }
    let last_initial = initial.last().map(|e| e.rv).unwrap_or(from);
    let replay: Vec<_> = initial.iter().filter(|e| wanted(e)).map(&line).collect();
    let live = futures::stream::unfold((receiver, false), move |(mut rx, done)| async move {
        if done {
            return None;
        }
        loop {
            match rx.recv().await {
                Ok(e) if e.rv > last_initial => return Some((Some(e), (rx, false))),
                Ok(_) => continue,
                // Fell behind: tell the client to list again, then end.
                Err(broadcast::error::RecvError::Lagged(_)) => return Some((None, (rx, true))),
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .filter_map(move |e| {
        let out = match e {
            Some(e) if wanted(&e) => Some(line(&e)),
            Some(_) => None,
            None => Some(gone()),
        };
        futures::future::ready(out)
    });
    let stream = futures::stream::iter(replay).chain(live);
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| error(500, "InternalError", "cannot build the watch response"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_and_merges() {
        let obj = json!({ "metadata": { "labels": { "a": "1", "b": "2" } } });
        assert!(matches_selector(&obj, "a=1,b==2"));
        assert!(matches_selector(&obj, "a,!c,b!=3"));
        assert!(!matches_selector(&obj, "a=2"));
        assert!(matches_selector(&obj, ""));
        let mut t = json!({ "a": { "x": 1, "l": [1, 2] }, "b": 1 });
        merge_apply(&mut t, &json!({ "a": { "y": 2, "l": [3] } }));
        assert_eq!(t, json!({ "a": { "x": 1, "y": 2, "l": [3] }, "b": 1 }));
        merge_patch(&mut t, &json!({ "b": null }));
        assert_eq!(t, json!({ "a": { "x": 1, "y": 2, "l": [3] } }));
        let p = parse_path("/api/v1/namespaces/ns/pods/p/status").expect("path");
        assert_eq!(
            (p.key.plural.as_str(), p.namespace.as_deref(), p.name.as_deref(), p.status),
            ("pods", Some("ns"), Some("p"), true)
        );
        let n = parse_path("/api/v1/namespaces/noexit-x").expect("path");
        assert_eq!((n.key.plural.as_str(), n.name.as_deref()), ("namespaces", Some("noexit-x")));
        let c = parse_path("/apis/noexit.io/v1alpha1/projects").expect("path");
        assert_eq!((c.key.prefix.as_str(), c.name), ("apis/noexit.io/v1alpha1", None));
    }
}
