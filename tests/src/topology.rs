//! The lab topology (docs/lab.md): a client and two nodes on a fabric bridge, pods
//! behind each node.
//!
//! ```text
//!  client (203.0.113.10) --+
//!                          +-- fabric bridge -- node1 (eth0 203.0.113.1) -- cni0 10.244.1.1/24
//!                          |                       +-- pods 10.244.1.10, 10.244.1.11, ...
//!                          +------------------- node2 (eth0 203.0.113.2) -- cni0 10.244.2.1/24
//!                                                  +-- pods 10.244.2.10, ...
//! ```
//!
//! The client has no default route: it reaches the fabric's /24 and whatever a test routes
//! explicitly (external or LoadBalancer IPs via a node), and nothing else.

use std::net::Ipv4Addr;

use aya::programs::XdpMode;
use lb_userspace::datapath::counter::XdpCounter;

use crate::lab::{Host, Lab};

/// The fabric network all nodes and the client sit on.
pub const FABRIC_PREFIX_LEN: u8 = 24;
/// The client's address on the fabric.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The name of every node's and the client's fabric interface.
pub const FABRIC_IFACE: &str = "eth0";
/// The name of every pod's interface.
pub const POD_IFACE: &str = "eth0";

/// Node `n` (1-based) on the fabric.
pub fn node_addr(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, node)
}

/// Pod `p` (0-based) of node `n` (1-based): 10.244.n.(10 + p).
pub fn pod_addr(node: u8, pod: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node, 10 + pod)
}

/// How many pods each node runs: `pods_per_node[i]` for node i + 1.
pub struct ClusterSpec {
    pub pods_per_node: Vec<u8>,
    /// Whether the fabric side of every node's link runs NAPI (see [`Cluster::build`]), as a
    /// physical network would take what a node's XDP transmits; false leaves the fabric's veth
    /// ends as a container runtime does (a kind node's eth0).
    pub fabric_napi: bool,
}

impl Default for ClusterSpec {
    /// The default lab (docs/lab.md): two pods on node1, one on node2.
    fn default() -> Self {
        Self {
            pods_per_node: vec![2, 1],
            fabric_napi: true,
        }
    }
}

pub struct Node {
    pub host: Host,
    /// 1-based node number.
    pub number: u8,
    pub addr: Ipv4Addr,
    pub pods: Vec<Pod>,
}

pub struct Pod {
    pub host: Host,
    pub addr: Ipv4Addr,
    /// 1-based number of the node the pod runs on.
    pub node: u8,
}

pub struct Cluster {
    pub fabric: Host,
    pub client: Host,
    pub nodes: Vec<Node>,
    /// An XDP_PASS program on the fabric side of every node's link, unless the spec says
    /// otherwise; see [`Cluster::build`].
    _fabric_xdp: Option<XdpCounter>,
}

impl Cluster {
    pub fn build(lab: &mut Lab, spec: &ClusterSpec) -> anyhow::Result<Self> {
        let fabric = lab.host("fabric")?;
        fabric.bridge("br0")?;
        let client = lab.host("client")?;
        attach_to_fabric(lab, &fabric, &client, CLIENT_ADDR)?;
        let mut nodes = Vec::new();
        for (index, &pod_count) in spec.pods_per_node.iter().enumerate() {
            let number = u8::try_from(index + 1)?;
            nodes.push(build_node(lab, &fabric, number, pod_count)?);
        }
        // Pod networks of other nodes are reached through that node, as a CNI's routes would.
        for node in &nodes {
            for other in nodes.iter().filter(|other| other.number != node.number) {
                node.host.route(&[
                    &format!("10.244.{}.0/24", other.number),
                    "via",
                    &other.addr.to_string(),
                ])?;
            }
        }
        // A veth hands frames a node sends with XDP_TX (replies and forwarded packets of the
        // datapath) to its peer only when the peer runs NAPI, which an XDP program turns on
        // (drivers/net/veth.c, veth_xdp_xmit: -ENXIO otherwise). A physical NIC needs nothing of
        // the sort; the fabric ports get a counting XDP_PASS program to behave like one.
        let fabric_xdp = if spec.fabric_napi {
            let mut counter = XdpCounter::load()?;
            let _inside = fabric.enter()?;
            for node in &nodes {
                let port = std::ffi::CString::new(format!("p-{}", node.host.name()))?;
                counter.attach(port.as_c_str(), XdpMode::Driver)?;
            }
            Some(counter)
        } else {
            None
        };
        Ok(Self {
            fabric,
            client,
            nodes,
            _fabric_xdp: fabric_xdp,
        })
    }

    pub fn node(&self, number: u8) -> &Node {
        &self.nodes[usize::from(number) - 1]
    }

    /// Every pod of every node, in node order.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.nodes.iter().flat_map(|node| node.pods.iter())
    }
}

fn attach_to_fabric(lab: &Lab, fabric: &Host, host: &Host, addr: Ipv4Addr) -> anyhow::Result<()> {
    let port = format!("p-{}", host.name());
    lab.veth(host, FABRIC_IFACE, fabric, &port)?;
    fabric.enslave(&port, "br0")?;
    host.addr(FABRIC_IFACE, &format!("{addr}/{FABRIC_PREFIX_LEN}"))
}

fn build_node(lab: &mut Lab, fabric: &Host, number: u8, pod_count: u8) -> anyhow::Result<Node> {
    let host = lab.host(&format!("node{number}"))?;
    let addr = node_addr(number);
    attach_to_fabric(lab, fabric, &host, addr)?;
    host.sysctl("net.ipv4.ip_forward", "1")?;
    host.bridge("cni0")?;
    let gateway = Ipv4Addr::new(10, 244, number, 1);
    host.addr("cni0", &format!("{gateway}/24"))?;
    let mut pods = Vec::new();
    for pod in 0..pod_count {
        let name = format!("n{number}p{pod}");
        let pod_host = lab.host(&name)?;
        let port = format!("v-{name}");
        lab.veth(&pod_host, POD_IFACE, &host, &port)?;
        host.enslave(&port, "cni0")?;
        let pod_addr = pod_addr(number, pod);
        pod_host.addr(POD_IFACE, &format!("{pod_addr}/24"))?;
        pod_host.route(&["default", "via", &gateway.to_string()])?;
        pods.push(Pod {
            host: pod_host,
            addr: pod_addr,
            node: number,
        });
    }
    Ok(Node {
        host,
        number,
        addr,
        pods,
    })
}
