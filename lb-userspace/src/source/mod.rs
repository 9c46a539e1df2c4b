//! Sources of Kubernetes objects: the API server (`kube`) and YAML files (`file`). Both deliver
//! the same thing, a [`Snapshot`] of everything they know, so the agent, the tests and the demo
//! all run the same compile and reconcile path.

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

pub mod file;
pub mod kube;

/// Every object a source knows at one instant. Sources publish a new snapshot after each burst
/// of changes (coalesced), never a half-applied one.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    /// This agent's own Node (its addresses serve NodePorts), when the source knows it.
    pub node: Option<Node>,
}
