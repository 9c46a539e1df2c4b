//! XDP's flow cache ([`lb_common::flow_cache`]): the established path's way around the
//! conntrack hash lookup for the steady TCP segments and the UDP datagrams of flows to local
//! endpoints. The full path
//! writes a slot ([`remember`]) after it has served a packet the slot could have served; the
//! next such packet is served from the slot ([`hit`]) until the slot's time or sequence window
//! runs out, and then by the full path again, which writes the slot anew. tc egress keeps the
//! twin for a local endpoint's answers ([`answer_hit`], [`remember_answer`]). A cache that
//! misses more than it hits on a CPU stands aside there for a while ([`FlowCacheGate`]). A
//! flow's FLOW entry records which CPUs' caches took it ([`flow_cache::cpus`]), so that its end
//! empties its slots on all of them ([`forget`], [`forget_answers`]).

use core::ffi::c_void;

use aya_ebpf::helpers::{bpf_get_smp_processor_id, bpf_loop, bpf_map_lookup_percpu_elem};

use lb_common::{
    CtValue, FlowCacheGate, FlowCacheSlot, FlowValue, ct_flags, ct_timeouts,
    flow_cache::{self, cpus},
    proto,
    tcp_flags::{ACK, FIN, RST, SYN},
    tcp_state,
};

use crate::{
    family::Family,
    flow::{Destination, Tuple, backend_holds, has_reply_entry, refresh_interval, timeout},
    helpers::now_ns,
    maps::{FLOW_CACHE_GATES, dry_run},
};

/// Whether a TCP segment changes nothing its flow's entry keeps but `last_seen` and how far its
/// sender has sent: an acknowledgment, with or without data, and no SYN, FIN or RST.
#[inline(always)]
fn steady(tuple_flags: u8) -> bool {
    tuple_flags & (SYN | FIN | RST | ACK) == ACK
}

/// Whether a packet is one a slot may serve: a steady TCP segment, or a UDP datagram (which
/// changes nothing its flow's entry keeps but `last_seen`).
#[inline(always)]
fn servable<F: Family>(tuple: &Tuple<F>) -> bool {
    match tuple.proto {
        proto::TCP => steady(tuple.tcp_flags),
        proto::UDP => true,
        _ => false,
    }
}

/// What a look into a cache found for a packet.
pub enum Look<S: 'static> {
    /// The slot serves it.
    Hit(&'static S),
    /// Nothing serves it: after the full path has sent it, it may fill its slot.
    Miss,
    /// No look: not a packet a slot may serve ([`servable`]), or the cache's gate is closed on
    /// this CPU ([`FlowCacheGate`]). It fills nothing.
    Passed,
}

/// A look into a family's flow cache for a client's packet.
pub type SlotLook<F> = Look<FlowCacheSlot<<F as Family>::Addr>>;

impl<S> Look<S> {
    /// Whether the full path may write the segment's slot after it.
    #[inline(always)]
    pub fn fills(&self) -> bool {
        matches!(self, Self::Miss)
    }
}

/// This CPU's gate of cache `index` ([`lb_common::flow_cache::gate`]) for the packet's
/// protocol, when `tuple` may look into that cache: a packet a slot may serve ([`servable`]),
/// outside `lb explain`'s dry run, which the gate lets past (a closed gate counts the packet
/// off instead).
#[inline(always)]
fn gate_to_look<F: Family>(tuple: &Tuple<F>, index: u32) -> Option<&'static mut FlowCacheGate> {
    if !servable(tuple) || dry_run() {
        return None;
    }
    let index = if tuple.proto == proto::UDP {
        index + flow_cache::gate::UDP
    } else {
        index
    };
    // SAFETY: a per-CPU value, written only by programs on this CPU, one run at a time.
    let gate = unsafe { &mut *FLOW_CACHE_GATES.get_ptr_mut(index)? };
    if gate.closed_for != 0 {
        gate.closed_for -= 1;
        return None;
    }
    Some(gate)
}

/// Scores a look through `gate`: a hit takes a miss off; a miss adds one, or closes the gate
/// when it has seen [`flow_cache::GATE_MISSES`] more misses than hits, and then leaves it on
/// probation for when it opens. Counts the look, and a closing. Returns the look.
#[inline(always)]
fn scored<S>(gate: &mut FlowCacheGate, found: Option<&'static S>) -> Look<S> {
    let Some(slot) = found else {
        gate.misses_total += 1;
        if gate.misses < flow_cache::GATE_MISSES {
            gate.misses += 1;
            return Look::Miss;
        }
        gate.closed_for = flow_cache::GATE_CLOSED_FOR;
        gate.misses = flow_cache::GATE_MISSES - flow_cache::GATE_PROBE_MISSES;
        gate.closings_total += 1;
        return Look::Passed;
    };
    gate.hits_total += 1;
    if gate.misses != 0 {
        gate.misses -= 1;
    }
    Look::Hit(slot)
}

/// What this CPU's flow cache has for a client's TCP segment: a hit is the slot for the
/// packet's client, for the same client, frontend and protocol, still valid at `now`, with the
/// segment inside the slot's sequence window (so that the entry never trails what the client
/// has sent by more than the window). Each look scores the cache's gate; while the gate is
/// closed there is no look.
#[inline(always)]
pub fn hit<F: Family>(tuple: &Tuple<F>, now: u64) -> Look<FlowCacheSlot<F::Addr>> {
    look_for(tuple, now, |slot| {
        flow_cache::in_window(slot.seq_floor, tuple.seq_end)
    })
}

/// [`hit`] for a client's UDP datagram: instead of a sequence window, the slot's endpoint must
/// still hold its id in the backends map, unchanged (a UDP flow whose endpoint left selects
/// again, on the full path).
#[inline(always)]
pub fn datagram_hit<F: Family>(tuple: &Tuple<F>, now: u64) -> Look<FlowCacheSlot<F::Addr>> {
    look_for(tuple, now, |slot| {
        backend_holds::<F>(slot.backend_id, &slot.backend_addr, slot.backend_port)
    })
}

/// A look for a client's packet: the slot serves it when it holds the packet's client,
/// frontend and protocol, is valid at `now`, and `still_its_flow` says so.
#[inline(always)]
fn look_for<F: Family>(
    tuple: &Tuple<F>,
    now: u64,
    still_its_flow: impl FnOnce(&FlowCacheSlot<F::Addr>) -> bool,
) -> Look<FlowCacheSlot<F::Addr>> {
    let Some(gate) = gate_to_look(tuple, F::FLOW_CACHE_GATE) else {
        return Look::Passed;
    };
    let Some(slot) = F::flow_cache_slot(tuple.saddr, tuple.sport) else {
        return Look::Passed;
    };
    let serves = now < slot.valid_until_ns
        && slot.client_port == tuple.sport
        && slot.frontend_port == tuple.dport
        && slot.protocol == tuple.proto
        && F::same(&slot.client_addr, &tuple.saddr)
        && F::same(&slot.frontend_addr, &tuple.daddr)
        && still_its_flow(slot);
    scored(gate, serves.then_some(&*slot))
}

/// Where a packet served from `slot` goes: to the endpoint, from the client as it came.
#[inline(always)]
pub fn destination<F: Family>(slot: &FlowCacheSlot<F::Addr>) -> Destination<F> {
    Destination {
        addr: slot.backend_addr,
        port: slot.backend_port,
        service_id: slot.service_id,
        source: (slot.client_addr, slot.client_port),
        forward: false,
    }
}

/// After the full path has sent `tuple`, a packet its look missed (`look`) of the live flow
/// whose client's side is `entry`, to `destination`: this CPU's slot for its client takes the
/// flow when the flow is kept whole in its FLOW entry (no REPLY entry to check on each packet)
/// and, for TCP, established with a record of where its client has sent to. The slot serves
/// until the entry is due for a refresh, and for at most a quarter of the closing timeout (so
/// that the endpoint's FIN, which tc egress writes into the entry, reaches a TCP flow in time).
/// The slot's former flow, if another, goes back to the full path.
#[inline(always)]
pub fn remember<F: Family>(
    look: &Look<FlowCacheSlot<F::Addr>>,
    entry: &mut CtValue<F::Addr>,
    tuple: &Tuple<F>,
    destination: &Destination<F>,
    now: u64,
) {
    if !look.fills()
        || !state_allows_a_slot(tuple, entry.state, entry.seq_next)
        || has_reply_entry(entry)
        || destination.forward
        || !F::same(&destination.source.0, &tuple.saddr)
        || destination.source.1 != tuple.sport
    {
        return;
    }
    let Some(slot) = F::flow_cache_slot(tuple.saddr, tuple.sport) else {
        return;
    };
    record_this_cpu(&mut FlowValue::of_mut(entry).client_slot_cpus);
    let refreshed_by = entry.last_seen_ns + refresh_interval(tuple.proto, entry.state);
    let closing_seen_by = now + first_end_timeout() / 4;
    slot.valid_until_ns = refreshed_by.min(closing_seen_by);
    slot.client_addr = tuple.saddr;
    slot.client_port = tuple.sport;
    slot.frontend_addr = tuple.daddr;
    slot.frontend_port = tuple.dport;
    slot.protocol = tuple.proto;
    slot.backend_addr = destination.addr;
    slot.backend_port = destination.port;
    slot.backend_id = entry.backend_id;
    slot.service_id = destination.service_id;
    slot.seq_floor = entry.seq_next.wrapping_sub(flow_cache::SEQ_BEHIND);
    slot.flags = entry.flags & ct_flags::SOURCE_CHECKED;
}

/// Whether a flow in `state` may take a slot for `tuple`'s side: a UDP flow always; a TCP flow
/// once established, with a record of how far that side has sent (`side_seq_next`), which the
/// slot's sequence window starts from.
#[inline(always)]
fn state_allows_a_slot<F: Family>(tuple: &Tuple<F>, state: u8, side_seq_next: u32) -> bool {
    tuple.proto != proto::TCP || (state == tcp_state::ESTABLISHED && side_seq_next != 0)
}

/// Records in a flow's entry (`recorded`: its [`cpus`] field of one cache) that this CPU's
/// cache takes a slot of it. Written only when it changes: the entry's cache line stays clean
/// for the flow's steady packets on one CPU.
#[inline(always)]
fn record_this_cpu(recorded: &mut u16) {
    // SAFETY: no arguments; inlined by the verifier (kernel 6.10, 1ae6921009e5 "bpf: inline
    // bpf_get_smp_processor_id() helper").
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let updated = cpus::with(*recorded, cpu);
    if updated != *recorded {
        *recorded = updated;
    }
}

/// The flow of `entry` ends for its client's side (the client's FIN or RST, or the key taken
/// by a new flow): the flow's slots in XDP's flow cache go,
/// on every CPU whose cache took it ([`lb_common::FlowValue::client_slot_cpus`]), so that the
/// next connection from the client's port, which may go to another endpoint, is served by the
/// full path wherever its packets land. Its answers' slots stay: what they give back stays
/// right for the flow's last answers ([`remember_answer`]).
///
/// A slot left behind (an entry the LRU evicted with its record, a CPU that filled its slot
/// from a packet it took before the close and wrote after it, or one of two CPUs that took the
/// flow at the same moment, whose records race) is left to the slot's window: a
/// new connection's sequence numbers lie outside it but for a chance of one in
/// 2^32 / ([`flow_cache::SEQ_BEHIND`] + [`flow_cache::SEQ_AHEAD`]), and its time runs out
/// within [`lb_common::ct_timeouts::REFRESH`].
#[inline(always)]
pub fn forget<F: Family>(entry: &mut CtValue<F::Addr>, tuple: &Tuple<F>) {
    if has_reply_entry(entry) || dry_run() {
        return;
    }
    let recorded = &mut FlowValue::of_mut(entry).client_slot_cpus;
    empty_slots::<F, CLIENT_SIDE>(*recorded, tuple.saddr, tuple.sport);
    *recorded = cpus::NONE;
}

/// The flow of `entry` is over for its endpoint's answers too (the endpoint answered another
/// connection from its client's port, or a DSR SYN takes the key): the flow's answer
/// slots go, on every CPU whose answer cache took it
/// ([`lb_common::FlowValue::answer_slot_cpus`]). `client` is the client's address (tuple
/// order) and port.
#[inline(always)]
pub fn forget_answers<F: Family>(entry: &mut CtValue<F::Addr>, client: (F::Addr, u16)) {
    if has_reply_entry(entry) || dry_run() {
        return;
    }
    let recorded = &mut FlowValue::of_mut(entry).answer_slot_cpus;
    empty_slots::<F, ANSWERS>(*recorded, client.0, client.1);
    *recorded = cpus::NONE;
}

/// Which cache [`empty_slots`] empties.
const CLIENT_SIDE: bool = false;
const ANSWERS: bool = true;

/// More CPUs than a kernel can have (`CONFIG_NR_CPUS` is at most 8,192): a walk over them
/// ends at the first CPU the kernel does not have.
const CPUS_AT_MOST: u32 = 8192;

/// A client's slots to empty on each CPU, for [`empty_on_each_cpu`].
#[repr(C)]
struct Emptying<A> {
    client: A,
    port: u16,
    index: u32,
}

/// Empties the slots of `client`:`port` in one cache (`ANSWERS` or the client's) on the CPUs
/// `recorded` names ([`cpus`]): on one CPU, one lookup; on several, a walk over every CPU
/// (`bpf_loop`, kernel 5.17, e6f2dd0f8067 "bpf: Add bpf_loop helper": the verifier checks its
/// callback once, where a loop would be checked once per CPU it could reach).
#[inline(always)]
fn empty_slots<F: Family, const WHICH: bool>(recorded: u16, client: F::Addr, port: u16) {
    if recorded == cpus::NONE {
        return;
    }
    let job = Emptying {
        client,
        port,
        index: F::cache_index(client, port),
    };
    if let Some(cpu) = cpus::only(recorded) {
        empty_on::<F, WHICH>(&job, cpu);
        return;
    }
    let callback: extern "C" fn(u64, *mut c_void) -> i64 = empty_on_each_cpu::<F, WHICH>;
    // SAFETY: the callback is a function of this program's, and the context it gets is `job`,
    // which outlives the call and is only read.
    unsafe {
        bpf_loop(
            CPUS_AT_MOST,
            callback as *mut c_void,
            core::ptr::from_ref(&job).cast_mut().cast(),
            0,
        )
    };
}

/// `bpf_loop`'s callback of [`empty_slots`]: empties the job's slot on CPU `cpu`; stops the
/// walk (returns 1) at the first CPU the kernel does not have.
extern "C" fn empty_on_each_cpu<F: Family, const WHICH: bool>(cpu: u64, job: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes the context empty_slots gave it: an `Emptying` of this family.
    let job = unsafe { &*job.cast_const().cast::<Emptying<F::Addr>>() };
    if empty_on::<F, WHICH>(job, cpu as u32) {
        0
    } else {
        1
    }
}

/// Empties the job's slot on CPU `cpu` when it holds the job's client (another client's flow in
/// the same slot stays). Returns whether the kernel has that CPU.
#[inline(always)]
fn empty_on<F: Family, const WHICH: bool>(job: &Emptying<F::Addr>, cpu: u32) -> bool {
    let cache = if WHICH == ANSWERS {
        F::answer_cache()
    } else {
        F::flow_cache()
    };
    // SAFETY: a lookup in a per-CPU array of this program's with a key of its key type; the
    // helper (kernel 5.19, 07343110b293 "bpf: add bpf_map_lookup_percpu_elem for percpu map")
    // returns null for a CPU the kernel does not have.
    let slot = unsafe {
        bpf_map_lookup_percpu_elem(
            core::ptr::from_ref(cache).cast_mut().cast(),
            core::ptr::from_ref(&job.index).cast(),
            cpu,
        )
    }
    .cast::<FlowCacheSlot<F::Addr>>();
    if slot.is_null() {
        return false;
    }
    // SAFETY: a slot of the map, valid for the program's run. Its own CPU may be reading it
    // meanwhile: one aligned 8-byte store empties it, and the packet that CPU serves from it
    // then was sent before the flow's end.
    let slot = unsafe { &mut *slot };
    if slot.client_port == job.port && F::same(&slot.client_addr, &job.client) {
        slot.valid_until_ns = 0;
    }
    true
}

/// The frontend a local endpoint's answer goes back from, when this CPU's answer slot for its
/// destination holds its flow: the same client and protocol, from the slot's endpoint, still
/// valid now, and for TCP with the segment inside the endpoint's side of the sequence window.
/// The clock is read only for a packet the gate lets look (tc egress reads it for nothing else
/// on this path).
#[inline(always)]
pub fn answer_hit<F: Family>(tuple: &Tuple<F>) -> Look<FlowCacheSlot<F::Addr>> {
    let Some(gate) = gate_to_look(tuple, F::ANSWER_CACHE_GATE) else {
        return Look::Passed;
    };
    let Some(slot) = F::answer_cache_slot(tuple.daddr, tuple.dport) else {
        return Look::Passed;
    };
    let serves = now_ns() < slot.valid_until_ns
        && slot.client_port == tuple.dport
        && slot.backend_port == tuple.sport
        && slot.protocol == tuple.proto
        && F::same(&slot.client_addr, &tuple.daddr)
        && F::same(&slot.backend_addr, &tuple.saddr)
        && (tuple.proto != proto::TCP || flow_cache::in_window(slot.seq_floor, tuple.seq_end));
    scored(gate, serves.then_some(&*slot))
}

/// After tc egress has sent `tuple`, an answer its look missed (`look`) of the local endpoint
/// whose flow is kept whole in `entry` (a FLOW entry, not a SNAT flow's), back from `frontend`:
/// a steady segment of an established flow, or a UDP datagram, takes this CPU's answer slot for
/// its destination, never past the time the entry would run out without its client's packets
/// (tc egress translates a UDP flow's answers whether or not the flow is live, and its client's
/// key may pass to another flow then). The flow's end leaves the slot: what it gives back (the
/// frontend, for this client and endpoint) stays right for the flow's last answers, and once
/// the flow has left the established state no answer writes the slot again, so it runs out
/// within a quarter of the closing timeout. A flow that ends sooner for its answers (the
/// endpoint answers another connection from the client's port, or a DSR SYN takes the key)
/// empties its slots on every CPU ([`forget_answers`]). A key the LRU takes from a live flow is
/// left to the window, as for [`forget`].
#[inline(always)]
pub fn remember_answer<F: Family>(
    look: &Look<FlowCacheSlot<F::Addr>>,
    entry: &mut CtValue<F::Addr>,
    tuple: &Tuple<F>,
    frontend: (F::Addr, u16),
) {
    let backend_seq_next = FlowValue::of(entry).backend_seq_next;
    if !look.fills() || !state_allows_a_slot(tuple, entry.state, backend_seq_next) {
        return;
    }
    let Some(slot) = F::answer_cache_slot(tuple.daddr, tuple.dport) else {
        return;
    };
    record_this_cpu(&mut FlowValue::of_mut(entry).answer_slot_cpus);
    let held_for = ct_timeouts::REFRESH.min(first_end_timeout() / 4);
    let live_until = entry.last_seen_ns + timeout(tuple.proto, entry.state);
    slot.valid_until_ns = (now_ns() + held_for).min(live_until);
    slot.client_addr = tuple.daddr;
    slot.client_port = tuple.dport;
    slot.frontend_addr = frontend.0;
    slot.frontend_port = frontend.1;
    slot.protocol = tuple.proto;
    slot.backend_addr = tuple.saddr;
    slot.backend_port = tuple.sport;
    slot.backend_id = entry.backend_id;
    slot.seq_floor = backend_seq_next.wrapping_sub(flow_cache::SEQ_BEHIND);
}

/// The shortest a flow may live past a FIN or RST (its closing or half-closed timeout): a slot
/// serves a quarter of it at most, so that tc egress's write of the endpoint's FIN or RST ends
/// the flow in time.
#[inline(always)]
fn first_end_timeout() -> u64 {
    timeout(proto::TCP, tcp_state::CLOSING).min(timeout(proto::TCP, tcp_state::CLIENT_CLOSED))
}
