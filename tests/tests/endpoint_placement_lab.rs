//! Endpoints without a nodeName (hand-made EndpointSlices of selector-less Services) with the real
//! agent in the lab: the agent places them by node1's routes, so a NodePort flow to the one behind
//! node1's pod bridge is handed to the local stack (its reply leaves through the NIC, where tc
//! reverses the NAT) and the one behind node2 is SNATed there and back. Before, both counted as
//! remote: the local one was SNATed, its reply came back on the pod interface where nothing
//! reverses the SNAT, and the connection failed. The placement follows node1's routes as they
//! change, with no change to the objects.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Instant,
};

use lab::{
    agent::{
        AgentLab, POD_PORT, SYNC_TIMEOUT, dual_stack_agent, lb_json, node_port_service,
        service_of_families, with_node_port,
    },
    peer::ClientRun,
    topology::{node_addr, node_addr6, pod_addr, pod_addr6},
};

/// An EndpointSlice for `service` whose endpoints (all of one family) name no node.
fn slice_without_node_names<A: Into<IpAddr> + Copy>(service: &str, endpoints: &[A]) -> String {
    let family = match endpoints.first().map(|addr| (*addr).into()) {
        Some(IpAddr::V6(_)) => "IPv6",
        _ => "IPv4",
    };
    let mut yaml = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: {family}\nports:\n- {{name: http, port: {POD_PORT}, protocol: TCP}}\nendpoints:\n"
    );
    for addr in endpoints {
        let addr: IpAddr = (*addr).into();
        yaml.push_str(&format!(
            "- addresses: [\"{addr}\"]\n  conditions: {{ready: true}}\n"
        ));
    }
    yaml
}

/// Whether `lb backends` shows the backend at `addr` as local.
fn backend_is_local(lab: &AgentLab, addr: impl Into<IpAddr>) -> bool {
    let backends = lb_json(lab.pin_dir(), &["backends"]).expect("lb backends");
    let address = SocketAddr::new(addr.into(), POD_PORT).to_string();
    backends
        .as_array()
        .expect("a list")
        .iter()
        .find(|backend| backend["address"] == address.as_str())
        .unwrap_or_else(|| panic!("no backend {address}: {backends}"))["local"]
        .as_bool()
        .expect("local is a bool")
}

#[test]
fn node_port_reaches_endpoints_without_node_name_on_this_node_and_on_another() {
    let mut lab = AgentLab::new().expect("lab");
    lab.start_agent(&[]).expect("agent");
    let (here, there) = (pod_addr(1, 0), pod_addr(2, 0));
    let node_port = format!("{}:30080", node_addr(1));

    for (what, endpoints, servers) in [
        ("only on this node", vec![here], vec!["n1p0"]),
        ("only on node2", vec![there], vec!["n2p0"]),
        ("on both nodes", vec![here, there], vec!["n1p0", "n2p0"]),
    ] {
        lab.apply(
            "web.yaml",
            &(node_port_service("web", "10.96.0.10", 30080, "")
                + "---\n"
                + &slice_without_node_names("web", &endpoints)),
        )
        .expect("apply");
        for &addr in &endpoints {
            assert_eq!(
                backend_is_local(&lab, addr),
                addr == here,
                "{what}: {addr} placed by node1's routes"
            );
        }
        for run in [
            ClientRun::tcp(&node_port, 40),
            ClientRun {
                one_flow: true,
                ..ClientRun::tcp(&node_port, 10)
            },
        ] {
            let report = run.run(&lab.cluster.client, None).expect("client");
            report.assert_all_ok(what);
            if !run.one_flow {
                assert_eq!(
                    report.servers(),
                    servers.iter().copied().collect(),
                    "{what}"
                );
            }
        }
    }
}

/// Waits until `lb backends` shows the backend at `addr` as local (or not).
fn wait_for_placement(lab: &AgentLab, addr: impl Into<IpAddr>, local: bool, what: &str) {
    let addr: IpAddr = addr.into();
    let deadline = Instant::now() + SYNC_TIMEOUT;
    while backend_is_local(lab, addr) != local {
        assert!(
            Instant::now() < deadline,
            "{what}: {addr} still {}local",
            if local { "not " } else { "" }
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn an_endpoint_without_node_name_moves_with_the_routes() {
    let mut lab = AgentLab::new().expect("lab");
    lab.start_agent(&[]).expect("agent");
    // An address of no lab network (TEST-NET-1), so only the routes below say where it is.
    let addr = Ipv4Addr::new(192, 0, 2, 5);
    lab.apply(
        "web.yaml",
        &(node_port_service("web", "10.96.0.10", 30080, "")
            + "---\n"
            + &slice_without_node_names("web", &[addr])),
    )
    .expect("apply");
    assert!(!backend_is_local(&lab, addr), "no route: not on this node");
    let node1 = &lab.cluster.node(1).host;
    let prefix = "192.0.2.0/24";

    // Behind the pod bridge: here, found by the route notification (no object changed).
    node1
        .ip(&["route", "add", prefix, "dev", "cni0"])
        .expect("route");
    wait_for_placement(&lab, addr, true, "routed to the pod bridge");
    // Through a gateway, even on a pod-side interface (as an overlay tunnel to another node):
    // not here.
    let gateway = pod_addr(1, 1).to_string();
    node1
        .ip(&["route", "replace", prefix, "via", &gateway, "dev", "cni0"])
        .expect("route");
    wait_for_placement(&lab, addr, false, "routed through a gateway");
    // Back behind the bridge, then out through the NIC: here, then not.
    node1
        .ip(&["route", "replace", prefix, "dev", "cni0"])
        .expect("route");
    wait_for_placement(&lab, addr, true, "routed to the pod bridge again");
    let node2 = node_addr(2).to_string();
    node1
        .ip(&["route", "replace", prefix, "via", &node2])
        .expect("route");
    wait_for_placement(&lab, addr, false, "routed to node2 through the NIC");
}

/// The two tests above over IPv6, in the dual-stack lab: IPv6 endpoints without a nodeName are
/// placed by node1's IPv6 routes (behind the pod bridge: here, handed to the stack; on node2:
/// SNATed), and move when those routes change, with no change to the objects.
#[test]
fn ipv6_endpoints_without_node_name_are_placed_by_the_routes_and_move_with_them() {
    let lab = dual_stack_agent();
    let (here, there) = (pod_addr6(1, 0), pod_addr6(2, 0));
    // An address of no lab network (the documentation prefix's), placed by the routes below.
    let elsewhere = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 5);
    let apply = |endpoints: &[Ipv6Addr]| {
        let service = with_node_port(
            &service_of_families(
                "web6",
                &["2001:db8:96::10"],
                "TCP",
                80,
                "  type: NodePort\n",
            ),
            30080,
        );
        let slice = slice_without_node_names("web6", endpoints);
        lab.apply("web6.yaml", &(service + "---\n" + &slice))
            .expect("apply");
    };

    apply(&[here, there]);
    wait_for_placement(&lab, here, true, "behind node1's pod bridge");
    assert!(!backend_is_local(&lab, there), "node2's pod: not here");
    // Both reached through node1's IPv6 NodePort: the local one through the stack, node2's
    // through SNAT.
    let node_port = SocketAddr::new(node_addr6(1).into(), 30080).to_string();
    let report = ClientRun::tcp(&node_port, 40)
        .run(&lab.cluster.client, None)
        .expect("client");
    report.assert_all_ok("IPv6 NodePort to endpoints without a nodeName");
    assert_eq!(report.servers(), ["n1p0", "n2p0"].into(), "{report:?}");

    // An address node1 has no route to, placed again as node1's IPv6 routes change.
    apply(&[elsewhere]);
    wait_for_placement(&lab, elsewhere, false, "no route");
    let node1 = &lab.cluster.node(1).host;
    let prefix = "2001:db8:ffff::/64";
    node1
        .ip(&["-6", "route", "add", prefix, "dev", "cni0"])
        .expect("route");
    wait_for_placement(&lab, elsewhere, true, "routed to the pod bridge");
    node1
        .ip(&["-6", "route", "del", prefix, "dev", "cni0"])
        .expect("route");
    wait_for_placement(&lab, elsewhere, false, "its route gone");
}
