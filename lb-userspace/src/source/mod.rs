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
    /// The names of the Nodes whose lb takes DSR options since they last booted
    /// ([`takes_direct_return`]): endpoints there may be sent flows by direct server return.
    pub direct_return_nodes: BTreeSet<String>,
}

/// The annotation an agent writes on its own Node once its XDP program, which takes DSR
/// options, is attached: the Node's boot ID at the time (`/proc/sys/kernel/random/boot_id`,
/// which the kubelet reports as `status.nodeInfo.bootID`).
pub const DIRECT_RETURN_MARK: &str = "lb.io/dsr-boot-id";

/// Whether a Node's lb takes DSR options: its mark names the boot the Node is in. After a
/// reboot, which can start pods before lb, the mark is stale until lb writes it again.
pub fn takes_direct_return(node: &Node) -> bool {
    let boot_id = node
        .status
        .as_ref()
        .and_then(|status| status.node_info.as_ref())
        .map(|info| info.boot_id.as_str());
    matches!((direct_return_mark(node), boot_id), (Some(mark), Some(boot)) if !boot.is_empty() && mark == boot)
}

/// The boot ID a Node's DSR mark ([`DIRECT_RETURN_MARK`]) names, if it has one.
pub fn direct_return_mark(node: &Node) -> Option<&str> {
    node.metadata
        .annotations
        .as_ref()?
        .get(DIRECT_RETURN_MARK)
        .map(String::as_str)
}

/// The names of the Nodes of `nodes` that take DSR options.
pub fn direct_return_nodes<'a>(nodes: impl Iterator<Item = &'a Node>) -> BTreeSet<String> {
    nodes
        .filter(|node| takes_direct_return(node))
        .filter_map(|node| node.metadata.name.clone())
        .collect()
}

/// A Node's primary address of each family, as kube-proxy picks its node IPs: the family's
/// first InternalIP, else its first ExternalIP.
pub fn primary_addresses(node: &Node) -> Vec<IpAddr> {
    let of_type = |wanted: &'static str| {
        node.status
            .iter()
            .filter_map(|status| status.addresses.as_ref())
            .flatten()
            .filter(move |address| address.type_ == wanted)
            .filter_map(|address| address.address.parse::<IpAddr>().ok())
    };
    first_of_each_family(of_type("InternalIP").chain(of_type("ExternalIP")))
}

/// The first address of each family among `addresses`, in their order.
pub fn first_of_each_family(addresses: impl IntoIterator<Item = IpAddr>) -> Vec<IpAddr> {
    let mut first: Vec<IpAddr> = Vec::new();
    for addr in addresses {
        if first.iter().all(|kept| kept.is_ipv4() != addr.is_ipv4()) {
            first.push(addr);
        }
    }
    first
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
