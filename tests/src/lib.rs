//! The lab and the helpers of the integration tests (tests/tests/*.rs) and the demo.
//!
//! - [`admission`]: deploy/admission-policy.yaml evaluated as the API server would (CEL);
//! - [`agent`]: the real `lb` agent on a lab node, fed by manifests the test writes;
//! - [`fake_apiserver`] and [`kube_agent`]: a fake Kubernetes API server, and the real agent
//!   (`lb run --source kube`) reading it;
//! - [`lab`]: network namespaces, veth pairs, bridges, processes and cgroups, all removed by guards;
//! - [`topology`]: the client / fabric / nodes / pods layout of docs/lab.md;
//! - [`peer`]: the `lab-peer` TCP/UDP servers and clients and their reports;
//! - [`nft`]: nftables rules in a lab host (a SYN lost on its way to an endpoint);
//! - [`packet`], [`packet6`] and [`table`]: crafted frames (IPv4, IPv6) and table-driven
//!   `BPF_PROG_TEST_RUN` tests;
//! - [`maglev_reference`]: Maglev's table and flow hash built apart from the code under test;
//! - [`bare_xdp`]: a two-instruction XDP_PASS program, the per-packet bench's floor;
//! - [`private_bpffs`]: a bpffs mount no one else sees, for tests of the pin directory's checks;
//! - [`previous`]: the agent of an earlier release, built from this clone's history (the upgrade row);
//! - [`soak`]: the reliability suite's fault scenarios under load (`lb-soak`, tests/tests/reliability.rs).

pub mod admission;
pub mod agent;
pub mod bare_xdp;
pub mod fake_apiserver;
pub mod http;
pub mod jit_lines;
pub mod kube_agent;
pub mod lab;
pub mod maglev_reference;
pub mod nft;
pub mod node;
pub mod packet;
pub mod packet6;
pub mod peer;
pub mod previous;
pub mod private_bpffs;
pub mod soak;
pub mod table;
pub mod topology;
pub mod two_nics;

/// Writes a bench's report as pretty JSON to `path` (its directory created when missing) and
/// says where on stdout.
pub fn write_json_report(
    path: &std::path::Path,
    report: &impl serde::Serialize,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(report)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!("\nJSON: {}", path.display());
    Ok(())
}

/// The IPv4 address of a model value (a `Frontend` or `Backend` address) that a test made
/// IPv4; an IPv6 one is a test's mistake.
pub fn ipv4(addr: std::net::IpAddr) -> std::net::Ipv4Addr {
    match addr {
        std::net::IpAddr::V4(addr) => addr,
        std::net::IpAddr::V6(addr) => panic!("{addr} is not an IPv4 address"),
    }
}
