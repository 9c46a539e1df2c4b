//! Selection tables in the slot array (`lb4_slot_v2`): a changed table moves to free cells and
//! the old ones are reused; a packet that finds another service's cells selects nothing; the
//! tables an earlier release kept in the hash map `lb4_slot_v1` are moved into the array at load.
//! The backends array (`lb4_be_v2`): a removed backend's cell is vacated, never selected; the
//! backends an earlier release kept in the hash map `lb4_be_v1` are moved into it at load.
//! Real (test-private) pinned maps, packets through BPF_PROG_TEST_RUN.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    sync::atomic::{AtomicU16, Ordering},
};

use aya::maps::{Array, HashMap, Map, MapData};
use lab::{
    lab::{Lab, PinDir},
    packet::{self, TcpFlags},
};
use lb_common::{
    Backend4, Frontend4Key, LegacySlotKey, ServiceValue, Slot, map_names, program_names, proto,
    service_flags,
};
use lb_userspace::{
    compile::model::{Backend, Frontend, Service},
    datapath::{Datapath, testrun::test_run},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 7), 40_000);

fn frontend(index: u8) -> Frontend {
    Frontend {
        addr: Ipv4Addr::new(10, 96, 0, index).into(),
        port: 80,
        proto: proto::TCP,
        kind: service_flags::CLUSTER_IP,
    }
}

fn backend_addr(id: u32) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, id as u8), 8080)
}

fn service(id: u32, frontend_index: u8, backends: Vec<u32>) -> Service {
    Service {
        id,
        frontends: vec![frontend(frontend_index)],
        backends,
        ..Default::default()
    }
}

fn load_with_backends(pins: &PinDir) -> Datapath {
    let mut datapath = Datapath::load(pins.path()).expect("load");
    for id in 1..=4 {
        let addr = backend_addr(id);
        let backend = Backend {
            addr: IpAddr::V4(*addr.ip()),
            port: addr.port(),
            proto: proto::TCP,
            flags: 0,
        };
        datapath.put_backend(id, &backend).expect("backend");
    }
    datapath
}

/// Where a new flow from `client` to the frontend goes: the verdict and, for a pass, the
/// destination the packet was rewritten to.
fn new_flow(
    datapath: &Datapath,
    client: SocketAddrV4,
    frontend_index: u8,
) -> (u32, Option<SocketAddrV4>) {
    let IpAddr::V4(frontend_addr) = frontend(frontend_index).addr else {
        unreachable!("an IPv4 frontend")
    };
    let to = SocketAddrV4::new(frontend_addr, 80);
    let syn = packet::tcp(client, to, TcpFlags::SYN, b"");
    let program = datapath
        .program_fd(program_names::XDP_LB)
        .expect("xdp program");
    let run = test_run(program, &syn).expect("test run");
    let destination = (run.verdict == XDP_PASS).then(|| {
        let ip = &run.packet[14..34];
        let tcp = &run.packet[34..38];
        SocketAddrV4::new(
            Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
            u16::from_be_bytes([tcp[2], tcp[3]]),
        )
    });
    (run.verdict, destination)
}

/// A client no flow has come from yet (a flow keeps its backend, so every look at a table
/// needs new ones).
fn fresh_client() -> SocketAddrV4 {
    static NEXT: AtomicU16 = AtomicU16::new(10_000);
    SocketAddrV4::new(*CLIENT.ip(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The backends new flows to a frontend reach, over enough clients to see each of a few.
fn reached(datapath: &Datapath, frontend_index: u8, clients: u16) -> Vec<SocketAddrV4> {
    let mut seen = Vec::new();
    for _ in 0..clients {
        let client = fresh_client();
        let (verdict, destination) = new_flow(datapath, client, frontend_index);
        assert_eq!(verdict, XDP_PASS, "client {client}");
        let destination = destination.expect("rewritten");
        if !seen.contains(&destination) {
            seen.push(destination);
        }
    }
    seen.sort();
    seen
}

fn addrs(ids: &[u32]) -> Vec<SocketAddrV4> {
    let mut addrs: Vec<_> = ids.iter().copied().map(backend_addr).collect();
    addrs.sort();
    addrs
}

fn frontend_value(datapath: &Datapath, frontend_index: u8) -> ServiceValue {
    let key = frontend(frontend_index).key();
    datapath
        .frontends()
        .expect("frontends")
        .into_iter()
        .find(|(k, _)| *k == key)
        .map(|(_, value)| value)
        .expect("frontend entry")
}

/// Replaces a frontend's entry where XDP reads it, its slot of the frontend index, and in the
/// frontends map; the slot carries `table` (empty: none, as for a table too large for a slot,
/// and XDP reads the slot array).
fn overwrite_frontend(pins: &PinDir, key: Frontend4Key, value: ServiceValue, table: &[u32]) {
    let map = MapData::from_pin(pins.path().join(map_names::FRONTENDS4)).expect("pin");
    let mut frontends =
        HashMap::<_, Frontend4Key, ServiceValue>::try_from(Map::HashMap(map)).expect("hash");
    frontends.insert(&key, &value, 0).expect("overwrite");
    let index = MapData::from_pin(pins.path().join(map_names::FRONTEND_INDEX4)).expect("pin");
    let mut index =
        Array::<_, lb_common::FrontendSlot4>::try_from(Map::Array(index)).expect("array");
    let bit =
        lb_common::frontend_filter::bit(u32::from_be(key.addr), u16::from_be(key.port), key.proto);
    let first = lb_common::frontend_index::first_slot(bit);
    let slot = (first..first + lb_common::frontend_index::BUCKET_SLOTS)
        .find(|slot| {
            let head = index.get(slot, 0).expect("slot").head;
            head.live != 0 && head.key == key
        })
        .expect("the frontend's slot");
    let mut contents = index.get(&slot, 0).expect("slot");
    contents.head.value = value;
    contents.head.inline_backends = table.len() as u8;
    contents.backends = [0; 7];
    contents.backends[..table.len()].copy_from_slice(table);
    index.set(slot, &contents, 0).expect("overwrite the slot");
}

#[test]
fn a_changed_table_moves_to_free_cells_and_old_cells_are_reused() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "slots").expect("pins");
    let mut datapath = load_with_backends(&pins);
    datapath.put_service(&service(1, 1, vec![1, 2])).expect("a");
    datapath.put_service(&service(2, 2, vec![3])).expect("b");
    let (a, b) = (frontend_value(&datapath, 1), frontend_value(&datapath, 2));
    assert_eq!((a.slots, a.backend_count), (1, 2), "cell 0 is never used");
    assert_eq!((b.slots, b.backend_count), (3, 1));
    assert_eq!(reached(&datapath, 1, 64), addrs(&[1, 2]));
    assert_eq!(reached(&datapath, 2, 8), addrs(&[3]));

    // A's new table goes past B's; its old cells are the first free ones after.
    datapath
        .put_service(&service(1, 1, vec![2, 3, 4]))
        .expect("a changed");
    assert_eq!(frontend_value(&datapath, 1).slots, 4);
    assert_eq!(reached(&datapath, 1, 96), addrs(&[2, 3, 4]));
    datapath.put_service(&service(3, 3, vec![4])).expect("c");
    assert_eq!(frontend_value(&datapath, 3).slots, 1);
    assert_eq!(reached(&datapath, 3, 8), addrs(&[4]));

    // The tables survive a new load (a restart of the agent) as they were.
    drop(datapath);
    let datapath = Datapath::load(pins.path()).expect("reload");
    let installed = datapath.installed_services();
    assert_eq!(installed[&1].backends, [2, 3, 4]);
    assert_eq!(
        (installed[&2].slots, installed[&2].backends.clone()),
        (3, vec![3])
    );
    assert_eq!(reached(&datapath, 1, 96), addrs(&[2, 3, 4]));
}

#[test]
fn a_packet_that_finds_another_services_cells_selects_nothing() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "slotguard").expect("pins");
    let mut datapath = load_with_backends(&pins);
    datapath.put_service(&service(1, 1, vec![1])).expect("a");
    datapath.put_service(&service(2, 2, vec![2])).expect("b");
    // What a packet sees that read A's entry just before A's table moved and B's was written
    // into A's old cells: A's service id with cells now marked as B's.
    let a = frontend_value(&datapath, 1);
    let b = frontend_value(&datapath, 2);
    overwrite_frontend(
        &pins,
        frontend(1).key().v4().expect("IPv4"),
        ServiceValue {
            slots: b.slots,
            ..a
        },
        &[],
    );
    let before = datapath.events().expect("events")["drop_backend_missing"];
    assert_eq!(new_flow(&datapath, fresh_client(), 1), (XDP_DROP, None));
    let after = datapath.events().expect("events")["drop_backend_missing"];
    assert_eq!(after, before + 1, "the drop is counted with its reason");
    assert_eq!(reached(&datapath, 2, 8), addrs(&[2]), "B is untouched");
}

#[test]
fn tables_an_earlier_release_kept_in_the_hash_map_are_moved_into_the_array() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "slotmigr").expect("pins");
    {
        let mut datapath = load_with_backends(&pins);
        datapath.put_service(&service(1, 1, vec![1])).expect("a");
        datapath.put_service(&service(2, 2, vec![1])).expect("b");
    }
    // What an agent of the earlier release leaves: frontend entries with the revision of their
    // table and no cells, and the tables in lb4_slot_v1 (here unlike what the array holds).
    let legacy_path = pins.path().join(map_names::LEGACY_SLOTS4);
    let mut legacy = HashMap::<MapData, LegacySlotKey, u32>::create(64, 0).expect("legacy map");
    let tables: [(u32, u8, u16, &[u32]); 2] = [(1, 1, 7, &[3, 4]), (2, 2, 0, &[2, 3, 4])];
    for (service_id, frontend_index, revision, backends) in tables {
        for (slot, backend) in (0..).zip(backends) {
            let key = LegacySlotKey {
                service_id,
                revision,
                slot,
            };
            legacy.insert(&key, backend, 0).expect("legacy slot");
        }
        let value = ServiceValue {
            service_id,
            backend_count: backends.len() as u16,
            legacy_revision: revision,
            flags: service_flags::CLUSTER_IP,
            ..Default::default()
        };
        overwrite_frontend(
            &pins,
            frontend(frontend_index).key().v4().expect("IPv4"),
            value,
            &[],
        );
    }
    legacy.pin(&legacy_path).expect("pin legacy map");

    let datapath = Datapath::load(pins.path()).expect("load after the earlier release");
    assert!(!legacy_path.exists(), "the retired map is unpinned");
    let installed = datapath.installed_services();
    assert_eq!(installed[&1].backends, [3, 4]);
    assert_eq!(installed[&2].backends, [2, 3, 4]);
    for frontend_index in [1, 2] {
        let value = frontend_value(&datapath, frontend_index);
        assert_ne!(value.slots, 0, "frontend {frontend_index} points at cells");
    }
    assert_eq!(reached(&datapath, 1, 64), addrs(&[3, 4]));
    assert_eq!(reached(&datapath, 2, 96), addrs(&[2, 3, 4]));
}

#[test]
fn backends_an_earlier_release_kept_in_the_hash_map_are_moved_into_the_array() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "bemigr").expect("pins");
    // This release ran before (an upgrade, then a rollback, then this upgrade again): its array
    // holds backends 1 to 4, which the earlier release removed or reused meanwhile.
    drop(load_with_backends(&pins));
    // What an agent of the earlier release leaves: its backends in lb4_be_v1, by id.
    let legacy_path = pins.path().join(map_names::LEGACY_BACKENDS4);
    let mut legacy = HashMap::<MapData, u32, Backend4>::create(64, 0).expect("legacy map");
    for id in [2, 3, 9] {
        let addr = backend_addr(id);
        let value = Backend4 {
            addr: u32::from(*addr.ip()).to_be(),
            port: addr.port().to_be(),
            proto: proto::TCP,
            flags: 0,
        };
        legacy.insert(&id, &value, 0).expect("legacy backend");
    }
    legacy.pin(&legacy_path).expect("pin legacy map");

    let mut datapath = Datapath::load(pins.path()).expect("load after the earlier release");
    assert!(!legacy_path.exists(), "the retired map is unpinned");
    let backends = datapath.backends().expect("backends");
    assert_eq!(
        backends.keys().copied().collect::<Vec<_>>(),
        [2, 3, 9],
        "the earlier release's backends, and no cell of this release's last run"
    );
    assert_eq!(
        backends[&9].addr,
        IpAddr::V4(*backend_addr(9).ip()),
        "same id, same backend"
    );
    // The programs of this load find them under their ids.
    datapath
        .put_service(&service(1, 1, vec![2, 9]))
        .expect("service");
    assert_eq!(reached(&datapath, 1, 64), addrs(&[2, 9]));
}

#[test]
fn backends_of_a_first_upgrade_are_moved_into_a_new_array() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "befirst").expect("pins");
    // No agent of this layout ran here: the earlier release's hash map is all there is.
    let legacy_path = pins.path().join(map_names::LEGACY_BACKENDS4);
    let mut legacy = HashMap::<MapData, u32, Backend4>::create(64, 0).expect("legacy map");
    for id in [1, 5, 7] {
        let addr = backend_addr(id);
        let value = Backend4 {
            addr: u32::from(*addr.ip()).to_be(),
            port: addr.port().to_be(),
            proto: proto::TCP,
            flags: 0,
        };
        legacy.insert(&id, &value, 0).expect("legacy backend");
    }
    legacy.pin(&legacy_path).expect("pin legacy map");

    let mut datapath = Datapath::load(pins.path()).expect("load after the earlier release");
    assert!(!legacy_path.exists(), "the retired map is unpinned");
    let backends = datapath.backends().expect("backends");
    assert_eq!(backends.keys().copied().collect::<Vec<_>>(), [1, 5, 7]);
    assert_eq!(backends[&5].addr, IpAddr::V4(*backend_addr(5).ip()));
    datapath
        .put_service(&service(1, 1, vec![1, 7]))
        .expect("service");
    assert_eq!(reached(&datapath, 1, 64), addrs(&[1, 7]));
}

#[test]
fn a_removed_backend_is_vacated_and_never_selected_again() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "bevacate").expect("pins");
    let mut datapath = load_with_backends(&pins);
    datapath
        .put_service(&service(1, 1, vec![1, 2]))
        .expect("service");
    assert_eq!(reached(&datapath, 1, 64), addrs(&[1, 2]));
    datapath
        .put_service(&service(1, 1, vec![1]))
        .expect("without 2");
    datapath.remove_backend(2).expect("remove 2");
    assert!(!datapath.backends().expect("backends").contains_key(&2));
    // A table that still names the vacated backend (what a packet sees that read its frontend
    // just before the agent's change) selects nothing there: the drop is counted. First the
    // copy of the table in the frontend's index slot, then the slot array's cell.
    let value = frontend_value(&datapath, 1);
    let key = frontend(1).key().v4().expect("IPv4");
    overwrite_frontend(&pins, key, value, &[2]);
    let before = datapath.events().expect("events")["drop_backend_missing"];
    assert_eq!(new_flow(&datapath, fresh_client(), 1), (XDP_DROP, None));
    let after = datapath.events().expect("events")["drop_backend_missing"];
    assert_eq!(after, before + 1);
    overwrite_frontend(&pins, key, value, &[]);
    let cell = value.slots;
    let slots = MapData::from_pin(pins.path().join(map_names::SLOTS4)).expect("pin");
    let mut slots = Array::<_, Slot>::try_from(Map::Array(slots)).expect("array");
    let naming_2 = Slot {
        service_id: 1,
        backend_id: 2,
    };
    slots.set(cell, &naming_2, 0).expect("overwrite the cell");
    let before = datapath.events().expect("events")["drop_backend_missing"];
    assert_eq!(new_flow(&datapath, fresh_client(), 1), (XDP_DROP, None));
    let after = datapath.events().expect("events")["drop_backend_missing"];
    assert_eq!(after, before + 1);
    // Put back under the same id, it is a backend again.
    let addr = backend_addr(2);
    let backend = Backend {
        addr: IpAddr::V4(*addr.ip()),
        port: addr.port(),
        proto: proto::TCP,
        flags: 0,
    };
    datapath.put_backend(2, &backend).expect("backend 2 again");
    assert_eq!(reached(&datapath, 1, 16), addrs(&[2]));
}
