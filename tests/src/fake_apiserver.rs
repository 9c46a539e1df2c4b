//! A fake Kubernetes API server for the tests of the Kubernetes source (mock: no API server can
//! run here). It is a test double, not a conformance target: it serves over real HTTP on
//! 127.0.0.1 exactly the part of the API that kube-rs's watcher and event recorder use, with
//! real JSON objects, and lets a test inject the failures a real cluster produces.
//!
//! What it serves:
//! - `GET /api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`, `/api/v1/nodes` (and
//!   the namespaced forms of the first two): lists (`kind: ServiceList`, ...,
//!   `metadata.resourceVersion`, items without `kind`/`apiVersion` like a real server), paged
//!   with `limit`/`continue` over a snapshot taken at the first page; `fieldSelector` on
//!   `metadata.name` and `metadata.namespace` (`=`, `==`, `!=`); equality-based
//!   `labelSelector` terms (`key`, `!key`, `key=value`, `key==value`, `key!=value`);
//! - the same paths with `watch=true`: newline-delimited watch events (`ADDED`, `MODIFIED`,
//!   `DELETED`, `BOOKMARK` when `allowWatchBookmarks=true`, `ERROR` with a 410 `Expired` Status),
//!   replaying every change after `resourceVersion` (or, without one or with `0`, the current
//!   objects as `ADDED`), then streaming live changes until `timeoutSeconds`;
//! - `POST /apis/events.k8s.io/v1/namespaces/{ns}/events` and `/api/v1/namespaces/{ns}/events`,
//!   and `PATCH .../events/{name}` (JSON merge patch): Events, kept for [`FakeApiServer::events`];
//! - `PATCH /api/v1/nodes/{name}` (JSON merge patch): the stored Node changed, as watchers see;
//!   with [`FakeApiServer::admit_node_patches`], only when a ValidatingAdmissionPolicy admits the
//!   change (`crate::admission`), as the API server applies deploy/admission-policy.yaml.
//!
//! What it does not do: authentication, validation beyond what the source relies on, set-based
//! label selectors (`in`, `notin`: answered 400), `sendInitialEvents` streaming lists (answered
//! 400), any other resource (404).
//! List `resourceVersion`/`resourceVersionMatch` parameters are accepted and the most recent
//! state is served, which satisfies every match rule.
//!
//! A test can make Event writes fail ([`FakeApiServer::fail_events`]) as a missing RBAC rule
//! or an overloaded server would, and read each request's `User-Agent`
//! ([`FakeApiServer::user_agents`]).
//!
//! Objects are put in place by the test ([`FakeApiServer::apply`], [`FakeApiServer::delete`]),
//! each change bumping one global resourceVersion and stamping `resourceVersion`, `uid`,
//! `creationTimestamp` and a `managedFields` entry as a real server would.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    io,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Frame, Incoming},
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::{net::TcpListener, sync::mpsc, task::JoinSet};

use crate::admission::{Policy, Requester, Verdict};

/// The collections the fake serves to watchers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    /// v1 Service (namespaced).
    Services,
    /// discovery.k8s.io/v1 EndpointSlice (namespaced).
    EndpointSlices,
    /// v1 Node (cluster-scoped).
    Nodes,
}

impl Resource {
    const ALL: [Self; 3] = [Self::Services, Self::EndpointSlices, Self::Nodes];

    fn api_version(self) -> &'static str {
        match self {
            Self::Services | Self::Nodes => "v1",
            Self::EndpointSlices => "discovery.k8s.io/v1",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Self::Services => "services",
            Self::EndpointSlices => "endpointslices",
            Self::Nodes => "nodes",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Self::Services => "Service",
            Self::EndpointSlices => "EndpointSlice",
            Self::Nodes => "Node",
        }
    }

    fn namespaced(self) -> bool {
        !matches!(self, Self::Nodes)
    }

    /// The resource an object's `apiVersion` and `kind` name.
    fn of(object: &Value) -> Option<Self> {
        let api_version = object.get("apiVersion")?.as_str()?;
        let kind = object.get("kind")?.as_str()?;
        Self::ALL
            .into_iter()
            .find(|resource| resource.api_version() == api_version && resource.kind() == kind)
    }
}

/// The Event APIs served.
const EVENT_API_VERSIONS: [&str; 2] = ["events.k8s.io/v1", "v1"];

/// A field selector: `metadata.name` / `metadata.namespace` with `=`, `==` or `!=`.
#[derive(Clone, Debug, Default)]
struct Selector(Vec<(String, bool, String)>);

impl Selector {
    fn parse(text: Option<&str>) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in text
            .unwrap_or_default()
            .split(',')
            .filter(|t| !t.is_empty())
        {
            let (field, equal, value) = if let Some((field, value)) = term.split_once("!=") {
                (field, false, value)
            } else if let Some((field, value)) = term.split_once("==") {
                (field, true, value)
            } else if let Some((field, value)) = term.split_once('=') {
                (field, true, value)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            if !matches!(field, "metadata.name" | "metadata.namespace") {
                return Err(format!(
                    "field label not supported by the fake API server: {field}"
                ));
            }
            terms.push((field.to_owned(), equal, value.to_owned()));
        }
        Ok(Self(terms))
    }

    fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let actual = match field.as_str() {
                "metadata.name" => meta_str(object, "name"),
                _ => meta_str(object, "namespace"),
            };
            (actual.unwrap_or_default() == value) == *equal
        })
    }
}

/// An equality-based label selector: every term must hold.
#[derive(Clone, Debug, Default)]
struct LabelSelector(Vec<LabelTerm>);

#[derive(Clone, Debug)]
enum LabelTerm {
    Exists(String),
    Absent(String),
    Equals(String, String),
    Differs(String, String),
}

impl LabelSelector {
    fn parse(text: Option<&str>) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in text
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            if term.contains(['(', ')', ' ']) {
                return Err(format!(
                    "set-based label selector {term:?} is not supported by the fake API server"
                ));
            }
            let parsed = if let Some(key) = term.strip_prefix('!') {
                LabelTerm::Absent(key.to_owned())
            } else if let Some((key, value)) = term.split_once("!=") {
                LabelTerm::Differs(key.to_owned(), value.to_owned())
            } else if let Some((key, value)) = term.split_once("==") {
                LabelTerm::Equals(key.to_owned(), value.to_owned())
            } else if let Some((key, value)) = term.split_once('=') {
                LabelTerm::Equals(key.to_owned(), value.to_owned())
            } else {
                LabelTerm::Exists(term.to_owned())
            };
            terms.push(parsed);
        }
        Ok(Self(terms))
    }

    fn matches(&self, object: &Value) -> bool {
        let label = |key: &str| {
            object
                .get("metadata")
                .and_then(|metadata| metadata.get("labels"))
                .and_then(|labels| labels.get(key))
                .and_then(Value::as_str)
        };
        self.0.iter().all(|term| match term {
            LabelTerm::Exists(key) => label(key).is_some(),
            LabelTerm::Absent(key) => label(key).is_none(),
            LabelTerm::Equals(key, value) => label(key) == Some(value.as_str()),
            LabelTerm::Differs(key, value) => label(key) != Some(value.as_str()),
        })
    }
}

fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object.get("metadata")?.get(field)?.as_str()
}

/// What a watch connection is sent.
enum WatchMessage {
    Line(Bytes),
    /// End the response normally (the server closed the watch).
    End,
    /// Break the connection mid-response (no terminating chunk), as a network failure would.
    Abort,
}

struct Watch {
    resource: Resource,
    namespace: Option<String>,
    selector: Selector,
    labels: LabelSelector,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<WatchMessage>,
}

impl Watch {
    fn wants(&self, resource: Resource, object: &Value) -> bool {
        self.resource == resource
            && self
                .namespace
                .as_deref()
                .is_none_or(|namespace| meta_str(object, "namespace") == Some(namespace))
            && self.selector.matches(object)
            && self.labels.matches(object)
    }

    /// The event this watch sees for a change, as a real server's watch cache sends it: an
    /// object that starts to match the selectors is `ADDED`, one that stops matching is
    /// `DELETED` (with its new state).
    fn sees(&self, change: &Change) -> Option<&'static str> {
        let now = self.wants(change.resource, &change.object);
        let before = change
            .before
            .as_ref()
            .is_some_and(|before| self.wants(change.resource, before));
        match change.kind {
            "MODIFIED" => match (before, now) {
                (true, true) => Some("MODIFIED"),
                (false, true) => Some("ADDED"),
                (true, false) => Some("DELETED"),
                (false, false) => None,
            },
            kind => now.then_some(kind),
        }
    }
}

/// One change, as watch events replay it.
struct Change {
    resource_version: u64,
    resource: Resource,
    kind: &'static str,
    object: Value,
    /// The object before a `MODIFIED` change.
    before: Option<Value>,
}

/// The remaining items of a paged list.
struct Page {
    resource_version: u64,
    items: Vec<Value>,
}

#[derive(Default)]
struct State {
    resource_version: u64,
    objects: BTreeMap<(Resource, String, String), Value>,
    /// Every change after `compacted`, in order.
    history: Vec<Change>,
    /// Watches from an older resourceVersion get `410 Gone`.
    compacted: u64,
    fail_next_watch: HashMap<Resource, usize>,
    list_delay: HashMap<Resource, Duration>,
    watches: Vec<Watch>,
    pages: HashMap<u64, Page>,
    next_page: u64,
    /// (API version, object), in creation order.
    events: Vec<(&'static str, Value)>,
    /// Event writes still to fail, and how.
    event_failures: Option<InjectedFailure>,
    /// Node patches still to fail, and how.
    node_patch_failures: Option<InjectedFailure>,
    /// The policy Node patches must pass, and who sends them.
    node_admission: Option<(Policy, Requester)>,
    /// (`METHOD /path?query`, User-Agent), in arrival order.
    requests: Vec<(String, Option<String>)>,
}

/// How the next writes of a kind fail.
struct InjectedFailure {
    remaining: usize,
    code: StatusCode,
    reason: String,
    message: String,
}

impl InjectedFailure {
    fn new(count: usize, code: u16, reason: &str, message: &str) -> Self {
        Self {
            remaining: count,
            code: StatusCode::from_u16(code).expect("an HTTP status code"),
            reason: reason.to_owned(),
            message: message.to_owned(),
        }
    }

    /// The failure to answer, if any is left.
    fn take(failing: &mut Option<Self>) -> Option<Response<Body>> {
        let failing = failing.as_mut()?;
        if failing.remaining == 0 {
            return None;
        }
        failing.remaining -= 1;
        Some(failure(failing.code, &failing.reason, &failing.message))
    }
}

impl State {
    fn next_version(&mut self) -> u64 {
        self.resource_version += 1;
        self.resource_version
    }

    /// Records a change and sends it to the open watches that see it.
    fn publish(
        &mut self,
        resource: Resource,
        kind: &'static str,
        object: Value,
        before: Option<Value>,
    ) {
        let change = Change {
            resource_version: self.resource_version,
            resource,
            kind,
            object,
            before,
        };
        self.watches.retain(|watch| !watch.tx.is_closed());
        for watch in &self.watches {
            if let Some(kind) = watch.sees(&change) {
                // A watch whose connection just went away: nothing to do.
                let _ = watch
                    .tx
                    .send(WatchMessage::Line(watch_line(kind, &change.object)));
            }
        }
        self.history.push(change);
    }
}

type Body = UnsyncBoxBody<Bytes, io::Error>;

/// The fake API server; it stops (and drops every connection) when dropped.
pub struct FakeApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// The accepting task; None while [`FakeApiServer::stop`] has it down.
    task: Option<tokio::task::JoinHandle<()>>,
    /// The lab host whose namespace it listens in (None: the caller's own).
    host: Option<crate::lab::Host>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl FakeApiServer {
    /// Listens on 127.0.0.1 on an ephemeral port. Must be called inside a tokio runtime.
    pub async fn start() -> io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        Self::serving(listener, None)
    }

    /// Listens on 127.0.0.1 on an ephemeral port inside `host`'s network namespace, for an
    /// agent that runs there (a lab node). Must be called inside a tokio runtime.
    pub fn start_in(host: &crate::lab::Host) -> io::Result<Self> {
        let listener = bind_in(host, (Ipv4Addr::LOCALHOST, 0).into())?;
        Self::serving(listener, Some(host.clone()))
    }

    fn serving(listener: TcpListener, host: Option<crate::lab::Host>) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let task = Some(accept(listener, Arc::clone(&state)));
        Ok(Self {
            addr,
            state,
            task,
            host,
        })
    }

    /// An outage: stops listening and drops every connection, watches included; the objects
    /// stay, and the test may change them meanwhile. [`Self::resume`] ends it.
    pub fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.state().watches.clear();
    }

    /// Listens again on the same address, serving the objects as they are now. Must be called
    /// inside a tokio runtime.
    pub fn resume(&mut self) -> io::Result<()> {
        if self.task.is_some() {
            return Ok(());
        }
        let listener = match &self.host {
            Some(host) => bind_in(host, self.addr)?,
            None => {
                let listener = std::net::TcpListener::bind(self.addr)?;
                listener.set_nonblocking(true)?;
                TcpListener::from_std(listener)?
            }
        };
        self.task = Some(accept(listener, Arc::clone(&self.state)));
        Ok(())
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig whose current context is this server (no credentials).
    pub fn write_kubeconfig(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, kubeconfig(&self.url()))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Creates or replaces an object (a Service, EndpointSlice or Node, e.g. a k8s-openapi value)
    /// and returns its new resourceVersion. Watchers see `ADDED` or `MODIFIED`. Panics on an
    /// object the fake does not serve: that is a mistake in the test.
    pub fn apply(&self, object: impl Serialize) -> u64 {
        let mut object = serde_json::to_value(object).expect("an object serializes to JSON");
        let resource = Resource::of(&object).unwrap_or_else(|| {
            panic!(
                "the fake API server serves Services, EndpointSlices and Nodes, not {:?} {:?}",
                object.get("apiVersion"),
                object.get("kind")
            )
        });
        let name = meta_str(&object, "name")
            .expect("an object has metadata.name")
            .to_owned();
        let namespace = if resource.namespaced() {
            meta_str(&object, "namespace")
                .unwrap_or("default")
                .to_owned()
        } else {
            assert!(
                meta_str(&object, "namespace").is_none(),
                "{} is cluster-scoped",
                resource.kind()
            );
            String::new()
        };
        let mut state = self.state();
        let version = state.next_version();
        let key = (resource, namespace.clone(), name);
        let existing = state.objects.get(&key);
        let before = existing.cloned();
        let (uid, created) = match existing {
            Some(existing) => (
                existing["metadata"]["uid"].clone(),
                existing["metadata"]["creationTimestamp"].clone(),
            ),
            None => (json!(uid(version)), now()),
        };
        let kind = if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let metadata = object
            .as_object_mut()
            .expect("an object is a JSON object")
            .entry("metadata")
            .or_insert_with(|| json!({}));
        metadata["resourceVersion"] = json!(version.to_string());
        metadata["uid"] = uid;
        metadata["creationTimestamp"] = created;
        if resource.namespaced() {
            metadata["namespace"] = json!(namespace);
        }
        metadata["managedFields"] = json!([{
            "manager": "fake-apiserver",
            "operation": "Update",
            "apiVersion": resource.api_version(),
            "time": now(),
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:metadata": {}},
        }]);
        state.objects.insert(key, object.clone());
        state.publish(resource, kind, object, before);
        version
    }

    /// Deletes an object (`namespace` is ignored for Nodes); watchers see `DELETED` with the
    /// object at the deletion's resourceVersion. None if there was no such object.
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) -> Option<u64> {
        let namespace = if resource.namespaced() { namespace } else { "" };
        let mut state = self.state();
        let mut object =
            state
                .objects
                .remove(&(resource, namespace.to_owned(), name.to_owned()))?;
        let version = state.next_version();
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        state.publish(resource, "DELETED", object, None);
        Some(version)
    }

    /// The stored object, with the fields the server set.
    pub fn object(&self, resource: Resource, namespace: &str, name: &str) -> Option<Value> {
        let namespace = if resource.namespaced() { namespace } else { "" };
        self.state()
            .objects
            .get(&(resource, namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// The current (global) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.state().resource_version
    }

    /// Compacts the history, as etcd does: every open watch gets an `ERROR` event with a 410
    /// `Expired` Status and is closed, and any watch or list continuation from before now gets
    /// the same answer, so clients must relist. Returns how many watches were open.
    pub fn expire(&self) -> usize {
        let mut state = self.state();
        state.compacted = state.resource_version;
        state.history.clear();
        state.pages.clear();
        let line = gone_line(&format!(
            "too old resource version (compacted at {})",
            state.compacted
        ));
        let watches = std::mem::take(&mut state.watches);
        watches
            .iter()
            .filter(|watch| {
                watch.tx.send(WatchMessage::Line(line.clone())).is_ok()
                    && watch.tx.send(WatchMessage::End).is_ok()
            })
            .count()
    }

    /// The next watch request of `resource` is answered with one `ERROR` 410 `Expired` event
    /// (status 200, like a real server whose history no longer holds the requested version).
    pub fn fail_next_watch(&self, resource: Resource) {
        *self.state().fail_next_watch.entry(resource).or_default() += 1;
    }

    /// Delays every list response of `resource` (a slow API server, or a large collection).
    pub fn delay_lists(&self, resource: Resource, delay: Duration) {
        self.state().list_delay.insert(resource, delay);
    }

    /// Breaks every open watch connection mid-stream. Returns how many were open.
    pub fn drop_watches(&self) -> usize {
        let watches = std::mem::take(&mut self.state().watches);
        watches
            .iter()
            .filter(|watch| watch.tx.send(WatchMessage::Abort).is_ok())
            .count()
    }

    /// Sends a `BOOKMARK` at the current resourceVersion to every open watch that allows
    /// bookmarks. Returns how many got one.
    pub fn bookmark(&self) -> usize {
        let mut state = self.state();
        state.watches.retain(|watch| !watch.tx.is_closed());
        let version = state.resource_version.to_string();
        state
            .watches
            .iter()
            .filter(|watch| watch.bookmarks)
            .filter(|watch| {
                let object = json!({
                    "kind": watch.resource.kind(),
                    "apiVersion": watch.resource.api_version(),
                    "metadata": {"resourceVersion": version},
                });
                let line = watch_line("BOOKMARK", &object);
                watch.tx.send(WatchMessage::Line(line)).is_ok()
            })
            .count()
    }

    /// How many watch connections of `resource` are open.
    pub fn open_watches(&self, resource: Resource) -> usize {
        let mut state = self.state();
        state.watches.retain(|watch| !watch.tx.is_closed());
        state
            .watches
            .iter()
            .filter(|watch| watch.resource == resource)
            .count()
    }

    /// Waits until every resource has at least one open watch; false after `timeout`.
    pub async fn wait_for_watches(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if Resource::ALL
                .into_iter()
                .all(|resource| self.open_watches(resource) > 0)
            {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The Events created (and patched) so far, in creation order, both APIs.
    pub fn events(&self) -> Vec<Value> {
        self.state()
            .events
            .iter()
            .map(|(_, event)| event.clone())
            .collect()
    }

    /// Every request so far, as `METHOD /path?query`, in arrival order.
    pub fn requests(&self) -> Vec<String> {
        self.state()
            .requests
            .iter()
            .map(|(request, _)| request.clone())
            .collect()
    }

    /// Every request so far with its `User-Agent` header, in arrival order.
    pub fn user_agents(&self) -> Vec<(String, Option<String>)> {
        self.state().requests.clone()
    }

    /// The next `count` Event creates and patches are answered with a Status of `code`, e.g.
    /// 403 `Forbidden` as a missing RBAC rule gives (`usize::MAX`: all of them).
    pub fn fail_events(&self, count: usize, code: u16, reason: &str, message: &str) {
        self.state().event_failures = Some(InjectedFailure::new(count, code, reason, message));
    }

    /// The next `count` patches of Nodes are answered with a Status of `code`, as
    /// [`Self::fail_events`]; `count` 0 ends the failures.
    pub fn fail_node_patches(&self, count: usize, code: u16, reason: &str, message: &str) {
        self.state().node_patch_failures = Some(InjectedFailure::new(count, code, reason, message));
    }

    /// From now on, each Node patch is reviewed by `policy` as sent by `requester` (the server
    /// authenticates no one: every patch is taken for `requester`'s), and refused with the
    /// policy's Status (403 for its `Forbidden` reasons) when the policy denies it.
    pub fn admit_node_patches(&self, policy: Policy, requester: Requester) {
        self.state().node_admission = Some((policy, requester));
    }

    /// How many Event writes (creates and patches) arrived, failed or not.
    pub fn event_writes(&self) -> usize {
        self.state()
            .requests
            .iter()
            .filter(|(request, _)| {
                (request.starts_with("POST ") || request.starts_with("PATCH "))
                    && request.contains("/events")
            })
            .count()
    }
}

/// A listener on `addr` inside `host`'s namespace (the socket is created there; SO_REUSEADDR,
/// as std sets it, lets [`FakeApiServer::resume`] take the same port again).
fn bind_in(host: &crate::lab::Host, addr: SocketAddr) -> io::Result<TcpListener> {
    let listener = {
        let _inside = host.enter().map_err(io::Error::other)?;
        std::net::TcpListener::bind(addr)?
    };
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// Serves every connection `listener` accepts; aborting the task drops them all.
fn accept(listener: TcpListener, shared: Arc<Mutex<State>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // Dropped with the task: aborts every connection.
        let mut connections = JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            while connections.try_join_next().is_some() {}
            let shared = Arc::clone(&shared);
            connections.spawn(async move {
                let service = service_fn(move |request| handle(Arc::clone(&shared), request));
                // A connection ends with an error when a watch is aborted: expected.
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A test that panicked while holding the lock leaves consistent data: keep serving.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now() -> Value {
    serde_json::to_value(Time(Timestamp::now())).expect("a timestamp serializes")
}

fn uid(version: u64) -> String {
    format!("00000000-0000-4000-8000-{version:012}")
}

/// A kubeconfig whose current context is `server` (no credentials).
pub fn kubeconfig(server: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {server}\n\
         users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    \
         user: fake\ncurrent-context: fake\n"
    )
}

fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object}))
        .expect("a watch event serializes");
    line.push(b'\n');
    Bytes::from(line)
}

fn status_object(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

fn gone_line(message: &str) -> Bytes {
    watch_line(
        "ERROR",
        &status_object(StatusCode::GONE, "Expired", message),
    )
}

fn respond(code: StatusCode, body: &Value) -> Response<Body> {
    let body = serde_json::to_vec(body).expect("a response serializes");
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn failure(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    respond(code, &status_object(code, reason, message))
}

/// A request's target: `/api/v1[/namespaces/{ns}]/{plural}[/{name}]` or the same under
/// `/apis/{group}/{version}`.
struct Target {
    api_version: String,
    namespace: Option<String>,
    plural: String,
    name: Option<String>,
}

fn parse_target(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ((*version).to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", namespace, rest @ ..] if !rest.is_empty() => {
            (Some((*namespace).to_owned()), rest)
        }
        rest => (None, rest),
    };
    let (plural, name) = match rest {
        [plural] => (*plural, None),
        [plural, name] => (*plural, Some((*name).to_owned())),
        _ => return None,
    };
    Some(Target {
        api_version,
        namespace,
        plural: plural.to_owned(),
        name,
    })
}

async fn handle(
    state: Arc<Mutex<State>>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let method = request.method().clone();
    let uri = request.uri().clone();
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let user_agent = request
        .headers()
        .get(hyper::header::USER_AGENT)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    lock(&state)
        .requests
        .push((format!("{method} {uri}"), user_agent));
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) => {
            return Ok(failure(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &error.to_string(),
            ));
        }
    };
    let query: HashMap<String, String> =
        form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let Some(target) = parse_target(uri.path()) else {
        return Ok(failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        ));
    };
    let response = if let Some(resource) = Resource::ALL.into_iter().find(|resource| {
        resource.api_version() == target.api_version && resource.plural() == target.plural
    }) {
        if !resource.namespaced() && target.namespace.is_some() {
            failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            )
        } else if let (&Method::PATCH, Resource::Nodes, Some(name)) =
            (&method, resource, target.name.as_deref())
        {
            let injected = InjectedFailure::take(&mut lock(&state).node_patch_failures);
            injected.unwrap_or_else(|| patch_node(&state, name, &content_type, &body))
        } else if method != Method::GET || target.name.is_some() {
            failure(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "the fake API server only lists and watches this resource (and patches Nodes)",
            )
        } else if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
            watch(&state, resource, target.namespace, &query)
        } else {
            let delay = lock(&state).list_delay.get(&resource).copied();
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            list(&state, resource, target.namespace.as_deref(), &query)
        }
    } else if let Some(api_version) = EVENT_API_VERSIONS
        .into_iter()
        .find(|version| *version == target.api_version && target.plural == "events")
    {
        let injected = InjectedFailure::take(&mut lock(&state).event_failures);
        if let Some(response) = injected {
            return Ok(response);
        }
        match (&method, target.namespace, target.name) {
            (&Method::POST, Some(namespace), None) => {
                create_event(&state, api_version, &namespace, &body)
            }
            (&Method::PATCH, Some(namespace), Some(name)) => {
                patch_event(&state, api_version, &namespace, &name, &content_type, &body)
            }
            _ => failure(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "the fake API server only creates and patches namespaced Events",
            ),
        }
    } else {
        failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        )
    };
    Ok(response)
}

/// Rejects what the fake does not implement rather than silently ignoring it.
fn unsupported(query: &HashMap<String, String>) -> Option<Response<Body>> {
    if query.get("sendInitialEvents").is_some_and(|s| s == "true") {
        return Some(failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "sendInitialEvents (streaming lists) is not supported by the fake API server",
        ));
    }
    None
}

fn list(
    state: &Mutex<State>,
    resource: Resource,
    namespace: Option<&str>,
    query: &HashMap<String, String>,
) -> Response<Body> {
    if let Some(response) = unsupported(query) {
        return response;
    }
    let selector = match Selector::parse(query.get("fieldSelector").map(String::as_str)) {
        Ok(selector) => selector,
        Err(message) => return failure(StatusCode::BAD_REQUEST, "BadRequest", &message),
    };
    let labels = match LabelSelector::parse(query.get("labelSelector").map(String::as_str)) {
        Ok(labels) => labels,
        Err(message) => return failure(StatusCode::BAD_REQUEST, "BadRequest", &message),
    };
    let limit = match query.get("limit").map(|limit| limit.parse::<usize>()) {
        None | Some(Ok(0)) => usize::MAX,
        Some(Ok(limit)) => limit,
        Some(Err(_)) => return failure(StatusCode::BAD_REQUEST, "BadRequest", "invalid limit"),
    };
    let mut state = lock(state);
    let (page_id, offset, version, items) =
        match query.get("continue").filter(|token| !token.is_empty()) {
            Some(token) => {
                let parsed = token.split_once(':').and_then(|(id, offset)| {
                    Some((id.parse().ok()?, offset.parse::<usize>().ok()?))
                });
                let Some((id, offset)) = parsed else {
                    return failure(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "invalid continue token",
                    );
                };
                let Some(page) = state.pages.remove(&id) else {
                    return failure(
                        StatusCode::GONE,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list \
                         result. You can start a new list without the continue parameter.",
                    );
                };
                (id, offset, page.resource_version, page.items)
            }
            None => {
                let items: Vec<Value> = state
                    .objects
                    .iter()
                    .filter(|((kind, object_namespace, _), object)| {
                        *kind == resource
                            && namespace.is_none_or(|namespace| namespace == object_namespace)
                            && selector.matches(object)
                            && labels.matches(object)
                    })
                    .map(|(_, object)| {
                        let mut item = object.clone();
                        if let Some(item) = item.as_object_mut() {
                            item.remove("kind");
                            item.remove("apiVersion");
                        }
                        item
                    })
                    .collect();
                state.next_page += 1;
                (state.next_page, 0, state.resource_version, items)
            }
        };
    let end = offset.saturating_add(limit).min(items.len());
    let page: Vec<Value> = items.get(offset..end).unwrap_or_default().to_vec();
    let mut metadata = json!({"resourceVersion": version.to_string()});
    if end < items.len() {
        metadata["continue"] = json!(format!("{page_id}:{end}"));
        metadata["remainingItemCount"] = json!(items.len() - end);
        state.pages.insert(
            page_id,
            Page {
                resource_version: version,
                items,
            },
        );
    }
    respond(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", resource.kind()),
            "apiVersion": resource.api_version(),
            "metadata": metadata,
            "items": page,
        }),
    )
}

fn watch(
    state: &Mutex<State>,
    resource: Resource,
    namespace: Option<String>,
    query: &HashMap<String, String>,
) -> Response<Body> {
    if let Some(response) = unsupported(query) {
        return response;
    }
    let selector = match Selector::parse(query.get("fieldSelector").map(String::as_str)) {
        Ok(selector) => selector,
        Err(message) => return failure(StatusCode::BAD_REQUEST, "BadRequest", &message),
    };
    let labels = match LabelSelector::parse(query.get("labelSelector").map(String::as_str)) {
        Ok(labels) => labels,
        Err(message) => return failure(StatusCode::BAD_REQUEST, "BadRequest", &message),
    };
    let timeout = match query.get("timeoutSeconds").map(|t| t.parse::<u64>()) {
        None => Duration::from_secs(1800),
        Some(Ok(seconds)) => Duration::from_secs(seconds),
        Some(Err(_)) => {
            return failure(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "invalid timeoutSeconds",
            );
        }
    };
    let from = match query
        .get("resourceVersion")
        .map(String::as_str)
        .filter(|version| !version.is_empty() && *version != "0")
        .map(str::parse::<u64>)
    {
        None => None,
        Some(Ok(version)) => Some(version),
        Some(Err(_)) => {
            return failure(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "invalid resourceVersion",
            );
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let watch = Watch {
        resource,
        namespace,
        selector,
        labels,
        bookmarks: query
            .get("allowWatchBookmarks")
            .is_some_and(|b| b == "true"),
        tx,
    };
    let mut state = lock(state);
    let send = |message| {
        // The receiver is in hand: the send cannot fail.
        let _ = watch.tx.send(message);
    };
    let failing = state.fail_next_watch.get_mut(&resource);
    if let Some(count) = failing.filter(|count| **count > 0) {
        *count -= 1;
        send(WatchMessage::Line(gone_line(
            "too old resource version (injected by the test)",
        )));
        send(WatchMessage::End);
    } else if let Some(from) = from {
        if from < state.compacted {
            send(WatchMessage::Line(gone_line(&format!(
                "too old resource version: {from} ({})",
                state.compacted
            ))));
            send(WatchMessage::End);
        } else {
            for change in &state.history {
                if change.resource_version > from
                    && let Some(kind) = watch.sees(change)
                {
                    send(WatchMessage::Line(watch_line(kind, &change.object)));
                }
            }
            state.watches.push(watch);
        }
    } else {
        // No resourceVersion (or 0): the current state as ADDED events, then changes.
        for ((kind, _, _), object) in &state.objects {
            if watch.wants(*kind, object) {
                send(WatchMessage::Line(watch_line("ADDED", object)));
            }
        }
        state.watches.push(watch);
    }
    drop(state);
    let deadline = tokio::time::Instant::now() + timeout;
    let stream = futures::stream::unfold(Some(rx), move |rx| async move {
        let mut rx = rx?;
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(WatchMessage::Line(line))) => Some((Ok(Frame::data(line)), Some(rx))),
            Ok(Some(WatchMessage::Abort)) => Some((
                Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "watch connection dropped by the fake API server",
                )),
                None,
            )),
            Ok(Some(WatchMessage::End) | None) | Err(_) => None,
        }
    });
    let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn create_event(
    state: &Mutex<State>,
    api_version: &'static str,
    namespace: &str,
    body: &[u8],
) -> Response<Body> {
    let mut event: Value = match serde_json::from_slice(body) {
        Ok(event @ Value::Object(_)) => event,
        _ => {
            return failure(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the body is not a JSON object",
            );
        }
    };
    if event.get("apiVersion").and_then(Value::as_str) != Some(api_version)
        || event.get("kind").and_then(Value::as_str) != Some("Event")
    {
        return failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("expected kind Event of {api_version}"),
        );
    }
    let metadata = event
        .as_object_mut()
        .expect("checked above")
        .entry("metadata")
        .or_insert_with(|| json!({}));
    if meta_namespace(metadata).is_some_and(|given| given != namespace) {
        return failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the namespace of the provided object does not match the namespace sent on the request",
        );
    }
    let mut state = lock(state);
    let version = state.next_version();
    let name = match (
        metadata.get("name").and_then(Value::as_str),
        metadata.get("generateName").and_then(Value::as_str),
    ) {
        (Some(name), _) => name.to_owned(),
        (None, Some(prefix)) => format!("{prefix}{version:05}"),
        (None, None) => {
            return failure(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "metadata.name: Required value",
            );
        }
    };
    let exists = state.events.iter().any(|(version, existing)| {
        *version == api_version
            && meta_str(existing, "namespace") == Some(namespace)
            && meta_str(existing, "name") == Some(name.as_str())
    });
    if exists {
        return failure(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("events {name:?} already exists"),
        );
    }
    metadata["name"] = json!(name);
    metadata["namespace"] = json!(namespace);
    metadata["resourceVersion"] = json!(version.to_string());
    metadata["uid"] = json!(uid(version));
    metadata["creationTimestamp"] = now();
    state.events.push((api_version, event.clone()));
    respond(StatusCode::CREATED, &event)
}

fn meta_namespace(metadata: &Value) -> Option<&str> {
    metadata
        .get("namespace")
        .and_then(Value::as_str)
        .filter(|namespace| !namespace.is_empty())
}

fn patch_event(
    state: &Mutex<State>,
    api_version: &'static str,
    namespace: &str,
    name: &str,
    content_type: &str,
    body: &[u8],
) -> Response<Body> {
    let patch = match merge_patch_of(content_type, body) {
        Ok(patch) => patch,
        Err(refused) => return *refused,
    };
    let mut state = lock(state);
    let version = state.next_version();
    let Some((_, event)) = state.events.iter_mut().find(|(version, existing)| {
        *version == api_version
            && meta_str(existing, "namespace") == Some(namespace)
            && meta_str(existing, "name") == Some(name)
    }) else {
        return failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("events {name:?} not found"),
        );
    };
    let identity = (
        event["metadata"].clone(),
        event["apiVersion"].clone(),
        event["kind"].clone(),
    );
    merge_patch(event, &patch);
    // What a patch cannot change.
    for field in ["name", "namespace", "uid", "creationTimestamp"] {
        event["metadata"][field] = identity.0[field].clone();
    }
    event["apiVersion"] = identity.1;
    event["kind"] = identity.2;
    event["metadata"]["resourceVersion"] = json!(version.to_string());
    let event = event.clone();
    respond(StatusCode::OK, &event)
}

/// `PATCH /api/v1/nodes/{name}` with a JSON merge patch: the stored Node patched (its identity
/// kept), its resourceVersion bumped, watchers told `MODIFIED`.
fn patch_node(state: &Mutex<State>, name: &str, content_type: &str, body: &[u8]) -> Response<Body> {
    let patch = match merge_patch_of(content_type, body) {
        Ok(patch) => patch,
        Err(refused) => return *refused,
    };
    let mut state = lock(state);
    let key = (Resource::Nodes, String::new(), name.to_owned());
    let Some(before) = state.objects.get(&key).cloned() else {
        return failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("nodes {name:?} not found"),
        );
    };
    let version = state.next_version();
    let mut node = before.clone();
    merge_patch(&mut node, &patch);
    // What a patch cannot change.
    for field in ["name", "uid", "creationTimestamp"] {
        node["metadata"][field] = before["metadata"][field].clone();
    }
    node["apiVersion"] = before["apiVersion"].clone();
    node["kind"] = before["kind"].clone();
    if let Some((policy, requester)) = &state.node_admission
        && let Verdict::Denied { message, reason } =
            policy.review_update("nodes", requester, &before, &node)
    {
        let code = match reason.as_str() {
            "Forbidden" => StatusCode::FORBIDDEN,
            "InternalError" => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        return failure(code, &reason, &message);
    }
    node["metadata"]["resourceVersion"] = json!(version.to_string());
    state.objects.insert(key, node.clone());
    state.publish(Resource::Nodes, "MODIFIED", node.clone(), Some(before));
    respond(StatusCode::OK, &node)
}

/// A request's body as a JSON merge patch, or the refusal the API server answers: the only
/// kind of patch the fake takes.
fn merge_patch_of(content_type: &str, body: &[u8]) -> Result<Value, Box<Response<Body>>> {
    if content_type != "application/merge-patch+json" {
        return Err(Box::new(failure(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            &format!("the fake API server only takes JSON merge patches, not {content_type:?}"),
        )));
    }
    serde_json::from_slice::<Value>(body).map_err(|_| {
        Box::new(failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not JSON",
        ))
    })
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target) = target else {
        return;
    };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}
