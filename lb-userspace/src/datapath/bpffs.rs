//! The BPF filesystem where programs and maps are pinned so they outlive the agent.
//!
//! Whoever can write the pin directory can replace the datapath's maps and programs, and whoever
//! can read it can open them: bpffs is mounted with mode 0700 and the pin directory is created
//! 0700, owned by the agent's user (root). The agent refuses a pin directory that is not on
//! bpffs or belongs to another user.

use std::{
    ffi::CString,
    io,
    os::unix::{
        ffi::OsStrExt as _,
        fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
};

/// Where the kernel conventionally mounts bpffs.
pub const DEFAULT_MOUNT: &str = "/sys/fs/bpf";

/// The mode of a bpffs this agent mounts and of its pin directory: root alone.
pub const PRIVATE_MODE: u32 = 0o700;

/// `f_type` of a bpffs mount (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("statfs {path}")]
    Statfs { path: String, source: io::Error },
    #[error("mount -t bpf bpf {path}")]
    Mount { path: String, source: io::Error },
    #[error("creating pin directory {path}")]
    Create { path: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    Inspect { path: PathBuf, source: io::Error },
    #[error(
        "pin directory {path} is not on bpffs (statfs f_type {f_type:#x}, not {BPF_FS_MAGIC:#x})"
    )]
    NotBpffs { path: PathBuf, f_type: i64 },
    #[error("pin directory {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error(
        "pin directory {path} is owned by uid {owner}, not by this process's uid {uid}: \
         refusing pins another user can replace"
    )]
    ForeignOwner { path: PathBuf, owner: u32, uid: u32 },
}

/// Whether `path` is the root of (or inside) a bpffs mount.
pub fn is_mounted(path: &Path) -> Result<bool, BpffsError> {
    Ok(filesystem_type(path)? == BPF_FS_MAGIC)
}

/// `f_type` of the filesystem `path` is on.
fn filesystem_type(path: &Path) -> Result<i64, BpffsError> {
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
    Ok(stat.f_type)
}

/// Mounts bpffs at `path`, mode 0700, unless one is already there. Machines of this project boot
/// without it.
pub fn ensure_mounted(path: &Path) -> Result<(), BpffsError> {
    if is_mounted(path)? {
        return Ok(());
    }
    match mount(path) {
        // Two callers racing: the loser fails, and the mount it wanted is there all the same.
        Err(error) if is_mounted(path)? => {
            tracing::debug!(%error, "bpffs mounted meanwhile by another process");
            Ok(())
        }
        result => result,
    }
}

/// Mounts a new bpffs instance at `path` with mode 0700.
pub fn mount(path: &Path) -> Result<(), BpffsError> {
    let c_path = c_path(path);
    let options = CString::new(format!("mode={PRIVATE_MODE:o}")).unwrap_or_default();
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c_path.as_ptr(),
            c"bpf".as_ptr(),
            0,
            options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(BpffsError::Mount {
            path: path.display().to_string(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Creates the pin directory (and missing parents) with mode 0700 when it is not there, then
/// requires it to be [`check_pin_dir`]-worthy and narrows its mode to 0700 (a directory made by
/// an earlier release, or by hand, may be wider).
pub fn create_pin_dir(path: &Path) -> Result<(), BpffsError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_MODE)
        .create(path)
        .map_err(|source| BpffsError::Create {
            path: path.to_owned(),
            source,
        })?;
    let metadata = check_pin_dir(path)?;
    if metadata.mode() & 0o7777 != PRIVATE_MODE {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(PRIVATE_MODE)).map_err(
            |source| BpffsError::Inspect {
                path: path.to_owned(),
                source,
            },
        )?;
    }
    Ok(())
}

/// Refuses a pin directory that is not a directory on bpffs owned by this process's user: pins
/// elsewhere would not outlive the agent or would not be pins at all, and pins in another user's
/// directory could be swapped under the agent.
pub fn check_pin_dir(path: &Path) -> Result<std::fs::Metadata, BpffsError> {
    let metadata = std::fs::symlink_metadata(path).map_err(|source| BpffsError::Inspect {
        path: path.to_owned(),
        source,
    })?;
    if !metadata.is_dir() {
        return Err(BpffsError::NotADirectory {
            path: path.to_owned(),
        });
    }
    let f_type = filesystem_type(path)?;
    if f_type != BPF_FS_MAGIC {
        return Err(BpffsError::NotBpffs {
            path: path.to_owned(),
            f_type,
        });
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if metadata.uid() != uid {
        return Err(BpffsError::ForeignOwner {
            path: path.to_owned(),
            owner: metadata.uid(),
            uid,
        });
    }
    Ok(metadata)
}

/// Whether `path` is where a filesystem is mounted (its parent is on another device), or `/`.
pub fn is_mount_root(path: &Path) -> Result<bool, BpffsError> {
    let Some(parent) = path.parent() else {
        return Ok(true);
    };
    let device = |path: &Path| {
        std::fs::metadata(path)
            .map(|metadata| metadata.dev())
            .map_err(|source| BpffsError::Inspect {
                path: path.to_owned(),
                source,
            })
    };
    Ok(device(path)? != device(parent)?)
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}

/// A bpffs of one unit test's own: a new bpffs instance mounted in a private mount namespace of
/// a thread made for the purpose, so the machine's /sys/fs/bpf is never touched and the mount
/// goes with the thread. (The integration tests have the same in `lab::private_bpffs`.)
#[cfg(test)]
pub(crate) fn with_private_bpffs<T: Send>(test: impl FnOnce(&Path) -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: no memory-safety preconditions; CLONE_NEWNS applies to this thread.
                let rc = unsafe { libc::unshare(libc::CLONE_NEWNS) };
                assert_eq!(rc, 0, "unshare (root?): {}", io::Error::last_os_error());
                // SAFETY: NUL-terminated literal; null source, type and data are allowed for a
                // change of propagation. Nothing mounted here propagates to the machine.
                let rc = unsafe {
                    libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    )
                };
                assert_eq!(rc, 0, "{}", io::Error::last_os_error());
                let dir = std::env::temp_dir().join(format!(
                    "lb-unit-bpffs-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                std::fs::create_dir(&dir).expect("mount point");
                struct Unmount(PathBuf);
                impl Drop for Unmount {
                    fn drop(&mut self) {
                        let path = c_path(&self.0);
                        // SAFETY: a NUL-terminated path that outlives the call.
                        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
                        let _ = std::fs::remove_dir(&self.0);
                    }
                }
                let guard = Unmount(dir);
                mount(&guard.0).expect("mount -t bpf");
                test(&guard.0)
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
