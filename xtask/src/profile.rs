//! `cargo xtask profile PATH`: where one datapath path spends its time, by kernel function and by
//! source line of the BPF programs. lb-bench runs the path under `perf record`, and writes where
//! each source line begins in each program's JIT image (`lb-bench --jit-lines`); the samples of
//! the test runs are then put on those lines.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
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
    /// An lb-bench built elsewhere; `None`: the tree's, built in release mode first.
    pub bench: Option<&'a Path>,
}

pub fn profile(root: &Path, request: &Request<'_>) -> anyhow::Result<()> {
    crate::setup::ensure(root).map(drop)?;
    crate::ensure_root("the profile loads eBPF programs and samples the kernel")?;
    if crate::output(Command::new("perf").arg("--version")).is_err() {
        bail!("perf is needed: apt-get install linux-perf");
    }
    let target = crate::target_dir(root);
    let bench = match request.bench {
        Some(bench) => bench.to_owned(),
        None => {
            crate::run(&mut crate::lb_bench_build(root))?;
            target.join("release").join("lb-bench")
        }
    };
    let dir = target.join("profile");
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let lines = dir.join("jit-lines.tsv");
    // One perf record per lb-bench run: each run loads the programs afresh, often at addresses
    // an earlier run's programs had, and perf script then named some of a run's samples after
    // the earlier run's programs (lb_xdp's established path showed up as lb_xdp_lookup's).
    let mut leaves = Vec::new();
    let mut data_files = Vec::new();
    for run in 0..request.runs {
        let data = dir.join(format!("perf.{run}.data"));
        record_run(request, &bench, &data, &lines)?;
        leaves.extend(leaves_of(&data)?);
        data_files.push(data);
    }
    if leaves.is_empty() {
        bail!("no sample inside bpf_test_run (the kernel's timed loop of BPF_PROG_TEST_RUN)");
    }
    let table = LineTable::parse(
        &fs::read_to_string(&lines).with_context(|| format!("read {}", lines.display()))?,
    );
    let runs = u64::from(request.runs) * u64::from(request.iterations);
    print!("{}", report(&leaves, &table, runs, request.top));
    let data_files: Vec<String> = data_files
        .iter()
        .map(|data| data.display().to_string())
        .collect();
    println!(
        "perf data: {}, JIT line table: {}",
        data_files.join(", "),
        lines.display()
    );
    Ok(())
}

/// One lb-bench run of the path under `perf record`, into `data`; the run writes the JIT line
/// table of the programs it loaded to `lines`.
fn record_run(
    request: &Request<'_>,
    bench: &Path,
    data: &Path,
    lines: &Path,
) -> anyhow::Result<()> {
    // cpu-clock: each sample's period is the ns it stands for, whatever rate perf ends up
    // sampling at (the kernel throttles a rate that costs too much).
    crate::run(
        Command::new("perf")
            .args(["record", "-q", "-g", "-e", "cpu-clock", "-F"])
            .arg(request.frequency.to_string())
            .arg("-o")
            .arg(data)
            .arg("--")
            .arg(bench)
            .args(["--services", &request.services.to_string()])
            .args(["--profile", request.path])
            .args(["--iterations", &request.iterations.to_string()])
            .args(["--warmup", "0", "--jit-lines"])
            .arg(lines)
            .stdout(Stdio::null()),
    )
}

/// The samples of one recording taken inside `bpf_test_run` ([`test_run_leaves`]).
fn leaves_of(data: &Path) -> anyhow::Result<Vec<Leaf>> {
    let mut script = Command::new("perf")
        .args(["script", "-F", "period,ip,sym,symoff", "-i"])
        .arg(data)
        .stdout(Stdio::piped())
        .spawn()
        .context("start perf script")?;
    let stdout = script.stdout.take().context("perf script's output")?;
    let leaves = test_run_leaves(BufReader::new(stdout)).context("read perf script's output")?;
    let status = script.wait().context("perf script")?;
    if !status.success() {
        bail!("perf script failed: {status}");
    }
    Ok(leaves)
}

/// The innermost frame of a sample taken inside `bpf_test_run`, and the ns it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    pub symbol: String,
    pub offset: u64,
    pub period_ns: u64,
    /// For a leaf outside the BPF programs (a helper, a map's kernel function): the innermost
    /// BPF program frame of the chain, and its return address's offset.
    pub bpf_caller: Option<(String, u64)>,
}

/// The leaf frames of the samples of `perf script -F period,ip,sym,symoff` (with call chains:
/// the period on a line of its own, then one frame per line, samples separated by blank lines)
/// whose chain passes through `bpf_test_run`, the kernel's timed loop of BPF_PROG_TEST_RUN:
/// what lb-bench's runs measure, with the few test runs its set-up makes, and nothing else of
/// the set-up.
pub fn test_run_leaves(script: impl BufRead) -> std::io::Result<Vec<Leaf>> {
    let mut leaves = Vec::new();
    let mut sample: Vec<String> = Vec::new();
    for line in script.lines().chain(std::iter::once(Ok(String::new()))) {
        let line = line?;
        if !line.trim().is_empty() {
            sample.push(line);
            continue;
        }
        if let Some(leaf) = test_run_leaf(&sample) {
            leaves.push(leaf);
        }
        sample.clear();
    }
    Ok(leaves)
}

fn test_run_leaf(sample: &[String]) -> Option<Leaf> {
    let (period, frames) = sample.split_first()?;
    let period_ns = period.trim().parse().ok()?;
    let frames: Vec<(&str, u64)> = frames
        .iter()
        .map(|frame| symbol_and_offset(frame))
        .collect();
    if !frames.iter().any(|(symbol, _)| is_test_run(symbol)) {
        return None;
    }
    let &(symbol, offset) = frames.first()?;
    let bpf_caller = frames[1..]
        .iter()
        .take_while(|(symbol, _)| !is_test_run(symbol))
        .find(|(symbol, _)| tag_of(symbol).is_some())
        .filter(|_| tag_of(symbol).is_none())
        .map(|&(symbol, offset)| (symbol.to_owned(), offset));
    Some(Leaf {
        symbol: symbol.to_owned(),
        offset,
        period_ns,
        bpf_caller,
    })
}

/// Whether a frame's symbol is `bpf_test_run` (or a compiler's copy of it, `bpf_test_run.isra.0`).
fn is_test_run(symbol: &str) -> bool {
    symbol.split('.').next() == Some("bpf_test_run")
}

/// A frame's symbol and offset: "\tffffffffc0123456 bpf_prog_<tag>_lb_xdp+0x56ef".
fn symbol_and_offset(frame: &str) -> (&str, u64) {
    let frame = frame.split_whitespace().nth(1).unwrap_or("[unknown]");
    match frame.rsplit_once("+0x") {
        Some((symbol, offset)) => (symbol, u64::from_str_radix(offset, 16).unwrap_or(0)),
        None => (frame, 0),
    }
}

/// `lb-bench --jit-lines` rows by program tag, in offset order. By tag, not by whole symbol:
/// the table's names are the kernel's 15-character program names, perf's those of the BTF
/// (`lb_xdp6_fronten` against `lb_xdp6_frontend`). Checked on kernel 6.18, where perf's symbol
/// of a program's main function carries the program's tag.
#[derive(Debug, Default)]
pub struct LineTable {
    by_tag: HashMap<String, Vec<(u64, String)>>,
}

/// The tag in a BPF program's symbol (`bpf_prog_<16 hex digits>_<name>`).
fn tag_of(symbol: &str) -> Option<&str> {
    let tag = symbol.strip_prefix("bpf_prog_")?.get(..16)?;
    tag.bytes().all(|b| b.is_ascii_hexdigit()).then_some(tag)
}

impl LineTable {
    /// Parses `symbol \t offset (hex) \t file:line \t source text` rows; malformed rows are
    /// skipped.
    pub fn parse(text: &str) -> Self {
        let mut by_tag: HashMap<String, Vec<(u64, String)>> = HashMap::new();
        for row in text.lines() {
            let mut fields = row.splitn(4, '\t');
            let (Some(symbol), Some(offset), Some(place)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let (Some(tag), Ok(offset)) = (tag_of(symbol), u64::from_str_radix(offset, 16)) else {
                continue;
            };
            let text = fields.next().unwrap_or_default();
            let place = format!("{}  {}", short_path(place), text.trim());
            by_tag
                .entry(tag.to_owned())
                .or_default()
                .push((offset, place));
        }
        for rows in by_tag.values_mut() {
            rows.sort_by_key(|(offset, _)| *offset);
            // The IPv4 and IPv6 datapaths load the same programs: their rows come twice.
            rows.dedup_by_key(|(offset, _)| *offset);
        }
        Self { by_tag }
    }

    /// The source line whose code holds `offset` of `symbol`, with the offset its code starts
    /// at: the last row at or before `offset`.
    pub fn locate(&self, symbol: &str, offset: u64) -> Option<(u64, &str)> {
        let rows = self.by_tag.get(tag_of(symbol)?)?;
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

/// ns per run (of `runs` in all) by leaf function, then by source line of the BPF programs.
pub fn report(leaves: &[Leaf], table: &LineTable, runs: u64, top: usize) -> String {
    let mut by_function: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    let mut by_line: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut by_call: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let add = |into: &mut (u64, u64), leaf: &Leaf| {
        into.0 += leaf.period_ns;
        into.1 += 1;
    };
    let site = |symbol: &str, offset: u64| {
        let (start, place) = table.locate(symbol, offset)?;
        let program = symbol.splitn(4, '_').nth(3).unwrap_or(symbol);
        Some(format!("{program}+{start:#x}: {place}"))
    };
    for leaf in leaves {
        add(by_function.entry(leaf.symbol.as_str()).or_default(), leaf);
        if let Some(site) = site(&leaf.symbol, leaf.offset) {
            add(by_line.entry(site).or_default(), leaf);
        }
        // A return address is the instruction after the call: the byte before it is the call's.
        if let Some((caller, offset)) = &leaf.bpf_caller
            && let Some(site) = site(caller, offset.saturating_sub(1))
        {
            add(by_call.entry(site).or_default(), leaf);
        }
    }
    let mut out = String::new();
    let per_run = |ns: u64| ns as f64 / runs.max(1) as f64;
    let _ = writeln!(
        out,
        "{:.1} ns per run in all, over {runs} runs ({} samples inside bpf_test_run)",
        per_run(leaves.iter().map(|leaf| leaf.period_ns).sum()),
        leaves.len()
    );
    let mut section = |title: &str, counts: Vec<(String, (u64, u64))>| {
        let _ = writeln!(out, "\n{title}\n   ns/run  samples");
        let mut counts = counts;
        counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        for (name, (ns, samples)) in counts.into_iter().take(top) {
            let _ = writeln!(out, "{:9.1}  {samples:7}  {name}", per_run(ns));
        }
    };
    section(
        "ns per run by function (kernel functions and whole BPF programs):",
        by_function
            .into_iter()
            .map(|(name, counts)| (name.to_owned(), counts))
            .collect(),
    );
    section(
        "ns per run by source line of the BPF programs, each site apart (program+offset of its \
         code in the JIT image; a stalled load shows on the instruction after it, often the \
         next line):",
        by_line.into_iter().collect(),
    );
    section(
        "ns per run in kernel functions, by the BPF source line that called them (helpers, map \
         lookups and updates):",
        by_call.into_iter().collect(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: &str = "
     50000 
\tffffffffc0001010 bpf_prog_0123456789abcdef_lb_xdp+0x10
\tffffffff81000000 bpf_test_run+0x99
\tffffffff81000100 bpf_prog_test_run_xdp+0x10

     50000 
\tffffffff81200000 lookup_nulls_elem_raw+0x2a
\tffffffffc0001031 bpf_prog_0123456789abcdef_lb_xdp+0x31
\tffffffff81000000 bpf_test_run+0x99

     50000 
\tffffffff81300000 do_syscall_64+0x5
\tffffffff81300100 entry_SYSCALL_64+0x1

     50000 
\tffffffff81300000 bpf_prog_test_run_xdp+0x5

     50000 
\tffffffffc0001030 bpf_prog_0123456789abcdef_lb_xdp_with_a_long_name+0x30
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
        let leaves = test_run_leaves(SCRIPT.as_bytes()).unwrap();
        let leaf = |symbol: &str, offset| Leaf {
            symbol: symbol.into(),
            offset,
            period_ns: 50_000,
            bpf_caller: None,
        };
        assert_eq!(
            leaves,
            vec![
                leaf("bpf_prog_0123456789abcdef_lb_xdp", 0x10),
                Leaf {
                    bpf_caller: Some(("bpf_prog_0123456789abcdef_lb_xdp".into(), 0x31)),
                    ..leaf("lookup_nulls_elem_raw", 0x2a)
                },
                leaf("bpf_prog_0123456789abcdef_lb_xdp_with_a_long_name", 0x30),
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
        // perf's name of the same program may be longer than the kernel's 15 characters.
        assert_eq!(
            table.locate("bpf_prog_0123456789abcdef_lb_xdp_with_a_long_name", 0x10),
            table.locate(symbol, 0x10)
        );
        assert_eq!(table.locate("bpf_prog_ffffffffffffffff_lb_xdp", 0x10), None);
        assert_eq!(table.locate("lookup_nulls_elem_raw", 0x10), None);
    }

    #[test]
    fn the_report_gives_ns_per_run_by_function_and_by_line() {
        let leaves = test_run_leaves(SCRIPT.as_bytes()).unwrap();
        let report = report(&leaves, &LineTable::parse(LINES), 1000, 10);
        let has = |row: &str| assert!(report.contains(row), "no {row:?} in\n{report}");
        assert!(
            report.starts_with("150.0 ns per run in all, over 1000 runs (3 samples"),
            "{report}"
        );
        has("     50.0        1  bpf_prog_0123456789abcdef_lb_xdp\n");
        has("     50.0        1  lookup_nulls_elem_raw\n");
        has("     50.0        1  lb_xdp+0xc: lb-ebpf/src/flow.rs:178  if live == 0 {\n");
        has(
            "     50.0        1  lb_xdp_with_a_long_name+0x2c: aya-ebpf-bindings-0.3.0/src/x86_64/helpers.rs:10",
        );
        // The kernel function's sample goes to the line of the call that returns to 0x31.
        let calls = report
            .split_once("by the BPF source line that called them")
            .map(|(_, calls)| calls)
            .unwrap_or_default();
        assert_eq!(
            calls
                .lines()
                .filter(|row| row.contains(": "))
                .collect::<Vec<_>>(),
            [
                "     50.0        1  lb_xdp+0x2c: aya-ebpf-bindings-0.3.0/src/x86_64/helpers.rs:10  fun(map, key)"
            ],
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
