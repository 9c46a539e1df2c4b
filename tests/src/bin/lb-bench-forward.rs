//! NodePort to an endpoint on another node through a node with two NICs (`lab::two_nics`):
//! clients on `eth0`, the other node behind `eth1`. Both directions of every flow cross from one
//! NIC to the other; XDP sends them itself with XDP_REDIRECT, or, with the NICs taken out of its
//! port map, hands them translated to the stack, which forwards them. The two are measured in
//! interleaved rounds, connect/request/close and request/response, with `lab-peer load`.

use std::path::PathBuf;

use anyhow::{Context as _, ensure};
use clap::Parser;
use lab::{
    lab::Host,
    peer::{self, ClientReport},
    two_nics::{NODE_PORT, NODE1_CLIENT_SIDE, NODE1_NODE_SIDE, TwoNics},
};
use serde::Serialize;

#[derive(Parser)]
#[command(about = "NodePort to a remote endpoint across two NICs: XDP_REDIRECT against the stack")]
struct Args {
    /// Interleaved rounds; each runs every mode with both ways of forwarding.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Length of one run.
    #[arg(long, default_value_t = 2000)]
    duration_ms: u64,
    /// Parallel clients of a run: each count is measured in every mode and round.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 4])]
    clients: Vec<usize>,
    /// Measure one way of forwarding only (`redirect` or `stack`), e.g. to look into one.
    #[arg(long)]
    only: Option<String>,
    #[arg(long, default_value = "target/bench/forward.json")]
    out: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    ConnectRequestClose,
    RequestResponse,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::ConnectRequestClose => "connect/request/close",
            Mode::RequestResponse => "request/response",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Forwarding {
    XdpRedirect,
    Stack,
}

impl Forwarding {
    fn label(self) -> &'static str {
        match self {
            Forwarding::XdpRedirect => "XDP_REDIRECT",
            Forwarding::Stack => "the stack",
        }
    }
}

/// One run: requests a second, p50 and p99 latency in ns, failed requests.
type RunFigures = (u64, u64, u64, u64);

#[derive(Serialize)]
struct Cell {
    mode: &'static str,
    clients: usize,
    forwarding: &'static str,
    /// Requests a second, per round.
    rates: Vec<u64>,
    median_rate: u64,
    median_p50_us: f64,
    median_p99_us: f64,
    /// Failed requests, all rounds; each is listed with its error on stderr.
    failed: u64,
}

#[derive(Serialize)]
struct Report {
    rounds: u32,
    duration_ms: u64,
    cells: Vec<Cell>,
    /// Median rate with XDP_REDIRECT over the median with the stack, per mode and client count.
    ratios: Vec<(&'static str, usize, f64)>,
    load_average_before: String,
    load_average_after: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let load_average_before = lab::lab::load_average();
    let mut lab = TwoNics::build().context("building the two-NIC lab")?;
    let ifindexes = [lab.node1.ifindex("eth0")?, lab.node1.ifindex("eth1")?];
    let modes = [Mode::ConnectRequestClose, Mode::RequestResponse];
    let ways: Vec<Forwarding> = [Forwarding::XdpRedirect, Forwarding::Stack]
        .into_iter()
        .filter(|way| match args.only.as_deref() {
            Some("redirect") => *way == Forwarding::XdpRedirect,
            Some("stack") => *way == Forwarding::Stack,
            _ => true,
        })
        .collect();
    let combos: Vec<(Mode, usize)> = modes
        .iter()
        .flat_map(|&mode| args.clients.iter().map(move |&clients| (mode, clients)))
        .collect();
    let mut runs: Vec<((Mode, usize, Forwarding), Vec<RunFigures>)> = combos
        .iter()
        .flat_map(|&(mode, clients)| {
            ways.iter()
                .map(move |&way| ((mode, clients, way), Vec::new()))
        })
        .collect();
    for round in 0..args.rounds {
        for &(mode, clients) in &combos {
            // Alternate which way goes first, so that neither always follows the other.
            let mut order = ways.clone();
            if round % 2 == 1 {
                order.reverse();
            }
            for way in order {
                allow_redirect(&mut lab, ifindexes, way == Forwarding::XdpRedirect)?;
                let redirected_before = redirected(&lab.node1)?;
                let report = load(&lab.client, mode, clients, args.duration_ms)?;
                if report.errors > 0 {
                    eprintln!(
                        "round {round}, {} through {}, {clients} client(s): {} of {} requests \
                         failed: {:?}",
                        mode.label(),
                        way.label(),
                        report.errors,
                        report.attempts,
                        report.error_samples
                    );
                }
                let redirected = redirected(&lab.node1)? - redirected_before;
                check(&report, mode, way, redirected).with_context(|| {
                    let events = lab.datapath.events().unwrap_or_default();
                    let counted: Vec<_> = events.iter().filter(|(_, n)| **n > 0).collect();
                    format!("{clients} client(s), round {round}; datapath events: {counted:?}")
                })?;
                let latency = report.latency.context("a latency summary")?;
                runs.iter_mut()
                    .find(|(key, _)| *key == (mode, clients, way))
                    .context("every combination")?
                    .1
                    .push((
                        latency.rate_per_s,
                        latency.p50_ns,
                        latency.p99_ns,
                        report.errors,
                    ));
            }
        }
    }
    allow_redirect(&mut lab, ifindexes, true)?;

    let cells: Vec<Cell> = runs
        .iter()
        .map(|((mode, clients, way), runs)| Cell {
            mode: mode.label(),
            clients: *clients,
            forwarding: way.label(),
            rates: runs.iter().map(|run| run.0).collect(),
            median_rate: median(runs.iter().map(|run| run.0)),
            median_p50_us: median(runs.iter().map(|run| run.1)) as f64 / 1000.0,
            median_p99_us: median(runs.iter().map(|run| run.2)) as f64 / 1000.0,
            failed: runs.iter().map(|run| run.3).sum(),
        })
        .collect();
    let ratios: Vec<(&'static str, usize, f64)> = combos
        .iter()
        .map(|&(mode, clients)| {
            let rate = |way: Forwarding| {
                cells
                    .iter()
                    .find(|cell| {
                        cell.mode == mode.label()
                            && cell.clients == clients
                            && cell.forwarding == way.label()
                    })
                    .map_or(0, |cell| cell.median_rate) as f64
            };
            (
                mode.label(),
                clients,
                rate(Forwarding::XdpRedirect) / rate(Forwarding::Stack),
            )
        })
        .collect();
    println!(
        "NodePort to a remote endpoint across two NICs: {} interleaved rounds of {} ms; median \
         requests/s, p50 / p99 latency",
        args.rounds, args.duration_ms
    );
    println!(
        "\n| mode | clients | forwarding | requests/s | p50 / p99 µs | failed |\n|---|---:|---|---:|---:|---:|"
    );
    for cell in &cells {
        println!(
            "| {} | {} | {} | {} | {:.0} / {:.0} | {} |",
            cell.mode,
            cell.clients,
            cell.forwarding,
            cell.median_rate,
            cell.median_p50_us,
            cell.median_p99_us,
            cell.failed
        );
    }
    for (mode, clients, ratio) in &ratios {
        println!("{mode}, {clients} client(s): XDP_REDIRECT / the stack = {ratio:.2}x");
    }
    let report = Report {
        rounds: args.rounds,
        duration_ms: args.duration_ms,
        cells,
        ratios,
        load_average_before,
        load_average_after: lab::lab::load_average(),
    };
    lab::write_json_report(&args.out, &report)
}

/// Lets node1's XDP send frames out of its NICs with XDP_REDIRECT, or not. The device map
/// resolves an ifindex in the network namespace of the thread that writes it: node1's.
fn allow_redirect(lab: &mut TwoNics, ifindexes: [u32; 2], allowed: bool) -> anyhow::Result<()> {
    let _inside = lab.node1.enter()?;
    for ifindex in ifindexes {
        lab.datapath.allow_redirect_to(ifindex, allowed)?;
    }
    Ok(())
}

fn load(
    client: &Host,
    mode: Mode,
    clients: usize,
    duration_ms: u64,
) -> anyhow::Result<ClientReport> {
    let to = format!("{NODE1_CLIENT_SIDE}:{NODE_PORT}");
    let clients = clients.to_string();
    let duration = duration_ms.to_string();
    let mut load = vec![
        "load",
        "--to",
        &to,
        "--clients",
        &clients,
        "--duration-ms",
        &duration,
    ];
    if mode == Mode::RequestResponse {
        load.push("--one-flow");
    }
    let stdout = client.run(peer::binary()?, &load)?;
    serde_json::from_str(stdout.trim())
        .with_context(|| format!("parsing lab-peer load report: {stdout}"))
}

/// Every request answered by the pod, which saw node1's node-side address (SNAT); with
/// XDP_REDIRECT, XDP sent the frames itself, and without, none.
fn check(
    report: &ClientReport,
    mode: Mode,
    way: Forwarding,
    redirected: u64,
) -> anyhow::Result<()> {
    let what = format!("{} through {}", mode.label(), way.label());
    // A failed request is reported with the run's figures; more than one in a thousand fails
    // the bench.
    ensure!(
        report.ok > 0 && report.errors * 1000 <= report.attempts,
        "{what}: {} of {} requests failed: {:?}",
        report.errors,
        report.attempts,
        report.error_samples
    );
    ensure!(
        report.peers_seen.keys().eq([&NODE1_NODE_SIDE.to_string()]),
        "{what}: the endpoint saw {:?}",
        report.peers_seen
    );
    match way {
        // Each request: at least the request out and the answer back.
        Forwarding::XdpRedirect => ensure!(
            redirected >= 2 * report.ok,
            "{what}: {redirected} frames redirected for {} requests",
            report.ok
        ),
        Forwarding::Stack => ensure!(redirected == 0, "{what}: {redirected} frames redirected"),
    }
    Ok(())
}

/// Frames node1's XDP program sent out of another NIC, both NICs together.
fn redirected(node1: &Host) -> anyhow::Result<u64> {
    Ok(node1.nic_stat("eth0", "rx_queue_0_xdp_redirect")?
        + node1.nic_stat("eth1", "rx_queue_0_xdp_redirect")?)
}

fn median(values: impl Iterator<Item = u64>) -> u64 {
    let mut values: Vec<u64> = values.collect();
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}
