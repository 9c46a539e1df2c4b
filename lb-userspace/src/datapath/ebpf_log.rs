//! The programs' debug logging (aya-log): compiled into the object, and off unless the agent
//! is started with `--ebpf-log-level`. The level is a read-only global of the object, fixed at
//! load, so at `off` the verifier proves every logging branch dead and removes it: the
//! programs run as if it were not there. At another level the agent forwards the records to its
//! own log (target `lb::ebpf`).

use aya::{Ebpf, EbpfLoader};
use aya_log::EbpfLogger;
use clap::ValueEnum;

/// `--ebpf-log-level`: the most verbose level the programs log at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum EbpfLogLevel {
    /// Nothing (the logging code is removed at load).
    #[default]
    Off,
    Error,
    Warn,
    Info,
    /// Rare paths of the datapath (drops with their event index, Maglev fallbacks): as many
    /// records as drops, so meant for debugging, not for a busy node.
    Debug,
    Trace,
}

impl EbpfLogLevel {
    /// The value of aya-log's `AYA_LOG_LEVEL` global: a record is logged when its level is at
    /// most this (aya_log_common::Level: Error = 1 .. Trace = 5).
    fn global(self) -> u8 {
        match self {
            Self::Off => 0,
            Self::Error => 1,
            Self::Warn => 2,
            Self::Info => 3,
            Self::Debug => 4,
            Self::Trace => 5,
        }
    }
}

/// Sets the level of an object about to be loaded.
pub fn set_level(loader: &mut EbpfLoader<'_>, level: EbpfLogLevel) {
    static LEVELS: [u8; 6] = [0, 1, 2, 3, 4, 5];
    let value = &LEVELS[usize::from(level.global())];
    // must_exist: were the global renamed (an aya-log upgrade), the programs would log at its
    // default, everything, into a ring buffer nobody reads; better to fail the load.
    loader.override_global(aya_log::LEVEL, value, true);
}

/// The reader of a loaded object's records, forwarding them to the agent's log.
pub type Forwarder = EbpfLogger<ToTracing>;

/// Takes the object's log ring buffer for a [`Forwarder`].
pub fn forwarder(ebpf: &mut Ebpf) -> Result<Forwarder, aya_log::Error> {
    EbpfLogger::init_with_logger(ebpf, ToTracing)
}

/// `log` records (aya-log's interface) into `tracing` events, the agent's log.
pub struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "lb::ebpf", "{message}"),
            log::Level::Warn => tracing::warn!(target: "lb::ebpf", "{message}"),
            log::Level::Info => tracing::info!(target: "lb::ebpf", "{message}"),
            log::Level::Debug => tracing::debug!(target: "lb::ebpf", "{message}"),
            log::Level::Trace => tracing::trace!(target: "lb::ebpf", "{message}"),
        }
    }

    fn flush(&self) {}
}
