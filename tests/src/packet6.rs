//! IPv6 packets for `BPF_PROG_TEST_RUN` tables, the twins of [`crate::packet`]'s IPv4 builders:
//! built with etherparse, so that the expected checksums come from an implementation
//! independent of the datapath's incremental updates, plus edits that insert extension headers
//! and a checker that recomputes a TCP/UDP checksum from scratch.

use std::net::{Ipv6Addr, SocketAddrV6};

use etherparse::PacketBuilder;

use crate::packet::{CLIENT_MAC, ETH_HDR_LEN, NODE_MAC, TcpFlags};

/// The fixed IPv6 header.
pub const IPV6_HDR_LEN: usize = 40;
const HOP_LIMIT: u8 = 64;

/// Next Header values the builders and the checker know.
pub mod next_header {
    pub const HOP_BY_HOP: u8 = 0;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const ICMPV6: u8 = 58;
    pub const DEST_OPTS: u8 = 60;
    pub const SCTP: u8 = 132;
}

/// An Ethernet/IPv6/TCP frame with a correct checksum, sequence number `seq` (and
/// acknowledgment number 1).
pub fn tcp(
    src: SocketAddrV6,
    dst: SocketAddrV6,
    flags: TcpFlags,
    seq: u32,
    payload: &[u8],
) -> Vec<u8> {
    tcp_acking(src, dst, flags, (seq, 1), payload)
}

/// As [`tcp`], with sequence and acknowledgment numbers `(seq, ack)` (the acknowledgment number
/// is written when `flags` has ACK).
pub fn tcp_acking(
    src: SocketAddrV6,
    dst: SocketAddrV6,
    flags: TcpFlags,
    (seq, ack): (u32, u32),
    payload: &[u8],
) -> Vec<u8> {
    let mut builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6(src.ip().octets(), dst.ip().octets(), HOP_LIMIT)
        .tcp(src.port(), dst.port(), seq, 64240);
    if flags.syn {
        builder = builder.syn();
    }
    if flags.ack {
        builder = builder.ack(ack);
    }
    if flags.fin {
        builder = builder.fin();
    }
    if flags.rst {
        builder = builder.rst();
    }
    if flags.psh {
        builder = builder.psh();
    }
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut frame, payload)
        .expect("writing to a Vec cannot fail");
    frame
}

/// An Ethernet/IPv6/UDP frame with a correct checksum.
pub fn udp(src: SocketAddrV6, dst: SocketAddrV6, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6(src.ip().octets(), dst.ip().octets(), HOP_LIMIT)
        .udp(src.port(), dst.port());
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut frame, payload)
        .expect("writing to a Vec cannot fail");
    frame
}

/// An Ethernet/IPv6/SCTP frame of one chunk of `chunk_type` with verification tag `tag` and the
/// chunk value `value` (padded to 4 bytes), its CRC32c computed whole (stored little-endian, as
/// Linux does).
pub fn sctp(
    src: SocketAddrV6,
    dst: SocketAddrV6,
    chunk_type: u8,
    tag: u32,
    value: &[u8],
) -> Vec<u8> {
    let mut sctp = Vec::new();
    sctp.extend_from_slice(&src.port().to_be_bytes());
    sctp.extend_from_slice(&dst.port().to_be_bytes());
    sctp.extend_from_slice(&tag.to_be_bytes());
    sctp.extend_from_slice(&[0; 4]);
    let chunk_len = u16::try_from(4 + value.len()).expect("a chunk fits");
    sctp.extend_from_slice(&[chunk_type, 0]);
    sctp.extend_from_slice(&chunk_len.to_be_bytes());
    sctp.extend_from_slice(value);
    sctp.resize(sctp.len().next_multiple_of(4), 0);
    let checksum = CRC32C.checksum(&sctp);
    sctp[8..12].copy_from_slice(&checksum.to_le_bytes());
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ipv6(
        src.ip().octets(),
        dst.ip().octets(),
        HOP_LIMIT,
    );
    let mut frame = Vec::with_capacity(builder.size(sctp.len()));
    builder
        .write(&mut frame, etherparse::IpNumber::SCTP, &sctp)
        .expect("writing to a Vec cannot fail");
    frame
}

const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// Whether the CRC32c of the SCTP packet of an Ethernet/IPv6 frame without extension headers is
/// right, recomputed whole.
pub fn sctp_checksum_ok(frame: &[u8]) -> bool {
    let mut sctp = frame[ETH_HDR_LEN + IPV6_HDR_LEN..].to_vec();
    let stored = u32::from_le_bytes(sctp[8..12].try_into().expect("a common header"));
    sctp[8..12].fill(0);
    CRC32C.checksum(&sctp) == stored
}

/// An Ethernet/IPv6 neighbour solicitation (ICMPv6 135) from `src` for `target`, to its
/// solicited-node multicast address.
pub fn neighbour_solicitation(src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let t = target.octets();
    let solicited: Ipv6Addr = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(t[13]),
        u16::from_be_bytes([t[14], t[15]]),
    );
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6(src.octets(), solicited.octets(), 255)
        .icmpv6_raw(135, 0, [0; 4]);
    let mut frame = Vec::with_capacity(builder.size(16));
    builder
        .write(&mut frame, &t)
        .expect("writing to a Vec cannot fail");
    frame
}

/// An Ethernet/IPv6 ICMPv6 message (`icmp_type`, `code`, the header's second word `rest`) from
/// `src` to `dst` quoting the first `quote_len` bytes of the IPv6 packet of the frame `about`, as
/// an error quotes the packet it is about (RFC 4443); checksum by etherparse.
pub fn icmpv6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    (icmp_type, code, rest): (u8, u8, [u8; 4]),
    about: &[u8],
    quote_len: usize,
) -> Vec<u8> {
    let quote = &about[ETH_HDR_LEN..ETH_HDR_LEN + quote_len];
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6(src.octets(), dst.octets(), HOP_LIMIT)
        .icmpv6_raw(icmp_type, code, rest);
    let mut frame = Vec::with_capacity(builder.size(quote.len()));
    builder
        .write(&mut frame, quote)
        .expect("writing to a Vec cannot fail");
    frame
}

/// `frame` with an options-style extension header (Hop-by-Hop or Destination Options) of
/// `words` x 8 bytes inserted right after the fixed header, padded with a PadN option. The
/// payload length and the Next Header chain are updated; the transport checksum stays right (its
/// pseudo-header holds the upper-layer length, not the payload length).
pub fn with_options_header(frame: &[u8], kind: u8, words: usize) -> Vec<u8> {
    assert!((1..=256).contains(&words), "1 to 256 words of 8 bytes");
    let mut header = vec![
        frame[ETH_HDR_LEN + 6],
        u8::try_from(words - 1).expect("fits"),
    ];
    // PadN over the rest of the header.
    header.push(1);
    header.push(u8::try_from(words * 8 - 4).expect("a PadN fits in one option"));
    header.resize(words * 8, 0);
    insert_after_fixed_header(frame, kind, &header)
}

/// `frame` with a Segment Routing header (RFC 8754: a Routing header of type 4) of one segment,
/// 24 bytes, inserted right after the fixed header, `segments_left` of its addresses still to
/// visit. The transport checksum stays right for 0 (the fixed header's destination is the
/// final one), and is the final destination's (the segment's, here unspecified) otherwise.
pub fn with_routing_header(frame: &[u8], segments_left: u8) -> Vec<u8> {
    const SEGMENT_ROUTING: u8 = 4;
    let mut header = vec![
        frame[ETH_HDR_LEN + 6],
        2,
        SEGMENT_ROUTING,
        segments_left,
        0,
        0,
        0,
        0,
    ];
    header.extend_from_slice(&[0; 16]);
    insert_after_fixed_header(frame, next_header::ROUTING, &header)
}

/// `frame` with a Fragment header inserted right after the fixed header: `offset_units` (8-byte
/// units), More Fragments, identification `id`. The bytes after it are kept as they are (a test
/// fragment, not a real cut).
pub fn with_fragment_header(frame: &[u8], offset_units: u16, more: bool, id: u32) -> Vec<u8> {
    let mut header = vec![frame[ETH_HDR_LEN + 6], 0];
    header.extend_from_slice(&((offset_units << 3) | u16::from(more)).to_be_bytes());
    header.extend_from_slice(&id.to_be_bytes());
    insert_after_fixed_header(frame, next_header::FRAGMENT, &header)
}

/// An Ethernet/IPv6 frame without extension headers cut into two fragments of datagram `id`
/// (RFC 8200 section 4.5): each the fixed header and a Fragment header, the first with
/// `first_len` bytes of the payload (a multiple of 8), the second with the rest. The transport
/// checksum stays that of the whole datagram, which the first fragment carries.
pub fn fragments(frame: &[u8], first_len: usize, id: u32) -> [Vec<u8>; 2] {
    assert_eq!(first_len % 8, 0, "fragment offsets count 8-byte units");
    let fixed_end = ETH_HDR_LEN + IPV6_HDR_LEN;
    let upper = frame[ETH_HDR_LEN + 6];
    let (first, rest) = frame[fixed_end..].split_at(first_len);
    let piece = |data: &[u8], offset_units: u16, more: bool| {
        let mut out = frame[..fixed_end].to_vec();
        out[ETH_HDR_LEN + 6] = next_header::FRAGMENT;
        let payload_len = u16::try_from(8 + data.len()).expect("fits");
        out[ETH_HDR_LEN + 4..ETH_HDR_LEN + 6].copy_from_slice(&payload_len.to_be_bytes());
        out.extend_from_slice(&[upper, 0]);
        out.extend_from_slice(&((offset_units << 3) | u16::from(more)).to_be_bytes());
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(data);
        out
    };
    let second_offset = u16::try_from(first_len / 8).expect("fits");
    [piece(first, 0, true), piece(rest, second_offset, false)]
}

/// The fragments of [`fragments`] put back together as the frame they came from: the check of
/// a translated datagram's transport checksum, which no single fragment shows.
pub fn reassembled(fragments: &[Vec<u8>; 2]) -> Vec<u8> {
    let fixed_end = ETH_HDR_LEN + IPV6_HDR_LEN;
    let data_at = fixed_end + 8;
    let mut out = fragments[0][..fixed_end].to_vec();
    out[ETH_HDR_LEN + 6] = fragments[0][fixed_end];
    out.extend_from_slice(&fragments[0][data_at..]);
    out.extend_from_slice(&fragments[1][data_at..]);
    let payload_len = u16::try_from(out.len() - fixed_end).expect("fits");
    out[ETH_HDR_LEN + 4..ETH_HDR_LEN + 6].copy_from_slice(&payload_len.to_be_bytes());
    out
}

fn insert_after_fixed_header(frame: &[u8], kind: u8, header: &[u8]) -> Vec<u8> {
    let fixed_end = ETH_HDR_LEN + IPV6_HDR_LEN;
    let mut out = frame[..fixed_end].to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(&frame[fixed_end..]);
    out[ETH_HDR_LEN + 6] = kind;
    let payload = u16::from_be_bytes([out[ETH_HDR_LEN + 4], out[ETH_HDR_LEN + 5]]);
    let payload = payload + u16::try_from(header.len()).expect("fits");
    out[ETH_HDR_LEN + 4..ETH_HDR_LEN + 6].copy_from_slice(&payload.to_be_bytes());
    out
}

/// `frame` (IPv6 without extension headers, UDP) with its UDP checksum field set to `value`.
pub fn with_udp_checksum(frame: &[u8], value: u16) -> Vec<u8> {
    let mut out = frame.to_vec();
    let udp = ETH_HDR_LEN + IPV6_HDR_LEN;
    out[udp + 6..udp + 8].copy_from_slice(&value.to_be_bytes());
    out
}

/// Where the transport header of an IPv6 frame starts (from the frame's start) and its
/// protocol, past Hop-by-Hop, Routing, Destination Options and Fragment headers (the frame is
/// whole, or a first fragment that holds the whole datagram).
pub fn transport(frame: &[u8]) -> (u8, usize) {
    let mut next = frame[ETH_HDR_LEN + 6];
    let mut offset = ETH_HDR_LEN + IPV6_HDR_LEN;
    loop {
        let len = match next {
            next_header::HOP_BY_HOP | next_header::ROUTING | next_header::DEST_OPTS => {
                (usize::from(frame[offset + 1]) + 1) * 8
            }
            next_header::FRAGMENT => 8,
            _ => break,
        };
        next = frame[offset];
        offset += len;
    }
    (next, offset)
}

/// Whether the TCP or UDP checksum of an Ethernet/IPv6 frame is right, recomputed whole from
/// the pseudo-header (RFC 8200 section 8.1: both addresses, the upper-layer length, the Next
/// Header value) and the transport bytes; a UDP checksum of 0 is never right over IPv6.
pub fn transport_checksum_ok(frame: &[u8]) -> bool {
    let (protocol, offset) = transport(frame);
    let ip = &frame[ETH_HDR_LEN..];
    let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    // A payload length of 0: a BIG TCP super-packet, as long as its frame.
    let end = match payload_len {
        0 => frame.len(),
        len => ETH_HDR_LEN + IPV6_HDR_LEN + len,
    };
    let upper = &frame[offset..end];
    if protocol == next_header::UDP && upper[6..8] == [0, 0] {
        return false;
    }
    let mut sum: u64 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let high = u64::from(pair[0]) << 8;
            sum += high | pair.get(1).map_or(0, |low| u64::from(*low));
        }
    };
    add(&ip[8..40]);
    add(&u32::try_from(upper.len()).expect("fits").to_be_bytes());
    add(&[0, 0, 0, protocol]);
    add(upper);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}
