//! The agent's Prometheus metrics (OpenMetrics text on `/metrics`).
//!
//! - kube-proxy's own names and meanings where they apply (`kubeproxy_*`), so dashboards and
//!   alerts built for kube-proxy keep working;
//! - the agent's (`lb_*`): objects skipped for bad input, services that failed to program,
//!   health probes;
//! - the datapath's, read from the pinned per-CPU maps at scrape time ([`DatapathCollector`]):
//!   per-service packets, bytes and new flows, events (drops by reason), map fill.
//!
//! Every name and label is listed in docs/metrics.md.

use std::{
    path::PathBuf,
    sync::atomic::AtomicU64,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use super::inspect::PinnedMaps;

/// The metrics the agent updates as it works.
pub struct AgentMetrics {
    pub sync_duration: Histogram,
    pub network_programming: Histogram,
    pub last_sync: Gauge<f64, AtomicU64>,
    pub last_queued: Gauge<f64, AtomicU64>,
    pub service_changes: Counter,
    pub endpoint_changes: Counter,
    /// By `traffic_policy` ("internal", "external").
    pub no_local_endpoints: Family<[(&'static str, &'static str); 1], Gauge>,
    /// By HTTP `code`.
    pub healthz: Family<[(&'static str, u16); 1], Counter>,
    pub livez: Family<[(&'static str, u16); 1], Counter>,
    /// HTTP clients cut off by the servers' limits, by `reason`.
    pub http_refused: HttpRefused,
    pub invalid_objects: Gauge,
    pub skipped_objects: Counter,
    /// Manifest files not (re)loaded for bad input, each version counted once.
    pub manifest_errors: Counter,
    pub sync_errors: Counter,
    pub service_ports: Gauge,
    /// Frontends XDP serves, by `source`: "index" (a slot of the frontend index) or "map" (the
    /// frontends map, behind a bucket that lacks them).
    pub frontends_served: Family<[(&'static str, &'static str); 1], Gauge>,
    pub udp_sockets_aborted: Counter,
    pub udp_socket_abort_failures: Counter,
    pub event_publish_failures: Counter,
    pub cleanup_failures: Counter,
    /// By `requirement` and `interface`: 1 while the node lacks it.
    pub node_requirement_missing: Family<[(&'static str, String); 2], Gauge>,
    /// Health probes of local endpoints, by `namespace`, `service` and `result`.
    pub health_probes: crate::probe::ProbeCounts,
    /// Local endpoints their health probes hold as failed, by `namespace` and `service`.
    pub health_failed_endpoints: Family<[(&'static str, String); 2], Gauge>,
    /// Nodes marked as taking DSR options in their current boot, as the source sees them.
    pub dsr_nodes: Gauge,
    /// 1 while this node's Node lacks the DSR mark its agent writes.
    pub dsr_mark_missing: Gauge,
    pub dsr_mark_write_failures: Counter,
    /// Bits of the pair filter set, at the start and after each rebuild.
    pub pair_filter_bits: Gauge,
    pub pair_filter_rebuild_failures: Counter,
}

/// HTTP clients cut off by the servers' limits, by `reason`.
pub type HttpRefused = Family<[(&'static str, &'static str); 1], Counter>;

impl AgentMetrics {
    fn new() -> Self {
        Self {
            // kube-proxy's buckets: 1 ms to 16 s.
            sync_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            network_programming: Histogram::new(network_programming_buckets()),
            last_sync: Gauge::default(),
            last_queued: Gauge::default(),
            service_changes: Counter::default(),
            endpoint_changes: Counter::default(),
            no_local_endpoints: Family::default(),
            healthz: Family::default(),
            livez: Family::default(),
            http_refused: HttpRefused::default(),
            invalid_objects: Gauge::default(),
            skipped_objects: Counter::default(),
            manifest_errors: Counter::default(),
            sync_errors: Counter::default(),
            service_ports: Gauge::default(),
            frontends_served: Family::default(),
            udp_sockets_aborted: Counter::default(),
            udp_socket_abort_failures: Counter::default(),
            event_publish_failures: Counter::default(),
            cleanup_failures: Counter::default(),
            node_requirement_missing: Family::default(),
            health_probes: crate::probe::ProbeCounts::default(),
            health_failed_endpoints: Family::default(),
            dsr_nodes: Gauge::default(),
            dsr_mark_missing: Gauge::default(),
            dsr_mark_write_failures: Counter::default(),
            pair_filter_bits: Gauge::default(),
            pair_filter_rebuild_failures: Counter::default(),
        }
    }

    /// Records a finished sync: its duration, its time, and the changes it applied.
    pub fn synced(&self, took: Duration, service_changes: u64, endpoint_changes: u64) {
        self.sync_duration.observe(took.as_secs_f64());
        self.last_sync.set(unix_seconds(SystemTime::now()));
        self.service_changes.inc_by(service_changes);
        self.endpoint_changes.inc_by(endpoint_changes);
    }

    /// Records that the source has delivered changes that wait for a sync.
    pub fn queued(&self) {
        self.last_queued.set(unix_seconds(SystemTime::now()));
    }

    /// Records how long ago the changes behind a programmed EndpointSlice happened (from its
    /// `endpoints.kubernetes.io/last-change-trigger-time`); unparsable or future times are
    /// skipped, as kube-proxy does.
    pub fn programmed(&self, trigger_times: &[String], now: SystemTime) {
        for time in trigger_times {
            let Ok(trigger) = time.parse::<jiff::Timestamp>() else {
                continue;
            };
            if let Ok(latency) = now.duration_since(SystemTime::from(trigger)) {
                self.network_programming.observe(latency.as_secs_f64());
            }
        }
    }
}

/// kube-proxy's network-programming buckets: every 0.25 s to 0.5 s, every second to a minute,
/// then coarser to five minutes.
fn network_programming_buckets() -> Vec<f64> {
    let mut buckets = vec![0.25, 0.5];
    buckets.extend((1..=59).map(f64::from));
    buckets.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    buckets.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    buckets
}

fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

/// The registry with every metric, and the agent's handle to its own.
pub struct Metrics {
    registry: Registry,
    agent: std::sync::Arc<AgentMetrics>,
}

impl Metrics {
    /// Registers everything; the datapath's metrics are read from the maps under `pin_dir`.
    pub fn new(pin_dir: PathBuf) -> Self {
        let agent = std::sync::Arc::new(AgentMetrics::new());
        let mut registry = Registry::default();
        // Units are in the names rather than `# UNIT` lines, as kube-proxy names them (and some
        // OpenMetrics parsers refuse units on histograms).
        let kube = registry.sub_registry_with_prefix("kubeproxy");
        kube.register(
            "sync_proxy_rules_duration_seconds",
            "How long one sync of the datapath's maps with the Services and EndpointSlices took",
            agent.sync_duration.clone(),
        );
        kube.register(
            "network_programming_duration_seconds",
            "From the change behind an EndpointSlice (its last-change-trigger-time) to the \
             datapath programmed with it",
            agent.network_programming.clone(),
        );
        kube.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "When the last sync finished (Unix time)",
            agent.last_sync.clone(),
        );
        kube.register(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "When the source last delivered changes to sync (Unix time)",
            agent.last_queued.clone(),
        );
        kube.register(
            "sync_proxy_rules_service_changes",
            "Service objects added, changed or removed, as the syncs saw them",
            agent.service_changes.clone(),
        );
        kube.register(
            "sync_proxy_rules_endpoint_changes",
            "EndpointSlice objects added, changed or removed, as the syncs saw them",
            agent.endpoint_changes.clone(),
        );
        kube.register(
            // kube-proxy's name: a gauge despite the suffix.
            "sync_proxy_rules_no_local_endpoints_total",
            "Service ports with a Local traffic policy and no endpoint on this node",
            agent.no_local_endpoints.clone(),
        );
        kube.register(
            "proxy_healthz",
            "/healthz answers by HTTP code",
            agent.healthz.clone(),
        );
        kube.register(
            "proxy_livez",
            "/livez answers by HTTP code",
            agent.livez.clone(),
        );
        let lb = registry.sub_registry_with_prefix("lb");
        lb.register(
            "invalid_objects",
            "Objects of the current state skipped for bad input (held at their last good state)",
            agent.invalid_objects.clone(),
        );
        lb.register(
            "skipped_objects",
            "Objects skipped for bad input, each counted when it first appears",
            agent.skipped_objects.clone(),
        );
        lb.register(
            "http_refused",
            "HTTP connections and requests cut off by the servers' limits, by reason \
             (too_many_connections, too_many_connections_from_peer, header_timeout, \
             body_too_large, body_timeout)",
            agent.http_refused.clone(),
        );
        lb.register(
            "manifest_errors",
            "Manifest files (--source file) not loaded for bad input (unreadable, too large, not \
             YAML), and documents of loaded files skipped (a type error, no kind), each version \
             counted once; the last good version stays in force",
            agent.manifest_errors.clone(),
        );
        lb.register(
            "sync_errors",
            "Service ports that could not be programmed (map full, invalid), per attempt",
            agent.sync_errors.clone(),
        );
        lb.register(
            "service_ports",
            "Service ports (and the parts traffic policies split off) in the desired state",
            agent.service_ports.clone(),
        );
        lb.register(
            "xdp_frontends",
            "Frontends XDP serves, by source: index (a slot of the frontend index, one cache \
             line) or map (the frontends map, for a frontend whose index bucket is full or whose \
             entry changed since the last refill)",
            agent.frontends_served.clone(),
        );
        lb.register(
            "pair_filter_bits",
            "Bits of the pair filter set, of 262,144 (read at the agent's start, then after each \
             rebuild): clients (address, port, protocol) with a flow kept as two conntrack \
             entries, whose new flows XDP looks up twice (the others once); near full, every \
             client's are",
            agent.pair_filter_bits.clone(),
        );
        lb.register(
            "pair_filter_rebuild_failures",
            "Rebuilds of a pair filter generation from conntrack that failed (each logged; the \
             generation stays full until its own next rebuild, two periods on)",
            agent.pair_filter_rebuild_failures.clone(),
        );
        lb.register(
            "udp_sockets_aborted",
            "Connected UDP sockets of pods and host processes aborted because the endpoint the \
             socket hooks sent them to left the Service, or because they connected to a UDP \
             Service address before it was a frontend (the application reconnects)",
            agent.udp_sockets_aborted.clone(),
        );
        lb.register(
            "udp_socket_abort_failures",
            "Such sockets that could not be aborted, and network namespaces that could not be \
             searched for them",
            agent.udp_socket_abort_failures.clone(),
        );
        lb.register(
            "event_publish_failures",
            "Kubernetes Events the agent gave up publishing after its retries (each logged \
             with the API server's answer)",
            agent.event_publish_failures.clone(),
        );
        lb.register(
            "cleanup_failures",
            "Cleanup steps of a sync that failed, each logged with its map error: undoing a \
             failed service update, releasing session-affinity entries of departed endpoints, \
             removing backends nothing uses (tried again on the next sync)",
            agent.cleanup_failures.clone(),
        );
        lb.register(
            "node_requirement_missing",
            "1 while a setting of the node the datapath relies on is missing on an interface \
             (requirement ip_forward: forwarding, with endpoints on other nodes; accept_local), \
             or on the node (reserved_ports, with an empty interface: a port of the NodePort or \
             SNAT range among the ephemeral ports and not reserved, with --reserve-ports)",
            agent.node_requirement_missing.clone(),
        );
        lb.register(
            "health_probes",
            "Health probes of this node's endpoints of Services with the lb.io/health-check \
             annotation, by namespace, service and result (passed, failed)",
            agent.health_probes.clone(),
        );
        lb.register(
            "health_check_failed_endpoints",
            "This node's endpoints whose health probes failed them (out of rotation, unless \
             every endpoint of a table failed: fail open), by namespace and service",
            agent.health_failed_endpoints.clone(),
        );
        lb.register(
            "dsr_nodes",
            "Nodes whose Node carries lb's DSR mark for their current boot (lb's XDP takes DSR \
             options there), as this agent sees them; with --nodeport-mode dsr, flows to \
             endpoints on any other Node go by SNAT",
            agent.dsr_nodes.clone(),
        );
        lb.register(
            "dsr_mark_missing",
            "1 while this node's Node lacks the DSR mark this agent writes (XDP on its NICs, \
             Kubernetes source): other nodes send its endpoints' flows by SNAT",
            agent.dsr_mark_missing.clone(),
        );
        lb.register(
            "dsr_mark_write_failures",
            "Writes of this node's DSR mark that failed (the API server refused or could not be \
             reached); tried again every 5 s",
            agent.dsr_mark_write_failures.clone(),
        );
        let read_failures = DatapathReadFailures::default();
        lb.register(
            "datapath_read_failures",
            "Scrapes that could not read part of the datapath's pinned maps, by what (maps: \
             opening them, services, events, flow_caches, fill); each logged with the error",
            read_failures.clone(),
        );
        registry.register_collector(Box::new(DatapathCollector {
            pin_dir,
            read_failures,
        }));
        Self { registry, agent }
    }

    pub fn agent(&self) -> std::sync::Arc<AgentMetrics> {
        self.agent.clone()
    }

    /// The page `/metrics` serves.
    pub fn encode(&self) -> String {
        let mut page = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut page, &self.registry);
        page
    }
}

/// Reads the datapath's counters from the pinned maps on every scrape.
#[derive(Debug)]
struct DatapathCollector {
    pin_dir: PathBuf,
    read_failures: DatapathReadFailures,
}

/// Failed reads of the pinned maps during scrapes, by `what`.
type DatapathReadFailures = Family<[(&'static str, &'static str); 1], Counter>;

impl DatapathCollector {
    fn read_failed(&self, what: &'static str, error: &dyn std::fmt::Display) {
        tracing::warn!(%error, what, "reading the pinned maps for /metrics");
        self.read_failures.get_or_create(&[("what", what)]).inc();
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let maps = PinnedMaps::open(&self.pin_dir);
        let up = i64::from(maps.is_ok());
        ConstGauge::new(up).encode(encoder.encode_descriptor(
            "lb_datapath_up",
            "1 when the pinned maps could be read for this scrape",
            None,
            MetricType::Gauge,
        )?)?;
        let maps = match maps {
            Ok(maps) => maps,
            Err(error) => {
                self.read_failed("maps", &error);
                return Ok(());
            }
        };
        match maps.services() {
            Ok(services) => encode_services(&mut encoder, &services)?,
            Err(error) => self.read_failed("services", &error),
        }
        match maps.events() {
            Ok(events) => encode_events(&mut encoder, &events)?,
            Err(error) => self.read_failed("events", &error),
        }
        match maps.flow_caches() {
            Ok(caches) => encode_flow_caches(&mut encoder, &caches)?,
            Err(error) => self.read_failed("flow_caches", &error),
        }
        match maps.fill() {
            Ok(fill) => encode_fill(&mut encoder, &fill)?,
            Err(error) => self.read_failed("fill", &error),
        }
        Ok(())
    }
}

fn encode_flow_caches(
    encoder: &mut DescriptorEncoder,
    caches: &[crate::datapath::FlowCacheCounts],
) -> Result<(), std::fmt::Error> {
    type Field = fn(&crate::datapath::FlowCacheCounts) -> u64;
    let families: [(&str, &str, Field); 3] = [
        (
            "lb_flow_cache_hits",
            "Steady TCP segments and UDP datagrams a flow cache served without the conntrack \
             lookup (hook=xdp: packets to a local endpoint; hook=tc: its answers)",
            |cache| cache.hits,
        ),
        (
            "lb_flow_cache_misses",
            "Steady TCP segments and UDP datagrams a flow cache looked for and did not serve; \
             they took the full path",
            |cache| cache.misses,
        ),
        (
            "lb_flow_cache_closings",
            "Times a flow cache stood aside on a CPU because it missed more than it hit there",
            |cache| cache.closings,
        ),
    ];
    for (name, help, field) in families {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for cache in caches {
            let labels = [
                ("hook", cache.hook),
                ("ip_family", cache.ip_family),
                ("protocol", cache.protocol),
            ];
            ConstCounter::new(field(cache)).encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

type ServiceLabelSet = [(&'static str, String); 6];

fn encode_services(
    encoder: &mut DescriptorEncoder,
    services: &[super::inspect::ServiceInfo],
) -> Result<(), std::fmt::Error> {
    let labels: Vec<(ServiceLabelSet, &super::inspect::ServiceInfo)> = services
        .iter()
        .map(|service| {
            let parts = service.labels();
            let set = [
                ("namespace", parts.namespace),
                ("service", parts.name),
                ("port", parts.port),
                ("protocol", parts.protocol),
                ("scope", parts.scope),
                ("ip_family", parts.ip_family.into()),
            ];
            (set, service)
        })
        .collect();
    type Field = fn(&super::inspect::ServiceInfo) -> u64;
    let families: [(&str, &str, Field); 3] = [
        (
            "lb_service_packets",
            "Packets XDP translated for the service (client to backend, and replies through SNAT)",
            |service| service.packets,
        ),
        (
            "lb_service_bytes",
            "Bytes of those packets (Ethernet frames)",
            |service| service.bytes,
        ),
        (
            "lb_service_new_flows",
            "New flows: XDP connections created plus socket connects and datagram destinations \
             the socket hooks rewrote",
            |service| service.new_flows,
        ),
    ];
    for (name, help, field) in families {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, service) in &labels {
            ConstCounter::new(field(service)).encode(family.encode_family(labels)?)?;
        }
    }
    Ok(())
}

fn encode_events(
    encoder: &mut DescriptorEncoder,
    events: &std::collections::BTreeMap<&'static str, u64>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        "lb_datapath_events",
        "What the datapath did with packets and connects outside the usual path: every drop \
         (action=drop) and reject (action=reject) by reason, packets passed untouched \
         (action=pass), and conntrack repairs (action=track)",
        None,
        MetricType::Counter,
    )?;
    for (event, count) in events {
        let action = event.split('_').next().unwrap_or_default();
        let action = match action {
            "sock" => "reject",
            "ct" | "nat" | "icmp" | "maglev" | "dsr" => "track",
            other => other,
        };
        let labels = [("event", *event), ("action", action)];
        ConstCounter::new(*count).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn encode_fill(
    encoder: &mut DescriptorEncoder,
    fill: &[super::inspect::MapFill],
) -> Result<(), std::fmt::Error> {
    let mut entries = encoder.encode_descriptor(
        "lb_map_entries",
        "Entries in a datapath map (services and Maglev tables in use for the arrays)",
        None,
        MetricType::Gauge,
    )?;
    for map in fill {
        ConstGauge::new(map.entries as i64).encode(entries.encode_family(&[("map", map.map)])?)?;
    }
    let mut capacity = encoder.encode_descriptor(
        "lb_map_capacity",
        "The most entries a datapath map holds",
        None,
        MetricType::Gauge,
    )?;
    for map in fill {
        ConstGauge::new(map.capacity as i64)
            .encode(capacity.encode_family(&[("map", map.map)])?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_that_cannot_open_the_maps_says_so_and_counts_it() {
        let pin_dir = std::env::temp_dir().join(format!("lb-no-pins-{}", std::process::id()));
        let metrics = Metrics::new(pin_dir);
        let first = metrics.encode();
        assert!(first.contains("lb_datapath_up 0\n"), "{first}");
        assert!(!first.contains("lb_service_packets"), "{first}");
        assert!(
            first.contains("\nlb_datapath_read_failures_total{what=\"maps\"} 1\n"),
            "{first}"
        );
        let second = metrics.encode();
        assert!(
            second.contains("\nlb_datapath_read_failures_total{what=\"maps\"} 2\n"),
            "{second}"
        );
    }
}
