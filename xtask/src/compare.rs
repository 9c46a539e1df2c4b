//! `cargo xtask bench-compare`: this tree's per-packet cost against another revision's, in
//! pairs of `lb-bench` runs on one machine.
//!
//! One run of each build makes a pair; the pairs alternate which build runs first, because on
//! the machines this is developed on the second run of a pair can read 20-40 ns cheaper on
//! every path whatever it runs (docs/benchmarks.md, 2026-12-05, padded conntrack values). For
//! each path and size the report gives each build's median of its runs' medians (net of the
//! floor), the median of the paired differences of the runs' interquartile means (net of
//! each run's own floor), how many pairs read this tree dearer, and the paired difference
//! again split by which build ran first: a change whose two halves disagree in sign measured
//! the order, not the change.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{lb_bench_build, output, run, target_dir};

/// What this tree is compared against.
pub enum Against<'a> {
    /// A revision of this clone, built in a worktree of its own.
    Revision(&'a str),
    /// An lb-bench built elsewhere.
    Bench(&'a Path),
}

pub struct Request<'a> {
    pub against: Against<'a>,
    pub pairs: u32,
    /// `lb-bench --services`.
    pub services: &'a str,
    /// `lb-bench --iterations`, when given.
    pub iterations: Option<u32>,
}

pub fn compare(root: &Path, request: &Request) -> anyhow::Result<()> {
    let dir = target_dir(root).join("compare");
    let this = this_bench(root, &dir)?;
    let (other, other_label) = match request.against {
        Against::Bench(path) => (path.to_owned(), path.display().to_string()),
        Against::Revision(rev) => {
            let commit = commit_of(root, rev)?;
            (
                revision_bench(root, &dir, &commit)?,
                commit[..12].to_owned(),
            )
        }
    };
    let runs = dir.join("runs");
    if runs.exists() {
        std::fs::remove_dir_all(&runs).with_context(|| format!("clear {}", runs.display()))?;
    }
    std::fs::create_dir_all(&runs)?;
    let mut pairs = Vec::new();
    // The first and the last run's report, whose load averages lb-bench records.
    let (mut first_run, mut last_run) = (None, None);
    for pair in 0..request.pairs {
        let this_first = pair % 2 == 0;
        let this_out = runs.join(format!("this-{pair}.json"));
        let other_out = runs.join(format!("other-{pair}.json"));
        let order = if this_first {
            [(&this, &this_out), (&other, &other_out)]
        } else {
            [(&other, &other_out), (&this, &this_out)]
        };
        for (bench, out) in order {
            bench_run(bench, out, request)?;
            first_run.get_or_insert_with(|| out.clone());
            last_run = Some(out.clone());
        }
        pairs.push(Pair {
            this: read_run(&this_out)?,
            other: read_run(&other_out)?,
            this_first,
        });
        eprintln!("bench-compare: pair {} of {} done", pair + 1, request.pairs);
    }
    let report = format!(
        "{}\nLoad average {} before, {} after.\n",
        report(&pairs, &other_label).trim_end(),
        recorded_load(first_run.as_deref(), "loadavg_before"),
        recorded_load(last_run.as_deref(), "loadavg_after"),
    );
    std::fs::write(dir.join("compare.md"), &report)?;
    println!("{report}");
    println!("written to {}: compare.md, runs/*.json", dir.display());
    Ok(())
}

/// This tree's release lb-bench, built and copied aside so that a build during the runs does
/// not change it.
fn this_bench(root: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    run(&mut lb_bench_build(root))?;
    std::fs::create_dir_all(dir)?;
    let copy = dir.join("lb-bench-this");
    std::fs::copy(target_dir(root).join("release").join("lb-bench"), &copy)
        .context("copy this tree's lb-bench")?;
    Ok(copy)
}

/// The 1-, 5- and 15-minute load averages an lb-bench report recorded (`machine.<field>`).
fn recorded_load(report: Option<&Path>, field: &str) -> String {
    report
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .and_then(|report| {
            let averages = report["machine"][field].as_str()?.split_whitespace();
            Some(averages.take(3).collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

fn commit_of(root: &Path, rev: &str) -> anyhow::Result<String> {
    let commit = output(
        Command::new("git")
            .args(["rev-parse", "--verify", "--quiet"])
            .arg(format!("{rev}^{{commit}}"))
            .current_dir(root),
    )
    .with_context(|| format!("{rev:?} is no commit of this clone"))?;
    Ok(commit.trim().to_owned())
}

/// `commit`'s release lb-bench, built in a detached worktree (`<target>/compare/<commit>/src`)
/// with a target directory of its own, kept for the next comparison against it. The worktree's
/// own toolchain pins build it: they must be installed (`cargo xtask setup` at that commit).
fn revision_bench(root: &Path, dir: &Path, commit: &str) -> anyhow::Result<PathBuf> {
    let base = dir.join(commit);
    let bench = base.join("lb-bench");
    if bench.exists() {
        return Ok(bench);
    }
    let src = base.join("src");
    if !src.join("Cargo.toml").exists() {
        std::fs::create_dir_all(&base)?;
        run(Command::new("git")
            .args(["worktree", "add", "--detach", "--force"])
            .arg(&src)
            .arg(commit)
            .current_dir(root))?;
    }
    let target = base.join("target");
    let built = lb_bench_build(&src)
        .arg("--target-dir")
        .arg(&target)
        .status()
        .context("cargo build in the worktree")?;
    if !built.success() {
        bail!(
            "building lb-bench at {commit} in {} failed (its toolchains must be installed)",
            src.display()
        );
    }
    std::fs::copy(target.join("release").join("lb-bench"), &bench)?;
    // The build's 1-2 GB are not worth keeping beside the binary.
    std::fs::remove_dir_all(&target).ok();
    Ok(bench)
}

fn bench_run(bench: &Path, out: &Path, request: &Request) -> anyhow::Result<()> {
    let mut command = Command::new(bench);
    command
        .args(["--services", request.services])
        .arg("--out")
        .arg(out);
    if let Some(iterations) = request.iterations {
        command.args(["--iterations", &iterations.to_string()]);
    }
    output(&mut command).map(drop)
}

/// One lb-bench run: per size (services), per path, the net median and the IQM net of the
/// run's own floor.
type Run = BTreeMap<u64, BTreeMap<String, Cost>>;

#[derive(Clone, Copy, Debug, PartialEq)]
struct Cost {
    net_median_ns: f64,
    iqm_net_ns: f64,
}

struct Pair {
    this: Run,
    other: Run,
    this_first: bool,
}

fn read_run(path: &Path) -> anyhow::Result<Run> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    parse_run(&serde_json::from_str(&text)?)
        .with_context(|| format!("{} is not an lb-bench report", path.display()))
}

fn parse_run(report: &Value) -> anyhow::Result<Run> {
    let number = |value: &Value, what: &str| value.as_f64().with_context(|| format!("no {what}"));
    let mut run = Run::new();
    for size in report["sizes"].as_array().context("no sizes")? {
        let services = size["services"].as_u64().context("no services")?;
        let floor = number(&size["floor"]["iqm_ns"], "floor")?;
        let paths = size["paths"].as_array().context("no paths")?;
        let costs = run.entry(services).or_default();
        // The floor itself, raw: its paired difference says how the host differed between the
        // two builds' runs.
        costs.insert(
            FLOOR.to_owned(),
            Cost {
                net_median_ns: number(&size["floor"]["median_ns"], "floor median")?,
                iqm_net_ns: floor,
            },
        );
        for path in paths {
            let name = path["path"].as_str().context("a path without a name")?;
            costs.insert(
                name.to_owned(),
                Cost {
                    net_median_ns: number(&path["net_median_ns"], "net median")?,
                    iqm_net_ns: number(&path["raw"]["iqm_ns"], "IQM")? - floor,
                },
            );
        }
    }
    Ok(run)
}

/// The row of the runs' floors (a bare XDP_PASS, raw), first in each table.
const FLOOR: &str = "(floor, raw)";

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

/// The comparison as a Markdown table per size: the paths both builds measured.
fn report(pairs: &[Pair], other_label: &str) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "# This tree against {other_label}: {} pairs of lb-bench runs, each build first in every other pair\n",
        pairs.len()
    );
    let Some(first) = pairs.first() else {
        return out;
    };
    for (services, paths) in &first.this {
        let _ = write!(
            out,
            "\n## {services} service(s)\n\n| path | this (ns) | other (ns) | paired diff (ns) | this dearer | diff, this first / other first |\n|---|---:|---:|---:|---:|---|\n"
        );
        for path in paths.keys() {
            let costs: Vec<(Cost, Cost, bool)> = pairs
                .iter()
                .filter_map(|pair| {
                    let this = pair.this.get(services)?.get(path)?;
                    let other = pair.other.get(services)?.get(path)?;
                    Some((*this, *other, pair.this_first))
                })
                .collect();
            if costs.len() != pairs.len() {
                continue;
            }
            let diff = |keep: &dyn Fn(bool) -> bool| {
                median(
                    costs
                        .iter()
                        .filter(|(_, _, this_first)| keep(*this_first))
                        .map(|(this, other, _)| this.iqm_net_ns - other.iqm_net_ns)
                        .collect(),
                )
            };
            let dearer = costs
                .iter()
                .filter(|(this, other, _)| this.iqm_net_ns > other.iqm_net_ns)
                .count();
            let (this_first, other_first) = (diff(&|first| first), diff(&|first| !first));
            let disagree = this_first * other_first < 0.0;
            let _ = writeln!(
                out,
                "| {path} | {:.1} | {:.1} | {:+.1} | {dearer}/{} | {this_first:+.1} / {other_first:+.1}{} |",
                median(
                    costs
                        .iter()
                        .map(|(this, _, _)| this.net_median_ns)
                        .collect()
                ),
                median(
                    costs
                        .iter()
                        .map(|(_, other, _)| other.net_median_ns)
                        .collect()
                ),
                diff(&|_| true),
                costs.len(),
                if disagree { " (order)" } else { "" },
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(new_flow_iqm: f64, established_iqm: f64) -> Value {
        let path = |name: &str, iqm: f64| serde_json::json!({"path": name, "net_median_ns": iqm - 50.0, "raw": {"iqm_ns": iqm}});
        serde_json::json!({"sizes": [{
            "services": 1,
            "floor": {"iqm_ns": 50.0, "median_ns": 49.0},
            "paths": [path("xdp_new_flow", new_flow_iqm), path("xdp_established", established_iqm)],
        }]})
    }

    /// New flows 10 ns cheaper in this tree whichever runs first; established cheaper only
    /// when it runs second: the order, flagged.
    #[test]
    fn a_change_and_an_order_effect_read_apart() {
        let pairs: Vec<Pair> = (0..4)
            .map(|pair| {
                let this_first = pair % 2 == 0;
                let second_bonus = |first: bool| if first { 0.0 } else { -20.0 };
                Pair {
                    this: parse_run(&run_of(390.0, 100.0 + second_bonus(this_first))).unwrap(),
                    other: parse_run(&run_of(400.0, 100.0 + second_bonus(!this_first))).unwrap(),
                    this_first,
                }
            })
            .collect();
        let report = report(&pairs, "abc");
        let row = |path: &str| {
            report
                .lines()
                .find(|line| line.starts_with(&format!("| {path} |")))
                .unwrap_or_else(|| panic!("no row for {path}: {report}"))
                .to_owned()
        };
        assert_eq!(
            row("xdp_new_flow"),
            "| xdp_new_flow | 340.0 | 350.0 | -10.0 | 0/4 | -10.0 / -10.0 |"
        );
        assert_eq!(
            row("(floor, raw)"),
            "| (floor, raw) | 49.0 | 49.0 | +0.0 | 0/4 | +0.0 / +0.0 |"
        );
        assert_eq!(
            row("xdp_established"),
            "| xdp_established | 40.0 | 40.0 | +0.0 | 2/4 | +20.0 / -20.0 (order) |"
        );
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}
