//! `lab-peer`: the servers and clients of the lab. Servers answer every request with their name and
//! the client address they saw; clients count what came back and print a JSON report.
//! Meant to run inside lab namespaces only (the lab starts it there).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use clap::{Parser, Subcommand};
use lab::peer::{ClientReport, parse_reply, reply};

#[derive(Parser)]
#[command(about = "TCP/UDP peers for the lab (run inside lab namespaces)")]
struct Cli {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Answer TCP connections and UDP datagrams; prints `ready` once listening.
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        tcp: Option<SocketAddr>,
        #[arg(long)]
        udp: Option<SocketAddr>,
    },
    /// One TCP connection per request (connect, send a line, read the reply, close), or all
    /// requests over one connection with --one-flow.
    Tcp(ClientArgs),
    /// One datagram per request, each from a new socket unless --one-flow.
    Udp(ClientArgs),
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
}

const MAX_ERROR_SAMPLES: usize = 5;

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Mode::Serve { name, tcp, udp } => serve(name, tcp, udp),
        Mode::Tcp(args) => print_report(&tcp_client(&args)),
        Mode::Udp(args) => print_report(&udp_client(&args)?),
    }
}

fn print_report(report: &ClientReport) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(report)?);
    Ok(())
}

fn serve(name: String, tcp: Option<SocketAddr>, udp: Option<SocketAddr>) -> anyhow::Result<()> {
    let listener = tcp.map(TcpListener::bind).transpose()?;
    let socket = udp.map(UdpSocket::bind).transpose()?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut threads = Vec::new();
    if let Some(socket) = socket {
        let name = name.clone();
        threads.push(std::thread::spawn(move || serve_udp(&name, &socket)));
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
        line?;
        writer.write_all(reply(name, peer).as_bytes())?;
    }
    Ok(())
}

fn serve_udp(name: &str, socket: &UdpSocket) {
    let mut buf = [0u8; 2048];
    while let Ok((_, peer)) = socket.recv_from(&mut buf) {
        let _ = socket.send_to(reply(name, peer).as_bytes(), peer);
    }
}

/// One exchange's outcome: the reply text and the peer the client's socket API named.
type Exchange = std::io::Result<(String, SocketAddr)>;

fn record(report: &mut ClientReport, result: Exchange) {
    report.attempts += 1;
    let parsed = result
        .map_err(|err| err.to_string())
        .and_then(|(text, peer)| {
            parse_reply(&text)
                .map(|(server, ip)| (server.to_owned(), ip.to_owned(), peer))
                .ok_or_else(|| format!("malformed reply {text:?}"))
        });
    match parsed {
        Ok((server, ip, peer)) => {
            report.ok += 1;
            *report.by_server.entry(server.clone()).or_default() += 1;
            *report.peers_seen.entry(ip).or_default() += 1;
            *report.peer_names.entry(peer.to_string()).or_default() += 1;
            report.last_server = Some(server);
        }
        Err(err) => {
            report.errors += 1;
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

fn tcp_client(args: &ClientArgs) -> ClientReport {
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut report = ClientReport::default();
    if args.one_flow {
        match tcp_connect(args.to, timeout) {
            Ok(stream) => {
                let mut reader = BufReader::new(stream.try_clone().expect("clone a TcpStream"));
                for _ in 0..args.requests {
                    record(&mut report, tcp_exchange(&stream, &mut reader));
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
        let result = tcp_connect(args.to, timeout).and_then(|stream| {
            let mut reader = BufReader::new(stream.try_clone()?);
            tcp_exchange(&stream, &mut reader)
        });
        record(&mut report, result);
        pause(args);
    }
    report
}

fn tcp_connect(to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&to, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    Ok(stream)
}

fn tcp_exchange(mut stream: &TcpStream, reader: &mut BufReader<TcpStream>) -> Exchange {
    stream.write_all(b"hello\n")?;
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    Ok((line, stream.peer_addr()?))
}

fn udp_client(args: &ClientArgs) -> anyhow::Result<ClientReport> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut report = ClientReport::default();
    let shared = if args.one_flow {
        Some(udp_socket(args, timeout)?)
    } else {
        None
    };
    for _ in 0..args.requests {
        let result = match &shared {
            Some(socket) => udp_exchange(socket, args),
            None => udp_socket(args, timeout).and_then(|socket| udp_exchange(&socket, args)),
        };
        record(&mut report, result);
        pause(args);
    }
    Ok(report)
}

fn udp_socket(args: &ClientArgs, timeout: Duration) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    if !args.unconnected {
        socket.connect(args.to)?;
    }
    socket.set_read_timeout(Some(timeout))?;
    Ok(socket)
}

fn udp_exchange(socket: &UdpSocket, args: &ClientArgs) -> Exchange {
    let mut buf = [0u8; 2048];
    let (len, peer) = if args.unconnected {
        socket.send_to(b"hello", args.to)?;
        socket.recv_from(&mut buf)?
    } else {
        socket.send(b"hello")?;
        (socket.recv(&mut buf)?, socket.peer_addr()?)
    };
    Ok((String::from_utf8_lossy(&buf[..len]).into_owned(), peer))
}
