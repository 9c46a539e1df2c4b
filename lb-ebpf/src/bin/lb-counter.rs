//! The XDP packet counter, an object of its own: it shares no map with the datapath, and loading
//! it must never create (or pin) the datapath's maps.
#![no_std]
#![no_main]

#[path = "../counter.rs"]
mod counter;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists only to satisfy no_std.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
