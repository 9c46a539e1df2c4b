//! ICMP errors about translated flows: what they quote and how the quote is rewritten, for the
//! XDP and tc programs alike. Pure functions over the error's bytes.

use lb_common::{checksum, proto};

/// The ICMP header of an error.
pub const ICMP_HDR_LEN: usize = 8;
/// An error's header, the quoted IPv4 header (without options) and the quoted 8 bytes of its
/// transport header (RFC 792): all a translation reads and writes.
pub const ICMP_ERROR_LEN: usize = ICMP_HDR_LEN + 20 + 8;
const DEST_UNREACHABLE: u8 = 3;
const TIME_EXCEEDED: u8 = 11;
const PARAMETER_PROBLEM: u8 = 12;
/// Offsets in the error: the quoted IP checksum, addresses, ports and UDP checksum.
const QUOTED_IP_CHECK: usize = ICMP_HDR_LEN + 10;
const QUOTED_SADDR: usize = ICMP_HDR_LEN + 12;
const QUOTED_DADDR: usize = ICMP_HDR_LEN + 16;
const QUOTED_SPORT: usize = ICMP_HDR_LEN + 20;
const QUOTED_DPORT: usize = ICMP_HDR_LEN + 22;
const QUOTED_UDP_CHECK: usize = ICMP_HDR_LEN + 26;

/// The TCP/UDP packet an ICMP error quotes (host order of the wire bytes).
#[derive(Clone, Copy)]
pub struct Quoted {
    pub proto: u8,
    pub source: (u32, u16),
    pub destination: (u32, u16),
}

/// What an ICMP error (destination unreachable, including fragmentation needed; time exceeded;
/// parameter problem) quotes, when that is a TCP or UDP packet whose IPv4 header has no options;
/// `None` for any other ICMP message.
#[inline(always)]
pub fn quoted(error: &[u8; ICMP_ERROR_LEN]) -> Option<Quoted> {
    let protocol = error[ICMP_HDR_LEN + 9];
    if !matches!(
        error[0],
        DEST_UNREACHABLE | TIME_EXCEEDED | PARAMETER_PROBLEM
    ) || error[ICMP_HDR_LEN] != 0x45
        || (protocol != proto::TCP && protocol != proto::UDP)
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
