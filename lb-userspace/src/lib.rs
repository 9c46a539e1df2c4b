//! The agent's library: everything `lb` does, usable from the integration tests and benchmarks.

pub mod agent;
pub mod compile;
pub mod datapath;
pub mod explain;
pub mod inspect;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod orphans;
pub mod reconcile;
pub mod route;
pub mod serve;
pub mod source;
