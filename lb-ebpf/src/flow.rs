//! Connection tracking and backend selection, shared by the XDP and tc programs.

use lb_common::{
    Backend4, Ct4Key, Ct4Value, Event, Frontend4Key, ServiceValue, SlotKey, ct_direction,
    ct_timeouts, proto, scope, tcp_state,
};

use lb_ebpf::packet::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

use crate::{
    helpers::{now_ns, random_u32},
    maps::{BACKENDS4, CONNTRACK4, FRONTENDS4, SLOTS4, count_service},
};

/// A flow as the parser saw it: addresses and ports as the packet holds them (big-endian values
/// read with `from_be_bytes`, so host-order integers of the wire bytes).
#[derive(Clone, Copy)]
pub struct Tuple {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
}

/// Where a packet of a service flow goes (host order of the wire bytes), for which service.
pub struct Destination {
    pub addr: u32,
    pub port: u16,
    pub service_id: u32,
}

/// The frontend this packet is addressed to, if any. Map keys hold network byte order.
#[inline(always)]
pub fn lookup_frontend(tuple: &Tuple) -> Option<&'static ServiceValue> {
    let key = Frontend4Key {
        addr: tuple.daddr.to_be(),
        port: tuple.dport.to_be(),
        proto: tuple.proto,
        scope: scope::ANY,
    };
    // SAFETY: the value is only read, and the agent replaces entries whole (a single update).
    unsafe { FRONTENDS4.get(&key) }
}

/// The backend for a packet addressed to `service`: the flow's tracked backend while the entry is
/// alive (for UDP: and the backend still exists), else a fresh random choice among the service's
/// backends, tracked from now on in both directions. A TCP flow keeps its backend until it ends,
/// also when the backend leaves the service: kube-proxy users rely on that during rollouts.
#[inline(always)]
pub fn destination(tuple: &Tuple, service: &ServiceValue) -> Result<Destination, Event> {
    let now = now_ns();
    let key = original_key(tuple);
    if let Some(entry) = CONNTRACK4.get_ptr_mut(&key) {
        // SAFETY: the entry stays valid for the program's run (RCU); racing writers on other CPUs
        // can only make last_seen/state slightly stale, which the timeouts tolerate.
        let entry = unsafe { &mut *entry };
        if now.saturating_sub(entry.last_seen_ns) <= timeout(tuple.proto, entry.state)
            && (tuple.proto == proto::TCP || backend_still_there(entry))
        {
            refresh(entry, tuple, now);
            return Ok(Destination {
                addr: entry.nat_addr,
                port: entry.nat_port,
                service_id: entry.service_id,
            });
        }
    }
    let (backend_id, backend) = select(service)?;
    let state = initial_state(tuple);
    let backend_addr = u32::from_be(backend.addr);
    let backend_port = u16::from_be(backend.port);
    let original = Ct4Value {
        last_seen_ns: now,
        backend_id,
        service_id: service.service_id,
        nat_addr: backend_addr,
        nat_port: backend_port,
        state,
        _pad: 0,
    };
    let reply_key = Ct4Key {
        saddr: backend_addr,
        daddr: tuple.saddr,
        sport: backend_port,
        dport: tuple.sport,
        proto: tuple.proto,
        direction: ct_direction::REPLY,
        _pad: [0; 2],
    };
    let reply = Ct4Value {
        nat_addr: tuple.daddr,
        nat_port: tuple.dport,
        ..original
    };
    // Reply first: once the original entry exists, the flow's next packets depend on both.
    CONNTRACK4
        .insert(&reply_key, &reply, 0)
        .map_err(|_| Event::DROP_CT_FULL)?;
    CONNTRACK4
        .insert(&key, &original, 0)
        .map_err(|_| Event::DROP_CT_FULL)?;
    count_service(service.service_id, 0, 0, 1);
    Ok(Destination {
        addr: backend_addr,
        port: backend_port,
        service_id: service.service_id,
    })
}

/// Whether the backend a flow was sent to is still in the backends map, unchanged. A UDP flow
/// whose backend is gone selects again (kube-proxy's stale-UDP-conntrack bug, avoided).
#[inline(always)]
fn backend_still_there(entry: &Ct4Value) -> bool {
    // SAFETY: read-only use of an entry the agent writes whole.
    match unsafe { BACKENDS4.get(&entry.backend_id) } {
        Some(backend) => {
            u32::from_be(backend.addr) == entry.nat_addr
                && u16::from_be(backend.port) == entry.nat_port
        }
        None => false,
    }
}

/// A random backend of the service's current table (kube-proxy's default selection).
#[inline(always)]
pub fn select(service: &ServiceValue) -> Result<(u32, Backend4), Event> {
    if service.backend_count == 0 {
        return Err(Event::DROP_NO_BACKEND);
    }
    let slot = random_u32() % u32::from(service.backend_count);
    let key = SlotKey {
        service_id: service.service_id,
        revision: service.revision,
        slot: slot as u16,
    };
    // SAFETY: read-only lookups of entries the agent writes whole.
    let backend_id = *unsafe { SLOTS4.get(&key) }.ok_or(Event::DROP_BACKEND_MISSING)?;
    // SAFETY: as above.
    let backend = *unsafe { BACKENDS4.get(&backend_id) }.ok_or(Event::DROP_BACKEND_MISSING)?;
    Ok((backend_id, backend))
}

/// The key of a flow's ORIGINAL entry (as the client sends it).
#[inline(always)]
pub fn original_key(tuple: &Tuple) -> Ct4Key {
    Ct4Key {
        saddr: tuple.saddr,
        daddr: tuple.daddr,
        sport: tuple.sport,
        dport: tuple.dport,
        proto: tuple.proto,
        direction: ct_direction::ORIGINAL,
        _pad: [0; 2],
    }
}

/// The key of a reply packet's REPLY entry (as the backend sends it).
#[inline(always)]
pub fn reply_key(tuple: &Tuple) -> Ct4Key {
    Ct4Key {
        direction: ct_direction::REPLY,
        ..original_key(tuple)
    }
}

#[inline(always)]
fn initial_state(tuple: &Tuple) -> u8 {
    if tuple.proto != proto::TCP {
        tcp_state::NONE
    } else if tuple.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        tcp_state::CLOSING
    } else if tuple.tcp_flags & TCP_SYN != 0 {
        tcp_state::SYN_SENT
    } else {
        // Picked up mid-stream (e.g. the entry was evicted): treat as established.
        tcp_state::ESTABLISHED
    }
}

/// The TCP state after this packet.
#[inline(always)]
pub fn next_state(state: u8, tcp_flags: u8) -> u8 {
    if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        tcp_state::CLOSING
    } else if state == tcp_state::SYN_SENT && tcp_flags & TCP_ACK != 0 && tcp_flags & TCP_SYN == 0 {
        tcp_state::ESTABLISHED
    } else {
        state
    }
}

/// Updates an entry's state and, at most once per REFRESH, its last_seen: the established path
/// stays free of map writes for most packets.
#[inline(always)]
pub fn refresh(entry: &mut Ct4Value, tuple: &Tuple, now: u64) {
    let state = if tuple.proto == proto::TCP {
        next_state(entry.state, tuple.tcp_flags)
    } else {
        entry.state
    };
    if state != entry.state {
        entry.state = state;
        entry.last_seen_ns = now;
    } else if now.saturating_sub(entry.last_seen_ns) > ct_timeouts::REFRESH {
        entry.last_seen_ns = now;
    }
}

/// How long an entry in `state` lives without traffic.
#[inline(always)]
pub fn timeout(protocol: u8, state: u8) -> u64 {
    if protocol != proto::TCP {
        return ct_timeouts::UDP;
    }
    match state {
        tcp_state::ESTABLISHED => ct_timeouts::TCP_ESTABLISHED,
        tcp_state::CLOSING => ct_timeouts::TCP_CLOSING,
        _ => ct_timeouts::TCP_SYN,
    }
}

/// Moves the ORIGINAL entry of a flow to CLOSING when the backend ends it (FIN/RST seen on
/// the reply path), so both directions expire quickly.
#[inline(always)]
pub fn close_original(reply: &Ct4Value, tuple: &Tuple, now: u64) {
    let key = Ct4Key {
        saddr: tuple.daddr,
        daddr: reply.nat_addr,
        sport: tuple.dport,
        dport: reply.nat_port,
        proto: tuple.proto,
        direction: ct_direction::ORIGINAL,
        _pad: [0; 2],
    };
    if let Some(entry) = CONNTRACK4.get_ptr_mut(&key) {
        // SAFETY: as in destination().
        let entry = unsafe { &mut *entry };
        entry.state = tcp_state::CLOSING;
        entry.last_seen_ns = now;
    }
}
