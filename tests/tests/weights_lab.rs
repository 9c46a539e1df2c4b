//! Endpoint weights (`lb.io/endpoint-weights`) with the real agent in the lab: a canary at 10%
//! with two pods, where Kubernetes' own canary pattern needs nine stable replicas for one canary.
//! 4,000 connections split 90/10 within 2 points, from a pod through the socket hooks (random
//! selection from the weighted table) and from outside through XDP with Maglev (the weighted
//! lookup table).

use lab::{
    agent::{AgentLab, POD_PORT, endpoint_slice},
    peer::{ClientReport, ClientRun},
    topology::{node_addr, pod_addr},
};

const CONNECTIONS: u64 = 4000;

/// The Service `web` (ClusterIP 10.96.0.10:80, nodePort 30080) with n1p0 weighing 9 and n2p0
/// 1, keyed by address (the lab's slices name no pods), and the extra annotations.
fn weighted_web(extra_annotations: &str) -> String {
    let weights = format!("{}=9, {}=1", pod_addr(1, 0), pod_addr(2, 0));
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\n  annotations: {{lb.io/endpoint-weights: \"{weights}\"{extra_annotations}}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  ports:\n  - {{name: http, port: 80, targetPort: {POD_PORT}, nodePort: 30080}}\n---\n"
    ) + &endpoint_slice(
        "web",
        &[(pod_addr(1, 0), "node1"), (pod_addr(2, 0), "node2")],
    )
}

/// n1p0's share of the answers is 90% within 2 points, every request answered.
#[track_caller]
fn assert_split(report: &ClientReport, what: &str) {
    report.assert_all_ok(what);
    let heavy = report.by_server.get("n1p0").copied().unwrap_or(0);
    let light = report.by_server.get("n2p0").copied().unwrap_or(0);
    assert_eq!(heavy + light, CONNECTIONS, "{what}: {report:?}");
    let share = heavy as f64 / CONNECTIONS as f64;
    eprintln!("{what}: n1p0 answered {:.2}%", share * 100.0);
    assert!(
        (0.88..=0.92).contains(&share),
        "{what}: n1p0 answered {:.1}% ({heavy} of {CONNECTIONS})",
        share * 100.0
    );
}

#[test]
fn a_weighted_service_splits_connections_90_10_through_the_socket_hooks() {
    let mut setup = AgentLab::new().expect("lab");
    setup.start_agent(&[]).expect("agent");
    setup.apply("web.yaml", &weighted_web("")).expect("apply");
    let report = ClientRun::tcp("10.96.0.10:80", CONNECTIONS)
        .run(setup.client_pod(), Some(&setup.cgroup))
        .expect("client");
    assert_split(&report, "ClusterIP from a pod");
    // lb services shows each backend once, with its cells: the weights reduced, 9 and 1.
    let services = lb_userspace::observe::inspect::PinnedMaps::open(setup.pin_dir())
        .expect("pinned maps")
        .services()
        .expect("services");
    let web = services
        .iter()
        .find(|service| service.name.starts_with("default/web:"))
        .expect("web");
    assert_eq!(
        web.backends,
        [
            format!("{}:{POD_PORT} x9", pod_addr(1, 0)),
            format!("{}:{POD_PORT}", pod_addr(2, 0)),
        ]
    );
}

#[test]
fn a_weighted_maglev_service_splits_flows_90_10_through_xdp() {
    let mut setup = AgentLab::new().expect("lab");
    setup.start_agent(&[]).expect("agent");
    setup
        .apply("web.yaml", &weighted_web(", lb.io/load-balancing: maglev"))
        .expect("apply");
    let node_port = format!("{}:30080", node_addr(1));
    let report = ClientRun::tcp(&node_port, CONNECTIONS)
        .run(&setup.cluster.client, None)
        .expect("client");
    assert_split(&report, "NodePort from outside, Maglev");
}
