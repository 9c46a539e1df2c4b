//! What `cargo xtask bench` makes of the benches' JSON once they have run: SVG plots where a curve
//! says more than a table, and a summary (target/bench/summary.md) of where each of the targets
//! in docs/benchmarks.md stands. Reads the JSON loosely (serde_json::Value), so a bench that was
//! skipped or an older file only leaves a gap in the summary.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::Context as _;
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
    let control = read_json(&dir.join("control.json"));
    let e2e = read_json(&dir.join("e2e.json"));
    let live = read_json(&dir.join("live.json"));
    let forward = read_json(&dir.join("forward.json"));
    let mut plots = Vec::new();
    if let Some(datapath) = &datapath {
        let svg = datapath_plot(datapath);
        std::fs::write(dir.join("datapath.svg"), svg).context("writing datapath.svg")?;
        plots.push((
            "datapath.svg",
            "per-packet cost against the number of services",
        ));
    }
    if let Some(e2e) = &e2e {
        std::fs::write(dir.join("e2e-ratios.svg"), e2e_ratio_plot(e2e))
            .context("writing e2e-ratios.svg")?;
        std::fs::write(dir.join("e2e-latency.svg"), e2e_latency_plot(e2e))
            .context("writing e2e-latency.svg")?;
        plots.push((
            "e2e-ratios.svg",
            "end-to-end rates as a ratio to straight to a pod",
        ));
        plots.push(("e2e-latency.svg", "end-to-end p50 / p99 latency"));
    }
    let results = Results {
        datapath: datapath.as_ref(),
        live: live.as_ref(),
        forward: forward.as_ref(),
        control: control.as_ref(),
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
    live: Option<&'a Value>,
    forward: Option<&'a Value>,
    control: Option<&'a Value>,
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
        live,
        forward,
        control,
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
             ratio to straight to a pod [lowest-highest round by round], median p50 / p99 latency \
             in µs:\n\n",
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
}

fn e2e_targets(out: &mut String, e2e: &Value) {
    let targets = list(e2e, "targets");
    for (label, prefix) in [
        (
            "ClusterIP request/response >= 0.97x straight to pod",
            "lb ClusterIP request/response",
        ),
        (
            "NodePort connect/request/close >= 0.9x straight to pod",
            "lb NodePort connect/request/close",
        ),
        (
            "connect/request/close at the largest size >= 1.5x iptables",
            "lb / iptables",
        ),
    ] {
        let chosen: Vec<&Value> = targets
            .iter()
            .filter(|target| s(target, "target").starts_with(prefix))
            .collect();
        let met: Vec<bool> = chosen
            .iter()
            .map(|target| target["met"].as_bool().unwrap_or(false))
            .collect();
        let figures = chosen
            .iter()
            .map(|target| {
                let text = s(target, "target");
                let detail = text
                    .strip_prefix(prefix)
                    .unwrap_or(text)
                    .trim_start_matches([',', ' '])
                    .replace("/ straight to pod ", "");
                format!("{detail} {:.2}x", f(target, "value").unwrap_or(f64::NAN))
            })
            .collect::<Vec<_>>()
            .join("; ");
        let _ = writeln!(out, "| {label} | {} | {figures} |", standing(&met));
    }
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
                    let ratio = match (
                        f(other, "ratio_to_baseline"),
                        f(other, "round_ratio_min"),
                        f(other, "round_ratio_max"),
                    ) {
                        (Some(ratio), Some(low), Some(high)) if key.0 != "baseline" => {
                            format!(" {ratio:.2}x [{low:.2}-{high:.2}]")
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
// Plots: a few SVG primitives, a line chart and a horizontal bar chart.

/// Colours that stay apart for the eye, also in grey.
const PALETTE: [&str; 7] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf",
];

fn system_colour(system: &str) -> &'static str {
    match system {
        "baseline" => "#7f7f7f",
        "iptables" => "#d62728",
        "nftables" => "#ff7f0e",
        _ => "#1f77b4",
    }
}

struct Svg {
    body: String,
    width: f64,
    height: f64,
}

impl Svg {
    fn new(width: f64, height: f64) -> Self {
        Self {
            body: String::new(),
            width,
            height,
        }
    }

    fn line(&mut self, from: (f64, f64), to: (f64, f64), stroke: &str, width: f64, dash: &str) {
        let dash = if dash.is_empty() {
            String::new()
        } else {
            format!(r#" stroke-dasharray="{dash}""#)
        };
        let _ = writeln!(
            self.body,
            r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{stroke}" stroke-width="{width}"{dash}/>"#,
            from.0, from.1, to.0, to.1
        );
    }

    fn rect(&mut self, x: f64, y: f64, width: f64, height: f64, fill: &str, opacity: f64) {
        let _ = writeln!(
            self.body,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{height:.1}" fill="{fill}" fill-opacity="{opacity}"/>"#,
            width.max(0.0)
        );
    }

    fn circle(&mut self, centre: (f64, f64), radius: f64, fill: &str) {
        let _ = writeln!(
            self.body,
            r#"<circle cx="{:.1}" cy="{:.1}" r="{radius}" fill="{fill}"/>"#,
            centre.0, centre.1
        );
    }

    fn polyline(&mut self, points: &[(f64, f64)], stroke: &str) {
        let points = points
            .iter()
            .map(|(x, y)| format!("{x:.1},{y:.1}"))
            .collect::<Vec<_>>()
            .join(" ");
        let _ = writeln!(
            self.body,
            r#"<polyline points="{points}" fill="none" stroke="{stroke}" stroke-width="2"/>"#
        );
    }

    /// `anchor`: start, middle or end.
    fn text(&mut self, at: (f64, f64), size: f64, anchor: &str, fill: &str, text: &str) {
        let text = text
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        let _ = writeln!(
            self.body,
            r#"<text x="{:.1}" y="{:.1}" font-size="{size}" text-anchor="{anchor}" fill="{fill}">{text}</text>"#,
            at.0, at.1
        );
    }

    fn finish(self) -> String {
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
             font-family=\"sans-serif\">\n<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n{}</svg>\n",
            self.body,
            w = self.width,
            h = self.height
        )
    }
}

/// A "nice" step (1, 2 or 5 times a power of ten) for about `ticks` intervals over `span`.
fn nice_step(span: f64, ticks: f64) -> f64 {
    let raw = (span / ticks).max(f64::MIN_POSITIVE);
    let power = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|factor| factor * power)
        .find(|step| *step >= raw)
        .unwrap_or(10.0 * power)
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
fn datapath_plot(datapath: &Value) -> String {
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
    let max_value = values.clone().fold(300.0, f64::max);
    let min_value = values.fold(0.0, f64::min);
    let step = nice_step(max_value - min_value, 8.0);
    // Paths that cost less than the floor program come out slightly negative.
    let y_min = (min_value / (step / 4.0)).floor() * (step / 4.0);
    let y_max = (max_value * 1.05 / step).ceil() * step;
    let max_services = sizes
        .iter()
        .filter_map(|size| f(size, "services"))
        .fold(10.0, f64::max);
    let decades = max_services.log10().ceil().max(1.0);

    let (width, height) = (880.0, 480.0);
    let (left, right, top, bottom) = (70.0, 590.0, 70.0, 420.0);
    let x = |services: f64| left + services.max(1.0).log10() / decades * (right - left);
    let y = |ns: f64| bottom - (ns - y_min) / (y_max - y_min) * (bottom - top);
    let mut svg = Svg::new(width, height);
    svg.text(
        (width / 2.0, 22.0),
        16.0,
        "middle",
        "black",
        "Per-packet cost against the number of services",
    );
    svg.text(
        (width / 2.0, 40.0),
        11.0,
        "middle",
        "#333",
        "BPF_PROG_TEST_RUN, repeat=1, median ns net of an XDP_PASS floor measured in the same run",
    );
    let mut tick = (y_min / step).ceil() * step;
    while tick <= y_max + step / 2.0 {
        svg.line((left, y(tick)), (right, y(tick)), "#e0e0e0", 1.0, "");
        svg.text(
            (left - 8.0, y(tick) + 4.0),
            11.0,
            "end",
            "#333",
            // + 0.0 turns -0 into 0.
            &format!("{}", tick + 0.0),
        );
        tick += step;
    }
    for decade in 0..=decades as i32 {
        let services = 10f64.powi(decade);
        svg.line(
            (x(services), top),
            (x(services), bottom),
            "#e0e0e0",
            1.0,
            "",
        );
        svg.text(
            (x(services), bottom + 18.0),
            11.0,
            "middle",
            "#333",
            &count_label(services),
        );
    }
    svg.line((left, bottom), (right, bottom), "#333", 1.0, "");
    svg.line((left, top), (left, bottom), "#333", 1.0, "");
    svg.text(
        ((left + right) / 2.0, bottom + 40.0),
        12.0,
        "middle",
        "#333",
        "services (frontends), log scale",
    );
    svg.text(
        (left - 50.0, top - 10.0),
        12.0,
        "start",
        "#333",
        "ns / packet",
    );
    for (limit, label) in limits {
        svg.line((left, y(limit)), (right, y(limit)), "#555", 1.0, "6 4");
        svg.text((right - 4.0, y(limit) - 4.0), 10.0, "end", "#555", label);
    }
    for (index, (name, points)) in series.iter().enumerate() {
        let colour = PALETTE[index % PALETTE.len()];
        let screen: Vec<(f64, f64)> = points
            .iter()
            .map(|&(services, ns)| (x(services), y(ns)))
            .collect();
        svg.polyline(&screen, colour);
        for &point in &screen {
            svg.circle(point, 3.5, colour);
        }
        let legend_y = top + 10.0 + index as f64 * 22.0;
        svg.line(
            (right + 20.0, legend_y - 4.0),
            (right + 44.0, legend_y - 4.0),
            colour,
            3.0,
            "",
        );
        svg.text(
            (right + 50.0, legend_y),
            12.0,
            "start",
            "#111",
            path_label(name),
        );
    }
    svg.finish()
}

/// lb-bench's words for its path keys.
fn path_label(key: &str) -> &str {
    match key {
        "xdp_new_flow" => "XDP new flow, one frontend",
        "xdp_new_flow_spread" => "XDP new flow, all frontends",
        "xdp_established" => "XDP established",
        "xdp_miss" => "XDP miss, a SYN (no such service)",
        "xdp_miss_established" => "XDP miss, an ACK (no such service)",
        "xdp_non_ip" => "XDP non-IP (ARP)",
        "tc_reply" => "tc reply (reverse NAT)",
        other => other,
    }
}

/// One bar chart row: a label, bars drawn from the axis start (later ones on top), an optional
/// whisker and a note after the bars.
struct Row {
    label: String,
    colour: &'static str,
    /// (value, opacity)
    bars: Vec<(f64, f64)>,
    whisker: Option<(f64, f64)>,
    note: String,
}

struct Panel {
    title: String,
    rows: Vec<Row>,
}

struct Axis {
    log: bool,
    min: f64,
    max: f64,
    label: String,
    /// Vertical marks: (value, label, dash, label anchor: start, middle or end).
    marks: Vec<(f64, String, &'static str, &'static str)>,
}

fn bar_chart(title: &str, panels: &[Panel], axis: &Axis) -> String {
    let row_height = 17.0;
    let (left, right) = (300.0, 780.0);
    let width = 980.0;
    let panel_heights: Vec<f64> = panels
        .iter()
        .map(|panel| panel.rows.len() as f64 * row_height + 70.0)
        .collect();
    let height = 50.0 + panel_heights.iter().sum::<f64>();
    let scale = |value: f64| -> f64 {
        let fraction = if axis.log {
            (value.max(axis.min).log10() - axis.min.log10()) / (axis.max.log10() - axis.min.log10())
        } else {
            (value - axis.min) / (axis.max - axis.min)
        };
        left + fraction.clamp(0.0, 1.0) * (right - left)
    };
    let ticks: Vec<f64> = if axis.log {
        let mut ticks = Vec::new();
        let mut tick = 10f64.powf(axis.min.log10().floor());
        while tick <= axis.max * 1.0001 {
            if tick >= axis.min * 0.9999 {
                ticks.push(tick);
            }
            tick *= 10.0;
        }
        ticks
    } else {
        let step = nice_step(axis.max - axis.min, 6.0);
        let mut ticks = Vec::new();
        let mut tick = (axis.min / step).ceil() * step;
        while tick <= axis.max + step / 1000.0 {
            ticks.push(tick);
            tick += step;
        }
        ticks
    };
    let mut svg = Svg::new(width, height);
    svg.text((width / 2.0, 24.0), 16.0, "middle", "black", title);
    let mut top = 50.0;
    for (panel, panel_height) in panels.iter().zip(&panel_heights) {
        let plot_top = top + 22.0;
        let plot_bottom = plot_top + panel.rows.len() as f64 * row_height;
        svg.text((left, top + 10.0), 14.0, "start", "black", &panel.title);
        for &tick in &ticks {
            svg.line(
                (scale(tick), plot_top),
                (scale(tick), plot_bottom),
                "#e0e0e0",
                1.0,
                "",
            );
            svg.text(
                (scale(tick), plot_bottom + 14.0),
                10.0,
                "middle",
                "#333",
                &count_label(tick),
            );
        }
        svg.text(
            ((left + right) / 2.0, plot_bottom + 30.0),
            11.0,
            "middle",
            "#333",
            &axis.label,
        );
        for (index, row) in panel.rows.iter().enumerate() {
            let row_top = plot_top + index as f64 * row_height;
            let middle = row_top + row_height / 2.0;
            if index % 2 == 1 {
                svg.rect(0.0, row_top, width, row_height, "#f4f4f4", 1.0);
            }
            svg.text((left - 8.0, middle + 4.0), 11.0, "end", "#111", &row.label);
            for &(value, opacity) in &row.bars {
                let start = scale(axis.min.max(if axis.log { axis.min } else { 0.0 }));
                svg.rect(
                    start,
                    row_top + 3.0,
                    scale(value) - start,
                    row_height - 6.0,
                    row.colour,
                    opacity,
                );
            }
            if let Some((low, high)) = row.whisker {
                svg.line((scale(low), middle), (scale(high), middle), "#111", 1.2, "");
                for end in [low, high] {
                    svg.line(
                        (scale(end), middle - 4.0),
                        (scale(end), middle + 4.0),
                        "#111",
                        1.2,
                        "",
                    );
                }
            }
            svg.text(
                (right + 8.0, middle + 4.0),
                10.0,
                "start",
                "#333",
                &row.note,
            );
        }
        for (value, label, dash, anchor) in &axis.marks {
            svg.line(
                (scale(*value), plot_top - 4.0),
                (scale(*value), plot_bottom),
                "#333",
                1.0,
                dash,
            );
            svg.text((scale(*value), plot_top - 6.0), 9.0, anchor, "#333", label);
        }
        svg.line((left, plot_bottom), (right, plot_bottom), "#333", 1.0, "");
        top += panel_height;
    }
    svg.finish()
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
fn e2e_ratio_plot(e2e: &Value) -> String {
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
        log: false,
        min: 0.0,
        max: (highest * 10.0).ceil() / 10.0,
        label: "median rate / median rate straight to a pod (bar); lowest-highest round (whisker)"
            .to_owned(),
        marks: vec![
            (0.9, "0.9 ".to_owned(), "4 3", "end"),
            (1.0, " 1.0".to_owned(), "", "start"),
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
fn e2e_latency_plot(e2e: &Value) -> String {
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
    let min = 10f64
        .powf(lowest.min(highest).log10().floor() - 0.0)
        .min(10.0);
    let axis = Axis {
        log: true,
        min,
        max: 10f64.powf(highest.log10().ceil()),
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

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(100.0, 10.0), 10.0);
        assert_eq!(nice_step(1600.0, 8.0), 200.0);
        assert_eq!(nice_step(1.3, 6.0), 0.5);
    }

    #[test]
    fn standing_words() {
        assert_eq!(standing(&[]), "not measured");
        assert_eq!(standing(&[true, true]), "met");
        assert_eq!(standing(&[false]), "**NOT met**");
        assert_eq!(standing(&[true, false, false]), "**partly met** (1 of 3)");
    }

    #[test]
    fn svg_text_is_escaped() {
        let mut svg = Svg::new(10.0, 10.0);
        svg.text((0.0, 0.0), 10.0, "start", "black", "pod -> <a & b>");
        assert!(svg.finish().contains("pod -&gt; &lt;a &amp; b&gt;"));
    }
}
