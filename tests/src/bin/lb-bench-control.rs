//! Control-plane benchmark: time and peak memory to program N services x M endpoints from
//! nothing (compile + reconcile into fresh, private pinned maps), and the latency of one
//! endpoint change at that size (compile + reconcile until the map holds it; then, apart, the
//! refill of the frontend index the agent does after it), then again with a
//! Service that claims another's ClusterIP as its externalIP (a frontend conflict, which the
//! compiler settles incrementally: before, one conflict made every sync a full compile).
//!
//! Objects carry resourceVersions, as the API server's do, so the incremental compiler only
//! recompiles what changed. In-process, so the figures are the agent's own work; a source adds its delivery time on top
//! (the file source polls every 250 ms, the Kubernetes source coalesces bursts over 50 ms).
//! Run by `cargo xtask bench`; prints a table and writes target/bench/control.json (`--out`).
//! `--maglev`: every Service with Maglev (the agent's `--load-balancing maglev`), and the memory
//! its lookup tables take (the sum of the kernel's `memlock` figure of each table).
//!
//! Last, apart (its own maps, the first ones released): an agent sending by direct server
//! return (`--nodeport-mode dsr`) with the same Services' endpoints spread over 100 Nodes, all
//! marked as taking DSR options; one Node's mark removed, then written again (its lb stopped,
//! its reboot, its lb back), each time until the maps hold the endpoints there with their DSR
//! flag turned.

use std::sync::Arc;
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        core::v1::{Node, NodeAddress, NodeStatus, Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use lab::lab::{Lab, PinDir};
use lb_userspace::{
    compile::{Compiler, model::NodeContext},
    datapath::Datapath,
    observe::inspect::PinnedMaps,
    reconcile::Reconciler,
    source::Snapshot,
};

const SERVICES: usize = 10_000;
const ENDPOINTS: usize = 10;
const CHANGES: usize = 21;
/// The Nodes the endpoints are spread over when measuring DSR marks.
const MARKED_NODES: usize = 100;
/// Marks removed and written again (each a flip).
const MARK_FLIPS: usize = 10;

#[derive(clap::Parser)]
#[command(about = "Control plane: 10k services x 10 endpoints from nothing, and one change")]
struct Args {
    /// Where the JSON report goes (`cargo xtask bench` passes its target directory's).
    #[arg(long, default_value = "target/bench/control.json")]
    out: std::path::PathBuf,
    /// Every Service with Maglev, and the tables' memory measured.
    #[arg(long)]
    maglev: bool,
}

fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let lab = Lab::new()?;
    let pins = PinDir::new(&lab, "bench-control")?;
    let rss_start = peak_rss_kib();
    let mut snapshot = snapshot(SERVICES, ENDPOINTS, 2);
    let rss_objects = peak_rss_kib();
    let mut node = NodeContext::new("node1");
    node.default_maglev = args.maglev;

    let mut datapath = Datapath::load(pins.path())?;
    let mut compiler = Compiler::new(node);
    let mut reconciler = Reconciler::new();
    let started = Instant::now();
    let update = compiler.update(&snapshot);
    let problems = update.problems;
    let compiled = started.elapsed();
    // As the agent does: the compiler says what changed (on the first run, everything), so
    // the reconciler keeps no copy of the desired state (see `Reconciler::reconcile`).
    let report = reconciler.reconcile_changed(&mut datapath, compiler.desired(), &update.changed);
    let from_nothing = started.elapsed();
    anyhow::ensure!(
        problems.is_empty() && report.errors.is_empty(),
        "{problems:?} {:?}",
        report.errors
    );
    anyhow::ensure!(report.services_put == SERVICES, "{report:?}");
    let rss_programmed = peak_rss_kib();
    let maglev_tables = if args.maglev {
        Some(maglev_memory(&pins, &datapath)?)
    } else {
        None
    };

    // One endpoint changes in one slice; the datapath must hold the new backend afterwards.
    let mut latencies = Vec::new();
    let mut change_compile = Vec::new();
    let mut refills = Vec::new();
    for change in 0..CHANGES {
        let slice = Arc::make_mut(&mut snapshot.endpoint_slices[change * 97 % SERVICES]);
        let new_addr = format!("10.250.{}.{}", change / 250, change % 250 + 1);
        slice.endpoints[0].addresses = vec![new_addr.clone()];
        // As the API server does on every change.
        slice.metadata.resource_version = Some(format!("{}", 2 + change));
        let started = Instant::now();
        let update = compiler.update(&snapshot);
        let compiled = started.elapsed();
        let report =
            reconciler.reconcile_changed(&mut datapath, compiler.desired(), &update.changed);
        let latency = started.elapsed();
        change_compile.push(compiled);
        anyhow::ensure!(
            report.services_put == 1 && report.backends_put == 1,
            "{report:?}"
        );
        let present = datapath
            .installed_backends()
            .values()
            .any(|backend| backend.addr.to_string() == new_addr);
        anyhow::ensure!(present, "the change did not reach the maps");
        latencies.push(latency);
        // What the agent does 100 ms later, off the change's path: the changed frontends back
        // into the frontend index after a grace period.
        anyhow::ensure!(datapath.frontend_index_needs_refill(), "no slot retired");
        let started = Instant::now();
        datapath.refill_frontend_index()?;
        refills.push(started.elapsed());
        let (_, in_map_only) = datapath.frontend_index_counts();
        anyhow::ensure!(
            in_map_only == 0,
            "{in_map_only} frontends left out of the index"
        );
    }
    refills.sort();
    let refill_median = refills[refills.len() / 2];
    let refill_p90 = refills[refills.len() * 9 / 10];
    latencies.sort();
    change_compile.sort();
    let compile_median = change_compile[change_compile.len() / 2];
    let median = latencies[latencies.len() / 2];
    let p90 = latencies[latencies.len() * 9 / 10];

    // A hijacker: a new Service whose externalIP is svc-0's ClusterIP. It loses that frontend
    // (a ClusterIP comes first); the same endpoint changes must cost what they did without it.
    snapshot.services.push(Arc::new(hijacker()));
    let update = compiler.update(&snapshot);
    reconciler.reconcile_changed(&mut datapath, compiler.desired(), &update.changed);
    anyhow::ensure!(
        update
            .problems
            .iter()
            .any(|problem| problem.reason == "FrontendConflict"),
        "no conflict: {:?}",
        update.problems
    );
    let mut conflict_latencies = Vec::new();
    for change in 0..CHANGES {
        let slice = Arc::make_mut(&mut snapshot.endpoint_slices[(change * 97 + 13) % SERVICES]);
        let new_addr = format!("10.251.{}.{}", change / 250, change % 250 + 1);
        slice.endpoints[0].addresses = vec![new_addr.clone()];
        slice.metadata.resource_version = Some(format!("{}", 100 + change));
        let started = Instant::now();
        let update = compiler.update(&snapshot);
        let report =
            reconciler.reconcile_changed(&mut datapath, compiler.desired(), &update.changed);
        conflict_latencies.push(started.elapsed());
        anyhow::ensure!(
            report.services_put == 1 && update.changed.len() == 1,
            "{report:?} {:?}",
            update.changed
        );
    }
    conflict_latencies.sort();
    let conflict_median = conflict_latencies[conflict_latencies.len() / 2];
    let conflict_p90 = conflict_latencies[conflict_latencies.len() * 9 / 10];

    drop(datapath);
    let flips = mark_flips(&lab)?;

    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "control plane: {SERVICES} services x {ENDPOINTS} endpoints (one Service port each), in-process"
    );
    println!(
        "  from nothing: {:>8.1} ms (compile {:.1} ms, reconcile {:.1} ms)  target <= 2000 ms",
        ms(from_nothing),
        ms(compiled),
        ms(from_nothing - compiled)
    );
    println!(
        "  peak RSS:     {:>8.1} MiB = {:.0} MB (objects alone {:.1} MiB, process start {:.1} MiB)  target <= 150 MB",
        mib(rss_programmed),
        mib(rss_programmed) * 1.048_576,
        mib(rss_objects),
        mib(rss_start)
    );
    if let Some((tables, bytes)) = maglev_tables {
        println!(
            "  Maglev tables: {tables}, {:.1} MiB of map memory  target < 256 MiB",
            bytes as f64 / (1 << 20) as f64
        );
    }
    println!(
        "  one endpoint change: median {:.2} ms (compile {:.2} ms), p90 {:.2} ms over {CHANGES} changes  target <= 10 ms",
        ms(median),
        ms(compile_median),
        ms(p90)
    );
    println!(
        "  the frontend index refilled after each (off the change's path): median {:.2} ms, p90 {:.2} ms",
        ms(refill_median),
        ms(refill_p90)
    );
    println!(
        "  the same with a conflicting Service: median {:.2} ms, p90 {:.2} ms over {CHANGES} changes",
        ms(conflict_median),
        ms(conflict_p90)
    );
    println!(
        "  DSR, endpoints over {MARKED_NODES} Nodes: one Node's mark removed or written: median {:.2} ms, p90 {:.2} ms over {MARK_FLIPS} flips ({} Services recompiled each, median)",
        ms(flips.median),
        ms(flips.p90),
        flips.services_median
    );

    let json = serde_json::json!({
        "services": SERVICES,
        "endpoints_per_service": ENDPOINTS,
        "from_nothing_ms": ms(from_nothing),
        "compile_ms": ms(compiled),
        "reconcile_ms": ms(from_nothing - compiled),
        "peak_rss_mib": mib(rss_programmed),
        "objects_rss_mib": mib(rss_objects),
        "change_median_ms": ms(median),
        "change_p90_ms": ms(p90),
        "change_compile_median_ms": ms(compile_median),
        "frontend_index_refill_median_ms": ms(refill_median),
        "frontend_index_refill_p90_ms": ms(refill_p90),
        "change_with_conflict_median_ms": ms(conflict_median),
        "change_with_conflict_p90_ms": ms(conflict_p90),
        "dsr_nodes": MARKED_NODES,
        "dsr_mark_flip_median_ms": ms(flips.median),
        "dsr_mark_flip_p90_ms": ms(flips.p90),
        "dsr_mark_flip_services_median": flips.services_median,
        "maglev": args.maglev,
        "maglev_tables": maglev_tables.map(|(tables, _)| tables),
        "maglev_tables_memlock_mib": maglev_tables.map(|(_, bytes)| bytes as f64 / (1 << 20) as f64),
    });
    if let Some(dir) = args.out.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&json)? + "\n")?;
    Ok(())
}

/// What one Node's DSR mark coming or going costs an agent sending by DSR.
struct MarkFlips {
    median: Duration,
    p90: Duration,
    /// Services recompiled by a flip (those with an endpoint on the Node).
    services_median: usize,
}

/// [`SERVICES`] x [`ENDPOINTS`] over [`MARKED_NODES`] marked Nodes, programmed from nothing
/// (not timed) into maps of their own; then Nodes' marks removed and written again, each flip
/// timed from the snapshot's change until the reconciler has written it, and checked (untimed)
/// to recompile only the Services with an endpoint there and to leave every endpoint of that
/// Node in the pinned backends map with its `TAKES_DIRECT_RETURN` flag turned.
fn mark_flips(lab: &Lab) -> anyhow::Result<MarkFlips> {
    let pins = PinDir::new(lab, "bench-control-dsr")?;
    let mut snapshot = snapshot(SERVICES, ENDPOINTS, MARKED_NODES);
    snapshot.direct_return_nodes = (1..=MARKED_NODES).map(|n| format!("node{n}")).collect();
    let mut node = NodeContext::new("node1");
    node.direct_return = true;
    let mut datapath = Datapath::load(pins.path())?;
    let mut compiler = Compiler::new(node);
    let mut reconciler = Reconciler::new();
    let update = compiler.update(&snapshot);
    let report = reconciler.reconcile_changed(&mut datapath, compiler.desired(), &update.changed);
    anyhow::ensure!(report.services_put == SERVICES, "{report:?}");

    let mut latencies = Vec::new();
    let mut recompiled = Vec::new();
    for flip in 0..MARK_FLIPS {
        // node2, node2 again, node9, node9 again, ...: removed, then written again.
        let flipped = format!("node{}", 2 + (flip / 2) * 7 % (MARKED_NODES - 1));
        let marked = !snapshot.direct_return_nodes.remove(&flipped);
        if marked {
            snapshot.direct_return_nodes.insert(flipped.clone());
        }
        let on_node: std::collections::BTreeSet<String> = snapshot
            .endpoint_slices
            .iter()
            .flat_map(|slice| slice.endpoints.iter())
            .filter(|endpoint| endpoint.node_name.as_deref() == Some(flipped.as_str()))
            .flat_map(|endpoint| endpoint.addresses.iter().cloned())
            .collect();
        let services_there = snapshot
            .endpoint_slices
            .iter()
            .filter(|slice| {
                slice
                    .endpoints
                    .iter()
                    .any(|endpoint| endpoint.node_name.as_deref() == Some(flipped.as_str()))
            })
            .count();
        let started = Instant::now();
        let update = compiler.update(&snapshot);
        let report =
            reconciler.reconcile_changed(&mut datapath, compiler.desired(), &update.changed);
        latencies.push(started.elapsed());
        anyhow::ensure!(
            report.errors.is_empty() && update.changed.len() == services_there,
            "{flipped}: {} Services recompiled, {services_there} have endpoints there: {:?}",
            update.changed.len(),
            report.errors
        );
        // Read back from the pinned maps, as `lb backends` reads them.
        let turned = PinnedMaps::open(pins.path())?
            .backends()?
            .into_iter()
            .filter(|backend| {
                backend
                    .address
                    .rsplit_once(':')
                    .is_some_and(|(addr, _)| on_node.contains(addr))
            })
            .filter(|backend| backend.dsr_node == marked)
            .count();
        anyhow::ensure!(
            turned == on_node.len(),
            "{flipped}: {turned} of its {} endpoints with the mark's flag",
            on_node.len()
        );
        recompiled.push(services_there);
    }
    latencies.sort();
    recompiled.sort();
    Ok(MarkFlips {
        median: latencies[latencies.len() / 2],
        p90: latencies[latencies.len() * 9 / 10],
        services_median: recompiled[recompiled.len() / 2],
    })
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// How many Maglev tables the services have, and the memory they take: the kernel's `memlock`
/// figure of each (read from the fdinfo of a descriptor to it).
fn maglev_memory(pins: &PinDir, datapath: &Datapath) -> anyhow::Result<(usize, u64)> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let tables = lb_userspace::datapath::maps::open_maglev_tables(
        pins.path(),
        lb_userspace::datapath::bpf_obj::Access::ReadOnly,
    )?;
    let mut count = 0;
    let mut bytes = 0;
    for (id, service) in datapath.installed_services() {
        if service.maglev_size.is_none() {
            continue;
        }
        let table = tables.get(id, 0)?;
        let fd = aya::maps::IterableMap::map(&table).fd().as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
        let memlock: u64 = info
            .lines()
            .find_map(|line| line.strip_prefix("memlock:"))
            .and_then(|value| value.trim().parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no memlock in the fdinfo of table {id}"))?;
        count += 1;
        bytes += memlock;
    }
    Ok((count, bytes))
}

/// VmHWM (peak resident set) of this process, in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A Service created after the others whose externalIP is svc-0's ClusterIP, port 80.
fn hijacker() -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some("aa-hijacker".into()),
            namespace: Some("bench".into()),
            resource_version: Some("1".into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("10.97.0.1".into()),
            external_ips: Some(vec!["10.96.0.1".into()]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// N ClusterIP Services with one port each and one EndpointSlice of M ready endpoints each,
/// spread over `nodes` Nodes (`node1`, `node2`, ...; endpoint i of Service s on node
/// `1 + (s * M + i) % nodes`).
fn snapshot(services: usize, endpoints: usize, nodes: usize) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for index in 0..services {
        let name = format!("svc-{index}");
        let meta = |name: String, labels: Option<BTreeMap<String, String>>| ObjectMeta {
            name: Some(name),
            namespace: Some("bench".into()),
            labels,
            resource_version: Some("1".into()),
            ..ObjectMeta::default()
        };
        let cluster_ip = format!("10.96.{}.{}", index / 250, index % 250 + 1);
        snapshot.services.push(Arc::new(Service {
            metadata: meta(name.clone(), None),
            spec: Some(ServiceSpec {
                cluster_ip: Some(cluster_ip),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            status: None,
        }));
        let labels = BTreeMap::from([("kubernetes.io/service-name".to_owned(), name.clone())]);
        snapshot.endpoint_slices.push(Arc::new(EndpointSlice {
            metadata: meta(format!("{name}-abcde"), Some(labels)),
            address_type: "IPv4".into(),
            endpoints: (0..endpoints)
                .map(|endpoint| {
                    let pod = index * endpoints + endpoint;
                    Endpoint {
                        addresses: vec![format!(
                            "10.{}.{}.{}",
                            100 + pod / 65536,
                            (pod / 256) % 256,
                            pod % 256
                        )],
                        conditions: Some(EndpointConditions {
                            ready: Some(true),
                            serving: Some(true),
                            terminating: Some(false),
                        }),
                        node_name: Some(format!("node{}", 1 + pod % nodes)),
                        ..Endpoint::default()
                    }
                })
                .collect(),
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                protocol: Some("TCP".into()),
                ..EndpointPort::default()
            }]),
        }));
    }
    snapshot.node = Some(Node {
        metadata: ObjectMeta {
            name: Some("node1".into()),
            ..ObjectMeta::default()
        },
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: "203.0.113.1".into(),
            }]),
            ..NodeStatus::default()
        }),
        ..Node::default()
    });
    snapshot
}
