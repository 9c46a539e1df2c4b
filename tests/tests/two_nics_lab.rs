//! A node with two NICs (`lab::two_nics`): clients come in on one (`eth0`), the other nodes sit
//! behind the other (`eth1`). NodePort traffic to an endpoint on another node leaves through
//! `eth1` and its answers come back through `eth1`: they must go out of `eth0` to the client,
//! with `eth0`'s addresses, not back out of the NIC they came in on. Real TCP and UDP servers and
//! clients, and the same flows through BPF_PROG_TEST_RUN with the NIC each frame arrives on.

use std::net::SocketAddrV4;

use lab::{
    lab::Host,
    peer::ClientRun,
    two_nics::{
        CLIENT, NODE_PORT, NODE1_CLIENT_SIDE, NODE1_NODE_SIDE, NODE2, POD, POD_PORT, TwoNics,
    },
};
use lb_common::program_names;
use lb_userspace::datapath::testrun::test_run_on;

#[test]
fn node_port_answers_from_another_node_leave_through_the_clients_nic() {
    let lab = TwoNics::build().expect("lab");
    let target = format!("{NODE1_CLIENT_SIDE}:{NODE_PORT}");
    for (what, run) in [
        ("tcp", ClientRun::tcp(&target, 50)),
        ("udp", ClientRun::udp(&target, 50)),
    ] {
        let report = run.run(&lab.client, None).expect("client");
        report.assert_all_ok(what);
        // The endpoint saw the node's address (SNAT), the client the NodePort it asked for.
        assert_eq!(
            report.peers_seen.keys().collect::<Vec<_>>(),
            [&NODE1_NODE_SIDE.to_string()],
            "{what}"
        );
        assert_eq!(
            report.peer_names.keys().collect::<Vec<_>>(),
            [&target],
            "{what}"
        );
    }
    let events = lab.datapath.events().expect("events");
    assert!(events.values().all(|&count| count == 0), "{events:?}");
    // XDP sent both directions on itself, from one NIC out of the other (the client's first
    // packet waits for the stack to resolve node2's MAC): 50 TCP connections and 50 datagrams
    // are at least 200 packets from the client and 150 answers.
    let stat = |iface: &str, name: &str| lab.node1.nic_stat(iface, name).expect("ethtool -S");
    assert!(
        stat("eth0", "rx_queue_0_xdp_redirect") >= 190,
        "client side"
    );
    assert!(stat("eth1", "rx_queue_0_xdp_redirect") >= 140, "node side");
    for iface in ["eth0", "eth1"] {
        assert_eq!(stat(iface, "tx_queue_0_xdp_xmit_errors"), 0, "{iface}");
        assert_eq!(stat(iface, "rx_queue_0_xdp_tx_errors"), 0, "{iface}");
    }
}

const XDP_REDIRECT: u32 = 4;

/// A TCP frame built independently of the datapath (checksums computed whole by etherparse).
fn tcp_frame(
    macs: ([u8; 6], [u8; 6]),
    from: SocketAddrV4,
    to: SocketAddrV4,
    ttl: u8,
    syn_ack: bool,
) -> Vec<u8> {
    let mut builder = etherparse::PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(from.ip().octets(), to.ip().octets(), ttl)
        .tcp(from.port(), to.port(), 1000, 64240)
        .syn();
    if syn_ack {
        builder = builder.ack(1);
    }
    let mut frame = Vec::new();
    builder.write(&mut frame, &[]).expect("frame");
    frame
}

fn mac(host: &Host, iface: &str) -> [u8; 6] {
    host.mac(iface).expect("MAC")
}

/// Through BPF_PROG_TEST_RUN with the NIC each frame arrives on: a client's SYN on eth0 leaves
/// for node2 through eth1 (XDP_REDIRECT, SNATed, node2's MAC, TTL - 1), and the pod's SYN-ACK
/// arriving on eth1 leaves for the client through eth0 with the MACs the SYN came with.
#[test]
fn both_directions_of_a_node_port_flow_are_redirected_to_the_other_nic() {
    let lab = TwoNics::build().expect("lab");
    let (client_mac, node1_eth0) = (mac(&lab.client, "eth0"), mac(&lab.node1, "eth0"));
    let (node1_eth1, node2_eth1) = (mac(&lab.node1, "eth1"), mac(&lab.node2, "eth1"));
    // XDP sends a frame itself only to a next hop whose MAC the node knows.
    lab.node1
        .ip(&[
            "neigh",
            "replace",
            &NODE2.to_string(),
            "lladdr",
            &node2_eth1.map(|b| format!("{b:02x}")).join(":"),
            "dev",
            "eth1",
            "nud",
            "permanent",
        ])
        .expect("neighbour");
    let program = lab
        .datapath
        .program_fd(program_names::XDP_LB)
        .expect("program");
    let _inside = lab.node1.enter().expect("node1");
    let ifindex = |iface: &str| lab.node1.ifindex(iface).expect("ifindex");

    let client = SocketAddrV4::new(CLIENT, 45_678);
    let frontend = SocketAddrV4::new(NODE1_CLIENT_SIDE, NODE_PORT);
    let syn = tcp_frame((client_mac, node1_eth0), client, frontend, 64, false);
    let run = test_run_on(program, &syn, ifindex("eth0")).expect("syn");
    assert_eq!(
        run.verdict, XDP_REDIRECT,
        "the SYN goes out of eth1 from XDP"
    );
    let snat_port = u16::from_be_bytes([run.packet[34], run.packet[35]]);
    let pod = SocketAddrV4::new(POD, POD_PORT);
    let snat = SocketAddrV4::new(NODE1_NODE_SIDE, snat_port);
    assert_eq!(
        run.packet,
        tcp_frame((node1_eth1, node2_eth1), snat, pod, 63, false),
        "SNATed to port {snat_port}, for node2's MAC, TTL 63"
    );

    let syn_ack = tcp_frame((node2_eth1, node1_eth1), pod, snat, 63, true);
    let run = test_run_on(program, &syn_ack, ifindex("eth1")).expect("syn-ack");
    assert_eq!(
        run.verdict, XDP_REDIRECT,
        "the SYN-ACK goes out of eth0 from XDP"
    );
    assert_eq!(
        run.packet,
        tcp_frame((node1_eth0, client_mac), frontend, client, 62, true),
        "from the NodePort to the client, with the MACs the SYN came with, TTL 62"
    );
}
