//! Maglev benchmark: disruption and balance of the lookup tables of
//! `lb_userspace::datapath::maglev`, and the time to build them. Pure computation, no root, no
//! kernel.
//!
//! For N backends and the table of M slots the datapath gives them
//! (`lb_common::maglev::table_size`, about 100 slots per backend, kept while N moves within a
//! band, so the changes below keep M): (a) remove one backend, or add one, and count the table
//! slots whose owner changed (raw, and the "unnecessary" part: slots that moved between two
//! backends present before and after) and the share of 1,000,000 simulated flows that change
//! backend, selecting as the datapath does (`slot = flow_hash(5-tuple) % M`), next to the ideal
//! (1/N of the flows for a removal, 1/(N+1) for an addition); mean over up to 10 different
//! removals and additions, the worst in the JSON. (b) balance: slots of the busiest backend over
//! the mean (target: at most 5% above), and the least busy's. (c) the median time to build the
//! table.
//!
//! `cargo build --release -p lb-tests --bin lb-bench-maglev && target/release/lb-bench-maglev`
//! (`cargo xtask bench` runs it too); prints a table and writes target/bench/maglev.json, or the
//! path after `--out`.

use std::time::{Duration, Instant};

use lb_userspace::datapath::maglev;

const FLOWS: usize = 1_000_000;
const BACKENDS: [usize; 7] = [2, 10, 30, 100, 300, 1000, 4096];
/// Services that grew or shrank within their table's band (`table_size` keeps a table from 50
/// to 400 slots per backend), at its edges: about 50 slots per backend, and about 400; N - 1
/// and N + 1 stay in the band.
const BAND_EDGES: [(usize, u32); 4] = [(19, 1021), (326, 16381), (2600, 131_071), (42, 16381)];
/// Removals (of backends spread over the list) and additions (of different new
/// backends) measured per (N, M).
const TRIALS: usize = 10;
/// Builds timed per (N, M); the median is reported.
const BUILDS: usize = 21;
/// The service the simulated flows go to: 10.96.0.10:80/TCP.
const FRONTEND: (u32, u16, u8) = (0x0a60_000a, 80, 6);

/// Disruption of one change, as fractions.
#[derive(Clone, Copy, Default)]
struct Moves {
    /// Slots whose owner changed.
    slots: f64,
    /// Slots that moved between two backends present before and after.
    unnecessary: f64,
    /// Flows whose backend changed.
    flows: f64,
}

#[derive(Clone, Copy, Default)]
struct Summary {
    mean: Moves,
    worst: Moves,
    trials: usize,
}

impl Summary {
    fn of(moves: &[Moves]) -> Self {
        let count = moves.len() as f64;
        let mut summary = Summary {
            trials: moves.len(),
            ..Summary::default()
        };
        for m in moves {
            summary.mean.slots += m.slots / count;
            summary.mean.unnecessary += m.unnecessary / count;
            summary.mean.flows += m.flows / count;
            summary.worst.slots = summary.worst.slots.max(m.slots);
            summary.worst.unnecessary = summary.worst.unnecessary.max(m.unnecessary);
            summary.worst.flows = summary.worst.flows.max(m.flows);
        }
        summary
    }

    fn json(&self, ideal: f64) -> serde_json::Value {
        serde_json::json!({
            "trials": self.trials,
            "slots_moved_pct": pct(self.mean.slots),
            "unnecessary_slots_moved_pct": pct(self.mean.unnecessary),
            "flows_moved_pct": pct(self.mean.flows),
            "worst_slots_moved_pct": pct(self.worst.slots),
            "worst_unnecessary_slots_moved_pct": pct(self.worst.unnecessary),
            "worst_flows_moved_pct": pct(self.worst.flows),
            "ideal_flows_moved_pct": pct(ideal),
        })
    }
}

fn main() -> anyhow::Result<()> {
    let hashes = flow_hashes(FLOWS);
    // Backend identities as the agent forms them; the first N are the service's, the next
    // TRIALS are the ones added.
    let largest = BACKENDS.into_iter().chain(BAND_EDGES.map(|(n, _)| n)).max();
    let pool = endpoints(largest.unwrap_or(0) + TRIALS);

    println!(
        "Maglev lookup tables: {FLOWS} flows from random clients to 10.96.0.10:80/TCP, slot = flow_hash % M;"
    );
    println!(
        "one backend removed / added, mean of up to {TRIALS} different ones; moved = % of the table (slots) or of the flows"
    );
    println!(
        "{:>6} {:>5} {:>9} {:>8} {:>8} | {:>25} {:>8} {:>7} {:>13} | {:>22} {:>8} {:>7} {:>13}",
        "M",
        "N",
        "build ms",
        "busiest",
        "least",
        "remove: slots (unneeded)",
        "flows",
        "1/N",
        "x 1/N (worst)",
        "add: slots (unneeded)",
        "flows",
        "1/(N+1)",
        "x ideal (worst)"
    );
    let mut rows = Vec::new();
    let new_tables = BACKENDS.map(|n| (n, lb_common::maglev::table_size(n as u32, None), false));
    let band_edges = BAND_EDGES.map(|(n, size)| (n, size, true));
    for (n, size, band_edge) in new_tables.into_iter().chain(band_edges) {
        if band_edge
            && !rows
                .iter()
                .any(|row: &serde_json::Value| row["band_edge"] == true)
        {
            println!("services that grew or shrank within their table's band, at its edges:");
        }
        // The same size after the change: removing or adding one keeps the table's size.
        for changed in [n - 1, n, n + 1] {
            anyhow::ensure!(
                lb_common::maglev::table_size(changed as u32, Some(size)) == size,
                "{n} backends: the table size changes with {changed}"
            );
        }
        let slots: Vec<u32> = hashes
            .iter()
            .map(|&hash| maglev::flow_slot(hash, size))
            .collect();
        {
            let base: Vec<usize> = (0..n).collect();
            let before = owners(&pool, &base, size)?;

            // (b) balance.
            let mut counts = vec![0u32; n];
            for &owner in &before {
                counts[owner] += 1;
            }
            let mean = f64::from(size) / n as f64;
            let busiest = f64::from(counts.iter().copied().max().unwrap_or(0)) / mean;
            let least = f64::from(counts.iter().copied().min().unwrap_or(0)) / mean;

            // (c) build time.
            let identities: Vec<&str> = base.iter().map(|&i| pool[i].as_str()).collect();
            let mut times: Vec<Duration> = (0..BUILDS)
                .map(|_| {
                    let started = Instant::now();
                    let table = maglev::table(&identities, size);
                    let elapsed = started.elapsed();
                    std::hint::black_box(table).map(|_| elapsed)
                })
                .collect::<Result<_, _>>()?;
            times.sort();
            let build = times[BUILDS / 2];

            // (a) disruption.
            let removals: Vec<Moves> = (0..n.min(TRIALS))
                .map(|k| {
                    let removed = k * n / n.min(TRIALS);
                    let fewer: Vec<usize> =
                        base.iter().copied().filter(|&i| i != removed).collect();
                    let after = owners(&pool, &fewer, size)?;
                    Ok(moves(&before, &after, &slots, |owner| owner != removed))
                })
                .collect::<anyhow::Result<_>>()?;
            let additions: Vec<Moves> = (0..TRIALS)
                .map(|k| {
                    let added = n + k;
                    let more: Vec<usize> = base.iter().copied().chain([added]).collect();
                    let after = owners(&pool, &more, size)?;
                    Ok(moves(&before, &after, &slots, |owner| owner != added))
                })
                .collect::<anyhow::Result<_>>()?;
            let removal = Summary::of(&removals);
            let addition = Summary::of(&additions);
            let ideal_removal = 1.0 / n as f64;
            let ideal_addition = 1.0 / (n + 1) as f64;

            println!(
                "{:>6} {:>5} {:>9.3} {:>+7.2}% {:>+7.2}% | {:>14.3}% ({:>6.3}%) {:>7.3}% {:>6.3}% {:>6.2} ({:>4.2}) | {:>11.3}% ({:>6.3}%) {:>7.3}% {:>6.3}% {:>6.2} ({:>4.2})",
                size,
                n,
                ms(build),
                pct(busiest - 1.0),
                pct(least - 1.0),
                pct(removal.mean.slots),
                pct(removal.mean.unnecessary),
                pct(removal.mean.flows),
                pct(ideal_removal),
                removal.mean.flows / ideal_removal,
                removal.worst.flows / ideal_removal,
                pct(addition.mean.slots),
                pct(addition.mean.unnecessary),
                pct(addition.mean.flows),
                pct(ideal_addition),
                addition.mean.flows / ideal_addition,
                addition.worst.flows / ideal_addition,
            );
            rows.push(serde_json::json!({
                "table_size": size,
                "backends": n,
                "band_edge": band_edge,
                "build_ms_median": ms(build),
                "builds": BUILDS,
                "busiest_over_mean": busiest,
                "least_over_mean": least,
                "busiest_slots": counts.iter().max(),
                "least_slots": counts.iter().min(),
                "mean_slots": mean,
                "remove_one": removal.json(ideal_removal),
                "add_one": addition.json(ideal_addition),
            }));
        }
    }

    let json = serde_json::json!({
        "flows": FLOWS,
        "frontend": "10.96.0.10:80/TCP",
        "selection": "slot = maglev::flow_hash(saddr, daddr, sport, dport, proto) % M",
        "rows": rows,
    });
    let out = match std::env::args().skip(1).collect::<Vec<_>>().as_slice() {
        [] => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/maglev.json"),
        [flag, path] if flag == "--out" => std::path::PathBuf::from(path),
        _ => anyhow::bail!("usage: lb-bench-maglev [--out PATH]"),
    };
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// The owner of every slot, as an index into `pool`, for the backends `members` of `pool`.
fn owners(pool: &[String], members: &[usize], size: u32) -> anyhow::Result<Vec<usize>> {
    let identities: Vec<&str> = members.iter().map(|&i| pool[i].as_str()).collect();
    Ok(maglev::table(&identities, size)?
        .into_iter()
        .map(|local| members[local as usize])
        .collect())
}

/// What changed from `before` to `after`; `stays` tells the backends present in both.
fn moves(before: &[usize], after: &[usize], slots: &[u32], stays: impl Fn(usize) -> bool) -> Moves {
    let size = before.len() as f64;
    let changed = before.iter().zip(after).filter(|(old, new)| old != new);
    let slots_moved = changed.clone().count();
    let unnecessary = changed
        .filter(|&(&old, &new)| stays(old) && stays(new))
        .count();
    let flows_moved = slots
        .iter()
        .filter(|&&slot| before[slot as usize] != after[slot as usize])
        .count();
    Moves {
        slots: slots_moved as f64 / size,
        unnecessary: unnecessary as f64 / size,
        flows: flows_moved as f64 / slots.len() as f64,
    }
}

/// Hashes of `count` flows from random clients (any address, ephemeral ports 1024..65535) to the
/// frontend, with a fixed-seed splitmix64 so every run sees the same flows.
fn flow_hashes(count: usize) -> Vec<u32> {
    let mut state = 0x6c62_2d6d_6167_6c65u64;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let (daddr, dport, proto) = FRONTEND;
    (0..count)
        .map(|_| {
            let random = next();
            let saddr = random as u32;
            let sport = 1024 + ((random >> 32) % 64_512) as u16;
            maglev::flow_hash(saddr, daddr, sport, dport, proto)
        })
        .collect()
}

/// `count` endpoint identities as the agent forms them ("address:port/protocol number").
fn endpoints(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| format!("10.244.{}.{}:8080/6", i / 250, i % 250 + 1))
        .collect()
}

fn pct(fraction: f64) -> f64 {
    fraction * 100.0
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
