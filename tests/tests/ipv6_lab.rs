//! IPv6 Services with the real agent in the dual-stack lab (documentation prefixes): a pod's
//! connections and datagrams to an IPv6 ClusterIP, NodePort or LoadBalancer IP are sent to an
//! IPv6 endpoint by the socket hooks (connect6, sendmsg6, recvmsg6, getpeername6), each family
//! of a dual-stack Service to its own family's endpoints, with session affinity and
//! loadBalancerSourceRanges holding over IPv6 as over IPv4.

use std::net::{Ipv6Addr, SocketAddr};

use lab::{
    agent::{
        POD_PORT, SYNC_TIMEOUT, dual_stack_agent, endpoint_slice, endpoint_slice6,
        service_of_families, with_node_port,
    },
    lab::wait_for_log,
    peer::ClientRun,
    topology::{node_addr6, pod_addr, pod_addr6},
};

/// The IPv6 ClusterIPs (documentation prefix 2001:db8::/32).
const WEB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x96, 0, 0, 0, 0, 0x10);
const DNS6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x96, 0, 0, 0, 0, 0x53);
/// An IPv6 LoadBalancer ingress IP.
const LB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x51, 0, 0, 0, 0, 0x20);

/// The IPv6 UDP Service `dns` on DNS6:53, its endpoint n2p0.
fn apply_dns6(setup: &lab::agent::AgentLab) {
    setup
        .apply(
            "dns.yaml",
            &(service_of_families("dns", &[&DNS6.to_string()], "UDP", 53, "")
                + "---\n"
                + &endpoint_slice6("dns", &[(pod_addr6(2, 0), "node2")], "UDP")),
        )
        .expect("apply");
}

/// The IPv6 EndpointSlice of `web`: n1p0 and n2p0.
fn web_slice6() -> String {
    endpoint_slice6(
        "web",
        &[(pod_addr6(1, 0), "node1"), (pod_addr6(2, 0), "node2")],
        "TCP",
    )
}

/// `ip:port` as a client names it (`[v6]:port`).
fn at(ip: impl Into<std::net::IpAddr>, port: u16) -> String {
    SocketAddr::new(ip.into(), port).to_string()
}

#[test]
fn a_pod_reaches_each_family_of_a_dual_stack_service_at_that_familys_endpoints() {
    let setup = dual_stack_agent();
    // TCP web: n1p0 over IPv4; n1p0 and n2p0 over IPv6. UDP dns: n2p0 over IPv6 only.
    let web = with_node_port(
        &service_of_families(
            "web",
            &["10.96.0.10", &WEB6.to_string()],
            "TCP",
            80,
            "  type: NodePort\n",
        ),
        30080,
    );
    setup
        .apply(
            "web.yaml",
            &(web
                + "---\n"
                + &endpoint_slice("web", &[(pod_addr(1, 0), "node1")])
                + "---\n"
                + &web_slice6()),
        )
        .expect("apply");
    apply_dns6(&setup);
    let (pod, cgroup) = (setup.client_pod(), Some(&setup.cgroup));

    let web6 = at(WEB6, 80);
    let tcp6 = ClientRun::tcp(&web6, 20).run(pod, cgroup).expect("client");
    tcp6.assert_all_ok("TCP to the IPv6 ClusterIP");
    assert_eq!(tcp6.servers(), ["n1p0", "n2p0"].into(), "{tcp6:?}");
    assert_eq!(
        tcp6.peer_names,
        [(web6.clone(), 20)].into(),
        "getpeername() names the IPv6 ClusterIP, never the endpoint"
    );
    assert_eq!(
        tcp6.peers_seen.keys().collect::<Vec<_>>(),
        [&format!("[{}]", pod_addr6(1, 1))],
        "the endpoints saw the pod's own IPv6 address: {tcp6:?}"
    );

    let tcp4 = ClientRun::tcp("10.96.0.10:80", 10)
        .run(pod, cgroup)
        .expect("client");
    tcp4.assert_all_ok("TCP to the IPv4 ClusterIP");
    assert_eq!(
        tcp4.servers(),
        ["n1p0"].into(),
        "the IPv4 ClusterIP has the IPv4 endpoints only: {tcp4:?}"
    );

    let node_port6 = at(node_addr6(1), 30080);
    let node_port = ClientRun::tcp(&node_port6, 10)
        .run(pod, cgroup)
        .expect("client");
    node_port.assert_all_ok("TCP to the node's IPv6 address and nodePort");
    assert_eq!(node_port.peer_names, [(node_port6.clone(), 10)].into());

    let dns6 = at(DNS6, 53);
    for unconnected in [false, true] {
        let run = ClientRun {
            unconnected,
            ..ClientRun::udp(&dns6, 10)
        };
        let report = run.run(pod, cgroup).expect("client");
        let what = if unconnected {
            "unconnected UDP (sendmsg6, recvmsg6)"
        } else {
            "connected UDP (connect6, getpeername6)"
        };
        report.assert_all_ok(what);
        assert_eq!(report.servers(), ["n2p0"].into(), "{what}: {report:?}");
        assert_eq!(
            report.peer_names,
            [(dns6.clone(), 10)].into(),
            "{what}: the socket API names the Service"
        );
    }

    // lb explain takes IPv6 addresses: a pod of node1, placed by node1's routes, gets the
    // socket hooks' decision; a client outside, XDP's.
    let client = at(pod_addr6(1, 1), 40000);
    let explained = setup
        .lb_json_in_node(&["explain", &client, &format!("{web6}/tcp")])
        .expect("lb explain");
    assert_eq!(explained["hook"], "socket", "{explained:#}");
    let outside = setup
        .lb_json_in_node(&[
            "explain",
            &at(lab::topology::CLIENT_ADDR6, 40000),
            &format!("{web6}/tcp"),
        ])
        .expect("lb explain");
    assert_eq!(outside["hook"], "xdp", "{outside:#}");
    assert_eq!(explained["verdict"], "translated", "{explained:#}");
    assert_eq!(explained["service"]["backends"], 2, "{explained:#}");
    let reasons = explained["reasons"].to_string();
    for backend in [at(pod_addr6(1, 0), POD_PORT), at(pod_addr6(2, 0), POD_PORT)] {
        assert!(reasons.contains(&backend), "{backend} in {reasons}");
    }
    let on_nic = lab::agent::lb_json(
        setup.pin_dir(),
        &["explain", &client, &format!("{web6}/tcp"), "--from", "nic"],
    )
    .expect("lb explain");
    // On a NIC, XDP translates the IPv6 ClusterIP as it does the IPv4 one routed to the node.
    let rewritten = on_nic["rewritten"].to_string();
    assert!(
        [at(pod_addr6(1, 0), POD_PORT), at(pod_addr6(2, 0), POD_PORT)]
            .iter()
            .any(|backend| rewritten.contains(backend)),
        "{on_nic:#}"
    );
    let elsewhere = setup
        .lb_json_in_node(&["explain", &client, "[2001:db8:96::99]:80/tcp"])
        .expect("lb explain");
    assert_eq!(elsewhere["verdict"], "untouched", "{elsewhere:#}");
    // A dual-stack socket's IPv4-mapped destination is the IPv4 Service's.
    let mapped = lab::agent::lb_json(
        setup.pin_dir(),
        &[
            "explain",
            &format!("[::ffff:{}]:40000", pod_addr(1, 1)),
            "[::ffff:10.96.0.10]:80/tcp",
            "--from",
            "pod",
        ],
    )
    .expect("lb explain");
    assert_eq!(mapped["verdict"], "translated", "{mapped:#}");
    assert_eq!(mapped["service"]["backends"], 1, "{mapped:#}");

    let services = lb_userspace::observe::inspect::PinnedMaps::open(setup.pin_dir())
        .expect("pinned maps")
        .services()
        .expect("services");
    let frontends: Vec<&str> = services
        .iter()
        .flat_map(|service| service.frontends.iter().map(String::as_str))
        .collect();
    for expected in [
        format!("[{WEB6}]:80/tcp ClusterIP"),
        format!("[{}]:30080/tcp NodePort", node_addr6(1)),
        format!("[{DNS6}]:53/udp ClusterIP"),
        "10.96.0.10:80/tcp ClusterIP".to_owned(),
    ] {
        assert!(
            frontends.contains(&expected.as_str()),
            "lb services lists {expected}: {frontends:?}"
        );
    }
}

#[test]
fn session_affinity_holds_over_ipv6() {
    let setup = dual_stack_agent();
    setup
        .apply(
            "web.yaml",
            &(service_of_families(
                "web",
                &[&WEB6.to_string()],
                "TCP",
                80,
                "  sessionAffinity: ClientIP\n",
            ) + "---\n"
                + &endpoint_slice6(
                    "web",
                    &[
                        (pod_addr6(1, 0), "node1"),
                        (pod_addr6(1, 1), "node1"),
                        (pod_addr6(2, 0), "node2"),
                    ],
                    "TCP",
                )),
        )
        .expect("apply");
    let web6 = at(WEB6, 80);
    let report = ClientRun::tcp(&web6, 30)
        .run(setup.client_pod(), Some(&setup.cgroup))
        .expect("client");
    report.assert_all_ok("TCP with ClientIP affinity over IPv6");
    assert_eq!(
        report.servers().len(),
        1,
        "every connection of the pod went to one endpoint: {report:?}"
    );
}

#[test]
fn a_pod_outside_an_ipv6_load_balancers_source_ranges_is_refused_one_inside_gets_through() {
    let setup = dual_stack_agent();
    // n1p1 is inside the ranges, n1p0 is not; the endpoint is on node2.
    let web = service_of_families(
        "web",
        &[&WEB6.to_string()],
        "TCP",
        80,
        &format!(
            "  type: LoadBalancer\n  loadBalancerSourceRanges: [\"{}/128\"]\n",
            pod_addr6(1, 1)
        ),
    )
    .replace(
        &format!("targetPort: {POD_PORT}}}"),
        &format!("targetPort: {POD_PORT}, nodePort: 30080}}"),
    ) + &format!("status:\n  loadBalancer:\n    ingress: [{{ip: \"{LB6}\"}}]\n");
    setup
        .apply(
            "web.yaml",
            &(web + "---\n" + &endpoint_slice6("web", &[(pod_addr6(2, 0), "node2")], "TCP")),
        )
        .expect("apply");
    let (inside, outside) = (
        &setup.cluster.node(1).pods[1].host,
        &setup.cluster.node(1).pods[0].host,
    );
    let lb6 = at(LB6, 80);

    let allowed = ClientRun::tcp(&lb6, 10)
        .run(inside, Some(&setup.cgroup))
        .expect("client");
    allowed.assert_all_ok("pod inside the IPv6 ranges");
    assert_eq!(allowed.servers(), ["n2p0"].into(), "{allowed:?}");

    let before = setup.events().expect("events")["drop_source_range"];
    let refused = ClientRun {
        timeout_ms: 300,
        ..ClientRun::tcp(&lb6, 2)
    }
    .run(outside, Some(&setup.cgroup))
    .expect("client");
    assert_eq!(refused.errors, 2, "{refused:?}");
    assert!(
        setup.events().expect("events")["drop_source_range"] > before,
        "the refused pod's packets are counted"
    );

    // The ranges guard the LoadBalancer IP only: the ClusterIP serves the same pod.
    ClientRun::tcp(&at(WEB6, 80), 5)
        .run(outside, Some(&setup.cgroup))
        .expect("client")
        .assert_all_ok("IPv6 ClusterIP from a pod outside the ranges");

    // UDP, connected (connect6) and unconnected (sendmsg6): the send itself fails outside.
    let dns = service_of_families(
        "dns",
        &[&DNS6.to_string()],
        "UDP",
        53,
        &format!(
            "  type: LoadBalancer\n  loadBalancerSourceRanges: [\"{}/128\"]\n",
            pod_addr6(1, 1)
        ),
    )
    .replace(
        &format!("targetPort: {POD_PORT}}}"),
        &format!("targetPort: {POD_PORT}, nodePort: 30053}}"),
    ) + &format!("status:\n  loadBalancer:\n    ingress: [{{ip: \"{LB6}\"}}]\n");
    setup
        .apply(
            "dns.yaml",
            &(dns + "---\n" + &endpoint_slice6("dns", &[(pod_addr6(2, 0), "node2")], "UDP")),
        )
        .expect("apply");
    let lb6_dns = at(LB6, 53);
    for unconnected in [false, true] {
        let run = ClientRun {
            unconnected,
            timeout_ms: 300,
            ..ClientRun::udp(&lb6_dns, 5)
        };
        let allowed = run.run(inside, Some(&setup.cgroup)).expect("client");
        allowed.assert_all_ok("UDP from the pod inside the IPv6 ranges");
        assert_eq!(allowed.servers(), ["n2p0"].into(), "{allowed:?}");
        let refused = run.run(outside, Some(&setup.cgroup)).expect("client");
        assert_eq!(refused.errors, 5, "{refused:?}");
        assert!(
            refused.error_samples[0].contains("Operation not permitted"),
            "{refused:?}"
        );
    }
}

#[test]
fn internal_traffic_policy_and_refusal_hold_over_ipv6() {
    let setup = dual_stack_agent();
    // internalTrafficPolicy Local: node1's pods reach node1's endpoint only.
    setup
        .apply(
            "web.yaml",
            &(service_of_families(
                "web",
                &[&WEB6.to_string()],
                "TCP",
                80,
                "  internalTrafficPolicy: Local\n",
            ) + "---\n"
                + &web_slice6()),
        )
        .expect("apply");
    // No endpoint at all: the connect() is refused at once, as kube-proxy's REJECT.
    setup
        .apply(
            "empty.yaml",
            &service_of_families("empty", &["2001:db8:96::99"], "TCP", 80, ""),
        )
        .expect("apply");
    let (pod, cgroup) = (setup.client_pod(), Some(&setup.cgroup));
    let local = ClientRun::tcp(&at(WEB6, 80), 20)
        .run(pod, cgroup)
        .expect("client");
    local.assert_all_ok("internalTrafficPolicy Local over IPv6");
    assert_eq!(local.servers(), ["n1p0"].into(), "{local:?}");

    let refused = ClientRun {
        timeout_ms: 1000,
        ..ClientRun::tcp("[2001:db8:96::99]:80", 2)
    }
    .run(pod, cgroup)
    .expect("client");
    assert_eq!(refused.errors, 2, "{refused:?}");
    assert!(
        refused.error_samples[0].contains("refused"),
        "refused at once, not timed out: {refused:?}"
    );
}

/// The IPv6 state lives in pinned maps like the IPv4 one: the hooks serve while no agent
/// runs, a restarted agent finds everything in place (no change), and `lb run --cleanup`
/// removes the IPv6 hooks and maps with the rest.
#[test]
fn ipv6_services_outlive_an_agent_restart_and_go_with_cleanup() {
    let mut setup = dual_stack_agent();
    setup
        .apply(
            "web.yaml",
            &(service_of_families("web", &[&WEB6.to_string()], "TCP", 80, "")
                + "---\n"
                + &web_slice6()),
        )
        .expect("apply");
    apply_dns6(&setup);
    let (web6, dns6) = (at(WEB6, 80), at(DNS6, 53));
    let pod = setup.client_pod().clone();
    ClientRun::tcp(&web6, 5)
        .run(&pod, Some(&setup.cgroup))
        .expect("client")
        .assert_all_ok("IPv6 ClusterIP before the restart");
    setup.kill_agent().expect("SIGKILL");
    let meanwhile = ClientRun::tcp(&web6, 20)
        .run(&pod, Some(&setup.cgroup))
        .expect("client");
    let meanwhile_udp = ClientRun {
        unconnected: true,
        ..ClientRun::udp(&dns6, 10)
    }
    .run(&pod, Some(&setup.cgroup))
    .expect("client");
    let synced_before = std::fs::read_to_string(setup.log())
        .expect("log")
        .lines()
        .filter(|line| line.contains("synced"))
        .count();
    let node1_v6 = node_addr6(1).to_string();
    setup
        .start_agent(&["--node-address", &node1_v6])
        .expect("restart");
    meanwhile.assert_all_ok("IPv6 ClusterIP while no agent ran");
    meanwhile_udp.assert_all_ok("unconnected UDP to an IPv6 ClusterIP while no agent ran");
    assert_eq!(meanwhile_udp.peer_names, [(dns6.clone(), 10)].into());
    let syncs =
        wait_for_log(&setup.log(), "synced", synced_before + 1, SYNC_TIMEOUT).expect("syncs");
    let first_after_restart = &syncs[synced_before];
    assert!(
        first_after_restart.contains("services=2") && first_after_restart.contains("changes=0"),
        "the restart rewrote IPv6 state: {first_after_restart}"
    );

    setup.kill_agent().expect("stop the agent");
    let status = std::process::Command::new(lab::peer::sibling_binary("lb").expect("lb"))
        .args(["run", "--cleanup", "--source", "file", "--pin-dir"])
        .arg(setup.pin_dir())
        .status()
        .expect("lb run --cleanup");
    assert!(status.success());
    assert!(!setup.pin_dir().exists(), "pins left behind");
    let gone = ClientRun {
        timeout_ms: 500,
        ..ClientRun::tcp(&web6, 1)
    }
    .run(&pod, Some(&setup.cgroup))
    .expect("client");
    assert_eq!(gone.errors, 1, "the IPv6 hooks still redirect: {gone:?}");
}

/// A client outside the node reaches an IPv6 NodePort through XDP and tc: DNAT to the local
/// endpoint (which sees the client's own address), SNAT to the endpoint on the other node
/// (which sees this node's IPv6 address), over TCP and UDP, and `lb conntrack` shows the flows.
#[test]
fn a_client_outside_the_node_reaches_an_ipv6_node_port_at_local_and_remote_endpoints() {
    let setup = dual_stack_agent();
    let web = service_of_families("web", &[&WEB6.to_string()], "TCP", 80, "  type: NodePort\n")
        .replace(
            &format!("targetPort: {POD_PORT}}}"),
            &format!("targetPort: {POD_PORT}, nodePort: 30080}}"),
        );
    let dns = service_of_families("dns", &[&DNS6.to_string()], "UDP", 53, "  type: NodePort\n")
        .replace(
            &format!("targetPort: {POD_PORT}}}"),
            &format!("targetPort: {POD_PORT}, nodePort: 30053}}"),
        );
    setup
        .apply(
            "six.yaml",
            &(web
                + "---\n"
                + &web_slice6()
                + "---\n"
                + &dns
                + "---\n"
                + &endpoint_slice6(
                    "dns",
                    &[(pod_addr6(1, 0), "node1"), (pod_addr6(2, 0), "node2")],
                    "UDP",
                )),
        )
        .expect("apply");
    let client = &setup.cluster.client;
    let node_port = at(node_addr6(1), 30080);
    wait_until_served(client, &node_port);

    let tcp = ClientRun::tcp(&node_port, 40)
        .run(client, None)
        .expect("client");
    tcp.assert_all_ok("TCP from outside to the IPv6 NodePort");
    assert_eq!(tcp.servers(), ["n1p0", "n2p0"].into(), "{tcp:?}");
    let client_addr = format!("[{}]", lab::topology::CLIENT_ADDR6);
    let node_addr = format!("[{}]", node_addr6(1));
    assert_eq!(
        tcp.peers_seen
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        [client_addr.clone(), node_addr.clone()].into(),
        "the local endpoint sees the client, the remote one this node's address: {tcp:?}"
    );

    // Node1's own connection from the NodePort to the pod on node2: the pod's answers come to
    // node1's address and port 30080, a frontend that no flow of lb's has, and must reach
    // node1's socket (datapath_lab has the IPv4 twin).
    let own = ClientRun {
        one_flow: true,
        source_port: Some(30080),
        ..ClientRun::tcp(&at(pod_addr6(2, 0), POD_PORT), 5)
    }
    .run(&setup.cluster.node(1).host, None)
    .expect("client in node1's namespace");
    own.assert_all_ok("node1's own IPv6 connection from its NodePort");
    assert_eq!(own.servers(), ["n2p0"].into(), "{own:?}");
    assert_eq!(
        own.peers_seen.keys().collect::<Vec<_>>(),
        [&node_addr],
        "the pod saw node1 itself: {own:?}"
    );
    let events = setup.events().expect("events");
    assert!(events["pass_node_connection"] >= 3, "{events:?}");

    let udp = ClientRun::udp(&at(node_addr6(1), 30053), 40)
        .run(client, None)
        .expect("client");
    udp.assert_all_ok("UDP from outside to the IPv6 NodePort");
    assert_eq!(udp.servers(), ["n1p0", "n2p0"].into(), "{udp:?}");

    let explained = lab::agent::lb_json(
        setup.pin_dir(),
        &[
            "explain",
            &at(lab::topology::CLIENT_ADDR6, 40000),
            &format!("{node_port}/tcp"),
            "--from",
            "nic",
        ],
    )
    .expect("lb explain");
    assert_eq!(explained["hook"], "xdp", "{explained:#}");
    assert_eq!(explained["service"]["backends"], 2, "{explained:#}");
    let empty = lab::agent::lb_json(
        setup.pin_dir(),
        &[
            "explain",
            &at(lab::topology::CLIENT_ADDR6, 40000),
            &format!("{}/tcp", at(node_addr6(1), 30099)),
            "--from",
            "nic",
        ],
    )
    .expect("lb explain");
    assert_eq!(empty["verdict"], "pass", "no frontend: {empty:#}");
    assert!(empty["rewritten"].is_null(), "{empty:#}");

    let flows = lab::agent::lb_json(setup.pin_dir(), &["conntrack"]).expect("lb conntrack");
    let listed = flows.to_string();
    assert!(
        listed.contains(&lab::topology::CLIENT_ADDR6.to_string()),
        "lb conntrack lists the IPv6 client's flows: {flows:#}"
    );
    let ipv6_flows = flows
        .as_array()
        .expect("a list")
        .iter()
        .filter(|flow| flow.to_string().contains(':'))
        .count();
    let stats = lb_json_stats(&setup);
    let fill = |map: &str| {
        stats["maps"]
            .as_array()
            .expect("a list")
            .iter()
            .find(|fill| fill["map"] == map)
            .cloned()
            .unwrap_or_else(|| panic!("lb stats shows {map}: {stats:#}"))
    };
    let conntrack6 = fill("lb6_ct_v1");
    assert!(
        conntrack6["entries"].as_u64().expect("a count") >= 40,
        "the 40 TCP flows from outside (at least one entry each) fill lb6_ct_v1: {conntrack6} \
         ({ipv6_flows} listed)"
    );
    assert_eq!(conntrack6["capacity"], 131_072, "{conntrack6}");
    assert_eq!(fill("lb6_affin_v1")["entries"], 0, "no affinity asked");
}

fn lb_json_stats(setup: &lab::agent::AgentLab) -> serde_json::Value {
    lab::agent::lb_json(setup.pin_dir(), &["stats"]).expect("lb stats")
}

/// Waits until a TCP connection to `target` from `client` succeeds (the agent has programmed
/// the Service).
fn wait_until_served(client: &lab::lab::Host, target: &str) {
    ClientRun {
        timeout_ms: 500,
        ..ClientRun::tcp(target, 1)
    }
    .run_until(client, SYNC_TIMEOUT, |probe| probe.errors == 0)
    .expect("served");
}
