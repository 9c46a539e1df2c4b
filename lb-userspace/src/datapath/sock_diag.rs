//! Aborting connected UDP sockets of other processes: netlink sock_diag, in every network
//! namespace of the machine.
//!
//! The socket hooks translate a connected UDP socket once, at connect(); when its endpoint leaves
//! the Service, every later datagram still goes to the old address (kubernetes#19029). Aborting
//! the socket makes the application's next call fail, so it reconnects through the hook to a live
//! endpoint. Listing uses `SOCK_DIAG_BY_FAMILY` (a dump of the connected UDP sockets of each
//! family: an AF_INET6 socket connected to an IPv4-mapped address is matched as IPv4), aborting
//! uses `SOCK_DESTROY` with the listed identity and cookie (kernel >= 4.5 with
//! CONFIG_INET_DIAG_DESTROY and CONFIG_INET_UDP_DIAG): the kernel finds the socket by its 4-tuple,
//! refuses when the cookie differs, and calls `udp_abort`, which sets ECONNABORTED as the
//! socket's error and disconnects it (net/ipv4/udp.c, `udp_abort`; net/ipv4/udp_diag.c,
//! `__udp_diag_destroy`).
//!
//! The same goes for a connected UDP socket that connected to a Service address before the
//! Service (or the agent) was there: the hooks never saw it, and its datagrams go to the address
//! itself for as long as it lives. Once the address is a frontend, aborting the socket sends the
//! application's reconnect through the hook. Its peer being a frontend is what marks it (a
//! translated socket's peer is a backend), but only sockets the hooks would translate are
//! touched: those whose cgroup (`INET_DIAG_CGROUP_ID`, kernel >= 5.7) is the hooks' cgroup or
//! one below it, where the kernel runs the hooks for them.
//!
//! sock_diag answers only for the network namespace of the netlink socket, so a dedicated thread
//! enters each namespace in turn (found through `/proc/<pid>/ns/net`, one per inode). Aborting
//! needs CAP_NET_ADMIN; entering another namespace needs CAP_SYS_ADMIN (setns) and seeing its
//! processes (the host's PID namespace, CAP_SYS_PTRACE for other users' processes). Namespaces
//! whose processes are not visible are not searched.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fs::File,
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::PathBuf,
};

/// linux/sock_diag.h
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
/// linux/inet_diag.h: the attribute carrying the socket's cgroup v2 id (a u64), which a dump
/// adds to every socket (net/ipv4/inet_diag.c, `inet_diag_msg_attrs_fill`).
const INET_DIAG_CGROUP_ID: u16 = 21;
/// The type bits of a netlink attribute's type (the rest are NLA_F_NESTED and
/// NLA_F_NET_BYTEORDER).
const NLA_TYPE_MASK: u16 = 0x3fff;
/// A connected UDP socket's `sk_state` (include/net/tcp_states.h).
const TCP_ESTABLISHED: u32 = 1;
/// How many error messages a report keeps.
const MAX_ERRORS: usize = 5;

/// `struct inet_diag_sockid` (linux/inet_diag.h): addresses and ports in network byte order, the
/// cookie as two native-endian halves, low first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
struct InetDiagSockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    interface: u32,
    cookie: [u32; 2],
}
const _: () = assert!(size_of::<InetDiagSockId>() == 48);

impl InetDiagSockId {
    fn cookie(&self) -> u64 {
        u64::from(self.cookie[0]) | u64::from(self.cookie[1]) << 32
    }

    /// The peer of a socket of `family`; an IPv4-mapped IPv6 peer as the IPv4 address it is.
    fn remote(&self, family: Family) -> SocketAddr {
        SocketAddr::new(family.address(&self.dst), u16::from_be(self.dport))
    }

    fn local(&self, family: Family) -> SocketAddr {
        SocketAddr::new(family.address(&self.src), u16::from_be(self.sport))
    }
}

/// The socket families dumped, AF_INET and AF_INET6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn number(self) -> u8 {
        match self {
            Self::V4 => libc::AF_INET as u8,
            Self::V6 => libc::AF_INET6 as u8,
        }
    }

    /// An address of `inet_diag_sockid` (network byte order words; IPv4 in the first).
    fn address(self, words: &[u32; 4]) -> IpAddr {
        match self {
            Self::V4 => IpAddr::from(u32::from_be(words[0]).to_be_bytes()),
            Self::V6 => {
                let bytes: [u8; 16] = words
                    .map(u32::to_ne_bytes)
                    .as_flattened()
                    .try_into()
                    .expect("16 bytes");
                let addr = Ipv6Addr::from(bytes);
                addr.to_ipv4_mapped().map_or(IpAddr::V6(addr), IpAddr::V4)
            }
        }
    }
}

/// `struct inet_diag_req_v2`.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct InetDiagReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: InetDiagSockId,
}
const _: () = assert!(size_of::<InetDiagReqV2>() == 56);

/// `struct inet_diag_msg`: one socket of a dump.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct InetDiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: InetDiagSockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}
const _: () = assert!(size_of::<InetDiagMsg>() == 72);

/// A request: the netlink header and the inet_diag request, as the kernel reads them.
#[repr(C)]
struct Request {
    header: libc::nlmsghdr,
    body: InetDiagReqV2,
}

/// What one round of aborting did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DestroyReport {
    /// Sockets aborted.
    pub destroyed: u64,
    /// Sockets that could not be aborted and namespaces that could not be searched.
    pub failed: u64,
    /// The first few reasons of those failures.
    pub errors: Vec<String>,
}

impl DestroyReport {
    fn fail(&mut self, error: String) {
        self.failed += 1;
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(error);
        }
    }
}

/// Which connected UDP sockets to abort (an IPv4-mapped peer of an IPv6 socket counts as the
/// IPv4 address it maps).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AbortTargets {
    /// A socket with this cookie, still connected to this peer.
    pub by_cookie: BTreeMap<u64, SocketAddr>,
    /// A socket connected to one of these peers (frontends, which no translated socket has as
    /// its peer)...
    pub untranslated: BTreeSet<SocketAddr>,
    /// ... whose cgroup v2 id is one of these (the hooks' cgroup and those below it).
    pub cgroups: HashSet<u64>,
}

impl AbortTargets {
    pub fn is_empty(&self) -> bool {
        self.by_cookie.is_empty() && (self.untranslated.is_empty() || self.cgroups.is_empty())
    }

    fn matches(&self, family: Family, socket: &ListedSocket) -> bool {
        let peer = socket.id.remote(family);
        self.by_cookie.get(&socket.id.cookie()) == Some(&peer)
            || (self.untranslated.contains(&peer)
                && socket
                    .cgroup
                    .is_some_and(|cgroup| self.cgroups.contains(&cgroup)))
    }
}

/// A socket of a dump: its identity, and its cgroup v2 id when the kernel gave one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ListedSocket {
    id: InetDiagSockId,
    cgroup: Option<u64>,
}

/// Aborts every connected UDP socket (IPv4 or IPv6), in any network namespace, that `targets`
/// names. Nothing else is touched: a socket with another cookie, or one since connected
/// elsewhere, or one outside the cgroups, stays as it is.
pub fn destroy_connected_udp(targets: &AbortTargets) -> DestroyReport {
    if targets.is_empty() {
        return DestroyReport::default();
    }
    let targets = targets.clone();
    // setns changes the calling thread's namespace: a thread of its own, which ends with it.
    let worker = std::thread::Builder::new()
        .name("udp-sock-destroy".into())
        .spawn(move || destroy_in_every_namespace(&targets));
    match worker.map(std::thread::JoinHandle::join) {
        Ok(Ok(report)) => report,
        Ok(Err(_)) => {
            let mut report = DestroyReport::default();
            report.fail("the socket-destroy thread panicked".into());
            report
        }
        Err(error) => {
            let mut report = DestroyReport::default();
            report.fail(format!("starting the socket-destroy thread: {error}"));
            report
        }
    }
}

fn destroy_in_every_namespace(targets: &AbortTargets) -> DestroyReport {
    let mut report = DestroyReport::default();
    let namespaces = match network_namespaces() {
        Ok(namespaces) => namespaces,
        Err(error) => {
            report.fail(format!("listing network namespaces in /proc: {error}"));
            return report;
        }
    };
    for path in namespaces {
        if let Err(error) = destroy_in_namespace(&path, targets, &mut report) {
            // A process that exited took its namespace reference with it: nothing to search.
            if error.kind() != io::ErrorKind::NotFound {
                report.fail(format!("{}: {error}", path.display()));
            }
        }
    }
    report
}

/// One `/proc/<pid>/ns/net` per network namespace (by device and inode).
fn network_namespaces() -> io::Result<Vec<PathBuf>> {
    let mut seen = HashSet::new();
    let mut paths = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let is_pid = entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.bytes().all(|byte| byte.is_ascii_digit()));
        if !is_pid {
            continue;
        }
        let path = entry.path().join("ns/net");
        // Gone meanwhile, or not ours to look at: its namespace is found through another
        // process or reported when entered.
        let Ok(metadata) = std::fs::metadata(&path) else {
            continue;
        };
        if seen.insert((metadata.dev(), metadata.ino())) {
            paths.push(path);
        }
    }
    Ok(paths)
}

fn destroy_in_namespace(
    path: &std::path::Path,
    targets: &AbortTargets,
    report: &mut DestroyReport,
) -> io::Result<()> {
    let namespace = File::open(path)?;
    // The agent's own namespace needs no setns (nor CAP_SYS_ADMIN): SOCK_DESTROY itself asks
    // for CAP_NET_ADMIN only (net/core/sock_diag.c, sock_diag_destroy).
    if !is_current_namespace(&namespace)? {
        // SAFETY: a valid namespace file descriptor; setns changes only this thread's
        // namespace.
        if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let diag = SockDiag::open()?;
    for family in [Family::V4, Family::V6] {
        for listed in diag.connected_udp(family)? {
            if !targets.matches(family, &listed) {
                continue;
            }
            let socket = listed.id;
            match diag.destroy_udp(family, &socket) {
                Ok(()) => report.destroyed += 1,
                // Closed (or reconnected elsewhere) since the dump: nothing left to abort.
                Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(error) => report.fail(format!(
                    "aborting the UDP socket {} -> {} (cookie {}) in {}: {error}",
                    socket.local(family),
                    socket.remote(family),
                    socket.cookie(),
                    path.display()
                )),
            }
        }
    }
    Ok(())
}

/// Whether `namespace` is the calling thread's network namespace.
fn is_current_namespace(namespace: &File) -> io::Result<bool> {
    let current = std::fs::metadata("/proc/thread-self/ns/net")?;
    let other = namespace.metadata()?;
    Ok((current.dev(), current.ino()) == (other.dev(), other.ino()))
}

/// A NETLINK_SOCK_DIAG socket of the calling thread's network namespace.
struct SockDiag {
    fd: OwnedFd,
}

impl SockDiag {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a freshly created descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// Every connected UDP socket of `family` in this namespace.
    fn connected_udp(&self, family: Family) -> io::Result<Vec<ListedSocket>> {
        self.send(
            SOCK_DIAG_BY_FAMILY,
            (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
            InetDiagReqV2 {
                family: family.number(),
                protocol: libc::IPPROTO_UDP as u8,
                states: 1 << TCP_ESTABLISHED,
                ..Default::default()
            },
        )?;
        let mut sockets = Vec::new();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let len = self.receive(&mut buffer)?;
            for (header, payload) in messages(&buffer[..len]) {
                match header.nlmsg_type as i32 {
                    libc::NLMSG_DONE => return Ok(sockets),
                    libc::NLMSG_ERROR => return Err(netlink_error(payload)),
                    _ if header.nlmsg_type == SOCK_DIAG_BY_FAMILY => {
                        if let Some(message) = read_struct::<InetDiagMsg>(payload) {
                            sockets.push(ListedSocket {
                                id: message.id,
                                cgroup: cgroup_id(&payload[size_of::<InetDiagMsg>()..]),
                            });
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Aborts the UDP socket of `family` with this identity (4-tuple, interface and cookie).
    fn destroy_udp(&self, family: Family, id: &InetDiagSockId) -> io::Result<()> {
        self.send(
            SOCK_DESTROY,
            (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
            InetDiagReqV2 {
                family: family.number(),
                protocol: libc::IPPROTO_UDP as u8,
                states: u32::MAX,
                id: *id,
                ..Default::default()
            },
        )?;
        let mut buffer = vec![0u8; 4096];
        let len = self.receive(&mut buffer)?;
        match messages(&buffer[..len]).next() {
            Some((header, payload)) if header.nlmsg_type as i32 == libc::NLMSG_ERROR => {
                match netlink_error(payload) {
                    error if error.raw_os_error() == Some(0) => Ok(()),
                    error => Err(error),
                }
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "SOCK_DESTROY: no acknowledgement",
            )),
        }
    }

    fn send(&self, kind: u16, flags: u16, body: InetDiagReqV2) -> io::Result<()> {
        let request = Request {
            header: libc::nlmsghdr {
                nlmsg_len: size_of::<Request>() as u32,
                nlmsg_type: kind,
                nlmsg_flags: flags,
                nlmsg_seq: 1,
                nlmsg_pid: 0,
            },
            body,
        };
        // SAFETY: send(2) reads size_of::<Request>() bytes of a live, fully initialised repr(C)
        // value (no implicit padding: 16 + 56 bytes). An unconnected netlink socket sends to
        // the kernel.
        let sent = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                (&raw const request).cast(),
                size_of::<Request>(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Never waits: the kernel queues its answer before send() returns (sock_diag requests run
    /// in the sender's context, net/netlink/af_netlink.c `netlink_unicast_kernel`), and the next
    /// part of a dump before recv() returns the previous one (`netlink_recvmsg` calls
    /// `netlink_dump`). Nothing queued is an error, not a reason to hang the sync.
    fn receive(&self, buffer: &mut [u8]) -> io::Result<usize> {
        // SAFETY: recv(2) writes at most buffer.len() bytes into the buffer.
        let len = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if len < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(len as usize)
    }
}

/// The netlink messages of one datagram: (header, payload), each payload cut to its length.
fn messages(mut data: &[u8]) -> impl Iterator<Item = (libc::nlmsghdr, &[u8])> {
    const HEADER: usize = size_of::<libc::nlmsghdr>();
    std::iter::from_fn(move || {
        let header = read_struct::<libc::nlmsghdr>(data)?;
        let len = header.nlmsg_len as usize;
        if len < HEADER || len > data.len() {
            return None;
        }
        let payload = &data[HEADER..len];
        // Messages are aligned to 4 bytes (NLMSG_ALIGN).
        data = &data[len.next_multiple_of(4).min(data.len())..];
        Some((header, payload))
    })
}

/// The netlink attributes of `data`: (type, payload), each aligned to 4 bytes (NLA_ALIGN), the
/// type without its flag bits; a malformed length ends the list.
fn attributes(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    const HEADER: usize = 4;
    std::iter::from_fn(move || {
        let header = data.first_chunk::<HEADER>()?;
        let len = usize::from(u16::from_ne_bytes([header[0], header[1]]));
        let kind = u16::from_ne_bytes([header[2], header[3]]) & NLA_TYPE_MASK;
        if len < HEADER || len > data.len() {
            return None;
        }
        let payload = &data[HEADER..len];
        data = &data[len.next_multiple_of(4).min(data.len())..];
        Some((kind, payload))
    })
}

/// The cgroup v2 id among the attributes that follow a dumped socket, if the kernel gave one
/// (CONFIG_SOCK_CGROUP_DATA, kernel >= 5.7).
fn cgroup_id(attributes_data: &[u8]) -> Option<u64> {
    attributes(attributes_data)
        .find(|(kind, _)| *kind == INET_DIAG_CGROUP_ID)
        .and_then(|(_, payload)| Some(u64::from_ne_bytes(*payload.first_chunk::<8>()?)))
}

/// The errno of an NLMSG_ERROR payload (`struct nlmsgerr`: a negative errno, 0 for an ack).
fn netlink_error(payload: &[u8]) -> io::Error {
    match payload.first_chunk::<4>() {
        Some(bytes) => io::Error::from_raw_os_error(-i32::from_ne_bytes(*bytes)),
        None => io::Error::new(io::ErrorKind::InvalidData, "truncated netlink error"),
    }
}

/// A plain-integer repr(C) struct read from the start of `data`, if it is long enough.
fn read_struct<T: Copy + PlainData>(data: &[u8]) -> Option<T> {
    if data.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: T is a repr(C) struct of integers (PlainData), for which every bit pattern is
    // valid, and data holds at least size_of::<T>() bytes; read_unaligned needs no alignment.
    Some(unsafe { data.as_ptr().cast::<T>().read_unaligned() })
}

/// Structs made of integers only: any bytes are a valid value.
trait PlainData {}
impl PlainData for libc::nlmsghdr {}
impl PlainData for InetDiagMsg {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_splits_a_datagram_and_stops_at_a_bad_length() {
        let mut data = Vec::new();
        for (kind, payload) in [(20u16, &[1u8, 2, 3][..]), (3, &[0, 0, 0, 0][..])] {
            let len = (16 + payload.len()) as u32;
            data.extend_from_slice(&len.to_ne_bytes());
            data.extend_from_slice(&kind.to_ne_bytes());
            data.extend_from_slice(&[0; 10]);
            data.extend_from_slice(payload);
            data.resize(data.len().next_multiple_of(4), 0);
        }
        let parsed: Vec<(u16, Vec<u8>)> = messages(&data)
            .map(|(header, payload)| (header.nlmsg_type, payload.to_vec()))
            .collect();
        assert_eq!(parsed, [(20, vec![1, 2, 3]), (3, vec![0, 0, 0, 0])]);
        let mut bad = data.clone();
        bad[..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert_eq!(messages(&bad).count(), 0);
    }

    /// The words of `inet_diag_sockid` as the kernel writes them: the address's bytes in order.
    fn words(bytes: &[u8]) -> [u32; 4] {
        let mut padded = [0u8; 16];
        padded[..bytes.len()].copy_from_slice(bytes);
        std::array::from_fn(|i| u32::from_ne_bytes(padded[i * 4..i * 4 + 4].try_into().unwrap()))
    }

    /// One netlink attribute as the kernel lays it out: length, type, payload, padding to 4.
    fn attribute(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut data = Vec::new();
        data.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        data.extend_from_slice(&kind.to_ne_bytes());
        data.extend_from_slice(payload);
        data.resize(data.len().next_multiple_of(4), 0);
        data
    }

    #[test]
    fn the_cgroup_id_is_found_among_a_sockets_attributes() {
        const INET_DIAG_PAD: u16 = 14;
        let cgroup = 0x0000_0001_0000_2a2au64;
        let mut data = attribute(5, &[0]);
        data.extend(attribute(INET_DIAG_PAD, &[]));
        data.extend(attribute(INET_DIAG_CGROUP_ID, &cgroup.to_ne_bytes()));
        assert_eq!(cgroup_id(&data), Some(cgroup));
        assert_eq!(cgroup_id(&attribute(5, &[0])), None);
        // A length past the data ends the list: no id read out of bounds.
        let mut truncated = attribute(INET_DIAG_CGROUP_ID, &cgroup.to_ne_bytes());
        truncated.truncate(10);
        assert_eq!(cgroup_id(&truncated), None);
        // Too short a payload is no id either.
        assert_eq!(cgroup_id(&attribute(INET_DIAG_CGROUP_ID, &[1, 2])), None);
    }

    #[test]
    fn a_socket_connected_to_a_frontend_is_a_target_only_inside_the_hooks_cgroups() {
        let frontend: SocketAddr = "10.96.0.53:53".parse().unwrap();
        let targets = AbortTargets {
            untranslated: [frontend].into(),
            cgroups: [7].into(),
            ..Default::default()
        };
        let socket = |cgroup| ListedSocket {
            id: InetDiagSockId {
                dport: 53u16.to_be(),
                dst: words(&[10, 96, 0, 53]),
                ..Default::default()
            },
            cgroup,
        };
        assert!(targets.matches(Family::V4, &socket(Some(7))));
        assert!(!targets.matches(Family::V4, &socket(Some(8))));
        assert!(!targets.matches(Family::V4, &socket(None)));
        let elsewhere = ListedSocket {
            id: InetDiagSockId {
                dport: 54u16.to_be(),
                ..socket(Some(7)).id
            },
            ..socket(Some(7))
        };
        assert!(!targets.matches(Family::V4, &elsewhere));
        assert!(
            AbortTargets {
                cgroups: HashSet::new(),
                ..targets
            }
            .is_empty()
        );
    }

    #[test]
    fn a_socket_id_gives_its_cookie_and_peer() {
        let id = InetDiagSockId {
            dport: 8080u16.to_be(),
            dst: words(&[10, 244, 1, 10]),
            cookie: [0x89ab_cdef, 0x0123_4567],
            ..Default::default()
        };
        assert_eq!(id.cookie(), 0x0123_4567_89ab_cdef);
        assert_eq!(id.remote(Family::V4), "10.244.1.10:8080".parse().unwrap());
    }

    #[test]
    fn an_ipv6_socket_id_gives_its_peer_and_a_mapped_one_the_ipv4_address() {
        let native: Ipv6Addr = "2001:db8:244:1::10".parse().unwrap();
        let id = InetDiagSockId {
            dport: 8080u16.to_be(),
            dst: words(&native.octets()),
            ..Default::default()
        };
        assert_eq!(
            id.remote(Family::V6),
            "[2001:db8:244:1::10]:8080".parse().unwrap()
        );
        let mapped: Ipv6Addr = "::ffff:10.244.1.10".parse().unwrap();
        let id = InetDiagSockId {
            dst: words(&mapped.octets()),
            ..id
        };
        assert_eq!(id.remote(Family::V6), "10.244.1.10:8080".parse().unwrap());
    }
}
