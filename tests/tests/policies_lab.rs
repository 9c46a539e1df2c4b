//! Service policies with the real agent and real TCP/UDP traffic in the lab: NodePort to an
//! endpoint on another node (externalTrafficPolicy Cluster: SNAT; Local: dropped, but served to
//! the node's own pods, then the client address preserved), a service without endpoints refusing at once, loadBalancerSourceRanges,
//! session affinity, and a rolling replacement of endpoints under load.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use lab::{
    agent::{AgentLab, endpoint_slice, hinted_endpoint_slice, node_port_service},
    peer::{ClientReport, ClientRun},
    topology::{CLIENT_ADDR, ClusterSpec, node_addr, pod_addr},
};

/// A LoadBalancer Service `web` on ClusterIP 10.96.0.10 (port 80 to 8080, nodePort 30080) with
/// `extra_spec` lines in its spec and `ingress` (a YAML flow list) as its status.
fn load_balancer_service(extra_spec: &str, ingress: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.10\n{extra_spec}  ports:\n  - {{name: http, port: 80, targetPort: 8080, nodePort: 30080}}\nstatus:\n  loadBalancer:\n    ingress: {ingress}\n"
    )
}

fn events(lab: &AgentLab) -> std::collections::BTreeMap<&'static str, u64> {
    lab.events().expect("the agent's pinned event counters")
}

#[test]
fn node_port_to_a_remote_endpoint_snat_under_cluster_drop_under_local() {
    let mut lab = AgentLab::new().expect("lab");
    lab.start_agent(&[]).expect("agent");
    let remote_only = endpoint_slice("web", &[(pod_addr(2, 0), "node2")]);
    lab.apply(
        "web.yaml",
        &(node_port_service("web", "10.96.0.10", 30080, "") + "---\n" + &remote_only),
    )
    .expect("apply");
    let node_port = format!("{}:30080", node_addr(1));

    // Cluster: node1 forwards to node2's pod, SNATed to node1, and the replies come back.
    for run in [
        ClientRun::tcp(&node_port, 30),
        ClientRun {
            one_flow: true,
            ..ClientRun::tcp(&node_port, 30)
        },
    ] {
        let report = run.run(&lab.cluster.client, None).expect("client");
        report.assert_all_ok("Cluster policy, remote endpoint");
        assert_eq!(report.servers(), ["n2p0"].into());
        assert_eq!(
            report.peers_seen.keys().collect::<Vec<_>>(),
            [&node_addr(1).to_string()],
            "SNAT to node1"
        );
        assert_eq!(
            report.peer_names.keys().collect::<Vec<_>>(),
            [&node_port],
            "replies from the NodePort"
        );
    }

    // Local: node1 has no endpoint of its own, so NodePort traffic is dropped (counted).
    let local = "  externalTrafficPolicy: Local\n";
    lab.apply(
        "web.yaml",
        &(node_port_service("web", "10.96.0.10", 30080, local) + "---\n" + &remote_only),
    )
    .expect("apply");
    let before = events(&lab)["drop_no_local_backend"];
    let dropped = ClientRun {
        timeout_ms: 300,
        ..ClientRun::tcp(&node_port, 2)
    }
    .run(&lab.cluster.client, None)
    .expect("client");
    assert_eq!(dropped.errors, 2, "{dropped:?}");
    assert!(
        events(&lab)["drop_no_local_backend"] > before,
        "drops are counted"
    );
    // A pod of node1 has no client address to preserve: it reaches the Service's cluster-wide
    // endpoints through the same NodePort (kube-proxy's short-circuit), node2's pod here.
    let from_pod = ClientRun::tcp(&node_port, 20)
        .run(lab.client_pod(), Some(&lab.cgroup))
        .expect("client");
    from_pod.assert_all_ok("Local policy, from a pod of this node");
    assert_eq!(from_pod.servers(), ["n2p0"].into());

    // Local with a local endpoint: served, and the server sees the real client address.
    let both = endpoint_slice(
        "web",
        &[(pod_addr(2, 0), "node2"), (pod_addr(1, 0), "node1")],
    );
    lab.apply(
        "web.yaml",
        &(node_port_service("web", "10.96.0.10", 30080, local) + "---\n" + &both),
    )
    .expect("apply");
    let report = ClientRun::tcp(&node_port, 30)
        .run(&lab.cluster.client, None)
        .expect("client");
    report.assert_all_ok("Local policy, local endpoint");
    assert_eq!(report.servers(), ["n1p0"].into());
    assert_eq!(
        report.peers_seen.keys().collect::<Vec<_>>(),
        [&CLIENT_ADDR.to_string()],
        "no SNAT under Local"
    );
}

#[test]
fn a_service_without_endpoints_refuses_at_once() {
    let mut lab = AgentLab::new().expect("lab");
    lab.start_agent(&[]).expect("agent");
    let service = "apiVersion: v1\nkind: Service\nmetadata: {name: empty, namespace: default}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.20\n  ports:\n  - {name: tcp, port: 80, nodePort: 30090}\n  - {name: udp, port: 53, protocol: UDP, nodePort: 30091}\n";
    lab.apply("empty.yaml", service).expect("apply");
    let (tcp_node_port, udp_node_port) = (
        format!("{}:30090", node_addr(1)),
        format!("{}:30091", node_addr(1)),
    );
    let runs = [
        (
            "tcp via XDP",
            &lab.cluster.client,
            None,
            ClientRun::tcp(&tcp_node_port, 3),
        ),
        (
            "udp via XDP",
            &lab.cluster.client,
            None,
            ClientRun::udp(&udp_node_port, 3),
        ),
        (
            "tcp via the socket hook",
            lab.client_pod(),
            Some(&lab.cgroup),
            ClientRun::tcp("10.96.0.20:80", 3),
        ),
        (
            "udp via the socket hook",
            lab.client_pod(),
            Some(&lab.cgroup),
            ClientRun::udp("10.96.0.20:53", 3),
        ),
    ];
    for (what, host, cgroup, run) in runs {
        // A timeout would take the client's 2 s each; a refusal takes well under 100 ms.
        let started = Instant::now();
        let report = run.run(host, cgroup).expect("client");
        let elapsed = started.elapsed();
        assert_eq!(report.errors, 3, "{what}: {report:?}");
        assert!(
            report
                .error_samples
                .iter()
                .all(|error| error.contains("refused")),
            "{what}: not refused: {report:?}"
        );
        // Three attempts plus starting the client process, far below one 2 s timeout.
        assert!(
            elapsed < Duration::from_millis(1500),
            "{what}: took {elapsed:?}"
        );
    }
    // What a Service without endpoints must do: "refused within 100 ms, not a timeout" (the
    // timeout is 2 s, so this tells the two apart with a wide margin; it is no speed
    // measurement). Timed for the XDP paths by the test thread itself from inside the client's
    // namespace: no process start.
    {
        let _inside = lab
            .cluster
            .client
            .enter()
            .expect("enter the client namespace");
        let started = Instant::now();
        let target = tcp_node_port.parse().expect("addr");
        let refused = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2));
        let tcp_elapsed = started.elapsed();
        assert_eq!(
            refused.expect_err("refused").kind(),
            std::io::ErrorKind::ConnectionRefused
        );
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        socket.connect(&udp_node_port).expect("connect");
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let started = Instant::now();
        socket.send(b"query").expect("send");
        let error = socket.recv(&mut [0u8; 64]).expect_err("ICMP error");
        let udp_elapsed = started.elapsed();
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);
        assert!(
            tcp_elapsed < Duration::from_millis(100),
            "TCP refused after {tcp_elapsed:?}"
        );
        assert!(
            udp_elapsed < Duration::from_millis(100),
            "UDP ICMP error after {udp_elapsed:?}"
        );
    }
    let events = events(&lab);
    assert!(
        events["reject_tcp_rst"] >= 3 && events["reject_icmp"] >= 3,
        "{events:?}"
    );
}

#[test]
fn load_balancer_source_ranges_admit_one_client_and_drop_another() {
    let mut lab = AgentLab::new().expect("lab");
    let refused_client = lab
        .add_client("client2", "203.0.113.11".parse().expect("ip"))
        .expect("client2");
    for client in [&lab.cluster.client, &refused_client] {
        client
            .route(&["198.51.100.0/24", "via", &node_addr(1).to_string()])
            .expect("route");
    }
    lab.start_agent(&[]).expect("agent");
    let service = load_balancer_service(
        "  loadBalancerSourceRanges: [203.0.113.10/32]\n",
        "[{ip: 198.51.100.20}]",
    );
    lab.apply(
        "web.yaml",
        &(service + "---\n" + &endpoint_slice("web", &[(pod_addr(1, 0), "node1")])),
    )
    .expect("apply");
    let allowed = ClientRun::tcp("198.51.100.20:80", 20)
        .run(&lab.cluster.client, None)
        .expect("client");
    allowed.assert_all_ok("client inside the range");
    let before = events(&lab)["drop_source_range"];
    let refused = ClientRun {
        timeout_ms: 300,
        ..ClientRun::tcp("198.51.100.20:80", 2)
    }
    .run(&refused_client, None)
    .expect("client");
    assert_eq!(refused.errors, 2, "{refused:?}");
    assert!(
        events(&lab)["drop_source_range"] > before,
        "refused traffic is counted"
    );
    // The ranges guard the LoadBalancer IP only: the NodePort still serves everyone.
    let node_port = ClientRun::tcp(&format!("{}:30080", node_addr(1)), 5)
        .run(&refused_client, None)
        .expect("client");
    node_port.assert_all_ok("NodePort from outside the range");
}

/// externalTrafficPolicy Local with loadBalancerSourceRanges: a pod of node1 inside the ranges
/// reaches the LoadBalancer IP's cluster-wide endpoints (node2's pod here, kube-proxy's
/// short-circuit), and once the ranges leave it out, it is refused.
#[test]
fn a_pod_reaches_a_ranged_local_load_balancer_ip_through_the_cluster_wide_endpoints() {
    let mut lab = AgentLab::new().expect("lab");
    lab.start_agent(&[]).expect("agent");
    let remote_only = endpoint_slice("web", &[(pod_addr(2, 0), "node2")]);
    let service = |ranges: &str| {
        load_balancer_service(
            &format!("  externalTrafficPolicy: Local\n  loadBalancerSourceRanges: [{ranges}]\n"),
            "[{ip: 198.51.100.20}]",
        ) + "---\n"
            + &remote_only
    };
    lab.apply("web.yaml", &service("10.244.1.0/24"))
        .expect("apply");
    let from_pod = ClientRun::tcp("198.51.100.20:80", 20)
        .run(lab.client_pod(), Some(&lab.cgroup))
        .expect("client");
    from_pod.assert_all_ok("a pod of this node inside the ranges");
    assert_eq!(from_pod.servers(), ["n2p0"].into());

    lab.apply("web.yaml", &service("203.0.113.0/24"))
        .expect("apply");
    let before = events(&lab)["drop_source_range"];
    let refused = ClientRun {
        timeout_ms: 300,
        ..ClientRun::tcp("198.51.100.20:80", 2)
    }
    .run(lab.client_pod(), Some(&lab.cgroup))
    .expect("client");
    assert_eq!(refused.errors, 2, "{refused:?}");
    assert!(
        events(&lab)["drop_source_range"] > before,
        "refused traffic is counted"
    );
}

#[test]
fn session_affinity_pins_a_client_until_the_timeout() {
    let mut lab = AgentLab::with_spec(&ClusterSpec {
        pods_per_node: vec![2, 0],
        ..ClusterSpec::default()
    })
    .expect("lab");
    let second_client = lab
        .add_client("client2", "203.0.113.11".parse().expect("ip"))
        .expect("client2");
    lab.start_agent(&[]).expect("agent");
    let sticky =
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}\n";
    let endpoints = endpoint_slice(
        "web",
        &[(pod_addr(1, 0), "node1"), (pod_addr(1, 1), "node1")],
    );
    lab.apply(
        "web.yaml",
        &(node_port_service("web", "10.96.0.10", 30080, sticky) + "---\n" + &endpoints),
    )
    .expect("apply");
    let node_port = format!("{}:30080", node_addr(1));

    // 200 connections from one client, through XDP and through the socket hook: one endpoint each.
    let first = ClientRun::tcp(&node_port, 200)
        .run(&lab.cluster.client, None)
        .expect("client");
    first.assert_all_ok("200 connections");
    assert_eq!(first.by_server.len(), 1, "{first:?}");
    let from_pod = ClientRun::tcp("10.96.0.10:80", 200)
        .run(lab.client_pod(), Some(&lab.cgroup))
        .expect("client");
    from_pod.assert_all_ok("200 connections from a pod");
    assert_eq!(from_pod.by_server.len(), 1, "{from_pod:?}");
    // Another client sticks too (to whichever endpoint it got).
    let other = ClientRun::tcp(&node_port, 50)
        .run(&second_client, None)
        .expect("client");
    assert_eq!(other.by_server.len(), 1, "{other:?}");

    // After the timeout passes without traffic, a new choice is made: with two endpoints, some
    // wait gives the other one (each try has an even chance; 12 misses in a row: 1 in 4096).
    let pinned = first.by_server.keys().next().expect("one").clone();
    let moved = (0..12).any(|_| {
        // Not a wait for a client: the 1 s affinity timeout passes without traffic.
        std::thread::sleep(Duration::from_millis(1100));
        let again = ClientRun::tcp(&node_port, 1)
            .run(&lab.cluster.client, None)
            .expect("client");
        again.by_server.keys().next() != Some(&pinned)
    });
    assert!(moved, "affinity never expired");
}

#[test]
fn a_rolling_replacement_of_three_endpoints_under_load_loses_no_request() {
    let mut lab = AgentLab::with_spec(&ClusterSpec {
        pods_per_node: vec![6, 0],
        ..ClusterSpec::default()
    })
    .expect("lab");
    lab.start_agent(&[]).expect("agent");
    let pod = |index: u8| pod_addr(1, index);
    // Endpoints as (address, ready, terminating).
    let slice = |endpoints: &[(u8, bool, bool)]| {
        let mut yaml = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nports:\n- {name: http, port: 8080, protocol: TCP}\nendpoints:\n".to_owned();
        for (index, ready, terminating) in endpoints {
            yaml.push_str(&format!(
                "- addresses: [\"{}\"]\n  nodeName: node1\n  conditions: {{ready: {ready}, serving: true, terminating: {terminating}}}\n",
                pod(*index)
            ));
        }
        yaml
    };
    let service = node_port_service("web", "10.96.0.10", 30080, "");
    let apply = |endpoints: &[(u8, bool, bool)]| {
        lab.apply("web.yaml", &(service.clone() + "---\n" + &slice(endpoints)))
            .expect("apply")
    };
    apply(&[(0, true, false), (1, true, false), (2, true, false)]);

    let node_port = format!("{}:30080", node_addr(1));
    let client = lab.cluster.client.clone();
    // Continuous load until the replacement is over: batches of connect/request/close.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = std::thread::spawn({
        let done = done.clone();
        move || {
            let mut total = ClientReport::default();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let batch = ClientRun {
                    interval_ms: 2,
                    ..ClientRun::tcp(&node_port, 50)
                }
                .run(&client, None)
                .expect("load client");
                total.attempts += batch.attempts;
                total.ok += batch.ok;
                total.errors += batch.errors;
                total.error_samples.extend(batch.error_samples);
                for (server, count) in batch.by_server {
                    *total.by_server.entry(server).or_default() += count;
                }
            }
            total
        }
    });
    // Old endpoints 0, 1, 2 replaced one by one by 3, 4, 5: new ready, old terminating, old gone.
    let mut current = vec![(0, true, false), (1, true, false), (2, true, false)];
    for (old, new) in [(0u8, 3u8), (1, 4), (2, 5)] {
        current.push((new, true, false));
        apply(&current);
        for endpoint in current.iter_mut().filter(|(index, _, _)| *index == old) {
            *endpoint = (old, false, true);
        }
        apply(&current);
        current.retain(|(index, _, _)| *index != old);
        apply(&current);
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let report = load.join().expect("thread");
    report.assert_all_ok("load during the rolling replacement");
    assert_eq!(report.errors, 0);
    // The load saw both generations.
    assert!(
        report.by_server.contains_key("n1p0") && report.by_server.contains_key("n1p5"),
        "{report:?}"
    );
}

#[test]
fn internal_traffic_policy_local_keeps_cluster_ip_traffic_on_the_node() {
    let mut lab = AgentLab::new().expect("lab");
    lab.start_agent(&[]).expect("agent");
    let local = "  internalTrafficPolicy: Local\n";
    let remote_only = endpoint_slice("web", &[(pod_addr(2, 0), "node2")]);
    lab.apply(
        "web.yaml",
        &(node_port_service("web", "10.96.0.10", 30080, local) + "---\n" + &remote_only),
    )
    .expect("apply");
    // From a pod on node1, whose node has no endpoint: refused (kube-proxy drops).
    let refused = ClientRun {
        timeout_ms: 300,
        ..ClientRun::tcp("10.96.0.10:80", 2)
    }
    .run(lab.client_pod(), Some(&lab.cgroup))
    .expect("client");
    assert_eq!(refused.errors, 2, "{refused:?}");
    // The NodePort (external traffic, policy Cluster) still reaches node2's endpoint.
    let external = ClientRun::tcp(&format!("{}:30080", node_addr(1)), 10)
        .run(&lab.cluster.client, None)
        .expect("client");
    external.assert_all_ok("external traffic under internalTrafficPolicy Local");
    // With an endpoint on node1 too, pods of node1 use only that one.
    let both = endpoint_slice(
        "web",
        &[(pod_addr(2, 0), "node2"), (pod_addr(1, 0), "node1")],
    );
    lab.apply(
        "web.yaml",
        &(node_port_service("web", "10.96.0.10", 30080, local) + "---\n" + &both),
    )
    .expect("apply");
    let report = ClientRun::tcp("10.96.0.10:80", 40)
        .run(lab.client_pod(), Some(&lab.cgroup))
        .expect("client");
    report.assert_all_ok("ClusterIP with a local endpoint");
    assert_eq!(report.servers(), ["n1p0"].into());
}

/// One connection of three requests 1.5 s apart from `client` to `to`, with `change` made as
/// soon as the first request is answered (while the connection is open, before the second);
/// `ready` is a path of the test's own for the client's ready file.
fn connection_across(
    client: &lab::lab::Host,
    to: &str,
    ready: &Path,
    change: impl FnOnce(),
) -> ClientReport {
    std::thread::scope(|scope| {
        let run = scope.spawn(|| {
            ClientRun {
                one_flow: true,
                interval_ms: 1500,
                timeout_ms: 800,
                ready_file: Some(ready),
                ..ClientRun::tcp(to, 3)
            }
            .run(client, None)
        });
        lab::peer::wait_until_answered(ready, Duration::from_secs(10))
            .expect("the first request answered");
        change();
        run.join().expect("client thread")
    })
    .expect("client")
}

/// A connection that loadBalancerSourceRanges admitted stops once its client's range goes.
#[test]
fn an_established_connection_stops_when_its_source_range_goes() {
    let mut lab = AgentLab::new().expect("lab");
    lab.cluster
        .client
        .route(&["198.51.100.0/24", "via", &node_addr(1).to_string()])
        .expect("route");
    lab.start_agent(&[]).expect("agent");
    let service = |range: &str| {
        load_balancer_service(
            &format!("  loadBalancerSourceRanges: [{range}]\n"),
            "[{ip: 198.51.100.20}]",
        ) + "---\n"
            + &endpoint_slice("web", &[(pod_addr(1, 0), "node1")])
    };
    lab.apply("web.yaml", &service("203.0.113.10/32"))
        .expect("apply");
    let before = events(&lab)["drop_source_range"];
    let ready = lab.scratch_file("client.ready");
    let report = connection_across(&lab.cluster.client, "198.51.100.20:80", &ready, || {
        lab.apply("web.yaml", &service("203.0.113.99/32"))
            .expect("range changed");
    });
    assert_eq!(
        report.ok, 1,
        "only the request before the change: {report:?}"
    );
    assert!(report.errors >= 1, "{report:?}");
    assert!(
        events(&lab)["drop_source_range"] > before,
        "dropped and counted"
    );
}

/// trafficDistribution PreferClose: the EndpointSlice controller gives each endpoint a zone hint,
/// and a client on a node of zone-a reaches the endpoints hinted for zone-a only (here node2's
/// pod, although node1 has one too); once the Node has no zone label, every endpoint.
#[test]
fn topology_hints_keep_cluster_ip_traffic_in_the_nodes_zone() {
    let mut lab = AgentLab::new().expect("lab");
    lab.start_agent(&[]).expect("agent");
    let node = |labels: &str| {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: node1\n{labels}status:\n  addresses:\n  - {{type: InternalIP, address: {}}}\n",
            node_addr(1)
        )
    };
    let hinted = hinted_endpoint_slice(
        "web",
        &[
            (pod_addr(1, 0), "node1", "{forZones: [{name: zone-b}]}"),
            (pod_addr(2, 0), "node2", "{forZones: [{name: zone-a}]}"),
        ],
    );
    let service = node_port_service(
        "web",
        "10.96.0.10",
        30080,
        "  trafficDistribution: PreferClose\n",
    );
    let manifest = |node: String| node + "---\n" + &service + "---\n" + &hinted;
    let reached = |lab: &AgentLab| {
        let run = ClientRun::tcp("10.96.0.10:80", 30)
            .run(lab.client_pod(), Some(&lab.cgroup))
            .expect("client");
        run.assert_all_ok("ClusterIP with zone hints");
        run.by_server
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<String>>()
    };

    lab.apply(
        "web.yaml",
        &manifest(node("  labels: {topology.kubernetes.io/zone: zone-a}\n")),
    )
    .expect("apply");
    assert_eq!(
        reached(&lab),
        ["n2p0".to_owned()].into(),
        "zone-a's endpoint only"
    );

    lab.apply("web.yaml", &manifest(node(""))).expect("apply");
    assert_eq!(
        reached(&lab),
        ["n1p0".to_owned(), "n2p0".to_owned()].into(),
        "a node without a zone: every endpoint"
    );
}

/// A LoadBalancer ingress IP in ipMode Proxy belongs to a load balancer that proxies to the
/// nodes (KEP-1860): the node does not serve it, so a client that routes it to the node gets
/// nothing there, while the VIP one is served and the NodePort the proxy uses works.
#[test]
fn an_ingress_ip_in_ip_mode_proxy_is_left_to_the_load_balancer() {
    let mut lab = AgentLab::new().expect("lab");
    lab.cluster
        .client
        .route(&["198.51.100.0/24", "via", &node_addr(1).to_string()])
        .expect("route");
    lab.start_agent(&[]).expect("agent");
    let service = load_balancer_service(
        "",
        "[{ip: 198.51.100.20, ipMode: VIP}, {ip: 198.51.100.21, ipMode: Proxy}]",
    );
    lab.apply(
        "web.yaml",
        &(service + "---\n" + &endpoint_slice("web", &[(pod_addr(1, 0), "node1")])),
    )
    .expect("apply");

    ClientRun::tcp("198.51.100.20:80", 10)
        .run(&lab.cluster.client, None)
        .expect("client")
        .assert_all_ok("the VIP ingress IP");
    let proxied = ClientRun {
        timeout_ms: 300,
        ..ClientRun::tcp("198.51.100.21:80", 2)
    }
    .run(&lab.cluster.client, None)
    .expect("client");
    assert_eq!(proxied.errors, 2, "{proxied:?}");
    ClientRun::tcp(&format!("{}:30080", node_addr(1)), 10)
        .run(&lab.cluster.client, None)
        .expect("client")
        .assert_all_ok("the NodePort the load balancer proxies to");

    let services = lab::agent::lb_json(lab.pin_dir(), &["services"]).expect("lb services");
    let frontends = services.to_string();
    assert!(frontends.contains("198.51.100.20:80"), "{services:#}");
    assert!(!frontends.contains("198.51.100.21"), "{services:#}");
}

/// The Service `web` of [`load_balancer_service`] under both traffic policies Local, with
/// healthCheckNodePort 32101.
fn local_load_balancer_service() -> String {
    load_balancer_service(
        "  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local\n  healthCheckNodePort: 32101\n",
        "[]",
    )
}

/// A Local traffic policy whose node has no ready endpoint takes the node's endpoints still
/// serving while terminating, though another node has a ready one (KEP-1669, kube-proxy's
/// CategorizeEndpoints): both the NodePort from outside and the ClusterIP from a pod reach
/// node1's terminating pod, where they used to be dropped. The healthCheckNodePort counts no
/// terminating endpoint (503, 0), so a load balancer moves new clients to other nodes while
/// this one finishes its own. With no endpoint anywhere, a Local policy refuses at once, as a
/// Cluster one does, where it used to drop.
#[test]
fn a_local_policy_falls_back_to_the_nodes_serving_terminating_endpoints() {
    let mut lab = AgentLab::new().expect("lab");
    lab.start_agent(&[]).expect("agent");
    let terminating_here = endpoint_slice(
        "web",
        &[(pod_addr(1, 0), "node1"), (pod_addr(2, 0), "node2")],
    )
    .replacen(
        "conditions: {ready: true}",
        "conditions: {ready: false, serving: true, terminating: true}",
        1,
    );
    lab.apply(
        "web.yaml",
        &(local_load_balancer_service() + "---\n" + &terminating_here),
    )
    .expect("apply");
    let node_port = format!("{}:30080", node_addr(1));
    let external = ClientRun::tcp(&node_port, 10)
        .run(&lab.cluster.client, None)
        .expect("client");
    external.assert_all_ok("NodePort, Local, a terminating endpoint here");
    assert_eq!(external.servers(), ["n1p0"].into());
    let internal = ClientRun::tcp("10.96.0.10:80", 10)
        .run(lab.client_pod(), Some(&lab.cgroup))
        .expect("client");
    internal.assert_all_ok("ClusterIP, Local, a terminating endpoint here");
    assert_eq!(internal.servers(), ["n1p0"].into());
    let node = lab.cluster.node(1).host.clone();
    let check = std::net::SocketAddr::from((node_addr(1), 32101));
    let answer = lab::http::get(&node, check, "/").expect("health check");
    let body: serde_json::Value = serde_json::from_str(&answer.body).expect("JSON");
    assert_eq!(
        (answer.status, &body["localEndpoints"]),
        (503, &serde_json::json!(0)),
        "{}",
        answer.body
    );

    // No endpoint anywhere: refused at once, through XDP and the socket hooks.
    lab.apply("web.yaml", &local_load_balancer_service())
        .expect("apply");
    for (what, host, cgroup, run) in [
        (
            "NodePort",
            &lab.cluster.client,
            None,
            ClientRun::tcp(&node_port, 2),
        ),
        (
            "ClusterIP",
            lab.client_pod(),
            Some(&lab.cgroup),
            ClientRun::tcp("10.96.0.10:80", 2),
        ),
    ] {
        let report = run.run(host, cgroup).expect("client");
        assert_eq!(
            report.error_kinds.get("refused"),
            Some(&2),
            "{what}: {report:?}"
        );
    }
}

/// Session affinity holds while every endpoint is serving but terminating (KEP-1669's fallback):
/// kube-proxy's rules keep a client on whichever endpoint they use. 100 connections from one
/// client through XDP and 100 from a pod through the socket hooks reach one endpoint each,
/// where each used to draw again (the affinity map refused a terminating endpoint).
#[test]
fn session_affinity_holds_while_every_endpoint_is_terminating() {
    let mut lab = AgentLab::with_spec(&ClusterSpec {
        pods_per_node: vec![2, 0],
        ..ClusterSpec::default()
    })
    .expect("lab");
    lab.start_agent(&[]).expect("agent");
    let sticky = "  sessionAffinity: ClientIP\n";
    let terminating = endpoint_slice(
        "web",
        &[(pod_addr(1, 0), "node1"), (pod_addr(1, 1), "node1")],
    )
    .replace(
        "conditions: {ready: true}",
        "conditions: {ready: false, serving: true, terminating: true}",
    );
    lab.apply(
        "web.yaml",
        &(node_port_service("web", "10.96.0.10", 30080, sticky) + "---\n" + &terminating),
    )
    .expect("apply");
    let through_xdp = ClientRun::tcp(&format!("{}:30080", node_addr(1)), 100)
        .run(&lab.cluster.client, None)
        .expect("client");
    through_xdp.assert_all_ok("100 connections to terminating endpoints");
    assert_eq!(through_xdp.by_server.len(), 1, "{through_xdp:?}");
    let from_pod = ClientRun::tcp("10.96.0.10:80", 100)
        .run(lab.client_pod(), Some(&lab.cgroup))
        .expect("client");
    from_pod.assert_all_ok("100 connections from a pod");
    assert_eq!(from_pod.by_server.len(), 1, "{from_pod:?}");
}
