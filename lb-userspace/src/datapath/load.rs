//! Loading the datapath: its programs loaded and pinned (with their maps, created and pinned or
//! reused from the pin directory), the maps opened from their pins, what an earlier release left migrated or
//! removed, and the programs attached to NICs and a cgroup as pinned bpf_links.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io,
    net::IpAddr,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, ProgramArray},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, ProgramError,
        ProgramFd, SchedClassifier, TcAttachType, Xdp, XdpMode,
        cgroup_sock_addr::CgroupSockAddrLink,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use lb_common::{
    BackendValue, CtKey, CtValue, JiffiesClock, LegacySlotKey, ServiceValue, ct_direction,
    ct_flags, limits, map_names, program_names, proto, tc_programs, xdp_programs,
};

use crate::compile::model::FrontendKey;

use super::{
    Datapath, InstalledService, ServiceName,
    address_filter::{AddressFilter, FilterKey},
    bpf_obj::Access,
    ebpf_log::EbpfLogLevel,
    error::{DatapathError, Result, map_error},
    maps::{Maps, open_maglev_tables, open_map, open_map_data},
    nic::{interface_name, nic_address},
    object::DATAPATH_OBJECT,
    pins::LINKS_DIR,
    read::{read_backends, read_installed, read_service_names, read_source_ranges},
    slot_ranges::SlotRanges,
    write::write_table,
};

const SOCKET_HOOKS: [&str; 8] = [
    program_names::CONNECT4,
    program_names::SENDMSG4,
    program_names::RECVMSG4,
    program_names::GETPEERNAME4,
    program_names::CONNECT6,
    program_names::SENDMSG6,
    program_names::RECVMSG6,
    program_names::GETPEERNAME6,
];

/// Sizes of the maps a deployment may want other than the `limits` constants (`lb run
/// --frontend-map-size`, `--conntrack-map-size`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Entries of the IPv4 frontends map.
    pub frontends4: u32,
    /// Entries of the IPv4 conntrack map (an LRU map: when full, a new entry evicts the least
    /// recently used one).
    pub conntrack4: u32,
}

impl MapSizes {
    /// The sizes of the maps pinned under `pin_dir`, as the kernel has them; `otherwise`'s for
    /// a map not pinned there. aya reuses a pinned map only at the size the object asks for.
    pub fn pinned_or(pin_dir: &Path, otherwise: MapSizes) -> MapSizes {
        let size = |name: &str, otherwise: u32| {
            aya::maps::MapInfo::from_pin(pin_dir.join(name))
                .map(|info| info.max_entries())
                .unwrap_or(otherwise)
        };
        MapSizes {
            frontends4: size(map_names::FRONTENDS4, otherwise.frontends4),
            conntrack4: size(map_names::CONNTRACK4, otherwise.conntrack4),
        }
    }
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            frontends4: limits::MAX_FRONTENDS,
            conntrack4: limits::MAX_CONNTRACK,
        }
    }
}

/// The sizes to load with: a map pinned by an earlier agent keeps its size, since the kernel
/// cannot resize a map and the agent keeps the pinned one and its flows (the loader refuses a
/// pinned map of another size than the object asks for, which would stop every start after
/// `--conntrack-map-size` or `--frontend-map-size` changed). Each size kept over the one asked
/// for is logged with how to get the new one.
fn pinned_sizes(pin_dir: &Path, asked: MapSizes) -> MapSizes {
    let sizes = MapSizes::pinned_or(pin_dir, asked);
    for (map, flag, pinned, asked) in [
        (
            map_names::FRONTENDS4,
            "--frontend-map-size",
            sizes.frontends4,
            asked.frontends4,
        ),
        (
            map_names::CONNTRACK4,
            "--conntrack-map-size",
            sizes.conntrack4,
            asked.conntrack4,
        ),
    ] {
        if pinned != asked {
            tracing::warn!(
                map,
                pinned,
                asked,
                "a pinned map keeps its size: {flag} takes effect once `lb run --cleanup` has \
                 removed the pins (which forgets the flows they hold)"
            );
        }
    }
    sizes
}

impl Datapath {
    /// Loads every program of the datapath, reusing the maps pinned under `pin_dir` or creating
    /// and pinning them there. bpffs is mounted at its usual place when missing; the pin
    /// directory is created 0700 and refused when it is not on bpffs or not this user's.
    pub fn load(pin_dir: &Path) -> Result<Self> {
        Self::load_with(pin_dir, MapSizes::default(), EbpfLogLevel::Off)
    }

    /// As [`Self::load`], with the programs' debug logging at `log_level` (see
    /// [`super::ebpf_log`]; read it through [`Self::ebpf_log_forwarder`]).
    pub fn load_with_log_level(pin_dir: &Path, log_level: EbpfLogLevel) -> Result<Self> {
        Self::load_with(pin_dir, MapSizes::default(), log_level)
    }

    /// As [`Datapath::load`], creating the maps of [`MapSizes`] (when they are not pinned yet)
    /// with the sizes given instead of the `limits` constants. A pinned map keeps the size it
    /// was created with, and that size is the one the agent keeps to.
    pub fn load_sized(pin_dir: &Path, sizes: MapSizes) -> Result<Self> {
        Self::load_with(pin_dir, sizes, EbpfLogLevel::Off)
    }

    /// As [`Self::load_sized`] and [`Self::load_with_log_level`] at once (the agent's load).
    pub fn load_with(pin_dir: &Path, sizes: MapSizes, log_level: EbpfLogLevel) -> Result<Self> {
        super::bpffs::ensure_mounted(Path::new(super::bpffs::DEFAULT_MOUNT))?;
        super::bpffs::create_pin_dir(pin_dir)?;
        // Whether an agent of this layout left a backends array, or this load creates it empty.
        let backends_array_left = pin_dir.join(map_names::BACKENDS4).exists();
        let backends6_array_left = pin_dir.join(map_names::BACKENDS6).exists();
        // Whether an earlier agent's programs may still be writing conntrack (until this load's
        // are attached): they make pairs without setting the pair filter's bits.
        let conntrack_left = pin_dir.join(map_names::CONNTRACK4).exists()
            || pin_dir.join(map_names::CONNTRACK6).exists();
        let sizes = pinned_sizes(pin_dir, sizes);
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(pin_dir)
            .map_max_entries(map_names::FRONTENDS4, sizes.frontends4)
            .map_max_entries(map_names::CONNTRACK4, sizes.conntrack4);
        super::ebpf_log::set_level(&mut loader, log_level);
        let mut ebpf = loader
            .load(DATAPATH_OBJECT)
            .map_err(|source| DatapathError::Load {
                pin_dir: pin_dir.to_owned(),
                source: Box::new(source),
            })?;
        ensure_service_names(pin_dir)?;
        let mut maps = Maps::open(pin_dir, Access::ReadWrite)?;
        let (mut installed, owners) = read_installed(&maps)?;
        let xdp_groups: BTreeSet<XdpGroup> = owners
            .keys()
            .flat_map(|frontend| XdpGroup::serving(frontend).iter().copied())
            .collect();
        let mut names: Vec<&'static str> = [
            program_names::XDP_LB,
            program_names::XDP_LOOKUP,
            program_names::XDP_DSR,
            program_names::XDP_DIRECT,
            program_names::XDP_TOO_BIG,
        ]
        .into_iter()
        .chain(xdp_groups.iter().flat_map(|group| group.program_names()))
        .collect();
        // tc and the socket hooks too, in the same threads: their verification then overlaps
        // the XDP programs' instead of following it.
        names.extend([
            program_names::TC_EGRESS,
            program_names::TC_EGRESS6,
            program_names::TC_EGRESS6_DIRECT,
        ]);
        names.extend(SOCKET_HOOKS);
        names.extend([program_names::SOCK_EGRESS4, program_names::SOCK_RELEASE]);
        let clock_sample = load_clock_sample(&mut ebpf)?;
        // What needs no program waits for none: the clock's calibration (idle between its
        // samples) and the conntrack reads (a walk of every bucket) overlap the verification.
        let (clock, conntrack, conntrack6) =
            load_programs_while(&mut ebpf, pin_dir, &names, || {
                (
                    super::clock::calibrate(&clock_sample),
                    super::batch::read_map(&maps.conntrack),
                    super::batch::read_map(&maps.conntrack6),
                )
            })?;
        let conntrack =
            conntrack.map_err(|source| map_error(map_names::CONNTRACK4, "iterate", source))?;
        let conntrack6 =
            conntrack6.map_err(|source| map_error(map_names::CONNTRACK6, "iterate", source))?;
        install_tail_calls(&mut ebpf, &LB_XDP_PROGRAMS)?;
        for group in XdpGroup::ALL {
            if xdp_groups.contains(&group) {
                install_tail_calls(&mut ebpf, group.programs())?;
            } else {
                // An earlier load's, which no lb_xdp of this load calls.
                for name in group.program_names() {
                    remove_pin(&pin_dir.join(name))?;
                }
            }
        }
        install_tc_tail_call(&mut ebpf)?;
        let clock = write_clock(&mut ebpf, clock)?;
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
            migrate_legacy_slots(pin_dir, &mut installed, &mut maps, &mut slot_ranges)?;
        }
        if pin_dir.join(map_names::LEGACY_BACKENDS4).exists() {
            migrate_legacy_backends(
                pin_dir,
                (map_names::LEGACY_BACKENDS4, map_names::BACKENDS4),
                &mut maps.backends,
                backends_array_left,
            )?;
        }
        if pin_dir.join(map_names::LEGACY_BACKENDS6).exists() {
            migrate_legacy_backends(
                pin_dir,
                (map_names::LEGACY_BACKENDS6, map_names::BACKENDS6),
                &mut maps.backends6,
                backends6_array_left,
            )?;
        }
        migrate_config(pin_dir, &mut maps.config)?;
        remove_retired_pins(pin_dir)?;
        // Rewritten whole before any program of this load is attached: a map new to the pin
        // directory (an upgrade) starts empty, and stale bits would only cost lookups.
        let frontend_filter = AddressFilter::rebuild(
            map_names::FRONTEND_FILTER,
            open_map(pin_dir, map_names::FRONTEND_FILTER, Access::ReadWrite)?,
            owners.keys().filter_map(FilterKey::of_frontend),
        )?;
        // Read again rather than taken from read_installed's walk: migrate_legacy_slots above
        // rewrote the entries of an earlier release's tables.
        // A slot keeps its table only if the slot array holds that table for its entry.
        let table_of = |value: &ServiceValue| super::write::table_of(&installed, value).to_vec();
        let frontend_index4 = super::frontend_index::open(
            pin_dir,
            map_names::FRONTEND_INDEX4,
            super::batch::read_map(&maps.frontends)
                .map_err(|source| map_error(map_names::FRONTENDS4, "read", source))?,
            table_of,
        )?;
        let frontend_index6 = super::frontend_index::open(
            pin_dir,
            map_names::FRONTEND_INDEX6,
            super::batch::read_map(&maps.frontends6)
                .map_err(|source| map_error(map_names::FRONTENDS6, "read", source))?,
            table_of,
        )?;
        // Kept for the pair filter's keeper, which waits for running programs in a thread of
        // its own.
        let grace_outer = grace_outer_fd(&ebpf)?;
        let grace = (
            take_private_map(&mut ebpf, map_names::GRACE)?,
            Array::<MapData, u32>::create(1, super::write::BPF_F_INNER_MAP)
                .map_err(|source| map_error(map_names::GRACE, "create its inner map", source))?,
        );
        for (id, range) in read_source_ranges(&maps)? {
            if let Some(service) = installed.get_mut(&id) {
                service.source_ranges.insert(range);
            }
        }
        let installed_backends = read_backends(&maps)?;
        let migrated = super::migrate::pairs_to_flow_entries(&mut maps.conntrack, &conntrack)?;
        if migrated > 0 {
            tracing::info!(
                migrated,
                "flows an earlier datapath kept as two conntrack entries got their FLOW entry"
            );
        }
        // The backends, and the backends of live flows that left the maps (the sources of
        // REPLY entries, the backends of FLOW entries), whose answers tc must still translate.
        let reply_sources = reply_sources(&conntrack, FilterKey::new)
            .into_iter()
            .chain(reply_sources(&conntrack6, FilterKey::new6));
        let backend_filter = AddressFilter::rebuild(
            map_names::BACKEND_FILTER,
            take_private_map(&mut ebpf, map_names::BACKEND_FILTER)?,
            installed_backends
                .values()
                .filter_map(FilterKey::of_backend)
                .chain(reply_sources),
        )?;
        let pair_filter = super::pair_filter::PairFilter::map(
            take_private_map(&mut ebpf, map_names::PAIR_FILTER)?,
            (grace_outer, inner_map_fd(&grace.1)?),
        )
        .map_err(|io_error| super::pair_filter::map_error("map its memory", "mmap", io_error))?;
        if conntrack_left {
            // Emptied by `Datapath::pair_filter_keeper`'s first rebuild, once attached.
            for generation in 0..lb_common::pair_filter::GENERATIONS {
                pair_filter.fill(generation);
            }
        }
        let direct_return = super::direct_return::DirectReturn::new(
            take_private_map(&mut ebpf, map_names::DSR_ADMISSIONS4)?,
            take_private_map(&mut ebpf, map_names::NODES4)?,
            &installed,
            &installed_backends,
        )?;
        let names = read_service_names(&maps.service_names)?;
        let maglev = open_map_data(pin_dir, map_names::MAGLEV4, Access::ReadWrite)?;
        check_maglev_tables(pin_dir, &mut installed)?;
        forget_unused_maglev_tables(&maglev, &installed)?;
        // The pinned map's size, which the load kept (`pinned_sizes`).
        let frontends4_capacity = sizes.frontends4;
        let mut datapath = Self {
            xdp_groups,
            frontends4_capacity,
            maps,
            frontend_filter,
            backend_filter,
            pair_filter: std::sync::Arc::new(pair_filter),
            frontend_index4,
            frontend_index6,
            grace,
            installed,
            owners,
            installed_backends,
            slot_ranges,
            nic_macs: take_private_map(&mut ebpf, map_names::NIC_MACS)?,
            nic_slots: BTreeMap::new(),
            nic_macs_recorded: BTreeMap::new(),
            tx_ports: take_private_map(&mut ebpf, map_names::TX_PORTS)?,
            maglev,
            maglev_pending: BTreeMap::new(),
            maglev_deferred: false,
            maglev_prepared: BTreeMap::new(),
            departed_udp: BTreeSet::new(),
            new_udp_frontends: BTreeSet::new(),
            cleanup_failures: Vec::new(),
            clock,
            hooks_cgroup: None,
            ranged_services: BTreeSet::new(),
            source_check_attached: false,
            direct_return,
            names,
            ebpf,
            pin_dir: pin_dir.to_owned(),
        };
        // Before any program of this load is attached: they read the index. The second round
        // clears the overflow bytes of buckets the first filled.
        for _ in 0..2 {
            datapath.refill_frontend_index()?;
        }
        Ok(datapath)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The reader of the programs' log records, which forwards them to the agent's log: once,
    /// for a datapath loaded with a log level.
    pub fn ebpf_log_forwarder(&mut self) -> Result<super::ebpf_log::Forwarder> {
        super::ebpf_log::forwarder(&mut self.ebpf)
            .map_err(|error| DatapathError::Invalid(format!("the programs' log: {error}")))
    }

    /// Pins this load's program arrays (the programs its `lb_xdp` and its `lb_tc_egress`
    /// tail-call) in the pin directory, in place of an earlier load's, so that they outlive the
    /// agent. Call it once this load's `lb_xdp` and `lb_tc_egress` are attached to every NIC:
    /// until then an earlier load's may still run on some, and its arrays must stay pinned (an
    /// array nobody holds is emptied).
    pub fn pin_program_arrays(&mut self) -> Result<()> {
        for name in [map_names::XDP_PROGRAMS, map_names::TC_PROGRAMS] {
            let path = self.pin_dir.join(name);
            // bpffs refuses names with a dot (kernel/bpf/inode.c, bpf_lookup).
            let staged = self.pin_dir.join(format!("{name}_new"));
            remove_pin(&staged)?;
            self.ebpf
                .map(name)
                .ok_or(DatapathError::MissingMap(name))?
                .pin(&staged)
                .map_err(|source| DatapathError::PinMap {
                    map: name,
                    path: staged.clone(),
                    source,
                })?;
            // One rename replaces the earlier pin: there is no moment without one.
            std::fs::rename(&staged, &path)
                .map_err(|source| DatapathError::PinDir { path, source })?;
        }
        Ok(())
    }

    /// Attaches the XDP program to a NIC of the calling thread's network namespace.
    ///
    /// Attachments are bpf_links pinned under `<pin_dir>/links/`, so they outlive the agent: a
    /// restarted (or upgraded) agent finds the pinned link and swaps its own program in
    /// atomically (BPF_LINK_UPDATE); traffic never runs without the datapath.
    pub fn attach_xdp(&mut self, iface: &str, mode: XdpMode) -> Result<()> {
        let (ifindex, mac) = nic_address(iface)?;
        self.record_nic_mac(ifindex, mac)?;
        // The NIC becomes a port XDP may send frames out of (XDP_REDIRECT), unless XDP runs
        // there in generic mode: a redirect into it from a NIC in native mode goes through its
        // driver's ndo_xdp_xmit, which a veth serves only to a peer that runs NAPI
        // (drivers/net/veth.c, `veth_xdp_xmit`) and most drivers only with a native program
        // of their own, and the kernel drops the frame unseen. The stack forwards instead.
        self.allow_redirect_to(ifindex, mode != XdpMode::Skb)?;
        let name = program_names::XDP_LB;
        let pin = self.link_pin(&super::pins::xdp_link_name(iface))?;
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
        let pin = self.link_pin(&super::pins::tc_egress_link_name(iface))?;
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
        self.attach_sock_release(cgroup, &file)?;
        self.hooks_cgroup = Some(cgroup.to_owned());
        self.ranged_services = self
            .installed
            .iter()
            .filter(|(_, installed)| super::needs_source_check(installed))
            .map(|(&id, _)| id)
            .collect();
        self.settle_source_check()
    }

    /// `lb_sock_egress4` on the hooks' cgroup while an installed service has source ranges, and
    /// not otherwise: every packet of every socket in the cgroup passes it, about 2 µs a
    /// request of a request/response connection (docs/datapath.md, known limits). At load, it
    /// takes over or removes the link an earlier agent left.
    pub(super) fn settle_source_check(&mut self) -> Result<()> {
        if self.ranged_services.is_empty() {
            self.detach_source_check()
        } else {
            self.attach_source_check()
        }
    }

    /// Attaches `lb_sock_egress4` if it is not yet: before a service's frontends get the
    /// ranges' flag, so that no socket records a check that no program makes.
    pub(super) fn attach_source_check(&mut self) -> Result<()> {
        if self.source_check_attached {
            return Ok(());
        }
        let Some(cgroup) = self.hooks_cgroup.clone() else {
            return Ok(());
        };
        let file = File::open(&cgroup).map_err(|source| DatapathError::Cgroup {
            path: cgroup.clone(),
            source,
        })?;
        self.attach_sock_egress(&cgroup, &file)?;
        self.source_check_attached = true;
        Ok(())
    }

    /// Detaches `lb_sock_egress4`: its link lives in its pin alone.
    pub(super) fn detach_source_check(&mut self) -> Result<()> {
        if self.hooks_cgroup.is_none() {
            return Ok(());
        }
        let name = program_names::SOCK_EGRESS4;
        let pin = self.link_pin(name)?;
        match std::fs::remove_file(&pin) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(DatapathError::UnpinLink {
                    program: name,
                    path: pin,
                    source,
                });
            }
        }
        self.source_check_attached = false;
        Ok(())
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
        super::bpffs::create_pin_dir(&dir)?;
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
}

/// Moves the selection tables an agent of an earlier release left in the hash map
/// `lb4_slot_v1` (keyed by service, revision and slot) into the slot array, and points each
/// frontend of theirs at the new cells in one update. The entries keep their `legacy_revision`,
/// so that the earlier release's programs, which run until this load's are attached, keep
/// selecting from the old map meanwhile; the next sync writes every service afresh anyway.
fn migrate_legacy_slots(
    pin_dir: &Path,
    installed: &mut BTreeMap<u32, InstalledService>,
    maps: &mut Maps,
    slot_ranges: &mut SlotRanges,
) -> Result<()> {
    let legacy: HashMap<MapData, LegacySlotKey, u32> =
        open_map(pin_dir, map_names::LEGACY_SLOTS4, Access::ReadOnly)?;
    let Maps {
        frontends, slots, ..
    } = maps;
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

/// Copies the backends of one family an agent of an earlier release left in a hash map
/// (`lb4_be_v1`, `lb6_be_v1`) into the family's backends array (`names`: the hash map's, the
/// array's) under the same ids, before any program of this load is attached: the selection
/// tables, affinity and UDP flows name backends by id. The earlier release's programs keep
/// reading the hash map until this load's replace them.
///
/// The hash map is the truth: it is unpinned right after this copy, so a load that finds it
/// follows an earlier release's agent (an upgrade, or an upgrade again after a rollback, when
/// the array still holds what this release last wrote). Every cell it does not hold is vacated.
/// An array this load created (`array_left` false: the first upgrade) is all vacant cells and
/// is not read: reading its `MAX_BACKENDS` cells is most of the migration's time (70 ms of a
/// debug build's), which the agent's first sync waits for.
fn migrate_legacy_backends<A: Copy>(
    pin_dir: &Path,
    (legacy_name, name): (&'static str, &'static str),
    cells: &mut Array<MapData, BackendValue<A>>,
    array_left: bool,
) -> Result<()>
where
    BackendValue<A>: aya::Pod,
{
    let legacy: HashMap<MapData, u32, BackendValue<A>> =
        open_map(pin_dir, legacy_name, Access::ReadOnly)?;
    let legacy: BTreeMap<u32, BackendValue<A>> = super::batch::read_map(&legacy)
        .map_err(|source| map_error(legacy_name, "iterate", source))?
        .into_iter()
        .filter(|(id, backend)| *id < limits::MAX_BACKENDS && backend.in_use())
        .collect();
    let left = if array_left {
        super::batch::read_map(cells).map_err(|source| map_error(name, "iterate", source))?
    } else {
        Vec::new()
    };
    let stale = left
        .into_iter()
        .filter(|(id, cell)| cell.in_use() && !legacy.contains_key(id));
    let writes = legacy
        .iter()
        .map(|(&id, &backend)| (id, backend))
        .chain(stale.map(|(id, cell)| (id, cell.vacated())));
    for (id, value) in writes {
        cells
            .set(id, &value, 0)
            .map_err(|source| map_error(name, "migrate", source))?;
    }
    Ok(())
}

/// Removes the pins of maps an earlier release left under names this one no longer uses.
impl Datapath {
    /// Removes the pins of [`map_names::RETIRED_AFTER_SYNC`]: the agent calls this after a sync
    /// that wrote every service, when nothing of an earlier release's state is left in use.
    pub fn remove_pins_retired_after_sync(&mut self) -> Result<()> {
        for name in map_names::RETIRED_AFTER_SYNC {
            remove_pin(&self.pin_dir.join(name))?;
        }
        Ok(())
    }
}

fn remove_retired_pins(pin_dir: &Path) -> Result<()> {
    for name in map_names::RETIRED {
        remove_pin(&pin_dir.join(name))?;
    }
    Ok(())
}

/// An earlier agent's settings (`lb_cfg_v2`: the SNAT address and ports, the timeouts but the
/// half-closed one, which `lb_cfg_v3` added) copied into the config map, so that the programs
/// attached before the first sync writes the settings find them: with an empty config they
/// would send flows to other nodes' endpoints without SNAT meanwhile. Its pin is there only
/// until a load of this release has gone that far (it is retired right after), so nothing in
/// `lb_cfg_v3` is newer: an earlier load that failed on the way, or an earlier agent that came
/// back and ran since.
fn migrate_config(
    pin_dir: &Path,
    config: &mut Array<MapData, lb_common::DatapathConfig>,
) -> Result<()> {
    const EARLIER: &str = "lb_cfg_v2";
    if !pin_dir.join(EARLIER).exists() {
        return Ok(());
    }
    let earlier: Array<MapData, [u8; 48]> = open_map(pin_dir, EARLIER, Access::ReadOnly)?;
    let bytes = earlier
        .get(&0, 0)
        .map_err(|source| map_error(EARLIER, "read", source))?;
    let word = |at: usize| u64::from_ne_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let migrated = lb_common::DatapathConfig {
        snat_addr: u32::from_ne_bytes(bytes[0..4].try_into().expect("4 bytes")),
        snat_port_min: u16::from_ne_bytes([bytes[4], bytes[5]]),
        snat_port_max: u16::from_ne_bytes([bytes[6], bytes[7]]),
        timeouts: lb_common::CtTimeouts {
            tcp_syn: word(8),
            tcp_established: word(16),
            tcp_closing: word(24),
            udp: word(32),
            snat_port_reuse: word(40),
            tcp_half_closed: 0,
        },
    };
    config
        .set(0, &migrated, 0)
        .map_err(|source| map_error(map_names::CONFIG, "write", source))
}

/// Removes a pin if there is one.
fn remove_pin(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(source) if source.kind() != io::ErrorKind::NotFound => Err(DatapathError::PinDir {
            path: path.to_owned(),
            source,
        }),
        _ => Ok(()),
    }
}

/// Creates and pins the service-names map when the pin directory has none. Only userspace
/// uses it, so it is not part of the object file.
fn ensure_service_names(pin_dir: &Path) -> Result<()> {
    let name = map_names::SERVICE_NAMES;
    let path = pin_dir.join(name);
    if path.exists() {
        return Ok(());
    }
    HashMap::<MapData, u32, ServiceName>::create(limits::MAX_SERVICES, BPF_F_NO_PREALLOC)
        .map_err(|source| map_error(name, "create", source))?
        .pin(&path)
        .map_err(|source| DatapathError::PinDir {
            path,
            source: io::Error::other(source),
        })?;
    Ok(())
}

/// BPF_F_NO_PREALLOC (include/uapi/linux/bpf.h): names take memory only for services that exist.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Loads the clock sample program, whose runs [`super::clock::calibrate`] the programs' clock
/// with, and returns its fd.
fn load_clock_sample(ebpf: &mut Ebpf) -> Result<ProgramFd> {
    let name = program_names::CLOCK_SAMPLE;
    let program = program_mut::<Xdp>(ebpf, name)?;
    program
        .load()
        .map_err(|source| program_error(name, "load (verifier)".into(), source))?;
    program
        .fd()
        .and_then(|fd| fd.try_clone().map_err(ProgramError::IOError))
        .map_err(|source| program_error(name, "duplicate its fd".into(), source))
}

/// Writes the calibrated clock for the programs, before any of them is attached. A calibration
/// that failed leaves them on the coarse-clock helper, which reads the same time at a higher
/// cost per packet: logged, not fatal.
fn write_clock(
    ebpf: &mut Ebpf,
    calibrated: std::result::Result<JiffiesClock, String>,
) -> Result<Option<JiffiesClock>> {
    let clock = match calibrated {
        Ok(clock) => clock,
        Err(reason) => {
            tracing::warn!(%reason, "the datapath's clock is not calibrated: it reads bpf_ktime_get_coarse_ns");
            return Ok(None);
        }
    };
    // Written where it is, not taken out of the object: a map the object lets go of closes its
    // fd, which the next opened map gets, and a program loaded later (see
    // `Datapath::ensure_xdp_group`) would be verified against that map instead (its
    // instructions hold the fd number).
    let name = map_names::CLOCK;
    let map = ebpf.map_mut(name).ok_or(DatapathError::MissingMap(name))?;
    let mut map: Array<&mut MapData, JiffiesClock> =
        Array::try_from(map).map_err(|source| map_error(name, "open", source))?;
    map.set(0, &clock, 0)
        .map_err(|source| map_error(name, "write", source))?;
    Ok(Some(clock))
}

/// The backends answers come from, by the conntrack entries of one family (`key` makes that
/// family's filter key): the sources of the REPLY entries and the backends of the FLOW entries
/// of local endpoints.
fn reply_sources<A: lb_common::CtAddr>(
    entries: &[(CtKey<A>, CtValue<A>)],
    key: impl Fn(A, u16, u8) -> FilterKey,
) -> Vec<FilterKey> {
    entries
        .iter()
        .filter_map(|(ct_key, entry)| match ct_key.direction {
            ct_direction::REPLY => Some(key(ct_key.saddr, ct_key.sport, ct_key.proto)),
            ct_direction::FLOW if entry.flags & ct_flags::SNAT == 0 => {
                Some(key(entry.nat_addr, entry.nat_port, ct_key.proto))
            }
            _ => None,
        })
        .collect()
}

/// The programs `lb_xdp` tail-calls for IPv4 TCP, by their slots in
/// [`map_names::XDP_PROGRAMS`]: loaded with `lb_xdp` at every start, as IPv4 TCP is `lb_xdp`'s
/// own.
pub(crate) const LB_XDP_PROGRAMS: [(u32, &str); 4] = [
    (xdp_programs::LOOKUP, program_names::XDP_LOOKUP),
    (xdp_programs::DSR, program_names::XDP_DSR),
    (xdp_programs::DIRECT_RETURN, program_names::XDP_DIRECT),
    (xdp_programs::TOO_BIG, program_names::XDP_TOO_BIG),
];

/// The programs `lb_xdp` tail-calls for the other protocols and IPv6, by their slot in
/// [`map_names::XDP_PROGRAMS`], in the order of their [`XdpGroup`]s.
pub(crate) const PROTOCOL_PROGRAMS: [(u32, &str); 12] = [
    (xdp_programs::UDP, program_names::XDP_UDP),
    (xdp_programs::SCTP, program_names::XDP_SCTP),
    (xdp_programs::IPV6, program_names::XDP6),
    (xdp_programs::IPV6_UDP, program_names::XDP6_UDP),
    (xdp_programs::IPV6_FRONTEND, program_names::XDP6_FRONTEND),
    (xdp_programs::IPV6_FLOW, program_names::XDP6_FLOW),
    (xdp_programs::IPV6_DELIVER, program_names::XDP6_DELIVER),
    (xdp_programs::IPV6_ICMP, program_names::XDP6_ICMP),
    (
        xdp_programs::IPV6_DIRECT_TCP,
        program_names::XDP6_DIRECT_TCP,
    ),
    (
        xdp_programs::IPV6_DIRECT_UDP,
        program_names::XDP6_DIRECT_UDP,
    ),
    (xdp_programs::IPV6_SCTP, program_names::XDP6_SCTP),
    (
        xdp_programs::IPV6_DIRECT_SCTP,
        program_names::XDP6_DIRECT_SCTP,
    ),
];

/// The programs `lb_xdp` tail-calls, in groups each loaded only where the datapath has a
/// frontend the group serves: at a start that finds one in the pins, or just before the first
/// is written ([`Datapath::ensure_xdp_group`]). Verification is most of an agent's start (on
/// the lab's 2-core machines about 1 s for `lb_xdp` with tc and the socket hooks, then
/// `lb_xdp_udp` 0.4 s, `lb_xdp_sctp` 0.8 s, the IPv6 pipeline 1.6-1.7 s, IPv6 SCTP 0.2 s on
/// top of it), which
/// every restart and upgrade waits for before its first sync.
/// Until a group is in the program array, `lb_xdp` passes its packets untouched, counted as
/// `pass_protocol_unserved`: there is no frontend for them to reach, nor a flow to translate
/// (flows are made by frontends). IPv4 TCP is `lb_xdp`'s own, loaded at every start with
/// `lb_xdp_lookup` ([`LB_XDP_PROGRAMS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum XdpGroup {
    /// `lb_xdp_udp`: IPv4 UDP.
    Udp,
    /// `lb_xdp_sctp`: IPv4 SCTP.
    Sctp,
    /// The IPv6 pipeline: TCP, UDP, ICMPv6 errors, and the stages after them every protocol
    /// shares.
    Ipv6,
    /// `lb_xdp6_sctp` and `lb_xdp6_direct_sctp`: SCTP over IPv6, on top of [`Self::Ipv6`].
    Ipv6Sctp,
}

impl XdpGroup {
    pub const ALL: [Self; 4] = [Self::Udp, Self::Sctp, Self::Ipv6, Self::Ipv6Sctp];

    /// The groups a frontend's packets need beside `lb_xdp`, in the order they load.
    pub fn serving(frontend: &FrontendKey) -> &'static [Self] {
        Self::of(frontend.addr(), frontend.proto())
    }

    /// As [`Self::serving`], by a frontend's address and protocol number.
    pub fn of(addr: IpAddr, protocol: u8) -> &'static [Self] {
        match (addr, protocol) {
            (IpAddr::V6(_), proto::SCTP) => &[Self::Ipv6, Self::Ipv6Sctp],
            (IpAddr::V6(_), _) => &[Self::Ipv6],
            (IpAddr::V4(_), proto::UDP) => &[Self::Udp],
            (IpAddr::V4(_), proto::SCTP) => &[Self::Sctp],
            (IpAddr::V4(_), _) => &[],
        }
    }

    /// Its programs, by their slot in the program array.
    pub(crate) fn programs(self) -> &'static [(u32, &'static str)] {
        match self {
            Self::Udp => &PROTOCOL_PROGRAMS[..1],
            Self::Sctp => &PROTOCOL_PROGRAMS[1..2],
            Self::Ipv6 => &PROTOCOL_PROGRAMS[2..10],
            Self::Ipv6Sctp => &PROTOCOL_PROGRAMS[10..],
        }
    }

    pub fn program_names(self) -> impl Iterator<Item = &'static str> {
        self.programs().iter().map(|&(_, name)| name)
    }
}

/// Puts the loaded protocol programs in the object's program array, the one its `lb_xdp`
/// tail-calls (an `lb_xdp` of an earlier load keeps its own).
pub(crate) fn install_tail_calls(ebpf: &mut Ebpf, programs: &[(u32, &'static str)]) -> Result<()> {
    install_in(ebpf, map_names::XDP_PROGRAMS, programs)
}

/// Puts the loaded `lb_tc_egress6` and `lb_tc_egress6_direct` in the object's tc program array,
/// the one its `lb_tc_egress` tail-calls for IPv6.
fn install_tc_tail_call(ebpf: &mut Ebpf) -> Result<()> {
    let programs = [
        (tc_programs::IPV6, program_names::TC_EGRESS6),
        (tc_programs::IPV6_DIRECT, program_names::TC_EGRESS6_DIRECT),
    ];
    install_in(ebpf, map_names::TC_PROGRAMS, &programs)
}

/// Puts `programs` (loaded, of whatever kind) in their slots of the object's program array
/// `name`.
fn install_in(ebpf: &mut Ebpf, name: &'static str, programs: &[(u32, &'static str)]) -> Result<()> {
    for &(slot, program) in programs {
        let fd = ebpf
            .program(program)
            .ok_or(DatapathError::MissingProgram(program))?
            .fd()
            .and_then(|fd| fd.try_clone().map_err(ProgramError::IOError))
            .map_err(|source| program_error(program, "duplicate its fd".into(), source))?;
        let map = ebpf.map_mut(name).ok_or(DatapathError::MissingMap(name))?;
        ProgramArray::try_from(map)
            .map_err(|source| map_error(name, "open", source))?
            .set(slot, &fd, 0)
            .map_err(|source| map_error(name, "update", source))?;
    }
    Ok(())
}

impl Datapath {
    /// Loads the programs of `group` and puts them in the program array, unless that is done
    /// (see [`XdpGroup`]). The sync that writes the group's first frontend waits for it.
    pub fn ensure_xdp_group(&mut self, group: XdpGroup) -> Result<()> {
        if self.xdp_groups.contains(&group) {
            return Ok(());
        }
        let names: Vec<&'static str> = group.program_names().collect();
        load_programs(&mut self.ebpf, &self.pin_dir, &names)?;
        install_tail_calls(&mut self.ebpf, group.programs())?;
        self.xdp_groups.insert(group);
        tracing::info!(
            ?group,
            "XDP programs loaded, for the group's first frontend"
        );
        Ok(())
    }
}

/// A copy of the descriptor of the grace map, still in the object.
fn grace_outer_fd(ebpf: &Ebpf) -> Result<OwnedFd> {
    match ebpf.map(map_names::GRACE) {
        Some(Map::ArrayOfMaps(data)) => duplicate_fd(data.fd().as_fd(), map_names::GRACE),
        _ => Err(DatapathError::MissingMap(map_names::GRACE)),
    }
}

/// A copy of the descriptor of the grace map's inner map.
fn inner_map_fd(inner: &Array<MapData, u32>) -> Result<OwnedFd> {
    use aya::maps::IterableMap as _;
    duplicate_fd(inner.map().fd().as_fd(), map_names::GRACE)
}

/// A copy of the descriptor `fd` of the map `map` (named for the error).
pub(super) fn duplicate_fd(fd: BorrowedFd<'_>, map: &'static str) -> Result<OwnedFd> {
    fd.try_clone_to_owned().map_err(|io_error| {
        map_error(
            map,
            "duplicate its descriptor",
            MapError::SyscallError(aya::sys::SyscallError {
                call: "fcntl",
                io_error,
            }),
        )
    })
}

/// A map private to this load's object (not pinned: the agent fills it anew as it attaches).
fn take_private_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M>
where
    M: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    M::try_from(map).map_err(|source| map_error(name, "open", source))
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
    program: std::result::Result<&ProgramFd, ProgramError>,
    name: &'static str,
) -> Result<()> {
    let operation = || format!("update the link pinned at {}", path.display());
    let program = program.map_err(|source| program_error(name, operation(), source))?;
    super::bpf_link::update_pinned(path, program.as_fd()).map_err(|source| {
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

fn verifier_error(name: &'static str, source: ProgramError) -> DatapathError {
    DatapathError::Program {
        program: name,
        operation: "load (verifier)".into(),
        source: Box::new(source),
    }
}

/// Loads the programs named on a thread each, then pins them ([`pin_program`]). The
/// kernel verifies a program on the CPU of the thread that loads it, and `lb_xdp` and the
/// programs it tail-calls are most of the verifier's time at load (0.3 to 1 s each on the lab's
/// 2-core machines), which a restarted or upgraded agent's first sync waits for.
fn load_programs(ebpf: &mut Ebpf, pin_dir: &Path, names: &[&'static str]) -> Result<()> {
    load_programs_while(ebpf, pin_dir, names, || ())
}

/// As [`load_programs`], running `meanwhile` on the calling thread while the kernel verifies.
fn load_programs_while<T>(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    names: &[&'static str],
    meanwhile: impl FnOnce() -> T,
) -> Result<T> {
    let mut programs: Vec<(&'static str, &mut aya::programs::Program)> =
        Vec::with_capacity(names.len());
    for (found, program) in ebpf.programs_mut() {
        if let Some(&name) = names.iter().find(|name| **name == found) {
            programs.push((name, program));
        }
    }
    if let Some(missing) = names
        .iter()
        .find(|name| !programs.iter().any(|(found, _)| found == *name))
    {
        return Err(DatapathError::MissingProgram(missing));
    }
    let (loaded, done_meanwhile) = std::thread::scope(|scope| {
        let threads: Vec<_> = programs
            .iter_mut()
            .map(|(_, program)| scope.spawn(move || program.load_program()))
            .collect();
        let done_meanwhile = meanwhile();
        let loaded: Vec<std::result::Result<(), ProgramError>> = threads
            .into_iter()
            .map(|thread| {
                thread
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect();
        (loaded, done_meanwhile)
    });
    for ((name, program), result) in programs.into_iter().zip(loaded) {
        result.map_err(|source| verifier_error(name, source))?;
        pin_program(program, name, pin_dir)?;
    }
    Ok(done_meanwhile)
}

/// Pins a loaded program as `<pin_dir>/<name>`, replacing what an earlier run pinned.
fn pin_program<P: LoadAndPin>(program: &mut P, name: &'static str, pin_dir: &Path) -> Result<()> {
    let path = pin_dir.join(name);
    // A program pinned by an earlier run: the new one takes its place.
    match std::fs::remove_file(&path) {
        Err(source) if source.kind() != io::ErrorKind::NotFound => {
            return Err(DatapathError::PinDir { path, source });
        }
        _ => {}
    }
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

/// A program of the kinds the datapath has, whatever its kind.
impl LoadAndPin for aya::programs::Program {
    fn load_program(&mut self) -> std::result::Result<(), ProgramError> {
        use aya::programs::Program;
        match self {
            Program::Xdp(program) => program.load(),
            Program::SchedClassifier(program) => program.load(),
            Program::CgroupSockAddr(program) => program.load(),
            Program::CgroupSkb(program) => program.load(),
            Program::CgroupSock(program) => program.load(),
            _ => Err(ProgramError::UnexpectedProgramType),
        }
    }
    fn pin_program(&mut self, path: &Path) -> std::result::Result<(), aya::pin::PinError> {
        self.pin(path)
    }
}

/// Records the size of each Maglev service's table when the table in force is the one its
/// frontends ask for (its tag); a service whose table is missing or another (left by a stopped
/// agent between a table's swap and its frontends) gets none, so the next sync writes it.
fn check_maglev_tables(
    pin_dir: &Path,
    installed: &mut BTreeMap<u32, InstalledService>,
) -> Result<()> {
    let tables = open_maglev_tables(pin_dir, Access::ReadOnly)?;
    for (id, service) in installed.iter_mut() {
        let Some(tag) = service.maglev_tag else {
            continue;
        };
        service.maglev_size = tables.get(id, 0).ok().and_then(|table| {
            let size = table.get(&0, 0).ok()?;
            (table.get(&1, 0).ok()? == tag).then_some(size)
        });
    }
    Ok(())
}

/// Removes the Maglev tables no installed frontend asks for (left by an agent stopped between a
/// table's swap and its service's removal, or a failed update): a table takes memory until its
/// entry goes. The entries in use are read in one batch (lookups wait for nothing); each
/// removal waits for a grace period, so only real leftovers cost one.
fn forget_unused_maglev_tables(
    maglev: &MapData,
    installed: &BTreeMap<u32, InstalledService>,
) -> Result<()> {
    let syscall = |operation: String, call, io_error| {
        map_error(
            map_names::MAGLEV4,
            &operation,
            MapError::SyscallError(aya::sys::SyscallError { call, io_error }),
        )
    };
    let entries: Vec<(u32, u32)> =
        super::batch::read_all(maglev.fd().as_fd()).map_err(|io_error| {
            syscall(
                "read the tables in use".into(),
                "bpf_map_lookup_batch",
                io_error,
            )
        })?;
    for (id, _) in entries {
        let wanted = installed
            .get(&id)
            .is_some_and(|service| service.maglev_tag.is_some());
        if !wanted {
            super::batch::delete_array_entry(maglev.fd().as_fd(), id).map_err(|io_error| {
                syscall(
                    format!("remove the unused Maglev table of service {id}"),
                    "bpf_map_delete_elem",
                    io_error,
                )
            })?;
        }
    }
    Ok(())
}
