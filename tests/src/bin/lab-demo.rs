//! `cargo xtask demo`: DockerCoins on two lab nodes, served by the real `lb` agent.
//!
//! Builds the dual-stack lab (client, fabric, two nodes, four pods each), starts the
//! application's servers in their pods (each on both families), runs one `lb run --source file`
//! agent per node on tests/manifests/dockercoins.yaml (dual-stack Services; XDP and tc on the
//! node's NIC, socket hooks on the node's pod cgroup), drives traffic over IPv4 and over IPv6
//! (workers calling rng, hasher and redis through their ClusterIPs; a client outside calling
//! webui through its NodePort on both nodes: node2 has no webui pod and reaches node1's
//! through SNAT), prints a per-service table of connections and endpoint spread, and tears
//! everything down (also on failure: the lab's guards do it).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use anyhow::Context as _;
use lab::{
    lab::{Cgroup, Host, Lab, PinDir, Proc, ScratchDir, wait_for_log},
    peer::{self, ClientReport, ClientRun},
    topology::{Cluster, ClusterSpec, FABRIC_IFACE, node_addr, node_addr6},
};

const MANIFEST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/dockercoins.yaml");
const REQUESTS: u64 = 200;

/// Which application runs in which pod (node, pod index) and on which port; the worker pods
/// (index 3 on each node) run the clients.
const APPS: [(&str, u8, u8, u16); 6] = [
    ("rng-1", 1, 0, 8080),
    ("hasher-1", 1, 1, 8080),
    ("webui-1", 1, 2, 8080),
    ("rng-2", 2, 0, 8080),
    ("hasher-2", 2, 1, 8080),
    ("redis-1", 2, 2, 6379),
];

struct NodeAgent {
    _agent: Proc,
    pins: PinDir,
    cgroup: Cgroup,
}

fn main() -> anyhow::Result<()> {
    let mut lab = Lab::new()?;
    let cluster = Cluster::build(
        &mut lab,
        &ClusterSpec {
            pods_per_node: vec![4, 4],
            dual_stack: true,
            ..ClusterSpec::default()
        },
    )?;
    let scratch = ScratchDir::new(&lab, "demo")?;
    println!(
        "lab {}: client, fabric, node1 and node2 with 4 pods each, IPv4 and IPv6",
        lab.prefix()
    );

    let mut servers = Vec::new();
    for (name, node, pod, port) in APPS {
        let host = &cluster.node(node).pods[usize::from(pod)].host;
        servers.push(peer::serve_dual_stack(host, name, port)?);
    }
    println!(
        "servers: {}",
        APPS.map(|(name, node, pod, _)| format!("{name} (node{node}/pod{pod})"))
            .join(", ")
    );

    let agents = [1u8, 2]
        .map(|node| start_agent(&lab, &cluster.node(node).host, &scratch))
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    println!("lb agents running on node1 and node2 with {MANIFEST}\n");

    let worker = |node: u8| -> &Host { &cluster.node(node).pods[3].host };
    let mut runs = Vec::new();
    for family in [Family::V4, Family::V6] {
        for (service, suffix, port) in [("rng", 11, 80), ("hasher", 12, 80)] {
            for (from, node) in [("worker-1 (node1)", 1), ("worker-2 (node2)", 2)] {
                let cgroup = &agents[usize::from(node) - 1].cgroup;
                let target = family.cluster_ip(suffix, port).to_string();
                runs.push(Run::new(service, from, worker(node), Some(cgroup), target));
            }
        }
        let redis = family.cluster_ip(13, 6379).to_string();
        let cgroup = &agents[0].cgroup;
        runs.push(Run {
            one_flow: true,
            ..Run::new("redis", "worker-1 (node1)", worker(1), Some(cgroup), redis)
        });
        // node2 has no webui pod: its XDP SNATs the flows to node1's pod and back.
        for (from, node) in [("client via node1", 1), ("client via node2", 2)] {
            let target = family.node_port(node, 30080).to_string();
            runs.push(Run::new("webui", from, &cluster.client, None, target));
        }
    }
    println!(
        "{:<8} {:<20} {:<22} {:>6} {:>5} {:>6}  endpoint spread",
        "service", "from", "to", "conns", "ok", "errors"
    );
    let mut failures = 0;
    for Run {
        service,
        from,
        host,
        cgroup,
        target,
        one_flow,
    } in &runs
    {
        let run = ClientRun {
            one_flow: *one_flow,
            ..ClientRun::tcp(target, REQUESTS)
        };
        let report = run.run(host, *cgroup)?;
        failures += report.errors;
        let connections = if *one_flow { 1 } else { report.attempts };
        println!(
            "{service:<8} {from:<20} {target:<22} {connections:>6} {:>5} {:>6}  {}",
            report.ok,
            report.errors,
            spread(&report)
        );
    }
    show_operator_view(&cluster.node(2).host, &agents[1])?;
    drop(agents);
    drop(servers);
    let prefix = lab.prefix().to_owned();
    drop(scratch);
    drop(lab);
    println!("\nlab {prefix} removed");
    anyhow::ensure!(failures == 0, "{failures} requests failed");
    Ok(())
}

/// A row of the demo: REQUESTS requests from a client host (in its node's cgroup, for a pod)
/// to a Service's address, each on a connection of its own unless `one_flow`.
struct Run<'a> {
    service: &'static str,
    from: &'static str,
    host: &'a Host,
    cgroup: Option<&'a Cgroup>,
    target: String,
    one_flow: bool,
}

impl<'a> Run<'a> {
    fn new(
        service: &'static str,
        from: &'static str,
        host: &'a Host,
        cgroup: Option<&'a Cgroup>,
        target: String,
    ) -> Self {
        Self {
            service,
            from,
            host,
            cgroup,
            target,
            one_flow: false,
        }
    }
}

/// The family a row of the demo runs over: the manifest's ClusterIPs are 10.96.0.x and
/// 2001:db8:96::x (the same digits), its nodes' addresses those of the lab's fabric.
#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn cluster_ip(self, suffix: u8, port: u16) -> SocketAddr {
        let ip = match self {
            Self::V4 => IpAddr::V4(Ipv4Addr::new(10, 96, 0, suffix)),
            Self::V6 => IpAddr::V6(Ipv6Addr::new(
                0x2001,
                0xdb8,
                0x96,
                0,
                0,
                0,
                0,
                hex_digits(suffix),
            )),
        };
        SocketAddr::new(ip, port)
    }

    fn node_port(self, node: u8, port: u16) -> SocketAddr {
        let ip = match self {
            Self::V4 => IpAddr::V4(node_addr(node)),
            Self::V6 => IpAddr::V6(node_addr6(node)),
        };
        SocketAddr::new(ip, port)
    }
}

/// The last byte of a 10.96.0.x address as the last group of its IPv6 twin, the same digits
/// (11 -> `::11`, which is 0x11).
fn hex_digits(suffix: u8) -> u16 {
    u16::from_str_radix(&suffix.to_string(), 16).expect("decimal digits are hexadecimal ones")
}

/// `name count (percent)` per endpoint.
fn spread(report: &ClientReport) -> String {
    report
        .by_server
        .iter()
        .map(|(server, count)| {
            format!(
                "{server} {count} ({:.0}%)",
                *count as f64 * 100.0 / report.ok.max(1) as f64
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What an operator of node2 sees: `lb services` on its pinned maps, and the datapath's lines
/// of its /metrics page (scraped inside node2's namespace).
fn show_operator_view(node: &Host, agent: &NodeAgent) -> anyhow::Result<()> {
    println!("\n{}: lb services", node.name());
    let services = std::process::Command::new(peer::sibling_binary("lb")?)
        .args(["services", "--pin-dir"])
        .arg(agent.pins.path())
        .output()?;
    anyhow::ensure!(
        services.status.success(),
        "lb services: {}",
        String::from_utf8_lossy(&services.stderr)
    );
    print!("{}", String::from_utf8_lossy(&services.stdout));
    let metrics_address = SocketAddr::from(([127, 0, 0, 1], 10249));
    let page = lab::http::get(node, metrics_address, "/metrics")?;
    println!("\n{}: /metrics (datapath lines with a value)", node.name());
    for line in page.body.lines().filter(|line| {
        (line.starts_with("lb_service_new_flows_total")
            || line.starts_with("lb_datapath_events_total")
            || line.starts_with("kubeproxy_sync_proxy_rules_service_changes_total"))
            && !line.ends_with(" 0")
    }) {
        println!("  {line}");
    }
    Ok(())
}

fn start_agent(lab: &Lab, node: &Host, scratch: &ScratchDir) -> anyhow::Result<NodeAgent> {
    let pins = PinDir::new(lab, node.name())?;
    let cgroup = Cgroup::new(lab, node.name())?;
    let log = scratch.path().join(format!("{}.log", node.name()));
    let lb = peer::sibling_binary("lb")?;
    let args = [
        "run",
        "--source",
        "file",
        "--manifests",
        MANIFEST,
        "--hostname-override",
        node.name(),
        "--interfaces",
        FABRIC_IFACE,
        "--cgroup-path",
        cgroup.path().to_str().context("cgroup path is UTF-8")?,
        "--pin-dir",
        pins.path().to_str().context("pin path is UTF-8")?,
    ];
    let agent = node.spawn_logged(lb, &args, None, &log)?;
    wait_for_log(&log, "synced", 1, Duration::from_secs(10))
        .with_context(|| format!("agent on {}", node.name()))?;
    print_sync_line(&log, node.name());
    Ok(NodeAgent {
        _agent: agent,
        pins,
        cgroup,
    })
}

fn print_sync_line(log: &Path, node: &str) {
    if let Some(line) = std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .find(|line| line.contains("synced"))
    {
        let fields = line.split("synced").nth(1).unwrap_or_default().trim();
        println!("{node}: first sync: {fields}");
    }
}
