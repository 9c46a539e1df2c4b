//! Safe wrappers over the BPF helpers the programs call. The helpers take no pointers here (or
//! only the program's own context), so they cannot violate memory safety.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns},
};

/// CLOCK_MONOTONIC in nanoseconds.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: no arguments, no side effects.
    unsafe { bpf_ktime_get_ns() }
}

/// A pseudo-random number (per-CPU PRNG; fine for load spreading, not for secrets).
#[inline(always)]
pub fn random_u32() -> u32 {
    // SAFETY: no arguments; only advances this CPU's PRNG state.
    unsafe { bpf_get_prandom_u32() }
}

/// The cookie of the socket a sock_addr program runs for.
#[inline(always)]
pub fn socket_cookie(ctx: &impl EbpfContext) -> u64 {
    // SAFETY: ctx.as_ptr() is the program's own context, which the helper takes as is.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}
