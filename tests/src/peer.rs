//! Real TCP and UDP peers for the lab: the `lab-peer` binary (servers in pod namespaces, clients
//! in the client or a pod namespace) and the report its clients print.
//!
//! Every reply names the server that sent it and the client address the server saw, so a test can
//! tell both which endpoint a connection reached and whether the source address survived the trip.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::lab::{Cgroup, Host, Proc};

/// What a `lab-peer tcp|udp` client run saw, printed as one JSON line.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClientReport {
    /// Connections (TCP) or requests (UDP) tried.
    pub attempts: u64,
    /// Those answered with a well-formed reply.
    pub ok: u64,
    /// Those that failed: refused, reset, timed out, malformed reply.
    pub errors: u64,
    /// Replies per server name.
    pub by_server: BTreeMap<String, u64>,
    /// Replies per client IP address as the server saw it.
    pub peers_seen: BTreeMap<String, u64>,
    /// Replies per client `ip:port` as the server saw it (through SNAT: the node's address and
    /// the flow's SNAT port), so a reply meant for another flow shows.
    #[serde(default)]
    pub seen_as: BTreeMap<String, u64>,
    /// Replies per peer `ip:port` as the client's own socket API reported it: getpeername() for
    /// TCP and connected UDP, the recvfrom() source for unconnected UDP. Socket hooks must show
    /// the Service address here, never a backend's.
    pub peer_names: BTreeMap<String, u64>,
    /// The server that sent the last good reply.
    pub last_server: Option<String>,
    /// The first few error messages.
    pub error_samples: Vec<String>,
    /// Errors by kind: `reset` (ECONNRESET), `refused` (ECONNREFUSED), `timeout` (no answer in
    /// time), `closed` (the peer closed before replying), `malformed`, `other`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub error_kinds: BTreeMap<String, u64>,
    /// `lab-peer load` only: the rate and the latency of every successful request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencySummary>,
    /// `--reconnect` only: every request in order, with when it started, so a test can tell what
    /// happened after a given moment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<TimelineEntry>,
}

/// One request of a [`ClientReport::timeline`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TimelineEntry {
    /// When the request started: milliseconds since the Unix epoch (the machine's one clock, the
    /// same in every namespace).
    pub started_ms: u64,
    /// The server that answered, or None for an error.
    pub server: Option<String>,
}

/// Rate and latency percentiles of a `lab-peer load` run (nanoseconds; nearest rank).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LatencySummary {
    /// Parallel clients (threads, each with its own connections).
    pub clients: u64,
    /// Wall time from the clients' start to the last one's end.
    pub elapsed_ns: u64,
    /// Successful requests per second over `elapsed_ns`, all clients together.
    pub rate_per_s: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
    pub mean_ns: u64,
}

impl ClientReport {
    /// Errors of one kind of [`Self::error_kinds`].
    pub fn errors_of(&self, kind: &str) -> u64 {
        self.error_kinds.get(kind).copied().unwrap_or(0)
    }

    /// The names of the servers that answered.
    pub fn servers(&self) -> std::collections::BTreeSet<&str> {
        self.by_server.keys().map(String::as_str).collect()
    }

    /// Panics, naming `what`, unless at least one request was made and every one succeeded.
    #[track_caller]
    pub fn assert_all_ok(&self, what: &str) {
        assert!(
            self.attempts > 0 && self.ok == self.attempts && self.errors == 0,
            "{what}: {self:?}"
        );
    }
}

/// The kind of a client's I/O error, as [`ClientReport::error_kinds`] counts it.
pub fn error_kind(err: &std::io::Error) -> &'static str {
    use std::io::ErrorKind;
    match err.kind() {
        ErrorKind::ConnectionReset => "reset",
        ErrorKind::ConnectionRefused => "refused",
        // A socket read timeout is EAGAIN (WouldBlock); connect_timeout says TimedOut.
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "timeout",
        ErrorKind::UnexpectedEof => "closed",
        _ => "other",
    }
}

/// A server's reply to one request: `<server name> <client ip>:<client port>\n`.
pub fn reply(server: &str, peer: std::net::SocketAddr) -> String {
    format!("{server} {peer}\n")
}

/// Parses a [`reply`] into (server name, client ip, client ip:port).
pub fn parse_reply(reply: &str) -> Option<(&str, &str, &str)> {
    // The first line; padding may follow it.
    let (server, peer) = reply.lines().next()?.split_once(' ')?;
    let (ip, _port) = peer.rsplit_once(':')?;
    Some((server, ip, peer))
}

/// One request over TCP from `from_port` of `host`'s IPv4 address to `to`, closed by the client
/// first (its port then waits in TIME_WAIT, which `SO_REUSEADDR` lets a connection elsewhere
/// bind again, as a client that picks its ports can): the reply line. A connection not made
/// within `timeout`, or not answered within it, is an error.
pub fn request_from_port(
    host: &Host,
    from_port: u16,
    to: std::net::SocketAddrV4,
    timeout: Duration,
) -> anyhow::Result<String> {
    let mut stream = connect_from_port(host, from_port, to, timeout)?;
    request_on(&mut stream)
}

/// A TCP connection from `from_port` of `host`'s IPv4 address to `to`, bound with
/// `SO_REUSEADDR`: another such connection from the same port to another destination can be
/// open at the same time, as a NAT that reuses a port for many destinations makes them. Reads
/// time out after `timeout`, as does the connect.
pub fn connect_from_port(
    host: &Host,
    from_port: u16,
    to: std::net::SocketAddrV4,
    timeout: Duration,
) -> anyhow::Result<std::net::TcpStream> {
    use socket2::{Domain, Socket, Type};
    let _inside = host.enter()?;
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).context("socket")?;
    socket.set_reuse_address(true).context("SO_REUSEADDR")?;
    let from = std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, from_port);
    socket
        .bind(&from.into())
        .with_context(|| format!("bind {from}"))?;
    socket
        .connect_timeout(&to.into(), timeout)
        .with_context(|| format!("connect from port {from_port} to {to}"))?;
    let stream = std::net::TcpStream::from(socket);
    stream.set_read_timeout(Some(timeout))?;
    Ok(stream)
}

/// One request on an open connection to a `lab-peer` server: the reply line.
pub fn request_on(stream: &mut std::net::TcpStream) -> anyhow::Result<String> {
    use std::io::{BufRead as _, Write as _};
    stream.write_all(b"request\n")?;
    let mut reply = String::new();
    // A reader of its own for each request: the server sends one line per request and nothing
    // before the next, so no byte past the line is buffered and lost with the reader.
    std::io::BufReader::new(&*stream)
        .read_line(&mut reply)
        .with_context(|| format!("the reply from {:?}", stream.peer_addr()))?;
    Ok(reply)
}

/// The `lab-peer` executable next to the running one (tests run from target/<profile>/deps).
pub fn binary() -> anyhow::Result<PathBuf> {
    sibling_binary("lab-peer")
}

/// A binary of the workspace built into the same target directory as the running executable.
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("executable has a directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps has a parent")?;
    }
    let path = dir.join(name);
    anyhow::ensure!(
        path.exists(),
        "{} not built (cargo builds it with the tests and the demo)",
        path.display()
    );
    Ok(path)
}

/// Starts a TCP and UDP server named `name` on `port` (all addresses) in `host`.
pub fn serve(host: &Host, name: &str, port: u16) -> anyhow::Result<Proc> {
    let addr = format!("0.0.0.0:{port}");
    host.spawn(
        binary()?,
        &["serve", "--name", name, "--tcp", &addr, "--udp", &addr],
        None,
    )
}

/// Starts an SCTP server (one-to-one style sockets) named `name` on `port` (all IPv4 addresses)
/// in `host`. Needs a kernel with SCTP.
pub fn serve_sctp(host: &Host, name: &str, port: u16) -> anyhow::Result<Proc> {
    let addr = format!("0.0.0.0:{port}");
    host.spawn(binary()?, &["serve", "--name", name, "--sctp", &addr], None)
}

/// As [`serve`], on `[::]` (a dual-stack socket: IPv6 clients, and IPv4 ones seen as
/// IPv4-mapped addresses).
pub fn serve_dual_stack(host: &Host, name: &str, port: u16) -> anyhow::Result<Proc> {
    let addr = format!("[::]:{port}");
    host.spawn(
        binary()?,
        &["serve", "--name", name, "--tcp", &addr, "--udp", &addr],
        None,
    )
}

/// Waits until a client run with this `ready_file` has had its first request answered: the
/// moment a test can change something under a client that is under way.
pub fn wait_until_answered(ready_file: &Path, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !ready_file.exists() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no request of the client answered within {timeout:?} ({} absent)",
            ready_file.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Parameters of one client run.
#[derive(Clone, Debug)]
pub struct ClientRun<'a> {
    /// `tcp` (one connection per request), `udp` (one datagram per request) or `sctp` (one
    /// association per request).
    pub protocol: &'a str,
    /// Destination `ip:port`.
    pub to: &'a str,
    pub requests: u64,
    /// UDP: send every request from one socket (one flow) instead of a new one each time.
    /// TCP: send every request over one connection instead of one connection each.
    pub one_flow: bool,
    /// UDP: sendto()/recvfrom() on an unconnected socket instead of connect() + send()/recv().
    pub unconnected: bool,
    /// Pause between requests.
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// UDP with `one_flow`: after a socket error (not a timeout), replace the socket by a newly
    /// connected one (what an application does when its socket is aborted), and report a
    /// timeline.
    pub reconnect: bool,
    /// UDP: each request this many bytes (0: a short one); the server answers with as many, so
    /// both directions are IP-fragmented when it exceeds the MTU.
    pub payload_bytes: usize,
    /// TCP: the server follows each reply with this many more bytes (0: none).
    pub answer_bytes: usize,
    /// A file the client creates at its first answered request ([`wait_until_answered`]).
    pub ready_file: Option<&'a Path>,
    /// The source port to connect (TCP) or send (UDP) from (None: the kernel picks one).
    pub source_port: Option<u16>,
    /// With `one_flow`: after the first answered request, wait until this file exists.
    pub go_file: Option<&'a Path>,
    /// TCP: each request asks the server to answer this many ms later, and the client
    /// half-closes its connection before it waits for the answer.
    pub half_close_answer_ms: Option<u64>,
    /// Unconnected UDP with `go_file`: once it exists, send the remaining requests here from the
    /// same socket.
    pub then_to: Option<&'a str>,
}

impl<'a> ClientRun<'a> {
    pub fn tcp(to: &'a str, requests: u64) -> Self {
        Self {
            protocol: "tcp",
            to,
            requests,
            one_flow: false,
            unconnected: false,
            interval_ms: 0,
            timeout_ms: 2000,
            reconnect: false,
            payload_bytes: 0,
            answer_bytes: 0,
            ready_file: None,
            source_port: None,
            go_file: None,
            then_to: None,
            half_close_answer_ms: None,
        }
    }

    pub fn udp(to: &'a str, requests: u64) -> Self {
        Self {
            protocol: "udp",
            ..Self::tcp(to, requests)
        }
    }

    pub fn sctp(to: &'a str, requests: u64) -> Self {
        Self {
            protocol: "sctp",
            ..Self::tcp(to, requests)
        }
    }

    /// Runs this client from `host` again and again (100 ms apart) until `answered` accepts its
    /// report, for at most `within`: how lab tests wait for an agent to serve what they applied.
    /// The last report is in the error.
    pub fn run_until(
        &self,
        host: &Host,
        within: Duration,
        answered: impl Fn(&ClientReport) -> bool,
    ) -> anyhow::Result<ClientReport> {
        let deadline = Instant::now() + within;
        loop {
            let report = self.run(host, None)?;
            if answered(&report) {
                return Ok(report);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} not answered as awaited within {within:?}: {report:?}",
                self.to
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs the client in `host` (inside `cgroup` when given) and returns its report.
    pub fn run(&self, host: &Host, cgroup: Option<&Cgroup>) -> anyhow::Result<ClientReport> {
        let requests = self.requests.to_string();
        let timeout = self.timeout_ms.to_string();
        let interval = self.interval_ms.to_string();
        let payload = self.payload_bytes.to_string();
        let answer = self.answer_bytes.to_string();
        let mut args = vec![
            self.protocol,
            "--payload-bytes",
            &payload,
            "--answer-bytes",
            &answer,
            "--to",
            self.to,
            "--requests",
            &requests,
            "--timeout-ms",
            &timeout,
            "--interval-ms",
            &interval,
        ];
        if self.one_flow {
            args.push("--one-flow");
        }
        if self.unconnected {
            args.push("--unconnected");
        }
        if self.reconnect {
            args.push("--reconnect");
        }
        let ready_file = self
            .ready_file
            .map(|path| path.to_string_lossy().into_owned());
        if let Some(path) = &ready_file {
            args.extend(["--ready-file", path]);
        }
        let source_port = self.source_port.map(|port| port.to_string());
        if let Some(port) = &source_port {
            args.extend(["--source-port", port]);
        }
        let go_file = self.go_file.map(|path| path.to_string_lossy().into_owned());
        if let Some(go_file) = &go_file {
            args.extend(["--go-file", go_file]);
        }
        if let Some(then_to) = self.then_to {
            args.extend(["--then-to", then_to]);
        }
        let half_close = self.half_close_answer_ms.map(|ms| ms.to_string());
        if let Some(ms) = &half_close {
            args.extend(["--half-close-answer-ms", ms]);
        }
        let stdout = match cgroup {
            Some(cgroup) => host.run_in_cgroup(cgroup, binary()?, &args)?,
            None => host.run(binary()?, &args)?,
        };
        serde_json::from_str(stdout.trim())
            .with_context(|| format!("parsing lab-peer report: {stdout}"))
    }
}

/// A TCP connection or connected UDP socket of a node's own, made inside the node's network
/// namespace, which the calling thread stays in while this is held (a test run of an XDP
/// program looks sockets up in the caller's namespace): from `local` (bound with SO_REUSEADDR)
/// to a socket on the node with a port the kernel picks. For tests that need a socket of the
/// node's on given ports.
pub struct NodeConnection {
    /// The peer's address: the socket whose segments or datagrams answer the node's.
    pub server: std::net::SocketAddr,
    /// `server`'s address with the port after it, which no socket holds.
    pub stranger: std::net::SocketAddr,
    _socket: socket2::Socket,
    /// The listener (which holds the connection's other end in its queue) or the UDP peer.
    _server_end: socket2::Socket,
    _inside: crate::lab::NetnsGuard,
}

impl NodeConnection {
    /// Enters `node`'s namespace and connects from `local` to a listener on `server`.
    pub fn open(
        node: &Host,
        local: std::net::SocketAddr,
        server: std::net::IpAddr,
    ) -> anyhow::Result<Self> {
        Self::open_of(socket2::Type::STREAM, node, local, server)
    }

    /// Enters `node`'s namespace and connects a UDP socket bound to `local` to a UDP socket on
    /// `server`.
    pub fn open_udp(
        node: &Host,
        local: std::net::SocketAddr,
        server: std::net::IpAddr,
    ) -> anyhow::Result<Self> {
        Self::open_of(socket2::Type::DGRAM, node, local, server)
    }

    fn open_of(
        kind: socket2::Type,
        node: &Host,
        local: std::net::SocketAddr,
        server: std::net::IpAddr,
    ) -> anyhow::Result<Self> {
        let inside = node.enter()?;
        let server = std::net::SocketAddr::new(server, 0);
        let server_end = socket2::Socket::new(socket2::Domain::for_address(server), kind, None)?;
        server_end
            .bind(&server.into())
            .with_context(|| format!("binding {server}"))?;
        if kind == socket2::Type::STREAM {
            server_end.listen(1).context("listening")?;
        }
        let server = server_end
            .local_addr()?
            .as_socket()
            .context("the server's address")?;
        let socket = socket2::Socket::new(socket2::Domain::for_address(local), kind, None)?;
        socket.set_reuse_address(true)?;
        socket
            .bind(&local.into())
            .with_context(|| format!("binding {local}"))?;
        socket
            .connect(&server.into())
            .with_context(|| format!("connecting to {server}"))?;
        let mut stranger = server;
        stranger.set_port(server.port() + 1);
        Ok(Self {
            server,
            stranger,
            _socket: socket,
            _server_end: server_end,
            _inside: inside,
        })
    }

    /// `server` and `stranger` of an IPv4 connection.
    pub fn v4(&self) -> (std::net::SocketAddrV4, std::net::SocketAddrV4) {
        match (self.server, self.stranger) {
            (std::net::SocketAddr::V4(server), std::net::SocketAddr::V4(stranger)) => {
                (server, stranger)
            }
            _ => panic!("{} is no IPv4 address", self.server),
        }
    }

    /// `server` and `stranger` of an IPv6 connection.
    pub fn v6(&self) -> (std::net::SocketAddrV6, std::net::SocketAddrV6) {
        match (self.server, self.stranger) {
            (std::net::SocketAddr::V6(server), std::net::SocketAddr::V6(stranger)) => {
                (server, stranger)
            }
            _ => panic!("{} is no IPv6 address", self.server),
        }
    }
}
