//! `lb_xdp`: on the node NICs, every packet addressed to a Service frontend (node address:
//! nodePort, externalIP:port, LoadBalancer IP:port, or a ClusterIP routed to the node) is DNATed
//! to a backend and handed to the stack, which routes it to the pod. Everything else passes
//! untouched.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{Event, checksum, proto};

use lb_ebpf::packet::{
    ETH_HDR_LEN, ETH_P_IP, IPV4_CSUM_OFFSET, IPV4_DADDR_OFFSET, TCP_CSUM_OFFSET, TCP_FLAGS_OFFSET,
    TCP_MIN_HDR_LEN, UDP_CSUM_OFFSET, UDP_HDR_LEN, bytes_at, bytes_at_mut, frame_len, parse_ipv4,
};

use crate::{
    flow::{Tuple, destination, lookup_frontend},
    maps::{count_event, count_service},
};

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match try_lb_xdp(&ctx) {
        Ok(action) => action,
        Err(event) => {
            count_event(event);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn try_lb_xdp(ctx: &XdpContext) -> Result<u32, Event> {
    let Some(eth) = bytes_at::<ETH_HDR_LEN>(ctx, 0) else {
        return Ok(xdp_action::XDP_PASS);
    };
    if u16::from_be_bytes([eth[12], eth[13]]) != ETH_P_IP {
        return Ok(xdp_action::XDP_PASS);
    }
    let ip = parse_ipv4(ctx).ok_or(Event::DROP_MALFORMED)?;
    if ip.proto != proto::TCP && ip.proto != proto::UDP {
        return Ok(xdp_action::XDP_PASS);
    }
    if ip.fragment {
        // No ports in later fragments, so no consistent choice for the whole datagram: the stack
        // gets it as it came.
        count_event(Event::PASS_FRAGMENT);
        return Ok(xdp_action::XDP_PASS);
    }
    let tuple = transport_tuple(ctx, ip.saddr, ip.daddr, ip.proto, ip.l4_offset)?;
    let Some(service) = lookup_frontend(&tuple) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let destination = destination(&tuple, service)?;
    dnat(
        ctx,
        &tuple,
        ip.l4_offset,
        destination.addr,
        destination.port,
    )?;
    count_service(destination.service_id, 1, frame_len(ctx) as u64, 0);
    Ok(xdp_action::XDP_PASS)
}

/// Ports (and TCP flags) of a TCP or UDP packet whose transport header must be there in full.
#[inline(always)]
fn transport_tuple(
    ctx: &XdpContext,
    saddr: u32,
    daddr: u32,
    protocol: u8,
    l4_offset: usize,
) -> Result<Tuple, Event> {
    let (ports, tcp_flags) = if protocol == proto::TCP {
        let tcp = bytes_at::<TCP_MIN_HDR_LEN>(ctx, l4_offset).ok_or(Event::DROP_MALFORMED)?;
        ([tcp[0], tcp[1], tcp[2], tcp[3]], tcp[TCP_FLAGS_OFFSET])
    } else {
        let udp = bytes_at::<UDP_HDR_LEN>(ctx, l4_offset).ok_or(Event::DROP_MALFORMED)?;
        ([udp[0], udp[1], udp[2], udp[3]], 0)
    };
    Ok(Tuple {
        saddr,
        daddr,
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        proto: protocol,
        tcp_flags,
    })
}

/// Rewrites the destination address and port, with incremental IPv4 and TCP/UDP checksums.
/// A UDP checksum of 0 (none) stays 0; a computed 0 is sent as 0xffff (RFC 768).
#[inline(always)]
fn dnat(
    ctx: &XdpContext,
    tuple: &Tuple,
    l4_offset: usize,
    new_addr: u32,
    new_port: u16,
) -> Result<(), Event> {
    let ip = bytes_at_mut::<20>(ctx, ETH_HDR_LEN).ok_or(Event::DROP_MALFORMED)?;
    ip[IPV4_DADDR_OFFSET..IPV4_DADDR_OFFSET + 4].copy_from_slice(&new_addr.to_be_bytes());
    let ip_check = u16::from_be_bytes([ip[IPV4_CSUM_OFFSET], ip[IPV4_CSUM_OFFSET + 1]]);
    let ip_check = checksum::replace_u32(ip_check, tuple.daddr, new_addr);
    ip[IPV4_CSUM_OFFSET..IPV4_CSUM_OFFSET + 2].copy_from_slice(&ip_check.to_be_bytes());

    if tuple.proto == proto::TCP {
        let tcp = bytes_at_mut::<TCP_MIN_HDR_LEN>(ctx, l4_offset).ok_or(Event::DROP_MALFORMED)?;
        tcp[2..4].copy_from_slice(&new_port.to_be_bytes());
        let check = u16::from_be_bytes([tcp[TCP_CSUM_OFFSET], tcp[TCP_CSUM_OFFSET + 1]]);
        let check = checksum::replace_u32(check, tuple.daddr, new_addr);
        let check = checksum::replace_u16(check, tuple.dport, new_port);
        tcp[TCP_CSUM_OFFSET..TCP_CSUM_OFFSET + 2].copy_from_slice(&check.to_be_bytes());
    } else {
        let udp = bytes_at_mut::<UDP_HDR_LEN>(ctx, l4_offset).ok_or(Event::DROP_MALFORMED)?;
        udp[2..4].copy_from_slice(&new_port.to_be_bytes());
        let check = u16::from_be_bytes([udp[UDP_CSUM_OFFSET], udp[UDP_CSUM_OFFSET + 1]]);
        if check != 0 {
            let check = checksum::replace_u32(check, tuple.daddr, new_addr);
            let check = checksum::replace_u16(check, tuple.dport, new_port);
            let check = if check == 0 { 0xffff } else { check };
            udp[UDP_CSUM_OFFSET..UDP_CSUM_OFFSET + 2].copy_from_slice(&check.to_be_bytes());
        }
    }
    Ok(())
}
