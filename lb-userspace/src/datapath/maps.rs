//! The maps the agent and the read-only inspection both read, opened one way: by name from the
//! pin directory, through a descriptor with the access the caller needs. The agent opens them
//! read-write after loading its programs (which pin them or reuse the pins); `lb services`,
//! `lb conntrack`, `/metrics` and the rest open them read-only.

use std::path::Path;

use aya::maps::{Array, ArrayOfMaps, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray};
use lb_common::{
    Affinity4Key, AffinityValue, Backend4, Backend6, Ct4Key, Ct4Value, Ct6Key, Ct6Value,
    Datapath6Config, DatapathConfig, FlowCacheGate, Frontend4Key, Frontend6Key, ServiceCounter,
    ServiceValue, Slot, SockNat4Key, SockNat4Value, SockNat6Key, SockNat6Value, SourceRange4,
    SourceRange6, map_names,
};

use super::{
    ServiceName,
    bpf_obj::{Access, open_pinned},
    error::{DatapathError, Result, map_error},
};

/// The state maps of one pin directory.
pub struct Maps {
    pub frontends: HashMap<MapData, Frontend4Key, ServiceValue>,
    pub slots: Array<MapData, Slot>,
    pub backends: Array<MapData, Backend4>,
    pub conntrack: HashMap<MapData, Ct4Key, Ct4Value>,
    pub conntrack6: HashMap<MapData, Ct6Key, Ct6Value>,
    pub sock_nat: HashMap<MapData, SockNat4Key, SockNat4Value>,
    pub service_counters: PerCpuArray<MapData, ServiceCounter>,
    pub events: PerCpuArray<MapData, u64>,
    pub flow_cache_gates: PerCpuArray<MapData, FlowCacheGate>,
    pub config: Array<MapData, DatapathConfig>,
    pub config6: Array<MapData, Datapath6Config>,
    pub source_ranges: LpmTrie<MapData, SourceRange4, u8>,
    pub affinity: HashMap<MapData, Affinity4Key, AffinityValue>,
    pub affinity6: HashMap<MapData, lb_common::Affinity6Key, AffinityValue>,
    pub service_names: HashMap<MapData, u32, ServiceName>,
    pub frontends6: HashMap<MapData, Frontend6Key, ServiceValue>,
    pub backends6: Array<MapData, Backend6>,
    pub source_ranges6: LpmTrie<MapData, SourceRange6, u8>,
    pub sock_nat6: HashMap<MapData, SockNat6Key, SockNat6Value>,
}

impl Maps {
    /// Opens the maps pinned under `pin_dir`. Through [`Access::ReadOnly`] descriptors nothing
    /// can change the datapath: the kernel refuses every update and delete.
    pub fn open(pin_dir: &Path, access: Access) -> Result<Self> {
        Ok(Self {
            frontends: open_map(pin_dir, map_names::FRONTENDS4, access)?,
            slots: open_map(pin_dir, map_names::SLOTS4, access)?,
            backends: open_map(pin_dir, map_names::BACKENDS4, access)?,
            conntrack: open_map(pin_dir, map_names::CONNTRACK4, access)?,
            conntrack6: open_map(pin_dir, map_names::CONNTRACK6, access)?,
            sock_nat: open_map(pin_dir, map_names::SOCK_NAT4, access)?,
            service_counters: open_map(pin_dir, map_names::SERVICE_COUNTERS, access)?,
            events: open_map(pin_dir, map_names::EVENTS, access)?,
            flow_cache_gates: open_map(pin_dir, map_names::FLOW_CACHE_GATES, access)?,
            config: open_map(pin_dir, map_names::CONFIG, access)?,
            config6: open_map(pin_dir, map_names::CONFIG6, access)?,
            source_ranges: open_map(pin_dir, map_names::SOURCE_RANGES4, access)?,
            affinity: open_map(pin_dir, map_names::AFFINITY4, access)?,
            affinity6: open_map(pin_dir, map_names::AFFINITY6, access)?,
            service_names: open_map(pin_dir, map_names::SERVICE_NAMES, access)?,
            frontends6: open_map(pin_dir, map_names::FRONTENDS6, access)?,
            backends6: open_map(pin_dir, map_names::BACKENDS6, access)?,
            source_ranges6: open_map(pin_dir, map_names::SOURCE_RANGES6, access)?,
            sock_nat6: open_map(pin_dir, map_names::SOCK_NAT6, access)?,
        })
    }
}

/// The map pinned as `name` under `pin_dir`, as the typed map `M` (its kind is checked against
/// the kernel's answer: a pin of another kind or layout is refused, not misread).
pub fn open_map<M>(pin_dir: &Path, name: &'static str, access: Access) -> Result<M>
where
    M: TryFrom<Map, Error = MapError>,
{
    let data = open_map_data(pin_dir, name, access)?;
    let map = Map::from_map_data(data).map_err(|source| map_error(name, "open", source))?;
    M::try_from(map).map_err(|source| map_error(name, "open", source))
}

/// The Maglev tables pinned under `pin_dir` (`lb4_maglev_v2`), as an array of maps whose
/// entries open as the tables' arrays (cell 0 the size, cell 1 the tag, then the slots).
pub fn open_maglev_tables(pin_dir: &Path, access: Access) -> Result<MaglevTables> {
    let data = open_map_data(pin_dir, map_names::MAGLEV4, access)?;
    ArrayOfMaps::try_from(Map::ArrayOfMaps(data))
        .map_err(|source| map_error(map_names::MAGLEV4, "open", source))
}

/// The Maglev tables by service id, each opened as an array of u32 cells.
pub type MaglevTables = ArrayOfMaps<MapData, Array<MapData, u32>>;

/// The map pinned as `name` under `pin_dir`, untyped (for maps the typed handles cannot do all
/// of: the array of Maglev tables).
pub fn open_map_data(pin_dir: &Path, name: &'static str, access: Access) -> Result<MapData> {
    let path = pin_dir.join(name);
    let fd = open_pinned(&path, access).map_err(|source| DatapathError::OpenPin {
        path: path.clone(),
        hint: open_pin_hint(pin_dir, &source),
        source,
    })?;
    MapData::from_fd(fd).map_err(|source| map_error(name, "open", source))
}

/// Why a pinned map would not open, as far as the pin directory tells: the question that was
/// always asked ("is an agent running") misleads when the directory is missing or no bpffs,
/// where every open fails whatever runs.
fn open_pin_hint(pin_dir: &Path, error: &std::io::Error) -> &'static str {
    match std::fs::metadata(pin_dir) {
        Ok(metadata) if metadata.is_dir() => {}
        // The agent's bpffs and pin directory are root's alone (0700).
        Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
            return "opening pinned maps needs root or CAP_BPF";
        }
        _ => return "no such pin directory: give the agent's --pin-dir",
    }
    if !super::bpffs::is_mounted(pin_dir).unwrap_or(true) {
        return "the pin directory is not on a bpffs: give the agent's --pin-dir";
    }
    match error.kind() {
        std::io::ErrorKind::PermissionDenied => "opening pinned maps needs root or CAP_BPF",
        _ => "is an agent running with this pin directory?",
    }
}
