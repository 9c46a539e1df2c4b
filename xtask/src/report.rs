//! What `cargo xtask bench` makes of the benches' JSON once they have run: SVG plots where a curve
//! says more than a table, and a summary (target/bench/summary.md) of where each of the targets
//! in docs/benchmarks.md stands. Reads the JSON loosely (serde_json::Value), so a bench that was
//! skipped or an older file only leaves a gap in the summary.

use std::{collections::BTreeSet, fmt::Write as _, path::Path, time::Duration};

use anyhow::Context as _;
use plotters::{
    coord::ranged1d::{AsRangedCoord, ValueFormatter},
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};
use serde_json::Value;

/// Wall time of each step of the run, for the summary.
pub(crate) struct Timings {
    pub(crate) build: Duration,
    pub(crate) datapath: Duration,
    pub(crate) live: Duration,
    pub(crate) forward: Duration,
    pub(crate) control: Duration,
    pub(crate) e2e: Duration,
    pub(crate) total: Duration,
}

/// The limit on the whole `cargo xtask bench` run (docs/benchmarks.md).
const BUDGET: Duration = Duration::from_secs(15 * 60);

/// Writes the plots and summary.md into `dir` (where the JSON is) and returns the summary.
/// `timings` is None when the report is written again from an earlier run's JSON.
pub(crate) fn write(dir: &Path, commit: &str, timings: Option<&Timings>) -> anyhow::Result<String> {
    let datapath = read_json(&dir.join("datapath.json"));
    let monitor = read_json(&dir.join("monitor.json"));
    let control = read_json(&dir.join("control.json"));
    let control_maglev = read_json(&dir.join("control-maglev.json"));
    let maglev = read_json(&dir.join("maglev.json"));
    let e2e = read_json(&dir.join("e2e.json"));
    let live = read_json(&dir.join("live.json"));
    let forward = read_json(&dir.join("forward.json"));
    let mut plots = Vec::new();
    if let Some(datapath) = &datapath {
        let svg = datapath_plot(datapath)?;
        std::fs::write(dir.join("datapath.svg"), svg).context("writing datapath.svg")?;
        plots.push((
            "datapath.svg",
            "per-packet cost against the number of services",
        ));
    }
    if let Some(e2e) = &e2e {
        std::fs::write(dir.join("e2e-ratios.svg"), e2e_ratio_plot(e2e)?)
            .context("writing e2e-ratios.svg")?;
        std::fs::write(dir.join("e2e-latency.svg"), e2e_latency_plot(e2e)?)
            .context("writing e2e-latency.svg")?;
        plots.push((
            "e2e-ratios.svg",
            "end-to-end rates as a ratio to straight to a pod",
        ));
        plots.push(("e2e-latency.svg", "end-to-end p50 / p99 latency"));
    }
    let results = Results {
        datapath: datapath.as_ref(),
        monitor: monitor.as_ref(),
        live: live.as_ref(),
        forward: forward.as_ref(),
        control: control.as_ref(),
        control_maglev: control_maglev.as_ref(),
        maglev: maglev.as_ref(),
        e2e: e2e.as_ref(),
    };
    let summary = summary(commit, timings, &results, &plots);
    std::fs::write(dir.join("summary.md"), &summary).context("writing summary.md")?;
    Ok(summary)
}

fn read_json(path: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

fn f(value: &Value, key: &str) -> Option<f64> {
    value.get(key).and_then(Value::as_f64)
}

fn s<'a>(value: &'a Value, key: &str) -> &'a str {
    value.get(key).and_then(Value::as_str).unwrap_or_default()
}

fn list<'a>(value: &'a Value, key: &str) -> &'a [Value] {
    value
        .get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn minutes(duration: Duration) -> String {
    let secs = duration.as_secs();
    format!("{} min {:02} s", secs / 60, secs % 60)
}

/// "met" when all are, "NOT met" when none is, otherwise how many of how many.
fn standing(met: &[bool]) -> String {
    let count = met.iter().filter(|&&met| met).count();
    match count {
        _ if met.is_empty() => "not measured".to_owned(),
        0 => "**NOT met**".to_owned(),
        _ if count == met.len() => "met".to_owned(),
        _ => format!("**partly met** ({count} of {})", met.len()),
    }
}

fn short_count(services: f64) -> String {
    match services as u64 {
        n if n >= 1000 && n % 1000 == 0 => format!("{}k", n / 1000),
        n => n.to_string(),
    }
}

/// The JSON of each bench that has run.
#[derive(Clone, Copy)]
struct Results<'a> {
    datapath: Option<&'a Value>,
    /// lb-bench --monitor: the same paths with `lb monitor` attached.
    monitor: Option<&'a Value>,
    live: Option<&'a Value>,
    forward: Option<&'a Value>,
    control: Option<&'a Value>,
    /// lb-bench-control --maglev: every Service with Maglev.
    control_maglev: Option<&'a Value>,
    /// lb-bench-maglev: the tables' balance and disruption.
    maglev: Option<&'a Value>,
    e2e: Option<&'a Value>,
}

fn summary(
    commit: &str,
    timings: Option<&Timings>,
    results: &Results<'_>,
    plots: &[(&str, &str)],
) -> String {
    let Results {
        datapath,
        monitor,
        live,
        forward,
        control,
        control_maglev,
        maglev,
        e2e,
    } = *results;
    let mut out = String::from("# cargo xtask bench: summary\n\n");
    match timings {
        Some(timings) => {
            let _ = writeln!(
                out,
                "Commit {commit}. Wall time {} (release build {}, per packet {}, live frames {}, \
                 two NICs {}, control plane {}, end to end {}).",
                minutes(timings.total),
                minutes(timings.build),
                minutes(timings.datapath),
                minutes(timings.live),
                minutes(timings.forward),
                minutes(timings.control),
                minutes(timings.e2e),
            );
        }
        None => {
            let _ = writeln!(
                out,
                "Written again by `cargo xtask bench-report` at commit {commit} from the JSON of an \
                 earlier run; its wall time is not known here."
            );
        }
    }
    if let Some(machine) = datapath.and_then(|datapath| datapath.get("machine")) {
        let _ = writeln!(
            out,
            "Machine: {} CPUs ({}), kernel {}; load average {} before the per-packet bench.",
            machine
                .get("nproc")
                .map(Value::to_string)
                .unwrap_or_default(),
            s(machine, "cpu_model"),
            s(machine, "kernel"),
            s(machine, "loadavg_before")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        );
    }
    if let Some(machine) = e2e.and_then(|e2e| e2e.get("machine")) {
        let _ = writeln!(
            out,
            "Load average around the end-to-end bench: {} before, {} after (the machine is shared).",
            s(machine, "loadavg_before")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            s(machine, "loadavg_after")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        );
    }

    out.push_str("\n## Targets\n\n| target | where it stands | figures |\n|---|---|---|\n");
    if let Some(datapath) = datapath {
        datapath_targets(&mut out, datapath);
    } else {
        out.push_str("| per packet | not run | no datapath.json |\n");
    }
    if let Some(e2e) = e2e {
        e2e_targets(&mut out, e2e);
    } else {
        out.push_str("| end to end | not run | no e2e.json |\n");
    }
    if let Some(control) = control {
        control_targets(&mut out, control);
    } else {
        out.push_str("| control plane | not run | no control.json |\n");
    }
    if let Some(control) = control_maglev {
        maglev_control_targets(&mut out, control);
    }
    if let Some(maglev) = maglev {
        maglev_table_targets(&mut out, maglev);
    }
    if let Some(timings) = timings {
        let _ = writeln!(
            out,
            "| `cargo xtask bench` under 15 min | {} | {} for this run, release build included (a \
             fresh clone adds the first build of xtask itself) |",
            standing(&[timings.total <= BUDGET]),
            minutes(timings.total)
        );
    }

    if let Some(datapath) = datapath {
        out.push_str(
            "\n## Per packet\n\nns, median / p90 net of the XDP_PASS floor (the floor row is raw), \
             BPF_PROG_TEST_RUN with repeat=1:\n\n",
        );
        datapath_table(&mut out, datapath);
        family_ratio_table(&mut out, datapath);
        if let Some(monitor) = monitor {
            monitor_table(&mut out, datapath, monitor);
        }
    }
    if let Some(live) = live {
        live_table(&mut out, live);
    }
    if let Some(forward) = forward {
        forward_table(&mut out, forward);
    }
    if let Some(e2e) = e2e {
        let _ = write!(
            out,
            "\n## End to end\n\n{} interleaved rounds of {} ms per run. Median rate (requests/s), its \
             ratio to straight to a pod [lowest-highest round by round; the median of the round-by-round \
             ratios, where recorded], median p50 / p99 latency in µs:\n\n",
            e2e.get("rounds").map(Value::to_string).unwrap_or_default(),
            e2e.get("duration_ms")
                .map(Value::to_string)
                .unwrap_or_default(),
        );
        e2e_table(&mut out, e2e);
        rule_load_table(&mut out, e2e, control);
    }
    if !plots.is_empty() {
        out.push_str("\n## Plots\n\n");
        for (file, what) in plots {
            let _ = writeln!(out, "- `{file}`: {what}");
        }
    }
    out
}

/// Each path's median without a monitor (the per-packet run) and with `lb monitor` attached
/// (every kind of event on, the ring buffer read), at the sizes of the monitored run.
fn monitor_table(out: &mut String, datapath: &Value, monitor: &Value) {
    out.push_str(
        "\n### With `lb monitor` attached\n\nns, median net of the floor, without a monitor (the \
         run above) and with one (`lb-bench --monitor`: every kind of event reported, the ring \
         buffer read as the monitor reads it; a separate run):\n\n\
         | path | services | without | with |\n|---|---:|---:|---:|\n",
    );
    for size in list(monitor, "sizes") {
        let services = size.get("services").and_then(Value::as_u64).unwrap_or(0);
        let without = list(datapath, "sizes")
            .iter()
            .find(|other| other.get("services").and_then(Value::as_u64) == Some(services));
        for path in list(size, "paths") {
            let name = s(path, "path");
            let unmonitored = without
                .and_then(|size| {
                    list(size, "paths")
                        .iter()
                        .find(|other| s(other, "path") == name)
                })
                .and_then(|other| other.get("net_median_ns"))
                .map_or_else(|| "-".to_owned(), Value::to_string);
            let _ = writeln!(
                out,
                "| {name} | {services} | {unmonitored} | {} |",
                path.get("net_median_ns")
                    .map(Value::to_string)
                    .unwrap_or_default()
            );
        }
    }
}

/// The live-frame rates: frames a second the node's program ran on, and their ratio to the
/// XDP_DROP floor of the same run.
fn live_table(out: &mut String, live: &Value) {
    let _ = write!(
        out,
        "\n## Live frames on a veth, native XDP\n\n{} interleaved rounds of {} frames of {} bytes \
         per path (`lb-bench-live`); median million frames a second the receiving program ran \
         at, its ratio to the XDP_DROP floor, and frames lost:\n\n\
         | path | Mpps | of the floor | lost |\n|---|---:|---:|---:|\n",
        live.get("rounds").map(Value::to_string).unwrap_or_default(),
        live.get("frames_per_round")
            .map(Value::to_string)
            .unwrap_or_default(),
        live.get("frame_bytes")
            .map(Value::to_string)
            .unwrap_or_default(),
    );
    for path in list(live, "paths") {
        let _ = writeln!(
            out,
            "| {} | {:.2} | {:.2}x | {} |",
            s(path, "label"),
            f(path, "median_mpps").unwrap_or(f64::NAN),
            f(path, "of_floor").unwrap_or(f64::NAN),
            f(path, "lost").unwrap_or(f64::NAN),
        );
    }
}

/// NodePort to a remote endpoint across two NICs: XDP_REDIRECT against the stack forwarding.
fn forward_table(out: &mut String, forward: &Value) {
    let _ = write!(
        out,
        "\n## Two NICs: XDP_REDIRECT against the stack\n\n{} interleaved rounds of {} ms \
         (`lb-bench-forward`), NodePort to an endpoint behind the node's other NIC; median \
         requests/s and p50 / p99 latency in µs:\n\n\
         | mode | clients | forwarding | requests/s | p50 / p99 µs | failed |\n|---|---:|---|---:|---:|---:|\n",
        forward
            .get("rounds")
            .map(Value::to_string)
            .unwrap_or_default(),
        forward
            .get("duration_ms")
            .map(Value::to_string)
            .unwrap_or_default(),
    );
    for cell in list(forward, "cells") {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.0} / {:.0} | {} |",
            s(cell, "mode"),
            f(cell, "clients").unwrap_or(f64::NAN),
            s(cell, "forwarding"),
            f(cell, "median_rate").unwrap_or(f64::NAN),
            f(cell, "median_p50_us").unwrap_or(f64::NAN),
            f(cell, "median_p99_us").unwrap_or(f64::NAN),
            f(cell, "failed").unwrap_or(f64::NAN),
        );
    }
}

fn datapath_targets(out: &mut String, datapath: &Value) {
    let targets = list(datapath, "targets");
    let rows: [(&str, &[&str]); 3] = [
        ("established XDP path <= 45 ns net", &["xdp_established"]),
        (
            "new flow <= 300 ns net",
            &["xdp_new_flow", "xdp_new_flow_spread"],
        ),
        (
            "not a service <= 15 ns net",
            &["xdp_miss", "xdp_miss_established"],
        ),
    ];
    for (label, paths) in rows {
        let chosen: Vec<&Value> = targets
            .iter()
            .filter(|target| {
                paths.contains(&s(target, "path")) && !s(target, "target").contains("within")
            })
            .collect();
        let met: Vec<bool> = chosen
            .iter()
            .map(|target| target["met"].as_bool().unwrap_or(false))
            .collect();
        let figures = paths
            .iter()
            .map(|path| {
                let values = chosen
                    .iter()
                    .filter(|target| s(target, "path") == *path)
                    .map(|target| {
                        format!(
                            "{}: {:.0}",
                            short_count(f(target, "services").unwrap_or(0.0)),
                            f(target, "value").unwrap_or(f64::NAN)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                format!("{path} {values} ns")
            })
            .collect::<Vec<_>>()
            .join("; ");
        let _ = writeln!(out, "| {label} | {} | {figures} |", standing(&met));
    }
    let scale: Vec<&Value> = targets
        .iter()
        .filter(|target| s(target, "target").contains("within"))
        .collect();
    let met: Vec<bool> = scale
        .iter()
        .map(|target| target["met"].as_bool().unwrap_or(false))
        .collect();
    let figures = scale
        .iter()
        .map(|target| {
            format!(
                "{} {:+.1}%",
                s(target, "path"),
                f(target, "value").unwrap_or(f64::NAN)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let largest = scale
        .first()
        .and_then(|target| f(target, "services"))
        .map_or_else(|| "the largest size".to_owned(), short_count);
    let _ = writeln!(
        out,
        "| cost at {largest} services within 10% of 1 (30% for new flows spread over every frontend) | {} | {figures} (paths at or below the floor left out) |",
        standing(&met)
    );
    // Each IPv6 path against its IPv4 twin, at every size (lb-bench's `family_ratios`).
    let family: Vec<&Value> = targets
        .iter()
        .filter(|target| is_ipv6_path(s(target, "path")) && !s(target, "target").contains("within"))
        .collect();
    if !family.is_empty() {
        let met: Vec<bool> = family
            .iter()
            .map(|target| target["met"].as_bool().unwrap_or(false))
            .collect();
        let figures = family
            .iter()
            .map(|target| {
                format!(
                    "{} {}: {:.2}x",
                    s(target, "path"),
                    short_count(f(target, "services").unwrap_or(0.0)),
                    f(target, "value").unwrap_or(f64::NAN)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let limit = family
            .first()
            .and_then(|target| f(target, "limit"))
            .unwrap_or(f64::NAN);
        let _ = writeln!(
            out,
            "| IPv6 per packet <= {limit}x its IPv4 twin | {} | {figures} (paths whose IPv4 figure is at or below the floor left out) |",
            standing(&met)
        );
    }
}

/// lb-bench's keys of IPv6 paths: `xdp6_*` and `tc6_*`.
fn is_ipv6_path(key: &str) -> bool {
    key.starts_with("xdp6_") || key.starts_with("tc6_")
}

/// The end-to-end targets lb-bench-e2e judged, one row per kind, each labelled with the limit
/// the bench judged it by (so that the label cannot say another figure than the verdict used).
/// A row gathers the targets whose text starts with one of its prefixes; each figure is named
/// by its prefix's tag and the rest of the target's text.
fn e2e_targets(out: &mut String, e2e: &Value) {
    let targets = list(e2e, "targets");
    for (subject, object, prefixes) in [
        (
            "ClusterIP connect/request/close",
            "straight to pod",
            &[("lb ClusterIP connect/request/close / straight to pod", "")][..],
        ),
        (
            "NodePort connect/request/close",
            "straight to pod",
            &[("lb NodePort connect/request/close / straight to pod", "")][..],
        ),
        (
            "IPv6 connect/request/close rate",
            "IPv4's",
            &[
                (
                    "lb ClusterIP connect/request/close, IPv6 / IPv4 rate",
                    "ClusterIP ",
                ),
                (
                    "lb NodePort connect/request/close, IPv6 / IPv4 rate",
                    "NodePort ",
                ),
            ][..],
        ),
        (
            "connect/request/close",
            "iptables",
            &[("lb / iptables", "")][..],
        ),
    ] {
        let chosen: Vec<(&str, &str, &Value)> = targets
            .iter()
            .filter_map(|target| {
                let text = s(target, "target");
                prefixes
                    .iter()
                    .find(|(prefix, _)| text.starts_with(prefix))
                    .map(|(prefix, tag)| (*prefix, *tag, target))
            })
            .collect();
        let met: Vec<bool> = chosen
            .iter()
            .map(|(_, _, target)| target["met"].as_bool().unwrap_or(false))
            .collect();
        let figures = chosen
            .iter()
            .map(|(prefix, tag, target)| {
                let text = s(target, "target");
                let detail = text.strip_prefix(prefix).unwrap_or(text);
                format!(
                    "{tag}{} {:.2}x",
                    detail.trim_start_matches([',', ' ']),
                    f(target, "value").unwrap_or(f64::NAN)
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        let limits: BTreeSet<String> = chosen
            .iter()
            .filter_map(|(_, _, target)| f(target, "limit"))
            .map(|limit| format!("{limit:.2}x"))
            .collect();
        let limit = limits.into_iter().collect::<Vec<_>>().join(" / ");
        let _ = writeln!(
            out,
            "| {subject} at the largest size >= {limit} {object} | {} | {figures} |",
            standing(&met)
        );
    }
}

/// Every Service with Maglev: the tables' memory against the target, and what programming and
/// an endpoint change cost then.
fn maglev_control_targets(out: &mut String, control: &Value) {
    let services = f(control, "services").unwrap_or(0.0);
    let endpoints = f(control, "endpoints_per_service").unwrap_or(0.0);
    if let Some(mib) = f(control, "maglev_tables_memlock_mib") {
        let mb = mib * 1.048_576;
        let _ = writeln!(
            out,
            "| {} Maglev Services x {endpoints}: table memory < 256 MB | {} | {mb:.0} MB ({mib:.1} MiB) in {} tables; programmed from nothing in {:.0} ms; one endpoint change median {:.1} ms, p90 {:.1} ms |",
            short_count(services),
            standing(&[mb < 256.0]),
            f(control, "maglev_tables").unwrap_or(0.0),
            f(control, "from_nothing_ms").unwrap_or(f64::NAN),
            f(control, "change_median_ms").unwrap_or(f64::NAN),
            f(control, "change_p90_ms").unwrap_or(f64::NAN),
        );
    }
}

/// Backend counts at which docs/maglev.md's targets are judged.
const MAGLEV_TARGET_BACKENDS: [f64; 4] = [2.0, 10.0, 100.0, 1000.0];

/// Maglev's tables at the sizes the datapath gives: the busiest backend within 5% of the mean,
/// and removing one backend moving at most 1.5/N of the flows (mean of the removals measured).
fn maglev_table_targets(out: &mut String, maglev: &Value) {
    let rows: Vec<&Value> = maglev
        .get("rows")
        .and_then(Value::as_array)
        .map(|rows| {
            rows.iter()
                .filter(|row| row["band_edge"] != true)
                .filter(|row| MAGLEV_TARGET_BACKENDS.contains(&f(row, "backends").unwrap_or(0.0)))
                .collect()
        })
        .unwrap_or_default();
    let busiest = |row: &Value| f(row, "busiest_over_mean").unwrap_or(f64::NAN);
    let removal = |row: &Value| {
        let removal = row.get("remove_one").unwrap_or(&Value::Null);
        let moved = f(removal, "flows_moved_pct").unwrap_or(f64::NAN);
        moved / f(removal, "ideal_flows_moved_pct").unwrap_or(f64::NAN)
    };
    let mut target =
        |label: &str, met: &dyn Fn(&Value) -> bool, figure: &dyn Fn(&Value) -> String| {
            let figures: Vec<String> = rows
                .iter()
                .map(|row| format!("N={} {}", f(row, "backends").unwrap_or(0.0), figure(row)))
                .collect();
            let met: Vec<bool> = rows.iter().map(|row| met(row)).collect();
            let _ = writeln!(
                out,
                "| {label} | {} | {} |",
                standing(&met),
                figures.join(", ")
            );
        };
    target(
        "Maglev: busiest backend within 5% of the mean (N = 2, 10, 100, 1000)",
        &|row| busiest(row) <= 1.05,
        &|row| format!("{:+.2}%", (busiest(row) - 1.0) * 100.0),
    );
    target(
        "Maglev: removing one of N backends moves <= 1.5/N of the flows (multiples of 1/N, mean of the removals)",
        &|row| removal(row) <= 1.5,
        &|row| format!("{:.2}x", removal(row)),
    );
}

fn control_targets(out: &mut String, control: &Value) {
    let services = f(control, "services").unwrap_or(0.0);
    let endpoints = f(control, "endpoints_per_service").unwrap_or(0.0);
    if let Some(ms) = f(control, "from_nothing_ms") {
        let _ = writeln!(
            out,
            "| {} x {endpoints} programmed <= 2 s | {} | {ms:.0} ms in-process (compile {:.0} ms, reconcile {:.0} ms) |",
            short_count(services),
            standing(&[ms <= 2000.0]),
            f(control, "compile_ms").unwrap_or(f64::NAN),
            f(control, "reconcile_ms").unwrap_or(f64::NAN),
        );
    }
    if let Some(mib) = f(control, "peak_rss_mib") {
        let mb = mib * 1.048_576;
        let _ = writeln!(
            out,
            "| peak RSS <= 150 MB | {} | {mb:.0} MB ({mib:.1} MiB; the objects alone {:.1} MiB) |",
            standing(&[mb <= 150.0]),
            f(control, "objects_rss_mib").unwrap_or(f64::NAN),
        );
    }
    if let Some(ms) = f(control, "change_median_ms") {
        let _ = writeln!(
            out,
            "| one endpoint change <= 10 ms | {} | median {ms:.1} ms (compile {:.1} ms), p90 {:.1} ms |",
            standing(&[ms <= 10.0]),
            f(control, "change_compile_median_ms").unwrap_or(f64::NAN),
            f(control, "change_p90_ms").unwrap_or(f64::NAN),
        );
    }
    if let Some(ms) = f(control, "change_with_conflict_median_ms") {
        let _ = writeln!(
            out,
            "| the same with a frontend conflict present <= 10 ms | {} | median {ms:.1} ms, p90 {:.1} ms |",
            standing(&[ms <= 10.0]),
            f(control, "change_with_conflict_p90_ms").unwrap_or(f64::NAN),
        );
    }
    if let Some(ms) = f(control, "dsr_mark_flip_median_ms") {
        let _ = writeln!(
            out,
            "| with DSR, one Node's mark removed or written (endpoints over {} Nodes) | measured, no target | median {ms:.1} ms, p90 {:.1} ms; {} Services recompiled each |",
            f(control, "dsr_nodes").unwrap_or(f64::NAN),
            f(control, "dsr_mark_flip_p90_ms").unwrap_or(f64::NAN),
            f(control, "dsr_mark_flip_services_median").unwrap_or(f64::NAN),
        );
    }
}

fn datapath_table(out: &mut String, datapath: &Value) {
    let sizes = list(datapath, "sizes");
    out.push_str("| path |");
    for size in sizes {
        let _ = write!(
            out,
            " {} |",
            short_count(f(size, "services").unwrap_or(0.0))
        );
    }
    out.push_str("\n|---|");
    out.push_str(&"---:|".repeat(sizes.len()));
    out.push_str("\n| floor (raw) |");
    for size in sizes {
        let floor = &size["floor"];
        let _ = write!(
            out,
            " {:.0} / {:.0} |",
            f(floor, "median_ns").unwrap_or(f64::NAN),
            f(floor, "p90_ns").unwrap_or(f64::NAN)
        );
    }
    out.push('\n');
    let Some(first) = sizes.first() else {
        return;
    };
    for (index, path) in list(first, "paths").iter().enumerate() {
        let _ = write!(out, "| {} |", s(path, "path"));
        for size in sizes {
            let cell = &list(size, "paths")[index.min(list(size, "paths").len() - 1)];
            let _ = write!(
                out,
                " {:.0} / {:.0} |",
                f(cell, "net_median_ns").unwrap_or(f64::NAN),
                f(cell, "net_p90_ns").unwrap_or(f64::NAN)
            );
        }
        out.push('\n');
    }
}

/// Each IPv6 path as a multiple of its IPv4 twin, both net of the floor, at every size: of the
/// medians, and in brackets of the means of the middle half (finer than the clock's steps).
fn family_ratio_table(out: &mut String, datapath: &Value) {
    let sizes = list(datapath, "sizes");
    let Some(first) = sizes.first() else {
        return;
    };
    if list(first, "family_ratios").is_empty() {
        return;
    }
    out.push_str(
        "\n### IPv6 against IPv4\n\nEach IPv6 path's median net of the floor as a multiple of its \
         IPv4 twin's [the same of the means of the middle half], and the two medians in ns:\n\n\
         | path | IPv4 twin |",
    );
    for size in sizes {
        let _ = write!(
            out,
            " {} |",
            short_count(f(size, "services").unwrap_or(0.0))
        );
    }
    out.push_str("\n|---|---|");
    out.push_str(&"---:|".repeat(sizes.len()));
    out.push('\n');
    for (index, ratio) in list(first, "family_ratios").iter().enumerate() {
        let _ = write!(out, "| {} | {} |", s(ratio, "path"), s(ratio, "ipv4_path"));
        for size in sizes {
            let Some(cell) = list(size, "family_ratios").get(index) else {
                out.push_str(" - |");
                continue;
            };
            let times = |key| f(cell, key).map_or_else(|| "n/a".to_owned(), |x| format!("{x:.2}x"));
            let _ = write!(
                out,
                " {} [{}], {:.0} / {:.0} |",
                times("ratio_median"),
                times("ratio_iqm"),
                f(cell, "ipv6_net_median_ns").unwrap_or(f64::NAN),
                f(cell, "ipv4_net_median_ns").unwrap_or(f64::NAN)
            );
        }
        out.push('\n');
    }
}

fn e2e_table(out: &mut String, e2e: &Value) {
    let clients: Vec<f64> = list(e2e, "clients")
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    out.push_str("| system | services | path | mode |");
    for count in &clients {
        let _ = write!(out, " {count} client(s) |");
    }
    out.push_str("\n|---|---:|---|---|");
    out.push_str(&"---:|".repeat(clients.len()));
    out.push('\n');
    let cells = list(e2e, "cells");
    let mut seen = Vec::new();
    for cell in cells {
        let key = (
            s(cell, "system"),
            f(cell, "services").unwrap_or(0.0) as u64,
            s(cell, "path"),
            s(cell, "mode"),
        );
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        let _ = write!(out, "| {} | {} | {} | {} |", key.0, key.1, key.2, key.3);
        for &count in &clients {
            let found = cells.iter().find(|other| {
                s(other, "system") == key.0
                    && f(other, "services").unwrap_or(0.0) as u64 == key.1
                    && s(other, "path") == key.2
                    && s(other, "mode") == key.3
                    && f(other, "clients") == Some(count)
            });
            match found {
                Some(other) => {
                    // Runs before the round-by-round median was recorded have the range only.
                    let paired = f(other, "round_ratio_median")
                        .map(|paired| format!("; {paired:.2}x"))
                        .unwrap_or_default();
                    let ratio = match (
                        f(other, "ratio_to_baseline"),
                        f(other, "round_ratio_min"),
                        f(other, "round_ratio_max"),
                    ) {
                        (Some(ratio), Some(low), Some(high)) if key.0 != "baseline" => {
                            format!(" {ratio:.2}x [{low:.2}-{high:.2}{paired}]")
                        }
                        (Some(ratio), _, _) => format!(" {ratio:.2}x"),
                        _ => String::new(),
                    };
                    let errors = match f(other, "errors") {
                        Some(errors) if errors > 0.0 => format!(" ({errors} err)"),
                        _ => String::new(),
                    };
                    let _ = write!(
                        out,
                        " {:.0}{ratio}, {:.0} / {:.0}{errors} |",
                        f(other, "rate_median_per_s").unwrap_or(f64::NAN),
                        f(other, "p50_us").unwrap_or(f64::NAN),
                        f(other, "p99_us").unwrap_or(f64::NAN),
                    );
                }
                None => out.push_str(" |"),
            }
        }
        out.push('\n');
    }
    if let Some(events) = e2e.get("lb_events").and_then(Value::as_object) {
        for (size, counters) in events {
            let nonzero = counters
                .as_object()
                .map(|counters| {
                    counters
                        .iter()
                        .filter(|(_, count)| count.as_u64().unwrap_or(0) > 0)
                        .map(|(label, count)| format!("{label} {count}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "\nlb's drop and reject counters after every round at {size} services: {}.",
                if nonzero.is_empty() {
                    "all zero".to_owned()
                } else {
                    nonzero
                }
            );
        }
    }
}

fn rule_load_table(out: &mut String, e2e: &Value, control: Option<&Value>) {
    out.push_str(
        "\n## Programming the services from nothing\n\n| what | services x endpoints | time |\n|---|---|---:|\n",
    );
    for load in list(e2e, "rule_loads") {
        let time = match f(load, "load_ms") {
            Some(ms) => format!("{ms:.0} ms"),
            None => "killed after the time limit".to_owned(),
        };
        let command = if s(load, "system") == "iptables" {
            "iptables-restore"
        } else {
            "nft -f"
        };
        let _ = writeln!(
            out,
            "| {command} | {} x {} (+1) | {time} |",
            short_count(f(load, "services").unwrap_or(0.0)),
            f(load, "endpoints_per_service").unwrap_or(0.0)
        );
    }
    if let Some(control) = control {
        let _ = writeln!(
            out,
            "| lb, in-process compile + reconcile | {} x {} | {:.0} ms |",
            short_count(f(control, "services").unwrap_or(0.0)),
            f(control, "endpoints_per_service").unwrap_or(0.0),
            f(control, "from_nothing_ms").unwrap_or(f64::NAN)
        );
    }
    for sync in list(e2e, "lb_syncs") {
        let _ = writeln!(
            out,
            "| lb run, file source, until synced | {} x {} (+1) | {:.0} ms |",
            short_count(f(sync, "services").unwrap_or(0.0)),
            f(sync, "endpoints_per_service").unwrap_or(0.0),
            f(sync, "sync_ms").unwrap_or(f64::NAN)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Plots, drawn with plotters: a line chart and a horizontal bar chart.

/// Colours that stay apart for the eye, also in grey.
const PALETTE: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0x17, 0xbe, 0xcf),
    RGBColor(0xbc, 0xbd, 0x22),
];
const GRID: RGBColor = RGBColor(0xe0, 0xe0, 0xe0);
const INK: RGBColor = RGBColor(0x33, 0x33, 0x33);

fn system_colour(system: &str) -> RGBColor {
    match system {
        "baseline" => RGBColor(0x7f, 0x7f, 0x7f),
        "iptables" => PALETTE[1],
        "nftables" => PALETTE[3],
        _ => PALETTE[0],
    }
}

/// Text of `px` pixels: plotters' SVG backend writes a font of size n as font-size n / 1.24.
fn font(px: f64, colour: RGBColor) -> TextStyle<'static> {
    ("sans-serif", px * 1.24).into_font().color(&colour)
}

fn count_label(value: f64) -> String {
    match value {
        v if v >= 1e6 => format!("{}M", v / 1e6),
        v if v >= 1e3 => format!("{}k", v / 1e3),
        v => format!("{v}"),
    }
}

/// Per-packet cost (median net of the floor) against the number of services, one line per path,
/// log x axis, with per-packet limits as dashed lines.
fn datapath_plot(datapath: &Value) -> anyhow::Result<String> {
    let sizes = list(datapath, "sizes");
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for size in sizes {
        let services = f(size, "services").unwrap_or(1.0).max(1.0);
        for path in list(size, "paths") {
            let name = s(path, "path").to_owned();
            let value = f(path, "net_median_ns").unwrap_or(0.0);
            match series.iter_mut().find(|(known, _)| *known == name) {
                Some((_, points)) => points.push((services, value)),
                None => series.push((name, vec![(services, value)])),
            }
        }
    }
    let limits = [
        (45.0, "established target 45 ns"),
        (300.0, "new-flow target 300 ns"),
    ];
    let values = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|point| point.1));
    let max_value = values.clone().fold(300.0, f64::max) * 1.05;
    // Paths that cost less than the floor program come out slightly negative.
    let min_value = values.fold(0.0, f64::min) - max_value * 0.02;
    // Whole decades, so that the axis ends on a labelled tick.
    let max_services = 10f64.powf(
        sizes
            .iter()
            .filter_map(|size| f(size, "services"))
            .fold(10.0, f64::max)
            .log10()
            .ceil(),
    );

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (880, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(
            "Per-packet cost against the number of services",
            font(16.0, BLACK),
        )?;
        root.draw_text(
            "BPF_PROG_TEST_RUN, repeat=1, median ns net of an XDP_PASS floor measured in the same run",
            &font(11.0, INK).pos(Pos::new(HPos::Center, VPos::Top)),
            (440, 0),
        )?;
        // plotters keeps a chart's legend inside its plotting area, where it would hide lines:
        // the legend gets its own area on the right.
        let (plot, legend) = root.margin(30, 10, 10, 10).split_horizontally(600);
        let mut chart = ChartBuilder::on(&plot)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d((1.0..max_services).log_scale(), min_value..max_value)?;
        chart
            .configure_mesh()
            .bold_line_style(GRID)
            .light_line_style(TRANSPARENT)
            .axis_style(INK)
            .label_style(font(11.0, INK))
            .axis_desc_style(font(12.0, INK))
            .x_desc("services (frontends), log scale")
            .y_desc("ns / packet")
            .x_label_formatter(&|services| count_label(*services))
            .y_label_formatter(&|ns| format!("{ns:.0}"))
            .draw()?;
        let grey = RGBColor(0x55, 0x55, 0x55);
        for (limit, label) in limits {
            let ends = [(1.0, limit), (max_services, limit)];
            chart.draw_series(DashedLineSeries::new(ends, 6, 4, grey.into()))?;
            let anchor = font(10.0, grey).pos(Pos::new(HPos::Right, VPos::Bottom));
            chart.draw_series([Text::new(label, ends[1], anchor)])?;
        }
        for (index, (name, points)) in series.iter().enumerate() {
            // An IPv6 path is dashed, in the colour of its IPv4 twin.
            let twin = ipv4_twin(name)
                .and_then(|twin| series.iter().position(|(other, _)| *other == twin));
            let colour = PALETTE[twin.unwrap_or(index) % PALETTE.len()];
            let line = colour.filled().stroke_width(2);
            let y = 10 + 22 * index as i32;
            if twin.is_some() {
                chart.draw_series(DashedLineSeries::new(points.iter().copied(), 6, 4, line))?;
                for (from, to) in [(10, 18), (24, 34)] {
                    legend.draw(&PathElement::new(
                        [(from, y), (to, y)],
                        line.stroke_width(3),
                    ))?;
                }
            } else {
                chart.draw_series(LineSeries::new(points.iter().copied(), line).point_size(4))?;
                legend.draw(&PathElement::new([(10, y), (34, y)], line.stroke_width(3)))?;
            }
            let anchor = font(12.0, BLACK).pos(Pos::new(HPos::Left, VPos::Center));
            legend.draw_text(path_label(name), &anchor, (40, y))?;
        }
        root.present()?;
    }
    Ok(svg)
}

/// The IPv4 path an IPv6 path of lb-bench is the twin of (`xdp6_established`: `xdp_established`).
fn ipv4_twin(key: &str) -> Option<String> {
    if key == "xdp6_neighbour_solicitation" {
        return Some("xdp_non_ip".to_owned());
    }
    let (prefix, rest) = key.split_once("6_")?;
    matches!(prefix, "xdp" | "tc").then(|| format!("{prefix}_{rest}"))
}

/// lb-bench's words for its path keys.
fn path_label(key: &str) -> &str {
    match key {
        "xdp_new_flow" => "XDP new flow, one frontend",
        "xdp_new_flow_spread" => "XDP new flow, all frontends",
        "xdp_established" => "XDP established",
        "xdp_established_many" => "XDP established, 16,384 flows in turn",
        "xdp_syn_retransmit" => "XDP retransmitted SYN (its key held)",
        "xdp_established_udp" => "XDP established, UDP (one tail call)",
        "xdp_new_flow_udp" => "XDP new flow, UDP (a socket lookup first)",
        "xdp_miss" => "XDP miss, a SYN (no such service)",
        "xdp_miss_established" => "XDP miss, an ACK (no such service)",
        "xdp_non_ip" => "XDP non-IP (ARP)",
        "tc_reply" => "tc reply (reverse NAT)",
        "tc_reply_many" => "tc reply, 16,384 flows in turn",
        "tc_other" => "tc, not a reply (host traffic)",
        "xdp6_new_flow" => "IPv6: XDP new flow, one frontend",
        "xdp6_new_flow_spread" => "IPv6: XDP new flow, all frontends",
        "xdp6_established" => "IPv6: XDP established",
        "xdp6_established_many" => "IPv6: XDP established, 16,384 flows in turn",
        "xdp6_syn_retransmit" => "IPv6: XDP retransmitted SYN",
        "xdp6_established_udp" => "IPv6: XDP established, UDP",
        "xdp6_new_flow_udp" => "IPv6: XDP new flow, UDP",
        "xdp6_miss" => "IPv6: XDP miss, a SYN",
        "xdp6_miss_established" => "IPv6: XDP miss, an ACK",
        "xdp6_neighbour_solicitation" => "IPv6: XDP neighbour solicitation",
        "tc6_reply" => "IPv6: tc reply (reverse NAT)",
        "tc6_reply_many" => "IPv6: tc reply, 16,384 flows in turn",
        "tc6_other" => "IPv6: tc, not a reply",
        other => other,
    }
}

/// One bar chart row: a label, bars drawn from the axis start (later ones on top), an optional
/// whisker and a note after the bars.
struct Row {
    label: String,
    colour: RGBColor,
    /// (value, opacity)
    bars: Vec<(f64, f64)>,
    whisker: Option<(f64, f64)>,
    note: String,
}

struct Panel {
    title: String,
    rows: Vec<Row>,
}

struct Axis<X> {
    /// `min..max`, or `(min..max).log_scale()`.
    range: X,
    label: String,
    /// Vertical marks: (value, label, dashed, where the label goes from the mark).
    marks: Vec<(f64, &'static str, bool, HPos)>,
}

/// One panel per mode, one row per configuration; row `index` of `rows` is centred at
/// y = rows - 1 - index, so the first is at the top.
fn bar_chart<X>(title: &str, panels: &[Panel], axis: &Axis<X>) -> anyhow::Result<String>
where
    X: AsRangedCoord<Value = f64> + Clone,
    X::CoordDescType: ValueFormatter<f64>,
{
    let (row_height, labels_width) = (17, 290);
    let heights: Vec<u32> = panels
        .iter()
        .map(|panel| panel.rows.len() as u32 * row_height + 80)
        .collect();
    let mut svg = String::new();
    {
        let size = (980, 40 + heights.iter().sum::<u32>());
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, font(16.0, BLACK))?;
        let breaks = heights.iter().scan(0, |top, height| {
            *top += height;
            Some(*top)
        });
        let areas = root.split_by_breakpoints([0; 0], breaks.collect::<Vec<_>>());
        for (panel, area) in panels.iter().zip(&areas) {
            let rows = panel.rows.len();
            // Over the bars, left-aligned: a centred caption would run into the marks' labels.
            area.draw_text(&panel.title, &font(14.0, BLACK), (5 + labels_width, 5))?;
            let mut chart = ChartBuilder::on(area)
                .margin(5)
                .margin_top(30)
                // Room for each row's note after the bars.
                .margin_right(190)
                .x_label_area_size(40)
                .y_label_area_size(labels_width as u32)
                .build_cartesian_2d(axis.range.clone(), -0.5..rows as f64 - 0.5)?;
            let x_range = chart.x_range();
            let (x_min, x_max) = (x_range.start, x_range.end);
            // Asked for one label per row, plotters puts them on the whole numbers.
            let label = |y: &f64| {
                let index = rows.checked_sub(1 + y.round().max(0.0) as usize);
                index.map_or_else(String::new, |index| panel.rows[index].label.clone())
            };
            chart
                .configure_mesh()
                .disable_y_mesh()
                .bold_line_style(GRID)
                .light_line_style(TRANSPARENT)
                .axis_style(INK)
                .set_all_tick_mark_size(5)
                .y_labels(rows)
                .y_label_style(font(11.0, BLACK))
                .x_label_style(font(10.0, INK))
                .axis_desc_style(font(11.0, INK))
                .x_desc(&axis.label)
                .x_label_formatter(&|value| count_label(*value))
                .y_label_formatter(&label)
                .draw()?;
            let shading = RGBColor(0xf4, 0xf4, 0xf4).filled();
            chart.draw_series((1..rows).step_by(2).map(|index| {
                let y = (rows - 1 - index) as f64;
                Rectangle::new([(x_min, y + 0.5), (x_max, y - 0.5)], shading)
            }))?;
            for (index, row) in panel.rows.iter().enumerate() {
                let y = (rows - 1 - index) as f64;
                chart.draw_series(row.bars.iter().map(|&(value, opacity)| {
                    let style = row.colour.mix(opacity).filled();
                    Rectangle::new([(x_min, y + 0.33), (value, y - 0.33)], style)
                }))?;
                if let Some((low, high)) = row.whisker {
                    let (top, bottom) = (y + 0.25, y - 0.25);
                    let whisker = [(low, top), (low, bottom), (low, y), (high, y)];
                    let whisker = whisker.into_iter().chain([(high, top), (high, bottom)]);
                    chart.draw_series([PathElement::new(whisker.collect::<Vec<_>>(), BLACK)])?;
                }
                let note = Text::new(row.note.clone(), (8, -6), font(10.0, INK));
                chart.draw_series([EmptyElement::at((x_max, y)) + note])?;
            }
            for &(value, label, dashed, side) in &axis.marks {
                let ends = [(value, -0.5), (value, rows as f64 - 0.2)];
                let style = INK.stroke_width(1);
                if dashed {
                    chart.draw_series(DashedLineSeries::new(ends, 4, 3, style))?;
                } else {
                    chart.draw_series(LineSeries::new(ends, style))?;
                }
                let anchor = font(9.0, INK).pos(Pos::new(side, VPos::Bottom));
                chart.draw_series([Text::new(label, ends[1], anchor)])?;
            }
        }
        root.present()?;
    }
    Ok(svg)
}

fn cell_label(cell: &Value) -> String {
    let services = f(cell, "services").unwrap_or(0.0);
    let size = if services > 0.0 {
        format!(" {}", short_count(services))
    } else {
        String::new()
    };
    format!(
        "{}{size}, {}, {} client{}",
        s(cell, "system"),
        s(cell, "path"),
        f(cell, "clients").unwrap_or(0.0),
        if f(cell, "clients") == Some(1.0) {
            ""
        } else {
            "s"
        }
    )
}

fn modes(cells: &[Value]) -> Vec<String> {
    let mut modes: Vec<String> = Vec::new();
    for cell in cells {
        let mode = s(cell, "mode").to_owned();
        if !modes.contains(&mode) {
            modes.push(mode);
        }
    }
    modes
}

/// Median rate of every configuration as a ratio to straight to a pod, with the lowest and highest
/// round-by-round ratio as a whisker.
fn e2e_ratio_plot(e2e: &Value) -> anyhow::Result<String> {
    let cells = list(e2e, "cells");
    let mut highest: f64 = 1.2;
    let panels: Vec<Panel> = modes(cells)
        .into_iter()
        .map(|mode| {
            let rows = cells
                .iter()
                .filter(|cell| s(cell, "mode") == mode && s(cell, "system") != "baseline")
                .filter_map(|cell| {
                    let ratio = f(cell, "ratio_to_baseline")?;
                    let whisker = f(cell, "round_ratio_min").zip(f(cell, "round_ratio_max"));
                    highest = highest.max(ratio).max(whisker.map_or(0.0, |w| w.1));
                    Some(Row {
                        label: cell_label(cell),
                        colour: system_colour(s(cell, "system")),
                        bars: vec![(ratio, 0.85)],
                        whisker,
                        note: format!(
                            "{ratio:.2}x, {:.0}/s",
                            f(cell, "rate_median_per_s").unwrap_or(0.0)
                        ),
                    })
                })
                .collect();
            Panel { title: mode, rows }
        })
        .collect();
    let axis = Axis {
        range: 0.0..(highest * 10.0).ceil() / 10.0,
        label: "median rate / median rate straight to a pod (bar); lowest-highest round (whisker)"
            .to_owned(),
        marks: vec![
            (0.9, "0.9 ", true, HPos::Right),
            (1.0, " 1.0", false, HPos::Left),
        ],
    };
    let title = format!(
        "End to end: rate relative to straight to a pod ({} interleaved rounds of {} ms)",
        e2e.get("rounds").map(Value::to_string).unwrap_or_default(),
        e2e.get("duration_ms")
            .map(Value::to_string)
            .unwrap_or_default()
    );
    bar_chart(&title, &panels, &axis)
}

/// p50 (dark) and p99 (light) latency of every configuration, per mode, on a log axis.
fn e2e_latency_plot(e2e: &Value) -> anyhow::Result<String> {
    let cells = list(e2e, "cells");
    let mut highest: f64 = 100.0;
    let mut lowest: f64 = 1e9;
    let panels: Vec<Panel> = modes(cells)
        .into_iter()
        .map(|mode| {
            let rows = cells
                .iter()
                .filter(|cell| s(cell, "mode") == mode)
                .map(|cell| {
                    let p50 = f(cell, "p50_us").unwrap_or(0.0);
                    let p99 = f(cell, "p99_us").unwrap_or(0.0);
                    highest = highest.max(p99);
                    if p50 > 0.0 {
                        lowest = lowest.min(p50);
                    }
                    Row {
                        label: cell_label(cell),
                        colour: system_colour(s(cell, "system")),
                        bars: vec![(p99, 0.3), (p50, 0.9)],
                        whisker: None,
                        note: format!("p50 {p50:.0} / p99 {p99:.0} µs"),
                    }
                })
                .collect();
            Panel { title: mode, rows }
        })
        .collect();
    let min = 10f64.powf(lowest.min(highest).log10().floor()).min(10.0);
    let axis = Axis {
        range: (min..10f64.powf(highest.log10().ceil())).log_scale(),
        label:
            "latency per request, µs, log scale: p50 (dark), p99 (light); medians over the rounds"
                .to_owned(),
        marks: Vec::new(),
    };
    bar_chart(
        "End to end: latency percentiles per request",
        &panels,
        &axis,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Maglev rows judge N = 2, 10, 100, 1000 only, on the mean removal over its ideal.
    #[test]
    fn maglev_table_rows() {
        let row = |backends: u32, busiest: f64, moved: f64, ideal: f64| {
            serde_json::json!({
                "backends": backends,
                "busiest_over_mean": busiest,
                "remove_one": {"flows_moved_pct": moved, "ideal_flows_moved_pct": ideal},
            })
        };
        let maglev = serde_json::json!({"rows": [
            row(2, 1.004, 50.0, 50.0),
            row(10, 1.048, 10.5, 10.0),
            row(100, 1.05, 1.13, 1.0),
            row(300, 1.2, 0.9, 0.333),
            row(1000, 1.045, 0.16, 0.1),
            serde_json::json!({"band_edge": true, "backends": 100, "busiest_over_mean": 1.2}),
        ]});
        let mut out = String::new();
        maglev_table_targets(&mut out, &maglev);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            [
                "| Maglev: busiest backend within 5% of the mean (N = 2, 10, 100, 1000) | met | N=2 +0.40%, N=10 +4.80%, N=100 +5.00%, N=1000 +4.50% |",
                "| Maglev: removing one of N backends moves <= 1.5/N of the flows (multiples of 1/N, mean of the removals) | **partly met** (3 of 4) | N=2 1.00x, N=10 1.05x, N=100 1.13x, N=1000 1.60x |",
            ]
        );
    }

    /// The DSR mark's figures get a row of their own, with no target to judge.
    #[test]
    fn a_dsr_mark_flip_is_reported_without_a_target() {
        let control = serde_json::json!({
            "services": 10000, "endpoints_per_service": 10,
            "dsr_nodes": 100, "dsr_mark_flip_median_ms": 45.25,
            "dsr_mark_flip_p90_ms": 46.88, "dsr_mark_flip_services_median": 1000,
        });
        let mut out = String::new();
        control_targets(&mut out, &control);
        assert_eq!(
            out.lines().collect::<Vec<_>>(),
            [
                "| with DSR, one Node's mark removed or written (endpoints over 100 Nodes) | measured, no target | median 45.2 ms, p90 46.9 ms; 1000 Services recompiled each |"
            ]
        );
    }

    #[test]
    fn standing_words() {
        assert_eq!(standing(&[]), "not measured");
        assert_eq!(standing(&[true, true]), "met");
        assert_eq!(standing(&[false]), "**NOT met**");
        assert_eq!(standing(&[true, false, false]), "**partly met** (1 of 3)");
    }

    #[test]
    fn every_end_to_end_target_of_the_bench_gets_its_row_with_the_bench_s_limit() {
        // The target strings lb-bench-e2e writes (see its `targets`).
        let target = |text: &str, value: f64, limit: f64| {
            serde_json::json!({
                "target": text, "value": value, "limit": limit, "met": value >= limit,
            })
        };
        let e2e = serde_json::json!({"targets": [
            target("lb ClusterIP connect/request/close / straight to pod [10000 services, 1 clients]", 1.02, 0.99),
            target("lb ClusterIP connect/request/close / straight to pod [10000 services, 4 clients]", 0.88, 0.99),
            target("lb NodePort connect/request/close / straight to pod [10000 services, 1 clients]", 0.96, 0.95),
            target("lb NodePort connect/request/close / straight to pod [10000 services, 4 clients]", 0.97, 0.95),
            target("lb ClusterIP connect/request/close, IPv6 / IPv4 rate [10000 services, 1 clients]", 0.99, 1.0 / 1.15),
            target("lb NodePort connect/request/close, IPv6 / IPv4 rate [10000 services, 1 clients]", 0.80, 1.0 / 1.15),
            target("lb / iptables connect/request/close, pod -> ClusterIP [10000 services, 1 clients]", 1.6, 1.5),
        ]});
        let mut out = String::new();
        e2e_targets(&mut out, &e2e);
        let rows: Vec<&str> = out.lines().collect();
        assert_eq!(
            rows,
            [
                "| ClusterIP connect/request/close at the largest size >= 0.99x straight to pod | **partly met** (1 of 2) | [10000 services, 1 clients] 1.02x; [10000 services, 4 clients] 0.88x |",
                "| NodePort connect/request/close at the largest size >= 0.95x straight to pod | met | [10000 services, 1 clients] 0.96x; [10000 services, 4 clients] 0.97x |",
                "| IPv6 connect/request/close rate at the largest size >= 0.87x IPv4's | **partly met** (1 of 2) | ClusterIP [10000 services, 1 clients] 0.99x; NodePort [10000 services, 1 clients] 0.80x |",
                "| connect/request/close at the largest size >= 1.50x iptables | met | connect/request/close, pod -> ClusterIP [10000 services, 1 clients] 1.60x |",
            ],
            "{out}"
        );
    }

    #[test]
    fn ipv6_paths_against_their_ipv4_twins() {
        let datapath = serde_json::json!({
            "sizes": [{
                "services": 1,
                "floor": {"median_ns": 60, "p90_ns": 70},
                "paths": [
                    {"path": "xdp_established", "net_median_ns": 70, "net_p90_ns": 80},
                    {"path": "xdp6_established", "net_median_ns": 90, "net_p90_ns": 100},
                ],
                "family_ratios": [{
                    "path": "xdp6_established", "ipv4_path": "xdp_established",
                    "ipv6_net_median_ns": 90, "ipv4_net_median_ns": 70,
                    "ratio_median": 1.2857, "ratio_iqm": 1.25,
                }],
            }],
            "targets": [{
                "target": "xdp6_established <= 1.15x xdp_established net of the floor",
                "path": "xdp6_established", "services": 1, "value": 1.2857, "limit": 1.15,
                "met": false,
            }],
        });
        let mut out = String::new();
        datapath_targets(&mut out, &datapath);
        assert!(
            out.contains(
                "| IPv6 per packet <= 1.15x its IPv4 twin | **NOT met** | xdp6_established 1: 1.29x"
            ),
            "{out}"
        );
        let mut out = String::new();
        family_ratio_table(&mut out, &datapath);
        assert!(
            out.contains("| xdp6_established | xdp_established | 1.29x [1.25x], 90 / 70 |"),
            "{out}"
        );
        assert_eq!(ipv4_twin("tc6_reply").as_deref(), Some("tc_reply"));
        assert_eq!(
            ipv4_twin("xdp6_new_flow_spread").as_deref(),
            Some("xdp_new_flow_spread")
        );
        assert_eq!(
            ipv4_twin("xdp6_neighbour_solicitation").as_deref(),
            Some("xdp_non_ip")
        );
        assert_eq!(ipv4_twin("xdp_established"), None);
    }

    /// Panics unless `svg` is one <svg> element whose tags nest and whose text has no bare `<` or
    /// `&`: what a browser needs to show the file rather than an XML error.
    fn assert_well_formed(svg: &str) {
        assert!(svg.trim_start().starts_with("<svg"), "{svg}");
        let mut open: Vec<&str> = Vec::new();
        let mut rest = svg;
        while let Some(start) = rest.find('<') {
            let text = &rest[..start];
            for (at, _) in text.match_indices('&') {
                let entity = &text[at..text[at..].find(';').map_or(at, |end| at + end + 1)];
                assert!(
                    ["&lt;", "&gt;", "&amp;", "&quot;", "&apos;"].contains(&entity),
                    "bare & in {text:?}"
                );
            }
            let end = start + rest[start..].find('>').expect("unclosed tag");
            let tag = &rest[start + 1..end];
            let name = tag.split_whitespace().next().unwrap_or_default();
            if let Some(name) = name.strip_prefix('/') {
                assert_eq!(open.pop(), Some(name), "tags out of order");
            } else if !tag.ends_with('/') && !tag.starts_with(['?', '!']) {
                open.push(name);
            }
            rest = &rest[end + 1..];
            if open.is_empty() {
                break;
            }
        }
        assert!(
            open.is_empty() && rest.trim().is_empty(),
            "unclosed {open:?}"
        );
    }

    fn e2e_cell(system: &str, services: u64, mode: &str, clients: u64, p50: f64) -> Value {
        let baseline = system == "baseline";
        serde_json::json!({
            "system": system, "services": services, "mode": mode, "clients": clients,
            "path": if baseline { "pod -> pod" } else { "pod -> ClusterIP" },
            "rate_median_per_s": 31948.0, "p50_us": p50, "p99_us": 66.0,
            "ratio_to_baseline": if baseline { 1.0 } else { 1.07 },
            "round_ratio_min": if baseline { Value::Null } else { 0.97.into() },
            "round_ratio_max": if baseline { Value::Null } else { 2.7.into() },
        })
    }

    #[test]
    fn an_end_to_end_cell_shows_its_round_by_round_median_where_recorded() {
        let mut paired = e2e_cell("lb", 10_000, "connect/request/close", 1, 70.0);
        paired["round_ratio_median"] = 1.02.into();
        let e2e = serde_json::json!({
            "clients": [1],
            "cells": [
                e2e_cell("baseline", 0, "connect/request/close", 1, 65.0),
                paired,
                e2e_cell("lb", 1_000, "connect/request/close", 1, 70.0),
            ],
        });
        let mut out = String::new();
        e2e_table(&mut out, &e2e);
        let row = |services: &str| {
            out.lines()
                .find(|line| line.starts_with(&format!("| lb | {services} |")))
                .unwrap()
                .to_owned()
        };
        assert!(
            row("10000").contains(" 1.07x [0.97-2.70; 1.02x], "),
            "{out}"
        );
        assert!(row("1000").contains(" 1.07x [0.97-2.70], "), "{out}");
        assert!(
            out.contains(
                "| baseline | 0 | pod -> pod | connect/request/close | 31948 1.00x, 65 / 66 |"
            ),
            "{out}"
        );
    }

    #[test]
    fn plots_show_every_series() {
        let sizes = [1, 1000, 100_000].map(|services| {
            serde_json::json!({
                "services": services,
                "paths": [
                    {"path": "xdp_established", "net_median_ns": 101},
                    {"path": "xdp_non_ip", "net_median_ns": -10},
                    {"path": "tc_reply", "net_median_ns": 281},
                    {"path": "xdp6_established", "net_median_ns": 111},
                ],
            })
        });
        let datapath = serde_json::json!({ "sizes": sizes });
        let svg = datapath_plot(&datapath).unwrap();
        assert_well_formed(&svg);
        for text in [
            "Per-packet cost against the number of services",
            "XDP established",
            "XDP non-IP (ARP)",
            "tc reply (reverse NAT)",
            "IPv6: XDP established",
            "established target 45 ns",
            "new-flow target 300 ns",
            "services (frontends), log scale",
            "ns / packet",
            ">\n100k\n<",
        ] {
            assert!(svg.contains(text), "no {text:?} in the datapath plot");
        }
        // One line of the series' own colour for each path.
        for colour in ["#1F77B4", "#D62728", "#2CA02C"] {
            assert!(svg.contains(&format!(
                r#"polyline fill="none" opacity="1" stroke="{colour}""#
            )));
        }

        let e2e = serde_json::json!({
            "rounds": 3,
            "duration_ms": 1000,
            "cells": [
                e2e_cell("baseline", 0, "request/response", 1, 30.0),
                e2e_cell("lb", 10_000, "request/response", 1, 27.0),
                e2e_cell("iptables", 1000, "request/response", 4, 0.0),
                // A mode with nothing but the baseline leaves the ratio plot an empty panel.
                e2e_cell("baseline", 0, "connect/request/close", 1, 58.0),
            ],
        });
        let svg = e2e_ratio_plot(&e2e).unwrap();
        assert_well_formed(&svg);
        for text in [
            "End to end: rate relative to straight to a pod (3 interleaved rounds of 1000 ms)",
            "request/response",
            "connect/request/close",
            "lb 10k, pod -&gt; ClusterIP, 1 client",
            "iptables 1k, pod -&gt; ClusterIP, 4 clients",
            "1.07x, 31948/s",
            "0.9",
            "lowest-highest round (whisker)",
        ] {
            assert!(svg.contains(text), "no {text:?} in the ratio plot");
        }
        assert!(
            !svg.contains("baseline, pod"),
            "the baseline is the 1.0 itself"
        );

        let svg = e2e_latency_plot(&e2e).unwrap();
        assert_well_formed(&svg);
        for text in [
            "End to end: latency percentiles per request",
            "baseline, pod -&gt; pod, 1 client",
            "lb 10k, pod -&gt; ClusterIP, 1 client",
            "p50 27 / p99 66 µs",
            "p50 0 / p99 66 µs",
            "log scale: p50 (dark), p99 (light)",
        ] {
            assert!(svg.contains(text), "no {text:?} in the latency plot");
        }
    }
}
