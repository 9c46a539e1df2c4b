//! The cheapest XDP program there is, `r0 = XDP_PASS; exit`, loaded straight with BPF_PROG_LOAD:
//! the floor the per-packet bench subtracts, so that its figures are what the datapath adds over
//! the kernel's own cost of running any XDP program through `BPF_PROG_TEST_RUN`.

use std::{
    io,
    os::fd::{FromRawFd as _, OwnedFd},
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_XDP: u32 = 6;
const XDP_PASS: i32 = 2;

/// One eBPF instruction (include/uapi/linux/bpf.h, `struct bpf_insn`).
#[repr(C)]
struct Instruction {
    code: u8,
    /// Destination register in the low nibble, source in the high one.
    registers: u8,
    offset: i16,
    immediate: i32,
}

/// `BPF_ALU64 | BPF_MOV | BPF_K`: r0 = immediate.
const MOV64_IMM: u8 = 0x07 | 0xb0;
/// `BPF_JMP | BPF_EXIT`.
const EXIT: u8 = 0x05 | 0x90;

/// The prefix of `union bpf_attr` that BPF_PROG_LOAD reads up to `prog_name`; the kernel takes a
/// shorter attr as the older layout with the later fields zero.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// Loads the two-instruction XDP_PASS program.
pub fn load() -> io::Result<OwnedFd> {
    let program = [
        Instruction {
            code: MOV64_IMM,
            registers: 0,
            offset: 0,
            immediate: XDP_PASS,
        },
        Instruction {
            code: EXIT,
            registers: 0,
            offset: 0,
            immediate: 0,
        },
    ];
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..8].copy_from_slice(b"lb_floor");
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: program.len() as u32,
        insns: program.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        ..ProgLoadAttr::default()
    };
    // SAFETY: attr is a valid bpf_attr prefix of the size passed; the instructions and the
    // license it points to stay alive for the whole call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            size_of::<ProgLoadAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new program fd the kernel just gave this process.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    #[test]
    fn passes_every_frame_untouched() {
        let program = super::load().expect("load");
        let frame = crate::packet::non_ip(0x0806, 60);
        let run = lb_userspace::testrun::test_run(&program, &frame).expect("run");
        assert_eq!(run.verdict, 2);
        assert_eq!(run.packet, frame);
    }
}
