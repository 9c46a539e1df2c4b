//! Socket hooks for pods and host processes: a connect() or an unconnected sendto() to a Service
//! frontend is sent to a backend before any packet exists (no per-packet NAT, no conntrack), and
//! recvmsg()/getpeername() show the Service address again, so the application never notices.
//!
//! Attached to a cgroup v2 directory (the root in production, a private one in tests).

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use lb_common::{Event, SockNat4Key, SockNat4Value};

use crate::{
    flow::{SOCKET_CLIENT, Tuple, lookup_frontend, select_for_client},
    helpers::{netns_cookie, now_ns, set_syscall_error, socket_cookie},
    maps::{SOCK_NAT4, count_event, count_service},
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

/// The destination (user_ip4/user_port, network byte order) becomes a backend when it is a
/// frontend; the socket remembers the frontend for recvmsg/getpeername.
#[inline(always)]
fn redirect_to_backend(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's whole run.
    let addr = unsafe { &mut *ctx.sock_addr };
    let Ok(protocol) = u8::try_from(addr.protocol) else {
        return ALLOW;
    };
    let tuple = Tuple {
        saddr: 0,
        daddr: u32::from_be(addr.user_ip4),
        sport: 0,
        dport: u16::from_be(addr.user_port as u16),
        proto: protocol,
        tcp_flags: 0,
    };
    let Some(service) = lookup_frontend(&tuple) else {
        return ALLOW;
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
            return REJECT;
        }
    };
    let key = SockNat4Key {
        cookie: socket_cookie(ctx),
        addr: backend.addr,
        port: backend.port,
        _pad: [0; 2],
    };
    let value = SockNat4Value {
        addr: addr.user_ip4,
        port: addr.user_port as u16,
        _pad: [0; 2],
        service_id: service.service_id,
    };
    // Without the entry the application would see the backend as its peer: better to fail.
    if SOCK_NAT4.insert(&key, &value, 0).is_err() {
        count_event(Event::DROP_CT_FULL);
        return REJECT;
    }
    addr.user_ip4 = backend.addr;
    addr.user_port = u32::from(backend.port);
    count_service(service.service_id, 0, 0, 1);
    ALLOW
}

/// The peer (a backend) is shown as the frontend the socket asked for.
#[inline(always)]
fn restore_service_address(ctx: &SockAddrContext) {
    // SAFETY: as above.
    let addr = unsafe { &mut *ctx.sock_addr };
    let key = SockNat4Key {
        cookie: socket_cookie(ctx),
        addr: addr.user_ip4,
        port: addr.user_port as u16,
        _pad: [0; 2],
    };
    // SAFETY: read-only use of an entry written whole.
    if let Some(service) = unsafe { SOCK_NAT4.get(&key) } {
        addr.user_ip4 = service.addr;
        addr.user_port = u32::from(service.port);
    }
}
