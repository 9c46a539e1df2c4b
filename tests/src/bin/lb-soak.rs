//! `lb-soak`: the reliability suite (`cargo xtask soak`). Runs every fault of `lab::soak` under
//! load at full durations (or `--short`), prints the table, writes the rows as JSON and,
//! with `--doc`, replaces the measured table in docs/reliability.md. Needs root (the lab).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use lab::soak;

#[derive(Parser)]
#[command(about = "Faults under steady load in the lab, measured (docs/reliability.md)")]
struct Args {
    /// Seconds a row instead of the full durations.
    #[arg(long)]
    short: bool,
    /// Only the rows whose name starts with one of these (outage, crash, churn,
    /// rolling-cluster, rolling-local, conntrack, snat, map-full, upgrade-same,
    /// upgrade-changed; `upgrade` is both).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    #[arg(long, default_value_os_t = soak::default_out())]
    out: PathBuf,
    /// docs/reliability.md: its table between the markers is replaced by this run's.
    #[arg(long)]
    doc: Option<PathBuf>,
    /// The earlier release the changed-layout upgrade starts from: a commit of this clone
    /// whose backends map is still `lb4_be_v1` (the row checks its migration), its agent
    /// built into target/previous/ on first use. The default is the last such commit.
    #[arg(long, default_value = lab::previous::DEFAULT_REV)]
    previous: String,
    /// The commit measured, for the document.
    #[arg(long, default_value = "unknown")]
    commit: String,
}

const BEGIN: &str = "<!-- soak table: begin -->";
const END: &str = "<!-- soak table: end -->";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scale = if args.short {
        soak::Scale::short()
    } else {
        soak::Scale::full()
    };
    let started = std::time::Instant::now();
    let load_before = lab::lab::load_average();
    let rows = soak::all(&scale, &args.only, &args.previous);
    let elapsed = started.elapsed();
    let load_after = lab::lab::load_average();
    let date = String::from_utf8(
        std::process::Command::new("date")
            .arg("-u")
            .output()?
            .stdout,
    )?
    .trim()
    .to_owned();
    let table = soak::table(&rows);
    let header = format!(
        "Measured {date} at commit {}, {} scale, in {:.0} s; load average {load_before} before, {load_after} after.\n",
        args.commit,
        if args.short { "short" } else { "full" },
        elapsed.as_secs_f64()
    );
    println!("\n{header}\n{table}");
    for row in rows
        .iter()
        .filter(|row| !row.target_met && row.not_run.is_none())
    {
        println!("{}:\n{}\n", row.fault, row.failures());
    }
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let json = serde_json::json!({
        "date": date, "commit": args.commit, "previous": args.previous, "scale": scale,
        "elapsed_s": elapsed.as_secs_f64(),
        "load_average_before": load_before, "load_average_after": load_after,
        "rows": rows,
    });
    std::fs::write(&args.out, serde_json::to_string_pretty(&json)?)?;
    println!("written to {}", args.out.display());
    if let Some(doc) = &args.doc {
        let text = std::fs::read_to_string(doc).with_context(|| doc.display().to_string())?;
        let (head, rest) = text
            .split_once(BEGIN)
            .with_context(|| format!("{} has no {BEGIN}", doc.display()))?;
        let (_, tail) = rest
            .split_once(END)
            .with_context(|| format!("{} has no {END}", doc.display()))?;
        std::fs::write(doc, format!("{head}{BEGIN}\n{header}\n{table}{END}{tail}"))?;
        println!("table written to {}", doc.display());
    }
    Ok(())
}
