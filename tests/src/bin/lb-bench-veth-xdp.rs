//! What an XDP program on a veth costs the connections that cross it, whatever the program
//! does: the end-to-end lab's NICs are veths with XDP attached natively (as lb attaches it to a
//! physical NIC), and every connection through node1 pays for that, a Service's or not.
//!
//! Lab: a client host and a server host joined by one veth pair, the lab's TCP settings on both.
//! Each round measures `lab-peer load` (1 client, `--duration-ms`) without and with a bare
//! XDP_PASS program attached to both ends of the pair, in alternating order, for each XDP mode
//! (native, generic) and each load mode (connect/request/close, request/response over one
//! connection). Every measured run follows an unmeasured warm-up run of a fifth of its length,
//! so that the first connections after an attach (a native attach switches the veth to NAPI)
//! are not measured. The figure is the median of the per-round ratios, with / without; a round
//! with an error in either run fails the bench.
//!
//! Writes target/bench/veth-xdp.json. Not part of `cargo xtask bench`: docs/benchmarks.md
//! quotes its figures where it explains what bounds the end-to-end ClusterIP ratio.

use std::{os::fd::OwnedFd, path::PathBuf};

use anyhow::{Context as _, ensure};
use clap::Parser;
use lab::{
    bare_xdp,
    lab::{Host, Lab},
    peer::{self, ClientReport},
};
use serde::Serialize;

#[derive(Parser)]
#[command(about = "What a bare XDP_PASS program on a veth costs TCP connections through it")]
struct Args {
    /// Rounds; each measures every mode without and with the program once.
    #[arg(long, default_value_t = 12)]
    rounds: u32,
    /// Length of every measured run.
    #[arg(long, default_value_t = 1000)]
    duration_ms: u64,
    #[arg(long, default_value = "target/bench/veth-xdp.json")]
    out: PathBuf,
}

const SERVER_PORT: u16 = 8080;

#[derive(Clone, Copy, PartialEq)]
enum XdpMode {
    Native,
    Generic,
}

impl XdpMode {
    fn label(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
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

/// The client and server hosts; the server process and the lab drop in that order.
struct VethLab {
    _server: lab::lab::Proc,
    client: Host,
    server: Host,
    _lab: Lab,
}

impl VethLab {
    fn new() -> anyhow::Result<Self> {
        let mut lab = Lab::new()?;
        let client = lab.host("c")?;
        let server = lab.host("s")?;
        lab.veth(&client, "c0", &server, "s0")?;
        client.addr("c0", "10.250.0.1/24")?;
        server.addr("s0", "10.250.0.2/24")?;
        let server_proc = peer::serve(&server, "s", SERVER_PORT)?;
        Ok(Self {
            _server: server_proc,
            client,
            server,
            _lab: lab,
        })
    }

    /// The bare XDP_PASS program on both ends of the pair, until the returned links drop.
    fn attach(&self, program: &OwnedFd, mode: XdpMode) -> anyhow::Result<Vec<OwnedFd>> {
        let mut links = Vec::new();
        for (host, iface) in [(&self.client, "c0"), (&self.server, "s0")] {
            let _inside = host.enter()?;
            let ifindex = host.ifindex(iface)?;
            let link = match mode {
                XdpMode::Native => bare_xdp::attach_native(program, ifindex),
                XdpMode::Generic => bare_xdp::attach_generic(program, ifindex),
            }
            .with_context(|| format!("attaching XDP ({}) to {iface}", mode.label()))?;
            links.push(link);
        }
        Ok(links)
    }

    /// One `lab-peer load` run from the client to the server; its rate, or an error if any
    /// request failed.
    fn load(&self, mode: LoadMode, duration_ms: u64) -> anyhow::Result<u64> {
        let to = format!("10.250.0.2:{SERVER_PORT}");
        let duration = duration_ms.to_string();
        let mut args = vec!["load", "--to", &to, "--duration-ms", &duration];
        if mode == LoadMode::RequestResponse {
            args.push("--one-flow");
        }
        let stdout = self.client.run(peer::binary()?, &args)?;
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
    fn measured(&self, mode: LoadMode, duration_ms: u64) -> anyhow::Result<u64> {
        self.load(mode, (duration_ms / 5).max(1))?;
        self.load(mode, duration_ms)
    }
}

#[derive(Serialize)]
struct Cell {
    xdp_mode: &'static str,
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

fn cell(xdp_mode: XdpMode, load: LoadMode, without: Vec<u64>, with: Vec<u64>) -> Cell {
    let as_f64 = |rates: &[u64]| rates.iter().map(|&rate| rate as f64).collect::<Vec<_>>();
    let mut ratios: Vec<f64> = without
        .iter()
        .zip(&with)
        .filter(|(without, _)| **without > 0)
        .map(|(&without, &with)| with as f64 / without as f64)
        .collect();
    Cell {
        xdp_mode: xdp_mode.label(),
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
    let lab = VethLab::new().context("building the veth lab")?;
    let program = bare_xdp::load_returning(bare_xdp::XDP_PASS, "lb_veth_pass")?;
    let cases = [XdpMode::Native, XdpMode::Generic]
        .into_iter()
        .flat_map(|xdp| {
            [LoadMode::ConnectRequestClose, LoadMode::RequestResponse].map(move |load| (xdp, load))
        });
    let mut cells = Vec::new();
    for (xdp_mode, load) in cases {
        let (mut without, mut with) = (Vec::new(), Vec::new());
        for round in 0..args.rounds {
            // Alternate which run comes first, so that a drift of the machine's load over a round
            // falls on both sides.
            if round % 2 == 0 {
                without.push(lab.measured(load, args.duration_ms)?);
                let _links = lab.attach(&program, xdp_mode)?;
                with.push(lab.measured(load, args.duration_ms)?);
            } else {
                {
                    let _links = lab.attach(&program, xdp_mode)?;
                    with.push(lab.measured(load, args.duration_ms)?);
                }
                without.push(lab.measured(load, args.duration_ms)?);
            }
        }
        cells.push(cell(xdp_mode, load, without, with));
    }
    let report = Report {
        command: "lb-bench-veth-xdp",
        rounds: args.rounds,
        duration_ms: args.duration_ms,
        load_average_before,
        load_average_after: lab::lab::load_average(),
        cells,
    };
    println!(
        "a bare XDP_PASS program on both ends of a veth pair, 1 client, {} rounds of {} ms runs; \
         load average {} -> {}\n",
        report.rounds,
        report.duration_ms,
        report.load_average_before.trim(),
        report.load_average_after.trim()
    );
    println!(
        "| XDP mode | load | without (median /s) | with | with / without, median of the rounds | rounds slower |"
    );
    println!("|---|---|---:|---:|---:|---:|");
    for cell in &report.cells {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.2}x | {} of {} |",
            cell.xdp_mode,
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
    use super::{LoadMode, XdpMode, cell};

    #[test]
    fn a_cell_pairs_each_round_and_counts_the_slower_ones() {
        // Rounds 2 and 3 the machine halves both runs; the run with the program is slower in
        // rounds 1 and 3.
        let cell = cell(
            XdpMode::Native,
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
