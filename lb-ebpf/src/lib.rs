//! Code shared by the eBPF objects (the `lb-ebpf` datapath and the `lb-counter` binaries). The
//! library also lets lb-userspace name this crate as a build-dependency, so cargo rebuilds the
//! agent when the programs change.
#![no_std]
// Inline assembly on the BPF target: the packet loads of `packet::packet_words`.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

pub mod packet;

/// What every eBPF object of this crate needs once, at its root: the panic handler `no_std`
/// asks for (the verifier rejects any program that could reach it), and the license section,
/// GPL-compatible so that the programs may call GPL-only helpers (bpf_fib_lookup,
/// bpf_redirect_map, ...).
#[macro_export]
macro_rules! object_essentials {
    () => {
        #[cfg(not(test))]
        #[panic_handler]
        fn panic(_info: &core::panic::PanicInfo) -> ! {
            loop {}
        }

        #[unsafe(link_section = "license")]
        #[unsafe(no_mangle)]
        static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
    };
}
