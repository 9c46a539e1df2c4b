//! The model: what compile takes (this node's [`NodeContext`]) and gives (the [`Desired`] state,
//! one [`DesiredService`] per [`ServicePortKey`], and [`Problem`]s), and the values the desired
//! state is made of ([`Frontend`], [`Backend`]). Reconcile hands them on to the datapath as a
//! [`Service`] with ids: the datapath takes its instructions in these types and knows nothing
//! else of compile.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    ops::RangeInclusive,
};

use lb_common::{Backend4, Frontend4Key, proto};

/// The API server's default `--service-node-port-range`.
pub const DEFAULT_NODE_PORT_RANGE: RangeInclusive<u16> = 30000..=32767;

/// What compile needs to know about the node it compiles for.
#[derive(Clone, Debug)]
pub struct NodeContext {
    /// This node's name (endpoints with this nodeName are local).
    pub node_name: String,
    /// Endpoint addresses without a nodeName that this node's routes reach through one of its
    /// pod interfaces (the agent asks the kernel's FIB, `crate::route`): those endpoints are
    /// local too. Hand-made EndpointSlices often leave nodeName out; an endpoint with one is
    /// placed by its nodeName alone.
    pub routed_local: BTreeSet<Ipv4Addr>,
    /// `--nodeport-addresses`: which node addresses serve NodePorts (empty: all of them).
    pub nodeport_cidrs: Vec<Ipv4Cidr>,
    /// `--external-ip-cidrs`: the externalIPs that may be served (empty: all of them, as
    /// kube-proxy does).
    pub external_ip_cidrs: Vec<Ipv4Cidr>,
    /// Node addresses to use when the snapshot has no Node object (file source without one).
    pub fallback_addresses: Vec<Ipv4Addr>,
    /// nodePorts outside this range are refused.
    pub node_port_range: RangeInclusive<u16>,
    /// Maglev for Services that do not choose with the
    /// [`LOAD_BALANCING_ANNOTATION`](super::LOAD_BALANCING_ANNOTATION).
    pub default_maglev: bool,
    /// This node's zone, its Node's `topology.kubernetes.io/zone` label (kept by the compiler
    /// from the snapshot's Node), for the endpoints' zone hints.
    pub zone: Option<String>,
}

impl NodeContext {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            routed_local: BTreeSet::new(),
            nodeport_cidrs: Vec::new(),
            external_ip_cidrs: Vec::new(),
            fallback_addresses: Vec::new(),
            node_port_range: DEFAULT_NODE_PORT_RANGE,
            default_maglev: false,
            zone: None,
        }
    }
}

/// An IPv4 prefix, e.g. `203.0.113.0/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Ipv4Cidr {
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        let mask = self.mask();
        u32::from(addr) & mask == u32::from(self.addr) & mask
    }

    /// The prefix with its host bits cleared: `10.1.2.3/8` is `10.0.0.0/8`.
    pub fn network(&self) -> Self {
        Self {
            addr: Ipv4Addr::from(u32::from(self.addr) & self.mask()),
            prefix_len: self.prefix_len,
        }
    }

    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0)
    }
}

impl std::str::FromStr for Ipv4Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr, prefix_len) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not a CIDR (address/prefix)"))?;
        let addr = addr
            .parse()
            .map_err(|_| format!("{text:?}: {addr:?} is not an IPv4 address"))?;
        let prefix_len: u8 = prefix_len
            .parse()
            .ok()
            .filter(|len| *len <= 32)
            .ok_or_else(|| format!("{text:?}: prefix length must be 0..=32"))?;
        Ok(Self { addr, prefix_len })
    }
}

/// A Service port: the unit of load balancing (one service id, one slot table).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortKey {
    pub namespace: String,
    pub name: String,
    /// The port's name ("" for the single unnamed port).
    pub port_name: String,
    pub proto: u8,
    /// Which of the port's frontends this entry serves: all of them, unless a traffic policy
    /// or source ranges give some of them other backends or checks.
    pub scope: Scope,
}

/// The frontends of a Service port that share one selection table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Every frontend (both traffic policies Cluster, no source ranges).
    #[default]
    All,
    /// The ClusterIPs (internalTrafficPolicy).
    Internal,
    /// NodePorts, externalIPs and, without source ranges, LoadBalancer IPs
    /// (externalTrafficPolicy).
    External,
    /// LoadBalancer IPs with loadBalancerSourceRanges (externalTrafficPolicy too).
    LoadBalancer,
    /// The same LoadBalancer IPs for this node's own clients when externalTrafficPolicy is
    /// Local: the internalTrafficPolicy's endpoints, still within the source ranges.
    LoadBalancerNodeClients,
}

impl std::fmt::Display for ServicePortKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}:{}/{}",
            self.namespace,
            self.name,
            self.port_name,
            protocol_name(self.proto)
        )?;
        match self.scope {
            Scope::All => Ok(()),
            Scope::Internal => write!(f, "[internal]"),
            Scope::External => write!(f, "[external]"),
            Scope::LoadBalancer => write!(f, "[loadbalancer]"),
            Scope::LoadBalancerNodeClients => write!(f, "[loadbalancer-node-clients]"),
        }
    }
}

pub(super) fn protocol_name(protocol: u8) -> &'static str {
    match protocol {
        proto::UDP => "UDP",
        proto::SCTP => "SCTP",
        _ => "TCP",
    }
}

/// A frontend of a service: an address, port and protocol clients use, and what kind it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// [`lb_common::proto`] number.
    pub proto: u8,
    /// [`lb_common::service_flags`] bits.
    pub kind: u32,
}

impl Frontend {
    pub fn key(&self) -> Frontend4Key {
        Frontend4Key {
            addr: u32::from(self.addr).to_be(),
            port: self.port.to_be(),
            proto: self.proto,
            scope: if self.kind & lb_common::service_flags::FOR_NODE_CLIENTS != 0 {
                lb_common::scope::NODE_CLIENTS
            } else {
                lb_common::scope::ANY
            },
        }
    }
}

/// A backend as the API takes it: an endpoint address, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    /// [`lb_common::backend_flags`] bits.
    pub flags: u8,
}

impl Backend {
    pub(crate) fn value(&self) -> Backend4 {
        Backend4 {
            addr: u32::from(self.addr).to_be(),
            port: self.port.to_be(),
            proto: self.proto,
            flags: self.flags,
        }
    }

    pub(crate) fn from_value(value: &Backend4) -> Self {
        Self {
            addr: Ipv4Addr::from(u32::from_be(value.addr)),
            port: u16::from_be(value.port),
            proto: value.proto,
            flags: value.flags,
        }
    }
}

/// What the datapath should hold for one Service port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredService {
    pub frontends: BTreeSet<Frontend>,
    /// The backends new flows select from.
    pub backends: BTreeSet<Backend>,
    /// sessionAffinity ClientIP timeout, 0 without affinity.
    pub affinity_timeout_s: u32,
    /// [`lb_common::service_flags`] policy bits: LOCAL_ONLY, SOURCE_RANGES.
    pub flags: u32,
    /// loadBalancerSourceRanges (address, prefix length), with SOURCE_RANGES.
    pub source_ranges: BTreeSet<(Ipv4Addr, u8)>,
}

/// The whole desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub services: BTreeMap<ServicePortKey, DesiredService>,
    /// Services (namespace, name) skipped for bad input: what was installed for them before
    /// stays in force rather than being removed.
    pub held: BTreeSet<(String, String)>,
}

/// One service (one Service port) as the datapath takes it: reconcile gives each desired service
/// an id, and its backends ids, to write it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// 0..[`lb_common::limits::MAX_SERVICES`]; the caller allocates ids and keeps them stable.
    pub id: u32,
    pub frontends: Vec<Frontend>,
    /// Backend ids (put with
    /// [`Datapath::put_backend`](crate::datapath::Datapath::put_backend) first) that new flows
    /// may select.
    pub backends: Vec<u32>,
    pub affinity_timeout_s: u32,
    /// [`lb_common::service_flags`] policy bits (LOCAL_ONLY, SOURCE_RANGES) for every frontend.
    pub flags: u32,
    /// loadBalancerSourceRanges (address, prefix length); enforced with SOURCE_RANGES.
    pub source_ranges: BTreeSet<(Ipv4Addr, u8)>,
}

/// How bad a problem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The object (or part of it) is invalid and was skipped: logged, counted and reported as a
    /// Kubernetes Warning Event.
    Invalid,
    /// Valid, but asks for something this version does not do yet (IPv6, SCTP): logged once.
    Unsupported,
    /// Used, but not as written (a source range with host bits set is masked): logged and
    /// reported as a Kubernetes Warning Event, not counted as skipped.
    Warning,
}

/// Something compile could not use, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub severity: Severity,
    /// "Service" or "EndpointSlice".
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    /// A short CamelCase reason (the Event's reason and the metric label).
    pub reason: &'static str,
    pub message: String,
}
