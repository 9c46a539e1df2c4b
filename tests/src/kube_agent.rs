//! The real `lb run --source kube` agent against the fake API server ([`crate::fake_apiserver`],
//! a mock: no API server can run here), in the machine's own network namespace, talking to it
//! over loopback. No NIC is attached, only the socket hooks to a private cgroup (the agent
//! refuses to start with nothing to attach to): this is about what the agent does with the API.

use std::{
    path::PathBuf,
    process::{Child, Command},
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    fake_apiserver::FakeApiServer,
    lab::{Cgroup, Lab, PinDir, ScratchDir, wait_for_log},
    peer::sibling_binary,
};

/// How long a wait for the agent's log may take.
pub const WAIT: Duration = Duration::from_secs(20);

/// A running agent and its log; killed on drop (its datapath stays pinned in the test's
/// [`PinDir`]), then its cgroup is removed.
pub struct KubeAgent {
    child: Child,
    _cgroup: Cgroup,
    log: PathBuf,
}

impl Drop for KubeAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl KubeAgent {
    /// Starts `lb run --source kube` as node1, with a kubeconfig for `server` and its log in
    /// `scratch`, pinning under `pins`, with `extra` flags.
    pub fn start(
        lab: &Lab,
        pins: &PinDir,
        scratch: &ScratchDir,
        server: &FakeApiServer,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let cgroup = Cgroup::new(lab, "kuberun")?;
        let kubeconfig = scratch.path().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig)?;
        let log = scratch.path().join("agent.log");
        let output = std::fs::File::create(&log)?;
        let child = Command::new(sibling_binary("lb")?)
            .args(["run", "--source", "kube", "--kubeconfig"])
            .arg(&kubeconfig)
            .args(["--hostname-override", "node1", "--pin-dir"])
            .arg(pins.path())
            // This agent runs in the machine's own namespace: its HTTP endpoints take free
            // loopback ports, never the well-known ones other agents (or tests) may hold.
            .args(["--metrics-bind-address", "127.0.0.1:0"])
            .args(["--healthz-bind-address", "127.0.0.1:0"])
            .arg("--cgroup-path")
            .arg(cgroup.path())
            .args(extra)
            .stdout(output.try_clone()?)
            .stderr(output)
            .spawn()
            .context("starting lb run")?;
        Ok(Self {
            child,
            _cgroup: cgroup,
            log,
        })
    }

    /// Waits (without blocking the runtime) until the log holds at least `count` lines with
    /// `needle`, for at most [`WAIT`]; returns those lines. Panics after that, with the log.
    pub async fn wait_for(&self, needle: &'static str, count: usize) -> Vec<String> {
        let log = self.log.clone();
        tokio::task::spawn_blocking(move || wait_for_log(&log, needle, count, WAIT))
            .await
            .expect("join")
            .expect(needle)
    }

    /// Everything the agent logged so far (stdout and stderr).
    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.log).expect("log")
    }

    /// A sample of the agent's /metrics (on loopback, where the agent logged it listens).
    pub fn metric(&self, sample: &str) -> Option<f64> {
        use std::io::{Read as _, Write as _};
        let text = self.text();
        let address = text
            .lines()
            .find(|line| line.contains("serving metrics"))?
            .split("address=")
            .nth(1)?
            .split_whitespace()
            .next()?
            .to_owned();
        let mut stream = std::net::TcpStream::connect(address).expect("connect to /metrics");
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .expect("request");
        let mut page = String::new();
        stream.read_to_string(&mut page).expect("response");
        page.lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
    }
}

/// This machine's boot ID (`/proc/sys/kernel/random/boot_id`), which the kubelet reports as a
/// Node's `status.nodeInfo.bootID`.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .expect("boot_id")
        .trim()
        .to_owned()
}

/// node1's Node as a kubelet on this machine reports it: its address and this boot's ID.
pub fn node1_booted() -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"},
        "status": {
            "addresses": [{"type": "InternalIP", "address": "203.0.113.1"}],
            "nodeInfo": {
                "bootID": boot_id(), "machineID": "m", "systemUUID": "s", "kernelVersion": "k",
                "osImage": "o", "containerRuntimeVersion": "c", "kubeletVersion": "v",
                "kubeProxyVersion": "v", "operatingSystem": "linux", "architecture": "amd64"
            }
        }
    })
}

/// node1's DSR mark on `server` (`lb.io/dsr-boot-id`), once it is there, polled for at most
/// `timeout`.
pub async fn wait_for_dsr_mark(server: &FakeApiServer, timeout: Duration) -> Option<String> {
    let started = std::time::Instant::now();
    loop {
        let mark = server
            .object(crate::fake_apiserver::Resource::Nodes, "", "node1")
            .and_then(|node| {
                node["metadata"]["annotations"]["lb.io/dsr-boot-id"]
                    .as_str()
                    .map(str::to_owned)
            });
        if mark.is_some() || started.elapsed() > timeout {
            return mark;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An [`crate::agent::AgentLab`] whose node1 agent runs `lb run --source kube` against a fake
/// API server inside node1's namespace, so that the agent has lb's XDP on its fabric NIC, as
/// the DaemonSet's agent has on the node's NICs; `populate` fills the server first (node1's
/// Node is there already, [`node1_booted`]), whose Node patches pass deploy/admission-policy.yaml
/// as node1's agent's. Returns after the agent's first sync.
pub fn lab_agent(
    populate: impl FnOnce(&FakeApiServer),
) -> anyhow::Result<(crate::agent::AgentLab, FakeApiServer)> {
    let mut setup = crate::agent::AgentLab::new()?;
    let server = FakeApiServer::start_in(&setup.cluster.node(1).host)?;
    server.apply(node1_booted());
    // As a cluster with deploy/admission-policy.yaml applied sees the agent of node1's pod.
    server.admit_node_patches(
        crate::admission::Policy::of_deploy()?,
        crate::admission::Requester::lb_agent_on("node1"),
    );
    populate(&server);
    let kubeconfig = setup.scratch_file("kubeconfig");
    server.write_kubeconfig(&kubeconfig)?;
    let kubeconfig = kubeconfig.to_string_lossy().into_owned();
    setup.start_agent_from(&["--source", "kube", "--kubeconfig", &kubeconfig], &[], &[])?;
    Ok((setup, server))
}
