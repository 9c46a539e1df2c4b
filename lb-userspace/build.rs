//! Builds the eBPF object (the `lb-ebpf` binary) with the nightly pinned in
//! lb-ebpf/rust-toolchain.toml and leaves it in OUT_DIR, where src/datapath/object.rs embeds it.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|package| package.name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("package lb-ebpf not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", ebpf.manifest_path))?;

    let toolchain_file = root_dir.join("rust-toolchain.toml");
    println!("cargo::rerun-if-changed={toolchain_file}");
    let toolchain = std::fs::read_to_string(&toolchain_file)
        .with_context(|| format!("reading {toolchain_file}"))?;
    let channel = pinned_channel(&toolchain)
        .ok_or_else(|| anyhow!("no `channel = \"...\"` line in {toolchain_file}"))?;

    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(channel))
        .context("building the eBPF object (is the toolchain set up? run `cargo xtask setup`)")
}

/// The value of the `channel = "..."` line of a rust-toolchain.toml.
fn pinned_channel(toolchain_toml: &str) -> Option<&str> {
    toolchain_toml.lines().find_map(|line| {
        let value = line
            .trim()
            .strip_prefix("channel")?
            .trim()
            .strip_prefix('=')?;
        Some(value.trim().trim_matches('"'))
    })
}
