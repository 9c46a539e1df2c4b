//! `lb explain` against a running agent in the lab: a hit, a miss, an affinity hit and a
//! source-range drop, each explained by the real XDP program on the live maps, and a check that
//! explaining changed no map entry.

use std::path::Path;

use lab::{
    agent::{AgentLab, endpoint_slice},
    peer::ClientRun,
    topology::{node_addr, pod_addr},
};
use serde_json::Value;

fn explain(pin_dir: &Path, source: &str, destination: &str) -> Value {
    lab::agent::lb_json(pin_dir, &["explain", source, destination]).expect("lb explain")
}

/// Every entry of every map the datapath writes, as bytes: a fingerprint of the live state.
fn state(pin_dir: &Path) -> Vec<(String, Vec<Vec<u8>>)> {
    let names = [
        lb_common::map_names::CONNTRACK4,
        lb_common::map_names::AFFINITY4,
        lb_common::map_names::FRONTENDS4,
        lb_common::map_names::BACKENDS4,
        lb_common::map_names::SLOTS4,
        lb_common::map_names::SERVICE_COUNTERS,
        lb_common::map_names::EVENTS,
    ];
    names
        .iter()
        .map(|name| (name.to_string(), dump(&pin_dir.join(name))))
        .collect()
}

/// The maps' state once two reads 300 ms apart agree (at most 5 s).
fn settled_state(pin_dir: &Path) -> Vec<(String, Vec<Vec<u8>>)> {
    let mut last = state(pin_dir);
    for _ in 0..16 {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let now = state(pin_dir);
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("the maps kept changing without traffic")
}

/// All (key, value) pairs of a map through the raw syscalls, per-CPU values included.
fn dump(path: &Path) -> Vec<Vec<u8>> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let info = aya::maps::MapInfo::from_pin(path).expect("map info");
    let map = aya::maps::MapData::from_pin(path).expect("pinned map");
    let fd = map.fd().as_fd();
    let key_size = info.key_size() as usize;
    let cpus = aya::util::nr_cpus().expect("cpus").get() as usize;
    let per_cpu = matches!(
        info.map_type(),
        Ok(aya::maps::MapType::PerCpuArray) | Ok(aya::maps::MapType::PerCpuHash)
    );
    let value_size = if per_cpu {
        (info.value_size() as usize).div_ceil(8) * 8 * cpus
    } else {
        info.value_size() as usize
    };
    if matches!(info.map_type(), Ok(aya::maps::MapType::Array)) {
        return dump_array(fd.as_raw_fd(), info.max_entries(), value_size);
    }
    let mut entries = Vec::new();
    let mut key: Option<Vec<u8>> = None;
    loop {
        let mut next = vec![0u8; key_size];
        let mut attr = [0u64; 4];
        attr[0] = fd.as_raw_fd() as u64;
        attr[1] = key.as_ref().map_or(0, |key| key.as_ptr() as u64);
        attr[2] = next.as_mut_ptr() as u64;
        // SAFETY: BPF_MAP_GET_NEXT_KEY (4) with a bpf_attr prefix {map_fd, key, next_key}; both
        // buffers are key_size bytes and live across the call.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, 4, attr.as_mut_ptr(), 32) };
        if rc != 0 {
            break;
        }
        let mut value = vec![0u8; value_size];
        let mut attr = [0u64; 4];
        attr[0] = fd.as_raw_fd() as u64;
        attr[1] = next.as_ptr() as u64;
        attr[2] = value.as_mut_ptr() as u64;
        // SAFETY: BPF_MAP_LOOKUP_ELEM (1), same layout; value holds value_size bytes.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, 1, attr.as_mut_ptr(), 32) };
        if rc == 0 {
            entries.push([next.clone(), value].concat());
        }
        key = Some(next);
    }
    entries.sort();
    entries
}

/// Every cell of an array map with its index, read in batches (an array of a million cells
/// takes a second or two one cell at a time).
fn dump_array(fd: std::os::fd::RawFd, max_entries: u32, value_size: usize) -> Vec<Vec<u8>> {
    const BATCH: u32 = 65_536;
    let mut entries = Vec::new();
    let mut cursor: Option<u32> = None;
    loop {
        let mut keys = vec![0u32; BATCH as usize];
        let mut values = vec![0u8; BATCH as usize * value_size];
        let mut next = 0u32;
        // bpf_attr.batch: in_batch, out_batch, keys, values (u64 each), count, map_fd (u32),
        // elem_flags, flags (u64).
        let mut attr = [0u64; 6];
        attr[0] = cursor
            .as_ref()
            .map_or(0, |cursor| cursor as *const u32 as u64);
        attr[1] = &mut next as *mut u32 as u64;
        attr[2] = keys.as_mut_ptr() as u64;
        attr[3] = values.as_mut_ptr() as u64;
        attr[4] = u64::from(BATCH) | (fd as u64) << 32;
        // SAFETY: BPF_MAP_LOOKUP_BATCH (24) with the layout above; keys and values hold BATCH
        // entries, next and cursor live across the call.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, 24, attr.as_mut_ptr(), 48) };
        let count = (attr[4] & 0xffff_ffff) as usize;
        for (index, value) in keys.iter().zip(values.chunks(value_size)).take(count) {
            entries.push([index.to_ne_bytes().as_slice(), value].concat());
        }
        // ENOENT: the last batch has been read.
        if rc != 0 || count == 0 || entries.len() >= max_entries as usize {
            break;
        }
        cursor = Some(next);
    }
    entries
}

#[test]
fn explain_tells_hit_miss_affinity_and_source_range_and_changes_nothing() {
    let mut lab = AgentLab::new().expect("lab");
    lab.cluster
        .client
        .route(&["198.51.100.0/24", "via", &node_addr(1).to_string()])
        .expect("route");
    lab.start_agent(&[]).expect("agent");
    let web = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}\n";
    let sticky = "apiVersion: v1\nkind: Service\nmetadata: {name: sticky, namespace: default}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.11\n  sessionAffinity: ClientIP\n  loadBalancerSourceRanges: [203.0.113.10/32]\n  ports:\n  - {name: http, port: 80, targetPort: 8080, nodePort: 30081}\nstatus:\n  loadBalancer:\n    ingress: [{ip: 198.51.100.20}]\n";
    // UDP goes through lb_xdp's tail call: the dry-run copy must reach dry-run UDP programs.
    let dns = "apiVersion: v1\nkind: Service\nmetadata: {name: dns, namespace: default}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.12\n  externalIPs: [198.51.100.53]\n  ports:\n  - {name: dns, port: 53, targetPort: 8080, nodePort: 30053, protocol: UDP}\n";
    let dns_slice = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: dns-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: dns}}\naddressType: IPv4\nports:\n- {{name: dns, port: 8080, protocol: UDP}}\nendpoints:\n- addresses: [\"{}\"]\n  nodeName: node1\n  conditions: {{ready: true}}\n",
        pod_addr(1, 0)
    );
    // SCTP too, through its own tail-called program (no SCTP socket is needed to explain it).
    let diameter = "apiVersion: v1\nkind: Service\nmetadata: {name: diameter, namespace: default}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.13\n  ports:\n  - {name: diameter, port: 3868, targetPort: 8080, nodePort: 30868, protocol: SCTP}\n";
    let diameter_slice = dns_slice
        .replace("dns-1", "diameter-1")
        .replace("service-name: dns", "service-name: diameter")
        .replace(
            "{name: dns, port: 8080, protocol: UDP}",
            "{name: diameter, port: 8080, protocol: SCTP}",
        );
    let both = [(pod_addr(1, 0), "node1"), (pod_addr(1, 1), "node1")];
    let manifests = [
        web.to_owned(),
        endpoint_slice("web", &both[..1]),
        sticky.to_owned(),
        endpoint_slice("sticky", &both),
        dns.to_owned(),
        dns_slice,
        diameter.to_owned(),
        diameter_slice,
    ]
    .join("---\n");
    lab.apply("all.yaml", &manifests).expect("apply");
    // Real traffic first: the client gets an affinity entry for the sticky service.
    let real = ClientRun::tcp("198.51.100.20:80", 5)
        .run(&lab.cluster.client, None)
        .expect("client");
    assert_eq!(real.ok, 5, "{real:?}");
    let sticky_pod = real.by_server.keys().next().expect("a server").clone();
    let sticky_addr = if sticky_pod == "n1p0" {
        pod_addr(1, 0)
    } else {
        pod_addr(1, 1)
    };
    // One client port to the DNS Service's NodePort, then to its externalIP: the second flow is
    // kept as a pair, its source port remapped to the one the pod saw.
    let from_one_port = |target: &str| {
        let report = ClientRun {
            one_flow: true,
            source_port: Some(47000),
            ..ClientRun::udp(target, 2)
        }
        .run(&lab.cluster.client, None)
        .expect("client");
        report.assert_all_ok(target);
        report.seen_as.keys().next().expect("seen").clone()
    };
    from_one_port("203.0.113.1:30053");
    let remapped = from_one_port("198.51.100.53:53");
    assert_ne!(remapped, "203.0.113.10:47000", "kept as a pair");

    // The real connections' last segments (FINs, final ACKs) may still be on their way and
    // refresh their conntrack entries: the state is taken once it has stopped changing.
    let before = settled_state(lab.pin_dir());

    let hit = explain(lab.pin_dir(), "203.0.113.10:45000", "203.0.113.1:30080/tcp");
    assert_eq!(hit["verdict"], "pass", "{hit:#}");
    assert_eq!(
        hit["rewritten"][1],
        format!("{}:8080", pod_addr(1, 0)),
        "{hit:#}"
    );
    assert!(hit["reasons"].to_string().contains("at random"), "{hit:#}");

    let udp = explain(lab.pin_dir(), "203.0.113.10:45000", "203.0.113.1:30053/udp");
    assert_eq!(udp["verdict"], "pass", "{udp:#}");
    assert_eq!(
        udp["rewritten"][1],
        format!("{}:8080", pod_addr(1, 0)),
        "{udp:#}"
    );

    // The pair's next datagram goes on through its remapped port, as the datapath sends it.
    let pair = explain(lab.pin_dir(), "203.0.113.10:47000", "198.51.100.53:53/udp");
    assert_eq!(pair["verdict"], "pass", "{pair:#}");
    assert_eq!(pair["rewritten"][0], remapped, "{pair:#}");

    let sctp = explain(
        lab.pin_dir(),
        "203.0.113.10:45000",
        "203.0.113.1:30868/sctp",
    );
    assert_eq!(sctp["verdict"], "pass", "{sctp:#}");
    assert_eq!(
        sctp["rewritten"][1],
        format!("{}:8080", pod_addr(1, 0)),
        "{sctp:#}"
    );

    let miss = explain(lab.pin_dir(), "203.0.113.10:45000", "203.0.113.1:9999/tcp");
    assert_eq!(miss["verdict"], "pass", "{miss:#}");
    assert!(
        miss["service"].is_null() && miss["rewritten"].is_null(),
        "{miss:#}"
    );
    assert!(
        miss["reasons"].to_string().contains("no service frontend"),
        "{miss:#}"
    );

    let affinity = explain(lab.pin_dir(), "203.0.113.10:46000", "198.51.100.20:80/tcp");
    assert!(
        affinity["reasons"]
            .to_string()
            .contains("session affinity: 203.0.113.10 used backend"),
        "{affinity:#}"
    );
    assert_eq!(
        affinity["rewritten"][1],
        format!("{sticky_addr}:8080"),
        "{affinity:#}"
    );

    let refused = explain(lab.pin_dir(), "203.0.113.99:46000", "198.51.100.20:80/tcp");
    assert_eq!(refused["verdict"], "drop", "{refused:#}");
    assert!(
        refused["reasons"]
            .to_string()
            .contains("outside the service's loadBalancerSourceRanges"),
        "{refused:#}"
    );

    assert_eq!(
        state(lab.pin_dir()),
        before,
        "lb explain changed a map entry"
    );
}

/// `lb explain` on maps the agent created at other sizes than the defaults
/// (`--frontend-map-size`, `--conntrack-map-size`): its dry-run copy of the datapath reuses them
/// at the size they were pinned with.
#[test]
fn explain_reads_maps_the_agent_sized() {
    use lb_common::{backend_flags, proto, service_flags};
    use lb_userspace::{
        compile::model::{Backend, Frontend, Service},
        datapath::{Datapath, MapSizes},
    };
    let lab = lab::lab::Lab::new().expect("lab");
    let pins = lab::lab::PinDir::new(&lab, "explain-sized").expect("pins");
    let sizes = MapSizes {
        frontends4: 4096,
        conntrack4: 8192,
    };
    let mut datapath = Datapath::load_sized(pins.path(), sizes).expect("load");
    let backend = Backend {
        addr: "10.244.1.5".parse::<std::net::IpAddr>().expect("address"),
        port: 8080,
        proto: proto::TCP,
        flags: backend_flags::LOCAL,
    };
    datapath.put_backend(1, &backend).expect("backend");
    let service = Service {
        id: 1,
        frontends: vec![Frontend {
            addr: "203.0.113.1".parse::<std::net::IpAddr>().expect("address"),
            port: 80,
            proto: proto::TCP,
            kind: service_flags::EXTERNAL_IP,
        }],
        backends: vec![1],
        ..Default::default()
    };
    datapath.put_service(&service).expect("service");
    let hit = explain(pins.path(), "198.51.100.7:45000", "203.0.113.1:80/tcp");
    assert_eq!(hit["verdict"], "pass", "{hit:#}");
    assert_eq!(hit["rewritten"][1], "10.244.1.5:8080", "{hit:#}");
}
