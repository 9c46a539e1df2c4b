//! The eBPF object built by build.rs (aya-build) and embedded in the binary, so a node needs
//! nothing but the `lb` executable.

/// The ELF object holding every kernel program and map of the load balancer.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
