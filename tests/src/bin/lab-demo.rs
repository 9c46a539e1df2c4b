//! `cargo xtask demo`: builds the lab of ../shared/design.md, attaches the datapath to node1's NIC,
//! drives real TCP and UDP traffic through it and shows what the datapath counted. Removes the lab
//! at the end (also on failure: the lab's guards do it).

use std::{ffi::CString, time::Duration};

use anyhow::Context as _;
use aya::programs::XdpMode;
use lab::{
    lab::Lab,
    peer::{self, ClientRun},
    topology::{Cluster, ClusterSpec, FABRIC_IFACE, node_addr, pod_addr},
};
use lb_userspace::counter::XdpCounter;

const PORT: u16 = 8080;
const REQUESTS: u64 = 200;

fn main() -> anyhow::Result<()> {
    let mut lab = Lab::new()?;
    let cluster = Cluster::build(&mut lab, &ClusterSpec::default())?;
    println!(
        "lab {}: namespaces {}",
        lab.prefix(),
        lab.namespaces().join(", ")
    );

    let node1 = &cluster.node(1).host;
    let mut servers = vec![peer::serve(node1, "node1", PORT)?];
    for pod in cluster.pods() {
        servers.push(peer::serve(&pod.host, pod.host.name(), PORT)?);
    }

    let mut counter = XdpCounter::load().context("loading the eBPF object")?;
    {
        let _inside = node1.enter()?;
        let iface = CString::new(FABRIC_IFACE)?;
        counter
            .attach(iface.as_c_str(), XdpMode::Driver)
            .context("attaching XDP in native mode")?;
    }
    println!("lb_xdp_count attached in native (driver) mode to node1/{FABRIC_IFACE}\n");
    let before = node1.link_stats(FABRIC_IFACE)?;

    let to_node1 = format!("{}:{PORT}", node_addr(1));
    let to_remote_pod = format!("{}:{PORT}", pod_addr(2, 0));
    let runs = [
        (
            "client -> node1",
            &cluster.client,
            ClientRun::tcp(&to_node1, REQUESTS),
        ),
        (
            "client -> node1",
            &cluster.client,
            ClientRun::udp(&to_node1, REQUESTS),
        ),
        (
            "pod n1p0 -> pod n2p0",
            &cluster.node(1).pods[0].host,
            ClientRun::tcp(&to_remote_pod, REQUESTS),
        ),
    ];
    println!(
        "{:<22} {:<5} {:>8} {:>6} {:>7}  seen by server as",
        "traffic", "proto", "requests", "ok", "errors"
    );
    for (label, host, run) in &runs {
        let report = run.run(host, None)?;
        let peers: Vec<&String> = report.peers_seen.keys().collect();
        println!(
            "{label:<22} {:<5} {:>8} {:>6} {:>7}  {peers:?}",
            run.protocol, report.attempts, report.ok, report.errors
        );
    }

    std::thread::sleep(Duration::from_millis(200));
    let after = node1.link_stats(FABRIC_IFACE)?;
    println!("\nwhat XDP counted on node1/{FABRIC_IFACE} (per-CPU map, summed):");
    println!("{:<12} {:>9} {:>10}", "class", "packets", "bytes");
    let mut total = 0;
    for count in counter.read()? {
        total += count.counter.packets;
        println!(
            "{:<12} {:>9} {:>10}",
            count.label, count.counter.packets, count.counter.bytes
        );
    }
    let received = after.rx_packets - before.rx_packets;
    println!(
        "{:<12} {:>9}   (the NIC's own rx counter: {received}{})",
        "total",
        total,
        if received == total {
            ", equal"
        } else {
            ", DIFFERENT"
        }
    );
    drop(servers);
    drop(counter);
    let prefix = lab.prefix().to_owned();
    drop(lab);
    println!("\nlab {prefix} removed");
    Ok(())
}
