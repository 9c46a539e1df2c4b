//! IPv6 headers as the datapath reads them: the fixed header, and the walk over extension
//! headers to the transport header (RFC 8200 section 4), one header at a time, so that the XDP
//! and tc programs can run the same steps in a bounded loop over packet bytes and host tests can
//! run them over a byte slice.
//!
//! Every extension header this walks is at least 8 bytes long and says its own length in its
//! first two bytes (the Fragment header is 8 bytes exactly), so a step needs the first 8 bytes
//! of the header it is at and nothing else.

use crate::proto;

/// The fixed IPv6 header.
pub const IPV6_HDR_LEN: usize = 40;
/// What a step reads of each extension header.
pub const EXT_HDR_PEEK: usize = 8;
/// How many extension headers a packet may have before its transport header for the datapath
/// to translate it; a packet with more passes untouched. RFC 8200 section 4.1 recommends at
/// most one of each kind but Destination Options (which may come twice): seven.
pub const MAX_EXT_HEADERS: usize = 8;

/// Next Header values (IANA "Assigned Internet Protocol Numbers").
pub mod next_header {
    pub const HOP_BY_HOP: u8 = 0;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const ESP: u8 = 50;
    pub const AUTH: u8 = 51;
    pub const ICMPV6: u8 = 58;
    pub const NO_NEXT_HEADER: u8 = 59;
    pub const DEST_OPTS: u8 = 60;
    pub const MOBILITY: u8 = 135;
    pub const HIP: u8 = 139;
    pub const SHIM6: u8 = 140;
}

/// The fixed header's fields the datapath uses. Addresses as numbers (`u128::from_be_bytes`),
/// as the IPv4 datapath keeps `u32`s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Header {
    pub saddr: u128,
    pub daddr: u128,
    pub next_header: u8,
    pub hop_limit: u8,
    /// The payload length: the bytes after the fixed header, extension headers included.
    pub payload_len: u16,
}

/// The fixed header, if these 40 bytes are one: version 6. A payload length of 0 (a jumbogram,
/// RFC 2675, whose real length is in a Hop-by-Hop option) is not one the datapath translates.
#[inline(always)]
pub fn header(bytes: &[u8; IPV6_HDR_LEN]) -> Option<Ipv6Header> {
    let (start, _) = bytes.split_first_chunk::<FIXED_FIELDS_LEN>()?;
    let next_header = next_header_of(start)?;
    let payload_len = u16::from_be_bytes([bytes[4], bytes[5]]);
    let mut saddr = [0u8; 16];
    saddr.copy_from_slice(&bytes[8..24]);
    let mut daddr = [0u8; 16];
    daddr.copy_from_slice(&bytes[24..40]);
    Some(Ipv6Header {
        saddr: u128::from_be_bytes(saddr),
        daddr: u128::from_be_bytes(daddr),
        next_header,
        hop_limit: bytes[7],
        payload_len,
    })
}

/// The bytes of the fixed header before the addresses: version to hop limit.
pub const FIXED_FIELDS_LEN: usize = 8;

/// The Next Header of a fixed header whose first bytes these are, if [`header`] would take
/// the header: for a reader that takes the addresses from elsewhere.
#[inline(always)]
pub fn next_header_of(start: &[u8; FIXED_FIELDS_LEN]) -> Option<u8> {
    let payload_len = u16::from_be_bytes([start[4], start[5]]);
    (start[0] >> 4 == 6 && payload_len != 0).then_some(start[6])
}

/// [`next_header_of`] for a packet leaving the node, where a payload length of 0 is no
/// jumbogram from outside but one of the stack's BIG TCP super-packets of more than 64 KiB
/// (net/ipv6/ip6_output.c, `ip6_xmit`: a payload over `IPV6_MAXPLEN` gets 0; GRO does the same
/// for forwarded ones, `ipv6_gro_complete`), whose length is the skb's.
#[inline(always)]
pub fn next_header_on_egress(start: &[u8; FIXED_FIELDS_LEN]) -> Option<u8> {
    (start[0] >> 4 == 6).then_some(start[6])
}

/// What the Fragment header of a packet says (RFC 8200 section 4.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragment {
    pub id: u32,
    /// In 8-byte units: 0 for the first fragment.
    pub offset: u16,
    pub more: bool,
}

impl Fragment {
    /// A fragment after the first: it carries no transport header.
    pub fn is_later(&self) -> bool {
        self.offset != 0
    }

    /// The first fragment of a datagram cut in several: offset 0, More Fragments set. Offset 0
    /// without it is an atomic fragment (RFC 6946), the whole datagram.
    pub fn is_first(&self) -> bool {
        self.offset == 0 && self.more
    }
}

/// One step of the walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// An extension header of `len` bytes; the next one is `next_header`.
    Extension { next_header: u8, len: usize },
    /// The Fragment header (8 bytes); the next one is `next_header`.
    Fragment { next_header: u8, fragment: Fragment },
    /// The transport header (or any header the walk does not cross): `protocol` starts here.
    Upper { protocol: u8 },
}

/// The step at a header whose type is `next_header` and whose first 8 bytes are `peek` (for an
/// upper-layer header, `peek` is not read).
#[inline(always)]
pub fn step(next_header: u8, peek: &[u8; EXT_HDR_PEEK]) -> Step {
    match next_header {
        next_header::HOP_BY_HOP
        | next_header::ROUTING
        | next_header::DEST_OPTS
        | next_header::MOBILITY
        | next_header::HIP
        | next_header::SHIM6 => Step::Extension {
            next_header: peek[0],
            len: (usize::from(peek[1]) + 1) * 8,
        },
        // RFC 4302 section 2.2: the Payload Len of AH counts 4-byte words, minus 2.
        next_header::AUTH => Step::Extension {
            next_header: peek[0],
            len: (usize::from(peek[1]) + 2) * 4,
        },
        next_header::FRAGMENT => {
            let offset_and_flags = u16::from_be_bytes([peek[2], peek[3]]);
            Step::Fragment {
                next_header: peek[0],
                fragment: Fragment {
                    id: u32::from_be_bytes([peek[4], peek[5], peek[6], peek[7]]),
                    offset: offset_and_flags >> 3,
                    more: offset_and_flags & 1 != 0,
                },
            }
        }
        protocol => Step::Upper { protocol },
    }
}

/// Whether the header of type `header_type` whose first 8 bytes are `peek` is a Routing header
/// with segments left: the fixed header's destination is then the next hop of a source route,
/// not where the packet ends (RFC 8200 section 4.4), and the transport checksum's pseudo-header
/// holds the final destination. Such a packet is not the datapath's to translate.
#[inline(always)]
pub fn routes_on(header_type: u8, peek: &[u8; EXT_HDR_PEEK]) -> bool {
    header_type == next_header::ROUTING && peek[ROUTING_SEGMENTS_LEFT] != 0
}

/// Where a Routing header says how many of its addresses are still to be visited.
const ROUTING_SEGMENTS_LEFT: usize = 3;

/// The upper-layer header a walk reached: its protocol, where it starts and its first 8 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpperLayer {
    pub protocol: u8,
    pub offset: usize,
    pub first_bytes: [u8; EXT_HDR_PEEK],
}

/// Walks extension headers from the header of type `next` at `offset` to the upper-layer
/// header, reading 8 bytes at a time with `peek` (an ICMPv6 error's quote: the programs read
/// it through helpers, at offsets the verifier need not follow). Every header crossed is at
/// least 8 bytes and so is a transport header's part a translation reads, so the last peek is
/// the upper-layer header's first 8 bytes. `None`: a later fragment (no upper-layer header),
/// bytes `peek` cannot give (the quote ends first), or more than [`MAX_EXT_HEADERS`] headers.
#[inline(always)]
pub fn upper_layer(
    mut next: u8,
    mut offset: usize,
    mut peek: impl FnMut(usize) -> Option<[u8; EXT_HDR_PEEK]>,
) -> Option<UpperLayer> {
    for _ in 0..=MAX_EXT_HEADERS {
        let bytes = peek(offset)?;
        match step(next, &bytes) {
            Step::Upper { protocol } => {
                return Some(UpperLayer {
                    protocol,
                    offset,
                    first_bytes: bytes,
                });
            }
            Step::Extension { next_header, len } => {
                next = next_header;
                offset += len;
            }
            Step::Fragment {
                next_header,
                fragment,
            } => {
                if fragment.is_later() {
                    return None;
                }
                next = next_header;
                offset += EXT_HDR_PEEK;
            }
        }
    }
    None
}

/// Where a packet's transport header is, by the walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// A TCP, UDP or ICMPv6 header at `offset` (from the start of the IPv6 header); `fragment`
    /// when the packet is the first fragment of a datagram.
    At {
        protocol: u8,
        offset: usize,
        fragment: Option<Fragment>,
    },
    /// A fragment after the first of a datagram of `protocol`: no transport header.
    LaterFragment { protocol: u8, fragment: Fragment },
    /// Nothing the datapath translates: ESP, No Next Header, another upper layer, or more than
    /// [`MAX_EXT_HEADERS`] extension headers. The packet passes untouched.
    Other,
}

/// Why a walk stopped short: the packet ends inside a header (the stack would drop it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Truncated;

/// Walks a whole IPv6 packet (`packet` starts at the fixed header and ends where its payload
/// length says) to its transport header: the host's loop over [`step`], which the programs run
/// over packet bytes the same way.
pub fn transport(packet: &[u8]) -> Result<Transport, Truncated> {
    let fixed: &[u8; IPV6_HDR_LEN] = packet
        .get(..IPV6_HDR_LEN)
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or(Truncated)?;
    let mut next = fixed[6];
    let mut offset = IPV6_HDR_LEN;
    let mut fragment = None;
    for _ in 0..=MAX_EXT_HEADERS {
        let peek = packet
            .get(offset..offset + EXT_HDR_PEEK)
            .and_then(|bytes| <&[u8; EXT_HDR_PEEK]>::try_from(bytes).ok());
        let step = match peek {
            Some(peek) => step(next, peek),
            // An upper-layer header shorter than 8 bytes is the caller's to check.
            None => step(next, &[0; EXT_HDR_PEEK]),
        };
        match step {
            Step::Upper { protocol } => {
                if offset > packet.len() {
                    return Err(Truncated);
                }
                return Ok(match protocol {
                    proto::TCP | proto::UDP | next_header::ICMPV6 => Transport::At {
                        protocol,
                        offset,
                        fragment,
                    },
                    _ => Transport::Other,
                });
            }
            _ if peek.is_none() => return Err(Truncated),
            _ if peek.is_some_and(|peek| routes_on(next, peek)) => return Ok(Transport::Other),
            Step::Extension { next_header, len } => {
                next = next_header;
                offset += len;
            }
            Step::Fragment {
                next_header,
                fragment: this,
            } => {
                if this.is_later() {
                    return Ok(Transport::LaterFragment {
                        protocol: next_header,
                        fragment: this,
                    });
                }
                next = next_header;
                offset += EXT_HDR_PEEK;
                fragment = Some(this);
            }
        }
    }
    Ok(Transport::Other)
}

/// ICMPv6 types of Neighbor Discovery (RFC 4861): router and neighbour solicitations and
/// advertisements, redirects. The datapath passes them untouched, whatever their address.
#[inline(always)]
pub fn is_neighbour_discovery(icmpv6_type: u8) -> bool {
    (133..=137).contains(&icmpv6_type)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{vec, vec::Vec};

    use super::*;

    /// An IPv6 packet from 2001:db8::1 to 2001:db8::2 whose first header is `first`, followed
    /// by `rest` (extension headers and an upper-layer header), payload length set to match.
    fn packet(first: u8, rest: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0x60, 0, 0, 0];
        bytes.extend_from_slice(&(rest.len() as u16).to_be_bytes());
        bytes.extend_from_slice(&[first, 64]);
        bytes.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        bytes.extend_from_slice(&[0; 11]);
        bytes.push(1);
        bytes.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        bytes.extend_from_slice(&[0; 11]);
        bytes.push(2);
        bytes.extend_from_slice(rest);
        bytes
    }

    #[test]
    fn a_payload_length_of_0_is_refused_on_arrival_and_taken_on_egress() {
        const TCP: u8 = 6;
        let mut bytes = packet(TCP, &[0; 20]);
        let start: [u8; FIXED_FIELDS_LEN] = bytes[..FIXED_FIELDS_LEN].try_into().unwrap();
        assert_eq!(next_header_of(&start), Some(TCP));
        assert_eq!(next_header_on_egress(&start), Some(TCP));
        bytes[4..6].fill(0);
        let start: [u8; FIXED_FIELDS_LEN] = bytes[..FIXED_FIELDS_LEN].try_into().unwrap();
        assert_eq!(next_header_of(&start), None);
        assert_eq!(next_header_on_egress(&start), Some(TCP));
        bytes[0] = 0x45;
        let start: [u8; FIXED_FIELDS_LEN] = bytes[..FIXED_FIELDS_LEN].try_into().unwrap();
        assert_eq!(next_header_on_egress(&start), None, "not version 6");
    }

    /// An options-style extension header (Hop-by-Hop, Destination Options, Routing) of
    /// `words` x 8 bytes, padded with zeros.
    fn options(next: u8, words: usize) -> Vec<u8> {
        let mut header = vec![next, (words - 1) as u8];
        header.resize(words * 8, 0);
        header
    }

    fn fragment_header(next: u8, offset: u16, more: bool, id: u32) -> Vec<u8> {
        let mut header = vec![next, 0];
        header.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
        header.extend_from_slice(&id.to_be_bytes());
        header
    }

    #[test]
    fn a_fragment_is_first_later_or_the_whole_datagram() {
        let fragment = |offset, more| Fragment {
            id: 7,
            offset,
            more,
        };
        let rows = [
            (
                "offset 0, more to come: the first",
                fragment(0, true),
                (true, false),
            ),
            (
                "offset 0, no more: atomic (RFC 6946)",
                fragment(0, false),
                (false, false),
            ),
            ("offset 38, more to come", fragment(38, true), (false, true)),
            ("offset 38, the last", fragment(38, false), (false, true)),
        ];
        for (name, fragment, expected) in rows {
            assert_eq!(
                (fragment.is_first(), fragment.is_later()),
                expected,
                "{name}"
            );
        }
    }

    const TCP_HEADER: [u8; 20] = [
        0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
    ];
    const UDP_HEADER: [u8; 8] = [0x9c, 0x40, 0, 53, 0, 8, 0, 0];

    #[test]
    fn the_fixed_header_is_read_and_a_jumbogram_or_another_version_refused() {
        let bytes = packet(proto::TCP, &TCP_HEADER);
        let fixed: [u8; IPV6_HDR_LEN] = bytes[..IPV6_HDR_LEN].try_into().expect("40 bytes");
        let header = header(&fixed).expect("IPv6");
        assert_eq!(header.saddr, 0x2001_0db8_0000_0000_0000_0000_0000_0001);
        assert_eq!(header.daddr, 0x2001_0db8_0000_0000_0000_0000_0000_0002);
        assert_eq!((header.next_header, header.hop_limit), (proto::TCP, 64));
        assert_eq!(usize::from(header.payload_len), TCP_HEADER.len());

        let mut version4 = fixed;
        version4[0] = 0x45;
        assert_eq!(super::header(&version4), None);
        let mut jumbo = fixed;
        jumbo[4..6].copy_from_slice(&[0, 0]);
        assert_eq!(super::header(&jumbo), None);
    }

    /// Each row: a packet (the walk starts at its first extension header), and the upper-layer
    /// header the walk over `peek` reaches, or none.
    #[test]
    fn upper_layer_walks_through_peeks_to_the_transport_header_or_gives_up() {
        let mut dest_then_fragment = options(next_header::FRAGMENT, 2);
        dest_then_fragment.extend(fragment_header(proto::UDP, 0, true, 9));
        dest_then_fragment.extend_from_slice(&UDP_HEADER);
        let mut later = fragment_header(proto::UDP, 185, false, 9);
        later.extend_from_slice(&[0xab; 8]);
        let mut too_many = Vec::new();
        for _ in 0..=MAX_EXT_HEADERS {
            too_many.extend(options(next_header::DEST_OPTS, 1));
        }
        too_many.extend_from_slice(&UDP_HEADER);
        let mut cut = options(next_header::DEST_OPTS, 1);
        cut.extend(options(proto::TCP, 2));
        cut.truncate(16);
        type Found = Option<(u8, usize)>;
        let rows: [(&str, u8, Vec<u8>, Found); 6] = [
            (
                "TCP at once",
                proto::TCP,
                TCP_HEADER.to_vec(),
                Some((proto::TCP, 40)),
            ),
            (
                "Destination Options (16 bytes), first fragment, UDP",
                next_header::DEST_OPTS,
                dest_then_fragment,
                Some((proto::UDP, 40 + 16 + 8)),
            ),
            ("a later fragment", next_header::FRAGMENT, later, None),
            (
                "one extension header more than the walk crosses",
                next_header::DEST_OPTS,
                too_many,
                None,
            ),
            (
                "the bytes end inside the second header",
                next_header::HOP_BY_HOP,
                cut,
                None,
            ),
            (
                "UDP, cut to 4 bytes",
                proto::UDP,
                UDP_HEADER[..4].to_vec(),
                None,
            ),
        ];
        for (name, first, rest, expected) in rows {
            let bytes = packet(first, &rest);
            let walked = upper_layer(first, IPV6_HDR_LEN, |offset| {
                bytes.get(offset..offset + EXT_HDR_PEEK)?.try_into().ok()
            });
            assert_eq!(
                walked.map(|upper| (upper.protocol, upper.offset)),
                expected,
                "{name}"
            );
            if let Some(upper) = walked {
                assert_eq!(
                    upper.first_bytes[..],
                    bytes[upper.offset..upper.offset + EXT_HDR_PEEK],
                    "{name}: the upper-layer header's first bytes"
                );
            }
        }
    }

    /// Each row: a packet, and where its transport header is (or why there is none).
    #[test]
    fn the_walk_finds_the_transport_header_behind_every_kind_of_extension_header() {
        let mut rows: Vec<(&str, Vec<u8>, Result<Transport, Truncated>)> = Vec::new();
        let at = |protocol, offset, fragment| {
            Ok(Transport::At {
                protocol,
                offset,
                fragment,
            })
        };
        rows.push((
            "plain TCP",
            packet(proto::TCP, &TCP_HEADER),
            at(proto::TCP, 40, None),
        ));
        rows.push((
            "plain UDP",
            packet(proto::UDP, &UDP_HEADER),
            at(proto::UDP, 40, None),
        ));
        let icmp = [128, 0, 0, 0, 0, 1, 0, 1];
        rows.push((
            "ICMPv6 echo",
            packet(next_header::ICMPV6, &icmp),
            at(next_header::ICMPV6, 40, None),
        ));

        let mut hbh_dest_routing = options(next_header::DEST_OPTS, 1);
        hbh_dest_routing.extend(options(next_header::ROUTING, 2));
        hbh_dest_routing.extend(options(proto::UDP, 3));
        hbh_dest_routing.extend_from_slice(&UDP_HEADER);
        rows.push((
            "Hop-by-Hop, Destination Options (16 bytes), Routing (24 bytes), UDP",
            packet(next_header::HOP_BY_HOP, &hbh_dest_routing),
            at(proto::UDP, 40 + 8 + 16 + 24, None),
        ));
        let mut routing_on = options(proto::UDP, 3);
        routing_on[2] = 4;
        routing_on[3] = 1;
        routing_on.extend_from_slice(&UDP_HEADER);
        rows.push((
            "a Routing header with a segment left: the destination is a next hop",
            packet(next_header::ROUTING, &routing_on),
            Ok(Transport::Other),
        ));

        // AH: Payload Len 4 -> (4 + 2) * 4 = 24 bytes.
        let mut auth = vec![proto::TCP, 4];
        auth.resize(24, 0);
        auth.extend_from_slice(&TCP_HEADER);
        rows.push((
            "Authentication Header, TCP",
            packet(next_header::AUTH, &auth),
            at(proto::TCP, 64, None),
        ));

        let first = Fragment {
            id: 0xdead_beef,
            offset: 0,
            more: true,
        };
        let mut first_fragment = fragment_header(proto::UDP, 0, true, 0xdead_beef);
        first_fragment.extend_from_slice(&UDP_HEADER);
        rows.push((
            "first fragment of a UDP datagram",
            packet(next_header::FRAGMENT, &first_fragment),
            at(proto::UDP, 48, Some(first)),
        ));
        let mut later = options(next_header::FRAGMENT, 1);
        later.extend(fragment_header(proto::UDP, 185, false, 0xdead_beef));
        later.extend_from_slice(&[0xab; 16]);
        rows.push((
            "later fragment behind a Hop-by-Hop header",
            packet(next_header::HOP_BY_HOP, &later),
            Ok(Transport::LaterFragment {
                protocol: proto::UDP,
                fragment: Fragment {
                    id: 0xdead_beef,
                    offset: 185,
                    more: false,
                },
            }),
        ));

        rows.push((
            "ESP: nothing to translate",
            packet(next_header::ESP, &[0; 16]),
            Ok(Transport::Other),
        ));
        rows.push((
            "No Next Header",
            packet(
                next_header::DEST_OPTS,
                &options(next_header::NO_NEXT_HEADER, 1),
            ),
            Ok(Transport::Other),
        ));

        let mut deep = Vec::new();
        for _ in 0..MAX_EXT_HEADERS {
            deep.extend(options(next_header::DEST_OPTS, 1));
        }
        let last = deep.len() - 8;
        deep[last] = proto::TCP;
        deep.extend_from_slice(&TCP_HEADER);
        rows.push((
            "eight extension headers: the most the walk crosses",
            packet(next_header::DEST_OPTS, &deep),
            at(proto::TCP, 40 + 8 * MAX_EXT_HEADERS, None),
        ));
        let mut deeper = options(proto::TCP, 1);
        for _ in 0..MAX_EXT_HEADERS {
            let mut header = options(next_header::DEST_OPTS, 1);
            header.extend(deeper);
            deeper = header;
        }
        deeper.extend_from_slice(&TCP_HEADER);
        rows.push((
            "nine extension headers: passed untouched",
            packet(next_header::DEST_OPTS, &deeper),
            Ok(Transport::Other),
        ));

        rows.push((
            "a Routing header cut short",
            packet(next_header::ROUTING, &[proto::TCP, 0, 0, 0]),
            Err(Truncated),
        ));
        let mut too_long = options(proto::TCP, 1);
        too_long[1] = 200;
        rows.push((
            "an extension header longer than the packet",
            packet(next_header::DEST_OPTS, &too_long),
            Err(Truncated),
        ));
        rows.push(("no fixed header", vec![0x60; 20], Err(Truncated)));

        for (name, bytes, expected) in rows {
            assert_eq!(transport(&bytes), expected, "{name}");
        }
    }

    #[test]
    fn neighbour_discovery_is_told_from_other_icmpv6() {
        for icmpv6_type in [133, 134, 135, 136, 137] {
            assert!(is_neighbour_discovery(icmpv6_type), "{icmpv6_type}");
        }
        // Echo request/reply, destination unreachable, packet too big.
        for icmpv6_type in [128, 129, 1, 2, 138] {
            assert!(!is_neighbour_discovery(icmpv6_type), "{icmpv6_type}");
        }
    }
}
