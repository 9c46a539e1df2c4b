//! The names the agent pins under its pin directory, and `lb run --cleanup`, which removes those
//! names and nothing else.
//!
//! `--cleanup` runs as root with a path from the command line: a mistyped `--pin-dir /` or
//! `--pin-dir /sys/fs/bpf` must not empty the machine or another tool's pins. So it works only on
//! a pin directory (a directory on bpffs, owned by this user, not the root of the mount), removes
//! only the names the agent creates, and leaves anything else where it is.

use std::{
    io,
    path::{Path, PathBuf},
};

use lb_common::{map_names, program_names};

use super::{bpffs, nic::is_interface_name};

/// Subdirectory of the pin directory holding the pinned attachments (bpf_links).
pub const LINKS_DIR: &str = "links";

/// Programs pinned directly under the pin directory, by their names.
pub const PROGRAMS: [&str; 30] = [
    program_names::XDP_LB,
    program_names::XDP_LOOKUP,
    program_names::XDP_DSR,
    program_names::XDP_DIRECT,
    program_names::XDP_TOO_BIG,
    program_names::XDP_UDP,
    program_names::XDP_SCTP,
    program_names::XDP6,
    program_names::XDP6_UDP,
    program_names::XDP6_SCTP,
    program_names::XDP6_FRONTEND,
    program_names::XDP6_FLOW,
    program_names::XDP6_DELIVER,
    program_names::XDP6_ICMP,
    program_names::XDP6_DIRECT_TCP,
    program_names::XDP6_DIRECT_UDP,
    program_names::XDP6_DIRECT_SCTP,
    program_names::TC_EGRESS,
    program_names::TC_EGRESS6,
    program_names::TC_EGRESS6_DIRECT,
    program_names::CONNECT4,
    program_names::SENDMSG4,
    program_names::RECVMSG4,
    program_names::GETPEERNAME4,
    program_names::CONNECT6,
    program_names::SENDMSG6,
    program_names::RECVMSG6,
    program_names::GETPEERNAME6,
    program_names::SOCK_EGRESS4,
    program_names::SOCK_RELEASE,
];

/// Links of the cgroup hooks under `links/`, by their programs' names.
const CGROUP_LINKS: [&str; 10] = [
    program_names::CONNECT4,
    program_names::SENDMSG4,
    program_names::RECVMSG4,
    program_names::GETPEERNAME4,
    program_names::CONNECT6,
    program_names::SENDMSG6,
    program_names::RECVMSG6,
    program_names::GETPEERNAME6,
    program_names::SOCK_EGRESS4,
    program_names::SOCK_RELEASE,
];

const XDP_LINK_PREFIX: &str = "xdp-";
const TC_EGRESS_LINK_PREFIX: &str = "tc-egress-";

/// The pin (under `links/`) of the XDP link on `iface`.
pub fn xdp_link_name(iface: &str) -> String {
    format!("{XDP_LINK_PREFIX}{iface}")
}

/// The pin (under `links/`) of the tc egress link on `iface`.
pub fn tc_egress_link_name(iface: &str) -> String {
    format!("{TC_EGRESS_LINK_PREFIX}{iface}")
}

/// Whether the agent pins something named `name` directly under its pin directory: a map of
/// this release or a retired one, or a program.
pub fn is_agent_pin(name: &str) -> bool {
    map_names::PINNED.contains(&name)
        || name == map_names::SERVICE_NAMES
        || map_names::RETIRED.contains(&name)
        || map_names::RETIRED_AFTER_SYNC.contains(&name)
        || PROGRAMS.contains(&name)
        // A program array staged by `Datapath::pin_program_arrays`, left by a crash.
        || name
            .strip_suffix("_new")
            .is_some_and(|array| [map_names::XDP_PROGRAMS, map_names::TC_PROGRAMS].contains(&array))
}

/// The interfaces whose XDP link is pinned under `pin_dir`'s `links/` (none when it has no
/// `links/`).
pub fn xdp_link_interfaces(pin_dir: &Path) -> io::Result<Vec<String>> {
    let entries = match std::fs::read_dir(pin_dir.join(LINKS_DIR)) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let mut interfaces = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        if let Some(iface) = name
            .to_str()
            .and_then(|name| name.strip_prefix(XDP_LINK_PREFIX))
        {
            interfaces.push(iface.to_owned());
        }
    }
    Ok(interfaces)
}

/// Whether the agent pins a link named `name` under `links/`.
pub fn is_agent_link(name: &str) -> bool {
    CGROUP_LINKS.contains(&name)
        || [XDP_LINK_PREFIX, TC_EGRESS_LINK_PREFIX]
            .iter()
            .filter_map(|prefix| name.strip_prefix(prefix))
            .any(is_interface_name)
}

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("refusing to clean up {path}: {reason}")]
    Refused { path: PathBuf, reason: String },
    #[error(transparent)]
    Bpffs(#[from] bpffs::BpffsError),
    #[error("removing {path}")]
    Remove { path: PathBuf, source: io::Error },
    #[error(
        "removed {removed} pins of lb; kept {path}: it holds names lb does not create: {}",
        .foreign.join(", ")
    )]
    ForeignEntries {
        path: PathBuf,
        removed: usize,
        foreign: Vec<String>,
    },
}

/// What [`remove`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Cleanup {
    /// The pin directory was not there: nothing to do.
    Absent,
    /// These many pins were removed, then the directory itself.
    Removed(usize),
}

/// Removes the agent's pins (which detaches the datapath: the pinned links were all that kept
/// it attached) and then the pin directory, if nothing else is in it.
pub fn remove(pin_dir: &Path) -> Result<Cleanup, CleanupError> {
    let refused = |path: &Path, reason: &str| CleanupError::Refused {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if pin_dir.parent().is_none() {
        return Err(refused(pin_dir, "the root directory is no pin directory"));
    }
    // Symlinks resolved first: the checks apply to the directory entries are removed from.
    let pin_dir = match std::fs::canonicalize(pin_dir) {
        Ok(path) => path,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Cleanup::Absent),
        Err(source) => {
            return Err(CleanupError::Remove {
                path: pin_dir.to_owned(),
                source,
            });
        }
    };
    if pin_dir.parent().is_none() {
        return Err(refused(&pin_dir, "the root directory is no pin directory"));
    }
    bpffs::check_pin_dir(&pin_dir)?;
    if bpffs::is_mount_root(&pin_dir)? {
        return Err(refused(
            &pin_dir,
            "it is a bpffs mount itself, not a pin directory in one (e.g. /sys/fs/bpf/lb)",
        ));
    }

    let mut removed = 0;
    let mut foreign = Vec::new();
    let links = pin_dir.join(LINKS_DIR);
    if links.exists() {
        bpffs::check_pin_dir(&links)?;
        removed += remove_entries(&links, is_agent_link, &mut foreign)?;
        if foreign.is_empty() {
            remove_dir(&links)?;
        }
    }
    removed += remove_entries(
        &pin_dir,
        |name| is_agent_pin(name) || name == LINKS_DIR,
        &mut foreign,
    )?;
    if !foreign.is_empty() {
        return Err(CleanupError::ForeignEntries {
            path: pin_dir,
            removed,
            foreign,
        });
    }
    remove_dir(&pin_dir)?;
    Ok(Cleanup::Removed(removed))
}

/// Unlinks the pins of `dir` whose names `ours` accepts (a directory among them is left for the
/// caller); the names of everything else go to `foreign`, as paths.
fn remove_entries(
    dir: &Path,
    ours: impl Fn(&str) -> bool,
    foreign: &mut Vec<String>,
) -> Result<usize, CleanupError> {
    let entries = std::fs::read_dir(dir).map_err(|source| CleanupError::Remove {
        path: dir.to_owned(),
        source,
    })?;
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(|source| CleanupError::Remove {
            path: dir.to_owned(),
            source,
        })?;
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|kind| kind.is_dir());
        match entry.file_name().to_str() {
            Some(name) if ours(name) && !is_dir => {
                std::fs::remove_file(&path)
                    .map_err(|source| CleanupError::Remove { path, source })?;
                removed += 1;
            }
            Some(name) if ours(name) => {}
            _ => foreign.push(path.display().to_string()),
        }
    }
    Ok(removed)
}

fn remove_dir(path: &Path) -> Result<(), CleanupError> {
    std::fs::remove_dir(path).map_err(|source| CleanupError::Remove {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interfaces_with_a_pinned_xdp_link_are_read_from_the_link_names() {
        let dir = std::env::temp_dir().join(format!("lb-pins-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            xdp_link_interfaces(&dir).expect("no directory"),
            Vec::<String>::new()
        );
        std::fs::create_dir_all(dir.join(LINKS_DIR)).expect("links");
        for name in [
            xdp_link_name("eth0"),
            xdp_link_name("eth1"),
            tc_egress_link_name("eth0"),
            "cgroup-connect4".into(),
        ] {
            std::fs::write(dir.join(LINKS_DIR).join(name), b"").expect("pin stand-in");
        }
        let mut interfaces = xdp_link_interfaces(&dir).expect("read");
        interfaces.sort();
        std::fs::remove_dir_all(&dir).expect("clean up");
        assert_eq!(interfaces, ["eth0", "eth1"]);
    }

    #[test]
    fn the_names_the_agent_pins_are_its_own_and_nothing_else_is() {
        for name in [
            "lb4_fe_v1",
            "lb_svc_name_v1",
            "lb_cfg_v1",
            "lb_xdp",
            "lb_sock_release",
        ] {
            assert!(is_agent_pin(name), "{name}");
        }
        for name in ["links", "cilium_calls", "lb4_fe_v9", "", "..", "lb_xdp.bak"] {
            assert!(!is_agent_pin(name), "{name}");
        }
        for name in [
            xdp_link_name("eth0"),
            tc_egress_link_name("enp0s31f6"),
            xdp_link_name("a-15-byte-name0"),
            "lb_connect4".to_owned(),
        ] {
            assert!(is_agent_link(&name), "{name}");
        }
        for name in [
            "xdp-",
            "xdp-..",
            "xdp-a-16-byte-name00",
            "xdp-eth0:1",
            "tc-ingress-eth0",
            "lb_xdp",
            "other",
        ] {
            assert!(!is_agent_link(name), "{name}");
        }
    }
}
