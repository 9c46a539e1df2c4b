//! Direct server return in the lab, with real TCP: `lb run --nodeport-mode dsr` on node1 and
//! on node2 (both read the same manifests, Node objects included), the client on the fabric,
//! the endpoint a pod on node2. node2 answers the client itself over the fabric; node1 sees
//! only the client's packets.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use lab::{
    agent::{
        AgentLab, POD_PORT, SYNC_TIMEOUT, dsr_marked_node_manifest, endpoint_slice, node_manifest,
    },
    peer::ClientRun,
    topology::{CLIENT_ADDR, ClusterSpec, FABRIC_IFACE, node_addr, pod_addr},
};

/// The LoadBalancer IP, routed to node1 by the client.
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 80);
const NODE_PORT: u16 = 30080;
const SYN_TIMEOUT: Duration = Duration::from_secs(1);
const ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(3);

fn web_service() -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.10\n  ports:\n  - {{name: http, port: 80, targetPort: {POD_PORT}, nodePort: {NODE_PORT}}}\nstatus:\n  loadBalancer:\n    ingress: [{{ip: {LB_IP}}}]\n"
    )
}

/// A NodePort Service `api` whose endpoint is node2's second pod.
fn api_service() -> [String; 2] {
    [
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: api, namespace: default}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.11\n  ports:\n  - {{name: http, port: 80, targetPort: {POD_PORT}, nodePort: {API_NODE_PORT}}}\n"
        ),
        endpoint_slice("api", &[(pod_addr(2, 1), "node2")]),
    ]
}

const API_NODE_PORT: u16 = 30090;

/// One pod, on node2, serving; both nodes' agents running with DSR on the Service `web`, whose
/// manifests (the Nodes' too, marked as taking DSR options as their agents would mark them)
/// are there before they start.
fn dsr_lab() -> AgentLab {
    dsr_lab_with(1, &[])
}

/// As [`dsr_lab`], with `pods_on_node2` pods there and `more` manifests.
fn dsr_lab_with(pods_on_node2: u8, more: &[String]) -> AgentLab {
    let mut objects = cluster_objects(true);
    objects.extend_from_slice(more);
    lab_of(pods_on_node2, &objects)
}

/// The Nodes (node2 marked as taking DSR options or not) and `web` with its pod on node2.
fn cluster_objects(node2_marked: bool) -> Vec<String> {
    vec![
        dsr_marked_node_manifest(1, false),
        if node2_marked {
            dsr_marked_node_manifest(2, false)
        } else {
            node_manifest(2, false)
        },
        web_service(),
        endpoint_slice("web", &[(pod_addr(2, 0), "node2")]),
    ]
}

fn write_manifests(setup: &AgentLab, objects: &[String]) {
    std::fs::write(
        setup.manifests().join("cluster.yaml"),
        objects.join("---\n"),
    )
    .expect("manifests");
}

/// The lab with `objects` as its manifests and both agents started.
fn lab_of(pods_on_node2: u8, objects: &[String]) -> AgentLab {
    let mut setup = AgentLab::with_spec(&ClusterSpec {
        pods_per_node: vec![0, pods_on_node2],
        ..Default::default()
    })
    .expect("lab");
    setup
        .cluster
        .client
        .route(&[&format!("{LB_IP}/32"), "via", &node_addr(1).to_string()])
        .expect("route to the LoadBalancer IP");
    write_manifests(&setup, objects);
    let flags = agent_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    setup.start_agent(&flags).expect("node1's agent");
    setup.start_node2_agent(&flags).expect("node2's agent");
    setup
}

fn agent_flags() -> Vec<String> {
    [
        "--nodeport-mode".to_owned(),
        "dsr".to_owned(),
        "--conntrack-tcp-timeout-syn".to_owned(),
        format!("{}ms", SYN_TIMEOUT.as_millis()),
        "--conntrack-tcp-timeout-established".to_owned(),
        format!("{}ms", ESTABLISHED_TIMEOUT.as_millis()),
    ]
    .into()
}

/// Packets node1's fabric NIC received, and the client's sent.
fn packets(setup: &AgentLab) -> (u64, u64) {
    let node1 = setup
        .cluster
        .node(1)
        .host
        .link_stats(FABRIC_IFACE)
        .expect("stats");
    let client = setup
        .cluster
        .client
        .link_stats(FABRIC_IFACE)
        .expect("stats");
    (node1.rx_packets, client.tx_packets)
}

/// Connections through the NodePort and the LoadBalancer IP reach node2's pod with the client's
/// own address, their answers come from node2 straight (node1 receives no more packets than the
/// client sent), and both agents count the options. Each frontend's connections come from
/// ports of their own: a port a closed DSR flow through the other frontend used would go by
/// SNAT (node1 cannot tell that flow closed at both ends; datapath_dsr tests that).
#[test]
fn nodeport_and_loadbalancer_ip_answers_go_from_the_endpoints_node_to_the_client() {
    let setup = dsr_lab();
    let node_port = SocketAddrV4::new(node_addr(1), NODE_PORT).to_string();
    let lb_ip = SocketAddrV4::new(LB_IP, 80).to_string();
    let client_ports = |range: &str| {
        setup
            .cluster
            .client
            .sysctl("net.ipv4.ip_local_port_range", range)
            .expect("the client's port range")
    };
    client_ports("10000 29999");
    // The first connection may meet a neighbour entry being resolved: wait for one answer.
    ClientRun::tcp(&node_port, 1)
        .run_until(&setup.cluster.client, SYNC_TIMEOUT, |report| report.ok == 1)
        .expect("the NodePort answers");
    let (node1_before, client_before) = packets(&setup);
    let connections = 40;
    for (to, ports) in [(&node_port, "10000 29999"), (&lb_ip, "30000 49999")] {
        client_ports(ports);
        let run = ClientRun::tcp(to, connections)
            .run(&setup.cluster.client, None)
            .expect("client");
        run.assert_all_ok(to);
        assert_eq!(run.servers(), ["n2p0"].into(), "{to}");
        assert_eq!(
            run.peers_seen.keys().collect::<Vec<_>>(),
            [&CLIENT_ADDR.to_string()],
            "{to}: the pod sees the client's own address"
        );
    }
    let (node1_after, client_after) = packets(&setup);
    let node1_received = node1_after - node1_before;
    let client_sent = client_after - client_before;
    // Through SNAT node1 would receive every answer too (about as many packets again); the
    // slack is for neighbour resolution.
    assert!(
        node1_received <= client_sent + 10,
        "node1 received {node1_received} packets, the client sent {client_sent}"
    );
    let (node1, node2) = (
        setup.events().expect("node1's events"),
        setup.node2_events().expect("node2's events"),
    );
    assert!(
        node1["dsr_sent"] >= 2 * connections,
        "node1 sent {} options",
        node1["dsr_sent"]
    );
    assert_eq!(node2["dsr_accepted"], node1["dsr_sent"], "{node2:?}");
    assert_eq!(node2["drop_dsr_refused"], 0);
    assert_eq!(node2["drop_dsr_clash"], 0);
}

/// One connection carries requests 1.2 s apart for three times the established timeout: idle
/// past the SYN timeout between requests, alive past the established timeout as a whole; and it
/// goes on across a restart of node2's agent, which rebuilds what options are checked against
/// before its programs take over.
#[test]
fn a_long_lived_connection_outlives_the_timeouts_and_a_restart_of_the_endpoints_agent() {
    let mut setup = dsr_lab();
    let node_port = SocketAddrV4::new(node_addr(1), NODE_PORT).to_string();
    ClientRun::tcp(&node_port, 1)
        .run_until(&setup.cluster.client, SYNC_TIMEOUT, |report| report.ok == 1)
        .expect("the NodePort answers");
    let requests = 8;
    let client = setup.cluster.client.clone();
    let to = node_port.clone();
    let long_lived = std::thread::spawn(move || {
        ClientRun {
            one_flow: true,
            interval_ms: 1200,
            ..ClientRun::tcp(&to, requests)
        }
        .run(&client, None)
    });
    std::thread::sleep(Duration::from_millis(2500));
    setup.kill_node2_agent().expect("kill node2's agent");
    let flags = agent_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    setup
        .start_node2_agent(&flags)
        .expect("node2's agent again");
    let run = long_lived.join().expect("client thread").expect("client");
    run.assert_all_ok("one connection across the timeouts and the restart");
    assert_eq!(run.seen_as.len(), 1, "one flow: {:?}", run.seen_as);
    let fresh = ClientRun::tcp(&node_port, 10)
        .run(&setup.cluster.client, None)
        .expect("client");
    fresh.assert_all_ok("new connections after the restart");
}

/// The client connects through the NodePort from a port it picked, closes, and connects from
/// that port straight to the pod (routing node2's pods through node2). node2's entry of the
/// closed DSR flow waits out its closing timeout; the pod's answers to the second connection
/// must leave as the pod sends them, or the connection is not made.
#[test]
fn a_connection_straight_to_the_pod_from_a_closed_dsr_flows_port_is_made() {
    let setup = dsr_lab();
    let client = &setup.cluster.client;
    client
        .route(&["10.244.2.0/24", "via", &node_addr(2).to_string()])
        .expect("route to node2's pods");
    let from_port = 41_080;
    for to in [
        SocketAddrV4::new(node_addr(1), NODE_PORT),
        SocketAddrV4::new(pod_addr(2, 0), POD_PORT),
    ] {
        let reply = lab::peer::request_from_port(client, from_port, to, Duration::from_secs(3))
            .unwrap_or_else(|error| panic!("to {to}: {error:#}"));
        let (server, _, seen_as) = lab::peer::parse_reply(&reply).expect("a reply line");
        assert_eq!(
            (server, seen_as),
            ("n2p0", format!("{CLIENT_ADDR}:{from_port}").as_str()),
            "to {to}"
        );
    }
    let node2 = setup.node2_events().expect("node2's events");
    assert_eq!(
        (node2["dsr_accepted"], node2["ct_flow_superseded"]),
        (1, 1),
        "{node2:?}"
    );
}

/// A SYN sent to the pod itself with an option that names no frontend of its Service (from a
/// host that is no node) is dropped by node2 and counted; one naming the Service's NodePort on
/// an address that is no node's is too.
#[test]
fn options_naming_no_frontend_of_the_pods_service_are_refused() {
    let mut setup = dsr_lab();
    let attacker_addr = Ipv4Addr::new(203, 0, 113, 66);
    let attacker = setup
        .add_client("attacker", attacker_addr)
        .expect("a host on the fabric");
    attacker
        .route(&["10.244.2.0/24", "via", &node_addr(2).to_string()])
        .expect("route to node2's pods");
    let pod = SocketAddrV4::new(pod_addr(2, 0), POD_PORT);
    let named = [
        // Another port on node1: no NodePort of the pod's Service.
        SocketAddrV4::new(node_addr(1), 22),
        // The Service's NodePort on an address that is no node's.
        SocketAddrV4::new(attacker_addr, NODE_PORT),
    ];
    for frontend in named {
        let result = {
            let _inside = attacker.enter().expect("enter");
            connect_with_option(pod, frontend)
        };
        assert!(
            result.is_err(),
            "a SYN naming {frontend} got through: {result:?}"
        );
    }
    let events = setup.node2_events().expect("node2's events");
    assert!(events["drop_dsr_refused"] >= 2, "{events:?}");
    assert_eq!(events["dsr_accepted"], 0, "{events:?}");
}

/// A TCP connect to `to` whose SYN carries the DSR option naming `frontend` (the option's bytes
/// written here), set on the socket with IP_OPTIONS (an unknown option needs CAP_NET_RAW:
/// net/ipv4/ip_options.c, `ip_options_compile`). Gives up after 1.5 s (SO_SNDTIMEO bounds a
/// blocking connect on Linux).
fn connect_with_option(to: SocketAddrV4, frontend: SocketAddrV4) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let [port_high, port_low] = frontend.port().to_be_bytes();
    let [a, b, c, d] = frontend.ip().octets();
    let option = [0x9e_u8, 8, port_high, port_low, a, b, c, d];
    let check = |result: libc::c_int| {
        if result < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(result)
        }
    };
    // SAFETY: plain syscalls on a socket this function owns, with buffers of the lengths given.
    unsafe {
        let socket = OwnedFd::from_raw_fd(check(libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        ))?);
        let fd = socket.as_raw_fd();
        check(libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_OPTIONS,
            option.as_ptr().cast(),
            option.len() as libc::socklen_t,
        ))?;
        let timeout = libc::timeval {
            tv_sec: 1,
            tv_usec: 500_000,
        };
        check(libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        ))?;
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: to.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*to.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        check(libc::connect(
            fd,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ))?;
    }
    Ok(())
}

/// A client behind a NAT that reuses one port for many destinations, whose load balancer
/// spreads it over the nodes: two connections from one address and port at once, one through
/// node2's own NodePort of `api` (its endpoint local there), then one through node1's NodePort
/// of `web`, whose endpoint is on node2 too, by DSR. node2 finds the client's key held by the
/// first and keeps the second by its answers' tuple; both carry requests, each answered by its
/// own pod from its own NodePort.
#[test]
fn a_dsr_connection_from_a_client_port_a_local_flow_holds_on_its_endpoints_node_is_made() {
    let setup = dsr_lab_with(2, &api_service());
    let client = &setup.cluster.client;
    let api = SocketAddrV4::new(node_addr(2), API_NODE_PORT);
    let web = SocketAddrV4::new(node_addr(1), NODE_PORT);
    for to in [api, web] {
        ClientRun::tcp(&to.to_string(), 1)
            .run_until(client, SYNC_TIMEOUT, |report| report.ok == 1)
            .unwrap_or_else(|error| panic!("{to} answers: {error:#}"));
    }
    let from_port = 41_090;
    let timeout = Duration::from_secs(3);
    let connect = |to| {
        lab::peer::connect_from_port(client, from_port, to, timeout)
            .unwrap_or_else(|error| panic!("to {to}: {error:#}"))
    };
    let served_by = |stream: &mut std::net::TcpStream, to| {
        let reply = lab::peer::request_on(stream)
            .unwrap_or_else(|error| panic!("a request to {to}: {error:#}"));
        let (server, _, seen_as) = lab::peer::parse_reply(&reply).expect("a reply line");
        assert_eq!(seen_as, format!("{CLIENT_ADDR}:{from_port}"), "to {to}");
        server.to_owned()
    };
    let mut to_api = connect(api);
    assert_eq!(served_by(&mut to_api, api), "n2p1");
    let mut to_web = connect(web);
    for round in 0..3 {
        assert_eq!(served_by(&mut to_web, web), "n2p0", "round {round}");
        assert_eq!(served_by(&mut to_api, api), "n2p1", "round {round}");
    }
    let node2 = setup.node2_events().expect("node2's events");
    assert_eq!(
        (node2["dsr_kept_by_answers"], node2["drop_dsr_clash"]),
        (1, 0),
        "{node2:?}"
    );
}

/// node2 not marked as taking DSR options (its agent's mark not written yet, or stale since it
/// rebooted): node1 sends the NodePort's connections to node2's pod by SNAT, and they are made;
/// once node2 is marked, by DSR.
#[test]
fn connections_to_a_node_not_marked_for_dsr_go_by_snat_until_it_is() {
    let setup = lab_of(1, &cluster_objects(false));
    let client = &setup.cluster.client;
    let node_port = SocketAddrV4::new(node_addr(1), NODE_PORT).to_string();
    ClientRun::tcp(&node_port, 1)
        .run_until(client, SYNC_TIMEOUT, |report| report.ok == 1)
        .expect("the NodePort answers");
    let connections = 20;
    let run = ClientRun::tcp(&node_port, connections)
        .run(client, None)
        .expect("client");
    run.assert_all_ok("by SNAT");
    assert_eq!(
        run.peers_seen.keys().collect::<Vec<_>>(),
        [&node_addr(1).to_string()],
        "the pod sees node1's address"
    );
    let node1 = setup.events().expect("node1's events");
    assert_eq!(node1["dsr_sent"], 0, "{node1:?}");
    assert!(node1["dsr_node_unmarked"] > connections, "{node1:?}");

    write_manifests(&setup, &cluster_objects(true));
    ClientRun::tcp(&node_port, 1)
        .run_until(client, SYNC_TIMEOUT, |report| {
            report.ok == 1 && report.peers_seen.contains_key(&CLIENT_ADDR.to_string())
        })
        .expect("by DSR once node2 is marked");
    let run = ClientRun::tcp(&node_port, connections)
        .run(client, None)
        .expect("client");
    run.assert_all_ok("by DSR");
    assert_eq!(
        run.peers_seen.keys().collect::<Vec<_>>(),
        [&CLIENT_ADDR.to_string()],
        "the pod sees the client's address"
    );
}
