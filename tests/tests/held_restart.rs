//! A Service held at its last good state (its current spec is invalid) keeps that state across a
//! restart of the agent: the new run finds it in the pinned maps by the Service's ClusterIP and
//! keeps it until the Service is fixed or deleted. Real (test-private) pinned maps.

use std::{collections::BTreeSet, net::Ipv4Addr};

use lab::lab::{Lab, PinDir};
use lb_userspace::{
    compile::{
        compile, held_cluster_ips,
        model::{Desired, NodeContext},
    },
    datapath::Datapath,
    reconcile::Reconciler,
    source::{
        Snapshot,
        file::{Object, parse_documents},
    },
};

const API_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 31);

fn service(name: &str, ip: Ipv4Addr, annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n{annotations}spec:\n  clusterIP: {ip}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080, protocol: TCP}}\nendpoints:\n- addresses: [\"10.244.1.{}\"]\n  nodeName: node1\n  conditions: {{ready: true}}\n---\n",
        ip.octets()[3]
    )
}

/// An annotation compile refuses for the whole Service (so it is held).
const INVALID: &str = "  annotations: {lb.example/load-balancing: bogus}\n";

fn snapshot(yaml: &str) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for object in parse_documents(yaml).expect("test YAML") {
        match object {
            Object::Service(service) => snapshot.services.push(service),
            Object::EndpointSlice(slice) => snapshot.endpoint_slices.push(slice),
            Object::Node(_) => {}
        }
    }
    snapshot
}

fn compiled(snapshot: &Snapshot) -> Desired {
    compile(snapshot, &NodeContext::new("node1")).0
}

/// The ClusterIPs the maps serve.
fn served(datapath: &Datapath) -> BTreeSet<Ipv4Addr> {
    datapath
        .installed_services()
        .values()
        .flat_map(|service| service.frontends.keys())
        .map(|key| lab::ipv4(key.addr()))
        .collect()
}

/// A new agent run on the maps: a fresh reconciler, told the held Services' ClusterIPs as the
/// agent tells it before its first run.
fn restart(
    pins: &PinDir,
    yaml: &str,
) -> (
    Datapath,
    Reconciler,
    lb_userspace::reconcile::ReconcileReport,
) {
    let mut datapath = Datapath::load(pins.path()).expect("load");
    let snapshot = snapshot(yaml);
    let desired = compiled(&snapshot);
    let mut reconciler = Reconciler::new();
    reconciler.recover_held(held_cluster_ips(&snapshot, &desired));
    let report = reconciler.reconcile(&mut datapath, &desired);
    (datapath, reconciler, report)
}

#[test]
fn a_held_service_keeps_its_last_good_state_across_a_restart_until_fixed_or_deleted() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "heldrst").expect("pins");
    let annotation_key = lb_userspace::compile::LOAD_BALANCING_ANNOTATION;
    let invalid = INVALID.replace("lb.example/load-balancing", annotation_key);
    let good = service("api", API_IP, "") + &service("web", WEB_IP, "");
    let broken = service("api", API_IP, &invalid) + &service("web", WEB_IP, "");
    {
        let (datapath, _, report) = restart(&pins, &good);
        assert!(report.errors.is_empty(), "{report:?}");
        assert_eq!(served(&datapath), [API_IP, WEB_IP].into());
    }
    assert!(
        compiled(&snapshot(&broken))
            .held
            .contains(&("default".to_owned(), "api".to_owned())),
        "api is held"
    );
    // Restarted while api's spec is invalid: api keeps what it had.
    let (mut datapath, mut reconciler, report) = restart(&pins, &broken);
    assert_eq!(report.services_removed, 0, "{report:?}");
    assert_eq!(served(&datapath), [API_IP, WEB_IP].into());
    // Fixed: api's ports are installed anew, the recovered state goes, nothing else changes.
    let report = reconciler.reconcile(&mut datapath, &compiled(&snapshot(&good)));
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(
        report.services_removed, 1,
        "the recovered state: {report:?}"
    );
    assert_eq!(served(&datapath), [API_IP, WEB_IP].into());
    assert_eq!(datapath.installed_services().len(), 2, "no leftover");
    drop(datapath);

    // Held across another restart, then deleted: its recovered state goes with it.
    let (mut datapath, mut reconciler, report) = restart(&pins, &broken);
    assert_eq!(report.services_removed, 0, "{report:?}");
    let only_web = service("web", WEB_IP, "");
    let report = reconciler.reconcile(&mut datapath, &compiled(&snapshot(&only_web)));
    assert_eq!(report.services_removed, 1, "{report:?}");
    assert_eq!(served(&datapath), [WEB_IP].into());
}
