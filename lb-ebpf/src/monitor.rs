//! Events for `lb monitor` ([`lb_common::monitor`]): each report first reads the control cell and
//! returns at once when no monitor asked for its kind, so that without a monitor a drop, a new
//! flow or a flow's end costs one inlined array load more. A report is built on the stack (104
//! of the program's 512 bytes, on these cold paths only) and copied into the ring buffer; a
//! full ring buffer loses it, counted per CPU in `lb_monlost_v1`.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    programs::XdpContext,
};
use lb_common::{
    Event,
    monitor::{MonitorEvent, kind, program},
    proto,
};
use lb_ebpf::packet::{
    ETH_HDR_LEN, ETH_P_IP, ETH_P_IPV6, IPV6_DADDR_OFFSET, IPV6_HDR_LEN, IPV6_NEXT_HEADER_OFFSET,
    IPV6_SADDR_OFFSET, TCP_FLAGS_OFFSET, bytes_at, parse_ipv4, words,
};

use crate::{
    family::{Family, V4, V6},
    flow::{Destination, Tuple},
    helpers::{now_ns, random_u32},
    maps::{MONITOR_CONTROL, MONITOR_EVENTS, MONITOR_LOST, PACKET6, dry_run},
    zeroed::{write_words, zero},
};

/// Whether a monitor asks for `kind` and this event is in its sample (and the packet is a real
/// one, not `lb explain`'s dry run).
#[inline(always)]
fn wanted(kind: u32) -> bool {
    let Some(control) = MONITOR_CONTROL.get(0) else {
        return false;
    };
    if control.kinds & kind == 0 || dry_run() {
        return false;
    }
    let sample = control.sample_one_in;
    sample <= 1 || random_u32().is_multiple_of(sample)
}

/// Whether a monitor asks for `kind` (before reading a packet again for it).
#[inline(always)]
pub fn wants(kind: u32) -> bool {
    MONITOR_CONTROL
        .get(0)
        .is_some_and(|control| control.kinds & kind != 0)
}

/// Unread bytes past which the monitor is woken up, once, by the report that crosses them;
/// below, and past them, the monitor finds the events when it looks (every `lb monitor` poll
/// interval). A wakeup per event (the default) is an irq_work and a reader woken on another CPU
/// each time: in lb-bench it took a new flow's p90 from 0.5 to 12 µs.
const WAKEUP_BACKLOG: u64 = 64 * 1024;
/// What one report takes on the ring buffer: the record and its 8-byte header, rounded to 8.
const RECORD_SPACE: u64 = (size_of::<MonitorEvent>() as u64 + 8).next_multiple_of(8);

/// Puts one event on the ring buffer, or counts it lost.
#[inline(always)]
fn report(event: MonitorEvent) {
    // SAFETY: `submit` hands over a reservation that holds one MonitorEvent.
    submit(|slot| unsafe { write_words(slot, &event) });
}

/// Puts one event on the ring buffer, written by `fill` where it lies there (zeroed first), so
/// that it never takes the stack of the reporting path; or counts it lost.
#[inline(always)]
fn report_in_place(fill: impl FnOnce(&mut MonitorEvent)) {
    // SAFETY: `submit` hands over a reservation that holds one MonitorEvent, writable until it
    // is submitted; zeroed, it is a valid one (integers only).
    submit(|slot| unsafe {
        zero(slot);
        fill(&mut *slot);
    });
}

/// Reserves a record on the ring buffer, has `write` write it whole and submits it; or counts
/// it lost.
#[inline(always)]
fn submit(write: impl FnOnce(*mut MonitorEvent)) {
    match MONITOR_EVENTS.reserve::<MonitorEvent>(0) {
        Some(mut entry) => {
            write(entry.as_mut_ptr());
            // Unread data, this record included (reserved, not yet submitted).
            let unread = MONITOR_EVENTS.query(BPF_RB_AVAIL_DATA.into());
            let crosses = unread > WAKEUP_BACKLOG && unread <= WAKEUP_BACKLOG + RECORD_SPACE;
            let wakeup = if crosses {
                BPF_RB_FORCE_WAKEUP
            } else {
                BPF_RB_NO_WAKEUP
            };
            entry.submit(wakeup.into());
        }
        None => {
            if let Some(lost) = MONITOR_LOST.get_ptr_mut(0) {
                // SAFETY: this CPU's own cell, valid for the run.
                unsafe { *lost += 1 };
            }
        }
    }
}

/// Writes what an event says about `tuple` into `event`.
#[inline(always)]
fn describe<F: Family>(
    event: &mut MonitorEvent,
    tuple: &Tuple<F>,
    kind: u32,
    reason: Event,
    service_id: u32,
    ifindex: u32,
) {
    event.time_ns = now_ns();
    event.kind = kind;
    event.reason = reason.0;
    event.service_id = service_id;
    event.ifindex = ifindex;
    event.program = program::XDP;
    event.family = F::NUMBER;
    event.proto = tuple.proto;
    event.tcp_flags = tuple.tcp_flags;
    event.sport = tuple.sport;
    event.dport = tuple.dport;
    event.saddr = F::monitor_words(F::map_order(tuple.saddr));
    event.daddr = F::monitor_words(F::map_order(tuple.daddr));
}

/// An event about `tuple`, its other fields zero.
#[inline(always)]
fn about<F: Family>(
    tuple: &Tuple<F>,
    kind: u32,
    reason: Event,
    service_id: u32,
    ifindex: u32,
) -> MonitorEvent {
    MonitorEvent {
        time_ns: now_ns(),
        kind,
        reason: reason.0,
        service_id,
        ifindex,
        program: program::XDP,
        family: F::NUMBER,
        proto: tuple.proto,
        tcp_flags: tuple.tcp_flags,
        sport: tuple.sport,
        dport: tuple.dport,
        saddr: F::monitor_words(F::map_order(tuple.saddr)),
        daddr: F::monitor_words(F::map_order(tuple.daddr)),
        ..MonitorEvent::default()
    }
}

/// A packet XDP dropped for `reason`. The packet is read again here, where only drops come, so
/// that no drop site carries its addresses: a packet too short to have them is reported with
/// what it has.
#[inline(always)]
pub fn xdp_drop(ctx: &XdpContext, reason: Event) {
    let kind = drop_kind(reason);
    if !wanted(kind) {
        return;
    }
    let mut tuple = Tuple::<V4> {
        saddr: 0,
        daddr: 0,
        sport: 0,
        dport: 0,
        proto: 0,
        tcp_flags: 0,
        seq: 0,
        seq_end: 0,
    };
    if let Some(eth) = bytes_at::<ETH_HDR_LEN>(ctx, 0)
        && u16::from_be_bytes([eth[12], eth[13]]) == ETH_P_IP
        && let Some(ip) = parse_ipv4(ctx)
    {
        tuple.saddr = ip.saddr;
        tuple.daddr = ip.daddr;
        tuple.proto = ip.proto;
        if !ip.later_fragment()
            && matches!(ip.proto, proto::TCP | proto::UDP | proto::SCTP)
            && let Some(ports) = bytes_at::<4>(ctx, ip.l4_offset)
        {
            tuple.sport = u16::from_be_bytes([ports[0], ports[1]]);
            tuple.dport = u16::from_be_bytes([ports[2], ports[3]]);
        }
        if ip.proto == proto::TCP
            && let Some(tcp) = bytes_at::<{ TCP_FLAGS_OFFSET + 1 }>(ctx, ip.l4_offset)
        {
            tuple.tcp_flags = tcp[TCP_FLAGS_OFFSET];
        }
    }
    report(about(
        &tuple,
        kind,
        reason,
        MonitorEvent::NO_SERVICE,
        ingress_ifindex(ctx),
    ));
}

/// An IPv6 packet one of the IPv6 XDP programs dropped for `reason`. The event is built in a
/// BPF-to-BPF call made only when a monitor wants it, so that it adds nothing to the IPv6
/// programs' own frames. `parsed`: the programs after `lb_xdp6` take the packet's tuple from
/// the parse `lb_xdp6` handed on ([`crate::maps::PACKET6`]); `lb_xdp6` reads the fixed header
/// again, with the ports when no extension header comes before them (walking the extension
/// headers again, for drops only, cost the verifier ~70,000 instructions per program).
#[inline(always)]
pub fn xdp_drop6(ctx: &XdpContext, reason: Event, parsed: bool) {
    let kind = drop_kind(reason);
    if wanted(kind) {
        drop6_event(ctx, kind, reason, parsed);
    }
}

#[inline(never)]
fn drop6_event(ctx: &XdpContext, kind: u32, reason: Event, parsed: bool) {
    let mut tuple = Tuple::<V6> {
        saddr: [0; 4],
        daddr: [0; 4],
        sport: 0,
        dport: 0,
        proto: 0,
        tcp_flags: 0,
        seq: 0,
        seq_end: 0,
    };
    if parsed {
        if let Some(packet) = PACKET6.get(0) {
            tuple = packet.tuple;
        }
    } else if let Some(eth) = bytes_at::<ETH_HDR_LEN>(ctx, 0)
        && u16::from_be_bytes([eth[12], eth[13]]) == ETH_P_IPV6
        && let Some(ip) = bytes_at::<IPV6_HDR_LEN>(ctx, ETH_HDR_LEN)
    {
        tuple.saddr = words(ip, IPV6_SADDR_OFFSET);
        tuple.daddr = words(ip, IPV6_DADDR_OFFSET);
        tuple.proto = ip[IPV6_NEXT_HEADER_OFFSET];
        let l4_offset = ETH_HDR_LEN + IPV6_HDR_LEN;
        if matches!(tuple.proto, proto::TCP | proto::UDP | proto::SCTP)
            && let Some(ports) = bytes_at::<4>(ctx, l4_offset)
        {
            tuple.sport = u16::from_be_bytes([ports[0], ports[1]]);
            tuple.dport = u16::from_be_bytes([ports[2], ports[3]]);
        }
        if tuple.proto == proto::TCP
            && let Some(tcp) = bytes_at::<{ TCP_FLAGS_OFFSET + 1 }>(ctx, l4_offset)
        {
            tuple.tcp_flags = tcp[TCP_FLAGS_OFFSET];
        }
    }
    let ifindex = ingress_ifindex(ctx);
    report_in_place(|event| {
        describe(
            event,
            &tuple,
            kind,
            reason,
            MonitorEvent::NO_SERVICE,
            ifindex,
        );
    });
}

#[inline(always)]
fn drop_kind(reason: Event) -> u32 {
    if reason == Event::DROP_SNAT_EXHAUSTED {
        kind::SNAT_EXHAUSTED
    } else {
        kind::DROP
    }
}

/// A packet of family `F` tc egress dropped for `reason` (`tuple`: its addresses, when it has
/// ports).
#[inline(always)]
pub fn tc_drop<F: Family>(tuple: Option<&Tuple<F>>, reason: Event, ifindex: u32) {
    if !wanted(kind::DROP) {
        return;
    }
    let event = match tuple {
        Some(tuple) => about(tuple, kind::DROP, reason, MonitorEvent::NO_SERVICE, ifindex),
        None => MonitorEvent {
            time_ns: now_ns(),
            kind: kind::DROP,
            reason: reason.0,
            service_id: MonitorEvent::NO_SERVICE,
            ifindex,
            family: F::NUMBER,
            ..MonitorEvent::default()
        },
    };
    report(MonitorEvent {
        program: program::TC,
        ..event
    });
}

/// A packet to a service without endpoints that XDP answered (`reason`: the RST or the ICMP
/// error it sent).
//
// IPv6's reports below build their event in a BPF-to-BPF call of its own, made only when a
// monitor wants the event, so that the event's 104 bytes never count against the stack of the
// path that reports it (an IPv6 path has none to spare, see `Family::OUT_OF_LINE`); IPv4's are
// inlined, as a call would add its frame to the deepest IPv4 path.
#[inline(always)]
pub fn xdp_reject<F: Family>(ctx: &XdpContext, tuple: &Tuple<F>, reason: Event, service_id: u32) {
    if wanted(kind::REJECT) {
        let ifindex = ingress_ifindex(ctx);
        if F::OUT_OF_LINE {
            reject_event_call(tuple, reason, service_id, ifindex);
        } else {
            reject_event(tuple, reason, service_id, ifindex);
        }
    }
}

#[inline(never)]
fn reject_event_call<F: Family>(tuple: &Tuple<F>, reason: Event, service_id: u32, ifindex: u32) {
    reject_event(tuple, reason, service_id, ifindex);
}

#[inline(always)]
fn reject_event<F: Family>(tuple: &Tuple<F>, reason: Event, service_id: u32, ifindex: u32) {
    report_in_place(|event| describe(event, tuple, kind::REJECT, reason, service_id, ifindex));
}

/// A new flow (`tuple` its first packet, which came in on `ifindex`): where it goes, and the
/// source its backend sees when that is not the client's.
#[inline(always)]
pub fn new_flow<F: Family>(tuple: &Tuple<F>, destination: &Destination<F>, ifindex: u32) {
    if !wanted(kind::NEW_FLOW) {
        return;
    }
    if F::OUT_OF_LINE {
        new_flow_event_call(tuple, destination, ifindex);
    } else {
        new_flow_event(tuple, destination, ifindex);
    }
}

#[inline(never)]
fn new_flow_event_call<F: Family>(tuple: &Tuple<F>, destination: &Destination<F>, ifindex: u32) {
    new_flow_event(tuple, destination, ifindex);
}

#[inline(always)]
fn new_flow_event<F: Family>(tuple: &Tuple<F>, destination: &Destination<F>, ifindex: u32) {
    let nat = destination.source;
    let translated_source = !(F::same(&nat.0, &tuple.saddr) && nat.1 == tuple.sport);
    report_in_place(|event| {
        describe(
            event,
            tuple,
            kind::NEW_FLOW,
            Event(0),
            destination.service_id,
            ifindex,
        );
        event.backend_addr = F::monitor_words(F::map_order(destination.addr));
        event.backend_port = destination.port;
        if translated_source {
            event.nat_addr = F::monitor_words(F::map_order(nat.0));
            event.nat_port = nat.1;
        }
    });
}

/// A tracked flow ends: `tuple` is the packet that ended it (the second side's TCP FIN or a
/// RST, an SCTP ABORT, SHUTDOWN COMPLETE or the second side's SHUTDOWN or SHUTDOWN ACK; XDP or
/// tc saw it, [`program::EITHER`]).
#[inline(always)]
pub fn flow_end<F: Family>(tuple: &Tuple<F>, service_id: u32) {
    if !wanted(kind::FLOW_END) {
        return;
    }
    if F::OUT_OF_LINE {
        flow_end_event_call(tuple, service_id);
    } else {
        flow_end_event(tuple, service_id);
    }
}

#[inline(never)]
fn flow_end_event_call<F: Family>(tuple: &Tuple<F>, service_id: u32) {
    flow_end_event(tuple, service_id);
}

#[inline(always)]
fn flow_end_event<F: Family>(tuple: &Tuple<F>, service_id: u32) {
    report_in_place(|event| {
        describe(event, tuple, kind::FLOW_END, Event(0), service_id, 0);
        event.program = program::EITHER;
    });
}

/// A connect() or sendmsg() the socket hooks sent to a backend: a new flow whose client is a
/// socket of this node (its address unknown yet: 0).
#[inline(always)]
pub fn socket_translated<F: Family>(
    protocol: u8,
    frontend: (F::Addr, u16),
    service_id: u32,
    backend: (F::Addr, u16),
) {
    if wanted(kind::NEW_FLOW) {
        report(MonitorEvent {
            backend_addr: F::monitor_words(backend.0),
            backend_port: u16::from_be(backend.1),
            ..socket_event::<F>(kind::NEW_FLOW, Event(0), protocol, frontend, service_id)
        });
    }
}

/// A connect() or sendmsg() the socket hooks refused, for `reason`: the service has no
/// endpoint for it, or its socket NAT entry could not be written.
#[inline(always)]
pub fn socket_refused<F: Family>(
    protocol: u8,
    frontend: (F::Addr, u16),
    service_id: u32,
    reason: Event,
) {
    if wanted(kind::REJECT) {
        report(socket_event::<F>(
            kind::REJECT,
            reason,
            protocol,
            frontend,
            service_id,
        ));
    }
}

/// A socket hook's event about a call to `frontend` (network byte order, as bpf_sock_addr holds
/// it).
#[inline(always)]
fn socket_event<F: Family>(
    kind: u32,
    reason: Event,
    protocol: u8,
    frontend: (F::Addr, u16),
    service_id: u32,
) -> MonitorEvent {
    MonitorEvent {
        time_ns: now_ns(),
        kind,
        reason: reason.0,
        service_id,
        program: program::SOCKET,
        family: F::NUMBER,
        proto: protocol,
        daddr: F::monitor_words(frontend.0),
        dport: u16::from_be(frontend.1),
        ..MonitorEvent::default()
    }
}

#[inline(always)]
fn ingress_ifindex(ctx: &XdpContext) -> u32 {
    // SAFETY: ctx.ctx is the program's own xdp_md, valid for the whole run.
    unsafe { (*ctx.ctx).ingress_ifindex }
}
