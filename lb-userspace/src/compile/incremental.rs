//! compile() kept up to date across snapshots ([`Compiler`]): which Services changed since the
//! previous snapshot, found by pointer, compiled again; which Service port owns a frontend that
//! several claim ([`Claim`]), settled in place as claims come and go.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_common::service_flags;

use super::{
    health_check::{ProbeTarget, ProbedEndpoint},
    model::{
        Desired, DesiredService, Family, Frontend, NodeContext, NodePortAddresses, Problem,
        ServicePortKey, Severity, protocol_name,
    },
    service::{ServiceEndpoints, Skip, compile_service, health_check_node_port, object_key},
};
use crate::source::Snapshot;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A frontend as the datapath keys it: (address, port, protocol, scope). A frontend's entry
/// for this node's clients is a claim of its own, settled like the frontend's.
type FrontendId = (IpAddr, u16, u8, u8);

fn frontend_id(frontend: &Frontend) -> FrontendId {
    (
        frontend.addr,
        frontend.port,
        frontend.proto,
        frontend.key().scope(),
    )
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
    node_addresses: Vec<IpAddr>,
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
    snat_address6: Option<Ipv6Addr>,
    /// The objects of the previous update, indexed, to find what changed by pointer.
    previous: Option<Previous>,
    /// Problems of EndpointSlices whose Service does not exist, by (namespace, service).
    orphans: BTreeMap<(String, String), Vec<Problem>>,
    /// The healthCheckNodePort of every externalTrafficPolicy Local Service that has one.
    health_check_ports: BTreeMap<(String, String), u16>,
    /// Endpoint addresses without a nodeName, with how many compiled Services have them.
    unplaced: BTreeMap<IpAddr, usize>,
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
    unplaced: BTreeSet<IpAddr>,
    /// Its local endpoints this node health-checks (sorted, each once).
    probes: Vec<ProbeTarget>,
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
            snat_address6: None,
            previous: None,
            orphans: BTreeMap::new(),
            health_check_ports: BTreeMap::new(),
            unplaced: BTreeMap::new(),
            stale: BTreeSet::new(),
        }
    }

    /// The addresses of the endpoints without a nodeName, as of the last update: the ones whose
    /// place the caller finds out (from the node's routes) for [`Self::set_routed_local`].
    pub fn unplaced_endpoints(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.unplaced.keys().copied()
    }

    /// Sets which endpoint addresses without a nodeName are on this node
    /// ([`NodeContext::routed_local`]). The Services with an endpoint whose place changed are
    /// compiled again on the next update; returns whether there are any.
    pub fn set_routed_local(&mut self, local: BTreeSet<IpAddr>) -> bool {
        let moved: BTreeSet<IpAddr> = self
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

    /// Takes the snapshot's Nodes that take DSR options, and marks stale the compiled Services
    /// with an endpoint on a Node that came or went: one Node's agent marking it (at its first
    /// start, after each boot) recompiles the Services with endpoints there, not all of them.
    /// The slices are read from the snapshot, so the compiled Services keep no node names.
    fn mark_direct_return_nodes(&mut self, snapshot: &Snapshot) {
        let moved: BTreeSet<&String> = self
            .node
            .direct_return_nodes
            .symmetric_difference(&snapshot.direct_return_nodes)
            .collect();
        let affected: Vec<(String, String)> = snapshot
            .endpoint_slices
            .iter()
            .filter(|slice| {
                slice.endpoints.iter().any(|endpoint| {
                    endpoint
                        .node_name
                        .as_ref()
                        .is_some_and(|name| moved.contains(name))
                })
            })
            .filter_map(|slice| slice_service(slice))
            .filter(|(namespace, name)| {
                self.services
                    .get(namespace)
                    .is_some_and(|by_name| by_name.contains_key(name))
            })
            .collect();
        self.stale.extend(affected);
        self.node.direct_return_nodes = snapshot.direct_return_nodes.clone();
    }

    /// Tells the compiler which local endpoints the health probes hold as failed. Returns
    /// whether that changes any compiled Service's endpoints (they are compiled again on the
    /// next update); a verdict about an endpoint no Service probes changes nothing.
    pub fn set_health_failed(&mut self, failed: BTreeSet<ProbedEndpoint>) -> bool {
        let moved: BTreeSet<(String, String)> = self
            .node
            .health_failed
            .symmetric_difference(&failed)
            .map(|endpoint| (endpoint.namespace.clone(), endpoint.name.clone()))
            .collect();
        self.node.health_failed = failed;
        let affected: Vec<(String, String)> = moved
            .into_iter()
            .filter(|(namespace, name)| {
                self.services
                    .get(namespace)
                    .is_some_and(|by_name| by_name.contains_key(name))
            })
            .collect();
        let any = !affected.is_empty();
        self.stale.extend(affected);
        any
    }

    /// Every local endpoint of the compiled Services that asks to be health-checked, with how.
    pub fn probe_targets(&self) -> impl Iterator<Item = &ProbeTarget> + '_ {
        self.compiled().flat_map(|compiled| compiled.probes.iter())
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
    pub fn node_port_addresses(&self) -> &[IpAddr] {
        &self.node_addresses
    }

    /// The node address that flows to backends on other nodes are SNATed to: the Node's first
    /// IPv4 InternalIP, else the first configured fallback address.
    pub fn snat_address(&self) -> Option<Ipv4Addr> {
        self.snat_address
    }

    /// The same for IPv6 flows: the Node's first IPv6 InternalIP, else the first configured
    /// IPv6 fallback address.
    pub fn snat_address6(&self) -> Option<Ipv6Addr> {
        self.snat_address6
    }

    pub fn update(&mut self, snapshot: &Snapshot) -> Update {
        self.snat_address = snat_address(snapshot, &self.node, |addr| match addr {
            IpAddr::V4(addr) => Some(addr),
            IpAddr::V6(_) => None,
        });
        self.snat_address6 = snat_address(snapshot, &self.node, |addr| match addr {
            IpAddr::V6(addr) => Some(addr),
            IpAddr::V4(_) => None,
        });
        let node_addresses = node_addresses(snapshot, &self.node);
        if node_addresses != self.node_addresses {
            self.node_addresses = node_addresses;
            self.full = true;
        }
        let zone = node_zone(snapshot);
        if zone != self.node.zone {
            self.node.zone = zone;
            self.full = true;
        }
        if self.node.direct_return && snapshot.direct_return_nodes != self.node.direct_return_nodes
        {
            self.mark_direct_return_nodes(snapshot);
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
            probes: Vec::new(),
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
            &mut compiled.probes,
        ) {
            Ok(ports) => {
                // Two ports with one target port probe it once.
                compiled.probes.sort_unstable();
                compiled.probes.dedup();
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
                        // Most frontends have one claim: a Vec's first push would reserve
                        // four (a Claim is 136 bytes): 3.6 MiB at 10k Services.
                        let claims = self
                            .claims
                            .entry(id)
                            .or_insert_with(|| Vec::with_capacity(1));
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
            Err(Skip::Ignored) => compiled.probes.clear(),
            Err(Skip::Invalid(problem)) => {
                // Held as installed before: nothing new to probe.
                compiled.probes.clear();
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

/// The Node's `topology.kubernetes.io/zone` label.
fn node_zone(snapshot: &Snapshot) -> Option<String> {
    snapshot
        .node
        .as_ref()?
        .metadata
        .labels
        .as_ref()?
        .get(ZONE_LABEL)
        .cloned()
}

/// The well-known label of a Node's zone.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The node's first InternalIP of a family (`of_family` picks it), else its first fallback
/// address of that family.
fn snat_address<A>(
    snapshot: &Snapshot,
    node: &NodeContext,
    of_family: impl Fn(IpAddr) -> Option<A>,
) -> Option<A> {
    snapshot
        .node
        .iter()
        .filter_map(|node| node.status.as_ref()?.addresses.as_ref())
        .flatten()
        .filter(|address| address.type_ == "InternalIP")
        .find_map(|address| address.address.parse().ok().and_then(&of_family))
        .or_else(|| node.fallback_addresses.iter().copied().find_map(&of_family))
}

/// The node's addresses (both families) that serve NodePorts.
fn node_addresses(snapshot: &Snapshot, node: &NodeContext) -> Vec<IpAddr> {
    let from_node: Vec<IpAddr> = snapshot
        .node
        .iter()
        .flat_map(|this| match node.nodeport_addresses {
            NodePortAddresses::Primary => crate::source::primary_addresses(this),
            _ => crate::source::addresses_of(this).collect(),
        })
        .collect();
    let all = if from_node.is_empty() {
        node.fallback_addresses.clone()
    } else {
        from_node
    };
    let mut selected: Vec<IpAddr> = match &node.nodeport_addresses {
        NodePortAddresses::All => all,
        NodePortAddresses::Primary => crate::source::first_of_each_family(all),
        // As kube-proxy reads --nodeport-addresses: per family, and a family the CIDRs do not
        // mention keeps all its addresses.
        NodePortAddresses::Cidrs(cidrs) => all
            .into_iter()
            .filter(|addr| {
                let family = Family::of(*addr);
                let mut of_family = cidrs
                    .iter()
                    .filter(|cidr| cidr.family() == family)
                    .peekable();
                of_family.peek().is_none() || of_family.any(|cidr| cidr.contains(*addr))
            })
            .collect(),
    };
    selected.sort();
    selected.dedup();
    selected
}
