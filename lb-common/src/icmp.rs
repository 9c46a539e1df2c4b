//! ICMP errors about translated flows: what they quote and how the quote is rewritten, for the
//! XDP and tc programs alike. Pure functions over the error's bytes.

use crate::{checksum, ipv6, proto};

/// The ICMP header of an error.
pub const ICMP_HDR_LEN: usize = 8;
/// An error's header, the quoted IPv4 header (its fixed 20 bytes) and the quoted 8 bytes of its
/// transport header (RFC 792; behind the quoted header's options, if it has any): all a
/// translation reads and writes, put together ([`gather`]).
pub const ICMP_ERROR_LEN: usize = QUOTED_TRANSPORT + 8;
/// Where, in those bytes, the quoted transport header's first bytes are.
pub const QUOTED_TRANSPORT: usize = ICMP_HDR_LEN + 20;
const DEST_UNREACHABLE: u8 = 3;
const TIME_EXCEEDED: u8 = 11;
const PARAMETER_PROBLEM: u8 = 12;
/// Offsets in the error: the quoted flags and fragment offset, IP checksum, addresses, ports and
/// UDP checksum.
const QUOTED_FRAGMENT: usize = ICMP_HDR_LEN + 6;
/// The fragment offset's bits of its 16-bit field (the flags are the 3 above them).
const FRAGMENT_OFFSET_MASK: u16 = 0x1fff;
const QUOTED_IP_CHECK: usize = ICMP_HDR_LEN + 10;
const QUOTED_SADDR: usize = ICMP_HDR_LEN + 12;
const QUOTED_DADDR: usize = ICMP_HDR_LEN + 16;
const QUOTED_SPORT: usize = QUOTED_TRANSPORT;
const QUOTED_DPORT: usize = QUOTED_TRANSPORT + 2;
const QUOTED_UDP_CHECK: usize = QUOTED_TRANSPORT + 6;

/// The TCP/UDP/SCTP packet an ICMP error quotes (host order of the wire bytes).
#[derive(Clone, Copy)]
pub struct Quoted {
    pub proto: u8,
    pub source: (u32, u16),
    pub destination: (u32, u16),
}

/// Puts together in `error` the ICMP error whose header is at `at` in a packet: its header and
/// the quoted header's fixed 20 bytes (`load_head`, the [`QUOTED_TRANSPORT`] bytes at `at`),
/// then the 8 bytes of the quoted transport header past the quoted header's options
/// (`load_transport`, given their offset). Returns where those lie; `None` when the message is
/// no error, or its quote is no IPv4 header or ends before 8 transport bytes.
#[inline(always)]
pub fn gather(
    error: &mut [u8; ICMP_ERROR_LEN],
    at: usize,
    load_head: impl FnOnce(&mut [u8; QUOTED_TRANSPORT]) -> bool,
    load_transport: impl FnOnce(usize, &mut [u8; 8]) -> bool,
) -> Option<usize> {
    let (head, transport) = error.split_first_chunk_mut::<QUOTED_TRANSPORT>()?;
    if !load_head(head) || !is_error(head[0]) {
        return None;
    }
    let header_len = quoted_header_len(head[ICMP_HDR_LEN])?;
    let transport_at = at + ICMP_HDR_LEN + header_len;
    load_transport(transport_at, transport.first_chunk_mut()?).then_some(transport_at)
}

/// A gathered error's two parts as they lie in the packet: the error's header with the quoted
/// header's fixed bytes (at the error's offset), and the quoted transport header's first bytes
/// (where [`gather`] found them). Always `Some`: the lengths are constants.
#[inline(always)]
pub fn parts(error: &[u8; ICMP_ERROR_LEN]) -> Option<(&[u8; QUOTED_TRANSPORT], &[u8; 8])> {
    split_at_transport(error)
}

/// `error` cut where the quoted transport header's bytes start (`HEAD`), for [`parts`] and
/// [`parts6`].
#[inline(always)]
fn split_at_transport<const HEAD: usize, const LEN: usize>(
    error: &[u8; LEN],
) -> Option<(&[u8; HEAD], &[u8; 8])> {
    let (head, transport) = error.split_first_chunk::<HEAD>()?;
    Some((head, transport.first_chunk()?))
}

/// The length of a quoted IPv4 header (its options included) by its first byte; `None` for
/// another version or a length below 20.
#[inline(always)]
fn quoted_header_len(version_and_ihl: u8) -> Option<usize> {
    let words = usize::from(version_and_ihl & 0x0f);
    (version_and_ihl >> 4 == 4 && words >= 5).then_some(words * 4)
}

#[inline(always)]
fn is_error(icmp_type: u8) -> bool {
    matches!(
        icmp_type,
        DEST_UNREACHABLE | TIME_EXCEEDED | PARAMETER_PROBLEM
    )
}

/// What an ICMP error (destination unreachable, including fragmentation needed; time exceeded;
/// parameter problem) put together by [`gather`] quotes, when that is a TCP, UDP or SCTP packet
/// which is not a fragment after the first (whose 8 quoted bytes are data, not ports) (an SCTP
/// quote's CRC32c, past its first 8 bytes, is left as it is: the receiver's sctp_v4_err matches
/// the ports and verification tag and never checks it); `None` for any other ICMP message.
#[inline(always)]
pub fn quoted(error: &[u8; ICMP_ERROR_LEN]) -> Option<Quoted> {
    let protocol = error[ICMP_HDR_LEN + 9];
    if !is_error(error[0])
        || quoted_header_len(error[ICMP_HDR_LEN]).is_none()
        || u16_at(error, QUOTED_FRAGMENT) & FRAGMENT_OFFSET_MASK != 0
        || (protocol != proto::TCP && protocol != proto::UDP && protocol != proto::SCTP)
    {
        return None;
    }
    Some(Quoted {
        proto: protocol,
        source: (u32_at(error, QUOTED_SADDR), u16_at(error, QUOTED_SPORT)),
        destination: (u32_at(error, QUOTED_DADDR), u16_at(error, QUOTED_DPORT)),
    })
}

/// Rewrites the quoted packet's source and destination (address and port) to `source` and
/// `destination`, keeping the quoted IPv4 checksum, a quoted UDP checksum (TCP's lies past the
/// 8 quoted bytes) and the ICMP checksum right, all incrementally (RFC 1624). The outer header
/// is the caller's.
#[inline(always)]
pub fn rewrite_quoted(
    error: &mut [u8; ICMP_ERROR_LEN],
    old: &Quoted,
    source: (u32, u16),
    destination: (u32, u16),
) {
    let update_addresses = |check: u16| {
        let check = checksum::replace_u32(check, old.source.0, source.0);
        checksum::replace_u32(check, old.destination.0, destination.0)
    };
    let update_ports = |check: u16| {
        let check = checksum::replace_u16(check, old.source.1, source.1);
        checksum::replace_u16(check, old.destination.1, destination.1)
    };
    let old_ip_check = u16_at(error, QUOTED_IP_CHECK);
    let ip_check = update_addresses(old_ip_check);
    let mut icmp_check = u16_at(error, 2);
    icmp_check = checksum::replace_u16(icmp_check, old_ip_check, ip_check);
    icmp_check = update_ports(update_addresses(icmp_check));
    let old_udp_check = u16_at(error, QUOTED_UDP_CHECK);
    if old.proto == proto::UDP && old_udp_check != 0 {
        let udp_check = update_ports(update_addresses(old_udp_check));
        let udp_check = if udp_check == 0 { 0xffff } else { udp_check };
        icmp_check = checksum::replace_u16(icmp_check, old_udp_check, udp_check);
        put(error, QUOTED_UDP_CHECK, &udp_check.to_be_bytes());
    }
    put(error, QUOTED_IP_CHECK, &ip_check.to_be_bytes());
    put(error, QUOTED_SADDR, &source.0.to_be_bytes());
    put(error, QUOTED_DADDR, &destination.0.to_be_bytes());
    put(error, QUOTED_SPORT, &source.1.to_be_bytes());
    put(error, QUOTED_DPORT, &destination.1.to_be_bytes());
    put(error, 2, &icmp_check.to_be_bytes());
}

#[inline(always)]
fn u16_at(bytes: &[u8; ICMP_ERROR_LEN], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

#[inline(always)]
fn u32_at(bytes: &[u8; ICMP_ERROR_LEN], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

#[inline(always)]
fn put<const N: usize>(bytes: &mut [u8; ICMP_ERROR_LEN], at: usize, value: &[u8; N]) {
    bytes[at..at + N].copy_from_slice(value);
}

/// An ICMPv6 error's header, the quoted fixed IPv6 header and the first 8 bytes of the quoted
/// transport header (behind the quote's extension headers, if it has any): all an IPv6
/// translation reads and writes, put together.
pub const ICMP6_ERROR_LEN: usize = QUOTED6_TRANSPORT + 8;
/// Where, in those bytes, the quoted fixed header's Next Header and the quoted transport
/// header's first bytes are.
pub const QUOTED6_NEXT: usize = ICMP_HDR_LEN + 6;
pub const QUOTED6_TRANSPORT: usize = ICMP_HDR_LEN + 40;
/// ICMPv6 error types (RFC 4443): destination unreachable, packet too big, time exceeded,
/// parameter problem.
const ICMP6_ERRORS: core::ops::RangeInclusive<u8> = 1..=4;
/// Offsets in an ICMPv6 error: the quoted addresses, ports and UDP checksum.
const QUOTED6_SADDR: usize = ICMP_HDR_LEN + 8;
const QUOTED6_DADDR: usize = ICMP_HDR_LEN + 24;
const QUOTED6_SPORT: usize = QUOTED6_TRANSPORT;
const QUOTED6_DPORT: usize = QUOTED6_TRANSPORT + 2;
const QUOTED6_UDP_CHECK: usize = QUOTED6_TRANSPORT + 6;

/// Whether an ICMPv6 type is an error's (1-4), which quotes the packet it is about.
#[inline(always)]
pub fn is_icmp6_error(icmp6_type: u8) -> bool {
    ICMP6_ERRORS.contains(&icmp6_type)
}

/// The TCP/UDP/SCTP packet an ICMPv6 error quotes: addresses as the packet holds them
/// ([`crate::Ipv6Words`]), ports as numbers.
#[derive(Clone, Copy)]
pub struct Quoted6 {
    pub proto: u8,
    pub source: (crate::Ipv6Words, u16),
    pub destination: (crate::Ipv6Words, u16),
}

/// What an ICMPv6 error quotes, when that is a TCP, UDP or SCTP packet (`protocol`, the quoted
/// packet's upper layer: its fixed header's Next Header when it has no extension headers);
/// `None` for any other ICMPv6 message (neighbour discovery, echo among them).
#[inline(always)]
pub fn quoted6(error: &[u8; ICMP6_ERROR_LEN], protocol: u8) -> Option<Quoted6> {
    if !is_icmp6_error(error[0])
        || error[ICMP_HDR_LEN] >> 4 != 6
        || (protocol != proto::TCP && protocol != proto::UDP && protocol != proto::SCTP)
    {
        return None;
    }
    Some(Quoted6 {
        proto: protocol,
        source: (
            words_at(error, QUOTED6_SADDR),
            u16_at6(error, QUOTED6_SPORT),
        ),
        destination: (
            words_at(error, QUOTED6_DADDR),
            u16_at6(error, QUOTED6_DPORT),
        ),
    })
}

/// Where the parts of an ICMPv6 error [`gather6`] put together lie in the packet.
#[derive(Clone, Copy)]
pub struct Gathered6 {
    /// The quoted packet's upper-layer protocol, and where its header starts.
    pub protocol: u8,
    pub transport_at: usize,
}

/// Puts together in `error` the ICMPv6 error whose header is at `at` in a packet: its header
/// and the quoted fixed header (`load_head`, the [`QUOTED6_TRANSPORT`] bytes at `at`), then,
/// past the quote's extension headers ([`ipv6::upper_layer`] over `peek`, 8 bytes at an
/// offset), the quoted transport header's first 8 bytes. `None` when the message is no error,
/// or its quote ends before a transport header or is of a later fragment.
#[inline(always)]
pub fn gather6(
    error: &mut [u8; ICMP6_ERROR_LEN],
    at: usize,
    load_head: impl FnOnce(&mut [u8; QUOTED6_TRANSPORT]) -> bool,
    peek: impl FnMut(usize) -> Option<[u8; ipv6::EXT_HDR_PEEK]>,
) -> Option<Gathered6> {
    let (head, transport) = error.split_first_chunk_mut::<QUOTED6_TRANSPORT>()?;
    if !load_head(head) || !is_icmp6_error(head[0]) {
        return None;
    }
    let upper = ipv6::upper_layer(head[QUOTED6_NEXT], at + QUOTED6_TRANSPORT, peek)?;
    transport.copy_from_slice(&upper.first_bytes);
    Some(Gathered6 {
        protocol: upper.protocol,
        transport_at: upper.offset,
    })
}

/// A gathered error's two parts as they lie in the packet: the error's header with the quoted
/// fixed header (at the error's offset), and the quoted transport header's first bytes (at
/// [`Gathered6::transport_at`]). Always `Some`: the lengths are constants.
#[inline(always)]
pub fn parts6(error: &[u8; ICMP6_ERROR_LEN]) -> Option<(&[u8; QUOTED6_TRANSPORT], &[u8; 8])> {
    split_at_transport(error)
}

/// Rewrites an ICMPv6 error's quoted packet's source and destination (address and port) to
/// `source` and `destination`, and keeps a quoted UDP checksum (TCP's lies past the 8 quoted
/// bytes; the receiver's tcp_v6_err never checks it) and the ICMPv6 checksum right, all
/// incrementally (RFC 1624). The ICMPv6 checksum also covers the outer source address through
/// its pseudo-header: `outer_source` is its change, which the caller writes.
#[inline(always)]
pub fn rewrite_quoted6(
    error: &mut [u8; ICMP6_ERROR_LEN],
    old: &Quoted6,
    source: (crate::Ipv6Words, u16),
    destination: (crate::Ipv6Words, u16),
    outer_source: (crate::Ipv6Words, crate::Ipv6Words),
) {
    let update_quote = |check: u16| {
        let check = checksum::replace_ipv6(check, &old.source.0, &source.0);
        let check = checksum::replace_ipv6(check, &old.destination.0, &destination.0);
        let check = checksum::replace_u16(check, old.source.1, source.1);
        checksum::replace_u16(check, old.destination.1, destination.1)
    };
    let mut icmp_check = update_quote(u16_at6(error, 2));
    icmp_check = checksum::replace_ipv6(icmp_check, &outer_source.0, &outer_source.1);
    let old_udp_check = u16_at6(error, QUOTED6_UDP_CHECK);
    if old.proto == proto::UDP && old_udp_check != 0 {
        let udp_check = update_quote(old_udp_check);
        let udp_check = if udp_check == 0 { 0xffff } else { udp_check };
        icmp_check = checksum::replace_u16(icmp_check, old_udp_check, udp_check);
        put6(error, QUOTED6_UDP_CHECK, &udp_check.to_be_bytes());
    }
    put6(error, QUOTED6_SADDR, &bytes_of(&source.0));
    put6(error, QUOTED6_DADDR, &bytes_of(&destination.0));
    put6(error, QUOTED6_SPORT, &source.1.to_be_bytes());
    put6(error, QUOTED6_DPORT, &destination.1.to_be_bytes());
    put6(error, 2, &icmp_check.to_be_bytes());
}

/// An IPv6 address as the packet holds it, its bytes.
#[inline(always)]
pub fn bytes_of(words: &crate::Ipv6Words) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let word = words[i].to_ne_bytes();
        bytes[i * 4] = word[0];
        bytes[i * 4 + 1] = word[1];
        bytes[i * 4 + 2] = word[2];
        bytes[i * 4 + 3] = word[3];
        i += 1;
    }
    bytes
}

#[inline(always)]
fn words_at(bytes: &[u8; ICMP6_ERROR_LEN], at: usize) -> crate::Ipv6Words {
    let word = |i: usize| {
        let start = at + i * 4;
        u32::from_ne_bytes([
            bytes[start],
            bytes[start + 1],
            bytes[start + 2],
            bytes[start + 3],
        ])
    };
    [word(0), word(1), word(2), word(3)]
}

#[inline(always)]
fn u16_at6(bytes: &[u8; ICMP6_ERROR_LEN], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

#[inline(always)]
fn put6<const N: usize>(bytes: &mut [u8; ICMP6_ERROR_LEN], at: usize, value: &[u8; N]) {
    bytes[at..at + N].copy_from_slice(value);
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;

    use super::*;

    /// The one's complement sum of a buffer, computed from scratch (RFC 1071); 0 for a buffer
    /// whose checksum field is right.
    fn full_checksum(bytes: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for pair in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// A port unreachable quoting a UDP datagram without payload (so that its whole checksum
    /// lies in the quote) from `source` to `destination`, every checksum computed whole.
    fn port_unreachable(source: (u32, u16), destination: (u32, u16)) -> [u8; ICMP_ERROR_LEN] {
        let mut error = [0u8; ICMP_ERROR_LEN];
        error[0] = DEST_UNREACHABLE;
        error[1] = 3;
        let ip = ICMP_HDR_LEN;
        error[ip] = 0x45;
        error[ip + 2..ip + 4].copy_from_slice(&28u16.to_be_bytes());
        error[ip + 8] = 64;
        error[ip + 9] = proto::UDP;
        error[QUOTED_SADDR..QUOTED_SADDR + 4].copy_from_slice(&source.0.to_be_bytes());
        error[QUOTED_DADDR..QUOTED_DADDR + 4].copy_from_slice(&destination.0.to_be_bytes());
        let ip_check = full_checksum(&error[ip..ip + 20]);
        error[QUOTED_IP_CHECK..QUOTED_IP_CHECK + 2].copy_from_slice(&ip_check.to_be_bytes());
        error[QUOTED_SPORT..QUOTED_SPORT + 2].copy_from_slice(&source.1.to_be_bytes());
        error[QUOTED_DPORT..QUOTED_DPORT + 2].copy_from_slice(&destination.1.to_be_bytes());
        error[ICMP_HDR_LEN + 24..ICMP_HDR_LEN + 26].copy_from_slice(&8u16.to_be_bytes());
        let udp_check = udp_checksum(&error);
        error[QUOTED_UDP_CHECK..QUOTED_UDP_CHECK + 2].copy_from_slice(&udp_check.to_be_bytes());
        let icmp_check = full_checksum(&error);
        error[2..4].copy_from_slice(&icmp_check.to_be_bytes());
        error
    }

    /// The quoted UDP header's checksum over its pseudo-header, as the quote's addresses give it.
    fn udp_checksum(error: &[u8; ICMP_ERROR_LEN]) -> u16 {
        let mut pseudo = [0u8; 20];
        pseudo[0..8].copy_from_slice(&error[QUOTED_SADDR..QUOTED_SADDR + 8]);
        pseudo[9] = proto::UDP;
        pseudo[10..12].copy_from_slice(&8u16.to_be_bytes());
        pseudo[12..20].copy_from_slice(&error[ICMP_HDR_LEN + 20..ICMP_HDR_LEN + 28]);
        pseudo[18..20].fill(0);
        full_checksum(&pseudo)
    }

    #[test]
    fn a_rewritten_quote_keeps_every_checksum_right() {
        let client = (0xcb00_710a, 40_000);
        let frontend = (0xcb00_7101, 30_080);
        let backend = (0x0af4_020a, 8080);
        let snat = (0xcb00_7101, 61_000);
        let error = port_unreachable(snat, backend);
        assert_eq!(full_checksum(&error), 0);
        let quote = quoted(&error).expect("a quote");
        assert_eq!(
            (quote.proto, quote.source, quote.destination),
            (proto::UDP, snat, backend)
        );
        let mut rewritten = error;
        rewrite_quoted(&mut rewritten, &quote, client, frontend);
        let again = quoted(&rewritten).expect("still a quote");
        assert_eq!((again.source, again.destination), (client, frontend));
        assert_eq!(full_checksum(&rewritten), 0, "ICMP checksum");
        assert_eq!(
            full_checksum(&rewritten[ICMP_HDR_LEN..ICMP_HDR_LEN + 20]),
            0,
            "quoted IPv4 checksum"
        );
        let udp =
            u16::from_be_bytes([rewritten[QUOTED_UDP_CHECK], rewritten[QUOTED_UDP_CHECK + 1]]);
        assert_eq!(udp, udp_checksum(&rewritten), "quoted UDP checksum");
        // A quoted UDP checksum of 0 (none) stays 0.
        let mut unchecked = error;
        unchecked[QUOTED_UDP_CHECK..QUOTED_UDP_CHECK + 2].fill(0);
        let icmp_check = {
            unchecked[2..4].fill(0);
            full_checksum(&unchecked)
        };
        unchecked[2..4].copy_from_slice(&icmp_check.to_be_bytes());
        rewrite_quoted(&mut unchecked, &quote, client, frontend);
        assert_eq!(&unchecked[QUOTED_UDP_CHECK..QUOTED_UDP_CHECK + 2], &[0, 0]);
        assert_eq!(
            full_checksum(&unchecked),
            0,
            "ICMP checksum without a UDP one"
        );
    }

    #[test]
    fn only_errors_quoting_a_transport_header_are_quotes() {
        let error = port_unreachable((1, 2), (3, 4));
        let mut echo_reply = error;
        echo_reply[0] = 0;
        assert!(quoted(&echo_reply).is_none());
        let mut short_header = error;
        short_header[ICMP_HDR_LEN] = 0x44;
        assert!(quoted(&short_header).is_none());
        let mut version6 = error;
        version6[ICMP_HDR_LEN] = 0x65;
        assert!(quoted(&version6).is_none());
        let mut icmp_in_icmp = error;
        icmp_in_icmp[ICMP_HDR_LEN + 9] = 1;
        assert!(quoted(&icmp_in_icmp).is_none());
        // Don't Fragment and More Fragments set, offset 0: a whole datagram or a first fragment,
        // whose transport header is quoted.
        let mut first_fragment = error;
        first_fragment[QUOTED_FRAGMENT] = 0x60;
        assert!(quoted(&first_fragment).is_some());
        // Offset 185 x 8 bytes: no transport header, the 8 bytes are data.
        let mut later_fragment = error;
        later_fragment[QUOTED_FRAGMENT..QUOTED_FRAGMENT + 2].copy_from_slice(&185u16.to_be_bytes());
        assert!(quoted(&later_fragment).is_none());
        for kind in [DEST_UNREACHABLE, TIME_EXCEEDED, PARAMETER_PROBLEM] {
            let mut other = error;
            other[0] = kind;
            assert!(quoted(&other).is_some(), "type {kind}");
        }
    }

    /// An ICMPv6 message at offset 4 of a buffer: `icmp6_type`, a quoted fixed header whose
    /// Next Header is Destination Options, 16 bytes of them, then a UDP header.
    fn icmp6_quoting_options(icmp6_type: u8) -> ([u8; 4 + 48 + 16 + 8], [u8; 8]) {
        let mut bytes = [0u8; 4 + 48 + 16 + 8];
        bytes[4] = icmp6_type;
        bytes[4 + ICMP_HDR_LEN] = 0x60;
        bytes[4 + QUOTED6_NEXT] = ipv6::next_header::DEST_OPTS;
        bytes[4 + QUOTED6_SADDR] = 0x20;
        let options = 4 + QUOTED6_TRANSPORT;
        bytes[options] = proto::UDP;
        bytes[options + 1] = 1;
        let udp = [0x9c, 0x40, 0, 53, 0, 8, 0xab, 0xcd];
        bytes[options + 16..].copy_from_slice(&udp);
        (bytes, udp)
    }

    #[test]
    fn gather6_puts_an_error_and_the_transport_header_behind_its_quotes_options_together() {
        let gather = |bytes: &[u8], error: &mut [u8; ICMP6_ERROR_LEN]| {
            let load_head = |head: &mut [u8; QUOTED6_TRANSPORT]| {
                head.copy_from_slice(&bytes[4..4 + QUOTED6_TRANSPORT]);
                true
            };
            let peek = |offset: usize| bytes.get(offset..offset + 8)?.try_into().ok();
            gather6(error, 4, load_head, peek)
        };
        let (bytes, udp) = icmp6_quoting_options(2);
        let mut error = [0u8; ICMP6_ERROR_LEN];
        let gathered = gather(&bytes, &mut error).expect("a packet too big quoting UDP");
        assert_eq!(
            (gathered.protocol, gathered.transport_at),
            (proto::UDP, 4 + QUOTED6_TRANSPORT + 16)
        );
        assert_eq!(error[..QUOTED6_TRANSPORT], bytes[4..4 + QUOTED6_TRANSPORT]);
        assert_eq!(error[QUOTED6_TRANSPORT..], udp);
        let quote = quoted6(&error, gathered.protocol).expect("a quote");
        assert_eq!((quote.source.1, quote.destination.1), (40000, 53));
        let (head, transport) = parts6(&error).expect("constant lengths");
        assert_eq!((&head[..], &transport[..]), (&bytes[4..52], &udp[..]));

        let (echo_reply, _) = icmp6_quoting_options(129);
        assert!(gather(&echo_reply, &mut error).is_none(), "not an error");
        let (cut, _) = icmp6_quoting_options(2);
        assert!(
            gather(&cut[..cut.len() - 4], &mut error).is_none(),
            "the quote ends inside the UDP header"
        );
    }

    #[test]
    fn gather_puts_an_error_and_the_transport_header_behind_its_quotes_options_together() {
        // A port unreachable at offset 4 of a buffer, quoting a header with 8 bytes of options.
        let plain = port_unreachable((0x0a00_0001, 40000), (0x0a60_0001, 53));
        let mut bytes = vec![0u8; 4];
        bytes.extend_from_slice(&plain[..QUOTED_TRANSPORT]);
        bytes.extend_from_slice(&[1, 1, 1, 0, 0, 0, 0, 0]);
        bytes.extend_from_slice(&plain[QUOTED_TRANSPORT..]);
        bytes[4 + ICMP_HDR_LEN] = 0x47;
        let gather = |bytes: &[u8], error: &mut [u8; ICMP_ERROR_LEN]| {
            let load_head = |head: &mut [u8; QUOTED_TRANSPORT]| {
                head.copy_from_slice(&bytes[4..4 + QUOTED_TRANSPORT]);
                true
            };
            let load_transport = |at: usize, transport: &mut [u8; 8]| match bytes.get(at..at + 8) {
                Some(found) => {
                    transport.copy_from_slice(found);
                    true
                }
                None => false,
            };
            gather(error, 4, load_head, load_transport)
        };
        let mut error = [0u8; ICMP_ERROR_LEN];
        let transport_at = gather(&bytes, &mut error).expect("an error quoting UDP");
        assert_eq!(transport_at, 4 + QUOTED_TRANSPORT + 8);
        assert_eq!(error[QUOTED_TRANSPORT..], plain[QUOTED_TRANSPORT..]);
        let quote = quoted(&error).expect("a quote");
        assert_eq!((quote.source.1, quote.destination.1), (40000, 53));
        let (head, transport) = parts(&error).expect("constant lengths");
        assert_eq!(
            (&head[..], &transport[..]),
            (&bytes[4..4 + QUOTED_TRANSPORT], &bytes[transport_at..])
        );
        assert!(
            gather(&bytes[..bytes.len() - 1], &mut error).is_none(),
            "the quote ends inside the UDP header"
        );
        let mut echo_reply = bytes.clone();
        echo_reply[4] = 0;
        assert!(gather(&echo_reply, &mut error).is_none(), "not an error");
    }
}
