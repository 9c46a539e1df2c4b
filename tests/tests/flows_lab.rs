//! Flows that outlive the datapath's timeouts, through the real agent in the lab: the agent runs
//! with timeouts of about a second (flags), so idle gaps longer than twice each of them take
//! seconds. The agent runs on node1; flows to endpoints on node2 are SNATed to node2's pod and
//! their replies come back to one of node1's SNAT ports, flows to node1's own pods are not.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use lab::{
    agent::{AgentLab, POD_PORT, node_port_service_with_endpoints},
    peer::ClientRun,
    topology::{CLIENT_ADDR, POD_IFACE, node_addr, pod_addr},
};

const SHORT_TIMEOUTS: &[&str] = &[
    "--conntrack-tcp-timeout-syn",
    "1s",
    "--conntrack-tcp-timeout-closing",
    "500ms",
    "--conntrack-tcp-timeout-half-closed",
    "500ms",
    "--conntrack-udp-timeout",
    "1s",
];

#[test]
fn idle_tcp_connections_to_a_remote_endpoint_outlive_the_syn_and_closing_timeouts() {
    let mut setup = AgentLab::new().expect("lab");
    setup.start_agent(SHORT_TIMEOUTS).expect("agent");
    setup
        .apply(
            "web.yaml",
            &node_port_service_with_endpoints(
                "web",
                "10.96.0.20",
                30081,
                &[(pod_addr(2, 0), "node2")],
            ),
        )
        .expect("apply");
    let node_port = format!("{}:30081", node_addr(1));
    // One connection, idle 2.5 s between requests: more than twice the SYN (1 s) and the
    // CLOSING (0.5 s) timeouts.
    let report = ClientRun {
        one_flow: true,
        interval_ms: 2500,
        ..ClientRun::tcp(&node_port, 4)
    }
    .run(&setup.cluster.client, None)
    .expect("client");
    report.assert_all_ok("an idle connection through a NodePort to node2");
    assert_eq!(report.servers(), ["n2p0"].into());
    assert_eq!(
        report.seen_as.len(),
        1,
        "one SNAT port for the whole connection: {:?}",
        report.seen_as
    );
    let events = setup.events().expect("events");
    assert_eq!(events["ct_flow_restarted"], 0, "{events:?}");
}

/// Clients that send their request and half-close (shutdown(SHUT_WR)) get 2 MB answers that
/// start three times the closing timeout later, through a NodePort to node2's pod (SNAT) and to
/// node1's two: a flow after one side's FIN waits out the half-closed timeout (1 h by default,
/// kube-proxy's CLOSE_WAIT), not the closing one. Ended at the closing timeout, a flow to node1
/// took the client's acknowledgments of the late answer for a new flow, which went to either
/// pod, and the other one reset the connection (a SNAT flow's answers revive it: node2's
/// connections got through before too).
#[test]
fn half_closed_connections_get_answers_later_than_the_closing_timeout() {
    let mut setup = AgentLab::new().expect("lab");
    setup
        .start_agent(&["--conntrack-tcp-timeout-closing", "500ms"])
        .expect("agent");
    setup
        .apply(
            "web.yaml",
            &node_port_service_with_endpoints(
                "web",
                "10.96.0.20",
                30081,
                &[(pod_addr(2, 0), "node2")],
            ),
        )
        .expect("apply");
    setup
        .apply(
            "local.yaml",
            &node_port_service_with_endpoints(
                "local",
                "10.96.0.21",
                30082,
                &[(pod_addr(1, 0), "node1"), (pod_addr(1, 1), "node1")],
            ),
        )
        .expect("apply");
    for port in [30081, 30082] {
        let node_port = format!("{}:{port}", node_addr(1));
        let report = ClientRun {
            half_close_answer_ms: Some(1500),
            answer_bytes: 2 << 20,
            timeout_ms: 4000,
            ..ClientRun::tcp(&node_port, 6)
        }
        .run(&setup.cluster.client, None)
        .expect("client");
        report.assert_all_ok("half-closed connections answered 1.5 s later");
    }
}

/// New connections through a NodePort to node2 faster than the SNAT range frees its ports: the
/// range's four ports, each held 2 s after its flow closed, are all taken by four connections;
/// 1.2 s later, past half the delay, four more connections take them again as last resorts,
/// where they used to see their SYNs dropped until the delay was over.
#[test]
fn new_connections_outpacing_the_snat_ports_reuse_delay_take_closed_flows_ports() {
    let mut setup = AgentLab::new().expect("lab");
    setup
        .start_agent(&[
            "--snat-port-range",
            "61000-61003",
            "--snat-port-reuse-delay",
            "2s",
        ])
        .expect("agent");
    setup
        .apply(
            "web.yaml",
            &node_port_service_with_endpoints(
                "web",
                "10.96.0.20",
                30081,
                &[(pod_addr(2, 0), "node2")],
            ),
        )
        .expect("apply");
    let node_port = format!("{}:30081", node_addr(1));
    let mut ports = std::collections::BTreeSet::new();
    for (what, pause) in [
        ("first", Duration::ZERO),
        ("second", Duration::from_millis(1200)),
    ] {
        std::thread::sleep(pause);
        let report = ClientRun::tcp(&node_port, 4)
            .run(&setup.cluster.client, None)
            .expect("client");
        report.assert_all_ok(&format!("the {what} four connections"));
        assert_eq!(report.servers(), ["n2p0"].into());
        for seen in report.seen_as.keys() {
            let seen: SocketAddrV4 = seen.parse().expect("address and port");
            assert_eq!(*seen.ip(), node_addr(1), "SNATed to node1");
            ports.insert(seen.port());
        }
    }
    assert!(
        ports.iter().all(|port| (61000..=61003).contains(port)),
        "{ports:?}"
    );
    let events = setup.events().expect("events");
    assert_eq!(events["drop_snat_exhausted"], 0, "{events:?}");
    assert_eq!(events["ct_flow_restarted"], 0, "{events:?}");
}

/// A UDP NodePort Service `name` on `cluster_ip`:53 and `node_port`, whose one endpoint is
/// `endpoint` on `node`.
fn udp_service(
    name: &str,
    cluster_ip: &str,
    node_port: u16,
    endpoint: Ipv4Addr,
    node: &str,
) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: NodePort\n  clusterIP: {cluster_ip}\n  ports:\n  - {{name: dns, port: 53, protocol: UDP, targetPort: {POD_PORT}, nodePort: {node_port}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports:\n- {{name: dns, port: {POD_PORT}, protocol: UDP}}\nendpoints:\n- addresses: [\"{endpoint}\"]\n  nodeName: {node}\n  conditions: {{ready: true}}\n"
    )
}

#[test]
fn eight_kilobyte_udp_exchanges_cross_node_ports_to_local_and_remote_endpoints_and_a_cluster_ip() {
    let mut setup = AgentLab::new().expect("lab");
    setup.start_agent(&[]).expect("agent");
    let local = udp_service("big-local", "10.96.0.54", 30054, pod_addr(1, 0), "node1");
    let remote = udp_service("big-remote", "10.96.0.55", 30055, pod_addr(2, 0), "node2");
    setup
        .apply("big.yaml", &(local + "---\n" + &remote))
        .expect("apply");
    // 8 KB each way: six fragments at the lab's MTU of 1500, in both directions.
    fn exchange(to: &str) -> ClientRun<'_> {
        ClientRun {
            payload_bytes: 8192,
            ..ClientRun::udp(to, 5)
        }
    }
    let local_port = format!("{}:30054", node_addr(1));
    let report = exchange(&local_port)
        .run(&setup.cluster.client, None)
        .expect("client");
    report.assert_all_ok("8 KB through a NodePort to a local endpoint");
    assert_eq!(report.servers(), ["n1p0"].into());
    let remote_port = format!("{}:30055", node_addr(1));
    let report = exchange(&remote_port)
        .run(&setup.cluster.client, None)
        .expect("client");
    report.assert_all_ok("8 KB through a NodePort to node2 (SNAT)");
    assert_eq!(report.servers(), ["n2p0"].into());
    let report = exchange("10.96.0.54:53")
        .run(setup.client_pod(), Some(&setup.cgroup))
        .expect("client");
    report.assert_all_ok("8 KB to a ClusterIP from a pod");
    let events = setup.events().expect("events");
    assert_eq!(
        events["pass_fragment"], 0,
        "every later fragment had its first: {events:?}"
    );
}

/// One UDP socket's requests through a NodePort to a pod on the agent's node, 20 ms apart for
/// three UDP timeouts, then another socket's 8 KB requests (six fragments each way): the flow
/// caches serve most datagrams and most of the pod's answers (the agent's counts say so), yet
/// each socket's flow is one flow throughout (a slot serves only until the entry is due for a
/// refresh, so the entry never goes stale under it), every request is answered by the same pod,
/// and no later fragment misses its first.
#[test]
fn a_udp_flow_to_a_local_pod_served_from_the_flow_caches_outlives_its_timeout_whole() {
    let mut setup = AgentLab::new().expect("lab");
    setup.start_agent(SHORT_TIMEOUTS).expect("agent");
    setup
        .apply(
            "dns.yaml",
            &udp_service("dns", "10.96.0.56", 30056, pod_addr(1, 0), "node1"),
        )
        .expect("apply");
    let node_port = format!("{}:30056", node_addr(1));
    let one_socket = |requests, payload_bytes| ClientRun {
        one_flow: true,
        interval_ms: 20,
        payload_bytes,
        ..ClientRun::udp(&node_port, requests)
    };
    // 150 requests: over 3 s, three UDP timeouts of 1 s.
    let report = one_socket(150, 0)
        .run(&setup.cluster.client, None)
        .expect("client");
    report.assert_all_ok("one socket's requests through a NodePort to a local pod");
    assert_eq!(report.servers(), ["n1p0"].into());
    let report = one_socket(10, 8192)
        .run(&setup.cluster.client, None)
        .expect("client");
    report.assert_all_ok("one socket's 8 KB requests through a NodePort to a local pod");
    assert_eq!(report.servers(), ["n1p0"].into());

    let stats = lab::agent::lb_json(setup.pin_dir(), &["stats"]).expect("lb stats");
    let cache = |hook: &str| {
        stats["flow_caches"]
            .as_array()
            .expect("flow caches")
            .iter()
            .find(|cache| {
                cache["hook"] == hook && cache["ip_family"] == "IPv4" && cache["protocol"] == "UDP"
            })
            .expect("the IPv4 cache's UDP counts")
            .clone()
    };
    let (xdp, tc) = (cache("xdp"), cache("tc"));
    let hits = |cache: &serde_json::Value| cache["hits"].as_u64().expect("hits");
    assert!(
        hits(&xdp) >= 80,
        "the client's datagrams served from XDP's cache: {xdp}"
    );
    assert!(
        hits(&tc) >= 80,
        "the pod's answers served from tc's cache: {tc}"
    );
    let services = lab::agent::lb_json(setup.pin_dir(), &["services"]).expect("lb services");
    let dns = services
        .as_array()
        .expect("services")
        .iter()
        .find(|service| service["name"] == "default/dns:dns/UDP")
        .expect("the dns service")
        .clone();
    assert_eq!(dns["new_flows"], 2, "one flow per socket, kept: {dns}");
    let events = setup.events().expect("events");
    assert_eq!(events["pass_fragment"], 0, "{events:?}");
    assert_eq!(events["ct_flow_restarted"], 0, "{events:?}");
}

#[test]
fn two_udp_clients_sharing_a_tiny_snat_range_never_get_each_others_answers() {
    let mut setup = AgentLab::new().expect("lab");
    // Two SNAT ports: the second client's flow can only be placed on a port the first one
    // does not own, however long the first one has been talking.
    let mut flags = SHORT_TIMEOUTS.to_vec();
    flags.extend(["--snat-port-range", "61000-61001"]);
    setup.start_agent(&flags).expect("agent");
    setup
        .apply(
            "dns.yaml",
            &udp_service("dns", "10.96.0.53", 30053, pod_addr(2, 0), "node2"),
        )
        .expect("apply");
    let second_client = setup
        .add_client("c2", Ipv4Addr::new(203, 0, 113, 21))
        .expect("second client");
    let node_port = format!("{}:30053", node_addr(1));
    // Each client: one socket, a datagram every 300 ms for 4.5 s, i.e. over four UDP timeouts;
    // the second starts 1.5 s after the first flow's first answer, when that flow is older than
    // the UDP timeout.
    let one_flow = ClientRun {
        one_flow: true,
        interval_ms: 300,
        ..ClientRun::udp(&node_port, 15)
    };
    let ready = setup.scratch_file("first.ready");
    let (first, second) = std::thread::scope(|scope| {
        let first = scope.spawn(|| {
            ClientRun {
                ready_file: Some(&ready),
                ..one_flow.clone()
            }
            .run(&setup.cluster.client, None)
        });
        lab::peer::wait_until_answered(&ready, Duration::from_secs(10)).expect("first flow");
        // Not a wait for the client: the first flow must outlive the 1 s UDP timeout.
        std::thread::sleep(Duration::from_millis(1500));
        let second = one_flow.run(&second_client, None);
        (first.join().expect("first client"), second)
    });
    let (first, second) = (first.expect("first client"), second.expect("second client"));
    first.assert_all_ok("first client");
    second.assert_all_ok("second client");
    assert_eq!(first.seen_as.len(), 1, "first client: {:?}", first.seen_as);
    assert_eq!(
        second.seen_as.len(),
        1,
        "second client: {:?}",
        second.seen_as
    );
    assert_ne!(
        first.seen_as.keys().next(),
        second.seen_as.keys().next(),
        "the two flows share a SNAT port"
    );
}

/// A UDP datagram with IP options (the client sets them on its socket) through a NodePort to a
/// local endpoint with no socket on the port: the endpoint's port unreachable quotes the
/// datagram's header, options and all, and tc must find the quoted UDP header behind them to
/// translate it. Translated, it reaches the client's connected socket as ECONNREFUSED;
/// untranslated (the quote names the pod), the socket never hears of it and times out.
#[test]
fn a_port_unreachable_quoting_ip_options_reaches_the_udp_client_through_a_node_port() {
    use std::os::fd::AsRawFd;
    let mut setup = AgentLab::new().expect("lab");
    setup.start_agent(&[]).expect("agent");
    // Port 9 (discard) on the pod: nothing listens there.
    let closed = udp_service("closed", "10.96.0.56", 30056, pod_addr(1, 0), "node1").replace(
        &format!("port: {POD_PORT}, protocol: UDP}}"),
        "port: 9, protocol: UDP}",
    );
    setup.apply("closed.yaml", &closed).expect("apply");
    let before = setup.events().expect("events");
    {
        let _inside = setup.cluster.client.enter().expect("enter the client");
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        // No operation (1) three times, then End of Options List (0): one 4-byte word.
        let options = [1u8, 1, 1, 0];
        // SAFETY: a valid socket and a buffer of the length given.
        let set = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_OPTIONS,
                options.as_ptr().cast(),
                options.len() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0, "IP_OPTIONS: {}", std::io::Error::last_os_error());
        socket
            .connect(format!("{}:30056", node_addr(1)))
            .expect("connect");
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        socket.send(b"query").expect("send");
        let error = socket.recv(&mut [0u8; 64]).expect_err("port unreachable");
        assert_eq!(
            error.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{error}"
        );
    }
    let after = setup.events().expect("events");
    assert!(
        after["icmp_error_translated"] > before["icmp_error_translated"],
        "the endpoint's error was translated: before {before:?}, after {after:?}"
    );
}

/// A local endpoint behind a pod link of a smaller MTU (1400, as an overlay's) than the
/// client's path (1500): a datagram with DF set that fits the client's path but not the pod's
/// link makes node1's stack, forwarding it to the pod, answer with ICMP fragmentation needed.
/// That error quotes the datagram as the pod would have got it (to the pod); translated, it
/// reaches the client's connected socket, which learns the path's MTU (EMSGSIZE, then
/// `IP_MTU` 1400); untranslated, the client never hears of it and its datagrams vanish.
#[test]
fn fragmentation_needed_from_the_node_reaches_the_udp_client_through_a_node_port() {
    use std::os::fd::AsRawFd;
    let mut setup = AgentLab::new().expect("lab");
    setup.start_agent(&[]).expect("agent");
    setup
        .apply(
            "narrow.yaml",
            &udp_service("narrow", "10.96.0.57", 30057, pod_addr(1, 0), "node1"),
        )
        .expect("apply");
    let pod = setup.cluster.pod("n1p0");
    pod.host
        .ip(&["link", "set", POD_IFACE, "mtu", "1400"])
        .expect("narrow the pod's side");
    let node = &setup.cluster.node(1).host;
    for link in ["v-n1p0", "cni0"] {
        node.ip(&["link", "set", link, "mtu", "1400"])
            .expect("narrow the node's side");
    }
    let before = setup.events().expect("events");
    {
        let _inside = setup.cluster.client.enter().expect("enter the client");
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        let fd = socket.as_raw_fd();
        let discover = libc::IP_PMTUDISC_DO;
        // SAFETY: a valid socket and an int option of the size given.
        let set = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                (&raw const discover).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(
            set,
            0,
            "IP_MTU_DISCOVER: {}",
            std::io::Error::last_os_error()
        );
        socket
            .connect(format!("{}:30057", node_addr(1)))
            .expect("connect");
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        socket.send(&[0u8; 1450]).expect("send");
        let error = socket
            .recv(&mut [0u8; 64])
            .expect_err("fragmentation needed");
        assert_eq!(error.raw_os_error(), Some(libc::EMSGSIZE), "{error}");
        let mut mtu: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid socket, an int and its length.
        let got = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_IP,
                libc::IP_MTU,
                (&raw mut mtu).cast(),
                &raw mut len,
            )
        };
        assert_eq!(got, 0, "IP_MTU: {}", std::io::Error::last_os_error());
        assert_eq!(mtu, 1400, "the path's MTU the client learnt");
    }
    let after = setup.events().expect("events");
    assert!(
        after["icmp_error_translated"] > before["icmp_error_translated"],
        "the node's error was translated: before {before:?}, after {after:?}"
    );
}

/// A client behind a router whose link to it has a smaller MTU than the client's own, so the
/// client's SYN promises segments that hop cannot carry: only ICMP fragmentation needed from the
/// router tells the sender.
#[test]
fn path_mtu_discovery_through_a_node_port_reaches_a_local_endpoint() {
    path_mtu_discovery_through_a_node_port_reaches(1);
}

/// The same over a NodePort of node1 whose endpoint is on node2: the router's error reaches
/// node1's frontend and goes on to node2's pod, about its answer to node1's SNAT port.
#[test]
fn path_mtu_discovery_through_a_node_port_reaches_a_remote_endpoint() {
    path_mtu_discovery_through_a_node_port_reaches(2);
}

fn path_mtu_discovery_through_a_node_port_reaches(endpoint_node: u8) {
    let mut setup = AgentLab::new().expect("lab");
    setup.start_agent(&[]).expect("agent");
    let endpoint = (pod_addr(endpoint_node, 0), format!("node{endpoint_node}"));
    setup
        .apply(
            "web.yaml",
            &node_port_service_with_endpoints(
                "web",
                "10.96.0.22",
                30082,
                &[(endpoint.0, endpoint.1.as_str())],
            ),
        )
        .expect("apply");
    let router = setup
        .add_client("rtr", Ipv4Addr::new(203, 0, 113, 30))
        .expect("router");
    let far = setup.lab().host("far").expect("far client");
    setup
        .lab()
        .veth(&far, "eth0", &router, "far0")
        .expect("far link");
    far.addr("eth0", "192.0.2.2/24").expect("addr");
    router.addr("far0", "192.0.2.1/24").expect("addr");
    router
        .ip(&["link", "set", "far0", "mtu", "1400"])
        .expect("narrow hop");
    router
        .sysctl("net.ipv4.ip_forward", "1")
        .expect("forwarding");
    far.route(&["203.0.113.0/24", "via", "192.0.2.1"])
        .expect("route");
    setup
        .cluster
        .node(1)
        .host
        .route(&["192.0.2.0/24", "via", "203.0.113.30"])
        .expect("route back");
    // Answers of 20 KB: full-sized segments from the pod, with DF set.
    let report = ClientRun {
        one_flow: true,
        answer_bytes: 20_000,
        timeout_ms: 5000,
        ..ClientRun::tcp(&format!("{}:30082", node_addr(1)), 3)
    }
    .run(&far, None)
    .expect("client");
    report.assert_all_ok("20 KB answers over a 1400-byte hop");
    let server = format!("n{endpoint_node}p0");
    assert_eq!(report.servers(), [server.as_str()].into());
    let events = setup.events().expect("events");
    assert!(events["icmp_error_translated"] >= 1, "{events:?}");
}

/// An attacker off the path sends RSTs for an idle connection through a NodePort to node2's
/// pod, with sequence numbers half the sequence space away from what each side has sent: one
/// spoofed from the pod to node1's SNAT port, one spoofed from the client to the NodePort.
/// Neither may end the flow, whose CLOSING state would otherwise expire (500 ms) before the next
/// request, 2.5 s later, and take its SNAT port away.
#[test]
fn blind_rsts_end_no_connection_through_a_node_port() {
    blind_closes_end_no_connection_through_a_node_port(&[], "drop_rst_out_of_window");
}

/// The same with FINs: they go on translated (the receivers' stacks ignore them) but must not
/// move the flow to CLOSING either.
#[test]
fn blind_fins_end_no_connection_through_a_node_port() {
    blind_closes_end_no_connection_through_a_node_port(&["--fin"], "ct_fin_out_of_window");
}

/// An idle connection through a NodePort to node2's pod gets two spoofed closes (`lab-peer rst`
/// with `kind`), half the sequence space away from what each side has sent, counted as `event`,
/// and goes on.
fn blind_closes_end_no_connection_through_a_node_port(kind: &[&str], event: &str) {
    let mut setup = AgentLab::new().expect("lab");
    setup.start_agent(SHORT_TIMEOUTS).expect("agent");
    let pod = SocketAddrV4::new(pod_addr(2, 0), POD_PORT);
    setup
        .apply(
            "web.yaml",
            &node_port_service_with_endpoints("web", "10.96.0.23", 30083, &[(*pod.ip(), "node2")]),
        )
        .expect("apply");
    let attacker = setup
        .add_client("atk", Ipv4Addr::new(203, 0, 113, 31))
        .expect("attacker");
    let node_port = format!("{}:30083", node_addr(1));
    let client = &setup.cluster.client;
    let ready = setup.scratch_file("client.ready");
    let report = std::thread::scope(|scope| {
        let run = scope.spawn(|| {
            ClientRun {
                one_flow: true,
                interval_ms: 2500,
                ready_file: Some(&ready),
                ..ClientRun::tcp(&node_port, 3)
            }
            .run(client, None)
        });
        // The first request answered: the connection is in conntrack, idle until the next.
        lab::peer::wait_until_answered(&ready, Duration::from_secs(10)).expect("connection");
        let entries = setup.conntrack().expect("conntrack");
        let (original_key, original) = entries
            .iter()
            .find(|(key, value)| {
                key.direction == lb_common::ct_direction::FLOW
                    && lb_common::Flow4Value::of(value).frontend_port == 30083
                    && value.flags & lb_common::ct_flags::SNAT != 0
            })
            .expect("the connection's flow");
        let (_, reply) = entries
            .iter()
            .find(|(key, _)| {
                key.direction == lb_common::ct_direction::REPLY
                    && key.dport == original.snat_port
                    && key.saddr == u32::from(*pod.ip())
            })
            .expect("its reply half");
        let snat = SocketAddrV4::new(Ipv4Addr::from(original.snat_addr), original.snat_port);
        let client_port = SocketAddrV4::new(Ipv4Addr::from(original_key.saddr), original_key.sport);
        let frontend = SocketAddrV4::new(node_addr(1), 30083);
        for (from, to, seq) in [
            (pod, snat, reply.seq_next.wrapping_add(1 << 31)),
            (
                client_port,
                frontend,
                original.seq_next.wrapping_add(1 << 31),
            ),
        ] {
            let (from, to, seq) = (from.to_string(), to.to_string(), seq.to_string());
            let mut args = vec!["rst", "--from", &from, "--to", &to, "--seq", &seq];
            args.extend_from_slice(kind);
            attacker
                .run(lab::peer::binary().expect("lab-peer"), &args)
                .expect("spoofed close");
        }
        run.join().expect("client thread")
    })
    .expect("client");
    report.assert_all_ok("requests 2.5 s apart around blind closes");
    assert_eq!(
        report.seen_as.len(),
        1,
        "one SNAT port: {:?}",
        report.seen_as
    );
    let events = setup.events().expect("events");
    assert_eq!(events[event], 2, "{events:?}");
    assert_eq!(events["ct_flow_restarted"], 0, "{events:?}");
}

/// A client connects through a NodePort to a pod on the agent's node from a port it picked,
/// closes, and connects from that port straight to the pod (the client routes the pod network
/// through node1, as hosts routed to pods can). The closed flow's entry still waits out its
/// closing timeout (10 s by default), and the pod's answers to the second connection must not be
/// taken for that flow's: translated back to the NodePort, they would reach a client socket
/// that never sent to it, and the connection would not be made.
#[test]
fn a_connection_straight_to_a_local_pod_from_a_closed_flows_port_is_made() {
    let mut setup = AgentLab::new().expect("lab");
    setup.start_agent(&[]).expect("agent");
    let pod = SocketAddrV4::new(pod_addr(1, 0), POD_PORT);
    setup
        .apply(
            "web.yaml",
            &node_port_service_with_endpoints("web", "10.96.0.25", 30085, &[(*pod.ip(), "node1")]),
        )
        .expect("apply");
    let client = &setup.cluster.client;
    client
        .route(&["10.244.1.0/24", "via", &node_addr(1).to_string()])
        .expect("route to node1's pods");
    let from_port = 41_085;
    let timeout = Duration::from_secs(3);
    for to in [SocketAddrV4::new(node_addr(1), 30085), pod] {
        let reply = lab::peer::request_from_port(client, from_port, to, timeout)
            .unwrap_or_else(|error| panic!("to {to}: {error:#}"));
        let (server, _, seen_as) = lab::peer::parse_reply(&reply).expect("a reply line");
        assert_eq!(
            (server, seen_as),
            ("n1p0", format!("{CLIENT_ADDR}:{from_port}").as_str()),
            "to {to}"
        );
    }
    let events = setup.events().expect("events");
    assert_eq!(events["ct_flow_superseded"], 1, "{events:?}");
}

/// A long upload through a NodePort to a pod on the agent's node, whose steady segments XDP's
/// flow cache serves without writing the flow's entry, ends with the client's RST, and the RST
/// reaches the pod: the entry trails what the client has sent by less than a RST may lie ahead.
#[test]
fn a_clients_rst_after_a_long_upload_to_a_local_pod_resets_the_pods_connection() {
    let mut setup = AgentLab::new().expect("lab");
    setup.start_agent(SHORT_TIMEOUTS).expect("agent");
    setup
        .apply(
            "web.yaml",
            &node_port_service_with_endpoints(
                "web",
                "10.96.0.24",
                30084,
                &[(pod_addr(1, 0), "node1")],
            ),
        )
        .expect("apply");
    let pod = setup.cluster.pod("n1p0");
    let resets = || tcp_counter(&pod.host, "EstabResets");
    let before = resets();
    let node_port = format!("{}:30084", node_addr(1));
    let sent = setup
        .cluster
        .client
        .run(
            lab::peer::binary().expect("lab-peer"),
            &["upload", "--to", &node_port, "--bytes", "4194304"],
        )
        .expect("upload");
    assert!(sent.contains("4194304"), "{sent}");
    assert_reset_once_by_the_clients_rst(&setup, resets, before);
}

/// A long upload to a local pod while, through the same node, a connection to a remote endpoint
/// makes request after request: every steady segment of that SNAT flow misses XDP's flow cache
/// (which does not take SNAT flows), so the cache's gate keeps closing and opening under the
/// upload, whose segments go by the cache or the full path in turn. Both stay whole: every
/// request is answered, the upload is acknowledged to its last byte, and its closing RST still
/// resets the pod's connection.
#[test]
fn an_upload_to_a_local_pod_stays_whole_while_snat_traffic_keeps_the_flow_cache_standing_aside() {
    let mut setup = AgentLab::new().expect("lab");
    setup.start_agent(SHORT_TIMEOUTS).expect("agent");
    setup
        .apply(
            "services.yaml",
            &(node_port_service_with_endpoints(
                "near",
                "10.96.0.25",
                30085,
                &[(pod_addr(1, 0), "node1")],
            ) + "---\n"
                + &node_port_service_with_endpoints(
                    "far",
                    "10.96.0.26",
                    30086,
                    &[(pod_addr(2, 0), "node2")],
                )),
        )
        .expect("apply");
    let pod = setup.cluster.pod("n1p0");
    let resets = || tcp_counter(&pod.host, "EstabResets");
    let before = resets();
    let near = format!("{}:30085", node_addr(1));
    let far = format!("{}:30086", node_addr(1));
    let client = &setup.cluster.client;
    let ready = setup.scratch_file("far.ready");
    let (far_report, sent) = std::thread::scope(|scope| {
        let far_run = scope.spawn(|| {
            ClientRun {
                one_flow: true,
                ready_file: Some(&ready),
                ..ClientRun::tcp(&far, 3000)
            }
            .run(client, None)
        });
        lab::peer::wait_until_answered(&ready, Duration::from_secs(10)).expect("far client");
        let sent = client.run(
            lab::peer::binary().expect("lab-peer"),
            &["upload", "--to", &near, "--bytes", "4194304"],
        );
        (far_run.join().expect("far client thread"), sent)
    });
    let far_report = far_report.expect("far client");
    far_report.assert_all_ok("requests over one connection to node2's pod");
    assert_eq!(far_report.servers(), ["n2p0"].into());
    let sent = sent.expect("upload");
    assert!(sent.contains("4194304"), "{sent}");
    assert_reset_once_by_the_clients_rst(&setup, resets, before);
    let events = setup.events().expect("events");
    assert_eq!(events["ct_flow_restarted"], 0, "{events:?}");
}

/// Waits (up to 5 s) for the pod's count of reset connections (`resets`) to move from `before`,
/// then checks that the client's RST reset exactly one connection and none was dropped as out of
/// its window.
fn assert_reset_once_by_the_clients_rst(setup: &AgentLab, resets: impl Fn() -> u64, before: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while resets() == before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let events = setup.events().expect("events");
    assert_eq!(
        resets(),
        before + 1,
        "the pod's connection reset by the client's RST; events {events:?}"
    );
    assert_eq!(events["drop_rst_out_of_window"], 0, "{events:?}");
}

/// A counter of the `Tcp:` lines of a host's /proc/net/snmp.
fn tcp_counter(host: &lab::lab::Host, name: &str) -> u64 {
    let snmp = host.run("cat", &["/proc/net/snmp"]).expect("snmp");
    let mut lines = snmp.lines().filter(|line| line.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        panic!("no Tcp lines in {snmp}");
    };
    let at = names
        .split_whitespace()
        .position(|field| field == name)
        .unwrap_or_else(|| panic!("no {name} in {names}"));
    values
        .split_whitespace()
        .nth(at)
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no value of {name} in {values}"))
}
