//! `cargo xtask bench`: what one packet costs on each path of the datapath, as the kernel measures
//! it through `BPF_PROG_TEST_RUN`, at 1, 1k, 10k and 100k services. Prints a table and writes JSON
//! (target/bench/datapath.json); docs/benchmarks.md explains the method.
//!
//! Every sample is one run with `repeat = 1`: with `repeat > 1` the kernel reruns the buffer the
//! previous repetition rewrote, so a DNATed packet would be measured as a miss from the second
//! repetition on. A single run's duration includes the kernel's timing harness (clock reads, the
//! loop around the program), so the figures are reported net of the median of a bare XDP_PASS
//! program (two instructions, [`lab::bare_xdp`]) measured the same way in the same run.
//!
//! Every size has its own copy of the datapath, all loaded at once, and the runs are interleaved:
//! each round measures a block of every path (and the floor) at every size, so whatever else the
//! machine does during the bench spreads over all the figures instead of skewing some of them.
//!
//! Each copy's maps are pinned in a private bpffs directory ([`PinDir`]) that is removed on drop,
//! also when the bench fails; a bench killed outright is swept by the next [`Lab::new`]. The
//! agent's own maps are never touched.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd as _, BorrowedFd},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail, ensure};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use clap::Parser;
use lab::{
    lab::{Lab, PinDir},
    packet::{self, ETH_HDR_LEN, TcpFlags},
};
use lb_common::{limits, map_names, program_names, proto, service_flags};
use lb_userspace::{
    compile::model::{Backend, Frontend, Service},
    datapath::{
        Datapath,
        bpf_obj::Access,
        maps::open_map,
        monitor_control::{MonitorControlCell, Owner},
        testrun::{TestRunOutput, test_run},
    },
};
use serde::Serialize;

const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;

/// Service ids used at most. MAX_SERVICES is 65536, so 100k frontends share 50k ids (two each);
/// the table counts frontends as "services".
const MAX_SERVICE_IDS: u32 = 50_000;
/// Frontend `i` is 10.96.0.1 + i, port 80, TCP.
const FRONTEND_BASE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
const FRONTEND_PORT: u16 = 80;
/// The backends every service shares: service id `s` selects among the first `s % 3 + 1`.
const BACKENDS: [SocketAddrV4; 3] = [
    SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 10), 8080),
    SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 11), 8080),
    SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 12), 8080),
];
/// Clients of the new-flow paths: flow `k` comes from 172.16.0.1 + k / 60000 (172.20.0.1 + ...
/// for the spread variant), port 1024 + k % 60000.
const NEW_FLOW_CLIENT_BASE: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 1);
const SPREAD_FLOW_CLIENT_BASE: Ipv4Addr = Ipv4Addr::new(172, 20, 0, 1);
const PORTS_PER_CLIENT: u32 = 60_000;
const ESTABLISHED_CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 40000);
const REPLY_CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 2), 40000);
const MISS_CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 3), 40000);
/// No frontend has this address.
const MISS_DESTINATION: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 80);
/// A prime larger than any frontend count: `k * STRIDE % n` visits every frontend once per `n`
/// new flows, in an order that spreads them over the hash table.
const STRIDE: u64 = 1_000_003;
/// New flows per size at most (both new-flow paths together): each one takes a conntrack entry
/// of the LRU map's 524288 (a SNAT flow would take two), and the bench wants none evicted.
const MAX_NEW_FLOWS: u32 = 200_000;
/// Unmeasured runs at the start of every block, after the previous block ran something else.
const BLOCK_WARMUP: u32 = 50;

/// Targets for the median net of the floor.
const ESTABLISHED_TARGET_NS: i64 = 45;
const NEW_FLOW_TARGET_NS: i64 = 300;
const MISS_TARGET_NS: i64 = 15;
/// The largest size's median within this fraction of the smallest size's...
const SCALE_TARGET: f64 = 0.10;
/// ...except for new flows spread over every frontend, which miss the CPU caches more as the
/// tables grow: within 1.3x.
const SPREAD_SCALE_TARGET: f64 = 0.30;

#[derive(Parser)]
#[command(
    name = "lb-bench",
    about = "Per-packet cost of the datapath through BPF_PROG_TEST_RUN (needs root)",
    // `cargo xtask bench` passes --out first; a later --out from its extra arguments wins.
    args_override_self = true
)]
struct Args {
    /// Measured runs per path and size.
    #[arg(long, default_value_t = 20_000)]
    iterations: u32,
    /// Unmeasured runs per path and size before the first round.
    #[arg(long, default_value_t = 2_000)]
    warmup: u32,
    /// Rounds the measured runs are split into; each round runs a block of every path at every
    /// size.
    #[arg(long, default_value_t = 20)]
    rounds: u32,
    /// Service (frontend) counts to measure at, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 1_000, 10_000, 100_000])]
    services: Vec<u32>,
    /// Where the JSON report goes.
    #[arg(long, default_value = "target/bench/datapath.json")]
    out: PathBuf,
    /// Instead of measuring, run only this path (its JSON key, e.g. xdp_established) at each size
    /// --iterations times, checking every output as usual, for a profiler to sample
    /// (`perf record -g -- lb-bench --profile xdp_established`). Writes no report.
    #[arg(long, value_parser = Series::parse)]
    profile: Option<Series>,
    /// With an `lb monitor` attached: every kind of event reported, and a thread reading the
    /// ring buffer as the monitor does (what watching costs the paths that report).
    #[arg(long)]
    monitor: bool,
}

/// What is measured: the floor program, then the datapath's paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Series {
    Floor,
    /// Every packet a new flow (a new client address:port) to one frontend.
    NewFlow,
    /// Every packet a new flow, each to the next frontend in an order scattered over the table.
    NewFlowSpread,
    Established,
    /// A UDP datagram of a live flow to the one frontend's UDP service: what `lb_xdp`'s tail
    /// call to `lb_xdp_udp` adds, beside the established TCP path.
    EstablishedUdp,
    /// A TCP SYN to no frontend.
    Miss,
    /// A TCP ACK to no frontend (the node's own connections): it pays the conntrack lookup
    /// established service flows skip the frontend lookup with.
    MissEstablished,
    NonIp,
    TcReply,
    /// A packet tc egress sees that is no reply of a flow (the node's own traffic): what every
    /// other packet leaving a NIC pays.
    TcOther,
}

impl Series {
    const ALL: [Self; 10] = [
        Self::Floor,
        Self::NewFlow,
        Self::NewFlowSpread,
        Self::Established,
        Self::EstablishedUdp,
        Self::Miss,
        Self::MissEstablished,
        Self::NonIp,
        Self::TcReply,
        Self::TcOther,
    ];

    fn key(self) -> &'static str {
        match self {
            Self::Floor => "floor",
            Self::NewFlow => "xdp_new_flow",
            Self::NewFlowSpread => "xdp_new_flow_spread",
            Self::Established => "xdp_established",
            Self::EstablishedUdp => "xdp_established_udp",
            Self::Miss => "xdp_miss",
            Self::MissEstablished => "xdp_miss_established",
            Self::NonIp => "xdp_non_ip",
            Self::TcReply => "tc_reply",
            Self::TcOther => "tc_other",
        }
    }

    fn parse(key: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|series| series.key() == key)
            .ok_or_else(|| {
                let keys: Vec<_> = Self::ALL.iter().map(|series| series.key()).collect();
                format!("no path {key:?}; one of {}", keys.join(", "))
            })
    }

    fn label(self) -> &'static str {
        match self {
            Self::Floor => "floor: bare XDP_PASS, raw",
            Self::NewFlow => "xdp new flow, one frontend",
            Self::NewFlowSpread => "xdp new flow, all frontends",
            Self::Established => "xdp established",
            Self::EstablishedUdp => "xdp established (udp)",
            Self::Miss => "xdp miss (syn)",
            Self::MissEstablished => "xdp miss (ack)",
            Self::NonIp => "xdp non-ip (arp)",
            Self::TcReply => "tc reply",
            Self::TcOther => "tc not a reply",
        }
    }

    fn target(self) -> Option<i64> {
        match self {
            Self::NewFlow | Self::NewFlowSpread => Some(NEW_FLOW_TARGET_NS),
            Self::Established => Some(ESTABLISHED_TARGET_NS),
            Self::Miss | Self::MissEstablished => Some(MISS_TARGET_NS),
            _ => None,
        }
    }

    /// How much dearer the path may be at the largest size than at the smallest.
    fn scale_target(self) -> f64 {
        if self == Self::NewFlowSpread {
            SPREAD_SCALE_TARGET
        } else {
            SCALE_TARGET
        }
    }
}

/// Order statistics of one series of runs, in ns as the kernel reported them.
#[derive(Clone, Copy, Debug, Serialize)]
struct Stats {
    runs: usize,
    min_ns: u32,
    median_ns: u32,
    p90_ns: u32,
    p99_ns: u32,
    max_ns: u32,
    mean_ns: f64,
    /// Mean of the middle half (25th to 75th percentile): finer than the median where the clock
    /// moves in steps (about 10 ns on the machine of docs/benchmarks.md).
    iqm_ns: f64,
}

impl Stats {
    fn of(samples: &[u32]) -> anyhow::Result<Self> {
        ensure!(!samples.is_empty(), "no samples");
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        // Nearest rank: the smallest sample with at least q of all samples at or below it.
        let rank = |q: f64| sorted[((q * sorted.len() as f64).ceil() as usize).max(1) - 1];
        let middle = &sorted[sorted.len() / 4..sorted.len() - sorted.len() / 4];
        Ok(Self {
            runs: sorted.len(),
            min_ns: sorted[0],
            median_ns: rank(0.5),
            p90_ns: rank(0.9),
            p99_ns: rank(0.99),
            max_ns: sorted[sorted.len() - 1],
            mean_ns: mean(&sorted),
            iqm_ns: mean(middle),
        })
    }
}

#[derive(Serialize)]
struct Report {
    command: &'static str,
    unix_time: u64,
    machine: Machine,
    method: Method,
    sizes: Vec<SizeReport>,
    targets: Vec<TargetReport>,
    /// With --monitor: the events the monitor thread read and the programs lost, by size. Lost
    /// reports cost less than read ones, so a figure with losses is too low.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    monitor_events: Vec<MonitorEvents>,
}

#[derive(Serialize)]
struct MonitorEvents {
    services: u32,
    read: u64,
    lost: u64,
}

#[derive(Serialize)]
struct Machine {
    nproc: usize,
    kernel: String,
    cpu_model: String,
    /// /proc/loadavg before and after: other work on the machine shows in the figures.
    loadavg_before: String,
    loadavg_after: String,
}

#[derive(Serialize)]
struct Method {
    repeat: u32,
    warmup: u32,
    iterations: u32,
    rounds: u32,
    block_warmup: u32,
    net: &'static str,
    floor_program: &'static str,
}

#[derive(Serialize)]
struct SizeReport {
    /// Frontends, each one TCP address:port: what the table calls services.
    services: u32,
    service_ids: u32,
    backends: usize,
    setup_s: f64,
    /// The floor program's runs at this size; its median is what the net figures subtract.
    floor: Stats,
    paths: Vec<PathReport>,
}

#[derive(Serialize)]
struct PathReport {
    path: &'static str,
    raw: Stats,
    net_median_ns: i64,
    net_p90_ns: i64,
}

#[derive(Serialize)]
struct TargetReport {
    target: String,
    path: &'static str,
    services: u32,
    /// ns for the latency targets, percent for the scaling one.
    value: f64,
    limit: f64,
    met: bool,
}

/// One size's datapath copy. Fields drop in order: the datapath, then its pin directory.
struct Loaded {
    datapath: Datapath,
    _pins: PinDir,
    services: u32,
    service_ids: u32,
    setup_s: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(!args.services.is_empty(), "no --services given");
    ensure!(
        args.rounds > 0 && args.iterations >= args.rounds,
        "--iterations must be at least --rounds, which must be at least 1"
    );
    // Profiling runs one path: only a new-flow path makes flows.
    let flows_per_path = match args.profile {
        Some(Series::NewFlow | Series::NewFlowSpread) => args.iterations,
        Some(_) => 0,
        None => args.warmup + args.iterations + args.rounds * BLOCK_WARMUP,
    };
    ensure!(
        2 * flows_per_path <= MAX_NEW_FLOWS,
        "{flows_per_path} new flows per new-flow path and size: more than {} (conntrack holds {} \
         entries, at most two per flow, and none may be evicted); lower --iterations or --warmup",
        MAX_NEW_FLOWS / 2,
        limits::MAX_CONNTRACK
    );
    for &services in &args.services {
        ensure!(
            (1..=limits::MAX_FRONTENDS).contains(&services),
            "--services {services}: must be 1..={}",
            limits::MAX_FRONTENDS
        );
    }

    let lab = Lab::new().context("the bench needs root (it loads eBPF programs)")?;
    let floor = lab::bare_xdp::load().context("loading the floor program")?;
    let floor = std::os::fd::AsFd::as_fd(&floor);
    let mut machine = machine();
    println!(
        "lb-bench: {} CPUs, kernel {}, {}; load average {}",
        machine.nproc, machine.kernel, machine.cpu_model, machine.loadavg_before
    );

    let mut loaded = Vec::new();
    let mut monitors = Vec::new();
    for (index, &services) in args.services.iter().enumerate() {
        // The index keeps the names apart when a size is given twice.
        let pins = PinDir::new(&lab, &format!("bench{index}-{services}"))?;
        let mut datapath = Datapath::load(pins.path()).context("loading the datapath")?;
        let started = Instant::now();
        let service_ids = install(&mut datapath, services)?;
        let setup_s = started.elapsed().as_secs_f64();
        if args.monitor {
            monitors.push(MonitorDrain::attach(pins.path())?);
        }
        println!(
            "{services} services: {service_ids} service ids, {} backends, set up in {setup_s:.1} s",
            BACKENDS.len()
        );
        loaded.push(Loaded {
            datapath,
            _pins: pins,
            services,
            service_ids,
            setup_s,
        });
    }
    let mut benches = loaded
        .iter()
        .map(|loaded| SizeBench::new(loaded, floor))
        .collect::<anyhow::Result<Vec<_>>>()?;

    if let Some(series) = args.profile {
        for bench in &mut benches {
            let started = Instant::now();
            bench.run(series, args.iterations, false)?;
            println!(
                "{} services: {} runs of {} in {:.1} s",
                bench.loaded.services,
                args.iterations,
                series.key(),
                started.elapsed().as_secs_f64()
            );
        }
        for monitor in monitors {
            let (read, lost) = monitor.detach()?;
            println!("monitor: {read} events read, {lost} lost");
        }
        return Ok(());
    }
    println!(
        "measuring: repeat=1; per path and size {} warm-up runs, then {} measured runs in {} rounds \
         (each block after {BLOCK_WARMUP} unmeasured runs)",
        args.warmup, args.iterations, args.rounds
    );
    let started = Instant::now();
    for bench in &mut benches {
        for series in Series::ALL {
            bench.run(series, args.warmup, false)?;
        }
    }
    for round in 0..args.rounds {
        let block =
            args.iterations / args.rounds + u32::from(round < args.iterations % args.rounds);
        // Rotated every round, so no path always follows the same one.
        let count = benches.len() * Series::ALL.len();
        for step in 0..count {
            let slot = (step + round as usize) % count;
            let bench = &mut benches[slot / Series::ALL.len()];
            let series = Series::ALL[slot % Series::ALL.len()];
            bench.run(series, BLOCK_WARMUP, false)?;
            bench.run(series, block, true)?;
        }
    }
    println!("measured in {:.1} s", started.elapsed().as_secs_f64());
    let mut monitor_events = Vec::new();
    for (monitor, loaded) in monitors.into_iter().zip(&loaded) {
        let (read, lost) = monitor.detach()?;
        println!("monitor: {read} events read, {lost} lost");
        monitor_events.push(MonitorEvents {
            services: loaded.services,
            read,
            lost,
        });
    }
    let sizes = benches
        .iter()
        .map(SizeBench::finish)
        .collect::<anyhow::Result<Vec<_>>>()?;

    machine.loadavg_after = loadavg();
    println!("load average after: {}", machine.loadavg_after);
    let targets = evaluate_targets(&sizes);
    print_table(&sizes, &targets, &args);

    let report = Report {
        command: "cargo xtask bench",
        unix_time: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs()),
        machine,
        method: Method {
            repeat: 1,
            warmup: args.warmup,
            iterations: args.iterations,
            rounds: args.rounds,
            block_warmup: BLOCK_WARMUP,
            net: "path median (or p90) minus the median of the floor program's runs at the same size",
            floor_program: "bare XDP_PASS: r0 = 2; exit",
        },
        sizes,
        targets,
        monitor_events,
    };
    if let Some(dir) = args.out.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(&args.out, json + "\n")
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!("\nJSON: {}", args.out.display());
    Ok(())
}

/// The packets and state of every path at one size, and the samples taken so far.
struct SizeBench<'a> {
    loaded: &'a Loaded,
    xdp: BorrowedFd<'a>,
    tc: BorrowedFd<'a>,
    floor: BorrowedFd<'a>,
    /// The frontend of the one-frontend, established and reply paths (the middle of the table).
    frontend: SocketAddrV4,
    floor_input: Vec<u8>,
    established: (Vec<u8>, Vec<u8>),
    established_udp: (Vec<u8>, Vec<u8>),
    reply: (Vec<u8>, Vec<u8>),
    miss: Vec<u8>,
    miss_established: Vec<u8>,
    non_ip: Vec<u8>,
    /// Flows created so far by the two new-flow paths.
    flows: [u32; 2],
    /// New flows the service counters held before the first new-flow run.
    flows_before: u64,
    samples: Vec<Vec<u32>>,
}

impl<'a> SizeBench<'a> {
    /// Creates the flows the established and reply paths use (one packet each, unmeasured).
    fn new(loaded: &'a Loaded, floor: BorrowedFd<'a>) -> anyhow::Result<Self> {
        let xdp = loaded.datapath.program_fd(program_names::XDP_LB)?;
        let tc = loaded.datapath.program_fd(program_names::TC_EGRESS)?;
        let frontend = frontend_addr(loaded.services / 2);
        let first = |client| -> anyhow::Result<SocketAddrV4> {
            let syn = packet::tcp(client, frontend, TcpFlags::SYN, b"");
            let out = run_once(xdp, &syn, XDP_PASS, "a flow's first packet")?;
            l4_destination(&out.packet)
        };
        let backend = first(ESTABLISHED_CLIENT)?;
        let established = (
            packet::tcp(ESTABLISHED_CLIENT, frontend, TcpFlags::ACK, b""),
            packet::tcp(ESTABLISHED_CLIENT, backend, TcpFlags::ACK, b""),
        );
        let udp = packet::udp(ESTABLISHED_CLIENT, frontend, b"");
        let udp_backend =
            l4_destination(&run_once(xdp, &udp, XDP_PASS, "a UDP flow's first datagram")?.packet)?;
        let established_udp = (udp, packet::udp(ESTABLISHED_CLIENT, udp_backend, b""));
        let backend = first(REPLY_CLIENT)?;
        let reply = (
            packet::tcp(backend, REPLY_CLIENT, TcpFlags::ACK, b""),
            packet::tcp(frontend, REPLY_CLIENT, TcpFlags::ACK, b""),
        );
        Ok(Self {
            loaded,
            xdp,
            tc,
            floor,
            frontend,
            floor_input: established.0.clone(),
            established,
            established_udp,
            reply,
            miss: packet::tcp(MISS_CLIENT, MISS_DESTINATION, TcpFlags::SYN, b""),
            miss_established: packet::tcp(MISS_CLIENT, MISS_DESTINATION, TcpFlags::ACK, b""),
            non_ip: packet::non_ip(0x0806, 28),
            flows: [0; 2],
            flows_before: new_flows_total(&loaded.datapath, loaded.service_ids)?,
            samples: vec![Vec::new(); Series::ALL.len()],
        })
    }

    /// Runs `series` `count` times, checking every verdict and output; keeps the durations when
    /// `keep`.
    fn run(&mut self, series: Series, count: u32, keep: bool) -> anyhow::Result<()> {
        let index = Series::ALL
            .iter()
            .position(|&s| s == series)
            .expect("every series is in ALL");
        for _ in 0..count {
            let ns = self.run_one(series)?;
            if keep {
                self.samples[index].push(ns);
            }
        }
        Ok(())
    }

    fn run_one(&mut self, series: Series) -> anyhow::Result<u32> {
        let what = series.label();
        let out = match series {
            Series::Floor => run_once(self.floor, &self.floor_input, XDP_PASS, what)?,
            Series::NewFlow | Series::NewFlowSpread => {
                let spread = series == Series::NewFlowSpread;
                let k = &mut self.flows[usize::from(spread)];
                let client = new_flow_client(spread, *k);
                let frontend = if spread {
                    frontend_addr(scrambled(*k, self.loaded.services))
                } else {
                    self.frontend
                };
                *k += 1;
                let input = packet::tcp(client, frontend, TcpFlags::SYN, b"");
                let out = run_once(self.xdp, &input, XDP_PASS, what)?;
                let backend = l4_destination(&out.packet)?;
                ensure!(
                    BACKENDS.contains(&backend)
                        && out.packet == packet::tcp(client, backend, TcpFlags::SYN, b""),
                    "{what}: {client} -> {frontend} left {:02x?}",
                    out.packet
                );
                out
            }
            Series::Established | Series::EstablishedUdp => {
                let (input, expected) = if series == Series::Established {
                    &self.established
                } else {
                    &self.established_udp
                };
                let out = run_once(self.xdp, input, XDP_PASS, what)?;
                ensure!(&out.packet == expected, "{what}: not DNATed to its backend");
                out
            }
            Series::Miss | Series::MissEstablished | Series::NonIp => {
                let input = match series {
                    Series::Miss => &self.miss,
                    Series::MissEstablished => &self.miss_established,
                    _ => &self.non_ip,
                };
                let out = run_once(self.xdp, input, XDP_PASS, what)?;
                ensure!(&out.packet == input, "{what}: packet changed");
                out
            }
            Series::TcReply => {
                let (input, expected) = &self.reply;
                let out = run_once(self.tc, input, TC_ACT_OK, what)?;
                ensure!(
                    &out.packet == expected,
                    "{what}: source not rewritten to {}",
                    self.frontend
                );
                out
            }
            Series::TcOther => {
                let input = &self.miss_established;
                let out = run_once(self.tc, input, TC_ACT_OK, what)?;
                ensure!(&out.packet == input, "{what}: packet changed");
                out
            }
        };
        Ok(u32::try_from(out.duration.as_nanos()).unwrap_or(u32::MAX))
    }

    /// Checks that exactly the new-flow packets created flows, and sums up.
    fn finish(&self) -> anyhow::Result<SizeReport> {
        let loaded = self.loaded;
        let created = new_flows_total(&loaded.datapath, loaded.service_ids)? - self.flows_before;
        let sent: u64 = self.flows.iter().copied().map(u64::from).sum();
        ensure!(
            created == sent,
            "{} services: the services counted {created} new flows for {sent} new-flow packets",
            loaded.services
        );
        let floor = Stats::of(&self.samples[0]).context("floor")?;
        let floor_median = i64::from(floor.median_ns);
        let paths = Series::ALL
            .iter()
            .zip(&self.samples)
            .skip(1)
            .map(|(series, samples)| {
                let raw = Stats::of(samples).context(series.key())?;
                Ok(PathReport {
                    path: series.key(),
                    raw,
                    net_median_ns: i64::from(raw.median_ns) - floor_median,
                    net_p90_ns: i64::from(raw.p90_ns) - floor_median,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(SizeReport {
            services: loaded.services,
            service_ids: loaded.service_ids,
            backends: BACKENDS.len(),
            setup_s: loaded.setup_s,
            floor,
            paths,
        })
    }
}

/// Puts the shared backends and `services` frontends spread over at most [`MAX_SERVICE_IDS`]
/// service ids (frontend `i` belongs to id `i % ids`), and a UDP service (the next id, whose new
/// flows the totals leave out) on the middle frontend's address and port. Returns the number of
/// TCP service ids.
fn install(datapath: &mut Datapath, services: u32) -> anyhow::Result<u32> {
    for (id, addr) in (1..).zip(BACKENDS) {
        datapath.put_backend(
            id,
            &Backend {
                addr: std::net::IpAddr::V4(*addr.ip()),
                port: addr.port(),
                proto: proto::TCP,
                flags: 0,
            },
        )?;
    }
    let ids = services.min(MAX_SERVICE_IDS);
    let per_id = services.div_ceil(ids);
    for id in 0..ids {
        let frontends = (0..per_id)
            .map(|k| id + k * ids)
            .filter(|&index| index < services)
            .map(|index| {
                let addr = frontend_addr(index);
                Frontend {
                    addr: std::net::IpAddr::V4(*addr.ip()),
                    port: addr.port(),
                    proto: proto::TCP,
                    kind: service_flags::CLUSTER_IP,
                }
            })
            .collect();
        datapath.put_service(&Service {
            id,
            frontends,
            backends: (1..=id % 3 + 1).collect(),
            affinity_timeout_s: 0,
            ..Default::default()
        })?;
    }
    let udp_ids = (1..).map(|id| id + BACKENDS.len() as u32);
    for (id, addr) in udp_ids.clone().zip(BACKENDS) {
        datapath.put_backend(
            id,
            &Backend {
                addr: std::net::IpAddr::V4(*addr.ip()),
                port: addr.port(),
                proto: proto::UDP,
                flags: 0,
            },
        )?;
    }
    let middle = frontend_addr(services / 2);
    datapath.put_service(&Service {
        id: ids,
        frontends: vec![Frontend {
            addr: std::net::IpAddr::V4(*middle.ip()),
            port: middle.port(),
            proto: proto::UDP,
            kind: service_flags::CLUSTER_IP,
        }],
        backends: udp_ids.take(BACKENDS.len()).collect(),
        ..Default::default()
    })?;
    Ok(ids)
}

fn run_once(
    program: BorrowedFd<'_>,
    packet: &[u8],
    verdict: u32,
    what: &str,
) -> anyhow::Result<TestRunOutput> {
    let out = test_run(program, packet).with_context(|| format!("{what}: BPF_PROG_TEST_RUN"))?;
    if out.verdict != verdict {
        bail!("{what}: verdict {} (expected {verdict})", out.verdict);
    }
    Ok(out)
}

fn frontend_addr(index: u32) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from(FRONTEND_BASE) + index),
        FRONTEND_PORT,
    )
}

fn new_flow_client(spread: bool, k: u32) -> SocketAddrV4 {
    let base = if spread {
        SPREAD_FLOW_CLIENT_BASE
    } else {
        NEW_FLOW_CLIENT_BASE
    };
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from(base) + k / PORTS_PER_CLIENT),
        1024 + (k % PORTS_PER_CLIENT) as u16,
    )
}

/// The frontend index of new flow `k`: every frontend once per `services` flows, scattered.
fn scrambled(k: u32, services: u32) -> u32 {
    (u64::from(k) * STRIDE % u64::from(services)) as u32
}

/// Destination address and port of an Ethernet/IPv4 (no options)/TCP frame.
/// The destination address and port of a TCP or UDP frame (IPv4 without options).
fn l4_destination(frame: &[u8]) -> anyhow::Result<SocketAddrV4> {
    let ip = ETH_HDR_LEN;
    ensure!(
        frame.len() >= ip + 24 && frame[ip] == 0x45,
        "not an IPv4 frame without options"
    );
    let addr = Ipv4Addr::new(
        frame[ip + 16],
        frame[ip + 17],
        frame[ip + 18],
        frame[ip + 19],
    );
    let port = u16::from_be_bytes([frame[ip + 22], frame[ip + 23]]);
    Ok(SocketAddrV4::new(addr, port))
}

/// New flows counted by every service, summed.
fn new_flows_total(datapath: &Datapath, service_ids: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for id in 0..service_ids {
        total += datapath.service_counter(id)?.new_flows;
    }
    Ok(total)
}

fn evaluate_targets(sizes: &[SizeReport]) -> Vec<TargetReport> {
    let mut targets = Vec::new();
    for size in sizes {
        for (series, path) in Series::ALL[1..].iter().zip(&size.paths) {
            let Some(limit) = series.target() else {
                continue;
            };
            targets.push(TargetReport {
                target: format!("{} <= {limit} ns net of the floor", path.path),
                path: path.path,
                services: size.services,
                value: path.net_median_ns as f64,
                limit: limit as f64,
                met: path.net_median_ns <= limit,
            });
        }
    }
    if let [smallest, .., largest] = sizes {
        let pairs = smallest.paths.iter().zip(&largest.paths);
        for (series, (small, large)) in Series::ALL[1..].iter().zip(pairs) {
            let Some(change) = relative_change(small.net_median_ns, large.net_median_ns) else {
                continue;
            };
            let limit = series.scale_target();
            targets.push(TargetReport {
                target: format!(
                    "{} at {} services within {}% of {}",
                    small.path,
                    largest.services,
                    limit * 100.0,
                    smallest.services
                ),
                path: small.path,
                services: largest.services,
                value: change * 100.0,
                limit: limit * 100.0,
                met: change <= limit,
            });
        }
    }
    targets
}

/// `(to - from) / from`, or None when `from` is not positive (a path no costlier than the floor).
fn relative_change(from: i64, to: i64) -> Option<f64> {
    (from > 0).then(|| (to - from) as f64 / from as f64)
}

fn print_table(sizes: &[SizeReport], targets: &[TargetReport], args: &Args) {
    println!(
        "\nper-packet cost, ns, median / p90 net of the floor (BPF_PROG_TEST_RUN, repeat=1, {} runs \
         per cell after {} warm-up; the floor row is raw)\n",
        args.iterations, args.warmup
    );
    let mut header = String::from("| path |");
    let mut rule = String::from("|---|");
    for size in sizes {
        header += &format!(" {} services |", size.services);
        rule += "---:|";
    }
    println!("{header} target |\n{rule}---|");
    let mut floor_row = format!("| {} |", Series::Floor.label());
    for size in sizes {
        floor_row += &format!(" {} / {} |", size.floor.median_ns, size.floor.p90_ns);
    }
    println!("{floor_row} |");
    for (index, series) in Series::ALL[1..].iter().enumerate() {
        let mut row = format!("| {} |", series.label());
        for size in sizes {
            let path = &size.paths[index];
            row += &format!(" {} / {} |", path.net_median_ns, path.net_p90_ns);
        }
        let target = match series.target() {
            Some(limit) => format!(" <= {limit} |"),
            None => " |".to_owned(),
        };
        println!("{row}{target}");
    }
    println!("\ntargets (docs/benchmarks.md), on the median net of the floor:");
    for target in targets.iter().filter(|target| !target.target.contains('%')) {
        println!(
            "  {:<66} {:>5} ns  {}",
            format!("{} [{} services]", target.target, target.services),
            target.value,
            verdict(target.met)
        );
    }
    if let [smallest, .., largest] = sizes {
        println!(
            "\n{} vs {} services, median net of the floor (target: within {}%, {}% for new \
             flows spread over every frontend):",
            largest.services,
            smallest.services,
            SCALE_TARGET * 100.0,
            SPREAD_SCALE_TARGET * 100.0
        );
        let pairs = smallest.paths.iter().zip(&largest.paths);
        for (series, (small, large)) in Series::ALL[1..].iter().zip(pairs) {
            let change = match relative_change(small.net_median_ns, large.net_median_ns) {
                Some(change) => format!(
                    "{:+.1}%  {}",
                    change * 100.0,
                    verdict(change <= series.scale_target())
                ),
                None => "n/a (not above the floor)".to_owned(),
            };
            println!(
                "  {:<20} {:>5} -> {:>5} ns  {change}",
                small.path, small.net_median_ns, large.net_median_ns
            );
        }
    }
}

fn mean(samples: &[u32]) -> f64 {
    samples.iter().map(|&ns| f64::from(ns)).sum::<f64>() / samples.len() as f64
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|load| load.trim().to_owned())
        .unwrap_or_default()
}

fn machine() -> Machine {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|cpuinfo| {
            cpuinfo.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == "model name").then(|| value.trim().to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    Machine {
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel,
        cpu_model,
        loadavg_before: loadavg(),
        loadavg_after: String::new(),
    }
}

/// What `lb monitor` does to a datapath while it runs: every kind of event on, and the ring
/// buffer read as fast as events come.
struct MonitorDrain {
    cell: MonitorControlCell,
    owner: Owner,
    stop: Arc<AtomicBool>,
    reader: std::thread::JoinHandle<anyhow::Result<u64>>,
    lost: PerCpuArray<MapData, u64>,
}

impl MonitorDrain {
    fn attach(pin_dir: &std::path::Path) -> anyhow::Result<Self> {
        let mut cell = MonitorControlCell::open(pin_dir)?;
        let all = lb_common::monitor::kind::ALL
            .iter()
            .fold(0, |kinds, (bit, _)| kinds | bit);
        let owner = Owner::this_process()?;
        cell.claim(all, 1, owner)?;
        let mut ring: RingBuf<MapData> =
            open_map(pin_dir, map_names::MONITOR_EVENTS, Access::ReadWrite)?;
        let lost = open_map(pin_dir, map_names::MONITOR_LOST, Access::ReadOnly)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let reader = std::thread::spawn(move || {
            let mut read = 0;
            while !stopped.load(Ordering::Relaxed) {
                while ring.next().is_some() {
                    read += 1;
                }
                let mut poll = libc::pollfd {
                    fd: ring.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd, alive for the call.
                unsafe { libc::poll(&mut poll, 1, 100) };
            }
            while ring.next().is_some() {
                read += 1;
            }
            Ok(read)
        });
        Ok(Self {
            cell,
            owner,
            stop,
            reader,
            lost,
        })
    }

    /// Turns the reports off; returns the events read and lost.
    fn detach(mut self) -> anyhow::Result<(u64, u64)> {
        self.cell.release(self.owner)?;
        self.stop.store(true, Ordering::Relaxed);
        let read = self
            .reader
            .join()
            .map_err(|_| anyhow::anyhow!("the ring buffer reader panicked"))??;
        let lost = self.lost.get(&0, 0)?.iter().sum();
        Ok((read, lost))
    }
}
