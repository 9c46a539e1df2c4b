//! The service datapath: XDP, tc and socket-hook programs in one object, so they share their maps.
#![no_std]
#![no_main]

mod flow;
mod helpers;
mod maps;
mod reject;
mod sock;
mod tc;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists only to satisfy no_std.
    loop {}
}

// GPL-compatible so the programs may call GPL-only helpers (bpf_fib_lookup, bpf_redirect_neigh, ...).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
