//! The Kubernetes API server as a source: kube-runtime watchers and reflectors on v1 Service and
//! discovery.k8s.io/v1 EndpointSlice (all namespaces) and on v1 Node (this agent's own, and
//! every Node's addresses for direct server return).
//!
//! - [`client`] builds the client from kube-proxy's flags (`--master`, `--kubeconfig`); every
//!   request carries the User-Agent [`USER_AGENT`].
//! - Services and EndpointSlices are watched with kube-proxy's label selector
//!   ([`PROXIED_SELECTOR`]); every list is served from the API server's watch cache
//!   (`resourceVersion=0`), as kube-proxy's informers list.
//! - [`KubeSource`] publishes a [`Snapshot`] once all three reflectors hold a complete list, then
//!   after each burst of changes, coalesced ([`QUIET`], [`MAX_DELAY`]). Errors never end it: the
//!   watchers retry with [`RetryBackoff`] (at most a second apart, so changes made during an API
//!   server outage arrive within seconds of its return), resume a dropped watch from the last resource
//!   version, and relist after `410 Gone`. A relist replaces a store only once it is complete,
//!   so no snapshot ever holds half a list.
//! - [`EventRecorder`] reports objects the agent has to skip as Kubernetes Events, about the
//!   object's full reference ([`object_reference`]), retrying refused writes.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;
use futures::{Stream, StreamExt as _, stream::BoxStream};
use k8s_openapi::{
    api::{
        core::v1::{Node, ObjectReference, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Config, Resource, ResourceExt as _,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, Store},
        watcher,
    },
};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use serde::de::DeserializeOwned;
use tokio::{sync::watch, time::Instant};
use tracing::{debug, info, warn};

use super::Snapshot;

/// A burst of changes ends when no event arrived for this long; then a snapshot is published.
pub const QUIET: Duration = Duration::from_millis(50);
/// Under a continuous stream of changes, a snapshot is still published at least this often.
pub const MAX_DELAY: Duration = Duration::from_millis(500);

/// What the agent calls itself in every request (the API server's audit log and metrics).
pub const USER_AGENT: &str = concat!("lb/", env!("CARGO_PKG_VERSION"));

/// kube-proxy's label selector for Services and EndpointSlices, applied by the API server:
/// Services labelled `service.kubernetes.io/service-proxy-name` belong to another proxy, and
/// the EndpointSlice controller labels a headless Service's slices
/// `service.kubernetes.io/headless` (it copies a Service's labels to its slices, so another
/// proxy's slices carry its label too). None of them is programmed, so none is sent.
pub const PROXIED_SELECTOR: &str =
    "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name";

/// A client for the API server, from kube-proxy's flags.
///
/// - `kubeconfig`: the kubeconfig file to load (its current context);
/// - without it, the in-cluster configuration (service-account token and CA), else the default
///   kubeconfig (`$KUBECONFIG`, `~/.kube/config`);
/// - `master` overrides the server address of whichever configuration was loaded. The agent
///   serves the `kubernetes` Service VIP itself, so in a cluster it must be given the API
///   server's real address. Unlike kube-proxy, `--master` alone keeps the in-cluster credentials
///   (they are what a DaemonSet has); it stands alone (no credentials, plain URL) only where no
///   other configuration exists, e.g. `--master http://127.0.0.1:8080`. A URL without a scheme
///   gets `https://`.
pub async fn client(master: Option<&str>, kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let master = master.map(master_url).transpose()?;
    let mut config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => inferred_config(master.as_ref()).await?,
    };
    if let Some(master) = master {
        config.cluster_url = master;
    }
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(USER_AGENT),
    ));
    info!(server = %config.cluster_url, user_agent = USER_AGENT, "Kubernetes API server");
    Client::try_from(config).context("building the Kubernetes client")
}

/// `--master` as the client's URL type (`https://` added when no scheme is given).
fn master_url(master: &str) -> anyhow::Result<http::Uri> {
    let url = if master.contains("://") {
        master.to_owned()
    } else {
        format!("https://{master}")
    };
    url.parse()
        .with_context(|| format!("--master {master:?} is not a URL"))
}

/// In-cluster, else the default kubeconfig, else (with `--master` only) a bare URL.
async fn inferred_config(master: Option<&http::Uri>) -> anyhow::Result<Config> {
    // With --master the KUBERNETES_SERVICE_* variables are not needed (and name the VIP this
    // agent serves): only the service account's files are.
    let in_cluster = match master {
        Some(_) => Config::incluster_dns(),
        None => Config::incluster(),
    };
    let in_cluster_error = match in_cluster {
        Ok(config) => return Ok(config),
        Err(error) => error,
    };
    debug!(error = %in_cluster_error, "no in-cluster configuration");
    match Config::from_kubeconfig(&KubeConfigOptions::default()).await {
        Ok(config) => Ok(config),
        Err(kubeconfig_error) => match master {
            Some(master) => {
                info!("neither in-cluster nor kubeconfig credentials: using --master alone");
                Ok(Config::new(master.clone()))
            }
            None => Err(anyhow::anyhow!(
                "no Kubernetes configuration: not in a cluster ({in_cluster_error}) and no \
                 kubeconfig ({kubeconfig_error}); give --kubeconfig or --master"
            )),
        },
    }
}

/// What the agent watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Services = 0,
    EndpointSlices = 1,
    Node = 2,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Services => "services",
            Self::EndpointSlices => "endpointslices",
            Self::Node => "node",
        })
    }
}

/// A watcher event without its object (the object is in the store by then).
#[derive(Debug)]
enum Notice {
    /// A (re)list started.
    Init,
    /// An object of a list in progress (not in the store until the list is done).
    InitApply,
    /// A list completed and replaced the store.
    InitDone,
    /// An object was added, changed or deleted in the store.
    Changed,
    Error(watcher::Error),
}

/// One kind's reflector: the store and the stream that fills it (polled by [`KubeSource::run`]).
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    trim: fn(&mut K),
) -> (
    Store<K>,
    impl Stream<Item = (Kind, Notice)> + Send + 'static,
)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync,
    K: 'static,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, config)
        .backoff(RetryBackoff::default())
        .modify(move |object| {
            object.managed_fields_mut().clear();
            trim(object);
        })
        .reflect(writer)
        .map(move |result| {
            let notice = match result {
                Ok(watcher::Event::Init) => Notice::Init,
                Ok(watcher::Event::InitApply(_)) => Notice::InitApply,
                Ok(watcher::Event::InitDone) => Notice::InitDone,
                Ok(watcher::Event::Apply(object)) => {
                    debug!(%kind, name = %object.name_any(), namespace = ?object.namespace(), "applied");
                    Notice::Changed
                }
                Ok(watcher::Event::Delete(object)) => {
                    debug!(%kind, name = %object.name_any(), namespace = ?object.namespace(), "deleted");
                    Notice::Changed
                }
                Err(error) => Notice::Error(error),
            };
            (kind, notice)
        });
    (store, stream)
}

/// The watchers' retry delays: 200 ms, doubling up to [`RetryBackoff::MAX`], each shortened
/// by up to half at random so that the nodes of a cluster do not retry in step; back to the
/// start after a success. kube's default (client-go's reflector's: 800 ms doubling up to 30 s)
/// left an agent up to 30 s behind an API server that had been away for a minute, with every
/// change made meanwhile waiting (the API server outage of docs/reliability.md measured 24 s).
/// A retry against an absent server costs one refused connection a second per watcher.
pub struct RetryBackoff {
    next: Duration,
    jitter: std::collections::hash_map::RandomState,
    retries: u64,
}

impl RetryBackoff {
    pub const FIRST: Duration = Duration::from_millis(200);
    pub const MAX: Duration = Duration::from_secs(1);
}

impl Default for RetryBackoff {
    fn default() -> Self {
        Self {
            next: Self::FIRST,
            jitter: std::collections::hash_map::RandomState::new(),
            retries: 0,
        }
    }
}

impl Iterator for RetryBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        use std::hash::BuildHasher as _;
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        self.retries += 1;
        // A random fraction in [0, 1/2) of the delay, from a per-process random hash key.
        let random = self.jitter.hash_one(self.retries) % 1024;
        Some(delay - delay.mul_f64(random as f64 / 2048.0))
    }
}

impl kube::runtime::utils::Backoff for RetryBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Lists served from the API server's watch cache (`resourceVersion=0`), then a watch from the
/// list's version, as kube-proxy's informers do: no quorum read of etcd per list and per page
/// on every start and relist of every node. The list is not paged: kube sends no
/// `resourceVersion=0` with a `limit` (the watch cache long ignored `limit` for it), and the
/// cache holds the whole collection anyway.
fn from_watch_cache() -> watcher::Config {
    let mut config = watcher::Config::default().any_semantic();
    config.page_size = None;
    config
}

/// Whether a watcher error is the API server's `410 Gone` (the watcher relists next).
fn is_gone(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::WatchError(status) => status.code == 410,
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => status.code == 410,
        _ => false,
    }
}

/// The Kubernetes source. See the module documentation.
pub struct KubeSource {
    client: Client,
    node_name: String,
}

impl KubeSource {
    /// `node_name` selects this agent's Node (`metadata.name`).
    pub fn new(client: Client, node_name: String) -> Self {
        Self { client, node_name }
    }

    /// Watches until `updates` has no receiver left, publishing snapshots as described in the
    /// module documentation. Errors of the API server are logged and retried, never returned.
    pub async fn run(self, updates: watch::Sender<Snapshot>) -> anyhow::Result<()> {
        let (services, services_stream) = reflect(
            Api::<Service>::all(self.client.clone()),
            from_watch_cache().labels(PROXIED_SELECTOR),
            Kind::Services,
            |_| {},
        );
        let (slices, slices_stream) = reflect(
            Api::<EndpointSlice>::all(self.client.clone()),
            from_watch_cache().labels(PROXIED_SELECTOR),
            Kind::EndpointSlices,
            |_| {},
        );
        // Every Node: their addresses are what a DSR option naming a NodePort may name.
        let (nodes, nodes_stream) = reflect(
            Api::<Node>::all(self.client.clone()),
            from_watch_cache(),
            Kind::Node,
            trim_node,
        );
        let mut notices = futures::stream::select_all([
            services_stream.boxed(),
            slices_stream.boxed(),
            nodes_stream.boxed(),
        ]
            as [BoxStream<'static, (Kind, Notice)>; 3]);

        let stores = Stores {
            services,
            slices,
            nodes,
            node_name: self.node_name,
        };
        // Per kind: whether its store holds a complete list, and whether it ever did.
        let mut listed = [false; 3];
        // (first, last) unpublished change.
        let mut pending: Option<(Instant, Instant)> = None;
        let mut published = false;
        loop {
            let deadline = pending
                .filter(|_| listed.iter().all(|listed| *listed))
                .map(|(first, last)| (last + QUIET).min(first + MAX_DELAY));
            tokio::select! {
                biased;
                () = updates.closed() => return Ok(()),
                () = sleep_until(deadline), if deadline.is_some() => {
                    pending = None;
                    let snapshot = stores.snapshot();
                    let first = !published;
                    published = true;
                    let sent = updates.send_if_modified(|current| {
                        if !first && same(current, &snapshot) {
                            return false;
                        }
                        *current = snapshot;
                        true
                    });
                    if sent {
                        debug!("published a snapshot");
                    }
                }
                notice = notices.next() => {
                    let Some((kind, notice)) = notice else {
                        anyhow::bail!("the Kubernetes watch streams ended");
                    };
                    let changed = match notice {
                        Notice::Init => {
                            if listed[kind as usize] {
                                info!(%kind, "relisting");
                            } else {
                                info!(%kind, "listing");
                            }
                            false
                        }
                        Notice::InitApply => false,
                        Notice::InitDone => {
                            listed[kind as usize] = true;
                            info!(%kind, objects = stores.len(kind), "listed");
                            true
                        }
                        Notice::Changed => true,
                        Notice::Error(error) if is_gone(&error) => {
                            info!(%kind, %error, "resource version expired (410 Gone): relisting");
                            false
                        }
                        Notice::Error(error) => {
                            warn!(%kind, %error, "watch failed: retrying with backoff");
                            false
                        }
                    };
                    if changed {
                        let now = Instant::now();
                        pending = Some((pending.map_or(now, |(first, _)| first), now));
                    }
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Whether two snapshots hold the same objects: the same shared object is the same without a
/// look inside (a store keeps an unchanged object's Arc), else they are compared.
fn same(a: &Snapshot, b: &Snapshot) -> bool {
    fn same_objects<K: PartialEq>(a: &[Arc<K>], b: &[Arc<K>]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(a, b)| Arc::ptr_eq(a, b) || a == b)
    }
    same_objects(&a.services, &b.services)
        && same_objects(&a.endpoint_slices, &b.endpoint_slices)
        && a.node == b.node
        && a.node_addresses == b.node_addresses
        && a.direct_return_nodes == b.direct_return_nodes
}

/// What the agent keeps of a Node: all but its images and the volumes in use, which can make up
/// most of its bytes, times every Node of the cluster.
fn trim_node(node: &mut Node) {
    if let Some(status) = node.status.as_mut() {
        status.images = None;
        status.volumes_attached = None;
        status.volumes_in_use = None;
    }
}

/// The three reflectors' stores.
struct Stores {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    node_name: String,
}

impl Stores {
    fn len(&self, kind: Kind) -> usize {
        match kind {
            Kind::Services => self.services.len(),
            Kind::EndpointSlices => self.slices.len(),
            Kind::Node => self.nodes.len(),
        }
    }

    /// Everything the stores hold, sorted by namespace and name.
    fn snapshot(&self) -> Snapshot {
        let nodes = self.nodes.state();
        Snapshot {
            services: sorted(&self.services),
            endpoint_slices: sorted(&self.slices),
            node: nodes
                .iter()
                .find(|node| node.metadata.name.as_deref() == Some(self.node_name.as_str()))
                .map(|node| (**node).clone()),
            node_addresses: nodes
                .iter()
                .flat_map(|node| super::addresses_of(node))
                .collect(),
            direct_return_nodes: super::direct_return_nodes(nodes.iter().map(|node| &**node)),
        }
    }
}

fn sorted<K>(store: &Store<K>) -> Vec<Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let mut objects = store.state();
    objects.sort_by(|a, b| {
        (a.meta().namespace.as_deref(), a.meta().name.as_deref())
            .cmp(&(b.meta().namespace.as_deref(), b.meta().name.as_deref()))
    });
    objects
}

/// The `action` of the agent's Events: what it was doing when it had to skip the object.
pub const EVENT_ACTION: &str = "Program";
/// The API's limit on an Event's action (events.k8s.io/v1, `action`: 128 characters).
const MAX_EVENT_ACTION_LEN: usize = 128;
/// events.k8s.io/v1 rejects a `note` longer than this (bytes).
const MAX_NOTE: usize = 1024;

/// How a failed Event write is tried again: `attempts` in all, the first retry after
/// `first_delay`, each later one after twice the previous delay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventRetry {
    pub attempts: u32,
    pub first_delay: Duration,
}

/// Five attempts over about 4 s: enough to ride out an API server restart or a brief overload
/// (and an RBAC rule created just after the agent), short enough not to pile up Events.
pub const EVENT_RETRY: EventRetry = EventRetry {
    attempts: 5,
    first_delay: Duration::from_millis(250),
};

/// The full reference to an object, as `kubectl describe` matches an Event's `regarding` to it:
/// by uid (with apiVersion, kind, namespace, name and the resourceVersion the agent saw).
pub fn object_reference(api_version: &str, kind: &str, metadata: &ObjectMeta) -> ObjectReference {
    ObjectReference {
        api_version: Some(api_version.to_owned()),
        kind: Some(kind.to_owned()),
        namespace: metadata.namespace.clone(),
        name: metadata.name.clone(),
        uid: metadata.uid.clone(),
        resource_version: metadata.resource_version.clone(),
        field_path: None,
    }
}

/// Keeps this node's DSR mark ([`super::DIRECT_RETURN_MARK`]: the boot ID it takes DSR options
/// in) on its Node, so that the other nodes' agents send flows to its endpoints by direct server
/// return. Written with a JSON merge patch of the annotation alone (RBAC: `patch` on nodes)
/// when the Node lacks it or names another boot, after a sync; while the Node still lacks it,
/// tried again [`MARK_RETRY`] after the last write began ([`Self::due`]: a write that failed
/// brings no change of the Node, hence no sync). What it sees is in [`MarkMetrics`].
pub struct DirectReturnMark {
    nodes: Api<Node>,
    node_name: String,
    boot_id: String,
    last_try: Option<std::time::Instant>,
    due: Option<std::time::Instant>,
    writing: Option<tokio::task::JoinHandle<()>>,
    metrics: MarkMetrics,
    failed_in_a_row: Arc<std::sync::atomic::AtomicU64>,
}

/// How long after a mark's write the next may start, when the Node still lacks it.
pub const MARK_RETRY: Duration = Duration::from_secs(5);

/// Of a run of failed writes of the mark, the first and every this many are logged as warnings
/// (once a minute at [`MARK_RETRY`]); the counter counts each.
const MARK_FAILURES_PER_WARNING: u64 = 12;

/// What an operator sees of this node's DSR mark (`lb_dsr_mark_missing`,
/// `lb_dsr_mark_write_failures_total`).
#[derive(Clone, Default)]
pub struct MarkMetrics {
    /// 1 while this node's Node, as the source last saw it, lacks the mark of this boot.
    pub missing: Gauge,
    /// Writes of the mark that failed (the API server refused them or could not be reached).
    pub write_failures: Counter,
}

impl DirectReturnMark {
    pub fn new(client: Client, node_name: &str, boot_id: &str) -> Self {
        Self {
            nodes: Api::all(client),
            node_name: node_name.to_owned(),
            boot_id: boot_id.to_owned(),
            last_try: None,
            due: None,
            writing: None,
            metrics: MarkMetrics::default(),
            failed_in_a_row: Arc::default(),
        }
    }

    /// Reports the mark's state and failed writes in `metrics`.
    pub fn with_metrics(mut self, metrics: MarkMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// When [`Self::ensure`] is to look again: the Node lacked the mark at its last look.
    pub fn due(&self) -> Option<std::time::Instant> {
        self.due
    }

    /// Writes the mark when `node` (this node's Node, as the source last saw it) lacks it, unless
    /// a write is under way or one began less than [`MARK_RETRY`] ago (then [`Self::due`] says
    /// when to look again). Without a Node object there is nothing to mark.
    pub fn ensure(&mut self, node: Option<&Node>) {
        self.due = None;
        let marked =
            node.is_some_and(|node| super::direct_return_mark(node) == Some(self.boot_id.as_str()));
        self.metrics.missing.set(i64::from(!marked));
        if marked || node.is_none() {
            return;
        }
        let now = std::time::Instant::now();
        let writing = self
            .writing
            .as_ref()
            .is_some_and(|task| !task.is_finished());
        if writing {
            self.due = Some(now + MARK_RETRY);
            return;
        }
        if let Some(last_try) = self.last_try
            && now < last_try + MARK_RETRY
        {
            self.due = Some(last_try + MARK_RETRY);
            return;
        }
        self.last_try = Some(now);
        self.due = Some(now + MARK_RETRY);
        let (nodes, name, boot_id) = (
            self.nodes.clone(),
            self.node_name.clone(),
            self.boot_id.clone(),
        );
        let (write_failures, failed_in_a_row) = (
            self.metrics.write_failures.clone(),
            self.failed_in_a_row.clone(),
        );
        self.writing = Some(tokio::spawn(async move {
            use std::sync::atomic::Ordering::Relaxed;
            match patch_mark(&nodes, &name, Some(&boot_id)).await {
                Ok(_) => {
                    let failed_writes = failed_in_a_row.swap(0, Relaxed);
                    info!(node = %name, %boot_id, failed_writes, "marked this node as taking DSR options");
                }
                Err(error) => {
                    write_failures.inc();
                    let failed_writes = failed_in_a_row.fetch_add(1, Relaxed) + 1;
                    if failed_writes % MARK_FAILURES_PER_WARNING == 1 {
                        warn!(
                            node = %name,
                            %error,
                            failed_writes,
                            "this node's DSR mark was not written; other nodes send its endpoints' flows by SNAT until it is (tried again every 5 s, warned once a minute)"
                        );
                    }
                }
            }
        }));
    }
}

/// Removes this node's DSR mark from its Node (a JSON merge patch of the annotation alone, as
/// [`DirectReturnMark`] writes it), so that the other nodes send its endpoints' flows by SNAT:
/// `lb run --cleanup`, before it detaches the XDP that takes the options.
pub async fn remove_direct_return_mark(client: Client, node_name: &str) -> anyhow::Result<()> {
    patch_mark(&Api::all(client), node_name, None)
        .await
        .context("patching the Node")?;
    Ok(())
}

/// Sets a Node's DSR mark to `boot_id`, or removes it: a JSON merge patch of the annotation
/// alone (RBAC: `patch` on nodes).
async fn patch_mark(
    nodes: &Api<Node>,
    node_name: &str,
    boot_id: Option<&str>,
) -> kube::Result<Node> {
    let patch = serde_json::json!({
        "metadata": {"annotations": {super::DIRECT_RETURN_MARK: boot_id}}
    });
    nodes
        .patch(
            node_name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
}

/// Records Kubernetes Events (events.k8s.io/v1, through kube's [`Recorder`]) about objects the
/// agent has to skip, and what its health checks see. Repeats of the same reason for the
/// same, unchanged object within kube's cache window (6 minutes) update one Event's
/// `series.count` rather than creating new Events;
/// the Recorder matches the whole object reference, resourceVersion included, so a problem that
/// comes back after its object changed gets a new Event. A write the
/// API server refuses is tried again ([`EventRetry`]); one that never succeeds is counted in
/// the failure counter ([`Self::with_failure_counter`]) and returned as an error that carries
/// the API server's answer (status code, reason and message).
#[derive(Clone)]
pub struct EventRecorder {
    recorder: Recorder,
    retry: EventRetry,
    failures: Counter,
}

impl EventRecorder {
    /// `component` is the reporting controller (e.g. `lb`); `node_name` the reporting instance.
    pub fn new(client: Client, component: &str, node_name: &str) -> Self {
        let reporter = Reporter {
            controller: component.to_owned(),
            instance: Some(node_name.to_owned()),
        };
        Self {
            recorder: Recorder::new(client, reporter),
            retry: EVENT_RETRY,
            failures: Counter::default(),
        }
    }

    /// Retries as given instead of [`EVENT_RETRY`].
    #[must_use]
    pub fn with_retry(mut self, retry: EventRetry) -> Self {
        self.retry = retry;
        self
    }

    /// Counts each Event given up on in `failures` (e.g. a metric's counter).
    #[must_use]
    pub fn with_failure_counter(mut self, failures: Counter) -> Self {
        self.failures = failures;
        self
    }

    /// How many Events were given up on so far.
    pub fn failures(&self) -> u64 {
        self.failures.get()
    }

    /// A Warning Event about `object` (see [`object_reference`]), in its namespace (`default`
    /// for cluster-scoped objects). `message` longer than the API allows is truncated.
    pub async fn warn(
        &self,
        object: &ObjectReference,
        reason: &str,
        message: &str,
    ) -> anyhow::Result<()> {
        self.publish(EventType::Warning, object, reason, message)
            .await
    }

    /// An Event of either type (a Normal one says, e.g., that what a Warning said is over),
    /// as [`Self::warn`] records a Warning one.
    pub async fn publish(
        &self,
        type_: EventType,
        object: &ObjectReference,
        reason: &str,
        message: &str,
    ) -> anyhow::Result<()> {
        self.publish_as(type_, object, reason, message, EVENT_ACTION)
            .await
    }

    /// As [`Self::publish`], with an action of its own. The recorder merges an Event into an
    /// earlier one of the same object, type, reason and action within minutes (counting it,
    /// keeping the first note): Events about different parts of one object (its endpoints)
    /// need different actions to be seen apart.
    pub async fn publish_as(
        &self,
        type_: EventType,
        object: &ObjectReference,
        reason: &str,
        message: &str,
        action: &str,
    ) -> anyhow::Result<()> {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(truncated_note(message)),
            action: action.chars().take(MAX_EVENT_ACTION_LEN).collect(),
            secondary: None,
        };
        let mut delay = self.retry.first_delay;
        let mut attempt = 1;
        loop {
            let error = match self.recorder.publish(&event, object).await {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            if attempt >= self.retry.attempts.max(1) {
                self.failures.inc();
                anyhow::bail!(
                    "recording event {reason} for {} {}/{} failed {attempt} times; the API \
                     server answered: {}",
                    object.kind.as_deref().unwrap_or("object"),
                    object.namespace.as_deref().unwrap_or(""),
                    object.name.as_deref().unwrap_or(""),
                    api_error(&error)
                );
            }
            debug!(
                reason,
                object = ?object.name,
                attempt,
                error = %api_error(&error),
                retry_in = ?delay,
                "Event not recorded: retrying"
            );
            tokio::time::sleep(delay).await;
            delay = delay.saturating_mul(2);
            attempt += 1;
        }
    }
}

/// `message` cut to what events.k8s.io/v1 accepts as a note.
fn truncated_note(message: &str) -> String {
    let mut note = message.to_owned();
    if note.len() > MAX_NOTE {
        let mut end = MAX_NOTE - '…'.len_utf8();
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push('…');
    }
    note
}

/// What the API server said: `403 Forbidden: events.events.k8s.io is forbidden: ...`, or the
/// transport error with its causes.
fn api_error(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => {
            format!("{} {}: {}", status.code, status.reason, status.message)
        }
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::utils::Backoff as _;

    use super::RetryBackoff;

    #[test]
    fn retries_are_never_more_than_a_second_apart_and_start_over_after_a_success() {
        let mut backoff = RetryBackoff::default();
        let delays: Vec<_> = backoff.by_ref().take(100).collect();
        assert!(
            delays.iter().all(|delay| *delay <= RetryBackoff::MAX),
            "{delays:?}"
        );
        assert!(delays[0] <= RetryBackoff::FIRST, "{delays:?}");
        assert!(delays[0] > RetryBackoff::FIRST / 2, "{delays:?}");
        assert!(
            delays[10..]
                .iter()
                .all(|delay| *delay > RetryBackoff::MAX / 2),
            "{delays:?}"
        );
        backoff.reset();
        assert!(backoff.next().expect("endless") <= RetryBackoff::FIRST);
    }
}
