//! Builds the eBPF object (the `lb-ebpf` binary) with the nightly pinned in
//! lb-ebpf/rust-toolchain.toml and leaves it in OUT_DIR without its DWARF, where
//! src/datapath/object.rs embeds it.
use anyhow::{Context as _, anyhow};
use object::build::elf::SectionData;

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
        .context("building the eBPF object (is the toolchain set up? run `cargo xtask setup`)")?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR")?);
    for object in ["lb-ebpf", "lb-counter"] {
        let path = out_dir.join(object);
        // Absent when AYA_BUILD_SKIP=1 skipped the build before any build left one.
        if path.exists() {
            strip_dwarf(&path)?;
        }
    }
    Ok(())
}

/// Drops an object's DWARF sections (and their relocations), which nothing reads at run time:
/// aya and the kernel take the BTF (`.BTF`, and `.BTF.ext` with the line info of verifier logs),
/// which stays. The datapath object is 7.4 MB with them and 1.8 MB without; it is embedded in
/// every binary, and aya's parse of it paged 2.3 MiB of the DWARF into the agent's RSS.
fn strip_dwarf(path: &std::path::Path) -> anyhow::Result<()> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut builder = object::build::elf::Builder::read(&*data)
        .with_context(|| format!("parsing {}", path.display()))?;
    for section in builder.sections.iter_mut() {
        let name = section.name.as_slice();
        if name.starts_with(b".debug_") || name.starts_with(b".rel.debug_") {
            section.delete = true;
        }
    }
    builder.delete_orphans();
    // LLVM names the sections in the symbols' string table (`.strtab`); the builder writes
    // section names to a table of their own, which it must be given.
    if !builder
        .sections
        .iter()
        .any(|section| matches!(section.data, SectionData::SectionString))
    {
        let names = builder.sections.add();
        names.name = b".shstrtab"[..].into();
        names.sh_type = object::elf::SHT_STRTAB;
        names.data = SectionData::SectionString;
    }
    let mut stripped = Vec::with_capacity(data.len());
    builder
        .write(&mut stripped)
        .with_context(|| format!("writing {} without its DWARF", path.display()))?;
    std::fs::write(path, stripped).with_context(|| format!("writing {}", path.display()))
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
