//! The Rust API over the datapath maps: bad input gets a clear error, a full map a MapFull error,
//! and neither disturbs what is installed.

use std::net::Ipv4Addr;

use lab::lab::{Lab, PinDir};
use lb_common::{limits, map_names, proto, service_flags};
use lb_userspace::datapath::{Backend, Datapath, DatapathError, Frontend, Service};

fn frontend(index: u32) -> Frontend {
    // 10.96.0.0/12 addresses, one port each.
    Frontend {
        addr: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + index),
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
        addr: Ipv4Addr::new(10, 244, 1, 10),
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
            "sctp",
            service(
                2,
                vec![Frontend {
                    proto: 132,
                    ..frontend(2)
                }],
                vec![1],
            ),
            "not TCP or UDP",
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
        addr: Ipv4Addr::new(10, 244, 1, 10),
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
