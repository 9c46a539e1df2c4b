//! What the agent and the `lb` command show of the datapath and of themselves, to people and to
//! the systems that watch them: a read-only view of the pinned maps ([`inspect`]), printed by
//! `lb services`, `lb backends`, `lb conntrack` and `lb stats` ([`cli`]); `lb explain`, which
//! asks the running datapath what it would do with a packet ([`explain`]); the Prometheus
//! metrics ([`metrics`]) and the agent's HTTP endpoints, `/metrics`, `/healthz`, `/livez` and the
//! healthCheckNodePorts ([`serve`]); `lb monitor`, the datapath's events as they happen
//! ([`monitor`]). Nothing here writes to a map but the monitor, to the cell that turns the
//! programs' reports on while it runs.

pub mod cli;
pub mod explain;
pub mod inspect;
pub mod metrics;
pub mod monitor;
pub mod serve;
