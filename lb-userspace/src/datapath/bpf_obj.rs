//! BPF_OBJ_GET with the descriptor's access mode: aya 0.16's `MapData::from_pin` always opens a
//! pin read-write, and the inspection commands must not be able to write at all.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

/// include/uapi/linux/bpf.h, `enum bpf_cmd`.
const BPF_OBJ_GET: libc::c_long = 7;

/// include/uapi/linux/bpf.h: `file_flags` of BPF_OBJ_GET.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Access {
    ReadWrite = 0,
    /// BPF_F_RDONLY: lookups and iteration only; the kernel answers every update and delete
    /// through this descriptor with EPERM (`map_get_sys_perms` in kernel/bpf/syscall.c).
    ReadOnly = 1 << 3,
}

/// The `obj_get` member of `union bpf_attr`.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    /// Explicit, zeroed: the kernel wants every byte after the member it uses to be zero.
    _pad: u32,
}

/// A descriptor of the object (map, program or link) pinned at `path`.
pub fn open_pinned(path: &Path, access: Access) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
    let attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: access as u32,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: bpf(2) reads size_of::<ObjGetAttr>() bytes of a live, fully initialised attr (no
    // implicit padding) and the NUL-terminated path it points to, both alive for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw const attr,
            size_of::<ObjGetAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor BPF_OBJ_GET returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
