//! The eBPF objects built by build.rs (aya-build) and embedded in the binary, so a node needs
//! nothing but the `lb` executable.

/// The service datapath: XDP, tc and socket-hook programs sharing one set of maps.
pub static DATAPATH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The XDP packet counter (`lb count`), with its own private map.
pub static COUNTER_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-counter"));
