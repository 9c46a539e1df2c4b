//! The service datapath with real TCP and UDP servers and clients in the lab: ClusterIP through
//! the socket hooks (from a pod and from the node itself), NodePort, externalIP and LoadBalancer
//! IP through XDP and tc, spread over endpoints, endpoint changes under traffic, and a SYN the
//! client sends again reaching the endpoint its first one went to.

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use lab::{
    lab::{Lab, Proc, ScratchDir},
    nft::SynDrop,
    node::NodeDatapath,
    peer::ClientRun,
    topology::{CLIENT_ADDR, Cluster, ClusterSpec, node_addr},
};
use lb_common::{backend_flags, proto, service_flags};
use lb_userspace::compile::model::{Backend, Frontend, Service};

const POD_PORT: u16 = 8080;
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE_PORT: u16 = 30080;
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const SERVICE_PORT: u16 = 80;

struct Setup {
    // Drop order: servers, then the datapath, then the lab.
    _servers: Vec<Proc>,
    node: NodeDatapath,
    cluster: Cluster,
    _lab: Lab,
}

/// A cluster with a server in every pod, the datapath on node1, and the client routed to the
/// external and LoadBalancer IPs through node1.
fn setup(spec: &ClusterSpec) -> Setup {
    let mut lab = Lab::new().expect("lab");
    let cluster = Cluster::build(&mut lab, spec).expect("cluster");
    let servers = lab::agent::serve_in_every_pod(&cluster).expect("servers");
    cluster
        .client
        .route(&["198.51.100.0/24", "via", &node_addr(1).to_string()])
        .expect("route");
    let node = NodeDatapath::attach(&lab, &cluster.node(1).host).expect("datapath");
    Setup {
        _servers: servers,
        node,
        cluster,
        _lab: lab,
    }
}

/// Puts one backend per pod (ids from 1 in pod order) for `protocol`, returning (id, pod name).
fn backends(setup: &mut Setup, protocol: u8, first_id: u32) -> Vec<(u32, String)> {
    let pods: Vec<_> = setup
        .cluster
        .pods()
        .map(|pod| (pod.addr, pod.node, pod.host.name().to_owned()))
        .collect();
    pods.into_iter()
        .enumerate()
        .map(|(index, (addr, node, name))| {
            let id = first_id + index as u32;
            let flags = if node == 1 { backend_flags::LOCAL } else { 0 };
            let backend = Backend {
                addr: addr.into(),
                port: POD_PORT,
                proto: protocol,
                flags,
            };
            setup
                .node
                .datapath
                .put_backend(id, &backend)
                .expect("backend");
            (id, name)
        })
        .collect()
}

/// Every frontend kind for one protocol: ClusterIP, NodePort on node1, an externalIP and a
/// LoadBalancer IP.
fn frontends(protocol: u8) -> Vec<Frontend> {
    vec![
        Frontend {
            addr: CLUSTER_IP.into(),
            port: SERVICE_PORT,
            proto: protocol,
            kind: service_flags::CLUSTER_IP,
        },
        Frontend {
            addr: node_addr(1).into(),
            port: NODE_PORT,
            proto: protocol,
            kind: service_flags::NODE_PORT,
        },
        Frontend {
            addr: EXTERNAL_IP.into(),
            port: SERVICE_PORT,
            proto: protocol,
            kind: service_flags::EXTERNAL_IP,
        },
        Frontend {
            addr: LB_IP.into(),
            port: SERVICE_PORT,
            proto: protocol,
            kind: service_flags::LOAD_BALANCER,
        },
    ]
}

/// Service 1 (TCP) and service 2 (UDP) on every frontend kind, each with the backends of the pods
/// at these positions (pod order of the cluster).
fn put_tcp_and_udp_services(setup: &mut Setup, pods: [usize; 2]) {
    let tcp = backends(setup, proto::TCP, 1);
    let udp = backends(setup, proto::UDP, 11);
    for (id, protocol, ids) in [(1, proto::TCP, &tcp), (2, proto::UDP, &udp)] {
        let service = Service {
            id,
            frontends: frontends(protocol),
            backends: pods.iter().map(|&pod| ids[pod].0).collect(),
            ..Default::default()
        };
        setup.node.datapath.put_service(&service).expect("service");
    }
}

#[test]
fn cluster_ip_from_a_pod_and_from_the_node_goes_straight_to_endpoints() {
    let mut setup = setup(&ClusterSpec::default());
    // Endpoints: n1p1 (same node as the client pod) and n2p0 (the other node).
    put_tcp_and_udp_services(&mut setup, [1, 2]);
    let endpoints: BTreeSet<&str> = ["n1p1", "n2p0"].into();
    let cluster_ip = format!("{CLUSTER_IP}:{SERVICE_PORT}");
    let client_pod = &setup.cluster.node(1).pods[0];
    let node_host = &setup.cluster.node(1).host;
    let cgroup = Some(&setup.node.cgroup);

    let runs = [
        ("tcp", ClientRun::tcp(&cluster_ip, 40)),
        ("udp connected", ClientRun::udp(&cluster_ip, 40)),
        (
            "udp unconnected",
            ClientRun {
                unconnected: true,
                ..ClientRun::udp(&cluster_ip, 40)
            },
        ),
        (
            "udp unconnected, one socket",
            ClientRun {
                unconnected: true,
                one_flow: true,
                ..ClientRun::udp(&cluster_ip, 40)
            },
        ),
    ];
    for (what, run) in &runs {
        let report = run.run(&client_pod.host, cgroup).expect("client in a pod");
        report.assert_all_ok(what);
        assert!(report.servers().is_subset(&endpoints), "{what}: {report:?}");
        // No SNAT: the endpoint saw the pod's own address...
        assert_eq!(
            report.peers_seen.keys().collect::<Vec<_>>(),
            [&client_pod.addr.to_string()],
            "{what}"
        );
        // ...and the application saw the Service as its peer (getpeername / recvfrom).
        assert_eq!(
            report.peer_names.keys().collect::<Vec<_>>(),
            [&cluster_ip],
            "{what}"
        );

        let report = run
            .run(node_host, cgroup)
            .expect("client in the node's own namespace");
        report.assert_all_ok(what);
        assert!(report.servers().is_subset(&endpoints), "{what}: {report:?}");
        let node_addresses: BTreeSet<String> =
            ["10.244.1.1".into(), node_addr(1).to_string()].into();
        let seen: BTreeSet<String> = report.peers_seen.keys().cloned().collect();
        assert!(seen.is_subset(&node_addresses), "{what}: {report:?}");
        assert_eq!(
            report.peer_names.keys().collect::<Vec<_>>(),
            [&cluster_ip],
            "{what}"
        );
    }
    // 40 connections over two endpoints reach both (a miss has probability 2^-39).
    let report = runs[0].1.run(&client_pod.host, cgroup).expect("client");
    assert_eq!(report.servers(), endpoints, "{report:?}");
    // Each connection and each datagram destination counted as a new flow of its service.
    let tcp_flows = setup
        .node
        .datapath
        .service_counter(1)
        .expect("counter")
        .new_flows;
    assert_eq!(tcp_flows, 40 * 3, "tcp new flows");

    // A process outside the cgroup is not redirected: the ClusterIP is just an unrouted address.
    let outside = ClientRun {
        timeout_ms: 300,
        ..ClientRun::tcp(&cluster_ip, 1)
    }
    .run(&client_pod.host, None)
    .expect("client");
    assert_eq!(outside.errors, 1, "{outside:?}");
}

/// A connection of the node's own whose source port is a NodePort: the kernel picks ephemeral
/// ports from `ip_local_port_range`, which may cover the NodePort range (the lab's does). The
/// server's SYN-ACK and every later segment come to the node's address and that port, a
/// frontend with no flow of lb's, and must reach the node's socket, not the Service's endpoints.
#[test]
fn the_nodes_own_connection_from_a_node_port_reaches_the_node() {
    let mut setup = setup(&ClusterSpec::default());
    // The TCP Service's NodePort on node1, endpoints on both nodes.
    put_tcp_and_udp_services(&mut setup, [1, 2]);
    let (report, events) =
        run_from_the_node_to_a_remote_pod(&setup, proto::TCP, NODE_PORT, 1, "its NodePort");
    assert_eq!(
        report.peers_seen.keys().collect::<Vec<_>>(),
        [&node_addr(1).to_string()],
        "the server saw the node itself"
    );
    // The SYN-ACK, the ACK of the request's answer and the FIN at least.
    assert!(events["pass_node_connection"] >= 3, "{events:?}");
}

/// A UDP socket of the node's own, connected from the UDP NodePort's port to a pod on the other
/// node: its answers come to a frontend with no flow of lb's and must reach the node's socket,
/// not the Service's endpoints.
#[test]
fn the_nodes_own_udp_socket_on_a_node_port_gets_its_answers() {
    let mut setup = setup(&ClusterSpec::default());
    put_tcp_and_udp_services(&mut setup, [1, 2]);
    let (_, events) =
        run_from_the_node_to_a_remote_pod(&setup, proto::UDP, NODE_PORT, 2, "its NodePort");
    assert_eq!(events["pass_node_connection"], 5, "{events:?}");
}

/// A LoadBalancer IP that is node1's own address, with source ranges that leave the other
/// node out: node1's connection from that IP's port to a pod on node2 gets its answers, which
/// come from outside the ranges to the frontend, and no flow of the Service's is made.
#[test]
fn the_nodes_own_connection_from_a_load_balancer_ips_port_reaches_the_node_outside_its_ranges() {
    const PORT: u16 = 8443;
    let mut setup = setup(&ClusterSpec::default());
    let tcp = backends(&mut setup, proto::TCP, 1);
    let service = Service {
        id: 3,
        frontends: vec![Frontend {
            addr: node_addr(1).into(),
            port: PORT,
            proto: proto::TCP,
            kind: service_flags::LOAD_BALANCER,
        }],
        backends: vec![tcp[0].0, tcp[1].0],
        flags: service_flags::SOURCE_RANGES,
        source_ranges: [(Ipv4Addr::new(192, 0, 2, 0).into(), 24)].into(),
        ..Default::default()
    };
    setup.node.datapath.put_service(&service).expect("service");
    let (_, events) = run_from_the_node_to_a_remote_pod(
        &setup,
        proto::TCP,
        PORT,
        3,
        "its LoadBalancer IP's port",
    );
    assert!(events["pass_node_connection"] >= 3, "{events:?}");
    assert_eq!(events["drop_source_range"], 0, "{events:?}");
}

/// Five requests from node1's own namespace over one connection (or one UDP socket) from
/// `source_port` to node2's first pod, every one answered by that pod and none making a flow of
/// service `service_id`'s: the client's report and the datapath's events after it.
fn run_from_the_node_to_a_remote_pod(
    setup: &Setup,
    protocol: u8,
    source_port: u16,
    service_id: u32,
    what: &str,
) -> (
    lab::peer::ClientReport,
    std::collections::BTreeMap<&'static str, u64>,
) {
    let remote_pod = &setup.cluster.node(2).pods[0];
    let server = format!("{}:{POD_PORT}", remote_pod.addr);
    let run = ClientRun {
        one_flow: true,
        source_port: Some(source_port),
        ..if protocol == proto::UDP {
            ClientRun::udp(&server, 5)
        } else {
            ClientRun::tcp(&server, 5)
        }
    };
    let report = run
        .run(&setup.cluster.node(1).host, None)
        .expect("client in the node's own namespace");
    report.assert_all_ok(&format!("the node's own from {what}"));
    assert_eq!(
        report.servers(),
        BTreeSet::from([remote_pod.host.name()]),
        "{report:?}"
    );
    let counter = setup
        .node
        .datapath
        .service_counter(service_id)
        .expect("counter");
    assert_eq!(
        counter.new_flows, 0,
        "no flow of the Service's: {counter:?}"
    );
    (report, setup.node.datapath.events().expect("events"))
}

/// Every request of the client run to `target` answered by one of `endpoints`, which saw the
/// client's own address (no SNAT for local endpoints), and every reply came back from `target`
/// (the reverse NAT).
fn assert_reached_local_endpoints(
    report: &lab::peer::ClientReport,
    what: &str,
    target: &str,
    endpoints: &BTreeSet<&str>,
) {
    report.assert_all_ok(what);
    assert!(report.servers().is_subset(endpoints), "{what}: {report:?}");
    assert_eq!(
        report.peers_seen.keys().collect::<Vec<_>>(),
        [&CLIENT_ADDR.to_string()],
        "{what}"
    );
    assert_eq!(
        report.peer_names.keys().collect::<Vec<_>>(),
        [target],
        "{what}"
    );
}

#[test]
fn node_port_external_ip_and_load_balancer_ip_from_outside() {
    let mut setup = setup(&ClusterSpec::default());
    // Endpoints n1p0 and n1p1, both on the node whose XDP serves the traffic.
    put_tcp_and_udp_services(&mut setup, [0, 1]);
    let endpoints: BTreeSet<&str> = ["n1p0", "n1p1"].into();
    let targets = [
        format!("{}:{NODE_PORT}", node_addr(1)),
        format!("{EXTERNAL_IP}:{SERVICE_PORT}"),
        format!("{LB_IP}:{SERVICE_PORT}"),
    ];
    for target in &targets {
        for (what, run) in [
            ("tcp", ClientRun::tcp(target, 30)),
            ("udp", ClientRun::udp(target, 30)),
            (
                "udp unconnected",
                ClientRun {
                    unconnected: true,
                    ..ClientRun::udp(target, 30)
                },
            ),
        ] {
            let report = run.run(&setup.cluster.client, None).expect("client");
            assert_reached_local_endpoints(
                &report,
                &format!("{what} to {target}"),
                target,
                &endpoints,
            );
        }
    }
    let counter = setup.node.datapath.service_counter(1).expect("counter");
    assert_eq!(counter.new_flows, 90, "{counter:?}");
    assert!(counter.packets >= 90 * 4, "{counter:?}");
    assert_nothing_dropped_or_passed(&setup);
}

/// A client's UDP port to two frontends of one endpoint: the second flow is kept as a pair,
/// its source port remapped. With the pair filter rebuilt from conntrack (the agent's keeper)
/// and the first flow's FLOW entry evicted, the pair's datagrams still find their flow: the
/// pod keeps seeing the remapped port, and no flow starts again.
#[test]
fn a_udp_flow_kept_as_a_pair_outlives_its_owners_entry_through_the_pair_filter() {
    let mut setup = setup(&ClusterSpec::default());
    put_tcp_and_udp_services(&mut setup, [0, 0]);
    const SOURCE_PORT: u16 = 40123;
    let node_port = format!("{}:{NODE_PORT}", node_addr(1));
    let external = format!("{EXTERNAL_IP}:{SERVICE_PORT}");
    let client = |target: &str, what: &str| {
        let run = ClientRun {
            one_flow: true,
            source_port: Some(SOURCE_PORT),
            ..ClientRun::udp(target, 3)
        };
        let report = run.run(&setup.cluster.client, None).expect("client");
        report.assert_all_ok(what);
        assert_eq!(
            report.peer_names.keys().collect::<Vec<_>>(),
            [target],
            "{what}: answers from the frontend it sent to"
        );
        let seen_as: Vec<&String> = report.seen_as.keys().collect();
        assert_eq!(seen_as.len(), 1, "{what}: {report:?}");
        seen_as[0].clone()
    };
    let owner = client(&node_port, "the owner, to the NodePort");
    assert_eq!(owner, format!("{CLIENT_ADDR}:{SOURCE_PORT}"));
    let pair = client(&external, "the pair, to the externalIP");
    assert_ne!(pair, owner, "remapped");

    let rebuilt = setup
        .node
        .datapath
        .rebuild_pair_filter()
        .expect("pair filter");
    assert_eq!(rebuilt.pairs, 1, "{rebuilt:?}");
    let mut conntrack: aya::maps::HashMap<_, lb_common::Ct4Key, lb_common::Ct4Value> =
        lab::table::pinned_conntrack(setup.node.pin_dir(), lb_common::map_names::CONNTRACK4);
    let owner_key = lb_common::flow_key(u32::from(CLIENT_ADDR), SOURCE_PORT, proto::UDP);
    conntrack
        .remove(&owner_key)
        .expect("evict the owner's entry");

    assert_eq!(client(&external, "the pair, its owner gone"), pair);
    assert!(
        conntrack.get(&owner_key, 0).is_err(),
        "no flow started again"
    );
    let counter = setup.node.datapath.service_counter(2).expect("counter");
    assert_eq!(counter.new_flows, 2, "{counter:?}");
    assert_eq!(
        setup.node.datapath.events().expect("events")["nat_port_remap"],
        1
    );
    assert_nothing_dropped_or_passed(&setup);
}

/// No drop, reject or untouched pass. A client port the kernel reused for another of the three
/// frontends while the earlier flow (UDP: 60 s) still held the reply tuple is remapped
/// (`nat_port_remap`), which the replies show to be invisible to the client.
fn assert_nothing_dropped_or_passed(setup: &Setup) {
    let events = setup.node.datapath.events().expect("events");
    assert!(
        events
            .iter()
            .filter(|(event, _)| *event != &"nat_port_remap")
            .all(|(_, &count)| count == 0),
        "{events:?}"
    );
}

/// SCTP from outside to NodePort, externalIP and LoadBalancer IP: XDP translates the
/// associations, tc their answers, the CRC32c right both ways (the endpoint's and the client's
/// kernels check it). Kernels without SCTP cannot open the sockets: the build script finds that
/// out and the test is ignored there with the reason (the datapath's SCTP is then tested by
/// datapath_sctp.rs alone).
#[test]
#[cfg_attr(
    kernel_without_sctp,
    ignore = "this kernel has no SCTP (CONFIG_IP_SCTP is not set)"
)]
fn sctp_associations_from_outside_reach_the_endpoints() {
    let mut setup = setup(&ClusterSpec::default());
    let sctp_servers: Vec<Proc> = setup
        .cluster
        .pods()
        .map(|pod| lab::peer::serve_sctp(&pod.host, pod.host.name(), POD_PORT))
        .collect::<anyhow::Result<_>>()
        .expect("SCTP servers");
    let ids = backends(&mut setup, proto::SCTP, 21);
    let service = Service {
        id: 3,
        frontends: frontends(proto::SCTP),
        backends: vec![ids[0].0, ids[1].0],
        ..Default::default()
    };
    setup.node.datapath.put_service(&service).expect("service");
    let endpoints: BTreeSet<&str> = ["n1p0", "n1p1"].into();
    for target in [
        format!("{}:{NODE_PORT}", node_addr(1)),
        format!("{EXTERNAL_IP}:{SERVICE_PORT}"),
        format!("{LB_IP}:{SERVICE_PORT}"),
    ] {
        let report = ClientRun::sctp(&target, 20)
            .run(&setup.cluster.client, None)
            .expect("client");
        assert_reached_local_endpoints(&report, &target, &target, &endpoints);
    }
    assert_nothing_dropped_or_passed(&setup);
    drop(sctp_servers);
}

#[test]
fn a_thousand_connections_spread_evenly_over_three_endpoints() {
    let mut setup = setup(&ClusterSpec {
        pods_per_node: vec![3, 0],
        ..ClusterSpec::default()
    });
    let tcp = backends(&mut setup, proto::TCP, 1);
    let ids = tcp.iter().map(|(id, _)| *id).collect();
    let service = Service {
        id: 1,
        frontends: frontends(proto::TCP),
        backends: ids,
        affinity_timeout_s: 0,
        ..Default::default()
    };
    setup.node.datapath.put_service(&service).expect("service");
    let target = format!("{}:{NODE_PORT}", node_addr(1));
    let report = ClientRun::tcp(&target, 1000)
        .run(&setup.cluster.client, None)
        .expect("client");
    report.assert_all_ok("1000 connections");
    assert_eq!(report.by_server.len(), 3, "{report:?}");
    // Uniform: 333 each, standard deviation ~15; +-85 is beyond 5.5 sigma.
    for (server, count) in &report.by_server {
        assert!(
            (248..=418).contains(count),
            "{server} got {count} of 1000: {report:?}"
        );
    }
}

#[test]
fn endpoint_changes_under_traffic_move_new_tcp_connections_and_udp_flows_only() {
    let mut setup = setup(&ClusterSpec {
        pods_per_node: vec![2, 0],
        ..ClusterSpec::default()
    });
    let tcp = backends(&mut setup, proto::TCP, 1);
    let udp = backends(&mut setup, proto::UDP, 11);
    let (tcp_a, tcp_b) = (tcp[0].0, tcp[1].0);
    let (udp_a, udp_b) = (udp[0].0, udp[1].0);
    let put = |setup: &mut Setup, id, protocol, backends: Vec<u32>| {
        let service = Service {
            id,
            frontends: frontends(protocol),
            backends,
            affinity_timeout_s: 0,
            ..Default::default()
        };
        setup.node.datapath.put_service(&service).expect("service");
    };
    put(&mut setup, 1, proto::TCP, vec![tcp_a]);
    put(&mut setup, 2, proto::UDP, vec![udp_a]);
    let target = format!("{}:{NODE_PORT}", node_addr(1));

    // One long TCP connection and one UDP flow, 60 requests each over ~1.2 s...
    let client = setup.cluster.client.clone();
    let (tcp_target, udp_target) = (target.clone(), target.clone());
    let scratch = ScratchDir::new(&setup._lab, "endpoint-change").expect("scratch");
    let (tcp_ready, udp_ready) = (
        scratch.path().join("tcp.ready"),
        scratch.path().join("udp.ready"),
    );
    let long_tcp = std::thread::spawn({
        let (client, ready) = (client.clone(), tcp_ready.clone());
        move || {
            ClientRun {
                one_flow: true,
                interval_ms: 20,
                ready_file: Some(&ready),
                ..ClientRun::tcp(&tcp_target, 60)
            }
            .run(&client, None)
        }
    });
    let udp_flow = std::thread::spawn({
        let ready = udp_ready.clone();
        move || {
            ClientRun {
                one_flow: true,
                interval_ms: 20,
                ready_file: Some(&ready),
                ..ClientRun::udp(&udp_target, 60)
            }
            .run(&client, None)
        }
    });
    // ...while endpoint A is replaced by B (once both flows are under way): B added, A out of
    // the tables, A's backend removed.
    for ready in [&tcp_ready, &udp_ready] {
        lab::peer::wait_until_answered(ready, Duration::from_secs(10)).expect("flows under way");
    }
    put(&mut setup, 1, proto::TCP, vec![tcp_b]);
    put(&mut setup, 2, proto::UDP, vec![udp_b]);
    setup.node.datapath.remove_backend(tcp_a).expect("remove");
    setup.node.datapath.remove_backend(udp_a).expect("remove");

    let long_tcp = long_tcp.join().expect("thread").expect("tcp client");
    let udp_flow = udp_flow.join().expect("thread").expect("udp client");
    // The established TCP connection stayed on A from start to end, without an error.
    long_tcp.assert_all_ok("long tcp connection");
    assert_eq!(long_tcp.servers(), ["n1p0"].into(), "{long_tcp:?}");
    // The UDP flow moved to B at its next packet, without losing a request.
    udp_flow.assert_all_ok("udp flow");
    assert_eq!(udp_flow.servers(), ["n1p0", "n1p1"].into(), "{udp_flow:?}");
    assert_eq!(
        udp_flow.last_server.as_deref(),
        Some("n1p1"),
        "{udp_flow:?}"
    );
    // New connections go to B only.
    let fresh = ClientRun::tcp(&target, 20)
        .run(&setup.cluster.client, None)
        .expect("client");
    fresh.assert_all_ok("new connections");
    assert_eq!(fresh.servers(), ["n1p1"].into(), "{fresh:?}");
}

/// A SYN the client has to send again (its first one lost on the way to the endpoint) goes where
/// its first went, although a new connection would now go elsewhere: the first SYN claimed the
/// client's key in node1's XDP without looking it up, the retransmit finds that key held and is
/// looked up (`lb_xdp_lookup`) and follows its flow, to a local endpoint, and to a remote one
/// through the same SNAT port. The endpoint drops incoming SYNs until it has dropped the first;
/// then the service's endpoints are replaced, and only the client's retransmit (about 1 s
/// later, its initial retransmission timeout) can reach an endpoint.
#[test]
fn a_retransmitted_syn_reaches_the_endpoint_its_first_syn_went_to() {
    let mut setup = setup(&ClusterSpec::default());
    // The remote endpoint's flows are SNATed to node1's address, as the agent configures it
    // (with accept_local on the NIC: the stack forwards what XDP does not send itself).
    setup
        .cluster
        .node(1)
        .host
        .sysctl(
            &format!("net.ipv4.conf.{}.accept_local", lab::topology::FABRIC_IFACE),
            "1",
        )
        .expect("accept_local");
    setup
        .node
        .datapath
        .set_config(&lb_common::DatapathConfig {
            snat_addr: u32::from(node_addr(1)),
            snat_port_min: lb_common::DEFAULT_SNAT_PORTS.0,
            snat_port_max: lb_common::DEFAULT_SNAT_PORTS.1,
            ..Default::default()
        })
        .expect("config");
    let tcp = backends(&mut setup, proto::TCP, 1);
    let target = format!("{}:{NODE_PORT}", node_addr(1));
    let put = |setup: &mut Setup, backends: Vec<u32>| {
        let service = Service {
            id: 1,
            frontends: frontends(proto::TCP),
            backends,
            ..Default::default()
        };
        setup.node.datapath.put_service(&service).expect("service");
    };
    // n1p0 (on node1), then n2p0 (behind SNAT); the other two endpoints replace it.
    for (first, others) in [(0, [1, 2]), (2, [0, 1])] {
        let (first_id, first_name) = tcp[first].clone();
        put(&mut setup, vec![first_id]);
        let flows_before = new_flows(&setup);
        let endpoint = setup.cluster.pod(&first_name).host.clone();
        let syn_drop = SynDrop::new(&endpoint, POD_PORT);
        let client_host = setup.cluster.client.clone();
        let report = std::thread::scope(|scope| {
            let client = scope.spawn(|| {
                ClientRun {
                    timeout_ms: 5000,
                    ..ClientRun::tcp(&target, 1)
                }
                .run(&client_host, None)
            });
            syn_drop.wait_for_one(Duration::from_secs(5));
            put(&mut setup, others.iter().map(|&pod| tcp[pod].0).collect());
            let dropped = syn_drop.remove();
            assert_eq!(dropped, 1, "{first_name}: the first SYN only");
            client.join().expect("client thread").expect("client")
        });
        report.assert_all_ok(&format!(
            "a connection whose first SYN {first_name} dropped"
        ));
        assert_eq!(report.servers(), [first_name.as_str()].into(), "{report:?}");
        assert_eq!(
            new_flows(&setup) - flows_before,
            1,
            "{first_name}: one flow for both SYNs"
        );
        // The SNAT flow has one port, the one the endpoint saw: a claim the retransmit made and
        // gave up leaves no port behind.
        let snat_ports: Vec<u16> = setup
            .node
            .datapath
            .conntrack()
            .expect("conntrack")
            .iter()
            .filter(|(key, _)| key.direction == lb_common::ct_direction::REPLY)
            .map(|(key, _)| key.dport)
            .collect();
        let seen_as: Vec<&String> = report.seen_as.keys().collect();
        if first_id == tcp[0].0 {
            assert!(snat_ports.is_empty(), "{snat_ports:?}");
        } else {
            assert_eq!(snat_ports.len(), 1, "{snat_ports:?}");
            assert_eq!(seen_as, [&format!("{}:{}", node_addr(1), snat_ports[0])]);
        }
    }
    assert_nothing_dropped_or_passed(&setup);
}

fn new_flows(setup: &Setup) -> u64 {
    setup
        .node
        .datapath
        .service_counter(1)
        .expect("counter")
        .new_flows
}
