//! The real `lb run --source kube` agent against the fake API server (`lab::fake_apiserver`, a
//! mock: no API server can run here), talking over loopback: Services and EndpointSlices reach
//! the pinned maps, a change is applied, and an invalid Service is skipped with a Kubernetes
//! Event while the others keep working. No NIC or cgroup is attached: this is about the source.

use std::{
    path::Path,
    process::{Child, Command},
    time::Duration,
};

use lab::{
    fake_apiserver::{FakeApiServer, Resource},
    lab::{Cgroup, Lab, PinDir, ScratchDir, wait_for_log},
    peer::sibling_binary,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

/// The agent process; killed on drop.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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
    // Something to attach to (lb run refuses to start without): socket hooks on a private cgroup.
    let cgroup = Cgroup::new(&lab, "kube").expect("cgroup");
    let server = FakeApiServer::start().await.expect("fake API server");
    let kubeconfig = scratch.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
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

    let log = scratch.path().join("agent.log");
    let output = std::fs::File::create(&log).expect("log");
    let _agent = Agent(
        Command::new(sibling_binary("lb").expect("lb binary"))
            .args(["run", "--source", "kube", "--kubeconfig"])
            .arg(&kubeconfig)
            .args(["--hostname-override", "node1", "--pin-dir"])
            .arg(pins.path())
            .arg("--cgroup-path")
            .arg(cgroup.path())
            // This agent runs in the machine's own namespace: its HTTP endpoints take free
            // loopback ports, never the well-known ones other agents (or tests) may hold.
            .args(["--metrics-bind-address", "127.0.0.1:0"])
            .args(["--healthz-bind-address", "127.0.0.1:0"])
            .stdout(output.try_clone().expect("log"))
            .stderr(output)
            .spawn()
            .expect("start lb run"),
    );
    let wait = |count: usize| {
        let log = log.clone();
        tokio::task::spawn_blocking(move || wait_for_log(&log, "synced", count, WAIT))
    };
    wait(1).await.expect("join").expect("first sync");
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
    // And counted: the sync reports one invalid object, one skipped since the start.
    let text = std::fs::read_to_string(&log).expect("log");
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
