//! Socket hooks for pods and host processes: a connect() or an unconnected sendto() to a Service
//! frontend is sent to a backend before any packet exists (no per-packet NAT, no conntrack), and
//! recvmsg()/getpeername() show the Service address again (to an unconnected socket, while the
//! frontend is still that Service's), so the application never notices.
//!
//! Each translated socket keeps its backend (and, for a Service with loadBalancerSourceRanges,
//! which ranges apply) in socket-local storage: `lb_sock_egress4` drops its packets from a source
//! outside the ranges, and `lb_sock_release` removes its socket NAT entry when it closes.
//!
//! Both families run the same code, generic over [`Family`]: an AF_INET6 socket's native IPv6
//! destination is looked up in the IPv6 frontends (`lb6_fe_v1`) and recorded in the IPv6 socket
//! NAT map and storage; its unconnected sendto() runs the sendmsg6 hook. The egress program
//! sees both families' packets and checks each against its family's storage.
//!
//! An AF_INET6 socket sending to an IPv4-mapped address (`::ffff:a.b.c.d`, a dual-stack socket
//! reaching an IPv4 Service, as Java does by default) is translated as IPv4: its connect() runs
//! the connect6 hook and its recvfrom()/getpeername() the IPv6 ones, with the mapped address,
//! and its state goes to the IPv4 maps; its unconnected sendto() goes through udp_sendmsg() and
//! the sendmsg4 hook (net/ipv6/udp.c, `udpv6_sendmsg`), never through sendmsg6.
//!
//! Attached to a cgroup v2 directory (the root in production, a private one in tests).

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, bpf_sock, bpf_sock_addr},
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr},
    programs::{SkBuffContext, SockAddrContext, SockContext},
};
use lb_common::{
    BackendValue, Event, Ipv6Words, ServiceValue, SockNatValue, SockState,
    ipv6::{self, Step},
    proto, service_flags,
};

use crate::{
    family::{Family, V4, V6},
    flow::{
        NOT_INDEXED, SOCKET_CLIENT, lookup_frontend_for_node_client, select_drawn,
        select_for_client, source_allowed_in,
    },
    helpers::{netns_cookie, now_ns, set_syscall_error, socket_cookie},
    maps::{count_event, count_service, dry_run},
    monitor,
};

/// Return value of a cgroup sock_addr program: let the call proceed.
const ALLOW: i32 = 1;
/// Return value: fail the call (EPERM unless an error was set with set_syscall_error).
const REJECT: i32 = 0;
/// errno for a refused connection.
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    redirect_to_backend::<CONNECT>(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    redirect_to_backend::<SEND_UNCONNECTED>(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_service_address(&ctx, sender_of_datagram(&ctx));
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_service_address(&ctx, Peer::Connected);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's whole run.
    if ipv4_mapped(&unsafe { &*ctx.sock_addr }.user_ip6) {
        redirect_mapped_to_backend(&ctx)
    } else {
        redirect6_to_backend::<CONNECT>(&ctx)
    }
}

/// An IPv4-mapped destination never gets here (the kernel runs sendmsg4 for it), and the kernel
/// refuses a sendmsg6 hook's rewrite to one; a mapped address is left alone all the same.
#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in lb_connect6.
    if ipv4_mapped(&unsafe { &*ctx.sock_addr }.user_ip6) {
        return ALLOW;
    }
    redirect6_to_backend::<SEND_UNCONNECTED>(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_service_address6(&ctx, sender_of_datagram(&ctx));
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_service_address6(&ctx, Peer::Connected);
    ALLOW
}

/// Whose address a call names: the peer a socket connected to, or the sender of a datagram an
/// unconnected socket received.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Peer {
    /// Certainly the backend the socket was sent to when it connected to the frontend.
    Connected,
    /// Any host's: the record of the backend tells only that the socket once sent to it.
    Unconnected,
}

/// `bpf_sock::state` of a connected UDP socket (include/net/tcp_states.h; set by
/// net/ipv4/datagram.c `__ip4_datagram_connect` and its IPv6 twin).
const TCP_ESTABLISHED: u32 = 1;

/// Whether a recvmsg() names its socket's connected peer or any sender.
#[inline(always)]
fn sender_of_datagram(ctx: &SockAddrContext) -> Peer {
    // SAFETY: the kernel passes a valid bpf_sock_addr, whose `sk` is the calling socket.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    // SAFETY: a socket pointer the verifier tracks; `state` is a readable field of it.
    if !sk.is_null() && unsafe { (*sk).state } == TCP_ESTABLISHED {
        Peer::Connected
    } else {
        Peer::Unconnected
    }
}

/// A connect() (TCP, or a UDP socket connecting): a new flow, its backend drawn at random.
const CONNECT: bool = false;
/// A sendmsg() of an unconnected UDP socket: its datagrams to one frontend are one flow, as
/// kube-proxy's conntrack holds them by the socket's source port, so they go to one backend.
const SEND_UNCONNECTED: bool = true;

/// The destination (user_ip4/user_port, network byte order) becomes a backend when it is a
/// frontend; the socket remembers the frontend for recvmsg/getpeername.
#[inline(always)]
fn redirect_to_backend<const UNCONNECTED: bool>(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's whole run.
    let addr = unsafe { &mut *ctx.sock_addr };
    match backend_for::<V4, UNCONNECTED>(ctx, addr.protocol, addr.user_ip4, addr.user_port) {
        Choice::NoService => ALLOW,
        Choice::Refused => REJECT,
        Choice::Backend { addr: ip, port } => {
            addr.user_ip4 = ip;
            addr.user_port = port;
            ALLOW
        }
    }
}

/// As [`redirect_to_backend`], for an IPv4-mapped destination of an AF_INET6 socket (the
/// caller checked): the backend is written mapped too.
#[inline(always)]
fn redirect_mapped_to_backend(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as in redirect_to_backend.
    let addr = unsafe { &mut *ctx.sock_addr };
    match backend_for::<V4, CONNECT>(ctx, addr.protocol, addr.user_ip6[3], addr.user_port) {
        Choice::NoService => ALLOW,
        Choice::Refused => REJECT,
        Choice::Backend { addr: ip, port } => {
            addr.user_ip6[3] = ip;
            addr.user_port = port;
            ALLOW
        }
    }
}

/// As [`redirect_to_backend`], for a native IPv6 destination of an AF_INET6 socket (the caller
/// checked that it is not IPv4-mapped): all four words of user_ip6 become the backend's.
#[inline(always)]
fn redirect6_to_backend<const UNCONNECTED: bool>(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as in redirect_to_backend.
    let addr = unsafe { &mut *ctx.sock_addr };
    match backend_for::<V6, UNCONNECTED>(ctx, addr.protocol, user_ip6(addr), addr.user_port) {
        Choice::NoService => ALLOW,
        Choice::Refused => REJECT,
        Choice::Backend { addr: ip, port } => {
            set_user_ip6(addr, &ip);
            addr.user_port = port;
            ALLOW
        }
    }
}

/// The IPv6 address of a sock_addr context, one 32-bit load per word. The kernel takes a
/// context field only at a constant offset from the context pointer itself: a copy of the
/// array as a whole lets LLVM load it through a pointer to the field ("dereference of modified
/// ctx ptr"), and volatile accesses keep each word a load of its own.
#[inline(always)]
fn user_ip6(addr: &bpf_sock_addr) -> Ipv6Words {
    // SAFETY: reads of the fields of the program's own bpf_sock_addr.
    unsafe {
        [
            core::ptr::read_volatile(&addr.user_ip6[0]),
            core::ptr::read_volatile(&addr.user_ip6[1]),
            core::ptr::read_volatile(&addr.user_ip6[2]),
            core::ptr::read_volatile(&addr.user_ip6[3]),
        ]
    }
}

/// Writes the IPv6 address of a sock_addr context, one 32-bit store per word (as
/// [`user_ip6`] reads it).
#[inline(always)]
fn set_user_ip6(addr: &mut bpf_sock_addr, words: &Ipv6Words) {
    // SAFETY: writes of the fields of the program's own bpf_sock_addr, which sock_addr programs
    // may write.
    unsafe {
        core::ptr::write_volatile(&mut addr.user_ip6[0], words[0]);
        core::ptr::write_volatile(&mut addr.user_ip6[1], words[1]);
        core::ptr::write_volatile(&mut addr.user_ip6[2], words[2]);
        core::ptr::write_volatile(&mut addr.user_ip6[3], words[3]);
    }
}

/// Whether an IPv6 address (four words in network byte order) is IPv4-mapped, `::ffff:a.b.c.d`
/// (RFC 4291 section 2.5.5.2).
#[inline(always)]
fn ipv4_mapped(words: &Ipv6Words) -> bool {
    words[0] == 0 && words[1] == 0 && words[2] == 0x0000_ffff_u32.to_be()
}

/// What a socket call to an address of family `A` gets.
enum Choice<A> {
    /// No frontend there: the call goes on untouched.
    NoService,
    /// A frontend without a backend for this client: the call fails.
    Refused,
    /// This backend instead (network byte order, the port in the low 16 bits as user_port
    /// holds it).
    Backend { addr: A, port: u32 },
}

/// The backend for a socket call to `ip`:`port` (network byte order, as bpf_sock_addr holds
/// them) when that is a frontend of family `F`, recorded for the socket (its socket NAT entry
/// and storage of that family) and counted as a new flow. An unconnected socket's datagrams
/// (`UNCONNECTED`) to a service without affinity go to the backend its socket cookie falls on
/// ([`per_socket_draw`]), the same for every one while the table stays.
#[inline(always)]
fn backend_for<F: Family, const UNCONNECTED: bool>(
    ctx: &SockAddrContext,
    protocol: u32,
    ip: F::Addr,
    port: u32,
) -> Choice<F::Addr> {
    let Ok(protocol) = u8::try_from(protocol) else {
        return Choice::NoService;
    };
    // user_port holds the port in its low 16 bits, network byte order, as the keys do.
    let Some(service) = lookup_frontend_for_node_client::<F>(ip, port as u16, protocol) else {
        return Choice::NoService;
    };
    let choice = if UNCONNECTED && service.affinity_timeout_s == 0 {
        select_drawn::<F>(
            service,
            NOT_INDEXED,
            per_socket_draw(ctx, service.service_id),
        )
    } else {
        select_for_client::<F>(service, netns_cookie(ctx), SOCKET_CLIENT, now_ns())
    };
    let (_, backend) = match choice {
        Ok(choice) => choice,
        Err(event) => {
            count_event(Event::SOCK_NO_BACKEND);
            monitor::socket_refused::<F>(
                protocol,
                (ip, port as u16),
                service.service_id,
                Event::SOCK_NO_BACKEND,
            );
            // No endpoint at all: refused at once, like kube-proxy's REJECT. A Local policy with
            // nothing local: kube-proxy drops; a socket call cannot hang, so it fails with EPERM.
            if event == Event::DROP_NO_BACKEND {
                set_syscall_error(ECONNREFUSED);
            }
            return Choice::Refused;
        }
    };
    let value = SockNatValue {
        addr: ip,
        port: port as u16,
        _pad: [0; 2],
        service_id: service.service_id,
    };
    // Without the storage a ranged service's check would find nothing and let every packet
    // through, and without the entry the application would see the backend as its peer: better
    // to fail, counted as a full table.
    if !remember_backend::<F>(ctx, service, &backend)
        || F::sock_nat_insert(socket_cookie(ctx), backend.addr, backend.port, &value).is_err()
    {
        count_event(Event::DROP_CT_FULL);
        monitor::socket_refused::<F>(
            protocol,
            (ip, port as u16),
            service.service_id,
            Event::DROP_CT_FULL,
        );
        return Choice::Refused;
    }
    count_service(service.service_id, 0, 0, 1);
    monitor::socket_translated::<F>(
        protocol,
        (ip, port as u16),
        service.service_id,
        (backend.addr, backend.port),
    );
    Choice::Backend {
        addr: backend.addr,
        port: u32::from(backend.port),
    }
}

/// A draw for the socket's datagrams to the service `service_id`: its cookie and the id mixed
/// (a multiply by 2^64 / phi, high half), so that the sockets of a pod, whose cookies are
/// consecutive numbers, spread over the table as random draws would.
#[inline(always)]
fn per_socket_draw(ctx: &SockAddrContext, service_id: u32) -> u32 {
    let mixed =
        (socket_cookie(ctx) ^ (u64::from(service_id) << 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (mixed >> 32) as u32
}

/// Records the socket's backend in its storage of family `F` (created on first use), with the
/// service whose source ranges its packets must pass, if it has any. False when a ranged
/// service's record could not be made (the kernel could not allocate the storage): its packets
/// would go unchecked. A service without ranges needs none for its check, and its socket goes
/// on without it.
#[inline(always)]
fn remember_backend<F: Family>(
    ctx: &SockAddrContext,
    service: &ServiceValue,
    backend: &BackendValue<F::Addr>,
) -> bool {
    if dry_run() {
        return true;
    }
    let source_check_service = if service.flags & service_flags::SOURCE_RANGES != 0 {
        service.service_id
    } else {
        SockState::<F::Addr>::NO_SOURCE_CHECK
    };
    let state = SockState {
        backend_addr: backend.addr,
        backend_port: backend.port,
        _pad: [0; 2],
        source_check_service,
    };
    let slot = F::sock_state().get_or_insert_ptr_mut(ctx, None);
    if slot.is_null() {
        return source_check_service == SockState::<F::Addr>::NO_SOURCE_CHECK;
    }
    // SAFETY: a non-null pointer from bpf_sk_storage_get is this socket's value, valid for the
    // program's run; the socket's own syscall is the only writer (it holds the socket lock in
    // connect/sendmsg).
    unsafe { *slot = state };
    true
}

/// The peer (a backend) is shown as the frontend the socket asked for.
#[inline(always)]
fn restore_service_address(ctx: &SockAddrContext, peer: Peer) {
    // SAFETY: as above.
    let addr = unsafe { &mut *ctx.sock_addr };
    if let Some(frontend) = frontend_of_peer::<V4>(ctx, addr.user_ip4, addr.user_port, peer) {
        addr.user_ip4 = frontend.addr;
        addr.user_port = u32::from(frontend.port);
    }
}

/// As [`restore_service_address`], for an AF_INET6 socket: an IPv4-mapped peer is looked up
/// as IPv4 and its frontend written mapped, any other as IPv6.
#[inline(always)]
fn restore_service_address6(ctx: &SockAddrContext, peer: Peer) {
    // SAFETY: as above.
    let addr = unsafe { &mut *ctx.sock_addr };
    if ipv4_mapped(&addr.user_ip6) {
        if let Some(frontend) = frontend_of_peer::<V4>(ctx, addr.user_ip6[3], addr.user_port, peer)
        {
            addr.user_ip6[3] = frontend.addr;
            addr.user_port = u32::from(frontend.port);
        }
    } else if let Some(frontend) = frontend_of_peer::<V6>(ctx, user_ip6(addr), addr.user_port, peer)
    {
        set_user_ip6(addr, &frontend.addr);
        addr.user_port = u32::from(frontend.port);
    }
}

/// The frontend this socket was sent to when its peer `ip`:`port` (network byte order) is the
/// backend the hooks chose, from the socket NAT map of family `F`. A connected socket's peer is
/// that backend for certain, whatever became of the Service since (an established connection
/// keeps naming its ClusterIP, as with kube-proxy). A datagram to an unconnected socket may
/// come from that backend for another reason: it is named as the frontend only while the
/// frontend is still the same Service's (its id the record's). Once the Service is gone, or its
/// address another Service's, the sender is what it is: naming it as the old frontend would
/// pass a pod's datagrams off as that address's (the socket may talk to the pod straight later,
/// or hear from it after the address went to another Service).
#[inline(always)]
fn frontend_of_peer<F: Family>(
    ctx: &SockAddrContext,
    ip: F::Addr,
    port: u32,
    peer: Peer,
) -> Option<SockNatValue<F::Addr>> {
    let asked = F::sock_nat_get(socket_cookie(ctx), ip, port as u16)?;
    if peer == Peer::Connected {
        return Some(asked);
    }
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's whole run.
    let protocol = unsafe { (*ctx.sock_addr).protocol };
    let still_served = u8::try_from(protocol).ok().is_some_and(|protocol| {
        lookup_frontend_for_node_client::<F>(asked.addr, asked.port, protocol)
            .is_some_and(|service| service.service_id == asked.service_id)
    });
    if !still_served {
        count_event(Event::NAT_SOCKET_STALE);
        return None;
    }
    Some(asked)
}

/// cgroup_skb egress return value: let the packet go.
const PASS_PACKET: i32 = 1;
/// cgroup_skb egress return value: drop it (the sender gets EPERM).
const DROP_PACKET: i32 = 0;
/// Offsets in an IPv4 header (a cgroup_skb packet starts at the network header).
const IPV4_SADDR: usize = 12;
const IPV4_DADDR: usize = 16;
const IPV4_PROTOCOL: usize = 9;
/// `__sk_buff::protocol` of an IPv6 packet: ETH_P_IPV6, network byte order, as the kernel sets
/// it before the egress hook (net/ipv6/ip6_output.c, `ip6_output`).
const ETH_P_IPV6_BE: u32 = 0x86dd_u16.to_be() as u32;
/// `bpf_sock::family` of an IPv6 socket.
const AF_INET6: u32 = 10;

/// A packet of a socket that the hooks sent to a Service with loadBalancerSourceRanges, to that
/// backend, must come from inside the ranges (kube-proxy applies them to pods' traffic too): the
/// source is only known once the kernel routed the socket, so it is checked here, on the
/// socket's packets, and a packet from outside is dropped (`drop_source_range`). Every other
/// socket costs one storage lookup that finds nothing. IPv4 packets are checked against the
/// IPv4 storage (an AF_INET6 socket's packets to an IPv4-mapped Service are IPv4 packets),
/// IPv6 packets against the IPv6 storage.
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
    // The family from the skb (a field read, no helper call): IPv4 goes on as before.
    // SAFETY: a field of the program's own __sk_buff.
    if unsafe { (*skb).protocol } == ETH_P_IPV6_BE {
        source_outside::<V6>(sk, || addresses6(ctx))
    } else {
        source_outside::<V4>(sk, || addresses(ctx))
    }
}

/// What the egress check reads of a packet of family `F`.
struct Seen<A> {
    saddr: A,
    daddr: A,
    /// The destination port (network byte order); None where it cannot be read (a later
    /// fragment, ESP, more extension headers than the walk crosses, a short packet).
    dport: Option<u16>,
    /// A Routing header: `daddr` is a waypoint, not where the packet ends.
    routed: bool,
}

/// Whether a packet of socket `sk` goes to the backend its storage of family `F` records, from
/// a source outside that service's ranges. `addresses` reads the packet; only for a socket whose
/// storage asks for the check. It fails closed: a packet whose port cannot be read is judged by
/// its addresses, and one whose destination a Routing header hides by its source alone, so no
/// header a socket option can add takes a packet past the ranges.
#[inline(always)]
fn source_outside<F: Family>(
    sk: *mut bpf_sock,
    addresses: impl FnOnce() -> Option<Seen<F::Addr>>,
) -> bool {
    let Some(state) = socket_state::<F>(sk) else {
        return false;
    };
    if state.source_check_service == SockState::<F::Addr>::NO_SOURCE_CHECK {
        return false;
    }
    let Some(seen) = addresses() else {
        return false;
    };
    let to_backend = seen.routed
        || (F::same(&seen.daddr, &state.backend_addr)
            && seen.dport.is_none_or(|dport| dport == state.backend_port));
    to_backend && !source_allowed_in::<F>(state.source_check_service, seen.saddr)
}

/// The socket's stored state of family `F`, if the hooks translated it.
#[inline(always)]
fn socket_state<F: Family>(sk: *mut bpf_sock) -> Option<SockState<F::Addr>> {
    // SAFETY: a map and socket pointer as bpf_sk_storage_get takes them; no value pointer and
    // no flags, so nothing is created.
    let value = unsafe {
        aya_ebpf::helpers::generated::bpf_sk_storage_get(
            core::ptr::from_ref(F::sock_state()).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<SockState<F::Addr>>();
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
fn addresses(ctx: &SkBuffContext) -> Option<Seen<u32>> {
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
    Some(Seen {
        saddr,
        daddr,
        dport: Some(dport),
        routed: false,
    })
}

/// As [`addresses`], for an IPv6 packet. The fixed header is read in one go (words in network
/// byte order: version, payload length and next header, source, destination).
#[inline(always)]
fn addresses6(ctx: &SkBuffContext) -> Option<Seen<Ipv6Words>> {
    let header: [u32; ipv6::IPV6_HDR_LEN / 4] = ctx.load(0).ok()?;
    let [version, _, _, _] = header[0].to_ne_bytes();
    if version >> 4 != 6 {
        return None;
    }
    let [_, _, next_header, _] = header[1].to_ne_bytes();
    let (dport, routed) = destination_port6(ctx, next_header);
    Some(Seen {
        saddr: [header[2], header[3], header[4], header[5]],
        daddr: [header[6], header[7], header[8], header[9]],
        dport,
        routed,
    })
}

/// The destination port (network byte order) of an IPv6 TCP/UDP packet whose first header
/// after the fixed one is `next_header`, and whether a Routing header came on the way: the
/// port is there, or after extension headers (socket options may add Hop-by-Hop, Routing and
/// Destination Options headers), walked as `lb_common::ipv6` walks them, at most
/// `MAX_EXT_HEADERS` of them. Each step reads 8 bytes: an extension header's type and length,
/// or the transport header's ports. No port for another protocol (or ESP, which hides it), a
/// fragment after the first (no transport header), more extension headers, or a short packet.
#[inline(always)]
fn destination_port6(ctx: &SkBuffContext, mut next_header: u8) -> (Option<u16>, bool) {
    let mut offset = ipv6::IPV6_HDR_LEN;
    let mut routed = false;
    for _ in 0..=ipv6::MAX_EXT_HEADERS {
        let Ok(peek) = ctx.load::<[u8; ipv6::EXT_HDR_PEEK]>(offset) else {
            return (None, routed);
        };
        routed |= next_header == ipv6::next_header::ROUTING;
        match ipv6::step(next_header, &peek) {
            Step::Upper { protocol } => {
                // TCP and UDP both start with source port, destination port.
                let port = (protocol == proto::TCP || protocol == proto::UDP)
                    .then(|| u16::from_ne_bytes([peek[2], peek[3]]));
                return (port, routed);
            }
            Step::Extension {
                next_header: next,
                len,
            } => {
                next_header = next;
                offset += len;
            }
            Step::Fragment {
                next_header: next,
                fragment,
            } => {
                if fragment.is_later() {
                    return (None, routed);
                }
                next_header = next;
                offset += ipv6::EXT_HDR_PEEK;
            }
        }
    }
    (None, routed)
}

/// A closing socket takes its socket NAT entries with it (the map would otherwise keep one entry
/// per connect until the LRU evicts it). Only the entry of the socket's last backend is known:
/// an unconnected UDP socket that sent to several backends leaves the others to the LRU. An
/// AF_INET6 socket may have one of each family (one sent to an IPv4-mapped Service and to an
/// IPv6 one); an AF_INET socket only has IPv4 state, and costs no IPv6 lookup.
#[cgroup_sock(sock_release)]
pub fn lb_sock_release(ctx: SockContext) -> i32 {
    forget_socket::<V4>(&ctx);
    // SAFETY: the kernel passes a valid bpf_sock for the program's whole run.
    if unsafe { (*ctx.sock).family } == AF_INET6 {
        forget_socket::<V6>(&ctx);
    }
    ALLOW
}

/// Removes the socket NAT entry of the socket's last backend of family `F`, if it has one.
#[inline(always)]
fn forget_socket<F: Family>(ctx: &SockContext) {
    // SAFETY: in cgroup/sock programs, bpf_sk_storage_get takes the context (the socket) itself.
    let value = unsafe {
        aya_ebpf::helpers::generated::bpf_sk_storage_get(
            core::ptr::from_ref(F::sock_state()).cast_mut().cast(),
            ctx.sock.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<SockState<F::Addr>>();
    if value.is_null() {
        return;
    }
    // SAFETY: as in socket_state.
    let state = unsafe { *value };
    F::sock_nat_remove(socket_cookie(ctx), state.backend_addr, state.backend_port);
}
