//! Table-driven datapath tests through `BPF_PROG_TEST_RUN`: each case is an input packet, the
//! verdict the program must return and the bytes it must leave. All cases run; the failures are
//! reported together with a byte-level diff.

use std::{fmt::Write as _, os::fd::AsFd};

use lb_common::flow_cache::cpus;
use lb_userspace::datapath::{
    Datapath, FlowCacheCounts,
    testrun::{TestRunError, TestRunOutput, test_run, test_run_skb_from},
};

use crate::packet::TcpFlags;

/// A pinned conntrack map under `pin_dir` (`map_names::CONNTRACK4` with [`lb_common::Ct4Key`]
/// and [`lb_common::Ct4Value`], or `CONNTRACK6` with their IPv6 twins), to read and write as
/// the tests plant, evict and check flows.
pub fn pinned_conntrack<K: aya::Pod, V: aya::Pod>(
    pin_dir: &std::path::Path,
    name: &str,
) -> aya::maps::HashMap<aya::maps::MapData, K, V> {
    let map = aya::maps::MapData::from_pin(pin_dir.join(name)).expect("pinned conntrack map");
    aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(map)).expect("conntrack map")
}

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
    run_cases(cases, |input| test_run(program, input));
}

/// [`run_table`] for a tc program, every case a packet the node forwarded from interface
/// `ingress_ifindex` (`run_table` runs them as packets the node's own stack made).
pub fn run_table_forwarded_from(program: impl AsFd, ingress_ifindex: u32, cases: &[Case]) {
    let program = program.as_fd();
    run_cases(cases, |input| {
        test_run_skb_from(program, input, ingress_ifindex)
    });
}

/// Runs every case's input through `run`; panics listing every failing case.
fn run_cases(cases: &[Case], run: impl Fn(&[u8]) -> Result<TestRunOutput, TestRunError>) {
    let mut failures = String::new();
    for case in cases {
        if let Err(failure) = compare(run(&case.input), case) {
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

fn compare(run: Result<TestRunOutput, TestRunError>, case: &Case) -> Result<(), String> {
    let run = run.map_err(|err| format!("{err:#}"))?;
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

/// Two CPUs this thread may run on, for a test that runs a flow's packets on both (per-CPU
/// state such as the flow caches' slots). Panics on a machine that gives it one.
pub fn two_cpus() -> [usize; 2] {
    // SAFETY: plain syscalls on this thread's own affinity, into a set built here.
    let allowed: Vec<usize> = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let read = libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set);
        assert_eq!(
            read,
            0,
            "sched_getaffinity: {}",
            std::io::Error::last_os_error()
        );
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    };
    match allowed[..] {
        [first, second, ..] => [first, second],
        _ => panic!("this test runs a flow on two CPUs; the thread may run on {allowed:?} only"),
    }
}

/// Moves the calling thread (a test's own) to `cpu` and keeps it there: `BPF_PROG_TEST_RUN`
/// runs a program on the caller's CPU.
pub fn run_on_cpu(cpu: usize) {
    // SAFETY: plain syscalls on this thread's own affinity, with a set built here.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let pinned = libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            pinned,
            0,
            "sched_setaffinity to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(libc::sched_getcpu(), cpu as i32, "running on CPU {cpu}");
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
    datapath: &Datapath,
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
pub fn assert_rst_ended_the_flow(datapath: &Datapath, state: Option<u8>, what: &str) {
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

const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;

/// A family's TCP frame builder: source, destination, flags, sequence and acknowledgment
/// numbers, payload (`crate::packet::tcp_acking`, `crate::packet6::tcp_acking`).
pub type TcpFrame<A> = fn(A, A, TcpFlags, (u32, u32), &[u8]) -> Vec<u8>;

/// A family's parts for the flow-cache scenarios: a NodePort `frontend` whose TCP service's
/// endpoint the test picks from two local `pods`, the client's address at a port, the
/// family's TCP frame builder, and the (client, answer) slot records of a client's FLOW entry.
pub struct CacheFlows<A> {
    pub client: fn(u16) -> A,
    pub frontend: A,
    pub pods: [A; 2],
    pub tcp: TcpFrame<A>,
    pub slot_cpus: fn(&Datapath, A) -> (u16, u16),
}

/// A flow whose client's segments fill slots of XDP's flow cache on one CPU or on two, ended on
/// the second CPU by its client's FIN or RST, or by its pod's RST; the client's next connection
/// from the port goes to the other pod (`set_endpoint` makes a pod the service's one
/// endpoint), and its segments inside the old slots' window must reach it from every CPU that
/// held a slot.
pub fn assert_a_flows_end_empties_its_slots_on_every_cpu<A: Copy + PartialEq + std::fmt::Debug>(
    family: &CacheFlows<A>,
    datapath: &mut Datapath,
    mut set_endpoint: impl FnMut(&mut Datapath, A),
) {
    let [first, second] = two_cpus();
    let [pod_a, pod_b] = family.pods;
    // Who ends the flow, with what: the client's packets pass XDP, which empties the slots
    // then; the pod's pass tc egress only, and the slots go at the client's next SYN.
    let endings = [
        ("the client's FIN", true, TcpFlags::FIN_ACK),
        ("the client's RST", true, TcpFlags::RST),
        ("the pod's RST", false, TcpFlags::RST),
    ];
    let mut port = 45_000;
    for (ending, by_client, closing) in endings {
        for slots_on_both in [false, true] {
            port += 1;
            let what = format!("{ending}, slots on {}", cpus_named(slots_on_both));
            let client = (family.client)(port);
            set_endpoint(datapath, pod_a);
            run_on_cpu(first);
            let flow = CpuFlow {
                datapath: &*datapath,
                family,
                client,
                what: &what,
            };
            flow.client_sends(TcpFlags::SYN, (1000, 0), 0, pod_a);
            flow.pod_sends(pod_a, TcpFlags::SYN_ACK, (500_000, 1001), 0, true);
            flow.client_sends(TcpFlags::ACK, (1001, 500_001), 100, pod_a);
            flow.client_sends(TcpFlags::ACK, (1101, 500_001), 100, pod_a);
            assert_eq!(
                flow.client_slot_cpus(),
                cpus::with(0, first as u32),
                "{what}"
            );
            run_on_cpu(second);
            let mut sent = 1201;
            if slots_on_both {
                flow.client_sends(TcpFlags::ACK, (sent, 500_001), 100, pod_a);
                sent += 100;
                assert_eq!(flow.client_slot_cpus(), cpus::SEVERAL, "{what}");
            }
            if by_client {
                flow.client_sends(closing, (sent, 500_001), 0, pod_a);
                sent += 1;
                assert_eq!(flow.client_slot_cpus(), cpus::NONE, "{what}: emptied");
            } else {
                flow.pod_sends(pod_a, closing, (500_001, sent), 0, true);
            }
            // The next connection from the port, 200 further on (inside the old slots'
            // window), to pod B.
            set_endpoint(datapath, pod_b);
            let flow = CpuFlow {
                datapath: &*datapath,
                family,
                client,
                what: &what,
            };
            let isn = sent + 200;
            flow.client_sends(TcpFlags::SYN, (isn, 0), 0, pod_b);
            flow.pod_sends(pod_b, TcpFlags::SYN_ACK, (800_000, isn + 1), 0, true);
            // On every CPU that held a slot: the walk must not stop at the first.
            let mut seq = isn + 1;
            for cpu in cpus_that_held(first, second, slots_on_both) {
                run_on_cpu(cpu);
                flow.client_sends(TcpFlags::ACK, (seq, 800_001), 100, pod_b);
                flow.client_sends(TcpFlags::ACK, (seq + 100, 800_001), 100, pod_b);
                seq += 200;
            }
        }
    }
}

/// A flow whose pod's answers fill slots of tc egress's answer cache on one CPU or on two; the
/// client closes it and connects straight to the pod from the same port, and the pod answers
/// that connection on the second CPU with an ISN inside the old slots' window (the flow is
/// superseded there): the straight connection's answers must leave untranslated from every CPU
/// that held a slot.
pub fn assert_a_superseded_flows_answer_slots_go_on_every_cpu<
    A: Copy + PartialEq + std::fmt::Debug,
>(
    family: &CacheFlows<A>,
    datapath: &Datapath,
) {
    let [first, second] = two_cpus();
    let pod = family.pods[0];
    let mut port = 46_000;
    for slots_on_both in [false, true] {
        port += 1;
        let what = format!("slots on {}", cpus_named(slots_on_both));
        let flow = CpuFlow {
            datapath,
            family,
            client: (family.client)(port),
            what: &what,
        };
        run_on_cpu(first);
        flow.client_sends(TcpFlags::SYN, (1000, 0), 0, pod);
        flow.pod_sends(pod, TcpFlags::SYN_ACK, (500_000, 1001), 0, true);
        flow.client_sends(TcpFlags::ACK, (1001, 500_001), 0, pod);
        flow.pod_sends(pod, TcpFlags::ACK, (500_001, 1001), 100, true);
        flow.pod_sends(pod, TcpFlags::ACK, (500_101, 1001), 100, true);
        assert_eq!(
            flow.answer_slot_cpus(),
            cpus::with(0, first as u32),
            "{what}"
        );
        run_on_cpu(second);
        let mut sent = 500_201;
        if slots_on_both {
            flow.pod_sends(pod, TcpFlags::ACK, (sent, 1001), 100, true);
            sent += 100;
            assert_eq!(flow.answer_slot_cpus(), cpus::SEVERAL, "{what}");
        }
        flow.client_sends(TcpFlags::FIN_ACK, (1001, sent), 0, pod);
        flow.pod_sends(pod, TcpFlags::FIN_ACK, (sent, 1002), 0, true);
        // Straight to the pod from the port; the pod's ISN 100 past its old flow's end.
        flow.straight_to(pod, TcpFlags::SYN, (9_000_000, 0));
        let isn = sent + 101;
        flow.pod_sends(pod, TcpFlags::SYN_ACK, (isn, 9_000_001), 0, false);
        assert_eq!(flow.answer_slot_cpus(), cpus::NONE, "{what}: superseded");
        let mut seq = isn + 1;
        for cpu in cpus_that_held(first, second, slots_on_both) {
            run_on_cpu(cpu);
            flow.pod_sends(pod, TcpFlags::ACK, (seq, 9_000_001), 100, false);
            flow.pod_sends(pod, TcpFlags::ACK, (seq + 100, 9_000_001), 100, false);
            seq += 200;
        }
    }
}

/// The CPUs whose caches took the old flow: the first, and the second when both did.
fn cpus_that_held(first: usize, second: usize, both: bool) -> Vec<usize> {
    if both {
        vec![first, second]
    } else {
        vec![first]
    }
}

fn cpus_named(both: bool) -> &'static str {
    if both { "both CPUs" } else { "one CPU" }
}

/// One client port's segments through XDP and its pods' through tc egress, on whatever CPU the
/// test's thread runs, each checked against the bytes it must leave.
struct CpuFlow<'a, A> {
    datapath: &'a Datapath,
    family: &'a CacheFlows<A>,
    client: A,
    what: &'a str,
}

impl<A: Copy> CpuFlow<'_, A> {
    /// The client's segment to the frontend (`payload` bytes): DNATed to `pod`.
    fn client_sends(&self, flags: TcpFlags, seq_ack: (u32, u32), payload: usize, pod: A) {
        let data = vec![7u8; payload];
        let tcp = self.family.tcp;
        self.expect(
            lb_common::program_names::XDP_LB,
            tcp(self.client, self.family.frontend, flags, seq_ack, &data),
            XDP_PASS,
            tcp(self.client, pod, flags, seq_ack, &data),
        );
    }

    /// The client's segment straight to `pod`: untouched.
    fn straight_to(&self, pod: A, flags: TcpFlags, seq_ack: (u32, u32)) {
        let frame = (self.family.tcp)(self.client, pod, flags, seq_ack, b"");
        self.expect(
            lb_common::program_names::XDP_LB,
            frame.clone(),
            XDP_PASS,
            frame,
        );
    }

    /// `pod`'s segment to the client: from the frontend when `translated`, else untouched.
    fn pod_sends(
        &self,
        pod: A,
        flags: TcpFlags,
        seq_ack: (u32, u32),
        payload: usize,
        translated: bool,
    ) {
        let data = vec![9u8; payload];
        let tcp = self.family.tcp;
        let source = if translated {
            self.family.frontend
        } else {
            pod
        };
        self.expect(
            lb_common::program_names::TC_EGRESS,
            tcp(pod, self.client, flags, seq_ack, &data),
            TC_ACT_OK,
            tcp(source, self.client, flags, seq_ack, &data),
        );
    }

    fn client_slot_cpus(&self) -> u16 {
        (self.family.slot_cpus)(self.datapath, self.client).0
    }

    fn answer_slot_cpus(&self) -> u16 {
        (self.family.slot_cpus)(self.datapath, self.client).1
    }

    fn expect(&self, program: &'static str, input: Vec<u8>, verdict: u32, output: Vec<u8>) {
        let fd = self.datapath.program_fd(program).expect("program");
        let run = test_run(fd, &input).expect("test run");
        // SAFETY: a plain syscall.
        let cpu = unsafe { libc::sched_getcpu() };
        assert!(
            run.verdict == verdict && run.packet == output,
            "{}: {program} on CPU {cpu}, verdict {} (expected {verdict}):\n{}",
            self.what,
            run.verdict,
            diff(&output, &run.packet)
        );
    }
}
