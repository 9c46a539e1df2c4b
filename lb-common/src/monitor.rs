//! `lb monitor`: what the datapath reports, one record per event, on the ring buffer
//! [`crate::map_names::MONITOR_EVENTS`], and the control cell ([`MonitorControl`]) through which a
//! running monitor turns each kind of event on. With no monitor every kind is off, and the
//! programs do no more than read one array cell at the places that could report.

use crate::Ipv6Words;

/// The kinds of event, as bits of [`MonitorControl::kinds`] and values of [`MonitorEvent::kind`].
pub mod kind {
    /// A packet dropped (or a connection refused) with its reason.
    pub const DROP: u32 = 1 << 0;
    /// A packet to a service without endpoints answered like kube-proxy's REJECT (TCP RST,
    /// ICMP port unreachable), or a connect() the socket hooks refused.
    pub const REJECT: u32 = 1 << 1;
    /// A new flow: its service, client, chosen backend and, to a remote backend, SNAT port.
    pub const NEW_FLOW: u32 = 1 << 2;
    /// A tracked TCP flow ends: the second side's FIN (a flow by direct server return: its one
    /// FIN) or an in-window RST.
    pub const FLOW_END: u32 = 1 << 3;
    /// A new flow to a remote backend dropped because no SNAT port was free.
    pub const SNAT_EXHAUSTED: u32 = 1 << 4;
    /// Every kind, with its name on the command line and in JSON.
    pub const ALL: [(u32, &str); 5] = [
        (DROP, "drop"),
        (REJECT, "reject"),
        (NEW_FLOW, "new"),
        (FLOW_END, "end"),
        (SNAT_EXHAUSTED, "snat"),
    ];

    /// The name of one kind bit.
    pub fn name(kind: u32) -> Option<&'static str> {
        ALL.iter()
            .find(|(bit, _)| *bit == kind)
            .map(|(_, name)| *name)
    }
}

/// Which program saw the event ([`MonitorEvent::program`]).
pub mod program {
    /// Not told apart: a flow's end, which XDP (the client's packets, a remote backend's) or tc
    /// (a local backend's) may see.
    pub const EITHER: u8 = 0;
    /// `lb_xdp` and its protocol programs, on a node NIC's ingress.
    pub const XDP: u8 = 1;
    /// `lb_tc_egress`, on a node NIC's egress.
    pub const TC: u8 = 2;
    /// The socket hooks (connect, sendmsg) of a pod or host process: the client is a socket of
    /// this node, its address not known yet (reported as 0).
    pub const SOCKET: u8 = 3;
}

/// The one cell of [`crate::map_names::MONITOR_CONTROL`]. A monitor writes it whole when it
/// starts, beats in it while it runs and clears it when it exits; the agent clears the cell of
/// a monitor whose heartbeat stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct MonitorControl {
    /// [`kind`] bits the programs report; 0: none (no monitor).
    pub kinds: u32,
    /// Report one event in this many (chosen at random per event); 0 and 1: every one.
    pub sample_one_in: u32,
    /// The monitor's process id (in its own pid namespace: two monitors may have the same),
    /// for messages.
    pub owner_pid: u32,
    pub _pad: u32,
    /// CLOCK_MONOTONIC nanoseconds of the monitor's last heartbeat.
    pub heartbeat_ns: u64,
    /// A random number the monitor drew at start, which tells it from any other; 0: none.
    pub owner_token: u64,
}
const _: () = assert!(size_of::<MonitorControl>() == 32);

/// One event on the ring buffer. Addresses as numbers for IPv4 (`u32::from(Ipv4Addr)`) in the
/// first word of an [`Ipv6Words`], the rest 0 (`family` 4), or as IPv6 words (`family` 6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct MonitorEvent {
    /// CLOCK_MONOTONIC_COARSE nanoseconds, as the programs' clock reads.
    pub time_ns: u64,
    /// One [`kind`] bit.
    pub kind: u32,
    /// For drops and rejects, the [`crate::Event`] (the reason), as in `lb stats`.
    pub reason: u32,
    /// The service id (`lb services`), or `u32::MAX` when the packet is not known to be one
    /// service's.
    pub service_id: u32,
    /// The NIC the packet came in on (XDP) or leaves by (tc); 0 where unknown.
    pub ifindex: u32,
    /// [`program`] value.
    pub program: u8,
    /// 4 or 6.
    pub family: u8,
    pub proto: u8,
    /// The TCP flags byte of the packet (0 for other protocols).
    pub tcp_flags: u8,
    pub sport: u16,
    pub dport: u16,
    /// The packet's addresses as it arrived.
    pub saddr: Ipv6Words,
    pub daddr: Ipv6Words,
    /// For new flows, the backend.
    pub backend_addr: Ipv6Words,
    pub backend_port: u16,
    /// For new flows, the source the backend sees when it is not the client's own (SNAT to a
    /// remote backend, or a remapped port); 0 otherwise.
    pub nat_port: u16,
    pub nat_addr: Ipv6Words,
    pub _pad: u32,
}
const _: () = assert!(size_of::<MonitorEvent>() == 104);

impl MonitorEvent {
    /// No service.
    pub const NO_SERVICE: u32 = u32::MAX;
}

/// An IPv4 address (a number) as the first word of an [`Ipv6Words`].
pub const fn v4_words(addr: u32) -> Ipv6Words {
    let mut words = [0; 4];
    words[0] = addr;
    words
}

/// Whether a control cell asks for one kind of event.
pub const fn wants(control: &MonitorControl, kind: u32) -> bool {
    control.kinds & kind != 0
}
