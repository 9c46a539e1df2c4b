//! The `lb` agent with the file source, in the lab: Services created, scaled, changed and deleted
//! in YAML reach real traffic; a malformed file changes nothing; the agent killed with SIGKILL and
//! restarted under load loses no connection and no request.

use std::time::Duration;

use lab::{
    agent::{AgentLab, SYNC_TIMEOUT},
    lab::wait_for_log,
    peer::ClientRun,
    topology::{FABRIC_IFACE, node_addr, pod_addr},
};

fn service(port: u16, node_port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  ports:\n  - {{name: http, port: {port}, targetPort: 8080, nodePort: {node_port}}}\n"
    )
}

/// The web EndpointSlice with the given node1 pods (by index).
fn endpoints(pods: &[u8]) -> String {
    let mut yaml = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nports:\n- {name: http, port: 8080, protocol: TCP}\nendpoints:\n".to_owned();
    for &pod in pods {
        yaml.push_str(&format!(
            "- addresses: [\"{}\"]\n  nodeName: node1\n  conditions: {{ready: true}}\n",
            pod_addr(1, pod)
        ));
    }
    yaml
}

#[test]
fn services_created_scaled_changed_and_deleted_in_yaml_reach_real_traffic() {
    let mut setup = AgentLab::new().expect("lab");
    setup.start_agent(&[]).expect("agent");

    // Created: one endpoint.
    setup
        .apply(
            "web.yaml",
            &(service(80, 30080) + "---\n" + &endpoints(&[0])),
        )
        .expect("apply");
    let node_port = format!("{}:30080", node_addr(1));
    let from_outside = ClientRun::tcp(&node_port, 20)
        .run(&setup.cluster.client, None)
        .expect("client");
    from_outside.assert_all_ok("created, NodePort");
    assert_eq!(from_outside.servers(), ["n1p0"].into());
    let from_pod = ClientRun::tcp("10.96.0.10:80", 20)
        .run(setup.client_pod(), Some(&setup.cgroup))
        .expect("client");
    from_pod.assert_all_ok("created, ClusterIP");

    // Scaled: two endpoints.
    setup
        .apply(
            "web.yaml",
            &(service(80, 30080) + "---\n" + &endpoints(&[0, 1])),
        )
        .expect("apply");
    let report = ClientRun::tcp(&node_port, 40)
        .run(&setup.cluster.client, None)
        .expect("client");
    report.assert_all_ok("scaled");
    assert_eq!(report.servers(), ["n1p0", "n1p1"].into());

    // A malformed edit: reported with file and line, the last good state stays in force.
    let before = std::fs::read_to_string(setup.log())
        .unwrap_or_default()
        .len();
    std::fs::write(
        setup.manifests().join("web.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: [web\n",
    )
    .expect("write");
    wait_for_log(&setup.log(), "web.yaml:", 1, SYNC_TIMEOUT)
        .expect("the error names the file and line");
    let log = std::fs::read_to_string(setup.log()).unwrap_or_default();
    assert!(log[before..].contains("web.yaml:4"), "{}", &log[before..]);
    let report = ClientRun::tcp(&node_port, 20)
        .run(&setup.cluster.client, None)
        .expect("client");
    report.assert_all_ok("after a malformed edit");

    // Changed: new port and nodePort; the old ones stop answering.
    setup
        .apply(
            "web.yaml",
            &(service(81, 30081) + "---\n" + &endpoints(&[0, 1])),
        )
        .expect("apply");
    let report = ClientRun::tcp(&format!("{}:30081", node_addr(1)), 20)
        .run(&setup.cluster.client, None)
        .expect("client");
    report.assert_all_ok("changed, new nodePort");
    let report = ClientRun::tcp("10.96.0.10:81", 20)
        .run(setup.client_pod(), Some(&setup.cgroup))
        .expect("client");
    report.assert_all_ok("changed, new port");
    let old = ClientRun {
        timeout_ms: 500,
        ..ClientRun::tcp(&node_port, 1)
    }
    .run(&setup.cluster.client, None)
    .expect("client");
    assert_eq!(old.errors, 1, "old nodePort still answers: {old:?}");

    // Deleted: nothing answers.
    setup.delete("web.yaml").expect("delete");
    let gone = ClientRun {
        timeout_ms: 500,
        ..ClientRun::tcp(&format!("{}:30081", node_addr(1)), 1)
    }
    .run(&setup.cluster.client, None)
    .expect("client");
    assert_eq!(gone.errors, 1, "deleted service still answers: {gone:?}");
    let gone = ClientRun {
        timeout_ms: 500,
        ..ClientRun::tcp("10.96.0.10:81", 1)
    }
    .run(setup.client_pod(), Some(&setup.cgroup))
    .expect("client");
    assert_eq!(gone.errors, 1, "deleted ClusterIP still answers: {gone:?}");
}

/// A Service whose annotations hold an alias bomb of about 15 KB (25 levels of 100 aliases each
/// to the level before: 100^25 strings expanded).
fn alias_bomb() -> String {
    let mut yaml =
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: laughs\n  annotations:\n".to_owned();
    yaml.push_str(&format!("    l0: &l0 [{}]\n", vec!["lol"; 100].join(", ")));
    for level in 1..25 {
        let alias = format!("*l{}", level - 1);
        yaml.push_str(&format!(
            "    l{level}: &l{level} [{}]\n",
            vec![alias.as_str(); 100].join(", ")
        ));
    }
    yaml
}

/// `lb_manifest_errors_total` from the agent's /metrics.
fn manifest_errors(setup: &AgentLab) -> u64 {
    let errors = setup
        .metric("lb_manifest_errors_total")
        .expect("GET /metrics")
        .expect("lb_manifest_errors_total on /metrics");
    errors as u64
}

#[test]
fn hostile_manifests_are_refused_and_counted_and_change_nothing() {
    let mut setup = AgentLab::new().expect("lab");
    std::fs::write(
        setup.manifests().join("web.yaml"),
        service(80, 30080) + "---\n" + &endpoints(&[0]),
    )
    .expect("manifest");
    setup
        .start_agent(&["--manifest-max-bytes", "65536"])
        .expect("agent");
    let node_port = format!("{}:30080", node_addr(1));
    assert_eq!(manifest_errors(&setup), 0);

    let before = std::fs::read_to_string(setup.log())
        .unwrap_or_default()
        .len();
    std::fs::write(setup.manifests().join("laughs.yaml"), alias_bomb()).expect("write");
    wait_for_log(&setup.log(), "laughs.yaml", 1, SYNC_TIMEOUT).expect("the error names the file");
    std::fs::write(
        setup.manifests().join("big.yaml"),
        format!("# {}\n", "x".repeat(70_000)),
    )
    .expect("write");
    wait_for_log(&setup.log(), "big.yaml", 1, SYNC_TIMEOUT).expect("the error names the file");
    let log = std::fs::read_to_string(setup.log()).unwrap_or_default();
    let new = &log[before..];
    assert!(new.contains("alias replay limit"), "{new}");
    assert!(new.contains("--manifest-max-bytes"), "{new}");
    assert_eq!(manifest_errors(&setup), 2, "each refused file counted once");

    // The agent lives on and serves what it had.
    assert!(
        setup
            .agent_pid()
            .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists()),
        "the agent is still running"
    );
    let report = ClientRun::tcp(&node_port, 20)
        .run(&setup.cluster.client, None)
        .expect("client");
    report.assert_all_ok("after hostile manifests");
}

#[test]
fn the_agent_killed_and_restarted_under_load_loses_no_connection_and_no_request() {
    let mut setup = AgentLab::new().expect("lab");
    std::fs::write(
        setup.manifests().join("web.yaml"),
        service(80, 30080) + "---\n" + &endpoints(&[0, 1]),
    )
    .expect("manifest");
    // UDP goes through lb_xdp's tail call: the pinned program array must outlive the agent.
    let dns = "apiVersion: v1\nkind: Service\nmetadata: {name: dns, namespace: default}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.53\n  ports:\n  - {name: dns, port: 53, targetPort: 8080, nodePort: 30053, protocol: UDP}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: dns-1\n  namespace: default\n  labels: {kubernetes.io/service-name: dns}\naddressType: IPv4\nports:\n- {name: dns, port: 8080, protocol: UDP}\nendpoints:\n".to_owned()
        + &format!(
            "- addresses: [\"{}\"]\n  nodeName: node1\n  conditions: {{ready: true}}\n",
            pod_addr(1, 0)
        );
    std::fs::write(setup.manifests().join("dns.yaml"), dns).expect("manifest");
    setup.start_agent(&[]).expect("agent");

    let node_port = format!("{}:30080", node_addr(1));
    let udp_node_port = format!("{}:30053", node_addr(1));
    let client = setup.cluster.client.clone();
    let pod = setup.client_pod().clone();
    // Load for ~2 s: one long connection, and connect/request/close in a loop.
    let long = std::thread::spawn({
        let (client, target) = (client.clone(), node_port.clone());
        move || {
            ClientRun {
                one_flow: true,
                interval_ms: 10,
                ..ClientRun::tcp(&target, 200)
            }
            .run(&client, None)
        }
    });
    let ready = setup.scratch_file("short.ready");
    let short = std::thread::spawn({
        let (client, target, ready) = (client.clone(), node_port.clone(), ready.clone());
        move || {
            ClientRun {
                interval_ms: 5,
                ready_file: Some(&ready),
                ..ClientRun::tcp(&target, 300)
            }
            .run(&client, None)
        }
    });
    lab::peer::wait_until_answered(&ready, Duration::from_secs(10)).expect("clients under way");
    setup.kill_agent().expect("SIGKILL");
    std::thread::sleep(Duration::from_millis(300));
    // While no agent runs, the pinned datapath still serves the ClusterIP to pods too.
    let meanwhile = ClientRun::tcp("10.96.0.10:80", 20)
        .run(&pod, Some(&setup.cgroup))
        .expect("client");
    let meanwhile_udp = ClientRun::udp(&udp_node_port, 20)
        .run(&client, None)
        .expect("udp client");
    setup.start_agent(&[]).expect("restart");

    let long = long.join().expect("thread").expect("long client");
    let short = short.join().expect("thread").expect("short client");
    long.assert_all_ok("long connection across the restart");
    short.assert_all_ok("connect/request/close across the restart");
    meanwhile.assert_all_ok("ClusterIP while the agent was down");
    meanwhile_udp.assert_all_ok("UDP NodePort while the agent was down");
    ClientRun::udp(&udp_node_port, 20)
        .run(&client, None)
        .expect("udp client")
        .assert_all_ok("UDP NodePort after the restart");
    // The restarted agent found everything in place: nothing to change, conntrack untouched.
    let syncs = wait_for_log(&setup.log(), "synced", 2, SYNC_TIMEOUT).expect("syncs");
    assert!(
        syncs[1].contains("changes=0"),
        "restart rewrote state: {}",
        syncs[1]
    ); // Each start's keeper rebuilt the pair filter from conntrack once its programs were
    // attached (the restart's load left the filter full: the killed agent's were still there).
    wait_for_log(
        &setup.log(),
        "pair filter rebuilt from conntrack",
        2,
        SYNC_TIMEOUT,
    )
    .expect("the pair filter's keeper at each start");
}

/// The agent running, serving `web.yaml`'s Service (NodePort 30080) with one endpoint; and that
/// NodePort on node1.
fn agent_serving_web() -> (AgentLab, String) {
    let mut setup = AgentLab::new().expect("lab");
    setup.start_agent(&[]).expect("agent");
    setup
        .apply(
            "web.yaml",
            &(service(80, 30080) + "---\n" + &endpoints(&[0])),
        )
        .expect("apply");
    (setup, format!("{}:30080", node_addr(1)))
}

#[test]
fn cleanup_removes_everything_the_agent_installed() {
    let (mut setup, node_port) = agent_serving_web();
    ClientRun::tcp(&node_port, 5)
        .run(&setup.cluster.client, None)
        .expect("client")
        .assert_all_ok("before cleanup");
    setup.kill_agent().expect("stop the agent");

    let lb = lab::peer::sibling_binary("lb").expect("lb");
    let pin_dir = setup.pin_dir().to_owned();
    // `--source file`: no API server to remove a DSR mark from, so the run stays on this host.
    let status = std::process::Command::new(lb)
        .args(["run", "--cleanup", "--source", "file", "--pin-dir"])
        .arg(&pin_dir)
        .status()
        .expect("lb run --cleanup");
    assert!(status.success());
    assert!(!pin_dir.exists(), "{} still there", pin_dir.display());
    // XDP is gone from the NIC, and neither the NodePort nor the ClusterIP answers any more.
    let link = setup
        .cluster
        .node(1)
        .host
        .ip(&["-d", "link", "show", "dev", "eth0"])
        .expect("link");
    assert!(!link.contains("xdp"), "{link}");
    let gone = ClientRun {
        timeout_ms: 500,
        ..ClientRun::tcp(&node_port, 1)
    }
    .run(&setup.cluster.client, None)
    .expect("client");
    assert_eq!(gone.errors, 1, "{gone:?}");
    let gone = ClientRun {
        timeout_ms: 500,
        ..ClientRun::tcp("10.96.0.10:80", 1)
    }
    .run(setup.client_pod(), Some(&setup.cgroup))
    .expect("client");
    assert_eq!(gone.errors, 1, "the socket hooks still redirect: {gone:?}");
}

/// CAP_NET_ADMIN (12), CAP_PERFMON (38), CAP_BPF (39): what deploy/daemonset.yaml gives the agent.
const DAEMONSET_CAPABILITIES: u64 = 1 << 12 | 1 << 38 | 1 << 39;

#[test]
fn the_agent_works_with_the_three_capabilities_the_daemonset_gives_it() {
    let mut setup = AgentLab::new().expect("lab");
    // As root with a bounding set of exactly these, the agent's effective set is exactly these.
    setup
        .start_agent_through(
            &[
                "setpriv",
                "--bounding-set=-all,+bpf,+net_admin,+perfmon",
                "--inh-caps=-all",
            ],
            &["--mount-bpffs", "false"],
        )
        .expect("agent with three capabilities");
    let pid = setup.agent_pid().expect("agent running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .expect("CapEff");
    assert_eq!(effective, DAEMONSET_CAPABILITIES, "{status}");

    setup
        .apply(
            "web.yaml",
            &(service(80, 30080) + "---\n" + &endpoints(&[0, 1])),
        )
        .expect("apply");
    ClientRun::tcp(&format!("{}:30080", node_addr(1)), 20)
        .run(&setup.cluster.client, None)
        .expect("client")
        .assert_all_ok("NodePort through XDP");
    ClientRun::tcp("10.96.0.10:80", 20)
        .run(setup.client_pod(), Some(&setup.cgroup))
        .expect("client")
        .assert_all_ok("ClusterIP through the socket hook");
    let accept_local = setup
        .cluster
        .node(1)
        .host
        .run("cat", &["/proc/sys/net/ipv4/conf/eth0/accept_local"])
        .expect("sysctl");
    assert_eq!(accept_local.trim(), "1", "the agent set accept_local");
}

/// A node whose ephemeral ports cover the NodePort and SNAT ranges (the lab's hosts take
/// 10000-65000): the agent takes those ports out of them, keeping what the node reserved
/// already, and the requirement's gauge reads 0; ports freed behind its back are reported at
/// the next sync, and so are the ports an agent under a read-only /proc/sys cannot reserve; a
/// reservation that would take most ephemeral ports is refused; with
/// `--reserve-ports false` it leaves the setting alone; `lb init-node`, which
/// does it for the DaemonSet's agent (whose /proc/sys is read-only), reserves them too.
#[test]
fn the_agent_takes_the_node_port_and_snat_ranges_out_of_the_nodes_ephemeral_ports() {
    let mut setup = AgentLab::new().expect("lab");
    let node = setup.cluster.node(1).host.clone();
    let reserved_ports = || {
        node.run("cat", &["/proc/sys/net/ipv4/ip_local_reserved_ports"])
            .expect("sysctl")
            .trim()
            .to_owned()
    };
    let gauge = "lb_node_requirement_missing{requirement=\"reserved_ports\",interface=\"\"}";
    node.sysctl("net.ipv4.ip_local_reserved_ports", "22,40000-40009")
        .expect("the node's own reservation");

    setup.start_agent(&[]).expect("agent");
    assert_eq!(reserved_ports(), "22,30000-32767,40000-40009,61000-65000");
    assert_eq!(
        setup.metric(gauge).expect("metrics"),
        Some(0.0),
        "{}",
        std::fs::read_to_string(setup.log()).unwrap_or_default()
    );

    // Freed behind the agent's back: the next sync (any change) reports it.
    node.sysctl("net.ipv4.ip_local_reserved_ports", "22")
        .expect("freed");
    setup.apply("web.yaml", &service(80, 30080)).expect("apply");
    let deadline = std::time::Instant::now() + SYNC_TIMEOUT;
    while setup.metric(gauge).expect("metrics") != Some(1.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the gauge stayed at 0"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_for_log(
        &setup.log(),
        "net.ipv4.ip_local_reserved_ports is 22 (want 30000-32767,61000-65000 in it)",
        1,
        SYNC_TIMEOUT,
    )
    .expect("logged");

    // The DaemonSet's agent: its /proc/sys read-only (here in a private mount namespace of its
    // own). It cannot reserve the freed ports, starts all the same, and says what is missing.
    setup.kill_agent().expect("kill");
    setup
        .start_agent_through(
            &[
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                "mount -o bind,ro /proc/sys /proc/sys && exec \"$0\" \"$@\"",
            ],
            &[],
        )
        .expect("agent under a read-only /proc/sys");
    assert_eq!(reserved_ports(), "22");
    assert_eq!(setup.metric(gauge).expect("metrics"), Some(1.0));
    wait_for_log(
        &setup.log(),
        "could not reserve the NodePort and SNAT ports",
        1,
        SYNC_TIMEOUT,
    )
    .expect("logged");

    // A NodePort range over most of the ephemeral ports: reserving it would starve the node's
    // own connections, so the agent refuses and says so.
    setup.kill_agent().expect("kill");
    setup
        .start_agent(&["--node-port-range", "10000-60000"])
        .expect("agent");
    assert_eq!(reserved_ports(), "22");
    assert_eq!(setup.metric(gauge).expect("metrics"), Some(1.0));
    wait_for_log(
        &setup.log(),
        "it would leave 999 of the node's 55001 ephemeral ports",
        1,
        SYNC_TIMEOUT,
    )
    .expect("logged");

    // Told not to, a new agent leaves the setting alone and has no gauge for it.
    setup.kill_agent().expect("kill");
    setup
        .start_agent(&["--reserve-ports", "false"])
        .expect("agent");
    assert_eq!(reserved_ports(), "22");
    assert_eq!(setup.metric(gauge).expect("metrics"), None);

    // The init container's command reserves them.
    let lb = lab::peer::sibling_binary("lb").expect("lb");
    let pin_dir = setup.pin_dir().join("init");
    let said = node
        .run(
            &lb,
            &[
                "init-node",
                "--pin-dir",
                pin_dir.to_str().expect("UTF-8 path"),
            ],
        )
        .expect("lb init-node");
    assert!(
        said.contains("net.ipv4.ip_local_reserved_ports += 30000-32767,61000-65000"),
        "{said}"
    );
    assert_eq!(reserved_ports(), "22,30000-32767,61000-65000");
}

#[test]
fn init_node_sets_accept_local_which_the_agent_under_a_read_only_proc_sys_only_checks() {
    let setup = AgentLab::new().expect("lab");
    let node = &setup.cluster.node(1).host;
    let lb = lab::peer::sibling_binary("lb").expect("lb");
    let sysctl = "/proc/sys/net/ipv4/conf/eth0/accept_local";
    node.run("sh", &["-c", &format!("echo 0 > {sysctl}")])
        .expect("accept_local off");

    // The agent as the DaemonSet runs it: its /proc/sys read-only, as the container runtime
    // mounts it (here in a private mount namespace of its own), and accept_local still off.
    let agent = format!(
        "mount -o bind,ro /proc/sys /proc/sys && exec {} run --source file \
         --manifests {} --interfaces eth0 --pin-dir {} --mount-bpffs false",
        lb.display(),
        setup.manifests().display(),
        setup.pin_dir().display()
    );
    let refused = node
        .run(
            "unshare",
            &["--mount", "--propagation", "private", "sh", "-c", &agent],
        )
        .expect_err("the agent started without accept_local");
    let message = format!("{refused:#}");
    assert!(
        message.contains("net.ipv4.conf.eth0.accept_local is 0")
            && message.contains("lb init-node"),
        "{message}"
    );
    assert_eq!(node.run("cat", &[sysctl]).expect("sysctl").trim(), "0");
    let pinned = std::fs::read_dir(setup.pin_dir()).expect("pins").count();
    assert_eq!(pinned, 0, "the agent loaded before checking");

    // The init container's command sets it, and makes the pin directory (0700).
    let pin_dir = setup.pin_dir().join("lb");
    let pin_dir_arg = pin_dir.to_str().expect("UTF-8 path");
    node.run(
        &lb,
        &[
            "init-node",
            "--interfaces",
            "eth0",
            "--pin-dir",
            pin_dir_arg,
        ],
    )
    .expect("lb init-node");
    assert_eq!(node.run("cat", &[sysctl]).expect("sysctl").trim(), "1");
    let mode = std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(&pin_dir).expect("pins"));
    assert_eq!(mode & 0o7777, 0o700);
    // A name that would leave /proc/sys/net/ipv4/conf is no interface.
    let escape = node
        .run(
            &lb,
            &[
                "init-node",
                "--interfaces",
                "../../../kernel",
                "--pin-dir",
                pin_dir_arg,
            ],
        )
        .expect_err("a path as an interface name");
    assert!(
        format!("{escape:#}").contains("is not an interface name"),
        "{escape:#}"
    );
    // Nor is `all`, whose accept_local would turn it on for every interface of the node.
    let every_interface = node
        .run(
            &lb,
            &["init-node", "--interfaces", "all", "--pin-dir", pin_dir_arg],
        )
        .expect_err("all as an interface name");
    assert!(
        format!("{every_interface:#}").contains("is not an interface name"),
        "{every_interface:#}"
    );
    let all = "/proc/sys/net/ipv4/conf/all/accept_local";
    assert_eq!(node.run("cat", &[all]).expect("sysctl").trim(), "0");
}

#[test]
fn without_mount_permission_the_agent_refuses_to_start_when_the_host_has_no_bpffs() {
    // A private mount namespace whose /sys/fs/bpf mounts are gone (the machine's stay as they
    // are): what a container sees on a host without bpffs.
    let lb = lab::peer::sibling_binary("lb").expect("lb");
    let lab = lab::lab::Lab::new().expect("lab");
    let cgroup = lab::lab::Cgroup::new(&lab, "nobpffs").expect("cgroup");
    let script = format!(
        "while mountpoint -q /sys/fs/bpf; do umount /sys/fs/bpf || exit 99; done; \
         exec {} run --source file --manifests /dev/null --cgroup-path {} --mount-bpffs false",
        lb.display(),
        cgroup.path().display()
    );
    let output = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("unshare");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no bpffs at /sys/fs/bpf"), "{stderr}");
}

#[test]
fn an_empty_setting_in_the_environment_counts_as_not_set() {
    // A ConfigMap key left empty: as a value, "" is no CIDR and would be refused.
    let lb = lab::peer::sibling_binary("lb").expect("lb");
    let pins = std::env::temp_dir().join(format!("lbt{}-empty-setting", std::process::id()));
    let output = std::process::Command::new(lb)
        .args(["run", "--cleanup", "--pin-dir"])
        .arg(&pins)
        // The kube source's cleanup resolves the node name (from the empty override too), then
        // fails on this missing kubeconfig instead of reaching whatever API server the
        // machine's own configuration names.
        .arg("--kubeconfig")
        .arg(pins.join("no-kubeconfig"))
        .env("LB_NODEPORT_ADDRESSES", "")
        .env("LB_HOSTNAME_OVERRIDE", "")
        .output()
        .expect("lb run");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The remote endpoint's EndpointSlice: node2's pod.
fn remote_endpoint() -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-2\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080, protocol: TCP}}\nendpoints:\n- addresses: [\"{}\"]\n  nodeName: node2\n  conditions: {{ready: true}}\n",
        pod_addr(2, 0)
    )
}

/// A node whose NIC is a veth with a plain peer (a kind node's eth0): what native XDP would
/// transmit there (SNATed packets to a remote endpoint, their answers to the client) the peer
/// drops unseen, so the agent's default attaches generic XDP to a veth, and NodePort traffic to
/// an endpoint on another node works.
#[test]
fn on_a_veth_whose_peer_runs_no_napi_the_default_mode_reaches_remote_endpoints() {
    let mut setup = AgentLab::with_spec(&lab::topology::ClusterSpec {
        fabric_napi: false,
        ..Default::default()
    })
    .expect("lab");
    setup.start_agent(&["--xdp-mode", "auto"]).expect("agent");
    let log = std::fs::read_to_string(setup.log()).expect("log");
    assert!(
        log.contains("a veth: XDP in generic mode"),
        "the agent should say why it chose generic XDP:\n{log}"
    );
    setup
        .apply(
            "web.yaml",
            &(service(80, 30080) + "---\n" + &remote_endpoint()),
        )
        .expect("apply");
    let node_port = format!("{}:30080", node_addr(1));
    let run = ClientRun::tcp(&node_port, 40)
        .run(&setup.cluster.client, None)
        .expect("client");
    run.assert_all_ok("NodePort to node2's pod through a veth without NAPI");
    assert_eq!(run.servers(), ["n2p0"].into());
}

/// A cluster's kube-proxy ConfigMap serves lb too: `--config` sets what lb has a setting for
/// (here the UDP, established and close-wait conntrack timeouts, which reach the datapath's
/// config map),
/// a flag given as well wins, and the fields lb ignores are logged by name.
#[test]
fn a_kube_proxy_configuration_file_sets_the_agents_settings_and_flags_win() {
    let mut setup = AgentLab::new().expect("lab");
    let config = setup.scratch_file("kube-proxy.conf");
    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: ipvs\nconntrack:\n  udpTimeout: 7s\n  tcpEstablishedTimeout: 2h0m0s\n  tcpCloseWaitTimeout: 20m0s\n",
    )
    .expect("config");
    setup
        .start_agent(&[
            "--config",
            config.to_str().expect("UTF-8 path"),
            "--conntrack-tcp-timeout-established",
            "3h",
        ])
        .expect("agent");
    let timeouts = lb_userspace::observe::inspect::PinnedMaps::open(setup.pin_dir())
        .expect("pins")
        .conntrack_timeouts();
    let seconds = |nanos: u64| nanos / 1_000_000_000;
    assert_eq!(seconds(timeouts.udp), 7, "from the file");
    assert_eq!(seconds(timeouts.tcp_established), 3 * 3600, "the flag wins");
    assert_eq!(
        seconds(timeouts.tcp_half_closed),
        20 * 60,
        "kube-proxy's close-wait timeout is lb's half-closed one"
    );
    assert_eq!(seconds(timeouts.tcp_closing), 10, "lb's default");
    let log = std::fs::read_to_string(setup.log()).expect("log");
    assert!(
        log.contains("kube-proxy configuration field ignored")
            && log.contains("mode: lb has one datapath (eBPF)"),
        "{log}"
    );
}

/// A map size changed across a restart cannot resize the pinned map (the kernel has no resize):
/// the agent keeps the pinned map, with its flows, and says that the new size waits for the
/// pins' removal.
#[test]
fn a_changed_map_size_over_pinned_maps_is_kept_and_said() {
    let mut setup = AgentLab::new().expect("lab");
    setup
        .start_agent(&["--conntrack-map-size", "8192"])
        .expect("agent");
    setup.stop_agent(Duration::from_secs(10)).expect("stop");
    setup
        .start_agent(&["--conntrack-map-size", "16384"])
        .unwrap_or_else(|error| {
            panic!(
                "agent again: {error}\n{}",
                std::fs::read_to_string(setup.log()).unwrap_or_default()
            )
        });
    let pinned =
        aya::maps::MapInfo::from_pin(setup.pin_dir().join(lb_common::map_names::CONNTRACK4))
            .expect("conntrack map");
    assert_eq!(pinned.max_entries(), 8192);
    let log = std::fs::read_to_string(setup.log()).expect("log");
    assert!(
        log.contains("a pinned map keeps its size: --conntrack-map-size takes effect once")
            && log.contains("pinned=8192")
            && log.contains("asked=16384"),
        "{log}"
    );
    assert!(
        !log.contains("--frontend-map-size takes effect"),
        "the frontends map was asked for its own size: {log}"
    );
}

/// A NIC whose MAC changes under the running agent (a bond failing over with its MAC, an
/// address set after boot): XDP checks every frame's destination against the NIC's MAC and
/// took every frame to the new one for another host's, so NodePort connections reached the
/// stack untranslated and were refused. The agent reads its NICs' MACs again every second, says
/// so in its log, and connections through the NodePort are made again.
#[test]
fn a_nics_mac_changed_under_the_agent_is_followed() {
    let (setup, node_port) = agent_serving_web();
    ClientRun::tcp(&node_port, 5)
        .run_until(&setup.cluster.client, SYNC_TIMEOUT, |report| report.ok == 5)
        .expect("the NodePort answers");

    let new_mac = "02:00:5e:10:aa:01";
    setup
        .cluster
        .node(1)
        .host
        .ip(&["link", "set", FABRIC_IFACE, "address", new_mac])
        .expect("a new MAC");
    setup
        .cluster
        .client
        .ip(&["neigh", "flush", "all"])
        .expect("the client forgets the old one");
    wait_for_log(&setup.log(), "a NIC's MAC changed", 1, SYNC_TIMEOUT)
        .expect("the agent follows the new MAC");
    let log = std::fs::read_to_string(setup.log()).unwrap_or_default();
    assert!(log.contains(new_mac), "{log}");
    ClientRun::tcp(&node_port, 20)
        .run(&setup.cluster.client, None)
        .expect("client")
        .assert_all_ok("after the MAC changed");
    assert_eq!(setup.events().expect("events")["pass_other_host"], 0);
}
