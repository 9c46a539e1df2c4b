//! The service datapath: XDP, tc and socket-hook programs in one object, so they share their maps.
#![no_std]
#![no_main]
// Inline assembly on the BPF target: the tail calls of `helpers::tail_call`.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

mod clock;
mod dsr;
mod family;
mod flow;
mod flow_cache;
mod helpers;
mod ip;
mod maps;
mod monitor;
mod reject;
mod sctp_crc;
mod sock;
mod tc;
mod too_big;
mod xdp;
mod zeroed;

lb_ebpf::object_essentials!();
