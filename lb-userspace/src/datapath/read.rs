//! Reading the maps: what they hold (services, backends, conntrack, counters, events), for the
//! agent, which reads them once at load and then keeps its own copy in step, and, through the
//! same functions, for the read-only inspection.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use lb_common::{
    Affinity4Key, AffinityValue, Ct4Key, Ct4Value, DatapathConfig, Event, FlowCacheGate,
    ServiceCounter, ServiceValue, flow_cache, map_names, service_flags,
};

use super::{
    Datapath, FrontendOwners, InstalledService, ServiceName,
    error::{Result, map_error},
    maps::Maps,
};
use crate::compile::model::{Backend, FrontendKey, ipv6_of_words};

impl Datapath {
    /// The services the maps hold, by service id.
    pub fn installed_services(&self) -> &BTreeMap<u32, InstalledService> {
        &self.installed
    }

    /// The backends the maps hold, by id.
    pub fn installed_backends(&self) -> &BTreeMap<u32, Backend> {
        &self.installed_backends
    }

    /// The programs' clock as calibrated at load; None when they read the coarse-clock helper.
    pub fn clock(&self) -> Option<lb_common::JiffiesClock> {
        self.clock
    }

    /// The datapath-wide settings in force.
    pub fn config(&self) -> Result<DatapathConfig> {
        self.maps
            .config
            .get(&0, 0)
            .map_err(|source| map_error(map_names::CONFIG, "read", source))
    }

    /// The IPv6 settings in force.
    pub fn config6(&self) -> Result<lb_common::Datapath6Config> {
        self.maps
            .config6
            .get(&0, 0)
            .map_err(|source| map_error(map_names::CONFIG6, "read", source))
    }

    /// Affinity entries of a service: (client, backend id), for tests and inspection.
    pub fn affinity(&self, service_id: u32) -> Vec<(Affinity4Key, AffinityValue)> {
        self.maps
            .affinity
            .iter()
            .filter_map(Result::ok)
            .filter(|(key, _)| key.service_id == service_id)
            .collect()
    }

    /// Every frontend (both families) with its service entry.
    pub fn frontends(&self) -> Result<Vec<(FrontendKey, ServiceValue)>> {
        read_frontends(&self.maps)
    }

    /// Every backend (both families) by id.
    pub fn backends(&self) -> Result<BTreeMap<u32, Backend>> {
        read_backends(&self.maps)
    }

    /// Every connection-tracking entry.
    pub fn conntrack(&self) -> Result<Vec<(Ct4Key, Ct4Value)>> {
        super::batch::read_map(&self.maps.conntrack)
            .map_err(|source| map_error(map_names::CONNTRACK4, "iterate", source))
    }

    /// The IPv6 conntrack entry under `key`, if any.
    pub fn conntrack6_entry(&self, key: &lb_common::Ct6Key) -> Option<lb_common::Ct6Value> {
        self.maps.conntrack6.get(key, 0).ok()
    }

    /// Every IPv6 conntrack entry.
    pub fn conntrack6(&self) -> Result<Vec<(lb_common::Ct6Key, lb_common::Ct6Value)>> {
        super::batch::read_map(&self.maps.conntrack6)
            .map_err(|source| map_error(map_names::CONNTRACK6, "iterate", source))
    }

    /// A service's counters summed over CPUs.
    pub fn service_counter(&self, id: u32) -> Result<ServiceCounter> {
        read_service_counter(&self.maps.service_counters, id)
    }

    /// How often each event (drop reason) happened, summed over CPUs.
    pub fn events(&self) -> Result<BTreeMap<&'static str, u64>> {
        read_events(&self.maps.events)
    }

    /// What each flow cache's looks found, summed over CPUs.
    pub fn flow_caches(&self) -> Result<Vec<FlowCacheCounts>> {
        read_flow_caches(&self.maps.flow_cache_gates)
    }
}

/// What one flow cache's looks found, summed over CPUs (`lb_common::FlowCacheGate`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FlowCacheCounts {
    /// `xdp`, the flow cache, or `tc`, the answer cache.
    pub hook: &'static str,
    pub ip_family: &'static str,
    /// `TCP` or `UDP`: each cache has a gate, and counts, per protocol.
    pub protocol: &'static str,
    pub hits: u64,
    pub misses: u64,
    /// Times the cache's gate closed on a CPU: it missed more than it hit there, and stood
    /// aside for the next `flow_cache::GATE_CLOSED_FOR` packets that would have looked.
    pub closings: u64,
}

/// Every flow cache's counts, in `flow_cache::gate::ALL`'s order.
pub(crate) fn read_flow_caches(
    map: &PerCpuArray<MapData, FlowCacheGate>,
) -> Result<Vec<FlowCacheCounts>> {
    flow_cache::gate::ALL
        .iter()
        .map(|&(index, hook, ip_family, protocol)| {
            let per_cpu = map
                .get(&index, 0)
                .map_err(|source| map_error(map_names::FLOW_CACHE_GATES, "read", source))?;
            Ok(FlowCacheCounts {
                hook,
                ip_family,
                protocol,
                hits: per_cpu.iter().map(|gate| gate.hits_total).sum(),
                misses: per_cpu.iter().map(|gate| gate.misses_total).sum(),
                closings: per_cpu.iter().map(|gate| gate.closings_total).sum(),
            })
        })
        .collect()
}

/// The services the maps hold (from the frontends and the slot tables in force) and the owner
/// of each frontend.
pub(crate) type InstalledState = (BTreeMap<u32, InstalledService>, FrontendOwners);

/// Every frontend of both families' frontends maps, with its service entry.
pub(crate) fn read_frontends(maps: &Maps) -> Result<Vec<(FrontendKey, ServiceValue)>> {
    let v4 = maps.frontends.iter().map(|entry| {
        entry
            .map(|(key, value)| (FrontendKey::V4(key), value))
            .map_err(|source| map_error(map_names::FRONTENDS4, "iterate", source))
    });
    let v6 = maps.frontends6.iter().map(|entry| {
        entry
            .map(|(key, value)| (FrontendKey::V6(key), value))
            .map_err(|source| map_error(map_names::FRONTENDS6, "iterate", source))
    });
    v4.chain(v6).collect()
}

pub(crate) fn read_installed(maps: &Maps) -> Result<InstalledState> {
    let slots = &maps.slots;
    let mut installed: BTreeMap<u32, InstalledService> = BTreeMap::new();
    let mut owners = FrontendOwners::default();
    let mut counts = BTreeMap::new();
    for (key, value) in read_frontends(maps)? {
        let service = installed.entry(value.service_id).or_default();
        service.slots = value.slots;
        service.affinity_timeout_s = value.affinity_timeout_s;
        service.frontends.insert(key, value.flags);
        if value.flags & service_flags::MAGLEV != 0 {
            service.maglev_tag = Some(value.maglev_table);
        }
        owners.insert(key, value.service_id);
        counts.insert(value.service_id, value.backend_count);
    }
    for (id, service) in &mut installed {
        let count = counts.get(id).copied().unwrap_or(0);
        if service.slots == 0 {
            continue;
        }
        let mut backends = Vec::with_capacity(count.into());
        for index in (service.slots..).take(count.into()) {
            let cell = slots
                .get(&index, 0)
                .map_err(|source| map_error(map_names::SLOTS4, "read", source))?;
            if cell.service_id != *id {
                break;
            }
            backends.push(cell.backend_id);
        }
        // A table cut short reads as none, so that the next sync writes it whole.
        if backends.len() == usize::from(count) {
            service.backends = backends;
        } else {
            service.slots = 0;
        }
    }
    Ok((installed, owners))
}

pub(crate) fn read_service_names(
    map: &HashMap<MapData, u32, ServiceName>,
) -> Result<BTreeMap<u32, String>> {
    map.iter()
        .map(|entry| entry.map(|(id, value)| (id, service_name(&value))))
        .collect::<std::result::Result<_, _>>()
        .map_err(|source| map_error(map_names::SERVICE_NAMES, "iterate", source))
}

/// The text of a stored service name (NUL padding removed).
fn service_name(value: &ServiceName) -> String {
    let len = value
        .iter()
        .position(|&byte| byte == 0)
        .unwrap_or(value.len());
    String::from_utf8_lossy(&value[..len]).into_owned()
}

/// Every loadBalancerSourceRange of both families' tries, as (service id, (address, prefix
/// length)).
pub(crate) fn read_source_ranges(maps: &Maps) -> Result<Vec<(u32, (IpAddr, u8))>> {
    let mut ranges = Vec::new();
    for key in maps.source_ranges.keys() {
        let key = key.map_err(|source| map_error(map_names::SOURCE_RANGES4, "iterate", source))?;
        let data = key.data();
        let addr = Ipv4Addr::from(u32::from_be(data.addr)).into();
        ranges.push((
            u32::from_be(data.service_id_be),
            (addr, (key.prefix_len() - 32) as u8),
        ));
    }
    for key in maps.source_ranges6.keys() {
        let key = key.map_err(|source| map_error(map_names::SOURCE_RANGES6, "iterate", source))?;
        let data = key.data();
        let addr = ipv6_of_words(data.addr).into();
        ranges.push((
            u32::from_be(data.service_id_be),
            (addr, (key.prefix_len() - 32) as u8),
        ));
    }
    Ok(ranges)
}

/// Every backend of both families by id. The agent's datapath and the read-only inspection
/// share these readers.
pub(crate) fn read_backends(maps: &Maps) -> Result<BTreeMap<u32, Backend>> {
    let v4 = read_backend_array(&maps.backends, map_names::BACKENDS4, Backend::from_value)?;
    let v6 = read_backend_array(&maps.backends6, map_names::BACKENDS6, Backend::from_value6)?;
    Ok(v4.into_iter().chain(v6).collect())
}

/// The backends of one family: the cells of its array in use, read in batches (the array has
/// a cell for every possible id).
fn read_backend_array<A: Copy>(
    map: &Array<MapData, lb_common::BackendValue<A>>,
    name: &'static str,
    backend: fn(&lb_common::BackendValue<A>) -> Backend,
) -> Result<Vec<(u32, Backend)>>
where
    lb_common::BackendValue<A>: aya::Pod,
{
    let cells = super::batch::read_map(map).map_err(|source| map_error(name, "iterate", source))?;
    Ok(cells
        .into_iter()
        .filter(|(_, cell)| cell.in_use())
        .map(|(id, cell)| (id, backend(&cell)))
        .collect())
}

/// A service's counters summed over CPUs.
pub(crate) fn read_service_counter(
    map: &PerCpuArray<MapData, ServiceCounter>,
    id: u32,
) -> Result<ServiceCounter> {
    let per_cpu = map
        .get(&id, 0)
        .map_err(|source| map_error(map_names::SERVICE_COUNTERS, "read", source))?;
    Ok(per_cpu
        .iter()
        .fold(ServiceCounter::default(), |sum, cpu| ServiceCounter {
            packets: sum.packets + cpu.packets,
            bytes: sum.bytes + cpu.bytes,
            new_flows: sum.new_flows + cpu.new_flows,
        }))
}

/// How often each event happened, summed over CPUs, by label.
pub(crate) fn read_events(map: &PerCpuArray<MapData, u64>) -> Result<BTreeMap<&'static str, u64>> {
    Event::ALL
        .iter()
        .map(|&(event, label)| {
            let per_cpu = map
                .get(&event.0, 0)
                .map_err(|source| map_error(map_names::EVENTS, "read", source))?;
            Ok((label, per_cpu.iter().sum()))
        })
        .collect()
}
