//! XDP programs of a few instructions, assembled here and loaded straight with BPF_PROG_LOAD:
//!
//! - `r0 = XDP_PASS; exit`, the cheapest XDP program there is: the floor the per-packet bench
//!   subtracts, so that its figures are what the datapath adds over the kernel's own cost of
//!   running any XDP program through `BPF_PROG_TEST_RUN`;
//! - `r0 = XDP_DROP; exit`, the live-frame bench's floor on the receiving NIC;
//! - a traffic generator for live frames (`BPF_F_TEST_XDP_LIVE_FRAMES`): it writes a fixed frame
//!   header over each frame and sends it (XDP_TX), so that a frame whose page comes back
//!   rewritten by the receiver goes out as the original again.

use std::{
    io,
    os::fd::{FromRawFd as _, OwnedFd},
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
/// `enum bpf_attach_type` (include/uapi/linux/bpf.h).
const BPF_XDP: u32 = 37;
/// `XDP_FLAGS_SKB_MODE` (include/uapi/linux/if_link.h): generic XDP, in the stack.
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
/// `XDP_FLAGS_DRV_MODE` (include/uapi/linux/if_link.h): native XDP, in the driver.
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
pub const XDP_DROP: i32 = 1;
pub const XDP_PASS: i32 = 2;
pub const XDP_TX: i32 = 3;

/// One eBPF instruction (include/uapi/linux/bpf.h, `struct bpf_insn`).
#[repr(C)]
struct Instruction {
    code: u8,
    /// Destination register in the low nibble, source in the high one.
    registers: u8,
    offset: i16,
    immediate: i32,
}

/// `BPF_ALU64 | BPF_MOV | BPF_K`: dst = immediate.
const MOV64_IMM: u8 = 0x07 | 0xb0;
/// `BPF_ALU64 | BPF_ADD | BPF_K`: dst += immediate.
const ADD64_IMM: u8 = 0x07;
/// `BPF_LDX | BPF_MEM | BPF_W`: dst = *(u32 *)(src + offset).
const LDX_W: u8 = 0x61;
/// `BPF_ST | BPF_MEM | BPF_W`: *(u32 *)(dst + offset) = immediate.
const ST_W: u8 = 0x62;
/// `BPF_ALU64 | BPF_MOV | BPF_X`: dst = src.
const MOV64_REG: u8 = 0x07 | 0xb0 | 0x08;
/// `BPF_JMP | BPF_JGT | BPF_X`: if dst > src goto +offset.
const JGT_REG: u8 = 0x05 | 0x20 | 0x08;
/// `BPF_JMP | BPF_EXIT`.
const EXIT: u8 = 0x05 | 0x90;

/// `struct xdp_md` offsets of `data` and `data_end`.
const XDP_MD_DATA: i16 = 0;
const XDP_MD_DATA_END: i16 = 4;

const fn insn(code: u8, dst: u8, src: u8, offset: i16, immediate: i32) -> Instruction {
    Instruction {
        code,
        registers: dst | (src << 4),
        offset,
        immediate,
    }
}

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
    load_returning(XDP_PASS, "lb_floor")
}

/// Loads `r0 = verdict; exit`.
pub fn load_returning(verdict: i32, name: &str) -> io::Result<OwnedFd> {
    load_program(
        &[insn(MOV64_IMM, 0, 0, 0, verdict), insn(EXIT, 0, 0, 0, 0)],
        name,
    )
}

/// Loads a generator that writes `header` over the start of each frame (frames shorter than it
/// pass untouched) and sends the frame back out of its interface. `header.len()` must be a
/// multiple of 4.
pub fn load_generator(header: &[u8]) -> io::Result<OwnedFd> {
    if header.is_empty() || !header.len().is_multiple_of(4) || header.len() > 256 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the generator's header must be 4 to 256 bytes, a multiple of 4",
        ));
    }
    // r2 = data; r3 = data_end; r4 = data + len; if r4 > r3 { r0 = XDP_PASS; exit }
    let mut program = vec![
        insn(LDX_W, 2, 1, XDP_MD_DATA, 0),
        insn(LDX_W, 3, 1, XDP_MD_DATA_END, 0),
        insn(MOV64_REG, 4, 2, 0, 0),
        insn(ADD64_IMM, 4, 0, 0, header.len() as i32),
        insn(MOV64_IMM, 0, 0, 0, XDP_PASS),
        insn(JGT_REG, 4, 3, 0, 0),
    ];
    let bounds_check = program.len() - 1;
    // *(u32 *)(r2 + i) = the header's bytes at i, as they lie in memory.
    for (i, word) in header.as_chunks::<4>().0.iter().enumerate() {
        let value = i32::from_ne_bytes(*word);
        program.push(insn(ST_W, 2, 0, (i * 4) as i16, value));
    }
    program.push(insn(MOV64_IMM, 0, 0, 0, XDP_TX));
    let exit = program.len();
    program.push(insn(EXIT, 0, 0, 0, 0));
    // A frame too short for the header: straight to the exit, r0 still XDP_PASS.
    program[bounds_check].offset = (exit - 1 - bounds_check) as i16;
    load_program(&program, "lb_gen")
}

/// Attaches an XDP program to an interface of the calling thread's network namespace in native
/// (driver) mode through a bpf_link; the program stays attached until the returned fd closes.
pub fn attach_native(program: &OwnedFd, ifindex: u32) -> io::Result<OwnedFd> {
    attach(program, ifindex, XDP_FLAGS_DRV_MODE)
}

/// [`attach_native`] in generic mode (XDP run by the stack on each skb).
pub fn attach_generic(program: &OwnedFd, ifindex: u32) -> io::Result<OwnedFd> {
    attach(program, ifindex, XDP_FLAGS_SKB_MODE)
}

fn attach(program: &OwnedFd, ifindex: u32, flags: u32) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd as _;
    #[repr(C)]
    struct LinkCreateAttr {
        prog_fd: u32,
        target_ifindex: u32,
        attach_type: u32,
        flags: u32,
    }
    let attr = LinkCreateAttr {
        prog_fd: program.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags,
    };
    // SAFETY: attr is a valid bpf_attr prefix (link_create) of the size passed, alive for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            &attr as *const LinkCreateAttr,
            size_of::<LinkCreateAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new link fd the kernel just gave this process.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn load_program(program: &[Instruction], name: &str) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    let len = name.len().min(15);
    prog_name[..len].copy_from_slice(&name.as_bytes()[..len]);
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: program.len() as u32,
        insns: program.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
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
    fn the_generator_writes_its_header_over_each_frame_and_sends_it() {
        let header: Vec<u8> = (0..44).collect();
        let program = super::load_generator(&header).expect("load");
        let frame = crate::packet::non_ip(0x0806, 60);
        let run = lb_userspace::datapath::testrun::test_run(&program, &frame).expect("run");
        assert_eq!(run.verdict, super::XDP_TX as u32);
        assert_eq!(run.packet[..44], header[..]);
        assert_eq!(run.packet[44..], frame[44..]);
        let short = &frame[..40];
        let run = lb_userspace::datapath::testrun::test_run(&program, short).expect("run");
        assert_eq!(run.verdict, super::XDP_PASS as u32);
        assert_eq!(run.packet, short);
    }

    #[test]
    fn passes_every_frame_untouched() {
        let program = super::load().expect("load");
        let frame = crate::packet::non_ip(0x0806, 60);
        let run = lb_userspace::datapath::testrun::test_run(&program, &frame).expect("run");
        assert_eq!(run.verdict, 2);
        assert_eq!(run.packet, frame);
    }
}
