//! `lab-peer`: the servers and clients of the lab. Servers answer every request with their name and
//! the client address they saw; clients count what came back and print a JSON report.
//! Meant to run inside lab namespaces only (the lab starts it there).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::Barrier,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use lab::peer::{ClientReport, LatencySummary, TimelineEntry, error_kind, parse_reply, reply};

#[derive(Parser)]
#[command(about = "TCP/UDP/SCTP peers for the lab (run inside lab namespaces)")]
struct Cli {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Answer TCP connections, UDP datagrams and SCTP associations (one-to-one style); prints
    /// `ready` once listening.
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        tcp: Option<SocketAddr>,
        #[arg(long)]
        udp: Option<SocketAddr>,
        #[arg(long)]
        sctp: Option<SocketAddrV4>,
    },
    /// One TCP connection per request (connect, send a line, read the reply, close), or all
    /// requests over one connection with --one-flow.
    Tcp(ClientArgs),
    /// One datagram per request, each from a new socket unless --one-flow.
    Udp(ClientArgs),
    /// As tcp, over SCTP associations (one-to-one style sockets).
    Sctp(ClientArgs),
    /// Benchmark load over TCP: --clients threads for --duration-ms, each doing
    /// connect/request/close per request, or request/response over one connection with
    /// --one-flow. The report adds the rate and per-request latency percentiles (`latency`).
    Load(LoadArgs),
    /// Sends one TCP RST (with --fin, a FIN+ACK) from --from to --to with sequence number --seq
    /// through a raw IP socket, its source spoofed: what an attacker off the path sends. Prints
    /// `sent`.
    Rst {
        #[arg(long)]
        from: SocketAddrV4,
        #[arg(long)]
        to: SocketAddrV4,
        #[arg(long)]
        seq: u32,
        #[arg(long)]
        fin: bool,
    },
    /// Connects to --to over TCP, sends --bytes of data (no newline: the server only reads),
    /// waits until the server has acknowledged all of it, then aborts the connection with a RST
    /// (SO_LINGER 0) whose sequence number is the one the server expects next. Prints
    /// `{"sent": N}`.
    Upload {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: usize,
    },
    /// Sends --count TCP SYNs to --to through a raw IP socket, each from another (address, port)
    /// of --sources addresses from --first-source on (spoofed: a SYN flood). Prints
    /// `{"sent": N}`.
    SynFlood {
        #[arg(long)]
        to: SocketAddrV4,
        #[arg(long)]
        first_source: std::net::Ipv4Addr,
        #[arg(long, default_value_t = 1)]
        sources: u32,
        #[arg(long)]
        count: u64,
        /// Start at this pair of the sequence (see `syn_flood`).
        #[arg(long, default_value_t = 0)]
        offset: u64,
    },
}

#[derive(clap::Args)]
struct LoadArgs {
    #[arg(long)]
    to: SocketAddr,
    /// Parallel clients, one thread each.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    #[arg(long, default_value_t = 2000)]
    duration_ms: u64,
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Request/response over one connection per client instead of connect/request/close.
    #[arg(long)]
    one_flow: bool,
    /// Pause of each client between requests (0: none): a steady load rather than the most
    /// the machine can do.
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
}

#[derive(clap::Args)]
struct ClientArgs {
    #[arg(long)]
    to: SocketAddr,
    #[arg(long, default_value_t = 1)]
    requests: u64,
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// One socket (UDP: one source port; TCP: one connection) for every request.
    #[arg(long)]
    one_flow: bool,
    /// UDP: sendto()/recvfrom() on an unconnected socket.
    #[arg(long)]
    unconnected: bool,
    /// Pause between requests.
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// UDP with --one-flow: after a request that failed with a socket error (not a timeout),
    /// replace the socket by a newly connected one (as an application does when its socket is
    /// aborted); the report gets a timeline.
    #[arg(long, requires = "one_flow")]
    reconnect: bool,
    /// UDP: request size in bytes (0: a short request); the server answers with as many.
    #[arg(long, default_value_t = 0)]
    payload_bytes: usize,
    /// TCP: ask the server to follow each reply line with a line of this many bytes (0: none),
    /// so that it sends full-sized segments while the requests stay small.
    #[arg(long, default_value_t = 0)]
    answer_bytes: usize,
    /// A file to create at the first answered request, for whoever waits for the client to be
    /// under way.
    #[arg(long)]
    ready_file: Option<std::path::PathBuf>,
    /// TCP: connect from this source port (bound with SO_REUSEADDR) instead of one the kernel
    /// picks; UDP: send from it (bound).
    #[arg(long)]
    source_port: Option<u16>,
    /// TCP: each request asks the server to answer this many ms later, and the client shuts
    /// its side down (a half-close, as a client that sends its request with shutdown(SHUT_WR))
    /// before it waits for the answer.
    #[arg(long)]
    half_close_answer_ms: Option<u64>,
    /// With --one-flow: after the first answered request, wait until this file exists before
    /// the next one (a test changes something under a flow that is known to be there).
    #[arg(long, requires = "one_flow")]
    go_file: Option<std::path::PathBuf>,
    /// UDP with --unconnected and --go-file: once the file exists, send the remaining requests
    /// here, from the same socket.
    #[arg(long, requires_all = ["unconnected", "go_file"])]
    then_to: Option<SocketAddr>,
}

/// The client's --half-close-answer-ms, set once at start.
static HALF_CLOSE_ANSWER_MS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// The client's --ready-file, set once at start.
static READY_FILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

const MAX_ERROR_SAMPLES: usize = 5;

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Mode::Serve {
            name,
            tcp,
            udp,
            sctp,
        } => serve(name, tcp, udp, sctp),
        Mode::Tcp(args) => {
            set_ready_file(&args);
            if let Some(delay_ms) = args.half_close_answer_ms {
                let _ = HALF_CLOSE_ANSWER_MS.set(delay_ms);
            }
            let source_port = args.source_port;
            print_report(&stream_client(&args, |to, timeout| {
                tcp_connect_from(to, timeout, source_port)
            }))
        }
        Mode::Udp(args) => {
            set_ready_file(&args);
            print_report(&udp_client(&args)?)
        }
        Mode::Sctp(args) => {
            set_ready_file(&args);
            print_report(&stream_client(&args, sctp_connect))
        }
        Mode::Load(args) => print_report(&load(&args)),
        Mode::SynFlood {
            to,
            first_source,
            sources,
            count,
            offset,
        } => {
            let sent = syn_flood(to, first_source, sources, count, offset)?;
            println!("{}", serde_json::json!({ "sent": sent }));
            Ok(())
        }
        Mode::Upload { to, bytes } => {
            upload_then_abort(to, bytes)?;
            println!("{}", serde_json::json!({ "sent": bytes }));
            Ok(())
        }
        Mode::Rst { from, to, seq, fin } => {
            send_spoofed_close(from, to, seq, fin)?;
            println!("sent");
            Ok(())
        }
    }
}

fn upload_then_abort(to: SocketAddr, bytes: usize) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    // A stalled upload (its segments lost on the way) fails instead of blocking for good.
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    stream
        .write_all(&vec![b'u'; bytes])
        .map_err(|error| anyhow::anyhow!("sending the upload: {error}"))?;
    let fd = stream.as_raw_fd();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut unacknowledged: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (SIOCOUTQ for a TCP socket) writes one int: the bytes sent and not
        // yet acknowledged.
        if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut unacknowledged) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        if unacknowledged == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{unacknowledged} bytes still unacknowledged after 10 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let abort = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a linger struct of the size given, for this socket.
    let set = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const abort).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    drop(stream);
    Ok(())
}

fn send_spoofed_close(
    from: SocketAddrV4,
    to: SocketAddrV4,
    seq: u32,
    fin: bool,
) -> anyhow::Result<()> {
    let mut packet = Vec::new();
    let segment = etherparse::PacketBuilder::ipv4(from.ip().octets(), to.ip().octets(), 64).tcp(
        from.port(),
        to.port(),
        seq,
        65535,
    );
    if fin {
        segment.fin().ack(0).write(&mut packet, &[])?;
    } else {
        segment.rst().write(&mut packet, &[])?;
    }
    send_raw(&raw_socket()?, to, &packet)
}

/// `lab-peer syn-flood`: `count` SYNs to `to`, the `offset`th and following of the source
/// (address, port) pairs of `sources` addresses from `first_source` on (addresses no host has:
/// the answers go nowhere), ports 1024 and up: no two SYNs of one flood, or of floods with
/// offsets `count` apart, share a flow. Returns how many were sent.
fn syn_flood(
    to: SocketAddrV4,
    first_source: std::net::Ipv4Addr,
    sources: u32,
    count: u64,
    offset: u64,
) -> anyhow::Result<u64> {
    const PORTS: u64 = 65536 - 1024;
    let socket = raw_socket()?;
    let mut packet = Vec::with_capacity(64);
    for index in offset..offset + count {
        let source = u32::from(first_source) + ((index / PORTS) % u64::from(sources.max(1))) as u32;
        let port = 1024 + (index % PORTS) as u16;
        packet.clear();
        etherparse::PacketBuilder::ipv4(source.to_be_bytes(), to.ip().octets(), 64)
            .tcp(port, to.port(), index as u32, 64240)
            .syn()
            .write(&mut packet, &[])?;
        send_raw(&socket, to, &packet)?;
    }
    Ok(count)
}

fn raw_socket() -> anyhow::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    // IPPROTO_RAW implies IP_HDRINCL: the kernel sends the header as built (raw(7)).
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    anyhow::ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a socket this process just opened and owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Sends one IPv4 packet, header included, through a raw socket.
fn send_raw(socket: &std::os::fd::OwnedFd, to: SocketAddrV4, packet: &[u8]) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    // A raw socket takes no port: the destination's is in the header built above.
    let destination = SocketAddrV4::new(*to.ip(), 0);
    // SAFETY: the buffer and address are valid for the call and their lengths are theirs.
    let sent = with_sockaddr(destination, |address, len| unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            address,
            len,
        )
    });
    anyhow::ensure!(
        sent == packet.len() as isize,
        "sendto: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

fn print_report(report: &ClientReport) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(report)?);
    Ok(())
}

fn serve(
    name: String,
    tcp: Option<SocketAddr>,
    udp: Option<SocketAddr>,
    sctp: Option<SocketAddrV4>,
) -> anyhow::Result<()> {
    let listener = tcp.map(TcpListener::bind).transpose()?;
    let socket = udp.map(UdpSocket::bind).transpose()?;
    let sctp_listener = sctp.map(sctp_listen).transpose()?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut threads = Vec::new();
    if let Some(socket) = socket {
        let name = name.clone();
        threads.push(std::thread::spawn(move || serve_udp(&name, &socket)));
    }
    if let Some(listener) = sctp_listener {
        let name = name.clone();
        threads.push(std::thread::spawn(move || serve_tcp(&name, &listener)));
    }
    if let Some(listener) = listener {
        threads.push(std::thread::spawn(move || serve_tcp(&name, &listener)));
    }
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

fn serve_tcp(name: &str, listener: &TcpListener) {
    for stream in listener.incoming().flatten() {
        let name = name.to_owned();
        std::thread::spawn(move || {
            let _ = answer_tcp(&name, stream);
        });
    }
}

/// Answers every line of one connection until the client closes it.
fn answer_tcp(name: &str, stream: TcpStream) -> std::io::Result<()> {
    let peer = stream.peer_addr()?;
    let mut writer = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        // "later D N": the answer D ms from now (the client has half-closed meanwhile), with N
        // more bytes as "hello N" has.
        let later = line
            .strip_prefix("later ")
            .and_then(|rest| rest.split_once(' '));
        if let Some(delay_ms) = later.and_then(|(delay, _)| delay.parse().ok()) {
            std::thread::sleep(Duration::from_millis(delay_ms));
        }
        writer.write_all(reply(name, peer).as_bytes())?;
        // "hello N": N more bytes, as a line of their own.
        let more = line
            .strip_prefix("hello ")
            .or(later.map(|(_, bytes)| bytes))
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|bytes| *bytes > 0);
        if let Some(bytes) = more {
            let mut filler = padded(Vec::new(), bytes);
            filler.push(b'\n');
            writer.write_all(&filler)?;
        }
    }
    Ok(())
}

/// Answers each datagram with the reply line, padded to the request's size when that is larger
/// (a large request gets an equally large, IP-fragmented, answer).
fn serve_udp(name: &str, socket: &UdpSocket) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while let Ok((len, peer)) = socket.recv_from(&mut buf) {
        let _ = socket.send_to(&padded(reply(name, peer).into_bytes(), len), peer);
    }
}

const MAX_DATAGRAM: usize = 65_536;

/// `message` followed by filler up to `len` bytes (as it is when already that long).
fn padded(mut message: Vec<u8>, len: usize) -> Vec<u8> {
    if message.len() < len {
        message.resize(len, b'.');
    }
    message
}

/// One exchange's outcome: the reply text and the peer the client's socket API named.
type Exchange = std::io::Result<(String, SocketAddr)>;

fn set_ready_file(args: &ClientArgs) {
    if let Some(path) = &args.ready_file {
        let _ = READY_FILE.set(path.clone());
    }
}

fn record(report: &mut ClientReport, result: Exchange) {
    report.attempts += 1;
    let parsed = result
        .map_err(|err| (error_kind(&err), err.to_string()))
        .and_then(|(text, peer)| {
            parse_reply(&text)
                .map(|(server, ip, seen_as)| {
                    (server.to_owned(), ip.to_owned(), seen_as.to_owned(), peer)
                })
                .ok_or_else(|| ("malformed", format!("malformed reply {text:?}")))
        });
    match parsed {
        Ok((server, ip, seen_as, peer)) => {
            report.ok += 1;
            if report.ok == 1
                && let Some(path) = READY_FILE.get()
            {
                // A waiter that cannot see the file times out and says so.
                let _ = std::fs::write(path, b"answered\n");
            }
            *report.by_server.entry(server.clone()).or_default() += 1;
            *report.peers_seen.entry(ip).or_default() += 1;
            *report.seen_as.entry(seen_as).or_default() += 1;
            *report.peer_names.entry(peer.to_string()).or_default() += 1;
            report.last_server = Some(server);
        }
        Err((kind, err)) => {
            report.errors += 1;
            *report.error_kinds.entry(kind.to_owned()).or_default() += 1;
            if report.error_samples.len() < MAX_ERROR_SAMPLES {
                report.error_samples.push(err);
            }
        }
    }
}

fn pause(args: &ClientArgs) {
    if args.interval_ms > 0 {
        std::thread::sleep(Duration::from_millis(args.interval_ms));
    }
}

/// A TCP or SCTP client: `connect` opens one connection (association).
fn stream_client(
    args: &ClientArgs,
    connect: impl Fn(SocketAddr, Duration) -> std::io::Result<TcpStream>,
) -> ClientReport {
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut report = ClientReport::default();
    if args.one_flow {
        match connect(args.to, timeout) {
            Ok(stream) => {
                let mut reader = BufReader::new(stream.try_clone().expect("clone a TcpStream"));
                let mut waited = false;
                for _ in 0..args.requests {
                    record(
                        &mut report,
                        tcp_exchange(&stream, &mut reader, args.answer_bytes),
                    );
                    if let Err(error) = first_answer_now(args, &report, &mut waited) {
                        report.errors += 1;
                        report.error_samples.push(error.to_string());
                        break;
                    }
                    pause(args);
                }
            }
            Err(err) => {
                for _ in 0..args.requests {
                    record(
                        &mut report,
                        Err(std::io::Error::new(err.kind(), err.to_string())),
                    );
                }
            }
        }
        return report;
    }
    for _ in 0..args.requests {
        let result = connect(args.to, timeout).and_then(|stream| {
            let mut reader = BufReader::new(stream.try_clone()?);
            tcp_exchange(&stream, &mut reader, args.answer_bytes)
        });
        record(&mut report, result);
        pause(args);
    }
    report
}

fn tcp_connect(to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    tcp_connect_from(to, timeout, None)
}

/// A TCP connection to `to`, from `source_port` when given.
fn tcp_connect_from(
    to: SocketAddr,
    timeout: Duration,
    source_port: Option<u16>,
) -> std::io::Result<TcpStream> {
    let stream = match source_port {
        None => TcpStream::connect_timeout(&to, timeout)?,
        Some(port) => {
            use socket2::{Domain, Protocol, Socket, Type};
            let socket = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
            socket.set_reuse_address(true)?;
            let any: std::net::IpAddr = if to.is_ipv6() {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            };
            socket.bind(&SocketAddr::new(any, port).into())?;
            socket.connect_timeout(&to.into(), timeout)?;
            socket.into()
        }
    };
    stream.set_read_timeout(Some(timeout))?;
    Ok(stream)
}

/// An SCTP one-to-one style socket (SOCK_STREAM, IPPROTO_SCTP): it accepts, reads and writes as
/// a TCP socket does, so that std's TcpListener and TcpStream can drive it.
fn sctp_socket() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            libc::IPPROTO_SCTP,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a socket this process just opened and owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Calls `call` with `addr` as a `sockaddr` pointer and its length, as bind(2) and connect(2)
/// take it.
fn with_sockaddr<T>(
    addr: SocketAddrV4,
    call: impl FnOnce(*const libc::sockaddr, libc::socklen_t) -> T,
) -> T {
    let address = sockaddr_in(addr);
    call(
        std::ptr::from_ref(&address).cast(),
        size_of::<libc::sockaddr_in>() as libc::socklen_t,
    )
}

/// Checks a libc call's return value.
fn os_result(result: libc::c_int) -> std::io::Result<()> {
    if result < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn sctp_listen(addr: SocketAddrV4) -> std::io::Result<TcpListener> {
    use std::os::fd::AsRawFd as _;
    let socket = sctp_socket()?;
    // SAFETY: the address is valid for the call and its length is its own.
    os_result(with_sockaddr(addr, |address, len| unsafe {
        libc::bind(socket.as_raw_fd(), address, len)
    }))?;
    // SAFETY: a bound socket this process owns.
    os_result(unsafe { libc::listen(socket.as_raw_fd(), 128) })?;
    Ok(TcpListener::from(socket))
}

/// Opens an SCTP association to `to` (IPv4), waiting at most `timeout` for it (SO_SNDTIMEO,
/// which sctp_connect honours as connect(2) does for TCP).
fn sctp_connect(to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    use std::os::fd::AsRawFd as _;
    let SocketAddr::V4(to) = to else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the lab's SCTP client speaks IPv4",
        ));
    };
    let socket = sctp_socket()?;
    let limit = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: the option value is valid for the call and its length is its own.
    os_result(unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            std::ptr::from_ref(&limit).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    })?;
    // SAFETY: as for bind above.
    os_result(with_sockaddr(to, |address, len| unsafe {
        libc::connect(socket.as_raw_fd(), address, len)
    }))?;
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(timeout))?;
    Ok(stream)
}

fn tcp_exchange(
    mut stream: &TcpStream,
    reader: &mut BufReader<TcpStream>,
    answer_bytes: usize,
) -> Exchange {
    // Before the exchange: a half-closed connection that got its answer may be closed by then.
    let peer = stream.peer_addr()?;
    if let Some(delay_ms) = HALF_CLOSE_ANSWER_MS.get() {
        stream.write_all(format!("later {delay_ms} {answer_bytes}\n").as_bytes())?;
        stream.shutdown(std::net::Shutdown::Write)?;
    } else if answer_bytes == 0 {
        stream.write_all(b"hello\n")?;
    } else {
        stream.write_all(format!("hello {answer_bytes}\n").as_bytes())?;
    }
    let line = read_line(reader)?;
    if answer_bytes > 0 && read_line(reader)?.trim_end().len() != answer_bytes {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "a short answer",
        ));
    }
    Ok((line, peer))
}

fn read_line(reader: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    Ok(line)
}

fn udp_client(args: &ClientArgs) -> anyhow::Result<ClientReport> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut report = ClientReport::default();
    let mut shared = if args.one_flow {
        Some(udp_socket(args, timeout)?)
    } else {
        None
    };
    let mut to = args.to;
    let mut waited = false;
    for _ in 0..args.requests {
        let started_ms = unix_ms();
        let result = match &shared {
            Some(socket) => udp_exchange(socket, args, to),
            None => udp_socket(args, timeout).and_then(|socket| udp_exchange(&socket, args, to)),
        };
        // A timeout keeps the socket, as an application waiting on a slow or silent server
        // does; a socket error (an abort) replaces it.
        let failed = result
            .as_ref()
            .is_err_and(|error| error_kind(error) != "timeout");
        if args.reconnect {
            let server = result
                .as_ref()
                .ok()
                .and_then(|(text, _)| parse_reply(text))
                .map(|(server, _, _)| server.to_owned());
            report.timeline.push(TimelineEntry { started_ms, server });
        }
        record(&mut report, result);
        if first_answer_now(args, &report, &mut waited)? {
            to = args.then_to.unwrap_or(to);
        }
        if failed
            && args.reconnect
            && let Some(socket) = &mut shared
        {
            *socket = udp_socket(args, timeout)?;
        }
        pause(args);
    }
    Ok(report)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

fn udp_socket(args: &ClientArgs, timeout: Duration) -> std::io::Result<UdpSocket> {
    // An IPv6 destination (an IPv4-mapped one included) needs an AF_INET6 socket.
    let unspecified: std::net::IpAddr = if args.to.is_ipv6() {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind((unspecified, args.source_port.unwrap_or(0)))?;
    if !args.unconnected {
        socket.connect(args.to)?;
    }
    socket.set_read_timeout(Some(timeout))?;
    Ok(socket)
}

/// Whether the request just recorded was the first answered one, with a --go-file waited for
/// (once: `waited`).
fn first_answer_now(
    args: &ClientArgs,
    report: &ClientReport,
    waited: &mut bool,
) -> anyhow::Result<bool> {
    let Some(go_file) = &args.go_file else {
        return Ok(false);
    };
    if *waited || report.ok != 1 {
        return Ok(false);
    }
    *waited = true;
    wait_for_file(go_file)?;
    Ok(true)
}

/// Waits (for at most a minute) until `path` exists.
fn wait_for_file(path: &std::path::Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// One request and its answer: sent to `to` on an unconnected socket, on the socket's own peer
/// otherwise.
fn udp_exchange(socket: &UdpSocket, args: &ClientArgs, to: SocketAddr) -> Exchange {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let request = padded(b"hello".to_vec(), args.payload_bytes);
    let (len, peer) = if args.unconnected {
        socket.send_to(&request, to)?;
        socket.recv_from(&mut buf)?
    } else {
        socket.send(&request)?;
        (socket.recv(&mut buf)?, socket.peer_addr()?)
    };
    if args.payload_bytes > 0 && len != args.payload_bytes {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "an answer of {len} bytes to a request of {}",
                args.payload_bytes
            ),
        ));
    }
    Ok((String::from_utf8_lossy(&buf[..len]).into_owned(), peer))
}

/// `lab-peer load`: every client connects (--one-flow) and waits for the others, then all run
/// until the deadline; a request's latency is connect + request line + reply + close, or request
/// line + reply on the client's one connection.
fn load(args: &LoadArgs) -> ClientReport {
    let clients = args.clients.max(1);
    let timeout = Duration::from_millis(args.timeout_ms);
    let duration = Duration::from_millis(args.duration_ms);
    let barrier = Barrier::new(clients + 1);
    let (results, elapsed) = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..clients)
            .map(|_| scope.spawn(|| load_client(args, timeout, duration, &barrier)))
            .collect();
        barrier.wait();
        let started = Instant::now();
        let results: Vec<_> = threads
            .into_iter()
            .map(|thread| thread.join().expect("load client thread"))
            .collect();
        (results, started.elapsed())
    });
    let mut report = ClientReport::default();
    let mut latencies = Vec::new();
    for (part, part_latencies) in results {
        merge(&mut report, part);
        latencies.extend(part_latencies);
    }
    latencies.sort_unstable();
    let rank = |q: f64| -> u64 {
        if latencies.is_empty() {
            return 0;
        }
        let index = ((q * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
        latencies[index - 1]
    };
    let elapsed_ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX).max(1);
    report.latency = Some(LatencySummary {
        clients: clients as u64,
        elapsed_ns,
        rate_per_s: (report.ok as f64 * 1e9 / elapsed_ns as f64).round() as u64,
        p50_ns: rank(0.50),
        p90_ns: rank(0.90),
        p99_ns: rank(0.99),
        max_ns: latencies.last().copied().unwrap_or(0),
        mean_ns: if latencies.is_empty() {
            0
        } else {
            latencies.iter().sum::<u64>() / latencies.len() as u64
        },
    });
    report
}

/// One client of [`load`]: its report and the latency (ns) of each successful request.
fn load_client(
    args: &LoadArgs,
    timeout: Duration,
    duration: Duration,
    barrier: &Barrier,
) -> (ClientReport, Vec<u64>) {
    let mut report = ClientReport::default();
    let mut latencies = Vec::new();
    let connection = if args.one_flow {
        let connected = tcp_connect(args.to, timeout).and_then(|stream| {
            stream.set_nodelay(true)?;
            let reader = BufReader::new(stream.try_clone()?);
            Ok((stream, reader))
        });
        match connected {
            Ok(connection) => Some(connection),
            Err(err) => {
                record(&mut report, Err(err));
                barrier.wait();
                return (report, latencies);
            }
        }
    } else {
        None
    };
    let mut connection = connection;
    barrier.wait();
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        let started = Instant::now();
        let result = match &mut connection {
            Some((stream, reader)) => tcp_exchange(stream, reader, 0),
            None => tcp_connect(args.to, timeout).and_then(|stream| {
                stream.set_nodelay(true)?;
                let mut reader = BufReader::new(stream.try_clone()?);
                tcp_exchange(&stream, &mut reader, 0)
                // Both handles drop here: the close is part of the request's time.
            }),
        };
        let latency = started.elapsed();
        let ok = result.is_ok();
        let errors_before = report.errors;
        record(&mut report, result);
        if ok && report.errors == errors_before {
            latencies.push(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
        } else if connection.is_some() {
            // A broken connection stays broken: stop this client rather than spin on errors.
            break;
        }
        if args.interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
    }
    (report, latencies)
}

fn merge(into: &mut ClientReport, part: ClientReport) {
    into.attempts += part.attempts;
    into.ok += part.ok;
    into.errors += part.errors;
    for (key, count) in part.by_server {
        *into.by_server.entry(key).or_default() += count;
    }
    for (key, count) in part.peers_seen {
        *into.peers_seen.entry(key).or_default() += count;
    }
    for (key, count) in part.peer_names {
        *into.peer_names.entry(key).or_default() += count;
    }
    for (key, count) in part.seen_as {
        *into.seen_as.entry(key).or_default() += count;
    }
    for (key, count) in part.error_kinds {
        *into.error_kinds.entry(key).or_default() += count;
    }
    if part.last_server.is_some() {
        into.last_server = part.last_server;
    }
    for sample in part.error_samples {
        if into.error_samples.len() < MAX_ERROR_SAMPLES {
            into.error_samples.push(sample);
        }
    }
}
