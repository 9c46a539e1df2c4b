//! The Rust API over the datapath maps: bad input gets a clear error, a full map a MapFull error,
//! and neither disturbs what is installed.

use std::net::Ipv4Addr;

use lab::lab::{Lab, PinDir};
use lb_common::{limits, map_names, proto, service_flags};
use lb_userspace::{
    compile::model::{Backend, Frontend, Service},
    datapath::{Datapath, DatapathError, ebpf_log::EbpfLogLevel},
};

fn frontend(index: u32) -> Frontend {
    // 10.96.0.0/12 addresses, one port each.
    Frontend {
        addr: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + index).into(),
        port: 80,
        proto: proto::TCP,
        kind: service_flags::CLUSTER_IP,
    }
}

fn service(id: u32, frontends: Vec<Frontend>, backends: Vec<u32>) -> Service {
    Service {
        id,
        frontends,
        backends,
        affinity_timeout_s: 0,
        ..Default::default()
    }
}

#[test]
fn invalid_services_and_backends_are_refused_with_a_reason() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "api").expect("pins");
    let mut datapath = Datapath::load(pins.path()).expect("load");
    let backend = Backend {
        addr: Ipv4Addr::new(10, 244, 1, 10).into(),
        port: 8080,
        proto: proto::TCP,
        flags: 0,
    };
    datapath.put_backend(1, &backend).expect("backend");
    datapath
        .put_service(&service(1, vec![frontend(1)], vec![1]))
        .expect("a good service");

    let refused = [
        (
            "service id out of range",
            service(limits::MAX_SERVICES, vec![frontend(2)], vec![1]),
            "out of range",
        ),
        (
            "unknown backend",
            service(2, vec![frontend(2)], vec![99]),
            "backend 99",
        ),
        ("no frontend", service(2, vec![], vec![1]), "no frontend"),
        (
            "port 0",
            service(
                2,
                vec![Frontend {
                    port: 0,
                    ..frontend(2)
                }],
                vec![1],
            ),
            "port 0",
        ),
        (
            "a protocol the datapath does not serve (DCCP)",
            service(
                2,
                vec![Frontend {
                    proto: 33,
                    ..frontend(2)
                }],
                vec![1],
            ),
            "not TCP, UDP or SCTP",
        ),
        (
            "too many backends",
            service(
                2,
                vec![frontend(2)],
                vec![1; limits::MAX_BACKENDS_PER_SERVICE as usize + 1],
            ),
            "more than",
        ),
        (
            "an IPv6 frontend selecting an IPv4 backend",
            service(
                2,
                vec![Frontend {
                    addr: "2001:db8:96::2".parse().unwrap(),
                    ..frontend(2)
                }],
                vec![1],
            ),
            "both families",
        ),
        (
            "frontends of both families",
            service(
                2,
                vec![
                    frontend(2),
                    Frontend {
                        addr: "2001:db8:96::2".parse().unwrap(),
                        ..frontend(2)
                    },
                ],
                vec![1],
            ),
            "both families",
        ),
        (
            "an IPv6 source range on an IPv4 service",
            Service {
                flags: service_flags::SOURCE_RANGES,
                source_ranges: [("2001:db8::".parse().unwrap(), 32)].into(),
                ..service(2, vec![frontend(2)], vec![1])
            },
            "both families",
        ),
    ];
    for (what, service, reason) in refused {
        match datapath.put_service(&service) {
            Err(DatapathError::Invalid(message)) => {
                assert!(message.contains(reason), "{what}: {message}")
            }
            other => panic!("{what}: expected Invalid, got {other:?}"),
        }
    }
    match datapath.put_backend(limits::MAX_BACKENDS, &backend) {
        Err(DatapathError::Invalid(message)) => {
            assert!(message.contains("out of range"), "{message}")
        }
        other => panic!("backend id out of range: {other:?}"),
    }
    // Nothing of the refused services reached the maps; the good one is intact.
    let frontends = datapath.frontends().expect("frontends");
    assert_eq!(frontends.len(), 1, "{frontends:?}");
    assert_eq!(frontends[0].1.service_id, 1);
    assert_eq!(frontends[0].1.backend_count, 1);
}

/// Backend ids are one space for both families' maps: an id handed out again to a backend of
/// the other family leaves the first family's map, and each family's frontends go to their own
/// map.
#[test]
fn each_family_has_its_own_maps_and_an_id_moves_between_them() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "families").expect("pins");
    let mut datapath = Datapath::load(pins.path()).expect("load");
    let v4 = Backend {
        addr: Ipv4Addr::new(10, 244, 1, 10).into(),
        port: 8080,
        proto: proto::TCP,
        flags: 0,
    };
    let v6 = Backend {
        addr: "2001:db8:244:1::10".parse().unwrap(),
        ..v4
    };
    let maps = || lb_userspace::observe::inspect::PinnedMaps::open(pins.path()).expect("maps");
    let entries = |map: &str| {
        maps()
            .fill()
            .expect("fill")
            .into_iter()
            .find(|fill| fill.map == map)
            .map(|fill| fill.entries)
    };
    datapath.put_backend(1, &v4).expect("IPv4 backend");
    assert_eq!(
        (entries(map_names::BACKENDS4), entries(map_names::BACKENDS6)),
        (Some(1), Some(0))
    );
    datapath.put_backend(1, &v6).expect("the id again, IPv6");
    assert_eq!(
        (entries(map_names::BACKENDS4), entries(map_names::BACKENDS6)),
        (Some(0), Some(1))
    );
    datapath
        .put_service(&service(
            1,
            vec![Frontend {
                addr: "2001:db8:96::1".parse().unwrap(),
                ..frontend(1)
            }],
            vec![1],
        ))
        .expect("an IPv6 service");
    assert_eq!(
        (
            entries(map_names::FRONTENDS4),
            entries(map_names::FRONTENDS6)
        ),
        (Some(0), Some(1))
    );
    let backends = maps().backends().expect("backends");
    assert_eq!(backends[0].address, "[2001:db8:244:1::10]:8080");
    // An IPv6 cell written again: another endpoint (through a vacant cell), then new flags.
    let moved = Backend {
        addr: "2001:db8:244:2::20".parse().unwrap(),
        port: 9090,
        ..v6
    };
    datapath.put_backend(1, &moved).expect("another endpoint");
    let terminating = Backend {
        flags: lb_common::backend_flags::TERMINATING,
        ..moved
    };
    datapath.put_backend(1, &terminating).expect("terminating");
    let backends = maps().backends().expect("backends");
    assert_eq!(
        (
            backends.len(),
            backends[0].address.as_str(),
            backends[0].terminating
        ),
        (1, "[2001:db8:244:2::20]:9090", true)
    );
    datapath.remove_service(1).expect("remove");
    datapath.remove_backend(1).expect("remove backend");
    assert_eq!(
        (
            entries(map_names::FRONTENDS6),
            entries(map_names::BACKENDS6)
        ),
        (Some(0), Some(0))
    );
}

/// The IPv6 backends an agent of an earlier release left in the hash map `lb6_be_v1` move into
/// the array `lb6_be_v2` under the same ids at load, and the hash map's pin goes: on a first
/// upgrade (no array yet) and on an upgrade after a rollback, when the array still holds what
/// this release last wrote and a backend the hash map does not hold must be vacated. An
/// earlier release's hash map is made here as that release made it (no preallocation).
#[test]
fn ipv6_backends_of_an_earlier_release_move_into_the_array() {
    use aya::maps::{HashMap, MapData};
    const BPF_F_NO_PREALLOC: u32 = 1;

    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "be6mig").expect("pins");
    let backend = |last: u16, port: u16| Backend {
        addr: std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x244, 1, 0, 0, 0, last).into(),
        port,
        proto: proto::TCP,
        flags: 0,
    };
    let legacy_of = |backends: &[(u32, Backend)]| {
        let mut legacy = HashMap::<MapData, u32, lb_common::Backend6>::create(
            limits::MAX_BACKENDS,
            BPF_F_NO_PREALLOC,
        )
        .expect("the earlier release's hash map");
        for (id, backend) in backends {
            let std::net::IpAddr::V6(addr) = backend.addr else {
                panic!("an IPv6 backend");
            };
            let value = lb_common::Backend6 {
                addr: lb_userspace::compile::model::ipv6_words(addr),
                port: backend.port.to_be(),
                proto: backend.proto,
                flags: backend.flags,
            };
            legacy.insert(id, &value, 0).expect("legacy entry");
        }
        legacy
            .pin(pins.path().join(map_names::LEGACY_BACKENDS6))
            .expect("pin lb6_be_v1");
    };
    let installed = || {
        lb_userspace::observe::inspect::PinnedMaps::open(pins.path())
            .expect("maps")
            .backends()
            .expect("backends")
            .into_iter()
            .map(|info| (info.id, info.address))
            .collect::<Vec<_>>()
    };

    legacy_of(&[(3, backend(0x10, 8080)), (7, backend(0x11, 9090))]);
    drop(Datapath::load(pins.path()).expect("first upgrade"));
    assert!(!pins.path().join(map_names::LEGACY_BACKENDS6).exists());
    assert_eq!(
        installed(),
        [
            (3, "[2001:db8:244:1::10]:8080".to_owned()),
            (7, "[2001:db8:244:1::11]:9090".to_owned())
        ]
    );

    // Rolled back: the earlier release wrote its hash map again (7 moved, 3 gone, 5 new),
    // while the array kept this release's 3 and 7 and one more, 9.
    let mut datapath = Datapath::load(pins.path()).expect("load");
    datapath
        .put_backend(9, &backend(0x12, 80))
        .expect("backend 9");
    drop(datapath);
    legacy_of(&[(5, backend(0x13, 53)), (7, backend(0x14, 9091))]);
    drop(Datapath::load(pins.path()).expect("upgrade again"));
    assert!(!pins.path().join(map_names::LEGACY_BACKENDS6).exists());
    assert_eq!(
        installed(),
        [
            (5, "[2001:db8:244:1::13]:53".to_owned()),
            (7, "[2001:db8:244:1::14]:9091".to_owned())
        ]
    );
}

#[test]
fn a_full_frontends_map_is_an_error_and_keeps_what_is_installed() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "full").expect("pins");
    let mut datapath = Datapath::load(pins.path()).expect("load");
    let per_service = 4096;
    let services = limits::MAX_FRONTENDS / per_service;
    for id in 0..services {
        let frontends = (0..per_service)
            .map(|i| frontend(id * per_service + i))
            .collect();
        datapath
            .put_service(&service(id, frontends, vec![]))
            .expect("filling the map");
    }
    let overflow = service(services, vec![frontend(limits::MAX_FRONTENDS)], vec![]);
    match datapath.put_service(&overflow) {
        Err(DatapathError::MapFull { map, capacity, .. }) => {
            assert_eq!(
                (map, capacity),
                (map_names::FRONTENDS4, limits::MAX_FRONTENDS)
            );
        }
        other => panic!("expected MapFull, got {other:?}"),
    }
    assert_eq!(
        datapath.frontends().expect("frontends").len(),
        limits::MAX_FRONTENDS as usize
    );
    // Updating an installed service needs no new entry, so it still works.
    let backend = Backend {
        addr: Ipv4Addr::new(10, 244, 1, 10).into(),
        port: 8080,
        proto: proto::TCP,
        flags: 0,
    };
    datapath.put_backend(1, &backend).expect("backend");
    let frontends = (0..per_service).map(frontend).collect();
    datapath
        .put_service(&service(0, frontends, vec![1]))
        .expect("update in a full map");
    // And removing makes room again.
    datapath.remove_service(1).expect("remove");
    datapath
        .put_service(&overflow)
        .expect("fits after a removal");
}

#[test]
fn loading_removes_the_pins_of_maps_an_earlier_release_retired() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "retired").expect("pins");
    std::fs::create_dir_all(pins.path()).expect("pin dir");
    // What an earlier release left: its config map under its old name.
    let retired = pins.path().join(map_names::RETIRED[0]);
    aya::maps::HashMap::<aya::maps::MapData, u32, u32>::create(1, 0)
        .expect("map")
        .pin(&retired)
        .expect("pin");
    let _datapath = Datapath::load(pins.path()).expect("load");
    assert!(!retired.exists(), "{} is still pinned", retired.display());
    assert!(pins.path().join(map_names::CONFIG).exists());
}

/// Which of `destinations` have their bit in the frontend filter XDP passes the node's own
/// traffic with, read from its pin.
fn marked(pins: &PinDir, destinations: &[(Ipv4Addr, u16)]) -> Vec<(Ipv4Addr, u16)> {
    let map = aya::maps::MapData::from_pin(pins.path().join(map_names::FRONTEND_FILTER))
        .expect("frontend filter pin");
    let words = aya::maps::Array::<_, u64>::try_from(aya::maps::Map::Array(map)).expect("array");
    destinations
        .iter()
        .copied()
        .filter(|&(addr, port)| {
            let bit = lb_common::frontend_filter::bit(u32::from(addr), port, proto::TCP);
            words.get(&(bit >> 6), 0).expect("word") & (1 << (bit & 63)) != 0
        })
        .collect()
}

#[test]
fn the_frontend_filter_marks_exactly_the_frontends_destinations() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "fefilt").expect("pins");
    let on = |index: u32, port: u16| Frontend {
        port,
        ..frontend(index)
    };
    let at = |frontend: Frontend| (lab::ipv4(frontend.addr), frontend.port);
    let (a80, b80, b8443, b30080) = (on(1, 80), on(2, 80), on(2, 8443), on(2, 30080));
    // The node's own traffic: another port of a frontend's address, another address.
    let own = [
        (lab::ipv4(a80.addr), 22),
        (Ipv4Addr::new(203, 0, 113, 1), 80),
    ];
    let probe: Vec<(Ipv4Addr, u16)> = [a80, b80, b8443, b30080]
        .map(at)
        .into_iter()
        .chain(own)
        .collect();
    {
        let mut datapath = Datapath::load(pins.path()).expect("load");
        assert!(marked(&pins, &probe).is_empty(), "nothing yet");
        datapath
            .put_service(&service(1, vec![a80], vec![]))
            .expect("a");
        datapath
            .put_service(&service(2, vec![b80, b8443], vec![]))
            .expect("b");
        assert_eq!(marked(&pins, &probe), [at(a80), at(b80), at(b8443)]);
        datapath.remove_service(1).expect("remove a");
        assert_eq!(marked(&pins, &probe), [at(b80), at(b8443)]);
        datapath
            .put_service(&service(2, vec![b80, b30080], vec![]))
            .expect("b changed");
        assert_eq!(marked(&pins, &probe), [at(b80), at(b30080)]);
    }
    // A stale bit (as an older agent could leave) is gone after a load, and the live ones are
    // back before any program is attached.
    let map =
        aya::maps::MapData::from_pin(pins.path().join(map_names::FRONTEND_FILTER)).expect("pin");
    let mut words =
        aya::maps::Array::<_, u64>::try_from(aya::maps::Map::Array(map)).expect("array");
    for (addr, port) in [own[0], at(b80)] {
        let bit = lb_common::frontend_filter::bit(u32::from(addr), port, proto::TCP);
        let stale = if (addr, port) == own[0] { u64::MAX } else { 0 };
        words.set(bit >> 6, &stale, 0).expect("stale word");
    }
    let mut datapath = Datapath::load(pins.path()).expect("reload");
    assert_eq!(marked(&pins, &probe), [at(b80), at(b30080)]);
    datapath.remove_service(2).expect("remove b");
    assert!(marked(&pins, &probe).is_empty());
}

/// Service 1 on `frontend(1)` with one local backend, 10.244.1.10:8080, which it returns.
fn install_one_local_backend(datapath: &mut Datapath) -> Backend {
    let backend = Backend {
        addr: Ipv4Addr::new(10, 244, 1, 10).into(),
        port: 8080,
        proto: proto::TCP,
        flags: lb_common::backend_flags::LOCAL,
    };
    datapath.put_backend(1, &backend).expect("backend");
    datapath
        .put_service(&service(1, vec![frontend(1)], vec![1]))
        .expect("service");
    backend
}

/// CLOCK_MONOTONIC as the test reads it (clock_gettime), independent of the datapath's clock.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec for the call to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    assert_eq!(rc, 0);
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

#[test]
fn the_programs_clock_is_calibrated_at_load_and_stamps_flows_with_monotonic_time() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "clock").expect("pins");
    let mut datapath = Datapath::load(pins.path()).expect("load");
    let clock = datapath.clock().expect("a calibrated clock");
    let tick = clock.ns_per_jiffy;
    assert!(
        lb_common::JiffiesClock::KERNEL_HZ
            .iter()
            .any(|&hz| lb_common::JiffiesClock::tick_nsec(hz) == tick),
        "{clock:?}"
    );

    install_one_local_backend(&mut datapath);
    let xdp = datapath
        .program_fd(lb_common::program_names::XDP_LB)
        .expect("xdp");
    let client = "192.0.2.7:40000".parse().expect("client");
    let syn = lab::packet::tcp(
        client,
        std::net::SocketAddrV4::new(lab::ipv4(frontend(1).addr), 80),
        lab::packet::TcpFlags::SYN,
        b"",
    );
    let before = monotonic_ns();
    lb_userspace::datapath::testrun::test_run(xdp, &syn).expect("run");
    let after = monotonic_ns();
    let entries = datapath.conntrack().expect("conntrack");
    assert_eq!(
        entries.len(),
        1,
        "one entry for a flow to a local pod: {entries:?}"
    );
    for (key, value) in entries {
        // The coarse time of the last tick: up to a tick (and the calibration's rounding, at
        // most another) behind the moment the packet ran.
        assert!(
            value.last_seen_ns + 2 * tick >= before && value.last_seen_ns <= after,
            "{key:?}: last seen {} not within [{before} - 2 ticks, {after}] (tick {tick} ns)",
            value.last_seen_ns
        );
    }
}

/// tc egress skips the conntrack lookup for packets from no backend (the backend filter), but a
/// flow keeps its backend after the backend leaves the maps: its answers are still translated,
/// also by the programs of a new load (an agent restart), which rebuilds the filter from the
/// backends and the flows in conntrack.
#[test]
fn answers_of_a_flow_whose_backend_left_the_maps_are_translated_also_after_a_reload() {
    use lab::packet::{self, TcpFlags};
    use lb_userspace::datapath::testrun::test_run;
    const TC_ACT_OK: u32 = 0;

    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "befilt").expect("pins");
    let mut datapath = Datapath::load(pins.path()).expect("load");
    let backend = install_one_local_backend(&mut datapath);
    let client = "192.0.2.7:40000".parse().expect("client");
    let frontend = std::net::SocketAddrV4::new(lab::ipv4(frontend(1).addr), 80);
    let endpoint = std::net::SocketAddrV4::new(lab::ipv4(backend.addr), backend.port);
    let xdp = datapath
        .program_fd(lb_common::program_names::XDP_LB)
        .expect("xdp");
    test_run(xdp, &packet::tcp(client, frontend, TcpFlags::SYN, b"")).expect("syn");

    let answer = packet::tcp(endpoint, client, TcpFlags::SYN_ACK, b"");
    let translated = packet::tcp(frontend, client, TcpFlags::SYN_ACK, b"");
    let through_tc = |datapath: &Datapath, packet: &[u8]| {
        let tc = datapath
            .program_fd(lb_common::program_names::TC_EGRESS)
            .expect("tc");
        let out = test_run(tc, packet).expect("tc run");
        assert_eq!(out.verdict, TC_ACT_OK);
        out.packet
    };
    assert_eq!(
        through_tc(&datapath, &answer),
        translated,
        "while installed"
    );

    datapath.remove_service(1).expect("remove service");
    datapath.remove_backend(1).expect("remove backend");
    assert_eq!(
        through_tc(&datapath, &answer),
        translated,
        "after the backend left the maps"
    );

    drop(datapath);
    let reloaded = Datapath::load(pins.path()).expect("reload");
    assert_eq!(through_tc(&reloaded, &answer), translated, "after a reload");
    // From no backend at all: untouched.
    let other = packet::tcp(
        "10.244.1.99:8080".parse().expect("other"),
        client,
        TcpFlags::ACK,
        b"",
    );
    assert_eq!(through_tc(&reloaded, &other), other);
}

/// The verifier walks every path of a program and refuses one that takes more than a million
/// instructions to walk (BPF_COMPLEXITY_LIMIT_INSNS, kernel/bpf/verifier.c). A change that
/// adds a lookup inside a bounded loop can multiply that count: each program must leave a
/// quarter of the limit free, so that growth shows here, with its figure, before a load fails.
#[test]
fn every_program_leaves_a_quarter_of_the_verifiers_limit_free() {
    const VERIFIER_LIMIT: u32 = 1_000_000;
    let lab = Lab::new().expect("lab");
    // With the programs' logging off (the default) and at its most verbose, which the verifier
    // walks in full: at off it must prune the logging (fewer instructions walked).
    let mut lb_xdp_walked = Vec::new();
    for level in [EbpfLogLevel::Off, EbpfLogLevel::Trace] {
        let pins = PinDir::new(&lab, &format!("insns{}", level as u8)).expect("pins");
        let mut datapath = Datapath::load_with_log_level(pins.path(), level).expect("load");
        // Each group loaded at a start only where a frontend of it is installed, or before the
        // first one.
        for group in lb_userspace::datapath::XdpGroup::ALL {
            datapath
                .ensure_xdp_group(group)
                .expect("the group's XDP programs");
        }
        let mut counts = Vec::new();
        for name in lb_userspace::datapath::pins::PROGRAMS {
            let info = aya::programs::ProgramInfo::from_pin(pins.path().join(name))
                .unwrap_or_else(|error| panic!("{name}: {error}"));
            let count = info.verified_instruction_count().unwrap_or_else(|| {
                panic!("{name}: the kernel reports no verified instruction count")
            });
            counts.push((name, count));
        }
        println!("instructions the verifier walked, eBPF log level {level:?}: {counts:?}");
        lb_xdp_walked.push(counts[0].1);
        for (name, count) in counts {
            assert!(
                count <= VERIFIER_LIMIT / 4 * 3,
                "{name} at log level {level:?}: the verifier walked {count} instructions, more \
                 than three quarters of its limit of {VERIFIER_LIMIT}"
            );
        }
    }
    assert!(
        lb_xdp_walked[0] < lb_xdp_walked[1],
        "lb_xdp walked {lb_xdp_walked:?} instructions at log levels off and trace: the logging \
         is not pruned at off"
    );
}

/// The groups of programs `lb_xdp` tail-calls (IPv4 UDP, IPv4 SCTP, the IPv6 pipeline: 0.7,
/// 1.2 and 1.8 s of the verifier's CPU; SCTP over IPv6 on top of the last) are verified only where they have something to serve:
/// not at the start of a datapath without a frontend of theirs, whose packets for them pass
/// untouched (counted), but before the first such frontend is written, and at any start that
/// finds one installed. A start that does not load a group unpins an earlier load's programs of
/// it (no lb_xdp of the new load calls them).
#[test]
fn each_xdp_program_group_is_loaded_for_its_first_frontend_and_at_a_start_that_finds_one() {
    use lb_userspace::datapath::{XdpGroup, testrun::test_run};
    use std::net::{Ipv6Addr, SocketAddrV4, SocketAddrV6};
    const XDP_PASS: u32 = 2;
    const XDP_TX: u32 = 3;
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "lazy").expect("pins");
    let pinned = |group: XdpGroup| -> Vec<Option<u32>> {
        group
            .program_names()
            .map(|name| {
                aya::programs::ProgramInfo::from_pin(pins.path().join(name))
                    .ok()
                    .map(|info| info.id())
            })
            .collect()
    };
    let node4 = Ipv4Addr::new(203, 0, 113, 1);
    let client4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 7), 40000);
    let node6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
    let client6 = SocketAddrV6::new(
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10),
        40000,
        0,
        0,
    );
    let node_port = |addr: std::net::IpAddr, port: u16, proto: u8| Frontend {
        addr,
        port,
        proto,
        kind: service_flags::NODE_PORT,
    };
    // Each group's frontend (a NodePort without endpoints: REJECT, answered with XDP_TX once
    // the group serves it) and a packet to it.
    let rows = [
        (
            XdpGroup::Udp,
            node_port(node4.into(), 30053, proto::UDP),
            lab::packet::udp(client4, SocketAddrV4::new(node4, 30053), b"query"),
        ),
        (
            XdpGroup::Sctp,
            node_port(node4.into(), 30054, proto::SCTP),
            // An INIT (chunk type 1).
            lab::packet::sctp(client4, SocketAddrV4::new(node4, 30054), 1, 0, &[0; 16]),
        ),
        (
            XdpGroup::Ipv6,
            node_port(node6.into(), 30080, proto::TCP),
            lab::packet6::tcp(
                client6,
                SocketAddrV6::new(node6, 30080, 0, 0),
                lab::packet::TcpFlags::SYN,
                1000,
                b"",
            ),
        ),
        (
            XdpGroup::Ipv6Sctp,
            node_port(node6.into(), 30132, proto::SCTP),
            lab::packet6::sctp(
                client6,
                SocketAddrV6::new(node6, 30132, 0, 0),
                1,
                0,
                &[0; 16],
            ),
        ),
    ];

    let mut datapath = Datapath::load(pins.path()).expect("load");
    // IPv4 TCP is lb_xdp's own: the program it hands the packets to whose client key it
    // looks up is there from the start.
    let lookup = aya::programs::ProgramInfo::from_pin(
        pins.path().join(lb_common::program_names::XDP_LOOKUP),
    );
    assert!(lookup.is_ok(), "lb_xdp_lookup loaded with lb_xdp");
    datapath
        .put_service(&service(1, vec![frontend(1)], vec![]))
        .expect("an IPv4 TCP service");
    let mut loaded = Vec::new();
    for (index, (group, frontend, packet)) in rows.iter().enumerate() {
        assert!(
            pinned(*group).iter().all(Option::is_none),
            "{group:?}: verified before a frontend of it"
        );
        let xdp = datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("lb_xdp");
        let run = test_run(xdp, packet).expect("run");
        // A packet to no frontend is a miss `lb_xdp` passes itself, before any tail call, group
        // or not: no program is missed.
        assert_eq!(
            (run.verdict, &run.packet),
            (XDP_PASS, packet),
            "{group:?}: passed untouched"
        );
        assert_eq!(
            datapath.events().expect("events")["pass_protocol_unserved"],
            0,
            "{group:?}"
        );

        datapath
            .put_service(&service(2 + index as u32, vec![*frontend], vec![]))
            .expect("the group's first service");
        let ids = pinned(*group);
        assert!(ids.iter().all(Option::is_some), "{group:?}: {ids:?}");
        let xdp = datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("lb_xdp");
        let run = test_run(xdp, packet).expect("run");
        assert_eq!(
            run.verdict, XDP_TX,
            "{group:?}: served (a service without endpoints, REJECT)"
        );
        assert_eq!(
            datapath.events().expect("events")["pass_protocol_unserved"],
            0,
            "{group:?}"
        );
        loaded.push(ids);
    }
    drop(datapath);

    // A start that finds every group's frontend verifies and pins its own programs of each.
    let mut restarted = Datapath::load(pins.path()).expect("a start on these pins");
    for ((group, _, _), before) in rows.iter().zip(&loaded) {
        let after = pinned(*group);
        assert!(
            after
                .iter()
                .zip(before)
                .all(|(new, old)| new.is_some() && new != old),
            "{group:?}: {before:?} -> {after:?}"
        );
    }
    // Without the groups' frontends, the next start loads none of them, and unpins the last's.
    for index in 0..rows.len() {
        restarted
            .remove_service(2 + index as u32)
            .expect("remove the group's service");
    }
    drop(restarted);
    let _tcp_only = Datapath::load(pins.path()).expect("a start without them");
    for (group, _, _) in &rows {
        assert!(
            pinned(*group).iter().all(Option::is_none),
            "{group:?}: still pinned"
        );
    }
}

/// How many programs are attached directly to `cgroup` for `attach_type`, as the kernel reports
/// them (BPF_PROG_QUERY), not as the datapath's pins say.
fn programs_attached(cgroup: &lab::lab::Cgroup, attach_type: u32) -> u32 {
    use std::os::fd::AsRawFd as _;
    const BPF_PROG_QUERY: libc::c_long = 16;
    #[repr(C)]
    #[derive(Default)]
    struct QueryAttr {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
    }
    let dir = std::fs::File::open(cgroup.path()).expect("open the cgroup");
    let mut attr = QueryAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_type,
        ..Default::default()
    };
    // SAFETY: attr is a valid bpf_attr prefix (query) of the size passed, alive for the call;
    // prog_ids 0 asks for the count alone.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut QueryAttr,
            size_of::<QueryAttr>(),
        )
    };
    assert_eq!(
        result,
        0,
        "BPF_PROG_QUERY: {}",
        std::io::Error::last_os_error()
    );
    attr.prog_cnt
}

/// The check of pods' packets against loadBalancerSourceRanges (`lb_sock_egress4`) runs on
/// every packet of every socket in the cgroup, so it is attached only while an installed service
/// has ranges: from before such a service's frontends are written until the last one is gone,
/// and a new load takes over or removes what an earlier one left.
#[test]
fn the_source_range_egress_check_is_attached_only_while_a_service_has_ranges() {
    // include/uapi/linux/bpf.h, enum bpf_attach_type.
    const BPF_CGROUP_INET_EGRESS: u32 = 1;
    const BPF_CGROUP_INET4_CONNECT: u32 = 10;
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "egress").expect("pins");
    let cgroup = lab::lab::Cgroup::new(&lab, "egress").expect("cgroup");
    // A link whose last pin goes is freed by a kernel work item (kernel/bpf/syscall.c,
    // bpf_link_put), so a detach shows a moment later: the count is polled for a second.
    let egress = || {
        let mut count = programs_attached(&cgroup, BPF_CGROUP_INET_EGRESS);
        for _ in 0..100 {
            if count == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            count = programs_attached(&cgroup, BPF_CGROUP_INET_EGRESS);
        }
        count
    };
    let backend = Backend {
        addr: Ipv4Addr::new(10, 244, 1, 10).into(),
        port: 8080,
        proto: proto::TCP,
        flags: 0,
    };
    let ranged = Service {
        flags: service_flags::SOURCE_RANGES,
        source_ranges: [(Ipv4Addr::new(192, 0, 2, 0).into(), 24)].into(),
        ..service(
            2,
            vec![Frontend {
                addr: Ipv4Addr::new(198, 51, 100, 7).into(),
                port: 443,
                proto: proto::TCP,
                kind: service_flags::LOAD_BALANCER,
            }],
            vec![1],
        )
    };
    let unranged = Service {
        flags: 0,
        source_ranges: Default::default(),
        ..ranged.clone()
    };

    let mut datapath = Datapath::load(pins.path()).expect("load");
    datapath.put_backend(1, &backend).expect("backend");
    datapath
        .put_service(&service(1, vec![frontend(1)], vec![1]))
        .expect("a service without ranges");
    datapath.attach_cgroup(cgroup.path()).expect("attach");
    assert_eq!(programs_attached(&cgroup, BPF_CGROUP_INET4_CONNECT), 1);
    assert_eq!(egress(), 0, "no service has ranges");

    datapath.put_service(&ranged).expect("ranges gained");
    assert_eq!(egress(), 1, "a service has ranges");
    datapath.put_service(&unranged).expect("ranges dropped");
    assert_eq!(egress(), 0, "its ranges went");
    datapath.put_service(&ranged).expect("ranges again");
    datapath.remove_service(2).expect("remove");
    assert_eq!(egress(), 0, "the ranged service went");

    // A new load finding a ranged service takes the check over; one whose services lost their
    // ranges before it attached removes the link the earlier load left.
    datapath.put_service(&ranged).expect("ranges again");
    drop(datapath);
    let mut datapath = Datapath::load(pins.path()).expect("load again");
    datapath.attach_cgroup(cgroup.path()).expect("attach again");
    assert_eq!(egress(), 1, "taken over");
    drop(datapath);
    let mut datapath = Datapath::load(pins.path()).expect("load a third time");
    datapath.remove_service(2).expect("remove before attaching");
    assert_eq!(egress(), 1, "nothing attached yet: the earlier link stays");
    datapath
        .attach_cgroup(cgroup.path())
        .expect("attach a third time");
    assert_eq!(egress(), 0, "the earlier link removed");
    assert_eq!(programs_attached(&cgroup, BPF_CGROUP_INET4_CONNECT), 1);
}
