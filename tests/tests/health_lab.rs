//! Node-local health checks (`lb.io/health-check`) with the real agent in the lab: a Service
//! over the two pods of node1, probed by the agent from node1's namespace. A pod wedged so that
//! it accepts nothing (its own nftables rule drops every TCP packet to its server, inside its
//! namespace only) leaves the selection tables before anything changes its EndpointSlice; then
//! every one of 200 connections from outside (XDP) and 200 from a pod (socket hooks) succeeds,
//! and once the pod answers again it is back in rotation. With both pods wedged, both stay
//! (fail open).

use std::time::{Duration, Instant};

use lab::{
    agent::{AgentLab, POD_PORT, endpoint_slice},
    lab::{Host, wait_for_log},
    peer::ClientRun,
    topology::{node_addr, pod_addr},
};

const CONNECTIONS: u64 = 200;
/// The probe interval the Service asks for.
const INTERVAL: Duration = Duration::from_millis(500);
/// How long a change of health may take to reach the tables before the test gives up: twenty
/// intervals, where two failed probes and a sync are expected to do it.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(10);

/// The Service `web` (ClusterIP 10.96.0.10:80, nodePort 30080) checked by TCP connects every
/// 500 ms, each allowed 250 ms, 2 failures out and 1 pass back, over n1p0 and n1p1.
fn checked_web() -> String {
    checked_web_of_type("NodePort", "")
}

/// As [`checked_web`], of Service type `kind`, with `extra_spec` lines (indented two spaces)
/// in its spec.
fn checked_web_of_type(kind: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\n  annotations:\n    lb.io/health-check: tcp\n    lb.io/health-check-interval: {}ms\n    lb.io/health-check-timeout: 250ms\n    lb.io/health-check-failure-threshold: \"2\"\n    lb.io/health-check-success-threshold: \"1\"\nspec:\n  type: {kind}\n  clusterIP: 10.96.0.10\n{extra_spec}  ports:\n  - {{name: http, port: 80, targetPort: {POD_PORT}, nodePort: 30080}}\n---\n",
        INTERVAL.as_millis()
    ) + &endpoint_slice(
        "web",
        &[(pod_addr(1, 0), "node1"), (pod_addr(1, 1), "node1")],
    )
}

/// The nftables table that wedges a pod (in the pod's own namespace, gone with it).
const WEDGE_TABLE: &str = "lb_health_lab_wedge";

/// Makes the pod's server unreachable: every TCP packet to its port is dropped on the way in,
/// so a connect gets no answer at all (as from a server that accepts nothing).
fn wedge(pod: &Host) {
    let chain = "{ type filter hook input priority 0; policy accept; }";
    let port = POD_PORT.to_string();
    for args in [
        &["add", "table", "inet", WEDGE_TABLE][..],
        &["add", "chain", "inet", WEDGE_TABLE, "input", chain],
        &[
            "add",
            "rule",
            "inet",
            WEDGE_TABLE,
            "input",
            "tcp",
            "dport",
            &port,
            "drop",
        ],
    ] {
        pod.run("nft", args)
            .unwrap_or_else(|error| panic!("wedging {}: {error:#}", pod.name()));
    }
}

fn unwedge(pod: &Host) {
    pod.run("nft", &["delete", "table", "inet", WEDGE_TABLE])
        .unwrap_or_else(|error| panic!("unwedging {}: {error:#}", pod.name()));
}

/// web's backends as the datapath's tables hold them.
fn web_backends(setup: &AgentLab) -> Vec<String> {
    let services = lb_userspace::observe::inspect::PinnedMaps::open(setup.pin_dir())
        .expect("pinned maps")
        .services()
        .expect("services");
    services
        .iter()
        .find(|service| service.name.starts_with("default/web:"))
        .map(|web| web.backends.clone())
        .unwrap_or_default()
}

fn backend(pod: u8) -> String {
    format!("{}:{POD_PORT}", pod_addr(1, pod))
}

/// Waits until web's tables hold exactly `expected`; returns how long that took.
#[track_caller]
fn wait_for_backends(setup: &AgentLab, expected: &[String], what: &str) -> Duration {
    let started = Instant::now();
    loop {
        let backends = web_backends(setup);
        if backends == expected {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < HEALTH_TIMEOUT,
            "{what}: web's backends are still {backends:?}, not {expected:?}, after \
             {HEALTH_TIMEOUT:?}\n{}",
            std::fs::read_to_string(setup.log()).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The agent's `/metrics` page, scraped inside node1.
fn metrics(setup: &AgentLab) -> String {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], 10249));
    lab::http::get(&setup.cluster.node(1).host, address, "/metrics")
        .expect("GET /metrics")
        .body
}

fn failed_endpoints_line(count: u32) -> String {
    format!("lb_health_check_failed_endpoints{{namespace=\"default\",service=\"web\"}} {count}")
}

/// Waits until the metric says `count` of web's endpoints have failed.
#[track_caller]
fn wait_for_failed_count(setup: &AgentLab, count: u32) {
    let started = Instant::now();
    let line = failed_endpoints_line(count);
    loop {
        let page = metrics(setup);
        if page.lines().any(|sample| sample == line) {
            return;
        }
        assert!(
            started.elapsed() < HEALTH_TIMEOUT,
            "no {line:?} after {HEALTH_TIMEOUT:?}:\n{page}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// 200 connections from outside through the NodePort (XDP) and 200 from the pod n1p1 through
/// the ClusterIP (socket hooks); every one answered. Returns the servers that answered.
fn connect_from_outside_and_from_a_pod(setup: &AgentLab, what: &str) -> Vec<String> {
    let node_port = format!("{}:30080", node_addr(1));
    let outside = ClientRun::tcp(&node_port, CONNECTIONS)
        .run(&setup.cluster.client, None)
        .expect("client outside");
    outside.assert_all_ok(&format!("{what}: NodePort from outside"));
    let from_pod = ClientRun::tcp("10.96.0.10:80", CONNECTIONS)
        .run(setup.client_pod(), Some(&setup.cgroup))
        .expect("client in a pod");
    from_pod.assert_all_ok(&format!("{what}: ClusterIP from a pod"));
    let mut servers: Vec<String> = outside
        .servers()
        .into_iter()
        .chain(from_pod.servers())
        .map(str::to_owned)
        .collect();
    servers.sort();
    servers.dedup();
    servers
}

#[test]
fn a_wedged_pod_leaves_rotation_before_its_slice_changes_and_returns_when_it_answers() {
    let mut setup = AgentLab::new().expect("lab");
    setup.start_agent(&[]).expect("agent");
    setup.apply("web.yaml", &checked_web()).expect("apply");
    let both = [backend(0), backend(1)];
    assert_eq!(web_backends(&setup), both);

    let wedged = setup.cluster.node(1).pods[0].host.clone();
    let wedged_at = Instant::now();
    wedge(&wedged);
    wait_for_backends(&setup, &[backend(1)], "n1p0 wedged");
    let took = wedged_at.elapsed();
    eprintln!(
        "n1p0 wedged to out of the tables: {} ms (interval {} ms, 2 failures to leave)",
        took.as_millis(),
        INTERVAL.as_millis()
    );
    wait_for_log(&setup.log(), "out of rotation", 1, HEALTH_TIMEOUT).expect("logged");
    wait_for_failed_count(&setup, 1);
    assert!(
        metrics(&setup).lines().any(|line| line.starts_with(
            "lb_health_probes_total{namespace=\"default\",service=\"web\",result=\"failed\"}"
        )),
        "failed probes counted"
    );
    // Nothing changed the EndpointSlice: the agent took n1p0 out on its own probes.
    assert_eq!(
        connect_from_outside_and_from_a_pod(&setup, "n1p0 wedged"),
        ["n1p1"]
    );

    unwedge(&wedged);
    let back = wait_for_backends(&setup, &both, "n1p0 answering again");
    eprintln!(
        "n1p0 unwedged to back in the tables: {} ms",
        back.as_millis()
    );
    wait_for_log(&setup.log(), "back in rotation", 1, HEALTH_TIMEOUT).expect("logged");
    wait_for_failed_count(&setup, 0);
    assert_eq!(
        connect_from_outside_and_from_a_pod(&setup, "n1p0 back"),
        ["n1p0", "n1p1"]
    );
}

#[test]
fn when_every_pod_is_wedged_none_leaves_rotation() {
    let mut setup = AgentLab::new().expect("lab");
    setup.start_agent(&[]).expect("agent");
    setup.apply("web.yaml", &checked_web()).expect("apply");
    let both = [backend(0), backend(1)];
    let pods: Vec<Host> = setup.cluster.node(1).pods[..2]
        .iter()
        .map(|pod| pod.host.clone())
        .collect();
    for pod in &pods {
        wedge(pod);
    }
    // Both fail their probes; the table keeps both (fail open), with a Warning.
    wait_for_failed_count(&setup, 2);
    wait_for_log(&setup.log(), "HealthCheckFailOpen", 1, HEALTH_TIMEOUT).expect("logged");
    // The line is logged as the sync that puts both back in starts: the tables follow.
    wait_for_backends(&setup, &both, "both wedged, both kept");

    // One answers again: the other leaves, as it is no longer the last.
    unwedge(&pods[1]);
    wait_for_backends(&setup, &[backend(1)], "n1p1 answering again");
    assert_eq!(
        connect_from_outside_and_from_a_pod(&setup, "n1p1 alone answering"),
        ["n1p1"]
    );
    unwedge(&pods[0]);
    wait_for_backends(&setup, &both, "both answering again");
}

/// externalTrafficPolicy Local: the healthCheckNodePort counts the local endpoints that pass
/// their checks. With both wedged the datapath keeps them (fail open), but the port answers 503
/// with none, so that the load balancer sends to other nodes.
#[test]
fn the_health_check_node_port_counts_only_the_local_endpoints_that_pass() {
    let mut setup = AgentLab::new().expect("lab");
    setup.start_agent(&[]).expect("agent");
    setup
        .apply(
            "web.yaml",
            &checked_web_of_type(
                "LoadBalancer",
                "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32100\n",
            ),
        )
        .expect("apply");
    let node = setup.cluster.node(1).host.clone();
    let check = std::net::SocketAddr::from((node_addr(1), 32100));
    // The port follows the sync after a verdict: waited for, not read once.
    let answers = |status: u16, local_endpoints: u64| {
        let deadline = Instant::now() + HEALTH_TIMEOUT;
        loop {
            let answer = lab::http::get(&node, check, "/").expect("health check");
            let body: serde_json::Value = serde_json::from_str(&answer.body).expect("JSON");
            if answer.status == status && body["localEndpoints"] == local_endpoints {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the healthCheckNodePort answers {} {}, not {status} with {local_endpoints}",
                answer.status,
                answer.body
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    answers(200, 2);
    let pods: Vec<Host> = setup.cluster.node(1).pods[..2]
        .iter()
        .map(|pod| pod.host.clone())
        .collect();
    wedge(&pods[0]);
    wait_for_failed_count(&setup, 1);
    answers(200, 1);
    wedge(&pods[1]);
    wait_for_failed_count(&setup, 2);
    answers(503, 0);
    unwedge(&pods[0]);
    wait_for_failed_count(&setup, 1);
    answers(200, 1);
}
