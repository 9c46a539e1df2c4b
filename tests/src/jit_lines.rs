//! Where each source line of a loaded BPF program ended up in its JIT image, for a profiler's
//! samples to be put on source lines: `lb-bench --profile PATH --jit-lines FILE` writes the table
//! of every program it holds, and `cargo xtask profile` joins it with `perf script`'s output.
//!
//! The kernel gives each program's line info (BTF `bpf_line_info` records: instruction, file
//! and line) and, for a JIT-compiled one, the address each record's first instruction was
//! compiled to (`jited_line_info`), through BPF_OBJ_GET_INFO_BY_FD. The file and line texts are
//! offsets into the program's BTF string section, read with BPF_BTF_GET_FD_BY_ID. Debian's
//! bpftool, built without libbfd, cannot dump a JIT image with line numbers, hence this.

use std::{
    fmt::Write as _,
    fs,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, bail, ensure};

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_BTF_GET_FD_BY_ID: libc::c_long = 19;

/// Offsets in `struct bpf_prog_info` (include/uapi/linux/bpf.h), stable since kernel 5.x.
mod prog_info {
    pub const TAG: usize = 8;
    pub const NAME: usize = 64;
    pub const NR_JITED_KSYMS: usize = 104;
    pub const NR_JITED_FUNC_LENS: usize = 108;
    pub const JITED_KSYMS: usize = 112;
    pub const JITED_FUNC_LENS: usize = 120;
    pub const BTF_ID: usize = 128;
    pub const NR_LINE_INFO: usize = 148;
    pub const LINE_INFO: usize = 152;
    pub const JITED_LINE_INFO: usize = 160;
    pub const NR_JITED_LINE_INFO: usize = 168;
    pub const LINE_INFO_REC_SIZE: usize = 172;
    pub const JITED_LINE_INFO_REC_SIZE: usize = 176;
    /// Larger than the struct of any kernel this runs on; the kernel checks the tail is zero.
    pub const SIZE: usize = 256;
}

/// One row of the table: in the main function of the program perf calls `symbol`, the code from
/// `offset` on is `file`:`line` (until the next row's offset).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JitLine {
    pub symbol: String,
    pub offset: u64,
    pub file: String,
    pub line: u32,
    pub text: String,
}

/// Writes the table of every BPF program this process holds a file descriptor of, one row per
/// line-info record: `symbol \t offset (hex) \t file:line \t source text`.
pub fn write_jit_lines(path: &Path) -> anyhow::Result<usize> {
    let mut out = String::new();
    let mut rows = 0;
    for id in own_program_ids()? {
        for line in program_lines(id).with_context(|| format!("BPF program {id}"))? {
            let _ = writeln!(
                out,
                "{}\t{:x}\t{}:{}\t{}",
                line.symbol,
                line.offset,
                line.file,
                line.line,
                line.text.trim().replace('\t', " ")
            );
            rows += 1;
        }
    }
    fs::write(path, out).with_context(|| format!("write {}", path.display()))?;
    Ok(rows)
}

/// The ids of the BPF programs whose file descriptors this process holds (`prog_id:` in their
/// fdinfo), each once.
fn own_program_ids() -> anyhow::Result<Vec<u32>> {
    let mut ids = Vec::new();
    for entry in fs::read_dir("/proc/self/fdinfo").context("read /proc/self/fdinfo")? {
        let Ok(info) = fs::read_to_string(entry?.path()) else {
            continue;
        };
        if let Some(id) = info
            .lines()
            .find_map(|line| line.strip_prefix("prog_id:"))
            .and_then(|id| id.trim().parse().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

fn bpf(command: libc::c_long, attr: &mut [u8]) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, writable buffer of the length passed, as bpf(2) requires.
    let result =
        unsafe { libc::syscall(libc::SYS_bpf, command, attr.as_mut_ptr(), attr.len() as u32) };
    if result < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(result)
}

fn fd_by_id(command: libc::c_long, id: u32) -> anyhow::Result<OwnedFd> {
    let mut attr = [0u8; 16];
    attr[..4].copy_from_slice(&id.to_ne_bytes());
    let fd = bpf(command, &mut attr).with_context(|| format!("get the fd of id {id}"))?;
    // SAFETY: a new file descriptor bpf(2) just returned, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// BPF_OBJ_GET_INFO_BY_FD into `info` (whose pointer fields the caller has set).
fn object_info(fd: &OwnedFd, info: &mut [u8]) -> anyhow::Result<()> {
    let mut attr = [0u8; 16];
    attr[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD")?;
    Ok(())
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn set_u32(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_ne_bytes());
}

fn set_pointer<T>(bytes: &mut [u8], at: usize, to: &mut [T]) {
    bytes[at..at + 8].copy_from_slice(&(to.as_mut_ptr() as u64).to_ne_bytes());
}

/// The line table of program `id`'s main function.
fn program_lines(id: u32) -> anyhow::Result<Vec<JitLine>> {
    use prog_info::*;
    let fd = fd_by_id(BPF_PROG_GET_FD_BY_ID, id)?;
    let mut counts = [0u8; SIZE];
    object_info(&fd, &mut counts)?;
    let ksyms = u32_at(&counts, NR_JITED_KSYMS) as usize;
    let func_lens = u32_at(&counts, NR_JITED_FUNC_LENS) as usize;
    let lines = u32_at(&counts, NR_LINE_INFO) as usize;
    let jited_lines = u32_at(&counts, NR_JITED_LINE_INFO) as usize;
    let line_size = u32_at(&counts, LINE_INFO_REC_SIZE) as usize;
    let btf_id = u32_at(&counts, BTF_ID);
    if ksyms == 0 || lines == 0 || jited_lines != lines || btf_id == 0 {
        // Not JIT-compiled, or without BTF line info: nothing to map.
        return Ok(Vec::new());
    }
    ensure!(line_size >= 16, "line info records of {line_size} bytes");
    let mut ksym_addrs = vec![0u64; ksyms];
    let mut lens = vec![0u32; func_lens];
    let mut line_info = vec![0u8; lines * line_size];
    let mut jited = vec![0u64; jited_lines];
    let mut info = [0u8; SIZE];
    set_u32(&mut info, NR_JITED_KSYMS, ksyms as u32);
    set_pointer(&mut info, JITED_KSYMS, &mut ksym_addrs);
    set_u32(&mut info, NR_JITED_FUNC_LENS, func_lens as u32);
    set_pointer(&mut info, JITED_FUNC_LENS, &mut lens);
    set_u32(&mut info, NR_LINE_INFO, lines as u32);
    set_u32(&mut info, LINE_INFO_REC_SIZE, line_size as u32);
    set_pointer(&mut info, LINE_INFO, &mut line_info);
    set_u32(&mut info, NR_JITED_LINE_INFO, jited_lines as u32);
    set_u32(&mut info, JITED_LINE_INFO_REC_SIZE, 8);
    set_pointer(&mut info, JITED_LINE_INFO, &mut jited);
    object_info(&fd, &mut info)?;
    if ksym_addrs[0] == 0 {
        bail!("the kernel hid the JIT addresses: run as root, with kernel.kptr_restrict below 2");
    }
    let strings = btf_strings(btf_id)?;
    let name_bytes = &info[NAME..NAME + 16];
    let name = String::from_utf8_lossy(
        &name_bytes[..name_bytes.iter().position(|&b| b == 0).unwrap_or(16)],
    );
    let tag: String = info[TAG..TAG + 8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let symbol = format!("bpf_prog_{tag}_{name}");
    let (start, len) = (ksym_addrs[0], u64::from(lens.first().copied().unwrap_or(0)));
    let string_at = |offset: u32| string_at(&strings, offset);
    Ok(line_info
        .chunks_exact(line_size)
        .zip(&jited)
        .filter(|(_, address)| (start..start + len).contains(*address))
        .map(|(record, address)| JitLine {
            symbol: symbol.clone(),
            offset: address - start,
            file: string_at(u32_at(record, 4)),
            line: u32_at(record, 12) >> 10,
            text: string_at(u32_at(record, 8)),
        })
        .collect())
}

/// The string section of BTF object `id`.
fn btf_strings(id: u32) -> anyhow::Result<Vec<u8>> {
    let fd = fd_by_id(BPF_BTF_GET_FD_BY_ID, id)?;
    // struct bpf_btf_info: btf (pointer), btf_size, id, name (pointer), name_len, kernel_btf.
    let mut info = [0u8; 32];
    object_info(&fd, &mut info)?;
    let size = u32_at(&info, 8) as usize;
    let mut raw = vec![0u8; size];
    let mut info = [0u8; 32];
    set_pointer(&mut info, 0, &mut raw);
    set_u32(&mut info, 8, size as u32);
    object_info(&fd, &mut info)?;
    btf_string_section(&raw)
}

/// The string section of raw BTF (`struct btf_header`: magic, version, flags, hdr_len, type_off,
/// type_len, str_off, str_len; offsets after the header).
pub fn btf_string_section(raw: &[u8]) -> anyhow::Result<Vec<u8>> {
    ensure!(raw.len() >= 24, "BTF of {} bytes", raw.len());
    ensure!(
        u16::from_ne_bytes([raw[0], raw[1]]) == 0xeb9f,
        "not BTF (magic {:#x})",
        u16::from_ne_bytes([raw[0], raw[1]])
    );
    let header = u32_at(raw, 4) as usize;
    let (offset, len) = (u32_at(raw, 16) as usize, u32_at(raw, 20) as usize);
    let start = header + offset;
    raw.get(start..start + len)
        .map(<[u8]>::to_vec)
        .context("BTF string section past the end")
}

/// The NUL-terminated string at `offset` of a BTF string section (empty if out of range).
pub fn string_at(strings: &[u8], offset: u32) -> String {
    let rest = strings.get(offset as usize..).unwrap_or_default();
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn btf(strings: &[u8]) -> Vec<u8> {
        let mut raw = Vec::new();
        raw.extend_from_slice(&0xeb9f_u16.to_ne_bytes());
        raw.extend_from_slice(&[1, 0]);
        raw.extend_from_slice(&24u32.to_ne_bytes()); // hdr_len
        raw.extend_from_slice(&0u32.to_ne_bytes()); // type_off
        raw.extend_from_slice(&4u32.to_ne_bytes()); // type_len
        raw.extend_from_slice(&4u32.to_ne_bytes()); // str_off
        raw.extend_from_slice(&(strings.len() as u32).to_ne_bytes());
        raw.extend_from_slice(&[0xaa; 4]); // the types
        raw.extend_from_slice(strings);
        raw
    }

    #[test]
    fn strings_come_from_the_section_after_the_types() {
        let strings = btf_string_section(&btf(b"\0flow.rs\0let x = 1;\0")).unwrap();
        assert_eq!(string_at(&strings, 1), "flow.rs");
        assert_eq!(string_at(&strings, 9), "let x = 1;");
        assert_eq!(string_at(&strings, 0), "");
        assert_eq!(string_at(&strings, 500), "");
    }

    #[test]
    fn raw_bytes_that_are_not_btf_are_refused() {
        let mut raw = btf(b"\0a\0");
        raw[0] = 0;
        assert!(btf_string_section(&raw).is_err());
        assert!(btf_string_section(&raw[..10]).is_err());
    }
}
