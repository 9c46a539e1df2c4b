//! `cargo xtask profile PATH`: where one datapath path spends its time, by kernel function and by
//! source line of the BPF programs. lb-bench runs the path under `perf record`, and writes where
//! each source line begins in each program's JIT image (`lb-bench --jit-lines`); the samples of
//! the test runs are then put on those lines.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    fs,
    path::Path,
    process::Command,
};

use anyhow::{Context as _, bail};

/// What to profile, from the command line.
pub struct Request<'a> {
    pub path: &'a str,
    pub services: u32,
    pub iterations: u32,
    pub runs: u32,
    pub frequency: u32,
    pub top: usize,
}

pub fn profile(root: &Path, request: &Request<'_>) -> anyhow::Result<()> {
    crate::setup::ensure(root).map(drop)?;
    crate::ensure_root("the profile loads eBPF programs and samples the kernel")?;
    if crate::output(Command::new("perf").arg("--version")).is_err() {
        bail!("perf is needed: apt-get install linux-perf");
    }
    crate::run(
        Command::new("cargo")
            .args([
                "build",
                "--release",
                "--package",
                "lb-tests",
                "--bin",
                "lb-bench",
            ])
            .current_dir(root),
    )?;
    let target = crate::target_dir(root);
    let dir = target.join("profile");
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let data = dir.join("perf.data");
    let lines = dir.join("jit-lines.tsv");
    let bench = target.join("release").join("lb-bench");
    let one_run = format!(
        "{} --services {} --profile {} --iterations {} --warmup 0 --jit-lines {} >/dev/null",
        bench.display(),
        request.services,
        request.path,
        request.iterations,
        lines.display()
    );
    crate::run(
        Command::new("perf")
            .args(["record", "-q", "-g", "-F"])
            .arg(request.frequency.to_string())
            .arg("-o")
            .arg(&data)
            .args(["--", "sh", "-c"])
            .arg(format!(
                "set -e; for run in $(seq {}); do {one_run}; done",
                request.runs
            )),
    )?;
    let script = crate::output(
        Command::new("perf")
            .args(["script", "-F", "ip,sym,symoff", "-i"])
            .arg(&data),
    )?;
    let table = LineTable::parse(
        &fs::read_to_string(&lines).with_context(|| format!("read {}", lines.display()))?,
    );
    let runs = u64::from(request.runs) * u64::from(request.iterations);
    let ns_per_sample = 1e9 / f64::from(request.frequency) / runs as f64;
    print!(
        "{}",
        report(
            &test_run_leaves(&script),
            &table,
            ns_per_sample,
            request.top
        )
    );
    println!(
        "perf data: {}, JIT line table: {}",
        data.display(),
        lines.display()
    );
    Ok(())
}

/// The innermost frame of a sample taken inside BPF_PROG_TEST_RUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    pub symbol: String,
    pub offset: u64,
}

/// The leaf frames of the samples of `perf script -F ip,sym,symoff` (with call chains: one
/// frame per line, samples separated by blank lines) whose chain passes through
/// `bpf_test_run`: the runs lb-bench makes, not its set-up.
pub fn test_run_leaves(script: &str) -> Vec<Leaf> {
    script
        .split("\n\n")
        .filter(|sample| sample.contains("bpf_test_run"))
        .filter_map(|sample| sample.lines().find(|line| !line.trim().is_empty()))
        .map(|leaf| {
            // "ffffffffc0123456 bpf_prog_<tag>_lb_xdp+0x56ef"
            let frame = leaf.split_whitespace().nth(1).unwrap_or("[unknown]");
            match frame.rsplit_once("+0x") {
                Some((symbol, offset)) => Leaf {
                    symbol: symbol.to_owned(),
                    offset: u64::from_str_radix(offset, 16).unwrap_or(0),
                },
                None => Leaf {
                    symbol: frame.to_owned(),
                    offset: 0,
                },
            }
        })
        .collect()
}

/// `lb-bench --jit-lines` rows by program symbol, in offset order.
#[derive(Debug, Default)]
pub struct LineTable {
    by_symbol: HashMap<String, Vec<(u64, String)>>,
}

impl LineTable {
    /// Parses `symbol \t offset (hex) \t file:line \t source text` rows; malformed rows are
    /// skipped.
    pub fn parse(text: &str) -> Self {
        let mut by_symbol: HashMap<String, Vec<(u64, String)>> = HashMap::new();
        for row in text.lines() {
            let mut fields = row.splitn(4, '\t');
            let (Some(symbol), Some(offset), Some(place)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let Ok(offset) = u64::from_str_radix(offset, 16) else {
                continue;
            };
            let text = fields.next().unwrap_or_default();
            let place = format!("{}  {}", short_path(place), text.trim());
            by_symbol
                .entry(symbol.to_owned())
                .or_default()
                .push((offset, place));
        }
        for rows in by_symbol.values_mut() {
            rows.sort_by_key(|(offset, _)| *offset);
        }
        Self { by_symbol }
    }

    /// The source line whose code holds `offset` of `symbol`, with the offset its code starts
    /// at: the last row at or before `offset`.
    pub fn locate(&self, symbol: &str, offset: u64) -> Option<(u64, &str)> {
        let rows = self.by_symbol.get(symbol)?;
        let at = rows.partition_point(|(start, _)| *start <= offset);
        at.checked_sub(1)
            .map(|row| (rows[row].0, rows[row].1.as_str()))
    }
}

/// A source path without the machine's prefix: from the crate directory on
/// (`lb-ebpf/src/flow.rs`, `aya-ebpf-bindings-0.3.0/src/...`, `core/src/option.rs`).
fn short_path(place: &str) -> &str {
    let crate_start = place
        .rmatch_indices("/src/")
        .next()
        .and_then(|(at, _)| place[..at].rfind('/'))
        .map_or(0, |slash| slash + 1);
    &place[crate_start..]
}

/// ns per run by leaf function, then by source line of the BPF programs.
pub fn report(leaves: &[Leaf], table: &LineTable, ns_per_sample: f64, top: usize) -> String {
    let mut by_function: BTreeMap<&str, u64> = BTreeMap::new();
    let mut by_line: BTreeMap<String, u64> = BTreeMap::new();
    for leaf in leaves {
        *by_function.entry(leaf.symbol.as_str()).or_default() += 1;
        if let Some((start, place)) = table.locate(&leaf.symbol, leaf.offset) {
            let program = leaf.symbol.splitn(4, '_').nth(3).unwrap_or(&leaf.symbol);
            *by_line
                .entry(format!("{program}+{start:#x}: {place}"))
                .or_default() += 1;
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:.1} ns per run in all ({} samples inside BPF_PROG_TEST_RUN)",
        leaves.len() as f64 * ns_per_sample,
        leaves.len()
    );
    let mut section = |title: &str, counts: Vec<(String, u64)>| {
        let _ = writeln!(out, "\n{title}");
        let mut counts = counts;
        counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        for (name, samples) in counts.into_iter().take(top) {
            let _ = writeln!(out, "{:9.1}  {name}", samples as f64 * ns_per_sample);
        }
    };
    section(
        "ns per run by function (kernel functions and whole BPF programs):",
        by_function
            .into_iter()
            .map(|(name, samples)| (name.to_owned(), samples))
            .collect(),
    );
    section(
        "ns per run by source line of the BPF programs, each site apart (program+offset of its \
         code in the JIT image; a stalled load shows on the instruction after it, often the \
         next line):",
        by_line.into_iter().collect(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: &str = "\
\tffffffffc0001010 bpf_prog_0123456789abcdef_lb_xdp+0x10
\tffffffff81000000 bpf_test_run+0x99
\tffffffff81000100 bpf_prog_test_run_xdp+0x10

\tffffffff81200000 lookup_nulls_elem_raw+0x2a
\tffffffff81000000 bpf_test_run+0x99

\tffffffff81300000 do_syscall_64+0x5
\tffffffff81300100 entry_SYSCALL_64+0x1

\tffffffffc0001030 bpf_prog_0123456789abcdef_lb_xdp+0x30
\tffffffff81000000 bpf_test_run+0x99
";

    const LINES: &str = "\
bpf_prog_0123456789abcdef_lb_xdp\t0\t/work/main/lb-ebpf/src/xdp.rs:54\t#[xdp]
bpf_prog_0123456789abcdef_lb_xdp\t2c\t/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/aya-ebpf-bindings-0.3.0/src/x86_64/helpers.rs:10\tfun(map, key)
bpf_prog_0123456789abcdef_lb_xdp\tc\t/work/main/lb-ebpf/src/flow.rs:178\tif live == 0 {
not a row
";

    #[test]
    fn only_the_samples_inside_test_runs_count_and_their_leaf_is_taken() {
        let leaves = test_run_leaves(SCRIPT);
        assert_eq!(
            leaves,
            vec![
                Leaf {
                    symbol: "bpf_prog_0123456789abcdef_lb_xdp".into(),
                    offset: 0x10
                },
                Leaf {
                    symbol: "lookup_nulls_elem_raw".into(),
                    offset: 0x2a
                },
                Leaf {
                    symbol: "bpf_prog_0123456789abcdef_lb_xdp".into(),
                    offset: 0x30
                },
            ]
        );
    }

    #[test]
    fn an_offset_belongs_to_the_last_line_that_starts_at_or_before_it() {
        let table = LineTable::parse(LINES);
        let symbol = "bpf_prog_0123456789abcdef_lb_xdp";
        assert_eq!(
            table.locate(symbol, 0x0),
            Some((0x0, "lb-ebpf/src/xdp.rs:54  #[xdp]"))
        );
        assert_eq!(
            table.locate(symbol, 0x10),
            Some((0xc, "lb-ebpf/src/flow.rs:178  if live == 0 {"))
        );
        assert_eq!(
            table.locate(symbol, 0x2c),
            Some((
                0x2c,
                "aya-ebpf-bindings-0.3.0/src/x86_64/helpers.rs:10  fun(map, key)"
            ))
        );
        assert_eq!(table.locate("bpf_prog_ffff_other", 0x10), None);
    }

    #[test]
    fn the_report_gives_ns_per_run_by_function_and_by_line() {
        let report = report(&test_run_leaves(SCRIPT), &LineTable::parse(LINES), 50.0, 10);
        assert!(
            report.starts_with("150.0 ns per run in all (3 samples"),
            "{report}"
        );
        assert!(
            report.contains("    100.0  bpf_prog_0123456789abcdef_lb_xdp\n"),
            "{report}"
        );
        assert!(
            report.contains("     50.0  lookup_nulls_elem_raw\n"),
            "{report}"
        );
        assert!(
            report.contains("     50.0  lb_xdp+0xc: lb-ebpf/src/flow.rs:178  if live == 0 {\n"),
            "{report}"
        );
        assert!(
            report.contains(
                "     50.0  lb_xdp+0x2c: aya-ebpf-bindings-0.3.0/src/x86_64/helpers.rs:10"
            ),
            "{report}"
        );
    }

    #[test]
    fn paths_lose_the_machine_s_prefix() {
        assert_eq!(
            short_path("/work/main/lb-ebpf/src/flow.rs:12"),
            "lb-ebpf/src/flow.rs:12"
        );
        assert_eq!(
            short_path(
                "/root/.rustup/toolchains/x/lib/rustlib/src/rust/library/core/src/option.rs:1"
            ),
            "core/src/option.rs:1"
        );
        assert_eq!(short_path("flow.rs:3"), "flow.rs:3");
    }
}
