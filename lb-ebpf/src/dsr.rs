//! The DSR option in the packet ([`lb_common::dsr`]): put into a SYN's IPv4 header by the
//! node the client sent to, found and taken out again by the endpoint's node.

use aya_ebpf::{helpers::bpf_xdp_load_bytes, programs::XdpContext};
use lb_common::Event;
use lb_common::dsr::{OPTION_LEN, VERSION_IHL_WITH_OPTION, frontend_of, option};
use lb_ebpf::packet::{
    ETH_HDR_LEN, IPV4_CSUM_OFFSET, IPV4_MIN_HDR_LEN, IPV4_VERSION_IHL_NO_OPTIONS, Ipv4Info,
    TCP_ACK, TCP_SYN, bytes_at, bytes_at_mut,
};

use crate::{helpers::xdp_adjust_head, maps::count_event};

/// The Ethernet and IPv4 fixed headers, which move when the option goes in or out.
const HEADERS_LEN: usize = ETH_HDR_LEN + IPV4_MIN_HDR_LEN;
/// Where the transport header starts behind a header that holds the option.
pub const L4_OFFSET_WITH_OPTION: usize = HEADERS_LEN + OPTION_LEN;

/// Whether an IPv4 TCP packet to a frontend of a Service with DSR is a SYN that may start a
/// flow by it: not a fragment, its IP header without options (counted when they alone keep it
/// on SNAT: the option goes only into a header without options of its own). Read afresh
/// through a helper, not from the parse: a check of the parse's values (or of packet bytes the
/// parse read, which LLVM takes from its registers) split every later state of `lb_xdp` and
/// `lb_xdp_lookup`, and their verifier walked twice the instructions.
#[inline(always)]
pub fn starts_direct(ctx: &XdpContext) -> bool {
    const TCP_FLAGS_OFFSET: usize = 13;
    let mut header = [0u8; 8];
    if !load(ctx, ETH_HDR_LEN, &mut header) {
        return false;
    }
    let fragment = u16::from_be_bytes([header[6], header[7]]) & 0x3fff != 0;
    let plain_header = header[0] == IPV4_VERSION_IHL_NO_OPTIONS;
    let header_len = usize::from(header[0] & 0x0f) * 4;
    let mut flags = [0u8; 1];
    let syn = load(ctx, ETH_HDR_LEN + header_len + TCP_FLAGS_OFFSET, &mut flags)
        && flags[0] & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if fragment || !syn {
        return false;
    }
    if !plain_header {
        count_event(Event::DSR_NO_ROOM);
    }
    plain_header
}

/// Copies the packet's bytes at `offset` into `into` through the helper.
#[inline(always)]
fn load<const N: usize>(ctx: &XdpContext, offset: usize, into: &mut [u8; N]) -> bool {
    // SAFETY: the helper writes at most the N bytes `into` holds.
    unsafe { bpf_xdp_load_bytes(ctx.ctx, offset as u32, into.as_mut_ptr().cast(), N as u32) == 0 }
}

/// Whether an IPv4 packet whose transport header is at `l4_offset` has a header that holds the
/// DSR option and nothing else.
#[inline(always)]
pub fn carries_option(ctx: &XdpContext, l4_offset: usize) -> bool {
    l4_offset == L4_OFFSET_WITH_OPTION && option_at_headers_end(ctx).is_some()
}

/// Whether a parsed IPv4 packet's header holds the DSR option and nothing else, and which
/// frontend (address, port) it names. Read through a helper: behind the parse's check of the
/// header's length, LLVM drops a bounds check of these bytes as redundant, and the verifier,
/// which does not follow that, refuses the read.
#[inline(always)]
pub fn option_of(ctx: &XdpContext, ip: &Ipv4Info) -> Option<(u32, u16)> {
    if ip.l4_offset != L4_OFFSET_WITH_OPTION {
        return None;
    }
    option_at_headers_end(ctx)
}

/// The frontend the DSR option right after the fixed IPv4 header names, if the bytes there
/// are the option.
#[inline(always)]
fn option_at_headers_end(ctx: &XdpContext) -> Option<(u32, u16)> {
    let mut bytes = [0u8; OPTION_LEN];
    if !load(ctx, HEADERS_LEN, &mut bytes) {
        return None;
    }
    frontend_of(&bytes)
}

/// Puts the option naming the frontend `addr`:`port` into a packet whose IPv4 header has no
/// options: 8 bytes of headroom taken, both headers moved into them, the option written behind
/// the fixed header, and the header's length, total length and checksum set for it. The TCP
/// checksum stays: its pseudo-header holds no options. False, with the packet as it was or
/// unusable, when the kernel gave no headroom or the header was not one without options.
#[inline(always)]
pub fn insert_option(ctx: &XdpContext, addr: u32, port: u16) -> bool {
    match bytes_at::<1>(ctx, ETH_HDR_LEN) {
        Some([IPV4_VERSION_IHL_NO_OPTIONS]) => {}
        _ => return false,
    }
    if !xdp_adjust_head(ctx, -(OPTION_LEN as i32)) {
        return false;
    }
    let Some(frame) = bytes_at_mut::<L4_OFFSET_WITH_OPTION>(ctx, 0) else {
        return false;
    };
    // Towards the start, first bytes first: each move reads bytes no earlier move wrote.
    move_word::<8>(frame, OPTION_LEN, 0);
    move_word::<8>(frame, OPTION_LEN + 8, 8);
    move_word::<8>(frame, OPTION_LEN + 16, 16);
    move_word::<8>(frame, OPTION_LEN + 24, 24);
    move_word::<2>(frame, OPTION_LEN + 32, 32);
    frame[HEADERS_LEN..].copy_from_slice(&option(addr, port));
    let Some(ip) = frame[ETH_HDR_LEN..].first_chunk_mut::<{ IPV4_MIN_HDR_LEN + OPTION_LEN }>()
    else {
        return false;
    };
    ip[0] = VERSION_IHL_WITH_OPTION;
    let total_len = u16::from_be_bytes([ip[2], ip[3]]).wrapping_add(OPTION_LEN as u16);
    ip[2..4].copy_from_slice(&total_len.to_be_bytes());
    set_header_checksum(ip);
    true
}

/// Takes the option out of a packet whose IPv4 header holds it and nothing else (see
/// [`option_of`]): both headers moved over it, the headroom given back, and the header's
/// length, total length and checksum set as they are without it.
#[inline(never)]
pub fn strip_option(ctx: &XdpContext) -> bool {
    let Some(frame) = bytes_at_mut::<L4_OFFSET_WITH_OPTION>(ctx, 0) else {
        return false;
    };
    if frame[ETH_HDR_LEN] != VERSION_IHL_WITH_OPTION {
        return false;
    }
    // Towards the end, last bytes first: each move reads bytes no earlier move wrote.
    move_word::<2>(frame, 32, OPTION_LEN + 32);
    move_word::<8>(frame, 24, OPTION_LEN + 24);
    move_word::<8>(frame, 16, OPTION_LEN + 16);
    move_word::<8>(frame, 8, OPTION_LEN + 8);
    move_word::<8>(frame, 0, OPTION_LEN);
    let Some(ip) = frame[OPTION_LEN + ETH_HDR_LEN..].first_chunk_mut::<IPV4_MIN_HDR_LEN>() else {
        return false;
    };
    ip[0] = IPV4_VERSION_IHL_NO_OPTIONS;
    let total_len = u16::from_be_bytes([ip[2], ip[3]]).wrapping_sub(OPTION_LEN as u16);
    ip[2..4].copy_from_slice(&total_len.to_be_bytes());
    set_header_checksum(ip);
    xdp_adjust_head(ctx, OPTION_LEN as i32)
}

/// Copies `N` bytes of `frame` from `from` to `to` through a register: the insert runs inside
/// the datapath's programs, whose stack frames are full.
#[inline(always)]
fn move_word<const N: usize>(frame: &mut [u8; L4_OFFSET_WITH_OPTION], from: usize, to: usize) {
    let mut word = [0u8; N];
    word.copy_from_slice(&frame[from..from + N]);
    frame[to..to + N].copy_from_slice(&word);
}

/// Writes the checksum of an IPv4 header (`header`: all of it, options included), computed
/// afresh: this runs for SYNs only, and a header of a known length costs a few additions.
#[inline(always)]
fn set_header_checksum<const N: usize>(header: &mut [u8; N]) {
    header[IPV4_CSUM_OFFSET] = 0;
    header[IPV4_CSUM_OFFSET + 1] = 0;
    let mut sum = 0u32;
    for pair in header.as_chunks::<2>().0 {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let check = !(sum as u16);
    header[IPV4_CSUM_OFFSET..IPV4_CSUM_OFFSET + 2].copy_from_slice(&check.to_be_bytes());
}
