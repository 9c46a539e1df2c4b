//! Connection tracking, backend selection (random or sticky by client) and SNAT port allocation,
//! shared by the XDP, tc and socket programs.

use core::{
    mem::MaybeUninit,
    sync::atomic::{Ordering, compiler_fence},
};

use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::{debug, warn};
use lb_common::{
    AFFINITY_NETNS, Affinity4Key, AffinityValue, BackendValue, CtAddr, CtKey, CtTimeouts, CtValue,
    DEFAULT_SNAT_PORTS, DatapathConfig, Event, Flow4Value, FlowValue, FrontendKey,
    FrontendSlotHead, ServiceValue, SnatPortProbe, SourceRange, backend_flags, ct_direction,
    ct_flags, ct_timeouts, dsr::AdmissionValue, flow_key, frontend_index, maglev, pair_filter,
    proto, scope, sctp, service_flags, tcp_seq, tcp_state,
};
use lb_ebpf::packet::{IpHeader, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

use crate::{
    family::{Family, V4},
    flow_cache::{self, SlotLook},
    helpers::{
        atomic_or, below, compare_and_swap, holds_tcp_connection, holds_udp_connection, now_ns,
        random_u32,
    },
    maps::{
        AFFINITY4, CONFIG, FRONTEND_FILTER, FRONTEND_SCRATCH, KEY_MODE, MAGLEV4, PAIR_FILTER,
        SLOTS4, count_event, count_service, dry_run,
    },
    monitor,
    zeroed::{zero, zero_init},
};

const NANOS_PER_SECOND: u64 = 1_000_000_000;
/// SNAT ports tried, each at random, before giving up on the flow.
const SNAT_PORT_TRIES: u32 = 128;
/// Insert only if the key is new (include/uapi/linux/bpf.h).
const BPF_NOEXIST: u64 = 1;

/// A flow as the parser saw it: ports as the packet holds them (big-endian values read with
/// `from_be_bytes`, so host-order integers of the wire bytes), addresses as conntrack keeps
/// them ([`CtAddr`]: IPv4 the same way as ports, IPv6 as the packet holds them).
pub struct Tuple<F: Family = V4> {
    pub saddr: F::Addr,
    pub daddr: F::Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags byte; for SCTP the flags its first chunk stands for
    /// ([`lb_common::sctp::flags_of_chunk`]); 0 for UDP.
    pub tcp_flags: u8,
    /// TCP: the segment's sequence number and the one after it ([`tcp_seq::segment_end`]); 0
    /// for UDP and for tuples that do not come from a segment. SCTP: `seq` is the packet's
    /// verification tag, `seq_end` its first chunk's type.
    pub seq: u32,
    pub seq_end: u32,
}

impl<F: Family> Clone for Tuple<F> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<F: Family> Copy for Tuple<F> {}

/// How a client's packet arrived: its frame's MACs (destination: this node's NIC; source: the
/// client or the router before it) and the NIC ([`lb_common::client_nic`]). A SNAT flow's
/// answers go back that way.
#[derive(Clone, Copy)]
pub struct Arrival {
    pub macs: [u8; 12],
    pub nic: u16,
    pub ifindex: u32,
}

impl<F: Family> Clone for Destination<F> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<F: Family> Copy for Destination<F> {}

/// Where a packet of a service flow goes (as [`Tuple`] holds addresses and ports), for which
/// service.
pub struct Destination<F: Family = V4> {
    pub addr: F::Addr,
    pub port: u16,
    pub service_id: u32,
    /// The source the packet leaves with: the client's own, or this node's SNAT address and
    /// port for a backend on another node, or the client's own address with another port when
    /// its reply tuple would clash with another flow's (see [`ct_flags::PORT_REMAP`]). Always
    /// set, never an Option: LLVM reads an Option's unset payload where it merges branches, and
    /// the verifier refuses a read of an unset register.
    pub source: (F::Addr, u16),
    /// XDP sends the packet on itself (a backend on another node) instead of to the stack. With
    /// the client's own address as `source`, the flow goes by direct server return
    /// ([`ct_flags::DIRECT_RETURN`]).
    pub forward: bool,
}
/// Whether a frontend may have this packet's destination ([`lb_common::frontend_filter`]); if
/// not, the packet is none of the datapath's business and needs no further lookup.
#[inline(always)]
pub fn maybe_frontend<F: Family>(tuple: &Tuple<F>) -> bool {
    maybe_frontend_at::<F>(tuple.daddr, tuple.dport, tuple.proto)
}

/// [`maybe_frontend`] by destination address, port and protocol.
#[inline(always)]
pub fn maybe_frontend_at<F: Family>(daddr: F::Addr, dport: u16, protocol: u8) -> bool {
    let bit = F::filter_bit(daddr, dport, protocol);
    FRONTEND_FILTER
        .get(bit >> 6)
        .is_some_and(|word| word & (1u64 << (bit & 63)) != 0)
}

/// A frontend's entry as XDP found it, with the frontend-index slot it was found in: a new
/// flow selects its backend from the backend ids the slot carries, if it carries them
/// ([`lb_common::FrontendSlot`]). [`NOT_INDEXED`] for an entry from the frontends map.
#[derive(Clone, Copy)]
pub struct Frontend {
    pub service: ServiceValue,
    pub index_slot: u32,
}

/// [`Frontend::index_slot`] of an entry found in the frontends map: no slot has it.
pub const NOT_INDEXED: u32 = u32::MAX;

/// The frontend this packet is addressed to, if any: from the frontend index, or from the
/// frontends map when the index's bucket says it lacks one of its frontends.
#[inline(always)]
pub fn lookup_frontend<F: Family>(tuple: &Tuple<F>) -> Option<&'static Frontend> {
    let key = FrontendKey {
        addr: F::map_order(tuple.daddr),
        port: tuple.dport.to_be(),
        proto: tuple.proto,
        scope: scope::ANY,
    };
    let first = frontend_index::first_slot(F::filter_bit(tuple.daddr, tuple.dport, tuple.proto));
    let (found, index_slot) = match indexed_frontend::<F>(&key, first) {
        Indexed::Found(service, slot) => (service, slot),
        Indexed::Absent => return None,
        // SAFETY: as in frontend_entry.
        Indexed::Unknown => (unsafe { F::frontends().get(&key) }?, NOT_INDEXED),
    };
    // One copy for both sources: the verifier walks what follows once, not once per map the
    // entry came from (pointers into two maps never prune each other).
    let copy = FRONTEND_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch entry, which nothing else uses during this run.
    unsafe {
        (*copy).service = *found;
        (*copy).index_slot = index_slot;
        Some(&*copy)
    }
}

/// What a frontend index bucket says of a key.
enum Indexed {
    /// The entry, and the slot it is in.
    Found(&'static ServiceValue, u32),
    /// No frontend has the key.
    Absent,
    /// The bucket lacks one of its frontends: the frontends map knows.
    Unknown,
}

/// The key's entry in the bucket from slot `first` of the frontend index.
#[inline(always)]
fn indexed_frontend<F: Family>(key: &FrontendKey<F::Addr>, first: u32) -> Indexed {
    let Some(head) = F::frontend_slot(first) else {
        return Indexed::Unknown;
    };
    if let Some(service) = live_entry::<F>(head, key) {
        return Indexed::Found(service, first);
    }
    let Some(second) = F::frontend_slot(first + 1) else {
        return Indexed::Unknown;
    };
    if let Some(service) = live_entry::<F>(second, key) {
        return Indexed::Found(service, first + 1);
    }
    // SAFETY: a byte of a map value valid for the run; the agent changes it with one store.
    if unsafe { core::ptr::read_volatile(&head.overflow) } != 0 {
        Indexed::Unknown
    } else {
        Indexed::Absent
    }
}

/// The slot's entry if it is live and `key`'s. `live` is read before the key and the entry (the
/// fence keeps the compiler from reading them first): the agent writes them before it sets
/// `live`, and leaves them alone until a grace period after it cleared it.
#[inline(always)]
fn live_entry<F: Family>(
    slot: &'static FrontendSlotHead<F::Addr>,
    key: &FrontendKey<F::Addr>,
) -> Option<&'static ServiceValue> {
    // SAFETY: as above.
    if unsafe { core::ptr::read_volatile(&slot.live) } == 0 {
        return None;
    }
    compiler_fence(Ordering::Acquire);
    let same = F::same(&slot.key.addr, &key.addr)
        && slot.key.port == key.port
        && slot.key.proto == key.proto
        && slot.key.scope == key.scope;
    same.then_some(&slot.value)
}

/// The entry the socket hooks use for the frontend `addr`:`port` (network byte order, as
/// `bpf_sock_addr` holds them): its entry for this node's own clients when it has one
/// (`scope::NODE_CLIENTS`: an externalTrafficPolicy Local Service's external frontend,
/// short-circuited to the internal policy), else the frontend's.
#[inline(always)]
pub fn lookup_frontend_for_node_client<F: Family>(
    addr: F::Addr,
    port: u16,
    protocol: u8,
) -> Option<&'static ServiceValue> {
    let service = frontend_entry::<F>(addr, port, protocol, scope::ANY)?;
    if service.flags & service_flags::NODE_CLIENTS_ENTRY == 0 {
        return Some(service);
    }
    Some(frontend_entry::<F>(addr, port, protocol, scope::NODE_CLIENTS).unwrap_or(service))
}

/// The family's frontends map entry for `addr`:`port` (network byte order, as map keys hold
/// them) in `scope`.
#[inline(always)]
fn frontend_entry<F: Family>(
    addr: F::Addr,
    port: u16,
    protocol: u8,
    scope: u8,
) -> Option<&'static ServiceValue> {
    let key = FrontendKey {
        addr,
        port,
        proto: protocol,
        scope,
    };
    // SAFETY: the value is only read, and the agent replaces entries whole (a single update).
    unsafe { F::frontends().get(&key) }
}

/// Whether the client (a number, as [`Tuple<F>`] holds it) is inside one of the service's
/// loadBalancerSourceRanges.
#[inline(always)]
pub fn source_allowed<F: Family>(service_id: u32, client: F::Addr) -> bool {
    source_allowed_in::<F>(service_id, F::map_order(client))
}

/// Whether the client (network byte order) is inside one of the service's
/// loadBalancerSourceRanges of its family: the trie's entries match the service id in full,
/// then the CIDR's bits, so a lookup asks for 32 + every bit of the address.
#[inline(always)]
pub fn source_allowed_in<F: Family>(service_id: u32, client: F::Addr) -> bool {
    let key = aya_ebpf::maps::lpm_trie::Key::new(
        32 + F::ADDR_BITS,
        SourceRange {
            service_id_be: service_id.to_be(),
            addr: client,
        },
    );
    F::source_ranges().get(&key).is_some()
}

/// The datapath-wide settings (SNAT address and ports).
#[inline(always)]
pub fn config() -> Option<&'static DatapathConfig> {
    CONFIG.get(0)
}

/// Why no backend: a Local policy with nothing local drops; anything else rejects.
#[inline(always)]
pub fn no_backend(service: &ServiceValue) -> Event {
    if service.flags & service_flags::LOCAL_ONLY != 0 {
        Event::DROP_NO_LOCAL_BACKEND
    } else {
        Event::DROP_NO_BACKEND
    }
}

/// The backend for a packet addressed to `service`: the flow's tracked backend while the entry is
/// alive (for UDP: and the backend still exists), else a fresh choice (sticky for the client when
/// the service has session affinity, random otherwise), tracked from now on.
/// A TCP flow keeps its backend until it ends, also when the backend leaves the service:
/// kube-proxy users rely on that during rollouts. A backend on another node is reached through
/// SNAT unless the service's policy is Local; `may_forward` is false when the packet could not
/// be forwarded (its TTL runs out), and such a packet creates no flow to a remote backend.
///
/// A flow to a local endpoint is one FLOW entry, keyed by its client. A SNAT flow, and a flow
/// whose client key another flow held, also has a REPLY entry, which the LRU map may evict on
/// its own: every client packet of such a flow checks that its REPLY half is there and still its
/// own; a lost half is recreated, and a flow whose reply tuple now serves another flow starts
/// over instead of mixing the two (docs/datapath.md, Connection tracking).
#[inline(always)]
/// The IPv4 header checksum is checked only for a packet that creates or ends a flow: the stack
/// drops one with a bad checksum, so it must not change state, and any other packet with a bad
/// one is translated as it is and dropped where it arrives.
pub fn destination<F: Family>(
    ctx: &XdpContext,
    ip: &impl IpHeader,
    tuple: &Tuple<F>,
    frontend: &Frontend,
    arrival: &Arrival,
    start: Start,
    look: SlotLook<F>,
) -> Result<Destination<F>, Event> {
    let Start {
        client_key,
        direct_return,
    } = start;
    let now = now_ns();
    match live_destination(ctx, ip, tuple, arrival, now, client_key, look)? {
        Ok(destination) => Ok(destination),
        Err(key_holder) => {
            if continues_node_connection(ctx, tuple) {
                return Err(Event::PASS_NODE_CONNECTION);
            }
            let destination = new_flow(&NewFlow {
                tuple,
                frontend,
                arrival,
                may_forward: ip.may_forward(),
                direct_return,
                now,
                key_holder,
                client_key,
            })?;
            monitor::new_flow(tuple, &destination, arrival.ifindex);
            Ok(destination)
        }
    }
}

/// Whether a packet that no live flow takes belongs to a connection of the node's own: a TCP
/// segment that starts no connection (anything but a bare SYN, which is a client's to a
/// frontend) for whose addresses and ports the node holds a socket, or a UDP datagram from the
/// peer a UDP socket of the node's is connected to. The kernel picks a connection's source port
/// from `ip_local_port_range`, which may cover the NodePort range or the port of a
/// LoadBalancer IP or externalIP that is the node's address: the answers then come to a
/// frontend. Asked only where a TCP flow would start mid-stream and where a UDP flow would
/// start, so a lookup in the socket table costs nothing on the paths of live flows and of new
/// TCP ones.
#[inline(always)]
pub fn continues_node_connection<F: Family>(ctx: &XdpContext, tuple: &Tuple<F>) -> bool {
    let (socket_tuple, len) = F::socket_tuple(tuple.saddr, tuple.daddr, tuple.sport, tuple.dport);
    match tuple.proto {
        proto::TCP if tuple.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN => {
            holds_tcp_connection(ctx, socket_tuple, len)
        }
        proto::UDP => holds_udp_connection(ctx, socket_tuple, len),
        _ => false,
    }
}

/// How [`destination`] starts a flow for a packet no live flow takes.
#[derive(Clone, Copy)]
pub struct Start {
    pub client_key: ClientKey,
    /// The flow may go by direct server return ([`NewFlow::direct_return`]): a constant at each
    /// call but `lb_xdp_direct`'s, so that the other programs walk none of its code.
    pub direct_return: bool,
}

/// Whether a packet's client key is looked up before a flow is made for it ([`destination`],
/// [`starts_unlooked`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ClientKey {
    LookedUp,
    /// Claimed by the new flow's insert, which fails when the key is held: the packet then goes
    /// to a program that looks it up.
    Unlooked,
    /// As the IPv6 pipeline recorded for this run ([`claimed_unlooked6`]), read where a new
    /// flow needs to know: read before, its two answers would each be walked by the verifier
    /// through the whole new flow (`lb_xdp6_flow` 451,000 -> 503,000 instructions).
    Recorded6,
}

impl ClientKey {
    /// Whether the client's key of `tuple` was claimed without a lookup.
    #[inline(always)]
    pub fn unlooked<F: Family>(self, tuple: &Tuple<F>) -> bool {
        match self {
            Self::LookedUp => false,
            Self::Unlooked => true,
            Self::Recorded6 => claimed_unlooked6(tuple),
        }
    }
}

/// What this CPU's run of the IPv6 pipeline does with the client's key of a packet that
/// [`starts_unlooked`] ([`KEY_MODE`]): kept in a map, as the choice and the try are made by two
/// of its programs (the frontend stage or a direct program, then the flow stage), and a failed
/// try goes back to the frontend stage, which must then look the key up.
mod key_mode {
    /// Claimed without a lookup, by this run.
    pub const UNLOOKED: u32 = 1;
    /// To be looked up, by the stage the try hands the packet back to (the claim found the key
    /// held, or failed).
    pub const LOOK_UP: u32 = 2;
    /// Looked up, as asked.
    pub const LOOKED_UP: u32 = 3;
}

/// How the IPv6 pipeline takes the client's key of a packet to a frontend: looked up for every
/// packet but those that [`starts_unlooked`], and for those too in the run a failed unlooked
/// try asked to look it up ([`look_up_on_retry`]). Records the choice for the run.
#[inline(always)]
pub fn client_key6<F: Family>(tuple: &Tuple<F>) -> ClientKey {
    if !starts_unlooked(tuple) {
        return ClientKey::LookedUp;
    }
    let Some(mode) = KEY_MODE.get_ptr_mut(0) else {
        return ClientKey::LookedUp;
    };
    // SAFETY: this CPU's own entry; a run and its tail calls stay on one CPU, and runs on one
    // CPU do not interleave.
    let mode = unsafe { &mut *mode };
    if *mode == key_mode::LOOK_UP {
        *mode = key_mode::LOOKED_UP;
        ClientKey::LookedUp
    } else {
        *mode = key_mode::UNLOOKED;
        ClientKey::Unlooked
    }
}

/// Whether this run of the IPv6 pipeline claimed the client's key of its packet without a
/// lookup (the mode [`client_key6`] recorded is the packet's only for a packet that
/// [`starts_unlooked`]).
#[inline(always)]
fn claimed_unlooked6<F: Family>(tuple: &Tuple<F>) -> bool {
    starts_unlooked(tuple)
        && KEY_MODE.get_ptr(0).is_some_and(|mode| {
            // SAFETY: as in client_key6.
            unsafe { *mode == key_mode::UNLOOKED }
        })
}

/// After a new IPv6 flow whose key was claimed without a lookup was not made (its key held, or
/// an error): the frontend stage it is handed back to looks the key up ([`client_key6`]). Its
/// error is not reported: the looked-up pass reports its own.
#[inline(always)]
pub fn look_up_on_retry() {
    if let Some(mode) = KEY_MODE.get_ptr_mut(0) {
        // SAFETY: as in client_key6.
        unsafe { *mode = key_mode::LOOK_UP };
    }
}

/// Whether a packet that starts a flow may be written without looking its client's key up
/// first: a TCP SYN (SCTP INIT) from a port outside the remap range. Nearly always nobody holds
/// that key, and the insert that claims it fails when somebody does (a retransmitted SYN, a
/// port reused while its closed flow is still tracked, one client port to two frontends); the
/// try also fails where a live flow's packet would go on regardless (no endpoint, no SNAT
/// port). Only then is the key looked up, by another program: the lookup of a miss cost a new
/// flow about 80-110 ns. A held key costs the failed try and a second pass.
///
/// IPv6 (TCP and SCTP) hands a failed try back to its frontend stage ([`client_key6`]). IPv4
/// TCP: `lb_xdp` starts only such packets' flows, unlooked, and hands a failed try, and every
/// other packet to a frontend that no live flow took, to `lb_xdp_lookup`, which looks every
/// key up: each program walks one of the two paths through the new flow, where one program
/// choosing at run time walked both (`lb_xdp` 330,000 -> 620,000-640,000 instructions).
/// IPv4 SCTP looks up first (`lb_xdp_sctp` walks 500,000 already).
///
/// From a port of the remap range the key may sit in a flow kept as two entries, which only
/// the lookup finds. A dry run (`lb explain`) looks up first: it writes nothing, so only the
/// lookup shows a retransmitted SYN's flow.
#[inline(always)]
pub fn starts_unlooked<F: Family>(tuple: &Tuple<F>) -> bool {
    proto::has_handshake(tuple.proto)
        && tuple.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && !remap_range_holds(tuple.sport)
        && !dry_run()
}

/// The first half of [`destination`]: where a packet of a live flow goes (Ok), or, for a
/// packet that starts a flow, who holds its client's key (Err, for [`new_flow`]): taken as
/// [`Holder::Vacant`] when `client_key` says it is not looked up (see [`starts_unlooked`]).
/// `look` is what this CPU's flow cache had for the packet (a UDP datagram looks before the
/// frontend's checks, `crate::xdp`): a miss lets the live flow fill its slot.
#[inline(always)]
pub fn live_destination<F: Family>(
    ctx: &XdpContext,
    ip: &impl IpHeader,
    tuple: &Tuple<F>,
    arrival: &Arrival,
    now: u64,
    client_key: ClientKey,
    look: SlotLook<F>,
) -> Result<Result<Destination<F>, Holder>, Event> {
    // One lookup of the client's key serves both questions: is there a live flow, and who
    // holds the key a new flow would take. Not looked up, it takes the path of a miss.
    let flow_entry = if client_key.unlooked(tuple) {
        None
    } else {
        client_flow_entry(tuple)
    };
    if let Some(flow) = live_flow_of(flow_entry, tuple, now) {
        if let Some(destination) = follow(ctx, ip, tuple, flow, || *arrival, now)? {
            // SAFETY: as in live_flow_of.
            flow_cache::remember(&look, unsafe { &mut *flow }, tuple, &destination, now);
            return Ok(Ok(destination));
        }
        count_event(Event::CT_FLOW_RESTARTED);
    }
    if !ip.header_ok(ctx) {
        return Err(Event::DROP_IP_CHECKSUM);
    }
    Ok(Err(client_key_holder(flow_entry, tuple, now)))
}

/// What a new flow is made of (its callers report it to `lb monitor`, [`monitor::new_flow`]):
/// its first packet (`tuple`, and whether it `may_forward` to another node), the frontend it
/// is for, how it arrived, the time, and who holds its client's key.
pub struct NewFlow<'a, F: Family> {
    pub tuple: &'a Tuple<F>,
    pub frontend: &'a Frontend,
    pub arrival: &'a Arrival,
    pub may_forward: bool,
    /// The flow may go by direct server return ([`goes_direct`]): its packet is a SYN without
    /// IP options to a frontend of a Service with it, in `lb_xdp_direct`.
    pub direct_return: bool,
    pub now: u64,
    pub key_holder: Holder,
    /// How the client's key was taken: not looked up, the flow's insert fails when the key is
    /// held, and so does the try.
    pub client_key: ClientKey,
}

/// Who holds the client's key for a new flow of this packet: free when nobody does, or when
/// the holder is past its timeout, this client's earlier flow to the same frontend, or a SNAT
/// flow to another frontend that both sides have closed, whose port this SYN opens anew
/// ([`closed_snat_flow_reopened`]). A holder that is gone takes its flow's slots in XDP's cache
/// with it, on every CPU: the new flow may go to another endpoint (a SNAT flow has none). Its
/// answer slots may stay: a flow to the same frontend gets the same frontend back, and a holder
/// past its timeout has outlived them.
#[inline(always)]
fn client_key_holder<F: Family>(
    flow_entry: Option<*mut CtValue<F::Addr>>,
    tuple: &Tuple<F>,
    now: u64,
) -> Holder {
    let Some(existing) = flow_entry else {
        return Holder::Vacant;
    };
    // SAFETY: an entry that stays valid for this run (RCU); see live_flow_of for races.
    let existing = unsafe { &mut *existing };
    if for_frontend(FlowValue::of(existing), tuple) || past_timeout(existing, tuple.proto, now) {
        flow_cache::forget(existing, tuple);
        Holder::Gone
    } else if closed_snat_flow_reopened(existing, tuple) {
        Holder::Gone
    } else {
        Holder::Alive
    }
}

/// Whether a TCP SYN from the client port of a SNAT flow to another frontend that has closed
/// (both sides' FINs seen here, or a RST) is the client's next connection from the port, which
/// takes the FLOW entry: held by the closed flow, the new one would be kept as two entries,
/// with a remapped port to a local endpoint, or by SNAT where its Service has direct server
/// return. The new flow's endpoint never saw the old one's tuple (it came from a SNAT port),
/// and the old flow's REPLY entry stays for its last answers.
///
/// Every other holder keeps its key until its timeout, as every holder did before: a flow by
/// direct server return, whose closing here is the client's FIN alone (the endpoint's node
/// sees the rest, and the client may still be receiving on the port while it connects
/// elsewhere from it, as Linux allows for another destination; a new flow to the same
/// endpoint from the port would be refused there); a local endpoint's flow, whose tuple the
/// endpoint may hold in TIME_WAIT (the new flow's remapped port keeps clear of it, as Linux
/// NAT remaps a clashing tuple), superseded flows among them; SCTP, as [`port_state`] says.
#[inline(always)]
fn closed_snat_flow_reopened<F: Family>(existing: &CtValue<F::Addr>, tuple: &Tuple<F>) -> bool {
    tuple.proto == proto::TCP
        && existing.flags & ct_flags::SNAT != 0
        && existing.state == tcp_state::CLOSING
        && tuple.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Whether a live flow's REPLY entry is a separate one (a SNAT flow's, or a flow kept as two
/// entries), not part of its FLOW entry.
#[inline(always)]
pub fn has_reply_entry<A: CtAddr>(client_side: &CtValue<A>) -> bool {
    client_side.flags & ct_flags::CLIENT_IN_FLOW == 0 || client_side.flags & ct_flags::SNAT != 0
}

/// The client's side of the live flow this packet continues, if any: its client's FLOW entry
/// when that is for this frontend, else its ORIGINAL entry (a flow whose client key another
/// flow held when it began, or one from before FLOW entries), looked up only when the pair
/// filter has its client's bit ([`original_entry`]). A TCP SYN without a FLOW entry starts a
/// new flow without the second lookup, unless it comes from a port of the remap range.
#[inline(always)]
pub fn live_flow<F: Family>(tuple: &Tuple<F>, now: u64) -> Option<*mut CtValue<F::Addr>> {
    live_flow_of(client_flow_entry(tuple), tuple, now)
}

/// As [`live_flow`], with the client's FLOW entry looked up already.
#[inline(always)]
fn live_flow_of<F: Family>(
    flow_entry: Option<*mut CtValue<F::Addr>>,
    tuple: &Tuple<F>,
    now: u64,
) -> Option<*mut CtValue<F::Addr>> {
    if let Some(entry) = flow_entry {
        // SAFETY: the entry stays valid for the program's run (RCU); racing writers on other
        // CPUs can only make last_seen/state slightly stale, which the timeouts tolerate.
        let flow = unsafe { &*entry };
        if for_frontend(FlowValue::of(flow), tuple) {
            return continues(flow, tuple, now).then_some(entry);
        }
    } else if proto::has_handshake(tuple.proto)
        && tuple.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && !remap_range_holds(tuple.sport)
    {
        // A new connection. (From a port of the remap range it may be the retransmitted SYN of
        // a flow kept as two entries because its reply tuple was taken: that one is looked up.)
        return None;
    }
    let entry = original_entry(tuple)?;
    // SAFETY: as above.
    continues(unsafe { &*entry }, tuple, now).then_some(entry)
}

/// The ORIGINAL entry of a client's packet, looked up only when the pair filter says its
/// client may have one ([`lb_common::pair_filter`]): most clients have none, and the lookup of
/// a key that is not there walks a cold bucket.
#[inline(always)]
fn original_entry<F: Family>(tuple: &Tuple<F>) -> Option<*mut CtValue<F::Addr>> {
    if !maybe_pair(tuple) {
        return None;
    }
    F::conntrack().get_ptr_mut(&original_key(tuple))
}

/// Whether the pair filter has the bit of this packet's client, in either generation (a
/// filter it cannot read counts as set).
#[inline(always)]
fn maybe_pair<F: Family>(tuple: &Tuple<F>) -> bool {
    let bit = F::pair_bit(tuple.saddr, tuple.sport, tuple.proto);
    PAIR_FILTER
        .get(pair_filter::entry(bit))
        .is_none_or(|words| (words[0] | words[1]) & pair_filter::mask(bit) != 0)
}

/// Sets the pair filter's bit of this packet's client in both generations: an atomic OR, since
/// other CPUs and the agent write the same words. Called before a pair's ORIGINAL entry is
/// written, so that no packet finds the entry without the bit, and again after it, so that an
/// agent's rebuild whose emptying fell between the first OR and the insert, and whose walk
/// passed the entry's bucket before the insert, cannot leave the bit cleared.
#[inline(always)]
fn note_pair<F: Family>(tuple: &Tuple<F>) {
    let bit = F::pair_bit(tuple.saddr, tuple.sport, tuple.proto);
    let Some(words) = PAIR_FILTER.get_ptr_mut(pair_filter::entry(bit)) else {
        return;
    };
    for generation in 0..pair_filter::GENERATIONS {
        // SAFETY: a word of the array's value, valid for the program's run.
        unsafe { atomic_or(&raw mut (*words)[generation], pair_filter::mask(bit)) };
    }
}

/// A copy of the client's side of the flow of a client's packet (its FLOW entry or ORIGINAL
/// entry), live or not.
#[inline(always)]
pub fn client_side<F: Family>(tuple: &Tuple<F>) -> Option<CtValue<F::Addr>> {
    client_side_entry(tuple).copied()
}

/// [`client_side`] without the copy, for a path whose stack has no room for one (an IPv6 value
/// is 104 bytes): the entry itself, valid for this run (RCU), read only.
#[inline(always)]
pub fn client_side_entry<F: Family>(tuple: &Tuple<F>) -> Option<&'static CtValue<F::Addr>> {
    // SAFETY: entries that stay valid for this run (RCU), only read.
    if let Some(entry) = client_flow_entry(tuple).map(|entry| unsafe { &*entry })
        && for_frontend(FlowValue::of(entry), tuple)
    {
        return Some(entry);
    }
    // SAFETY: as above.
    original_entry(tuple).map(|entry| unsafe { &*entry })
}

/// The FLOW entry keyed by a client's packet, if any.
#[inline(always)]
fn client_flow_entry<F: Family>(tuple: &Tuple<F>) -> Option<*mut CtValue<F::Addr>> {
    flow_entry::<F>(tuple.saddr, tuple.sport, tuple.proto)
}

/// The FLOW entry of the client `client_addr`:`client_port`, if any. An IPv6 key is written
/// word by word where the lookup reads it (see [`crate::zeroed`]), on every packet of a live
/// flow and every answer of a local endpoint. An IPv4 key is built by value (built the same way
/// as IPv6's, it cost the verifier about 100,000 more instructions in `lb_xdp`).
#[inline(always)]
pub fn flow_entry<F: Family>(
    client_addr: F::Addr,
    client_port: u16,
    protocol: u8,
) -> Option<*mut CtValue<F::Addr>> {
    if size_of::<F::Addr>() < 16 {
        return F::conntrack().get_ptr_mut(&flow_key(client_addr, client_port, protocol));
    }
    let mut slot = MaybeUninit::<CtKey<F::Addr>>::uninit();
    let key = zero_init(&mut slot);
    key.saddr = client_addr;
    key.sport = client_port;
    key.proto = protocol;
    key.direction = ct_direction::FLOW;
    F::conntrack().get_ptr_mut(key)
}

/// Whether a FLOW entry is the flow of this client's packet: the frontend it was sent to.
#[inline(always)]
fn for_frontend<F: Family>(flow: &FlowValue<F::Addr>, tuple: &Tuple<F>) -> bool {
    F::same(&flow.frontend_addr, &tuple.daddr) && flow.frontend_port == tuple.dport
}

/// Whether a live flow's client must still be inside the source ranges of its service: it was
/// admitted by them, and a range removed later must stop it.
#[inline(always)]
pub fn admitted_by_source_ranges<A: CtAddr>(entry: *mut CtValue<A>) -> Option<u32> {
    // SAFETY: as in live_flow.
    let entry = unsafe { &*entry };
    (entry.flags & ct_flags::SOURCE_CHECKED != 0).then_some(entry.service_id)
}

/// Where a packet of a live flow (from [`live_flow`]) goes, its state moved on; None when its
/// reply tuple serves another flow now, so that the flow must start over. `arrival` is asked
/// for only when a lost REPLY entry is written again: reading the NIC (three dependent loads
/// from the context) and the MACs on every packet cost the established path for nothing.
#[inline(always)]
pub fn follow<F: Family>(
    ctx: &XdpContext,
    ip: &impl IpHeader,
    tuple: &Tuple<F>,
    entry: *mut CtValue<F::Addr>,
    arrival: impl FnOnce() -> Arrival,
    now: u64,
) -> Result<Option<Destination<F>>, Event> {
    // SAFETY: as in live_flow.
    let entry = unsafe { &mut *entry };
    if closes(tuple) && !ip.header_ok(ctx) {
        return Err(Event::DROP_IP_CHECKSUM);
    }
    if blind_rst(tuple, entry.seq_next, || endpoint_record(entry, tuple)) {
        return Err(Event::DROP_RST_OUT_OF_WINDOW);
    }
    // A blind FIN goes on untracked.
    let goes_on = if blind_fin(tuple, entry.seq_next) {
        true
    } else if has_reply_entry(entry) {
        keeps_reply_half(entry, tuple, arrival, now)
    } else {
        if !dry_run() {
            note_seq(&mut entry.seq_next, tuple);
            let one_sided = entry.flags & ct_flags::DIRECT_RETURN != 0;
            advance(entry, tuple, now, FROM_CLIENT, one_sided);
        }
        true
    };
    Ok(goes_on.then(|| tracked(entry, tuple)))
}

/// A RST far from what its sender has sent on this flow (`sender_seq_next`, from the sender's
/// side of the flow): not the sender's, so it must neither end the flow nor reach the other
/// side. For SCTP, an ABORT or SHUTDOWN COMPLETE whose verification tag is not the one it must
/// carry (RFC 9260, section 8.5.1): the tag its sender's packets carry (`sender_seq_next`), or,
/// with the T bit, its sender's own, which is the tag its peer's packets carry (`peer_record`,
/// looked up only then); the endpoint would discard it, and it must not end the flow here
/// either. A record of 0 (no handshake seen) checks nothing.
#[inline(always)]
pub fn blind_rst<F: Family>(
    tuple: &Tuple<F>,
    sender_seq_next: u32,
    peer_record: impl FnOnce() -> u32,
) -> bool {
    if tuple.tcp_flags & TCP_RST == 0 {
        return false;
    }
    if tuple.proto == proto::SCTP {
        let expected = if tuple.seq_end & sctp::REFLECTED != 0 {
            peer_record()
        } else {
            sender_seq_next
        };
        return expected != 0 && tuple.seq != expected;
    }
    tuple.proto == proto::TCP && !tcp_seq::rst_in_window(sender_seq_next, tuple.seq)
}

/// A TCP FIN far from what its sender has sent on this flow (`sender_seq_next`, from the
/// sender's side of the flow), or an SCTP SHUTDOWN or SHUTDOWN ACK (RFC 9260, section 8.5)
/// without the tag its sender's packets carry: not the sender's, so it must not move the flow to
/// CLOSING, whose short timeout would end an idle connection under it. Unlike a blind RST it
/// goes on, translated (counted `ct_fin_out_of_window`): the receiver's stack judges it, and a
/// FIN a wrong record refused would cost the connection its end. A record of 0 checks nothing.
#[inline(always)]
pub fn blind_fin<F: Family>(tuple: &Tuple<F>, sender_seq_next: u32) -> bool {
    // Read again for the test alone, as `opens_and_closes` in xdp.rs does: tested on the value
    // the path goes on with, the verifier would walk every later state twice.
    // SAFETY: a field of a live reference.
    let flags = unsafe { core::ptr::read_volatile(&tuple.tcp_flags) };
    if flags & (TCP_FIN | TCP_RST) != TCP_FIN {
        return false;
    }
    let blind = if tuple.proto == proto::SCTP {
        sender_seq_next != 0 && tuple.seq != sender_seq_next
    } else {
        tuple.proto == proto::TCP && !tcp_seq::fin_in_window(sender_seq_next, tuple.seq)
    };
    if blind {
        count_event(Event::CT_FIN_OUT_OF_WINDOW);
    }
    blind
}

/// The SCTP tag the endpoint's packets of a client's flow carry: from the flow's REPLY entry
/// when it has one, else from its FLOW entry.
#[inline(always)]
fn endpoint_record<F: Family>(client_side: &CtValue<F::Addr>, tuple: &Tuple<F>) -> u32 {
    if !has_reply_entry(client_side) {
        return FlowValue::of(client_side).backend_seq_next;
    }
    // SAFETY: a read-only copy of an entry that stays valid for this run (RCU).
    unsafe { F::conntrack().get(&reply_key_of(client_side, tuple)) }
        .map_or(0, |reply| reply.seq_next)
}

/// The SCTP tag the client's packets of a flow carry, for the endpoint's packet `tuple` of the
/// flow whose REPLY entry is `reply`: from the flow's client side (FLOW or ORIGINAL entry).
#[inline(always)]
pub fn client_record_of_reply<F: Family>(reply: &CtValue<F::Addr>, tuple: &Tuple<F>) -> u32 {
    // SAFETY: read here, valid for this run (RCU).
    client_side_of::<F>(reply, tuple).map_or(0, |entry| unsafe { (*entry).seq_next })
}

/// Records how far a side's segment reaches in its sequence space (a write only when it reaches
/// further: data, SYN or FIN, not a bare ACK). For SCTP, the verification tag the side's packets
/// carry, taken from the handshake only, each time: the endpoint's INIT ACK and the client's
/// COOKIE ECHO are the first packets of each side that carry it (an INIT carries 0), and a
/// restarted association (a new INIT on the same ports, RFC 9260 section 5.2.4) brings new
/// ones. Other chunks teach nothing, so that a forged DATA cannot set the tag an ABORT is then
/// held to.
#[inline(always)]
fn note_seq<F: Family>(sender_seq_next: &mut u32, tuple: &Tuple<F>) {
    if tuple.tcp_flags & TCP_RST != 0 {
        return;
    }
    if tuple.proto == proto::SCTP {
        let chunk = tuple.seq_end & !sctp::REFLECTED;
        if chunk == u32::from(sctp::chunk::INIT_ACK) || chunk == u32::from(sctp::chunk::COOKIE_ECHO)
        {
            *sender_seq_next = tuple.seq;
        }
        return;
    }
    if tuple.proto == proto::TCP
        && (*sender_seq_next == 0 || tcp_seq::advances(*sender_seq_next, tuple.seq_end))
    {
        *sender_seq_next = tuple.seq_end;
    }
}

/// A TCP FIN or RST: the packet ends its flow.
#[inline(always)]
pub fn closes<F: Family>(tuple: &Tuple<F>) -> bool {
    tuple.tcp_flags & (TCP_FIN | TCP_RST) != 0
}

/// Where a tracked flow's packets (this one, `tuple`) go.
#[inline(always)]
fn tracked<F: Family>(entry: &CtValue<F::Addr>, tuple: &Tuple<F>) -> Destination<F> {
    let rewrites_source = entry.flags & (ct_flags::SNAT | ct_flags::PORT_REMAP) != 0;
    Destination {
        addr: entry.nat_addr,
        port: entry.nat_port,
        service_id: entry.service_id,
        source: if rewrites_source {
            (entry.snat_addr, entry.snat_port)
        } else {
            (tuple.saddr, tuple.sport)
        },
        forward: entry.flags & (ct_flags::SNAT | ct_flags::DIRECT_RETURN) != 0,
    }
}

/// Whether a packet belongs to the flow its FLOW or ORIGINAL entry tracks.
#[inline(always)]
fn continues<F: Family>(entry: &CtValue<F::Addr>, tuple: &Tuple<F>, now: u64) -> bool {
    timeouts().is_live(tuple.proto, entry.state, entry.last_seen_ns, now)
        && (proto::has_handshake(tuple.proto) || backend_still_there::<F>(entry))
        && !reopens(entry, tuple)
}

/// Whether the flow whose client's side is `original` still holds its REPLY half, recreated
/// when it is gone, both moved on by this packet; false when its reply tuple belongs to another
/// flow now.
#[inline(always)]
fn keeps_reply_half<F: Family>(
    original: &mut CtValue<F::Addr>,
    tuple: &Tuple<F>,
    arrival: impl FnOnce() -> Arrival,
    now: u64,
) -> bool {
    let key = reply_key_of(original, tuple);
    let reply = match F::conntrack().get_ptr_mut(&key) {
        Some(reply) => reply,
        None if dry_run() => return true,
        // A local endpoint's reply tuple may have gone to a FLOW entry meanwhile (the client
        // sends from that port itself): the flow starts over rather than share it.
        None if original.flags & ct_flags::SNAT == 0
            && answers_of_flow::<F>(original, tuple.proto, (key.daddr, key.dport), now) =>
        {
            return false;
        }
        None => {
            let mut local = MaybeUninit::uninit();
            let Some(reply) = value_slot::<F>(scratch::REPLY, &mut local) else {
                return false;
            };
            write_reply(
                reply,
                original,
                original.flags & REPLY_FLAGS,
                tuple,
                &arrival(),
                now,
            );
            if F::conntrack().insert(&key, reply, BPF_NOEXIST).is_ok() {
                count_event(Event::CT_REPLY_RESTORED);
                return true;
            }
            // Another CPU wrote it first, for this flow or another one.
            match F::conntrack().get_ptr_mut(&key) {
                Some(reply) => reply,
                None => return false,
            }
        }
    };
    // SAFETY: valid for this run (RCU); see live_flow for races.
    let reply = unsafe { &mut *reply };
    if !belongs_to(reply, tuple) {
        return false;
    }
    if !dry_run() {
        refresh_flow(original, reply, tuple, now);
    }
    true
}

/// The key of the REPLY entry of a flow: from its backend to the source the backend sees.
#[inline(always)]
fn reply_key_of<F: Family>(original: &CtValue<F::Addr>, tuple: &Tuple<F>) -> CtKey<F::Addr> {
    let to = if original.flags & (ct_flags::SNAT | ct_flags::PORT_REMAP) != 0 {
        (original.snat_addr, original.snat_port)
    } else {
        (tuple.saddr, tuple.sport)
    };
    backend_reply_key::<F>((original.nat_addr, original.nat_port), to, tuple.proto)
}

/// Whether a REPLY entry translates back to this client and frontend.
#[inline(always)]
fn belongs_to<F: Family>(reply: &CtValue<F::Addr>, tuple: &Tuple<F>) -> bool {
    F::same(&reply.snat_addr, &tuple.saddr)
        && reply.snat_port == tuple.sport
        && F::same(&reply.nat_addr, &tuple.daddr)
        && reply.nat_port == tuple.dport
}

/// The entries of this CPU's scratch conntrack values ([`Family::ct_scratch`]).
pub mod scratch {
    /// A new flow's client side (FLOW or ORIGINAL entry).
    pub const ORIGINAL: u32 = 0;
    /// Its REPLY entry, then its FLOW entry.
    pub const REPLY: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// The flags a REPLY entry takes from its flow's client side.
const REPLY_FLAGS: u8 = ct_flags::SNAT | ct_flags::PORT_REMAP | ct_flags::CLIENT_IN_FLOW;

/// Where a conntrack value is built: on the stack for IPv4 (`local`), where the verifier knows
/// what its fields hold and prunes the branches that test them; in this CPU's scratch entry
/// `index` for IPv6 ([`Family::ct_scratch`]), whose values (88 bytes) do not fit the stack
/// beside everything else.
#[inline(always)]
fn value_slot<F: Family>(
    index: u32,
    local: &mut MaybeUninit<CtValue<F::Addr>>,
) -> Option<&mut CtValue<F::Addr>> {
    if F::OUT_OF_LINE {
        F::ct_scratch(index)
    } else {
        Some(zero_init(local))
    }
}

/// Writes the REPLY entry (with `flags`) of a flow into `reply`: the frontend to restore as the
/// source, the client to restore as the destination, and the Ethernet addresses the client's
/// packets came with.
#[inline(always)]
fn write_reply<F: Family>(
    reply: &mut CtValue<F::Addr>,
    original: &CtValue<F::Addr>,
    flags: u8,
    tuple: &Tuple<F>,
    arrival: &Arrival,
    now: u64,
) {
    reply.last_seen_ns = now;
    reply.backend_id = original.backend_id;
    reply.service_id = original.service_id;
    reply.nat_addr = tuple.daddr;
    reply.nat_port = tuple.dport;
    reply.state = original.state;
    reply.flags = flags;
    reply.snat_addr = tuple.saddr;
    reply.snat_port = tuple.sport;
    // The ingress frame's destination MAC is this node's, its source the client's next hop.
    reply.node_mac.copy_from_slice(&arrival.macs[0..6]);
    reply.client_mac.copy_from_slice(&arrival.macs[6..12]);
    reply.client_nic = arrival.nic;
    reply.spare = Default::default();
    // The backend's side: nothing seen of it yet.
    reply.seq_next = 0;
    reply.tail = Default::default();
}

/// A new flow: a backend, the source its packets get (SNAT port, or a remapped client port on a
/// clash), and its conntrack entries: its client's FLOW entry (and a SNAT flow's REPLY entry),
/// or, when another live flow holds the client's key, an ORIGINAL and a REPLY entry, REPLY
/// first (once ORIGINAL exists, the next packets depend on both). A try whose client's key was
/// not looked up ([`ClientKey::Unlooked`]) fails when the key is held, and leaves nothing in the
/// maps when it fails ([`starts_unlooked`]): the packet may be that flow's.
#[inline(always)]
pub fn new_flow<F: Family>(request: &NewFlow<'_, F>) -> Result<Destination<F>, Event> {
    let NewFlow {
        tuple,
        frontend,
        arrival,
        may_forward,
        direct_return,
        now,
        key_holder,
        client_key,
    } = *request;
    let service = &frontend.service;
    let (backend_id, backend) = if service.flags & service_flags::MAGLEV != 0
        && service.affinity_timeout_s == 0
    {
        // No table (yet: the agent swaps tables in at the end of a sync), or one naming a
        // backend that left the maps: a backend of the current table at random instead.
        match select_maglev(service, tuple) {
            Ok(choice) => choice,
            Err(_) => {
                count_event(Event::MAGLEV_FALLBACK);
                debug!(
                    &(),
                    "service {}: no current Maglev table, a backend at random", service.service_id
                );
                select::<F>(service, frontend.index_slot)?
            }
        }
    } else {
        select_for_address::<F>(frontend, tuple.saddr, now)?
    };
    let remote = needs_snat::<F>(service, &backend);
    if remote && !may_forward {
        return Err(Event::PASS_TTL_EXCEEDED);
    }
    let direct_return = direct_return
        && remote
        && goes_direct::<F>(service.flags, tuple.proto)
        && endpoints_node_takes_options(&backend);
    let mut local = MaybeUninit::uninit();
    let original = value_slot::<F>(scratch::ORIGINAL, &mut local).ok_or(Event::DROP_CT_FULL)?;
    // SAFETY: a slot of this CPU's (or this function's) own, valid for a CtValue.
    unsafe { zero(original) };
    original.last_seen_ns = now;
    original.backend_id = backend_id;
    original.service_id = service.service_id;
    original.nat_addr = F::tuple_order(backend.addr);
    original.nat_port = u16::from_be(backend.port);
    original.state = initial_state(tuple);
    original.flags = if direct_return {
        ct_flags::DIRECT_RETURN
    } else if remote {
        ct_flags::SNAT
    } else {
        0
    } | if service.flags & service_flags::SOURCE_RANGES != 0 {
        ct_flags::SOURCE_CHECKED
    } else {
        0
    };
    // TCP: how far the client has sent; SCTP: no tag yet (an INIT carries none).
    original.seq_next = if tuple.proto == proto::TCP {
        tuple.seq_end
    } else {
        0
    };
    if dry_run() {
        return Ok(Destination {
            source: if remote && !direct_return {
                (F::snat_addr().unwrap_or_default(), 0)
            } else {
                (tuple.saddr, tuple.sport)
            },
            ..tracked(original, tuple)
        });
    }
    if key_holder != Holder::Alive
        && let Some(destination) = new_flow_in_one_entry(tuple, original, arrival, now, key_holder)?
    {
        count_service(service.service_id, 0, 0, 1);
        return Ok(destination);
    }
    // A key claimed without a lookup and held: whose it is, and whether the packet is theirs,
    // only the lookup tells.
    if client_key.unlooked(tuple) {
        return Err(Event::DROP_CT_FULL);
    }
    // The source the backend sees: this node's SNAT address for a remote backend; for a local
    // one, the client's address with another port, as Linux NAT does on a clash: another flow
    // holds this client's address and port, and the reply tuple must differ from its own and
    // from every other flow's.
    let (addr, flag) = if remote {
        (
            F::snat_addr().ok_or(Event::DROP_SNAT_EXHAUSTED)?,
            ct_flags::SNAT,
        )
    } else {
        (tuple.saddr, ct_flags::PORT_REMAP)
    };
    let mut local_reply = MaybeUninit::uninit();
    let reply =
        value_slot::<F>(scratch::REPLY, &mut local_reply).ok_or(Event::DROP_SNAT_EXHAUSTED)?;
    write_reply(reply, original, flag, tuple, arrival, now);
    let port = claim_port::<F>(original, tuple.proto, addr, reply, now)
        .ok_or(Event::DROP_SNAT_EXHAUSTED)?;
    if flag == ct_flags::PORT_REMAP {
        count_event(Event::NAT_PORT_REMAP);
    }
    original.flags = flag | (original.flags & ct_flags::SOURCE_CHECKED);
    original.snat_addr = addr;
    original.snat_port = port;
    let reply_key = port_key::<F>(original, tuple.proto, addr, port);
    note_pair(tuple);
    if F::conntrack()
        .insert(&original_key(tuple), original, 0)
        .is_err()
    {
        let _ = F::conntrack().remove(&reply_key);
        warn!(
            &(),
            "service {}: a new flow's conntrack entry could not be written", service.service_id
        );
        return Err(Event::DROP_CT_FULL);
    }
    note_pair(tuple);
    count_service(service.service_id, 0, 0, 1);
    Ok(tracked(original, tuple))
}

/// Whether the node of a remote endpoint takes DSR options
/// ([`backend_flags::TAKES_DIRECT_RETURN`]); a flow to one that does not goes by SNAT, counted.
#[inline(always)]
fn endpoints_node_takes_options<A>(backend: &BackendValue<A>) -> bool {
    let marked = backend.flags & backend_flags::TAKES_DIRECT_RETURN != 0;
    if !marked {
        count_event(Event::DSR_NODE_UNMARKED);
    }
    marked
}

/// A new flow kept in its client's FLOW entry (with a SNAT flow's REPLY entry, which claims its
/// port), taken with an insert that fails if another CPU took the key meanwhile (`holder`: who
/// holds it now, never a live flow). None when a local endpoint's reply tuple is held by a flow
/// kept as two entries, or when another CPU took the key: the flow is then kept as two
/// entries.
#[inline(always)]
fn new_flow_in_one_entry<F: Family>(
    tuple: &Tuple<F>,
    original: &mut CtValue<F::Addr>,
    arrival: &Arrival,
    now: u64,
    holder: Holder,
) -> Result<Option<Destination<F>>, Event> {
    let key = &flow_key(tuple.saddr, tuple.sport, tuple.proto);
    // A dead holder goes first, also when this flow ends up kept as two entries: left there, a
    // dead entry for this frontend would hide the pair from live_flow.
    if holder != Holder::Vacant {
        let _ = F::conntrack().remove(key);
    }
    let mut claimed_reply = None;
    let flags = original.flags | ct_flags::CLIENT_IN_FLOW;
    if original.flags & ct_flags::DIRECT_RETURN != 0 {
        // No answer comes back through this node: there is no reply tuple to claim.
    } else if original.flags & ct_flags::SNAT != 0 {
        let addr = F::snat_addr().ok_or(Event::DROP_SNAT_EXHAUSTED)?;
        let mut local = MaybeUninit::uninit();
        let reply =
            value_slot::<F>(scratch::REPLY, &mut local).ok_or(Event::DROP_SNAT_EXHAUSTED)?;
        write_reply(reply, original, flags & REPLY_FLAGS, tuple, arrival, now);
        let port = claim_port::<F>(original, tuple.proto, addr, reply, now)
            .ok_or(Event::DROP_SNAT_EXHAUSTED)?;
        original.snat_addr = addr;
        original.snat_port = port;
        claimed_reply = Some(port_key::<F>(original, tuple.proto, addr, port));
    } else if remap_range_holds(tuple.sport) && !reply_tuple_free(original, tuple, now) {
        return Ok(None);
    }
    // The reply (if any) is in the map by now: its scratch entry takes the FLOW entry.
    let mut local = MaybeUninit::uninit();
    let entry = value_slot::<F>(scratch::REPLY, &mut local).ok_or(Event::DROP_CT_FULL)?;
    // SAFETY: two values of this CPU's (or this function's): the REPLY slot is not the
    // ORIGINAL one. A plain `*entry = *original` is a memmove (LLVM cannot tell the two apart),
    // expanded as all loads before all stores, more registers than BPF has for 88 bytes; a
    // non-overlapping copy is expanded a word at a time.
    unsafe { core::ptr::copy_nonoverlapping(original, entry, 1) };
    let flow = FlowValue::of_mut(entry);
    flow.flags = flags;
    flow.client_slot_cpus = lb_common::flow_cache::cpus::NONE;
    flow.frontend_addr = tuple.daddr;
    flow.frontend_port = tuple.dport;
    flow.answer_slot_cpus = lb_common::flow_cache::cpus::NONE;
    flow.backend_seq_next = 0;
    if F::conntrack()
        .insert(key, flow.as_entry(), BPF_NOEXIST)
        .is_err()
    {
        if let Some(reply_key) = claimed_reply {
            let _ = F::conntrack().remove(&reply_key);
        }
        return Ok(None);
    }
    Ok(Some(tracked(original, tuple)))
}

/// A flow another node sent here by direct server return (its SYN's DSR option, admitted as
/// `admission`, named `frontend`): kept in its client's FLOW entry as a local endpoint's flow
/// is, so that tc egress gives the endpoint's answers the frontend as their source. The client's
/// key may be held by this flow already (a retransmitted SYN, which keeps what the entry
/// learnt: how far each side has sent, the furthest of the client's SYNs, so that a SYN sent
/// again without the data of a TCP Fast Open one leaves the endpoint's acknowledgment of that
/// data inside what the client sent), by a flow that has closed (the client sends a SYN from
/// the port again: a new connection, as [`reopens`] takes it) or by a flow past its timeout.
///
/// Held by another live flow to another endpoint (one client address and port to two
/// frontends: a NAT in front of the clients that reuses a port for many destinations), the
/// flow is kept whole under its answers' tuple instead ([`ct_flags::kept_by_answers`]), which
/// tc egress looks up when the client's FLOW entry names another endpoint. The endpoint tells
/// connections apart by that tuple alone, so a live flow that holds it through another
/// frontend, or a flow to the same endpoint that holds the client's key, refuses the SYN
/// (`drop_dsr_clash`): the endpoint would take both connections for one.
#[inline(always)]
pub fn accept_direct_return(
    tuple: &Tuple<V4>,
    frontend: (u32, u16),
    admission: &AdmissionValue,
    now: u64,
) -> Result<(), Event> {
    let answers_key = backend_reply_key::<V4>(
        (tuple.daddr, tuple.dport),
        (tuple.saddr, tuple.sport),
        tuple.proto,
    );
    let fresh = (tcp_state::SYN_SENT, tuple.seq_end, 0);
    let (key, (state, seq_next, backend_seq_next)) =
        match direct_key_state(&answers_key, tuple, frontend, now)? {
            DirectKey::ThisFlow(learnt) => (answers_key, learnt),
            DirectKey::OtherEndpoint => return Err(Event::DROP_DSR_CLASH),
            DirectKey::Free => {
                let client_key = flow_key(tuple.saddr, tuple.sport, tuple.proto);
                match direct_key_state(&client_key, tuple, frontend, now)? {
                    DirectKey::ThisFlow(learnt) => (client_key, learnt),
                    DirectKey::Free => (client_key, fresh),
                    DirectKey::OtherEndpoint => {
                        count_event(Event::DSR_KEPT_BY_ANSWERS);
                        (answers_key, fresh)
                    }
                }
            }
        };
    let flow = Flow4Value {
        last_seen_ns: now,
        backend_id: admission.backend_id,
        service_id: admission.service_id,
        backend_addr: tuple.daddr,
        backend_port: tuple.dport,
        state,
        flags: ct_flags::CLIENT_IN_FLOW | ct_flags::DIRECT_RETURN,
        frontend_addr: frontend.0,
        frontend_port: frontend.1,
        seq_next,
        backend_seq_next,
        ..Default::default()
    };
    V4::conntrack()
        .insert(&key, flow.as_entry(), 0)
        .map_err(|_| Event::DROP_CT_FULL)?;
    count_service(admission.service_id, 0, 0, 1);
    Ok(())
}

/// What a DSR SYN finds under one of the keys its flow can be kept by ([`accept_direct_return`]).
enum DirectKey {
    /// Nobody alive: the key is the flow's to take afresh.
    Free,
    /// This flow's own live entry (its SYN sent again): the state, how far the client has
    /// sent (the furthest of its SYNs) and how far the endpoint has.
    ThisFlow((u8, u32, u32)),
    /// A live flow to another endpoint: the connections' answers differ by their source.
    OtherEndpoint,
}

/// Who holds `key` for the DSR SYN `tuple` to `frontend` (a clash refuses the SYN). An entry
/// given up (closed, past its timeout, or the flow's own) has its slots in the flow caches
/// emptied on every CPU that holds one: the flow written next may get the same endpoint's
/// answers from another frontend.
#[inline(always)]
fn direct_key_state(
    key: &CtKey<u32>,
    tuple: &Tuple<V4>,
    (frontend_addr, frontend_port): (u32, u16),
    now: u64,
) -> Result<DirectKey, Event> {
    let Some(held) = V4::conntrack().get_ptr_mut(key) else {
        return Ok(DirectKey::Free);
    };
    // SAFETY: valid for this run (RCU); see live_flow_of for races.
    let held = unsafe { &mut *held };
    if key.direction == ct_direction::REPLY && !ct_flags::kept_by_answers(held.flags) {
        // The answer half of a flow kept as two entries whose reply tuple this is (a client
        // port remapped to this one): its answers would be taken for this flow's.
        return match port_state(held, tuple.proto, now) {
            Holder::Gone => Ok(DirectKey::Free),
            _ => Err(Event::DROP_DSR_CLASH),
        };
    }
    let flow = FlowValue::of(held);
    let same_endpoint = flow.backend_addr == tuple.daddr && flow.backend_port == tuple.dport;
    let this_flow = flow.flags & ct_flags::DIRECT_RETURN != 0
        && same_endpoint
        && flow.frontend_addr == frontend_addr
        && flow.frontend_port == frontend_port;
    let over = reopens(held, tuple) || past_timeout(held, tuple.proto, now);
    let state = if this_flow && !over && tcp_seq::repeats_syn(flow.seq_next, tuple.seq_end) {
        let seq_next = if tcp_seq::after(flow.seq_next, tuple.seq_end) {
            flow.seq_next
        } else {
            tuple.seq_end
        };
        DirectKey::ThisFlow((flow.state, seq_next, flow.backend_seq_next))
    } else if !over && !this_flow {
        return if same_endpoint {
            Err(Event::DROP_DSR_CLASH)
        } else {
            Ok(DirectKey::OtherEndpoint)
        };
    } else {
        DirectKey::Free
    };
    flow_cache::forget(held, tuple);
    flow_cache::forget_answers::<V4>(held, (tuple.saddr, tuple.sport));
    Ok(state)
}

/// Whether an entry's flow is over (idle past its timeout): its key is free.
#[inline(always)]
fn past_timeout<A: CtAddr>(entry: &CtValue<A>, protocol: u8, now: u64) -> bool {
    now.saturating_sub(entry.last_seen_ns) > timeout(protocol, entry.state)
}

/// Whether a client port lies in the range flows kept as two entries remap clashing client
/// ports to (the SNAT range): only there can a REPLY entry hold a local endpoint's reply tuple
/// that a new FLOW entry would take too.
#[inline(always)]
fn remap_range_holds(port: u16) -> bool {
    let (port_min, port_max) = snat_ports();
    port >= port_min && port <= port_max
}

/// The SNAT (and remap) port range.
#[inline(always)]
fn snat_ports() -> (u16, u16) {
    match config() {
        Some(config) if config.snat_port_min != 0 => (config.snat_port_min, config.snat_port_max),
        _ => DEFAULT_SNAT_PORTS,
    }
}

/// Whether no live REPLY entry holds the reply tuple of a new flow to a local endpoint (from
/// the backend to the client's own address and port).
#[inline(always)]
fn reply_tuple_free<F: Family>(original: &CtValue<F::Addr>, tuple: &Tuple<F>, now: u64) -> bool {
    let key = backend_reply_key::<F>(
        (original.nat_addr, original.nat_port),
        (tuple.saddr, tuple.sport),
        tuple.proto,
    );
    matches!(holder::<F>(&key, now), Holder::Vacant | Holder::Gone)
}

/// Whether a new flow of `protocol` to a frontend whose entry has `flags` may go by direct
/// server return instead of SNAT (when its backend is on another node): TCP from outside to a
/// NodePort, externalIP or LoadBalancer IP of a Service the agent marked for it (`lb run
/// --nodeport-mode dsr`), IPv4 only (the IPv6 option is designed, not built: docs/dsr.md).
#[inline(always)]
pub fn goes_direct<F: Family>(flags: u32, protocol: u8) -> bool {
    const DIRECT_KINDS: u32 =
        service_flags::NODE_PORT | service_flags::EXTERNAL_IP | service_flags::LOAD_BALANCER;
    size_of::<F::Addr>() == 4
        && protocol == proto::TCP
        && flags & service_flags::DIRECT_RETURN != 0
        && flags & DIRECT_KINDS != 0
}

/// The frontend [`lookup_frontend`] copied for this run, for a program `lb_xdp` handed the
/// packet to after its lookup (tail calls stay on the CPU, and runs on one CPU never
/// interleave).
#[inline(always)]
pub fn frontend_of_this_run() -> Option<&'static Frontend> {
    // SAFETY: this CPU's scratch entry, written by this run's lookup.
    FRONTEND_SCRATCH.get_ptr(0).map(|copy| unsafe { &*copy })
}

/// SNAT for a backend on another node, unless the policy is Local (which keeps the client's
/// address and only ever has local backends) or the agent configured no SNAT address.
#[inline(always)]
fn needs_snat<F: Family>(service: &ServiceValue, backend: &BackendValue<F::Addr>) -> bool {
    backend.flags & backend_flags::LOCAL == 0
        && service.flags & service_flags::LOCAL_ONLY == 0
        && F::snat_addr().is_some()
}

/// Claims a port of the SNAT range for the reply tuple (backend -> `addr`:port) of a new flow by
/// writing its REPLY entry. Ports are tried in a random order (double hashing: a random start
/// and a random stride coprime to the range), so used ports never cluster, every port of a
/// range up to SNAT_PORT_TRIES long is tried, and a nearly full one still has its free ports
/// found (at 95% use, 128 tries all miss 0.14% of the time). Each claim is an insert that fails
/// if another CPU got there first, so no two flows share a port.
///
/// When no free port turns up, the ports of closed flows still held are last resorts, taken
/// rather than the SYN dropped: a flow both sides closed (the client first) or a RST ended, in
/// the second half of the reuse delay, whose backend's socket went when the client's last ACK
/// reached it; then a flow the backend closed first, whose TIME_WAIT may answer the SYN with an
/// ACK, which the client resets before it retries. Either costs the client at worst the 1 s a
/// dropped SYN costs, and at high connection rates the range holds little else: one backend
/// takes twice the range's length per reuse delay in new connections a second, instead of once
/// (Linux's NAT reuses such ports too, in its last tries).
#[inline(always)]
fn claim_port<F: Family>(
    original: &CtValue<F::Addr>,
    protocol: u8,
    addr: F::Addr,
    reply: &CtValue<F::Addr>,
    now: u64,
) -> Option<u16> {
    let mut probe = SnatPortProbe::new(snat_ports(), random_u32());
    let mut found = (0u32, Holder::Alive);
    // One variable for both kinds of last resort, which a recently closed port always takes
    // and a TIME_WAIT one only while it is empty: two would double the states the verifier
    // walks through the 128 tries (lb_xdp6_flow 887,000 instructions of its 1,000,000, against
    // 597,000 with one).
    let mut last_resort = 0u32;
    for _ in 0..SNAT_PORT_TRIES {
        let port = probe.port();
        match holder::<F>(&port_key::<F>(original, protocol, addr, port), now) {
            free @ (Holder::Vacant | Holder::Gone) => {
                found = (u32::from(port), free);
                break;
            }
            Holder::RecentlyClosed => last_resort = u32::from(port),
            Holder::BackendTimeWait if last_resort == 0 => last_resort = u32::from(port),
            _ => {}
        }
        probe.advance();
    }
    let (port, holder) = match found {
        (0, _) if last_resort != 0 => (last_resort as u16, Holder::Gone),
        (0, _) => return None,
        (port, holder) => (port as u16, holder),
    };
    // A remapped client port whose FLOW entry (the client really sends from it) takes the
    // backend's answers to it is refused, and the flow's next packet tries another: checked
    // here, not for every port tried, because a lookup in the loop makes the program too
    // complex for the verifier, and the client ports of the range are seldom used (it lies
    // above Linux's ephemeral ports).
    if reply.flags & ct_flags::PORT_REMAP != 0
        && answers_of_flow::<F>(original, protocol, (addr, port), now)
    {
        return None;
    }
    // The flow's next packet tries again when another CPU took the port meanwhile.
    take::<F>(
        &port_key::<F>(original, protocol, addr, port),
        reply,
        holder,
    )
    .then_some(port)
}

/// Whether a live FLOW entry of a local endpoint's flow takes the answers its backend sends to
/// `client` (address and port): the reply tuple of a remapped flow must not be its too.
#[inline(always)]
fn answers_of_flow<F: Family>(
    original: &CtValue<F::Addr>,
    protocol: u8,
    client: (F::Addr, u16),
    now: u64,
) -> bool {
    let key = &flow_key(client.0, client.1, protocol);
    let Some(flow) = F::conntrack().get_ptr(key) else {
        return false;
    };
    // SAFETY: read-only use of an entry that stays valid for this run (RCU).
    let flow = unsafe { &*flow };
    if flow.flags & ct_flags::SNAT != 0
        || !F::same(&flow.nat_addr, &original.nat_addr)
        || flow.nat_port != original.nat_port
    {
        return false;
    }
    if past_timeout(flow, protocol, now) {
        // Over, but tc would still translate the backend's answers with it (answers do not
        // check liveness): it goes before the tuple serves another flow.
        let _ = F::conntrack().remove(key);
        return false;
    }
    true
}

/// Who holds a reply tuple.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    Vacant,
    /// A flow past its time, or closed long enough ago: the tuple is free.
    Gone,
    /// A TCP flow both sides closed (the client first) or a RST ended, in the second half of
    /// the reuse delay: free but for a late packet of the old connection.
    RecentlyClosed,
    /// A closed flow whose backend closed first and may hold TIME_WAIT on the ports.
    BackendTimeWait,
    Alive,
}

#[inline(always)]
fn holder<F: Family>(key: &CtKey<F::Addr>, now: u64) -> Holder {
    match F::conntrack().get_ptr(key) {
        None => Holder::Vacant,
        // SAFETY: read-only use of an entry that stays valid for this run (RCU).
        Some(existing) => port_state(unsafe { &*existing }, key.proto, now),
    }
}

/// Writes a new flow's REPLY entry under a free `key` (its old holder removed first): an insert
/// that fails if another CPU claimed the key meanwhile, so no two flows ever share a tuple.
#[inline(always)]
fn take<F: Family>(key: &CtKey<F::Addr>, reply: &CtValue<F::Addr>, holder: Holder) -> bool {
    if holder != Holder::Vacant {
        let _ = F::conntrack().remove(key);
    }
    F::conntrack().insert(key, reply, BPF_NOEXIST).is_ok()
}

#[inline(always)]
fn port_key<F: Family>(
    original: &CtValue<F::Addr>,
    protocol: u8,
    addr: F::Addr,
    port: u16,
) -> CtKey<F::Addr> {
    backend_reply_key::<F>(
        (original.nat_addr, original.nat_port),
        (addr, port),
        protocol,
    )
}

/// A SYN on a closed flow's tuple is a new connection (the client reused its port): it selects
/// again and takes a fresh SNAT port, as the old one may serve another flow by now.
#[inline(always)]
fn reopens<F: Family>(entry: &CtValue<F::Addr>, tuple: &Tuple<F>) -> bool {
    proto::has_handshake(tuple.proto)
        && tcp_state::ending(entry.state)
        && tuple.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Whether the flow a REPLY entry belongs to still needs its reply tuple (`Gone` when not):
/// not when idle past its timeout, nor (TCP) the reuse delay after a RST or after both sides
/// closed with the client first (`RecentlyClosed` in the delay's second half: the delay lets
/// a lost last ACK's retransmitted FIN find its flow). A backend that closed first holds the
/// ports in TIME_WAIT and may answer a new SYN on them with an ACK of the old connection, so
/// those are a last resort until the timeout. Traffic in either direction keeps the entry fresh
/// ([`refresh_flow`], [`track_reply`]).
#[inline(always)]
fn port_state<A: CtAddr>(entry: &CtValue<A>, protocol: u8, now: u64) -> Holder {
    let idle = now.saturating_sub(entry.last_seen_ns);
    if idle > timeout(protocol, entry.state) {
        return Holder::Gone;
    }
    // SCTP waits for its timeout: an endpoint that missed the last chunk retransmits after
    // 1 s at the least (RTO.Min, RFC 9260 section 16), later than a reused port's new INIT,
    // which it would take for a restart of the old association (section 5.2.4).
    if protocol != proto::TCP {
        return Holder::Alive;
    }
    let both_fins = ct_flags::CLIENT_FIN | ct_flags::BACKEND_FIN;
    let delay = timeouts().snat_port_reuse();
    // RESET is tested in each branch, not once in an enclosing `if` nor kept in a variable:
    // those forms made the verifier walk 617,000 and 699,000 instructions of `lb_xdp6_flow`
    // instead of 597,000 (datapath_api holds every program under 750,000).
    if entry.flags & ct_flags::RESET == 0 && entry.flags & both_fins != both_fins {
        Holder::Alive
    } else if entry.flags & ct_flags::RESET == 0
        && entry.flags & ct_flags::BACKEND_CLOSED_FIRST != 0
    {
        if idle <= delay {
            Holder::Alive
        } else {
            Holder::BackendTimeWait
        }
    } else if idle > delay {
        Holder::Gone
    } else if idle > delay / 2 {
        Holder::RecentlyClosed
    } else {
        // The client's last ACK may not have passed yet: given away now, the port would make
        // that ACK restart its flow on another port (ct_flow_restarted), and the endpoint,
        // still in LAST_ACK, would answer the new SYN with an ACK whose RST the window drops.
        Holder::Alive
    }
}

/// Records a FIN or RST of a SNAT flow on its REPLY entry, which decides when its port is free.
/// The bits are set atomically: the client's FIN (XDP) and the backend's (tc) of a simultaneous
/// close may be handled on two CPUs at once, and a plain read-modify-write of the flags could
/// lose one, leaving the port held until its timeout.
#[inline(always)]
fn note_close<A: CtAddr>(reply: &mut CtValue<A>, tcp_flags: u8, from_backend: bool, now: u64) {
    let mut added = 0;
    if tcp_flags & TCP_RST != 0 {
        added |= ct_flags::RESET;
    }
    if tcp_flags & TCP_FIN != 0 {
        if !from_backend {
            added |= ct_flags::CLIENT_FIN;
        } else {
            if reply.flags & ct_flags::CLIENT_FIN == 0 {
                added |= ct_flags::BACKEND_CLOSED_FIRST;
            }
            added |= ct_flags::BACKEND_FIN;
        }
    }
    if reply.flags | added != reply.flags {
        set_flags(reply, added);
        reply.last_seen_ns = now;
    }
}

/// `entry.flags |= bits` in one atomic instruction, on the aligned 64-bit word that holds the
/// flags byte (the value is 8-byte aligned; the other bytes of the word are ORed with 0).
/// The shift places the byte in a little-endian word, as bpfel and the hosts that test it are.
#[inline(always)]
fn set_flags<A: CtAddr>(entry: &mut CtValue<A>, bits: u8) {
    const { assert!(cfg!(target_endian = "little")) };
    let offset = core::mem::offset_of!(CtValue<A>, flags);
    let shift = (offset % 8) * 8;
    let entry: *mut CtValue<A> = entry;
    // SAFETY: the word lies inside the entry (offset rounded down to 8, within its size, which
    // is a multiple of its 8-byte alignment), a map value or scratch slot valid for the run.
    unsafe {
        let word = entry.cast::<u8>().add(offset - offset % 8).cast::<u64>();
        atomic_or(word, u64::from(bits) << shift);
    }
}

/// A client's packet of a tracked flow: the flow's state moves on (one state for both halves),
/// and both halves' last_seen are rewritten at most once per REFRESH, so that the established
/// path stays free of map writes for most packets while traffic in one direction alone keeps
/// the whole flow, and the reply tuple it holds, alive.
#[inline(always)]
fn refresh_flow<F: Family>(
    original: &mut CtValue<F::Addr>,
    reply: &mut CtValue<F::Addr>,
    tuple: &Tuple<F>,
    now: u64,
) {
    note_seq(&mut original.seq_next, tuple);
    if let Some(state) = advance(original, tuple, now, FROM_CLIENT, TWO_SIDED) {
        mirror(reply, state, now);
    }
    if closes(tuple) {
        note_close(reply, tuple.tcp_flags, false, now);
    }
}

/// A backend's packet of a tracked flow (its REPLY entry): as [`refresh_flow`] the other way.
/// Only a FIN or RST closes the flow; the handshake completing on this side changes its state
/// but never ends it.
#[inline(always)]
///
/// `keep_alive`: whether the answers alone keep the flow alive (a SNAT flow, whose port must not
/// go to another client while its backend still sends to it), which costs a clock read per
/// packet; otherwise only state changes are written.
pub fn track_reply<F: Family>(reply: &mut CtValue<F::Addr>, tuple: &Tuple<F>, keep_alive: bool) {
    note_seq(&mut reply.seq_next, tuple);
    if !keep_alive && !closes(tuple) {
        return;
    }
    let now = now_ns();
    if let Some(state) = advance(reply, tuple, now, FROM_BACKEND, TWO_SIDED)
        && let Some(original) = client_side_of::<F>(reply, tuple)
    {
        // SAFETY: as in destination().
        mirror(unsafe { &mut *original }, state, now);
    }
    if closes(tuple) {
        note_close(reply, tuple.tcp_flags, true, now);
    }
}

/// The entry of a REPLY entry's flow that holds its client's side: its FLOW entry (when it is
/// still this flow's) or its ORIGINAL entry.
#[inline(always)]
fn client_side_of<F: Family>(
    reply: &CtValue<F::Addr>,
    tuple: &Tuple<F>,
) -> Option<*mut CtValue<F::Addr>> {
    if reply.flags & ct_flags::CLIENT_IN_FLOW == 0 {
        return F::conntrack().get_ptr_mut(&original_key_of(reply, tuple));
    }
    let entry = flow_entry::<F>(reply.snat_addr, reply.snat_port, tuple.proto)?;
    // SAFETY: read here, valid for this run (RCU).
    let flow = FlowValue::of(unsafe { &*entry });
    (F::same(&flow.frontend_addr, &reply.nat_addr) && flow.frontend_port == reply.nat_port)
        .then_some(entry)
}

/// The flow a local endpoint's answer belongs to.
pub enum Answer<F: Family = V4> {
    /// A flow kept in one entry (its FLOW entry).
    Whole(*mut CtValue<F::Addr>),
    /// The REPLY entry of a flow kept as two entries.
    Reply(*mut CtValue<F::Addr>),
}

/// The flow of an answer from a local endpoint: the FLOW entry of its destination (the client)
/// when that flow's backend sent it, else the entry keyed as the answer: a REPLY entry, or a
/// flow that came by direct server return kept whole by its answers' tuple
/// ([`ct_flags::kept_by_answers`]). A SYN-ACK that answers another connection than a whole
/// flow's ([`answers_another_connection`]; `acknowledged` reads its acknowledgment number)
/// ends that flow ([`supersede`]) and is no flow's, as is every answer after it.
#[inline(always)]
pub fn answer_of<F: Family>(
    tuple: &Tuple<F>,
    acknowledged: impl FnOnce() -> Option<u32>,
) -> Option<Answer<F>> {
    if let Some(entry) = flow_entry::<F>(tuple.daddr, tuple.dport, tuple.proto) {
        // SAFETY: read here, valid for this run (RCU).
        let flow = FlowValue::of(unsafe { &*entry });
        if flow.flags & ct_flags::SNAT == 0
            && F::same(&flow.backend_addr, &tuple.saddr)
            && flow.backend_port == tuple.sport
        {
            return whole_flows_answer(entry, tuple, acknowledged);
        }
    }
    let entry = F::conntrack().get_ptr_mut(&reply_key(tuple))?;
    // SAFETY: as above.
    if ct_flags::kept_by_answers(unsafe { &*entry }.flags) {
        return whole_flows_answer(entry, tuple, acknowledged);
    }
    Some(Answer::Reply(entry))
}

/// An answer of the flow kept whole in `entry`, unless that flow is over for its answers
/// (superseded, or superseded by this SYN-ACK).
#[inline(always)]
fn whole_flows_answer<F: Family>(
    entry: *mut CtValue<F::Addr>,
    tuple: &Tuple<F>,
    acknowledged: impl FnOnce() -> Option<u32>,
) -> Option<Answer<F>> {
    // SAFETY: read here, valid for this run (RCU).
    let flow = FlowValue::of(unsafe { &*entry });
    if flow.flags & ct_flags::SUPERSEDED != 0 {
        return None;
    }
    if answers_another_connection(flow, tuple, acknowledged) {
        // SAFETY: as above; a racing writer can only lose this update, and the next SYN-ACK of
        // the connection makes it again.
        supersede(unsafe { &mut *entry }, tuple);
        return None;
    }
    Some(Answer::Whole(entry))
}

/// Whether an endpoint's SYN-ACK to a client whose flow is kept whole in `flow` answers another
/// connection: the client connected to the endpoint from the same port without the frontend
/// (straight to the pod, as hosts routed to the pods do) after the flow closed, or while its
/// entry waits out its timeout. That connection's answers must leave as the endpoint sends
/// them.
///
/// The endpoint's own SYN-ACK acknowledges the client's SYN, near what the client has sent
/// ([`tcp_seq::acknowledges_own_syn`]); another connection's acknowledges that connection's
/// own random initial sequence number.
///
/// - A flow that came by direct server return is judged so in every state: its entry's
///   `seq_next` is its SYN's end (this node sees none of the client's later segments), which
///   its endpoint's SYN-ACKs acknowledge, sent again or not, early data (TCP Fast Open) or
///   not. An entry still in its SYN is judged too: a client that gave up its handshake, or
///   a SYN relayed with a forged option, leaves one that a connection from the same port must
///   not be taken for.
/// - A flow to a local endpoint through this node is judged past its SYN only: in its SYN, the
///   entry may be a new connection's that the client opened on the key just now, and a SYN-ACK
///   the endpoint sends again for the connection before it must not remove it.
#[inline(always)]
fn answers_another_connection<F: Family>(
    flow: &FlowValue<F::Addr>,
    tuple: &Tuple<F>,
    acknowledged: impl FnOnce() -> Option<u32>,
) -> bool {
    if tuple.proto != proto::TCP || tuple.tcp_flags & TCP_SYN == 0 {
        return false;
    }
    if flow.flags & ct_flags::DIRECT_RETURN == 0 && flow.state == tcp_state::SYN_SENT {
        return false;
    }
    acknowledged().is_some_and(|ack| !tcp_seq::acknowledges_own_syn(flow.seq_next, ack))
}

/// Ends the flow of `entry`, whose endpoint answered another connection from its client's port
/// ([`answers_another_connection`]): marked [`ct_flags::SUPERSEDED`] and closing, so that tc
/// translates none of the endpoint's answers to that port through it and a SYN through the
/// frontend from the port starts a flow anew ([`reopens`]), while the flow's last packets,
/// which may still come, follow it to the endpoint instead of starting a flow mid-stream
/// whose entry would take the new connection's answers. Its answer slots go too, on every CPU.
#[inline(always)]
fn supersede<F: Family>(entry: &mut CtValue<F::Addr>, tuple: &Tuple<F>) {
    entry.flags |= ct_flags::SUPERSEDED;
    entry.state = tcp_state::CLOSING;
    entry.last_seen_ns = now_ns();
    flow_cache::forget_answers::<F>(entry, (tuple.daddr, tuple.dport));
    count_event(Event::CT_FLOW_SUPERSEDED);
}

/// A local endpoint's answer on a flow kept in one entry: how far the backend has sent, and a
/// FIN or RST moves the flow's state on (as [`track_reply`] for a flow's REPLY entry).
#[inline(always)]
pub fn track_answer<F: Family>(entry: &mut CtValue<F::Addr>, tuple: &Tuple<F>) {
    note_seq(&mut FlowValue::of_mut(entry).backend_seq_next, tuple);
    // A flow that came by direct server return: the client's packets reach the endpoint
    // untouched, so its answers are all that keeps the entry alive and moves its state on.
    if closes(tuple) || entry.flags & ct_flags::DIRECT_RETURN != 0 {
        let one_sided = entry.flags & ct_flags::DIRECT_RETURN != 0;
        advance(entry, tuple, now_ns(), FROM_BACKEND, one_sided);
    }
}

/// Which side sent a packet, for [`advance`].
const FROM_CLIENT: bool = false;
const FROM_BACKEND: bool = true;
/// An entry that sees both sides' packets, for [`advance`]. A FLOW entry of a flow by direct
/// server return sees one side alone on each node (the client's packets on the node they came
/// to, the endpoint's answers on the endpoint's): the other side's FIN never passes, so the one
/// it sees closes the flow (one-sided).
const TWO_SIDED: bool = false;

/// The flow's state after this packet, written to the entry of its direction with the time
/// when it changed or the entry is due for a refresh; then the other half wants the same
/// (Some), else nothing was written (None).
#[inline(always)]
fn advance<F: Family>(
    entry: &mut CtValue<F::Addr>,
    tuple: &Tuple<F>,
    now: u64,
    from_backend: bool,
    one_sided: bool,
) -> Option<u8> {
    let step = |state: u8| {
        let next = if proto::has_handshake(tuple.proto) {
            tcp_state::next(state, tuple.tcp_flags, from_backend)
        } else {
            state
        };
        if one_sided && (next == tcp_state::CLIENT_CLOSED || next == tcp_state::BACKEND_CLOSED) {
            tcp_state::CLOSING
        } else {
            next
        }
    };
    // A plain read first: a packet that moves no state (nearly all) writes none.
    if step(entry.state) == entry.state {
        if !stale(entry, tuple.proto, now) {
            return None;
        }
        entry.last_seen_ns = now;
        return Some(entry.state);
    }
    let (before, after) = move_state(entry, step);
    if after == tcp_state::CLOSING && before != tcp_state::CLOSING {
        monitor::flow_end(tuple, entry.service_id);
    }
    entry.last_seen_ns = now;
    Some(after)
}

/// The other half of a flow kept in two entries takes the state its first half moved to
/// ([`tcp_state::join`]), and the time.
#[inline(always)]
fn mirror<A: CtAddr>(entry: &mut CtValue<A>, moved_to: u8, now: u64) {
    if tcp_state::join(entry.state, moved_to) != entry.state {
        move_state(entry, |state| tcp_state::join(state, moved_to));
    }
    entry.last_seen_ns = now;
}

/// Moves the entry's TCP state to `to(state)` in one compare-and-swap of the aligned word that
/// holds it, so that two CPUs moving one entry at once (the client's FIN in XDP, the endpoint's
/// in tc) both count: with a plain read and write, the later write would drop the earlier
/// move. The word's other bytes (the NAT port, the flags, address bytes) go back as they were
/// read; a swap that finds the word changed tries again from what it found, once (a third
/// change at the same instant leaves the state as the other CPU wrote it). The state before and
/// after.
#[inline(always)]
fn move_state<A: CtAddr>(entry: &mut CtValue<A>, to: impl Fn(u8) -> u8) -> (u8, u8) {
    const { assert!(cfg!(target_endian = "little")) };
    let offset = core::mem::offset_of!(CtValue<A>, state);
    let shift = (offset % 8) * 8;
    let entry: *mut CtValue<A> = entry;
    // SAFETY: the word lies inside the entry (offset rounded down to 8, within its size, which
    // is a multiple of its 8-byte alignment), a map value valid for the run.
    let word = unsafe { entry.cast::<u8>().add(offset - offset % 8).cast::<u64>() };
    // SAFETY: as above; read once, volatile, as other CPUs write it.
    let mut seen = unsafe { core::ptr::read_volatile(word) };
    for _ in 0..2 {
        let from = (seen >> shift) as u8;
        let moved = to(from);
        if moved == from {
            return (from, from);
        }
        let wanted = (seen & !(0xff << shift)) | (u64::from(moved) << shift);
        // SAFETY: as above.
        let found = unsafe { compare_and_swap(word, seen, wanted) };
        if found == seen {
            return (from, moved);
        }
        seen = found;
    }
    let state = (seen >> shift) as u8;
    (state, state)
}

/// Whether an entry's last_seen is due to be rewritten: after REFRESH, or a quarter of its
/// timeout when that is shorter (timeouts of a second in tests), so that a flow with traffic
/// never looks idle past its timeout.
#[inline(always)]
fn stale<A: CtAddr>(entry: &CtValue<A>, protocol: u8, now: u64) -> bool {
    now.saturating_sub(entry.last_seen_ns) > refresh_interval(protocol, entry.state)
}

/// How long after its `last_seen` an entry in `state` is rewritten by its next packet (see
/// [`stale`]).
#[inline(always)]
pub fn refresh_interval(protocol: u8, state: u8) -> u64 {
    ct_timeouts::REFRESH.min(timeout(protocol, state) / 4)
}

/// The key of the ORIGINAL entry of the flow a REPLY entry belongs to: from the client (which
/// the REPLY entry holds in all cases) to the frontend.
#[inline(always)]
fn original_key_of<F: Family>(reply: &CtValue<F::Addr>, tuple: &Tuple<F>) -> CtKey<F::Addr> {
    CtKey::<F::Addr> {
        saddr: reply.snat_addr,
        daddr: reply.nat_addr,
        sport: reply.snat_port,
        dport: reply.nat_port,
        proto: tuple.proto,
        direction: ct_direction::ORIGINAL,
        _pad: [0; 2],
    }
}

/// Whether the backend a flow was sent to is still in the backends map, unchanged. A UDP flow
/// whose backend is gone selects again (kube-proxy's stale-UDP-conntrack bug, avoided).
#[inline(always)]
fn backend_still_there<F: Family>(entry: &CtValue<F::Addr>) -> bool {
    backend_holds::<F>(entry.backend_id, &entry.nat_addr, entry.nat_port)
}

/// Whether backend `id` is in the backends map with this address (as a tuple holds it) and port.
#[inline(always)]
pub fn backend_holds<F: Family>(id: u32, addr: &F::Addr, port: u16) -> bool {
    match F::backend(id) {
        Some(backend) => {
            F::same(&F::tuple_order(backend.addr), addr) && u16::from_be(backend.port) == port
        }
        None => false,
    }
}

/// A backend for a new connection of a socket-hook client (`client`: its netns cookie, `kind`:
/// [`SOCKET_CLIENT`]), sticky as [`sticky_select`] says. The backend is one of family `F`, the
/// family of the service's frontends (the socket hooks of both families keep their affinity
/// in one map: the client is a netns, not an address).
#[inline(always)]
pub fn select_for_client<F: Family>(
    service: &ServiceValue,
    client: u64,
    kind: u32,
    now: u64,
) -> Result<(u32, BackendValue<F::Addr>), Event> {
    if service.affinity_timeout_s == 0 {
        return select::<F>(service, NOT_INDEXED);
    }
    let key = Affinity4Key {
        client,
        service_id: service.service_id,
        kind,
    };
    let entry = AFFINITY4.get_ptr_mut(&key);
    sticky_select::<F>(service, NOT_INDEXED, entry, now, |value| {
        // A full LRU evicts the oldest client; affinity is best effort.
        let _ = AFFINITY4.insert(&key, value, 0);
    })
}

/// A backend for a new flow of a client outside the node (its address as the tuple holds it),
/// sticky as [`sticky_select`] says, in the family's affinity map.
#[inline(always)]
fn select_for_address<F: Family>(
    frontend: &Frontend,
    client: F::Addr,
    now: u64,
) -> Result<(u32, BackendValue<F::Addr>), Event> {
    let service = &frontend.service;
    if service.affinity_timeout_s == 0 {
        return select::<F>(service, frontend.index_slot);
    }
    let entry = F::affinity_entry(client, service.service_id);
    sticky_select::<F>(service, frontend.index_slot, entry, now, |value| {
        F::remember_affinity(client, service.service_id, value)
    })
}

/// With session affinity: the backend the client used last (its affinity `entry`) if that was
/// within the timeout and the backend still exists and is not terminating (unless the table is
/// made of terminating endpoints, `SERVING_TERMINATING`); otherwise a random
/// one (as [`select`] picks it, from `index_slot`), remembered for next time with `remember`.
#[inline(always)]
fn sticky_select<F: Family>(
    service: &ServiceValue,
    index_slot: u32,
    entry: Option<*mut AffinityValue>,
    now: u64,
    remember: impl FnOnce(&AffinityValue),
) -> Result<(u32, BackendValue<F::Addr>), Event> {
    let timeout = u64::from(service.affinity_timeout_s) * NANOS_PER_SECOND;
    if let Some(entry) = entry {
        // SAFETY: valid for this run (RCU); a racing update only changes which recent backend wins.
        let entry = unsafe { &mut *entry };
        if now.saturating_sub(entry.last_used_ns) <= timeout
            && let Some(backend) = F::backend(entry.backend_id)
            && (backend.flags & backend_flags::TERMINATING == 0
                || service.flags & service_flags::SERVING_TERMINATING != 0)
        {
            if !dry_run() {
                entry.last_used_ns = now;
            }
            return Ok((entry.backend_id, *backend));
        }
    }
    let (backend_id, backend) = select::<F>(service, index_slot)?;
    let value = AffinityValue {
        last_used_ns: now,
        backend_id,
        _pad: 0,
    };
    if !dry_run() {
        remember(&value);
    }
    Ok((backend_id, backend))
}

/// The backend Maglev consistent hashing gives the flow: slot flow_hash % M of the service's
/// lookup table of M slots. An error where the service has no table or the slot's backend is
/// not in the maps. Every node computes the same table for the same endpoints, so a flow
/// reaches the same backend through any node.
#[inline(always)]
fn select_maglev<F: Family>(
    service: &ServiceValue,
    tuple: &Tuple<F>,
) -> Result<(u32, BackendValue<F::Addr>), Event> {
    if service.backend_count == 0 {
        return Err(no_backend(service));
    }
    // The size comes from the table itself, which the agent swaps whole.
    let table = MAGLEV4
        .get(service.service_id)
        .ok_or(Event::DROP_BACKEND_MISSING)?;
    let size = *table.get(0).ok_or(Event::DROP_BACKEND_MISSING)?;
    let tag = *table.get(1).ok_or(Event::DROP_BACKEND_MISSING)?;
    // Only the table this frontend entry was written for.
    if size == 0 || tag != service.maglev_table {
        return Err(Event::DROP_BACKEND_MISSING);
    }
    // Hashed after the lookups, so that the addresses are not kept (spilled) across them.
    let hash = F::flow_hash(
        tuple.saddr,
        tuple.daddr,
        tuple.sport,
        tuple.dport,
        tuple.proto,
    );
    let backend_id = *table
        .get(maglev::HEADER + hash % size)
        .ok_or(Event::DROP_BACKEND_MISSING)?;
    let backend = *F::backend(backend_id).ok_or(Event::DROP_BACKEND_MISSING)?;
    Ok((backend_id, backend))
}

/// A random backend of the service's current table (kube-proxy's default selection), from the
/// backends map of its family `F`. The table's cells are read from the frontend-index slot
/// `index_slot` the entry was found in when the slot carries them, else from the slot array.
#[inline(always)]
pub fn select<F: Family>(
    service: &ServiceValue,
    index_slot: u32,
) -> Result<(u32, BackendValue<F::Addr>), Event> {
    select_drawn::<F>(service, index_slot, random_u32())
}

/// The backend of the service's current table in the cell `draw` (uniform over u32) falls on,
/// as [`select`] picks one for a random draw.
#[inline(always)]
pub fn select_drawn<F: Family>(
    service: &ServiceValue,
    index_slot: u32,
    draw: u32,
) -> Result<(u32, BackendValue<F::Addr>), Event> {
    if service.backend_count == 0 {
        return Err(no_backend(service));
    }
    let cell = below(draw, u32::from(service.backend_count));
    let backend_id = match F::inline_backend(index_slot, cell) {
        Some(backend_id) => backend_id,
        None => table_cell(service, cell as u32)?,
    };
    let backend = *F::backend(backend_id).ok_or(Event::DROP_BACKEND_MISSING)?;
    Ok((backend_id, backend))
}

/// The backend id in cell `cell` of the service's table in the slot array.
#[inline(always)]
fn table_cell(service: &ServiceValue, cell: u32) -> Result<u32, Event> {
    SLOTS4
        .get(service.slots.wrapping_add(cell))
        .filter(|slot| slot.service_id == service.service_id)
        .map(|slot| slot.backend_id)
        .ok_or(Event::DROP_BACKEND_MISSING)
}

/// The socket hooks' client identity for affinity: the netns cookie (one pod, one namespace).
pub const SOCKET_CLIENT: u32 = AFFINITY_NETNS;

/// The key of a flow's ORIGINAL entry (as the client sends it).
#[inline(always)]
pub fn original_key<F: Family>(tuple: &Tuple<F>) -> CtKey<F::Addr> {
    CtKey::<F::Addr> {
        saddr: tuple.saddr,
        daddr: tuple.daddr,
        sport: tuple.sport,
        dport: tuple.dport,
        proto: tuple.proto,
        direction: ct_direction::ORIGINAL,
        _pad: [0; 2],
    }
}

/// The REPLY key of the packets a backend sends to `to` (the client, or a SNAT address:port).
#[inline(always)]
fn backend_reply_key<F: Family>(
    backend: (F::Addr, u16),
    to: (F::Addr, u16),
    protocol: u8,
) -> CtKey<F::Addr> {
    CtKey::<F::Addr> {
        saddr: backend.0,
        daddr: to.0,
        sport: backend.1,
        dport: to.1,
        proto: protocol,
        direction: ct_direction::REPLY,
        _pad: [0; 2],
    }
}

/// The key of a reply packet's REPLY entry (as the backend sends it).
#[inline(always)]
pub fn reply_key<F: Family>(tuple: &Tuple<F>) -> CtKey<F::Addr> {
    CtKey::<F::Addr> {
        direction: ct_direction::REPLY,
        ..original_key(tuple)
    }
}

#[inline(always)]
fn initial_state<F: Family>(tuple: &Tuple<F>) -> u8 {
    if proto::has_handshake(tuple.proto) {
        tcp_state::initial(tuple.tcp_flags)
    } else {
        tcp_state::NONE
    }
}

/// How long an entry in `state` lives without traffic.
#[inline(always)]
pub fn timeout(protocol: u8, state: u8) -> u64 {
    timeouts().for_state(protocol, state)
}

/// The configured timeouts (zero fields mean the defaults).
#[inline(always)]
fn timeouts() -> &'static CtTimeouts {
    const UNSET: CtTimeouts = CtTimeouts {
        tcp_syn: 0,
        tcp_established: 0,
        tcp_closing: 0,
        udp: 0,
        snat_port_reuse: 0,
        tcp_half_closed: 0,
    };
    config().map_or(&UNSET, |config| &config.timeouts)
}
