//! A read-only view of a running agent's pinned maps: what `lb services`, `lb backends`,
//! `lb conntrack` and `lb stats` print and what `/metrics` reports. Opening a pin never changes
//! the datapath, and nothing here can write to a map: every map is opened read-only
//! (BPF_F_RDONLY), so the kernel refuses a write even if one were attempted.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
};

use lb_common::{
    CtAddr, CtKey, CtTimeouts, CtValue, FlowValue, backend_flags, ct_direction, ct_flags, limits,
    map_names, proto, service_flags, tcp_state,
};
use serde::Serialize;

use crate::compile::model::{Family, FrontendKey};
use crate::datapath::{
    FlowCacheCounts,
    bpf_obj::Access,
    maps::Maps,
    read::{
        read_backends, read_events, read_flow_caches, read_installed, read_service_counter,
        read_service_names, read_source_ranges,
    },
};

/// The pinned maps of one agent (its `--pin-dir`), opened read-only.
/// The maps, and the sizes of those the agent may create at another size than the `limits`
/// constant (`lb run --frontend-map-size`, `--conntrack-map-size`), as the kernel has them.
pub struct PinnedMaps(Maps, crate::datapath::MapSizes);

/// One service (a Service port, or the part of it one traffic policy splits off).
#[derive(Clone, Debug, Serialize)]
pub struct ServiceInfo {
    pub id: u32,
    /// `namespace/name:port/PROTO`, with `[internal]`/`[external]`/`[loadbalancer]` when a
    /// traffic policy or source ranges split the port; empty when the agent recorded none.
    pub name: String,
    /// `address:port/proto kind[,kind]`.
    pub frontends: Vec<String>,
    /// `address:port` of the backends new flows choose from, in slot order; a backend with
    /// several cells (endpoint weights) once, with ` xN`.
    pub backends: Vec<String>,
    pub local_only: bool,
    pub source_ranges: Vec<String>,
    pub maglev: bool,
    /// New TCP flows from outside to an endpoint on another node go by direct server return
    /// (`lb run --nodeport-mode dsr`).
    pub direct_return: bool,
    pub affinity_timeout_s: u32,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

impl ServiceInfo {
    /// The name split into (namespace, name, port name, protocol, scope, IP family), for metric
    /// labels.
    pub fn labels(&self) -> ServiceLabels {
        ServiceLabels::parse(&self.name, self.id)
    }
}

/// A service name taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceLabels {
    pub namespace: String,
    pub name: String,
    pub port: String,
    pub protocol: String,
    pub scope: String,
    /// `IPv4` or `IPv6` (a dual-stack Service port is one service per family).
    pub ip_family: &'static str,
}

impl ServiceLabels {
    /// Takes apart a name as `ServicePortKey`'s Display writes it:
    /// `namespace/name:port/PROTOCOL`, then `[scope]` unless it is all, then `[ipv6]` for IPv6.
    fn parse(text: &str, id: u32) -> Self {
        let (text, ip_family) = match text.strip_suffix("[ipv6]") {
            Some(rest) => (rest, "IPv6"),
            None => (text, "IPv4"),
        };
        let parsed = text.split_once('/').and_then(|(namespace, rest)| {
            let (name, rest) = rest.split_once(':')?;
            let (port, rest) = rest.rsplit_once('/')?;
            let (protocol, scope) = match rest.split_once('[') {
                Some((protocol, scope)) => (protocol, scope.trim_end_matches(']')),
                None => (rest, "all"),
            };
            Some(Self {
                namespace: namespace.into(),
                name: name.into(),
                port: port.into(),
                protocol: protocol.into(),
                scope: scope.into(),
                ip_family,
            })
        });
        parsed.unwrap_or_else(|| Self {
            namespace: String::new(),
            name: format!("service-{id}"),
            port: String::new(),
            protocol: String::new(),
            scope: "all".into(),
            ip_family,
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendInfo {
    pub id: u32,
    pub address: String,
    pub protocol: &'static str,
    pub local: bool,
    pub terminating: bool,
    /// Its node takes DSR options (`backend_flags::TAKES_DIRECT_RETURN`): with `--nodeport-mode
    /// dsr`, new flows from outside go to it by direct server return.
    pub dsr_node: bool,
    /// Services (by name, or id) whose current table holds this backend.
    pub services: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ConntrackEntry {
    /// "flow" (a flow kept in one entry), "original" or "reply" (the two entries of a flow kept
    /// as two, and a SNAT flow's REPLY entry).
    pub direction: &'static str,
    pub protocol: &'static str,
    /// Flow and ORIGINAL: the client; REPLY: the backend.
    pub source: String,
    /// Flow and ORIGINAL: the frontend; REPLY: the client or this node's SNAT address.
    pub destination: String,
    /// Flow and ORIGINAL: the backend the flow goes to; REPLY: the frontend the client used.
    pub nat: String,
    /// With SNAT: the node address:port standing in for the client (flow, ORIGINAL), or the
    /// client the reply goes back to (REPLY).
    pub snat: Option<String>,
    /// A FLOW entry of a flow that goes by direct server return: on the node the client sent
    /// to, its answers never come back here; on the endpoint's node, the option took it.
    pub direct_return: bool,
    pub state: &'static str,
    pub service_id: u32,
    pub backend_id: u32,
    /// Seconds since the entry was last refreshed (CLOCK_MONOTONIC, as bpf_ktime_get_ns).
    pub idle_s: f64,
    /// Idle past its timeout: the datapath no longer uses it (the LRU map keeps it until it
    /// needs the room).
    pub expired: bool,
}

/// Which conntrack entries `lb conntrack` shows.
#[derive(Clone, Debug, Default)]
pub struct ConntrackFilter {
    /// Entries with this address as source, destination or NAT address.
    pub address: Option<IpAddr>,
    /// Entries with this port anywhere.
    pub port: Option<u16>,
    pub protocol: Option<u8>,
    pub service_id: Option<u32>,
    /// Entries past their timeout too (marked expired); without it, live entries only.
    pub include_expired: bool,
}

/// A conntrack address of either family, as `lb conntrack` shows it.
trait ShownAddr: CtAddr {
    fn ip(self) -> IpAddr;
}

impl ShownAddr for u32 {
    fn ip(self) -> IpAddr {
        Ipv4Addr::from(self).into()
    }
}

impl ShownAddr for lb_common::Ipv6Words {
    fn ip(self) -> IpAddr {
        crate::compile::model::ipv6_of_words(self).into()
    }
}

impl ConntrackFilter {
    fn matches<A: ShownAddr>(&self, key: &CtKey<A>, value: &CtValue<A>) -> bool {
        let addresses = [key.saddr, key.daddr, value.nat_addr, value.snat_addr].map(A::ip);
        let ports = [key.sport, key.dport, value.nat_port, value.snat_port];
        self.address
            .is_none_or(|address| addresses.contains(&address))
            && self.port.is_none_or(|port| ports.contains(&port))
            && self.protocol.is_none_or(|protocol| protocol == key.proto)
            && self.service_id.is_none_or(|id| id == value.service_id)
    }
}

/// How full one map is.
#[derive(Clone, Debug, Serialize)]
pub struct MapFill {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

/// `lb stats`: datapath events (drops by reason and the rest), the flow caches' counts and the
/// fill of every map.
#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    pub events: BTreeMap<&'static str, u64>,
    pub flow_caches: Vec<FlowCacheCounts>,
    pub maps: Vec<MapFill>,
    pub snat_address: Option<Ipv4Addr>,
    pub snat_address6: Option<std::net::Ipv6Addr>,
}

impl PinnedMaps {
    /// Opens the maps pinned under `pin_dir`, each through a read-only descriptor: nothing
    /// done with a `PinnedMaps` can change the datapath.
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        Ok(Self(
            Maps::open(pin_dir, Access::ReadOnly)?,
            crate::datapath::MapSizes::pinned_or(pin_dir, Default::default()),
        ))
    }

    /// Every installed service with its frontends, current backends and counters.
    pub fn services(&self) -> anyhow::Result<Vec<ServiceInfo>> {
        let (installed, _) = read_installed(&self.0)?;
        let names = read_service_names(&self.0.service_names)?;
        let backends = read_backends(&self.0)?;
        let mut ranges: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for (id, (addr, prefix_len)) in read_source_ranges(&self.0)? {
            ranges
                .entry(id)
                .or_default()
                .push(format!("{addr}/{prefix_len}"));
        }
        let mut services = installed
            .into_iter()
            .map(|(id, service)| {
                let counter = read_service_counter(&self.0.service_counters, id)?;
                // Every frontend of a service carries its policy bits.
                let flags = service.frontends.values().fold(0, |all, flags| all | flags);
                Ok(ServiceInfo {
                    id,
                    name: names.get(&id).cloned().unwrap_or_default(),
                    frontends: frontends_in_address_order(&service.frontends),
                    backends: weighed(&service.backends)
                        .into_iter()
                        .map(|(backend, cells)| {
                            let address = match backends.get(&backend) {
                                Some(backend) => {
                                    SocketAddr::new(backend.addr, backend.port).to_string()
                                }
                                None => format!("missing backend {backend}"),
                            };
                            if cells > 1 {
                                format!("{address} x{cells}")
                            } else {
                                address
                            }
                        })
                        .collect(),
                    local_only: flags & service_flags::LOCAL_ONLY != 0,
                    source_ranges: ranges.remove(&id).unwrap_or_default(),
                    maglev: flags & service_flags::MAGLEV != 0,
                    direct_return: flags & service_flags::DIRECT_RETURN != 0,
                    affinity_timeout_s: service.affinity_timeout_s,
                    packets: counter.packets,
                    bytes: counter.bytes,
                    new_flows: counter.new_flows,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        // By name, not by id: ids are handed out again as Services come and go, so an order by
        // id changes from one agent (or one restart) to the next.
        services.sort_by(|a, b| (&a.name, a.id).cmp(&(&b.name, b.id)));
        Ok(services)
    }

    /// Every backend with the services whose tables hold it.
    pub fn backends(&self) -> anyhow::Result<Vec<BackendInfo>> {
        let (installed, _) = read_installed(&self.0)?;
        let names = read_service_names(&self.0.service_names)?;
        let mut users: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for (id, service) in &installed {
            let name = names
                .get(id)
                .cloned()
                .unwrap_or_else(|| format!("service {id}"));
            for backend in &service.backends {
                let services = users.entry(*backend).or_default();
                if !services.contains(&name) {
                    services.push(name.clone());
                }
            }
        }
        Ok(read_backends(&self.0)?
            .into_iter()
            .map(|(id, backend)| BackendInfo {
                id,
                address: SocketAddr::new(backend.addr, backend.port).to_string(),
                protocol: protocol_name(backend.proto),
                local: backend.flags & backend_flags::LOCAL != 0,
                terminating: backend.flags & backend_flags::TERMINATING != 0,
                dsr_node: backend.flags & backend_flags::TAKES_DIRECT_RETURN != 0,
                services: users.remove(&id).unwrap_or_default(),
            })
            .collect())
    }

    /// The timeouts the datapath applies to connection tracking: the agent's settings in the
    /// config map (zero fields, as in a map nobody wrote yet, are the defaults).
    pub fn conntrack_timeouts(&self) -> CtTimeouts {
        self.0
            .config
            .get(&0, 0)
            .map(|config| config.timeouts)
            .unwrap_or_default()
    }

    /// Conntrack entries the datapath still uses in one family's map (an entry evicted or
    /// changed while the walk runs may be counted or not).
    fn live_conntrack_entries<A: CtAddr>(
        &self,
        map: &aya::maps::HashMap<aya::maps::MapData, CtKey<A>, CtValue<A>>,
    ) -> anyhow::Result<u64>
    where
        CtKey<A>: aya::Pod,
        CtValue<A>: aya::Pod,
    {
        let timeouts = self.conntrack_timeouts();
        let now = monotonic_ns();
        Ok(crate::datapath::batch::read_map(map)?
            .iter()
            .filter(|(key, value)| {
                timeouts.is_live(key.proto, value.state, value.last_seen_ns, now)
            })
            .count() as u64)
    }

    /// The connection-tracking entries `filter` selects, IPv4 then IPv6.
    pub fn conntrack(&self, filter: &ConntrackFilter) -> anyhow::Result<Vec<ConntrackEntry>> {
        let timeouts = self.conntrack_timeouts();
        let now = monotonic_ns();
        let mut entries = Vec::new();
        let v4 = crate::datapath::batch::read_map(&self.0.conntrack)?;
        let v6 = crate::datapath::batch::read_map(&self.0.conntrack6)?;
        select_flows(&v4, filter, timeouts, now, &mut entries);
        select_flows(&v6, filter, timeouts, now, &mut entries);
        Ok(entries)
    }

    /// Events by label, summed over CPUs.
    pub fn events(&self) -> anyhow::Result<BTreeMap<&'static str, u64>> {
        Ok(read_events(&self.0.events)?)
    }

    /// What each flow cache's looks found, summed over CPUs.
    pub fn flow_caches(&self) -> anyhow::Result<Vec<FlowCacheCounts>> {
        Ok(read_flow_caches(&self.0.flow_cache_gates)?)
    }

    /// Events, the flow caches' counts, map fill and the SNAT address.
    pub fn stats(&self) -> anyhow::Result<Stats> {
        let snat = self.0.config.get(&0, 0)?.snat_addr;
        let snat6 = self.0.config6.get(&0, 0)?.snat_addr;
        Ok(Stats {
            events: self.events()?,
            flow_caches: self.flow_caches()?,
            maps: self.fill()?,
            snat_address: (snat != 0).then(|| Ipv4Addr::from(snat)),
            snat_address6: (snat6 != [0; 4]).then(|| crate::compile::model::ipv6_of_words(snat6)),
        })
    }

    /// Entries against capacity for every map that fills up; for conntrack, the live entries
    /// only (the LRU map keeps expired ones until it needs their room). Counting walks the keys
    /// (one syscall each); conntrack is read in chunks (docs/metrics.md).
    pub fn fill(&self) -> anyhow::Result<Vec<MapFill>> {
        let (installed, _) = read_installed(&self.0)?;
        let maglev_tables = installed
            .values()
            .filter(|service| service.maglev_tag.is_some())
            .count();
        let backends = read_backends(&self.0)?;
        let backends_of = |family: Family| {
            backends
                .values()
                .filter(|backend| backend.family() == family)
                .count() as u64
        };
        Ok(vec![
            fill(
                map_names::FRONTENDS4,
                self.0.frontends.keys(),
                self.1.frontends4,
            ),
            MapFill {
                map: map_names::SLOTS4,
                entries: installed
                    .values()
                    .map(|service| service.backends.len() as u64)
                    .sum(),
                capacity: u64::from(limits::MAX_SLOTS),
            },
            MapFill {
                map: map_names::BACKENDS4,
                entries: backends_of(Family::V4),
                capacity: u64::from(limits::MAX_BACKENDS),
            },
            fill(
                map_names::FRONTENDS6,
                self.0.frontends6.keys(),
                limits::MAX_FRONTENDS,
            ),
            MapFill {
                map: map_names::BACKENDS6,
                entries: backends_of(Family::V6),
                capacity: u64::from(limits::MAX_BACKENDS),
            },
            fill(
                map_names::SOURCE_RANGES6,
                self.0.source_ranges6.keys(),
                limits::MAX_SOURCE_RANGES,
            ),
            MapFill {
                map: map_names::CONNTRACK4,
                entries: self.live_conntrack_entries(&self.0.conntrack)?,
                capacity: u64::from(self.1.conntrack4),
            },
            MapFill {
                map: map_names::CONNTRACK6,
                entries: self.live_conntrack_entries(&self.0.conntrack6)?,
                capacity: u64::from(limits::MAX_CONNTRACK6),
            },
            fill(
                map_names::SOCK_NAT4,
                self.0.sock_nat.keys(),
                limits::MAX_SOCK_NAT,
            ),
            fill(
                map_names::SOCK_NAT6,
                self.0.sock_nat6.keys(),
                limits::MAX_SOCK_NAT,
            ),
            fill(
                map_names::SOURCE_RANGES4,
                self.0.source_ranges.keys(),
                limits::MAX_SOURCE_RANGES,
            ),
            fill(
                map_names::AFFINITY4,
                self.0.affinity.keys(),
                limits::MAX_AFFINITY,
            ),
            fill(
                map_names::AFFINITY6,
                self.0.affinity6.keys(),
                limits::MAX_AFFINITY6,
            ),
            MapFill {
                map: map_names::SERVICE_COUNTERS,
                entries: installed.len() as u64,
                capacity: u64::from(limits::MAX_SERVICES),
            },
            MapFill {
                map: map_names::MAGLEV4,
                entries: maglev_tables as u64,
                // One table per service id, sized per service.
                capacity: u64::from(limits::MAX_SERVICES),
            },
        ])
    }
}

fn fill<K>(
    map: &'static str,
    keys: impl Iterator<Item = Result<K, aya::maps::MapError>>,
    capacity: u32,
) -> MapFill {
    MapFill {
        map,
        entries: keys.filter(Result::is_ok).count() as u64,
        capacity: u64::from(capacity),
    }
}

/// A selection table's backends in the order of their first cell, each with its number of
/// cells (its endpoint weight, reduced).
fn weighed(cells: &[u32]) -> Vec<(u32, usize)> {
    let mut backends: Vec<(u32, usize)> = Vec::new();
    for id in cells {
        match backends.iter_mut().find(|(backend, _)| backend == id) {
            Some((_, count)) => *count += 1,
            None => backends.push((*id, 1)),
        }
    }
    backends
}

/// A service's frontends by address (as a number, not in the map's network byte order), port,
/// protocol and scope.
fn frontends_in_address_order(frontends: &BTreeMap<FrontendKey, u32>) -> Vec<String> {
    let mut sorted: Vec<(&FrontendKey, &u32)> = frontends.iter().collect();
    sorted.sort_by_key(|(key, _)| (key.addr(), key.port(), key.proto(), key.scope()));
    sorted
        .into_iter()
        .map(|(key, flags)| describe_frontend(key, *flags))
        .collect()
}

fn describe_frontend(key: &FrontendKey, flags: u32) -> String {
    let kinds: Vec<&str> = [
        (service_flags::CLUSTER_IP, "ClusterIP"),
        (service_flags::NODE_PORT, "NodePort"),
        (service_flags::EXTERNAL_IP, "externalIP"),
        (service_flags::LOAD_BALANCER, "LoadBalancer"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, kind)| kind)
    .collect();
    let for_whom = if key.scope() == lb_common::scope::NODE_CLIENTS {
        " (this node's clients)"
    } else {
        ""
    };
    format!(
        "{}/{} {}{for_whom}",
        SocketAddr::new(key.addr(), key.port()),
        protocol_name(key.proto()),
        kinds.join(",")
    )
}

/// The entries of one family's conntrack that `filter` selects, described, onto `out`.
fn select_flows<A: ShownAddr>(
    entries: &[(CtKey<A>, CtValue<A>)],
    filter: &ConntrackFilter,
    timeouts: CtTimeouts,
    now: u64,
    out: &mut Vec<ConntrackEntry>,
) {
    for (key, value) in entries {
        let key = as_client_side(key, value);
        let live = timeouts.is_live(key.proto, value.state, value.last_seen_ns, now);
        if (live || filter.include_expired) && filter.matches(&key, value) {
            out.push(describe_flow(&key, value, now, !live));
        }
    }
}

/// The key of a whole flow's entry (a FLOW entry, or a flow kept by its answers' tuple,
/// [`ct_flags::kept_by_answers`]) as its client sends, to the frontend it holds, as an ORIGINAL
/// entry's key has it; any other key as it is.
fn as_client_side<A: CtAddr>(key: &CtKey<A>, value: &CtValue<A>) -> CtKey<A> {
    let flow = FlowValue::of(value);
    match key.direction {
        ct_direction::FLOW => CtKey {
            daddr: flow.frontend_addr,
            dport: flow.frontend_port,
            ..*key
        },
        ct_direction::REPLY if ct_flags::kept_by_answers(value.flags) => CtKey {
            saddr: key.daddr,
            sport: key.dport,
            daddr: flow.frontend_addr,
            dport: flow.frontend_port,
            direction: ct_direction::FLOW,
            ..*key
        },
        _ => *key,
    }
}

fn describe_flow<A: ShownAddr>(
    key: &CtKey<A>,
    value: &CtValue<A>,
    now_ns: u64,
    expired: bool,
) -> ConntrackEntry {
    let endpoint = |addr: A, port: u16| SocketAddr::new(addr.ip(), port).to_string();
    ConntrackEntry {
        direction: match key.direction {
            ct_direction::FLOW => "flow",
            ct_direction::REPLY => "reply",
            _ => "original",
        },
        protocol: protocol_name(key.proto),
        source: endpoint(key.saddr, key.sport),
        destination: endpoint(key.daddr, key.dport),
        nat: endpoint(value.nat_addr, value.nat_port),
        snat: (value.flags & ct_flags::SNAT != 0)
            .then(|| endpoint(value.snat_addr, value.snat_port)),
        direct_return: key.direction == ct_direction::FLOW
            && value.flags & ct_flags::DIRECT_RETURN != 0,
        state: match (key.proto, value.state) {
            (proto::UDP, _) => "udp",
            (_, tcp_state::SYN_SENT) => "syn_sent",
            (_, tcp_state::ESTABLISHED) => "established",
            (_, tcp_state::CLOSING) => "closing",
            (_, tcp_state::CLIENT_CLOSED) => "client_closed",
            (_, tcp_state::BACKEND_CLOSED) => "backend_closed",
            _ => "none",
        },
        service_id: value.service_id,
        backend_id: value.backend_id,
        idle_s: now_ns.saturating_sub(value.last_seen_ns) as f64 / 1e9,
        expired,
    }
}

fn protocol_name(protocol: u8) -> &'static str {
    match protocol {
        proto::TCP => "tcp",
        proto::UDP => "udp",
        proto::SCTP => "sctp",
        _ => "other",
    }
}

/// CLOCK_MONOTONIC in ns: the clock bpf_ktime_get_ns() reads (conntrack's last_seen).
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the valid pointer it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{Ct4Key, Ct4Value, Flow4Value, ct_timeouts};
    use std::net::SocketAddrV4;

    const SECOND: u64 = 1_000_000_000;

    fn entry(protocol: u8, state: u8, last_seen_ns: u64) -> (Ct4Key, Ct4Value) {
        let key = Ct4Key {
            proto: protocol,
            ..Default::default()
        };
        let value = Ct4Value {
            last_seen_ns,
            state,
            ..Default::default()
        };
        (key, value)
    }

    #[test]
    fn an_entry_is_live_until_the_timeout_of_its_protocol_and_state_has_passed() {
        let timeouts = CtTimeouts {
            tcp_syn: 3 * SECOND,
            tcp_established: 100 * SECOND,
            tcp_closing: SECOND,
            udp: 5 * SECOND,
            snat_port_reuse: SECOND,
            tcp_half_closed: 50 * SECOND,
        };
        let now = 1_000 * SECOND;
        let rows = [
            ("udp, idle 5 s", proto::UDP, 0, 5, true),
            ("udp, idle 6 s", proto::UDP, 0, 6, false),
            ("syn, idle 3 s", proto::TCP, tcp_state::SYN_SENT, 3, true),
            ("syn, idle 4 s", proto::TCP, tcp_state::SYN_SENT, 4, false),
            (
                "established, idle 99 s",
                proto::TCP,
                tcp_state::ESTABLISHED,
                99,
                true,
            ),
            (
                "established, idle 101 s",
                proto::TCP,
                tcp_state::ESTABLISHED,
                101,
                false,
            ),
            ("closing, idle 1 s", proto::TCP, tcp_state::CLOSING, 1, true),
            (
                "closing, idle 2 s",
                proto::TCP,
                tcp_state::CLOSING,
                2,
                false,
            ),
            (
                "half-closed by the client, idle 50 s",
                proto::TCP,
                tcp_state::CLIENT_CLOSED,
                50,
                true,
            ),
            (
                "half-closed by the endpoint, idle 51 s",
                proto::TCP,
                tcp_state::BACKEND_CLOSED,
                51,
                false,
            ),
            (
                "no state yet: as syn",
                proto::TCP,
                tcp_state::NONE,
                4,
                false,
            ),
        ];
        for (name, protocol, state, idle_s, live) in rows {
            let (key, value) = entry(protocol, state, now - idle_s * SECOND);
            assert_eq!(
                timeouts.is_live(key.proto, value.state, value.last_seen_ns, now),
                live,
                "{name}"
            );
        }
        // Seen after `now` was read (another CPU refreshed it meanwhile): live.
        let (key, value) = entry(proto::UDP, 0, now + SECOND);
        assert!(timeouts.is_live(key.proto, value.state, value.last_seen_ns, now));
    }

    #[test]
    fn a_flow_entry_is_one_row_with_its_client_frontend_and_backend() {
        let client = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 40000);
        let frontend = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 1), 30080);
        let backend = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 10), 8080);
        let key = lb_common::flow_key(u32::from(*client.ip()), client.port(), proto::TCP);
        let value = Flow4Value {
            last_seen_ns: SECOND,
            backend_addr: u32::from(*backend.ip()),
            backend_port: backend.port(),
            frontend_addr: u32::from(*frontend.ip()),
            frontend_port: frontend.port(),
            state: tcp_state::ESTABLISHED,
            flags: ct_flags::CLIENT_IN_FLOW,
            ..Default::default()
        }
        .into_entry();
        let key = as_client_side(&key, &value);
        let row = describe_flow(&key, &value, 3 * SECOND, false);
        assert_eq!(row.direction, "flow");
        assert_eq!(row.source, client.to_string());
        assert_eq!(row.destination, frontend.to_string());
        assert_eq!(row.nat, backend.to_string());
        assert_eq!(row.snat, None);
        assert_eq!(row.state, "established");
        assert_eq!(row.idle_s, 2.0);
        for (address, port) in [(*frontend.ip(), frontend.port()), (*backend.ip(), 8080)] {
            let filter = ConntrackFilter {
                address: Some(address.into()),
                port: Some(port),
                ..Default::default()
            };
            assert!(filter.matches(&key, &value), "{address}:{port}");
        }
    }

    #[test]
    fn a_dsr_flow_kept_by_its_answers_tuple_is_one_row_as_its_client_sends() {
        let client = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 10), 40000);
        let frontend = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 1), 30090);
        let endpoint = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 11), 8080);
        let key = Ct4Key {
            saddr: u32::from(*endpoint.ip()),
            daddr: u32::from(*client.ip()),
            sport: endpoint.port(),
            dport: client.port(),
            proto: proto::TCP,
            direction: ct_direction::REPLY,
            _pad: [0; 2],
        };
        let value = Flow4Value {
            last_seen_ns: SECOND,
            backend_addr: u32::from(*endpoint.ip()),
            backend_port: endpoint.port(),
            frontend_addr: u32::from(*frontend.ip()),
            frontend_port: frontend.port(),
            state: tcp_state::SYN_SENT,
            flags: ct_flags::CLIENT_IN_FLOW | ct_flags::DIRECT_RETURN,
            ..Default::default()
        }
        .into_entry();
        let row = describe_flow(&as_client_side(&key, &value), &value, 2 * SECOND, false);
        assert_eq!(row.direction, "flow");
        assert_eq!(row.source, client.to_string());
        assert_eq!(row.destination, frontend.to_string());
        assert_eq!(row.nat, endpoint.to_string());
        assert!(row.direct_return);
        // A SNAT flow's REPLY entry stays a reply row, keyed as the backend sends.
        let snat = Ct4Value {
            flags: ct_flags::SNAT | ct_flags::CLIENT_IN_FLOW,
            ..value
        };
        let row = describe_flow(&as_client_side(&key, &snat), &snat, 2 * SECOND, false);
        assert_eq!(row.direction, "reply");
        assert_eq!(row.source, endpoint.to_string());
    }

    #[test]
    fn unset_timeouts_are_the_datapath_defaults() {
        // All zero: what a config map nobody wrote yet holds.
        let timeouts = CtTimeouts {
            tcp_syn: 0,
            tcp_established: 0,
            tcp_closing: 0,
            udp: 0,
            snat_port_reuse: 0,
            tcp_half_closed: 0,
        };
        assert_eq!(timeouts.for_state(proto::UDP, 0), ct_timeouts::UDP);
        assert_eq!(
            timeouts.for_state(proto::TCP, tcp_state::CLIENT_CLOSED),
            ct_timeouts::TCP_HALF_CLOSED
        );
        assert_eq!(
            timeouts.for_state(proto::TCP, tcp_state::ESTABLISHED),
            ct_timeouts::TCP_ESTABLISHED
        );
        assert_eq!(
            timeouts.for_state(proto::TCP, tcp_state::CLOSING),
            ct_timeouts::TCP_CLOSING
        );
        assert_eq!(
            timeouts.for_state(proto::TCP, tcp_state::SYN_SENT),
            ct_timeouts::TCP_SYN
        );
    }

    #[test]
    fn service_names_give_their_scope_and_family_as_labels() {
        let labels = ServiceLabels::parse("default/web:http/TCP[internal][ipv6]", 3);
        assert_eq!(
            (
                labels.namespace.as_str(),
                labels.name.as_str(),
                labels.port.as_str(),
                labels.protocol.as_str(),
                labels.scope.as_str(),
                labels.ip_family
            ),
            ("default", "web", "http", "TCP", "internal", "IPv6")
        );
        let labels = ServiceLabels::parse("default/dns:/UDP[ipv6]", 4);
        assert_eq!(
            (
                labels.port.as_str(),
                labels.scope.as_str(),
                labels.ip_family
            ),
            ("", "all", "IPv6")
        );
        let labels = ServiceLabels::parse("kube-system/dns:dns/UDP", 5);
        assert_eq!((labels.scope.as_str(), labels.ip_family), ("all", "IPv4"));
    }

    /// What a write through one of the inspection's descriptors gets.
    fn refused<T: std::fmt::Debug>(what: &str, result: Result<T, aya::maps::MapError>) {
        match result {
            Err(aya::maps::MapError::SyscallError(error))
                if error.io_error.raw_os_error() == Some(libc::EPERM) => {}
            other => panic!("{what}: {other:?}, not EPERM"),
        }
    }

    #[test]
    fn inspection_opens_every_map_read_only_and_the_kernel_refuses_its_writes() {
        crate::datapath::bpffs::with_private_bpffs(|bpffs| {
            let pin_dir = bpffs.join("lb");
            let mut datapath = crate::datapath::Datapath::load(&pin_dir).expect("datapath");
            let backend = crate::compile::model::Backend {
                addr: Ipv4Addr::new(10, 244, 1, 10).into(),
                port: 8080,
                proto: proto::TCP,
                flags: 0,
            };
            datapath.put_backend(7, &backend).expect("the agent writes");

            let mut maps = PinnedMaps::open(&pin_dir).expect("open read-only");
            // Reading works as before.
            let backends = maps.backends().expect("backends");
            assert_eq!(backends.len(), 1);
            assert_eq!(backends[0].address, "10.244.1.10:8080");
            maps.services().expect("services");
            maps.stats().expect("stats");
            maps.conntrack(&ConntrackFilter::default())
                .expect("conntrack");

            // Writing does not, whatever the map type.
            let value = maps.0.backends.get(&7, 0).expect("backend 7");
            refused("add a backend", maps.0.backends.set(8, &value, 0));
            refused(
                "vacate a backend",
                maps.0.backends.set(7, &value.vacated(), 0),
            );
            refused(
                "add an IPv6 backend",
                maps.0.backends6.set(9, &lb_common::Backend6::default(), 0),
            );
            let frontend = lb_common::Frontend4Key {
                addr: u32::from(Ipv4Addr::new(10, 96, 0, 1)).to_be(),
                port: 80u16.to_be(),
                proto: proto::TCP,
                scope: 0,
            };
            refused(
                "add a frontend",
                maps.0
                    .frontends
                    .insert(&frontend, &lb_common::ServiceValue::default(), 0),
            );
            refused(
                "rename a service",
                maps.0
                    .service_names
                    .insert(&0, &[b'x'; lb_common::SERVICE_NAME_LEN], 0),
            );
            let config = maps.0.config.get(&0, 0).expect("config");
            refused("change the config", maps.0.config.set(0, &config, 0));
            let zero = maps.0.events.get(&0, 0).expect("events");
            refused("reset an event counter", maps.0.events.set(0, zero, 0));
            refused(
                "allow a source range",
                maps.0.source_ranges.insert(
                    &aya::maps::lpm_trie::Key::new(
                        64,
                        lb_common::SourceRange4 {
                            service_id_be: 0,
                            addr: 0,
                        },
                    ),
                    &1,
                    0,
                ),
            );
            let slot = maps.0.slots.get(&0, 0).expect("slot 0");
            refused("change a selection table", maps.0.slots.set(0, &slot, 0));
            refused(
                "clear the conntrack",
                maps.0.conntrack.remove(&Ct4Key::default()),
            );
            assert_eq!(
                maps.backends().expect("backends").len(),
                1,
                "nothing changed"
            );
        });
    }
}
