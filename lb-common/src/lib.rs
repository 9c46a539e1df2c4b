//! Types shared by the kernel programs (`lb-ebpf`) and the agent (`lb-userspace`).
//!
//! Rules for every type that crosses into the kernel: `#[repr(C)]`, `Copy`, no `bool`, `enum` or
//! `Option`, explicit padding fields, and a compile-time size assertion so a layout change on one
//! side cannot silently disagree with the other.
#![no_std]

/// Map names as the kernel sees them. Versioned (`_v1`) so an incompatible layout change gets a new
/// pinned map instead of misreading an old one, and at most 15 characters because the kernel keeps
/// only `BPF_OBJ_NAME_LEN - 1` bytes of a name.
pub mod map_names {
    /// Per-CPU packet and byte counters by [`crate::PacketClass`].
    pub const PACKET_COUNTERS: &str = "lb_pktcnt_v1";

    /// Every map name, for the length check below and for tools that list them.
    pub const ALL: &[&str] = &[PACKET_COUNTERS];
}

const _: () = {
    let mut i = 0;
    while i < map_names::ALL.len() {
        assert!(
            map_names::ALL[i].len() <= 15,
            "map name longer than 15 bytes"
        );
        i += 1;
    }
};

/// Program names as they appear in the object file (the function names in `lb-ebpf`).
pub mod program_names {
    /// XDP program on the node NICs that counts packets by [`crate::PacketClass`].
    pub const XDP_COUNTER: &str = "lb_xdp_count";
}

/// What the XDP counter saw, used as the index into [`map_names::PACKET_COUNTERS`].
///
/// A plain `u32` with named constants rather than a Rust `enum`, because the value is a map index
/// written by the kernel and read by userspace: an out-of-range value must be representable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct PacketClass(pub u32);

impl PacketClass {
    /// IPv4 carrying TCP (first fragment or unfragmented).
    pub const IPV4_TCP: Self = Self(0);
    /// IPv4 carrying UDP (first fragment or unfragmented).
    pub const IPV4_UDP: Self = Self(1);
    /// IPv4 carrying ICMP.
    pub const IPV4_ICMP: Self = Self(2);
    /// IPv4 with another protocol, or a non-first fragment (no transport header to look at).
    pub const IPV4_OTHER: Self = Self(3);
    /// IPv6, any payload.
    pub const IPV6: Self = Self(4);
    /// Any other EtherType (ARP, LLDP, ...).
    pub const NON_IP: Self = Self(5);
    /// Too short for the headers it announces, or an IPv4 header length below 20 bytes.
    pub const MALFORMED: Self = Self(6);

    /// Number of classes: the size of the counter array.
    pub const COUNT: u32 = 7;

    /// Every class in index order, with the label used in metrics and CLI output.
    pub const ALL: [(Self, &'static str); Self::COUNT as usize] = [
        (Self::IPV4_TCP, "ipv4_tcp"),
        (Self::IPV4_UDP, "ipv4_udp"),
        (Self::IPV4_ICMP, "ipv4_icmp"),
        (Self::IPV4_OTHER, "ipv4_other"),
        (Self::IPV6, "ipv6"),
        (Self::NON_IP, "non_ip"),
        (Self::MALFORMED, "malformed"),
    ];

    /// The label of this class, or `None` for an index outside [`Self::ALL`].
    pub fn label(self) -> Option<&'static str> {
        Self::ALL.get(self.0 as usize).map(|(_, label)| *label)
    }
}

/// One slot of the per-CPU packet counters: what one CPU saw of one [`PacketClass`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct PacketCounter {
    /// Packets seen.
    pub packets: u64,
    /// Bytes seen, from the start of the Ethernet header to the end of the frame.
    pub bytes: u64,
}

const _: () = assert!(size_of::<PacketCounter>() == 16);

#[cfg(feature = "user")]
// SAFETY: repr(C), two u64 fields, no padding (size asserted above), every bit pattern valid.
unsafe impl aya::Pod for PacketCounter {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_index_order() {
        for (index, (class, label)) in PacketClass::ALL.iter().enumerate() {
            assert_eq!(class.0 as usize, index);
            assert_eq!(class.label(), Some(*label));
        }
        assert_eq!(PacketClass(PacketClass::COUNT).label(), None);
    }
}
