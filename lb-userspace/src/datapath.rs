//! The service datapath: loads the programs, pins their maps, attaches them to NICs and a cgroup,
//! and puts and removes services and backends in the maps.
//!
//! Maps are pinned by name under the pin directory (`/sys/fs/bpf/lb` for the agent, a private
//! directory per test), so a restarted agent finds the state the datapath kept using meanwhile.
//! Programs are pinned there too, and so are the attachments, as bpf_links under `links/`: they
//! outlive the agent, and a new one swaps its programs into them (BPF_LINK_UPDATE).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, DevMapHash, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, ProgramError,
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        cgroup_sock_addr::CgroupSockAddrLink,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use lb_common::{
    Affinity4Key, AffinityValue, Backend4, Ct4Key, Ct4Value, DatapathConfig, Event, Frontend4Key,
    LegacySlotKey, NicMac, SERVICE_NAME_LEN, ServiceCounter, ServiceValue, Slot, SockNat4Key,
    SockNat4Value, SourceRange4, limits, maglev, map_names, program_names, service_flags,
};

use crate::{
    compile::model::{Backend, Ipv4Cidr, Service},
    object::DATAPATH_OBJECT,
    slot_ranges::SlotRanges,
};

/// Where the agent pins its maps and programs.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

/// Subdirectory of the pin directory holding the pinned attachments (bpf_links).
pub const LINKS_DIR: &str = "links";

const SOCKET_HOOKS: [&str; 4] = [
    program_names::CONNECT4,
    program_names::SENDMSG4,
    program_names::RECVMSG4,
    program_names::GETPEERNAME4,
];

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("creating pin directory {path}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Bpffs(#[from] crate::bpffs::BpffsError),
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

/// The frontend filter XDP passes the node's own traffic with ([`map_names::FRONTEND_FILTER`]),
/// and how many frontends have each bit. A bit is set before a frontend with it is written and
/// cleared after the last one is removed, so XDP never skips a frontend.
struct FrontendFilter {
    map: Array<MapData, u64>,
    words: Vec<u64>,
    frontends: std::collections::HashMap<u32, usize>,
}

/// A frontend key's bit in the filter.
fn filter_bit(key: &Frontend4Key) -> u32 {
    lb_common::frontend_filter::bit(u32::from_be(key.addr), u16::from_be(key.port), key.proto)
}

impl FrontendFilter {
    /// The filter of these frontends, written whole.
    fn rebuild<'a>(
        map: Array<MapData, u64>,
        keys: impl Iterator<Item = &'a Frontend4Key>,
    ) -> Result<Self> {
        let mut filter = Self {
            map,
            words: vec![0; limits::FRONTEND_FILTER_WORDS as usize],
            frontends: std::collections::HashMap::new(),
        };
        for key in keys {
            let bit = filter_bit(key);
            *filter.frontends.entry(bit).or_default() += 1;
            filter.words[(bit >> 6) as usize] |= 1 << (bit & 63);
        }
        for index in 0..limits::FRONTEND_FILTER_WORDS {
            filter.write(index)?;
        }
        Ok(filter)
    }

    /// Sets the bits of these frontends.
    fn mark<'a>(&mut self, keys: impl Iterator<Item = &'a Frontend4Key>) -> Result<()> {
        for key in keys {
            let bit = filter_bit(key);
            let word = bit >> 6;
            let mask = 1u64 << (bit & 63);
            if self.words[word as usize] & mask == 0 {
                self.words[word as usize] |= mask;
                self.write(word)?;
            }
        }
        Ok(())
    }

    /// One more frontend has this key's bit.
    fn count(&mut self, key: &Frontend4Key) {
        *self.frontends.entry(filter_bit(key)).or_default() += 1;
    }

    /// One frontend less has this key's bit; the last one clears it.
    fn release(&mut self, key: &Frontend4Key) -> Result<()> {
        let bit = filter_bit(key);
        let Some(count) = self.frontends.get_mut(&bit) else {
            return Ok(());
        };
        *count -= 1;
        if *count == 0 {
            self.frontends.remove(&bit);
            self.words[(bit >> 6) as usize] &= !(1u64 << (bit & 63));
            self.write(bit >> 6)?;
        }
        Ok(())
    }

    fn write(&mut self, index: u32) -> Result<()> {
        self.map
            .set(index, &self.words[index as usize], 0)
            .map_err(|source| map_error(map_names::FRONTEND_FILTER, "write", source))
    }
}

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

impl Datapath {
    /// Loads every program of the datapath, reusing the maps pinned under `pin_dir` or creating
    /// and pinning them there. bpffs is mounted at its usual place when missing; the pin
    /// directory is created 0700 and refused when it is not on bpffs or not this user's.
    pub fn load(pin_dir: &Path) -> Result<Self> {
        crate::bpffs::ensure_mounted(Path::new(crate::bpffs::DEFAULT_MOUNT))?;
        crate::bpffs::create_pin_dir(pin_dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(DATAPATH_OBJECT)
            .map_err(|source| DatapathError::Load {
                pin_dir: pin_dir.to_owned(),
                source: Box::new(source),
            })?;
        load_and_pin::<Xdp>(&mut ebpf, program_names::XDP_LB, pin_dir)?;
        load_and_pin::<SchedClassifier>(&mut ebpf, program_names::TC_EGRESS, pin_dir)?;
        for hook in SOCKET_HOOKS {
            load_and_pin::<CgroupSockAddr>(&mut ebpf, hook, pin_dir)?;
        }
        load_and_pin::<CgroupSkb>(&mut ebpf, program_names::SOCK_EGRESS4, pin_dir)?;
        load_and_pin::<CgroupSock>(&mut ebpf, program_names::SOCK_RELEASE, pin_dir)?;
        let mut frontends: HashMap<MapData, Frontend4Key, ServiceValue> =
            take_map(&mut ebpf, map_names::FRONTENDS4)?;
        let mut slots: Array<MapData, Slot> = take_map(&mut ebpf, map_names::SLOTS4)?;
        let source_ranges: LpmTrie<MapData, SourceRange4, u8> =
            take_map(&mut ebpf, map_names::SOURCE_RANGES4)?;
        let backends: HashMap<MapData, u32, Backend4> = take_map(&mut ebpf, map_names::BACKENDS4)?;
        let (mut installed, owners) = read_installed(&frontends, &slots)?;
        let mut slot_ranges = SlotRanges::new(limits::MAX_SLOTS);
        for service in installed.values_mut() {
            if !slot_ranges.reserve(service.slots, service.backends.len() as u32) {
                // Cells another table claims too (maps no agent of this release wrote): the
                // next sync writes this service's table afresh.
                service.backends.clear();
            }
        }
        let legacy_tables = pin_dir.join(map_names::LEGACY_SLOTS4);
        if legacy_tables.exists() {
            migrate_legacy_slots(
                &legacy_tables,
                &mut installed,
                &mut frontends,
                &mut slots,
                &mut slot_ranges,
            )?;
        }
        remove_retired_pins(pin_dir)?;
        // Rewritten whole before any program of this load is attached: a map new to the pin
        // directory (an upgrade) starts empty, and stale bits would only cost lookups.
        let frontend_filter = FrontendFilter::rebuild(
            take_map(&mut ebpf, map_names::FRONTEND_FILTER)?,
            owners.keys(),
        )?;
        for key in source_ranges.keys() {
            let key =
                key.map_err(|source| map_error(map_names::SOURCE_RANGES4, "iterate", source))?;
            let data = key.data();
            if let Some(service) = installed.get_mut(&u32::from_be(data.service_id_be)) {
                let addr = Ipv4Addr::from(u32::from_be(data.addr));
                service
                    .source_ranges
                    .insert((addr, (key.prefix_len() - 32) as u8));
            }
        }
        let installed_backends = read_backends(&backends)?;
        let service_names = open_service_names(pin_dir)?;
        let names = read_service_names(&service_names)?;
        Ok(Self {
            frontends,
            frontend_filter,
            installed,
            owners,
            installed_backends,
            slots,
            slot_ranges,
            backends,
            conntrack: take_map(&mut ebpf, map_names::CONNTRACK4)?,
            service_counters: take_map(&mut ebpf, map_names::SERVICE_COUNTERS)?,
            events: take_map(&mut ebpf, map_names::EVENTS)?,
            config: take_map(&mut ebpf, map_names::CONFIG)?,
            nic_macs: take_map(&mut ebpf, map_names::NIC_MACS)?,
            nic_slots: BTreeMap::new(),
            tx_ports: take_map(&mut ebpf, map_names::TX_PORTS)?,
            maglev: take_map(&mut ebpf, map_names::MAGLEV4)?,
            affinity: take_map(&mut ebpf, map_names::AFFINITY4)?,
            sock_nat: take_map(&mut ebpf, map_names::SOCK_NAT4)?,
            departed_udp: BTreeSet::new(),
            source_ranges,
            service_names,
            names,
            ebpf,
            pin_dir: pin_dir.to_owned(),
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Attaches the XDP program to a NIC of the calling thread's network namespace.
    ///
    /// Attachments are bpf_links pinned under `<pin_dir>/links/`, so they outlive the agent: a
    /// restarted (or upgraded) agent finds the pinned link and swaps its own program in
    /// atomically (BPF_LINK_UPDATE); traffic never runs without the datapath.
    pub fn attach_xdp(&mut self, iface: &str, mode: XdpMode) -> Result<()> {
        let (ifindex, mac) = nic_address(iface)?;
        self.record_nic_mac(ifindex, mac)?;
        // The NIC becomes a port XDP may send frames out of (XDP_REDIRECT).
        self.allow_redirect_to(ifindex, true)?;
        let name = program_names::XDP_LB;
        let pin = self.link_pin(&crate::pins::xdp_link_name(iface))?;
        let program = program_mut::<Xdp>(&mut self.ebpf, name)?;
        let operation = || format!("attach to {iface} ({mode:?})");
        if let Some(link) = take_pinned_link(&pin, name)? {
            let link = XdpLink::try_from(link).map_err(|source| link_error(name, &pin, source))?;
            program
                .attach_to_link(link)
                .map_err(|source| program_error(name, operation(), source))?;
            return Ok(());
        }
        let ifname = interface_name(iface)?;
        let id = program
            .attach(ifname.as_c_str(), mode)
            .map_err(|source| program_error(name, operation(), source))?;
        let link = program
            .take_link(id)
            .map_err(|source| program_error(name, operation(), source))?;
        pin_link(FdLink::try_from(link), &pin, name)
    }

    /// Attaches the reverse-NAT program to the egress of a NIC of the calling thread's namespace
    /// (TCX on kernels >= 6.6), pinned like [`Datapath::attach_xdp`].
    pub fn attach_tc_egress(&mut self, iface: &str) -> Result<()> {
        let name = program_names::TC_EGRESS;
        let pin = self.link_pin(&crate::pins::tc_egress_link_name(iface))?;
        let program = program_mut::<SchedClassifier>(&mut self.ebpf, name)?;
        let operation = || format!("attach to {iface} egress");
        if let Some(link) = take_pinned_link(&pin, name)? {
            let link = SchedClassifierLink::try_from(link)
                .map_err(|source| link_error(name, &pin, source))?;
            program
                .attach_to_link(link)
                .map_err(|source| program_error(name, operation(), source))?;
            return Ok(());
        }
        let ifname = interface_name(iface)?;
        let id = program
            .attach(ifname.as_c_str(), TcAttachType::Egress)
            .map_err(|source| program_error(name, operation(), source))?;
        let link = program
            .take_link(id)
            .map_err(|source| program_error(name, operation(), source))?;
        pin_link(FdLink::try_from(link), &pin, name)
    }

    /// Attaches the socket hooks to a cgroup v2 directory: every process in it (and below) that
    /// connects or sends to a Service is sent to a backend instead; the egress check of source
    /// ranges and the cleanup at socket release come with them. Pinned like
    /// [`Datapath::attach_xdp`].
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<()> {
        let file = File::open(cgroup).map_err(|source| DatapathError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        for hook in SOCKET_HOOKS {
            let pin = self.link_pin(hook)?;
            let program = program_mut::<CgroupSockAddr>(&mut self.ebpf, hook)?;
            let operation = || format!("attach to cgroup {}", cgroup.display());
            if let Some(link) = take_pinned_link(&pin, hook)? {
                let link = CgroupSockAddrLink::try_from(link)
                    .map_err(|source| link_error(hook, &pin, source))?;
                program
                    .attach_to_link(link)
                    .map_err(|source| program_error(hook, operation(), source))?;
                continue;
            }
            // aya attaches with a bpf_link (kernel >= 5.7), which refuses attach flags (EINVAL;
            // kernel/bpf/cgroup.c, cgroup_bpf_link_attach) and always behaves as
            // BPF_F_ALLOW_MULTI: other programs on the cgroup (systemd, a CNI) keep working.
            let id = program
                .attach(&file, CgroupAttachMode::Single)
                .map_err(|source| program_error(hook, operation(), source))?;
            let link = program
                .take_link(id)
                .map_err(|source| program_error(hook, operation(), source))?;
            pin_link(FdLink::try_from(link), &pin, hook)?;
        }
        self.attach_sock_egress(cgroup, &file)?;
        self.attach_sock_release(cgroup, &file)
    }

    /// `lb_sock_egress4` on the cgroup's egress, pinned like the other hooks.
    fn attach_sock_egress(&mut self, cgroup: &Path, file: &File) -> Result<()> {
        let name = program_names::SOCK_EGRESS4;
        let pin = self.link_pin(name)?;
        let program = program_mut::<CgroupSkb>(&mut self.ebpf, name)?;
        let operation = || format!("attach to cgroup {}", cgroup.display());
        if pin.exists() {
            return update_pinned_link(&pin, program.fd(), name);
        }
        let id = program
            .attach(file, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)
            .map_err(|source| program_error(name, operation(), source))?;
        let link = program
            .take_link(id)
            .map_err(|source| program_error(name, operation(), source))?;
        pin_link(FdLink::try_from(link), &pin, name)
    }

    /// `lb_sock_release` on the cgroup's socket release, pinned like the other hooks.
    fn attach_sock_release(&mut self, cgroup: &Path, file: &File) -> Result<()> {
        let name = program_names::SOCK_RELEASE;
        let pin = self.link_pin(name)?;
        let program = program_mut::<CgroupSock>(&mut self.ebpf, name)?;
        let operation = || format!("attach to cgroup {}", cgroup.display());
        if pin.exists() {
            return update_pinned_link(&pin, program.fd(), name);
        }
        let id = program
            .attach(file, CgroupAttachMode::Single)
            .map_err(|source| program_error(name, operation(), source))?;
        let link = program
            .take_link(id)
            .map_err(|source| program_error(name, operation(), source))?;
        pin_link(FdLink::try_from(link), &pin, name)
    }

    /// Where the link of one attachment is pinned.
    fn link_pin(&self, name: &str) -> Result<PathBuf> {
        let dir = self.pin_dir.join(LINKS_DIR);
        crate::bpffs::create_pin_dir(&dir)?;
        Ok(dir.join(name))
    }

    /// A program's file descriptor, for `BPF_PROG_TEST_RUN`.
    pub fn program_fd(&self, name: &'static str) -> Result<BorrowedFd<'_>> {
        let program = self
            .ebpf
            .program(name)
            .ok_or(DatapathError::MissingProgram(name))?;
        let fd = program.fd().map_err(|source| DatapathError::Program {
            program: name,
            operation: "fd".into(),
            source: Box::new(source),
        })?;
        Ok(fd.as_fd())
    }

    /// Adds or replaces a backend. Put backends before the services that reference them.
    pub fn put_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        let operation = || format!("put backend {id} = {backend:?}");
        if id >= limits::MAX_BACKENDS {
            return Err(DatapathError::Invalid(format!(
                "backend id {id} out of range (max {})",
                limits::MAX_BACKENDS - 1
            )));
        }
        insert(
            &mut self.backends,
            map_names::BACKENDS4,
            limits::MAX_BACKENDS,
            &id,
            &backend.value(),
            operation,
        )?;
        self.installed_backends.insert(id, *backend);
        Ok(())
    }

    /// Removes a backend. Flows pinned to it select again at their next packet; the caller removes
    /// it from every service first.
    pub fn remove_backend(&mut self, id: u32) -> Result<()> {
        remove(&mut self.backends, map_names::BACKENDS4, &id, || {
            format!("remove backend {id}")
        })?;
        self.installed_backends.remove(&id);
        Ok(())
    }

    /// The services the maps hold, by service id.
    pub fn installed_services(&self) -> &BTreeMap<u32, InstalledService> {
        &self.installed
    }

    /// The backends the maps hold, by id.
    pub fn installed_backends(&self) -> &BTreeMap<u32, Backend> {
        &self.installed_backends
    }

    /// Installs or updates a service so that no packet ever sees a half-written state: the new
    /// selection table is written into free cells of the slot array, then every frontend is
    /// flipped to it in one update each, then the old table's cells are freed. Frontends of the
    /// service that are not in `service.frontends` any more are removed last.
    pub fn put_service(&mut self, service: &Service) -> Result<()> {
        self.validate(service)?;
        let flags_by_key = frontend_flags(service);
        self.check_room(service, &flags_by_key)?;
        let previous = self.installed.get(&service.id).cloned();
        if previous.is_none() {
            // An id new to the maps (a new Service, or one freed and handed out again) counts
            // from zero: its slot is cleared before any frontend points at it.
            self.reset_service_counter(service.id)?;
        }
        let backend_count = service.backends.len() as u16;

        // Ranges first: a frontend that starts checking them must find them.
        let old_ranges = previous
            .as_ref()
            .map(|installed| installed.source_ranges.clone())
            .unwrap_or_default();
        self.write_source_ranges(service.id, service.source_ranges.difference(&old_ranges))?;

        // All or nothing: on a failure, what this call wrote is undone before it returns.
        let slots = self.write_slots(service.id, &service.backends)?;
        let maglev_table = match self.write_maglev_table(service) {
            Ok(table) => table,
            Err(error) => {
                self.slot_ranges.release(slots, backend_count.into());
                return Err(error);
            }
        };
        let value = |flags: u32| ServiceValue {
            service_id: service.id,
            backend_count,
            legacy_revision: 0,
            flags,
            affinity_timeout_s: service.affinity_timeout_s,
            maglev_table: maglev_table.unwrap_or(0),
            slots,
        };
        // Before the entries: XDP looks a frontend up only once its bit is set.
        self.frontend_filter.mark(flags_by_key.keys())?;
        let mut written = Vec::new();
        for (key, flags) in &flags_by_key {
            let result = insert(
                &mut self.frontends,
                map_names::FRONTENDS4,
                limits::MAX_FRONTENDS,
                key,
                &value(*flags),
                || format!("service {} frontend {key:?}", service.id),
            );
            if let Err(error) = result {
                self.undo_frontends(&written);
                self.slot_ranges.release(slots, backend_count.into());
                return Err(error);
            }
            written.push(*key);
        }

        // A frontend can move here from another service (e.g. a traffic policy split a Service
        // port into two tables): its entry was flipped in one update above; the other service
        // just no longer has it.
        for key in flags_by_key.keys() {
            match self.owners.insert(*key, service.id) {
                None => self.frontend_filter.count(key),
                Some(owner) if owner != service.id => {
                    if let Some(other) = self.installed.get_mut(&owner) {
                        other.frontends.remove(key);
                    }
                }
                Some(_) => {}
            }
        }
        self.installed.insert(
            service.id,
            InstalledService {
                slots,
                backends: service.backends.clone(),
                frontends: flags_by_key.clone(),
                affinity_timeout_s: service.affinity_timeout_s,
                source_ranges: service.source_ranges.clone(),
                maglev_table,
            },
        );
        self.remove_source_ranges(service.id, old_ranges.difference(&service.source_ranges))?;
        if let Some(previous) = &previous {
            let left: BTreeSet<u32> = previous
                .backends
                .iter()
                .filter(|id| !service.backends.contains(id))
                .copied()
                .collect();
            self.record_departed_udp(service.id, &left);
            if !left.is_empty() && previous.affinity_timeout_s != 0 {
                self.release_affinity(service.id, &left)?;
            }
        }
        if let Some(previous) = previous {
            for key in previous
                .frontends
                .keys()
                .filter(|key| !flags_by_key.contains_key(key))
            {
                remove(&mut self.frontends, map_names::FRONTENDS4, key, || {
                    format!("stale frontend {key:?}")
                })?;
                if self.owners.remove(key).is_some() {
                    self.frontend_filter.release(key)?;
                }
            }
            // A packet that read the old entry may still be selecting from these cells: once
            // another service's table is in them, it finds that service's id and selects
            // nothing, never that service's backend.
            self.slot_ranges
                .release(previous.slots, previous.backends.len() as u32);
        }
        Ok(())
    }

    /// Writes the datapath-wide settings (SNAT address and ports).
    /// Tells XDP the MAC of the NIC with this ifindex, so that frames it sees for other hosts
    /// (promiscuous mode) are left alone. Two NICs whose ifindexes share a slot
    /// (ifindex % NIC_SLOTS) leave the first unchecked.
    pub fn record_nic_mac(&mut self, ifindex: u32, mac: [u8; 6]) -> Result<()> {
        let slot = ifindex % limits::NIC_SLOTS;
        let holder = *self.nic_slots.entry(slot).or_insert(ifindex);
        // Two NICs in one slot: neither is checked, and answers recorded by slot go back out of
        // the NIC they arrive on rather than to the wrong one of the two.
        let nic = if holder == ifindex {
            NicMac {
                ifindex,
                mac,
                _pad: [0; 2],
            }
        } else {
            self.nic_slots.insert(slot, 0);
            NicMac::default()
        };
        self.nic_macs
            .set(slot, &nic, 0)
            .map_err(|source| map_error(map_names::NIC_MACS, "write", source))
    }

    /// Whether XDP may send frames out of the NIC with this ifindex with XDP_REDIRECT (attaching
    /// XDP to a NIC allows it); frames it may not send there go to the stack, which forwards
    /// them. Benchmarks compare the two. The kernel resolves the ifindex in the network
    /// namespace of the calling thread (kernel/bpf/devmap.c, `__dev_map_alloc_node`): call it
    /// from the NIC's, as `attach_xdp` is.
    pub fn allow_redirect_to(&mut self, ifindex: u32, allowed: bool) -> Result<()> {
        let operation = || {
            format!(
                "{} ifindex {ifindex}",
                if allowed { "add" } else { "remove" }
            )
        };
        if !allowed {
            return match self.tx_ports.remove(ifindex) {
                Ok(()) => Ok(()),
                Err(MapError::SyscallError(syscall))
                    if syscall.io_error.raw_os_error() == Some(libc::ENOENT) =>
                {
                    Ok(())
                }
                Err(source) => Err(map_error(map_names::TX_PORTS, &operation(), source)),
            };
        }
        match self.tx_ports.insert(ifindex, ifindex, None, 0) {
            Ok(()) => Ok(()),
            Err(aya::maps::xdp::XdpMapError::MapError(source)) => {
                Err(map_error(map_names::TX_PORTS, &operation(), source))
            }
            // Only a chained program can be unsupported, and none is given.
            Err(aya::maps::xdp::XdpMapError::ChainedProgramNotSupported) => Ok(()),
        }
    }

    pub fn set_config(&mut self, config: &DatapathConfig) -> Result<()> {
        self.config
            .set(0, config, 0)
            .map_err(|source| map_error(map_names::CONFIG, "write", source))
    }

    /// The datapath-wide settings in force.
    pub fn config(&self) -> Result<DatapathConfig> {
        self.config
            .get(&0, 0)
            .map_err(|source| map_error(map_names::CONFIG, "read", source))
    }

    fn write_source_ranges<'r>(
        &mut self,
        service_id: u32,
        ranges: impl Iterator<Item = &'r (Ipv4Addr, u8)>,
    ) -> Result<()> {
        for range in ranges {
            let key = source_range_key(service_id, range);
            self.source_ranges.insert(&key, &1, 0).map_err(|source| {
                if is_full(&source) {
                    DatapathError::MapFull {
                        map: map_names::SOURCE_RANGES4,
                        capacity: limits::MAX_SOURCE_RANGES,
                        operation: format!("service {service_id} source range {range:?}"),
                    }
                } else {
                    map_error(map_names::SOURCE_RANGES4, "insert", source)
                }
            })?;
        }
        Ok(())
    }

    fn remove_source_ranges<'r>(
        &mut self,
        service_id: u32,
        ranges: impl Iterator<Item = &'r (Ipv4Addr, u8)>,
    ) -> Result<()> {
        for range in ranges {
            match self
                .source_ranges
                .remove(&source_range_key(service_id, range))
            {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(syscall))
                    if syscall.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(source) => return Err(map_error(map_names::SOURCE_RANGES4, "remove", source)),
            }
        }
        Ok(())
    }

    /// Session affinity entries of a service that point at backends it no longer has: removed,
    /// so those clients choose again (an endpoint leaving releases its clients).
    fn release_affinity(&mut self, service_id: u32, backends: &BTreeSet<u32>) -> Result<()> {
        let stale: Vec<Affinity4Key> = self
            .affinity
            .iter()
            .filter_map(Result::ok)
            .filter(|(key, value)| {
                key.service_id == service_id && backends.contains(&value.backend_id)
            })
            .map(|(key, _)| key)
            .collect();
        for key in stale {
            let _ = self.affinity.remove(&key);
        }
        Ok(())
    }

    /// Remembers the UDP backends among `backends` that just left service `service_id`, for
    /// [`Datapath::abort_udp_sockets_of_departed_backends`].
    fn record_departed_udp(&mut self, service_id: u32, backends: &BTreeSet<u32>) {
        for id in backends {
            if let Some(backend) = self.installed_backends.get(id)
                && backend.proto == lb_common::proto::UDP
            {
                self.departed_udp.insert(DepartedBackend {
                    service_id,
                    backend: SocketAddrV4::new(backend.addr, backend.port),
                });
            }
        }
    }

    /// Aborts the connected UDP sockets that the socket hooks sent, through a service, to a
    /// backend that has left that service since the last call (`put_service` without it,
    /// `remove_service`): a connected socket keeps its backend address, so without this it would
    /// send to the departed endpoint forever. The application's next call fails and it
    /// reconnects to a live endpoint. Only sockets the hooks recorded in `lb4_sknat_v1` for that
    /// service and backend, and still connected to it, are touched; TCP is left alone (like
    /// kube-proxy, established connections to a removed endpoint stay). The agent calls this
    /// once per sync.
    pub fn abort_udp_sockets_of_departed_backends(&mut self) -> crate::sock_diag::DestroyReport {
        let departed = std::mem::take(&mut self.departed_udp);
        if departed.is_empty() {
            return Default::default();
        }
        let mut targets = BTreeMap::new();
        let mut report = crate::sock_diag::DestroyReport::default();
        for entry in self.sock_nat.iter() {
            let (key, value) = match entry {
                Ok(entry) => entry,
                Err(error) => {
                    report.failed += 1;
                    report
                        .errors
                        .push(format!("reading {}: {error}", map_names::SOCK_NAT4));
                    break;
                }
            };
            let backend = SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(key.addr)),
                u16::from_be(key.port),
            );
            let departed_backend = DepartedBackend {
                service_id: value.service_id,
                backend,
            };
            if departed.contains(&departed_backend) {
                targets.insert(key.cookie, backend);
            }
        }
        let aborted = crate::sock_diag::destroy_connected_udp(&targets);
        report.destroyed += aborted.destroyed;
        report.failed += aborted.failed;
        report.errors.extend(aborted.errors);
        report
    }

    /// Affinity entries of a service: (client, backend id), for tests and inspection.
    pub fn affinity(&self, service_id: u32) -> Vec<(Affinity4Key, AffinityValue)> {
        self.affinity
            .iter()
            .filter_map(Result::ok)
            .filter(|(key, _)| key.service_id == service_id)
            .collect()
    }

    /// For a Maglev service with backends: builds its lookup table over the backends' identities
    /// (address:port/protocol, the same on every node) and writes it to a free table of
    /// `lb4_maglev_v1`; the frontends switch to it afterwards, and the old table is free once they
    /// have. None for other services.
    fn write_maglev_table(&mut self, service: &Service) -> Result<Option<u32>> {
        if service.flags & service_flags::MAGLEV == 0 || service.backends.is_empty() {
            return Ok(None);
        }
        let in_use: BTreeSet<u32> = self
            .installed
            .values()
            .filter_map(|installed| installed.maglev_table)
            .collect();
        let table = (0..maglev::MAX_TABLES)
            .find(|index| !in_use.contains(index))
            .ok_or(DatapathError::MapFull {
                map: map_names::MAGLEV4,
                capacity: maglev::MAX_TABLES,
                operation: format!("a Maglev table for service {}", service.id),
            })?;
        let identities: Vec<String> = service
            .backends
            .iter()
            .map(|id| {
                let backend = &self.installed_backends[id];
                format!("{}:{}/{}", backend.addr, backend.port, backend.proto)
            })
            .collect();
        let slots = crate::maglev::table(&identities, maglev::TABLE_SIZE).map_err(|error| {
            DatapathError::Invalid(format!("service {}: Maglev table: {error}", service.id))
        })?;
        let base = table * maglev::TABLE_SIZE;
        for (slot, index) in slots.iter().enumerate() {
            self.maglev
                .set(base + slot as u32, &service.backends[*index as usize], 0)
                .map_err(|source| map_error(map_names::MAGLEV4, "write", source))?;
        }
        Ok(Some(table))
    }

    /// MapFull before anything is written when the service's new entries would not fit.
    fn check_room(&self, service: &Service, frontends: &BTreeMap<Frontend4Key, u32>) -> Result<()> {
        let new_frontends = frontends
            .keys()
            .filter(|key| !self.owners.contains_key(key))
            .count();
        if self.owners.len() + new_frontends > limits::MAX_FRONTENDS as usize {
            return Err(DatapathError::MapFull {
                map: map_names::FRONTENDS4,
                capacity: limits::MAX_FRONTENDS,
                operation: format!("service {}: {new_frontends} new frontends", service.id),
            });
        }
        // The new table is written before the old one is freed: both must fit for a moment.
        if service.backends.len() > self.slot_ranges.free_cells() as usize {
            return Err(DatapathError::MapFull {
                map: map_names::SLOTS4,
                capacity: limits::MAX_SLOTS,
                operation: format!("service {}: {} slots", service.id, service.backends.len()),
            });
        }
        Ok(())
    }

    /// Writes a selection table into free cells of the slot array; returns its first cell.
    fn write_slots(&mut self, service_id: u32, backends: &[u32]) -> Result<u32> {
        let len = backends.len() as u32;
        let full = || DatapathError::MapFull {
            map: map_names::SLOTS4,
            capacity: limits::MAX_SLOTS,
            operation: format!("service {service_id}: {len} consecutive free cells"),
        };
        let start = self.slot_ranges.allocate(len).ok_or_else(full)?;
        if let Err(error) = write_table(&mut self.slots, start, service_id, backends) {
            self.slot_ranges.release(start, len);
            return Err(error);
        }
        Ok(start)
    }

    /// Puts back what a failed put_service changed among `written` frontends: new ones are
    /// removed, existing ones get their previous entry again.
    fn undo_frontends(&mut self, written: &[Frontend4Key]) {
        for key in written {
            // The entry the key had before this call: its owner's (this service's previous
            // version, or the service it was taken from), or none.
            let before = self.owners.get(key).and_then(|owner| {
                let installed = self.installed.get(owner)?;
                Some(ServiceValue {
                    service_id: *owner,
                    backend_count: installed.backends.len() as u16,
                    legacy_revision: 0,
                    flags: *installed.frontends.get(key)?,
                    affinity_timeout_s: installed.affinity_timeout_s,
                    maglev_table: installed.maglev_table.unwrap_or(0),
                    slots: installed.slots,
                })
            });
            let _ = match before {
                Some(value) => self.frontends.insert(key, &value, 0),
                None => self.frontends.remove(key),
            };
        }
    }

    /// Records the name of a service id (for `lb services` and the metrics' labels). Longer
    /// names are cut at [`lb_common::SERVICE_NAME_LEN`] bytes.
    pub fn set_service_name(&mut self, id: u32, name: &str) -> Result<()> {
        if self.names.get(&id).map(String::as_str) == Some(name) {
            return Ok(());
        }
        let mut value = [0u8; SERVICE_NAME_LEN];
        let bytes = name.as_bytes();
        let len = bytes.len().min(SERVICE_NAME_LEN);
        value[..len].copy_from_slice(&bytes[..len]);
        self.service_names
            .insert(&id, &value, 0)
            .map_err(|source| map_error(map_names::SERVICE_NAMES, "update", source))?;
        self.names.insert(id, name.to_owned());
        Ok(())
    }

    /// Removes a service: its frontends first (new packets stop matching), then its table.
    pub fn remove_service(&mut self, id: u32) -> Result<()> {
        if self.names.remove(&id).is_some() {
            remove(
                &mut self.service_names,
                map_names::SERVICE_NAMES,
                &id,
                || format!("service {id} name"),
            )?;
        }
        let Some(installed) = self.installed.remove(&id) else {
            return Ok(());
        };
        self.record_departed_udp(id, &installed.backends.iter().copied().collect());
        self.remove_source_ranges(id, installed.source_ranges.iter())?;
        if installed.affinity_timeout_s != 0 {
            self.release_affinity(id, &installed.backends.iter().copied().collect())?;
        }
        for key in installed.frontends.keys() {
            remove(&mut self.frontends, map_names::FRONTENDS4, key, || {
                format!("service {id} frontend {key:?}")
            })?;
            if self.owners.remove(key).is_some() {
                self.frontend_filter.release(key)?;
            }
        }
        self.slot_ranges
            .release(installed.slots, installed.backends.len() as u32);
        Ok(())
    }

    /// Every frontend with its service entry.
    pub fn frontends(&self) -> Result<Vec<(Frontend4Key, ServiceValue)>> {
        self.frontends
            .iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(|source| map_error(map_names::FRONTENDS4, "iterate", source))
    }

    /// Every backend by id.
    pub fn backends(&self) -> Result<BTreeMap<u32, Backend>> {
        read_backends(&self.backends)
    }

    /// Every connection-tracking entry.
    pub fn conntrack(&self) -> Result<Vec<(Ct4Key, Ct4Value)>> {
        self.conntrack
            .iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(|source| map_error(map_names::CONNTRACK4, "iterate", source))
    }

    /// A service's counters summed over CPUs.
    pub fn service_counter(&self, id: u32) -> Result<ServiceCounter> {
        read_service_counter(&self.service_counters, id)
    }

    /// Zeroes a service id's counters on every CPU.
    fn reset_service_counter(&mut self, id: u32) -> Result<()> {
        let operation = || format!("zero the counters of service {id}");
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| DatapathError::PerCpu {
            map: map_names::SERVICE_COUNTERS,
            operation: operation(),
            source,
        })?;
        let zeros = PerCpuValues::try_from(vec![ServiceCounter::default(); cpus.get() as usize])
            .map_err(|source| DatapathError::PerCpu {
                map: map_names::SERVICE_COUNTERS,
                operation: operation(),
                source,
            })?;
        self.service_counters
            .set(id, zeros, 0)
            .map_err(|source| map_error(map_names::SERVICE_COUNTERS, &operation(), source))
    }

    /// How often each event (drop reason) happened, summed over CPUs.
    pub fn events(&self) -> Result<BTreeMap<&'static str, u64>> {
        read_events(&self.events)
    }

    fn validate(&self, service: &Service) -> Result<()> {
        let invalid = |why: String| {
            Err(DatapathError::Invalid(format!(
                "service {}: {why}",
                service.id
            )))
        };
        if service.id >= limits::MAX_SERVICES {
            return invalid(format!(
                "id out of range (max {})",
                limits::MAX_SERVICES - 1
            ));
        }
        if service.backends.len() > limits::MAX_BACKENDS_PER_SERVICE as usize {
            return invalid(format!(
                "{} backends, more than the {} a service can select from",
                service.backends.len(),
                limits::MAX_BACKENDS_PER_SERVICE
            ));
        }
        if service.frontends.is_empty() {
            return invalid("no frontend".into());
        }
        for frontend in &service.frontends {
            if frontend.port == 0 {
                return invalid(format!("frontend {frontend:?} has port 0"));
            }
            if ![lb_common::proto::TCP, lb_common::proto::UDP].contains(&frontend.proto) {
                return invalid(format!("frontend {frontend:?}: protocol not TCP or UDP"));
            }
        }
        if let Some(range) = service.source_ranges.iter().find(|(_, len)| *len > 32) {
            return invalid(format!("source range {range:?}: prefix length above 32"));
        }
        // The LPM trie holds one entry per (service, prefix): 10.1.2.3/8 would be the entry of
        // 10.0.0.0/8, and removing either from the set would remove the entry both need.
        if let Some(range) = service.source_ranges.iter().find(|(addr, len)| {
            let cidr = Ipv4Cidr {
                addr: *addr,
                prefix_len: *len,
            };
            cidr.network() != cidr
        }) {
            return invalid(format!(
                "source range {range:?}: host bits set (compile masks them)"
            ));
        }
        for id in &service.backends {
            if !self.installed_backends.contains_key(id) {
                return invalid(format!("backend {id} is not in the backends map"));
            }
        }
        Ok(())
    }
}

/// Writes `backends` into the cells of the slot array from `start`, each marked as `service_id`'s.
fn write_table(
    slots: &mut Array<MapData, Slot>,
    start: u32,
    service_id: u32,
    backends: &[u32],
) -> Result<()> {
    for (index, &backend_id) in (start..).zip(backends) {
        let cell = Slot {
            service_id,
            backend_id,
        };
        slots
            .set(index, &cell, 0)
            .map_err(|source| map_error(map_names::SLOTS4, "write", source))?;
    }
    Ok(())
}

/// Moves the selection tables an agent of an earlier release left in the hash map
/// `lb4_slot_v1` (keyed by service, revision and slot) into the slot array, and points each
/// frontend of theirs at the new cells in one update. The entries keep their `legacy_revision`,
/// so that the earlier release's programs, which run until this load's are attached, keep
/// selecting from the old map meanwhile; the next sync writes every service afresh anyway.
fn migrate_legacy_slots(
    legacy_path: &Path,
    installed: &mut BTreeMap<u32, InstalledService>,
    frontends: &mut HashMap<MapData, Frontend4Key, ServiceValue>,
    slots: &mut Array<MapData, Slot>,
    slot_ranges: &mut SlotRanges,
) -> Result<()> {
    let map = MapData::from_pin(legacy_path)
        .map_err(|source| map_error(map_names::LEGACY_SLOTS4, "open", source))?;
    let legacy = HashMap::<_, LegacySlotKey, u32>::try_from(Map::HashMap(map))
        .map_err(|source| map_error(map_names::LEGACY_SLOTS4, "open", source))?;
    let mut values = BTreeMap::new();
    for entry in frontends.iter() {
        let (key, value) =
            entry.map_err(|source| map_error(map_names::FRONTENDS4, "iterate", source))?;
        if value.slots == 0 && value.backend_count > 0 {
            values.insert(key, value);
        }
    }
    let mut tables: BTreeMap<u32, (u16, u16)> = BTreeMap::new();
    for value in values.values() {
        tables.insert(
            value.service_id,
            (value.legacy_revision, value.backend_count),
        );
    }
    let mut moved = BTreeMap::new();
    for (&service_id, &(revision, count)) in &tables {
        let backends: Vec<u32> = (0..count)
            .map_while(|slot| {
                let key = LegacySlotKey {
                    service_id,
                    revision,
                    slot,
                };
                legacy.get(&key, 0).ok()
            })
            .collect();
        if backends.len() != usize::from(count) {
            continue;
        }
        let Some(start) = slot_ranges.allocate(u32::from(count)) else {
            continue;
        };
        write_table(slots, start, service_id, &backends)?;
        if let Some(service) = installed.get_mut(&service_id) {
            service.slots = start;
            service.backends = backends;
        }
        moved.insert(service_id, start);
    }
    for (key, value) in values {
        if let Some(&start) = moved.get(&value.service_id) {
            let value = ServiceValue {
                slots: start,
                ..value
            };
            frontends
                .insert(&key, &value, 0)
                .map_err(|source| map_error(map_names::FRONTENDS4, "update", source))?;
        }
    }
    Ok(())
}

/// The services the maps hold (from the frontends and the slot tables in force) and the owner
/// of each frontend.
pub(crate) type InstalledState = (BTreeMap<u32, InstalledService>, BTreeMap<Frontend4Key, u32>);

pub(crate) fn read_installed(
    frontends: &HashMap<MapData, Frontend4Key, ServiceValue>,
    slots: &Array<MapData, Slot>,
) -> Result<InstalledState> {
    let mut installed: BTreeMap<u32, InstalledService> = BTreeMap::new();
    let mut owners = BTreeMap::new();
    let mut counts = BTreeMap::new();
    for entry in frontends.iter() {
        let (key, value) =
            entry.map_err(|source| map_error(map_names::FRONTENDS4, "iterate", source))?;
        let service = installed.entry(value.service_id).or_default();
        service.slots = value.slots;
        service.affinity_timeout_s = value.affinity_timeout_s;
        service.frontends.insert(key, value.flags);
        if value.flags & service_flags::MAGLEV != 0 {
            service.maglev_table = Some(value.maglev_table);
        }
        owners.insert(key, value.service_id);
        counts.insert(value.service_id, value.backend_count);
    }
    for (id, service) in &mut installed {
        let count = counts.get(id).copied().unwrap_or(0);
        if service.slots == 0 {
            continue;
        }
        let mut backends = Vec::with_capacity(count.into());
        for index in (service.slots..).take(count.into()) {
            let cell = slots
                .get(&index, 0)
                .map_err(|source| map_error(map_names::SLOTS4, "read", source))?;
            if cell.service_id != *id {
                break;
            }
            backends.push(cell.backend_id);
        }
        // A table cut short reads as none, so that the next sync writes it whole.
        if backends.len() == usize::from(count) {
            service.backends = backends;
        } else {
            service.slots = 0;
        }
    }
    Ok((installed, owners))
}

/// Frontend keys with the flags their entries carry: the frontends' kinds (a key used by several
/// kinds of one service gets all of them) plus the service's policy bits.
pub fn frontend_flags(service: &Service) -> BTreeMap<Frontend4Key, u32> {
    let policy = service.flags & !service_flags::KINDS;
    let mut flags = BTreeMap::new();
    for frontend in &service.frontends {
        *flags.entry(frontend.key()).or_insert(policy) |= frontend.kind & service_flags::KINDS;
    }
    flags
}

fn source_range_key(service_id: u32, (addr, prefix_len): &(Ipv4Addr, u8)) -> LpmKey<SourceRange4> {
    LpmKey::new(
        32 + u32::from(*prefix_len),
        SourceRange4 {
            service_id_be: service_id.to_be(),
            addr: u32::from(*addr).to_be(),
        },
    )
}

fn program_error(program: &'static str, operation: String, source: ProgramError) -> DatapathError {
    DatapathError::Program {
        program,
        operation,
        source: Box::new(source),
    }
}

fn link_error(
    program: &'static str,
    path: &Path,
    source: aya::programs::links::LinkError,
) -> DatapathError {
    DatapathError::Link {
        program,
        path: path.to_owned(),
        source: Box::new(source),
    }
}

/// The ifindex and MAC of a NIC of the calling thread's network namespace (through the kernel,
/// not /sys, which shows the namespace it was mounted in).
fn nic_address(iface: &str) -> Result<(u32, [u8; 6])> {
    let name = interface_name(iface)?;
    let not_found = || DatapathError::InterfaceName(iface.to_owned());
    // SAFETY: name is a NUL-terminated string that outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(not_found());
    }
    // SAFETY: a plain socket call; the descriptor is owned (and closed) right away.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if socket < 0 {
        return Err(not_found());
    }
    // SAFETY: socket is a descriptor we just opened and own.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(socket) };
    // SAFETY: an all-zero ifreq is valid; the name is copied in below, NUL-terminated.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= request.ifr_name.len() {
        return Err(not_found());
    }
    for (slot, byte) in request.ifr_name.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads ifr_name and writes ifr_hwaddr of this ifreq.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SIOCGIFHWADDR,
            &mut request,
        )
    };
    if rc != 0 {
        return Err(not_found());
    }
    // SAFETY: on success the kernel filled the hardware-address member of the union.
    let hwaddr = unsafe { request.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (byte, value) in mac.iter_mut().zip(hwaddr.sa_data) {
        *byte = value as u8;
    }
    Ok((ifindex, mac))
}

fn interface_name(iface: &str) -> Result<std::ffi::CString> {
    std::ffi::CString::new(iface).map_err(|_| DatapathError::InterfaceName(iface.to_owned()))
}

/// The link pinned at `path` by an earlier run, if any.
fn take_pinned_link(path: &Path, program: &'static str) -> Result<Option<FdLink>> {
    if !path.exists() {
        return Ok(None);
    }
    let pinned = PinnedLink::from_pin(path).map_err(|source| link_error(program, path, source))?;
    Ok(Some(FdLink::from(pinned)))
}

/// Swaps `program` into the bpf_link pinned at `path` (BPF_LINK_UPDATE), for the program types
/// whose aya 0.16 links offer no `attach_to_link` (cgroup skb and sock): the attachment never
/// goes away while the agent restarts.
fn update_pinned_link(
    path: &Path,
    program: std::result::Result<&aya::programs::ProgramFd, ProgramError>,
    name: &'static str,
) -> Result<()> {
    let operation = || format!("update the link pinned at {}", path.display());
    let program = program.map_err(|source| program_error(name, operation(), source))?;
    crate::bpf_link::update_pinned(path, program.as_fd()).map_err(|source| {
        program_error(
            name,
            operation(),
            ProgramError::SyscallError(aya::sys::SyscallError {
                call: "bpf_link_update",
                io_error: source,
            }),
        )
    })
}

fn pin_link(
    link: std::result::Result<FdLink, aya::programs::links::LinkError>,
    path: &Path,
    program: &'static str,
) -> Result<()> {
    let link = link.map_err(|source| link_error(program, path, source))?;
    // The pin keeps the attachment alive after this process; the returned handle only closes
    // this process's file descriptor when dropped.
    link.pin(path).map_err(|source| DatapathError::PinLink {
        program,
        path: path.to_owned(),
        source,
    })?;
    Ok(())
}

fn program_mut<'e, P>(ebpf: &'e mut Ebpf, name: &'static str) -> Result<&'e mut P>
where
    &'e mut P: TryFrom<&'e mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DatapathError::Program {
            program: name,
            operation: "type check".into(),
            source: Box::new(source),
        })
}

/// Loads a program and pins it as `<pin_dir>/<name>`, replacing what an earlier run pinned.
fn load_and_pin<P>(ebpf: &mut Ebpf, name: &'static str, pin_dir: &Path) -> Result<()>
where
    P: LoadAndPin,
    for<'e> &'e mut P: TryFrom<&'e mut aya::programs::Program, Error = ProgramError>,
{
    let program: &mut P = program_mut(ebpf, name)?;
    program
        .load_program()
        .map_err(|source| DatapathError::Program {
            program: name,
            operation: "load (verifier)".into(),
            source: Box::new(source),
        })?;
    let path = pin_dir.join(name);
    // A program pinned by an earlier run: the new one takes its place.
    let _ = std::fs::remove_file(&path);
    program
        .pin_program(&path)
        .map_err(|source| DatapathError::PinProgram {
            program: name,
            path,
            source,
        })
}

/// The load and pin calls every program type has, under one name.
trait LoadAndPin {
    fn load_program(&mut self) -> std::result::Result<(), ProgramError>;
    fn pin_program(&mut self, path: &Path) -> std::result::Result<(), aya::pin::PinError>;
}

macro_rules! impl_load_and_pin {
    ($($program:ty),*) => {$(
        impl LoadAndPin for $program {
            fn load_program(&mut self) -> std::result::Result<(), ProgramError> {
                self.load()
            }
            fn pin_program(&mut self, path: &Path) -> std::result::Result<(), aya::pin::PinError> {
                self.pin(path)
            }
        }
    )*};
}
impl_load_and_pin!(Xdp, SchedClassifier, CgroupSockAddr, CgroupSkb, CgroupSock);

/// A service name as the service-names map stores it.
pub type ServiceName = [u8; SERVICE_NAME_LEN];

/// The service-names map, pinned under the pin directory: opened when it is there, else
/// created. Only userspace uses it, so it is not part of the object file.
/// Removes the pins of maps an earlier release left under names this one no longer uses.
fn remove_retired_pins(pin_dir: &Path) -> Result<()> {
    for name in map_names::RETIRED {
        let path = pin_dir.join(name);
        match std::fs::remove_file(&path) {
            Err(source) if source.kind() != io::ErrorKind::NotFound => {
                return Err(DatapathError::PinDir { path, source });
            }
            _ => {}
        }
    }
    Ok(())
}

fn open_service_names(pin_dir: &Path) -> Result<HashMap<MapData, u32, ServiceName>> {
    let name = map_names::SERVICE_NAMES;
    let path = pin_dir.join(name);
    if !path.exists() {
        HashMap::<MapData, u32, ServiceName>::create(limits::MAX_SERVICES, BPF_F_NO_PREALLOC)
            .map_err(|source| map_error(name, "create", source))?
            .pin(&path)
            .map_err(|source| DatapathError::PinDir {
                path: path.clone(),
                source: io::Error::other(source),
            })?;
    }
    let data = MapData::from_pin(&path).map_err(|source| map_error(name, "open", source))?;
    HashMap::try_from(Map::HashMap(data)).map_err(|source| map_error(name, "open", source))
}

/// BPF_F_NO_PREALLOC (include/uapi/linux/bpf.h): names take memory only for services that exist.
const BPF_F_NO_PREALLOC: u32 = 1;

pub(crate) fn read_service_names(
    map: &HashMap<MapData, u32, ServiceName>,
) -> Result<BTreeMap<u32, String>> {
    map.iter()
        .map(|entry| entry.map(|(id, value)| (id, service_name(&value))))
        .collect::<std::result::Result<_, _>>()
        .map_err(|source| map_error(map_names::SERVICE_NAMES, "iterate", source))
}

/// The text of a stored service name (NUL padding removed).
fn service_name(value: &ServiceName) -> String {
    let len = value
        .iter()
        .position(|&byte| byte == 0)
        .unwrap_or(value.len());
    String::from_utf8_lossy(&value[..len]).into_owned()
}

/// Every backend by id. The agent's datapath and the read-only inspection share these readers.
pub(crate) fn read_backends(
    map: &HashMap<MapData, u32, Backend4>,
) -> Result<BTreeMap<u32, Backend>> {
    map.iter()
        .map(|entry| entry.map(|(id, value)| (id, Backend::from_value(&value))))
        .collect::<std::result::Result<_, _>>()
        .map_err(|source| map_error(map_names::BACKENDS4, "iterate", source))
}

/// A service's counters summed over CPUs.
pub(crate) fn read_service_counter(
    map: &PerCpuArray<MapData, ServiceCounter>,
    id: u32,
) -> Result<ServiceCounter> {
    let per_cpu = map
        .get(&id, 0)
        .map_err(|source| map_error(map_names::SERVICE_COUNTERS, "read", source))?;
    Ok(per_cpu
        .iter()
        .fold(ServiceCounter::default(), |sum, cpu| ServiceCounter {
            packets: sum.packets + cpu.packets,
            bytes: sum.bytes + cpu.bytes,
            new_flows: sum.new_flows + cpu.new_flows,
        }))
}

/// How often each event happened, summed over CPUs, by label.
pub(crate) fn read_events(map: &PerCpuArray<MapData, u64>) -> Result<BTreeMap<&'static str, u64>> {
    Event::ALL
        .iter()
        .map(|&(event, label)| {
            let per_cpu = map
                .get(&event.0, 0)
                .map_err(|source| map_error(map_names::EVENTS, "read", source))?;
            Ok((label, per_cpu.iter().sum()))
        })
        .collect()
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M>
where
    M: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    M::try_from(map).map_err(|source| map_error(name, "open", source))
}

fn map_error(map: &'static str, operation: &str, source: MapError) -> DatapathError {
    DatapathError::Map {
        map,
        operation: operation.to_owned(),
        source,
    }
}

/// E2BIG from BPF_MAP_UPDATE_ELEM: the map holds max_entries already.
fn is_full(error: &MapError) -> bool {
    matches!(error, MapError::SyscallError(syscall) if syscall.io_error.raw_os_error() == Some(libc::E2BIG))
}

fn insert<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    capacity: u32,
    key: &K,
    value: &V,
    operation: impl Fn() -> String,
) -> Result<()> {
    map.insert(key, value, 0).map_err(|source| {
        if is_full(&source) {
            DatapathError::MapFull {
                map: name,
                capacity,
                operation: operation(),
            }
        } else {
            map_error(name, &operation(), source)
        }
    })
}

/// Removes a key; a key that is already gone is not an error (removal is idempotent).
fn remove<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    key: &K,
    operation: impl Fn() -> String,
) -> Result<()> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(syscall))
            if syscall.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(source) => Err(map_error(name, &operation(), source)),
    }
}
