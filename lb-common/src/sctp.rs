//! SCTP (RFC 9260) as the datapath sees it: the common header, the chunk types that move an
//! association's state, and the CRC32c checksum brought up to date after a port rewrite
//! without reading the rest of the packet.
//!
//! The checksum covers the SCTP packet only (no pseudo-header), so rewriting addresses leaves
//! it as it is; rewriting ports changes it. CRC32c is linear over GF(2): for two messages of the
//! same length, crc(a) ^ crc(b) is the CRC of a ^ b with a zero initial value and no final XOR.
//! A port rewrite changes only the first four bytes, so the new checksum is the old one XOR the
//! CRC of those four changed bytes followed by `len - 4` zero bytes. That CRC is the 4-byte
//! difference, as a polynomial, times x^(8·len) modulo the CRC32c polynomial: one carry-less
//! multiplication by a per-length constant from [`SHIFT`]. A packet whose checksum was wrong
//! stays wrong by the same error, as with the incremental Internet checksum.

use crate::tcp_flags::{ACK, FIN, RST, SYN};

/// The common header: source port, destination port, verification tag, checksum.
pub const COMMON_HDR_LEN: usize = 12;
/// The common header and the first chunk's type, flags and length.
pub const HDR_AND_CHUNK_LEN: usize = COMMON_HDR_LEN + 4;
/// The verification tag's offset in the common header.
pub const TAG_OFFSET: usize = 4;
/// The checksum's offset in the common header. Linux stores the CRC32c little-endian
/// (include/net/sctp/checksum.h, sctp_compute_cksum: `cpu_to_le32(~crc32c(...))`).
pub const CHECKSUM_OFFSET: usize = 8;

/// Chunk types (RFC 9260, section 3.2).
pub mod chunk {
    pub const DATA: u8 = 0;
    pub const INIT: u8 = 1;
    pub const INIT_ACK: u8 = 2;
    pub const SACK: u8 = 3;
    pub const HEARTBEAT: u8 = 4;
    pub const HEARTBEAT_ACK: u8 = 5;
    pub const ABORT: u8 = 6;
    pub const SHUTDOWN: u8 = 7;
    pub const SHUTDOWN_ACK: u8 = 8;
    pub const ERROR: u8 = 9;
    pub const COOKIE_ECHO: u8 = 10;
    pub const COOKIE_ACK: u8 = 11;
    pub const SHUTDOWN_COMPLETE: u8 = 14;
}

/// The TCP flags ([`crate::tcp_flags`]) that a packet whose first chunk has this type stands
/// for in the datapath's connection tracking, which keeps one state machine for TCP and SCTP
/// ([`crate::tcp_state`]): INIT opens an association (SYN), INIT ACK answers it (SYN ACK),
/// SHUTDOWN and SHUTDOWN ACK close it (FIN), ABORT and SHUTDOWN COMPLETE end it (RST: nothing
/// follows either). Everything else (COOKIE ECHO, DATA, SACK, HEARTBEAT...) is traffic of an
/// association (ACK), and COOKIE ECHO after INIT establishes it. INIT, INIT ACK and SHUTDOWN
/// COMPLETE are never bundled with other chunks (RFC 9260, section 6.10).
///
///
/// A table lookup, not a `match`: branches would hand the verifier one path per flag value,
/// each walked through the rest of the program.
#[inline(always)]
pub fn flags_of_chunk(chunk_type: u8) -> u8 {
    FLAGS_OF_CHUNK[usize::from(chunk_type)]
}

static FLAGS_OF_CHUNK: [u8; 256] = {
    let mut table = [ACK; 256];
    table[chunk::INIT as usize] = SYN;
    table[chunk::INIT_ACK as usize] = SYN | ACK;
    table[chunk::SHUTDOWN as usize] = FIN | ACK;
    table[chunk::SHUTDOWN_ACK as usize] = FIN | ACK;
    table[chunk::ABORT as usize] = RST | ACK;
    table[chunk::SHUTDOWN_COMPLETE as usize] = RST | ACK;
    table
};

/// The T bit of ABORT and SHUTDOWN COMPLETE (RFC 9260, sections 3.3.7 and 3.3.13): set, the
/// packet carries its sender's own verification tag instead of its peer's (section 8.5.1).
pub const CHUNK_FLAG_T: u8 = 0x01;

/// What the datapath keeps of a packet's first chunk beside its flags: its type, and the T bit
/// above it (`REFLECTED`).
#[inline(always)]
pub fn chunk_summary(chunk_type: u8, chunk_flags: u8) -> u32 {
    u32::from(chunk_type) | (u32::from(chunk_flags & CHUNK_FLAG_T) << 8)
}

/// The T bit in a [`chunk_summary`].
pub const REFLECTED: u32 = 1 << 8;

/// The CRC32c polynomial, bit-reflected (RFC 9260, appendix A).
pub const POLY: u32 = 0x82f6_3b78;

/// The largest SCTP packet [`SHIFT`] covers: an IPv4 datagram of 65535 bytes less its header.
pub const MAX_LEN: usize = 65_535 - 20;

/// `SHIFT[len]` = x^(8·len) mod the CRC32c polynomial, bit-reflected: what a difference in the
/// first four bytes of a `len`-byte packet is multiplied by to give the checksum's difference.
pub static SHIFT: [u32; MAX_LEN + 1] = shift_table();

const fn shift_table() -> [u32; MAX_LEN + 1] {
    let times_x8 = times_x8_table();
    let mut table = [0u32; MAX_LEN + 1];
    // x^0 is the top bit in the reflected representation.
    let mut power = 1u32 << 31;
    let mut len = 0;
    while len <= MAX_LEN {
        table[len] = power;
        // Times x^8, a byte at a time (the table-driven CRC step with a zero byte).
        power = (power >> 8) ^ times_x8[(power & 0xff) as usize];
        len += 1;
    }
    table
}

/// `TABLE[b]` = b times x^8, for the low byte `b` of a reflected value.
const fn times_x8_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut byte = 0;
    while byte < 256 {
        let mut value = byte as u32;
        let mut bit = 0;
        while bit < 8 {
            value = times_x(value);
            bit += 1;
        }
        table[byte] = value;
        byte += 1;
    }
    table
}

/// `a` times x modulo the polynomial (reflected: x^31 is bit 0).
#[inline(always)]
const fn times_x(a: u32) -> u32 {
    times_x_with(a, a & 1)
}

/// [`times_x`] with `a`'s low bit given. The polynomial is multiplied by that bit rather than
/// masked with it: the verifier splits a register known to be 0 or -1 in two when it is ANDed
/// with a constant, and a branch on the bit splits the path, either of which doubles the paths
/// at every step of [`multiply`].
#[inline(always)]
const fn times_x_with(a: u32, low_bit: u32) -> u32 {
    (a >> 1) ^ POLY.wrapping_mul(low_bit)
}

/// `a` times `b` modulo the polynomial, both bit-reflected, in a fixed count of steps with no
/// branch and no all-ones mask, so that the verifier walks it once, on one path.
#[inline(always)]
pub fn multiply(a: u32, b: u32) -> u32 {
    let mut product = 0u32;
    let mut b = b;
    for bit in 0..32 {
        // Bit 31 - i of `a` is its x^i term.
        product ^= b.wrapping_mul(opaque_bit((a >> (31 - bit)) & 1));
        b = times_x_with(b, opaque_bit(b & 1));
    }
    product
}

/// A bit the compiler cannot see is one: otherwise it turns a multiplication by it back into a
/// branch or a mask (see [`times_x_with`]).
#[inline(always)]
fn opaque_bit(bit: u32) -> u32 {
    // SAFETY: a read of a local that lives for the call.
    unsafe { core::ptr::read_volatile(&bit) }
}

/// The checksum field of a `len`-byte SCTP packet after its source and destination ports (the
/// first four bytes) changed from `old_ports` to `new_ports`, both as the packet holds them read
/// little-endian (`u32::from_le_bytes`), as is `checksum`. `len` past [`MAX_LEN`] gives `None`.
#[inline(always)]
pub fn replace_ports(checksum: u32, len: usize, old_ports: u32, new_ports: u32) -> Option<u32> {
    let shift = *SHIFT.get(len)?;
    Some(checksum ^ multiply(old_ports ^ new_ports, shift))
}

/// The checksum field of an SCTP packet (`packet` from its common header to its end): the
/// CRC32c computed whole, bit by bit, with the field counted as zero, as the field holds it
/// (read little-endian). For tools that build packets (`lb explain`); the datapath never
/// computes it whole.
pub fn checksum_of(packet: &[u8]) -> u32 {
    let mut crc = u32::MAX;
    for (offset, &byte) in packet.iter().enumerate() {
        let in_field = (CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4).contains(&offset);
        crc ^= u32::from(if in_field { 0 } else { byte });
        for _ in 0..8 {
            crc = times_x(crc);
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    /// RFC 3720, appendix B.4: the CRC32c of 32 zero bytes is 0x8a9136aa; and the checksum field
    /// counts as zero whatever it holds.
    #[test]
    fn the_whole_crc_matches_the_published_vector_and_skips_its_own_field() {
        assert_eq!(checksum_of(&[0u8; 32]), 0x8a91_36aa);
        let mut with_field = [0u8; 32];
        with_field[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4].copy_from_slice(&[1, 2, 3, 4]);
        assert_eq!(checksum_of(&with_field), 0x8a91_36aa);
    }

    #[test]
    fn a_port_rewrite_updates_the_checksum_as_a_full_recomputation_does() {
        for len in [16usize, 17, 20, 64, 255, 256, 1000, 1480, 9000] {
            let mut packet: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let checksum = checksum_of(&packet);
            packet[8..12].copy_from_slice(&checksum.to_le_bytes());
            let old = u32::from_le_bytes(packet[0..4].try_into().unwrap());
            packet[0..4].copy_from_slice(&[0x9c, 0x41, 0x00, 0x50]);
            let new = u32::from_le_bytes(packet[0..4].try_into().unwrap());
            let updated = replace_ports(checksum, len, old, new).unwrap();
            assert_eq!(updated, checksum_of(&packet), "len {len}");
        }
        assert_eq!(replace_ports(0, MAX_LEN + 1, 1, 2), None);
    }

    #[test]
    fn multiplying_by_x_to_the_zero_changes_nothing() {
        assert_eq!(multiply(0x1234_5678, 1 << 31), 0x1234_5678);
        assert_eq!(multiply(1 << 31, 0xdead_beef), 0xdead_beef);
    }
}
