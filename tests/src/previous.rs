//! The agent of an earlier release, for the upgrade row of the reliability suite: built from
//! a commit of this clone's history into `<target>/previous/<commit>/` (the commit's first 12
//! hex digits; `<target>` the target directory of the running test or `lb-soak`) and kept
//! there, so that only the first run for a commit builds it: about 80 s on a 2-core machine
//! whose cargo registry holds the crates, nothing after.
//!
//! [`DEFAULT_REV`] is the release before the last change of a pinned map's layout: at
//! `4e1878d` the IPv4 backends were still the hash map `lb4_be_v1`, which the next commit
//! replaced by the array `lb4_be_v2` (a new agent copies them over at load), and the maps of
//! `lb monitor` did not exist yet. An upgrade from it is an upgrade onto a changed layout.
//!
//! What is built: a detached `git worktree` of the commit in `<target>/previous/<commit>/src`,
//! then its `lb` (debug, without debug info) with a target directory of its own,
//! `<target>/previous/<commit>/target` (it shares nothing with the workspace's), and its eBPF
//! object built by its own `lb-userspace/build.rs` as in any build; the binary is linked to
//! `<target>/previous/<commit>/lb` once it is built, that file's presence is the cache, and the
//! build's target directory is removed.
//! The commit's `rust-toolchain.toml` files name toolchains (`RUSTUP_AUTO_INSTALL=0`: only the
//! ones this checkout pins are sure to be installed, and bpf-linker links only this checkout's
//! nightly's LLVM): when they differ from this checkout's, the worktree's are replaced by this
//! checkout's, and that is said on stderr.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

/// The release the upgrade row starts from (see the module's documentation).
pub const DEFAULT_REV: &str = "4e1878d";

/// The files that pin the toolchains, relative to the workspace root.
const TOOLCHAIN_FILES: [&str; 2] = ["rust-toolchain.toml", "lb-ebpf/rust-toolchain.toml"];

/// The `lb` binary of commit `rev`, built now unless a run before built it. Fails, saying so,
/// when the commit is not in this clone's history (a shallow clone).
pub fn agent(rev: &str) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let commit = resolve(&root, rev)?;
    let dir = target_dir()?.join("previous").join(&commit[..12]);
    let binary = dir.join("lb");
    if binary.exists() {
        return Ok(binary);
    }
    let started = Instant::now();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let src = dir.join("src");
    checkout(&root, &commit, &src)?;
    let stable = use_current_toolchains(&root, &src, rev)?;
    let log = dir.join("build.log");
    eprintln!(
        "previous release {rev}: building its lb in {} (log: {})",
        src.display(),
        log.display()
    );
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let build_target = dir.join("target");
    let mut cargo = Command::new("cargo");
    cargo
        .arg(format!("+{stable}"))
        .args([
            "build",
            "--locked",
            "--package",
            "lb-userspace",
            "--bin",
            "lb",
        ])
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", &build_target)
        // Built once, never edited, never debugged: no incremental state and no debug info,
        // whatever its own profile asks for (its objects took 2 GB of disk with them).
        .env("CARGO_INCREMENTAL", "0")
        .env("CARGO_PROFILE_DEV_DEBUG", "0")
        .stdout(out.try_clone()?)
        .stderr(out);
    // What a cargo or rustup running this process set would otherwise reach the build.
    for var in [
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET_DIR",
    ] {
        cargo.env_remove(var);
    }
    let status = cargo
        .status()
        .with_context(|| format!("starting {cargo:?}"))?;
    if !status.success() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        bail!(
            "building the lb of {rev} failed ({status}); the end of {}:\n{}",
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let built = build_target.join("debug").join("lb");
    // Linked (or copied) under a temporary name, then renamed: the final name exists only for a
    // complete binary.
    let staged = dir.join("lb.new");
    let _ = std::fs::remove_file(&staged);
    if std::fs::hard_link(&built, &staged).is_err() {
        std::fs::copy(&built, &staged)
            .with_context(|| format!("copying {} to {}", built.display(), staged.display()))?;
    }
    std::fs::rename(&staged, &binary)?;
    // The binary is the cache: its build's 1 GB of objects would never be used again.
    if let Err(err) = std::fs::remove_dir_all(&build_target) {
        eprintln!(
            "previous release {rev}: removing {}: {err}",
            build_target.display()
        );
    }
    eprintln!(
        "previous release {rev}: built in {:.0} s, kept as {}",
        started.elapsed().as_secs_f64(),
        binary.display()
    );
    Ok(binary)
}

/// The workspace this crate was built from, whose git history holds the earlier releases.
fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The target directory of the running binary (`<target>/<profile>/[deps/]<exe>`).
fn target_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("executable has a directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps has a parent")?;
    }
    Ok(dir
        .parent()
        .context("the profile directory has a parent")?
        .to_path_buf())
}

/// The full hash of `rev`, which must be a commit of the clone's history.
fn resolve(root: &Path, rev: &str) -> anyhow::Result<String> {
    let output = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["rev-parse", "--verify", "--quiet"])
        .arg(format!("{rev}^{{commit}}"))
        .output()
        .context("running git rev-parse")?;
    let commit = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if !output.status.success() || commit.len() < 12 {
        bail!(
            "the previous release {rev} is not a commit in the history of the clone at {}: the \
             upgrade row builds that release's agent from it. A shallow clone lacks it (fetch \
             the history: `git fetch --unshallow`), or name another commit (`cargo xtask soak \
             -- --previous REV`)",
            root.display()
        );
    }
    Ok(commit)
}

/// A detached worktree of `commit` at `src`: the one there if it is at that commit, else a new
/// one (a directory left by an interrupted run, or copied with the target directory from
/// another clone, is removed first).
fn checkout(root: &Path, commit: &str, src: &Path) -> anyhow::Result<()> {
    if src.exists() {
        let head = Command::new("git")
            .arg("-C")
            .arg(src)
            .args(["rev-parse", "HEAD"])
            .output();
        let at_commit = head.is_ok_and(|head| {
            head.status.success() && String::from_utf8_lossy(&head.stdout).trim() == commit
        });
        // The worktree must be this clone's: `git worktree list` names it.
        let listed = Command::new("git")
            .arg("-C")
            .arg(root)
            .args(["worktree", "list", "--porcelain"])
            .output()
            .is_ok_and(|list| {
                String::from_utf8_lossy(&list.stdout)
                    .lines()
                    .any(|line| line.strip_prefix("worktree ") == src.to_str())
            });
        if at_commit && listed {
            return Ok(());
        }
        std::fs::remove_dir_all(src).with_context(|| format!("removing {}", src.display()))?;
    }
    git(root, &["worktree", "prune"])?;
    let src_arg = src
        .to_str()
        .context("the target directory's path is UTF-8")?;
    git(
        root,
        &["worktree", "add", "--detach", "--force", src_arg, commit],
    )
}

fn git(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(args)
        .output()
        .context("running git")?;
    if !output.status.success() {
        bail!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Makes the worktree pin this checkout's toolchains where its own differ, and returns the
/// stable one to build with.
fn use_current_toolchains(root: &Path, src: &Path, rev: &str) -> anyhow::Result<String> {
    for file in TOOLCHAIN_FILES {
        let current =
            std::fs::read_to_string(root.join(file)).with_context(|| format!("reading {file}"))?;
        let theirs = std::fs::read_to_string(src.join(file)).unwrap_or_default();
        if channel(&theirs) != channel(&current) {
            eprintln!(
                "previous release {rev}: its {file} pins {:?}, this checkout {:?}; building \
                 with this checkout's",
                channel(&theirs),
                channel(&current)
            );
            std::fs::write(src.join(file), current)?;
        }
    }
    let stable = std::fs::read_to_string(root.join(TOOLCHAIN_FILES[0]))?;
    channel(&stable)
        .map(str::to_owned)
        .context("no `channel = \"...\"` in rust-toolchain.toml")
}

/// The value of the `channel = "..."` line of a rust-toolchain.toml.
fn channel(toolchain_toml: &str) -> Option<&str> {
    toolchain_toml.lines().find_map(|line| {
        let value = line
            .trim()
            .strip_prefix("channel")?
            .trim()
            .strip_prefix('=')?;
        Some(value.trim().trim_matches('"'))
    })
}
