//! The agent: a source of objects -> compile -> reconcile -> the pinned maps, for as long as it
//! runs. Killed at any moment, it leaves the datapath working (pinned maps, programs and links);
//! restarted, it adopts what the maps hold and converges without touching connection tracking.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    ops::RangeInclusive,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use aya::programs::XdpMode;
use k8s_openapi::{api::core::v1::ObjectReference, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::runtime::events::EventType;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    compile::{
        Compiler,
        health_check::ProbedEndpoint,
        held_cluster_ips,
        model::{
            Desired, IpCidr, NodeContext, NodePortAddresses, Problem, Scope, ServicePortKey,
            Severity,
        },
    },
    datapath::{
        Datapath,
        ebpf_log::{EbpfLogLevel, Forwarder},
        monitor_control::MonitorControlCell,
    },
    logging::LogLevel,
    observe::{
        metrics::{AgentMetrics, Metrics},
        serve::{Health, HealthCheckPorts, HealthCheckTarget},
    },
    orphans::OrphanSlices,
    probe::{Change as HealthChange, Prober},
    reconcile::Reconciler,
    route::{RouteChanges, RouteLocator},
    source::{Snapshot, file::FileSource, kube as kube_source},
};

/// Where the objects come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// YAML manifests (files or directories), reloaded on change and on SIGHUP; files larger
    /// than `max_bytes` are refused unread.
    Files { paths: Vec<PathBuf>, max_bytes: u64 },
    /// The Kubernetes API server.
    Kube {
        master: Option<String>,
        kubeconfig: Option<PathBuf>,
    },
}

/// Everything `lb run` is told.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_name: String,
    pub nodeport_addresses: NodePortAddresses,
    /// `--external-ip-cidrs`: the externalIPs that may be served (empty: all).
    pub external_ip_cidrs: Vec<IpCidr>,
    pub node_addresses: Vec<IpAddr>,
    pub node_port_range: RangeInclusive<u16>,
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpAttach,
    pub cgroup: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub source: SourceConfig,
    /// Maglev for Services without the load-balancing annotation.
    pub default_maglev: bool,
    /// `--nodeport-mode dsr`: new TCP flows from outside to an endpoint on another node go by
    /// direct server return.
    pub direct_return: bool,
    /// `/metrics` and `/debug/log-level` ("" for none).
    pub metrics_bind_address: String,
    /// `/healthz` and `/livez` ("" for none).
    pub healthz_bind_address: String,
    /// How long changes may wait for a sync before /healthz says 503.
    pub healthz_timeout: Duration,
    /// The live log filter, for `/debug/log-level`.
    pub log_level: Option<LogLevel>,
    /// The programs' own logging (`--ebpf-log-level`).
    pub ebpf_log_level: EbpfLogLevel,
    /// Mount bpffs at /sys/fs/bpf when none is there. Off in a container: a mount made there
    /// stays in the container and takes the pins with it when it ends.
    pub mount_bpffs: bool,
    /// Source ports of SNATed flows.
    pub snat_ports: RangeInclusive<u16>,
    /// Keep the NodePort and SNAT ranges out of the node's ephemeral ports
    /// (`--reserve-ports`, [`crate::node::reserve_lb_ports`]).
    pub reserve_ports: bool,
    /// Sizes of the maps, when the agent creates them.
    pub map_sizes: crate::datapath::MapSizes,
    /// How long an EndpointSlice's Service may be missing before the slice is reported
    /// ([`crate::orphans`]).
    pub missing_service_grace: Duration,
    /// How long the datapath keeps idle flows, by state, and holds a closed flow's SNAT port.
    pub conntrack_timeouts: lb_common::CtTimeouts,
}

/// How XDP is attached to each of `--interfaces`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttach {
    /// In the driver, except on a veth, where generic XDP: a veth hands frames XDP transmits
    /// (XDP_TX, XDP_REDIRECT) only to a peer that runs NAPI, an XDP program or GRO on the peer
    /// (drivers/net/veth.c, `veth_xdp_xmit`: -ENXIO otherwise, the frame dropped unseen), and
    /// the peer is out of the agent's sight in another namespace (a kind node's eth0). Generic
    /// XDP transmits through the stack, which needs nothing of the peer.
    Auto,
    Fixed(XdpMode),
}

impl XdpAttach {
    pub fn for_interface(self, iface: &str) -> XdpMode {
        match self {
            Self::Fixed(mode) => mode,
            Self::Auto => match crate::datapath::nic::driver(iface) {
                Ok(driver) if driver == "veth" => {
                    info!(
                        interface = iface,
                        "a veth: XDP in generic mode, since its peer may not run NAPI \
                         (--xdp-mode native if the peer has an XDP program or GRO)"
                    );
                    XdpMode::Skb
                }
                Ok(_) => XdpMode::Driver,
                Err(error) => {
                    warn!(interface = iface, %error, "no driver name; XDP in native mode");
                    XdpMode::Driver
                }
            },
        }
    }
}

impl AgentConfig {
    /// The ports lb answers on or sends from on the node's own addresses: the NodePort range
    /// and the SNAT range.
    pub fn lb_ports(&self) -> [RangeInclusive<u16>; 2] {
        [self.node_port_range.clone(), self.snat_ports.clone()]
    }

    fn node_context(&self) -> NodeContext {
        NodeContext {
            node_name: self.node_name.clone(),
            routed_local: BTreeSet::new(),
            // From the probes, as they report.
            health_failed: BTreeSet::new(),
            nodeport_addresses: self.nodeport_addresses.clone(),
            external_ip_cidrs: self.external_ip_cidrs.clone(),
            fallback_addresses: self.node_addresses.clone(),
            node_port_range: self.node_port_range.clone(),
            default_maglev: self.default_maglev,
            direct_return: self.direct_return,
            // From the Nodes' marks, at every compile.
            direct_return_nodes: BTreeSet::new(),
            // From the Node, at every compile.
            zone: None,
        }
    }
}

/// The source of Services and EndpointSlices, ready to run: the API server's client is made
/// before the datapath loads.
enum OpenSource {
    Files { paths: Vec<PathBuf>, max_bytes: u64 },
    Kube(kube::Client),
}

/// Loads and attaches the datapath, then keeps the maps in step with the source until SIGTERM
/// or SIGINT.
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let bpffs = std::path::Path::new(crate::datapath::bpffs::DEFAULT_MOUNT);
    if !config.mount_bpffs && !crate::datapath::bpffs::is_mounted(bpffs)? {
        anyhow::bail!(
            "no bpffs at {}: mount the host's (`lb init-node`, or mount -t bpf bpf {0}) and \
             give it to the agent, or allow the agent to mount one (--mount-bpffs true)",
            bpffs.display()
        );
    }
    for iface in &config.interfaces {
        crate::node::require_accept_local(iface)?;
    }
    // Before anything is loaded: a kubeconfig that cannot be read or a --master that is no URL
    // refuses the start instead of failing once the datapath is attached.
    let source = match &config.source {
        SourceConfig::Kube { master, kubeconfig } => {
            OpenSource::Kube(kube_source::client(master.as_deref(), kubeconfig.as_deref()).await?)
        }
        SourceConfig::Files { paths, max_bytes } => OpenSource::Files {
            paths: paths.clone(),
            max_bytes: *max_bytes,
        },
    };
    if config.reserve_ports && !config.interfaces.is_empty() {
        reserve_lb_ports(&config.lb_ports());
    }
    let mut datapath =
        Datapath::load_with(&config.pin_dir, config.map_sizes, config.ebpf_log_level)
            .context("loading the datapath")?;
    if config.ebpf_log_level != EbpfLogLevel::Off {
        let forwarder = datapath.ebpf_log_forwarder()?;
        tokio::spawn(forward_ebpf_log(forwarder));
    }
    for iface in &config.interfaces {
        // tc first: a new tc program translates the answers of what either the old or the new
        // XDP program tracks, while an old tc program knows nothing of the new kinds of entry.
        datapath
            .attach_tc_egress(iface)
            .with_context(|| format!("attaching tc egress to {iface}"))?;
        let mode = config.xdp_mode.for_interface(iface);
        datapath
            .attach_xdp(iface, mode)
            .with_context(|| format!("attaching XDP to {iface} ({mode:?})"))?;
    }
    datapath
        .pin_program_arrays()
        .context("pinning the programs XDP and tc tail-call")?;
    if let Some(cgroup) = &config.cgroup {
        datapath
            .attach_cgroup(cgroup)
            .with_context(|| format!("attaching socket hooks to {}", cgroup.display()))?;
    }
    info!(
        pin_dir = %config.pin_dir.display(),
        interfaces = ?config.interfaces,
        cgroup = ?config.cgroup,
        services = datapath.installed_services().len(),
        "datapath loaded and attached"
    );
    let metrics = Arc::new(Metrics::new(config.pin_dir.clone()));
    let health = Arc::new(Health::new(config.healthz_timeout));
    let mut servers = Vec::new();
    match crate::observe::serve::bind_metrics(&config.metrics_bind_address).await {
        Ok(listeners) => {
            for listener in listeners {
                servers.push(crate::observe::serve::serve_metrics(
                    listener,
                    metrics.clone(),
                    config.log_level.clone(),
                ));
            }
        }
        Err(error) => warn!(%error, "no /metrics; the datapath is not affected"),
    }
    match crate::observe::serve::bind(&config.healthz_bind_address, "healthz").await {
        Ok(Some(listener)) => servers.push(crate::observe::serve::serve_health(
            listener,
            health.clone(),
            metrics.agent(),
        )),
        Ok(None) => {}
        Err(error) => warn!(%error, "no /healthz; the datapath is not affected"),
    }
    // Only now: until this load's programs were attached, an earlier agent's could write pairs
    // without the filter's bits, and the load left the filter full for them.
    start_pair_filter_keeper(&datapath, &config.interfaces, metrics.agent());
    let observers = Observers {
        metrics: metrics.agent(),
        health,
        health_checks: HealthCheckPorts::default()
            .counting_refused(metrics.agent().http_refused.clone()),
        local_policy: BTreeMap::new(),
    };

    let (updates, snapshots) = watch::channel(Snapshot::default());
    let (source, events, mark) = match source {
        OpenSource::Files { paths, max_bytes } => {
            let files = FileSource::new(paths, config.node_name.clone()).with_max_bytes(max_bytes);
            let agent_metrics = observers.metrics.clone();
            let task = files.run(updates, move |error| {
                agent_metrics.manifest_errors.inc();
                warn!(%error, "{}", error.kept.describe());
            });
            (tokio::spawn(task), None, None)
        }
        OpenSource::Kube(client) => {
            let events = kube_source::EventRecorder::new(client.clone(), "lb", &config.node_name)
                .with_failure_counter(metrics.agent().event_publish_failures.clone());
            let mark = direct_return_mark(&config, &client).map(|mark| {
                mark.with_metrics(kube_source::MarkMetrics {
                    missing: metrics.agent().dsr_mark_missing.clone(),
                    write_failures: metrics.agent().dsr_mark_write_failures.clone(),
                })
            });
            let task = kube_source::KubeSource::new(client, config.node_name.clone()).run(updates);
            (tokio::spawn(task), Some(Arc::new(events)), mark)
        }
    };
    let result =
        sync_until_stopped(&config, &mut datapath, snapshots, events, mark, observers).await;
    source.abort();
    for server in servers {
        server.abort();
    }
    result
}

/// This node's DSR mark, when its NICs have lb's XDP program, which takes DSR options (every
/// node's does, whatever its `--nodeport-mode`): without one, or without the boot ID to mark
/// it with, other nodes send its endpoints' flows by SNAT.
fn direct_return_mark(
    config: &AgentConfig,
    client: &kube::Client,
) -> Option<kube_source::DirectReturnMark> {
    if config.interfaces.is_empty() {
        return None;
    }
    match std::fs::read_to_string(BOOT_ID) {
        Ok(boot_id) => Some(kube_source::DirectReturnMark::new(
            client.clone(),
            &config.node_name,
            boot_id.trim(),
        )),
        Err(error) => {
            warn!(%error, path = BOOT_ID, "no boot ID: this node is not marked as taking DSR options");
            None
        }
    }
}

/// How often the pair filter's keeper rebuilds one of its two generations from conntrack: a bit
/// of a pair that has gone is dropped within two periods. A rebuild walks the conntrack maps
/// (a batch read, as a metrics scrape does).
const PAIR_FILTER_REBUILD_PERIOD: Duration = Duration::from_secs(60);

/// Starts the pair filter's keeper ([`PAIR_FILTER_REBUILD_PERIOD`]), which reports each rebuild
/// to the log and the metrics; not while an XDP link of an interface this agent does not serve
/// is pinned (an earlier agent's program runs there, making pairs without this load's filter:
/// the filter stays full).
fn start_pair_filter_keeper(
    datapath: &Datapath,
    interfaces: &[String],
    metrics: Arc<AgentMetrics>,
) {
    metrics
        .pair_filter_bits
        .set(i64::from(datapath.pair_filter_bits()));
    match crate::datapath::pins::xdp_link_interfaces(datapath.pin_dir()) {
        Ok(linked) => {
            let stale: Vec<&String> = linked
                .iter()
                .filter(|iface| !interfaces.contains(iface))
                .collect();
            if !stale.is_empty() {
                warn!(
                    ?stale,
                    "XDP links of interfaces this agent does not serve are pinned: their programs are an earlier agent's, which make pairs without this agent's pair filter, so it stays full (every new flow looks its ORIGINAL entry up); `lb run --cleanup` or removing those links' pins ends it"
                );
                return;
            }
        }
        Err(error) => {
            warn!(%error, "the pinned XDP links could not be listed: the pair filter stays full");
            return;
        }
    }
    let mut first = true;
    let report = move |rebuilt: std::io::Result<crate::datapath::Rebuilt>| match rebuilt {
        Ok(rebuilt) => {
            metrics.pair_filter_bits.set(i64::from(rebuilt.bits_set));
            if std::mem::take(&mut first) {
                info!(
                    pairs = rebuilt.pairs,
                    bits_set = rebuilt.bits_set,
                    took_ms = rebuilt.took.as_millis() as u64,
                    "pair filter rebuilt from conntrack"
                );
            } else {
                debug!(?rebuilt, "pair filter generation rebuilt");
            }
        }
        Err(error) => {
            metrics.pair_filter_rebuild_failures.inc();
            warn!(%error, "a pair filter generation was not rebuilt: it stays full until its next rebuild, two periods on, and clients' new flows look their ORIGINAL entry up meanwhile");
        }
    };
    let started = datapath
        .pair_filter_keeper()
        .map_err(anyhow::Error::from)
        .and_then(|keeper| Ok(keeper.spawn(PAIR_FILTER_REBUILD_PERIOD, report)?));
    if let Err(error) = started {
        warn!(%error, "no pair filter keeper: bits of pairs that have gone stay set, and each costs its client's new flows a conntrack lookup");
    }
}

/// The kernel's ID of this boot, which the kubelet reports as the Node's `status.nodeInfo.bootID`
/// (Documentation/admin-guide/sysctl/kernel.rst, `random`).
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

async fn sync_until_stopped(
    config: &AgentConfig,
    datapath: &mut Datapath,
    mut snapshots: watch::Receiver<Snapshot>,
    events: Option<Arc<kube_source::EventRecorder>>,
    mut mark: Option<kube_source::DirectReturnMark>,
    mut observers: Observers,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut compiler = Compiler::new(config.node_context());
    let locator = RouteLocator::new(config.interfaces.clone());
    let mut route_changes = if locator.enabled() {
        RouteChanges::subscribe()
            .inspect_err(|error| {
                warn!(%error, "no route notifications; endpoints without nodeName are placed again on syncs only")
            })
            .ok()
    } else {
        None
    };
    let mut reconciler = Reconciler::new();
    let mut node_requirements = crate::node::RequirementWatch::default();
    let mut reported: BTreeSet<Problem> = BTreeSet::new();
    let mut reported_unprogrammed: BTreeSet<Problem> = BTreeSet::new();
    let mut orphans = OrphanSlices::new(config.missing_service_grace);
    let mut prober = Prober::new(observers.metrics.health_probes.clone());
    // Objects skipped for bad input since the start (each counted once, when it first appears).
    let mut skipped_total: u64 = 0;
    let mut abandoned_monitors = tokio::time::interval(ABANDONED_MONITOR_CHECK);
    let mut nic_mac_check = tokio::time::interval(NIC_MAC_CHECK);
    // When to copy changed frontends into the frontend index again (after a sync that retired
    // slots): XDP reads them from the frontends maps meanwhile.
    let mut index_refill_due: Option<Instant> = None;
    loop {
        // The channel's initial value is an empty placeholder: syncing it would remove every
        // installed service after a restart. Only what the source publishes is synced.
        let woken = tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    anyhow::bail!("the source stopped");
                }
                Woken::Sync
            }
            changed = next_route_change(&mut route_changes) => Woken::Routes(changed),
            change = prober.next_change() => Woken::Health(change),
            // A slice without its Service for the grace period: reported by this sync.
            () = sleep_until(orphans.next_due()) => Woken::Sync,
            _ = abandoned_monitors.tick() => Woken::MonitorCheck,
            _ = nic_mac_check.tick() => Woken::NicMacCheck,
            () = sleep_until(index_refill_due) => Woken::IndexRefill,
            () = sleep_until(mark.as_ref().and_then(|mark| mark.due())) => Woken::Mark,
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        };
        match woken {
            Woken::Sync => {}
            Woken::MonitorCheck => {
                release_abandoned_monitor(datapath.pin_dir());
                continue;
            }
            Woken::NicMacCheck => {
                follow_nic_macs(datapath, &config.interfaces);
                continue;
            }
            Woken::Mark => {
                if let Some(mark) = &mut mark {
                    mark.ensure(snapshots.borrow().node.as_ref());
                }
                continue;
            }
            Woken::IndexRefill => {
                index_refill_due = None;
                if let Err(error) = datapath.refill_frontend_index() {
                    warn!(%error, "the frontend index was not refilled; XDP reads the frontends it lacks from the frontends maps");
                }
                // A frontend put back leaves its bucket's overflow byte for one more grace period.
                if datapath.frontend_index_needs_refill() {
                    index_refill_due = Some(Instant::now() + FRONTEND_INDEX_REFILL_DELAY);
                }
                observers.frontend_index(datapath.frontend_index_counts());
                continue;
            }
            Woken::Routes(Err(error)) => {
                warn!(%error, "route notifications stopped; endpoints without nodeName are placed again on syncs only");
                route_changes = None;
                continue;
            }
            Woken::Routes(Ok(())) => {
                // Synced only when an endpoint moved: no object changed.
                if !place_unplaced_endpoints(&locator, &mut compiler) {
                    continue;
                }
                info!("endpoints without nodeName moved with the routes");
            }
            Woken::Health(change) => {
                // With those that came meanwhile: endpoints failing together, one sync.
                for change in std::iter::once(change).chain(prober.pending_changes()) {
                    report_health_change(&change, &snapshots.borrow(), events.as_ref());
                }
                count_health_failed(&observers.metrics, &prober);
                // Synced only when a compiled Service's tables change.
                if !compiler.set_health_failed(prober.failed().clone()) {
                    continue;
                }
            }
        }
        observers.queued();
        let started = Instant::now();
        // Compiled under the channel's read lock: no copy of the whole snapshot.
        let (update, this_node, node_addresses) = {
            let snapshot = snapshots.borrow_and_update();
            observers
                .health
                .set_node_eligible(node_eligible(snapshot.node.as_ref()));
            observers
                .metrics
                .dsr_nodes
                .set(i64::try_from(snapshot.direct_return_nodes.len()).unwrap_or(i64::MAX));
            let mut update = compiler.update(&snapshot);
            // Routes change without the objects changing: endpoints without a nodeName are
            // placed again on every sync, and their Services compiled again when one moved.
            if place_unplaced_endpoints(&locator, &mut compiler) {
                update.absorb(compiler.update(&snapshot));
            }
            // The probes follow the compiled endpoints; an endpoint no longer probed is
            // forgotten, and its Service compiled again if it was failed.
            if prober.set_targets(compiler.probe_targets())
                && compiler.set_health_failed(prober.failed().clone())
            {
                update.absorb(compiler.update(&snapshot));
            }
            if !reconciler.is_initialized() {
                reconciler.recover_held(held_cluster_ips(&snapshot, compiler.desired()));
            }
            update.problems = orphans.filter(&update.problems, &snapshot, Instant::now());
            let mut node_addresses = snapshot.node_addresses.clone();
            node_addresses.extend(config.node_addresses.iter().copied());
            (
                update,
                node_reference(snapshot.node.as_ref()),
                node_addresses,
            )
        };
        if let Err(error) = sync_datapath_config(
            datapath,
            (compiler.snat_address(), compiler.snat_address6()),
            &config.snat_ports,
            config.conntrack_timeouts,
        ) {
            warn!(%error, "datapath settings not written; flows to backends on other nodes go unSNATed");
        }
        if let Err(error) = datapath.set_node_addresses(&node_addresses) {
            warn!(%error, "node addresses not written; DSR options naming a NodePort of a node not written are refused");
        }
        let new_problems = report_new_problems(&update.problems, &mut reported);
        let new_invalid_count = new_problems
            .iter()
            .filter(|problem| problem.severity == Severity::Invalid)
            .count() as u64;
        skipped_total += new_invalid_count;
        if let Some(events) = &events {
            for problem in &new_problems {
                warn_of(events, &snapshots.borrow(), problem);
            }
        }
        let desired = compiler.desired();
        debug!(
            changed = ?update.changed.iter().map(ToString::to_string).collect::<Vec<_>>(),
            service_changes = update.changes.services,
            endpoint_changes = update.changes.endpoint_slices,
            "compiled"
        );
        let report = reconciler.reconcile_changed(datapath, desired, &update.changed);
        for (key, error) in &report.errors {
            warn!(service = %key, error = %error, "service not programmed; the others are");
        }
        // A Warning Event on each Service with a port not programmed (map full): once while it
        // stays so, as the reconciler tries it again on every sync.
        let unprogrammed: BTreeSet<Problem> = report.errors.iter().map(not_programmed).collect();
        if let Some(events) = &events {
            for problem in unprogrammed.difference(&reported_unprogrammed) {
                warn_of(events, &snapshots.borrow(), problem);
            }
        }
        reported_unprogrammed = unprogrammed;
        for error in &report.udp_sockets.errors {
            warn!(%error, "a UDP socket connected to a departed endpoint was not aborted");
        }
        for error in &report.cleanup_failures {
            warn!(error = %error, "a cleanup step of the sync failed");
        }
        count_health_failed(&observers.metrics, &prober);
        check_node_requirements(
            config,
            desired,
            compiler.snat_address(),
            &mut node_requirements,
            &observers.metrics,
            events.as_ref().zip(this_node),
        );
        if config.nodeport_addresses != NodePortAddresses::All {
            let addresses = compiler.node_port_addresses().iter().copied();
            observers.health_checks.bind_to(addresses.collect());
        }
        let invalid_objects = update
            .problems
            .iter()
            .filter(|p| p.severity == Severity::Invalid)
            .count();
        if index_refill_due.is_none() && datapath.frontend_index_needs_refill() {
            index_refill_due = Some(Instant::now() + FRONTEND_INDEX_REFILL_DELAY);
        }
        observers.frontend_index(datapath.frontend_index_counts());
        if report.errors.is_empty()
            && let Err(error) = datapath.remove_pins_retired_after_sync()
        {
            warn!(%error, "removing the pins of maps an earlier release used");
        }
        observers
            .synced(
                desired,
                &update,
                &report,
                compiler.health_check_node_ports(),
                prober.failed(),
                SyncCounts {
                    took: started.elapsed(),
                    invalid_objects,
                    new_invalid: new_invalid_count,
                },
            )
            .await;
        info!(
            services = desired.services.len(),
            changed = update.changed.len(),
            changes = report.changes(),
            services_put = report.services_put,
            services_removed = report.services_removed,
            backends_put = report.backends_put,
            backends_removed = report.backends_removed,
            errors = report.errors.len(),
            udp_sockets_aborted = report.udp_sockets.destroyed,
            invalid_objects,
            skipped_total,
            elapsed_us = started.elapsed().as_micros(),
            "synced"
        );
        // After the sync: the admissions of DSR options are written for what it installed.
        if let Some(mark) = &mut mark {
            mark.ensure(snapshots.borrow().node.as_ref());
        }
    }
    info!("stopping; the datapath stays attached and keeps its state");
    Ok(())
}

/// What woke the loop.
enum Woken {
    /// This node's DSR mark is due for another look.
    Mark,
    /// The source published, or an orphan slice is due: sync.
    Sync,
    /// The node's routes changed (or their notifications stopped).
    Routes(std::io::Result<()>),
    /// A probed endpoint failed or passed again.
    Health(HealthChange),
    /// Time to look for an `lb monitor` that died with the datapath's reports on.
    MonitorCheck,
    /// Time to read the served NICs' MACs again.
    NicMacCheck,
    /// Time to refill the frontend index.
    IndexRefill,
}

/// How long after a sync that changed frontends the agent refills the frontend index: the
/// refill waits for a grace period (a few milliseconds, the sync loop's), so the syncs of a
/// burst of changes share one.
const FRONTEND_INDEX_REFILL_DELAY: Duration = Duration::from_millis(100);

/// Forwards the programs' log records to the agent's log as they come.
async fn forward_ebpf_log(forwarder: Forwarder) {
    // SAFETY: the forwarder owns its ring buffer's descriptor, open and the same for as long
    // as the AsyncFd owns the forwarder.
    let mut records = match unsafe { tokio::io::unix::AsyncFd::register(forwarder) } {
        Ok(records) => records,
        Err(error) => {
            warn!(error = %error.into_parts().1, "the programs' log is not forwarded");
            return;
        }
    };
    loop {
        match records.readable_mut().await {
            Ok(mut ready) => {
                // aya-log's reader panics on a record it cannot parse: the forwarding stops, the
                // agent goes on.
                let forwarder = ready.get_inner_mut();
                let flushed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    forwarder.flush();
                }));
                if flushed.is_err() {
                    warn!("the programs' log is no longer forwarded: a record could not be read");
                    return;
                }
                ready.clear_ready();
            }
            Err(error) => {
                warn!(%error, "the programs' log is no longer forwarded");
                return;
            }
        }
    }
}

/// How often the agent looks for an abandoned `lb monitor`.
const ABANDONED_MONITOR_CHECK: Duration = Duration::from_secs(5);

/// How often the agent reads its NICs' MACs again ([`follow_nic_macs`]): until it has, a
/// frontend's established connections through a NIC whose MAC changed get RSTs from the stack.
/// One ioctl per NIC a second; a netlink subscription to link changes would close the gap.
const NIC_MAC_CHECK: Duration = Duration::from_secs(1);

/// Records a served NIC's MAC again when it changed under the agent (a bond that fails over
/// with its MAC, an address set after the agent started): XDP would otherwise take every frame
/// to the new MAC for another host's, and NodePort traffic would reach the stack untranslated.
/// A NIC that cannot be read (gone) is skipped.
fn follow_nic_macs(datapath: &mut Datapath, interfaces: &[String]) {
    for iface in interfaces {
        match datapath.refresh_nic_mac(iface) {
            Ok(Some((old, new))) => info!(
                interface = %iface,
                old = %mac_text(old),
                new = %mac_text(new),
                "a NIC's MAC changed: XDP now takes the frames sent to the new one"
            ),
            Ok(None) => {}
            Err(error) => debug!(interface = %iface, %error, "the NIC's MAC was not read"),
        }
    }
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|byte| format!("{byte:02x}")).join(":")
}

/// Turns the datapath's event reports off when the `lb monitor` that turned them on stopped
/// beating (killed, or stopped), so that the programs do not report to nobody.
fn release_abandoned_monitor(pin_dir: &std::path::Path) {
    let released = MonitorControlCell::open(pin_dir).and_then(|mut cell| cell.release_abandoned());
    match released {
        Ok(Some(pid)) => info!(
            pid,
            "turned the datapath's event reports off: the lb monitor that asked for them stopped"
        ),
        Ok(None) => {}
        Err(error) => warn!(%error, "could not check for an abandoned lb monitor"),
    }
}

/// The reason of the Warning Event on a Service whose endpoint failed its health check.
pub const HEALTH_CHECK_FAILED_REASON: &str = "EndpointHealthCheckFailed";
/// The reason of the Normal Event on a Service whose endpoint passed its health check again.
pub const HEALTH_CHECK_PASSED_REASON: &str = "EndpointHealthCheckPassed";

/// Logs an endpoint that failed its health check or passed it again, and with the Kubernetes
/// source records it as an Event on its Service (Warning when it failed, Normal when back).
fn report_health_change(
    change: &HealthChange,
    snapshot: &Snapshot,
    events: Option<&Arc<kube_source::EventRecorder>>,
) {
    let endpoint = &change.endpoint;
    let at = std::net::SocketAddr::new(endpoint.addr, endpoint.port);
    let (reason, message) = if change.failed {
        warn!(
            service = %format!("{}/{}", endpoint.namespace, endpoint.name),
            endpoint = %at,
            probes = change.probes,
            last = %change.detail,
            "endpoint failed its health check; out of rotation on this node"
        );
        (
            HEALTH_CHECK_FAILED_REASON,
            format!(
                "endpoint {at} failed {} health checks in a row ({}); out of rotation on this \
                 node unless every endpoint has failed",
                change.probes, change.detail
            ),
        )
    } else {
        info!(
            service = %format!("{}/{}", endpoint.namespace, endpoint.name),
            endpoint = %at,
            probes = change.probes,
            "endpoint passed its health check; back in rotation on this node"
        );
        (
            HEALTH_CHECK_PASSED_REASON,
            format!(
                "endpoint {at} passed {} health checks in a row; back in rotation on this node",
                change.probes
            ),
        )
    };
    if let Some(events) = events {
        let object = reference(snapshot, "Service", &endpoint.namespace, &endpoint.name);
        let type_ = if change.failed {
            EventType::Warning
        } else {
            EventType::Normal
        };
        // One Event series per endpoint: the recorder would merge the second endpoint's into
        // the first's.
        let action = format!("HealthCheck {at}");
        spawn_event_as(events.clone(), object, type_, reason, message, action);
    }
}

/// `lb_health_check_failed_endpoints`: every probed Service's failed endpoints (0 for none).
fn count_health_failed(metrics: &AgentMetrics, prober: &Prober) {
    let gauge = &metrics.health_failed_endpoints;
    gauge.clear();
    for ((namespace, name), failed) in prober.failed_by_service() {
        gauge
            .get_or_create(&[("namespace", namespace), ("service", name)])
            .set(failed as i64);
    }
}

/// What watches the syncs: metrics, health, healthCheckNodePort servers.
struct Observers {
    metrics: Arc<AgentMetrics>,
    health: Arc<Health>,
    health_checks: HealthCheckPorts,
    /// Service ports with a Local traffic policy, with their endpoints (address, port, and
    /// whether it is ready rather than serving while terminating); kept for the changed ports
    /// only, so a sync stays O(the change).
    local_policy: BTreeMap<ServicePortKey, Vec<(IpAddr, u16, bool)>>,
}

struct SyncCounts {
    took: Duration,
    invalid_objects: usize,
    new_invalid: u64,
}

impl Observers {
    fn queued(&self) {
        self.health.queued();
        self.metrics.queued();
    }

    /// Records where XDP finds the frontends: (in the index, in the frontends maps only).
    fn frontend_index(&self, (indexed, in_map_only): (usize, usize)) {
        let served = &self.metrics.frontends_served;
        served
            .get_or_create(&[("source", "index")])
            .set(indexed as i64);
        served
            .get_or_create(&[("source", "map")])
            .set(in_map_only as i64);
    }

    async fn synced(
        &mut self,
        desired: &Desired,
        update: &crate::compile::Update,
        report: &crate::reconcile::ReconcileReport,
        health_check_ports: &BTreeMap<(String, String), u16>,
        health_failed: &BTreeSet<ProbedEndpoint>,
        counts: SyncCounts,
    ) {
        let metrics = &self.metrics;
        metrics.synced(
            counts.took,
            update.changes.services,
            update.changes.endpoint_slices,
        );
        metrics.programmed(&update.changes.trigger_times, SystemTime::now());
        metrics.invalid_objects.set(counts.invalid_objects as i64);
        metrics.skipped_objects.inc_by(counts.new_invalid);
        metrics.sync_errors.inc_by(report.errors.len() as u64);
        metrics
            .cleanup_failures
            .inc_by(report.cleanup_failures.len() as u64);
        metrics
            .udp_sockets_aborted
            .inc_by(report.udp_sockets.destroyed);
        metrics
            .udp_socket_abort_failures
            .inc_by(report.udp_sockets.failed);
        metrics.service_ports.set(desired.services.len() as i64);
        for key in &update.changed {
            match desired.services.get(key) {
                Some(service) if service.flags & lb_common::service_flags::LOCAL_ONLY != 0 => {
                    let endpoints = service
                        .backends
                        .iter()
                        .map(|backend| {
                            let ready = backend.flags & lb_common::backend_flags::TERMINATING == 0;
                            (backend.addr, backend.port, ready)
                        })
                        .collect();
                    self.local_policy.insert(key.clone(), endpoints);
                }
                _ => {
                    self.local_policy.remove(key);
                }
            }
        }
        for policy in ["internal", "external"] {
            let empty = self
                .local_policy
                .iter()
                .filter(|(key, endpoints)| endpoints.is_empty() && traffic_policy(key) == policy)
                .count();
            metrics
                .no_local_endpoints
                .get_or_create(&[("traffic_policy", policy)])
                .set(empty as i64);
        }
        let wanted = health_check_ports
            .iter()
            .map(|((namespace, name), port)| {
                let target = HealthCheckTarget {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    local_endpoints: self.local_endpoints(namespace, name, health_failed),
                };
                (*port, target)
            })
            .collect();
        self.health_checks.sync(&wanted).await;
        self.health.updated();
    }

    /// A Service's endpoints on this node that its healthCheckNodePort counts: the most ready
    /// ones any of its externally-scoped ports has (ETP Local programs only local endpoints
    /// there), leaving out those failing their health check. Endpoints serving while
    /// terminating are not counted, as kube-proxy counts none: the load balancer moves new
    /// clients to other nodes while the node's own finish theirs. The datapath keeps failed endpoints when all fail
    /// (fail open); the port reports 0 then, so that the load balancer sends to other nodes.
    fn local_endpoints(
        &self,
        namespace: &str,
        name: &str,
        health_failed: &BTreeSet<ProbedEndpoint>,
    ) -> usize {
        let failed = |addr: IpAddr, port: u16| {
            health_failed.contains(&ProbedEndpoint {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                addr,
                port,
            })
        };
        self.local_policy
            .iter()
            .filter(|(key, _)| {
                key.namespace == namespace
                    && key.name == name
                    && matches!(key.scope, Scope::External | Scope::LoadBalancer)
            })
            .map(|(_, endpoints)| {
                endpoints
                    .iter()
                    .filter(|&&(addr, port, ready)| ready && !failed(addr, port))
                    .count()
            })
            .max()
            .unwrap_or(0)
    }
}

/// The taint the cluster autoscaler puts on a node it is about to remove.
const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Whether load balancers should keep sending new traffic to this node: not while it is being
/// deleted or the autoscaler is about to remove it (kube-proxy's /healthz since KEP-3836).
pub fn node_eligible(node: Option<&k8s_openapi::api::core::v1::Node>) -> bool {
    let Some(node) = node else {
        return true;
    };
    let deleting = node.metadata.deletion_timestamp.is_some();
    let leaving = node
        .spec
        .as_ref()
        .and_then(|spec| spec.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|taint| taint.key == TO_BE_DELETED_TAINT));
    !deleting && !leaving
}

/// kube-proxy's `traffic_policy` label for a Local-policy service port.
fn traffic_policy(key: &ServicePortKey) -> &'static str {
    match key.scope {
        Scope::Internal => "internal",
        _ => "external",
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// The next route change, or never without a subscription.
async fn next_route_change(changes: &mut Option<RouteChanges>) -> std::io::Result<()> {
    match changes {
        Some(changes) => changes.changed().await,
        None => std::future::pending().await,
    }
}

/// Tells the compiler which endpoints without a nodeName the node's routes put on this node.
/// Returns whether any moved (their Services need compiling again).
fn place_unplaced_endpoints(locator: &RouteLocator, compiler: &mut Compiler) -> bool {
    if !locator.enabled() {
        return false;
    }
    let addresses: Vec<IpAddr> = compiler.unplaced_endpoints().collect();
    match locator.local_among(addresses) {
        Ok(local) => {
            if !local.is_empty() {
                debug!(?local, "endpoints without nodeName on this node, by route");
            }
            compiler.set_routed_local(local)
        }
        Err(error) => {
            warn!(%error, "no route lookup; endpoints without nodeName keep their last placement");
            false
        }
    }
}

/// Keeps the datapath's SNAT addresses (for flows to backends on other nodes, one per family)
/// equal to this node's addresses, and its SNAT ports and conntrack timeouts as configured.
fn sync_datapath_config(
    datapath: &mut Datapath,
    (address, address6): (Option<Ipv4Addr>, Option<std::net::Ipv6Addr>),
    snat_ports: &RangeInclusive<u16>,
    timeouts: lb_common::CtTimeouts,
) -> anyhow::Result<()> {
    let wanted = lb_common::DatapathConfig {
        snat_addr: address.map_or(0, u32::from),
        snat_port_min: *snat_ports.start(),
        snat_port_max: *snat_ports.end(),
        timeouts,
    };
    if datapath.config()? != wanted {
        datapath.set_config(&wanted)?;
        info!(snat_address = ?address, ?timeouts, "datapath settings written");
    }
    let wanted6 = lb_common::Datapath6Config {
        snat_addr: address6.map_or([0; 4], crate::compile::model::ipv6_words),
    };
    if datapath.config6()? != wanted6 {
        datapath.set_config6(&wanted6)?;
        info!(snat_address6 = ?address6, "datapath IPv6 settings written");
    }
    Ok(())
}

/// The reason of the Event on a Service with a port the maps could not take.
pub const NOT_PROGRAMMED_EVENT_REASON: &str = "NotProgrammed";

/// A Service port the reconciler could not program, as a problem of its Service (for its Event).
fn not_programmed((key, error): &(ServicePortKey, crate::datapath::DatapathError)) -> Problem {
    Problem {
        severity: Severity::Warning,
        kind: "Service",
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        reason: NOT_PROGRAMMED_EVENT_REASON,
        message: format!(
            "port {key} not programmed, the Service's other ports and the other Services are: {error}"
        ),
    }
}

/// Logs each problem once, when it first appears; returns the new invalid-input problems and
/// warnings (the ones worth a Kubernetes Event).
fn report_new_problems(problems: &[Problem], reported: &mut BTreeSet<Problem>) -> Vec<Problem> {
    let current: BTreeSet<Problem> = problems.iter().cloned().collect();
    let mut for_events = Vec::new();
    for problem in current.difference(reported) {
        let object = format!("{} {}/{}", problem.kind, problem.namespace, problem.name);
        match problem.severity {
            Severity::Invalid => {
                warn!(%object, reason = problem.reason, message = %problem.message, "skipped");
                for_events.push(problem.clone());
            }
            Severity::Unsupported => {
                info!(%object, reason = problem.reason, message = %problem.message, "not supported yet")
            }
            Severity::Warning => {
                warn!(%object, reason = problem.reason, message = %problem.message, "used as corrected");
                for_events.push(problem.clone());
            }
        }
    }
    *reported = current;
    for_events
}

/// The full reference to a problem's object (with the uid and resourceVersion of the object the
/// source holds, which `kubectl describe` needs to show the Event), or namespace and name alone
/// if the object just left the source.
fn reference(snapshot: &Snapshot, kind: &str, namespace: &str, name: &str) -> ObjectReference {
    let is_it = |metadata: &ObjectMeta| {
        metadata.name.as_deref() == Some(name)
            && metadata.namespace.as_deref().unwrap_or("default") == namespace
    };
    let (api_version, metadata) = match kind {
        "EndpointSlice" => (
            "discovery.k8s.io/v1",
            snapshot
                .endpoint_slices
                .iter()
                .map(|slice| &slice.metadata)
                .find(|metadata| is_it(metadata)),
        ),
        "Node" => (
            "v1",
            snapshot
                .node
                .as_ref()
                .map(|node| &node.metadata)
                .filter(|metadata| metadata.name.as_deref() == Some(name)),
        ),
        _ => (
            "v1",
            snapshot
                .services
                .iter()
                .map(|service| &service.metadata)
                .find(|metadata| is_it(metadata)),
        ),
    };
    let gone = ObjectMeta {
        name: Some(name.to_owned()),
        namespace: (kind != "Node").then(|| namespace.to_owned()),
        ..ObjectMeta::default()
    };
    kube_source::object_reference(api_version, kind, metadata.unwrap_or(&gone))
}

/// Reserves the ports of `lb_ports` the node would hand out as ephemeral ports
/// ([`crate::node::reserve_lb_ports`]). Where the agent may not write the sysctl (a read-only
/// /proc/sys in a container: `lb init-node` does it there), the first requirement check reports
/// what is missing.
fn reserve_lb_ports(lb_ports: &[RangeInclusive<u16>]) {
    match crate::node::reserve_lb_ports(lb_ports) {
        Ok(reserved) if reserved.is_empty() => {}
        Ok(reserved) => info!(
            ports = %crate::node::format_port_list(&reserved),
            "took the NodePort and SNAT ports out of the node's ephemeral ports \
             (net.ipv4.ip_local_reserved_ports)"
        ),
        Err(error) => {
            warn!(error = %format!("{error:#}"), "could not reserve the NodePort and SNAT ports")
        }
    }
}

/// The reason of the Warning Event on the Node about a missing requirement.
pub const NODE_REQUIREMENT_EVENT_REASON: &str = "NodeRequirementMissing";

/// Checks what the datapath needs from the node ([`crate::node::missing_requirements`]): each
/// missing requirement is logged and evented on the Node when it goes missing (and logged when
/// it is back), and the metric shows the current state of each. `snat_address`: the address
/// remote endpoints' flows are SNATed to.
fn check_node_requirements(
    config: &AgentConfig,
    desired: &Desired,
    snat_address: Option<Ipv4Addr>,
    watch: &mut crate::node::RequirementWatch,
    metrics: &AgentMetrics,
    events: Option<(&Arc<kube_source::EventRecorder>, ObjectReference)>,
) {
    let interfaces = &config.interfaces;
    if interfaces.is_empty() {
        return;
    }
    // Stops at the first remote backend: cheap where most are remote.
    let remote_endpoints = desired.services.values().any(|service| {
        service
            .backends
            .iter()
            .any(|backend| backend.flags & lb_common::backend_flags::LOCAL == 0)
    });
    let mut missing = crate::node::missing_requirements(interfaces, remote_endpoints, snat_address);
    if config.reserve_ports {
        missing.extend(crate::node::missing_reserved_ports(&config.lb_ports()));
        for requirement in crate::node::NODE_REQUIREMENTS {
            let is_missing = missing
                .iter()
                .any(|missing| missing.requirement == requirement);
            metrics
                .node_requirement_missing
                .get_or_create(&[
                    ("requirement", requirement.to_owned()),
                    ("interface", String::new()),
                ])
                .set(i64::from(is_missing));
        }
    }
    for interface in interfaces {
        for requirement in crate::node::REQUIREMENTS {
            let is_missing = missing.iter().any(|missing| {
                missing.requirement == requirement && &missing.interface == interface
            });
            metrics
                .node_requirement_missing
                .get_or_create(&[
                    ("requirement", requirement.to_owned()),
                    ("interface", interface.clone()),
                ])
                .set(i64::from(is_missing));
        }
    }
    let changes = watch.update(&missing);
    for missing in changes.newly_missing {
        warn!(requirement = missing.requirement, interface = %missing.interface, "{missing}");
        if let Some((events, node)) = &events {
            spawn_event(
                Arc::clone(events),
                node.clone(),
                EventType::Warning,
                NODE_REQUIREMENT_EVENT_REASON,
                missing.to_string(),
            );
        }
    }
    for (requirement, interface) in changes.back {
        info!(requirement, %interface, "node requirement met again");
    }
}

/// The Node object of this agent, for Events about it (the uid makes `kubectl describe node`
/// show them).
fn node_reference(node: Option<&k8s_openapi::api::core::v1::Node>) -> Option<ObjectReference> {
    let node = node?;
    Some(kube_source::object_reference("v1", "Node", &node.metadata))
}

/// A Warning Event about a problem, on its object.
fn warn_of(events: &Arc<kube_source::EventRecorder>, snapshot: &Snapshot, problem: &Problem) {
    let object = reference(snapshot, problem.kind, &problem.namespace, &problem.name);
    spawn_event(
        events.clone(),
        object,
        EventType::Warning,
        problem.reason,
        problem.message.clone(),
    );
}

/// An Event on the object, in the background: the sync loop never waits for the API. The
/// recorder retries; what it gives up on is logged with the API server's answer (and counted in
/// `lb_event_publish_failures_total`).
fn spawn_event(
    events: Arc<kube_source::EventRecorder>,
    object: ObjectReference,
    type_: EventType,
    reason: &'static str,
    message: String,
) {
    let action = kube_source::EVENT_ACTION.to_owned();
    spawn_event_as(events, object, type_, reason, message, action);
}

/// As [`spawn_event`], with an action of its own ([`kube_source::EventRecorder::publish_as`]).
fn spawn_event_as(
    events: Arc<kube_source::EventRecorder>,
    object: ObjectReference,
    type_: EventType,
    reason: &'static str,
    message: String,
    action: String,
) {
    tokio::spawn(async move {
        if let Err(error) = events
            .publish_as(type_, &object, reason, &message, &action)
            .await
        {
            warn!(
                error = format!("{error:#}"),
                kind = object.kind.as_deref().unwrap_or_default(),
                "could not publish an Event"
            );
        }
    });
}

/// The API server `lb run --cleanup` removes this node's DSR mark through (`--source kube`).
pub struct MarkRemoval {
    pub node_name: String,
    pub master: Option<String>,
    pub kubeconfig: Option<PathBuf>,
}

/// How long `lb run --cleanup` tries to remove the DSR mark before it detaches the datapath
/// regardless.
const MARK_REMOVAL_TIMEOUT: Duration = Duration::from_secs(10);

/// `lb run --cleanup`: removes this node's DSR mark when `mark` says where (first: other nodes
/// then stop sending its endpoints' flows by DSR before the XDP that takes the options goes),
/// then the pins the agent created (links, programs, maps), which detaches the datapath, and
/// the pin directory; refuses any path that is not a pin directory
/// ([`crate::datapath::pins::remove`]). Missing state is not an error, and neither is a mark
/// that could not be removed: that is logged with the command that removes it.
pub fn cleanup(pin_dir: &std::path::Path, mark: Option<&MarkRemoval>) -> anyhow::Result<()> {
    if let Some(mark) = mark {
        remove_dsr_mark(mark);
    }
    match crate::datapath::pins::remove(pin_dir)? {
        crate::datapath::pins::Cleanup::Absent => {
            info!(pin_dir = %pin_dir.display(), "nothing to remove");
        }
        crate::datapath::pins::Cleanup::Removed(pins) => {
            info!(pin_dir = %pin_dir.display(), pins, "removed");
        }
    }
    Ok(())
}

fn remove_dsr_mark(mark: &MarkRemoval) {
    let node = mark.node_name.as_str();
    let removal = async {
        let client =
            kube_source::client(mark.master.as_deref(), mark.kubeconfig.as_deref()).await?;
        kube_source::remove_direct_return_mark(client, node).await
    };
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| {
            runtime.block_on(async {
                tokio::time::timeout(MARK_REMOVAL_TIMEOUT, removal)
                    .await
                    .unwrap_or_else(|_| {
                        Err(anyhow::anyhow!(
                            "no answer from the API server in {MARK_REMOVAL_TIMEOUT:?}"
                        ))
                    })
            })
        });
    match result {
        Ok(()) => info!(node, "removed this node's DSR mark"),
        Err(error) => warn!(
            node,
            error = format!("{error:#}"),
            "this node's DSR mark was not removed; nodes running lb with --nodeport-mode dsr send its endpoints' flows by DSR, which time out without lb here, until it is: kubectl annotate node {node} {}-",
            crate::source::DIRECT_RETURN_MARK
        ),
    }
}
