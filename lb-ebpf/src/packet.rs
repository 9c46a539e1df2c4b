//! Bounds-checked access to packet bytes. Every read goes through [`bytes_at`], whose explicit
//! comparison against `data_end` is the proof the verifier needs before any packet access.

use aya_ebpf::programs::XdpContext;

pub const ETH_HDR_LEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// 802.1Q and 802.1ad VLAN tags.
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const IPV4_MIN_HDR_LEN: usize = 20;
/// The first byte of an IPv4 header without options: version 4, five 32-bit words.
pub const IPV4_VERSION_IHL_NO_OPTIONS: u8 = 0x45;
pub const TCP_MIN_HDR_LEN: usize = 20;
pub const UDP_HDR_LEN: usize = 8;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// Fragment offset bits of the IPv4 flags/fragment-offset field.
pub const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;

/// `N` bytes of the packet at `offset`, or `None` when the packet is shorter.
///
/// Packet pointers may be unaligned, so callers get bytes and decode fields with `from_be_bytes`.
#[inline(always)]
pub fn bytes_at<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<&[u8; N]> {
    let start = ctx.data() + offset;
    if start + N > ctx.data_end() {
        return None;
    }
    // SAFETY: [start, start + N) lies inside [data, data_end), which the kernel guarantees is
    // readable packet memory for the lifetime of the program invocation; [u8; N] needs no
    // alignment.
    Some(unsafe { &*(start as *const [u8; N]) })
}

/// The frame length in bytes, as the counters record it.
#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}

/// Mutable `N` bytes of the packet at `offset`, or `None` when the packet is shorter.
#[inline(always)]
#[expect(
    clippy::mut_from_ref,
    reason = "packet memory is not owned by the context struct; exclusive use is the caller's rule"
)]
pub fn bytes_at_mut<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<&mut [u8; N]> {
    let start = ctx.data() + offset;
    if start + N > ctx.data_end() {
        return None;
    }
    // SAFETY: as in bytes_at; XDP packet memory is writable, and no other reference to these
    // bytes is alive while the caller holds this one (callers take one header at a time).
    Some(unsafe { &mut *(start as *mut [u8; N]) })
}

/// What the IPv4 parser found, for the lookups of the datapath.
#[derive(Clone, Copy)]
pub struct Ipv4Info {
    /// As the packet holds them (`u32::from_be_bytes` of the header bytes, i.e. host order).
    pub saddr: u32,
    pub daddr: u32,
    pub proto: u8,
    pub ttl: u8,
    /// Offset of the transport header from the start of the frame.
    pub l4_offset: usize,
    /// Offset of the end of the IP packet (Ethernet padding may follow).
    pub end: usize,
    pub id: u16,
    /// The IPv4 flags and fragment offset field.
    pub flags_fragment: u16,
}

impl Ipv4Info {
    /// A fragment with the transport header: offset 0, more to come.
    #[inline(always)]
    pub fn first_fragment(&self) -> bool {
        self.flags_fragment & (IPV4_FRAG_OFFSET_MASK | IPV4_MORE_FRAGMENTS) == IPV4_MORE_FRAGMENTS
    }

    /// A fragment after the first: no transport header.
    #[inline(always)]
    pub fn later_fragment(&self) -> bool {
        self.flags_fragment & IPV4_FRAG_OFFSET_MASK != 0
    }
}

/// What connection tracking asks of a packet's IP header, in either family.
pub trait IpHeader {
    /// Whether the stack would take the header (IPv4: its checksum; IPv6 has none): a packet
    /// that creates or ends a flow is checked.
    fn header_ok(&self, ctx: &XdpContext) -> bool;
    /// Whether the packet may be forwarded to another node (its TTL or hop limit does not run
    /// out on the way).
    fn may_forward(&self) -> bool;
}

impl IpHeader for Ipv4Info {
    #[inline(always)]
    fn header_ok(&self, ctx: &XdpContext) -> bool {
        ipv4_checksum_ok(ctx, self.l4_offset)
    }

    #[inline(always)]
    fn may_forward(&self) -> bool {
        self.ttl > 1
    }
}

/// Parses an IPv4 header at `ETH_HDR_LEN`. `None` for a header that is shorter than it must be,
/// not version 4, with IHL < 5, or whose total length is below its header length.
#[inline(always)]
pub fn parse_ipv4(ctx: &XdpContext) -> Option<Ipv4Info> {
    let ip = bytes_at::<IPV4_MIN_HDR_LEN>(ctx, ETH_HDR_LEN)?;
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip[0] >> 4 != 4 || header_len < IPV4_MIN_HDR_LEN || total_len < header_len {
        return None;
    }
    // Longer than the frame: the stack would drop it (net/ipv4/ip_input.c, ip_rcv_core).
    if ctx.data() + ETH_HDR_LEN + total_len > ctx.data_end() {
        return None;
    }
    let l4_offset = ETH_HDR_LEN + header_len;
    // Options must be present in full.
    if ctx.data() + l4_offset > ctx.data_end() {
        return None;
    }
    Some(Ipv4Info {
        saddr: u32::from_be_bytes([ip[12], ip[13], ip[14], ip[15]]),
        daddr: u32::from_be_bytes([ip[16], ip[17], ip[18], ip[19]]),
        proto: ip[9],
        ttl: ip[8],
        l4_offset,
        end: ETH_HDR_LEN + total_len,
        id: u16::from_be_bytes([ip[4], ip[5]]),
        flags_fragment: u16::from_be_bytes([ip[6], ip[7]]),
    })
}

/// Whether the IPv4 header checksum (over the header and its options) is right, as the stack
/// checks it before taking the packet (ip_rcv_core): a packet with a wrong one must not create
/// state or be translated.
#[inline(always)]
pub fn ipv4_checksum_ok(ctx: &XdpContext, l4_offset: usize) -> bool {
    let Some(header) = bytes_at::<IPV4_MIN_HDR_LEN>(ctx, ETH_HDR_LEN) else {
        return false;
    };
    let mut sum = 0u32;
    for pair in header.as_chunks::<2>().0 {
        sum += u32::from(u16::from_be_bytes(*pair));
    }
    // Nearly every header has no options: their loop is for the others.
    if l4_offset > ETH_HDR_LEN + IPV4_MIN_HDR_LEN {
        let Some(options) = ipv4_options_sum(ctx, l4_offset) else {
            return false;
        };
        sum += options;
    }
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum == 0xffff
}

/// The one's-complement sum (unfolded) of an IPv4 header's options, 4 bytes at a time: every
/// word is read (the verifier then sees one path, not one per header length) and counted only
/// inside the header. None: the header runs past the packet.
#[inline(always)]
fn ipv4_options_sum(ctx: &XdpContext, l4_offset: usize) -> Option<u32> {
    let mut sum = 0u32;
    let mut offset = ETH_HDR_LEN + IPV4_MIN_HDR_LEN;
    for _ in 0..MAX_OPTION_WORDS {
        if offset < l4_offset {
            let word = bytes_at::<4>(ctx, offset)?;
            sum += u32::from(u16::from_be_bytes([word[0], word[1]]))
                + u32::from(u16::from_be_bytes([word[2], word[3]]));
        }
        offset += 4;
    }
    Some(sum)
}

/// IPv4 options take 40 bytes at most.
const MAX_OPTION_WORDS: usize = 10;

/// The More Fragments flag of the IPv4 flags/fragment-offset field.
pub const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
/// The Don't Fragment flag of the IPv4 flags/fragment-offset field.
pub const IPV4_DONT_FRAGMENT: u16 = 0x4000;
/// Offset of the checksum field inside a TCP header.
pub const TCP_CSUM_OFFSET: usize = 16;
/// Offset of the checksum field inside a UDP header.
pub const UDP_CSUM_OFFSET: usize = 6;
/// Offset of the acknowledgment number inside a TCP header.
pub const TCP_ACK_SEQ_OFFSET: usize = 8;
/// Offset of the data offset (header length in words, high nibble) inside a TCP header.
pub const TCP_DATA_OFFSET_OFFSET: usize = 12;
/// Offset of the flags byte inside a TCP header.
pub const TCP_FLAGS_OFFSET: usize = 13;
pub const TCP_FIN: u8 = lb_common::tcp_flags::FIN;
pub const TCP_SYN: u8 = lb_common::tcp_flags::SYN;
pub const TCP_RST: u8 = lb_common::tcp_flags::RST;
pub const TCP_ACK: u8 = lb_common::tcp_flags::ACK;
/// Offsets inside the IPv4 header.
pub const IPV4_CSUM_OFFSET: usize = 10;
pub const IPV4_SADDR_OFFSET: usize = 12;
pub const IPV4_DADDR_OFFSET: usize = 16;

/// The IPv6 fixed header's length.
pub const IPV6_HDR_LEN: usize = lb_common::ipv6::IPV6_HDR_LEN;
/// Offsets inside the IPv6 header.
pub const IPV6_NEXT_HEADER_OFFSET: usize = 6;
pub const IPV6_HOP_LIMIT_OFFSET: usize = 7;
pub const IPV6_SADDR_OFFSET: usize = 8;
pub const IPV6_DADDR_OFFSET: usize = 24;
/// ICMPv6's protocol number (next header).
pub const IPPROTO_ICMPV6: u8 = lb_common::ipv6::next_header::ICMPV6;

/// What the IPv6 parser found, for the lookups of the datapath.
#[derive(Clone, Copy)]
pub struct Ipv6Info {
    /// As the packet holds them ([`lb_common::Ipv6Words`]: the bytes as they are).
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    /// The upper-layer protocol the extension headers lead to.
    pub proto: u8,
    pub hop_limit: u8,
    /// Offset of the transport header from the start of the frame, after any extension headers.
    pub l4_offset: usize,
    /// Offset of the end of the IPv6 packet (Ethernet padding may follow).
    pub end: usize,
    /// The packet is the first fragment of a datagram (a Fragment header of offset 0, More
    /// Fragments set).
    pub first_fragment: bool,
    /// The identification of its Fragment header, when it has one.
    pub fragment_id: u32,
}

/// An IPv6 packet by what the datapath can do with it.
pub enum Ipv6Packet {
    /// A TCP, UDP, SCTP or ICMPv6 header after the extension headers.
    Transport(Ipv6Info),
    /// A fragment after the first: no transport header (its `proto` is what its Fragment
    /// header says follows).
    LaterFragment(Ipv6Info),
    /// ESP, No Next Header, another upper layer, or more extension headers than the walk takes.
    Other,
}

/// Parses an IPv6 header at `ETH_HDR_LEN` and walks its extension headers to the transport
/// header ([`lb_common::ipv6::step`], at most [`lb_common::ipv6::MAX_EXT_HEADERS`]); a Routing
/// header with segments left ends the walk (`Other`: the packet is on its way elsewhere,
/// [`lb_common::ipv6::routes_on`]). `None` for
/// a packet the stack would drop: shorter than the fixed header, not version 6 or with a
/// payload past the frame (net/ipv6/ip6_input.c, ip6_rcv_core), or an extension header cut
/// short. A payload length of 0 (a jumbogram, RFC 2675) is left to the stack.
#[inline(always)]
pub fn parse_ipv6(ctx: &XdpContext) -> Option<Ipv6Packet> {
    use lb_common::ipv6::{EXT_HDR_PEEK, MAX_EXT_HEADERS, Step, next_header, routes_on, step};
    let Some(mut info) = ipv6_fixed_header(ctx)? else {
        return Some(Ipv6Packet::Other);
    };
    for index in 0..=MAX_EXT_HEADERS {
        if matches!(
            info.proto,
            IPPROTO_TCP | IPPROTO_UDP | lb_common::proto::SCTP | next_header::ICMPV6
        ) {
            return Some(Ipv6Packet::Transport(info));
        }
        let peek = bytes_at::<EXT_HDR_PEEK>(ctx, info.l4_offset)?;
        if routes_on(info.proto, peek) {
            return Some(Ipv6Packet::Other);
        }
        // An extension header lies inside the payload, and a Hop-by-Hop header comes first
        // (RFC 8200 section 4.1); the stack drops anything else (net/ipv6/ip6_input.c,
        // ip6_protocol_deliver_rcu), and bytes past the payload are no header. Checked after
        // the read: before it, LLVM takes the frame's bound for implied by the payload's and
        // leaves out the check the verifier needs. An upper-layer header is not judged here.
        let misplaced_hop_by_hop = index != 0 && info.proto == next_header::HOP_BY_HOP;
        match step(info.proto, peek) {
            Step::Extension { next_header, len } => {
                if misplaced_hop_by_hop || info.l4_offset + len > info.end {
                    return None;
                }
                info.proto = next_header;
                info.l4_offset += len;
            }
            Step::Fragment {
                next_header,
                fragment,
            } => {
                if info.l4_offset + EXT_HDR_PEEK > info.end {
                    return None;
                }
                info.proto = next_header;
                info.l4_offset += fragment_header_len(&peek[1]);
                info.fragment_id = fragment.id;
                if fragment.is_later() {
                    return Some(Ipv6Packet::LaterFragment(info));
                }
                info.first_fragment = fragment.is_first();
            }
            Step::Upper { .. } => return Some(Ipv6Packet::Other),
        }
    }
    Some(Ipv6Packet::Other)
}

/// The IPv6 fixed header at `ETH_HDR_LEN`, checked as [`parse_ipv6`] checks it, with `proto` its
/// Next Header and `l4_offset` right after it (where the transport header is when no extension
/// header comes between). `None` for a packet the stack would drop; `Some(None)` for a
/// jumbogram, left to the stack.
#[inline(always)]
pub fn ipv6_fixed_header(ctx: &XdpContext) -> Option<Option<Ipv6Info>> {
    let ip = bytes_at::<IPV6_HDR_LEN>(ctx, ETH_HDR_LEN)?;
    let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    if ip[0] >> 4 != 6 {
        return None;
    }
    if payload_len == 0 {
        return Some(None);
    }
    let end = ETH_HDR_LEN + IPV6_HDR_LEN + payload_len;
    if ctx.data() + end > ctx.data_end() {
        return None;
    }
    Some(Some(Ipv6Info {
        saddr: packet_words(ip, IPV6_SADDR_OFFSET),
        daddr: packet_words(ip, IPV6_DADDR_OFFSET),
        proto: ip[IPV6_NEXT_HEADER_OFFSET],
        hop_limit: ip[IPV6_HOP_LIMIT_OFFSET],
        l4_offset: ETH_HDR_LEN + IPV6_HDR_LEN,
        end,
        first_fragment: false,
        fragment_id: 0,
    }))
}

/// The length of a Fragment header, 8 bytes, as the verifier must see it: a range, as it sees
/// every other extension header's length ([8, 2048] bytes, from the header's own length
/// byte). As the constant 8, each place a Fragment header can take among the other headers
/// is a state of its own, which the verifier walks the rest of the program from: serving first
/// fragments took `lb_xdp6` from 84,339 to 366,363 instructions walked, and with this to
/// under 60,000. `reserved` is the header's Reserved byte, read twice: the two reads are equal,
/// their xor is 0, but the verifier knows neither read.
#[inline(always)]
pub fn fragment_header_len(reserved: &u8) -> usize {
    let first = *reserved;
    // SAFETY: a byte of a live reference.
    let again = unsafe { core::ptr::read_volatile(reserved) };
    (usize::from(first ^ again) + 1) * lb_common::ipv6::EXT_HDR_PEEK
}

/// Four words of an address at `offset` of a header in packet memory (from [`bytes_at`]), as
/// the packet holds them: four 32-bit loads. LLVM's BPF target assumes no unaligned access and
/// turns [`words`]' unaligned read into sixteen byte loads and the shifts that join them; the
/// verifier takes an unaligned packet load where the architecture has efficient unaligned
/// access, and elsewhere checks alignment as if the packet began `NET_IP_ALIGN` (2) bytes in
/// (kernel/bpf/verifier.c, `check_pkt_ptr_alignment`), where an IPv6 address behind an
/// Ethernet header is aligned. Not for a copy on the stack, whose loads must be aligned.
#[inline(always)]
pub fn packet_words<const N: usize>(header: &[u8; N], offset: usize) -> [u32; 4] {
    let bytes = &header[offset..offset + 16];
    let at = bytes.as_ptr();
    // SAFETY: 16 readable bytes from `at`; each load reads 4 of them.
    unsafe { [0, 4, 8, 12].map(|i| load_word(at.add(i))) }
}

/// Stores `addr`'s four words at `offset` of a header in packet memory (from
/// [`bytes_at_mut`]): four 32-bit stores, as [`packet_words`] loads them.
#[inline(always)]
pub fn store_packet_words<const N: usize>(header: &mut [u8; N], offset: usize, addr: [u32; 4]) {
    let bytes = &mut header[offset..offset + 16];
    let at = bytes.as_mut_ptr();
    for (i, word) in addr.into_iter().enumerate() {
        // SAFETY: 16 writable bytes from `at`; each store writes 4 of them.
        unsafe { store_word(at.add(4 * i), word) };
    }
}

/// One 32-bit load of packet memory at `at`, aligned or not (see [`packet_words`]).
///
/// # Safety
/// `at` must point to 4 readable bytes of packet memory.
#[inline(always)]
unsafe fn load_word(at: *const u8) -> u32 {
    #[cfg(target_arch = "bpf")]
    {
        let word: u64;
        // SAFETY: the caller's; a load, nothing else.
        unsafe {
            core::arch::asm!(
                "{word} = *(u32 *)({at} + 0)",
                at = in(reg) at,
                word = lateout(reg) word,
                options(readonly, nostack, preserves_flags),
            );
        }
        word as u32
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: the caller's.
    unsafe {
        core::ptr::read_unaligned(at.cast::<u32>())
    }
}

/// One 32-bit store to packet memory at `at`, aligned or not (see [`packet_words`]).
///
/// # Safety
/// `at` must point to 4 writable bytes of packet memory that nothing else refers to.
#[inline(always)]
unsafe fn store_word(at: *mut u8, word: u32) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: the caller's; a store, nothing else.
    unsafe {
        core::arch::asm!(
            "*(u32 *)({at} + 0) = {word}",
            at = in(reg) at,
            word = in(reg) u64::from(word),
            options(nostack, preserves_flags),
        );
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: the caller's.
    unsafe {
        core::ptr::write_unaligned(at.cast::<u32>(), word)
    }
}

/// Four words of an address at `offset` of a header, as the packet holds them.
#[inline(always)]
pub fn words<const N: usize>(header: &[u8; N], offset: usize) -> [u32; 4] {
    let bytes = &header[offset..offset + 16];
    // SAFETY: 16 bytes inside the header, read without an alignment requirement.
    unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<[u32; 4]>()) }
}

impl IpHeader for Ipv6Info {
    /// IPv6 has no header checksum.
    #[inline(always)]
    fn header_ok(&self, _ctx: &XdpContext) -> bool {
        true
    }

    #[inline(always)]
    fn may_forward(&self) -> bool {
        self.hop_limit > 1
    }
}
