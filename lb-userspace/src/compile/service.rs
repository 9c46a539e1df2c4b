//! Compiling one Service and its endpoints: [`compile_service`] turns a Service's spec and the
//! endpoints of its EndpointSlices ([`ServiceEndpoints`]) into the desired state of each of its
//! ports, or skips it with a [`Problem`]; an invalid endpoint or slice is skipped alone.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort, ServiceSpec},
    discovery::v1::{Endpoint, EndpointSlice},
};
use lb_common::{backend_flags, limits, proto, service_flags};

use super::health_check::{self, HealthCheck, ProbeTarget, ProbedEndpoint, without_failed};
use super::model::{
    Backend, Desired, DesiredService, Family, Frontend, IpCidr, NodeContext, Problem, Scope,
    ServicePortKey, Severity,
};
use crate::source::Snapshot;

/// sessionAffinityConfig.clientIP.timeoutSeconds when unset (the API's default).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// The annotation with which a Service chooses how XDP picks backends for new flows: `random`
/// (kube-proxy's way, the default) or `maglev` (consistent hashing).
pub const LOAD_BALANCING_ANNOTATION: &str = "lb.io/load-balancing";

/// The annotation that weighs a Service's endpoints: comma-separated `key=weight`, the key an
/// endpoint's address, its pod's name (the EndpointSlice's targetRef), a pod-name prefix
/// ending in `*` (the longest matching one wins), or `*` alone for every other endpoint; the
/// weight 0 to [`MAX_ENDPOINT_WEIGHT`]. An endpoint no key matches weighs 1. A canary at 10%:
/// `web-stable-*=9,web-canary-*=1`.
pub const ENDPOINT_WEIGHTS_ANNOTATION: &str = "lb.io/endpoint-weights";

/// The largest endpoint weight.
pub const MAX_ENDPOINT_WEIGHT: u32 = 1000;

/// The ClusterIPs of every Service the desired state holds (skipped for bad input), as far
/// as its spec gives them: what identifies its installed state after a restart
/// ([`crate::reconcile::Reconciler::recover_held`]).
pub fn held_cluster_ips(
    snapshot: &Snapshot,
    desired: &Desired,
) -> BTreeMap<(String, String), BTreeSet<IpAddr>> {
    snapshot
        .services
        .iter()
        .filter_map(|service| {
            let owner = object_key(&service.metadata);
            if !desired.held.contains(&owner) {
                return None;
            }
            let spec = service.spec.as_ref()?;
            let addresses: BTreeSet<IpAddr> = spec
                .cluster_ips
                .iter()
                .flatten()
                .chain(&spec.cluster_ip)
                .filter_map(|text| text.parse().ok())
                .collect();
            (!addresses.is_empty()).then_some((owner, addresses))
        })
        .collect()
}

/// The healthCheckNodePort an externalTrafficPolicy Local Service has (0, none or outside the
/// NodePort range: none; compile refuses the Service then).
pub(super) fn health_check_node_port(service: &Service, node: &NodeContext) -> Option<u16> {
    let spec = service.spec.as_ref()?;
    if spec.external_traffic_policy.as_deref() != Some("Local") {
        return None;
    }
    u16::try_from(spec.health_check_node_port?)
        .ok()
        .filter(|port| node.node_port_range.contains(port))
}

pub(super) enum Skip {
    /// Headless or ExternalName: nothing to program, nothing wrong.
    Ignored,
    Invalid(Problem),
}

pub(super) fn object_key(
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

/// The first of the spec's fields of fixed values that holds a value the API server refuses
/// (`type: Nodeport`), which a hand-written manifest may have: read as the default, the Service
/// would be served otherwise than meant. The file source checks its Services with it; objects
/// from the API server are not checked, so that a value a later Kubernetes adds is read as
/// kube-proxy reads it rather than losing its Service. Empty is the default, as the API server
/// fills it in.
pub fn unsupported_value(spec: &ServiceSpec) -> Option<String> {
    let single: [(&str, Option<&String>, &[&str]); 5] = [
        (
            "spec.type",
            spec.type_.as_ref(),
            &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"],
        ),
        (
            "spec.externalTrafficPolicy",
            spec.external_traffic_policy.as_ref(),
            &["Cluster", "Local"],
        ),
        (
            "spec.internalTrafficPolicy",
            spec.internal_traffic_policy.as_ref(),
            &["Cluster", "Local"],
        ),
        (
            "spec.sessionAffinity",
            spec.session_affinity.as_ref(),
            &["None", "ClientIP"],
        ),
        (
            "spec.ipFamilyPolicy",
            spec.ip_family_policy.as_ref(),
            &["SingleStack", "PreferDualStack", "RequireDualStack"],
        ),
    ];
    let families = spec
        .ip_families
        .iter()
        .flatten()
        .map(|family| ("spec.ipFamilies", Some(family), &["IPv4", "IPv6"][..]));
    single
        .into_iter()
        .chain(families)
        .find_map(|(field, value, supported)| {
            let value = value.filter(|value| !value.is_empty())?;
            (!supported.contains(&value.as_str()))
                .then(|| format!("{field}: {value:?} is not one of {}", supported.join(", ")))
        })
}

pub(super) fn compile_service(
    service: &Service,
    node: &NodeContext,
    node_addresses: &[IpAddr],
    endpoints: &ServiceEndpoints,
    problems: &mut Vec<Problem>,
    probes: &mut Vec<ProbeTarget>,
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
        // ipMode Proxy (KEP-1860): the load balancer proxies to the nodes, and traffic to its
        // IP, also from this node, must reach it; kube-proxy programs no rule for such an IP.
        .filter(|ingress| ingress.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|ingress| ingress.ip.as_deref())
        .collect();
    let ingress_ips = parse_ips(&ingress_ips, "loadBalancer ingress IP")
        .map_err(|message| invalid("InvalidLoadBalancerIP", message))?;
    // A Service is served in the families of its ClusterIPs (a dual-stack one in both), as
    // kube-proxy's per-family proxiers serve it; other addresses are not.
    // Without a ClusterIP (a hand-written manifest; the API server always allocates one), the
    // families the spec asks for, else IPv4, so that its other frontends are served as before.
    let families: BTreeSet<Family> = if cluster_ips.is_empty() {
        let asked: BTreeSet<Family> = spec
            .ip_families
            .iter()
            .flatten()
            .filter_map(|family| match family.as_str() {
                "IPv4" => Some(Family::V4),
                "IPv6" => Some(Family::V6),
                _ => None,
            })
            .collect();
        if asked.is_empty() {
            [Family::V4].into()
        } else {
            asked
        }
    } else {
        cluster_ips.iter().map(|ip| Family::of(*ip)).collect()
    };
    let (external_ips, ingress_ips) = (
        of_families(service, external_ips, &families, "externalIP", problems),
        of_families(service, ingress_ips, &families, "LoadBalancer IP", problems),
    );
    let node_ports_wanted = service_type == "NodePort" || service_type == "LoadBalancer";
    let external_ips = allowed_external_ips(service, external_ips, node, problems);
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
    let algorithm_flags = if maglev { service_flags::MAGLEV } else { 0 }
        | if node.direct_return {
            service_flags::DIRECT_RETURN
        } else {
            0
        };
    let policy = Policy {
        external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        source_ranges: source_ranges(service, problems)
            .map_err(|message| invalid("InvalidSourceRange", message))?,
    };
    check_health_check_node_port(spec, node)
        .map_err(|message| invalid("InvalidHealthCheckNodePort", message))?;
    let weights = endpoint_weights(service, problems);
    let health_check = health_check(service, problems);
    // The endpoints (address, target port) of this Service the probes hold as failed; none
    // without a health check, whatever a probe said before the annotation went.
    let health_failed: BTreeSet<(IpAddr, u16)> = match &health_check {
        Some(_) => node
            .health_failed
            .iter()
            .filter(|endpoint| endpoint.namespace == namespace && endpoint.name == name)
            .map(|endpoint| (endpoint.addr, endpoint.port))
            .collect(),
        None => BTreeSet::new(),
    };

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
                    "SCTPClusterIPFromPods",
                    format!(
                        "port {} is SCTP: served on node NICs (NodePort, externalIPs, \
                         LoadBalancer, ClusterIP routed to the node); connections from pods and \
                         the node to its ClusterIP are not translated (the kernel runs no socket \
                         hook for SCTP)",
                        port.port
                    ),
                ));
                proto::SCTP
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
        // A nodePort outside the range costs only the NodePort frontends of this port: the
        // ClusterIP and the other frontends keep working.
        let node_port = if node_ports_wanted {
            node_port(port, node).unwrap_or_else(|message| {
                problems.push(invalid_service(
                    service,
                    "InvalidNodePort",
                    format!("{message}; its NodePort frontends are skipped"),
                ));
                None
            })
        } else {
            None
        };
        for &family in &families {
            let of_family = |ips: &[IpAddr]| -> Vec<IpAddr> {
                ips.iter()
                    .copied()
                    .filter(|ip| Family::of(*ip) == family)
                    .collect()
            };
            let mut frontends = BTreeSet::new();
            let mut add = |addr, port, kind| {
                frontends.insert(Frontend {
                    addr,
                    port,
                    proto: protocol,
                    kind,
                });
            };
            for ip in of_family(&cluster_ips) {
                add(ip, number, service_flags::CLUSTER_IP);
            }
            for ip in of_family(&external_ips) {
                add(ip, number, service_flags::EXTERNAL_IP);
            }
            for ip in of_family(&ingress_ips) {
                add(ip, number, service_flags::LOAD_BALANCER);
            }
            if let Some(node_port) = node_port {
                for addr in of_family(node_addresses) {
                    add(addr, node_port, service_flags::NODE_PORT);
                }
            }
            let PortBackends {
                all: backends,
                cluster,
                local,
            } = endpoints.backends(&port_name, protocol, node, family);
            if backends.len() > limits::MAX_BACKENDS_PER_SERVICE as usize {
                return Err(invalid(
                    "TooManyEndpoints",
                    format!(
                        "port {port_name:?} has {} {} endpoints, more than the {} a service can \
                         hold",
                        backends.len(),
                        family.name(),
                        limits::MAX_BACKENDS_PER_SERVICE
                    ),
                ));
            }
            // Probes connect over TCP: the local endpoints of TCP ports are probed; other
            // protocols' tables are left as the slices give them.
            let probed = health_check.as_ref().filter(|_| protocol == proto::TCP);
            // Every endpoint a table may take: a Local policy's fallback to the node's serving
            // terminating endpoints is probed and weighed too.
            let candidates: BTreeSet<Backend> = backends.union(&local).copied().collect();
            if let Some(check) = probed {
                probes.extend(
                    candidates
                        .iter()
                        .filter(|backend| backend.flags & backend_flags::LOCAL != 0)
                        .map(|backend| ProbeTarget {
                            endpoint: ProbedEndpoint {
                                namespace: namespace.clone(),
                                name: name.clone(),
                                addr: backend.addr,
                                port: backend.port,
                            },
                            check: check.clone(),
                        }),
                );
            }
            // Over all the port's endpoints of the family: a traffic policy's or a hint's subset
            // whose endpoints all weigh 0 gets none (drained), not equal shares.
            let family_weights = match &weights {
                Some(rules) => weigh(rules, &candidates, endpoints, service, problems),
                None => BTreeMap::new(),
            };
            let backends_of_port = &backends;
            for (scope, frontends, flags) in policy.split(frontends) {
                let key = ServicePortKey {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    port_name: port_name.clone(),
                    proto: protocol,
                    scope,
                    family,
                };
                // With no endpoint anywhere a Local policy rejects as a Cluster one does: only
                // "none on this node" drops (kube-proxy's hasEndpoints).
                let flags = if backends.is_empty() {
                    flags & !service_flags::LOCAL_ONLY
                } else {
                    flags
                };
                let local_only = flags & service_flags::LOCAL_ONLY != 0;
                let backends = if local_only {
                    local.clone()
                } else {
                    cluster.clone()
                };
                let backends = if probed.is_some() {
                    // Hints chose the cluster table out of all the port's endpoints.
                    let wider =
                        (!local_only && cluster != *backends_of_port).then_some(backends_of_port);
                    let weight = |backend: &Backend| {
                        family_weights
                            .get(&(backend.addr, backend.port))
                            .copied()
                            .unwrap_or(1)
                    };
                    let (healthy, failed_open) =
                        without_failed(backends, wider, &health_failed, weight);
                    if failed_open {
                        problems.push(Problem {
                            severity: Severity::Warning,
                            ..invalid_service(
                                service,
                                "HealthCheckFailOpen",
                                format!(
                                    "{key}: every endpoint of this table failed its health \
                                     check on this node; none is taken out of rotation (fail \
                                     open)"
                                ),
                            )
                        });
                    }
                    healthy
                } else {
                    backends
                };
                let weights: BTreeMap<(IpAddr, u16), u32> = family_weights
                    .iter()
                    .filter(|((addr, port), _)| {
                        backends
                            .iter()
                            .any(|backend| backend.addr == *addr && backend.port == *port)
                    })
                    .map(|(key, weight)| (*key, *weight))
                    .collect();
                let source_ranges = if flags & service_flags::SOURCE_RANGES != 0 {
                    policy
                        .source_ranges
                        .iter()
                        .flatten()
                        .filter(|(addr, _)| Family::of(*addr) == family)
                        .copied()
                        .collect()
                } else {
                    BTreeSet::new()
                };
                let terminating_table = !backends.is_empty()
                    && backends
                        .iter()
                        .all(|backend| backend.flags & backend_flags::TERMINATING != 0);
                let table_flags = if terminating_table {
                    service_flags::SERVING_TERMINATING
                } else {
                    0
                };
                desired.insert(
                    key,
                    DesiredService {
                        frontends,
                        backends,
                        affinity_timeout_s,
                        flags: flags | algorithm_flags | table_flags,
                        source_ranges,
                        weights,
                    },
                );
            }
        }
    }
    Ok(desired)
}

/// The externalIPs inside `--external-ip-cidrs` (all without it); a problem for each other one.
fn allowed_external_ips(
    service: &Service,
    external_ips: Vec<IpAddr>,
    node: &NodeContext,
    problems: &mut Vec<Problem>,
) -> Vec<IpAddr> {
    if node.external_ip_cidrs.is_empty() {
        return external_ips;
    }
    let (allowed, refused): (Vec<IpAddr>, Vec<IpAddr>) = external_ips
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

/// The addresses of the families the Service is served in; a Warning for each other one (a
/// single-stack Service's externalIP of the other family: kube-proxy ignores it too).
fn of_families(
    service: &Service,
    addresses: Vec<IpAddr>,
    families: &BTreeSet<Family>,
    what: &str,
    problems: &mut Vec<Problem>,
) -> Vec<IpAddr> {
    let (served, unserved): (Vec<IpAddr>, Vec<IpAddr>) = addresses
        .into_iter()
        .partition(|ip| families.contains(&Family::of(*ip)));
    for ip in unserved {
        problems.push(Problem {
            severity: Severity::Warning,
            ..invalid_service(
                service,
                "IPFamilyNotServed",
                format!(
                    "{what} {ip} is {}, which the Service's clusterIPs do not have; not served",
                    Family::of(ip).name()
                ),
            )
        });
    }
    served
}

/// The Service's health check, if it asks for one; a Warning (and no health check) for
/// annotations this cannot read.
fn health_check(service: &Service, problems: &mut Vec<Problem>) -> Option<HealthCheck> {
    let annotations = service.metadata.annotations.as_ref()?;
    health_check::parse(annotations).unwrap_or_else(|message| {
        problems.push(Problem {
            severity: Severity::Warning,
            ..invalid_service(
                service,
                "InvalidHealthCheck",
                format!("{message}; its endpoints are not health-checked"),
            )
        });
        None
    })
}

/// The rules of a Service's [`ENDPOINT_WEIGHTS_ANNOTATION`], in its order.
struct WeightRules {
    rules: Vec<(WeightKey, u32)>,
}

enum WeightKey {
    Address(IpAddr),
    Pod(String),
    /// A pod-name prefix (`web-canary-*`).
    PodPrefix(String),
    /// `*`: every endpoint no other key matches.
    Rest,
}

/// The Service's endpoint weights, if it asks for them; a Warning (and equal weights) for an
/// annotation this cannot read.
fn endpoint_weights(service: &Service, problems: &mut Vec<Problem>) -> Option<WeightRules> {
    let text = service
        .metadata
        .annotations
        .as_ref()?
        .get(ENDPOINT_WEIGHTS_ANNOTATION)?;
    match parse_weights(text) {
        Ok(rules) => Some(rules),
        Err(message) => {
            problems.push(Problem {
                severity: Severity::Warning,
                ..invalid_service(
                    service,
                    "InvalidEndpointWeights",
                    format!("{ENDPOINT_WEIGHTS_ANNOTATION}: {message}; endpoints weigh the same"),
                )
            });
            None
        }
    }
}

fn parse_weights(text: &str) -> Result<WeightRules, String> {
    let mut rules = Vec::new();
    for entry in text
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
    {
        let (key, weight) = entry
            .split_once('=')
            .ok_or_else(|| format!("{entry:?} is not key=weight"))?;
        let (key, weight) = (key.trim(), weight.trim());
        let weight: u32 = weight
            .parse()
            .ok()
            .filter(|weight| *weight <= MAX_ENDPOINT_WEIGHT)
            .ok_or_else(|| format!("{entry:?}: the weight must be 0 to {MAX_ENDPOINT_WEIGHT}"))?;
        let key = if key == "*" {
            WeightKey::Rest
        } else if let Ok(addr) = key.parse::<IpAddr>() {
            WeightKey::Address(addr)
        } else if key.contains('/') {
            return Err(format!(
                "{entry:?}: a key is an address or a pod name, not a CIDR"
            ));
        } else if let Some(prefix) = key.strip_suffix('*')
            && !prefix.contains('*')
        {
            WeightKey::PodPrefix(prefix.to_owned())
        } else if key.contains('*') {
            return Err(format!("{entry:?}: `*` only ends a pod-name prefix"));
        } else if !key.is_empty() {
            WeightKey::Pod(key.to_owned())
        } else {
            return Err(format!("{entry:?} has no key"));
        };
        rules.push((key, weight));
    }
    if rules.is_empty() {
        return Err("no key=weight entry".into());
    }
    Ok(WeightRules { rules })
}

impl WeightRules {
    /// The weight of an endpoint: by its address, else its pod's name, else the longest
    /// matching pod-name prefix, else `*`, else 1.
    fn weight_of(&self, addr: IpAddr, pod: Option<&str>) -> u32 {
        let find = |matches: &dyn Fn(&WeightKey) -> bool| {
            self.rules
                .iter()
                .find(|(key, _)| matches(key))
                .map(|(_, weight)| *weight)
        };
        find(&|key| matches!(key, WeightKey::Address(a) if *a == addr))
            .or_else(|| {
                let pod = pod?;
                find(&|key| matches!(key, WeightKey::Pod(name) if name == pod)).or_else(|| {
                    self.rules
                        .iter()
                        .filter_map(|(key, weight)| match key {
                            WeightKey::PodPrefix(prefix) if pod.starts_with(prefix.as_str()) => {
                                Some((prefix.len(), *weight))
                            }
                            _ => None,
                        })
                        // The longest; of equal ones the first, as for the other keys.
                        .fold(
                            None,
                            |best: Option<(usize, u32)>, (len, weight)| match best {
                                Some((longest, _)) if longest >= len => best,
                                _ => Some((len, weight)),
                            },
                        )
                        .map(|(_, weight)| weight)
                })
            })
            .or_else(|| find(&|key| matches!(key, WeightKey::Rest)))
            .unwrap_or(1)
    }
}

/// The weights of one service's backends. When every one weighs 0 the weights are dropped
/// (equal shares, with a Warning): weights steer new flows, they never leave a Service
/// without endpoints.
fn weigh(
    rules: &WeightRules,
    backends: &BTreeSet<Backend>,
    endpoints: &ServiceEndpoints,
    service: &Service,
    problems: &mut Vec<Problem>,
) -> BTreeMap<(IpAddr, u16), u32> {
    let pods = endpoints.pods();
    let weights: BTreeMap<(IpAddr, u16), u32> = backends
        .iter()
        .map(|backend| {
            let pod = pods.get(&backend.addr).copied();
            (
                (backend.addr, backend.port),
                rules.weight_of(backend.addr, pod),
            )
        })
        .collect();
    if !weights.is_empty() && weights.values().all(|weight| *weight == 0) {
        problems.push(Problem {
            severity: Severity::Warning,
            ..invalid_service(
                service,
                "AllEndpointsWeighZero",
                format!(
                    "{ENDPOINT_WEIGHTS_ANNOTATION} gives every endpoint weight 0; they weigh \
                     the same instead"
                ),
            )
        });
        return BTreeMap::new();
    }
    weights
}

/// What decides which frontends of a Service port share a selection table.
struct Policy {
    /// externalTrafficPolicy Local: NodePorts, externalIPs and LoadBalancer IPs reach node-local
    /// endpoints only, keep the client address, and drop when there is none.
    external_local: bool,
    /// internalTrafficPolicy Local: the same for the ClusterIPs.
    internal_local: bool,
    /// loadBalancerSourceRanges (both families): only these clients may use the LoadBalancer
    /// IPs. A family without a range of its own lets none of its clients in.
    source_ranges: Option<BTreeSet<(IpAddr, u8)>>,
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
        let for_node_clients = |frontends: &BTreeSet<Frontend>| -> BTreeSet<Frontend> {
            frontends
                .iter()
                .map(|frontend| Frontend {
                    kind: frontend.kind | service_flags::FOR_NODE_CLIENTS,
                    ..*frontend
                })
                .collect()
        };
        // kube-proxy's short-circuit for externalTrafficPolicy Local: this node's pods and
        // processes have no client address to preserve, so they reach the external frontends
        // through the internal policy (and a ranged LoadBalancer IP still within its ranges).
        let node_clients_entry = if self.external_local {
            service_flags::NODE_CLIENTS_ENTRY
        } else {
            0
        };
        let external = of_kind(external_kinds);
        let mut internal = of_kind(service_flags::CLUSTER_IP);
        if self.external_local {
            internal.extend(for_node_clients(&external));
        }
        let mut groups = vec![
            (Scope::Internal, internal, local(self.internal_local)),
            (
                Scope::External,
                external,
                local(self.external_local) | node_clients_entry,
            ),
        ];
        if ranged {
            let load_balancer = of_kind(service_flags::LOAD_BALANCER);
            if self.external_local {
                groups.push((
                    Scope::LoadBalancerNodeClients,
                    for_node_clients(&load_balancer),
                    local(self.internal_local) | service_flags::SOURCE_RANGES,
                ));
            }
            groups.push((
                Scope::LoadBalancer,
                load_balancer,
                local(self.external_local) | service_flags::SOURCE_RANGES | node_clients_entry,
            ));
        }
        groups.retain(|(_, frontends, _)| !frontends.is_empty());
        groups
    }
}

/// loadBalancerSourceRanges as (network address, prefix length); None when the spec has none.
///
/// Any range restricts: a family the ranges do not mention lets none of its clients in (a
/// Warning says so when the Service has LoadBalancer IPs of that family), rather than every
/// client. A range with host bits set is masked (as kube-proxy does), with a Warning: the
/// datapath's LPM trie keeps one entry per (service, prefix), so `10.1.2.3/8` and `10.0.0.0/8`
/// must be one member of the set, or removing one of them would remove the entry the other
/// still needs.
fn source_ranges(
    service: &Service,
    problems: &mut Vec<Problem>,
) -> Result<Option<BTreeSet<(IpAddr, u8)>>, String> {
    let texts = service
        .spec
        .as_ref()
        .and_then(|spec| spec.load_balancer_source_ranges.as_deref())
        .unwrap_or_default();
    if texts.is_empty() {
        return Ok(None);
    }
    let mut ranges = BTreeSet::new();
    for text in texts {
        let text = text.trim();
        let cidr: IpCidr = text.parse()?;
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
    let ingress_families: BTreeSet<Family> = service
        .status
        .iter()
        .filter_map(|status| status.load_balancer.as_ref()?.ingress.as_ref())
        .flatten()
        .filter_map(|ingress| ingress.ip.as_deref()?.parse().ok())
        .map(Family::of)
        .collect();
    for family in ingress_families {
        if !ranges.iter().any(|(addr, _)| Family::of(*addr) == family) {
            problems.push(Problem {
                severity: Severity::Warning,
                ..invalid_service(
                    service,
                    "NoSourceRangeOfFamily",
                    format!(
                        "loadBalancerSourceRanges has no {} range: no {} client may use the \
                         {} LoadBalancer IPs",
                        family.name(),
                        family.name(),
                        family.name()
                    ),
                )
            });
        }
    }
    Ok(Some(ranges))
}

/// An externalTrafficPolicy Local Service's healthCheckNodePort, when set, must be in the
/// NodePort range: the agent serves HTTP on it on every node address.
fn check_health_check_node_port(spec: &ServiceSpec, node: &NodeContext) -> Result<(), String> {
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
    texts.iter().map(|text| parse_ip(text, what)).collect()
}

/// An address as Kubernetes validates it: IPv4 or IPv6, never an IPv4-mapped IPv6 one
/// (`::ffff:10.0.0.1`), which the datapath would take for IPv6 while the kernel sends IPv4.
fn parse_ip(text: &str, what: &str) -> Result<IpAddr, String> {
    match text.parse::<IpAddr>() {
        Ok(IpAddr::V6(addr)) if addr.to_ipv4_mapped().is_some() => Err(format!(
            "{what} {text:?} is an IPv4-mapped IPv6 address; write the IPv4 address"
        )),
        Ok(addr) => Ok(addr),
        Err(_) => Err(format!("{what} {text:?} is not an IP address")),
    }
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
    addr: IpAddr,
    /// The name of the endpoint's pod (its targetRef), for endpoint weights.
    pod: Option<String>,
    port: u16,
    proto: u8,
    port_name: String,
    node_name: Option<String>,
    ready: bool,
    serving: bool,
    terminating: bool,
    /// `hints.forZones` names.
    zone_hints: Vec<String>,
    /// `hints.forNodes` names.
    node_hints: Vec<String>,
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

    /// Whether the endpoint's node takes DSR options (only when this node sends by DSR): an
    /// endpoint without a nodeName is never sent a flow by DSR.
    fn node_takes_direct_return(&self, node: &NodeContext) -> bool {
        node.direct_return
            && self
                .node_name
                .as_ref()
                .is_some_and(|name| node.direct_return_nodes.contains(name))
    }
}

/// The endpoints of one Service, from all its EndpointSlices.
pub(super) struct ServiceEndpoints {
    endpoints: Vec<SliceEndpoint>,
}

impl ServiceEndpoints {
    pub(super) fn build(slices: &[&EndpointSlice], problems: &mut Vec<Problem>) -> Self {
        let mut endpoints = Vec::new();
        for slice in slices {
            let (namespace, name) = object_key(&slice.metadata);
            let family = match slice.address_type.as_str() {
                "IPv4" => Family::V4,
                "IPv6" => Family::V6,
                // FQDN slices are for no proxy to serve.
                _ => continue,
            };
            for port in slice.ports.iter().flatten() {
                let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
                    "TCP" => proto::TCP,
                    "UDP" => proto::UDP,
                    "SCTP" => proto::SCTP,
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
                        family,
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

    /// The name of the pod at each address that a slice names one for.
    fn pods(&self) -> BTreeMap<IpAddr, &str> {
        self.endpoints
            .iter()
            .filter_map(|endpoint| Some((endpoint.addr, endpoint.pod.as_deref()?)))
            .collect()
    }

    /// The addresses of the endpoints without a nodeName.
    pub(super) fn unplaced(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.endpoints
            .iter()
            .filter(|endpoint| endpoint.node_name.is_none())
            .map(|endpoint| endpoint.addr)
    }

    /// The backends new flows of one Service port select from: all of them (a Local traffic
    /// policy takes the local ones), and those a Cluster policy uses, which the endpoints'
    /// topology hints narrow (see [`Topology`]). Endpoints of `family` only.
    fn backends(
        &self,
        port_name: &str,
        protocol: u8,
        node: &NodeContext,
        family: Family,
    ) -> PortBackends {
        let candidates: Vec<&SliceEndpoint> = self
            .endpoints
            .iter()
            .filter(|endpoint| {
                endpoint.port_name == port_name
                    && endpoint.proto == protocol
                    && Family::of(endpoint.addr) == family
            })
            .collect();
        let ready: Vec<&SliceEndpoint> = candidates
            .iter()
            .copied()
            .filter(|endpoint| endpoint.ready)
            .collect();
        let topology = Topology::of(&ready, node);
        // KEP-1669: with no ready endpoint, fall back to those still serving while terminating.
        let chosen: Vec<&SliceEndpoint> = if ready.is_empty() {
            candidates
                .iter()
                .copied()
                .filter(|endpoint| endpoint.serving && endpoint.terminating)
                .collect()
        } else {
            ready
        };
        let mut by_address: BTreeMap<(IpAddr, u16), Backend> = BTreeMap::new();
        let mut for_cluster: BTreeSet<(IpAddr, u16)> = BTreeSet::new();
        for endpoint in &chosen {
            if topology.admits(endpoint, node) {
                for_cluster.insert((endpoint.addr, endpoint.port));
            }
            add_backend(&mut by_address, endpoint, protocol, node);
        }
        let all: BTreeSet<Backend> = by_address.values().copied().collect();
        // A Local policy with none of the node's endpoints ready takes those of them still
        // serving while terminating, whatever other nodes have ready (kube-proxy's
        // CategorizeEndpoints; without ready endpoints anywhere, `chosen` holds them already).
        let local_ready = all.iter().any(|b| b.flags & backend_flags::LOCAL != 0);
        let local = if local_ready || chosen.iter().all(|endpoint| !endpoint.ready) {
            all.iter()
                .filter(|b| b.flags & backend_flags::LOCAL != 0)
                .copied()
                .collect()
        } else {
            let mut local_fallback = BTreeMap::new();
            for endpoint in candidates
                .iter()
                .filter(|endpoint| endpoint.serving && endpoint.terminating && endpoint.is_on(node))
            {
                add_backend(&mut local_fallback, endpoint, protocol, node);
            }
            local_fallback.into_values().collect()
        };
        PortBackends {
            cluster: for_cluster
                .iter()
                .filter_map(|address| by_address.get(address).copied())
                .collect(),
            all,
            local,
        }
    }
}

/// Adds `endpoint` to `by_address` as a backend of `protocol`, flagged for `node`. The same
/// endpoint in two slices (during a slice rebalance) counts once, with flags that do not depend
/// on the order of the slices.
fn add_backend(
    by_address: &mut BTreeMap<(IpAddr, u16), Backend>,
    endpoint: &SliceEndpoint,
    protocol: u8,
    node: &NodeContext,
) {
    let mut flags = 0;
    if endpoint.is_on(node) {
        flags |= backend_flags::LOCAL;
    } else if endpoint.node_takes_direct_return(node) {
        flags |= backend_flags::TAKES_DIRECT_RETURN;
    }
    // Ready wins: a terminating endpoint a Service publishes as ready (publishNotReadyAddresses)
    // serves as any ready one does, in kube-proxy too.
    if endpoint.terminating && !endpoint.ready {
        flags |= backend_flags::TERMINATING;
    }
    by_address
        .entry((endpoint.addr, endpoint.port))
        .and_modify(|backend| backend.flags = merged_flags(backend.flags, flags))
        .or_insert(Backend {
            addr: endpoint.addr,
            port: endpoint.port,
            proto: protocol,
            flags,
        });
}

/// The backends of one Service port.
struct PortBackends {
    all: BTreeSet<Backend>,
    /// Those a Cluster traffic policy selects from.
    cluster: BTreeSet<Backend>,
    /// Those a Local traffic policy selects from.
    local: BTreeSet<Backend>,
}

/// Which endpoints a Cluster traffic policy uses, from the hints the EndpointSlice controller
/// gives them (for trafficDistribution PreferSameNode, PreferSameZone or PreferClose, and the
/// topology-mode annotation), as kube-proxy reads them: when every ready endpoint has node
/// hints and one is hinted for this node, the endpoints hinted for this node; else, when every
/// ready endpoint has zone hints and one is hinted for this node's zone, the endpoints hinted
/// for that zone; else all of them.
enum Topology {
    Any,
    SameNode,
    SameZone,
}

impl Topology {
    fn of(ready: &[&SliceEndpoint], node: &NodeContext) -> Self {
        let hinted = |has: fn(&SliceEndpoint) -> bool, matches: &dyn Fn(&SliceEndpoint) -> bool| {
            !ready.is_empty()
                && ready.iter().all(|endpoint| has(endpoint))
                && ready.iter().any(|endpoint| matches(endpoint))
        };
        if hinted(|endpoint| !endpoint.node_hints.is_empty(), &|endpoint| {
            endpoint.node_hints.contains(&node.node_name)
        }) {
            return Self::SameNode;
        }
        if let Some(zone) = &node.zone
            && hinted(|endpoint| !endpoint.zone_hints.is_empty(), &|endpoint| {
                endpoint.zone_hints.contains(zone)
            })
        {
            return Self::SameZone;
        }
        Self::Any
    }

    fn admits(&self, endpoint: &SliceEndpoint, node: &NodeContext) -> bool {
        match self {
            Self::Any => true,
            Self::SameNode => endpoint.node_hints.contains(&node.node_name),
            Self::SameZone => node
                .zone
                .as_ref()
                .is_some_and(|zone| endpoint.zone_hints.contains(zone)),
        }
    }
}

/// The flags of an endpoint that two slices list: LOCAL if either puts it on this node (as
/// kube-proxy favours the local copy), TERMINATING only if both say so (it stays a candidate
/// for new flows while any slice says it serves normally).
fn merged_flags(a: u8, b: u8) -> u8 {
    ((a | b) & backend_flags::LOCAL) | (a & b & backend_flags::TERMINATING)
}

fn slice_endpoint(
    endpoint: &Endpoint,
    family: Family,
    port: u16,
    protocol: u8,
    port_name: String,
) -> Result<SliceEndpoint, String> {
    // The first address is the canonical one (discovery/v1 API); kube-proxy uses it alone.
    let text = endpoint
        .addresses
        .first()
        .ok_or("endpoint without an address")?;
    let addr = parse_ip(text, "endpoint address")?;
    if Family::of(addr) != family {
        return Err(format!(
            "endpoint address {text:?} is not an {} address",
            family.name()
        ));
    }
    let conditions = endpoint.conditions.as_ref();
    // The API's defaults, as kube-proxy reads them: unset ready or serving means true, unset
    // terminating means false.
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    Ok(SliceEndpoint {
        addr,
        port,
        proto: protocol,
        port_name,
        node_name: endpoint.node_name.clone(),
        pod: endpoint
            .target_ref
            .as_ref()
            .filter(|target| target.kind.as_deref() == Some("Pod"))
            .and_then(|target| target.name.clone()),
        ready,
        serving: conditions.and_then(|c| c.serving).unwrap_or(true),
        terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
        zone_hints: endpoint
            .hints
            .iter()
            .flat_map(|hints| hints.for_zones.iter().flatten())
            .map(|zone| zone.name.clone())
            .collect(),
        node_hints: endpoint
            .hints
            .iter()
            .flat_map(|hints| hints.for_nodes.iter().flatten())
            .map(|node| node.name.clone())
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unsupported_value_is_named_with_its_field_and_the_values_taken() {
        let spec = |yaml: &str| -> ServiceSpec { serde_saphyr::from_str(yaml).expect("spec") };
        assert_eq!(
            unsupported_value(&spec("type: Nodeport\n")).as_deref(),
            Some(
                "spec.type: \"Nodeport\" is not one of ClusterIP, NodePort, LoadBalancer, \
                 ExternalName"
            )
        );
        assert_eq!(
            unsupported_value(&spec("ipFamilies: [IPv6, IPV4]\n")).as_deref(),
            Some("spec.ipFamilies: \"IPV4\" is not one of IPv4, IPv6")
        );
        let kube_proxy_takes = "type: LoadBalancer\nexternalTrafficPolicy: Local\n\
             internalTrafficPolicy: Cluster\nsessionAffinity: ClientIP\n\
             ipFamilyPolicy: RequireDualStack\nipFamilies: [IPv6, IPv4]\n";
        assert_eq!(unsupported_value(&spec(kube_proxy_takes)), None);
        assert_eq!(
            unsupported_value(&spec("type: \"\"\n")),
            None,
            "the default"
        );
    }
}
