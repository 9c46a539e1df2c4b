//! `lb`: the load balancer's agent and CLI.

use std::{ffi::CString, time::Duration};

use anyhow::Context as _;
use aya::programs::XdpMode;
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::counter::XdpCounter;

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "eBPF/XDP service load balancer that replaces kube-proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the XDP packet counter to a NIC and print what it counts, once per interval.
    Count {
        /// Interface name in this process's network namespace.
        #[arg(long)]
        iface: String,
        /// XDP attach mode.
        #[arg(long, value_enum, default_value_t = Mode::Native)]
        mode: Mode,
        /// Seconds between reports.
        #[arg(long, default_value_t = 1)]
        interval: u64,
        /// Number of reports before detaching and exiting (0: until killed).
        #[arg(long, default_value_t = 0)]
        reports: u64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// In the driver (fails if the driver has no XDP support).
    Native,
    /// Generic XDP in the stack (works everywhere, slower).
    Generic,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Count {
            iface,
            mode,
            interval,
            reports,
        } => count(&iface, mode, Duration::from_secs(interval), reports),
    }
}

fn count(iface: &str, mode: Mode, interval: Duration, reports: u64) -> anyhow::Result<()> {
    let mut counter = XdpCounter::load()?;
    let name = CString::new(iface).context("interface name contains a NUL byte")?;
    let mode = match mode {
        Mode::Native => XdpMode::Driver,
        Mode::Generic => XdpMode::Skb,
    };
    counter
        .attach(name.as_c_str(), mode)
        .with_context(|| format!("attaching to {iface}"))?;
    let mut report = 0;
    while reports == 0 || report < reports {
        std::thread::sleep(interval);
        report += 1;
        let line: Vec<String> = counter
            .read()?
            .iter()
            .filter(|count| count.counter.packets > 0)
            .map(|count| {
                format!(
                    "{}={}/{}B",
                    count.label, count.counter.packets, count.counter.bytes
                )
            })
            .collect();
        println!(
            "{iface}: {}",
            if line.is_empty() {
                "-".into()
            } else {
                line.join(" ")
            }
        );
    }
    Ok(())
}
