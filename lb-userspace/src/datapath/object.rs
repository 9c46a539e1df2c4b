//! The eBPF objects built by build.rs (aya-build) and embedded in the binary, so a node needs
//! nothing but the `lb` executable.

/// The service datapath: XDP, tc and socket-hook programs sharing one set of maps.
pub static DATAPATH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The XDP packet counter (`lb count`), with its own private map.
pub static COUNTER_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-counter"));

#[cfg(test)]
mod tests {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};

    /// The C library's memory functions, which bpf-linker links in from compiler_builtins as
    /// BPF subprograms: loops of byte loads and stores, called where LLVM does not expand a
    /// copy, a comparison or a zeroing inline (lb-ebpf/build.rs).
    const MEMORY_BUILTINS: [&str; 5] = ["memcpy", "memmove", "memset", "memcmp", "bcmp"];

    /// Every call of a memory builtin in `elf`, as section+offset -> name.
    fn memory_builtin_calls(elf: &[u8]) -> Vec<String> {
        let file = object::File::parse(elf).expect("an ELF object");
        let mut calls = Vec::new();
        for section in file.sections() {
            for (offset, relocation) in section.relocations() {
                let RelocationTarget::Symbol(index) = relocation.target() else {
                    continue;
                };
                let name = file
                    .symbol_by_index(index)
                    .and_then(|symbol| symbol.name())
                    .unwrap_or_default();
                if MEMORY_BUILTINS.contains(&name) {
                    let section = section.name().unwrap_or("?");
                    calls.push(format!("{section}+{offset:#x} -> {name}"));
                }
            }
        }
        calls
    }

    #[test]
    fn the_programs_call_no_byte_at_a_time_memory_builtin() {
        for (object, elf) in [
            ("lb-ebpf", super::DATAPATH_OBJECT),
            ("lb-counter", super::COUNTER_OBJECT),
        ] {
            let calls = memory_builtin_calls(elf);
            assert!(
                calls.is_empty(),
                "{object} calls memory builtins ({} calls): {calls:?}",
                calls.len()
            );
        }
    }
}
