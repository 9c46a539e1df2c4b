//! What the node must provide for the datapath, apart from the datapath itself:
//! `net.ipv4.conf.<iface>.accept_local` on every interface XDP is attached to, IPv4 forwarding
//! there when endpoints live on other nodes ([`missing_requirements`]), and, before the agent
//! starts, a cgroup v2 directory and a bpffs that outlives it ([`check_mounts`]).
//!
//! In the DaemonSet the agent cannot write sysctls (the runtime mounts /proc/sys read-only in an
//! unprivileged container); the privileged init container (`lb init-node`) sets them, and the
//! agent only checks. Run as root outside a container, the agent sets them itself.

use std::{
    io,
    net::Ipv4Addr,
    ops::RangeInclusive,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use crate::datapath::nic::is_interface_name;

/// `/proc/sys/net/ipv4/conf/<iface>/accept_local`, of the caller's network namespace. Not
/// for `all` or `default`, which name no interface there: `all` turns the setting on for every
/// interface of the node (the kernel ORs it with each interface's), `default` for new ones.
fn accept_local_path(iface: &str) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(
        is_interface_name(iface) && !matches!(iface, "all" | "default"),
        "{iface:?} is not an interface name"
    );
    Ok(PathBuf::from("/proc/sys/net/ipv4/conf")
        .join(iface)
        .join("accept_local"))
}

/// Whether `iface` is an interface whose accept_local [`set_accept_local`] may set.
pub fn check_accept_local_interface(iface: &str) -> anyhow::Result<()> {
    accept_local_path(iface).map(|_| ())
}

/// Sets accept_local on `iface`: the stack must take packets arriving with one of the node's
/// addresses as source, which XDP hands it when it SNATs a flow it cannot send itself yet (no
/// neighbour entry).
pub fn set_accept_local(iface: &str) -> anyhow::Result<()> {
    let path = accept_local_path(iface)?;
    std::fs::write(&path, "1").with_context(|| format!("setting {}", path.display()))
}

/// The agent's side: accept_local must be on for `iface`. Set already (by `lb init-node`), the
/// agent writes nothing; otherwise it sets it when it may, and says what to do when it may not.
pub fn require_accept_local(iface: &str) -> anyhow::Result<()> {
    let path = accept_local_path(iface)?;
    let current =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    if current.trim() == "1" {
        return Ok(());
    }
    match std::fs::write(&path, "1") {
        Ok(()) => Ok(()),
        Err(error)
            if error.raw_os_error() == Some(libc::EROFS)
                || error.kind() == io::ErrorKind::PermissionDenied =>
        {
            anyhow::bail!(
                "net.ipv4.conf.{iface}.accept_local is {} and this process cannot set it ({error}; \
                 /proc/sys is read-only in an unprivileged container): run `lb init-node \
                 --interfaces {iface}` first, as the DaemonSet's init container does",
                current.trim()
            )
        }
        Err(error) => Err(error).with_context(|| format!("setting {}", path.display())),
    }
}

/// A setting of the node's kernel the datapath relies on, checked at start and on every sync.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MissingRequirement {
    /// The metric label: one of [`REQUIREMENTS`] or [`NODE_REQUIREMENTS`].
    pub requirement: &'static str,
    /// The interface of a per-interface setting; empty for a setting of the whole node.
    pub interface: String,
    /// The sysctl as `sysctl` names it, the value it has, and what it should have.
    pub sysctl: String,
    pub value: String,
    pub want: String,
    /// What breaks without it.
    pub effect: &'static str,
}

impl std::fmt::Display for MissingRequirement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} is {} (want {}): {}",
            self.sysctl, self.value, self.want, self.effect
        )
    }
}

/// Every requirement of an interface, for the metric's label values.
pub const REQUIREMENTS: [&str; 3] = ["ip_forward", "accept_local", "rp_filter"];

/// Every requirement of the whole node (the metric's `interface` label empty).
pub const NODE_REQUIREMENTS: [&str; 1] = ["reserved_ports"];

/// What this node lacks of what the datapath needs on `interfaces` (the NICs XDP is attached
/// to): accept_local always; IPv4 forwarding when `remote_endpoints` (a packet XDP translated
/// for another node's endpoint, and cannot send out of the NIC it came in on, is forwarded by
/// the stack, which drops it when forwarding is off on the NIC it arrived on: `ip_forward`
/// sets `forwarding` on every interface; `ip_route_input_slow` in net/ipv4/route.c checks the
/// incoming one's); and, with remote endpoints, reverse-path filtering that is not strict
/// on a NIC where the stack may get translated packets whose source is not one of that NIC's
/// addresses ([`strict_rp_filter`]): every NIC when XDP serves two or more (answers translated
/// to their frontend may reach the stack on the NIC towards the other nodes), else the one
/// NIC when the SNAT address (`snat_address`) is not among its own.
pub fn missing_requirements(
    interfaces: &[String],
    remote_endpoints: bool,
    snat_address: Option<Ipv4Addr>,
) -> Vec<MissingRequirement> {
    let mut missing = Vec::new();
    let served: Vec<&String> = interfaces
        .iter()
        .filter(|name| is_interface_name(name))
        .collect();
    if remote_endpoints {
        let several = served.len() > 1;
        let foreign_sources = |iface: &str| {
            several
                || snat_address.is_some_and(|address| !ipv4_addresses_of(iface).contains(&address))
        };
        missing.extend(
            served
                .iter()
                .filter(|iface| foreign_sources(iface))
                .filter_map(|iface| strict_rp_filter(iface)),
        );
    }
    for iface in served {
        let mut check = |requirement, setting: &str, effect| {
            let sysctl = format!("net.ipv4.conf.{iface}.{setting}");
            let path = PathBuf::from("/proc/sys/net/ipv4/conf")
                .join(iface)
                .join(setting);
            let value = match std::fs::read_to_string(&path) {
                Ok(value) => value.trim().to_owned(),
                Err(error) => format!("unreadable ({error})"),
            };
            if value != "1" {
                missing.push(MissingRequirement {
                    requirement,
                    interface: iface.clone(),
                    sysctl,
                    value,
                    want: "1".to_owned(),
                    effect,
                });
            }
        };
        check(
            "accept_local",
            "accept_local",
            "the stack drops the packets XDP SNATs to the node's address and hands it to send",
        );
        if remote_endpoints {
            check(
                "ip_forward",
                "forwarding",
                "packets to endpoints on other nodes that XDP hands to the stack are not \
                 forwarded (set net.ipv4.ip_forward=1)",
            );
        }
    }
    missing
}

/// Strict reverse-path filtering on `iface` (`rp_filter` 1, the larger of the interface's and
/// `all`'s, as the kernel takes it): the stack then drops a packet arriving there whose source
/// is an address of another interface (net/ipv4/fib_frontend.c, `__fib_validate_source`:
/// `e_rpf`, accept_local or not). XDP hands the stack such packets: a client's packet SNATed
/// to an address of another NIC, whenever XDP cannot send it on itself (the NIC towards the
/// other nodes not served, or the next hop's MAC unknown, which the stack would resolve;
/// dropped, it never does), and, with two NICs served, an endpoint's answer translated to its
/// frontend that XDP cannot send to the client's NIC.
fn strict_rp_filter(iface: &str) -> Option<MissingRequirement> {
    let read = |scope: &str| {
        let path = PathBuf::from("/proc/sys/net/ipv4/conf")
            .join(scope)
            .join("rp_filter");
        std::fs::read_to_string(path)
            .ok()
            .and_then(|value| value.trim().parse::<u8>().ok())
    };
    let (all, own) = (read("all")?, read(iface)?);
    if all.max(own) != 1 {
        return None;
    }
    let scope = if all == 1 { "all" } else { iface };
    Some(MissingRequirement {
        requirement: "rp_filter",
        interface: iface.to_owned(),
        sysctl: format!("net.ipv4.conf.{scope}.rp_filter"),
        value: "1".to_owned(),
        want: "0 or 2 (on all and the interface)".to_owned(),
        effect: "the stack drops what XDP translates and hands it with a source on another \
                 NIC (the SNAT address): NodePort flows to other nodes' endpoints fail whenever \
                 the stack must forward them",
    })
}

/// The IPv4 addresses of `iface` in the caller's network namespace (getifaddrs(3)); none when
/// they cannot be read.
fn ipv4_addresses_of(iface: &str) -> Vec<Ipv4Addr> {
    let mut addresses = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes the head of a list it allocates, freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return addresses;
    }
    let mut next = list;
    while !next.is_null() {
        // SAFETY: a node of the list getifaddrs returned, valid until freeifaddrs.
        let entry = unsafe { &*next };
        next = entry.ifa_next;
        if entry.ifa_addr.is_null() || entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated name of the list; a sockaddr whose family names its type.
        let (name, family) = unsafe {
            (
                std::ffi::CStr::from_ptr(entry.ifa_name),
                i32::from((*entry.ifa_addr).sa_family),
            )
        };
        if name.to_bytes() != iface.as_bytes() || family != libc::AF_INET {
            continue;
        }
        // SAFETY: an AF_INET sockaddr is a sockaddr_in.
        let inet = unsafe { &*entry.ifa_addr.cast::<libc::sockaddr_in>() };
        addresses.push(Ipv4Addr::from(u32::from_be(inet.sin_addr.s_addr)));
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(list) };
    addresses
}

/// The node-wide requirement while the agent keeps `lb_ports` (the NodePort and SNAT ranges) out
/// of the node's ephemeral ports ([`reserve_lb_ports`]): missing while some of them are still
/// ephemeral, unreserved.
pub fn missing_reserved_ports(lb_ports: &[RangeInclusive<u16>]) -> Option<MissingRequirement> {
    let (value, unreserved) = match local_ports() {
        Ok((ephemeral, reserved)) => {
            let unreserved = unreserved_ephemeral(&ephemeral, &reserved, lb_ports);
            if unreserved.is_empty() {
                return None;
            }
            let listed = match format_port_list(&reserved) {
                list if list.is_empty() => "empty".to_owned(),
                list => list,
            };
            (listed, unreserved)
        }
        Err(error) => (format!("unreadable ({error:#})"), lb_ports.to_vec()),
    };
    Some(MissingRequirement {
        requirement: "reserved_ports",
        interface: String::new(),
        sysctl: "net.ipv4.ip_local_reserved_ports".to_owned(),
        value,
        want: format!("{} in it", format_port_list(&unreserved)),
        effect: "the node may connect out from a NodePort or SNAT port (net.ipv4.ip_local_port_range \
                 covers them), and the answers then go to the Service or to a SNAT flow's client",
    })
}

/// The requirements missing at the last check, so that each one is reported (log, Event) when
/// it goes missing and when it is back, not on every sync.
#[derive(Debug, Default)]
pub struct RequirementWatch {
    missing: std::collections::BTreeSet<(&'static str, String)>,
}

/// What changed since the last check.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RequirementChanges {
    pub newly_missing: Vec<MissingRequirement>,
    /// (requirement, interface) met again.
    pub back: Vec<(&'static str, String)>,
}

impl RequirementWatch {
    pub fn update(&mut self, current: &[MissingRequirement]) -> RequirementChanges {
        let now: std::collections::BTreeSet<(&'static str, String)> = current
            .iter()
            .map(|missing| (missing.requirement, missing.interface.clone()))
            .collect();
        let changes = RequirementChanges {
            newly_missing: current
                .iter()
                .filter(|missing| {
                    !self
                        .missing
                        .contains(&(missing.requirement, missing.interface.clone()))
                })
                .cloned()
                .collect(),
            back: self.missing.difference(&now).cloned().collect(),
        };
        self.missing = now;
        changes
    }
}

/// Why `lb run` would start broken in this mount namespace, checked before anything is loaded:
/// the cgroup of the socket hooks must be a cgroup v2 directory, and the pins must go to a bpffs
/// that outlives the agent.
pub fn check_mounts(
    cgroup: Option<&Path>,
    pin_dir: &Path,
    mount_bpffs: bool,
) -> anyhow::Result<()> {
    let mounts = Mounts::read()?;
    if let Some(cgroup) = cgroup {
        let is_cgroup2 = statfs_type(cgroup).is_ok_and(|f_type| f_type == CGROUP2_SUPER_MAGIC);
        if !is_cgroup2 {
            anyhow::bail!(
                "--cgroup-path {} is not a cgroup v2 directory{}",
                cgroup.display(),
                mounts.bare_sys_hint(cgroup)
            );
        }
    }
    let default_mount = Path::new(crate::datapath::bpffs::DEFAULT_MOUNT);
    if !pin_dir.starts_with(default_mount) || crate::datapath::bpffs::is_mounted(default_mount)? {
        return Ok(());
    }
    let hint = mounts.bare_sys_hint(pin_dir);
    if !hint.is_empty() {
        anyhow::bail!(
            "no bpffs at {} for --pin-dir {}{hint}",
            default_mount.display(),
            pin_dir.display()
        );
    }
    if mount_bpffs
        && !mounts.new_mount_outlives_namespace(default_mount, in_initial_mount_namespace())
    {
        anyhow::bail!(
            "no bpffs at {0}, and one mounted there now would belong to this process's private \
             mount namespace and vanish with the agent, taking the pinned datapath with it: mount \
             bpffs where the host sees it first (`lb init-node`, or `mount -t bpf bpf {0}` on the \
             host), or run the agent in the host's mount namespace",
            default_mount.display()
        );
    }
    Ok(())
}

/// `f_type` of cgroup2 (include/uapi/linux/magic.h).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The inode number of the initial mount namespace's nsfs file, fixed since Linux 6.18
/// (`MNT_NS_INIT_INO` in include/uapi/linux/nsfs.h); older kernels number it like any other.
const MNT_NS_INIT_INO: u64 = 0xEFFF_FFF8;

fn in_initial_mount_namespace() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self/ns/mnt").is_ok_and(|ns| ns.ino() == MNT_NS_INIT_INO)
}

fn statfs_type(path: &Path) -> io::Result<i64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: c_path is NUL-terminated and stat points to writable memory of the right type.
    if unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs returned 0, so it filled the struct.
    Ok(unsafe { stat.assume_init() }.f_type)
}

/// The mounts of this process's mount namespace (/proc/self/mountinfo).
struct Mounts(Vec<MountEntry>);

struct MountEntry {
    mount_point: PathBuf,
    fs_type: String,
    /// The optional fields: `shared:N` when mounts below propagate to the peer group.
    shared: bool,
}

impl Mounts {
    fn read() -> anyhow::Result<Self> {
        let text = std::fs::read_to_string("/proc/self/mountinfo")
            .context("reading /proc/self/mountinfo")?;
        Ok(Self::parse(&text))
    }

    /// proc(5): `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE ...`,
    /// octal escapes (`\040`) in paths.
    fn parse(text: &str) -> Self {
        let entries = text
            .lines()
            .filter_map(|line| {
                let (before, after) = line.split_once(" - ")?;
                let fields: Vec<&str> = before.split(' ').collect();
                Some(MountEntry {
                    mount_point: PathBuf::from(unescape(fields.get(4)?)),
                    fs_type: after.split(' ').next()?.to_owned(),
                    shared: fields.iter().skip(6).any(|tag| tag.starts_with("shared:")),
                })
            })
            .collect();
        Self(entries)
    }

    /// `/sys` is a sysfs with nothing mounted below it (no cgroup, no bpffs): what
    /// `ip netns exec` leaves (it unshares the mount namespace and mounts a fresh sysfs on /sys,
    /// for the network namespace's own /sys/class/net). A path under /sys is then not the
    /// host's. Returns the hint to append to an error about `path`, or "".
    fn bare_sys_hint(&self, path: &Path) -> String {
        let sys = Path::new("/sys");
        let sys_is_sysfs = self
            .0
            .iter()
            .rev()
            .find(|entry| entry.mount_point == sys)
            .is_some_and(|entry| entry.fs_type == "sysfs");
        let anything_below = self
            .0
            .iter()
            .any(|entry| entry.mount_point.starts_with(sys) && entry.mount_point != sys);
        if path.starts_with(sys) && sys_is_sysfs && !anything_below {
            "; /sys here is a fresh sysfs with nothing mounted below it, as `ip netns exec` \
             leaves it: enter the network namespace with `nsenter --net=/run/netns/NAME` instead, \
             which keeps the host's /sys"
                .into()
        } else {
            String::new()
        }
    }

    /// Whether a filesystem mounted at `path` now would be seen outside this mount namespace
    /// (and so outlive the agent): in the initial namespace, or when the mount it would go on
    /// is shared with a peer group.
    fn new_mount_outlives_namespace(&self, path: &Path, initial_namespace: bool) -> bool {
        if initial_namespace {
            return true;
        }
        self.0
            .iter()
            .filter(|entry| path.starts_with(&entry.mount_point))
            .max_by_key(|entry| entry.mount_point.components().count())
            .is_some_and(|entry| entry.shared)
    }
}

fn unescape(field: &str) -> String {
    let mut out = String::new();
    let mut rest = field;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let code = rest
            .get(at + 1..at + 4)
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        match code {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[at + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The node's ephemeral ports (`net.ipv4.ip_local_port_range`, which IPv6 uses too) and the
/// ports taken out of them (`net.ipv4.ip_local_reserved_ports`), of the caller's network
/// namespace.
const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const LOCAL_RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// A sysctl's value in one read: `ip_local_reserved_ports` answers a read at a non-zero offset
/// with nothing (`proc_do_large_bitmap` in kernel/sysctl.c), so reading in pieces, as
/// `std::fs::read_to_string` does after its first 32-byte probe, cuts the list short.
fn read_sysctl(path: &str) -> anyhow::Result<String> {
    use std::io::Read as _;
    // A list of every port, each with its comma, takes less than 400 KB.
    let mut buffer = vec![0; 512 * 1024];
    let read = std::fs::File::open(path)
        .and_then(|mut file| file.read(&mut buffer))
        .with_context(|| format!("reading {path}"))?;
    buffer.truncate(read);
    String::from_utf8(buffer).with_context(|| format!("{path} is not UTF-8"))
}

/// Ports as `ip_local_reserved_ports` lists them: comma-separated ports and `first-last` ranges
/// (empty: none).
pub fn parse_port_list(text: &str) -> anyhow::Result<Vec<RangeInclusive<u16>>> {
    text.trim()
        .split(',')
        .filter(|item| !item.trim().is_empty())
        .map(|item| {
            let item = item.trim();
            let (first, last) = item.split_once('-').unwrap_or((item, item));
            let parse = |port: &str| {
                port.trim()
                    .parse::<u16>()
                    .with_context(|| format!("{item:?} is not a port or a range of ports"))
            };
            let (first, last) = (parse(first)?, parse(last)?);
            anyhow::ensure!(first <= last, "{item:?} ends before it starts");
            Ok(first..=last)
        })
        .collect()
}

/// `ranges` as `ip_local_reserved_ports` takes them.
pub fn format_port_list(ranges: &[RangeInclusive<u16>]) -> String {
    ranges
        .iter()
        .map(|range| {
            if range.start() == range.end() {
                range.start().to_string()
            } else {
                format!("{}-{}", range.start(), range.end())
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The ports of `wanted` that the kernel may pick as a connection's source port: inside
/// `ephemeral` and not in `reserved`, as sorted, merged ranges.
pub fn unreserved_ephemeral(
    ephemeral: &RangeInclusive<u16>,
    reserved: &[RangeInclusive<u16>],
    wanted: &[RangeInclusive<u16>],
) -> Vec<RangeInclusive<u16>> {
    let is_reserved = |port: u16| reserved.iter().any(|range| range.contains(&port));
    let mut ports: Vec<u16> = wanted
        .iter()
        .flat_map(|range| range.clone())
        .filter(|port| ephemeral.contains(port) && !is_reserved(*port))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    merge_ports(&ports)
}

/// Sorted, distinct ports as ranges of consecutive ones.
fn merge_ports(ports: &[u16]) -> Vec<RangeInclusive<u16>> {
    let mut ranges: Vec<RangeInclusive<u16>> = Vec::new();
    for &port in ports {
        match ranges.last_mut() {
            Some(last) if u32::from(*last.end()) + 1 == u32::from(port) => {
                *last = *last.start()..=port;
            }
            _ => ranges.push(port..=port),
        }
    }
    ranges
}

/// This namespace's ephemeral port range and reserved ports.
fn local_ports() -> anyhow::Result<(RangeInclusive<u16>, Vec<RangeInclusive<u16>>)> {
    let range = read_sysctl(LOCAL_PORT_RANGE)?;
    let mut bounds = range.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(first)), Some(Ok(last))) = (bounds.next(), bounds.next()) else {
        anyhow::bail!("{LOCAL_PORT_RANGE}: {range:?} is not two ports");
    };
    let reserved = read_sysctl(LOCAL_RESERVED_PORTS)?;
    let reserved =
        parse_port_list(&reserved).with_context(|| format!("parsing {LOCAL_RESERVED_PORTS}"))?;
    Ok((first..=last, reserved))
}

/// Takes the ports of `lb_ports` that the node would hand out as ephemeral ports out of its
/// ephemeral range (`ip_local_reserved_ports`, keeping what it reserves already), and returns
/// them (empty: nothing to do). A connection of the node's own from a NodePort would have its
/// answers taken for the Service's (UDP, and TCP where XDP's socket check does not reach), and
/// one from a SNAT port could share a SNAT flow's tuple at the endpoint.
pub fn reserve_lb_ports(
    lb_ports: &[RangeInclusive<u16>],
) -> anyhow::Result<Vec<RangeInclusive<u16>>> {
    let (ephemeral, reserved) = local_ports()?;
    let Some((missing, list)) = reservation(&ephemeral, &reserved, lb_ports)? else {
        return Ok(Vec::new());
    };
    std::fs::write(LOCAL_RESERVED_PORTS, &list)
        .with_context(|| format!("writing {list:?} to {LOCAL_RESERVED_PORTS}"))?;
    Ok(missing)
}

/// What [`reserve_lb_ports`] adds to `reserved` and the list it writes (None: nothing to add).
/// Refused when it would leave the node fewer than half of its ephemeral ports, or none of
/// them: a NodePort range as wide as the ephemeral range would starve the node's own
/// connections (connect fails with EADDRNOTAVAIL), which is worse than the clash it avoids.
fn reservation(
    ephemeral: &RangeInclusive<u16>,
    reserved: &[RangeInclusive<u16>],
    lb_ports: &[RangeInclusive<u16>],
) -> anyhow::Result<Option<(Vec<RangeInclusive<u16>>, String)>> {
    let missing = unreserved_ephemeral(ephemeral, reserved, lb_ports);
    if missing.is_empty() {
        return Ok(None);
    }
    let mut all: Vec<u16> = reserved
        .iter()
        .chain(&missing)
        .flat_map(|range| range.clone())
        .collect();
    all.sort_unstable();
    all.dedup();
    let ephemeral_count = ephemeral.clone().count();
    let left = ephemeral_count - all.iter().filter(|port| ephemeral.contains(port)).count();
    anyhow::ensure!(
        left * 2 >= ephemeral_count && left > 0,
        "not reserving {}: it would leave {left} of the node's {ephemeral_count} ephemeral ports \
         ({}-{}); narrow the NodePort or SNAT range, or move net.ipv4.ip_local_port_range off them",
        format_port_list(&missing),
        ephemeral.start(),
        ephemeral.end()
    );
    Ok(Some((missing, format_port_list(&merge_ports(&all)))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_port_lists_read_and_write_as_the_kernel_does() {
        assert_eq!(
            parse_port_list("\n").unwrap(),
            Vec::<RangeInclusive<u16>>::new()
        );
        assert_eq!(
            parse_port_list("22,30000-32767,65535\n").unwrap(),
            vec![22..=22, 30000..=32767, 65535..=65535]
        );
        for bad in ["x", "5-3", "1-", "70000", "1-2-3"] {
            assert!(parse_port_list(bad).is_err(), "{bad}");
        }
        assert_eq!(
            format_port_list(&[22..=22, 30000..=32767]),
            "22,30000-32767"
        );
        assert_eq!(format_port_list(&[]), "");
    }

    #[test]
    fn only_ephemeral_unreserved_ports_of_lbs_ranges_are_to_reserve() {
        let lb_ports = [30000..=32767, 61000..=65535];
        // Linux's default range covers neither.
        assert!(unreserved_ephemeral(&(32768..=60999), &[], &lb_ports).is_empty());
        // A wide range covers both, up to its end.
        assert_eq!(
            unreserved_ephemeral(&(10000..=65000), &[], &lb_ports),
            vec![30000..=32767, 61000..=65000]
        );
        // What is reserved already stays out, and so do ports outside the range.
        assert_eq!(
            unreserved_ephemeral(&(1024..=65535), &[31000..=31999, 61000..=65535], &lb_ports),
            vec![30000..=30999, 32000..=32767]
        );
        // Overlapping and adjacent wanted ranges merge.
        assert_eq!(
            unreserved_ephemeral(
                &(1024..=65535),
                &[],
                &[100..=2000, 1500..=3000, 3001..=3001]
            ),
            vec![1024..=3001]
        );
        let everything = [0..=9999, 10000..=65535];
        assert!(unreserved_ephemeral(&(1024..=65535), &everything, &lb_ports).is_empty());
    }

    #[test]
    fn a_reservation_keeps_the_nodes_list_and_never_takes_most_of_its_ephemeral_ports() {
        let lb_ports = [30000..=32767, 61000..=65535];
        let own = [22..=22, 80..=80];
        assert_eq!(
            reservation(&(32768..=60999), &own, &lb_ports).unwrap(),
            None
        );
        let (added, list) = reservation(&(10000..=65000), &[22..=22, 40000..=40009], &lb_ports)
            .unwrap()
            .expect("ports to reserve");
        assert_eq!(added, vec![30000..=32767, 61000..=65000]);
        assert_eq!(list, "22,30000-32767,40000-40009,61000-65000");
        // A NodePort range over most of the ephemeral one would starve the node's connections.
        let wide = [30000..=60000, 61000..=65535];
        let refused = reservation(&(32768..=60999), &[], &wide).unwrap_err();
        assert!(
            format!("{refused:#}")
                .contains("it would leave 999 of the node's 28232 ephemeral ports"),
            "{refused:#}"
        );
        // Half of them left is still taken.
        let half = [32768..=40000, 40001..=46883];
        assert!(reservation(&(32768..=60999), &[], &half).unwrap().is_some());
    }

    #[test]
    fn interface_names_are_what_the_kernel_accepts() {
        for name in ["eth0", "enp0s31f6", "a-15-byte-name0", "veth@1"] {
            assert!(is_interface_name(name), "{name}");
        }
        for name in ["", ".", "..", "a-16-byte-name00", "eth0:1", "../all", "a b"] {
            assert!(!is_interface_name(name), "{name}");
        }
        assert!(accept_local_path("../../kernel").is_err());
        for every_interface in ["all", "default"] {
            assert!(
                accept_local_path(every_interface).is_err(),
                "{every_interface}"
            );
        }
    }

    #[test]
    fn a_missing_requirement_is_reported_when_it_goes_missing_and_when_it_is_back() {
        let forwarding_off = MissingRequirement {
            requirement: "ip_forward",
            interface: "eth0".into(),
            sysctl: "net.ipv4.conf.eth0.forwarding".into(),
            value: "0".into(),
            want: "1".into(),
            effect: "",
        };
        let mut watch = RequirementWatch::default();
        let first = watch.update(std::slice::from_ref(&forwarding_off));
        assert_eq!(first.newly_missing, std::slice::from_ref(&forwarding_off));
        assert!(first.back.is_empty());
        assert_eq!(
            watch.update(std::slice::from_ref(&forwarding_off)),
            RequirementChanges::default(),
            "still missing: nothing new to say"
        );
        let fixed = watch.update(&[]);
        assert_eq!(fixed.back, [("ip_forward", "eth0".to_owned())]);
        assert!(fixed.newly_missing.is_empty());
    }

    const HOST_MOUNTS: &str = "\
22 27 0:21 / /proc rw,relatime shared:5 - proc proc rw
23 27 0:22 / /sys rw,relatime shared:6 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime shared:7 - cgroup2 cgroup2 rw
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
44 27 0:40 / /run/my\\040dir rw master:3 - tmpfs tmpfs rw
";

    #[test]
    fn mountinfo_tells_a_bare_sys_and_whether_a_new_mount_propagates() {
        let host = Mounts::parse(HOST_MOUNTS);
        assert_eq!(host.0.len(), 5);
        assert_eq!(host.0[4].mount_point, Path::new("/run/my dir"));
        assert!(!host.0[4].shared, "master: is a slave, not shared");
        assert_eq!(host.bare_sys_hint(Path::new("/sys/fs/bpf/lb")), "");
        assert!(host.new_mount_outlives_namespace(Path::new("/sys/fs/bpf"), false));

        // `ip netns exec`: a fresh sysfs on /sys, slave mounts, nothing below /sys.
        let netns_exec = Mounts::parse(
            "300 299 254:0 / / rw,relatime master:1 - ext4 /dev/vda rw\n\
             301 300 0:50 / /sys rw,relatime - sysfs ns1 rw\n",
        );
        assert!(
            netns_exec
                .bare_sys_hint(Path::new("/sys/fs/cgroup"))
                .contains("nsenter --net=")
        );
        assert_eq!(netns_exec.bare_sys_hint(Path::new("/run/lb/cgroup2")), "");
        assert!(!netns_exec.new_mount_outlives_namespace(Path::new("/sys/fs/bpf"), false));
        assert!(netns_exec.new_mount_outlives_namespace(Path::new("/sys/fs/bpf"), true));
    }
}
