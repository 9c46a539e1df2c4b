//! The real `lb run --source kube` agent against the fake API server (`lab::kube_agent`, with
//! `lab::fake_apiserver`, a mock: no API server can run here), talking over loopback: Services
//! and EndpointSlices reach the pinned maps, a change is applied, an invalid Service is
//! skipped with a Kubernetes Event while the others keep working, and an endpoint that fails its
//! health check and passes again is evented on its Service.

use std::{path::Path, time::Duration};

use lab::{
    fake_apiserver::{FakeApiServer, Resource},
    kube_agent::{KubeAgent, WAIT},
    lab::{Lab, PinDir, ScratchDir},
};
use serde_json::json;

fn frontend_addresses(pin_dir: &Path) -> Vec<std::net::Ipv4Addr> {
    let map = aya::maps::MapData::from_pin(pin_dir.join(lb_common::map_names::FRONTENDS4))
        .expect("pinned frontends");
    let frontends =
        aya::maps::HashMap::<_, lb_common::Frontend4Key, lb_common::ServiceValue>::try_from(
            aya::maps::Map::HashMap(map),
        )
        .expect("hash map");
    let mut addresses: Vec<_> = frontends
        .keys()
        .map(|key| std::net::Ipv4Addr::from(u32::from_be(key.expect("key").addr)))
        .collect();
    addresses.sort();
    addresses
}

fn service(name: &str, cluster_ip: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}")},
        "spec": {"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_follows_the_api_server_and_reports_bad_objects_as_events() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "kube").expect("pins");
    let scratch = ScratchDir::new(&lab, "kube").expect("scratch");
    let server = FakeApiServer::start().await.expect("fake API server");
    server.apply(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}
    }));
    server.apply(service("web", "10.96.0.10"));
    server.apply(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.1.10"], "nodeName": "node1", "conditions": {"ready": true}}]
    }));
    server.apply(service("broken", "10.96.0.300"));

    let agent = KubeAgent::start(&lab, &pins, &scratch, &server, &[]).expect("lb run");
    agent.wait_for("synced", 1).await;
    // web is programmed (its ClusterIP); broken is skipped, with a Warning Event.
    assert_eq!(
        frontend_addresses(pins.path()),
        ["10.96.0.10".parse::<std::net::Ipv4Addr>().expect("ip")]
    );
    let deadline = std::time::Instant::now() + WAIT;
    let event = loop {
        if let Some(event) = server
            .events()
            .into_iter()
            .find(|event| event["reason"] == "InvalidClusterIP")
        {
            break event;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no Event for the invalid Service: {:?}",
            server.events()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(event["regarding"]["name"], "broken", "{event}");
    assert_eq!(event["type"], "Warning", "{event}");
    // The full reference, by which kubectl describe finds the Event.
    let stored = server
        .object(Resource::Services, "default", "broken")
        .expect("stored");
    assert_eq!(
        event["regarding"]["uid"], stored["metadata"]["uid"],
        "{event}"
    );
    assert_eq!(
        event["regarding"]["resourceVersion"], stored["metadata"]["resourceVersion"],
        "{event}"
    );
    assert_eq!(event["regarding"]["apiVersion"], "v1", "{event}");
    assert_eq!(event["regarding"]["kind"], "Service", "{event}");
    assert_eq!(event["regarding"]["namespace"], "default", "{event}");
    // And counted: the sync reports one invalid object, one skipped since the start.
    let text = agent.text();
    assert!(
        text.contains("invalid_objects=1") && text.contains("skipped_total=1"),
        "{text}"
    );

    // A change in the API server reaches the maps: another Service, and web deleted.
    server.apply(service("api", "10.96.0.20"));
    server.delete(Resource::Services, "default", "web");
    let deadline = std::time::Instant::now() + WAIT;
    while frontend_addresses(pins.path())
        != ["10.96.0.20".parse::<std::net::Ipv4Addr>().expect("ip")]
    {
        assert!(
            std::time::Instant::now() < deadline,
            "maps hold {:?}",
            frontend_addresses(pins.path())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn slice(name: &str, service: &str, address: &str) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [address], "nodeName": "node1", "conditions": {"ready": true}}]
    })
}

fn service_not_found_events(server: &FakeApiServer) -> Vec<serde_json::Value> {
    server
        .events()
        .into_iter()
        .filter(|event| event["reason"] == "ServiceNotFound")
        .collect()
}

/// Services and EndpointSlices arrive on separate watches: a slice created before its Service,
/// or left for the garbage collector after its Service's deletion, is no mistake and gets no
/// warning. A slice whose Service stays missing past the grace period gets exactly one. A
/// Service of another proxy (and its slice) is never sent to the agent, so never programmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_slice_whose_service_stays_missing_is_reported() {
    const GRACE: Duration = Duration::from_secs(2);
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "kubegrace").expect("pins");
    let scratch = ScratchDir::new(&lab, "kubegrace").expect("scratch");
    let server = FakeApiServer::start().await.expect("fake API server");
    server.apply(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}
    }));
    let mut other = service("other", "10.96.1.99");
    other["metadata"]["labels"] =
        json!({"service.kubernetes.io/service-proxy-name": "other-proxy"});
    server.apply(other);
    let mut other_slice = slice("other-1", "other", "10.244.9.9");
    other_slice["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] =
        json!("other-proxy");
    server.apply(other_slice);
    let agent = KubeAgent::start(
        &lab,
        &pins,
        &scratch,
        &server,
        &["--missing-service-grace", "2s"],
    )
    .expect("lb run");
    agent.wait_for("synced", 1).await;

    // Pairs in both orders, each half seen by a sync of its own (the source publishes after
    // 50 ms without changes).
    for i in 0..4 {
        let name = format!("pair{i}");
        let cluster_ip = format!("10.96.1.{}", 10 + i);
        let slice = slice(&format!("{name}-1"), &name, &format!("10.244.1.{}", 10 + i));
        if i % 2 == 0 {
            server.apply(slice);
            tokio::time::sleep(Duration::from_millis(300)).await;
            server.apply(service(&name, &cluster_ip));
        } else {
            server.apply(service(&name, &cluster_ip));
            tokio::time::sleep(Duration::from_millis(300)).await;
            server.apply(slice);
        }
    }
    // A Service deleted, its slice collected well after the grace period.
    server.delete(Resource::Services, "default", "pair0");
    tokio::time::sleep(GRACE * 2).await;
    server.delete(Resource::EndpointSlices, "default", "pair0-1");
    // A slice whose Service never comes.
    server.apply(slice("lonely-1", "lonely", "10.244.2.2"));

    let deadline = std::time::Instant::now() + WAIT;
    while service_not_found_events(&server).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no ServiceNotFound Event for lonely-1: {:#?}\n{}",
            server.events(),
            agent.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And nothing more, however long it lasts.
    tokio::time::sleep(GRACE * 2).await;
    let events = service_not_found_events(&server);
    assert_eq!(events.len(), 1, "{events:#?}\n{}", agent.text());
    assert_eq!(events[0]["regarding"]["name"], "lonely-1");
    assert_eq!(events[0]["regarding"]["kind"], "EndpointSlice");
    assert_eq!(events[0]["regarding"]["apiVersion"], "discovery.k8s.io/v1");
    let stored = server
        .object(Resource::EndpointSlices, "default", "lonely-1")
        .expect("stored");
    assert_eq!(events[0]["regarding"]["uid"], stored["metadata"]["uid"]);
    let text = agent.text();
    let skipped: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("skipped") && line.contains("ServiceNotFound"))
        .collect();
    assert_eq!(skipped.len(), 1, "{text}");
    assert!(skipped[0].contains("lonely-1"), "{text}");

    // pair1..3 are programmed; pair0 is gone; the other proxy's Service never came.
    let expected: Vec<std::net::Ipv4Addr> = ["10.96.1.11", "10.96.1.12", "10.96.1.13"]
        .iter()
        .map(|ip| ip.parse().expect("ip"))
        .collect();
    assert_eq!(frontend_addresses(pins.path()), expected, "{text}");
}

/// An Event the API server refuses (403 without the RBAC rule) is retried, then given up on:
/// the log says what the API server answered, and lb_event_publish_failures_total counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_event_is_logged_with_the_api_servers_answer_and_counted() {
    const FORBIDDEN: &str = "events.events.k8s.io is forbidden: User \"system:serviceaccount:kube-system:lb\" cannot create resource \"events\" in API group \"events.k8s.io\" in the namespace \"default\"";
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "kube403").expect("pins");
    let scratch = ScratchDir::new(&lab, "kube403").expect("scratch");
    let server = FakeApiServer::start().await.expect("fake API server");
    server.fail_events(usize::MAX, 403, "Forbidden", FORBIDDEN);
    server.apply(service("broken", "10.96.0.300"));
    let agent = KubeAgent::start(&lab, &pins, &scratch, &server, &[]).expect("lb run");
    agent.wait_for("synced", 1).await;
    let lines = agent.wait_for("could not publish an Event", 1).await;
    assert!(
        lines[0].contains("403 Forbidden") && lines[0].contains("cannot create resource"),
        "{}",
        agent.text()
    );
    assert!(lines[0].contains("failed 5 times"), "{}", agent.text());
    assert_eq!(server.event_writes(), 5, "{:#?}", server.requests());
    assert_eq!(
        agent.metric("lb_event_publish_failures_total"),
        Some(1.0),
        "{}",
        agent.text()
    );
}

/// The first Event with `reason`, waiting for it up to [`WAIT`].
async fn event_with_reason(server: &FakeApiServer, reason: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(event) = server
            .events()
            .into_iter()
            .find(|event| event["reason"] == reason)
        {
            return event;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {reason} Event: {:?}",
            server.events()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_its_health_check_and_passing_again_is_evented_on_its_service() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "kubehealth").expect("pins");
    let scratch = ScratchDir::new(&lab, "kubehealth").expect("scratch");
    let server = FakeApiServer::start().await.expect("fake API server");
    // This agent runs in the machine's own namespace: its endpoint is a loopback port, which
    // refuses connections until the test listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free loopback port")
        .local_addr()
        .expect("address")
        .port();
    let mut web = service("web", "10.96.0.10");
    web["metadata"]["annotations"] = json!({
        "lb.io/health-check": "tcp",
        "lb.io/health-check-interval": "200ms",
        "lb.io/health-check-timeout": "100ms",
    });
    server.apply(web);
    let mut web_slice = slice("web-1", "web", "127.0.0.1");
    web_slice["ports"][0]["port"] = json!(port);
    server.apply(web_slice);

    let agent = KubeAgent::start(&lab, &pins, &scratch, &server, &[]).expect("lb run");
    let failed = event_with_reason(&server, "EndpointHealthCheckFailed").await;
    assert_eq!(failed["type"], "Warning", "{failed}");
    assert_eq!(failed["regarding"]["kind"], "Service", "{failed}");
    assert_eq!(failed["regarding"]["name"], "web", "{failed}");
    let note = failed["note"].as_str().unwrap_or_default();
    assert!(
        note.starts_with(&format!(
            "endpoint 127.0.0.1:{port} failed 2 health checks in a row (connect: "
        )),
        "{note}"
    );
    // Its only endpoint: kept in rotation (fail open), with a Warning saying so.
    event_with_reason(&server, "HealthCheckFailOpen").await;

    let _listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("listening");
    let passed = event_with_reason(&server, "EndpointHealthCheckPassed").await;
    assert_eq!(passed["type"], "Normal", "{passed}");
    assert_eq!(passed["regarding"]["name"], "web", "{passed}");
    agent.wait_for("back in rotation", 1).await;
}

/// An agent with lb's XDP on its node's NIC marks its Node as taking DSR options with the boot
/// it runs in, after its first sync, and marks it again when the mark is gone (the Node object
/// written anew). Other nodes send flows by DSR only to endpoints on Nodes so marked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_xdp_on_its_nics_marks_its_node_as_taking_dsr_options() {
    let (_setup, server) = tokio::task::block_in_place(|| lab::kube_agent::lab_agent(|_| {}))
        .expect("the agent in the lab");
    let boot = lab::kube_agent::boot_id();
    assert_eq!(
        lab::kube_agent::wait_for_dsr_mark(&server, WAIT).await,
        Some(boot.clone()),
        "{:#?}",
        server.requests()
    );
    // The Node written again without the mark: the agent writes it again (a write at most
    // every 5 s).
    server.apply(lab::kube_agent::node1_booted());
    assert_eq!(
        lab::kube_agent::wait_for_dsr_mark(&server, WAIT).await,
        Some(boot),
        "{:#?}",
        server.requests()
    );
    let patches = server
        .requests()
        .iter()
        .filter(|request| request.starts_with("PATCH /api/v1/nodes/node1"))
        .count();
    assert_eq!(patches, 2, "{:#?}", server.requests());
}

/// node1's agent's `sample` on /metrics, which must be there.
fn node1_metric(setup: &lab::agent::AgentLab, sample: &str) -> f64 {
    tokio::task::block_in_place(|| setup.metric(sample))
        .expect("GET /metrics")
        .unwrap_or_else(|| panic!("no {sample} on /metrics"))
}

/// Waits until node1's agent has counted `failures` refused writes of its DSR mark; panics
/// after `within` with the requests the API server saw.
async fn wait_for_mark_failures(
    setup: &lab::agent::AgentLab,
    server: &FakeApiServer,
    failures: f64,
    within: Duration,
) {
    let deadline = std::time::Instant::now() + within;
    while node1_metric(setup, "lb_dsr_mark_write_failures_total") < failures {
        assert!(
            std::time::Instant::now() < deadline,
            "{:#?}",
            server.requests()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_dsr_mark_is_refused_counts_the_refusals_and_says_the_mark_is_missing() {
    // A missing RBAC rule: every patch of the Node refused until the test lifts it.
    let (setup, server) = tokio::task::block_in_place(|| {
        lab::kube_agent::lab_agent(|server| {
            server.fail_node_patches(
                usize::MAX,
                403,
                "Forbidden",
                "nodes \"node1\" is forbidden: cannot patch resource \"nodes\"",
            );
        })
    })
    .expect("the agent in the lab");
    let metric = |sample: &str| node1_metric(&setup, sample);
    // A write at most every 5 s: two refusals take 5 s and more.
    wait_for_mark_failures(&setup, &server, 2.0, WAIT + Duration::from_secs(10)).await;
    assert_eq!(metric("lb_dsr_mark_missing"), 1.0);
    assert_eq!(metric("lb_dsr_nodes"), 0.0);
    let log = std::fs::read_to_string(setup.log()).expect("log");
    let warnings = log
        .lines()
        .filter(|line| line.contains("DSR mark was not written"))
        .collect::<Vec<_>>();
    // The first refusal is logged with the API server's answer; the next wait a minute.
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("cannot patch resource"), "{log}");

    server.fail_node_patches(0, 403, "Forbidden", "lifted");
    let boot = lab::kube_agent::boot_id();
    assert_eq!(
        lab::kube_agent::wait_for_dsr_mark(&server, WAIT).await,
        Some(boot),
        "{:#?}",
        server.requests()
    );
    // The Node's change reaches the agent's next sync, which sees the mark in place.
    let deadline = std::time::Instant::now() + WAIT;
    while metric("lb_dsr_mark_missing") != 0.0 || metric("lb_dsr_nodes") != 1.0 {
        assert!(std::time::Instant::now() < deadline, "the mark's gauges");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failures = metric("lb_dsr_mark_write_failures_total");
    assert!(failures >= 2.0, "{failures}");
    let log = std::fs::read_to_string(setup.log()).expect("log");
    assert!(
        log.lines().any(
            |line| line.contains("marked this node as taking DSR options")
                && line.contains(&format!("failed_writes={failures}"))
        ),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_whose_tokens_name_no_node_the_admission_policy_refuses_the_mark() {
    // deploy/admission-policy.yaml on a cluster that binds no node to ServiceAccount tokens
    // (before Kubernetes 1.30): the agent's own patch is refused, counted, and the API server's
    // reason logged; the Node keeps no mark, so other nodes reach its endpoints by SNAT.
    let (setup, server) = tokio::task::block_in_place(|| {
        lab::kube_agent::lab_agent(|server| {
            server.admit_node_patches(
                lab::admission::Policy::of_deploy().expect("the policy"),
                lab::admission::Requester::lb_agent_without_node_claim(),
            );
        })
    })
    .expect("the agent in the lab");
    let metric = |sample: &str| node1_metric(&setup, sample);
    wait_for_mark_failures(&setup, &server, 1.0, WAIT).await;
    assert_eq!(metric("lb_dsr_mark_missing"), 1.0);
    let log = std::fs::read_to_string(setup.log()).expect("log");
    assert!(
        log.lines()
            .any(|line| line.contains("DSR mark was not written")
                && line.contains("ValidatingAdmissionPolicy 'lb-own-node-dsr-mark'")
                && line.contains("authentication.kubernetes.io/node-name claim")),
        "{log}"
    );
    let node = server.object(Resource::Nodes, "", "node1").expect("node1");
    assert!(
        node["metadata"]["annotations"]
            .get(lb_userspace::source::DIRECT_RETURN_MARK)
            .is_none(),
        "{node:#}"
    );
}

/// `lb run --cleanup --source kube` in node1's namespace, against the lab's API server (or
/// `extra`'s `--master`), for the lab agent's pins; its exit status and log (stderr).
fn cleanup_node1(setup: &lab::agent::AgentLab, extra: &[&str]) -> (bool, String) {
    let lb = lab::peer::sibling_binary("lb").expect("lb");
    let kubeconfig = setup.scratch_file("kubeconfig");
    let pin_dir = setup.pin_dir().to_owned();
    let mut args = vec![
        "run",
        "--cleanup",
        "--source",
        "kube",
        "--kubeconfig",
        kubeconfig.to_str().expect("path"),
        "--hostname-override",
        "node1",
        "--pin-dir",
        pin_dir.to_str().expect("path"),
    ];
    args.extend_from_slice(extra);
    let output = tokio::task::block_in_place(|| setup.cluster.node(1).host.output(&lb, &args))
        .expect("lb run --cleanup");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_removes_the_nodes_dsr_mark_and_detaches_even_when_the_api_server_refuses() {
    let (mut setup, server) = tokio::task::block_in_place(|| lab::kube_agent::lab_agent(|_| {}))
        .expect("the agent in the lab");
    assert_eq!(
        lab::kube_agent::wait_for_dsr_mark(&server, WAIT).await,
        Some(lab::kube_agent::boot_id()),
        "{:#?}",
        server.requests()
    );
    setup.kill_agent().expect("stop the agent");
    let pin_dir = setup.pin_dir().to_owned();
    let cleanup = |setup: &lab::agent::AgentLab| {
        let (succeeded, log) = cleanup_node1(setup, &[]);
        assert!(succeeded, "{log}");
        log
    };

    // The API server refuses: the datapath is detached all the same, and the log says how to
    // remove the mark by hand.
    server.fail_node_patches(usize::MAX, 403, "Forbidden", "cannot patch resource nodes");
    let log = cleanup(&setup);
    assert!(
        !pin_dir.exists(),
        "{} still there\n{log}",
        pin_dir.display()
    );
    assert!(
        log.contains("DSR mark was not removed")
            && log.contains("cannot patch resource nodes")
            && log.contains("kubectl annotate node node1 lb.io/dsr-boot-id-"),
        "{log}"
    );
    assert!(
        lab::kube_agent::wait_for_dsr_mark(&server, Duration::ZERO)
            .await
            .is_some()
    );

    // Allowed: the mark goes (and there is nothing left to detach).
    server.fail_node_patches(0, 403, "Forbidden", "lifted");
    let log = cleanup(&setup);
    assert!(log.contains("removed this node's DSR mark"), "{log}");
    assert_eq!(
        lab::kube_agent::wait_for_dsr_mark(&server, Duration::ZERO).await,
        None,
        "{:#?}",
        server.object(Resource::Nodes, "", "node1")
    );
    // The rest of the Node is as it was.
    let node = server.object(Resource::Nodes, "", "node1").expect("node1");
    assert_eq!(
        node["status"]["nodeInfo"]["bootID"],
        json!(lab::kube_agent::boot_id())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_gives_up_on_an_api_server_that_never_answers_and_detaches() {
    let (mut setup, server) = tokio::task::block_in_place(|| lab::kube_agent::lab_agent(|_| {}))
        .expect("the agent in the lab");
    assert!(
        lab::kube_agent::wait_for_dsr_mark(&server, WAIT)
            .await
            .is_some()
    );
    setup.kill_agent().expect("stop the agent");
    // An API server that takes connections (the kernel's backlog) and never answers, in node1's
    // namespace.
    let silent = {
        let _inside = setup
            .cluster
            .node(1)
            .host
            .enter()
            .expect("node1's namespace");
        std::net::TcpListener::bind("127.0.0.1:0").expect("listener")
    };
    let master = format!("http://{}", silent.local_addr().expect("address"));
    let pin_dir = setup.pin_dir().to_owned();
    let started = std::time::Instant::now();
    let (succeeded, log) = cleanup_node1(&setup, &["--master", &master]);
    let took = started.elapsed();
    assert!(succeeded, "{log}");
    assert!(
        !pin_dir.exists(),
        "{} still there\n{log}",
        pin_dir.display()
    );
    assert!(
        log.contains("DSR mark was not removed") && log.contains("no answer from the API server"),
        "{log}"
    );
    // It gave the API server the whole 10 s before giving up.
    assert!(took >= Duration::from_secs(10), "{took:?}\n{log}");
    drop(silent);
}
