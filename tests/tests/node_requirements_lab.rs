//! The agent checks what its datapath needs from the node, at start and on every sync: here
//! node1 has IPv4 forwarding off while an endpoint lives on node2. The agent (kube source, the
//! tests' API server listening inside node1's network namespace) says so in its log, as a
//! Warning Event on its Node (with the Node's uid, so `kubectl describe node` shows it) and in
//! `lb_node_requirement_missing`; once forwarding is back, the metric drops to 0.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use lab::{
    agent::AgentLab,
    fake_apiserver::{FakeApiServer, Resource},
    http,
    lab::{Host, wait_for_log},
    peer::sibling_binary,
    topology::{FABRIC_IFACE, pod_addr},
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);
const METRICS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 10249);

fn requirement_metric(node: &Host, requirement: &str) -> Option<String> {
    let page = http::get(node, METRICS, "/metrics")
        .expect("GET /metrics")
        .body;
    let sample = format!(
        "lb_node_requirement_missing{{requirement=\"{requirement}\",interface=\"{FABRIC_IFACE}\"}} "
    );
    page.lines()
        .find_map(|line| line.strip_prefix(&sample).map(str::to_owned))
}

fn wait_for_metric(node: &Host, requirement: &str, value: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let current = requirement_metric(node, requirement);
        if current.as_deref() == Some(value) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{requirement}: {current:?}, want {value}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn service(name: &str, cluster_ip: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}")},
        "spec": {"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_off_with_a_remote_endpoint_is_logged_evented_and_measured() {
    let setup = AgentLab::new().expect("lab");
    let node = &setup.cluster.node(1).host;
    let server = {
        // Bound inside node1's namespace, where the agent runs; served by the runtime's workers.
        let _inside = node.enter().expect("enter node1");
        FakeApiServer::start().await.expect("fake API server")
    };
    let kubeconfig = setup.manifests().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    server.apply(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node1"},
        "status": {"addresses": [{"type": "InternalIP", "address": "203.0.113.1"}]}
    }));
    server.apply(service("web", "10.96.0.10"));
    server.apply(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [pod_addr(2, 0).to_string()], "nodeName": "node2", "conditions": {"ready": true}}]
    }));
    node.sysctl("net.ipv4.ip_forward", "0")
        .expect("forwarding off");

    let log = setup.manifests().join("agent.log");
    let lb = sibling_binary("lb").expect("lb");
    let args = [
        "run",
        "--source",
        "kube",
        "--kubeconfig",
        kubeconfig.to_str().expect("UTF-8 path"),
        "--hostname-override",
        "node1",
        "--interfaces",
        FABRIC_IFACE,
        "--cgroup-path",
        setup.cgroup.path().to_str().expect("UTF-8 path"),
        "--pin-dir",
        setup.pin_dir().to_str().expect("UTF-8 path"),
    ];
    let _agent = node.spawn_logged(&lb, &args, None, &log).expect("lb run");
    wait_for_log(&log, "synced", 1, WAIT).expect("first sync");

    wait_for_metric(node, "ip_forward", "1");
    wait_for_metric(node, "accept_local", "0");
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        text.contains("net.ipv4.conf.eth0.forwarding is 0 (want 1)"),
        "{text}"
    );
    let deadline = Instant::now() + WAIT;
    let event = loop {
        if let Some(event) = server
            .events()
            .into_iter()
            .find(|event| event["reason"] == "NodeRequirementMissing")
        {
            break event;
        }
        assert!(Instant::now() < deadline, "no Event: {:?}", server.events());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(event["type"], "Warning", "{event}");
    assert_eq!(event["regarding"]["kind"], "Node", "{event}");
    assert_eq!(event["regarding"]["name"], "node1", "{event}");
    let node_object = server
        .object(Resource::Nodes, "", "node1")
        .expect("the Node");
    assert_eq!(
        event["regarding"]["uid"], node_object["metadata"]["uid"],
        "{event}"
    );
    assert!(
        event["note"]
            .as_str()
            .is_some_and(|note| note.contains("forwarding is 0")),
        "{event}"
    );

    // Forwarding back on: the next sync (any change) finds it and says so.
    node.sysctl("net.ipv4.ip_forward", "1")
        .expect("forwarding on");
    server.apply(service("api", "10.96.0.20"));
    wait_for_metric(node, "ip_forward", "0");
    wait_for_log(&log, "node requirement met again", 1, WAIT).expect("logged");
}
