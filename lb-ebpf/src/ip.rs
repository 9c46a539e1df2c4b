//! The IP layer of the XDP datapath as a type: what the service path needs of a packet's IP
//! header, for [`Ipv4Info`] and [`Ipv6Info`], so that the path itself (`xdp.rs`) is written
//! once, generic over [`Ip`], and each family's header work stays here.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    Event, Frag4Key, Frag4Value, Frag6Key, FragValue, Ipv6Words,
    checksum::{self, Endpoints},
};
use lb_ebpf::packet::{
    ETH_HDR_LEN, IPV4_CSUM_OFFSET, IPV4_DADDR_OFFSET, IPV4_DONT_FRAGMENT, IPV4_FRAG_OFFSET_MASK,
    IPV4_MIN_HDR_LEN, IPV4_MORE_FRAGMENTS, IPV4_SADDR_OFFSET, IPV6_DADDR_OFFSET, IPV6_HDR_LEN,
    IPV6_HOP_LIMIT_OFFSET, IPV6_SADDR_OFFSET, IpHeader, Ipv4Info, Ipv6Info, bytes_at, bytes_at_mut,
    store_packet_words,
};

use crate::{
    family::{Family, V4, V6},
    flow::Tuple,
    helpers::{Forward, fib_forward, fib_forward6},
    maps::{FRAGMENTS4, FRAGMENTS6, first_fragment_record, remember_fragment, remember_fragment6},
    reject, too_big,
};

/// Above any offset inside an IPv6 packet the parser accepts: the fixed header and at most
/// eight extension headers of at most 2,048 bytes each, after the Ethernet header.
const OFFSET_BOUND: usize = 0x7fff;

/// An address of the family of `I`, as [`Tuple`] holds it.
pub type Addr<I> = <<I as Ip>::F as Family>::Addr;

/// A parsed IP header of one family.
pub trait Ip: IpHeader {
    type F: Family;
    /// Whether a UDP datagram must carry a checksum (IPv6, RFC 8200 section 8.1).
    const UDP_CHECKSUM_REQUIRED: bool;
    /// Where the transport header starts in a frame whose IP header has no options or
    /// extension headers.
    const FIXED_HEADER_END: usize;

    fn source(&self) -> Addr<Self>;
    fn destination(&self) -> Addr<Self>;
    /// Offset of the transport header from the start of the frame.
    fn l4_offset(&self) -> usize;
    /// Offset of the end of the IP packet.
    fn end(&self) -> usize;
    /// The first fragment of a datagram: it has the ports, the later ones follow it.
    fn first_fragment(&self) -> bool;

    /// Writes `new` (source, destination) over the header's addresses `old` (IPv4: with an
    /// incremental header checksum).
    fn readdress(
        ctx: &XdpContext,
        old: (Addr<Self>, Addr<Self>),
        new: (Addr<Self>, Addr<Self>),
    ) -> Result<(), Event>;

    /// A TCP or UDP checksum after the segment's addresses (in its pseudo-header) and ports
    /// went from `old` to `new`, folded once.
    fn transport_checksum_update(
        check: u16,
        old: &Endpoints<Addr<Self>>,
        new: &Endpoints<Addr<Self>>,
    ) -> u16;

    /// TTL or hop limit - 1 (IPv4 with its checksum fixed); false, untouched, when it would
    /// reach 0.
    fn decrement_hop_limit(ctx: &XdpContext) -> bool;

    /// Where the FIB sends this packet (already translated: from `saddr` to `daddr`).
    fn route(ctx: &XdpContext, protocol: u8, saddr: Addr<Self>, daddr: Addr<Self>) -> Forward;

    /// Whether XDP answers this packet itself when it is too big for its route
    /// ([`Forward::TooBig`], [`crate::too_big`]): one that must not be fragmented (IPv4 with
    /// DF set and no fragment; IPv6, which routers never fragment), with no IPv4 options or
    /// IPv6 extension headers (a Fragment header among them), which the answer's fixed-size
    /// quote would cut. Any other goes to the stack translated: it fragments an IPv4 packet
    /// without DF; it would answer one with options or extension headers to this node's own
    /// address (a limit: such packets are rare). The caller checks the TTL first, as a router
    /// does (net/ipv4/ip_forward.c, `ip_forward`): one whose TTL runs out goes to the stack as
    /// before.
    fn answers_too_big(&self) -> bool;

    /// Turns the packet, as it came from `original` (its quoted part restored), into the ICMP
    /// error saying it is bigger than `mtu`, to be sent back with XDP_TX.
    fn too_big(ctx: &XdpContext, original: &Endpoints<Addr<Self>>, mtu: u16) -> Result<(), Event>;

    /// The source and destination of a frame's IP header without options or extension
    /// headers ([`Self::answers_too_big`]).
    fn addresses_of_fixed_header(ctx: &XdpContext) -> Option<(Addr<Self>, Addr<Self>)>;

    /// The protocol (Next Header) of such a header.
    fn protocol_of_fixed_header(ctx: &XdpContext) -> Option<u8>;

    /// The REJECT answer to a packet of a service without endpoints (sent back with XDP_TX).
    fn reject(&self, ctx: &XdpContext, tuple: &Tuple<Self::F>) -> Result<u32, Event>;

    /// Records how a first fragment was translated (`later`), for the later fragments.
    fn remember_fragments(&self, later: FragValue<Addr<Self>>);

    /// What the first fragment of this later fragment's datagram got, if it was translated.
    fn first_fragments_record(&self) -> Option<FragValue<Addr<Self>>>;
}

impl Ip for Ipv4Info {
    type F = V4;
    const UDP_CHECKSUM_REQUIRED: bool = false;
    const FIXED_HEADER_END: usize = ETH_HDR_LEN + IPV4_MIN_HDR_LEN;

    #[inline(always)]
    fn source(&self) -> u32 {
        self.saddr
    }

    #[inline(always)]
    fn destination(&self) -> u32 {
        self.daddr
    }

    #[inline(always)]
    fn l4_offset(&self) -> usize {
        self.l4_offset
    }

    #[inline(always)]
    fn end(&self) -> usize {
        self.end
    }

    #[inline(always)]
    fn first_fragment(&self) -> bool {
        Ipv4Info::first_fragment(self)
    }

    #[inline(always)]
    fn readdress(ctx: &XdpContext, old: (u32, u32), new: (u32, u32)) -> Result<(), Event> {
        let ip = bytes_at_mut::<20>(ctx, ETH_HDR_LEN).ok_or(Event::DROP_MALFORMED)?;
        ip[IPV4_SADDR_OFFSET..IPV4_SADDR_OFFSET + 4].copy_from_slice(&new.0.to_be_bytes());
        ip[IPV4_DADDR_OFFSET..IPV4_DADDR_OFFSET + 4].copy_from_slice(&new.1.to_be_bytes());
        let check = u16::from_be_bytes([ip[IPV4_CSUM_OFFSET], ip[IPV4_CSUM_OFFSET + 1]]);
        let check = checksum::replace_u32(check, old.0, new.0);
        let check = checksum::replace_u32(check, old.1, new.1);
        ip[IPV4_CSUM_OFFSET..IPV4_CSUM_OFFSET + 2].copy_from_slice(&check.to_be_bytes());
        Ok(())
    }

    #[inline(always)]
    fn transport_checksum_update(check: u16, old: &Endpoints<u32>, new: &Endpoints<u32>) -> u16 {
        checksum::replace_endpoints4(check, old, new)
    }

    #[inline(always)]
    fn decrement_hop_limit(ctx: &XdpContext) -> bool {
        let Some(ip) = bytes_at_mut::<20>(ctx, ETH_HDR_LEN) else {
            return false;
        };
        if ip[8] <= 1 {
            return false;
        }
        let old = u16::from_be_bytes([ip[8], ip[9]]);
        ip[8] -= 1;
        let new = u16::from_be_bytes([ip[8], ip[9]]);
        let check = u16::from_be_bytes([ip[IPV4_CSUM_OFFSET], ip[IPV4_CSUM_OFFSET + 1]]);
        let check = checksum::replace_u16(check, old, new);
        ip[IPV4_CSUM_OFFSET..IPV4_CSUM_OFFSET + 2].copy_from_slice(&check.to_be_bytes());
        true
    }

    #[inline(always)]
    fn route(ctx: &XdpContext, protocol: u8, saddr: u32, daddr: u32) -> Forward {
        let Some(ip) = bytes_at::<4>(ctx, ETH_HDR_LEN) else {
            return Forward::Stack;
        };
        let tot_len = u16::from_be_bytes([ip[2], ip[3]]);
        fib_forward(ctx, protocol, saddr, daddr, tot_len)
    }

    #[inline(always)]
    fn answers_too_big(&self) -> bool {
        // DF and no fragment at all: a first fragment's record is already written for the
        // later ones, which must not go on without it.
        self.flags_fragment & (IPV4_DONT_FRAGMENT | IPV4_MORE_FRAGMENTS | IPV4_FRAG_OFFSET_MASK)
            == IPV4_DONT_FRAGMENT
            && self.l4_offset == Self::FIXED_HEADER_END
    }

    #[inline(always)]
    fn too_big(ctx: &XdpContext, original: &Endpoints<u32>, mtu: u16) -> Result<(), Event> {
        too_big::fragmentation_needed(ctx, original, mtu)
    }

    #[inline(always)]
    fn addresses_of_fixed_header(ctx: &XdpContext) -> Option<(u32, u32)> {
        let ip = bytes_at::<20>(ctx, ETH_HDR_LEN)?;
        let at = |offset: usize| {
            u32::from_be_bytes([ip[offset], ip[offset + 1], ip[offset + 2], ip[offset + 3]])
        };
        Some((at(IPV4_SADDR_OFFSET), at(IPV4_DADDR_OFFSET)))
    }

    #[inline(always)]
    fn protocol_of_fixed_header(ctx: &XdpContext) -> Option<u8> {
        bytes_at::<20>(ctx, ETH_HDR_LEN).map(|ip| ip[9])
    }

    #[inline(always)]
    fn reject(&self, ctx: &XdpContext, tuple: &Tuple) -> Result<u32, Event> {
        reject::reply(ctx, tuple, self.l4_offset)
    }

    #[inline(always)]
    fn remember_fragments(&self, mut later: Frag4Value) {
        remember_fragment(&FRAGMENTS4, &fragment_key(self), &mut later);
    }

    #[inline(always)]
    fn first_fragments_record(&self) -> Option<Frag4Value> {
        first_fragment_record(&FRAGMENTS4, &fragment_key(self)).copied()
    }
}

/// The key of the record of an IPv4 datagram's first fragment.
#[inline(always)]
fn fragment_key(ip: &Ipv4Info) -> Frag4Key {
    Frag4Key {
        saddr: ip.saddr,
        daddr: ip.daddr,
        id: ip.id,
        proto: ip.proto,
        _pad: 0,
    }
}

impl Ip for Ipv6Info {
    type F = V6;
    const UDP_CHECKSUM_REQUIRED: bool = true;
    const FIXED_HEADER_END: usize = ETH_HDR_LEN + IPV6_HDR_LEN;

    #[inline(always)]
    fn source(&self) -> Ipv6Words {
        self.saddr
    }

    #[inline(always)]
    fn destination(&self) -> Ipv6Words {
        self.daddr
    }

    /// Masked to the bound the walk keeps it within: the IPv6 programs read it back from a map
    /// ([`crate::maps::PACKET6`]), where the verifier knows nothing of its value, and refuses
    /// packet access at an unbounded offset.
    #[inline(always)]
    fn l4_offset(&self) -> usize {
        self.l4_offset & OFFSET_BOUND
    }

    #[inline(always)]
    fn end(&self) -> usize {
        self.end & OFFSET_BOUND
    }

    #[inline(always)]
    fn first_fragment(&self) -> bool {
        self.first_fragment
    }

    /// IPv6 has no header checksum: the new addresses are written as they are.
    #[inline(always)]
    fn readdress(
        ctx: &XdpContext,
        _old: (Ipv6Words, Ipv6Words),
        new: (Ipv6Words, Ipv6Words),
    ) -> Result<(), Event> {
        let ip = bytes_at_mut::<IPV6_HDR_LEN>(ctx, ETH_HDR_LEN).ok_or(Event::DROP_MALFORMED)?;
        store_packet_words(ip, IPV6_SADDR_OFFSET, new.0);
        store_packet_words(ip, IPV6_DADDR_OFFSET, new.1);
        Ok(())
    }

    #[inline(always)]
    fn transport_checksum_update(
        check: u16,
        old: &Endpoints<Ipv6Words>,
        new: &Endpoints<Ipv6Words>,
    ) -> u16 {
        checksum::replace_endpoints6(check, old, new)
    }

    #[inline(always)]
    fn decrement_hop_limit(ctx: &XdpContext) -> bool {
        let Some(ip) = bytes_at_mut::<IPV6_HDR_LEN>(ctx, ETH_HDR_LEN) else {
            return false;
        };
        if ip[IPV6_HOP_LIMIT_OFFSET] <= 1 {
            return false;
        }
        ip[IPV6_HOP_LIMIT_OFFSET] -= 1;
        true
    }

    #[inline(always)]
    fn route(ctx: &XdpContext, protocol: u8, saddr: Ipv6Words, daddr: Ipv6Words) -> Forward {
        let Some(ip) = bytes_at::<6>(ctx, ETH_HDR_LEN) else {
            return Forward::Stack;
        };
        let tot_len = u16::from_be_bytes([ip[4], ip[5]]).saturating_add(IPV6_HDR_LEN as u16);
        fib_forward6(ctx, protocol, saddr, daddr, tot_len)
    }

    #[inline(always)]
    fn answers_too_big(&self) -> bool {
        self.l4_offset == Self::FIXED_HEADER_END
    }

    #[inline(always)]
    fn too_big(ctx: &XdpContext, original: &Endpoints<Ipv6Words>, mtu: u16) -> Result<(), Event> {
        too_big::packet_too_big(ctx, original, mtu)
    }

    #[inline(always)]
    fn addresses_of_fixed_header(ctx: &XdpContext) -> Option<(Ipv6Words, Ipv6Words)> {
        let ip = bytes_at::<IPV6_HDR_LEN>(ctx, ETH_HDR_LEN)?;
        let word = |offset: usize| {
            u32::from_ne_bytes([ip[offset], ip[offset + 1], ip[offset + 2], ip[offset + 3]])
        };
        let address = |offset: usize| core::array::from_fn(|i| word(offset + 4 * i));
        Some((address(IPV6_SADDR_OFFSET), address(IPV6_DADDR_OFFSET)))
    }

    #[inline(always)]
    fn protocol_of_fixed_header(ctx: &XdpContext) -> Option<u8> {
        bytes_at::<IPV6_HDR_LEN>(ctx, ETH_HDR_LEN).map(|ip| ip[6])
    }

    #[inline(always)]
    fn reject(&self, ctx: &XdpContext, tuple: &Tuple<V6>) -> Result<u32, Event> {
        reject::reply6(ctx, tuple, self.l4_offset)
    }

    #[inline(always)]
    fn remember_fragments(&self, later: FragValue<Ipv6Words>) {
        remember_fragment6(|record| {
            record.key = fragment_key6(self);
            record.value = later;
        });
    }

    #[inline(always)]
    fn first_fragments_record(&self) -> Option<FragValue<Ipv6Words>> {
        first_fragment_record(&FRAGMENTS6, &fragment_key6(self)).copied()
    }
}

/// The key of the record of an IPv6 datagram's first fragment.
#[inline(always)]
fn fragment_key6(ip: &Ipv6Info) -> Frag6Key {
    Frag6Key {
        saddr: ip.saddr,
        daddr: ip.daddr,
        id: ip.fragment_id,
    }
}
