//! The agent's library: everything `lb` does, usable from the integration tests and benchmarks.

pub mod agent;
pub mod compile;
pub mod datapath;
pub mod duration;
pub mod kube_proxy_config;
pub mod logging;
pub mod node;
pub mod observe;
pub mod orphans;
pub mod probe;
pub mod reconcile;
pub mod route;
pub mod source;
