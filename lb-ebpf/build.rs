//! The eBPF object is linked by `bpf-linker`, a binary cargo knows nothing about. Rebuild when it
//! changes (e.g. `cargo xtask setup` rebuilt it for a new nightly), so a stale object never lingers.
fn main() {
    // bpf-linker hands LLVM `--bpf-expand-memcpy-in-order` unless told not to. That option sets
    // the BPF target's limits for inline memset and memmove to 0 (BPFISelLowering.cpp), so every
    // struct copy LLVM cannot prove disjoint (an IPv6 address from the per-CPU packet record
    // into a conntrack value) and every run of zero bytes it merges became a call to
    // compiler_builtins' byte-at-a-time `memmove` or `memset`: without them an IPv6 new flow
    // costs about 15% less. The in-order expansion is for JITs that recognise copies by their
    // load/store pairs; nothing here depends on it.
    if std::env::var("CARGO_CFG_TARGET_ARCH").is_ok_and(|arch| arch == "bpf") {
        println!("cargo::rustc-link-arg=--disable-expand-memcpy-in-order");
    }
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo::rerun-if-changed={}", path.display()),
        Err(err) => {
            println!("cargo::warning=bpf-linker not found ({err}); run `cargo xtask setup`")
        }
    }
}
