//! The frontend index XDP reads frontends from (`lb4_feidx_v2`): through BPF_PROG_TEST_RUN on a
//! real kernel, what XDP does with each state of a bucket and with the selection table a slot
//! carries, and that the agent's writes keep every frontend served while entries change, buckets
//! overflow and the agent restarts.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    path::Path,
};

use aya::maps::{Array, MapData};
use lab::{
    lab::{Lab, PinDir},
    packet::{self, TcpFlags},
    packet6,
};
use lb_common::{
    FrontendKey, FrontendSlot4, FrontendSlot6, ServiceValue, backend_flags, frontend_filter,
    frontend_index, map_names, proto, scope, service_flags,
};
use lb_userspace::{
    compile::model::{Backend, Frontend, Service, ipv6_words},
    datapath::{Datapath, bpf_obj::Access, maps::open_map, testrun::test_run},
};

const XDP_PASS: u32 = 2;
const CLIENT: &str = "192.0.2.7";

fn index(pins: &Path) -> Array<MapData, FrontendSlot4> {
    open_map(pins, map_names::FRONTEND_INDEX4, Access::ReadWrite).expect("index")
}

fn frontend_at(addr: Ipv4Addr) -> Frontend {
    Frontend {
        addr: addr.into(),
        port: 80,
        proto: proto::TCP,
        kind: service_flags::CLUSTER_IP,
    }
}

fn key_of(addr: Ipv4Addr) -> FrontendKey<u32> {
    FrontendKey {
        addr: u32::from(addr).to_be(),
        port: 80u16.to_be(),
        proto: proto::TCP,
        scope: scope::ANY,
    }
}

/// The first slot of the bucket of `addr`:80/TCP, by the layout XDP and the agent share.
fn bucket_of(addr: Ipv4Addr) -> u32 {
    frontend_index::first_slot(frontend_filter::bit(u32::from(addr), 80, proto::TCP))
}

/// Three ClusterIPs of 10.96.0.0/12 whose port-80 frontends share a bucket, found by the hash
/// among scattered addresses.
fn three_in_one_bucket() -> [Ipv4Addr; 3] {
    let mut by_bucket: HashMap<u32, Vec<Ipv4Addr>> = HashMap::new();
    let mut state: u32 = 0x9e37_79b9;
    loop {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let addr = Ipv4Addr::from(0x0a60_0000 | (state & 0x000f_ffff));
        let addrs = by_bucket.entry(bucket_of(addr)).or_default();
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
        if addrs.len() == 3 {
            return [addrs[0], addrs[1], addrs[2]];
        }
    }
}

/// Backend `id` on this node: 10.244.1.`id`:8080.
fn put_backend(datapath: &mut Datapath, id: u32) {
    let backend = Backend {
        addr: Ipv4Addr::new(10, 244, 1, id as u8).into(),
        port: 8080,
        proto: proto::TCP,
        flags: backend_flags::LOCAL,
    };
    datapath.put_backend(id, &backend).expect("backend");
}

fn put_service(datapath: &mut Datapath, id: u32, addr: Ipv4Addr, backends: Vec<u32>) {
    let service = Service {
        id,
        frontends: vec![frontend_at(addr)],
        backends,
        ..Default::default()
    };
    datapath.put_service(&service).expect("service");
}

/// Where XDP sends a new connection to `addr`:80 from a fresh client port: the destination it
/// wrote into the SYN, or None when it passed the SYN untouched.
fn destination(datapath: &Datapath, addr: Ipv4Addr, client_port: u16) -> Option<SocketAddrV4> {
    let xdp = datapath
        .program_fd(lb_common::program_names::XDP_LB)
        .expect("xdp");
    let client = SocketAddrV4::new(CLIENT.parse().expect("client"), client_port);
    let syn = packet::tcp(client, SocketAddrV4::new(addr, 80), TcpFlags::SYN, b"");
    let run = test_run(xdp, &syn).expect("run");
    assert_eq!(
        run.verdict, XDP_PASS,
        "a local endpoint's SYN goes to the stack"
    );
    if run.packet == syn {
        return None;
    }
    let daddr = Ipv4Addr::new(
        run.packet[30],
        run.packet[31],
        run.packet[32],
        run.packet[33],
    );
    let dport = u16::from_be_bytes([run.packet[36], run.packet[37]]);
    Some(SocketAddrV4::new(daddr, dport))
}

fn backend_addr(id: u32) -> Option<SocketAddrV4> {
    Some(SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, id as u8), 8080))
}

/// The slot of `addr`'s bucket whose key is `addr`'s (live or not).
fn slot_of(slots: &Array<MapData, FrontendSlot4>, addr: Ipv4Addr) -> u32 {
    let first = bucket_of(addr);
    (first..first + frontend_index::BUCKET_SLOTS)
        .find(|slot| slots.get(slot, 0).expect("slot").head.key == key_of(addr))
        .unwrap_or_else(|| panic!("no slot of {addr}"))
}

/// Changes one slot behind the agent's back (as no agent would).
fn edit_slot(
    slots: &mut Array<MapData, FrontendSlot4>,
    slot: u32,
    edit: impl FnOnce(&mut FrontendSlot4),
) {
    let mut contents = slots.get(&slot, 0).expect("slot");
    edit(&mut contents);
    slots.set(slot, &contents, 0).expect("write");
}

/// The selection table the slot of `addr` carries (empty: none).
fn carried(pins: &Path, addr: Ipv4Addr) -> Vec<u32> {
    let slots = index(pins);
    let slot = slots.get(&slot_of(&slots, addr), 0).expect("slot");
    slot.backends[..usize::from(slot.head.inline_backends)].to_vec()
}

/// The live slots of `addr`'s bucket (their keys' entries) and the bucket's overflow byte.
fn bucket(pins: &Path, addr: Ipv4Addr) -> (Vec<(FrontendKey<u32>, ServiceValue)>, u8) {
    let index = index(pins);
    let first = bucket_of(addr);
    let live = (first..first + frontend_index::BUCKET_SLOTS)
        .map(|slot| index.get(&slot, 0).expect("slot").head)
        .filter(|head| head.live != 0)
        .map(|head| (head.key, head.value))
        .collect();
    let overflow = index.get(&first, 0).expect("slot").head.overflow;
    (live, overflow)
}

#[test]
fn xdp_takes_a_frontend_from_its_bucket_and_the_map_only_behind_the_overflow_byte() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "feidx-xdp").expect("pins");
    let mut datapath = Datapath::load(pins.path()).expect("load");
    put_backend(&mut datapath, 1);
    let [served, unlisted, _] = three_in_one_bucket();
    put_service(&mut datapath, 1, served, vec![1]);
    assert_eq!(destination(&datapath, served, 40000), backend_addr(1));
    let (live, overflow) = bucket(pins.path(), served);
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].0, key_of(served));
    assert_eq!(overflow, 0);

    // A frontend whose entry leaves the frontends map behind the agent's back (as no agent
    // would): XDP serves it from its slot alone, and not once the slot is no longer live.
    put_service(&mut datapath, 2, unlisted, vec![1]);
    let map = MapData::from_pin(pins.path().join(map_names::FRONTENDS4)).expect("pin");
    let mut frontends = aya::maps::HashMap::<_, FrontendKey<u32>, ServiceValue>::try_from(
        aya::maps::Map::HashMap(map),
    )
    .expect("hash");
    frontends
        .remove(&key_of(unlisted))
        .expect("remove from the map");
    assert_eq!(destination(&datapath, unlisted, 40002), backend_addr(1));
    let mut slots = index(pins.path());
    let slot = slot_of(&slots, unlisted);
    edit_slot(&mut slots, slot, |slot| slot.head.live = 0);
    assert_eq!(destination(&datapath, unlisted, 40003), None);

    // The frontends map's entry is read only behind the bucket's overflow byte.
    let slot = slot_of(&slots, served);
    edit_slot(&mut slots, slot, |slot| slot.head.live = 0);
    assert_eq!(destination(&datapath, served, 40004), None);
    edit_slot(&mut slots, bucket_of(served), |slot| slot.head.overflow = 1);
    assert_eq!(destination(&datapath, served, 40005), backend_addr(1));
}

#[test]
fn frontends_that_share_a_bucket_are_all_served_and_the_overflow_clears_when_one_leaves() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "feidx-share").expect("pins");
    let mut datapath = Datapath::load(pins.path()).expect("load");
    let addrs = three_in_one_bucket();
    for (id, addr) in (1..).zip(addrs) {
        put_backend(&mut datapath, id);
        put_service(&mut datapath, id, addr, vec![id]);
    }
    for (id, addr) in (1..).zip(addrs) {
        assert_eq!(
            destination(&datapath, addr, 40000),
            backend_addr(id),
            "{addr}"
        );
    }
    let (live, overflow) = bucket(pins.path(), addrs[0]);
    let live_keys: Vec<FrontendKey<u32>> = live.iter().map(|(key, _)| *key).collect();
    assert_eq!(live_keys.len(), 2);
    assert_eq!(overflow, 1, "the third frontend is in the map alone");
    assert_eq!(datapath.frontend_index_counts(), (2, 1));

    datapath.remove_service(1).expect("remove");
    assert_eq!(destination(&datapath, addrs[0], 40001), None);
    assert!(datapath.frontend_index_needs_refill());
    // The third frontend goes into the freed slot after one grace period, and the bucket's
    // overflow byte after another.
    datapath.refill_frontend_index().expect("refill");
    assert_eq!(bucket(pins.path(), addrs[0]).1, 1);
    assert_eq!(destination(&datapath, addrs[2], 40001), backend_addr(3));
    datapath.refill_frontend_index().expect("refill");
    assert!(!datapath.frontend_index_needs_refill());
    let (live, overflow) = bucket(pins.path(), addrs[0]);
    let mut live_keys: Vec<FrontendKey<u32>> = live.iter().map(|(key, _)| *key).collect();
    live_keys.sort();
    let mut expected = vec![key_of(addrs[1]), key_of(addrs[2])];
    expected.sort();
    assert_eq!(live_keys, expected);
    assert_eq!(overflow, 0);
    assert_eq!(datapath.frontend_index_counts(), (2, 0));
    assert_eq!(destination(&datapath, addrs[0], 40002), None);
    assert_eq!(destination(&datapath, addrs[1], 40002), backend_addr(2));
    assert_eq!(destination(&datapath, addrs[2], 40002), backend_addr(3));
}

#[test]
fn a_changed_frontend_selects_from_its_new_table_before_and_after_the_refill() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "feidx-change").expect("pins");
    let mut datapath = Datapath::load(pins.path()).expect("load");
    let [a, b, _] = three_in_one_bucket();
    for id in 1..=3 {
        put_backend(&mut datapath, id);
    }
    // Both slots of the bucket taken: a's new entry has nowhere to go until the refill.
    put_service(&mut datapath, 1, a, vec![1]);
    put_service(&mut datapath, 2, b, vec![2]);
    assert_eq!(destination(&datapath, a, 40000), backend_addr(1));

    put_service(&mut datapath, 1, a, vec![3]);
    let (live, overflow) = bucket(pins.path(), a);
    assert_eq!(live.len(), 1, "a's slot waits for a grace period");
    assert_eq!(overflow, 1);
    for port in 40001..40009 {
        assert_eq!(destination(&datapath, a, port), backend_addr(3));
    }
    datapath.refill_frontend_index().expect("refill");
    assert_eq!(bucket(pins.path(), a).0.len(), 2);
    for port in 40009..40011 {
        assert_eq!(destination(&datapath, a, port), backend_addr(3));
    }
    datapath.refill_frontend_index().expect("refill");
    assert!(!datapath.frontend_index_needs_refill());
    let (live, overflow) = bucket(pins.path(), a);
    assert_eq!(live.len(), 2);
    assert_eq!(overflow, 0);
    for port in 40011..40019 {
        assert_eq!(destination(&datapath, a, port), backend_addr(3));
    }
    assert_eq!(destination(&datapath, b, 40020), backend_addr(2));
}

#[test]
fn a_restarted_agent_keeps_what_is_current_and_retires_what_is_not() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "feidx-restart").expect("pins");
    let [a, b, stray] = three_in_one_bucket();
    {
        let mut datapath = Datapath::load(pins.path()).expect("load");
        put_backend(&mut datapath, 1);
        put_backend(&mut datapath, 2);
        put_service(&mut datapath, 1, a, vec![1]);
        put_service(&mut datapath, 2, b, vec![2]);
    }
    // While no agent runs: b's slot is taken over by a frontend no map has, and a's carries a
    // table the slot array does not hold for a's entry (as an earlier release's agent can
    // leave it: it writes no table, and a's entry can name the same cells again with other
    // backends in them).
    let mut slots = index(pins.path());
    let slot = slot_of(&slots, b);
    edit_slot(&mut slots, slot, |slot| slot.head.key = key_of(stray));
    let slot = slot_of(&slots, a);
    edit_slot(&mut slots, slot, |slot| slot.backends[0] = 2);
    assert_eq!(
        bucket(pins.path(), a).0.len(),
        2,
        "a and the stray entry are live"
    );

    let datapath = Datapath::load(pins.path()).expect("reload");
    assert_eq!(destination(&datapath, stray, 40000), None);
    assert_eq!(destination(&datapath, a, 40001), backend_addr(1));
    assert_eq!(destination(&datapath, b, 40002), backend_addr(2));
    let (live, overflow) = bucket(pins.path(), a);
    let mut live_keys: Vec<FrontendKey<u32>> = live.iter().map(|(key, _)| *key).collect();
    live_keys.sort();
    let mut expected = vec![key_of(a), key_of(b)];
    expected.sort();
    assert_eq!(live_keys, expected);
    assert_eq!(overflow, 0);
    assert_eq!(datapath.frontend_index_counts(), (2, 0));
    assert_eq!(
        carried(pins.path(), a),
        [1],
        "placed again with the slot array's table"
    );
    assert_eq!(carried(pins.path(), b), [2], "placed again with its table");
    for port in 40003..40011 {
        assert_eq!(destination(&datapath, a, port), backend_addr(1));
    }
}

#[test]
fn a_new_flow_selects_from_the_table_its_slot_carries_and_from_the_slot_array_beyond_it() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "feidx-table").expect("pins");
    let mut datapath = Datapath::load(pins.path()).expect("load");
    for id in 1..=9 {
        put_backend(&mut datapath, id);
    }
    let [small, large, _] = three_in_one_bucket();
    put_service(&mut datapath, 1, small, vec![1]);
    assert_eq!(carried(pins.path(), small), [1]);
    assert_eq!(destination(&datapath, small, 40000), backend_addr(1));

    // The slot's copy is what XDP reads: changed behind the agent's back (as no agent would),
    // it wins over the slot array, until the slot says it carries no table.
    let mut slots = index(pins.path());
    let slot = slot_of(&slots, small);
    edit_slot(&mut slots, slot, |slot| slot.backends[0] = 2);
    assert_eq!(destination(&datapath, small, 40001), backend_addr(2));
    edit_slot(&mut slots, slot, |slot| slot.head.inline_backends = 0);
    assert_eq!(destination(&datapath, small, 40002), backend_addr(1));

    // Seven backends fit in a slot, eight do not: every backend is reached either way.
    // Each table from client ports of its own: a SYN of a live flow keeps that flow's backend.
    for (ports, backends) in [
        (41000..41400, (1..=7).collect::<Vec<u32>>()),
        (42000..42400, (1..=8).collect()),
    ] {
        put_service(&mut datapath, 2, large, backends.clone());
        datapath.refill_frontend_index().expect("refill");
        let expected_carried = if backends.len() <= 7 {
            backends.clone()
        } else {
            vec![]
        };
        assert_eq!(carried(pins.path(), large), expected_carried);
        let mut reached = BTreeSet::new();
        for port in ports {
            let to = destination(&datapath, large, port).expect("a backend");
            let id = u32::from(to.ip().octets()[3]);
            assert!(backends.contains(&id), "{to} is not one of {backends:?}");
            reached.insert(id);
        }
        assert_eq!(reached.len(), backends.len(), "{reached:?}");
    }
}

/// The IPv6 twin of the test above, through `lb_xdp6_flow`, to which the slot's number goes
/// with the packet in a tail call.
#[test]
fn an_ipv6_new_flow_selects_from_the_table_its_slot_carries_and_from_the_slot_array_beyond_it() {
    const SERVICE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x96, 0, 0, 0, 0, 0x10);
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "feidx-table6").expect("pins");
    let mut datapath = Datapath::load(pins.path()).expect("load");
    let backend6 = |id: u32| {
        SocketAddrV6::new(
            Ipv6Addr::new(0x2001, 0xdb8, 0x244, 0, 0, 0, 0, id as u16),
            8080,
            0,
            0,
        )
    };
    for id in 1..=5 {
        let backend = Backend {
            addr: IpAddr::V6(*backend6(id).ip()),
            port: 8080,
            proto: proto::TCP,
            flags: backend_flags::LOCAL,
        };
        datapath.put_backend(id, &backend).expect("backend");
    }
    let put = |datapath: &mut Datapath, backends: Vec<u32>| {
        let frontend = Frontend {
            addr: SERVICE.into(),
            port: 80,
            proto: proto::TCP,
            kind: service_flags::CLUSTER_IP,
        };
        let service = Service {
            id: 1,
            frontends: vec![frontend],
            backends,
            ..Default::default()
        };
        datapath.put_service(&service).expect("service");
        datapath.refill_frontend_index().expect("refill");
    };
    let destination = |datapath: &Datapath, client_port: u16| {
        let xdp = datapath
            .program_fd(lb_common::program_names::XDP_LB)
            .expect("xdp");
        let client = SocketAddrV6::new("2001:db8:c::7".parse().expect("client"), client_port, 0, 0);
        let syn = packet6::tcp(
            client,
            SocketAddrV6::new(SERVICE, 80, 0, 0),
            TcpFlags::SYN,
            1,
            b"",
        );
        let run = test_run(xdp, &syn).expect("run");
        assert_eq!(
            run.verdict, XDP_PASS,
            "a local endpoint's SYN goes to the stack"
        );
        let daddr: [u8; 16] = run.packet[38..54].try_into().expect("16 bytes");
        let dport = u16::from_be_bytes([run.packet[56], run.packet[57]]);
        SocketAddrV6::new(daddr.into(), dport, 0, 0)
    };
    let key = FrontendKey {
        addr: ipv6_words(SERVICE),
        port: 80u16.to_be(),
        proto: proto::TCP,
        scope: scope::ANY,
    };
    let first = frontend_index::first_slot(frontend_filter::bit6(key.addr, 80, proto::TCP));
    let mut slots: Array<MapData, FrontendSlot6> =
        open_map(pins.path(), map_names::FRONTEND_INDEX6, Access::ReadWrite).expect("index6");
    let live_slot = |slots: &Array<MapData, FrontendSlot6>| {
        (first..first + frontend_index::BUCKET_SLOTS)
            .map(|slot| (slot, slots.get(&slot, 0).expect("slot")))
            .find(|(_, contents)| contents.head.live != 0 && contents.head.key == key)
            .expect("the frontend's live slot")
    };

    put(&mut datapath, vec![1]);
    let (slot, mut contents) = live_slot(&slots);
    assert_eq!(contents.head.inline_backends, 1);
    assert_eq!(contents.backends, [1, 0, 0, 0]);
    assert_eq!(destination(&datapath, 40000), backend6(1));
    // Changed behind the agent's back (as no agent would): the slot's copy is what XDP reads.
    contents.backends[0] = 2;
    slots.set(slot, &contents, 0).expect("write");
    assert_eq!(destination(&datapath, 40001), backend6(2));

    // Four backends fit in an IPv6 slot, five do not: every backend is reached either way.
    for (ports, backends) in [
        (41000..41400, (1..=4).collect::<Vec<u32>>()),
        (42000..42400, (1..=5).collect()),
    ] {
        put(&mut datapath, backends.clone());
        let (_, contents) = live_slot(&slots);
        let carried = &contents.backends[..usize::from(contents.head.inline_backends)];
        let expected: &[u32] = if backends.len() <= 4 { &backends } else { &[] };
        assert_eq!(carried, expected);
        let mut reached = BTreeSet::new();
        for port in ports {
            let to = destination(&datapath, port);
            let id = u32::from(to.ip().segments()[7]);
            assert!(
                backends.contains(&id) && to.port() == 8080,
                "{to} is not one of {backends:?}"
            );
            reached.insert(id);
        }
        assert_eq!(reached.len(), backends.len(), "{reached:?}");
    }
}
