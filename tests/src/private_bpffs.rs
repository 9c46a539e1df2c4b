//! A bpffs of one test's own, that nothing else sees: a new bpffs instance mounted in a private
//! mount namespace of a thread made for the purpose. The machine's /sys/fs/bpf is not touched,
//! processes the thread starts see the mount (a child inherits its parent thread's mount
//! namespace), and the mount goes when the thread ends, even if the guard never runs.

use std::{
    io,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

/// Runs `test` on a thread with a private mount namespace, given the path of a new bpffs
/// instance mounted there (mode 0700, as `lb init-node` mounts it). The mount point is a
/// directory of its own under the temporary directory, unmounted and removed afterwards.
pub fn with_private_bpffs<T: Send>(test: impl FnOnce(&Path) -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter_private_mount_namespace().expect("a private mount namespace (needs root)");
                let mount = BpffsMount::new().expect("a private bpffs");
                test(&mount.path)
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// A directory of the temporary directory with a new bpffs on it; unmounted and removed on drop.
pub struct BpffsMount {
    path: PathBuf,
}

impl BpffsMount {
    fn new() -> anyhow::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "lb-private-bpffs-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path)?;
        let mount = Self { path };
        lb_userspace::datapath::bpffs::mount(&mount.path)?;
        Ok(mount)
    }
}

impl Drop for BpffsMount {
    fn drop(&mut self) {
        let path = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes())
            .expect("a path without NUL");
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Moves the calling thread (only) into a new mount namespace in which no mount event
/// propagates back to the machine's.
fn enter_private_mount_namespace() -> io::Result<()> {
    // SAFETY: unshare has no memory-safety preconditions; CLONE_NEWNS applies to this thread,
    // which unshares its filesystem context along with it.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: NUL-terminated literals; null source, type and data are allowed for a change of
    // propagation.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
