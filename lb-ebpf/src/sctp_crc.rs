//! The CRC32c update of an SCTP port rewrite, as a global BPF function: the verifier checks a
//! global function once, on its own, and then takes its result as an unknown number at every
//! call (kernel/bpf/verifier.c, do_check_subprogs for BTF_FUNC_GLOBAL; "bpf: Introduce function-
//! by-function verification", 51c39bb1d5d1). Inlined, its 32 steps of carry-less multiplication
//! would be walked again on every path that rewrites a packet, which takes `lb_xdp_sctp` past
//! the verifier's million instructions.

use lb_common::sctp;

/// The checksum field of a `len`-byte SCTP packet after its ports changed from `old_ports` to
/// `new_ports` ([`sctp::replace_ports`]); the field as it was when `len` is past
/// [`sctp::MAX_LEN`], which callers refuse first.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_sctp_checksum_after_ports(
    checksum: u32,
    len: u32,
    old_ports: u32,
    new_ports: u32,
) -> u32 {
    sctp::replace_ports(checksum, len as usize, old_ports, new_ports).unwrap_or(checksum)
}

/// The checksum field to write after an SCTP packet of `len` bytes had its ports changed from
/// `old_ports` to `new_ports` (both as the packet holds them, read little-endian, as is
/// `checksum`): none when they did not change, or when the field is 0, a checksum not computed
/// yet (offloaded, as from a veth: net/sctp/output.c sctp_packet_pack leaves it 0 with
/// CHECKSUM_PARTIAL), which covers the new ports when whoever computes it does. (A computed
/// CRC32c of 0 is taken for one too: one packet in 2^32.) `Err` for a length past
/// [`sctp::MAX_LEN`].
#[inline(always)]
pub fn checksum_after_ports(
    checksum: u32,
    len: usize,
    old_ports: u32,
    new_ports: u32,
) -> Result<Option<u32>, ()> {
    if checksum == 0 || old_ports == new_ports {
        return Ok(None);
    }
    if len > sctp::MAX_LEN {
        return Err(());
    }
    Ok(Some(lb_sctp_checksum_after_ports(
        checksum, len as u32, old_ports, new_ports,
    )))
}
