//! Socket hooks for pods and host processes: a connect() or an unconnected sendto() to a Service
//! frontend is sent to a backend before any packet exists (no per-packet NAT, no conntrack), and
//! recvmsg()/getpeername() show the Service address again, so the application never notices.
//!
//! Each translated socket keeps its backend (and, for a Service with loadBalancerSourceRanges,
//! which ranges apply) in socket-local storage: `lb_sock_egress4` drops its packets from a source
//! outside the ranges, and `lb_sock_release` removes its socket NAT entry when it closes.
//!
//! An AF_INET6 socket sending to an IPv4-mapped address (`::ffff:a.b.c.d`, a dual-stack socket
//! reaching an IPv4 Service, as Java does by default) is translated as IPv4: its connect() runs
//! the connect6 hook and its recvfrom()/getpeername() the IPv6 ones, with the mapped address;
//! its unconnected sendto() goes through udp_sendmsg() and the sendmsg4 hook
//! (net/ipv6/udp.c, `udpv6_sendmsg`).
//!
//! Attached to a cgroup v2 directory (the root in production, a private one in tests).

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, bpf_sock},
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr},
    programs::{SkBuffContext, SockAddrContext, SockContext},
};
use lb_common::{
    Backend4, Event, ServiceValue, SockNat4Key, SockNat4Value, SockState4, proto, service_flags,
};

use crate::{
    flow::{
        SOCKET_CLIENT, Tuple, lookup_frontend_for_node_client, select_for_client, source_allowed,
    },
    helpers::{netns_cookie, now_ns, set_syscall_error, socket_cookie},
    maps::{SOCK_NAT4, SOCK_STATE4, count_event, count_service, dry_run},
};

/// Return value of a cgroup sock_addr program: let the call proceed.
const ALLOW: i32 = 1;
/// Return value: fail the call (EPERM unless an error was set with set_syscall_error).
const REJECT: i32 = 0;
/// errno for a refused connection.
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    redirect_to_backend(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    redirect_to_backend(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_service_address(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_service_address(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    redirect_mapped_to_backend(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_mapped_service_address(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_mapped_service_address(&ctx);
    ALLOW
}

/// The destination (user_ip4/user_port, network byte order) becomes a backend when it is a
/// frontend; the socket remembers the frontend for recvmsg/getpeername.
#[inline(always)]
fn redirect_to_backend(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's whole run.
    let addr = unsafe { &mut *ctx.sock_addr };
    match backend_for(ctx, addr.protocol, addr.user_ip4, addr.user_port) {
        Choice::NoService => ALLOW,
        Choice::Refused => REJECT,
        Choice::Backend { addr: ip, port } => {
            addr.user_ip4 = ip;
            addr.user_port = port;
            ALLOW
        }
    }
}

/// As [`redirect_to_backend`], for an IPv4-mapped destination of an AF_INET6 socket: the
/// backend is written mapped too. Any other IPv6 destination is left alone.
#[inline(always)]
fn redirect_mapped_to_backend(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as in redirect_to_backend.
    let addr = unsafe { &mut *ctx.sock_addr };
    if !ipv4_mapped(&addr.user_ip6) {
        return ALLOW;
    }
    match backend_for(ctx, addr.protocol, addr.user_ip6[3], addr.user_port) {
        Choice::NoService => ALLOW,
        Choice::Refused => REJECT,
        Choice::Backend { addr: ip, port } => {
            addr.user_ip6[3] = ip;
            addr.user_port = port;
            ALLOW
        }
    }
}

/// Whether an IPv6 address (four words in network byte order) is IPv4-mapped, `::ffff:a.b.c.d`
/// (RFC 4291 section 2.5.5.2).
#[inline(always)]
fn ipv4_mapped(words: &[u32; 4]) -> bool {
    words[0] == 0 && words[1] == 0 && words[2] == 0x0000_ffff_u32.to_be()
}

/// What a socket call to an address gets.
enum Choice {
    /// No frontend there: the call goes on untouched.
    NoService,
    /// A frontend without a backend for this client: the call fails.
    Refused,
    /// This backend instead (network byte order, the port in the low 16 bits as user_port
    /// holds it).
    Backend { addr: u32, port: u32 },
}

/// The backend for a socket call to `ip`:`port` (network byte order, as bpf_sock_addr holds
/// them) when that is a frontend, recorded for the socket (its socket NAT entry and storage)
/// and counted as a new flow.
#[inline(always)]
fn backend_for(ctx: &SockAddrContext, protocol: u32, ip: u32, port: u32) -> Choice {
    let Ok(protocol) = u8::try_from(protocol) else {
        return Choice::NoService;
    };
    let tuple = Tuple {
        saddr: 0,
        daddr: u32::from_be(ip),
        sport: 0,
        dport: u16::from_be(port as u16),
        proto: protocol,
        tcp_flags: 0,
        seq: 0,
        seq_end: 0,
    };
    let Some(service) = lookup_frontend_for_node_client(&tuple) else {
        return Choice::NoService;
    };
    let client = netns_cookie(ctx);
    let (_, backend) = match select_for_client(service, client, SOCKET_CLIENT, now_ns()) {
        Ok(choice) => choice,
        Err(event) => {
            count_event(Event::SOCK_NO_BACKEND);
            // No endpoint at all: refused at once, like kube-proxy's REJECT. A Local policy with
            // nothing local: kube-proxy drops; a socket call cannot hang, so it fails with EPERM.
            if event == Event::DROP_NO_BACKEND {
                set_syscall_error(ECONNREFUSED);
            }
            return Choice::Refused;
        }
    };
    let key = SockNat4Key {
        cookie: socket_cookie(ctx),
        addr: backend.addr,
        port: backend.port,
        _pad: [0; 2],
    };
    let value = SockNat4Value {
        addr: ip,
        port: port as u16,
        _pad: [0; 2],
        service_id: service.service_id,
    };
    // Without the entry the application would see the backend as its peer: better to fail.
    if SOCK_NAT4.insert(&key, &value, 0).is_err() {
        count_event(Event::DROP_CT_FULL);
        return Choice::Refused;
    }
    remember_backend(ctx, service, &backend);
    count_service(service.service_id, 0, 0, 1);
    Choice::Backend {
        addr: backend.addr,
        port: u32::from(backend.port),
    }
}

/// Records the socket's backend in its storage (created on first use), with the service whose
/// source ranges its packets must pass, if it has any.
#[inline(always)]
fn remember_backend(ctx: &SockAddrContext, service: &ServiceValue, backend: &Backend4) {
    if dry_run() {
        return;
    }
    let source_check_service = if service.flags & service_flags::SOURCE_RANGES != 0 {
        service.service_id
    } else {
        SockState4::NO_SOURCE_CHECK
    };
    let state = SockState4 {
        backend_addr: backend.addr,
        backend_port: backend.port,
        _pad: [0; 2],
        source_check_service,
    };
    let slot = SOCK_STATE4.get_or_insert_ptr_mut(ctx, None);
    if !slot.is_null() {
        // SAFETY: a non-null pointer from bpf_sk_storage_get is this socket's value, valid for
        // the program's run; the socket's own syscall is the only writer (it holds the socket
        // lock in connect/sendmsg).
        unsafe { *slot = state };
    }
}

/// The peer (a backend) is shown as the frontend the socket asked for.
#[inline(always)]
fn restore_service_address(ctx: &SockAddrContext) {
    // SAFETY: as above.
    let addr = unsafe { &mut *ctx.sock_addr };
    if let Some(frontend) = frontend_of_peer(ctx, addr.user_ip4, addr.user_port) {
        addr.user_ip4 = frontend.addr;
        addr.user_port = u32::from(frontend.port);
    }
}

/// As [`restore_service_address`], for an IPv4-mapped peer of an AF_INET6 socket.
#[inline(always)]
fn restore_mapped_service_address(ctx: &SockAddrContext) {
    // SAFETY: as above.
    let addr = unsafe { &mut *ctx.sock_addr };
    if !ipv4_mapped(&addr.user_ip6) {
        return;
    }
    if let Some(frontend) = frontend_of_peer(ctx, addr.user_ip6[3], addr.user_port) {
        addr.user_ip6[3] = frontend.addr;
        addr.user_port = u32::from(frontend.port);
    }
}

/// The frontend this socket was sent to when its peer `ip`:`port` (network byte order) is the
/// backend the hooks chose.
#[inline(always)]
fn frontend_of_peer(ctx: &SockAddrContext, ip: u32, port: u32) -> Option<SockNat4Value> {
    let key = SockNat4Key {
        cookie: socket_cookie(ctx),
        addr: ip,
        port: port as u16,
        _pad: [0; 2],
    };
    // SAFETY: a read-only copy of an entry written whole.
    unsafe { SOCK_NAT4.get(&key) }.copied()
}

/// cgroup_skb egress return value: let the packet go.
const PASS_PACKET: i32 = 1;
/// cgroup_skb egress return value: drop it (the sender gets EPERM).
const DROP_PACKET: i32 = 0;
/// Offsets in an IPv4 header (a cgroup_skb packet starts at the network header).
const IPV4_SADDR: usize = 12;
const IPV4_DADDR: usize = 16;
const IPV4_PROTOCOL: usize = 9;

/// A packet of a socket that the hooks sent to a Service with loadBalancerSourceRanges, to that
/// backend, must come from inside the ranges (kube-proxy applies them to pods' traffic too): the
/// source is only known once the kernel routed the socket, so it is checked here, on the
/// socket's packets, and a packet from outside is dropped (`drop_source_range`). Every other
/// socket costs one storage lookup that finds nothing.
#[cgroup_skb(egress)]
pub fn lb_sock_egress4(ctx: SkBuffContext) -> i32 {
    if source_outside_ranges(&ctx) {
        count_event(Event::DROP_SOURCE_RANGE);
        return DROP_PACKET;
    }
    PASS_PACKET
}

#[inline(always)]
fn source_outside_ranges(ctx: &SkBuffContext) -> bool {
    let skb = ctx.as_ptr().cast::<__sk_buff>();
    // SAFETY: the program's own __sk_buff; `sk` is the sending socket (or null), which the
    // verifier tracks as a socket pointer.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return false;
    }
    let Some(state) = socket_state(sk) else {
        return false;
    };
    if state.source_check_service == SockState4::NO_SOURCE_CHECK {
        return false;
    }
    let Some((saddr, daddr, dport)) = addresses(ctx) else {
        return false;
    };
    daddr == state.backend_addr
        && dport == state.backend_port
        && !source_allowed(state.source_check_service, u32::from_be(saddr))
}

/// The socket's stored state, if the hooks translated it.
#[inline(always)]
fn socket_state(sk: *mut bpf_sock) -> Option<SockState4> {
    // SAFETY: a map and socket pointer as bpf_sk_storage_get takes them; no value pointer and
    // no flags, so nothing is created.
    let value = unsafe {
        aya_ebpf::helpers::generated::bpf_sk_storage_get(
            (&raw const SOCK_STATE4).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<SockState4>();
    if value.is_null() {
        return None;
    }
    // SAFETY: a non-null storage pointer is the socket's value, valid for this run.
    Some(unsafe { *value })
}

/// Source address, destination address and destination port (network byte order) of an IPv4
/// TCP/UDP packet. In a later fragment the "port" is payload; its source is its first
/// fragment's, so a fragment that is looked at gets the same verdict.
#[inline(always)]
fn addresses(ctx: &SkBuffContext) -> Option<(u32, u32, u16)> {
    let first: u8 = ctx.load(0).ok()?;
    if first >> 4 != 4 {
        return None;
    }
    let protocol: u8 = ctx.load(IPV4_PROTOCOL).ok()?;
    if protocol != proto::TCP && protocol != proto::UDP {
        return None;
    }
    let header_len = usize::from(first & 0x0f) * 4;
    let saddr: u32 = ctx.load(IPV4_SADDR).ok()?;
    let daddr: u32 = ctx.load(IPV4_DADDR).ok()?;
    // TCP and UDP both start with source port, destination port.
    let dport: u16 = ctx.load(header_len + 2).ok()?;
    Some((saddr, daddr, dport))
}

/// A closing socket takes its socket NAT entry with it (the map would otherwise keep one entry
/// per connect until the LRU evicts it). Only the entry of the socket's last backend is known:
/// an unconnected UDP socket that sent to several backends leaves the others to the LRU.
#[cgroup_sock(sock_release)]
pub fn lb_sock_release(ctx: SockContext) -> i32 {
    forget_socket(&ctx);
    ALLOW
}

#[inline(always)]
fn forget_socket(ctx: &SockContext) {
    // SAFETY: in cgroup/sock programs, bpf_sk_storage_get takes the context (the socket) itself.
    let value = unsafe {
        aya_ebpf::helpers::generated::bpf_sk_storage_get(
            (&raw const SOCK_STATE4).cast_mut().cast(),
            ctx.sock.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<SockState4>();
    if value.is_null() {
        return;
    }
    // SAFETY: as in socket_state.
    let state = unsafe { *value };
    let key = SockNat4Key {
        cookie: socket_cookie(ctx),
        addr: state.backend_addr,
        port: state.backend_port,
        _pad: [0; 2],
    };
    let _ = SOCK_NAT4.remove(&key);
}
