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

    /// The code sections of `file` (the programs and the functions they call), with their bytes.
    fn text_sections<'data, 'file>(
        file: &'file object::File<'data>,
    ) -> impl Iterator<Item = (object::Section<'data, 'file>, &'data [u8])> {
        file.sections()
            .filter(|section| section.kind() == SectionKind::Text)
            .filter_map(|section| {
                let code = section.data().ok()?;
                Some((section, code))
            })
    }

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
        for (section, code) in text_sections(&file) {
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

    /// The helper call of `bpf_tail_call` (BPF_FUNC_tail_call, include/uapi/linux/bpf.h) and
    /// the instruction that sets r3 to an immediate (BPF_ALU64 | BPF_MOV | BPF_K).
    const BPF_FUNC_TAIL_CALL: i32 = 12;
    const BPF_MOV64_IMM: u8 = 0xb7;

    /// Where every instruction of `code` that jumps can land (instruction indexes): the
    /// conditional and unconditional jumps of both jump classes, by their 16-bit offset, and
    /// BPF_JMP32 | BPF_JA by its 32-bit immediate.
    fn jump_targets(instructions: &[[u8; 8]]) -> Vec<i64> {
        const BPF_JMP: u8 = 0x05;
        const BPF_JMP32: u8 = 0x06;
        const BPF_JA: u8 = 0x00;
        const BPF_CALL_OP: u8 = 0x80;
        const BPF_EXIT: u8 = 0x90;
        instructions
            .iter()
            .enumerate()
            .filter_map(|(index, instruction)| {
                let (class, op) = (instruction[0] & 0x07, instruction[0] & 0xf0);
                if (class != BPF_JMP && class != BPF_JMP32) || op == BPF_CALL_OP || op == BPF_EXIT {
                    return None;
                }
                let offset = if class == BPF_JMP32 && op == BPF_JA {
                    i64::from(i32::from_le_bytes([
                        instruction[4],
                        instruction[5],
                        instruction[6],
                        instruction[7],
                    ]))
                } else {
                    i64::from(i16::from_le_bytes([instruction[2], instruction[3]]))
                };
                Some(index as i64 + 1 + offset)
            })
            .collect()
    }

    /// Every `bpf_tail_call` in the datapath, as (where: section+offset, whether its key is one
    /// constant: r3 set to an immediate by the instruction before it, which no jump skips).
    fn tail_calls(elf: &[u8]) -> Vec<(String, bool)> {
        let file = object::File::parse(elf).expect("an ELF object");
        let mut calls = Vec::new();
        for (section, code) in text_sections(&file) {
            let (instructions, _) = code.as_chunks::<8>();
            let targets = jump_targets(instructions);
            for (index, instruction) in instructions.iter().enumerate() {
                let [opcode, registers, .., a, b, c, d] = *instruction;
                if opcode != BPF_CALL
                    || registers >> 4 != 0
                    || i32::from_le_bytes([a, b, c, d]) != BPF_FUNC_TAIL_CALL
                {
                    continue;
                }
                let one_key = index > 0
                    && instructions[index - 1][0] == BPF_MOV64_IMM
                    && instructions[index - 1][1] & 0x0f == 3
                    && !targets.contains(&(index as i64));
                let place = format!("{}+{:#x}", section.name().unwrap_or("?"), index * 8);
                calls.push((place, one_key));
            }
        }
        calls
    }

    /// The verifier makes a tail call a patched direct jump only where its key is one constant
    /// on every path to it; anywhere else the JIT emits an indirect jump, through the retpoline
    /// thunk on machines that need one, which cost an IPv6 answer about 14 ns in `lb-bench`
    /// (`tc6_reply`, docs/benchmarks.md). `helpers::tail_call` sets the key and calls in one asm
    /// block; a tail call through aya's `ProgramArray::tail_call` with a key LLVM can merge
    /// would show here.
    #[test]
    fn every_tail_call_of_the_datapath_names_its_slot_as_an_immediate_right_before_it() {
        let calls = tail_calls(super::DATAPATH_OBJECT);
        let variable: Vec<_> = calls.iter().filter(|(_, one_key)| !one_key).collect();
        assert!(
            variable.is_empty(),
            "tail calls whose key is not one immediate: {variable:?}"
        );
        // lb_xdp's and lb_tc_egress's hand-ons at least.
        assert!(
            calls.len() >= 10,
            "{} tail calls found: {calls:?}",
            calls.len()
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
