//! What the endpoint's node needs to take a DSR option (`lb_common::dsr`): the pairs of a
//! frontend and a local endpoint of one Service an option may name (`lb4_dsradm_v1`), and the
//! cluster's Node addresses a NodePort's option must name (`lb4_nodes_v1`). The datapath takes
//! options whatever `--nodeport-mode` this node sends with, so that the cluster's nodes can move
//! to DSR one at a time once every node runs a datapath that takes them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use aya::maps::{HashMap, MapData};
use lb_common::{
    backend_flags,
    dsr::{ANY_NODE, Admission4Key, AdmissionValue},
    map_names, proto, scope, service_flags,
};

use super::{
    InstalledService,
    error::{Result, map_error},
};
use crate::compile::model::{Backend, FrontendKey};

/// The two maps, and what they hold.
pub(super) struct DirectReturn {
    admissions: HashMap<MapData, Admission4Key, AdmissionValue>,
    /// The admissions written for each service, as the map holds them.
    by_service: BTreeMap<u32, BTreeMap<Admission4Key, AdmissionValue>>,
    nodes: HashMap<MapData, u32, u32>,
    node_addresses: BTreeSet<u32>,
}

impl DirectReturn {
    /// Takes the maps of a load: the admissions map is new and empty (not pinned) and gets every
    /// installed service's before any program of the load is attached; the node addresses an
    /// earlier agent pinned stay until the first [`DirectReturn::set_node_addresses`].
    pub(super) fn new(
        admissions: HashMap<MapData, Admission4Key, AdmissionValue>,
        nodes: HashMap<MapData, u32, u32>,
        installed: &BTreeMap<u32, InstalledService>,
        backends: &BTreeMap<u32, Backend>,
    ) -> Result<Self> {
        let node_addresses = nodes
            .keys()
            .collect::<std::result::Result<_, _>>()
            .map_err(|source| map_error(map_names::NODES4, "read", source))?;
        let mut direct_return = Self {
            admissions,
            by_service: BTreeMap::new(),
            nodes,
            node_addresses,
        };
        for (id, service) in installed {
            direct_return.update_service(*id, Some(service), backends)?;
        }
        Ok(direct_return)
    }

    /// Brings service `id`'s admissions in line with the service as installed now (None:
    /// removed): the new pairs written first, then the pairs it no longer has removed.
    pub(super) fn update_service(
        &mut self,
        id: u32,
        installed: Option<&InstalledService>,
        backends: &BTreeMap<u32, Backend>,
    ) -> Result<()> {
        let wanted = installed.map_or_else(BTreeMap::new, |service| {
            admissions_of(id, service, backends)
        });
        let had = self.by_service.remove(&id).unwrap_or_default();
        for (key, value) in &wanted {
            if had.get(key) != Some(value) {
                self.admissions
                    .insert(key, value, 0)
                    .map_err(|source| map_error(map_names::DSR_ADMISSIONS4, "insert", source))?;
            }
        }
        for key in had.keys().filter(|key| !wanted.contains_key(key)) {
            self.admissions
                .remove(key)
                .map_err(|source| map_error(map_names::DSR_ADMISSIONS4, "remove", source))?;
        }
        if !wanted.is_empty() {
            self.by_service.insert(id, wanted);
        }
        Ok(())
    }

    /// Makes the node-address map hold `addresses` (their IPv4 ones) and nothing else.
    pub(super) fn set_node_addresses(&mut self, addresses: &BTreeSet<IpAddr>) -> Result<()> {
        let wanted: BTreeSet<u32> = addresses
            .iter()
            .filter_map(|addr| match addr {
                IpAddr::V4(addr) => Some(u32::from(*addr)),
                IpAddr::V6(_) => None,
            })
            .collect();
        for addr in wanted.difference(&self.node_addresses) {
            self.nodes
                .insert(addr, &1, 0)
                .map_err(|source| map_error(map_names::NODES4, "insert", source))?;
        }
        for addr in self.node_addresses.difference(&wanted) {
            self.nodes
                .remove(addr)
                .map_err(|source| map_error(map_names::NODES4, "remove", source))?;
        }
        self.node_addresses = wanted;
        Ok(())
    }

    /// The node addresses the map holds.
    pub(super) fn node_addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.node_addresses.iter().map(|addr| Ipv4Addr::from(*addr))
    }

    /// How many pairs the admissions map holds.
    pub(super) fn admission_count(&self) -> usize {
        self.by_service.values().map(BTreeMap::len).sum()
    }
}

/// The pairs a DSR option may name for service `id`: each of its IPv4 TCP frontends that
/// clients outside reach (a NodePort on any node's address, each externalIP and LoadBalancer
/// IP) with each of its endpoints on this node. None for a Local traffic policy's service
/// (whose flows never leave the node they arrive at) or the entries for this node's own clients.
pub(super) fn admissions_of(
    id: u32,
    service: &InstalledService,
    backends: &BTreeMap<u32, Backend>,
) -> BTreeMap<Admission4Key, AdmissionValue> {
    let local_endpoints: BTreeSet<(u32, u32, u16)> = service
        .backends
        .iter()
        .filter_map(|backend_id| {
            let backend = backends.get(backend_id)?;
            match backend.addr {
                IpAddr::V4(addr)
                    if backend.proto == proto::TCP && backend.flags & backend_flags::LOCAL != 0 =>
                {
                    Some((*backend_id, u32::from(addr), backend.port))
                }
                _ => None,
            }
        })
        .collect();
    let mut admissions = BTreeMap::new();
    for (key, flags) in &service.frontends {
        let FrontendKey::V4(key) = key else {
            continue;
        };
        if key.proto != proto::TCP
            || key.scope != scope::ANY
            || flags & (service_flags::LOCAL_ONLY | service_flags::FOR_NODE_CLIENTS) != 0
        {
            continue;
        }
        let frontend_addr = if flags & service_flags::NODE_PORT != 0 {
            ANY_NODE
        } else if flags & (service_flags::EXTERNAL_IP | service_flags::LOAD_BALANCER) != 0 {
            u32::from_be(key.addr)
        } else {
            continue;
        };
        for &(backend_id, endpoint_addr, endpoint_port) in &local_endpoints {
            admissions.insert(
                Admission4Key {
                    frontend_addr,
                    endpoint_addr,
                    frontend_port: u16::from_be(key.port),
                    endpoint_port,
                    proto: proto::TCP,
                    _pad: [0; 3],
                },
                AdmissionValue {
                    service_id: id,
                    backend_id,
                },
            );
        }
    }
    admissions
}

#[cfg(test)]
mod tests {
    use lb_common::Frontend4Key;

    use super::*;

    fn frontend(addr: [u8; 4], port: u16, proto: u8, scope: u8) -> FrontendKey {
        FrontendKey::V4(Frontend4Key {
            addr: u32::from(Ipv4Addr::from(addr)).to_be(),
            port: port.to_be(),
            proto,
            scope,
        })
    }

    fn backend(addr: [u8; 4], port: u16, proto: u8, flags: u8) -> Backend {
        Backend {
            addr: IpAddr::from(addr),
            port,
            proto,
            flags,
        }
    }

    fn key(frontend: u32, port: u16, endpoint: [u8; 4], endpoint_port: u16) -> Admission4Key {
        Admission4Key {
            frontend_addr: frontend,
            endpoint_addr: u32::from(Ipv4Addr::from(endpoint)),
            frontend_port: port,
            endpoint_port,
            proto: proto::TCP,
            _pad: [0; 3],
        }
    }

    #[test]
    fn a_service_admits_its_outside_frontends_with_its_local_endpoints_only() {
        let backends = BTreeMap::from([
            (
                1,
                backend([10, 244, 1, 5], 8080, proto::TCP, backend_flags::LOCAL),
            ),
            (2, backend([10, 244, 2, 5], 8080, proto::TCP, 0)),
        ]);
        let service = InstalledService {
            backends: vec![1, 2],
            frontends: BTreeMap::from([
                (
                    frontend([10, 96, 0, 10], 80, proto::TCP, scope::ANY),
                    service_flags::CLUSTER_IP,
                ),
                (
                    frontend([192, 168, 1, 2], 30080, proto::TCP, scope::ANY),
                    service_flags::NODE_PORT,
                ),
                (
                    frontend([192, 168, 1, 3], 30080, proto::TCP, scope::ANY),
                    service_flags::NODE_PORT,
                ),
                (
                    frontend([203, 0, 113, 7], 80, proto::TCP, scope::ANY),
                    service_flags::LOAD_BALANCER,
                ),
                (
                    frontend([198, 51, 100, 9], 80, proto::TCP, scope::ANY),
                    service_flags::EXTERNAL_IP,
                ),
            ]),
            ..Default::default()
        };
        let admissions = admissions_of(7, &service, &backends);
        let value = AdmissionValue {
            service_id: 7,
            backend_id: 1,
        };
        assert_eq!(
            admissions,
            BTreeMap::from([
                (key(ANY_NODE, 30080, [10, 244, 1, 5], 8080), value),
                (key(0xcb00_7107, 80, [10, 244, 1, 5], 8080), value),
                (key(0xc633_6409, 80, [10, 244, 1, 5], 8080), value),
            ])
        );
    }

    #[test]
    fn local_policies_other_protocols_and_node_client_entries_admit_nothing() {
        let backends = BTreeMap::from([
            (
                1,
                backend([10, 244, 1, 5], 8080, proto::TCP, backend_flags::LOCAL),
            ),
            (
                2,
                backend([10, 244, 1, 6], 53, proto::UDP, backend_flags::LOCAL),
            ),
        ]);
        let service = |frontends: Vec<(FrontendKey, u32)>, backends: Vec<u32>| InstalledService {
            backends,
            frontends: frontends.into_iter().collect(),
            ..Default::default()
        };
        let cases = [
            service(
                vec![(
                    frontend([192, 168, 1, 2], 30080, proto::TCP, scope::ANY),
                    service_flags::NODE_PORT | service_flags::LOCAL_ONLY,
                )],
                vec![1],
            ),
            service(
                vec![(
                    frontend([192, 168, 1, 2], 30053, proto::UDP, scope::ANY),
                    service_flags::NODE_PORT,
                )],
                vec![2],
            ),
            service(
                vec![(
                    frontend([192, 168, 1, 2], 30080, proto::TCP, scope::NODE_CLIENTS),
                    service_flags::NODE_PORT | service_flags::FOR_NODE_CLIENTS,
                )],
                vec![1],
            ),
        ];
        for case in cases {
            assert_eq!(
                admissions_of(7, &case, &backends),
                BTreeMap::new(),
                "{case:?}"
            );
        }
    }
}
