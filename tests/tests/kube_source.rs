//! The Kubernetes source through the real kube client against the fake API server
//! (`lab::fake_apiserver`, a mock: no API server can run here): initial snapshot, changes,
//! every Node's addresses and this node's object, 410 Gone, dropped connections, bookmarks, coalescing, managed fields,
//! kube-proxy's label selector, lists from the watch cache, the User-Agent, Events (full
//! reference, retries, failures counted), and the flags that build the client.
//!
//! Every wait has a deadline, so a broken source fails a test within seconds instead of hanging.

use std::{
    collections::BTreeMap,
    future::Future,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use k8s_openapi::{
    api::{
        core::v1::{
            Node, NodeAddress, NodeStatus, ObjectReference, Service, ServicePort, ServiceSpec,
        },
        discovery::v1::{Endpoint, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use lab::fake_apiserver::{FakeApiServer, Resource, kubeconfig};
use lb_userspace::source::{
    Snapshot,
    kube::{
        EventRecorder, EventRetry, KubeSource, PROXIED_SELECTOR, USER_AGENT, client,
        object_reference,
    },
};
use tokio::{sync::watch, task::JoinHandle, time::timeout};

const NODE: &str = "node-a";
/// How long a wait for an expected snapshot may take: generous for the watcher's backoff
/// (0.8 s to 1.6 s after an error) on a loaded 2-core machine, short enough to fail fast.
const WAIT: Duration = Duration::from_secs(10);
/// A whole test never runs longer than this.
const TEST: Duration = Duration::from_secs(60);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Runs a test body with an overall deadline.
async fn bounded(body: impl Future<Output = ()>) {
    init_tracing();
    timeout(TEST, body).await.expect("the test timed out");
}

fn meta(namespace: Option<&str>, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: namespace.map(Into::into),
        ..ObjectMeta::default()
    }
}

fn service(namespace: &str, name: &str, cluster_ip: &str, port: i32) -> Service {
    Service {
        metadata: meta(Some(namespace), name),
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip.into()),
            cluster_ips: Some(vec![cluster_ip.into()]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port,
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            type_: Some("ClusterIP".into()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn slice(namespace: &str, name: &str, service: &str, addresses: &[&str]) -> EndpointSlice {
    let mut metadata = meta(Some(namespace), name);
    metadata.labels = Some(BTreeMap::from([(
        "kubernetes.io/service-name".to_owned(),
        service.to_owned(),
    )]));
    EndpointSlice {
        metadata,
        address_type: "IPv4".into(),
        endpoints: addresses
            .iter()
            .map(|address| Endpoint {
                addresses: vec![(*address).to_owned()],
                ..Endpoint::default()
            })
            .collect(),
        ports: None,
    }
}

fn node(name: &str, address: &str) -> Node {
    Node {
        metadata: meta(None, name),
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: address.into(),
            }]),
            ..NodeStatus::default()
        }),
        ..Node::default()
    }
}

/// The objects every test starts with: two Services with a slice each, this node and another.
fn seed(server: &FakeApiServer) {
    server.apply(service("default", "web", "10.96.0.10", 80));
    server.apply(service("shop", "cart", "10.96.0.11", 8080));
    server.apply(slice("default", "web-abc", "web", &["10.244.1.2"]));
    server.apply(slice(
        "shop",
        "cart-xyz",
        "cart",
        &["10.244.2.3", "10.244.2.4"],
    ));
    server.apply(node(NODE, "192.168.1.10"));
    server.apply(node("node-b", "192.168.1.11"));
}

fn names<T: kube::Resource>(objects: &[Arc<T>]) -> Vec<String> {
    objects
        .iter()
        .map(|object| {
            format!(
                "{}/{}",
                object.meta().namespace.as_deref().unwrap_or_default(),
                object.meta().name.as_deref().unwrap_or_default()
            )
        })
        .collect()
}

fn cluster_ip<'a>(snapshot: &'a Snapshot, name: &str) -> Option<&'a str> {
    snapshot
        .services
        .iter()
        .find(|service| service.metadata.name.as_deref() == Some(name))?
        .spec
        .as_ref()?
        .cluster_ip
        .as_deref()
}

fn slice_addresses(snapshot: &Snapshot, name: &str) -> Option<Vec<String>> {
    let slice = snapshot
        .endpoint_slices
        .iter()
        .find(|slice| slice.metadata.name.as_deref() == Some(name))?;
    Some(
        slice
            .endpoints
            .iter()
            .flat_map(|endpoint| endpoint.addresses.clone())
            .collect(),
    )
}

fn node_address(snapshot: &Snapshot) -> Option<&str> {
    Some(
        snapshot
            .node
            .as_ref()?
            .status
            .as_ref()?
            .addresses
            .as_ref()?
            .first()?
            .address
            .as_str(),
    )
}

fn summary(snapshot: &Snapshot) -> String {
    format!(
        "services {:?}, slices {:?}, node {:?}",
        names(&snapshot.services),
        names(&snapshot.endpoint_slices),
        snapshot
            .node
            .as_ref()
            .and_then(|node| node.metadata.name.as_deref())
    )
}

/// A kubeconfig file for the fake server, removed when dropped.
struct TempKubeconfig(PathBuf);

impl TempKubeconfig {
    fn new(write: impl FnOnce(&std::path::Path)) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "lb-kube-source-{}-{}.kubeconfig",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        write(&path);
        Self(path)
    }
}

impl Drop for TempKubeconfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A running source: its snapshots and how many it published.
struct Running {
    snapshots: watch::Receiver<Snapshot>,
    /// Snapshots published so far, counted by a task that sees every one (the source publishes
    /// at most one per `QUIET` = 50 ms).
    published: Arc<AtomicUsize>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A client through `--kubeconfig` (the test machine's own kubeconfig and service account, if
/// any, must not matter) and a source for [`NODE`].
async fn start(server: &FakeApiServer) -> Running {
    let kubeconfig = TempKubeconfig::new(|path| server.write_kubeconfig(path).unwrap());
    let client = client(None, Some(&kubeconfig.0)).await.expect("a client");
    start_with(client)
}

fn start_with(client: kube::Client) -> Running {
    let (updates, snapshots) = watch::channel(Snapshot::default());
    let published = Arc::new(AtomicUsize::new(0));
    let mut counter = snapshots.clone();
    let count = Arc::clone(&published);
    tokio::spawn(async move {
        while counter.changed().await.is_ok() {
            counter.borrow_and_update();
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    let task = tokio::spawn(KubeSource::new(client, NODE.into()).run(updates));
    Running {
        snapshots,
        published,
        task,
    }
}

impl Running {
    /// The next published snapshot that satisfies `done`; panics after [`WAIT`].
    async fn until(&mut self, what: &str, done: impl Fn(&Snapshot) -> bool) -> Snapshot {
        let wait = async {
            loop {
                {
                    let snapshot = self.snapshots.borrow_and_update();
                    if self.published.load(Ordering::SeqCst) > 0 && done(&snapshot) {
                        return snapshot.clone();
                    }
                }
                self.snapshots.changed().await.expect("the source stopped");
            }
        };
        match timeout(WAIT, wait).await {
            Ok(snapshot) => snapshot,
            Err(_) => panic!(
                "no snapshot with {what} within {WAIT:?}; last: {}",
                summary(&self.snapshots.borrow())
            ),
        }
    }

    /// The first snapshot (the source publishes only once everything is listed).
    async fn initial(&mut self) -> Snapshot {
        self.until("the initial lists", |_| true).await
    }

    fn published(&self) -> usize {
        self.published.load(Ordering::SeqCst)
    }

    /// Asserts that nothing is published for `quiet`.
    async fn assert_quiet(&mut self, quiet: Duration, why: &str) {
        let before = self.published();
        self.snapshots.borrow_and_update();
        if let Ok(changed) = timeout(quiet, self.snapshots.changed()).await {
            changed.expect("the source stopped");
            panic!(
                "{why}: a snapshot was published ({} before): {}",
                before,
                summary(&self.snapshots.borrow())
            );
        }
    }
}

#[tokio::test]
async fn initial_snapshot_holds_every_object_and_only_this_node() {
    bounded(async {
        let server = FakeApiServer::start().await.unwrap();
        seed(&server);
        let mut source = start(&server).await;
        let snapshot = source.initial().await;
        assert_eq!(names(&snapshot.services), ["default/web", "shop/cart"]);
        assert_eq!(
            names(&snapshot.endpoint_slices),
            ["default/web-abc", "shop/cart-xyz"]
        );
        assert_eq!(
            snapshot.node.as_ref().unwrap().metadata.name.as_deref(),
            Some(NODE)
        );
        assert_eq!(node_address(&snapshot), Some("192.168.1.10"));
        assert_eq!(
            slice_addresses(&snapshot, "cart-xyz").unwrap(),
            ["10.244.2.3", "10.244.2.4"]
        );
        assert_eq!(source.published(), 1, "one snapshot for the initial lists");
    })
    .await;
}

#[tokio::test]
async fn nothing_is_published_before_every_list_is_complete_and_an_empty_cluster_is_published() {
    bounded(async {
        let server = FakeApiServer::start().await.unwrap();
        let mut source = start(&server).await;
        let snapshot = source.initial().await;
        assert!(snapshot.services.is_empty() && snapshot.endpoint_slices.is_empty());
        assert!(snapshot.node.is_none());
        // Published once all three lists were done: each kind was listed before the first
        // snapshot (the requests precede it).
        let requests = server.requests();
        for path in [
            "/api/v1/services?",
            "/apis/discovery.k8s.io/v1/endpointslices?",
            "/api/v1/nodes?",
        ] {
            assert!(
                requests
                    .iter()
                    .any(|request| request.starts_with(&format!("GET {path}"))),
                "{path} was never requested: {requests:#?}"
            );
        }
        server.apply(service("default", "late", "10.96.0.99", 80));
        source
            .until("the late service", |s| cluster_ip(s, "late").is_some())
            .await;
    })
    .await;
}

#[tokio::test]
async fn the_first_snapshot_waits_for_the_slowest_list() {
    bounded(async {
        let server = FakeApiServer::start().await.unwrap();
        seed(&server);
        // Services and slices are listed at once; the node's list takes 600 ms.
        server.delay_lists(Resource::Nodes, Duration::from_millis(600));
        let started = tokio::time::Instant::now();
        let mut source = start(&server).await;
        let snapshot = source.initial().await;
        assert!(
            started.elapsed() >= Duration::from_millis(600),
            "published after {:?}, before the node was listed",
            started.elapsed()
        );
        assert_eq!(source.published(), 1);
        assert_eq!(snapshot.services.len(), 2);
        assert_eq!(snapshot.endpoint_slices.len(), 2);
        assert!(snapshot.node.is_some());
    })
    .await;
}

#[tokio::test]
async fn service_add_modify_delete_reach_snapshots() {
    bounded(async {
        let server = FakeApiServer::start().await.unwrap();
        seed(&server);
        let mut source = start(&server).await;
        source.initial().await;

        server.apply(service("default", "api", "10.96.0.20", 443));
        let snapshot = source
            .until("service api", |s| {
                cluster_ip(s, "api") == Some("10.96.0.20")
            })
            .await;
        assert_eq!(
            names(&snapshot.services),
            ["default/api", "default/web", "shop/cart"],
            "sorted by namespace and name"
        );

        server.apply(service("default", "api", "10.96.0.21", 443));
        source
            .until("service api modified", |s| {
                cluster_ip(s, "api") == Some("10.96.0.21")
            })
            .await;

        server.delete(Resource::Services, "default", "api").unwrap();
        let snapshot = source
            .until("service api deleted", |s| cluster_ip(s, "api").is_none())
            .await;
        assert_eq!(names(&snapshot.services), ["default/web", "shop/cart"]);
        assert_eq!(snapshot.endpoint_slices.len(), 2);
        assert!(snapshot.node.is_some());
    })
    .await;
}

#[tokio::test]
async fn endpoint_slice_add_modify_delete_reach_snapshots() {
    bounded(async {
        let server = FakeApiServer::start().await.unwrap();
        seed(&server);
        let mut source = start(&server).await;
        source.initial().await;

        server.apply(slice("default", "web-def", "web", &["10.244.3.5"]));
        source
            .until("slice web-def", |s| {
                slice_addresses(s, "web-def").is_some_and(|a| a == ["10.244.3.5"])
            })
            .await;

        server.apply(slice(
            "default",
            "web-def",
            "web",
            &["10.244.3.5", "10.244.3.6"],
        ));
        source
            .until("slice web-def with two endpoints", |s| {
                slice_addresses(s, "web-def").is_some_and(|a| a.len() == 2)
            })
            .await;

        server
            .delete(Resource::EndpointSlices, "default", "web-def")
            .unwrap();
        let snapshot = source
            .until("slice web-def deleted", |s| {
                slice_addresses(s, "web-def").is_none()
            })
            .await;
        assert_eq!(
            names(&snapshot.endpoint_slices),
            ["default/web-abc", "shop/cart-xyz"]
        );
    })
    .await;
}

fn addresses(snapshot: &Snapshot) -> Vec<String> {
    snapshot
        .node_addresses
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// Every Node is watched, for the addresses a DSR option naming a NodePort may name; a change
/// of another Node that leaves the addresses as they were publishes nothing, and only this
/// node's object is kept whole, without its image list.
#[tokio::test]
async fn every_nodes_addresses_are_watched_and_only_this_nodes_object_is_kept() {
    bounded(async {
        let server = FakeApiServer::start().await.unwrap();
        seed(&server);
        let mut this_node = node(NODE, "192.168.1.10");
        this_node.status.as_mut().unwrap().images = Some(vec![Default::default()]);
        server.apply(this_node);
        let mut source = start(&server).await;
        let snapshot = source.initial().await;
        assert_eq!(addresses(&snapshot), ["192.168.1.10", "192.168.1.11"]);
        let kept = snapshot.node.as_ref().expect("this node");
        assert_eq!(kept.metadata.name.as_deref(), Some(NODE));
        assert_eq!(kept.status.as_ref().unwrap().images, None, "images trimmed");
        assert!(server.wait_for_watches(WAIT).await);

        // Another node's labels change: the addresses do not, nothing is published.
        let mut labelled = node("node-b", "192.168.1.11");
        labelled.metadata.labels = Some([("zone".to_owned(), "b".to_owned())].into());
        server.apply(labelled);
        source
            .assert_quiet(Duration::from_millis(300), "another node's labels changed")
            .await;

        server.apply(node("node-b", "192.168.1.99"));
        source
            .until("node-b's new address", |s| {
                addresses(s) == ["192.168.1.10", "192.168.1.99"]
            })
            .await;
        server.apply(node("node-c", "192.168.1.12"));
        source
            .until("node-c's address", |s| addresses(s).len() == 3)
            .await;
        server.delete(Resource::Nodes, "", "node-b").unwrap();
        source
            .until("node-b gone", |s| {
                addresses(s) == ["192.168.1.10", "192.168.1.12"]
            })
            .await;

        server.apply(node(NODE, "192.168.1.20"));
        source
            .until("this node's new address", |s| {
                node_address(s) == Some("192.168.1.20")
                    && addresses(s) == ["192.168.1.12", "192.168.1.20"]
            })
            .await;

        server.delete(Resource::Nodes, "", NODE).unwrap();
        let snapshot = source.until("no node", |s| s.node.is_none()).await;
        assert_eq!(addresses(&snapshot), ["192.168.1.12"]);
        assert_eq!(snapshot.services.len(), 2);
    })
    .await;
}

/// `name` at `address` in boot `boot`, its lb's DSR mark naming boot `mark` (if any).
fn booted_node(name: &str, address: &str, boot: &str, mark: Option<&str>) -> Node {
    let mut node = node(name, address);
    node.status.as_mut().unwrap().node_info = Some(k8s_openapi::api::core::v1::NodeSystemInfo {
        boot_id: boot.into(),
        ..Default::default()
    });
    node.metadata.annotations = mark.map(|mark| {
        [(
            lb_userspace::source::DIRECT_RETURN_MARK.to_owned(),
            mark.to_owned(),
        )]
        .into()
    });
    node
}

/// The Nodes whose lb's DSR mark names the boot they are in reach the snapshot by name, as
/// they are marked, reboot and are marked again.
#[tokio::test]
async fn nodes_marked_for_dsr_in_their_current_boot_reach_the_snapshot() {
    bounded(async {
        let server = FakeApiServer::start().await.unwrap();
        seed(&server);
        server.apply(booted_node("node-b", "192.168.1.11", "b1", Some("b1")));
        server.apply(booted_node("node-c", "192.168.1.12", "c1", None));
        let mut source = start(&server).await;
        let snapshot = source.initial().await;
        let marked = |s: &Snapshot| s.direct_return_nodes.iter().cloned().collect::<Vec<_>>();
        assert_eq!(marked(&snapshot), ["node-b"]);
        assert!(server.wait_for_watches(WAIT).await);

        server.apply(booted_node("node-c", "192.168.1.12", "c1", Some("c1")));
        source
            .until("node-c marked", |s| marked(s) == ["node-b", "node-c"])
            .await;
        // node-b reboots: its mark names the boot before until its lb writes it again.
        server.apply(booted_node("node-b", "192.168.1.11", "b2", Some("b1")));
        source
            .until("node-b rebooted", |s| marked(s) == ["node-c"])
            .await;
        server.apply(booted_node("node-b", "192.168.1.11", "b2", Some("b2")));
        source
            .until("node-b marked again", |s| marked(s) == ["node-b", "node-c"])
            .await;
    })
    .await;
}

#[tokio::test]
async fn gone_while_watching_relists_and_converges() {
    bounded(async {
        let server = FakeApiServer::start().await.unwrap();
        seed(&server);
        let mut source = start(&server).await;
        source.initial().await;
        assert!(server.wait_for_watches(WAIT).await);
        let lists_before = list_requests(&server, "/api/v1/services?");

        // Every watch gets 410 and the history is gone; changes made while the source is
        // "expired" (backing off before its relist) can only reach it through the relist.
        assert_eq!(server.expire(), 3);
        server.apply(service("default", "web", "10.96.0.50", 80));
        server.delete(Resource::Services, "shop", "cart").unwrap();
        server.apply(slice("default", "web-new", "web", &["10.244.9.9"]));
        server
            .delete(Resource::EndpointSlices, "shop", "cart-xyz")
            .unwrap();
        server.apply(node(NODE, "192.168.1.30"));

        let snapshot = source
            .until("the state after the expiry", |s| {
                cluster_ip(s, "web") == Some("10.96.0.50")
                    && cluster_ip(s, "cart").is_none()
                    && names(&s.endpoint_slices) == ["default/web-abc", "default/web-new"]
                    && node_address(s) == Some("192.168.1.30")
            })
            .await;
        assert_eq!(names(&snapshot.services), ["default/web"]);
        assert!(
            list_requests(&server, "/api/v1/services?") > lists_before,
            "the services were relisted"
        );

        // And it keeps watching afterwards.
        server.apply(service("default", "after", "10.96.0.51", 80));
        source
            .until("a service created after the relist", |s| {
                cluster_ip(s, "after").is_some()
            })
            .await;
    })
    .await;
}

fn list_requests(server: &FakeApiServer, path: &str) -> usize {
    server
        .requests()
        .iter()
        .filter(|request| {
            request.starts_with(&format!("GET {path}")) && !request.contains("watch=")
        })
        .count()
}

#[tokio::test]
async fn a_relist_that_finds_nothing_new_publishes_nothing() {
    bounded(async {
        let server = FakeApiServer::start().await.unwrap();
        seed(&server);
        let mut source = start(&server).await;
        source.initial().await;
        assert!(server.wait_for_watches(WAIT).await);
        let published = source.published();
        let lists = |server: &FakeApiServer| {
            list_requests(server, "/api/v1/services?")
                + list_requests(server, "/apis/discovery.k8s.io/v1/endpointslices?")
                + list_requests(server, "/api/v1/nodes?")
        };
        assert_eq!(lists(&server), 3);

        server.expire();
        timeout(WAIT, async {
            while lists(&server) < 6 || !server.wait_for_watches(Duration::ZERO).await {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("all three relisted and watching again");
        source
            .assert_quiet(Duration::from_millis(300), "relists of unchanged objects")
            .await;
        assert_eq!(source.published(), published);
    })
    .await;
}

#[tokio::test]
async fn gone_at_watch_start_relists_and_converges() {
    bounded(async {
        let server = FakeApiServer::start().await.unwrap();
        seed(&server);
        let mut source = start(&server).await;
        source.initial().await;
        assert!(server.wait_for_watches(WAIT).await);
        let lists_before = list_requests(&server, "/apis/discovery.k8s.io/v1/endpointslices?");

        // The watch is cut; the source resumes it, and the resumed watch is answered 410.
        server.fail_next_watch(Resource::EndpointSlices);
        server.drop_watches();
        server.apply(slice("shop", "cart-xyz", "cart", &["10.244.2.3"]));
        source
            .until("the slice changed while reconnecting", |s| {
                slice_addresses(s, "cart-xyz").is_some_and(|a| a == ["10.244.2.3"])
            })
            .await;
        assert!(
            list_requests(&server, "/apis/discovery.k8s.io/v1/endpointslices?") > lists_before,
            "the endpointslices were relisted after the 410"
        );
        server.apply(slice("shop", "cart-xyz", "cart", &[]));
        source
            .until("the slice emptied after the relist", |s| {
                slice_addresses(s, "cart-xyz").is_some_and(|a| a.is_empty())
            })
            .await;
    })
    .await;
}

#[tokio::test]
async fn dropped_connections_are_survived_and_changes_made_meanwhile_arrive() {
    bounded(async {
        let server = FakeApiServer::start().await.unwrap();
        seed(&server);
        let mut source = start(&server).await;
        source.initial().await;

        for round in 0..3 {
            assert!(server.wait_for_watches(WAIT).await, "round {round}");
            assert_eq!(server.drop_watches(), 3, "round {round}");
            // Made while no watch is open: delivered by the resumed watches (replayed from
            // the source's last resourceVersion), not by a relist.
            let name = format!("svc-{round}");
            server.apply(service("default", &name, "10.96.1.1", 80));
            server.apply(node(NODE, &format!("192.168.2.{round}")));
            source
                .until(&format!("round {round}'s changes"), |s| {
                    cluster_ip(s, &name).is_some()
                        && node_address(s) == Some(format!("192.168.2.{round}").as_str())
                })
                .await;
        }
        assert_eq!(
            list_requests(&server, "/api/v1/services?"),
            1,
            "a dropped watch resumes without relisting"
        );
    })
    .await;
}

#[tokio::test]
async fn bookmarks_publish_nothing_and_move_the_resume_point() {
    bounded(async {
        let server = FakeApiServer::start().await.unwrap();
        seed(&server);
        let mut source = start(&server).await;
        source.initial().await;
        assert!(server.wait_for_watches(WAIT).await);
        let published = source.published();

        // Changes to Services kube-proxy's selector leaves out (headless ones) move the
        // global resourceVersion without reaching this agent's watches; the bookmark then tells
        // it how far it got.
        for i in 0..5 {
            let mut headless = service("default", "headless", &format!("10.96.3.{i}"), 80);
            headless.metadata.labels =
                Some([("service.kubernetes.io/headless".to_owned(), String::new())].into());
            server.apply(headless);
        }
        let version = server.resource_version();
        for _ in 0..3 {
            assert_eq!(server.bookmark(), 3);
        }
        source
            .assert_quiet(Duration::from_millis(400), "bookmarks only")
            .await;
        assert_eq!(source.published(), published);

        // The next Service watch resumes from the bookmark's resourceVersion.
        server.drop_watches();
        assert!(server.wait_for_watches(WAIT).await);
        let resumed = server.requests().into_iter().any(|request| {
            request.starts_with("GET /api/v1/services?")
                && request.contains("watch=true")
                && request.contains(&format!("resourceVersion={version}"))
        });
        assert!(resumed, "{:#?}", server.requests());
        source
            .assert_quiet(Duration::from_millis(200), "resumed watches")
            .await;

        server.apply(service("default", "after-bookmark", "10.96.0.60", 80));
        source
            .until("a change after the bookmarks", |s| {
                cluster_ip(s, "after-bookmark").is_some()
            })
            .await;
    })
    .await;
}

#[tokio::test]
async fn a_burst_of_changes_is_coalesced_and_the_last_snapshot_is_complete() {
    bounded(async {
        let server = FakeApiServer::start().await.unwrap();
        seed(&server);
        let mut source = start(&server).await;
        source.initial().await;
        assert!(server.wait_for_watches(WAIT).await);
        let before = source.published();

        // 200 changes, 1 ms apart (the source sees each as it comes, never 50 ms of quiet):
        // 100 new Services, 50 new slices, 50 updates of Services.
        for i in 0..200 {
            if i < 100 {
                server.apply(service(
                    "burst",
                    &format!("svc-{i:03}"),
                    &format!("10.96.2.{i}"),
                    80,
                ));
            } else if i < 150 {
                let n = i - 100;
                server.apply(slice(
                    "burst",
                    &format!("svc-{n:03}-x"),
                    &format!("svc-{n:03}"),
                    &[&format!("10.244.4.{n}")],
                ));
            } else {
                let n = i - 150;
                server.apply(service(
                    "burst",
                    &format!("svc-{n:03}"),
                    &format!("10.96.3.{n}"),
                    80,
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let snapshot = source
            .until("all 200 changes", |s| {
                s.services.len() == 102
                    && s.endpoint_slices.len() == 52
                    && cluster_ip(s, "svc-049") == Some("10.96.3.49")
                    && cluster_ip(s, "svc-050") == Some("10.96.2.50")
            })
            .await;
        assert!(snapshot.node.is_some());
        // Settle: nothing more comes once the burst is published.
        source
            .assert_quiet(Duration::from_millis(300), "after the burst")
            .await;
        let snapshots = source.published() - before;
        assert!(
            (1..20).contains(&snapshots),
            "200 changes published as {snapshots} snapshots"
        );
    })
    .await;
}

#[tokio::test]
async fn a_continuous_stream_of_changes_is_still_published_regularly() {
    bounded(async {
        let server = FakeApiServer::start().await.unwrap();
        seed(&server);
        let mut source = start(&server).await;
        source.initial().await;
        assert!(server.wait_for_watches(WAIT).await);
        let before = source.published();

        // A change every 10 ms for 1.6 s: never 50 ms of quiet, so only the 500 ms bound
        // publishes during the stream.
        let start = tokio::time::Instant::now();
        let mut i = 0;
        while start.elapsed() < Duration::from_millis(1600) {
            server.apply(service(
                "default",
                "web",
                &format!("10.96.5.{}", i % 250),
                80,
            ));
            i += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let during = source.published() - before;
        assert!(
            during >= 2,
            "{during} snapshots during 1.6 s of continuous changes"
        );
        let last = format!("10.96.5.{}", (i - 1) % 250);
        source
            .until("the last change of the stream", |s| {
                cluster_ip(s, "web") == Some(last.as_str())
            })
            .await;
    })
    .await;
}

#[tokio::test]
async fn managed_fields_are_stripped() {
    bounded(async {
        let server = FakeApiServer::start().await.unwrap();
        seed(&server);
        let stored = server.object(Resource::Services, "default", "web").unwrap();
        assert_eq!(
            stored["metadata"]["managedFields"].as_array().map(Vec::len),
            Some(1),
            "the fake server sets managed fields like a real one"
        );
        let mut source = start(&server).await;
        let snapshot = source.initial().await;
        let managed =
            |meta: &ObjectMeta| meta.managed_fields.as_ref().is_some_and(|f| !f.is_empty());
        assert!(!snapshot.services.iter().any(|s| managed(&s.metadata)));
        assert!(
            !snapshot
                .endpoint_slices
                .iter()
                .any(|s| managed(&s.metadata))
        );
        assert!(!managed(&snapshot.node.as_ref().unwrap().metadata));
        // Also on objects that arrive through the watch.
        server.apply(service("default", "watched", "10.96.0.70", 80));
        let snapshot = source
            .until("the watched service", |s| {
                cluster_ip(s, "watched").is_some()
            })
            .await;
        assert!(!snapshot.services.iter().any(|s| managed(&s.metadata)));
        // The server-set fields the agent needs are kept (resourceVersion for the incremental
        // compile, creationTimestamp and uid for who owns a contested frontend).
        let web = snapshot
            .services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some("web"))
            .unwrap();
        assert!(web.metadata.resource_version.is_some() && web.metadata.uid.is_some());
        assert!(web.metadata.creation_timestamp.is_some());
    })
    .await;
}

#[tokio::test]
async fn the_source_returns_when_no_receiver_is_left() {
    bounded(async {
        let server = FakeApiServer::start().await.unwrap();
        seed(&server);
        let kubeconfig = TempKubeconfig::new(|path| server.write_kubeconfig(path).unwrap());
        let client = client(None, Some(&kubeconfig.0)).await.unwrap();
        let (updates, mut snapshots) = watch::channel(Snapshot::default());
        let task = tokio::spawn(KubeSource::new(client, NODE.into()).run(updates));
        timeout(WAIT, snapshots.changed())
            .await
            .expect("an initial snapshot")
            .expect("the source is running");
        drop(snapshots);
        let result = timeout(WAIT, task)
            .await
            .expect("the source returns once its last receiver is gone");
        result
            .expect("the source task")
            .expect("the source ends without error");
    })
    .await;
}

#[tokio::test]
async fn event_recorder_creates_warning_events() {
    bounded(async {
        let server = FakeApiServer::start().await.unwrap();
        let kubeconfig = TempKubeconfig::new(|path| server.write_kubeconfig(path).unwrap());
        let client = client(None, Some(&kubeconfig.0)).await.unwrap();
        let recorder = EventRecorder::new(client, "lb", NODE);
        server.apply(service("shop", "cart", "10.96.0.11", 8080));
        let stored: Service = serde_json::from_value(
            server
                .object(Resource::Services, "shop", "cart")
                .expect("stored"),
        )
        .expect("a Service");
        let object = object_reference("v1", "Service", &stored.metadata);
        recorder
            .warn(
                &object,
                "InvalidClusterIP",
                "spec.clusterIP \"10.96.0.300\" is not an IPv4 address",
            )
            .await
            .unwrap();
        let events = server.events();
        assert_eq!(events.len(), 1, "{events:#?}");
        let event = &events[0];
        assert_eq!(event["apiVersion"], "events.k8s.io/v1");
        assert_eq!(event["metadata"]["namespace"], "shop");
        assert_eq!(event["type"], "Warning");
        assert_eq!(event["reason"], "InvalidClusterIP");
        assert_eq!(
            event["note"],
            "spec.clusterIP \"10.96.0.300\" is not an IPv4 address"
        );
        // The full reference: kubectl describe finds Events by the object's uid.
        let stored = server
            .object(Resource::Services, "shop", "cart")
            .expect("stored");
        assert_eq!(event["regarding"]["apiVersion"], "v1");
        assert_eq!(event["regarding"]["kind"], "Service");
        assert_eq!(event["regarding"]["namespace"], "shop");
        assert_eq!(event["regarding"]["name"], "cart");
        assert_eq!(event["regarding"]["uid"], stored["metadata"]["uid"]);
        assert!(event["regarding"]["uid"].is_string());
        assert_eq!(
            event["regarding"]["resourceVersion"],
            stored["metadata"]["resourceVersion"]
        );
        assert_eq!(event["reportingController"], "lb");
        assert_eq!(event["reportingInstance"], NODE);
        assert!(event["eventTime"].is_string());

        // The same warning again is counted on the same Event, not a new one.
        recorder
            .warn(
                &object,
                "InvalidClusterIP",
                "spec.clusterIP \"10.96.0.300\" is not an IPv4 address",
            )
            .await
            .unwrap();
        let events = server.events();
        assert_eq!(events.len(), 1, "{events:#?}");
        assert_eq!(events[0]["series"]["count"], 2);

        // A cluster-scoped object's Event goes to the default namespace; a long message is cut
        // to what the API accepts.
        let node_ref = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(NODE.into()),
            ..ObjectReference::default()
        };
        recorder
            .warn(&node_ref, "NoNodeAddress", &"x".repeat(5000))
            .await
            .unwrap();
        let events = server.events();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1]["metadata"]["namespace"], "default");
        assert_eq!(events[1]["regarding"]["name"], NODE);
        assert!(events[1]["note"].as_str().unwrap().len() <= 1024);
        assert!(
            server
                .requests()
                .iter()
                .any(|r| r.starts_with("POST /apis/events.k8s.io/v1/namespaces/shop/events"))
        );
    })
    .await;
}

#[tokio::test]
async fn master_overrides_the_kubeconfig_server() {
    bounded(async {
        let server = FakeApiServer::start().await.unwrap();
        seed(&server);
        // A kubeconfig naming a server where nothing listens, and --master with the real one.
        let kubeconfig = TempKubeconfig::new(|path| {
            std::fs::write(path, kubeconfig("http://127.0.0.1:9")).unwrap();
        });
        let client = client(Some(&server.url()), Some(&kubeconfig.0))
            .await
            .unwrap();
        let mut source = start_with(client);
        let snapshot = source.initial().await;
        assert_eq!(snapshot.services.len(), 2);
    })
    .await;
}

#[tokio::test]
async fn large_initial_lists_are_complete_in_one_request_from_the_watch_cache() {
    bounded(async {
        let server = FakeApiServer::start().await.unwrap();
        seed(&server);
        // More than two pages of kube's default page size (500): no paging from the cache.
        for i in 0..1100 {
            server.apply(service(
                "many",
                &format!("svc-{i:04}"),
                &format!("10.97.{}.{}", i / 250, i % 250),
                80,
            ));
        }
        let mut source = start(&server).await;
        let snapshot = source.initial().await;
        assert_eq!(snapshot.services.len(), 1102);
        let requests = server.requests();
        let service_lists: Vec<_> = requests
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/services?") && !r.contains("watch=true"))
            .collect();
        assert_eq!(service_lists.len(), 1, "{requests:#?}");
        assert!(
            service_lists[0].contains("resourceVersion=0") && !service_lists[0].contains("limit="),
            "{requests:#?}"
        );
    })
    .await;
}

/// A logged request as (method and path, query parameters).
fn parse_request(request: &str) -> (String, BTreeMap<String, String>) {
    let (target, query) = request.split_once('?').unwrap_or((request, ""));
    let params = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    (target.to_owned(), params)
}

fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect()
}

/// What the source asks for, so the fake's coverage is checked against it: a list from the
/// watch cache (`resourceVersion=0`, not paged) as kube-proxy's informers do, then a watch from
/// the list's resourceVersion with bookmarks and kube's 290 s timeout; no streaming list.
/// Services and EndpointSlices carry kube-proxy's label selector; every request carries the
/// agent's User-Agent.
#[tokio::test]
async fn the_source_lists_from_the_watch_cache_then_watches_with_bookmarks() {
    bounded(async {
        let server = FakeApiServer::start().await.unwrap();
        seed(&server);
        let mut source = start(&server).await;
        source.initial().await;
        assert!(server.wait_for_watches(WAIT).await);
        let version = server.resource_version().to_string();
        let requests: Vec<_> = server.requests().iter().map(|r| parse_request(r)).collect();
        let proxied = ("labelSelector", PROXIED_SELECTOR);
        assert_eq!(
            PROXIED_SELECTOR,
            "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"
        );
        let list = [
            ("resourceVersion", "0"),
            ("resourceVersionMatch", "NotOlderThan"),
        ];
        let watch = [
            ("watch", "true"),
            ("timeoutSeconds", "290"),
            ("allowWatchBookmarks", "true"),
            ("resourceVersion", version.as_str()),
        ];
        let expected = [
            ("GET /api/v1/services", params(&[list[0], list[1], proxied])),
            (
                "GET /apis/discovery.k8s.io/v1/endpointslices",
                params(&[list[0], list[1], proxied]),
            ),
            ("GET /api/v1/nodes", params(&list)),
            (
                "GET /api/v1/services",
                params(&[watch[0], watch[1], watch[2], watch[3], proxied]),
            ),
            (
                "GET /apis/discovery.k8s.io/v1/endpointslices",
                params(&[watch[0], watch[1], watch[2], watch[3], proxied]),
            ),
            ("GET /api/v1/nodes", params(&watch)),
        ];
        for (target, params) in &expected {
            assert!(
                requests.iter().any(|(t, p)| t == target && p == params),
                "{target} {params:?} not in {requests:#?}"
            );
        }
        assert_eq!(requests.len(), expected.len(), "{requests:#?}");
        let agents = server.user_agents();
        assert!(
            agents
                .iter()
                .all(|(_, agent)| agent.as_deref() == Some(USER_AGENT)),
            "{agents:#?}"
        );
        assert_eq!(USER_AGENT, format!("lb/{}", env!("CARGO_PKG_VERSION")));
    })
    .await;
}

/// The first snapshot of a large cluster: 10k Services with a slice each. Prints how long the
/// source took from start to its first snapshot (a figure for docs, never asserted).
#[tokio::test]
async fn the_first_snapshot_of_ten_thousand_services_is_complete() {
    bounded(async {
        const SERVICES: usize = 10_000;
        let server = FakeApiServer::start().await.unwrap();
        server.apply(node(NODE, "192.0.2.1"));
        for i in 0..SERVICES {
            let name = format!("svc-{i:05}");
            let (high, low) = (i / 250, i % 250);
            server.apply(service("many", &name, &format!("10.97.{high}.{low}"), 80));
            server.apply(slice(
                "many",
                &format!("{name}-1"),
                &name,
                &[&format!("10.244.{high}.{low}")],
            ));
        }
        let started = std::time::Instant::now();
        let mut source = start(&server).await;
        let snapshot = source.initial().await;
        let took = started.elapsed();
        assert_eq!(snapshot.services.len(), SERVICES);
        assert_eq!(snapshot.endpoint_slices.len(), SERVICES);
        let lists = server
            .requests()
            .iter()
            .filter(|r| r.starts_with("GET ") && !r.contains("watch=true"))
            .count();
        println!(
            "first snapshot of {SERVICES} Services and slices: {took:?}, {lists} list requests"
        );
    })
    .await;
}

fn labelled<T: kube::Resource>(mut object: T, key: &str, value: &str) -> T {
    object
        .meta_mut()
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(key.to_owned(), value.to_owned());
    object
}

/// As kube-proxy: a Service another proxy serves (`service.kubernetes.io/service-proxy-name`)
/// and a headless Service's slices (`service.kubernetes.io/headless`) are filtered out by the
/// API server through the label selector, never sent; a Service that gains the label leaves
/// the snapshot (the server's watch sends it as deleted), and one that loses it comes back.
#[tokio::test]
async fn services_of_another_proxy_and_headless_slices_are_not_sent() {
    bounded(async {
        const PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
        const HEADLESS: &str = "service.kubernetes.io/headless";
        let server = FakeApiServer::start().await.unwrap();
        seed(&server);
        server.apply(labelled(
            service("default", "other", "10.96.0.50", 80),
            PROXY_NAME,
            "other-proxy",
        ));
        server.apply(labelled(
            slice("default", "other-1", "other", &["10.244.5.5"]),
            PROXY_NAME,
            "other-proxy",
        ));
        server.apply(labelled(
            slice("default", "db-1", "db", &["10.244.6.6"]),
            HEADLESS,
            "",
        ));
        let mut source = start(&server).await;
        let snapshot = source.initial().await;
        assert_eq!(names(&snapshot.services), ["default/web", "shop/cart"]);
        assert_eq!(
            names(&snapshot.endpoint_slices),
            ["default/web-abc", "shop/cart-xyz"]
        );
        let requests = server.requests();
        for path in [
            "GET /api/v1/services?",
            "GET /apis/discovery.k8s.io/v1/endpointslices?",
        ] {
            let sent: Vec<_> = requests
                .iter()
                .filter(|r| r.starts_with(path))
                .map(|r| parse_request(r).1)
                .collect();
            assert!(!sent.is_empty(), "{requests:#?}");
            for params in sent {
                assert_eq!(
                    params.get("labelSelector").map(String::as_str),
                    Some(PROXIED_SELECTOR),
                    "{requests:#?}"
                );
            }
        }

        // web passes to another proxy, then comes back.
        server.apply(labelled(
            service("default", "web", "10.96.0.10", 80),
            PROXY_NAME,
            "other-proxy",
        ));
        source
            .until("web gone to another proxy", |s| {
                cluster_ip(s, "web").is_none() && cluster_ip(s, "cart").is_some()
            })
            .await;
        server.apply(service("default", "web", "10.96.0.10", 80));
        source
            .until("web back", |s| cluster_ip(s, "web") == Some("10.96.0.10"))
            .await;
    })
    .await;
}

/// What a DaemonSet without the RBAC rule for Events gets from a real API server.
const FORBIDDEN: &str = "events.events.k8s.io is forbidden: User \"system:serviceaccount:kube-system:lb\" \
     cannot create resource \"events\" in API group \"events.k8s.io\" in the namespace \"shop\"";

fn cart_reference() -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Service".into()),
        namespace: Some("shop".into()),
        name: Some("cart".into()),
        ..ObjectReference::default()
    }
}

/// A refused Event is tried again a bounded number of times, then given up on: counted once,
/// and the error carries the API server's answer (its code and message), which the agent logs.
#[tokio::test]
async fn a_refused_event_is_retried_then_counted_with_the_api_servers_answer() {
    bounded(async {
        let server = FakeApiServer::start().await.unwrap();
        let kubeconfig = TempKubeconfig::new(|path| server.write_kubeconfig(path).unwrap());
        let client = client(None, Some(&kubeconfig.0)).await.unwrap();
        let recorder = EventRecorder::new(client, "lb", NODE).with_retry(EventRetry {
            attempts: 3,
            first_delay: Duration::from_millis(20),
        });
        server.fail_events(usize::MAX, 403, "Forbidden", FORBIDDEN);
        let error = recorder
            .warn(&cart_reference(), "InvalidClusterIP", "bad")
            .await
            .expect_err("the API server refuses every Event");
        let text = format!("{error}");
        assert!(text.contains("403 Forbidden"), "{text}");
        assert!(text.contains(FORBIDDEN), "{text}");
        assert!(text.contains("Service shop/cart"), "{text}");
        assert_eq!(server.event_writes(), 3, "{:#?}", server.requests());
        assert_eq!(recorder.failures(), 1);
        assert!(server.events().is_empty());
    })
    .await;
}

/// An API server that fails for a moment (overloaded, restarting) loses no Event.
#[tokio::test]
async fn an_event_refused_for_a_moment_is_recorded_by_a_retry() {
    bounded(async {
        let server = FakeApiServer::start().await.unwrap();
        let kubeconfig = TempKubeconfig::new(|path| server.write_kubeconfig(path).unwrap());
        let client = client(None, Some(&kubeconfig.0)).await.unwrap();
        let recorder = EventRecorder::new(client, "lb", NODE).with_retry(EventRetry {
            attempts: 5,
            first_delay: Duration::from_millis(20),
        });
        server.fail_events(2, 500, "InternalError", "etcdserver: request timed out");
        recorder
            .warn(&cart_reference(), "InvalidClusterIP", "bad")
            .await
            .expect("recorded on the third attempt");
        assert_eq!(server.event_writes(), 3, "{:#?}", server.requests());
        assert_eq!(server.events().len(), 1);
        assert_eq!(recorder.failures(), 0);
    })
    .await;
}
