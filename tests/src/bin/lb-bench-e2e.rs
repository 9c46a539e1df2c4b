//! End-to-end benchmark in the lab: request/response and connect/request/close rates with p50/p99
//! latency, 1 and N parallel clients, for
//! - straight to a pod address (the baseline: a lab with no service rules at all),
//! - lb: ClusterIP through the socket hooks (client pod in the agent's cgroup) and NodePort
//!   through XDP (client namespace), the real `lb run --source file` agent on node1,
//! - the same services as kube-proxy-shaped iptables rules (iptables-restore) and nftables rules
//!   (nft -f) in node1's namespace, without any agent,
//!
//! and, with `--ipv6` (the default), the measured Service's IPv6 ClusterIP through lb's socket
//! hooks and its NodePort on node1's IPv6 address through XDP, beside straight to a pod over
//! IPv6 (the lab is dual-stack; the iptables and nftables rule sets are IPv4 only),
//!
//! at 1k and 10k services plus the measured one, and the time `iptables-restore` and `nft -f`
//! take to load 10k services x 10 endpoints, next to lb's in-process figure (target/bench/
//! control.json, from lb-bench-control). Prints a table and writes target/bench/e2e.json.
//!
//! Every configuration (the baseline, each rule set at each size, the agent at each size) has a
//! lab of its own, all built and loaded first and kept up together, so the runs can be
//! interleaved: each of `--rounds` rounds runs every configuration once per mode and client count,
//! in a rotated order, and the figures are medians over the rounds with their spread. Single
//! runs on a shared 2-CPU machine move by +-15%; runs of different configurations minutes or
//! hours apart move more.
//!
//! The measured Service (10.96.0.10:80, nodePort 30080) has two endpoints on node2 (n2p0, n2p1);
//! the client pod is n1p1 on node1, so every path crosses node1 and node2 (pod -> node1 -> node2
//! -> pod), and pod -> ClusterIP traffic goes through node1's PREROUTING, where iptables and
//! nftables DNAT it. The client namespace reaches the pods through node1 (a route), as NodePort
//! traffic does. Everything runs inside the labs' namespaces; each rule set is loaded only in its
//! own lab's node1 namespace.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use clap::Parser;
use lab::{
    agent::{
        AgentLab, POD_PORT, dsr_marked_node_manifest, endpoint_slice, endpoint_slice6,
        node_manifest, node_port_service, synced_lines,
    },
    lab::{Cgroup, Host, Lab, Proc, ScratchDir, wait_for_log},
    peer::{self, ClientReport},
    topology::{
        CLIENT_ADDR, CLIENT_ADDR6, Cluster, ClusterSpec, node_addr, node_addr6, pod_addr, pod_addr6,
    },
};
use serde::Serialize;

#[derive(Parser)]
#[command(
    about = "End-to-end rates and latencies: lb vs iptables vs nftables vs straight to a pod"
)]
struct Args {
    /// Length of every measured run.
    #[arg(long, default_value_t = 1000)]
    duration_ms: u64,
    /// Interleaved rounds: each one runs every configuration once per mode and client count;
    /// the figures are the medians over the rounds.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Also measure straight to a pod inside every configuration (not only in the baseline's
    /// lab): shows what a rule set costs traffic that is not for a Service, at the price of
    /// twice the runs.
    #[arg(long)]
    direct_everywhere: bool,
    /// Parallel client counts.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    clients: Vec<usize>,
    /// Background service counts (the measured Service comes on top).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    services: Vec<usize>,
    /// Endpoints per background service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Systems to measure (lb, iptables, nftables); the baseline always runs.
    #[arg(long, value_delimiter = ',', default_value = "lb,iptables,nftables")]
    systems: Vec<String>,
    /// Rule sets whose iptables-restore / nft -f takes longer are killed and not measured.
    #[arg(long, default_value_t = 300)]
    load_timeout_s: u64,
    /// The measured Service dual-stack, and its IPv6 ClusterIP measured through lb beside
    /// straight to a pod over IPv6 (`--ipv6 false`: IPv4 only).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    ipv6: bool,
    /// XDP mode of lb's agent on node1's NIC, a veth whose peer runs NAPI (native: as on a
    /// physical NIC; generic: what `--xdp-mode auto` picks on a veth). A veth in native mode
    /// costs every connection through it (`lb-bench-other-traffic`).
    #[arg(long, default_value = "native", value_parser = ["native", "generic"])]
    xdp_mode: String,
    /// lb's `--nodeport-mode`: `snat` (the agent on node1 only), or `dsr` (direct server
    /// return: the agent on node2 too, which answers the client itself).
    #[arg(long, default_value = "snat", value_parser = ["snat", "dsr"])]
    nodeport_mode: String,
    #[arg(long, default_value = "target/bench/e2e.json")]
    out: PathBuf,
    /// lb-bench-control's results, shown next to the rule loading times when present.
    #[arg(long, default_value = "target/bench/control.json")]
    control: PathBuf,
}

const MEASURED_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The measured Service's IPv6 ClusterIP (documentation prefix).
const MEASURED_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x96, 0, 0, 0, 0, 0x10);
/// The suffix of an IPv6 path's name.
const IPV6: &str = " (IPv6)";
const MEASURED_PORT: u16 = 80;
const NODE_PORT: u16 = 30080;
const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// One Service port as the rule generators and the manifests see it.
struct Svc {
    name: String,
    ip: Ipv4Addr,
    port: u16,
    node_port: Option<u16>,
    endpoints: Vec<Ipv4Addr>,
    /// A dual-stack Service's IPv6 ClusterIP and endpoints (lb's manifests only).
    ipv6: Option<(Ipv6Addr, Vec<Ipv6Addr>)>,
}

fn measured(ipv6: bool) -> Svc {
    Svc {
        name: "web".into(),
        ip: MEASURED_IP,
        port: MEASURED_PORT,
        node_port: Some(NODE_PORT),
        endpoints: vec![pod_addr(2, 0), pod_addr(2, 1)],
        ipv6: ipv6.then(|| (MEASURED_IP6, vec![pod_addr6(2, 0), pod_addr6(2, 1)])),
    }
}

/// `count` ClusterIP services of `endpoints` endpoints each (addresses nothing routes to, as in
/// lb-bench-control), with the measured one in the middle: kube-proxy's iptables order is a map's
/// random order, so the middle is the expected position.
fn services(count: usize, endpoints: usize, ipv6: bool) -> Vec<Svc> {
    let mut all: Vec<Svc> = (0..count)
        .map(|index| Svc {
            name: format!("svc-{index}"),
            ip: Ipv4Addr::new(10, 97, (index / 250) as u8, (index % 250 + 1) as u8),
            port: 80,
            node_port: None,
            endpoints: (0..endpoints)
                .map(|endpoint| {
                    let pod = index * endpoints + endpoint;
                    Ipv4Addr::new(
                        10,
                        (100 + pod / 65536) as u8,
                        ((pod / 256) % 256) as u8,
                        (pod % 256) as u8,
                    )
                })
                .collect(),
            ipv6: None,
        })
        .collect();
    all.insert(count / 2, measured(ipv6));
    all
}

/// kube-proxy's chain name suffix: 16 characters of a hash of the service port (kube-proxy uses
/// base32 of a SHA-256; any stable hash gives the same shape).
fn chain_hash(text: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut second = hash.rotate_left(29).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut out = String::with_capacity(16);
    for index in 0..16 {
        let source = if index < 12 { &mut hash } else { &mut second };
        out.push(ALPHABET[(*source & 31) as usize] as char);
        *source >>= 5;
    }
    out
}

/// The nat table kube-proxy's iptables mode writes for `services` (pkg/proxy/iptables/proxier.go):
/// KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-* (DNAT) with `-m statistic --mode random
/// --probability 1/(n-i)` per endpoint but the last, KUBE-NODEPORTS -> KUBE-EXT-* for nodePorts
/// (marked for masquerade), and KUBE-POSTROUTING masquerading marked packets.
fn iptables_rules(services: &[Svc]) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    for chain in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(chains, ":{chain} - [0:0]");
    }
    rules.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    let mut service_rules = String::new();
    let mut nodeport_rules = String::new();
    for svc in services {
        let port_name = format!("default/{}:http", svc.name);
        let svc_chain = format!("KUBE-SVC-{}", chain_hash(&format!("{port_name}tcp")));
        let _ = writeln!(chains, ":{svc_chain} - [0:0]");
        let _ = writeln!(
            service_rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{port_name} cluster IP\" -m tcp --dport {} -j {svc_chain}",
            svc.ip, svc.port
        );
        let _ = writeln!(
            rules,
            "-A {svc_chain} ! -s {CLUSTER_CIDR} -d {}/32 -p tcp -m comment --comment \"{port_name} cluster IP\" -m tcp --dport {} -j KUBE-MARK-MASQ",
            svc.ip, svc.port
        );
        let count = svc.endpoints.len();
        for (index, endpoint) in svc.endpoints.iter().enumerate() {
            let target = format!("{endpoint}:{POD_PORT}");
            let sep_chain = format!(
                "KUBE-SEP-{}",
                chain_hash(&format!("{port_name}tcp{target}"))
            );
            let _ = writeln!(chains, ":{sep_chain} - [0:0]");
            let statistic = if index + 1 < count {
                format!(
                    " -m statistic --mode random --probability {:.11}",
                    1.0 / (count - index) as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {svc_chain} -m comment --comment \"{port_name} -> {target}\"{statistic} -j {sep_chain}"
            );
            let _ = writeln!(
                rules,
                "-A {sep_chain} -s {endpoint}/32 -m comment --comment \"{port_name}\" -j KUBE-MARK-MASQ\n\
                 -A {sep_chain} -p tcp -m comment --comment \"{port_name}\" -m tcp -j DNAT --to-destination {target}"
            );
        }
        if let Some(node_port) = svc.node_port {
            let ext_chain = format!("KUBE-EXT-{}", chain_hash(&format!("{port_name}tcp")));
            let _ = writeln!(chains, ":{ext_chain} - [0:0]");
            let _ = writeln!(
                nodeport_rules,
                "-A KUBE-NODEPORTS -p tcp -m comment --comment \"{port_name}\" -m tcp --dport {node_port} -j {ext_chain}"
            );
            let _ = writeln!(
                rules,
                "-A {ext_chain} -m comment --comment \"masquerade traffic for {port_name} external destinations\" -j KUBE-MARK-MASQ\n\
                 -A {ext_chain} -j {svc_chain}"
            );
        }
    }
    format!(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         {chains}{rules}{service_rules}{nodeport_rules}\
         -A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
         COMMIT\n"
    )
}

/// The table kube-proxy's nftables mode writes for `services` (pkg/proxy/nftables/proxier.go):
/// a `service-ips` verdict map from ip . proto . port to a per-service chain, a
/// `service-nodeports` map for nodePorts on local addresses, per-service chains that pick an
/// endpoint chain with `numgen random mod N vmap`, endpoint chains that DNAT, and masquerading of
/// marked packets.
fn nft_rules(services: &[Svc]) -> String {
    let mut out = String::from(
        "table ip kube-proxy {\n\
         \tcomment \"rules for kube-proxy\"\n\
         \tmap service-ips {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t\tcomment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\"\n\t}\n\
         \tmap service-nodeports {\n\t\ttype inet_proto . inet_service : verdict\n\t\tcomment \"NodePort traffic\"\n\t}\n\
         \tchain nat-prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tjump services\n\t}\n\
         \tchain nat-output {\n\t\ttype nat hook output priority -100; policy accept;\n\t\tjump services\n\t}\n\
         \tchain nat-postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tjump masquerading\n\t}\n\
         \tchain mark-for-masquerade {\n\t\tmeta mark set meta mark or 0x4000\n\t}\n\
         \tchain masquerading {\n\t\tmeta mark & 0x4000 == 0 return\n\t\tmeta mark set meta mark xor 0x4000\n\t\tmasquerade fully-random\n\t}\n\
         \tchain services {\n\t\tip daddr . meta l4proto . th dport vmap @service-ips\n\t\tfib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n\t}\n",
    );
    let mut service_elements = Vec::new();
    let mut nodeport_elements = Vec::new();
    for svc in services {
        let id = format!("default/{}/tcp/http", svc.name);
        let hash = chain_hash(&id);
        let service_chain = format!("service-{}-{id}", &hash[..8]);
        let mut endpoint_chains = Vec::new();
        for endpoint in &svc.endpoints {
            let chain = format!(
                "endpoint-{}-{id}__{endpoint}/{POD_PORT}",
                &chain_hash(&format!("{id}{endpoint}"))[..8]
            );
            let _ = write!(
                out,
                "\tchain {chain} {{\n\t\tip saddr {endpoint} jump mark-for-masquerade\n\t\tmeta l4proto tcp dnat to {endpoint}:{POD_PORT}\n\t}}\n"
            );
            endpoint_chains.push(chain);
        }
        let vmap = endpoint_chains
            .iter()
            .enumerate()
            .map(|(index, chain)| format!("{index} : goto {chain}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = write!(
            out,
            "\tchain {service_chain} {{\n\t\tip daddr {} tcp dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade\n\t\tnumgen random mod {} vmap {{ {vmap} }}\n\t}}\n",
            svc.ip,
            svc.port,
            endpoint_chains.len()
        );
        service_elements.push(format!(
            "{} . tcp . {} : goto {service_chain}",
            svc.ip, svc.port
        ));
        if let Some(node_port) = svc.node_port {
            let external_chain = format!("external-{}-{id}", &hash[..8]);
            let _ = write!(
                out,
                "\tchain {external_chain} {{\n\t\tjump mark-for-masquerade\n\t\tgoto {service_chain}\n\t}}\n"
            );
            nodeport_elements.push(format!("tcp . {node_port} : goto {external_chain}"));
        }
    }
    out.push_str("}\n");
    for (map, elements) in [
        ("service-ips", service_elements),
        ("service-nodeports", nodeport_elements),
    ] {
        for chunk in elements.chunks(1000) {
            let _ = writeln!(
                out,
                "add element ip kube-proxy {map} {{ {} }}",
                chunk.join(", ")
            );
        }
    }
    out
}

/// The same services as manifests for lb's file source.
fn manifests(services: &[Svc]) -> String {
    let mut yaml = String::new();
    for svc in services {
        if !yaml.is_empty() {
            yaml.push_str("---\n");
        }
        let node = if svc.node_port.is_some() {
            "node2"
        } else {
            "node1"
        };
        let dual_stack = match &svc.ipv6 {
            Some((ip6, _)) => format!(
                "  clusterIPs: [{}, \"{ip6}\"]\n  ipFamilyPolicy: RequireDualStack\n",
                svc.ip
            ),
            None => String::new(),
        };
        match svc.node_port {
            Some(node_port) => yaml.push_str(&node_port_service(
                &svc.name,
                &svc.ip.to_string(),
                node_port,
                &dual_stack,
            )),
            None => {
                let _ = write!(
                    yaml,
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: default}}\nspec:\n  clusterIP: {}\n  ports:\n  - {{name: http, port: {}, targetPort: {POD_PORT}}}\n",
                    svc.name, svc.ip, svc.port
                );
            }
        }
        yaml.push_str("---\n");
        let endpoints: Vec<(Ipv4Addr, &str)> = svc.endpoints.iter().map(|&a| (a, node)).collect();
        yaml.push_str(&endpoint_slice(&svc.name, &endpoints));
        if let Some((_, endpoints6)) = &svc.ipv6 {
            let endpoints6: Vec<(Ipv6Addr, &str)> = endpoints6.iter().map(|&a| (a, node)).collect();
            yaml.push_str("---\n");
            yaml.push_str(&endpoint_slice6(&svc.name, &endpoints6, "TCP"));
        }
    }
    yaml
}

/// Where a client runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum From {
    /// Pod n1p1 on node1 (in the agent's cgroup in lb's labs).
    Pod,
    /// The client namespace on the fabric, routed to the pods through node1.
    Client,
}

struct PathSpec {
    name: &'static str,
    from: From,
    to: String,
    /// Servers that may answer.
    servers: &'static [&'static str],
    /// The client address the servers must see, when it is known, as they report it.
    peer_seen: Option<String>,
}

/// The paths of one configuration: straight to a pod when `direct`, the measured Service's
/// ClusterIP and NodePort when `with_services`; with `ipv6`, straight to a pod and the
/// ClusterIP over IPv6 too.
fn paths(direct: bool, with_services: bool, ipv6: bool) -> Vec<PathSpec> {
    let pod = pod_addr(1, 1).to_string();
    let pod6 = format!("[{}]", pod_addr6(1, 1));
    let mut all = Vec::new();
    if direct {
        all.extend([
            PathSpec {
                name: "pod -> pod",
                from: From::Pod,
                to: format!("{}:{POD_PORT}", pod_addr(2, 0)),
                servers: &["n2p0"],
                peer_seen: Some(pod.clone()),
            },
            PathSpec {
                name: "client -> pod",
                from: From::Client,
                to: format!("{}:{POD_PORT}", pod_addr(2, 0)),
                servers: &["n2p0"],
                peer_seen: Some(CLIENT_ADDR.to_string()),
            },
        ]);
        if ipv6 {
            all.extend([
                PathSpec {
                    name: "pod -> pod (IPv6)",
                    from: From::Pod,
                    to: format!("[{}]:{POD_PORT}", pod_addr6(2, 0)),
                    servers: &["n2p0"],
                    peer_seen: Some(pod6.clone()),
                },
                PathSpec {
                    name: "client -> pod (IPv6)",
                    from: From::Client,
                    to: format!("[{}]:{POD_PORT}", pod_addr6(2, 0)),
                    servers: &["n2p0"],
                    peer_seen: Some(format!("[{CLIENT_ADDR6}]")),
                },
            ]);
        }
    }
    if with_services {
        all.push(PathSpec {
            name: "pod -> ClusterIP",
            from: From::Pod,
            to: format!("{MEASURED_IP}:{MEASURED_PORT}"),
            servers: &["n2p0", "n2p1"],
            // DNAT only: the server must see the pod itself.
            peer_seen: Some(pod),
        });
        if ipv6 {
            all.push(PathSpec {
                name: "pod -> ClusterIP (IPv6)",
                from: From::Pod,
                to: format!("[{MEASURED_IP6}]:{MEASURED_PORT}"),
                servers: &["n2p0", "n2p1"],
                peer_seen: Some(pod6),
            });
        }
        all.push(PathSpec {
            name: "client -> NodePort",
            from: From::Client,
            to: format!("{}:{NODE_PORT}", node_addr(1)),
            servers: &["n2p0", "n2p1"],
            // The endpoints are on node2: both kube-proxy and lb SNAT to node1.
            peer_seen: Some(node_addr(1).to_string()),
        });
        if ipv6 {
            all.push(PathSpec {
                name: "client -> NodePort (IPv6)",
                from: From::Client,
                to: format!("[{}]:{NODE_PORT}", node_addr6(1)),
                servers: &["n2p0", "n2p1"],
                peer_seen: Some(format!("[{}]", node_addr6(1))),
            });
        }
    }
    all
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Request/response over one connection per client.
    Rr,
    /// Connect, request, response, close per request.
    Crr,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Rr => "request/response",
            Mode::Crr => "connect/request/close",
        }
    }
}

/// One measured run: one path, mode and client count of one configuration, in one round.
#[derive(Serialize, Clone)]
struct Run {
    system: String,
    /// Background services (the measured one comes on top); 0 for the baseline.
    services: usize,
    path: String,
    mode: String,
    clients: usize,
    /// Which of the interleaved rounds it belongs to (from 0).
    round: u32,
    rate_per_s: u64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    max_us: f64,
    attempts: u64,
    ok: u64,
    errors: u64,
    error_samples: Vec<String>,
    by_server: BTreeMap<String, u64>,
    peers_seen: BTreeMap<String, u64>,
}

/// Every round's run of one system, size, path, mode and client count, summed up.
#[derive(Serialize, Clone)]
struct Cell {
    system: String,
    services: usize,
    path: String,
    mode: String,
    clients: usize,
    runs: usize,
    /// Median of the per-run rates (requests/s over all clients), and their range.
    rate_median_per_s: f64,
    rate_min_per_s: u64,
    rate_max_per_s: u64,
    /// (max - min) / median of the per-run rates.
    rate_spread: f64,
    /// Medians over the runs of each run's own p50, p99 and max latency.
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    /// Errors over all runs.
    errors: u64,
    /// Median rate / the baseline's median rate for the same client namespace, mode and client
    /// count.
    ratio_to_baseline: Option<f64>,
    /// The same ratio round by round (each run against the baseline's run of its round): the
    /// lowest and highest.
    round_ratio_min: Option<f64>,
    round_ratio_max: Option<f64>,
    /// The median of those round-by-round ratios: a paired figure, in which a round the machine
    /// made slow for every configuration cancels out.
    round_ratio_median: Option<f64>,
    /// Median rate / the median straight-to-pod rate of the same configuration, when that was
    /// measured (--direct-everywhere).
    ratio_to_same_config_direct: Option<f64>,
    /// The same round by round (each run against the same configuration's straight-to-pod run
    /// of its round): the median. What the configuration costs its Service's traffic over what
    /// it costs any traffic through its node.
    round_ratio_to_same_config_direct_median: Option<f64>,
}

/// The clients of one configuration.
struct Clients<'a> {
    pod: &'a Host,
    client: &'a Host,
    /// The agent's cgroup (lb's labs only), where the socket hooks are attached.
    cgroup: Option<&'a Cgroup>,
}

impl Clients<'_> {
    fn load(
        &self,
        path: &PathSpec,
        mode: Mode,
        clients: usize,
        duration_ms: u64,
    ) -> anyhow::Result<ClientReport> {
        let clients = clients.to_string();
        let duration = duration_ms.to_string();
        let mut args = vec![
            "load",
            "--to",
            &path.to,
            "--clients",
            &clients,
            "--duration-ms",
            &duration,
        ];
        if mode == Mode::Rr {
            args.push("--one-flow");
        }
        let binary = peer::binary()?;
        let stdout = match (path.from, self.cgroup) {
            (From::Pod, Some(cgroup)) => self.pod.run_in_cgroup(cgroup, binary, &args)?,
            (From::Pod, None) => self.pod.run(binary, &args)?,
            (From::Client, _) => self.client.run(binary, &args)?,
        };
        serde_json::from_str(stdout.trim())
            .with_context(|| format!("parsing lab-peer load report: {stdout}"))
    }
}

/// One system at one size, in a lab of its own. Every configuration's lab stays up for the whole
/// bench, so that the rounds can visit all of them in turn.
struct Config<'a> {
    system: &'static str,
    services: usize,
    clients: Clients<'a>,
    paths: Vec<PathSpec>,
}

impl Config<'_> {
    /// Runs one path once and checks who answered.
    fn run(
        &self,
        path: &PathSpec,
        mode: Mode,
        clients: usize,
        duration_ms: u64,
        round: u32,
    ) -> anyhow::Result<Run> {
        let report = self.clients.load(path, mode, clients, duration_ms)?;
        check(self.system, path, &report)?;
        let latency = report.latency.clone().unwrap_or_default();
        let us = |ns: u64| ns as f64 / 1000.0;
        Ok(Run {
            system: self.system.to_owned(),
            services: self.services,
            path: path.name.to_owned(),
            mode: mode.label().to_owned(),
            clients,
            round,
            rate_per_s: latency.rate_per_s,
            p50_us: us(latency.p50_ns),
            p90_us: us(latency.p90_ns),
            p99_us: us(latency.p99_ns),
            max_us: us(latency.max_ns),
            attempts: report.attempts,
            ok: report.ok,
            errors: report.errors,
            error_samples: report.error_samples,
            by_server: report.by_server,
            peers_seen: report.peers_seen,
        })
    }
}

/// Lab B: a cluster with a server in every pod and nothing on node1 but what the bench loads into
/// its namespace: a rule set, or nothing at all for the baseline. Fields drop in order.
struct RuleLab {
    _servers: Vec<Proc>,
    scratch: ScratchDir,
    cluster: Cluster,
    _lab: Lab,
}

impl RuleLab {
    fn new(spec: &ClusterSpec) -> anyhow::Result<Self> {
        let mut lab = Lab::new()?;
        let cluster = Cluster::build(&mut lab, spec)?;
        let servers = if spec.dual_stack {
            cluster
                .pods()
                .map(|pod| peer::serve_dual_stack(&pod.host, pod.host.name(), POD_PORT))
                .collect::<anyhow::Result<_>>()?
        } else {
            lab::agent::serve_in_every_pod(&cluster)?
        };
        route_client_via_node1(&cluster.client, spec.dual_stack)?;
        refuse_redirects_on_node1(&cluster.node(1).host)?;
        let scratch = ScratchDir::new(&lab, "e2e")?;
        Ok(Self {
            _servers: servers,
            scratch,
            cluster,
            _lab: lab,
        })
    }

    fn clients(&self) -> Clients<'_> {
        Clients {
            pod: &self.cluster.node(1).pods[1].host,
            client: &self.cluster.client,
            cgroup: None,
        }
    }

    /// Loads `system`'s rule set for `size` background services into node1's namespace, from
    /// nothing, and times it.
    fn load_rules(
        &self,
        system: &str,
        size: usize,
        endpoints: usize,
        timeout_s: u64,
    ) -> anyhow::Result<RuleLoad> {
        let node1 = &self.cluster.node(1).host;
        let services = services(size, endpoints, false);
        let (input, file) = match system {
            "iptables" => (iptables_rules(&services), "rules.iptables"),
            _ => (nft_rules(&services), "rules.nft"),
        };
        let path = self.scratch.path().join(file);
        std::fs::write(&path, &input)?;
        // From nothing: the namespace's ruleset (iptables-nft's tables too) is emptied.
        node1.run("nft", &["flush", "ruleset"])?;
        let path_arg = path.to_str().context("scratch path")?;
        let limit = timeout_s.to_string();
        let started = Instant::now();
        let loaded = match system {
            "iptables" => node1.run("timeout", &[&limit, "iptables-restore", path_arg]),
            _ => node1.run("timeout", &[&limit, "nft", "-f", path_arg]),
        };
        let load = started.elapsed();
        let timed_out = loaded.is_err() && load.as_secs() >= timeout_s;
        if !timed_out {
            loaded?;
        }
        eprintln!(
            "{system}: {size} services x {endpoints} endpoints (+ the measured one) {} {:.0} ms",
            if timed_out {
                "NOT loaded (killed) after"
            } else {
                "loaded in"
            },
            load.as_secs_f64() * 1000.0
        );
        Ok(RuleLoad {
            system: system.to_owned(),
            services: size,
            endpoints_per_service: endpoints,
            input_lines: input.lines().count(),
            input_bytes: input.len(),
            load_ms: (!timed_out).then_some(load.as_secs_f64() * 1000.0),
            timed_out,
        })
    }
}

/// Every answer came from an allowed server, and (where known) saw the expected client address:
/// for ClusterIP through iptables/nftables this is the proof that node1 DNATed the traffic.
fn check(system: &str, path: &PathSpec, report: &ClientReport) -> anyhow::Result<()> {
    ensure!(
        report.ok > 0,
        "{system}, {}: no successful request: {report:?}",
        path.name
    );
    ensure!(
        report
            .by_server
            .keys()
            .all(|server| path.servers.contains(&server.as_str())),
        "{system}, {}: answered by {:?}, expected only {:?}",
        path.name,
        report.by_server,
        path.servers
    );
    if let Some(peer) = &path.peer_seen {
        // A dual-stack server (the dual-stack lab's) reports an IPv4 client IPv4-mapped.
        let unmapped = |text: &str| {
            let bare = text.trim_start_matches('[').trim_end_matches(']');
            bare.strip_prefix("::ffff:").unwrap_or(bare).to_owned()
        };
        ensure!(
            report
                .peers_seen
                .keys()
                .all(|seen| unmapped(seen) == unmapped(peer)),
            "{system}, {}: servers saw {:?}, expected {peer}",
            path.name,
            report.peers_seen
        );
    }
    Ok(())
}

#[derive(Serialize)]
struct RuleLoad {
    system: String,
    services: usize,
    endpoints_per_service: usize,
    /// Lines of the iptables-restore input, or of the nft -f input.
    input_lines: usize,
    input_bytes: usize,
    /// None when the load did not finish within --load-timeout-s (then not measured).
    load_ms: Option<f64>,
    timed_out: bool,
}

/// The agent from a running start with no Service to `services` (+ the measured one) synced.
#[derive(Serialize)]
struct LbSync {
    services: usize,
    endpoints_per_service: usize,
    /// From the manifest file's arrival to the agent's "synced" line (YAML parse included).
    sync_ms: f64,
}

#[derive(Serialize)]
struct Target {
    target: String,
    value: f64,
    limit: f64,
    met: bool,
}

#[derive(Serialize)]
struct Report {
    machine: BTreeMap<String, String>,
    duration_ms: u64,
    rounds: u32,
    clients: Vec<usize>,
    services: Vec<usize>,
    endpoints_per_service: usize,
    /// lb's XDP mode on node1's NIC (`--xdp-mode`).
    lb_xdp_mode: String,
    /// lb's `--nodeport-mode`; with `dsr`, node2 runs an agent too.
    lb_nodeport_mode: String,
    /// Every run, in the order they ran.
    runs: Vec<Run>,
    /// The runs summed up per system, size, path, mode and client count.
    cells: Vec<Cell>,
    rule_loads: Vec<RuleLoad>,
    lb_syncs: Vec<LbSync>,
    /// The agent's drop and reject counters (cumulative) after all rounds, per size.
    lb_events: BTreeMap<String, BTreeMap<String, u64>>,
    /// target/bench/control.json as lb-bench-control wrote it, when present.
    lb_control: Option<serde_json::Value>,
    targets: Vec<Target>,
    /// Building the labs and loading the rule sets; measuring (warm-up and rounds); everything.
    setup_s: f64,
    measure_s: f64,
    wall_s: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    let started = Instant::now();
    let mut machine = BTreeMap::new();
    machine.insert("loadavg_before".to_owned(), loadavg());
    for (key, program, program_args) in [
        ("nproc", "nproc", &[][..]),
        ("kernel", "uname", &["-r"][..]),
        ("iptables", "iptables", &["--version"][..]),
        ("nft", "nft", &["--version"][..]),
    ] {
        let output = std::process::Command::new(program)
            .args(program_args)
            .output()
            .with_context(|| format!("running {program} (cargo xtask setup installs it)"))?;
        machine.insert(
            key.to_owned(),
            String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        );
    }
    let spec = ClusterSpec {
        pods_per_node: vec![2, 2],
        dual_stack: args.ipv6,
        ..ClusterSpec::default()
    };
    let wanted = |system: &str| args.systems.iter().any(|wanted| wanted == system);

    // Every configuration gets a lab of its own, built and loaded before anything is measured.
    eprintln!("setting up: one lab per configuration");
    let baseline = RuleLab::new(&spec)?;
    let mut rule_loads = Vec::new();
    let mut rule_labs = Vec::new();
    for system in ["iptables", "nftables"] {
        if !wanted(system) {
            continue;
        }
        for &size in &args.services {
            let lab = RuleLab::new(&spec)?;
            let load = lab.load_rules(system, size, args.endpoints, args.load_timeout_s)?;
            let timed_out = load.timed_out;
            rule_loads.push(load);
            if !timed_out {
                rule_labs.push((system, size, lab));
            }
        }
    }
    let mut lb_syncs = Vec::new();
    let mut agent_labs = Vec::new();
    if wanted("lb") {
        for &size in &args.services {
            let mut setup = AgentLab::with_spec(&spec)?;
            route_client_via_node1(&setup.cluster.client, args.ipv6)?;
            refuse_redirects_on_node1(&setup.cluster.node(1).host)?;
            // Started on an empty manifest directory, so the sync below is the Services' alone,
            // not the programs' loading. 10k Services with their slices in one file are more
            // than the default manifest size limit. With IPv6, node1's IPv6 address serves
            // NodePorts and SNATs to node2's endpoints.
            let node1_v6 = node_addr6(1).to_string();
            let flags = vec![
                "--manifest-max-bytes",
                "1073741824",
                "--xdp-mode",
                args.xdp_mode.as_str(),
                "--nodeport-mode",
                args.nodeport_mode.as_str(),
            ];
            let direct_return = args.nodeport_mode == "dsr";
            if direct_return {
                // node2 takes node1's options only for a Node's address; node1's IPv6 address
                // comes with its Node then. node1 sends by DSR only to a Node marked as taking
                // options, which node2's agent would write through the API.
                let nodes = [
                    node_manifest(1, args.ipv6),
                    dsr_marked_node_manifest(2, args.ipv6),
                ];
                std::fs::write(setup.manifests().join("nodes.yaml"), nodes.join("---\n"))?;
                setup.start_node2_agent(&flags)?;
            }
            let mut node1_flags = flags.clone();
            if args.ipv6 {
                node1_flags.extend(["--node-address", node1_v6.as_str()]);
            }
            setup.start_agent(&node1_flags)?;
            let yaml = manifests_file(&setup, &services(size, args.endpoints, args.ipv6))?;
            let before = synced_lines(&setup.log());
            let node2_before = synced_lines(&setup.node2_log());
            let sync_started = Instant::now();
            std::fs::rename(&yaml, setup.manifests().join("services.yaml"))?;
            wait_for_log(&setup.log(), "synced", before + 1, Duration::from_secs(120))?;
            let sync_ms = sync_started.elapsed().as_secs_f64() * 1000.0;
            if direct_return {
                wait_for_log(
                    &setup.node2_log(),
                    "synced",
                    node2_before + 1,
                    Duration::from_secs(120),
                )?;
            }
            eprintln!(
                "lb: {size} services x {} endpoints (+ the measured one) synced from the file source in {sync_ms:.0} ms",
                args.endpoints
            );
            lb_syncs.push(LbSync {
                services: size,
                endpoints_per_service: args.endpoints,
                sync_ms,
            });
            agent_labs.push((size, setup));
        }
    }
    let setup_s = started.elapsed().as_secs_f64();

    let mut configs = vec![Config {
        system: "baseline",
        services: 0,
        clients: baseline.clients(),
        paths: paths(true, false, args.ipv6),
    }];
    for (system, size, lab) in &rule_labs {
        configs.push(Config {
            system,
            services: *size,
            clients: lab.clients(),
            paths: paths(args.direct_everywhere, true, false),
        });
    }
    for (size, setup) in &agent_labs {
        let mut lb_paths = paths(args.direct_everywhere, true, args.ipv6);
        if args.nodeport_mode == "dsr" {
            for path in &mut lb_paths {
                if path.name == "client -> NodePort" {
                    // By direct server return the endpoint sees the client itself.
                    path.peer_seen = Some(CLIENT_ADDR.to_string());
                }
            }
        }
        configs.push(Config {
            system: "lb",
            services: *size,
            clients: Clients {
                pod: setup.client_pod(),
                client: &setup.cluster.client,
                cgroup: Some(&setup.cgroup),
            },
            paths: lb_paths,
        });
    }

    let measure_started = Instant::now();
    // Warm-up (ARP, conntrack, caches), and the check that every path works at all.
    for config in &configs {
        for path in &config.paths {
            config.run(path, Mode::Crr, 1, 200, 0)?;
        }
    }
    // Rounds: each one visits every configuration for every mode and client count, in an order
    // rotated from one mode and round to the next, so runs meant to be compared are minutes apart
    // at most and whatever else loads the machine spreads over all of them.
    let combos: Vec<(Mode, usize)> = [Mode::Rr, Mode::Crr]
        .into_iter()
        .flat_map(|mode| args.clients.iter().map(move |&clients| (mode, clients)))
        .collect();
    let mut runs = Vec::new();
    for round in 0..args.rounds {
        let round_started = Instant::now();
        eprintln!("round {} of {}", round + 1, args.rounds);
        for (index, &(mode, clients)) in combos.iter().enumerate() {
            for step in 0..configs.len() {
                let config = &configs[(step + index + round as usize) % configs.len()];
                for path in &config.paths {
                    let run = config.run(path, mode, clients, args.duration_ms, round)?;
                    eprintln!(
                        "  {:<8} {:>5} {:<18} {:<21} x{clients}: {:>7}/s p50 {:>7.1} us p99 {:>8.1} us{}",
                        run.system,
                        run.services,
                        run.path,
                        run.mode,
                        run.rate_per_s,
                        run.p50_us,
                        run.p99_us,
                        if run.errors > 0 {
                            format!(" ({} errors)", run.errors)
                        } else {
                            String::new()
                        }
                    );
                    runs.push(run);
                }
            }
        }
        eprintln!(
            "round {} took {:.0} s; load average {}",
            round + 1,
            round_started.elapsed().as_secs_f64(),
            loadavg()
        );
    }
    let measure_s = measure_started.elapsed().as_secs_f64();
    let mut lb_events = BTreeMap::new();
    for (size, setup) in &agent_labs {
        let events = setup.events()?;
        eprintln!("lb: drop and reject counters after every round at {size} services: {events:?}");
        if let Ok(node2) = setup.node2_events() {
            eprintln!(
                "lb on node2: dsr_accepted {}, drop_dsr_refused {}, drop_dsr_clash {}",
                node2["dsr_accepted"], node2["drop_dsr_refused"], node2["drop_dsr_clash"]
            );
        }
        lb_events.insert(
            size.to_string(),
            events
                .into_iter()
                .map(|(label, count)| (label.to_owned(), count))
                .collect(),
        );
    }
    drop(configs);
    drop(agent_labs);
    drop(rule_labs);
    drop(baseline);

    let cells = cells(&runs);
    let targets = targets(&cells, &args);
    let lb_control = std::fs::read_to_string(&args.control)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok());
    machine.insert("loadavg_after".to_owned(), loadavg());
    let report = Report {
        machine,
        duration_ms: args.duration_ms,
        rounds: args.rounds,
        clients: args.clients.clone(),
        services: args.services.clone(),
        endpoints_per_service: args.endpoints,
        lb_xdp_mode: args.xdp_mode.clone(),
        lb_nodeport_mode: args.nodeport_mode.clone(),
        runs,
        cells,
        rule_loads,
        lb_syncs,
        lb_events,
        lb_control,
        targets,
        setup_s,
        measure_s,
        wall_s: started.elapsed().as_secs_f64(),
    };
    print_tables(&report);
    if let Some(dir) = args.out.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)? + "\n")?;
    println!(
        "\nwrote {} ({:.0} s: {:.0} s setting up, {:.0} s measuring)",
        args.out.display(),
        report.wall_s,
        report.setup_s,
        report.measure_s
    );
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The client namespace has no route to the pods; NodePort traffic goes through node1, so the
/// straight-to-pod baseline from the client does too.
/// node1 and node2 share the fabric, so node1 would send the client ICMP redirects to node2 and
/// the baseline would skip node1: redirects are refused.
fn route_client_via_node1(client: &Host, ipv6: bool) -> anyhow::Result<()> {
    for scope in ["all", "default", "eth0"] {
        client.sysctl(&format!("net.ipv4.conf.{scope}.accept_redirects"), "0")?;
    }
    client.route(&["10.244.0.0/16", "via", &node_addr(1).to_string()])?;
    if ipv6 {
        for scope in ["all", "default", "eth0"] {
            client.sysctl(&format!("net.ipv6.conf.{scope}.accept_redirects"), "0")?;
        }
        client.route(&[POD_NETWORKS6, "via", &node_addr6(1).to_string()])?;
    }
    Ok(())
}

/// Every node's IPv6 pod network (2001:db8:244:n::/64).
const POD_NETWORKS6: &str = "2001:db8:244::/48";

fn refuse_redirects_on_node1(node1: &Host) -> anyhow::Result<()> {
    node1.sysctl("net.ipv4.conf.all.send_redirects", "0")?;
    node1.sysctl("net.ipv4.conf.eth0.send_redirects", "0")
}

/// Writes the manifests next to the agent's manifest directory, to be renamed into it: the file
/// source never sees a half-written file.
fn manifests_file(setup: &AgentLab, services: &[Svc]) -> anyhow::Result<PathBuf> {
    let dir = setup.manifests();
    let path = dir
        .parent()
        .context("manifest directory has a parent")?
        .join("services.yaml.next");
    std::fs::write(&path, manifests(services))?;
    Ok(path)
}

fn from_of(path: &str) -> &'static str {
    if path.starts_with("pod") {
        "pod"
    } else {
        "client"
    }
}

/// Nearest-rank median (the lower middle of an even count, so always a measured value).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[(values.len() - 1) / 2]
}

/// Sums up the runs per system, size, path, mode and client count, with ratios to the baseline.
fn cells(runs: &[Run]) -> Vec<Cell> {
    let same = |a: &Run, b: &Run| {
        a.system == b.system
            && a.services == b.services
            && a.path == b.path
            && a.mode == b.mode
            && a.clients == b.clients
    };
    let mut groups: Vec<Vec<&Run>> = Vec::new();
    for run in runs {
        match groups.iter_mut().find(|group| same(group[0], run)) {
            Some(group) => group.push(run),
            None => groups.push(vec![run]),
        }
    }
    let median_of = |group: &[&Run], value: fn(&Run) -> f64| {
        median(&mut group.iter().map(|run| value(run)).collect::<Vec<_>>())
    };
    let cells: Vec<Cell> = groups
        .iter()
        .map(|group| {
            let first = group[0];
            let rate = median_of(group, |run| run.rate_per_s as f64);
            let min = group.iter().map(|run| run.rate_per_s).min().unwrap_or(0);
            let max = group.iter().map(|run| run.rate_per_s).max().unwrap_or(0);
            Cell {
                system: first.system.clone(),
                services: first.services,
                path: first.path.clone(),
                mode: first.mode.clone(),
                clients: first.clients,
                runs: group.len(),
                rate_median_per_s: rate,
                rate_min_per_s: min,
                rate_max_per_s: max,
                rate_spread: if rate > 0.0 {
                    (max - min) as f64 / rate
                } else {
                    0.0
                },
                p50_us: median_of(group, |run| run.p50_us),
                p99_us: median_of(group, |run| run.p99_us),
                max_us: median_of(group, |run| run.max_us),
                errors: group.iter().map(|run| run.errors).sum(),
                ratio_to_baseline: None,
                round_ratio_min: None,
                round_ratio_max: None,
                round_ratio_median: None,
                ratio_to_same_config_direct: None,
                round_ratio_to_same_config_direct_median: None,
            }
        })
        .collect();
    // Reading order: mode, client count, system, size, path.
    let rank = |cell: &Cell| {
        let system = ["baseline", "iptables", "nftables", "lb"]
            .iter()
            .position(|system| *system == cell.system);
        let path = [
            "pod -> pod",
            "pod -> pod (IPv6)",
            "client -> pod",
            "client -> pod (IPv6)",
            "pod -> ClusterIP",
            "pod -> ClusterIP (IPv6)",
            "client -> NodePort",
            "client -> NodePort (IPv6)",
        ]
        .iter()
        .position(|path| *path == cell.path);
        (
            cell.mode != Mode::Rr.label(),
            cell.clients,
            system,
            cell.services,
            path,
        )
    };
    let mut order: Vec<usize> = (0..cells.len()).collect();
    order.sort_by_key(|&index| rank(&cells[index]));
    let mut cells: Vec<Cell> = order.iter().map(|&index| cells[index].clone()).collect();
    let groups: Vec<Vec<&Run>> = order.iter().map(|&index| groups[index].clone()).collect();
    let snapshot = cells.clone();
    for (cell, group) in cells.iter_mut().zip(&groups) {
        // Straight to a pod from the same place, over the same family.
        let family = if cell.path.ends_with(IPV6) { IPV6 } else { "" };
        let direct = format!("{} -> pod{family}", from_of(&cell.path));
        let reference = |system: &str, services: usize| {
            snapshot.iter().position(|other| {
                other.system == system
                    && other.services == services
                    && other.mode == cell.mode
                    && other.clients == cell.clients
                    && other.path == direct
            })
        };
        if let Some(index) = reference("baseline", 0)
            && snapshot[index].rate_median_per_s > 0.0
        {
            cell.ratio_to_baseline =
                Some(cell.rate_median_per_s / snapshot[index].rate_median_per_s);
            let mut ratios = round_ratios(group, &groups[index]);
            cell.round_ratio_min = ratios.iter().copied().reduce(f64::min);
            cell.round_ratio_max = ratios.iter().copied().reduce(f64::max);
            cell.round_ratio_median = (!ratios.is_empty()).then(|| median(&mut ratios));
        }
        if let Some(index) = reference(&cell.system, cell.services)
            && snapshot[index].rate_median_per_s > 0.0
        {
            cell.ratio_to_same_config_direct =
                Some(cell.rate_median_per_s / snapshot[index].rate_median_per_s);
            let mut ratios = round_ratios(group, &groups[index]);
            cell.round_ratio_to_same_config_direct_median =
                (!ratios.is_empty()).then(|| median(&mut ratios));
        }
    }
    cells
}

/// Each run's rate against the rate of `reference`'s run of the same round, for the rounds
/// both have a run with a rate in.
fn round_ratios(runs: &[&Run], reference: &[&Run]) -> Vec<f64> {
    runs.iter()
        .filter_map(|run| {
            let other = reference.iter().find(|other| other.round == run.round)?;
            (other.rate_per_s > 0).then(|| run.rate_per_s as f64 / other.rate_per_s as f64)
        })
        .collect()
}

fn find<'a>(
    cells: &'a [Cell],
    system: &str,
    services: usize,
    path: &str,
    mode: Mode,
    clients: usize,
) -> Option<&'a Cell> {
    cells.iter().find(|cell| {
        cell.system == system
            && cell.services == services
            && cell.path == path
            && cell.mode == mode.label()
            && cell.clients == clients
    })
}

/// The end-to-end targets (docs/benchmarks.md), on the medians: connect/request/close against
/// straight to a pod at the largest size, ClusterIP from a pod >= 0.99x and NodePort from outside
/// >= 0.95x, for every client count measured.
fn targets(cells: &[Cell], args: &Args) -> Vec<Target> {
    let mut targets = Vec::new();
    let largest = args.services.iter().copied().max().unwrap_or(0);
    for (path, what, limit) in [
        ("pod -> ClusterIP", "ClusterIP", 0.99),
        ("client -> NodePort", "NodePort", 0.95),
    ] {
        for &clients in &args.clients {
            if let Some(ratio) = find(cells, "lb", largest, path, Mode::Crr, clients)
                .and_then(|cell| cell.ratio_to_baseline)
            {
                targets.push(Target {
                    target: format!(
                        "lb {what} connect/request/close / straight to pod [{largest} services, {clients} clients]"
                    ),
                    value: ratio,
                    limit,
                    met: ratio >= limit,
                });
            }
        }
    }
    // IPv6 costs no more than 1.15x IPv4: each IPv6 path's rate at least 1/1.15 of its IPv4
    // twin's.
    for (what, path) in [
        ("ClusterIP", "pod -> ClusterIP"),
        ("NodePort", "client -> NodePort"),
    ] {
        for &clients in &args.clients {
            let v4 = find(cells, "lb", largest, path, Mode::Crr, clients);
            let path6 = format!("{path}{IPV6}");
            let v6 = find(cells, "lb", largest, &path6, Mode::Crr, clients);
            if let (Some(v4), Some(v6)) = (v4, v6)
                && v4.rate_median_per_s > 0.0
            {
                let ratio = v6.rate_median_per_s / v4.rate_median_per_s;
                let limit = 1.0 / 1.15;
                targets.push(Target {
                    target: format!(
                        "lb {what} connect/request/close, IPv6 / IPv4 rate [{largest} services, {clients} clients]"
                    ),
                    value: ratio,
                    limit,
                    met: ratio >= limit,
                });
            }
        }
    }
    for path in ["pod -> ClusterIP", "client -> NodePort"] {
        for &clients in &args.clients {
            let lb = find(cells, "lb", largest, path, Mode::Crr, clients);
            let iptables = find(cells, "iptables", largest, path, Mode::Crr, clients);
            if let (Some(lb), Some(iptables)) = (lb, iptables)
                && iptables.rate_median_per_s > 0.0
            {
                let ratio = lb.rate_median_per_s / iptables.rate_median_per_s;
                targets.push(Target {
                    target: format!(
                        "lb / iptables connect/request/close, {path} [{largest} services, {clients} clients]"
                    ),
                    value: ratio,
                    limit: 1.5,
                    met: ratio >= 1.5,
                });
            }
        }
    }
    targets
}

/// With --direct-everywhere: each Service path against straight to a pod from the same place
/// through the same configuration's lab, round by round, which leaves out what the
/// configuration's programs or rules cost every packet through its node.
fn print_same_config_direct(report: &Report) {
    let paired: Vec<(&Cell, f64, f64)> = report
        .cells
        .iter()
        .filter(|cell| cell.system != "baseline" && !cell.path.contains("-> pod"))
        .filter_map(|cell| {
            Some((
                cell,
                cell.round_ratio_to_same_config_direct_median?,
                cell.ratio_to_same_config_direct?,
            ))
        })
        .collect();
    if paired.is_empty() {
        return;
    }
    println!(
        "\neach Service path against straight to a pod from the same place in the same lab, the \
         median of the round-by-round ratios:\n"
    );
    for (cell, paired, of_medians) in paired {
        println!(
            "  {} {} {} {} x{}: {paired:.2}x (ratio of the medians {of_medians:.2}x)",
            cell.system, cell.services, cell.path, cell.mode, cell.clients
        );
    }
}

fn print_tables(report: &Report) {
    println!(
        "\nend to end in the lab, {} interleaved rounds of {} ms runs: median rate (requests/s, all \
         clients) +-half the range of the runs' rates, median ratio to straight-to-pod [lowest-highest \
         round by round; their median], median p50 / p99 latency in us\n",
        report.rounds, report.duration_ms
    );
    let mut header = String::from("| system | services | path | mode |");
    let mut rule = String::from("|---|---:|---|---|");
    for clients in &report.clients {
        let _ = write!(header, " {clients} client(s) |");
        rule.push_str("---:|");
    }
    println!("{header}\n{rule}");
    let mut seen = Vec::new();
    for cell in &report.cells {
        let key = (&cell.system, cell.services, &cell.path, &cell.mode);
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        let mut row = format!(
            "| {} | {} | {} | {} |",
            cell.system, cell.services, cell.path, cell.mode
        );
        for &clients in &report.clients {
            match report.cells.iter().find(|other| {
                other.system == cell.system
                    && other.services == cell.services
                    && other.path == cell.path
                    && other.mode == cell.mode
                    && other.clients == clients
            }) {
                Some(other) => {
                    let ratio = match (
                        other.ratio_to_baseline,
                        other.round_ratio_min,
                        other.round_ratio_max,
                        other.round_ratio_median,
                    ) {
                        (Some(ratio), Some(low), Some(high), Some(paired))
                            if other.system != "baseline" =>
                        {
                            format!(" {ratio:.2}x [{low:.2}-{high:.2}; {paired:.2}x]")
                        }
                        (Some(ratio), ..) => format!(" {ratio:.2}x"),
                        _ => String::new(),
                    };
                    let errors = if other.errors > 0 {
                        format!(" ({} err)", other.errors)
                    } else {
                        String::new()
                    };
                    let _ = write!(
                        row,
                        " {:.0} +-{:.0}%{ratio}, {:.0} / {:.0}{errors} |",
                        other.rate_median_per_s,
                        other.rate_spread * 50.0,
                        other.p50_us,
                        other.p99_us
                    );
                }
                None => row.push_str(" |"),
            }
        }
        println!("{row}");
    }
    print_same_config_direct(report);
    println!("\nloading the rule sets from nothing (inside lab node1's namespace):\n");
    println!("| rule set | services x endpoints | input lines | load |\n|---|---|---:|---:|");
    for load in &report.rule_loads {
        let time = match load.load_ms {
            Some(ms) => format!("{ms:.0} ms"),
            None => "killed after the time limit".to_owned(),
        };
        println!(
            "| {} | {} x {} (+1) | {} | {time} |",
            load.system, load.services, load.endpoints_per_service, load.input_lines
        );
    }
    match &report.lb_control {
        Some(control) => println!(
            "| lb, in-process (lb-bench-control) | {} x {} | | {:.0} ms |",
            control["services"],
            control["endpoints_per_service"],
            control["from_nothing_ms"].as_f64().unwrap_or(f64::NAN)
        ),
        None => println!("| lb, in-process | (no control.json) | | |"),
    }
    for sync in &report.lb_syncs {
        println!(
            "| lb run, file source, running agent until synced | {} x {} (+1) | | {:.0} ms |",
            sync.services, sync.endpoints_per_service, sync.sync_ms
        );
    }
    println!("\ntargets (docs/benchmarks.md), on the medians:");
    for target in &report.targets {
        println!(
            "  {:<96} {:>5.2}x  {}",
            target.target,
            target.value,
            if target.met {
                format!("met (>= {:.2})", target.limit)
            } else {
                format!("NOT met (>= {:.2})", target.limit)
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{Run, cells};

    fn run(system: &str, path: &str, round: u32, rate_per_s: u64) -> Run {
        Run {
            system: system.to_owned(),
            services: if system == "baseline" { 0 } else { 10 },
            path: path.to_owned(),
            mode: "connect/request/close".to_owned(),
            clients: 1,
            round,
            rate_per_s,
            p50_us: 0.0,
            p90_us: 0.0,
            p99_us: 0.0,
            max_us: 0.0,
            attempts: rate_per_s,
            ok: rate_per_s,
            errors: 0,
            error_samples: Vec::new(),
            by_server: Default::default(),
            peers_seen: Default::default(),
        }
    }

    /// Rounds 0-2: the machine halves every rate in round 1. The ratios of the medians mix
    /// rounds (900 / 1,000 here), the round-by-round ones pair each run with its round's.
    #[test]
    fn ratios_pair_each_run_with_its_rounds_reference() {
        let runs = [
            run("baseline", "pod -> pod", 0, 1_000),
            run("baseline", "pod -> pod", 1, 500),
            run("baseline", "pod -> pod", 2, 1_100),
            run("lb", "pod -> pod", 0, 1_000),
            run("lb", "pod -> pod", 1, 400),
            run("lb", "pod -> pod", 2, 1_000),
            run("lb", "pod -> ClusterIP", 0, 900),
            run("lb", "pod -> ClusterIP", 1, 440),
            run("lb", "pod -> ClusterIP", 2, 990),
        ];
        let cells = cells(&runs);
        let cell = |system: &str, path: &str| {
            cells
                .iter()
                .find(|cell| cell.system == system && cell.path == path)
                .unwrap()
        };
        let service = cell("lb", "pod -> ClusterIP");
        // Medians: 900 against the baseline's 1,000 and the lab's own 1,000.
        assert_eq!(service.ratio_to_baseline, Some(0.9));
        assert_eq!(service.ratio_to_same_config_direct, Some(0.9));
        // Against the baseline by round: 0.9, 0.88, 0.9.
        assert_eq!(service.round_ratio_min, Some(0.88));
        assert_eq!(service.round_ratio_max, Some(0.9));
        assert_eq!(service.round_ratio_median, Some(0.9));
        // Against the lab's own straight-to-pod runs by round: 0.9, 1.1, 0.99.
        assert_eq!(service.round_ratio_to_same_config_direct_median, Some(0.99));
        let direct = cell("lb", "pod -> pod");
        // 1.0, 0.8, 1000 / 1100.
        assert_eq!(direct.round_ratio_median, Some(1_000.0 / 1_100.0));
        assert_eq!(direct.round_ratio_to_same_config_direct_median, Some(1.0));
        assert_eq!(cell("baseline", "pod -> pod").round_ratio_median, Some(1.0));
    }
}
