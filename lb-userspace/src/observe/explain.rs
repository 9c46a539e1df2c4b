//! `lb explain`: which service and endpoint a packet would reach, and why, asked of the running
//! datapath itself. The pinned maps of the agent are read (never written) to tell the reasons,
//! and a private copy of the real XDP program, loaded on the same maps with DRY_RUN set (it
//! decides as usual but writes no conntrack, affinity or counter entry), runs on a synthesized
//! packet through BPF_PROG_TEST_RUN: its verdict and output packet are what the datapath does.
//!
//! A client on this node (a pod, or a host process) never meets XDP for a Service address: the
//! socket hooks translate its connect() or sendto() before any packet exists. For such a client
//! the explanation is the socket hooks', from the maps alone: the kernel cannot run a cgroup
//! sock_addr program on a synthesized call (BPF_PROG_TEST_RUN has no runner for that type).
//!
//! An IPv6 destination is explained as for IPv4: by the socket hooks' maps for a client on this
//! node, by the dry-run XDP programs for one arriving on a NIC.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::Path,
};

use anyhow::Context as _;
use aya::{EbpfLoader, maps::lpm_trie::Key as LpmKey, programs::Xdp};
use lb_common::{
    Affinity4Key, AffinityValue, Ct4Key, Ct4Value, Flow4Value, Frontend4Key, Frontend6Key,
    ServiceValue, SourceRange4, ct_direction, ct_flags, flow_key, program_names, proto, scope,
    service_flags,
};
use serde::Serialize;

use crate::{
    compile::model::{ipv6_of_words, ipv6_words},
    datapath::{
        bpf_obj::Access, ebpf_log::EbpfLogLevel, maps::Maps, object::DATAPATH_OBJECT,
        testrun::test_run,
    },
};

const IPPROTO_ICMP: u8 = 1;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

/// Which part of the datapath meets the client's traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    /// Decided from where the client is: on this node (by route) with the socket hooks
    /// attached, the socket hooks; otherwise XDP on the NIC.
    Auto,
    /// The socket hooks: a pod or host process of this node.
    Socket,
    /// XDP: a packet arriving on one of the node's NICs.
    Xdp,
}

/// What the datapath does with one packet, and why.
#[derive(Debug, Serialize)]
pub struct Explanation {
    pub packet: String,
    /// Which hook decides: "xdp" or "socket".
    pub hook: Hook,
    /// XDP: "pass", "drop", "tx" (sent back out of the NIC) as the program returned it.
    /// Socket hooks: "translated" (the call goes to a backend), "refused" (the call fails) or
    /// "untouched".
    pub verdict: &'static str,
    /// The service the destination belongs to: id, frontend kinds and policy flags.
    pub service: Option<ServiceSummary>,
    /// Where the packet went, as rewritten by the program (source and destination).
    pub rewritten: Option<(String, String)>,
    /// What XDP sent back to the client instead (a TCP RST, an ICMP error), described.
    pub answer: Option<String>,
    /// The decisions, in the order the datapath takes them.
    pub reasons: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ServiceSummary {
    pub id: u32,
    pub kinds: Vec<&'static str>,
    pub backends: u16,
    pub local_only: bool,
    pub source_ranges: bool,
    pub maglev: bool,
    pub affinity_timeout_s: u32,
}

/// Explains a TCP SYN (or a UDP datagram) from `client` to `destination`: arriving on a node
/// NIC, or, from a pod or host process of this node, as the socket hooks see its call.
pub fn explain(
    pin_dir: &Path,
    client: SocketAddr,
    destination: SocketAddr,
    protocol: u8,
    path: Hook,
) -> anyhow::Result<Explanation> {
    // A dual-stack socket's IPv4-mapped addresses are IPv4 to the hooks (and on the wire).
    let unmapped = |addr: SocketAddr| match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    };
    match (unmapped(client), unmapped(destination)) {
        (SocketAddr::V4(client), SocketAddr::V4(destination)) => {
            explain4(pin_dir, client, destination, protocol, path)
        }
        (SocketAddr::V6(_), SocketAddr::V6(_)) => {
            explain6(pin_dir, client, destination, protocol, path)
        }
        _ => anyhow::bail!("{client} and {destination} are of different address families"),
    }
}

/// An IPv6 destination: the socket hooks' decision, from the IPv6 maps; on a NIC, the dry-run
/// XDP program's.
fn explain6(
    pin_dir: &Path,
    client: SocketAddr,
    destination: SocketAddr,
    protocol: u8,
    path: Hook,
) -> anyhow::Result<Explanation> {
    let mut reasons = Vec::new();
    let packet = format!("{client} -> {destination}/{}", protocol_name(protocol));
    let (SocketAddr::V6(client6), SocketAddr::V6(destination6)) = (client, destination) else {
        unreachable!("explain6 takes IPv6 addresses")
    };
    let path = match path {
        Hook::Auto => decide_path(pin_dir, (*client6.ip()).into(), &mut reasons),
        chosen => chosen,
    };
    if path == Hook::Xdp {
        return explain6_on_nic(pin_dir, client6, destination6, protocol, reasons);
    }
    let maps = Maps::open(pin_dir, Access::ReadOnly)?;
    let entry = |scope| -> anyhow::Result<Option<ServiceValue>> {
        let SocketAddr::V6(destination) = destination else {
            unreachable!("explain6 takes IPv6 destinations")
        };
        let key = Frontend6Key {
            addr: ipv6_words(*destination.ip()),
            port: destination.port().to_be(),
            proto: protocol,
            scope,
        };
        Ok(maps.frontends6.get(&key, 0).ok())
    };
    let service = node_clients_entry(
        entry(scope::ANY)?,
        || entry(scope::NODE_CLIENTS),
        &mut reasons,
    )?;
    let verdict = explain_socket(
        &maps,
        client,
        destination,
        protocol,
        service.as_ref(),
        &mut reasons,
    )?;
    Ok(Explanation {
        packet,
        hook: Hook::Socket,
        verdict,
        service: service.map(|value| summarize(&value)),
        rewritten: None,
        answer: None,
        reasons,
    })
}

/// An IPv6 packet arriving on a NIC: the frontend it is for, and what the dry-run XDP program
/// does with it.
fn explain6_on_nic(
    pin_dir: &Path,
    client: SocketAddrV6,
    destination: SocketAddrV6,
    protocol: u8,
    mut reasons: Vec<String>,
) -> anyhow::Result<Explanation> {
    let maps = Maps::open(pin_dir, Access::ReadOnly)?;
    let key = Frontend6Key {
        addr: ipv6_words(*destination.ip()),
        port: destination.port().to_be(),
        proto: protocol,
        scope: scope::ANY,
    };
    let service = maps.frontends6.get(&key, 0).ok();
    match &service {
        None => reasons.push(format!(
            "{destination}/{} is no service frontend: the packet passes untouched",
            protocol_name(protocol)
        )),
        Some(value) => reasons.push(format!(
            "{destination}/{} is a frontend of service {} ({} backends)",
            protocol_name(protocol),
            value.service_id,
            value.backend_count
        )),
    }
    if let Some(value) = service.filter(|value| value.flags & service_flags::MAGLEV != 0) {
        let hash = lb_common::maglev::flow_hash6(
            ipv6_words(*client.ip()),
            ipv6_words(*destination.ip()),
            client.port(),
            destination.port(),
            protocol,
        );
        reasons.push(format!(
            "a new flow: slot flow_hash6 {hash:#010x} % M of the service's Maglev table (tag \
             {:#010x}; at random when the table in force has another tag)",
            value.maglev_table
        ));
    }
    let output = run_dry(pin_dir, &build_packet6(client, destination, protocol))?;
    let verdict = verdict_name(output.verdict);
    let answer = describe_answer6(&output.packet, protocol);
    let rewritten = parse_addresses6(&output.packet)
        .filter(|_| answer.is_none())
        .filter(|(source, target)| *source != client || *target != destination)
        .map(|(source, target)| (source.to_string(), target.to_string()));
    if let Some(answer) = &answer {
        reasons.push(format!(
            "the program answered the client: {answer} ({verdict})"
        ));
    } else if let Some((source, target)) = &rewritten {
        reasons.push(format!(
            "the program rewrote the packet to {source} -> {target} ({verdict})"
        ));
    } else {
        reasons.push(format!(
            "the program returned {verdict} without rewriting the addresses"
        ));
    }
    Ok(Explanation {
        packet: format!("{client} -> {destination}/{}", protocol_name(protocol)),
        hook: Hook::Xdp,
        verdict,
        service: service.map(|value| summarize(&value)),
        rewritten,
        answer,
        reasons,
    })
}

fn verdict_name(verdict: u32) -> &'static str {
    match verdict {
        XDP_DROP => "drop",
        XDP_PASS => "pass",
        XDP_TX => "tx",
        _ => "other",
    }
}

/// The entry the socket hooks use for a frontend: its entry for this node's clients when the
/// frontend has one (an externalTrafficPolicy Local Service's external frontend).
fn node_clients_entry(
    service: Option<ServiceValue>,
    own_entry: impl FnOnce() -> anyhow::Result<Option<ServiceValue>>,
    reasons: &mut Vec<String>,
) -> anyhow::Result<Option<ServiceValue>> {
    match service {
        Some(value) if value.flags & service_flags::NODE_CLIENTS_ENTRY != 0 => {
            let own = own_entry()?;
            if own.is_some() {
                reasons.push(
                    "an externalTrafficPolicy Local frontend: this node's clients reach the \
                     Service's internal-policy backends (kube-proxy's short-circuit)"
                        .into(),
                );
            }
            Ok(own.or(Some(value)))
        }
        other => Ok(other),
    }
}

fn explain4(
    pin_dir: &Path,
    client: SocketAddrV4,
    destination: SocketAddrV4,
    protocol: u8,
    path: Hook,
) -> anyhow::Result<Explanation> {
    let mut reasons = Vec::new();
    let maps = Maps::open(pin_dir, Access::ReadOnly)?;
    let service = frontend(&maps, destination, protocol)?;
    let summary = service.map(|value| summarize(&value));
    let path = match path {
        Hook::Auto => decide_path(pin_dir, (*client.ip()).into(), &mut reasons),
        chosen => chosen,
    };
    if path == Hook::Socket {
        let service = node_clients_entry(
            service,
            || frontend_in(&maps, destination, protocol, scope::NODE_CLIENTS),
            &mut reasons,
        )?;
        let summary = service.map(|value| summarize(&value));
        let verdict = explain_socket(
            &maps,
            client.into(),
            destination.into(),
            protocol,
            service.as_ref(),
            &mut reasons,
        )?;
        return Ok(Explanation {
            packet: format!("{client} -> {destination}/{}", protocol_name(protocol)),
            hook: path,
            verdict,
            service: summary,
            rewritten: None,
            answer: None,
            reasons,
        });
    }
    match &service {
        None => reasons.push(format!(
            "{destination}/{} is no service frontend: the packet passes untouched",
            protocol_name(protocol)
        )),
        Some(value) => explain_service(&maps, client, destination, protocol, value, &mut reasons)?,
    }

    let packet = build_packet(client, destination, protocol);
    let program_output = run_dry(pin_dir, &packet)?;
    let verdict = verdict_name(program_output.verdict);
    let answer = describe_answer(&program_output.packet, protocol);
    let rewritten = parse_addresses(&program_output.packet)
        .filter(|_| answer.is_none())
        .filter(|(source, target)| *source != client || *target != destination)
        .map(|(source, target)| (source.to_string(), target.to_string()));
    if let Some(answer) = &answer {
        reasons.push(format!(
            "the program answered the client: {answer} ({verdict})"
        ));
    } else if let Some((source, target)) = &rewritten {
        reasons.push(format!(
            "the program rewrote the packet to {source} -> {target} ({verdict})"
        ));
        if source.ends_with(":0") {
            // DRY_RUN takes no SNAT port: a real flow gets one of --snat-port-range.
            reasons.push(
                "SNAT to this node's address, to an endpoint on another node: a real flow gets \
                 a source port of the SNAT range (this dry run takes none, hence port 0)"
                    .into(),
            );
        }
    } else {
        reasons.push(format!(
            "the program returned {verdict} without rewriting the addresses"
        ));
    }
    Ok(Explanation {
        packet: format!("{client} -> {destination}/{}", protocol_name(protocol)),
        hook: Hook::Xdp,
        verdict,
        service: summary,
        rewritten,
        answer,
        reasons,
    })
}

/// The socket hooks when they are attached and the client is on this node (a local address,
/// or reached directly through an interface that is not one of the agent's NICs, as the agent
/// places endpoints); XDP otherwise. The route is this process's network namespace's: run in
/// the node's (the DaemonSet's pod is).
fn decide_path(pin_dir: &Path, client: IpAddr, reasons: &mut Vec<String>) -> Hook {
    let links: Vec<String> = std::fs::read_dir(pin_dir.join(crate::datapath::pins::LINKS_DIR))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|entry| entry.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    if !links.iter().any(|name| name == program_names::CONNECT4) {
        return Hook::Xdp;
    }
    let nics: Vec<String> = links
        .iter()
        .filter_map(|name| name.strip_prefix("xdp-"))
        .map(str::to_owned)
        .collect();
    if nics.is_empty() {
        reasons.push("the datapath has socket hooks only (no NIC): the socket hooks decide".into());
        return Hook::Socket;
    }
    match crate::route::RouteLocator::new(nics).local_among([client]) {
        Ok(local) if local.contains(&client) => {
            reasons.push(format!(
                "{client} is on this node (a pod or a host process, by route): the socket hooks \
                 decide (--from nic for a packet arriving on a NIC)"
            ));
            Hook::Socket
        }
        Ok(_) => Hook::Xdp,
        Err(error) => {
            reasons.push(format!(
                "could not tell by route whether {client} is on this node ({error}): taken as \
                 arriving on a NIC (--from pod for a pod of this node)"
            ));
            Hook::Xdp
        }
    }
}

/// What the socket hooks do with a connect() (TCP, or connected UDP) or an unconnected sendto()
/// (UDP) to `destination` (`lb_connect4`/`lb_sendmsg4`, `lb_connect6`/`lb_sendmsg6`); returns
/// the verdict.
fn explain_socket(
    maps: &Maps,
    client: SocketAddr,
    destination: SocketAddr,
    protocol: u8,
    service: Option<&ServiceValue>,
    reasons: &mut Vec<String>,
) -> anyhow::Result<&'static str> {
    let call = if protocol == proto::UDP {
        "connect() or sendto()"
    } else {
        "connect()"
    };
    if protocol == proto::SCTP {
        reasons.push(format!(
            "{destination}/sctp: the kernel runs no socket hook for SCTP sockets, so their \
             {call} goes to {destination} untranslated (ClusterIP SCTP from pods and the node \
             is not served, see docs/datapath.md)"
        ));
        return Ok("untouched");
    }
    let Some(service) = service else {
        reasons.push(format!(
            "{destination}/{} is no service frontend: the socket hooks let the {call} proceed \
             untouched",
            protocol_name(protocol)
        ));
        return Ok("untouched");
    };
    reasons.push(format!(
        "{destination}/{} is a frontend of service {}: the socket hooks translate the {call} \
         itself, before any packet exists; the packets go from {} straight to the backend, and \
         no XDP or conntrack entry is involved",
        protocol_name(protocol),
        service.service_id,
        client.ip()
    ));
    if service.backend_count == 0 {
        if service.flags & service_flags::LOCAL_ONLY != 0 {
            reasons.push(format!(
                "Local traffic policy and no endpoint on this node: the {call} fails with EPERM \
                 (sock_no_backend)"
            ));
        } else {
            reasons.push(format!(
                "no endpoint: the {call} fails at once with ECONNREFUSED, like kube-proxy's \
                 REJECT (sock_no_backend)"
            ));
        }
        return Ok("refused");
    }
    let backends = service_backends(maps, service)?;
    if service.affinity_timeout_s != 0 {
        reasons.push(format!(
            "session affinity per network namespace (the pod's, not the client address): the \
             backend it used last, if within {} s, else one of {} at random, remembered",
            service.affinity_timeout_s, service.backend_count
        ));
    } else {
        let maglev = if service.flags & service_flags::MAGLEV != 0 {
            " (Maglev is for XDP: a socket call has no flow to hash yet)"
        } else {
            ""
        };
        let unconnected = if protocol == proto::UDP {
            "; an unconnected socket's sendto() calls all take the one its socket cookie falls \
             on"
        } else {
            ""
        };
        reasons.push(format!(
            "one of {} backends at random{maglev}{unconnected}: {}",
            service.backend_count,
            backends.join(", ")
        ));
    }
    if service.flags & service_flags::SOURCE_RANGES != 0 {
        reasons.push(
            "loadBalancerSourceRanges: once routed, packets from a source outside them are \
             dropped (lb_sock_egress4, drop_source_range)"
                .into(),
        );
    }
    reasons.push(format!(
        "the application sees {destination} as its peer (recvmsg and getpeername hooks)"
    ));
    Ok("translated")
}

/// The service's backends in slot order, as `address:port` (a cell names a backend of the
/// service's family: an IPv4 or an IPv6 one).
fn service_backends(maps: &Maps, service: &ServiceValue) -> anyhow::Result<Vec<String>> {
    let slots = &maps.slots;
    let mut found = Vec::new();
    for index in (service.slots..).take(service.backend_count.into()) {
        let Ok(cell) = slots.get(&index, 0) else {
            continue;
        };
        if cell.service_id != service.service_id {
            continue;
        }
        let address = if let Ok(backend) = maps.backends.get(&cell.backend_id, 0)
            && backend.in_use()
        {
            SocketAddr::new(
                Ipv4Addr::from(u32::from_be(backend.addr)).into(),
                u16::from_be(backend.port),
            )
        } else if let Ok(backend) = maps.backends6.get(&cell.backend_id, 0)
            && backend.in_use()
        {
            SocketAddr::new(
                ipv6_of_words(backend.addr).into(),
                u16::from_be(backend.port),
            )
        } else {
            continue;
        };
        if !found.contains(&address.to_string()) {
            found.push(address.to_string());
        }
    }
    Ok(found)
}

fn explain_service(
    maps: &Maps,
    client: SocketAddrV4,
    destination: SocketAddrV4,
    protocol: u8,
    service: &ServiceValue,
    reasons: &mut Vec<String>,
) -> anyhow::Result<()> {
    reasons.push(format!(
        "{destination}/{} is a frontend of service {}",
        protocol_name(protocol),
        service.service_id
    ));
    if service.flags & service_flags::SOURCE_RANGES != 0 {
        if source_allowed(maps, service.service_id, *client.ip())? {
            reasons.push(format!(
                "{} is inside the service's loadBalancerSourceRanges",
                client.ip()
            ));
        } else {
            reasons.push(format!(
                "{} is outside the service's loadBalancerSourceRanges: dropped (drop_source_range)",
                client.ip()
            ));
            return Ok(());
        }
    }
    if let Some(entry) = established(maps, client, destination, protocol)? {
        let backend = SocketAddrV4::new(Ipv4Addr::from(entry.nat_addr), entry.nat_port);
        let snat = if entry.flags & ct_flags::SNAT != 0 {
            ", through SNAT"
        } else if entry.flags & ct_flags::DIRECT_RETURN != 0 {
            ", by direct server return"
        } else {
            ""
        };
        reasons.push(format!(
            "an established flow (conntrack entry) goes to backend {} at {backend}{snat}",
            entry.backend_id
        ));
        return Ok(());
    }
    if service.backend_count == 0 {
        if service.flags & service_flags::LOCAL_ONLY != 0 {
            reasons.push("Local traffic policy and no endpoint on this node: dropped (drop_no_local_backend)".into());
        } else {
            reasons.push(
                "no endpoint: rejected like kube-proxy's REJECT (TCP RST / ICMP port unreachable)"
                    .into(),
            );
        }
        return Ok(());
    }
    if service.affinity_timeout_s != 0 {
        match affinity(maps, *client.ip(), service.service_id)? {
            Some(entry) => reasons.push(format!(
                "session affinity: {} used backend {} last; it sticks while that was within {} s",
                client.ip(),
                entry.backend_id,
                service.affinity_timeout_s
            )),
            None => reasons.push(format!(
                "session affinity: {} has no backend yet; a new one is chosen and remembered",
                client.ip()
            )),
        }
    } else if service.flags & service_flags::MAGLEV != 0 {
        let hash = lb_common::maglev::flow_hash(
            u32::from(*client.ip()),
            u32::from(*destination.ip()),
            client.port(),
            destination.port(),
            protocol,
        );
        reasons.push(format!(
            "a new flow: slot flow_hash {hash:#010x} % M of the service's Maglev table (tag \
             {:#010x}; at random when the table in force has another tag)",
            service.maglev_table
        ));
    } else {
        reasons.push(format!(
            "a new flow: one of {} backends at random",
            service.backend_count
        ));
    }
    if service.flags & service_flags::LOCAL_ONLY != 0 {
        reasons.push("Local traffic policy: node-local endpoints only, client address kept".into());
    }
    Ok(())
}

fn summarize(value: &ServiceValue) -> ServiceSummary {
    let kinds = [
        (service_flags::CLUSTER_IP, "ClusterIP"),
        (service_flags::NODE_PORT, "NodePort"),
        (service_flags::EXTERNAL_IP, "externalIP"),
        (service_flags::LOAD_BALANCER, "LoadBalancer"),
    ]
    .into_iter()
    .filter(|(bit, _)| value.flags & bit != 0)
    .map(|(_, name)| name)
    .collect();
    ServiceSummary {
        id: value.service_id,
        kinds,
        backends: value.backend_count,
        local_only: value.flags & service_flags::LOCAL_ONLY != 0,
        source_ranges: value.flags & service_flags::SOURCE_RANGES != 0,
        maglev: value.flags & service_flags::MAGLEV != 0,
        affinity_timeout_s: value.affinity_timeout_s,
    }
}

fn frontend(
    maps: &Maps,
    destination: SocketAddrV4,
    protocol: u8,
) -> anyhow::Result<Option<ServiceValue>> {
    frontend_in(maps, destination, protocol, scope::ANY)
}

fn frontend_in(
    maps: &Maps,
    destination: SocketAddrV4,
    protocol: u8,
    scope: u8,
) -> anyhow::Result<Option<ServiceValue>> {
    let key = Frontend4Key {
        addr: u32::from(*destination.ip()).to_be(),
        port: destination.port().to_be(),
        proto: protocol,
        scope,
    };
    Ok(maps.frontends.get(&key, 0).ok())
}

fn source_allowed(maps: &Maps, service_id: u32, client: Ipv4Addr) -> anyhow::Result<bool> {
    let map = &maps.source_ranges;
    let key = LpmKey::new(
        64,
        SourceRange4 {
            service_id_be: service_id.to_be(),
            addr: u32::from(client).to_be(),
        },
    );
    Ok(map.get(&key, 0).is_ok())
}

fn established(
    maps: &Maps,
    client: SocketAddrV4,
    destination: SocketAddrV4,
    protocol: u8,
) -> anyhow::Result<Option<Ct4Value>> {
    let map = &maps.conntrack;
    let (client_addr, frontend_addr) = (u32::from(*client.ip()), u32::from(*destination.ip()));
    // The flow's FLOW entry when it is for this frontend, else its ORIGINAL entry, as the
    // program looks them up. An entry past its timeout counts as absent for the program; its
    // own verdict, reported next to this, settles such a case.
    if let Ok(entry) = map.get(&flow_key(client_addr, client.port(), protocol), 0) {
        let flow = Flow4Value::of(&entry);
        if flow.frontend_addr == frontend_addr && flow.frontend_port == destination.port() {
            return Ok(Some(entry));
        }
    }
    let key = Ct4Key {
        saddr: client_addr,
        daddr: frontend_addr,
        sport: client.port(),
        dport: destination.port(),
        proto: protocol,
        direction: ct_direction::ORIGINAL,
        _pad: [0; 2],
    };
    Ok(map.get(&key, 0).ok())
}

fn affinity(
    maps: &Maps,
    client: Ipv4Addr,
    service_id: u32,
) -> anyhow::Result<Option<AffinityValue>> {
    let map = &maps.affinity;
    let key = Affinity4Key {
        client: u64::from(u32::from(client)),
        service_id,
        kind: 0,
    };
    Ok(map.get(&key, 0).ok())
}

/// Runs a private copy of the XDP program, on the agent's pinned maps, in dry-run mode.
///
/// The loader opens the pins read-write, and a read-only descriptor would change nothing here:
/// a program may use any map it was loaded with whatever the descriptor's mode (the verifier's
/// `add_used_map` in kernel/bpf/verifier.c takes the map with `__bpf_map_get`, which checks no
/// mode). What keeps this copy from writing is DRY_RUN, checked by the program before each write.
fn run_dry(
    pin_dir: &Path,
    packet: &[u8],
) -> anyhow::Result<crate::datapath::testrun::TestRunOutput> {
    let mut loader = EbpfLoader::new();
    loader
        .default_map_pin_directory(pin_dir)
        .override_global("DRY_RUN", &1u8, true);
    // The maps the agent sizes (--frontend-map-size, --conntrack-map-size) at the size they
    // were pinned with.
    let sizes = crate::datapath::MapSizes::pinned_or(pin_dir, Default::default());
    loader
        .map_max_entries(lb_common::map_names::FRONTENDS4, sizes.frontends4)
        .map_max_entries(lb_common::map_names::CONNTRACK4, sizes.conntrack4);
    crate::datapath::ebpf_log::set_level(&mut loader, EbpfLogLevel::Off);
    let mut ebpf = loader
        .load(DATAPATH_OBJECT)
        .context("loading a dry-run copy of the datapath on the pinned maps")?;
    // The programs it tail-calls, dry-run too, in this copy's own program array.
    let programs: Vec<(u32, &'static str)> = crate::datapath::load::LB_XDP_PROGRAMS
        .into_iter()
        .chain(crate::datapath::load::PROTOCOL_PROGRAMS)
        .collect();
    for &(_, name) in &programs {
        let program: &mut Xdp = ebpf
            .program_mut(name)
            .with_context(|| format!("the {name} program"))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("loading the dry-run {name}"))?;
    }
    crate::datapath::load::install_tail_calls(&mut ebpf, &programs)?;
    fill_pair_filter(&mut ebpf)?;
    let program: &mut Xdp = ebpf
        .program_mut(program_names::XDP_LB)
        .context("the XDP program")?
        .try_into()?;
    program.load().context("loading the dry-run XDP program")?;
    Ok(test_run(program.fd()?, packet)?)
}

/// Sets every bit of the copy's own pair filter, which starts empty: this copy cannot know which
/// clients have a flow kept as two entries, so it looks every ORIGINAL entry up, as the agent's
/// datapath does for a client whose bit is set.
fn fill_pair_filter(ebpf: &mut aya::Ebpf) -> anyhow::Result<()> {
    use std::os::fd::AsFd as _;
    let name = lb_common::map_names::PAIR_FILTER;
    let map: aya::maps::Array<&mut aya::maps::MapData, [u64; lb_common::pair_filter::GENERATIONS]> =
        ebpf.map_mut(name)
            .with_context(|| format!("the {name} map"))?
            .try_into()?;
    let full = vec![[u64::MAX; lb_common::pair_filter::GENERATIONS]; map.len() as usize];
    crate::datapath::batch::write_array(aya::maps::IterableMap::map(&map).fd().as_fd(), &full)
        .with_context(|| format!("filling the dry run's {name}"))
}

fn protocol_name(protocol: u8) -> &'static str {
    match protocol {
        proto::UDP => "udp",
        proto::SCTP => "sctp",
        _ => "tcp",
    }
}

/// An Ethernet/IPv4 frame: a TCP SYN, a UDP datagram with a few bytes or an SCTP INIT, checksums
/// computed.
fn build_packet(client: SocketAddrV4, destination: SocketAddrV4, protocol: u8) -> Vec<u8> {
    if protocol == proto::SCTP {
        return build_sctp_init(client, destination);
    }
    let l4: Vec<u8> = if protocol == proto::UDP {
        let payload = b"explain";
        let mut udp = Vec::new();
        udp.extend_from_slice(&client.port().to_be_bytes());
        udp.extend_from_slice(&destination.port().to_be_bytes());
        udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(payload);
        udp
    } else {
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&client.port().to_be_bytes());
        tcp[2..4].copy_from_slice(&destination.port().to_be_bytes());
        tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x02; // SYN
        tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
        tcp
    };
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = protocol;
    ip[12..16].copy_from_slice(&client.ip().octets());
    ip[16..20].copy_from_slice(&destination.ip().octets());
    let ip_check = internet_checksum(0, &ip);
    ip[10..12].copy_from_slice(&ip_check.to_be_bytes());
    let mut l4 = l4;
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&client.ip().octets());
    pseudo.extend_from_slice(&destination.ip().octets());
    pseudo.extend_from_slice(&[0, protocol]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    let check_at = if protocol == proto::UDP { 6 } else { 16 };
    let check = internet_checksum(sum(0, &pseudo), &l4);
    l4[check_at..check_at + 2].copy_from_slice(&check.to_be_bytes());
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00];
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&l4);
    frame
}

/// An Ethernet/IPv6 frame: a TCP SYN, a UDP datagram with a few bytes or an SCTP INIT,
/// checksums computed (a UDP checksum is required over IPv6).
fn build_packet6(client: SocketAddrV6, destination: SocketAddrV6, protocol: u8) -> Vec<u8> {
    let mut l4: Vec<u8> = if protocol == proto::SCTP {
        sctp_init(client.port(), destination.port())
    } else if protocol == proto::UDP {
        let payload = b"explain";
        let mut udp = Vec::new();
        udp.extend_from_slice(&client.port().to_be_bytes());
        udp.extend_from_slice(&destination.port().to_be_bytes());
        udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(payload);
        udp
    } else {
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&client.port().to_be_bytes());
        tcp[2..4].copy_from_slice(&destination.port().to_be_bytes());
        tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x02; // SYN
        tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
        tcp
    };
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&client.ip().octets());
    pseudo.extend_from_slice(&destination.ip().octets());
    pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, protocol]);
    if protocol != proto::SCTP {
        let check_at = if protocol == proto::UDP { 6 } else { 16 };
        let check = internet_checksum(sum(0, &pseudo), &l4);
        let check = if check == 0 { 0xffff } else { check };
        l4[check_at..check_at + 2].copy_from_slice(&check.to_be_bytes());
    }
    let mut ip = vec![0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
    ip[6] = protocol;
    ip[7] = 64;
    ip[8..24].copy_from_slice(&client.ip().octets());
    ip[24..40].copy_from_slice(&destination.ip().octets());
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x86, 0xdd];
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&l4);
    frame
}

/// Source and destination (address, port) of an Ethernet/IPv6/TCP or UDP frame without
/// extension headers.
fn parse_addresses6(frame: &[u8]) -> Option<(SocketAddrV6, SocketAddrV6)> {
    let ip = frame.get(14..54)?;
    if ![proto::TCP, proto::UDP].contains(&ip[6]) {
        return None;
    }
    let ports = frame.get(54..58)?;
    let address = |bytes: &[u8]| Some(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?));
    let source = SocketAddrV6::new(
        address(&ip[8..24])?,
        u16::from_be_bytes([ports[0], ports[1]]),
        0,
        0,
    );
    let target = SocketAddrV6::new(
        address(&ip[24..40])?,
        u16::from_be_bytes([ports[2], ports[3]]),
        0,
        0,
    );
    Some((source, target))
}

/// A reject XDP sent back instead of the client's IPv6 packet: a TCP RST, or an ICMPv6 error.
fn describe_answer6(frame: &[u8], sent_protocol: u8) -> Option<String> {
    const IPPROTO_ICMPV6: u8 = 58;
    let ip = frame.get(14..54)?;
    let address = |bytes: &[u8]| Some(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?));
    let (source, target) = (address(&ip[8..24])?, address(&ip[24..40])?);
    let l4 = frame.get(54..)?;
    match ip[6] {
        IPPROTO_ICMPV6 => {
            let (kind, code) = (*l4.first()?, *l4.get(1)?);
            let name = match (kind, code) {
                (1, 4) => "port unreachable",
                (1, _) => "destination unreachable",
                _ => "message",
            };
            Some(format!(
                "ICMPv6 {name} (type {kind}, code {code}) {source} -> {target}"
            ))
        }
        proto::TCP if sent_protocol == proto::TCP => {
            const RST: u8 = 0x04;
            let flags = *l4.get(13)?;
            let ports = parse_addresses6(frame)?;
            (flags & RST != 0).then(|| format!("TCP RST {} -> {}", ports.0, ports.1))
        }
        _ => None,
    }
}

/// An Ethernet/IPv4/SCTP frame holding [`sctp_init`].
fn build_sctp_init(client: SocketAddrV4, destination: SocketAddrV4) -> Vec<u8> {
    let sctp = sctp_init(client.port(), destination.port());
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + sctp.len()) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = proto::SCTP;
    ip[12..16].copy_from_slice(&client.ip().octets());
    ip[16..20].copy_from_slice(&destination.ip().octets());
    let ip_check = internet_checksum(0, &ip);
    ip[10..12].copy_from_slice(&ip_check.to_be_bytes());
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00];
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&sctp);
    frame
}

/// An SCTP packet holding an INIT from `source` to `destination` (verification tag 0, initiate
/// tag 1), its CRC32c computed whole (it covers no pseudo-header: the same for both families).
fn sctp_init(source: u16, destination: u16) -> Vec<u8> {
    let mut sctp = Vec::new();
    sctp.extend_from_slice(&source.to_be_bytes());
    sctp.extend_from_slice(&destination.to_be_bytes());
    sctp.extend_from_slice(&[0; 8]);
    // INIT: type, flags, length 20; initiate tag, a_rwnd, streams out and in, initial TSN.
    sctp.extend_from_slice(&[lb_common::sctp::chunk::INIT, 0, 0, 20]);
    sctp.extend_from_slice(&1u32.to_be_bytes());
    sctp.extend_from_slice(&65_536u32.to_be_bytes());
    sctp.extend_from_slice(&[0, 1, 0, 1]);
    sctp.extend_from_slice(&1u32.to_be_bytes());
    let checksum = lb_common::sctp::checksum_of(&sctp);
    sctp[lb_common::sctp::CHECKSUM_OFFSET..lb_common::sctp::CHECKSUM_OFFSET + 4]
        .copy_from_slice(&checksum.to_le_bytes());
    sctp
}

fn sum(mut total: u32, bytes: &[u8]) -> u32 {
    for pair in bytes.chunks(2) {
        total += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    total
}

fn internet_checksum(initial: u32, bytes: &[u8]) -> u16 {
    let mut total = sum(initial, bytes);
    while total >> 16 != 0 {
        total = (total & 0xffff) + (total >> 16);
    }
    !(total as u16)
}

/// A reject XDP sent back instead of the client's packet: a TCP RST, or an ICMP error (then
/// the rest of the frame is no ports but the ICMP header and the quoted packet).
fn describe_answer(frame: &[u8], sent_protocol: u8) -> Option<String> {
    let ip = frame.get(14..34)?;
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let source = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let target = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let l4 = frame.get(14 + header_len..)?;
    match ip[9] {
        IPPROTO_ICMP => {
            let (kind, code) = (*l4.first()?, *l4.get(1)?);
            let name = match (kind, code) {
                (3, 3) => "port unreachable",
                (3, _) => "destination unreachable",
                (11, _) => "time exceeded",
                _ => "message",
            };
            Some(format!(
                "ICMP {name} (type {kind}, code {code}) {source} -> {target}"
            ))
        }
        proto::TCP if sent_protocol == proto::TCP => {
            const RST: u8 = 0x04;
            let flags = *l4.get(13)?;
            let ports = parse_addresses(frame)?;
            (flags & RST != 0).then(|| format!("TCP RST {} -> {}", ports.0, ports.1))
        }
        _ => None,
    }
}

/// Source and destination (address, port) of an Ethernet/IPv4/TCP, UDP or SCTP frame.
fn parse_addresses(frame: &[u8]) -> Option<(SocketAddrV4, SocketAddrV4)> {
    let ip = frame.get(14..34)?;
    if ![proto::TCP, proto::UDP, proto::SCTP].contains(&ip[9]) {
        return None;
    }
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let ports = frame.get(14 + header_len..14 + header_len + 4)?;
    let source = SocketAddrV4::new(
        Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        u16::from_be_bytes([ports[0], ports[1]]),
    );
    let target = SocketAddrV4::new(
        Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        u16::from_be_bytes([ports[2], ports[3]]),
    );
    Some((source, target))
}
