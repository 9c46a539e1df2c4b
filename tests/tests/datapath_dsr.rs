//! Direct server return through BPF_PROG_TEST_RUN, table-driven: the node a client's SYN
//! arrives at (node1) sends it on with the DSR option and the client's own address, the
//! endpoint's node (node2) takes an option only for a frontend of the endpoint's Service, and
//! tc egress there gives the endpoint's answers the frontend as their source. Expected frames,
//! the option's bytes and every checksum are written here or computed by etherparse, never
//! by the datapath's code.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use lab::{
    lab::{Lab, PinDir},
    packet::{self, TcpFlags},
    table::{Case, Expect, diff, run_table},
};
use lb_common::{Flow4Value, backend_flags, ct_direction, ct_flags, proto, service_flags};
use lb_userspace::{
    compile::model::{Backend, Frontend, Service},
    datapath::{Datapath, testrun::test_run},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;

/// node1, which the client sends to, and node2, where the endpoint runs.
const NODE1: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const NODE2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
const NODE_PORT: u16 = 30080;
const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 10), 40000);
/// The NodePort on node1, which the client sends to.
const FRONTEND: SocketAddrV4 = SocketAddrV4::new(NODE1, NODE_PORT);
/// The Service's LoadBalancer IP.
const LB_IP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 80), 80);
/// The endpoint, on node2.
const POD: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 10), 8080);
/// An endpoint of another Service, on node2 too.
const OTHER_POD: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 11), 8080);
/// IPv4 options: NOP NOP NOP EOL, then a router alert, then NOP NOP NOP EOL.
const IP_OPTIONS: [u8; 12] = [1, 1, 1, 0, 0x94, 4, 0, 0, 1, 1, 1, 0];

/// The DSR option naming `frontend`, byte by byte as docs/dsr.md gives it: type 0x9e (copied,
/// class 0, number 30), length 8, the port, the address.
fn option(frontend: SocketAddrV4) -> [u8; 8] {
    let [port_high, port_low] = frontend.port().to_be_bytes();
    let [a, b, c, d] = frontend.ip().octets();
    [0x9e, 8, port_high, port_low, a, b, c, d]
}

fn with_option(frame: &[u8], frontend: SocketAddrV4) -> Vec<u8> {
    packet::with_ip_options(frame, &option(frontend))
}

fn backend(addr: SocketAddrV4, protocol: u8, flags: u8) -> Backend {
    Backend {
        addr: IpAddr::V4(*addr.ip()),
        port: addr.port(),
        proto: protocol,
        flags,
    }
}

fn frontend(at: SocketAddrV4, protocol: u8, kind: u32) -> Frontend {
    Frontend {
        addr: IpAddr::V4(*at.ip()),
        port: at.port(),
        proto: protocol,
        kind,
    }
}

fn case(name: &'static str, input: Vec<u8>, verdict: u32, output: Expect) -> Case {
    Case {
        name,
        input,
        verdict,
        output,
    }
}

/// `expected` with the Ethernet addresses and TTL the datapath gave `actual` (which depend on
/// the route the FIB found), its IP checksum recomputed.
fn as_sent(expected: &[u8], actual: &[u8]) -> Vec<u8> {
    let mut out = expected.to_vec();
    out[..12].copy_from_slice(&actual[..12]);
    out[packet::ETH_HDR_LEN + 8] = actual[packet::ETH_HDR_LEN + 8];
    packet::fix_ip_checksum(&mut out);
    out
}

/// A flow whose entry was superseded: marked, closing (its answers translated no more).
#[track_caller]
fn assert_superseded(flow: Option<Flow4Value>) {
    let flow = flow.expect("the entry, kept until its closing timeout");
    assert_ne!(flow.flags & ct_flags::SUPERSEDED, 0, "marked superseded");
    assert_eq!(flow.state, lb_common::tcp_state::CLOSING);
}

fn ms(duration: Duration) -> u64 {
    duration.as_nanos() as u64
}

fn with_timeouts(datapath: &mut Datapath, syn: Duration, established: Duration) {
    let config = lb_common::DatapathConfig {
        timeouts: lb_common::CtTimeouts {
            tcp_syn: ms(syn),
            tcp_established: ms(established),
            tcp_closing: ms(Duration::from_millis(300)),
            udp: ms(Duration::from_millis(800)),
            snat_port_reuse: ms(Duration::from_millis(100)),
            tcp_half_closed: ms(Duration::from_millis(300)),
        },
        ..datapath.config().expect("config")
    };
    datapath.set_config(&config).expect("config");
}

/// node1: a NodePort and LoadBalancer Service (TCP and UDP) whose only endpoint is on node2,
/// with DSR when `direct_return`; node2 marked as taking DSR options (the agent's
/// `TAKES_DIRECT_RETURN` on its endpoints); a SNAT address and range as the agent sets them.
fn node1(pins: &PinDir, direct_return: bool) -> Datapath {
    let mut datapath = Datapath::load(pins.path()).expect("loading the datapath");
    datapath
        .set_config(&lb_common::DatapathConfig {
            snat_addr: u32::from(NODE1),
            snat_port_min: 61000,
            snat_port_max: 61031,
            ..Default::default()
        })
        .expect("config");
    let marked = backend_flags::TAKES_DIRECT_RETURN;
    datapath
        .put_backend(1, &backend(POD, proto::TCP, marked))
        .expect("backend");
    datapath
        .put_backend(2, &backend(POD, proto::UDP, marked))
        .expect("backend");
    let flags = if direct_return {
        service_flags::DIRECT_RETURN
    } else {
        0
    };
    for (id, protocol, backend) in [(1, proto::TCP, 1), (2, proto::UDP, 2)] {
        let service = Service {
            id,
            frontends: vec![
                frontend(FRONTEND, protocol, service_flags::NODE_PORT),
                frontend(LB_IP, protocol, service_flags::LOAD_BALANCER),
            ],
            backends: vec![backend],
            flags,
            ..Default::default()
        };
        datapath.put_service(&service).expect("service");
    }
    datapath
        .set_node_addresses(&BTreeSet::from([NODE1.into(), NODE2.into()]))
        .expect("node addresses");
    datapath
}

/// node2: the same Service with its endpoint here (its NodePort on node2's own address), and
/// another Service whose endpoint is OTHER_POD; both nodes' addresses known.
fn node2(pins: &PinDir) -> Datapath {
    let mut datapath = Datapath::load(pins.path()).expect("loading the datapath");
    datapath
        .put_backend(1, &backend(POD, proto::TCP, backend_flags::LOCAL))
        .expect("backend");
    datapath
        .put_backend(2, &backend(OTHER_POD, proto::TCP, backend_flags::LOCAL))
        .expect("backend");
    let service = Service {
        id: 1,
        frontends: vec![
            frontend(
                SocketAddrV4::new(NODE2, NODE_PORT),
                proto::TCP,
                service_flags::NODE_PORT,
            ),
            frontend(LB_IP, proto::TCP, service_flags::LOAD_BALANCER),
        ],
        backends: vec![1],
        ..Default::default()
    };
    let other = Service {
        id: 2,
        frontends: vec![frontend(
            SocketAddrV4::new(NODE2, 30090),
            proto::TCP,
            service_flags::NODE_PORT,
        )],
        backends: vec![2],
        ..Default::default()
    };
    datapath.put_service(&service).expect("service");
    datapath.put_service(&other).expect("service");
    datapath
        .set_node_addresses(&BTreeSet::from([NODE1.into(), NODE2.into()]))
        .expect("node addresses");
    datapath
}

/// One case through node2's tc egress: an answer and what must leave.
fn through_tc(datapath: &Datapath, name: &'static str, frame: Vec<u8>, output: Expect) {
    run_table(
        datapath
            .program_fd(lb_common::program_names::TC_EGRESS)
            .expect("fd"),
        &[case(name, frame, TC_ACT_OK, output)],
    );
}

fn xdp(datapath: &Datapath, frame: &[u8]) -> lb_userspace::datapath::testrun::TestRunOutput {
    let program = datapath
        .program_fd(lb_common::program_names::XDP_LB)
        .expect("fd");
    test_run(program, frame).expect("run")
}

fn flow_of(datapath: &Datapath, client: SocketAddrV4) -> Option<Flow4Value> {
    datapath
        .conntrack()
        .expect("conntrack")
        .into_iter()
        .find(|(key, _)| {
            key.direction == ct_direction::FLOW
                && key.saddr == u32::from(*client.ip())
                && key.sport == client.port()
        })
        .map(|(_, value)| *Flow4Value::of(&value))
}

fn event(datapath: &Datapath, label: &str) -> u64 {
    datapath.events().expect("events")[label]
}

/// Runs `frame` through node1's XDP and checks it left as `expected` (MACs and TTL as the
/// route gave them).
fn sent_as(datapath: &Datapath, name: &str, frame: &[u8], expected: &[u8]) {
    let run = xdp(datapath, frame);
    assert_ne!(run.verdict, XDP_DROP, "{name}: dropped");
    let want = as_sent(expected, &run.packet);
    assert_eq!(run.packet, want, "{name}:\n{}", diff(&want, &run.packet));
}

/// A frame node1 sent on to POD from its own address (SNAT), with no option in its header.
#[track_caller]
fn assert_snated_to_the_pod(run: &lb_userspace::datapath::testrun::TestRunOutput) {
    assert_ne!(run.verdict, XDP_DROP);
    let sliced = etherparse::SlicedPacket::from_ethernet(&run.packet).expect("parse");
    let Some(etherparse::NetSlice::Ipv4(ip)) = sliced.net else {
        panic!("ipv4")
    };
    assert_eq!(
        (ip.header().source_addr(), ip.header().destination_addr()),
        (NODE1, *POD.ip()),
        "SNATed to the pod"
    );
    assert_eq!(ip.header().ihl(), 5, "no option");
}

/// node1 sends a SYN from CLIENT's port 40001 to the LoadBalancer IP with the option.
fn lb_ip_syn_sent_by_dsr(datapath: &Datapath) {
    let lb_client = SocketAddrV4::new(*CLIENT.ip(), 40001);
    sent_as(
        datapath,
        "a SYN to the LoadBalancer IP",
        &packet::tcp(lb_client, LB_IP, TcpFlags::SYN, b""),
        &with_option(&packet::tcp(lb_client, POD, TcpFlags::SYN, b""), LB_IP),
    );
}

#[test]
fn node1_sends_the_syn_with_the_option_and_the_rest_of_the_flow_without_it() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "dsr1").expect("pin dir");
    let datapath = node1(&pins, true);
    let syn = packet::tcp(CLIENT, FRONTEND, TcpFlags::SYN, b"");
    let syn_out = with_option(&packet::tcp(CLIENT, POD, TcpFlags::SYN, b""), FRONTEND);
    sent_as(&datapath, "the SYN", &syn, &syn_out);
    sent_as(&datapath, "its retransmission", &syn, &syn_out);
    sent_as(
        &datapath,
        "the client's ACK",
        &packet::tcp(CLIENT, FRONTEND, TcpFlags::ACK, b""),
        &packet::tcp(CLIENT, POD, TcpFlags::ACK, b""),
    );
    sent_as(
        &datapath,
        "the client's data",
        &packet::tcp(CLIENT, FRONTEND, TcpFlags::ACK, b"GET / HTTP/1.1\r\n\r\n"),
        &packet::tcp(CLIENT, POD, TcpFlags::ACK, b"GET / HTTP/1.1\r\n\r\n"),
    );
    lb_ip_syn_sent_by_dsr(&datapath);
    assert_eq!(event(&datapath, "dsr_sent"), 3);

    // One entry per flow, marked DSR, established by the client's ACK; nothing keyed by the
    // answers (no SNAT port, no REPLY entry): they never come back through node1.
    let entries = datapath.conntrack().expect("conntrack");
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert!(
        entries
            .iter()
            .all(|(key, _)| key.direction == ct_direction::FLOW)
    );
    let flow = flow_of(&datapath, CLIENT).expect("the flow's entry");
    assert_eq!(
        flow.flags,
        ct_flags::CLIENT_IN_FLOW | ct_flags::DIRECT_RETURN
    );
    assert_eq!(flow.state, lb_common::tcp_state::ESTABLISHED);
    assert_eq!(
        (flow.backend_addr, flow.backend_port),
        (u32::from(*POD.ip()), POD.port())
    );
    assert_eq!(datapath.service_counter(1).expect("counter").new_flows, 2);
}

#[test]
fn node1_snats_what_dsr_does_not_serve() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "dsr1snat").expect("pin dir");
    let datapath = node1(&pins, true);
    let snat_source = |frame: &[u8]| {
        let run = xdp(&datapath, frame);
        assert_ne!(run.verdict, XDP_DROP);
        let sliced = etherparse::SlicedPacket::from_ethernet(&run.packet).expect("parse");
        let Some(etherparse::NetSlice::Ipv4(ip)) = sliced.net else {
            panic!("ipv4")
        };
        assert_eq!(ip.header().destination_addr(), *POD.ip());
        assert!(
            !run.packet[packet::ETH_HDR_LEN + 20..].starts_with(&[0x9e]),
            "no DSR option"
        );
        ip.header().source_addr()
    };
    assert_eq!(
        snat_source(&packet::udp(CLIENT, FRONTEND, b"q")),
        NODE1,
        "UDP is SNATed"
    );
    let with_options = packet::with_ip_options(
        &packet::tcp(
            SocketAddrV4::new(*CLIENT.ip(), 40002),
            FRONTEND,
            TcpFlags::SYN,
            b"",
        ),
        &IP_OPTIONS,
    );
    assert_eq!(
        snat_source(&with_options),
        NODE1,
        "a header with options of its own has no room: SNAT"
    );
    assert_eq!(event(&datapath, "dsr_no_room"), 1);
    assert_eq!(event(&datapath, "dsr_sent"), 0);

    let pins = PinDir::new(&lab, "dsr1off").expect("pin dir");
    let without = node1(&pins, false);
    let run = xdp(&without, &packet::tcp(CLIENT, FRONTEND, TcpFlags::SYN, b""));
    let sliced = etherparse::SlicedPacket::from_ethernet(&run.packet).expect("parse");
    let Some(etherparse::NetSlice::Ipv4(ip)) = sliced.net else {
        panic!("ipv4")
    };
    assert_eq!(ip.header().source_addr(), NODE1, "SNAT without the flag");
    assert_eq!(ip.header().ihl(), 5, "and no option");
}

/// An endpoint whose node has not marked itself as taking DSR options (lb not running there
/// yet, or not since the node last booted) gets its flows by SNAT, counted; once marked, by
/// DSR.
#[test]
fn node1_snats_flows_to_an_endpoint_on_a_node_not_marked_for_dsr() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "dsr1unmarked").expect("pin dir");
    let mut datapath = node1(&pins, true);
    datapath
        .put_backend(1, &backend(POD, proto::TCP, 0))
        .expect("the endpoint, its node unmarked");
    let first = SocketAddrV4::new(*CLIENT.ip(), 40010);
    assert_snated_to_the_pod(&xdp(
        &datapath,
        &packet::tcp(first, FRONTEND, TcpFlags::SYN, b""),
    ));
    assert_eq!(
        (
            event(&datapath, "dsr_node_unmarked"),
            event(&datapath, "dsr_sent")
        ),
        (1, 0)
    );

    datapath
        .put_backend(
            1,
            &backend(POD, proto::TCP, backend_flags::TAKES_DIRECT_RETURN),
        )
        .expect("the endpoint, its node marked");
    let second = SocketAddrV4::new(*CLIENT.ip(), 40011);
    sent_as(
        &datapath,
        "a SYN once the node is marked",
        &packet::tcp(second, FRONTEND, TcpFlags::SYN, b""),
        &with_option(&packet::tcp(second, POD, TcpFlags::SYN, b""), FRONTEND),
    );
    assert_eq!(
        (
            event(&datapath, "dsr_node_unmarked"),
            event(&datapath, "dsr_sent")
        ),
        (1, 1)
    );
}

#[test]
fn node2_takes_an_admitted_option_and_answers_from_the_frontend() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "dsr2").expect("pin dir");
    let datapath = node2(&pins);
    let xdp_program = datapath
        .program_fd(lb_common::program_names::XDP_LB)
        .expect("fd");
    let syn = packet::tcp(CLIENT, POD, TcpFlags::SYN, b"");
    let lb_client = SocketAddrV4::new(*CLIENT.ip(), 40001);
    run_table(
        xdp_program,
        &[
            case(
                "a NodePort on node1",
                with_option(&syn, FRONTEND),
                XDP_PASS,
                Expect::Bytes(syn.clone()),
            ),
            case(
                "its retransmission",
                with_option(&syn, FRONTEND),
                XDP_PASS,
                Expect::Bytes(syn.clone()),
            ),
            case(
                "the LoadBalancer IP",
                with_option(&packet::tcp(lb_client, POD, TcpFlags::SYN, b""), LB_IP),
                XDP_PASS,
                Expect::Bytes(packet::tcp(lb_client, POD, TcpFlags::SYN, b"")),
            ),
            case(
                "the client's ACK, untouched",
                packet::tcp(CLIENT, POD, TcpFlags::ACK, b""),
                XDP_PASS,
                Expect::Unchanged,
            ),
        ],
    );
    assert_eq!(event(&datapath, "dsr_accepted"), 3);
    let flow = flow_of(&datapath, CLIENT).expect("the flow's entry");
    assert_eq!(
        flow.flags,
        ct_flags::CLIENT_IN_FLOW | ct_flags::DIRECT_RETURN
    );
    assert_eq!(
        (flow.frontend_addr, flow.frontend_port),
        (u32::from(NODE1), NODE_PORT)
    );
    assert_eq!((flow.service_id, flow.backend_id), (1, 1));

    let tc = datapath
        .program_fd(lb_common::program_names::TC_EGRESS)
        .expect("fd");
    run_table(
        tc,
        &[
            case(
                "the SYN-ACK leaves from the NodePort on node1",
                packet::tcp(POD, CLIENT, TcpFlags::SYN_ACK, b""),
                TC_ACT_OK,
                Expect::Bytes(packet::tcp(FRONTEND, CLIENT, TcpFlags::SYN_ACK, b"")),
            ),
            case(
                "the LoadBalancer IP flow's, from the LoadBalancer IP",
                packet::tcp(POD, lb_client, TcpFlags::SYN_ACK, b""),
                TC_ACT_OK,
                Expect::Bytes(packet::tcp(LB_IP, lb_client, TcpFlags::SYN_ACK, b"")),
            ),
            case(
                "the answer with data",
                packet::tcp_at(POD, CLIENT, TcpFlags::ACK, 1001, b"HTTP/1.1 200 OK\r\n\r\n"),
                TC_ACT_OK,
                Expect::Bytes(packet::tcp_at(
                    FRONTEND,
                    CLIENT,
                    TcpFlags::ACK,
                    1001,
                    b"HTTP/1.1 200 OK\r\n\r\n",
                )),
            ),
            case(
                "another pod's packet to the client, untouched",
                packet::tcp(OTHER_POD, CLIENT, TcpFlags::SYN_ACK, b""),
                TC_ACT_OK,
                Expect::Unchanged,
            ),
        ],
    );
    // The endpoint's answers moved the flow on: its ACK without SYN established it.
    assert_eq!(
        flow_of(&datapath, CLIENT).expect("entry").state,
        lb_common::tcp_state::ESTABLISHED
    );
}

#[test]
fn node2_refuses_options_that_name_no_frontend_of_the_endpoints_service() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "dsr2no").expect("pin dir");
    let datapath = node2(&pins);
    let xdp_program = datapath
        .program_fd(lb_common::program_names::XDP_LB)
        .expect("fd");
    let client = |port| SocketAddrV4::new(*CLIENT.ip(), port);
    let syn_to = |port, pod| packet::tcp(client(port), pod, TcpFlags::SYN, b"");
    let mut bad_checksum = with_option(&syn_to(41005, POD), FRONTEND);
    bad_checksum[packet::ETH_HDR_LEN + 10] ^= 0xff;
    let refused = [
        (
            "a NodePort on an address no node has",
            with_option(
                &syn_to(41000, POD),
                SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), NODE_PORT),
            ),
        ),
        (
            "a port that is no NodePort of the endpoint's Service",
            with_option(&syn_to(41001, POD), SocketAddrV4::new(NODE1, 30090)),
        ),
        (
            "another Service's NodePort at its endpoint",
            with_option(&syn_to(41002, OTHER_POD), FRONTEND),
        ),
        (
            "an address that is no frontend at all",
            with_option(
                &syn_to(41003, POD),
                SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 81), 80),
            ),
        ),
        (
            "a segment that is no SYN",
            with_option(
                &packet::tcp(client(41004), POD, TcpFlags::ACK, b""),
                FRONTEND,
            ),
        ),
        (
            "the NodePort on 0.0.0.0, the address the NodePorts' pairs are kept by",
            with_option(
                &syn_to(41006, POD),
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, NODE_PORT),
            ),
        ),
        (
            // As node1's SNAT relays a client's SYN that came with a forged option: its flow
            // would be keyed by node1's SNAT port.
            "a SYN from a node's address",
            with_option(
                &packet::tcp(SocketAddrV4::new(NODE1, 61000), POD, TcpFlags::SYN, b""),
                FRONTEND,
            ),
        ),
    ];
    let mut cases: Vec<Case> = refused
        .iter()
        .map(|(name, frame)| case(name, frame.clone(), XDP_DROP, Expect::Unchanged))
        .collect();
    cases.push(case(
        "a SYN whose header checksum is wrong",
        bad_checksum,
        XDP_DROP,
        Expect::Unchanged,
    ));
    run_table(xdp_program, &cases);
    assert_eq!(event(&datapath, "drop_dsr_refused"), refused.len() as u64);
    assert_eq!(event(&datapath, "drop_ip_checksum"), 1);
    assert_eq!(event(&datapath, "dsr_accepted"), 0);
    assert!(
        datapath.conntrack().expect("conntrack").is_empty(),
        "a refused option leaves nothing behind"
    );
}

/// node2 takes no DSR SYN from a frame not sent to its NIC's MAC (a group MAC here): it passes
/// untouched, its option in place, and no flow is kept for it.
#[test]
fn node2_leaves_a_dsr_syn_in_a_broadcast_frame_untouched() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "dsr2bcast").expect("pin dir");
    let datapath = node2(&pins);
    let mut syn = with_option(&packet::tcp(CLIENT, POD, TcpFlags::SYN, b""), FRONTEND);
    syn[0..6].copy_from_slice(&[0xff; 6]);
    let run = xdp(&datapath, &syn);
    assert_eq!((run.verdict, &run.packet), (XDP_PASS, &syn));
    assert!(flow_of(&datapath, CLIENT).is_none());
    assert_eq!(event(&datapath, "dsr_accepted"), 0);
    assert_eq!(event(&datapath, "pass_other_host"), 1);
}

/// The client key a DSR flow takes on node2 is its own while the flow lives: another flow from
/// the same client port (to another frontend) is refused then, and takes the key once the
/// first flow is past its timeout.
#[test]
fn node2_refuses_a_second_flow_on_a_live_flows_client_key_until_it_times_out() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "dsr2clash").expect("pin dir");
    let mut datapath = node2(&pins);
    with_timeouts(
        &mut datapath,
        Duration::from_millis(600),
        Duration::from_secs(2),
    );
    let syn = packet::tcp(CLIENT, POD, TcpFlags::SYN, b"");
    assert_eq!(
        xdp(&datapath, &with_option(&syn, FRONTEND)).verdict,
        XDP_PASS
    );
    let to_lb_ip = with_option(&syn, LB_IP);
    assert_eq!(xdp(&datapath, &to_lb_ip).verdict, XDP_DROP);
    assert_eq!(event(&datapath, "drop_dsr_clash"), 1);
    std::thread::sleep(Duration::from_millis(900));
    assert_eq!(
        xdp(&datapath, &to_lb_ip).verdict,
        XDP_PASS,
        "past the SYN timeout the key is free"
    );
    let flow = flow_of(&datapath, CLIENT).expect("entry");
    assert_eq!(
        (flow.frontend_addr, flow.frontend_port),
        (u32::from(*LB_IP.ip()), LB_IP.port())
    );
}

/// Flows live longer than their timeouts while they carry traffic: on node1 the client's
/// packets refresh the flow, on node2 (which sees only the SYN from the client) the
/// endpoint's answers do. A flow with no traffic at all ends by the established timeout.
#[test]
fn dsr_flows_outlive_their_timeouts_while_they_carry_traffic_and_end_by_them_when_idle() {
    let lab = Lab::new().expect("lab");
    let pins1 = PinDir::new(&lab, "dsr1time").expect("pin dir");
    let mut first = node1(&pins1, true);
    let pins2 = PinDir::new(&lab, "dsr2time").expect("pin dir");
    let mut second = node2(&pins2);
    let established = Duration::from_secs(2);
    with_timeouts(&mut first, Duration::from_millis(600), established);
    with_timeouts(&mut second, Duration::from_millis(600), established);

    let tc = |frame: &[u8]| {
        let program = second
            .program_fd(lb_common::program_names::TC_EGRESS)
            .expect("fd");
        test_run(program, frame).expect("run")
    };
    // The handshake through both nodes.
    let syn = xdp(&first, &packet::tcp(CLIENT, FRONTEND, TcpFlags::SYN, b""));
    assert_eq!(xdp(&second, &syn.packet).verdict, XDP_PASS);
    let answer = |seq: u32| {
        let run = tc(&packet::tcp_at(POD, CLIENT, TcpFlags::ACK, seq, b"x"));
        assert_eq!(
            run.packet,
            packet::tcp_at(FRONTEND, CLIENT, TcpFlags::ACK, seq, b"x"),
            "an answer leaves from the frontend"
        );
    };
    tc(&packet::tcp(POD, CLIENT, TcpFlags::SYN_ACK, b""));
    sent_as(
        &first,
        "the client's ACK",
        &packet::tcp(CLIENT, FRONTEND, TcpFlags::ACK, b""),
        &packet::tcp(CLIENT, POD, TcpFlags::ACK, b""),
    );
    // Traffic every 400 ms for twice the established timeout.
    let started = std::time::Instant::now();
    let mut seq = 1001;
    while started.elapsed() < established * 2 {
        std::thread::sleep(Duration::from_millis(400));
        sent_as(
            &first,
            "the client's data",
            &packet::tcp_at(CLIENT, FRONTEND, TcpFlags::ACK, seq, b"q"),
            &packet::tcp_at(CLIENT, POD, TcpFlags::ACK, seq, b"q"),
        );
        answer(seq);
        seq += 1;
    }
    assert_eq!(
        first.service_counter(1).expect("counter").new_flows,
        1,
        "node1 kept the one flow"
    );
    assert_eq!(event(&second, "dsr_accepted"), 1);
    // node2's entry is still the flow's: another flow on its client key is refused.
    let other = with_option(&packet::tcp(CLIENT, POD, TcpFlags::SYN, b""), LB_IP);
    assert_eq!(
        xdp(&second, &other).verdict,
        XDP_DROP,
        "the flow lives on node2"
    );

    // Idle past the established timeout: the flow is over on both nodes.
    std::thread::sleep(established + Duration::from_millis(500));
    assert_eq!(
        xdp(&second, &other).verdict,
        XDP_PASS,
        "node2's key is free"
    );
    let idle_for = lb_userspace::observe::inspect::monotonic_ns()
        - flow_of(&first, CLIENT).expect("node1's entry").last_seen_ns;
    assert!(
        idle_for > ms(established),
        "node1's entry is past its timeout ({idle_for} ns idle)"
    );
}

/// On node2, a DSR flow that closed gives its client key up at once to the client's next SYN
/// from that port, and a connection the client makes straight to the pod from that port (no
/// option: node2 sees none of it but the pod's answers) is not taken for the closed flow: its
/// SYN-ACK and every later answer leave as the pod sent them.
#[test]
fn node2_gives_a_closed_flows_client_key_to_the_clients_next_connection() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "dsr2reuse").expect("pin dir");
    let datapath = node2(&pins);
    let tc = |name, frame, output| through_tc(&datapath, name, frame, output);
    let syn = packet::tcp(CLIENT, POD, TcpFlags::SYN, b"");
    // A DSR flow through the NodePort (the client's SYN at 1000), answered and closed by the pod.
    let flow_through_the_node_port = || {
        assert_eq!(
            xdp(&datapath, &with_option(&syn, FRONTEND)).verdict,
            XDP_PASS
        );
        tc(
            "the SYN-ACK",
            packet::tcp_acking(POD, CLIENT, TcpFlags::SYN_ACK, (1000, 1001), b""),
            Expect::Bytes(packet::tcp_acking(
                FRONTEND,
                CLIENT,
                TcpFlags::SYN_ACK,
                (1000, 1001),
                b"",
            )),
        );
        tc(
            "the pod's FIN",
            packet::tcp_at(POD, CLIENT, TcpFlags::FIN_ACK, 1001, b""),
            Expect::Bytes(packet::tcp_at(
                FRONTEND,
                CLIENT,
                TcpFlags::FIN_ACK,
                1001,
                b"",
            )),
        );
    };
    flow_through_the_node_port();
    assert_eq!(
        flow_of(&datapath, CLIENT).expect("entry").state,
        lb_common::tcp_state::CLOSING
    );

    // Straight to the pod from the same port (the client's SYN at 9 000 000): untranslated,
    // and the entry goes.
    tc(
        "a SYN-ACK of a connection straight to the pod",
        packet::tcp_acking(POD, CLIENT, TcpFlags::SYN_ACK, (5000, 9_000_001), b""),
        Expect::Unchanged,
    );
    assert_eq!(event(&datapath, "ct_flow_superseded"), 1);
    assert_superseded(flow_of(&datapath, CLIENT));
    tc(
        "its data",
        packet::tcp_at(POD, CLIENT, TcpFlags::ACK, 5001, b"straight"),
        Expect::Unchanged,
    );

    // A DSR flow again from that port, through another frontend, while the first one's entry
    // would still be closing: taken, no clash.
    flow_through_the_node_port();
    assert_eq!(xdp(&datapath, &with_option(&syn, LB_IP)).verdict, XDP_PASS);
    assert_eq!(event(&datapath, "drop_dsr_clash"), 0);
    let flow = flow_of(&datapath, CLIENT).expect("entry");
    assert_eq!(
        (flow.frontend_addr, flow.frontend_port, flow.state),
        (
            u32::from(*LB_IP.ip()),
            LB_IP.port(),
            lb_common::tcp_state::SYN_SENT
        )
    );
}

/// On node1, a SNAT flow both sides have closed gives its client key up to the client's next
/// SYN from that port through another frontend: that flow is kept in one entry, and goes by
/// DSR where its Service has it. Every other holder keeps the key, and the new flow is kept
/// as two entries, by SNAT: a live flow; a DSR flow the client has closed, which may be only
/// half-closed (node1 sees the client's side alone) and whose endpoint would see the new flow
/// on the old one's tuple; a SNAT flow only its client has closed.
#[test]
fn node1_gives_a_closed_snat_flows_client_key_to_the_clients_next_connection() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "dsr1reuse").expect("pin dir");
    let datapath = node1(&pins, true);
    let client = |port| SocketAddrV4::new(*CLIENT.ip(), port);
    let frontend_of = |datapath: &Datapath, client| {
        let flow = flow_of(datapath, client).expect("the client's FLOW entry");
        SocketAddrV4::new(Ipv4Addr::from(flow.frontend_addr), flow.frontend_port)
    };
    let next_syn = |client| packet::tcp_at(client, LB_IP, TcpFlags::SYN, 9_000_000, b"");

    // DSR flows: established, and closed by the client.
    for (port, close) in [(40020, false), (40021, true)] {
        let client = client(port);
        sent_as(
            &datapath,
            "a SYN to the NodePort",
            &packet::tcp(client, FRONTEND, TcpFlags::SYN, b""),
            &with_option(&packet::tcp(client, POD, TcpFlags::SYN, b""), FRONTEND),
        );
        let last = if close {
            TcpFlags::FIN_ACK
        } else {
            TcpFlags::ACK
        };
        xdp(
            &datapath,
            &packet::tcp_at(client, FRONTEND, last, 1001, b""),
        );
        assert_snated_to_the_pod(&xdp(&datapath, &next_syn(client)));
        assert_eq!(
            frontend_of(&datapath, client),
            FRONTEND,
            "a DSR flow, closed by the client {close}: the key stays"
        );
    }

    // A SNAT flow (its SYN's IP options left no room for DSR's), closed by the client alone,
    // then by both; a Service without DSR the same.
    let close_snat_flow = |datapath: &Datapath, client, both: bool| {
        let syn = packet::with_ip_options(
            &packet::tcp(client, FRONTEND, TcpFlags::SYN, b""),
            &IP_OPTIONS,
        );
        let run = xdp(datapath, &syn);
        assert_ne!(run.verdict, XDP_DROP);
        let ip_header = &run.packet[packet::ETH_HDR_LEN..];
        assert_eq!(
            (&ip_header[12..16], &ip_header[16..20]),
            (&NODE1.octets()[..], &POD.ip().octets()[..]),
            "a SYN with options: SNATed to the pod"
        );
        let snat = SocketAddrV4::new(NODE1, flow_of(datapath, client).expect("entry").snat_port);
        xdp(
            datapath,
            &packet::tcp_acking(POD, snat, TcpFlags::SYN_ACK, (5000, 1001), b""),
        );
        xdp(
            datapath,
            &packet::tcp_at(client, FRONTEND, TcpFlags::FIN_ACK, 1001, b""),
        );
        if both {
            xdp(
                datapath,
                &packet::tcp_acking(POD, snat, TcpFlags::FIN_ACK, (5001, 1002), b""),
            );
        }
    };
    let half_closed = client(40030);
    close_snat_flow(&datapath, half_closed, false);
    assert_snated_to_the_pod(&xdp(&datapath, &next_syn(half_closed)));
    assert_eq!(
        frontend_of(&datapath, half_closed),
        FRONTEND,
        "half-closed: the key stays"
    );
    let closed = client(40031);
    close_snat_flow(&datapath, closed, true);
    assert_eq!(
        flow_of(&datapath, closed).expect("entry").state,
        lb_common::tcp_state::CLOSING
    );
    sent_as(
        &datapath,
        "the next SYN from a closed SNAT flow's port, to the LoadBalancer IP",
        &next_syn(closed),
        &with_option(
            &packet::tcp_at(closed, POD, TcpFlags::SYN, 9_000_000, b""),
            LB_IP,
        ),
    );
    let flow = flow_of(&datapath, closed).expect("entry");
    assert_eq!(
        (frontend_of(&datapath, closed), flow.state, flow.flags),
        (
            LB_IP,
            lb_common::tcp_state::SYN_SENT,
            ct_flags::CLIENT_IN_FLOW | ct_flags::DIRECT_RETURN
        )
    );
    let client_keys = datapath
        .conntrack()
        .expect("conntrack")
        .into_iter()
        .filter(|(key, _)| key.saddr == u32::from(*closed.ip()) && key.sport == closed.port())
        .count();
    assert_eq!(client_keys, 1, "the FLOW entry alone: no ORIGINAL entry");
    assert_eq!(event(&datapath, "dsr_sent"), 3);

    let pins = PinDir::new(&lab, "dsr1reusesnat").expect("pin dir");
    let without_dsr = node1(&pins, false);
    let closed = client(40032);
    close_snat_flow(&without_dsr, closed, true);
    assert_snated_to_the_pod(&xdp(&without_dsr, &next_syn(closed)));
    assert_eq!(
        frontend_of(&without_dsr, closed),
        LB_IP,
        "without DSR: the next SYN's flow holds the key"
    );
}

/// node1 sends a node's own SYNs (a host process of another node connecting to the NodePort)
/// by SNAT: the endpoint's node refuses options on SYNs from nodes' addresses.
#[test]
fn node1_sends_a_nodes_syns_by_snat() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "dsr1node").expect("pin dir");
    let mut datapath = node1(&pins, true);
    let other_node = Ipv4Addr::new(203, 0, 113, 3);
    datapath
        .set_node_addresses(&BTreeSet::from([
            NODE1.into(),
            NODE2.into(),
            other_node.into(),
        ]))
        .expect("node addresses");
    let run = xdp(
        &datapath,
        &packet::tcp(
            SocketAddrV4::new(other_node, 40000),
            FRONTEND,
            TcpFlags::SYN,
            b"",
        ),
    );
    assert_snated_to_the_pod(&run);
    assert_eq!(event(&datapath, "dsr_sent"), 0);
    // A client that is no node still goes by DSR.
    sent_as(
        &datapath,
        "a client's SYN",
        &packet::tcp(CLIENT, FRONTEND, TcpFlags::SYN, b""),
        &with_option(&packet::tcp(CLIENT, POD, TcpFlags::SYN, b""), FRONTEND),
    );
}

/// node1 serves its NodePorts on addresses its Node object may not list (its fallback
/// addresses), which the endpoint's node would refuse in an option: a SYN to a NodePort on an
/// address that is no node's goes by SNAT; the LoadBalancer IP, which needs no node address,
/// by DSR.
#[test]
fn node1_snats_a_nodeport_syn_to_an_address_no_node_lists() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "dsr1unlisted").expect("pin dir");
    let mut datapath = node1(&pins, true);
    datapath
        .set_node_addresses(&BTreeSet::from([NODE2.into()]))
        .expect("node addresses without node1's");
    let run = xdp(
        &datapath,
        &packet::tcp(CLIENT, FRONTEND, TcpFlags::SYN, b""),
    );
    assert_ne!(run.verdict, XDP_DROP);
    let sliced = etherparse::SlicedPacket::from_ethernet(&run.packet).expect("parse");
    let Some(etherparse::NetSlice::Ipv4(ip)) = sliced.net else {
        panic!("ipv4")
    };
    assert_eq!(
        (ip.header().source_addr(), ip.header().ihl()),
        (NODE1, 5),
        "SNATed, no option"
    );
    assert_eq!(event(&datapath, "dsr_sent"), 0);
    lb_ip_syn_sent_by_dsr(&datapath);
    assert_eq!(event(&datapath, "dsr_sent"), 1);
}

/// node2 judges the pod's SYN-ACKs to a DSR flow by what they acknowledge, in every state of
/// the flow: its own (sent again, after early data of TCP Fast Open, after a SYN sent again
/// without that data) go back from the frontend; another connection's, from the same client
/// port, leave as sent and end the entry's flow, also when the entry never got past its SYN
/// (a client that gave up its handshake through the NodePort).
#[test]
fn node2_takes_a_dsr_flows_own_syn_acks_by_their_acknowledgment_in_every_state() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "dsr2ack").expect("pin dir");
    let datapath = node2(&pins);
    let tc = |name, frame, output| through_tc(&datapath, name, frame, output);
    let syn_ack = |from: SocketAddrV4, to: SocketAddrV4, ack: u32| {
        packet::tcp_acking(from, to, TcpFlags::SYN_ACK, (500_000, ack), b"")
    };

    // A Fast Open SYN: 100 bytes of data at 1000 (its end 1101), then sent again without them.
    let data = [b'q'; 100];
    let fast_open = packet::tcp(CLIENT, POD, TcpFlags::SYN, &data);
    let again = packet::tcp(CLIENT, POD, TcpFlags::SYN, b"");
    for (name, frame) in [("the Fast Open SYN", &fast_open), ("sent again", &again)] {
        let run = xdp(&datapath, &with_option(frame, FRONTEND));
        assert_eq!((name, run.verdict), (name, XDP_PASS));
        assert_eq!(&run.packet, frame, "{name}: the option taken out");
    }
    assert_eq!(flow_of(&datapath, CLIENT).expect("entry").seq_next, 1101);
    for (name, ack) in [
        ("the SYN-ACK taking the data", 1101),
        ("a SYN-ACK refusing it", 1001),
    ] {
        tc(
            name,
            syn_ack(POD, CLIENT, ack),
            Expect::Bytes(syn_ack(FRONTEND, CLIENT, ack)),
        );
    }
    tc(
        "the pod's early data",
        packet::tcp_at(POD, CLIENT, TcpFlags::ACK, 500_001, b"early"),
        Expect::Bytes(packet::tcp_at(
            FRONTEND,
            CLIENT,
            TcpFlags::ACK,
            500_001,
            b"early",
        )),
    );
    assert_eq!(
        flow_of(&datapath, CLIENT).expect("entry").state,
        lb_common::tcp_state::ESTABLISHED
    );
    tc(
        "the SYN-ACK sent again after it",
        syn_ack(POD, CLIENT, 1101),
        Expect::Bytes(syn_ack(FRONTEND, CLIENT, 1101)),
    );
    assert_eq!(event(&datapath, "ct_flow_superseded"), 0);

    // A client that gave up its handshake through the NodePort, then connects from that port
    // straight to the pod (its SYN at 7 000 000).
    let gave_up = SocketAddrV4::new(*CLIENT.ip(), 40100);
    let syn = packet::tcp(gave_up, POD, TcpFlags::SYN, b"");
    assert_eq!(
        xdp(&datapath, &with_option(&syn, FRONTEND)).verdict,
        XDP_PASS
    );
    assert_eq!(
        flow_of(&datapath, gave_up).expect("entry").state,
        lb_common::tcp_state::SYN_SENT
    );
    tc(
        "the straight connection's SYN-ACK",
        syn_ack(POD, gave_up, 7_000_001),
        Expect::Unchanged,
    );
    assert_eq!(event(&datapath, "ct_flow_superseded"), 1);
    assert_superseded(flow_of(&datapath, gave_up));
}

/// The frontend filter is one hash's bits: an endpoint whose address and port share a bit with
/// a frontend has its DSR SYNs take the frontend lookup, which finds nothing. They are taken
/// all the same.
#[test]
fn node2_takes_options_to_an_endpoint_whose_filter_bit_a_frontend_sets() {
    use lb_common::frontend_filter::bit;
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "dsr2bit").expect("pin dir");
    let mut datapath = node2(&pins);
    let pod_bit = bit(u32::from(*POD.ip()), POD.port(), proto::TCP);
    // 198.18.0.0/24 x every port: about 16 addresses share any one bit.
    let sharer = (0..256u32)
        .flat_map(|host| (1..=u16::MAX).map(move |port| (host, port)))
        .map(|(host, port)| SocketAddrV4::new(Ipv4Addr::from(0xc612_0000 | host), port))
        .find(|at| bit(u32::from(*at.ip()), at.port(), proto::TCP) == pod_bit)
        .expect("an address and port of the pod's bit");
    datapath
        .put_service(&Service {
            id: 3,
            frontends: vec![frontend(sharer, proto::TCP, service_flags::EXTERNAL_IP)],
            backends: vec![2],
            ..Default::default()
        })
        .expect("service");
    let syn = packet::tcp(CLIENT, POD, TcpFlags::SYN, b"");
    let run = xdp(&datapath, &with_option(&syn, FRONTEND));
    assert_eq!(run.verdict, XDP_PASS);
    assert_eq!(run.packet, syn, "the option taken out");
    assert_eq!(event(&datapath, "dsr_accepted"), 1);
    assert_eq!(
        flow_of(&datapath, CLIENT).expect("entry").frontend_port,
        NODE_PORT
    );
}

/// A DSR flow whose pod's answers took answer slots on two CPUs, closed by the pod; the
/// client's next connection from the port comes through another frontend of the same Service
/// (its SYN's option names the LoadBalancer IP) to the same pod: the pod's answers leave from
/// that frontend on both CPUs, also those inside the old slots' sequence window (the new entry
/// takes the key, and the old flow's answer slots go with the old entry, on every CPU).
#[test]
fn node2_answers_a_reopened_flow_from_its_new_frontend() {
    let [first, second] = lab::table::two_cpus();
    lab::table::run_on_cpu(first);
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "dsr2reopen").expect("pin dir");
    let datapath = node2(&pins);
    let answer = |name, flags, seq_ack, payload: &[u8], frontend| {
        through_tc(
            &datapath,
            name,
            packet::tcp_acking(POD, CLIENT, flags, seq_ack, payload),
            Expect::Bytes(packet::tcp_acking(
                frontend, CLIENT, flags, seq_ack, payload,
            )),
        );
    };
    let syn_at = |seq, frontend| {
        with_option(
            &packet::tcp_at(CLIENT, POD, TcpFlags::SYN, seq, b""),
            frontend,
        )
    };
    let data = [9u8; 100];
    assert_eq!(xdp(&datapath, &syn_at(1000, FRONTEND)).verdict, XDP_PASS);
    answer(
        "the SYN-ACK",
        TcpFlags::SYN_ACK,
        (500_000, 1001),
        b"",
        FRONTEND,
    );
    let mut sent = 500_001;
    for cpu in [first, second] {
        lab::table::run_on_cpu(cpu);
        answer("data", TcpFlags::ACK, (sent, 1001), &data, FRONTEND);
        answer(
            "data from the slot",
            TcpFlags::ACK,
            (sent + 100, 1001),
            &data,
            FRONTEND,
        );
        sent += 200;
    }
    let flow = flow_of(&datapath, CLIENT).expect("entry");
    assert_eq!(
        flow.answer_slot_cpus,
        lb_common::flow_cache::cpus::SEVERAL,
        "answer slots on both CPUs"
    );
    answer(
        "the pod's FIN",
        TcpFlags::FIN_ACK,
        (sent, 1001),
        b"",
        FRONTEND,
    );
    assert_eq!(xdp(&datapath, &syn_at(9_000_000, LB_IP)).verdict, XDP_PASS);
    let isn = sent + 101;
    answer(
        "the new SYN-ACK",
        TcpFlags::SYN_ACK,
        (isn, 9_000_001),
        b"",
        LB_IP,
    );
    let mut seq = isn + 1;
    for cpu in [first, second] {
        lab::table::run_on_cpu(cpu);
        answer("new data", TcpFlags::ACK, (seq, 9_000_001), &data, LB_IP);
        answer(
            "more new data",
            TcpFlags::ACK,
            (seq + 100, 9_000_001),
            &data,
            LB_IP,
        );
        seq += 200;
    }
    assert_eq!(event(&datapath, "drop_dsr_clash"), 0);
}

/// A client that reset its DSR connection (node2 never sees the RST: the entry stays
/// established) and connects again from the same port through the same frontend gets a new
/// flow: its SYN, far from the entry's, is no retransmission, and the pod's SYN-ACK to it goes
/// back from the frontend.
#[test]
fn node2_starts_a_new_connection_afresh_on_a_reset_flows_entry() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "dsr2again").expect("pin dir");
    let datapath = node2(&pins);
    let tc = |name, frame, output| through_tc(&datapath, name, frame, output);
    let syn_at = |seq| packet::tcp_at(CLIENT, POD, TcpFlags::SYN, seq, b"");
    let answer = |name, flags, seq_ack| {
        tc(
            name,
            packet::tcp_acking(POD, CLIENT, flags, seq_ack, b""),
            Expect::Bytes(packet::tcp_acking(FRONTEND, CLIENT, flags, seq_ack, b"")),
        );
    };
    assert_eq!(
        xdp(&datapath, &with_option(&syn_at(1000), FRONTEND)).verdict,
        XDP_PASS
    );
    answer("the SYN-ACK", TcpFlags::SYN_ACK, (500_000, 1001));
    answer("the pod's data", TcpFlags::ACK, (500_001, 1001));
    assert_eq!(
        flow_of(&datapath, CLIENT).expect("entry").state,
        lb_common::tcp_state::ESTABLISHED
    );
    // The client resets the connection (through node1 only), then connects again.
    assert_eq!(
        xdp(&datapath, &with_option(&syn_at(5_000_000), FRONTEND)).verdict,
        XDP_PASS
    );
    let flow = flow_of(&datapath, CLIENT).expect("entry");
    assert_eq!(
        (flow.state, flow.seq_next, flow.backend_seq_next),
        (lb_common::tcp_state::SYN_SENT, 5_000_001, 0)
    );
    answer("the new SYN-ACK", TcpFlags::SYN_ACK, (900_000, 5_000_001));
    assert_eq!(event(&datapath, "drop_dsr_clash"), 0);
    assert_eq!(event(&datapath, "ct_flow_superseded"), 0);
}

/// The entry node2 keeps for `client`'s flow to `endpoint` under its answers' tuple (a
/// [`ct_flags::kept_by_answers`] entry).
fn kept_by_answers(
    datapath: &Datapath,
    endpoint: SocketAddrV4,
    client: SocketAddrV4,
) -> Option<Flow4Value> {
    datapath
        .conntrack()
        .expect("conntrack")
        .into_iter()
        .find(|(key, value)| {
            key.direction == ct_direction::REPLY
                && (key.saddr, key.sport) == (u32::from(*endpoint.ip()), endpoint.port())
                && (key.daddr, key.dport) == (u32::from(*client.ip()), client.port())
                && ct_flags::kept_by_answers(value.flags)
        })
        .map(|(_, value)| *Flow4Value::of(&value))
}

/// One client address and port to two Services' frontends at once (a NAT in front of the
/// clients reusing a port for many destinations), both endpoints on node2: the second flow
/// finds the client's key held by the first and is kept by its answers' tuple, and each
/// endpoint's answers leave from their own flow's frontend. The endpoint tells connections
/// apart by that tuple alone: a flow to the same endpoint through another frontend is still
/// refused. The second flow outlives its timeouts while its endpoint answers (node2 sees
/// nothing else of it) and ends by them when idle; its entry gives way to a connection the
/// client makes straight to the pod, as a FLOW entry does.
#[test]
fn node2_keeps_a_flow_to_another_endpoint_on_a_held_client_key_by_its_answers() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "dsr2beside").expect("pin dir");
    let mut datapath = node2(&pins);
    let established = Duration::from_secs(2);
    with_timeouts(&mut datapath, Duration::from_millis(600), established);
    let other_frontend = SocketAddrV4::new(NODE1, 30090);
    let other_on_node2 = SocketAddrV4::new(NODE2, 30090);
    let tc = |name, frame, output| through_tc(&datapath, name, frame, output);
    let answer = |name, (from, frontend): (SocketAddrV4, SocketAddrV4), flags, seq_ack| {
        tc(
            name,
            packet::tcp_acking(from, CLIENT, flags, seq_ack, b""),
            Expect::Bytes(packet::tcp_acking(frontend, CLIENT, flags, seq_ack, b"")),
        );
    };
    let syn_to = |endpoint, seq| packet::tcp_at(CLIENT, endpoint, TcpFlags::SYN, seq, b"");
    let accepted = |name: &str, frame: &[u8], frontend| {
        let run = xdp(&datapath, &with_option(frame, frontend));
        assert_eq!((name, run.verdict), (name, XDP_PASS));
        assert_eq!(run.packet, frame, "{name}: the option taken out");
    };

    accepted("the first flow's SYN", &syn_to(POD, 1000), FRONTEND);
    accepted(
        "the second flow's, another Service's",
        &syn_to(OTHER_POD, 7000),
        other_frontend,
    );
    accepted(
        "the second flow's sent again",
        &syn_to(OTHER_POD, 7000),
        other_frontend,
    );
    assert_eq!(event(&datapath, "dsr_accepted"), 3);
    assert_eq!(event(&datapath, "dsr_kept_by_answers"), 1);
    assert_eq!(event(&datapath, "drop_dsr_clash"), 0);
    let first = flow_of(&datapath, CLIENT).expect("the client's FLOW entry");
    assert_eq!(
        (first.backend_addr, first.backend_port),
        (u32::from(*POD.ip()), POD.port())
    );
    let second = kept_by_answers(&datapath, OTHER_POD, CLIENT).expect("the second flow's entry");
    assert_eq!(
        (
            second.frontend_addr,
            second.frontend_port,
            second.service_id,
            second.backend_id
        ),
        (u32::from(NODE1), 30090, 2, 2)
    );
    assert_eq!(second.seq_next, 7001);

    let pod = (POD, FRONTEND);
    let other = (OTHER_POD, other_frontend);
    answer("the first SYN-ACK", pod, TcpFlags::SYN_ACK, (500_000, 1001));
    answer(
        "the second SYN-ACK",
        other,
        TcpFlags::SYN_ACK,
        (800_000, 7001),
    );
    answer("the first pod's data", pod, TcpFlags::ACK, (500_001, 1001));
    answer(
        "the other pod's data",
        other,
        TcpFlags::ACK,
        (800_001, 7001),
    );
    assert_eq!(
        kept_by_answers(&datapath, OTHER_POD, CLIENT)
            .expect("entry")
            .state,
        lb_common::tcp_state::ESTABLISHED,
        "the other pod's answers moved its flow on"
    );

    // The same endpoint through another frontend: the pod would see one connection.
    for (name, frame, frontend) in [
        (
            "the first pod through the LoadBalancer IP",
            syn_to(POD, 9000),
            LB_IP,
        ),
        (
            "the other pod through node2's NodePort",
            syn_to(OTHER_POD, 9000),
            other_on_node2,
        ),
    ] {
        assert_eq!(
            (name, xdp(&datapath, &with_option(&frame, frontend)).verdict),
            (name, XDP_DROP)
        );
    }
    assert_eq!(event(&datapath, "drop_dsr_clash"), 2);

    // Both pods answer every 400 ms for twice the established timeout: both flows live on.
    let started = std::time::Instant::now();
    let mut seq = 500_002;
    while started.elapsed() < established * 2 {
        std::thread::sleep(Duration::from_millis(400));
        answer("the first pod", pod, TcpFlags::ACK, (seq, 1001));
        answer("the other pod", other, TcpFlags::ACK, (seq + 300_000, 7001));
        seq += 1;
    }
    let through_node2 = with_option(&syn_to(OTHER_POD, 9000), other_on_node2);
    assert_eq!(
        xdp(&datapath, &through_node2).verdict,
        XDP_DROP,
        "the second flow lives on by its answers"
    );

    // The other pod falls silent, the first goes on: past the established timeout the second
    // flow is over, and the client's key is still held.
    let silent = std::time::Instant::now();
    while silent.elapsed() < established + Duration::from_millis(500) {
        std::thread::sleep(Duration::from_millis(400));
        answer("the first pod", pod, TcpFlags::ACK, (seq, 1001));
        seq += 1;
    }
    assert_eq!(
        xdp(&datapath, &through_node2).verdict,
        XDP_PASS,
        "the idle flow's tuple is free"
    );
    assert_eq!(event(&datapath, "dsr_kept_by_answers"), 2);
    let again = kept_by_answers(&datapath, OTHER_POD, CLIENT).expect("the new flow's entry");
    assert_eq!(
        (again.frontend_addr, again.frontend_port, again.state),
        (u32::from(NODE2), 30090, lb_common::tcp_state::SYN_SENT)
    );

    // A connection from the port straight to the other pod (its SYN at 4 000 000): its
    // SYN-ACK leaves as the pod sent it and ends the kept flow; the first flow is untouched.
    tc(
        "a straight connection's SYN-ACK",
        packet::tcp_acking(
            OTHER_POD,
            CLIENT,
            TcpFlags::SYN_ACK,
            (600_000, 4_000_001),
            b"",
        ),
        Expect::Unchanged,
    );
    assert_eq!(event(&datapath, "ct_flow_superseded"), 1);
    let superseded = kept_by_answers(&datapath, OTHER_POD, CLIENT).expect("entry");
    assert_ne!(superseded.flags & ct_flags::SUPERSEDED, 0);
    tc(
        "its data, untranslated",
        packet::tcp_acking(OTHER_POD, CLIENT, TcpFlags::ACK, (600_001, 4_000_001), b""),
        Expect::Unchanged,
    );
    answer("the first pod", pod, TcpFlags::ACK, (seq, 1001));
}
