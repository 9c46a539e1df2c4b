//! Types shared by the kernel programs (`lb-ebpf`) and the agent (`lb-userspace`).
//!
//! Rules for every type that crosses into the kernel: `#[repr(C)]`, `Copy`, no `bool`, `enum` or
//! `Option`, explicit padding fields, and a compile-time size assertion so a layout change on one
//! side cannot silently disagree with the other.
#![no_std]

pub mod dsr;
pub mod icmp;
pub mod ipv6;
pub mod monitor;
pub mod sctp;

/// Map names as the kernel sees them. Versioned (`_v1`) so an incompatible layout change gets a new
/// pinned map instead of misreading an old one, and at most 15 characters because the kernel keeps
/// only `BPF_OBJ_NAME_LEN - 1` bytes of a name.
pub mod map_names {
    /// Per-CPU packet and byte counters by [`crate::PacketClass`].
    pub const PACKET_COUNTERS: &str = "lb_pktcnt_v1";
    /// [`crate::Frontend4Key`] -> [`crate::ServiceValue`]: every address:port:protocol a Service
    /// answers on (ClusterIP, each node address:nodePort, externalIPs, LoadBalancer IPs).
    pub const FRONTENDS4: &str = "lb4_fe_v1";
    /// Array of [`crate::Slot`]: every service's selection table, a range of cells starting at
    /// its [`crate::ServiceValue::slots`].
    pub const SLOTS4: &str = "lb4_slot_v2";
    /// The hash map of [`crate::LegacySlotKey`] -> backend id that held the selection tables
    /// before [`SLOTS4`]: read once by a new agent to move the tables into the array.
    pub const LEGACY_SLOTS4: &str = "lb4_slot_v1";
    /// Array of [`crate::Backend4`] indexed by backend id: an array lookup is a few inlined
    /// instructions, a hash lookup a call into the kernel (about 30 ns in lb-bench). A cell
    /// holds a backend only while [`crate::BackendValue::in_use`].
    pub const BACKENDS4: &str = "lb4_be_v2";
    /// The hash map backend id -> [`crate::Backend4`] that held the IPv4 backends before
    /// [`BACKENDS4`]: read once by a new agent to move them into the array.
    pub const LEGACY_BACKENDS4: &str = "lb4_be_v1";
    /// LRU [`crate::Ct4Key`] -> [`crate::Ct4Value`]: connection tracking of the XDP/tc path.
    pub const CONNTRACK4: &str = "lb4_ct_v1";
    /// LRU [`crate::SockNat4Key`] -> [`crate::SockNat4Value`]: what a socket connected to through
    /// a socket hook, so recvmsg/getpeername show the Service address again.
    pub const SOCK_NAT4: &str = "lb4_sknat_v1";
    /// Per-CPU [`crate::ServiceCounter`] by service id.
    pub const SERVICE_COUNTERS: &str = "lb_svc_cnt_v1";
    /// Per-CPU u64 by [`crate::Event`]: every drop (and notable pass) with its reason, with
    /// [`crate::Event::SLOTS`] entries so that a release adding events keeps the map.
    pub const EVENTS: &str = "lb_event_v8";
    /// Array of one [`crate::DatapathConfig`].
    pub const CONFIG: &str = "lb_cfg_v3";
    /// LPM trie of [`crate::SourceRange4`] -> u8: loadBalancerSourceRanges per service.
    pub const SOURCE_RANGES4: &str = "lb4_srcrng_v1";
    /// LRU [`crate::Affinity4Key`] -> [`crate::AffinityValue`]: sessionAffinity ClientIP.
    pub const AFFINITY4: &str = "lb4_affin_v1";
    /// Array of maps, by service id: the service's Maglev lookup table, an array of
    /// [`crate::maglev::HEADER`] + M cells (cell 0 holds M, cell 1 its tag, then M backend ids), sized per
    /// service ([`crate::maglev::table_size`]); memory only for the services that use Maglev.
    pub const MAGLEV4: &str = "lb4_maglev_v2";
    /// service id -> the Service port's name (`namespace/name:port/PROTO`, NUL-padded to
    /// [`crate::SERVICE_NAME_LEN`] bytes). Created and pinned by the agent, read by `lb services`
    /// and the metrics; no kernel program uses it.
    pub const SERVICE_NAMES: &str = "lb_svc_name_v1";
    /// LRU [`crate::Frag4Key`] -> [`crate::Frag4Value`]: how the first fragment of a datagram
    /// was translated, for its later fragments (which carry no ports). Not pinned.
    pub const FRAGMENTS4: &str = "lb4_frag_v1";
    /// Array of [`crate::NicMac`] by ifindex % [`crate::limits::NIC_SLOTS`]: the MAC of each NIC the
    /// XDP program is attached to, written by the agent at attach (ifindex 0 where two NICs
    /// share a slot: neither is checked nor sent to by slot). Not pinned.
    pub const NIC_MACS: &str = "lb_nicmac_v1";
    /// Device hash map, ifindex -> ifindex: the NICs the XDP program is attached to, which it
    /// sends translated frames out of with XDP_REDIRECT when the route or the flow says so.
    /// Written by the agent at attach. Not pinned.
    pub const TX_PORTS: &str = "lb_txport_v1";
    /// Mmapable array of [u64; 2]: which clients may have a flow kept as two entries
    /// ([`crate::pair_filter`]). Not pinned: a load starts it empty, or full where an earlier
    /// load's conntrack maps are pinned.
    pub const PAIR_FILTER: &str = "lb_pairfilt_v1";
    /// Per-CPU [`crate::RejectBudget`]: the REJECT answers' rate limit. Not pinned.
    pub const REJECT_BUDGET: &str = "lb_rejbudget";
    /// [`crate::JiffiesClock`] at index 0: how the programs read the time. Written by the agent
    /// at load. Not pinned.
    pub const CLOCK: &str = "lb_clock_v1";
    /// The backend filter: bit / 64 -> 64 bits, a one-hash Bloom filter of the backends'
    /// (address, port, protocol) by [`crate::frontend_filter::bit`], which tc egress checks a
    /// packet's source against before its conntrack lookup. Rebuilt by the agent at every load.
    /// Not pinned.
    pub const BACKEND_FILTER: &str = "lb4_befilt_v1";
    /// Socket-local storage (BPF_MAP_TYPE_SK_STORAGE) of [`crate::SockState4`]: what the socket
    /// hooks last did for a socket, for its packets (source ranges) and its close.
    pub const SOCK_STATE4: &str = "lb4_sockst_v1";
    /// Program array of the programs `lb_xdp` tail-calls, by [`crate::xdp_programs`]. Each load
    /// of the object has its own (a dry-run copy's `lb_xdp` reaches dry-run programs, an old
    /// `lb_xdp` its own), which the agent pins here once its `lb_xdp` is attached to every NIC,
    /// replacing the earlier load's: the kernel empties a program array when its last user
    /// reference goes (kernel/bpf/arraymap.c, prog_array_map_clear on map_release_uref), and
    /// the attached `lb_xdp` must keep reaching them while no agent runs.
    pub const XDP_PROGRAMS: &str = "lb_xdpprog_v1";
    /// The programs `lb_tc_egress` tail-calls for IPv6 ([`crate::tc_programs`]), pinned as
    /// [`XDP_PROGRAMS`] is and for the same reason.
    pub const TC_PROGRAMS: &str = "lb_tcprog_v1";
    /// Hash of [`crate::dsr::Admission4Key`] -> [`crate::dsr::AdmissionValue`]: the frontends
    /// a DSR option may name for each endpoint on this node ([`crate::dsr`]). Rewritten whole
    /// by the agent at every load, then kept in step with the services.
    pub const DSR_ADMISSIONS4: &str = "lb4_dsradm_v1";
    /// Hash of a node address (a number: host order of the wire bytes) -> 1: the IPv4
    /// addresses of the cluster's Nodes, which a DSR option naming a NodePort must name.
    pub const NODES4: &str = "lb4_nodes_v1";

    /// Maps earlier releases pinned under names whose layout has changed since: a new agent
    /// removes these pins (the maps themselves go when the old programs are swapped out).
    pub const RETIRED: &[&str] = &[
        "lb_cfg_v1",
        "lb_cfg_v2",
        "lb_event_v1",
        "lb_event_v2",
        "lb_event_v3",
        "lb_event_v4",
        "lb_event_v5",
        "lb_event_v6",
        "lb_event_v7",
        LEGACY_SLOTS4,
        LEGACY_BACKENDS4,
        LEGACY_BACKENDS6,
        // The frontend indexes before their slots carried backend ids.
        "lb4_feidx_v1",
        "lb6_feidx_v1",
        // The flow caches' gates before UDP had gates of its own.
        "lb_fcgate_v2",
    ];
    /// Retired maps an earlier agent could still need if it came back: their pins go only after
    /// a sync in which every service was written without error (until then an earlier release
    /// rolled back finds them as it left them). `lb4_maglev_v1`: 128 Maglev tables of 16,381
    /// slots in one array, for services with the flag bit 10.
    pub const RETIRED_AFTER_SYNC: &[&str] = &["lb4_maglev_v1"];
    /// A filter of every frontend's address and port ([`crate::frontend_filter`]): XDP looks
    /// nothing up for a TCP/UDP packet whose bit is clear, which is most of the node's own
    /// traffic.
    pub const FRONTEND_FILTER: &str = "lb4_fefilt_v1";
    /// Mmapable array (values page-aligned, one cache line each) of [`crate::FrontendSlot4`]:
    /// the IPv4 frontends XDP serves, by their hash ([`crate::frontend_index`]). The agent
    /// writes it with map updates, one byte a program reads at a time.
    pub const FRONTEND_INDEX4: &str = "lb4_feidx_v2";
    /// [`FRONTEND_INDEX4`] for IPv6 frontends ([`crate::FrontendSlot6`]).
    pub const FRONTEND_INDEX6: &str = "lb6_feidx_v2";
    /// A one-entry array of maps the agent updates to wait for an RCU grace period (the kernel
    /// waits for every running program after an update of a map-in-map: kernel/bpf/syscall.c,
    /// maybe_wait_bpf_programs), before it reuses a frontend-index slot. Not pinned.
    pub const GRACE: &str = "lb_grace_v1";
    /// Per-CPU array of one frontend entry XDP found, copied with where it found it. Not
    /// pinned.
    pub const FRONTEND_SCRATCH: &str = "lb_fescr_v1";
    /// Per-CPU arrays of [`crate::FlowCacheSlot`]: XDP's flow cache ([`crate::flow_cache`]),
    /// IPv4 and IPv6. Not pinned: a new load starts with empty slots, which fill again on the
    /// flows' next packets.
    pub const FLOW_CACHE4: &str = "lb4_flowc_v1";
    pub const FLOW_CACHE6: &str = "lb6_flowc_v1";
    /// Per-CPU arrays of [`crate::FlowCacheSlot`]: tc egress's cache of the flows whose local
    /// endpoint's answers it sent last ([`crate::flow_cache`]), IPv4 and IPv6. Not pinned.
    pub const ANSWER_CACHE4: &str = "lb4_ansc_v1";
    pub const ANSWER_CACHE6: &str = "lb6_ansc_v1";
    /// Per-CPU array of [`crate::FlowCacheGate`], one for each of the four caches above and
    /// each protocol they serve ([`crate::flow_cache::gate`]): whether each is worth a look on
    /// the CPU, and its hits, misses and closings for the metrics. Pinned, so the counts
    /// survive an agent restart as the events do.
    pub const FLOW_CACHE_GATES: &str = "lb_fcgate_v3";
    /// The IPv6 twins of the maps above: the same values, keys with an [`crate::Ipv6Words`]
    /// address. Backend ids and service ids are one id space for both families.
    pub const FRONTENDS6: &str = "lb6_fe_v1";
    /// Array of [`crate::Backend6`] indexed by backend id, as [`BACKENDS4`]: a cell holds an
    /// IPv6 backend only while [`crate::BackendValue::in_use`].
    pub const BACKENDS6: &str = "lb6_be_v2";
    /// The hash map backend id -> [`crate::Backend6`] that held the IPv6 backends before
    /// [`BACKENDS6`]: read once by a new agent to move them into the array.
    pub const LEGACY_BACKENDS6: &str = "lb6_be_v1";
    pub const SOCK_NAT6: &str = "lb6_sknat_v1";
    pub const SOCK_STATE6: &str = "lb6_sockst_v1";
    pub const SOURCE_RANGES6: &str = "lb6_srcrng_v1";
    /// LRU [`crate::Ct6Key`] -> [`crate::Ct6Value`]: connection tracking of IPv6 flows on the
    /// node's NICs (XDP and tc), entries as in [`CONNTRACK4`].
    pub const CONNTRACK6: &str = "lb6_ct_v1";
    /// LRU [`crate::Affinity6Key`] -> [`crate::AffinityValue`]: sessionAffinity ClientIP of IPv6
    /// clients outside the node (the socket hooks keep theirs in [`AFFINITY4`], by netns).
    pub const AFFINITY6: &str = "lb6_affin_v1";
    /// Array of one [`crate::Datapath6Config`]: the IPv6 settings of the datapath.
    pub const CONFIG6: &str = "lb6_cfg_v1";
    /// LRU [`crate::Frag6Key`] -> [`crate::Frag6Value`]: [`FRAGMENTS4`] for IPv6 datagrams.
    /// Not pinned.
    pub const FRAGMENTS6: &str = "lb6_frag_v1";
    /// Ring buffer of [`crate::monitor::MonitorEvent`]s for `lb monitor` (256 KiB).
    pub const MONITOR_EVENTS: &str = "lb_monitor_v1";
    /// Array of one [`crate::monitor::MonitorControl`]: which events the programs report.
    pub const MONITOR_CONTROL: &str = "lb_monctl_v1";
    /// Per-CPU array of one u64: events lost because the ring buffer was full (never cleared;
    /// `lb monitor` reports how many it lost while it ran).
    pub const MONITOR_LOST: &str = "lb_monlost_v1";

    /// Every map name, for the length check below and for tools that list them.
    pub const ALL: &[&str] = &[
        PACKET_COUNTERS,
        FRONTENDS4,
        FRONTEND_FILTER,
        FRONTEND_INDEX4,
        FRONTEND_INDEX6,
        GRACE,
        FRONTEND_SCRATCH,
        FLOW_CACHE4,
        FLOW_CACHE6,
        ANSWER_CACHE4,
        ANSWER_CACHE6,
        FLOW_CACHE_GATES,
        SLOTS4,
        BACKENDS4,
        CONNTRACK4,
        SOCK_NAT4,
        SERVICE_COUNTERS,
        EVENTS,
        CONFIG,
        SOURCE_RANGES4,
        AFFINITY4,
        MAGLEV4,
        SERVICE_NAMES,
        REJECT_BUDGET,
        SOCK_STATE4,
        FRAGMENTS4,
        NIC_MACS,
        TX_PORTS,
        XDP_PROGRAMS,
        TC_PROGRAMS,
        FRONTENDS6,
        BACKENDS6,
        SOCK_NAT6,
        SOCK_STATE6,
        SOURCE_RANGES6,
        CONNTRACK6,
        AFFINITY6,
        CONFIG6,
        FRAGMENTS6,
        MONITOR_EVENTS,
        MONITOR_CONTROL,
        MONITOR_LOST,
        DSR_ADMISSIONS4,
        NODES4,
        PAIR_FILTER,
    ];
    /// The maps that hold the agent's state and are pinned under the pin directory, so the
    /// datapath and its connections survive an agent restart.
    pub const PINNED: &[&str] = &[
        FRONTENDS4,
        FRONTEND_FILTER,
        FRONTEND_INDEX4,
        FRONTEND_INDEX6,
        SLOTS4,
        BACKENDS4,
        CONNTRACK4,
        SOCK_NAT4,
        SERVICE_COUNTERS,
        EVENTS,
        FLOW_CACHE_GATES,
        CONFIG,
        SOURCE_RANGES4,
        AFFINITY4,
        MAGLEV4,
        SOCK_STATE4,
        XDP_PROGRAMS,
        TC_PROGRAMS,
        FRONTENDS6,
        BACKENDS6,
        SOCK_NAT6,
        SOCK_STATE6,
        SOURCE_RANGES6,
        CONNTRACK6,
        AFFINITY6,
        CONFIG6,
        NODES4,
        MONITOR_EVENTS,
        MONITOR_CONTROL,
        MONITOR_LOST,
    ];
}

/// The slots of [`map_names::TC_PROGRAMS`].
pub mod tc_programs {
    /// `lb_tc_egress6` ([`crate::program_names::TC_EGRESS6`]).
    pub const IPV6: u32 = 0;
    /// `lb_tc_egress6_direct` ([`crate::program_names::TC_EGRESS6_DIRECT`]).
    pub const IPV6_DIRECT: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// The slots of [`map_names::XDP_PROGRAMS`].
pub mod xdp_programs {
    /// `lb_xdp_udp` ([`crate::program_names::XDP_UDP`]).
    pub const UDP: u32 = 0;
    /// `lb_xdp_sctp` ([`crate::program_names::XDP_SCTP`]).
    pub const SCTP: u32 = 1;
    /// `lb_xdp6` ([`crate::program_names::XDP6`]): the IPv6 frames of the full path.
    pub const IPV6: u32 = 2;
    /// `lb_xdp6_udp` ([`crate::program_names::XDP6_UDP`]).
    pub const IPV6_UDP: u32 = 3;
    /// `lb_xdp6_frontend`, `lb_xdp6_flow`, `lb_xdp6_deliver`: the rest of the IPv6 pipeline.
    pub const IPV6_FRONTEND: u32 = 4;
    pub const IPV6_FLOW: u32 = 5;
    pub const IPV6_DELIVER: u32 = 6;
    /// `lb_xdp6_icmp` ([`crate::program_names::XDP6_ICMP`]): ICMPv6 errors, tail-called by
    /// `lb_xdp6`.
    pub const IPV6_ICMP: u32 = 7;
    /// `lb_xdp6_sctp` ([`crate::program_names::XDP6_SCTP`]): SCTP over IPv6 behind extension
    /// headers or to a SNAT port.
    pub const IPV6_SCTP: u32 = 8;
    /// `lb_xdp6_direct_tcp`, `lb_xdp6_direct_udp`, `lb_xdp6_direct_sctp`
    /// ([`crate::program_names::XDP6_DIRECT_TCP`] and its twins): a transport header right after
    /// the IPv6 fixed header, to a frontend, tail-called by `lb_xdp`.
    pub const IPV6_DIRECT_TCP: u32 = 9;
    pub const IPV6_DIRECT_UDP: u32 = 10;
    pub const IPV6_DIRECT_SCTP: u32 = 11;
    /// `lb_xdp_lookup` ([`crate::program_names::XDP_LOOKUP`]): IPv4 TCP to a frontend that
    /// `lb_xdp` does not start a flow for without looking the client's key up.
    pub const LOOKUP: u32 = 12;
    /// `lb_xdp_dsr` ([`crate::program_names::XDP_DSR`]): an IPv4 TCP SYN that carries a DSR
    /// option ([`crate::dsr`]).
    pub const DSR: u32 = 13;
    /// `lb_xdp_direct` ([`crate::program_names::XDP_DIRECT`]): an IPv4 packet to a frontend of
    /// a Service with direct server return that no live flow took.
    pub const DIRECT_RETURN: u32 = 14;
    /// `lb_xdp_too_big` ([`crate::program_names::XDP_TOO_BIG`]): a packet too big for the
    /// route to its endpoint on another node, or an endpoint's answer too big for the NIC
    /// towards its client, answered with ICMP "fragmentation needed" or ICMPv6 "packet too
    /// big".
    pub const TOO_BIG: u32 = 15;
    /// Slots in the array.
    pub const COUNT: u32 = 16;
}

/// Capacities of the maps. Every limit is a constant here; the agent refuses (with an error, never
/// a crash) what would not fit.
pub mod limits {
    /// Words of the frontend filter: 2^20 bits, 64 a word (128 KiB).
    pub const FRONTEND_FILTER_WORDS: u32 = 1 << (crate::frontend_filter::BITS_LOG2 - 6);
    /// Entries of the frontends map: all address:port:protocol triples of all Services.
    pub const MAX_FRONTENDS: u32 = 262_144;
    /// Service ids (one per Service port): the size of the per-CPU service counters.
    pub const MAX_SERVICES: u32 = 65_536;
    /// Backends (endpoint address:port:protocol) across all services.
    pub const MAX_BACKENDS: u32 = 262_144;
    /// Backends one service can select from.
    pub const MAX_BACKENDS_PER_SERVICE: u32 = 4_096;
    /// Cells of the slot array (cell 0 unused); a service's old and new table must both fit
    /// while it changes.
    pub const MAX_SLOTS: u32 = 1_048_576;
    /// Connection-tracking entries (two per flow: original and reply direction).
    pub const MAX_CONNTRACK: u32 = 524_288;
    /// IPv6 connection-tracking entries: a quarter of the IPv4 ones by default, as each takes
    /// twice the memory.
    pub const MAX_CONNTRACK6: u32 = 131_072;
    /// Session-affinity entries of IPv6 clients outside the node.
    pub const MAX_AFFINITY6: u32 = 32_768;
    /// Socket reverse-NAT entries (one per connected socket to a Service).
    pub const MAX_SOCK_NAT: u32 = 262_144;
    /// Pairs of a frontend and a local endpoint a DSR option may name
    /// ([`crate::map_names::DSR_ADMISSIONS4`]).
    pub const MAX_DSR_ADMISSIONS: u32 = 65_536;
    /// IPv4 addresses of the cluster's Nodes ([`crate::map_names::NODES4`]).
    pub const MAX_NODE_ADDRESSES: u32 = 16_384;
    /// loadBalancerSourceRanges entries across all services.
    pub const MAX_SOURCE_RANGES: u32 = 16_384;
    /// Session-affinity entries (client, service).
    pub const MAX_AFFINITY: u32 = 131_072;
    /// Slots of the NIC MAC table (by ifindex modulo this).
    pub const NIC_SLOTS: u32 = 256;
    /// Datagrams in fragments being translated at once.
    pub const MAX_FRAGMENTED: u32 = 8_192;
    /// Cells of all Maglev tables together (each takes 8 bytes: an array's values are 8-byte
    /// aligned), so their memory is bounded: 128 MiB, enough for 10,000 Maglev services of 10
    /// endpoints (1,023 cells each: 1,021 slots and the 2 header cells).
    pub const MAX_MAGLEV_CELLS: u32 = 16_777_216;
}

/// Default connection-tracking timeouts (nanoseconds of CLOCK_MONOTONIC, as bpf_ktime_get_ns
/// counts). The datapath uses the ones of [`CtTimeouts`] in its config map; these are their
/// defaults.
pub mod ct_timeouts {
    const SECOND: u64 = 1_000_000_000;
    /// A TCP flow that has not completed its handshake.
    pub const TCP_SYN: u64 = 60 * SECOND;
    /// An established TCP flow, idle.
    pub const TCP_ESTABLISHED: u64 = 6 * 3600 * SECOND;
    /// A TCP flow after both sides' FINs, or a RST: long enough for the last ACKs.
    pub const TCP_CLOSING: u64 = 10 * SECOND;
    /// A TCP flow after one side's FIN, while the other may still send (kube-proxy's
    /// `tcpCloseWaitTimeout` default, which it gives conntrack's CLOSE_WAIT).
    pub const TCP_HALF_CLOSED: u64 = 3600 * SECOND;
    /// A UDP flow, idle.
    pub const UDP: u64 = 60 * SECOND;
    /// last_seen is rewritten at most this often, to keep the established path free of writes.
    pub const REFRESH: u64 = SECOND;
    /// A SNAT flow both sides have closed (the client first) or a RST ended frees its SNAT port
    /// this long after its last FIN or RST, instead of after [`TCP_CLOSING`]. All that can
    /// still come is the client's last ACK and, if that is lost, the backend's FIN again after
    /// its retransmission timeout (200 ms at least). 4536 ports held 0.5 s each let one backend
    /// take about 9,000 new connections a second through one node, 18,000 with the ports in the
    /// delay's second half taken when no free one is left; 2 s (4 retransmissions) held the
    /// range at 2,300/s, below what one client makes straight to a pod here.
    pub const SNAT_PORT_REUSE: u64 = SECOND / 2;
}

const _: () = {
    let mut i = 0;
    while i < map_names::ALL.len() {
        assert!(
            map_names::ALL[i].len() <= 15,
            "map name longer than 15 bytes"
        );
        i += 1;
    }
};

/// Program names as they appear in the object file (the function names in `lb-ebpf`).
pub mod program_names {
    /// XDP program on the node NICs that counts packets by [`crate::PacketClass`].
    pub const XDP_COUNTER: &str = "lb_xdp_count";
    /// XDP on the node NICs: DNAT of NodePort / externalIP / LoadBalancer traffic (TCP and ICMP
    /// errors itself; UDP and SCTP through [`XDP_UDP`] and [`XDP_SCTP`]).
    pub const XDP_LB: &str = "lb_xdp";
    /// XDP for the IPv4 TCP packets to a frontend whose client's key is looked up, tail-called
    /// by [`XDP_LB`], which starts a flow with a SYN without that lookup: a SYN whose key it
    /// found held, a SYN from a port of the SNAT range, a segment of no live flow, and every
    /// packet of a dry run.
    pub const XDP_LOOKUP: &str = "lb_xdp_lookup";
    /// XDP for an IPv4 TCP SYN whose header carries a DSR option ([`crate::dsr`]), tail-called
    /// by [`XDP_LB`]: the start of a flow another node sent here for its endpoint to answer
    /// directly.
    pub const XDP_DSR: &str = "lb_xdp_dsr";
    /// XDP for an IPv4 packet to a frontend of a Service with direct server return
    /// ([`crate::dsr`]) that no live flow took, tail-called by [`XDP_LB`] and [`XDP_LOOKUP`]
    /// after their lookup of the frontend: its flow (by DSR when it starts with a SYN to an
    /// endpoint on another node), and the option in that SYN.
    pub const XDP_DIRECT: &str = "lb_xdp_direct";
    /// XDP for a packet not to be fragmented that is too big for its way on, tail-called by
    /// the XDP programs of both families at their end: a client's packet, already translated,
    /// too big for the route to its endpoint on another node, answered with ICMP
    /// "fragmentation needed" (ICMPv6 "packet too big") to its client; or that endpoint's
    /// answer to a SNAT port, not yet translated, too big for the NIC towards its client,
    /// answered to the endpoint. A program of its own because `lb_xdp` has no stack left for
    /// the answer.
    pub const XDP_TOO_BIG: &str = "lb_xdp_too_big";
    /// XDP for UDP, tail-called by [`XDP_LB`]: the same datapath instantiated for UDP, which the
    /// verifier walks on its own (one program for every protocol passes its instruction limit).
    pub const XDP_UDP: &str = "lb_xdp_udp";
    /// XDP for SCTP, tail-called by [`XDP_LB`], as [`XDP_UDP`].
    pub const XDP_SCTP: &str = "lb_xdp_sctp";
    /// XDP for IPv6, tail-called by [`XDP_LB`] for every IPv6 frame that neither passes at once
    /// nor goes to a direct program ([`XDP6_DIRECT_TCP`] and its twins): TCP itself, UDP through
    /// [`XDP6_UDP`], SCTP through [`XDP6_SCTP`], ICMPv6 errors through [`XDP6_ICMP`].
    pub const XDP6: &str = "lb_xdp6";
    /// XDP for UDP over IPv6, tail-called by [`XDP6`] (behind extension headers) and by
    /// [`XDP_LB`] (an answer to a SNAT port).
    pub const XDP6_UDP: &str = "lb_xdp6_udp";
    /// XDP for SCTP over IPv6, tail-called as [`XDP6_UDP`].
    pub const XDP6_SCTP: &str = "lb_xdp6_sctp";
    /// The rest of the IPv6 XDP path, each tail-called by the one before: a packet to a
    /// frontend that no live flow took, a new flow, and the rewrite that sends its first packet
    /// on (one program would need more stack than the verifier allows).
    pub const XDP6_FRONTEND: &str = "lb_xdp6_frontend";
    pub const XDP6_FLOW: &str = "lb_xdp6_flow";
    pub const XDP6_DELIVER: &str = "lb_xdp6_deliver";
    /// ICMPv6 errors about translated flows, tail-called by [`XDP6`]: a program of its own, as
    /// its 128-bit address rewrites need a stack of their own.
    pub const XDP6_ICMP: &str = "lb_xdp6_icmp";
    /// XDP for IPv6 packets whose TCP, UDP or SCTP header follows the fixed header, to a
    /// frontend and not to a SNAT port, tail-called by [`XDP_LB`]: a live flow's packets and the
    /// frontend stage in one program, a new flow on through [`XDP6_FLOW`].
    pub const XDP6_DIRECT_TCP: &str = "lb_xdp6_direct_tcp";
    pub const XDP6_DIRECT_UDP: &str = "lb_xdp6_direct_udp";
    pub const XDP6_DIRECT_SCTP: &str = "lb_xdp6_direct_sctp";
    /// tc egress on the node NICs: reverse NAT of replies from local backends.
    pub const TC_EGRESS: &str = "lb_tc_egress";
    /// tc egress for IPv6, tail-called by [`TC_EGRESS`] (see its doc in `lb-ebpf/src/tc.rs`).
    pub const TC_EGRESS6: &str = "lb_tc_egress6";
    /// tc egress for an IPv6 TCP or UDP packet right after the fixed header whose source may
    /// be a backend's, tail-called by [`TC_EGRESS`]: the common answer of a local endpoint, in
    /// one program without a call ([`TC_EGRESS6`] takes the rest).
    pub const TC_EGRESS6_DIRECT: &str = "lb_tc_egress6_direct";
    /// cgroup/connect4: connect() to a Service goes straight to a backend.
    pub const CONNECT4: &str = "lb_connect4";
    /// cgroup/sendmsg4: unconnected UDP sendto() a Service goes to a backend.
    pub const SENDMSG4: &str = "lb_sendmsg4";
    /// cgroup/recvmsg4: recvfrom() shows the Service address as the sender.
    pub const RECVMSG4: &str = "lb_recvmsg4";
    /// cgroup/getpeername4: getpeername() shows the Service address.
    pub const GETPEERNAME4: &str = "lb_getpeername4";
    /// cgroup/connect6: connect() of an AF_INET6 socket to an IPv6 Service address, or to an
    /// IPv4-mapped one, goes straight to a backend.
    pub const CONNECT6: &str = "lb_connect6";
    /// cgroup/sendmsg6: unconnected UDP sendto() an IPv6 Service address goes to a backend (to
    /// an IPv4-mapped address the kernel runs the sendmsg4 hook instead).
    pub const SENDMSG6: &str = "lb_sendmsg6";
    /// cgroup/recvmsg6: recvfrom() on an AF_INET6 socket shows the Service address (IPv6, or
    /// IPv4-mapped) as the sender.
    pub const RECVMSG6: &str = "lb_recvmsg6";
    /// cgroup/getpeername6: getpeername() on an AF_INET6 socket shows it too.
    pub const GETPEERNAME6: &str = "lb_getpeername6";
    /// cgroup_skb/egress: packets (IPv4 and IPv6) of sockets sent to a Service with
    /// loadBalancerSourceRanges must come from inside them.
    pub const SOCK_EGRESS4: &str = "lb_sock_egress4";
    /// cgroup/sock_release: a closing socket's entry in the socket NAT map goes with it.
    pub const SOCK_RELEASE: &str = "lb_sock_release";
    /// XDP, run by the agent only (BPF_PROG_TEST_RUN): writes [`crate::ClockSample`] into the
    /// packet, from which the agent calibrates the [`crate::JiffiesClock`].
    pub const CLOCK_SAMPLE: &str = "lb_clock_sample";
}

/// Named map indexes with the label each goes by in metrics and CLI output, written once: the
/// constants count up from 0 in the order given, `COUNT` is their number (the size of the map
/// they index), `ALL` lists them with their labels in index order, and `label()` names an index
/// (None past the last).
macro_rules! labelled_indexes {
    ($type:ident; $($(#[doc = $doc:literal])* $name:ident = $label:literal,)+) => {
        impl $type {
            labelled_indexes!(@consts 0u32; $($(#[doc = $doc])* $name,)+);

            /// Number of indexes: the size of the map they index.
            pub const COUNT: u32 = [$(stringify!($name)),+].len() as u32;

            /// Every index in order, with its label.
            pub const ALL: [(Self, &'static str); Self::COUNT as usize] = [$((Self::$name, $label)),+];

            /// The label of this index, or `None` for one past the last.
            pub fn label(self) -> Option<&'static str> {
                Self::ALL.get(self.0 as usize).map(|(_, label)| *label)
            }
        }
    };
    (@consts $index:expr; $(#[doc = $doc:literal])* $name:ident, $($rest:tt)*) => {
        $(#[doc = $doc])*
        pub const $name: Self = Self($index);
        labelled_indexes!(@consts $index + 1; $($rest)*);
    };
    (@consts $index:expr;) => {};
}

/// What the XDP counter saw, used as the index into [`map_names::PACKET_COUNTERS`].
///
/// A plain `u32` with named constants rather than a Rust `enum`, because the value is a map index
/// written by the kernel and read by userspace: an out-of-range value must be representable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct PacketClass(pub u32);

labelled_indexes! {
    PacketClass;
    /// IPv4 carrying TCP (first fragment or unfragmented).
    IPV4_TCP = "ipv4_tcp",
    /// IPv4 carrying UDP (first fragment or unfragmented).
    IPV4_UDP = "ipv4_udp",
    /// IPv4 carrying ICMP.
    IPV4_ICMP = "ipv4_icmp",
    /// IPv4 with another protocol, or a non-first fragment (no transport header to look at).
    IPV4_OTHER = "ipv4_other",
    /// IPv6, any payload.
    IPV6 = "ipv6",
    /// Any other EtherType (ARP, LLDP, ...).
    NON_IP = "non_ip",
    /// Too short for the headers it announces, or an IPv4 header length below 20 bytes.
    MALFORMED = "malformed",
}

/// One slot of the per-CPU packet counters: what one CPU saw of one [`PacketClass`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct PacketCounter {
    /// Packets seen.
    pub packets: u64,
    /// Bytes seen, from the start of the Ethernet header to the end of the frame.
    pub bytes: u64,
}

const _: () = assert!(size_of::<PacketCounter>() == 16);

#[cfg(feature = "user")]
// SAFETY: repr(C), two u64 fields, no padding (size asserted above), every bit pattern valid.
unsafe impl aya::Pod for PacketCounter {}

/// Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')), for a header
/// field rewritten in place. Values are taken as the 16-bit big-endian words the packet holds,
/// read with `u16::from_be_bytes`.
pub mod checksum {
    /// The checksum after the 16-bit word `old` became `new`.
    #[inline(always)]
    pub fn replace_u16(check: u16, old: u16, new: u16) -> u16 {
        let sum = u32::from(!check) + u32::from(!old) + u32::from(new);
        !fold(sum)
    }

    /// The checksum after the 32-bit field `old` became `new` (both as the packet holds them,
    /// i.e. `u32::from_be_bytes`).
    #[inline(always)]
    pub fn replace_u32(check: u16, old: u32, new: u32) -> u16 {
        let sum = u32::from(!check)
            + u32::from(!(old >> 16) as u16)
            + u32::from(!(old as u16))
            + (new >> 16)
            + (new & 0xffff);
        !fold(sum)
    }

    /// The checksum after the IPv6 address `old` became `new` (both as the packet holds them,
    /// [`crate::Ipv6Words`]). The sum is of the words as they are, native order, with the
    /// checksum taken in the same order: a one's complement sum commutes with swapping the
    /// bytes of every term (RFC 1071, section 2), so no word needs a byte swap, and four 32-bit
    /// terms per address stand for its eight 16-bit ones.
    #[inline(always)]
    pub fn replace_ipv6(check: u16, old: &crate::Ipv6Words, new: &crate::Ipv6Words) -> u16 {
        // 1 + 8 terms below 2^32 each: the sum stays below 2^36, and two folds from 64 bits
        // leave 32 (the first at most 2^32 + 14).
        let mut sum = u64::from((!check).to_be());
        let mut i = 0;
        while i < 4 {
            sum += u64::from(!old[i]) + u64::from(new[i]);
            i += 1;
        }
        let sum = (sum & 0xffff_ffff) + (sum >> 32);
        let sum = (sum & 0xffff_ffff) + (sum >> 32);
        u16::from_be(!fold(sum as u32))
    }

    /// A segment's addresses and ports as its transport checksum covers them (the addresses
    /// through the pseudo-header). IPv4 addresses and every port as numbers
    /// (`from_be_bytes`), IPv6 addresses as the packet holds them ([`crate::Ipv6Words`]).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Endpoints<A> {
        pub saddr: A,
        pub daddr: A,
        pub sport: u16,
        pub dport: u16,
    }

    /// The transport checksum after an IPv4 segment's addresses and ports became `new`: every
    /// change in one sum, folded once (a field at a time folds four times).
    #[inline(always)]
    pub fn replace_endpoints4(check: u16, old: &Endpoints<u32>, new: &Endpoints<u32>) -> u16 {
        // 13 terms below 2^16: the sum stays below 2^20, which two folds bring to 16 bits.
        let halves = |word: u32| (word >> 16) + (word & 0xffff);
        let complemented_halves = |word: u32| halves(!word);
        let sum = u32::from(!check)
            + complemented_halves(old.saddr)
            + complemented_halves(old.daddr)
            + u32::from(!old.sport)
            + u32::from(!old.dport)
            + halves(new.saddr)
            + halves(new.daddr)
            + u32::from(new.sport)
            + u32::from(new.dport);
        !fold(sum)
    }

    /// [`replace_endpoints4`] for IPv6: the addresses' words summed as they are, native order,
    /// as [`replace_ipv6`] does, and the ports brought to the same order (`to_be`: the packet's
    /// bytes read natively).
    #[inline(always)]
    pub fn replace_endpoints6(
        check: u16,
        old: &Endpoints<crate::Ipv6Words>,
        new: &Endpoints<crate::Ipv6Words>,
    ) -> u16 {
        // 1 + 16 terms below 2^32 and 4 below 2^16: the sum stays below 2^37, and two folds
        // from 64 bits leave 32.
        let mut sum = u64::from((!check).to_be())
            + u64::from(!old.sport.to_be())
            + u64::from(!old.dport.to_be())
            + u64::from(new.sport.to_be())
            + u64::from(new.dport.to_be());
        let mut i = 0;
        while i < 4 {
            sum += u64::from(!old.saddr[i]) + u64::from(new.saddr[i]);
            sum += u64::from(!old.daddr[i]) + u64::from(new.daddr[i]);
            i += 1;
        }
        let sum = (sum & 0xffff_ffff) + (sum >> 32);
        let sum = (sum & 0xffff_ffff) + (sum >> 32);
        u16::from_be(!fold(sum as u32))
    }

    /// The one's complement sum (not yet complemented) of `bytes` as big-endian 16-bit words,
    /// added to `sum`; an odd last byte is padded with zero (RFC 1071). `N` is a constant, so the
    /// loop has a bound the verifier sees.
    #[inline(always)]
    pub fn sum_words<const N: usize>(sum: u32, bytes: &[u8; N]) -> u32 {
        let mut sum = sum;
        let mut i = 0;
        while i + 1 < N {
            sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
            i += 2;
        }
        if N % 2 == 1 {
            sum += u32::from(bytes[N - 1]) << 8;
        }
        sum
    }

    /// The checksum field value for a sum of words (fold, complement).
    #[inline(always)]
    pub fn finish(sum: u32) -> u16 {
        let sum = (sum & 0xffff) + (sum >> 16);
        let sum = (sum & 0xffff) + (sum >> 16);
        !(sum as u16)
    }

    /// The 32-bit one's complement difference between two IPv6 addresses (four words as the
    /// packet holds them, `u32::from_ne_bytes`), as `bpf_csum_diff` computes it: the value
    /// `bpf_l4_csum_replace` takes with a field size of 0 (a checksum difference rather than
    /// an old and a new value) for a change of a 16-byte field. Computed here, without the
    /// helper call; the sum is of native-order words, as the kernel's is, and the checksum field
    /// is read in the same order, so the result is right on either byte order.
    #[inline(always)]
    pub fn ipv6_diff(old: &[u32; 4], new: &[u32; 4]) -> u32 {
        let mut sum = 0u64;
        let mut i = 0;
        while i < 4 {
            sum += u64::from(!old[i]) + u64::from(new[i]);
            i += 1;
        }
        let sum = (sum & 0xffff_ffff) + (sum >> 32);
        let sum = (sum & 0xffff_ffff) + (sum >> 32);
        sum as u32
    }

    /// The checksum after adding a difference from [`ipv6_diff`] (what the kernel does for an
    /// unoffloaded checksum, `inet_proto_csum_replace_by_diff`), for host tests.
    pub fn replace_by_diff(check: u16, diff: u32) -> u16 {
        let sum = u64::from(diff) + u64::from(!check);
        let sum = (sum & 0xffff_ffff) + (sum >> 32);
        let sum = (sum & 0xffff_ffff) + (sum >> 32);
        let sum = sum as u32;
        !fold(sum)
    }

    /// Folds a 32-bit one's complement sum to 16 bits. Two rounds suffice for any 32-bit sum
    /// (the first leaves at most 0x1_fffe, the second at most 0xffff), and a fixed count keeps
    /// the verifier happy.
    #[inline(always)]
    fn fold(sum: u32) -> u16 {
        let sum = (sum & 0xffff) + (sum >> 16);
        let sum = (sum & 0xffff) + (sum >> 16);
        sum as u16
    }
}

/// Maglev consistent hashing, the part the datapath runs: the flow hash that picks a slot of a
/// service's lookup table (lb-userspace builds the tables). Shared so both sides agree bit for bit.
pub mod maglev {
    /// Cells before a table's slots: cell 0 holds the table's size M, cell 1 its tag (a hash of
    /// its contents, never 0), which must equal the frontend entry's
    /// [`crate::ServiceValue::maglev_table`] for XDP to use the table: a table swapped in for
    /// an update whose frontends were not written, or one left by an earlier run, is never
    /// read in their place.
    pub const HEADER: u32 = 2;

    /// The table sizes a service can have: primes (so every permutation covers the table),
    /// each about twice the one before.
    pub const SIZES: [u32; 12] = [
        251, 509, 1_021, 2_039, 4_093, 8_191, 16_381, 32_749, 65_521, 131_071, 262_139, 524_287,
    ];
    /// Slots per backend a new table aims at: the fill's extra moves on a change (its cap's
    /// chains, docs/maglev.md) shrink as M / N grows.
    pub const TARGET_SLOTS_PER_BACKEND: u64 = 100;
    /// A table keeps its size while it has between these many slots per backend, so that a
    /// service scaling by one backend keeps its table size (a new size moves most flows).
    pub const KEEP_SLOTS_PER_BACKEND: (u64, u64) = (50, 400);

    /// The size of the Maglev table of a service with `backends` backends whose table has
    /// `current` slots (None: no table yet): `current` while it keeps between
    /// [`KEEP_SLOTS_PER_BACKEND`] slots per backend, else the smallest of [`SIZES`] with at
    /// least [`TARGET_SLOTS_PER_BACKEND`] (the largest for more backends than that allows).
    pub const fn table_size(backends: u32, current: Option<u32>) -> u32 {
        let n = backends as u64;
        if let Some(current) = current {
            let (low, high) = KEEP_SLOTS_PER_BACKEND;
            let m = current as u64;
            if is_size(current) && m >= low * n && m <= high * n {
                return current;
            }
        }
        let mut index = 0;
        while index < SIZES.len() {
            if SIZES[index] as u64 >= TARGET_SLOTS_PER_BACKEND * n {
                return SIZES[index];
            }
            index += 1;
        }
        SIZES[SIZES.len() - 1]
    }

    const fn is_size(m: u32) -> bool {
        let mut index = 0;
        while index < SIZES.len() {
            if SIZES[index] == m {
                return true;
            }
            index += 1;
        }
        false
    }

    /// Seed of [`flow_hash`]: the ASCII bytes "lbfh" read as a little-endian u32.
    pub const FLOW_HASH_SEED: u32 = u32::from_le_bytes(*b"lbfh");

    /// The hash of a flow that picks its slot: `slot = flow_hash(..) % table_size`.
    ///
    /// Fields are numbers as the datapath's parser reads them: `saddr` and `daddr` are
    /// `u32::from_be_bytes(header bytes)` (= `u32::from(Ipv4Addr)`), ports are
    /// `u16::from_be_bytes(header bytes)`, `proto` is the IP protocol number.
    ///
    /// It is MurmurHash3 x86_32 with seed [`FLOW_HASH_SEED`] over four 32-bit words, `saddr`,
    /// `daddr`, `(sport << 16) | dport`, `proto` (the same as MurmurHash3_x86_32 of those words'
    /// 16 little-endian bytes). For the eBPF side, bit for bit (all arithmetic wrapping mod 2^32):
    ///
    /// ```text
    /// h = 0x6866_626c                       // FLOW_HASH_SEED
    /// for k in [saddr, daddr, sport << 16 | dport, proto]:
    ///     k = k * 0xcc9e2d51; k = rotl(k, 15); k = k * 0x1b873593
    ///     h = h ^ k; h = rotl(h, 13); h = h * 5 + 0xe6546b64
    /// h = h ^ 16                            // length in bytes
    /// h ^= h >> 16; h *= 0x85ebca6b; h ^= h >> 13; h *= 0xc2b2ae35; h ^= h >> 16
    /// ```
    ///
    /// No loops, no division: the only division of the selection is the final `% table_size`.
    /// No std either: this function can be moved to lb-common and shared with the eBPF code as is.
    #[inline]
    pub const fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
        let mut h = FLOW_HASH_SEED;
        h = murmur3_round(h, saddr);
        h = murmur3_round(h, daddr);
        h = murmur3_round(h, ((sport as u32) << 16) | dport as u32);
        h = murmur3_round(h, proto as u32);
        murmur3_fmix32(h ^ 16)
    }

    /// [`flow_hash`] of an IPv6 flow: the same rounds over ten words, the source's four, the
    /// destination's four (each `u32::from_be_bytes` of four address bytes, in order), then
    /// `(sport << 16) | dport` and `proto`, finished with the length 40.
    #[inline]
    pub const fn flow_hash6(
        saddr: crate::Ipv6Words,
        daddr: crate::Ipv6Words,
        sport: u16,
        dport: u16,
        proto: u8,
    ) -> u32 {
        let mut h = FLOW_HASH_SEED;
        h = murmur3_round(h, u32::from_be(saddr[0]));
        h = murmur3_round(h, u32::from_be(saddr[1]));
        h = murmur3_round(h, u32::from_be(saddr[2]));
        h = murmur3_round(h, u32::from_be(saddr[3]));
        h = murmur3_round(h, u32::from_be(daddr[0]));
        h = murmur3_round(h, u32::from_be(daddr[1]));
        h = murmur3_round(h, u32::from_be(daddr[2]));
        h = murmur3_round(h, u32::from_be(daddr[3]));
        h = murmur3_round(h, ((sport as u32) << 16) | dport as u32);
        h = murmur3_round(h, proto as u32);
        murmur3_fmix32(h ^ 40)
    }

    /// The slot of a flow with hash `hash` in a table of `size` slots.
    #[inline]
    pub const fn flow_slot(hash: u32, size: u32) -> u32 {
        hash % size
    }

    /// One 4-byte block of MurmurHash3 x86_32.
    #[inline]
    pub const fn murmur3_round(h: u32, k: u32) -> u32 {
        let k = k
            .wrapping_mul(0xcc9e_2d51)
            .rotate_left(15)
            .wrapping_mul(0x1b87_3593);
        (h ^ k)
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64)
    }

    /// MurmurHash3's 32-bit finalizer.
    #[inline]
    pub const fn murmur3_fmix32(mut h: u32) -> u32 {
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^= h >> 16;
        h
    }
}

/// IP protocol numbers as they appear in the IPv4 header and in the keys below.
pub mod proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;

    /// Whether flows of this protocol have a start and an end the datapath tracks (TCP, SCTP;
    /// see [`crate::tcp_state`]), rather than only idle time (UDP).
    #[inline(always)]
    pub const fn has_handshake(protocol: u8) -> bool {
        protocol == TCP || protocol == SCTP
    }
}

/// An IPv6 address as the datapath keeps it: four words in network byte order, as the packet
/// and `bpf_sock_addr::user_ip6` hold it.
pub type Ipv6Words = [u32; 4];

/// Key of the frontends maps: an address, port and protocol a Service answers on. `A` is the
/// address: `u32` for IPv4 ([`map_names::FRONTENDS4`]), [`Ipv6Words`] for IPv6
/// ([`map_names::FRONTENDS6`]); the fields come in the same order in both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(C)]
pub struct FrontendKey<A> {
    /// Address, network byte order (as in the packet).
    pub addr: A,
    /// Port, network byte order.
    pub port: u16,
    /// [`proto::TCP`], [`proto::UDP`] or [`proto::SCTP`].
    pub proto: u8,
    /// Which traffic the entry serves; [`scope::ANY`] until traffic policies split a service
    /// into an external and an internal entry.
    pub scope: u8,
}
pub type Frontend4Key = FrontendKey<u32>;
pub type Frontend6Key = FrontendKey<Ipv6Words>;
const _: () = assert!(size_of::<Frontend6Key>() == 20);
const _: () = assert!(size_of::<Frontend4Key>() == 8);

pub mod scope {
    /// The entry serves every client.
    pub const ANY: u8 = 0;
    /// The entry serves the socket hooks only, the pods and processes of this node: their
    /// connections to an externalTrafficPolicy Local Service's NodePort, externalIP or
    /// LoadBalancer IP go to the Service's cluster-wide (internal policy) backends, as kube-proxy
    /// short-circuits them, since there is no client address to preserve. XDP reads ANY only.
    pub const NODE_CLIENTS: u8 = 1;
}

/// Value of the frontends map: which service, and the backend table to select from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct ServiceValue {
    /// Index of the service's counters; every cell of its table carries it too.
    pub service_id: u32,
    /// Number of cells in the table at `slots`; 0 = no usable backend.
    pub backend_count: u16,
    /// Written as 0. Before [`map_names::SLOTS4`], the revision of the service's table in
    /// [`map_names::LEGACY_SLOTS4`]: read once by a new agent to move that table.
    pub legacy_revision: u16,
    /// [`service_flags`] bits.
    pub flags: u32,
    /// sessionAffinity ClientIP timeout in seconds (0 = no affinity).
    pub affinity_timeout_s: u32,
    /// With [`service_flags::MAGLEV`]: the tag of the Maglev table these frontends were written
    /// for ([`maglev::HEADER`]); XDP uses the service's table (in [`map_names::MAGLEV4`] at its
    /// service id) only when its tag is this one, and reads the size M from the table itself.
    pub maglev_table: u32,
    /// The index in [`map_names::SLOTS4`] of the first cell of the service's table (0: none;
    /// cell 0 is never handed out). The agent writes a new table into free cells, then moves
    /// this field in one map update, so a packet never sees half a table.
    pub slots: u32,
}
const _: () = assert!(size_of::<ServiceValue>() == 24);

/// What a slot of a frontend index holds ([`map_names::FRONTEND_INDEX4`],
/// [`map_names::FRONTEND_INDEX6`]): a copy of one frontends-map entry of [`scope::ANY`], which XDP
/// reads instead of looking the frontend up in the hash map ([`frontend_index`]).
///
/// Every change the agent makes to a slot is one byte readers can see at a time: `key` and
/// `value` are written only while `live` is 0 and no reader can still be inside the slot (a
/// grace period after `live` went 0); then `live` goes 1 on its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct FrontendSlotHead<A> {
    pub key: FrontendKey<A>,
    pub value: ServiceValue,
    /// 1 while the slot serves `key`.
    pub live: u8,
    /// In the first slot of a bucket: 1 while a frontend of the bucket is not in it (no room, or
    /// its entry changed and its slot waits for a grace period), and for a grace period after it
    /// is back, so XDP looks a packet the bucket does not have up in the frontends map instead
    /// of passing it.
    pub overflow: u8,
    /// How many of the slot's [`FrontendSlot::backends`] hold the service's selection table
    /// (0: the slot carries none, as the table is too large for it or the agent did not know
    /// it when it wrote the slot, and XDP reads the table from [`map_names::SLOTS4`]).
    pub inline_backends: u8,
    pub reserved: u8,
}

/// A slot of a frontend index: its [`FrontendSlotHead`] and the backend ids of a small
/// service's selection table, in one cache line (an mmapable array's values start on a page, so
/// each slot is one line). A new flow to the slot's frontend then selects its backend from the
/// line the frontend lookup read already, where a table in [`map_names::SLOTS4`] costs one
/// more cache miss when the flows spread over many services.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct FrontendSlot<A, const N: usize> {
    pub head: FrontendSlotHead<A>,
    /// The cells of the selection table at `head.value.slots`, in their order: the first
    /// `head.inline_backends` of them (written with the rest of the slot while it is not live).
    pub backends: [u32; N],
}
impl<A: Default, const N: usize> Default for FrontendSlot<A, N> {
    fn default() -> Self {
        Self {
            head: FrontendSlotHead::default(),
            backends: [0; N],
        }
    }
}
/// An IPv4 slot carries the table of a service of up to 7 backends.
pub type FrontendSlot4 = FrontendSlot<u32, 7>;
/// An IPv6 slot carries the table of a service of up to 4 backends.
pub type FrontendSlot6 = FrontendSlot<Ipv6Words, 4>;
const _: () = assert!(size_of::<FrontendSlot4>() == frontend_index::SLOT_BYTES as usize);
const _: () = assert!(size_of::<FrontendSlot6>() == frontend_index::SLOT_BYTES as usize);
const _: () = assert!(size_of::<FrontendSlotHead<u32>>() == 36);
const _: () = assert!(size_of::<FrontendSlotHead<Ipv6Words>>() == 48);

/// Where a frontend lives in its family's frontend index: an array of [`SLOTS`] cache-line
/// slots in buckets of [`BUCKET_SLOTS`] adjacent ones, the bucket chosen by the frontend's
/// [`frontend_filter`] hash. A frontend the bucket has no room for stays in the frontends map
/// alone, and the bucket's first slot says so ([`FrontendSlotHead::overflow`]).
pub mod frontend_index {
    use crate::frontend_filter;

    /// 2^18 slots per family (16 MiB).
    pub const SLOTS_LOG2: u32 = 18;
    pub const SLOTS: u32 = 1 << SLOTS_LOG2;
    /// Two slots, 128 bytes: the pair of lines CPUs fetch together.
    pub const BUCKET_SLOTS: u32 = 2;
    pub const SLOT_BYTES: u32 = 64;

    /// The first slot of the bucket of the frontend whose filter bit is `filter_bit`
    /// ([`frontend_filter::bit`], [`frontend_filter::bit6`]).
    #[inline(always)]
    pub const fn first_slot(filter_bit: u32) -> u32 {
        (filter_bit >> (frontend_filter::BITS_LOG2 - SLOTS_LOG2)) & !(BUCKET_SLOTS - 1)
    }
}

/// What kind of frontend an entry is (for counters, `lb services` and policy decisions).
pub mod service_flags {
    pub const CLUSTER_IP: u32 = 1 << 0;
    pub const NODE_PORT: u32 = 1 << 1;
    pub const EXTERNAL_IP: u32 = 1 << 2;
    pub const LOAD_BALANCER: u32 = 1 << 3;
    /// With one of the kinds above: the frontend's entry for this node's own clients
    /// ([`crate::scope::NODE_CLIENTS`]).
    pub const FOR_NODE_CLIENTS: u32 = 1 << 4;
    /// The frontend kinds above, for masking.
    pub const KINDS: u32 = CLUSTER_IP | NODE_PORT | EXTERNAL_IP | LOAD_BALANCER | FOR_NODE_CLIENTS;
    /// The table holds node-local backends only (a Local traffic policy): an empty table drops
    /// (`drop_no_local_backend`, as kube-proxy does) instead of rejecting, and the client
    /// address is always preserved. Not set for a port with no endpoint anywhere, which
    /// kube-proxy rejects whatever its policy.
    pub const LOCAL_ONLY: u32 = 1 << 8;
    /// Clients must match the service's loadBalancerSourceRanges (`lb4_srcrng_v1`).
    pub const SOURCE_RANGES: u32 = 1 << 9;
    /// XDP picks new flows' backends with Maglev consistent hashing (`lb4_maglev_v2`) instead of
    /// at random, so every node sends a flow to the same backend and a backend change moves few
    /// flows. The socket hooks keep choosing at random (no source port yet at connect time).
    /// Bit 10 meant the same with the tables of the retired `lb4_maglev_v1`: a service an
    /// earlier agent wrote with it is selected at random until the agent's first sync rewrites
    /// it.
    pub const MAGLEV: u32 = 1 << 12;
    /// This node's clients (the socket hooks) have an entry of their own for this frontend
    /// ([`crate::scope::NODE_CLIENTS`]), which they look up instead.
    pub const NODE_CLIENTS_ENTRY: u32 = 1 << 11;
    /// With NODE_PORT, EXTERNAL_IP or LOAD_BALANCER: a new TCP flow from outside to an
    /// endpoint on another node goes by direct server return ([`crate::dsr`]) instead of SNAT
    /// (`lb run --nodeport-mode dsr`).
    pub const DIRECT_RETURN: u32 = 1 << 13;
    /// The table holds endpoints serving while terminating only (KEP-1669's fallback, no ready
    /// one left to the table): session affinity keeps a client on the terminating endpoint it
    /// had, as kube-proxy's rules keep it on any endpoint they use.
    pub const SERVING_TERMINATING: u32 = 1 << 14;
}

/// How long flows live without traffic, in nanoseconds; 0 stands for the default of
/// [`ct_timeouts`], so a config map nobody wrote yet still tracks flows sensibly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct CtTimeouts {
    pub tcp_syn: u64,
    pub tcp_established: u64,
    pub tcp_closing: u64,
    pub udp: u64,
    /// How long after a clean close or a reset a SNAT port may serve another flow.
    pub snat_port_reuse: u64,
    pub tcp_half_closed: u64,
}
const _: () = assert!(size_of::<CtTimeouts>() == 48);

impl Default for CtTimeouts {
    fn default() -> Self {
        Self {
            tcp_syn: ct_timeouts::TCP_SYN,
            tcp_established: ct_timeouts::TCP_ESTABLISHED,
            tcp_closing: ct_timeouts::TCP_CLOSING,
            udp: ct_timeouts::UDP,
            snat_port_reuse: ct_timeouts::SNAT_PORT_REUSE,
            tcp_half_closed: ct_timeouts::TCP_HALF_CLOSED,
        }
    }
}

impl CtTimeouts {
    /// How long an entry of this protocol and [`tcp_state`] lives without traffic.
    #[inline(always)]
    pub fn for_state(&self, protocol: u8, state: u8) -> u64 {
        if !proto::has_handshake(protocol) {
            return or_default(self.udp, ct_timeouts::UDP);
        }
        match state {
            tcp_state::ESTABLISHED => {
                or_default(self.tcp_established, ct_timeouts::TCP_ESTABLISHED)
            }
            tcp_state::CLOSING => or_default(self.tcp_closing, ct_timeouts::TCP_CLOSING),
            tcp_state::CLIENT_CLOSED | tcp_state::BACKEND_CLOSED => {
                or_default(self.tcp_half_closed, ct_timeouts::TCP_HALF_CLOSED)
            }
            _ => or_default(self.tcp_syn, ct_timeouts::TCP_SYN),
        }
    }

    /// Whether an entry of this protocol and state, last seen at `last_seen_ns`, is still in
    /// use at `now_ns` (CLOCK_MONOTONIC): idle no longer than its timeout.
    #[inline(always)]
    pub fn is_live(&self, protocol: u8, state: u8, last_seen_ns: u64, now_ns: u64) -> bool {
        now_ns.saturating_sub(last_seen_ns) <= self.for_state(protocol, state)
    }

    #[inline(always)]
    pub fn snat_port_reuse(&self) -> u64 {
        or_default(self.snat_port_reuse, ct_timeouts::SNAT_PORT_REUSE)
    }
}

#[inline(always)]
const fn or_default(value: u64, default: u64) -> u64 {
    if value == 0 { default } else { value }
}

/// Datapath-wide settings the agent writes once at start: index 0 of `lb_cfg_v3`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct DatapathConfig {
    /// The node address that replaces the client's as source when a flow goes to a backend on
    /// another node (externalTrafficPolicy Cluster), as a number (`u32::from(Ipv4Addr)`); 0
    /// disables SNAT (remote backends are then reached without it, as in v1).
    pub snat_addr: u32,
    /// The source ports SNAT allocates from (inclusive). Kept out of the NodePort range and of
    /// the kernel's default ephemeral range (32768-60999), so replies cannot be confused with
    /// the node's own connections.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub timeouts: CtTimeouts,
}
const _: () = assert!(size_of::<DatapathConfig>() == 56);

/// The IPv6 settings of the datapath, index 0 of [`map_names::CONFIG6`] (the ports and timeouts
/// are [`DatapathConfig`]'s, for both families).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Datapath6Config {
    /// The node address that replaces an IPv6 client's as source when its flow goes to a backend
    /// on another node, as the packet holds it; all zeros: no IPv6 SNAT (such flows reach their
    /// endpoint with the client's address, as IPv4 flows do without a SNAT address).
    pub snat_addr: Ipv6Words,
}
const _: () = assert!(size_of::<Datapath6Config>() == 16);

/// Bytes of a service name in [`map_names::SERVICE_NAMES`]: a namespace and a name of up to 63
/// characters each, a port name of up to 15, the protocol and a scope fit.
pub const SERVICE_NAME_LEN: usize = 192;

/// A fragmented datagram as its fragments arrive: addresses as in the IP header (host order of
/// the wire bytes), its IP identification and protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct Frag4Key {
    pub saddr: u32,
    pub daddr: u32,
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<Frag4Key>() == 12);

/// What the datapath did with a datagram's first fragment, for the later ones: the addresses
/// they get and where they go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct FragValue<A> {
    pub saddr: A,
    pub daddr: A,
    /// With [`frag_action::TRANSMIT`]: the frame's new source and destination MACs.
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// [`frag_action`].
    pub action: u8,
    pub _pad: u8,
    /// With [`frag_action::TRANSMIT`]: the NIC the fragments go out of ([`client_nic`]).
    pub client_nic: u16,
    /// The service the datagram belongs to, whose counters the later fragments add to (XDP).
    pub service_id: u32,
    /// When the first fragment was translated ([`fragments::stamp`]): the record serves its
    /// later fragments for [`fragments::LIFETIME`] only.
    pub recorded_at: u32,
}
pub type Frag4Value = FragValue<u32>;
const _: () = assert!(size_of::<Frag4Value>() == 32);

/// How long the record of a datagram's first fragment serves its later fragments. The key
/// (addresses, IP identification, protocol) comes round again: the identification is 16 bits
/// for IPv4, and a datagram from the same client to the same address that was not translated
/// (to a port of the node's own, say) writes no record. Kept for good, a record would hand such
/// a datagram's later fragments another datagram's translation (a Service's endpoint, another
/// client's MACs); and a later fragment that comes before its own first would take a stale
/// one. A datagram's fragments leave their sender back to back, so a few seconds hold them
/// all.
pub mod fragments {
    /// A stamp counts units of 2^20 ns (about 1.05 ms), from the datapath's clock.
    pub const STAMP_SHIFT: u32 = 20;
    /// About 5 s, in stamp units.
    pub const LIFETIME: u32 = (5_000_000_000u64 >> STAMP_SHIFT) as u32;

    /// The stamp of a moment of the datapath's clock (ns); it wraps after about 52 days.
    #[inline(always)]
    pub const fn stamp(now_ns: u64) -> u32 {
        (now_ns >> STAMP_SHIFT) as u32
    }

    /// Whether a record stamped `recorded_at` still serves at stamp `now`.
    #[inline(always)]
    pub const fn fresh(recorded_at: u32, now: u32) -> bool {
        now.wrapping_sub(recorded_at) <= LIFETIME
    }
}

/// A fragmented IPv6 datagram as its fragments arrive: addresses as in the IPv6 header and the
/// identification of its Fragment header, which is unique per source and destination (RFC
/// 8200 section 4.5; no protocol, as extension headers may follow the Fragment header in the
/// first fragment only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct Frag6Key {
    pub saddr: Ipv6Words,
    pub daddr: Ipv6Words,
    pub id: u32,
}
const _: () = assert!(size_of::<Frag6Key>() == 36);

pub type Frag6Value = FragValue<Ipv6Words>;
const _: () = assert!(size_of::<Frag6Value>() == 56);

/// Where the later fragments of a translated datagram go.
pub mod frag_action {
    /// To the stack (a local endpoint; tc egress).
    pub const PASS: u8 = 0;
    /// Back out of the NIC with the recorded MACs (an answer to a SNAT port).
    pub const TRANSMIT: u8 = 1;
    /// Where the FIB says (a remote endpoint, as its first fragment).
    pub const FORWARD: u8 = 2;
}

/// A NIC the XDP program serves and its MAC: frames to another unicast MAC (a NIC in
/// promiscuous mode sees them) are not this node's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct NicMac {
    /// 0: a free slot.
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<NicMac>() == 12);

/// A NIC as a conntrack entry records it, in two bytes: 1 + its slot in
/// [`map_names::NIC_MACS`] (`ifindex % NIC_SLOTS`), whose entry gives the ifindex back; 0 for
/// none recorded.
pub mod client_nic {
    use crate::limits::NIC_SLOTS;

    pub const NONE: u16 = 0;

    /// The tag of the NIC with this ifindex.
    pub const fn of(ifindex: u32) -> u16 {
        (ifindex % NIC_SLOTS) as u16 + 1
    }

    /// The slot of [`crate::map_names::NIC_MACS`] a tag names; None for [`NONE`].
    pub const fn slot(tag: u16) -> Option<u32> {
        match tag {
            NONE => None,
            tag => Some((tag - 1) as u32),
        }
    }
}

/// A per-CPU token bucket of the datapath's REJECT answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RejectBudget {
    pub tokens: u64,
    pub last_ns: u64,
}
const _: () = assert!(size_of::<RejectBudget>() == 16);

/// The programs' clock: CLOCK_MONOTONIC in nanoseconds as of the last timer tick, computed from
/// the kernel's jiffies counter. The verifier inlines `bpf_jiffies64` into one load (kernel/bpf/
/// verifier.c, `do_misc_fixups`), where `bpf_ktime_get_coarse_ns` is a helper call, which costs
/// about 20 ns a packet on the established path (lb-bench). The agent finds `ns_per_jiffy` (the
/// kernel's TICK_NSEC) and `base_ns` from [`ClockSample`]s (see [`JiffiesClock::calibrate`]);
/// zero `ns_per_jiffy` (not calibrated): the programs call `bpf_ktime_get_coarse_ns` instead.
///
/// Both clocks move together: each tick advances jiffies and, in the same call, the time
/// `bpf_ktime_get_coarse_ns` returns (kernel/time/tick-sched.c, `tick_do_update_jiffies64`,
/// which counts ticks of TICK_NSEC), so timestamps written either way compare with each other
/// and with the agent's CLOCK_MONOTONIC to within a tick.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct JiffiesClock {
    pub ns_per_jiffy: u64,
    /// CLOCK_MONOTONIC at jiffies 0 (wrapping: jiffies start near 2^32, not at boot).
    pub base_ns: u64,
}
const _: () = assert!(size_of::<JiffiesClock>() == 16);

/// One reading of both clocks, taken in one run of the clock-sample program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct ClockSample {
    pub jiffies: u64,
    /// `bpf_ktime_get_coarse_ns`.
    pub coarse_ns: u64,
}
const _: () = assert!(size_of::<ClockSample>() == 16);

impl JiffiesClock {
    /// The kernel's possible HZ values (the CONFIG_HZ choices of kernel/Kconfig.hz).
    pub const KERNEL_HZ: [u64; 4] = [100, 250, 300, 1000];
    /// The fewest ticks between two samples for a calibration. A sample whose two readings
    /// straddle a tick is one tick off, over 12 ticks 8%: more than the 2% a match allows, so
    /// such a pair matches no HZ (and the agent samples again) instead of the wrong one of two
    /// neighbours (HZ 250 and 300 are 20% apart).
    pub const MIN_TICKS: u64 = 12;

    #[inline(always)]
    pub fn now_ns(&self, jiffies: u64) -> u64 {
        self.base_ns
            .wrapping_add(jiffies.wrapping_mul(self.ns_per_jiffy))
    }

    /// The kernel's TICK_NSEC for `hz` (include/linux/jiffies.h): the nanoseconds one jiffy
    /// counts, rounded.
    pub const fn tick_nsec(hz: u64) -> u64 {
        (1_000_000_000 + hz / 2) / hz
    }

    /// The clock two samples at least [`Self::MIN_TICKS`] apart give: the HZ whose tick matches
    /// their ratio within 2%, and the base that puts the later sample at its coarse time. None
    /// when they are too close, out of order or match no HZ.
    pub fn calibrate(first: ClockSample, last: ClockSample) -> Option<Self> {
        let ticks = last.jiffies.checked_sub(first.jiffies)?;
        let elapsed = last.coarse_ns.checked_sub(first.coarse_ns)?;
        if ticks < Self::MIN_TICKS {
            return None;
        }
        let measured = elapsed / ticks;
        let ns_per_jiffy = Self::KERNEL_HZ
            .iter()
            .map(|&hz| Self::tick_nsec(hz))
            .find(|&tick| measured.abs_diff(tick) <= tick / 50)?;
        Some(Self {
            ns_per_jiffy,
            base_ns: last
                .coarse_ns
                .wrapping_sub(last.jiffies.wrapping_mul(ns_per_jiffy)),
        })
    }
}

/// The programs' pseudo-random numbers: xorshift64* (Vigna, "An experimental exploration of
/// Marsaglia's xorshift generators, scrambled", 2016), one state per CPU, seeded from
/// `bpf_get_prandom_u32` on first use. A step is a few instructions where the helper is a call
/// (20-30 ns a new flow here); the numbers spread flows over backends and SNAT ports, and are no
/// secret, as the kernel's prandom is not either.
pub mod xorshift {
    /// The next state after `state` (never 0 for a state that is not 0).
    #[inline(always)]
    pub const fn next(state: u64) -> u64 {
        let mut x = state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x
    }

    /// The number a state gives: the high half of the scrambled state, the better bits.
    #[inline(always)]
    pub const fn output(state: u64) -> u32 {
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
    }

    /// A state from two seeds; never 0 (the one state xorshift cannot leave).
    #[inline(always)]
    pub const fn seed(high: u32, low: u32) -> u64 {
        (((high as u64) << 32) | low as u64) | 1
    }

    /// A number in `0..count` (0 for a count of 0) from a random `u32`: its high bits scaled
    /// by a multiply and a shift (Lemire, "Fast random integer generation in an interval",
    /// 2019) instead of `random % count`, whose `div` is the dearest instruction of a new
    /// flow's selection (20-40 cycles). Each value is drawn `2^32 / count` times, rounded down
    /// or up, as with `%`; xorshift64*'s high bits are its best ones.
    #[inline(always)]
    pub const fn below(random: u32, count: u32) -> u32 {
        ((random as u64 * count as u64) >> 32) as u32
    }
}

/// Default SNAT port range: above the kernel's default ip_local_port_range.
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (61000, 65535);

/// The order in which a new flow tries the ports of a SNAT range: from a random port, by a
/// random stride coprime to the range's length, so that the first `span` tries visit every
/// port once and two flows rarely try the same ports in the same order.
#[derive(Clone, Copy, Debug)]
pub struct SnatPortProbe {
    port_min: u16,
    span: u32,
    offset: u32,
    stride: u32,
}

impl SnatPortProbe {
    /// Primes above 65,536, so each is coprime to any port range's length.
    const STRIDES: [u32; 8] = [
        65_537, 65_539, 65_543, 65_551, 65_557, 65_563, 65_579, 65_581,
    ];

    /// The probe of the range `port_min..=port_max` (an empty one counts as its first port)
    /// for this random number.
    #[inline(always)]
    pub const fn new((port_min, port_max): (u16, u16), random: u32) -> Self {
        let span = port_max.saturating_sub(port_min) as u32 + 1;
        let stride = Self::STRIDES[(random & 7) as usize] % span;
        Self {
            port_min,
            span,
            offset: xorshift::below(random, span),
            stride,
        }
    }

    /// The port to try now; [`advance`](Self::advance) moves on to the next.
    #[inline(always)]
    pub const fn port(&self) -> u16 {
        self.port_min.wrapping_add(self.offset as u16)
    }

    #[inline(always)]
    pub const fn advance(&mut self) {
        // Both below the span: their sum wraps with one subtraction, not a `div` per try.
        let next = self.offset + self.stride;
        self.offset = if next >= self.span {
            next - self.span
        } else {
            next
        };
    }
}

/// The data of a source-range LPM trie key (the trie adds the prefix length in front): a
/// client prefix allowed for one service. The prefix length of an entry is 32 (the service id,
/// matched in full) + the CIDR's prefix length. `A` as in [`FrontendKey`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct SourceRange<A> {
    /// Big-endian, so the trie matches it before the address.
    pub service_id_be: u32,
    /// The CIDR's address (the client's, in a lookup), network byte order.
    pub addr: A,
}
pub type SourceRange4 = SourceRange<u32>;
pub type SourceRange6 = SourceRange<Ipv6Words>;
const _: () = assert!(size_of::<SourceRange6>() == 20);
const _: () = assert!(size_of::<SourceRange4>() == 8);

/// Key of the session-affinity map: a client of a service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct Affinity4Key {
    /// XDP: the client address as a number; socket hooks: the client's network namespace cookie
    /// (a pod is one namespace), with [`AFFINITY_NETNS`] set in `kind`.
    pub client: u64,
    pub service_id: u32,
    pub kind: u32,
}
const _: () = assert!(size_of::<Affinity4Key>() == 16);

/// Key of the IPv6 session-affinity map ([`map_names::AFFINITY6`]): an IPv6 client outside the
/// node (as the packet holds its address) of a service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct Affinity6Key {
    pub client: Ipv6Words,
    pub service_id: u32,
}
const _: () = assert!(size_of::<Affinity6Key>() == 20);

/// `Affinity4Key::kind` of socket-hook entries.
pub const AFFINITY_NETNS: u32 = 1;

/// The backend a client sticks to, and when it last used it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct AffinityValue {
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<AffinityValue>() == 16);

/// A cell of a service's selection table ([`map_names::SLOTS4`]). The service id guards against
/// a packet that read its frontend just before the table moved and the agent handed the old
/// cells to another service: it finds another id and selects nothing
/// ([`Event::DROP_BACKEND_MISSING`]) rather than another service's backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct Slot {
    pub service_id: u32,
    pub backend_id: u32,
}
const _: () = assert!(size_of::<Slot>() == 8);

/// Key of the retired [`map_names::LEGACY_SLOTS4`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(C)]
pub struct LegacySlotKey {
    pub service_id: u32,
    pub revision: u16,
    /// 0..backend_count.
    pub slot: u16,
}
const _: () = assert!(size_of::<LegacySlotKey>() == 8);

/// A backend (one endpoint address, port and protocol). `A` as in [`FrontendKey`]: a backend
/// id names an entry of [`map_names::BACKENDS4`] or of [`map_names::BACKENDS6`], never both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct BackendValue<A> {
    /// Address, network byte order.
    pub addr: A,
    /// Port, network byte order.
    pub port: u16,
    pub proto: u8,
    /// [`backend_flags`] bits.
    pub flags: u8,
}
impl<A: Copy> BackendValue<A> {
    /// Whether a cell of the backends array holds a backend: a backend always has a protocol,
    /// and a cell never written is all zeros.
    pub const fn in_use(&self) -> bool {
        self.proto != 0
    }

    /// The cell of a removed backend: its protocol cleared, its address and port left. A
    /// program that reads the cell while the agent writes it (an array update is a copy in
    /// place, not an atomic replacement as in a hash map) sees either the backend or a vacant
    /// cell, never a mix of two addresses.
    pub const fn vacated(self) -> Self {
        Self { proto: 0, ..self }
    }
}
pub type Backend4 = BackendValue<u32>;
pub type Backend6 = BackendValue<Ipv6Words>;
const _: () = assert!(size_of::<Backend6>() == 20);
const _: () = assert!(size_of::<Backend4>() == 8);

pub mod backend_flags {
    /// The endpoint runs on this node.
    pub const LOCAL: u8 = 1 << 0;
    /// The endpoint is terminating: existing flows keep it, new ones avoid it.
    pub const TERMINATING: u8 = 1 << 1;
    /// The endpoint's node takes DSR options: its agent has marked its Node (the
    /// `lb.io/dsr-boot-id` annotation, equal to the Node's current boot ID), so its XDP
    /// program is attached since the node last booted. Only a flow to such an endpoint goes by
    /// direct server return; one to an endpoint on an unmarked node goes by SNAT.
    pub const TAKES_DIRECT_RETURN: u8 = 1 << 2;
}

/// An address as the connection-tracking maps hold it: IPv4 as a number (`u32::from(Ipv4Addr)`,
/// `u32::from_be_bytes` of the wire bytes), IPv6 as [`Ipv6Words`] (the wire bytes as they are).
/// The datapath reads them from the packet and never converts back for lookups.
pub trait CtAddr: Copy + Default {
    /// Bytes a [`CtValue`] keeps between the client's NIC and `seq_next`, so that a [`FlowValue`]
    /// of the same family, whose frontend address is wider than the MACs and NIC it replaces in
    /// an IPv6 entry, keeps its fields where a conntrack value has them: none for IPv4.
    type Spare: Copy + Default + core::fmt::Debug + PartialEq + Eq + core::hash::Hash;
    /// Bytes after `seq_next` in both, so that neither has padding the compiler leaves
    /// unwritten (an IPv6 value's 8-byte alignment would add 4): none for IPv4.
    type Tail: Copy + Default + core::fmt::Debug + PartialEq + Eq + core::hash::Hash;
}
impl CtAddr for u32 {
    type Spare = ();
    type Tail = ();
}
impl CtAddr for Ipv6Words {
    type Spare = [u8; 12];
    type Tail = [u8; 4];
}

/// Key of the connection-tracking maps: a flow's 5-tuple as the packet carries it, plus
/// direction. `A` is [`CtAddr`]: `u32` for [`map_names::CONNTRACK4`], [`Ipv6Words`] for
/// [`map_names::CONNTRACK6`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct CtKey<A> {
    pub saddr: A,
    pub daddr: A,
    /// Ports as numbers (`u16::from_be_bytes` of the wire bytes).
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// [`ct_direction`].
    pub direction: u8,
    pub _pad: [u8; 2],
}
pub type Ct4Key = CtKey<u32>;
pub type Ct6Key = CtKey<Ipv6Words>;
const _: () = assert!(size_of::<Ct4Key>() == 16);
const _: () = assert!(size_of::<Ct6Key>() == 40);

pub mod ct_direction {
    /// Client to service, keyed as the client sent it (daddr = frontend address).
    pub const ORIGINAL: u8 = 0;
    /// Backend to client, keyed as the backend sends it (saddr = backend address): the answer
    /// half of a flow kept as two entries, or a whole flow kept by its answers' tuple
    /// ([`super::ct_flags::kept_by_answers`]).
    pub const REPLY: u8 = 1;
    /// A whole flow in one entry ([`Flow4Value`]), keyed by its client: saddr and sport are the
    /// client's address and port, daddr and dport are 0. Both directions compute the key: the
    /// client's packets carry it as their source, a local endpoint's answers as their
    /// destination.
    pub const FLOW: u8 = 2;
}

/// The key of the one-entry flow of `client` (address and port as conntrack keys hold them).
#[inline(always)]
pub fn flow_key<A: CtAddr>(client_addr: A, client_port: u16, protocol: u8) -> CtKey<A> {
    CtKey {
        saddr: client_addr,
        daddr: A::default(),
        sport: client_port,
        dport: 0,
        proto: protocol,
        direction: ct_direction::FLOW,
        _pad: [0; 2],
    }
}

/// Value of the connection-tracking maps (`A` as in [`CtKey`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct CtValue<A: CtAddr> {
    /// bpf_ktime_get_ns() of the last packet that refreshed the entry.
    pub last_seen_ns: u64,
    /// The backend the flow was sent to (ORIGINAL entries).
    pub backend_id: u32,
    pub service_id: u32,
    /// ORIGINAL entries: the backend address the flow was sent to (a TCP flow keeps it even
    /// when the backend leaves the maps, like kube-proxy's conntrack). REPLY entries: the
    /// frontend address the client used, restored as the reply's source. Host order of the
    /// wire bytes (`u32::from_be_bytes`).
    pub nat_addr: A,
    /// The port that goes with `nat_addr`, same convention.
    pub nat_port: u16,
    /// [`tcp_state`] for TCP; 0 for UDP.
    pub state: u8,
    /// [`ct_flags`] bits.
    pub flags: u8,
    /// With [`ct_flags::SNAT`]: ORIGINAL entries hold the node address and port that replace the
    /// client's as source; REPLY entries hold the client address and port to restore as the
    /// reply's destination. Same number convention as `nat_addr`.
    pub snat_addr: A,
    pub snat_port: u16,
    /// With SNAT, REPLY entries: the Ethernet addresses of the client's first packet (its
    /// source: the client or the router before it; its destination: this node's NIC). Replies go
    /// back the way the flow came, so XDP needs no neighbour lookup for them.
    pub client_mac: [u8; 6],
    pub node_mac: [u8; 6],
    /// With SNAT, REPLY entries: the NIC the client's packets come in on, which the answers go
    /// out of ([`client_nic`]); 0 in entries written before it was recorded (their answers go
    /// back out of the NIC they arrive on).
    pub client_nic: u16,
    pub spare: A::Spare,
    /// TCP: the sequence number after the furthest segment this entry's side has sent
    /// (ORIGINAL: the client; REPLY: the backend), see [`tcp_seq`]; 0 until it has sent one.
    pub seq_next: u32,
    pub tail: A::Tail,
}
pub type Ct4Value = CtValue<u32>;
pub type Ct6Value = CtValue<Ipv6Words>;
const _: () = assert!(size_of::<Ct4Value>() == 48);
const _: () = assert!(size_of::<Ct6Value>() == 88);
const _: () = assert!(core::mem::offset_of!(Ct6Value, tail) == 84);

/// A conntrack entry of direction [`ct_direction::FLOW`]: a flow kept in one entry instead of
/// an ORIGINAL and a REPLY one. It lies in the conntrack map as a [`CtValue`] and is one where
/// an ORIGINAL entry has its fields (asserted below), so the code of the client's side reads
/// both alike; where REPLY entries keep the client's MACs and NIC, it keeps what the answers
/// need: the frontend to restore and how far the backend has sent.
///
/// Flows to a local endpoint are kept whole here (an answer looks up its destination's key and
/// checks its source against `backend`). A SNAT flow keeps its client's side here and its REPLY
/// entry (the SNAT port's claim) as before, marked [`ct_flags::CLIENT_IN_FLOW`]. A flow whose
/// client key another live flow holds (one client address and port to two frontends) is kept as
/// an ORIGINAL and a REPLY entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct FlowValue<A: CtAddr> {
    pub last_seen_ns: u64,
    pub backend_id: u32,
    pub service_id: u32,
    /// The backend the flow goes to (an ORIGINAL entry's `nat_addr`, `nat_port`).
    pub backend_addr: A,
    pub backend_port: u16,
    pub state: u8,
    pub flags: u8,
    /// With [`ct_flags::SNAT`]: this node's address and port that replace the client's.
    pub snat_addr: A,
    pub snat_port: u16,
    /// The CPUs whose flow cache may hold a slot of the flow ([`flow_cache::cpus`]), where its
    /// client's FIN, RST or next connection empties it.
    pub client_slot_cpus: u16,
    /// The frontend the client sent to: a client's packet must carry it to be the flow's, and
    /// the answers get it back as their source.
    pub frontend_addr: A,
    pub frontend_port: u16,
    /// The CPUs whose answer cache may hold a slot of the flow ([`flow_cache::cpus`]), where
    /// the endpoint's answer to another connection from the client's port, or a DSR SYN that
    /// takes the key, empties it.
    pub answer_slot_cpus: u16,
    /// TCP: the sequence number after the furthest segment the backend has sent (0 until one).
    pub backend_seq_next: u32,
    /// TCP: the same for the client (an ORIGINAL entry's `seq_next`).
    pub seq_next: u32,
    pub tail: A::Tail,
}
pub type Flow4Value = FlowValue<u32>;
pub type Flow6Value = FlowValue<Ipv6Words>;

/// A FLOW entry's fields lie where a conntrack value of the same family has them.
macro_rules! assert_flow_fits {
    ($addr:ty) => {
        const _: () = {
            use core::mem::offset_of;
            type Ct = CtValue<$addr>;
            type Flow = FlowValue<$addr>;
            assert!(size_of::<Flow>() == size_of::<Ct>());
            assert!(align_of::<Flow>() == align_of::<Ct>());
            assert!(offset_of!(Flow, last_seen_ns) == offset_of!(Ct, last_seen_ns));
            assert!(offset_of!(Flow, backend_id) == offset_of!(Ct, backend_id));
            assert!(offset_of!(Flow, service_id) == offset_of!(Ct, service_id));
            assert!(offset_of!(Flow, backend_addr) == offset_of!(Ct, nat_addr));
            assert!(offset_of!(Flow, backend_port) == offset_of!(Ct, nat_port));
            assert!(offset_of!(Flow, state) == offset_of!(Ct, state));
            assert!(offset_of!(Flow, flags) == offset_of!(Ct, flags));
            assert!(offset_of!(Flow, snat_addr) == offset_of!(Ct, snat_addr));
            assert!(offset_of!(Flow, snat_port) == offset_of!(Ct, snat_port));
            assert!(offset_of!(Flow, seq_next) == offset_of!(Ct, seq_next));
            assert!(offset_of!(Flow, tail) == offset_of!(Ct, tail));
        };
    };
}
assert_flow_fits!(u32);
assert_flow_fits!(Ipv6Words);

impl<A: CtAddr> FlowValue<A> {
    /// The flow entry a conntrack value of direction FLOW is.
    #[inline(always)]
    pub fn of(entry: &CtValue<A>) -> &FlowValue<A> {
        // SAFETY: both types are repr(C) of integers only (every bit pattern valid), with the
        // same size and alignment (asserted above).
        unsafe { &*(entry as *const CtValue<A>).cast::<FlowValue<A>>() }
    }

    /// As [`FlowValue::of`], to write.
    #[inline(always)]
    pub fn of_mut(entry: &mut CtValue<A>) -> &mut FlowValue<A> {
        // SAFETY: as in `of`.
        unsafe { &mut *(entry as *mut CtValue<A>).cast::<FlowValue<A>>() }
    }

    /// The conntrack value this flow entry is, without a copy.
    #[inline(always)]
    pub fn as_entry(&self) -> &CtValue<A> {
        // SAFETY: as in `of`.
        unsafe { &*(self as *const FlowValue<A>).cast::<CtValue<A>>() }
    }

    /// The conntrack value that holds this flow entry.
    #[inline(always)]
    pub fn into_entry(self) -> CtValue<A> {
        // SAFETY: as in `of`.
        unsafe { core::mem::transmute_copy::<FlowValue<A>, CtValue<A>>(&self) }
    }
}

pub mod ct_flags {
    /// The flow goes to a backend on another node through SNAT (externalTrafficPolicy Cluster):
    /// XDP rewrites both directions and forwards them itself.
    pub const SNAT: u8 = 1 << 0;
    /// SNAT flows, REPLY entry: the client has sent its FIN.
    pub const CLIENT_FIN: u8 = 1 << 1;
    /// FLOW entries: the flow goes by direct server return ([`crate::dsr`]). On the node the
    /// client sent to, its packets are DNATed only and forwarded, and its SYN carries the DSR
    /// option; on the endpoint's node, the entry is kept alive by the endpoint's answers, the
    /// only packets of the flow it sees. (REPLY entries use the bit as CLIENT_FIN.)
    pub const DIRECT_RETURN: u8 = 1 << 1;
    /// SNAT flows, REPLY entry: the backend has sent its FIN.
    pub const BACKEND_FIN: u8 = 1 << 2;
    /// SNAT flows, REPLY entry: the backend's FIN came first, so the backend holds the
    /// connection in TIME_WAIT and would not take a new SYN on the same ports yet.
    pub const BACKEND_CLOSED_FIRST: u8 = 1 << 3;
    /// SNAT flows, REPLY entry: a RST ended the connection.
    pub const RESET: u8 = 1 << 4;
    /// FLOW entries of local endpoints' flows: the endpoint answered another connection from
    /// the client's port (its SYN-ACK acknowledged another SYN), so the flow is over and its
    /// answers are no longer the entry's to translate. The entry stays until its closing
    /// timeout, so that the flow's last packets still reach the endpoint and do not start a
    /// flow mid-stream that would take the new connection's answers. (REPLY entries use the
    /// bit as RESET.)
    pub const SUPERSEDED: u8 = 1 << 4;
    /// The client's source port is replaced (its address kept) because its reply tuple would
    /// clash with another flow's: ORIGINAL entries hold the new port in `snat_port`, REPLY
    /// entries are keyed by it and restore the client's own port (tc egress).
    pub const PORT_REMAP: u8 = 1 << 5;
    /// FLOW and ORIGINAL entries: the flow was admitted by its service's loadBalancerSourceRanges, which
    /// its later packets are checked against too (a range removed stops the flow).
    pub const SOURCE_CHECKED: u8 = 1 << 6;
    /// The client's side of the flow is its FLOW entry (keyed by the client,
    /// [`super::ct_direction::FLOW`]), not an ORIGINAL one: set on FLOW entries and on the
    /// REPLY entries of SNAT flows kept that way.
    pub const CLIENT_IN_FLOW: u8 = 1 << 7;

    /// Whether an entry under a REPLY key (keyed as its answers: endpoint to client) is a whole
    /// flow ([`crate::FlowValue`]) instead of the answer half of a flow kept as two entries: a
    /// flow that came by direct server return to an endpoint on this node while another live
    /// flow, to another endpoint, held its client's key (one client address and port to two
    /// frontends, as a NAT in front of clients that reuses a port for many destinations makes
    /// them). REPLY entries of flows kept as two never carry [`CLIENT_IN_FLOW`] without
    /// [`SNAT`].
    #[inline(always)]
    pub const fn kept_by_answers(flags: u8) -> bool {
        flags & (CLIENT_IN_FLOW | SNAT) == CLIENT_IN_FLOW
    }
}

/// Where a TCP side is in its sequence space, and which RSTs can be its own: a RST ends a
/// tracked flow only when its sequence number lies near what its sender has sent, in the spirit
/// of RFC 5961 section 3 (a blind RST must guess the window), so that a spoofed RST with any
/// number cannot end a flow, free its SNAT port for another client, or reach the endpoint.
pub mod tcp_seq {
    /// How far behind the furthest sequence number its sender has sent a RST may lie: a stack
    /// without a socket answers with the acknowledgment number of the segment it got (RFC 793
    /// section 3.4), which trails by the data in flight, up to the receiver's window. Linux
    /// windows reach 6 MiB by default (net.ipv4.tcp_rmem); 8 MiB covers them, and a blind RST
    /// then hits one time in 512.
    pub const RST_BEHIND: u32 = 8 << 20;
    /// How far ahead of it: a segment of its sender's that a racing CPU has not recorded yet.
    pub const RST_AHEAD: u32 = 64 << 10;

    /// The sequence number after a segment: its data, and one each for SYN and FIN.
    #[inline(always)]
    pub const fn segment_end(seq: u32, payload_len: u32, syn: bool, fin: bool) -> u32 {
        seq.wrapping_add(payload_len)
            .wrapping_add(syn as u32)
            .wrapping_add(fin as u32)
    }

    /// Whether `end` lies past `seq_next` (modulo 2^32, as TCP compares sequence numbers).
    #[inline(always)]
    pub const fn after(end: u32, seq_next: u32) -> bool {
        (end.wrapping_sub(seq_next) as i32) > 0
    }

    /// How far past what a side has sent (`seq_next`) a segment of its may end and still move
    /// the record on: what the record may trail by (the flow caches write it back within
    /// 16 KiB, `flow_cache::SEQ_AHEAD`) and one more packet, a BIG TCP super-packet of up to
    /// 512 KiB at tc egress among them. A segment further ahead teaches nothing: otherwise a
    /// few spoofed segments, each up to 2 GiB ahead of the last, would walk the record to a
    /// value of the sender's choosing, and a RST fitted to it would end the flow. A blind
    /// segment lands inside one time in 4,096.
    pub const ADVANCE_AHEAD: u32 = 1 << 20;

    /// Whether a segment ending at `end` moves on the record of a side that has sent up to
    /// `seq_next`: past it, by at most [`ADVANCE_AHEAD`].
    #[inline(always)]
    pub const fn advances(seq_next: u32, end: u32) -> bool {
        let ahead = end.wrapping_sub(seq_next);
        ahead != 0 && ahead <= ADVANCE_AHEAD
    }

    /// How far before the furthest sequence number a client has sent (`seq_next`) the
    /// acknowledgment of its SYN may lie in a SYN-ACK its endpoint sends again: before the
    /// endpoint acknowledges anything the client sends no more than that SYN-ACK's window, which
    /// is never scaled (RFC 7323 section 2.2: at most 65,535), beside its SYN's own data (TCP
    /// Fast Open, which the acknowledgment covers) and a FIN. 128 KiB covers them; the SYN-ACK of
    /// another connection, whose acknowledgment follows that connection's random initial
    /// sequence number, falls inside one time in 32,768.
    pub const HANDSHAKE_BEHIND: u32 = 128 << 10;

    /// Whether a SYN-ACK acknowledging `ack` may answer the SYN of the client whose furthest
    /// sent sequence is `seq_next` (0: nothing recorded, so any is taken).
    #[inline(always)]
    pub const fn acknowledges_own_syn(seq_next: u32, ack: u32) -> bool {
        seq_next == 0 || seq_next.wrapping_sub(ack) <= HANDSHAKE_BEHIND
    }

    /// Whether a SYN ending at `syn_end` is one the client whose furthest sent sequence is
    /// `seq_next` sent before (again, perhaps without the data of a TCP Fast Open SYN): its end
    /// lies at or just before `seq_next`, as its endpoint's acknowledgment does. A new
    /// connection's SYN starts at its own initial sequence number.
    #[inline(always)]
    pub const fn repeats_syn(seq_next: u32, syn_end: u32) -> bool {
        acknowledges_own_syn(seq_next, syn_end)
    }

    /// Whether a RST with sequence number `seq` may come from the side whose furthest sent
    /// sequence is `seq_next` (0: nothing recorded yet, so any RST is taken).
    #[inline(always)]
    pub const fn rst_in_window(seq_next: u32, seq: u32) -> bool {
        seq_next == 0
            || seq_next.wrapping_sub(seq).wrapping_add(RST_AHEAD) <= RST_BEHIND + RST_AHEAD
    }

    /// Whether a FIN with sequence number `seq` may come from the side whose furthest sent
    /// sequence is `seq_next`: a FIN starts at most where its sender's next byte goes (a
    /// retransmitted one, and one carrying data a racing CPU has not recorded, within the RST's
    /// bounds either side), so the RST's window holds it.
    #[inline(always)]
    pub const fn fin_in_window(seq_next: u32, seq: u32) -> bool {
        rst_in_window(seq_next, seq)
    }
}

/// A one-hash Bloom filter of the frontends (address, port, protocol): a clear bit means no
/// frontend, so XDP passes the packet without a conntrack or frontend lookup. With n frontends a
/// packet of another destination finds its bit set about n / 2^20 of the time (1% at 10k
/// frontends) and then pays the lookups it would have paid anyway.
pub mod frontend_filter {
    /// 2^20 bits.
    pub const BITS_LOG2: u32 = 20;

    /// The bit of an address and port (host order of the wire bytes) and protocol.
    #[inline(always)]
    pub const fn bit(addr: u32, port: u16, protocol: u8) -> u32 {
        top_bits(addr, port, protocol, BITS_LOG2)
    }

    /// The bit of an IPv6 address ([`crate::Ipv6Words`], as the packet holds it), port (host
    /// order of the wire bytes) and protocol: the address folded to 32 bits, then [`bit`]. Both
    /// families share the filter.
    #[inline(always)]
    pub const fn bit6(addr: crate::Ipv6Words, port: u16, protocol: u8) -> u32 {
        bit(fold6(addr), port, protocol)
    }

    /// Fibonacci hashing of an address, port and protocol together: the top `bits` bits of a
    /// 64-bit multiply.
    #[inline(always)]
    pub(crate) const fn top_bits(addr: u32, port: u16, protocol: u8, bits: u32) -> u32 {
        let key = ((addr as u64) << 24) | ((port as u64) << 8) | protocol as u64;
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - bits)) as u32
    }

    /// An IPv6 address folded to 32 bits, each word in host order of its wire bytes.
    #[inline(always)]
    pub(crate) const fn fold6(addr: crate::Ipv6Words) -> u32 {
        u32::from_be(addr[0])
            ^ u32::from_be(addr[1]).rotate_left(8)
            ^ u32::from_be(addr[2]).rotate_left(16)
            ^ u32::from_be(addr[3]).rotate_left(24)
    }
}

/// A filter of the clients (address, port, protocol) that may have a flow kept as an ORIGINAL
/// and a REPLY entry, which few flows are ([`map_names::CONNTRACK4`]'s pairs: a client port
/// whose key another flow held). A client's packet that finds no FLOW entry of its frontend
/// looks the ORIGINAL entry up only when its client's bit is set: a clear bit saves a UDP new
/// flow (and a TCP segment of no flow) a conntrack lookup that misses, a walk of a cold bucket.
///
/// Two generations of 2^18 bits side by side ([u64; 2] per entry, one cache line read): the
/// programs set a new pair's bit in both, with atomic ORs, and read the two together. The agent
/// empties one generation at a time and sets again the bits of the ORIGINAL entries it then
/// finds in conntrack: the other generation, untouched meanwhile, holds every pair made before
/// the walk, so a clear bit never hides one. A bit set for a pair that has gone is dropped at
/// the second walk after it went (a stale bit costs the lookup that finds nothing).
pub mod pair_filter {
    /// Bits of one generation.
    pub const BITS_LOG2: u32 = 18;
    /// Entries of the filter's array, each a word of both generations.
    pub const ENTRIES: u32 = 1 << (BITS_LOG2 - 6);
    /// The generations an entry holds.
    pub const GENERATIONS: usize = 2;

    /// The bit of an IPv4 client (address and port as a conntrack key holds them) and protocol,
    /// hashed as the frontend filter hashes its keys.
    #[inline(always)]
    pub const fn bit(addr: u32, port: u16, protocol: u8) -> u32 {
        crate::frontend_filter::top_bits(addr, port, protocol, BITS_LOG2)
    }

    /// The bit of an IPv6 client ([`crate::Ipv6Words`] as a conntrack key holds it): the
    /// address folded to 32 bits, then [`bit`]. Both families share the filter.
    #[inline(always)]
    pub const fn bit6(addr: crate::Ipv6Words, port: u16, protocol: u8) -> u32 {
        bit(crate::frontend_filter::fold6(addr), port, protocol)
    }

    /// The array entry that holds `bit`.
    #[inline(always)]
    pub const fn entry(bit: u32) -> u32 {
        bit >> 6
    }

    /// `bit` within the words of its entry.
    #[inline(always)]
    pub const fn mask(bit: u32) -> u64 {
        1 << (bit & 63)
    }
}

/// XDP's per-CPU flow cache: a copy, in an array slot, of where a TCP flow kept whole in one
/// FLOW entry (a local endpoint's, [`FlowValue`]) sends its client's packets. A segment that
/// only acknowledges or carries data within the slot's sequence window goes where the slot says,
/// without the conntrack hash lookup (whose kernel functions are 30-35 ns of the established
/// path). Nothing on that path writes: conntrack keeps every field it keeps without the cache.
///
/// A slot stays valid until its entry's `last_seen` is due to be rewritten (what the established
/// path would next write, [`ct_timeouts::REFRESH`] or a quarter of the timeout), or a quarter of
/// the closing timeout (the endpoint's FIN, which tc egress writes into the entry, reaches the
/// cache no later than that), whichever comes first; it serves sequence numbers up to
/// [`flow_cache::SEQ_AHEAD`] past what the entry has recorded, so that the entry's record never
/// trails a RST's by more than [`tcp_seq::RST_AHEAD`]. Per CPU, so that a slot is only ever
/// written by the program that reads it: a flow the NIC spreads over CPUs has a slot on each.
///
/// tc egress keeps the twin for a local endpoint's answers ([`map_names::ANSWER_CACHE4`]): the
/// same slot, keyed by the answer's destination (the client), served when the answer comes from
/// the slot's endpoint, restoring the slot's frontend as its source, with the endpoint's side of
/// the sequence window; it holds a flow for [`ct_timeouts::REFRESH`] (tc egress writes no
/// `last_seen`), or a quarter of the closing timeout when that is shorter.
///
/// A flow's end is the one write from another CPU: a flow whose packets reach several CPUs has
/// a slot on each, and its FLOW entry records which ([`flow_cache::cpus`]), so that the
/// client's FIN or RST, or the next connection from its port, empties them all. A slot left on
/// another CPU would send the next connection's segments that fall in its window to the old
/// endpoint.
pub mod flow_cache {
    /// Slots per CPU (2,048 x 40 bytes for IPv4, x 80 bytes for IPv6: 240 KiB a CPU).
    pub const SLOTS_LOG2: u32 = 11;
    pub const SLOTS: u32 = 1 << SLOTS_LOG2;
    /// How far ahead of the entry's `seq_next` a segment's end may reach and still be served
    /// from the slot: a quarter of [`crate::tcp_seq::RST_AHEAD`], so that a RST's sequence number
    /// stays within the window the entry judges it by, with room for racing CPUs.
    pub const SEQ_AHEAD: u32 = 16 << 10;
    /// How far behind it (retransmissions, reordering): further back is the full path's.
    pub const SEQ_BEHIND: u32 = 16 << 10;

    /// The slot of a client's IPv4 address (host order of the wire bytes) and port: Fibonacci
    /// hashing, the top bits of a 64-bit multiply.
    #[inline(always)]
    pub const fn slot(addr: u32, port: u16) -> u32 {
        let key = ((addr as u64) << 16) | port as u64;
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SLOTS_LOG2)) as u32
    }

    /// The slot of a client's IPv6 address ([`crate::Ipv6Words`], as the packet holds it) and
    /// port: the address folded to 32 bits, then [`slot`].
    #[inline(always)]
    pub const fn slot6(addr: crate::Ipv6Words, port: u16) -> u32 {
        let folded = addr[0] ^ addr[1].rotate_left(8) ^ addr[2].rotate_left(16) ^ addr[3];
        slot(folded, port)
    }

    /// Whether a segment ending at `seq_end` lies in the window of a slot whose floor is
    /// `seq_floor` (the entry's `seq_next` less [`SEQ_BEHIND`]).
    #[inline(always)]
    pub const fn in_window(seq_floor: u32, seq_end: u32) -> bool {
        seq_end.wrapping_sub(seq_floor) <= SEQ_BEHIND + SEQ_AHEAD
    }

    /// How many more misses than hits a cache may see on a CPU before its gate
    /// ([`crate::FlowCacheGate`]) closes: scored one for one, the cache stays while at least
    /// half the segments that look hit.
    pub const GATE_MISSES: u32 = 32;
    /// The packets a closed gate lets past the cache before it opens again (steady TCP
    /// segments and UDP datagrams: the packets that look).
    pub const GATE_CLOSED_FOR: u32 = 256;
    /// Misses more than hits an opened gate takes before it closes again: a flow's first
    /// segment misses and fills its slot, so a probe needs room for the fill and the hit after.
    pub const GATE_PROBE_MISSES: u32 = 4;

    /// Which CPUs' caches may hold slots of a flow, as its FLOW entry records them: none, one
    /// (its number plus one), or several (any of them).
    pub mod cpus {
        pub const NONE: u16 = 0;
        pub const SEVERAL: u16 = u16::MAX;

        /// The record once CPU `cpu`'s cache has taken the flow too.
        #[inline(always)]
        pub const fn with(recorded: u16, cpu: u32) -> u16 {
            let one = cpu.saturating_add(1);
            if recorded == NONE && one < SEVERAL as u32 {
                one as u16
            } else if recorded as u32 == one {
                recorded
            } else {
                SEVERAL
            }
        }

        /// The one CPU a record names, if it names exactly one.
        #[inline(always)]
        pub const fn only(recorded: u16) -> Option<u32> {
            match recorded {
                NONE | SEVERAL => None,
                one => Some(one as u32 - 1),
            }
        }
    }

    /// The gates of each cache, in [`crate::map_names::FLOW_CACHE_GATES`]: one for its TCP
    /// segments and one for its UDP datagrams, so that a CPU whose UDP flows are one datagram
    /// each (DNS queries from ever new ports: every look misses) closes the UDP gate and leaves
    /// the TCP flows their cache.
    pub mod gate {
        /// The TCP gates of the four caches.
        pub const XDP4: u32 = 0;
        pub const XDP6: u32 = 1;
        pub const ANSWER4: u32 = 2;
        pub const ANSWER6: u32 = 3;
        /// What a cache's UDP gate adds to its TCP gate's index.
        pub const UDP: u32 = 4;
        pub const COUNT: u32 = 8;
        /// Each gate as the metrics name it: (index, hook, IP family, protocol).
        pub const ALL: [(u32, &str, &str, &str); COUNT as usize] = [
            (XDP4, "xdp", "IPv4", "TCP"),
            (XDP6, "xdp", "IPv6", "TCP"),
            (ANSWER4, "tc", "IPv4", "TCP"),
            (ANSWER6, "tc", "IPv6", "TCP"),
            (XDP4 + UDP, "xdp", "IPv4", "UDP"),
            (XDP6 + UDP, "xdp", "IPv6", "UDP"),
            (ANSWER4 + UDP, "tc", "IPv4", "UDP"),
            (ANSWER6 + UDP, "tc", "IPv6", "UDP"),
        ];
    }
}

/// Whether a CPU's flow cache (or answer cache) is worth a look: a cache that misses costs a
/// slot read on each segment that takes the full path anyway (many more flows than slots, or
/// flows the cache does not take, such as SNAT flows); with 16,384 flows in turn that made a
/// segment 120-195 ns dearer than no cache (lb-bench's `xdp_established_many`), where a hit
/// saves 40-45 ns. Each packet that looks (a steady TCP segment, a UDP datagram) scores the
/// gate: a miss adds one, a hit takes one off; past [`flow_cache::GATE_MISSES`] the gate
/// closes, and the next [`flow_cache::GATE_CLOSED_FOR`] such packets take the full path
/// without a look or a fill. Then it opens on probation
/// ([`flow_cache::GATE_PROBE_MISSES`]). All zeros is open, with no misses. The gate also
/// counts its cache's looks for the metrics, in the cache line each look writes anyway.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct FlowCacheGate {
    /// Misses less hits, 0 ..= [`flow_cache::GATE_MISSES`].
    pub misses: u32,
    /// Packets still to let past while the gate is closed.
    pub closed_for: u32,
    /// Looks whose slot served the segment.
    pub hits_total: u64,
    /// Looks whose slot did not, the ones that closed the gate among them.
    pub misses_total: u64,
    /// Times the gate closed.
    pub closings_total: u64,
}
const _: () = assert!(size_of::<FlowCacheGate>() == 32);

/// A slot of the flow cache ([`flow_cache`]): the flow's client and frontend, which a packet
/// must carry to be served from it, and where its packets go. `A` as in [`CtKey`]; an empty slot
/// is all zeros (valid until 0). What a hit compares comes first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct FlowCacheSlot<A: CtAddr> {
    /// bpf_ktime_get_ns() up to which the slot serves.
    pub valid_until_ns: u64,
    pub client_port: u16,
    pub frontend_port: u16,
    /// How far the side whose packets the slot serves had sent when the slot was written (the
    /// entry's `seq_next` for the client's packets in XDP, `backend_seq_next` for the
    /// endpoint's answers in tc egress), less [`flow_cache::SEQ_BEHIND`]; unused for UDP.
    pub seq_floor: u32,
    pub client_addr: A,
    pub frontend_addr: A,
    /// The packet's new destination (the endpoint). Its source stays the client's: flows
    /// through SNAT are not cached, and a FLOW entry's flow never has its port remapped.
    pub backend_addr: A,
    pub backend_port: u16,
    /// [`ct_flags::SOURCE_CHECKED`] when the flow's client must still be inside the service's
    /// source ranges.
    pub flags: u8,
    /// The flow's transport protocol: a client may send TCP and UDP from one port.
    pub protocol: u8,
    pub service_id: u32,
    /// The endpoint's id in the backends map: a UDP flow is served only while that id still
    /// holds the endpoint ([`flow_cache`]).
    pub backend_id: u32,
    pub tail: A::Tail,
}
pub type FlowCacheSlot4 = FlowCacheSlot<u32>;
pub type FlowCacheSlot6 = FlowCacheSlot<Ipv6Words>;
const _: () = assert!(size_of::<FlowCacheSlot4>() == 40);
const _: () = assert!(size_of::<FlowCacheSlot6>() == 80);

pub mod tcp_state {
    use crate::tcp_flags::{ACK, FIN, RST, SYN};

    pub const NONE: u8 = 0;
    pub const SYN_SENT: u8 = 1;
    pub const ESTABLISHED: u8 = 2;
    /// Both sides have sent their FIN, or one a RST: only the last ACKs may still come.
    pub const CLOSING: u8 = 3;
    /// The client has sent its FIN; the endpoint may go on sending (a half-close: conntrack's
    /// FIN_WAIT and CLOSE_WAIT).
    pub const CLIENT_CLOSED: u8 = 4;
    /// The endpoint has sent its FIN; the client may go on sending.
    pub const BACKEND_CLOSED: u8 = 5;

    /// The state of a TCP flow whose first tracked segment (a client's) has these flags.
    pub const fn initial(tcp_flags: u8) -> u8 {
        if tcp_flags & RST != 0 {
            CLOSING
        } else if tcp_flags & FIN != 0 {
            CLIENT_CLOSED
        } else if tcp_flags & SYN != 0 {
            SYN_SENT
        } else {
            // Picked up mid-stream (e.g. the entry was evicted): treat as established.
            ESTABLISHED
        }
    }

    /// The state after a segment with these flags from the client (`from_backend` false) or
    /// the endpoint: a RST closes the flow, a FIN half-closes it, and the other side's FIN
    /// closes it; the first ACK without SYN after the handshake's SYN establishes it.
    pub const fn next(state: u8, tcp_flags: u8, from_backend: bool) -> u8 {
        let (own, other) = if from_backend {
            (BACKEND_CLOSED, CLIENT_CLOSED)
        } else {
            (CLIENT_CLOSED, BACKEND_CLOSED)
        };
        if tcp_flags & RST != 0 {
            CLOSING
        } else if tcp_flags & FIN != 0 {
            if state == other || state == CLOSING {
                CLOSING
            } else {
                own
            }
        } else if state == SYN_SENT && tcp_flags & ACK != 0 && tcp_flags & SYN == 0 {
            ESTABLISHED
        } else {
            state
        }
    }

    /// Whether a flow in this state has seen a FIN or RST: a bare SYN on its tuple is a new
    /// connection.
    pub const fn ending(state: u8) -> bool {
        state == CLOSING || state == CLIENT_CLOSED || state == BACKEND_CLOSED
    }

    /// The state a half of a flow kept in two entries takes from the other half, which moved to
    /// `moved_to`: the later of the two in NONE < SYN_SENT < ESTABLISHED < a half-close <
    /// CLOSING, where the client's half-close and the endpoint's together make CLOSING. The
    /// client's FIN (XDP) and the endpoint's (tc, or XDP for a SNAT flow) may be handled on two
    /// CPUs at once, each moving its own entry to its half-close first: taken this way, both
    /// entries end CLOSING whichever CPU writes last, where a plain copy left one half-closed
    /// for the half-closed timeout.
    pub const fn join(current: u8, moved_to: u8) -> u8 {
        if current == moved_to {
            current
        } else if ending(current) && ending(moved_to) {
            CLOSING
        } else if ending(current) {
            current
        } else if ending(moved_to) || moved_to > current {
            moved_to
        } else {
            current
        }
    }
}

/// TCP header flag bits (RFC 9293, section 3.1).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// Key of the socket reverse-NAT map: a socket and the backend it was connected to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct SockNat4Key {
    /// bpf_get_socket_cookie().
    pub cookie: u64,
    /// Backend address and port, network byte order.
    pub addr: u32,
    pub port: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<SockNat4Key>() == 16);

/// Key of the IPv6 socket reverse-NAT map ([`map_names::SOCK_NAT6`]): [`SockNat4Key`] with an
/// IPv6 backend (its own type: the cookie's alignment needs more padding than IPv4's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct SockNat6Key {
    /// bpf_get_socket_cookie().
    pub cookie: u64,
    /// Backend address and port, network byte order.
    pub addr: Ipv6Words,
    pub port: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(size_of::<SockNat6Key>() == 32);

/// The Service address the application asked for. `A` as in [`FrontendKey`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct SockNatValue<A> {
    pub addr: A,
    pub port: u16,
    pub _pad: [u8; 2],
    pub service_id: u32,
}
pub type SockNat4Value = SockNatValue<u32>;
pub type SockNat6Value = SockNatValue<Ipv6Words>;
const _: () = assert!(size_of::<SockNat6Value>() == 24);
const _: () = assert!(size_of::<SockNat4Value>() == 12);

/// What the socket hooks last did for one socket (socket-local storage, freed with the socket).
/// `A` as in [`FrontendKey`]: an IPv4 socket's (or a dual-stack socket's toward an IPv4
/// Service) in [`map_names::SOCK_STATE4`], an IPv6 one's in [`map_names::SOCK_STATE6`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct SockState<A> {
    /// The backend connect()/sendmsg() was last sent to (network byte order): the key, with the
    /// socket's cookie, of its socket NAT entry.
    pub backend_addr: A,
    pub backend_port: u16,
    pub _pad: [u8; 2],
    /// The service whose loadBalancerSourceRanges the socket's packets to that backend must
    /// pass, or [`SockState::NO_SOURCE_CHECK`].
    pub source_check_service: u32,
}
pub type SockState4 = SockState<u32>;
pub type SockState6 = SockState<Ipv6Words>;
const _: () = assert!(size_of::<SockState4>() == 12);
const _: () = assert!(size_of::<SockState6>() == 24);

impl<A> SockState<A> {
    /// No source check for this socket's packets.
    pub const NO_SOURCE_CHECK: u32 = u32::MAX;
}

/// Per-CPU counters of one service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct ServiceCounter {
    /// Packets DNATed by XDP (the socket path rewrites connections, not packets).
    pub packets: u64,
    /// Bytes of those packets.
    pub bytes: u64,
    /// New flows: XDP flows created plus connections / datagram destinations rewritten by the
    /// socket hooks.
    pub new_flows: u64,
}
const _: () = assert!(size_of::<ServiceCounter>() == 24);

/// Why the datapath dropped (or notably passed) a packet or refused a connection: the index into
/// the events map. Every drop has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct Event(pub u32);

impl Event {
    /// Entries of the events map ([`map_names::EVENTS`]): room for events later releases add,
    /// which would otherwise change its size, and with it its name, resetting every counter.
    pub const SLOTS: u32 = 64;
}
const _: () = assert!(Event::COUNT <= Event::SLOTS);

labelled_indexes! {
    Event;
    /// Drop: the service has no usable backend.
    DROP_NO_BACKEND = "drop_no_backend",
    /// Drop: the slot or backend map lacks an entry the service entry points to (agent mid-update
    /// or inconsistent state).
    DROP_BACKEND_MISSING = "drop_backend_missing",
    /// Drop: a connection-tracking entry could not be created.
    DROP_CT_FULL = "drop_ct_full",
    /// Drop: an IPv4 header or a TCP/UDP/SCTP header shorter than it must be, or inconsistent
    /// lengths.
    DROP_MALFORMED = "drop_malformed",
    /// Drop: rewriting the packet failed (tc helpers returned an error).
    DROP_NAT_FAILED = "drop_nat_failed",
    /// Pass: a later fragment with no record of its first fragment's translation went on
    /// untouched (in tc egress, any such fragment leaving the node, the node's own among them).
    PASS_FRAGMENT = "pass_fragment",
    /// Refused: a socket connect/sendmsg to a service with no usable backend.
    SOCK_NO_BACKEND = "sock_no_backend",
    /// Drop: a Local traffic policy and no backend on this node (kube-proxy drops these too).
    DROP_NO_LOCAL_BACKEND = "drop_no_local_backend",
    /// Drop: the client is outside the service's loadBalancerSourceRanges.
    DROP_SOURCE_RANGE = "drop_source_range",
    /// Reject: a TCP RST sent for a service with no endpoint (kube-proxy's REJECT).
    REJECT_TCP_RST = "reject_tcp_rst",
    /// Reject: an ICMP port unreachable sent for a service with no endpoint.
    REJECT_ICMP = "reject_icmp",
    /// Drop: no free SNAT port for a flow to a remote backend.
    DROP_SNAT_EXHAUSTED = "drop_snat_exhausted",
    /// A tracked flow's REPLY entry was gone (evicted on its own) and was written again.
    CT_REPLY_RESTORED = "ct_reply_restored",
    /// A tracked flow's reply tuple had been taken by another flow: it started over as new.
    CT_FLOW_RESTARTED = "ct_flow_restarted",
    /// A new flow's reply tuple would have clashed with another flow's (one client port to two
    /// frontends of one endpoint): its source port was remapped.
    NAT_PORT_REMAP = "nat_port_remap",
    /// Pass: a new flow to a remote backend whose TTL would run out went to the stack untranslated.
    PASS_TTL_EXCEEDED = "pass_ttl_exceeded",
    /// Pass: a VLAN-tagged frame went on untouched (tagged traffic is not served).
    PASS_VLAN = "pass_vlan",
    /// Drop: a packet to a frontend or SNAT port with a wrong IPv4 header checksum.
    DROP_IP_CHECKSUM = "drop_ip_checksum",
    /// Drop: no REJECT answer for a source that is not unicast (broadcast, multicast, 0.0.0.0,
    /// loopback, or a link-layer broadcast frame).
    DROP_REJECT_NOT_UNICAST = "drop_reject_not_unicast",
    /// Drop: REJECT answers past this CPU's rate.
    DROP_REJECT_RATE_LIMITED = "drop_reject_rate_limited",
    /// Pass: a frame to a service or SNAT port not sent to the NIC's own MAC (another host's,
    /// seen in promiscuous mode, or a group MAC) went on untouched; the stack drops the one
    /// and never forwards the other.
    PASS_OTHER_HOST = "pass_other_host",
    /// An ICMP error about a translated flow was translated and sent to the host that sent the
    /// packet it quotes.
    ICMP_ERROR_TRANSLATED = "icmp_error_translated",
    /// Drop: a TCP RST of a tracked flow whose sequence number lies far from what its sender
    /// has sent (a blind or stale RST, see [`tcp_seq`]), or an SCTP ABORT or SHUTDOWN COMPLETE
    /// whose verification tag is not the one its sender's packets carry: the flow goes on.
    DROP_RST_OUT_OF_WINDOW = "drop_rst_out_of_window",
    /// Drop: the first fragment of an SCTP packet to a frontend or SNAT port. Its CRC32c covers
    /// the whole packet, which XDP never holds at once, so its ports cannot be rewritten.
    DROP_SCTP_FRAGMENT = "drop_sctp_fragment",
    /// Pass: a UDP or SCTP packet went on untouched because the program of its protocol is not
    /// in the program array ([`map_names::XDP_PROGRAMS`]); in tc egress, an SCTP packet over
    /// IPv6 from a possible backend (SCTP is served over IPv4 only).
    PASS_PROTOCOL_UNSERVED = "pass_protocol_unserved",
    /// Track: a new flow of a Maglev service was sent to a backend at random, as its Maglev
    /// table was missing (swapped in after its frontends, which the agent avoids) or named a
    /// backend no longer in the maps.
    MAGLEV_FALLBACK = "maglev_fallback",
    /// Track: a new TCP flow's SYN left for its endpoint's node with a DSR option
    /// ([`crate::dsr`]).
    DSR_SENT = "dsr_sent",
    /// Track: a DSR option was taken: its flow's FLOW entry written, the option stripped.
    DSR_ACCEPTED = "dsr_accepted",
    /// Drop: a DSR option that names no frontend of a Service of the endpoint it was sent to
    /// (for a NodePort, on a node's address), or that came on anything but a SYN, or on a SYN
    /// from a node's address.
    DROP_DSR_REFUSED = "drop_dsr_refused",
    /// Drop: a DSR SYN whose client address and port another live flow of this node holds.
    DROP_DSR_CLASH = "drop_dsr_clash",
    /// Track: a SYN to a Service with direct server return whose IPv4 header carried options
    /// of its own went by SNAT: the DSR option goes only into a header without options.
    DSR_NO_ROOM = "dsr_no_room",
    /// Track: a local endpoint's SYN-ACK to a client acknowledged another SYN than the one the
    /// client's FLOW entry records (the client connected to the endpoint straight, from the
    /// same port; a flow through this node is judged past its SYN only). The entry was
    /// marked [`ct_flags::SUPERSEDED`] and closing, and the answer left untranslated.
    CT_FLOW_SUPERSEDED = "ct_flow_superseded",
    /// Track: a DSR SYN whose client address and port a live flow to another endpoint of this
    /// node holds was kept by its answers' tuple ([`ct_flags::kept_by_answers`]) instead of
    /// being refused.
    DSR_KEPT_BY_ANSWERS = "dsr_kept_by_answers",
    /// Track: a new flow of a Service with direct server return went by SNAT because its
    /// endpoint's node has not marked itself as taking DSR options
    /// ([`backend_flags::TAKES_DIRECT_RETURN`]).
    DSR_NODE_UNMARKED = "dsr_node_unmarked",
    /// Pass: a packet to a frontend that no live flow takes, of a connection of the node's own
    /// (the node connected out from a port that is a NodePort, or a port of a LoadBalancer IP
    /// or externalIP that is its own address), went to the stack untouched instead of starting
    /// a flow: a TCP segment that starts no connection (no bare SYN) for whose addresses and
    /// ports a socket of the node's is there, or a UDP datagram from the peer a UDP socket of
    /// the node's is connected to.
    PASS_NODE_CONNECTION = "pass_node_connection",
    /// Track: a datagram to an unconnected socket came from a backend the hooks had sent the
    /// socket to, but the frontend it sent to is gone or now another Service's: recvmsg() named
    /// the sender as it is instead of as that frontend.
    NAT_SOCKET_STALE = "nat_socket_stale",
    /// Track: a TCP FIN of a tracked flow whose sequence number lies far from what its sender
    /// has sent (a blind or stale FIN), or an SCTP SHUTDOWN or SHUTDOWN ACK without the tag its
    /// sender's packets carry, went on translated but left the flow's state alone: it did not
    /// move the flow to CLOSING, whose short timeout would end an idle connection under it.
    CT_FIN_OUT_OF_WINDOW = "ct_fin_out_of_window",
    /// Track: a client's packet that must not be fragmented (IPv4 with DF set, IPv6) was bigger
    /// than the MTU of the route to its endpoint on another node, or that endpoint's answer to
    /// a SNAT port was bigger than the MTU of the NIC towards its client: XDP answered it with
    /// ICMP "fragmentation needed" or ICMPv6 "packet too big" (from the frontend to the client,
    /// or from the SNAT address to the endpoint), for the sender's path-MTU discovery, and
    /// dropped it.
    ICMP_TOO_BIG_SENT = "icmp_too_big_sent",
    /// Drop: a packet too big for its way on and not to be fragmented, from a sender that may
    /// not get an ICMP error (not unicast), or whose flow's entry is gone, or whose frame could
    /// not be turned into one.
    DROP_TOO_BIG = "drop_too_big",
}

/// `aya::Pod` for the map types, so userspace can read and write them.
#[cfg(feature = "user")]
macro_rules! impl_pod {
    ($($type:ty),*) => {$(
        // SAFETY: repr(C), fields are integers or byte arrays, explicit padding fields leave no
        // implicit padding (sizes asserted next to each type), and every bit pattern is valid.
        unsafe impl aya::Pod for $type {}
    )*};
}

#[cfg(feature = "user")]
impl_pod!(
    NicMac,
    FlowCacheGate,
    FlowCacheSlot4,
    FlowCacheSlot6,
    Frag4Key,
    Frag4Value,
    Frag6Key,
    Frag6Value,
    DatapathConfig,
    CtTimeouts,
    RejectBudget,
    JiffiesClock,
    ClockSample,
    SourceRange4,
    Affinity4Key,
    AffinityValue,
    Frontend4Key,
    FrontendSlot4,
    FrontendSlot6,
    ServiceValue,
    Slot,
    LegacySlotKey,
    Backend4,
    Ct4Key,
    Ct4Value,
    Ct6Key,
    Ct6Value,
    Affinity6Key,
    Datapath6Config,
    SockNat4Key,
    SockNat4Value,
    ServiceCounter,
    Frontend6Key,
    Backend6,
    SourceRange6,
    SockNat6Key,
    SockNat6Value,
    monitor::MonitorControl,
    monitor::MonitorEvent,
    dsr::Admission4Key,
    dsr::AdmissionValue
);

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    #[test]
    fn only_a_dsr_flows_whole_entry_under_a_reply_key_reads_as_kept_by_answers() {
        use ct_flags::*;
        assert!(kept_by_answers(CLIENT_IN_FLOW | DIRECT_RETURN));
        // What the REPLY entries of flows kept as two carry: a SNAT flow's (with its FLOW
        // entry or not, FINs and RST noted), a remapped local flow's.
        for flags in [
            SNAT | CLIENT_IN_FLOW,
            SNAT | CLIENT_IN_FLOW | CLIENT_FIN | BACKEND_FIN | RESET,
            SNAT,
            PORT_REMAP,
            PORT_REMAP | CLIENT_FIN | BACKEND_FIN | BACKEND_CLOSED_FIRST,
            0,
        ] {
            assert!(!kept_by_answers(flags), "{flags:#010b}");
        }
    }

    #[test]
    fn maglev_table_sizes_are_primes_of_about_100_slots_per_backend_kept_within_a_band() {
        let prime = |n: u32| {
            n > 1
                && (2..)
                    .take_while(|d| d * d <= n)
                    .all(|d| !n.is_multiple_of(d))
        };
        assert!(
            maglev::SIZES.iter().all(|&m| prime(m)),
            "{:?}",
            maglev::SIZES
        );
        assert!(maglev::SIZES.windows(2).all(|pair| pair[0] < pair[1]));
        // New tables: the smallest size with at least 100 slots per backend.
        for (backends, size) in [(1, 251), (2, 251), (3, 509), (10, 1_021), (100, 16_381)] {
            assert_eq!(
                maglev::table_size(backends, None),
                size,
                "{backends} backends"
            );
        }
        assert_eq!(maglev::table_size(1000, None), 131_071);
        assert_eq!(maglev::table_size(4096, None), 524_287);
        assert_eq!(
            maglev::table_size(100_000, None),
            524_287,
            "the largest, beyond"
        );
        // Kept while 50 to 400 slots per backend: one more or one fewer changes nothing.
        assert_eq!(maglev::table_size(11, Some(1_021)), 1_021);
        assert_eq!(maglev::table_size(20, Some(1_021)), 1_021);
        assert_eq!(
            maglev::table_size(21, Some(1_021)),
            4_093,
            "fewer than 50 per backend"
        );
        assert_eq!(maglev::table_size(3, Some(1_021)), 1_021);
        assert_eq!(
            maglev::table_size(2, Some(1_021)),
            251,
            "more than 400 per backend"
        );
        // A size not of the ladder (an earlier release's) is replaced.
        assert_eq!(maglev::table_size(10, Some(16_381)), 1_021);
        assert_eq!(maglev::table_size(10, Some(1_000)), 1_021);
    }

    /// Uniform enough to spread flows: over 10 backends and 100,000 draws from each of a few
    /// seeds, every backend within 3% of its share, and a chi-square statistic below the 0.1%
    /// critical value for 9 degrees of freedom (27.88).
    #[test]
    fn xorshift_spreads_evenly_over_backends() {
        for seed in [
            xorshift::seed(0, 0),
            xorshift::seed(1, 2),
            xorshift::seed(u32::MAX, 7),
        ] {
            let mut state = seed;
            let mut counts = [0u32; 10];
            let draws = 100_000;
            for _ in 0..draws {
                state = xorshift::next(state);
                assert_ne!(state, 0);
                counts[(xorshift::output(state) % 10) as usize] += 1;
            }
            let expected = f64::from(draws) / 10.0;
            let chi_square: f64 = counts
                .iter()
                .map(|&count| (f64::from(count) - expected).powi(2) / expected)
                .sum();
            assert!(
                chi_square < 27.88,
                "seed {seed:#x}: {counts:?}, chi2 {chi_square}"
            );
            for count in counts {
                assert!(
                    (f64::from(count) - expected).abs() <= expected * 0.03,
                    "{counts:?}"
                );
            }
        }
    }

    #[test]
    fn the_jiffies_clock_is_calibrated_for_every_kernel_hz_and_agrees_with_coarse_time() {
        // Jiffies start at -300 s worth of ticks (include/linux/jiffies.h, INITIAL_JIFFIES),
        // near 2^32, so `base_ns` wraps below zero.
        for (hz, tick) in [
            (100, 10_000_000),
            (250, 4_000_000),
            (300, 3_333_333),
            (1000, 1_000_000),
        ] {
            let first = ClockSample {
                jiffies: 4_294_967_296 - 300 * hz + 5_000,
                coarse_ns: 9_314_854_998_840,
            };
            for ticks in [JiffiesClock::MIN_TICKS, 1_000] {
                // NTP slews CLOCK_MONOTONIC by up to 500 ppm; the coarse time moves with it.
                let slewed = tick * ticks + tick * ticks / 2_000;
                let last = ClockSample {
                    jiffies: first.jiffies + ticks,
                    coarse_ns: first.coarse_ns + slewed,
                };
                let clock = JiffiesClock::calibrate(first, last)
                    .unwrap_or_else(|| panic!("HZ {hz}, {ticks} ticks"));
                assert_eq!(clock.ns_per_jiffy, tick, "HZ {hz}");
                assert_eq!(clock.now_ns(last.jiffies), last.coarse_ns, "HZ {hz}");
                let drift = clock.now_ns(first.jiffies).abs_diff(first.coarse_ns);
                assert!(drift <= tick, "HZ {hz}, {ticks} ticks: {drift} ns off");
                assert_eq!(
                    clock.now_ns(last.jiffies + 3) - clock.now_ns(last.jiffies),
                    3 * tick
                );
            }
        }
    }

    #[test]
    fn samples_too_close_out_of_order_or_of_no_kernel_hz_calibrate_nothing() {
        let first = ClockSample {
            jiffies: 4_294_000_000,
            coarse_ns: 1_000_000_000,
        };
        let after = |ticks: u64, tick: u64| ClockSample {
            jiffies: first.jiffies + ticks,
            coarse_ns: first.coarse_ns + ticks * tick,
        };
        let too_close = after(JiffiesClock::MIN_TICKS - 1, 4_000_000);
        assert_eq!(JiffiesClock::calibrate(first, too_close), None);
        assert_eq!(JiffiesClock::calibrate(after(100, 4_000_000), first), None);
        // HZ 500 and 3.6 ms ticks are nobody's: halfway between 250 and 300 is 3.67 ms.
        assert_eq!(JiffiesClock::calibrate(first, after(100, 2_000_000)), None);
        assert_eq!(JiffiesClock::calibrate(first, after(100, 3_600_000)), None);
        assert!(JiffiesClock::calibrate(first, after(100, 4_000_000)).is_some());
    }

    /// What operators and dashboards see: the labels are fixed strings, so a renamed,
    /// reordered or dropped class changes this table and fails here.
    #[test]
    fn packet_classes_keep_their_indexes_and_labels() {
        let expected = [
            (0, "ipv4_tcp"),
            (1, "ipv4_udp"),
            (2, "ipv4_icmp"),
            (3, "ipv4_other"),
            (4, "ipv6"),
            (5, "non_ip"),
            (6, "malformed"),
        ];
        let labels: Vec<(u32, &str)> = (0..PacketClass::COUNT)
            .map(|index| (index, PacketClass(index).label().expect("a label")))
            .collect();
        assert_eq!(labels, expected);
        assert_eq!(PacketClass::MALFORMED, PacketClass(6));
        assert_eq!(PacketClass(PacketClass::COUNT).label(), None);
    }

    /// The one's complement sum of a buffer, computed from scratch (RFC 1071).
    fn full_checksum(bytes: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for pair in bytes.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn incremental_updates_match_a_full_recomputation() {
        // An IPv4 header with its checksum field zeroed, then filled in.
        let mut header: [u8; 20] = [
            0x45, 0, 0, 0x3c, 0x1c, 0x46, 0x40, 0, 0x40, 0x06, 0, 0, 203, 0, 113, 10, 203, 0, 113,
            1,
        ];
        let check = full_checksum(&header);
        header[10..12].copy_from_slice(&check.to_be_bytes());
        for new_daddr in [
            [10, 244, 1, 10],
            [255, 255, 255, 255],
            [0, 0, 0, 0],
            [10, 0, 0, 1],
        ] {
            let old = u32::from_be_bytes([header[16], header[17], header[18], header[19]]);
            let new = u32::from_be_bytes(new_daddr);
            let mut rewritten = header;
            rewritten[16..20].copy_from_slice(&new_daddr);
            let incremental = checksum::replace_u32(check, old, new);
            rewritten[10..12].copy_from_slice(&incremental.to_be_bytes());
            // A correct header sums to zero (its checksum verifies).
            assert_eq!(full_checksum(&rewritten), 0, "daddr {new_daddr:?}");
        }
    }

    /// The handshake, a close from either side, a reset, and segments that change nothing, as
    /// a connection tracker must see them (flags as they appear on the wire).
    #[test]
    fn tcp_flows_move_through_their_states_as_their_segments_say() {
        use tcp_flags::{ACK, FIN, RST, SYN};
        use tcp_state::{
            BACKEND_CLOSED, CLIENT_CLOSED, CLOSING, ESTABLISHED, SYN_SENT, ending, initial, next,
        };
        const PSH: u8 = 0x08;
        const CLIENT: bool = false;
        const ENDPOINT: bool = true;
        assert_eq!(initial(SYN), SYN_SENT);
        assert_eq!(initial(ACK), ESTABLISHED, "picked up mid-stream");
        assert_eq!(initial(ACK | PSH), ESTABLISHED);
        assert_eq!(
            initial(FIN | ACK),
            CLIENT_CLOSED,
            "the client's FIN, mid-stream"
        );
        assert_eq!(initial(RST), CLOSING);
        let steps = [
            (SYN_SENT, SYN, CLIENT, SYN_SENT, "a retransmitted SYN"),
            (SYN_SENT, SYN | ACK, ENDPOINT, SYN_SENT, "the SYN-ACK"),
            (
                SYN_SENT,
                ACK,
                CLIENT,
                ESTABLISHED,
                "the handshake's last ACK",
            ),
            (
                SYN_SENT,
                ACK | PSH,
                CLIENT,
                ESTABLISHED,
                "data with the last ACK",
            ),
            (ESTABLISHED, ACK | PSH, ENDPOINT, ESTABLISHED, "data"),
            (
                ESTABLISHED,
                SYN | ACK,
                ENDPOINT,
                ESTABLISHED,
                "a late SYN-ACK",
            ),
            (
                ESTABLISHED,
                FIN | ACK,
                CLIENT,
                CLIENT_CLOSED,
                "the client's FIN",
            ),
            (
                ESTABLISHED,
                FIN | ACK,
                ENDPOINT,
                BACKEND_CLOSED,
                "the endpoint's FIN",
            ),
            (
                CLIENT_CLOSED,
                ACK | PSH,
                ENDPOINT,
                CLIENT_CLOSED,
                "the endpoint goes on",
            ),
            (
                CLIENT_CLOSED,
                FIN | ACK,
                CLIENT,
                CLIENT_CLOSED,
                "the client's FIN again",
            ),
            (
                CLIENT_CLOSED,
                FIN | ACK,
                ENDPOINT,
                CLOSING,
                "then the endpoint's",
            ),
            (
                BACKEND_CLOSED,
                ACK | PSH,
                CLIENT,
                BACKEND_CLOSED,
                "the client goes on",
            ),
            (
                BACKEND_CLOSED,
                FIN | ACK,
                CLIENT,
                CLOSING,
                "then the client's FIN",
            ),
            (
                CLIENT_CLOSED,
                RST,
                ENDPOINT,
                CLOSING,
                "a RST in a half-close",
            ),
            (ESTABLISHED, RST, CLIENT, CLOSING, "a RST"),
            (
                SYN_SENT,
                RST | ACK,
                ENDPOINT,
                CLOSING,
                "a refused connection",
            ),
            (CLOSING, ACK, CLIENT, CLOSING, "the last ACK"),
            (CLOSING, FIN | ACK, ENDPOINT, CLOSING, "a FIN again"),
            (
                CLOSING,
                SYN,
                CLIENT,
                CLOSING,
                "a SYN on a closed tuple (reopening is the tracker's call)",
            ),
        ];
        for (state, flags, from_backend, after, what) in steps {
            assert_eq!(next(state, flags, from_backend), after, "{what}");
        }
        assert!(ending(CLIENT_CLOSED) && ending(BACKEND_CLOSED) && ending(CLOSING));
        assert!(!ending(ESTABLISHED) && !ending(SYN_SENT));
    }

    #[test]
    fn a_half_takes_the_later_state_and_two_half_closes_make_closing() {
        use crate::tcp_state::{
            BACKEND_CLOSED, CLIENT_CLOSED, CLOSING, ESTABLISHED, NONE, SYN_SENT, join,
        };
        let all = [
            NONE,
            SYN_SENT,
            ESTABLISHED,
            CLIENT_CLOSED,
            BACKEND_CLOSED,
            CLOSING,
        ];
        // (current, moved to, joined)
        let rows = [
            (SYN_SENT, ESTABLISHED, ESTABLISHED),
            (ESTABLISHED, SYN_SENT, ESTABLISHED),
            (ESTABLISHED, CLIENT_CLOSED, CLIENT_CLOSED),
            (BACKEND_CLOSED, ESTABLISHED, BACKEND_CLOSED),
            (BACKEND_CLOSED, CLIENT_CLOSED, CLOSING),
            (CLIENT_CLOSED, BACKEND_CLOSED, CLOSING),
            (CLIENT_CLOSED, CLIENT_CLOSED, CLIENT_CLOSED),
            (CLOSING, ESTABLISHED, CLOSING),
            (SYN_SENT, CLOSING, CLOSING),
        ];
        for (current, moved_to, joined) in rows {
            assert_eq!(
                join(current, moved_to),
                joined,
                "{current} joined by {moved_to}"
            );
        }
        // Whichever order two moves arrive in, the half ends the same.
        for a in all {
            for b in all {
                for c in all {
                    assert_eq!(join(join(a, b), c), join(join(a, c), b), "{a} {b} {c}");
                }
            }
        }
    }

    /// Random numbers spread evenly over the whole u32 range land evenly on every value below
    /// the count: each one 2^20 / count times, to within one, and none at or above it.
    #[test]
    fn below_spreads_random_numbers_evenly_over_the_count() {
        extern crate std;
        use std::vec;
        const SWEEP: u64 = 1 << 20;
        for count in [1u32, 2, 3, 7, 10, 1000, 4536, 65_535] {
            let mut hits = vec![0u64; count as usize];
            for step in 0..SWEEP {
                // Every 4096th u32, offset so both ends of the range are drawn.
                let random = (step * (1 << 12) + (step % (1 << 12))) as u32;
                let value = xorshift::below(random, count);
                assert!(value < count, "{count}: {random:#x} gave {value}");
                hits[value as usize] += 1;
            }
            let even = SWEEP / u64::from(count);
            for (value, &n) in hits.iter().enumerate() {
                assert!(
                    n.abs_diff(even) <= 1 || n.abs_diff(even + 1) <= 1,
                    "{count}: {value} drawn {n} times, not about {even}"
                );
            }
        }
        assert_eq!(xorshift::below(u32::MAX, 0), 0);
        assert_eq!(xorshift::below(u32::MAX, u32::MAX), u32::MAX - 1);
    }

    /// Within a range's length of tries, every port of the range once and nothing outside it,
    /// whatever the random number, down to a range of one port and up to all 65,535.
    #[test]
    fn snat_probes_visit_every_port_of_the_range_once() {
        extern crate std;
        use std::collections::BTreeSet;
        let ranges = [
            (61000, 65535),
            (20000, 29999),
            (1, 65535),
            (40000, 40000),
            (50000, 50001),
            (1024, 17_407),
        ];
        for range in ranges {
            // The low three bits pick the stride: every stride, and offsets from both ends.
            for random in [
                0u32,
                1,
                2,
                3,
                4,
                5,
                6,
                0x2000_0000,
                0xdead_beef,
                u32::MAX,
                65_536,
            ] {
                let mut probe = SnatPortProbe::new(range, random);
                let span = usize::from(range.1 - range.0) + 1;
                let mut seen = BTreeSet::new();
                for _ in 0..span {
                    let port = probe.port();
                    assert!((range.0..=range.1).contains(&port), "{range:?}: {port}");
                    assert!(seen.insert(port), "{range:?} {random:#x}: {port} twice");
                    probe.advance();
                }
                assert_eq!(seen.len(), span);
            }
        }
    }

    #[test]
    fn port_updates_match_a_full_recomputation() {
        // A UDP header after its pseudo-header (source, destination, zero, protocol, length),
        // with the checksum filled in; then its destination port rewritten.
        let mut segment: [u8; 20] = [
            203, 0, 113, 10, 10, 96, 0, 10, 0, 17, 0, 8, 0x9c, 0x40, 0, 80, 0, 8, 0, 0,
        ];
        let check = full_checksum(&segment);
        segment[18..20].copy_from_slice(&check.to_be_bytes());
        assert_eq!(full_checksum(&segment), 0);
        for new_port in [8080u16, 0, 0xffff, 30080, 1] {
            let mut rewritten = segment;
            rewritten[14..16].copy_from_slice(&new_port.to_be_bytes());
            let incremental = checksum::replace_u16(check, 80, new_port);
            rewritten[18..20].copy_from_slice(&incremental.to_be_bytes());
            assert_eq!(full_checksum(&rewritten), 0, "port {new_port}");
        }
    }

    #[test]
    fn ipv6_address_updates_match_a_full_recomputation() {
        // A pseudo-header (two addresses, length 20, next header TCP; the segment itself,
        // unchanged by the rewrite, left out) and a checksum field that makes it come out right.
        let addresses: [[u8; 16]; 6] = [
            [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [
                0xfd, 0, 0x10, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x0a,
            ],
            [0xff; 16],
            [0; 16],
            [
                0x20, 0x01, 0x0d, 0xb8, 0x02, 0x44, 0, 1, 0, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef,
            ],
            [
                0x80, 0x01, 0xff, 0xfe, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 1, 2, 3, 4,
            ],
        ];
        let words = |bytes: &[u8; 16]| -> Ipv6Words {
            core::array::from_fn(|i| {
                u32::from_ne_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap())
            })
        };
        for source in &addresses {
            for old in &addresses {
                let mut segment = [0u8; 42];
                segment[..16].copy_from_slice(source);
                segment[16..32].copy_from_slice(old);
                segment[32..40].copy_from_slice(&[0, 0, 0, 20, 0, 0, 0, proto::TCP]);
                let check = full_checksum(&segment);
                segment[40..42].copy_from_slice(&check.to_be_bytes());
                assert_eq!(full_checksum(&segment), 0);
                for new in &addresses {
                    let mut rewritten = segment;
                    rewritten[16..32].copy_from_slice(new);
                    let incremental = checksum::replace_ipv6(check, &words(old), &words(new));
                    rewritten[40..42].copy_from_slice(&incremental.to_be_bytes());
                    assert_eq!(
                        full_checksum(&rewritten),
                        0,
                        "{old:x?} -> {new:x?} behind {source:x?}"
                    );
                }
            }
        }
    }

    #[test]
    fn endpoint_updates_match_a_full_recomputation() {
        use checksum::{Endpoints, replace_endpoints4, replace_endpoints6};
        // A pseudo-header and a TCP header (ports, the rest zero but for the data offset), with
        // the checksum field set so the whole comes out right; then new addresses and ports, and
        // the incremental checksum must make the rewritten segment come out right too.
        let ports = [
            (40000u16, 80u16),
            (0, 0),
            (0xffff, 0xffff),
            (1, 0xfffe),
            (33333, 8443),
        ];
        let addresses4: [[u8; 4]; 5] = [
            [10, 244, 1, 10],
            [0, 0, 0, 0],
            [255, 255, 255, 255],
            [203, 0, 113, 1],
            [192, 168, 255, 1],
        ];
        let addresses6: [[u8; 16]; 5] = [
            [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0; 16],
            [0xff; 16],
            [
                0xfd, 0, 0x10, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x0a,
            ],
            [
                0x80, 0x01, 0xff, 0xfe, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 1, 2, 3, 4,
            ],
        ];
        fn segment(source: &[u8], destination: &[u8], (sport, dport): (u16, u16)) -> Vec<u8> {
            let mut bytes = Vec::new();
            bytes.extend_from_slice(source);
            bytes.extend_from_slice(destination);
            bytes.extend_from_slice(&[0, 0, 0, 20, 0, 0, 0, proto::TCP]);
            let mut tcp = [0u8; 20];
            tcp[0..2].copy_from_slice(&sport.to_be_bytes());
            tcp[2..4].copy_from_slice(&dport.to_be_bytes());
            tcp[12] = 5 << 4;
            bytes.extend_from_slice(&tcp);
            bytes
        }
        /// Every rewrite of one family's addresses (each source to its mirror in the list,
        /// each destination to every other) and ports (each pair to its mirror): the rewritten
        /// segment with the incremental checksum must come out right. How many were checked.
        fn rewrites<const N: usize, A: core::fmt::Debug>(
            addresses: &[[u8; N]],
            ports: &[(u16, u16)],
            address: impl Fn(&[u8; N]) -> A,
            incremental: impl Fn(u16, &Endpoints<A>, &Endpoints<A>) -> u16,
        ) -> usize {
            // The checksum field lies 16 bytes into the TCP header, which ends the segment.
            let field = 2 * N + 8 + 16;
            let endpoints = |source, destination, (sport, dport): (u16, u16)| Endpoints {
                saddr: address(source),
                daddr: address(destination),
                sport,
                dport,
            };
            let mut checked = 0;
            for (old_source, new_source) in addresses.iter().zip(addresses.iter().rev()) {
                for old_destination in addresses {
                    for new_destination in addresses {
                        for (&old_ports, &new_ports) in ports.iter().zip(ports.iter().rev()) {
                            let mut before = segment(old_source, old_destination, old_ports);
                            let check = full_checksum(&before);
                            before[field..field + 2].copy_from_slice(&check.to_be_bytes());
                            assert_eq!(full_checksum(&before), 0);
                            let old = endpoints(old_source, old_destination, old_ports);
                            let new = endpoints(new_source, new_destination, new_ports);
                            let mut after = segment(new_source, new_destination, new_ports);
                            let updated = incremental(check, &old, &new);
                            after[field..field + 2].copy_from_slice(&updated.to_be_bytes());
                            assert_eq!(full_checksum(&after), 0, "{old:x?} -> {new:x?}");
                            checked += 1;
                        }
                    }
                }
            }
            checked
        }
        let words = |bytes: &[u8; 16]| -> Ipv6Words {
            core::array::from_fn(|i| {
                u32::from_ne_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap())
            })
        };
        let checked = rewrites(
            &addresses4,
            &ports,
            |a| u32::from_be_bytes(*a),
            replace_endpoints4,
        ) + rewrites(&addresses6, &ports, words, replace_endpoints6);
        assert_eq!(checked, 2 * 5 * 5 * 5 * 5);
    }

    #[test]
    fn rsts_are_taken_near_what_their_sender_sent_across_the_wrap() {
        use tcp_seq::{RST_AHEAD, RST_BEHIND, rst_in_window};
        for seq_next in [1u32, 5_000, 0x8000_0000, u32::MAX - 10, 3] {
            let at = |offset: i64| (i64::from(seq_next) + offset).rem_euclid(1 << 32) as u32;
            assert!(rst_in_window(seq_next, seq_next), "{seq_next}: at it");
            assert!(
                rst_in_window(seq_next, at(-i64::from(RST_BEHIND))),
                "{seq_next}"
            );
            assert!(
                rst_in_window(seq_next, at(i64::from(RST_AHEAD))),
                "{seq_next}"
            );
            assert!(
                !rst_in_window(seq_next, at(-i64::from(RST_BEHIND) - 1)),
                "{seq_next}"
            );
            assert!(
                !rst_in_window(seq_next, at(i64::from(RST_AHEAD) + 1)),
                "{seq_next}"
            );
            assert!(
                !rst_in_window(seq_next, at(1 << 31)),
                "{seq_next}: opposite"
            );
        }
        assert!(rst_in_window(0, 12_345), "nothing recorded: taken");
    }

    #[test]
    fn a_segment_moves_the_record_on_only_a_little_past_it_across_the_wrap() {
        use tcp_seq::{ADVANCE_AHEAD, advances};
        for seq_next in [1u32, 5_000, 0x8000_0000, u32::MAX - 10, 3] {
            let at = |offset: i64| (i64::from(seq_next) + offset).rem_euclid(1 << 32) as u32;
            assert!(advances(seq_next, at(1)), "{seq_next}: one byte");
            assert!(
                advances(seq_next, at(i64::from(ADVANCE_AHEAD))),
                "{seq_next}: a BIG TCP packet past a trailing record"
            );
            assert!(!advances(seq_next, seq_next), "{seq_next}: a bare ACK");
            assert!(!advances(seq_next, at(-1)), "{seq_next}: behind");
            assert!(
                !advances(seq_next, at(i64::from(ADVANCE_AHEAD) + 1)),
                "{seq_next}: too far"
            );
            assert!(
                !advances(seq_next, at(1 << 30)),
                "{seq_next}: a spoofed jump"
            );
        }
    }

    #[test]
    fn a_syn_ack_is_the_clients_own_only_near_what_the_client_sent_across_the_wrap() {
        use tcp_seq::{HANDSHAKE_BEHIND, acknowledges_own_syn};
        for seq_next in [1u32, 5_000, 0x8000_0000, u32::MAX - 10, 3] {
            let at = |offset: i64| (i64::from(seq_next) + offset).rem_euclid(1 << 32) as u32;
            assert!(
                acknowledges_own_syn(seq_next, seq_next),
                "{seq_next}: at it"
            );
            assert!(
                acknowledges_own_syn(seq_next, at(-65_537)),
                "{seq_next}: a full unscaled window and a FIN sent since"
            );
            assert!(
                acknowledges_own_syn(seq_next, at(-i64::from(HANDSHAKE_BEHIND))),
                "{seq_next}"
            );
            assert!(
                !acknowledges_own_syn(seq_next, at(-i64::from(HANDSHAKE_BEHIND) - 1)),
                "{seq_next}"
            );
            assert!(
                !acknowledges_own_syn(seq_next, at(1)),
                "{seq_next}: more than the client sent"
            );
            assert!(
                !acknowledges_own_syn(seq_next, at(1 << 31)),
                "{seq_next}: opposite"
            );
        }
        assert!(acknowledges_own_syn(0, 12_345), "nothing recorded: taken");
        use tcp_seq::repeats_syn;
        assert!(
            repeats_syn(1101, 1001),
            "a Fast Open SYN sent again without its data"
        );
        assert!(repeats_syn(1001, 1001), "the same SYN");
        assert!(!repeats_syn(1001, 5_000_001), "a new connection's SYN");
    }

    #[test]
    fn segment_ends_count_data_syn_and_fin_modulo_2_32() {
        use tcp_seq::{after, segment_end};
        assert_eq!(segment_end(100, 0, true, false), 101);
        assert_eq!(segment_end(100, 1400, false, true), 1501);
        assert_eq!(segment_end(u32::MAX, 2, false, false), 1);
        assert!(after(1, u32::MAX), "past the wrap");
        assert!(!after(u32::MAX, 1));
        assert!(!after(7, 7));
    }

    #[test]
    fn a_flows_record_of_cpus_names_one_cpu_until_a_second_takes_it() {
        use flow_cache::cpus::{NONE, SEVERAL, only, with};
        assert_eq!(only(NONE), None);
        let on_cpu_0 = with(NONE, 0);
        assert_eq!(only(on_cpu_0), Some(0));
        assert_eq!(with(on_cpu_0, 0), on_cpu_0, "the same CPU again");
        assert_eq!(with(on_cpu_0, 1), SEVERAL, "a second CPU");
        assert_eq!(with(SEVERAL, 0), SEVERAL, "several stays several");
        assert_eq!(only(with(NONE, 65_533)), Some(65_533));
        assert_eq!(
            with(NONE, 65_534),
            SEVERAL,
            "a CPU number the record cannot hold"
        );
        assert_eq!(with(NONE, u32::MAX), SEVERAL);
        assert_eq!(only(SEVERAL), None);
    }

    #[test]
    fn frontend_filter_bits_stay_in_range_and_spread_one_address_ports() {
        use frontend_filter::{BITS_LOG2, bit};
        let addr = u32::from_be_bytes([10, 96, 0, 10]);
        let mut seen = [false; 1 << 16];
        let mut distinct = 0;
        for port in 0..=u16::MAX {
            let bit = bit(addr, port, 6);
            assert!(bit < 1 << BITS_LOG2);
            let slot = (bit >> (BITS_LOG2 - 16)) as usize;
            distinct += usize::from(!seen[slot]);
            seen[slot] = true;
        }
        // A random spread of 65,536 keys over 65,536 slots fills about 63% of them.
        assert!(distinct > 40_000, "{distinct} distinct slots");
        assert_ne!(
            bit(addr, 80, 6),
            bit(addr + 1, 80, 6),
            "neighbouring addresses"
        );
        assert_ne!(bit(addr, 80, 6), bit(addr, 80, 17), "TCP and UDP");
    }

    /// Every event is documented where operators look for it (docs/datapath.md's list of
    /// counters and docs/metrics.md's `event` label), and every label there is an event; labels
    /// are unique and the constants count up from 0.
    #[test]
    fn every_event_is_documented_and_every_documented_event_exists() {
        let labels: Vec<&str> = Event::ALL.iter().map(|(_, label)| *label).collect();
        for (index, (event, _)) in Event::ALL.iter().enumerate() {
            assert_eq!(event.0 as usize, index);
        }
        let mut unique = labels.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), labels.len(), "a label is used twice");
        let datapath = include_str!("../../docs/datapath.md");
        let counters = datapath
            .split("## Counters and drop reasons")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("docs/datapath.md has a counters section");
        let metrics = include_str!("../../docs/metrics.md");
        let event_row = metrics
            .lines()
            .find(|line| line.starts_with("| `lb_datapath_events_total`"))
            .expect("docs/metrics.md documents lb_datapath_events_total");
        for (doc, text) in [
            ("docs/datapath.md", counters),
            ("docs/metrics.md", event_row),
        ] {
            let documented: Vec<&str> = text
                .split('`')
                .skip(1)
                .step_by(2)
                .filter(|word| {
                    [
                        "drop_", "pass_", "reject_", "sock_", "ct_", "nat_", "icmp_", "maglev_",
                        "dsr_",
                    ]
                    .iter()
                    .any(|prefix| word.starts_with(prefix))
                })
                .collect();
            for label in &labels {
                assert!(documented.contains(label), "{doc} does not list {label}");
            }
            for word in &documented {
                assert!(
                    labels.contains(word),
                    "{doc} lists {word}, which is no event"
                );
            }
        }
        assert_eq!(Event(Event::COUNT).label(), None);
    }

    /// The events map keeps its name, and its counts, across releases that add events
    /// ([`Event::SLOTS`]): an event keeps its index for good, so new ones go at the end. This
    /// list is every event in index order; a new one is appended to it.
    #[test]
    fn events_keep_their_indexes() {
        const IN_ORDER: &[&str] = &[
            "drop_no_backend",
            "drop_backend_missing",
            "drop_ct_full",
            "drop_malformed",
            "drop_nat_failed",
            "pass_fragment",
            "sock_no_backend",
            "drop_no_local_backend",
            "drop_source_range",
            "reject_tcp_rst",
            "reject_icmp",
            "drop_snat_exhausted",
            "ct_reply_restored",
            "ct_flow_restarted",
            "nat_port_remap",
            "pass_ttl_exceeded",
            "pass_vlan",
            "drop_ip_checksum",
            "drop_reject_not_unicast",
            "drop_reject_rate_limited",
            "pass_other_host",
            "icmp_error_translated",
            "drop_rst_out_of_window",
            "drop_sctp_fragment",
            "pass_protocol_unserved",
            "maglev_fallback",
            "dsr_sent",
            "dsr_accepted",
            "drop_dsr_refused",
            "drop_dsr_clash",
            "dsr_no_room",
            "ct_flow_superseded",
            "dsr_kept_by_answers",
            "dsr_node_unmarked",
            "pass_node_connection",
            "nat_socket_stale",
            "ct_fin_out_of_window",
            "icmp_too_big_sent",
            "drop_too_big",
        ];
        let labels: Vec<&str> = Event::ALL.iter().map(|(_, label)| *label).collect();
        assert_eq!(labels, IN_ORDER);
    }

    /// The checksum of 40 bytes (an IPv6 address and what follows it in a pseudo-header and a
    /// header), summed whole as native-order 16-bit words, as the kernel sums them.
    fn native_checksum(bytes: &[u8; 40]) -> u16 {
        let mut sum = 0u32;
        for pair in bytes.as_chunks::<2>().0 {
            sum += u32::from(u16::from_ne_bytes(*pair));
        }
        checksum::finish(sum)
    }

    fn words(bytes: &[u8]) -> [u32; 4] {
        core::array::from_fn(|i| u32::from_ne_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap()))
    }

    #[test]
    fn an_ipv6_address_difference_updates_a_checksum_as_a_full_recomputation_does() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let mut bytes = [0u8; 40];
            for byte in &mut bytes {
                state = xorshift::next(state);
                *byte = xorshift::output(state) as u8;
            }
            let old = words(&bytes[..16]);
            let check = native_checksum(&bytes);
            let mut new_address = [0u8; 16];
            for byte in &mut new_address {
                state = xorshift::next(state);
                *byte = xorshift::output(state) as u8;
            }
            bytes[..16].copy_from_slice(&new_address);
            let updated =
                checksum::replace_by_diff(check, checksum::ipv6_diff(&old, &words(&new_address)));
            let full = native_checksum(&bytes);
            // One's complement has two zeros; a checksum field takes either (0xffff and 0 sum
            // alike).
            assert!(
                updated == full || (updated ^ full == 0xffff && (updated == 0 || full == 0)),
                "{updated:#x} {full:#x}"
            );
        }
    }
}
