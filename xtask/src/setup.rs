//! `cargo xtask setup`: everything a fresh machine lacks, installed idempotently. The recipe and
//! its traps are in docs/development.md; the short version:
//! - RUSTUP_AUTO_INSTALL=0, so pinned toolchains are installed explicitly;
//! - bpf-linker has no prebuilt binary here and must link the SAME LLVM major as the nightly that
//!   emits the bitcode, so it is built against that nightly's own libLLVM.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};

use crate::{output, run};

/// bpf-linker release that is known to link the pinned nightly's bitcode (LLVM 23 feature).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// The pinned toolchains, as read from the rust-toolchain.toml files.
pub struct Toolchains {
    pub nightly: String,
}

pub fn ensure(root: &Path) -> anyhow::Result<Toolchains> {
    let stable = pinned_channel(&root.join("rust-toolchain.toml"))?;
    let nightly = pinned_channel(&root.join("lb-ebpf").join("rust-toolchain.toml"))?;
    ensure_toolchain(&stable, &["clippy", "rustfmt"])?;
    ensure_toolchain(&nightly, &["rust-src", "clippy", "rustfmt"])?;
    ensure_bpf_linker(&stable, &nightly)?;
    ensure_command("ip", "iproute2")?;
    // The lab turns checksum offload off on its veths (docs/lab.md).
    ensure_command("ethtool", "ethtool")?;
    // The end-to-end bench compares lb with kube-proxy-shaped rule sets (lb-bench-e2e).
    ensure_command("iptables", "iptables")?;
    ensure_command("nft", "nftables")?;
    // The reliability suite counts the programs attached to its cgroup (tests/src/soak.rs).
    ensure_command("bpftool", "bpftool")?;
    Ok(Toolchains { nightly })
}

fn pinned_channel(file: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .find_map(|line| {
            let value = line
                .trim()
                .strip_prefix("channel")?
                .trim()
                .strip_prefix('=')?;
            Some(value.trim().trim_matches('"').to_owned())
        })
        .ok_or_else(|| anyhow!("no `channel = \"...\"` in {}", file.display()))
}

fn ensure_toolchain(toolchain: &str, components: &[&str]) -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args(["toolchain", "list"]))?;
    let has_toolchain = installed.lines().any(|line| line.starts_with(toolchain));
    let missing: Vec<&str> = if has_toolchain {
        let have = output(Command::new("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            toolchain,
        ]))?;
        components
            .iter()
            .copied()
            .filter(|component| {
                !have
                    .lines()
                    .any(|line| line.starts_with(&format!("{component}-")) || line == *component)
            })
            .collect()
    } else {
        components.to_vec()
    };
    if has_toolchain && missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing toolchain {toolchain} with {missing:?}");
    run(Command::new("rustup")
        .args(["toolchain", "install", toolchain, "--profile", "minimal"])
        .args(["--component", &components.join(",")]))
}

fn sysroot(toolchain: &str) -> anyhow::Result<PathBuf> {
    let sysroot = output(
        Command::new("rustc")
            .arg(format!("+{toolchain}"))
            .args(["--print", "sysroot"]),
    )?;
    Ok(PathBuf::from(sysroot.trim()))
}

/// The nightly's libLLVM.so.<version>, the library bpf-linker must load.
fn nightly_libllvm(nightly_sysroot: &Path) -> anyhow::Result<PathBuf> {
    let lib = nightly_sysroot.join("lib");
    std::fs::read_dir(&lib)
        .with_context(|| format!("listing {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("libLLVM.so."))
        })
        .ok_or_else(|| anyhow!("no libLLVM.so.* in {}", lib.display()))
}

fn ensure_bpf_linker(stable: &str, nightly: &str) -> anyhow::Result<()> {
    let nightly_sysroot = sysroot(nightly)?;
    let libllvm = nightly_libllvm(&nightly_sysroot)?;
    if bpf_linker_loads(&libllvm) {
        return Ok(());
    }
    // The linker step of `cargo install` looks for the unversioned name.
    let unversioned = nightly_sysroot.join("lib").join("libLLVM.so");
    if !unversioned.exists() {
        let target = libllvm
            .file_name()
            .context("libLLVM path has a file name")?;
        std::os::unix::fs::symlink(target, &unversioned)
            .with_context(|| format!("linking {}", unversioned.display()))?;
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {}",
        libllvm.display()
    );
    run(Command::new("cargo")
        .arg(format!("+{stable}"))
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .env("LLVM_PREFIX", &nightly_sysroot))?;
    if !bpf_linker_loads(&libllvm) {
        bail!(
            "bpf-linker was built but does not load {}",
            libllvm.display()
        );
    }
    Ok(())
}

/// Whether the bpf-linker on PATH runs and resolves its libLLVM to exactly `libllvm`. A linker
/// built against another nightly would load an LLVM of another major and fail on our bitcode.
fn bpf_linker_loads(libllvm: &Path) -> bool {
    let Ok(linker) = output(Command::new("sh").args(["-c", "command -v bpf-linker"])) else {
        return false;
    };
    let Ok(libraries) = output(Command::new("ldd").arg(linker.trim())) else {
        return false;
    };
    let wanted = libllvm.display().to_string();
    libraries
        .lines()
        .any(|line| line.contains("libLLVM") && line.contains(&wanted))
        && output(Command::new("bpf-linker").arg("--version")).is_ok()
}

fn ensure_command(command: &str, debian_package: &str) -> anyhow::Result<()> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {command}")])
        .output()
        .is_ok_and(|output| output.status.success());
    if found {
        return Ok(());
    }
    eprintln!("setup: installing {debian_package} (for `{command}`)");
    run(Command::new("apt-get").arg("update"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", debian_package])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}
