//! Who serves a Service address, with the real agent in the lab (file source, socket hooks on the
//! test's cgroup, real TCP clients in a pod):
//! - a hijacking Service whose externalIP is another Service's ClusterIP (older than it, its name
//!   sorting first) changes nothing for the owner's clients, before, while and after it arrives;
//!   when the owner is deleted, the hijacker's claim takes the address over;
//! - the socket hooks translate every process of their cgroup (the host's cgroup root in
//!   production), so an externalIP equal to some address a node talks to (here the "API server",
//!   a server in another pod) redirects those connections; `--external-ip-cidrs` prevents it.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use lab::{
    agent::{AgentLab, POD_PORT, endpoint_slice},
    http,
    peer::ClientRun,
    topology::pod_addr,
};

const METRICS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 10249);

/// A Service `name` with the given metadata and spec lines (each indented two spaces), port
/// `port` to the pods' servers.
fn service(name: &str, metadata: &str, spec: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n{metadata}spec:\n{spec}  ports:\n  - {{name: http, port: {port}, targetPort: {POD_PORT}}}\n"
    )
}

/// The agent's log so far.
fn log(setup: &AgentLab) -> String {
    std::fs::read_to_string(setup.log()).unwrap_or_default()
}

#[test]
fn a_service_claiming_another_services_cluster_ip_changes_nothing_for_its_clients() {
    let mut setup = AgentLab::new().expect("lab");
    setup.start_agent(&[]).expect("agent");
    // The owner: 10.96.0.10:80, its endpoint n2p0.
    setup
        .apply(
            "frontend.yaml",
            &(service(
                "frontend",
                "  creationTimestamp: \"2026-06-01T00:00:00Z\"\n  uid: uid-frontend\n",
                "  clusterIP: 10.96.0.10\n",
                80,
            ) + "---\n"
                + &endpoint_slice("frontend", &[(pod_addr(2, 0), "node2")])),
        )
        .expect("apply");
    let before = ClientRun::tcp("10.96.0.10:80", 20)
        .run(setup.client_pod(), Some(&setup.cgroup))
        .expect("client");
    before.assert_all_ok("the owner's clients before");
    assert_eq!(before.servers(), ["n2p0"].into(), "{before:?}");

    // The hijacker: older, sorts first, claims 10.96.0.10:80 as an externalIP for its own pod
    // n1p0. It arrives while a client keeps connecting.
    let hijacker = service(
        "aa-dup",
        "  creationTimestamp: \"2026-01-01T00:00:00Z\"\n  uid: uid-dup\n",
        "  clusterIP: 10.96.0.99\n  externalIPs: [10.96.0.10]\n",
        80,
    ) + "---\n"
        + &endpoint_slice("aa-dup", &[(pod_addr(1, 0), "node1")]);
    let ready = setup.scratch_file("client.ready");
    let during = std::thread::scope(|scope| {
        let client = scope.spawn(|| {
            ClientRun {
                interval_ms: 20,
                ready_file: Some(&ready),
                ..ClientRun::tcp("10.96.0.10:80", 100)
            }
            .run(setup.client_pod(), Some(&setup.cgroup))
        });
        lab::peer::wait_until_answered(&ready, Duration::from_secs(10)).expect("client under way");
        setup.apply("aa-dup.yaml", &hijacker).expect("apply");
        client.join().expect("thread").expect("client")
    });
    during.assert_all_ok("the owner's clients while the hijacker arrives");
    assert_eq!(during.servers(), ["n2p0"].into(), "{during:?}");
    let after = ClientRun::tcp("10.96.0.10:80", 100)
        .run(setup.client_pod(), Some(&setup.cgroup))
        .expect("client");
    after.assert_all_ok("the owner's clients after");
    assert_eq!(after.servers(), ["n2p0"].into(), "{after:?}");
    let log = log(&setup);
    assert!(
        log.lines().any(|line| line.contains("FrontendConflict")
            && line.contains("default/aa-dup")
            && line.contains("default/frontend:http/TCP serves it")),
        "the hijacker is reported, naming the owner:\n{log}"
    );

    // The hijacker loses that frontend only: its own ClusterIP serves its pod.
    let own = ClientRun::tcp("10.96.0.99:80", 10)
        .run(setup.client_pod(), Some(&setup.cgroup))
        .expect("client");
    own.assert_all_ok("the hijacker's own ClusterIP");
    assert_eq!(own.servers(), ["n1p0"].into(), "{own:?}");

    // Once the owner is gone the address is free, and the remaining claim serves it.
    setup.delete("frontend.yaml").expect("delete");
    let taken_over = ClientRun::tcp("10.96.0.10:80", 10)
        .run(setup.client_pod(), Some(&setup.cgroup))
        .expect("client");
    taken_over.assert_all_ok("the externalIP after the owner left");
    assert_eq!(taken_over.servers(), ["n1p0"].into(), "{taken_over:?}");
}

#[test]
fn external_ip_cidrs_keep_an_external_ip_from_redirecting_the_nodes_own_connections() {
    let mut setup = AgentLab::new().expect("lab");
    // The "API server": n2p0's server, which processes under the hooks reach directly.
    let api_server = format!("{}:{POD_PORT}", pod_addr(2, 0));
    let evil = service(
        "evil",
        "",
        &format!(
            "  clusterIP: 10.96.0.66\n  externalIPs: [{}]\n",
            pod_addr(2, 0)
        ),
        POD_PORT,
    ) + "---\n"
        + &endpoint_slice("evil", &[(pod_addr(1, 0), "node1")]);
    let allowed = service(
        "public",
        "",
        "  clusterIP: 10.96.0.67\n  externalIPs: [192.0.2.10]\n",
        80,
    ) + "---\n"
        + &endpoint_slice("public", &[(pod_addr(1, 0), "node1")]);
    let to_api_server = |setup: &AgentLab| {
        ClientRun::tcp(&api_server, 10)
            .run(setup.client_pod(), Some(&setup.cgroup))
            .expect("client")
    };

    // Without --external-ip-cidrs (kube-proxy's default) the externalIP is served: every process
    // under the hooks that connects to the API server's address reaches the attacker's pod.
    setup.start_agent(&[]).expect("agent");
    setup.apply("evil.yaml", &evil).expect("apply");
    setup.apply("public.yaml", &allowed).expect("apply");
    let hijacked = to_api_server(&setup);
    hijacked.assert_all_ok("to the API server's address, no allow-list");
    assert_eq!(
        hijacked.servers(),
        ["n1p0"].into(),
        "the danger this guards against: {hijacked:?}"
    );

    // With an allow-list that does not hold it, the externalIP is skipped and reported; the
    // connections reach the API server itself, untranslated. An externalIP inside the list
    // still serves.
    setup.kill_agent().expect("kill");
    setup
        .start_agent(&["--external-ip-cidrs", "192.0.2.0/24"])
        .expect("agent");
    let direct = to_api_server(&setup);
    direct.assert_all_ok("to the API server's address, with the allow-list");
    assert_eq!(direct.servers(), ["n2p0"].into(), "{direct:?}");
    let log = log(&setup);
    assert!(
        log.lines().any(|line| line.contains("ExternalIPNotAllowed")
            && line.contains(&format!("externalIP {} is outside", pod_addr(2, 0)))),
        "the refused externalIP is reported:\n{log}"
    );
    let metrics = http::get(&setup.cluster.node(1).host, METRICS, "/metrics")
        .expect("GET /metrics")
        .body;
    assert!(
        metrics.lines().any(|line| line == "lb_invalid_objects 1"),
        "counted:\n{metrics}"
    );
    let public = ClientRun::tcp("192.0.2.10:80", 10)
        .run(setup.client_pod(), Some(&setup.cgroup))
        .expect("client");
    public.assert_all_ok("an externalIP inside --external-ip-cidrs");
    assert_eq!(public.servers(), ["n1p0"].into(), "{public:?}");
}
