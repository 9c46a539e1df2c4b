//! End-to-end benchmark in the lab: request/response and connect/request/close rates with p50/p99
//! latency, 1 and N parallel clients, for
//! - straight to a pod address (the baseline: lab B with no service rules at all),
//! - lb: ClusterIP through the socket hooks (client pod in the agent's cgroup) and NodePort
//!   through XDP (client namespace), the real `lb run --source file` agent on node1 (lab A),
//! - the same services as kube-proxy-shaped iptables rules (iptables-restore) and nftables rules
//!   (nft -f) in node1's namespace of lab B, without any agent,
//!
//! at 1k and 10k services plus the measured one, and the time `iptables-restore` and `nft -f`
//! take to load 10k services x 10 endpoints, next to lb's in-process figure (target/bench/
//! control.json, from lb-bench-control). Prints a table and writes target/bench/e2e.json.
//!
//! The measured Service (10.96.0.10:80, nodePort 30080) has two endpoints on node2 (n2p0, n2p1);
//! the client pod is n1p1 on node1, so every path crosses node1 and node2 (pod -> node1 -> node2
//! -> pod), and pod -> ClusterIP traffic goes through node1's PREROUTING, where iptables and
//! nftables DNAT it. The client namespace reaches the pods through node1 (a route), as NodePort
//! traffic does. Everything runs inside the labs' namespaces; the rule sets are loaded only in
//! lab B's node1 namespace.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use clap::Parser;
use lab::{
    agent::{AgentLab, POD_PORT, endpoint_slice, node_port_service},
    lab::{Cgroup, Host, Lab, Proc, ScratchDir, wait_for_log},
    peer::{self, ClientReport},
    topology::{CLIENT_ADDR, Cluster, ClusterSpec, node_addr, pod_addr},
};
use serde::Serialize;

#[derive(Parser)]
#[command(
    about = "End-to-end rates and latencies: lb vs iptables vs nftables vs straight to a pod"
)]
struct Args {
    /// Length of every measured run.
    #[arg(long, default_value_t = 2000)]
    duration_ms: u64,
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
    #[arg(long, default_value = "target/bench/e2e.json")]
    out: PathBuf,
    /// lb-bench-control's results, shown next to the rule loading times when present.
    #[arg(long, default_value = "target/bench/control.json")]
    control: PathBuf,
}

const MEASURED_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
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
}

fn measured() -> Svc {
    Svc {
        name: "web".into(),
        ip: MEASURED_IP,
        port: MEASURED_PORT,
        node_port: Some(NODE_PORT),
        endpoints: vec![pod_addr(2, 0), pod_addr(2, 1)],
    }
}

/// `count` ClusterIP services of `endpoints` endpoints each (addresses nothing routes to, as in
/// lb-bench-control), with the measured one in the middle: kube-proxy's iptables order is a map's
/// random order, so the middle is the expected position.
fn services(count: usize, endpoints: usize) -> Vec<Svc> {
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
        })
        .collect();
    all.insert(count / 2, measured());
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
        match svc.node_port {
            Some(node_port) => yaml.push_str(&node_port_service(
                &svc.name,
                &svc.ip.to_string(),
                node_port,
                "",
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
    }
    yaml
}

/// Where a client runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum From {
    /// Pod n1p1 on node1 (in the agent's cgroup in lab A).
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
    /// The client address the servers must see, when it is known.
    peer_seen: Option<Ipv4Addr>,
}

fn paths(with_services: bool) -> Vec<PathSpec> {
    let pod = pod_addr(1, 1);
    let mut all = vec![
        PathSpec {
            name: "pod -> pod",
            from: From::Pod,
            to: format!("{}:{POD_PORT}", pod_addr(2, 0)),
            servers: &["n2p0"],
            peer_seen: Some(pod),
        },
        PathSpec {
            name: "client -> pod",
            from: From::Client,
            to: format!("{}:{POD_PORT}", pod_addr(2, 0)),
            servers: &["n2p0"],
            peer_seen: Some(CLIENT_ADDR),
        },
    ];
    if with_services {
        all.push(PathSpec {
            name: "pod -> ClusterIP",
            from: From::Pod,
            to: format!("{MEASURED_IP}:{MEASURED_PORT}"),
            servers: &["n2p0", "n2p1"],
            // DNAT only: the server must see the pod itself.
            peer_seen: Some(pod),
        });
        all.push(PathSpec {
            name: "client -> NodePort",
            from: From::Client,
            to: format!("{}:{NODE_PORT}", node_addr(1)),
            servers: &["n2p0", "n2p1"],
            // The endpoints are on node2: both kube-proxy and lb SNAT to node1.
            peer_seen: Some(node_addr(1)),
        });
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

#[derive(Serialize, Clone)]
struct Run {
    system: String,
    /// Background services (the measured one comes on top); 0 for the baseline.
    services: usize,
    path: String,
    mode: String,
    clients: usize,
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
    /// rate / the baseline's rate for the same client namespace, mode and client count.
    ratio_to_baseline: Option<f64>,
    /// rate / the straight-to-pod rate measured in the same configuration (same lab, same rules).
    ratio_to_same_config_direct: Option<f64>,
}

/// The clients of one configuration.
struct Clients<'a> {
    pod: &'a Host,
    client: &'a Host,
    /// The agent's cgroup (lab A), where the socket hooks are attached.
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

struct Bench {
    args: Args,
    runs: Vec<Run>,
}

impl Bench {
    /// Measures every path of one configuration in every mode and client count.
    fn measure(
        &mut self,
        system: &str,
        services: usize,
        clients: &Clients,
        with_services: bool,
    ) -> anyhow::Result<()> {
        for path in paths(with_services) {
            // Warm-up (ARP, conntrack, caches), and the check that the path works at all.
            let warm = clients.load(&path, Mode::Crr, 1, 200)?;
            check(system, &path, &warm)?;
            for mode in [Mode::Rr, Mode::Crr] {
                for &count in &self.args.clients {
                    let report = clients.load(&path, mode, count, self.args.duration_ms)?;
                    check(system, &path, &report)?;
                    let latency = report.latency.clone().unwrap_or_default();
                    let us = |ns: u64| ns as f64 / 1000.0;
                    let run = Run {
                        system: system.to_owned(),
                        services,
                        path: path.name.to_owned(),
                        mode: mode.label().to_owned(),
                        clients: count,
                        rate_per_s: latency.rate_per_s,
                        p50_us: us(latency.p50_ns),
                        p90_us: us(latency.p90_ns),
                        p99_us: us(latency.p99_ns),
                        max_us: us(latency.max_ns),
                        attempts: report.attempts,
                        ok: report.ok,
                        errors: report.errors,
                        error_samples: report.error_samples.clone(),
                        by_server: report.by_server.clone(),
                        peers_seen: report.peers_seen.clone(),
                        ratio_to_baseline: None,
                        ratio_to_same_config_direct: None,
                    };
                    eprintln!(
                        "  {system:<8} {services:>5} {:<18} {:<21} x{count}: {:>7}/s p50 {:>7.1} us p99 {:>8.1} us{}",
                        path.name,
                        mode.label(),
                        run.rate_per_s,
                        run.p50_us,
                        run.p99_us,
                        if run.errors > 0 {
                            format!(" ({} errors)", run.errors)
                        } else {
                            String::new()
                        }
                    );
                    self.runs.push(run);
                }
            }
        }
        Ok(())
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
    if let Some(peer) = path.peer_seen {
        let peer = peer.to_string();
        ensure!(
            report.peers_seen.keys().all(|seen| *seen == peer),
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
    clients: Vec<usize>,
    services: Vec<usize>,
    endpoints_per_service: usize,
    runs: Vec<Run>,
    rule_loads: Vec<RuleLoad>,
    /// The agent's drop and reject counters (cumulative) after the runs at each size.
    lb_events: BTreeMap<String, BTreeMap<String, u64>>,
    /// target/bench/control.json as lb-bench-control wrote it, when present.
    lb_control: Option<serde_json::Value>,
    targets: Vec<Target>,
    wall_s: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let mut machine = BTreeMap::new();
    machine.insert(
        "loadavg_before".to_owned(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_owned(),
    );
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
    let mut bench = Bench {
        runs: Vec::new(),
        args,
    };
    let mut rule_loads = Vec::new();
    let mut lb_events = BTreeMap::new();
    let spec = ClusterSpec {
        pods_per_node: vec![2, 2],
    };

    // Lab B first: the baseline with nothing in the way, then the rule sets.
    {
        let mut lab = Lab::new()?;
        let cluster = Cluster::build(&mut lab, &spec)?;
        let _servers: Vec<Proc> = cluster
            .pods()
            .map(|pod| peer::serve(&pod.host, pod.host.name(), POD_PORT))
            .collect::<anyhow::Result<_>>()?;
        route_client_via_node1(&cluster.client)?;
        cluster
            .node(1)
            .host
            .sysctl("net.ipv4.conf.all.send_redirects", "0")?;
        cluster
            .node(1)
            .host
            .sysctl("net.ipv4.conf.eth0.send_redirects", "0")?;
        let scratch = ScratchDir::new(&lab, "e2e")?;
        let node1 = &cluster.node(1).host;
        let clients = Clients {
            pod: &cluster.node(1).pods[1].host,
            client: &cluster.client,
            cgroup: None,
        };
        eprintln!("baseline: straight to a pod, no agent, no rules");
        bench.measure("baseline", 0, &clients, false)?;
        let sizes = bench.args.services.clone();
        let endpoints = bench.args.endpoints;
        for system in ["iptables", "nftables"] {
            if !bench.args.systems.iter().any(|wanted| wanted == system) {
                continue;
            }
            for &size in &sizes {
                let services = services(size, endpoints);
                let (input, file) = match system {
                    "iptables" => (iptables_rules(&services), "rules.iptables"),
                    _ => (nft_rules(&services), "rules.nft"),
                };
                let path = scratch.path().join(file);
                std::fs::write(&path, &input)?;
                // From nothing: the namespace's ruleset (iptables-nft's tables too) is emptied.
                node1.run("nft", &["flush", "ruleset"])?;
                let path_arg = path.to_str().context("scratch path")?;
                let limit = bench.args.load_timeout_s.to_string();
                let load_started = Instant::now();
                let loaded = match system {
                    "iptables" => node1.run("timeout", &[&limit, "iptables-restore", path_arg]),
                    _ => node1.run("timeout", &[&limit, "nft", "-f", path_arg]),
                };
                let load = load_started.elapsed();
                let timed_out = loaded.is_err() && load.as_secs() >= bench.args.load_timeout_s;
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
                rule_loads.push(RuleLoad {
                    system: system.to_owned(),
                    services: size,
                    endpoints_per_service: endpoints,
                    input_lines: input.lines().count(),
                    input_bytes: input.len(),
                    load_ms: (!timed_out).then_some(load.as_secs_f64() * 1000.0),
                    timed_out,
                });
                if !timed_out {
                    bench.measure(system, size, &clients, true)?;
                }
            }
            node1.run("nft", &["flush", "ruleset"])?;
        }
    }

    // Lab A: the real agent on node1.
    if bench.args.systems.iter().any(|wanted| wanted == "lb") {
        let mut setup = AgentLab::with_spec(&spec)?;
        route_client_via_node1(&setup.cluster.client)?;
        let node1 = &setup.cluster.node(1).host;
        node1.sysctl("net.ipv4.conf.all.send_redirects", "0")?;
        node1.sysctl("net.ipv4.conf.eth0.send_redirects", "0")?;
        let sizes = bench.args.services.clone();
        let endpoints = bench.args.endpoints;
        let manifests = setup.manifests();
        for (index, &size) in sizes.iter().enumerate() {
            let yaml = manifests_file(&setup, &services(size, endpoints))?;
            let sync_started = Instant::now();
            if index == 0 {
                std::fs::rename(&yaml, manifests.join("services.yaml"))?;
                setup.start_agent(&[])?;
            } else {
                let before = synced_lines(&setup.log());
                std::fs::rename(&yaml, manifests.join("services.yaml"))?;
                wait_for_log(&setup.log(), "synced", before + 1, Duration::from_secs(120))?;
            }
            eprintln!(
                "lb: {size} services x {endpoints} endpoints (+ the measured one) synced from the file source in {:.0} ms",
                sync_started.elapsed().as_secs_f64() * 1000.0
            );
            let clients = Clients {
                pod: setup.client_pod(),
                client: &setup.cluster.client,
                cgroup: Some(&setup.cgroup),
            };
            bench.measure("lb", size, &clients, true)?;
            let events = setup.events()?;
            eprintln!("lb: drop and reject counters after {size} services: {events:?}");
            lb_events.insert(
                size.to_string(),
                events
                    .into_iter()
                    .map(|(label, count)| (label.to_owned(), count))
                    .collect(),
            );
        }
    }

    let Bench { args, mut runs } = bench;
    fill_ratios(&mut runs);
    let targets = targets(&runs, &args);
    let lb_control = std::fs::read_to_string(&args.control)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok());
    machine.insert(
        "loadavg_after".to_owned(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_owned(),
    );
    let report = Report {
        machine,
        duration_ms: args.duration_ms,
        clients: args.clients.clone(),
        services: args.services.clone(),
        endpoints_per_service: args.endpoints,
        runs,
        rule_loads,
        lb_events,
        lb_control,
        targets,
        wall_s: started.elapsed().as_secs_f64(),
    };
    print_tables(&report);
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("\nwrote {} ({:.0} s)", args.out.display(), report.wall_s);
    Ok(())
}

/// The client namespace has no route to the pods; NodePort traffic goes through node1, so the
/// straight-to-pod baseline from the client does too.
/// node1 and node2 share the fabric, so node1 would send the client ICMP redirects to node2 and
/// the baseline would skip node1: redirects are refused.
fn route_client_via_node1(client: &Host) -> anyhow::Result<()> {
    for scope in ["all", "default", "eth0"] {
        client.sysctl(&format!("net.ipv4.conf.{scope}.accept_redirects"), "0")?;
    }
    client.route(&["10.244.0.0/16", "via", &node_addr(1).to_string()])
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

fn synced_lines(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains("synced"))
        .count()
}

fn from_of(path: &str) -> &'static str {
    if path.starts_with("pod") {
        "pod"
    } else {
        "client"
    }
}

fn fill_ratios(runs: &mut [Run]) {
    let snapshot = runs.to_vec();
    for run in runs.iter_mut() {
        let base = |system: &str, services: usize| {
            snapshot
                .iter()
                .find(|other| {
                    other.system == system
                        && other.services == services
                        && other.mode == run.mode
                        && other.clients == run.clients
                        && other.path == format!("{} -> pod", from_of(&run.path))
                })
                .map(|other| other.rate_per_s)
                .filter(|&rate| rate > 0)
        };
        run.ratio_to_baseline = base("baseline", 0).map(|rate| run.rate_per_s as f64 / rate as f64);
        run.ratio_to_same_config_direct =
            base(&run.system, run.services).map(|rate| run.rate_per_s as f64 / rate as f64);
    }
}

fn find<'a>(
    runs: &'a [Run],
    system: &str,
    services: usize,
    path: &str,
    mode: Mode,
    clients: usize,
) -> Option<&'a Run> {
    runs.iter().find(|run| {
        run.system == system
            && run.services == services
            && run.path == path
            && run.mode == mode.label()
            && run.clients == clients
    })
}

/// The issue's end-to-end targets, for every size and client count measured.
fn targets(runs: &[Run], args: &Args) -> Vec<Target> {
    let mut targets = Vec::new();
    for &size in &args.services {
        for &clients in &args.clients {
            if let Some(ratio) = find(runs, "lb", size, "pod -> ClusterIP", Mode::Rr, clients)
                .and_then(|run| run.ratio_to_baseline)
            {
                targets.push(Target {
                    target: format!(
                        "lb ClusterIP request/response / straight to pod [{size} services, {clients} clients]"
                    ),
                    value: ratio,
                    limit: 0.97,
                    met: ratio >= 0.97,
                });
            }
            if let Some(ratio) = find(runs, "lb", size, "client -> NodePort", Mode::Crr, clients)
                .and_then(|run| run.ratio_to_baseline)
            {
                targets.push(Target {
                    target: format!(
                        "lb NodePort connect/request/close / straight to pod [{size} services, {clients} clients]"
                    ),
                    value: ratio,
                    limit: 0.9,
                    met: ratio >= 0.9,
                });
            }
        }
    }
    let largest = args.services.iter().copied().max().unwrap_or(0);
    for path in ["pod -> ClusterIP", "client -> NodePort"] {
        for &clients in &args.clients {
            let lb = find(runs, "lb", largest, path, Mode::Crr, clients);
            let iptables = find(runs, "iptables", largest, path, Mode::Crr, clients);
            if let (Some(lb), Some(iptables)) = (lb, iptables)
                && iptables.rate_per_s > 0
            {
                let ratio = lb.rate_per_s as f64 / iptables.rate_per_s as f64;
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

fn print_tables(report: &Report) {
    println!(
        "\nend to end in the lab: rate (requests/s, all clients) x ratio to straight-to-pod, p50 / p99 latency in us; {} ms per run\n",
        report.duration_ms
    );
    let mut header = String::from("| system | services | path | mode |");
    let mut rule = String::from("|---|---:|---|---|");
    for clients in &report.clients {
        let _ = write!(header, " {clients} client(s) |");
        rule.push_str("---:|");
    }
    println!("{header}\n{rule}");
    let mut seen = Vec::new();
    for run in &report.runs {
        let key = (&run.system, run.services, &run.path, &run.mode);
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        let mut row = format!(
            "| {} | {} | {} | {} |",
            run.system, run.services, run.path, run.mode
        );
        for &clients in &report.clients {
            match report.runs.iter().find(|other| {
                other.system == run.system
                    && other.services == run.services
                    && other.path == run.path
                    && other.mode == run.mode
                    && other.clients == clients
            }) {
                Some(other) => {
                    let ratio = other
                        .ratio_to_baseline
                        .map(|ratio| format!(" {ratio:.2}x"))
                        .unwrap_or_default();
                    let errors = if other.errors > 0 {
                        format!(" ({} err)", other.errors)
                    } else {
                        String::new()
                    };
                    let _ = write!(
                        row,
                        " {}{ratio}, {:.0} / {:.0}{errors} |",
                        other.rate_per_s, other.p50_us, other.p99_us
                    );
                }
                None => row.push_str(" |"),
            }
        }
        println!("{row}");
    }
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
        None => println!("| lb, in-process | (no target/bench/control.json) | | |"),
    }
    println!("\ntargets from the issue:");
    for target in &report.targets {
        println!(
            "  {:<96} {:>5.2}x  {}",
            target.target,
            target.value,
            if target.met {
                format!("met (>= {})", target.limit)
            } else {
                format!("NOT met (>= {})", target.limit)
            }
        );
    }
}
