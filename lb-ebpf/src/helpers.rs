//! Safe wrappers over the BPF helpers the programs call. The helpers take no pointers here (or
//! only the program's own context), so they cannot violate memory safety.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_TCP_ESTABLISHED, BPF_TCP_LISTEN, bpf_sock, bpf_sock_tuple,
    },
    helpers::{
        bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_jiffies64, bpf_ktime_get_coarse_ns,
        bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp,
    },
    maps::ProgramArray,
};
use lb_common::{ClockSample, xorshift};

use crate::maps::{CLOCK, RANDOM_STATE};

/// CLOCK_MONOTONIC_COARSE in nanoseconds: CLOCK_MONOTONIC as of the last timer tick (1-10 ms
/// behind), which is all that idle timeouts, refresh intervals and the REJECT rate need. Read
/// from jiffies through the agent's calibration ([`lb_common::JiffiesClock`]: one inlined load
/// instead of a helper call); before the agent has calibrated it, from bpf_ktime_get_coarse_ns
/// (kernel 5.11, d055126180564 "bpf: Add bpf_ktime_get_coarse_ns helper"). The agent compares
/// entries with CLOCK_MONOTONIC, of the same base.
#[inline(always)]
pub fn now_ns() -> u64 {
    match CLOCK.get(0) {
        // SAFETY: no arguments, no side effects (inlined by the verifier into a load).
        Some(clock) if clock.ns_per_jiffy != 0 => clock.now_ns(unsafe { bpf_jiffies64() }),
        // SAFETY: no arguments, no side effects.
        _ => unsafe { bpf_ktime_get_coarse_ns() },
    }
}

/// Both clocks of one moment, for the agent's calibration.
#[inline(always)]
pub fn clock_sample() -> ClockSample {
    // SAFETY: no arguments, no side effects.
    unsafe {
        ClockSample {
            jiffies: bpf_jiffies64(),
            coarse_ns: bpf_ktime_get_coarse_ns(),
        }
    }
}

/// A pseudo-random number for spreading flows (not for secrets): this CPU's xorshift step
/// ([`lb_common::xorshift`]), seeded from the kernel's prandom on first use; the helper alone
/// if the state cannot be read.
#[inline(always)]
pub fn random_u32() -> u32 {
    let Some(state) = RANDOM_STATE.get_ptr_mut(0) else {
        return prandom();
    };
    // SAFETY: this CPU's own slot, valid for the run. A socket hook preempted on this CPU by
    // another program that draws too may draw the same number: that only costs spread.
    let state = unsafe { &mut *state };
    if *state == 0 {
        *state = xorshift::seed(prandom(), prandom());
    }
    *state = xorshift::next(*state);
    xorshift::output(*state)
}

/// `draw` (uniform over u32: [`random_u32`], or a hash) reduced to a number below `count`, 0
/// when `count` is 0 (Lemire's multiply and shift); a `u64`, so that LLVM never zero-extends
/// it. The shift is an asm block:
/// LLVM folds a shift and a later bound check of its result into one check of the unshifted
/// product, which the verifier cannot carry over to the shifted copy an index is then taken
/// from. Returned as a `u32`, the number is extended again at each use, the last time by a mask
/// LLVM derives from a bound check of another copy (`& 7` after `<= 6`), which loses the
/// verifier the bound.
#[inline(always)]
pub fn below(draw: u32, count: u32) -> u64 {
    #[cfg(target_arch = "bpf")]
    {
        let mut product = u64::from(draw) * u64::from(count);
        // SAFETY: a shift of a register, nothing else.
        unsafe {
            core::arch::asm!(
                "{product} >>= 32",
                product = inout(reg) product,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        product
    }
    #[cfg(not(target_arch = "bpf"))]
    u64::from(xorshift::below(draw, count))
}

#[inline(always)]
fn prandom() -> u32 {
    // SAFETY: no arguments; only advances this CPU's PRNG state.
    unsafe { bpf_get_prandom_u32() }
}

/// The cookie of the socket a sock_addr program runs for.
#[inline(always)]
pub fn socket_cookie(ctx: &impl EbpfContext) -> u64 {
    // SAFETY: ctx.as_ptr() is the program's own context, which the helper takes as is.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Where the FIB says a packet goes.
pub enum Forward {
    /// Out of the interface it came in on, with these MACs: XDP can send it itself (XDP_TX).
    SameInterface { smac: [u8; 6], dmac: [u8; 6] },
    /// Out of another interface, with these MACs: XDP can send it there if it serves that one
    /// too (XDP_REDIRECT).
    OtherInterface {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
    },
    /// Bigger than the egress MTU (`mtu`, the next hop's): the sender is told so when it must
    /// not be fragmented (ICMP "fragmentation needed", ICMPv6 "packet too big").
    TooBig { mtu: u16 },
    /// No neighbour entry yet, or no route: the stack should forward it (and resolve the
    /// neighbour).
    Stack,
}

/// `AF_INET` and `AF_INET6` for bpf_fib_lookup.
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Looks up the route from `saddr` to `daddr` (numbers) for a packet of `tot_len` bytes (its
/// IPv4 total length) that came in on this XDP program's interface.
#[inline(always)]
pub fn fib_forward(
    ctx: &aya_ebpf::programs::XdpContext,
    protocol: u8,
    saddr: u32,
    daddr: u32,
    tot_len: u16,
) -> Forward {
    fib(ctx, AF_INET, protocol, tot_len, |params| {
        params.__bindgen_anon_3.ipv4_src = saddr.to_be();
        params.__bindgen_anon_4.ipv4_dst = daddr.to_be();
    })
}

/// As [`fib_forward`] for IPv6 (addresses as the packet holds them, `tot_len` the whole IPv6
/// packet's length, its fixed header included, as the kernel's MTU check takes it).
#[inline(always)]
pub fn fib_forward6(
    ctx: &aya_ebpf::programs::XdpContext,
    protocol: u8,
    saddr: [u32; 4],
    daddr: [u32; 4],
    tot_len: u16,
) -> Forward {
    fib(ctx, AF_INET6, protocol, tot_len, |params| {
        params.__bindgen_anon_3.ipv6_src = saddr;
        params.__bindgen_anon_4.ipv6_dst = daddr;
    })
}

#[inline(always)]
fn fib(
    ctx: &aya_ebpf::programs::XdpContext,
    family: u8,
    protocol: u8,
    tot_len: u16,
    addresses: impl FnOnce(&mut aya_ebpf::bindings::bpf_fib_lookup),
) -> Forward {
    use aya_ebpf::bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams,
    };
    // SAFETY: ctx.ctx is the program's own xdp_md, valid for the whole run.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let mut params = core::mem::MaybeUninit::<FibParams>::uninit();
    let params = crate::zeroed::zero_init(&mut params);
    params.family = family;
    params.l4_protocol = protocol;
    params.ifindex = ingress;
    params.__bindgen_anon_1.tot_len = tot_len;
    addresses(params);
    // SAFETY: params is a properly sized, initialized bpf_fib_lookup on this program's stack,
    // and ctx is the program's context, as the helper requires.
    let result = unsafe {
        aya_ebpf::helpers::bpf_fib_lookup(ctx.ctx.cast(), params, size_of::<FibParams>() as i32, 0)
    };
    // Without BPF_FIB_LOOKUP_SKIP_NEIGH the lookup answers BPF_FIB_LKUP_RET_NO_NEIGH when the
    // next hop's MAC is not known yet, and with tot_len set FRAG_NEEDED for a packet over the
    // egress MTU, with that MTU in mtu_result (net/core/filter.c, bpf_ipv4_fib_lookup and
    // bpf_ipv6_fib_lookup, which check the MTU before the neighbour).
    if result == i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED) {
        // SAFETY: on FRAG_NEEDED the kernel wrote mtu_result over tot_len (a u16 either way).
        let mtu = unsafe { params.__bindgen_anon_1.mtu_result };
        return Forward::TooBig { mtu };
    }
    if result != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return Forward::Stack;
    }
    // SAFETY: on success the kernel filled the smac/dmac member of this union.
    let macs = unsafe { params.__bindgen_anon_6.__bindgen_anon_2 };
    if params.ifindex == ingress {
        Forward::SameInterface {
            smac: macs.smac,
            dmac: macs.dmac,
        }
    } else {
        Forward::OtherInterface {
            ifindex: params.ifindex,
            smac: macs.smac,
            dmac: macs.dmac,
        }
    }
}

/// The MTU of the NIC `ifindex` when the frame's IP packet is bigger than that: XDP must not
/// redirect it there, as the kernel drops a redirected frame over its target's MTU without a
/// word (kernel/bpf/devmap.c, __xdp_enqueue: xdp_ok_fwd_dev). None when it fits, or when no
/// such NIC is left. bpf_check_mtu (kernel 5.12, 34b2021cc616 "bpf: Add BPF-helper for MTU
/// checking") compares the frame's length with the NIC's MTU plus its link header.
#[inline(always)]
pub fn mtu_exceeded(ctx: &aya_ebpf::programs::XdpContext, ifindex: u32) -> Option<u16> {
    use aya_ebpf::bindings::bpf_check_mtu_ret::BPF_MTU_CHK_RET_FRAG_NEEDED;
    let mut mtu: u32 = 0;
    // SAFETY: ctx is the program's context; `mtu` a u32 on this stack, which the helper reads
    // (0: check the frame's own length) and writes (the NIC's MTU).
    let result =
        unsafe { aya_ebpf::helpers::bpf_check_mtu(ctx.ctx.cast(), ifindex, &mut mtu, 0, 0) };
    (result == i64::from(BPF_MTU_CHK_RET_FRAG_NEEDED)).then_some(mtu as u16)
}

/// Moves the start of the packet by `delta` bytes (negative: more room in front).
#[inline(always)]
pub fn xdp_adjust_head(ctx: &aya_ebpf::programs::XdpContext, delta: i32) -> bool {
    // SAFETY: ctx.ctx is the program's own xdp_md; the helper checks the bounds itself.
    unsafe { aya_ebpf::helpers::bpf_xdp_adjust_head(ctx.ctx, delta) == 0 }
}

/// Moves the end of the packet by `delta` bytes (negative: shorter).
#[inline(always)]
pub fn xdp_adjust_tail(ctx: &aya_ebpf::programs::XdpContext, delta: i32) -> bool {
    // SAFETY: as above.
    unsafe { aya_ebpf::helpers::bpf_xdp_adjust_tail(ctx.ctx, delta) == 0 }
}

/// The cookie of the network namespace a sock_addr program runs for (one pod, one namespace).
#[inline(always)]
pub fn netns_cookie(ctx: &impl EbpfContext) -> u64 {
    // SAFETY: ctx.as_ptr() is the program's own context, which the helper takes as is.
    unsafe { aya_ebpf::helpers::bpf_get_netns_cookie(ctx.as_ptr()) }
}

/// Sets the error the syscall under a cgroup program returns when the program rejects it.
#[inline(always)]
pub fn set_syscall_error(errno: i32) {
    // SAFETY: no pointers; only sets this run's return value (kernel >= 5.18,
    // b44123b4a3dc "bpf: Add cgroup helpers bpf_{get,set}_retval").
    unsafe { aya_ebpf::helpers::bpf_set_retval(-errno) };
}

/// `*word |= mask` in one fully ordered atomic instruction (`BPF_ATOMIC | BPF_OR | BPF_FETCH`,
/// kernel 5.12, commit 981f94c3e921 "bpf: Add bitwise atomic instructions"): the fetch form,
/// because the JITs order it fully on every architecture (arm64's plain `BPF_OR` is an
/// unordered STSET), and a bit set after a map update must not be seen before it. The BPF
/// target offers Rust no atomic read-modify-write (its target has no compare-and-swap): these
/// are inline assembly.
///
/// # Safety
/// `word` points to a u64 of a map value, valid for the program's run.
#[inline(always)]
pub unsafe fn atomic_or(word: *mut u64, mask: u64) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: the caller's.
    unsafe {
        core::arch::asm!(
            "{mask} = atomic_fetch_or((u64 *)({word} + 0), {mask})",
            word = in(reg) word,
            mask = inout(reg) mask => _,
            options(nostack),
        );
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: the caller's.
    unsafe {
        core::sync::atomic::AtomicU64::from_ptr(word)
            .fetch_or(mask, core::sync::atomic::Ordering::SeqCst);
    }
}

/// Compare-and-swap of an aligned u64 (`BPF_ATOMIC | BPF_CMPXCHG`, kernel 5.12, commit
/// 5ffa25502b5a "bpf: Add instructions for atomic_[cmp]xchg"), fully ordered: writes `new` if
/// the word holds `expected`; returns what it held.
///
/// # Safety
/// `word` points to a u64 of a map value, valid for the program's run.
#[inline(always)]
pub unsafe fn compare_and_swap(word: *mut u64, expected: u64, new: u64) -> u64 {
    #[cfg(target_arch = "bpf")]
    // SAFETY: the caller's; r0 holds the expected value in and the found one out.
    unsafe {
        let found: u64;
        core::arch::asm!(
            "r0 = cmpxchg_64({word} + 0, r0, {new})",
            word = in(reg) word,
            new = in(reg) new,
            inout("r0") expected => found,
            options(nostack),
        );
        found
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: the caller's.
    unsafe {
        use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
        match AtomicU64::from_ptr(word).compare_exchange(expected, new, SeqCst, SeqCst) {
            Ok(found) | Err(found) => found,
        }
    }
}

/// Hands the packet to the program in slot `SLOT` of `programs`; returns only if the slot is
/// empty. The slot is an immediate set in the same asm block as the call, so each call site has
/// exactly one key. The verifier turns a tail call whose key is one constant into a patched
/// direct jump (kernel commits d2e4c1e6c294 "bpf: Constant map key tracking for prog array
/// pokes" and 428d5df1fa4f "bpf, x86: Emit patchable direct jump as tail call"); a site LLVM
/// reaches with two keys (it merges `bpf_tail_call` calls that differ only in the key) gets the
/// indirect jump instead, through the retpoline thunk on a machine that needs one.
///
/// # Safety
/// Every program `programs` can hold takes the same context as the caller; on success control
/// never comes back, so nothing may rely on code after the call running.
#[inline(always)]
pub unsafe fn tail_call<const SLOT: u32, C: EbpfContext>(ctx: &C, programs: &ProgramArray) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: the caller's; r1-r5 and r0 are the helper call's to clobber.
    unsafe {
        core::arch::asm!(
            "r3 = {slot}",
            "call {tail_call}",
            slot = const SLOT,
            tail_call = const aya_ebpf::bindings::bpf_func_id::BPF_FUNC_tail_call,
            inout("r1") ctx.as_ptr() => _,
            inout("r2") core::ptr::from_ref(programs) => _,
            out("r0") _,
            out("r3") _,
            out("r4") _,
            out("r5") _,
        );
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: the caller's.
    unsafe {
        programs.tail_call(ctx, SLOT);
    }
}

/// Whether the network namespace of the program's device holds a TCP socket other than a
/// listener for a segment with the addresses and ports of `tuple` (of `len` bytes, as
/// [`crate::family::Family::socket_tuple`] gives them; the sender's first): a connection of the
/// node's own in any state past LISTEN, SYN_SENT and TIME_WAIT included (the lookup finds
/// those too, as the stack's own demultiplexing does).
#[inline(always)]
pub fn holds_tcp_connection<C: EbpfContext>(ctx: &C, mut tuple: bpf_sock_tuple, len: u32) -> bool {
    // SAFETY: the tuple is this function's own and `len` no more than its size.
    let socket =
        unsafe { bpf_skc_lookup_tcp(ctx.as_ptr(), &mut tuple, len, BPF_F_CURRENT_NETNS as u64, 0) };
    released_state(socket).is_some_and(|state| state != BPF_TCP_LISTEN)
}

/// Whether the network namespace of the program's device holds a UDP socket connected to the
/// sender of a datagram with the addresses and ports of `tuple` (as for
/// [`holds_tcp_connection`]): a socket of the node's own that chose the datagram's destination
/// port as its source port. A socket merely bound to that port (state TCP_CLOSE: the lookup
/// finds those too) is no connection: datagrams to a frontend's port stay the Service's, as
/// kube-proxy's rules give them to the Service before any socket of the node's.
#[inline(always)]
pub fn holds_udp_connection<C: EbpfContext>(ctx: &C, mut tuple: bpf_sock_tuple, len: u32) -> bool {
    // SAFETY: as in holds_tcp_connection.
    let socket =
        unsafe { bpf_sk_lookup_udp(ctx.as_ptr(), &mut tuple, len, BPF_F_CURRENT_NETNS as u64, 0) };
    released_state(socket).is_some_and(|state| state == BPF_TCP_ESTABLISHED)
}

/// The state of the socket a lookup returned (None: it found none), and the lookup's reference
/// released, which the verifier wants on every path (a UDP socket is freed by RCU and its
/// lookup takes no reference, but must be released all the same).
#[inline(always)]
fn released_state(socket: *mut bpf_sock) -> Option<u32> {
    if socket.is_null() {
        return None;
    }
    // SAFETY: a socket a lookup returned and holds; `state` is readable on sock_common.
    let state = unsafe { (*socket).state };
    // SAFETY: releases the reference the lookup took.
    unsafe { bpf_sk_release(socket.cast()) };
    Some(state)
}
