//! The pin directory and `lb run --cleanup`, on bpffs mounts of the tests' own
//! (`lab::private_bpffs`: private mount namespaces; the machine's /sys/fs/bpf is never touched):
//! the directory is created 0700 and refused off bpffs or when another user owns it, and the
//! cleanup removes the agent's names and nothing else, from a pin directory and nowhere else.

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
    process::{Command, Output},
};

use aya::maps::{HashMap, MapData};
use lab::{peer::sibling_binary, private_bpffs::with_private_bpffs};
use lb_common::map_names;
use lb_userspace::datapath::{
    Datapath,
    bpffs::{self, BpffsError},
    pins::LINKS_DIR,
};

/// A small map pinned at `path`, as another tool (or an older agent) would leave one.
fn pin_map(path: &Path) {
    HashMap::<MapData, u32, u32>::create(1, 0)
        .expect("create a map")
        .pin(path)
        .unwrap_or_else(|error| panic!("pin {}: {error}", path.display()));
}

/// `lb run --cleanup --source file`: the pins alone, no API server to remove a DSR mark from.
fn cleanup(pin_dir: &Path) -> Output {
    Command::new(sibling_binary("lb").expect("lb binary"))
        .args(["run", "--cleanup", "--source", "file", "--pin-dir"])
        .arg(pin_dir)
        .env_clear()
        .output()
        .expect("lb run --cleanup")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The permission bits; the sticky bit that a bpffs root always has (`bpf_fill_super` in
/// kernel/bpf/inode.c adds S_ISVTX to the mode option) is left out.
fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("metadata").mode() & 0o777
}

#[test]
fn bpffs_and_the_pin_directory_are_root_only() {
    with_private_bpffs(|bpffs| {
        // Mounted the way `lb init-node` and the agent mount it.
        assert_eq!(mode(bpffs), 0o700);
        let pin_dir = bpffs.join("lb");
        let datapath = Datapath::load(&pin_dir).expect("datapath");
        assert_eq!(mode(&pin_dir), 0o700);
        assert_eq!(std::fs::metadata(&pin_dir).expect("pins").uid(), 0);
        drop(datapath);

        // A directory made wider by someone else (or an older release) is narrowed.
        let wide = bpffs.join("wide");
        std::fs::create_dir(&wide).expect("mkdir");
        std::fs::set_permissions(&wide, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        bpffs::create_pin_dir(&wide).expect("an existing pin directory");
        assert_eq!(mode(&wide), 0o700);
    });
}

#[test]
fn a_pin_directory_off_bpffs_or_of_another_user_is_refused() {
    with_private_bpffs(|bpffs| {
        let theirs = bpffs.join("theirs");
        std::fs::create_dir(&theirs).expect("mkdir");
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown");
        assert!(matches!(
            bpffs::check_pin_dir(&theirs),
            Err(BpffsError::ForeignOwner {
                owner: 65534,
                uid: 0,
                ..
            })
        ));
        // The agent says so and stops before pinning anything there.
        let lab = lab::lab::Lab::new().expect("lab");
        let cgroup = lab::lab::Cgroup::new(&lab, "theirs").expect("cgroup");
        let output = Command::new(sibling_binary("lb").expect("lb binary"))
            .args(["run", "--source", "file", "--manifests", "/dev/null"])
            .arg("--cgroup-path")
            .arg(cgroup.path())
            .arg("--pin-dir")
            .arg(&theirs)
            .env_clear()
            .output()
            .expect("lb run");
        assert!(!output.status.success());
        assert!(
            stderr(&output).contains("is owned by uid 65534, not by this process's uid 0"),
            "{}",
            stderr(&output)
        );
        assert_eq!(std::fs::read_dir(&theirs).expect("ls").count(), 0);
    });

    // The temporary directory is no bpffs.
    let elsewhere = std::env::temp_dir().join(format!("lb-not-bpffs-{}", std::process::id()));
    std::fs::create_dir_all(&elsewhere).expect("mkdir");
    let refused = bpffs::check_pin_dir(&elsewhere);
    let _ = std::fs::remove_dir(&elsewhere);
    assert!(
        matches!(refused, Err(BpffsError::NotBpffs { .. })),
        "{refused:?}"
    );
}

#[test]
fn cleanup_removes_the_agents_pins_and_leaves_anything_else() {
    with_private_bpffs(|bpffs| {
        let pin_dir = bpffs.join("lb");
        drop(Datapath::load(&pin_dir).expect("datapath"));
        std::fs::create_dir(pin_dir.join(LINKS_DIR)).expect("links/");
        // A map of a name an earlier release used: the agent's too.
        pin_map(&pin_dir.join(map_names::RETIRED[0]));
        // Another tool's pins, next to the agent's and among its links.
        pin_map(&pin_dir.join("other_tool_map"));
        pin_map(&pin_dir.join(LINKS_DIR).join("other_tool_link"));

        let output = cleanup(&pin_dir);
        assert!(!output.status.success(), "foreign pins went unnoticed");
        let message = stderr(&output);
        assert!(message.contains("other_tool_map"), "{message}");
        assert!(message.contains("other_tool_link"), "{message}");
        let mut left: Vec<String> = std::fs::read_dir(&pin_dir)
            .expect("ls")
            .map(|entry| {
                entry
                    .expect("entry")
                    .file_name()
                    .into_string()
                    .expect("UTF-8")
            })
            .collect();
        left.sort();
        assert_eq!(left, [LINKS_DIR, "other_tool_map"], "the agent's pins stay");

        // Once the others are gone, the directory goes too.
        std::fs::remove_file(pin_dir.join("other_tool_map")).expect("rm");
        std::fs::remove_file(pin_dir.join(LINKS_DIR).join("other_tool_link")).expect("rm");
        let output = cleanup(&pin_dir);
        assert!(output.status.success(), "{}", stderr(&output));
        assert!(!pin_dir.exists());
        // Nothing left to do is no error.
        assert!(cleanup(&pin_dir).status.success());
    });
}

#[test]
fn cleanup_refuses_the_root_a_bpffs_mount_and_directories_off_bpffs() {
    let root = cleanup(Path::new("/"));
    assert!(!root.status.success());
    assert!(
        stderr(&root).contains("refusing to clean up /"),
        "{}",
        stderr(&root)
    );

    with_private_bpffs(|bpffs| {
        // The mount itself, with an agent map in it: not a pin directory.
        let map = bpffs.join(map_names::FRONTENDS4);
        pin_map(&map);
        let output = cleanup(bpffs);
        assert!(!output.status.success());
        assert!(
            stderr(&output).contains("is a bpffs mount itself"),
            "{}",
            stderr(&output)
        );
        assert!(map.exists(), "the cleanup emptied a bpffs mount");
        // Through a symlink to it, the same.
        let link = bpffs.join("lb");
        std::os::unix::fs::symlink(bpffs, &link).expect("symlink");
        assert!(!cleanup(&link).status.success());
        assert!(map.exists());
    });

    // A directory off bpffs holding a file of an agent's name.
    let elsewhere =
        std::env::temp_dir().join(format!("lb-cleanup-elsewhere-{}", std::process::id()));
    std::fs::create_dir_all(&elsewhere).expect("mkdir");
    let file = elsewhere.join(map_names::FRONTENDS4);
    std::fs::write(&file, "not a pin").expect("a file");
    let output = cleanup(&elsewhere);
    let kept = file.exists();
    let _ = std::fs::remove_dir_all(&elsewhere);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("is not on bpffs"),
        "{}",
        stderr(&output)
    );
    assert!(kept, "the cleanup removed a file off bpffs");
}

/// `lb services` (any read-only command) on a pin directory it cannot read says why: a
/// directory that does not exist or is no bpffs is named as such, not met with "is an agent
/// running", which no agent could fix there.
#[test]
fn read_only_commands_say_why_a_pin_directory_holds_no_maps() {
    let services = |pin_dir: &Path| {
        Command::new(sibling_binary("lb").expect("lb binary"))
            .args(["services", "--pin-dir"])
            .arg(pin_dir)
            .env_clear()
            .output()
            .expect("lb services")
    };
    let scratch = std::env::temp_dir().join(format!("lbt{}-hint", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let missing = scratch.join("missing");
    let output = services(&missing);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("no such pin directory"),
        "{}",
        stderr(&output)
    );
    // A file where a map's pin would be, off bpffs: the kernel answers EACCES.
    let off_bpffs = scratch.join("off-bpffs");
    std::fs::create_dir_all(&off_bpffs).expect("mkdir");
    std::fs::write(off_bpffs.join(map_names::FRONTENDS4), "not a map").expect("write");
    let output = services(&off_bpffs);
    let _ = std::fs::remove_dir_all(&scratch);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("the pin directory is not on a bpffs"),
        "{}",
        stderr(&output)
    );
    with_private_bpffs(|bpffs| {
        let empty = bpffs.join("empty");
        std::fs::create_dir(&empty).expect("mkdir");
        let output = services(&empty);
        assert_eq!(output.status.code(), Some(1));
        assert!(
            stderr(&output).contains("is an agent running with this pin directory?"),
            "{}",
            stderr(&output)
        );
        // Another user, for whom the 0700 bpffs hides the directory: told it needs root, not
        // that the directory is missing. The binary is copied where that user may run it.
        let copy = std::env::temp_dir().join(format!("lbt{}-lb", std::process::id()));
        std::fs::copy(sibling_binary("lb").expect("lb binary"), &copy).expect("copy lb");
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let output = Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(&copy)
            .args(["services", "--pin-dir"])
            .arg(&empty)
            .env_clear()
            .output()
            .expect("setpriv lb services");
        let _ = std::fs::remove_file(&copy);
        assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
        assert!(
            stderr(&output).contains("opening pinned maps needs root or CAP_BPF"),
            "{}",
            stderr(&output)
        );
    });
}
