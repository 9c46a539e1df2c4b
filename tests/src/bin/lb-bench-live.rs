//! Live frames through the datapath's XDP program, attached natively to a veth: how many frames a
//! second lb serves against the cheapest XDP program on the same path.
//!
//! Lab: a generator host and a node host joined by three veth pairs, and a pod host behind a
//! fourth veth of the node's (`p0`, the pod's `eth0`, as a CNI wires a pod). On the node, `n0`
//! carries lb's XDP program (a private pin directory), `n1` a bare XDP_DROP program (the floor)
//! and `n2` a bare XDP_PASS program (the stack's own cost). The generator sends UDP frames of
//! one flow with `BPF_PROG_TEST_RUN` in live-frame mode (`BPF_F_TEST_XDP_LIVE_FRAMES`): a tiny
//! program writes the frame's headers afresh and sends it out of a veth (XDP_TX), and the node's
//! program runs on it in the veth's NAPI poll, on the same CPU, between the generator's batches.
//! The rate is the frames the node's program ran on (the veth's `xdp_packets` count) over the
//! run's time; a frame the generator sent that never reached the node's program counts as lost.
//!
//! Paths:
//! - `floor: XDP_DROP` on `n1`;
//! - `bare XDP_PASS to a socket` on `n2`: frames to a UDP socket of the node that never reads
//!   (the stack drops them at its full buffer);
//! - `lb: remote endpoint, XDP_TX`: a NodePort whose endpoint is on "another node" (the
//!   generator's side): DNAT and SNAT, sent back out of `n0` to the generator, whose XDP drops it;
//! - `lb: local endpoint, XDP_PASS to a socket`: a NodePort whose endpoint is the socket above;
//! - `lb: no service, XDP_PASS to a socket`: frames straight to the socket through lb's program;
//! - `lb: pod endpoint, DNAT, XDP_PASS, forwarded into its veth`: a NodePort whose endpoint is a
//!   UDP socket of the pod (never read); the node's stack forwards each frame into `p0`, and the
//!   pod's stack takes it on the same CPU. The bench checks that the pod's IP layer handed every
//!   frame on to its UDP.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::OwnedFd,
    path::PathBuf,
    time::Instant,
};

use anyhow::{Context as _, ensure};
use aya::programs::XdpMode;
use clap::Parser;
use lab::{
    bare_xdp,
    lab::{Host, Lab, PinDir},
    packet,
};
use lb_common::{DatapathConfig, backend_flags, proto, service_flags};
use lb_userspace::{
    compile::model::{Backend, Frontend, Service},
    datapath::{Datapath, testrun::test_run_live},
};
use serde::Serialize;

/// The generator's and the node's address on the pair with index `pair`.
fn generator_addr(pair: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, pair, 1)
}
fn node_addr(pair: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, pair, 2)
}
/// The socket of the node the passing paths deliver to (an address of its loopback).
const LOCAL_ENDPOINT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 10), 8080);
/// An endpoint "on another node": routed back through the generator.
const REMOTE_ENDPOINT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 10), 8080);
const REMOTE_NODE_PORT: u16 = 30080;
const LOCAL_NODE_PORT: u16 = 30081;
/// An endpoint in a pod of the node, behind its veth.
const POD_ENDPOINT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 244, 3, 10), 8080);
const POD_NODE_PORT: u16 = 30082;
const CLIENT_PORT: u16 = 40_000;
/// Bytes the generator writes over each frame: Ethernet, IPv4 and UDP headers (42), rounded up
/// to whole words.
const HEADER_LEN: usize = 44;
/// The UDP payload: a 60-byte frame, Ethernet's minimum without the FCS.
const PAYLOAD: [u8; 18] = [0x5a; 18];

#[derive(Parser)]
#[command(about = "Frames per second through lb's native XDP program on a veth, live frames")]
struct Args {
    /// Frames per measurement.
    #[arg(long, default_value_t = 1_000_000)]
    frames: u32,
    /// Measurements per path, interleaved over the paths.
    #[arg(long, default_value_t = 7)]
    rounds: u32,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/bench/live.json")]
    out: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Floor,
    BarePass,
    LbRemote,
    LbLocal,
    LbMiss,
    LbPod,
}

impl Path {
    const ALL: [Path; 6] = [
        Path::Floor,
        Path::BarePass,
        Path::LbRemote,
        Path::LbLocal,
        Path::LbMiss,
        Path::LbPod,
    ];

    fn key(self) -> &'static str {
        match self {
            Path::Floor => "floor_xdp_drop",
            Path::BarePass => "bare_xdp_pass_to_socket",
            Path::LbRemote => "lb_remote_endpoint_xdp_tx",
            Path::LbLocal => "lb_local_endpoint_xdp_pass",
            Path::LbMiss => "lb_no_service_xdp_pass",
            Path::LbPod => "lb_pod_endpoint_xdp_pass",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Path::Floor => "floor: XDP_DROP",
            Path::BarePass => "bare XDP_PASS to a socket",
            Path::LbRemote => "lb: remote endpoint, DNAT+SNAT, XDP_TX",
            Path::LbLocal => "lb: local endpoint, DNAT, XDP_PASS to a socket",
            Path::LbMiss => "lb: no service, XDP_PASS to a socket",
            Path::LbPod => "lb: pod endpoint, DNAT, XDP_PASS, forwarded into its veth",
        }
    }

    /// The veth pair the path's frames cross.
    fn pair(self) -> u8 {
        match self {
            Path::Floor => 1,
            Path::BarePass => 2,
            Path::LbRemote | Path::LbLocal | Path::LbMiss | Path::LbPod => 0,
        }
    }

    fn destination(self) -> SocketAddrV4 {
        match self {
            Path::Floor | Path::BarePass | Path::LbMiss => LOCAL_ENDPOINT,
            Path::LbRemote => SocketAddrV4::new(node_addr(0), REMOTE_NODE_PORT),
            Path::LbLocal => SocketAddrV4::new(node_addr(0), LOCAL_NODE_PORT),
            Path::LbPod => SocketAddrV4::new(node_addr(0), POD_NODE_PORT),
        }
    }
}

#[derive(Serialize)]
struct PathReport {
    path: &'static str,
    label: &'static str,
    /// Million frames a second the node's program ran on, per round.
    mpps: Vec<f64>,
    median_mpps: f64,
    /// The median as a fraction of the floor's.
    of_floor: f64,
    /// Frames sent that the node's program never ran on, all rounds.
    lost: u64,
}

#[derive(Serialize)]
struct Report {
    frames_per_round: u32,
    rounds: u32,
    frame_bytes: usize,
    paths: Vec<PathReport>,
    load_average_before: String,
    load_average_after: String,
}

/// The lab and everything attached in it; dropping it detaches and removes all of it.
struct LiveLab {
    // Field order is drop order: programs and links before the namespaces they live in.
    _generator_links: Vec<OwnedFd>,
    _node_links: Vec<OwnedFd>,
    datapath: Datapath,
    _socket: UdpSocket,
    _pod_socket: UdpSocket,
    generator_program: Vec<(Path, OwnedFd, Vec<u8>)>,
    _pins: PinDir,
    generator: Host,
    node: Host,
    pod: Host,
    _lab: Lab,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let load_average_before = lab::lab::load_average();
    let lab = LiveLab::new().context("building the live-frame lab")?;
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); Path::ALL.len()];
    let mut lost = vec![0u64; Path::ALL.len()];
    // One unmeasured round first: the flows are created and every cache is warm.
    for path in Path::ALL {
        lab.measure(path, args.frames.min(10_000))?;
    }
    for _ in 0..args.rounds {
        for (index, path) in Path::ALL.into_iter().enumerate() {
            let (mpps, missing) = lab.measure(path, args.frames)?;
            samples[index].push(mpps);
            lost[index] += missing;
        }
    }
    let medians: Vec<f64> = samples.iter().map(|s| median(s)).collect();
    let floor = medians[0];
    let paths: Vec<PathReport> = Path::ALL
        .into_iter()
        .zip(samples)
        .zip(&medians)
        .zip(lost)
        .map(|(((path, mpps), &median_mpps), lost)| PathReport {
            path: path.key(),
            label: path.label(),
            mpps,
            median_mpps,
            of_floor: median_mpps / floor,
            lost,
        })
        .collect();
    println!(
        "live frames: {} rounds of {} frames of {} bytes per path, interleaved; median Mpps \
         the node's program ran at, and as a fraction of the XDP_DROP floor",
        args.rounds,
        args.frames,
        HEADER_LEN - 2 + PAYLOAD.len()
    );
    println!("\n| path | Mpps | of the floor | frames lost |\n|---|---:|---:|---:|");
    for path in &paths {
        println!(
            "| {} | {:.2} | {:.2}x | {} |",
            path.label, path.median_mpps, path.of_floor, path.lost
        );
    }
    let report = Report {
        frames_per_round: args.frames,
        rounds: args.rounds,
        frame_bytes: HEADER_LEN - 2 + PAYLOAD.len(),
        paths,
        load_average_before,
        load_average_after: lab::lab::load_average(),
    };
    lab::write_json_report(&args.out, &report)
}

impl LiveLab {
    fn new() -> anyhow::Result<Self> {
        let mut lab = Lab::new()?;
        let generator = lab.host("gen")?;
        let node = lab.host("node")?;
        for pair in 0..3 {
            let (g, n) = (format!("g{pair}"), format!("n{pair}"));
            lab.veth(&generator, &g, &node, &n)?;
            generator.addr(&g, &format!("{}/24", generator_addr(pair)))?;
            node.addr(&n, &format!("{}/24", node_addr(pair)))?;
        }
        node.addr("lo", &format!("{}/32", LOCAL_ENDPOINT.ip()))?;
        node.route(&["10.244.2.0/24", "via", &generator_addr(0).to_string()])?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        // XDP's FIB lookup sends a frame itself only when the next hop's MAC is known.
        let generator_mac = generator.mac("g0")?;
        node.ip(&[
            "neigh",
            "replace",
            &generator_addr(0).to_string(),
            "lladdr",
            &format_mac(generator_mac),
            "dev",
            "n0",
            "nud",
            "permanent",
        ])?;

        let socket = {
            let _inside = node.enter()?;
            UdpSocket::bind(LOCAL_ENDPOINT).context("binding the node's socket")?
        };
        let pod = lab.host("pod")?;
        let pod_socket = pod_behind_a_veth(&lab, &node, &pod)?;

        let pins = PinDir::new(&lab, "live")?;
        let mut datapath = Datapath::load(pins.path())?;
        datapath.set_config(&DatapathConfig {
            snat_addr: u32::from(node_addr(0)),
            snat_port_min: 20_000,
            snat_port_max: 29_999,
            ..Default::default()
        })?;
        for (id, endpoint, flags) in [
            (1, REMOTE_ENDPOINT, 0),
            (2, LOCAL_ENDPOINT, backend_flags::LOCAL),
            (3, POD_ENDPOINT, backend_flags::LOCAL),
        ] {
            datapath.put_backend(
                id,
                &Backend {
                    addr: std::net::IpAddr::V4(*endpoint.ip()),
                    port: endpoint.port(),
                    proto: proto::UDP,
                    flags,
                },
            )?;
        }
        for (id, port, backend) in [
            (1, REMOTE_NODE_PORT, 1),
            (2, LOCAL_NODE_PORT, 2),
            (3, POD_NODE_PORT, 3),
        ] {
            datapath.put_service(&Service {
                id,
                frontends: vec![Frontend {
                    addr: node_addr(0).into(),
                    port,
                    proto: proto::UDP,
                    kind: service_flags::NODE_PORT,
                }],
                backends: vec![backend],
                ..Default::default()
            })?;
        }
        let mut node_links = Vec::new();
        {
            let _inside = node.enter()?;
            datapath.attach_xdp("n0", XdpMode::Driver)?;
            let floor = bare_xdp::load_returning(bare_xdp::XDP_DROP, "lb_live_drop")?;
            node_links.push(bare_xdp::attach_native(&floor, node.ifindex("n1")?)?);
            let pass = bare_xdp::load_returning(bare_xdp::XDP_PASS, "lb_live_pass")?;
            node_links.push(bare_xdp::attach_native(&pass, node.ifindex("n2")?)?);
        }
        // Frames lb sends back to the generator end there; a veth delivers XDP frames only to a
        // peer with an XDP program.
        let mut generator_links = Vec::new();
        {
            let _inside = generator.enter()?;
            let sink = bare_xdp::load_returning(bare_xdp::XDP_DROP, "lb_live_sink")?;
            for pair in 0..3 {
                generator_links.push(bare_xdp::attach_native(
                    &sink,
                    generator.ifindex(&format!("g{pair}"))?,
                )?);
            }
        }

        let mut generator_program = Vec::new();
        for path in Path::ALL {
            let pair = path.pair();
            let mut frame = packet::udp(
                SocketAddrV4::new(generator_addr(pair), CLIENT_PORT),
                path.destination(),
                &PAYLOAD,
            );
            frame[0..6].copy_from_slice(&node.mac(&format!("n{pair}"))?);
            frame[6..12].copy_from_slice(&generator.mac(&format!("g{pair}"))?);
            let program = bare_xdp::load_generator(&frame[..HEADER_LEN])?;
            generator_program.push((path, program, frame));
        }
        Ok(Self {
            _generator_links: generator_links,
            _node_links: node_links,
            datapath,
            _socket: socket,
            _pod_socket: pod_socket,
            generator_program,
            _pins: pins,
            generator,
            node,
            pod,
            _lab: lab,
        })
    }

    /// Sends `frames` frames of the path's flow; returns the rate the node's program ran at
    /// (million frames a second) and how many frames never reached it. Checks that lb did with
    /// every frame what the path is about: counted for its service and sent back to the
    /// generator (remote endpoint), counted and passed (local endpoint; for a pod's, its IP layer
    /// delivering every frame), or left alone.
    fn measure(&self, path: Path, frames: u32) -> anyhow::Result<(f64, u64)> {
        let (_, program, frame) = self
            .generator_program
            .iter()
            .find(|(p, _, _)| *p == path)
            .context("a generator for every path")?;
        let pair = path.pair();
        let receiver = format!("n{pair}");
        let before = xdp_packets(&self.node, &receiver)?;
        let returned_before = xdp_packets(&self.generator, &format!("g{pair}"))?;
        let counted_before = self.service_packets()?;
        let pod_before = pod_ip_delivered(&self.pod)?;
        let ifindex = self.generator.ifindex(&format!("g{pair}"))?;
        let elapsed = {
            let _inside = self.generator.enter()?;
            let started = Instant::now();
            test_run_live(program, frame, ifindex, frames)
                .with_context(|| format!("{}: live frames", path.label()))?;
            started.elapsed()
        };
        let received = xdp_packets(&self.node, &receiver)? - before;
        ensure!(
            received > 0,
            "{}: no frame reached the node's program",
            path.label()
        );
        let returned = xdp_packets(&self.generator, &format!("g{pair}"))? - returned_before;
        let counted = self.service_packets()?;
        let counted: [u64; 3] = std::array::from_fn(|i| counted[i] - counted_before[i]);
        let expected = match path {
            Path::LbRemote => ([received, 0, 0], received),
            Path::LbLocal => ([0, received, 0], 0),
            Path::LbPod => ([0, 0, received], 0),
            Path::Floor | Path::BarePass | Path::LbMiss => ([0, 0, 0], 0),
        };
        ensure!(
            (counted, returned) == expected,
            "{}: {received} frames reached the node's program; the services counted {counted:?} \
             and {returned} came back to the generator (expected {expected:?})",
            path.label()
        );
        let at_pod = pod_ip_delivered(&self.pod)? - pod_before;
        let expected_at_pod = if path == Path::LbPod { received } else { 0 };
        ensure!(
            at_pod == expected_at_pod,
            "{}: {received} frames reached the node's program and {at_pod} packets the pod's \
             transport layer (expected {expected_at_pod})",
            path.label()
        );
        let lost = u64::from(frames).saturating_sub(received);
        Ok((received as f64 / elapsed.as_secs_f64() / 1e6, lost))
    }

    /// Packets lb counted for the remote-endpoint, the local-endpoint and the pod's service.
    fn service_packets(&self) -> anyhow::Result<[u64; 3]> {
        Ok([
            self.datapath.service_counter(1)?.packets,
            self.datapath.service_counter(2)?.packets,
            self.datapath.service_counter(3)?.packets,
        ])
    }
}

/// Wires `pod` to the node as a CNI does (a veth, the pod's address on its end, a host route to
/// it on the node's) and binds the pod's UDP socket, which never reads.
fn pod_behind_a_veth(lab: &Lab, node: &Host, pod: &Host) -> anyhow::Result<UdpSocket> {
    lab.veth(node, "p0", pod, "eth0")?;
    pod.addr("eth0", &format!("{}/32", POD_ENDPOINT.ip()))?;
    pod.ip(&["route", "add", "default", "dev", "eth0"])?;
    node.route(&[&format!("{}/32", POD_ENDPOINT.ip()), "dev", "p0"])?;
    // Known in advance, as the generator's is: no frame waits for neighbour discovery.
    node.ip(&[
        "neigh",
        "replace",
        &POD_ENDPOINT.ip().to_string(),
        "lladdr",
        &format_mac(pod.mac("eth0")?),
        "dev",
        "p0",
        "nud",
        "permanent",
    ])?;
    let _inside = pod.enter()?;
    UdpSocket::bind(POD_ENDPOINT).context("binding the pod's socket")
}

/// Packets the pod's IP layer handed to its transport layer (`Ip: InDelivers` of its
/// /proc/net/snmp): every datagram for the socket, queued or dropped at its full buffer (UDP's
/// `InDatagrams` counts only those the application reads).
fn pod_ip_delivered(pod: &Host) -> anyhow::Result<u64> {
    let snmp = pod.run("cat", &["/proc/net/snmp"])?;
    let mut ip = snmp.lines().filter(|line| line.starts_with("Ip:"));
    let (Some(names), Some(values)) = (ip.next(), ip.next()) else {
        anyhow::bail!("no Ip lines in the pod's /proc/net/snmp");
    };
    let column = names
        .split_whitespace()
        .position(|field| field == "InDelivers")
        .context("no InDelivers in the pod's Ip counters")?;
    values
        .split_whitespace()
        .nth(column)
        .context("a short Ip line in the pod's /proc/net/snmp")?
        .parse()
        .context("the pod's InDelivers")
}

/// Frames the XDP program of a veth ran on (the lab's veths have one queue).
fn xdp_packets(host: &Host, iface: &str) -> anyhow::Result<u64> {
    host.nic_stat(iface, "rx_queue_0_xdp_packets")
}

fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|byte| format!("{byte:02x}")).join(":")
}

fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}
