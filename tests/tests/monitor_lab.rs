//! `lb monitor` with the real agent and real TCP traffic in the lab: a packet dropped by
//! loadBalancerSourceRanges, a connection rejected for want of endpoints, a new flow and its end
//! each appear with their fields, over IPv4 and over IPv6; one monitor runs at a time; the monitor turns the programs'
//! reports off when it exits, and the agent turns off those of a monitor that died. The
//! programs' own logging (`--ebpf-log-level`) reaches the agent's log.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{Array, Map, MapData};
use lab::{
    agent::{
        AgentLab, POD_PORT, dual_stack_agent, endpoint_slice, endpoint_slice6, service_of_families,
    },
    lab::{Proc, wait_for_log},
    peer::{self, ClientRun},
    topology::{CLIENT_ADDR, CLIENT_ADDR6, node_addr, node_addr6, pod_addr, pod_addr6},
};
use lb_common::{map_names, monitor::MonitorControl};
use serde_json::Value;

const REFUSED_CLIENT: &str = "203.0.113.11";

/// `web`: a LoadBalancer Service on 198.51.100.20:80 for clients of 203.0.113.10/32 only, its
/// endpoint on node1; `empty`: a NodePort Service (30090) without endpoints.
fn services() -> String {
    let web = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.10\n  loadBalancerSourceRanges: [203.0.113.10/32]\n  ports:\n  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}\nstatus:\n  loadBalancer:\n    ingress: [{ip: 198.51.100.20}]\n";
    let empty = "apiVersion: v1\nkind: Service\nmetadata: {name: empty, namespace: default}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.20\n  ports:\n  - {name: tcp, port: 80, nodePort: 30090}\n";
    format!(
        "{web}---\n{}---\n{empty}",
        endpoint_slice("web", &[(pod_addr(1, 0), "node1")])
    )
}

/// The lab with both services, a second client outside the source range, and the agent.
fn lab_with_services() -> (AgentLab, lab::lab::Host) {
    lab_with_services_and_agent(&[])
}

/// As [`lab_with_services`], the agent started with `agent_flags`.
fn lab_with_services_and_agent(agent_flags: &[&str]) -> (AgentLab, lab::lab::Host) {
    let mut lab = AgentLab::new().expect("lab");
    let refused_client = lab
        .add_client("client2", REFUSED_CLIENT.parse().expect("ip"))
        .expect("client2");
    for client in [&lab.cluster.client, &refused_client] {
        client
            .route(&["198.51.100.0/24", "via", &node_addr(1).to_string()])
            .expect("route");
    }
    lab.start_agent(agent_flags).expect("agent");
    lab.apply("services.yaml", &services()).expect("apply");
    (lab, refused_client)
}

/// `requests` connection attempts from the client outside the source range to the
/// LoadBalancer IP, each dropped by XDP: asserts that every one failed.
fn refused_attempts(refused_client: &lab::lab::Host, requests: u64) {
    let refused = ClientRun {
        timeout_ms: 300,
        ..ClientRun::tcp("198.51.100.20:80", requests)
    }
    .run(refused_client, None)
    .expect("client2");
    assert_eq!(refused.errors, requests, "{refused:?}");
}

/// `lb monitor -o json` on node1 (its NIC names are node1's), output to `log`, started when it
/// says it is watching.
fn start_monitor(lab: &AgentLab, log: &Path, extra: &[&str]) -> Proc {
    let lb = peer::sibling_binary("lb").expect("lb");
    let pin_dir = lab.pin_dir().to_str().expect("utf-8").to_owned();
    let mut args = vec!["monitor", "--pin-dir", &pin_dir, "-o", "json"];
    args.extend_from_slice(extra);
    let monitor = lab
        .cluster
        .node(1)
        .host
        .spawn_logged(lb, &args, None, log)
        .expect("lb monitor");
    wait_for_log(log, "lb monitor: watching", 1, Duration::from_secs(10)).expect("watching");
    monitor
}

fn control(lab: &AgentLab) -> MonitorControl {
    control_map(lab).get(&0, 0).expect("control cell")
}

fn control_map(lab: &AgentLab) -> Array<MapData, MonitorControl> {
    let data = MapData::from_pin(lab.pin_dir().join(map_names::MONITOR_CONTROL)).expect("pin");
    Array::try_from(Map::Array(data)).expect("array")
}

/// The JSON events the monitor printed so far.
fn events(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Waits until the monitor printed an event matching `wanted`, and returns it.
fn wait_for_event(log: &Path, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(event) = events(log).into_iter().find(|event| wanted(event)) {
            return event;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} in lb monitor's output:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn field<'v>(event: &'v Value, name: &str) -> &'v str {
    event[name].as_str().unwrap_or_default()
}

#[test]
fn a_drop_a_reject_a_new_flow_and_its_end_appear_with_their_fields() {
    let (lab, refused_client) = lab_with_services();
    let log = lab.scratch_file("monitor.log");
    let monitor = start_monitor(&lab, &log, &[]);

    ClientRun::tcp("198.51.100.20:80", 1)
        .run(&lab.cluster.client, None)
        .expect("client")
        .assert_all_ok("client inside the range");
    refused_attempts(&refused_client, 1);
    let empty = format!("{}:30090", node_addr(1));
    let rejected = ClientRun::tcp(&empty, 1)
        .run(&lab.cluster.client, None)
        .expect("client");
    assert_eq!(rejected.errors, 1, "{rejected:?}");

    let new_flow = wait_for_event(&log, "new flow", |event| {
        field(event, "kind") == "new" && field(event, "destination") == "198.51.100.20:80"
    });
    assert_eq!(
        field(&new_flow, "service"),
        "default/web:http/TCP[loadbalancer]",
        "{new_flow}"
    );
    assert!(
        field(&new_flow, "source").starts_with(&format!("{CLIENT_ADDR}:")),
        "{new_flow}"
    );
    assert_eq!(
        field(&new_flow, "backend"),
        format!("{}:8080", pod_addr(1, 0)),
        "{new_flow}"
    );
    assert_eq!(field(&new_flow, "program"), "xdp", "{new_flow}");
    assert_eq!(field(&new_flow, "interface"), lab::topology::FABRIC_IFACE);
    assert_eq!(field(&new_flow, "tcp_flags"), "S", "{new_flow}");
    assert!(
        new_flow.get("nat_source").is_none(),
        "a local endpoint sees the client"
    );

    let client_port = field(&new_flow, "source").to_owned();
    let end = wait_for_event(&log, "flow end", |event| {
        field(event, "kind") == "end"
            && (field(event, "source") == client_port || field(event, "destination") == client_port)
    });
    assert!(field(&end, "tcp_flags").contains('F'), "{end}");

    let drop = wait_for_event(&log, "source-range drop", |event| {
        field(event, "kind") == "drop" && field(event, "reason") == "drop_source_range"
    });
    assert!(
        field(&drop, "source").starts_with(&format!("{REFUSED_CLIENT}:")),
        "{drop}"
    );
    assert_eq!(field(&drop, "destination"), "198.51.100.20:80", "{drop}");
    assert_eq!(
        field(&drop, "service"),
        "default/web:http/TCP[loadbalancer]",
        "{drop}"
    );

    let reject = wait_for_event(&log, "reject", |event| field(event, "kind") == "reject");
    assert_eq!(field(&reject, "reason"), "reject_tcp_rst", "{reject}");
    assert_eq!(field(&reject, "destination"), empty, "{reject}");
    assert!(
        field(&reject, "service").starts_with("default/empty:tcp/TCP"),
        "{reject}"
    );

    // One monitor at a time: a second one is refused while the first runs.
    let second = std::process::Command::new(peer::sibling_binary("lb").expect("lb"))
        .args(["monitor", "--pin-dir"])
        .arg(lab.pin_dir())
        .output()
        .expect("second monitor");
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains(&format!("another lb monitor (pid {})", monitor.pid())),
        "{stderr}"
    );

    assert_ne!(
        control(&lab).kinds,
        0,
        "reports are on while the monitor runs"
    );
    monitor
        .stop(Duration::from_secs(5))
        .expect("monitor exits on SIGTERM");
    assert_eq!(control(&lab), MonitorControl::default(), "and off after it");
}

/// The IPv6 twin from outside the node: XDP's IPv6 programs report a source-range drop, a
/// REJECT and a new flow with the IPv6 addresses of the packet (a drop is read again from the
/// packet, as an IPv4 one is).
#[test]
fn ipv6_drops_rejects_and_new_flows_from_outside_appear_with_their_addresses() {
    let lab = dual_stack_agent();
    let lb6 = "2001:db8:51::20";
    let client = &lab.cluster.client;
    client
        .route(&["2001:db8:51::/64", "via", &node_addr6(1).to_string()])
        .expect("route");
    let web = service_of_families(
        "web",
        &["2001:db8:96::10"],
        "TCP",
        80,
        "  type: LoadBalancer\n  loadBalancerSourceRanges: [\"2001:db8:ffff::/48\"]\n",
    )
    .replace(
        &format!("targetPort: {POD_PORT}}}"),
        &format!("targetPort: {POD_PORT}, nodePort: 30080}}"),
    ) + &format!("status:\n  loadBalancer:\n    ingress: [{{ip: \"{lb6}\"}}]\n");
    let empty = service_of_families(
        "empty",
        &["2001:db8:96::20"],
        "TCP",
        80,
        "  type: NodePort\n",
    )
    .replace(
        &format!("targetPort: {POD_PORT}}}"),
        &format!("targetPort: {POD_PORT}, nodePort: 30090}}"),
    );
    lab.apply(
        "six.yaml",
        &(web
            + "---\n"
            + &endpoint_slice6("web", &[(pod_addr6(1, 0), "node1")], "TCP")
            + "---\n"
            + &empty),
    )
    .expect("apply");
    let node_port = format!("[{}]:30080", node_addr6(1));
    let rejecting = format!("[{}]:30090", node_addr6(1));
    let load_balancer = format!("[{lb6}]:80");
    wait_until_answered(client, &node_port);

    let log = lab.scratch_file("monitor6.log");
    let monitor = start_monitor(&lab, &log, &[]);
    ClientRun::tcp(&node_port, 1)
        .run(client, None)
        .expect("client")
        .assert_all_ok("the NodePort, where no source range applies");
    let refused = ClientRun {
        timeout_ms: 300,
        ..ClientRun::tcp(&load_balancer, 1)
    }
    .run(client, None)
    .expect("client");
    assert_eq!(refused.errors, 1, "outside the source range: {refused:?}");
    let rejected = ClientRun::tcp(&rejecting, 1)
        .run(client, None)
        .expect("client");
    assert_eq!(rejected.errors, 1, "{rejected:?}");

    let client_prefix = format!("[{CLIENT_ADDR6}]:");
    let new_flow = wait_for_event(&log, "IPv6 new flow", |event| {
        field(event, "kind") == "new" && field(event, "destination") == node_port
    });
    assert!(
        field(&new_flow, "source").starts_with(&client_prefix),
        "{new_flow}"
    );
    assert_eq!(
        field(&new_flow, "backend"),
        format!("[{}]:{POD_PORT}", pod_addr6(1, 0)),
        "{new_flow}"
    );
    assert_eq!(field(&new_flow, "program"), "xdp", "{new_flow}");
    assert_eq!(field(&new_flow, "tcp_flags"), "S", "{new_flow}");

    let drop = wait_for_event(&log, "IPv6 source-range drop", |event| {
        field(event, "kind") == "drop" && field(event, "reason") == "drop_source_range"
    });
    assert!(field(&drop, "source").starts_with(&client_prefix), "{drop}");
    assert_eq!(field(&drop, "destination"), load_balancer, "{drop}");
    assert_eq!(field(&drop, "tcp_flags"), "S", "{drop}");
    assert_eq!(
        field(&drop, "interface"),
        lab::topology::FABRIC_IFACE,
        "{drop}"
    );

    let reject = wait_for_event(&log, "IPv6 reject", |event| {
        field(event, "kind") == "reject"
    });
    assert_eq!(field(&reject, "reason"), "reject_tcp_rst", "{reject}");
    assert_eq!(field(&reject, "destination"), rejecting, "{reject}");
    assert!(
        field(&reject, "source").starts_with(&client_prefix),
        "{reject}"
    );

    monitor
        .stop(Duration::from_secs(5))
        .expect("monitor exits on SIGTERM");
}

/// Waits until a TCP connection from `client` to `target` succeeds (the agent has programmed it).
fn wait_until_answered(client: &lab::lab::Host, target: &str) {
    ClientRun {
        timeout_ms: 500,
        ..ClientRun::tcp(target, 1)
    }
    .run_until(client, lab::agent::SYNC_TIMEOUT, |probe| probe.errors == 0)
    .expect("served");
}

#[test]
fn filters_and_count_select_what_is_printed_and_when_the_monitor_ends() {
    let (lab, refused_client) = lab_with_services();
    let log = lab.scratch_file("monitor.log");
    let client_range = format!("{REFUSED_CLIENT}/32");
    let monitor = start_monitor(
        &lab,
        &log,
        &[
            "--type",
            "drop,new",
            "--service",
            "default/web",
            "--client",
            &client_range,
            "--count",
            "2",
        ],
    );
    // Not the refused client's, or another Service's, or not a drop or new flow: not printed.
    ClientRun::tcp("198.51.100.20:80", 2)
        .run(&lab.cluster.client, None)
        .expect("client")
        .assert_all_ok("client inside the range");
    ClientRun::tcp(&format!("{}:30090", node_addr(1)), 1)
        .run(&refused_client, None)
        .expect("client2 to the empty service");
    refused_attempts(&refused_client, 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while control(&lab).kinds != 0 {
        assert!(
            Instant::now() < deadline,
            "the monitor did not end after --count 2"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(monitor);
    let printed = events(&log);
    assert_eq!(printed.len(), 2, "{printed:?}");
    for event in &printed {
        assert_eq!(field(event, "kind"), "drop", "{event}");
        assert_eq!(field(event, "reason"), "drop_source_range", "{event}");
        assert!(
            field(event, "source").starts_with(REFUSED_CLIENT),
            "{event}"
        );
    }
    let said = std::fs::read_to_string(&log).expect("log");
    assert!(!said.contains("is programmed now"), "{said}");
    // A service that is not programmed (a typo): said at once, not left to a silent wait.
    let typo_log = lab.scratch_file("monitor-typo.log");
    let typo = start_monitor(&lab, &typo_log, &["--service", "default/wbe"]);
    let said = std::fs::read_to_string(&typo_log).expect("log");
    assert!(
        said.contains("no service default/wbe is programmed now"),
        "{said}"
    );
    drop(typo);
}

#[test]
fn the_agent_turns_off_the_reports_of_a_monitor_that_died() {
    let (lab, refused_client) = lab_with_services();
    let log = lab.scratch_file("monitor.log");
    let monitor = start_monitor(&lab, &log, &["--type", "new"]);
    let pid = monitor.pid();
    monitor.kill().expect("SIGKILL the monitor");
    // A new flow reported after it died: left unread on the ring buffer.
    ClientRun::tcp("198.51.100.20:80", 1)
        .run(&lab.cluster.client, None)
        .expect("client")
        .assert_all_ok("client inside the range");
    let left = control(&lab);
    assert_eq!(
        left.owner_pid, pid,
        "a killed monitor cannot clear its cell"
    );
    assert_ne!(left.kinds, 0);
    // Its last heartbeat as if ABANDONED_AFTER had passed since (instead of waiting for it).
    let aged = MonitorControl {
        heartbeat_ns: 1,
        ..left
    };
    control_map(&lab)
        .set(0, &aged, 0)
        .expect("age the heartbeat");
    let deadline = Instant::now() + Duration::from_secs(15);
    while control(&lab) != MonitorControl::default() {
        assert!(
            Instant::now() < deadline,
            "the agent did not turn the reports off: {:?}",
            control(&lab)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // And a new monitor may run; it prints what it asked for, not what the dead one left.
    let log = lab.scratch_file("monitor2.log");
    let monitor = start_monitor(&lab, &log, &["--type", "new,drop"]);
    assert_eq!(control(&lab).owner_pid, monitor.pid());
    refused_attempts(&refused_client, 1);
    let drop_event = wait_for_event(&log, "drop", |event| field(event, "kind") == "drop");
    assert!(
        field(&drop_event, "source").starts_with(REFUSED_CLIENT),
        "{drop_event}"
    );
    let stale: Vec<_> = events(&log)
        .into_iter()
        .filter(|event| field(event, "kind") == "new")
        .collect();
    assert!(stale.is_empty(), "the dead monitor's events: {stale:?}");
}

#[test]
fn the_programs_log_reaches_the_agents_log_at_the_level_asked() {
    let (lab, refused_client) = lab_with_services_and_agent(&[
        "--ebpf-log-level",
        "debug",
        "--log-level",
        "info,lb::ebpf=debug",
    ]);
    refused_attempts(&refused_client, 1);
    let line = format!(
        "xdp: dropped, event {}",
        lb_common::Event::DROP_SOURCE_RANGE.0
    );
    wait_for_log(&lab.log(), &line, 1, Duration::from_secs(10)).expect("the drop, logged");
}

#[test]
fn a_pods_connects_through_the_socket_hooks_appear_as_new_flows_and_rejects() {
    let (lab, _refused_client) = lab_with_services();
    let log = lab.scratch_file("monitor.log");
    let monitor = start_monitor(&lab, &log, &["--type", "new,reject"]);
    ClientRun::tcp("10.96.0.10:80", 1)
        .run(lab.client_pod(), Some(&lab.cgroup))
        .expect("pod client")
        .assert_all_ok("ClusterIP from a pod");
    let refused = ClientRun::tcp("10.96.0.20:80", 1)
        .run(lab.client_pod(), Some(&lab.cgroup))
        .expect("pod client");
    assert_eq!(refused.errors, 1, "{refused:?}");

    let new_flow = wait_for_event(&log, "socket new flow", |event| {
        field(event, "kind") == "new" && field(event, "program") == "socket"
    });
    assert_eq!(
        field(&new_flow, "destination"),
        "10.96.0.10:80",
        "{new_flow}"
    );
    assert_eq!(field(&new_flow, "source"), "socket", "{new_flow}");
    assert_eq!(
        field(&new_flow, "backend"),
        format!("{}:8080", pod_addr(1, 0)),
        "{new_flow}"
    );
    assert!(
        field(&new_flow, "service").starts_with("default/web:http/TCP"),
        "{new_flow}"
    );
    let reject = wait_for_event(&log, "socket reject", |event| {
        field(event, "kind") == "reject" && field(event, "program") == "socket"
    });
    assert_eq!(field(&reject, "reason"), "sock_no_backend", "{reject}");
    assert_eq!(field(&reject, "destination"), "10.96.0.20:80", "{reject}");
    drop(monitor);
}
