//! BPF_LINK_UPDATE on a pinned link, for the program types whose aya 0.16 links cannot take a
//! new program (cgroup skb and cgroup sock links have no `attach_to_link`, and `FdLink` does not
//! expose its descriptor): the pin is opened with BPF_OBJ_GET and the link updated in place, so
//! a restarted agent swaps its programs in without ever detaching them.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
    path::Path,
};

/// include/uapi/linux/bpf.h, `enum bpf_cmd`.
const BPF_LINK_UPDATE: libc::c_long = 29;

/// The `link_update` member of `union bpf_attr`.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Replaces the program of the bpf_link pinned at `path` with `program`.
pub fn update_pinned(path: &Path, program: BorrowedFd<'_>) -> io::Result<()> {
    let link = super::bpf_obj::open_pinned(path, super::bpf_obj::Access::ReadWrite)?;
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: bpf(2) reads size_of::<LinkUpdateAttr>() bytes of a live, fully initialised attr
    // (four u32, no padding); the descriptors are open for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &raw const attr,
            size_of::<LinkUpdateAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
