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
    use std::collections::HashMap;

    use object::{
        Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget, SectionIndex,
        SectionKind, SymbolKind,
    };

    /// The C library's memory functions, which bpf-linker links in from compiler_builtins as
    /// BPF subprograms: loops of byte loads and stores, called where LLVM does not expand a
    /// copy, a comparison or a zeroing inline (lb-ebpf/build.rs).
    const MEMORY_BUILTINS: [&str; 5] = ["memcpy", "memmove", "memset", "memcmp", "bcmp"];

    /// The opcode of a call (BPF_JMP | BPF_CALL) and the source register that makes it a call
    /// of a BPF function rather than a helper (BPF_PSEUDO_CALL, include/uapi/linux/bpf.h).
    const BPF_CALL: u8 = 0x85;
    const BPF_PSEUDO_CALL: u8 = 1;

    /// Every call of one BPF function by another in `elf`, as (where: section+offset, the
    /// function called). A call names its target through a relocation against the function's
    /// symbol, or against its section's with the instruction offset in the immediate, or,
    /// within one section, by the immediate alone (the offset from the next instruction).
    fn function_calls(elf: &[u8]) -> Vec<(String, String)> {
        let file = object::File::parse(elf).expect("an ELF object");
        let functions: Vec<(SectionIndex, u64, u64, &str)> = file
            .symbols()
            .filter(|symbol| symbol.kind() == SymbolKind::Text)
            .filter_map(|symbol| {
                Some((
                    symbol.section_index()?,
                    symbol.address(),
                    symbol.size().max(1),
                    symbol.name().ok()?,
                ))
            })
            .collect();
        let function_at = |section: Option<SectionIndex>, offset: Option<u64>| {
            let (section, offset) = (section?, offset?);
            functions
                .iter()
                .find(|(index, start, size, _)| {
                    *index == section && (*start..start + size).contains(&offset)
                })
                .map(|function| function.3)
        };
        let mut calls = Vec::new();
        for section in file.sections() {
            let Ok(code) = section.data() else {
                continue;
            };
            if section.kind() != SectionKind::Text {
                continue;
            }
            let relocations: HashMap<u64, RelocationTarget> = section
                .relocations()
                .map(|(offset, relocation)| (offset, relocation.target()))
                .collect();
            let (instructions, _) = code.as_chunks::<8>();
            for (index, instruction) in instructions.iter().enumerate() {
                if instruction[0] != BPF_CALL || instruction[1] >> 4 != BPF_PSEUDO_CALL {
                    continue;
                }
                let at = index as u64 * 8;
                let [.., a, b, c, d] = *instruction;
                let immediate = i32::from_le_bytes([a, b, c, d]);
                let past = (i64::from(immediate) + 1) * 8;
                let callee = match relocations.get(&at) {
                    Some(RelocationTarget::Symbol(symbol)) => {
                        let symbol = file.symbol_by_index(*symbol).expect("a symbol");
                        let offset = if symbol.kind() == SymbolKind::Section {
                            symbol.address().checked_add_signed(past)
                        } else {
                            Some(symbol.address())
                        };
                        function_at(symbol.section_index(), offset)
                    }
                    Some(_) => None,
                    None => function_at(Some(section.index()), at.checked_add_signed(past)),
                };
                let place = format!("{}+{at:#x}", section.name().unwrap_or("?"));
                calls.push((place, callee.unwrap_or("(no function)").to_owned()));
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
            let calls = function_calls(elf);
            let unresolved: Vec<_> = calls
                .iter()
                .filter(|(_, callee)| callee == "(no function)")
                .collect();
            assert!(
                unresolved.is_empty(),
                "{object}: calls whose target no function symbol covers: {unresolved:?}"
            );
            let builtins: Vec<_> = calls
                .iter()
                .filter(|(_, callee)| MEMORY_BUILTINS.contains(&callee.as_str()))
                .collect();
            assert!(
                builtins.is_empty(),
                "{object} calls memory builtins ({} calls): {builtins:?}",
                builtins.len()
            );
        }
        // The decoding finds calls where there are some: the datapath's out-of-line functions.
        assert!(
            !function_calls(super::DATAPATH_OBJECT).is_empty(),
            "no BPF-to-BPF call found in lb-ebpf"
        );
    }

    /// build.rs embeds the objects without their DWARF (5.6 of the datapath's 7.4 MB, which
    /// aya's parse paged into the agent's memory) and with their BTF, which aya and the kernel
    /// read (the verifier logs' line info is in `.BTF.ext`).
    #[test]
    fn the_embedded_objects_keep_their_btf_and_no_dwarf() {
        for (object, elf) in [
            ("lb-ebpf", super::DATAPATH_OBJECT),
            ("lb-counter", super::COUNTER_OBJECT),
        ] {
            let file = object::File::parse(elf).expect("an ELF object");
            let names: Vec<&str> = file
                .sections()
                .map(|section| section.name().expect("a section name"))
                .collect();
            let dwarf: Vec<&&str> = names
                .iter()
                .filter(|name| name.starts_with(".debug_") || name.starts_with(".rel.debug_"))
                .collect();
            assert!(dwarf.is_empty(), "{object} embeds DWARF: {dwarf:?}");
            for btf in [".BTF", ".BTF.ext"] {
                assert!(names.contains(&btf), "{object} has no {btf}: {names:?}");
            }
        }
    }
}
