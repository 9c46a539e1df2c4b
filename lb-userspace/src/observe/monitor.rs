//! `lb monitor`: the datapath's events as they happen, one line each (or one JSON object per
//! line). While it runs the monitor holds the control cell ([`MonitorControlCell`]), which turns
//! on the programs' reports of the kinds it asked for; it clears the cell when it exits, and the
//! agent clears it after a monitor that died. The only writer under `observe`, and of that cell
//! alone.

use std::{
    collections::HashMap,
    io::Write as _,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use lb_common::{
    Event, Frontend4Key, map_names,
    monitor::{MonitorEvent, kind, program},
    proto, scope,
};
use serde::Serialize;
use tokio::io::unix::AsyncFd;

use crate::{
    compile::model::{IpCidr, ipv6_of_words},
    datapath::{
        bpf_obj::Access,
        maps::{Maps, open_map},
        monitor_control::{Claim, HEARTBEAT_EVERY, MonitorControlCell, Owner, now_ns},
    },
};

/// What to watch and how to print it.
pub struct MonitorOptions {
    pub pin_dir: PathBuf,
    /// [`kind`] bits.
    pub kinds: u32,
    /// Only events of services whose name is this (`namespace/name`, or the full name of
    /// `lb services`, `namespace/name:port-name/PROTO` with its scope).
    pub service: Option<String>,
    /// Only events whose client lies in this prefix.
    pub client: Option<IpCidr>,
    /// Report one event in this many (the programs choose at random); 1: every one.
    pub sample_one_in: u32,
    /// Print at most this many events a second; the rest are counted and summed up.
    pub rate: Option<u32>,
    /// Exit after printing this many events.
    pub count: Option<u64>,
    pub json: bool,
}

/// Runs the monitor until SIGINT or SIGTERM, `count` events, or a closed stdout.
pub fn run(options: &MonitorOptions) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(watch(options))
}

/// The control cell, held: cleared when the monitor ends, however it ends short of a kill.
struct Held {
    cell: MonitorControlCell,
    owner: Owner,
    kinds: u32,
    sample_one_in: u32,
}

impl Held {
    fn beat(&mut self) -> anyhow::Result<()> {
        if !self.cell.beat(self.kinds, self.sample_one_in, self.owner)? {
            bail!("another lb monitor took the datapath's events over");
        }
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Err(error) = self.cell.release(self.owner) {
            note(&format!(
                "the datapath's event reports stay on until the agent clears them: {error}"
            ));
        }
    }
}

/// A line for the person watching, on stderr; a closed stderr loses it (it must not end the
/// monitor before it has released the control cell).
fn note(text: &str) {
    let _ = writeln!(std::io::stderr(), "lb monitor: {text}");
}

async fn watch(options: &MonitorOptions) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let pin_dir = &options.pin_dir;
    let mut cell = MonitorControlCell::open(pin_dir)
        .context("opening the monitor control map (is the agent running with this --pin-dir?)")?;
    let owner = Owner::this_process()?;
    let sample_one_in = options.sample_one_in.max(1);
    let since_ns = match cell.claim(options.kinds, sample_one_in, owner)? {
        Claim::Claimed { since_ns } => since_ns,
        Claim::Held { pid: other } => bail!(
            "another lb monitor (pid {other}) is running: monitors share the datapath's one ring \
             buffer, so only one runs at a time"
        ),
    };
    let mut held = Held {
        cell,
        owner,
        kinds: options.kinds,
        sample_one_in,
    };
    let ring: RingBuf<MapData> = open_map(pin_dir, map_names::MONITOR_EVENTS, Access::ReadWrite)?;
    let lost: PerCpuArray<MapData, u64> =
        open_map(pin_dir, map_names::MONITOR_LOST, Access::ReadOnly)?;
    let lost_before = lost_total(&lost)?;
    let mut printer = Printer::new(options, Maps::open(pin_dir, Access::ReadOnly)?, since_ns)?;
    if let Some(wanted) = &options.service
        && !printer.has_service(wanted)
    {
        note(&format!(
            "no service {wanted} is programmed now (`lb services` lists them): its events show \
             once it is"
        ));
    }
    // SAFETY: the ring buffer owns its descriptor, which stays open and the same for as long as
    // the AsyncFd owns the ring buffer.
    let mut ring = unsafe { AsyncFd::register(ring) }.map_err(|error| error.into_parts().1)?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    // The terminal or the `kubectl exec` session went away.
    let mut hangup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    // The programs wake the monitor only once a backlog builds up (each wakeup costs them an
    // irq_work): below that, events are read on this poll.
    let mut poll = tokio::time::interval(POLL_EVERY);
    let mut lost_reported = 0;
    let watched: Vec<_> = kind::ALL
        .iter()
        .filter(|(bit, _)| options.kinds & bit != 0)
        .map(|(_, name)| *name)
        .collect();
    note(&format!("watching {} (Ctrl-C to stop)", watched.join(",")));
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => break,
            _ = tick.tick() => {
                held.beat()?;
                printer.end_second();
                let lost_now = lost_total(&lost)? - lost_before;
                if lost_now > lost_reported {
                    printer.lost(lost_now - lost_reported);
                    lost_reported = lost_now;
                }
            }
            _ = poll.tick() => {
                if drain(ring.get_mut(), &mut printer) == Drained::Enough {
                    break;
                }
            }
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                match drain(guard.get_inner_mut(), &mut printer) {
                    Drained::Enough => break,
                    // Readiness is cleared only once the ring is empty; a busy ring stays ready
                    // for the next turn of the loop, after the signals and the heartbeat.
                    Drained::Empty => guard.clear_ready(),
                    Drained::More => {}
                }
            }
        }
        if printer.closed {
            break;
        }
    }
    let lost_now = lost_total(&lost)? - lost_before;
    if lost_now > lost_reported {
        printer.lost(lost_now - lost_reported);
    }
    Ok(())
}

/// How far behind CLOCK_MONOTONIC the programs' coarse clock may be (a timer tick).
const CLOCK_SLACK: Duration = Duration::from_millis(20);
/// How often the monitor reads the ring buffer without being woken.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// Events read in one turn of the monitor's loop at most, so that a flood of them never keeps
/// it from its heartbeat and its signals.
const DRAIN_BATCH: usize = 1024;

#[derive(PartialEq, Eq)]
enum Drained {
    /// The ring buffer is empty.
    Empty,
    /// A batch was read; more may wait.
    More,
    /// The printer has had enough (`--count`, a closed stdout).
    Enough,
}

/// Prints up to [`DRAIN_BATCH`] events waiting on the ring buffer.
fn drain(ring: &mut RingBuf<MapData>, printer: &mut Printer<'_>) -> Drained {
    for _ in 0..DRAIN_BATCH {
        let Some(item) = ring.next() else {
            return Drained::Empty;
        };
        if printer.event(&item) == Printed::Enough {
            return Drained::Enough;
        }
    }
    Drained::More
}

fn lost_total(map: &PerCpuArray<MapData, u64>) -> anyhow::Result<u64> {
    Ok(map.get(&0, 0)?.iter().sum())
}

#[derive(PartialEq, Eq)]
enum Printed {
    More,
    Enough,
}

/// Turns events into lines, with the names of services and NICs.
struct Printer<'o> {
    options: &'o MonitorOptions,
    maps: Maps,
    names: HashMap<u32, String>,
    interfaces: HashMap<u32, String>,
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC, in ns: the events carry the latter.
    wall_offset_ns: i128,
    /// Events stamped before this (CLOCK_MONOTONIC) are an earlier monitor's, left unread on
    /// the ring buffer.
    since_ns: u64,
    printed: u64,
    this_second: u32,
    over_rate: u64,
    closed: bool,
}

impl<'o> Printer<'o> {
    fn new(options: &'o MonitorOptions, maps: Maps, claimed_ns: u64) -> anyhow::Result<Self> {
        let wall = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as i128;
        Ok(Self {
            options,
            maps,
            names: HashMap::new(),
            interfaces: HashMap::new(),
            wall_offset_ns: wall - i128::from(now_ns()?),
            // The programs' clock is the coarse one, up to a tick behind.
            since_ns: claimed_ns.saturating_sub(CLOCK_SLACK.as_nanos() as u64),
            printed: 0,
            this_second: 0,
            over_rate: 0,
            closed: false,
        })
    }

    fn event(&mut self, bytes: &[u8]) -> Printed {
        if bytes.len() < size_of::<MonitorEvent>() {
            return Printed::More;
        }
        // SAFETY: the record has the size of a MonitorEvent (checked), which any bytes are.
        let event = unsafe { bytes.as_ptr().cast::<MonitorEvent>().read_unaligned() };
        // What an earlier monitor asked for and did not read.
        if event.kind & self.options.kinds == 0 || event.time_ns < self.since_ns {
            return Printed::More;
        }
        let view = self.view(&event);
        if !self.selected(&event, &view) {
            return Printed::More;
        }
        if let Some(rate) = self.options.rate
            && self.this_second >= rate
        {
            self.over_rate += 1;
            return Printed::More;
        }
        self.this_second += 1;
        let line = if self.options.json {
            serde_json::to_string(&view).unwrap_or_default()
        } else {
            view.line()
        };
        let mut stdout = std::io::stdout().lock();
        if writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            self.closed = true;
            return Printed::Enough;
        }
        self.printed += 1;
        if self
            .options
            .count
            .is_some_and(|count| self.printed >= count)
        {
            return Printed::Enough;
        }
        Printed::More
    }

    /// A second is over: says how many events `--rate` left out, and forgets the names of
    /// services and NICs (service ids and ifindexes are given out again).
    fn end_second(&mut self) {
        if self.over_rate > 0 {
            note(&format!(
                "{} events not shown (over --rate {}/s)",
                self.over_rate,
                self.options.rate.unwrap_or_default()
            ));
        }
        self.this_second = 0;
        self.over_rate = 0;
        self.names.clear();
        self.interfaces.clear();
    }

    fn lost(&self, count: u64) {
        note(&format!(
            "{count} events lost (the ring buffer was full: fewer --type, --sample N or a \
             faster terminal help)"
        ));
    }

    fn selected(&self, event: &MonitorEvent, view: &EventView) -> bool {
        if let Some(wanted) = &self.options.service {
            let Some(name) = &view.service else {
                return false;
            };
            if !names_service(name, wanted) {
                return false;
            }
        }
        if let Some(cidr) = &self.options.client {
            let source = address(event.family, &event.saddr);
            let destination = address(event.family, &event.daddr);
            let client_side = match event.program {
                program::XDP => cidr.contains(source),
                program::TC => cidr.contains(destination),
                // A socket's address is not known when its call is translated.
                program::SOCKET => false,
                _ => cidr.contains(source) || cidr.contains(destination),
            };
            if !client_side {
                return false;
            }
        }
        true
    }

    fn view(&mut self, event: &MonitorEvent) -> EventView {
        let service_id = if event.service_id == MonitorEvent::NO_SERVICE {
            self.frontend_service(event)
        } else {
            Some(event.service_id)
        };
        let service = service_id.and_then(|id| self.service_name(id));
        let backend = (event.kind == kind::NEW_FLOW).then(|| {
            endpoint(
                address(event.family, &event.backend_addr),
                event.backend_port,
            )
        });
        let nat_source = (event.kind == kind::NEW_FLOW && event.nat_port != 0)
            .then(|| endpoint(address(event.family, &event.nat_addr), event.nat_port));
        let reason = (event.kind & (kind::DROP | kind::REJECT | kind::SNAT_EXHAUSTED) != 0)
            .then(|| Event(event.reason).label().unwrap_or("unknown").to_owned());
        let wall_ns = self.wall_offset_ns + i128::from(event.time_ns);
        EventView {
            unix_ms: (wall_ns / 1_000_000) as i64,
            kind: kind::name(event.kind).unwrap_or("unknown"),
            reason,
            program: match event.program {
                program::XDP => "xdp",
                program::TC => "tc",
                program::SOCKET => "socket",
                _ => "-",
            },
            interface: self.interface(event.ifindex),
            protocol: protocol_name(event.proto),
            source: if event.program == program::SOCKET {
                "socket".to_owned()
            } else {
                endpoint(address(event.family, &event.saddr), event.sport)
            },
            destination: endpoint(address(event.family, &event.daddr), event.dport),
            tcp_flags: (event.proto == proto::TCP).then(|| tcp_flags(event.tcp_flags)),
            service_id,
            service,
            backend,
            nat_source,
        }
    }

    /// The service of a packet's destination, for events the program reported without one
    /// (drops): its frontend entry now.
    fn frontend_service(&self, event: &MonitorEvent) -> Option<u32> {
        if event.family != 4 || event.dport == 0 {
            return None;
        }
        let key = Frontend4Key {
            addr: event.daddr[0].to_be(),
            port: event.dport.to_be(),
            proto: event.proto,
            scope: scope::ANY,
        };
        self.maps
            .frontends
            .get(&key, 0)
            .ok()
            .map(|value| value.service_id)
    }

    /// Whether a service programmed now answers to `wanted` (as `--service` matches).
    fn has_service(&self, wanted: &str) -> bool {
        self.maps
            .service_names
            .iter()
            .filter_map(Result::ok)
            .any(|(_, stored)| names_service(&service_name_text(&stored), wanted))
    }

    fn service_name(&mut self, id: u32) -> Option<String> {
        if let Some(name) = self.names.get(&id) {
            return Some(name.clone());
        }
        let stored = self.maps.service_names.get(&id, 0).ok()?;
        let name = service_name_text(&stored);
        self.names.insert(id, name.clone());
        Some(name)
    }

    fn interface(&mut self, ifindex: u32) -> Option<String> {
        if ifindex == 0 {
            return None;
        }
        if let Some(name) = self.interfaces.get(&ifindex) {
            return Some(name.clone());
        }
        let mut buffer = [0 as libc::c_char; libc::IF_NAMESIZE];
        // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes into the buffer it is given.
        let name = unsafe { libc::if_indextoname(ifindex, buffer.as_mut_ptr()) };
        let name = if name.is_null() {
            ifindex.to_string()
        } else {
            // SAFETY: on success the buffer holds a NUL-terminated name.
            unsafe { std::ffi::CStr::from_ptr(buffer.as_ptr()) }
                .to_string_lossy()
                .into_owned()
        };
        self.interfaces.insert(ifindex, name.clone());
        Some(name)
    }
}

/// One event as printed.
#[derive(Serialize)]
struct EventView {
    unix_ms: i64,
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    program: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    interface: Option<String>,
    protocol: &'static str,
    source: String,
    destination: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    tcp_flags: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend: Option<String>,
    /// The source the backend sees, when it is not the client's own (SNAT, a remapped port).
    #[serde(skip_serializing_if = "Option::is_none")]
    nat_source: Option<String>,
}

impl EventView {
    fn line(&self) -> String {
        let seconds_of_day = self.unix_ms.rem_euclid(86_400_000);
        let mut line = format!(
            "{:02}:{:02}:{:02}.{:03} {:<6} {:<24} {:<6} {:<8} {:<4} {} -> {}",
            seconds_of_day / 3_600_000,
            seconds_of_day / 60_000 % 60,
            seconds_of_day / 1000 % 60,
            seconds_of_day % 1000,
            self.kind,
            self.reason.as_deref().unwrap_or("-"),
            self.program,
            self.interface.as_deref().unwrap_or("-"),
            self.protocol,
            self.source,
            self.destination,
        );
        if let Some(flags) = &self.tcp_flags {
            line.push_str(&format!(" [{flags}]"));
        }
        match (&self.service, self.service_id) {
            (Some(name), _) => line.push_str(&format!(" {name}")),
            (None, Some(id)) => line.push_str(&format!(" service {id}")),
            (None, None) => {}
        }
        if let Some(backend) = &self.backend {
            line.push_str(&format!(" => {backend}"));
        }
        if let Some(source) = &self.nat_source {
            line.push_str(&format!(" (from {source})"));
        }
        line
    }
}

fn address(family: u8, words: &[u32; 4]) -> IpAddr {
    if family == 6 {
        IpAddr::V6(ipv6_of_words(*words))
    } else {
        IpAddr::V4(Ipv4Addr::from(words[0]))
    }
}

fn endpoint(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(addr) => format!("{addr}:{port}"),
        IpAddr::V6(addr) => format!("[{addr}]:{port}"),
    }
}

fn protocol_name(protocol: u8) -> &'static str {
    match protocol {
        proto::TCP => "tcp",
        proto::UDP => "udp",
        proto::SCTP => "sctp",
        1 => "icmp",
        0 => "-",
        _ => "ip",
    }
}

/// tcpdump's letters: S(YN), F(IN), R(ST), P(USH), and "." for an ACK.
fn tcp_flags(flags: u8) -> String {
    let mut text: String = [(0x02, 'S'), (0x01, 'F'), (0x04, 'R'), (0x08, 'P')]
        .into_iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, letter)| letter)
        .collect();
    if flags & 0x10 != 0 {
        text.push('.');
    }
    text
}

/// The kinds named on the command line (`drop,reject,new,end,snat`), as bits.
pub fn parse_kinds(names: &[String]) -> anyhow::Result<u32> {
    let mut kinds = 0;
    for name in names {
        let Some((bit, _)) = kind::ALL.iter().find(|(_, known)| *known == name.as_str()) else {
            let known: Vec<_> = kind::ALL.iter().map(|(_, known)| *known).collect();
            bail!(
                "--type: {name:?} is not a kind of event (one of {})",
                known.join(", ")
            );
        };
        kinds |= bit;
    }
    Ok(kinds)
}

/// A service name as the agent stores it (NUL-padded bytes).
fn service_name_text(stored: &[u8]) -> String {
    let len = stored
        .iter()
        .position(|&byte| byte == 0)
        .unwrap_or(stored.len());
    String::from_utf8_lossy(&stored[..len]).into_owned()
}

/// Whether `name` (`namespace/name:port`) is what `--service` asked for: the whole name, or
/// the service without its port.
fn names_service(name: &str, wanted: &str) -> bool {
    name == wanted
        || name
            .strip_prefix(wanted)
            .is_some_and(|rest| rest.starts_with(':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_flags_read_as_tcpdump_writes_them() {
        assert_eq!(tcp_flags(0x02), "S");
        assert_eq!(tcp_flags(0x12), "S.");
        assert_eq!(tcp_flags(0x11), "F.");
        assert_eq!(tcp_flags(0x04), "R");
        assert_eq!(tcp_flags(0x18), "P.");
    }

    #[test]
    fn a_new_flow_prints_as_one_line_with_its_backend_and_nat_source() {
        let view = EventView {
            unix_ms: 3_723_004,
            kind: "new",
            reason: None,
            program: "xdp",
            interface: Some("eth0".to_owned()),
            protocol: "tcp",
            source: "203.0.113.10:40000".to_owned(),
            destination: "203.0.113.1:30080".to_owned(),
            tcp_flags: Some("S".to_owned()),
            service_id: Some(3),
            service: Some("default/web:http/TCP[external]".to_owned()),
            backend: Some("10.244.2.10:8080".to_owned()),
            nat_source: Some("203.0.113.1:61000".to_owned()),
        };
        assert_eq!(
            view.line(),
            "01:02:03.004 new    -                        xdp    eth0     tcp  203.0.113.10:40000 -> \
             203.0.113.1:30080 [S] default/web:http/TCP[external] => 10.244.2.10:8080 (from \
             203.0.113.1:61000)"
        );
    }

    #[test]
    fn kinds_parse_by_name_and_refuse_unknown_ones() {
        let names = |list: &[&str]| {
            list.iter()
                .map(|name| (*name).to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            parse_kinds(&names(&["drop", "new"])).expect("kinds"),
            kind::DROP | kind::NEW_FLOW
        );
        for (bad, named) in [("drops", "\"drops\""), ("", "\"\"")] {
            let error = parse_kinds(&names(&["drop", bad])).expect_err("unknown");
            assert_eq!(
                error.to_string(),
                format!(
                    "--type: {named} is not a kind of event (one of drop, reject, new, end, snat)"
                )
            );
        }
    }
}
