//! Printing for `lb services`, `lb backends`, `lb conntrack` and `lb stats`: aligned tables, or
//! JSON with `-o json`.

use std::path::Path;

use super::inspect::{ConntrackFilter, PinnedMaps};
use serde::Serialize;

pub fn services(pin_dir: &Path, json: bool) -> anyhow::Result<()> {
    let services = PinnedMaps::open(pin_dir)?.services()?;
    if json {
        return print_json(&services);
    }
    let mut rows = vec![row(&[
        "ID",
        "SERVICE",
        "FRONTENDS",
        "BACKENDS",
        "POLICY",
        "PACKETS",
        "BYTES",
        "NEW FLOWS",
    ])];
    for service in &services {
        let mut policy = Vec::new();
        if service.local_only {
            policy.push("local".to_owned());
        }
        if service.maglev {
            policy.push("maglev".to_owned());
        }
        if service.direct_return {
            policy.push("dsr".to_owned());
        }
        if service.affinity_timeout_s != 0 {
            policy.push(format!("affinity={}s", service.affinity_timeout_s));
        }
        if !service.source_ranges.is_empty() {
            policy.push(format!("ranges={}", service.source_ranges.join("+")));
        }
        rows.push(vec![
            service.id.to_string(),
            service.name.clone(),
            service.frontends.join(" "),
            or_dash(service.backends.join(" ")),
            or_dash(policy.join(",")),
            service.packets.to_string(),
            service.bytes.to_string(),
            service.new_flows.to_string(),
        ]);
    }
    print_table(&rows);
    Ok(())
}

pub fn backends(pin_dir: &Path, json: bool) -> anyhow::Result<()> {
    let backends = PinnedMaps::open(pin_dir)?.backends()?;
    if json {
        return print_json(&backends);
    }
    let mut rows = vec![row(&["ID", "ADDRESS", "PROTO", "FLAGS", "SERVICES"])];
    for backend in &backends {
        let flags: Vec<&str> = [
            (backend.local, "local"),
            (backend.terminating, "terminating"),
            (backend.dsr_node, "dsr-node"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect();
        rows.push(vec![
            backend.id.to_string(),
            backend.address.clone(),
            backend.protocol.to_owned(),
            or_dash(flags.join(",")),
            or_dash(backend.services.join(" ")),
        ]);
    }
    print_table(&rows);
    Ok(())
}

pub fn conntrack(pin_dir: &Path, filter: &ConntrackFilter, json: bool) -> anyhow::Result<()> {
    let entries = PinnedMaps::open(pin_dir)?.conntrack(filter)?;
    if json {
        return print_json(&entries);
    }
    let mut rows = vec![row(&[
        "DIR",
        "PROTO",
        "SOURCE",
        "DESTINATION",
        "NAT",
        "SNAT",
        "STATE",
        "SERVICE",
        "BACKEND",
        "IDLE",
    ])];
    for entry in &entries {
        rows.push(vec![
            entry.direction.to_owned(),
            entry.protocol.to_owned(),
            entry.source.clone(),
            entry.destination.clone(),
            entry.nat.clone(),
            match (&entry.snat, entry.direct_return) {
                (Some(snat), _) => snat.clone(),
                (None, true) => "dsr".into(),
                (None, false) => "-".into(),
            },
            if entry.expired {
                format!("{} (expired)", entry.state)
            } else {
                entry.state.to_owned()
            },
            entry.service_id.to_string(),
            entry.backend_id.to_string(),
            format!("{:.0}s", entry.idle_s),
        ]);
    }
    print_table(&rows);
    Ok(())
}

pub fn stats(pin_dir: &Path, json: bool) -> anyhow::Result<()> {
    let stats = PinnedMaps::open(pin_dir)?.stats()?;
    if json {
        return print_json(&stats);
    }
    let mut rows = vec![row(&["EVENT", "COUNT"])];
    rows.extend(
        stats
            .events
            .iter()
            .map(|(event, count)| vec![(*event).to_owned(), count.to_string()]),
    );
    print_table(&rows);
    println!();
    let mut rows = vec![row(&[
        "CACHE", "FAMILY", "PROTOCOL", "HITS", "MISSES", "CLOSINGS",
    ])];
    rows.extend(stats.flow_caches.iter().map(|cache| {
        vec![
            cache.hook.to_owned(),
            cache.ip_family.to_owned(),
            cache.protocol.to_owned(),
            cache.hits.to_string(),
            cache.misses.to_string(),
            cache.closings.to_string(),
        ]
    }));
    print_table(&rows);
    println!();
    let mut rows = vec![row(&["MAP", "ENTRIES", "CAPACITY", "FILL"])];
    for map in &stats.maps {
        rows.push(vec![
            map.map.to_owned(),
            map.entries.to_string(),
            map.capacity.to_string(),
            format!(
                "{:.1}%",
                100.0 * map.entries as f64 / map.capacity.max(1) as f64
            ),
        ]);
    }
    print_table(&rows);
    println!();
    match stats.snat_address {
        Some(address) => println!("SNAT address: {address}"),
        None => println!("SNAT address: none (flows to other nodes' endpoints are not SNATed)"),
    }
    match stats.snat_address6 {
        Some(address) => println!("IPv6 SNAT address: {address}"),
        None => println!(
            "IPv6 SNAT address: none (IPv6 flows to other nodes' endpoints are not SNATed)"
        ),
    }
    Ok(())
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|cell| (*cell).to_owned()).collect()
}

fn or_dash(text: String) -> String {
    if text.is_empty() { "-".into() } else { text }
}

/// Columns padded to their widest cell; the last column is not padded.
fn print_table(rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|column| {
            rows.iter()
                .filter_map(|row| row.get(column))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::new();
        for (column, cell) in row.iter().enumerate() {
            if column + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[column]));
            }
        }
        println!("{}", line.trim_end());
    }
}
