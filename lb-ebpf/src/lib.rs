//! Code shared by the eBPF objects (the `lb-ebpf` datapath and the `lb-counter` binaries). The
//! library also lets lb-userspace name this crate as a build-dependency, so cargo rebuilds the
//! agent when the programs change.
#![no_std]

pub mod icmp;
pub mod packet;
