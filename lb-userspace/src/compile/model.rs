//! The model: what compile takes (this node's [`NodeContext`]) and gives (the [`Desired`] state,
//! one [`DesiredService`] per [`ServicePortKey`], and [`Problem`]s), and the values the desired
//! state is made of ([`Frontend`], [`Backend`]). Reconcile hands them on to the datapath as a
//! [`Service`] with ids: the datapath takes its instructions in these types and knows nothing
//! else of compile.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::RangeInclusive,
};

use lb_common::{Backend4, Backend6, Frontend4Key, Frontend6Key, proto};

use super::health_check::ProbedEndpoint;

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
    pub routed_local: BTreeSet<IpAddr>,
    /// Local endpoints this node's health probes hold as failed (`crate::probe`): they leave
    /// the selection tables of their Service, unless every endpoint of a table would
    /// ([`super::health_check`]).
    pub health_failed: BTreeSet<ProbedEndpoint>,
    /// `--nodeport-addresses`: which node addresses serve NodePorts.
    pub nodeport_addresses: NodePortAddresses,
    /// `--external-ip-cidrs`: the externalIPs that may be served (empty: all of them, as
    /// kube-proxy does).
    pub external_ip_cidrs: Vec<IpCidr>,
    /// Node addresses to use when the snapshot has no Node object (file source without one).
    pub fallback_addresses: Vec<IpAddr>,
    /// nodePorts outside this range are refused.
    pub node_port_range: RangeInclusive<u16>,
    /// Maglev for Services that do not choose with the
    /// [`LOAD_BALANCING_ANNOTATION`](super::LOAD_BALANCING_ANNOTATION).
    pub default_maglev: bool,
    /// `--nodeport-mode dsr`: every Service's frontends carry
    /// [`lb_common::service_flags::DIRECT_RETURN`].
    pub direct_return: bool,
    /// With `direct_return`: the Nodes that take DSR options
    /// ([`crate::source::takes_direct_return`]); endpoints on them get
    /// [`lb_common::backend_flags::TAKES_DIRECT_RETURN`], and only flows to those go by DSR.
    pub direct_return_nodes: BTreeSet<String>,
    /// This node's zone, its Node's `topology.kubernetes.io/zone` label (kept by the compiler
    /// from the snapshot's Node), for the endpoints' zone hints.
    pub zone: Option<String>,
}

impl NodeContext {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            routed_local: BTreeSet::new(),
            health_failed: BTreeSet::new(),
            nodeport_addresses: NodePortAddresses::All,
            external_ip_cidrs: Vec::new(),
            fallback_addresses: Vec::new(),
            node_port_range: DEFAULT_NODE_PORT_RANGE,
            default_maglev: false,
            direct_return: false,
            direct_return_nodes: BTreeSet::new(),
            zone: None,
        }
    }
}

/// Which of the node's addresses serve NodePorts (`--nodeport-addresses`, kube-proxy's
/// `nodePortAddresses`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Every address of the node (the setting empty).
    #[default]
    All,
    /// The addresses inside these prefixes; a family none of them names keeps all its
    /// addresses, as kube-proxy reads them per family.
    Cidrs(Vec<IpCidr>),
    /// `primary`: the node's primary address of each family, as kube-proxy picks its node IPs:
    /// the family's first InternalIP, else its first ExternalIP.
    Primary,
}

/// One item of `--nodeport-addresses`: a prefix, or the word `primary`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodePortAddress {
    Cidr(IpCidr),
    Primary,
}

impl std::str::FromStr for NodePortAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.trim() == "primary" {
            return Ok(Self::Primary);
        }
        text.trim()
            .parse()
            .map(Self::Cidr)
            .map_err(|error| format!("{error}, nor primary"))
    }
}

impl NodePortAddresses {
    /// The setting from its items: none is all addresses; `primary` stands alone, as kube-proxy
    /// takes it.
    pub fn from_items(items: &[NodePortAddress]) -> Result<Self, String> {
        let cidrs: Option<Vec<IpCidr>> = items
            .iter()
            .map(|item| match item {
                NodePortAddress::Cidr(cidr) => Some(*cidr),
                NodePortAddress::Primary => None,
            })
            .collect();
        match (cidrs, items) {
            (Some(_), []) => Ok(Self::All),
            (Some(cidrs), _) => Ok(Self::Cidrs(cidrs)),
            (None, [NodePortAddress::Primary]) => Ok(Self::Primary),
            (None, _) => Err("primary cannot be given with other items (CIDRs or primary)".into()),
        }
    }
}

/// An IP prefix, e.g. `203.0.113.0/24` or `2001:db8::/32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpCidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl IpCidr {
    /// Whether `addr` is inside the prefix; never for an address of the other family.
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.addr, addr) {
            (IpAddr::V4(network), IpAddr::V4(addr)) => {
                let mask = mask4(self.prefix_len);
                u32::from(addr) & mask == u32::from(network) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(addr)) => {
                let mask = mask6(self.prefix_len);
                u128::from(addr) & mask == u128::from(network) & mask
            }
            _ => false,
        }
    }

    /// The prefix with its host bits cleared: `10.1.2.3/8` is `10.0.0.0/8`.
    pub fn network(&self) -> Self {
        let addr = match self.addr {
            IpAddr::V4(addr) => Ipv4Addr::from(u32::from(addr) & mask4(self.prefix_len)).into(),
            IpAddr::V6(addr) => Ipv6Addr::from(u128::from(addr) & mask6(self.prefix_len)).into(),
        };
        Self {
            addr,
            prefix_len: self.prefix_len,
        }
    }

    pub fn family(&self) -> Family {
        Family::of(self.addr)
    }
}

fn mask4(prefix_len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0)
}

fn mask6(prefix_len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(prefix_len))
        .unwrap_or(0)
}

impl std::str::FromStr for IpCidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr, prefix_len) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not a CIDR (address/prefix)"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?}: {addr:?} is not an IP address"))?;
        let max = Family::of(addr).bits();
        let prefix_len: u8 = prefix_len
            .parse()
            .ok()
            .filter(|len| *len <= max)
            .ok_or_else(|| format!("{text:?}: prefix length must be 0..={max}"))?;
        Ok(Self { addr, prefix_len })
    }
}

/// An address family. A dual-stack Service compiles into one service per family, each with its
/// own id, selection table and endpoints (those of its family's EndpointSlices).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    #[default]
    V4,
    V6,
}

impl Family {
    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }

    /// Address length in bits.
    pub fn bits(self) -> u8 {
        match self {
            Self::V4 => 32,
            Self::V6 => 128,
        }
    }

    /// As Kubernetes spells it (`ipFamilies`, EndpointSlice `addressType`).
    pub fn name(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
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
    /// The family of its frontends and backends.
    pub family: Family,
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
        }?;
        match self.family {
            Family::V4 => Ok(()),
            Family::V6 => write!(f, "[ipv6]"),
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
    pub addr: IpAddr,
    pub port: u16,
    /// [`lb_common::proto`] number.
    pub proto: u8,
    /// [`lb_common::service_flags`] bits.
    pub kind: u32,
}

/// A frontends map key of either family, as the datapath writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKey {
    V4(Frontend4Key),
    V6(Frontend6Key),
}

impl FrontendKey {
    /// The IPv4 map's key, for an IPv4 frontend.
    pub fn v4(&self) -> Option<Frontend4Key> {
        match self {
            Self::V4(key) => Some(*key),
            Self::V6(_) => None,
        }
    }

    pub fn addr(&self) -> IpAddr {
        match self {
            Self::V4(key) => Ipv4Addr::from(u32::from_be(key.addr)).into(),
            Self::V6(key) => ipv6_of_words(key.addr).into(),
        }
    }

    pub fn port(&self) -> u16 {
        u16::from_be(match self {
            Self::V4(key) => key.port,
            Self::V6(key) => key.port,
        })
    }

    pub fn proto(&self) -> u8 {
        match self {
            Self::V4(key) => key.proto,
            Self::V6(key) => key.proto,
        }
    }

    pub fn scope(&self) -> u8 {
        match self {
            Self::V4(key) => key.scope,
            Self::V6(key) => key.scope,
        }
    }
}

/// An IPv6 address as the datapath's keys hold it ([`lb_common::Ipv6Words`]: the address's
/// bytes, read as four native-endian words).
pub fn ipv6_words(addr: Ipv6Addr) -> lb_common::Ipv6Words {
    let bytes = addr.octets();
    std::array::from_fn(|i| u32::from_ne_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap()))
}

fn words_to_u128(words: lb_common::Ipv6Words) -> u128 {
    let bytes = words.map(u32::to_ne_bytes);
    u128::from_be_bytes(bytes.as_flattened().try_into().expect("16 bytes"))
}

/// The address [`ipv6_words`] made.
pub fn ipv6_of_words(words: lb_common::Ipv6Words) -> Ipv6Addr {
    Ipv6Addr::from(words_to_u128(words))
}

impl Frontend {
    pub fn key(&self) -> FrontendKey {
        let port = self.port.to_be();
        let scope = if self.kind & lb_common::service_flags::FOR_NODE_CLIENTS != 0 {
            lb_common::scope::NODE_CLIENTS
        } else {
            lb_common::scope::ANY
        };
        match self.addr {
            IpAddr::V4(addr) => FrontendKey::V4(Frontend4Key {
                addr: u32::from(addr).to_be(),
                port,
                proto: self.proto,
                scope,
            }),
            IpAddr::V6(addr) => FrontendKey::V6(Frontend6Key {
                addr: ipv6_words(addr),
                port,
                proto: self.proto,
                scope,
            }),
        }
    }
}

/// A backend as the API takes it: an endpoint address, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
    /// [`lb_common::backend_flags`] bits.
    pub flags: u8,
}

/// A backends map value of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendValue {
    V4(Backend4),
    V6(Backend6),
}

impl Backend {
    pub(crate) fn value(&self) -> BackendValue {
        let port = self.port.to_be();
        match self.addr {
            IpAddr::V4(addr) => BackendValue::V4(Backend4 {
                addr: u32::from(addr).to_be(),
                port,
                proto: self.proto,
                flags: self.flags,
            }),
            IpAddr::V6(addr) => BackendValue::V6(Backend6 {
                addr: ipv6_words(addr),
                port,
                proto: self.proto,
                flags: self.flags,
            }),
        }
    }

    pub(crate) fn from_value(value: &Backend4) -> Self {
        Self {
            addr: Ipv4Addr::from(u32::from_be(value.addr)).into(),
            port: u16::from_be(value.port),
            proto: value.proto,
            flags: value.flags,
        }
    }

    pub(crate) fn from_value6(value: &Backend6) -> Self {
        Self {
            addr: ipv6_of_words(value.addr).into(),
            port: u16::from_be(value.port),
            proto: value.proto,
            flags: value.flags,
        }
    }

    pub fn family(&self) -> Family {
        Family::of(self.addr)
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
    pub source_ranges: BTreeSet<(IpAddr, u8)>,
    /// Endpoint weights ([`ENDPOINT_WEIGHTS_ANNOTATION`](super::ENDPOINT_WEIGHTS_ANNOTATION)):
    /// each backend's relative share of new flows, by (address, port); empty: equal shares.
    /// A backend of weight 0 gets no new flow.
    pub weights: BTreeMap<(IpAddr, u16), u32>,
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
    pub source_ranges: BTreeSet<(IpAddr, u8)>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_words_hold_the_address_bytes_in_wire_order() {
        let addr: Ipv6Addr = "2001:db8:96::10".parse().unwrap();
        let words = ipv6_words(addr);
        let in_memory: Vec<u8> = words.iter().flat_map(|word| word.to_ne_bytes()).collect();
        assert_eq!(in_memory, addr.octets());
        assert_eq!(ipv6_of_words(words), addr);
    }

    #[test]
    fn cidrs_of_both_families_contain_their_own_family_only() {
        let v6: IpCidr = "2001:db8:1::/48".parse().unwrap();
        assert!(v6.contains("2001:db8:1:ffff::7".parse().unwrap()));
        assert!(!v6.contains("2001:db8:2::7".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        let v4: IpCidr = "10.0.0.0/8".parse().unwrap();
        assert!(v4.contains("10.1.2.3".parse().unwrap()));
        assert!(!v4.contains("::ffff:10.1.2.3".parse().unwrap()));
        let all6: IpCidr = "::/0".parse().unwrap();
        assert!(all6.contains("2001:db8::1".parse().unwrap()));
        assert_eq!(
            "2001:db8:1::5/48".parse::<IpCidr>().unwrap().network(),
            "2001:db8:1::/48".parse().unwrap()
        );
        assert!("2001:db8::/129".parse::<IpCidr>().is_err());
        assert!("10.0.0.0/33".parse::<IpCidr>().is_err());
    }
}
