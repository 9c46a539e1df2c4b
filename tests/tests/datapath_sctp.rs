//! SCTP through the datapath with BPF_PROG_TEST_RUN: the chunks that open, carry, close and
//! abort an association, to a local endpoint (XDP, then tc for its answers) and to a remote one
//! (SNAT both ways in XDP), over IPv4 and over IPv6. Every expected packet is built whole, its CRC32c computed by the
//! `crc` crate, never by the datapath's incremental update. The kernels of these machines have
//! no SCTP (CONFIG_IP_SCTP is not set), so no real association runs here: the lab cannot open
//! an SCTP socket.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use lab::{
    lab::{Lab, PinDir},
    packet, packet6,
    table::{Case, Expect, run_table},
};
use lb_common::{
    Flow4Value, flow_key, proto,
    sctp::chunk,
    service_flags,
    tcp_state::{CLIENT_CLOSED, CLOSING, ESTABLISHED, SYN_SENT},
};
use lb_userspace::{
    compile::model::{Backend, Frontend, Service, ipv6_words},
    datapath::{Datapath, testrun::test_run},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

const NODE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 40000);
const FRONTEND: SocketAddrV4 = SocketAddrV4::new(NODE, 30132);
const EMPTY_FRONTEND: SocketAddrV4 = SocketAddrV4::new(NODE, 30133);
const POD: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 10), 3868);
const REMOTE_POD: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 20), 3868);
const SNAT_PORTS: (u16, u16) = (61000, 61009);
/// The verification tags of the two ends.
const CLIENT_TAG: u32 = 0x1122_3344;
const POD_TAG: u32 = 0x5566_7788;

/// An INIT's (or INIT ACK's) fixed part: initiate tag, a_rwnd, streams out and in, initial TSN.
fn init_value(tag: u32) -> Vec<u8> {
    let mut value = tag.to_be_bytes().to_vec();
    value.extend_from_slice(&65_536u32.to_be_bytes());
    value.extend_from_slice(&[0, 10, 0, 10]);
    value.extend_from_slice(&1u32.to_be_bytes());
    value
}

/// A DATA chunk's value: TSN, stream, stream sequence, payload protocol, then `len` bytes.
fn data_value(len: usize) -> Vec<u8> {
    let mut value = vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 46];
    value.extend((0..len).map(|i| (i * 31 + 7) as u8));
    value
}

fn case(name: &'static str, input: Vec<u8>, verdict: u32, output: Expect) -> Case {
    Case {
        name,
        input,
        verdict,
        output,
    }
}

fn node_port(port: u16) -> Frontend {
    Frontend {
        addr: NODE.into(),
        port,
        proto: proto::SCTP,
        kind: service_flags::NODE_PORT,
    }
}

/// An SCTP NodePort service on FRONTEND whose endpoint is POD (on this node, or REMOTE_POD on
/// another when `remote`), and one on EMPTY_FRONTEND with no endpoint.
fn datapath(pins: &PinDir, remote: bool) -> Datapath {
    let mut datapath = Datapath::load(pins.path()).expect("loading the datapath");
    let (addr, flags) = if remote {
        (REMOTE_POD, 0)
    } else {
        (POD, lb_common::backend_flags::LOCAL)
    };
    if remote {
        datapath
            .set_config(&lb_common::DatapathConfig {
                snat_addr: u32::from(NODE),
                snat_port_min: SNAT_PORTS.0,
                snat_port_max: SNAT_PORTS.1,
                ..Default::default()
            })
            .expect("config");
    }
    let backend = Backend {
        addr: IpAddr::V4(*addr.ip()),
        port: addr.port(),
        proto: proto::SCTP,
        flags,
    };
    datapath.put_backend(1, &backend).expect("backend");
    let service = Service {
        id: 1,
        frontends: vec![node_port(FRONTEND.port())],
        backends: vec![1],
        ..Default::default()
    };
    let empty = Service {
        id: 2,
        frontends: vec![node_port(EMPTY_FRONTEND.port())],
        ..Default::default()
    };
    for service in [&service, &empty] {
        datapath.put_service(service).expect("service");
    }
    datapath
}

fn program<'d>(datapath: &'d Datapath, name: &'static str) -> std::os::fd::BorrowedFd<'d> {
    datapath.program_fd(name).expect("program fd")
}

/// The association's conntrack entry (its client's FLOW entry).
fn flow(datapath: &Datapath) -> Flow4Value {
    let key = flow_key(u32::from(*CLIENT.ip()), CLIENT.port(), proto::SCTP);
    let entries = datapath.conntrack().expect("conntrack");
    let (_, value) = entries
        .iter()
        .find(|(entry_key, _)| *entry_key == key)
        .unwrap_or_else(|| panic!("no FLOW entry for the association in {entries:?}"));
    *Flow4Value::of(value)
}

/// `frame` with its SCTP checksum field XORed with `error`.
fn with_checksum_error(frame: &[u8], error: u32) -> Vec<u8> {
    let mut out = frame.to_vec();
    let field = packet::ETH_HDR_LEN + 20 + 8;
    let stored = u32::from_le_bytes(out[field..field + 4].try_into().expect("field"));
    out[field..field + 4].copy_from_slice(&(stored ^ error).to_le_bytes());
    out
}

#[test]
fn an_association_to_a_local_endpoint_is_translated_both_ways_from_init_to_shutdown_complete() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "sctp").expect("pin dir");
    let datapath = datapath(&pins, false);
    let xdp = || program(&datapath, lb_common::program_names::XDP_LB);
    let tc = || program(&datapath, lb_common::program_names::TC_EGRESS);
    let from_client = |chunk_type, tag, value: &[u8]| {
        (
            packet::sctp(CLIENT, FRONTEND, chunk_type, tag, value),
            packet::sctp(CLIENT, POD, chunk_type, tag, value),
        )
    };
    let from_pod = |chunk_type, tag, value: &[u8]| {
        (
            packet::sctp(POD, CLIENT, chunk_type, tag, value),
            packet::sctp(FRONTEND, CLIENT, chunk_type, tag, value),
        )
    };
    let step = |program, name, (input, expected): (Vec<u8>, Vec<u8>), verdict| {
        assert!(packet::sctp_checksum_ok(&expected), "{name}: reference");
        run_table(
            program,
            &[case(name, input, verdict, Expect::Bytes(expected))],
        );
    };

    step(
        xdp(),
        "init",
        from_client(chunk::INIT, 0, &init_value(CLIENT_TAG)),
        XDP_PASS,
    );
    let entry = flow(&datapath);
    assert_eq!(entry.state, SYN_SENT);
    assert_eq!(
        (entry.backend_addr, entry.backend_port),
        (u32::from(*POD.ip()), POD.port())
    );
    step(
        tc(),
        "init ack from the endpoint",
        from_pod(chunk::INIT_ACK, CLIENT_TAG, &init_value(POD_TAG)),
        TC_ACT_OK,
    );
    step(
        xdp(),
        "cookie echo",
        from_client(chunk::COOKIE_ECHO, POD_TAG, b"cookie!!"),
        XDP_PASS,
    );
    assert_eq!(flow(&datapath).state, ESTABLISHED);
    step(
        tc(),
        "cookie ack",
        from_pod(chunk::COOKIE_ACK, CLIENT_TAG, b""),
        TC_ACT_OK,
    );

    let (data, data_to_pod) = from_client(chunk::DATA, POD_TAG, &data_value(1400));
    let (answer, answer_to_client) = from_pod(chunk::DATA, CLIENT_TAG, &data_value(3));
    run_table(
        xdp(),
        &[
            case(
                "data of 1,400 bytes",
                data.clone(),
                XDP_PASS,
                Expect::Bytes(data_to_pod.clone()),
            ),
            case(
                "a wrong checksum stays wrong by the same error",
                with_checksum_error(&data, 0x8000_0001),
                XDP_PASS,
                Expect::Bytes(with_checksum_error(&data_to_pod, 0x8000_0001)),
            ),
            case(
                "a checksum not computed yet (0) stays 0 for whoever computes it",
                with_checksum_error(&data, u32::from_le_bytes(data[42..46].try_into().unwrap())),
                XDP_PASS,
                Expect::Bytes(with_checksum_error(
                    &data_to_pod,
                    u32::from_le_bytes(data_to_pod[42..46].try_into().unwrap()),
                )),
            ),
            case(
                "first fragment: dropped, its checksum covers what XDP never sees",
                packet::as_fragment(&data, 0, true),
                XDP_DROP,
                Expect::Unchanged,
            ),
            case(
                "common header cut short",
                {
                    let mut frame = data[..packet::ETH_HDR_LEN + 20 + 12].to_vec();
                    frame[packet::ETH_HDR_LEN + 2..packet::ETH_HDR_LEN + 4]
                        .copy_from_slice(&32u16.to_be_bytes());
                    packet::fix_ip_checksum(&mut frame);
                    frame
                },
                XDP_DROP,
                Expect::Unchanged,
            ),
            case(
                "heartbeat",
                packet::sctp(CLIENT, FRONTEND, chunk::HEARTBEAT, POD_TAG, b"info"),
                XDP_PASS,
                Expect::Bytes(packet::sctp(
                    CLIENT,
                    POD,
                    chunk::HEARTBEAT,
                    POD_TAG,
                    b"info",
                )),
            ),
        ],
    );
    run_table(
        tc(),
        &[case(
            "data from the endpoint",
            answer,
            TC_ACT_OK,
            Expect::Bytes(answer_to_client),
        )],
    );
    assert_eq!(flow(&datapath).state, ESTABLISHED);

    // Closes the flow cannot trust, from either side: an ABORT whose tag is not the one its
    // sender's packets carry, or with the T bit not its sender's own (the one its peer's
    // packets carry), is dropped (the endpoint would discard it too) and ends nothing.
    run_table(
        xdp(),
        &[
            case(
                "abort with another tag",
                packet::sctp(CLIENT, FRONTEND, chunk::ABORT, POD_TAG ^ 1, b""),
                XDP_DROP,
                Expect::Unchanged,
            ),
            case(
                "abort with the T bit and another tag",
                packet::sctp_with_chunk_flags(
                    CLIENT,
                    FRONTEND,
                    chunk::ABORT,
                    1,
                    CLIENT_TAG ^ 1,
                    b"",
                ),
                XDP_DROP,
                Expect::Unchanged,
            ),
        ],
    );
    run_table(
        tc(),
        &[
            case(
                "abort from the endpoint with another tag",
                packet::sctp(POD, CLIENT, chunk::ABORT, CLIENT_TAG ^ 1, b""),
                TC_ACT_SHOT,
                Expect::Unchanged,
            ),
            case(
                "abort from the endpoint with the T bit and another tag",
                packet::sctp_with_chunk_flags(POD, CLIENT, chunk::ABORT, 1, POD_TAG ^ 1, b""),
                TC_ACT_SHOT,
                Expect::Unchanged,
            ),
        ],
    );
    assert_eq!(flow(&datapath).state, ESTABLISHED);

    // A SHUTDOWN or SHUTDOWN ACK without the tag its sender's packets carry goes on (the
    // receiver discards it) but ends nothing.
    step(
        xdp(),
        "shutdown with another tag",
        from_client(chunk::SHUTDOWN, POD_TAG ^ 1, &[0, 0, 0, 1]),
        XDP_PASS,
    );
    step(
        tc(),
        "shutdown ack from the endpoint with another tag",
        from_pod(chunk::SHUTDOWN_ACK, CLIENT_TAG ^ 1, b""),
        TC_ACT_OK,
    );
    assert_eq!(flow(&datapath).state, ESTABLISHED);

    step(
        xdp(),
        "shutdown",
        from_client(chunk::SHUTDOWN, POD_TAG, &[0, 0, 0, 1]),
        XDP_PASS,
    );
    assert_eq!(flow(&datapath).state, CLIENT_CLOSED);
    step(
        tc(),
        "shutdown ack",
        from_pod(chunk::SHUTDOWN_ACK, CLIENT_TAG, b""),
        TC_ACT_OK,
    );
    assert_eq!(flow(&datapath).state, CLOSING);
    step(
        xdp(),
        "shutdown complete",
        from_client(chunk::SHUTDOWN_COMPLETE, POD_TAG, b""),
        XDP_PASS,
    );

    // A new association from the same port after the old one ended: a new flow.
    step(
        xdp(),
        "init again",
        from_client(chunk::INIT, 0, &init_value(CLIENT_TAG + 1)),
        XDP_PASS,
    );
    assert_eq!(flow(&datapath).state, SYN_SENT);
    step(
        xdp(),
        "abort",
        from_client(chunk::ABORT, POD_TAG, b""),
        XDP_PASS,
    );
    assert_eq!(flow(&datapath).state, CLOSING);

    let init_to_nobody = packet::sctp(CLIENT, EMPTY_FRONTEND, chunk::INIT, 0, &init_value(1));
    run_table(
        xdp(),
        &[case(
            "no endpoint: icmp port unreachable",
            init_to_nobody.clone(),
            XDP_TX,
            Expect::Bytes(packet::icmp_port_unreachable_reply(
                *EMPTY_FRONTEND.ip(),
                *CLIENT.ip(),
                &init_to_nobody,
            )),
        )],
    );
    let events = datapath.events().expect("events");
    assert_eq!(events.get("drop_sctp_fragment"), Some(&1), "{events:?}");
    assert_eq!(events.get("drop_malformed"), Some(&1), "{events:?}");
    assert_eq!(events.get("drop_rst_out_of_window"), Some(&4), "{events:?}");
    assert_eq!(events.get("ct_fin_out_of_window"), Some(&2), "{events:?}");
    assert_eq!(events.get("pass_protocol_unserved"), Some(&0), "{events:?}");
}

/// The SCTP packet of an Ethernet/IPv4 (no options) frame: its bytes from the common header on.
fn sctp_part(frame: &[u8]) -> &[u8] {
    &frame[packet::ETH_HDR_LEN + 20..]
}

fn addresses(frame: &[u8]) -> (Ipv4Addr, Ipv4Addr) {
    let ip = &frame[packet::ETH_HDR_LEN..];
    let addr = |at: usize| Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]);
    (addr(12), addr(16))
}

#[test]
fn an_association_to_a_remote_endpoint_is_snated_and_its_answers_come_back_from_the_frontend() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "sctpsnat").expect("pin dir");
    let datapath = datapath(&pins, true);
    let xdp = program(&datapath, lb_common::program_names::XDP_LB);

    let init = packet::sctp(CLIENT, FRONTEND, chunk::INIT, 0, &init_value(CLIENT_TAG));
    let out = test_run(xdp, &init).expect("run");
    assert_ne!(out.verdict, XDP_DROP, "the INIT went on");
    assert_eq!(addresses(&out.packet), (NODE, *REMOTE_POD.ip()), "SNATed");
    let snat_port = u16::from_be_bytes([out.packet[34], out.packet[35]]);
    assert!(
        (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&snat_port),
        "port {snat_port} from the SNAT range"
    );
    let snat = SocketAddrV4::new(NODE, snat_port);
    let expected = packet::sctp(snat, REMOTE_POD, chunk::INIT, 0, &init_value(CLIENT_TAG));
    assert_eq!(
        sctp_part(&out.packet),
        sctp_part(&expected),
        "ports and CRC32c"
    );

    let init_ack = packet::sctp(
        REMOTE_POD,
        snat,
        chunk::INIT_ACK,
        CLIENT_TAG,
        &init_value(9),
    );
    let back = test_run(xdp, &init_ack).expect("run");
    assert_eq!(back.verdict, XDP_TX, "back out towards the client");
    assert_eq!(addresses(&back.packet), (NODE, *CLIENT.ip()));
    let expected = packet::sctp(
        FRONTEND,
        CLIENT,
        chunk::INIT_ACK,
        CLIENT_TAG,
        &init_value(9),
    );
    assert_eq!(
        sctp_part(&back.packet),
        sctp_part(&expected),
        "ports and CRC32c"
    );

    let data = packet::sctp(CLIENT, FRONTEND, chunk::DATA, 9, &data_value(600));
    let out = test_run(xdp, &data).expect("run");
    let expected = packet::sctp(snat, REMOTE_POD, chunk::DATA, 9, &data_value(600));
    assert_eq!(
        sctp_part(&out.packet),
        sctp_part(&expected),
        "the same SNAT port"
    );
    assert!(packet::sctp_checksum_ok(&out.packet));
}

#[test]
fn verification_tags_come_from_the_handshake_and_a_restart_brings_new_ones() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "sctptags").expect("pin dir");
    let datapath = datapath(&pins, false);
    let xdp = || program(&datapath, lb_common::program_names::XDP_LB);
    let tc = || program(&datapath, lb_common::program_names::TC_EGRESS);
    let client =
        |chunk_type, tag, value: &[u8]| packet::sctp(CLIENT, FRONTEND, chunk_type, tag, value);
    let to_pod = |chunk_type, tag, value: &[u8]| packet::sctp(CLIENT, POD, chunk_type, tag, value);
    let handshake = |name, client_tag: u32, pod_tag: u32| {
        run_table(
            xdp(),
            &[case(
                name,
                client(chunk::INIT, 0, &init_value(client_tag)),
                XDP_PASS,
                Expect::Bytes(to_pod(chunk::INIT, 0, &init_value(client_tag))),
            )],
        );
        run_table(
            tc(),
            &[case(
                name,
                packet::sctp(
                    POD,
                    CLIENT,
                    chunk::INIT_ACK,
                    client_tag,
                    &init_value(pod_tag),
                ),
                TC_ACT_OK,
                Expect::Bytes(packet::sctp(
                    FRONTEND,
                    CLIENT,
                    chunk::INIT_ACK,
                    client_tag,
                    &init_value(pod_tag),
                )),
            )],
        );
    };
    const FORGED_TAG: u32 = 0x0bad_0bad;
    const NEW_CLIENT_TAG: u32 = 0x99aa_bbcc;
    const NEW_POD_TAG: u32 = 0xddee_ff00;

    handshake("handshake", CLIENT_TAG, POD_TAG);
    run_table(
        xdp(),
        &[
            case(
                "a forged DATA before the COOKIE ECHO teaches nothing",
                client(chunk::DATA, FORGED_TAG, &data_value(4)),
                XDP_PASS,
                Expect::Bytes(to_pod(chunk::DATA, FORGED_TAG, &data_value(4))),
            ),
            case(
                "cookie echo",
                client(chunk::COOKIE_ECHO, POD_TAG, b"cookie!!"),
                XDP_PASS,
                Expect::Bytes(to_pod(chunk::COOKIE_ECHO, POD_TAG, b"cookie!!")),
            ),
            case(
                "abort with the forged tag",
                client(chunk::ABORT, FORGED_TAG, b""),
                XDP_DROP,
                Expect::Unchanged,
            ),
        ],
    );
    assert_eq!(flow(&datapath).state, ESTABLISHED);
    // The client restarts the association from the same port (RFC 9260, section 5.2.4): new
    // tags on both sides, on the same flow.
    handshake("restart", NEW_CLIENT_TAG, NEW_POD_TAG);
    run_table(
        xdp(),
        &[
            case(
                "cookie echo of the restart",
                client(chunk::COOKIE_ECHO, NEW_POD_TAG, b"cookie!!"),
                XDP_PASS,
                Expect::Bytes(to_pod(chunk::COOKIE_ECHO, NEW_POD_TAG, b"cookie!!")),
            ),
            case(
                "abort with the old association's tag",
                client(chunk::ABORT, POD_TAG, b""),
                XDP_DROP,
                Expect::Unchanged,
            ),
            case(
                "abort with the T bit and the client's old tag",
                packet::sctp_with_chunk_flags(CLIENT, FRONTEND, chunk::ABORT, 1, CLIENT_TAG, b""),
                XDP_DROP,
                Expect::Unchanged,
            ),
        ],
    );
    assert_eq!(flow(&datapath).state, ESTABLISHED);
    // With the T bit, the client's own tag (the one the endpoint's packets carry) is right.
    run_table(
        xdp(),
        &[case(
            "abort with the T bit and the client's own tag",
            packet::sctp_with_chunk_flags(CLIENT, FRONTEND, chunk::ABORT, 1, NEW_CLIENT_TAG, b""),
            XDP_PASS,
            Expect::Bytes(packet::sctp_with_chunk_flags(
                CLIENT,
                POD,
                chunk::ABORT,
                1,
                NEW_CLIENT_TAG,
                b"",
            )),
        )],
    );
    assert_eq!(flow(&datapath).state, CLOSING);

    // A first fragment from a new client is refused before it creates a flow.
    let other = SocketAddrV4::new(*CLIENT.ip(), CLIENT.port() + 1);
    run_table(
        xdp(),
        &[case(
            "first fragment of a new client's INIT",
            packet::as_fragment(
                &packet::sctp(other, FRONTEND, chunk::INIT, 0, &init_value(7)),
                0,
                true,
            ),
            XDP_DROP,
            Expect::Unchanged,
        )],
    );
    let other_key = flow_key(u32::from(*other.ip()), other.port(), proto::SCTP);
    let entries = datapath.conntrack().expect("conntrack");
    assert!(
        entries.iter().all(|(key, _)| *key != other_key),
        "the fragment made a flow: {entries:?}"
    );
}

/// A closed SCTP flow's SNAT port waits out the closing timeout, not TCP's short reuse delay:
/// the endpoint may still retransmit to it after RTO.Min (1 s), and would take a new client's
/// INIT on the same ports for a restart of the old association. Timeouts shortened so that the
/// test takes a second and a half.
#[test]
fn a_closed_sctp_flows_snat_port_waits_out_the_closing_timeout() {
    use std::time::{Duration, Instant};
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "sctpreuse").expect("pin dir");
    let mut datapath = datapath(&pins, true);
    let closing = Duration::from_millis(1000);
    let reuse = Duration::from_millis(100);
    datapath
        .set_config(&lb_common::DatapathConfig {
            snat_addr: u32::from(NODE),
            snat_port_min: SNAT_PORTS.0,
            snat_port_max: SNAT_PORTS.0,
            timeouts: lb_common::CtTimeouts {
                tcp_closing: closing.as_nanos() as u64,
                snat_port_reuse: reuse.as_nanos() as u64,
                ..Default::default()
            },
        })
        .expect("config");
    let xdp = program(&datapath, lb_common::program_names::XDP_LB);
    let init = |client| packet::sctp(client, FRONTEND, chunk::INIT, 0, &init_value(CLIENT_TAG));
    let snat_port = |client| {
        let out = test_run(xdp, &init(client)).expect("run");
        (out.verdict != XDP_DROP).then(|| u16::from_be_bytes([out.packet[34], out.packet[35]]))
    };
    let first = CLIENT;
    let second = SocketAddrV4::new(*CLIENT.ip(), CLIENT.port() + 1);

    assert_eq!(
        snat_port(first),
        Some(SNAT_PORTS.0),
        "the one port of the range"
    );
    let abort = packet::sctp(first, FRONTEND, chunk::ABORT, POD_TAG, b"");
    assert_ne!(
        test_run(xdp, &abort).expect("run").verdict,
        XDP_DROP,
        "the abort"
    );
    let aborted = Instant::now();

    std::thread::sleep(reuse * 3);
    assert_eq!(
        snat_port(second),
        None,
        "within the closing timeout the port is still held"
    );

    std::thread::sleep((closing + Duration::from_millis(300)).saturating_sub(aborted.elapsed()));
    assert_eq!(
        snat_port(second),
        Some(SNAT_PORTS.0),
        "after it, the port serves the new client"
    );
}

const NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const CLIENT6: SocketAddrV6 = SocketAddrV6::new(
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10),
    40000,
    0,
    0,
);
const FRONTEND6: SocketAddrV6 = SocketAddrV6::new(NODE6, 30132, 0, 0);
const POD6: SocketAddrV6 = SocketAddrV6::new(
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x10),
    3868,
    0,
    0,
);
const REMOTE_POD6: SocketAddrV6 = SocketAddrV6::new(
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 2, 0, 0, 0, 0x20),
    3868,
    0,
    0,
);

/// [`datapath`] over IPv6: an SCTP NodePort on FRONTEND6 whose endpoint is POD6 (local) or
/// REMOTE_POD6 (another node, reached through SNAT to NODE6).
fn datapath6(pins: &PinDir, remote: bool) -> Datapath {
    let mut datapath = Datapath::load(pins.path()).expect("loading the datapath");
    let (addr, flags) = if remote {
        (REMOTE_POD6, 0)
    } else {
        (POD6, lb_common::backend_flags::LOCAL)
    };
    datapath
        .set_config(&lb_common::DatapathConfig {
            snat_port_min: SNAT_PORTS.0,
            snat_port_max: SNAT_PORTS.1,
            ..Default::default()
        })
        .expect("config");
    datapath
        .set_config6(&lb_common::Datapath6Config {
            snat_addr: ipv6_words(NODE6),
        })
        .expect("config6");
    let backend = Backend {
        addr: IpAddr::V6(*addr.ip()),
        port: addr.port(),
        proto: proto::SCTP,
        flags,
    };
    datapath.put_backend(1, &backend).expect("backend");
    let service = Service {
        id: 1,
        frontends: vec![Frontend {
            addr: NODE6.into(),
            port: FRONTEND6.port(),
            proto: proto::SCTP,
            kind: service_flags::NODE_PORT,
        }],
        backends: vec![1],
        ..Default::default()
    };
    datapath.put_service(&service).expect("service");
    datapath
}

/// The SCTP packet of an Ethernet/IPv6 frame without extension headers.
fn sctp_part6(frame: &[u8]) -> &[u8] {
    &frame[packet::ETH_HDR_LEN + packet6::IPV6_HDR_LEN..]
}

/// The first test over IPv6, from INIT to SHUTDOWN COMPLETE: XDP translates the client's chunks
/// to the endpoint (`lb_xdp6_sctp`), tc egress the endpoint's back from the frontend
/// (`lb_tc_egress6`), every CRC32c brought up to date; a first fragment is refused both ways.
#[test]
fn an_ipv6_association_to_a_local_endpoint_is_translated_both_ways() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "sctp6").expect("pin dir");
    let datapath = datapath6(&pins, false);
    let xdp = || program(&datapath, lb_common::program_names::XDP_LB);
    let tc = || program(&datapath, lb_common::program_names::TC_EGRESS);
    let from_client = |chunk_type, tag, value: &[u8]| {
        (
            packet6::sctp(CLIENT6, FRONTEND6, chunk_type, tag, value),
            packet6::sctp(CLIENT6, POD6, chunk_type, tag, value),
        )
    };
    let from_pod = |chunk_type, tag, value: &[u8]| {
        (
            packet6::sctp(POD6, CLIENT6, chunk_type, tag, value),
            packet6::sctp(FRONTEND6, CLIENT6, chunk_type, tag, value),
        )
    };
    let step = |program, name, (input, expected): (Vec<u8>, Vec<u8>), verdict| {
        assert!(packet6::sctp_checksum_ok(&expected), "{name}: reference");
        run_table(
            program,
            &[case(name, input, verdict, Expect::Bytes(expected))],
        );
    };
    step(
        xdp(),
        "init",
        from_client(chunk::INIT, 0, &init_value(CLIENT_TAG)),
        XDP_PASS,
    );
    step(
        tc(),
        "init ack from the endpoint",
        from_pod(chunk::INIT_ACK, CLIENT_TAG, &init_value(POD_TAG)),
        TC_ACT_OK,
    );
    step(
        xdp(),
        "cookie echo",
        from_client(chunk::COOKIE_ECHO, POD_TAG, b"cookie!!"),
        XDP_PASS,
    );
    step(
        tc(),
        "cookie ack",
        from_pod(chunk::COOKIE_ACK, CLIENT_TAG, b""),
        TC_ACT_OK,
    );
    step(
        xdp(),
        "data of 600 bytes (odd length, padded)",
        from_client(chunk::DATA, POD_TAG, &data_value(601)),
        XDP_PASS,
    );
    step(
        tc(),
        "data from the endpoint",
        from_pod(chunk::DATA, CLIENT_TAG, &data_value(77)),
        TC_ACT_OK,
    );
    step(
        xdp(),
        "shutdown",
        from_client(chunk::SHUTDOWN, POD_TAG, &1u32.to_be_bytes()),
        XDP_PASS,
    );
    step(
        tc(),
        "shutdown ack",
        from_pod(chunk::SHUTDOWN_ACK, CLIENT_TAG, b""),
        TC_ACT_OK,
    );
    step(
        xdp(),
        "shutdown complete",
        from_client(chunk::SHUTDOWN_COMPLETE, POD_TAG, b""),
        XDP_PASS,
    );

    // Its checksum covers the whole SCTP packet, which a first fragment does not hold.
    let data = packet6::sctp(CLIENT6, FRONTEND6, chunk::DATA, POD_TAG, &data_value(64));
    let answer = packet6::sctp(POD6, CLIENT6, chunk::DATA, CLIENT_TAG, &data_value(64));
    run_table(
        xdp(),
        &[case(
            "first fragment of a client's packet",
            packet6::with_fragment_header(&data, 0, true, 5),
            XDP_DROP,
            Expect::Unchanged,
        )],
    );
    run_table(
        tc(),
        &[case(
            "first fragment of an endpoint's packet",
            packet6::with_fragment_header(&answer, 0, true, 6),
            TC_ACT_SHOT,
            Expect::Unchanged,
        )],
    );
    let events = datapath.events().expect("events");
    assert_eq!(events["drop_sctp_fragment"], 2, "{events:?}");
    assert_eq!(events["pass_protocol_unserved"], 0, "{events:?}");
    let counter = datapath.service_counter(1).expect("counter");
    assert_eq!(
        (counter.packets, counter.new_flows),
        (5, 1),
        "the client's five packets, one association: {counter:?}"
    );
}

/// The SNAT test over IPv6: the INIT leaves from NODE6 and a port of the SNAT range, with the
/// CRC32c of the new ports; the endpoint's INIT ACK to that port goes back to the client from
/// the frontend, out of the NIC it came in on; the DATA after it keeps the port.
/// A retransmitted INIT over IPv6 stays in its association: `lb_xdp6_flow` claims the client's
/// key without a lookup, takes a second SNAT port, finds the key held, gives the port back and
/// hands the INIT back to the frontend stage, which finds the flow. The same SNAT port, the
/// same two entries, one new flow counted.
#[test]
fn an_ipv6_init_retransmitted_keeps_its_association_and_its_snat_port() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "sctp6init").expect("pin dir");
    let datapath = datapath6(&pins, true);
    let xdp = program(&datapath, lb_common::program_names::XDP_LB);
    let init = packet6::sctp(CLIENT6, FRONTEND6, chunk::INIT, 0, &init_value(CLIENT_TAG));
    let first = test_run(xdp, &init).expect("run");
    assert_ne!(first.verdict, XDP_DROP, "the INIT went on");
    let sctp_at = packet::ETH_HDR_LEN + packet6::IPV6_HDR_LEN;
    let snat_port = u16::from_be_bytes([first.packet[sctp_at], first.packet[sctp_at + 1]]);
    assert!(
        (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&snat_port),
        "SNATed to port {snat_port} of the range"
    );
    for _ in 0..3 {
        let again = test_run(xdp, &init).expect("run");
        assert_eq!(
            (again.verdict, &again.packet),
            (first.verdict, &first.packet),
            "the retransmitted INIT, as the first went"
        );
    }
    let entries = datapath.conntrack6().expect("conntrack6");
    assert_eq!(entries.len(), 2, "the FLOW and REPLY entries: {entries:#?}");
    assert_eq!(datapath.service_counter(1).expect("counter").new_flows, 1);
}

#[test]
fn an_ipv6_association_to_a_remote_endpoint_is_snated_and_its_answers_come_back_from_the_frontend()
{
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "sctp6snat").expect("pin dir");
    let datapath = datapath6(&pins, true);
    let xdp = program(&datapath, lb_common::program_names::XDP_LB);
    let addresses = |frame: &[u8]| {
        let ip = &frame[packet::ETH_HDR_LEN..];
        let addr =
            |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&ip[at..at + 16]).expect("16 bytes"));
        (addr(8), addr(24))
    };

    let init = packet6::sctp(CLIENT6, FRONTEND6, chunk::INIT, 0, &init_value(CLIENT_TAG));
    let out = test_run(xdp, &init).expect("run");
    assert_ne!(out.verdict, XDP_DROP, "the INIT went on");
    assert_eq!(addresses(&out.packet), (NODE6, *REMOTE_POD6.ip()), "SNATed");
    let sctp_at = packet::ETH_HDR_LEN + packet6::IPV6_HDR_LEN;
    let snat_port = u16::from_be_bytes([out.packet[sctp_at], out.packet[sctp_at + 1]]);
    assert!(
        (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&snat_port),
        "port {snat_port} from the SNAT range"
    );
    let snat = SocketAddrV6::new(NODE6, snat_port, 0, 0);
    let expected = packet6::sctp(snat, REMOTE_POD6, chunk::INIT, 0, &init_value(CLIENT_TAG));
    assert_eq!(
        sctp_part6(&out.packet),
        sctp_part6(&expected),
        "ports and CRC32c"
    );

    let init_ack = packet6::sctp(
        REMOTE_POD6,
        snat,
        chunk::INIT_ACK,
        CLIENT_TAG,
        &init_value(9),
    );
    let back = test_run(xdp, &init_ack).expect("run");
    assert_eq!(back.verdict, XDP_TX, "back out towards the client");
    assert_eq!(addresses(&back.packet), (NODE6, *CLIENT6.ip()));
    let expected = packet6::sctp(
        FRONTEND6,
        CLIENT6,
        chunk::INIT_ACK,
        CLIENT_TAG,
        &init_value(9),
    );
    assert_eq!(
        sctp_part6(&back.packet),
        sctp_part6(&expected),
        "ports and CRC32c"
    );

    let data = packet6::sctp(CLIENT6, FRONTEND6, chunk::DATA, 9, &data_value(600));
    let out = test_run(xdp, &data).expect("run");
    let expected = packet6::sctp(snat, REMOTE_POD6, chunk::DATA, 9, &data_value(600));
    assert_eq!(
        sctp_part6(&out.packet),
        sctp_part6(&expected),
        "the same SNAT port"
    );
    assert!(packet6::sctp_checksum_ok(&out.packet));
}
