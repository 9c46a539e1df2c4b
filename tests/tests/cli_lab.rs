//! The inspection commands against a running agent in the lab, as an operator uses them: the
//! pin directory from `LB_PIN_DIR` (the DaemonSet's ConfigMap sets it), output into a pipe that
//! closed early (`lb conntrack | head`), frontends in a stable order, `lb explain` for a pod
//! (the socket hooks decide, at connect time) and for a UDP packet XDP rejects (the ICMP answer),
//! and a prompt exit on SIGTERM.

use std::{
    os::unix::process::ExitStatusExt as _,
    process::{Command, Stdio},
    time::Duration,
};

use lab::{
    agent::{AgentLab, endpoint_slice, lb_json},
    peer::{ClientRun, sibling_binary},
    topology::{node_addr, pod_addr},
};
use serde_json::Value;

const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  externalIPs: [198.51.100.30]\n  ports:\n  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}\n";
/// A UDP Service without endpoints: XDP answers ICMP port unreachable, the socket hooks refuse.
const QUIET: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: quiet, namespace: default}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.12\n  ports:\n  - {name: dns, port: 53, targetPort: 5353, protocol: UDP, nodePort: 30053}\n";

fn lab_with_services() -> AgentLab {
    let mut lab = AgentLab::new().expect("lab");
    lab.start_agent(&[]).expect("agent");
    let manifests = [
        WEB.to_owned(),
        endpoint_slice("web", &[(pod_addr(1, 0), "node1")]),
        QUIET.to_owned(),
    ]
    .join("---\n");
    lab.apply("all.yaml", &manifests).expect("apply");
    lab
}

fn lb_in_node(lab: &AgentLab, args: &[&str]) -> Value {
    lab.lb_json_in_node(args).expect("lb in node1")
}

#[test]
fn inspection_reads_lb_pin_dir_lists_frontends_in_order_and_ends_quietly_on_a_closed_pipe() {
    let lab = lab_with_services();

    let services = lb_in_node(&lab, &["services"]);
    let web = services
        .as_array()
        .expect("a list")
        .iter()
        .find(|service| service["name"] == "default/web:http/TCP")
        .unwrap_or_else(|| panic!("web in {services:#}"));
    // By address as a number (the map's key order, network byte order read as a number, would
    // put 203.0.113.1 first).
    assert_eq!(
        web["frontends"],
        serde_json::json!([
            "10.96.0.10:80/tcp ClusterIP",
            "198.51.100.30:80/tcp externalIP",
            format!("{}:30080/tcp NodePort", node_addr(1)),
        ]),
        "{web:#}"
    );
    let names: Vec<&str> = services
        .as_array()
        .expect("a list")
        .iter()
        .map(|service| service["name"].as_str().expect("a name"))
        .collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted, "services by name");
    assert_eq!(
        lb_in_node(&lab, &["services"]),
        services,
        "the same order again"
    );

    let lb = sibling_binary("lb").expect("lb");
    for args in [
        &["services"][..],
        &["backends"],
        &["conntrack", "--all"],
        &["stats"],
        &["explain", "203.0.113.10", "10.96.0.10:80/tcp"],
    ] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let output = Command::new(&lb)
            .args(args)
            .env("LB_PIN_DIR", lab.pin_dir())
            .stdout(Stdio::from(writer))
            .output()
            .expect("lb");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() || output.status.signal() == Some(libc::SIGPIPE),
            "lb {args:?} into a closed pipe: {:?} {stderr}",
            output.status
        );
        assert!(stderr.is_empty(), "lb {args:?} said: {stderr}");
    }
}

#[test]
fn explain_tells_the_socket_hooks_for_a_pod_and_the_icmp_answer_for_a_rejected_udp_packet() {
    let lab = lab_with_services();
    let backend = format!("{}:8080", pod_addr(1, 0));

    // A pod of node1, found on this node by route: the socket hooks translate its connect().
    let pod = pod_addr(1, 1).to_string();
    let from_pod = lb_in_node(&lab, &["explain", &pod, "10.96.0.10:80/tcp"]);
    assert_eq!(from_pod["hook"], "socket", "{from_pod:#}");
    assert_eq!(from_pod["verdict"], "translated", "{from_pod:#}");
    let reasons = from_pod["reasons"].to_string();
    assert!(
        reasons.contains("before any packet exists") && reasons.contains(&backend),
        "{from_pod:#}"
    );
    // And so it is: a real client in that pod reaches the backend, and XDP tracks nothing.
    let real = ClientRun::tcp("10.96.0.10:80", 3)
        .run(lab.client_pod(), Some(&lab.cgroup))
        .expect("client");
    assert_eq!(real.ok, 3, "{real:?}");
    assert!(lab.conntrack().expect("conntrack").is_empty());

    let refused = lb_in_node(&lab, &["explain", &pod, "10.96.0.12:53/udp"]);
    assert_eq!(refused["verdict"], "refused", "{refused:#}");
    assert!(
        refused["reasons"].to_string().contains("ECONNREFUSED"),
        "{refused:#}"
    );

    // The same address asked about as a packet arriving on the NIC: XDP.
    let from_nic = lb_in_node(
        &lab,
        &["explain", &pod, "10.96.0.10:80/tcp", "--from", "nic"],
    );
    assert_eq!(from_nic["hook"], "xdp", "{from_nic:#}");

    // A client outside: XDP answers a UDP packet to a Service without endpoints with ICMP port
    // unreachable, which is no pair of ports.
    let node_port = format!("{}:30053/udp", node_addr(1));
    let rejected = lb_json(
        lab.pin_dir(),
        &["explain", "203.0.113.10:45000", &node_port],
    )
    .expect("lb explain");
    assert_eq!(rejected["hook"], "xdp", "{rejected:#}");
    assert_eq!(rejected["verdict"], "tx", "{rejected:#}");
    assert!(rejected["rewritten"].is_null(), "{rejected:#}");
    let answer = rejected["answer"].as_str().expect("an answer");
    assert!(
        answer.contains("ICMP port unreachable (type 3, code 3)")
            && answer.contains(&format!("{} -> 203.0.113.10", node_addr(1))),
        "{rejected:#}"
    );
}

#[test]
fn an_idle_agent_exits_promptly_on_sigterm() {
    let mut lab = lab_with_services();
    // Idle: the last sync is done.
    std::thread::sleep(Duration::from_millis(500));
    let took = lab
        .stop_agent(Duration::from_secs(2))
        .expect("stopped within 2 s");
    // Reported, not asserted tightly: speed is for benchmarks.
    eprintln!("the idle agent exited {took:?} after SIGTERM");
}
