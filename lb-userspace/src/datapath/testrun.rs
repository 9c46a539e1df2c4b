//! A safe wrapper over `BPF_PROG_TEST_RUN` for XDP and tc programs: run a loaded program on a packet
//! of our choosing and get back its verdict and the packet as the program left it. aya 0.16 has no
//! public API for it. Datapath tests, benchmarks and `lb explain` are built on this.
//!
//! The kernel side is `bpf_prog_test_run_xdp` / `bpf_prog_test_run_skb` in net/bpf/test_run.c.

use std::{
    io,
    os::fd::{AsFd, AsRawFd as _},
    time::Duration,
};

/// `BPF_PROG_TEST_RUN` command number (include/uapi/linux/bpf.h, enum bpf_cmd).
const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// Room left for the program to grow the packet (bpf_xdp_adjust_head / encapsulation). The kernel
/// fails with ENOSPC rather than overflow when the output does not fit.
const OUTPUT_HEADROOM: usize = 512;

/// The kernel's `bpf_attr.test` (include/uapi/linux/bpf.h), laid out as the kernel reads it. The
/// fields after `ctx_out` are zero: no context, current CPU, no batching.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    // The kernel checks that every byte past the last field it knows is zero.
    _pad: u32,
}

const _: () = assert!(size_of::<TestRunAttr>() == 80);

/// What one run produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestRunOutput {
    /// The program's return value: an `xdp_action` for XDP, a `TC_ACT_*` for tc.
    pub verdict: u32,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
    /// Mean run time per repetition as the kernel measured it (nanosecond resolution).
    pub duration: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum TestRunError {
    #[error("repeat must be at least 1")]
    ZeroRepeat,
    /// EINVAL for a packet shorter than an Ethernet header or longer than a page allows.
    #[error("BPF_PROG_TEST_RUN on a {len}-byte packet")]
    Syscall { len: usize, source: io::Error },
}

/// Runs `program` once on `packet` and returns what it did. See [`test_run_repeat`].
pub fn test_run(program: impl AsFd, packet: &[u8]) -> Result<TestRunOutput, TestRunError> {
    test_run_repeat(program, packet, 1)
}

/// Runs an XDP program once on `packet` as if it arrived on interface `ingress_ifindex` of the
/// calling thread's network namespace (so that the program's FIB lookups and its checks of the
/// ingress NIC see that interface). XDP_REDIRECT is returned, not carried out.
pub fn test_run_on(
    program: impl AsFd,
    packet: &[u8],
    ingress_ifindex: u32,
) -> Result<TestRunOutput, TestRunError> {
    let context = XdpMd {
        data_end: packet.len() as u32,
        ingress_ifindex,
        ..XdpMd::default()
    };
    run(program, packet, 1, Some(Context::Xdp(&context)))
}

/// Runs a tc program once on `packet` as a packet the node forwarded from interface
/// `ingress_ifindex` (`__sk_buff.ingress_ifindex`; without it, 0: a packet the node's own stack
/// made).
pub fn test_run_skb_from(
    program: impl AsFd,
    packet: &[u8],
    ingress_ifindex: u32,
) -> Result<TestRunOutput, TestRunError> {
    let context = SkBuffPrefix {
        ingress_ifindex,
        ..SkBuffPrefix::default()
    };
    run(program, packet, 1, Some(Context::SkBuff(&context)))
}

/// Runs `program` `repeat` times on `packet`.
///
/// Every repetition after the first sees the packet as the previous one left it, so a program
/// that rewrites the packet must be measured with `repeat = 1` in a loop (docs/development.md).
/// Side effects on maps are real: run against test maps, never a live agent's.
pub fn test_run_repeat(
    program: impl AsFd,
    packet: &[u8],
    repeat: u32,
) -> Result<TestRunOutput, TestRunError> {
    run(program, packet, repeat, None)
}

fn run(
    program: impl AsFd,
    packet: &[u8],
    repeat: u32,
    context: Option<Context<'_>>,
) -> Result<TestRunOutput, TestRunError> {
    if repeat == 0 {
        return Err(TestRunError::ZeroRepeat);
    }
    let mut output = vec![0u8; packet.len() + OUTPUT_HEADROOM];
    let mut attr = TestRunAttr {
        prog_fd: program.as_fd().as_raw_fd() as u32,
        data_size_in: packet.len() as u32,
        data_size_out: output.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: output.as_mut_ptr() as u64,
        repeat,
        ctx_size_in: context.map_or(0, |context| context.size()),
        ctx_in: context.map_or(0, |context| context.address()),
        ..TestRunAttr::default()
    };
    // SAFETY: data_in, data_out and ctx_in point to buffers of the sizes given, all alive for
    // the whole call.
    unsafe { prog_test_run(&mut attr) }.map_err(|source| TestRunError::Syscall {
        len: packet.len(),
        source,
    })?;
    output.truncate(attr.data_size_out as usize);
    Ok(TestRunOutput {
        verdict: attr.retval,
        packet: output,
        duration: Duration::from_nanos(u64::from(attr.duration)),
    })
}

/// `BPF_F_TEST_XDP_LIVE_FRAMES` (include/uapi/linux/bpf.h, kernel 5.18, b530e9e1063e "bpf: Add
/// "live packet" mode for XDP in BPF_PROG_RUN").
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// The kernel's `struct xdp_md` as BPF_PROG_TEST_RUN takes it for the context.
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// The context a run starts from, for the program's type.
#[derive(Clone, Copy)]
enum Context<'a> {
    Xdp(&'a XdpMd),
    SkBuff(&'a SkBuffPrefix),
}

impl Context<'_> {
    fn size(self) -> u32 {
        match self {
            Self::Xdp(_) => size_of::<XdpMd>() as u32,
            Self::SkBuff(_) => size_of::<SkBuffPrefix>() as u32,
        }
    }

    fn address(self) -> u64 {
        match self {
            Self::Xdp(context) => context as *const XdpMd as u64,
            Self::SkBuff(context) => context as *const SkBuffPrefix as u64,
        }
    }
}

/// The kernel's `struct __sk_buff` up to `ifindex`, which BPF_PROG_TEST_RUN takes as a prefix of
/// the context (the rest zero). Of these fields it takes `mark`, `priority` and
/// `ingress_ifindex` (as `skb_iif`) and refuses a run with any other one set
/// (net/bpf/test_run.c, convert___skb_to_skb).
#[repr(C)]
#[derive(Default)]
struct SkBuffPrefix {
    len: u32,
    pkt_type: u32,
    mark: u32,
    queue_mapping: u32,
    protocol: u32,
    vlan_present: u32,
    vlan_tci: u32,
    vlan_proto: u32,
    priority: u32,
    ingress_ifindex: u32,
    ifindex: u32,
}

/// Runs an XDP program `repeat` times on live frames made from `packet` as if they arrived on
/// interface `ingress_ifindex` of the calling thread's network namespace: its verdicts take
/// effect (XDP_TX sends the frame out of that interface, XDP_PASS hands it to the stack), in
/// batches of 64 frames. The kernel reuses each frame's page and resets only the frame's
/// pointers, not its bytes: a frame the program or a receiver rewrote comes back rewritten.
/// Returns the time the kernel measured for the whole run.
pub fn test_run_live(
    program: impl AsFd,
    packet: &[u8],
    ingress_ifindex: u32,
    repeat: u32,
) -> Result<Duration, TestRunError> {
    if repeat == 0 {
        return Err(TestRunError::ZeroRepeat);
    }
    let context = XdpMd {
        data_end: packet.len() as u32,
        ingress_ifindex,
        ..XdpMd::default()
    };
    let mut attr = TestRunAttr {
        prog_fd: program.as_fd().as_raw_fd() as u32,
        data_size_in: packet.len() as u32,
        data_in: packet.as_ptr() as u64,
        repeat,
        ctx_size_in: size_of::<XdpMd>() as u32,
        ctx_in: &context as *const XdpMd as u64,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        ..TestRunAttr::default()
    };
    // SAFETY: data_in and ctx_in point to buffers of the sizes given, alive for the whole call;
    // live mode writes no output.
    unsafe { prog_test_run(&mut attr) }.map_err(|source| TestRunError::Syscall {
        len: packet.len(),
        source,
    })?;
    // `duration` is the mean per repetition.
    Ok(Duration::from_nanos(
        u64::from(attr.duration) * u64::from(repeat),
    ))
}

/// BPF_PROG_TEST_RUN with `attr`.
///
/// # Safety
/// Every pointer in `attr` must point to a buffer of the size `attr` gives for it, alive for
/// the call.
unsafe fn prog_test_run(attr: &mut TestRunAttr) -> io::Result<()> {
    // SAFETY: attr is a valid bpf_attr prefix of the size passed; the caller vouches for the
    // buffers it points to.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            attr as *mut TestRunAttr,
            size_of::<TestRunAttr>(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
