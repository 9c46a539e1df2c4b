//! The lab itself: topology wiring, isolation, and clean-up even when a test fails midway.

use lab::{
    lab::{Cgroup, Lab, NAME_PREFIX, list_namespaces},
    peer::{self, ClientRun},
    topology::{
        CLIENT_ADDR, CLIENT_ADDR6, Cluster, ClusterSpec, node_addr, node_addr6, pod_addr, pod_addr6,
    },
};

fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    list_namespaces()
        .expect("listing namespaces")
        .into_iter()
        .filter(|name| name.starts_with(&format!("{prefix}-")))
        .collect()
}

/// Whether `pid` is a running process (a zombie waiting to be reaped counts as gone).
fn process_exists(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// A connection from `host` to `target` fails at once: no route, so not a packet leaves.
#[track_caller]
fn assert_unreachable(host: &lab::lab::Host, target: &str) {
    let report = ClientRun::tcp(target, 1).run(host, None).expect("client");
    assert_eq!(report.errors, 1, "{report:?}");
    assert!(
        report.error_samples[0].contains("unreachable"),
        "{report:?}"
    );
}

#[test]
fn the_cluster_is_wired_as_designed() {
    let mut lab = Lab::new().expect("lab");
    let cluster = Cluster::build(&mut lab, &ClusterSpec::default()).expect("cluster");
    let remote_pod = &cluster.node(2).pods[0];
    let _server = peer::serve(&remote_pod.host, "n2p0", 9000).expect("server");
    let _node_server = peer::serve(&cluster.node(1).host, "node1", 9000).expect("server");

    // Pod to pod across nodes, routed through both nodes, no NAT on the way.
    let from_pod = &cluster.node(1).pods[1];
    let target = format!("{}:9000", pod_addr(2, 0));
    let report = ClientRun::tcp(&target, 3)
        .run(&from_pod.host, None)
        .expect("client");
    assert_eq!(report.ok, 3, "{report:?}");
    assert_eq!(
        report.peers_seen.keys().collect::<Vec<_>>(),
        [&pod_addr(1, 1).to_string()]
    );

    // The client reaches the nodes on the fabric...
    let report = ClientRun::udp(&format!("{}:9000", node_addr(1)), 3)
        .run(&cluster.client, None)
        .expect("client");
    assert_eq!(report.ok, 3, "{report:?}");
    assert_eq!(
        report.peers_seen.keys().collect::<Vec<_>>(),
        [&CLIENT_ADDR.to_string()]
    );

    // ...and nothing else: no default route, so an unrouted address fails before any packet leaves.
    assert_unreachable(&cluster.client, &format!("{}:9000", pod_addr(2, 0)));
}

/// The lab is dual-stack: the same paths over IPv6 (pod to pod across nodes without NAT, the
/// client to a node on the fabric) and, from the client, nothing unrouted.
#[test]
fn the_cluster_is_dual_stack() {
    let mut lab = Lab::new().expect("lab");
    let spec = ClusterSpec {
        dual_stack: true,
        ..ClusterSpec::default()
    };
    let cluster = Cluster::build(&mut lab, &spec).expect("cluster");
    let _server =
        peer::serve_dual_stack(&cluster.node(2).pods[0].host, "n2p0", 9000).expect("server");
    let _node_server =
        peer::serve_dual_stack(&cluster.node(1).host, "node1", 9000).expect("server");

    let target = format!("[{}]:9000", pod_addr6(2, 0));
    let report = ClientRun::tcp(&target, 3)
        .run(&cluster.node(1).pods[1].host, None)
        .expect("client");
    assert_eq!(report.ok, 3, "{report:?}");
    assert_eq!(
        report.peers_seen.keys().collect::<Vec<_>>(),
        [&format!("[{}]", pod_addr6(1, 1))]
    );

    let report = ClientRun::udp(&format!("[{}]:9000", node_addr6(1)), 3)
        .run(&cluster.client, None)
        .expect("client");
    assert_eq!(report.ok, 3, "{report:?}");
    assert_eq!(
        report.peers_seen.keys().collect::<Vec<_>>(),
        [&format!("[{CLIENT_ADDR6}]")]
    );

    assert_unreachable(&cluster.client, &target);
}

#[test]
fn a_test_that_panics_midway_leaves_nothing_behind() {
    let (prefix_tx, prefix_rx) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let mut lab = Lab::new().expect("lab");
        let cluster = Cluster::build(&mut lab, &ClusterSpec::default()).expect("cluster");
        let server = peer::serve(&cluster.node(1).pods[0].host, "n1p0", 9000).expect("server");
        let cgroup = Cgroup::new(&lab, "hooks").expect("cgroup");
        // A background process that no guard of its own knows about: only the lab's sweep of the
        // namespace can stop it.
        let pod = &cluster.node(1).pods[1].host;
        let orphan = pod
            .spawn("sh", &["-c", "echo up; exec sleep 600"], None)
            .expect("sleeper");
        prefix_tx
            .send((
                lab.prefix().to_owned(),
                lab.namespaces().len(),
                [server.pid(), orphan.pid()],
                cgroup.path().to_owned(),
            ))
            .expect("send");
        std::mem::forget(orphan);
        panic!("the test fails in the middle of the lab");
    })
    .join();
    assert!(outcome.is_err(), "the thread must have panicked");

    let (prefix, created, pids, cgroup) = prefix_rx.recv().expect("lab details");
    assert!(created >= 6, "the lab had built its namespaces");
    assert_eq!(namespaces_with_prefix(&prefix), Vec::<String>::new());
    for pid in pids {
        assert!(
            !process_exists(pid),
            "process {pid} of the lab still running"
        );
    }
    assert!(!cgroup.exists(), "cgroup {} left behind", cgroup.display());
}

#[test]
fn labs_of_dead_processes_are_swept_and_nothing_else_is_touched() {
    // A pid that certainly belongs to no process any more: a child we started and reaped.
    let mut child = std::process::Command::new("true").spawn().expect("true");
    let dead_pid = child.id();
    child.wait().expect("wait");
    assert!(!process_exists(dead_pid));

    let stale = format!("{NAME_PREFIX}{dead_pid}x0-node1");
    // Same letters, not our naming scheme: must survive the sweep.
    let foreign = format!("{NAME_PREFIX}-notours{}", std::process::id());
    for name in [&stale, &foreign] {
        let status = std::process::Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .expect("ip");
        assert!(status.success());
    }
    let _lab = Lab::new().expect("lab");
    let present = list_namespaces().expect("list");
    let foreign_survived = present.contains(&foreign);
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &foreign])
        .status();
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &stale])
        .status();
    assert!(
        !present.contains(&stale),
        "stale namespace {stale} was not swept"
    );
    assert!(
        foreign_survived,
        "a namespace not made by the lab was removed"
    );
}

#[test]
fn processes_join_the_cgroup_before_they_run() {
    let mut lab = Lab::new().expect("lab");
    let host = lab.host("solo").expect("host");
    let cgroup = Cgroup::new(&lab, "solo").expect("cgroup");
    let own = host
        .run_in_cgroup(&cgroup, "cat", &["/proc/self/cgroup"])
        .expect("cat");
    let name = cgroup
        .path()
        .file_name()
        .and_then(|n| n.to_str())
        .expect("name");
    assert!(
        own.lines()
            .any(|line| line.starts_with("0::") && line.ends_with(name)),
        "{own}"
    );
    // And it ran inside the host's namespace, not the machine's.
    let links = host.run("cat", &["/proc/net/dev"]).expect("cat");
    assert!(!links.contains("eth0"), "{links}");
}
