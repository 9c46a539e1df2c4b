//! Bounds-checked access to packet bytes. Every read goes through [`bytes_at`], whose explicit
//! comparison against `data_end` is the proof the verifier needs before any packet access.

use aya_ebpf::programs::XdpContext;

pub const ETH_HDR_LEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPV4_MIN_HDR_LEN: usize = 20;
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
    // readable packet memory for the lifetime of the program invocation; [u8; N] needs no alignment.
    Some(unsafe { &*(start as *const [u8; N]) })
}

/// The frame length in bytes, as the counters record it.
#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}
