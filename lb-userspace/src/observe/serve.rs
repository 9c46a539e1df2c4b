//! The agent's HTTP endpoints:
//!
//! - `--metrics-bind-address`: `/metrics` (OpenMetrics text) and `/debug/log-level` (GET the
//!   log filter, PUT a new one);
//! - `--healthz-bind-address`: `/healthz` and `/livez` with kube-proxy's semantics (see
//!   [`Health`]);
//! - one server per healthCheckNodePort of an externalTrafficPolicy Local Service
//!   ([`HealthCheckPorts`]): 200 while the node has endpoints of the Service, 503 when it has
//!   none, so external load balancers send traffic only to nodes that keep it.
//!
//! Every request is answered; a server that cannot bind is logged and the agent goes on (a
//! port taken by something else must not take the datapath down). Clients are held to
//! [`ServerLimits`]: a few connections at a time, headers (and the one body read, the log level's,
//! at most [`MAX_BODY_BYTES`]) within a deadline, so a slow or greedy client cannot pin the
//! agent's memory or tasks.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Body as _, Incoming},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::Semaphore, task::JoinHandle};
use tracing::{debug, info, warn};

use super::metrics::{HttpRefused, Metrics};
use crate::logging::LogLevel;

type Reply = Response<Full<Bytes>>;

/// The largest request body read (`PUT /debug/log-level`); a larger one is refused with 413.
pub const MAX_BODY_BYTES: usize = 4096;

/// What every server allows one client.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// How long a client may take to send its request headers (or stay silent before them).
    pub header_read_timeout: Duration,
    /// How long a client may take to send a body the server reads.
    pub body_read_timeout: Duration,
    /// Connections served at once; one more is answered 503 and closed at once.
    pub max_connections: usize,
    /// Connections served at once from one peer address, so that one client (a slow one
    /// holding connections open) cannot take the places of the kubelet's probes and
    /// Prometheus; one more is answered 503 and closed at once.
    pub max_connections_per_peer: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            // Prometheus, a probe or two and an operator's curl need a handful.
            max_connections: 64,
            max_connections_per_peer: 16,
        }
    }
}

/// What a server over its connection limit answers before it closes the connection.
const BUSY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";

/// Serves `handle` on `listener` until the task is aborted; the handler also gets the peer's
/// address. Clients cut off by `limits` are counted in `refused`.
fn spawn_server<F, Fut>(
    listener: TcpListener,
    limits: ServerLimits,
    refused: HttpRefused,
    handle: F,
) -> JoinHandle<()>
where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let peers = PeerConnections::new(limits.max_connections_per_peer);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(connection) => connection,
                Err(error) => {
                    warn!(%error, "accepting an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let places = peers.take(peer.ip()).and_then(|from_peer| {
                let permit = connections.clone().try_acquire_owned().ok();
                permit
                    .map(|permit| (from_peer, permit))
                    .ok_or("too_many_connections")
            });
            let places = match places {
                Ok(places) => places,
                Err(reason) => {
                    // Never waits for the client: what the socket buffer takes now, or nothing.
                    let _ = stream.try_write(BUSY);
                    debug!(%peer, reason, "HTTP connection refused");
                    refused.get_or_create(&[("reason", reason)]).inc();
                    continue;
                }
            };
            let handle = handle.clone();
            let refused = refused.clone();
            tokio::spawn(async move {
                let _places = places;
                let service = service_fn(move |request| {
                    let reply = handle(request, peer);
                    async move { Ok::<_, Infallible>(reply.await) }
                });
                if let Err(error) = hyper::server::conn::http1::Builder::new()
                    // A client that never finishes its request headers is dropped instead of
                    // holding a connection (and its task) for ever.
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(limits.header_read_timeout)
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    if error.is_timeout() {
                        refused.get_or_create(&[("reason", "header_timeout")]).inc();
                    }
                    debug!(%error, "HTTP connection ended with an error");
                }
            });
        }
    })
}

/// How many connections each peer address has open, up to a limit.
#[derive(Clone)]
struct PeerConnections {
    limit: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// A peer's place, given back when dropped.
struct PeerPlace {
    peers: PeerConnections,
    peer: IpAddr,
}

impl PeerConnections {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            open: Arc::default(),
        }
    }

    /// A place for one more connection of `peer`, or the reason there is none.
    fn take(&self, peer: IpAddr) -> Result<PeerPlace, &'static str> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(peer).or_default();
        if *count >= self.limit {
            return Err("too_many_connections_from_peer");
        }
        *count += 1;
        Ok(PeerPlace {
            peers: self.clone(),
            peer,
        })
    }
}

impl Drop for PeerPlace {
    fn drop(&mut self) {
        let mut open = self
            .peers
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

/// Reads a request body of at most [`MAX_BODY_BYTES`] within `deadline`; a larger one is refused
/// unread when its Content-Length says so, else as soon as it passes the limit. Err: the status
/// and message to answer.
async fn read_small_body(
    body: Incoming,
    deadline: Duration,
) -> Result<Bytes, (StatusCode, String)> {
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("at most {MAX_BODY_BYTES} bytes\n"),
        )
    };
    if body.size_hint().lower() > MAX_BODY_BYTES as u64 {
        return Err(too_large());
    }
    match tokio::time::timeout(deadline, Limited::new(body, MAX_BODY_BYTES).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(error)) => Err((StatusCode::BAD_REQUEST, format!("{error}\n"))),
        Err(_) => Err((
            StatusCode::REQUEST_TIMEOUT,
            "the body did not arrive in time\n".into(),
        )),
    }
}

/// The listeners of the metrics server: `address` (as [`bind`] takes it) and, when that is one
/// address other than loopback (as the DaemonSet gives the node's), the same port on the
/// family's loopback address too, where `PUT /debug/log-level` is taken from the node's own
/// processes. A loopback port that cannot be bound costs only that, with a warning.
pub async fn bind_metrics(address: &str) -> anyhow::Result<Vec<TcpListener>> {
    let Some(listener) = bind(address, "metrics").await? else {
        return Ok(Vec::new());
    };
    let bound = listener.local_addr()?;
    let mut listeners = vec![listener];
    let ip = bound.ip().to_canonical();
    if !ip.is_loopback() && !ip.is_unspecified() {
        let loopback: IpAddr = if ip.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        };
        let also = SocketAddr::new(loopback, bound.port()).to_string();
        match bind(&also, "metrics").await {
            Ok(Some(listener)) => listeners.push(listener),
            Ok(None) => {}
            Err(error) => {
                warn!(%error, "PUT /debug/log-level is taken over loopback only, which is not served")
            }
        }
    }
    Ok(listeners)
}

/// A bind address as a flag or kube-proxy's configuration gives it, checked before the agent
/// starts (a bind that fails later leaves the agent running without the server): `off` or
/// empty (no server), `IP:port`, an IP alone (with `default_port`, as kube-proxy reads it),
/// `:port` (every IPv4 address), or an IPv6 address and a port without the brackets, as the
/// DaemonSet's `$(NODE_IP):10249` reads on an IPv6 node (an address that parses whole wins).
pub fn bind_address(text: &str, default_port: u16) -> Result<String, String> {
    let text = text.trim();
    if text.is_empty() || text == "off" {
        return Ok(text.to_owned());
    }
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(address.to_string());
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, default_port).to_string());
    }
    if let Some(Ok(port)) = text.strip_prefix(':').map(str::parse::<u16>) {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)).to_string());
    }
    let unbracketed_ipv6 = text.rsplit_once(':').and_then(|(ip, port)| {
        Some(SocketAddr::new(
            IpAddr::V6(ip.parse().ok()?),
            port.parse().ok()?,
        ))
    });
    unbracketed_ipv6
        .map(|address| address.to_string())
        .ok_or_else(|| format!("{text} is not an address to bind (IP:port, an IP, :port, or off)"))
}

/// Binds an address given as a flag ("off", or "" on the command line, turns the server off).
pub async fn bind(address: &str, what: &str) -> anyhow::Result<Option<TcpListener>> {
    if address.is_empty() || address == "off" {
        return Ok(None);
    }
    let listener = TcpListener::bind(address)
        .await
        .map_err(|error| anyhow::anyhow!("binding the {what} address {address}: {error}"))?;
    info!(address = %listener.local_addr()?, "serving {what}");
    Ok(Some(listener))
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

fn not_found() -> Reply {
    reply(StatusCode::NOT_FOUND, "text/plain", "not found\n")
}

/// `/metrics` and `/debug/log-level`.
pub fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    log_level: Option<LogLevel>,
) -> JoinHandle<()> {
    serve_metrics_with_limits(listener, metrics, log_level, ServerLimits::default())
}

/// [`serve_metrics`] with other limits (tests shorten the deadlines).
pub fn serve_metrics_with_limits(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    log_level: Option<LogLevel>,
    limits: ServerLimits,
) -> JoinHandle<()> {
    let refused = metrics.agent().http_refused.clone();
    spawn_server(
        listener,
        limits,
        refused.clone(),
        move |request: Request<Incoming>, peer: SocketAddr| {
            let metrics = metrics.clone();
            let log_level = log_level.clone();
            let refused = refused.clone();
            async move {
                match (request.method(), request.uri().path()) {
                    (&Method::GET, "/metrics") => {
                        // Reading the maps makes syscalls: off the async workers.
                        match tokio::task::spawn_blocking(move || metrics.encode()).await {
                            Ok(page) => reply(
                                StatusCode::OK,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                page,
                            ),
                            Err(error) => reply(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "text/plain",
                                format!("{error}\n"),
                            ),
                        }
                    }
                    (_, "/debug/log-level") => {
                        let reply =
                            log_level_endpoint(request, peer, log_level, limits.body_read_timeout)
                                .await;
                        count_refused_body(&refused, reply.status());
                        reply
                    }
                    _ => not_found(),
                }
            }
        },
    )
}

/// Counts a request whose body the limits refused.
fn count_refused_body(refused: &HttpRefused, status: StatusCode) {
    let reason = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::REQUEST_TIMEOUT => "body_timeout",
        _ => return,
    };
    refused.get_or_create(&[("reason", reason)]).inc();
}

/// GET from anywhere the metrics are served; PUT only over loopback (the metrics address is
/// usually reachable from other hosts, so Prometheus can scrape it, and the endpoint has no
/// authentication). Not also "from the address it was sent to": the agent sets accept_local on
/// its NICs, so packets from outside that claim the node's address are taken in, and with the
/// listener's queue overflowed a blind ACK can complete a SYN-cookie handshake by guessing a
/// few bits. Packets from loopback addresses arriving on any other device are dropped.
async fn log_level_endpoint(
    request: Request<Incoming>,
    peer: SocketAddr,
    log_level: Option<LogLevel>,
    body_read_timeout: Duration,
) -> Reply {
    let Some(log_level) = log_level else {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "log level not settable\n",
        );
    };
    match *request.method() {
        Method::GET => reply(
            StatusCode::OK,
            "text/plain",
            format!("{}\n", log_level.get()),
        ),
        Method::PUT | Method::POST if !peer.ip().to_canonical().is_loopback() => reply(
            StatusCode::FORBIDDEN,
            "text/plain",
            "the log level is set from the node itself (127.0.0.1)\n",
        ),
        Method::PUT | Method::POST => {
            let body = match read_small_body(request.into_body(), body_read_timeout).await {
                Ok(body) => body,
                Err((status, message)) => return reply(status, "text/plain", message),
            };
            match log_level.set(&String::from_utf8_lossy(&body)) {
                Ok(()) => reply(
                    StatusCode::OK,
                    "text/plain",
                    format!("{}\n", log_level.get()),
                ),
                Err(error) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{error}\n")),
            }
        }
        _ => reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET or PUT\n"),
    }
}

/// kube-proxy's proxier health: healthy unless changes from the source have waited longer than
/// the timeout for a sync. The agent marks changes queued at start, so an agent that never
/// completes its first sync turns unhealthy too.
pub struct Health {
    timeout: Duration,
    state: Mutex<HealthState>,
}

struct HealthState {
    last_updated: Option<SystemTime>,
    /// The oldest change not synced yet.
    oldest_pending: Option<Instant>,
    /// False while this node is being deleted (KEP-3836): /healthz says 503 so load balancers
    /// drain it, /livez stays 200 so the kubelet does not restart the agent.
    node_eligible: bool,
}

impl Health {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            state: Mutex::new(HealthState {
                last_updated: None,
                oldest_pending: Some(Instant::now()),
                node_eligible: true,
            }),
        }
    }

    /// The source delivered changes (the oldest pending one keeps its time).
    pub fn queued(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.oldest_pending.get_or_insert_with(Instant::now);
        }
    }

    /// A sync finished: every change delivered before it is applied.
    pub fn updated(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.oldest_pending = None;
            state.last_updated = Some(SystemTime::now());
        }
    }

    /// Whether this node should get new traffic from load balancers.
    pub fn set_node_eligible(&self, eligible: bool) {
        if let Ok(mut state) = self.state.lock() {
            state.node_eligible = eligible;
        }
    }

    /// Whether healthy, with the body kube-proxy answers. /healthz (`for_traffic`) is also 503
    /// while the node is not eligible; /livez is not.
    fn check(&self, for_traffic: bool) -> (bool, String) {
        let Ok(state) = self.state.lock() else {
            return (false, "{}".into());
        };
        let synced = state
            .oldest_pending
            .is_none_or(|since| since.elapsed() < self.timeout);
        let healthy = synced && (state.node_eligible || !for_traffic);
        let format = |time: SystemTime| jiff::Timestamp::try_from(time).map(|t| t.to_string());
        let body = serde_json::json!({
            "lastUpdated": state.last_updated.and_then(|time| format(time).ok()).unwrap_or_default(),
            "currentTime": format(SystemTime::now()).unwrap_or_default(),
            "nodeEligible": state.node_eligible,
        });
        (healthy, body.to_string())
    }
}

/// `/healthz` and `/livez`.
pub fn serve_health(
    listener: TcpListener,
    health: Arc<Health>,
    metrics: Arc<super::metrics::AgentMetrics>,
) -> JoinHandle<()> {
    let refused = metrics.http_refused.clone();
    spawn_server(
        listener,
        ServerLimits::default(),
        refused,
        move |request: Request<Incoming>, _peer| {
            let health = health.clone();
            let metrics = metrics.clone();
            async move {
                let path = request.uri().path();
                if path != "/healthz" && path != "/livez" {
                    return not_found();
                }
                let (healthy, body) = health.check(path == "/healthz");
                let status = if healthy {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                let counter = if path == "/healthz" {
                    &metrics.healthz
                } else {
                    &metrics.livez
                };
                counter.get_or_create(&[("code", status.as_u16())]).inc();
                reply(status, "application/json", body)
            }
        },
    )
}

/// What a healthCheckNodePort answers for: the Service and its endpoints on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthCheckTarget {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
}

/// One HTTP server per healthCheckNodePort, started and stopped as Services come and go, with
/// the local endpoint counts kept current.
pub struct HealthCheckPorts {
    bind_addresses: Vec<IpAddr>,
    servers: BTreeMap<u16, HealthCheckServer>,
    refused: HttpRefused,
}

/// A healthCheckNodePort's listeners (one per bind address) and what they answer.
struct HealthCheckServer {
    target: Arc<Mutex<HealthCheckTarget>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for HealthCheckServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Servers listen on every address, like kube-proxy's without `--nodeport-addresses`.
impl Default for HealthCheckPorts {
    fn default() -> Self {
        Self {
            bind_addresses: vec![IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)],
            servers: BTreeMap::new(),
            refused: HttpRefused::default(),
        }
    }
}

impl HealthCheckPorts {
    /// Counts the clients its servers cut off in `refused` (the agent's metric).
    pub fn counting_refused(mut self, refused: HttpRefused) -> Self {
        self.refused = refused;
        self
    }

    /// Listens on these addresses from now on (kube-proxy's with `--nodeport-addresses`: the
    /// node addresses that serve NodePorts); servers are restarted when they change.
    pub fn bind_to(&mut self, addresses: Vec<IpAddr>) {
        if addresses != self.bind_addresses {
            self.bind_addresses = addresses;
            self.servers.clear();
        }
    }

    /// The ports served now.
    pub fn ports(&self) -> Vec<u16> {
        self.servers.keys().copied().collect()
    }

    /// Makes the set of servers equal to `wanted` (port -> target).
    pub async fn sync(&mut self, wanted: &BTreeMap<u16, HealthCheckTarget>) {
        self.servers.retain(|port, _| wanted.contains_key(port));
        for (port, target) in wanted {
            if let Some(server) = self.servers.get(port) {
                if let Ok(mut current) = server.target.lock() {
                    *current = target.clone();
                }
                continue;
            }
            let shared = Arc::new(Mutex::new(target.clone()));
            let mut tasks = Vec::new();
            for address in &self.bind_addresses {
                match TcpListener::bind(SocketAddr::new(*address, *port)).await {
                    Ok(listener) => tasks.push(serve_health_check(
                        listener,
                        shared.clone(),
                        self.refused.clone(),
                    )),
                    // Tried again on the next sync.
                    Err(error) => {
                        warn!(%error, %address, port, "cannot serve a healthCheckNodePort")
                    }
                }
            }
            if tasks.len() == self.bind_addresses.len() {
                info!(port, service = %format!("{}/{}", target.namespace, target.name), "serving a healthCheckNodePort");
            }
            if !tasks.is_empty() {
                self.servers.insert(
                    *port,
                    HealthCheckServer {
                        target: shared,
                        tasks,
                    },
                );
            }
        }
    }
}

fn serve_health_check(
    listener: TcpListener,
    target: Arc<Mutex<HealthCheckTarget>>,
    refused: HttpRefused,
) -> JoinHandle<()> {
    spawn_server(
        listener,
        ServerLimits::default(),
        refused,
        move |_request: Request<Incoming>, _peer| {
            let target = target.lock().map(|t| t.clone()).unwrap_or_default();
            async move {
                let body = serde_json::json!({
                    "service": {"namespace": target.namespace, "name": target.name},
                    "localEndpoints": target.local_endpoints,
                    "serviceProxyHealthy": true,
                });
                let status = if target.local_endpoints > 0 {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                let mut response = reply(status, "application/json", body.to_string());
                let headers = response.headers_mut();
                headers.insert(
                    "X-Content-Type-Options",
                    hyper::header::HeaderValue::from_static("nosniff"),
                );
                if let Ok(weight) = target.local_endpoints.to_string().parse() {
                    headers.insert("X-Load-Balancing-Endpoint-Weight", weight);
                }
                response
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_addresses_are_read_as_kube_proxy_reads_them_and_refused_when_unbindable() {
        assert_eq!(bind_address("off", 10249).as_deref(), Ok("off"));
        assert_eq!(bind_address("", 10249).as_deref(), Ok(""));
        assert_eq!(
            bind_address("10.0.0.1:9000", 10249).as_deref(),
            Ok("10.0.0.1:9000")
        );
        assert_eq!(
            bind_address("10.0.0.1", 10249).as_deref(),
            Ok("10.0.0.1:10249")
        );
        assert_eq!(bind_address("::", 10256).as_deref(), Ok("[::]:10256"));
        assert_eq!(
            bind_address(":10256", 10249).as_deref(),
            Ok("0.0.0.0:10256")
        );
        assert_eq!(
            bind_address("fd00::1:10249", 10249).as_deref(),
            Ok("[fd00::1]:10249")
        );
        for unbindable in ["node1:10249", "0.0.0.0:", ":port", "10.0.0.1:70000", "[::1"] {
            let error = bind_address(unbindable, 10249).expect_err(unbindable);
            assert!(error.contains(unbindable), "{error}");
        }
    }

    #[test]
    fn health_turns_503_when_changes_wait_longer_than_the_timeout() {
        let health = Health::new(Duration::from_millis(50));
        // Queued at start: healthy until the timeout passes without a sync.
        assert!(health.check(true).0);
        std::thread::sleep(Duration::from_millis(80));
        assert!(!health.check(true).0, "never synced");
        health.updated();
        assert!(health.check(true).0);
        // Synced long ago and nothing pending: still healthy.
        std::thread::sleep(Duration::from_millis(80));
        assert!(health.check(true).0, "idle is healthy");
        health.queued();
        std::thread::sleep(Duration::from_millis(80));
        assert!(!health.check(true).0, "a change waits too long");
        let (_, body) = health.check(true);
        let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert!(
            body["lastUpdated"]
                .as_str()
                .is_some_and(|time| time.ends_with('Z'))
        );
    }

    #[test]
    fn a_node_being_deleted_fails_healthz_but_not_livez() {
        let health = Health::new(Duration::from_secs(60));
        health.updated();
        health.set_node_eligible(false);
        assert!(!health.check(true).0, "/healthz");
        assert!(health.check(false).0, "/livez");
        let (_, body) = health.check(true);
        assert!(body.contains("\"nodeEligible\":false"), "{body}");
        health.set_node_eligible(true);
        assert!(health.check(true).0);
    }
}
