//! The service datapath: loads the programs, pins their maps, attaches them to NICs and a cgroup,
//! and puts and removes services and backends in the maps.
//!
//! Maps are pinned by name under the pin directory (`/sys/fs/bpf/lb` for the agent, a private
//! directory per test), so a restarted agent finds the state the datapath kept using meanwhile.
//! Programs are pinned there too, and so are the attachments, as bpf_links under `links/`: they
//! outlive the agent, and a new one swaps its programs into them (BPF_LINK_UPDATE).
//!
//! [`Datapath`] and the state it keeps are defined here; its work is in three files: `load`
//! (load and pin the programs, take the maps, attach to NICs and a cgroup), `write` (put and
//! remove services and backends, the node's settings) and `read` (what the maps hold, with the
//! readers the read-only inspection shares). The pinned state maps are opened one way, by
//! `maps` ([`maps::Maps::open`]): read-write here, read-only by the inspection and `lb explain`.
//! What they are built on: `error`
//! ([`DatapathError`]); `address_filter` and `slot_ranges` (what the datapath keeps of three maps
//! to change them in place); `maglev` (Maglev tables); `nic` (a NIC's name, ifindex and MAC); the
//! pin directory (`bpffs`, `pins`, `bpf_link`, `bpf_obj`); `object` (the embedded eBPF objects);
//! `sock_diag` (aborting UDP sockets). Beside them, for tests, benchmarks and `lb explain`:
//! `testrun` (a loaded program run on a packet) and `counter` (the packet counter object).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use aya::{
    Ebpf,
    maps::{Array, DevMapHash, MapData},
};
use lb_common::{NicMac, SERVICE_NAME_LEN, service_flags};

use crate::compile::model::{Backend, FrontendKey, Service};

mod address_filter;
pub mod batch;
pub mod bpf_link;
pub mod bpf_obj;
pub mod bpffs;
mod clock;
pub mod counter;
mod direct_return;
pub mod ebpf_log;
mod error;
mod frontend_index;
pub(crate) mod load;
pub mod maglev;
pub mod maps;
mod migrate;
pub mod monitor_control;
pub mod nic;
pub mod object;
mod pair_filter;
pub mod pins;
pub(crate) mod read;
pub mod slot_ranges;
pub mod sock_diag;
pub mod testrun;
mod write;

use address_filter::AddressFilter;
pub use error::DatapathError;
use frontend_index::FrontendIndex;
pub use load::{MapSizes, XdpGroup};
use maps::Maps;
pub use pair_filter::{PairFilterKeeper, Rebuilt};
pub use read::FlowCacheCounts;
use slot_ranges::SlotRanges;
pub use write::MAGLEV_SWAP_BATCH;

/// Where the agent pins its maps and programs.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

/// The loaded datapath. Dropping it detaches what it attached; pinned maps stay.
pub struct Datapath {
    ebpf: Ebpf,
    /// The groups of XDP programs loaded and in the program array ([`Datapath::ensure_xdp_group`]).
    xdp_groups: BTreeSet<XdpGroup>,
    /// Entries the IPv4 frontends map holds (as created; `lb run --frontend-map-size`).
    frontends4_capacity: u32,
    pin_dir: PathBuf,
    /// The state maps, shared in kind with the read-only inspection.
    maps: Maps,
    /// The frontend filter as XDP reads it, and how many frontends have each bit.
    frontend_filter: AddressFilter,
    /// The backend filter as tc egress reads it, and how many backends have each bit.
    backend_filter: AddressFilter,
    /// Which clients may have a flow kept as two conntrack entries, as XDP reads it (mapped).
    pair_filter: std::sync::Arc<pair_filter::PairFilter>,
    /// The frontend indexes XDP reads, as the agent keeps them ([`frontend_index`]).
    frontend_index4:
        FrontendIndex<lb_common::FrontendSlot4, Array<MapData, lb_common::FrontendSlot4>>,
    frontend_index6:
        FrontendIndex<lb_common::FrontendSlot6, Array<MapData, lb_common::FrontendSlot6>>,
    /// The map-in-map whose update waits for a grace period, and the map it is updated with.
    grace: (
        aya::maps::ArrayOfMaps<MapData, Array<MapData, u32>>,
        Array<MapData, u32>,
    ),
    /// The cells of `slots` no installed table uses.
    slot_ranges: SlotRanges,
    nic_macs: Array<MapData, NicMac>,
    /// The ifindex each slot of `nic_macs` was asked for; 0 where two NICs share it.
    nic_slots: BTreeMap<u32, u32>,
    /// The MAC each NIC had when it was last recorded in `nic_macs`, by ifindex.
    nic_macs_recorded: BTreeMap<u32, [u8; 6]>,
    tx_ports: DevMapHash<MapData>,
    /// `lb4_maglev_v2`, the array of Maglev tables by service id (written with raw syscalls:
    /// aya's typed handle has no delete).
    maglev: MapData,
    /// Maglev tables put (Some) or removed (None) and not yet swapped into `maglev`, by
    /// service id; the handle keeps a new table alive until then.
    maglev_pending: BTreeMap<u32, Option<Array<MapData, u32>>>,
    /// Whether swaps wait for [`Datapath::swap_maglev_tables`].
    maglev_deferred: bool,
    /// The (size, tag) of the tables [`Datapath::prepare_maglev_table`] built, for the puts to
    /// come.
    maglev_prepared: BTreeMap<u32, (u32, u32)>,
    /// UDP backends that left a service since the last [`Datapath::abort_stale_udp_sockets`]:
    /// sockets connected to them through the service are aborted then.
    departed_udp: BTreeSet<DepartedBackend>,
    /// UDP frontends new to the maps since the last [`Datapath::abort_stale_udp_sockets`]:
    /// sockets of the hooks' cgroup connected to them, untranslated, are aborted then.
    new_udp_frontends: BTreeSet<SocketAddr>,
    /// The names the service-names map holds (mirrors it, so an unchanged name costs no syscall).
    names: BTreeMap<u32, String>,
    /// What the maps hold, read once at load (they may hold an earlier run's state), then kept in
    /// step by every update: an update costs O(its own size), and reconcile diffs against it.
    installed: BTreeMap<u32, InstalledService>,
    /// Which service owns each frontend (a frontend belongs to one service).
    owners: FrontendOwners,
    installed_backends: BTreeMap<u32, Backend>,
    /// Undo and cleanup steps that failed since the last [`Datapath::take_cleanup_failures`]:
    /// steps whose caller is already returning the error that made them necessary, or that
    /// no caller waits for. The agent logs and counts them.
    cleanup_failures: Vec<DatapathError>,
    /// The programs' clock as calibrated at load (None: they read the coarse-clock helper).
    clock: Option<lb_common::JiffiesClock>,
    /// The cgroup the socket hooks are attached to ([`Datapath::attach_cgroup`]), where the
    /// source-range check of pods' packets goes while a service needs it.
    hooks_cgroup: Option<PathBuf>,
    /// The installed services whose frontends carry `service_flags::SOURCE_RANGES`: while there
    /// is one, `lb_sock_egress4` is attached to `hooks_cgroup`.
    ranged_services: BTreeSet<u32>,
    /// Whether this load attached `lb_sock_egress4` (or took over an earlier agent's link).
    source_check_attached: bool,
    /// What DSR options are checked against on this node ([`direct_return`]).
    direct_return: direct_return::DirectReturn,
}

/// Whether a pod's packets to one of the service's frontends must be checked against its
/// source ranges (`lb_sock_egress4`): a frontend carries the ranges' flag.
fn needs_source_check(installed: &InstalledService) -> bool {
    installed
        .frontends
        .values()
        .any(|flags| flags & service_flags::SOURCE_RANGES != 0)
}

/// A UDP backend that left a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct DepartedBackend {
    service_id: u32,
    backend: SocketAddr,
}

/// A service as the maps hold it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstalledService {
    /// The first cell of the service's table in the slot array (0: no table).
    pub slots: u32,
    /// Backend ids in slot order.
    pub backends: Vec<u32>,
    /// Frontend keys with their [`lb_common::service_flags`] (kind and policy bits).
    pub frontends: BTreeMap<FrontendKey, u32>,
    pub affinity_timeout_s: u32,
    pub source_ranges: BTreeSet<(IpAddr, u8)>,
    /// The tag of the Maglev table the frontends ask for, for a service with MAGLEV.
    pub maglev_tag: Option<u32>,
    /// The size of that table, when the table in force has that tag (checked by the agent at
    /// load and kept by every put; None in the read-only inspection).
    pub maglev_size: Option<u32>,
}

/// Frontend keys with the flags their entries carry: the frontends' kinds (a key used by several
/// kinds of one service gets all of them) plus the service's policy bits.
pub fn frontend_flags(service: &Service) -> BTreeMap<FrontendKey, u32> {
    let policy = service.flags & !service_flags::KINDS;
    let mut flags = BTreeMap::new();
    for frontend in &service.frontends {
        *flags.entry(frontend.key()).or_insert(policy) |= frontend.kind & service_flags::KINDS;
    }
    flags
}

/// Which service owns each frontend, with the count of IPv6 ones (each family's map has its
/// own capacity, checked before every update without a walk over every frontend).
#[derive(Debug, Default)]
pub(crate) struct FrontendOwners {
    by_key: BTreeMap<FrontendKey, u32>,
    ipv6: usize,
}

impl FrontendOwners {
    pub(crate) fn insert(&mut self, key: FrontendKey, service_id: u32) -> Option<u32> {
        let before = self.by_key.insert(key, service_id);
        if before.is_none() && matches!(key, FrontendKey::V6(_)) {
            self.ipv6 += 1;
        }
        before
    }

    pub(crate) fn remove(&mut self, key: &FrontendKey) -> Option<u32> {
        let before = self.by_key.remove(key);
        if before.is_some() && matches!(key, FrontendKey::V6(_)) {
            self.ipv6 -= 1;
        }
        before
    }

    pub(crate) fn get(&self, key: &FrontendKey) -> Option<&u32> {
        self.by_key.get(key)
    }

    pub(crate) fn contains_key(&self, key: &FrontendKey) -> bool {
        self.by_key.contains_key(key)
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &FrontendKey> {
        self.by_key.keys()
    }

    /// How many frontends of one family (IPv6 or not) are owned.
    pub(crate) fn count(&self, ipv6: bool) -> usize {
        if ipv6 {
            self.ipv6
        } else {
            self.by_key.len() - self.ipv6
        }
    }
}

/// A service name as the service-names map stores it.
pub type ServiceName = [u8; SERVICE_NAME_LEN];
