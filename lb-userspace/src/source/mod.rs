//! Sources of Kubernetes objects: the API server (`kube`) and YAML files (`file`). Both deliver
//! the same thing, a [`Snapshot`] of everything they know, so the agent, the tests and the demo
//! all run the same compile and reconcile path.

use std::{collections::BTreeSet, net::IpAddr, sync::Arc};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

pub mod file;
pub mod kube;

/// Every object a source knows at one instant. Sources publish a new snapshot after each burst
/// of changes (coalesced), never a half-applied one.
///
/// Objects are shared, not copied: a snapshot of 10k Services and their slices is a few hundred
/// kB of pointers, where a deep copy was about 70 MB and 75 ms per published change.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    /// This agent's own Node (its addresses serve NodePorts), when the source knows it.
    pub node: Option<Node>,
    /// The InternalIP and ExternalIP addresses of every Node the source knows (this one's
    /// too): a DSR option naming a NodePort must name one of them (`lb_common::dsr`).
    pub node_addresses: BTreeSet<IpAddr>,
}

/// A Node's InternalIP and ExternalIP addresses, as NodePorts are served on them.
pub fn addresses_of(node: &Node) -> impl Iterator<Item = IpAddr> + '_ {
    node.status
        .iter()
        .filter_map(|status| status.addresses.as_ref())
        .flatten()
        .filter(|address| address.type_ == "InternalIP" || address.type_ == "ExternalIP")
        .filter_map(|address| address.address.parse().ok())
}
