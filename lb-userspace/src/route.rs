//! Where an endpoint is, by route: the kernel's FIB (one `RTM_GETROUTE` request per address, as
//! `ip route get` makes) says which interface reaches an address. An endpoint without a nodeName
//! is on this node when that interface is a pod interface: not one of the NICs the agent attaches
//! XDP to, and reached directly, not through a gateway (a tunnel to another node, e.g. a VXLAN or
//! IPIP overlay, routes through a gateway on a non-NIC interface). The node's own addresses (local
//! routes, through `lo`) are on this node too.

use std::{
    collections::BTreeSet,
    io,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

/// What the FIB answered for one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The output interface's index.
    pub oif: u32,
    /// The route goes through a gateway (another host).
    pub via_gateway: bool,
    /// A local route: the address is one of this node's own.
    pub local: bool,
}

impl Route {
    /// Whether the address this route reaches is on this node, when `nics` (interface indexes)
    /// are the node's NICs.
    pub fn is_on_this_node(&self, nics: &BTreeSet<u32>) -> bool {
        self.local || (!self.via_gateway && !nics.contains(&self.oif))
    }
}

/// Finds out which endpoint addresses are on this node, from the routes of the network namespace
/// the agent runs in.
#[derive(Clone, Debug)]
pub struct RouteLocator {
    nics: Vec<String>,
}

impl RouteLocator {
    /// `nics`: the interfaces the agent attaches XDP to (`--interfaces`).
    pub fn new(nics: Vec<String>) -> Self {
        Self { nics }
    }

    /// Whether it can tell anything: without NICs every routed address would look local.
    pub fn enabled(&self) -> bool {
        !self.nics.is_empty()
    }

    /// The addresses of `addresses` (either family) on this node. An address without a route
    /// is not.
    pub fn local_among(
        &self,
        addresses: impl IntoIterator<Item = IpAddr>,
    ) -> io::Result<BTreeSet<IpAddr>> {
        let mut local = BTreeSet::new();
        let mut addresses = addresses.into_iter().peekable();
        if !self.enabled() || addresses.peek().is_none() {
            return Ok(local);
        }
        let nics = self
            .nics
            .iter()
            .map(|name| interface_index(name))
            .collect::<io::Result<BTreeSet<u32>>>()?;
        let mut fib = Fib::open()?;
        for addr in addresses {
            if fib
                .route_to(addr)?
                .is_some_and(|route| route.is_on_this_node(&nics))
            {
                local.insert(addr);
            }
        }
        Ok(local)
    }
}

/// Notifications of route changes in the agent's network namespace (RTNLGRP_IPV4_ROUTE and
/// RTNLGRP_IPV6_ROUTE), so endpoints without a nodeName are placed again when the routes move,
/// not only when the objects change. (The kernel sends none for IPv4 routes a link going down
/// takes with it; the next sync looks again.)
pub struct RouteChanges {
    socket: tokio::io::unix::AsyncFd<OwnedFd>,
}

impl RouteChanges {
    pub fn subscribe() -> io::Result<Self> {
        // SAFETY: socket() takes no pointers; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor this function owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; all zeroes is a valid value.
        let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        address.nl_groups = (libc::RTMGRP_IPV4_ROUTE | libc::RTMGRP_IPV6_ROUTE) as u32;
        // SAFETY: bind reads size_of::<sockaddr_nl>() bytes from a valid sockaddr_nl.
        let result = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                (&raw const address).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: an OwnedFd holds one open descriptor for as long as it lives and always
        // returns it from as_raw_fd; the AsyncFd owns it from here on.
        let socket =
            unsafe { tokio::io::unix::AsyncFd::register(socket) }.map_err(io::Error::from)?;
        Ok(Self { socket })
    }

    /// Waits until routes changed; every notification queued by then counts as one change.
    pub async fn changed(&mut self) -> io::Result<()> {
        let mut buffer = [0u8; 8192];
        loop {
            let mut ready = self.socket.readable().await?;
            let mut any = false;
            loop {
                // SAFETY: recv writes at most buffer.len() bytes into the buffer.
                let received = unsafe {
                    libc::recv(
                        self.socket.get_ref().as_raw_fd(),
                        buffer.as_mut_ptr().cast(),
                        buffer.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if received >= 0 {
                    any = true;
                    continue;
                }
                let error = io::Error::last_os_error();
                match error.raw_os_error() {
                    Some(libc::EAGAIN) => {
                        ready.clear_ready();
                        break;
                    }
                    // Notifications were lost to a full socket buffer: routes did change.
                    Some(libc::ENOBUFS) => any = true,
                    Some(libc::EINTR) => {}
                    _ => return Err(error),
                }
            }
            if any {
                return Ok(());
            }
        }
    }
}

fn interface_index(name: &str) -> io::Result<u32> {
    let name = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name with NUL"))?;
    // SAFETY: if_nametoindex reads the NUL-terminated string it is given and nothing else.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}

/// A NETLINK_ROUTE socket for route lookups.
struct Fib {
    socket: OwnedFd,
    sequence: u32,
}

const NLMSG_HEADER_LEN: usize = 16;
const RTMSG_LEN: usize = 12;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;

impl Fib {
    fn open() -> io::Result<Self> {
        // SAFETY: socket() takes no pointers; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor this function owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // The kernel answers a route request at once; a bound never to wait forever.
        let timeout = libc::timeval {
            tv_sec: Duration::from_secs(1).as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: setsockopt reads size_of::<timeval>() bytes from a valid timeval.
        let result = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            socket,
            sequence: 0,
        })
    }

    /// The route to `addr`, or None when the FIB has none (unreachable, blackhole, prohibit).
    fn route_to(&mut self, addr: IpAddr) -> io::Result<Option<Route>> {
        self.sequence = self.sequence.wrapping_add(1);
        let request = route_request(addr, self.sequence);
        // SAFETY: send reads request.len() bytes from the request buffer.
        let sent = unsafe {
            libc::send(
                self.socket.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buffer = [0u8; 4096];
        loop {
            // SAFETY: recv writes at most buffer.len() bytes into the buffer.
            let received = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            if received < 0 {
                return Err(io::Error::last_os_error());
            }
            match parse_route_reply(&buffer[..received as usize], self.sequence)? {
                Reply::Route(route) => return Ok(Some(route)),
                Reply::NoRoute => return Ok(None),
                Reply::Other => continue,
            }
        }
    }
}

/// RTM_GETROUTE for one address of either family (nlmsghdr, rtmsg, RTA_DST), native byte order
/// but for the address, as `ip route get ADDR` sends it. Sent to the kernel (port 0) on an
/// unbound socket.
fn route_request(addr: IpAddr, sequence: u32) -> Vec<u8> {
    let (family, octets) = match addr {
        IpAddr::V4(addr) => (libc::AF_INET, addr.octets().to_vec()),
        IpAddr::V6(addr) => (libc::AF_INET6, addr.octets().to_vec()),
    };
    let prefix_len = (octets.len() * 8) as u8;
    let attribute_len = 4 + octets.len();
    let total = NLMSG_HEADER_LEN + RTMSG_LEN + attribute_len;
    let mut message = Vec::with_capacity(total);
    message.extend_from_slice(&(total as u32).to_ne_bytes());
    message.extend_from_slice(&libc::RTM_GETROUTE.to_ne_bytes());
    message.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    message.extend_from_slice(&sequence.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    message.extend_from_slice(&[family as u8, prefix_len, 0, 0, 0, 0, 0, 0]);
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(&(attribute_len as u16).to_ne_bytes());
    message.extend_from_slice(&libc::RTA_DST.to_ne_bytes());
    message.extend_from_slice(&octets);
    message
}

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Route(Route),
    NoRoute,
    /// A message that does not answer this request.
    Other,
}

/// Reads the kernel's answer to request `sequence`: an RTM_NEWROUTE, or an NLMSG_ERROR whose
/// error code says there is no route.
fn parse_route_reply(buffer: &[u8], sequence: u32) -> io::Result<Reply> {
    let truncated = || io::Error::new(io::ErrorKind::InvalidData, "truncated netlink reply");
    let u16_at = |at: usize| -> io::Result<u16> {
        let bytes = buffer.get(at..at + 2).ok_or_else(truncated)?;
        Ok(u16::from_ne_bytes([bytes[0], bytes[1]]))
    };
    let u32_at = |at: usize| -> io::Result<u32> {
        let bytes = buffer.get(at..at + 4).ok_or_else(truncated)?;
        Ok(u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    };
    let length = (u32_at(0)? as usize).min(buffer.len());
    let kind = u16_at(4)?;
    if u32_at(8)? != sequence {
        return Ok(Reply::Other);
    }
    if kind == NLMSG_ERROR {
        let code = u32_at(NLMSG_HEADER_LEN)? as i32;
        return match -code {
            0 => Ok(Reply::Other),
            libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EINVAL | libc::EACCES => {
                Ok(Reply::NoRoute)
            }
            errno => Err(io::Error::from_raw_os_error(errno)),
        };
    }
    if kind != libc::RTM_NEWROUTE {
        return Ok(Reply::Other);
    }
    let route_type = *buffer.get(NLMSG_HEADER_LEN + 7).ok_or_else(truncated)?;
    let mut route = Route {
        oif: 0,
        via_gateway: false,
        local: route_type == libc::RTN_LOCAL,
    };
    let mut at = NLMSG_HEADER_LEN + RTMSG_LEN;
    while at + 4 <= length {
        let attribute_len = usize::from(u16_at(at)?);
        if attribute_len < 4 {
            break;
        }
        match u16_at(at + 2)? {
            libc::RTA_OIF => route.oif = u32_at(at + 4)?,
            libc::RTA_GATEWAY => route.via_gateway = true,
            _ => {}
        }
        at += attribute_len.next_multiple_of(4);
    }
    Ok(Reply::Route(route))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const ETH0: u32 = 2;
    const CNI0: u32 = 5;

    fn route(oif: u32, via_gateway: bool, local: bool) -> Route {
        Route {
            oif,
            via_gateway,
            local,
        }
    }

    #[test]
    fn an_address_is_on_this_node_when_a_pod_interface_reaches_it_directly() {
        let nics = BTreeSet::from([ETH0]);
        let rows = [
            ("pod bridge, directly", route(CNI0, false, false), true),
            ("per-pod veth, directly", route(9, false, false), true),
            (
                "the NIC, through a gateway",
                route(ETH0, true, false),
                false,
            ),
            (
                "the NIC, directly (same subnet)",
                route(ETH0, false, false),
                false,
            ),
            (
                "an overlay tunnel, through a gateway",
                route(7, true, false),
                false,
            ),
            ("the node's own address", route(1, false, true), true),
        ];
        for (name, route, expected) in rows {
            assert_eq!(route.is_on_this_node(&nics), expected, "{name}");
        }
    }

    /// An RTM_NEWROUTE reply as the kernel lays it out (include/uapi/linux/rtnetlink.h,
    /// rtm_fill_info in net/ipv4/route.c), written here byte by byte.
    fn new_route_reply(
        sequence: u32,
        route_type: u8,
        oif: u32,
        gateway: Option<[u8; 4]>,
    ) -> Vec<u8> {
        let mut attributes = Vec::new();
        let mut attribute = |kind: u16, data: &[u8]| {
            attributes.extend_from_slice(&(4 + data.len() as u16).to_ne_bytes());
            attributes.extend_from_slice(&kind.to_ne_bytes());
            attributes.extend_from_slice(data);
        };
        attribute(libc::RTA_DST, &[10, 244, 2, 10]);
        if let Some(gateway) = gateway {
            attribute(libc::RTA_GATEWAY, &gateway);
        }
        attribute(libc::RTA_OIF, &oif.to_ne_bytes());
        let total = NLMSG_HEADER_LEN + RTMSG_LEN + attributes.len();
        let mut message = Vec::new();
        message.extend_from_slice(&(total as u32).to_ne_bytes());
        message.extend_from_slice(&libc::RTM_NEWROUTE.to_ne_bytes());
        message.extend_from_slice(&0u16.to_ne_bytes());
        message.extend_from_slice(&sequence.to_ne_bytes());
        message.extend_from_slice(&0u32.to_ne_bytes());
        message.extend_from_slice(&[libc::AF_INET as u8, 32, 0, 0, 254, 0, 0, route_type]);
        message.extend_from_slice(&0u32.to_ne_bytes());
        message.extend_from_slice(&attributes);
        message
    }

    #[test]
    fn a_route_reply_gives_the_output_interface_and_whether_a_gateway_is_used() {
        let reply = new_route_reply(7, libc::RTN_UNICAST, ETH0, Some([203, 0, 113, 2]));
        assert_eq!(
            parse_route_reply(&reply, 7).expect("parses"),
            Reply::Route(route(ETH0, true, false))
        );
        let reply = new_route_reply(8, libc::RTN_LOCAL, 1, None);
        assert_eq!(
            parse_route_reply(&reply, 8).expect("parses"),
            Reply::Route(route(1, false, true))
        );
        assert_eq!(parse_route_reply(&reply, 9).expect("parses"), Reply::Other);
    }

    #[test]
    fn the_kernel_routes_a_loopback_address_locally() {
        // A route lookup sends no packet; the machine's own routes are only read.
        for loopback in [
            IpAddr::from(Ipv4Addr::LOCALHOST),
            IpAddr::from(Ipv6Addr::LOCALHOST),
        ] {
            let route = Fib::open()
                .and_then(|mut fib| fib.route_to(loopback))
                .expect("route lookup")
                .unwrap_or_else(|| panic!("a route to {loopback}"));
            assert!(route.local, "{loopback}: {route:?}");
            assert_eq!(route.oif, interface_index("lo").expect("lo"));
            assert!(route.is_on_this_node(&BTreeSet::from([route.oif])));
        }
    }

    #[test]
    fn no_route_is_an_answer_and_other_errors_are_errors() {
        let error = |sequence: u32, errno: i32| {
            let mut message = Vec::new();
            message.extend_from_slice(&36u32.to_ne_bytes());
            message.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            message.extend_from_slice(&0u16.to_ne_bytes());
            message.extend_from_slice(&sequence.to_ne_bytes());
            message.extend_from_slice(&0u32.to_ne_bytes());
            message.extend_from_slice(&(-errno).to_ne_bytes());
            message.extend_from_slice(&[0; 16]);
            message
        };
        assert_eq!(
            parse_route_reply(&error(3, libc::ENETUNREACH), 3).expect("parses"),
            Reply::NoRoute
        );
        assert!(parse_route_reply(&error(3, libc::ENOBUFS), 3).is_err());
    }
}
