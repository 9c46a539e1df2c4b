//! The XDP packet counter, tested twice: table-driven through BPF_PROG_TEST_RUN, and attached in
//! native mode to a node's NIC in the lab with real TCP and UDP traffic.

use std::{collections::BTreeMap, ffi::CString, net::SocketAddrV4};

use aya::programs::XdpMode;
use lab::{
    lab::Lab,
    packet::{self, TcpFlags},
    peer::{self, ClientRun},
    table::{Case, Expect, run_table},
    topology::{Cluster, ClusterSpec, FABRIC_IFACE, node_addr},
};
use lb_common::PacketClass;
use lb_userspace::datapath::counter::XdpCounter;

const XDP_PASS: u32 = 2;

fn addr(text: &str) -> SocketAddrV4 {
    text.parse().expect("test address")
}

/// Packets summed per class label, as the counter map holds them.
fn counts(counter: &XdpCounter) -> BTreeMap<&'static str, (u64, u64)> {
    counter
        .read()
        .expect("reading counters")
        .into_iter()
        .map(|count| (count.label, (count.counter.packets, count.counter.bytes)))
        .collect()
}

#[test]
fn classifies_and_passes_every_frame_unchanged() {
    let counter = XdpCounter::load().expect("loading the counter");
    let client = addr("203.0.113.10:40000");
    let service = addr("203.0.113.1:80");
    let tcp_syn = packet::tcp(client, service, TcpFlags::SYN, b"");
    let udp = packet::udp(client, service, b"ping");
    // (case, class it must be counted as)
    let rows: Vec<(Case, PacketClass)> = vec![
        (pass("tcp syn", tcp_syn.clone()), PacketClass::IPV4_TCP),
        (
            pass(
                "tcp with payload",
                packet::tcp(client, service, TcpFlags::ACK, b"GET /"),
            ),
            PacketClass::IPV4_TCP,
        ),
        (pass("udp", udp.clone()), PacketClass::IPV4_UDP),
        (
            pass("icmp echo", packet::icmp_echo(*client.ip(), *service.ip())),
            PacketClass::IPV4_ICMP,
        ),
        (
            pass(
                "ip options (ihl 8) tcp",
                packet::with_ip_options(&tcp_syn, &[1, 1, 1, 0, 0x94, 4, 0, 0, 1, 1, 1, 0]),
            ),
            PacketClass::IPV4_TCP,
        ),
        (
            pass(
                "ip options (ihl 15) udp",
                packet::with_ip_options(&udp, &[1; 40]),
            ),
            PacketClass::IPV4_UDP,
        ),
        (
            pass("first fragment", packet::as_fragment(&udp, 0, true)),
            PacketClass::IPV4_UDP,
        ),
        (
            pass("later fragment", packet::as_fragment(&udp, 185, false)),
            PacketClass::IPV4_OTHER,
        ),
        (
            pass("gre", with_protocol(&udp, 47)),
            PacketClass::IPV4_OTHER,
        ),
        (pass("ipv6", packet::non_ip(0x86dd, 60)), PacketClass::IPV6),
        (pass("arp", packet::non_ip(0x0806, 28)), PacketClass::NON_IP),
        (
            pass("ethernet header only", packet::non_ip(0x0800, 0)),
            PacketClass::MALFORMED,
        ),
        (
            pass(
                "truncated ip header",
                tcp_syn[..packet::ETH_HDR_LEN + 12].to_vec(),
            ),
            PacketClass::MALFORMED,
        ),
        (
            pass(
                "truncated tcp header",
                tcp_syn[..packet::ETH_HDR_LEN + 20 + 10].to_vec(),
            ),
            PacketClass::MALFORMED,
        ),
        (
            pass(
                "truncated udp header",
                udp[..packet::ETH_HDR_LEN + 20 + 4].to_vec(),
            ),
            PacketClass::MALFORMED,
        ),
        (
            pass(
                "ip options cut short",
                packet::with_ip_options(&tcp_syn, &[1; 40])[..packet::ETH_HDR_LEN + 40].to_vec(),
            ),
            PacketClass::MALFORMED,
        ),
        (
            pass("ihl below 5", with_ihl(&tcp_syn, 4)),
            PacketClass::MALFORMED,
        ),
        (
            pass("ip version 6 in an ipv4 frame", with_version(&tcp_syn, 6)),
            PacketClass::MALFORMED,
        ),
    ];
    let cases: Vec<Case> = rows.iter().map(|(case, _)| case.clone()).collect();
    run_table(counter.program_fd().expect("program fd"), &cases);

    let mut expected: BTreeMap<&str, (u64, u64)> = PacketClass::ALL
        .iter()
        .map(|(_, label)| (*label, (0, 0)))
        .collect();
    for (case, class) in &rows {
        let slot = expected
            .get_mut(class.label().expect("known class"))
            .expect("label");
        slot.0 += 1;
        slot.1 += case.input.len() as u64;
    }
    assert_eq!(counts(&counter), expected);
}

fn pass(name: &'static str, input: Vec<u8>) -> Case {
    Case {
        name,
        input,
        verdict: XDP_PASS,
        output: Expect::Unchanged,
    }
}

fn with_protocol(frame: &[u8], protocol: u8) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[packet::ETH_HDR_LEN + 9] = protocol;
    packet::fix_ip_checksum(&mut out);
    out
}

fn with_ihl(frame: &[u8], ihl: u8) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[packet::ETH_HDR_LEN] = 0x40 | ihl;
    out
}

fn with_version(frame: &[u8], version: u8) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[packet::ETH_HDR_LEN] = (version << 4) | (out[packet::ETH_HDR_LEN] & 0x0f);
    out
}

#[test]
fn counts_real_tcp_and_udp_on_a_node_nic_in_native_mode() {
    let mut lab = Lab::new().expect("lab");
    let cluster = Cluster::build(
        &mut lab,
        &ClusterSpec {
            pods_per_node: vec![0],
            ..ClusterSpec::default()
        },
    )
    .expect("cluster");
    let node = &cluster.node(1).host;
    let _server = peer::serve(node, "node1", 8080).expect("server");

    let mut counter = XdpCounter::load().expect("loading the counter");
    {
        let _inside = node.enter().expect("entering node1");
        let iface = CString::new(FABRIC_IFACE).expect("name");
        counter
            .attach(iface.as_c_str(), XdpMode::Driver)
            .expect("attaching in native mode");
    }
    let link = node
        .ip(&["-j", "-d", "link", "show", "dev", FABRIC_IFACE])
        .expect("link");
    assert!(
        link.contains("\"xdp\""),
        "no native XDP program on {FABRIC_IFACE}: {link}"
    );

    // Counters and the NIC's own count read at one instant: nothing arrived in between.
    let stable_read = || {
        (0..50)
            .find_map(|_| {
                let first = counts(&counter);
                let stats = node.link_stats(FABRIC_IFACE).expect("stats");
                let second = counts(&counter);
                std::thread::sleep(std::time::Duration::from_millis(20));
                (first == second).then_some((first, stats))
            })
            .expect("traffic on the NIC settles")
    };
    let (counted_before, before) = stable_read();
    let target = format!("{}:8080", node_addr(1));
    const REQUESTS: u64 = 50;
    let tcp = ClientRun::tcp(&target, REQUESTS)
        .run(&cluster.client, None)
        .expect("tcp client");
    let udp = ClientRun::udp(&target, REQUESTS)
        .run(&cluster.client, None)
        .expect("udp client");
    assert_eq!((tcp.ok, tcp.errors), (REQUESTS, 0), "{tcp:?}");
    assert_eq!((udp.ok, udp.errors), (REQUESTS, 0), "{udp:?}");
    // No NAT anywhere: the server saw the client's own address.
    assert_eq!(tcp.peers_seen.keys().collect::<Vec<_>>(), ["203.0.113.10"]);

    // Late FIN/ACKs or a neighbour probe may still arrive: read once things are still.
    let (counted_after, after) = stable_read();
    let counted: BTreeMap<&str, (u64, u64)> = counted_after
        .iter()
        .map(|(label, (packets, bytes))| {
            let (packets_before, bytes_before) = counted_before[label];
            (*label, (packets - packets_before, bytes - bytes_before))
        })
        .collect();
    // Every UDP request is exactly one datagram into the node.
    assert_eq!(counted["ipv4_udp"].0, REQUESTS, "{counted:?}");
    // A connect/request/close exchange sends at least SYN, ACK, data and FIN to the server.
    assert!(counted["ipv4_tcp"].0 >= 4 * REQUESTS, "{counted:?}");
    // The program saw exactly the frames the NIC received, by the kernel's own count.
    let total: u64 = counted.values().map(|(packets, _)| packets).sum();
    assert_eq!(
        total,
        after.rx_packets - before.rx_packets,
        "{counted:?} vs {before:?} -> {after:?}"
    );
}
