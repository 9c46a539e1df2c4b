//! IPv6 from outside the node, through XDP and tc on node1's fabric NIC, with the real agent and
//! real TCP/UDP servers and clients in the dual-stack lab (documentation prefixes): the IPv6
//! twins of the rows policies_lab.rs and flows_lab.rs have for IPv4 from outside.
//! loadBalancerSourceRanges on an IPv6 LoadBalancer IP (also for a connection already open),
//! externalTrafficPolicy Cluster (SNAT to node1's IPv6 address) and Local (the client's address
//! kept, no local endpoint: dropped), ClientIP session affinity, the REJECT answers of a Service
//! without endpoints (TCP RST, ICMPv6 port unreachable), UDP NodePorts to local and remote
//! endpoints, a dual-stack Service reached over both families, flows across the conntrack
//! timeouts, path-MTU discovery through a NodePort (ICMPv6 Packet Too Big), and a retransmitted
//! SYN reaching the endpoint its first SYN went to.

use std::{
    net::{Ipv6Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use lab::{
    agent::{
        AgentLab, SYNC_TIMEOUT, endpoint_slice, endpoint_slice6, service_of_families,
        with_node_port,
    },
    lab::Host,
    nft::SynDrop,
    peer::{ClientReport, ClientRun},
    topology::{
        CLIENT_ADDR, CLIENT_ADDR6, ClusterSpec, FABRIC_IFACE, IPV6_PREFIX_LEN, node_addr,
        node_addr6, pod_addr, pod_addr6,
    },
};

/// The IPv6 ClusterIPs (documentation prefix 2001:db8::/32).
const WEB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x96, 0, 0, 0, 0, 0x10);
const DNS6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x96, 0, 0, 0, 0, 0x53);
/// An IPv6 LoadBalancer ingress IP, in a prefix the clients route via node1.
const LB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x51, 0, 0, 0, 0, 0x20);
const LB6_PREFIX: &str = "2001:db8:51::/64";
/// A second client's IPv6 address on the fabric.
const CLIENT2_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0x11);

/// `ip:port` as a client names it (`[v6]:port`).
fn at(ip: impl Into<std::net::IpAddr>, port: u16) -> String {
    SocketAddr::new(ip.into(), port).to_string()
}

/// An address as the servers report a peer (`[v6]`).
fn seen(ip: Ipv6Addr) -> String {
    format!("[{ip}]")
}

/// The dual-stack lab of `pods_per_node`, the agent on node1 serving node1's IPv6 address too,
/// with `extra` flags.
fn dual_stack_lab(pods_per_node: Vec<u8>, extra: &[&str]) -> AgentLab {
    let mut setup = AgentLab::with_spec(&ClusterSpec {
        pods_per_node,
        dual_stack: true,
        ..ClusterSpec::default()
    })
    .expect("lab");
    let node1_v6 = node_addr6(1).to_string();
    let mut flags = vec!["--node-address", node1_v6.as_str()];
    flags.extend_from_slice(extra);
    setup.start_agent(&flags).expect("agent");
    setup
}

/// Another client on the fabric, reachable over IPv6 only (`addr6`), with no default route.
fn add_client6(setup: &mut AgentLab, name: &str, addr6: Ipv6Addr) -> Host {
    let fabric = setup.cluster.fabric.clone();
    let lab = setup.lab();
    let host = lab.host(name).expect("host");
    host.enable_ipv6().expect("IPv6");
    let port = format!("p-{name}");
    lab.veth(&host, FABRIC_IFACE, &fabric, &port).expect("veth");
    fabric.enslave(&port, "br0").expect("bridge port");
    host.addr6(FABRIC_IFACE, &format!("{addr6}/{IPV6_PREFIX_LEN}"))
        .expect("address");
    host
}

/// Routes the LoadBalancer IPs' prefix via node1 on `client`.
fn route_load_balancer_ips(client: &Host) {
    client
        .route(&[LB6_PREFIX, "via", &node_addr6(1).to_string()])
        .expect("route");
}

/// An IPv6 Service `name` of `protocol` on `cluster_ip`:`port` of `kind` (NodePort or
/// LoadBalancer) on nodePort `node_port`, with `extra` spec lines.
fn service6(
    name: &str,
    cluster_ip: Ipv6Addr,
    protocol: &str,
    port: u16,
    node_port: u16,
    kind: &str,
    extra: &str,
) -> String {
    with_node_port(
        &service_of_families(
            name,
            &[&cluster_ip.to_string()],
            protocol,
            port,
            &format!("  type: {kind}\n{extra}"),
        ),
        node_port,
    )
}

/// An IPv6 UDP NodePort Service `name` (port 53 on 2001:db8:96::`cluster_ip`, nodePort
/// `node_port`) with its one endpoint (address, node) in an IPv6 EndpointSlice.
fn udp_node_port6(
    name: &str,
    cluster_ip: u16,
    node_port: u16,
    endpoint: (Ipv6Addr, &str),
) -> String {
    service6(
        name,
        Ipv6Addr::new(0x2001, 0xdb8, 0x96, 0, 0, 0, 0, cluster_ip),
        "UDP",
        53,
        node_port,
        "NodePort",
        "",
    ) + "---\n"
        + &endpoint_slice6(name, &[endpoint], "UDP")
}

/// The LoadBalancer Service `web` (TCP, WEB6:80, nodePort 30080) with LB6 as its ingress IP, and
/// `extra` spec lines.
fn load_balancer6(extra: &str) -> String {
    service6("web", WEB6, "TCP", 80, 30080, "LoadBalancer", extra)
        + &format!("status:\n  loadBalancer:\n    ingress: [{{ip: \"{LB6}\"}}]\n")
}

/// Waits until a TCP connection to `target` from `client` succeeds: the agent has programmed
/// the Service, and neighbour discovery between the client and node1 is done.
fn wait_until_served(client: &Host, target: &str) {
    wait_until_answered(client, ClientRun::tcp(target, 1));
}

/// Waits until `probe` (one request, TCP or UDP) from `client` gets its answer: neighbour
/// discovery is done and the agent serves the target.
fn wait_until_answered(client: &Host, probe: ClientRun) {
    ClientRun {
        timeout_ms: 500,
        ..probe
    }
    .run_until(client, SYNC_TIMEOUT, |report| report.errors == 0)
    .expect("served");
}

fn events(setup: &AgentLab) -> std::collections::BTreeMap<&'static str, u64> {
    setup.events().expect("the agent's pinned event counters")
}

/// policies_lab's `load_balancer_source_ranges_admit_one_client_and_drop_another` over IPv6.
#[test]
fn an_ipv6_load_balancer_ip_admits_a_client_inside_its_source_ranges_and_drops_one_outside() {
    let mut setup = dual_stack_lab(vec![2, 1], &[]);
    let refused_client = add_client6(&mut setup, "client2", CLIENT2_ADDR6);
    for client in [&setup.cluster.client, &refused_client] {
        route_load_balancer_ips(client);
    }
    setup
        .apply(
            "web.yaml",
            &(load_balancer6(&format!(
                "  loadBalancerSourceRanges: [\"{CLIENT_ADDR6}/128\"]\n"
            )) + "---\n"
                + &endpoint_slice6("web", &[(pod_addr6(1, 0), "node1")], "TCP")),
        )
        .expect("apply");
    let lb6 = at(LB6, 80);
    wait_until_served(&setup.cluster.client, &lb6);
    let allowed = ClientRun::tcp(&lb6, 20)
        .run(&setup.cluster.client, None)
        .expect("client");
    allowed.assert_all_ok("client inside the IPv6 range");
    assert_eq!(allowed.servers(), ["n1p0"].into(), "{allowed:?}");
    assert_eq!(
        allowed.peer_names,
        [(lb6.clone(), 20)].into(),
        "answers from the LoadBalancer IP"
    );
    let before = events(&setup)["drop_source_range"];
    let refused = ClientRun {
        timeout_ms: 300,
        ..ClientRun::tcp(&lb6, 2)
    }
    .run(&refused_client, None)
    .expect("client");
    assert_eq!(refused.errors, 2, "{refused:?}");
    assert!(
        events(&setup)["drop_source_range"] > before,
        "refused traffic is counted"
    );
    // The ranges guard the LoadBalancer IP only: the NodePort still serves everyone.
    ClientRun::tcp(&at(node_addr6(1), 30080), 5)
        .run(&refused_client, None)
        .expect("client")
        .assert_all_ok("IPv6 NodePort from outside the range");
}

/// One connection of three requests 1.5 s apart from `client` to `to`, with `change` made as
/// soon as the first request is answered (while the connection is open, before the second);
/// `ready` is a path of the test's own for the client's ready file.
fn connection_across(client: &Host, to: &str, ready: &Path, change: impl FnOnce()) -> ClientReport {
    std::thread::scope(|scope| {
        let run = scope.spawn(|| {
            ClientRun {
                one_flow: true,
                interval_ms: 1500,
                timeout_ms: 800,
                ready_file: Some(ready),
                ..ClientRun::tcp(to, 3)
            }
            .run(client, None)
        });
        lab::peer::wait_until_answered(ready, Duration::from_secs(10))
            .expect("the first request answered");
        change();
        run.join().expect("client thread")
    })
    .expect("client")
}

/// policies_lab's `an_established_connection_stops_when_its_source_range_goes` over IPv6: a
/// connection that loadBalancerSourceRanges admitted stops once its client's range goes.
#[test]
fn an_established_ipv6_connection_stops_when_its_source_range_goes() {
    let setup = dual_stack_lab(vec![2, 1], &[]);
    route_load_balancer_ips(&setup.cluster.client);
    let service = |range: &str| {
        load_balancer6(&format!("  loadBalancerSourceRanges: [\"{range}\"]\n"))
            + "---\n"
            + &endpoint_slice6("web", &[(pod_addr6(1, 0), "node1")], "TCP")
    };
    setup
        .apply("web.yaml", &service(&format!("{CLIENT_ADDR6}/128")))
        .expect("apply");
    let lb6 = at(LB6, 80);
    wait_until_served(&setup.cluster.client, &lb6);
    let before = events(&setup)["drop_source_range"];
    let ready = setup.scratch_file("client.ready");
    let report = connection_across(&setup.cluster.client, &lb6, &ready, || {
        setup
            .apply("web.yaml", &service("2001:db8:f::99/128"))
            .expect("range changed");
    });
    assert_eq!(
        report.ok, 1,
        "only the request before the change: {report:?}"
    );
    assert!(report.errors >= 1, "{report:?}");
    assert!(
        events(&setup)["drop_source_range"] > before,
        "dropped and counted"
    );
}

/// policies_lab's `node_port_to_a_remote_endpoint_snat_under_cluster_drop_under_local` over
/// IPv6: Cluster policy SNATs to node1's IPv6 address; Local drops without a local endpoint
/// (a pod of node1 still reaches the remote one), and keeps the client's IPv6 address with one.
#[test]
fn an_ipv6_node_port_snats_to_a_remote_endpoint_under_cluster_and_keeps_the_client_under_local() {
    let setup = dual_stack_lab(vec![2, 1], &[]);
    let remote_only = endpoint_slice6("web", &[(pod_addr6(2, 0), "node2")], "TCP");
    let web = |extra: &str| service6("web", WEB6, "TCP", 80, 30080, "NodePort", extra);
    setup
        .apply("web.yaml", &(web("") + "---\n" + &remote_only))
        .expect("apply");
    let node_port = at(node_addr6(1), 30080);
    let client = &setup.cluster.client;
    wait_until_served(client, &node_port);

    // Cluster: node1 forwards to node2's pod, SNATed to node1, and the answers come back.
    for run in [
        ClientRun::tcp(&node_port, 30),
        ClientRun {
            one_flow: true,
            ..ClientRun::tcp(&node_port, 30)
        },
    ] {
        let report = run.run(client, None).expect("client");
        report.assert_all_ok("Cluster policy, remote endpoint");
        assert_eq!(report.servers(), ["n2p0"].into(), "{report:?}");
        assert_eq!(
            report.peers_seen.keys().collect::<Vec<_>>(),
            [&seen(node_addr6(1))],
            "SNAT to node1's IPv6 address: {report:?}"
        );
        assert_eq!(
            report.peer_names.keys().collect::<Vec<_>>(),
            [&node_port],
            "answers from the NodePort"
        );
    }

    // Local: node1 has no endpoint of its own, so NodePort traffic is dropped (counted).
    let local = "  externalTrafficPolicy: Local\n";
    setup
        .apply("web.yaml", &(web(local) + "---\n" + &remote_only))
        .expect("apply");
    let before = events(&setup)["drop_no_local_backend"];
    let dropped = ClientRun {
        timeout_ms: 300,
        ..ClientRun::tcp(&node_port, 2)
    }
    .run(client, None)
    .expect("client");
    assert_eq!(dropped.errors, 2, "{dropped:?}");
    assert!(
        events(&setup)["drop_no_local_backend"] > before,
        "drops are counted"
    );
    // A pod of node1 has no client address to preserve: it reaches the cluster-wide endpoints
    // through the same IPv6 NodePort (kube-proxy's short-circuit), node2's pod here.
    let from_pod = ClientRun::tcp(&node_port, 20)
        .run(setup.client_pod(), Some(&setup.cgroup))
        .expect("client");
    from_pod.assert_all_ok("Local policy, from a pod of this node");
    assert_eq!(from_pod.servers(), ["n2p0"].into(), "{from_pod:?}");

    // Local with a local endpoint: served there only, and the server sees the client's address.
    let both = endpoint_slice6(
        "web",
        &[(pod_addr6(2, 0), "node2"), (pod_addr6(1, 0), "node1")],
        "TCP",
    );
    setup
        .apply("web.yaml", &(web(local) + "---\n" + &both))
        .expect("apply");
    let report = ClientRun::tcp(&node_port, 30)
        .run(client, None)
        .expect("client");
    report.assert_all_ok("Local policy, local endpoint");
    assert_eq!(report.servers(), ["n1p0"].into(), "{report:?}");
    assert_eq!(
        report.peers_seen.keys().collect::<Vec<_>>(),
        [&seen(CLIENT_ADDR6)],
        "no SNAT under Local: {report:?}"
    );
}

/// policies_lab's `session_affinity_pins_a_client_until_the_timeout` over IPv6.
#[test]
fn ipv6_session_affinity_pins_a_client_outside_the_node_until_the_timeout() {
    let mut setup = dual_stack_lab(vec![2, 0], &[]);
    let second_client = add_client6(&mut setup, "client2", CLIENT2_ADDR6);
    let sticky =
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}\n";
    setup
        .apply(
            "web.yaml",
            &(service6("web", WEB6, "TCP", 80, 30080, "NodePort", sticky)
                + "---\n"
                + &endpoint_slice6(
                    "web",
                    &[(pod_addr6(1, 0), "node1"), (pod_addr6(1, 1), "node1")],
                    "TCP",
                )),
        )
        .expect("apply");
    let node_port = at(node_addr6(1), 30080);
    wait_until_served(&setup.cluster.client, &node_port);

    // 200 connections from one client, through XDP and through the socket hook: one endpoint
    // each.
    let first = ClientRun::tcp(&node_port, 200)
        .run(&setup.cluster.client, None)
        .expect("client");
    first.assert_all_ok("200 connections");
    assert_eq!(first.by_server.len(), 1, "{first:?}");
    let from_pod = ClientRun::tcp(&at(WEB6, 80), 200)
        .run(setup.client_pod(), Some(&setup.cgroup))
        .expect("client");
    from_pod.assert_all_ok("200 connections from a pod");
    assert_eq!(from_pod.by_server.len(), 1, "{from_pod:?}");
    // Another client sticks too (to whichever endpoint it got).
    let other = ClientRun::tcp(&node_port, 50)
        .run(&second_client, None)
        .expect("client");
    other.assert_all_ok("50 connections from another client");
    assert_eq!(other.by_server.len(), 1, "{other:?}");

    // After the timeout passes without traffic, a new choice is made: with two endpoints, some
    // wait gives the other one (each try has an even chance; 12 misses in a row: 1 in 4096).
    let pinned = first.by_server.keys().next().expect("one").clone();
    let moved = (0..12).any(|_| {
        // Not a wait for a client: the 1 s affinity timeout passes without traffic.
        std::thread::sleep(Duration::from_millis(1100));
        let again = ClientRun::tcp(&node_port, 1)
            .run(&setup.cluster.client, None)
            .expect("client");
        again.by_server.keys().next() != Some(&pinned)
    });
    assert!(moved, "affinity never expired");
}

/// policies_lab's `a_service_without_endpoints_refuses_at_once` over IPv6: a TCP RST and an
/// ICMPv6 port unreachable from XDP, refusals from the socket hooks.
#[test]
fn an_ipv6_service_without_endpoints_refuses_at_once() {
    let setup = dual_stack_lab(vec![2, 1], &[]);
    let empty6 = Ipv6Addr::new(0x2001, 0xdb8, 0x96, 0, 0, 0, 0, 0x20);
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: empty, namespace: default}}\nspec:\n  type: NodePort\n  clusterIP: \"{empty6}\"\n  clusterIPs: [\"{empty6}\"]\n  ipFamilyPolicy: SingleStack\n  ipFamilies: [IPv6]\n  ports:\n  - {{name: tcp, port: 80, nodePort: 30090}}\n  - {{name: udp, port: 53, protocol: UDP, nodePort: 30091}}\n"
    );
    setup.apply("empty.yaml", &service).expect("apply");
    let (tcp_node_port, udp_node_port) = (at(node_addr6(1), 30090), at(node_addr6(1), 30091));
    let (tcp_cluster_ip, udp_cluster_ip) = (at(empty6, 80), at(empty6, 53));
    // Neighbour discovery between the client and node1 first, so that no run below waits for it.
    ClientRun {
        timeout_ms: 500,
        ..ClientRun::tcp(&tcp_node_port, 1)
    }
    .run(&setup.cluster.client, None)
    .expect("client");
    let runs = [
        (
            "tcp via XDP",
            &setup.cluster.client,
            None,
            ClientRun::tcp(&tcp_node_port, 3),
        ),
        (
            "udp via XDP",
            &setup.cluster.client,
            None,
            ClientRun::udp(&udp_node_port, 3),
        ),
        (
            "tcp via the socket hook",
            setup.client_pod(),
            Some(&setup.cgroup),
            ClientRun::tcp(&tcp_cluster_ip, 3),
        ),
        (
            "udp via the socket hook",
            setup.client_pod(),
            Some(&setup.cgroup),
            ClientRun::udp(&udp_cluster_ip, 3),
        ),
    ];
    let before = events(&setup);
    for (what, host, cgroup, run) in runs {
        // A timeout would take the client's 2 s each; a refusal takes well under 100 ms.
        let started = Instant::now();
        let report = run.run(host, cgroup).expect("client");
        let elapsed = started.elapsed();
        assert_eq!(report.errors, 3, "{what}: {report:?}");
        assert!(
            report
                .error_samples
                .iter()
                .all(|error| error.contains("refused")),
            "{what}: not refused: {report:?}"
        );
        assert!(
            elapsed < Duration::from_millis(1500),
            "{what}: took {elapsed:?}"
        );
    }
    // Refused within 100 ms, not timed out (2 s): timed by the test thread itself from inside
    // the client's namespace, no process start.
    {
        let _inside = setup
            .cluster
            .client
            .enter()
            .expect("enter the client namespace");
        let started = Instant::now();
        let target = tcp_node_port.parse().expect("addr");
        let refused = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2));
        let tcp_elapsed = started.elapsed();
        assert_eq!(
            refused.expect_err("refused").kind(),
            std::io::ErrorKind::ConnectionRefused
        );
        let socket = std::net::UdpSocket::bind("[::]:0").expect("bind");
        socket.connect(&udp_node_port).expect("connect");
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let started = Instant::now();
        socket.send(b"query").expect("send");
        let error = socket.recv(&mut [0u8; 64]).expect_err("ICMPv6 error");
        let udp_elapsed = started.elapsed();
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);
        assert!(
            tcp_elapsed < Duration::from_millis(100),
            "TCP refused after {tcp_elapsed:?}"
        );
        assert!(
            udp_elapsed < Duration::from_millis(100),
            "UDP ICMPv6 error after {udp_elapsed:?}"
        );
    }
    let after = events(&setup);
    // 3 from each lab-peer run through XDP, 1 from each timed attempt.
    assert!(
        after["reject_tcp_rst"] >= before["reject_tcp_rst"] + 4
            && after["reject_icmp"] >= before["reject_icmp"] + 4,
        "XDP answered every attempt: before {before:?}, after {after:?}"
    );
}

/// UDP from outside to IPv6 NodePorts whose one endpoint is local (the server sees the client)
/// or on node2 (SNAT: the server sees node1), over connected and unconnected sockets and over
/// one socket for many datagrams; every answer comes from the NodePort.
#[test]
fn udp_from_outside_reaches_ipv6_node_ports_at_local_and_remote_endpoints() {
    let setup = dual_stack_lab(vec![2, 1], &[]);
    setup
        .apply(
            "dns.yaml",
            &(udp_node_port6("dns-local", 0x54, 30054, (pod_addr6(1, 0), "node1"))
                + "---\n"
                + &udp_node_port6("dns-remote", 0x55, 30055, (pod_addr6(2, 0), "node2"))),
        )
        .expect("apply");
    let client = &setup.cluster.client;
    // Neighbour discovery: the first datagram may wait for it; the runs below count every one.
    let local_port = at(node_addr6(1), 30054);
    let remote_port = at(node_addr6(1), 30055);
    wait_until_answered(client, ClientRun::udp(&remote_port, 1));

    for (node_port, server, seen_as) in [
        (&local_port, "n1p0", seen(CLIENT_ADDR6)),
        (&remote_port, "n2p0", seen(node_addr6(1))),
    ] {
        for (what, run) in [
            ("connected", ClientRun::udp(node_port, 20)),
            (
                "unconnected",
                ClientRun {
                    unconnected: true,
                    ..ClientRun::udp(node_port, 20)
                },
            ),
            (
                "one socket",
                ClientRun {
                    one_flow: true,
                    ..ClientRun::udp(node_port, 20)
                },
            ),
        ] {
            let report = run.run(client, None).expect("client");
            report.assert_all_ok(&format!("UDP {what} to {node_port}"));
            assert_eq!(report.servers(), [server].into(), "{what}: {report:?}");
            assert_eq!(
                report.peers_seen.keys().collect::<Vec<_>>(),
                [&seen_as],
                "{what} to {node_port}: {report:?}"
            );
            assert_eq!(
                report.peer_names,
                [(node_port.clone(), 20)].into(),
                "{what}: answers from the NodePort"
            );
        }
    }
    let flows = lab::agent::lb_json(setup.pin_dir(), &["conntrack"]).expect("lb conntrack");
    let listed = flows.to_string();
    assert!(
        listed.contains(&CLIENT_ADDR6.to_string()) && listed.contains(":30055"),
        "lb conntrack lists the IPv6 UDP flows: {flows:#}"
    );
}

/// flows_lab's 8 KB UDP exchanges over IPv6: six fragments each way at the lab's MTU of 1500
/// (IPv6 routers never fragment: the client and the endpoints do). Through node1's NodePorts to
/// a local endpoint (XDP DNAT, tc egress on the way back) and to one on node2 (XDP SNAT both
/// ways), every later fragment finds its first fragment's record.
#[test]
fn eight_kilobyte_udp_exchanges_cross_ipv6_node_ports_to_local_and_remote_endpoints() {
    let setup = dual_stack_lab(vec![1, 1], &[]);
    setup
        .apply(
            "big.yaml",
            &(udp_node_port6("big-local", 0x54, 30054, (pod_addr6(1, 0), "node1"))
                + "---\n"
                + &udp_node_port6("big-remote", 0x55, 30055, (pod_addr6(2, 0), "node2"))),
        )
        .expect("apply");
    let client = &setup.cluster.client;
    for (node_port, server) in [
        (at(node_addr6(1), 30054), "n1p0"),
        (at(node_addr6(1), 30055), "n2p0"),
    ] {
        // Neighbour discovery: the first datagram may wait for it; the run below counts every
        // one.
        wait_until_answered(client, ClientRun::udp(&node_port, 1));
        let report = ClientRun {
            payload_bytes: 8192,
            ..ClientRun::udp(&node_port, 5)
        }
        .run(client, None)
        .expect("client");
        report.assert_all_ok(&format!("8 KB through {node_port}"));
        assert_eq!(report.servers(), [server].into(), "{report:?}");
    }
    let events = events(&setup);
    assert_eq!(
        events["pass_fragment"], 0,
        "every later fragment had its first: {events:?}"
    );
}

/// A dual-stack NodePort Service reached from outside over each family at node1's address of
/// that family, each to its own family's endpoints: n1p0 over IPv4, n1p1 and n2p0 over IPv6.
#[test]
fn a_dual_stack_node_port_serves_each_family_from_outside_with_its_own_endpoints() {
    let setup = dual_stack_lab(vec![2, 1], &[]);
    let manifest = |name: &str, cluster_ips: [&str; 2], protocol: &str, node_port: u16| {
        let v4 = endpoint_slice(name, &[(pod_addr(1, 0), "node1")])
            .replace("protocol: TCP", &format!("protocol: {protocol}"));
        with_node_port(
            &service_of_families(name, &cluster_ips, protocol, 80, "  type: NodePort\n"),
            node_port,
        ) + "---\n"
            + &v4
            + "---\n"
            + &endpoint_slice6(
                name,
                &[(pod_addr6(1, 1), "node1"), (pod_addr6(2, 0), "node2")],
                protocol,
            )
    };
    setup
        .apply(
            "web.yaml",
            &(manifest("web", ["10.96.0.10", &WEB6.to_string()], "TCP", 30080)
                + "---\n"
                + &manifest("dns", ["10.96.0.53", &DNS6.to_string()], "UDP", 30053)),
        )
        .expect("apply");
    let client = &setup.cluster.client;
    let (tcp4, tcp6) = (at(node_addr(1), 30080), at(node_addr6(1), 30080));
    let (udp4, udp6) = (at(node_addr(1), 30053), at(node_addr6(1), 30053));
    wait_until_served(client, &tcp6);

    for (run, servers, what) in [
        (ClientRun::tcp(&tcp4, 30), &["n1p0"][..], "TCP over IPv4"),
        (ClientRun::udp(&udp4, 30), &["n1p0"][..], "UDP over IPv4"),
        (
            ClientRun::tcp(&tcp6, 40),
            &["n1p1", "n2p0"][..],
            "TCP over IPv6",
        ),
        (
            ClientRun::udp(&udp6, 40),
            &["n1p1", "n2p0"][..],
            "UDP over IPv6",
        ),
    ] {
        let report = run.run(client, None).expect("client");
        report.assert_all_ok(what);
        assert_eq!(
            report.servers(),
            servers
                .iter()
                .copied()
                .collect::<std::collections::BTreeSet<_>>(),
            "{what}: that family's endpoints only: {report:?}"
        );
        assert_eq!(
            report.peer_names.keys().collect::<Vec<_>>(),
            [&run.to.to_owned()],
            "{what}: answers from the NodePort"
        );
        let peers: std::collections::BTreeSet<&str> =
            report.peers_seen.keys().map(String::as_str).collect();
        // The servers listen on [::]: an IPv4 client shows IPv4-mapped.
        let expected: std::collections::BTreeSet<String> = if run.to.starts_with('[') {
            [seen(CLIENT_ADDR6), seen(node_addr6(1))].into()
        } else {
            [format!("[::ffff:{CLIENT_ADDR}]")].into()
        };
        assert_eq!(
            peers,
            expected
                .iter()
                .map(String::as_str)
                .collect::<std::collections::BTreeSet<_>>(),
            "{what}: the local endpoint sees the client, the remote one node1: {report:?}"
        );
    }
}

/// flows_lab's `idle_tcp_connections_to_a_remote_endpoint_outlive_the_syn_and_closing_timeouts`
/// over IPv6: one connection through an IPv6 NodePort to node2's pod, idle 2.5 s between
/// requests, more than twice the SYN (1 s) and CLOSING (0.5 s) timeouts, keeps its SNAT port.
#[test]
fn idle_ipv6_tcp_connections_to_a_remote_endpoint_outlive_the_syn_and_closing_timeouts() {
    let setup = dual_stack_lab(
        vec![2, 1],
        &[
            "--conntrack-tcp-timeout-syn",
            "1s",
            "--conntrack-tcp-timeout-closing",
            "500ms",
            "--conntrack-tcp-timeout-half-closed",
            "500ms",
            "--conntrack-udp-timeout",
            "1s",
        ],
    );
    setup
        .apply(
            "web.yaml",
            &(service6("web", WEB6, "TCP", 80, 30081, "NodePort", "")
                + "---\n"
                + &endpoint_slice6("web", &[(pod_addr6(2, 0), "node2")], "TCP")),
        )
        .expect("apply");
    let node_port = at(node_addr6(1), 30081);
    wait_until_served(&setup.cluster.client, &node_port);
    let report = ClientRun {
        one_flow: true,
        interval_ms: 2500,
        ..ClientRun::tcp(&node_port, 4)
    }
    .run(&setup.cluster.client, None)
    .expect("client");
    report.assert_all_ok("an idle connection through an IPv6 NodePort to node2");
    assert_eq!(report.servers(), ["n2p0"].into());
    assert_eq!(
        report.seen_as.len(),
        1,
        "one SNAT port for the whole connection: {:?}",
        report.seen_as
    );
    let events = events(&setup);
    assert_eq!(events["ct_flow_restarted"], 0, "{events:?}");
}

/// The established timeout (1 s here) over IPv6: a connection through an IPv6 NodePort to
/// node2's pod with a request every 300 ms lives on well past it on one SNAT port, while one
/// idle for longer than it loses its flow, and with it its SNAT port: its next segment starts a
/// flow on another port, which node2's pod answers with a RST.
#[test]
fn an_active_ipv6_tcp_connection_outlives_the_established_timeout_and_an_idle_one_ends() {
    let setup = dual_stack_lab(vec![2, 1], &["--conntrack-tcp-timeout-established", "1s"]);
    setup
        .apply(
            "web.yaml",
            &(service6("web", WEB6, "TCP", 80, 30081, "NodePort", "")
                + "---\n"
                + &endpoint_slice6("web", &[(pod_addr6(2, 0), "node2")], "TCP")),
        )
        .expect("apply");
    let node_port = at(node_addr6(1), 30081);
    let client = &setup.cluster.client;
    wait_until_served(client, &node_port);

    // 4.5 s of requests on one connection: more than four established timeouts.
    let active = ClientRun {
        one_flow: true,
        interval_ms: 300,
        ..ClientRun::tcp(&node_port, 15)
    }
    .run(client, None)
    .expect("client");
    active.assert_all_ok("an active connection across the established timeout");
    assert_eq!(
        active.seen_as.len(),
        1,
        "one SNAT port for the whole connection: {:?}",
        active.seen_as
    );

    // Idle 2.5 s after its first request: the second finds no flow.
    let idle = ClientRun {
        one_flow: true,
        interval_ms: 2500,
        ..ClientRun::tcp(&node_port, 2)
    }
    .run(client, None)
    .expect("client");
    // With the counters: which way the idle connection's next segment went if it lives on.
    assert_eq!(
        idle.ok,
        1,
        "only the request before the idle time: {idle:?}, {:?}",
        events(&setup)
    );
    assert_eq!(idle.errors_of("reset"), 1, "{idle:?}");
}

/// A client, `far`, behind a router whose link to it has an MTU of 1400, routed to node1 and
/// back; `far` itself keeps an MTU of 1500 unless `narrow_too` (a UDP client must not send more
/// than the hop takes: the router's side of a veth drops longer frames).
fn far_client_behind_a_narrow_hop(setup: &mut AgentLab, narrow_too: bool) -> Host {
    let router_addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0x30);
    let router = add_client6(setup, "rtr", router_addr);
    let far = setup.lab().host("far").expect("far client");
    far.enable_ipv6().expect("IPv6");
    setup
        .lab()
        .veth(&far, "eth0", &router, "far0")
        .expect("far link");
    far.addr6("eth0", "2001:db8:c0::2/64").expect("addr");
    router.addr6("far0", "2001:db8:c0::1/64").expect("addr");
    router
        .ip(&["link", "set", "far0", "mtu", "1400"])
        .expect("narrow hop");
    if narrow_too {
        far.ip(&["link", "set", "eth0", "mtu", "1400"])
            .expect("narrow client");
    }
    router
        .sysctl("net.ipv6.conf.all.forwarding", "1")
        .expect("forwarding");
    far.route(&["2001:db8:f::/64", "via", "2001:db8:c0::1"])
        .expect("route");
    setup
        .cluster
        .node(1)
        .host
        .route(&["2001:db8:c0::/64", "via", &router_addr.to_string()])
        .expect("route back");
    far
}

/// flows_lab's `path_mtu_discovery_through_a_node_port_reaches_*` over IPv6: a client behind a
/// router whose link to it has a smaller MTU than the client's own, so that only the router's
/// ICMPv6 Packet Too Big tells the sender (IPv6 routers never fragment).
fn ipv6_path_mtu_discovery_through_a_node_port_reaches(endpoint_node: u8) {
    let mut setup = dual_stack_lab(vec![2, 1], &[]);
    let endpoint = (pod_addr6(endpoint_node, 0), format!("node{endpoint_node}"));
    setup
        .apply(
            "web.yaml",
            &(service6("web", WEB6, "TCP", 80, 30082, "NodePort", "")
                + "---\n"
                + &endpoint_slice6("web", &[(endpoint.0, endpoint.1.as_str())], "TCP")),
        )
        .expect("apply");
    let far = far_client_behind_a_narrow_hop(&mut setup, false);
    let node_port = at(node_addr6(1), 30082);
    wait_until_served(&far, &node_port);
    // Answers of 20 KB: full-sized segments from the pod.
    let report = ClientRun {
        one_flow: true,
        answer_bytes: 20_000,
        timeout_ms: 5000,
        ..ClientRun::tcp(&node_port, 3)
    }
    .run(&far, None)
    .expect("client");
    assert_answered_past_the_hop(&setup, &report, endpoint_node, "20 KB answers");
}

/// What a path-MTU test checks once its client ran: every request answered, all by the one
/// endpoint on `endpoint_node`, and the router's errors translated on the way.
fn assert_answered_past_the_hop(
    setup: &AgentLab,
    report: &ClientReport,
    endpoint_node: u8,
    answers: &str,
) {
    report.assert_all_ok(&format!("{answers} over a 1400-byte hop"));
    let server = format!("n{endpoint_node}p0");
    assert_eq!(report.servers(), [server.as_str()].into());
    let events = events(setup);
    assert!(events["icmp_error_translated"] >= 1, "{events:?}");
}

#[test]
fn ipv6_path_mtu_discovery_through_a_node_port_reaches_a_local_endpoint() {
    ipv6_path_mtu_discovery_through_a_node_port_reaches(1);
}

#[test]
fn ipv6_path_mtu_discovery_through_a_node_port_reaches_a_remote_endpoint() {
    ipv6_path_mtu_discovery_through_a_node_port_reaches(2);
}

/// Path-MTU discovery for UDP through a NodePort: the endpoint's 4 KB answers leave in
/// fragments of its own MTU (1500), which the narrow hop refuses with a Packet Too Big quoting
/// the first fragment, Fragment header and all, sent to the frontend (node1's address). Only
/// translated to the endpoint (to the endpoint on node2 through node1's SNAT port, as its
/// answer left) does it tell the endpoint's kernel to fragment for 1400: then every answer
/// arrives whole.
fn ipv6_udp_path_mtu_discovery_through_a_node_port_reaches(endpoint_node: u8) {
    let mut setup = dual_stack_lab(vec![1, 1], &[]);
    setup
        .apply(
            "big.yaml",
            &udp_node_port6(
                "big",
                0x56,
                30056,
                (pod_addr6(endpoint_node, 0), &format!("node{endpoint_node}")),
            ),
        )
        .expect("apply");
    let far = far_client_behind_a_narrow_hop(&mut setup, true);
    let node_port = at(node_addr6(1), 30056);
    let big = |requests| ClientRun {
        payload_bytes: 4096,
        ..ClientRun::udp(&node_port, requests)
    };
    // The first answers are lost to the hop until the endpoint hears of it.
    wait_until_answered(&far, big(1));
    let report = big(10).run(&far, None).expect("client");
    assert_answered_past_the_hop(&setup, &report, endpoint_node, "4 KB answers");
}

#[test]
fn ipv6_udp_path_mtu_discovery_through_a_node_port_reaches_a_local_endpoint() {
    ipv6_udp_path_mtu_discovery_through_a_node_port_reaches(1);
}

#[test]
fn ipv6_udp_path_mtu_discovery_through_a_node_port_reaches_a_remote_endpoint() {
    ipv6_udp_path_mtu_discovery_through_a_node_port_reaches(2);
}

/// datapath_lab's `a_retransmitted_syn_reaches_the_endpoint_its_first_syn_went_to` over IPv6,
/// through the agent: the endpoint drops the first SYN of a connection to the IPv6 NodePort,
/// the Service's endpoint is then replaced, and the client's retransmit (about 1 s later),
/// whose key the first SYN claimed without a lookup, is looked up by `lb_xdp6_frontend` and
/// reaches the first endpoint as one flow: a pod on node1, then node2's behind SNAT with the
/// one port the endpoint sees. (Whether the agent has written the replacement before the
/// retransmit arrives is the agent's timing; the retransmit must reach the first endpoint
/// either way.)
#[test]
fn a_retransmitted_ipv6_syn_reaches_the_endpoint_its_first_syn_went_to() {
    let setup = dual_stack_lab(vec![2, 1], &[]);
    let web = service6("web", WEB6, "TCP", 80, 30080, "NodePort", "");
    let apply = |endpoint: (Ipv6Addr, &str)| {
        setup
            .apply(
                "web.yaml",
                &(web.clone() + "---\n" + &endpoint_slice6("web", &[endpoint], "TCP")),
            )
            .expect("apply");
    };
    let node_port = at(node_addr6(1), 30080);
    let client = &setup.cluster.client;
    let n1p1 = (pod_addr6(1, 1), "node1");
    let n2p0 = (pod_addr6(2, 0), "node2");
    for (first, first_name, other) in [(n1p1, "n1p1", n2p0), (n2p0, "n2p0", n1p1)] {
        apply(first);
        wait_until_answered_by(client, &node_port, first_name);
        let syn_drop = SynDrop::new(&setup.cluster.pod(first_name).host, lab::agent::POD_PORT);
        let report = std::thread::scope(|scope| {
            let connection = scope.spawn(|| {
                ClientRun {
                    timeout_ms: 5000,
                    ..ClientRun::tcp(&node_port, 1)
                }
                .run(client, None)
            });
            syn_drop.wait_for_one(Duration::from_secs(5));
            apply(other);
            assert_eq!(syn_drop.remove(), 1, "{first_name}: the first SYN only");
            connection.join().expect("client thread").expect("client")
        });
        report.assert_all_ok(&format!(
            "a connection whose first SYN {first_name} dropped"
        ));
        assert_eq!(report.servers(), [first_name].into(), "{report:?}");
        let expected_source = if first_name == "n1p1" {
            seen(CLIENT_ADDR6)
        } else {
            seen(node_addr6(1))
        };
        assert_eq!(
            report.peers_seen.keys().collect::<Vec<_>>(),
            [&expected_source],
            "{report:?}"
        );
        assert_eq!(report.seen_as.len(), 1, "one source port: {report:?}");
    }
    let events = events(&setup);
    let refused: Vec<_> = events
        .iter()
        .filter(|(event, count)| {
            **count != 0 && (event.starts_with("drop") || event.starts_with("reject"))
        })
        .collect();
    assert!(refused.is_empty(), "{events:?}");
    assert_eq!(events["ct_flow_restarted"], 0, "{events:?}");
}

/// Waits until a connection to `target` is answered by the server `name`: the agent has written
/// the endpoint it serves now.
fn wait_until_answered_by(client: &Host, target: &str, name: &str) {
    ClientRun {
        timeout_ms: 500,
        ..ClientRun::tcp(target, 1)
    }
    .run_until(client, SYNC_TIMEOUT, |report| {
        report.errors == 0 && report.servers() == [name].into()
    })
    .unwrap_or_else(|error| panic!("served by {name}: {error:#}"));
}
