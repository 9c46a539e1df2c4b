//! reconcile() against real (test-private) pinned maps: minimal updates, idempotence,
//! convergence after a restart without touching connection tracking, held services, and a
//! full map that fails one service while the others are programmed.

use std::{collections::BTreeSet, net::Ipv4Addr};

use lab::{
    lab::{Lab, PinDir},
    packet::{self, TcpFlags},
};
use lb_common::{backend_flags, proto, service_flags};
use lb_userspace::{
    compile::model::{Backend, Desired, DesiredService, Frontend, ServicePortKey},
    datapath::{Datapath, DatapathError, testrun::test_run},
    reconcile::Reconciler,
};

fn key(name: &str) -> ServicePortKey {
    ServicePortKey {
        namespace: "default".into(),
        name: name.into(),
        port_name: "http".into(),
        proto: proto::TCP,
        scope: Default::default(),
        family: Default::default(),
    }
}

fn backend(last_octet: u8) -> Backend {
    Backend {
        addr: Ipv4Addr::new(10, 244, 1, last_octet).into(),
        port: 8080,
        proto: proto::TCP,
        flags: backend_flags::LOCAL,
    }
}

fn desired_service(cluster_ip_octet: u8, backends: &[u8]) -> DesiredService {
    DesiredService {
        frontends: [
            Frontend {
                addr: Ipv4Addr::new(10, 96, 0, cluster_ip_octet).into(),
                port: 80,
                proto: proto::TCP,
                kind: service_flags::CLUSTER_IP,
            },
            Frontend {
                addr: Ipv4Addr::new(203, 0, 113, 1).into(),
                port: 30000 + u16::from(cluster_ip_octet),
                proto: proto::TCP,
                kind: service_flags::NODE_PORT,
            },
        ]
        .into(),
        backends: backends.iter().map(|&octet| backend(octet)).collect(),
        affinity_timeout_s: 0,
        ..Default::default()
    }
}

fn desired(services: &[(&str, u8, &[u8])]) -> Desired {
    Desired {
        services: services
            .iter()
            .map(|(name, ip, backends)| (key(name), desired_service(*ip, backends)))
            .collect(),
        held: BTreeSet::new(),
    }
}

#[test]
fn minimal_updates_and_idempotence() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "rec").expect("pins");
    let mut datapath = Datapath::load(pins.path()).expect("load");
    let mut reconciler = Reconciler::new();

    let first = desired(&[("web", 10, &[10, 11]), ("api", 20, &[11, 12])]);
    let report = reconciler.reconcile(&mut datapath, &first);
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(
        (report.backends_put, report.services_put),
        (3, 2),
        "{report:?}"
    );
    assert_eq!(datapath.frontends().expect("frontends").len(), 4);

    let again = reconciler.reconcile(&mut datapath, &first);
    assert_eq!(
        again.changes(),
        0,
        "a second run changes nothing: {again:?}"
    );

    // One endpoint of web replaced: one backend written, one service rewritten, one backend gone.
    let second = desired(&[("web", 10, &[10, 13]), ("api", 20, &[11, 12])]);
    let report = reconciler.reconcile(&mut datapath, &second);
    assert_eq!(
        (
            report.backends_put,
            report.services_put,
            report.services_removed,
            report.backends_removed
        ),
        (1, 1, 0, 0),
        "{report:?}"
    );
    // 10.244.1.11 is still api's, so it stays. Now drop api: its service goes, and the backends
    // nothing references any more (11, 12) go too.
    let third = desired(&[("web", 10, &[10, 13])]);
    let report = reconciler.reconcile(&mut datapath, &third);
    assert_eq!(
        (report.services_removed, report.backends_removed),
        (1, 2),
        "{report:?}"
    );
    let backends: BTreeSet<Ipv4Addr> = datapath
        .backends()
        .expect("backends")
        .values()
        .map(|b| lab::ipv4(b.addr))
        .collect();
    assert_eq!(
        backends,
        [Ipv4Addr::new(10, 244, 1, 10), Ipv4Addr::new(10, 244, 1, 13)].into()
    );
}

#[test]
fn a_restarted_agent_converges_without_touching_conntrack() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "restart").expect("pins");
    let state = desired(&[("web", 10, &[10]), ("api", 20, &[11])]);
    let ids_before;
    {
        let mut datapath = Datapath::load(pins.path()).expect("load");
        let mut reconciler = Reconciler::new();
        assert!(
            reconciler
                .reconcile(&mut datapath, &state)
                .errors
                .is_empty()
        );
        ids_before = reconciler.service_ids().clone();
        // A flow through the web NodePort, tracked in conntrack.
        let client = "203.0.113.10:40000".parse().expect("addr");
        let frontend = "203.0.113.1:30010".parse().expect("addr");
        let xdp = datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("fd");
        let run =
            test_run(xdp, &packet::tcp(client, frontend, TcpFlags::SYN, b"")).expect("test run");
        assert_eq!(
            run.packet,
            packet::tcp(
                client,
                "10.244.1.10:8080".parse().expect("addr"),
                TcpFlags::SYN,
                b""
            )
        );
    }
    // "Restart": a new Datapath on the same pinned maps, a Reconciler that knows nothing.
    let mut datapath = Datapath::load(pins.path()).expect("reload");
    let conntrack_before = datapath.conntrack().expect("conntrack");
    assert_eq!(
        conntrack_before.len(),
        1,
        "the flow's entry survives the restart"
    );
    let mut reconciler = Reconciler::new();
    let report = reconciler.reconcile(&mut datapath, &state);
    assert_eq!(report.changes(), 0, "{report:?}");
    assert_eq!(
        reconciler.service_ids(),
        &ids_before,
        "service ids adopted from the maps"
    );
    assert_eq!(datapath.conntrack().expect("conntrack"), conntrack_before);
}

#[test]
fn held_services_keep_what_they_had_and_a_full_map_fails_one_service_only() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "held").expect("pins");
    let mut datapath = Datapath::load(pins.path()).expect("load");
    let mut reconciler = Reconciler::new();
    assert!(
        reconciler
            .reconcile(
                &mut datapath,
                &desired(&[("web", 10, &[10]), ("api", 20, &[11])])
            )
            .errors
            .is_empty()
    );

    // api became invalid in its source: compile leaves it out and marks it held.
    let mut next = desired(&[("web", 10, &[10])]);
    next.held.insert(("default".into(), "api".into()));
    let report = reconciler.reconcile(&mut datapath, &next);
    assert_eq!(report.changes(), 0, "{report:?}");
    assert_eq!(
        datapath.installed_services().len(),
        2,
        "api is still installed"
    );

    // A service with more frontends than the map has room for fails alone.
    let mut huge = desired(&[("web", 10, &[10])]);
    let too_many: BTreeSet<Frontend> = (0..lb_common::limits::MAX_FRONTENDS)
        .map(|i| Frontend {
            addr: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + i).into(),
            port: 80,
            proto: proto::TCP,
            kind: service_flags::EXTERNAL_IP,
        })
        .collect();
    huge.services.insert(
        key("huge"),
        DesiredService {
            frontends: too_many,
            backends: BTreeSet::new(),
            affinity_timeout_s: 0,
            ..Default::default()
        },
    );
    huge.services
        .insert(key("zzz-after"), desired_service(30, &[12]));
    let report = reconciler.reconcile(&mut datapath, &huge);
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert_eq!(report.errors[0].0, key("huge"));
    assert!(
        matches!(report.errors[0].1, DatapathError::MapFull { .. }),
        "{report:?}"
    );
    // The service after it in order was still programmed.
    assert!(
        reconciler.service_id(&key("zzz-after")).is_some(),
        "{report:?}"
    );
}

/// The desired state compiled from YAML, for node1.
fn compiled(yaml: &str) -> Desired {
    let mut snapshot = lb_userspace::source::Snapshot::default();
    for object in lb_userspace::source::file::parse_documents(yaml).expect("test YAML") {
        match object {
            lb_userspace::source::file::Object::Service(service) => snapshot.services.push(service),
            lb_userspace::source::file::Object::EndpointSlice(slice) => {
                snapshot.endpoint_slices.push(slice)
            }
            lb_userspace::source::file::Object::Node(_) => {}
        }
    }
    let (desired, problems) = lb_userspace::compile::compile(
        &snapshot,
        &lb_userspace::compile::model::NodeContext::new("node1"),
    );
    assert!(
        problems
            .iter()
            .all(|problem| problem.severity != lb_userspace::compile::model::Severity::Invalid),
        "{problems:?}"
    );
    desired
}

/// A LoadBalancer Service on `lb_ip`:80 with these loadBalancerSourceRanges and one endpoint on
/// node1.
fn ranged_service(name: &str, octet: u8, ranges: &[&str]) -> String {
    let ranges: Vec<String> = ranges.iter().map(|range| format!("\"{range}\"")).collect();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.{octet}\n  loadBalancerSourceRanges: [{}]\n  ports:\n  - {{name: http, port: 80}}\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 198.51.100.{octet}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080, protocol: TCP}}\nendpoints:\n- addresses: [\"10.244.1.{octet}\"]\n  nodeName: node1\n  conditions: {{ready: true}}\n",
        ranges.join(", ")
    )
}

const XDP_DROP: u32 = 1;

/// Whether XDP lets `client` open a flow to the LoadBalancer IP 198.51.100.`octet`:80 (a SYN),
/// or drops it as outside the source ranges (counted as drop_source_range).
fn admitted(datapath: &Datapath, pins: &PinDir, client: &str, octet: u8) -> bool {
    let events = |name| {
        lb_userspace::observe::inspect::PinnedMaps::open(pins.path())
            .expect("pinned maps")
            .events()
            .expect("events")
            .get(name)
            .copied()
            .unwrap_or(0)
    };
    let drops_before = events("drop_source_range");
    let xdp = datapath
        .program_fd(lb_common::program_names::XDP_LB)
        .expect("fd");
    // A new source port each time: a tracked flow would not be checked again.
    static NEXT_PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(40000);
    let port = NEXT_PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let client = format!("{client}:{port}").parse().expect("addr");
    let frontend = format!("198.51.100.{octet}:80").parse().expect("addr");
    let run = test_run(xdp, &packet::tcp(client, frontend, TcpFlags::SYN, b"")).expect("run");
    let dropped = run.verdict == XDP_DROP;
    assert_eq!(
        events("drop_source_range") - drops_before,
        u64::from(dropped),
        "a drop here is a source-range drop, counted"
    );
    !dropped
}

#[test]
fn source_ranges_that_share_a_prefix_entry_are_honoured_until_both_are_gone() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "ranges").expect("pins");
    let mut datapath = Datapath::load(pins.path()).expect("load");
    let mut reconciler = Reconciler::new();
    let mut apply = |datapath: &mut Datapath, yaml: &str| {
        let report = reconciler.reconcile(datapath, &compiled(yaml));
        assert!(report.errors.is_empty(), "{report:?}");
    };

    // a lists 10.0.0.0/8 twice (once with host bits: the same LPM entry), b lists it too.
    apply(
        &mut datapath,
        &(ranged_service("a", 31, &["10.1.2.3/8", "10.0.0.0/8"])
            + &ranged_service("b", 32, &["10.0.0.0/8"])),
    );
    assert!(admitted(&datapath, &pins, "10.9.9.9", 31));
    assert!(admitted(&datapath, &pins, "10.9.9.9", 32));
    assert!(!admitted(&datapath, &pins, "192.0.2.1", 31));

    // One of a's two spellings gone: the other still needs the entry.
    apply(
        &mut datapath,
        &(ranged_service("a", 31, &["10.0.0.0/8"]) + &ranged_service("b", 32, &["10.0.0.0/8"])),
    );
    assert!(admitted(&datapath, &pins, "10.9.9.9", 31));
    apply(
        &mut datapath,
        &(ranged_service("a", 31, &["10.1.2.3/8"]) + &ranged_service("b", 32, &["10.0.0.0/8"])),
    );
    assert!(admitted(&datapath, &pins, "10.9.9.9", 31));

    // b gone: a's entry stays.
    apply(&mut datapath, &ranged_service("a", 31, &["10.1.2.3/8"]));
    assert!(admitted(&datapath, &pins, "10.9.9.9", 31));

    // Both of a's spellings gone: the entry goes with them.
    apply(&mut datapath, &ranged_service("a", 31, &["192.0.2.0/24"]));
    assert!(!admitted(&datapath, &pins, "10.9.9.9", 31));
    assert!(admitted(&datapath, &pins, "192.0.2.1", 31));

    // IPv6 ranges only: no IPv4 client is admitted.
    apply(&mut datapath, &ranged_service("a", 31, &["2001:db8::/32"]));
    assert!(!admitted(&datapath, &pins, "192.0.2.1", 31));
    assert!(!admitted(&datapath, &pins, "10.9.9.9", 31));
}

#[test]
fn the_datapath_refuses_a_source_range_with_host_bits() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "hostbits").expect("pins");
    let mut datapath = Datapath::load(pins.path()).expect("load");
    let mut reconciler = Reconciler::new();
    let mut state = desired(&[("web", 10, &[10])]);
    if let Some(service) = state.services.values_mut().next() {
        service.flags |= service_flags::SOURCE_RANGES;
        service.source_ranges = [(Ipv4Addr::new(10, 1, 2, 3).into(), 8)].into();
    }
    let report = reconciler.reconcile(&mut datapath, &state);
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert!(
        report.errors[0].1.to_string().contains("host bits"),
        "{report:?}"
    );
}

/// One endpoint (10.244.1.10:8080) listed by slices that disagree on its node: web's two slices
/// put it on this node and on another, api's slice on another. Whatever the order of the slices,
/// web's copy is LOCAL (kube-proxy favours the local copy) and api's is not; each keeps a backend
/// entry of its own with stable flags, so syncs that change nothing write nothing, even when
/// every Service port is put again (as a full compile reports them all changed).
#[test]
fn backend_flags_are_stable_when_slices_disagree_on_an_endpoints_node() {
    use std::{collections::BTreeMap, sync::Arc};

    use k8s_openapi::{
        api::{
            core::v1::{Service, ServicePort, ServiceSpec},
            discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
        },
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };
    use lb_userspace::{
        compile::{compile, model::NodeContext},
        source::Snapshot,
    };

    fn service(name: &str, cluster_ip: &str) -> Arc<Service> {
        Arc::new(Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                resource_version: Some("1".into()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(cluster_ip.into()),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        })
    }
    fn slice(name: &str, service: &str, node: &str) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                resource_version: Some("1".into()),
                labels: Some(BTreeMap::from([(
                    "kubernetes.io/service-name".to_owned(),
                    service.to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: vec![Endpoint {
                addresses: vec!["10.244.1.10".into()],
                node_name: Some(node.into()),
                ..Endpoint::default()
            }],
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                protocol: Some("TCP".into()),
                ..EndpointPort::default()
            }]),
        })
    }

    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "recflags").expect("pins");
    let mut datapath = Datapath::load(pins.path()).expect("load");
    let mut reconciler = Reconciler::new();
    let node = NodeContext::new("node-a");
    let snapshot = Snapshot {
        services: vec![service("api", "10.96.0.20"), service("web", "10.96.0.10")],
        endpoint_slices: vec![
            slice("api-1", "api", "node-b"),
            slice("web-a", "web", "node-a"),
            slice("web-b", "web", "node-b"),
        ],
        node: None,
        ..Default::default()
    };
    let mut reversed = snapshot.clone();
    reversed.endpoint_slices.reverse();
    for (sync, snapshot) in [&snapshot, &reversed, &snapshot, &reversed]
        .into_iter()
        .enumerate()
    {
        let (desired, problems) = compile(snapshot, &node);
        assert!(problems.is_empty(), "{problems:?}");
        let every_port: BTreeSet<ServicePortKey> = desired.services.keys().cloned().collect();
        let report = reconciler.reconcile_changed(&mut datapath, &desired, &every_port);
        assert!(report.errors.is_empty(), "{report:?}");
        if sync == 0 {
            assert_eq!(report.backends_put, 2, "{report:?}");
        } else {
            assert_eq!(report.changes(), 0, "sync {sync} wrote: {report:?}");
        }
    }
    let mut flags: Vec<u8> = datapath
        .backends()
        .expect("backends")
        .values()
        .map(|backend| {
            assert_eq!(backend.addr, Ipv4Addr::new(10, 244, 1, 10));
            backend.flags
        })
        .collect();
    flags.sort_unstable();
    assert_eq!(flags, [0, backend_flags::LOCAL]);
}

/// BPF_MAP_FREEZE (include/uapi/linux/bpf.h): from then on the kernel refuses every update and
/// delete of the map from user space with EPERM (`map_get_sys_perms` in kernel/bpf/syscall.c):
/// a real map error, injected without any hook in the agent. A frozen map stays frozen, so only
/// maps under a test's own pin directory are frozen.
fn freeze(pins: &PinDir, map: &str) {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    const BPF_MAP_FREEZE: libc::c_long = 22;
    #[repr(C)]
    struct FreezeAttr {
        map_fd: u32,
    }
    let map = aya::maps::MapData::from_pin(pins.path().join(map)).expect("pinned map");
    let attr = FreezeAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
    };
    // SAFETY: bpf(2) reads size_of::<FreezeAttr>() bytes of a live attr for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_FREEZE,
            &raw const attr,
            size_of::<FreezeAttr>(),
        )
    };
    assert_eq!(rc, 0, "BPF_MAP_FREEZE: {}", std::io::Error::last_os_error());
}

fn cleanup_failures(report: &lb_userspace::reconcile::ReconcileReport) -> Vec<String> {
    report
        .cleanup_failures
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn failed_cleanup_is_reported_and_tried_again_while_the_service_is_programmed() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "cleanup").expect("pins");
    let mut datapath = Datapath::load(pins.path()).expect("load");
    let mut reconciler = Reconciler::new();
    let with_affinity = |backends: &[u8]| {
        let mut state = desired(&[("web", 10, backends)]);
        for service in state.services.values_mut() {
            service.affinity_timeout_s = 60;
        }
        state
    };
    let report = reconciler.reconcile(&mut datapath, &with_affinity(&[10, 11]));
    assert!(
        report.errors.is_empty() && report.cleanup_failures.is_empty(),
        "{report:?}"
    );
    let service_id = reconciler.service_id(&key("web")).expect("web installed");
    let id_of = |datapath: &Datapath, octet: u8| {
        let addr = Ipv4Addr::new(10, 244, 1, octet);
        datapath
            .installed_backends()
            .iter()
            .find(|(_, backend)| backend.addr == addr)
            .map(|(&id, _)| id)
            .expect("backend installed")
    };
    let (kept, leaving) = (id_of(&datapath, 10), id_of(&datapath, 11));
    // A client held to the endpoint that is about to leave, as XDP records it.
    let mut affinity: aya::maps::HashMap<_, lb_common::Affinity4Key, lb_common::AffinityValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(
            aya::maps::MapData::from_pin(pins.path().join(lb_common::map_names::AFFINITY4))
                .expect("affinity pin"),
        ))
        .expect("affinity map");
    let client = lb_common::Affinity4Key {
        client: u64::from(u32::from(Ipv4Addr::new(192, 0, 2, 7))),
        service_id,
        kind: 0,
    };
    let held = lb_common::AffinityValue {
        last_used_ns: 1,
        backend_id: leaving,
        _pad: 0,
    };
    affinity.insert(&client, &held, 0).expect("affinity entry");

    // Releasing that client and removing the unused backend both fail now.
    freeze(&pins, lb_common::map_names::AFFINITY4);
    freeze(&pins, lb_common::map_names::BACKENDS4);
    let report = reconciler.reconcile(&mut datapath, &with_affinity(&[10]));
    assert!(
        report.errors.is_empty(),
        "the service is programmed: {report:?}"
    );
    assert_eq!(report.backends_removed, 0, "{report:?}");
    assert_eq!(
        cleanup_failures(&report),
        [
            format!(
                "map {}: release a client of service {service_id}",
                lb_common::map_names::AFFINITY4
            ),
            format!(
                "map {}: remove backend {leaving}",
                lb_common::map_names::BACKENDS4
            ),
        ],
        "{report:?}"
    );
    let installed = &datapath.installed_services()[&service_id];
    assert_eq!(installed.backends, [kept], "the new table is in force");

    // The unused backend is tried again on the next run (and fails again: the map stays frozen).
    let again = reconciler.reconcile(&mut datapath, &with_affinity(&[10]));
    assert_eq!(
        cleanup_failures(&again),
        [format!(
            "map {}: remove backend {leaving}",
            lb_common::map_names::BACKENDS4
        )],
        "{again:?}"
    );
}

/// The Maglev table of service `id` as the maps hold it: (its size from cell 0, its slots'
/// backend ids), or None without one.
fn maglev_table(pins: &PinDir, id: u32) -> Option<(u32, BTreeSet<u32>)> {
    let tables = lb_userspace::datapath::maps::open_maglev_tables(
        pins.path(),
        lb_userspace::datapath::bpf_obj::Access::ReadOnly,
    )
    .expect("the Maglev tables");
    let table = tables.get(&id, 0).ok()?;
    let size = table.get(&0, 0).expect("cell 0");
    // Cell 0 the size, cell 1 the tag, then the slots.
    let owners = (2..2 + size)
        .map(|cell| table.get(&cell, 0).expect("slot"))
        .collect();
    Some((size, owners))
}

/// Through the reconciler (tables prepared and swapped in together before the services' puts):
/// a Maglev service gets its table, a change of its backends a new one over them, a restarted
/// agent finds it in force and writes nothing, and a removed service's table goes.
#[test]
fn maglev_tables_follow_their_services_through_reconcile_and_a_restart() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "recmaglev").expect("pins");
    let maglev = |backends: &[u8]| {
        let mut state = desired(&[("web", 10, backends), ("plain", 11, &[10])]);
        state.services.get_mut(&key("web")).expect("web").flags |= service_flags::MAGLEV;
        state
    };
    let id_of = |reconciler: &Reconciler| reconciler.service_ids()[&key("web")];
    {
        let mut datapath = Datapath::load(pins.path()).expect("load");
        let mut reconciler = Reconciler::new();
        let report = reconciler.reconcile(&mut datapath, &maglev(&[10, 11]));
        assert!(report.errors.is_empty(), "{report:?}");
        let id = id_of(&reconciler);
        let (size, owners) = maglev_table(&pins, id).expect("web's table");
        assert_eq!(size, 251);
        assert_eq!(owners.len(), 2, "both backends own slots");
        let plain = reconciler.service_ids()[&key("plain")];
        assert!(
            maglev_table(&pins, plain).is_none(),
            "no table without Maglev"
        );

        let report = reconciler.reconcile(&mut datapath, &maglev(&[10, 11, 12]));
        assert!(report.errors.is_empty(), "{report:?}");
        assert_eq!(report.services_put, 1);
        let (size, owners) = maglev_table(&pins, id).expect("web's new table");
        assert_eq!(size, 251, "three backends keep the size");
        assert_eq!(owners.len(), 3);
    }
    // A restarted agent: the same state, nothing to write, the table in force.
    let mut datapath = Datapath::load(pins.path()).expect("reload");
    let mut reconciler = Reconciler::new();
    let report = reconciler.reconcile(&mut datapath, &maglev(&[10, 11, 12]));
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(report.services_put, 0, "{report:?}");
    let id = id_of(&reconciler);
    assert_eq!(
        datapath.installed_services()[&id].maglev_size,
        Some(251),
        "the size read back"
    );
    assert_eq!(maglev_table(&pins, id).expect("still there").1.len(), 3);
    // Removed: its table goes with it.
    let report = reconciler.reconcile(&mut datapath, &desired(&[("plain", 11, &[10])]));
    assert!(report.errors.is_empty(), "{report:?}");
    assert!(
        maglev_table(&pins, id).is_none(),
        "the removed service's table is gone"
    );
}
