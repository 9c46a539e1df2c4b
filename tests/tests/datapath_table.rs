//! The service datapath through BPF_PROG_TEST_RUN, table-driven: input packet, expected verdict,
//! expected output bytes (checksums included, computed from scratch by etherparse).

use std::net::{Ipv4Addr, SocketAddrV4};

use lab::{
    lab::{Host, Lab, PinDir},
    packet::{self, TcpFlags},
    peer::NodeConnection,
    table::{Case, Expect, run_table, run_table_forwarded_from},
};
use lb_common::{proto, service_flags};
use lb_userspace::{
    compile::model::{Backend, Frontend, Service},
    datapath::Datapath,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_OK: u32 = 0;

const NODE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const NODE_PORT: u16 = 30080;
const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 40000);
const FRONTEND: SocketAddrV4 = SocketAddrV4::new(NODE, NODE_PORT);
const POD_A: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 10), 8080);
const POD_B: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 11), 8080);
/// A frontend whose service has no backend.
const EMPTY_FRONTEND: SocketAddrV4 = SocketAddrV4::new(NODE, 30090);
/// IPv4 options: NOP NOP NOP EOL, then a router alert, then NOP NOP NOP EOL.
/// The host side of a pod's veth, which what a pod sends comes through.
const POD_VETH: u32 = 7;
/// The node's address on the pods' side of its routes.
const NODE_ON_PODS_SIDE: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
/// A host that is neither client nor endpoint.
const ELSEWHERE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 9);
const IP_OPTIONS: [u8; 12] = [1, 1, 1, 0, 0x94, 4, 0, 0, 1, 1, 1, 0];

fn backend(addr: SocketAddrV4, protocol: u8) -> Backend {
    Backend {
        addr: std::net::IpAddr::V4(*addr.ip()),
        port: addr.port(),
        proto: protocol,
        flags: lb_common::backend_flags::LOCAL,
    }
}

fn node_port(protocol: u8) -> Frontend {
    Frontend {
        addr: NODE.into(),
        port: NODE_PORT,
        proto: protocol,
        kind: service_flags::NODE_PORT,
    }
}

/// A datapath with: TCP and UDP NodePort services on 203.0.113.1:30080 whose backends are given,
/// and a TCP service on :30090 with no backend. Backends: 1 = pod A TCP, 2 = pod B TCP,
/// 3 = pod A UDP.
fn datapath(pins: &PinDir, tcp_backends: Vec<u32>) -> Datapath {
    let mut datapath = Datapath::load(pins.path()).expect("loading the datapath");
    datapath
        .put_backend(1, &backend(POD_A, proto::TCP))
        .expect("backend");
    datapath
        .put_backend(2, &backend(POD_B, proto::TCP))
        .expect("backend");
    datapath
        .put_backend(3, &backend(POD_A, proto::UDP))
        .expect("backend");
    let tcp = Service {
        id: 1,
        frontends: vec![node_port(proto::TCP)],
        backends: tcp_backends,
        affinity_timeout_s: 0,
        ..Default::default()
    };
    let udp = Service {
        id: 2,
        frontends: vec![node_port(proto::UDP)],
        backends: vec![3],
        affinity_timeout_s: 0,
        ..Default::default()
    };
    let empty = Service {
        id: 3,
        frontends: vec![Frontend {
            port: EMPTY_FRONTEND.port(),
            ..node_port(proto::TCP)
        }],
        backends: vec![],
        affinity_timeout_s: 0,
        ..Default::default()
    };
    let empty_udp = Service {
        id: 4,
        frontends: vec![Frontend {
            port: EMPTY_FRONTEND.port(),
            ..node_port(proto::UDP)
        }],
        backends: vec![],
        affinity_timeout_s: 0,
        ..Default::default()
    };
    for service in [&tcp, &udp, &empty, &empty_udp] {
        datapath.put_service(service).expect("service");
    }
    datapath
}

fn case(name: &'static str, input: Vec<u8>, verdict: u32, output: Expect) -> Case {
    Case {
        name,
        input,
        verdict,
        output,
    }
}

fn with_zero_udp_checksum(frame: &[u8]) -> Vec<u8> {
    let mut out = frame.to_vec();
    let udp = packet::ETH_HDR_LEN + 20;
    out[udp + 6..udp + 8].copy_from_slice(&[0, 0]);
    out
}

#[test]
fn xdp_dnats_service_traffic_and_passes_everything_else_untouched() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "xdp").expect("pin dir");
    let datapath = datapath(&pins, vec![1]);
    let to_pod_a = |flags, payload: &[u8]| packet::tcp(CLIENT, POD_A, flags, payload);
    let syn = packet::tcp(CLIENT, FRONTEND, TcpFlags::SYN, b"");
    let udp = packet::udp(CLIENT, FRONTEND, b"query");
    let to_ssh = packet::tcp(CLIENT, SocketAddrV4::new(NODE, 22), TcpFlags::SYN, b"");
    let cases = vec![
        case(
            "tcp syn, new flow",
            syn.clone(),
            XDP_PASS,
            Expect::Bytes(to_pod_a(TcpFlags::SYN, b"")),
        ),
        case(
            "tcp ack, established",
            packet::tcp(CLIENT, FRONTEND, TcpFlags::ACK, b"GET / HTTP/1.1\r\n"),
            XDP_PASS,
            Expect::Bytes(to_pod_a(TcpFlags::ACK, b"GET / HTTP/1.1\r\n")),
        ),
        case(
            "tcp fin, established",
            packet::tcp(CLIENT, FRONTEND, TcpFlags::FIN_ACK, b""),
            XDP_PASS,
            Expect::Bytes(to_pod_a(TcpFlags::FIN_ACK, b"")),
        ),
        case(
            "udp, new flow",
            udp.clone(),
            XDP_PASS,
            Expect::Bytes(packet::udp(CLIENT, POD_A, b"query")),
        ),
        case(
            "udp without checksum keeps none",
            with_zero_udp_checksum(&udp),
            XDP_PASS,
            Expect::Bytes(with_zero_udp_checksum(&packet::udp(
                CLIENT, POD_A, b"query",
            ))),
        ),
        case(
            "tcp syn with ip options",
            packet::with_ip_options(
                &packet::tcp(
                    SocketAddrV4::new(*CLIENT.ip(), 40001),
                    FRONTEND,
                    TcpFlags::SYN,
                    b"",
                ),
                &IP_OPTIONS,
            ),
            XDP_PASS,
            Expect::Bytes(packet::with_ip_options(
                &packet::tcp(
                    SocketAddrV4::new(*CLIENT.ip(), 40001),
                    POD_A,
                    TcpFlags::SYN,
                    b"",
                ),
                &IP_OPTIONS,
            )),
        ),
        case(
            "miss: other port",
            packet::tcp(CLIENT, SocketAddrV4::new(NODE, 22), TcpFlags::SYN, b""),
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "miss: other address",
            packet::tcp(
                CLIENT,
                SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 2), NODE_PORT),
                TcpFlags::SYN,
                b"",
            ),
            XDP_PASS,
            Expect::Unchanged,
        ),
        // What no frontend has passes before the full parse: only its IP header is judged.
        case(
            "miss: udp to another port",
            packet::udp(CLIENT, SocketAddrV4::new(NODE, 53), b"query"),
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "miss: a tcp data offset shorter than its header, the stack's to judge",
            with_tcp_data_offset(&to_ssh, 4),
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "miss: an ip total length past the frame is dropped",
            with_ip_header(&to_ssh, |ip| {
                ip[2..4].copy_from_slice(&200u16.to_be_bytes())
            }),
            XDP_DROP,
            Expect::Unchanged,
        ),
        case(
            "miss: ip options",
            packet::with_ip_options(&to_ssh, &IP_OPTIONS),
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "miss: a first fragment",
            packet::as_fragment(
                &packet::udp(CLIENT, SocketAddrV4::new(NODE, 53), b"query"),
                0,
                true,
            ),
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "non-ip: arp",
            packet::non_ip(0x0806, 28),
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "ipv6 frame, no ipv6 frontend: the ipv6 programs are not loaded, passed untouched",
            packet::non_ip(0x86dd, 60),
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "icmp to the frontend address",
            packet::icmp_echo(*CLIENT.ip(), NODE),
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "first fragment to a frontend",
            packet::as_fragment(&udp, 0, true),
            XDP_PASS,
            Expect::Bytes(packet::as_fragment(
                &packet::udp(CLIENT, POD_A, b"query"),
                0,
                true,
            )),
        ),
        case(
            "later fragment to a frontend: the first one's addresses",
            packet::as_fragment(&udp, 100, false),
            XDP_PASS,
            Expect::Bytes(with_ip_header(
                &packet::as_fragment(&udp, 100, false),
                |ip| ip[16..20].copy_from_slice(&POD_A.ip().octets()),
            )),
        ),
        case(
            "truncated tcp header",
            syn[..packet::ETH_HDR_LEN + 20 + 12].to_vec(),
            XDP_DROP,
            Expect::Unchanged,
        ),
        case(
            "truncated ip header",
            syn[..packet::ETH_HDR_LEN + 16].to_vec(),
            XDP_DROP,
            Expect::Unchanged,
        ),
        case(
            "ip options cut short",
            packet::with_ip_options(&syn, &[1; 40])[..packet::ETH_HDR_LEN + 44].to_vec(),
            XDP_DROP,
            Expect::Unchanged,
        ),
        // SYN with FIN or RST: Linux's conntrack holds it INVALID; no flow may start of it.
        case(
            "syn+fin to a frontend",
            packet::tcp(
                CLIENT,
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
            "syn+rst to a frontend",
            packet::tcp(
                CLIENT,
                FRONTEND,
                TcpFlags {
                    rst: true,
                    ..TcpFlags::SYN
                },
                b"",
            ),
            XDP_DROP,
            Expect::Unchanged,
        ),
        // A first fragment whose IP packet ends before its UDP header, with the header's bytes
        // after the packet's end in the frame: no header, whatever the frame holds.
        case(
            "first fragment whose udp header lies past the ip packet",
            with_ip_header(&packet::as_fragment(&udp, 0, true), |ip| {
                ip[2..4].copy_from_slice(&20u16.to_be_bytes())
            }),
            XDP_DROP,
            Expect::Unchanged,
        ),
        // No endpoint: rejected like kube-proxy's REJECT, straight back out of the NIC.
        case(
            "no backend: syn gets rst+ack",
            packet::tcp(CLIENT, EMPTY_FRONTEND, TcpFlags::SYN, b""),
            XDP_TX,
            Expect::Bytes(packet::tcp_reset_reply(
                EMPTY_FRONTEND,
                CLIENT,
                0,
                Some(1001),
            )),
        ),
        case(
            "no backend: data with ack gets rst",
            packet::tcp(CLIENT, EMPTY_FRONTEND, TcpFlags::ACK, b"GET / HTTP/1.1\r\n"),
            XDP_TX,
            Expect::Bytes(packet::tcp_reset_reply(EMPTY_FRONTEND, CLIENT, 1, None)),
        ),
        case(
            "no backend: a rst is never answered",
            packet::tcp(CLIENT, EMPTY_FRONTEND, TcpFlags::RST, b""),
            XDP_DROP,
            Expect::Unchanged,
        ),
        case(
            "no backend: udp gets icmp port unreachable",
            packet::udp(CLIENT, EMPTY_FRONTEND, b"query"),
            XDP_TX,
            Expect::Bytes(packet::icmp_port_unreachable_reply(
                *EMPTY_FRONTEND.ip(),
                *CLIENT.ip(),
                &packet::udp(CLIENT, EMPTY_FRONTEND, b"query"),
            )),
        ),
        case(
            "no backend: ip options are dropped, not answered",
            packet::with_ip_options(
                &packet::tcp(CLIENT, EMPTY_FRONTEND, TcpFlags::SYN, b""),
                &IP_OPTIONS,
            ),
            XDP_DROP,
            Expect::Unchanged,
        ),
    ];
    run_table(
        datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd"),
        &cases,
    );

    let events = datapath.events().expect("events");
    // Seven IPv4 packets: the truncated headers, the options cut short, SYN+FIN, SYN+RST and
    // the fragment whose UDP header lies past its packet (the IPv6 programs, which drop a frame
    // of EtherType IPv6 that is not version 6, are not loaded without an IPv6 frontend:
    // datapath_xdp6 has that row).
    assert_eq!(events["drop_malformed"], 7, "{events:?}");
    assert_eq!(events["pass_protocol_unserved"], 1, "{events:?}");
    assert_eq!(events["drop_no_backend"], 2, "{events:?}");
    assert_eq!(events["reject_tcp_rst"], 2, "{events:?}");
    assert_eq!(events["reject_icmp"], 1, "{events:?}");
    assert_eq!(events["pass_fragment"], 0, "{events:?}");
    let tcp = datapath.service_counter(1).expect("counter");
    // syn, ack, fin and the syn with options; two flows (port 40000 and 40001).
    assert_eq!((tcp.packets, tcp.new_flows), (4, 2), "{tcp:?}");
    let udp_counter = datapath.service_counter(2).expect("counter");
    // The datagram, the one without a checksum, the first fragment and the later one, all of
    // one flow.
    assert_eq!(
        (udp_counter.packets, udp_counter.new_flows),
        (4, 1),
        "{udp_counter:?}"
    );
}

/// The node's own TCP connection from its NodePort (the kernel's ephemeral range may cover the
/// NodePort range): its peer's segments come to a frontend, and no flow of lb's has them. XDP
/// asks the socket table of the namespace it runs in (the test's own, BPF_PROG_TEST_RUN runs
/// the program there) and leaves them to the node's socket; a segment of no socket's is picked
/// up mid-stream as before, and a bare SYN is a client's new flow even on the socket's tuple.
#[test]
fn segments_of_the_nodes_own_connection_from_a_node_port_pass_untouched() {
    let (_lab, node, pins) = node_lab("own");
    let datapath = datapath(&pins, vec![1]);
    let own = NodeConnection::open(&node, FRONTEND.into(), NODE.into()).expect("connection");
    let (server, stranger) = own.v4();
    let cases = vec![
        case(
            "the peer's ack",
            packet::tcp(server, FRONTEND, TcpFlags::ACK, b"answer"),
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "the peer's syn-ack sent again",
            packet::tcp(server, FRONTEND, TcpFlags::SYN_ACK, b""),
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "the peer's fin",
            packet::tcp(server, FRONTEND, TcpFlags::FIN_ACK, b""),
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "an ack of no socket's, picked up mid-stream",
            packet::tcp(stranger, FRONTEND, TcpFlags::ACK, b"data"),
            XDP_PASS,
            Expect::Bytes(packet::tcp(stranger, POD_A, TcpFlags::ACK, b"data")),
        ),
        case(
            "a bare syn on the socket's tuple, a new flow",
            packet::tcp(server, FRONTEND, TcpFlags::SYN, b""),
            XDP_PASS,
            Expect::Bytes(packet::tcp(server, POD_A, TcpFlags::SYN, b"")),
        ),
    ];
    run_table(
        datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd"),
        &cases,
    );
    let events = datapath.events().expect("events");
    assert_eq!(events["pass_node_connection"], 3, "{events:?}");
    let tcp = datapath.service_counter(1).expect("counter");
    assert_eq!((tcp.packets, tcp.new_flows), (2, 2), "{tcp:?}");
}

/// A LoadBalancer IP that is the node's own address, with source ranges that leave the node
/// out: the answers to the node's connection from one of its ports are the node's, not the
/// Service's, and pass; a segment of no socket's from outside the ranges is still dropped, and
/// so is a new flow.
#[test]
fn the_nodes_own_connection_from_a_load_balancer_ips_port_passes_outside_its_source_ranges() {
    let (_lab, node, pins) = node_lab("ownlb");
    let mut datapath = datapath(&pins, vec![1]);
    let load_balancer_ip = SocketAddrV4::new(NODE, 8443);
    datapath
        .put_service(&Service {
            id: 5,
            frontends: vec![Frontend {
                addr: std::net::IpAddr::V4(NODE),
                port: load_balancer_ip.port(),
                proto: proto::TCP,
                kind: service_flags::LOAD_BALANCER,
            }],
            backends: vec![1],
            flags: service_flags::SOURCE_RANGES,
            source_ranges: [(Ipv4Addr::new(192, 0, 2, 0).into(), 24)].into(),
            ..Default::default()
        })
        .expect("service");
    let own =
        NodeConnection::open(&node, load_balancer_ip.into(), NODE.into()).expect("connection");
    let (server, stranger) = own.v4();
    let cases = vec![
        case(
            "the peer's ack",
            packet::tcp(server, load_balancer_ip, TcpFlags::ACK, b"answer"),
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "the peer's fin",
            packet::tcp(server, load_balancer_ip, TcpFlags::FIN_ACK, b""),
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "an ack of no socket's",
            packet::tcp(stranger, load_balancer_ip, TcpFlags::ACK, b"data"),
            XDP_DROP,
            Expect::Unchanged,
        ),
        case(
            "a bare syn on the socket's tuple",
            packet::tcp(server, load_balancer_ip, TcpFlags::SYN, b""),
            XDP_DROP,
            Expect::Unchanged,
        ),
    ];
    run_table(
        datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd"),
        &cases,
    );
    let events = datapath.events().expect("events");
    assert_eq!(events["pass_node_connection"], 2, "{events:?}");
    assert_eq!(events["drop_source_range"], 2, "{events:?}");
    let counter = datapath.service_counter(5).expect("counter");
    assert_eq!((counter.packets, counter.new_flows), (0, 0), "{counter:?}");
}

/// A UDP socket of the node's own connected from the UDP NodePort's port (the kernel may pick it
/// as an ephemeral port, as it may a LoadBalancer IP's that is the node's address): the peer's
/// datagrams are its answers and pass untouched. A datagram from anyone else starts the
/// Service's flow, also while a socket of the node's is bound to the port unconnected: the
/// Service's frontend comes before a socket merely listening there, as with kube-proxy.
#[test]
fn datagrams_from_the_peer_of_the_nodes_connected_udp_socket_on_a_node_port_pass_untouched() {
    let (_lab, node, pins) = node_lab("ownudp");
    let datapath = datapath(&pins, vec![1]);
    let own = NodeConnection::open_udp(&node, FRONTEND.into(), NODE.into()).expect("connection");
    let (server, stranger) = own.v4();
    let listening =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("socket");
    listening.set_reuse_address(true).expect("SO_REUSEADDR");
    listening
        .bind(&std::net::SocketAddr::from(FRONTEND).into())
        .expect("an unconnected socket on the NodePort");
    let cases = vec![
        case(
            "the peer's datagram",
            packet::udp(server, FRONTEND, b"answer"),
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "a datagram of no connected socket's, a new flow",
            packet::udp(stranger, FRONTEND, b"query"),
            XDP_PASS,
            Expect::Bytes(packet::udp(stranger, POD_A, b"query")),
        ),
        case(
            "the peer's next datagram",
            packet::udp(server, FRONTEND, b"more"),
            XDP_PASS,
            Expect::Unchanged,
        ),
    ];
    run_table(
        datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd"),
        &cases,
    );
    let events = datapath.events().expect("events");
    assert_eq!(events["pass_node_connection"], 2, "{events:?}");
    let udp = datapath.service_counter(2).expect("counter");
    assert_eq!(udp.new_flows, 1, "{udp:?}");
}

#[test]
fn established_flows_keep_their_backend_while_new_flows_follow_the_table() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "ct").expect("pin dir");
    let mut datapath = datapath(&pins, vec![1]);
    let first_client = CLIENT;
    let second_client = SocketAddrV4::new(*CLIENT.ip(), 40002);
    let program = || {
        datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd")
    };
    run_table(
        program(),
        &[case(
            "first flow picks pod A",
            packet::tcp(first_client, FRONTEND, TcpFlags::SYN, b""),
            XDP_PASS,
            Expect::Bytes(packet::tcp(first_client, POD_A, TcpFlags::SYN, b"")),
        )],
    );

    // Pod A leaves the selection table but still exists: its flow stays, new flows go to pod B.
    datapath
        .put_service(&Service {
            id: 1,
            frontends: vec![node_port(proto::TCP)],
            backends: vec![2],
            affinity_timeout_s: 0,
            ..Default::default()
        })
        .expect("service");
    let program = datapath
        .program_fd(lb_common::program_names::XDP_LB)
        .expect("fd");
    run_table(
        program,
        &[
            case(
                "established flow stays on pod A",
                packet::tcp(first_client, FRONTEND, TcpFlags::ACK, b"more"),
                XDP_PASS,
                Expect::Bytes(packet::tcp(first_client, POD_A, TcpFlags::ACK, b"more")),
            ),
            case(
                "new flow goes to pod B",
                packet::tcp(second_client, FRONTEND, TcpFlags::SYN, b""),
                XDP_PASS,
                Expect::Bytes(packet::tcp(second_client, POD_B, TcpFlags::SYN, b"")),
            ),
        ],
    );

    // Pod A is removed altogether. Its TCP flow keeps going to it until it ends (as with
    // kube-proxy's conntrack); new flows cannot reach it.
    datapath.remove_backend(1).expect("remove backend");
    let program = datapath
        .program_fd(lb_common::program_names::XDP_LB)
        .expect("fd");
    run_table(
        program,
        &[case(
            "tcp flow of a removed backend stays",
            packet::tcp(first_client, FRONTEND, TcpFlags::ACK, b"again"),
            XDP_PASS,
            Expect::Bytes(packet::tcp(first_client, POD_A, TcpFlags::ACK, b"again")),
        )],
    );
}

#[test]
fn udp_flows_move_off_a_removed_backend() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "udp").expect("pin dir");
    let mut datapath = datapath(&pins, vec![1]);
    let udp = packet::udp(CLIENT, FRONTEND, b"q");
    let program = || {
        datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd")
    };
    run_table(
        program(),
        &[case(
            "udp flow picks pod A",
            udp.clone(),
            XDP_PASS,
            Expect::Bytes(packet::udp(CLIENT, POD_A, b"q")),
        )],
    );
    datapath
        .put_backend(4, &backend(POD_B, proto::UDP))
        .expect("backend");
    let service = Service {
        id: 2,
        frontends: vec![node_port(proto::UDP)],
        backends: vec![4],
        affinity_timeout_s: 0,
        ..Default::default()
    };
    datapath.put_service(&service).expect("service");
    let program = || {
        datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd")
    };
    run_table(
        program(),
        &[case(
            "udp flow stays while pod A exists",
            udp.clone(),
            XDP_PASS,
            Expect::Bytes(packet::udp(CLIENT, POD_A, b"q")),
        )],
    );
    datapath.remove_backend(3).expect("remove backend");
    let program = datapath
        .program_fd(lb_common::program_names::XDP_LB)
        .expect("fd");
    run_table(
        program,
        &[case(
            "udp flow moves to pod B",
            udp,
            XDP_PASS,
            Expect::Bytes(packet::udp(CLIENT, POD_B, b"q")),
        )],
    );
}

#[test]
fn tc_egress_reverse_nats_replies_of_tracked_flows_only() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "tc").expect("pin dir");
    let datapath = datapath(&pins, vec![1]);
    // Create the flows through XDP first.
    let xdp = datapath
        .program_fd(lb_common::program_names::XDP_LB)
        .expect("fd");
    run_table(
        xdp,
        &[
            case(
                "tcp syn",
                packet::tcp(CLIENT, FRONTEND, TcpFlags::SYN, b""),
                XDP_PASS,
                Expect::Bytes(packet::tcp(CLIENT, POD_A, TcpFlags::SYN, b"")),
            ),
            case(
                "udp",
                packet::udp(CLIENT, FRONTEND, b"q"),
                XDP_PASS,
                Expect::Bytes(packet::udp(CLIENT, POD_A, b"q")),
            ),
        ],
    );
    let reply_tcp = packet::tcp(POD_A, CLIENT, TcpFlags::SYN_ACK, b"");
    let reply_udp = packet::udp(POD_A, CLIENT, b"answer");
    let cases = vec![
        case(
            "tcp reply",
            reply_tcp.clone(),
            TC_ACT_OK,
            Expect::Bytes(packet::tcp(FRONTEND, CLIENT, TcpFlags::SYN_ACK, b"")),
        ),
        case(
            "udp reply",
            reply_udp.clone(),
            TC_ACT_OK,
            Expect::Bytes(packet::udp(FRONTEND, CLIENT, b"answer")),
        ),
        case(
            "udp reply without checksum",
            with_zero_udp_checksum(&reply_udp),
            TC_ACT_OK,
            Expect::Bytes(with_zero_udp_checksum(&packet::udp(
                FRONTEND, CLIENT, b"answer",
            ))),
        ),
        case(
            "tcp reply with ip options",
            packet::with_ip_options(&reply_tcp, &IP_OPTIONS),
            TC_ACT_OK,
            Expect::Bytes(packet::with_ip_options(
                &packet::tcp(FRONTEND, CLIENT, TcpFlags::SYN_ACK, b""),
                &IP_OPTIONS,
            )),
        ),
        case(
            "untracked egress",
            packet::tcp(POD_B, CLIENT, TcpFlags::SYN_ACK, b""),
            TC_ACT_OK,
            Expect::Unchanged,
        ),
        case(
            "egress from no backend's address and port: the node's own traffic",
            packet::tcp(
                SocketAddrV4::new(NODE, 22),
                CLIENT,
                TcpFlags::ACK,
                b"banner",
            ),
            TC_ACT_OK,
            Expect::Unchanged,
        ),
        case(
            "udp from no backend's address and port",
            packet::udp(SocketAddrV4::new(NODE, 53), CLIENT, b"answer"),
            TC_ACT_OK,
            Expect::Unchanged,
        ),
        case(
            "non-ip",
            packet::non_ip(0x0806, 28),
            TC_ACT_OK,
            Expect::Unchanged,
        ),
        case(
            "icmp",
            packet::icmp_echo(*POD_A.ip(), *CLIENT.ip()),
            TC_ACT_OK,
            Expect::Unchanged,
        ),
        case(
            "first fragment of a tracked flow",
            packet::as_fragment(&reply_udp, 0, true),
            TC_ACT_OK,
            Expect::Bytes(packet::as_fragment(
                &packet::udp(FRONTEND, CLIENT, b"answer"),
                0,
                true,
            )),
        ),
        case(
            "truncated",
            reply_tcp[..packet::ETH_HDR_LEN + 20 + 2].to_vec(),
            TC_ACT_OK,
            Expect::Unchanged,
        ),
    ];
    run_table(
        datapath
            .program_fd(lb_common::program_names::TC_EGRESS)
            .expect("fd"),
        &cases,
    );
}

/// The connection-tracking entry of the flow CLIENT -> FRONTEND over TCP, to a local pod: the
/// only entry in the map (one entry per flow, keyed by the client).
fn tcp_flow_entry(datapath: &Datapath) -> lb_common::Flow4Value {
    let entries = datapath.conntrack().expect("conntrack");
    let [(key, value)] = entries.as_slice() else {
        panic!("one entry for the flow, not {entries:?}");
    };
    assert_eq!(
        *key,
        lb_common::flow_key(u32::from(*CLIENT.ip()), CLIENT.port(), proto::TCP)
    );
    *lb_common::Flow4Value::of(value)
}

#[test]
fn conntrack_follows_the_tcp_handshake_and_close() {
    use lb_common::tcp_state::{BACKEND_CLOSED, ESTABLISHED, SYN_SENT};
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "state").expect("pin dir");
    let datapath = datapath(&pins, vec![1]);
    let xdp = || {
        datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd")
    };
    let step = |program, name, input: Vec<u8>, verdict, output| {
        run_table(program, &[case(name, input, verdict, output)])
    };

    step(
        xdp(),
        "syn",
        packet::tcp(CLIENT, FRONTEND, TcpFlags::SYN, b""),
        XDP_PASS,
        Expect::Bytes(packet::tcp(CLIENT, POD_A, TcpFlags::SYN, b"")),
    );
    let flow = tcp_flow_entry(&datapath);
    assert_eq!(flow.state, SYN_SENT);
    // The entry holds the backend, and the frontend to restore on the answers.
    assert_eq!(
        (flow.backend_addr, flow.backend_port),
        (u32::from(*POD_A.ip()), POD_A.port())
    );
    assert_eq!(
        (flow.frontend_addr, flow.frontend_port),
        (u32::from(NODE), NODE_PORT)
    );

    step(
        xdp(),
        "ack",
        packet::tcp(CLIENT, FRONTEND, TcpFlags::ACK, b""),
        XDP_PASS,
        Expect::Bytes(packet::tcp(CLIENT, POD_A, TcpFlags::ACK, b"")),
    );
    assert_eq!(tcp_flow_entry(&datapath).state, ESTABLISHED);

    // The backend closes its side: the reply path moves the flow to BACKEND_CLOSED (the
    // client may still send; the half-closed timeout).
    let tc = datapath
        .program_fd(lb_common::program_names::TC_EGRESS)
        .expect("fd");
    step(
        tc,
        "fin from the backend",
        packet::tcp(POD_A, CLIENT, TcpFlags::FIN_ACK, b""),
        0,
        Expect::Bytes(packet::tcp(FRONTEND, CLIENT, TcpFlags::FIN_ACK, b"")),
    );
    assert_eq!(tcp_flow_entry(&datapath).state, BACKEND_CLOSED);
}

/// A client that connects straight to a local endpoint's pod from the port of its closed flow
/// through the frontend (hosts routed to the pods can) gets the pod's answers as the pod sends
/// them: the SYN-ACK acknowledges another initial sequence number than the flow's client sent,
/// so tc egress marks the entry superseded instead of taking the answers for the closed flow's.
/// The closed flow's last ACK, arriving after that, still follows the entry to the pod and
/// starts no flow mid-stream that would take the straight connection's answers. The flow's own
/// SYN-ACK, sent again by the pod after the client's ACK and data met XDP (lost after it, or a
/// listener's accept queue full), still goes back from the frontend.
#[test]
fn a_connection_straight_to_the_pod_from_a_closed_flows_port_is_answered_untranslated() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "straight").expect("pin dir");
    let datapath = datapath(&pins, vec![1]);
    let run = |program, name, input: Vec<u8>, verdict, output| {
        run_table(program, &[case(name, input, verdict, output)])
    };
    let xdp = || {
        datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd")
    };
    let tc = || {
        datapath
            .program_fd(lb_common::program_names::TC_EGRESS)
            .expect("fd")
    };
    let client = |to: SocketAddrV4, flags, seq_ack, payload: &[u8]| {
        packet::tcp_acking(CLIENT, to, flags, seq_ack, payload)
    };
    let pod = |to: SocketAddrV4, flags, seq_ack, payload: &[u8]| {
        packet::tcp_acking(to, CLIENT, flags, seq_ack, payload)
    };
    let answer = |name, seq_ack, payload: &[u8]| {
        run(
            tc(),
            name,
            pod(POD_A, TcpFlags::SYN_ACK, seq_ack, payload),
            TC_ACT_OK,
            Expect::Bytes(pod(FRONTEND, TcpFlags::SYN_ACK, seq_ack, payload)),
        )
    };
    let superseded = || datapath.events().expect("events")["ct_flow_superseded"];
    let from_client = |name, flags, seq_ack, payload: &[u8]| {
        run(
            xdp(),
            name,
            client(FRONTEND, flags, seq_ack, payload),
            XDP_PASS,
            Expect::Bytes(client(POD_A, flags, seq_ack, payload)),
        )
    };

    // Through the NodePort: SYN 1000, the pod's SYN-ACK (its ISN 500 000), the client's
    // request, then the pod's SYN-ACK once more, which acknowledges the client's SYN.
    from_client("syn", TcpFlags::SYN, (1000, 0), b"");
    answer("the SYN-ACK", (500_000, 1001), b"");
    let request = [7u8; 1400];
    from_client("the request", TcpFlags::ACK, (1001, 500_001), &request);
    answer(
        "the SYN-ACK sent again after the client's request met XDP",
        (500_000, 1001),
        b"",
    );
    assert_eq!(superseded(), 0);
    assert_eq!(
        flow_of(&datapath, CLIENT).state,
        lb_common::tcp_state::ESTABLISHED
    );
    from_client("the client's FIN", TcpFlags::FIN_ACK, (2401, 500_001), b"");
    run(
        tc(),
        "the pod's FIN",
        pod(POD_A, TcpFlags::FIN_ACK, (500_001, 2402), b""),
        TC_ACT_OK,
        Expect::Bytes(pod(FRONTEND, TcpFlags::FIN_ACK, (500_001, 2402), b"")),
    );
    assert_eq!(
        flow_of(&datapath, CLIENT).state,
        lb_common::tcp_state::CLOSING
    );

    // Straight to the pod from the same port (the client's ISN 9 000 000): XDP leaves it alone
    // (no frontend's), and the pod's answers leave as sent.
    run(
        xdp(),
        "the straight connection's SYN",
        client(POD_A, TcpFlags::SYN, (9_000_000, 0), b""),
        XDP_PASS,
        Expect::Unchanged,
    );
    run(
        tc(),
        "its SYN-ACK",
        pod(POD_A, TcpFlags::SYN_ACK, (7_000_000, 9_000_001), b""),
        TC_ACT_OK,
        Expect::Unchanged,
    );
    assert_eq!(superseded(), 1);
    let flow = flow_of(&datapath, CLIENT);
    assert_ne!(
        flow.flags & lb_common::ct_flags::SUPERSEDED,
        0,
        "marked superseded"
    );
    assert_eq!(flow.state, lb_common::tcp_state::CLOSING);
    // The closed flow's last ACK, late: it still reaches the pod, and starts no flow
    // mid-stream whose entry would take the straight connection's answers.
    from_client(
        "the closed flow's last ACK, late",
        TcpFlags::ACK,
        (2402, 500_002),
        b"",
    );
    run(
        tc(),
        "the straight connection's data",
        pod(POD_A, TcpFlags::ACK, (7_000_001, 9_000_010), b"straight"),
        TC_ACT_OK,
        Expect::Unchanged,
    );
    run(
        tc(),
        "and its SYN-ACK sent again",
        pod(POD_A, TcpFlags::SYN_ACK, (7_000_000, 9_000_001), b""),
        TC_ACT_OK,
        Expect::Unchanged,
    );

    // Through the NodePort from that port again: a new flow, answered from the frontend.
    from_client(
        "a new SYN through the NodePort",
        TcpFlags::SYN,
        (20_000, 0),
        b"",
    );
    answer("its SYN-ACK", (800_000, 20_001), b"");
    assert_eq!(superseded(), 1);
}

/// A retransmitted SYN goes where its flow went, even after the table changed or emptied (where a
/// new flow would be refused), and leaves one entry; a SYN on a closed flow's port starts a flow
/// that follows the table. `lb_xdp` claims a SYN's client key without a lookup; a retransmit's
/// claim fails on the held key, and `lb_xdp_lookup` looks it up and serves it (a missing
/// `lb_xdp_lookup` would pass it untranslated, counted). datapath_xdp6 has the IPv6 twin.
#[test]
fn a_syn_whose_client_key_is_held_is_looked_up_and_follows_its_flow() {
    use lb_common::tcp_state::{CLOSING, SYN_SENT};
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "heldkey").expect("pin dir");
    let mut datapath = datapath(&pins, vec![1]);
    fn xdp(datapath: &Datapath) -> std::os::fd::BorrowedFd<'_> {
        datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd")
    }
    let put_table = |datapath: &mut Datapath, backends: Vec<u32>| {
        datapath
            .put_service(&Service {
                id: 1,
                frontends: vec![node_port(proto::TCP)],
                backends,
                ..Default::default()
            })
            .expect("service");
    };
    let retransmit = || {
        case(
            "retransmitted syn stays on pod A",
            packet::tcp(CLIENT, FRONTEND, TcpFlags::SYN, b""),
            XDP_PASS,
            Expect::Bytes(packet::tcp(CLIENT, POD_A, TcpFlags::SYN, b"")),
        )
    };
    run_table(
        xdp(&datapath),
        &[case(
            "first syn picks pod A",
            packet::tcp(CLIENT, FRONTEND, TcpFlags::SYN, b""),
            XDP_PASS,
            Expect::Bytes(packet::tcp(CLIENT, POD_A, TcpFlags::SYN, b"")),
        )],
    );
    // No endpoint left: a new flow would be refused, the retransmit is the live flow's.
    put_table(&mut datapath, vec![]);
    run_table(xdp(&datapath), &[retransmit()]);
    put_table(&mut datapath, vec![2]);
    let other_client = SocketAddrV4::new(*CLIENT.ip(), CLIENT.port() + 1);
    run_table(
        xdp(&datapath),
        &[
            retransmit(),
            case(
                "another client port follows the table to pod B",
                packet::tcp(other_client, FRONTEND, TcpFlags::SYN, b""),
                XDP_PASS,
                Expect::Bytes(packet::tcp(other_client, POD_B, TcpFlags::SYN, b"")),
            ),
        ],
    );
    let flows = datapath.conntrack().expect("conntrack");
    assert_eq!(flows.len(), 2, "one entry per flow: {flows:?}");
    let flow = flow_of(&datapath, CLIENT);
    assert_eq!(flow.state, SYN_SENT);
    assert_eq!(flow.backend_addr, u32::from(*POD_A.ip()));

    run_table(
        xdp(&datapath),
        &[case(
            "the client resets",
            packet::tcp(CLIENT, FRONTEND, TcpFlags::RST, b""),
            XDP_PASS,
            Expect::Bytes(packet::tcp(CLIENT, POD_A, TcpFlags::RST, b"")),
        )],
    );
    assert_eq!(flow_of(&datapath, CLIENT).state, CLOSING);
    run_table(
        xdp(&datapath),
        &[case(
            "a syn on the closed flow's port is a new flow, to pod B",
            packet::tcp(CLIENT, FRONTEND, TcpFlags::SYN, b""),
            XDP_PASS,
            Expect::Bytes(packet::tcp(CLIENT, POD_B, TcpFlags::SYN, b"")),
        )],
    );
    let flow = flow_of(&datapath, CLIENT);
    assert_eq!(
        (flow.state, flow.backend_addr),
        (SYN_SENT, u32::from(*POD_B.ip()))
    );
    assert_eq!(datapath.conntrack().expect("conntrack").len(), 2);
    assert_eq!(
        datapath.service_counter(1).expect("counter").new_flows,
        3,
        "three flows made: the first, the other port's, the reopened one"
    );
    let events = datapath.events().expect("events");
    assert!(
        events.values().all(|count| *count == 0),
        "nothing dropped, refused, passed or repaired: {events:?}"
    );
}

/// The FLOW entry of `client`'s TCP flow.
fn flow_of(datapath: &Datapath, client: SocketAddrV4) -> lb_common::Flow4Value {
    let key = lb_common::flow_key(u32::from(*client.ip()), client.port(), proto::TCP);
    let entries = datapath.conntrack().expect("conntrack");
    let (_, value) = entries
        .iter()
        .find(|(entry_key, _)| *entry_key == key)
        .unwrap_or_else(|| panic!("no FLOW entry of {client} in {entries:?}"));
    *lb_common::Flow4Value::of(value)
}

#[test]
fn maglev_services_pick_the_backend_the_lookup_table_gives() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "maglev").expect("pin dir");
    let mut datapath = datapath(&pins, vec![1]);
    let pod_c = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 10), 8080);
    datapath
        .put_backend(5, &backend(pod_c, proto::TCP))
        .expect("backend");
    let pods = [POD_A, POD_B, pod_c];
    let service = Service {
        id: 1,
        frontends: vec![node_port(proto::TCP)],
        backends: vec![1, 2, 5],
        flags: service_flags::MAGLEV,
        ..Default::default()
    };
    datapath.put_service(&service).expect("maglev service");
    // The same table, built here as docs/maglev.md specifies it from the backends' identities, with
    // hash implementations that are not the agent's.
    let identities: Vec<String> = pods
        .iter()
        .map(|pod| format!("{}:{}/{}", pod.ip(), pod.port(), proto::TCP))
        .collect();
    // Three backends: the smallest size of the ladder with 100 slots each, 509.
    let table = lab::maglev_reference::table(&identities, 509);
    let program = datapath
        .program_fd(lb_common::program_names::XDP_LB)
        .expect("fd");
    let mut cases = Vec::new();
    let mut reached = std::collections::BTreeSet::new();
    for port in 41000..41030u16 {
        let client = SocketAddrV4::new(*CLIENT.ip(), port);
        let hash = lab::maglev_reference::flow_hash(
            u32::from(*client.ip()),
            u32::from(NODE),
            port,
            NODE_PORT,
            proto::TCP,
        );
        let pod = pods[table[hash as usize % table.len()]];
        reached.insert(pod);
        cases.push(Case {
            name: "maglev new flow",
            input: packet::tcp(client, FRONTEND, TcpFlags::SYN, b""),
            verdict: XDP_PASS,
            output: Expect::Bytes(packet::tcp(client, pod, TcpFlags::SYN, b"")),
        });
    }
    run_table(program, &cases);
    assert_eq!(reached.len(), 3, "30 flows reach all three backends");
    assert_eq!(
        datapath.installed_services()[&1].maglev_size,
        Some(509),
        "the service's table size as the agent records it"
    );
}

/// Maglev tables are one per service, sized per service: far more Maglev services than the
/// 64 the retired fixed array held, each selecting from its own table; a service that shrinks
/// within its band keeps its table's size, and a removed service's table goes.
#[test]
fn every_service_can_have_a_maglev_table_of_its_own_size() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "maglevs").expect("pin dir");
    let mut datapath = datapath(&pins, vec![1]);
    let services = 300u32;
    let maglev_service = |id: u32, addr: Ipv4Addr, backends: Vec<u32>| Service {
        id,
        frontends: vec![Frontend {
            addr: std::net::IpAddr::V4(addr),
            port: 80,
            proto: proto::TCP,
            kind: service_flags::CLUSTER_IP,
        }],
        backends,
        flags: service_flags::MAGLEV,
        ..Default::default()
    };
    for id in 1..=services {
        let addr = Ipv4Addr::new(10, 96, (id >> 8) as u8, id as u8);
        datapath
            .put_service(&maglev_service(id, addr, vec![1, 2]))
            .unwrap_or_else(|error| panic!("Maglev service {id}: {error}"));
    }
    let tables = lb_userspace::datapath::maps::open_maglev_tables(
        pins.path(),
        lb_userspace::datapath::bpf_obj::Access::ReadOnly,
    )
    .expect("the Maglev tables");
    let table_of = |id: u32| tables.get(&id, 0);
    // Two backends: 251 slots (100 each at least) after 2 cells, the size and the tag.
    let last = table_of(services).expect("the last service's table");
    assert_eq!(last.len(), 253);
    assert_eq!(last.get(&0, 0).expect("cell 0"), 251);
    let owners: std::collections::BTreeSet<u32> = (2..253)
        .map(|cell| last.get(&cell, 0).expect("cell"))
        .collect();
    assert_eq!(
        owners,
        [1, 2].into(),
        "every slot holds one of its backends"
    );
    // New flows to the last service go where its table says (a random choice would miss one
    // of 20 with odds of 1 - 2^-20).
    let program = || {
        datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd")
    };
    let frontend = SocketAddrV4::new(Ipv4Addr::new(10, 96, 1, 44), 80);
    let flows = |table: &aya::maps::Array<aya::maps::MapData, u32>| -> Vec<Case> {
        (43000..43020u16)
            .map(|port| {
                let client = SocketAddrV4::new(*CLIENT.ip(), port);
                let hash = lab::maglev_reference::flow_hash(
                    u32::from(*client.ip()),
                    u32::from(*frontend.ip()),
                    port,
                    80,
                    proto::TCP,
                );
                let backend = table.get(&(2 + hash % 251), 0).expect("slot");
                let pod = if backend == 1 { POD_A } else { POD_B };
                case(
                    "a new flow to the 300th Maglev service",
                    packet::tcp(client, frontend, TcpFlags::SYN, b""),
                    XDP_PASS,
                    Expect::Bytes(packet::tcp(client, pod, TcpFlags::SYN, b"")),
                )
            })
            .collect()
    };
    run_table(program(), &flows(&last));
    // Without its table (as between a new service's frontends and its table's swap), a new
    // flow still reaches one of its backends, at random.
    use std::os::fd::AsFd as _;
    let writable = lb_userspace::datapath::maps::open_map_data(
        pins.path(),
        lb_common::map_names::MAGLEV4,
        lb_userspace::datapath::bpf_obj::Access::ReadWrite,
    )
    .expect("the Maglev tables");
    lb_userspace::datapath::batch::delete_array_entry(writable.fd().as_fd(), services)
        .unwrap_or_else(|error| panic!("remove the table: {error}"));
    let client = SocketAddrV4::new(*CLIENT.ip(), 44000);
    let fallbacks = || datapath.events().expect("events")["maglev_fallback"];
    let before = fallbacks();
    let fallback = lb_userspace::datapath::testrun::test_run(
        program(),
        &packet::tcp(client, frontend, TcpFlags::SYN, b""),
    )
    .expect("test run");
    assert_eq!(fallback.verdict, XDP_PASS, "served without its table");
    assert!(
        [POD_A, POD_B]
            .iter()
            .any(|pod| fallback.packet == packet::tcp(client, *pod, TcpFlags::SYN, b"")),
        "sent to one of its backends"
    );
    assert_eq!(fallbacks(), before + 1, "counted");
    // Down to one backend: 251 slots are still within 50 to 400 per backend, so the size stays
    // (a new size would move most flows).
    datapath
        .put_service(&maglev_service(services, *frontend.ip(), vec![1]))
        .expect("one backend");
    let shrunk = table_of(services).expect("table");
    assert_eq!(shrunk.len(), 253);
    assert!(
        (2..253).all(|cell| shrunk.get(&cell, 0).expect("cell") == 1),
        "every slot now holds the one backend"
    );
    datapath.remove_service(services).expect("remove");
    assert!(
        table_of(services).is_err(),
        "a removed service's table goes"
    );
    assert!(table_of(1).is_ok());

    // A table the frontends were not written for (swapped in for an update that never
    // came) is not read: its tag is not theirs.
    let first = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 80);
    datapath.defer_maglev_swaps();
    datapath
        .prepare_maglev_table(&maglev_service(1, *first.ip(), vec![2]))
        .expect("prepare");
    datapath.swap_maglev_tables().expect("swap");
    datapath.clear_prepared_maglev_tables();
    let before = datapath.events().expect("events")["maglev_fallback"];
    let mut reached = std::collections::BTreeSet::new();
    for port in 45000..45040u16 {
        let client = SocketAddrV4::new(*CLIENT.ip(), port);
        let run = lb_userspace::datapath::testrun::test_run(
            datapath
                .program_fd(lb_common::program_names::XDP_LB)
                .expect("fd"),
            &packet::tcp(client, first, TcpFlags::SYN, b""),
        )
        .expect("test run");
        assert_eq!(run.verdict, XDP_PASS);
        for pod in [POD_A, POD_B] {
            if run.packet == packet::tcp(client, pod, TcpFlags::SYN, b"") {
                reached.insert(pod);
            }
        }
    }
    assert_eq!(
        reached,
        [POD_A, POD_B].into(),
        "both backends of the frontends' table, not only the other table's one"
    );
    assert_eq!(
        datapath.events().expect("events")["maglev_fallback"],
        before + 40,
        "every one counted"
    );
}

/// A datapath whose NodePort service's only backend is on another node, with a SNAT range of
/// 32 ports (one scan covers them all), and a handle on its conntrack map.
struct SnatFixture {
    datapath: Datapath,
    conntrack: aya::maps::HashMap<aya::maps::MapData, lb_common::Ct4Key, lb_common::Ct4Value>,
}

const SNAT_PORTS: (u16, u16) = (61000, 61031);
const REMOTE_POD: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 10), 8080);

impl SnatFixture {
    fn new(pins: &PinDir) -> Self {
        Self::with_ports(pins, SNAT_PORTS)
    }

    fn with_ports(pins: &PinDir, ports: (u16, u16)) -> Self {
        let mut datapath = datapath(pins, vec![]);
        datapath
            .set_config(&lb_common::DatapathConfig {
                snat_addr: u32::from(NODE),
                snat_port_min: ports.0,
                snat_port_max: ports.1,
                ..Default::default()
            })
            .expect("config");
        // No LOCAL flag: flows to it are SNATed.
        let remote = Backend {
            flags: 0,
            ..backend(REMOTE_POD, proto::TCP)
        };
        datapath.put_backend(6, &remote).expect("backend");
        let service = Service {
            id: 1,
            frontends: vec![node_port(proto::TCP)],
            backends: vec![6],
            ..Default::default()
        };
        datapath.put_service(&service).expect("service");
        let conntrack = lab::table::pinned_conntrack(pins.path(), lb_common::map_names::CONNTRACK4);
        Self {
            datapath,
            conntrack,
        }
    }

    fn reply_key(port: u16) -> lb_common::Ct4Key {
        lb_common::Ct4Key {
            saddr: u32::from(*REMOTE_POD.ip()),
            daddr: u32::from(NODE),
            sport: REMOTE_POD.port(),
            dport: port,
            proto: proto::TCP,
            direction: lb_common::ct_direction::REPLY,
            _pad: [0; 2],
        }
    }

    /// Every SNAT port towards the backend held by a reply entry with these flags, last seen
    /// `age` ago.
    fn occupy_every_port(&mut self, flags: u8, age: std::time::Duration) {
        let old = lb_common::Ct4Value {
            last_seen_ns: lb_userspace::observe::inspect::monotonic_ns()
                .saturating_sub(age.as_nanos() as u64),
            state: lb_common::tcp_state::CLOSING,
            flags: lb_common::ct_flags::SNAT | flags,
            ..Default::default()
        };
        for port in SNAT_PORTS.0..=SNAT_PORTS.1 {
            self.conntrack
                .insert(&Self::reply_key(port), &old, 0)
                .expect("old entry");
        }
    }

    fn xdp(&self, frame: &[u8]) -> lb_userspace::datapath::testrun::TestRunOutput {
        let program = self
            .datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd");
        lb_userspace::datapath::testrun::test_run(program, frame).expect("run")
    }

    /// Sends a new flow's SYN; the SNAT port it got, or None when it was dropped.
    fn connect(&self, client: SocketAddrV4) -> Option<u16> {
        self.snat_port_of(&packet::tcp(client, FRONTEND, TcpFlags::SYN, b""))
    }

    /// Sends a client's packet; the SNAT port it left with, or None when it was dropped.
    fn snat_port_of(&self, frame: &[u8]) -> Option<u16> {
        let run = self.xdp(frame);
        if run.verdict == XDP_DROP {
            return None;
        }
        let parsed = etherparse::SlicedPacket::from_ethernet(&run.packet).expect("parse");
        let Some(etherparse::NetSlice::Ipv4(ip)) = parsed.net else {
            panic!("ipv4")
        };
        assert_eq!(ip.header().source_addr(), NODE, "SNATed to the node");
        assert_eq!(ip.header().destination_addr(), *REMOTE_POD.ip());
        let Some(etherparse::TransportSlice::Tcp(tcp)) = parsed.transport else {
            panic!("tcp")
        };
        Some(tcp.source_port())
    }
}

#[test]
fn snat_ports_of_expired_flows_are_reused() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "snat").expect("pin dir");
    let mut fixture = SnatFixture::new(&pins);
    // Flows long gone (last seen at boot): the LRU map keeps such entries until it needs room.
    fixture.occupy_every_port(0, std::time::Duration::from_secs(3600 * 24 * 365));
    assert!(
        fixture.connect(CLIENT).is_some(),
        "a new flow found no SNAT port: {:?}",
        fixture.datapath.events()
    );
    assert_eq!(
        fixture.datapath.events().expect("events")["drop_snat_exhausted"],
        0
    );
}

/// Which held SNAT ports a new flow may take, the range full of one kind each time: a flow both
/// sides closed (the client first) or a RST ended frees its port after the reuse delay and is a
/// last resort in the delay's second half; one the backend closed first (its TIME_WAIT) is a
/// last resort after the delay; a flow not closed on both sides never gives its port up.
#[test]
fn snat_ports_of_closed_flows_are_free_after_the_reuse_delay_and_last_resorts_within_it() {
    use lb_common::ct_flags::{BACKEND_CLOSED_FIRST, BACKEND_FIN, CLIENT_FIN, RESET};
    use std::time::Duration;
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "snat").expect("pin dir");
    let mut fixture = SnatFixture::new(&pins);
    let grace = Duration::from_nanos(lb_common::ct_timeouts::SNAT_PORT_REUSE);
    let after_grace = grace + Duration::from_secs(1);
    let backend_first = CLIENT_FIN | BACKEND_FIN | BACKEND_CLOSED_FIRST;
    // (what ended the old flows, how long ago, whether a new flow finds a port)
    let cases = [
        ("FINs seen, still closing", 0, after_grace, false),
        ("client FIN only", CLIENT_FIN, after_grace, false),
        ("backend FIN only", BACKEND_FIN, grace / 4, false),
        (
            "both FINs, client first",
            CLIENT_FIN | BACKEND_FIN,
            after_grace,
            true,
        ),
        (
            "both FINs, client first, early in the delay (its last ACK may be on its way)",
            CLIENT_FIN | BACKEND_FIN,
            grace / 4,
            false,
        ),
        (
            "both FINs, client first, late in the delay: a last resort",
            CLIENT_FIN | BACKEND_FIN,
            grace * 3 / 4,
            true,
        ),
        (
            "both FINs, backend first (its TIME_WAIT): a last resort",
            backend_first,
            after_grace,
            true,
        ),
        (
            "both FINs, backend first, within the delay",
            backend_first,
            grace / 4,
            false,
        ),
        ("reset", RESET, after_grace, true),
        ("reset, early in the delay", RESET, grace / 4, false),
        (
            "reset, late in the delay: a last resort",
            RESET,
            grace * 3 / 4,
            true,
        ),
    ];
    let mut failures = Vec::new();
    for (index, (name, flags, age, reusable)) in cases.into_iter().enumerate() {
        fixture.occupy_every_port(flags, age);
        let client = SocketAddrV4::new(*CLIENT.ip(), 41000 + index as u16);
        let port = fixture.connect(client);
        if port.is_some() != reusable {
            failures.push(format!(
                "{name}: new flow got {port:?}, expected a port: {reusable}"
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");

    // The order: a free port before a recently closed one, before a backend's TIME_WAIT.
    let one_port_of = |fixture: &mut SnatFixture, flags: u8, age: Duration, port: u16| {
        let old = lb_common::Ct4Value {
            last_seen_ns: lb_userspace::observe::inspect::monotonic_ns() - age.as_nanos() as u64,
            state: lb_common::tcp_state::CLOSING,
            flags: lb_common::ct_flags::SNAT | flags,
            ..Default::default()
        };
        fixture
            .conntrack
            .insert(&SnatFixture::reply_key(port), &old, 0)
            .expect("entry");
    };
    let (clean, recent) = (SNAT_PORTS.0 + 17, SNAT_PORTS.0 + 5);
    fixture.occupy_every_port(CLIENT_FIN | BACKEND_FIN, grace * 3 / 4);
    one_port_of(&mut fixture, CLIENT_FIN | BACKEND_FIN, after_grace, clean);
    let client = SocketAddrV4::new(*CLIENT.ip(), 41900);
    assert_eq!(fixture.connect(client), Some(clean), "the free port first");
    fixture.occupy_every_port(backend_first, after_grace);
    one_port_of(
        &mut fixture,
        CLIENT_FIN | BACKEND_FIN,
        grace * 3 / 4,
        recent,
    );
    let client = SocketAddrV4::new(*CLIENT.ip(), 41901);
    assert_eq!(
        fixture.connect(client),
        Some(recent),
        "a recently closed port before a TIME_WAIT one"
    );
    assert_eq!(
        fixture.datapath.events().expect("events")["drop_snat_exhausted"],
        6,
        "the six cases that find no port"
    );
}

#[test]
fn a_syn_on_a_closed_flows_tuple_is_a_new_flow_with_a_fresh_snat_port() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "snat").expect("pin dir");
    let mut fixture = SnatFixture::new(&pins);
    fixture.connect(CLIENT).expect("a port");
    // The client closes; then every other port is taken and the first flow's port is handed
    // to someone else (its reply entry now belongs to another flow).
    assert_ne!(
        fixture
            .xdp(&packet::tcp(CLIENT, FRONTEND, TcpFlags::FIN_ACK, b""))
            .verdict,
        XDP_DROP
    );
    fixture.occupy_every_port(0, std::time::Duration::ZERO);
    // The client reuses its port for a new connection: a new flow, which finds no port now,
    // instead of riding the closed flow's SNAT port into another connection.
    assert_eq!(fixture.connect(CLIENT), None);
    assert_eq!(
        fixture.datapath.events().expect("events")["drop_snat_exhausted"],
        1
    );
}

/// A retransmitted SYN of a SNAT flow keeps the flow's port and leaves nothing behind: the flow
/// keeps its two entries, and the range's other port is free for the next client.
#[test]
fn a_retransmitted_syn_of_a_snat_flow_keeps_its_port_and_leaves_nothing_behind() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "snatsyn").expect("pin dir");
    let fixture = SnatFixture::with_ports(&pins, (61000, 61001));
    let port = fixture.connect(CLIENT).expect("a port");
    for _ in 0..3 {
        assert_eq!(fixture.connect(CLIENT), Some(port), "the retransmit's port");
    }
    let entries: Vec<_> = fixture
        .conntrack
        .keys()
        .collect::<Result<_, _>>()
        .expect("keys");
    assert_eq!(entries.len(), 2, "the FLOW and REPLY entries: {entries:?}");
    // Of the range's two ports the other one is free: a second client gets it.
    let other = SocketAddrV4::new(*CLIENT.ip(), CLIENT.port() + 1);
    let other_port = fixture.connect(other).expect("the other port");
    assert_ne!(other_port, port);
    assert_eq!(
        fixture
            .datapath
            .service_counter(1)
            .expect("counter")
            .new_flows,
        2
    );
}

#[test]
fn the_fins_and_resets_of_snat_flows_are_recorded_on_their_reply_entry() {
    use lb_common::ct_flags::{
        BACKEND_CLOSED_FIRST, BACKEND_FIN, CLIENT_FIN, CLIENT_IN_FLOW, RESET, SNAT,
    };
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "snat").expect("pin dir");
    let fixture = SnatFixture::new(&pins);
    let flags_after = |client_port: u16, closes: &[(bool, TcpFlags)]| -> u8 {
        let client = SocketAddrV4::new(*CLIENT.ip(), client_port);
        let port = fixture.connect(client).expect("a SNAT port");
        let snat = SocketAddrV4::new(NODE, port);
        let handshake = fixture.xdp(&packet::tcp(REMOTE_POD, snat, TcpFlags::SYN_ACK, b""));
        assert_eq!(
            handshake.verdict, XDP_TX,
            "the SYN-ACK goes back to the client"
        );
        for (from_backend, flags) in closes {
            let frame = if *from_backend {
                packet::tcp(REMOTE_POD, snat, *flags, b"")
            } else {
                packet::tcp(client, FRONTEND, *flags, b"")
            };
            assert_ne!(fixture.xdp(&frame).verdict, XDP_DROP);
        }
        fixture
            .conntrack
            .get(&SnatFixture::reply_key(port), 0)
            .expect("reply entry")
            .flags
    };
    let client_first = flags_after(
        42000,
        &[(false, TcpFlags::FIN_ACK), (true, TcpFlags::FIN_ACK)],
    );
    // CLIENT_IN_FLOW: the client's side of these flows is their FLOW entry.
    assert_eq!(
        client_first,
        SNAT | CLIENT_IN_FLOW | CLIENT_FIN | BACKEND_FIN
    );
    let backend_first = flags_after(
        42001,
        &[(true, TcpFlags::FIN_ACK), (false, TcpFlags::FIN_ACK)],
    );
    assert_eq!(
        backend_first,
        SNAT | CLIENT_IN_FLOW | CLIENT_FIN | BACKEND_FIN | BACKEND_CLOSED_FIRST
    );
    let reset = flags_after(42002, &[(false, TcpFlags::RST)]);
    assert_eq!(reset, SNAT | CLIENT_IN_FLOW | RESET);
}

/// Timeouts short enough for a test to outlive them.
fn short_timeouts() -> lb_common::CtTimeouts {
    use std::time::Duration;
    let nanos = |duration: Duration| duration.as_nanos() as u64;
    lb_common::CtTimeouts {
        tcp_syn: nanos(Duration::from_millis(800)),
        tcp_established: nanos(Duration::from_secs(3600)),
        tcp_closing: nanos(Duration::from_millis(300)),
        udp: nanos(Duration::from_millis(800)),
        snat_port_reuse: nanos(Duration::from_millis(100)),
        tcp_half_closed: nanos(Duration::from_millis(300)),
    }
}

impl SnatFixture {
    fn with_short_timeouts(pins: &PinDir) -> Self {
        let mut fixture = Self::new(pins);
        let config = lb_common::DatapathConfig {
            timeouts: short_timeouts(),
            ..fixture.datapath.config().expect("config")
        };
        fixture.datapath.set_config(&config).expect("config");
        fixture
    }

    fn event(&self, label: &str) -> u64 {
        self.datapath.events().expect("events")[label]
    }

    /// A SNAT flow of `client` through its handshake; its SNAT port.
    fn established(&self, client: SocketAddrV4) -> u16 {
        let port = self.connect(client).expect("a SNAT port");
        let snat = SocketAddrV4::new(NODE, port);
        let syn_ack = self.xdp(&packet::tcp(REMOTE_POD, snat, TcpFlags::SYN_ACK, b""));
        assert_eq!(
            syn_ack.verdict, XDP_TX,
            "the SYN-ACK goes back to the client"
        );
        let ack = packet::tcp(client, FRONTEND, TcpFlags::ACK, b"");
        assert_eq!(self.snat_port_of(&ack), Some(port));
        port
    }
}

/// The client's FIN (XDP) and the endpoint's of a SNAT flow may be handled on two CPUs at once,
/// each moving its own entry to its half-close before it passes the state to the other half:
/// the half that learns of the other side's FIN must end CLOSING, not take that side's
/// half-close over its own (which left the flow half-closed for the half-closed timeout, an
/// hour by default). The moment between the client's FIN moving its FLOW entry and reaching
/// the REPLY entry is set up by hand here (two CPUs cannot be made to meet in a test); the
/// endpoint's FIN then comes through XDP as it does. The moves of one entry by two CPUs at once
/// are compare-and-swaps (`flow::move_state`), which no test can interleave.
#[test]
fn a_fin_crossing_the_other_sides_closes_both_halves_of_a_snat_flow() {
    use lb_common::tcp_state::{BACKEND_CLOSED, CLIENT_CLOSED, CLOSING};
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "crossing").expect("pin dir");
    let mut fixture = SnatFixture::new(&pins);
    let port = fixture.established(CLIENT);
    let flow_key = lb_common::Ct4Key {
        saddr: u32::from(*CLIENT.ip()),
        daddr: 0,
        sport: CLIENT.port(),
        dport: 0,
        proto: proto::TCP,
        direction: lb_common::ct_direction::FLOW,
        _pad: [0; 2],
    };
    let state = |fixture: &SnatFixture, key: &lb_common::Ct4Key| {
        fixture.conntrack.get(key, 0).expect("entry").state
    };
    // The client's FIN has moved its FLOW entry, not yet its REPLY entry.
    let mut client_side = fixture.conntrack.get(&flow_key, 0).expect("flow entry");
    client_side.state = CLIENT_CLOSED;
    fixture
        .conntrack
        .insert(&flow_key, &client_side, 0)
        .expect("client side");
    let snat = SocketAddrV4::new(NODE, port);
    let fin = fixture.xdp(&packet::tcp(REMOTE_POD, snat, TcpFlags::FIN_ACK, b""));
    assert_eq!(fin.verdict, XDP_TX, "the endpoint's FIN goes to the client");
    assert_eq!(
        state(&fixture, &SnatFixture::reply_key(port)),
        BACKEND_CLOSED,
        "the REPLY entry moved by the endpoint's FIN"
    );
    assert_eq!(
        state(&fixture, &flow_key),
        CLOSING,
        "the client's half, told of the endpoint's FIN, is closed"
    );
}

#[test]
fn an_idle_snat_flow_outlives_the_closing_and_syn_timeouts() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "idle").expect("pin dir");
    let fixture = SnatFixture::with_short_timeouts(&pins);
    let port = fixture.established(CLIENT);
    // The backend's first data segment completes the handshake on its side: the flow is
    // established, not closing (it used to be closed here, then broken after the CLOSING timeout).
    let snat = SocketAddrV4::new(NODE, port);
    let data = fixture.xdp(&packet::tcp(REMOTE_POD, snat, TcpFlags::ACK, b"hello"));
    assert_eq!(data.verdict, XDP_TX);
    let original = fixture
        .datapath
        .conntrack()
        .expect("conntrack")
        .into_iter()
        .find(|(key, _)| key.direction == lb_common::ct_direction::FLOW)
        .expect("the client's flow entry")
        .1;
    assert_eq!(original.state, lb_common::tcp_state::ESTABLISHED);
    // Idle for more than twice the CLOSING and the SYN timeouts: the flow keeps its port.
    std::thread::sleep(std::time::Duration::from_millis(1800));
    let next = packet::tcp(CLIENT, FRONTEND, TcpFlags::ACK, b"more");
    assert_eq!(fixture.snat_port_of(&next), Some(port));
    assert_eq!(fixture.event("ct_flow_restarted"), 0);
}

#[test]
fn a_live_flows_snat_port_is_never_handed_to_another_client() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "owner").expect("pin dir");
    let fixture = SnatFixture::with_short_timeouts(&pins);
    let port = fixture.established(CLIENT);
    // Past the SYN timeout the backend has sent nothing since its SYN-ACK; the client's traffic
    // alone keeps the flow, and the port it owns, alive.
    for _ in 0..4 {
        std::thread::sleep(std::time::Duration::from_millis(400));
        let keepalive = packet::tcp(CLIENT, FRONTEND, TcpFlags::ACK, b"k");
        assert_eq!(fixture.snat_port_of(&keepalive), Some(port));
    }
    // Every other client takes what is left of the 32-port range, and never the live one.
    let mut taken = Vec::new();
    for client_port in 50000..50040u16 {
        if let Some(other) = fixture.connect(SocketAddrV4::new(
            Ipv4Addr::new(203, 0, 113, 20),
            client_port,
        )) {
            taken.push(other);
        }
    }
    assert!(
        !taken.contains(&port),
        "port {port} of a live flow was handed out: {taken:?}"
    );
    assert_eq!(
        taken.len(),
        usize::from(SNAT_PORTS.1 - SNAT_PORTS.0),
        "every free port is used"
    );
}

#[test]
fn a_flow_whose_reply_half_was_evicted_is_repaired_or_restarted_never_half_translated() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "halves").expect("pin dir");
    let mut fixture = SnatFixture::new(&pins);
    let port = fixture.established(CLIENT);
    // The LRU map evicts the REPLY half alone: the next packet writes it again.
    fixture
        .conntrack
        .remove(&SnatFixture::reply_key(port))
        .expect("evict");
    let next = packet::tcp(CLIENT, FRONTEND, TcpFlags::ACK, b"a");
    assert_eq!(fixture.snat_port_of(&next), Some(port));
    assert_eq!(fixture.event("ct_reply_restored"), 1);
    let snat = SocketAddrV4::new(NODE, port);
    let answer = fixture.xdp(&packet::tcp(REMOTE_POD, snat, TcpFlags::ACK, b"b"));
    assert_eq!(answer.verdict, XDP_TX);
    let mut expected = packet::tcp(FRONTEND, CLIENT, TcpFlags::ACK, b"b");
    // Back the way the client came: to its MAC, from the node's.
    expected[0..6].copy_from_slice(&packet::CLIENT_MAC);
    expected[6..12].copy_from_slice(&packet::NODE_MAC);
    expected[packet::ETH_HDR_LEN + 8] -= 1;
    packet::fix_ip_checksum(&mut expected);
    assert_eq!(
        answer.packet,
        expected,
        "the answer is translated back to the client:\n{}",
        lab::table::diff(&expected, &answer.packet)
    );

    // Meanwhile another flow took the reply tuple: this one starts over on another port.
    let foreign = lb_common::Ct4Value {
        last_seen_ns: lb_userspace::observe::inspect::monotonic_ns(),
        state: lb_common::tcp_state::ESTABLISHED,
        flags: lb_common::ct_flags::SNAT,
        snat_addr: u32::from(Ipv4Addr::new(203, 0, 113, 99)),
        snat_port: 1234,
        nat_addr: u32::from(NODE),
        nat_port: NODE_PORT,
        ..Default::default()
    };
    fixture
        .conntrack
        .insert(&SnatFixture::reply_key(port), &foreign, 0)
        .expect("foreign entry");
    let next = packet::tcp(CLIENT, FRONTEND, TcpFlags::ACK, b"c");
    let new_port = fixture.snat_port_of(&next).expect("a new port");
    assert_ne!(new_port, port);
    assert_eq!(fixture.event("ct_flow_restarted"), 1);
    let still_foreign = fixture
        .conntrack
        .get(&SnatFixture::reply_key(port), 0)
        .expect("entry");
    assert_eq!(
        still_foreign.snat_port, 1234,
        "the other flow keeps its tuple"
    );
}

/// SNAT ports are spread over the whole range, so new flows find one until the range is nearly
/// full. A flow is refused only when all of its 128 distinct probes hit ports in use: at 95% of
/// 256 ports that happens once in about 8,000 flows, so this test's chance of a refusal below
/// 95% is about 2 in 10,000.
#[test]
fn snat_ports_are_refused_only_when_the_range_is_nearly_full() {
    const RANGE: (u16, u16) = (50000, 50255);
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "snatfill").expect("pin dir");
    let fixture = SnatFixture::with_ports(&pins, RANGE);
    let size = usize::from(RANGE.1 - RANGE.0) + 1;
    let mut taken = std::collections::BTreeSet::new();
    let mut first_refusal = None;
    for client in 0..size + 16 {
        let client = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 20000 + client as u16);
        match fixture.connect(client) {
            Some(port) => {
                assert!((RANGE.0..=RANGE.1).contains(&port), "port {port}");
                assert!(taken.insert(port), "port {port} handed out twice");
            }
            None => {
                first_refusal.get_or_insert(taken.len());
            }
        }
    }
    let first_refusal = first_refusal.expect("a full range refuses");
    assert!(
        first_refusal * 100 >= size * 95,
        "first refusal with {first_refusal} of {size} ports in use"
    );
    assert!(
        taken.len() * 100 >= size * 99,
        "{} of {size} ports handed out",
        taken.len()
    );
    let refused = (size + 16 - taken.len()) as u64;
    assert_eq!(
        fixture.datapath.events().expect("events")["drop_snat_exhausted"],
        refused
    );
    println!(
        "first refusal at {first_refusal} of {size} ports; {} handed out",
        taken.len()
    );
}

/// 600,000 spoofed clients through a conntrack map of 524,288 entries, with the pod answering
/// every tenth: the LRU evicts the flows of many. A flow to a local endpoint is one entry, so
/// it is kept whole or lost whole, never half; a lost one's next packet starts it again. Every
/// lost flow checked, and a sample of the rest, gets its next packet to its backend and the
/// backend's answer back translated: no flow is ever half-translated.
#[test]
fn after_a_flood_that_evicts_flows_every_flow_is_whole_again_on_its_next_packet() {
    const FLOOD: u32 = 600_000;
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "flood").expect("pin dir");
    let datapath = datapath(&pins, vec![1]);
    let xdp = datapath
        .program_fd(lb_common::program_names::XDP_LB)
        .expect("fd");
    let tc = datapath
        .program_fd(lb_common::program_names::TC_EGRESS)
        .expect("fd");
    let client = |index: u32| {
        let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + index / 60_000);
        SocketAddrV4::new(addr, 1024 + (index % 60_000) as u16)
    };
    let mut syn = packet::tcp(client(0), FRONTEND, TcpFlags::SYN, b"");
    let mut syn_ack = packet::tcp(POD_A, client(0), TcpFlags::SYN_ACK, b"");
    let started = std::time::Instant::now();
    for index in 0..FLOOD {
        set_source(&mut syn, client(index));
        let run = lb_userspace::datapath::testrun::test_run(xdp, &syn).expect("run");
        assert_eq!(run.verdict, XDP_PASS, "flood syn {index}");
        if index % 10 == 0 {
            set_destination(&mut syn_ack, client(index));
            let run = lb_userspace::datapath::testrun::test_run(tc, &syn_ack).expect("run");
            assert_eq!(run.verdict, TC_ACT_OK, "syn-ack {index}");
        }
    }
    let entries = datapath.conntrack().expect("conntrack");
    assert!(
        entries
            .iter()
            .all(|(key, _)| key.direction == lb_common::ct_direction::FLOW),
        "flows to a local endpoint are kept in one entry each"
    );
    let kept: std::collections::HashSet<(u32, u16)> = entries
        .iter()
        .map(|(key, _)| (key.saddr, key.sport))
        .collect();
    let lost: Vec<(u32, u16)> = (0..FLOOD)
        .map(|index| {
            let client = client(index);
            (u32::from(*client.ip()), client.port())
        })
        .filter(|client| !kept.contains(client))
        .collect();
    println!(
        "flood of {FLOOD} in {:?}: {} entries, {} flows lost",
        started.elapsed(),
        entries.len(),
        lost.len()
    );
    // Every lost flow, and a sample of the rest, gets its next packet through and its answer
    // back.
    let mut checked = 0;
    for (saddr, sport) in lost
        .iter()
        .copied()
        .take(5_000)
        .chain((0..FLOOD).step_by(997).map(|index| {
            let client = client(index);
            (u32::from(*client.ip()), client.port())
        }))
    {
        let client = SocketAddrV4::new(Ipv4Addr::from(saddr), sport);
        let run = lb_userspace::datapath::testrun::test_run(
            xdp,
            &packet::tcp(client, FRONTEND, TcpFlags::ACK, b"next"),
        )
        .expect("run");
        assert_eq!(run.verdict, XDP_PASS, "{client}");
        assert_eq!(
            run.packet,
            packet::tcp(client, POD_A, TcpFlags::ACK, b"next"),
            "{client}: to the pod"
        );
        let answer = lb_userspace::datapath::testrun::test_run(
            tc,
            &packet::tcp(POD_A, client, TcpFlags::ACK, b"answer"),
        )
        .expect("run");
        assert_eq!(answer.verdict, TC_ACT_OK, "{client}");
        assert_eq!(
            answer.packet,
            packet::tcp(FRONTEND, client, TcpFlags::ACK, b"answer"),
            "{client}: its answer from the frontend"
        );
        checked += 1;
    }
    assert!(!lost.is_empty(), "the flood evicted flows");
    println!("{checked} flows checked whole");

    // An agent restart with the map this full: the new load walks every entry to rebuild the
    // backend filter, and the new programs translate a kept flow's answer.
    let started = std::time::Instant::now();
    let reloaded = Datapath::load(pins.path()).expect("reload");
    println!(
        "reload with {} conntrack entries: {:?}",
        entries.len(),
        started.elapsed()
    );
    let maps = lb_userspace::observe::inspect::PinnedMaps::open(pins.path()).expect("pins");
    let started = std::time::Instant::now();
    let fill = maps.fill().expect("fill");
    println!(
        "map fill as a scrape reads it, conntrack this full: {:?} ({:?})",
        started.elapsed(),
        fill.iter()
            .find(|map| map.map == lb_common::map_names::CONNTRACK4)
    );
    let kept_client = client(FLOOD - 1);
    let answer = lb_userspace::datapath::testrun::test_run(
        reloaded
            .program_fd(lb_common::program_names::TC_EGRESS)
            .expect("fd"),
        &packet::tcp(POD_A, kept_client, TcpFlags::ACK, b"after"),
    )
    .expect("run");
    assert_eq!(
        answer.packet,
        packet::tcp(FRONTEND, kept_client, TcpFlags::ACK, b"after")
    );
}

/// Rewrites a frame's IPv4 source and TCP source port, with both checksums recomputed in full
/// by etherparse.
fn set_source(frame: &mut Vec<u8>, source: SocketAddrV4) {
    rewrite_tcp_frame(frame, |ip, tcp| {
        ip.source = source.ip().octets();
        tcp.source_port = source.port();
    });
}

/// As [`set_source`], for the destination.
fn set_destination(frame: &mut Vec<u8>, destination: SocketAddrV4) {
    rewrite_tcp_frame(frame, |ip, tcp| {
        ip.destination = destination.ip().octets();
        tcp.destination_port = destination.port();
    });
}

fn rewrite_tcp_frame(
    frame: &mut Vec<u8>,
    change: impl FnOnce(&mut etherparse::Ipv4Header, &mut etherparse::TcpHeader),
) {
    let parsed = etherparse::PacketHeaders::from_ethernet_slice(frame).expect("parse");
    let Some(etherparse::NetHeaders::Ipv4(mut ip, _)) = parsed.net else {
        panic!("ipv4")
    };
    let Some(etherparse::TransportHeader::Tcp(mut tcp)) = parsed.transport else {
        panic!("tcp")
    };
    change(&mut ip, &mut tcp);
    tcp.checksum = tcp.calc_checksum_ipv4(&ip, &[]).expect("checksum");
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = frame[..packet::ETH_HDR_LEN].to_vec();
    ip.write(&mut out).expect("ip");
    tcp.write(&mut out).expect("tcp");
    *frame = out;
}

/// Service 1 on the NodePort FRONTEND and on an externalIP, both to pod A only: one endpoint
/// behind two frontends. Returns the externalIP frontend.
fn two_frontends_of_pod_a(datapath: &mut Datapath) -> SocketAddrV4 {
    two_frontends_of_pod_a_for(datapath, proto::TCP)
}

/// [`two_frontends_of_pod_a`] for `protocol`: service 1 with backend 1 (TCP), or service 2 with
/// backend 3 (UDP).
fn two_frontends_of_pod_a_for(datapath: &mut Datapath, protocol: u8) -> SocketAddrV4 {
    let external = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 7), 80);
    let (id, backend) = if protocol == proto::UDP {
        (2, 3)
    } else {
        (1, 1)
    };
    let service = Service {
        id,
        frontends: vec![
            node_port(protocol),
            Frontend {
                addr: std::net::IpAddr::V4(*external.ip()),
                port: external.port(),
                proto: protocol,
                kind: service_flags::EXTERNAL_IP,
            },
        ],
        backends: vec![backend],
        ..Default::default()
    };
    datapath.put_service(&service).expect("service");
    external
}

#[test]
fn one_client_port_to_two_frontends_of_one_endpoint_gets_its_source_port_remapped() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "clash").expect("pin dir");
    let mut datapath = datapath(&pins, vec![1]);
    let external = two_frontends_of_pod_a(&mut datapath);
    let xdp = || {
        datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd")
    };
    let tc = || {
        datapath
            .program_fd(lb_common::program_names::TC_EGRESS)
            .expect("fd")
    };
    run_table(
        xdp(),
        &[case(
            "first flow",
            packet::tcp(CLIENT, FRONTEND, TcpFlags::SYN, b""),
            XDP_PASS,
            Expect::Bytes(packet::tcp(CLIENT, POD_A, TcpFlags::SYN, b"")),
        )],
    );
    let second = lb_userspace::datapath::testrun::test_run(
        xdp(),
        &packet::tcp(CLIENT, external, TcpFlags::SYN, b""),
    )
    .expect("run");
    assert_eq!(second.verdict, XDP_PASS);
    let parsed = etherparse::SlicedPacket::from_ethernet(&second.packet).expect("parse");
    let Some(etherparse::TransportSlice::Tcp(tcp)) = parsed.transport else {
        panic!("tcp")
    };
    let remapped = SocketAddrV4::new(*CLIENT.ip(), tcp.source_port());
    assert_ne!(
        remapped.port(),
        CLIENT.port(),
        "the clashing flow's port moved"
    );
    assert_eq!(
        second.packet,
        packet::tcp(remapped, POD_A, TcpFlags::SYN, b""),
        "only the source port changed"
    );
    assert_eq!(datapath.events().expect("events")["nat_port_remap"], 1);
    // Each flow's answers go back to the client's own port, from the frontend it used.
    run_table(
        tc(),
        &[
            case(
                "answer of the first flow",
                packet::tcp(POD_A, CLIENT, TcpFlags::SYN_ACK, b""),
                TC_ACT_OK,
                Expect::Bytes(packet::tcp(FRONTEND, CLIENT, TcpFlags::SYN_ACK, b"")),
            ),
            case(
                "answer of the remapped flow",
                packet::tcp(POD_A, remapped, TcpFlags::SYN_ACK, b""),
                TC_ACT_OK,
                Expect::Bytes(packet::tcp(external, CLIENT, TcpFlags::SYN_ACK, b"")),
            ),
        ],
    );
}

/// One run of `lb_xdp` over `frame`.
fn xdp_once(datapath: &Datapath, frame: &[u8]) -> lb_userspace::datapath::testrun::TestRunOutput {
    let program = datapath
        .program_fd(lb_common::program_names::XDP_LB)
        .expect("fd");
    lb_userspace::datapath::testrun::test_run(program, frame).expect("run")
}

/// The TCP source port of a frame.
fn tcp_source_port(frame: &[u8]) -> u16 {
    let parsed = etherparse::SlicedPacket::from_ethernet(frame).expect("parse");
    let Some(etherparse::TransportSlice::Tcp(tcp)) = parsed.transport else {
        panic!("tcp")
    };
    tcp.source_port()
}

/// Flows kept as two entries (ORIGINAL and REPLY) live beside the FLOW entries of the rest: a
/// pair written by the previous datapath goes on, and gets a FLOW entry at the next load; a flow whose client port
/// another flow holds is kept as a pair with its port remapped, never onto a port the client's
/// own FLOW entries take answers on, and goes on when the owner's entry is gone; a new flow
/// whose reply tuple a pair holds is kept as a pair too. Every answer goes back from the
/// frontend its own flow used.
#[test]
fn flows_kept_as_two_entries_go_on_beside_flow_entries_and_never_share_a_reply_tuple() {
    use lb_common::{Ct4Key, Ct4Value, ct_direction, ct_flags, tcp_state};
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "pairs").expect("pin dir");
    let mut datapath = datapath(&pins, vec![1]);
    let external = two_frontends_of_pod_a(&mut datapath);
    let remap_range = |datapath: &mut Datapath, max: u16| {
        datapath
            .set_config(&lb_common::DatapathConfig {
                snat_port_min: 50000,
                snat_port_max: max,
                ..Default::default()
            })
            .expect("config")
    };
    remap_range(&mut datapath, 50001);
    let mut conntrack: aya::maps::HashMap<_, Ct4Key, Ct4Value> =
        lab::table::pinned_conntrack(pins.path(), lb_common::map_names::CONNTRACK4);
    let xdp = xdp_once;
    fn tc(datapath: &Datapath) -> std::os::fd::BorrowedFd<'_> {
        datapath
            .program_fd(lb_common::program_names::TC_EGRESS)
            .expect("fd")
    }
    let client = |port: u16| SocketAddrV4::new(*CLIENT.ip(), port);

    // An established flow as the previous datapath kept it: an ORIGINAL and a REPLY entry.
    let old_client = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 9), 40000);
    let now = lb_userspace::observe::inspect::monotonic_ns();
    let original = Ct4Value {
        last_seen_ns: now,
        backend_id: 1,
        service_id: 1,
        nat_addr: u32::from(*POD_A.ip()),
        nat_port: POD_A.port(),
        state: tcp_state::ESTABLISHED,
        ..Default::default()
    };
    let reply = Ct4Value {
        nat_addr: u32::from(NODE),
        nat_port: NODE_PORT,
        snat_addr: u32::from(*old_client.ip()),
        snat_port: old_client.port(),
        ..original
    };
    let key = |saddr: SocketAddrV4, daddr: SocketAddrV4, direction| Ct4Key {
        saddr: u32::from(*saddr.ip()),
        daddr: u32::from(*daddr.ip()),
        sport: saddr.port(),
        dport: daddr.port(),
        proto: proto::TCP,
        direction,
        _pad: [0; 2],
    };
    conntrack
        .insert(
            &key(old_client, FRONTEND, ct_direction::ORIGINAL),
            &original,
            0,
        )
        .expect("original");
    conntrack
        .insert(&key(POD_A, old_client, ct_direction::REPLY), &reply, 0)
        .expect("reply");
    // Written behind this load's back, as an earlier agent's programs would: the pair filter
    // has its client's bit once the agent's keeper has walked conntrack.
    datapath.rebuild_pair_filter().expect("pair filter");
    run_table(
        datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd"),
        &[case(
            "a flow from before the upgrade",
            packet::tcp(old_client, FRONTEND, TcpFlags::ACK, b"on"),
            XDP_PASS,
            Expect::Bytes(packet::tcp(old_client, POD_A, TcpFlags::ACK, b"on")),
        )],
    );
    run_table(
        tc(&datapath),
        &[case(
            "its answer",
            packet::tcp(POD_A, old_client, TcpFlags::ACK, b"back"),
            TC_ACT_OK,
            Expect::Bytes(packet::tcp(FRONTEND, old_client, TcpFlags::ACK, b"back")),
        )],
    );
    let old_flow_key =
        lb_common::flow_key(u32::from(*old_client.ip()), old_client.port(), proto::TCP);
    assert!(conntrack.get(&old_flow_key, 0).is_err(), "it stays a pair");

    // The new agent's load gives it a FLOW entry, which holds its client's key: the same client
    // port to the other frontend of the same pod is then remapped, and each flow's answers go
    // back from the frontend it used (without the FLOW entry both flows would have had one
    // reply tuple).
    let mut datapath = Datapath::load(pins.path()).expect("reload");
    assert_eq!(
        datapath.pair_filter_bits(),
        1 << lb_common::pair_filter::BITS_LOG2,
        "a load beside an earlier load's conntrack starts its pair filter full"
    );
    // As the agent does once the new programs are attached.
    datapath.rebuild_pair_filter().expect("pair filter");
    assert!(
        datapath.pair_filter_bits() < 8,
        "only the pairs' bits are left: {}",
        datapath.pair_filter_bits()
    );
    let migrated = conntrack.get(&old_flow_key, 0).expect("its FLOW entry");
    let migrated = lb_common::Flow4Value::of(&migrated);
    assert_eq!(
        (migrated.frontend_addr, migrated.frontend_port),
        (u32::from(NODE), NODE_PORT)
    );
    assert_eq!(
        (migrated.backend_addr, migrated.backend_port, migrated.state),
        (u32::from(*POD_A.ip()), POD_A.port(), tcp_state::ESTABLISHED)
    );
    let run = xdp(
        &datapath,
        &packet::tcp(old_client, external, TcpFlags::SYN, b""),
    );
    assert_eq!(run.verdict, XDP_PASS);
    let old_client_remapped = SocketAddrV4::new(*old_client.ip(), tcp_source_port(&run.packet));
    assert_ne!(old_client_remapped, old_client);
    run_table(
        tc(&datapath),
        &[
            case(
                "the migrated flow's answer",
                packet::tcp(POD_A, old_client, TcpFlags::ACK, b"m"),
                TC_ACT_OK,
                Expect::Bytes(packet::tcp(FRONTEND, old_client, TcpFlags::ACK, b"m")),
            ),
            case(
                "the new flow's answer",
                packet::tcp(POD_A, old_client_remapped, TcpFlags::SYN_ACK, b""),
                TC_ACT_OK,
                Expect::Bytes(packet::tcp(external, old_client, TcpFlags::SYN_ACK, b"")),
            ),
        ],
    );

    // The client sends from both ports of the remap range to the NodePort: FLOW entries, whose
    // answers from the pod go to those ports.
    for port in [50000, 50001] {
        let run = xdp(
            &datapath,
            &packet::tcp(client(port), FRONTEND, TcpFlags::SYN, b""),
        );
        assert_eq!(
            run.packet,
            packet::tcp(client(port), POD_A, TcpFlags::SYN, b"")
        );
    }
    // One client port to both frontends: the second flow must be remapped, and no port of the
    // range is free of the client's own flows to the same pod, so it is refused.
    let owner = client(41000);
    let run = xdp(&datapath, &packet::tcp(owner, FRONTEND, TcpFlags::SYN, b""));
    assert_eq!(run.packet, packet::tcp(owner, POD_A, TcpFlags::SYN, b""));
    let clashing = packet::tcp(owner, external, TcpFlags::SYN, b"");
    assert_eq!(xdp(&datapath, &clashing).verdict, XDP_DROP);
    assert_eq!(datapath.events().expect("events")["drop_snat_exhausted"], 1);

    // A new flow that must be remapped, sent until it is: a draw of 50000 or 50001 (which the
    // client's own flows take answers on) is refused, counted, and the SYN sent again, as a
    // client's retransmission would be.
    let until_remapped = |datapath: &Datapath, syn: &[u8]| {
        let refused_before = datapath.events().expect("events")["drop_snat_exhausted"];
        let mut tries = 1;
        let mut run = xdp(datapath, syn);
        while run.verdict == XDP_DROP && tries < 30 {
            tries += 1;
            run = xdp(datapath, syn);
        }
        assert_eq!(run.verdict, XDP_PASS, "after {tries} tries");
        assert_eq!(
            datapath.events().expect("events")["drop_snat_exhausted"] - refused_before,
            tries - 1,
            "every refusal counted"
        );
        run
    };

    // With room in the range, it is remapped onto a port no FLOW entry takes answers on.
    remap_range(&mut datapath, 50009);
    let run = until_remapped(&datapath, &clashing);
    let remapped = client(tcp_source_port(&run.packet));
    assert!(
        (50002..=50009).contains(&remapped.port()),
        "remapped to {remapped}"
    );
    assert_eq!(run.packet, packet::tcp(remapped, POD_A, TcpFlags::SYN, b""));
    run_table(
        tc(&datapath),
        &[
            case(
                "answer of the remapped flow",
                packet::tcp(POD_A, remapped, TcpFlags::SYN_ACK, b""),
                TC_ACT_OK,
                Expect::Bytes(packet::tcp(external, owner, TcpFlags::SYN_ACK, b"")),
            ),
            case(
                "answer of the owner",
                packet::tcp(POD_A, owner, TcpFlags::SYN_ACK, b""),
                TC_ACT_OK,
                Expect::Bytes(packet::tcp(FRONTEND, owner, TcpFlags::SYN_ACK, b"")),
            ),
        ],
    );

    // The owner's entry is evicted: the remapped flow goes on.
    conntrack
        .remove(&lb_common::flow_key(
            u32::from(*owner.ip()),
            owner.port(),
            proto::TCP,
        ))
        .expect("evict the owner");
    let run = xdp(
        &datapath,
        &packet::tcp(owner, external, TcpFlags::ACK, b"x"),
    );
    assert_eq!(
        run.packet,
        packet::tcp(remapped, POD_A, TcpFlags::ACK, b"x")
    );

    // The client now sends from the remapped port itself: the pod's answers to that port are
    // the remapped flow's, so the new flow is kept as a pair on another port.
    let run = until_remapped(
        &datapath,
        &packet::tcp(remapped, FRONTEND, TcpFlags::SYN, b""),
    );
    let second = client(tcp_source_port(&run.packet));
    assert_ne!(second, remapped);
    let original = conntrack
        .get(&key(remapped, FRONTEND, ct_direction::ORIGINAL), 0)
        .expect("kept as a pair");
    assert_eq!(original.flags & ct_flags::PORT_REMAP, ct_flags::PORT_REMAP);
    run_table(
        tc(&datapath),
        &[
            case(
                "answer of the first remapped flow",
                packet::tcp(POD_A, remapped, TcpFlags::ACK, b""),
                TC_ACT_OK,
                Expect::Bytes(packet::tcp(external, owner, TcpFlags::ACK, b"")),
            ),
            case(
                "answer of the second",
                packet::tcp(POD_A, second, TcpFlags::SYN_ACK, b""),
                TC_ACT_OK,
                Expect::Bytes(packet::tcp(FRONTEND, remapped, TcpFlags::SYN_ACK, b"")),
            ),
        ],
    );
    // The migrated flow's neighbour, the refused-then-remapped flow and the last one.
    assert_eq!(datapath.events().expect("events")["nat_port_remap"], 3);
}

/// The pair filter lets a client's packet skip the ORIGINAL lookup only when no pair of its
/// client can be there: a UDP flow kept as a pair (its client port held by a flow to another
/// frontend) goes on after the owner's FLOW entry is evicted, with the bit its start set and
/// after the agent's rebuilds from conntrack; once the pair has gone, two rebuilds clear the
/// bit, and a datagram of a client without a pair starts a flow in one FLOW entry.
#[test]
fn a_udp_flow_kept_as_a_pair_goes_on_without_its_owner_through_the_pair_filters_rebuilds() {
    use lb_common::{Ct4Key, Ct4Value, ct_direction, ct_flags};
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "pairfilt").expect("pin dir");
    let mut datapath = datapath(&pins, vec![1]);
    let external = two_frontends_of_pod_a_for(&mut datapath, proto::UDP);
    let mut conntrack: aya::maps::HashMap<_, Ct4Key, Ct4Value> =
        lab::table::pinned_conntrack(pins.path(), lb_common::map_names::CONNTRACK4);
    let xdp = xdp_once;
    let holds = |datapath: &Datapath, client: SocketAddrV4| {
        datapath.pair_filter_holds((*client.ip()).into(), client.port(), proto::UDP)
    };
    let udp_source_port = |frame: &[u8]| {
        let parsed = etherparse::SlicedPacket::from_ethernet(frame).expect("parse");
        let Some(etherparse::TransportSlice::Udp(udp)) = parsed.transport else {
            panic!("udp")
        };
        udp.source_port()
    };
    assert!(!holds(&datapath, CLIENT), "a fresh load's filter is empty");

    // The owner: the client's port to the NodePort, one FLOW entry. The same port to the
    // externalIP of the same pod: a pair, its port remapped, its client's bit set.
    let run = xdp(&datapath, &packet::udp(CLIENT, FRONTEND, b"owner"));
    assert_eq!(run.packet, packet::udp(CLIENT, POD_A, b"owner"));
    assert!(
        !holds(&datapath, CLIENT),
        "a flow in one FLOW entry sets no bit"
    );
    let run = xdp(&datapath, &packet::udp(CLIENT, external, b"pair"));
    assert_eq!(run.verdict, XDP_PASS);
    let remapped = SocketAddrV4::new(*CLIENT.ip(), udp_source_port(&run.packet));
    assert_ne!(remapped, CLIENT, "remapped");
    assert_eq!(run.packet, packet::udp(remapped, POD_A, b"pair"));
    let original_key = Ct4Key {
        saddr: u32::from(*CLIENT.ip()),
        daddr: u32::from(*external.ip()),
        sport: CLIENT.port(),
        dport: external.port(),
        proto: proto::UDP,
        direction: ct_direction::ORIGINAL,
        _pad: [0; 2],
    };
    let original = conntrack.get(&original_key, 0).expect("kept as a pair");
    assert_eq!(original.flags & ct_flags::PORT_REMAP, ct_flags::PORT_REMAP);
    assert!(
        holds(&datapath, CLIENT),
        "the pair's start set its client's bit"
    );

    // The agent's keeper empties each generation in turn and walks conntrack: the bit stays.
    let rebuilt = datapath.rebuild_pair_filter().expect("rebuild");
    assert_eq!(rebuilt.pairs, 1, "{rebuilt:?}");
    assert!(holds(&datapath, CLIENT), "the walk found the pair");

    // The owner's FLOW entry is evicted: the pair's datagrams still find it, through the bit.
    let owner_key = lb_common::flow_key(u32::from(*CLIENT.ip()), CLIENT.port(), proto::UDP);
    conntrack.remove(&owner_key).expect("evict the owner");
    run_table(
        datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd"),
        &[case(
            "the pair's next datagram, its owner gone",
            packet::udp(CLIENT, external, b"on"),
            XDP_PASS,
            Expect::Bytes(packet::udp(remapped, POD_A, b"on")),
        )],
    );
    assert!(
        conntrack.get(&owner_key, 0).is_err(),
        "no new flow took the client's key"
    );

    // The pair goes (evicted too): two rebuilds later its bit is clear, and the same client
    // port starts a flow in one FLOW entry.
    conntrack.remove(&original_key).expect("evict the pair");
    datapath.rebuild_pair_filter().expect("rebuild");
    assert!(!holds(&datapath, CLIENT), "the gone pair's bit is dropped");
    let run = xdp(&datapath, &packet::udp(CLIENT, external, b"anew"));
    assert_eq!(run.packet, packet::udp(CLIENT, POD_A, b"anew"));
    let flow = conntrack.get(&owner_key, 0).expect("a FLOW entry");
    let flow = lb_common::Flow4Value::of(&flow);
    assert_eq!(
        (flow.frontend_addr, flow.frontend_port),
        (u32::from(*external.ip()), external.port())
    );
    assert!(!holds(&datapath, CLIENT));
}

/// A remapped flow may draw the port of a FLOW entry that is over but still in the map (the LRU
/// map keeps it until it needs the room): the dead entry goes, and the pod's answers to that port
/// are the remapped flow's, not translated as the dead one's.
#[test]
fn a_remap_onto_the_port_of_a_dead_flow_entry_takes_the_answers_from_it() {
    use std::time::Duration;
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "deadflow").expect("pin dir");
    let mut datapath = datapath(&pins, vec![1]);
    let external = two_frontends_of_pod_a(&mut datapath);
    // One port to remap to, and half-open flows over after 300 ms.
    datapath
        .set_config(&lb_common::DatapathConfig {
            snat_port_min: 50000,
            snat_port_max: 50000,
            timeouts: lb_common::CtTimeouts {
                tcp_syn: Duration::from_millis(300).as_nanos() as u64,
                ..Default::default()
            },
            ..Default::default()
        })
        .expect("config");
    let xdp = || {
        datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd")
    };
    let dead = SocketAddrV4::new(*CLIENT.ip(), 50000);
    let owner = SocketAddrV4::new(*CLIENT.ip(), 41000);
    run_table(
        xdp(),
        &[case(
            "a flow from the port that will be remapped to, left half-open",
            packet::tcp(dead, FRONTEND, TcpFlags::SYN, b""),
            XDP_PASS,
            Expect::Bytes(packet::tcp(dead, POD_A, TcpFlags::SYN, b"")),
        )],
    );
    std::thread::sleep(Duration::from_millis(400));
    run_table(
        xdp(),
        &[
            case(
                "the owner of the client port",
                packet::tcp(owner, FRONTEND, TcpFlags::SYN, b""),
                XDP_PASS,
                Expect::Bytes(packet::tcp(owner, POD_A, TcpFlags::SYN, b"")),
            ),
            case(
                "the same client port to the other frontend: remapped onto the dead flow's port",
                packet::tcp(owner, external, TcpFlags::SYN, b""),
                XDP_PASS,
                Expect::Bytes(packet::tcp(dead, POD_A, TcpFlags::SYN, b"")),
            ),
        ],
    );
    run_table(
        datapath
            .program_fd(lb_common::program_names::TC_EGRESS)
            .expect("fd"),
        &[case(
            "the pod's answer to that port",
            packet::tcp(POD_A, dead, TcpFlags::SYN_ACK, b""),
            TC_ACT_OK,
            Expect::Bytes(packet::tcp(external, owner, TcpFlags::SYN_ACK, b"")),
        )],
    );
}

/// `frame` (IPv4 without options) with its TCP data offset set to `words` 32-bit words.
fn with_tcp_data_offset(frame: &[u8], words: u8) -> Vec<u8> {
    let mut out = frame.to_vec();
    let data_offset = packet::ETH_HDR_LEN + 20 + 12;
    out[data_offset] = (words << 4) | (out[data_offset] & 0x0f);
    out
}

/// A frame with its IPv4 header changed by `edit`, then its header checksum made right again
/// (etherparse), so only the edited field is wrong.
fn with_ip_header(frame: &[u8], edit: impl Fn(&mut [u8])) -> Vec<u8> {
    let mut out = frame.to_vec();
    edit(&mut out[packet::ETH_HDR_LEN..]);
    packet::fix_ip_checksum(&mut out);
    out
}

#[test]
fn packets_the_stack_would_drop_create_no_state_and_rejects_answer_unicast_only() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "hostile").expect("pin dir");
    let datapath = datapath(&pins, vec![1]);
    let syn = packet::tcp(CLIENT, FRONTEND, TcpFlags::SYN, b"");
    let udp = packet::udp(CLIENT, FRONTEND, b"query");
    let l4 = packet::ETH_HDR_LEN + 20;
    let mut bad_checksum = syn.clone();
    bad_checksum[packet::ETH_HDR_LEN + 10] ^= 0xff;
    // An option changed after the checksum was made: only the options' part of the sum is off.
    let mut bad_option = packet::with_ip_options(&syn, &IP_OPTIONS);
    bad_option[packet::ETH_HDR_LEN + 20 + 9] ^= 0x01;
    let longer_than_frame = with_ip_header(&syn, |ip| {
        let total = u16::from_be_bytes([ip[2], ip[3]]) + 100;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
    });
    let mut short_data_offset = syn.clone();
    short_data_offset[l4 + 12] = 4 << 4;
    let mut data_offset_past_packet = syn.clone();
    data_offset_past_packet[l4 + 12] = 15 << 4;
    let mut udp_length_past_packet = udp.clone();
    udp_length_past_packet[l4 + 4..l4 + 6].copy_from_slice(&200u16.to_be_bytes());
    let reject_from = |source: Ipv4Addr| {
        with_ip_header(
            &packet::tcp(
                SocketAddrV4::new(source, 40000),
                EMPTY_FRONTEND,
                TcpFlags::SYN,
                b"",
            ),
            |_| {},
        )
    };
    let mut to_broadcast_mac = packet::tcp(CLIENT, EMPTY_FRONTEND, TcpFlags::SYN, b"");
    to_broadcast_mac[0..6].copy_from_slice(&[0xff; 6]);
    let cases = vec![
        case(
            "bad ip header checksum",
            bad_checksum,
            XDP_DROP,
            Expect::Unchanged,
        ),
        case(
            "an ip option changed after the header checksum",
            bad_option,
            XDP_DROP,
            Expect::Unchanged,
        ),
        case(
            "ip total length past the frame",
            longer_than_frame,
            XDP_DROP,
            Expect::Unchanged,
        ),
        case(
            "tcp data offset below 5",
            short_data_offset,
            XDP_DROP,
            Expect::Unchanged,
        ),
        case(
            "tcp data offset past the packet",
            data_offset_past_packet,
            XDP_DROP,
            Expect::Unchanged,
        ),
        case(
            "udp length past the packet",
            udp_length_past_packet,
            XDP_DROP,
            Expect::Unchanged,
        ),
        case(
            "802.1q tagged frame",
            packet::non_ip(0x8100, 60),
            XDP_PASS,
            Expect::Unchanged,
        ),
        case(
            "no reject to a broadcast source",
            reject_from(Ipv4Addr::BROADCAST),
            XDP_DROP,
            Expect::Unchanged,
        ),
        case(
            "no reject to a multicast source",
            reject_from(Ipv4Addr::new(224, 0, 0, 1)),
            XDP_DROP,
            Expect::Unchanged,
        ),
        case(
            "no reject to 0.0.0.0",
            reject_from(Ipv4Addr::UNSPECIFIED),
            XDP_DROP,
            Expect::Unchanged,
        ),
        case(
            "no reject to loopback",
            reject_from(Ipv4Addr::LOCALHOST),
            XDP_DROP,
            Expect::Unchanged,
        ),
        case(
            "no reject of a link-layer broadcast: not this node's, untouched",
            to_broadcast_mac,
            XDP_PASS,
            Expect::Unchanged,
        ),
    ];
    run_table(
        datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd"),
        &cases,
    );
    assert!(
        datapath.conntrack().expect("conntrack").is_empty(),
        "no state created"
    );
    let events = datapath.events().expect("events");
    assert_eq!(events["drop_ip_checksum"], 2);
    assert_eq!(events["drop_malformed"], 4);
    assert_eq!(events["pass_vlan"], 1);
    assert_eq!(events["drop_reject_not_unicast"], 4);
    assert_eq!(events["pass_other_host"], 1);
    assert_eq!(events["reject_tcp_rst"], 0);
}

#[test]
fn a_new_flow_to_a_remote_backend_whose_ttl_runs_out_goes_to_the_stack_untranslated() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "ttl").expect("pin dir");
    let fixture = SnatFixture::new(&pins);
    let last_hop = with_ip_header(&packet::tcp(CLIENT, FRONTEND, TcpFlags::SYN, b""), |ip| {
        ip[8] = 1
    });
    run_table(
        fixture
            .datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd"),
        &[case(
            "ttl 1 towards a remote backend",
            last_hop,
            XDP_PASS,
            Expect::Unchanged,
        )],
    );
    assert!(
        fixture.datapath.conntrack().expect("conntrack").is_empty(),
        "no port taken"
    );
    assert_eq!(fixture.event("pass_ttl_exceeded"), 1);
}

/// The cgroup_skb egress check of loadBalancerSourceRanges (`lb_sock_egress4`) applies only to
/// sockets the hooks translated for such a service, which they mark in socket-local storage.
/// BPF_PROG_TEST_RUN runs the program on a fresh dummy socket (net/bpf/test_run.c,
/// `bpf_prog_test_run_skb`) that no hook ever saw, so these rows are every other socket's path:
/// passed, nothing counted, whatever the addresses. The drops themselves are tested with real
/// sockets in sockets_lab.rs. The kernel hands a cgroup_skb program the packet from its network
/// header and zeroes the Ethernet header of the output.
#[test]
fn socket_egress_passes_the_packets_of_sockets_the_hooks_did_not_translate() {
    const PASS_PACKET: u32 = 1;
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "sock-egress").expect("pin dir");
    let mut datapath = datapath(&pins, vec![1]);
    let load_balancer = Service {
        id: 5,
        frontends: vec![Frontend {
            addr: Ipv4Addr::new(198, 51, 100, 20).into(),
            port: 80,
            proto: proto::TCP,
            kind: service_flags::LOAD_BALANCER,
        }],
        backends: vec![1],
        flags: service_flags::SOURCE_RANGES,
        source_ranges: [(Ipv4Addr::new(10, 244, 2, 0).into(), 24)].into(),
        ..Default::default()
    };
    datapath.put_service(&load_balancer).expect("service");
    let outside_ranges = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 99), 40000);
    let egress = |frame: Vec<u8>| {
        let mut output = frame.clone();
        output[..14].fill(0);
        (frame, Expect::Bytes(output))
    };
    let rows = [
        (
            "TCP SYN to the backend, from outside the ranges",
            egress(packet::tcp(outside_ranges, POD_A, TcpFlags::SYN, b"")),
        ),
        (
            "UDP to a backend, from outside the ranges",
            egress(packet::udp(outside_ranges, POD_A, b"hello")),
        ),
        (
            "TCP to the LoadBalancer IP itself",
            egress(packet::tcp(
                outside_ranges,
                SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 20), 80),
                TcpFlags::SYN,
                b"",
            )),
        ),
    ];
    let cases: Vec<Case> = rows
        .into_iter()
        .map(|(name, (input, output))| case(name, input, PASS_PACKET, output))
        .collect();
    run_table(
        datapath
            .program_fd(lb_common::program_names::SOCK_EGRESS4)
            .expect("fd"),
        &cases,
    );
    assert_eq!(datapath.events().expect("events")["drop_source_range"], 0);
}

/// Established TCP segments go where their flow goes without a look at the frontend entry, past
/// the frontend filter: a flow admitted by loadBalancerSourceRanges stops once its client is
/// outside them, and a flow whose frontend is gone (its filter bit cleared) is no longer
/// translated.
#[test]
fn established_tcp_follows_its_flow_and_the_source_ranges_that_admitted_it() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "ctfirst").expect("pin dir");
    let mut datapath = datapath(&pins, vec![1]);
    let load_balancer_ip = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 20), 80);
    let admitted = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 7), 41000);
    let with_ranges = |ranges: &[(Ipv4Addr, u8)]| Service {
        id: 5,
        frontends: vec![Frontend {
            addr: std::net::IpAddr::V4(*load_balancer_ip.ip()),
            port: load_balancer_ip.port(),
            proto: proto::TCP,
            kind: service_flags::LOAD_BALANCER,
        }],
        backends: vec![1],
        flags: service_flags::SOURCE_RANGES,
        source_ranges: ranges
            .iter()
            .map(|&(addr, len)| (addr.into(), len))
            .collect(),
        ..Default::default()
    };
    datapath
        .put_service(&with_ranges(&[(Ipv4Addr::new(192, 0, 2, 0), 24)]))
        .expect("service");
    let xdp = |datapath: &Datapath, name, frame, verdict, output| {
        run_table(
            datapath
                .program_fd(lb_common::program_names::XDP_LB)
                .expect("fd"),
            &[case(name, frame, verdict, output)],
        )
    };
    let to_pod = |from, flags| Expect::Bytes(packet::tcp(from, POD_A, flags, b""));
    xdp(
        &datapath,
        "syn from inside the ranges",
        packet::tcp(admitted, load_balancer_ip, TcpFlags::SYN, b""),
        XDP_PASS,
        to_pod(admitted, TcpFlags::SYN),
    );
    xdp(
        &datapath,
        "its ack",
        packet::tcp(admitted, load_balancer_ip, TcpFlags::ACK, b""),
        XDP_PASS,
        to_pod(admitted, TcpFlags::ACK),
    );
    // A NodePort flow, admitted by no range, of the TCP service.
    xdp(
        &datapath,
        "node port syn",
        packet::tcp(CLIENT, FRONTEND, TcpFlags::SYN, b""),
        XDP_PASS,
        to_pod(CLIENT, TcpFlags::SYN),
    );
    // The client's range goes (another one stays, so the frontend still restricts).
    datapath
        .put_service(&with_ranges(&[(Ipv4Addr::new(203, 0, 113, 0), 24)]))
        .expect("ranges changed");
    xdp(
        &datapath,
        "the admitted flow, its range removed",
        packet::tcp(admitted, load_balancer_ip, TcpFlags::ACK, b""),
        XDP_DROP,
        Expect::Unchanged,
    );
    assert_eq!(datapath.events().expect("events")["drop_source_range"], 1);
    // The NodePort Service leaves: neither its established flow nor a new one is translated.
    datapath.remove_service(1).expect("remove");
    xdp(
        &datapath,
        "the node port flow, its service gone",
        packet::tcp(CLIENT, FRONTEND, TcpFlags::ACK, b"more"),
        XDP_PASS,
        Expect::Unchanged,
    );
    let newcomer = SocketAddrV4::new(*CLIENT.ip(), 40077);
    xdp(
        &datapath,
        "a new flow to the gone service",
        packet::tcp(newcomer, FRONTEND, TcpFlags::SYN, b""),
        XDP_PASS,
        Expect::Unchanged,
    );
    xdp(
        &datapath,
        "a segment of no flow to the gone service",
        packet::tcp(newcomer, FRONTEND, TcpFlags::ACK, b""),
        XDP_PASS,
        Expect::Unchanged,
    );
}

#[test]
fn later_fragments_follow_their_first_fragment_to_a_local_endpoint_and_back() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "frag").expect("pin dir");
    let datapath = datapath(&pins, vec![1]);
    let payload = [0x5a; 600];
    // Expected fragments: the translated datagram (UDP checksum over all of it, by etherparse)
    // cut where the input was.
    let to_service = packet::fragments(&packet::udp(CLIENT, FRONTEND, &payload), 304);
    let to_pod = packet::fragments(&packet::udp(CLIENT, POD_A, &payload), 304);
    let mut unknown = packet::fragments(&packet::udp(CLIENT, FRONTEND, &payload), 304)[1].clone();
    unknown[packet::ETH_HDR_LEN + 4] = 0x77;
    packet::fix_ip_checksum(&mut unknown);
    let mut rows = fragment_rows(
        ["first fragment", "later fragment"],
        &to_service,
        XDP_PASS,
        &to_pod,
    );
    rows.push(case(
        "later fragment of an unknown datagram",
        unknown,
        XDP_PASS,
        Expect::Unchanged,
    ));
    run_table(
        datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd"),
        &rows,
    );
    assert_eq!(datapath.events().expect("events")["pass_fragment"], 1);
    let udp = datapath.service_counter(2).expect("counter");
    let frame_bytes = (to_service[0].len() + to_service[1].len()) as u64;
    assert_eq!(
        (udp.packets, udp.bytes, udp.new_flows),
        (2, frame_bytes, 1),
        "both fragments counted for the service, the unknown one for none: {udp:?}"
    );
    let answer = packet::fragments(&packet::udp(POD_A, CLIENT, &payload), 304);
    let translated = packet::fragments(&packet::udp(FRONTEND, CLIENT, &payload), 304);
    let mut unknown_answer = answer[1].clone();
    unknown_answer[packet::ETH_HDR_LEN + 4] = 0x77;
    packet::fix_ip_checksum(&mut unknown_answer);
    let mut rows = fragment_rows(
        [
            "first fragment of the answer",
            "later fragment of the answer",
        ],
        &answer,
        TC_ACT_OK,
        &translated,
    );
    rows.push(case(
        "later fragment of an answer with no first fragment seen",
        unknown_answer,
        TC_ACT_OK,
        Expect::Unchanged,
    ));
    run_table(
        datapath
            .program_fd(lb_common::program_names::TC_EGRESS)
            .expect("fd"),
        &rows,
    );
    assert_eq!(
        datapath.events().expect("events")["pass_fragment"],
        2,
        "tc counts the later fragment it has no record for"
    );
}

/// The record of a first fragment serves its datagram's later fragments for a few seconds
/// only (`lb_common::fragments::LIFETIME`): the key (addresses, IP identification, protocol)
/// comes round, and a later fragment of another datagram with it (one to a port of the node's
/// own, which writes no record, or one whose first fragment has not come) must not take this
/// datagram's translation, in XDP nor in tc. The test waits the lifetime out.
#[test]
fn a_first_fragments_record_serves_its_later_fragments_for_a_few_seconds_only() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "fragage").expect("pin dir");
    let datapath = datapath(&pins, vec![1]);
    let xdp = || {
        datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd")
    };
    let tc = || {
        datapath
            .program_fd(lb_common::program_names::TC_EGRESS)
            .expect("fd")
    };
    let payload = [0x5a; 600];
    let to_service = packet::fragments(&packet::udp(CLIENT, FRONTEND, &payload), 304);
    let to_pod = packet::fragments(&packet::udp(CLIENT, POD_A, &payload), 304);
    let answer = packet::fragments(&packet::udp(POD_A, CLIENT, &payload), 304);
    let translated = packet::fragments(&packet::udp(FRONTEND, CLIENT, &payload), 304);
    run_table(
        xdp(),
        &fragment_rows(
            ["first fragment", "later fragment"],
            &to_service,
            XDP_PASS,
            &to_pod,
        ),
    );
    run_table(
        tc(),
        &fragment_rows(
            [
                "first fragment of the answer",
                "later fragment of the answer",
            ],
            &answer,
            TC_ACT_OK,
            &translated,
        ),
    );
    let lifetime_ns =
        u64::from(lb_common::fragments::LIFETIME) << lb_common::fragments::STAMP_SHIFT;
    std::thread::sleep(
        std::time::Duration::from_nanos(lifetime_ns) + std::time::Duration::from_millis(500),
    );
    run_table(
        xdp(),
        &[case(
            "a later fragment with the key, past the record's lifetime",
            to_service[1].clone(),
            XDP_PASS,
            Expect::Unchanged,
        )],
    );
    run_table(
        tc(),
        &[case(
            "a later fragment of an answer with the key, past the record's lifetime",
            answer[1].clone(),
            TC_ACT_OK,
            Expect::Unchanged,
        )],
    );
    assert_eq!(datapath.events().expect("events")["pass_fragment"], 2);
}

/// Rows for the two fragments of a datagram and what each must become.
fn fragment_rows(
    names: [&'static str; 2],
    input: &[Vec<u8>; 2],
    verdict: u32,
    output: &[Vec<u8>; 2],
) -> Vec<Case> {
    (0..2)
        .map(|index| {
            case(
                names[index],
                input[index].clone(),
                verdict,
                Expect::Bytes(output[index].clone()),
            )
        })
        .collect()
}

/// `expected` with the Ethernet addresses and TTL the datapath gave `actual` (which depend on
/// whether it sent the frame on itself), its IP checksum recomputed.
fn as_sent(expected: &[u8], actual: &[u8]) -> Vec<u8> {
    let mut out = expected.to_vec();
    out[..12].copy_from_slice(&actual[..12]);
    out[packet::ETH_HDR_LEN + 8] = actual[packet::ETH_HDR_LEN + 8];
    packet::fix_ip_checksum(&mut out);
    out
}

#[test]
fn later_fragments_follow_their_first_fragment_through_snat_both_ways() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "fragsnat").expect("pin dir");
    let fixture = SnatFixture::new(&pins);
    let port = fixture.established(CLIENT);
    let snat = SocketAddrV4::new(NODE, port);
    let payload = [0xa5; 600];
    let request = packet::fragments(&packet::tcp(CLIENT, FRONTEND, TcpFlags::ACK, &payload), 304);
    let expected = packet::fragments(&packet::tcp(snat, REMOTE_POD, TcpFlags::ACK, &payload), 304);
    for (index, fragment) in request.iter().enumerate() {
        let run = fixture.xdp(fragment);
        assert_ne!(run.verdict, XDP_DROP, "request fragment {index}");
        let want = as_sent(&expected[index], &run.packet);
        assert_eq!(
            run.packet,
            want,
            "request fragment {index}:\n{}",
            lab::table::diff(&want, &run.packet)
        );
    }
    let answer = packet::fragments(&packet::tcp(REMOTE_POD, snat, TcpFlags::ACK, &payload), 304);
    let mut expected =
        packet::fragments(&packet::tcp(FRONTEND, CLIENT, TcpFlags::ACK, &payload), 304);
    for (index, fragment) in answer.iter().enumerate() {
        let run = fixture.xdp(fragment);
        assert_eq!(run.verdict, XDP_TX, "answer fragment {index}");
        // Back the way the client came (its MAC, from the node's), one hop less to live.
        let want = &mut expected[index];
        want[0..6].copy_from_slice(&packet::CLIENT_MAC);
        want[6..12].copy_from_slice(&packet::NODE_MAC);
        want[packet::ETH_HDR_LEN + 8] -= 1;
        packet::fix_ip_checksum(want);
        assert_eq!(
            run.packet,
            *want,
            "answer fragment {index}:\n{}",
            lab::table::diff(want, &run.packet)
        );
    }
}

/// Frames to a frontend (or about a translated flow) that were not sent to the NIC's own MAC
/// pass untouched: to another host's (a NIC in promiscuous mode), or to a group MAC, which the
/// stack never forwards either.
#[test]
fn frames_not_sent_to_the_nics_own_mac_pass_untouched() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "otherhost").expect("pin dir");
    let mut datapath = datapath(&pins, vec![1]);
    // BPF_PROG_TEST_RUN runs XDP as if the frame came in on the namespace's loopback (ifindex 1).
    datapath
        .record_nic_mac(1, packet::NODE_MAC)
        .expect("nic mac");
    let syn = packet::tcp(CLIENT, FRONTEND, TcpFlags::SYN, b"");
    let mut to_another_host = syn.clone();
    to_another_host[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    let mut to_broadcast = packet::udp(CLIENT, FRONTEND, b"query");
    to_broadcast[0..6].copy_from_slice(&[0xff; 6]);
    let mut to_multicast = packet::tcp(CLIENT, FRONTEND, TcpFlags::SYN, b"");
    to_multicast[0..6].copy_from_slice(&[0x01, 0x00, 0x5e, 0, 0, 1]);
    run_table(
        datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd"),
        &[
            case(
                "unicast to another host's mac",
                to_another_host,
                XDP_PASS,
                Expect::Unchanged,
            ),
            // The stack never forwards these (`pkt_type != PACKET_HOST`): untouched, no flow
            // that would record a group MAC as the node's.
            case(
                "link-layer broadcast",
                to_broadcast,
                XDP_PASS,
                Expect::Unchanged,
            ),
            case(
                "link-layer multicast",
                to_multicast,
                XDP_PASS,
                Expect::Unchanged,
            ),
            case(
                "to this nic's mac",
                syn,
                XDP_PASS,
                Expect::Bytes(packet::tcp(CLIENT, POD_A, TcpFlags::SYN, b"")),
            ),
            // The flow above and this datagram's first fragment are tracked: an ICMP error
            // about the one and a later fragment of the other, sent to another MAC, are not
            // this node's either.
            case(
                "first fragment to this nic's mac",
                packet::as_fragment(&packet::udp(CLIENT, FRONTEND, b"query"), 0, true),
                XDP_PASS,
                Expect::Bytes(packet::as_fragment(
                    &packet::udp(CLIENT, POD_A, b"query"),
                    0,
                    true,
                )),
            ),
            case(
                "an icmp error about the flow, to another host's mac",
                to_another_mac(packet::icmp_error(
                    Ipv4Addr::new(198, 51, 100, 254),
                    NODE,
                    (3, 4, [0, 0, 0x05, 0x78]),
                    &packet::tcp(FRONTEND, CLIENT, TcpFlags::ACK, &[7; 1400]),
                )),
                XDP_PASS,
                Expect::Unchanged,
            ),
            case(
                "a later fragment of the datagram, to another host's mac",
                to_another_mac(packet::as_fragment(
                    &packet::udp(CLIENT, FRONTEND, b"query"),
                    100,
                    false,
                )),
                XDP_PASS,
                Expect::Unchanged,
            ),
        ],
    );
    assert_eq!(datapath.events().expect("events")["pass_other_host"], 5);
}

/// `frame` sent to a unicast MAC that is not the NIC's.
fn to_another_mac(mut frame: Vec<u8>) -> Vec<u8> {
    frame[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    frame
}

#[test]
fn icmp_errors_about_a_local_endpoints_flow_reach_the_endpoint_translated() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "icmp").expect("pin dir");
    let datapath = datapath(&pins, vec![1]);
    let xdp = || {
        datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd")
    };
    run_table(
        xdp(),
        &[
            case(
                "tcp flow",
                packet::tcp(CLIENT, FRONTEND, TcpFlags::SYN, b""),
                XDP_PASS,
                Expect::Bytes(packet::tcp(CLIENT, POD_A, TcpFlags::SYN, b"")),
            ),
            case(
                "udp flow",
                packet::udp(CLIENT, FRONTEND, b"query"),
                XDP_PASS,
                Expect::Bytes(packet::udp(CLIENT, POD_A, b"query")),
            ),
        ],
    );
    let router = Ipv4Addr::new(198, 51, 100, 254);
    let fragmentation_needed = (3, 4, [0, 0, 0x05, 0x78]);
    let time_exceeded = (11, 0, [0; 4]);
    // What tc sent for the endpoint (from the frontend), and what the endpoint itself sent.
    let tcp_sent = packet::tcp(FRONTEND, CLIENT, TcpFlags::ACK, &[7; 1400]);
    let tcp_own = packet::tcp(POD_A, CLIENT, TcpFlags::ACK, &[7; 1400]);
    let udp_sent = packet::udp(FRONTEND, CLIENT, b"answer");
    let udp_own = packet::udp(POD_A, CLIENT, b"answer");
    let unknown = packet::udp(FRONTEND, SocketAddrV4::new(*CLIENT.ip(), 40999), b"answer");
    run_table(
        xdp(),
        &[
            case(
                "fragmentation needed about a tcp segment",
                packet::icmp_error(router, NODE, fragmentation_needed, &tcp_sent),
                XDP_PASS,
                Expect::Bytes(packet::icmp_error(
                    router,
                    *POD_A.ip(),
                    fragmentation_needed,
                    &tcp_own,
                )),
            ),
            case(
                "time exceeded about a udp datagram (its checksum quoted)",
                packet::icmp_error(router, NODE, time_exceeded, &udp_sent),
                XDP_PASS,
                Expect::Bytes(packet::icmp_error(
                    router,
                    *POD_A.ip(),
                    time_exceeded,
                    &udp_own,
                )),
            ),
            case(
                "about no tracked flow",
                packet::icmp_error(router, NODE, time_exceeded, &unknown),
                XDP_PASS,
                Expect::Unchanged,
            ),
            case(
                "a quote the ip total length cuts short of 8 transport bytes (the rest in the frame)",
                with_ip_header(
                    &packet::icmp_error(router, NODE, time_exceeded, &udp_sent),
                    |ip| {
                        let total = u16::from_be_bytes([ip[2], ip[3]]);
                        ip[2..4].copy_from_slice(&(total - 10).to_be_bytes());
                    },
                ),
                XDP_PASS,
                Expect::Unchanged,
            ),
            case(
                "fragmentation needed about a segment with IP options",
                packet::icmp_error(
                    router,
                    NODE,
                    fragmentation_needed,
                    &packet::with_ip_options(&tcp_sent, &IP_OPTIONS),
                ),
                XDP_PASS,
                Expect::Bytes(packet::icmp_error(
                    router,
                    *POD_A.ip(),
                    fragmentation_needed,
                    &packet::with_ip_options(&tcp_own, &IP_OPTIONS),
                )),
            ),
            case(
                "time exceeded about a udp datagram with IP options (its checksum quoted)",
                packet::icmp_error(
                    router,
                    NODE,
                    time_exceeded,
                    &packet::with_ip_options(&udp_sent, &IP_OPTIONS),
                ),
                XDP_PASS,
                Expect::Bytes(packet::icmp_error(
                    router,
                    *POD_A.ip(),
                    time_exceeded,
                    &packet::with_ip_options(&udp_own, &IP_OPTIONS),
                )),
            ),
            case(
                "fragmentation needed with IP options of its own",
                packet::with_ip_options(
                    &packet::icmp_error(router, NODE, fragmentation_needed, &tcp_sent),
                    &IP_OPTIONS,
                ),
                XDP_PASS,
                Expect::Bytes(packet::with_ip_options(
                    &packet::icmp_error(router, *POD_A.ip(), fragmentation_needed, &tcp_own),
                    &IP_OPTIONS,
                )),
            ),
            case(
                "about a later fragment whose first data bytes look like the flow's ports",
                packet::icmp_error(
                    router,
                    NODE,
                    time_exceeded,
                    &packet::as_fragment(&udp_sent, 185, false),
                ),
                XDP_PASS,
                Expect::Unchanged,
            ),
            case(
                "not an error (echo request)",
                packet::icmp_echo(router, NODE),
                XDP_PASS,
                Expect::Unchanged,
            ),
        ],
    );
    assert_eq!(
        datapath.events().expect("events")["icmp_error_translated"],
        5
    );
}

#[test]
fn icmp_errors_a_local_endpoint_sends_reach_the_client_from_the_frontend() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "icmptc").expect("pin dir");
    let datapath = datapath(&pins, vec![1]);
    run_table(
        datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd"),
        &[
            case(
                "udp flow",
                packet::udp(CLIENT, FRONTEND, b"query"),
                XDP_PASS,
                Expect::Bytes(packet::udp(CLIENT, POD_A, b"query")),
            ),
            case(
                "tcp flow",
                packet::tcp(CLIENT, FRONTEND, TcpFlags::SYN, b""),
                XDP_PASS,
                Expect::Bytes(packet::tcp(CLIENT, POD_A, TcpFlags::SYN, b"")),
            ),
        ],
    );
    let port_unreachable = (3, 3, [0; 4]);
    // What the endpoint got (addressed to it) and what the client sent (to the frontend).
    let udp_received = packet::udp(CLIENT, POD_A, b"query");
    let udp_sent = packet::udp(CLIENT, FRONTEND, b"query");
    let tcp_received = packet::tcp(CLIENT, POD_A, TcpFlags::SYN, b"");
    let tcp_sent = packet::tcp(CLIENT, FRONTEND, TcpFlags::SYN, b"");
    let untracked = packet::udp(SocketAddrV4::new(*CLIENT.ip(), 40999), POD_A, b"query");
    let tc = datapath
        .program_fd(lb_common::program_names::TC_EGRESS)
        .expect("fd");
    // The pods' errors come through the node, from their veths.
    run_table_forwarded_from(
        tc,
        POD_VETH,
        &[
            case(
                "port unreachable about a udp datagram (its checksum quoted)",
                packet::icmp_error(*POD_A.ip(), *CLIENT.ip(), port_unreachable, &udp_received),
                TC_ACT_OK,
                Expect::Bytes(packet::icmp_error(
                    NODE,
                    *CLIENT.ip(),
                    port_unreachable,
                    &udp_sent,
                )),
            ),
            case(
                "an error about a tcp segment",
                packet::icmp_error(*POD_A.ip(), *CLIENT.ip(), port_unreachable, &tcp_received),
                TC_ACT_OK,
                Expect::Bytes(packet::icmp_error(
                    NODE,
                    *CLIENT.ip(),
                    port_unreachable,
                    &tcp_sent,
                )),
            ),
            case(
                "port unreachable about a udp datagram with IP options",
                packet::icmp_error(
                    *POD_A.ip(),
                    *CLIENT.ip(),
                    port_unreachable,
                    &packet::with_ip_options(&udp_received, &IP_OPTIONS),
                ),
                TC_ACT_OK,
                Expect::Bytes(packet::icmp_error(
                    NODE,
                    *CLIENT.ip(),
                    port_unreachable,
                    &packet::with_ip_options(&udp_sent, &IP_OPTIONS),
                )),
            ),
            case(
                "port unreachable with IP options of its own, about a udp datagram",
                packet::with_ip_options(
                    &packet::icmp_error(*POD_A.ip(), *CLIENT.ip(), port_unreachable, &udp_received),
                    &IP_OPTIONS,
                ),
                TC_ACT_OK,
                Expect::Bytes(packet::with_ip_options(
                    &packet::icmp_error(NODE, *CLIENT.ip(), port_unreachable, &udp_sent),
                    &IP_OPTIONS,
                )),
            ),
            case(
                "about no tracked flow",
                packet::icmp_error(*POD_A.ip(), *CLIENT.ip(), port_unreachable, &untracked),
                TC_ACT_OK,
                Expect::Unchanged,
            ),
            case(
                "an error another pod forged about the flow",
                packet::icmp_error(*POD_B.ip(), *CLIENT.ip(), port_unreachable, &udp_received),
                TC_ACT_OK,
                Expect::Unchanged,
            ),
            case(
                "an error from the endpoint to another host than the client",
                packet::icmp_error(*POD_A.ip(), ELSEWHERE, port_unreachable, &udp_received),
                TC_ACT_OK,
                Expect::Unchanged,
            ),
        ],
    );
    // The node's own errors about what it forwarded to the endpoint: made by its stack, from
    // one of its addresses (here the one on the pods' side).
    let fragmentation_needed = (3, 4, [0, 0, 0x05, 0x78]);
    let time_exceeded = (11, 0, [0; 4]);
    run_table(
        tc,
        &[
            case(
                "fragmentation needed from the node about a datagram to the endpoint",
                packet::icmp_error(
                    NODE_ON_PODS_SIDE,
                    *CLIENT.ip(),
                    fragmentation_needed,
                    &udp_received,
                ),
                TC_ACT_OK,
                Expect::Bytes(packet::icmp_error(
                    NODE,
                    *CLIENT.ip(),
                    fragmentation_needed,
                    &udp_sent,
                )),
            ),
            case(
                "time exceeded from the node about a tcp segment to the endpoint",
                packet::icmp_error(NODE, *CLIENT.ip(), time_exceeded, &tcp_received),
                TC_ACT_OK,
                Expect::Bytes(packet::icmp_error(
                    NODE,
                    *CLIENT.ip(),
                    time_exceeded,
                    &tcp_sent,
                )),
            ),
            case(
                "an error from the node to another host than the client",
                packet::icmp_error(NODE, ELSEWHERE, fragmentation_needed, &udp_received),
                TC_ACT_OK,
                Expect::Unchanged,
            ),
        ],
    );
    assert_eq!(
        datapath.events().expect("events")["icmp_error_translated"],
        6
    );
}

#[test]
fn icmp_errors_about_snat_flows_reach_the_client_and_the_remote_backend_translated() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "icmpsnat").expect("pin dir");
    let fixture = SnatFixture::new(&pins);
    let port = fixture.established(CLIENT);
    let snat = SocketAddrV4::new(NODE, port);
    let router = Ipv4Addr::new(198, 51, 100, 254);
    let fragmentation_needed = (3, 4, [0, 0, 0x05, 0x78]);
    let time_exceeded = (11, 0, [0; 4]);
    let port_unreachable = (3, 3, [0; 4]);

    // Towards the backend, the client's segment left from the SNAT port; an error about it goes
    // back to the client, about the segment as the client sent it, from the frontend, out of the
    // NIC it came in on with the client's MAC and one hop less to live; also when the segment
    // carries IP options (XDP keeps them).
    let request_sent = packet::tcp(snat, REMOTE_POD, TcpFlags::ACK, &[7; 1400]);
    let request = packet::tcp(CLIENT, FRONTEND, TcpFlags::ACK, &[7; 1400]);
    let with_options = |frame: &[u8]| packet::with_ip_options(frame, &IP_OPTIONS);
    let to_client = |kind, from, (request_sent, request): (&[u8], &[u8])| {
        let mut want = packet::icmp_error(*FRONTEND.ip(), *CLIENT.ip(), kind, request);
        want[0..6].copy_from_slice(&packet::CLIENT_MAC);
        want[6..12].copy_from_slice(&packet::NODE_MAC);
        want[packet::ETH_HDR_LEN + 8] -= 1;
        packet::fix_ip_checksum(&mut want);
        (packet::icmp_error(from, NODE, kind, request_sent), want)
    };
    let (request_sent_with_options, request_with_options) =
        (with_options(&request_sent), with_options(&request));
    for (name, kind, from, about) in [
        (
            "fragmentation needed from a router on the way to the backend",
            fragmentation_needed,
            router,
            (&request_sent[..], &request[..]),
        ),
        (
            "port unreachable from the backend's node",
            port_unreachable,
            *REMOTE_POD.ip(),
            (&request_sent[..], &request[..]),
        ),
        (
            "fragmentation needed quoting IP options",
            fragmentation_needed,
            router,
            (&request_sent_with_options[..], &request_with_options[..]),
        ),
    ] {
        let (error, want) = to_client(kind, from, about);
        let run = fixture.xdp(&error);
        assert_eq!(run.verdict, XDP_TX, "{name}");
        assert_eq!(
            run.packet,
            want,
            "{name}:\n{}",
            lab::table::diff(&want, &run.packet)
        );
    }

    // Towards the client, the backend's answer left from the frontend; an error about it goes
    // to the backend, about its answer to the SNAT port, from this node's SNAT address.
    let answer_sent = packet::tcp(FRONTEND, CLIENT, TcpFlags::ACK, &[9; 1400]);
    let answer = packet::tcp(REMOTE_POD, snat, TcpFlags::ACK, &[9; 1400]);
    for (name, kind) in [
        (
            "fragmentation needed on the way to the client",
            fragmentation_needed,
        ),
        ("time exceeded on the way to the client", time_exceeded),
    ] {
        let run = fixture.xdp(&packet::icmp_error(router, NODE, kind, &answer_sent));
        assert_ne!(run.verdict, XDP_DROP, "{name}");
        let want = as_sent(
            &packet::icmp_error(NODE, *REMOTE_POD.ip(), kind, &answer),
            &run.packet,
        );
        assert_eq!(
            run.packet,
            want,
            "{name}:\n{}",
            lab::table::diff(&want, &run.packet)
        );
    }

    // Errors about ports and flows this node does not track pass untouched.
    let idle_port = SocketAddrV4::new(
        NODE,
        if port == SNAT_PORTS.0 {
            port + 1
        } else {
            port - 1
        },
    );
    let other_client = SocketAddrV4::new(*CLIENT.ip(), 40999);
    for (name, about) in [
        (
            "about a SNAT port no flow holds",
            packet::tcp(idle_port, REMOTE_POD, TcpFlags::ACK, b""),
        ),
        (
            "about another client of the frontend",
            packet::tcp(FRONTEND, other_client, TcpFlags::ACK, b""),
        ),
    ] {
        let error = packet::icmp_error(router, NODE, time_exceeded, &about);
        let run = fixture.xdp(&error);
        assert_eq!(run.verdict, XDP_PASS, "{name}");
        assert_eq!(run.packet, error, "{name}: untouched");
    }
    assert_eq!(
        fixture.datapath.events().expect("events")["icmp_error_translated"],
        5
    );
}

/// The state of the client's flow to the frontend (its FLOW or ORIGINAL entry).
fn flow_state(datapath: &Datapath, client: SocketAddrV4) -> Option<u8> {
    datapath
        .conntrack()
        .expect("conntrack")
        .into_iter()
        .find(|(key, _)| {
            key.direction != lb_common::ct_direction::REPLY
                && key.saddr == u32::from(*client.ip())
                && key.sport == client.port()
        })
        .map(|(_, value)| value.state)
}

/// CLIENT's flow to pod A through FRONTEND: its SYN at `client_isn` and 100 bytes through XDP,
/// the pod's SYN-ACK at `pod_isn` through tc, each checked translated.
fn open_with_100_bytes(datapath: &Datapath, client_isn: u32, pod_isn: u32) {
    run_xdp(
        datapath,
        &[
            client_case(TcpFlags::SYN, client_isn, b""),
            client_case(TcpFlags::ACK, client_isn + 1, &[1; 100]),
        ],
    );
    run_tc(
        datapath,
        &[case(
            "the pod's syn-ack",
            packet::tcp_at(POD_A, CLIENT, TcpFlags::SYN_ACK, pod_isn, b""),
            TC_ACT_OK,
            Expect::Bytes(packet::tcp_at(
                FRONTEND,
                CLIENT,
                TcpFlags::SYN_ACK,
                pod_isn,
                b"",
            )),
        )],
    );
}

#[test]
fn a_rst_ends_a_flow_only_near_what_its_sender_has_sent() {
    use lb_common::tcp_seq::{RST_AHEAD, RST_BEHIND};
    const TC_ACT_SHOT: u32 = 2;
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "rstwin").expect("pin dir");
    let datapath = datapath(&pins, vec![1]);
    let xdp = || {
        datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd")
    };
    let tc = || {
        datapath
            .program_fd(lb_common::program_names::TC_EGRESS)
            .expect("fd")
    };
    let (client_isn, pod_isn) = (5000u32, 0xffff_ff00u32);
    // The client has sent up to client_isn + 1 + 100; the pod, across the wrap, pod_isn + 1.
    let client_next = client_isn + 101;
    let pod_next = pod_isn.wrapping_add(1);
    open_with_100_bytes(&datapath, client_isn, pod_isn);
    let client_rst = |seq: u32| packet::tcp_at(CLIENT, FRONTEND, TcpFlags::RST, seq, b"");
    run_table(
        xdp(),
        &[
            case(
                "a blind rst half the sequence space away",
                client_rst(client_next.wrapping_add(1 << 31)),
                XDP_DROP,
                Expect::Unchanged,
            ),
            case(
                "a rst just past how far ahead it may be",
                client_rst(client_next + RST_AHEAD + 1),
                XDP_DROP,
                Expect::Unchanged,
            ),
            case(
                "a rst just past how far behind it may be",
                client_rst(client_next.wrapping_sub(RST_BEHIND + 1)),
                XDP_DROP,
                Expect::Unchanged,
            ),
        ],
    );
    run_table(
        tc(),
        &[case(
            "a rst from the pod far from what it sent",
            packet::tcp_at(
                POD_A,
                CLIENT,
                TcpFlags::RST,
                pod_next.wrapping_add(1 << 30),
                b"",
            ),
            TC_ACT_SHOT,
            Expect::Unchanged,
        )],
    );
    assert_eq!(
        datapath.events().expect("events")["drop_rst_out_of_window"],
        4
    );
    assert_eq!(
        flow_state(&datapath, CLIENT),
        Some(lb_common::tcp_state::ESTABLISHED),
        "the flow goes on"
    );
    run_table(
        xdp(),
        &[case(
            "the client's own rst, an ack number of the pod's behind",
            client_rst(client_next - 60),
            XDP_PASS,
            Expect::Bytes(packet::tcp_at(
                CLIENT,
                POD_A,
                TcpFlags::RST,
                client_next - 60,
                b"",
            )),
        )],
    );
    assert_eq!(
        flow_state(&datapath, CLIENT),
        Some(lb_common::tcp_state::CLOSING),
        "the flow ends"
    );
    // The pod's RST of a flow of another client port, at its own sequence number, goes out.
    let second = SocketAddrV4::new(*CLIENT.ip(), 40010);
    run_table(
        xdp(),
        &[case(
            "second flow",
            packet::tcp_at(second, FRONTEND, TcpFlags::SYN, 1, b""),
            XDP_PASS,
            Expect::Bytes(packet::tcp_at(second, POD_A, TcpFlags::SYN, 1, b"")),
        )],
    );
    run_table(
        tc(),
        &[
            case(
                "the pod's syn-ack",
                packet::tcp_at(POD_A, second, TcpFlags::SYN_ACK, pod_isn, b""),
                TC_ACT_OK,
                Expect::Bytes(packet::tcp_at(
                    FRONTEND,
                    second,
                    TcpFlags::SYN_ACK,
                    pod_isn,
                    b"",
                )),
            ),
            case(
                "the pod's rst",
                packet::tcp_at(POD_A, second, TcpFlags::RST, pod_next, b""),
                TC_ACT_OK,
                Expect::Bytes(packet::tcp_at(
                    FRONTEND,
                    second,
                    TcpFlags::RST,
                    pod_next,
                    b"",
                )),
            ),
        ],
    );
    assert_eq!(
        flow_state(&datapath, second),
        Some(lb_common::tcp_state::CLOSING)
    );
}

/// Segments spoofed far ahead of what a side has sent (off the path, each less than 2 GiB past
/// the last) must not walk its record to a value the attacker knows: a RST fitted to it would
/// then end the flow. They go on (the receiver ignores them) and teach nothing; the RST is
/// blind. A real segment a little ahead (data the record had not seen) still moves it on.
#[test]
fn spoofed_segments_far_ahead_do_not_move_a_flows_sequence_record() {
    use lb_common::tcp_seq::ADVANCE_AHEAD;
    const TC_ACT_SHOT: u32 = 2;
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "seqwalk").expect("pin dir");
    let datapath = datapath(&pins, vec![1]);
    let (client_isn, pod_isn) = (5000u32, 90_000u32);
    let client_next = client_isn + 1;
    let forwarded = |flags, seq: u32, payload: &[u8]| {
        case(
            "client segment",
            packet::tcp_at(CLIENT, FRONTEND, flags, seq, payload),
            XDP_PASS,
            Expect::Bytes(packet::tcp_at(CLIENT, POD_A, flags, seq, payload)),
        )
    };
    run_xdp(&datapath, &[forwarded(TcpFlags::SYN, client_isn, b"")]);
    run_tc(
        &datapath,
        &[case(
            "the pod's syn-ack",
            packet::tcp_at(POD_A, CLIENT, TcpFlags::SYN_ACK, pod_isn, b""),
            TC_ACT_OK,
            Expect::Bytes(packet::tcp_at(
                FRONTEND,
                CLIENT,
                TcpFlags::SYN_ACK,
                pod_isn,
                b"",
            )),
        )],
    );
    // Four spoofed data segments, each 512 MiB past the last (so ahead of it): the record
    // stays.
    let walk: Vec<_> = (1..=4u32)
        .map(|step| {
            forwarded(
                TcpFlags::ACK,
                client_next.wrapping_add(step << 29),
                &[7; 10],
            )
        })
        .collect();
    run_xdp(&datapath, &walk);
    let walked_to = client_next.wrapping_add(4 << 29).wrapping_add(10);
    run_xdp(
        &datapath,
        &[case(
            "a rst fitted to where the spoofed segments end",
            packet::tcp_at(CLIENT, FRONTEND, TcpFlags::RST, walked_to, b""),
            XDP_DROP,
            Expect::Unchanged,
        )],
    );
    // The same from the pod's side, in tc.
    let pod_walk: Vec<_> = (1..=4u32)
        .map(|step| {
            let seq = pod_isn.wrapping_add(1).wrapping_add(step << 29);
            case(
                "pod segment",
                packet::tcp_at(POD_A, CLIENT, TcpFlags::ACK, seq, &[7; 10]),
                TC_ACT_OK,
                Expect::Bytes(packet::tcp_at(
                    FRONTEND,
                    CLIENT,
                    TcpFlags::ACK,
                    seq,
                    &[7; 10],
                )),
            )
        })
        .collect();
    run_tc(&datapath, &pod_walk);
    let pod_walked_to = pod_isn
        .wrapping_add(1)
        .wrapping_add(4 << 29)
        .wrapping_add(10);
    run_tc(
        &datapath,
        &[case(
            "a pod rst fitted to where the spoofed segments end",
            packet::tcp_at(POD_A, CLIENT, TcpFlags::RST, pod_walked_to, b""),
            TC_ACT_SHOT,
            Expect::Unchanged,
        )],
    );
    assert_eq!(
        datapath.events().expect("events")["drop_rst_out_of_window"],
        2
    );
    assert_eq!(
        flow_state(&datapath, CLIENT),
        Some(lb_common::tcp_state::ESTABLISHED),
        "the flow goes on"
    );
    // Real data the record had not seen, ending ADVANCE_AHEAD past it, moves it on: a RST
    // where that data ends is the client's.
    let ahead = client_next.wrapping_add(ADVANCE_AHEAD - 100);
    run_xdp(
        &datapath,
        &[
            forwarded(TcpFlags::ACK, ahead, &[7; 100]),
            forwarded(TcpFlags::RST, client_next.wrapping_add(ADVANCE_AHEAD), b""),
        ],
    );
    assert_eq!(
        flow_state(&datapath, CLIENT),
        Some(lb_common::tcp_state::CLOSING),
        "the flow ends"
    );
}

/// A FIN far from what its sender has sent (a blind or stale one) goes on translated, as the
/// receiver's stack judges it, but leaves the flow established. The sender's own FIN
/// half-closes the flow.
#[test]
fn a_fin_half_closes_a_flow_only_near_what_its_sender_has_sent() {
    use lb_common::tcp_seq::{RST_AHEAD, RST_BEHIND};
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "finwin").expect("pin dir");
    let datapath = datapath(&pins, vec![1]);
    let (client_isn, pod_isn) = (5000u32, 0xffff_ff00u32);
    let client_next = client_isn + 101;
    let pod_next = pod_isn.wrapping_add(1);
    open_with_100_bytes(&datapath, client_isn, pod_isn);
    let client_fin = |seq: u32| packet::tcp_at(CLIENT, FRONTEND, TcpFlags::FIN_ACK, seq, b"");
    let translated =
        |seq: u32| Expect::Bytes(packet::tcp_at(CLIENT, POD_A, TcpFlags::FIN_ACK, seq, b""));
    let far = [
        (
            "a blind fin half the sequence space away",
            client_next.wrapping_add(1 << 31),
        ),
        (
            "a fin just past how far ahead it may be",
            client_next + RST_AHEAD + 1,
        ),
        (
            "a fin just past how far behind it may be",
            client_next.wrapping_sub(RST_BEHIND + 1),
        ),
    ];
    let cases: Vec<_> = far
        .iter()
        .map(|&(name, seq)| case(name, client_fin(seq), XDP_PASS, translated(seq)))
        .collect();
    run_xdp(&datapath, &cases);
    let far_pod_seq = pod_next.wrapping_add(1 << 30);
    run_tc(
        &datapath,
        &[case(
            "a fin from the pod far from what it sent",
            packet::tcp_at(POD_A, CLIENT, TcpFlags::FIN_ACK, far_pod_seq, b""),
            TC_ACT_OK,
            Expect::Bytes(packet::tcp_at(
                FRONTEND,
                CLIENT,
                TcpFlags::FIN_ACK,
                far_pod_seq,
                b"",
            )),
        )],
    );
    let events = datapath.events().expect("events");
    assert_eq!(events["ct_fin_out_of_window"], 4, "{events:?}");
    assert_eq!(events["drop_rst_out_of_window"], 0, "{events:?}");
    assert_eq!(
        flow_state(&datapath, CLIENT),
        Some(lb_common::tcp_state::ESTABLISHED),
        "the flow goes on"
    );
    run_xdp(
        &datapath,
        &[case(
            "the client's own fin",
            client_fin(client_next),
            XDP_PASS,
            translated(client_next),
        )],
    );
    assert_eq!(
        flow_state(&datapath, CLIENT),
        Some(lb_common::tcp_state::CLIENT_CLOSED),
        "the client's side ends"
    );
}

#[test]
fn a_blind_rst_to_a_snat_port_neither_ends_the_flow_nor_frees_the_port() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "rstsnat").expect("pin dir");
    let fixture = SnatFixture::new(&pins);
    // The backend's SYN-ACK (sequence 1000) went back to the client.
    let port = fixture.established(CLIENT);
    let snat = SocketAddrV4::new(NODE, port);
    let reply_flags = || {
        fixture
            .conntrack
            .get(&SnatFixture::reply_key(port), 0)
            .expect("reply entry")
            .flags
    };
    let blind = packet::tcp_at(REMOTE_POD, snat, TcpFlags::RST, 1001 + (1 << 31), b"");
    assert_eq!(fixture.xdp(&blind).verdict, XDP_DROP);
    assert_eq!(reply_flags() & lb_common::ct_flags::RESET, 0, "not reset");
    assert_eq!(
        fixture.datapath.events().expect("events")["drop_rst_out_of_window"],
        1
    );
    let next = packet::tcp(CLIENT, FRONTEND, TcpFlags::ACK, b"more");
    assert_eq!(fixture.snat_port_of(&next), Some(port), "the flow goes on");
    let own = packet::tcp_at(REMOTE_POD, snat, TcpFlags::RST, 1001, b"");
    assert_eq!(fixture.xdp(&own).verdict, XDP_TX, "the backend's own RST");
    assert_ne!(reply_flags() & lb_common::ct_flags::RESET, 0, "reset");
}

#[test]
fn a_blind_fin_to_a_snat_port_goes_on_but_leaves_the_flow_open() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "finsnat").expect("pin dir");
    let fixture = SnatFixture::new(&pins);
    // The backend's SYN-ACK (sequence 1000) went back to the client.
    let port = fixture.established(CLIENT);
    let snat = SocketAddrV4::new(NODE, port);
    let reply = || {
        fixture
            .conntrack
            .get(&SnatFixture::reply_key(port), 0)
            .expect("reply entry")
    };
    let blind_seq = 1001 + (1 << 31);
    let blind = packet::tcp_at(REMOTE_POD, snat, TcpFlags::FIN_ACK, blind_seq, b"");
    let run = fixture.xdp(&blind);
    assert_eq!(run.verdict, XDP_TX, "translated back to the client");
    // The IP and TCP headers as a frame from the frontend to the client is built, forwarded
    // (one hop less), checksums computed afresh; the MACs aside.
    let mut expected = packet::tcp_at(FRONTEND, CLIENT, TcpFlags::FIN_ACK, blind_seq, b"");
    expected[packet::ETH_HDR_LEN + 8] -= 1;
    packet::fix_ip_checksum(&mut expected);
    assert_eq!(
        run.packet[packet::ETH_HDR_LEN..],
        expected[packet::ETH_HDR_LEN..],
        "from the frontend to the client"
    );
    assert_eq!(reply().flags & lb_common::ct_flags::BACKEND_FIN, 0);
    assert_eq!(reply().state, lb_common::tcp_state::ESTABLISHED);
    assert_eq!(
        fixture.datapath.events().expect("events")["ct_fin_out_of_window"],
        1
    );
    let own = packet::tcp_at(REMOTE_POD, snat, TcpFlags::FIN_ACK, 1001, b"");
    assert_eq!(fixture.xdp(&own).verdict, XDP_TX, "the backend's own FIN");
    assert_ne!(reply().flags & lb_common::ct_flags::BACKEND_FIN, 0);
    assert_eq!(reply().state, lb_common::tcp_state::BACKEND_CLOSED);
}

#[test]
fn idle_flows_end_at_their_established_and_udp_timeouts() {
    use std::time::Duration;
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "ends").expect("pin dir");
    let mut datapath = datapath(&pins, vec![1]);
    let nanos = |duration: Duration| duration.as_nanos() as u64;
    let timeouts = lb_common::CtTimeouts {
        tcp_established: nanos(Duration::from_millis(600)),
        udp: nanos(Duration::from_millis(600)),
        ..short_timeouts()
    };
    datapath
        .set_config(&lb_common::DatapathConfig {
            timeouts,
            ..Default::default()
        })
        .expect("config");
    let xdp = || {
        datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd")
    };
    let send = |frame: Vec<u8>, output: Vec<u8>| {
        run_table(
            xdp(),
            &[case("packet", frame, XDP_PASS, Expect::Bytes(output))],
        );
    };
    let new_flows = |service| {
        datapath
            .service_counter(service)
            .expect("counter")
            .new_flows
    };
    let ack = || {
        (
            packet::tcp(CLIENT, FRONTEND, TcpFlags::ACK, b"x"),
            packet::tcp(CLIENT, POD_A, TcpFlags::ACK, b"x"),
        )
    };
    let datagram = || {
        (
            packet::udp(CLIENT, FRONTEND, b"q"),
            packet::udp(CLIENT, POD_A, b"q"),
        )
    };
    send(
        packet::tcp(CLIENT, FRONTEND, TcpFlags::SYN, b""),
        packet::tcp(CLIENT, POD_A, TcpFlags::SYN, b""),
    );
    let (frame, output) = ack();
    send(frame, output);
    let (frame, output) = datagram();
    send(frame, output);
    assert_eq!((new_flows(1), new_flows(2)), (1, 1));
    // Idle for half the timeouts: the same flows.
    std::thread::sleep(Duration::from_millis(300));
    let (frame, output) = ack();
    send(frame, output);
    let (frame, output) = datagram();
    send(frame, output);
    assert_eq!((new_flows(1), new_flows(2)), (1, 1), "within the timeouts");
    // Idle past them: each flow has ended, and the next packet starts a new one.
    std::thread::sleep(Duration::from_millis(900));
    let (frame, output) = ack();
    send(frame, output);
    let (frame, output) = datagram();
    send(frame, output);
    assert_eq!((new_flows(1), new_flows(2)), (2, 2), "past the timeouts");
}

/// The steady segments of a flow to a local endpoint are served from XDP's flow cache, which
/// leaves the flow's entry behind on how far its client has sent: never by more than the cache's
/// sequence window, so that the client's RST after 100 KiB of data is still its own, ends the
/// flow and reaches the pod.
#[test]
fn a_clients_rst_after_data_served_from_the_flow_cache_ends_its_flow() {
    let flow = CacheFlow::open("fcrst");
    let datapath = &flow.datapath;
    let sent = lab::table::send_past_the_entry(
        CLIENT_ISN + 1,
        |seq, data| flow.xdp(&[client_case(TcpFlags::ACK, seq, data)]),
        || flow_of(datapath, CLIENT).seq_next,
    );
    flow.xdp(&[client_case(TcpFlags::RST, sent, b"")]);
    lab::table::assert_rst_ended_the_flow(
        datapath,
        flow_state(datapath, CLIENT),
        "the client's rst",
    );
}

/// A flow whose client's segments reach two CPUs (generic XDP runs on the sender's CPU; a
/// queue's interrupt moves) has a slot in XDP's flow cache on each CPU that served it. Its
/// client's FIN or RST on another CPU empties them all, and so does the client's next
/// connection from the port after its pod's RST: that connection, which goes to another
/// endpoint, has its segments sent there from every CPU, also those inside the old slots'
/// sequence window.
#[test]
fn a_flows_end_empties_its_flow_cache_slots_on_every_cpu() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "fccpus").expect("pin dir");
    let mut datapath = datapath(&pins, vec![1]);
    lab::table::assert_a_flows_end_empties_its_slots_on_every_cpu(
        &cache_flows(),
        &mut datapath,
        |datapath, pod| set_tcp_endpoint(datapath, if pod == POD_A { 1 } else { 2 }),
    );
}

/// A flow's answer slots in tc egress's answer cache on several CPUs, when the pod answers
/// another connection from the flow's port on another CPU (a connection straight to the pod,
/// the flow superseded): they go on every CPU, so the straight connection's answers inside
/// their window leave as the pod sent them, from every CPU.
#[test]
fn a_superseded_flows_answer_slots_go_on_every_cpu() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "fcanswers").expect("pin dir");
    let datapath = datapath(&pins, vec![1]);
    lab::table::assert_a_superseded_flows_answer_slots_go_on_every_cpu(&cache_flows(), &datapath);
}

fn cache_flows() -> lab::table::CacheFlows<SocketAddrV4> {
    lab::table::CacheFlows {
        client: |port| SocketAddrV4::new(*CLIENT.ip(), port),
        frontend: FRONTEND,
        pods: [POD_A, POD_B],
        tcp: packet::tcp_acking,
        slot_cpus: |datapath, client| {
            let flow = flow_of(datapath, client);
            (flow.client_slot_cpus, flow.answer_slot_cpus)
        },
    }
}

/// Makes backend `id` (1: pod A, 2: pod B) the TCP service's one endpoint.
fn set_tcp_endpoint(datapath: &mut Datapath, id: u32) {
    let service = Service {
        id: 1,
        frontends: vec![node_port(proto::TCP)],
        backends: vec![id],
        affinity_timeout_s: 0,
        ..Default::default()
    };
    datapath.put_service(&service).expect("service");
}

/// XDP's flow cache stands aside on a CPU where it misses more than it hits (many more flows
/// than slots, or flows it does not take): a look that misses costs as much as a hit saves. After
/// more misses than its gate allows, a flow the cache held takes the full path for the gate's
/// closed time, then the cache serves it again.
#[test]
fn the_flow_cache_stands_aside_while_it_misses_more_than_it_hits() {
    let flow = CacheFlow::open("fcgate");
    lab::table::assert_gate_stands_aside(
        CLIENT_ISN + 1,
        |seq, data| flow.xdp(&[client_case(TcpFlags::ACK, seq, data)]),
        || flow_of(&flow.datapath, CLIENT).seq_next,
        |i| {
            let other = other_client(i);
            let to_pod = |flags| {
                case(
                    "another client's segment",
                    packet::tcp_at(other, FRONTEND, flags, 500, b""),
                    XDP_PASS,
                    Expect::Bytes(packet::tcp_at(other, POD_A, flags, 500, b"")),
                )
            };
            flow.xdp(&[to_pod(TcpFlags::SYN), to_pod(TcpFlags::ACK)]);
        },
        || lab::table::cache_counts(&flow.datapath, "xdp", "IPv4", "TCP"),
    );
}

/// Each cache has a gate per protocol: UDP flows of one datagram each (queries from ever new
/// ports), whose every look misses, close the UDP gate and leave a TCP flow its slot.
#[test]
fn one_datagram_udp_flows_close_their_gate_and_leave_tcp_flows_the_cache() {
    let flow = CacheFlow::open("udpgate");
    let segment = || client_case(TcpFlags::ACK, CLIENT_ISN + 1, b"");
    flow.xdp(&[segment(), segment()]);
    let counts = |protocol| lab::table::cache_counts(&flow.datapath, "xdp", "IPv4", protocol);
    let tcp_before = counts("TCP");
    assert_eq!(
        (tcp_before.hits, tcp_before.misses),
        (1, 1),
        "the fill, then a hit"
    );
    for i in 0..40 {
        let query = other_client(i);
        flow.xdp(&[case(
            "a query from another port",
            packet::udp(query, FRONTEND, b"q"),
            XDP_PASS,
            Expect::Bytes(packet::udp(query, POD_A, b"q")),
        )]);
    }
    let udp = counts("UDP");
    assert_eq!(
        (udp.hits, udp.misses, udp.closings),
        (0, 33, 1),
        "33 misses close the UDP gate; the 7 queries after it do not look"
    );
    flow.xdp(&[segment()]);
    let tcp = counts("TCP");
    assert_eq!(
        (tcp.hits - tcp_before.hits, tcp.closings),
        (1, 0),
        "the TCP flow is still served from its slot"
    );
}

/// The same for tc egress's answer cache: after more answers that miss than its gate allows, a
/// flow it held takes the full path for the gate's closed time, then the cache serves it again.
#[test]
fn the_answer_cache_stands_aside_while_it_misses_more_than_it_hits() {
    let flow = CacheFlow::open("ansgate");
    flow.xdp(&[client_case(TcpFlags::ACK, CLIENT_ISN + 1, b"")]);
    lab::table::assert_gate_stands_aside(
        POD_ISN + 1,
        |seq, data| flow.tc(&[pod_case(TcpFlags::ACK, seq, data)]),
        || flow_of(&flow.datapath, CLIENT).backend_seq_next,
        |i| {
            let other = other_client(i);
            flow.xdp(&[case(
                "another client's syn",
                packet::tcp_at(other, FRONTEND, TcpFlags::SYN, 500, b""),
                XDP_PASS,
                Expect::Bytes(packet::tcp_at(other, POD_A, TcpFlags::SYN, 500, b"")),
            )]);
            flow.tc(&[case(
                "the pod's answer to another client",
                packet::tcp_at(POD_A, other, TcpFlags::ACK, 80_000, b""),
                TC_ACT_OK,
                Expect::Bytes(packet::tcp_at(FRONTEND, other, TcpFlags::ACK, 80_000, b"")),
            )]);
        },
        || lab::table::cache_counts(&flow.datapath, "tc", "IPv4", "TCP"),
    );
}

/// The client's and the pod's initial sequence numbers in the cache tests' flow.
const CLIENT_ISN: u32 = 7000;
const POD_ISN: u32 = 90_000;

/// A cache test's flow: CLIENT's to pod A through FRONTEND, opened (the client's SYN through
/// XDP, the pod's SYN-ACK through tc egress) in a datapath of its own, with the test's thread
/// kept on its CPU (the caches are per CPU).
struct CacheFlow {
    datapath: Datapath,
    _pins: PinDir,
    _lab: Lab,
}

impl CacheFlow {
    fn open(name: &str) -> Self {
        lab::table::stay_on_this_cpu();
        let lab = Lab::new().expect("lab");
        let pins = PinDir::new(&lab, name).expect("pin dir");
        let flow = Self {
            datapath: datapath(&pins, vec![1]),
            _pins: pins,
            _lab: lab,
        };
        flow.xdp(&[client_case(TcpFlags::SYN, CLIENT_ISN, b"")]);
        flow.tc(&[pod_case(TcpFlags::SYN_ACK, POD_ISN, b"")]);
        flow
    }

    fn xdp(&self, cases: &[Case]) {
        run_xdp(&self.datapath, cases);
    }

    fn tc(&self, cases: &[Case]) {
        run_tc(&self.datapath, cases);
    }
}

/// Runs `cases` through the datapath's XDP program.
fn run_xdp(datapath: &Datapath, cases: &[Case]) {
    let program = datapath.program_fd(lb_common::program_names::XDP_LB);
    run_table(program.expect("xdp"), cases);
}

/// Runs `cases` through the datapath's tc egress program.
fn run_tc(datapath: &Datapath, cases: &[Case]) {
    let program = datapath.program_fd(lb_common::program_names::TC_EGRESS);
    run_table(program.expect("tc"), cases);
}

/// Client `i` of the gate tests' other flows: CLIENT's address, another port.
fn other_client(i: u32) -> SocketAddrV4 {
    SocketAddrV4::new(*CLIENT.ip(), 41_000 + u16::try_from(i).expect("port"))
}

/// The case of CLIENT's segment to FRONTEND at `seq`, through XDP: DNATed to pod A.
fn client_case(flags: TcpFlags, seq: u32, payload: &[u8]) -> Case {
    case(
        "client segment",
        packet::tcp_at(CLIENT, FRONTEND, flags, seq, payload),
        XDP_PASS,
        Expect::Bytes(packet::tcp_at(CLIENT, POD_A, flags, seq, payload)),
    )
}

/// The case of pod A's answer to CLIENT at `seq`, through tc egress: from FRONTEND.
fn pod_case(flags: TcpFlags, seq: u32, payload: &[u8]) -> Case {
    case(
        "pod segment",
        packet::tcp_at(POD_A, CLIENT, flags, seq, payload),
        TC_ACT_OK,
        Expect::Bytes(packet::tcp_at(FRONTEND, CLIENT, flags, seq, payload)),
    )
}

/// A segment of CLIENT's flow to FRONTEND with `flags`, through XDP: DNATed to pod A.
fn client_segment_to_pod_a(datapath: &Datapath, flags: TcpFlags) {
    run_xdp(datapath, &[client_case(flags, 1000, b"")]);
}

/// A half-closed connection (the client sent its FIN, as after a request sent with
/// shutdown(SHUT_WR); the pod answers later) outlives the closing timeout: its flow waits out
/// the half-closed one (kube-proxy's CLOSE_WAIT). The pod's FIN then closes it, and it ends at
/// its closing timeout.
#[test]
fn a_half_closed_flow_outlives_the_closing_timeout() {
    use std::time::Duration;
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "halfclose").expect("pin dir");
    let mut datapath = datapath(&pins, vec![1]);
    let nanos = |duration: Duration| duration.as_nanos() as u64;
    datapath
        .set_config(&lb_common::DatapathConfig {
            timeouts: lb_common::CtTimeouts {
                tcp_closing: nanos(Duration::from_millis(200)),
                tcp_half_closed: nanos(Duration::from_secs(10)),
                ..Default::default()
            },
            ..Default::default()
        })
        .expect("config");
    let new_flows = || datapath.service_counter(1).expect("counter").new_flows;
    let pod = |flags, seq, payload: &[u8]| {
        case(
            "pod segment",
            packet::tcp_at(POD_A, CLIENT, flags, seq, payload),
            TC_ACT_OK,
            Expect::Bytes(packet::tcp_at(FRONTEND, CLIENT, flags, seq, payload)),
        )
    };
    run_xdp(&datapath, &[client_case(TcpFlags::SYN, 1000, b"")]);
    run_tc(&datapath, &[pod(TcpFlags::SYN_ACK, 5000, b"")]);
    run_xdp(
        &datapath,
        &[
            client_case(TcpFlags::ACK, 1001, b"request"),
            client_case(TcpFlags::FIN_ACK, 1008, b""),
        ],
    );
    assert_eq!(
        flow_state(&datapath, CLIENT),
        Some(lb_common::tcp_state::CLIENT_CLOSED)
    );
    // Twice the closing timeout later, the pod answers and the client acknowledges: the flow.
    std::thread::sleep(Duration::from_millis(400));
    run_tc(&datapath, &[pod(TcpFlags::ACK, 5001, b"answer")]);
    run_xdp(&datapath, &[client_case(TcpFlags::ACK, 1009, b"")]);
    assert_eq!(new_flows(), 1, "the half-closed flow went on");
    run_tc(&datapath, &[pod(TcpFlags::FIN_ACK, 5007, b"")]);
    assert_eq!(
        flow_state(&datapath, CLIENT),
        Some(lb_common::tcp_state::CLOSING)
    );
    std::thread::sleep(Duration::from_millis(400));
    run_xdp(&datapath, &[client_case(TcpFlags::ACK, 1009, b"")]);
    assert_eq!(
        new_flows(),
        2,
        "closed, past the closing timeout: the client's ack starts a flow"
    );
}

/// A flow served from XDP's flow cache keeps its entry fresh: the cache serves a flow only until
/// its entry is due for a refresh, so a flow active past its established timeout goes on, and
/// one idle past it ends.
#[test]
fn a_flow_served_from_the_flow_cache_outlives_its_timeout_while_active_and_ends_idle() {
    use std::time::{Duration, Instant};
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "fcidle").expect("pin dir");
    let mut datapath = datapath(&pins, vec![1]);
    let nanos = |duration: Duration| duration.as_nanos() as u64;
    datapath
        .set_config(&lb_common::DatapathConfig {
            timeouts: lb_common::CtTimeouts {
                // Refreshed 150 ms after its last refresh; the closing timeout long enough not
                // to shorten the cache's hold on the flow (a quarter of it, 1 s).
                tcp_established: nanos(Duration::from_millis(600)),
                tcp_closing: nanos(Duration::from_secs(4)),
                ..short_timeouts()
            },
            ..Default::default()
        })
        .expect("config");
    let send = |flags| client_segment_to_pod_a(&datapath, flags);
    let new_flows = || datapath.service_counter(1).expect("counter").new_flows;
    send(TcpFlags::SYN);
    send(TcpFlags::ACK);
    let active_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < active_until {
        std::thread::sleep(Duration::from_millis(30));
        send(TcpFlags::ACK);
    }
    assert_eq!(new_flows(), 1, "active for 2.5 timeouts: the same flow");
    std::thread::sleep(Duration::from_millis(900));
    send(TcpFlags::ACK);
    assert_eq!(new_flows(), 2, "idle past its timeout: the flow ended");
}

/// The datagrams of a UDP flow to a local endpoint are served from XDP's flow cache, and the
/// endpoint's answers from tc egress's answer cache, once a datagram of the live flow has filled
/// each slot; a TCP segment from the same client port is not the UDP flow's. When the endpoint
/// leaves the backends map, the client's next datagram takes the full path and selects again,
/// as a UDP flow must: a slot names its endpoint's id, and each hit checks it.
#[test]
fn udp_datagrams_are_served_from_the_flow_caches_until_their_endpoint_leaves() {
    lab::table::stay_on_this_cpu();
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "udpcache").expect("pin dir");
    // The TCP service's endpoint is pod B, the UDP service's pod A.
    let mut datapath = datapath(&pins, vec![2]);
    let datagram_to = |pod| {
        case(
            "the client's datagram",
            packet::udp(CLIENT, FRONTEND, b"q"),
            XDP_PASS,
            Expect::Bytes(packet::udp(CLIENT, pod, b"q")),
        )
    };
    let answer = || {
        case(
            "pod A's answer",
            packet::udp(POD_A, CLIENT, b"a"),
            TC_ACT_OK,
            Expect::Bytes(packet::udp(FRONTEND, CLIENT, b"a")),
        )
    };
    let looks = |datapath: &Datapath, hook| {
        let counts = lab::table::cache_counts(datapath, hook, "IPv4", "UDP");
        (counts.hits, counts.misses)
    };

    run_xdp(&datapath, &[datagram_to(POD_A)]);
    assert_eq!(
        looks(&datapath, "xdp"),
        (0, 1),
        "a new flow's datagram misses and fills nothing"
    );
    run_xdp(&datapath, &[datagram_to(POD_A)]);
    assert_eq!(
        looks(&datapath, "xdp"),
        (0, 2),
        "the live flow's datagram misses and fills its slot"
    );
    run_xdp(&datapath, &[datagram_to(POD_A), datagram_to(POD_A)]);
    assert_eq!(
        looks(&datapath, "xdp"),
        (2, 2),
        "the next datagrams are served from the slot"
    );

    run_tc(&datapath, &[answer()]);
    assert_eq!(
        looks(&datapath, "tc"),
        (0, 1),
        "the first answer misses and fills its slot"
    );
    run_tc(&datapath, &[answer(), answer()]);
    assert_eq!(
        looks(&datapath, "tc"),
        (2, 1),
        "the next answers are served from the slot"
    );

    run_xdp(
        &datapath,
        &[case(
            "a TCP segment from the client's port",
            packet::tcp(CLIENT, FRONTEND, TcpFlags::ACK, b""),
            XDP_PASS,
            Expect::Bytes(packet::tcp(CLIENT, POD_B, TcpFlags::ACK, b"")),
        )],
    );
    let tcp = lab::table::cache_counts(&datapath, "xdp", "IPv4", "TCP");
    assert_eq!(
        (tcp.hits, tcp.misses),
        (0, 1),
        "the UDP flow's slot does not serve TCP"
    );
    assert_eq!(
        looks(&datapath, "xdp"),
        (2, 2),
        "nor does TCP score UDP's gate"
    );

    datapath
        .put_backend(4, &backend(POD_B, proto::UDP))
        .expect("backend");
    datapath
        .put_service(&Service {
            id: 2,
            frontends: vec![node_port(proto::UDP)],
            backends: vec![4],
            affinity_timeout_s: 0,
            ..Default::default()
        })
        .expect("service");
    datapath.remove_backend(3).expect("remove backend");
    run_xdp(&datapath, &[datagram_to(POD_B)]);
    assert_eq!(
        looks(&datapath, "xdp"),
        (2, 3),
        "pod A gone: the slot serves no more"
    );
    run_xdp(&datapath, &[datagram_to(POD_B), datagram_to(POD_B)]);
    assert_eq!(
        looks(&datapath, "xdp"),
        (3, 4),
        "the flow to pod B fills the slot anew"
    );
}

/// A UDP datagram of a flow this CPU's cache holds is served before the frontend's lookup, as
/// a TCP segment of a live flow is, and still meets what the frontend's checks would: a client
/// that the service's loadBalancerSourceRanges no longer hold is dropped on its next datagram;
/// ranges that a service without them gains apply once the slot runs out (at the entry's
/// refresh, 1 s with the default UDP timeout); a frontend removed (its filter bit cleared)
/// translates nothing more.
#[test]
fn a_udp_flow_served_from_the_flow_cache_meets_the_source_ranges_and_frontend_in_force() {
    use std::time::Duration;
    lab::table::stay_on_this_cpu();
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "udprange").expect("pin dir");
    let mut datapath = datapath(&pins, vec![1]);
    let load_balancer_ip = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 20), 53);
    let admitted = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 7), 41000);
    let load_balancer = |ranges: &[(Ipv4Addr, u8)]| Service {
        id: 5,
        frontends: vec![Frontend {
            addr: std::net::IpAddr::V4(*load_balancer_ip.ip()),
            port: load_balancer_ip.port(),
            proto: proto::UDP,
            kind: service_flags::LOAD_BALANCER,
        }],
        backends: vec![3],
        flags: if ranges.is_empty() {
            0
        } else {
            service_flags::SOURCE_RANGES
        },
        source_ranges: ranges
            .iter()
            .map(|&(addr, len)| (addr.into(), len))
            .collect(),
        ..Default::default()
    };
    let client_range = (Ipv4Addr::new(192, 0, 2, 0), 24);
    let other_range = (Ipv4Addr::new(203, 0, 113, 128), 25);
    let to_pod = |from: SocketAddrV4, to: SocketAddrV4| {
        case(
            "a datagram to the pod",
            packet::udp(from, to, b"q"),
            XDP_PASS,
            Expect::Bytes(packet::udp(from, POD_A, b"q")),
        )
    };
    let dropped = |from: SocketAddrV4, to: SocketAddrV4| {
        case(
            "a datagram from outside the ranges",
            packet::udp(from, to, b"q"),
            XDP_DROP,
            Expect::Unchanged,
        )
    };
    let hits = |datapath: &Datapath| lab::table::cache_counts(datapath, "xdp", "IPv4", "UDP").hits;
    let source_range_drops =
        |datapath: &Datapath| datapath.events().expect("events")["drop_source_range"];

    // Admitted by its range; the flow's second datagram fills the slot, the next ones hit.
    datapath
        .put_service(&load_balancer(&[client_range]))
        .expect("service");
    let flow = to_pod(admitted, load_balancer_ip);
    run_xdp(&datapath, &[flow.clone(), flow.clone(), flow.clone()]);
    assert_eq!(
        hits(&datapath),
        1,
        "the third datagram served from the slot"
    );
    // The client's range goes (another stays): its next datagram, which the slot would serve,
    // is dropped.
    datapath
        .put_service(&load_balancer(&[other_range]))
        .expect("ranges narrowed");
    run_xdp(&datapath, &[dropped(admitted, load_balancer_ip)]);
    assert_eq!(
        (hits(&datapath), source_range_drops(&datapath)),
        (2, 1),
        "dropped on the slot's hit, by the ranges in force"
    );

    // A client of the service without ranges, its flow in the slot; then the service gains
    // ranges that leave the client out.
    let unchecked = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 8), 41001);
    datapath
        .put_service(&load_balancer(&[]))
        .expect("no ranges");
    let flow = to_pod(unchecked, load_balancer_ip);
    run_xdp(&datapath, &[flow.clone(), flow.clone(), flow.clone()]);
    assert_eq!(hits(&datapath), 3, "served from the slot");
    datapath
        .put_service(&load_balancer(&[other_range]))
        .expect("ranges gained");
    // The slot serves until the entry's refresh, a second after the flow's start.
    std::thread::sleep(Duration::from_millis(1100));
    run_xdp(&datapath, &[dropped(unchecked, load_balancer_ip)]);
    assert_eq!(
        source_range_drops(&datapath),
        2,
        "the slot run out by the entry's refresh, the full path applies the ranges"
    );

    // A NodePort flow in the slot; its Service leaves.
    let flow = to_pod(CLIENT, FRONTEND);
    run_xdp(&datapath, &[flow.clone(), flow.clone(), flow.clone()]);
    assert_eq!(hits(&datapath), 4, "served from the slot");
    datapath.remove_service(2).expect("remove");
    run_xdp(
        &datapath,
        &[case(
            "a datagram of the flow, its frontend gone",
            packet::udp(CLIENT, FRONTEND, b"q"),
            XDP_PASS,
            Expect::Unchanged,
        )],
    );
}

/// tc egress translates a UDP flow's answers whether or not the flow is live, so its answer
/// slot must not outlive the flow's entry: once the client has been quiet past the UDP timeout,
/// its address and port may start a flow to another frontend, and the same endpoint's answers
/// then go back from that frontend, not from the one the slot was filled with.
#[test]
fn a_udp_answer_slot_ends_with_its_flow_when_the_client_moves_to_another_frontend() {
    use std::time::Duration;
    lab::table::stay_on_this_cpu();
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "udpansend").expect("pin dir");
    let mut datapath = datapath(&pins, vec![1]);
    let other_frontend = SocketAddrV4::new(NODE, 30092);
    datapath
        .put_service(&Service {
            id: 5,
            frontends: vec![Frontend {
                port: other_frontend.port(),
                ..node_port(proto::UDP)
            }],
            backends: vec![3],
            affinity_timeout_s: 0,
            ..Default::default()
        })
        .expect("service");
    let nanos = |duration: Duration| duration.as_nanos() as u64;
    datapath
        .set_config(&lb_common::DatapathConfig {
            timeouts: lb_common::CtTimeouts {
                udp: nanos(Duration::from_millis(600)),
                // A quarter of it, 1 s, would otherwise bound the answer slot's time first.
                tcp_closing: nanos(Duration::from_secs(4)),
                ..short_timeouts()
            },
            ..Default::default()
        })
        .expect("config");
    let datagram_through = |frontend| {
        case(
            "the client's datagram",
            packet::udp(CLIENT, frontend, b"q"),
            XDP_PASS,
            Expect::Bytes(packet::udp(CLIENT, POD_A, b"q")),
        )
    };
    let answer_from = |frontend| {
        case(
            "pod A's answer",
            packet::udp(POD_A, CLIENT, b"a"),
            TC_ACT_OK,
            Expect::Bytes(packet::udp(frontend, CLIENT, b"a")),
        )
    };
    run_xdp(&datapath, &[datagram_through(FRONTEND)]);
    run_tc(&datapath, &[answer_from(FRONTEND), answer_from(FRONTEND)]);
    let tc = lab::table::cache_counts(&datapath, "tc", "IPv4", "UDP");
    assert_eq!(
        (tc.hits, tc.misses),
        (1, 1),
        "the second answer served from the slot"
    );
    std::thread::sleep(Duration::from_millis(700));
    run_xdp(&datapath, &[datagram_through(other_frontend)]);
    assert_eq!(
        datapath.service_counter(5).expect("counter").new_flows,
        1,
        "the client's key went to a flow through the other frontend"
    );
    run_tc(&datapath, &[answer_from(other_frontend)]);
}

/// A UDP flow served from XDP's flow cache keeps its entry fresh: a slot serves only until the
/// entry is due for a refresh, so a flow active past its UDP timeout goes on, and one idle past
/// it ends.
#[test]
fn a_udp_flow_served_from_the_flow_cache_outlives_its_timeout_while_active_and_ends_idle() {
    use std::time::{Duration, Instant};
    lab::table::stay_on_this_cpu();
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "udpidle").expect("pin dir");
    let mut datapath = datapath(&pins, vec![1]);
    datapath
        .set_config(&lb_common::DatapathConfig {
            timeouts: lb_common::CtTimeouts {
                // Refreshed 150 ms after its last refresh.
                udp: Duration::from_millis(600).as_nanos() as u64,
                ..short_timeouts()
            },
            ..Default::default()
        })
        .expect("config");
    let send = || {
        run_xdp(
            &datapath,
            &[case(
                "the client's datagram",
                packet::udp(CLIENT, FRONTEND, b"q"),
                XDP_PASS,
                Expect::Bytes(packet::udp(CLIENT, POD_A, b"q")),
            )],
        );
    };
    let new_flows = || datapath.service_counter(2).expect("counter").new_flows;
    send();
    send();
    let active_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < active_until {
        std::thread::sleep(Duration::from_millis(30));
        send();
    }
    assert_eq!(new_flows(), 1, "active for 2.5 timeouts: the same flow");
    let served = lab::table::cache_counts(&datapath, "xdp", "IPv4", "UDP").hits;
    assert!(
        served >= 20,
        "most of the 50 datagrams served from the slot: {served}"
    );
    std::thread::sleep(Duration::from_millis(900));
    send();
    assert_eq!(new_flows(), 2, "idle past its timeout: the flow ended");
}

/// The pod's FIN, which tc egress writes into the flow's entry, reaches a flow served from
/// XDP's flow cache within a quarter of the half-closed timeout: the flow then ends at that
/// timeout (300 ms here), not at the cache's refresh.
#[test]
fn a_flow_served_from_the_flow_cache_ends_at_its_half_closed_timeout_after_the_pods_fin() {
    use std::time::Duration;
    lab::table::stay_on_this_cpu();
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "fcfin").expect("pin dir");
    let mut datapath = datapath(&pins, vec![1]);
    // Closing after 300 ms; established 3600 s, refreshed every second.
    datapath
        .set_config(&lb_common::DatapathConfig {
            timeouts: short_timeouts(),
            ..Default::default()
        })
        .expect("config");
    let send = |flags| client_segment_to_pod_a(&datapath, flags);
    let new_flows = || datapath.service_counter(1).expect("counter").new_flows;
    send(TcpFlags::SYN);
    send(TcpFlags::ACK);
    send(TcpFlags::ACK);
    run_tc(
        &datapath,
        &[case(
            "the pod's fin",
            packet::tcp(POD_A, CLIENT, TcpFlags::FIN_ACK, b""),
            TC_ACT_OK,
            Expect::Bytes(packet::tcp(FRONTEND, CLIENT, TcpFlags::FIN_ACK, b"")),
        )],
    );
    assert_eq!(
        flow_state(&datapath, CLIENT),
        Some(lb_common::tcp_state::BACKEND_CLOSED)
    );
    std::thread::sleep(Duration::from_millis(400));
    send(TcpFlags::ACK);
    assert_eq!(
        new_flows(),
        2,
        "past the half-closed timeout the client's ack starts a new flow"
    );
}

/// A client port whose flow the pod reset starts a new connection whose sequence numbers lie in
/// the old flow's window: the new flow's packets go to the new flow's pod, not where XDP's flow
/// cache sent the old one's.
#[test]
fn a_new_connection_on_a_reset_flows_port_goes_to_its_own_pod() {
    lab::table::stay_on_this_cpu();
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "fcreopen").expect("pin dir");
    let mut datapath = datapath(&pins, vec![1]);
    let xdp = |datapath: &Datapath, flags, seq, pod| {
        run_xdp(
            datapath,
            &[case(
                "client segment",
                packet::tcp_at(CLIENT, FRONTEND, flags, seq, b""),
                XDP_PASS,
                Expect::Bytes(packet::tcp_at(CLIENT, pod, flags, seq, b"")),
            )],
        );
    };
    xdp(&datapath, TcpFlags::SYN, 1000, POD_A);
    xdp(&datapath, TcpFlags::ACK, 1001, POD_A);
    xdp(&datapath, TcpFlags::ACK, 1001, POD_A);
    run_tc(
        &datapath,
        &[case(
            "the pod's rst",
            packet::tcp_at(POD_A, CLIENT, TcpFlags::RST, 1, b""),
            TC_ACT_OK,
            Expect::Bytes(packet::tcp_at(FRONTEND, CLIENT, TcpFlags::RST, 1, b"")),
        )],
    );
    datapath
        .put_service(&Service {
            id: 1,
            frontends: vec![node_port(proto::TCP)],
            backends: vec![2],
            affinity_timeout_s: 0,
            ..Default::default()
        })
        .expect("service");
    xdp(&datapath, TcpFlags::SYN, 1100, POD_B);
    xdp(&datapath, TcpFlags::ACK, 1101, POD_B);
}

/// tc egress's twin of the flow cache: the steady answers of a local endpoint are sent back from
/// its frontend out of a slot, which leaves the flow's entry behind on how far the pod has sent,
/// never by more than the cache's sequence window; the pod's RST after 100 KiB of data is its
/// own, ends the flow and reaches the client from the frontend.
#[test]
fn a_pods_rst_after_answers_served_from_the_answer_cache_ends_its_flow() {
    let flow = CacheFlow::open("fcans");
    let datapath = &flow.datapath;
    flow.xdp(&[client_case(TcpFlags::ACK, CLIENT_ISN + 1, b"")]);
    let sent = lab::table::send_past_the_entry(
        POD_ISN + 1,
        |seq, data| flow.tc(&[pod_case(TcpFlags::ACK, seq, data)]),
        || flow_of(datapath, CLIENT).backend_seq_next,
    );
    flow.tc(&[pod_case(TcpFlags::RST, sent, b"")]);
    lab::table::assert_rst_ended_the_flow(datapath, flow_state(datapath, CLIENT), "the pod's rst");
}

/// tc egress's answer cache holds a flow for a quarter of the closing timeout at most, and a
/// closing flow refills it no more: by the time the flow's key can pass to a new flow (its
/// closing timeout), the slot has run out, and the new flow's answers, through another frontend
/// of the same pod with sequence numbers in the old window, go back from their own frontend.
#[test]
fn a_closed_flows_answer_slot_runs_out_before_its_key_serves_another_frontend() {
    use std::time::Duration;
    lab::table::stay_on_this_cpu();
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "fcanshold").expect("pin dir");
    let mut datapath = datapath(&pins, vec![1]);
    let external = two_frontends_of_pod_a(&mut datapath);
    // Closing after 300 ms: a slot holds a flow for 75 ms.
    datapath
        .set_config(&lb_common::DatapathConfig {
            timeouts: short_timeouts(),
            ..Default::default()
        })
        .expect("config");
    let xdp = |frame: Vec<u8>, output: Vec<u8>| {
        run_xdp(
            &datapath,
            &[case(
                "client segment",
                frame,
                XDP_PASS,
                Expect::Bytes(output),
            )],
        );
    };
    let tc = |frontend: SocketAddrV4, flags, seq| {
        run_tc(
            &datapath,
            &[case(
                "pod segment",
                packet::tcp_at(POD_A, CLIENT, flags, seq, b"answer"),
                TC_ACT_OK,
                Expect::Bytes(packet::tcp_at(frontend, CLIENT, flags, seq, b"answer")),
            )],
        );
    };
    let through = |frontend: SocketAddrV4, flags| {
        (
            packet::tcp(CLIENT, frontend, flags, b""),
            packet::tcp(CLIENT, POD_A, flags, b""),
        )
    };
    for flags in [TcpFlags::SYN, TcpFlags::ACK] {
        let (frame, output) = through(FRONTEND, flags);
        xdp(frame, output);
    }
    let pod_seq = 50_000;
    tc(FRONTEND, TcpFlags::SYN_ACK, pod_seq - 1);
    tc(FRONTEND, TcpFlags::ACK, pod_seq);
    tc(FRONTEND, TcpFlags::ACK, pod_seq);
    let (frame, output) = through(FRONTEND, TcpFlags::FIN_ACK);
    xdp(frame, output);
    std::thread::sleep(Duration::from_millis(400));
    for flags in [TcpFlags::SYN, TcpFlags::ACK] {
        let (frame, output) = through(external, flags);
        xdp(frame, output);
    }
    tc(external, TcpFlags::SYN_ACK, pod_seq - 1);
    tc(external, TcpFlags::ACK, pod_seq);
}

/// A lab with the node's namespace, the node's address on its loopback, and a pin directory
/// named `pins`.
fn node_lab(pins: &str) -> (Lab, Host, PinDir) {
    let mut lab = Lab::new().expect("lab");
    let node = lab.host("node").expect("host");
    node.addr("lo", &format!("{NODE}/32"))
        .expect("node address");
    let pins = PinDir::new(&lab, pins).expect("pin dir");
    (lab, node, pins)
}
