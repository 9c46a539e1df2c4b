//! tc egress over IPv6 through BPF_PROG_TEST_RUN, table-driven: the answers of a local endpoint
//! to a client whose packets XDP DNATed, with the conntrack entries XDP would have written
//! seeded in `lb6_ct_v1`; input packet, expected verdict, expected output bytes (checksums from
//! etherparse, and each translated frame's TCP/UDP checksum recomputed whole here), and the
//! counter a row must move.

use std::net::{IpAddr, Ipv6Addr, SocketAddrV6};

use aya::maps::{HashMap, Map, MapData};
use lab::{
    lab::{Lab, PinDir},
    packet::{ETH_HDR_LEN, TcpFlags},
    packet6::{self, IPV6_HDR_LEN, next_header},
    table::{Case, Expect, run_table, run_table_forwarded_from},
};
use lb_common::{
    Ct6Key, Ct6Value, Flow6Value, Ipv6Words, backend_flags, ct_direction, ct_flags, flow_key,
    map_names, program_names, proto, tcp_state,
};
use lb_userspace::{
    compile::model::{Backend, ipv6_words},
    datapath::Datapath,
    observe::inspect::monotonic_ns,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

const NODE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// The NodePort frontend the clients send to, and a second frontend of the same endpoint.
const FRONTEND: SocketAddrV6 = SocketAddrV6::new(NODE, 30080, 0, 0);
const FRONTEND_2: SocketAddrV6 = SocketAddrV6::new(NODE, 30081, 0, 0);
const CLIENT_ADDR: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
/// A client with a FLOW entry per protocol.
const CLIENT: SocketAddrV6 = SocketAddrV6::new(CLIENT_ADDR, 40000, 0, 0);
/// The same client's flow to FRONTEND_2, kept as a pair whose source port XDP remapped.
const CLIENT_REMAPPED: SocketAddrV6 = SocketAddrV6::new(CLIENT_ADDR, 40001, 0, 0);
const REMAPPED_PORT: u16 = 61005;
/// A flow kept as an ORIGINAL and a REPLY entry without a remap (one from before FLOW entries).
const CLIENT_PAIR: SocketAddrV6 = SocketAddrV6::new(CLIENT_ADDR, 40002, 0, 0);
/// A client with no flow.
const STRANGER: SocketAddrV6 = SocketAddrV6::new(CLIENT_ADDR, 40009, 0, 0);
const POD_A: SocketAddrV6 = SocketAddrV6::new(
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x10),
    8080,
    0,
    0,
);
/// A pod that is no backend.
const POD_B: SocketAddrV6 = SocketAddrV6::new(
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x11),
    8080,
    0,
    0,
);
/// The sequence number after the endpoint's SYN-ACK, as its FLOW entry records it.
const ENDPOINT_SEQ: u32 = 5001;

fn words(addr: SocketAddrV6) -> Ipv6Words {
    ipv6_words(*addr.ip())
}

/// A datapath whose backends (which set their bits in the backend filter, as the agent does)
/// are pod A over TCP, UDP and SCTP, with the conntrack entries of XDP's flows to it: CLIENT's
/// FLOW entries (TCP established, UDP), CLIENT_REMAPPED's REPLY entry (TCP, remapped) and
/// CLIENT_PAIR's REPLY entry (TCP).
struct Fixture {
    datapath: Datapath,
    conntrack: HashMap<MapData, Ct6Key, Ct6Value>,
}

impl Fixture {
    fn new(pins: &PinDir) -> Self {
        let mut datapath = Datapath::load(pins.path()).expect("loading the datapath");
        for (id, protocol) in [(1, proto::TCP), (2, proto::UDP), (3, proto::SCTP)] {
            let backend = Backend {
                addr: IpAddr::V6(*POD_A.ip()),
                port: POD_A.port(),
                proto: protocol,
                flags: backend_flags::LOCAL,
            };
            datapath.put_backend(id, &backend).expect("backend");
        }
        let map = MapData::from_pin(pins.path().join(map_names::CONNTRACK6)).expect("ct6");
        let conntrack = HashMap::try_from(Map::LruHashMap(map)).expect("ct6 map");
        let mut fixture = Self {
            datapath,
            conntrack,
        };
        fixture.seed();
        fixture
    }

    fn seed(&mut self) {
        let now = monotonic_ns();
        for (protocol, backend_id, state) in [
            (proto::TCP, 1, tcp_state::ESTABLISHED),
            (proto::UDP, 2, tcp_state::NONE),
        ] {
            let flow = Flow6Value {
                last_seen_ns: now,
                backend_id,
                service_id: 1,
                backend_addr: words(POD_A),
                backend_port: POD_A.port(),
                state,
                flags: ct_flags::CLIENT_IN_FLOW,
                frontend_addr: words(FRONTEND),
                frontend_port: FRONTEND.port(),
                backend_seq_next: if protocol == proto::TCP {
                    ENDPOINT_SEQ
                } else {
                    0
                },
                ..Default::default()
            };
            let key = flow_key(words(CLIENT), CLIENT.port(), protocol);
            self.conntrack
                .insert(&key, &flow.into_entry(), 0)
                .expect("FLOW entry");
        }
        let replies = [
            (
                REMAPPED_PORT,
                FRONTEND_2,
                CLIENT_REMAPPED,
                ct_flags::PORT_REMAP,
            ),
            (CLIENT_PAIR.port(), FRONTEND, CLIENT_PAIR, 0),
        ];
        for (port, frontend, client, flags) in replies {
            let key = Ct6Key {
                saddr: words(POD_A),
                daddr: words(client),
                sport: POD_A.port(),
                dport: port,
                proto: proto::TCP,
                direction: ct_direction::REPLY,
                _pad: [0; 2],
            };
            let reply = Ct6Value {
                last_seen_ns: now,
                backend_id: 1,
                service_id: 1,
                nat_addr: words(frontend),
                nat_port: frontend.port(),
                state: tcp_state::ESTABLISHED,
                flags,
                snat_addr: words(client),
                snat_port: client.port(),
                ..Default::default()
            };
            self.conntrack.insert(&key, &reply, 0).expect("REPLY entry");
        }
    }

    fn tc(&self) -> std::os::fd::BorrowedFd<'_> {
        self.datapath
            .program_fd(program_names::TC_EGRESS)
            .expect("tc program")
    }

    fn event(&self, label: &str) -> u64 {
        self.datapath.events().expect("events")[label]
    }

    /// The FLOW entry of CLIENT over `protocol`.
    fn flow(&self, protocol: u8) -> Flow6Value {
        let entry = self
            .conntrack
            .get(&flow_key(words(CLIENT), CLIENT.port(), protocol), 0)
            .expect("the FLOW entry is there");
        *Flow6Value::of(&entry)
    }
}

/// One row: a case, and the event it must count once (none: it counts nothing of its own).
struct Row {
    case: Case,
    counted: Option<&'static str>,
    /// The interface the node forwarded the packet from; None: the node's stack made it.
    forwarded_from: Option<u32>,
}

/// The host side of a pod's veth, which what a pod sends comes through.
const POD_VETH: u32 = 7;

fn row(name: &'static str, input: Vec<u8>, verdict: u32, output: Expect) -> Row {
    Row {
        case: Case {
            name,
            input,
            verdict,
            output,
        },
        counted: None,
        forwarded_from: None,
    }
}

impl Row {
    fn counting(self, label: &'static str) -> Self {
        Self {
            counted: Some(label),
            ..self
        }
    }

    /// The packet as it comes from a pod, through its veth.
    fn sent_by_a_pod(self) -> Self {
        Self {
            forwarded_from: Some(POD_VETH),
            ..self
        }
    }
}

/// Runs every row through tc egress: verdict and bytes by the table runner, then the counter,
/// and the checksum of every expected translated frame recomputed whole.
fn run_rows(fixture: &Fixture, rows: Vec<Row>) {
    for row in rows {
        if let Expect::Bytes(expected) = &row.case.output {
            assert!(
                packet6::transport_checksum_ok(expected),
                "{}: the expected frame's checksum",
                row.case.name
            );
        }
        let before = row.counted.map(|label| fixture.event(label));
        match row.forwarded_from {
            Some(ifindex) => {
                run_table_forwarded_from(fixture.tc(), ifindex, std::slice::from_ref(&row.case))
            }
            None => run_table(fixture.tc(), std::slice::from_ref(&row.case)),
        }
        if let (Some(label), Some(before)) = (row.counted, before) {
            assert_eq!(
                fixture.event(label),
                before + 1,
                "{}: counted as {label}",
                row.case.name
            );
        }
    }
}

fn tcp(src: SocketAddrV6, dst: SocketAddrV6, flags: TcpFlags, seq: u32) -> Vec<u8> {
    packet6::tcp(src, dst, flags, seq, b"data")
}

/// `frame` with its payload length 0, as the stack sends a BIG TCP packet of more than 64 KiB
/// (the transport checksum's pseudo-header has the real length, which the field never held).
fn big_tcp(frame: &[u8]) -> Vec<u8> {
    let mut frame = frame.to_vec();
    frame[ETH_HDR_LEN + 4..ETH_HDR_LEN + 6].fill(0);
    frame
}

#[test]
fn tc_egress_reverse_nats_the_ipv6_answers_of_local_endpoints_and_passes_the_rest() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "tc6").expect("pin dir");
    let fixture = Fixture::new(&pins);
    let ack = TcpFlags::ACK;
    let answer_tcp = tcp(POD_A, CLIENT, ack, ENDPOINT_SEQ);
    let translated_tcp = tcp(FRONTEND, CLIENT, ack, ENDPOINT_SEQ);
    let answer_udp = packet6::udp(POD_A, CLIENT, b"answer");
    let translated_udp = packet6::udp(FRONTEND, CLIENT, b"answer");

    let mut nine_headers = answer_tcp.clone();
    for _ in 0..=lb_common::ipv6::MAX_EXT_HEADERS {
        nine_headers = packet6::with_options_header(&nine_headers, next_header::DEST_OPTS, 1);
    }
    let mut eight_headers = answer_tcp.clone();
    let mut eight_translated = translated_tcp.clone();
    for _ in 0..lb_common::ipv6::MAX_EXT_HEADERS {
        eight_headers = packet6::with_options_header(&eight_headers, next_header::DEST_OPTS, 1);
        eight_translated =
            packet6::with_options_header(&eight_translated, next_header::DEST_OPTS, 1);
    }

    let rows = vec![
        row(
            "tcp answer of a FLOW entry",
            answer_tcp.clone(),
            TC_ACT_OK,
            Expect::Bytes(translated_tcp.clone()),
        ),
        row(
            "a BIG TCP answer (payload length 0: past 64 KiB, the skb holds its length)",
            big_tcp(&answer_tcp),
            TC_ACT_OK,
            Expect::Bytes(big_tcp(&translated_tcp)),
        ),
        row(
            "a udp answer with payload length 0: only TCP is sent so (no length to trust)",
            big_tcp(&answer_udp),
            TC_ACT_OK,
            Expect::Unchanged,
        ),
        row(
            "a BIG TCP answer behind a Hop-by-Hop header (as kernels with the jumbo option send it)",
            big_tcp(&packet6::with_options_header(
                &answer_tcp,
                next_header::HOP_BY_HOP,
                1,
            )),
            TC_ACT_OK,
            Expect::Bytes(big_tcp(&packet6::with_options_header(
                &translated_tcp,
                next_header::HOP_BY_HOP,
                1,
            ))),
        ),
        row(
            "udp answer of a FLOW entry",
            answer_udp.clone(),
            TC_ACT_OK,
            Expect::Bytes(translated_udp.clone()),
        ),
        row(
            "answer of a remapped flow: source back to its frontend, destination port back to the client's",
            tcp(
                POD_A,
                SocketAddrV6::new(CLIENT_ADDR, REMAPPED_PORT, 0, 0),
                ack,
                7000,
            ),
            TC_ACT_OK,
            Expect::Bytes(tcp(FRONTEND_2, CLIENT_REMAPPED, ack, 7000)),
        ),
        row(
            "answer of a flow kept as a REPLY entry",
            tcp(POD_A, CLIENT_PAIR, ack, 9000),
            TC_ACT_OK,
            Expect::Bytes(tcp(FRONTEND, CLIENT_PAIR, ack, 9000)),
        ),
        row(
            "tcp answer behind a Routing header with no segment left",
            packet6::with_routing_header(&answer_tcp, 0),
            TC_ACT_OK,
            Expect::Bytes(packet6::with_routing_header(&translated_tcp, 0)),
        ),
        row(
            "a Routing header with segments left: the client's address is a hop on the way",
            packet6::with_routing_header(&answer_tcp, 1),
            TC_ACT_OK,
            Expect::Unchanged,
        ),
        row(
            "tcp answer behind a Destination Options header",
            packet6::with_options_header(&answer_tcp, next_header::DEST_OPTS, 1),
            TC_ACT_OK,
            Expect::Bytes(packet6::with_options_header(
                &translated_tcp,
                next_header::DEST_OPTS,
                1,
            )),
        ),
        row(
            "udp answer behind Hop-by-Hop (8 bytes) and Destination Options (24 bytes) headers",
            packet6::with_options_header(
                &packet6::with_options_header(&answer_udp, next_header::DEST_OPTS, 3),
                next_header::HOP_BY_HOP,
                1,
            ),
            TC_ACT_OK,
            Expect::Bytes(packet6::with_options_header(
                &packet6::with_options_header(&translated_udp, next_header::DEST_OPTS, 3),
                next_header::HOP_BY_HOP,
                1,
            )),
        ),
        row(
            "eight extension headers: the most the walk crosses",
            eight_headers,
            TC_ACT_OK,
            Expect::Bytes(eight_translated),
        ),
        row(
            "nine extension headers: passed untouched",
            nine_headers,
            TC_ACT_OK,
            Expect::Unchanged,
        ),
        row(
            "a pod that is no backend",
            tcp(POD_B, CLIENT, ack, 1),
            TC_ACT_OK,
            Expect::Unchanged,
        ),
        row(
            "a backend's packet to a client of no flow",
            tcp(POD_A, STRANGER, ack, 1),
            TC_ACT_OK,
            Expect::Unchanged,
        ),
        row(
            "udp answer with checksum 0, invalid over IPv6",
            packet6::with_udp_checksum(&answer_udp, 0),
            TC_ACT_SHOT,
            Expect::Unchanged,
        )
        .counting("drop_malformed"),
        row(
            "first fragment of an answer (here the whole datagram)",
            packet6::with_fragment_header(&answer_udp, 0, true, 0xdead_beef),
            TC_ACT_OK,
            Expect::Bytes(packet6::with_fragment_header(
                &translated_udp,
                0,
                true,
                0xdead_beef,
            )),
        ),
        row(
            "later fragment of an answer whose first fragment never came",
            packet6::with_fragment_header(&answer_udp, 185, false, 0xdead_bee0),
            TC_ACT_OK,
            Expect::Unchanged,
        )
        .counting("pass_fragment"),
        row(
            "sctp from a backend, of no flow",
            packet6::sctp(POD_A, CLIENT, 0, 0x1234_5678, b""),
            TC_ACT_OK,
            Expect::Unchanged,
        ),
        row(
            "neighbour solicitation",
            packet6::neighbour_solicitation(*POD_A.ip(), CLIENT_ADDR),
            TC_ACT_OK,
            Expect::Unchanged,
        ),
        // A frame cut inside the fixed header is not here: BPF_PROG_TEST_RUN refuses an IPv6
        // frame shorter than it (EINVAL), as the stack would never hand one to tc.
        row(
            "fixed header and nothing after it",
            answer_tcp[..ETH_HDR_LEN + IPV6_HDR_LEN].to_vec(),
            TC_ACT_OK,
            Expect::Unchanged,
        ),
        row(
            "truncated transport header",
            answer_tcp[..ETH_HDR_LEN + IPV6_HDR_LEN + 2].to_vec(),
            TC_ACT_OK,
            Expect::Unchanged,
        ),
        row(
            "a blind rst far from what the endpoint has sent",
            tcp(POD_A, CLIENT, TcpFlags::RST, ENDPOINT_SEQ + (1 << 30)),
            TC_ACT_SHOT,
            Expect::Unchanged,
        )
        .counting("drop_rst_out_of_window"),
    ];
    run_rows(&fixture, rows);
    // None of the above moved the established flow.
    assert_eq!(fixture.flow(proto::TCP).state, tcp_state::ESTABLISHED);
}

/// The node's address on the pods' side of its routes.
const NODE_ON_PODS_SIDE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 1);
/// A host that is neither client nor endpoint.
const ELSEWHERE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 9);

/// ICMPv6 destination unreachable, port unreachable.
const PORT_UNREACHABLE: (u8, u8, [u8; 4]) = (1, 4, [0; 4]);
/// ICMPv6 packet too big, MTU 1280.
const PACKET_TOO_BIG: (u8, u8, [u8; 4]) = (2, 0, [0, 0, 5, 0]);

#[test]
fn icmpv6_errors_a_local_endpoint_sends_reach_the_client_from_the_frontend() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "tc6icmp").expect("pin dir");
    let fixture = Fixture::new(&pins);
    // The client's datagram as the endpoint got it, and as the client sent it (quoted whole).
    let received = packet6::udp(CLIENT, POD_A, b"q");
    let sent = packet6::udp(CLIENT, FRONTEND, b"q");
    let whole = received.len() - ETH_HDR_LEN;
    // A segment of the remapped flow: the quote's source port goes back to the client's. 48
    // bytes quoted, so that the TCP checksum, which is not rewritten, lies outside the quote.
    let remapped_client = SocketAddrV6::new(CLIENT_ADDR, REMAPPED_PORT, 0, 0);
    let received_tcp = tcp(remapped_client, POD_A, TcpFlags::ACK, 1);
    let sent_tcp = tcp(CLIENT_REMAPPED, FRONTEND_2, TcpFlags::ACK, 1);
    let header_and_ports = IPV6_HDR_LEN + 8;
    let echo_reply = (129, 0, [0, 1, 0, 1]);
    let rows = vec![
        row(
            "port unreachable about a udp datagram of a FLOW entry",
            packet6::icmpv6(*POD_A.ip(), CLIENT_ADDR, PORT_UNREACHABLE, &received, whole),
            TC_ACT_OK,
            Expect::Bytes(packet6::icmpv6(
                NODE,
                CLIENT_ADDR,
                PORT_UNREACHABLE,
                &sent,
                whole,
            )),
        )
        .counting("icmp_error_translated")
        .sent_by_a_pod(),
        row(
            "packet too big about a segment of a remapped flow",
            packet6::icmpv6(
                *POD_A.ip(),
                CLIENT_ADDR,
                PACKET_TOO_BIG,
                &received_tcp,
                header_and_ports,
            ),
            TC_ACT_OK,
            Expect::Bytes(packet6::icmpv6(
                NODE,
                CLIENT_ADDR,
                PACKET_TOO_BIG,
                &sent_tcp,
                header_and_ports,
            )),
        )
        .counting("icmp_error_translated")
        .sent_by_a_pod(),
        row(
            "an error about the flow from another host than its endpoint",
            packet6::icmpv6(*POD_B.ip(), CLIENT_ADDR, PORT_UNREACHABLE, &received, whole),
            TC_ACT_OK,
            Expect::Unchanged,
        )
        .sent_by_a_pod(),
        row(
            "an error about a packet of no flow",
            packet6::icmpv6(
                *POD_A.ip(),
                CLIENT_ADDR,
                PORT_UNREACHABLE,
                &packet6::udp(STRANGER, POD_A, b"q"),
                whole,
            ),
            TC_ACT_OK,
            Expect::Unchanged,
        )
        .sent_by_a_pod(),
        row(
            "an echo reply is no error",
            packet6::icmpv6(*POD_A.ip(), CLIENT_ADDR, echo_reply, &received, whole),
            TC_ACT_OK,
            Expect::Unchanged,
        )
        .sent_by_a_pod(),
        row(
            "an error from the endpoint to another host than the client",
            packet6::icmpv6(*POD_A.ip(), ELSEWHERE, PORT_UNREACHABLE, &received, whole),
            TC_ACT_OK,
            Expect::Unchanged,
        )
        .sent_by_a_pod(),
        // The node's own errors about what it forwarded to the endpoint, made by its stack.
        row(
            "packet too big from the node about a datagram to the endpoint",
            packet6::icmpv6(
                NODE_ON_PODS_SIDE,
                CLIENT_ADDR,
                PACKET_TOO_BIG,
                &received,
                whole,
            ),
            TC_ACT_OK,
            Expect::Bytes(packet6::icmpv6(
                NODE,
                CLIENT_ADDR,
                PACKET_TOO_BIG,
                &sent,
                whole,
            )),
        )
        .counting("icmp_error_translated"),
        row(
            "an error from the node to another host than the client",
            packet6::icmpv6(NODE, ELSEWHERE, PACKET_TOO_BIG, &received, whole),
            TC_ACT_OK,
            Expect::Unchanged,
        ),
    ];
    run_rows(&fixture, rows);
}

/// The same errors with extension headers: before the ICMPv6 header, in the quoted packet (the
/// datapath keeps a client's extension headers, so the endpoint quotes them), or both; the
/// quoted transport header is found behind them and rewritten. A quote that ends inside its
/// extension headers, or quotes a later fragment, holds no ports and leaves untouched.
#[test]
fn icmpv6_errors_with_extension_headers_from_a_local_endpoint_reach_the_client_translated() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "tc6icmpx").expect("pin dir");
    let fixture = Fixture::new(&pins);
    let options =
        |frame: &[u8], words| packet6::with_options_header(frame, next_header::DEST_OPTS, words);
    let hop_by_hop = |frame: &[u8]| packet6::with_options_header(frame, next_header::HOP_BY_HOP, 1);
    // The client's datagram with 16 bytes of Destination Options, as the endpoint got it and as
    // the client sent it (quoted whole).
    let received = options(&packet6::udp(CLIENT, POD_A, b"q"), 2);
    let sent = options(&packet6::udp(CLIENT, FRONTEND, b"q"), 2);
    let whole = received.len() - ETH_HDR_LEN;
    let remapped_client = SocketAddrV6::new(CLIENT_ADDR, REMAPPED_PORT, 0, 0);
    let received_tcp = options(&tcp(remapped_client, POD_A, TcpFlags::ACK, 1), 1);
    let sent_tcp = options(&tcp(CLIENT_REMAPPED, FRONTEND_2, TcpFlags::ACK, 1), 1);
    let header_options_and_ports = IPV6_HDR_LEN + 8 + 8;
    let [first, later] = packet6::fragments(&packet6::udp(CLIENT, POD_A, &[5; 64]), 24, 77);
    let [first_sent, _] = packet6::fragments(&packet6::udp(CLIENT, FRONTEND, &[5; 64]), 24, 77);
    let fragment_and_ports = IPV6_HDR_LEN + 8 + 8;
    let error = |kind, about: &[u8], quote_len| {
        packet6::icmpv6(*POD_A.ip(), CLIENT_ADDR, kind, about, quote_len)
    };
    let translated =
        |kind, about: &[u8], quote_len| packet6::icmpv6(NODE, CLIENT_ADDR, kind, about, quote_len);
    let rows = vec![
        row(
            "port unreachable quoting a datagram with Destination Options",
            error(PORT_UNREACHABLE, &received, whole),
            TC_ACT_OK,
            Expect::Bytes(translated(PORT_UNREACHABLE, &sent, whole)),
        )
        .counting("icmp_error_translated"),
        row(
            "packet too big behind a Hop-by-Hop header, quoting a remapped flow's segment with \
             Destination Options",
            hop_by_hop(&error(
                PACKET_TOO_BIG,
                &received_tcp,
                header_options_and_ports,
            )),
            TC_ACT_OK,
            Expect::Bytes(hop_by_hop(&translated(
                PACKET_TOO_BIG,
                &sent_tcp,
                header_options_and_ports,
            ))),
        )
        .counting("icmp_error_translated"),
        row(
            "port unreachable quoting the first fragment of a datagram",
            error(PORT_UNREACHABLE, &first, fragment_and_ports),
            TC_ACT_OK,
            Expect::Bytes(translated(
                PORT_UNREACHABLE,
                &first_sent,
                fragment_and_ports,
            )),
        )
        .counting("icmp_error_translated"),
        row(
            "quoting a later fragment: no ports",
            error(PORT_UNREACHABLE, &later, fragment_and_ports),
            TC_ACT_OK,
            Expect::Unchanged,
        ),
        row(
            "the quote ends inside its Destination Options",
            error(PORT_UNREACHABLE, &received, IPV6_HDR_LEN + 8),
            TC_ACT_OK,
            Expect::Unchanged,
        ),
    ];
    run_rows(&fixture, rows);
}

#[test]
fn a_fin_from_the_endpoint_half_closes_its_ipv6_flow() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "tc6fin").expect("pin dir");
    let fixture = Fixture::new(&pins);
    assert_eq!(fixture.flow(proto::TCP).state, tcp_state::ESTABLISHED);
    let fin = TcpFlags::FIN_ACK;
    run_rows(
        &fixture,
        vec![row(
            "fin from the endpoint",
            packet6::tcp(POD_A, CLIENT, fin, ENDPOINT_SEQ, b""),
            TC_ACT_OK,
            Expect::Bytes(packet6::tcp(FRONTEND, CLIENT, fin, ENDPOINT_SEQ, b"")),
        )],
    );
    let flow = fixture.flow(proto::TCP);
    assert_eq!(flow.state, tcp_state::BACKEND_CLOSED);
    // The FIN counts one in the endpoint's sequence space.
    assert_eq!(flow.backend_seq_next, ENDPOINT_SEQ + 1);
}

#[test]
fn an_in_window_rst_from_the_endpoint_is_translated_and_ends_the_flow() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "tc6rst").expect("pin dir");
    let fixture = Fixture::new(&pins);
    let rst = TcpFlags::RST;
    run_rows(
        &fixture,
        vec![row(
            "rst at what the endpoint has sent",
            packet6::tcp(POD_A, CLIENT, rst, ENDPOINT_SEQ, b""),
            TC_ACT_OK,
            Expect::Bytes(packet6::tcp(FRONTEND, CLIENT, rst, ENDPOINT_SEQ, b"")),
        )],
    );
    assert_eq!(fixture.flow(proto::TCP).state, tcp_state::CLOSING);
}

/// The IPv6 twin of datapath_table's
/// `a_connection_straight_to_the_pod_from_a_closed_flows_port_is_answered_untranslated`: the
/// endpoint's SYN-ACK to CLIENT's established flow (the client has sent up to 2401) goes back
/// from the frontend when it acknowledges the flow's SYN, and leaves untouched, the entry
/// removed, when it acknowledges another connection's.
#[test]
fn a_syn_ack_of_another_connection_from_an_ipv6_flows_port_is_no_answer_of_the_flow() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "tc6straight").expect("pin dir");
    let mut fixture = Fixture::new(&pins);
    let key = flow_key(words(CLIENT), CLIENT.port(), proto::TCP);
    let mut flow = fixture.flow(proto::TCP);
    flow.seq_next = 2401;
    fixture
        .conntrack
        .insert(&key, &flow.into_entry(), 0)
        .expect("the client's record");
    let syn_ack =
        |from, ack| packet6::tcp_acking(from, CLIENT, TcpFlags::SYN_ACK, (500_000, ack), b"");
    run_rows(
        &fixture,
        vec![
            row(
                "the flow's own SYN-ACK, sent again",
                syn_ack(POD_A, 1001),
                TC_ACT_OK,
                Expect::Bytes(syn_ack(FRONTEND, 1001)),
            ),
            row(
                "a SYN-ACK of a connection straight to the pod",
                syn_ack(POD_A, 9_000_001),
                TC_ACT_OK,
                Expect::Unchanged,
            )
            .counting("ct_flow_superseded"),
            row(
                "that connection's data",
                packet6::tcp(POD_A, CLIENT, TcpFlags::ACK, ENDPOINT_SEQ, b"straight"),
                TC_ACT_OK,
                Expect::Unchanged,
            ),
        ],
    );
    let flow = fixture.flow(proto::TCP);
    assert_ne!(flow.flags & ct_flags::SUPERSEDED, 0, "marked superseded");
    assert_eq!(flow.state, tcp_state::CLOSING);
}

/// `lb monitor` sees an IPv6 packet tc egress drops: family 6, tc, the reason, the answer's
/// addresses and ports.
#[test]
fn a_dropped_ipv6_answer_is_reported_to_lb_monitor() {
    use lb_common::monitor::{MonitorEvent, kind, program};
    use lb_userspace::datapath::monitor_control::{MonitorControlCell, Owner};

    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "tc6mon").expect("pin dir");
    let fixture = Fixture::new(&pins);
    let mut control = MonitorControlCell::open(pins.path()).expect("monitor cell");
    let owner = Owner::this_process().expect("owner");
    control.claim(kind::DROP, 1, owner).expect("claim");
    let ring = MapData::from_pin(pins.path().join(map_names::MONITOR_EVENTS)).expect("ring");
    let mut ring = aya::maps::RingBuf::try_from(Map::RingBuf(ring)).expect("ring buffer");

    let zero_checksum = packet6::with_udp_checksum(&packet6::udp(POD_A, CLIENT, b"answer"), 0);
    run_rows(
        &fixture,
        vec![row(
            "dropped",
            zero_checksum,
            TC_ACT_SHOT,
            Expect::Unchanged,
        )],
    );
    let item = ring.next().expect("a report");
    assert_eq!(item.len(), size_of::<MonitorEvent>());
    // SAFETY: the ring buffer holds MonitorEvents written whole by the programs; the read is
    // unaligned-safe.
    let event: MonitorEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
    drop(item);
    assert_eq!(
        (event.kind, event.program, event.family, event.proto),
        (kind::DROP, program::TC, 6, proto::UDP)
    );
    assert_eq!(event.reason, lb_common::Event::DROP_MALFORMED.0);
    assert_eq!((event.saddr, event.daddr), (words(POD_A), words(CLIENT)));
    assert_eq!((event.sport, event.dport), (POD_A.port(), CLIENT.port()));
    control.release(owner).expect("release");
}
