//! The NICs as the kernel names them: whether a name is an interface name, and a NIC's ifindex
//! and MAC, for attaching XDP to it.

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
    // SAFETY: a plain socket call; the descriptor is owned (and closed) right away.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if socket < 0 {
        return Err(not_found());
    }
    // SAFETY: socket is a descriptor we just opened and own.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(socket) };
    // SAFETY: an all-zero ifreq is valid; the name is copied in below, NUL-terminated.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= request.ifr_name.len() {
        return Err(not_found());
    }
    for (slot, byte) in request.ifr_name.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
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

pub(super) fn interface_name(iface: &str) -> Result<std::ffi::CString> {
    std::ffi::CString::new(iface).map_err(|_| DatapathError::InterfaceName(iface.to_owned()))
}
