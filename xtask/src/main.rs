//! `cargo xtask <command>`: the developer commands. Each one installs what it needs first, so the
//! README's two commands work on a fresh machine.

mod compare;
mod profile;
mod report;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Developer commands of the lb workspace")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks: the pinned toolchains, bpf-linker (built against the
    /// pinned nightly's libLLVM), iproute2, ethtool, iptables, nftables and bpftool. Idempotent:
    /// a second run changes nothing.
    Setup,
    /// Build the eBPF objects on their own (the datapath and the standalone packet counter) and
    /// print their paths and sizes.
    BuildEbpf,
    /// The main job: build a lab of network namespaces, load the datapath and show it at work.
    Demo,
    /// The benchmarks (needs root): per packet, every datapath path through BPF_PROG_TEST_RUN at
    /// 1, 1k, 10k and 100k services; the control plane; end to end in the lab against iptables and
    /// nftables. Prints tables and writes target/bench/*.json.
    Bench {
        /// Extra arguments for lb-bench, e.g. `--iterations 5000` or `--services 1,1000`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Plots and summary (target/bench/*.svg, summary.md) again from the JSON a bench left.
    BenchReport,
    /// This tree's per-packet cost against another revision's (needs root): pairs of lb-bench
    /// runs, each build first in every other pair (the second run of a pair can read cheaper
    /// whatever it runs), reported per path as each build's median, the paired difference, how
    /// many pairs read this tree dearer, and the difference split by which build ran first.
    /// Writes target/compare/compare.md and keeps the runs' JSON in target/compare/runs/.
    #[command(group(clap::ArgGroup::new("other").required(true).args(["against", "bench"])))]
    BenchCompare {
        /// A revision of this clone: its lb-bench is built in a worktree under target/compare/
        /// (once; its own toolchain pins must be installed).
        #[arg(long)]
        against: Option<String>,
        /// An lb-bench built elsewhere, instead of a revision.
        #[arg(long)]
        bench: Option<PathBuf>,
        /// Pairs of runs (an even number balances the order).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
        pairs: u32,
        /// lb-bench's --services.
        #[arg(long, default_value = "1")]
        services: String,
        /// lb-bench's --iterations (its default when not given).
        #[arg(long)]
        iterations: Option<u32>,
    },
    /// Where one per-packet path spends its time (needs root and perf): lb-bench runs the path
    /// under `perf record`, and the samples taken in the kernel's timed loop of
    /// BPF_PROG_TEST_RUN (`bpf_test_run`) are printed as ns per run by kernel function and by
    /// source line of the BPF programs (through the JIT line table lb-bench writes). Leaves
    /// target/profile/perf.N.data, one per run, for `perf report`.
    Profile {
        /// The path, by its lb-bench key: xdp_new_flow, xdp_new_flow_spread, xdp_established,
        /// xdp6_established, tc_reply, ...
        path: String,
        /// Number of services (frontends) the path runs at.
        #[arg(long, default_value_t = 1)]
        services: u32,
        /// Runs of the path per lb-bench run (new-flow paths: at most what conntrack holds).
        #[arg(long, default_value_t = 24_000, value_parser = clap::value_parser!(u32).range(1..))]
        iterations: u32,
        /// lb-bench runs, one after the other, each under a perf record of its own.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
        runs: u32,
        /// Sampling frequency (Hz).
        #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
        frequency: u32,
        /// Rows printed per table.
        #[arg(long, default_value_t = 20)]
        top: usize,
        /// Profile this lb-bench instead of building the tree's: another revision's, built in
        /// a worktree, to set beside this one's profile.
        #[arg(long)]
        bench: Option<PathBuf>,
    },
    /// The reliability suite (needs root): every fault of docs/reliability.md under steady load
    /// in the lab at full durations (under 15 minutes); prints the table, writes
    /// target/soak/soak.json and the table of docs/reliability.md. Not part of `test`, whose
    /// reliability.rs runs each row for seconds.
    Soak {
        /// Extra arguments for lb-soak, e.g. `--only outage,crash`, `--short`, or `--previous
        /// REV` (the earlier release the changed-layout upgrade starts from; its agent is built
        /// into target/previous/ on first use).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The whole test suite: formatting, clippy (stable, and nightly for the eBPF crate), and every
    /// test including the ones against the real kernel (needs root).
    Test {
        /// Extra arguments for `cargo test`, e.g. a test name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> std::process::ExitCode {
    // The failing command line says all there is to say; no backtrace of xtask itself.
    match run_task(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_task(task: Task) -> anyhow::Result<()> {
    let root = workspace_root();
    match task {
        Task::Setup => setup::ensure(&root).map(drop),
        Task::BuildEbpf => build_ebpf(&root),
        Task::Demo => demo(&root),
        Task::Bench { args } => bench(&root, &args),
        Task::BenchReport => bench_report(&root, None),
        Task::BenchCompare {
            against,
            bench,
            pairs,
            services,
            iterations,
        } => {
            setup::ensure(&root)?;
            ensure_root("lb-bench loads eBPF programs and pins their maps in bpffs")?;
            let against = match (&against, &bench) {
                (Some(rev), _) => compare::Against::Revision(rev),
                (None, Some(bench)) => compare::Against::Bench(bench),
                (None, None) => bail!("give --against REV or --bench PATH"),
            };
            compare::compare(
                &root,
                &compare::Request {
                    against,
                    pairs,
                    services: &services,
                    iterations,
                },
            )
        }
        Task::Profile {
            path,
            services,
            iterations,
            runs,
            frequency,
            top,
            bench,
        } => profile::profile(
            &root,
            &profile::Request {
                path: &path,
                services,
                iterations,
                runs,
                frequency,
                top,
                bench: bench.as_deref(),
            },
        ),
        Task::Test { args } => test(&root, &args),
        Task::Soak { args } => soak(&root, &args),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// The target directory cargo uses for this workspace (honours CARGO_TARGET_DIR).
pub(crate) fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

fn build_ebpf(root: &Path) -> anyhow::Result<()> {
    let toolchains = setup::ensure(root)?;
    let target = "bpfel-unknown-none";
    // The same flags aya-build passes when lb-userspace's build.rs builds the object.
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
    ]
    .join("\x1f");
    run(Command::new("cargo")
        .arg(format!("+{}", toolchains.nightly))
        .args(["build", "--package", "lb-ebpf", "--bins", "--release"])
        .args(["--target", target, "-Z", "build-std=core"])
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .current_dir(root))?;
    // One object per program family: the datapath, and the standalone packet counter.
    for name in ["lb-ebpf", "lb-counter"] {
        let object = target_dir(root).join(target).join("release").join(name);
        let size = std::fs::metadata(&object)
            .with_context(|| format!("the build succeeded but left no {}", object.display()))?
            .len();
        println!("{} ({size} bytes)", object.display());
    }
    Ok(())
}

fn demo(root: &Path) -> anyhow::Result<()> {
    setup::ensure(root)?;
    ensure_root("the demo builds network namespaces and loads eBPF programs")?;
    run(Command::new("cargo")
        .args([
            "build",
            "--release",
            "--package",
            "lb-userspace",
            "--package",
            "lb-tests",
            "--bins",
        ])
        .current_dir(root))?;
    run(&mut Command::new(
        target_dir(root).join("release").join("lab-demo"),
    ))
}

fn bench(root: &Path, extra: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    setup::ensure(root)?;
    ensure_root("the benchmark loads eBPF programs and pins their maps in bpffs")?;
    run(Command::new("cargo")
        .args(["build", "--release", "--package", "lb-tests"])
        .args(["--bin", "lb-bench", "--bin", "lb-bench-live"])
        .args(["--bin", "lb-bench-forward", "--bin", "lb-bench-control"])
        .args(["--bin", "lb-bench-maglev"])
        .args(["--bin", "lb-bench-e2e", "--bin", "lab-peer"])
        .args(["--package", "lb-userspace", "--bin", "lb"])
        .current_dir(root))?;
    let build = started.elapsed();
    let target = target_dir(root);
    let dir = target.join("bench");
    // The datapath: per-packet cost of every XDP and tc path at several table sizes.
    let step = Instant::now();
    run(Command::new(target.join("release").join("lb-bench"))
        .arg("--out")
        .arg(dir.join("datapath.json"))
        .args(extra))?;
    // The same paths with `lb monitor` attached (what watching costs).
    run(Command::new(target.join("release").join("lb-bench"))
        .args([
            "--monitor",
            "--services",
            "1,100000",
            "--iterations",
            "10000",
        ])
        .arg("--out")
        .arg(dir.join("monitor.json")))?;
    let datapath = step.elapsed();
    // Live frames through the native XDP program on a veth, against the XDP_DROP floor.
    let step = Instant::now();
    run(Command::new(target.join("release").join("lb-bench-live"))
        .arg("--out")
        .arg(dir.join("live.json")))?;
    let live = step.elapsed();
    // NodePort to a remote endpoint across a node's two NICs: XDP_REDIRECT against the stack.
    let step = Instant::now();
    run(
        Command::new(target.join("release").join("lb-bench-forward"))
            .arg("--out")
            .arg(dir.join("forward.json")),
    )?;
    let forward = step.elapsed();
    // The control plane: programming 10k services x 10 endpoints, and one change at that size.
    let step = Instant::now();
    run(
        Command::new(target.join("release").join("lb-bench-control"))
            .arg("--out")
            .arg(dir.join("control.json")),
    )?;
    // The same with every Service on Maglev: its tables' memory.
    run(
        Command::new(target.join("release").join("lb-bench-control"))
            .arg("--maglev")
            .arg("--out")
            .arg(dir.join("control-maglev.json")),
    )?;
    // Maglev's tables: balance, disruption and build time (pure computation, seconds).
    run(Command::new(target.join("release").join("lb-bench-maglev"))
        .arg("--out")
        .arg(dir.join("maglev.json")))?;
    let control = step.elapsed();
    // End to end in the lab: lb, kube-proxy-shaped iptables and nftables rules, straight to a
    // pod; reads control.json for the rule-loading comparison.
    let step = Instant::now();
    run(Command::new(target.join("release").join("lb-bench-e2e"))
        .arg("--out")
        .arg(dir.join("e2e.json"))
        .arg("--control")
        .arg(dir.join("control.json")))?;
    let e2e = step.elapsed();
    // Plots and the summary of where each benchmark target stands (docs/benchmarks.md).
    let timings = report::Timings {
        build,
        datapath,
        live,
        forward,
        control,
        e2e,
        total: started.elapsed(),
    };
    bench_report(root, Some(&timings))
}

/// Writes the plots and the summary from target/bench/*.json and prints the summary.
fn bench_report(root: &Path, timings: Option<&report::Timings>) -> anyhow::Result<()> {
    let dir = target_dir(root).join("bench");
    let commit = commit_described(root);
    let summary = report::write(&dir, &commit, timings)?;
    println!("\n{summary}");
    println!("written to {}: summary.md, *.json, *.svg", dir.display());
    Ok(())
}

/// The checkout's commit for a report (`git describe --always --dirty`), or "unknown".
fn commit_described(root: &Path) -> String {
    output(
        Command::new("git")
            .args(["describe", "--always", "--dirty"])
            .current_dir(root),
    )
    .map(|commit| commit.trim().to_owned())
    .unwrap_or_else(|_| "unknown".to_owned())
}

fn soak(root: &Path, extra: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    setup::ensure(root)?;
    ensure_root("the reliability suite builds network namespaces and runs the agent")?;
    run(Command::new("cargo")
        .args(["build", "--release", "--package", "lb-tests"])
        .args(["--bin", "lb-soak", "--bin", "lab-peer"])
        .args(["--package", "lb-userspace", "--bin", "lb"])
        .current_dir(root))?;
    let commit = commit_described(root);
    let result = run(
        Command::new(target_dir(root).join("release").join("lb-soak"))
            .arg("--out")
            .arg(target_dir(root).join("soak").join("soak.json"))
            .arg("--doc")
            .arg(root.join("docs").join("reliability.md"))
            .args(["--commit", &commit])
            .args(extra)
            .current_dir(root),
    );
    println!(
        "soak: {:.0} s with the build",
        started.elapsed().as_secs_f64()
    );
    result
}

fn test(root: &Path, extra: &[String]) -> anyhow::Result<()> {
    let toolchains = setup::ensure(root)?;
    ensure_root("the kernel tests build network namespaces and load eBPF programs")?;
    run(Command::new("cargo")
        .args(["fmt", "--all", "--check"])
        .current_dir(root))?;
    run(Command::new("cargo")
        .args([
            "clippy",
            "--workspace",
            "--exclude",
            "lb-ebpf",
            "--all-targets",
            "--",
        ])
        .args(["-D", "warnings"])
        .current_dir(root))?;
    // The eBPF crate only type-checks for the BPF target, with the nightly that builds it.
    run(Command::new("cargo")
        .arg(format!("+{}", toolchains.nightly))
        .args(["clippy", "--package", "lb-ebpf", "--bins", "--release"])
        .args([
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
        ])
        .args(["-D", "warnings"])
        .current_dir(root))?;
    // Integration tests start `lb` and the lab binaries from the target directory.
    run(Command::new("cargo")
        .args(["build", "--workspace", "--exclude", "lb-ebpf", "--bins"])
        .current_dir(root))?;
    // --all-targets: unit, integration and bin tests, without doc-tests (there are none, and their
    // empty "0 passed" would be the last line of the run).
    let summary = run_tests(
        Command::new("cargo")
            .args([
                "test",
                "--workspace",
                "--exclude",
                "lb-ebpf",
                "--all-targets",
                "--no-fail-fast",
            ])
            .args(extra)
            .current_dir(root),
    )?;
    println!(
        "summary: {} passed, {} failed, {} skipped",
        summary.passed, summary.failed, summary.ignored
    );
    if summary.failed > 0 || !summary.success {
        bail!("tests failed");
    }
    if summary.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

#[derive(Default)]
struct TestSummary {
    passed: u64,
    failed: u64,
    ignored: u64,
    success: bool,
}

/// Runs `cargo test`, passing its output through, and adds up the `test result:` lines of every
/// test binary into one closing line.
fn run_tests(command: &mut Command) -> anyhow::Result<TestSummary> {
    use std::io::{BufRead as _, BufReader};
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let mut summary = TestSummary::default();
    let stdout = child.stdout.take().context("stdout is piped")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            summary.passed += count_before(result, "passed");
            summary.failed += count_before(result, "failed");
            summary.ignored += count_before(result, "ignored");
        }
    }
    summary.success = child.wait()?.success();
    Ok(summary)
}

/// The number before `label` in the rest of a line like `ok. 4 passed; 0 failed; 1 ignored; ...`.
fn count_before(result: &str, label: &str) -> u64 {
    let counts = result.split_once(". ").map_or(result, |(_, counts)| counts);
    counts
        .split(';')
        .find_map(|part| part.trim().strip_suffix(label))
        .and_then(|number| number.trim().parse().ok())
        .unwrap_or(0)
}

pub(crate) fn ensure_root(why: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { geteuid() } != 0 {
        bail!("run as root: {why}");
    }
    Ok(())
}

unsafe extern "C" {
    fn geteuid() -> u32;
}

/// `cargo build --release` of lb-bench in the workspace at `workspace` (this one, or a worktree
/// of another revision's).
pub(crate) fn lb_bench_build(workspace: &Path) -> Command {
    let mut command = Command::new("cargo");
    command
        .args([
            "build",
            "--release",
            "--package",
            "lb-tests",
            "--bin",
            "lb-bench",
        ])
        .current_dir(workspace);
    command
}

/// Runs a command with inherited stdio and fails with the command line if it fails.
pub(crate) fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout, failing with its stderr if it fails.
pub(crate) fn output(command: &mut Command) -> anyhow::Result<String> {
    let output = command
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::count_before;

    #[test]
    fn reads_counts_from_cargo_test_result_lines() {
        let ok = "ok. 4 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.26s";
        assert_eq!(count_before(ok, "passed"), 4);
        assert_eq!(count_before(ok, "failed"), 0);
        assert_eq!(count_before(ok, "ignored"), 1);
        let failed = "FAILED. 2 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!(count_before(failed, "passed"), 2);
        assert_eq!(count_before(failed, "failed"), 3);
    }
}
