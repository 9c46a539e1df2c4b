//! `lb`: the load balancer's agent and CLI.

use std::{net::IpAddr, ops::RangeInclusive, path::PathBuf, time::Duration};

use anyhow::Context as _;
use aya::programs::XdpMode;
use clap::{Args, Parser, Subcommand, ValueEnum};
use lb_userspace::{
    agent::{self, AgentConfig, SourceConfig, XdpAttach},
    compile::model::{IpCidr, NodePortAddress, NodePortAddresses},
    datapath::ebpf_log::EbpfLogLevel,
    datapath::{DEFAULT_PIN_DIR, counter::XdpCounter},
    duration::parse_duration,
    observe::{cli, explain::Hook, inspect::ConntrackFilter},
};

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "eBPF/XDP service load balancer that replaces kube-proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: load the datapath, attach it, and keep it in step with the Services and
    /// EndpointSlices of the source (the DaemonSet's entry point).
    Run(Box<RunArgs>),
    /// Say which service and endpoint a packet would reach, and why: runs the loaded datapath's
    /// real XDP program on a synthesized packet against the live pinned maps, in a dry-run copy
    /// that changes no map entry.
    Explain {
        /// The client, `ip` or `ip:port` (port 40000 when left out); IPv6 as `[ip]:port`, `[ip]` or
        /// `ip`.
        source: String,
        /// The destination, `ip:port/tcp`, `ip:port/udp` or `ip:port/sctp` (tcp when left out);
        /// IPv6 as `[ip]:port/tcp`.
        destination: String,
        /// Where the client is: `pod` (a pod or host process of this node: the socket hooks
        /// translate its connect() or sendto()), `nic` (a packet arriving on a node NIC: XDP),
        /// or `auto`: `pod` when the socket hooks are attached and this network namespace's
        /// routes put the client on this node (either family).
        #[arg(long, value_enum, default_value_t = ClientAt::Auto)]
        from: ClientAt,
        /// bpffs directory of the running agent's pinned state (its --pin-dir).
        #[arg(long, env = "LB_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// List the services the running agent programmed: frontends, backends, counters.
    Services(InspectArgs),
    /// List the backends (endpoints) in the datapath and the services using each.
    Backends(InspectArgs),
    /// List connection-tracking entries of the XDP/tc path, optionally filtered.
    Conntrack {
        #[command(flatten)]
        inspect: InspectArgs,
        /// Only entries with this address (source, destination or translated), IPv4 or IPv6.
        #[arg(long)]
        address: Option<IpAddr>,
        /// Only entries with this port anywhere.
        #[arg(long)]
        port: Option<u16>,
        /// Only entries of this protocol.
        #[arg(long, value_parser = ["tcp", "udp", "sctp"])]
        protocol: Option<String>,
        /// Only entries of this service id (see `lb services`).
        #[arg(long)]
        service: Option<u32>,
        /// Entries idle past their timeout too, marked expired (the datapath no longer uses
        /// them; the LRU map keeps them until it needs the room). Without it, live ones only.
        #[arg(long)]
        all: bool,
    },
    /// Datapath events (drops by reason), each flow cache's hits, misses and gate closings per
    /// protocol, and how full each map is.
    Stats(InspectArgs),
    /// Print the datapath's events as they happen: drops and rejects with their reason, new
    /// flows with the backend chosen, flow ends, SNAT exhaustion. The programs report nothing
    /// while no monitor runs; one monitor runs at a time (they share one ring buffer). Ends on
    /// Ctrl-C, SIGTERM, SIGHUP, a closed stdout or --count.
    Monitor {
        /// Kinds of event, comma-separated: drop, reject, new, end, snat.
        #[arg(
            long = "type",
            value_delimiter = ',',
            default_value = "drop,reject,new,end,snat"
        )]
        types: Vec<String>,
        /// Only events of this Service: `namespace/name`, or a service as `lb services` names
        /// it (`namespace/name:port-name/PROTO`, with its scope).
        #[arg(long)]
        service: Option<String>,
        /// Only events whose client address lies in this prefix (`ip/len`): the source of what
        /// XDP sees, the destination of what tc sees, either end of a flow's end; never the
        /// socket hooks' events (the socket's address is not known yet).
        #[arg(long)]
        client: Option<IpCidr>,
        /// Report one event in N, chosen at random by the programs (for busy nodes).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        sample: u32,
        /// Print at most N events a second; how many more there were is printed to stderr.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        rate: Option<u32>,
        /// Exit after printing N events.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
        /// bpffs directory of the running agent's pinned state (its --pin-dir).
        #[arg(long, env = "LB_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Output format: a line per event, or a JSON object per line.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Prepare the node for an agent without the privileges to do it itself, and exit: for the
    /// DaemonSet's privileged init container. Mounts bpffs at /sys/fs/bpf (mode 0700) unless
    /// one is there, creates the pin directory (0700), sets
    /// net.ipv4.conf.<iface>.accept_local=1 on each of --interfaces, and takes the NodePort and SNAT
    /// ranges out of the node's ephemeral ports where they overlap.
    InitNode {
        /// Comma-separated NICs the agent attaches XDP to (its --interfaces).
        #[arg(long, env = "LB_INTERFACES", value_delimiter = ',')]
        interfaces: Vec<String>,
        /// The agent's pin directory, on the bpffs at /sys/fs/bpf.
        #[arg(long, env = "LB_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// The agent's --node-port-range.
        #[arg(long, env = "LB_NODE_PORT_RANGE", default_value = "30000-32767", value_parser = parse_port_range)]
        node_port_range: RangeInclusive<u16>,
        /// The agent's --snat-port-range.
        #[arg(long, env = "LB_SNAT_PORT_RANGE", default_value = "61000-65535", value_parser = parse_port_range)]
        snat_port_range: RangeInclusive<u16>,
        /// The agent's --reserve-ports: whether to reserve the two ranges' ephemeral ports.
        #[arg(long, env = "LB_RESERVE_PORTS", default_value_t = true, action = clap::ArgAction::Set)]
        reserve_ports: bool,
    },
    /// Attach the XDP packet counter to a NIC and print what it counts, once per interval.
    Count {
        /// Interface name in this process's network namespace.
        #[arg(long)]
        iface: String,
        /// XDP attach mode.
        #[arg(long, value_enum, default_value_t = Mode::Native)]
        mode: Mode,
        /// Seconds between reports.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        interval: u64,
        /// Number of reports before detaching and exiting (0: until killed).
        #[arg(long, default_value_t = 0)]
        reports: u64,
    },
}

/// Where to read and how to print, for the commands that read a running agent's pinned maps.
#[derive(Args)]
struct InspectArgs {
    /// bpffs directory of the running agent's pinned state (its --pin-dir).
    #[arg(long, env = "LB_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// Flags named like kube-proxy's where kube-proxy has one.
#[derive(Args)]
struct RunArgs {
    /// A kube-proxy configuration file (KubeProxyConfiguration, kubeproxy.config.k8s.io/
    /// v1alpha1): the fields lb has a setting for set it, unless a flag or `LB_` variable does;
    /// the fields it ignores are logged.
    #[arg(long, env = "LB_CONFIG")]
    config: Option<PathBuf>,
    /// This node's name, as in the Node object and the endpoints' nodeName [default: $NODE_NAME,
    /// else the hostname].
    #[arg(long, env = "LB_HOSTNAME_OVERRIDE")]
    hostname_override: Option<String>,
    /// Comma-separated CIDRs: only node addresses inside them serve NodePorts (a family no CIDR
    /// names keeps all its addresses); or `primary`: only the node's primary address of each
    /// family (its first InternalIP, else ExternalIP) [default: all addresses; `primary` when
    /// --config's kube-proxy configuration has `mode: nftables`, as that mode's default].
    #[arg(long, env = "LB_NODEPORT_ADDRESSES", value_delimiter = ',')]
    nodeport_addresses: Vec<NodePortAddress>,
    /// Comma-separated CIDRs: only externalIPs inside them are served; the others are skipped
    /// with a Warning Event (empty: all, as kube-proxy does). Pair it with the API server's
    /// DenyServiceExternalIPs admission plugin or a policy that allows only these.
    #[arg(long, env = "LB_EXTERNAL_IP_CIDRS", value_delimiter = ',')]
    external_ip_cidrs: Vec<IpCidr>,
    /// Node addresses serving NodePorts when the source has no Node object for this node
    /// (e.g. manifests without one).
    #[arg(long = "node-address", env = "LB_NODE_ADDRESS", value_delimiter = ',')]
    node_addresses: Vec<IpAddr>,
    /// The cluster's NodePort range; a nodePort outside it is skipped (that NodePort only).
    #[arg(long, env = "LB_NODE_PORT_RANGE", default_value = "30000-32767", value_parser = parse_port_range)]
    node_port_range: RangeInclusive<u16>,
    /// Address of /metrics (Prometheus, OpenMetrics text) and /debug/log-level; `off`: none.
    /// Loopback by default, as kube-proxy's: set a node address for Prometheus to scrape (the
    /// same port is then served on loopback too, where /debug/log-level takes a PUT).
    #[arg(
        long,
        env = "LB_METRICS_BIND_ADDRESS",
        default_value = "127.0.0.1:10249"
    )]
    metrics_bind_address: String,
    /// Address of /healthz and /livez; `off`: none.
    #[arg(long, env = "LB_HEALTHZ_BIND_ADDRESS", default_value = "0.0.0.0:10256")]
    healthz_bind_address: String,
    /// Seconds a change from the source may wait for its sync before /healthz says 503.
    #[arg(long, env = "LB_HEALTHZ_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    healthz_timeout: u64,
    /// Remove everything the agent installed (pinned links, programs, maps) and exit. With
    /// source kube, first remove this node's DSR mark from its Node (the API server and node
    /// name as the agent finds them, without --config; a failure is logged with the command
    /// that removes it by hand).
    #[arg(long)]
    cleanup: bool,
    /// Path to a kubeconfig file (source kube).
    #[arg(long, env = "LB_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The API server's address, overriding the kubeconfig's (source kube). The agent serves
    /// the `kubernetes` Service itself, so it must reach the API server directly.
    #[arg(long, env = "LB_MASTER")]
    master: Option<String>,
    /// Comma-separated NICs that carry external traffic: XDP (ingress) and tc (egress) attach there.
    /// Endpoints without a nodeName that the node's routes reach through another interface (a
    /// pod interface) directly are local.
    #[arg(long, env = "LB_INTERFACES", value_delimiter = ',')]
    interfaces: Vec<String>,
    /// XDP attach mode on the NICs: auto is native, except generic on a veth (whose peer may
    /// not deliver what native XDP transmits).
    #[arg(long, env = "LB_XDP_MODE", value_enum, default_value_t = Mode::Auto)]
    xdp_mode: Mode,
    /// cgroup v2 directory for the socket hooks (ClusterIP from pods and host processes);
    /// normally the cgroup v2 root.
    #[arg(long, env = "LB_CGROUP_PATH")]
    cgroup_path: Option<PathBuf>,
    /// bpffs directory holding the pinned maps, programs and links.
    #[arg(long, env = "LB_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Where Services and EndpointSlices come from.
    #[arg(long, env = "LB_SOURCE", value_enum, default_value_t = Source::Kube)]
    source: Source,
    /// Manifests for `--source file`: YAML files or directories (repeatable).
    #[arg(long = "manifests", env = "LB_MANIFESTS", value_delimiter = ',')]
    manifests: Vec<PathBuf>,
    /// Manifest files larger than this many bytes are refused unread (`--source file`); the
    /// objects they held before stay in force.
    #[arg(long, env = "LB_MANIFEST_MAX_BYTES", default_value_t = lb_userspace::source::file::DEFAULT_MAX_MANIFEST_BYTES, value_parser = clap::value_parser!(u64).range(1..))]
    manifest_max_bytes: u64,
    /// How XDP picks backends for new flows of Services without the `lb.io/load-balancing`
    /// annotation: `random` (kube-proxy's way) or `maglev` (consistent hashing: the same backend
    /// through every node, few flows moved when endpoints change).
    #[arg(long, env = "LB_LOAD_BALANCING", value_enum, default_value_t = LoadBalancing::Random)]
    load_balancing: LoadBalancing,
    /// How a new TCP flow from outside to a NodePort, externalIP or LoadBalancer IP reaches an
    /// endpoint on another node: `snat` (kube-proxy's way: the answers come back through this
    /// node) or `dsr` (direct server return, IPv4: the endpoint's node answers the client
    /// itself, and the pod sees the client's address), to endpoints on Nodes whose agent has
    /// marked them as taking DSR options in their current boot (annotation lb.io/dsr-boot-id,
    /// which every agent of this release with XDP attached writes, in either mode); flows to
    /// the others, UDP, SCTP and IPv6 stay SNATed.
    #[arg(long, env = "LB_NODEPORT_MODE", value_enum, default_value_t = NodePortMode::Snat)]
    nodeport_mode: NodePortMode,
    /// Log as JSON lines.
    #[arg(long, env = "LB_LOG_JSON")]
    log_json: bool,
    /// Mount bpffs at /sys/fs/bpf when none is there. `false` in a container: the agent then
    /// refuses to start without the host's bpffs instead of pinning to one that dies with it.
    #[arg(long, env = "LB_MOUNT_BPFFS", default_value_t = true, action = clap::ArgAction::Set)]
    mount_bpffs: bool,
    /// How long a TCP flow may wait for its handshake to complete (e.g. `60s`, `1m30s`).
    #[arg(long, env = "LB_CONNTRACK_TCP_TIMEOUT_SYN", default_value = "60s", value_parser = parse_duration)]
    conntrack_tcp_timeout_syn: Duration,
    /// How long an established TCP flow may stay idle.
    #[arg(long, env = "LB_CONNTRACK_TCP_TIMEOUT_ESTABLISHED", default_value = "6h", value_parser = parse_duration)]
    conntrack_tcp_timeout_established: Duration,
    /// How long a TCP flow is kept after both sides' FINs or a RST, for the last segments of
    /// its close.
    #[arg(long, env = "LB_CONNTRACK_TCP_TIMEOUT_CLOSING", default_value = "10s", value_parser = parse_duration)]
    conntrack_tcp_timeout_closing: Duration,
    /// How long a TCP flow may stay idle after one side's FIN, while the other may still send
    /// (kube-proxy's --conntrack-tcp-timeout-close-wait).
    #[arg(long, env = "LB_CONNTRACK_TCP_TIMEOUT_HALF_CLOSED", default_value = "1h", value_parser = parse_duration)]
    conntrack_tcp_timeout_half_closed: Duration,
    /// How long a UDP flow may stay idle.
    #[arg(long, env = "LB_CONNTRACK_UDP_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    conntrack_udp_timeout: Duration,
    /// Source ports for flows SNATed to endpoints on other nodes (and for remapped clashing
    /// ports); keep it out of the NodePort range and the node's ephemeral ports.
    #[arg(long, env = "LB_SNAT_PORT_RANGE", default_value = "61000-65535", value_parser = parse_port_range)]
    snat_port_range: RangeInclusive<u16>,
    /// Take the NodePort and SNAT ranges out of the node's ephemeral ports where
    /// net.ipv4.ip_local_port_range covers them (added to net.ipv4.ip_local_reserved_ports, which
    /// keeps what it holds), so that no connection of the node's own gets a source port whose
    /// answers go to a Service or a SNAT flow; checked on every sync.
    #[arg(long, env = "LB_RESERVE_PORTS", default_value_t = true, action = clap::ArgAction::Set)]
    reserve_ports: bool,
    /// How long after a clean close or a reset a SNAT port may serve another flow to the same
    /// backend; from half of it on, when a new flow finds no free port.
    #[arg(long, env = "LB_SNAT_PORT_REUSE_DELAY", default_value = "500ms", value_parser = parse_duration)]
    snat_port_reuse_delay: Duration,
    /// Entries of the IPv4 frontends map (one per Service port and address it is reached on:
    /// ClusterIP, each NodePort address, external and load-balancer IPs) when the agent creates
    /// it; a map already pinned keeps its size. Service ports that do not fit are not
    /// programmed, each with a Warning Event (`NotProgrammed`) and `lb_sync_errors_total`.
    #[arg(long, env = "LB_FRONTEND_MAP_SIZE", default_value_t = lb_common::limits::MAX_FRONTENDS, value_parser = clap::value_parser!(u32).range(1..))]
    frontend_map_size: u32,
    /// Entries of the IPv4 conntrack map when the agent creates it (a map already pinned keeps
    /// its size). An LRU map: when it is full, a new flow evicts the least recently used entry.
    #[arg(long, env = "LB_CONNTRACK_MAP_SIZE", default_value_t = lb_common::limits::MAX_CONNTRACK, value_parser = clap::value_parser!(u32).range(1..))]
    conntrack_map_size: u32,
    /// How long an EndpointSlice's Service may be missing before the slice is reported
    /// (ServiceNotFound): Services and slices arrive on separate watches. The slices of a
    /// Service seen deleted are never reported (the garbage collector removes them).
    #[arg(long, env = "LB_MISSING_SERVICE_GRACE", default_value = "5s", value_parser = parse_duration)]
    missing_service_grace: Duration,
    /// Log filter (tracing directives, e.g. `info` or `info,lb_userspace::reconcile=debug`);
    /// `RUST_LOG` wins when set. Changeable at run time over loopback: `PUT /debug/log-level`
    /// on the metrics port (served on loopback too when the metrics address is another one).
    #[arg(long, env = "LB_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// The eBPF programs' own debug logging, forwarded to this log (target `lb::ebpf`, so the
    /// log filter must let it through too, e.g. `info,lb::ebpf=debug`). At `off` the logging
    /// code is removed when the programs load and costs nothing; `debug` logs every drop, for
    /// debugging only.
    #[arg(long, env = "LB_EBPF_LOG_LEVEL", value_enum, default_value_t = EbpfLogLevel::Off)]
    ebpf_log_level: EbpfLogLevel,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ClientAt {
    Auto,
    Pod,
    Nic,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum NodePortMode {
    Snat,
    Dsr,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LoadBalancing {
    Random,
    Maglev,
}

#[derive(Clone, Copy, ValueEnum)]
enum Source {
    /// The Kubernetes API server (in-cluster config, --kubeconfig or --master).
    Kube,
    /// YAML manifests (--manifests), reloaded on change and on SIGHUP.
    File,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// Native, except generic on a veth.
    Auto,
    /// In the driver (fails if the driver has no XDP support).
    Native,
    /// Generic XDP in the stack (works everywhere, slower).
    Generic,
}

impl From<Mode> for XdpAttach {
    fn from(mode: Mode) -> Self {
        match mode {
            Mode::Auto => XdpAttach::Auto,
            Mode::Native => XdpAttach::Fixed(XdpMode::Driver),
            Mode::Generic => XdpAttach::Fixed(XdpMode::Skb),
        }
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

fn parse_port_range(text: &str) -> Result<RangeInclusive<u16>, String> {
    let (start, end) = text
        .split_once('-')
        .ok_or("expected FIRST-LAST, e.g. 30000-32767")?;
    let start: u16 = start
        .parse()
        .map_err(|_| format!("{start:?} is not a port"))?;
    let end: u16 = end.parse().map_err(|_| format!("{end:?} is not a port"))?;
    if start == 0 || start > end {
        return Err(format!("{text:?} is not a range of ports"));
    }
    Ok(start..=end)
}

fn main() -> std::process::ExitCode {
    unset_empty_settings();
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches)
        .unwrap_or_else(|error| error.exit());
    // Not for `lb monitor` either: it must clear the datapath's event reports when its output
    // closes, and does so on EPIPE.
    if !matches!(cli.command, Command::Run(_) | Command::Monitor { .. }) {
        die_quietly_on_closed_stdout();
    }
    let given = Given(matches.subcommand_matches("run").cloned());
    match dispatch(cli.command, &given) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // One line: the error and its causes, outermost first.
            eprintln!("lb: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A command whose output goes to a pipe that closed (`lb conntrack | head`) ends there, without
/// a word, as `cat` does: SIGPIPE back at its default action. Rust ignores SIGPIPE, so `println!`
/// would panic on EPIPE instead. Not for `lb run`, whose sockets must get EPIPE as an error.
fn die_quietly_on_closed_stdout() {
    // SAFETY: called before any other thread exists; SIG_DFL is a valid disposition.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

fn dispatch(command: Command, given: &Given) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => run(*args, given),
        Command::Explain {
            source,
            destination,
            from,
            pin_dir,
            output,
        } => {
            let hook = match from {
                ClientAt::Auto => Hook::Auto,
                ClientAt::Pod => Hook::Socket,
                ClientAt::Nic => Hook::Xdp,
            };
            explain(&source, &destination, hook, &pin_dir, output)
        }
        Command::Services(args) => cli::services(&args.pin_dir, args.output == Output::Json),
        Command::Backends(args) => cli::backends(&args.pin_dir, args.output == Output::Json),
        Command::Conntrack {
            inspect: args,
            address,
            port,
            protocol,
            service,
            all,
        } => {
            let filter = ConntrackFilter {
                address,
                port,
                protocol: protocol.map(|name| match name.as_str() {
                    "udp" => lb_common::proto::UDP,
                    "sctp" => lb_common::proto::SCTP,
                    _ => lb_common::proto::TCP,
                }),
                service_id: service,
                include_expired: all,
            };
            cli::conntrack(&args.pin_dir, &filter, args.output == Output::Json)
        }
        Command::Stats(args) => cli::stats(&args.pin_dir, args.output == Output::Json),
        Command::Monitor {
            types,
            service,
            client,
            sample,
            rate,
            count,
            pin_dir,
            output,
        } => lb_userspace::observe::monitor::run(&lb_userspace::observe::monitor::MonitorOptions {
            pin_dir,
            kinds: lb_userspace::observe::monitor::parse_kinds(&types)?,
            service,
            client,
            sample_one_in: sample,
            rate,
            count,
            json: output == Output::Json,
        }),
        Command::InitNode {
            interfaces,
            pin_dir,
            node_port_range,
            snat_port_range,
            reserve_ports,
        } => init_node(
            &interfaces,
            &pin_dir,
            reserve_ports.then_some([node_port_range, snat_port_range]),
        ),
        Command::Count {
            iface,
            mode,
            interval,
            reports,
        } => count(&iface, mode, Duration::from_secs(interval), reports),
    }
}

/// An `LB_*` variable set to "" means "not set" (a ConfigMap key left empty), not an empty value:
/// clap would otherwise take "" as a node name, an interface or a path.
fn unset_empty_settings() {
    let empty: Vec<_> = std::env::vars_os()
        .filter(|(name, value)| {
            value.is_empty() && name.to_str().is_some_and(|name| name.starts_with("LB_"))
        })
        .map(|(name, _)| name)
        .collect();
    for name in empty {
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe { std::env::remove_var(name) };
    }
}

/// Which of `lb run`'s settings the command line or the environment gave.
struct Given(Option<clap::ArgMatches>);

impl Given {
    /// Whether `id` (a field of [`RunArgs`]) was given as a flag or an `LB_` variable, rather
    /// than left at its default.
    fn set(&self, id: &str) -> bool {
        self.0.as_ref().is_some_and(|matches| {
            matches!(
                matches.value_source(id),
                Some(
                    clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable
                )
            )
        })
    }
}

/// Applies a kube-proxy configuration file to the settings no flag or `LB_` variable gave, and
/// logs what it set and what it ignored.
fn apply_kube_proxy_config(args: &mut RunArgs, given: &Given) -> anyhow::Result<()> {
    let Some(path) = &args.config else {
        return Ok(());
    };
    let config = lb_userspace::kube_proxy_config::read(path)?;
    let mut applied = Vec::new();
    let mut take = |id: &'static str, value: &Option<String>| -> Option<String> {
        let value = value.clone().filter(|_| !given.set(id))?;
        applied.push(format!("{id}={value}"));
        Some(value)
    };
    let invalid =
        |field: &str, error: String| anyhow::anyhow!("{}: {field}: {error}", path.display());
    if let Some(value) = take("hostname_override", &config.hostname_override) {
        args.hostname_override = Some(value);
    }
    if let Some(value) = take("healthz_bind_address", &config.healthz_bind_address) {
        args.healthz_bind_address = value;
    }
    if let Some(value) = take("metrics_bind_address", &config.metrics_bind_address) {
        args.metrics_bind_address = value;
    }
    if let Some(value) = take("nodeport_addresses", &config.nodeport_addresses) {
        args.nodeport_addresses = value
            .split(',')
            .map(|item| {
                item.parse()
                    .map_err(|error: String| invalid("nodePortAddresses", error))
            })
            .collect::<anyhow::Result<_>>()?;
        NodePortAddresses::from_items(&args.nodeport_addresses)
            .map_err(|error| invalid("nodePortAddresses", error))?;
    }
    if let Some(value) = take("kubeconfig", &config.kubeconfig) {
        args.kubeconfig = Some(PathBuf::from(value));
    }
    let durations = [
        (
            "conntrack_tcp_timeout_established",
            &config.conntrack_tcp_timeout_established,
            "conntrack.tcpEstablishedTimeout",
            &mut args.conntrack_tcp_timeout_established,
        ),
        (
            "conntrack_tcp_timeout_half_closed",
            &config.conntrack_tcp_timeout_half_closed,
            "conntrack.tcpCloseWaitTimeout",
            &mut args.conntrack_tcp_timeout_half_closed,
        ),
        (
            "conntrack_udp_timeout",
            &config.conntrack_udp_timeout,
            "conntrack.udpTimeout",
            &mut args.conntrack_udp_timeout,
        ),
    ];
    for (id, value, field, setting) in durations {
        if let Some(value) = take(id, value) {
            *setting = parse_duration(&value).map_err(|error| invalid(field, error))?;
        }
    }
    tracing::info!(file = %path.display(), ?applied, "kube-proxy configuration applied");
    for field in &config.ignored {
        tracing::warn!(file = %path.display(), field, "kube-proxy configuration field ignored");
    }
    Ok(())
}

fn run(mut args: RunArgs, given: &Given) -> anyhow::Result<()> {
    let log_level = lb_userspace::logging::init(args.log_json, &args.log_level)?;
    if args.cleanup {
        // Without --config: the flags and environment name the node and the API server.
        let mark = match args.source {
            Source::Kube => Some(agent::MarkRemoval {
                node_name: node_name(&args)?,
                master: args.master.clone(),
                kubeconfig: args.kubeconfig.clone(),
            }),
            Source::File => None,
        };
        return agent::cleanup(&args.pin_dir, mark.as_ref());
    }
    apply_kube_proxy_config(&mut args, given)?;
    let node_name = node_name(&args)?;
    check_settings(&mut args)?;
    let nodeport_addresses = NodePortAddresses::from_items(&args.nodeport_addresses)
        .map_err(|error| anyhow::anyhow!("--nodeport-addresses: {error}"))?;
    anyhow::ensure!(
        !args.interfaces.is_empty() || args.cgroup_path.is_some(),
        "nothing to attach the datapath to: give --interfaces (NICs for XDP and tc) and/or \
         --cgroup-path (the cgroup v2 directory of the socket hooks)"
    );
    let source = match args.source {
        Source::File => {
            anyhow::ensure!(
                !args.manifests.is_empty(),
                "--source file needs --manifests PATH"
            );
            for path in &args.manifests {
                check_readable(path)?;
            }
            SourceConfig::Files {
                paths: args.manifests,
                max_bytes: args.manifest_max_bytes,
            }
        }
        Source::Kube => {
            anyhow::ensure!(
                args.manifests.is_empty(),
                "--manifests is read with --source file only (the source is kube)"
            );
            SourceConfig::Kube {
                master: args.master,
                kubeconfig: args.kubeconfig,
            }
        }
    };
    lb_userspace::node::check_mounts(args.cgroup_path.as_deref(), &args.pin_dir, args.mount_bpffs)?;
    let config = AgentConfig {
        node_name,
        nodeport_addresses,
        external_ip_cidrs: args.external_ip_cidrs,
        node_addresses: args.node_addresses,
        node_port_range: args.node_port_range,
        interfaces: args.interfaces,
        xdp_mode: args.xdp_mode.into(),
        cgroup: args.cgroup_path,
        pin_dir: args.pin_dir,
        source,
        default_maglev: args.load_balancing == LoadBalancing::Maglev,
        direct_return: args.nodeport_mode == NodePortMode::Dsr,
        metrics_bind_address: args.metrics_bind_address,
        healthz_bind_address: args.healthz_bind_address,
        healthz_timeout: Duration::from_secs(args.healthz_timeout),
        log_level: Some(log_level),
        ebpf_log_level: args.ebpf_log_level,
        mount_bpffs: args.mount_bpffs,
        snat_ports: args.snat_port_range,
        reserve_ports: args.reserve_ports,
        map_sizes: lb_userspace::datapath::MapSizes {
            frontends4: args.frontend_map_size,
            conntrack4: args.conntrack_map_size,
        },
        missing_service_grace: args.missing_service_grace,
        conntrack_timeouts: lb_common::CtTimeouts {
            tcp_syn: nanos(args.conntrack_tcp_timeout_syn),
            tcp_established: nanos(args.conntrack_tcp_timeout_established),
            tcp_closing: nanos(args.conntrack_tcp_timeout_closing),
            udp: nanos(args.conntrack_udp_timeout),
            snat_port_reuse: nanos(args.snat_port_reuse_delay),
            tcp_half_closed: nanos(args.conntrack_tcp_timeout_half_closed),
        },
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(agent::run(config))
}

/// A manifest path the file source can read: a file, or a directory it can list.
fn check_readable(path: &std::path::Path) -> anyhow::Result<()> {
    let readable = if path.is_dir() {
        std::fs::read_dir(path).map(drop)
    } else {
        std::fs::File::open(path).map(drop)
    };
    readable.with_context(|| format!("--manifests {}: not readable", path.display()))
}

/// `lb init-node`: what the agent in the DaemonSet needs done with privileges it does not have.
fn init_node(
    interfaces: &[String],
    pin_dir: &std::path::Path,
    lb_ports: Option<[RangeInclusive<u16>; 2]>,
) -> anyhow::Result<()> {
    use lb_userspace::datapath::bpffs;
    let mount = std::path::Path::new(bpffs::DEFAULT_MOUNT);
    // Everything checked before anything is changed.
    anyhow::ensure!(
        pin_dir.starts_with(mount)
            && pin_dir != mount
            && !pin_dir
                .components()
                .any(|part| part == std::path::Component::ParentDir),
        "--pin-dir {} is not a directory of the bpffs at {}",
        pin_dir.display(),
        mount.display()
    );
    for iface in interfaces {
        lb_userspace::node::check_accept_local_interface(iface)?;
    }
    if bpffs::is_mounted(mount)? {
        println!("bpffs already mounted at {}", mount.display());
    } else {
        bpffs::ensure_mounted(mount)?;
        println!("mounted bpffs at {} (mode 0700)", mount.display());
    }
    bpffs::create_pin_dir(pin_dir)?;
    println!("pin directory {} (mode 0700)", pin_dir.display());
    for iface in interfaces {
        lb_userspace::node::set_accept_local(iface)?;
        println!("net.ipv4.conf.{iface}.accept_local = 1");
    }
    // A reservation refused (it would starve the node's own connections) or failed does not
    // keep the agent from starting: it reports the requirement as missing.
    match lb_ports.map(|lb_ports| lb_userspace::node::reserve_lb_ports(&lb_ports)) {
        None => {}
        Some(Ok(reserved)) if reserved.is_empty() => {
            println!("no NodePort or SNAT port among the node's unreserved ephemeral ports");
        }
        Some(Ok(reserved)) => println!(
            "net.ipv4.ip_local_reserved_ports += {}",
            lb_userspace::node::format_port_list(&reserved)
        ),
        Some(Err(error)) => eprintln!("warning: {error:#}"),
    }
    Ok(())
}

/// `lb explain`'s client: `ip:port`, `[ipv6]:port`, or the address alone (`ip`, `ipv6`,
/// `[ipv6]`) with port 40000.
fn explain_client(source: &str) -> anyhow::Result<std::net::SocketAddr> {
    if let Ok(addr) = source.parse() {
        return Ok(addr);
    }
    let address = source
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or(source)
        .parse()
        .with_context(|| format!("{source:?} is not ip, ip:port, [ipv6] or [ipv6]:port"))?;
    Ok(std::net::SocketAddr::new(address, 40000))
}

fn explain(
    source: &str,
    destination: &str,
    hook: Hook,
    pin_dir: &std::path::Path,
    output: Output,
) -> anyhow::Result<()> {
    use std::net::SocketAddr;
    let client = explain_client(source)?;
    let (target, protocol) = match destination.rsplit_once('/') {
        Some((target, "tcp")) => (target, lb_common::proto::TCP),
        Some((target, "udp")) => (target, lb_common::proto::UDP),
        Some((target, "sctp")) => (target, lb_common::proto::SCTP),
        Some((_, other)) => anyhow::bail!("protocol {other:?}: tcp, udp or sctp"),
        None => (destination, lb_common::proto::TCP),
    };
    let target: SocketAddr = target
        .parse()
        .with_context(|| format!("{target:?} is not ip:port or [ipv6]:port"))?;
    let explanation =
        lb_userspace::observe::explain::explain(pin_dir, client, target, protocol, hook)?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&explanation)?),
        Output::Text => {
            let hook = match explanation.hook {
                Hook::Socket => "socket hooks",
                _ => "XDP",
            };
            println!("{} ({hook}): {}", explanation.packet, explanation.verdict);
            if let Some(service) = &explanation.service {
                println!(
                    "service {} ({}), {} backends",
                    service.id,
                    service.kinds.join(", "),
                    service.backends
                );
            }
            for reason in &explanation.reasons {
                println!("  - {reason}");
            }
        }
    }
    Ok(())
}

/// This node's name: `--hostname-override`, else `NODE_NAME`, else the hostname; trimmed and
/// lowercased, as kube-proxy takes it (Node names are lowercase).
fn node_name(args: &RunArgs) -> anyhow::Result<String> {
    let name = match args
        .hostname_override
        .clone()
        .or_else(|| std::env::var("NODE_NAME").ok())
    {
        Some(name) => name,
        None => hostname()?,
    };
    let name = name.trim().to_lowercase();
    anyhow::ensure!(
        !name.is_empty(),
        "the node name is empty: set --hostname-override (LB_HOSTNAME_OVERRIDE) or NODE_NAME"
    );
    Ok(name)
}

/// Refuses, before anything is attached, settings the agent could only run badly with: bind
/// addresses it cannot bind, and a SNAT port range that overlaps the NodePort range (answers
/// to a SNAT port there would be taken for NodePort traffic).
fn check_settings(args: &mut RunArgs) -> anyhow::Result<()> {
    args.metrics_bind_address =
        lb_userspace::observe::serve::bind_address(&args.metrics_bind_address, 10249)
            .map_err(|error| anyhow::anyhow!("--metrics-bind-address: {error}"))?;
    args.healthz_bind_address =
        lb_userspace::observe::serve::bind_address(&args.healthz_bind_address, 10256)
            .map_err(|error| anyhow::anyhow!("--healthz-bind-address: {error}"))?;
    let (nodes, snat) = (&args.node_port_range, &args.snat_port_range);
    anyhow::ensure!(
        snat.end() < nodes.start() || nodes.end() < snat.start(),
        "--snat-port-range {}-{} overlaps --node-port-range {}-{}: answers to a SNAT port there \
         would be taken for NodePort traffic",
        snat.start(),
        snat.end(),
        nodes.start(),
        nodes.end()
    );
    Ok(())
}

fn hostname() -> anyhow::Result<String> {
    let name =
        std::fs::read_to_string("/proc/sys/kernel/hostname").context("reading the hostname")?;
    Ok(name.trim().to_owned())
}

fn count(iface: &str, mode: Mode, interval: Duration, reports: u64) -> anyhow::Result<()> {
    let mut counter = XdpCounter::load()?;
    let name = std::ffi::CString::new(iface).context("interface name contains a NUL byte")?;
    counter
        .attach(name.as_c_str(), XdpAttach::from(mode).for_interface(iface))
        .with_context(|| format!("attaching to {iface}"))?;
    let mut report = 0;
    while reports == 0 || report < reports {
        std::thread::sleep(interval);
        report += 1;
        let line: Vec<String> = counter
            .read()?
            .iter()
            .filter(|count| count.counter.packets > 0)
            .map(|count| {
                format!(
                    "{}={}/{}B",
                    count.label, count.counter.packets, count.counter.bytes
                )
            })
            .collect();
        println!(
            "{iface}: {}",
            if line.is_empty() {
                "-".into()
            } else {
                line.join(" ")
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explain_takes_the_client_with_or_without_its_port() {
        for (source, expected) in [
            ("10.0.0.7", "10.0.0.7:40000"),
            ("10.0.0.7:1234", "10.0.0.7:1234"),
            ("::1", "[::1]:40000"),
            ("[::1]", "[::1]:40000"),
            ("[2001:db8::7]:1234", "[2001:db8::7]:1234"),
        ] {
            assert_eq!(
                explain_client(source).expect(source).to_string(),
                expected,
                "{source}"
            );
        }
        for bad in ["[::1", "10.0.0.7:", "node1", "[10.0.0.7]:x"] {
            let error = explain_client(bad).expect_err(bad).to_string();
            assert!(error.contains("is not ip, ip:port"), "{bad}: {error}");
        }
    }
}
