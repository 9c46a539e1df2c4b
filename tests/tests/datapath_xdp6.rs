//! XDP over IPv6 through BPF_PROG_TEST_RUN, table-driven: input frame, expected verdict, expected
//! output bytes (built by etherparse, so every checksum is computed independently of the
//! datapath, and each translated frame's TCP/UDP checksum is recomputed whole here too). The
//! frames enter `lb_xdp`, which hands IPv6 to `lb_xdp6` and the programs after it, as on a NIC.

use std::net::{IpAddr, Ipv6Addr, SocketAddrV6};

use etherparse::PacketBuilder;
use lab::{
    lab::{Host, Lab, PinDir},
    packet::{CLIENT_MAC, ETH_HDR_LEN, NODE_MAC, TcpFlags},
    packet6::{self, IPV6_HDR_LEN, next_header},
    peer::NodeConnection,
    table::{Case, Expect, run_table},
};
use lb_common::{backend_flags, flow_key, program_names, proto, service_flags, tcp_state};
use lb_userspace::{
    compile::model::{Backend, Frontend, Service, ipv6_words},
    datapath::{Datapath, testrun::test_run},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_OK: u32 = 0;

const NODE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const NODE_PORT: u16 = 30080;
const FRONTEND: SocketAddrV6 = SocketAddrV6::new(NODE, NODE_PORT, 0, 0);
/// A frontend whose service has no endpoint.
const EMPTY_FRONTEND: SocketAddrV6 = SocketAddrV6::new(NODE, 30090, 0, 0);
const CLIENT_ADDR: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const CLIENT: SocketAddrV6 = SocketAddrV6::new(CLIENT_ADDR, 40000, 0, 0);
const POD_A: SocketAddrV6 = SocketAddrV6::new(
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x10),
    8080,
    0,
    0,
);
const SEQ: u32 = 1000;

fn client(port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(CLIENT_ADDR, port, 0, 0)
}

fn node_port(port: u16, protocol: u8) -> Frontend {
    Frontend {
        addr: NODE.into(),
        port,
        proto: protocol,
        kind: service_flags::NODE_PORT,
    }
}

/// A datapath with IPv6 NodePort services on [2001:db8::1]:30080 (TCP, backend 1; UDP, backend
/// 2: pod A, local) and on :30090 with no endpoint (TCP and UDP).
fn datapath(pins: &PinDir) -> Datapath {
    let mut datapath = Datapath::load(pins.path()).expect("loading the datapath");
    for (id, protocol) in [(1, proto::TCP), (2, proto::UDP)] {
        let backend = Backend {
            addr: IpAddr::V6(*POD_A.ip()),
            port: POD_A.port(),
            proto: protocol,
            flags: backend_flags::LOCAL,
        };
        datapath.put_backend(id, &backend).expect("backend");
    }
    let services = [
        (1, node_port(NODE_PORT, proto::TCP), vec![1]),
        (2, node_port(NODE_PORT, proto::UDP), vec![2]),
        (3, node_port(EMPTY_FRONTEND.port(), proto::TCP), vec![]),
        (4, node_port(EMPTY_FRONTEND.port(), proto::UDP), vec![]),
    ];
    for (id, frontend, backends) in services {
        let service = Service {
            id,
            frontends: vec![frontend],
            backends,
            ..Default::default()
        };
        datapath.put_service(&service).expect("service");
    }
    datapath
}

/// The one port of the SNAT range [`add_remote_service`] sets.
const SNAT_PORT: u16 = 61000;
/// An endpoint on another node, behind [`REMOTE_FRONTEND`] (TCP).
const REMOTE_POD: SocketAddrV6 = SocketAddrV6::new(
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 2, 0, 0, 0, 0x10),
    8080,
    0,
    0,
);
const REMOTE_FRONTEND: SocketAddrV6 = SocketAddrV6::new(NODE, 30081, 0, 0);

/// Adds service 5, a TCP NodePort on [`REMOTE_FRONTEND`] whose one endpoint is
/// [`REMOTE_POD`] on another node, reached through SNAT to the node's address and
/// [`SNAT_PORT`].
fn add_remote_service(datapath: &mut Datapath) {
    datapath
        .set_config(&lb_common::DatapathConfig {
            snat_port_min: SNAT_PORT,
            snat_port_max: SNAT_PORT,
            ..Default::default()
        })
        .expect("config");
    datapath
        .set_config6(&lb_common::Datapath6Config {
            snat_addr: ipv6_words(NODE),
        })
        .expect("config6");
    let remote = Backend {
        addr: IpAddr::V6(*REMOTE_POD.ip()),
        port: REMOTE_POD.port(),
        proto: proto::TCP,
        flags: 0,
    };
    datapath.put_backend(9, &remote).expect("remote backend");
    datapath
        .put_service(&Service {
            id: 5,
            frontends: vec![node_port(REMOTE_FRONTEND.port(), proto::TCP)],
            backends: vec![9],
            ..Default::default()
        })
        .expect("remote service");
}

fn case(name: &'static str, input: Vec<u8>, verdict: u32, output: Expect) -> Case {
    Case {
        name,
        input,
        verdict,
        output,
    }
}

fn tcp(src: SocketAddrV6, dst: SocketAddrV6, flags: TcpFlags, payload: &[u8]) -> Vec<u8> {
    packet6::tcp(src, dst, flags, SEQ, payload)
}

/// The RST XDP answers a SYN to a service without endpoints with: from the frontend, back to the
/// client's MAC, seq 0 and the SYN acknowledged (RFC 9293 3.10.7.1).
fn reset_of_syn(client: SocketAddrV6, frontend: SocketAddrV6) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(NODE_MAC, CLIENT_MAC)
        .ipv6(frontend.ip().octets(), client.ip().octets(), 64)
        .tcp(frontend.port(), client.port(), 0, 0)
        .rst()
        .ack(SEQ + 1);
    let mut frame = Vec::new();
    builder.write(&mut frame, &[]).expect("a Vec takes it");
    frame
}

/// The ICMPv6 port unreachable XDP answers a datagram to a service without endpoints with,
/// quoting the datagram's IPv6 header and its first 8 transport bytes.
fn port_unreachable(datagram: &[u8], client: SocketAddrV6, frontend: SocketAddrV6) -> Vec<u8> {
    let quote = &datagram[ETH_HDR_LEN..ETH_HDR_LEN + IPV6_HDR_LEN + 8];
    let builder = PacketBuilder::ethernet2(NODE_MAC, CLIENT_MAC)
        .ipv6(frontend.ip().octets(), client.ip().octets(), 64)
        .icmpv6_raw(1, 4, [0; 4]);
    let mut frame = Vec::new();
    builder.write(&mut frame, quote).expect("a Vec takes it");
    frame
}

#[test]
fn xdp_dnats_ipv6_service_traffic_and_passes_everything_else_untouched() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "xdp6").expect("pin dir");
    let datapath = datapath(&pins);
    let udp = packet6::udp(CLIENT, FRONTEND, b"query");
    let empty_udp = packet6::udp(client(40003), EMPTY_FRONTEND, b"query");
    let translated = [
        tcp(CLIENT, POD_A, TcpFlags::SYN, b""),
        tcp(CLIENT, POD_A, TcpFlags::ACK, b"GET / HTTP/1.1\r\n"),
        tcp(CLIENT, POD_A, TcpFlags::FIN_ACK, b""),
        packet6::udp(CLIENT, POD_A, b"query"),
        packet6::with_options_header(
            &tcp(client(40001), POD_A, TcpFlags::SYN, b""),
            next_header::DEST_OPTS,
            1,
        ),
        packet6::with_options_header(
            &tcp(client(40001), POD_A, TcpFlags::ACK, b"GET"),
            next_header::DEST_OPTS,
            1,
        ),
        tcp(client(40001), POD_A, TcpFlags::ACK, b"GET"),
        tcp(client(40008), POD_A, TcpFlags::SYN, b""),
        packet6::tcp(client(40008), POD_A, TcpFlags::RST, SEQ + 1, b""),
        tcp(client(40009), POD_A, TcpFlags::SYN, b""),
        packet6::tcp(
            client(40009),
            POD_A,
            TcpFlags::FIN_ACK,
            SEQ + 1 + (1 << 30),
            b"",
        ),
    ];
    for frame in &translated {
        assert!(packet6::transport_checksum_ok(frame), "fixture checksum");
    }
    let cases = vec![
        case(
            "tcp syn, new flow",
            tcp(CLIENT, FRONTEND, TcpFlags::SYN, b""),
            XDP_PASS,
            Expect::Bytes(translated[0].clone()),
        ),
        case(
            "tcp ack, established",
            tcp(CLIENT, FRONTEND, TcpFlags::ACK, b"GET / HTTP/1.1\r\n"),
            XDP_PASS,
            Expect::Bytes(translated[1].clone()),
        ),
        case(
            "tcp fin, established",
            tcp(CLIENT, FRONTEND, TcpFlags::FIN_ACK, b""),
            XDP_PASS,
            Expect::Bytes(translated[2].clone()),
        ),
        // A live flow's segments are served by lb_xdp itself; one its flow refuses goes on to
        // lb_xdp6_direct_tcp, which drops it, counted once.
        case(
            "tcp syn of a second flow",
            tcp(client(40008), FRONTEND, TcpFlags::SYN, b""),
            XDP_PASS,
            Expect::Bytes(translated[7].clone()),
        ),
        case(
            "tcp syn of a third flow",
            tcp(client(40009), FRONTEND, TcpFlags::SYN, b""),
            XDP_PASS,
            Expect::Bytes(translated[9].clone()),
        ),
        case(
            "tcp fin far from what that client sent: translated, the flow left open",
            packet6::tcp(
                client(40009),
                FRONTEND,
                TcpFlags::FIN_ACK,
                SEQ + 1 + (1 << 30),
                b"",
            ),
            XDP_PASS,
            Expect::Bytes(translated[10].clone()),
        ),
        case(
            "tcp rst far from what that client sent: blind, dropped",
            packet6::tcp(
                client(40008),
                FRONTEND,
                TcpFlags::RST,
                SEQ + 1 + (1 << 30),
                b"",
            ),
            XDP_DROP,
            Expect::Unchanged,
        ),
        case(
            "tcp rst where that client's data ends: translated",
            packet6::tcp(client(40008), FRONTEND, TcpFlags::RST, SEQ + 1, b""),
            XDP_PASS,
            Expect::Bytes(translated[8].clone()),
        ),
        case(
            "udp, new flow",
            udp.clone(),
            XDP_PASS,
            Expect::Bytes(translated[3].clone()),
        ),
        case(
            // Served by lb_xdp itself, as the new flow's first datagram was up to the hand-off.
            "udp, the flow's next datagram",
            udp.clone(),
            XDP_PASS,
            Expect::Bytes(translated[3].clone()),
        ),
        case(
            // lb_xdp serves a UDP header right after the fixed one itself; behind extension
            // headers it goes through lb_xdp6.
            "udp behind a hop-by-hop options header, new flow",
            packet6::with_options_header(
                &packet6::udp(client(40006), FRONTEND, b"query"),
                next_header::HOP_BY_HOP,
                1,
            ),
            XDP_PASS,
            Expect::Bytes(packet6::with_options_header(
                &packet6::udp(client(40006), POD_A, b"query"),
                next_header::HOP_BY_HOP,
                1,
            )),
        ),
        case(
            "udp with checksum 0: invalid over IPv6, dropped",
            packet6::with_udp_checksum(&udp, 0),
            XDP_DROP,
            Expect::Unchanged,
        ),
        case(
            "tcp syn behind a destination options header",
            packet6::with_options_header(
                &tcp(client(40001), FRONTEND, TcpFlags::SYN, b""),
                next_header::DEST_OPTS,
                1,
            ),
            XDP_PASS,
            Expect::Bytes(translated[4].clone()),
        ),
        case(
            // Behind extension headers a live flow's segment is lb_xdp6's; right after the
            // fixed header lb_xdp6_direct_tcp's: both find the flow either made.
            "tcp ack behind a destination options header, established",
            packet6::with_options_header(
                &tcp(client(40001), FRONTEND, TcpFlags::ACK, b"GET"),
                next_header::DEST_OPTS,
                1,
            ),
            XDP_PASS,
            Expect::Bytes(translated[5].clone()),
        ),
        case(
            "tcp ack of that flow without the header, established",
            tcp(client(40001), FRONTEND, TcpFlags::ACK, b"GET"),
            XDP_PASS,
            Expect::Bytes(translated[6].clone()),
        ),
        case(
            "tcp syn behind a routing header with no segment left: this node is the destination",
            packet6::with_routing_header(&tcp(client(40004), FRONTEND, TcpFlags::SYN, b""), 0),
            XDP_PASS,
            Expect::Bytes(packet6::with_routing_header(
                &tcp(client(40004), POD_A, TcpFlags::SYN, b""),
                0,
            )),
        ),
        case(
            "tcp syn behind a routing header with a segment left: on its way elsewhere",
            packet6::with_routing_header(&tcp(client(40005), FRONTEND, TcpFlags::SYN, b""), 1),
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "ipv6 frame whose header is not version 6: dropped as the stack would",
            lab::packet::non_ip(0x86dd, 60),
            XDP_DROP,
            Expect::Unchanged,
        ),
        case(
            "miss: another port of the node",
            tcp(
                CLIENT,
                SocketAddrV6::new(NODE, 22, 0, 0),
                TcpFlags::SYN,
                b"",
            ),
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "neighbour solicitation for the node",
            packet6::neighbour_solicitation(CLIENT_ADDR, NODE),
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "atomic fragment (offset 0, no more to come) to a frontend: a whole datagram",
            packet6::with_fragment_header(&udp, 0, false, 7),
            XDP_PASS,
            Expect::Bytes(packet6::with_fragment_header(&translated[3], 0, false, 7)),
        ),
        case(
            "later fragment of a datagram whose first fragment never came",
            packet6::with_fragment_header(&udp, 8, false, 8),
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "sctp to a frontend's address, no sctp frontend there: a miss, passed",
            packet6::sctp(client(40002), FRONTEND, 1, 0, &[]),
            XDP_PASS,
            Expect::Unchanged,
        ),
        // The stack drops both (RFC 8200 section 4.1; ip6_protocol_deliver_rcu): no flow of
        // them, nor headers read from bytes past the payload.
        case(
            "hop-by-hop header after a destination options header",
            packet6::with_options_header(
                &packet6::with_options_header(&udp, next_header::HOP_BY_HOP, 1),
                next_header::DEST_OPTS,
                1,
            ),
            XDP_DROP,
            Expect::Unchanged,
        ),
        case(
            "destination options header past the payload length",
            {
                let mut frame = packet6::with_options_header(&udp, next_header::DEST_OPTS, 1);
                // The payload: 4 bytes; the header's 8 and the datagram follow in the frame.
                frame[ETH_HDR_LEN + 4..ETH_HDR_LEN + 6].copy_from_slice(&4u16.to_be_bytes());
                frame
            },
            XDP_DROP,
            Expect::Unchanged,
        ),
        case(
            "no next header, 2 bytes of payload, padding after: an upper layer, passed",
            {
                let mut frame = udp.clone();
                frame[ETH_HDR_LEN + 6] = 59;
                frame[ETH_HDR_LEN + 4..ETH_HDR_LEN + 6].copy_from_slice(&2u16.to_be_bytes());
                frame
            },
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "tcp syn+fin to a frontend: no flow starts of it",
            tcp(
                client(40006),
                FRONTEND,
                TcpFlags {
                    fin: true,
                    ..TcpFlags::SYN
                },
                b"",
            ),
            XDP_DROP,
            Expect::Unchanged,
        ),
        case(
            "first fragment whose udp header lies past the payload length",
            {
                let mut fragment = packet6::with_fragment_header(&udp, 0, true, 9);
                // The payload: the Fragment header alone; the UDP header follows in the frame.
                fragment[ETH_HDR_LEN + 4..ETH_HDR_LEN + 6].copy_from_slice(&8u16.to_be_bytes());
                fragment
            },
            XDP_DROP,
            Expect::Unchanged,
        ),
        case(
            "tcp syn to a service without endpoints: RST",
            tcp(client(40004), EMPTY_FRONTEND, TcpFlags::SYN, b""),
            XDP_TX,
            Expect::Bytes(reset_of_syn(client(40004), EMPTY_FRONTEND)),
        ),
        case(
            "udp to a service without endpoints: ICMPv6 port unreachable",
            empty_udp.clone(),
            XDP_TX,
            Expect::Bytes(port_unreachable(&empty_udp, client(40003), EMPTY_FRONTEND)),
        ),
    ];
    run_table(
        datapath.program_fd(program_names::XDP_LB).expect("lb_xdp"),
        &cases,
    );

    let events = datapath.events().expect("events");
    // The UDP checksum 0, the frame that is not version 6, the misplaced Hop-by-Hop header,
    // the header past the payload, SYN+FIN and the fragment whose UDP header lies past its
    // payload.
    assert_eq!(events["drop_malformed"], 6, "{events:?}");
    assert_eq!(events["pass_fragment"], 1, "{events:?}");
    assert_eq!(events["reject_tcp_rst"], 1, "{events:?}");
    assert_eq!(events["reject_icmp"], 1, "{events:?}");
    assert_eq!(events["drop_rst_out_of_window"], 1, "{events:?}");
    assert_eq!(events["ct_fin_out_of_window"], 1, "{events:?}");
    // The SCTP frame is a miss lb_xdp passes itself (lb_xdp6_sctp, not loaded here, comes
    // with the first IPv6 SCTP frontend).
    assert_eq!(events["pass_protocol_unserved"], 0, "{events:?}");
    // The UDP service: the first flow's two datagrams and its atomic fragment, the flow behind
    // a hop-by-hop header. Each counted once, whichever of lb_xdp and the programs after it
    // served it.
    let udp_counter = datapath.service_counter(2).expect("counter");
    assert_eq!(
        (udp_counter.packets, udp_counter.new_flows),
        (4, 2),
        "{udp_counter:?}"
    );

    // The client's TCP flow is one FLOW entry in the IPv6 conntrack, half-closed by its FIN.
    let flow = datapath
        .conntrack6_entry(&flow_key(
            ipv6_words(CLIENT_ADDR),
            CLIENT.port(),
            proto::TCP,
        ))
        .expect("the client's FLOW entry");
    assert_eq!(flow.nat_addr, ipv6_words(*POD_A.ip()));
    assert_eq!(flow.nat_port, POD_A.port());
    assert_eq!(flow.service_id, 1);
    assert_eq!(flow.state, tcp_state::CLIENT_CLOSED);
    // The in-window RST ended the second flow; the blind one did not.
    let reset = datapath
        .conntrack6_entry(&flow_key(ipv6_words(CLIENT_ADDR), 40008, proto::TCP))
        .expect("the second flow's FLOW entry");
    assert_eq!(reset.state, tcp_state::CLOSING);
    // The blind FIN left the third where its SYN put it.
    let blind_fin = datapath
        .conntrack6_entry(&flow_key(ipv6_words(CLIENT_ADDR), 40009, proto::TCP))
        .expect("the third flow's FLOW entry");
    assert_eq!(blind_fin.state, tcp_state::SYN_SENT);
}

/// Maglev over IPv6: each new flow goes to the backend that slot `flow_hash6 % M` of the
/// service's table names, the table and the hash built here apart from the agent
/// (`lab::maglev_reference`), so every node picks the same backend for an IPv6 flow.
/// The IPv6 twin of datapath_table's held-key test: a SYN is written without a lookup of its
/// client's key; when the key is held (or the try fails), `lb_xdp6_flow` hands it back to
/// `lb_xdp6_frontend`, which looks it up. Retransmits, right after the fixed header and behind a
/// Hop-by-Hop header (through `lb_xdp6`), go where their flow went after the table changed or
/// emptied; a SYN on a closed flow's port follows the table; a SNAT flow's retransmit keeps its
/// port (the range's only one) and leaves its two entries.
/// The IPv6 twin of datapath_table's test of the node's own connection from a NodePort: the
/// peer's segments to a frontend that no flow has pass to the node's socket (the lookup runs in
/// the test's namespace, where BPF_PROG_TEST_RUN runs the programs), a segment of no socket's
/// is picked up mid-stream, and a bare SYN is a new flow.
#[test]
fn segments_of_the_nodes_own_ipv6_connection_from_a_node_port_pass_untouched() {
    let (_lab, node, pins) = node_lab("own6");
    let datapath = datapath(&pins);
    let own = NodeConnection::open(&node, FRONTEND.into(), NODE.into()).expect("connection");
    let (server, stranger) = own.v6();
    let cases = vec![
        case(
            "the peer's ack",
            tcp(server, FRONTEND, TcpFlags::ACK, b"answer"),
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "the peer's syn-ack sent again",
            tcp(server, FRONTEND, TcpFlags::SYN_ACK, b""),
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "the peer's fin",
            tcp(server, FRONTEND, TcpFlags::FIN_ACK, b""),
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "an ack of no socket's, picked up mid-stream",
            tcp(stranger, FRONTEND, TcpFlags::ACK, b"data"),
            XDP_PASS,
            Expect::Bytes(tcp(stranger, POD_A, TcpFlags::ACK, b"data")),
        ),
        case(
            "a bare syn on the socket's tuple, a new flow",
            tcp(server, FRONTEND, TcpFlags::SYN, b""),
            XDP_PASS,
            Expect::Bytes(tcp(server, POD_A, TcpFlags::SYN, b"")),
        ),
    ];
    run_table(
        datapath.program_fd(program_names::XDP_LB).expect("fd"),
        &cases,
    );
    let events = datapath.events().expect("events");
    assert_eq!(events["pass_node_connection"], 3, "{events:?}");
    let tcp = datapath.service_counter(1).expect("counter");
    assert_eq!((tcp.packets, tcp.new_flows), (2, 2), "{tcp:?}");
}

/// The IPv6 twin of datapath_table's: a LoadBalancer IP that is the node's own address, with
/// source ranges that leave the node out. The answers to the node's connection from one of its
/// ports pass; a segment of no socket's from outside the ranges and a new flow are dropped.
#[test]
fn the_nodes_own_ipv6_connection_from_a_load_balancer_ips_port_passes_outside_its_source_ranges() {
    let (_lab, node, pins) = node_lab("ownlb6");
    let mut datapath = datapath(&pins);
    let load_balancer_ip = SocketAddrV6::new(NODE, 8443, 0, 0);
    datapath
        .put_service(&Service {
            id: 5,
            frontends: vec![Frontend {
                addr: IpAddr::V6(NODE),
                port: load_balancer_ip.port(),
                proto: proto::TCP,
                kind: service_flags::LOAD_BALANCER,
            }],
            backends: vec![1],
            flags: service_flags::SOURCE_RANGES,
            source_ranges: [(
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x2, 0, 0, 0, 0, 0)),
                64,
            )]
            .into(),
            ..Default::default()
        })
        .expect("service");
    let own =
        NodeConnection::open(&node, load_balancer_ip.into(), NODE.into()).expect("connection");
    let (server, stranger) = own.v6();
    let cases = vec![
        case(
            "the peer's ack",
            tcp(server, load_balancer_ip, TcpFlags::ACK, b"answer"),
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "the peer's fin",
            tcp(server, load_balancer_ip, TcpFlags::FIN_ACK, b""),
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "an ack of no socket's",
            tcp(stranger, load_balancer_ip, TcpFlags::ACK, b"data"),
            XDP_DROP,
            Expect::Unchanged,
        ),
        case(
            "a bare syn on the socket's tuple",
            tcp(server, load_balancer_ip, TcpFlags::SYN, b""),
            XDP_DROP,
            Expect::Unchanged,
        ),
    ];
    run_table(
        datapath.program_fd(program_names::XDP_LB).expect("fd"),
        &cases,
    );
    let events = datapath.events().expect("events");
    assert_eq!(events["pass_node_connection"], 2, "{events:?}");
    assert_eq!(events["drop_source_range"], 2, "{events:?}");
    let counter = datapath.service_counter(5).expect("counter");
    assert_eq!((counter.packets, counter.new_flows), (0, 0), "{counter:?}");
}

/// The IPv6 twin of datapath_table's: the peer's datagrams to the node's UDP socket connected
/// from the UDP NodePort's port pass untouched; anyone else's start the Service's flow, also
/// while a socket of the node's is bound to the port unconnected.
#[test]
fn datagrams_from_the_peer_of_the_nodes_connected_udp6_socket_on_a_node_port_pass_untouched() {
    let (_lab, node, pins) = node_lab("ownudp6");
    let datapath = datapath(&pins);
    let own = NodeConnection::open_udp(&node, FRONTEND.into(), NODE.into()).expect("connection");
    let (server, stranger) = own.v6();
    let listening =
        socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None).expect("socket");
    listening.set_reuse_address(true).expect("SO_REUSEADDR");
    listening
        .bind(&std::net::SocketAddr::from(FRONTEND).into())
        .expect("an unconnected socket on the NodePort");
    let cases = vec![
        case(
            "the peer's datagram",
            packet6::udp(server, FRONTEND, b"answer"),
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "a datagram of no connected socket's, a new flow",
            packet6::udp(stranger, FRONTEND, b"query"),
            XDP_PASS,
            Expect::Bytes(packet6::udp(stranger, POD_A, b"query")),
        ),
        case(
            "the peer's next datagram",
            packet6::udp(server, FRONTEND, b"more"),
            XDP_PASS,
            Expect::Unchanged,
        ),
    ];
    run_table(
        datapath.program_fd(program_names::XDP_LB).expect("fd"),
        &cases,
    );
    let events = datapath.events().expect("events");
    assert_eq!(events["pass_node_connection"], 2, "{events:?}");
    let udp = datapath.service_counter(2).expect("counter");
    assert_eq!(udp.new_flows, 1, "{udp:?}");
}

#[test]
fn an_ipv6_syn_whose_client_key_is_held_is_looked_up_and_follows_its_flow() {
    const POD_B: SocketAddrV6 = SocketAddrV6::new(
        Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x11),
        8080,
        0,
        0,
    );
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "heldkey6").expect("pin dir");
    let mut datapath = datapath(&pins);
    add_remote_service(&mut datapath);
    let pod_b = Backend {
        addr: IpAddr::V6(*POD_B.ip()),
        port: POD_B.port(),
        proto: proto::TCP,
        flags: backend_flags::LOCAL,
    };
    datapath.put_backend(10, &pod_b).expect("backend");
    let put_table = |datapath: &mut Datapath, backends: Vec<u32>| {
        datapath
            .put_service(&Service {
                id: 1,
                frontends: vec![node_port(NODE_PORT, proto::TCP)],
                backends,
                ..Default::default()
            })
            .expect("service");
    };
    let syn = |client, to| tcp(client, to, TcpFlags::SYN, b"");
    let behind_hop_by_hop =
        |frame: &[u8]| packet6::with_options_header(frame, next_header::HOP_BY_HOP, 1);
    fn xdp(datapath: &Datapath) -> std::os::fd::BorrowedFd<'_> {
        datapath.program_fd(program_names::XDP_LB).expect("fd")
    }
    let snat_syn = syn(CLIENT, REMOTE_FRONTEND);
    let snat_out = |datapath: &Datapath| test_run(xdp(datapath), &snat_syn).expect("run").packet;

    run_table(
        xdp(&datapath),
        &[case(
            "first syn picks pod A",
            syn(CLIENT, FRONTEND),
            XDP_PASS,
            Expect::Bytes(syn(CLIENT, POD_A)),
        )],
    );
    let snat_first = snat_out(&datapath);
    let source_port = |frame: &[u8]| {
        let at = ETH_HDR_LEN + IPV6_HDR_LEN;
        u16::from_be_bytes([frame[at], frame[at + 1]])
    };
    assert_eq!(
        source_port(&snat_first),
        SNAT_PORT,
        "SNATed: {snat_first:02x?}"
    );
    // No endpoint left: a new flow would be refused, the retransmits are the live flow's.
    put_table(&mut datapath, vec![]);
    let retransmits = || {
        [
            case(
                "retransmitted syn stays on pod A",
                syn(CLIENT, FRONTEND),
                XDP_PASS,
                Expect::Bytes(syn(CLIENT, POD_A)),
            ),
            case(
                "behind a hop-by-hop header too",
                behind_hop_by_hop(&syn(CLIENT, FRONTEND)),
                XDP_PASS,
                Expect::Bytes(behind_hop_by_hop(&syn(CLIENT, POD_A))),
            ),
        ]
    };
    run_table(xdp(&datapath), &retransmits());
    put_table(&mut datapath, vec![10]);
    run_table(
        xdp(&datapath),
        &[
            retransmits()[0].clone(),
            retransmits()[1].clone(),
            case(
                "another client port follows the table to pod B",
                syn(client(40001), FRONTEND),
                XDP_PASS,
                Expect::Bytes(syn(client(40001), POD_B)),
            ),
        ],
    );
    for _ in 0..2 {
        assert_eq!(
            snat_out(&datapath),
            snat_first,
            "a SNAT flow's retransmit keeps its port"
        );
    }
    let flow_key = flow_key(ipv6_words(CLIENT_ADDR), CLIENT.port(), proto::TCP);
    let entries = datapath.conntrack6().expect("conntrack6");
    // CLIENT's flows to FRONTEND and to REMOTE_FRONTEND share a client key: the second is kept
    // as an ORIGINAL and a REPLY entry beside the first's FLOW entry.
    assert_eq!(entries.len(), 4, "{entries:#?}");
    let flow = |datapath: &Datapath| {
        *lb_common::Flow6Value::of(&datapath.conntrack6_entry(&flow_key).expect("FLOW entry"))
    };
    assert_eq!(flow(&datapath).backend_addr, ipv6_words(*POD_A.ip()));

    run_table(
        xdp(&datapath),
        &[
            case(
                "the client resets",
                tcp(CLIENT, FRONTEND, TcpFlags::RST, b""),
                XDP_PASS,
                Expect::Bytes(tcp(CLIENT, POD_A, TcpFlags::RST, b"")),
            ),
            case(
                "a syn on the closed flow's port is a new flow, to pod B",
                syn(CLIENT, FRONTEND),
                XDP_PASS,
                Expect::Bytes(syn(CLIENT, POD_B)),
            ),
        ],
    );
    let flow = flow(&datapath);
    assert_eq!(
        (flow.state, flow.backend_addr),
        (tcp_state::SYN_SENT, ipv6_words(*POD_B.ip()))
    );
    let counter = |id| datapath.service_counter(id).expect("counter").new_flows;
    assert_eq!((counter(1), counter(5)), (3, 1));
    let events = datapath.events().expect("events");
    assert!(
        events.values().all(|count| *count == 0),
        "nothing dropped, refused, passed or repaired: {events:?}"
    );
}

/// The IPv6 twin of datapath_table's pair-filter test: a UDP flow kept as a pair (its client
/// port held by a flow to another frontend) goes on after the owner's FLOW entry is evicted,
/// with the bit its start set and after the agent's rebuilds; once it has gone, two rebuilds
/// clear the bit and the client port starts a flow in one FLOW entry.
#[test]
fn an_ipv6_udp_flow_kept_as_a_pair_goes_on_without_its_owner_through_the_pair_filters_rebuilds() {
    use lb_common::{Ct6Key, Ct6Value, ct_direction, ct_flags};
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "pairfilt6").expect("pin dir");
    let mut datapath = datapath(&pins);
    let external = SocketAddrV6::new(Ipv6Addr::new(0x2001, 0xdb8, 0x51, 0, 0, 0, 0, 7), 53, 0, 0);
    datapath
        .put_service(&Service {
            id: 2,
            frontends: vec![
                node_port(NODE_PORT, proto::UDP),
                Frontend {
                    addr: IpAddr::V6(*external.ip()),
                    port: external.port(),
                    proto: proto::UDP,
                    kind: service_flags::EXTERNAL_IP,
                },
            ],
            backends: vec![2],
            ..Default::default()
        })
        .expect("service");
    let mut conntrack: aya::maps::HashMap<_, Ct6Key, Ct6Value> =
        lab::table::pinned_conntrack(pins.path(), lb_common::map_names::CONNTRACK6);
    let xdp = |datapath: &Datapath, frame: &[u8]| {
        test_run(
            datapath.program_fd(program_names::XDP_LB).expect("fd"),
            frame,
        )
        .expect("run")
    };
    let holds = |datapath: &Datapath| {
        datapath.pair_filter_holds(IpAddr::V6(CLIENT_ADDR), CLIENT.port(), proto::UDP)
    };
    assert!(!holds(&datapath), "a fresh load's filter is empty");

    let run = xdp(&datapath, &packet6::udp(CLIENT, FRONTEND, b"owner"));
    assert_eq!(run.packet, packet6::udp(CLIENT, POD_A, b"owner"));
    assert!(!holds(&datapath), "a flow in one FLOW entry sets no bit");
    let run = xdp(&datapath, &packet6::udp(CLIENT, external, b"pair"));
    assert_eq!(run.verdict, XDP_PASS);
    let parsed = etherparse::SlicedPacket::from_ethernet(&run.packet).expect("parse");
    let Some(etherparse::TransportSlice::Udp(udp)) = parsed.transport else {
        panic!("udp")
    };
    let remapped = client(udp.source_port());
    assert_ne!(remapped, CLIENT, "remapped");
    assert_eq!(run.packet, packet6::udp(remapped, POD_A, b"pair"));
    let original_key = Ct6Key {
        saddr: ipv6_words(CLIENT_ADDR),
        daddr: ipv6_words(*external.ip()),
        sport: CLIENT.port(),
        dport: external.port(),
        proto: proto::UDP,
        direction: ct_direction::ORIGINAL,
        _pad: [0; 2],
    };
    let original = conntrack.get(&original_key, 0).expect("kept as a pair");
    assert_eq!(original.flags & ct_flags::PORT_REMAP, ct_flags::PORT_REMAP);
    assert!(holds(&datapath), "the pair's start set its client's bit");
    let rebuilt = datapath.rebuild_pair_filter().expect("rebuild");
    assert_eq!(rebuilt.pairs, 1, "{rebuilt:?}");
    assert!(holds(&datapath), "the walk found the pair");

    let owner_key = flow_key(ipv6_words(CLIENT_ADDR), CLIENT.port(), proto::UDP);
    conntrack.remove(&owner_key).expect("evict the owner");
    run_table(
        datapath.program_fd(program_names::XDP_LB).expect("fd"),
        &[case(
            "the pair's next datagram, its owner gone",
            packet6::udp(CLIENT, external, b"on"),
            XDP_PASS,
            Expect::Bytes(packet6::udp(remapped, POD_A, b"on")),
        )],
    );
    assert!(
        conntrack.get(&owner_key, 0).is_err(),
        "no new flow took the client's key"
    );

    conntrack.remove(&original_key).expect("evict the pair");
    datapath.rebuild_pair_filter().expect("rebuild");
    assert!(!holds(&datapath), "the gone pair's bit is dropped");
    let run = xdp(&datapath, &packet6::udp(CLIENT, external, b"anew"));
    assert_eq!(run.packet, packet6::udp(CLIENT, POD_A, b"anew"));
    let flow = conntrack.get(&owner_key, 0).expect("a FLOW entry");
    let flow = lb_common::FlowValue::of(&flow);
    assert_eq!(
        (flow.frontend_addr, flow.frontend_port),
        (ipv6_words(*external.ip()), external.port())
    );
}

#[test]
fn ipv6_maglev_services_pick_the_backend_the_lookup_table_gives() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "maglev6").expect("pin dir");
    let mut datapath = Datapath::load(pins.path()).expect("loading the datapath");
    let pods: Vec<SocketAddrV6> = (0x10..0x13)
        .map(|host| {
            SocketAddrV6::new(
                Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, host),
                8080,
                0,
                0,
            )
        })
        .collect();
    for (id, pod) in (1..).zip(&pods) {
        let backend = Backend {
            addr: IpAddr::V6(*pod.ip()),
            port: pod.port(),
            proto: proto::TCP,
            flags: backend_flags::LOCAL,
        };
        datapath.put_backend(id, &backend).expect("backend");
    }
    let service = Service {
        id: 1,
        frontends: vec![node_port(NODE_PORT, proto::TCP)],
        backends: vec![1, 2, 3],
        flags: service_flags::MAGLEV,
        ..Default::default()
    };
    datapath.put_service(&service).expect("maglev service");
    let identities: Vec<String> = pods
        .iter()
        .map(|pod| format!("{}:{}/{}", pod.ip(), pod.port(), proto::TCP))
        .collect();
    // Three backends: the smallest size of the ladder with 100 slots each, 509.
    let table = lab::maglev_reference::table(&identities, 509);
    let mut cases = Vec::new();
    let mut reached = std::collections::BTreeSet::new();
    for port in 41000..41030u16 {
        let hash =
            lab::maglev_reference::flow_hash6(CLIENT_ADDR, NODE, port, NODE_PORT, proto::TCP);
        let pod = pods[table[hash as usize % table.len()]];
        reached.insert(pod);
        cases.push(case(
            "IPv6 Maglev new flow",
            tcp(client(port), FRONTEND, TcpFlags::SYN, b""),
            XDP_PASS,
            Expect::Bytes(tcp(client(port), pod, TcpFlags::SYN, b"")),
        ));
    }
    run_table(
        datapath.program_fd(program_names::XDP_LB).expect("lb_xdp"),
        &cases,
    );
    assert_eq!(reached.len(), 3, "30 flows reach all three backends");
    assert_eq!(datapath.events().expect("events")["maglev_fallback"], 0);
    assert_eq!(
        datapath.installed_services()[&1].maglev_size,
        Some(509),
        "the service's table size as the agent records it"
    );
}

/// The client of the SNAT flow of [`datapath_with_flows_to_err_about`].
const ICMP_REMOTE_CLIENT: SocketAddrV6 = SocketAddrV6::new(CLIENT_ADDR, 41000, 0, 0);

/// The datapath with flows for ICMPv6 errors to be about: from [`CLIENT`] to the local endpoint
/// (TCP and UDP), and from [`ICMP_REMOTE_CLIENT`] to the remote endpoint through SNAT.
fn datapath_with_flows_to_err_about(pins: &PinDir) -> Datapath {
    let mut datapath = datapath(pins);
    add_remote_service(&mut datapath);
    let xdp = datapath.program_fd(program_names::XDP_LB).expect("lb_xdp");
    run_table(
        xdp,
        &[
            case(
                "tcp flow to the local endpoint",
                tcp(CLIENT, FRONTEND, TcpFlags::SYN, b""),
                XDP_PASS,
                Expect::Bytes(tcp(CLIENT, POD_A, TcpFlags::SYN, b"")),
            ),
            case(
                "udp flow to the local endpoint",
                packet6::udp(CLIENT, FRONTEND, b"query"),
                XDP_PASS,
                Expect::Bytes(packet6::udp(CLIENT, POD_A, b"query")),
            ),
        ],
    );
    let syn = test_run(
        xdp,
        &tcp(ICMP_REMOTE_CLIENT, REMOTE_FRONTEND, TcpFlags::SYN, b""),
    )
    .expect("run");
    assert_ne!(syn.verdict, XDP_DROP, "the SNAT flow starts");
    assert_eq!(
        syn.packet[ETH_HDR_LEN..],
        tcp(
            SocketAddrV6::new(NODE, SNAT_PORT, 0, 0),
            REMOTE_POD,
            TcpFlags::SYN,
            b""
        )[ETH_HDR_LEN..],
        "SNATed to the node's IPv6 address and the one port of the range"
    );
    datapath
}

/// ICMPv6 errors about translated flows reach the host that sent the packet they quote, about
/// the packet as that host sent it (path MTU discovery through a NodePort depends on it): the
/// outer addresses, the quoted addresses and ports, a quoted UDP checksum and the ICMPv6
/// checksum (pseudo-header included) rewritten. Expected frames are built by etherparse from
/// the packets as sent, so every checksum is computed apart from the datapath.
#[test]
fn icmpv6_errors_about_translated_flows_reach_the_host_that_sent_the_quoted_packet() {
    let (remote_pod, remote_frontend) = (REMOTE_POD, REMOTE_FRONTEND);
    let router = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xfe);
    let too_big = (2, 0, 1280u32.to_be_bytes());
    let time_exceeded = (3, 0, [0; 4]);
    let port_unreachable = (1, 4, [0; 4]);
    // A quote of the IPv6 header and the first 8 transport bytes, what every rewrite touches.
    let quote = IPV6_HDR_LEN + 8;

    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "icmp6").expect("pin dir");
    let datapath = datapath_with_flows_to_err_about(&pins);
    let xdp = || datapath.program_fd(program_names::XDP_LB).expect("lb_xdp");
    let snat = SocketAddrV6::new(NODE, SNAT_PORT, 0, 0);
    let remote_client = ICMP_REMOTE_CLIENT;

    // About what tc sent for the local endpoint (from the frontend): to the endpoint, about
    // its packet as it sent it.
    let tcp_sent = tcp(FRONTEND, CLIENT, TcpFlags::ACK, &[7; 1400]);
    let tcp_own = tcp(POD_A, CLIENT, TcpFlags::ACK, &[7; 1400]);
    let udp_sent = packet6::udp(FRONTEND, CLIENT, b"answer");
    let udp_own = packet6::udp(POD_A, CLIENT, b"answer");
    let unknown = packet6::udp(FRONTEND, client(40999), b"answer");
    run_table(
        xdp(),
        &[
            case(
                "packet too big about a local endpoint's segment",
                packet6::icmpv6(router, NODE, too_big, &tcp_sent, quote),
                XDP_PASS,
                Expect::Bytes(packet6::icmpv6(
                    router,
                    *POD_A.ip(),
                    too_big,
                    &tcp_own,
                    quote,
                )),
            ),
            case(
                "time exceeded about a local endpoint's datagram (its checksum quoted)",
                packet6::icmpv6(router, NODE, time_exceeded, &udp_sent, quote),
                XDP_PASS,
                Expect::Bytes(packet6::icmpv6(
                    router,
                    *POD_A.ip(),
                    time_exceeded,
                    &udp_own,
                    quote,
                )),
            ),
            case(
                "about no tracked flow",
                packet6::icmpv6(router, NODE, time_exceeded, &unknown, quote),
                XDP_PASS,
                Expect::Unchanged,
            ),
            case(
                "a quote the payload length cuts short of 8 transport bytes (the rest in the frame)",
                {
                    let mut frame = packet6::icmpv6(router, NODE, time_exceeded, &udp_sent, quote);
                    let payload =
                        u16::from_be_bytes([frame[ETH_HDR_LEN + 4], frame[ETH_HDR_LEN + 5]]);
                    frame[ETH_HDR_LEN + 4..ETH_HDR_LEN + 6]
                        .copy_from_slice(&(payload - 4).to_be_bytes());
                    frame
                },
                XDP_PASS,
                Expect::Unchanged,
            ),
            case(
                "about a SNAT port no flow holds",
                packet6::icmpv6(
                    router,
                    NODE,
                    too_big,
                    &tcp(
                        SocketAddrV6::new(NODE, SNAT_PORT + 1, 0, 0),
                        remote_pod,
                        TcpFlags::ACK,
                        b"",
                    ),
                    quote,
                ),
                XDP_PASS,
                Expect::Unchanged,
            ),
            case(
                "neighbour solicitation: not an error",
                packet6::neighbour_solicitation(router, NODE),
                XDP_PASS,
                Expect::Unchanged,
            ),
        ],
    );

    // About the client's segment as it left from the SNAT port towards the remote endpoint:
    // to the client, about its segment to the frontend, from the frontend, back out of the NIC
    // it came in on with the client's MAC and one hop less.
    let request_sent = tcp(snat, remote_pod, TcpFlags::ACK, &[7; 1400]);
    let request = tcp(remote_client, remote_frontend, TcpFlags::ACK, &[7; 1400]);
    for (name, kind, from) in [
        (
            "packet too big from a router towards the endpoint",
            too_big,
            router,
        ),
        (
            "port unreachable from the endpoint's node",
            port_unreachable,
            *remote_pod.ip(),
        ),
    ] {
        let run = test_run(
            xdp(),
            &packet6::icmpv6(from, NODE, kind, &request_sent, quote),
        )
        .expect("run");
        let mut want = packet6::icmpv6(NODE, CLIENT_ADDR, kind, &request, quote);
        want[0..6].copy_from_slice(&CLIENT_MAC);
        want[6..12].copy_from_slice(&NODE_MAC);
        want[ETH_HDR_LEN + 7] -= 1;
        assert_eq!(run.verdict, XDP_TX, "{name}");
        assert_eq!(
            run.packet,
            want,
            "{name}:\n{}",
            lab::table::diff(&want, &run.packet)
        );
    }

    // About the remote endpoint's answer as this node sent it on to the client (from the
    // frontend): to the endpoint, about its answer to the SNAT port, from the SNAT address.
    let answer_sent = tcp(remote_frontend, remote_client, TcpFlags::ACK, &[9; 1400]);
    let answer = tcp(remote_pod, snat, TcpFlags::ACK, &[9; 1400]);
    let run = test_run(
        xdp(),
        &packet6::icmpv6(router, NODE, too_big, &answer_sent, quote),
    )
    .expect("run");
    assert_ne!(run.verdict, XDP_DROP);
    let mut want = packet6::icmpv6(NODE, *remote_pod.ip(), too_big, &answer, quote);
    // Where the FIB sends it (the MACs, the hop limit with them) is the kernel's to say.
    want[..12].copy_from_slice(&run.packet[..12]);
    want[ETH_HDR_LEN + 7] = run.packet[ETH_HDR_LEN + 7];
    assert_eq!(
        run.packet,
        want,
        "to the remote endpoint:\n{}",
        lab::table::diff(&want, &run.packet)
    );

    let events = datapath.events().expect("events");
    assert_eq!(events["icmp_error_translated"], 5, "{events:?}");
}

/// The same errors with extension headers before the ICMPv6 header, in the packet they quote
/// (the datapath keeps a client's extension headers on the packets it translates), or both;
/// the quoted transport header is found behind them and rewritten, every checksum with it. A
/// quote of a later fragment, or one that ends inside its extension headers, holds no ports:
/// untouched, as is a Multicast Listener Report behind its Hop-by-Hop header.
#[test]
fn icmpv6_errors_with_extension_headers_reach_the_host_that_sent_the_quoted_packet() {
    let router = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xfe);
    let too_big = (2, 0, 1280u32.to_be_bytes());
    let time_exceeded = (3, 0, [0; 4]);
    let options =
        |frame: &[u8], words| packet6::with_options_header(frame, next_header::DEST_OPTS, words);
    let hop_by_hop = |frame: &[u8]| packet6::with_options_header(frame, next_header::HOP_BY_HOP, 1);
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "icmp6x").expect("pin dir");
    let datapath = datapath_with_flows_to_err_about(&pins);
    let xdp = || datapath.program_fd(program_names::XDP_LB).expect("lb_xdp");

    // What tc sent for the local endpoint (from the frontend), and the same as the endpoint
    // sent it.
    let tcp_sent = options(&tcp(FRONTEND, CLIENT, TcpFlags::ACK, &[7; 1400]), 1);
    let tcp_own = options(&tcp(POD_A, CLIENT, TcpFlags::ACK, &[7; 1400]), 1);
    let udp_sent = options(&packet6::udp(FRONTEND, CLIENT, b"answer"), 2);
    let udp_own = options(&packet6::udp(POD_A, CLIENT, b"answer"), 2);
    let [first_sent, later_sent] =
        packet6::fragments(&packet6::udp(FRONTEND, CLIENT, &[5; 1400]), 1232, 91);
    let [first_own, _] = packet6::fragments(&packet6::udp(POD_A, CLIENT, &[5; 1400]), 1232, 91);
    let quote = |about: &[u8]| {
        let (_, transport_at) = packet6::transport(about);
        transport_at - ETH_HDR_LEN + 8
    };
    let error =
        |kind, dst, about: &[u8], quote_len| packet6::icmpv6(router, dst, kind, about, quote_len);
    let mld_report = hop_by_hop(&packet6::icmpv6(
        router,
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x16),
        (143, 0, [0, 0, 0, 1]),
        &udp_sent,
        0,
    ));
    run_table(
        xdp(),
        &[
            case(
                "packet too big quoting a segment with Destination Options",
                error(too_big, NODE, &tcp_sent, quote(&tcp_sent)),
                XDP_PASS,
                Expect::Bytes(error(too_big, *POD_A.ip(), &tcp_own, quote(&tcp_own))),
            ),
            case(
                "time exceeded behind a Hop-by-Hop header, quoting a datagram with 16 bytes of \
                 Destination Options (its checksum quoted)",
                hop_by_hop(&error(time_exceeded, NODE, &udp_sent, quote(&udp_sent))),
                XDP_PASS,
                Expect::Bytes(hop_by_hop(&error(
                    time_exceeded,
                    *POD_A.ip(),
                    &udp_own,
                    quote(&udp_own),
                ))),
            ),
            case(
                "packet too big quoting the first fragment of a datagram",
                error(too_big, NODE, &first_sent, quote(&first_sent)),
                XDP_PASS,
                Expect::Bytes(error(too_big, *POD_A.ip(), &first_own, quote(&first_own))),
            ),
            case(
                "quoting a later fragment: no ports",
                error(too_big, NODE, &later_sent, IPV6_HDR_LEN + 16),
                XDP_PASS,
                Expect::Unchanged,
            ),
            case(
                "the quote ends inside its Destination Options",
                error(time_exceeded, NODE, &udp_sent, IPV6_HDR_LEN + 8),
                XDP_PASS,
                Expect::Unchanged,
            ),
            case(
                "a multicast listener report behind Hop-by-Hop is no error",
                mld_report,
                XDP_PASS,
                Expect::Unchanged,
            ),
        ],
    );

    // About the client's segment (with Destination Options) as it left from the SNAT port: to
    // the client, about its segment to the frontend, behind the same Hop-by-Hop header.
    let snat = SocketAddrV6::new(NODE, SNAT_PORT, 0, 0);
    let request_sent = options(&tcp(snat, REMOTE_POD, TcpFlags::ACK, &[7; 1400]), 1);
    let request = options(
        &tcp(
            ICMP_REMOTE_CLIENT,
            REMOTE_FRONTEND,
            TcpFlags::ACK,
            &[7; 1400],
        ),
        1,
    );
    let run = test_run(
        xdp(),
        &hop_by_hop(&error(too_big, NODE, &request_sent, quote(&request_sent))),
    )
    .expect("run");
    let mut want = hop_by_hop(&packet6::icmpv6(
        NODE,
        CLIENT_ADDR,
        too_big,
        &request,
        quote(&request),
    ));
    want[0..6].copy_from_slice(&CLIENT_MAC);
    want[6..12].copy_from_slice(&NODE_MAC);
    want[ETH_HDR_LEN + 7] -= 1;
    assert_eq!(run.verdict, XDP_TX);
    assert_eq!(
        run.packet,
        want,
        "to the client:\n{}",
        lab::table::diff(&want, &run.packet)
    );
    assert!(
        packet6::transport_checksum_ok(&run.packet),
        "ICMPv6 checksum"
    );

    let events = datapath.events().expect("events");
    assert_eq!(events["icmp_error_translated"], 4, "{events:?}");
}

/// Fragments of a datagram to a local endpoint: the first one is translated as a whole datagram
/// would be (its transport checksum covers the whole datagram and its new addresses), the later
/// one, which has no ports, gets the first one's addresses; both count for the service. The
/// endpoint's answer, fragmented too, leaves tc egress from the frontend. A later fragment of a
/// datagram whose first fragment never came passes untouched, counted. Expected fragments are
/// cut from whole datagrams etherparse built, and their transport checksum is checked whole.
#[test]
fn later_ipv6_fragments_follow_their_first_fragment_to_a_local_endpoint_and_back() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "frag6").expect("pin dir");
    let datapath = datapath(&pins);
    let payload = [0x5a; 600];
    let to_service = packet6::fragments(&packet6::udp(CLIENT, FRONTEND, &payload), 304, 7);
    let to_pod = packet6::fragments(&packet6::udp(CLIENT, POD_A, &payload), 304, 7);
    assert!(packet6::transport_checksum_ok(&packet6::reassembled(
        &to_pod
    )));
    let unknown = packet6::fragments(&packet6::udp(CLIENT, FRONTEND, &payload), 304, 8)[1].clone();
    run_table(
        datapath.program_fd(program_names::XDP_LB).expect("lb_xdp"),
        &[
            case(
                "first fragment",
                to_service[0].clone(),
                XDP_PASS,
                Expect::Bytes(to_pod[0].clone()),
            ),
            case(
                "later fragment",
                to_service[1].clone(),
                XDP_PASS,
                Expect::Bytes(to_pod[1].clone()),
            ),
            case(
                "later fragment of another datagram",
                unknown,
                XDP_PASS,
                Expect::Unchanged,
            ),
        ],
    );
    assert_eq!(datapath.events().expect("events")["pass_fragment"], 1);
    let udp = datapath.service_counter(2).expect("counter");
    let frame_bytes = (to_service[0].len() + to_service[1].len()) as u64;
    assert_eq!(
        (udp.packets, udp.bytes, udp.new_flows),
        (2, frame_bytes, 1),
        "both fragments counted for the service, the unknown one for none: {udp:?}"
    );

    let answer = packet6::fragments(&packet6::udp(POD_A, CLIENT, &payload), 304, 0xdead_beef);
    let translated =
        packet6::fragments(&packet6::udp(FRONTEND, CLIENT, &payload), 304, 0xdead_beef);
    assert!(packet6::transport_checksum_ok(&packet6::reassembled(
        &translated
    )));
    let unknown_answer =
        packet6::fragments(&packet6::udp(POD_A, CLIENT, &payload), 304, 0xdead_bee0)[1].clone();
    run_table(
        datapath.program_fd(program_names::TC_EGRESS).expect("tc"),
        &[
            case(
                "first fragment of the answer",
                answer[0].clone(),
                TC_ACT_OK,
                Expect::Bytes(translated[0].clone()),
            ),
            case(
                "later fragment of the answer",
                answer[1].clone(),
                TC_ACT_OK,
                Expect::Bytes(translated[1].clone()),
            ),
            case(
                "later fragment of an answer whose first fragment never came",
                unknown_answer,
                TC_ACT_OK,
                Expect::Unchanged,
            ),
        ],
    );
    assert_eq!(datapath.events().expect("events")["pass_fragment"], 2);
}

/// Fragments through SNAT, both ways: a client's fragmented segment to a remote endpoint leaves
/// from the node's address and SNAT port (the later fragment with the first one's addresses),
/// and the endpoint's fragmented answer goes back to the client from the frontend, out of the
/// NIC it came in on with the client's MAC, one hop less to live.
#[test]
fn later_ipv6_fragments_follow_their_first_fragment_through_snat_both_ways() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "frag6snat").expect("pin dir");
    let mut datapath = datapath(&pins);
    add_remote_service(&mut datapath);
    let xdp = || datapath.program_fd(program_names::XDP_LB).expect("lb_xdp");
    let remote_client = client(41000);
    let snat = SocketAddrV6::new(NODE, SNAT_PORT, 0, 0);
    let syn = test_run(
        xdp(),
        &tcp(remote_client, REMOTE_FRONTEND, TcpFlags::SYN, b""),
    )
    .expect("run");
    assert_ne!(syn.verdict, XDP_DROP, "the SNAT flow starts");

    let payload = [0xa5; 600];
    let request = packet6::fragments(
        &tcp(remote_client, REMOTE_FRONTEND, TcpFlags::ACK, &payload),
        304,
        11,
    );
    let expected = packet6::fragments(&tcp(snat, REMOTE_POD, TcpFlags::ACK, &payload), 304, 11);
    assert!(packet6::transport_checksum_ok(&packet6::reassembled(
        &expected
    )));
    for (index, fragment) in request.iter().enumerate() {
        let run = test_run(xdp(), fragment).expect("run");
        assert_ne!(run.verdict, XDP_DROP, "request fragment {index}");
        // The MACs and hop limit are the way out's (the FIB's, or the stack's): the rest is
        // the translated fragment.
        let mut want = expected[index].clone();
        want[..12].copy_from_slice(&run.packet[..12]);
        want[ETH_HDR_LEN + 7] = run.packet[ETH_HDR_LEN + 7];
        assert_eq!(
            run.packet,
            want,
            "request fragment {index}:\n{}",
            lab::table::diff(&want, &run.packet)
        );
    }

    let answer = packet6::fragments(&tcp(REMOTE_POD, snat, TcpFlags::ACK, &payload), 304, 12);
    let mut expected = packet6::fragments(
        &tcp(REMOTE_FRONTEND, remote_client, TcpFlags::ACK, &payload),
        304,
        12,
    );
    assert!(packet6::transport_checksum_ok(&packet6::reassembled(
        &expected
    )));
    for (index, fragment) in answer.iter().enumerate() {
        let run = test_run(xdp(), fragment).expect("run");
        assert_eq!(run.verdict, XDP_TX, "answer fragment {index}");
        let want = &mut expected[index];
        want[0..6].copy_from_slice(&CLIENT_MAC);
        want[6..12].copy_from_slice(&NODE_MAC);
        want[ETH_HDR_LEN + 7] -= 1;
        assert_eq!(
            run.packet,
            *want,
            "answer fragment {index}:\n{}",
            lab::table::diff(want, &run.packet)
        );
    }
    let remote = datapath.service_counter(5).expect("counter");
    assert_eq!(
        remote.packets, 5,
        "the SYN and both fragments each way count for the service: {remote:?}"
    );
}

/// The IPv6 twin of datapath_table's flow-cache RST test: steady segments are served from XDP's
/// flow cache, which leaves the flow's entry behind on how far its client has sent by no more
/// than the cache's sequence window, so the client's RST after 100 KiB of data ends the flow
/// and reaches the pod.
#[test]
fn a_clients_rst_after_data_served_from_the_ipv6_flow_cache_ends_its_flow() {
    let flow = CacheFlow6::open("fcrst6");
    let sent = lab::table::send_past_the_entry(
        CLIENT_ISN + 1,
        |seq, data| flow.xdp(&[to_pod(CLIENT, TcpFlags::ACK, seq, data)]),
        || flow.entry().seq_next,
    );
    flow.xdp(&[to_pod(CLIENT, TcpFlags::RST, sent, b"")]);
    lab::table::assert_rst_ended_the_flow(
        &flow.datapath,
        Some(flow.entry().state),
        "the client's rst",
    );
}

/// The IPv6 twin of datapath_table's answer-cache RST test: the steady answers of a local
/// endpoint are served from tc egress's answer cache, which leaves the flow's entry behind on how
/// far the pod has sent by no more than the cache's sequence window, so the pod's RST after
/// 100 KiB of data ends the flow and reaches the client from the frontend.
#[test]
fn a_pods_rst_after_answers_served_from_the_ipv6_answer_cache_ends_its_flow() {
    let flow = CacheFlow6::open("fcans6");
    flow.xdp(&[to_pod(CLIENT, TcpFlags::ACK, CLIENT_ISN + 1, b"")]);
    let sent = lab::table::send_past_the_entry(
        POD_ISN + 1,
        |seq, data| flow.tc(&[to_client(CLIENT, TcpFlags::ACK, seq, data)]),
        || lb_common::Flow6Value::of(&flow.entry()).backend_seq_next,
    );
    flow.tc(&[to_client(CLIENT, TcpFlags::RST, sent, b"")]);
    lab::table::assert_rst_ended_the_flow(
        &flow.datapath,
        Some(flow.entry().state),
        "the pod's rst",
    );
}

/// The IPv6 twin of datapath_table's flow-cache gate test: after more misses than its gate
/// allows, a flow XDP's IPv6 flow cache held takes the full path for the gate's closed time,
/// then the cache serves it again.
#[test]
fn the_ipv6_flow_cache_stands_aside_while_it_misses_more_than_it_hits() {
    let flow = CacheFlow6::open("fcgate6");
    lab::table::assert_gate_stands_aside(
        CLIENT_ISN + 1,
        |seq, data| flow.xdp(&[to_pod(CLIENT, TcpFlags::ACK, seq, data)]),
        || flow.entry().seq_next,
        |i| {
            let other = client(41_000 + u16::try_from(i).expect("port"));
            flow.xdp(&[
                to_pod(other, TcpFlags::SYN, 500, b""),
                to_pod(other, TcpFlags::ACK, 501, b""),
            ]);
        },
        || lab::table::cache_counts(&flow.datapath, "xdp", "IPv6", "TCP"),
    );
}

/// The IPv6 twin of datapath_table's answer-cache gate test.
#[test]
fn the_ipv6_answer_cache_stands_aside_while_it_misses_more_than_it_hits() {
    let flow = CacheFlow6::open("ansgate6");
    flow.xdp(&[to_pod(CLIENT, TcpFlags::ACK, CLIENT_ISN + 1, b"")]);
    lab::table::assert_gate_stands_aside(
        POD_ISN + 1,
        |seq, data| flow.tc(&[to_client(CLIENT, TcpFlags::ACK, seq, data)]),
        || lb_common::Flow6Value::of(&flow.entry()).backend_seq_next,
        |i| {
            let other = client(41_000 + u16::try_from(i).expect("port"));
            flow.xdp(&[to_pod(other, TcpFlags::SYN, 500, b"")]);
            flow.tc(&[to_client(other, TcpFlags::ACK, 80_000, b"")]);
        },
        || lab::table::cache_counts(&flow.datapath, "tc", "IPv6", "TCP"),
    );
}

/// The client's and the pod's initial sequence numbers in the cache tests' flow.
const CLIENT_ISN: u32 = 7000;
const POD_ISN: u32 = 90_000;

/// A cache test's flow: CLIENT's to pod A through FRONTEND, opened (the client's SYN through
/// XDP, the pod's SYN-ACK through tc egress) in a datapath of its own, with the test's thread
/// kept on its CPU (the caches are per CPU).
struct CacheFlow6 {
    datapath: Datapath,
    _pins: PinDir,
    _lab: Lab,
}

impl CacheFlow6 {
    fn open(name: &str) -> Self {
        lab::table::stay_on_this_cpu();
        let lab = Lab::new().expect("lab");
        let pins = PinDir::new(&lab, name).expect("pin dir");
        let flow = Self {
            datapath: datapath(&pins),
            _pins: pins,
            _lab: lab,
        };
        flow.xdp(&[to_pod(CLIENT, TcpFlags::SYN, CLIENT_ISN, b"")]);
        flow.tc(&[to_client(CLIENT, TcpFlags::SYN_ACK, POD_ISN, b"")]);
        flow
    }

    fn xdp(&self, cases: &[Case]) {
        run_table(
            self.datapath
                .program_fd(program_names::XDP_LB)
                .expect("xdp"),
            cases,
        );
    }

    fn tc(&self, cases: &[Case]) {
        run_table(
            self.datapath
                .program_fd(program_names::TC_EGRESS)
                .expect("tc"),
            cases,
        );
    }

    /// CLIENT's FLOW entry.
    fn entry(&self) -> lb_common::Ct6Value {
        let key = flow_key(ipv6_words(CLIENT_ADDR), CLIENT.port(), proto::TCP);
        self.datapath.conntrack6_entry(&key).expect("FLOW entry")
    }
}

/// `client`'s segment to FRONTEND, through XDP: DNATed to pod A.
fn to_pod(client: SocketAddrV6, flags: TcpFlags, seq: u32, payload: &[u8]) -> Case {
    case(
        "client segment",
        packet6::tcp(client, FRONTEND, flags, seq, payload),
        XDP_PASS,
        Expect::Bytes(packet6::tcp(client, POD_A, flags, seq, payload)),
    )
}

/// Pod A's answer to `client`, through tc egress: from FRONTEND.
fn to_client(client: SocketAddrV6, flags: TcpFlags, seq: u32, payload: &[u8]) -> Case {
    case(
        "pod segment",
        packet6::tcp(POD_A, client, flags, seq, payload),
        TC_ACT_OK,
        Expect::Bytes(packet6::tcp(FRONTEND, client, flags, seq, payload)),
    )
}

/// The IPv6 twin of datapath_table's test of a flow's end on two CPUs: the client's FIN or
/// RST, or its next connection after the pod's RST, empties the flow's slots in XDP's IPv6 flow
/// cache on every CPU, so the next connection's segments reach its new endpoint from each.
#[test]
fn an_ipv6_flows_end_empties_its_flow_cache_slots_on_every_cpu() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "fccpus6").expect("pin dir");
    let mut datapath = datapath(&pins);
    let pod_b = Backend {
        addr: IpAddr::V6(*POD_B.ip()),
        port: POD_B.port(),
        proto: proto::TCP,
        flags: backend_flags::LOCAL,
    };
    datapath.put_backend(7, &pod_b).expect("backend");
    lab::table::assert_a_flows_end_empties_its_slots_on_every_cpu(
        &cache_flows(),
        &mut datapath,
        |datapath, pod| {
            let service = Service {
                id: 1,
                frontends: vec![node_port(NODE_PORT, proto::TCP)],
                backends: vec![if pod == POD_A { 1 } else { 7 }],
                ..Default::default()
            };
            datapath.put_service(&service).expect("service");
        },
    );
}

/// The IPv6 twin of datapath_table's test of a superseded flow's answer slots on two CPUs.
#[test]
fn an_ipv6_superseded_flows_answer_slots_go_on_every_cpu() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "fcanswers6").expect("pin dir");
    let datapath = datapath(&pins);
    lab::table::assert_a_superseded_flows_answer_slots_go_on_every_cpu(&cache_flows(), &datapath);
}

/// A second local endpoint, for the tests that move a service's flows from pod A to it.
const POD_B: SocketAddrV6 = SocketAddrV6::new(
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x11),
    8080,
    0,
    0,
);

fn cache_flows() -> lab::table::CacheFlows<SocketAddrV6> {
    lab::table::CacheFlows {
        client,
        frontend: FRONTEND,
        pods: [POD_A, POD_B],
        tcp: packet6::tcp_acking,
        slot_cpus: |datapath, client| {
            let key = flow_key(ipv6_words(*client.ip()), client.port(), proto::TCP);
            let entry = datapath.conntrack6_entry(&key).expect("FLOW entry");
            let flow = lb_common::Flow6Value::of(&entry);
            (flow.client_slot_cpus, flow.answer_slot_cpus)
        },
    }
}

/// The IPv6 twin of datapath_table's UDP cache test: the datagrams of a UDP flow to a local
/// endpoint are served from XDP's IPv6 flow cache, and its answers from tc egress's, once a
/// datagram of the live flow has filled each slot; when the endpoint leaves the backends map,
/// the next datagram takes the full path and selects again.
#[test]
fn ipv6_udp_datagrams_are_served_from_the_flow_caches_until_their_endpoint_leaves() {
    const POD_B: SocketAddrV6 = SocketAddrV6::new(
        Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x11),
        8080,
        0,
        0,
    );
    lab::table::stay_on_this_cpu();
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "udpcache6").expect("pin dir");
    let mut datapath = datapath(&pins);
    let run = |datapath: &Datapath, program, cases: &[Case]| {
        run_table(datapath.program_fd(program).expect("program"), cases);
    };
    let datagram_to = |pod| {
        case(
            "the client's datagram",
            packet6::udp(CLIENT, FRONTEND, b"q"),
            XDP_PASS,
            Expect::Bytes(packet6::udp(CLIENT, pod, b"q")),
        )
    };
    let answer = || {
        case(
            "pod A's answer",
            packet6::udp(POD_A, CLIENT, b"a"),
            TC_ACT_OK,
            Expect::Bytes(packet6::udp(FRONTEND, CLIENT, b"a")),
        )
    };
    let looks = |datapath: &Datapath, hook| {
        let counts = lab::table::cache_counts(datapath, hook, "IPv6", "UDP");
        (counts.hits, counts.misses)
    };
    let xdp = program_names::XDP_LB;
    let tc = program_names::TC_EGRESS;

    run(&datapath, xdp, &[datagram_to(POD_A), datagram_to(POD_A)]);
    assert_eq!(
        looks(&datapath, "xdp"),
        (0, 2),
        "the new flow, then the fill"
    );
    run(&datapath, xdp, &[datagram_to(POD_A), datagram_to(POD_A)]);
    assert_eq!(looks(&datapath, "xdp"), (2, 2), "served from the slot");
    run(&datapath, tc, &[answer(), answer(), answer()]);
    assert_eq!(
        looks(&datapath, "tc"),
        (2, 1),
        "the fill, then served from the slot"
    );

    let pod_b = Backend {
        addr: IpAddr::V6(*POD_B.ip()),
        port: POD_B.port(),
        proto: proto::UDP,
        flags: backend_flags::LOCAL,
    };
    datapath.put_backend(6, &pod_b).expect("backend");
    datapath
        .put_service(&Service {
            id: 2,
            frontends: vec![node_port(NODE_PORT, proto::UDP)],
            backends: vec![6],
            ..Default::default()
        })
        .expect("service");
    datapath.remove_backend(2).expect("remove backend");
    run(&datapath, xdp, &[datagram_to(POD_B)]);
    assert_eq!(
        looks(&datapath, "xdp"),
        (2, 3),
        "pod A gone: the slot serves no more"
    );
    run(&datapath, xdp, &[datagram_to(POD_B), datagram_to(POD_B)]);
    assert_eq!(
        looks(&datapath, "xdp"),
        (3, 4),
        "the flow to pod B fills the slot anew"
    );
}

/// The IPv6 twin of datapath_table's test of a cached UDP flow against the source ranges and
/// the frontend in force: a datagram the slot would serve is dropped once its client is outside
/// the service's loadBalancerSourceRanges, and a flow whose frontend is gone is not translated.
#[test]
fn an_ipv6_udp_flow_served_from_the_flow_cache_meets_the_source_ranges_and_frontend_in_force() {
    lab::table::stay_on_this_cpu();
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "udprange6").expect("pin dir");
    let mut datapath = datapath(&pins);
    let load_balancer_ip =
        SocketAddrV6::new(Ipv6Addr::new(0x2001, 0xdb8, 0x51, 0, 0, 0, 0, 20), 53, 0, 0);
    let admitted = SocketAddrV6::new(
        Ipv6Addr::new(0x2001, 0xdb8, 0x2, 0, 0, 0, 0, 7),
        41000,
        0,
        0,
    );
    let load_balancer = |range: Ipv6Addr| Service {
        id: 5,
        frontends: vec![Frontend {
            addr: IpAddr::V6(*load_balancer_ip.ip()),
            port: load_balancer_ip.port(),
            proto: proto::UDP,
            kind: service_flags::LOAD_BALANCER,
        }],
        backends: vec![2],
        flags: service_flags::SOURCE_RANGES,
        source_ranges: [(IpAddr::V6(range), 64)].into(),
        ..Default::default()
    };
    let to_pod = |from: SocketAddrV6, to: SocketAddrV6| {
        case(
            "a datagram to the pod",
            packet6::udp(from, to, b"q"),
            XDP_PASS,
            Expect::Bytes(packet6::udp(from, POD_A, b"q")),
        )
    };
    let run = |datapath: &Datapath, cases: &[Case]| {
        run_table(
            datapath.program_fd(program_names::XDP_LB).expect("lb_xdp"),
            cases,
        );
    };
    let hits = |datapath: &Datapath| lab::table::cache_counts(datapath, "xdp", "IPv6", "UDP").hits;

    datapath
        .put_service(&load_balancer(Ipv6Addr::new(
            0x2001, 0xdb8, 0x2, 0, 0, 0, 0, 0,
        )))
        .expect("service");
    let flow = to_pod(admitted, load_balancer_ip);
    run(&datapath, &[flow.clone(), flow.clone(), flow.clone()]);
    assert_eq!(
        hits(&datapath),
        1,
        "the third datagram served from the slot"
    );
    datapath
        .put_service(&load_balancer(Ipv6Addr::new(
            0x2001, 0xdb8, 0x3, 0, 0, 0, 0, 0,
        )))
        .expect("ranges narrowed");
    run(
        &datapath,
        &[case(
            "a datagram from outside the ranges",
            packet6::udp(admitted, load_balancer_ip, b"q"),
            XDP_DROP,
            Expect::Unchanged,
        )],
    );
    assert_eq!(
        (
            hits(&datapath),
            datapath.events().expect("events")["drop_source_range"]
        ),
        (2, 1),
        "dropped on the slot's hit, by the ranges in force"
    );

    let flow = to_pod(CLIENT, FRONTEND);
    run(&datapath, &[flow.clone(), flow.clone(), flow.clone()]);
    assert_eq!(hits(&datapath), 3, "the NodePort flow served from the slot");
    datapath.remove_service(2).expect("remove");
    run(
        &datapath,
        &[case(
            "a datagram of the flow, its frontend gone",
            packet6::udp(CLIENT, FRONTEND, b"q"),
            XDP_PASS,
            Expect::Unchanged,
        )],
    );
}

/// A lab with the node's namespace, IPv6 on and the node's address on its loopback, and a pin
/// directory named `pins`.
fn node_lab(pins: &str) -> (Lab, Host, PinDir) {
    let mut lab = Lab::new().expect("lab");
    let node = lab.host("node").expect("host");
    node.enable_ipv6().expect("IPv6");
    node.addr6("lo", &format!("{NODE}/128"))
        .expect("node address");
    let pins = PinDir::new(&lab, pins).expect("pin dir");
    (lab, node, pins)
}
