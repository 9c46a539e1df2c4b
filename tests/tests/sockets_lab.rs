//! The socket hooks over the life of a socket, with the real agent in the lab: a pod's connected
//! UDP socket to a ClusterIP is aborted when its endpoint leaves the Service (so the application
//! reconnects to a live one instead of sending into the void, kubernetes#19029), and nothing else
//! is; one connected to a Service address before the Service existed is aborted when it comes; a
//! pod outside a LoadBalancer's loadBalancerSourceRanges cannot reach it through the socket hooks
//! either; and a socket names a pod as the Service only while the Service holds the address.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use lab::{
    agent::{
        AgentLab, POD_PORT, dual_stack_agent, endpoint_slice, endpoint_slice6, service_of_families,
    },
    http,
    peer::{ClientReport, ClientRun},
    topology::{pod_addr, pod_addr6},
};

const METRICS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 10249);

/// A UDP ClusterIP Service `dns` on 10.96.0.53:53 with the given endpoints (node, pod).
fn udp_service(endpoints: &[(u8, u8)]) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: default}}\nspec:\n  clusterIP: 10.96.0.53\n  ports:\n  - {{name: dns, port: 53, protocol: UDP, targetPort: {POD_PORT}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: dns-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: dns}}\naddressType: IPv4\nports:\n- {{name: dns, port: {POD_PORT}, protocol: UDP}}\nendpoints:\n"
    );
    for (node, pod) in endpoints {
        yaml.push_str(&format!(
            "- addresses: [\"{}\"]\n  nodeName: node{node}\n  conditions: {{ready: true}}\n",
            pod_addr(*node, *pod)
        ));
    }
    yaml
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// A value of the agent's /metrics, by its sample name (no labels).
fn metric(setup: &AgentLab, sample: &str) -> Option<f64> {
    let page = http::get(&setup.cluster.node(1).host, METRICS, "/metrics")
        .expect("GET /metrics")
        .body;
    page.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
}

/// One connected UDP socket, a request every 100 ms for ~4 s, a new socket after an error.
fn long_udp_client(to: &str) -> ClientRun<'_> {
    ClientRun {
        one_flow: true,
        reconnect: true,
        interval_ms: 100,
        timeout_ms: 1000,
        ..ClientRun::udp(to, 40)
    }
}

#[test]
fn a_connected_udp_socket_is_aborted_when_its_endpoint_leaves_and_reconnects_to_a_live_one() {
    let mut setup = AgentLab::new().expect("lab");
    setup.start_agent(&[]).expect("agent");
    let direct_target = format!("{}:{POD_PORT}", pod_addr(1, 0));
    udp_socket_aborted_when_its_endpoint_leaves(
        &setup,
        |node| udp_service(&[(node, 0)]),
        "10.96.0.53:53",
        &direct_target,
    );
}

/// The same for a dual-stack socket (AF_INET6) connected to the IPv4 Service's mapped address:
/// the kernel lists it among the IPv6 sockets, with the mapped peer.
#[test]
fn a_dual_stack_socket_connected_to_a_mapped_service_address_is_aborted_too() {
    let mut setup = AgentLab::new().expect("lab");
    setup.start_agent(&[]).expect("agent");
    let direct_target = format!("[::ffff:{}]:{POD_PORT}", pod_addr(1, 0));
    udp_socket_aborted_when_its_endpoint_leaves(
        &setup,
        |node| udp_service(&[(node, 0)]),
        "[::ffff:10.96.0.53]:53",
        &direct_target,
    );
}

/// The same over IPv6: a socket connected to an IPv6 ClusterIP (the kernel lists it among the
/// IPv6 sockets, its backend recorded in `lb6_sknat_v1`).
#[test]
fn a_connected_udp_socket_to_an_ipv6_service_is_aborted_when_its_endpoint_leaves() {
    let setup = dual_stack_agent();
    let manifest = |node: u8| {
        let node_name = format!("node{node}");
        service_of_families("dns", &["2001:db8:96::53"], "UDP", 53, "")
            + "---\n"
            + &endpoint_slice6("dns", &[(pod_addr6(node, 0), &node_name)], "UDP")
    };
    let direct_target = format!("[{}]:{POD_PORT}", pod_addr6(1, 0));
    udp_socket_aborted_when_its_endpoint_leaves(
        &setup,
        manifest,
        "[2001:db8:96::53]:53",
        &direct_target,
    );
}

/// In the pod, inside the hooks' cgroup: one UDP socket connected to `through_service` (the hook
/// sends it to n1p0, the Service's endpoint in `manifest(1)`), one connected to n1p0 itself at
/// `direct_target`, not through any Service. Then n1p0 leaves the Service for n2p0
/// (`manifest(2)`): the first socket is aborted once, within the sync, and its replacement
/// reaches n2p0; the second is not touched.
fn udp_socket_aborted_when_its_endpoint_leaves(
    setup: &AgentLab,
    manifest: impl Fn(u8) -> String,
    through_service: &str,
    direct_target: &str,
) {
    setup.apply("dns.yaml", &manifest(1)).expect("apply");
    let ready = [
        setup.scratch_file("through-service.ready"),
        setup.scratch_file("direct.ready"),
    ];
    let (through_service, direct, synced_ms) = std::thread::scope(|scope| {
        let (pod, cgroup) = (setup.client_pod(), &setup.cgroup);
        let through_service = scope.spawn(|| {
            ClientRun {
                ready_file: Some(&ready[0]),
                ..long_udp_client(through_service)
            }
            .run(pod, Some(cgroup))
        });
        let direct = scope.spawn(|| {
            ClientRun {
                ready_file: Some(&ready[1]),
                ..long_udp_client(direct_target)
            }
            .run(pod, Some(cgroup))
        });
        // Both sockets connected and answered by n1p0 before it leaves.
        for ready in &ready {
            lab::peer::wait_until_answered(ready, Duration::from_secs(10))
                .expect("client under way");
        }

        // n1p0 leaves the Service (its server keeps answering, as a pod that is still running
        // but no longer an endpoint does); n2p0 is the live endpoint now.
        setup.apply("dns.yaml", &manifest(2)).expect("apply");
        let synced_ms = unix_ms();
        (
            through_service.join().expect("thread"),
            direct.join().expect("thread"),
            synced_ms,
        )
    });
    let through_service: ClientReport = through_service.expect("client through the Service");
    let direct: ClientReport = direct.expect("direct client");

    // The socket was aborted once, within the sync: every request that started after the sync
    // went to the live endpoint; the one error is the aborted socket, and the client's new
    // socket reached n2p0.
    assert_eq!(through_service.errors, 1, "{through_service:?}");
    assert!(
        through_service.error_samples[0].contains("Destination address required")
            || through_service.error_samples[0].contains("abort"),
        "the socket was aborted, not timed out: {through_service:?}"
    );
    assert!(
        through_service.by_server.get("n1p0").copied().unwrap_or(0) > 0,
        "{through_service:?}"
    );
    let after_sync: Vec<_> = through_service
        .timeline
        .iter()
        .filter(|entry| entry.started_ms > synced_ms)
        .collect();
    assert!(!after_sync.is_empty(), "{through_service:?}");
    assert!(
        after_sync
            .iter()
            .all(|entry| entry.server.as_deref() != Some("n1p0")),
        "the departed endpoint answered after the sync: {through_service:?}"
    );
    assert_eq!(
        through_service.last_server.as_deref(),
        Some("n2p0"),
        "{through_service:?}"
    );
    assert!(
        after_sync
            .iter()
            .filter(|entry| entry.server.is_none())
            .count()
            <= 1,
        "{through_service:?}"
    );

    // The socket connected to the same address without a Service was not touched.
    direct.assert_all_ok("connected UDP socket to n1p0, not through a Service");
    assert_eq!(direct.servers(), ["n1p0"].into(), "{direct:?}");

    assert_eq!(metric(setup, "lb_udp_sockets_aborted_total"), Some(1.0));
    assert_eq!(
        metric(setup, "lb_udp_socket_abort_failures_total"),
        Some(0.0)
    );
}

#[test]
fn a_pod_outside_the_load_balancer_source_ranges_is_refused_one_inside_gets_through() {
    let mut setup = AgentLab::new().expect("lab");
    setup.start_agent(&[]).expect("agent");
    // n1p1 is inside the ranges, n1p0 is not; the endpoint is on node2.
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.10\n  loadBalancerSourceRanges: [{}/32]\n  ports:\n  - {{name: http, port: 80, targetPort: {POD_PORT}, nodePort: 30080}}\nstatus:\n  loadBalancer:\n    ingress: [{{ip: 198.51.100.20}}]\n",
        pod_addr(1, 1)
    );
    setup
        .apply(
            "web.yaml",
            &(service + "---\n" + &endpoint_slice("web", &[(pod_addr(2, 0), "node2")])),
        )
        .expect("apply");
    let (inside, outside) = (
        &setup.cluster.node(1).pods[1].host,
        &setup.cluster.node(1).pods[0].host,
    );

    let allowed = ClientRun::tcp("198.51.100.20:80", 10)
        .run(inside, Some(&setup.cgroup))
        .expect("client");
    allowed.assert_all_ok("pod inside the ranges");
    assert_eq!(allowed.servers(), ["n2p0"].into(), "{allowed:?}");
    assert_eq!(
        allowed.peers_seen.keys().collect::<Vec<_>>(),
        [&pod_addr(1, 1).to_string()],
        "the backend saw the pod's own address: {allowed:?}"
    );

    let before = setup.events().expect("events")["drop_source_range"];
    let refused = ClientRun {
        timeout_ms: 300,
        ..ClientRun::tcp("198.51.100.20:80", 2)
    }
    .run(outside, Some(&setup.cgroup))
    .expect("client");
    assert_eq!(refused.errors, 2, "{refused:?}");
    assert!(
        setup.events().expect("events")["drop_source_range"] > before,
        "the refused pod's packets are counted"
    );

    // The ranges guard the LoadBalancer IP only, as for clients outside: the ClusterIP serves
    // the same pod.
    ClientRun::tcp("10.96.0.10:80", 5)
        .run(outside, Some(&setup.cgroup))
        .expect("client")
        .assert_all_ok("ClusterIP from a pod outside the ranges");

    // UDP, connected and unconnected: the send itself fails for the pod outside.
    setup
        .apply("dns.yaml", &udp_load_balancer(pod_addr(1, 1)))
        .expect("apply");
    for unconnected in [false, true] {
        let run = ClientRun {
            unconnected,
            timeout_ms: 300,
            ..ClientRun::udp("198.51.100.53:53", 5)
        };
        let allowed = run.run(inside, Some(&setup.cgroup)).expect("client");
        allowed.assert_all_ok("UDP from the pod inside the ranges");
        assert_eq!(allowed.servers(), ["n2p0"].into(), "{allowed:?}");
        let refused = run.run(outside, Some(&setup.cgroup)).expect("client");
        assert_eq!(refused.errors, 5, "{refused:?}");
        assert!(
            refused.error_samples[0].contains("Operation not permitted"),
            "{refused:?}"
        );
    }
}

/// A UDP LoadBalancer Service on 198.51.100.53:53 that only `allowed` may use, its endpoint n2p0.
fn udp_load_balancer(allowed: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: default}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.53\n  loadBalancerSourceRanges: [{allowed}/32]\n  ports:\n  - {{name: dns, port: 53, protocol: UDP, targetPort: {POD_PORT}, nodePort: 30053}}\nstatus:\n  loadBalancer:\n    ingress: [{{ip: 198.51.100.53}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: dns-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: dns}}\naddressType: IPv4\nports:\n- {{name: dns, port: {POD_PORT}, protocol: UDP}}\nendpoints:\n- addresses: [\"{}\"]\n  nodeName: node2\n  conditions: {{ready: true}}\n",
        pod_addr(2, 0)
    )
}

/// Entries of the agent's socket NAT map (its pins are private to the test: all of them come
/// from this test's sockets).
fn socket_nat_entries(setup: &AgentLab) -> u64 {
    lb_userspace::observe::inspect::PinnedMaps::open(setup.pin_dir())
        .expect("pinned maps")
        .fill()
        .expect("fill")
        .into_iter()
        .find(|fill| fill.map == lb_common::map_names::SOCK_NAT4)
        .expect("the socket NAT map")
        .entries
}

/// The agent with two Services of one endpoint, n1p0: TCP `web` (ClusterIP 10.96.0.10:80,
/// nodePort 30080) and UDP `dns` (10.96.0.53:53).
fn agent_with_web_and_dns() -> AgentLab {
    let mut setup = AgentLab::new().expect("lab");
    setup.start_agent(&[]).expect("agent");
    setup
        .apply(
            "web.yaml",
            &(lab::agent::node_port_service("web", "10.96.0.10", 30080, "")
                + "---\n"
                + &endpoint_slice("web", &[(pod_addr(1, 0), "node1")])),
        )
        .expect("apply");
    setup
        .apply("dns.yaml", &udp_service(&[(1, 0)]))
        .expect("apply");
    setup
}

#[test]
fn closed_sockets_leave_no_entry_in_the_socket_nat_map() {
    let setup = agent_with_web_and_dns();
    assert_eq!(socket_nat_entries(&setup), 0);

    // 30 TCP connections and 30 connected UDP sockets, each opened, used and closed.
    ClientRun::tcp("10.96.0.10:80", 30)
        .run(setup.client_pod(), Some(&setup.cgroup))
        .expect("client")
        .assert_all_ok("TCP connect/request/close");
    ClientRun::udp("10.96.0.53:53", 30)
        .run(setup.client_pod(), Some(&setup.cgroup))
        .expect("client")
        .assert_all_ok("UDP socket/connect/request/close");
    assert_eq!(
        socket_nat_entries(&setup),
        0,
        "every socket took its entry with it when it closed"
    );

    // A socket still open keeps its entry (getpeername needs it).
    let ready = setup.scratch_file("open.ready");
    let open = std::thread::scope(|scope| {
        let client = scope.spawn(|| {
            ClientRun {
                one_flow: true,
                interval_ms: 100,
                ready_file: Some(&ready),
                ..ClientRun::udp("10.96.0.53:53", 10)
            }
            .run(setup.client_pod(), Some(&setup.cgroup))
        });
        // Answered once: the socket is connected, and open for nine more requests.
        lab::peer::wait_until_answered(&ready, Duration::from_secs(10)).expect("socket open");
        let while_open = socket_nat_entries(&setup);
        client
            .join()
            .expect("thread")
            .expect("client")
            .assert_all_ok("one UDP socket");
        while_open
    });
    assert_eq!(open, 1);
    assert_eq!(socket_nat_entries(&setup), 0);
}

/// A dual-stack (AF_INET6) socket reaching IPv4 Services through their IPv4-mapped addresses,
/// as Java and other runtimes do by default: a TCP connection, a connected UDP socket and an
/// unconnected one all reach the endpoint, and the socket API names the Service's mapped address
/// as the peer. Untranslated, such a socket's packets would leave for the ClusterIP itself.
#[test]
fn a_dual_stack_socket_reaches_ipv4_services_through_their_mapped_addresses() {
    let setup = agent_with_web_and_dns();
    let runs = [
        ("TCP", ClientRun::tcp("[::ffff:10.96.0.10]:80", 10)),
        (
            "connected UDP",
            ClientRun::udp("[::ffff:10.96.0.53]:53", 10),
        ),
        (
            "unconnected UDP",
            ClientRun {
                unconnected: true,
                ..ClientRun::udp("[::ffff:10.96.0.53]:53", 10)
            },
        ),
    ];
    for (what, run) in runs {
        let report = run
            .run(setup.client_pod(), Some(&setup.cgroup))
            .expect("client");
        report.assert_all_ok(what);
        assert_eq!(
            report.peer_names,
            [(run.to.to_owned(), 10)].into(),
            "{what}: the socket names the Service as its peer"
        );
        assert_eq!(report.by_server.values().sum::<u64>(), 10, "{what}");
    }
}

/// An unconnected UDP socket's datagrams to a ClusterIP are one flow, as kube-proxy's conntrack
/// holds them by the socket's source port: all 30 of one socket reach one of the two endpoints,
/// over IPv4 and IPv6, where each used to draw its own (QUIC, DTLS, RADIUS and SIP clients send a
/// session's datagrams with sendto()). Sockets of their own still spread over the endpoints,
/// and the socket names the Service as every answer's source.
#[test]
fn an_unconnected_udp_sockets_datagrams_to_a_service_reach_one_endpoint() {
    let setup = dual_stack_agent();
    let slice4 = endpoint_slice(
        "dns",
        &[(pod_addr(1, 0), "node1"), (pod_addr(2, 0), "node2")],
    )
    .replace("protocol: TCP", "protocol: UDP");
    let slice6 = endpoint_slice6(
        "dns",
        &[(pod_addr6(1, 0), "node1"), (pod_addr6(2, 0), "node2")],
        "UDP",
    );
    setup
        .apply(
            "dns.yaml",
            &(service_of_families("dns", &["10.96.0.53", "2001:db8:96::53"], "UDP", 53, "")
                + "---\n"
                + &slice4
                + "---\n"
                + &slice6),
        )
        .expect("apply");
    for to in ["10.96.0.53:53", "[2001:db8:96::53]:53"] {
        let one_socket = ClientRun {
            unconnected: true,
            one_flow: true,
            ..ClientRun::udp(to, 30)
        }
        .run(setup.client_pod(), Some(&setup.cgroup))
        .expect("client");
        one_socket.assert_all_ok("one unconnected socket");
        assert_eq!(
            one_socket.by_server.len(),
            1,
            "{to}: one socket, one endpoint: {:?}",
            one_socket.by_server
        );
        assert_eq!(one_socket.peer_names, [(to.to_owned(), 30)].into(), "{to}");
        let many_sockets = ClientRun {
            unconnected: true,
            ..ClientRun::udp(to, 30)
        }
        .run(setup.client_pod(), Some(&setup.cgroup))
        .expect("client");
        many_sockets.assert_all_ok("a socket each");
        assert!(
            many_sockets.by_server.len() >= 2,
            "{to}: 30 sockets over 2 endpoints: {:?}",
            many_sockets.by_server
        );
    }
}

/// A UDP Service `name` on 10.96.0.53:53 and [2001:db8:96::53]:53 whose one endpoint, in both
/// families, is pod `pod` of node `node`.
fn dual_stack_udp_service(name: &str, node: u8, pod: u8) -> String {
    let node_name = format!("node{node}");
    service_of_families(name, &["10.96.0.53", "2001:db8:96::53"], "UDP", 53, "")
        + "---\n"
        + &endpoint_slice(name, &[(pod_addr(node, pod), &node_name)])
            .replace("protocol: TCP", "protocol: UDP")
        + "---\n"
        + &endpoint_slice6(name, &[(pod_addr6(node, pod), &node_name)], "UDP")
}

/// An unconnected socket that reached n1p0 through a Service names its answers as the
/// Service's only while the Service holds the address: once the Service is gone and another
/// holds its addresses, the socket talking to n1p0 straight hears from n1p0 itself (before, the
/// stale record passed n1p0's datagrams off as the address's new Service's), in both families.
#[test]
fn a_pods_datagrams_are_not_named_as_a_service_address_that_changed_hands() {
    let setup = dual_stack_agent();
    setup
        .apply("dns.yaml", &dual_stack_udp_service("dns", 1, 0))
        .expect("apply");
    let runs = [
        ("10.96.0.53:53", format!("{}:{POD_PORT}", pod_addr(1, 0))),
        (
            "[2001:db8:96::53]:53",
            format!("[{}]:{POD_PORT}", pod_addr6(1, 0)),
        ),
    ];
    let ready = [
        setup.scratch_file("v4.ready"),
        setup.scratch_file("v6.ready"),
    ];
    let go = setup.scratch_file("go");
    let reports = std::thread::scope(|scope| {
        let clients: Vec<_> = runs
            .iter()
            .zip(&ready)
            .map(|((service, pod), ready)| {
                let (go, pod_host, cgroup) = (&go, setup.client_pod(), &setup.cgroup);
                scope.spawn(move || {
                    ClientRun {
                        unconnected: true,
                        one_flow: true,
                        ready_file: Some(ready),
                        go_file: Some(go),
                        then_to: Some(pod),
                        ..ClientRun::udp(service, 10)
                    }
                    .run(pod_host, Some(cgroup))
                })
            })
            .collect();
        for ready in &ready {
            lab::peer::wait_until_answered(ready, Duration::from_secs(10))
                .expect("client under way");
        }
        // The Service goes; another, with another endpoint, takes its addresses in the same
        // sync (a new service id for the same frontends).
        setup
            .apply("dns.yaml", &dual_stack_udp_service("dns-next", 2, 0))
            .expect("apply");
        std::fs::write(&go, b"go\n").expect("go file");
        clients
            .into_iter()
            .map(|client| client.join().expect("thread").expect("client"))
            .collect::<Vec<_>>()
    });
    for ((service, pod), report) in runs.iter().zip(reports) {
        report.assert_all_ok("one unconnected socket, the Service, then n1p0 straight");
        assert_eq!(
            report.by_server,
            [("n1p0".to_owned(), 10)].into(),
            "{report:?}"
        );
        assert_eq!(
            report.peer_names,
            [(service.to_string(), 1), (pod.clone(), 9)].into(),
            "{service}: the first answer came through the Service, the rest from n1p0 straight"
        );
    }
    let events = setup.events().expect("events");
    assert!(events["nat_socket_stale"] >= 18, "{events:?}");
}

/// The peers (`ip:port`) of the connected UDP sockets in `host`'s network namespace.
fn connected_udp_peers(host: &lab::lab::Host) -> Vec<String> {
    let listed = host
        .run("ss", &["-Hnu", "state", "established"])
        .expect("ss");
    listed
        .lines()
        .filter_map(|line| line.split_whitespace().last().map(str::to_owned))
        .collect()
}

/// A pod's UDP socket connected to a ClusterIP before its Service existed was never translated:
/// its datagrams go to the address itself, and past the node they vanish (here a blackhole
/// route on node1, as a real network drops them, no ICMP error to wake the application). The
/// sync that makes the address a frontend aborts it, in both families, and the application's
/// new socket reaches the endpoint. A socket connected to the same address from outside the
/// hooks' cgroup, where the hooks never run, is not touched.
#[test]
fn a_udp_socket_connected_to_a_service_address_before_its_service_is_aborted_once_it_exists() {
    let setup = dual_stack_agent();
    let node1 = &setup.cluster.node(1).host;
    node1
        .route(&["blackhole", "10.96.0.53/32"])
        .expect("IPv4 blackhole route");
    node1
        .route(&["blackhole", "2001:db8:96::53/128"])
        .expect("IPv6 blackhole route");
    let waiting = |to| ClientRun {
        one_flow: true,
        reconnect: true,
        interval_ms: 100,
        timeout_ms: 300,
        ..ClientRun::udp(to, 30)
    };
    let outside = ClientRun {
        one_flow: true,
        interval_ms: 100,
        timeout_ms: 300,
        ..ClientRun::udp("10.96.0.53:53", 15)
    };
    let (pod, cgroup) = (setup.client_pod(), &setup.cgroup);
    let (inside, outside) = std::thread::scope(|scope| {
        let inside: Vec<_> = ["10.96.0.53:53", "[2001:db8:96::53]:53"]
            .into_iter()
            .map(|to| scope.spawn(move || waiting(to).run(pod, Some(cgroup))))
            .collect();
        let outside = scope.spawn(|| outside.run(pod, None));
        // All three connected (and unanswered) before the Service comes.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while connected_udp_peers(pod).len() < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                connected_udp_peers(pod)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        setup
            .apply("dns.yaml", &dual_stack_udp_service("dns", 1, 0))
            .expect("apply");
        // The sync is over: the sockets inside were aborted (a replacement connects through
        // the hooks, to the endpoint), and the one outside was there all along, untouched.
        let peers = connected_udp_peers(pod);
        assert_eq!(
            peers.iter().filter(|peer| *peer == "10.96.0.53:53").count(),
            1,
            "{peers:?}"
        );
        (
            inside
                .into_iter()
                .map(|client| client.join().expect("thread").expect("client"))
                .collect::<Vec<_>>(),
            outside.join().expect("thread").expect("client"),
        )
    });
    for report in &inside {
        // The abort fails one call (ECONNABORTED, or EDESTADDRREQ from a send after it).
        let timeouts = report.error_kinds.get("timeout").copied().unwrap_or(0);
        assert_eq!(
            report.errors - timeouts,
            1,
            "one abort, the rest timeouts before it: {report:?}"
        );
        assert!(report.ok > 0, "{report:?}");
        assert_eq!(report.servers(), ["n1p0"].into(), "{report:?}");
        assert_eq!(report.last_server.as_deref(), Some("n1p0"), "{report:?}");
    }
    assert_eq!(outside.ok, 0, "{outside:?}");
    assert_eq!(
        outside.error_kinds,
        [("timeout".to_owned(), 15)].into(),
        "the socket outside the hooks' cgroup kept waiting, never aborted: {outside:?}"
    );
    assert_eq!(metric(&setup, "lb_udp_sockets_aborted_total"), Some(2.0));
    assert_eq!(
        metric(&setup, "lb_udp_socket_abort_failures_total"),
        Some(0.0)
    );
}

/// A connection's peer is the Service address for as long as the connection lives, as with
/// kube-proxy: a change that gives the Service port another identity in the maps (its port
/// renamed: a new service id for the same frontend) leaves an open connection's getpeername()
/// naming the ClusterIP, not the pod.
#[test]
fn an_open_connection_keeps_naming_its_cluster_ip_when_the_service_port_is_renamed() {
    let setup = agent_with_web_and_dns();
    let ready = setup.scratch_file("web.ready");
    let go = setup.scratch_file("go");
    let report = std::thread::scope(|scope| {
        let client = scope.spawn(|| {
            ClientRun {
                one_flow: true,
                ready_file: Some(&ready),
                go_file: Some(&go),
                ..ClientRun::tcp("10.96.0.10:80", 10)
            }
            .run(setup.client_pod(), Some(&setup.cgroup))
        });
        lab::peer::wait_until_answered(&ready, Duration::from_secs(10)).expect("connected");
        let renamed = (lab::agent::node_port_service("web", "10.96.0.10", 30080, "")
            + "---\n"
            + &endpoint_slice("web", &[(pod_addr(1, 0), "node1")]))
            .replace("name: http", "name: web");
        setup.apply("web.yaml", &renamed).expect("apply");
        std::fs::write(&go, b"go\n").expect("go file");
        client.join().expect("thread").expect("client")
    });
    report.assert_all_ok("one connection, its Service port renamed under it");
    assert_eq!(report.servers(), ["n1p0"].into(), "{report:?}");
    assert_eq!(
        report.peer_names,
        [("10.96.0.10:80".to_owned(), 10)].into(),
        "{report:?}"
    );
}
