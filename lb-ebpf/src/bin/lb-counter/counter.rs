//! `lb_xdp_count`: classifies every frame on a node NIC and counts it per CPU. It never changes or
//! drops a packet, which makes it safe to attach anywhere and a baseline for the datapath's cost.

use aya_ebpf::{
    bindings::xdp_action, macros::map, macros::xdp, maps::PerCpuArray, programs::XdpContext,
};
use lb_common::{PacketClass, PacketCounter};

use lb_ebpf::packet::{
    ETH_HDR_LEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
    IPV4_FRAG_OFFSET_MASK, IPV4_MIN_HDR_LEN, TCP_MIN_HDR_LEN, UDP_HDR_LEN, bytes_at, frame_len,
};

/// lb_common::map_names::PACKET_COUNTERS (the macro needs a literal).
#[map(name = "lb_pktcnt_v1")]
static PACKET_COUNTERS: PerCpuArray<PacketCounter> =
    PerCpuArray::with_max_entries(PacketClass::COUNT, 0);

#[xdp]
pub fn lb_xdp_count(ctx: XdpContext) -> u32 {
    count(classify(&ctx), frame_len(&ctx));
    xdp_action::XDP_PASS
}

#[inline(always)]
fn count(class: PacketClass, len: usize) {
    if let Some(counter) = PACKET_COUNTERS.get_ptr_mut(class.0) {
        // SAFETY: a per-CPU slot is only touched by this CPU, and BPF programs are not preempted
        // by another program on the same CPU for the same map slot (XDP runs in softirq context).
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += len as u64;
        }
    }
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> PacketClass {
    let Some(eth) = bytes_at::<ETH_HDR_LEN>(ctx, 0) else {
        return PacketClass::MALFORMED;
    };
    match u16::from_be_bytes([eth[12], eth[13]]) {
        ETH_P_IP => classify_ipv4(ctx, ETH_HDR_LEN),
        ETH_P_IPV6 => PacketClass::IPV6,
        _ => PacketClass::NON_IP,
    }
}

#[inline(always)]
fn classify_ipv4(ctx: &XdpContext, offset: usize) -> PacketClass {
    let Some(ip) = bytes_at::<IPV4_MIN_HDR_LEN>(ctx, offset) else {
        return PacketClass::MALFORMED;
    };
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || header_len < IPV4_MIN_HDR_LEN {
        return PacketClass::MALFORMED;
    }
    if u16::from_be_bytes([ip[6], ip[7]]) & IPV4_FRAG_OFFSET_MASK != 0 {
        // A later fragment carries no transport header.
        return PacketClass::IPV4_OTHER;
    }
    let transport = offset + header_len;
    match ip[9] {
        IPPROTO_TCP if bytes_at::<TCP_MIN_HDR_LEN>(ctx, transport).is_some() => {
            PacketClass::IPV4_TCP
        }
        IPPROTO_UDP if bytes_at::<UDP_HDR_LEN>(ctx, transport).is_some() => PacketClass::IPV4_UDP,
        IPPROTO_TCP | IPPROTO_UDP => PacketClass::MALFORMED,
        IPPROTO_ICMP => PacketClass::IPV4_ICMP,
        _ => PacketClass::IPV4_OTHER,
    }
}
