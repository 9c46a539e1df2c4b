//! Connection tracking, backend selection (random or sticky by client) and SNAT port allocation,
//! shared by the XDP, tc and socket programs.

use lb_common::{
    AFFINITY_NETNS, Affinity4Key, AffinityValue, Backend4, Ct4Key, Ct4Value, DatapathConfig, Event,
    Frontend4Key, ServiceValue, SlotKey, backend_flags, ct_direction, ct_flags, ct_timeouts,
    maglev, proto, scope, service_flags, tcp_state,
};
use lb_ebpf::packet::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

use crate::{
    helpers::{now_ns, random_u32},
    maps::{
        AFFINITY4, BACKENDS4, CONFIG, CONNTRACK4, FRONTENDS4, MAGLEV4, SLOTS4, count_service,
        dry_run,
    },
};

const NANOS_PER_SECOND: u64 = 1_000_000_000;
/// SNAT ports looked at, one after the other from a random start, before giving up on the flow.
/// A scan finds the free ports a nearly full range has left, where independent random tries
/// would miss them (16 tries at 95% use miss 44% of the time).
const SNAT_PORT_TRIES: u32 = 32;

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
    /// The source that replaces the client's, for a backend on another node.
    pub snat: Option<(u32, u16)>,
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
/// the service has session affinity, random otherwise), tracked from now on in both directions.
/// A TCP flow keeps its backend until it ends, also when the backend leaves the service:
/// kube-proxy users rely on that during rollouts. A backend on another node is reached through
/// SNAT unless the service's policy is Local.
#[inline(always)]
pub fn destination(
    tuple: &Tuple,
    service: &ServiceValue,
    macs: &[u8; 12],
) -> Result<Destination, Event> {
    let now = now_ns();
    let key = original_key(tuple);
    if let Some(entry) = CONNTRACK4.get_ptr_mut(&key) {
        // SAFETY: the entry stays valid for the program's run (RCU); racing writers on other CPUs
        // can only make last_seen/state slightly stale, which the timeouts tolerate.
        let entry = unsafe { &mut *entry };
        if now.saturating_sub(entry.last_seen_ns) <= timeout(tuple.proto, entry.state)
            && (tuple.proto == proto::TCP || backend_still_there(entry))
            && !reopens(entry, tuple)
        {
            if !dry_run() {
                refresh(entry, tuple, now);
                if entry.flags & ct_flags::SNAT != 0 && tuple.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                    note_client_close(entry, tuple, now);
                }
            }
            let snat =
                (entry.flags & ct_flags::SNAT != 0).then_some((entry.snat_addr, entry.snat_port));
            return Ok(Destination {
                addr: entry.nat_addr,
                port: entry.nat_port,
                service_id: entry.service_id,
                snat,
            });
        }
    }
    let (backend_id, backend) =
        if service.flags & service_flags::MAGLEV != 0 && service.affinity_timeout_s == 0 {
            select_maglev(service, tuple)?
        } else {
            select_for_client(service, u64::from(tuple.saddr), 0, now)?
        };
    let backend_addr = u32::from_be(backend.addr);
    let backend_port = u16::from_be(backend.port);
    let snat = if needs_snat(service, &backend) {
        let config = config().ok_or(Event::DROP_SNAT_EXHAUSTED)?;
        let port = free_snat_port(config, backend_addr, backend_port, tuple.proto, now)
            .ok_or(Event::DROP_SNAT_EXHAUSTED)?;
        Some((config.snat_addr, port))
    } else {
        None
    };
    let original = Ct4Value {
        last_seen_ns: now,
        backend_id,
        service_id: service.service_id,
        nat_addr: backend_addr,
        nat_port: backend_port,
        state: initial_state(tuple),
        flags: if snat.is_some() { ct_flags::SNAT } else { 0 },
        snat_addr: snat.map_or(0, |(addr, _)| addr),
        snat_port: snat.map_or(0, |(_, port)| port),
        client_mac: [0; 6],
        node_mac: [0; 6],
        _pad: [0; 2],
    };
    // The reply comes from the backend to the client, or to the SNAT address when there is one.
    let (reply_daddr, reply_dport) = snat.unwrap_or((tuple.saddr, tuple.sport));
    let reply_key = backend_reply_key(
        (backend_addr, backend_port),
        (reply_daddr, reply_dport),
        tuple.proto,
    );
    let mut reply = Ct4Value {
        nat_addr: tuple.daddr,
        nat_port: tuple.dport,
        snat_addr: tuple.saddr,
        snat_port: tuple.sport,
        ..original
    };
    // The ingress frame's destination MAC is this node's, its source the client's next hop.
    reply.node_mac.copy_from_slice(&macs[0..6]);
    reply.client_mac.copy_from_slice(&macs[6..12]);
    if dry_run() {
        return Ok(Destination {
            addr: backend_addr,
            port: backend_port,
            service_id: service.service_id,
            snat,
        });
    }
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
        snat,
    })
}

/// SNAT for a backend on another node, unless the policy is Local (which keeps the client's
/// address and only ever has local backends) or the agent configured no SNAT address.
#[inline(always)]
fn needs_snat(service: &ServiceValue, backend: &Backend4) -> bool {
    backend.flags & backend_flags::LOCAL == 0
        && service.flags & service_flags::LOCAL_ONLY == 0
        && config().is_some_and(|config| config.snat_addr != 0)
}

/// A SNAT port nobody uses towards this backend: a scan of the configured range from a random
/// port, checked against the reply entries that would collide. An entry past its timeout frees
/// its port (the LRU map never deletes entries by itself), and so does a connection that ended
/// cleanly, [`ct_timeouts::SNAT_PORT_REUSE`] after it ended: waiting the whole CLOSING timeout
/// held every port 10 s and capped a backend at about 450 new connections a second per node.
#[inline(always)]
fn free_snat_port(
    config: &DatapathConfig,
    backend_addr: u32,
    backend_port: u16,
    protocol: u8,
    now: u64,
) -> Option<u16> {
    let span = u32::from(config.snat_port_max.saturating_sub(config.snat_port_min)) + 1;
    let start = random_u32() % span;
    // A port whose backend may still hold TIME_WAIT, taken only when no clean one is left:
    // the backend then answers the SYN with an ACK, the client resets and retries, which costs
    // less than a dropped SYN (Linux's NAT reuses such ports too).
    let mut last_resort = None;
    for offset in 0..SNAT_PORT_TRIES {
        let port = config
            .snat_port_min
            .wrapping_add(((start + offset) % span) as u16);
        let key = backend_reply_key(
            (backend_addr, backend_port),
            (config.snat_addr, port),
            protocol,
        );
        match CONNTRACK4.get_ptr(&key) {
            None => return Some(port),
            Some(entry) => {
                // SAFETY: read-only use of an entry that stays valid for this run (RCU).
                let entry = unsafe { &*entry };
                match snat_port_state(entry, protocol, now) {
                    SnatPort::Free => return Some(port),
                    SnatPort::BackendTimeWait if last_resort.is_none() => last_resort = Some(port),
                    _ => {}
                }
            }
        }
    }
    last_resort
}

enum SnatPort {
    Free,
    /// Closed, but the backend closed first and may hold TIME_WAIT on the ports.
    BackendTimeWait,
    InUse,
}

/// A SYN on a closed flow's tuple is a new connection (the client reused its port): it selects
/// again and takes a fresh SNAT port, as the old one may serve another flow by now.
#[inline(always)]
fn reopens(entry: &Ct4Value, tuple: &Tuple) -> bool {
    tuple.proto == proto::TCP
        && entry.state == tcp_state::CLOSING
        && tuple.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Whether the SNAT flow a REPLY entry belongs to still needs its port: not when idle past its
/// timeout, nor some time after a RST or after both sides closed with the client first. A
/// backend that closed first holds the ports in TIME_WAIT and may answer a new SYN on them with
/// an ACK of the old connection, so those are a last resort until the timeout.
#[inline(always)]
fn snat_port_state(entry: &Ct4Value, protocol: u8, now: u64) -> SnatPort {
    let idle = now.saturating_sub(entry.last_seen_ns);
    if idle > timeout(protocol, entry.state) {
        return SnatPort::Free;
    }
    if idle <= ct_timeouts::SNAT_PORT_REUSE {
        return SnatPort::InUse;
    }
    let both_fins = ct_flags::CLIENT_FIN | ct_flags::BACKEND_FIN;
    if entry.flags & ct_flags::RESET != 0 {
        SnatPort::Free
    } else if entry.flags & both_fins != both_fins {
        SnatPort::InUse
    } else if entry.flags & ct_flags::BACKEND_CLOSED_FIRST != 0 {
        SnatPort::BackendTimeWait
    } else {
        SnatPort::Free
    }
}

/// Records a FIN or RST of a SNAT flow on its REPLY entry, which decides when its port is free.
/// Racing updates from two CPUs can lose a bit: the port then waits for the timeout instead.
#[inline(always)]
pub fn note_close(reply: &mut Ct4Value, tcp_flags: u8, from_backend: bool, now: u64) {
    let mut flags = reply.flags;
    if tcp_flags & TCP_RST != 0 {
        flags |= ct_flags::RESET;
    }
    if tcp_flags & TCP_FIN != 0 {
        if !from_backend {
            flags |= ct_flags::CLIENT_FIN;
        } else {
            if flags & ct_flags::CLIENT_FIN == 0 {
                flags |= ct_flags::BACKEND_CLOSED_FIRST;
            }
            flags |= ct_flags::BACKEND_FIN;
        }
    }
    if flags != reply.flags {
        reply.flags = flags;
        reply.last_seen_ns = now;
    }
}

/// A client's FIN or RST on a SNAT flow, recorded on the flow's REPLY entry.
#[inline(always)]
fn note_client_close(original: &Ct4Value, tuple: &Tuple, now: u64) {
    let key = backend_reply_key(
        (original.nat_addr, original.nat_port),
        (original.snat_addr, original.snat_port),
        tuple.proto,
    );
    if let Some(reply) = CONNTRACK4.get_ptr_mut(&key) {
        // SAFETY: as in destination().
        note_close(unsafe { &mut *reply }, tuple.tcp_flags, false, now);
    }
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

/// A backend for a new flow (or connection) of `client`: with session affinity, the backend the
/// client used last if that was within the timeout and the backend still exists; otherwise a
/// random one, remembered for next time when the service has affinity. `kind` tells client
/// addresses from socket-hook netns cookies apart.
#[inline(always)]
pub fn select_for_client(
    service: &ServiceValue,
    client: u64,
    kind: u32,
    now: u64,
) -> Result<(u32, Backend4), Event> {
    if service.affinity_timeout_s == 0 {
        return select(service);
    }
    let key = Affinity4Key {
        client,
        service_id: service.service_id,
        kind,
    };
    let timeout = u64::from(service.affinity_timeout_s) * NANOS_PER_SECOND;
    if let Some(entry) = AFFINITY4.get_ptr_mut(&key) {
        // SAFETY: valid for this run (RCU); a racing update only changes which recent backend wins.
        let entry = unsafe { &mut *entry };
        if now.saturating_sub(entry.last_used_ns) <= timeout
            // SAFETY: read-only use of an entry the agent writes whole.
            && let Some(backend) = unsafe { BACKENDS4.get(&entry.backend_id) }
            && backend.flags & backend_flags::TERMINATING == 0
        {
            if !dry_run() {
                entry.last_used_ns = now;
            }
            return Ok((entry.backend_id, *backend));
        }
    }
    let (backend_id, backend) = select(service)?;
    let value = AffinityValue {
        last_used_ns: now,
        backend_id,
        _pad: 0,
    };
    // A full LRU evicts the oldest client; affinity is best effort, the flow goes on regardless.
    if !dry_run() {
        let _ = AFFINITY4.insert(&key, &value, 0);
    }
    Ok((backend_id, backend))
}

/// The backend Maglev consistent hashing gives the flow: slot flow_hash % TABLE_SIZE of the
/// service's lookup table. Every node computes the same table for the same endpoints, so a flow
/// reaches the same backend through any node.
#[inline(always)]
fn select_maglev(service: &ServiceValue, tuple: &Tuple) -> Result<(u32, Backend4), Event> {
    if service.backend_count == 0 {
        return Err(no_backend(service));
    }
    let hash = maglev::flow_hash(
        tuple.saddr,
        tuple.daddr,
        tuple.sport,
        tuple.dport,
        tuple.proto,
    );
    let slot = service.maglev_table * maglev::TABLE_SIZE + hash % maglev::TABLE_SIZE;
    let backend_id = *MAGLEV4.get(slot).ok_or(Event::DROP_BACKEND_MISSING)?;
    // SAFETY: read-only use of an entry the agent writes whole.
    let backend = *unsafe { BACKENDS4.get(&backend_id) }.ok_or(Event::DROP_BACKEND_MISSING)?;
    Ok((backend_id, backend))
}

/// A random backend of the service's current table (kube-proxy's default selection).
#[inline(always)]
pub fn select(service: &ServiceValue) -> Result<(u32, Backend4), Event> {
    if service.backend_count == 0 {
        return Err(no_backend(service));
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

/// The socket hooks' client identity for affinity: the netns cookie (one pod, one namespace).
pub const SOCKET_CLIENT: u32 = AFFINITY_NETNS;

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

/// The REPLY key of the packets a backend sends to `to` (the client, or a SNAT address:port).
#[inline(always)]
fn backend_reply_key(backend: (u32, u16), to: (u32, u16), protocol: u8) -> Ct4Key {
    Ct4Key {
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
    // The client's address is the reply's destination, or the one SNAT replaced.
    let (client_addr, client_port) = if reply.flags & ct_flags::SNAT != 0 {
        (reply.snat_addr, reply.snat_port)
    } else {
        (tuple.daddr, tuple.dport)
    };
    let key = Ct4Key {
        saddr: client_addr,
        daddr: reply.nat_addr,
        sport: client_port,
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
