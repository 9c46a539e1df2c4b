//! What the node's kernel must be set to for the datapath, apart from the datapath itself:
//! `net.ipv4.conf.<iface>.accept_local` on every interface XDP is attached to.
//!
//! In the DaemonSet the agent cannot write sysctls (the runtime mounts /proc/sys read-only in an
//! unprivileged container); the privileged init container (`lb init-node`) sets them, and the
//! agent only checks. Run as root outside a container, the agent sets them itself.

use std::{io, path::PathBuf};

use anyhow::Context as _;

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

/// `/proc/sys/net/ipv4/conf/<iface>/accept_local`, of the caller's network namespace.
fn accept_local_path(iface: &str) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(
        is_interface_name(iface),
        "{iface:?} is not an interface name"
    );
    Ok(PathBuf::from("/proc/sys/net/ipv4/conf")
        .join(iface)
        .join("accept_local"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_what_the_kernel_accepts() {
        for name in ["eth0", "enp0s31f6", "a-15-byte-name0", "veth@1"] {
            assert!(is_interface_name(name), "{name}");
        }
        for name in ["", ".", "..", "a-16-byte-name00", "eth0:1", "../all", "a b"] {
            assert!(!is_interface_name(name), "{name}");
        }
        assert!(accept_local_path("../../kernel").is_err());
    }
}
