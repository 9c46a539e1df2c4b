//! `lb_xdp`: on the node NICs, every packet addressed to a Service frontend (node address:
//! nodePort, externalIP:port, LoadBalancer IP:port, or a ClusterIP routed to the node) is DNATed
//! to a backend. A node-local backend gets the packet through the stack (XDP_PASS); a backend on
//! another node gets it SNATed to this node and forwarded straight from XDP, and its replies are
//! translated back here too. A service with no endpoint answers like kube-proxy's REJECT (TCP RST,
//! ICMP port unreachable). Everything else passes untouched.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    macros::xdp,
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use lb_common::icmp::{self, ICMP_ERROR_LEN};
use lb_common::{
    Ct4Value, Ct6Value, CtValue, Event, FlowCacheSlot, FlowValue, FragValue, Ipv6Words,
    checksum::{self, Endpoints},
    client_nic, ct_flags,
    dsr::{Admission4Key, AdmissionValue},
    frag_action, ipv6, limits, proto, sctp, service_flags, tcp_seq, xdp_programs,
};
use lb_ebpf::packet::{
    ETH_HDR_LEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_ICMP, IPPROTO_ICMPV6,
    IPV4_FRAG_OFFSET_MASK, IPV4_MIN_HDR_LEN, IPV4_MORE_FRAGMENTS, IPV4_VERSION_IHL_NO_OPTIONS,
    IPV6_DADDR_OFFSET, IPV6_HDR_LEN, IPV6_NEXT_HEADER_OFFSET, IPV6_SADDR_OFFSET, IpHeader,
    Ipv4Info, Ipv6Info, Ipv6Packet, TCP_ACK, TCP_CSUM_OFFSET, TCP_DATA_OFFSET_OFFSET, TCP_FIN,
    TCP_FLAGS_OFFSET, TCP_MIN_HDR_LEN, TCP_RST, TCP_SYN, UDP_CSUM_OFFSET, UDP_HDR_LEN, bytes_at,
    bytes_at_mut, frame_len, ipv6_fixed_header, packet_words, parse_ipv4, parse_ipv6, words,
};

use crate::{
    dsr,
    family::{Family, V4, V6},
    flow::{
        Arrival, ClientKey, Destination, Frontend, Holder, NewFlow, Start, Tuple,
        accept_direct_return, admitted_by_source_ranges, blind_fin, blind_rst, client_key6,
        client_record_of_reply, client_side, client_side_entry, closes, config,
        continues_node_connection, destination, flow_entry, follow, frontend_of_this_run,
        goes_direct, live_destination, live_flow, look_up_on_retry, lookup_frontend,
        maybe_frontend, maybe_frontend_at, new_flow, reply_key, source_allowed, starts_unlooked,
        track_reply,
    },
    flow_cache::{self, Look, SlotLook},
    helpers::{Forward, mtu_exceeded, now_ns, tail_call},
    ip::{Addr, Ip},
    maps::{
        DSR_ADMISSIONS4, Icmp6Headers, NIC_MACS, NODES4, PACKET6, Packet6, TX_PORTS, XDP_PROGRAMS,
        count_event, count_service, dry_run,
    },
    monitor,
    sctp_crc::checksum_after_ports,
    too_big,
};

/// The program attached to the NICs: TCP and ICMP errors itself, UDP and SCTP packets through a
/// tail call to the program of their protocol.
///
/// `inline(always)` on the three programs: the `#[xdp]` macro wraps the body in a function of its
/// own, which LLVM leaves out of line at this size, so every packet paid a BPF-to-BPF call
/// (10 ns of lb-bench's miss path, and the tail calls' counter kept across it).
#[xdp]
#[inline(always)]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    verdict(&ctx, try_lb_xdp::<{ proto::TCP }>(&ctx))
}

/// IPv4 TCP to a frontend whose client's key is looked up, tail-called by `lb_xdp` (see
/// [`starts_unlooked`] and [`try_lookup`]).
#[xdp]
#[inline(always)]
pub fn lb_xdp_lookup(ctx: XdpContext) -> u32 {
    verdict(&ctx, try_lookup(&ctx))
}

/// An IPv4 TCP packet with the DSR option, tail-called by `lb_xdp` (see
/// [`try_accept_direct_return`]).
#[xdp]
#[inline(always)]
pub fn lb_xdp_dsr(ctx: XdpContext) -> u32 {
    verdict(&ctx, try_accept_direct_return(&ctx))
}

/// An IPv4 packet to a frontend of a Service with direct server return that no live flow
/// took, tail-called by `lb_xdp` and `lb_xdp_lookup` (see [`try_direct_return`]).
#[xdp]
#[inline(always)]
pub fn lb_xdp_direct(ctx: XdpContext) -> u32 {
    verdict(&ctx, try_direct_return(&ctx))
}

/// A packet too big for its way on, tail-called by the programs' verdict for a path that
/// returned [`too_big::PENDING`]: a client's packet, already translated, too big for the route
/// to its endpoint on another node, or that endpoint's answer, not yet translated, too big for
/// the NIC towards its client; answered with ICMP "fragmentation needed" or ICMPv6 "packet too
/// big" ([`crate::too_big`]).
#[xdp]
#[inline(always)]
pub fn lb_xdp_too_big(ctx: XdpContext) -> u32 {
    let ipv6 =
        bytes_at::<ETH_HDR_LEN>(&ctx, 0).is_some_and(|eth| eth[12..14] == ETH_P_IPV6.to_be_bytes());
    let answer = if ipv6 {
        answer_too_big::<Ipv6Info>(&ctx)
    } else {
        answer_too_big::<Ipv4Info>(&ctx)
    };
    // `verdict`'s work without its debug log: the program's own frame must stay small under the
    // IPv6 answer's, a call of its own (the verifier holds the two together to 512 bytes).
    match answer {
        Ok(action) => action,
        Err(event) => {
            count_event(event);
            if ipv6 {
                monitor::xdp_drop6(&ctx, event, false);
            } else {
                monitor::xdp_drop(&ctx, event);
            }
            xdp_action::XDP_DROP
        }
    }
}

/// The datapath for UDP, tail-called by `lb_xdp`. Every protocol has a program of its own, the
/// same code instantiated for it: the verifier walks each one on its own, within its limit of a
/// million instructions, which one program for every protocol passes.
#[xdp]
#[inline(always)]
pub fn lb_xdp_udp(ctx: XdpContext) -> u32 {
    verdict(&ctx, try_lb_xdp::<{ proto::UDP }>(&ctx))
}

/// The full datapath for IPv6, tail-called by `lb_xdp` for the IPv6 frames it neither passes
/// at once nor hands to a direct program ([`ipv6_program`]): extension headers, fragments,
/// ICMPv6 errors, TCP answers to a SNAT port. TCP itself, UDP and SCTP behind extension headers
/// through tail calls to `lb_xdp6_udp` and `lb_xdp6_sctp`. A program of its own for the
/// verifier's sake, as the protocols have (IPv4 pays nothing for it).
#[xdp]
#[inline(always)]
pub fn lb_xdp6(ctx: XdpContext) -> u32 {
    verdict6(&ctx, try_lb_xdp6::<{ proto::TCP }>(&ctx), false)
}

/// The full datapath for UDP over IPv6, tail-called by `lb_xdp` (an answer to a SNAT port, its
/// UDP header right after the fixed one) or by `lb_xdp6` (behind extension headers).
#[xdp]
#[inline(always)]
pub fn lb_xdp6_udp(ctx: XdpContext) -> u32 {
    verdict6(&ctx, try_lb_xdp6::<{ proto::UDP }>(&ctx), false)
}

/// The datapath for SCTP over IPv6, tail-called as `lb_xdp6_udp` is.
#[xdp]
#[inline(always)]
pub fn lb_xdp6_sctp(ctx: XdpContext) -> u32 {
    verdict6(&ctx, try_lb_xdp6::<{ proto::SCTP }>(&ctx), false)
}

/// The IPv6 datapath for a TCP header right after the fixed header, to a frontend and not to a
/// SNAT port, tail-called by `lb_xdp` for what it does not serve itself (see [`try_direct6`]
/// and [`direct6_here`]).
#[xdp]
#[inline(always)]
pub fn lb_xdp6_direct_tcp(ctx: XdpContext) -> u32 {
    verdict6(&ctx, try_direct6::<{ proto::TCP }>(&ctx), false)
}

/// [`lb_xdp6_direct_tcp`] for UDP.
#[xdp]
#[inline(always)]
pub fn lb_xdp6_direct_udp(ctx: XdpContext) -> u32 {
    verdict6(&ctx, try_direct6::<{ proto::UDP }>(&ctx), false)
}

/// [`lb_xdp6_direct_tcp`] for SCTP.
#[xdp]
#[inline(always)]
pub fn lb_xdp6_direct_sctp(ctx: XdpContext) -> u32 {
    verdict6(&ctx, try_direct6::<{ proto::SCTP }>(&ctx), false)
}

/// An IPv6 packet to a frontend that no live flow took, tail-called by `lb_xdp6`,
/// `lb_xdp6_udp` and `lb_xdp6_sctp` (see [`try_frontend6`]).
#[xdp]
#[inline(always)]
pub fn lb_xdp6_frontend(ctx: XdpContext) -> u32 {
    verdict6(&ctx, try_frontend6(&ctx), true)
}

/// A new IPv6 flow, tail-called by `lb_xdp6_frontend`.
#[xdp]
#[inline(always)]
pub fn lb_xdp6_flow(ctx: XdpContext) -> u32 {
    verdict6(&ctx, try_new_flow6(&ctx), true)
}

/// The first packet of a new IPv6 flow sent on, tail-called by `lb_xdp6_flow`.
#[xdp]
#[inline(always)]
pub fn lb_xdp6_deliver(ctx: XdpContext) -> u32 {
    verdict6(&ctx, try_deliver6(&ctx), true)
}

/// An ICMPv6 message (an error, or an ICMPv6 message behind extension headers), tail-called by
/// `lb_xdp6` (see [`icmp6_error`]).
#[xdp]
#[inline(always)]
pub fn lb_xdp6_icmp(ctx: XdpContext) -> u32 {
    verdict6(&ctx, icmp6_error(&ctx), false)
}

/// The datapath for SCTP, tail-called by `lb_xdp` (see [`lb_xdp_udp`]).
#[xdp]
#[inline(always)]
pub fn lb_xdp_sctp(ctx: XdpContext) -> u32 {
    verdict(&ctx, try_lb_xdp::<{ proto::SCTP }>(&ctx))
}

#[inline(always)]
fn verdict(ctx: &XdpContext, result: Result<u32, Event>) -> u32 {
    match answered_too_big(ctx, result) {
        Ok(action) => action,
        Err(event) => {
            count_event(event);
            monitor::xdp_drop(ctx, event);
            debug!(ctx, "xdp: dropped, event {}", event.0);
            xdp_action::XDP_DROP
        }
    }
}

/// A path's result, with [`too_big::PENDING`] handed to `lb_xdp_too_big` (a tail call, which
/// does not come back); if that is missing, the packet is dropped, as the stack would drop it.
#[inline(always)]
fn answered_too_big(ctx: &XdpContext, result: Result<u32, Event>) -> Result<u32, Event> {
    if result != Ok(too_big::PENDING) {
        return result;
    }
    // SAFETY: the slot holds an XDP program of this object, which takes the same context; on
    // success control never comes back.
    unsafe { tail_call::<{ xdp_programs::TOO_BIG }, _>(ctx, &XDP_PROGRAMS) };
    Err(Event::DROP_TOO_BIG)
}

/// [`verdict`] for the IPv6 programs, whose drops `lb monitor` reads as IPv6 (`parsed`: the
/// program runs after `lb_xdp6` handed the parsed packet on).
#[inline(always)]
fn verdict6(ctx: &XdpContext, result: Result<u32, Event>, parsed: bool) -> u32 {
    match answered_too_big(ctx, result) {
        Ok(action) => action,
        Err(event) => {
            count_event(event);
            monitor::xdp_drop6(ctx, event, parsed);
            debug!(ctx, "xdp: dropped, event {}", event.0);
            xdp_action::XDP_DROP
        }
    }
}

/// The datapath for packets of `PROTOCOL`; the TCP instance, `lb_xdp`, also translates ICMP
/// errors and hands UDP and SCTP packets to their programs.
#[inline(always)]
fn try_lb_xdp<const PROTOCOL: u8>(ctx: &XdpContext) -> Result<u32, Event> {
    let Some(eth) = bytes_at::<ETH_HDR_LEN>(ctx, 0) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    if ethertype != ETH_P_IP {
        if PROTOCOL == proto::TCP && ethertype == ETH_P_IPV6 {
            return Ok(match ipv6_program(ctx) {
                Some(Ipv6Program::DirectTcp) => {
                    direct6_here::<{ proto::TCP }, { xdp_programs::IPV6_DIRECT_TCP }>(ctx, eth)
                }
                Some(Ipv6Program::DirectUdp) => {
                    to_program::<{ xdp_programs::IPV6_DIRECT_UDP }>(ctx)
                }
                Some(Ipv6Program::DirectSctp) => {
                    to_program::<{ xdp_programs::IPV6_DIRECT_SCTP }>(ctx)
                }
                Some(Ipv6Program::Full) => to_program::<{ xdp_programs::IPV6 }>(ctx),
                Some(Ipv6Program::FullUdp) => to_program::<{ xdp_programs::IPV6_UDP }>(ctx),
                Some(Ipv6Program::FullSctp) => to_program::<{ xdp_programs::IPV6_SCTP }>(ctx),
                None => xdp_action::XDP_PASS,
            });
        }
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            // Tagged frames go to the stack as they came; VLAN interfaces are not served.
            count_event(Event::PASS_VLAN);
        }
        return Ok(xdp_action::XDP_PASS);
    }
    if PROTOCOL == proto::TCP && nothing_of_ours4(ctx) {
        return Ok(xdp_action::XDP_PASS);
    }
    let ip = parse_ipv4(ctx).ok_or(Event::DROP_MALFORMED)?;
    if PROTOCOL == proto::TCP {
        match ip.proto {
            proto::UDP => return Ok(to_program::<{ xdp_programs::UDP }>(ctx)),
            proto::SCTP => return Ok(to_program::<{ xdp_programs::SCTP }>(ctx)),
            IPPROTO_ICMP if !ip.later_fragment() && !ip.first_fragment() => {
                return icmp_error(ctx, &ip);
            }
            _ => {}
        }
    }
    if ip.proto != PROTOCOL {
        return Ok(xdp_action::XDP_PASS);
    }
    if ip.later_fragment() {
        return later_fragment(ctx, &ip, ip.proto);
    }
    let tuple = transport_tuple(ctx, &ip, PROTOCOL)?;
    serve::<PROTOCOL, _>(ctx, eth, &ip, &tuple)
}

/// `lb_xdp_dsr`'s work: an IPv4 TCP packet whose header holds the DSR option and nothing else,
/// sent here by the node its client sent to, for an endpoint on this node to answer directly.
/// A SYN whose option names a frontend of a Service of its destination (the option's pairs in
/// `DSR_ADMISSIONS4`; a NodePort's address must be a node's, in `NODES4`) has its flow kept
/// in its client's FLOW entry, whose frontend tc egress gives the endpoint's answers as their
/// source, and goes to the stack without the option. Any other packet with the option is
/// dropped and counted: it would make the endpoint answer from an address it does not serve.
/// So is a SYN from a node's address: no node sends its own clients' SYNs by DSR
/// ([`try_direct_return`]), and a node's SNAT of a client's SYN that came with a forged option
/// would key the flow by that node's SNAT port, whose answers must reach it untranslated. A
/// frame not sent to this NIC's MAC passes untouched ([`not_sent_to_this_nic`]).
#[inline(always)]
fn try_accept_direct_return(ctx: &XdpContext) -> Result<u32, Event> {
    let ip = parse_ipv4(ctx).ok_or(Event::DROP_MALFORMED)?;
    let Some(frontend) = dsr::option_of(ctx, &ip) else {
        return Ok(xdp_action::XDP_PASS);
    };
    if frame_not_sent_to_this_nic(ctx) {
        return Ok(xdp_action::XDP_PASS);
    }
    if ip.proto != proto::TCP || ip.first_fragment() || ip.later_fragment() {
        return Err(Event::DROP_DSR_REFUSED);
    }
    let tuple = transport_tuple(ctx, &ip, proto::TCP)?;
    if tuple.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return Err(Event::DROP_DSR_REFUSED);
    }
    if !ip.header_ok(ctx) {
        return Err(Event::DROP_IP_CHECKSUM);
    }
    if is_node(tuple.saddr) {
        return Err(Event::DROP_DSR_REFUSED);
    }
    let admission = admission_of(&tuple, frontend).ok_or(Event::DROP_DSR_REFUSED)?;
    if dry_run() {
        return Ok(xdp_action::XDP_PASS);
    }
    accept_direct_return(&tuple, frontend, &admission, now_ns())?;
    if !dsr::strip_option(ctx) {
        return Err(Event::DROP_MALFORMED);
    }
    count_event(Event::DSR_ACCEPTED);
    Ok(xdp_action::XDP_PASS)
}

/// The service and backend a DSR option may pair its frontend with at the SYN's destination:
/// an externalIP's or LoadBalancer IP's pair as it is, a NodePort's on any node's address (the
/// address the agent keys NodePorts' pairs by, `ANY_NODE`, is no frontend's).
#[inline(always)]
fn admission_of(tuple: &Tuple, (addr, port): (u32, u16)) -> Option<AdmissionValue> {
    if addr == lb_common::dsr::ANY_NODE {
        return None;
    }
    let mut key = Admission4Key {
        frontend_addr: addr,
        endpoint_addr: tuple.daddr,
        frontend_port: port,
        endpoint_port: tuple.dport,
        proto: proto::TCP,
        _pad: [0; 3],
    };
    // SAFETY: read-only copies of entries the agent writes whole.
    if let Some(admission) = unsafe { DSR_ADMISSIONS4.get(&key) } {
        return Some(*admission);
    }
    if !is_node(addr) {
        return None;
    }
    key.frontend_addr = lb_common::dsr::ANY_NODE;
    // SAFETY: as above.
    unsafe { DSR_ADMISSIONS4.get(&key) }.copied()
}

/// Whether `addr` is an address of a node of the cluster (`NODES4`).
#[inline(always)]
fn is_node(addr: u32) -> bool {
    // SAFETY: a read-only look at an entry the agent writes whole.
    unsafe { NODES4.get(&addr) }.is_some()
}

/// Whether an IPv4 frame is plainly nothing of the datapath's: a TCP, UDP or SCTP packet with
/// a header of 20 bytes, not a fragment, to an address and port that the frontend filter has
/// no frontend for and that are not the node's SNAT address and range. It passes at once,
/// before the parse that anything else needs (and for UDP and SCTP before the tail call to
/// their programs, which pass it too). Only its IP header is checked first, as the parse checks
/// it (a header the stack would drop is still dropped and counted); a transport header that is
/// no frontend's is the stack's to judge.
#[inline(always)]
fn nothing_of_ours4(ctx: &XdpContext) -> bool {
    const FIRST_PORTS: usize = IPV4_MIN_HDR_LEN + 4;
    let Some(ip) = bytes_at::<FIRST_PORTS>(ctx, ETH_HDR_LEN) else {
        return false;
    };
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let fragment =
        u16::from_be_bytes([ip[6], ip[7]]) & (IPV4_FRAG_OFFSET_MASK | IPV4_MORE_FRAGMENTS);
    let protocol = ip[9];
    if ip[0] != IPV4_VERSION_IHL_NO_OPTIONS
        || fragment != 0
        || total_len < FIRST_PORTS
        || ctx.data() + ETH_HDR_LEN + total_len > ctx.data_end()
        || !matches!(protocol, proto::TCP | proto::UDP | proto::SCTP)
    {
        return false;
    }
    let daddr = u32::from_be_bytes([ip[16], ip[17], ip[18], ip[19]]);
    let dport = u16::from_be_bytes([ip[22], ip[23]]);
    !maybe_frontend_at::<V4>(daddr, dport, protocol) && !to_snat_port::<V4>(&daddr, dport)
}

/// `lb_xdp_lookup`'s work: an IPv4 TCP packet to a frontend that `lb_xdp` found no live flow
/// for and did not start one for without looking its client's key up ([`starts_unlooked`]),
/// served as `lb_xdp` served every such packet before it started flows unlooked. Parsed again:
/// nothing was written into the frame, and the checks before the frontend's (a SNAT answer, a
/// live flow) found nothing for it in `lb_xdp`.
#[inline(always)]
fn try_lookup(ctx: &XdpContext) -> Result<u32, Event> {
    let Some(HandedOn { eth, ip, tuple }) = tcp_handed_on(ctx)? else {
        return Ok(xdp_action::XDP_PASS);
    };
    to_frontend(ctx, eth, &ip, &tuple, ClientKey::LookedUp, Look::Passed)
}

/// An IPv4 TCP packet `lb_xdp` handed on after its parse, parsed again (nothing was written
/// into the frame).
struct HandedOn<'a> {
    eth: &'a [u8; ETH_HDR_LEN],
    ip: Ipv4Info,
    tuple: Tuple,
}

/// [`HandedOn`] of the packet; None: no TCP packet the programs it is handed to serve (a later
/// fragment passes).
#[inline(always)]
fn tcp_handed_on(ctx: &XdpContext) -> Result<Option<HandedOn<'_>>, Event> {
    let eth = bytes_at::<ETH_HDR_LEN>(ctx, 0).ok_or(Event::DROP_MALFORMED)?;
    let ip = parse_ipv4(ctx).ok_or(Event::DROP_MALFORMED)?;
    if ip.proto != proto::TCP || ip.later_fragment() {
        return Ok(None);
    }
    let tuple = transport_tuple(ctx, &ip, proto::TCP)?;
    Ok(Some(HandedOn { eth, ip, tuple }))
}

/// Where `lb_xdp` hands an IPv6 frame on ([`ipv6_program`]), each the program of one slot of
/// [`XDP_PROGRAMS`]: `lb_xdp6_direct_tcp` and its twins (though `lb_xdp` serves what it can of
/// TCP itself, [`direct6_here`]), and `lb_xdp6`, `lb_xdp6_udp`, `lb_xdp6_sctp`.
#[derive(Clone, Copy)]
enum Ipv6Program {
    DirectTcp,
    DirectUdp,
    DirectSctp,
    Full,
    FullUdp,
    FullSctp,
}

/// The program for an IPv6 frame. A TCP, UDP or SCTP header right after the fixed header: to a
/// frontend (the frontend filter), the protocol's direct program (`lb_xdp6_direct_tcp` and its
/// twins, [`try_direct6`]); to the node's IPv6 SNAT address and port range, the protocol's
/// program of the full path (`lb_xdp6`, `lb_xdp6_udp`, `lb_xdp6_sctp`); else None. None: nothing
/// of the datapath's, passed at once instead of through `lb_xdp6` (a tail call, and for ICMPv6
/// one more to `lb_xdp6_icmp`), which passed it too: such a packet, or an ICMPv6 message other
/// than an error (neighbour discovery among them) right after the fixed header. Anything else
/// (extension headers, fragments, ICMPv6 errors, a header the stack would drop) goes to
/// `lb_xdp6`.
#[inline(always)]
fn ipv6_program(ctx: &XdpContext) -> Option<Ipv6Program> {
    let Some(ip) = bytes_at::<{ IPV6_HDR_LEN + 4 }>(ctx, ETH_HDR_LEN) else {
        return Some(Ipv6Program::Full);
    };
    if ip[0] >> 4 != 6 {
        return Some(Ipv6Program::Full);
    }
    let protocol = ip[IPV6_NEXT_HEADER_OFFSET];
    let (program, direct) = match protocol {
        IPPROTO_ICMPV6 if icmp::is_icmp6_error(ip[IPV6_HDR_LEN]) => {
            return Some(Ipv6Program::Full);
        }
        IPPROTO_ICMPV6 => return None,
        proto::TCP => (Ipv6Program::Full, Ipv6Program::DirectTcp),
        proto::UDP => (Ipv6Program::FullUdp, Ipv6Program::DirectUdp),
        proto::SCTP => (Ipv6Program::FullSctp, Ipv6Program::DirectSctp),
        _ => return Some(Ipv6Program::Full),
    };
    let daddr = packet_words(ip, IPV6_DADDR_OFFSET);
    let dport = u16::from_be_bytes([ip[IPV6_HDR_LEN + 2], ip[IPV6_HDR_LEN + 3]]);
    let to_frontend = maybe_frontend_at::<V6>(daddr, dport, protocol);
    if to_snat_port::<V6>(&daddr, dport) {
        Some(program)
    } else if to_frontend {
        Some(direct)
    } else {
        None
    }
}

/// An IPv6 TCP segment right after the fixed header to a frontend (what `lb_xdp6_direct_tcp`
/// takes), served here as an IPv4 one is, without that program's tail call and landing: a
/// packet of a live flow sent on, a new flow handed to
/// `lb_xdp6_flow` as the direct program hands it (`lb_xdp6_deliver` answers one to a service
/// without endpoints with the REJECT). Whatever the direct program would refuse (a blind RST,
/// a source range that no longer admits the flow) goes on to it untouched, to be looked at
/// again there, dropped and reported as IPv6's: a report from here would put `lb_xdp`'s frame
/// and the report's past 512 bytes of stack. Those refusals come before the flow or the packet
/// changes, so the second look finds what the first did; the rewrite after them fails only on
/// bounds that `transport_tuple` checked for the same bytes.
///
/// [`try_direct6_here`] repeats the steps of [`try_direct6`] and [`frontend6`] with every error
/// turned into a hand-on instead of calling them: written as one function both use, returning
/// their `Result`, `lb_xdp` walked 19,000 more verifier instructions and served an established
/// UDP datagram about 7% slower (perf, two alternating pairs). A UDP datagram goes on to
/// `lb_xdp6_direct_udp` since UDP flows are served from the flow cache: inlined here as well,
/// the datagram's look and the slot's fill made `lb_xdp` 1,900 bytes of JIT code larger
/// (83 KB) and served an established IPv6 datagram no faster than the tail call does.
#[inline(always)]
fn direct6_here<const PROTOCOL: u8, const DIRECT_PROGRAM: u32>(
    ctx: &XdpContext,
    eth: &[u8; ETH_HDR_LEN],
) -> u32 {
    match try_direct6_here::<PROTOCOL>(ctx, eth) {
        Some(action) => action,
        None => to_program::<DIRECT_PROGRAM>(ctx),
    }
}

/// [`direct6_here`]'s work: None for what goes on to the direct program.
#[inline(always)]
fn try_direct6_here<const PROTOCOL: u8>(ctx: &XdpContext, eth: &[u8; ETH_HDR_LEN]) -> Option<u32> {
    let ip = ipv6_fixed_header(ctx)??;
    if ip.proto != PROTOCOL {
        return None;
    }
    let tuple = transport_tuple(ctx, &ip, PROTOCOL).ok()?;
    if proto::has_handshake(PROTOCOL)
        && tuple.tcp_flags & TCP_SYN == 0
        && let Some(action) = established(ctx, eth, &ip, &tuple).ok()?
    {
        return Some(action);
    }
    let now = now_ns();
    let look = datagram_look::<PROTOCOL, _>(&tuple, now);
    if let Look::Hit(slot) = look {
        return served_from_slot(ctx, eth, &ip, &tuple, slot).ok();
    }
    let Some(frontend) = admit(ctx, eth, &ip, &tuple).ok()? else {
        return Some(xdp_action::XDP_PASS);
    };
    let arrival = arrival(ctx, eth);
    match live_destination(ctx, &ip, &tuple, &arrival, now, client_key6(&tuple), look).ok()? {
        Ok(destination) => deliver(ctx, &ip, &tuple, &destination).ok(),
        Err(key_holder) => {
            let packet = packet6().ok()?;
            packet.ip = ip;
            packet.tuple = tuple;
            let start = FlowStart {
                frontend,
                arrival,
                now,
                key_holder,
            };
            Some(start.hand_on(ctx, packet))
        }
    }
}

/// Whether `daddr`:`dport` is the node's SNAT address of the family and a port of the SNAT
/// range (an answer to a SNAT flow, as [`snat_reply`] looks for). The port first: the
/// settings it needs are the ones every served packet reads, and most frontends' ports
/// (NodePorts among them) lie outside the range, so that the family's SNAT address (IPv6's in
/// a map only this check reads) is seldom looked at.
#[inline(always)]
fn to_snat_port<F: Family>(daddr: &F::Addr, dport: u16) -> bool {
    let Some(config) = config() else {
        return false;
    };
    dport >= config.snat_port_min
        && dport <= config.snat_port_max
        && F::snat_addr().is_some_and(|snat_addr| F::same(daddr, &snat_addr))
}

/// The full IPv6 datapath for the protocol `PROTOCOL`: TCP in `lb_xdp6`, which hands UDP to
/// `lb_xdp6_udp`, SCTP to `lb_xdp6_sctp` (those behind extension headers: `lb_xdp` hands an
/// answer to a SNAT port right after the fixed header there itself) and ICMPv6 errors to
/// `lb_xdp6_icmp`, and sends a later fragment the way its first fragment went. Other ICMPv6
/// (neighbour discovery) passes untouched. The stages after the parse are BPF-to-BPF calls and
/// tail calls, each with a stack of its own: with the extension-header walk and the SNAT answer
/// in one frame, the rest does not fit in 512 bytes (see [`try_direct6`] for the common case).
#[inline(always)]
fn try_lb_xdp6<const PROTOCOL: u8>(ctx: &XdpContext) -> Result<u32, Event> {
    let Some(eth) = bytes_at::<ETH_HDR_LEN>(ctx, 0) else {
        return Ok(xdp_action::XDP_PASS);
    };
    if u16::from_be_bytes([eth[12], eth[13]]) != ETH_P_IPV6 {
        return Ok(xdp_action::XDP_PASS);
    }
    let ip = match parse_ipv6(ctx).ok_or(Event::DROP_MALFORMED)? {
        Ipv6Packet::Transport(ip) => ip,
        // `lb_xdp6` sees every IPv6 frame first: the other instances never get one.
        Ipv6Packet::LaterFragment(ip) if PROTOCOL == proto::TCP => {
            return later_fragment(ctx, &ip, ip.proto);
        }
        Ipv6Packet::LaterFragment(_) => return Ok(xdp_action::XDP_PASS),
        Ipv6Packet::Other => return Ok(xdp_action::XDP_PASS),
    };
    if PROTOCOL == proto::TCP && ip.proto == proto::UDP {
        return Ok(to_program::<{ xdp_programs::IPV6_UDP }>(ctx));
    }
    if PROTOCOL == proto::TCP && ip.proto == proto::SCTP {
        return Ok(to_program::<{ xdp_programs::IPV6_SCTP }>(ctx));
    }
    if PROTOCOL == proto::TCP && ip.proto == IPPROTO_ICMPV6 && !ip.first_fragment {
        // Where the message starts, for `lb_xdp6_icmp`.
        packet6()?.ip = ip;
        return Ok(to_program::<{ xdp_programs::IPV6_ICMP }>(ctx));
    }
    if ip.proto != PROTOCOL {
        return Ok(xdp_action::XDP_PASS);
    }
    // The header and the tuple live in this CPU's scratch entry rather than on the stack, and
    // the programs this one hands on to find them there (see [`try_frontend6`]).
    let packet = packet6()?;
    packet.ip = ip;
    packet.tuple = transport_tuple(ctx, &packet.ip, PROTOCOL)?;
    serve::<PROTOCOL, _>(ctx, eth, &packet.ip, &packet.tuple)
}

/// A TCP, UDP or SCTP packet (its protocol the instance's constant, so that the compiler leaves
/// out the code of the others instead of the verifier walking it) of either family: an answer
/// to a SNAT port, a packet of a live flow, or one to a frontend, which starts a flow; anything
/// else passes untouched.
#[inline(always)]
fn serve<const PROTOCOL: u8, I: Ip>(
    ctx: &XdpContext,
    eth: &[u8; ETH_HDR_LEN],
    ip: &I,
    tuple: &Tuple<I::F>,
) -> Result<u32, Event> {
    let answer = if I::F::OUT_OF_LINE {
        snat_reply_call(ctx, tuple, ip)?
    } else {
        snat_reply(ctx, tuple, ip)?
    };
    if let Some(action) = answer {
        return Ok(action);
    }
    if !maybe_frontend(tuple) {
        // A SYN another node sent here for a local endpoint to answer directly carries the DSR
        // option (a header with options never passes the first check). Looked for only here,
        // on a path that ends: a look on the way to the frontend's split the states of all
        // that follows, and `lb_xdp`'s verifier walked twice the instructions.
        if PROTOCOL == proto::TCP
            && size_of::<Addr<I>>() == 4
            && dsr::carries_option(ctx, ip.l4_offset())
        {
            return Ok(to_program::<{ xdp_programs::DSR }>(ctx));
        }
        return Ok(xdp_action::XDP_PASS);
    }
    if proto::has_handshake(tuple.proto) && tuple.tcp_flags & TCP_SYN == 0 {
        let live = if I::F::OUT_OF_LINE {
            established_call(ctx, eth, ip, tuple)?
        } else {
            established(ctx, eth, ip, tuple)?
        };
        if let Some(action) = live {
            return Ok(action);
        }
    }
    if I::F::OUT_OF_LINE {
        // The packet and its tuple are in PACKET6 for the next program.
        return Ok(to_program::<{ xdp_programs::IPV6_FRONTEND }>(ctx));
    }
    if PROTOCOL != proto::TCP {
        let look = datagram_look::<PROTOCOL, _>(tuple, now_ns());
        if let Look::Hit(slot) = look {
            return served_from_slot(ctx, eth, ip, tuple, slot);
        }
        return to_frontend(ctx, eth, ip, tuple, ClientKey::LookedUp, look);
    }
    // `lb_xdp` starts flows only without looking the client's key up; lb_xdp_lookup takes the
    // rest (see starts_unlooked).
    if !starts_unlooked(tuple) {
        return Ok(to_program::<{ xdp_programs::LOOKUP }>(ctx));
    }
    to_frontend(ctx, eth, ip, tuple, ClientKey::Unlooked, Look::Passed)
}

/// The stages of [`serve`] as BPF-to-BPF calls, each with a stack frame of its own (see
/// [`Family::OUT_OF_LINE`]).
#[inline(never)]
fn snat_reply_call<I: Ip>(
    ctx: &XdpContext,
    tuple: &Tuple<I::F>,
    ip: &I,
) -> Result<Option<u32>, Event> {
    snat_reply(ctx, tuple, ip)
}

#[inline(never)]
fn established_call<I: Ip>(
    ctx: &XdpContext,
    eth: &[u8; ETH_HDR_LEN],
    ip: &I,
    tuple: &Tuple<I::F>,
) -> Result<Option<u32>, Event> {
    established(ctx, eth, ip, tuple)
}

/// A packet to a frontend that no live flow took: a new flow (or the REJECT answer when the
/// service has no endpoint), or untouched when it is no frontend's. A try with the client's
/// key `Unlooked` that fails (the key held, or no flow to make) goes to `lb_xdp_lookup`,
/// which looks the key up and answers for the packet.
#[inline(always)]
fn to_frontend<I: Ip>(
    ctx: &XdpContext,
    eth: &[u8; ETH_HDR_LEN],
    ip: &I,
    tuple: &Tuple<I::F>,
    client_key: ClientKey,
    look: SlotLook<I::F>,
) -> Result<u32, Event> {
    let Some(frontend) = admit(ctx, eth, ip, tuple)? else {
        // The frontend filter may have the bit of a DSR SYN's endpoint set for a frontend of
        // its own: the SYN ends here instead of where `serve` looks for the option.
        if size_of::<Addr<I>>() == 4
            && tuple.proto == proto::TCP
            && dsr::carries_option(ctx, ip.l4_offset())
        {
            return Ok(to_program::<{ xdp_programs::DSR }>(ctx));
        }
        return Ok(xdp_action::XDP_PASS);
    };
    if size_of::<Addr<I>>() == 4
        && goes_direct::<I::F>(frontend.service.flags, tuple.proto)
        && dsr::starts_direct(ctx)
    {
        return Ok(to_program::<{ xdp_programs::DIRECT_RETURN }>(ctx));
    }
    match destination(
        ctx,
        ip,
        tuple,
        frontend,
        &arrival(ctx, eth),
        Start {
            client_key,
            direct_return: false,
        },
        look,
    ) {
        Ok(destination) => deliver(ctx, ip, tuple, &destination),
        Err(_) if client_key == ClientKey::Unlooked => {
            Ok(to_program::<{ xdp_programs::LOOKUP }>(ctx))
        }
        Err(event) => refused(ctx, ip, tuple, frontend.service.service_id, event),
    }
}

/// `lb_xdp_direct`'s work: an IPv4 TCP SYN that may start a flow by direct server return
/// ([`dsr::starts_direct`]: not a fragment, no IP options) to a frontend of a Service with it
/// (the frontend `lb_xdp`'s lookup found and admitted in this run), handed over by `lb_xdp` or
/// `lb_xdp_lookup` so that they walk none of DSR's new-flow code (carried through their paths
/// it made `lb_xdp`'s verifier walk 936,154 instructions instead of about 380,000). Its flow is
/// looked up (a retransmitted SYN follows its flow), else made: by DSR when its endpoint is on
/// another node ([`flow::goes_direct`]); then sent on ([`deliver_syn`]).
#[inline(always)]
fn try_direct_return(ctx: &XdpContext) -> Result<u32, Event> {
    let Some(HandedOn { eth, ip, tuple }) = tcp_handed_on(ctx)? else {
        return Ok(xdp_action::XDP_PASS);
    };
    let frontend = frontend_of_this_run().ok_or(Event::DROP_MALFORMED)?;
    match destination(
        ctx,
        &ip,
        &tuple,
        frontend,
        &arrival(ctx, eth),
        Start {
            client_key: ClientKey::LookedUp,
            direct_return: endpoints_node_admits(frontend, &tuple),
        },
        Look::Passed,
    ) {
        Ok(destination) => deliver_syn(ctx, &ip, &tuple, &destination),
        Err(event) => refused(ctx, &ip, &tuple, frontend.service.service_id, event),
    }
}

/// Whether the endpoint's node would take this SYN's DSR option (`try_accept_direct_return`):
/// it refuses options on SYNs from nodes' addresses, and a NodePort's on an address that is no
/// node's (this node serves its NodePorts on its fallback addresses too, when its Node object
/// lists none, or before the agent has written the Nodes' addresses). Such a flow goes by SNAT.
#[inline(always)]
fn endpoints_node_admits(frontend: &Frontend, tuple: &Tuple) -> bool {
    !is_node(tuple.saddr)
        && (frontend.service.flags & service_flags::NODE_PORT == 0 || is_node(tuple.daddr))
}

/// The frontend a packet is for, if the packet may go to it: not for another host, and from a
/// client inside the service's loadBalancerSourceRanges. None: no frontend's, it passes.
#[inline(always)]
fn admit<I: Ip>(
    ctx: &XdpContext,
    eth: &[u8; ETH_HDR_LEN],
    ip: &I,
    tuple: &Tuple<I::F>,
) -> Result<Option<&'static Frontend>, Event> {
    let Some(frontend) = lookup_frontend(tuple) else {
        return Ok(None);
    };
    let service = &frontend.service;
    refuse_sctp_fragment(tuple, ip)?;
    if not_sent_to_this_nic(ctx, eth) {
        count_event(Event::PASS_OTHER_HOST);
        return Ok(None);
    }
    if service.flags & service_flags::SOURCE_RANGES != 0
        && !source_allowed::<I::F>(service.service_id, tuple.saddr)
    {
        return outside_source_ranges(ctx, tuple);
    }
    Ok(Some(frontend))
}

/// A packet from outside its frontend's source ranges is dropped, unless it answers a
/// connection of the node's own ([`continues_node_connection`]): a LoadBalancer IP or
/// externalIP that is the node's address shares its ports with the node's connections, and
/// the ranges are the Service's, not the node's. Asked only of what would be dropped.
#[inline(always)]
fn outside_source_ranges<F: Family>(
    ctx: &XdpContext,
    tuple: &Tuple<F>,
) -> Result<Option<&'static Frontend>, Event> {
    if continues_node_connection(ctx, tuple) {
        count_event(Event::PASS_NODE_CONNECTION);
        return Ok(None);
    }
    Err(Event::DROP_SOURCE_RANGE)
}

/// A packet for which no destination was found (`event` says why): the REJECT answer for a
/// service without endpoints, the stack for one whose TTL runs out, else the drop.
#[inline(always)]
fn refused<I: Ip>(
    ctx: &XdpContext,
    ip: &I,
    tuple: &Tuple<I::F>,
    service_id: u32,
    event: Event,
) -> Result<u32, Event> {
    match event {
        Event::DROP_NO_BACKEND => {
            let action = ip.reject(ctx, tuple)?;
            let reason = if tuple.proto == proto::TCP {
                Event::REJECT_TCP_RST
            } else {
                Event::REJECT_ICMP
            };
            monitor::xdp_reject(ctx, tuple, reason, service_id);
            Ok(action)
        }
        Event::PASS_TTL_EXCEEDED => {
            // The stack answers it (time exceeded), untranslated and without taking a port.
            count_event(Event::PASS_TTL_EXCEEDED);
            Ok(xdp_action::XDP_PASS)
        }
        Event::PASS_NODE_CONNECTION => {
            count_event(Event::PASS_NODE_CONNECTION);
            Ok(xdp_action::XDP_PASS)
        }
        event => Err(event),
    }
}

/// The IPv6 pipeline after `lb_xdp6`: a packet to a frontend that no live flow took
/// (`lb_xdp6_frontend`), a new flow (`lb_xdp6_flow`) and the rewrite that sends it on
/// (`lb_xdp6_deliver`), each a program reached by a tail call with a stack of its own, the
/// packet's state handed on in [`PACKET6`]. One inlined program would need more than the 512
/// bytes of stack the verifier allows (IPv6's addresses are four registers each, spilled around
/// every helper call); IPv4 does all of it in its one program.
#[inline(always)]
fn try_frontend6(ctx: &XdpContext) -> Result<u32, Event> {
    let packet = packet6()?;
    let eth = bytes_at::<ETH_HDR_LEN>(ctx, 0).ok_or(Event::DROP_MALFORMED)?;
    match frontend6(ctx, eth, &packet.ip, &packet.tuple)? {
        Frontend6::Sent(action) => Ok(action),
        Frontend6::NewFlow(start) => Ok(start.hand_on(ctx, packet)),
    }
}

/// The common case of IPv6, in one program as IPv4 has it: a `PROTOCOL` header right after the
/// fixed header, to a frontend the filter has and not to a SNAT port (`lb_xdp` checked both,
/// [`ipv6_program`]). A live flow's packet, or one to a frontend that no live flow took, is
/// served here without the BPF-to-BPF calls and the tail call of `lb_xdp6`'s stages (nothing
/// here needs its extension-header walk or SNAT-answer path); a new flow goes on to
/// `lb_xdp6_flow`. The header and tuple stay on the stack and go to [`PACKET6`], where
/// `lb_xdp6_flow` reads them, only for a new flow: written there for every packet, they cost
/// the live paths a tenth of their own time (perf). The frame is then 344-368 bytes (TCP, UDP,
/// SCTP), which the verifier rounds to 384: with the drop report's call (104, rounded to 128)
/// the SCTP instance takes all of its 512, and a change that grows the frame must move
/// something to `PACKET6` again (the verifier says so when the programs load).
#[inline(always)]
fn try_direct6<const PROTOCOL: u8>(ctx: &XdpContext) -> Result<u32, Event> {
    let eth = bytes_at::<ETH_HDR_LEN>(ctx, 0).ok_or(Event::DROP_MALFORMED)?;
    let Some(ip) = ipv6_fixed_header(ctx).ok_or(Event::DROP_MALFORMED)? else {
        return Ok(xdp_action::XDP_PASS);
    };
    if ip.proto != PROTOCOL {
        // Not what `lb_xdp` hands here: a program array slot out of step with this object.
        return Ok(xdp_action::XDP_PASS);
    }
    let tuple = transport_tuple(ctx, &ip, PROTOCOL)?;
    if proto::has_handshake(PROTOCOL)
        && tuple.tcp_flags & TCP_SYN == 0
        && let Some(action) = established(ctx, eth, &ip, &tuple)?
    {
        return Ok(action);
    }
    match frontend6(ctx, eth, &ip, &tuple)? {
        Frontend6::Sent(action) => Ok(action),
        Frontend6::NewFlow(start) => {
            let packet = packet6()?;
            packet.ip = ip;
            packet.tuple = tuple;
            Ok(start.hand_on(ctx, packet))
        }
    }
}

/// What the frontend stage of IPv6 did with a packet: sent it on (or dropped or passed it), or
/// found it starts a flow.
enum Frontend6 {
    Sent(u32),
    NewFlow(FlowStart),
}

/// What `lb_xdp6_flow` needs beside the packet's header and tuple to make a new flow.
struct FlowStart {
    frontend: &'static Frontend,
    arrival: Arrival,
    now: u64,
    key_holder: Holder,
}

impl FlowStart {
    /// Hands the new flow to `lb_xdp6_flow` through `packet` (whose header and tuple are this
    /// packet's).
    #[inline(always)]
    fn hand_on(self, ctx: &XdpContext, packet: &mut Packet6) -> u32 {
        packet.frontend = *self.frontend;
        packet.arrival = self.arrival;
        packet.now = self.now;
        packet.key_holder = self.key_holder;
        to_program::<{ xdp_programs::IPV6_FLOW }>(ctx)
    }
}

/// An IPv6 packet to a frontend that no live flow took (see [`try_frontend6`]): a packet of a
/// live flow after all (UDP, or a SYN that restarts nothing), the REJECT answer, untouched when
/// it is no frontend's, or a new flow.
#[inline(always)]
fn frontend6(
    ctx: &XdpContext,
    eth: &[u8; ETH_HDR_LEN],
    ip: &Ipv6Info,
    tuple: &Tuple<V6>,
) -> Result<Frontend6, Event> {
    let now = now_ns();
    let look = if tuple.proto == proto::UDP {
        flow_cache::datagram_hit(tuple, now)
    } else {
        Look::Passed
    };
    if let Look::Hit(slot) = look {
        return served_from_slot(ctx, eth, ip, tuple, slot).map(Frontend6::Sent);
    }
    let Some(frontend) = admit(ctx, eth, ip, tuple)? else {
        return Ok(Frontend6::Sent(xdp_action::XDP_PASS));
    };
    let arrival = arrival(ctx, eth);
    match live_destination(ctx, ip, tuple, &arrival, now, client_key6(tuple), look) {
        Ok(Ok(destination)) => deliver(ctx, ip, tuple, &destination).map(Frontend6::Sent),
        Ok(Err(key_holder)) => Ok(Frontend6::NewFlow(FlowStart {
            frontend,
            arrival,
            now,
            key_holder,
        })),
        Err(event) => {
            refused(ctx, ip, tuple, frontend.service.service_id, event).map(Frontend6::Sent)
        }
    }
}

/// A new IPv6 flow (see [`try_frontend6`]).
#[inline(always)]
fn try_new_flow6(ctx: &XdpContext) -> Result<u32, Event> {
    let packet = packet6()?;
    if continues_node_connection(ctx, &packet.tuple) {
        return refused(
            ctx,
            &packet.ip,
            &packet.tuple,
            packet.frontend.service.service_id,
            Event::PASS_NODE_CONNECTION,
        );
    }
    let request = NewFlow {
        tuple: &packet.tuple,
        frontend: &packet.frontend,
        arrival: &packet.arrival,
        may_forward: packet.ip.may_forward(),
        direct_return: false,
        now: packet.now,
        key_holder: packet.key_holder,
        client_key: ClientKey::Recorded6,
    };
    packet.reject = false;
    match new_flow(&request) {
        Ok(destination) => packet.destination = destination,
        // Back to the frontend stage, which looks the client's key up.
        Err(_) if request.client_key.unlooked(&packet.tuple) => {
            look_up_on_retry();
            return Ok(to_program::<{ xdp_programs::IPV6_FRONTEND }>(ctx));
        }
        // The answer, like the report, is the next program's: this one has no stack left.
        Err(Event::DROP_NO_BACKEND) => packet.reject = true,
        Err(event) => {
            return refused(
                ctx,
                &packet.ip,
                &packet.tuple,
                packet.frontend.service.service_id,
                event,
            );
        }
    }
    Ok(to_program::<{ xdp_programs::IPV6_DELIVER }>(ctx))
}

/// A new IPv6 flow's first packet sent on and reported, or the REJECT answer for a service
/// without endpoints (see [`try_frontend6`]).
#[inline(always)]
fn try_deliver6(ctx: &XdpContext) -> Result<u32, Event> {
    let packet = packet6()?;
    let (ip, tuple) = (&packet.ip, &packet.tuple);
    if packet.reject {
        return refused(
            ctx,
            ip,
            tuple,
            packet.frontend.service.service_id,
            Event::DROP_NO_BACKEND,
        );
    }
    monitor::new_flow(tuple, &packet.destination, packet.arrival.ifindex);
    deliver(ctx, ip, tuple, &packet.destination)
}

/// This CPU's [`PACKET6`] entry, which `lb_xdp6` filled for the programs it hands on to.
#[inline(always)]
fn packet6() -> Result<&'static mut Packet6, Event> {
    let packet = PACKET6.get_ptr_mut(0).ok_or(Event::DROP_MALFORMED)?;
    // SAFETY: this CPU's own entry; a program run and the tail calls it makes run on one CPU
    // to their end, so nothing else uses it meanwhile.
    Ok(unsafe { &mut *packet })
}

/// The first fragment of an SCTP packet of a service flow: refused before it creates or moves
/// any state, as its ports cannot be rewritten (see [`rewrite`]).
#[inline(always)]
fn refuse_sctp_fragment<I: Ip>(tuple: &Tuple<I::F>, ip: &I) -> Result<(), Event> {
    if tuple.proto == proto::SCTP && ip.first_fragment() {
        return Err(Event::DROP_SCTP_FRAGMENT);
    }
    Ok(())
}

/// Hands a packet to the program of its protocol (`SLOT` of [`XDP_PROGRAMS`]); passes it
/// untouched (counted) when that is not there.
#[inline(always)]
fn to_program<const SLOT: u32>(ctx: &XdpContext) -> u32 {
    // SAFETY: the slot holds an XDP program of this object (the agent puts it there), which
    // takes the same context; on success control never comes back.
    unsafe { tail_call::<SLOT, _>(ctx, &XDP_PROGRAMS) };
    count_event(Event::PASS_PROTOCOL_UNSERVED);
    xdp_action::XDP_PASS
}

/// A TCP segment other than a SYN (an SCTP packet other than an INIT) of a live flow, to a
/// destination the frontend filter still has, goes where its flow goes without a look at the
/// frontend entry (the dearest lookup left on this path): an established connection keeps its
/// backend until it ends, also when its Service's endpoints change. The check that admitted it
/// still holds: a flow admitted by loadBalancerSourceRanges is dropped once its client is
/// outside them. None: not a live flow's (or it must start over), for the frontend path.
#[inline(always)]
fn established<I: Ip>(
    ctx: &XdpContext,
    eth: &[u8; ETH_HDR_LEN],
    ip: &I,
    tuple: &Tuple<I::F>,
) -> Result<Option<u32>, Event> {
    let now = now_ns();
    let look = flow_cache::hit(tuple, now);
    if let Look::Hit(slot) = look {
        return served_from_slot(ctx, eth, ip, tuple, slot).map(Some);
    }
    let Some(flow) = live_flow(tuple, now) else {
        return Ok(None);
    };
    refuse_sctp_fragment(tuple, ip)?;
    if let Some(action) = turned_away(ctx, eth, tuple, admitted_by_source_ranges(flow))? {
        return Ok(Some(action));
    }
    match follow(ctx, ip, tuple, flow, || arrival(ctx, eth), now)? {
        Some(destination) => {
            // SAFETY: as in flow::live_flow.
            let flow = unsafe { &mut *flow };
            // Only a FIN or RST the flow lets through as its client's (not a blind RST, not a
            // bad header; a blind FIN does, at the cost of refilling them) empties its slots, a
            // walk over every CPU that served it.
            if closes(tuple) {
                flow_cache::forget(flow, tuple);
            }
            flow_cache::remember(&look, flow, tuple, &destination, now);
            deliver(ctx, ip, tuple, &destination).map(Some)
        }
        None => Ok(None),
    }
}

/// A client's packet that a slot of this CPU's flow cache serves: sent where the slot says,
/// after the checks the flow must still pass ([`turned_away`]).
#[inline(always)]
fn served_from_slot<I: Ip>(
    ctx: &XdpContext,
    eth: &[u8; ETH_HDR_LEN],
    ip: &I,
    tuple: &Tuple<I::F>,
    slot: &FlowCacheSlot<<I::F as Family>::Addr>,
) -> Result<u32, Event> {
    let source_checked = (slot.flags & ct_flags::SOURCE_CHECKED != 0).then_some(slot.service_id);
    if let Some(action) = turned_away(ctx, eth, tuple, source_checked)? {
        return Ok(action);
    }
    deliver(ctx, ip, tuple, &flow_cache::destination(slot))
}

/// What this CPU's flow cache has for a `PROTOCOL` packet to a frontend, looked before the
/// frontend's lookup: for a UDP datagram, its flow's slot (`flow_cache::datagram_hit`), as a
/// TCP segment of a live flow looks in [`established`]; nothing for the other protocols.
#[inline(always)]
fn datagram_look<const PROTOCOL: u8, F: Family>(tuple: &Tuple<F>, now: u64) -> SlotLook<F> {
    if PROTOCOL == proto::UDP {
        flow_cache::datagram_hit(tuple, now)
    } else {
        Look::Passed
    }
}

/// What becomes of a packet of a live flow that may no longer go where its flow goes: a frame
/// to another host's MAC passes untouched (Some), one from a client outside the source ranges
/// that admitted the flow (`source_checked`: the service whose ranges did) is dropped (Err).
/// None: it goes on.
#[inline(always)]
fn turned_away<F: Family>(
    ctx: &XdpContext,
    eth: &[u8; ETH_HDR_LEN],
    tuple: &Tuple<F>,
    source_checked: Option<u32>,
) -> Result<Option<u32>, Event> {
    if not_sent_to_this_nic(ctx, eth) {
        count_event(Event::PASS_OTHER_HOST);
        return Ok(Some(xdp_action::XDP_PASS));
    }
    if let Some(service_id) = source_checked
        && !source_allowed::<F>(service_id, tuple.saddr)
    {
        return Err(Event::DROP_SOURCE_RANGE);
    }
    Ok(None)
}

/// The frame's MACs and the NIC it came in on.
#[inline(always)]
fn arrival(ctx: &XdpContext, eth: &[u8; ETH_HDR_LEN]) -> Arrival {
    let mut macs = [0u8; 12];
    macs.copy_from_slice(&eth[0..12]);
    let ifindex = ingress_ifindex(ctx);
    Arrival {
        macs,
        nic: client_nic::of(ifindex),
        ifindex,
    }
}

#[inline(always)]
fn ingress_ifindex(ctx: &XdpContext) -> u32 {
    // SAFETY: ctx.ctx is the program's own xdp_md, valid for the whole run.
    unsafe { (*ctx.ctx).ingress_ifindex }
}

/// Rewrites a service packet to its destination, counts it for the service, records a first
/// fragment's translation for the later ones, and sends it on. A packet XDP forwards that is
/// too big for its route and must not be fragmented is answered instead, from the frontend to
/// its client, quoting it as it came ([`crate::too_big`]).
#[inline(always)]
fn deliver<I: Ip>(
    ctx: &XdpContext,
    ip: &I,
    tuple: &Tuple<I::F>,
    destination: &Destination<I::F>,
) -> Result<u32, Event> {
    translate(ctx, ip, tuple, destination)?;
    if !destination.forward {
        return Ok(xdp_action::XDP_PASS);
    }
    let route = I::route(ctx, tuple.proto, destination.source.0, destination.addr);
    if let Forward::TooBig { .. } = route
        && ip.may_forward()
        && ip.answers_too_big()
    {
        return Ok(too_big::PENDING);
    }
    Ok(send_by::<I>(ctx, route))
}

/// [`deliver`]'s rewrite, count and record of a first fragment.
#[inline(always)]
fn translate<I: Ip>(
    ctx: &XdpContext,
    ip: &I,
    tuple: &Tuple<I::F>,
    destination: &Destination<I::F>,
) -> Result<(), Event> {
    let (saddr, sport) = destination.source;
    rewrite(
        ctx,
        tuple,
        ip,
        (saddr, sport),
        (destination.addr, destination.port),
    )?;
    count_service(destination.service_id, 1, frame_len(ctx) as u64, 0);
    if ip.first_fragment() {
        ip.remember_fragments(FragValue {
            saddr,
            daddr: destination.addr,
            action: if destination.forward {
                frag_action::FORWARD
            } else {
                frag_action::PASS
            },
            service_id: destination.service_id,
            ..Default::default()
        });
    }
    Ok(())
}

/// [`deliver`] for `lb_xdp_direct`: a SYN whose flow goes by direct server return (forwarded
/// with the client's own source) gets the DSR option naming its frontend before it leaves.
#[inline(always)]
fn deliver_syn(
    ctx: &XdpContext,
    ip: &Ipv4Info,
    tuple: &Tuple,
    destination: &Destination,
) -> Result<u32, Event> {
    translate(ctx, ip, tuple, destination)?;
    if !destination.forward {
        return Ok(xdp_action::XDP_PASS);
    }
    let (saddr, sport) = destination.source;
    // Read again rather than kept from before the flow's lookup: the program's stack frame
    // has no room left for it under the programs' logging.
    let syn = tuple.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && !ip.first_fragment();
    if syn && (saddr, sport) == (tuple.saddr, tuple.sport) {
        if !dsr::insert_option(ctx, tuple.daddr, tuple.dport) {
            return Err(Event::DROP_MALFORMED);
        }
        count_event(Event::DSR_SENT);
    }
    Ok(forward::<Ipv4Info>(
        ctx,
        tuple.proto,
        saddr,
        destination.addr,
    ))
}

/// An ICMP error (destination unreachable, including fragmentation needed; time exceeded;
/// parameter problem) about a packet of a translated flow goes to the host that sent that packet
/// as it sent it, so that its socket learns of it (path-MTU discovery through a NodePort depends
/// on it): the quoted header and ports, the quoted UDP checksum and the outer addresses are
/// translated, with every checksum updated. The quoted header may carry options: the error is
/// read and written through helpers, at offsets the verifier need not follow. Anything else
/// passes untouched.
#[inline(always)]
fn icmp_error(ctx: &XdpContext, ip: &Ipv4Info) -> Result<u32, Event> {
    let at = ip.l4_offset;
    let mut error = [0u8; ICMP_ERROR_LEN];
    let load_head = |head: &mut [u8; icmp::QUOTED_TRANSPORT]| load_bytes(ctx, at, head);
    let load_transport = |offset, transport: &mut [u8; 8]| load_bytes(ctx, offset, transport);
    let Some(transport_at) = icmp::gather(&mut error, at, load_head, load_transport) else {
        return Ok(xdp_action::XDP_PASS);
    };
    if !quote_within(transport_at, ip.end) {
        return Ok(xdp_action::XDP_PASS);
    }
    let Some(quote) = icmp::quoted(&error) else {
        return Ok(xdp_action::XDP_PASS);
    };
    if frame_not_sent_to_this_nic(ctx) {
        return Ok(xdp_action::XDP_PASS);
    }
    let error = &mut error;
    let write_back = |error: &[u8; ICMP_ERROR_LEN]| write_icmp(ctx, (at, transport_at), error);
    if let Some(flow) = snat_flow_of_quote(ip, &quote) {
        // About a packet this node sent from a SNAT port to a remote backend: to the client,
        // about its packet to the frontend, from the frontend (as Linux NAT translates the outer
        // header of a related error, net/netfilter/nf_nat_proto.c nf_nat_icmp_reply_translation).
        let client = (flow.snat_addr, flow.snat_port);
        let frontend = (flow.nat_addr, flow.nat_port);
        let (node_mac, client_mac) = (flow.node_mac, flow.client_mac);
        icmp::rewrite_quoted(error, &quote, client, frontend);
        write_back(error)?;
        Ipv4Info::readdress(ctx, (ip.saddr, ip.daddr), (frontend.0, client.0))?;
        count_event(Event::ICMP_ERROR_TRANSLATED);
        return Ok(to_client::<Ipv4Info>(
            ctx,
            flow.client_nic,
            node_mac,
            client_mac,
        ));
    }
    // Otherwise it may be about a packet that left from a frontend to a client: its flow's
    // client side is keyed the other way round.
    let ((frontend, frontend_port), (client, client_port)) = (quote.source, quote.destination);
    let flow = Tuple::<V4> {
        saddr: client,
        daddr: frontend,
        sport: client_port,
        dport: frontend_port,
        proto: quote.proto,
        tcp_flags: 0,
        seq: 0,
        seq_end: 0,
    };
    if ip.daddr != frontend {
        return Ok(xdp_action::XDP_PASS);
    }
    let Some(entry) = client_side(&flow) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let backend = (entry.nat_addr, entry.nat_port);
    if entry.flags & ct_flags::SNAT != 0 {
        // The packet came from a remote backend through a SNAT port: the error goes to the
        // backend, about its packet to that port, from this node's SNAT address.
        let snat = (entry.snat_addr, entry.snat_port);
        icmp::rewrite_quoted(error, &quote, backend, snat);
        write_back(error)?;
        Ipv4Info::readdress(ctx, (ip.saddr, ip.daddr), (snat.0, backend.0))?;
        count_event(Event::ICMP_ERROR_TRANSLATED);
        return Ok(forward::<Ipv4Info>(ctx, IPPROTO_ICMP, snat.0, backend.0));
    }
    // The packet came from a local endpoint (tc gave it the frontend's address).
    let to_port = if entry.flags & ct_flags::PORT_REMAP != 0 {
        entry.snat_port
    } else {
        client_port
    };
    icmp::rewrite_quoted(error, &quote, backend, (client, to_port));
    write_back(error)?;
    Ipv4Info::readdress(ctx, (ip.saddr, ip.daddr), (ip.saddr, backend.0))?;
    count_event(Event::ICMP_ERROR_TRANSLATED);
    Ok(xdp_action::XDP_PASS)
}

/// Writes a translated ICMP error back: its header with the quoted header's fixed bytes at
/// `at`, the quoted transport header's first bytes at `transport_at`.
#[inline(always)]
fn write_icmp(
    ctx: &XdpContext,
    (at, transport_at): (usize, usize),
    error: &[u8; ICMP_ERROR_LEN],
) -> Result<(), Event> {
    let (head, transport) = icmp::parts(error).ok_or(Event::DROP_MALFORMED)?;
    store_bytes(ctx, at, head)?;
    store_bytes(ctx, transport_at, transport)
}

/// [`icmp_error`] for ICMPv6 errors (types 1-4: destination unreachable, packet too big, time
/// exceeded, parameter problem), behind extension headers or not, quoting a packet with
/// extension headers or not (a first fragment among them); the ICMPv6 checksum also covers the
/// outer addresses (its pseudo-header). Neighbour discovery and every other ICMPv6 message
/// pass untouched, and so does an error quoting a later fragment (it holds no ports).
///
/// A program of its own (`lb_xdp6_icmp`). Its steps are BPF functions called one after the
/// other, working on a copy of the headers in this CPU's [`PACKET6`] entry (written back to the
/// packet at the end): IPv6's addresses, spilled around every call, take more than the 512
/// bytes of stack with the steps in one frame or nested, and a function given the packet
/// pointers themselves gets them split into `data` and `data_end` by LLVM, which the verifier
/// refuses (pointer arithmetic on `pkt_end`). The error, at an offset only the extension
/// headers say, is read and written through helpers.
#[inline(always)]
fn icmp6_error(ctx: &XdpContext) -> Result<u32, Event> {
    let packet = packet6()?;
    let Some(header) = bytes_at::<IPV6_HDR_LEN>(ctx, ETH_HDR_LEN) else {
        return Ok(xdp_action::XDP_PASS);
    };
    packet.icmp6.header = *header;
    if !gather_icmp6(ctx, packet.ip.l4_offset, &mut packet.icmp6)
        || !quote_within(packet.icmp6.quoted_transport_at, packet.ip.end)
        || frame_not_sent_to_this_nic(ctx)
    {
        return Ok(xdp_action::XDP_PASS);
    }
    if let Some(flow) = snat_flow_of_icmp6(&packet.icmp6)
        && flow.flags & ct_flags::SNAT != 0
    {
        // About a packet this node sent from a SNAT port to a remote backend (a Packet Too Big
        // from a router on the way, most often): to the client, out of the NIC it came in on.
        translate_icmp6(&mut packet.icmp6, flow, Icmp6To::Client)?;
        write_icmp6(ctx, packet.ip.l4_offset, &packet.icmp6)?;
        return Ok(to_client::<Ipv6Info>(
            ctx,
            flow.client_nic,
            flow.node_mac,
            flow.client_mac,
        ));
    }
    let Some(entry) = frontend_flow_of_icmp6(&packet.icmp6) else {
        return Ok(xdp_action::XDP_PASS);
    };
    if entry.flags & ct_flags::SNAT != 0 {
        translate_icmp6(&mut packet.icmp6, entry, Icmp6To::RemoteBackend)?;
        write_icmp6(ctx, packet.ip.l4_offset, &packet.icmp6)?;
        return Ok(forward_icmp6(ctx, entry));
    }
    translate_icmp6(&mut packet.icmp6, entry, Icmp6To::LocalBackend)?;
    write_icmp6(ctx, packet.ip.l4_offset, &packet.icmp6)?;
    Ok(xdp_action::XDP_PASS)
}

/// Copies the ICMPv6 message at `at` into `icmp6` ([`icmp::gather6`]); false when it is no
/// error this datapath translates.
#[inline(never)]
fn gather_icmp6(ctx: &XdpContext, at: usize, icmp6: &mut Icmp6Headers) -> bool {
    let load_head = |head: &mut [u8; icmp::QUOTED6_TRANSPORT]| load_bytes(ctx, at, head);
    let peek = |offset| {
        let mut bytes = [0u8; ipv6::EXT_HDR_PEEK];
        load_bytes(ctx, offset, &mut bytes).then_some(bytes)
    };
    let Some(gathered) = icmp::gather6(&mut icmp6.error, at, load_head, peek) else {
        return false;
    };
    icmp6.quoted_proto = gathered.protocol;
    icmp6.quoted_transport_at = gathered.transport_at;
    true
}

/// Whether the 8 bytes of quoted transport header an ICMP error's translation rewrites (ports,
/// UDP checksum) lie inside the error's IP packet (`end`): read from the frame, bytes past it
/// would be rewritten where the ICMP checksum does not cover them, and the error would leave
/// with a checksum its receiver drops. Such an error passes untouched.
#[inline(always)]
fn quote_within(transport_at: usize, end: usize) -> bool {
    transport_at + 8 <= end
}

/// `N` bytes of the packet at `offset`, through the helper (an offset the verifier need not
/// follow); false past the packet's end.
#[inline(always)]
fn load_bytes<const N: usize>(ctx: &XdpContext, offset: usize, into: &mut [u8; N]) -> bool {
    // SAFETY: the helper writes at most N bytes into `into`, which holds N.
    unsafe { bpf_xdp_load_bytes(ctx.ctx, offset as u32, into.as_mut_ptr().cast(), N as u32) == 0 }
}

/// Writes `N` bytes into the packet at `offset` through the helper.
#[inline(always)]
fn store_bytes<const N: usize>(
    ctx: &XdpContext,
    offset: usize,
    from: &[u8; N],
) -> Result<(), Event> {
    // SAFETY: the helper reads N bytes from `from`, which holds N.
    let stored = unsafe {
        bpf_xdp_store_bytes(
            ctx.ctx,
            offset as u32,
            from.as_ptr().cast_mut().cast(),
            N as u32,
        )
    };
    if stored == 0 {
        Ok(())
    } else {
        Err(Event::DROP_MALFORMED)
    }
}

/// Writes the translated headers back into the packet: the fixed header, the error's header
/// with the quoted fixed header (at `at`, where the ICMPv6 message starts), and the quoted
/// transport header's first bytes.
#[inline(always)]
fn write_icmp6(ctx: &XdpContext, at: usize, icmp6: &Icmp6Headers) -> Result<(), Event> {
    *bytes_at_mut::<IPV6_HDR_LEN>(ctx, ETH_HDR_LEN).ok_or(Event::DROP_MALFORMED)? = icmp6.header;
    let (head, transport) = icmp::parts6(&icmp6.error).ok_or(Event::DROP_MALFORMED)?;
    store_bytes(ctx, at, head)?;
    store_bytes(ctx, icmp6.quoted_transport_at, transport)
}

/// The outer addresses of the copied headers, and what the error quotes (a TCP, UDP or SCTP
/// packet).
#[inline(always)]
fn icmp6_quote(icmp6: &Icmp6Headers) -> Option<((Ipv6Words, Ipv6Words), icmp::Quoted6)> {
    let outer = (
        words(&icmp6.header, IPV6_SADDR_OFFSET),
        words(&icmp6.header, IPV6_DADDR_OFFSET),
    );
    Some((outer, icmp::quoted6(&icmp6.error, icmp6.quoted_proto)?))
}

/// The REPLY entry of the flow whose packet from one of this node's SNAT ports the ICMPv6
/// error to this node's IPv6 SNAT address quotes. Whether it is a SNAT flow's is the caller's
/// to check: a pointer chosen without a branch (LLVM's select of it or None) is pointer
/// arithmetic the verifier refuses.
#[inline(never)]
fn snat_flow_of_icmp6(icmp6: &Icmp6Headers) -> Option<&'static Ct6Value> {
    let (outer, quote) = icmp6_quote(icmp6)?;
    snat_port_entry::<V6>(&outer.1, quote.source, quote.destination, quote.proto)
}

/// The client's entry of the flow whose packet from a frontend to a client the ICMPv6 error to
/// that frontend quotes (the flow's client side is keyed the other way round).
#[inline(never)]
fn frontend_flow_of_icmp6(icmp6: &Icmp6Headers) -> Option<&'static Ct6Value> {
    let (outer, quote) = icmp6_quote(icmp6)?;
    let ((frontend, frontend_port), (client, client_port)) = (quote.source, quote.destination);
    if !V6::same(&outer.1, &frontend) {
        return None;
    }
    let flow = Tuple::<V6> {
        saddr: client,
        daddr: frontend,
        sport: client_port,
        dport: frontend_port,
        proto: quote.proto,
        tcp_flags: 0,
        seq: 0,
        seq_end: 0,
    };
    client_side_entry(&flow)
}

/// Sends a translated ICMPv6 error on to the remote backend of `entry`'s flow.
#[inline(never)]
fn forward_icmp6(ctx: &XdpContext, entry: &Ct6Value) -> u32 {
    forward::<Ipv6Info>(ctx, IPPROTO_ICMPV6, entry.snat_addr, entry.nat_addr)
}

/// Who a translated ICMPv6 error goes to, by the flow's entry.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Icmp6To {
    /// The client (the entry: a SNAT flow's REPLY): about its packet to the frontend, from the
    /// frontend.
    Client,
    /// A remote backend (the entry: the client's): about its packet to the SNAT port, from this
    /// node's SNAT address.
    RemoteBackend,
    /// A local endpoint (the entry: the client's; tc gave its packet the frontend's address):
    /// about its packet to the client, the outer source kept.
    LocalBackend,
}

/// Rewrites the copied ICMPv6 error for `to`, by `entry`: the quoted addresses and ports, a
/// quoted UDP checksum, the outer addresses, and the ICMPv6 checksum, whose pseudo-header holds
/// the outer addresses.
#[inline(never)]
fn translate_icmp6(icmp6: &mut Icmp6Headers, entry: &Ct6Value, to: Icmp6To) -> Result<(), Event> {
    let (outer, quote) = icmp6_quote(icmp6).ok_or(Event::DROP_MALFORMED)?;
    let backend = (entry.nat_addr, entry.nat_port);
    let (quoted, new_outer) = match to {
        Icmp6To::Client => {
            let client = (entry.snat_addr, entry.snat_port);
            ((client, backend), (backend.0, client.0))
        }
        Icmp6To::RemoteBackend => {
            let snat = (entry.snat_addr, entry.snat_port);
            ((backend, snat), (snat.0, backend.0))
        }
        Icmp6To::LocalBackend => {
            let (client, client_port) = quote.destination;
            let to_port = if entry.flags & ct_flags::PORT_REMAP != 0 {
                entry.snat_port
            } else {
                client_port
            };
            ((backend, (client, to_port)), (outer.0, backend.0))
        }
    };
    let error = &mut icmp6.error;
    icmp::rewrite_quoted6(error, &quote, quoted.0, quoted.1, (outer.0, new_outer.0));
    let check = u16::from_be_bytes([error[2], error[3]]);
    let check = checksum::replace_ipv6(check, &outer.1, &new_outer.1);
    error[2..4].copy_from_slice(&check.to_be_bytes());
    icmp6.header[IPV6_SADDR_OFFSET..IPV6_SADDR_OFFSET + 16]
        .copy_from_slice(&icmp::bytes_of(&new_outer.0));
    icmp6.header[IPV6_DADDR_OFFSET..IPV6_DADDR_OFFSET + 16]
        .copy_from_slice(&icmp::bytes_of(&new_outer.1));
    count_event(Event::ICMP_ERROR_TRANSLATED);
    Ok(())
}

/// The REPLY entry of the SNAT flow whose packet from one of this node's SNAT ports an ICMP error
/// to this node quotes.
#[inline(always)]
fn snat_flow_of_quote(ip: &Ipv4Info, quote: &icmp::Quoted) -> Option<Ct4Value> {
    let entry = *snat_port_entry::<V4>(&ip.daddr, quote.source, quote.destination, quote.proto)?;
    (entry.flags & ct_flags::SNAT != 0).then_some(entry)
}

/// `lb_xdp_too_big`: an endpoint's answer to a SNAT port, untranslated and too big for the NIC
/// towards its client ([`client_nic_mtu_exceeded`]), answered to the endpoint as it came; else
/// a client's packet, translated and too big for its route, answered as its client sent it.
/// That packet's client and frontend come from its flow's entry: a SNAT flow's REPLY entry (by
/// its SNAT port), or a flow by direct server return's FLOW entry (by its client, which its
/// source still is). No entry: dropped, counted. A route that no longer says "too big" (it
/// changed in between): to the stack, which forwards it. A BPF-to-BPF call per family: inline,
/// both families' frames together left no room for the IPv6 verdict's monitor call.
#[inline(never)]
fn answer_too_big<I: Ip>(ctx: &XdpContext) -> Result<u32, Event> {
    let translated = too_big::translated_endpoints::<I>(ctx).ok_or(Event::DROP_MALFORMED)?;
    let protocol = I::protocol_of_fixed_header(ctx).ok_or(Event::DROP_MALFORMED)?;
    if let Some(mtu) = client_nic_mtu_exceeded::<I::F>(ctx, &translated, protocol) {
        return too_big::answer_as_it_came::<I>(ctx, &translated, mtu);
    }
    let original = original_endpoints::<I::F>(&translated, protocol).ok_or(Event::DROP_TOO_BIG)?;
    match I::route(ctx, protocol, translated.saddr, translated.daddr) {
        Forward::TooBig { mtu } => {
            too_big::answer::<I>(ctx, (&translated, &original), protocol, mtu)
        }
        _ => Ok(xdp_action::XDP_PASS),
    }
}

/// The MTU of the NIC towards the client when `answer`, an endpoint's answer to a SNAT port
/// (not yet translated), is bigger than that ([`snat_reply`]); None for any other packet.
#[inline(always)]
fn client_nic_mtu_exceeded<F: Family>(
    ctx: &XdpContext,
    answer: &Endpoints<F::Addr>,
    protocol: u8,
) -> Option<u16> {
    let snat_port = (answer.daddr, answer.dport);
    let endpoint = (answer.saddr, answer.sport);
    let entry = snat_port_entry::<F>(&answer.daddr, snat_port, endpoint, protocol)?;
    if entry.flags & ct_flags::SNAT == 0 {
        return None;
    }
    mtu_exceeded(ctx, named_client_nic(entry.client_nic)?)
}

/// The client's and frontend's addresses and ports of the flow a packet XDP forwards
/// (`translated`: as it leaves) belongs to.
#[inline(always)]
fn original_endpoints<F: Family>(
    translated: &Endpoints<F::Addr>,
    protocol: u8,
) -> Option<Endpoints<F::Addr>> {
    let source = (translated.saddr, translated.sport);
    let destination = (translated.daddr, translated.dport);
    if let Some(reply) = snat_port_entry::<F>(&translated.saddr, source, destination, protocol)
        && reply.flags & ct_flags::SNAT != 0
    {
        return Some(Endpoints {
            saddr: reply.snat_addr,
            daddr: reply.nat_addr,
            sport: reply.snat_port,
            dport: reply.nat_port,
        });
    }
    let entry = flow_entry::<F>(translated.saddr, translated.sport, protocol)?;
    // SAFETY: an entry valid for this run (RCU), only read.
    let flow = FlowValue::of(unsafe { &*entry });
    let to_destination = flow.flags & ct_flags::DIRECT_RETURN != 0
        && F::same(&flow.backend_addr, &translated.daddr)
        && flow.backend_port == translated.dport;
    to_destination.then_some(Endpoints {
        saddr: translated.saddr,
        daddr: flow.frontend_addr,
        sport: translated.sport,
        dport: flow.frontend_port,
    })
}

/// The conntrack entry of the answer to a packet an ICMP error to `to` quotes, when that packet
/// left from one of this node's SNAT ports (`source`) to `destination`: the REPLY entry of its
/// flow, if any.
#[inline(always)]
fn snat_port_entry<F: Family>(
    to: &F::Addr,
    source: (F::Addr, u16),
    destination: (F::Addr, u16),
    proto: u8,
) -> Option<&'static CtValue<F::Addr>> {
    let config = config()?;
    let node = F::snat_addr()?;
    let (snat_addr, snat_port) = source;
    if !F::same(to, &node)
        || !F::same(&snat_addr, &node)
        || snat_port < config.snat_port_min
        || snat_port > config.snat_port_max
    {
        return None;
    }
    let (backend, backend_port) = destination;
    let answer = Tuple::<F> {
        saddr: backend,
        daddr: snat_addr,
        sport: backend_port,
        dport: snat_port,
        proto,
        tcp_flags: 0,
        seq: 0,
        seq_end: 0,
    };
    // SAFETY: an entry that stays valid for this run (RCU), only read.
    unsafe { F::conntrack().get(&reply_key(&answer)) }
}

/// A fragment after the first of its datagram: no ports, so it follows what its first fragment
/// got (same addresses, same way out). Without a record of it (it came first, or it was no
/// service traffic) it goes to the stack as it came.
#[inline(always)]
fn later_fragment<I: Ip>(ctx: &XdpContext, ip: &I, protocol: u8) -> Result<u32, Event> {
    let Some(first) = ip.first_fragments_record() else {
        count_event(Event::PASS_FRAGMENT);
        return Ok(xdp_action::XDP_PASS);
    };
    if frame_not_sent_to_this_nic(ctx) {
        return Ok(xdp_action::XDP_PASS);
    }
    I::readdress(
        ctx,
        (ip.source(), ip.destination()),
        (first.saddr, first.daddr),
    )?;
    count_service(first.service_id, 1, frame_len(ctx) as u64, 0);
    Ok(match first.action {
        frag_action::TRANSMIT => to_client::<I>(ctx, first.client_nic, first.smac, first.dmac),
        frag_action::FORWARD => forward::<I>(ctx, protocol, first.saddr, first.daddr),
        _ => xdp_action::XDP_PASS,
    })
}

/// A reply from a remote backend to one of this node's SNAT ports: back to the client, from the
/// frontend it used, forwarded from here. None for any other packet.
#[inline(always)]
fn snat_reply<I: Ip>(ctx: &XdpContext, tuple: &Tuple<I::F>, ip: &I) -> Result<Option<u32>, Event> {
    let Some(config) = config() else {
        return Ok(None);
    };
    let Some(snat_addr) = I::F::snat_addr() else {
        return Ok(None);
    };
    if !I::F::same(&tuple.daddr, &snat_addr)
        || tuple.dport < config.snat_port_min
        || tuple.dport > config.snat_port_max
    {
        return Ok(None);
    }
    let Some(entry) = I::F::conntrack().get_ptr_mut(&reply_key(tuple)) else {
        return Ok(None);
    };
    // SAFETY: valid for this run (RCU); see flow::destination for races.
    let entry = unsafe { &mut *entry };
    if entry.flags & ct_flags::SNAT == 0 {
        return Ok(None);
    }
    refuse_sctp_fragment(tuple, ip)?;
    let eth = bytes_at::<ETH_HDR_LEN>(ctx, 0).ok_or(Event::DROP_MALFORMED)?;
    if not_sent_to_this_nic(ctx, eth) {
        count_event(Event::PASS_OTHER_HOST);
        return Ok(Some(xdp_action::XDP_PASS));
    }
    // A FIN or RST the stack would drop for its header checksum must not end the flow; other
    // packets with a bad one are translated as they are and dropped by the client's stack.
    if closes(tuple) && !ip.header_ok(ctx) {
        return Err(Event::DROP_IP_CHECKSUM);
    }
    if blind_rst(tuple, entry.seq_next, || {
        client_record_of_reply(entry, tuple)
    }) {
        return Err(Event::DROP_RST_OUT_OF_WINDOW);
    }
    let way = way_to_client(ctx, entry.client_nic, &entry.node_mac);
    if way == WayToClient::TooBig && ip.may_forward() && ip.answers_too_big() {
        return Ok(Some(too_big::PENDING));
    }
    if !dry_run() && !blind_fin(tuple, entry.seq_next) {
        track_reply(entry, tuple, true);
    }
    let (client_addr, client_port) = (entry.snat_addr, entry.snat_port);
    let (frontend_addr, frontend_port) = (entry.nat_addr, entry.nat_port);
    let (client_mac, node_mac, client_nic) = (entry.client_mac, entry.node_mac, entry.client_nic);
    let service_id = entry.service_id;
    rewrite(
        ctx,
        tuple,
        ip,
        (frontend_addr, frontend_port),
        (client_addr, client_port),
    )?;
    count_service(service_id, 1, frame_len(ctx) as u64, 0);
    if ip.first_fragment() {
        ip.remember_fragments(FragValue {
            saddr: frontend_addr,
            daddr: client_addr,
            smac: node_mac,
            dmac: client_mac,
            action: frag_action::TRANSMIT,
            _pad: 0,
            client_nic,
            service_id,
            // Stamped by the write.
            recorded_at: 0,
        });
    }
    // Back the way the flow came in: no route or neighbour lookup needed.
    Ok(Some(send_to_client::<I>(ctx, way, node_mac, client_mac)))
}

/// Sends a translated answer to the client of a SNAT flow back out of the NIC the client's
/// packets come in on (`client_nic`), with the MACs they came with ([`way_to_client`]).
#[inline(always)]
fn to_client<I: Ip>(ctx: &XdpContext, client_nic: u16, smac: [u8; 6], dmac: [u8; 6]) -> u32 {
    send_to_client::<I>(ctx, way_to_client(ctx, client_nic, &smac), smac, dmac)
}

/// How an answer leaves for its client ([`way_to_client`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum WayToClient {
    /// Back out of the NIC it came in on (XDP_TX).
    Back,
    /// Out of the client's NIC, another one (XDP_REDIRECT).
    Redirect(u32),
    /// The client's NIC is another one, and the packet is bigger than its MTU.
    TooBig,
    /// The client's NIC is another one, which the datapath cannot name (XDP_PASS: the stack
    /// routes the translated packet).
    Unknown,
}

/// XDP_TX when the client's NIC is the one the packet arrived on (one NIC for clients and
/// nodes), XDP_REDIRECT to the client's NIC otherwise, unless the packet is bigger than that
/// NIC's MTU ([`mtu_exceeded`]). When the datapath cannot name the client's NIC by its tag (an
/// entry written before it was recorded, or two NICs whose ifindexes share a slot, which the
/// agent leaves empty), the MAC the client's frames were sent to (`node_mac`) tells whether it
/// is this one: the frame's own destination, back out of this NIC; another NIC's, to the stack.
#[inline(always)]
fn way_to_client(ctx: &XdpContext, client_nic: u16, node_mac: &[u8; 6]) -> WayToClient {
    match named_client_nic(client_nic) {
        Some(ifindex) if ifindex == ingress_ifindex(ctx) => WayToClient::Back,
        Some(ifindex) if mtu_exceeded(ctx, ifindex).is_some() => WayToClient::TooBig,
        Some(ifindex) => WayToClient::Redirect(ifindex),
        None if bytes_at::<6>(ctx, 0).is_some_and(|destination| destination == node_mac) => {
            WayToClient::Back
        }
        None => WayToClient::Unknown,
    }
}

/// The ifindex of the NIC a flow's client tag names ([`client_nic`]); None for no tag, or a
/// slot two NICs share (the agent leaves it empty).
#[inline(always)]
fn named_client_nic(tag: u16) -> Option<u32> {
    let nic = NIC_MACS.get(client_nic::slot(tag)?)?;
    (nic.ifindex != 0).then_some(nic.ifindex)
}

/// Sends a translated answer the [`way_to_client`] found, with these MACs. One too big for
/// the client's NIC goes to the stack, which fragments an IPv4 packet without DF (an answer
/// that must not be fragmented is answered before it is translated, [`snat_reply`]; a fragment
/// or an IPv6 packet with extension headers the stack cannot send on either: a limit).
#[inline(always)]
fn send_to_client<I: Ip>(ctx: &XdpContext, way: WayToClient, smac: [u8; 6], dmac: [u8; 6]) -> u32 {
    match way {
        WayToClient::Back => transmit::<I>(ctx, smac, dmac),
        WayToClient::Redirect(ifindex) => redirect::<I>(ctx, ifindex, smac, dmac),
        WayToClient::TooBig | WayToClient::Unknown => xdp_action::XDP_PASS,
    }
}

/// [`not_sent_to_this_nic`] for the paths that have not read the Ethernet header (ICMP errors, later
/// fragments), counted as it is where it passes a frame.
#[inline(always)]
fn frame_not_sent_to_this_nic(ctx: &XdpContext) -> bool {
    let other = bytes_at::<ETH_HDR_LEN>(ctx, 0).is_some_and(|eth| not_sent_to_this_nic(ctx, eth));
    if other {
        count_event(Event::PASS_OTHER_HOST);
    }
    other
}

/// A frame not sent to the NIC's own MAC: not this node's to translate. A unicast frame to
/// another MAC (the NIC is in promiscuous mode, e.g. on a bridge or a mirror port) the stack
/// drops (PACKET_OTHERHOST, net/ipv4/ip_input.c ip_rcv_core). A frame to a group MAC (broadcast
/// or multicast) carrying a unicast packet for a frontend or a SNAT port the stack never
/// forwards (net/ipv4/ip_forward.c and net/ipv6/ip6_output.c, ip6_forward: `pkt_type !=
/// PACKET_HOST`), nor answers with an ICMP error (RFC 1122 section 3.2.2); forwarded from here,
/// its flow would record the group MAC as the node's, and its answers would carry it as their
/// source. A NIC the agent recorded no MAC for (or whose slot another NIC took) is not checked
/// for unicast frames.
#[inline(always)]
fn not_sent_to_this_nic(ctx: &XdpContext, eth: &[u8; ETH_HDR_LEN]) -> bool {
    if eth[0] & 1 != 0 {
        return true;
    }
    let ifindex = ingress_ifindex(ctx);
    match NIC_MACS.get(ifindex % limits::NIC_SLOTS) {
        Some(nic) if nic.ifindex == ifindex => nic.mac != eth[0..6],
        _ => false,
    }
}

/// Sends a rewritten packet on from XDP with the MACs the FIB gives and the TTL decremented, as
/// a router would: out of the NIC it came in on (XDP_TX), or out of another NIC XDP serves
/// (XDP_REDIRECT). Anything else (a NIC XDP does not serve, no neighbour entry yet, bigger than
/// the egress MTU where [`deliver`] has not answered it, TTL running out) goes to the stack,
/// which forwards (or fragments) the already translated
/// packet (and resolves the neighbour for the next one). Its source is now this node's own
/// address, which the stack only accepts on a NIC with accept_local=1
/// (net/ipv4/fib_frontend.c, __fib_validate_source): the agent sets that on the NICs it
/// attaches to.
#[inline(always)]
fn forward<I: Ip>(ctx: &XdpContext, protocol: u8, saddr: Addr<I>, daddr: Addr<I>) -> u32 {
    send_by::<I>(ctx, I::route(ctx, protocol, saddr, daddr))
}

/// [`forward`] by a route already looked up.
#[inline(always)]
fn send_by<I: Ip>(ctx: &XdpContext, route: Forward) -> u32 {
    match route {
        Forward::SameInterface { smac, dmac } => transmit::<I>(ctx, smac, dmac),
        Forward::OtherInterface {
            ifindex,
            smac,
            dmac,
        } => redirect::<I>(ctx, ifindex, smac, dmac),
        Forward::TooBig { .. } | Forward::Stack => xdp_action::XDP_PASS,
    }
}

/// Sends the packet out of another NIC XDP serves (XDP_REDIRECT through the `TX_PORTS` device
/// map, which the kernel sends in bulk) with these MACs and the TTL decremented; to the stack,
/// untouched, when XDP does not serve that NIC or the TTL runs out.
#[inline(always)]
fn redirect<I: Ip>(ctx: &XdpContext, ifindex: u32, smac: [u8; 6], dmac: [u8; 6]) -> u32 {
    if TX_PORTS.get_ifindex(ifindex).is_none() || !I::decrement_hop_limit(ctx) {
        return xdp_action::XDP_PASS;
    }
    let Some(eth) = bytes_at_mut::<ETH_HDR_LEN>(ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    eth[0..6].copy_from_slice(&dmac);
    eth[6..12].copy_from_slice(&smac);
    // The port was there a moment ago; if the NIC went since, the frame goes to the stack,
    // which drops it (its MACs are the next hop's now).
    TX_PORTS
        .redirect(ifindex, u64::from(xdp_action::XDP_PASS))
        .unwrap_or_else(|action| action)
}

/// Sends the packet back out of its interface (XDP_TX) with these MACs and the TTL decremented;
/// to the stack instead when the TTL runs out (it answers with ICMP time exceeded).
#[inline(always)]
fn transmit<I: Ip>(ctx: &XdpContext, smac: [u8; 6], dmac: [u8; 6]) -> u32 {
    if !I::decrement_hop_limit(ctx) {
        return xdp_action::XDP_PASS;
    }
    let Some(eth) = bytes_at_mut::<ETH_HDR_LEN>(ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    eth[0..6].copy_from_slice(&dmac);
    eth[6..12].copy_from_slice(&smac);
    xdp_action::XDP_TX
}

/// Ports (and TCP flags) of a TCP, UDP or SCTP packet whose transport header must be there in
/// full, with lengths the stack would accept (tcp_v4_rcv: a data offset of 5 words at least,
/// inside the packet; __udp4_lib_rcv: a UDP length from 8 bytes to the end of the packet;
/// sctp_rcv: the common header and a chunk header). An SCTP packet's flags are those its first
/// chunk stands for ([`sctp::flags_of_chunk`]).
#[inline(always)]
fn transport_tuple<I: Ip>(ctx: &XdpContext, ip: &I, protocol: u8) -> Result<Tuple<I::F>, Event> {
    let l4_offset = ip.l4_offset();
    let l4_len = ip.end().saturating_sub(l4_offset);
    let (ports, tcp_flags, seq, seq_end) = if protocol == proto::TCP {
        let tcp = bytes_at::<TCP_MIN_HDR_LEN>(ctx, l4_offset).ok_or(Event::DROP_MALFORMED)?;
        let header_len = usize::from(tcp[TCP_DATA_OFFSET_OFFSET] >> 4) * 4;
        if header_len < TCP_MIN_HDR_LEN || header_len > l4_len {
            return Err(Event::DROP_MALFORMED);
        }
        let flags = tcp[TCP_FLAGS_OFFSET];
        // SYN with FIN or RST opens and ends a connection at once: Linux's conntrack holds it
        // INVALID (nf_conntrack_proto_tcp.c, tcp_valid_flags) and kube-proxy's rules drop it;
        // here it would start a flow in its closing state, SNAT port and all.
        if opens_and_closes(&tcp[TCP_FLAGS_OFFSET]) {
            return Err(Event::DROP_MALFORMED);
        }
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        let seq_end = tcp_seq::segment_end(
            seq,
            (l4_len - header_len) as u32,
            flags & TCP_SYN != 0,
            flags & TCP_FIN != 0,
        );
        ([tcp[0], tcp[1], tcp[2], tcp[3]], flags, seq, seq_end)
    } else if protocol == proto::SCTP {
        // The common header and the first chunk's header; a packet carries one chunk at least.
        if l4_len < sctp::HDR_AND_CHUNK_LEN {
            return Err(Event::DROP_MALFORMED);
        }
        let sctp =
            bytes_at::<{ sctp::HDR_AND_CHUNK_LEN }>(ctx, l4_offset).ok_or(Event::DROP_MALFORMED)?;
        let chunk = sctp::COMMON_HDR_LEN;
        let flags = sctp::flags_of_chunk(sctp[chunk]);
        let tag = u32::from_be_bytes([sctp[4], sctp[5], sctp[6], sctp[7]]);
        let summary = sctp::chunk_summary(sctp[chunk], sctp[chunk + 1]);
        ([sctp[0], sctp[1], sctp[2], sctp[3]], flags, tag, summary)
    } else {
        let udp = bytes_at::<UDP_HDR_LEN>(ctx, l4_offset).ok_or(Event::DROP_MALFORMED)?;
        // A first fragment holds the start of a datagram its length covers in full, but its
        // header within the IP packet: bytes past the packet's end (Ethernet padding, or
        // whatever a sender puts there) are no header, whatever the frame holds.
        let length = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
        if l4_len < UDP_HDR_LEN || length < UDP_HDR_LEN || (length > l4_len && !ip.first_fragment())
        {
            return Err(Event::DROP_MALFORMED);
        }
        // No checksum is no UDP datagram over IPv6 (RFC 8200 section 8.1): the stack drops it.
        if I::UDP_CHECKSUM_REQUIRED && udp[UDP_CSUM_OFFSET] | udp[UDP_CSUM_OFFSET + 1] == 0 {
            return Err(Event::DROP_MALFORMED);
        }
        ([udp[0], udp[1], udp[2], udp[3]], 0, 0, 0)
    };
    Ok(Tuple {
        saddr: ip.source(),
        daddr: ip.destination(),
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        proto: protocol,
        tcp_flags,
        seq,
        seq_end,
    })
}

/// Whether the TCP flags byte at `flags` has SYN with FIN or RST. The byte is read again for
/// the test alone: tested on the value the path goes on with, the verifier would know more of
/// that value on one side than the other and walk every later state twice (`lb_xdp` 223,000
/// instructions to 450,000).
#[inline(always)]
fn opens_and_closes(flags: &u8) -> bool {
    // SAFETY: a byte of a live reference into the packet.
    let flags = unsafe { core::ptr::read_volatile(flags) };
    flags & TCP_SYN != 0 && flags & (TCP_FIN | TCP_RST) != 0
}

/// Rewrites an SCTP packet's ports (`len` bytes from `l4_offset`) and brings its CRC32c up to
/// date ([`checksum_after_ports`]).
#[inline(always)]
fn rewrite_sctp_ports(
    ctx: &XdpContext,
    l4_offset: usize,
    len: usize,
    sport: u16,
    dport: u16,
) -> Result<(), Event> {
    let header =
        bytes_at_mut::<{ sctp::COMMON_HDR_LEN }>(ctx, l4_offset).ok_or(Event::DROP_MALFORMED)?;
    let old_ports = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    header[0..2].copy_from_slice(&sport.to_be_bytes());
    header[2..4].copy_from_slice(&dport.to_be_bytes());
    let new_ports = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let field = sctp::CHECKSUM_OFFSET..sctp::CHECKSUM_OFFSET + 4;
    let check = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if let Some(check) = checksum_after_ports(check, len, old_ports, new_ports)
        .map_err(|()| Event::DROP_MALFORMED)?
    {
        header[field].copy_from_slice(&check.to_le_bytes());
    }
    Ok(())
}

/// A TCP/UDP checksum after [`rewrite`]'s change of addresses and ports. A function of its own,
/// inlined: as a closure LLVM left it out of line for IPv6, a BPF-to-BPF call per translated
/// packet.
#[inline(always)]
fn transport_checksum_update<I: Ip>(
    check: u16,
    tuple: &Tuple<I::F>,
    (saddr, sport): (Addr<I>, u16),
    (daddr, dport): (Addr<I>, u16),
) -> u16 {
    let old = Endpoints {
        saddr: tuple.saddr,
        daddr: tuple.daddr,
        sport: tuple.sport,
        dport: tuple.dport,
    };
    let new = Endpoints {
        saddr,
        daddr,
        sport,
        dport,
    };
    I::transport_checksum_update(check, &old, &new)
}

/// Rewrites source and destination address and port (unchanged ones cost nothing), with
/// incremental IPv4 and TCP/UDP/SCTP checksums. A UDP checksum of 0 (none) stays 0; a computed 0
/// is sent as 0xffff (RFC 768).
#[inline(always)]
fn rewrite<I: Ip>(
    ctx: &XdpContext,
    tuple: &Tuple<I::F>,
    ip: &I,
    (saddr, sport): (Addr<I>, u16),
    (daddr, dport): (Addr<I>, u16),
) -> Result<(), Event> {
    let l4_offset = ip.l4_offset();
    if tuple.proto == proto::SCTP {
        // Its checksum is over the whole SCTP packet, which a first fragment does not hold.
        if ip.first_fragment() {
            return Err(Event::DROP_SCTP_FRAGMENT);
        }
        rewrite_sctp_ports(ctx, l4_offset, ip.end() - l4_offset, sport, dport)?;
        return I::readdress(ctx, (tuple.saddr, tuple.daddr), (saddr, daddr));
    }
    I::readdress(ctx, (tuple.saddr, tuple.daddr), (saddr, daddr))?;

    let update =
        |check: u16| transport_checksum_update::<I>(check, tuple, (saddr, sport), (daddr, dport));
    if tuple.proto == proto::TCP {
        let tcp = bytes_at_mut::<TCP_MIN_HDR_LEN>(ctx, l4_offset).ok_or(Event::DROP_MALFORMED)?;
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&dport.to_be_bytes());
        let check = u16::from_be_bytes([tcp[TCP_CSUM_OFFSET], tcp[TCP_CSUM_OFFSET + 1]]);
        tcp[TCP_CSUM_OFFSET..TCP_CSUM_OFFSET + 2].copy_from_slice(&update(check).to_be_bytes());
    } else {
        let udp = bytes_at_mut::<UDP_HDR_LEN>(ctx, l4_offset).ok_or(Event::DROP_MALFORMED)?;
        udp[0..2].copy_from_slice(&sport.to_be_bytes());
        udp[2..4].copy_from_slice(&dport.to_be_bytes());
        let check = u16::from_be_bytes([udp[UDP_CSUM_OFFSET], udp[UDP_CSUM_OFFSET + 1]]);
        if check != 0 {
            let check = update(check);
            let check = if check == 0 { 0xffff } else { check };
            udp[UDP_CSUM_OFFSET..UDP_CSUM_OFFSET + 2].copy_from_slice(&check.to_be_bytes());
        }
    }
    Ok(())
}
