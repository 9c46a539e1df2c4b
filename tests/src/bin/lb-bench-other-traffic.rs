//! What attaching lb costs the connections that are no Service's, in the pieces the
//! end-to-end lab has: XDP on a veth (the labs' NICs are veths with XDP attached natively, as lb
//! attaches it to a physical NIC), whatever the program does; and lb's socket hooks on the
//! cgroup a client runs in, which run on every connect, packet and close of its sockets.
//!
//! Lab: a client host and a server host joined by one veth pair, with the lab's TCP settings on
//! both. Each round measures `lab-peer load` (1 client, `--duration-ms`) once without and once
//! with the piece, in alternating order, for each piece and each load mode
//! (connect/request/close, request/response over one connection):
//! - a bare XDP_PASS program on both ends of the pair, native, then generic;
//! - lb's socket hooks, the real programs of a datapath loaded with no Service (private pins),
//!   attached to a private cgroup that the client runs in; without them, it runs in a sibling
//!   cgroup with nothing attached.
//!
//! Every client runs in one of the two cgroups. Every measured run follows an unmeasured warm-up
//! run of a fifth of its length, so that the first connections after an attach (a native XDP
//! attach switches the veth to NAPI) are not measured. The figure is the median of the
//! per-round ratios, with / without. A run with an error fails the bench.
//!
//! Writes target/bench/other-traffic.json. Not part of `cargo xtask bench`: docs/benchmarks.md
//! quotes its figures where it explains what bounds the end-to-end ClusterIP ratio.

use std::{os::fd::OwnedFd, path::PathBuf};

use anyhow::{Context as _, ensure};
use clap::Parser;
use lab::{
    bare_xdp,
    lab::{Cgroup, Host, Lab, PinDir},
    peer::{self, ClientReport},
};
use lb_userspace::datapath::Datapath;
use serde::Serialize;

#[derive(Parser)]
#[command(about = "What XDP on a veth and lb's socket hooks cost connections to no Service")]
struct Args {
    /// Rounds; each measures every piece and load mode once without and once with the piece.
    #[arg(long, default_value_t = 12)]
    rounds: u32,
    /// Length of every measured run.
    #[arg(long, default_value_t = 1000)]
    duration_ms: u64,
    #[arg(long, default_value = "target/bench/other-traffic.json")]
    out: PathBuf,
}

const SERVER_PORT: u16 = 8080;

/// What a round measures without and with.
#[derive(Clone, Copy, PartialEq)]
enum Piece {
    NativeXdp,
    GenericXdp,
    SocketHooks,
}

impl Piece {
    fn label(self) -> &'static str {
        match self {
            Self::NativeXdp => "a bare XDP program on the veth, native",
            Self::GenericXdp => "a bare XDP program on the veth, generic",
            Self::SocketHooks => "lb's socket hooks on the client's cgroup",
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum LoadMode {
    ConnectRequestClose,
    RequestResponse,
}

impl LoadMode {
    fn label(self) -> &'static str {
        match self {
            Self::ConnectRequestClose => "connect/request/close",
            Self::RequestResponse => "request/response",
        }
    }
}

/// The client and server hosts, the two cgroups and the datapath whose socket hooks are
/// attached to one of them. Fields drop in order: the hooks' pins before their cgroup, the
/// cgroups before the lab.
struct BenchLab {
    _server: lab::lab::Proc,
    _datapath: Datapath,
    _pins: PinDir,
    hooked: Cgroup,
    plain: Cgroup,
    client: Host,
    server: Host,
    _lab: Lab,
}

impl BenchLab {
    fn new() -> anyhow::Result<Self> {
        let mut lab = Lab::new()?;
        let client = lab.host("c")?;
        let server = lab.host("s")?;
        lab.veth(&client, "c0", &server, "s0")?;
        client.addr("c0", "10.250.0.1/24")?;
        server.addr("s0", "10.250.0.2/24")?;
        let server_proc = peer::serve(&server, "s", SERVER_PORT)?;
        let hooked = Cgroup::new(&lab, "hooked")?;
        let plain = Cgroup::new(&lab, "plain")?;
        let pins = PinDir::new(&lab, "hooks")?;
        let mut datapath = Datapath::load(pins.path())?;
        datapath.attach_cgroup(hooked.path())?;
        Ok(Self {
            _server: server_proc,
            _datapath: datapath,
            _pins: pins,
            hooked,
            plain,
            client,
            server,
            _lab: lab,
        })
    }

    /// The bare XDP_PASS program on both ends of the pair, until the returned links drop.
    fn attach(&self, program: &OwnedFd, piece: Piece) -> anyhow::Result<Vec<OwnedFd>> {
        let mut links = Vec::new();
        for (host, iface) in [(&self.client, "c0"), (&self.server, "s0")] {
            let _inside = host.enter()?;
            let ifindex = host.ifindex(iface)?;
            let link = match piece {
                Piece::GenericXdp => bare_xdp::attach_generic(program, ifindex),
                _ => bare_xdp::attach_native(program, ifindex),
            }
            .with_context(|| format!("attaching XDP to {iface}"))?;
            links.push(link);
        }
        Ok(links)
    }

    /// A measured run of `load` with `piece` in place (`with`) or not.
    fn run(
        &self,
        piece: Piece,
        with: bool,
        program: &OwnedFd,
        load: LoadMode,
        duration_ms: u64,
    ) -> anyhow::Result<u64> {
        match piece {
            Piece::SocketHooks => {
                let cgroup = if with { &self.hooked } else { &self.plain };
                self.measured(cgroup, load, duration_ms)
            }
            _ if with => {
                let _links = self.attach(program, piece)?;
                self.measured(&self.plain, load, duration_ms)
            }
            _ => self.measured(&self.plain, load, duration_ms),
        }
    }

    /// One `lab-peer load` run from the client to the server; its rate, or an error if any
    /// request failed.
    fn load(&self, cgroup: &Cgroup, mode: LoadMode, duration_ms: u64) -> anyhow::Result<u64> {
        let to = format!("10.250.0.2:{SERVER_PORT}");
        let duration = duration_ms.to_string();
        let mut args = vec!["load", "--to", &to, "--duration-ms", &duration];
        if mode == LoadMode::RequestResponse {
            args.push("--one-flow");
        }
        let stdout = self.client.run_in_cgroup(cgroup, peer::binary()?, &args)?;
        let report: ClientReport = serde_json::from_str(stdout.trim())
            .with_context(|| format!("parsing lab-peer load report: {stdout}"))?;
        ensure!(
            report.errors == 0 && report.ok > 0,
            "{} run: {} errors of {} ({:?})",
            mode.label(),
            report.errors,
            report.attempts,
            report.error_samples
        );
        Ok(report.latency.map_or(0, |latency| latency.rate_per_s))
    }

    /// A warm-up run of a fifth of `duration_ms`, then the measured one.
    fn measured(&self, cgroup: &Cgroup, mode: LoadMode, duration_ms: u64) -> anyhow::Result<u64> {
        self.load(cgroup, mode, (duration_ms / 5).max(1))?;
        self.load(cgroup, mode, duration_ms)
    }
}

#[derive(Serialize)]
struct Cell {
    piece: &'static str,
    load: &'static str,
    /// Requests a second per round, without and with the program.
    without_per_s: Vec<u64>,
    with_per_s: Vec<u64>,
    without_median_per_s: f64,
    with_median_per_s: f64,
    /// The median of the per-round ratios, with / without.
    ratio_median: f64,
    /// Rounds in which the run with the program was the slower one.
    rounds_slower: usize,
}

#[derive(Serialize)]
struct Report {
    command: &'static str,
    rounds: u32,
    duration_ms: u64,
    load_average_before: String,
    load_average_after: String,
    cells: Vec<Cell>,
}

/// Nearest-rank median (the lower middle of an even count, so always a measured value).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[(values.len() - 1) / 2]
}

fn cell(piece: Piece, load: LoadMode, without: Vec<u64>, with: Vec<u64>) -> Cell {
    let as_f64 = |rates: &[u64]| rates.iter().map(|&rate| rate as f64).collect::<Vec<_>>();
    let mut ratios: Vec<f64> = without
        .iter()
        .zip(&with)
        .filter(|(without, _)| **without > 0)
        .map(|(&without, &with)| with as f64 / without as f64)
        .collect();
    Cell {
        piece: piece.label(),
        load: load.label(),
        without_median_per_s: median(&mut as_f64(&without)),
        with_median_per_s: median(&mut as_f64(&with)),
        ratio_median: median(&mut ratios),
        rounds_slower: without
            .iter()
            .zip(&with)
            .filter(|(without, with)| with < without)
            .count(),
        without_per_s: without,
        with_per_s: with,
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    let load_average_before = lab::lab::load_average();
    let lab = BenchLab::new().context("building the lab")?;
    let program = bare_xdp::load_returning(bare_xdp::XDP_PASS, "lb_other_pass")?;
    let cases = [Piece::NativeXdp, Piece::GenericXdp, Piece::SocketHooks]
        .into_iter()
        .flat_map(|piece| {
            [LoadMode::ConnectRequestClose, LoadMode::RequestResponse]
                .map(move |load| (piece, load))
        });
    let mut cells = Vec::new();
    for (piece, load) in cases {
        let (mut without, mut with) = (Vec::new(), Vec::new());
        for round in 0..args.rounds {
            // Alternate which run comes first, so that a drift of the machine's load over a round
            // falls on both sides.
            let order = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for with_piece in order {
                let rate = lab.run(piece, with_piece, &program, load, args.duration_ms)?;
                if with_piece {
                    with.push(rate);
                } else {
                    without.push(rate);
                }
            }
        }
        cells.push(cell(piece, load, without, with));
    }
    let report = Report {
        command: "lb-bench-other-traffic",
        rounds: args.rounds,
        duration_ms: args.duration_ms,
        load_average_before,
        load_average_after: lab::lab::load_average(),
        cells,
    };
    println!(
        "connections to no Service, without and with each piece, 1 client, {} rounds of {} ms \
         runs; load average {} -> {}\n",
        report.rounds,
        report.duration_ms,
        report.load_average_before.trim(),
        report.load_average_after.trim()
    );
    println!(
        "| piece | load | without (median /s) | with | with / without, median of the rounds | rounds slower |"
    );
    println!("|---|---|---:|---:|---:|---:|");
    for cell in &report.cells {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.2}x | {} of {} |",
            cell.piece,
            cell.load,
            cell.without_median_per_s,
            cell.with_median_per_s,
            cell.ratio_median,
            cell.rounds_slower,
            report.rounds
        );
    }
    lab::write_json_report(&args.out, &report)
}

#[cfg(test)]
mod tests {
    use super::{LoadMode, Piece, cell};

    #[test]
    fn a_cell_pairs_each_round_and_counts_the_slower_ones() {
        // Rounds 2 and 3 the machine halves both runs; the run with the program is slower in
        // rounds 1 and 3.
        let cell = cell(
            Piece::NativeXdp,
            LoadMode::ConnectRequestClose,
            vec![1_000, 500, 500],
            vec![900, 500, 450],
        );
        assert_eq!(cell.without_median_per_s, 500.0);
        assert_eq!(cell.with_median_per_s, 500.0);
        // 0.9, 1.0, 0.9.
        assert_eq!(cell.ratio_median, 0.9);
        assert_eq!(cell.rounds_slower, 2);
    }
}
