//! Every map of the service datapath. Names are the versioned ones in lb_common::map_names (the
//! macro needs literals); state maps are pinned by name so they outlive the agent.

use aya_ebpf::{
    bindings::{BPF_F_INNER_MAP, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    btf_maps::{ArrayOfMaps, SkStorage},
    macros::{btf_map, map},
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use lb_common::{
    Affinity4Key, Affinity6Key, AffinityValue, Backend4, Backend6, Ct4Key, Ct4Value, Ct6Key,
    Ct6Value, Datapath6Config, DatapathConfig, Event, FlowCacheGate, FlowCacheSlot4,
    FlowCacheSlot6, Frag4Key, Frag4Value, Frag6Key, Frag6Value, FragValue, Frontend4Key,
    Frontend6Key, FrontendSlot4, FrontendSlot6, JiffiesClock, NicMac, RejectBudget, ServiceCounter,
    ServiceValue, Slot, SockNat4Key, SockNat4Value, SockNat6Key, SockNat6Value, SockState4,
    SockState6, SourceRange4, SourceRange6, dsr, flow_cache, frontend_index, limits,
    monitor::MonitorControl, pair_filter,
};
use lb_ebpf::packet::Ipv6Info;

use crate::helpers::now_ns;

/// Every address:port:protocol a Service answers on -> the service and its current table.
#[map(name = "lb4_fe_v1")]
pub static FRONTENDS4: HashMap<Frontend4Key, ServiceValue> =
    HashMap::pinned(limits::MAX_FRONTENDS, 0);

/// Every service's selection table, a range of cells from its `ServiceValue::slots`: an array,
/// so that a lookup is an index, not a hash of a key in a map of a million entries.
#[map(name = "lb4_slot_v2")]
pub static SLOTS4: Array<Slot> = Array::pinned(limits::MAX_SLOTS, 0);

/// Endpoint address, port, protocol and flags by backend id: an array, so that a lookup is an
/// index the verifier inlines, not a call into the kernel's hash table. A cell holds a backend
/// only while `in_use()` (the agent vacates a removed one).
#[map(name = "lb4_be_v2")]
pub static BACKENDS4: Array<Backend4> = Array::pinned(limits::MAX_BACKENDS, 0);

/// Connection tracking of the XDP/tc path; LRU so a full table evicts the oldest flows instead
/// of refusing new ones.
#[map(name = "lb4_ct_v1")]
pub static CONNTRACK4: LruHashMap<Ct4Key, Ct4Value> = LruHashMap::pinned(limits::MAX_CONNTRACK, 0);

/// (socket cookie, backend) -> the Service address the socket asked for.
#[map(name = "lb4_sknat_v1")]
pub static SOCK_NAT4: LruHashMap<SockNat4Key, SockNat4Value> =
    LruHashMap::pinned(limits::MAX_SOCK_NAT, 0);

/// Socket-local storage: the backend and source check of each socket the hooks translated;
/// the kernel frees an entry with its socket. A BTF map (the kernel requires BTF for this type).
#[btf_map(name = "lb4_sockst_v1", pin_by_name)]
pub static SOCK_STATE4: SkStorage<SockState4> = SkStorage::new();

#[map(name = "lb_svc_cnt_v1")]
pub static SERVICE_COUNTERS: PerCpuArray<ServiceCounter> =
    PerCpuArray::pinned(limits::MAX_SERVICES, 0);

/// The IPv4 frontends XDP serves, by their hash, one cache line each (mmapable only so that its
/// values start on a page): the agent changes one byte a program reads at a time, in the order
/// `lb_common::FrontendSlotHead` describes.
#[map(name = "lb4_feidx_v2")]
pub static FRONTEND_INDEX4: Array<FrontendSlot4> =
    Array::pinned(frontend_index::SLOTS, BPF_F_MMAPABLE);

/// [`FRONTEND_INDEX4`] for IPv6 frontends.
#[map(name = "lb6_feidx_v2")]
pub static FRONTEND_INDEX6: Array<FrontendSlot6> =
    Array::pinned(frontend_index::SLOTS, BPF_F_MMAPABLE);

/// A frontend's entry per CPU, copied there from the frontend index or the frontends map
/// with the index slot it was in (`flow::lookup_frontend`). Not pinned.
#[map(name = "lb_fescr_v1")]
pub static FRONTEND_SCRATCH: PerCpuArray<crate::flow::Frontend> =
    PerCpuArray::with_max_entries(1, 0);

/// Whether the client's key of the IPv6 flow this CPU's run is making was looked up, or is to
/// be (`crate::flow::key_mode`, [`crate::flow::client_key6`]). Not pinned.
#[map(name = "lb_keymode_v1")]
pub static KEY_MODE: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Updated by the agent to wait for a grace period (`lb_common::map_names::GRACE`); no program
/// reads it.
#[btf_map(name = "lb_grace_v1")]
pub static GRACE: ArrayOfMaps<GraceInner, 1> = ArrayOfMaps::new();

/// The inner map type of [`GRACE`].
pub type GraceInner = aya_ebpf::btf_maps::Array<u32, 1, { BPF_F_INNER_MAP as usize }>;

#[map(name = "lb4_fefilt_v1")]
pub static FRONTEND_FILTER: Array<u64> = Array::pinned(limits::FRONTEND_FILTER_WORDS, 0);

#[map(name = "lb_event_v8")]
pub static EVENTS: PerCpuArray<u64> = PerCpuArray::pinned(Event::SLOTS, 0);

/// Datapath-wide settings (index 0), written by the agent at start.
#[map(name = "lb_cfg_v3")]
pub static CONFIG: Array<DatapathConfig> = Array::pinned(1, 0);

/// The frontends a DSR option may name for each endpoint on this node (`lb_common::dsr`).
/// Not pinned: the agent writes it whole at every load, before attaching.
#[map(name = "lb4_dsradm_v1")]
pub static DSR_ADMISSIONS4: HashMap<dsr::Admission4Key, dsr::AdmissionValue> =
    HashMap::with_max_entries(limits::MAX_DSR_ADMISSIONS, BPF_F_NO_PREALLOC);

/// The cluster's Node addresses, which a DSR option naming a NodePort must name.
#[map(name = "lb4_nodes_v1")]
pub static NODES4: HashMap<u32, u32> =
    HashMap::pinned(limits::MAX_NODE_ADDRESSES, BPF_F_NO_PREALLOC);

/// loadBalancerSourceRanges: (service id, client prefix) -> allowed.
#[map(name = "lb4_srcrng_v1")]
pub static SOURCE_RANGES4: LpmTrie<SourceRange4, u8> =
    LpmTrie::pinned(limits::MAX_SOURCE_RANGES, 0);

/// The IPv6 twins of FRONTENDS4, BACKENDS4, SOCK_NAT4, SOCK_STATE4 and SOURCE_RANGES4: the
/// same values, IPv6 addresses. Service ids and backend ids are one space for both families: a
/// v6 service's slot cells in `SLOTS4` name entries of `BACKENDS6`. The agent alone writes the
/// frontends: without preallocation they take memory for the entries they hold (none on an
/// IPv4-only cluster).
#[map(name = "lb6_fe_v1")]
pub static FRONTENDS6: HashMap<Frontend6Key, ServiceValue> =
    HashMap::pinned(limits::MAX_FRONTENDS, BPF_F_NO_PREALLOC);

/// Backend id -> IPv6 endpoint, an array as `BACKENDS4` is (a cell holds a backend only while
/// `in_use()`): a lookup is an index the verifier inlines instead of a call into the kernel's
/// hash table, on every UDP datagram of a live flow and every new flow. Its 262,144 cells of 24
/// bytes take 6 MiB also on an IPv4-only node.
#[map(name = "lb6_be_v2")]
pub static BACKENDS6: Array<Backend6> = Array::pinned(limits::MAX_BACKENDS, 0);

/// (socket cookie, IPv6 backend) -> the Service address the socket asked for.
#[map(name = "lb6_sknat_v1")]
pub static SOCK_NAT6: LruHashMap<SockNat6Key, SockNat6Value> =
    LruHashMap::pinned(limits::MAX_SOCK_NAT, 0);

/// An AF_INET6 socket the hooks sent to an IPv6 Service keeps its state here; one sent to an
/// IPv4 Service through an IPv4-mapped address keeps it in `SOCK_STATE4`.
#[btf_map(name = "lb6_sockst_v1", pin_by_name)]
pub static SOCK_STATE6: SkStorage<SockState6> = SkStorage::new();

/// loadBalancerSourceRanges of IPv6 Services: an entry's prefix length is 32 (the service id)
/// + the CIDR's.
#[map(name = "lb6_srcrng_v1")]
pub static SOURCE_RANGES6: LpmTrie<SourceRange6, u8> =
    LpmTrie::pinned(limits::MAX_SOURCE_RANGES, 0);

/// sessionAffinity ClientIP: (client, service) -> backend and last use; LRU so a full table
/// forgets the least recent clients.
#[map(name = "lb4_affin_v1")]
pub static AFFINITY4: LruHashMap<Affinity4Key, AffinityValue> =
    LruHashMap::pinned(limits::MAX_AFFINITY, 0);

/// Connection tracking of IPv6 flows on the node's NICs, as [`CONNTRACK4`].
#[map(name = "lb6_ct_v1")]
pub static CONNTRACK6: LruHashMap<Ct6Key, Ct6Value> = LruHashMap::pinned(limits::MAX_CONNTRACK6, 0);

/// sessionAffinity ClientIP of IPv6 clients outside the node, as [`AFFINITY4`].
#[map(name = "lb6_affin_v1")]
pub static AFFINITY6: LruHashMap<Affinity6Key, AffinityValue> =
    LruHashMap::pinned(limits::MAX_AFFINITY6, 0);

/// A conntrack value per CPU to build an entry in: an IPv6 flow's values do not fit the stack
/// together. Not pinned.
#[map(name = "lb4_ctscr_v1")]
pub static CT_SCRATCH4: PerCpuArray<Ct4Value> =
    PerCpuArray::with_max_entries(crate::flow::scratch::COUNT, 0);
#[map(name = "lb6_ctscr_v1")]
pub static CT_SCRATCH6: PerCpuArray<Ct6Value> =
    PerCpuArray::with_max_entries(crate::flow::scratch::COUNT, 0);

/// XDP's flow cache, per CPU ([`lb_common::flow_cache`]). Not pinned.
#[map(name = "lb4_flowc_v1")]
pub static FLOW_CACHE4: PerCpuArray<FlowCacheSlot4> =
    PerCpuArray::with_max_entries(flow_cache::SLOTS, 0);
#[map(name = "lb6_flowc_v1")]
pub static FLOW_CACHE6: PerCpuArray<FlowCacheSlot6> =
    PerCpuArray::with_max_entries(flow_cache::SLOTS, 0);
/// tc egress's twin of the flow cache, for local endpoints' answers. Not pinned.
#[map(name = "lb4_ansc_v1")]
pub static ANSWER_CACHE4: PerCpuArray<FlowCacheSlot4> =
    PerCpuArray::with_max_entries(flow_cache::SLOTS, 0);
#[map(name = "lb6_ansc_v1")]
pub static ANSWER_CACHE6: PerCpuArray<FlowCacheSlot6> =
    PerCpuArray::with_max_entries(flow_cache::SLOTS, 0);

/// Whether each of the four caches above is worth a look on this CPU for each protocol, and
/// its counts ([`lb_common::FlowCacheGate`]).
#[map(name = "lb_fcgate_v3")]
pub static FLOW_CACHE_GATES: PerCpuArray<FlowCacheGate> =
    PerCpuArray::pinned(flow_cache::gate::COUNT, 0);

/// An IPv6 packet's state, per CPU, handed from each program of the IPv6 XDP pipeline to the
/// next ([`Packet6`]): IPv6's 32-byte address pairs left on the stack, and spilled there around
/// every helper call, take more than the 512 bytes a program has. Not pinned.
#[map(name = "lb6_packet_v1")]
pub static PACKET6: PerCpuArray<Packet6> = PerCpuArray::with_max_entries(1, 0);

/// The IPv6 settings (SNAT address) at index 0.
#[map(name = "lb6_cfg_v1")]
pub static CONFIG6: Array<Datapath6Config> = Array::pinned(1, 0);

/// Maglev lookup tables by service id: each an array (sized per service, hence
/// BPF_F_INNER_MAP) whose cell 0 holds its size M, cell 1 its tag, and cells 2..=M+1 backend
/// ids (`lb_common::maglev::HEADER` cells before them). The agent swaps
/// a service's table in one update of its entry; the kernel frees the old one once no program
/// still reads it.
#[btf_map(name = "lb4_maglev_v2", pin_by_name)]
pub static MAGLEV4: ArrayOfMaps<MaglevTable, { limits::MAX_SERVICES as usize }> =
    ArrayOfMaps::new();

/// The inner map type of [`MAGLEV4`] (its max_entries is the template's only: each table has
/// its own).
pub type MaglevTable = aya_ebpf::btf_maps::Array<u32, 1, { BPF_F_INNER_MAP as usize }>;

/// The translation of fragmented datagrams, from their first fragment; LRU, as a datagram whose
/// last fragment never came leaves its entry behind.
#[map(name = "lb4_frag_v1")]
pub static FRAGMENTS4: LruHashMap<Frag4Key, Frag4Value> =
    LruHashMap::with_max_entries(limits::MAX_FRAGMENTED, 0);

/// [`FRAGMENTS4`] for IPv6 datagrams.
#[map(name = "lb6_frag_v1")]
pub static FRAGMENTS6: LruHashMap<Frag6Key, Frag6Value> =
    LruHashMap::with_max_entries(limits::MAX_FRAGMENTED, 0);

/// A [`FRAGMENTS6`] record per CPU to build one in ([`remember_fragment6`]). Not pinned.
#[map(name = "lb6_fragscr_v1")]
pub static FRAG_SCRATCH6: PerCpuArray<FragRecord6> = PerCpuArray::with_max_entries(1, 0);

/// The value of [`FRAG_SCRATCH6`].
pub struct FragRecord6 {
    pub key: Frag6Key,
    pub value: Frag6Value,
}

/// The MAC of each NIC XDP serves, by ifindex % NIC_SLOTS (see `xdp::not_sent_to_this_nic`).
#[map(name = "lb_nicmac_v1")]
pub static NIC_MACS: Array<NicMac> = Array::with_max_entries(limits::NIC_SLOTS, 0);

/// The NICs XDP serves, by ifindex: where it may send a frame with XDP_REDIRECT (see
/// `xdp::redirect`).
#[map(name = "lb_txport_v1")]
pub static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(limits::NIC_SLOTS, 0);

/// The programs `lb_xdp` tail-calls (`lb_common::xdp_programs`). Each load has its own, so
/// that an `lb_xdp` only reaches the programs of its own load; the agent pins it once its
/// `lb_xdp` is attached (see `lb_common::map_names::XDP_PROGRAMS`).
#[map(name = "lb_xdpprog_v1")]
pub static XDP_PROGRAMS: ProgramArray =
    ProgramArray::with_max_entries(lb_common::xdp_programs::COUNT, 0);

/// The program `lb_tc_egress` tail-calls for IPv6 (`lb_common::tc_programs`), one array per
/// load and pinned once its `lb_tc_egress` is attached, as [`XDP_PROGRAMS`].
#[map(name = "lb_tcprog_v1")]
pub static TC_PROGRAMS: ProgramArray =
    ProgramArray::with_max_entries(lb_common::tc_programs::COUNT, 0);

/// Per-CPU token bucket of REJECT answers (index 0). Private to the object: a new agent starts
/// with a fresh bucket.
#[map(name = "lb_rejbudget")]
pub static REJECT_BUDGET: PerCpuArray<RejectBudget> = PerCpuArray::with_max_entries(1, 0);

/// The backends' filter (`lb_common::map_names::BACKEND_FILTER`): tc egress looks a packet up in
/// conntrack only when its source may be a backend's. Private to the object: the agent writes
/// it whole at every load, before attaching.
#[map(name = "lb4_befilt_v1")]
pub static BACKEND_FILTER: Array<u64> = Array::with_max_entries(limits::FRONTEND_FILTER_WORDS, 0);

/// The pair filter (`lb_common::pair_filter`): a client's packet without a FLOW entry of its
/// frontend looks its ORIGINAL entry up only when its client's bit is set. Private to the
/// object: empty at load, or filled by the agent beside an earlier load's conntrack; mmapable, so that the agent empties and sets one
/// generation's words with atomic stores beside the programs' atomic ORs into the other.
#[map(name = "lb_pairfilt_v1")]
pub static PAIR_FILTER: Array<[u64; pair_filter::GENERATIONS]> =
    Array::with_max_entries(pair_filter::ENTRIES, BPF_F_MMAPABLE);

/// Each CPU's xorshift state (`helpers::random_u32`); 0 until its first use seeds it. Private
/// to the object.
#[map(name = "lb_rand_v1")]
pub static RANDOM_STATE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `lb monitor`'s events (`lb_common::monitor::MonitorEvent`), 256 KiB: about 2,500 events
/// the monitor has not read yet.
#[map(name = "lb_monitor_v1")]
pub static MONITOR_EVENTS: RingBuf = RingBuf::pinned(256 * 1024, 0);

/// Which events the programs report (cell 0), set by a running `lb monitor`.
#[map(name = "lb_monctl_v1")]
pub static MONITOR_CONTROL: Array<MonitorControl> = Array::pinned(1, 0);

/// Events no room was left for on MONITOR_EVENTS (the monitor reads too slowly), per CPU.
#[map(name = "lb_monlost_v1")]
pub static MONITOR_LOST: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

/// How the programs read the time (index 0; see `helpers::now_ns`). Private to the object: the
/// agent calibrates it at every load; zero until then.
#[map(name = "lb_clock_v1")]
pub static CLOCK: Array<JiffiesClock> = Array::with_max_entries(1, 0);

/// Set to 1 by `lb explain`'s private copy of the programs (EbpfLoader::set_global): the program
/// decides as usual but writes nothing (no conntrack, affinity or counter update), so running it
/// on the live maps with BPF_PROG_TEST_RUN changes no state.
#[unsafe(no_mangle)]
static DRY_RUN: u8 = 0;

/// Whether this copy of the programs must not write to any map.
#[inline(always)]
pub fn dry_run() -> bool {
    // SAFETY: a plain read of a global the loader may have patched; volatile so the compiler
    // does not fold the default value in.
    unsafe { core::ptr::read_volatile(&DRY_RUN) != 0 }
}

#[inline(always)]
pub fn count_event(event: Event) {
    if dry_run() {
        return;
    }
    if let Some(slot) = EVENTS.get_ptr_mut(event.0) {
        // SAFETY: a per-CPU slot, touched only by programs running on this CPU, one at a time.
        unsafe { *slot += 1 };
    }
}

/// Adds a packet (or, with `len == 0` and `packets == 0`, just a new flow) to a service.
#[inline(always)]
pub fn count_service(service_id: u32, packets: u64, bytes: u64, new_flows: u64) {
    if dry_run() {
        return;
    }
    if let Some(counter) = SERVICE_COUNTERS.get_ptr_mut(service_id) {
        // SAFETY: per-CPU slot, as above.
        unsafe {
            (*counter).packets += packets;
            (*counter).bytes += bytes;
            (*counter).new_flows += new_flows;
        }
    }
}

/// Remembers in `fragments` ([`FRAGMENTS4`] or [`FRAGMENTS6`]) how a first fragment was
/// translated, for the later fragments of its datagram, stamped now.
#[inline(always)]
pub fn remember_fragment<K, A>(
    fragments: &LruHashMap<K, FragValue<A>>,
    key: &K,
    value: &mut FragValue<A>,
) {
    if !dry_run() {
        value.recorded_at = lb_common::fragments::stamp(now_ns());
        // A full LRU forgets the oldest datagram; its later fragments then pass as they are.
        let _ = fragments.insert(key, value, 0);
    }
}

/// The record in `fragments` of the first fragment of a later fragment's datagram, while it
/// serves ([`lb_common::fragments`]): an older one is another datagram's, whose key came round.
#[inline(always)]
pub fn first_fragment_record<K, A>(
    fragments: &'static LruHashMap<K, FragValue<A>>,
    key: &K,
) -> Option<&'static FragValue<A>> {
    // SAFETY: a read-only use of an entry written whole.
    let record = unsafe { fragments.get(key) }?;
    let now = lb_common::fragments::stamp(now_ns());
    lb_common::fragments::fresh(record.recorded_at, now).then_some(record)
}

/// Remembers an IPv6 first fragment's translation, as [`remember_fragment`], with the record
/// built by `fill` in [`FRAG_SCRATCH6`], field by field: the IPv6 programs have no stack left
/// for its 88 bytes (handed over as values, they were built on the stack and copied).
#[inline(always)]
pub fn remember_fragment6(fill: impl FnOnce(&mut FragRecord6)) {
    let Some(record) = FRAG_SCRATCH6.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's entry, which nothing else uses while this program runs (a program
    // run and its tail calls stay on one CPU).
    let record = unsafe { &mut *record };
    fill(record);
    remember_fragment(&FRAGMENTS6, &record.key, &mut record.value);
}

/// The value of [`PACKET6`]: what `lb_xdp6` parsed, and what the programs after it learnt
/// about the packet, for the next one.
pub struct Packet6 {
    pub ip: Ipv6Info,
    pub tuple: crate::flow::Tuple<crate::family::V6>,
    /// From `lb_xdp6_frontend`, for `lb_xdp6_flow`: the frontend's entry, how the packet
    /// arrived, the time and who holds the client's conntrack key.
    pub frontend: crate::flow::Frontend,
    pub arrival: crate::flow::Arrival,
    pub now: u64,
    pub key_holder: crate::flow::Holder,
    /// From `lb_xdp6_flow`, for `lb_xdp6_deliver`: where the new flow goes, or that the
    /// service has no endpoint to send it to (the REJECT answer).
    pub destination: crate::flow::Destination<crate::family::V6>,
    pub reject: bool,
    /// `lb_xdp6_icmp`'s copy of an ICMPv6 error's headers, translated here and written back.
    pub icmp6: Icmp6Headers,
}

/// The IPv6 header of an ICMPv6 error and the error's parts a translation touches
/// ([`lb_common::icmp::gather6`]), with where they lie in the packet (see [`Packet6::icmp6`]).
pub struct Icmp6Headers {
    pub header: [u8; lb_ebpf::packet::IPV6_HDR_LEN],
    pub error: [u8; lb_common::icmp::ICMP6_ERROR_LEN],
    /// Where the quoted transport header is, and its protocol (the ICMPv6 message itself is
    /// at [`Packet6::ip`]'s transport offset).
    pub quoted_transport_at: usize,
    pub quoted_proto: u8,
}
