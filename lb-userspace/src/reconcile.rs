//! reconcile(desired, datapath): brings the maps to the desired state with the fewest updates,
//! in an order that never drops a packet:
//!
//! 1. backends that are new or changed are written (nothing references them yet);
//! 2. services that are new or changed are written (each one's new slot table, then its
//!    frontends flipped to it: see `Datapath::put_service`);
//! 3. services no longer desired are removed (frontends first);
//! 4. backends nothing references any more are removed.
//!
//! It is idempotent (a second run changes nothing) and restart-safe: it reads what the pinned
//! maps hold through the datapath's index, keeps the ids of services and backends that are
//! already there, and never touches connection tracking, so flows survive an agent restart.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{Frontend4Key, limits};

use crate::{
    compile::{Desired, DesiredService, ServicePortKey},
    datapath::{Backend, Datapath, DatapathError, Service},
};

/// Remembers which service id belongs to which Service port between syncs. After a restart it
/// starts empty and adopts the ids the maps hold by matching frontends.
#[derive(Debug, Default)]
pub struct Reconciler {
    ids: BTreeMap<ServicePortKey, u32>,
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
}

impl ReconcileReport {
    /// Map updates made (a service update counts once).
    pub fn changes(&self) -> usize {
        self.backends_put + self.backends_removed + self.services_put + self.services_removed
    }
}

/// A backend's identity: what an endpoint is, apart from its flags.
type BackendIdentity = (std::net::Ipv4Addr, u16, u8);

fn identity(backend: &Backend) -> BackendIdentity {
    (backend.addr, backend.port, backend.proto)
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

    pub fn reconcile(&mut self, datapath: &mut Datapath, desired: &Desired) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        self.forget_vanished(datapath);
        self.adopt_installed(datapath, desired);

        // 1. Backends.
        let mut backend_ids: BTreeMap<BackendIdentity, u32> = datapath
            .installed_backends()
            .iter()
            .map(|(id, backend)| (identity(backend), *id))
            .collect();
        let wanted: BTreeMap<BackendIdentity, Backend> = desired
            .services
            .values()
            .flat_map(|service| service.backends.iter())
            .map(|backend| (identity(backend), *backend))
            .collect();
        let mut failed_backends = BTreeSet::new();
        let mut free_backend_ids =
            IdAllocator::new(backend_ids.values().copied(), limits::MAX_BACKENDS);
        for (identity, backend) in &wanted {
            let id = match backend_ids.get(identity) {
                Some(id) => *id,
                None => match free_backend_ids.next() {
                    Some(id) => id,
                    None => {
                        failed_backends.insert(*identity);
                        continue;
                    }
                },
            };
            if datapath.installed_backends().get(&id) == Some(backend) {
                backend_ids.insert(*identity, id);
                continue;
            }
            match datapath.put_backend(id, backend) {
                Ok(()) => {
                    backend_ids.insert(*identity, id);
                    report.backends_put += 1;
                }
                Err(_) => {
                    failed_backends.insert(*identity);
                }
            }
        }

        // 2. Services new or changed.
        let mut free_service_ids = IdAllocator::new(
            self.ids
                .values()
                .copied()
                .chain(datapath.installed_services().keys().copied()),
            limits::MAX_SERVICES,
        );
        for (key, service) in &desired.services {
            let result = self.put_service(
                datapath,
                key,
                service,
                &backend_ids,
                &failed_backends,
                &mut free_service_ids,
            );
            match result {
                Ok(true) => report.services_put += 1,
                Ok(false) => {}
                Err(error) => report.errors.push((key.clone(), error)),
            }
        }

        // 3. Services no longer desired (a held Service keeps what it had).
        let held_ids: BTreeSet<u32> = self
            .ids
            .iter()
            .filter(|(key, _)| {
                desired
                    .held
                    .contains(&(key.namespace.clone(), key.name.clone()))
            })
            .map(|(_, id)| *id)
            .collect();
        let wanted_ids: BTreeSet<u32> = desired
            .services
            .keys()
            .filter_map(|key| self.ids.get(key).copied())
            .chain(held_ids)
            .collect();
        let stale: Vec<u32> = datapath
            .installed_services()
            .keys()
            .filter(|id| !wanted_ids.contains(id))
            .copied()
            .collect();
        for id in stale {
            match datapath.remove_service(id) {
                Ok(()) => {
                    report.services_removed += 1;
                    self.ids.retain(|_, known| *known != id);
                }
                Err(error) => {
                    let key = self.key_of(id);
                    report.errors.push((key, error));
                }
            }
        }

        // 4. Backends nothing references.
        let referenced: BTreeSet<u32> = datapath
            .installed_services()
            .values()
            .flat_map(|service| service.backends.iter().copied())
            .collect();
        let unreferenced: Vec<u32> = datapath
            .installed_backends()
            .keys()
            .filter(|id| !referenced.contains(id))
            .copied()
            .collect();
        for id in unreferenced {
            if datapath.remove_backend(id).is_ok() {
                report.backends_removed += 1;
            }
        }
        report
    }

    /// Writes one service if the maps do not hold it exactly; Ok(true) when it wrote.
    fn put_service(
        &mut self,
        datapath: &mut Datapath,
        key: &ServicePortKey,
        service: &DesiredService,
        backend_ids: &BTreeMap<BackendIdentity, u32>,
        failed_backends: &BTreeSet<BackendIdentity>,
        free_ids: &mut IdAllocator,
    ) -> Result<bool, DatapathError> {
        let id = match self.ids.get(key) {
            Some(id) => *id,
            None => free_ids.next().ok_or_else(|| DatapathError::MapFull {
                map: lb_common::map_names::SERVICE_COUNTERS,
                capacity: limits::MAX_SERVICES,
                operation: format!("allocate a service id for {key}"),
            })?,
        };
        if let Some(missing) = service
            .backends
            .iter()
            .find(|b| failed_backends.contains(&identity(b)))
        {
            return Err(DatapathError::Invalid(format!(
                "backend {missing:?} could not be written"
            )));
        }
        let backends: Vec<u32> = service
            .backends
            .iter()
            .filter_map(|b| backend_ids.get(&identity(b)).copied())
            .collect();
        let wanted = Service {
            id,
            frontends: service.frontends.iter().copied().collect(),
            backends,
            affinity_timeout_s: service.affinity_timeout_s,
        };
        if let Some(installed) = datapath.installed_services().get(&id)
            && installed.backends == wanted.backends
            && installed.affinity_timeout_s == wanted.affinity_timeout_s
            && installed.frontends == frontend_flags(&wanted)
        {
            self.ids.insert(key.clone(), id);
            return Ok(false);
        }
        datapath.put_service(&wanted)?;
        self.ids.insert(key.clone(), id);
        Ok(true)
    }

    /// Drops ids whose service is gone from the maps (removed by someone else, or never written).
    fn forget_vanished(&mut self, datapath: &Datapath) {
        let installed = datapath.installed_services();
        self.ids.retain(|_, id| installed.contains_key(id));
    }

    /// After a restart: a desired Service port whose frontends are installed under some id takes
    /// that id, so nothing is rewritten and counters keep counting.
    fn adopt_installed(&mut self, datapath: &Datapath, desired: &Desired) {
        let owners: BTreeMap<Frontend4Key, u32> = datapath
            .installed_services()
            .iter()
            .flat_map(|(id, service)| service.frontends.keys().map(move |key| (*key, *id)))
            .collect();
        let taken: BTreeSet<u32> = self.ids.values().copied().collect();
        for (key, service) in &desired.services {
            if self.ids.contains_key(key) {
                continue;
            }
            if let Some(id) = service
                .frontends
                .iter()
                .find_map(|frontend| owners.get(&frontend.key()))
                && !taken.contains(id)
                && !self.ids.values().any(|known| known == id)
            {
                self.ids.insert(key.clone(), *id);
            }
        }
    }

    fn key_of(&self, id: u32) -> ServicePortKey {
        self.ids
            .iter()
            .find(|(_, known)| **known == id)
            .map(|(key, _)| key.clone())
            .unwrap_or_else(|| ServicePortKey {
                namespace: String::new(),
                name: format!("service-id-{id}"),
                port_name: String::new(),
                proto: 0,
            })
    }
}

fn frontend_flags(service: &Service) -> BTreeMap<Frontend4Key, u32> {
    let mut flags = BTreeMap::new();
    for frontend in &service.frontends {
        *flags.entry(frontend.key()).or_insert(0) |= frontend.kind;
    }
    flags
}

/// Hands out the ids below a limit that are not in use, smallest first, in O(1) amortized.
struct IdAllocator {
    used: BTreeSet<u32>,
    cursor: u32,
    limit: u32,
}

impl IdAllocator {
    fn new(in_use: impl Iterator<Item = u32>, limit: u32) -> Self {
        Self {
            used: in_use.collect(),
            cursor: 0,
            limit,
        }
    }

    fn next(&mut self) -> Option<u32> {
        while self.cursor < self.limit {
            let id = self.cursor;
            self.cursor += 1;
            if self.used.insert(id) {
                return Some(id);
            }
        }
        None
    }
}
