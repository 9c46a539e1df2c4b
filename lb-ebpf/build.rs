//! The eBPF object is linked by `bpf-linker`, a binary cargo knows nothing about. Rebuild when it
//! changes (e.g. `cargo xtask setup` rebuilt it for a new nightly), so a stale object never lingers.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo::rerun-if-changed={}", path.display()),
        Err(err) => {
            println!("cargo::warning=bpf-linker not found ({err}); run `cargo xtask setup`")
        }
    }
}
