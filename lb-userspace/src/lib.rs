//! The agent's library: everything `lb` does, usable from the integration tests and benchmarks.

pub mod agent;
pub mod compile;
pub mod counter;
pub mod datapath;
pub mod explain;
pub mod inspect;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod object;
pub mod orphans;
pub mod reconcile;
pub mod route;
pub mod serve;
pub mod sock_diag;
pub mod source;
pub mod testrun;
