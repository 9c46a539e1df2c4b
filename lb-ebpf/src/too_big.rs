//! Path-MTU discovery through a node that forwards from XDP: a client's packet that must not be
//! fragmented (IPv4 with DF, any IPv6 packet) and is bigger than the MTU of the route to its
//! endpoint on another node is answered from XDP with ICMP "fragmentation needed" (type 3, code
//! 4, RFC 1191) or ICMPv6 "packet too big" (RFC 8201), from the frontend it was sent to, quoting
//! the packet as the client sent it: its socket lowers its path MTU and sends again. The same
//! way, an endpoint's answer to a SNAT port that is bigger than the MTU of the NIC towards its
//! client is answered before it is translated, from the SNAT address it was sent to.
//!
//! The stack cannot do it for XDP. Handed the packet translated, it would send its error to the
//! packet's new source, this node's own SNAT address, and the client would never learn why its
//! big packets vanish; a DSR flow's error would quote the endpoint's address, which no socket
//! of the client's matches.
//!
//! Like the kernel's own, these errors are not rate-limited (net/ipv4/icmp.c,
//! icmpv4_mask_allow: "Don't limit PMTU discovery"; ICMPv6 type 2 is outside the default
//! net.ipv6.icmp.ratemask): each one answers a packet bigger than itself.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{Event, Ipv6Words, checksum::Endpoints, proto};
use lb_ebpf::packet::{ETH_HDR_LEN, UDP_CSUM_OFFSET, bytes_at, bytes_at_mut};

use crate::{
    ip::{Addr, Ip},
    maps::count_event,
    reject::{icmp_error, icmp6_error, unicast, unicast6},
};

/// What a path returns for a packet XDP forwards that is too big for its way on (the route to
/// a remote endpoint, or the NIC towards a client) and must not be fragmented: never an XDP
/// action. The programs' verdict tail-calls `lb_xdp_too_big` for it,
/// from their top, where the stack is free: `lb_xdp` has no room for the answer, nor for a
/// tail call, down in its paths.
pub const PENDING: u32 = 0x7f00;

/// ICMP destination unreachable (3), fragmentation needed (4): the next hop's MTU goes in the
/// last two of the header's 8 bytes (RFC 1191 section 4).
const FRAGMENTATION_NEEDED: [u8; 2] = [3, 4];
/// ICMPv6 packet too big (2, code 0): the MTU goes in the header's last 4 bytes (RFC 4443
/// section 3.2).
const PACKET_TOO_BIG: [u8; 2] = [2, 0];

/// `lb_xdp_too_big`'s answer to a packet of `protocol` translated from its client's `original`
/// endpoints to `translated` (an IP header without options or extension headers:
/// [`Ip::answers_too_big`]): the error
/// saying it is bigger than `mtu`, sent back to its sender (XDP_TX), quoting the packet as it
/// came. A sender that may not get an ICMP error (not unicast, RFC 1812 section 4.3.2.7) gets
/// nothing, and the packet is dropped, as the stack drops it.
#[inline(always)]
pub fn answer<I: Ip>(
    ctx: &XdpContext,
    (translated, original): (&Endpoints<Addr<I>>, &Endpoints<Addr<I>>),
    protocol: u8,
    mtu: u16,
) -> Result<u32, Event> {
    restore::<I>(ctx, (translated, original), protocol)?;
    answer_as_it_came::<I>(ctx, original, mtu)
}

/// [`answer`] for a packet not yet translated (`endpoints`: as it came), which it quotes as it
/// is: an endpoint's answer to a SNAT port, too big for the NIC towards its client.
#[inline(always)]
pub fn answer_as_it_came<I: Ip>(
    ctx: &XdpContext,
    endpoints: &Endpoints<Addr<I>>,
    mtu: u16,
) -> Result<u32, Event> {
    I::too_big(ctx, endpoints, mtu)?;
    count_event(Event::ICMP_TOO_BIG_SENT);
    Ok(xdp_action::XDP_TX)
}

/// IPv4's [`answer`]: "fragmentation needed".
#[inline(always)]
pub fn fragmentation_needed(
    ctx: &XdpContext,
    original: &Endpoints<u32>,
    mtu: u16,
) -> Result<(), Event> {
    let eth = bytes_at::<ETH_HDR_LEN>(ctx, 0).ok_or(Event::DROP_MALFORMED)?;
    if !unicast(original.saddr, eth) {
        return Err(Event::DROP_TOO_BIG);
    }
    let [icmp_type, code] = FRAGMENTATION_NEEDED;
    let [mtu_high, mtu_low] = mtu.to_be_bytes();
    let header = [icmp_type, code, 0, 0, 0, 0, mtu_high, mtu_low];
    icmp_error(ctx, header, original.daddr, original.saddr)
        .then_some(())
        .ok_or(Event::DROP_TOO_BIG)
}

/// IPv6's [`answer`]: "packet too big".
#[inline(always)]
pub fn packet_too_big(
    ctx: &XdpContext,
    original: &Endpoints<Ipv6Words>,
    mtu: u16,
) -> Result<(), Event> {
    let eth = bytes_at::<ETH_HDR_LEN>(ctx, 0).ok_or(Event::DROP_MALFORMED)?;
    if !unicast6(&original.saddr, eth) {
        return Err(Event::DROP_TOO_BIG);
    }
    let [icmp_type, code] = PACKET_TOO_BIG;
    let [_, _, mtu_high, mtu_low] = u32::from(mtu).to_be_bytes();
    let header = [icmp_type, code, 0, 0, 0, 0, mtu_high, mtu_low];
    icmp6_error(ctx, header, &original.daddr, &original.saddr)
        .then_some(())
        .ok_or(Event::DROP_TOO_BIG)
}

/// Puts back what the error quotes of the packet as its client sent it (`original`): the
/// addresses (with IPv4's header checksum), the ports and a UDP checksum, in the transport
/// header's first 8 bytes (TCP's and SCTP's checksums lie past them). The packet is routed only
/// once translated: routed before, it would keep the route's MACs on `lb_xdp`'s stack through
/// the rewrite, past its 512 bytes.
#[inline(always)]
fn restore<I: Ip>(
    ctx: &XdpContext,
    (translated, original): (&Endpoints<Addr<I>>, &Endpoints<Addr<I>>),
    protocol: u8,
) -> Result<(), Event> {
    I::readdress(
        ctx,
        (translated.saddr, translated.daddr),
        (original.saddr, original.daddr),
    )?;
    let transport = bytes_at_mut::<8>(ctx, I::FIXED_HEADER_END).ok_or(Event::DROP_MALFORMED)?;
    transport[0..2].copy_from_slice(&original.sport.to_be_bytes());
    transport[2..4].copy_from_slice(&original.dport.to_be_bytes());
    let check = u16::from_be_bytes([transport[UDP_CSUM_OFFSET], transport[UDP_CSUM_OFFSET + 1]]);
    if protocol == proto::UDP && check != 0 {
        let check = I::transport_checksum_update(check, translated, original);
        let check = if check == 0 { 0xffff } else { check };
        transport[UDP_CSUM_OFFSET..UDP_CSUM_OFFSET + 2].copy_from_slice(&check.to_be_bytes());
    }
    Ok(())
}

/// The addresses and ports the packet holds now.
#[inline(always)]
pub fn translated_endpoints<I: Ip>(ctx: &XdpContext) -> Option<Endpoints<Addr<I>>> {
    let (saddr, daddr) = I::addresses_of_fixed_header(ctx)?;
    let ports = bytes_at::<4>(ctx, I::FIXED_HEADER_END)?;
    Some(Endpoints {
        saddr,
        daddr,
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
    })
}
