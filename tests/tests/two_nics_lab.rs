//! A node with two NICs: clients come in on one (`eth0`), the other nodes sit behind the other
//! (`eth1`). NodePort traffic to an endpoint on another node leaves through `eth1` and its
//! answers come back through `eth1`: they must go out of `eth0` to the client, with `eth0`'s
//! addresses, not back out of the NIC they came in on. Real TCP and UDP servers and clients.
//!
//! ```text
//!  client 198.18.0.10 -- eth0 198.18.0.1  node1  eth1 198.19.0.1 -- eth1 198.19.0.2  node2
//!                                                                   cni0 10.244.2.1/24 -- pod 10.244.2.10
//! ```

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::programs::XdpMode;
use lab::{
    lab::{Host, Lab, PinDir, Proc},
    peer::{self, ClientRun},
};
use lb_common::{DatapathConfig, program_names, proto, service_flags};
use lb_userspace::{
    counter::XdpCounter,
    datapath::{Backend, Datapath, Frontend, Service},
    testrun::test_run_on,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const NODE1_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const NODE1_NODE_SIDE: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const NODE2: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);
const POD_PORT: u16 = 8080;
const NODE_PORT: u16 = 30080;

struct TwoNics {
    // Drop order: servers, the datapath and its pins, the peers' XDP, then the lab.
    _server: Proc,
    datapath: Datapath,
    _pins: PinDir,
    _peer_xdp: Vec<XdpCounter>,
    client: Host,
    node1: Host,
    node2: Host,
    _lab: Lab,
}

impl TwoNics {
    fn build() -> anyhow::Result<Self> {
        let mut lab = Lab::new()?;
        let client = lab.host("client")?;
        let node1 = lab.host("node1")?;
        let node2 = lab.host("node2")?;
        let pod = lab.host("n2p0")?;
        lab.veth(&client, "eth0", &node1, "eth0")?;
        lab.veth(&node1, "eth1", &node2, "eth1")?;
        client.addr("eth0", &format!("{CLIENT}/24"))?;
        node1.addr("eth0", &format!("{NODE1_CLIENT_SIDE}/24"))?;
        node1.addr("eth1", &format!("{NODE1_NODE_SIDE}/24"))?;
        node2.addr("eth1", &format!("{NODE2}/24"))?;
        node1.sysctl("net.ipv4.ip_forward", "1")?;
        node2.sysctl("net.ipv4.ip_forward", "1")?;
        node1.route(&["10.244.2.0/24", "via", &NODE2.to_string()])?;
        node2.bridge("cni0")?;
        node2.addr("cni0", "10.244.2.1/24")?;
        lab.veth(&pod, "eth0", &node2, "v-n2p0")?;
        node2.enslave("v-n2p0", "cni0")?;
        pod.addr("eth0", &format!("{POD}/24"))?;
        pod.route(&["default", "via", "10.244.2.1"])?;
        let server = peer::serve(&pod, "n2p0", POD_PORT)?;

        // A veth delivers what XDP transmits only to a peer that runs NAPI, which an XDP program
        // turns on (drivers/net/veth.c, veth_xdp_xmit); a physical NIC needs nothing of the sort.
        let mut peer_xdp = Vec::new();
        for (host, iface) in [(&client, "eth0"), (&node2, "eth1")] {
            let mut counter = XdpCounter::load()?;
            let _inside = host.enter()?;
            counter.attach(&std::ffi::CString::new(iface)?, XdpMode::Driver)?;
            peer_xdp.push(counter);
        }

        let pins = PinDir::new(&lab, "node1")?;
        let mut datapath = Datapath::load(pins.path())?;
        {
            let _inside = node1.enter()?;
            for iface in ["eth0", "eth1"] {
                lb_userspace::node::set_accept_local(iface)?;
                datapath.attach_xdp(iface, XdpMode::Driver)?;
                datapath.attach_tc_egress(iface)?;
            }
        }
        // The node's address towards the other nodes is the one they answer SNATed flows to.
        datapath.set_config(&DatapathConfig {
            snat_addr: u32::from(NODE1_NODE_SIDE),
            snat_port_min: 20_000,
            snat_port_max: 29_999,
            ..Default::default()
        })?;
        for (id, protocol) in [(1, proto::TCP), (2, proto::UDP)] {
            datapath.put_backend(
                id,
                &Backend {
                    addr: POD,
                    port: POD_PORT,
                    proto: protocol,
                    flags: 0,
                },
            )?;
            datapath.put_service(&Service {
                id,
                frontends: vec![Frontend {
                    addr: NODE1_CLIENT_SIDE,
                    port: NODE_PORT,
                    proto: protocol,
                    kind: service_flags::NODE_PORT,
                }],
                backends: vec![id],
                ..Default::default()
            })?;
        }
        Ok(Self {
            _server: server,
            datapath,
            _pins: pins,
            _peer_xdp: peer_xdp,
            client,
            node1,
            node2,
            _lab: lab,
        })
    }
}

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
    let stat = |iface: &str, name: &str| veth_stat(&lab.node1, iface, name);
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

/// One of a veth's counters as `ethtool -S` shows it.
fn veth_stat(host: &Host, iface: &str, name: &str) -> u64 {
    let stats = host.run("ethtool", &["-S", iface]).expect("ethtool -S");
    stats
        .lines()
        .filter_map(|line| line.trim().split_once(':'))
        .find(|(key, _)| *key == name)
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} for {iface}: {stats}"))
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
