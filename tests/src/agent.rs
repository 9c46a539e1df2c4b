//! The real `lb` agent in the lab: node1 runs `lb run --source file` on manifests the test writes,
//! with XDP and tc on its fabric NIC and socket hooks on a test cgroup; every pod runs a lab-peer
//! server on port 8080. Everything is removed on drop, also when a test fails.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    lab::{Cgroup, Host, Lab, PinDir, Proc, ScratchDir, wait_for_log},
    peer,
    topology::{Cluster, ClusterSpec, FABRIC_IFACE},
};

/// How long a manifest change may take to reach the agent's next sync.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// The port every pod's server listens on.
pub const POD_PORT: u16 = 8080;

pub struct AgentLab {
    // Field order is drop order: servers and agents first, then the datapaths' pins, cgroups,
    // scratch files, the namespaces last.
    /// The pods' servers in [`Cluster::pods`] order; None while a test has one stopped.
    servers: Vec<Option<Proc>>,
    agent: Option<Proc>,
    /// node2's agent ([`Self::start_node2_agent`]), while it runs.
    node2_agent: Option<Proc>,
    pins: PinDir,
    /// node2's pins and cgroup, once its agent started: kept across its restarts.
    node2: Option<(PinDir, Cgroup)>,
    pub cgroup: Cgroup,
    scratch: ScratchDir,
    pub cluster: Cluster,
    _lab: Lab,
}

impl AgentLab {
    /// The default cluster (two pods on node1, one on node2), servers in every pod, no agent yet.
    /// With [`ClusterSpec::dual_stack`] the servers take both families.
    pub fn new() -> anyhow::Result<Self> {
        Self::with_spec(&ClusterSpec::default())
    }

    pub fn with_spec(spec: &ClusterSpec) -> anyhow::Result<Self> {
        let mut lab = Lab::new()?;
        let cluster = Cluster::build(&mut lab, spec)?;
        let servers: Vec<Proc> = if spec.dual_stack {
            cluster
                .pods()
                .map(|pod| peer::serve_dual_stack(&pod.host, pod.host.name(), POD_PORT))
                .collect::<anyhow::Result<_>>()?
        } else {
            serve_in_every_pod(&cluster)?
        };
        let servers = servers.into_iter().map(Some).collect();
        let pins = PinDir::new(&lab, "agent")?;
        let cgroup = Cgroup::new(&lab, "node1")?;
        let scratch = ScratchDir::new(&lab, "agent")?;
        std::fs::create_dir_all(scratch.path().join("manifests"))?;
        Ok(Self {
            servers,
            agent: None,
            node2_agent: None,
            pins,
            node2: None,
            cgroup,
            scratch,
            cluster,
            _lab: lab,
        })
    }

    /// Stops the server of the `index`th pod of [`Cluster::pods`] (its pod going away); new
    /// connections to it are refused until [`Self::start_server`].
    pub fn stop_server(&mut self, index: usize) -> anyhow::Result<()> {
        let server = self
            .servers
            .get_mut(index)
            .and_then(Option::take)
            .context("no such server running")?;
        server.kill()
    }

    /// Starts the server of the `index`th pod again (IPv4 only).
    pub fn start_server(&mut self, index: usize) -> anyhow::Result<()> {
        let pod = self.cluster.pods().nth(index).context("no such pod")?;
        let server = peer::serve(&pod.host, pod.host.name(), POD_PORT)?;
        *self.servers.get_mut(index).context("no such pod")? = Some(server);
        Ok(())
    }

    /// The directory the agent reads manifests from.
    pub fn manifests(&self) -> PathBuf {
        self.scratch.path().join("manifests")
    }

    /// A sample of node1's agent's /metrics (`name` with its labels, as the page writes them),
    /// read inside node1's namespace at the default `--metrics-bind-address`.
    pub fn metric(&self, sample: &str) -> anyhow::Result<Option<f64>> {
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], 10249));
        let page = crate::http::get(&self.cluster.node(1).host, address, "/metrics")?.body;
        Ok(page
            .lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok()))
    }

    /// The agent's log (stdout and stderr).
    pub fn log(&self) -> PathBuf {
        self.scratch.path().join("agent.log")
    }

    /// A path for a file of the test's own (e.g. a client's ready file), removed with the lab.
    pub fn scratch_file(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }

    pub fn pin_dir(&self) -> &Path {
        self.pins.path()
    }

    /// Starts `lb run` on node1 (again, after a kill) with `extra` flags, and waits for its
    /// first sync.
    pub fn start_agent(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        self.start_agent_through(&[], extra)
    }

    /// As [`Self::start_agent`], through a wrapper command that execs `lb` (its program and
    /// arguments, `lb run ...` appended), e.g. `setpriv` to limit its capabilities.
    pub fn start_agent_through(&mut self, wrapper: &[&str], extra: &[&str]) -> anyhow::Result<()> {
        let lb = peer::sibling_binary("lb")?;
        self.start_file_agent(&lb, wrapper, extra)
    }

    /// As [`Self::start_agent`], with another `lb` binary than the workspace's (an earlier
    /// release's, [`crate::previous::agent`]): its flags must be the ones used here.
    pub fn start_agent_binary(&mut self, lb: &Path, extra: &[&str]) -> anyhow::Result<()> {
        self.start_file_agent(lb, &[], extra)
    }

    fn start_file_agent(
        &mut self,
        lb: &Path,
        wrapper: &[&str],
        extra: &[&str],
    ) -> anyhow::Result<()> {
        let manifests = self.manifests();
        let source = [
            "--source",
            "file",
            "--manifests",
            manifests.to_str().unwrap_or_default(),
        ];
        self.spawn_agent(lb, &source, wrapper, extra)
    }

    /// As [`Self::start_agent_through`], with the source's flags given (e.g. `--source kube
    /// --kubeconfig PATH`, for an API server listening in node1's namespace).
    pub fn start_agent_from(
        &mut self,
        source: &[&str],
        wrapper: &[&str],
        extra: &[&str],
    ) -> anyhow::Result<()> {
        let lb = peer::sibling_binary("lb")?;
        self.spawn_agent(&lb, source, wrapper, extra)
    }

    fn spawn_agent(
        &mut self,
        lb: &Path,
        source: &[&str],
        wrapper: &[&str],
        extra: &[&str],
    ) -> anyhow::Result<()> {
        let before = self.synced_lines();
        let mut args = vec!["run"];
        args.extend_from_slice(source);
        args.extend([
            "--hostname-override",
            "node1",
            "--node-address",
            "203.0.113.1",
            "--interfaces",
            FABRIC_IFACE,
            "--cgroup-path",
            self.cgroup.path().to_str().unwrap_or_default(),
            "--pin-dir",
            self.pins.path().to_str().unwrap_or_default(),
        ]);
        // Native XDP, as on a physical NIC: the fabric's ends of the links run NAPI (see
        // `Cluster::build`), unless the test chooses a mode (or a cluster without it).
        if !extra.contains(&"--xdp-mode") {
            args.extend(["--xdp-mode", "native"]);
        }
        args.extend_from_slice(extra);
        let log = self.log();
        let lb = lb.to_str().unwrap_or_default();
        let (program, wrapped): (&str, Vec<&str>) = match wrapper {
            [] => (lb, args),
            [program, wrapper_args @ ..] => (
                program,
                wrapper_args
                    .iter()
                    .copied()
                    .chain([lb])
                    .chain(args)
                    .collect(),
            ),
        };
        self.agent = Some(
            self.cluster
                .node(1)
                .host
                .spawn_logged(program, &wrapped, None, &log)?,
        );
        wait_for_log(&log, "synced", before + 1, SYNC_TIMEOUT)?;
        Ok(())
    }

    /// Starts `lb run` on node2 as well (again, after [`Self::kill_node2_agent`]), reading the
    /// same manifests, with pins and a cgroup of its own, and waits for its first sync. The
    /// manifests then need Node objects for the nodes' addresses to reach the other agent.
    pub fn start_node2_agent(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        if self.node2.is_none() {
            self.node2 = Some((
                PinDir::new(&self._lab, "agent2")?,
                Cgroup::new(&self._lab, "node2")?,
            ));
        }
        let (pins, cgroup) = self.node2.as_ref().context("node2's pins")?;
        let log = self.node2_log();
        let before = synced_lines(&log);
        let manifests = self.manifests();
        let mut args = vec![
            "run",
            "--source",
            "file",
            "--manifests",
            manifests.to_str().unwrap_or_default(),
            "--hostname-override",
            "node2",
            "--node-address",
            "203.0.113.2",
            "--interfaces",
            FABRIC_IFACE,
            "--cgroup-path",
            cgroup.path().to_str().unwrap_or_default(),
            "--pin-dir",
            pins.path().to_str().unwrap_or_default(),
        ];
        if !extra.contains(&"--xdp-mode") {
            args.extend(["--xdp-mode", "native"]);
        }
        args.extend_from_slice(extra);
        let lb = peer::sibling_binary("lb")?;
        self.node2_agent = Some(
            self.cluster
                .node(2)
                .host
                .spawn_logged(&lb, &args, None, &log)?,
        );
        wait_for_log(&log, "synced", before + 1, SYNC_TIMEOUT)?;
        Ok(())
    }

    /// Kills node2's agent with SIGKILL (its datapath stays, pinned).
    pub fn kill_node2_agent(&mut self) -> anyhow::Result<()> {
        match self.node2_agent.take() {
            Some(agent) => agent.kill(),
            None => Ok(()),
        }
    }

    /// node2's agent's log.
    pub fn node2_log(&self) -> PathBuf {
        self.scratch.path().join("agent2.log")
    }

    /// node2's agent's drop and reject counters, as [`Self::events`].
    pub fn node2_events(&self) -> anyhow::Result<std::collections::BTreeMap<&'static str, u64>> {
        let (pins, _) = self.node2.as_ref().context("no agent on node2")?;
        lb_userspace::observe::inspect::PinnedMaps::open(pins.path())?.events()
    }

    /// The agent's process id, while it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Proc::pid)
    }

    /// Stops the agent with SIGTERM and returns how long it took to exit; an agent still there
    /// after `grace` is killed, and that is an error.
    pub fn stop_agent(&mut self, grace: Duration) -> anyhow::Result<Duration> {
        let agent = self.agent.take().context("no agent running")?;
        let started = std::time::Instant::now();
        agent.stop(grace)?;
        let took = started.elapsed();
        anyhow::ensure!(
            took < grace,
            "the agent did not exit within {grace:?} of SIGTERM"
        );
        Ok(took)
    }

    /// Kills the agent with SIGKILL (the datapath stays, pinned).
    pub fn kill_agent(&mut self) -> anyhow::Result<()> {
        match self.agent.take() {
            Some(agent) => agent.kill(),
            None => Ok(()),
        }
    }

    /// Writes a manifest file and waits for the agent's next sync.
    ///
    /// The file is written whole beside the manifests and renamed into place, as `kubectl
    /// apply` changes an object at once: the file source polls, and a poll between a plain
    /// write's truncation and its data would read an empty file, which removes its objects
    /// until the next poll (the rolling-update row saw 96 of 3,810 requests refused that way).
    pub fn apply(&self, file: &str, yaml: &str) -> anyhow::Result<()> {
        let before = self.synced_lines();
        let staged = self.scratch.path().join(format!("{file}.staged"));
        std::fs::write(&staged, yaml)?;
        std::fs::rename(&staged, self.manifests().join(file))?;
        wait_for_log(&self.log(), "synced", before + 1, SYNC_TIMEOUT).map(drop)
    }

    /// Removes a manifest file and waits for the agent's next sync.
    pub fn delete(&self, file: &str) -> anyhow::Result<()> {
        let before = self.synced_lines();
        std::fs::remove_file(self.manifests().join(file))?;
        wait_for_log(&self.log(), "synced", before + 1, SYNC_TIMEOUT).map(drop)
    }

    /// Another client on the fabric (a namespace with its own address, no default route).
    pub fn add_client(&mut self, name: &str, addr: std::net::Ipv4Addr) -> anyhow::Result<Host> {
        let host = self._lab.host(name)?;
        let port = format!("p-{name}");
        self._lab
            .veth(&host, FABRIC_IFACE, &self.cluster.fabric, &port)?;
        self.cluster.fabric.enslave(&port, "br0")?;
        host.addr(FABRIC_IFACE, &format!("{addr}/24"))?;
        Ok(host)
    }

    /// The lab, to add hosts and links of a test's own.
    pub fn lab(&mut self) -> &mut Lab {
        &mut self._lab
    }

    /// The agent's drop and reject counters (`lb_event_v8`), read from its pinned map without
    /// touching anything else of the running datapath.
    pub fn events(&self) -> anyhow::Result<std::collections::BTreeMap<&'static str, u64>> {
        lb_userspace::observe::inspect::PinnedMaps::open(self.pins.path())?.events()
    }

    /// Every entry of the agent's conntrack map, read from its pin.
    pub fn conntrack(&self) -> anyhow::Result<Vec<(lb_common::Ct4Key, lb_common::Ct4Value)>> {
        let map =
            aya::maps::MapData::from_pin(self.pins.path().join(lb_common::map_names::CONNTRACK4))?;
        let map = aya::maps::HashMap::<_, lb_common::Ct4Key, lb_common::Ct4Value>::try_from(
            aya::maps::Map::LruHashMap(map),
        )?;
        Ok(map.iter().collect::<Result<_, _>>()?)
    }

    /// The pod on node1 that acts as a client (n1p1).
    pub fn client_pod(&self) -> &Host {
        &self.cluster.node(1).pods[1].host
    }

    fn synced_lines(&self) -> usize {
        synced_lines(&self.log())
    }
}

/// The "synced" lines of an agent's log.
pub fn synced_lines(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains("synced"))
        .count()
}

/// A Node manifest for node `number` of the lab with its fabric address (and its IPv6 one with
/// `ipv6`), as InternalIPs: what the agents' file source learns the nodes' addresses from.
pub fn node_manifest(number: u8, ipv6: bool) -> String {
    let mut addresses = vec![crate::topology::node_addr(number).to_string()];
    if ipv6 {
        addresses.push(crate::topology::node_addr6(number).to_string());
    }
    let addresses: Vec<String> = addresses
        .iter()
        .map(|address| format!("{{type: InternalIP, address: \"{address}\"}}"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: node{number}}}\nstatus:\n  addresses: [{}]\n",
        addresses.join(", ")
    )
}

/// The boot ID the lab's Node manifests give their nodes ([`dsr_marked_node_manifest`]).
pub const LAB_BOOT_ID: &str = "lab-boot";

/// As [`node_manifest`], with the DSR mark an agent with lb's XDP on the node's NICs writes
/// through the API (`lb.io/dsr-boot-id`, naming the boot the Node reports): the file source
/// cannot be written to, so a lab whose node runs an agent says so in its manifest.
pub fn dsr_marked_node_manifest(number: u8, ipv6: bool) -> String {
    node_manifest(number, ipv6).replace(
        &format!("metadata: {{name: node{number}}}\nstatus:\n"),
        &format!(
            "metadata:\n  name: node{number}\n  annotations: {{lb.io/dsr-boot-id: {LAB_BOOT_ID}}}\nstatus:\n  nodeInfo: {{bootID: {LAB_BOOT_ID}, machineID: m, systemUUID: s, kernelVersion: k, osImage: o, containerRuntimeVersion: c, kubeletVersion: v, kubeProxyVersion: v, operatingSystem: linux, architecture: amd64}}\n"
        ),
    )
}

/// A lab-peer server named after its pod on [`POD_PORT`] in every pod of the cluster.
pub fn serve_in_every_pod(cluster: &Cluster) -> anyhow::Result<Vec<Proc>> {
    cluster
        .pods()
        .map(|pod| peer::serve(&pod.host, pod.host.name(), POD_PORT))
        .collect()
}

/// A NodePort Service manifest: `name` on ClusterIP `cluster_ip`:80 and nodePort `node_port`,
/// with `extra_spec` lines (indented two spaces) added to its spec.
pub fn node_port_service(name: &str, cluster_ip: &str, node_port: u16, extra_spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: NodePort\n  clusterIP: {cluster_ip}\n{extra_spec}  ports:\n  - {{name: http, port: 80, targetPort: {POD_PORT}, nodePort: {node_port}}}\n"
    )
}

/// [`node_port_service`] with no extra spec, and its EndpointSlice of ready `endpoints`
/// (address, node name), as one manifest file.
pub fn node_port_service_with_endpoints(
    name: &str,
    cluster_ip: &str,
    node_port: u16,
    endpoints: &[(std::net::Ipv4Addr, &str)],
) -> String {
    node_port_service(name, cluster_ip, node_port, "") + "---\n" + &endpoint_slice(name, endpoints)
}

/// An EndpointSlice for Service `service` with ready endpoints (address, node name).
pub fn endpoint_slice(service: &str, endpoints: &[(std::net::Ipv4Addr, &str)]) -> String {
    let unhinted: Vec<_> = endpoints
        .iter()
        .map(|&(addr, node)| (addr, node, ""))
        .collect();
    hinted_endpoint_slice(service, &unhinted)
}

/// As [`endpoint_slice`], each endpoint with its `hints:` (a YAML flow mapping, e.g.
/// `{forZones: [{name: zone-a}]}`; empty for none).
pub fn hinted_endpoint_slice(
    service: &str,
    endpoints: &[(std::net::Ipv4Addr, &str, &str)],
) -> String {
    let mut yaml = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports:\n- {{name: http, port: {POD_PORT}, protocol: TCP}}\nendpoints:\n"
    );
    for (addr, node, hints) in endpoints {
        yaml.push_str(&format!(
            "- addresses: [\"{addr}\"]\n  nodeName: {node}\n  conditions: {{ready: true}}\n"
        ));
        if !hints.is_empty() {
            yaml.push_str(&format!("  hints: {hints}\n"));
        }
    }
    yaml
}

/// Runs an `lb` inspection command (`services`, `explain ...`) with `-o json` on the pinned
/// maps under `pin_dir`, and parses what it prints.
pub fn lb_json(pin_dir: &Path, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let output = std::process::Command::new(peer::sibling_binary("lb")?)
        .args(args)
        .arg("--pin-dir")
        .arg(pin_dir)
        .args(["-o", "json"])
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "lb {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

impl AgentLab {
    /// `lb ARGS -o json` inside node1's network namespace, on the agent's pin directory (given
    /// by `LB_PIN_DIR`), as an operator runs it in the agent's pod: `lb explain` places a
    /// client by that namespace's routes.
    pub fn lb_json_in_node(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let lb = peer::sibling_binary("lb")?;
        let pin_dir = format!("LB_PIN_DIR={}", self.pin_dir().display());
        let mut command = vec![pin_dir.as_str(), lb.to_str().context("UTF-8 path")?];
        command.extend_from_slice(args);
        command.extend_from_slice(&["-o", "json"]);
        let output = self.cluster.node(1).host.run("env", &command)?;
        Ok(serde_json::from_str(&output)?)
    }
}

/// The agent on node1 of the dual-stack lab, which also serves NodePorts on node1's IPv6
/// address.
pub fn dual_stack_agent() -> AgentLab {
    let mut setup = AgentLab::with_spec(&ClusterSpec {
        dual_stack: true,
        ..ClusterSpec::default()
    })
    .expect("lab");
    let node1_v6 = crate::topology::node_addr6(1).to_string();
    setup
        .start_agent(&["--node-address", &node1_v6])
        .expect("agent");
    setup
}

/// An IPv6 EndpointSlice for Service `service` with ready endpoints (address, node name).
pub fn endpoint_slice6(
    service: &str,
    endpoints: &[(std::net::Ipv6Addr, &str)],
    protocol: &str,
) -> String {
    let mut yaml = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-v6\n  namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv6\nports:\n- {{name: http, port: {POD_PORT}, protocol: {protocol}}}\nendpoints:\n"
    );
    for (addr, node) in endpoints {
        yaml.push_str(&format!(
            "- addresses: [\"{addr}\"]\n  nodeName: {node}\n  conditions: {{ready: true}}\n"
        ));
    }
    yaml
}

/// A Service manifest of [`service_of_families`] with its port's nodePort set.
pub fn with_node_port(service: &str, node_port: u16) -> String {
    service.replace(
        &format!("targetPort: {POD_PORT}}}"),
        &format!("targetPort: {POD_PORT}, nodePort: {node_port}}}"),
    )
}

/// A Service `name` of `protocol` on port `port` with the given ClusterIPs (one per family it
/// has) and extra spec lines, its port named http, nodePort `node_port` when the type has one.
pub fn service_of_families(
    name: &str,
    cluster_ips: &[&str],
    protocol: &str,
    port: u16,
    extra: &str,
) -> String {
    let families: Vec<&str> = cluster_ips
        .iter()
        .map(|ip| if ip.contains(':') { "IPv6" } else { "IPv4" })
        .collect();
    let policy = if cluster_ips.len() > 1 {
        "RequireDualStack"
    } else {
        "SingleStack"
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: \"{}\"\n  clusterIPs: [{}]\n  ipFamilyPolicy: {policy}\n  ipFamilies: [{}]\n{extra}  ports:\n  - {{name: http, port: {port}, protocol: {protocol}, targetPort: {POD_PORT}}}\n",
        cluster_ips[0],
        cluster_ips
            .iter()
            .map(|ip| format!("\"{ip}\""))
            .collect::<Vec<_>>()
            .join(", "),
        families.join(", "),
    )
}
