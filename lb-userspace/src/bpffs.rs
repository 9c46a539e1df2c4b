//! The BPF filesystem where programs and maps are pinned so they outlive the agent.

use std::{ffi::CString, io, os::unix::ffi::OsStrExt as _, path::Path};

/// Where the kernel conventionally mounts bpffs.
pub const DEFAULT_MOUNT: &str = "/sys/fs/bpf";

/// `f_type` of a bpffs mount (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("statfs {path}")]
    Statfs { path: String, source: io::Error },
    #[error("mount -t bpf bpf {path}")]
    Mount { path: String, source: io::Error },
}

/// Whether `path` is the root of (or inside) a bpffs mount.
pub fn is_mounted(path: &Path) -> Result<bool, BpffsError> {
    let c_path = c_path(path);
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: c_path is NUL-terminated and stat points to writable memory of the right type.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(BpffsError::Statfs {
            path: path.display().to_string(),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: statfs returned 0, so it filled the struct.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.f_type == BPF_FS_MAGIC)
}

/// Mounts bpffs at `path` unless one is already there. Machines of this project boot without it.
pub fn ensure_mounted(path: &Path) -> Result<(), BpffsError> {
    if is_mounted(path)? {
        return Ok(());
    }
    let c_path = c_path(path);
    // SAFETY: all pointers are NUL-terminated strings that outlive the call; data may be null.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c_path.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let source = io::Error::last_os_error();
        // Two callers racing: the loser fails, and the mount it wanted is there all the same.
        if !is_mounted(path)? {
            return Err(BpffsError::Mount {
                path: path.display().to_string(),
                source,
            });
        }
    }
    Ok(())
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}
