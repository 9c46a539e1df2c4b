//! Table-driven datapath tests through `BPF_PROG_TEST_RUN`: each case is an input packet, the
//! verdict the program must return and the bytes it must leave. All cases run; the failures are
//! reported together with a byte-level diff.

use std::{fmt::Write as _, os::fd::AsFd};

use lb_userspace::datapath::{FlowCacheCounts, testrun::test_run};

/// What the program must leave in the packet.
#[derive(Clone, Debug)]
pub enum Expect {
    /// Not one byte changed.
    Unchanged,
    /// Exactly these bytes.
    Bytes(Vec<u8>),
}

/// One row of a table.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: &'static str,
    pub input: Vec<u8>,
    pub verdict: u32,
    pub output: Expect,
}

/// Runs every case through `program`; panics listing every failing case.
pub fn run_table(program: impl AsFd, cases: &[Case]) {
    let program = program.as_fd();
    let mut failures = String::new();
    for case in cases {
        if let Err(failure) = check(program, case) {
            let _ = writeln!(failures, "- {}: {failure}", case.name);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{failures}",
        failures.lines().filter(|l| l.starts_with("- ")).count(),
        cases.len()
    );
}

fn check(program: std::os::fd::BorrowedFd<'_>, case: &Case) -> Result<(), String> {
    let run = test_run(program, &case.input).map_err(|err| format!("{err:#}"))?;
    let expected = match &case.output {
        Expect::Unchanged => &case.input,
        Expect::Bytes(bytes) => bytes,
    };
    let mut problems = Vec::new();
    if run.verdict != case.verdict {
        problems.push(format!(
            "verdict {} (expected {})",
            run.verdict, case.verdict
        ));
    }
    if &run.packet != expected {
        problems.push(format!("packet differs:\n{}", diff(expected, &run.packet)));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// A hex dump of the 16-byte rows where `expected` and `actual` differ.
pub fn diff(expected: &[u8], actual: &[u8]) -> String {
    let mut out = String::new();
    if expected.len() != actual.len() {
        let _ = writeln!(
            out,
            "    length {} (expected {})",
            actual.len(),
            expected.len()
        );
    }
    let rows = expected.len().max(actual.len()).div_ceil(16);
    for row in 0..rows {
        let range = row * 16..(row + 1) * 16;
        let want = expected
            .get(range.start..range.end.min(expected.len()))
            .unwrap_or(&[]);
        let got = actual
            .get(range.start..range.end.min(actual.len()))
            .unwrap_or(&[]);
        if want != got {
            let _ = writeln!(out, "    {:04x} expected {}", range.start, hex(want));
            let _ = writeln!(out, "    {:04x} actual   {}", range.start, hex(got));
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Keeps the calling thread (a test's own) on the CPU it runs on, for the rest of its life:
/// `BPF_PROG_TEST_RUN` runs a program on the caller's CPU, and per-CPU state such as XDP's flow
/// cache then answers every run of the test alike.
pub fn stay_on_this_cpu() {
    // SAFETY: plain syscalls on this thread's own affinity, with a set built here.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(
            cpu >= 0,
            "sched_getcpu: {}",
            std::io::Error::last_os_error()
        );
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        let pinned = libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            pinned,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Sends 75 segments of 1,400 bytes of one side of a flow, from sequence number `first` on
/// (`send` runs the segment at a sequence number through the program under test), and checks
/// after each that the flow's entry (`recorded`: how far it says that side has sent) trails
/// the side by no more than a cache may leave it behind (`lb_common::flow_cache::SEQ_AHEAD`),
/// and that most segments left it behind (served from a cache). Returns how far the side has
/// sent.
pub fn send_past_the_entry(
    first: u32,
    mut send: impl FnMut(u32, &[u8]),
    recorded: impl Fn() -> u32,
) -> u32 {
    const SEGMENTS: u32 = 75;
    let data = [7u8; 1400];
    let mut sent = first;
    let mut past_the_entry = 0;
    for segment in 0..SEGMENTS {
        send(sent, &data);
        sent = sent.wrapping_add(data.len() as u32);
        let recorded = recorded();
        let trails = sent.wrapping_sub(recorded);
        assert!(
            trails <= lb_common::flow_cache::SEQ_AHEAD,
            "segment {segment}: the entry records {recorded}, the side has sent up to {sent}"
        );
        if trails != 0 {
            past_the_entry += 1;
        }
    }
    assert!(
        past_the_entry >= 60,
        "most segments served from a cache, past the entry: {past_the_entry} of {SEGMENTS}"
    );
    sent
}

/// Checks a cache's gate (`lb_common::FlowCacheGate`) on one side of a flow whose steady
/// segments the cache serves. `send` runs that side's segment at a sequence number through the
/// program under test, `recorded` says how far the flow's entry says that side has sent (the
/// full path records every segment; a segment served from a cache leaves the entry behind), and
/// `miss` sends the first steady segment of another flow `i`, which no slot holds. After
/// `GATE_MISSES` + 1 of those the cache stands aside: the flow's next `GATE_CLOSED_FOR` segments
/// all take the full path; then the cache serves it again (on the first segment after, or on
/// the second when a miss's flow took its slot).
pub fn assert_gate_stands_aside(
    first: u32,
    mut send: impl FnMut(u32, &[u8]),
    recorded: impl Fn() -> u32,
    mut miss: impl FnMut(u32),
    counts: impl Fn() -> FlowCacheCounts,
) {
    use lb_common::flow_cache::{GATE_CLOSED_FOR, GATE_MISSES};
    let data = [7u8; 10];
    let mut sent = first;
    let mut send_next = |sent: &mut u32| {
        send(*sent, &data);
        *sent = sent.wrapping_add(data.len() as u32);
        recorded() == *sent
    };
    let start = counts();
    assert!(
        send_next(&mut sent),
        "a flow's first steady segment fills its slot"
    );
    assert!(
        !send_next(&mut sent),
        "its next segment is served from the cache, past the entry"
    );
    let filled = counts();
    assert_eq!(
        (filled.misses - start.misses, filled.hits - start.hits),
        (1, 1),
        "the fill's look counted as a miss, the next as a hit"
    );
    for i in 0..=GATE_MISSES {
        miss(i);
    }
    let closed = counts();
    assert_eq!(
        (
            closed.misses - filled.misses,
            closed.closings - filled.closings,
            closed.hits
        ),
        (u64::from(GATE_MISSES) + 1, 1, filled.hits),
        "the misses counted, the last of them closing the gate once"
    );
    for segment in 0..GATE_CLOSED_FOR {
        assert!(
            send_next(&mut sent),
            "segment {segment} after {} misses takes the full path",
            GATE_MISSES + 1
        );
    }
    assert_eq!(
        counts(),
        closed,
        "the segments past a closed gate are no looks"
    );
    let missed_before_served = (0..2).position(|_| !send_next(&mut sent));
    let Some(missed) = missed_before_served else {
        panic!("the cache serves the flow again after {GATE_CLOSED_FOR} segments");
    };
    let reopened = counts();
    assert_eq!(
        (reopened.hits - closed.hits, reopened.misses - closed.misses),
        (1, missed as u64),
        "the reopened gate's looks counted"
    );
}

/// The counts of the flow cache of `hook` (`xdp`, `tc`) and `ip_family` (`IPv4`, `IPv6`) for
/// `protocol` (`TCP`, `UDP`).
pub fn cache_counts(
    datapath: &lb_userspace::datapath::Datapath,
    hook: &str,
    ip_family: &str,
    protocol: &str,
) -> FlowCacheCounts {
    datapath
        .flow_caches()
        .expect("the flow caches' counts")
        .into_iter()
        .find(|cache| {
            cache.hook == hook && cache.ip_family == ip_family && cache.protocol == protocol
        })
        .expect("a flow cache of that hook, family and protocol")
}

/// Checks that a RST a cache test sent (`what`) was taken as its sender's: the flow (its entry's
/// `state`) is closing, and the datapath dropped no RST as out of its window.
pub fn assert_rst_ended_the_flow(
    datapath: &lb_userspace::datapath::Datapath,
    state: Option<u8>,
    what: &str,
) {
    assert_eq!(
        state,
        Some(lb_common::tcp_state::CLOSING),
        "{what} ends the flow"
    );
    assert_eq!(
        datapath.events().expect("events")["drop_rst_out_of_window"],
        0,
        "{what} dropped as out of window"
    );
}
