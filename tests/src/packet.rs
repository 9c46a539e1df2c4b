//! Packets for `BPF_PROG_TEST_RUN` tables, built with etherparse so the expected checksums come
//! from an implementation independent of the datapath's incremental updates.

use std::net::SocketAddrV4;

use etherparse::{Ipv4HeaderSlice, PacketBuilder};

/// MAC addresses of the crafted frames (locally administered).
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

pub const ETH_HDR_LEN: usize = 14;
const TTL: u8 = 64;

/// TCP flags of a crafted segment.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
    pub psh: bool,
}

impl TcpFlags {
    pub const SYN: Self = Self {
        syn: true,
        ack: false,
        fin: false,
        rst: false,
        psh: false,
    };
    pub const ACK: Self = Self {
        syn: false,
        ack: true,
        fin: false,
        rst: false,
        psh: false,
    };
    pub const SYN_ACK: Self = Self {
        syn: true,
        ack: true,
        fin: false,
        rst: false,
        psh: false,
    };
    pub const FIN_ACK: Self = Self {
        syn: false,
        ack: true,
        fin: true,
        rst: false,
        psh: false,
    };
    pub const RST: Self = Self {
        syn: false,
        ack: false,
        fin: false,
        rst: true,
        psh: false,
    };
}

/// An Ethernet/IPv4/TCP frame with correct checksums.
pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: TcpFlags, payload: &[u8]) -> Vec<u8> {
    tcp_at(src, dst, flags, 1000, payload)
}

/// As [`tcp`], with sequence number `seq` (and acknowledgment number 1).
pub fn tcp_at(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    flags: TcpFlags,
    seq: u32,
    payload: &[u8],
) -> Vec<u8> {
    tcp_acking(src, dst, flags, (seq, 1), payload)
}

/// As [`tcp`], with sequence and acknowledgment numbers `(seq, ack)` (the acknowledgment number
/// is written when `flags` has ACK).
pub fn tcp_acking(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    flags: TcpFlags,
    (seq, ack): (u32, u32),
    payload: &[u8],
) -> Vec<u8> {
    let mut builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.ip().octets(), dst.ip().octets(), TTL)
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

/// An Ethernet/IPv4/UDP frame with correct checksums.
pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.ip().octets(), dst.ip().octets(), TTL)
        .udp(src.port(), dst.port());
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut frame, payload)
        .expect("writing to a Vec cannot fail");
    frame
}

/// The CRC32c of SCTP (Castagnoli, as in iSCSI), from the `crc` crate: independent of the
/// datapath's incremental update.
const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// An Ethernet/IPv4/SCTP frame of one chunk of `chunk_type` whose value is `value` (padded to 4
/// bytes), with verification tag `tag`, its CRC32c computed whole over the SCTP packet (field
/// counted as zero, stored little-endian as Linux does).
pub fn sctp(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    chunk_type: u8,
    tag: u32,
    value: &[u8],
) -> Vec<u8> {
    sctp_with_chunk_flags(src, dst, chunk_type, 0, tag, value)
}

/// As [`sctp`], the chunk's flags byte set to `chunk_flags`.
pub fn sctp_with_chunk_flags(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    chunk_type: u8,
    chunk_flags: u8,
    tag: u32,
    value: &[u8],
) -> Vec<u8> {
    let mut sctp = Vec::new();
    sctp.extend_from_slice(&src.port().to_be_bytes());
    sctp.extend_from_slice(&dst.port().to_be_bytes());
    sctp.extend_from_slice(&tag.to_be_bytes());
    sctp.extend_from_slice(&[0; 4]);
    sctp.extend_from_slice(&[chunk_type, chunk_flags]);
    sctp.extend_from_slice(&(4 + value.len() as u16).to_be_bytes());
    sctp.extend_from_slice(value);
    sctp.resize(sctp.len().next_multiple_of(4), 0);
    let checksum = CRC32C.checksum(&sctp);
    sctp[8..12].copy_from_slice(&checksum.to_le_bytes());
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ipv4(
        src.ip().octets(),
        dst.ip().octets(),
        TTL,
    );
    let mut frame = Vec::with_capacity(builder.size(sctp.len()));
    builder
        .write(&mut frame, etherparse::IpNumber::SCTP, &sctp)
        .expect("writing to a Vec cannot fail");
    frame
}

/// Whether the CRC32c of an Ethernet/IPv4 (no options) SCTP frame is right, recomputed whole.
pub fn sctp_checksum_ok(frame: &[u8]) -> bool {
    let mut sctp = frame[ETH_HDR_LEN + 20..].to_vec();
    let stored = u32::from_le_bytes(sctp[8..12].try_into().expect("a common header"));
    sctp[8..12].fill(0);
    CRC32C.checksum(&sctp) == stored
}

/// An Ethernet/IPv4/ICMP echo request.
pub fn icmp_echo(src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.octets(), dst.octets(), TTL)
        .icmpv4_echo_request(7, 1);
    let mut frame = Vec::with_capacity(builder.size(8));
    builder
        .write(&mut frame, &[0u8; 8])
        .expect("writing to a Vec cannot fail");
    frame
}

/// A frame of another EtherType with `len` bytes of payload.
pub fn non_ip(ethertype: u16, len: usize) -> Vec<u8> {
    let mut frame = Vec::with_capacity(ETH_HDR_LEN + len);
    frame.extend_from_slice(&NODE_MAC);
    frame.extend_from_slice(&CLIENT_MAC);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.resize(ETH_HDR_LEN + len, 0);
    frame
}

/// `frame` with IPv4 options inserted after the fixed header (a multiple of 4 bytes, at most 40);
/// IHL, total length and the header checksum are updated. Transport checksums do not cover IP
/// options, so they stay valid.
pub fn with_ip_options(frame: &[u8], options: &[u8]) -> Vec<u8> {
    assert!(
        options.len().is_multiple_of(4) && options.len() <= 40,
        "IPv4 options are 0..=40 bytes in 4s"
    );
    let ip = ETH_HDR_LEN;
    let header_len = usize::from(frame[ip] & 0x0f) * 4;
    let mut out = frame[..ip + header_len].to_vec();
    out.extend_from_slice(options);
    out.extend_from_slice(&frame[ip + header_len..]);
    out[ip] = 0x40 | u8::try_from((header_len + options.len()) / 4).expect("IHL fits");
    let total = u16::from_be_bytes([out[ip + 2], out[ip + 3]]) + options.len() as u16;
    out[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
    fix_ip_checksum(&mut out);
    out
}

/// `frame` marked as an IPv4 fragment (offset in 8-byte units, and the More Fragments flag).
pub fn as_fragment(frame: &[u8], offset_units: u16, more_fragments: bool) -> Vec<u8> {
    let mut out = frame.to_vec();
    let ip = ETH_HDR_LEN;
    let flags = if more_fragments { 0x2000 } else { 0 };
    out[ip + 6..ip + 8].copy_from_slice(&(flags | (offset_units & 0x1fff)).to_be_bytes());
    fix_ip_checksum(&mut out);
    out
}

/// An Ethernet/IPv4 frame without IP options cut into two IP fragments, the first carrying
/// `first_len` bytes of the IP payload (a multiple of 8), each with its own header checksum.
pub fn fragments(frame: &[u8], first_len: usize) -> [Vec<u8>; 2] {
    assert_eq!(first_len % 8, 0, "fragment offsets count 8-byte units");
    let header_end = ETH_HDR_LEN + 20;
    let (payload_a, payload_b) = frame[header_end..].split_at(first_len);
    let piece = |payload: &[u8], offset_units: u16, more: bool| {
        let mut out = frame[..header_end].to_vec();
        out.extend_from_slice(payload);
        let total = (20 + payload.len()) as u16;
        out[ETH_HDR_LEN + 2..ETH_HDR_LEN + 4].copy_from_slice(&total.to_be_bytes());
        as_fragment(&out, offset_units, more)
    };
    [
        piece(payload_a, 0, true),
        piece(payload_b, (first_len / 8) as u16, false),
    ]
}

/// An ICMP error (`icmp_type`, `code`, the header's second word `rest`) from `src` to `dst`
/// quoting the IPv4 header (its options included) and the first 8 transport bytes of the frame
/// `about`, as a router sends it (RFC 792); checksums by etherparse.
pub fn icmp_error(
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    (icmp_type, code, rest): (u8, u8, [u8; 4]),
    about: &[u8],
) -> Vec<u8> {
    let header_len = usize::from(about[ETH_HDR_LEN] & 0x0f) * 4;
    let quote = &about[ETH_HDR_LEN..ETH_HDR_LEN + header_len + 8];
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.octets(), dst.octets(), TTL)
        .icmpv4_raw(icmp_type, code, rest);
    let mut out = Vec::with_capacity(builder.size(quote.len()));
    builder.write(&mut out, quote).expect("build icmp");
    out
}

/// Recomputes the IPv4 header checksum of an Ethernet frame (etherparse's implementation).
pub fn fix_ip_checksum(frame: &mut [u8]) {
    let header = Ipv4HeaderSlice::from_slice(&frame[ETH_HDR_LEN..])
        .expect("a well-formed IPv4 header")
        .to_header();
    let checksum = header.calc_header_checksum();
    frame[ETH_HDR_LEN + 10..ETH_HDR_LEN + 12].copy_from_slice(&checksum.to_be_bytes());
}

/// The RST (or RST+ACK) a node sends back for a TCP segment to a service with no endpoint, as an
/// independent reference: from `from` (the frontend) to `to` (the client), MACs swapped, TTL 64,
/// IP id 0 and DF clear, window 0, checksums from etherparse.
pub fn tcp_reset_reply(
    from: SocketAddrV4,
    to: SocketAddrV4,
    seq: u32,
    ack: Option<u32>,
) -> Vec<u8> {
    let mut tcp = etherparse::TcpHeader::new(from.port(), to.port(), seq, 0);
    tcp.rst = true;
    if let Some(ack) = ack {
        tcp.ack = true;
        tcp.acknowledgment_number = ack;
    }
    let mut ip = etherparse::Ipv4Header::new(
        20,
        TTL,
        etherparse::IpNumber::TCP,
        from.ip().octets(),
        to.ip().octets(),
    )
    .expect("valid header");
    ip.dont_fragment = false;
    tcp.checksum = tcp.calc_checksum_ipv4(&ip, &[]).expect("checksum");
    ip.header_checksum = ip.calc_header_checksum();
    let mut frame = Vec::new();
    etherparse::Ethernet2Header {
        source: NODE_MAC,
        destination: CLIENT_MAC,
        ether_type: etherparse::EtherType::IPV4,
    }
    .write(&mut frame)
    .expect("write");
    ip.write(&mut frame).expect("write");
    tcp.write(&mut frame).expect("write");
    frame
}

/// The ICMP port unreachable a node sends back for a UDP datagram (`original`, a whole frame) to a
/// service with no endpoint: from `from` (the frontend) to `to` (the client), quoting the
/// original IP header and the first 8 bytes after it.
pub fn icmp_port_unreachable_reply(
    from: std::net::Ipv4Addr,
    to: std::net::Ipv4Addr,
    original: &[u8],
) -> Vec<u8> {
    let quote = &original[ETH_HDR_LEN..ETH_HDR_LEN + 28];
    let icmp_type = etherparse::Icmpv4Type::DestinationUnreachable(
        etherparse::icmpv4::DestUnreachableHeader::Port,
    );
    let icmp = etherparse::Icmpv4Header::with_checksum(icmp_type, quote);
    let mut ip = etherparse::Ipv4Header::new(
        (icmp.header_len() + quote.len()) as u16,
        TTL,
        etherparse::IpNumber::ICMP,
        from.octets(),
        to.octets(),
    )
    .expect("valid header");
    ip.dont_fragment = false;
    ip.header_checksum = ip.calc_header_checksum();
    let mut frame = Vec::new();
    etherparse::Ethernet2Header {
        source: NODE_MAC,
        destination: CLIENT_MAC,
        ether_type: etherparse::EtherType::IPV4,
    }
    .write(&mut frame)
    .expect("write");
    ip.write(&mut frame).expect("write");
    icmp.write(&mut frame).expect("write");
    frame.extend_from_slice(quote);
    frame
}
