//! Empty on purpose: the programs live in the `lb-ebpf` binary (src/main.rs). This library target
//! lets lb-userspace depend on the crate so that cargo tracks changes to it.
#![no_std]
