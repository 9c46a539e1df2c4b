//! The service datapath: loads the programs, pins their maps, attaches them to NICs and a cgroup,
//! and puts and removes services and backends in the maps.
//!
//! Maps are pinned by name under the pin directory (`/sys/fs/bpf/lb` for the agent, a private
//! directory per test), so a restarted agent finds the state the datapath kept using meanwhile.
//! Programs are pinned there too, and so are the attachments, as bpf_links under `links/`: they
//! outlive the agent, and a new one swaps its programs into them (BPF_LINK_UPDATE).
//!
//! [`Datapath`] is defined here with its errors; its work is in three files: `load` (load and
//! pin the programs, take the maps, attach to NICs and a cgroup), `write` (put and remove
//! services and backends, the node's settings) and `read` (what the maps hold, with the readers
//! the read-only inspection shares).

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
};

use aya::{
    Ebpf,
    maps::{Array, DevMapHash, HashMap, MapData, MapError, PerCpuArray, lpm_trie::LpmTrie},
    programs::ProgramError,
};
use lb_common::{
    Affinity4Key, AffinityValue, Backend4, Ct4Key, Ct4Value, DatapathConfig, Frontend4Key, NicMac,
    SERVICE_NAME_LEN, ServiceCounter, ServiceValue, Slot, SockNat4Key, SockNat4Value, SourceRange4,
};

use crate::compile::model::Backend;

pub mod bpf_link;
pub mod bpf_obj;
pub mod bpffs;
pub mod counter;
mod load;
pub mod maglev;
pub mod nic;
pub mod object;
pub mod pins;
mod read;
pub mod slot_ranges;
pub mod sock_diag;
pub mod testrun;
mod write;

pub(crate) use read::{
    read_backends, read_events, read_installed, read_service_counter, read_service_names,
};
use slot_ranges::SlotRanges;
use write::FrontendFilter;
pub use write::frontend_flags;

/// Where the agent pins its maps and programs.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("creating pin directory {path}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Bpffs(#[from] bpffs::BpffsError),
    #[error("loading the eBPF object (maps pinned under {pin_dir})")]
    Load {
        pin_dir: PathBuf,
        source: Box<aya::EbpfError>,
    },
    #[error("program {0} missing from the eBPF object")]
    MissingProgram(&'static str),
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

type Result<T, E = DatapathError> = std::result::Result<T, E>;

/// The loaded datapath. Dropping it detaches what it attached; pinned maps stay.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    frontends: HashMap<MapData, Frontend4Key, ServiceValue>,
    /// The frontend filter as XDP reads it, and how many frontends have each bit.
    frontend_filter: FrontendFilter,
    slots: Array<MapData, Slot>,
    /// The cells of `slots` no installed table uses.
    slot_ranges: SlotRanges,
    backends: HashMap<MapData, u32, Backend4>,
    conntrack: HashMap<MapData, Ct4Key, Ct4Value>,
    service_counters: PerCpuArray<MapData, ServiceCounter>,
    events: PerCpuArray<MapData, u64>,
    config: Array<MapData, DatapathConfig>,
    nic_macs: Array<MapData, NicMac>,
    /// The ifindex each slot of `nic_macs` was asked for; 0 where two NICs share it.
    nic_slots: BTreeMap<u32, u32>,
    tx_ports: DevMapHash<MapData>,
    maglev: Array<MapData, u32>,
    source_ranges: LpmTrie<MapData, SourceRange4, u8>,
    affinity: HashMap<MapData, Affinity4Key, AffinityValue>,
    sock_nat: HashMap<MapData, SockNat4Key, SockNat4Value>,
    service_names: HashMap<MapData, u32, ServiceName>,
    /// UDP backends that left a service since the last
    /// [`Datapath::abort_udp_sockets_of_departed_backends`]: sockets connected to them through
    /// the service are aborted then.
    departed_udp: BTreeSet<DepartedBackend>,
    /// The names the service-names map holds (mirrors it, so an unchanged name costs no syscall).
    names: BTreeMap<u32, String>,
    /// What the maps hold, read once at load (they may hold an earlier run's state), then kept in
    /// step by every update: an update costs O(its own size), and reconcile diffs against it.
    installed: BTreeMap<u32, InstalledService>,
    /// Which service owns each frontend (a frontend belongs to one service).
    owners: BTreeMap<Frontend4Key, u32>,
    installed_backends: BTreeMap<u32, Backend>,
}

/// A UDP backend that left a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct DepartedBackend {
    service_id: u32,
    backend: SocketAddrV4,
}

/// A service as the maps hold it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstalledService {
    /// The first cell of the service's table in the slot array (0: no table).
    pub slots: u32,
    /// Backend ids in slot order.
    pub backends: Vec<u32>,
    /// Frontend keys with their [`lb_common::service_flags`] (kind and policy bits).
    pub frontends: BTreeMap<Frontend4Key, u32>,
    pub affinity_timeout_s: u32,
    pub source_ranges: BTreeSet<(Ipv4Addr, u8)>,
    /// The Maglev lookup table in use, for a service with MAGLEV.
    pub maglev_table: Option<u32>,
}

/// A service name as the service-names map stores it.
pub type ServiceName = [u8; SERVICE_NAME_LEN];

fn map_error(map: &'static str, operation: &str, source: MapError) -> DatapathError {
    DatapathError::Map {
        map,
        operation: operation.to_owned(),
        source,
    }
}
