//! A node with two NICs (`lab::two_nics`): clients come in on one (`eth0`), the other nodes sit
//! behind the other (`eth1`). NodePort traffic to an endpoint on another node leaves through
//! `eth1` and its answers come back through `eth1`: they must go out of `eth0` to the client,
//! with `eth0`'s addresses, not back out of the NIC they came in on. Real TCP and UDP servers and
//! clients, and the same flows through BPF_PROG_TEST_RUN with the NIC each frame arrives on.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use lab::{
    lab::Host,
    peer::ClientRun,
    two_nics::{
        CLIENT, CLIENT6, NODE_PORT, NODE1_CLIENT_SIDE, NODE1_CLIENT_SIDE6, NODE1_NODE_SIDE,
        NODE1_NODE_SIDE6, NODE2, POD, POD_PORT, POD6, TwoNics,
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

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
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

/// The client's, node1's (eth0, eth1) and node2's MACs, node2's made a permanent neighbour of
/// node1: XDP sends a frame itself only to a next hop whose MAC the node knows.
fn macs_with_node2_known(lab: &TwoNics) -> [[u8; 6]; 4] {
    let node2_eth1 = mac(&lab.node2, "eth1");
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
    [
        mac(&lab.client, "eth0"),
        mac(&lab.node1, "eth0"),
        mac(&lab.node1, "eth1"),
        node2_eth1,
    ]
}

/// Through BPF_PROG_TEST_RUN with the NIC each frame arrives on: a client's SYN on eth0 leaves
/// for node2 through eth1 (XDP_REDIRECT, SNATed, node2's MAC, TTL - 1), and the pod's SYN-ACK
/// arriving on eth1 leaves for the client through eth0 with the MACs the SYN came with.
#[test]
fn both_directions_of_a_node_port_flow_are_redirected_to_the_other_nic() {
    let lab = TwoNics::build().expect("lab");
    let [client_mac, node1_eth0, node1_eth1, node2_eth1] = macs_with_node2_known(&lab);
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

/// The MTU of the link between node1 and node2 in the path-MTU tests: below the client side's
/// 1500, so that a client's full-sized packets fit its own link and not the next one.
const NARROW_MTU: u16 = 1400;

/// Narrows node1's and node2's link to [`NARROW_MTU`].
fn narrow_the_node_link(lab: &TwoNics) {
    for node in [&lab.node1, &lab.node2] {
        node.ip(&["link", "set", "eth1", "mtu", &NARROW_MTU.to_string()])
            .expect("mtu");
    }
}

/// An IPv4 frame from `from` to `to` built independently of the datapath (etherparse computes
/// every checksum whole), with DF set (etherparse's default) unless `may_fragment`.
fn frame4(
    macs: ([u8; 6], [u8; 6]),
    (from, to): (SocketAddrV4, SocketAddrV4),
    udp: bool,
    payload: &[u8],
    may_fragment: bool,
) -> Vec<u8> {
    frame4_with(macs, (from, to), udp, payload, |ip| {
        ip.dont_fragment = !may_fragment
    })
}

/// [`frame4`] with its IPv4 header changed by `change` before the checksums are computed.
fn frame4_with(
    macs: ([u8; 6], [u8; 6]),
    (from, to): (SocketAddrV4, SocketAddrV4),
    udp: bool,
    payload: &[u8],
    change: impl FnOnce(&mut etherparse::Ipv4Header),
) -> Vec<u8> {
    let protocol = if udp {
        etherparse::IpNumber::UDP
    } else {
        etherparse::IpNumber::TCP
    };
    let mut ip = etherparse::Ipv4Header::new(0, 64, protocol, from.ip().octets(), to.ip().octets())
        .expect("header");
    change(&mut ip);
    let builder = etherparse::PacketBuilder::ethernet2(macs.0, macs.1)
        .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()));
    with_transport(builder, (from.port(), to.port()), udp, payload)
}

/// As [`frame4`] for IPv6, hop limit 64.
fn frame6(
    macs: ([u8; 6], [u8; 6]),
    (from, to): (SocketAddrV6, SocketAddrV6),
    udp: bool,
    payload: &[u8],
) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ethernet2(macs.0, macs.1).ipv6(
        from.ip().octets(),
        to.ip().octets(),
        64,
    );
    with_transport(builder, (from.port(), to.port()), udp, payload)
}

/// The frame `builder` starts, with a UDP datagram or a TCP ACK segment (sequence number 1001)
/// carrying `payload`.
fn with_transport(
    builder: etherparse::PacketBuilderStep<etherparse::IpHeaders>,
    (sport, dport): (u16, u16),
    udp: bool,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = Vec::new();
    if udp {
        builder.udp(sport, dport).write(&mut frame, payload)
    } else {
        builder
            .tcp(sport, dport, 1001, 64240)
            .ack(1)
            .write(&mut frame, payload)
    }
    .expect("frame");
    frame
}

/// ICMP "fragmentation needed" (RFC 1191) from `from` to `to` quoting `quoted` (an IPv4
/// header and the 8 bytes after it), as the kernel's own ICMP socket sends it: TTL 64, DF
/// clear, IP id 0.
fn fragmentation_needed(
    macs: ([u8; 6], [u8; 6]),
    (from, to): (Ipv4Addr, Ipv4Addr),
    mtu: u16,
    quoted: &[u8],
) -> Vec<u8> {
    let mut ip = etherparse::Ipv4Header::new(
        0,
        64,
        etherparse::IpNumber::ICMP,
        from.octets(),
        to.octets(),
    )
    .expect("header");
    ip.dont_fragment = false;
    let mut frame = Vec::new();
    etherparse::PacketBuilder::ethernet2(macs.0, macs.1)
        .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
        ))
        .write(&mut frame, quoted)
        .expect("frame");
    frame
}

/// ICMPv6 "packet too big" (RFC 4443) from `from` to `to` quoting `quoted`, hop limit 64.
fn packet_too_big(
    macs: ([u8; 6], [u8; 6]),
    (from, to): (Ipv6Addr, Ipv6Addr),
    mtu: u16,
    quoted: &[u8],
) -> Vec<u8> {
    let mut frame = Vec::new();
    etherparse::PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv6(from.octets(), to.octets(), 64)
        .icmpv6(etherparse::Icmpv6Type::PacketTooBig {
            mtu: u32::from(mtu),
        })
        .write(&mut frame, quoted)
        .expect("frame");
    frame
}

/// A client's packet that must not be fragmented and does not fit the link to node2 is
/// answered by XDP as a router would answer it: ICMP "fragmentation needed" (ICMPv6 "packet
/// too big") with that link's MTU, from the NodePort it was sent to, quoting the packet as the
/// client sent it (its UDP checksum too), back out of the NIC it came in on. Handed on
/// translated, the stack would send that error to node1's own SNAT address, and the client
/// would never learn why its big packets vanish. An IPv4 packet without DF, with IP options or
/// at TTL 1 goes to the stack translated, as before; a small one goes on as ever; a frame from
/// a group MAC gets no answer. Through BPF_PROG_TEST_RUN with the NIC each frame arrives on;
/// expected bytes built independently (etherparse).
#[test]
fn packets_too_big_for_the_node_link_are_answered_as_their_client_sent_them() {
    let lab = TwoNics::dual_stack().expect("lab");
    narrow_the_node_link(&lab);
    let (client_mac, node1_eth0) = (mac(&lab.client, "eth0"), mac(&lab.node1, "eth0"));
    let to_node = (client_mac, node1_eth0);
    let to_client = (node1_eth0, client_mac);
    let program = lab
        .datapath
        .program_fd(program_names::XDP_LB)
        .expect("program");
    let _inside = lab.node1.enter().expect("node1");
    let eth0 = lab.node1.ifindex("eth0").expect("ifindex");
    let run = |frame: &[u8]| test_run_on(program, frame, eth0).expect("run");
    let quote4 = |frame: &[u8]| frame[14..14 + 28].to_vec();
    let quote6 = |frame: &[u8]| frame[14..14 + 48].to_vec();
    let big = vec![b'b'; 1420];

    let frontend = SocketAddrV4::new(NODE1_CLIENT_SIDE, NODE_PORT);
    for (udp, port) in [(false, 40_001), (true, 40_002)] {
        let client = SocketAddrV4::new(CLIENT, port);
        // The flow starts with a small packet, which goes on to node2.
        let small = frame4(to_node, (client, frontend), udp, b"hello", false);
        assert_ne!(
            run(&small).verdict,
            XDP_TX,
            "udp {udp}: a small packet goes on"
        );
        let too_big = frame4(to_node, (client, frontend), udp, &big, false);
        let answer = run(&too_big);
        assert_eq!(answer.verdict, XDP_TX, "udp {udp}");
        assert_eq!(
            answer.packet,
            fragmentation_needed(
                to_client,
                (NODE1_CLIENT_SIDE, CLIENT),
                NARROW_MTU,
                &quote4(&too_big)
            ),
            "udp {udp}: fragmentation needed, from the NodePort, quoting the packet as sent"
        );
    }
    // A datagram without a UDP checksum (0, as IPv4 allows) is quoted with none.
    let client = SocketAddrV4::new(CLIENT, 40_002);
    let mut unchecked = frame4(to_node, (client, frontend), true, &big, false);
    unchecked[40..42].copy_from_slice(&[0, 0]);
    let answer = run(&unchecked);
    assert_eq!(
        answer.packet,
        fragmentation_needed(
            to_client,
            (NODE1_CLIENT_SIDE, CLIENT),
            NARROW_MTU,
            &quote4(&unchecked)
        ),
        "a datagram without a checksum"
    );
    // What goes to the stack translated, as before: without DF (the stack fragments it), with
    // IP options (which the answer's quote would cut), and with its TTL running out (a router
    // checks that first).
    let sent_on = [
        (
            "without DF",
            frame4(to_node, (client, frontend), true, &big, true),
        ),
        (
            "with IP options",
            frame4_with(to_node, (client, frontend), true, &big, |ip| {
                ip.options = [1, 1, 1, 0].into()
            }),
        ),
        (
            "at TTL 1",
            frame4_with(to_node, (client, frontend), true, &big, |ip| {
                ip.time_to_live = 1
            }),
        ),
    ];
    for (what, frame) in sent_on {
        let run = run(&frame);
        assert_eq!(run.verdict, XDP_PASS, "{what}");
        let options = usize::from(frame[14] & 0x0f) * 4 - 20;
        assert_eq!(
            run.packet[26..30],
            NODE1_NODE_SIDE.octets(),
            "{what}: SNATed to node1's node-side address"
        );
        assert_eq!(
            run.packet[30..34],
            POD.octets(),
            "{what}: to the pod ({options} bytes of options)"
        );
    }
    // A sender that may not get an ICMP error (a frame from a group MAC) gets none.
    let from_group_mac = frame4(
        ([0x01, 0, 0x5e, 0, 0, 1], node1_eth0),
        (client, frontend),
        true,
        &big,
        false,
    );
    assert_eq!(run(&from_group_mac).verdict, XDP_DROP, "from a group MAC");

    let frontend6 = SocketAddrV6::new(NODE1_CLIENT_SIDE6, NODE_PORT, 0, 0);
    for (udp, port) in [(false, 40_011), (true, 40_012)] {
        let client = SocketAddrV6::new(CLIENT6, port, 0, 0);
        let small = frame6(to_node, (client, frontend6), udp, b"hello");
        assert_ne!(
            run(&small).verdict,
            XDP_TX,
            "udp {udp}: a small packet goes on"
        );
        let too_big = frame6(to_node, (client, frontend6), udp, &big);
        let answer = run(&too_big);
        assert_eq!(answer.verdict, XDP_TX, "ipv6, udp {udp}");
        assert_eq!(
            answer.packet,
            packet_too_big(
                to_client,
                (NODE1_CLIENT_SIDE6, CLIENT6),
                NARROW_MTU,
                &quote6(&too_big)
            ),
            "ipv6, udp {udp}: packet too big, from the NodePort, quoting the packet as sent"
        );
    }
    let events = lab.datapath.events().expect("events");
    assert_eq!(events["icmp_too_big_sent"], 5, "{events:?}");
    assert_eq!(events["drop_too_big"], 1, "{events:?}");
}

/// For each family: its name, the NodePort on node1's client side, and the `ip route get`
/// arguments for the path MTU a host has learnt towards `path_to` (that family's address).
fn node_port_by_family(
    path_to: Ipv4Addr,
    path_to6: Ipv6Addr,
) -> [(&'static str, String, Vec<String>); 2] {
    let route_get = |family: &[&str], to: String| {
        let mut args: Vec<String> = family.iter().map(|&arg| arg.to_owned()).collect();
        args.extend(["route".to_owned(), "get".to_owned(), to]);
        args
    };
    [
        (
            "ipv4",
            format!("{NODE1_CLIENT_SIDE}:{NODE_PORT}"),
            route_get(&[], path_to.to_string()),
        ),
        (
            "ipv6",
            format!("[{NODE1_CLIENT_SIDE6}]:{NODE_PORT}"),
            route_get(&["-6"], path_to6.to_string()),
        ),
    ]
}

/// Real TCP uploads from the client through the NodePort to the pod on node2, over the link
/// narrowed to [`NARROW_MTU`]: the client's full-sized segments are answered with
/// "fragmentation needed" ("packet too big"), its kernel lowers its path MTU to the NodePort to
/// that link's, and the upload completes. Without the answer every full-sized segment
/// vanished (the stack sent its error to node1's own address) and the upload stalled.
#[test]
fn tcp_uploads_through_a_node_port_learn_the_narrower_mtu_of_the_node_link() {
    let lab = TwoNics::dual_stack().expect("lab");
    narrow_the_node_link(&lab);
    for (family, frontend, route_get) in node_port_by_family(NODE1_CLIENT_SIDE, NODE1_CLIENT_SIDE6)
    {
        let sent = lab
            .client
            .run(
                lab::peer::binary().expect("lab-peer"),
                &["upload", "--to", &frontend, "--bytes", "1048576"],
            )
            .unwrap_or_else(|error| panic!("{family}: upload: {error:#}"));
        assert!(sent.contains("1048576"), "{family}: {sent}");
        let route_get: Vec<&str> = route_get.iter().map(String::as_str).collect();
        let route = lab.client.ip(&route_get).expect("route get");
        assert!(
            route.contains(&format!("mtu {NARROW_MTU}")),
            "{family}: the client's path MTU to the NodePort: {route}"
        );
    }
    let events = lab.datapath.events().expect("events");
    assert!(events["icmp_too_big_sent"] >= 2, "{events:?}");
    assert_eq!(events["drop_too_big"], 0, "{events:?}");
}

/// The MTU of node1's client-side NIC in the tests of answers too big for it: below the 1500
/// of the pod and of the link to node2, while the client keeps 1500 and asks for full-sized
/// segments (as a client behind a wider first hop does).
const NARROW_CLIENT_MTU: u16 = 1300;

/// Narrows node1's client-side NIC to [`NARROW_CLIENT_MTU`].
fn narrow_node1s_client_side(lab: &TwoNics) {
    lab.node1
        .ip(&["link", "set", "eth0", "mtu", &NARROW_CLIENT_MTU.to_string()])
        .expect("mtu");
}

/// The pod's answer to a SNAT port that must not be fragmented and does not fit node1's NIC
/// towards the client is answered by XDP before it is translated: ICMP "fragmentation needed"
/// (ICMPv6 "packet too big") with that NIC's MTU, from node1's SNAT address to the pod, quoting
/// the answer as the pod sent it, back out of the NIC it came in on. Redirected as it was, the
/// kernel dropped it without a word (a redirected frame over its target's MTU), and the pod
/// never learnt why. A small answer is redirected as ever; a big one that may be fragmented
/// goes to the stack translated, which fragments it. Through BPF_PROG_TEST_RUN with the NIC
/// each frame arrives on; expected bytes built independently (etherparse).
#[test]
fn answers_too_big_for_the_clients_nic_are_answered_to_the_endpoint_as_it_sent_them() {
    let lab = TwoNics::dual_stack().expect("lab");
    narrow_node1s_client_side(&lab);
    let (client_mac, node1_eth0) = (mac(&lab.client, "eth0"), mac(&lab.node1, "eth0"));
    let (node1_eth1, node2_eth1) = (mac(&lab.node1, "eth1"), mac(&lab.node2, "eth1"));
    let to_node = (client_mac, node1_eth0);
    let from_node2 = (node2_eth1, node1_eth1);
    let to_node2 = (node1_eth1, node2_eth1);
    let program = lab
        .datapath
        .program_fd(program_names::XDP_LB)
        .expect("program");
    let _inside = lab.node1.enter().expect("node1");
    let ifindex = |iface: &str| lab.node1.ifindex(iface).expect("ifindex");
    let (eth0, eth1) = (ifindex("eth0"), ifindex("eth1"));
    let run = |frame: &[u8], ifindex: u32| test_run_on(program, frame, ifindex).expect("run");
    let big = vec![b'b'; 1400];

    let frontend = SocketAddrV4::new(NODE1_CLIENT_SIDE, NODE_PORT);
    let pod = SocketAddrV4::new(POD, POD_PORT);
    let packets_of = |service| {
        lab.datapath
            .service_counter(service)
            .expect("counter")
            .packets
    };
    for (udp, port, service) in [(false, 41_001, 1), (true, 41_002, 2)] {
        let client = SocketAddrV4::new(CLIENT, port);
        // The client's first packet makes the flow and claims its SNAT port.
        let sent = run(
            &frame4(to_node, (client, frontend), udp, b"hi", false),
            eth0,
        );
        assert_eq!(
            sent.packet[26..30],
            NODE1_NODE_SIDE.octets(),
            "udp {udp}: SNATed"
        );
        let snat = SocketAddrV4::new(
            NODE1_NODE_SIDE,
            u16::from_be_bytes([sent.packet[34], sent.packet[35]]),
        );
        let small = run(&frame4(from_node2, (pod, snat), udp, b"ok", false), eth1);
        assert_eq!(small.verdict, XDP_REDIRECT, "udp {udp}: a small answer");
        let too_big = frame4(from_node2, (pod, snat), udp, &big, false);
        let counted = packets_of(service);
        let answer = run(&too_big, eth1);
        assert_eq!(answer.verdict, XDP_TX, "udp {udp}");
        assert_eq!(
            packets_of(service),
            counted,
            "udp {udp}: the answered packet is not counted for its service"
        );
        assert_eq!(
            answer.packet,
            fragmentation_needed(
                to_node2,
                (NODE1_NODE_SIDE, POD),
                NARROW_CLIENT_MTU,
                &too_big[14..14 + 28]
            ),
            "udp {udp}: fragmentation needed, to the pod, quoting its answer as it sent it"
        );
        let may_fragment = run(&frame4(from_node2, (pod, snat), udp, &big, true), eth1);
        assert_eq!(
            may_fragment.verdict, XDP_PASS,
            "udp {udp}: without DF, to the stack"
        );
        assert_eq!(
            (&may_fragment.packet[26..30], &may_fragment.packet[30..34]),
            (&NODE1_CLIENT_SIDE.octets()[..], &CLIENT.octets()[..]),
            "udp {udp}: translated, from the NodePort to the client"
        );
    }

    let frontend6 = SocketAddrV6::new(NODE1_CLIENT_SIDE6, NODE_PORT, 0, 0);
    let pod6 = SocketAddrV6::new(POD6, POD_PORT, 0, 0);
    for (udp, port) in [(false, 41_011), (true, 41_012)] {
        let client = SocketAddrV6::new(CLIENT6, port, 0, 0);
        let sent = run(&frame6(to_node, (client, frontend6), udp, b"hi"), eth0);
        assert_eq!(
            sent.packet[22..38],
            NODE1_NODE_SIDE6.octets(),
            "ipv6, udp {udp}: SNATed"
        );
        let snat = SocketAddrV6::new(
            NODE1_NODE_SIDE6,
            u16::from_be_bytes([sent.packet[54], sent.packet[55]]),
            0,
            0,
        );
        let small = run(&frame6(from_node2, (pod6, snat), udp, b"ok"), eth1);
        assert_eq!(
            small.verdict, XDP_REDIRECT,
            "ipv6, udp {udp}: a small answer"
        );
        let too_big = frame6(from_node2, (pod6, snat), udp, &big);
        let answer = run(&too_big, eth1);
        assert_eq!(answer.verdict, XDP_TX, "ipv6, udp {udp}");
        assert_eq!(
            answer.packet,
            packet_too_big(
                to_node2,
                (NODE1_NODE_SIDE6, POD6),
                NARROW_CLIENT_MTU,
                &too_big[14..14 + 48]
            ),
            "ipv6, udp {udp}: packet too big, to the pod, quoting its answer as it sent it"
        );
    }
    let events = lab.datapath.events().expect("events");
    assert_eq!(events["icmp_too_big_sent"], 4, "{events:?}");
    assert_eq!(events["drop_too_big"], 0, "{events:?}");
}

/// Real TCP downloads through the NodePort from the pod on node2, whose full-sized segments
/// do not fit node1's NIC towards the client: XDP answers them with "fragmentation needed"
/// ("packet too big"), the pod's kernel lowers its path MTU to node1's SNAT address to that
/// NIC's, and every download completes. Redirected over that NIC's MTU, the segments vanished
/// and the downloads stalled.
#[test]
fn tcp_downloads_through_a_node_port_learn_the_narrower_mtu_of_the_clients_nic() {
    let lab = TwoNics::dual_stack().expect("lab");
    narrow_node1s_client_side(&lab);
    for (family, frontend, route_get) in node_port_by_family(NODE1_NODE_SIDE, NODE1_NODE_SIDE6) {
        let report = ClientRun {
            answer_bytes: 200_000,
            timeout_ms: 5000,
            ..ClientRun::tcp(&frontend, 3)
        }
        .run(&lab.client, None)
        .expect("client");
        report.assert_all_ok(family);
        let route_get: Vec<&str> = route_get.iter().map(String::as_str).collect();
        let route = lab.pod.ip(&route_get).expect("route get");
        assert!(
            route.contains(&format!("mtu {NARROW_CLIENT_MTU}")),
            "{family}: the pod's path MTU to node1's SNAT address: {route}"
        );
    }
    let events = lab.datapath.events().expect("events");
    assert!(events["icmp_too_big_sent"] >= 2, "{events:?}");
    assert_eq!(events["drop_too_big"], 0, "{events:?}");
}

/// Sets `net.ipv4.conf.{all,eth0,eth1}.rp_filter` on node1.
fn rp_filter(lab: &TwoNics, mode: &str) {
    for scope in ["all", "eth0", "eth1"] {
        lab.node1
            .sysctl(&format!("net.ipv4.conf.{scope}.rp_filter"), mode)
            .expect("rp_filter");
    }
}

/// Strict reverse-path filtering on a node with two NICs drops what XDP translates and hands
/// to the stack with a source on the other NIC: with node2's MAC unknown, every SYN SNATed to
/// node1's node-side address goes to the stack to be forwarded (and the neighbour resolved),
/// and dies there, so no NodePort connection to the pod is ever made. The agent's requirement
/// check names it on both NICs, and on a node whose XDP serves eth0 alone (where every such
/// SYN goes to the stack), but not on one whose XDP serves eth1 alone, the NIC of the SNAT
/// address; with loose filtering (2) the same connections go through.
#[test]
fn strict_reverse_path_filtering_is_a_missing_requirement_of_a_node_with_two_nics() {
    let lab = TwoNics::build().expect("lab");
    let target = format!("{NODE1_CLIENT_SIDE}:{NODE_PORT}");
    let missing_on = |interfaces: &[&str], remote_endpoints| {
        let interfaces: Vec<String> = interfaces.iter().map(|&name| name.to_owned()).collect();
        let _inside = lab.node1.enter().expect("node1");
        lb_userspace::node::missing_requirements(
            &interfaces,
            remote_endpoints,
            Some(NODE1_NODE_SIDE),
        )
    };
    let missing = |remote_endpoints| missing_on(&["eth0", "eth1"], remote_endpoints);
    let rp_filter_on = |interfaces: &[&str]| {
        missing_on(interfaces, true)
            .iter()
            .map(|missing| (missing.requirement, missing.interface.clone()))
            .collect::<Vec<_>>()
    };
    let connect = || {
        lab.node1
            .ip(&["neigh", "flush", "all"])
            .expect("forget node2's MAC");
        ClientRun {
            timeout_ms: 1000,
            ..ClientRun::tcp(&target, 3)
        }
        .run(&lab.client, None)
        .expect("client")
    };

    rp_filter(&lab, "1");
    let found = missing(true);
    assert_eq!(
        found
            .iter()
            .map(|missing| (missing.requirement, missing.interface.as_str()))
            .collect::<Vec<_>>(),
        [("rp_filter", "eth0"), ("rp_filter", "eth1")],
        "{found:?}"
    );
    assert_eq!(found[0].sysctl, "net.ipv4.conf.all.rp_filter");
    assert_eq!(
        rp_filter_on(&["eth0"]),
        [("rp_filter", "eth0".to_owned())],
        "XDP on eth0 alone: the SNAT address is eth1's"
    );
    assert_eq!(
        rp_filter_on(&["eth1"]),
        [],
        "XDP on eth1 alone: the SNAT address is its own"
    );
    assert!(
        missing(false).is_empty(),
        "no endpoint on another node: nothing to forward"
    );
    let report = connect();
    assert_eq!(report.ok, 0, "strict: {report:?}");

    rp_filter(&lab, "2");
    assert!(missing(true).is_empty());
    connect().assert_all_ok("loose");
}

/// Two NICs whose ifindexes share a slot of `lb_nicmac_v1` (ifindex % 256) leave the slot
/// empty, and XDP cannot name the client's NIC by the tag its flow recorded. An answer arriving
/// on eth1 then goes to the stack translated, which routes it out of eth0 (the MAC its client's
/// frames were sent to is eth0's, not the frame's own), where it went out of eth1 with XDP_TX,
/// with eth0's MACs, and was lost. An answer whose client came in on the NIC it arrives on is
/// still sent back by XDP_TX. Through BPF_PROG_TEST_RUN, then real TCP connections.
#[test]
fn answers_go_to_the_stack_when_the_clients_nic_shares_its_slot_with_another() {
    let mut lab = TwoNics::build().expect("lab");
    let [client_mac, node1_eth0, node1_eth1, node2_eth1] = macs_with_node2_known(&lab);
    let ifindex = |iface: &str| lab.node1.ifindex(iface).expect("ifindex");
    let (eth0, eth1) = (ifindex("eth0"), ifindex("eth1"));
    lab.datapath
        .record_nic_mac(eth0 + 256, [0x02, 0, 0, 0, 0x99, 0x99])
        .expect("a NIC in eth0's slot");
    let program = lab
        .datapath
        .program_fd(program_names::XDP_LB)
        .expect("program");
    let frontend = SocketAddrV4::new(NODE1_CLIENT_SIDE, NODE_PORT);
    let pod = SocketAddrV4::new(POD, POD_PORT);
    {
        let _inside = lab.node1.enter().expect("node1");
        let client = SocketAddrV4::new(CLIENT, 45_679);
        let syn = tcp_frame((client_mac, node1_eth0), client, frontend, 64, false);
        let run = test_run_on(program, &syn, eth0).expect("syn");
        assert_eq!(run.verdict, XDP_REDIRECT, "the SYN goes out of eth1");
        let snat = SocketAddrV4::new(
            NODE1_NODE_SIDE,
            u16::from_be_bytes([run.packet[34], run.packet[35]]),
        );
        let syn_ack = tcp_frame((node2_eth1, node1_eth1), pod, snat, 63, true);
        let run = test_run_on(program, &syn_ack, eth1).expect("syn-ack");
        assert_eq!(run.verdict, XDP_PASS, "the SYN-ACK goes to the stack");
        assert_eq!(
            run.packet,
            tcp_frame((node2_eth1, node1_eth1), frontend, client, 63, true),
            "translated, from the NodePort to the client, its TTL for the stack to lower"
        );
        // A flow whose answers arrive on the NIC its client's frames came in on: back out of it.
        let here = SocketAddrV4::new(CLIENT, 45_680);
        let syn = tcp_frame((client_mac, node1_eth0), here, frontend, 64, false);
        let run = test_run_on(program, &syn, eth0).expect("syn");
        let snat = SocketAddrV4::new(
            NODE1_NODE_SIDE,
            u16::from_be_bytes([run.packet[34], run.packet[35]]),
        );
        let syn_ack = tcp_frame((node2_eth1, node1_eth0), pod, snat, 63, true);
        let run = test_run_on(program, &syn_ack, eth0).expect("syn-ack");
        assert_eq!(run.verdict, XDP_TX, "back out of the NIC it came in on");
    }
    let target = frontend.to_string();
    ClientRun::tcp(&target, 20)
        .run(&lab.client, None)
        .expect("client")
        .assert_all_ok("with eth0's slot shared");
}

/// A NIC where XDP runs in generic mode (what `--xdp-mode auto` gives a veth) is no
/// XDP_REDIRECT target: a redirect into it from a NIC in native mode goes through its driver's
/// ndo_xdp_xmit, which a veth serves only to a peer that runs NAPI, and the kernel drops the
/// frame unseen. A client's SYN whose route leaves by it goes to the stack translated, which
/// forwards it; the answers, arriving there, are still redirected to the client's NIC (generic
/// XDP redirects through the stack's transmit path). Real connections go through.
#[test]
fn a_nic_in_generic_mode_is_no_redirect_target() {
    let lab = TwoNics::generic_node_side().expect("lab");
    let [client_mac, node1_eth0, _, _] = macs_with_node2_known(&lab);
    let program = lab
        .datapath
        .program_fd(program_names::XDP_LB)
        .expect("program");
    {
        let _inside = lab.node1.enter().expect("node1");
        let eth0 = lab.node1.ifindex("eth0").expect("ifindex");
        let client = SocketAddrV4::new(CLIENT, 45_681);
        let frontend = SocketAddrV4::new(NODE1_CLIENT_SIDE, NODE_PORT);
        let syn = tcp_frame((client_mac, node1_eth0), client, frontend, 64, false);
        let run = test_run_on(program, &syn, eth0).expect("syn");
        assert_eq!(run.verdict, XDP_PASS, "to the stack, not redirected");
        assert_eq!(
            (&run.packet[26..30], &run.packet[30..34]),
            (&NODE1_NODE_SIDE.octets()[..], &POD.octets()[..]),
            "SNATed to the pod"
        );
    }
    let target = format!("{NODE1_CLIENT_SIDE}:{NODE_PORT}");
    ClientRun::tcp(&target, 20)
        .run(&lab.client, None)
        .expect("client")
        .assert_all_ok("through a NIC in generic mode");
    let stat = |iface: &str, name: &str| lab.node1.nic_stat(iface, name).expect("ethtool -S");
    assert_eq!(
        stat("eth0", "rx_queue_0_xdp_redirect"),
        0,
        "nothing redirected to eth1"
    );
}
