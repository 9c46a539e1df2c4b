//! The NICs as the kernel names them: whether a name is an interface name, a NIC's ifindex and
//! MAC, for attaching XDP to it, and its driver, for choosing how.

use super::error::{DatapathError, Result};

/// What the kernel accepts as an interface name (`dev_valid_name` in net/core/dev.c). A name is
/// checked before it becomes part of a path under /proc/sys.
pub fn is_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name.contains(['/', ':'])
        && !name.chars().any(char::is_whitespace)
}

/// The ifindex and MAC of a NIC of the calling thread's network namespace (through the kernel,
/// not /sys, which shows the namespace it was mounted in).
pub(super) fn nic_address(iface: &str) -> Result<(u32, [u8; 6])> {
    let name = interface_name(iface)?;
    let not_found = || DatapathError::InterfaceName(iface.to_owned());
    // SAFETY: name is a NUL-terminated string that outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(not_found());
    }
    let socket = ioctl_socket().ok_or_else(not_found)?;
    let mut request = ifreq(&name).ok_or_else(not_found)?;
    // SAFETY: SIOCGIFHWADDR reads ifr_name and writes ifr_hwaddr of this ifreq.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SIOCGIFHWADDR,
            &mut request,
        )
    };
    if rc != 0 {
        return Err(not_found());
    }
    // SAFETY: on success the kernel filled the hardware-address member of the union.
    let hwaddr = unsafe { request.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (byte, value) in mac.iter_mut().zip(hwaddr.sa_data) {
        *byte = value as u8;
    }
    Ok((ifindex, mac))
}

/// The driver of a NIC of the calling thread's network namespace, as `ethtool -i` names it
/// (SIOCETHTOOL with ETHTOOL_GDRVINFO, include/uapi/linux/ethtool.h), e.g. `veth`.
pub fn driver(iface: &str) -> std::io::Result<String> {
    let name = interface_name(iface).map_err(std::io::Error::other)?;
    let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidInput, iface.to_owned());
    let socket = ioctl_socket().ok_or_else(std::io::Error::last_os_error)?;
    let mut request = ifreq(&name).ok_or_else(invalid)?;
    let mut info = DriverInfo {
        cmd: ETHTOOL_GDRVINFO,
        ..DriverInfo::default()
    };
    request.ifr_ifru.ifru_data = (&raw mut info).cast();
    // SAFETY: SIOCETHTOOL reads ifr_name and the command at ifru_data, and fills the
    // ethtool_drvinfo there, which lives until the call returns.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SIOCETHTOOL,
            &mut request,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let len = info
        .driver
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(info.driver.len());
    Ok(String::from_utf8_lossy(&info.driver[..len]).into_owned())
}

/// include/uapi/linux/ethtool.h.
const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;

/// `struct ethtool_drvinfo` (include/uapi/linux/ethtool.h).
#[derive(Default)]
#[repr(C)]
struct DriverInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// A datagram socket for interface ioctls, closed when dropped.
fn ioctl_socket() -> Option<std::os::fd::OwnedFd> {
    // SAFETY: a plain socket call; the descriptor is owned right away.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    // SAFETY: socket is a descriptor we just opened and own.
    (socket >= 0)
        .then(|| unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(socket) })
}

/// An all-zero `ifreq` naming the interface; None for a name too long for it.
fn ifreq(name: &std::ffi::CStr) -> Option<libc::ifreq> {
    // SAFETY: an all-zero ifreq is valid; the name is copied in below, NUL-terminated.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.to_bytes();
    if bytes.len() >= request.ifr_name.len() {
        return None;
    }
    for (slot, byte) in request.ifr_name.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    Some(request)
}

pub(super) fn interface_name(iface: &str) -> Result<std::ffi::CString> {
    std::ffi::CString::new(iface).map_err(|_| DatapathError::InterfaceName(iface.to_owned()))
}
