//! Writing the maps: services and backends put and removed so that no packet sees a half-written
//! state, with the frontend filter, slot tables, Maglev tables, source ranges and names kept in
//! step; the node's settings; the UDP sockets of departed backends aborted.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::AsFd as _,
};

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuValues, lpm_trie::Key as LpmKey};

/// BPF_F_INNER_MAP (include/uapi/linux/bpf.h): an inner map of a map of maps whose size may
/// differ from the template's, as every Maglev table's does (kernel >= 5.10).
pub(super) const BPF_F_INNER_MAP: u32 = 1 << 12;

/// Staged Maglev tables swapped in at most together: each holds a descriptor until its swap
/// (a soft RLIMIT_NOFILE of 1024 is common).
pub const MAGLEV_SWAP_BATCH: usize = 256;
use lb_common::{
    DatapathConfig, NicMac, SERVICE_NAME_LEN, ServiceCounter, ServiceValue, Slot, SourceRange,
    limits, maglev, map_names, scope, service_flags,
};

use super::{
    Datapath, DepartedBackend, InstalledService,
    address_filter::FilterKey,
    error::{DatapathError, Result, map_error},
    frontend_flags,
};
use crate::compile::model::{
    Backend, BackendValue, Family, FrontendKey, IpCidr, Service, ipv6_of_words, ipv6_words,
};

/// Vacates a backend's cell ([`lb_common::BackendValue::vacated`]): its address and port stay,
/// so that a program reading the cell meanwhile sees the backend or nothing. An id past the
/// array has no cell: nothing to remove (as a hash map's missing key).
fn vacate_backend_cell<A: Copy>(
    cells: &mut Array<MapData, lb_common::BackendValue<A>>,
    id: u32,
) -> std::result::Result<(), MapError>
where
    lb_common::BackendValue<A>: aya::Pod,
{
    if id >= limits::MAX_BACKENDS {
        return Ok(());
    }
    let cell = cells.get(&id, 0)?;
    if cell.in_use() {
        cells.set(id, &cell.vacated(), 0)?;
    }
    Ok(())
}

/// Writes a backend into its cell so that a program reading the cell meanwhile sees the old
/// backend, a vacant cell or the new backend, never a mix of two addresses: an array update is
/// a copy in place (not an atomic replacement as in a hash map), and an IPv6 cell is wider
/// than any single store. A backend whose address and port the cell holds already (its flags
/// changed) is one write; any other goes through a vacant cell, first with the old address,
/// then with the new one, and is set in use last.
fn write_backend_cell<A: Copy + PartialEq>(
    cells: &mut Array<MapData, lb_common::BackendValue<A>>,
    id: u32,
    backend: lb_common::BackendValue<A>,
) -> std::result::Result<(), MapError>
where
    lb_common::BackendValue<A>: aya::Pod,
{
    let cell = cells.get(&id, 0)?;
    let same_endpoint = cell.addr == backend.addr && cell.port == backend.port;
    if !same_endpoint {
        if cell.in_use() {
            cells.set(id, &cell.vacated(), 0)?;
        }
        cells.set(id, &backend.vacated(), 0)?;
    }
    cells.set(id, &backend, 0)
}

impl Datapath {
    /// Adds or replaces a backend. Put backends before the services that reference them.
    pub fn put_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        let operation = || format!("put backend {id} = {backend:?}");
        if id >= limits::MAX_BACKENDS {
            return Err(DatapathError::Invalid(format!(
                "backend id {id} out of range (max {})",
                limits::MAX_BACKENDS - 1
            )));
        }
        if backend.proto == 0 {
            // A cell of protocol 0 is a vacant one (BackendValue::in_use).
            return Err(DatapathError::Invalid(format!(
                "backend {id} without a protocol"
            )));
        }
        // Its bit before the entry, so that tc never skips a reply of it. Bits are never
        // cleared while the agent runs: a flow keeps its backend after the backend leaves the
        // maps, and its replies must still be translated.
        self.backend_filter
            .mark(FilterKey::of_backend(backend).into_iter())?;
        // An id moves between families only when the agent hands a freed id out again: the
        // other family's map must not keep it.
        if let Some(before) = self.installed_backends.get(&id)
            && before.family() != backend.family()
        {
            self.remove_backend(id)?;
        }
        match backend.value() {
            BackendValue::V4(value) => self
                .maps
                .backends
                .set(id, &value, 0)
                .map_err(|source| map_error(map_names::BACKENDS4, &operation(), source))?,
            BackendValue::V6(value) => write_backend_cell(&mut self.maps.backends6, id, value)
                .map_err(|source| map_error(map_names::BACKENDS6, &operation(), source))?,
        }
        self.installed_backends.insert(id, *backend);
        Ok(())
    }

    /// Removes a backend. Flows pinned to it select again at their next packet; the caller removes
    /// it from every service first.
    pub fn remove_backend(&mut self, id: u32) -> Result<()> {
        let operation = || format!("remove backend {id}");
        // A backend the agent does not know (maps of an earlier run) may be in either map.
        let family = self.installed_backends.get(&id).map(Backend::family);
        if family != Some(Family::V6) {
            vacate_backend_cell(&mut self.maps.backends, id)
                .map_err(|source| map_error(map_names::BACKENDS4, &operation(), source))?;
        }
        if family != Some(Family::V4) {
            vacate_backend_cell(&mut self.maps.backends6, id)
                .map_err(|source| map_error(map_names::BACKENDS6, &operation(), source))?;
        }
        self.installed_backends.remove(&id);
        Ok(())
    }

    /// Writes one frontend's entry into its family's frontends map, and its copy in the
    /// family's frontend index (entries of scope ANY, which XDP reads) with the entry's
    /// selection table (`table`, the backend ids of its cells). Once the map holds the entry, a
    /// failure of the index's write is a cleanup failure, not the call's: XDP then reads the
    /// frontend from the map, or the next refill places it.
    fn insert_frontend(
        &mut self,
        key: &FrontendKey,
        value: &ServiceValue,
        table: &[u32],
    ) -> Result<()> {
        let operation = || format!("service {} frontend {key:?}", value.service_id);
        let indexed = match key {
            FrontendKey::V4(key) => write_frontend(
                (&mut self.maps.frontends, map_names::FRONTENDS4),
                self.frontends4_capacity,
                (&mut self.frontend_index4, map_names::FRONTEND_INDEX4),
                key,
                (value, table),
                operation,
            )?,
            FrontendKey::V6(key) => write_frontend(
                (&mut self.maps.frontends6, map_names::FRONTENDS6),
                limits::MAX_FRONTENDS,
                (&mut self.frontend_index6, map_names::FRONTEND_INDEX6),
                key,
                (value, table),
                operation,
            )?,
        };
        if let Err(error) = indexed {
            self.cleanup_failed(error);
        }
        Ok(())
    }

    /// Removes one frontend's entry from its family's frontends map (gone already is fine), and
    /// from the family's frontend index.
    fn remove_frontend(&mut self, key: &FrontendKey, operation: impl Fn() -> String) -> Result<()> {
        match key {
            FrontendKey::V4(key) => remove_frontend_entry(
                (&mut self.maps.frontends, map_names::FRONTENDS4),
                (&mut self.frontend_index4, map_names::FRONTEND_INDEX4),
                key,
                operation,
            ),
            FrontendKey::V6(key) => remove_frontend_entry(
                (&mut self.maps.frontends6, map_names::FRONTENDS6),
                (&mut self.frontend_index6, map_names::FRONTEND_INDEX6),
                key,
                operation,
            ),
        }
    }

    /// Whether the frontend indexes have work for [`Datapath::refill_frontend_index`]: slots to
    /// free after a grace period (until then, XDP finds the frontends whose entries changed in
    /// the frontends maps), or buckets whose `overflow` may go.
    pub fn frontend_index_needs_refill(&self) -> bool {
        self.frontend_index4.needs_refill() || self.frontend_index6.needs_refill()
    }

    /// How many frontends the indexes serve, and how many they lack (found by XDP in the
    /// frontends maps), IPv4 and IPv6 together.
    pub fn frontend_index_counts(&self) -> (usize, usize) {
        let (placed4, missing4) = self.frontend_index4.counts();
        let (placed6, missing6) = self.frontend_index6.counts();
        (placed4 + placed6, missing4 + missing6)
    }

    /// Waits for a grace period, then frees the frontend-index slots retired before it, copies
    /// every frontend the indexes lack into a free slot of its bucket, and clears the
    /// `overflow` of buckets that lacked nothing before it. The wait is the kernel's
    /// (synchronize_rcu, a few milliseconds): the agent calls this between syncs, again while
    /// [`Datapath::frontend_index_needs_refill`] (a frontend put back leaves its bucket's
    /// `overflow` for the next one).
    pub fn refill_frontend_index(&mut self) -> Result<()> {
        if !self.frontend_index_needs_refill() {
            return Ok(());
        }
        let (outer, inner) = &mut self.grace;
        outer
            .set(0, inner, 0)
            .map_err(|source| map_error(map_names::GRACE, "wait for a grace period", source))?;
        let installed = &self.installed;
        let with_table = |value: ServiceValue| (value, table_of(installed, &value).to_vec());
        let frontends = &self.maps.frontends;
        let refilled4 = self
            .frontend_index4
            .refill(|key| Ok(lookup_entry(frontends, key)?.map(with_table)))
            .map_err(|e| map_error(map_names::FRONTEND_INDEX4, "refill", e));
        let frontends6 = &self.maps.frontends6;
        let refilled6 = self
            .frontend_index6
            .refill(|key| Ok(lookup_entry(frontends6, key)?.map(with_table)))
            .map_err(|e| map_error(map_names::FRONTEND_INDEX6, "refill", e));
        refilled4.and(refilled6)
    }

    /// Releases a frontend's bit in the frontend filter (IPv4 frontends have one).
    fn release_frontend_bit(&mut self, key: &FrontendKey) -> Result<()> {
        match FilterKey::of_frontend(key) {
            Some(filter_key) => self.frontend_filter.release(filter_key),
            None => Ok(()),
        }
    }

    /// Installs or updates a service so that no packet ever sees a half-written state: the new
    /// selection table is written into free cells of the slot array, then every frontend is
    /// flipped to it in one update each, then the old table's cells are freed. Frontends of the
    /// service that are not in `service.frontends` any more are removed last.
    pub fn put_service(&mut self, service: &Service) -> Result<()> {
        for frontend in &service.frontends {
            for &group in super::XdpGroup::of(frontend.addr, frontend.proto) {
                self.ensure_xdp_group(group)?;
            }
        }
        if service.flags & service_flags::SOURCE_RANGES != 0 {
            self.attach_source_check()?;
        }
        let prepared = self.maglev_prepared.remove(&service.id);
        let previous = self.installed.get(&service.id).cloned();
        let result = self.put_service_with(service, prepared);
        // A table swapped in for this put: its frontends ask for the previous one again.
        if result.is_err()
            && (prepared.is_some() || service.flags & service_flags::MAGLEV != 0)
            && let Err(cleanup) = self.restore_maglev_table(service.id, previous.as_ref())
        {
            self.cleanup_failed(cleanup);
        }
        self.track_source_check(service.id);
        let admissions = self.direct_return.update_service(
            service.id,
            self.installed.get(&service.id),
            &self.installed_backends,
        );
        match (result, admissions) {
            (Ok(()), admissions) => admissions,
            (Err(error), Ok(())) => Err(error),
            (Err(error), Err(cleanup)) => {
                self.cleanup_failed(cleanup);
                Err(error)
            }
        }
    }

    /// Makes the addresses a DSR option naming a NodePort may name (`lb4_nodes_v1`) the
    /// cluster's Node addresses, `addresses` (the IPv4 ones: DSR is IPv4 only).
    pub fn set_node_addresses(&mut self, addresses: &BTreeSet<IpAddr>) -> Result<()> {
        self.direct_return.set_node_addresses(addresses)
    }

    /// The Node addresses DSR options are checked against.
    pub fn dsr_node_addresses(&self) -> Vec<Ipv4Addr> {
        self.direct_return.node_addresses().collect()
    }

    /// How many (frontend, local endpoint) pairs a DSR option may name on this node.
    pub fn dsr_admission_count(&self) -> usize {
        self.direct_return.admission_count()
    }

    /// Records whether service `id`, as installed now (after a put, whether it took or not, or
    /// a removal), needs the source-range check, and detaches the check when no service needs
    /// it any more (a failure to is logged: the check then only costs time).
    fn track_source_check(&mut self, id: u32) {
        if self
            .installed
            .get(&id)
            .is_some_and(super::needs_source_check)
        {
            self.ranged_services.insert(id);
        } else {
            self.ranged_services.remove(&id);
        }
        if self.ranged_services.is_empty()
            && self.source_check_attached
            && let Err(error) = self.detach_source_check()
        {
            self.cleanup_failed(error);
        }
    }

    fn put_service_with(&mut self, service: &Service, prepared: Option<(u32, u32)>) -> Result<()> {
        self.validate(service)?;
        let flags_by_key = frontend_flags(service);
        self.check_room(service, &flags_by_key)?;
        let previous = self.installed.get(&service.id).cloned();
        if previous.is_none() {
            // An id new to the maps (a new Service, or one freed and handed out again) counts
            // from zero: its slot is cleared before any frontend points at it.
            self.reset_service_counter(service.id)?;
        }
        let backend_count = service.backends.len() as u16;

        // Ranges first: a frontend that starts checking them must find them.
        let old_ranges = previous
            .as_ref()
            .map(|installed| installed.source_ranges.clone())
            .unwrap_or_default();
        self.write_source_ranges(service.id, service.source_ranges.difference(&old_ranges))?;

        // Before the entries: XDP looks a frontend up only once its bit is set (a bit set for
        // an update that then fails only costs lookups until the next load).
        self.frontend_filter
            .mark(flags_by_key.keys().filter_map(FilterKey::of_frontend))?;

        // All or nothing: on a failure, what this call wrote is undone before it returns.
        let slots = self.write_slots(service.id, &service.backends)?;
        // The Maglev table goes in before the frontends ask for it: prepared and swapped in
        // already (the reconciler's order), or built and swapped in now.
        let maglev = match prepared {
            Some(table) => Some(table),
            None => match self.write_maglev_table(service) {
                Ok(table) => table,
                Err(error) => {
                    self.slot_ranges.release(slots, backend_count.into());
                    return Err(error);
                }
            },
        };
        let value = |flags: u32| ServiceValue {
            service_id: service.id,
            backend_count,
            legacy_revision: 0,
            flags,
            affinity_timeout_s: service.affinity_timeout_s,
            maglev_table: maglev.map_or(0, |(_, tag)| tag),
            slots,
        };
        let mut written = Vec::new();
        for (key, flags) in &flags_by_key {
            let result = self.insert_frontend(key, &value(*flags), &service.backends);
            if let Err(error) = result {
                // A frontend whose undo failed still names the new cells (and its index slot
                // carries their table): they stay taken until the agent restarts.
                if self.undo_frontends(&written) {
                    self.slot_ranges.release(slots, backend_count.into());
                }
                return Err(error);
            }
            written.push(*key);
        }

        // A frontend can move here from another service (e.g. a traffic policy split a Service
        // port into two tables): its entry was flipped in one update above; the other service
        // just no longer has it.
        for key in flags_by_key.keys() {
            match self.owners.insert(*key, service.id) {
                None => {
                    if let Some(filter_key) = FilterKey::of_frontend(key) {
                        self.frontend_filter.count(filter_key);
                    }
                    if key.proto() == lb_common::proto::UDP {
                        self.new_udp_frontends
                            .insert(SocketAddr::new(key.addr(), key.port()));
                    }
                }
                Some(owner) if owner != service.id => {
                    if let Some(other) = self.installed.get_mut(&owner) {
                        other.frontends.remove(key);
                    }
                }
                Some(_) => {}
            }
        }
        self.installed.insert(
            service.id,
            InstalledService {
                slots,
                backends: service.backends.clone(),
                frontends: flags_by_key.clone(),
                affinity_timeout_s: service.affinity_timeout_s,
                source_ranges: service.source_ranges.clone(),
                maglev_tag: maglev.map(|(_, tag)| tag),
                maglev_size: maglev.map(|(size, _)| size),
            },
        );
        self.remove_source_ranges(service.id, old_ranges.difference(&service.source_ranges))?;
        if let Some(previous) = &previous {
            let left: BTreeSet<u32> = previous
                .backends
                .iter()
                .filter(|id| !service.backends.contains(id))
                .copied()
                .collect();
            self.record_departed_udp(service.id, &left);
            if !left.is_empty() && previous.affinity_timeout_s != 0 {
                self.release_affinity(service.id, &left);
            }
        }
        if let Some(previous) = previous {
            for key in previous
                .frontends
                .keys()
                .filter(|key| !flags_by_key.contains_key(key))
            {
                self.remove_frontend(key, || format!("stale frontend {key:?}"))?;
                if self.owners.remove(key).is_some() {
                    self.release_frontend_bit(key)?;
                }
            }
            // A packet that read the old entry may still be selecting from these cells: once
            // another service's table is in them, it finds that service's id and selects
            // nothing, never that service's backend.
            self.slot_ranges
                .release(previous.slots, previous.backends.len() as u32);
            // No frontend asks for the Maglev table any more.
            if previous.maglev_tag.is_some() && maglev.is_none() {
                self.remove_maglev_table(service.id)?;
            }
        }
        Ok(())
    }

    /// Tells XDP the MAC of the NIC with this ifindex, so that frames it sees for other hosts
    /// (promiscuous mode) are left alone. Two NICs whose ifindexes share a slot
    /// (ifindex % NIC_SLOTS) leave the first unchecked.
    pub fn record_nic_mac(&mut self, ifindex: u32, mac: [u8; 6]) -> Result<()> {
        let slot = ifindex % limits::NIC_SLOTS;
        let holder = *self.nic_slots.entry(slot).or_insert(ifindex);
        // Two NICs in one slot: neither is checked, and an answer whose client's NIC is named
        // by that slot goes back out of the NIC it arrives on when the client's frames came to
        // that NIC's MAC, to the stack otherwise, never by XDP to the wrong one of the two.
        let nic = if holder == ifindex {
            NicMac {
                ifindex,
                mac,
                _pad: [0; 2],
            }
        } else {
            self.nic_slots.insert(slot, 0);
            NicMac::default()
        };
        self.nic_macs
            .set(slot, &nic, 0)
            .map_err(|source| map_error(map_names::NIC_MACS, "write", source))?;
        // Only once written: a failed write is tried again at the next check.
        self.nic_macs_recorded.insert(ifindex, mac);
        Ok(())
    }

    /// Records the MAC of `iface` (a NIC of the calling thread's network namespace) again when
    /// it is no longer the one recorded (a bond that fails over with its MAC, an address set
    /// after the agent started): XDP checks each frame's destination against it
    /// ([`Self::record_nic_mac`]), and would take every frame to the new MAC for another host's
    /// and leave it to the stack. The old and the new MAC when it changed.
    pub fn refresh_nic_mac(&mut self, iface: &str) -> Result<Option<([u8; 6], [u8; 6])>> {
        let (ifindex, mac) = super::nic::nic_address(iface)?;
        match self.nic_macs_recorded.get(&ifindex) {
            Some(&recorded) if recorded != mac => {
                self.record_nic_mac(ifindex, mac)?;
                Ok(Some((recorded, mac)))
            }
            _ => Ok(None),
        }
    }

    /// Whether XDP may send frames out of the NIC with this ifindex with XDP_REDIRECT (attaching
    /// XDP to a NIC allows it); frames it may not send there go to the stack, which forwards
    /// them. Benchmarks compare the two. The kernel resolves the ifindex in the network
    /// namespace of the calling thread (kernel/bpf/devmap.c, `__dev_map_alloc_node`): call it
    /// from the NIC's, as `attach_xdp` is.
    pub fn allow_redirect_to(&mut self, ifindex: u32, allowed: bool) -> Result<()> {
        let operation = || {
            format!(
                "{} ifindex {ifindex}",
                if allowed { "add" } else { "remove" }
            )
        };
        if !allowed {
            return match self.tx_ports.remove(ifindex) {
                Ok(()) => Ok(()),
                Err(MapError::SyscallError(syscall))
                    if syscall.io_error.raw_os_error() == Some(libc::ENOENT) =>
                {
                    Ok(())
                }
                Err(source) => Err(map_error(map_names::TX_PORTS, &operation(), source)),
            };
        }
        match self.tx_ports.insert(ifindex, ifindex, None, 0) {
            Ok(()) => Ok(()),
            Err(aya::maps::xdp::XdpMapError::MapError(source)) => {
                Err(map_error(map_names::TX_PORTS, &operation(), source))
            }
            // Only a chained program can be unsupported, and none is given.
            Err(aya::maps::xdp::XdpMapError::ChainedProgramNotSupported) => Ok(()),
        }
    }

    /// Writes the datapath-wide settings (SNAT address and ports).
    pub fn set_config(&mut self, config: &DatapathConfig) -> Result<()> {
        self.maps
            .config
            .set(0, config, 0)
            .map_err(|source| map_error(map_names::CONFIG, "write", source))
    }

    /// Writes the IPv6 settings (SNAT address).
    pub fn set_config6(&mut self, config: &lb_common::Datapath6Config) -> Result<()> {
        self.maps
            .config6
            .set(0, config, 0)
            .map_err(|source| map_error(map_names::CONFIG6, "write", source))
    }

    fn write_source_ranges<'r>(
        &mut self,
        service_id: u32,
        ranges: impl Iterator<Item = &'r (IpAddr, u8)>,
    ) -> Result<()> {
        for range in ranges {
            let (name, result) = match source_range_key(service_id, range) {
                SourceRangeKey::V4(key) => (
                    map_names::SOURCE_RANGES4,
                    self.maps.source_ranges.insert(&key, &1, 0),
                ),
                SourceRangeKey::V6(key) => (
                    map_names::SOURCE_RANGES6,
                    self.maps.source_ranges6.insert(&key, &1, 0),
                ),
            };
            result.map_err(|source| {
                if is_full(&source) {
                    DatapathError::MapFull {
                        map: name,
                        capacity: limits::MAX_SOURCE_RANGES,
                        operation: format!("service {service_id} source range {range:?}"),
                    }
                } else {
                    map_error(name, "insert", source)
                }
            })?;
        }
        Ok(())
    }

    fn remove_source_ranges<'r>(
        &mut self,
        service_id: u32,
        ranges: impl Iterator<Item = &'r (IpAddr, u8)>,
    ) -> Result<()> {
        for range in ranges {
            let (name, result) = match source_range_key(service_id, range) {
                SourceRangeKey::V4(key) => (
                    map_names::SOURCE_RANGES4,
                    self.maps.source_ranges.remove(&key),
                ),
                SourceRangeKey::V6(key) => (
                    map_names::SOURCE_RANGES6,
                    self.maps.source_ranges6.remove(&key),
                ),
            };
            match result {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(syscall))
                    if syscall.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(source) => return Err(map_error(name, "remove", source)),
            }
        }
        Ok(())
    }

    /// Session affinity entries of a service that point at backends it no longer has: removed,
    /// so those clients choose again (an endpoint leaving releases its clients). Best effort:
    /// an entry left behind expires with its timeout, so failures are recorded, not returned.
    fn release_affinity(&mut self, service_id: u32, backends: &BTreeSet<u32>) {
        let mut stale = Vec::new();
        for entry in self.maps.affinity.iter() {
            match entry {
                Ok((key, value))
                    if key.service_id == service_id && backends.contains(&value.backend_id) =>
                {
                    stale.push(key);
                }
                Ok(_) => {}
                Err(source) => {
                    let operation = format!("iterate to release service {service_id}'s clients");
                    self.cleanup_failed(map_error(map_names::AFFINITY4, &operation, source));
                    break;
                }
            }
        }
        for key in stale {
            match self.maps.affinity.remove(&key) {
                // The LRU may have evicted it meanwhile.
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(syscall))
                    if syscall.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(source) => {
                    let operation = format!("release a client of service {service_id}");
                    self.cleanup_failed(map_error(map_names::AFFINITY4, &operation, source));
                }
            }
        }
    }

    /// Records a failed undo or cleanup step (see [`Datapath::take_cleanup_failures`]).
    fn cleanup_failed(&mut self, error: DatapathError) {
        self.cleanup_failures.push(error);
    }

    /// The undo and cleanup steps that failed since the last call: steps whose caller was
    /// already returning the error that made them necessary, or that no caller waits for.
    pub fn take_cleanup_failures(&mut self) -> Vec<DatapathError> {
        std::mem::take(&mut self.cleanup_failures)
    }

    /// Remembers the UDP backends among `backends` that just left service `service_id`, for
    /// [`Datapath::abort_stale_udp_sockets`].
    fn record_departed_udp(&mut self, service_id: u32, backends: &BTreeSet<u32>) {
        for id in backends {
            if let Some(backend) = self.installed_backends.get(id)
                && backend.proto == lb_common::proto::UDP
            {
                self.departed_udp.insert(DepartedBackend {
                    service_id,
                    backend: SocketAddr::new(backend.addr, backend.port),
                });
            }
        }
    }

    /// Aborts the connected UDP sockets whose peer went stale since the last call, so that the
    /// application's next call fails and it reconnects through the hooks:
    /// - those the socket hooks sent, through a service, to a backend that has left that service
    ///   (`put_service` without it, `remove_service`): a connected socket keeps its backend
    ///   address, so without this it would send to the departed endpoint forever. Only sockets
    ///   the hooks recorded in `lb4_sknat_v1` or `lb6_sknat_v1` for that service and backend,
    ///   and still connected to it, are touched;
    /// - those of the hooks' cgroup (or one below it) connected to a UDP frontend that is new to
    ///   the maps: they connected before it was a frontend, untranslated, and would send to the
    ///   address itself for as long as they live (kube-proxy clears the conntrack entries of a
    ///   UDP Service address that gains endpoints, for the same reason).
    ///
    /// TCP is left alone (like kube-proxy, established connections to a removed endpoint stay).
    /// The agent calls this once per sync.
    pub fn abort_stale_udp_sockets(&mut self) -> super::sock_diag::DestroyReport {
        let departed = std::mem::take(&mut self.departed_udp);
        let untranslated = std::mem::take(&mut self.new_udp_frontends);
        let mut report = super::sock_diag::DestroyReport::default();
        let mut targets = super::sock_diag::AbortTargets::default();
        if !departed.is_empty() {
            targets.by_cookie = self.sockets_sent_to(&departed, &mut report);
        }
        if !untranslated.is_empty()
            && let Some(cgroup) = &self.hooks_cgroup
        {
            match cgroup_ids_below(cgroup) {
                Ok(cgroups) => {
                    targets.untranslated = untranslated;
                    targets.cgroups = cgroups;
                }
                Err(error) => {
                    report.failed += 1;
                    report.errors.push(format!(
                        "listing the cgroups of {}: {error}",
                        cgroup.display()
                    ));
                    // Nothing was searched: the next call tries these frontends again.
                    self.new_udp_frontends = untranslated;
                }
            }
        }
        let aborted = super::sock_diag::destroy_connected_udp(&targets);
        report.destroyed += aborted.destroyed;
        report.failed += aborted.failed;
        report.errors.extend(aborted.errors);
        report
    }

    /// The sockets (by cookie, with their backend) that the socket NAT maps record as sent to a
    /// `departed` backend through its service; a map that cannot be read is reported.
    fn sockets_sent_to(
        &self,
        departed: &BTreeSet<DepartedBackend>,
        report: &mut super::sock_diag::DestroyReport,
    ) -> BTreeMap<u64, SocketAddr> {
        let mut targets = BTreeMap::new();
        let v4 = self.maps.sock_nat.iter().map(|entry| {
            entry.map(|(key, value)| {
                let addr = Ipv4Addr::from(u32::from_be(key.addr));
                (
                    key.cookie,
                    SocketAddr::new(addr.into(), u16::from_be(key.port)),
                    value.service_id,
                )
            })
        });
        let v6 = self.maps.sock_nat6.iter().map(|entry| {
            entry.map(|(key, value)| {
                let addr = ipv6_of_words(key.addr);
                (
                    key.cookie,
                    SocketAddr::new(addr.into(), u16::from_be(key.port)),
                    value.service_id,
                )
            })
        });
        for (name, entries) in [
            (
                map_names::SOCK_NAT4,
                Box::new(v4) as Box<dyn Iterator<Item = _>>,
            ),
            (map_names::SOCK_NAT6, Box::new(v6)),
        ] {
            for entry in entries {
                let (cookie, backend, service_id) = match entry {
                    Ok(entry) => entry,
                    Err(error) => {
                        report.failed += 1;
                        report.errors.push(format!("reading {name}: {error}"));
                        break;
                    }
                };
                if departed.contains(&DepartedBackend {
                    service_id,
                    backend,
                }) {
                    targets.insert(cookie, backend);
                }
            }
        }
        targets
    }

    /// Builds the Maglev table of a service about to be put ([`Datapath::put_service`] then uses
    /// it) and stages it, so that it is in the maps before the service's frontends ask for it:
    /// the reconciler prepares every changed service, swaps the tables in together
    /// ([`Datapath::swap_maglev_tables`], one grace period), then puts the services.
    pub fn prepare_maglev_table(&mut self, service: &Service) -> Result<()> {
        if let Some(table) = self.write_maglev_table(service)? {
            self.maglev_prepared.insert(service.id, table);
        }
        Ok(())
    }

    /// For a Maglev service with backends: builds its lookup table over the backends' identities
    /// (address:port/protocol, the same on every node), each weighted by its cells, of the size
    /// [`maglev::table_size`] gives for its cells and its current table, in an array of its
    /// own, and stages it as the service's entry of `lb4_maglev_v2` (one update: XDP reads
    /// either table whole; the kernel frees the old one once no program reads it). Returns the
    /// table's size and tag; None for other services.
    fn write_maglev_table(&mut self, service: &Service) -> Result<Option<(u32, u32)>> {
        if service.flags & service_flags::MAGLEV == 0 || service.backends.is_empty() {
            return Ok(None);
        }
        let current = self
            .installed
            .get(&service.id)
            .and_then(|installed| installed.maglev_size);
        let size = maglev::table_size(service.backends.len() as u32, current);
        let (table, tag) = self.build_maglev_table(service.id, &service.backends, size)?;
        self.stage_maglev_swap(service.id, Some(table))?;
        Ok(Some((size, tag)))
    }

    /// The table of `size` slots over `cells` (a selection table's backend ids, each backend
    /// weighted by its cells), in a new array: cell 0 the size, cell 1 the tag, then the slots.
    /// Returns it with its tag.
    fn build_maglev_table(
        &self,
        service_id: u32,
        cells: &[u32],
        size: u32,
    ) -> Result<(Array<MapData, u32>, u32)> {
        let mut weighted: Vec<(u32, u32)> = Vec::new();
        for id in cells {
            match weighted.iter_mut().find(|(backend, _)| backend == id) {
                Some((_, weight)) => *weight += 1,
                None => weighted.push((*id, 1)),
            }
        }
        let identities: Vec<String> = weighted
            .iter()
            .map(|(id, _)| {
                let backend = self.installed_backends.get(id).ok_or_else(|| {
                    DatapathError::Invalid(format!(
                        "service {service_id}: Maglev table: backend {id} is not in the maps"
                    ))
                })?;
                Ok(format!(
                    "{}:{}/{}",
                    backend.addr, backend.port, backend.proto
                ))
            })
            .collect::<Result<_>>()?;
        let weights: Vec<u32> = weighted.iter().map(|(_, weight)| *weight).collect();
        let owners =
            super::maglev::weighted_table(&identities, &weights, size).map_err(|error| {
                DatapathError::Invalid(format!("service {service_id}: Maglev table: {error}"))
            })?;
        let owners: Vec<u32> = owners
            .iter()
            .map(|&index| weighted[index as usize].0)
            .collect();
        let tag = super::maglev::tag(size, &owners);
        let slots: Vec<u32> = [size, tag].into_iter().chain(owners).collect();
        // Every table in force or on its way, but the one this replaces.
        let in_use: u64 = self
            .installed
            .iter()
            .filter(|(id, _)| **id != service_id)
            .filter_map(|(_, installed)| installed.maglev_size)
            .chain(
                self.maglev_prepared
                    .iter()
                    .filter(|(id, _)| **id != service_id)
                    .map(|(_, (size, _))| *size),
            )
            .map(|size| u64::from(maglev::HEADER + size))
            .sum();
        if in_use + slots.len() as u64 > u64::from(limits::MAX_MAGLEV_CELLS) {
            return Err(DatapathError::MapFull {
                map: map_names::MAGLEV4,
                capacity: limits::MAX_MAGLEV_CELLS,
                operation: format!("a Maglev table of {size} slots for service {service_id}"),
            });
        }
        let operation = || format!("the Maglev table of service {service_id} ({size} slots)");
        let table = Array::<MapData, u32>::create(slots.len() as u32, BPF_F_INNER_MAP)
            .map_err(|source| map_error(map_names::MAGLEV4, &operation(), source))?;
        let table_fd = aya::maps::IterableMap::map(&table).fd().as_fd();
        super::batch::write_array(table_fd, &slots)
            .map_err(|io_error| maglev_error(&operation(), "bpf_map_update_batch", io_error))?;
        Ok((table, tag))
    }

    /// Puts the Maglev table service `id` had (`previous`) back: a failed update's frontends ask
    /// for it again. Without one, the service's table goes.
    fn restore_maglev_table(&mut self, id: u32, previous: Option<&InstalledService>) -> Result<()> {
        match previous {
            Some(previous) if !previous.backends.is_empty() => match previous.maglev_size {
                Some(size) => {
                    let (table, _) = self.build_maglev_table(id, &previous.backends, size)?;
                    self.stage_maglev_swap(id, Some(table))
                }
                None => self.remove_maglev_table(id),
            },
            _ => self.remove_maglev_table(id),
        }
    }

    /// Removes a service's Maglev table (its frontends no longer ask for it).
    fn remove_maglev_table(&mut self, service_id: u32) -> Result<()> {
        self.stage_maglev_swap(service_id, None)
    }

    /// A service's new Maglev table (None: none), swapped in now, or with the others at
    /// [`Datapath::swap_maglev_tables`] after [`Datapath::defer_maglev_swaps`].
    fn stage_maglev_swap(
        &mut self,
        service_id: u32,
        table: Option<Array<MapData, u32>>,
    ) -> Result<()> {
        self.maglev_pending.insert(service_id, table);
        if self.maglev_deferred {
            return Ok(());
        }
        let result = self.swap_staged_maglev_tables();
        if result.is_err() && !self.maglev_deferred {
            // Nothing asks for a table that did not go in.
            self.maglev_pending.remove(&service_id);
        }
        result
    }

    /// From now until [`Datapath::swap_maglev_tables`], new Maglev tables wait to be swapped in
    /// together. Each swap of an entry of `lb4_maglev_v2` from userspace waits for a grace
    /// period (kernel/bpf/syscall.c, `maybe_wait_bpf_programs`), milliseconds; since Linux 6.8
    /// a batch of updates waits once.
    pub fn defer_maglev_swaps(&mut self) {
        self.maglev_deferred = true;
    }

    /// Swaps in the Maglev tables staged since [`Datapath::defer_maglev_swaps`] (one batch of
    /// updates), and removes those staged for removal (one grace period each). Those that fail
    /// stay staged for the next call.
    pub fn swap_maglev_tables(&mut self) -> Result<()> {
        self.maglev_deferred = false;
        self.swap_staged_maglev_tables()
    }

    fn swap_staged_maglev_tables(&mut self) -> Result<()> {
        if self.maglev_pending.is_empty() {
            return Ok(());
        }
        let outer = self.maglev.fd().as_fd();
        let sets: Vec<(u32, std::os::fd::BorrowedFd<'_>)> = self
            .maglev_pending
            .iter()
            .filter_map(|(id, table)| {
                let table = table.as_ref()?;
                Some((*id, aya::maps::IterableMap::map(table).fd().as_fd()))
            })
            .collect();
        super::batch::set_array_entries(outer, &sets).map_err(|io_error| {
            maglev_error(
                &format!("swap in {} Maglev tables", sets.len()),
                "bpf_map_update_batch",
                io_error,
            )
        })?;
        let deletions: Vec<u32> = self
            .maglev_pending
            .iter()
            .filter(|(_, table)| table.is_none())
            .map(|(id, _)| *id)
            .collect();
        self.maglev_pending.retain(|_, table| table.is_none());
        for id in deletions {
            super::batch::delete_array_entry(self.maglev.fd().as_fd(), id).map_err(|io_error| {
                maglev_error(
                    &format!("remove the Maglev table of service {id}"),
                    "bpf_map_delete_elem",
                    io_error,
                )
            })?;
            self.maglev_pending.remove(&id);
        }
        Ok(())
    }

    /// How many Maglev tables wait to be swapped in (the reconciler swaps them by
    /// [`MAGLEV_SWAP_BATCH`]: each holds a descriptor until then).
    pub fn staged_maglev_tables(&self) -> usize {
        self.maglev_pending.len()
    }

    /// Forgets what [`Datapath::prepare_maglev_table`] prepared for puts that did not come.
    pub fn clear_prepared_maglev_tables(&mut self) {
        self.maglev_prepared.clear();
    }

    /// Whether service `id` has a Maglev table prepared and swapped in for its put.
    pub fn maglev_table_prepared(&self, id: u32) -> bool {
        self.maglev_prepared.contains_key(&id)
    }

    /// Forgets the tables prepared and staged for services whose put will not come (the swap
    /// that would have put their tables in failed): they are built again next time.
    pub fn forget_prepared_maglev_tables(&mut self) {
        self.maglev_prepared.clear();
        self.maglev_pending.retain(|_, table| table.is_none());
    }

    /// MapFull before anything is written when the service's new entries would not fit.
    fn check_room(&self, service: &Service, frontends: &BTreeMap<FrontendKey, u32>) -> Result<()> {
        for (map, v6) in [
            (map_names::FRONTENDS4, false),
            (map_names::FRONTENDS6, true),
        ] {
            let new_frontends = frontends
                .keys()
                .filter(|key| matches!(key, FrontendKey::V6(_)) == v6)
                .filter(|key| !self.owners.contains_key(key))
                .count();
            let capacity = if v6 {
                limits::MAX_FRONTENDS
            } else {
                self.frontends4_capacity
            };
            if self.owners.count(v6) + new_frontends > capacity as usize {
                return Err(DatapathError::MapFull {
                    map,
                    capacity,
                    operation: format!("service {}: {new_frontends} new frontends", service.id),
                });
            }
        }
        // The new table is written before the old one is freed: both must fit for a moment.
        if service.backends.len() > self.slot_ranges.free_cells() as usize {
            return Err(DatapathError::MapFull {
                map: map_names::SLOTS4,
                capacity: limits::MAX_SLOTS,
                operation: format!("service {}: {} slots", service.id, service.backends.len()),
            });
        }
        Ok(())
    }

    /// Writes a selection table into free cells of the slot array; returns its first cell.
    fn write_slots(&mut self, service_id: u32, backends: &[u32]) -> Result<u32> {
        let len = backends.len() as u32;
        let full = || DatapathError::MapFull {
            map: map_names::SLOTS4,
            capacity: limits::MAX_SLOTS,
            operation: format!("service {service_id}: {len} consecutive free cells"),
        };
        let start = self.slot_ranges.allocate(len).ok_or_else(full)?;
        if let Err(error) = write_table(&mut self.maps.slots, start, service_id, backends) {
            self.slot_ranges.release(start, len);
            return Err(error);
        }
        Ok(start)
    }

    /// Puts back what a failed put_service changed among `written` frontends: new ones are
    /// removed, existing ones get their previous entry again.
    /// Whether every one was undone.
    fn undo_frontends(&mut self, written: &[FrontendKey]) -> bool {
        let mut all_undone = true;
        for key in written {
            // The entry the key had before this call: its owner's (this service's previous
            // version, or the service it was taken from), or none.
            let before = self.owners.get(key).and_then(|owner| {
                let installed = self.installed.get(owner)?;
                let value = ServiceValue {
                    service_id: *owner,
                    backend_count: installed.backends.len() as u16,
                    legacy_revision: 0,
                    flags: *installed.frontends.get(key)?,
                    affinity_timeout_s: installed.affinity_timeout_s,
                    maglev_table: installed.maglev_tag.unwrap_or(0),
                    slots: installed.slots,
                };
                Some((value, installed.backends.clone()))
            });
            let operation = || format!("undo a failed update of frontend {key:?}");
            let undone = match before {
                Some((value, table)) => self.insert_frontend(key, &value, &table),
                None => self.remove_frontend(key, operation),
            };
            if let Err(error) = undone {
                all_undone = false;
                self.cleanup_failed(error);
            }
        }
        all_undone
    }

    /// Records the name of a service id (for `lb services` and the metrics' labels). Longer
    /// names are cut at [`lb_common::SERVICE_NAME_LEN`] bytes.
    pub fn set_service_name(&mut self, id: u32, name: &str) -> Result<()> {
        if self.names.get(&id).map(String::as_str) == Some(name) {
            return Ok(());
        }
        let mut value = [0u8; SERVICE_NAME_LEN];
        let bytes = name.as_bytes();
        let len = bytes.len().min(SERVICE_NAME_LEN);
        value[..len].copy_from_slice(&bytes[..len]);
        self.maps
            .service_names
            .insert(&id, &value, 0)
            .map_err(|source| map_error(map_names::SERVICE_NAMES, "update", source))?;
        self.names.insert(id, name.to_owned());
        Ok(())
    }

    /// Removes a service: its frontends first (new packets stop matching), then its table.
    pub fn remove_service(&mut self, id: u32) -> Result<()> {
        if self.names.remove(&id).is_some() {
            remove(
                &mut self.maps.service_names,
                map_names::SERVICE_NAMES,
                &id,
                || format!("service {id} name"),
            )?;
        }
        let Some(installed) = self.installed.remove(&id) else {
            return Ok(());
        };
        self.record_departed_udp(id, &installed.backends.iter().copied().collect());
        self.remove_source_ranges(id, installed.source_ranges.iter())?;
        if installed.affinity_timeout_s != 0 {
            self.release_affinity(id, &installed.backends.iter().copied().collect());
        }
        for key in installed.frontends.keys() {
            self.remove_frontend(key, || format!("service {id} frontend {key:?}"))?;
            if self.owners.remove(key).is_some() {
                self.release_frontend_bit(key)?;
            }
        }
        self.slot_ranges
            .release(installed.slots, installed.backends.len() as u32);
        if installed.maglev_tag.is_some() {
            self.remove_maglev_table(id)?;
        }
        self.track_source_check(id);
        self.direct_return
            .update_service(id, None, &self.installed_backends)
    }

    /// Zeroes a service id's counters on every CPU.
    fn reset_service_counter(&mut self, id: u32) -> Result<()> {
        let operation = || format!("zero the counters of service {id}");
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| DatapathError::PerCpu {
            map: map_names::SERVICE_COUNTERS,
            operation: operation(),
            source,
        })?;
        let zeros = PerCpuValues::try_from(vec![ServiceCounter::default(); cpus.get() as usize])
            .map_err(|source| DatapathError::PerCpu {
                map: map_names::SERVICE_COUNTERS,
                operation: operation(),
                source,
            })?;
        self.maps
            .service_counters
            .set(id, zeros, 0)
            .map_err(|source| map_error(map_names::SERVICE_COUNTERS, &operation(), source))
    }

    fn validate(&self, service: &Service) -> Result<()> {
        let invalid = |why: String| {
            Err(DatapathError::Invalid(format!(
                "service {}: {why}",
                service.id
            )))
        };
        if service.id >= limits::MAX_SERVICES {
            return invalid(format!(
                "id out of range (max {})",
                limits::MAX_SERVICES - 1
            ));
        }
        if service.backends.len() > limits::MAX_BACKENDS_PER_SERVICE as usize {
            return invalid(format!(
                "{} backends, more than the {} a service can select from",
                service.backends.len(),
                limits::MAX_BACKENDS_PER_SERVICE
            ));
        }
        if service.frontends.is_empty() {
            return invalid("no frontend".into());
        }
        for frontend in &service.frontends {
            if frontend.port == 0 {
                return invalid(format!("frontend {frontend:?} has port 0"));
            }
            let served = [
                lb_common::proto::TCP,
                lb_common::proto::UDP,
                lb_common::proto::SCTP,
            ];
            if !served.contains(&frontend.proto) {
                return invalid(format!(
                    "frontend {frontend:?}: protocol not TCP, UDP or SCTP"
                ));
            }
        }
        if let Some(range) = service
            .source_ranges
            .iter()
            .find(|(addr, len)| *len > Family::of(*addr).bits())
        {
            return invalid(format!(
                "source range {range:?}: prefix length above the address's"
            ));
        }
        // The LPM trie holds one entry per (service, prefix): 10.1.2.3/8 would be the entry of
        // 10.0.0.0/8, and removing either from the set would remove the entry both need.
        if let Some(range) = service.source_ranges.iter().find(|(addr, len)| {
            let cidr = IpCidr {
                addr: *addr,
                prefix_len: *len,
            };
            cidr.network() != cidr
        }) {
            return invalid(format!(
                "source range {range:?}: host bits set (compile masks them)"
            ));
        }
        for id in &service.backends {
            if !self.installed_backends.contains_key(id) {
                return invalid(format!("backend {id} is not in the backends map"));
            }
        }
        // A service's frontends select from one slot table, whose backend ids the program of
        // their family looks up in its own backends map: one family for everything.
        let family = Family::of(service.frontends[0].addr);
        let families = service
            .frontends
            .iter()
            .map(|frontend| Family::of(frontend.addr))
            .chain(
                service
                    .backends
                    .iter()
                    .map(|id| self.installed_backends[id].family()),
            )
            .chain(
                service
                    .source_ranges
                    .iter()
                    .map(|(addr, _)| Family::of(*addr)),
            );
        for other in families {
            if other != family {
                return invalid(format!(
                    "frontends, backends and source ranges of both families ({} and {}); a \
                     dual-stack Service is one service per family",
                    family.name(),
                    other.name()
                ));
            }
        }
        Ok(())
    }
}

/// Writes `backends` into the cells of the slot array from `start`, each marked as `service_id`'s.
pub(super) fn write_table(
    slots: &mut Array<MapData, Slot>,
    start: u32,
    service_id: u32,
    backends: &[u32],
) -> Result<()> {
    for (index, &backend_id) in (start..).zip(backends) {
        let cell = Slot {
            service_id,
            backend_id,
        };
        slots
            .set(index, &cell, 0)
            .map_err(|source| map_error(map_names::SLOTS4, "write", source))?;
    }
    Ok(())
}

fn maglev_error(operation: &str, call: &'static str, io_error: std::io::Error) -> DatapathError {
    map_error(
        map_names::MAGLEV4,
        operation,
        MapError::SyscallError(aya::sys::SyscallError { call, io_error }),
    )
}

/// A source-range trie key of either family.
enum SourceRangeKey {
    V4(LpmKey<SourceRange<u32>>),
    V6(LpmKey<SourceRange<lb_common::Ipv6Words>>),
}

fn source_range_key(service_id: u32, (addr, prefix_len): &(IpAddr, u8)) -> SourceRangeKey {
    let prefix_len = 32 + u32::from(*prefix_len);
    let service_id_be = service_id.to_be();
    match addr {
        IpAddr::V4(addr) => SourceRangeKey::V4(LpmKey::new(
            prefix_len,
            SourceRange {
                service_id_be,
                addr: u32::from(*addr).to_be(),
            },
        )),
        IpAddr::V6(addr) => SourceRangeKey::V6(LpmKey::new(
            prefix_len,
            SourceRange {
                service_id_be,
                addr: ipv6_words(*addr),
            },
        )),
    }
}

/// A family's frontends map with its name.
type FrontendsMap<'m, A> = (
    &'m mut HashMap<MapData, lb_common::FrontendKey<A>, ServiceValue>,
    &'static str,
);
/// A family's frontend index with its map's name.
type IndexOf<'i, S> = (
    &'i mut super::frontend_index::FrontendIndex<S, Array<MapData, S>>,
    &'static str,
);

/// [`Datapath::insert_frontend`] in one family: the outer error is the map's (the update
/// failed, and nothing changed), the inner one the index's after the map took the entry.
fn write_frontend<S>(
    (map, map_name): FrontendsMap<'_, S::Addr>,
    capacity: u32,
    (index, index_name): IndexOf<'_, S>,
    key: &lb_common::FrontendKey<S::Addr>,
    (value, table): (&ServiceValue, &[u32]),
    operation: impl Fn() -> String,
) -> Result<Result<()>>
where
    S: super::frontend_index::IndexSlot + aya::Pod,
    lb_common::FrontendKey<S::Addr>: aya::Pod,
{
    let indexed = key.scope == scope::ANY;
    if indexed {
        index
            .before_write(key, value, table)
            .map_err(|e| map_error(index_name, "write", e))?;
    }
    insert(map, map_name, capacity, key, value, operation)?;
    if !indexed {
        return Ok(Ok(()));
    }
    Ok(index
        .after_write(key, value, table)
        .map_err(|e| map_error(index_name, "write", e)))
}

/// [`Datapath::remove_frontend`] in one family.
fn remove_frontend_entry<S>(
    (map, map_name): FrontendsMap<'_, S::Addr>,
    (index, index_name): IndexOf<'_, S>,
    key: &lb_common::FrontendKey<S::Addr>,
    operation: impl Fn() -> String,
) -> Result<()>
where
    S: super::frontend_index::IndexSlot + aya::Pod,
    lb_common::FrontendKey<S::Addr>: aya::Pod,
{
    index
        .before_remove(key)
        .map_err(|e| map_error(index_name, "write", e))?;
    remove(map, map_name, key, operation)?;
    index.after_remove(key);
    Ok(())
}

/// The backend ids of the selection table a frontend entry names, as the agent installed it;
/// empty when the entry is not the installed service's current one (the frontend index then
/// carries no table for it, and XDP reads the slot array).
pub(super) fn table_of<'i>(
    installed: &'i BTreeMap<u32, InstalledService>,
    value: &ServiceValue,
) -> &'i [u32] {
    match installed.get(&value.service_id) {
        Some(service)
            if service.slots == value.slots
                && service.backends.len() == usize::from(value.backend_count) =>
        {
            &service.backends
        }
        _ => &[],
    }
}

/// E2BIG from BPF_MAP_UPDATE_ELEM: the map holds max_entries already.
fn is_full(error: &MapError) -> bool {
    matches!(error, MapError::SyscallError(syscall) if syscall.io_error.raw_os_error() == Some(libc::E2BIG))
}

fn insert<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    capacity: u32,
    key: &K,
    value: &V,
    operation: impl Fn() -> String,
) -> Result<()> {
    map.insert(key, value, 0).map_err(|source| {
        if is_full(&source) {
            DatapathError::MapFull {
                map: name,
                capacity,
                operation: operation(),
            }
        } else {
            map_error(name, &operation(), source)
        }
    })
}

/// Removes a key; a key that is already gone is not an error (removal is idempotent).
fn remove<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    key: &K,
    operation: impl Fn() -> String,
) -> Result<()> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(syscall))
            if syscall.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(source) => Err(map_error(name, &operation(), source)),
    }
}

/// A hash map's entry for `key`, None if it has none.
fn lookup_entry<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    key: &K,
) -> std::result::Result<Option<V>, MapError> {
    match map.get(key, 0) {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(error) => Err(error),
    }
}

/// The cgroup v2 ids of `cgroup` and of every cgroup below it: a cgroup's id is its directory's
/// inode number in the cgroup2 filesystem (kernfs, `cgroup_id()`), as sock_diag reports a
/// socket's. A cgroup removed during the walk is skipped.
fn cgroup_ids_below(cgroup: &std::path::Path) -> std::io::Result<std::collections::HashSet<u64>> {
    use std::os::unix::fs::MetadataExt as _;
    let mut ids = std::collections::HashSet::new();
    ids.insert(std::fs::metadata(cgroup)?.ino());
    let mut pending = vec![cgroup.to_owned()];
    while let Some(directory) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&directory) else {
            continue;
        };
        for entry in entries.flatten() {
            // Cgroups are the directories; a cgroup2 directory holds no symlinks.
            if entry.file_type().is_ok_and(|kind| kind.is_dir())
                && let Ok(metadata) = entry.metadata()
            {
                ids.insert(metadata.ino());
                pending.push(entry.path());
            }
        }
    }
    Ok(ids)
}
