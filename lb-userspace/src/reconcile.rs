//! reconcile(desired, datapath): brings the maps to the desired state with the fewest updates,
//! in an order that never drops a packet:
//!
//! 1. for each new or changed service: its backends that are new or changed are written (nothing
//!    references them yet), then the service (its new slot table, then its frontends flipped to
//!    it: see `Datapath::put_service`);
//! 2. services no longer desired are removed (frontends first);
//! 3. backends nothing references any more are removed;
//! 4. connected UDP sockets that the socket hooks sent to a backend that left its service, and
//!    those of the hooks' cgroup connected untranslated to a UDP frontend new in this run, are
//!    aborted, so their applications reconnect through the hooks
//!    (`Datapath::abort_stale_udp_sockets`).
//!
//! It is idempotent (a second run changes nothing) and restart-safe: the first run after a start
//! reads what the pinned maps hold through the datapath's index, adopts the ids of services and
//! backends already there, and never touches connection tracking, so flows survive a restart.
//! Later runs only look at the Service ports whose desired state differs from what the previous
//! run applied, so one endpoint change costs O(that service), not O(all services).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use lb_common::limits;

use crate::{
    compile::model::{
        Backend, Desired, DesiredService, Family, FrontendKey, Service, ServicePortKey,
    },
    datapath::{Datapath, DatapathError, MAGLEV_SWAP_BATCH, frontend_flags},
};

/// The key a recovered service of a held Service is reported under (its ports are unknown).
fn recovered_key(owner: &(String, String), id: u32) -> ServicePortKey {
    ServicePortKey {
        namespace: owner.0.clone(),
        name: owner.1.clone(),
        port_name: format!("(recovered service {id})"),
        proto: 0,
        scope: Default::default(),
        family: Default::default(),
    }
}

/// Remembers what it applied between runs: the service id of each Service port, the id and
/// reference count of each backend.
#[derive(Debug, Default)]
pub struct Reconciler {
    ids: BTreeMap<ServicePortKey, u32>,
    /// What the last [`Reconciler::reconcile`] applied, which the next one compares the desired
    /// state with. [`Reconciler::reconcile_changed`], the agent's way (the compiler says what
    /// changed), keeps no such copy: at 10k Services x 10 endpoints it held about 7 MiB.
    applied: HashMap<ServicePortKey, DesiredService>,
    backend_ids: HashMap<BackendIdentity, u32>,
    backend_refs: HashMap<u32, usize>,
    /// Backends whose reference count dropped to zero in this run.
    released: Vec<u32>,
    /// Service ids handed out in the current run (installed only when its services are put).
    reserved_ids: BTreeSet<u32>,
    /// Service ports whose last put failed: tried again on every run until they succeed.
    failed: BTreeSet<ServicePortKey>,
    next_service_id: u32,
    next_backend_id: u32,
    initialized: bool,
    /// Before the first run: the ClusterIPs of each held Service, which identify what an earlier
    /// run installed for it (see [`Reconciler::recover_held`]).
    held_addresses: BTreeMap<(String, String), BTreeSet<IpAddr>>,
    /// Installed services of held Services found that way, kept until their Service is no
    /// longer held (fixed or deleted).
    held_installed: BTreeMap<(String, String), Vec<u32>>,
}

/// What one reconcile did.
#[derive(Debug, Default)]
pub struct ReconcileReport {
    pub backends_put: usize,
    pub backends_removed: usize,
    pub services_put: usize,
    pub services_removed: usize,
    /// Service ports that could not be programmed (map full, invalid), with the reason. Every
    /// other service was still reconciled.
    pub errors: Vec<(ServicePortKey, DatapathError)>,
    /// Connected UDP sockets aborted because their backend left the service (step 4).
    pub udp_sockets: crate::datapath::sock_diag::DestroyReport,
    /// Cleanup that failed: backends nothing uses that could not be removed (tried again on
    /// the next run), and the datapath's failed undo and cleanup steps.
    pub cleanup_failures: Vec<DatapathError>,
}

impl ReconcileReport {
    /// Map updates made (a service update counts once).
    pub fn changes(&self) -> usize {
        self.backends_put + self.backends_removed + self.services_put + self.services_removed
    }
}

/// A backend's identity: the endpoint (address, port, protocol) and where it runs (its LOCAL
/// flag). Service ports share a backend entry when their slices agree on the endpoint's node,
/// and get one each when they do not (a stale or hand-made slice): the flag is then each
/// Service's own, as kube-proxy's per-Service endpoint maps have it, and stable, where one
/// shared entry would be rewritten by every sync that puts both (backends_put=2 each time).
/// The TERMINATING flag is not part of it: an endpoint that starts terminating is rewritten in
/// place, so flows (and session affinity) that hold its id keep it.
type BackendIdentity = (IpAddr, u16, u8, bool);

fn identity(backend: &Backend) -> BackendIdentity {
    (
        backend.addr,
        backend.port,
        backend.proto,
        backend.flags & lb_common::backend_flags::LOCAL != 0,
    )
}

impl Reconciler {
    pub fn new() -> Self {
        Self::default()
    }

    /// The service id of a Service port, if it is installed.
    pub fn service_id(&self, key: &ServicePortKey) -> Option<u32> {
        self.ids.get(key).copied()
    }

    /// Every Service port with its service id.
    pub fn service_ids(&self) -> &BTreeMap<ServicePortKey, u32> {
        &self.ids
    }

    /// Reconciles every Service port (comparing each with what the previous run applied).
    pub fn reconcile(&mut self, datapath: &mut Datapath, desired: &Desired) -> ReconcileReport {
        let changed: BTreeSet<ServicePortKey> = if self.initialized {
            desired
                .services
                .iter()
                .filter(|(key, service)| self.applied.get(*key) != Some(*service))
                .map(|(key, _)| key.clone())
                .chain(
                    self.ids
                        .keys()
                        .filter(|key| !desired.services.contains_key(*key))
                        .cloned(),
                )
                .collect()
        } else {
            BTreeSet::new()
        };
        let report = self.reconcile_changed(datapath, desired, &changed);
        // A put that failed is retried by the next run anyway (see `failed`).
        self.applied = desired
            .services
            .iter()
            .filter(|(key, _)| !self.failed.contains(*key))
            .map(|(key, service)| (key.clone(), service.clone()))
            .collect();
        report
    }

    /// Whether the first run (which adopts what the maps hold) is done.
    pub fn is_initialized(&self) -> bool {
        self.initialized
    }

    /// Before the first run after a start: the ClusterIPs (both families) of every held Service (skipped
    /// for bad input, so the compiler gives no ports for it). What the maps hold under those
    /// addresses and no valid Service claims is that Service's last good state: the first run
    /// keeps it instead of removing it as a leftover, until the Service is fixed or deleted.
    /// ClusterIPs identify it because the API server allocates them uniquely.
    pub fn recover_held(&mut self, addresses: BTreeMap<(String, String), BTreeSet<IpAddr>>) {
        self.held_addresses = addresses;
    }

    /// Reconciles the Service ports in `changed` (added, changed or removed since the previous
    /// run, as `Compiler::update` reports them): O(the change), not O(all services). The first
    /// run after a start looks at everything regardless.
    pub fn reconcile_changed(
        &mut self,
        datapath: &mut Datapath,
        desired: &Desired,
        changed: &BTreeSet<ServicePortKey>,
    ) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        let first_run = !self.initialized;
        if first_run {
            self.adopt_installed(datapath, desired);
        }
        // Maglev tables are swapped in together, each before its service's frontends ask for it.
        datapath.defer_maglev_swaps();
        // Before any put: a held Service fixed in this run gets its ports under new ids, whose
        // frontends are the ones its recovered state still holds.
        self.release_recovered_held(datapath, desired, &mut report);
        let retry = std::mem::take(&mut self.failed);
        let changed: BTreeSet<&ServicePortKey> = changed.iter().chain(retry.iter()).collect();

        // 1. New or changed services, with their backends.
        let to_put: Vec<&ServicePortKey> = if first_run {
            desired.services.keys().collect()
        } else {
            changed
                .iter()
                .copied()
                .filter(|key| desired.services.contains_key(*key))
                .collect()
        };
        // First the backends and the Maglev tables of every service to put, the tables swapped
        // in together (one grace period), then the services: no frontend ever asks for a
        // table that is not in force.
        let mut planned = Vec::new();
        let mut keep_backends = false;
        for key in to_put {
            let service = &desired.services[key];
            let plan = self
                .plan_service(datapath, key, service, &mut report)
                .and_then(|plan| {
                    if let Some(wanted) = &plan
                        && !keep_backends
                    {
                        datapath.prepare_maglev_table(wanted)?;
                    }
                    Ok(plan)
                });
            // Swapped in by batches: each staged table holds a descriptor.
            if datapath.staged_maglev_tables() >= MAGLEV_SWAP_BATCH
                && let Err(error) = datapath.swap_maglev_tables()
            {
                datapath.forget_prepared_maglev_tables();
                report.cleanup_failures.push(error);
                keep_backends = true;
            }
            datapath.defer_maglev_swaps();
            match plan {
                Ok(Some(wanted)) => planned.push((key, wanted)),
                Ok(None) => {}
                Err(error) => self.fail(datapath, key, error, &mut report),
            }
        }
        // When the swap fails, which tables went in is unknown: the Maglev services wait for
        // the next run with their frontends as they were, the others go on, and no backend is
        // removed this run (a table that went in may name the new ones).
        if let Err(error) = datapath.swap_maglev_tables() {
            datapath.forget_prepared_maglev_tables();
            report.cleanup_failures.push(error);
            keep_backends = true;
        }
        datapath.defer_maglev_swaps();
        for (key, wanted) in planned {
            if wanted.flags & lb_common::service_flags::MAGLEV != 0
                && !wanted.backends.is_empty()
                && !datapath.maglev_table_prepared(wanted.id)
            {
                let error = DatapathError::Invalid(format!(
                    "service {}: its Maglev table did not go in",
                    wanted.id
                ));
                self.fail(datapath, key, error, &mut report);
                continue;
            }
            if let Err(error) = self.apply_service(datapath, key, &wanted, &mut report) {
                self.fail(datapath, key, error, &mut report);
            }
        }

        // 2. Services no longer desired (a held Service keeps what it had).
        let held = |key: &ServicePortKey| {
            desired
                .held
                .contains(&(key.namespace.clone(), key.name.clone()))
        };
        let candidates: Box<dyn Iterator<Item = &ServicePortKey>> = if first_run {
            Box::new(self.ids.keys())
        } else {
            Box::new(changed.iter().copied())
        };
        let mut stale: Vec<(Option<ServicePortKey>, u32)> = candidates
            .filter(|key| !desired.services.contains_key(*key) && !held(key))
            .filter_map(|key| self.ids.get(key).map(|id| (Some(key.clone()), *id)))
            .collect();
        if first_run {
            // Whatever the maps hold that no Service port claims (an earlier run's leftovers).
            let known: BTreeSet<u32> = self
                .ids
                .values()
                .chain(self.held_installed.values().flatten())
                .copied()
                .collect();
            stale.extend(
                datapath
                    .installed_services()
                    .keys()
                    .filter(|id| !known.contains(id))
                    .map(|id| (None, *id)),
            );
        }
        for (key, id) in stale {
            let backends = datapath
                .installed_services()
                .get(&id)
                .map(|service| service.backends.clone())
                .unwrap_or_default();
            match datapath.remove_service(id) {
                Ok(()) => {
                    report.services_removed += 1;
                    self.release(&backends);
                    if let Some(key) = key {
                        self.ids.remove(&key);
                    }
                }
                Err(error) => report
                    .errors
                    .push((key.unwrap_or_else(|| unknown_key(id)), error)),
            }
        }

        report
            .cleanup_failures
            .extend(datapath.take_cleanup_failures());
        // The tables no frontend asks for any more go (and any a failed put put back); until
        // they do, no backend goes either.
        if let Err(error) = datapath.swap_maglev_tables() {
            report.cleanup_failures.push(error);
            keep_backends = true;
        }
        datapath.clear_prepared_maglev_tables();
        self.reserved_ids.clear();

        // 3. Backends nothing references (the first run checks them all).
        let candidates: Vec<u32> = if keep_backends {
            // Looked at again next run, the first run's leftovers too.
            if first_run {
                self.released.extend(
                    self.backend_refs
                        .iter()
                        .filter(|(_, refs)| **refs == 0)
                        .map(|(id, _)| *id),
                );
            }
            Vec::new()
        } else if first_run {
            self.backend_refs.keys().copied().collect()
        } else {
            std::mem::take(&mut self.released)
        };
        let mut retry = Vec::new();
        for id in candidates {
            if self.backend_refs.get(&id) != Some(&0) {
                continue;
            }
            let identity = datapath.installed_backends().get(&id).map(identity);
            match datapath.remove_backend(id) {
                Ok(()) => {
                    report.backends_removed += 1;
                    self.backend_refs.remove(&id);
                    if let Some(identity) = identity {
                        self.backend_ids.remove(&identity);
                    }
                }
                Err(error) => {
                    report.cleanup_failures.push(error);
                    retry.push(id);
                }
            }
        }
        if !keep_backends {
            self.released = retry;
        }
        self.initialized = true;

        // 4. Connected UDP sockets still sending to a backend that left, or to an address that
        // was no frontend when they connected.
        report.udp_sockets = datapath.abort_stale_udp_sockets();
        report
            .cleanup_failures
            .extend(datapath.take_cleanup_failures());
        report
    }

    /// Removes the recovered state of held Services that are no longer held.
    fn release_recovered_held(
        &mut self,
        datapath: &mut Datapath,
        desired: &Desired,
        report: &mut ReconcileReport,
    ) {
        let released: Vec<(String, String)> = self
            .held_installed
            .keys()
            .filter(|owner| !desired.held.contains(*owner))
            .cloned()
            .collect();
        for owner in released {
            let Some(ids) = self.held_installed.remove(&owner) else {
                continue;
            };
            for id in ids {
                let backends = datapath
                    .installed_services()
                    .get(&id)
                    .map(|service| service.backends.clone())
                    .unwrap_or_default();
                match datapath.remove_service(id) {
                    Ok(()) => {
                        report.services_removed += 1;
                        self.release(&backends);
                    }
                    Err(error) => report.errors.push((recovered_key(&owner, id), error)),
                }
            }
        }
    }

    /// After a (re)start: ids, backends and reference counts from what the maps hold; a desired
    /// Service port whose frontends are installed under some id takes that id, so nothing is
    /// rewritten and counters keep counting.
    fn adopt_installed(&mut self, datapath: &Datapath, desired: &Desired) {
        self.backend_ids = datapath
            .installed_backends()
            .iter()
            .map(|(id, backend)| (identity(backend), *id))
            .collect();
        self.backend_refs = datapath
            .installed_backends()
            .keys()
            .map(|id| (*id, 0))
            .collect();
        for service in datapath.installed_services().values() {
            for id in &service.backends {
                *self.backend_refs.entry(*id).or_default() += 1;
            }
        }
        let owners: BTreeMap<FrontendKey, u32> = datapath
            .installed_services()
            .iter()
            .flat_map(|(id, service)| service.frontends.keys().map(move |key| (*key, *id)))
            .collect();
        self.ids
            .retain(|_, id| datapath.installed_services().contains_key(id));
        for (key, service) in &desired.services {
            if self.ids.contains_key(key) {
                continue;
            }
            if let Some(id) = service
                .frontends
                .iter()
                .find_map(|frontend| owners.get(&frontend.key()))
                && !self.ids.values().any(|known| known == id)
            {
                self.ids.insert(key.clone(), *id);
            }
        }
        let claimed: BTreeSet<u32> = self.ids.values().copied().collect();
        for (owner, addresses) in std::mem::take(&mut self.held_addresses) {
            if !desired.held.contains(&owner) {
                continue;
            }
            let ids: Vec<u32> = datapath
                .installed_services()
                .iter()
                .filter(|(id, service)| {
                    !claimed.contains(id)
                        && service
                            .frontends
                            .keys()
                            .any(|key| addresses.contains(&key.addr()))
                })
                .map(|(id, _)| *id)
                .collect();
            if !ids.is_empty() {
                self.held_installed.insert(owner, ids);
            }
        }
    }

    /// Writes one service (and its new or changed backends) unless the maps hold it exactly.
    fn fail(
        &mut self,
        datapath: &Datapath,
        key: &ServicePortKey,
        error: DatapathError,
        report: &mut ReconcileReport,
    ) {
        // An id nothing was installed under is free again (ids are allocated by what the maps
        // hold, so no other Service port may keep it meanwhile).
        if self
            .ids
            .get(key)
            .is_some_and(|id| !datapath.installed_services().contains_key(id))
        {
            self.ids.remove(key);
        }
        self.failed.insert(key.clone());
        report.errors.push((key.clone(), error));
    }

    /// The service as the datapath should hold it (its backends put first), or None when the
    /// maps hold it exactly already.
    fn plan_service(
        &mut self,
        datapath: &mut Datapath,
        key: &ServicePortKey,
        service: &DesiredService,
        report: &mut ReconcileReport,
    ) -> Result<Option<Service>, DatapathError> {
        let id = match self.ids.get(key) {
            Some(id) => *id,
            None => self
                .allocate_service_id(datapath)
                .ok_or_else(|| DatapathError::MapFull {
                    map: lb_common::map_names::SERVICE_COUNTERS,
                    capacity: limits::MAX_SERVICES,
                    operation: format!("allocate a service id for {key}"),
                })?,
        };
        let mut weighted = Vec::with_capacity(service.backends.len());
        for backend in &service.backends {
            let weight = service
                .weights
                .get(&(backend.addr, backend.port))
                .copied()
                .unwrap_or(1);
            if weight > 0 {
                weighted.push((self.put_backend(datapath, backend, report)?, weight));
            }
        }
        let wanted = Service {
            id,
            frontends: service.frontends.iter().copied().collect(),
            backends: weighted_cells(&weighted),
            affinity_timeout_s: service.affinity_timeout_s,
            flags: service.flags,
            source_ranges: service.source_ranges.clone(),
        };
        let maglev_wanted =
            wanted.flags & lb_common::service_flags::MAGLEV != 0 && !wanted.backends.is_empty();
        if let Some(installed) = datapath.installed_services().get(&id)
            && installed.backends == wanted.backends
            && installed.affinity_timeout_s == wanted.affinity_timeout_s
            && installed.frontends == frontend_flags(&wanted)
            && installed.source_ranges == wanted.source_ranges
            && (!maglev_wanted || installed.maglev_size.is_some())
        {
            self.ids.insert(key.clone(), id);
            datapath.set_service_name(id, &key.to_string())?;
            return Ok(None);
        }
        // Held for the service until it is put, so that no other Service port takes it.
        self.ids.insert(key.clone(), id);
        Ok(Some(wanted))
    }

    /// Writes a planned service and counts its backends' references.
    fn apply_service(
        &mut self,
        datapath: &mut Datapath,
        key: &ServicePortKey,
        wanted: &Service,
        report: &mut ReconcileReport,
    ) -> Result<(), DatapathError> {
        let id = wanted.id;
        let previous = datapath.installed_services().get(&id).cloned();
        datapath.put_service(wanted)?;
        for backend in &wanted.backends {
            *self.backend_refs.entry(*backend).or_default() += 1;
        }
        if let Some(previous) = previous {
            self.release(&previous.backends);
        }
        self.ids.insert(key.clone(), id);
        report.services_put += 1;
        datapath.set_service_name(id, &key.to_string())
    }

    /// The id of a backend, written to the map first if it is new or its flags changed.
    fn put_backend(
        &mut self,
        datapath: &mut Datapath,
        backend: &Backend,
        report: &mut ReconcileReport,
    ) -> Result<u32, DatapathError> {
        let id = match self.backend_ids.get(&identity(backend)) {
            Some(id) => *id,
            None => self
                .allocate_backend_id(datapath)
                .ok_or_else(|| DatapathError::MapFull {
                    // One id space for both families' backends maps.
                    map: match backend.family() {
                        Family::V4 => lb_common::map_names::BACKENDS4,
                        Family::V6 => lb_common::map_names::BACKENDS6,
                    },
                    capacity: limits::MAX_BACKENDS,
                    operation: format!("allocate a backend id for {backend:?}"),
                })?,
        };
        if datapath.installed_backends().get(&id) != Some(backend) {
            datapath.put_backend(id, backend)?;
            report.backends_put += 1;
            self.backend_ids.insert(identity(backend), id);
            if let std::collections::hash_map::Entry::Vacant(entry) = self.backend_refs.entry(id) {
                entry.insert(0);
                // Removed again at the end of the run if the service using it fails.
                self.released.push(id);
            }
        }
        Ok(id)
    }

    /// One reference less for each backend; those at zero are removed at the end of the run.
    fn release(&mut self, backends: &[u32]) {
        for id in backends {
            if let Some(refs) = self.backend_refs.get_mut(id) {
                *refs = refs.saturating_sub(1);
                if *refs == 0 {
                    self.released.push(*id);
                }
            }
        }
    }

    /// Every id in `ids` is installed (adopted ones are, new ones are only recorded once written),
    /// so the installed services are exactly the ids in use.
    fn allocate_service_id(&mut self, datapath: &Datapath) -> Option<u32> {
        let reserved = &self.reserved_ids;
        let id = next_free(&mut self.next_service_id, limits::MAX_SERVICES, |id| {
            datapath.installed_services().contains_key(&id) || reserved.contains(&id)
        })?;
        // Planned in this run, put later: no other Service port of the run may get it.
        self.reserved_ids.insert(id);
        Some(id)
    }

    fn allocate_backend_id(&mut self, datapath: &Datapath) -> Option<u32> {
        let refs = &self.backend_refs;
        next_free(&mut self.next_backend_id, limits::MAX_BACKENDS, |id| {
            datapath.installed_backends().contains_key(&id) || refs.contains_key(&id)
        })
    }
}

/// A service's selection table: each backend as many times as its weight, weights reduced by
/// their greatest common divisor and, when they still add up to more than
/// [`WEIGHTED_CELLS`] cells (or one per backend, if more), scaled down to that (every backend
/// keeping at least one cell): shares are kept within a cell or so, without a few weighted
/// Services filling the slot array and the Maglev tables that all Services share. Random
/// selection draws from the cells, and the Maglev table weighs each backend by its cells.
pub fn weighted_cells(backends: &[(u32, u32)]) -> Vec<u32> {
    let gcd = |mut a: u64, mut b: u64| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let divisor = backends
        .iter()
        .map(|(_, weight)| u64::from(*weight))
        .fold(0, gcd)
        .max(1);
    let mut cells: Vec<u64> = backends
        .iter()
        .map(|(_, weight)| u64::from(*weight) / divisor)
        .collect();
    let limit = (WEIGHTED_CELLS.max(backends.len()) as u64)
        .min(u64::from(limits::MAX_BACKENDS_PER_SERVICE));
    let total: u64 = cells.iter().sum();
    if total > limit {
        for count in &mut cells {
            *count = (*count * limit / total).max(1);
        }
        while cells.iter().sum::<u64>() > limit {
            if let Some(largest) = cells.iter_mut().max() {
                *largest -= 1;
            }
        }
    }
    backends
        .iter()
        .zip(cells)
        .flat_map(|((id, _), count)| std::iter::repeat_n(*id, count as usize))
        .collect()
}

/// The most cells a weighted service's selection table gets (more when it has more backends).
pub const WEIGHTED_CELLS: usize = 256;

fn unknown_key(id: u32) -> ServicePortKey {
    ServicePortKey {
        namespace: String::new(),
        name: format!("service-id-{id}"),
        port_name: String::new(),
        proto: 0,
        scope: Default::default(),
        family: Default::default(),
    }
}

/// The next id below `limit` for which `in_use` is false, scanning on from `cursor` and wrapping
/// around once: O(1) amortized while ids are handed out in order.
fn next_free(cursor: &mut u32, limit: u32, in_use: impl Fn(u32) -> bool) -> Option<u32> {
    for _ in 0..limit {
        let id = *cursor % limit;
        *cursor = (id + 1) % limit;
        if !in_use(id) {
            return Some(id);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(cells: &[u32]) -> BTreeMap<u32, usize> {
        let mut counts = BTreeMap::new();
        for id in cells {
            *counts.entry(*id).or_default() += 1;
        }
        counts
    }

    #[test]
    fn weighted_cells_repeat_each_backend_by_its_reduced_weight() {
        assert_eq!(weighted_cells(&[(7, 1), (8, 1)]), [7, 8]);
        assert_eq!(
            weighted_cells(&[(7, 90), (8, 10)]),
            [7, 7, 7, 7, 7, 7, 7, 7, 7, 8]
        );
        assert_eq!(
            counts(&weighted_cells(&[(1, 6), (2, 4), (3, 2)])),
            [(1, 3), (2, 2), (3, 1)].into()
        );
        assert!(weighted_cells(&[]).is_empty());
        // More than 256 cells: scaled down, every backend keeping a cell.
        let big: Vec<(u32, u32)> = (0..100).map(|id| (id, 997 + id % 2)).collect();
        let cells = weighted_cells(&big);
        assert!(cells.len() <= WEIGHTED_CELLS, "{}", cells.len());
        let counts = counts(&cells);
        assert_eq!(counts.len(), 100);
        assert!(counts.values().all(|&count| count == 2), "{counts:?}");
        let skewed = weighted_cells(&[(1, 1000), (2, 1), (3, 999)]);
        assert!(skewed.len() <= WEIGHTED_CELLS);
        assert!(skewed.contains(&2), "the lightest keeps a cell");
        let close = weighted_cells(&[(1, 1000), (2, 999)]);
        assert_eq!(
            (close.iter().filter(|&&id| id == 1).count(), close.len()),
            (128, 255),
            "1000:999 within a cell"
        );
        // More backends than 256: one cell each at least.
        let many: Vec<(u32, u32)> = (0..1000).map(|id| (id, 1 + id % 3)).collect();
        assert!(weighted_cells(&many).len() >= 1000);
    }
}
