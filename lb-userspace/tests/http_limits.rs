//! The agent's HTTP servers against greedy and slow clients, on loopback: a log-level body over
//! 4 KiB is refused without being read, a client that stalls in its headers or its body is cut
//! at the deadline (shortened here so the test takes seconds), and connections over the cap are
//! refused while the established ones are still answered, and one client address cannot take
//! every place; each cut-off counted by reason.

use std::{
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use lb_userspace::{
    logging::LogLevel,
    observe::{
        metrics::Metrics,
        serve::{MAX_BODY_BYTES, ServerLimits, serve_metrics_with_limits},
    },
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

/// Longer than any deadline below: a test that waits this long has failed.
const PATIENCE: Duration = Duration::from_secs(15);

fn log_level() -> LogLevel {
    static LOG_LEVEL: OnceLock<LogLevel> = OnceLock::new();
    LOG_LEVEL
        .get_or_init(|| lb_userspace::logging::init(false, "info").expect("log filter"))
        .clone()
}

/// A metrics server on a loopback port of its own with these limits; aborted on drop.
struct Server {
    address: std::net::SocketAddr,
    metrics: Arc<Metrics>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(limits: ServerLimits) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        // No pinned maps: /metrics would say so; these tests use /debug/log-level.
        let metrics = Arc::new(Metrics::new("/nonexistent/lb-http-limits".into()));
        let task = serve_metrics_with_limits(listener, metrics.clone(), Some(log_level()), limits);
        Self {
            address,
            metrics,
            task,
        }
    }

    /// `lb_http_refused_total{reason}`.
    fn refused(&self, reason: &'static str) -> u64 {
        self.metrics
            .agent()
            .http_refused
            .get_or_create(&[("reason", reason)])
            .get()
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.address).await.expect("connect")
    }

    /// A connection from another loopback address (all of 127.0.0.0/8 is this machine's).
    async fn connect_from(&self, source: std::net::Ipv4Addr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(std::net::SocketAddr::from((source, 0)))
            .expect("bind the source address");
        socket.connect(self.address).await.expect("connect")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn limits(header: Duration, body: Duration, connections: usize) -> ServerLimits {
    ServerLimits {
        header_read_timeout: header,
        body_read_timeout: body,
        max_connections: connections,
        // These clients all come from 127.0.0.1: only the test of the per-peer limit sets it.
        max_connections_per_peer: usize::MAX,
    }
}

/// Reads one response: its status, or None when the server closed (or reset) the connection
/// before one. Panics after [`PATIENCE`].
async fn read_status(stream: &mut TcpStream) -> Option<u16> {
    let read = async {
        let mut raw = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            if let Some(end) = raw.windows(4).position(|window| window == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..end]).to_string();
                let length: usize = head
                    .lines()
                    .find_map(|line| {
                        let (name, value) = line.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                while raw.len() < end + 4 + length {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => raw.extend_from_slice(&buffer[..n]),
                    }
                }
                return head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|code| code.parse().ok());
            }
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => raw.extend_from_slice(&buffer[..n]),
            }
        }
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("the server neither answered nor closed the connection")
}

/// Whether the server has closed the connection (EOF or reset), waiting up to [`PATIENCE`].
async fn closed(stream: &mut TcpStream) -> bool {
    let mut buffer = [0u8; 1024];
    let wait = async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(PATIENCE, wait).await.unwrap_or(false)
}

async fn get_log_level(stream: &mut TcpStream) -> Option<u16> {
    stream
        .write_all(b"GET /debug/log-level HTTP/1.1\r\nHost: lb\r\n\r\n")
        .await
        .ok()?;
    read_status(stream).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_level_body_over_4_kib_is_refused_without_being_read() {
    let server = Server::start(ServerLimits::default()).await;

    // Announced: refused on the headers, with almost all of the body never sent.
    let mut stream = server.connect().await;
    stream
        .write_all(b"PUT /debug/log-level HTTP/1.1\r\nHost: lb\r\nContent-Length: 1048576\r\n\r\n")
        .await
        .expect("write");
    stream.write_all(&[b' '; 1024]).await.expect("write");
    assert_eq!(read_status(&mut stream).await, Some(413));

    // Chunked, no length announced: refused once it passes the limit.
    let mut stream = server.connect().await;
    let chunk = vec![b' '; MAX_BODY_BYTES + 1];
    let mut request =
        b"PUT /debug/log-level HTTP/1.1\r\nHost: lb\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
    request.extend_from_slice(&chunk);
    request.extend_from_slice(b"\r\n");
    stream.write_all(&request).await.expect("write");
    assert_eq!(read_status(&mut stream).await, Some(413));

    // 4 KiB exactly is read (the filter, padded with spaces).
    let mut stream = server.connect().await;
    let body = format!("{:<width$}", "info", width = MAX_BODY_BYTES);
    stream
        .write_all(
            format!(
                "PUT /debug/log-level HTTP/1.1\r\nHost: lb\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .expect("write");
    assert_eq!(read_status(&mut stream).await, Some(200));
    assert_eq!(server.refused("body_too_large"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_in_its_body_gets_408_at_the_deadline() {
    let deadline = Duration::from_secs(1);
    let server = Server::start(limits(Duration::from_secs(10), deadline, 8)).await;
    let mut stream = server.connect().await;
    let started = Instant::now();
    stream
        .write_all(b"PUT /debug/log-level HTTP/1.1\r\nHost: lb\r\nContent-Length: 10\r\n\r\nin")
        .await
        .expect("write");
    assert_eq!(read_status(&mut stream).await, Some(408));
    println!("stalled body answered 408 after {:?}", started.elapsed());
    assert!(started.elapsed() >= deadline, "not before the deadline");
    assert_eq!(server.refused("body_timeout"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_its_headers_slowly_and_stalls_is_disconnected_at_the_deadline() {
    let deadline = Duration::from_secs(1);
    let server = Server::start(limits(deadline, Duration::from_secs(10), 8)).await;

    // A byte every 100 ms, then silence: the deadline is for the whole header, not per byte.
    let mut stream = server.connect().await;
    let started = Instant::now();
    for byte in b"GET /debug/log-level HTTP/1.1\r\nHost: lb\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa" {
        if stream.write_all(&[*byte]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(closed(&mut stream).await, "a slow client is disconnected");
    let after = started.elapsed();
    println!("slow header client disconnected after {after:?}");
    assert!(after >= deadline, "not before the deadline");

    // Connected and silent from the start.
    let mut silent = server.connect().await;
    assert!(closed(&mut silent).await, "a silent client is disconnected");

    // The server still answers others.
    let mut stream = server.connect().await;
    assert_eq!(get_log_level(&mut stream).await, Some(200));
    assert_eq!(server.refused("header_timeout"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_refused_while_established_ones_are_answered() {
    let cap = 4;
    let server = Server::start(limits(PATIENCE * 2, PATIENCE * 2, cap)).await;
    let mut established = Vec::new();
    for _ in 0..cap {
        let mut stream = server.connect().await;
        assert_eq!(get_log_level(&mut stream).await, Some(200));
        established.push(stream);
    }

    // One more: 503 and closed, without a request.
    let mut extra = server.connect().await;
    assert_eq!(read_status(&mut extra).await, Some(503));
    assert!(closed(&mut extra).await);
    assert_eq!(server.refused("too_many_connections"), 1);

    // The established ones are still served (keep-alive).
    for stream in &mut established {
        assert_eq!(get_log_level(stream).await, Some(200));
    }

    // One of them gone, a new client gets its place (once the server has seen the close).
    drop(established.pop());
    let give_up = Instant::now() + PATIENCE;
    loop {
        let mut stream = server.connect().await;
        match get_log_level(&mut stream).await {
            Some(200) => break,
            status => {
                assert!(Instant::now() < give_up, "no place freed: {status:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_cannot_take_every_place_from_the_others() {
    let server = Server::start(ServerLimits {
        max_connections_per_peer: 2,
        ..limits(PATIENCE * 2, PATIENCE * 2, 8)
    })
    .await;
    // A client holding connections open, as a slow or hostile one does.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = server.connect().await;
        assert_eq!(get_log_level(&mut stream).await, Some(200));
        held.push(stream);
    }
    let mut third = server.connect().await;
    assert_eq!(read_status(&mut third).await, Some(503));
    assert!(closed(&mut third).await);
    assert_eq!(server.refused("too_many_connections_from_peer"), 1);
    assert_eq!(server.refused("too_many_connections"), 0);

    // Another address (the kubelet's probe, Prometheus) is still served, meanwhile.
    let mut other = server
        .connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2))
        .await;
    assert_eq!(get_log_level(&mut other).await, Some(200));
    for stream in &mut held {
        assert_eq!(get_log_level(stream).await, Some(200));
    }
}
