//! compile(snapshot, node): Kubernetes objects in, the datapath's desired contents out. A pure
//! function (no I/O, no clock), so every row of the Service contract is a table test.
//!
//! What it implements (kube-proxy's behaviour):
//! - one desired service per Service port (multi-port Services give several), with frontends for
//!   the ClusterIP(s), every node address:nodePort (NodePort and LoadBalancer types), every
//!   externalIP, every LoadBalancer ingress IP;
//! - backends from every EndpointSlice labelled `kubernetes.io/service-name`, the port resolved
//!   per slice by port name (named target ports may differ per endpoint), endpoints deduplicated
//!   by address, flagged LOCAL when their nodeName is this node, or, without a nodeName, when
//!   the node's routes put their address on this node ([`NodeContext::routed_local`]);
//! - ready endpoints; when none is ready, the serving and terminating ones (KEP-1669);
//! - headless and ExternalName Services ignored; IPv6 addresses reported as not yet supported;
//! - sessionAffinity ClientIP with its timeout (default 10800 s);
//! - externalIPs only inside `--external-ip-cidrs` when it is given (the others skipped with a
//!   problem);
//! - one owner per frontend (address, port, protocol) when several Services claim it: see
//!   [`Claim`]. The others are skipped for that frontend only, with a problem naming the owner.
//!
//! Bad input never takes down anything else: an invalid Service is skipped as a whole with a
//! [`Problem`] (and stays "held": the agent keeps what it installed for it before), an invalid
//! endpoint or slice is skipped alone.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr},
    ops::RangeInclusive,
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::{Endpoint, EndpointSlice},
};
use lb_common::{backend_flags, limits, proto, service_flags};

use crate::{
    datapath::{Backend, Frontend},
    source::Snapshot,
};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// sessionAffinityConfig.clientIP.timeoutSeconds when unset (the API's default).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
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
    /// Maglev for Services that do not choose with the [`LOAD_BALANCING_ANNOTATION`].
    pub default_maglev: bool,
}

/// The annotation with which a Service chooses how XDP picks backends for new flows: `random`
/// (kube-proxy's way, the default) or `maglev` (consistent hashing).
pub const LOAD_BALANCING_ANNOTATION: &str = "lb.io/load-balancing";

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
        }
    }
}

fn protocol_name(protocol: u8) -> &'static str {
    if protocol == proto::UDP { "UDP" } else { "TCP" }
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

/// A frontend as the datapath keys it: (address, port, protocol).
type FrontendId = (Ipv4Addr, u16, u8);

fn frontend_id(frontend: &Frontend) -> FrontendId {
    (frontend.addr, frontend.port, frontend.proto)
}

/// One Service port's claim on a frontend. When several Service ports claim one, the least claim
/// owns it, by the derived order (field by field):
/// 1. the kind of address: a ClusterIP first (the API server allocates it and keeps it unique),
///    then a nodePort (allocated and unique too), then externalIPs and LoadBalancer ingress IPs
///    alike (whoever may write a Service or its status writes them: the CVE-2020-8554 class);
/// 2. the Service's age: the earlier creationTimestamp, then the lesser uid; a Service without
///    one counts as younger than every Service with one (hand-written manifests have neither);
/// 3. the Service port's key (namespace, name, port, scope) and the kind, so that the order is
///    total and never depends on which object arrived first.
///
/// The claims of the owning Service port are all served (an externalIP also listed as an ingress
/// IP is one entry with both kinds).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Claim {
    precedence: Precedence,
    age: Age,
    key: ServicePortKey,
    kind: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Precedence {
    ClusterIp,
    NodePort,
    External,
}

impl Precedence {
    fn of(kind: u32) -> Self {
        if kind & service_flags::CLUSTER_IP != 0 {
            Self::ClusterIp
        } else if kind & service_flags::NODE_PORT != 0 {
            Self::NodePort
        } else {
            Self::External
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::ClusterIp => "a ClusterIP",
            Self::NodePort => "a nodePort",
            Self::External => "an externalIP or LoadBalancer IP",
        }
    }
}

/// How old a Service is (older is less); what is missing sorts after every known value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Age {
    created: Known<jiff::Timestamp>,
    uid: Known<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Known<T> {
    Value(T),
    Missing,
}

impl<T> From<Option<T>> for Known<T> {
    fn from(value: Option<T>) -> Self {
        value.map_or(Self::Missing, Self::Value)
    }
}

fn age(service: &Service) -> Age {
    Age {
        created: service
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|time| time.0)
            .into(),
        uid: service.metadata.uid.clone().into(),
    }
}

/// Compiles a snapshot into the desired state for one node, from scratch.
pub fn compile(snapshot: &Snapshot, node: &NodeContext) -> (Desired, Vec<Problem>) {
    let mut compiler = Compiler::new(node.clone());
    let problems = compiler.update(snapshot).problems;
    (compiler.desired, problems)
}

/// compile() kept up to date across snapshots: only the Services whose object or slices are not
/// the ones of the previous snapshot (by address, see [`Previous`]) are looked at, and of those
/// only the ones whose resourceVersions changed are compiled again; the desired state is patched
/// in place, so a change costs O(its size) plus a pass over the snapshot's pointers. Frontend
/// conflicts are settled in place too (every claim is kept, see [`Claim`], so when an owner
/// goes the next claim takes over). A change of this node's addresses falls back to a full
/// compile; the result is always exactly what [`compile`] gives (tested).
pub struct Compiler {
    node: NodeContext,
    node_addresses: Vec<Ipv4Addr>,
    desired: Desired,
    /// By namespace, then name (nested so lookups need no owned key).
    services: HashMap<String, HashMap<String, CompiledService>>,
    /// Every claim on each frontend, least (the owner's) first.
    claims: HashMap<FrontendId, Vec<Claim>>,
    /// Which Service port serves each frontend (the first claim's).
    owners: HashMap<FrontendId, ServicePortKey>,
    /// Frontends claimed by more than one Service.
    contested: BTreeSet<FrontendId>,
    /// Service ports that own none of the frontends they claim: out of the desired state until
    /// they own one.
    parked: HashMap<ServicePortKey, DesiredService>,
    /// A full compile is needed (first run, node changed, a key with two Services).
    full: bool,
    snat_address: Option<Ipv4Addr>,
    /// The objects of the previous update, indexed, to find what changed by pointer.
    previous: Option<Previous>,
    /// Problems of EndpointSlices whose Service does not exist, by (namespace, service).
    orphans: BTreeMap<(String, String), Vec<Problem>>,
    /// The healthCheckNodePort of every externalTrafficPolicy Local Service that has one.
    health_check_ports: BTreeMap<(String, String), u16>,
    /// Endpoint addresses without a nodeName, with how many compiled Services have them.
    unplaced: BTreeMap<Ipv4Addr, usize>,
    /// Services to compile again on the next update although their objects did not change
    /// (the placement of one of their endpoints did).
    stale: BTreeSet<(String, String)>,
}

/// The previous update's objects. Sources share unchanged objects between snapshots (`Arc`), so
/// an object at the same address is the same object: what changed is found without reading the
/// objects that did not, which at 10k Services was most of an update's time (their metadata
/// are scattered over ~70 MB). Holding a clone of every Arc keeps those addresses from being
/// freed and reused by another object, and a shared Arc cannot be changed in place.
#[derive(Default)]
struct Previous {
    services: HashMap<usize, Arc<Service>>,
    slices: HashMap<usize, Arc<EndpointSlice>>,
    /// Usually one Service a key; more only in a malformed snapshot (then: full compiles).
    service_by_key: HashMap<(String, String), Vec<Arc<Service>>>,
    slices_of: HashMap<(String, String), Vec<Arc<EndpointSlice>>>,
}

impl Previous {
    fn of(snapshot: &Snapshot) -> Self {
        let mut previous = Self::default();
        for service in &snapshot.services {
            previous.add_service(service);
        }
        for slice in &snapshot.endpoint_slices {
            previous.add_slice(slice);
        }
        previous
    }

    fn add_service(&mut self, service: &Arc<Service>) -> (String, String) {
        let key = object_key(&service.metadata);
        self.services.insert(address(service), service.clone());
        self.service_by_key
            .entry(key.clone())
            .or_default()
            .push(service.clone());
        key
    }

    fn remove_service(&mut self, service: &Arc<Service>) -> (String, String) {
        let key = object_key(&service.metadata);
        self.services.remove(&address(service));
        if let Some(services) = self.service_by_key.get_mut(&key) {
            services.retain(|other| !Arc::ptr_eq(other, service));
            if services.is_empty() {
                self.service_by_key.remove(&key);
            }
        }
        key
    }

    /// The slice's Service key, when it names one.
    fn add_slice(&mut self, slice: &Arc<EndpointSlice>) -> Option<(String, String)> {
        self.slices.insert(address(slice), slice.clone());
        let key = slice_service(slice)?;
        self.slices_of
            .entry(key.clone())
            .or_default()
            .push(slice.clone());
        Some(key)
    }

    fn remove_slice(&mut self, slice: &Arc<EndpointSlice>) -> Option<(String, String)> {
        self.slices.remove(&address(slice));
        let key = slice_service(slice)?;
        if let Some(slices) = self.slices_of.get_mut(&key) {
            slices.retain(|other| !Arc::ptr_eq(other, slice));
            if slices.is_empty() {
                self.slices_of.remove(&key);
            }
        }
        Some(key)
    }

    /// Brings the index to `snapshot`; returns the keys of the Services whose object or
    /// slices changed (added, replaced or removed).
    fn advance(&mut self, snapshot: &Snapshot) -> BTreeSet<(String, String)> {
        let mut dirty = BTreeSet::new();
        let present: std::collections::HashSet<usize> =
            snapshot.services.iter().map(address).collect();
        let gone: Vec<Arc<Service>> = self
            .services
            .iter()
            .filter(|(address, _)| !present.contains(address))
            .map(|(_, service)| service.clone())
            .collect();
        for service in gone {
            dirty.insert(self.remove_service(&service));
        }
        for service in &snapshot.services {
            if !self.services.contains_key(&address(service)) {
                dirty.insert(self.add_service(service));
            }
        }
        let present: std::collections::HashSet<usize> =
            snapshot.endpoint_slices.iter().map(address).collect();
        let gone: Vec<Arc<EndpointSlice>> = self
            .slices
            .iter()
            .filter(|(address, _)| !present.contains(address))
            .map(|(_, slice)| slice.clone())
            .collect();
        for slice in gone {
            dirty.extend(self.remove_slice(&slice));
        }
        for slice in &snapshot.endpoint_slices {
            if !self.slices.contains_key(&address(slice)) {
                dirty.extend(self.add_slice(slice));
            }
        }
        dirty
    }
}

fn address<T>(object: &Arc<T>) -> usize {
    Arc::as_ptr(object) as usize
}

/// (namespace, Service name) an EndpointSlice belongs to, from its service-name label.
fn slice_service(slice: &EndpointSlice) -> Option<(String, String)> {
    let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
    Some((namespace.to_owned(), service.clone()))
}

/// What one Service compiled to, and from what.
struct CompiledService {
    /// resourceVersions of the Service and its slices; None: compile again every time.
    fingerprint: Option<Fingerprint>,
    /// healthCheckNodePort of an externalTrafficPolicy Local Service.
    health_check_node_port: Option<u16>,
    /// Its endpoint addresses without a nodeName.
    unplaced: BTreeSet<Ipv4Addr>,
    keys: Vec<ServicePortKey>,
    /// The frontends its ports claim (sorted, each once).
    claimed: Vec<FrontendId>,
    problems: Vec<Problem>,
    held: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Fingerprint {
    service: String,
    /// (slice name, resourceVersion), sorted.
    slices: Vec<(String, String)>,
}

/// The result of one [`Compiler::update`].
pub struct Update {
    /// Service ports added, changed or removed since the previous update.
    pub changed: BTreeSet<ServicePortKey>,
    /// Every problem of the current snapshot.
    pub problems: Vec<Problem>,
    /// Objects added, changed or removed since the previous update (kube-proxy's change
    /// counters), by resourceVersion; an object without one counts as changed whenever its
    /// Service is compiled.
    pub changes: Changes,
}

impl Update {
    /// Folds a later update of the same sync into this one: the Service ports either changed,
    /// the later problems, the changes of both.
    pub fn absorb(&mut self, later: Update) {
        self.changed.extend(later.changed);
        self.problems = later.problems;
        self.changes.services += later.changes.services;
        self.changes.endpoint_slices += later.changes.endpoint_slices;
        self.changes
            .trigger_times
            .extend(later.changes.trigger_times);
    }
}

/// Object changes seen by one update.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub services: u64,
    pub endpoint_slices: u64,
    /// `endpoints.kubernetes.io/last-change-trigger-time` of each added or changed slice that
    /// carries it: when the change that led to it happened (for the network programming latency).
    pub trigger_times: Vec<String>,
}

/// The annotation the EndpointSlice controller sets to when the change behind a slice happened.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

impl Changes {
    /// Counts what differs between a Service's fingerprint before and its objects now.
    fn count(
        &mut self,
        before: Option<&Fingerprint>,
        service: &Service,
        slices: &[&EndpointSlice],
    ) {
        let service_version = service.metadata.resource_version.as_deref();
        if before.is_none_or(|before| service_version != Some(before.service.as_str())) {
            self.services += 1;
        }
        let known = |slice: &EndpointSlice| {
            before.is_some_and(|before| {
                before.slices.iter().any(|(name, version)| {
                    slice.metadata.name.as_deref() == Some(name.as_str())
                        && slice.metadata.resource_version.as_deref() == Some(version.as_str())
                })
            })
        };
        for slice in slices.iter().filter(|slice| !known(slice)) {
            self.endpoint_slices += 1;
            if let Some(time) = slice
                .metadata
                .annotations
                .as_ref()
                .and_then(|annotations| annotations.get(TRIGGER_TIME_ANNOTATION))
            {
                self.trigger_times.push(time.clone());
            }
        }
        if let Some(before) = before {
            let removed = before.slices.iter().filter(|(name, _)| {
                !slices
                    .iter()
                    .any(|slice| slice.metadata.name.as_deref() == Some(name.as_str()))
            });
            self.endpoint_slices += removed.count() as u64;
        }
    }

    /// Counts a Service that is gone, with its slices.
    fn count_gone(&mut self, before: Option<&Fingerprint>) {
        self.services += 1;
        self.endpoint_slices += before.map_or(0, |before| before.slices.len() as u64);
    }
}

type SlicesByService<'a> = HashMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>;

impl Compiler {
    pub fn new(node: NodeContext) -> Self {
        Self {
            node,
            node_addresses: Vec::new(),
            desired: Desired::default(),
            services: HashMap::new(),
            claims: HashMap::new(),
            owners: HashMap::new(),
            contested: BTreeSet::new(),
            parked: HashMap::new(),
            full: true,
            snat_address: None,
            previous: None,
            orphans: BTreeMap::new(),
            health_check_ports: BTreeMap::new(),
            unplaced: BTreeMap::new(),
            stale: BTreeSet::new(),
        }
    }

    /// The addresses of the endpoints without a nodeName, as of the last update: the ones whose
    /// place the caller finds out (from the node's routes) for [`Self::set_routed_local`].
    pub fn unplaced_endpoints(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.unplaced.keys().copied()
    }

    /// Sets which endpoint addresses without a nodeName are on this node
    /// ([`NodeContext::routed_local`]). The Services with an endpoint whose place changed are
    /// compiled again on the next update; returns whether there are any.
    pub fn set_routed_local(&mut self, local: BTreeSet<Ipv4Addr>) -> bool {
        let moved: BTreeSet<Ipv4Addr> = self
            .node
            .routed_local
            .symmetric_difference(&local)
            .copied()
            .collect();
        self.node.routed_local = local;
        if moved.is_empty() {
            return false;
        }
        let affected: Vec<(String, String)> = self
            .services
            .iter()
            .flat_map(|(namespace, by_name)| {
                by_name
                    .iter()
                    .filter(|(_, compiled)| !compiled.unplaced.is_disjoint(&moved))
                    .map(move |(name, _)| (namespace.clone(), name.clone()))
            })
            .collect();
        let any = !affected.is_empty();
        self.stale.extend(affected);
        any
    }

    /// The desired state as of the last update.
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// (namespace, name) -> healthCheckNodePort of every externalTrafficPolicy Local Service
    /// that has one, as of the last update.
    pub fn health_check_node_ports(&self) -> &BTreeMap<(String, String), u16> {
        &self.health_check_ports
    }

    /// This node's addresses that serve NodePorts (inside `--nodeport-addresses` when given).
    pub fn node_port_addresses(&self) -> &[Ipv4Addr] {
        &self.node_addresses
    }

    /// The node address that flows to backends on other nodes are SNATed to: the Node's first
    /// IPv4 InternalIP, else the first configured fallback address.
    pub fn snat_address(&self) -> Option<Ipv4Addr> {
        self.snat_address
    }

    pub fn update(&mut self, snapshot: &Snapshot) -> Update {
        self.snat_address = snat_address(snapshot, &self.node);
        let node_addresses = node_addresses(snapshot, &self.node);
        if node_addresses != self.node_addresses {
            self.node_addresses = node_addresses;
            self.full = true;
        }
        let mut changed = BTreeSet::new();
        let mut changes = Changes::default();
        if !self.full && !self.update_changed(snapshot, &mut changed, &mut changes) {
            self.full = true;
        }
        if self.full {
            changes = self.compile_all(snapshot, &mut changed);
        }
        let mut problems: Vec<Problem> = self
            .compiled()
            .flat_map(|service| service.problems.iter().cloned())
            .chain(self.orphans.values().flatten().cloned())
            .chain(self.conflict_problems())
            .collect();
        problems.sort();
        problems.dedup();
        Update {
            changed,
            problems,
            changes,
        }
    }

    /// Compiles every Service from nothing; the changes are counted against the fingerprints
    /// the previous update left.
    fn compile_all(
        &mut self,
        snapshot: &Snapshot,
        changed: &mut BTreeSet<ServicePortKey>,
    ) -> Changes {
        let slices = slices_by_service(snapshot);
        let mut changes = Changes::default();
        let mut before: HashMap<(String, String), Option<Fingerprint>> = self
            .services
            .iter()
            .flat_map(|(namespace, by_name)| {
                by_name.iter().map(move |(name, compiled)| {
                    (
                        (namespace.clone(), name.clone()),
                        compiled.fingerprint.clone(),
                    )
                })
            })
            .collect();
        changed.extend(self.desired.services.keys().cloned());
        self.desired = Desired::default();
        self.services.clear();
        self.health_check_ports.clear();
        self.unplaced.clear();
        self.stale.clear();
        self.claims.clear();
        self.owners.clear();
        self.contested.clear();
        self.parked.clear();
        let mut services: Vec<&Service> = snapshot.services.iter().map(|s| &**s).collect();
        services.sort_by_key(|service| object_key(&service.metadata));
        for service in services {
            let (namespace, name) = object_key(&service.metadata);
            let previous = before.remove(&(namespace, name)).flatten();
            changes.count(previous.as_ref(), service, service_slices(&slices, service));
            let compiled = self.compile_one(service, &slices, changed);
            self.insert(service, compiled);
        }
        for gone in before.values() {
            changes.count_gone(gone.as_ref());
        }
        self.full = false;
        let previous = Previous::of(snapshot);
        self.orphans.clear();
        let keys: Vec<(String, String)> = previous.slices_of.keys().cloned().collect();
        self.update_orphans(&previous, keys);
        self.previous = Some(previous);
        changes
    }

    /// Recompiles only the Services whose object or slices changed since the previous update
    /// (by pointer), and of those only the ones whose fingerprint changed. Returns false when a
    /// full compile is needed instead (a key has two Services).
    fn update_changed(
        &mut self,
        snapshot: &Snapshot,
        changed: &mut BTreeSet<ServicePortKey>,
        changes: &mut Changes,
    ) -> bool {
        let Some(mut previous) = self.previous.take() else {
            return false;
        };
        let stale = std::mem::take(&mut self.stale);
        let mut dirty = previous.advance(snapshot);
        dirty.extend(stale.iter().cloned());
        let slices: SlicesByService<'_> = dirty
            .iter()
            .filter_map(|key| {
                let slices = previous.slices_of.get(key)?;
                Some((
                    (key.0.as_str(), key.1.as_str()),
                    slices.iter().map(|slice| &**slice).collect(),
                ))
            })
            .collect();
        for (namespace, name) in &dirty {
            let services = previous
                .service_by_key
                .get(&(namespace.clone(), name.clone()))
                .map(Vec::as_slice)
                .unwrap_or_default();
            match services {
                [] => {
                    let before = self
                        .services
                        .get(namespace)
                        .and_then(|by_name| by_name.get(name))
                        .map(|compiled| compiled.fingerprint.clone());
                    if let Some(before) = before {
                        changes.count_gone(before.as_ref());
                        self.forget(namespace, name, changed);
                    }
                }
                [service] => {
                    let forced = stale.contains(&(namespace.clone(), name.clone()));
                    self.recompile(service, &slices, forced, changed, changes);
                }
                _ => return false,
            }
        }
        self.update_orphans(&previous, dirty);
        self.previous = Some(previous);
        true
    }

    /// Compiles one Service again unless its fingerprint shows nothing changed and it is not
    /// `forced`.
    fn recompile(
        &mut self,
        service: &Service,
        slices: &SlicesByService<'_>,
        forced: bool,
        changed: &mut BTreeSet<ServicePortKey>,
        changes: &mut Changes,
    ) {
        let (namespace, name) = names(&service.metadata);
        let known = self
            .services
            .get(namespace)
            .and_then(|by_name| by_name.get(name));
        if !forced
            && let Some(known) = known
            && fingerprint_matches(known.fingerprint.as_ref(), service, slices)
        {
            return;
        }
        let before = self
            .services
            .get_mut(namespace)
            .and_then(|by_name| by_name.get_mut(name))
            .and_then(|known| known.fingerprint.take());
        changes.count(before.as_ref(), service, service_slices(slices, service));
        self.forget(namespace, name, changed);
        let compiled = self.compile_one(service, slices, changed);
        self.insert(service, compiled);
    }

    /// Reports, for each of `keys`, the slices that name a Service that does not exist.
    fn update_orphans(
        &mut self,
        previous: &Previous,
        keys: impl IntoIterator<Item = (String, String)>,
    ) {
        for key in keys {
            let slices = previous
                .slices_of
                .get(&key)
                .map(Vec::as_slice)
                .unwrap_or_default();
            if slices.is_empty() || previous.service_by_key.contains_key(&key) {
                self.orphans.remove(&key);
                continue;
            }
            let problems = slices
                .iter()
                .map(|slice| {
                    let (namespace, name) = object_key(&slice.metadata);
                    Problem {
                        severity: Severity::Invalid,
                        kind: "EndpointSlice",
                        namespace,
                        name,
                        reason: "ServiceNotFound",
                        message: format!("service {:?} does not exist; endpoints ignored", key.1),
                    }
                })
                .collect();
            self.orphans.insert(key, problems);
        }
    }

    fn compiled(&self) -> impl Iterator<Item = &CompiledService> {
        self.services.values().flat_map(HashMap::values)
    }

    fn insert(&mut self, service: &Service, compiled: CompiledService) {
        let (namespace, name) = names(&service.metadata);
        if let Some(port) = compiled.health_check_node_port {
            self.health_check_ports
                .insert((namespace.to_owned(), name.to_owned()), port);
        }
        for addr in &compiled.unplaced {
            *self.unplaced.entry(*addr).or_default() += 1;
        }
        self.services
            .entry(namespace.to_owned())
            .or_default()
            .insert(name.to_owned(), compiled);
    }

    /// Removes what a Service contributed to the desired state.
    fn forget(&mut self, namespace: &str, name: &str, changed: &mut BTreeSet<ServicePortKey>) {
        let Some(compiled) = self
            .services
            .get_mut(namespace)
            .and_then(|by_name| by_name.remove(name))
        else {
            return;
        };
        self.health_check_ports
            .remove(&(namespace.to_owned(), name.to_owned()));
        for addr in &compiled.unplaced {
            if let Some(count) = self.unplaced.get_mut(addr) {
                *count -= 1;
                if *count == 0 {
                    self.unplaced.remove(addr);
                }
            }
        }
        for key in compiled.keys {
            self.desired.services.remove(&key);
            self.parked.remove(&key);
            changed.insert(key);
        }
        for id in compiled.claimed {
            if let Some(claims) = self.claims.get_mut(&id) {
                claims.retain(|claim| claim.key.namespace != namespace || claim.key.name != name);
            }
            self.settle(id, changed);
        }
        self.desired
            .held
            .remove(&(namespace.to_owned(), name.to_owned()));
    }

    /// Gives a frontend to its first claim's Service port (taking it from the one that had it),
    /// after its claims changed.
    fn settle(&mut self, id: FrontendId, changed: &mut BTreeSet<ServicePortKey>) {
        let claims = self.claims.get(&id).map(Vec::as_slice).unwrap_or_default();
        let owner = claims.first().map(|claim| claim.key.clone());
        let owned: Vec<Frontend> = claims
            .iter()
            .filter(|claim| Some(&claim.key) == owner.as_ref())
            .map(|claim| Frontend {
                addr: id.0,
                port: id.1,
                proto: id.2,
                kind: claim.kind,
            })
            .collect();
        let services = claims
            .iter()
            .map(|claim| (&claim.key.namespace, &claim.key.name))
            .collect::<BTreeSet<_>>()
            .len();
        if services > 1 {
            self.contested.insert(id);
        } else {
            self.contested.remove(&id);
        }
        if claims.is_empty() {
            self.claims.remove(&id);
        }
        let previous = match &owner {
            Some(owner) => self.owners.insert(id, owner.clone()),
            None => self.owners.remove(&id),
        };
        if let Some(previous) = previous {
            if let Some(port) = self.port_mut(&previous) {
                port.frontends
                    .retain(|frontend| frontend_id(frontend) != id);
            }
            self.place(&previous);
            changed.insert(previous);
        }
        if let Some(owner) = owner {
            if let Some(port) = self.port_mut(&owner) {
                port.frontends.extend(owned);
            }
            self.place(&owner);
            changed.insert(owner);
        }
    }

    /// A compiled Service port, in the desired state or parked.
    fn port_mut(&mut self, key: &ServicePortKey) -> Option<&mut DesiredService> {
        match self.desired.services.get_mut(key) {
            Some(port) => Some(port),
            None => self.parked.get_mut(key),
        }
    }

    /// Parks a Service port that owns no frontend, and brings back one that owns one again.
    fn place(&mut self, key: &ServicePortKey) {
        if self
            .desired
            .services
            .get(key)
            .is_some_and(|port| port.frontends.is_empty())
        {
            if let Some(port) = self.desired.services.remove(key) {
                self.parked.insert(key.clone(), port);
            }
        } else if self
            .parked
            .get(key)
            .is_some_and(|port| !port.frontends.is_empty())
            && let Some(port) = self.parked.remove(key)
        {
            self.desired.services.insert(key.clone(), port);
        }
    }

    /// A problem for each Service skipped on a frontend another Service owns.
    fn conflict_problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        for id in &self.contested {
            let Some((owner, others)) = self.claims.get(id).and_then(|claims| claims.split_first())
            else {
                continue;
            };
            let mut losers = BTreeSet::new();
            for claim in others {
                let same_service =
                    claim.key.namespace == owner.key.namespace && claim.key.name == owner.key.name;
                if same_service || !losers.insert((&claim.key.namespace, &claim.key.name)) {
                    continue;
                }
                let why = if owner.precedence < claim.precedence {
                    format!(
                        "{} comes before {}",
                        owner.precedence.describe(),
                        claim.precedence.describe()
                    )
                } else if owner.age < claim.age {
                    "it is the older Service (creationTimestamp, then uid)".to_owned()
                } else {
                    "neither Service has a creationTimestamp or uid; the first by namespace/name \
                     keeps it"
                        .to_owned()
                };
                problems.push(Problem {
                    severity: Severity::Invalid,
                    kind: "Service",
                    namespace: claim.key.namespace.clone(),
                    name: claim.key.name.clone(),
                    reason: "FrontendConflict",
                    message: format!(
                        "{}:{}/{} not served for this Service: {} serves it ({why})",
                        id.0,
                        id.1,
                        protocol_name(id.2),
                        owner.key
                    ),
                });
            }
        }
        problems
    }

    /// Compiles one Service into the desired state (which must not hold it yet).
    fn compile_one(
        &mut self,
        service: &Service,
        slices: &SlicesByService<'_>,
        changed: &mut BTreeSet<ServicePortKey>,
    ) -> CompiledService {
        let (namespace, name) = object_key(&service.metadata);
        let mut compiled = CompiledService {
            fingerprint: fingerprint(service, slices),
            health_check_node_port: health_check_node_port(service, &self.node),
            unplaced: BTreeSet::new(),
            keys: Vec::new(),
            claimed: Vec::new(),
            problems: Vec::new(),
            held: false,
        };
        let service_slices = slices
            .get(&(namespace.as_str(), name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let endpoints = ServiceEndpoints::build(service_slices, &mut compiled.problems);
        compiled.unplaced = endpoints.unplaced().collect();
        match compile_service(
            service,
            &self.node,
            &self.node_addresses,
            &endpoints,
            &mut compiled.problems,
        ) {
            Ok(ports) => {
                let age = age(service);
                let mut contested = Vec::new();
                for (key, mut port) in ports {
                    for frontend in std::mem::take(&mut port.frontends) {
                        let id = frontend_id(&frontend);
                        compiled.claimed.push(id);
                        let claim = Claim {
                            precedence: Precedence::of(frontend.kind),
                            age: age.clone(),
                            key: key.clone(),
                            kind: frontend.kind,
                        };
                        let claims = self.claims.entry(id).or_default();
                        let at = claims.binary_search(&claim).unwrap_or_else(|at| at);
                        claims.insert(at, claim);
                        // The common case, a frontend nobody else claims, needs no settling.
                        if claims.len() == 1 {
                            self.owners.insert(id, key.clone());
                            port.frontends.insert(frontend);
                        } else {
                            contested.push(id);
                        }
                    }
                    compiled.keys.push(key.clone());
                    changed.insert(key.clone());
                    if port.frontends.is_empty() {
                        self.parked.insert(key, port);
                    } else {
                        self.desired.services.insert(key, port);
                    }
                }
                compiled.claimed.sort_unstable();
                compiled.claimed.dedup();
                compiled.claimed.shrink_to_fit();
                for id in contested {
                    self.settle(id, changed);
                }
            }
            Err(Skip::Ignored) => {}
            Err(Skip::Invalid(problem)) => {
                compiled.problems.push(problem);
                compiled.held = true;
            }
        }
        if compiled.held {
            self.desired.held.insert((namespace, name));
        }
        compiled
    }
}

/// The EndpointSlices of each Service, by (namespace, service name).
fn slices_by_service(snapshot: &Snapshot) -> SlicesByService<'_> {
    let mut by_service: SlicesByService<'_> =
        HashMap::with_capacity(snapshot.endpoint_slices.len());
    for slice in &snapshot.endpoint_slices {
        if let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        {
            let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
            by_service
                .entry((namespace, service.as_str()))
                .or_default()
                .push(slice);
        }
    }
    by_service
}

/// The healthCheckNodePort an externalTrafficPolicy Local Service has (0, none or outside the
/// NodePort range: none; compile refuses the Service then).
fn health_check_node_port(service: &Service, node: &NodeContext) -> Option<u16> {
    let spec = service.spec.as_ref()?;
    if spec.external_traffic_policy.as_deref() != Some("Local") {
        return None;
    }
    u16::try_from(spec.health_check_node_port?)
        .ok()
        .filter(|port| node.node_port_range.contains(port))
}

/// The slices of a Service.
fn service_slices<'m, 'a>(
    slices: &'m SlicesByService<'a>,
    service: &'a Service,
) -> &'m [&'a EndpointSlice] {
    slices
        .get(&names(&service.metadata))
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn fingerprint(service: &Service, slices: &SlicesByService<'_>) -> Option<Fingerprint> {
    let (namespace, name) = names(&service.metadata);
    let mut slice_versions = Vec::new();
    for slice in slices.get(&(namespace, name)).into_iter().flatten() {
        slice_versions.push((
            slice.metadata.name.clone()?,
            slice.metadata.resource_version.clone()?,
        ));
    }
    slice_versions.sort();
    Some(Fingerprint {
        service: service.metadata.resource_version.clone()?,
        slices: slice_versions,
    })
}

/// Whether the Service and its slices carry the resourceVersions of `known`, without building a
/// new fingerprint (this runs for every Service on every update).
fn fingerprint_matches(
    known: Option<&Fingerprint>,
    service: &Service,
    slices: &SlicesByService<'_>,
) -> bool {
    let Some(known) = known else {
        return false;
    };
    if service.metadata.resource_version.as_deref() != Some(known.service.as_str()) {
        return false;
    }
    let (namespace, name) = names(&service.metadata);
    let current = slices
        .get(&(namespace, name))
        .map(Vec::as_slice)
        .unwrap_or_default();
    current.len() == known.slices.len()
        && current.iter().all(|slice| {
            known.slices.iter().any(|(known_name, known_version)| {
                slice.metadata.name.as_deref() == Some(known_name.as_str())
                    && slice.metadata.resource_version.as_deref() == Some(known_version.as_str())
            })
        })
}

/// (namespace, name) of an object, borrowed.
fn names(metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (&str, &str) {
    (
        metadata.namespace.as_deref().unwrap_or("default"),
        metadata.name.as_deref().unwrap_or_default(),
    )
}

enum Skip {
    /// Headless or ExternalName: nothing to program, nothing wrong.
    Ignored,
    Invalid(Problem),
}

fn object_key(
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> (String, String) {
    (
        metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        metadata.name.clone().unwrap_or_default(),
    )
}

fn invalid_service(service: &Service, reason: &'static str, message: String) -> Problem {
    let (namespace, name) = object_key(&service.metadata);
    Problem {
        severity: Severity::Invalid,
        kind: "Service",
        namespace,
        name,
        reason,
        message,
    }
}

fn unsupported(
    kind: &'static str,
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    reason: &'static str,
    message: String,
) -> Problem {
    let (namespace, name) = object_key(metadata);
    Problem {
        severity: Severity::Unsupported,
        kind,
        namespace,
        name,
        reason,
        message,
    }
}

fn snat_address(snapshot: &Snapshot, node: &NodeContext) -> Option<Ipv4Addr> {
    snapshot
        .node
        .iter()
        .filter_map(|node| node.status.as_ref()?.addresses.as_ref())
        .flatten()
        .filter(|address| address.type_ == "InternalIP")
        .find_map(|address| address.address.parse().ok())
        .or_else(|| node.fallback_addresses.first().copied())
}

/// The node's IPv4 addresses that serve NodePorts.
fn node_addresses(snapshot: &Snapshot, node: &NodeContext) -> Vec<Ipv4Addr> {
    let from_node: Vec<Ipv4Addr> = snapshot
        .node
        .iter()
        .filter_map(|node| node.status.as_ref()?.addresses.as_ref())
        .flatten()
        .filter(|address| address.type_ == "InternalIP" || address.type_ == "ExternalIP")
        .filter_map(|address| address.address.parse().ok())
        .collect();
    let all = if from_node.is_empty() {
        node.fallback_addresses.clone()
    } else {
        from_node
    };
    let mut selected: Vec<Ipv4Addr> = all
        .into_iter()
        .filter(|addr| {
            node.nodeport_cidrs.is_empty()
                || node.nodeport_cidrs.iter().any(|cidr| cidr.contains(*addr))
        })
        .collect();
    selected.sort();
    selected.dedup();
    selected
}

fn compile_service(
    service: &Service,
    node: &NodeContext,
    node_addresses: &[Ipv4Addr],
    endpoints: &ServiceEndpoints,
    problems: &mut Vec<Problem>,
) -> Result<BTreeMap<ServicePortKey, DesiredService>, Skip> {
    let (namespace, name) = object_key(&service.metadata);
    let invalid = |reason, message| Skip::Invalid(invalid_service(service, reason, message));
    if name.is_empty() {
        return Err(invalid(
            "MissingName",
            "a Service needs metadata.name; skipped".into(),
        ));
    }
    let Some(spec) = &service.spec else {
        return Err(Skip::Ignored);
    };
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if service_type == "ExternalName" {
        return Err(Skip::Ignored);
    }

    // ClusterIPs: clusterIPs (dual-stack) or clusterIP; "None" is headless.
    let cluster_ips: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) if !ip.is_empty() => vec![ip.as_str()],
        _ => vec![],
    };
    if cluster_ips.first() == Some(&"None") {
        return Err(Skip::Ignored);
    }
    let cluster_ips = parse_ips(&cluster_ips, "clusterIP")
        .map_err(|message| invalid("InvalidClusterIP", message))?;
    let external_ips = parse_ips(
        &spec
            .external_ips
            .iter()
            .flatten()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        "externalIP",
    )
    .map_err(|message| invalid("InvalidExternalIP", message))?;
    let ingress_ips: Vec<&str> = service
        .status
        .iter()
        .filter_map(|status| status.load_balancer.as_ref()?.ingress.as_ref())
        .flatten()
        .filter_map(|ingress| ingress.ip.as_deref())
        .collect();
    let ingress_ips = parse_ips(&ingress_ips, "loadBalancer ingress IP")
        .map_err(|message| invalid("InvalidLoadBalancerIP", message))?;
    let v6 = cluster_ips
        .iter()
        .chain(&external_ips)
        .chain(&ingress_ips)
        .filter(|ip| ip.is_ipv6())
        .count();
    if v6 > 0 {
        problems.push(unsupported(
            "Service",
            &service.metadata,
            "IPv6NotSupported",
            format!("{v6} IPv6 address(es) not programmed (IPv4 only in this version)"),
        ));
    }
    let v4 = |ips: &[IpAddr]| -> Vec<Ipv4Addr> {
        ips.iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect()
    };
    let (cluster_ips, external_ips, ingress_ips) =
        (v4(&cluster_ips), v4(&external_ips), v4(&ingress_ips));
    let external_ips = allowed_external_ips(service, external_ips, node, problems);
    let node_ports_wanted = service_type == "NodePort" || service_type == "LoadBalancer";
    let affinity_timeout_s = affinity_timeout(service);
    let maglev = match service
        .metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(LOAD_BALANCING_ANNOTATION))
        .map(String::as_str)
    {
        None => node.default_maglev,
        Some("maglev") => true,
        Some("random") => false,
        Some(other) => {
            return Err(invalid(
                "InvalidLoadBalancing",
                format!("{LOAD_BALANCING_ANNOTATION}: {other:?} is neither random nor maglev"),
            ));
        }
    };
    let algorithm_flags = if maglev { service_flags::MAGLEV } else { 0 };
    let policy = Policy {
        external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        source_ranges: source_ranges(service, problems)
            .map_err(|message| invalid("InvalidSourceRange", message))?,
    };
    check_health_check_node_port(spec, node)
        .map_err(|message| invalid("InvalidHealthCheckNodePort", message))?;

    let ports = spec.ports.as_deref().unwrap_or_default();
    let mut seen = BTreeSet::new();
    let mut desired = BTreeMap::new();
    for port in ports {
        let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => proto::TCP,
            "UDP" => proto::UDP,
            "SCTP" => {
                problems.push(unsupported(
                    "Service",
                    &service.metadata,
                    "SCTPNotSupported",
                    format!("port {} is SCTP, not programmed", port.port),
                ));
                continue;
            }
            other => {
                return Err(invalid(
                    "InvalidProtocol",
                    format!("port {}: unknown protocol {other:?}", port.port),
                ));
            }
        };
        let number = valid_port(port.port).ok_or_else(|| {
            invalid(
                "InvalidPort",
                format!("port {} is outside 1..=65535", port.port),
            )
        })?;
        check_target_port(port).map_err(|message| invalid("InvalidTargetPort", message))?;
        if !seen.insert((number, protocol)) {
            return Err(invalid(
                "DuplicatePort",
                format!(
                    "port {number}/{} appears twice",
                    port.protocol.as_deref().unwrap_or("TCP")
                ),
            ));
        }
        let port_name = port.name.clone().unwrap_or_default();
        let mut frontends = BTreeSet::new();
        let mut add = |addr, port, kind| {
            frontends.insert(Frontend {
                addr,
                port,
                proto: protocol,
                kind,
            });
        };
        for &ip in &cluster_ips {
            add(ip, number, service_flags::CLUSTER_IP);
        }
        for &ip in &external_ips {
            add(ip, number, service_flags::EXTERNAL_IP);
        }
        for &ip in &ingress_ips {
            add(ip, number, service_flags::LOAD_BALANCER);
        }
        if node_ports_wanted
            && let Some(node_port) =
                node_port(port, node).map_err(|message| invalid("InvalidNodePort", message))?
        {
            for &addr in node_addresses {
                add(addr, node_port, service_flags::NODE_PORT);
            }
        }
        let backends = endpoints.backends(&port_name, protocol, node);
        if backends.len() > limits::MAX_BACKENDS_PER_SERVICE as usize {
            return Err(invalid(
                "TooManyEndpoints",
                format!(
                    "port {port_name:?} has {} endpoints, more than the {} a service can hold",
                    backends.len(),
                    limits::MAX_BACKENDS_PER_SERVICE
                ),
            ));
        }
        for (scope, frontends, flags) in policy.split(frontends) {
            let backends = if flags & service_flags::LOCAL_ONLY != 0 {
                backends
                    .iter()
                    .filter(|b| b.flags & backend_flags::LOCAL != 0)
                    .copied()
                    .collect()
            } else {
                backends.clone()
            };
            let source_ranges = if flags & service_flags::SOURCE_RANGES != 0 {
                policy.source_ranges.clone().unwrap_or_default()
            } else {
                BTreeSet::new()
            };
            let key = ServicePortKey {
                namespace: namespace.clone(),
                name: name.clone(),
                port_name: port_name.clone(),
                proto: protocol,
                scope,
            };
            desired.insert(
                key,
                DesiredService {
                    frontends,
                    backends,
                    affinity_timeout_s,
                    flags: flags | algorithm_flags,
                    source_ranges,
                },
            );
        }
    }
    Ok(desired)
}

/// The externalIPs inside `--external-ip-cidrs` (all without it); a problem for each other one.
fn allowed_external_ips(
    service: &Service,
    external_ips: Vec<Ipv4Addr>,
    node: &NodeContext,
    problems: &mut Vec<Problem>,
) -> Vec<Ipv4Addr> {
    if node.external_ip_cidrs.is_empty() {
        return external_ips;
    }
    let (allowed, refused): (Vec<Ipv4Addr>, Vec<Ipv4Addr>) = external_ips
        .into_iter()
        .partition(|ip| node.external_ip_cidrs.iter().any(|cidr| cidr.contains(*ip)));
    for ip in refused {
        problems.push(invalid_service(
            service,
            "ExternalIPNotAllowed",
            format!("externalIP {ip} is outside --external-ip-cidrs; not served"),
        ));
    }
    allowed
}

/// What decides which frontends of a Service port share a selection table.
struct Policy {
    /// externalTrafficPolicy Local: NodePorts, externalIPs and LoadBalancer IPs reach node-local
    /// endpoints only, keep the client address, and drop when there is none.
    external_local: bool,
    /// internalTrafficPolicy Local: the same for the ClusterIPs.
    internal_local: bool,
    /// loadBalancerSourceRanges: only these clients may use the LoadBalancer IPs. Some(empty)
    /// when the spec lists only ranges this version does not program (IPv6): then no client may.
    source_ranges: Option<BTreeSet<(Ipv4Addr, u8)>>,
}

impl Policy {
    /// The port's frontends grouped by table, each group with its policy flags; empty groups left
    /// out. One group (scope All) when nothing sets the frontends apart.
    fn split(&self, frontends: BTreeSet<Frontend>) -> Vec<(Scope, BTreeSet<Frontend>, u32)> {
        if !self.external_local && !self.internal_local && self.source_ranges.is_none() {
            return if frontends.is_empty() {
                vec![]
            } else {
                vec![(Scope::All, frontends, 0)]
            };
        }
        let local = |yes: bool| if yes { service_flags::LOCAL_ONLY } else { 0 };
        let of_kind = |kinds: u32| -> BTreeSet<Frontend> {
            frontends
                .iter()
                .filter(|f| f.kind & kinds != 0)
                .copied()
                .collect()
        };
        let ranged = self.source_ranges.is_some();
        let external_kinds = service_flags::NODE_PORT
            | service_flags::EXTERNAL_IP
            | if ranged {
                0
            } else {
                service_flags::LOAD_BALANCER
            };
        let mut groups = vec![
            (
                Scope::Internal,
                of_kind(service_flags::CLUSTER_IP),
                local(self.internal_local),
            ),
            (
                Scope::External,
                of_kind(external_kinds),
                local(self.external_local),
            ),
        ];
        if ranged {
            groups.push((
                Scope::LoadBalancer,
                of_kind(service_flags::LOAD_BALANCER),
                local(self.external_local) | service_flags::SOURCE_RANGES,
            ));
        }
        groups.retain(|(_, frontends, _)| !frontends.is_empty());
        groups
    }
}

/// loadBalancerSourceRanges as (network address, prefix length); None when the spec has none.
///
/// Any range restricts: IPv6 ranges are not programmed (IPv4 only in this version), so a list of
/// IPv6 ranges alone lets no IPv4 client in, rather than every client. A range with host bits set
/// is masked (as kube-proxy does), with a Warning: the datapath's LPM trie keeps one entry per
/// (service, prefix), so `10.1.2.3/8` and `10.0.0.0/8` must be one member of the set, or removing
/// one of them would remove the entry the other still needs.
fn source_ranges(
    service: &Service,
    problems: &mut Vec<Problem>,
) -> Result<Option<BTreeSet<(Ipv4Addr, u8)>>, String> {
    let texts = service
        .spec
        .as_ref()
        .and_then(|spec| spec.load_balancer_source_ranges.as_deref())
        .unwrap_or_default();
    if texts.is_empty() {
        return Ok(None);
    }
    let mut ranges = BTreeSet::new();
    let mut v6 = 0;
    for text in texts {
        let text = text.trim();
        if text.contains(':') {
            check_ipv6_cidr(text)?;
            v6 += 1;
            continue;
        }
        let cidr: Ipv4Cidr = text.parse()?;
        let network = cidr.network();
        if network != cidr {
            problems.push(Problem {
                severity: Severity::Warning,
                ..invalid_service(
                    service,
                    "SourceRangeHostBits",
                    format!(
                        "loadBalancerSourceRanges {text:?} has host bits set; used as {}/{}",
                        network.addr, network.prefix_len
                    ),
                )
            });
        }
        ranges.insert((network.addr, network.prefix_len));
    }
    if v6 > 0 {
        let consequence = if ranges.is_empty() {
            "no IPv4 client may use the LoadBalancer IPs"
        } else {
            "IPv4 clients must be inside the IPv4 ranges"
        };
        problems.push(unsupported(
            "Service",
            &service.metadata,
            "IPv6SourceRangesNotSupported",
            format!(
                "{v6} IPv6 loadBalancerSourceRange(s) not programmed (IPv4 only in this version); {consequence}"
            ),
        ));
    }
    Ok(Some(ranges))
}

fn check_ipv6_cidr(text: &str) -> Result<(), String> {
    let valid = text.split_once('/').is_some_and(|(addr, len)| {
        addr.parse::<std::net::Ipv6Addr>().is_ok() && len.parse::<u8>().is_ok_and(|len| len <= 128)
    });
    if valid {
        Ok(())
    } else {
        Err(format!("{text:?} is not an IPv6 CIDR (address/prefix)"))
    }
}

/// An externalTrafficPolicy Local Service's healthCheckNodePort, when set, must be in the
/// NodePort range: the agent serves HTTP on it on every node address.
fn check_health_check_node_port(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    node: &NodeContext,
) -> Result<(), String> {
    let Some(port) = spec.health_check_node_port.filter(|&port| port != 0) else {
        return Ok(());
    };
    match u16::try_from(port) {
        Ok(port) if node.node_port_range.contains(&port) => Ok(()),
        _ => Err(format!(
            "healthCheckNodePort {port} is outside {}-{}",
            node.node_port_range.start(),
            node.node_port_range.end()
        )),
    }
}

/// A targetPort is a port number (1-65535) or the name of a container port (IANA_SVC_NAME:
/// 1-15 lowercase letters, digits and inner single hyphens, with a letter).
fn check_target_port(port: &ServicePort) -> Result<(), String> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    match &port.target_port {
        None => Ok(()),
        Some(IntOrString::Int(number)) if valid_port(*number).is_some() => Ok(()),
        Some(IntOrString::Int(number)) => Err(format!(
            "port {}: targetPort {number} is outside 1-65535",
            port.port
        )),
        Some(IntOrString::String(name)) if is_port_name(name) => Ok(()),
        Some(IntOrString::String(name)) => Err(format!(
            "port {}: targetPort {name:?} is neither a port number nor a port name",
            port.port
        )),
    }
}

fn is_port_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-')
        && name.bytes().any(|byte| byte.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

/// The port's nodePort when it has one; an error for one outside the range.
fn node_port(port: &ServicePort, node: &NodeContext) -> Result<Option<u16>, String> {
    let Some(node_port) = port.node_port.filter(|&p| p != 0) else {
        return Ok(None);
    };
    match u16::try_from(node_port) {
        Ok(p) if node.node_port_range.contains(&p) => Ok(Some(p)),
        _ => Err(format!(
            "nodePort {node_port} is outside {}-{}",
            node.node_port_range.start(),
            node.node_port_range.end()
        )),
    }
}

fn valid_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|&port| port != 0)
}

fn parse_ips(texts: &[&str], what: &str) -> Result<Vec<IpAddr>, String> {
    texts
        .iter()
        .map(|text| {
            text.parse()
                .map_err(|_| format!("{what} {text:?} is not an IP address"))
        })
        .collect()
}

fn affinity_timeout(service: &Service) -> u32 {
    let spec = service.spec.as_ref();
    if spec.and_then(|spec| spec.session_affinity.as_deref()) != Some("ClientIP") {
        return 0;
    }
    spec.and_then(|spec| spec.session_affinity_config.as_ref())
        .and_then(|config| config.client_ip.as_ref())
        .and_then(|client_ip| client_ip.timeout_seconds)
        .and_then(|timeout| u32::try_from(timeout).ok())
        .filter(|&timeout| timeout > 0)
        .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S)
}

/// One endpoint of one port of a Service, as the slices describe it.
#[derive(Clone, Debug)]
struct SliceEndpoint {
    addr: Ipv4Addr,
    port: u16,
    proto: u8,
    port_name: String,
    node_name: Option<String>,
    ready: bool,
    serving: bool,
    terminating: bool,
}

impl SliceEndpoint {
    /// Whether the endpoint runs on `node`: its nodeName says so, or, without one, the node's
    /// routes do.
    fn is_on(&self, node: &NodeContext) -> bool {
        match &self.node_name {
            Some(name) => *name == node.node_name,
            None => node.routed_local.contains(&self.addr),
        }
    }
}

/// The endpoints of one Service, from all its EndpointSlices.
struct ServiceEndpoints {
    endpoints: Vec<SliceEndpoint>,
}

impl ServiceEndpoints {
    fn build(slices: &[&EndpointSlice], problems: &mut Vec<Problem>) -> Self {
        let mut endpoints = Vec::new();
        for slice in slices {
            let (namespace, name) = object_key(&slice.metadata);
            if slice.address_type != "IPv4" {
                if slice.address_type == "IPv6" {
                    problems.push(unsupported(
                        "EndpointSlice",
                        &slice.metadata,
                        "IPv6NotSupported",
                        "IPv6 endpoints are not programmed (IPv4 only in this version)".into(),
                    ));
                }
                continue;
            }
            for port in slice.ports.iter().flatten() {
                let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
                    "TCP" => proto::TCP,
                    "UDP" => proto::UDP,
                    _ => continue,
                };
                let Some(number) = port.port.and_then(valid_port) else {
                    problems.push(Problem {
                        severity: Severity::Invalid,
                        kind: "EndpointSlice",
                        namespace: namespace.clone(),
                        name: name.clone(),
                        reason: "InvalidPort",
                        message: format!(
                            "port {:?} of {:?} is outside 1..=65535",
                            port.port, port.name
                        ),
                    });
                    continue;
                };
                for endpoint in &slice.endpoints {
                    match slice_endpoint(
                        endpoint,
                        number,
                        protocol,
                        port.name.clone().unwrap_or_default(),
                    ) {
                        Ok(endpoint) => endpoints.push(endpoint),
                        Err(message) => problems.push(Problem {
                            severity: Severity::Invalid,
                            kind: "EndpointSlice",
                            namespace: namespace.clone(),
                            name: name.clone(),
                            reason: "InvalidEndpoint",
                            message,
                        }),
                    }
                }
            }
        }
        Self { endpoints }
    }

    /// The addresses of the endpoints without a nodeName.
    fn unplaced(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.endpoints
            .iter()
            .filter(|endpoint| endpoint.node_name.is_none())
            .map(|endpoint| endpoint.addr)
    }

    /// The backends new flows of one Service port select from.
    fn backends(&self, port_name: &str, protocol: u8, node: &NodeContext) -> BTreeSet<Backend> {
        let candidates: Vec<&SliceEndpoint> = self
            .endpoints
            .iter()
            .filter(|endpoint| endpoint.port_name == port_name && endpoint.proto == protocol)
            .collect();
        let ready: Vec<&&SliceEndpoint> = candidates
            .iter()
            .filter(|endpoint| endpoint.ready)
            .collect();
        // KEP-1669: with no ready endpoint, fall back to those still serving while terminating.
        let chosen: Vec<&&SliceEndpoint> = if ready.is_empty() {
            candidates
                .iter()
                .filter(|endpoint| endpoint.serving && endpoint.terminating)
                .collect()
        } else {
            ready
        };
        let mut by_address: BTreeMap<(Ipv4Addr, u16), Backend> = BTreeMap::new();
        for endpoint in chosen {
            let mut flags = 0;
            if endpoint.is_on(node) {
                flags |= backend_flags::LOCAL;
            }
            if endpoint.terminating {
                flags |= backend_flags::TERMINATING;
            }
            // The same endpoint in two slices (during a slice rebalance) counts once.
            by_address
                .entry((endpoint.addr, endpoint.port))
                .or_insert(Backend {
                    addr: endpoint.addr,
                    port: endpoint.port,
                    proto: protocol,
                    flags,
                });
        }
        by_address.into_values().collect()
    }
}

fn slice_endpoint(
    endpoint: &Endpoint,
    port: u16,
    protocol: u8,
    port_name: String,
) -> Result<SliceEndpoint, String> {
    // The first address is the canonical one (discovery/v1 API); kube-proxy uses it alone.
    let text = endpoint
        .addresses
        .first()
        .ok_or("endpoint without an address")?;
    let addr: Ipv4Addr = text
        .parse()
        .map_err(|_| format!("endpoint address {text:?} is not an IPv4 address"))?;
    let conditions = endpoint.conditions.as_ref();
    // Unset ready means ready; unset serving means as ready; unset terminating means not.
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    Ok(SliceEndpoint {
        addr,
        port,
        proto: protocol,
        port_name,
        node_name: endpoint.node_name.clone(),
        ready,
        serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
        terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
    })
}
