//! `cargo xtask bench`: what one packet costs on each path of the datapath, as the kernel measures
//! it through `BPF_PROG_TEST_RUN`, at 1, 1k, 10k and 100k services, over IPv4 and over IPv6 (each
//! IPv4 path has an IPv6 twin, and the report gives the ratio of the two). Prints a table and
//! writes JSON (target/bench/datapath.json); docs/benchmarks.md explains the method.
//!
//! Every sample is one run with `repeat = 1`: with `repeat > 1` the kernel reruns the buffer the
//! previous repetition rewrote, so a DNATed packet would be measured as a miss from the second
//! repetition on. A single run's duration includes the kernel's timing harness (clock reads, the
//! loop around the program), so the figures are reported net of the median of a bare XDP_PASS
//! program (two instructions, [`lab::bare_xdp`]) measured the same way in the same run.
//!
//! Every size has its own copy of the datapath for each family (N IPv4 services in one, N IPv6
//! services in the other: a family's services are service ids of their own, and 100k of each
//! would not fit one copy's 65,536), all loaded at once, and the runs are interleaved: each round
//! measures a block of every path of both families (and the floor) at every size, so whatever
//! else the machine does during the bench spreads over all the figures instead of skewing some of
//! them.
//!
//! Each copy's maps are pinned in a private bpffs directory ([`PinDir`]) that is removed on drop,
//! also when the bench fails; a bench killed outright is swept by the next [`Lab::new`]. The
//! agent's own maps are never touched.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd as _, BorrowedFd},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail, ensure};
use aya::maps::{Array, MapData, PerCpuArray, RingBuf};
use clap::Parser;
use lab::{
    lab::{Lab, PinDir},
    packet::{self, ETH_HDR_LEN, TcpFlags},
    packet6::{self, IPV6_HDR_LEN, next_header},
};
use lb_common::{
    flow_cache, frontend_filter, limits, map_names, program_names, proto, service_flags,
};
use lb_userspace::{
    compile::model::{Backend, Frontend, Service, ipv6_words},
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
/// Frontend `i` is 10.96.0.1 + i (fd00:10:96::1 + i over IPv6), port 80, TCP.
const FRONTEND_BASE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
const FRONTEND_BASE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 1);
const FRONTEND_PORT: u16 = 80;
/// The backends every service shares: service id `s` selects among the first `s % 3 + 1`.
const BACKENDS: [SocketAddrV4; 3] = [
    SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 10), 8080),
    SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 11), 8080),
    SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 12), 8080),
];
/// The IPv6 services' backends, chosen the same way.
const BACKENDS6: [SocketAddrV6; 3] = [
    SocketAddrV6::new(
        Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x10),
        8080,
        0,
        0,
    ),
    SocketAddrV6::new(
        Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x11),
        8080,
        0,
        0,
    ),
    SocketAddrV6::new(
        Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x12),
        8080,
        0,
        0,
    ),
];
/// Clients of the new-flow paths: flow `k` comes from 172.16.0.1 + k / 60000 (172.20.0.1 + ...
/// for the spread variant), port 1024 + k % 60000; over IPv6 from 2001:db8:16::1 + k / 60000
/// (2001:db8:20::1 + ...).
const NEW_FLOW_CLIENT_BASE: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 1);
const SPREAD_FLOW_CLIENT_BASE: Ipv4Addr = Ipv4Addr::new(172, 20, 0, 1);
const NEW_FLOW_CLIENT_BASE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x16, 0, 0, 0, 0, 1);
const SPREAD_FLOW_CLIENT_BASE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x20, 0, 0, 0, 0, 1);
const PORTS_PER_CLIENT: u32 = 60_000;
const ESTABLISHED_CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 40000);
const REPLY_CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 2), 40000);
const MISS_CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 3), 40000);
const RETRANSMIT_CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 4), 40000);
const ESTABLISHED_CLIENT6: SocketAddrV6 =
    SocketAddrV6::new(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1), 40000, 0, 0);
const REPLY_CLIENT6: SocketAddrV6 =
    SocketAddrV6::new(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2), 40000, 0, 0);
const MISS_CLIENT6: SocketAddrV6 =
    SocketAddrV6::new(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 3), 40000, 0, 0);
const RETRANSMIT_CLIENT6: SocketAddrV6 =
    SocketAddrV6::new(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 4), 40000, 0, 0);
/// No frontend has this address (198.18.0.0/15 and 2001:2::/48 are for benchmarks); the bench
/// checks that no frontend shares its bit of the frontend filter, so that the miss paths measure
/// the filter's pass and not a frontend lookup.
const MISS_DESTINATION: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 80);
const MISS_DESTINATION6: SocketAddrV6 =
    SocketAddrV6::new(Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1), 80, 0, 0);
/// A prime larger than any frontend count: `k * STRIDE % n` visits every frontend once per `n`
/// new flows, in an order that spreads them over the hash table.
const STRIDE: u64 = 1_000_003;
/// The new-flow paths: to one frontend, spread over every frontend, and UDP.
const NEW_FLOW_PATHS: u32 = 3;
/// New flows per size at most (the new-flow paths together): each one takes one conntrack
/// entry of the LRU map's 524288 (none goes through SNAT, which would add a second: every new
/// flow's output is checked to keep its client's address and port), and the bench wants none
/// evicted.
const MAX_NEW_FLOWS: u32 = 200_000;
/// The same for IPv6, whose conntrack map holds a quarter as many entries (131,072).
const MAX_NEW_FLOWS6: u32 = 100_000;
/// The flows of the many-flows established path ([`Series::EstablishedMany`]): more than a
/// CPU's flow-cache slots. Flow `k` comes from 172.24.0.1 (2001:db8:24::1), port 1024 + k.
const MANY_FLOWS: u32 = 16_384;
const MANY_FLOWS_CLIENT: Ipv4Addr = Ipv4Addr::new(172, 24, 0, 1);
const MANY_FLOWS_CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x24, 0, 0, 0, 0, 1);
// The many flows' entries (one each: their endpoints are local, as the flow cache needs) fit
// beside the most the new-flow paths may take, so that none is evicted.
const _: () = assert!(
    MAX_NEW_FLOWS + MANY_FLOWS < limits::MAX_CONNTRACK
        && MAX_NEW_FLOWS6 + MANY_FLOWS < limits::MAX_CONNTRACK6
);
/// Unmeasured runs at the start of every block, after the previous block ran something else:
/// enough for a flow cache's gate that a block of many flows closed to open again
/// ([`lb_common::FlowCacheGate`]).
const BLOCK_WARMUP: u32 = flow_cache::GATE_CLOSED_FOR + 50;
/// The same for the new-flow paths, each of whose runs takes a conntrack entry.
const NEW_FLOW_BLOCK_WARMUP: u32 = 50;

/// Targets for the median net of the floor.
const ESTABLISHED_TARGET_NS: i64 = 45;
const NEW_FLOW_TARGET_NS: i64 = 300;
const MISS_TARGET_NS: i64 = 15;
/// The largest size's median within this fraction of the smallest size's...
const SCALE_TARGET: f64 = 0.10;
/// ...except for new flows spread over every frontend, which miss the CPU caches more as the
/// tables grow: within 1.3x.
const SPREAD_SCALE_TARGET: f64 = 0.30;
/// Every IPv6 path at most this many times its IPv4 twin, at every size (median net of the
/// floor).
const FAMILY_RATIO_TARGET: f64 = 1.15;

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
    #[arg(long, value_parser = Path::parse)]
    profile: Option<Path>,
    /// With --profile: also write where each source line of every loaded program begins in its
    /// JIT image (tab-separated; `cargo xtask profile` joins it with perf's samples).
    #[arg(long, requires = "profile")]
    jit_lines: Option<PathBuf>,
    /// With an `lb monitor` attached: every kind of event reported, and a thread reading the
    /// ring buffer as the monitor does (what watching costs the paths that report).
    #[arg(long)]
    monitor: bool,
}

/// The kind of packet a path measures (the floor program, then the datapath's paths); each
/// kind but the floor is measured over both families ([`Path`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Series {
    Floor,
    /// Every packet a new flow (a new client address:port) to one frontend.
    NewFlow,
    /// Every packet a new flow, each to the next frontend in an order scattered over the table.
    NewFlowSpread,
    Established,
    /// Every packet an ACK of the next of [`MANY_FLOWS`] established flows to the one frontend,
    /// in turn: many more flows than a CPU's flow-cache slots, so nearly every packet misses its
    /// slot, takes the conntrack lookup and writes the slot for the next flow to overwrite, and
    /// the entries and slots it touches have left the CPU's caches since their flow's last
    /// packet. What the cache costs where it cannot help.
    EstablishedMany,
    /// A TCP SYN sent again on a live flow (a retransmit): its client's key is held, so the
    /// claim a new flow makes without a lookup fails, and the packet goes to the program that
    /// looks the key up (`lb_xdp_lookup`; over IPv6 back to `lb_xdp6_frontend`), which sends it
    /// where its flow goes.
    SynRetransmit,
    /// A UDP datagram of a live flow to the one frontend's UDP service: what `lb_xdp`'s tail
    /// call to `lb_xdp_udp` adds, beside the established TCP path.
    EstablishedUdp,
    /// Every datagram a new UDP flow (a new client address:port) to the one frontend's UDP
    /// service: a UDP flow's every first datagram, such as a DNS query's, which looks its
    /// tuple up in the node's socket table before it takes a conntrack entry.
    NewFlowUdp,
    /// A TCP SYN to no frontend.
    Miss,
    /// A TCP ACK to no frontend (the node's own connections): it pays the conntrack lookup
    /// established service flows skip the frontend lookup with.
    MissEstablished,
    /// Over IPv4 an ARP frame; over IPv6 its counterpart, a neighbour solicitation (ICMPv6,
    /// which `lb_xdp` hands to `lb_xdp6` like every IPv6 frame).
    NonIp,
    TcReply,
    /// Every packet an answer of the endpoint of the next of the [`MANY_FLOWS`] flows of
    /// [`Series::EstablishedMany`]: the same for tc egress's answer cache.
    TcReplyMany,
    /// A packet tc egress sees that is no reply of a flow (the node's own traffic): what every
    /// other packet leaving a NIC pays.
    TcOther,
}

impl Series {
    fn target(self) -> Option<i64> {
        match self {
            Self::NewFlow | Self::NewFlowSpread => Some(NEW_FLOW_TARGET_NS),
            Self::Established => Some(ESTABLISHED_TARGET_NS),
            Self::Miss | Self::MissEstablished => Some(MISS_TARGET_NS),
            _ => None,
        }
    }

    /// Unmeasured runs before each of the path's blocks.
    fn block_warmup(self) -> u32 {
        match self {
            Self::NewFlow | Self::NewFlowSpread | Self::NewFlowUdp => NEW_FLOW_BLOCK_WARMUP,
            _ => BLOCK_WARMUP,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// What is measured: the floor program, then the datapath's paths over IPv4, then their IPv6
/// twins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Path {
    series: Series,
    family: Family,
}

impl Path {
    const fn v4(series: Series) -> Self {
        Self {
            series,
            family: Family::V4,
        }
    }

    const fn v6(series: Series) -> Self {
        Self {
            series,
            family: Family::V6,
        }
    }

    const FLOOR: Self = Self::v4(Series::Floor);

    const ALL: [Self; 27] = [
        Self::FLOOR,
        Self::v4(Series::NewFlow),
        Self::v4(Series::NewFlowSpread),
        Self::v4(Series::Established),
        Self::v4(Series::EstablishedMany),
        Self::v4(Series::SynRetransmit),
        Self::v4(Series::EstablishedUdp),
        Self::v4(Series::NewFlowUdp),
        Self::v4(Series::Miss),
        Self::v4(Series::MissEstablished),
        Self::v4(Series::NonIp),
        Self::v4(Series::TcReply),
        Self::v4(Series::TcReplyMany),
        Self::v4(Series::TcOther),
        Self::v6(Series::NewFlow),
        Self::v6(Series::NewFlowSpread),
        Self::v6(Series::Established),
        Self::v6(Series::EstablishedMany),
        Self::v6(Series::SynRetransmit),
        Self::v6(Series::EstablishedUdp),
        Self::v6(Series::NewFlowUdp),
        Self::v6(Series::Miss),
        Self::v6(Series::MissEstablished),
        Self::v6(Series::NonIp),
        Self::v6(Series::TcReply),
        Self::v6(Series::TcReplyMany),
        Self::v6(Series::TcOther),
    ];

    fn key(self) -> &'static str {
        match (self.family, self.series) {
            (_, Series::Floor) => "floor",
            (Family::V4, Series::NewFlow) => "xdp_new_flow",
            (Family::V4, Series::NewFlowSpread) => "xdp_new_flow_spread",
            (Family::V4, Series::Established) => "xdp_established",
            (Family::V4, Series::EstablishedMany) => "xdp_established_many",
            (Family::V4, Series::SynRetransmit) => "xdp_syn_retransmit",
            (Family::V4, Series::EstablishedUdp) => "xdp_established_udp",
            (Family::V4, Series::NewFlowUdp) => "xdp_new_flow_udp",
            (Family::V4, Series::Miss) => "xdp_miss",
            (Family::V4, Series::MissEstablished) => "xdp_miss_established",
            (Family::V4, Series::NonIp) => "xdp_non_ip",
            (Family::V4, Series::TcReply) => "tc_reply",
            (Family::V4, Series::TcReplyMany) => "tc_reply_many",
            (Family::V4, Series::TcOther) => "tc_other",
            (Family::V6, Series::NewFlow) => "xdp6_new_flow",
            (Family::V6, Series::NewFlowSpread) => "xdp6_new_flow_spread",
            (Family::V6, Series::Established) => "xdp6_established",
            (Family::V6, Series::EstablishedMany) => "xdp6_established_many",
            (Family::V6, Series::SynRetransmit) => "xdp6_syn_retransmit",
            (Family::V6, Series::EstablishedUdp) => "xdp6_established_udp",
            (Family::V6, Series::NewFlowUdp) => "xdp6_new_flow_udp",
            (Family::V6, Series::Miss) => "xdp6_miss",
            (Family::V6, Series::MissEstablished) => "xdp6_miss_established",
            (Family::V6, Series::NonIp) => "xdp6_neighbour_solicitation",
            (Family::V6, Series::TcReply) => "tc6_reply",
            (Family::V6, Series::TcReplyMany) => "tc6_reply_many",
            (Family::V6, Series::TcOther) => "tc6_other",
        }
    }

    fn parse(key: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|path| path.key() == key)
            .ok_or_else(|| {
                let keys: Vec<_> = Self::ALL.iter().map(|path| path.key()).collect();
                format!("no path {key:?}; one of {}", keys.join(", "))
            })
    }

    fn label(self) -> &'static str {
        match (self.family, self.series) {
            (_, Series::Floor) => "floor: bare XDP_PASS, raw",
            (Family::V4, Series::NewFlow) => "xdp new flow, one frontend",
            (Family::V4, Series::NewFlowSpread) => "xdp new flow, all frontends",
            (Family::V4, Series::Established) => "xdp established",
            (Family::V4, Series::EstablishedMany) => "xdp established, 16,384 flows",
            (Family::V4, Series::SynRetransmit) => "xdp retransmitted syn",
            (Family::V4, Series::EstablishedUdp) => "xdp established (udp)",
            (Family::V4, Series::NewFlowUdp) => "xdp new flow (udp)",
            (Family::V4, Series::Miss) => "xdp miss (syn)",
            (Family::V4, Series::MissEstablished) => "xdp miss (ack)",
            (Family::V4, Series::NonIp) => "xdp non-ip (arp)",
            (Family::V4, Series::TcReply) => "tc reply",
            (Family::V4, Series::TcReplyMany) => "tc reply, 16,384 flows",
            (Family::V4, Series::TcOther) => "tc not a reply",
            (Family::V6, Series::NewFlow) => "xdp6 new flow, one frontend",
            (Family::V6, Series::NewFlowSpread) => "xdp6 new flow, all frontends",
            (Family::V6, Series::Established) => "xdp6 established",
            (Family::V6, Series::EstablishedMany) => "xdp6 established, 16,384 flows",
            (Family::V6, Series::SynRetransmit) => "xdp6 retransmitted syn",
            (Family::V6, Series::EstablishedUdp) => "xdp6 established (udp)",
            (Family::V6, Series::NewFlowUdp) => "xdp6 new flow (udp)",
            (Family::V6, Series::Miss) => "xdp6 miss (syn)",
            (Family::V6, Series::MissEstablished) => "xdp6 miss (ack)",
            (Family::V6, Series::NonIp) => "xdp6 neighbour solicitation",
            (Family::V6, Series::TcReply) => "tc6 reply",
            (Family::V6, Series::TcReplyMany) => "tc6 reply, 16,384 flows",
            (Family::V6, Series::TcOther) => "tc6 not a reply",
        }
    }

    /// The latency targets are the IPv4 paths'; an IPv6 path is held to its twin's figure
    /// ([`FAMILY_RATIO_TARGET`]).
    fn target(self) -> Option<i64> {
        match self.family {
            Family::V4 => self.series.target(),
            Family::V6 => None,
        }
    }

    /// The IPv4 path an IPv6 path is compared with.
    fn twin(self) -> Option<Self> {
        (self.family == Family::V6).then_some(Self::v4(self.series))
    }

    fn index(self) -> usize {
        Self::ALL
            .iter()
            .position(|&path| path == self)
            .expect("every path is in ALL")
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
    /// "ipv4" or "ipv6": each family's copy of the datapath has a monitor of its own.
    family: &'static str,
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
    new_flow_block_warmup: u32,
    net: &'static str,
    floor_program: &'static str,
}

#[derive(Serialize)]
struct SizeReport {
    /// Frontends, each one TCP address:port: what the table calls services.
    services: u32,
    service_ids: u32,
    backends: usize,
    /// Setting up the IPv4 copy; `setup6_s` the IPv6 one.
    setup_s: f64,
    setup6_s: f64,
    /// The floor program's runs at this size; its median is what the net figures subtract (from
    /// the paths of both families).
    floor: Stats,
    /// The IPv4 paths, then their IPv6 twins (keys `xdp6_*`, `tc6_*`).
    paths: Vec<PathReport>,
    /// Each IPv6 path against its IPv4 twin.
    family_ratios: Vec<RatioReport>,
}

/// An IPv6 path's cost as a multiple of its IPv4 twin's, both net of the floor: of the medians
/// (what the target judges), and of the means of the middle half (finer than the medians' 10 ns
/// clock steps). None where the IPv4 figure is not above the floor.
#[derive(Serialize)]
struct RatioReport {
    path: &'static str,
    ipv4_path: &'static str,
    ipv6_net_median_ns: i64,
    ipv4_net_median_ns: i64,
    ratio_median: Option<f64>,
    ratio_iqm: Option<f64>,
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
    /// ns for the latency targets, percent for the scaling one, a ratio for the IPv6 one.
    value: f64,
    limit: f64,
    met: bool,
}

/// One size's datapath copy for one family. Fields drop in order: the datapath, then its pin
/// directory.
struct Loaded {
    datapath: Datapath,
    _pins: PinDir,
    family: Family,
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
    let flows_per_path = |family| match args.profile {
        Some(Path {
            series: Series::NewFlow | Series::NewFlowSpread | Series::NewFlowUdp,
            family: profiled,
        }) if profiled == family => args.iterations,
        Some(_) => 0,
        None => args.warmup + args.iterations + args.rounds * NEW_FLOW_BLOCK_WARMUP,
    };
    for (family, most, entries) in [
        (Family::V4, MAX_NEW_FLOWS, limits::MAX_CONNTRACK),
        (Family::V6, MAX_NEW_FLOWS6, limits::MAX_CONNTRACK6),
    ] {
        let flows = flows_per_path(family);
        ensure!(
            NEW_FLOW_PATHS * flows <= most,
            "{flows} new flows per new-flow path and size: more than {} ({family:?} conntrack \
             holds {entries} entries, one per flow of the {NEW_FLOW_PATHS} new-flow paths, and \
             none may be evicted); lower --iterations or --warmup",
            most / NEW_FLOW_PATHS,
        );
    }
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

    // Two copies per size: IPv4 at 2i, IPv6 at 2i + 1.
    let mut loaded = Vec::new();
    let mut monitors = Vec::new();
    for (index, &services) in args.services.iter().enumerate() {
        for family in [Family::V4, Family::V6] {
            // The index keeps the names apart when a size is given twice.
            let name = match family {
                Family::V4 => format!("bench{index}-{services}"),
                Family::V6 => format!("bench{index}-{services}-v6"),
            };
            let pins = PinDir::new(&lab, &name)?;
            let mut datapath = Datapath::load(pins.path()).context("loading the datapath")?;
            let started = Instant::now();
            let service_ids = install(&mut datapath, services, family)?;
            let setup_s = started.elapsed().as_secs_f64();
            if args.monitor {
                monitors.push((family, MonitorDrain::attach(pins.path())?));
            }
            println!(
                "{services} {family:?} services: {service_ids} service ids, {} backends, set up in \
                 {setup_s:.1} s",
                BACKENDS.len()
            );
            loaded.push(Loaded {
                datapath,
                _pins: pins,
                family,
                services,
                service_ids,
                setup_s,
            });
        }
    }
    let many_flows = args
        .profile
        .is_none_or(|path| matches!(path.series, Series::EstablishedMany | Series::TcReplyMany));
    let mut benches = loaded
        .chunks(2)
        .map(|pair| SizeBench::new([&pair[0], &pair[1]], floor, many_flows))
        .collect::<anyhow::Result<Vec<_>>>()?;

    if let Some(path) = args.profile {
        if let Some(file) = &args.jit_lines {
            let rows = lab::jit_lines::write_jit_lines(file)?;
            println!("{rows} JIT line records in {}", file.display());
        }
        for bench in &mut benches {
            let started = Instant::now();
            bench.run(path, args.iterations, false)?;
            println!(
                "{} services: {} runs of {} in {:.1} s",
                bench.services(),
                args.iterations,
                path.key(),
                started.elapsed().as_secs_f64()
            );
        }
        for (family, monitor) in monitors {
            let (read, lost) = monitor.detach()?;
            println!("monitor ({family:?}): {read} events read, {lost} lost");
        }
        return Ok(());
    }
    println!(
        "measuring: repeat=1; per path and size {} warm-up runs, then {} measured runs in {} rounds \
         (each block after {BLOCK_WARMUP} unmeasured runs, {NEW_FLOW_BLOCK_WARMUP} for new flows)",
        args.warmup, args.iterations, args.rounds
    );
    let started = Instant::now();
    for bench in &mut benches {
        for path in Path::ALL {
            bench.run(path, args.warmup, false)?;
        }
    }
    for round in 0..args.rounds {
        let block =
            args.iterations / args.rounds + u32::from(round < args.iterations % args.rounds);
        let count = benches.len() * Path::ALL.len();
        for slot in round_order(count, round) {
            let bench = &mut benches[slot / Path::ALL.len()];
            let path = Path::ALL[slot % Path::ALL.len()];
            bench.run(path, path.series.block_warmup(), false)?;
            bench.run(path, block, true)?;
        }
    }
    println!("measured in {:.1} s", started.elapsed().as_secs_f64());
    let mut monitor_events = Vec::new();
    for ((family, monitor), loaded) in monitors.into_iter().zip(&loaded) {
        let (read, lost) = monitor.detach()?;
        println!("monitor ({family:?}): {read} events read, {lost} lost");
        monitor_events.push(MonitorEvents {
            services: loaded.services,
            family: match family {
                Family::V4 => "ipv4",
                Family::V6 => "ipv6",
            },
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
            new_flow_block_warmup: NEW_FLOW_BLOCK_WARMUP,
            net: "path median (or p90) minus the median of the floor program's runs at the same size",
            floor_program: "bare XDP_PASS: r0 = 2; exit",
        },
        sizes,
        targets,
        monitor_events,
    };
    lab::write_json_report(&args.out, &report)
}

/// The packets and state of every path of one family at one size.
struct FamilyBench<'a> {
    loaded: &'a Loaded,
    xdp: BorrowedFd<'a>,
    tc: BorrowedFd<'a>,
    /// The frontend of the one-frontend, established and reply paths (the middle of the table).
    frontend: SocketAddr,
    established: (Vec<u8>, Vec<u8>),
    /// The flows of the many-flows paths, and the next one each path sends a packet of.
    many: Vec<ManyFlow>,
    next_of_many: [usize; 2],
    syn_retransmit: (Vec<u8>, Vec<u8>),
    established_udp: (Vec<u8>, Vec<u8>),
    reply: (Vec<u8>, Vec<u8>),
    miss: Vec<u8>,
    miss_established: Vec<u8>,
    non_ip: Vec<u8>,
    /// Flows created so far by the new-flow paths: to one frontend, spread, UDP.
    flows: [u32; 3],
    /// New flows the service counters held before the first new-flow run.
    flows_before: u64,
}

impl<'a> FamilyBench<'a> {
    /// Creates the flows the established and reply paths use (one packet each, unmeasured), and
    /// with `many_flows` those of the many-flows paths.
    fn new(loaded: &'a Loaded, many_flows: bool) -> anyhow::Result<Self> {
        let family = loaded.family;
        let xdp = loaded.datapath.program_fd(program_names::XDP_LB)?;
        let tc = loaded.datapath.program_fd(program_names::TC_EGRESS)?;
        let frontend = frontend_addr(family, loaded.services / 2);
        let clients = Clients::of(family);
        check_miss_filtered(loaded, clients.miss_destination)?;
        let first = |client| -> anyhow::Result<SocketAddr> {
            let syn = tcp(client, frontend, TcpFlags::SYN);
            let out = run_once(xdp, &syn, XDP_PASS, "a flow's first packet")?;
            l4_destination(&out.packet)
        };
        let backend = first(clients.established)?;
        let established = (
            tcp(clients.established, frontend, TcpFlags::ACK),
            tcp(clients.established, backend, TcpFlags::ACK),
        );
        let many = (0..if many_flows { MANY_FLOWS } else { 0 })
            .map(|k| {
                let client = many_flows_client(family, k);
                let backend = first(client)?;
                let ack = tcp(client, frontend, TcpFlags::ACK);
                run_once(xdp, &ack, XDP_PASS, "a many-flows flow's first ACK")?;
                Ok(ManyFlow {
                    ack,
                    dnat: tcp(client, backend, TcpFlags::ACK),
                    answer: tcp(backend, client, TcpFlags::ACK),
                    restored: tcp(frontend, client, TcpFlags::ACK),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let backend = first(clients.retransmit)?;
        let syn_retransmit = (
            tcp(clients.retransmit, frontend, TcpFlags::SYN),
            tcp(clients.retransmit, backend, TcpFlags::SYN),
        );
        let datagram = udp(clients.established, frontend);
        let udp_backend = l4_destination(
            &run_once(xdp, &datagram, XDP_PASS, "a UDP flow's first datagram")?.packet,
        )?;
        let established_udp = (datagram, udp(clients.established, udp_backend));
        // The reply path's flow is established, as a flow whose endpoint sends ACKs is.
        let backend = first(clients.reply)?;
        run_once(
            xdp,
            &tcp(clients.reply, frontend, TcpFlags::ACK),
            XDP_PASS,
            "the reply path's flow's first ACK",
        )?;
        let reply = (
            tcp(backend, clients.reply, TcpFlags::ACK),
            tcp(frontend, clients.reply, TcpFlags::ACK),
        );
        let non_ip = match family {
            Family::V4 => packet::non_ip(0x0806, 28),
            Family::V6 => packet6::neighbour_solicitation(*MISS_CLIENT6.ip(), *BACKENDS6[0].ip()),
        };
        Ok(Self {
            loaded,
            xdp,
            tc,
            frontend,
            established,
            many,
            next_of_many: [0; 2],
            syn_retransmit,
            established_udp,
            reply,
            miss: tcp(clients.miss, clients.miss_destination, TcpFlags::SYN),
            miss_established: tcp(clients.miss, clients.miss_destination, TcpFlags::ACK),
            non_ip,
            flows: [0; 3],
            flows_before: new_flows_total(&loaded.datapath, loaded.service_ids + 1)?,
        })
    }

    /// One run of `series`, its verdict and output checked.
    fn run_one(&mut self, series: Series, what: &str) -> anyhow::Result<TestRunOutput> {
        let family = self.loaded.family;
        let out = match series {
            Series::Floor => bail!("the floor is measured by the size, not a family"),
            Series::NewFlow | Series::NewFlowSpread => {
                let spread = series == Series::NewFlowSpread;
                let k = &mut self.flows[usize::from(spread)];
                let client = new_flow_client(family, spread, *k);
                let frontend = if spread {
                    frontend_addr(family, scrambled(*k, self.loaded.services))
                } else {
                    self.frontend
                };
                *k += 1;
                let input = tcp(client, frontend, TcpFlags::SYN);
                let out = run_once(self.xdp, &input, XDP_PASS, what)?;
                let backend = l4_destination(&out.packet)?;
                ensure!(
                    backends(family).contains(&backend)
                        && out.packet == tcp(client, backend, TcpFlags::SYN),
                    "{what}: {client} -> {frontend} left {:02x?}",
                    out.packet
                );
                out
            }
            Series::NewFlowUdp => {
                let k = &mut self.flows[2];
                let client = new_flow_client(family, false, *k);
                *k += 1;
                let input = udp(client, self.frontend);
                let out = run_once(self.xdp, &input, XDP_PASS, what)?;
                let backend = l4_destination(&out.packet)?;
                ensure!(
                    backends(family).contains(&backend) && out.packet == udp(client, backend),
                    "{what}: {client} -> {} left {:02x?}",
                    self.frontend,
                    out.packet
                );
                out
            }
            Series::Established | Series::SynRetransmit | Series::EstablishedUdp => {
                let (input, expected) = match series {
                    Series::Established => &self.established,
                    Series::SynRetransmit => &self.syn_retransmit,
                    _ => &self.established_udp,
                };
                let out = run_once(self.xdp, input, XDP_PASS, what)?;
                ensure!(&out.packet == expected, "{what}: not DNATed to its backend");
                out
            }
            Series::EstablishedMany | Series::TcReplyMany => {
                let reply = series == Series::TcReplyMany;
                let next = &mut self.next_of_many[usize::from(reply)];
                let flow = &self.many[*next];
                *next = (*next + 1) % self.many.len();
                if reply {
                    let out = run_once(self.tc, &flow.answer, TC_ACT_OK, what)?;
                    ensure!(out.packet == flow.restored, "{what}: source not restored");
                    out
                } else {
                    let out = run_once(self.xdp, &flow.ack, XDP_PASS, what)?;
                    ensure!(out.packet == flow.dnat, "{what}: not DNATed to its backend");
                    out
                }
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
        Ok(out)
    }

    /// Checks that exactly the new-flow packets created flows.
    fn check_flows(&self) -> anyhow::Result<()> {
        let loaded = self.loaded;
        let created =
            new_flows_total(&loaded.datapath, loaded.service_ids + 1)? - self.flows_before;
        let sent: u64 = self.flows.iter().copied().map(u64::from).sum();
        ensure!(
            created == sent,
            "{} {:?} services: the services counted {created} new flows for {sent} new-flow \
             packets",
            loaded.services,
            loaded.family
        );
        Ok(())
    }
}

/// A flow of the many-flows paths: its client's ACK and what XDP must make of it, its endpoint's
/// answer and what tc egress must make of that.
struct ManyFlow {
    ack: Vec<u8>,
    dnat: Vec<u8>,
    answer: Vec<u8>,
    restored: Vec<u8>,
}

/// Every path of both families at one size, the floor, and the samples taken so far.
struct SizeBench<'a> {
    floor: BorrowedFd<'a>,
    floor_input: Vec<u8>,
    /// IPv4, IPv6 (indexed by `Family as usize`).
    families: [FamilyBench<'a>; 2],
    samples: Vec<Vec<u32>>,
}

impl<'a> SizeBench<'a> {
    /// `many_flows`: whether to set up the many-flows paths' flows (a profile of another path
    /// would sample their 65,536 setup runs as its own).
    fn new(
        loaded: [&'a Loaded; 2],
        floor: BorrowedFd<'a>,
        many_flows: bool,
    ) -> anyhow::Result<Self> {
        ensure!(
            loaded[0].family == Family::V4 && loaded[1].family == Family::V6,
            "an IPv4 and an IPv6 copy per size"
        );
        let families = [
            FamilyBench::new(loaded[0], many_flows)?,
            FamilyBench::new(loaded[1], many_flows)?,
        ];
        Ok(Self {
            floor,
            floor_input: families[0].established.0.clone(),
            families,
            samples: vec![Vec::new(); Path::ALL.len()],
        })
    }

    fn services(&self) -> u32 {
        self.families[0].loaded.services
    }

    /// Runs `path` `count` times, checking every verdict and output; keeps the durations when
    /// `keep`.
    fn run(&mut self, path: Path, count: u32, keep: bool) -> anyhow::Result<()> {
        let index = path.index();
        for _ in 0..count {
            let ns = self.run_one(path)?;
            if keep {
                self.samples[index].push(ns);
            }
        }
        Ok(())
    }

    fn run_one(&mut self, path: Path) -> anyhow::Result<u32> {
        let what = path.label();
        let out = if path.series == Series::Floor {
            run_once(self.floor, &self.floor_input, XDP_PASS, what)?
        } else {
            self.families[path.family as usize].run_one(path.series, what)?
        };
        Ok(u32::try_from(out.duration.as_nanos()).unwrap_or(u32::MAX))
    }

    /// Checks that exactly the new-flow packets created flows, and sums up.
    fn finish(&self) -> anyhow::Result<SizeReport> {
        for family in &self.families {
            family.check_flows()?;
        }
        let floor = Stats::of(&self.samples[0]).context("floor")?;
        let floor_median = i64::from(floor.median_ns);
        let paths = Path::ALL
            .iter()
            .zip(&self.samples)
            .skip(1)
            .map(|(path, samples)| {
                let raw = Stats::of(samples).context(path.key())?;
                Ok(PathReport {
                    path: path.key(),
                    raw,
                    net_median_ns: i64::from(raw.median_ns) - floor_median,
                    net_p90_ns: i64::from(raw.p90_ns) - floor_median,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        // `paths` leaves the floor out: path i of ALL is paths[i - 1].
        let report = |path: Path| &paths[path.index() - 1];
        let family_ratios = Path::ALL
            .iter()
            .filter_map(|&path| Some((path, path.twin()?)))
            .map(|(path, twin)| {
                let (ipv6, ipv4) = (report(path), report(twin));
                let net_iqm = |report: &PathReport| report.raw.iqm_ns - floor_median as f64;
                RatioReport {
                    path: path.key(),
                    ipv4_path: twin.key(),
                    ipv6_net_median_ns: ipv6.net_median_ns,
                    ipv4_net_median_ns: ipv4.net_median_ns,
                    ratio_median: ratio(ipv6.net_median_ns as f64, ipv4.net_median_ns as f64),
                    ratio_iqm: ratio(net_iqm(ipv6), net_iqm(ipv4)),
                }
            })
            .collect();
        let [v4, v6] = &self.families;
        Ok(SizeReport {
            services: v4.loaded.services,
            service_ids: v4.loaded.service_ids,
            backends: BACKENDS.len(),
            setup_s: v4.loaded.setup_s,
            setup6_s: v6.loaded.setup_s,
            floor,
            paths,
            family_ratios,
        })
    }
}

/// Puts the shared backends of `family` and `services` frontends spread over at most
/// [`MAX_SERVICE_IDS`] service ids (frontend `i` belongs to id `i % ids`), and a UDP service (the
/// next id) on the middle frontend's address and port.
/// Returns the number of TCP service ids.
fn install(datapath: &mut Datapath, services: u32, family: Family) -> anyhow::Result<u32> {
    for (id, addr) in (1..).zip(backends(family)) {
        datapath.put_backend(
            id,
            &Backend {
                addr: addr.ip(),
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
                let addr = frontend_addr(family, index);
                Frontend {
                    addr: addr.ip(),
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
    for (id, addr) in udp_ids.clone().zip(backends(family)) {
        datapath.put_backend(
            id,
            &Backend {
                addr: addr.ip(),
                port: addr.port(),
                proto: proto::UDP,
                flags: 0,
            },
        )?;
    }
    let middle = frontend_addr(family, services / 2);
    datapath.put_service(&Service {
        id: ids,
        frontends: vec![Frontend {
            addr: middle.ip(),
            port: middle.port(),
            proto: proto::UDP,
            kind: service_flags::CLUSTER_IP,
        }],
        backends: udp_ids.take(BACKENDS.len()).collect(),
        ..Default::default()
    })?;
    Ok(ids)
}

/// Fails if the frontend filter has the bit of `destination` (TCP) set: the miss paths would
/// then measure a frontend lookup instead of the filter's pass.
fn check_miss_filtered(loaded: &Loaded, destination: SocketAddr) -> anyhow::Result<()> {
    let bit = match destination {
        SocketAddr::V4(addr) => {
            frontend_filter::bit(u32::from(*addr.ip()), addr.port(), proto::TCP)
        }
        SocketAddr::V6(addr) => {
            frontend_filter::bit6(ipv6_words(*addr.ip()), addr.port(), proto::TCP)
        }
    };
    let filter: Array<MapData, u64> = open_map(
        loaded._pins.path(),
        map_names::FRONTEND_FILTER,
        Access::ReadOnly,
    )?;
    let word = filter.get(&(bit / 64), 0)?;
    ensure!(
        word & (1 << (bit % 64)) == 0,
        "{} {:?} services: the frontend filter has the bit of the miss destination {destination}",
        loaded.services,
        loaded.family
    );
    Ok(())
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

fn frontend_addr(family: Family, index: u32) -> SocketAddr {
    match family {
        Family::V4 => SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from(FRONTEND_BASE) + index),
            FRONTEND_PORT,
        )),
        Family::V6 => SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(u128::from(FRONTEND_BASE6) + u128::from(index)),
            FRONTEND_PORT,
            0,
            0,
        )),
    }
}

fn backends(family: Family) -> [SocketAddr; 3] {
    match family {
        Family::V4 => BACKENDS.map(SocketAddr::V4),
        Family::V6 => BACKENDS6.map(SocketAddr::V6),
    }
}

/// The clients of the established, reply and miss paths, and the miss paths' destination.
struct Clients {
    established: SocketAddr,
    retransmit: SocketAddr,
    reply: SocketAddr,
    miss: SocketAddr,
    miss_destination: SocketAddr,
}

impl Clients {
    fn of(family: Family) -> Self {
        match family {
            Family::V4 => Self {
                established: ESTABLISHED_CLIENT.into(),
                retransmit: RETRANSMIT_CLIENT.into(),
                reply: REPLY_CLIENT.into(),
                miss: MISS_CLIENT.into(),
                miss_destination: MISS_DESTINATION.into(),
            },
            Family::V6 => Self {
                established: ESTABLISHED_CLIENT6.into(),
                retransmit: RETRANSMIT_CLIENT6.into(),
                reply: REPLY_CLIENT6.into(),
                miss: MISS_CLIENT6.into(),
                miss_destination: MISS_DESTINATION6.into(),
            },
        }
    }
}

fn many_flows_client(family: Family, k: u32) -> SocketAddr {
    let port = 1024 + u16::try_from(k).expect("fewer many flows than ports");
    match family {
        Family::V4 => SocketAddrV4::new(MANY_FLOWS_CLIENT, port).into(),
        Family::V6 => SocketAddrV6::new(MANY_FLOWS_CLIENT6, port, 0, 0).into(),
    }
}

fn new_flow_client(family: Family, spread: bool, k: u32) -> SocketAddr {
    let port = 1024 + (k % PORTS_PER_CLIENT) as u16;
    let host = k / PORTS_PER_CLIENT;
    match family {
        Family::V4 => {
            let base = if spread {
                SPREAD_FLOW_CLIENT_BASE
            } else {
                NEW_FLOW_CLIENT_BASE
            };
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from(base) + host),
                port,
            ))
        }
        Family::V6 => {
            let base = if spread {
                SPREAD_FLOW_CLIENT_BASE6
            } else {
                NEW_FLOW_CLIENT_BASE6
            };
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(u128::from(base) + u128::from(host)),
                port,
                0,
                0,
            ))
        }
    }
}

/// The order in which round `round` runs the `count` blocks (every path at every size): a
/// permutation drawn afresh each round, the same in every run. A block runs faster after one
/// that warmed what it touches (the same datapath's maps and code) than after one that
/// evicted it (another size's, or the other family's copy); in a fixed order, or the fixed
/// order rotated, a block follows the same one in almost every round, and its figure carries
/// that neighbour's effect in every run.
fn round_order(count: usize, round: u32) -> Vec<usize> {
    let mut order: Vec<usize> = (0..count).collect();
    let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(round);
    // Fisher-Yates with splitmix64 draws.
    for last in (1..count).rev() {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        order.swap(last, (z % (last as u64 + 1)) as usize);
    }
    order
}

/// The frontend index of new flow `k`: every frontend once per `services` flows, scattered.
fn scrambled(k: u32, services: u32) -> u32 {
    (u64::from(k) * STRIDE % u64::from(services)) as u32
}

/// An Ethernet/IP/TCP frame of either family (sequence number 1000, no payload).
fn tcp(src: SocketAddr, dst: SocketAddr, flags: TcpFlags) -> Vec<u8> {
    match (src, dst) {
        (SocketAddr::V4(src), SocketAddr::V4(dst)) => packet::tcp(src, dst, flags, b""),
        (SocketAddr::V6(src), SocketAddr::V6(dst)) => packet6::tcp(src, dst, flags, 1000, b""),
        _ => unreachable!("{src} -> {dst}: one family"),
    }
}

/// An Ethernet/IP/UDP frame of either family, no payload.
fn udp(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    match (src, dst) {
        (SocketAddr::V4(src), SocketAddr::V4(dst)) => packet::udp(src, dst, b""),
        (SocketAddr::V6(src), SocketAddr::V6(dst)) => packet6::udp(src, dst, b""),
        _ => unreachable!("{src} -> {dst}: one family"),
    }
}

/// The destination address and port of a TCP or UDP frame (IPv4 without options, IPv6 without
/// extension headers).
fn l4_destination(frame: &[u8]) -> anyhow::Result<SocketAddr> {
    let ip = ETH_HDR_LEN;
    ensure!(frame.len() >= ip, "shorter than an Ethernet header");
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => {
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
            Ok(SocketAddrV4::new(addr, port).into())
        }
        0x86dd => {
            let l4 = ip + IPV6_HDR_LEN;
            ensure!(
                frame.len() >= l4 + 4
                    && matches!(frame[ip + 6], next_header::TCP | next_header::UDP),
                "not an IPv6 frame of TCP or UDP without extension headers"
            );
            let octets: [u8; 16] = frame[ip + 24..ip + 40].try_into().expect("16 bytes");
            let port = u16::from_be_bytes([frame[l4 + 2], frame[l4 + 3]]);
            Ok(SocketAddrV6::new(octets.into(), port, 0, 0).into())
        }
        ethertype => bail!("EtherType {ethertype:#06x}: neither IPv4 nor IPv6"),
    }
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
        for (path, report) in Path::ALL[1..].iter().zip(&size.paths) {
            let Some(limit) = path.target() else {
                continue;
            };
            targets.push(TargetReport {
                target: format!("{} <= {limit} ns net of the floor", report.path),
                path: report.path,
                services: size.services,
                value: report.net_median_ns as f64,
                limit: limit as f64,
                met: report.net_median_ns <= limit,
            });
        }
    }
    if let [smallest, .., largest] = sizes {
        let pairs = smallest.paths.iter().zip(&largest.paths);
        for (path, (small, large)) in Path::ALL[1..].iter().zip(pairs) {
            let Some(change) = relative_change(small.net_median_ns, large.net_median_ns) else {
                continue;
            };
            let limit = path.series.scale_target();
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
    for size in sizes {
        for ratio in &size.family_ratios {
            let Some(value) = ratio.ratio_median else {
                continue;
            };
            targets.push(TargetReport {
                target: format!(
                    "{} <= {FAMILY_RATIO_TARGET}x {} net of the floor",
                    ratio.path, ratio.ipv4_path
                ),
                path: ratio.path,
                services: size.services,
                value,
                limit: FAMILY_RATIO_TARGET,
                met: value <= FAMILY_RATIO_TARGET,
            });
        }
    }
    targets
}

/// `(to - from) / from`, or None when `from` is not positive (a path no costlier than the floor).
fn relative_change(from: i64, to: i64) -> Option<f64> {
    (from > 0).then(|| (to - from) as f64 / from as f64)
}

/// `of / to`, or None when `to` is not positive (a path no costlier than the floor).
fn ratio(of: f64, to: f64) -> Option<f64> {
    (to > 0.0).then(|| of / to)
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
    let mut floor_row = format!("| {} |", Path::FLOOR.label());
    for size in sizes {
        floor_row += &format!(" {} / {} |", size.floor.median_ns, size.floor.p90_ns);
    }
    println!("{floor_row} |");
    for (index, path) in Path::ALL[1..].iter().enumerate() {
        let mut row = format!("| {} |", path.label());
        for size in sizes {
            let report = &size.paths[index];
            row += &format!(" {} / {} |", report.net_median_ns, report.net_p90_ns);
        }
        let target = match (path.target(), path.twin()) {
            (Some(limit), _) => format!(" <= {limit} |"),
            (None, Some(_)) => format!(" <= {FAMILY_RATIO_TARGET}x IPv4 |"),
            (None, None) => " |".to_owned(),
        };
        println!("{row}{target}");
    }
    println!("\ntargets (docs/benchmarks.md), on the median net of the floor:");
    // The scaling targets (in %) and the IPv6 ones (ratios) have lines of their own below.
    let ratio_target = format!("{FAMILY_RATIO_TARGET}x");
    for target in targets
        .iter()
        .filter(|target| !target.target.contains('%') && !target.target.contains(&ratio_target))
    {
        println!(
            "  {:<66} {:>5} ns  {}",
            format!("{} [{} services]", target.target, target.services),
            target.value,
            verdict(target.met)
        );
    }
    println!(
        "\nIPv6 against IPv4, median net of the floor, v6 / v4 = ratio (of the means of the middle \
         half, finer than the 10 ns clock steps, in brackets); target: at most {FAMILY_RATIO_TARGET}x:"
    );
    for size in sizes {
        println!("  {} services:", size.services);
        for ratio in &size.family_ratios {
            let judged = match ratio.ratio_median {
                Some(value) => format!(
                    "{value:.2}x [{}]  {}",
                    ratio
                        .ratio_iqm
                        .map_or_else(|| "n/a".to_owned(), |iqm| format!("{iqm:.2}x")),
                    verdict(value <= FAMILY_RATIO_TARGET)
                ),
                None => "n/a (IPv4 not above the floor)".to_owned(),
            };
            println!(
                "    {:<28} {:>5} / {:>5} ns  {judged}",
                ratio.path, ratio.ipv6_net_median_ns, ratio.ipv4_net_median_ns
            );
        }
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
        for (path, (small, large)) in Path::ALL[1..].iter().zip(pairs) {
            let change = match relative_change(small.net_median_ns, large.net_median_ns) {
                Some(change) => format!(
                    "{:+.1}%  {}",
                    change * 100.0,
                    verdict(change <= path.series.scale_target())
                ),
                None => "n/a (not above the floor)".to_owned(),
            };
            println!(
                "  {:<28} {:>5} -> {:>5} ns  {change}",
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

#[cfg(test)]
mod tests {
    use super::round_order;

    #[test]
    fn every_round_runs_every_block_once() {
        for round in 0..50 {
            let mut order = round_order(38, round);
            order.sort_unstable();
            assert_eq!(order, (0..38).collect::<Vec<_>>(), "round {round}");
        }
    }

    #[test]
    fn a_block_follows_many_different_blocks() {
        // Over 20 rounds (the default), the block before each one must vary: with the rotated
        // fixed order it was the same block in 19 of 20 rounds.
        let rounds: Vec<Vec<usize>> = (0..20).map(|round| round_order(38, round)).collect();
        assert_eq!(
            rounds,
            (0..20)
                .map(|round| round_order(38, round))
                .collect::<Vec<_>>()
        );
        for block in 0..38 {
            let mut before: Vec<usize> = rounds
                .iter()
                .filter_map(|order| {
                    let at = order.iter().position(|&b| b == block).unwrap();
                    at.checked_sub(1).map(|previous| order[previous])
                })
                .collect();
            before.sort_unstable();
            before.dedup();
            assert!(
                before.len() >= 10,
                "block {block} followed only {before:?} in 20 rounds"
            );
        }
    }
}
