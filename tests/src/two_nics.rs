//! A node with two NICs: clients come in on one (`eth0`), the other nodes sit behind the other
//! (`eth1`). The datapath runs on node1, driven through its Rust API on maps in a private pin
//! directory; node2 routes a pod network with one pod that runs a `lab-peer` server.
//!
//! ```text
//!  client 198.18.0.10 -- eth0 198.18.0.1  node1  eth1 198.19.0.1 -- eth1 198.19.0.2  node2
//!                                                                   cni0 10.244.2.1/24 -- pod 10.244.2.10
//! ```
//!
//! Service 1 (TCP) and service 2 (UDP) answer on node1's client-side address at [`NODE_PORT`],
//! both with the pod as their only endpoint: every flow is SNATed to node1's node-side address.
//! [`TwoNics::dual_stack`] adds the same over IPv6 (documentation prefixes, the same last
//! groups): services 3 (TCP) and 4 (UDP), SNATed to [`NODE1_NODE_SIDE6`].

use std::net::{Ipv4Addr, Ipv6Addr};

use aya::programs::XdpMode;
use lb_common::{Datapath6Config, DatapathConfig, proto, service_flags};
use lb_userspace::{
    compile::model::{Backend, Frontend, Service, ipv6_words},
    datapath::{Datapath, counter::XdpCounter},
};

use crate::{
    lab::{Host, Lab, PinDir, Proc},
    peer,
};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
pub const NODE1_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const NODE1_NODE_SIDE: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
pub const NODE2: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
pub const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);
pub const POD_PORT: u16 = 8080;
pub const NODE_PORT: u16 = 30080;
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 0x10);
pub const NODE1_CLIENT_SIDE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 1);
pub const NODE1_NODE_SIDE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x19, 0, 0, 0, 0, 1);
pub const NODE2_6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x19, 0, 0, 0, 0, 2);
pub const POD6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x244, 2, 0, 0, 0, 0x10);

pub struct TwoNics {
    // Drop order: servers, the datapath and its pins, the peers' XDP, then the lab.
    _server: Proc,
    pub datapath: Datapath,
    _pins: PinDir,
    _peer_xdp: Vec<XdpCounter>,
    pub client: Host,
    pub node1: Host,
    pub node2: Host,
    /// The pod on node2, the services' only endpoint.
    pub pod: Host,
    _lab: Lab,
}

impl TwoNics {
    pub fn build() -> anyhow::Result<Self> {
        Self::build_with(false)
    }

    /// The lab with IPv6 too.
    pub fn dual_stack() -> anyhow::Result<Self> {
        Self::build_with(true)
    }

    /// The lab with XDP on node1's `eth1` (towards node2) in generic mode.
    pub fn generic_node_side() -> anyhow::Result<Self> {
        Self::build_with_modes(false, XdpMode::Skb)
    }

    fn build_with(dual_stack: bool) -> anyhow::Result<Self> {
        Self::build_with_modes(dual_stack, XdpMode::Driver)
    }

    fn build_with_modes(dual_stack: bool, node_side: XdpMode) -> anyhow::Result<Self> {
        let mut lab = Lab::new()?;
        let client = lab.host("client")?;
        let node1 = lab.host("node1")?;
        let node2 = lab.host("node2")?;
        let pod = lab.host("n2p0")?;
        if dual_stack {
            for host in [&client, &node1, &node2, &pod] {
                host.enable_ipv6()?;
            }
        }
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
        if dual_stack {
            client.addr("eth0", &format!("{CLIENT6}/64"))?;
            node1.addr("eth0", &format!("{NODE1_CLIENT_SIDE6}/64"))?;
            node1.addr("eth1", &format!("{NODE1_NODE_SIDE6}/64"))?;
            node2.addr("eth1", &format!("{NODE2_6}/64"))?;
            node2.addr("cni0", "2001:db8:244:2::1/64")?;
            pod.addr("eth0", &format!("{POD6}/64"))?;
            for node in [&node1, &node2] {
                node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            }
            node1.route(&["2001:db8:244:2::/64", "via", &NODE2_6.to_string()])?;
            pod.route(&["default", "via", "2001:db8:244:2::1"])?;
        }
        let server = if dual_stack {
            peer::serve_dual_stack(&pod, "n2p0", POD_PORT)?
        } else {
            peer::serve(&pod, "n2p0", POD_PORT)?
        };

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
            for (iface, mode) in [("eth0", XdpMode::Driver), ("eth1", node_side)] {
                lb_userspace::node::set_accept_local(iface)?;
                datapath.attach_xdp(iface, mode)?;
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
        let mut services = vec![
            (1, proto::TCP, NODE1_CLIENT_SIDE.into(), POD.into()),
            (2, proto::UDP, NODE1_CLIENT_SIDE.into(), POD.into()),
        ];
        if dual_stack {
            datapath.set_config6(&Datapath6Config {
                snat_addr: ipv6_words(NODE1_NODE_SIDE6),
            })?;
            services.extend([
                (3, proto::TCP, NODE1_CLIENT_SIDE6.into(), POD6.into()),
                (4, proto::UDP, NODE1_CLIENT_SIDE6.into(), POD6.into()),
            ]);
        }
        for (id, protocol, frontend, pod) in services {
            datapath.put_backend(
                id,
                &Backend {
                    addr: pod,
                    port: POD_PORT,
                    proto: protocol,
                    flags: 0,
                },
            )?;
            datapath.put_service(&Service {
                id,
                frontends: vec![Frontend {
                    addr: frontend,
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
            pod,
            _lab: lab,
        })
    }
}
