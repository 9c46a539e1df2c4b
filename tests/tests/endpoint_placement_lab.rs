//! Endpoints without a nodeName (hand-made EndpointSlices of selector-less Services) with the real
//! agent in the lab: the agent places them by node1's routes, so a NodePort flow to the one behind
//! node1's pod bridge is handed to the local stack (its reply leaves through the NIC, where tc
//! reverses the NAT) and the one behind node2 is SNATed there and back. Before, both counted as
//! remote: the local one was SNATed, its reply came back on the pod interface where nothing
//! reverses the SNAT, and the connection failed.

use lab::{
    agent::{AgentLab, POD_PORT, lb_json, node_port_service},
    peer::ClientRun,
    topology::{node_addr, pod_addr},
};

/// An EndpointSlice for `service` whose endpoints name no node.
fn slice_without_node_names(service: &str, endpoints: &[std::net::Ipv4Addr]) -> String {
    let mut yaml = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports:\n- {{name: http, port: {POD_PORT}, protocol: TCP}}\nendpoints:\n"
    );
    for addr in endpoints {
        yaml.push_str(&format!(
            "- addresses: [\"{addr}\"]\n  conditions: {{ready: true}}\n"
        ));
    }
    yaml
}

/// Whether `lb backends` shows the backend at `addr` as local.
fn backend_is_local(lab: &AgentLab, addr: std::net::Ipv4Addr) -> bool {
    let backends = lb_json(lab.pin_dir(), &["backends"]).expect("lb backends");
    let address = format!("{addr}:{POD_PORT}");
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
