//! Direct server return (DSR) of IPv4 TCP flows to an endpoint on another node
//! (docs/dsr.md): the node a client's SYN arrives at (node1) sends it on to the endpoint's node
//! (node2) with the client's own source address and an IPv4 option naming the frontend the
//! client sent to; node2 checks the option, keeps the flow in its client's FLOW entry, strips
//! the option, and its tc egress gives the endpoint's answers the frontend's address and port,
//! so they go to the client straight from node2.

/// The option's type byte: the copied flag (a fragment of the SYN carries it too, RFC 791),
/// class 0 and number 30, which RFC 4727 (section 2.5) sets aside for experiments.
pub const OPTION_TYPE: u8 = 0x80 | 30;
/// The option's length: type, length, the frontend's port and address.
pub const OPTION_LEN: usize = 8;
/// An IPv4 header without options.
const FIXED_HEADER_LEN: usize = 20;
/// The `version | IHL` byte of a header that holds the option and nothing else.
pub const VERSION_IHL_WITH_OPTION: u8 = 0x40 | ((FIXED_HEADER_LEN + OPTION_LEN) / 4) as u8;

/// The option's bytes for the frontend `addr`:`port` (both as numbers: host order of the wire
/// bytes, as conntrack keeps them).
pub const fn option(addr: u32, port: u16) -> [u8; OPTION_LEN] {
    let port = port.to_be_bytes();
    let addr = addr.to_be_bytes();
    [
        OPTION_TYPE,
        OPTION_LEN as u8,
        port[0],
        port[1],
        addr[0],
        addr[1],
        addr[2],
        addr[3],
    ]
}

/// The frontend (address, port) an option names, or None when the bytes are not the option.
pub const fn frontend_of(option: &[u8; OPTION_LEN]) -> Option<(u32, u16)> {
    if option[0] != OPTION_TYPE || option[1] as usize != OPTION_LEN {
        return None;
    }
    Some((
        u32::from_be_bytes([option[4], option[5], option[6], option[7]]),
        u16::from_be_bytes([option[2], option[3]]),
    ))
}

/// The frontend address of an admission for a NodePort: the option must name a node's address
/// (in [`crate::map_names::NODES4`]) with the Service's nodePort.
pub const ANY_NODE: u32 = 0;

/// Key of [`crate::map_names::DSR_ADMISSIONS4`]: a frontend of a Service and one of the
/// Service's endpoints on this node, which a DSR option may pair (addresses and ports as
/// numbers: host order of the wire bytes). A NodePort's frontend address is [`ANY_NODE`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(C)]
pub struct Admission4Key {
    pub frontend_addr: u32,
    pub endpoint_addr: u32,
    pub frontend_port: u16,
    pub endpoint_port: u16,
    /// [`crate::proto::TCP`] (DSR serves TCP only).
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<Admission4Key>() == 16);

/// Value of [`crate::map_names::DSR_ADMISSIONS4`]: the service and backend ids the flow's FLOW
/// entry records on this node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct AdmissionValue {
    pub service_id: u32,
    pub backend_id: u32,
}
const _: () = assert!(size_of::<AdmissionValue>() == 8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_option_names_its_frontend_and_reads_back() {
        let bytes = option(0x0a00_0105, 30080);
        assert_eq!(bytes, [0x9e, 8, 0x75, 0x80, 10, 0, 1, 5]);
        assert_eq!(frontend_of(&bytes), Some((0x0a00_0105, 30080)));
    }

    #[test]
    fn other_options_are_not_read_as_the_frontend() {
        let mut bytes = option(0x0a00_0105, 30080);
        bytes[0] = 0x94; // router alert
        assert_eq!(frontend_of(&bytes), None);
        let mut bytes = option(0x0a00_0105, 30080);
        bytes[1] = 12;
        assert_eq!(frontend_of(&bytes), None);
    }

    #[test]
    fn the_version_byte_counts_the_option_in_words() {
        assert_eq!(VERSION_IHL_WITH_OPTION, 0x47);
    }
}
