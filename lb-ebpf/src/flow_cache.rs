//! XDP's flow cache ([`lb_common::flow_cache`]): the established path's way around the
//! conntrack hash lookup for the steady packets of TCP flows to local endpoints. The full path
//! writes a slot ([`remember`]) after it has served a packet the slot could have served; the
//! next such packet is served from the slot ([`hit`]) until the slot's time or sequence window
//! runs out, and then by the full path again, which writes the slot anew. tc egress keeps the
//! twin for a local endpoint's answers ([`answer_hit`], [`remember_answer`]).

use lb_common::{
    CtValue, FlowCacheSlot, FlowValue, ct_flags, ct_timeouts, flow_cache, proto,
    tcp_flags::{ACK, FIN, RST, SYN},
    tcp_state,
};

use crate::{
    family::Family,
    flow::{Destination, Tuple, has_reply_entry, refresh_interval, timeout},
    helpers::now_ns,
    maps::dry_run,
};

/// Whether a TCP segment changes nothing its flow's entry keeps but `last_seen` and how far its
/// sender has sent: an acknowledgment, with or without data, and no SYN, FIN or RST.
#[inline(always)]
fn steady(tuple_flags: u8) -> bool {
    tuple_flags & (SYN | FIN | RST | ACK) == ACK
}

/// The slot that serves this packet, if one does: this CPU's slot for the packet's client, for
/// the same client and frontend, still valid at `now`, with the segment inside its sequence
/// window.
#[inline(always)]
pub fn hit<F: Family>(tuple: &Tuple<F>, now: u64) -> Option<&'static FlowCacheSlot<F::Addr>> {
    if tuple.proto != proto::TCP || !steady(tuple.tcp_flags) {
        return None;
    }
    let slot = F::flow_cache_slot(tuple.saddr, tuple.sport)?;
    let serves = now < slot.valid_until_ns
        && slot.client_port == tuple.sport
        && slot.frontend_port == tuple.dport
        && F::same(&slot.client_addr, &tuple.saddr)
        && F::same(&slot.frontend_addr, &tuple.daddr)
        && flow_cache::in_window(slot.seq_floor, tuple.seq_end);
    serves.then_some(slot)
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

/// After the full path has sent `tuple`, a steady segment of the live flow whose client's side
/// is `entry`, to `destination`: this CPU's slot for its client takes the flow when the flow is
/// kept whole in its FLOW entry (no REPLY entry to check on each packet), established, and has
/// recorded where its client has sent to. The slot's former flow, if another, goes back to the
/// full path.
#[inline(always)]
pub fn remember<F: Family>(
    entry: &CtValue<F::Addr>,
    tuple: &Tuple<F>,
    destination: &Destination<F>,
    now: u64,
) {
    if tuple.proto != proto::TCP
        || !steady(tuple.tcp_flags)
        || entry.state != tcp_state::ESTABLISHED
        || has_reply_entry(entry)
        || destination.forward
        || !F::same(&destination.source.0, &tuple.saddr)
        || destination.source.1 != tuple.sport
        || entry.seq_next == 0
        || dry_run()
    {
        return;
    }
    let Some(slot) = F::flow_cache_slot(tuple.saddr, tuple.sport) else {
        return;
    };
    let refreshed_by = entry.last_seen_ns + refresh_interval(proto::TCP, entry.state);
    let closing_seen_by = now + timeout(proto::TCP, tcp_state::CLOSING) / 4;
    slot.valid_until_ns = refreshed_by.min(closing_seen_by);
    slot.client_addr = tuple.saddr;
    slot.client_port = tuple.sport;
    slot.frontend_addr = tuple.daddr;
    slot.frontend_port = tuple.dport;
    slot.backend_addr = destination.addr;
    slot.backend_port = destination.port;
    slot.service_id = destination.service_id;
    slot.seq_floor = entry.seq_next.wrapping_sub(flow_cache::SEQ_BEHIND);
    slot.flags = entry.flags & ct_flags::SOURCE_CHECKED;
}

/// Empties this CPU's slot for a client's flows when it holds one: the client's packet ends its
/// flow (a FIN or RST), or starts another in the place of an ended one. A flow that outlives
/// this (the client's other CPUs' slots, an entry the LRU evicted) is left to the slot's window:
/// a new connection's sequence numbers lie outside it but for a chance of one in
/// 2^32 / ([`flow_cache::SEQ_BEHIND`] + [`flow_cache::SEQ_AHEAD`]), and its time runs out
/// within [`lb_common::ct_timeouts::REFRESH`].
#[inline(always)]
pub fn forget<F: Family>(tuple: &Tuple<F>) {
    if tuple.proto != proto::TCP || dry_run() {
        return;
    }
    if let Some(slot) = F::flow_cache_slot(tuple.saddr, tuple.sport)
        && slot.client_port == tuple.sport
        && F::same(&slot.client_addr, &tuple.saddr)
    {
        slot.valid_until_ns = 0;
    }
}

/// The frontend a local endpoint's answer goes back from, when this CPU's answer slot for its
/// destination holds its flow: the same client, from the slot's endpoint, still valid now, with
/// the segment inside the endpoint's side of the sequence window. The clock is read only for a
/// steady TCP segment (tc egress reads it for nothing else on this path).
#[inline(always)]
pub fn answer_hit<F: Family>(tuple: &Tuple<F>) -> Option<(F::Addr, u16)> {
    if tuple.proto != proto::TCP || !steady(tuple.tcp_flags) {
        return None;
    }
    let slot = F::answer_cache_slot(tuple.daddr, tuple.dport)?;
    let serves = now_ns() < slot.valid_until_ns
        && slot.client_port == tuple.dport
        && slot.backend_port == tuple.sport
        && F::same(&slot.client_addr, &tuple.daddr)
        && F::same(&slot.backend_addr, &tuple.saddr)
        && flow_cache::in_window(slot.seq_floor, tuple.seq_end);
    serves.then_some((slot.frontend_addr, slot.frontend_port))
}

/// After tc egress has sent `tuple`, an answer of the local endpoint whose flow is kept whole in
/// `entry` (a FLOW entry, not a SNAT flow's), back from `frontend`: a steady segment of an
/// established flow takes this CPU's answer slot for its destination. Nothing empties a slot
/// when its flow ends: what it gives back (the frontend, for this client and endpoint) stays
/// right for the flow's last answers, and once the flow has left the established state no
/// answer writes the slot again, so it runs out (within a quarter of the closing timeout)
/// before the flow's key can go to another flow by its timeout. A key the LRU takes from a live
/// flow is left to the window, as for [`forget`].
#[inline(always)]
pub fn remember_answer<F: Family>(
    entry: &CtValue<F::Addr>,
    tuple: &Tuple<F>,
    frontend: (F::Addr, u16),
) {
    let backend_seq_next = FlowValue::of(entry).backend_seq_next;
    if tuple.proto != proto::TCP
        || !steady(tuple.tcp_flags)
        || entry.state != tcp_state::ESTABLISHED
        || backend_seq_next == 0
        || dry_run()
    {
        return;
    }
    let Some(slot) = F::answer_cache_slot(tuple.daddr, tuple.dport) else {
        return;
    };
    let held_for = ct_timeouts::REFRESH.min(timeout(proto::TCP, tcp_state::CLOSING) / 4);
    slot.valid_until_ns = now_ns() + held_for;
    slot.client_addr = tuple.daddr;
    slot.client_port = tuple.dport;
    slot.frontend_addr = frontend.0;
    slot.frontend_port = frontend.1;
    slot.backend_addr = tuple.saddr;
    slot.backend_port = tuple.sport;
    slot.seq_floor = backend_seq_next.wrapping_sub(flow_cache::SEQ_BEHIND);
}
