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
//! With [`ClusterSpec::dual_stack`], on documentation prefixes (RFC 3849), the fabric is also
//! 2001:db8:f::/64 (node n at 2001:db8:f::n, the client at 2001:db8:f::10) and node n's pods
//! 2001:db8:244:n::/64 (gateway ::1 on cni0, pod p at ::1p, as 10.244.n.1p); otherwise IPv6 is
//! off, so that neighbour discovery adds nothing to packet counts. The client has no default
//! route in either family: it reaches the fabric's networks and whatever a test routes
//! explicitly (external or LoadBalancer IPs via a node), and nothing else.

use std::net::{Ipv4Addr, Ipv6Addr};

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

/// The prefix length of the fabric's and the pod networks' IPv6 addresses.
pub const IPV6_PREFIX_LEN: u8 = 64;
/// The client's IPv6 address on the fabric.
pub const CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0x10);

/// Node `n` (1-based) on the fabric, over IPv6: 2001:db8:f::n.
pub fn node_addr6(node: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, u16::from(node))
}

/// Node `n`'s pod network, over IPv6: 2001:db8:244:n::/64.
fn pod_network6(node: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0x244, u16::from(node), 0, 0, 0, 0)
}

/// Pod `p` (0-based) of node `n` (1-based), over IPv6: 2001:db8:244:n::1p, read as its IPv4
/// address 10.244.n.1p reads (for p below 10).
pub fn pod_addr6(node: u8, pod: u8) -> Ipv6Addr {
    let network = pod_network6(node).segments();
    Ipv6Addr::new(
        network[0],
        network[1],
        network[2],
        network[3],
        0,
        0,
        0,
        0x10 + u16::from(pod),
    )
}

/// How many pods each node runs: `pods_per_node[i]` for node i + 1.
pub struct ClusterSpec {
    pub pods_per_node: Vec<u8>,
    /// Whether the fabric side of every node's link runs NAPI (see [`Cluster::build`]), as a
    /// physical network would take what a node's XDP transmits; false leaves the fabric's veth
    /// ends as a container runtime does (a kind node's eth0).
    pub fabric_napi: bool,
    /// IPv6 addresses and routes beside the IPv4 ones (module docs).
    pub dual_stack: bool,
}

impl Default for ClusterSpec {
    /// The default lab (docs/lab.md): two pods on node1, one on node2.
    fn default() -> Self {
        Self {
            pods_per_node: vec![2, 1],
            fabric_napi: true,
            dual_stack: false,
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
        let family = Families {
            dual_stack: spec.dual_stack,
        };
        let fabric = family.host(lab, "fabric")?;
        fabric.bridge("br0")?;
        let client = family.host(lab, "client")?;
        family.attach_to_fabric(lab, &fabric, &client, CLIENT_ADDR, CLIENT_ADDR6)?;
        let mut nodes = Vec::new();
        for (index, &pod_count) in spec.pods_per_node.iter().enumerate() {
            let number = u8::try_from(index + 1)?;
            nodes.push(family.build_node(lab, &fabric, number, pod_count)?);
        }
        // Pod networks of other nodes are reached through that node, as a CNI's routes would.
        for node in &nodes {
            for other in nodes.iter().filter(|other| other.number != node.number) {
                node.host.route(&[
                    &format!("10.244.{}.0/24", other.number),
                    "via",
                    &other.addr.to_string(),
                ])?;
                if spec.dual_stack {
                    node.host.route(&[
                        &format!("{}/{IPV6_PREFIX_LEN}", pod_network6(other.number)),
                        "via",
                        &node_addr6(other.number).to_string(),
                    ])?;
                }
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

    /// The pod named `name` (`n1p0`, ...); panics if the lab has none.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods()
            .find(|pod| pod.host.name() == name)
            .unwrap_or_else(|| panic!("no pod {name} in the lab"))
    }
}

/// Which address families the lab's hosts get.
struct Families {
    dual_stack: bool,
}

impl Families {
    fn host(&self, lab: &mut Lab, name: &str) -> anyhow::Result<Host> {
        let host = lab.host(name)?;
        if self.dual_stack {
            host.enable_ipv6()?;
        }
        Ok(host)
    }

    fn attach_to_fabric(
        &self,
        lab: &Lab,
        fabric: &Host,
        host: &Host,
        addr: Ipv4Addr,
        addr6: Ipv6Addr,
    ) -> anyhow::Result<()> {
        let port = format!("p-{}", host.name());
        lab.veth(host, FABRIC_IFACE, fabric, &port)?;
        fabric.enslave(&port, "br0")?;
        host.addr(FABRIC_IFACE, &format!("{addr}/{FABRIC_PREFIX_LEN}"))?;
        if self.dual_stack {
            host.addr6(FABRIC_IFACE, &format!("{addr6}/{IPV6_PREFIX_LEN}"))?;
        }
        Ok(())
    }

    fn build_node(
        &self,
        lab: &mut Lab,
        fabric: &Host,
        number: u8,
        pod_count: u8,
    ) -> anyhow::Result<Node> {
        let host = self.host(lab, &format!("node{number}"))?;
        let addr = node_addr(number);
        self.attach_to_fabric(lab, fabric, &host, addr, node_addr6(number))?;
        host.sysctl("net.ipv4.ip_forward", "1")?;
        host.bridge("cni0")?;
        let gateway = Ipv4Addr::new(10, 244, number, 1);
        host.addr("cni0", &format!("{gateway}/24"))?;
        let gateway6 = Ipv6Addr::from(u128::from(pod_network6(number)) | 1);
        if self.dual_stack {
            host.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            host.addr6("cni0", &format!("{gateway6}/{IPV6_PREFIX_LEN}"))?;
        }
        let mut pods = Vec::new();
        for pod in 0..pod_count {
            let name = format!("n{number}p{pod}");
            let pod_host = self.host(lab, &name)?;
            let port = format!("v-{name}");
            lab.veth(&pod_host, POD_IFACE, &host, &port)?;
            host.enslave(&port, "cni0")?;
            let pod_addr = pod_addr(number, pod);
            pod_host.addr(POD_IFACE, &format!("{pod_addr}/24"))?;
            pod_host.route(&["default", "via", &gateway.to_string()])?;
            if self.dual_stack {
                let pod_addr6 = pod_addr6(number, pod);
                pod_host.addr6(POD_IFACE, &format!("{pod_addr6}/{IPV6_PREFIX_LEN}"))?;
                pod_host.route(&["::/0", "via", &gateway6.to_string()])?;
            }
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
}
