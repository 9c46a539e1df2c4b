//! compile(), table-driven: Kubernetes objects (as the YAML a user would write) in, the
//! datapath's desired contents out, one row per part of the Service contract, and one per kind of
//! bad input. No kernel needed: compile is a pure function.

use lb_userspace::{
    compile::{
        compile,
        model::{Desired, NodeContext, NodePortAddress, NodePortAddresses, Problem, Severity},
    },
    source::{
        Snapshot,
        file::{Object, parse_documents},
    },
};
use std::sync::Arc;

struct Row {
    name: &'static str,
    yaml: String,
    /// Rendered desired services, sorted (see `render`).
    expected: &'static [&'static str],
    /// (severity, kind/namespace/name, reason) of every problem, sorted.
    problems: &'static [(Severity, &'static str, &'static str)],
    /// Services kept as installed before (skipped for bad input).
    held: &'static [&'static str],
}

fn node() -> NodeContext {
    NodeContext::new("node1")
}

fn snapshot(yaml: &str, node_name: &str) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for object in parse_documents(yaml).expect("test YAML parses") {
        match object {
            Object::Service(service) => snapshot.services.push(service),
            Object::EndpointSlice(slice) => snapshot.endpoint_slices.push(slice),
            Object::Node(node) => {
                snapshot
                    .direct_return_nodes
                    .extend(lb_userspace::source::direct_return_nodes(std::iter::once(
                        &*node,
                    )));
                if node.metadata.name.as_deref() == Some(node_name) {
                    snapshot.node = Some(*node)
                }
            }
        }
    }
    snapshot
}

/// `ns/name:port/PROTO fe=[addr:port kind,...] be=[addr:port flags,...] affinity=N`
fn render(desired: &Desired) -> Vec<String> {
    desired
        .services
        .iter()
        .map(|(key, service)| {
            let kinds = |kind: u32| {
                let base = match kind & !lb_common::service_flags::FOR_NODE_CLIENTS {
                    1 => "cluster",
                    2 => "nodeport",
                    4 => "external",
                    8 => "lb",
                    _ => "?",
                };
                if kind & lb_common::service_flags::FOR_NODE_CLIENTS != 0 {
                    format!("{base}(node-clients)")
                } else {
                    base.to_owned()
                }
            };
            let frontends: Vec<String> = service
                .frontends
                .iter()
                .map(|f| {
                    let at = std::net::SocketAddr::new(f.addr, f.port);
                    format!("{at} {}", kinds(f.kind))
                })
                .collect();
            let backends: Vec<String> = service
                .backends
                .iter()
                .map(|b| {
                    let mut flags = String::new();
                    if b.flags & lb_common::backend_flags::LOCAL != 0 {
                        flags.push('L');
                    }
                    if b.flags & lb_common::backend_flags::TERMINATING != 0 {
                        flags.push('T');
                    }
                    if b.flags & lb_common::backend_flags::TAKES_DIRECT_RETURN != 0 {
                        flags.push('D');
                    }
                    format!(
                        "{}{}{flags}",
                        std::net::SocketAddr::new(b.addr, b.port),
                        if flags.is_empty() { "" } else { " " }
                    )
                })
                .collect();
            let mut line = format!(
                "{key} fe=[{}] be=[{}] affinity={}",
                frontends.join(", "),
                backends.join(", "),
                service.affinity_timeout_s
            );
            if service.flags & lb_common::service_flags::LOCAL_ONLY != 0 {
                line.push_str(" local-only");
            }
            if service.flags & lb_common::service_flags::MAGLEV != 0 {
                line.push_str(" maglev");
            }
            if service.flags & lb_common::service_flags::SERVING_TERMINATING != 0 {
                line.push_str(" serving-terminating");
            }
            if !service.weights.is_empty() {
                let weights: Vec<String> = service
                    .weights
                    .iter()
                    .map(|((addr, port), weight)| {
                        format!("{}={weight}", std::net::SocketAddr::new(*addr, *port))
                    })
                    .collect();
                line.push_str(&format!(" weights=[{}]", weights.join(", ")));
            }
            if service.flags & lb_common::service_flags::NODE_CLIENTS_ENTRY != 0 {
                line.push_str(" node-clients-elsewhere");
            }
            if service.flags & lb_common::service_flags::SOURCE_RANGES != 0 {
                let ranges: Vec<String> = service
                    .source_ranges
                    .iter()
                    .map(|(a, l)| format!("{a}/{l}"))
                    .collect();
                line.push_str(&format!(" ranges=[{}]", ranges.join(", ")));
            }
            line
        })
        .collect()
}

fn problem_summary(problems: &[Problem]) -> Vec<(Severity, String, &'static str)> {
    problems
        .iter()
        .map(|p| {
            (
                p.severity,
                format!("{}/{}/{}", p.kind, p.namespace, p.name),
                p.reason,
            )
        })
        .collect()
}

fn service(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n{spec}\n"
    )
}

/// An EndpointSlice for `service` with (address, node, ready) endpoints and (name, port, protocol) ports.
fn slice(
    name: &str,
    service: &str,
    endpoints: &[(&str, &str, &str)],
    ports: &[(&str, i64, &str)],
) -> String {
    slice_of("IPv4", name, service, endpoints, ports)
}

/// [`slice`] of an address type.
fn slice_of(
    address_type: &str,
    name: &str,
    service: &str,
    endpoints: &[(&str, &str, &str)],
    ports: &[(&str, i64, &str)],
) -> String {
    let mut yaml = format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: {address_type}\nendpoints:\n"
    );
    for (address, node, conditions) in endpoints {
        yaml.push_str(&format!(
            "- addresses: [\"{address}\"]\n  nodeName: {node}\n  conditions: {conditions}\n"
        ));
    }
    yaml.push_str("ports:\n");
    for (port_name, port, protocol) in ports {
        yaml.push_str(&format!(
            "- name: \"{port_name}\"\n  port: {port}\n  protocol: {protocol}\n"
        ));
    }
    yaml
}

const READY: &str = "{ready: true}";
const NODE1: &str = "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node1\nstatus:\n  addresses:\n  - {type: InternalIP, address: 203.0.113.1}\n  - {type: ExternalIP, address: 198.18.0.1}\n  - {type: InternalIP, address: \"fd00::1\"}\n  - {type: Hostname, address: node1}\n";
const NODE2: &str = "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node2\nstatus:\n  addresses:\n  - {type: InternalIP, address: 203.0.113.2}\n";

/// NODE1 in zone-a.
fn node1_in_zone_a() -> String {
    NODE1.replace(
        "  name: node1\n",
        "  name: node1\n  labels: {topology.kubernetes.io/zone: zone-a}\n",
    )
}

/// The web EndpointSlice with (address, node, hints) endpoints, ready, port http 8080; hints as
/// the YAML flow mapping of `hints:`, or "" for none.
fn hinted_slice(endpoints: &[(&str, &str, &str)]) -> String {
    let mut yaml = "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\nendpoints:\n".to_owned();
    for (address, node, hints) in endpoints {
        yaml.push_str(&format!(
            "- addresses: [\"{address}\"]\n  nodeName: {node}\n  conditions: {{ready: true}}\n"
        ));
        if !hints.is_empty() {
            yaml.push_str(&format!("  hints: {hints}\n"));
        }
    }
    yaml.push_str("ports:\n- {name: http, port: 8080, protocol: TCP}\n");
    yaml
}

fn web_slice() -> String {
    slice(
        "web-1",
        "web",
        &[
            ("10.244.1.10", "node1", READY),
            ("10.244.2.10", "node2", READY),
        ],
        &[("http", 8080, "TCP")],
    )
}

fn rows() -> Vec<Row> {
    let cluster_ip =
        "  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80, targetPort: http}\n";
    vec![
        Row {
            name: "ClusterIP: one frontend, ready endpoints, local flag from nodeName",
            yaml: service("web", cluster_ip) + &web_slice(),
            expected: &[
                "default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[10.244.1.10:8080 L, 10.244.2.10:8080] affinity=0",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "named target port resolved per slice",
            yaml: service("web", cluster_ip)
                + &slice(
                    "web-1",
                    "web",
                    &[("10.244.1.10", "node1", READY)],
                    &[("http", 8080, "TCP")],
                )
                + &slice(
                    "web-2",
                    "web",
                    &[("10.244.2.10", "node2", READY)],
                    &[("http", 9090, "TCP")],
                ),
            expected: &[
                "default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[10.244.1.10:8080 L, 10.244.2.10:9090] affinity=0",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "multi-port service: one entry per port, UDP included",
            yaml: service(
                "dns",
                "  clusterIP: 10.96.0.53\n  ports:\n  - {name: dns, port: 53, protocol: UDP}\n  - {name: dns-tcp, port: 53, protocol: TCP}\n",
            ) + &slice(
                "dns-1",
                "dns",
                &[("10.244.1.20", "node1", READY)],
                &[("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")],
            ),
            expected: &[
                "default/dns:dns/UDP fe=[10.96.0.53:53 cluster] be=[10.244.1.20:53 L] affinity=0",
                "default/dns:dns-tcp/TCP fe=[10.96.0.53:53 cluster] be=[10.244.1.20:53 L] affinity=0",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "SCTP NodePort: its endpoints' SCTP port, a NodePort frontend",
            yaml: NODE1.to_owned()
                + &service(
                    "diameter",
                    "  type: NodePort\n  clusterIP: 10.96.0.38\n  ports:\n  - {name: diameter, port: 3868, targetPort: 3869, nodePort: 30868, protocol: SCTP}\n",
                )
                + &slice(
                    "diameter-1",
                    "diameter",
                    &[("10.244.1.38", "node1", READY)],
                    &[("diameter", 3869, "SCTP")],
                ),
            expected: &[
                "default/diameter:diameter/SCTP fe=[10.96.0.38:3868 cluster, 198.18.0.1:30868 nodeport, 203.0.113.1:30868 nodeport] be=[10.244.1.38:3869 L] affinity=0",
            ],
            problems: &[(
                Severity::Unsupported,
                "Service/default/diameter",
                "SCTPClusterIPFromPods",
            )],
            held: &[],
        },
        Row {
            name: "selector-less service with a hand-made slice, unnamed port",
            yaml: service(
                "external-db",
                "  clusterIP: 10.96.0.30\n  ports:\n  - {port: 5432}\n",
            ) + &slice(
                "external-db-manual",
                "external-db",
                &[("192.0.2.50", "", READY)],
                &[("", 5432, "TCP")],
            ),
            expected: &[
                "default/external-db:/TCP fe=[10.96.0.30:5432 cluster] be=[192.0.2.50:5432] affinity=0",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "several slices, an endpoint listed twice counts once",
            yaml: service("web", cluster_ip)
                + &web_slice()
                + &slice(
                    "web-2",
                    "web",
                    &[
                        ("10.244.2.10", "node2", READY),
                        ("10.244.2.11", "node2", READY),
                    ],
                    &[("http", 8080, "TCP")],
                ),
            expected: &[
                "default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[10.244.1.10:8080 L, 10.244.2.10:8080, 10.244.2.11:8080] affinity=0",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "headless and ExternalName services are ignored",
            yaml: service("headless", "  clusterIP: None\n  ports:\n  - {port: 80}\n")
                + &service(
                    "ext",
                    "  type: ExternalName\n  externalName: db.example.com\n",
                ),
            expected: &[],
            problems: &[],
            held: &[],
        },
        Row {
            name: "dual-stack: one service per family, each with its family's endpoints",
            yaml: service(
                "dual",
                "  clusterIP: 10.96.0.40\n  clusterIPs: [10.96.0.40, \"fd00::40\"]\n  ipFamilies: [IPv4, IPv6]\n  ports:\n  - {name: http, port: 80}\n",
            ) + &slice(
                "dual-4",
                "dual",
                &[("10.244.1.10", "node1", READY)],
                &[("http", 80, "TCP")],
            ) + "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: dual-6\n  namespace: default\n  labels: {kubernetes.io/service-name: dual}\naddressType: IPv6\nendpoints:\n- addresses: [\"fd00::10\"]\nports:\n- {name: http, port: 80}\n",
            expected: &[
                "default/dual:http/TCP fe=[10.96.0.40:80 cluster] be=[10.244.1.10:80 L] affinity=0",
                "default/dual:http/TCP[ipv6] fe=[[fd00::40]:80 cluster] be=[[fd00::10]:80] affinity=0",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "IPv6-only NodePort: the node's IPv6 addresses, local IPv6 endpoints",
            yaml: NODE1.to_owned()
                + &service(
                    "six",
                    "  type: NodePort\n  clusterIP: \"fd00::50\"\n  clusterIPs: [\"fd00::50\"]\n  ipFamilies: [IPv6]\n  ports:\n  - {name: http, port: 80, nodePort: 30090}\n",
                )
                + &slice_of(
                    "IPv6",
                    "six-1",
                    "six",
                    &[("fd00::10", "node1", READY), ("fd00::20", "node2", READY)],
                    &[("http", 8080, "TCP")],
                ),
            expected: &[
                "default/six:http/TCP[ipv6] fe=[[fd00::1]:30090 nodeport, [fd00::50]:80 cluster] be=[[fd00::10]:8080 L, [fd00::20]:8080] affinity=0",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "dual-stack LoadBalancer: each family its ingress IPs, externalIPs and source ranges",
            yaml: NODE1.to_owned()
                + &service(
                    "both",
                    "  type: LoadBalancer\n  clusterIP: 10.96.0.60\n  clusterIPs: [10.96.0.60, \"fd00::60\"]\n  ipFamilies: [IPv4, IPv6]\n  externalIPs: [198.51.100.60, \"2001:db8:2::60\"]\n  loadBalancerSourceRanges: [203.0.113.0/24, \"2001:db8:1::/48\"]\n  ports:\n  - {name: http, port: 80, nodePort: 30060}\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 198.51.100.61\n    - ip: \"2001:db8:2::61\"\n",
                )
                + &slice(
                    "both-4",
                    "both",
                    &[("10.244.1.10", "node1", READY)],
                    &[("http", 8080, "TCP")],
                )
                + &slice_of(
                    "IPv6",
                    "both-6",
                    "both",
                    &[("fd00::10", "node1", READY)],
                    &[("http", 8080, "TCP")],
                ),
            expected: &[
                "default/both:http/TCP[internal] fe=[10.96.0.60:80 cluster] be=[10.244.1.10:8080 L] affinity=0",
                "default/both:http/TCP[internal][ipv6] fe=[[fd00::60]:80 cluster] be=[[fd00::10]:8080 L] affinity=0",
                "default/both:http/TCP[external] fe=[198.18.0.1:30060 nodeport, 198.51.100.60:80 external, 203.0.113.1:30060 nodeport] be=[10.244.1.10:8080 L] affinity=0",
                "default/both:http/TCP[external][ipv6] fe=[[2001:db8:2::60]:80 external, [fd00::1]:30060 nodeport] be=[[fd00::10]:8080 L] affinity=0",
                "default/both:http/TCP[loadbalancer] fe=[198.51.100.61:80 lb] be=[10.244.1.10:8080 L] affinity=0 ranges=[203.0.113.0/24]",
                "default/both:http/TCP[loadbalancer][ipv6] fe=[[2001:db8:2::61]:80 lb] be=[[fd00::10]:8080 L] affinity=0 ranges=[2001:db8:1::/48]",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "IPv4-mapped IPv6 addresses are refused: an endpoint alone, a ClusterIP with its Service",
            yaml: service(
                "mapped",
                "  clusterIP: \"::ffff:10.96.0.80\"\n  ports:\n  - {name: http, port: 80}\n",
            ) + &service(
                "six",
                "  clusterIP: \"fd00::81\"\n  ports:\n  - {name: http, port: 80}\n",
            ) + &slice_of(
                "IPv6",
                "six-1",
                "six",
                &[("::ffff:10.244.1.10", "node1", READY), ("fd00::10", "node1", READY)],
                &[("http", 8080, "TCP")],
            ),
            expected: &[
                "default/six:http/TCP[ipv6] fe=[[fd00::81]:80 cluster] be=[[fd00::10]:8080 L] affinity=0",
            ],
            problems: &[
                (
                    Severity::Invalid,
                    "EndpointSlice/default/six-1",
                    "InvalidEndpoint",
                ),
                (Severity::Invalid, "Service/default/mapped", "InvalidClusterIP"),
            ],
            held: &["default/mapped"],
        },
        Row {
            name: "Maglev for both families of a dual-stack port (XDP serves both)",
            yaml: "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\n  annotations: {lb.io/load-balancing: maglev}\nspec:\n  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, \"fd00::10\"]\n  ports:\n  - {name: http, port: 80}\n".to_owned(),
            expected: &[
                "default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[] affinity=0 maglev",
                "default/web:http/TCP[ipv6] fe=[[fd00::10]:80 cluster] be=[] affinity=0 maglev",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "endpoint weights by address, pod name, the longest pod-name prefix and *",
            yaml: "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\n  annotations: {lb.io/endpoint-weights: \"10.244.1.10=7, web-stable-*=9, web-stable-canary-*=1, web-x-1=3, *=0\"}\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80}\n".to_owned()
                + "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nports:\n- {name: http, port: 8080}\nendpoints:\n- addresses: [10.244.1.10]\n  targetRef: {kind: Pod, name: web-stable-a}\n- addresses: [10.244.1.11]\n  targetRef: {kind: Pod, name: web-stable-b}\n- addresses: [10.244.1.12]\n  targetRef: {kind: Pod, name: web-stable-canary-c}\n- addresses: [10.244.1.13]\n  targetRef: {kind: Pod, name: web-x-1}\n- addresses: [10.244.1.14]\n  targetRef: {kind: Pod, name: other}\n- addresses: [10.244.1.15]\n",
            expected: &[
                "default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[10.244.1.10:8080, 10.244.1.11:8080, 10.244.1.12:8080, 10.244.1.13:8080, 10.244.1.14:8080, 10.244.1.15:8080] affinity=0 weights=[10.244.1.10:8080=7, 10.244.1.11:8080=9, 10.244.1.12:8080=1, 10.244.1.13:8080=3, 10.244.1.14:8080=0, 10.244.1.15:8080=0]",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "endpoint weights: a malformed annotation and all weights 0 leave equal shares, with a Warning",
            yaml: "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: bad\n  namespace: default\n  annotations: {lb.io/endpoint-weights: \"10.244.1.10=lots\"}\nspec:\n  clusterIP: 10.96.0.11\n  ports:\n  - {name: http, port: 80}\n".to_owned()
                + "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: zero\n  namespace: default\n  annotations: {lb.io/endpoint-weights: \"*=0\"}\nspec:\n  clusterIP: 10.96.0.12\n  ports:\n  - {name: http, port: 80}\n"
                + &slice("bad-1", "bad", &[("10.244.1.10", "node1", READY)], &[("http", 8080, "TCP")])
                + &slice("zero-1", "zero", &[("10.244.1.11", "node1", READY)], &[("http", 8080, "TCP")]),
            expected: &[
                "default/bad:http/TCP fe=[10.96.0.11:80 cluster] be=[10.244.1.10:8080 L] affinity=0",
                "default/zero:http/TCP fe=[10.96.0.12:80 cluster] be=[10.244.1.11:8080 L] affinity=0",
            ],
            problems: &[
                (Severity::Warning, "Service/default/bad", "InvalidEndpointWeights"),
                (Severity::Warning, "Service/default/zero", "AllEndpointsWeighZero"),
            ],
            held: &[],
        },
        Row {
            name: "a single-stack Service's addresses of the other family are not served",
            yaml: service(
                "single",
                "  clusterIP: 10.96.0.70\n  externalIPs: [198.51.100.70, \"2001:db8::70\"]\n  ports:\n  - {name: http, port: 80}\n",
            ) + &slice(
                "single-1",
                "single",
                &[("10.244.1.10", "node1", READY), ("fd00::10", "node1", READY)],
                &[("http", 8080, "TCP")],
            ),
            expected: &[
                "default/single:http/TCP fe=[10.96.0.70:80 cluster, 198.51.100.70:80 external] be=[10.244.1.10:8080 L] affinity=0",
            ],
            problems: &[
                (
                    Severity::Warning,
                    "Service/default/single",
                    "IPFamilyNotServed",
                ),
                (
                    Severity::Invalid,
                    "EndpointSlice/default/single-1",
                    "InvalidEndpoint",
                ),
            ],
            held: &[],
        },
        Row {
            name: "NodePort: every IPv4 InternalIP/ExternalIP of this node",
            yaml: NODE1.to_owned()
                + NODE2
                + &service(
                    "web",
                    "  type: NodePort\n  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80, nodePort: 30080}\n",
                )
                + &web_slice(),
            expected: &[
                "default/web:http/TCP fe=[10.96.0.10:80 cluster, 198.18.0.1:30080 nodeport, 203.0.113.1:30080 nodeport] be=[10.244.1.10:8080 L, 10.244.2.10:8080] affinity=0",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "LoadBalancer chains NodePort and adds the ingress IPs; externalIPs",
            yaml: NODE1.to_owned()
                + &service(
                    "web",
                    "  type: LoadBalancer\n  clusterIP: 10.96.0.10\n  externalIPs: [198.51.100.10]\n  ports:\n  - {name: http, port: 80, nodePort: 30080}\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 198.51.100.20\n    - hostname: lb.example.com\n",
                )
                + &web_slice(),
            expected: &[
                "default/web:http/TCP fe=[10.96.0.10:80 cluster, 198.18.0.1:30080 nodeport, 198.51.100.10:80 external, 198.51.100.20:80 lb, 203.0.113.1:30080 nodeport] be=[10.244.1.10:8080 L, 10.244.2.10:8080] affinity=0",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "ingress IPs in ipMode Proxy are the load balancer's: not served here",
            yaml: NODE1.to_owned()
                + &service(
                    "web",
                    "  type: LoadBalancer\n  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80, nodePort: 30080}\nstatus:\n  loadBalancer:\n    ingress:\n    - {ip: 198.51.100.20, ipMode: VIP}\n    - {ip: 198.51.100.21, ipMode: Proxy}\n    - ip: 198.51.100.22\n",
                )
                + &web_slice(),
            expected: &[
                "default/web:http/TCP fe=[10.96.0.10:80 cluster, 198.18.0.1:30080 nodeport, 198.51.100.20:80 lb, 198.51.100.22:80 lb, 203.0.113.1:30080 nodeport] be=[10.244.1.10:8080 L, 10.244.2.10:8080] affinity=0",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "not-ready endpoints are left out",
            yaml: service("web", cluster_ip)
                + &slice(
                    "web-1",
                    "web",
                    &[
                        ("10.244.1.10", "node1", READY),
                        (
                            "10.244.1.11",
                            "node1",
                            "{ready: false, serving: false, terminating: false}",
                        ),
                    ],
                    &[("http", 8080, "TCP")],
                ),
            expected: &[
                "default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[10.244.1.10:8080 L] affinity=0",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "no ready endpoint: serving terminating ones take new flows (KEP-1669)",
            yaml: service("web", cluster_ip)
                + &slice(
                    "web-1",
                    "web",
                    &[
                        (
                            "10.244.1.10",
                            "node1",
                            "{ready: false, serving: true, terminating: true}",
                        ),
                        (
                            "10.244.1.11",
                            "node1",
                            "{ready: false, serving: false, terminating: true}",
                        ),
                    ],
                    &[("http", 8080, "TCP")],
                ),
            expected: &[
                "default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[10.244.1.10:8080 LT] affinity=0 serving-terminating",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "an unset serving condition means serving, as the API and kube-proxy read it: a not-ready terminating endpoint without it takes new flows when none is ready",
            yaml: service("web", cluster_ip)
                + &slice(
                    "web-1",
                    "web",
                    &[
                        (
                            "10.244.1.10",
                            "node1",
                            "{ready: false, terminating: true}",
                        ),
                        (
                            "10.244.1.11",
                            "node1",
                            "{ready: false, serving: false, terminating: true}",
                        ),
                    ],
                    &[("http", 8080, "TCP")],
                ),
            expected: &[
                "default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[10.244.1.10:8080 LT] affinity=0 serving-terminating",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "a terminating endpoint published as ready (publishNotReadyAddresses) serves as a ready one: not flagged terminating",
            yaml: service("web", cluster_ip)
                + &slice(
                    "web-1",
                    "web",
                    &[(
                        "10.244.1.10",
                        "node1",
                        "{ready: true, serving: true, terminating: true}",
                    )],
                    &[("http", 8080, "TCP")],
                ),
            expected: &[
                "default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[10.244.1.10:8080 L] affinity=0",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "a Local policy's serving terminating fallback is weighed as any endpoint (weight 0: none of it)",
            yaml: "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\n  annotations: {lb.io/endpoint-weights: \"10.244.1.10=0, *=1\"}\nspec:\n  clusterIP: 10.96.0.10\n  internalTrafficPolicy: Local\n  ports:\n  - {name: http, port: 80}\n".to_owned()
                + &slice(
                    "web-1",
                    "web",
                    &[
                        (
                            "10.244.1.10",
                            "node1",
                            "{ready: false, serving: true, terminating: true}",
                        ),
                        (
                            "10.244.1.11",
                            "node1",
                            "{ready: false, serving: true, terminating: true}",
                        ),
                        ("10.244.2.10", "node2", READY),
                    ],
                    &[("http", 8080, "TCP")],
                ),
            expected: &[
                "default/web:http/TCP[internal] fe=[10.96.0.10:80 cluster] be=[10.244.1.10:8080 LT, 10.244.1.11:8080 LT] affinity=0 local-only serving-terminating weights=[10.244.1.10:8080=0, 10.244.1.11:8080=1]",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "a service without endpoints keeps its frontends (and no backend)",
            yaml: service("web", cluster_ip),
            expected: &["default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[] affinity=0"],
            problems: &[],
            held: &[],
        },
        Row {
            name: "sessionAffinity ClientIP: default and explicit timeouts",
            yaml: service(
                "sticky",
                "  clusterIP: 10.96.0.50\n  sessionAffinity: ClientIP\n  ports:\n  - {name: http, port: 80}\n",
            ) + &service(
                "sticky-short",
                "  clusterIP: 10.96.0.51\n  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP: {timeoutSeconds: 60}\n  ports:\n  - {name: http, port: 80}\n",
            ),
            expected: &[
                "default/sticky:http/TCP fe=[10.96.0.50:80 cluster] be=[] affinity=10800",
                "default/sticky-short:http/TCP fe=[10.96.0.51:80 cluster] be=[] affinity=60",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "externalTrafficPolicy Local: external frontends get node-local endpoints only, and this node's own clients the cluster-wide ones (kube-proxy's short-circuit)",
            yaml: NODE1.to_owned()
                + &service(
                    "web",
                    "  type: NodePort\n  clusterIP: 10.96.0.10\n  externalTrafficPolicy: Local\n  ports:\n  - {name: http, port: 80, nodePort: 30080}\n",
                )
                + &web_slice(),
            expected: &[
                "default/web:http/TCP[internal] fe=[10.96.0.10:80 cluster, 198.18.0.1:30080 nodeport(node-clients), 203.0.113.1:30080 nodeport(node-clients)] be=[10.244.1.10:8080 L, 10.244.2.10:8080] affinity=0",
                "default/web:http/TCP[external] fe=[198.18.0.1:30080 nodeport, 203.0.113.1:30080 nodeport] be=[10.244.1.10:8080 L] affinity=0 local-only node-clients-elsewhere",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "externalTrafficPolicy Local with loadBalancerSourceRanges: this node's own clients reach the LoadBalancer IP's cluster-wide endpoints, still within the ranges",
            yaml: NODE1.to_owned()
                + &service(
                    "web",
                    "  type: LoadBalancer\n  clusterIP: 10.96.0.10\n  externalTrafficPolicy: Local\n  loadBalancerSourceRanges: [203.0.113.0/24]\n  ports:\n  - {name: http, port: 80, nodePort: 30080}\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 198.51.100.20\n",
                )
                + &web_slice(),
            expected: &[
                "default/web:http/TCP[internal] fe=[10.96.0.10:80 cluster, 198.18.0.1:30080 nodeport(node-clients), 203.0.113.1:30080 nodeport(node-clients)] be=[10.244.1.10:8080 L, 10.244.2.10:8080] affinity=0",
                "default/web:http/TCP[external] fe=[198.18.0.1:30080 nodeport, 203.0.113.1:30080 nodeport] be=[10.244.1.10:8080 L] affinity=0 local-only node-clients-elsewhere",
                "default/web:http/TCP[loadbalancer] fe=[198.51.100.20:80 lb] be=[10.244.1.10:8080 L] affinity=0 local-only node-clients-elsewhere ranges=[203.0.113.0/24]",
                "default/web:http/TCP[loadbalancer-node-clients] fe=[198.51.100.20:80 lb(node-clients)] be=[10.244.1.10:8080 L, 10.244.2.10:8080] affinity=0 ranges=[203.0.113.0/24]",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "zone hints on every endpoint, some for this node's zone: those endpoints",
            yaml: node1_in_zone_a()
                + &service("web", cluster_ip)
                + &hinted_slice(&[
                    ("10.244.1.10", "node1", "{forZones: [{name: zone-a}]}"),
                    ("10.244.2.10", "node2", "{forZones: [{name: zone-b}]}"),
                    ("10.244.3.10", "node3", "{forZones: [{name: zone-a}, {name: zone-c}]}"),
                ]),
            expected: &[
                "default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[10.244.1.10:8080 L, 10.244.3.10:8080] affinity=0",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "zone hints missing on one endpoint: every endpoint",
            yaml: node1_in_zone_a()
                + &service("web", cluster_ip)
                + &hinted_slice(&[
                    ("10.244.1.10", "node1", "{forZones: [{name: zone-a}]}"),
                    ("10.244.2.10", "node2", ""),
                ]),
            expected: &[
                "default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[10.244.1.10:8080 L, 10.244.2.10:8080] affinity=0",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "zone hints for other zones only, or a node without a zone: every endpoint",
            yaml: node1_in_zone_a()
                + &service("web", cluster_ip)
                + &hinted_slice(&[
                    ("10.244.1.10", "node1", "{forZones: [{name: zone-b}]}"),
                    ("10.244.2.10", "node2", "{forZones: [{name: zone-c}]}"),
                ])
                + &service("api", "  clusterIP: 10.96.0.11\n  ports:\n  - {name: http, port: 80}\n")
                + &hinted_slice(&[("10.244.1.11", "node1", "{forZones: [{name: zone-a}]}")])
                    .replace("name: web-1", "name: api-1")
                    .replace("service-name: web", "service-name: api"),
            expected: &[
                "default/api:http/TCP fe=[10.96.0.11:80 cluster] be=[10.244.1.11:8080 L] affinity=0",
                "default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[10.244.1.10:8080 L, 10.244.2.10:8080] affinity=0",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "node hints on every endpoint, one for this node: that endpoint, before zones",
            yaml: node1_in_zone_a()
                + &service("web", cluster_ip)
                + &hinted_slice(&[
                    ("10.244.1.10", "node1", "{forNodes: [{name: node1}], forZones: [{name: zone-a}]}"),
                    ("10.244.2.10", "node2", "{forNodes: [{name: node2}], forZones: [{name: zone-a}]}"),
                ]),
            expected: &[
                "default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[10.244.1.10:8080 L] affinity=0",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "hints narrow a Cluster policy only: externalTrafficPolicy Local keeps its local endpoints",
            yaml: node1_in_zone_a()
                + &service(
                    "web",
                    "  type: NodePort\n  clusterIP: 10.96.0.10\n  externalTrafficPolicy: Local\n  ports:\n  - {name: http, port: 80, nodePort: 30080}\n",
                )
                + &hinted_slice(&[
                    ("10.244.1.10", "node1", "{forZones: [{name: zone-b}]}"),
                    ("10.244.2.10", "node2", "{forZones: [{name: zone-a}]}"),
                ]),
            expected: &[
                "default/web:http/TCP[internal] fe=[10.96.0.10:80 cluster, 198.18.0.1:30080 nodeport(node-clients), 203.0.113.1:30080 nodeport(node-clients)] be=[10.244.2.10:8080] affinity=0",
                "default/web:http/TCP[external] fe=[198.18.0.1:30080 nodeport, 203.0.113.1:30080 nodeport] be=[10.244.1.10:8080 L] affinity=0 local-only node-clients-elsewhere",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "internalTrafficPolicy Local: the ClusterIP gets node-local endpoints only",
            yaml: service(
                "web",
                "  clusterIP: 10.96.0.10\n  internalTrafficPolicy: Local\n  ports:\n  - {name: http, port: 80}\n",
            ) + &slice(
                "web-1",
                "web",
                &[("10.244.2.10", "node2", READY)],
                &[("http", 80, "TCP")],
            ),
            expected: &[
                "default/web:http/TCP[internal] fe=[10.96.0.10:80 cluster] be=[] affinity=0 local-only",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "internalTrafficPolicy Local with no endpoint anywhere rejects as Cluster does (kube-proxy drops only for none on this node)",
            yaml: service(
                "web",
                "  clusterIP: 10.96.0.10\n  internalTrafficPolicy: Local\n  ports:\n  - {name: http, port: 80}\n",
            ) + &slice(
                "web-1",
                "web",
                &[(
                    "10.244.1.10",
                    "node1",
                    "{ready: false, serving: false, terminating: true}",
                )],
                &[("http", 80, "TCP")],
            ),
            expected: &["default/web:http/TCP[internal] fe=[10.96.0.10:80 cluster] be=[] affinity=0"],
            problems: &[],
            held: &[],
        },
        Row {
            name: "a Local policy with no ready endpoint on this node takes its serving terminating ones, though other nodes have ready ones (KEP-1669)",
            yaml: NODE1.to_owned()
                + &service(
                    "web",
                    "  type: NodePort\n  clusterIP: 10.96.0.10\n  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local\n  ports:\n  - {name: http, port: 80, nodePort: 30080}\n",
                )
                + &slice(
                    "web-1",
                    "web",
                    &[
                        (
                            "10.244.1.10",
                            "node1",
                            "{ready: false, serving: true, terminating: true}",
                        ),
                        (
                            "10.244.1.11",
                            "node1",
                            "{ready: false, serving: false, terminating: true}",
                        ),
                        ("10.244.2.10", "node2", READY),
                    ],
                    &[("http", 80, "TCP")],
                ),
            expected: &[
                "default/web:http/TCP[internal] fe=[10.96.0.10:80 cluster, 198.18.0.1:30080 nodeport(node-clients), 203.0.113.1:30080 nodeport(node-clients)] be=[10.244.1.10:80 LT] affinity=0 local-only serving-terminating",
                "default/web:http/TCP[external] fe=[198.18.0.1:30080 nodeport, 203.0.113.1:30080 nodeport] be=[10.244.1.10:80 LT] affinity=0 local-only serving-terminating node-clients-elsewhere",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "loadBalancerSourceRanges: the LoadBalancer IPs get their own checked entry",
            yaml: NODE1.to_owned()
                + &service(
                    "web",
                    "  type: LoadBalancer\n  clusterIP: 10.96.0.10\n  loadBalancerSourceRanges: [203.0.113.0/24, \"192.0.2.7/32\", \"2001:db8::/32\"]\n  ports:\n  - {name: http, port: 80, nodePort: 30080}\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 198.51.100.20\n",
                )
                + &web_slice(),
            expected: &[
                "default/web:http/TCP[internal] fe=[10.96.0.10:80 cluster] be=[10.244.1.10:8080 L, 10.244.2.10:8080] affinity=0",
                "default/web:http/TCP[external] fe=[198.18.0.1:30080 nodeport, 203.0.113.1:30080 nodeport] be=[10.244.1.10:8080 L, 10.244.2.10:8080] affinity=0",
                "default/web:http/TCP[loadbalancer] fe=[198.51.100.20:80 lb] be=[10.244.1.10:8080 L, 10.244.2.10:8080] affinity=0 ranges=[192.0.2.7/32, 203.0.113.0/24]",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "the load-balancing annotation picks Maglev",
            yaml: "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\n  annotations: {lb.io/load-balancing: maglev}\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80}\n".to_owned(),
            expected: &["default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[] affinity=0 maglev"],
            problems: &[],
            held: &[],
        },
        Row {
            name: "an unknown load-balancing algorithm",
            yaml: "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: bad\n  namespace: default\n  annotations: {lb.io/load-balancing: round-robin}\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80}\n".to_owned(),
            expected: &[],
            problems: &[(Severity::Invalid, "Service/default/bad", "InvalidLoadBalancing")],
            held: &["default/bad"],
        },
        // Bad input: the offending object is skipped with a problem; the others are untouched.
        Row {
            name: "invalid loadBalancerSourceRanges",
            yaml: service(
                "bad",
                "  type: LoadBalancer\n  clusterIP: 10.96.0.20\n  loadBalancerSourceRanges: [10.0.0.0/33]\n  ports:\n  - {port: 80}\n",
            ),
            expected: &[],
            problems: &[(
                Severity::Invalid,
                "Service/default/bad",
                "InvalidSourceRange",
            )],
            held: &["default/bad"],
        },
        Row {
            name: "loadBalancerSourceRanges all IPv6: no IPv4 client may use the IPv4 LoadBalancer IPs",
            yaml: service(
                "v6only",
                "  type: LoadBalancer\n  clusterIP: 10.96.0.21\n  loadBalancerSourceRanges: [\"2001:db8::/32\"]\n  ports:\n  - {name: http, port: 80, nodePort: 30081}\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 198.51.100.21\n",
            ),
            expected: &[
                "default/v6only:http/TCP[internal] fe=[10.96.0.21:80 cluster] be=[] affinity=0",
                "default/v6only:http/TCP[loadbalancer] fe=[198.51.100.21:80 lb] be=[] affinity=0 ranges=[]",
            ],
            problems: &[(
                Severity::Warning,
                "Service/default/v6only",
                "NoSourceRangeOfFamily",
            )],
            held: &[],
        },
        Row {
            name: "source ranges with host bits set are masked, with a Warning, and merge with their network",
            yaml: service(
                "hostbits",
                "  type: LoadBalancer\n  clusterIP: 10.96.0.22\n  loadBalancerSourceRanges: [10.1.2.3/8, 10.0.0.0/8, 192.0.2.7/24]\n  ports:\n  - {name: http, port: 80}\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 198.51.100.22\n",
            ),
            expected: &[
                "default/hostbits:http/TCP[internal] fe=[10.96.0.22:80 cluster] be=[] affinity=0",
                "default/hostbits:http/TCP[loadbalancer] fe=[198.51.100.22:80 lb] be=[] affinity=0 ranges=[10.0.0.0/8, 192.0.2.0/24]",
            ],
            problems: &[
                (Severity::Warning, "Service/default/hostbits", "SourceRangeHostBits"),
                (Severity::Warning, "Service/default/hostbits", "SourceRangeHostBits"),
            ],
            held: &[],
        },
        Row {
            name: "an IPv6 source range that is not a CIDR",
            yaml: service(
                "bad",
                "  type: LoadBalancer\n  clusterIP: 10.96.0.20\n  loadBalancerSourceRanges: [\"2001:db8::/129\"]\n  ports:\n  - {port: 80}\n",
            ),
            expected: &[],
            problems: &[(Severity::Invalid, "Service/default/bad", "InvalidSourceRange")],
            held: &["default/bad"],
        },
        Row {
            name: "healthCheckNodePort outside the NodePort range (an HTTP server on port 22)",
            yaml: service(
                "bad",
                "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 22\n  clusterIP: 10.96.0.20\n  ports:\n  - {port: 80, nodePort: 30082}\n",
            ) + &service("web", cluster_ip),
            expected: &["default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[] affinity=0"],
            problems: &[(
                Severity::Invalid,
                "Service/default/bad",
                "InvalidHealthCheckNodePort",
            )],
            held: &["default/bad"],
        },
        Row {
            name: "healthCheckNodePort above 65535",
            yaml: service(
                "bad",
                "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 70000\n  clusterIP: 10.96.0.20\n  ports:\n  - {port: 80, nodePort: 30082}\n",
            ),
            expected: &[],
            problems: &[(
                Severity::Invalid,
                "Service/default/bad",
                "InvalidHealthCheckNodePort",
            )],
            held: &["default/bad"],
        },
        Row {
            name: "nodePort above 65535",
            yaml: service(
                "bad",
                "  type: NodePort\n  clusterIP: 10.96.0.20\n  ports:\n  - {port: 80, nodePort: 70000}\n",
            ),
            expected: &["default/bad:/TCP fe=[10.96.0.20:80 cluster] be=[] affinity=0"],
            problems: &[(Severity::Invalid, "Service/default/bad", "InvalidNodePort")],
            held: &[],
        },
        Row {
            name: "nodePort negative",
            yaml: service(
                "bad",
                "  type: NodePort\n  clusterIP: 10.96.0.20\n  ports:\n  - {port: 80, nodePort: -1}\n",
            ),
            expected: &["default/bad:/TCP fe=[10.96.0.20:80 cluster] be=[] affinity=0"],
            problems: &[(Severity::Invalid, "Service/default/bad", "InvalidNodePort")],
            held: &[],
        },
        Row {
            name: "targetPort 0",
            yaml: service(
                "bad",
                "  clusterIP: 10.96.0.20\n  ports:\n  - {port: 80, targetPort: 0}\n",
            ),
            expected: &[],
            problems: &[(Severity::Invalid, "Service/default/bad", "InvalidTargetPort")],
            held: &["default/bad"],
        },
        Row {
            name: "targetPort above 65535",
            yaml: service(
                "bad",
                "  clusterIP: 10.96.0.20\n  ports:\n  - {port: 80, targetPort: 65536}\n",
            ),
            expected: &[],
            problems: &[(Severity::Invalid, "Service/default/bad", "InvalidTargetPort")],
            held: &["default/bad"],
        },
        Row {
            name: "targetPort neither a number nor a port name",
            yaml: service(
                "bad",
                "  clusterIP: 10.96.0.20\n  ports:\n  - {port: 80, targetPort: HTTP_PORT}\n",
            ),
            expected: &[],
            problems: &[(Severity::Invalid, "Service/default/bad", "InvalidTargetPort")],
            held: &["default/bad"],
        },
        Row {
            name: "targetPort by name and by number in range",
            yaml: service(
                "web",
                "  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80, targetPort: http-alt}\n  - {name: https, port: 443, targetPort: 65535}\n",
            ),
            expected: &[
                "default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[] affinity=0",
                "default/web:https/TCP fe=[10.96.0.10:443 cluster] be=[] affinity=0",
            ],
            problems: &[],
            held: &[],
        },
        Row {
            name: "a Service without a name",
            yaml: "---\napiVersion: v1\nkind: Service\nmetadata:\n  namespace: default\nspec:\n  clusterIP: 10.96.0.20\n  ports:\n  - {port: 80}\n".to_owned()
                + &service("web", cluster_ip),
            expected: &["default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[] affinity=0"],
            problems: &[(Severity::Invalid, "Service/default/", "MissingName")],
            held: &["default/"],
        },
        Row {
            name: "invalid clusterIP string",
            yaml: service(
                "bad",
                "  clusterIP: 10.96.0.300\n  ports:\n  - {port: 80}\n",
            ) + &service("web", cluster_ip),
            expected: &["default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[] affinity=0"],
            problems: &[(Severity::Invalid, "Service/default/bad", "InvalidClusterIP")],
            held: &["default/bad"],
        },
        Row {
            name: "invalid externalIP string",
            yaml: service(
                "bad",
                "  clusterIP: 10.96.0.20\n  externalIPs: [not-an-ip]\n  ports:\n  - {port: 80}\n",
            ) + &service("web", cluster_ip),
            expected: &["default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[] affinity=0"],
            problems: &[(
                Severity::Invalid,
                "Service/default/bad",
                "InvalidExternalIP",
            )],
            held: &["default/bad"],
        },
        Row {
            name: "port 0 and port above 65535",
            yaml: service("zero", "  clusterIP: 10.96.0.20\n  ports:\n  - {port: 0}\n")
                + &service(
                    "big",
                    "  clusterIP: 10.96.0.21\n  ports:\n  - {port: 70000}\n",
                )
                + &service("web", cluster_ip),
            expected: &["default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[] affinity=0"],
            problems: &[
                (Severity::Invalid, "Service/default/big", "InvalidPort"),
                (Severity::Invalid, "Service/default/zero", "InvalidPort"),
            ],
            held: &["default/big", "default/zero"],
        },
        Row {
            name: "unknown protocol refused; SCTP served, with a warning for its ClusterIP from pods",
            yaml: service(
                "weird",
                "  clusterIP: 10.96.0.20\n  ports:\n  - {port: 80, protocol: XTP}\n",
            ) + &service(
                "sctp",
                "  clusterIP: 10.96.0.21\n  ports:\n  - {name: a, port: 80, protocol: SCTP}\n  - {name: b, port: 81}\n",
            ),
            expected: &[
                "default/sctp:a/SCTP fe=[10.96.0.21:80 cluster] be=[] affinity=0",
                "default/sctp:b/TCP fe=[10.96.0.21:81 cluster] be=[] affinity=0",
            ],
            problems: &[
                (
                    Severity::Invalid,
                    "Service/default/weird",
                    "InvalidProtocol",
                ),
                (
                    Severity::Unsupported,
                    "Service/default/sctp",
                    "SCTPClusterIPFromPods",
                ),
            ],
            held: &["default/weird"],
        },
        Row {
            name: "SCTP over IPv6: a dual-stack SCTP port gets a service of each family",
            yaml: service(
                "sctp6",
                "  clusterIP: 10.96.0.22\n  clusterIPs: [10.96.0.22, \"fd00::22\"]\n  ports:\n  - {name: a, port: 80, protocol: SCTP}\n  - {name: b, port: 81}\n",
            ),
            expected: &[
                "default/sctp6:a/SCTP fe=[10.96.0.22:80 cluster] be=[] affinity=0",
                "default/sctp6:a/SCTP[ipv6] fe=[[fd00::22]:80 cluster] be=[] affinity=0",
                "default/sctp6:b/TCP fe=[10.96.0.22:81 cluster] be=[] affinity=0",
                "default/sctp6:b/TCP[ipv6] fe=[[fd00::22]:81 cluster] be=[] affinity=0",
            ],
            problems: &[(
                Severity::Unsupported,
                "Service/default/sctp6",
                "SCTPClusterIPFromPods",
            )],
            held: &[],
        },
        Row {
            name: "nodePort outside the range: only its NodePort frontends are skipped",
            yaml: NODE1.to_owned()
                + &service(
                    "bad",
                    "  type: NodePort\n  clusterIP: 10.96.0.20\n  ports:\n  - {name: a, port: 80, nodePort: 8080}\n  - {name: b, port: 81, nodePort: 30081}\n",
                ),
            expected: &[
                "default/bad:a/TCP fe=[10.96.0.20:80 cluster] be=[] affinity=0",
                "default/bad:b/TCP fe=[10.96.0.20:81 cluster, 198.18.0.1:30081 nodeport, 203.0.113.1:30081 nodeport] be=[] affinity=0",
            ],
            problems: &[(Severity::Invalid, "Service/default/bad", "InvalidNodePort")],
            held: &[],
        },
        Row {
            name: "duplicate ports",
            yaml: service(
                "dup",
                "  clusterIP: 10.96.0.20\n  ports:\n  - {name: a, port: 80}\n  - {name: b, port: 80}\n",
            ),
            expected: &[],
            problems: &[(Severity::Invalid, "Service/default/dup", "DuplicatePort")],
            held: &["default/dup"],
        },
        Row {
            name: "an EndpointSlice for a missing Service",
            yaml: slice(
                "ghost-1",
                "ghost",
                &[("10.244.1.10", "node1", READY)],
                &[("", 80, "TCP")],
            ) + &service("web", cluster_ip),
            expected: &["default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[] affinity=0"],
            problems: &[(
                Severity::Invalid,
                "EndpointSlice/default/ghost-1",
                "ServiceNotFound",
            )],
            held: &[],
        },
        Row {
            name: "an invalid endpoint address is skipped alone",
            yaml: service("web", cluster_ip)
                + &slice(
                    "web-1",
                    "web",
                    &[
                        ("10.244.1.10", "node1", READY),
                        ("10.244.1.999", "node1", READY),
                    ],
                    &[("http", 8080, "TCP")],
                ),
            expected: &[
                "default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[10.244.1.10:8080 L] affinity=0",
            ],
            problems: &[(
                Severity::Invalid,
                "EndpointSlice/default/web-1",
                "InvalidEndpoint",
            )],
            held: &[],
        },
        Row {
            name: "two services claiming one frontend: the second is refused",
            yaml: service("a", "  clusterIP: 10.96.0.10\n  ports:\n  - {port: 80}\n")
                + &service("b", "  clusterIP: 10.96.0.10\n  ports:\n  - {port: 80}\n"),
            expected: &["default/a:/TCP fe=[10.96.0.10:80 cluster] be=[] affinity=0"],
            problems: &[(Severity::Invalid, "Service/default/b", "FrontendConflict")],
            held: &[],
        },
    ]
    .into_iter()
    .chain(ownership_rows())
    .collect()
}

/// A Service with a creationTimestamp ("" for none) and a uid ("" for none).
fn aged_service(namespace: &str, name: &str, created: &str, uid: &str, spec: &str) -> String {
    let mut metadata = format!("  name: {name}\n  namespace: {namespace}\n");
    if !created.is_empty() {
        metadata += &format!("  creationTimestamp: \"{created}\"\n");
    }
    if !uid.is_empty() {
        metadata += &format!("  uid: {uid}\n");
    }
    format!("---\napiVersion: v1\nkind: Service\nmetadata:\n{metadata}spec:\n{spec}\n")
}

const OLD: &str = "2026-01-01T00:00:00Z";
const NEW: &str = "2026-06-01T00:00:00Z";

/// Several Services claiming one frontend (address, port, protocol): one serves it, whatever
/// the names (the hijackers below sort first) and the order; the others lose that frontend only.
fn ownership_rows() -> Vec<Row> {
    let frontend = |created| {
        aged_service(
            "default",
            "frontend",
            created,
            "uid-frontend",
            "  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80}\n",
        )
    };
    vec![
        Row {
            name: "an older Service's externalIP equal to another's ClusterIP: the ClusterIP wins",
            yaml: aged_service(
                "default",
                "aa-dup",
                OLD,
                "uid-dup",
                "  clusterIP: 10.96.0.99\n  externalIPs: [10.96.0.10]\n  ports:\n  - {name: http, port: 80}\n",
            ) + &frontend(NEW),
            expected: &[
                "default/aa-dup:http/TCP fe=[10.96.0.99:80 cluster] be=[] affinity=0",
                "default/frontend:http/TCP fe=[10.96.0.10:80 cluster] be=[] affinity=0",
            ],
            problems: &[(
                Severity::Invalid,
                "Service/default/aa-dup",
                "FrontendConflict",
            )],
            held: &[],
        },
        Row {
            name: "a LoadBalancer ingress IP equal to another's ClusterIP: the ClusterIP wins",
            yaml: NODE1.to_owned()
                + &aged_service(
                    "a",
                    "lb",
                    OLD,
                    "uid-lb",
                    "  type: LoadBalancer\n  clusterIP: 10.96.0.99\n  ports:\n  - {name: http, port: 80, nodePort: 30080}\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 10.96.0.10\n",
                )
                + &frontend(NEW),
            expected: &[
                "a/lb:http/TCP fe=[10.96.0.99:80 cluster, 198.18.0.1:30080 nodeport, 203.0.113.1:30080 nodeport] be=[] affinity=0",
                "default/frontend:http/TCP fe=[10.96.0.10:80 cluster] be=[] affinity=0",
            ],
            problems: &[(Severity::Invalid, "Service/a/lb", "FrontendConflict")],
            held: &[],
        },
        Row {
            name: "kube-dns's ClusterIP port 53 stays kube-dns's against a Service in namespace a",
            yaml: aged_service(
                "kube-system",
                "kube-dns",
                NEW,
                "uid-dns",
                "  clusterIP: 10.96.0.10\n  ports:\n  - {name: dns, port: 53, protocol: UDP}\n  - {name: dns-tcp, port: 53, protocol: TCP}\n",
            ) + &aged_service(
                "a",
                "a",
                OLD,
                "uid-a",
                "  clusterIP: 10.96.0.99\n  externalIPs: [10.96.0.10]\n  ports:\n  - {name: dns, port: 53, protocol: UDP}\n",
            ),
            expected: &[
                "a/a:dns/UDP fe=[10.96.0.99:53 cluster] be=[] affinity=0",
                "kube-system/kube-dns:dns/UDP fe=[10.96.0.10:53 cluster] be=[] affinity=0",
                "kube-system/kube-dns:dns-tcp/TCP fe=[10.96.0.10:53 cluster] be=[] affinity=0",
            ],
            problems: &[(Severity::Invalid, "Service/a/a", "FrontendConflict")],
            held: &[],
        },
        Row {
            name: "two externalIP claims: the older Service keeps it, the newer keeps its others",
            yaml: aged_service(
                "default",
                "a-new",
                NEW,
                "uid-1",
                "  clusterIP: 10.96.0.11\n  externalIPs: [192.0.2.10, 192.0.2.11]\n  ports:\n  - {name: http, port: 80}\n",
            ) + &aged_service(
                "default",
                "b-old",
                OLD,
                "uid-2",
                "  clusterIP: 10.96.0.12\n  externalIPs: [192.0.2.10]\n  ports:\n  - {name: http, port: 80}\n",
            ),
            expected: &[
                "default/a-new:http/TCP fe=[10.96.0.11:80 cluster, 192.0.2.11:80 external] be=[] affinity=0",
                "default/b-old:http/TCP fe=[10.96.0.12:80 cluster, 192.0.2.10:80 external] be=[] affinity=0",
            ],
            problems: &[(
                Severity::Invalid,
                "Service/default/a-new",
                "FrontendConflict",
            )],
            held: &[],
        },
        Row {
            name: "an externalIP against a LoadBalancer IP: the same kind, the older keeps it",
            yaml: aged_service(
                "default",
                "a-new",
                NEW,
                "uid-1",
                "  clusterIP: 10.96.0.11\n  externalIPs: [192.0.2.10]\n  ports:\n  - {name: http, port: 80}\n",
            ) + &aged_service(
                "default",
                "b-old",
                OLD,
                "uid-2",
                "  type: LoadBalancer\n  clusterIP: 10.96.0.12\n  ports:\n  - {name: http, port: 80}\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 192.0.2.10\n",
            ),
            expected: &[
                "default/a-new:http/TCP fe=[10.96.0.11:80 cluster] be=[] affinity=0",
                "default/b-old:http/TCP fe=[10.96.0.12:80 cluster, 192.0.2.10:80 lb] be=[] affinity=0",
            ],
            problems: &[(
                Severity::Invalid,
                "Service/default/a-new",
                "FrontendConflict",
            )],
            held: &[],
        },
        Row {
            name: "created in the same second: the lesser uid keeps it",
            yaml: aged_service(
                "default",
                "a",
                OLD,
                "uid-2",
                "  clusterIP: 10.96.0.11\n  externalIPs: [192.0.2.10]\n  ports:\n  - {name: http, port: 80}\n",
            ) + &aged_service(
                "default",
                "b",
                OLD,
                "uid-1",
                "  clusterIP: 10.96.0.12\n  externalIPs: [192.0.2.10]\n  ports:\n  - {name: http, port: 80}\n",
            ),
            expected: &[
                "default/a:http/TCP fe=[10.96.0.11:80 cluster] be=[] affinity=0",
                "default/b:http/TCP fe=[10.96.0.12:80 cluster, 192.0.2.10:80 external] be=[] affinity=0",
            ],
            problems: &[(Severity::Invalid, "Service/default/a", "FrontendConflict")],
            held: &[],
        },
        Row {
            name: "without a creationTimestamp a Service counts as the newest (hand-written manifests)",
            yaml: aged_service(
                "default",
                "a",
                "",
                "",
                "  clusterIP: 10.96.0.11\n  externalIPs: [192.0.2.10]\n  ports:\n  - {name: http, port: 80}\n",
            ) + &aged_service(
                "default",
                "b",
                NEW,
                "",
                "  clusterIP: 10.96.0.12\n  externalIPs: [192.0.2.10]\n  ports:\n  - {name: http, port: 80}\n",
            ),
            expected: &[
                "default/a:http/TCP fe=[10.96.0.11:80 cluster] be=[] affinity=0",
                "default/b:http/TCP fe=[10.96.0.12:80 cluster, 192.0.2.10:80 external] be=[] affinity=0",
            ],
            problems: &[(Severity::Invalid, "Service/default/a", "FrontendConflict")],
            held: &[],
        },
        Row {
            name: "two ClusterIP claims (only a hand-made snapshot has them): the older keeps it, the newer has nothing left",
            yaml: aged_service(
                "default",
                "a",
                NEW,
                "",
                "  clusterIP: 10.96.0.10\n  ports:\n  - {port: 80}\n",
            ) + &aged_service(
                "default",
                "b",
                OLD,
                "",
                "  clusterIP: 10.96.0.10\n  ports:\n  - {port: 80}\n",
            ),
            expected: &["default/b:/TCP fe=[10.96.0.10:80 cluster] be=[] affinity=0"],
            problems: &[(Severity::Invalid, "Service/default/a", "FrontendConflict")],
            held: &[],
        },
        Row {
            name: "a Service's externalIP equal to its own ClusterIP is no conflict",
            yaml: aged_service(
                "default",
                "self",
                OLD,
                "",
                "  clusterIP: 10.96.0.10\n  externalIPs: [10.96.0.10]\n  ports:\n  - {port: 80}\n",
            ),
            expected: &[
                "default/self:/TCP fe=[10.96.0.10:80 cluster, 10.96.0.10:80 external] be=[] affinity=0",
            ],
            problems: &[],
            held: &[],
        },
    ]
}

#[test]
fn compile_implements_the_service_contract_row_by_row() {
    let mut failures = Vec::new();
    for row in rows() {
        let (desired, problems) = compile(&snapshot(&row.yaml, "node1"), &node());
        let rendered = render(&desired);
        let expected: Vec<String> = row.expected.iter().map(|line| line.to_string()).collect();
        let mut problem_rows = problem_summary(&problems);
        problem_rows.sort();
        let mut expected_problems: Vec<(Severity, String, &str)> = row
            .problems
            .iter()
            .map(|(s, o, r)| (*s, o.to_string(), *r))
            .collect();
        expected_problems.sort();
        let held: Vec<String> = desired
            .held
            .iter()
            .map(|(ns, name)| format!("{ns}/{name}"))
            .collect();
        if rendered != expected || problem_rows != expected_problems || held != row.held {
            failures.push(format!(
                "{}:\n  desired  {rendered:#?}\n  expected {expected:#?}\n  problems {problem_rows:?}\n  expected {expected_problems:?}\n  held {held:?} expected {:?}",
                row.name, row.held
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn more_endpoints_than_a_slot_table_holds_skips_the_service() {
    let endpoints: Vec<String> = (0..=lb_common::limits::MAX_BACKENDS_PER_SERVICE)
        .map(|i| format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256))
        .collect();
    let endpoint_rows: Vec<(&str, &str, &str)> = endpoints
        .iter()
        .map(|addr| (addr.as_str(), "node2", READY))
        .collect();
    let yaml = service(
        "huge",
        "  clusterIP: 10.96.0.60\n  ports:\n  - {name: http, port: 80}\n",
    ) + &slice("huge-1", "huge", &endpoint_rows, &[("http", 8080, "TCP")])
        + &service(
            "web",
            "  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80}\n",
        );
    let (desired, problems) = compile(&snapshot(&yaml, "node1"), &node());
    assert_eq!(desired.services.len(), 1, "only web remains");
    assert!(desired.held.contains(&("default".into(), "huge".into())));
    assert_eq!(
        problem_summary(&problems),
        vec![(
            Severity::Invalid,
            "Service/default/huge".into(),
            "TooManyEndpoints"
        )]
    );
}

#[test]
fn nodeport_addresses_limit_which_node_addresses_serve_node_ports() {
    let yaml = NODE1.to_owned()
        + &service(
            "web",
            "  type: NodePort\n  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80, nodePort: 30080}\n",
        );
    let mut context = node();
    let cidrs = |texts: &[&str]| {
        NodePortAddresses::Cidrs(
            texts
                .iter()
                .map(|text| text.parse().expect("cidr"))
                .collect(),
        )
    };
    context.nodeport_addresses = cidrs(&["203.0.113.0/24"]);
    let (desired, _) = compile(&snapshot(&yaml, "node1"), &context);
    assert_eq!(
        render(&desired),
        [
            "default/web:http/TCP fe=[10.96.0.10:80 cluster, 203.0.113.1:30080 nodeport] be=[] affinity=0"
        ]
    );
    // Per family, as kube-proxy reads the flag: IPv4 CIDRs alone leave the IPv6 node
    // addresses serving, and an IPv6 CIDR narrows them.
    let dual = NODE1.to_owned()
        + &service(
            "web",
            "  type: NodePort\n  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, \"fd00::10\"]\n  ports:\n  - {name: http, port: 80, nodePort: 30080}\n",
        );
    let (desired, _) = compile(&snapshot(&dual, "node1"), &context);
    assert_eq!(
        render(&desired),
        [
            "default/web:http/TCP fe=[10.96.0.10:80 cluster, 203.0.113.1:30080 nodeport] be=[] affinity=0",
            "default/web:http/TCP[ipv6] fe=[[fd00::1]:30080 nodeport, [fd00::10]:80 cluster] be=[] affinity=0",
        ]
    );
    context.nodeport_addresses = cidrs(&["203.0.113.0/24", "2001:db8::/32"]);
    let (desired, _) = compile(&snapshot(&dual, "node1"), &context);
    assert_eq!(
        render(&desired),
        [
            "default/web:http/TCP fe=[10.96.0.10:80 cluster, 203.0.113.1:30080 nodeport] be=[] affinity=0",
            "default/web:http/TCP[ipv6] fe=[[fd00::10]:80 cluster] be=[] affinity=0",
        ]
    );
    // Without a Node object, the configured fallback addresses serve.
    let mut context = node();
    context.fallback_addresses = vec!["192.0.2.7".parse().expect("ip")];
    let yaml = service(
        "web",
        "  type: NodePort\n  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80, nodePort: 30080}\n",
    );
    let (desired, _) = compile(&snapshot(&yaml, "node1"), &context);
    assert_eq!(
        render(&desired),
        [
            "default/web:http/TCP fe=[10.96.0.10:80 cluster, 192.0.2.7:30080 nodeport] be=[] affinity=0"
        ]
    );
}

#[test]
fn nodeport_addresses_primary_serves_the_first_internal_ip_of_each_family() {
    // The Node lists an ExternalIP before a second InternalIP of the same family: primary is
    // the first InternalIP, as kube-proxy picks its node IPs; the IPv6 family has only an
    // ExternalIP, which is its primary then.
    let node_yaml = "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node1\nstatus:\n  addresses:\n  - {type: Hostname, address: node1}\n  - {type: ExternalIP, address: 198.18.0.1}\n  - {type: InternalIP, address: 203.0.113.1}\n  - {type: InternalIP, address: 203.0.113.9}\n  - {type: ExternalIP, address: \"2001:db8::1\"}\n  - {type: ExternalIP, address: \"2001:db8::2\"}\n";
    let dual = node_yaml.to_owned()
        + &service(
            "web",
            "  type: NodePort\n  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, \"fd00::10\"]\n  ports:\n  - {name: http, port: 80, nodePort: 30080}\n",
        );
    let mut context = node();
    let (desired, _) = compile(&snapshot(&dual, "node1"), &context);
    assert_eq!(
        render(&desired),
        [
            "default/web:http/TCP fe=[10.96.0.10:80 cluster, 198.18.0.1:30080 nodeport, 203.0.113.1:30080 nodeport, 203.0.113.9:30080 nodeport] be=[] affinity=0",
            "default/web:http/TCP[ipv6] fe=[[2001:db8::1]:30080 nodeport, [2001:db8::2]:30080 nodeport, [fd00::10]:80 cluster] be=[] affinity=0",
        ],
        "every address without the setting"
    );
    context.nodeport_addresses = NodePortAddresses::Primary;
    let (desired, _) = compile(&snapshot(&dual, "node1"), &context);
    assert_eq!(
        render(&desired),
        [
            "default/web:http/TCP fe=[10.96.0.10:80 cluster, 203.0.113.1:30080 nodeport] be=[] affinity=0",
            "default/web:http/TCP[ipv6] fe=[[2001:db8::1]:30080 nodeport, [fd00::10]:80 cluster] be=[] affinity=0",
        ]
    );
    // Without a Node object, the first fallback address of each family.
    context.fallback_addresses = ["192.0.2.7", "192.0.2.8", "fd00::7"]
        .iter()
        .map(|text| text.parse().expect("ip"))
        .collect();
    let (desired, _) = compile(&snapshot(&dual[node_yaml.len()..], "node1"), &context);
    assert_eq!(
        render(&desired),
        [
            "default/web:http/TCP fe=[10.96.0.10:80 cluster, 192.0.2.7:30080 nodeport] be=[] affinity=0",
            "default/web:http/TCP[ipv6] fe=[[fd00::7]:30080 nodeport, [fd00::10]:80 cluster] be=[] affinity=0",
        ]
    );
}

#[test]
fn nodeport_addresses_items_are_cidrs_or_primary_alone() {
    let items = |text: &str| -> Result<NodePortAddresses, String> {
        let items = text
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<NodePortAddress>, String>>()?;
        NodePortAddresses::from_items(&items)
    };
    assert_eq!(items("primary"), Ok(NodePortAddresses::Primary));
    assert_eq!(
        items("10.0.0.0/8,fd00::/8"),
        Ok(NodePortAddresses::Cidrs(vec![
            "10.0.0.0/8".parse().expect("cidr"),
            "fd00::/8".parse().expect("cidr"),
        ]))
    );
    assert_eq!(
        NodePortAddresses::from_items(&[]),
        Ok(NodePortAddresses::All)
    );
    for (text, reason) in [
        ("primary,10.0.0.0/8", "cannot be given with other items"),
        ("10.0.0.0/8,primary", "cannot be given with other items"),
        ("primary,primary", "cannot be given with other items"),
        ("Primary", "nor primary"),
        ("10.0.0.1", "not a CIDR"),
    ] {
        let error = items(text).expect_err(text);
        assert!(error.contains(reason), "{text}: {error}");
    }
}

#[test]
fn malformed_yaml_is_reported_with_its_line() {
    let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: ok\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: [unclosed\n";
    let (line, message) = parse_documents(text).expect_err("malformed");
    // The unclosed bracket of the second document (line 9), never the first document.
    assert_eq!(line, Some(9), "{message}");
    let wrong_type = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports: 80\n";
    let (line, message) = parse_documents(wrong_type).expect_err("ports must be a list");
    assert_eq!(line, Some(1), "{message}");
    assert!(
        message.contains("Service \"web\": spec.ports: invalid type"),
        "{message}"
    );
    // The field a wrong type is in is named by its path.
    let nested = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports:\n  - {port: 80}\n  - {port: http}\n";
    let (_, message) = parse_documents(nested).expect_err("a port must be a number");
    assert!(
        message.starts_with("Service \"web\": spec.ports[1].port: invalid type: string \"http\""),
        "{message}"
    );
}

/// A tiny deterministic PRNG (xorshift), so the sequence below is the same on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Bumps an object's resourceVersion, as the API server does on every change.
fn bump(
    metadata: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    version: &mut u64,
) {
    *version += 1;
    metadata.resource_version = Some(version.to_string());
}

#[test]
fn the_incremental_compiler_always_agrees_with_a_full_compile() {
    use lb_userspace::compile::Compiler;
    let mut yaml = NODE1.to_owned();
    for i in 0..20 {
        let node_port = if i % 3 == 0 {
            format!(", nodePort: {}", 30000 + i)
        } else {
            String::new()
        };
        let kind = if i % 3 == 0 { "NodePort" } else { "ClusterIP" };
        // Every fourth one dual-stack, with an IPv6 slice too.
        let dual_stack = i % 4 == 1;
        let cluster_ips = if dual_stack {
            format!("  clusterIPs: [10.96.1.{i}, \"fd00:96::{i}\"]\n")
        } else {
            String::new()
        };
        yaml += &service(
            &format!("s{i}"),
            &format!(
                "  type: {kind}\n  clusterIP: 10.96.1.{i}\n{cluster_ips}  ports:\n  - {{name: http, port: 80{node_port}}}\n"
            ),
        );
        yaml += &slice(
            &format!("s{i}-a"),
            &format!("s{i}"),
            &[(&format!("10.244.1.{i}"), "node1", READY)],
            &[("http", 8080, "TCP")],
        );
        if dual_stack {
            yaml += &slice_of(
                "IPv6",
                &format!("s{i}-v6"),
                &format!("s{i}"),
                &[(&format!("fd00:244::{i}"), "node1", READY)],
                &[("http", 8080, "TCP")],
            );
        }
    }
    let mut snapshot = snapshot(&yaml, "node1");
    let mut version = 0;
    for service in &mut snapshot.services {
        bump(&mut Arc::make_mut(service).metadata, &mut version);
    }
    for slice in &mut snapshot.endpoint_slices {
        bump(&mut Arc::make_mut(slice).metadata, &mut version);
    }
    let mut compiler = Compiler::new(node());
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for step in 0..300 {
        match rng.below(7) {
            // An endpoint added to a slice.
            0 => {
                let index = rng.below(snapshot.endpoint_slices.len() as u64) as usize;
                let slice = Arc::make_mut(&mut snapshot.endpoint_slices[index]);
                let mut endpoint = slice.endpoints.first().cloned().unwrap_or_default();
                endpoint.addresses = vec![if slice.address_type == "IPv6" {
                    format!("fd00:245::{step:x}")
                } else {
                    format!("10.245.{}.{}", step / 200, step % 200 + 1)
                }];
                slice.endpoints.push(endpoint);
                bump(&mut slice.metadata, &mut version);
            }
            // An endpoint removed.
            1 => {
                let index = rng.below(snapshot.endpoint_slices.len() as u64) as usize;
                let slice = Arc::make_mut(&mut snapshot.endpoint_slices[index]);
                slice.endpoints.pop();
                bump(&mut slice.metadata, &mut version);
            }
            // A Service's port changed.
            2 => {
                let index = rng.below(snapshot.services.len() as u64) as usize;
                let service = Arc::make_mut(&mut snapshot.services[index]);
                if let Some(port) = service
                    .spec
                    .as_mut()
                    .and_then(|spec| spec.ports.as_mut())
                    .and_then(|ports| ports.first_mut())
                {
                    port.port = 80 + rng.below(3) as i32;
                }
                bump(&mut service.metadata, &mut version);
            }
            // A Service takes another's ClusterIP or claims it as an externalIP (a conflict), or
            // gets its own back; its age changes (or it has none).
            3 => {
                let index = rng.below(snapshot.services.len() as u64) as usize;
                let ip = format!("10.96.1.{}", rng.below(25));
                let as_external_ip = rng.below(2) == 0;
                let created = [None, Some(OLD), Some(NEW)][rng.below(3) as usize];
                let service = Arc::make_mut(&mut snapshot.services[index]);
                if let Some(spec) = service.spec.as_mut() {
                    if as_external_ip {
                        spec.external_ips = Some(vec![ip]);
                    } else {
                        spec.cluster_ip = Some(ip);
                    }
                }
                service.metadata.creation_timestamp = created.map(|time| {
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        time.parse().expect("timestamp"),
                    )
                });
                bump(&mut service.metadata, &mut version);
            }
            // A Service deleted (its slices stay: orphans).
            4 if snapshot.services.len() > 5 => {
                let index = rng.below(snapshot.services.len() as u64) as usize;
                snapshot.services.remove(index);
            }
            // A Service added, or one without a resourceVersion (hand-written).
            5 => {
                let added = service(
                    &format!("n{step}"),
                    &format!(
                        "  clusterIP: 10.96.2.{}\n  ports:\n  - {{name: http, port: 80}}\n",
                        step % 250
                    ),
                );
                let mut parsed = self::snapshot(&added, "node1").services.remove(0);
                let metadata = &mut Arc::make_mut(&mut parsed).metadata;
                if rng.below(2) == 0 {
                    bump(metadata, &mut version);
                } else {
                    // The file source stamps a content version; an object can still lack one.
                    metadata.resource_version = None;
                }
                snapshot.services.push(parsed);
            }
            // The node's addresses change.
            _ => {
                if let Some(addresses) = snapshot
                    .node
                    .as_mut()
                    .and_then(|node| node.status.as_mut())
                    .and_then(|status| status.addresses.as_mut())
                {
                    // Its IPv4 InternalIP, or its IPv6 one.
                    if rng.below(2) == 0 {
                        addresses[0].address = format!("203.0.113.{}", 1 + rng.below(3));
                    } else {
                        addresses[2].address = format!("fd00::{}", 1 + rng.below(3));
                    }
                }
            }
        }
        let before = compiler.desired().clone();
        let update = compiler.update(&snapshot);
        let (fresh, fresh_problems) = compile(&snapshot, &node());
        assert_eq!(compiler.desired(), &fresh, "step {step}");
        assert_eq!(
            problem_summary(&update.problems),
            problem_summary(&fresh_problems),
            "step {step}"
        );
        // Every Service port that differs from before is reported as changed.
        let keys: std::collections::BTreeSet<_> = before
            .services
            .keys()
            .chain(fresh.services.keys())
            .collect();
        for key in keys {
            if before.services.get(key) != fresh.services.get(key) {
                assert!(
                    update.changed.contains(key),
                    "step {step}: {key} changed unreported"
                );
            }
        }
    }
}

#[test]
fn changes_are_counted_per_object_by_resource_version() {
    use lb_userspace::compile::{Changes, Compiler, TRIGGER_TIME_ANNOTATION};
    let yaml = NODE1.to_owned()
        + &service(
            "web",
            "  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80}\n",
        )
        + &web_slice();
    let mut snapshot = snapshot(&yaml, "node1");
    let mut compiler = Compiler::new(node());
    let counts = |changes: &Changes| (changes.services, changes.endpoint_slices);
    assert_eq!(counts(&compiler.update(&snapshot).changes), (1, 1));
    assert_eq!(counts(&compiler.update(&snapshot).changes), (0, 0));

    let slice = Arc::make_mut(&mut snapshot.endpoint_slices[0]);
    slice.endpoints.pop();
    slice.metadata.resource_version = Some("slice-2".into());
    slice.metadata.annotations = Some(
        [(
            TRIGGER_TIME_ANNOTATION.to_owned(),
            "2026-11-22T10:00:00Z".to_owned(),
        )]
        .into(),
    );
    let changes = compiler.update(&snapshot).changes;
    assert_eq!(counts(&changes), (0, 1));
    assert_eq!(changes.trigger_times, ["2026-11-22T10:00:00Z"]);

    snapshot.services.clear();
    snapshot.endpoint_slices.clear();
    assert_eq!(counts(&compiler.update(&snapshot).changes), (1, 1));
}

/// A NodePort Service whose hand-made slice names no node for two endpoints, and node2 for a
/// third whose address the routes would put here.
fn unplaced_yaml(external_policy: &str) -> String {
    NODE1.to_owned()
        + &service(
            "web",
            &format!(
                "  type: NodePort\n  externalTrafficPolicy: {external_policy}\n  clusterIP: 10.96.0.10\n  ports:\n  - {{name: http, port: 80, nodePort: 30080}}\n"
            ),
        )
        + &slice(
            "web-1",
            "web",
            &[
                ("10.244.1.10", "", READY),
                ("10.244.2.10", "", READY),
                ("10.244.1.11", "node2", READY),
            ],
            &[("http", 8080, "TCP")],
        )
        + &service(
            "other",
            "  clusterIP: 10.96.0.11\n  ports:\n  - {name: http, port: 80}\n",
        )
        + &slice(
            "other-1",
            "other",
            &[("10.244.1.20", "node1", READY)],
            &[("http", 8080, "TCP")],
        )
}

fn routed_here(addresses: &[&str]) -> NodeContext {
    let mut context = node();
    context.routed_local = addresses
        .iter()
        .map(|addr| addr.parse().expect("ip"))
        .collect();
    context
}

#[test]
fn endpoints_without_node_name_are_local_when_the_routes_put_them_here() {
    let snapshot = snapshot(&unplaced_yaml("Cluster"), "node1");
    let web = |desired: &Desired| -> String {
        render(desired)
            .into_iter()
            .find(|line| line.starts_with("default/web"))
            .expect("web compiled")
    };
    // No route information: a missing nodeName is another node (as before).
    let (desired, _) = compile(&snapshot, &node());
    assert_eq!(
        web(&desired),
        "default/web:http/TCP fe=[10.96.0.10:80 cluster, 198.18.0.1:30080 nodeport, 203.0.113.1:30080 nodeport] be=[10.244.1.10:8080, 10.244.1.11:8080, 10.244.2.10:8080] affinity=0"
    );
    // The routes put 10.244.1.10 here; 10.244.1.11 names node2, which its route cannot undo.
    let context = routed_here(&["10.244.1.10", "10.244.1.11"]);
    let (desired, _) = compile(&snapshot, &context);
    assert_eq!(
        web(&desired),
        "default/web:http/TCP fe=[10.96.0.10:80 cluster, 198.18.0.1:30080 nodeport, 203.0.113.1:30080 nodeport] be=[10.244.1.10:8080 L, 10.244.1.11:8080, 10.244.2.10:8080] affinity=0"
    );
    // externalTrafficPolicy Local: the endpoint placed here by route serves the NodePort.
    let snapshot = self::snapshot(&unplaced_yaml("Local"), "node1");
    let (desired, _) = compile(&snapshot, &context);
    let external: Vec<String> = render(&desired)
        .into_iter()
        .filter(|line| line.starts_with("default/web") && line.contains("[external]"))
        .collect();
    assert_eq!(
        external,
        [
            "default/web:http/TCP[external] fe=[198.18.0.1:30080 nodeport, 203.0.113.1:30080 nodeport] be=[10.244.1.10:8080 L] affinity=0 local-only node-clients-elsewhere"
        ]
    );
}

#[test]
fn the_incremental_compiler_recompiles_the_services_whose_endpoints_moved() {
    use lb_userspace::compile::Compiler;
    let snapshot = snapshot(&unplaced_yaml("Cluster"), "node1");
    let mut compiler = Compiler::new(node());
    compiler.update(&snapshot);
    let unplaced: Vec<String> = compiler
        .unplaced_endpoints()
        .map(|addr| addr.to_string())
        .collect();
    assert_eq!(unplaced, ["10.244.1.10", "10.244.2.10"]);

    let moved = routed_here(&["10.244.1.10"]);
    assert!(compiler.set_routed_local(moved.routed_local.clone()));
    let update = compiler.update(&snapshot);
    assert_eq!(compiler.desired(), &compile(&snapshot, &moved).0);
    let changed: Vec<String> = update.changed.iter().map(ToString::to_string).collect();
    assert_eq!(
        changed,
        ["default/web:http/TCP"],
        "only web is compiled again"
    );
    assert_eq!(update.changes.services, 0, "no object changed");
    assert_eq!(update.changes.endpoint_slices, 0, "no object changed");

    // The same placement again, or an address no endpoint has: nothing to compile.
    assert!(!compiler.set_routed_local(moved.routed_local.clone()));
    let mut elsewhere = moved.routed_local.clone();
    elsewhere.insert("192.0.2.1".parse().expect("ip"));
    assert!(!compiler.set_routed_local(elsewhere));
    assert!(compiler.update(&snapshot).changed.is_empty());

    // Moved back: remote again.
    assert!(compiler.set_routed_local(Default::default()));
    compiler.update(&snapshot);
    assert_eq!(compiler.desired(), &compile(&snapshot, &node()).0);
}

/// The Services of the ownership test: two claims on the ClusterIP 10.96.0.10:80 (the owner's
/// and an older hijacker's externalIP), two externalIP claims on 192.0.2.10:80, and a bystander.
fn contenders() -> Vec<(&'static str, String)> {
    let http = "  ports:\n  - {name: http, port: 80}\n";
    vec![
        (
            "frontend",
            aged_service(
                "default",
                "frontend",
                NEW,
                "uid-f",
                &format!("  clusterIP: 10.96.0.10\n{http}"),
            ),
        ),
        (
            "aa-dup",
            aged_service(
                "default",
                "aa-dup",
                OLD,
                "uid-d",
                &format!("  clusterIP: 10.96.0.99\n  externalIPs: [10.96.0.10]\n{http}"),
            ),
        ),
        (
            "ext-old",
            aged_service(
                "default",
                "ext-old",
                OLD,
                "uid-o",
                &format!("  clusterIP: 10.96.0.11\n  externalIPs: [192.0.2.10]\n{http}"),
            ),
        ),
        (
            "ext-new",
            aged_service(
                "default",
                "ext-new",
                NEW,
                "uid-n",
                &format!("  clusterIP: 10.96.0.12\n  externalIPs: [192.0.2.10]\n{http}"),
            ),
        ),
    ]
}

/// All orders of `items`.
fn permutations<T: Clone>(items: &[T]) -> Vec<Vec<T>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut all = Vec::new();
    for (index, first) in items.iter().enumerate() {
        let mut rest = items.to_vec();
        rest.remove(index);
        for mut tail in permutations(&rest) {
            tail.insert(0, first.clone());
            all.push(tail);
        }
    }
    all
}

fn bystander() -> String {
    aged_service(
        "default",
        "bystander",
        OLD,
        "uid-b",
        "  clusterIP: 10.96.0.50\n  ports:\n  - {name: http, port: 80}\n",
    )
}

fn bystander_key() -> lb_userspace::compile::model::ServicePortKey {
    lb_userspace::compile::model::ServicePortKey {
        namespace: "default".into(),
        name: "bystander".into(),
        port_name: "http".into(),
        proto: lb_common::proto::TCP,
        scope: Default::default(),
        family: Default::default(),
    }
}

#[test]
fn frontend_owners_do_not_depend_on_the_order_of_arrival_full_or_incremental() {
    use lb_userspace::compile::Compiler;
    let expected = [
        "default/aa-dup:http/TCP fe=[10.96.0.99:80 cluster] be=[] affinity=0",
        "default/bystander:http/TCP fe=[10.96.0.50:80 cluster] be=[] affinity=0",
        "default/ext-new:http/TCP fe=[10.96.0.12:80 cluster] be=[] affinity=0",
        "default/ext-old:http/TCP fe=[10.96.0.11:80 cluster, 192.0.2.10:80 external] be=[] affinity=0",
        "default/frontend:http/TCP fe=[10.96.0.10:80 cluster] be=[] affinity=0",
    ];
    let expected_problems = vec![
        (
            Severity::Invalid,
            "Service/default/aa-dup".to_owned(),
            "FrontendConflict",
        ),
        (
            Severity::Invalid,
            "Service/default/ext-new".to_owned(),
            "FrontendConflict",
        ),
    ];
    for order in permutations(&contenders()) {
        let names: Vec<&str> = order.iter().map(|(name, _)| *name).collect();
        // All at once, listed in this order.
        let yaml: String = bystander()
            + &order
                .iter()
                .map(|(_, yaml)| yaml.as_str())
                .collect::<String>();
        let (desired, problems) = compile(&snapshot(&yaml, "node1"), &node());
        assert_eq!(render(&desired), expected, "full compile, order {names:?}");
        assert_eq!(problem_summary(&problems), expected_problems, "{names:?}");

        // One at a time, in this order, after the bystander: the incremental compiler settles
        // each conflict itself (a full compile would report the bystander as changed).
        let mut compiler = Compiler::new(node());
        let mut incremental = snapshot(&bystander(), "node1");
        compiler.update(&incremental);
        for (name, yaml) in &order {
            incremental
                .services
                .extend(snapshot(yaml, "node1").services);
            let update = compiler.update(&incremental);
            assert!(
                !update.changed.contains(&bystander_key()),
                "{name} after {names:?}: a full compile"
            );
            assert_eq!(
                compiler.desired(),
                &compile(&incremental, &node()).0,
                "{name} of {names:?}"
            );
        }
        assert_eq!(
            render(compiler.desired()),
            expected,
            "incremental, order {names:?}"
        );
        let update = compiler.update(&incremental);
        assert_eq!(problem_summary(&update.problems), expected_problems);
    }
}

#[test]
fn when_a_frontend_owner_goes_the_next_claim_takes_the_frontend_over() {
    use lb_userspace::compile::Compiler;
    let yaml = bystander()
        + &contenders()
            .into_iter()
            .map(|(_, yaml)| yaml)
            .collect::<String>();
    let mut snapshot = snapshot(&yaml, "node1");
    let mut compiler = Compiler::new(node());
    let update = compiler.update(&snapshot);
    let message = |update: &lb_userspace::compile::Update, name: &str| {
        update
            .problems
            .iter()
            .find(|problem| problem.name == name)
            .map(|problem| problem.message.clone())
            .unwrap_or_default()
    };
    assert_eq!(
        message(&update, "aa-dup"),
        "10.96.0.10:80/TCP not served for this Service: default/frontend:http/TCP serves it (a ClusterIP comes before an externalIP or LoadBalancer IP)"
    );
    assert_eq!(
        message(&update, "ext-new"),
        "192.0.2.10:80/TCP not served for this Service: default/ext-old:http/TCP serves it (it is the older Service (creationTimestamp, then uid))"
    );

    let remove = |snapshot: &mut Snapshot, name: &str| {
        snapshot
            .services
            .retain(|service| service.metadata.name.as_deref() != Some(name));
    };
    let line = |compiler: &Compiler, name: &str| {
        render(compiler.desired())
            .into_iter()
            .find(|line| line.starts_with(&format!("default/{name}:")))
            .unwrap_or_default()
    };
    remove(&mut snapshot, "frontend");
    let update = compiler.update(&snapshot);
    assert_eq!(
        line(&compiler, "aa-dup"),
        "default/aa-dup:http/TCP fe=[10.96.0.10:80 external, 10.96.0.99:80 cluster] be=[] affinity=0"
    );
    assert!(!update.changed.contains(&bystander_key()), "a full compile");
    assert_eq!(compiler.desired(), &compile(&snapshot, &node()).0);
    assert_eq!(message(&update, "aa-dup"), "");

    remove(&mut snapshot, "ext-old");
    let update = compiler.update(&snapshot);
    assert_eq!(
        line(&compiler, "ext-new"),
        "default/ext-new:http/TCP fe=[10.96.0.12:80 cluster, 192.0.2.10:80 external] be=[] affinity=0"
    );
    assert!(!update.changed.contains(&bystander_key()), "a full compile");
    assert_eq!(compiler.desired(), &compile(&snapshot, &node()).0);
    assert!(update.problems.is_empty(), "{:?}", update.problems);
}

#[test]
fn external_ips_outside_the_allowed_cidrs_are_skipped_and_reported() {
    let yaml = service(
        "web",
        "  clusterIP: 10.96.0.10\n  externalIPs: [192.0.2.10, 10.0.0.1]\n  ports:\n  - {name: http, port: 443}\n",
    );
    let (desired, problems) = compile(&snapshot(&yaml, "node1"), &node());
    assert_eq!(
        render(&desired),
        [
            "default/web:http/TCP fe=[10.0.0.1:443 external, 10.96.0.10:443 cluster, 192.0.2.10:443 external] be=[] affinity=0"
        ],
        "without --external-ip-cidrs every externalIP is served, as kube-proxy does"
    );
    assert!(problems.is_empty());

    let mut context = node();
    context.external_ip_cidrs = vec!["192.0.2.0/24".parse().expect("cidr")];
    let (desired, problems) = compile(&snapshot(&yaml, "node1"), &context);
    assert_eq!(
        render(&desired),
        [
            "default/web:http/TCP fe=[10.96.0.10:443 cluster, 192.0.2.10:443 external] be=[] affinity=0"
        ]
    );
    assert_eq!(
        problem_summary(&problems),
        [(
            Severity::Invalid,
            "Service/default/web".to_owned(),
            "ExternalIPNotAllowed"
        )]
    );
    assert_eq!(
        problems[0].message,
        "externalIP 10.0.0.1 is outside --external-ip-cidrs; not served"
    );
    assert!(desired.held.is_empty(), "the rest of the Service is served");
}

/// The node's zone comes from its Node's label at every compile: a Node moved to another zone
/// (or one labelled late) changes which hinted endpoints a Cluster policy uses.
#[test]
fn a_change_of_the_nodes_zone_reselects_the_hinted_endpoints() {
    use lb_userspace::compile::Compiler;
    let slice = hinted_slice(&[
        ("10.244.1.10", "node1", "{forZones: [{name: zone-a}]}"),
        ("10.244.2.10", "node2", "{forZones: [{name: zone-b}]}"),
    ]);
    let cluster_ip = "  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80}\n";
    let with_node = |node: &str| node.to_owned() + &service("web", cluster_ip) + &slice;
    let mut compiler = Compiler::new(node());
    let mut rendered = |yaml: &str| {
        compiler.update(&snapshot(yaml, "node1"));
        render(compiler.desired())
    };
    let both = "default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[10.244.1.10:8080 L, 10.244.2.10:8080] affinity=0";
    assert_eq!(rendered(&with_node(NODE1)), [both], "no zone yet");
    assert_eq!(
        rendered(&with_node(&node1_in_zone_a())),
        ["default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[10.244.1.10:8080 L] affinity=0"],
        "zone-a"
    );
    assert_eq!(
        rendered(&with_node(&node1_in_zone_a().replace("zone-a", "zone-b"))),
        ["default/web:http/TCP fe=[10.96.0.10:80 cluster] be=[10.244.2.10:8080] affinity=0"],
        "moved to zone-b"
    );
}

/// web (NodePort, externalTrafficPolicy as given) health-checked over TCP, with a UDP port,
/// two endpoints on node1 and one on node2.
fn health_checked_yaml(external_policy: &str, annotation: &str) -> String {
    NODE1.to_owned()
        + &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\n  annotations: {{lb.io/health-check: \"{annotation}\"}}\nspec:\n  type: NodePort\n  externalTrafficPolicy: {external_policy}\n  clusterIP: 10.96.0.10\n  ports:\n  - {{name: http, port: 80, nodePort: 30080}}\n  - {{name: dns, port: 53, protocol: UDP}}\n"
        )
        + &slice(
            "web-1",
            "web",
            &[
                ("10.244.1.10", "node1", READY),
                ("10.244.1.11", "node1", READY),
                ("10.244.2.10", "node2", READY),
            ],
            &[("http", 8080, "TCP"), ("dns", 5353, "UDP")],
        )
}

fn failed(
    addresses: &[&str],
) -> std::collections::BTreeSet<lb_userspace::compile::health_check::ProbedEndpoint> {
    addresses
        .iter()
        .map(|addr| lb_userspace::compile::health_check::ProbedEndpoint {
            namespace: "default".into(),
            name: "web".into(),
            addr: addr.parse().expect("ip"),
            port: 8080,
        })
        .collect()
}

#[test]
fn health_checked_local_endpoints_leave_the_tables_unless_none_would_be_left() {
    use lb_userspace::compile::Compiler;
    let snapshot = snapshot(&health_checked_yaml("Local", "http:/healthz"), "node1");
    let mut compiler = Compiler::new(node());
    compiler.update(&snapshot);
    // Only the local endpoints of the TCP port are probed, with the defaults.
    let targets: Vec<String> = compiler
        .probe_targets()
        .map(|target| format!("{} {:?}", target.endpoint, target.check))
        .collect();
    assert_eq!(
        targets,
        [
            "default/web 10.244.1.10:8080 HealthCheck { probe: Http { path: \"/healthz\" }, interval: 1s, timeout: 500ms, failure_threshold: 2, success_threshold: 1 }",
            "default/web 10.244.1.11:8080 HealthCheck { probe: Http { path: \"/healthz\" }, interval: 1s, timeout: 500ms, failure_threshold: 2, success_threshold: 1 }",
        ]
    );
    let before = render(compiler.desired());

    // One fails: it leaves every TCP table, the UDP port keeps it; no object changed.
    assert!(compiler.set_health_failed(failed(&["10.244.1.10"])));
    let update = compiler.update(&snapshot);
    assert!(update.changes.services == 0 && update.changes.endpoint_slices == 0);
    assert_eq!(
        render(compiler.desired()),
        [
            "default/web:dns/UDP[internal] fe=[10.96.0.10:53 cluster] be=[10.244.1.10:5353 L, 10.244.1.11:5353 L, 10.244.2.10:5353] affinity=0",
            "default/web:http/TCP[internal] fe=[10.96.0.10:80 cluster, 198.18.0.1:30080 nodeport(node-clients), 203.0.113.1:30080 nodeport(node-clients)] be=[10.244.1.11:8080 L, 10.244.2.10:8080] affinity=0",
            "default/web:http/TCP[external] fe=[198.18.0.1:30080 nodeport, 203.0.113.1:30080 nodeport] be=[10.244.1.11:8080 L] affinity=0 local-only node-clients-elsewhere",
        ]
    );
    // The failed endpoint is still probed, so that it can come back.
    assert_eq!(compiler.probe_targets().count(), 2);
    let mut context = node();
    context.health_failed = failed(&["10.244.1.10"]);
    assert_eq!(compiler.desired(), &compile(&snapshot, &context).0);

    // Both local ones fail: the cluster-wide table keeps node2's endpoint alone; the
    // local-only table would be left with none, so it keeps both (fail open), with a Warning.
    assert!(compiler.set_health_failed(failed(&["10.244.1.10", "10.244.1.11"])));
    let update = compiler.update(&snapshot);
    let tcp: Vec<String> = render(compiler.desired())
        .into_iter()
        .filter(|line| line.contains("http/TCP"))
        .collect();
    assert_eq!(
        tcp,
        [
            "default/web:http/TCP[internal] fe=[10.96.0.10:80 cluster, 198.18.0.1:30080 nodeport(node-clients), 203.0.113.1:30080 nodeport(node-clients)] be=[10.244.2.10:8080] affinity=0",
            "default/web:http/TCP[external] fe=[198.18.0.1:30080 nodeport, 203.0.113.1:30080 nodeport] be=[10.244.1.10:8080 L, 10.244.1.11:8080 L] affinity=0 local-only node-clients-elsewhere",
        ]
    );
    assert_eq!(
        problem_summary(&update.problems),
        [(
            Severity::Warning,
            "Service/default/web".to_owned(),
            "HealthCheckFailOpen"
        )]
    );
    assert!(
        update.problems[0]
            .message
            .starts_with("default/web:http/TCP[external]: every endpoint of this table failed"),
        "{:?}",
        update.problems[0].message
    );

    // They pass again: back as before, the Warning gone. The same verdict twice, or one about
    // a Service that does not exist, compiles nothing.
    assert!(compiler.set_health_failed(failed(&[])));
    let update = compiler.update(&snapshot);
    assert_eq!(render(compiler.desired()), before);
    assert!(update.problems.is_empty(), "{:?}", update.problems);
    assert!(!compiler.set_health_failed(failed(&[])));
    let mut elsewhere = failed(&[]);
    elsewhere.insert(lb_userspace::compile::health_check::ProbedEndpoint {
        namespace: "default".into(),
        name: "nothing".into(),
        addr: "10.244.1.10".parse().expect("ip"),
        port: 8080,
    });
    assert!(!compiler.set_health_failed(elsewhere));
    assert!(compiler.update(&snapshot).changed.is_empty());
}

#[test]
fn a_bad_health_check_annotation_is_a_warning_and_checks_nothing() {
    use lb_userspace::compile::Compiler;
    let snapshot = snapshot(&health_checked_yaml("Cluster", "http:healthz"), "node1");
    let mut compiler = Compiler::new(node());
    let update = compiler.update(&snapshot);
    assert_eq!(
        problem_summary(&update.problems),
        [(
            Severity::Warning,
            "Service/default/web".to_owned(),
            "InvalidHealthCheck"
        )]
    );
    assert!(
        update.problems[0]
            .message
            .contains("lb.io/health-check: the path of \"http:healthz\" must start with /"),
        "{:?}",
        update.problems[0].message
    );
    assert_eq!(compiler.probe_targets().count(), 0);
    // Served as without the annotation; a verdict about its endpoints changes nothing.
    let plain = snapshot.clone();
    compiler.set_health_failed(failed(&["10.244.1.10"]));
    compiler.update(&plain);
    let (without_checks, _) = compile(&snapshot, &node());
    assert_eq!(compiler.desired(), &without_checks);
    let web = render(compiler.desired());
    assert!(
        web.iter().any(|line| line.contains("10.244.1.10:8080")),
        "{web:?}"
    );
}

/// A Node `name` whose lb marked it in boot `mark`, now in boot `boot`.
fn marked_node(name: &str, mark: &str, boot: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  annotations: {{lb.io/dsr-boot-id: {mark}}}\nstatus:\n  nodeInfo: {{bootID: {boot}, machineID: m, systemUUID: s, kernelVersion: k, osImage: o, containerRuntimeVersion: c, kubeletVersion: v, kubeProxyVersion: v, operatingSystem: linux, architecture: amd64}}\n"
    )
}

/// With `--nodeport-mode dsr`, an endpoint is marked for DSR when its Node's lb mark names the
/// boot the Node is in: not on a Node rebooted since (its pods may have started before lb),
/// nor one never marked, nor an endpoint without a nodeName; never a local one. A Node
/// marked again after its reboot moves its endpoints over, incrementally as from nothing,
/// compiling again only the Services with endpoints there. Without DSR, no endpoint is marked.
#[test]
fn endpoints_on_nodes_whose_lb_marked_this_boot_take_dsr() {
    use lb_userspace::compile::Compiler;
    let objects = |node3_mark: &str| {
        NODE1.to_owned()
            + &marked_node("node2", "boot-2", "boot-2")
            + &marked_node("node3", node3_mark, "boot-3b")
            + &service(
                "web",
                "  type: NodePort\n  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80, nodePort: 30080}\n",
            )
            + &slice(
                "web-1",
                "web",
                &[
                    ("10.244.1.10", "node1", READY),
                    ("10.244.2.10", "node2", READY),
                    ("10.244.3.10", "node3", READY),
                    ("10.244.4.10", "node4", READY),
                    ("10.244.9.10", "", READY),
                ],
                &[("http", 8080, "TCP")],
            )
            + &service(
                "api",
                "  type: NodePort\n  clusterIP: 10.96.0.11\n  ports:\n  - {name: http, port: 80, nodePort: 30081}\n",
            )
            + &slice(
                "api-1",
                "api",
                &[("10.244.2.20", "node2", READY)],
                &[("http", 8080, "TCP")],
            )
    };
    let dsr = NodeContext {
        direct_return: true,
        ..node()
    };
    let backends = |desired: &Desired| -> String {
        let line = render(desired)
            .into_iter()
            .find(|line| line.starts_with("default/web:http/TCP"))
            .expect("web");
        line.split(" be=[")
            .nth(1)
            .expect("backends")
            .split(']')
            .next()
            .expect("end")
            .to_owned()
    };
    let rebooted = snapshot(&objects("boot-3a"), "node1");
    assert_eq!(
        backends(&compile(&rebooted, &dsr).0),
        "10.244.1.10:8080 L, 10.244.2.10:8080 D, 10.244.3.10:8080, 10.244.4.10:8080, 10.244.9.10:8080"
    );
    assert_eq!(
        backends(&compile(&rebooted, &node()).0),
        "10.244.1.10:8080 L, 10.244.2.10:8080, 10.244.3.10:8080, 10.244.4.10:8080, 10.244.9.10:8080",
        "without DSR nothing is marked"
    );

    let mut compiler = Compiler::new(dsr.clone());
    compiler.update(&rebooted);
    assert_eq!(compiler.desired(), &compile(&rebooted, &dsr).0);
    let marked_again = snapshot(&objects("boot-3b"), "node1");
    let update = compiler.update(&marked_again);
    assert_eq!(compiler.desired(), &compile(&marked_again, &dsr).0);
    assert_eq!(
        backends(compiler.desired()),
        "10.244.1.10:8080 L, 10.244.2.10:8080 D, 10.244.3.10:8080 D, 10.244.4.10:8080, 10.244.9.10:8080"
    );
    let changed: Vec<String> = update.changed.iter().map(ToString::to_string).collect();
    assert_eq!(
        changed,
        ["default/web:http/TCP"],
        "only the Service with an endpoint on node3 is compiled again"
    );
    assert_eq!(update.changes.services, 0, "no object of a Service changed");
}
