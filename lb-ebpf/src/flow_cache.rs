//! XDP's flow cache ([`lb_common::flow_cache`]): the established path's way around the
//! conntrack hash lookup for the steady packets of TCP flows to local endpoints. The full path
//! writes a slot ([`remember`]) after it has served a packet the slot could have served; the
//! next such packet is served from the slot ([`hit`]) until the slot's time or sequence window
//! runs out, and then by the full path again, which writes the slot anew.

use lb_common::{
    CtValue, FlowCacheSlot, ct_flags, flow_cache, proto,
    tcp_flags::{ACK, FIN, RST, SYN},
    tcp_state,
};

use crate::{
    family::Family,
    flow::{Destination, Tuple, has_reply_entry, refresh_interval, timeout},
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
