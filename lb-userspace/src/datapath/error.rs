//! What can go wrong in the datapath, as [`DatapathError`].

use std::{io, path::PathBuf};

use aya::{maps::MapError, programs::ProgramError};

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("creating pin directory {path}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Bpffs(#[from] super::bpffs::BpffsError),
    #[error("loading the eBPF object (maps pinned under {pin_dir})")]
    Load {
        pin_dir: PathBuf,
        source: Box<aya::EbpfError>,
    },
    #[error("program {0} missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("opening the map pinned at {path} ({hint})")]
    OpenPin {
        path: PathBuf,
        /// What the failure most likely means, from the error and the pin directory.
        hint: &'static str,
        source: io::Error,
    },
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("program {program}: {operation}")]
    Program {
        program: &'static str,
        operation: String,
        source: Box<ProgramError>,
    },
    #[error("pinning program {program} at {path}")]
    PinProgram {
        program: &'static str,
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("pinning map {map} at {path}")]
    PinMap {
        map: &'static str,
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("link of {program} pinned at {path}")]
    Link {
        program: &'static str,
        path: PathBuf,
        source: Box<aya::programs::links::LinkError>,
    },
    #[error("pinning the link of {program} at {path}")]
    PinLink {
        program: &'static str,
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("removing the link of {program} pinned at {path}")]
    UnpinLink {
        program: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("interface name {0:?} contains a NUL byte")]
    InterfaceName(String),
    #[error("opening cgroup {path}")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("map {map}: {operation}")]
    Map {
        map: &'static str,
        operation: String,
        source: MapError,
    },
    #[error("map {map} is full ({capacity} entries): {operation}")]
    MapFull {
        map: &'static str,
        capacity: u32,
        operation: String,
    },
    #[error("map {map}: {operation}")]
    PerCpu {
        map: &'static str,
        operation: String,
        source: io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

pub(super) type Result<T, E = DatapathError> = std::result::Result<T, E>;

pub(super) fn map_error(map: &'static str, operation: &str, source: MapError) -> DatapathError {
    DatapathError::Map {
        map,
        operation: operation.to_owned(),
        source,
    }
}
