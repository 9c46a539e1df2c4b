//! Answers for a service with no endpoint, like kube-proxy's REJECT rules: a TCP RST for TCP, an
//! ICMP (ICMPv6) port unreachable for UDP, sent back out of the NIC from XDP, so the client fails
//! at once instead of timing out. Packets with IP options (IPv6 extension headers) are dropped
//! instead (the answer would have to drop them; kube-proxy's REJECT is rarely hit by such
//! traffic), counted as `drop_no_backend`, and a RST is never answered. Its ICMP errors are
//! built by [`icmp_error`] and [`icmp6_error`], which [`crate::too_big`] uses too.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{Event, Ipv6Words, checksum, proto};
use lb_ebpf::packet::{
    ETH_HDR_LEN, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPV6_HDR_LEN, TCP_ACK, TCP_FIN,
    TCP_RST, TCP_SYN, bytes_at, bytes_at_mut, frame_len,
};

use crate::{
    family::V6,
    flow::Tuple,
    helpers::{now_ns, xdp_adjust_head, xdp_adjust_tail},
    maps::{REJECT_BUDGET, count_event, dry_run},
};

const IP_HDR_LEN: usize = 20;
const TCP_HDR_LEN: usize = 20;
/// Ethernet + IPv4 + TCP, no options: the whole RST.
const RST_LEN: usize = ETH_HDR_LEN + IP_HDR_LEN + TCP_HDR_LEN;
const ICMP_HDR_LEN: usize = 8;
/// What an ICMP error quotes: the offending IP header and the first 8 bytes after it (RFC 792).
const ICMP_QUOTE_LEN: usize = IP_HDR_LEN + 8;
/// Ethernet + IPv4 + ICMP + quote: the whole port unreachable.
const ICMP_LEN: usize = ETH_HDR_LEN + IP_HDR_LEN + ICMP_HDR_LEN + ICMP_QUOTE_LEN;
const TTL: u8 = 64;

/// REJECT answers each CPU may send per second (and in one burst), like the stack's own limit
/// on ICMP errors (net.ipv4.icmp_msgs_per_sec, 1000): a flood at a service without endpoints
/// must not turn the node into a reflector.
const REJECTS_PER_SECOND: u64 = 1000;
const NANOS_PER_REJECT: u64 = 1_000_000_000 / REJECTS_PER_SECOND;

/// Turns the packet into the rejection and sends it back (XDP_TX), or drops it. Only unicast
/// sources get an answer (RFC 1812 4.3.2.7 for ICMP errors; a RST to a broadcast would hit
/// every host), and only within this CPU's rate.
#[inline(always)]
pub fn reply(ctx: &XdpContext, tuple: &Tuple, l4_offset: usize) -> Result<u32, Event> {
    if l4_offset != ETH_HDR_LEN + IP_HDR_LEN {
        return Err(Event::DROP_NO_BACKEND);
    }
    let eth = bytes_at::<ETH_HDR_LEN>(ctx, 0).ok_or(Event::DROP_MALFORMED)?;
    if !unicast(tuple.saddr, eth) {
        return Err(Event::DROP_REJECT_NOT_UNICAST);
    }
    if !within_rate() {
        return Err(Event::DROP_REJECT_RATE_LIMITED);
    }
    if tuple.proto == proto::TCP {
        tcp_reset(ctx, tuple)
    } else {
        icmp_port_unreachable(ctx, tuple)
    }
}

/// RFC 9293 3.10.7.1: a segment with ACK gets a RST with seq = its ACK number; one without gets
/// RST+ACK with seq 0 and ack = its seq + its length (SYN and FIN count one each).
#[inline(always)]
fn tcp_reset(ctx: &XdpContext, tuple: &Tuple) -> Result<u32, Event> {
    if tuple.tcp_flags & TCP_RST != 0 {
        return Err(Event::DROP_NO_BACKEND);
    }
    let ip = bytes_at::<IP_HDR_LEN>(ctx, ETH_HDR_LEN).ok_or(Event::DROP_MALFORMED)?;
    let segment_len =
        u32::from(u16::from_be_bytes([ip[2], ip[3]])).saturating_sub(IP_HDR_LEN as u32);
    let mut segment = reset_segment(ctx, ETH_HDR_LEN + IP_HDR_LEN, segment_len, tuple)?;
    let excess = frame_len(ctx).saturating_sub(RST_LEN);
    if excess > 0 && !xdp_adjust_tail(ctx, -(excess as i32)) {
        return Err(Event::DROP_NO_BACKEND);
    }
    let packet = bytes_at_mut::<RST_LEN>(ctx, 0).ok_or(Event::DROP_MALFORMED)?;
    swap_macs(packet);
    write_ip_header(
        packet,
        IPPROTO_TCP,
        (IP_HDR_LEN + TCP_HDR_LEN) as u16,
        tuple.daddr,
        tuple.saddr,
    );
    let pseudo = pseudo_header_sum(tuple.daddr, tuple.saddr, IPPROTO_TCP, TCP_HDR_LEN as u16);
    let check = checksum::finish(checksum::sum_words(pseudo, &segment));
    segment[16..18].copy_from_slice(&check.to_be_bytes());
    packet[ETH_HDR_LEN + IP_HDR_LEN..].copy_from_slice(&segment);
    count_event(Event::REJECT_TCP_RST);
    Ok(xdp_action::XDP_TX)
}

/// The RST answering the TCP segment at `l4_offset` (`segment_len` bytes, header included),
/// its checksum left 0.
#[inline(always)]
fn reset_segment<F: crate::family::Family>(
    ctx: &XdpContext,
    l4_offset: usize,
    segment_len: u32,
    tuple: &Tuple<F>,
) -> Result<[u8; TCP_HDR_LEN], Event> {
    let tcp = bytes_at::<TCP_HDR_LEN>(ctx, l4_offset).ok_or(Event::DROP_MALFORMED)?;
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let header_len = u32::from(tcp[12] >> 4) * 4;
    let payload = segment_len.saturating_sub(header_len);
    let (rst_seq, rst_ack, flags) = if tuple.tcp_flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let consumed = payload
            + u32::from(tuple.tcp_flags & TCP_SYN != 0)
            + u32::from(tuple.tcp_flags & TCP_FIN != 0);
        (0, seq.wrapping_add(consumed), TCP_RST | TCP_ACK)
    };
    let mut segment = [0u8; TCP_HDR_LEN];
    segment[0..2].copy_from_slice(&tuple.dport.to_be_bytes());
    segment[2..4].copy_from_slice(&tuple.sport.to_be_bytes());
    segment[4..8].copy_from_slice(&rst_seq.to_be_bytes());
    segment[8..12].copy_from_slice(&rst_ack.to_be_bytes());
    segment[12] = (TCP_HDR_LEN as u8 / 4) << 4;
    segment[13] = flags;
    Ok(segment)
}

/// ICMP destination unreachable, port unreachable (type 3, code 3), quoting the datagram's IP
/// header and UDP header as the client sent them (to the frontend), so its socket gets the error.
#[inline(always)]
fn icmp_port_unreachable(ctx: &XdpContext, tuple: &Tuple) -> Result<u32, Event> {
    if !icmp_error(ctx, [3, 3, 0, 0, 0, 0, 0, 0], tuple.daddr, tuple.saddr) {
        return Err(Event::DROP_NO_BACKEND);
    }
    count_event(Event::REJECT_ICMP);
    Ok(xdp_action::XDP_TX)
}

/// Turns the packet (an IPv4 header without options) into an ICMP error about it from `saddr`
/// to `daddr`, sent back to the MAC it came from: `header` is the error's first 8 bytes with
/// its checksum 0 (type, code, checksum, and the 4 bytes the type defines); the quote is the
/// packet's IP header and the 8 bytes after it, as they came (RFC 792). False when the frame
/// could not be reshaped (it may be half rewritten).
#[inline(always)]
pub(crate) fn icmp_error(
    ctx: &XdpContext,
    header: [u8; ICMP_HDR_LEN],
    saddr: u32,
    daddr: u32,
) -> bool {
    // Room in front for the new IP and ICMP headers; the old Ethernet header moves up.
    let grow = (IP_HDR_LEN + ICMP_HDR_LEN) as i32;
    if !xdp_adjust_head(ctx, -grow) {
        return false;
    }
    let excess = frame_len(ctx).saturating_sub(ICMP_LEN);
    if excess > 0 && !xdp_adjust_tail(ctx, -(excess as i32)) {
        return false;
    }
    let Some(packet) = bytes_at_mut::<ICMP_LEN>(ctx, 0) else {
        return false;
    };
    packet.copy_within(grow as usize..grow as usize + ETH_HDR_LEN, 0);
    swap_macs(packet);
    let icmp_len = ICMP_HDR_LEN + ICMP_QUOTE_LEN;
    write_ip_header(
        packet,
        IPPROTO_ICMP,
        (IP_HDR_LEN + icmp_len) as u16,
        saddr,
        daddr,
    );
    // The quote is already in place: the packet's IP header starts where the ICMP header ends.
    let Some((_, message)) = packet.split_last_chunk_mut::<{ ICMP_HDR_LEN + ICMP_QUOTE_LEN }>()
    else {
        return false;
    };
    message[..ICMP_HDR_LEN].copy_from_slice(&header);
    let check = checksum::finish(checksum::sum_words(0, &*message));
    message[2..4].copy_from_slice(&check.to_be_bytes());
    true
}

/// Ethernet + IPv6 + TCP: the whole IPv6 RST.
const RST6_LEN: usize = ETH_HDR_LEN + IPV6_HDR_LEN + TCP_HDR_LEN;
/// What an ICMPv6 error quotes here: the offending IPv6 header and the first 8 bytes after it
/// (RFC 4443 asks for as much as fits in the minimum MTU; the header and the ports are what a
/// socket needs to match it).
const ICMP6_QUOTE_LEN: usize = IPV6_HDR_LEN + 8;
/// Ethernet + IPv6 + ICMPv6 + quote: the whole port unreachable.
const ICMP6_LEN: usize = ETH_HDR_LEN + IPV6_HDR_LEN + ICMP_HDR_LEN + ICMP6_QUOTE_LEN;

/// [`reply`] for IPv6: a TCP RST or an ICMPv6 port unreachable (type 1, code 4). A BPF-to-BPF
/// call, for the stack its packet buffers take (see `Family::OUT_OF_LINE`).
#[inline(never)]
pub fn reply6(ctx: &XdpContext, tuple: &Tuple<V6>, l4_offset: usize) -> Result<u32, Event> {
    if l4_offset != ETH_HDR_LEN + IPV6_HDR_LEN {
        return Err(Event::DROP_NO_BACKEND);
    }
    let eth = bytes_at::<ETH_HDR_LEN>(ctx, 0).ok_or(Event::DROP_MALFORMED)?;
    if !unicast6(&tuple.saddr, eth) {
        return Err(Event::DROP_REJECT_NOT_UNICAST);
    }
    if !within_rate() {
        return Err(Event::DROP_REJECT_RATE_LIMITED);
    }
    if tuple.proto == proto::TCP {
        tcp_reset6(ctx, tuple)
    } else {
        icmp6_port_unreachable(ctx, tuple)
    }
}

#[inline(always)]
fn tcp_reset6(ctx: &XdpContext, tuple: &Tuple<V6>) -> Result<u32, Event> {
    if tuple.tcp_flags & TCP_RST != 0 {
        return Err(Event::DROP_NO_BACKEND);
    }
    let ip = bytes_at::<6>(ctx, ETH_HDR_LEN).ok_or(Event::DROP_MALFORMED)?;
    let segment_len = u32::from(u16::from_be_bytes([ip[4], ip[5]]));
    let mut segment = reset_segment(ctx, ETH_HDR_LEN + IPV6_HDR_LEN, segment_len, tuple)?;
    let excess = frame_len(ctx).saturating_sub(RST6_LEN);
    if excess > 0 && !xdp_adjust_tail(ctx, -(excess as i32)) {
        return Err(Event::DROP_NO_BACKEND);
    }
    let packet = bytes_at_mut::<RST6_LEN>(ctx, 0).ok_or(Event::DROP_MALFORMED)?;
    swap_macs(packet);
    write_ipv6_header(
        packet,
        IPPROTO_TCP,
        TCP_HDR_LEN as u16,
        &tuple.daddr,
        &tuple.saddr,
    );
    let pseudo = pseudo_header_sum6(&tuple.daddr, &tuple.saddr, IPPROTO_TCP, TCP_HDR_LEN as u16);
    let check = checksum::finish(checksum::sum_words(pseudo, &segment));
    segment[16..18].copy_from_slice(&check.to_be_bytes());
    packet[ETH_HDR_LEN + IPV6_HDR_LEN..].copy_from_slice(&segment);
    count_event(Event::REJECT_TCP_RST);
    Ok(xdp_action::XDP_TX)
}

/// ICMPv6 destination unreachable, port unreachable (type 1, code 4), quoting the datagram's
/// IPv6 header and UDP header as the client sent them (to the frontend).
#[inline(always)]
fn icmp6_port_unreachable(ctx: &XdpContext, tuple: &Tuple<V6>) -> Result<u32, Event> {
    if !icmp6_error(ctx, [1, 4, 0, 0, 0, 0, 0, 0], &tuple.daddr, &tuple.saddr) {
        return Err(Event::DROP_NO_BACKEND);
    }
    count_event(Event::REJECT_ICMP);
    Ok(xdp_action::XDP_TX)
}

/// [`icmp_error`] for a packet with an IPv6 header and no extension headers: an ICMPv6 error
/// quoting its fixed header and the 8 bytes after it (RFC 4443 asks for as much as fits in the
/// minimum MTU; the header and the ports, with TCP's sequence number, are what a socket needs
/// to match it). Unlike ICMP's, its checksum covers a pseudo-header too (RFC 4443 section 2.3).
#[inline(always)]
pub(crate) fn icmp6_error(
    ctx: &XdpContext,
    header: [u8; ICMP_HDR_LEN],
    saddr: &Ipv6Words,
    daddr: &Ipv6Words,
) -> bool {
    let grow = (IPV6_HDR_LEN + ICMP_HDR_LEN) as i32;
    if !xdp_adjust_head(ctx, -grow) {
        return false;
    }
    let excess = frame_len(ctx).saturating_sub(ICMP6_LEN);
    if excess > 0 && !xdp_adjust_tail(ctx, -(excess as i32)) {
        return false;
    }
    let Some(packet) = bytes_at_mut::<ICMP6_LEN>(ctx, 0) else {
        return false;
    };
    packet.copy_within(grow as usize..grow as usize + ETH_HDR_LEN, 0);
    swap_macs(packet);
    let icmp_len = (ICMP_HDR_LEN + ICMP6_QUOTE_LEN) as u16;
    write_ipv6_header(packet, IPPROTO_ICMPV6, icmp_len, saddr, daddr);
    // The quote is already in place, as in `icmp_error`.
    let Some((_, message)) = packet.split_last_chunk_mut::<{ ICMP_HDR_LEN + ICMP6_QUOTE_LEN }>()
    else {
        return false;
    };
    message[..ICMP_HDR_LEN].copy_from_slice(&header);
    let pseudo = pseudo_header_sum6(saddr, daddr, IPPROTO_ICMPV6, icmp_len);
    let check = checksum::finish(checksum::sum_words(pseudo, &*message));
    message[2..4].copy_from_slice(&check.to_be_bytes());
    true
}

/// Whether an IPv6 sender is one host that can take an answer: not the unspecified address,
/// loopback or a multicast group (ff00::/8), in a frame between unicast MACs.
#[inline(always)]
pub(crate) fn unicast6(saddr: &Ipv6Words, eth: &[u8; ETH_HDR_LEN]) -> bool {
    let first = u32::from_be(saddr[0]);
    let group_mac = |mac_first_byte: u8| mac_first_byte & 1 != 0;
    let unspecified_or_loopback =
        saddr[0] | saddr[1] | saddr[2] == 0 && u32::from_be(saddr[3]) <= 1;
    first >> 24 != 0xff && !unspecified_or_loopback && !group_mac(eth[0]) && !group_mac(eth[6])
}

/// A fresh IPv6 header (no extension headers) after the Ethernet one, written in place.
#[inline(always)]
fn write_ipv6_header<const N: usize>(
    packet: &mut [u8; N],
    next_header: u8,
    payload_len: u16,
    saddr: &Ipv6Words,
    daddr: &Ipv6Words,
) {
    let Some((_, rest)) = packet.split_first_chunk_mut::<ETH_HDR_LEN>() else {
        return;
    };
    let Some(header) = rest.first_chunk_mut::<IPV6_HDR_LEN>() else {
        return;
    };
    header[..8].fill(0);
    header[0] = 0x60;
    header[4..6].copy_from_slice(&payload_len.to_be_bytes());
    header[6] = next_header;
    header[7] = TTL;
    for i in 0..4 {
        header[8 + 4 * i..12 + 4 * i].copy_from_slice(&saddr[i].to_ne_bytes());
        header[24 + 4 * i..28 + 4 * i].copy_from_slice(&daddr[i].to_ne_bytes());
    }
}

/// The IPv6 pseudo-header's contribution to a TCP, UDP or ICMPv6 checksum (RFC 8200 8.1).
#[inline(always)]
fn pseudo_header_sum6(saddr: &Ipv6Words, daddr: &Ipv6Words, next_header: u8, length: u16) -> u32 {
    let mut sum = u32::from(next_header) + u32::from(length);
    for i in 0..4 {
        let (s, d) = (u32::from_be(saddr[i]), u32::from_be(daddr[i]));
        sum += (s >> 16) + (s & 0xffff) + (d >> 16) + (d & 0xffff);
    }
    sum
}

/// Whether the sender is one host that can take an answer: a unicast address (not 0.0.0.0/8,
/// loopback, multicast, the reserved 240/4 or broadcast) in a frame from a unicast MAC, sent
/// to a unicast MAC (a frame to the broadcast MAC may have reached every host of the link).
#[inline(always)]
pub(crate) fn unicast(saddr: u32, eth: &[u8; ETH_HDR_LEN]) -> bool {
    let first_octet = saddr >> 24;
    let group_mac = |mac_first_byte: u8| mac_first_byte & 1 != 0;
    first_octet != 0
        && first_octet != 127
        && first_octet < 224
        && !group_mac(eth[0])
        && !group_mac(eth[6])
}

/// A token bucket per CPU: REJECTS_PER_SECOND tokens a second, as many at most.
#[inline(always)]
fn within_rate() -> bool {
    if dry_run() {
        return true;
    }
    let Some(bucket) = REJECT_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a per-CPU slot, used by one program at a time on this CPU.
    let bucket = unsafe { &mut *bucket };
    let now = now_ns();
    let earned = now.saturating_sub(bucket.last_ns) / NANOS_PER_REJECT;
    if earned > 0 {
        bucket.tokens = (bucket.tokens + earned).min(REJECTS_PER_SECOND);
        bucket.last_ns = now;
    }
    if bucket.tokens == 0 {
        return false;
    }
    bucket.tokens -= 1;
    true
}

#[inline(always)]
fn swap_macs<const N: usize>(packet: &mut [u8; N]) {
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&packet[0..6]);
    packet.copy_within(6..12, 0);
    packet[6..12].copy_from_slice(&mac);
}

/// A fresh 20-byte IPv4 header (no options, DF clear, checksum computed) after the Ethernet one,
/// written in place (no copy on the stack, which `lb_xdp` has little of).
#[inline(always)]
fn write_ip_header<const N: usize>(
    packet: &mut [u8; N],
    protocol: u8,
    total_len: u16,
    saddr: u32,
    daddr: u32,
) {
    let Some((_, rest)) = packet.split_first_chunk_mut::<ETH_HDR_LEN>() else {
        return;
    };
    let Some(header) = rest.first_chunk_mut::<IP_HDR_LEN>() else {
        return;
    };
    header.fill(0);
    header[0] = 0x45;
    header[2..4].copy_from_slice(&total_len.to_be_bytes());
    header[8] = TTL;
    header[9] = protocol;
    header[12..16].copy_from_slice(&saddr.to_be_bytes());
    header[16..20].copy_from_slice(&daddr.to_be_bytes());
    let check = checksum::finish(checksum::sum_words(0, header));
    header[10..12].copy_from_slice(&check.to_be_bytes());
}

/// The TCP/UDP pseudo-header's contribution to a checksum (RFC 793).
#[inline(always)]
fn pseudo_header_sum(saddr: u32, daddr: u32, protocol: u8, length: u16) -> u32 {
    (saddr >> 16)
        + (saddr & 0xffff)
        + (daddr >> 16)
        + (daddr & 0xffff)
        + u32::from(protocol)
        + u32::from(length)
}
