//! compile(snapshot, node): Kubernetes objects in, the datapath's desired contents out. A pure
//! function (no I/O, no clock), so every row of the Service contract is a table test.
//!
//! What it implements (kube-proxy's behaviour):
//! - one desired service per Service port (multi-port Services give several), with frontends for
//!   the ClusterIP(s), every node address:nodePort (NodePort and LoadBalancer types), every
//!   externalIP, every LoadBalancer ingress IP (but those in `ipMode: Proxy`, KEP-1860, which
//!   traffic must reach through the load balancer);
//! - backends from every EndpointSlice labelled `kubernetes.io/service-name`, the port resolved
//!   per slice by port name (named target ports may differ per endpoint), endpoints deduplicated
//!   by address (a duplicate is LOCAL if any copy is, TERMINATING only if all are), flagged
//!   LOCAL when their nodeName is this node, or, without a nodeName, when the node's routes put
//!   their address on this node ([`model::NodeContext::routed_local`]);
//! - ready endpoints; when none is ready, the serving and terminating ones (KEP-1669);
//! - traffic policies: a Local policy gets the local endpoints (the serving terminating ones
//!   when none of them is ready, whatever other nodes have), and rejects as a Cluster policy
//!   does when the port has no endpoint anywhere; the external frontends of an
//!   externalTrafficPolicy Local Service also get entries for this node's own clients in the
//!   internal-policy service (kube-proxy's short-circuit: no client address to preserve);
//! - for a Cluster traffic policy, the endpoints' topology hints (trafficDistribution and the
//!   topology-mode annotation): the endpoints hinted for this node when every ready endpoint
//!   has node hints and one is for this node, else those hinted for this node's zone (its
//!   Node's `topology.kubernetes.io/zone`) when every ready endpoint has zone hints and one is
//!   for that zone, else all;
//! - headless and ExternalName Services ignored;
//! - IPv6 and dual-stack: a Service is served in the families of its `clusterIPs`, one desired
//!   service per family with that family's EndpointSlices, addresses and source ranges;
//! - sessionAffinity ClientIP with its timeout (default 10800 s);
//! - endpoint weights from the `lb.io/endpoint-weights` annotation (by address, pod name or
//!   pod-name prefix), beyond kube-proxy: each backend's share of new flows;
//! - node-local health checks (`lb.io/health-check`, [`health_check`]), beyond kube-proxy: a
//!   local endpoint this node's probes hold as failed leaves the selection tables, unless every
//!   endpoint of a table would (fail open);
//! - externalIPs only inside `--external-ip-cidrs` when it is given (the others skipped with a
//!   problem);
//! - one owner per frontend (address, port, protocol) when several Services claim it: see
//!   `Claim` in `incremental`. The others are skipped for that frontend only, with a problem
//!   naming the owner.
//!
//! Bad input never takes down anything else: an invalid Service is skipped as a whole with a
//! [`model::Problem`] (and stays "held": the agent keeps what it installed for it before), an
//! invalid endpoint or slice is skipped alone.
//!
//! The stage in files: [`model`] holds the values it takes and gives, which reconcile and the
//! datapath use too; `service` compiles one Service and its endpoints; `incremental` keeps the
//! desired state in step with each new snapshot ([`Compiler`]) and settles which Service owns a
//! frontend that several claim.

pub mod health_check;
mod incremental;
pub mod model;
mod service;

pub use incremental::{
    Changes, Compiler, SERVICE_NAME_LABEL, TRIGGER_TIME_ANNOTATION, Update, compile,
};
pub use service::{
    DEFAULT_AFFINITY_TIMEOUT_S, ENDPOINT_WEIGHTS_ANNOTATION, LOAD_BALANCING_ANNOTATION,
    MAX_ENDPOINT_WEIGHT, held_cluster_ips, unsupported_value,
};
