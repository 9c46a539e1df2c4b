//! `lb_tc_egress`: on the egress of the node NICs, replies of flows that `lb_xdp` DNATed get
//! their source rewritten back to the frontend the client used (later fragments of a datagram
//! as their first one). Everything else leaves untouched. IPv4 and IPv6 go through the same
//! program (its verifier budget is small): the frame's ethertype picks the family once, and the
//! lookups and the state tracking are the same code for both ([`reverse_nat`], generic over
//! [`Family`]); the parse and the rewrite are each family's own.
//!
//! The skb may carry a partial checksum (CHECKSUM_PARTIAL from a local or veth sender), so
//! checksums are updated with the kernel's helpers, which handle that case
//! (BPF_F_PSEUDO_HDR for the address, which is part of the pseudo-header). SCTP's CRC32c, which
//! no helper updates, is brought up to date here (`snat_sctp`).

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use aya_log_ebpf::debug;
use lb_common::{
    Event, FlowValue, Frag4Key, Frag4Value, Frag6Key, Ipv6Words, checksum, ct_flags, frag_action,
    ipv6::{self, EXT_HDR_PEEK, IPV6_HDR_LEN, MAX_EXT_HEADERS, Step, next_header},
    monitor::kind as monitor_kind,
    proto, sctp, tc_programs, tcp_seq,
};

use lb_common::icmp::{self, ICMP_ERROR_LEN, ICMP6_ERROR_LEN};
use lb_ebpf::packet::{
    ETH_HDR_LEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_ICMP, IPV4_CSUM_OFFSET, IPV4_FRAG_OFFSET_MASK,
    IPV4_MIN_HDR_LEN, IPV4_MORE_FRAGMENTS, IPV4_SADDR_OFFSET, TCP_ACK_SEQ_OFFSET, TCP_CSUM_OFFSET,
    TCP_DATA_OFFSET_OFFSET, TCP_FIN, TCP_FLAGS_OFFSET, TCP_SYN, UDP_CSUM_OFFSET,
    fragment_header_len, packet_words, words,
};

use crate::{
    family::{Family, V4, V6},
    flow::{
        Answer, Tuple, answer_of, blind_fin, blind_rst, client_record_of_reply, track_answer,
        track_reply,
    },
    flow_cache::{self, Look},
    helpers::tail_call,
    maps::{
        BACKEND_FILTER, FRAGMENTS4, FRAGMENTS6, TC_PROGRAMS, count_event, first_fragment_record,
        remember_fragment, remember_fragment6,
    },
    monitor,
    sctp_crc::checksum_after_ports,
};

/// The entry, for IPv4, whose body is inlined here: the path of every answer a local endpoint
/// sends. IPv6 frames go on through a tail call ([`lb_common::tc_programs`]): a TCP or UDP
/// answer right after the fixed header to [`lb_tc_egress6_direct`], anything else IPv6 that
/// may need translating to [`lb_tc_egress6`]. Their bodies and the ICMPv6 error translation
/// take 300 to 450 bytes of stack each, and beside IPv4's in one program they would pass the
/// 512 bytes the verifier allows a chain of calls; as BPF functions called from here, every
/// IPv4 answer paid for a call (20 to 30 ns). Without the program in its slot (an agent that
/// stopped between its attach and its pin), IPv6 leaves untranslated.
#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    let Some(ethertype) = read::<2>(&ctx, 12) else {
        return TC_ACT_OK;
    };
    match u16::from_be_bytes(ethertype) {
        ETH_P_IP => verdict(&ctx, try_ipv4(&ctx), report_drop),
        ETH_P_IPV6 => {
            match ipv6_program(&ctx) {
                // SAFETY: the slots hold programs of this object (the agent puts them
                // there), which take the same context; on success control never comes back.
                Some(Ipv6Program::Direct) => unsafe {
                    tail_call::<{ tc_programs::IPV6_DIRECT }, _>(&ctx, &TC_PROGRAMS)
                },
                // SAFETY: as above.
                Some(Ipv6Program::Full) => unsafe {
                    tail_call::<{ tc_programs::IPV6 }, _>(&ctx, &TC_PROGRAMS)
                },
                None => {}
            }
            TC_ACT_OK
        }
        _ => TC_ACT_OK,
    }
}

/// Where [`lb_tc_egress`] hands an IPv6 frame on.
enum Ipv6Program {
    /// [`lb_tc_egress6_direct`].
    Direct,
    /// [`lb_tc_egress6`].
    Full,
}

/// The program for an IPv6 frame: a TCP or UDP packet right after the fixed header goes to
/// [`lb_tc_egress6_direct`] when its source may be a backend's (the backend filter), and
/// leaves untouched otherwise (the node's own traffic and pods' traffic to elsewhere: the full
/// program let it go untouched too); SCTP right after the fixed header likewise, to
/// [`lb_tc_egress6`]. Extension headers, fragments and ICMPv6 go to [`lb_tc_egress6`].
#[inline(always)]
fn ipv6_program(ctx: &TcContext) -> Option<Ipv6Program> {
    let Some(ip) = read::<{ IPV6_HDR_LEN + 2 }>(ctx, ETH_HDR_LEN) else {
        return Some(Ipv6Program::Full);
    };
    let protocol = ip[6];
    if ip[0] >> 4 != 6 || !is_transport(protocol) {
        return Some(Ipv6Program::Full);
    }
    let saddr = words(&ip, IPV6_SADDR_OFFSET);
    let sport = u16::from_be_bytes([ip[IPV6_HDR_LEN], ip[IPV6_HDR_LEN + 1]]);
    if !maybe_backend_at::<V6>(saddr, sport, protocol) {
        None
    } else if protocol == proto::SCTP {
        Some(Ipv6Program::Full)
    } else {
        Some(Ipv6Program::Direct)
    }
}

/// tc egress for IPv6, tail-called by [`lb_tc_egress`]: an ICMPv6 error about a local endpoint's
/// flow,
/// an SCTP packet, a packet behind extension headers, or anything else IPv6 that is not
/// [`lb_tc_egress6_direct`]'s.
#[classifier]
pub fn lb_tc_egress6(ctx: TcContext) -> i32 {
    // A TCP, UDP or SCTP packet right after the fixed header (the common case) is no error and
    // pays no call to find out.
    let icmp6_error = match read::<1>(&ctx, ETH_HDR_LEN + 6) {
        Some([next]) if !is_transport(next) => icmp6_error_at(&ctx, next),
        _ => NO_ICMP6_ERROR,
    };
    let result = if icmp6_error != NO_ICMP6_ERROR {
        icmp6_error_about_an_endpoints_flow(&ctx, icmp6_error)
    } else {
        match try_ipv6(&ctx) {
            Ok(Ipv6Next::Sctp) => try_sctp6(&ctx),
            Ok(Ipv6Next::Done) => Ok(()),
            Err(event) => Err(event),
        }
    };
    verdict(&ctx, result, report_drop6)
}

/// tc egress for an IPv6 TCP or UDP packet right after the fixed header whose source may be a
/// backend's, tail-called by [`lb_tc_egress`]: [`try_ipv6`]'s work for the common answer of a
/// local endpoint, inlined in a program of its own, so that it pays no BPF-to-BPF call (its
/// return through the CPU's return thunk was about 6% of an IPv6 answer's time, perf).
#[classifier]
pub fn lb_tc_egress6_direct(ctx: TcContext) -> i32 {
    let Some((tuple, udp_checksum)) = parse6_plain(&ctx) else {
        // Headers outside the linear data: the full program's, which reads
        // them through the helper.
        // SAFETY: as in `lb_tc_egress`.
        unsafe { tail_call::<{ tc_programs::IPV6 }, _>(&ctx, &TC_PROGRAMS) };
        return TC_ACT_OK;
    };
    let result = translate6(
        &ctx,
        tuple,
        SourceFilter::Passed,
        PLAIN_L4_OFFSET,
        false,
        udp_checksum,
        None,
    );
    verdict(&ctx, result, report_drop6)
}

/// What a family's body decided: the packet leaves, or it is dropped, counted and reported
/// (`report`).
#[inline(always)]
fn verdict(
    ctx: &TcContext,
    result: Result<(), Event>,
    report: impl FnOnce(&TcContext, Event),
) -> i32 {
    match result {
        Ok(()) => TC_ACT_OK,
        Err(event) => {
            count_event(event);
            report(ctx, event);
            debug!(ctx, "tc: dropped, event {}", event.0);
            TC_ACT_SHOT
        }
    }
}

/// A dropped IPv4 packet for `lb monitor`, read again here, where only drops come.
#[inline(never)]
fn report_drop(ctx: &TcContext, reason: Event) {
    if !monitor::wants(monitor_kind::DROP) {
        return;
    }
    let tuple = match parse(ctx) {
        Some(Packet::Segment { tuple, .. }) => Some(tuple),
        _ => None,
    };
    monitor::tc_drop(tuple.as_ref(), reason, ifindex(ctx));
}

/// A dropped IPv6 packet for `lb monitor`, as [`report_drop`].
#[inline(never)]
fn report_drop6(ctx: &TcContext, reason: Event) {
    if !monitor::wants(monitor_kind::DROP) {
        return;
    }
    let tuple = match parse6(ctx) {
        Some(Packet6::Segment { tuple, .. }) => Some(tuple),
        _ => None,
    };
    monitor::tc_drop(tuple.as_ref(), reason, ifindex(ctx));
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    let skb = ctx.as_ptr().cast::<__sk_buff>();
    // SAFETY: the program's own skb, valid for the whole run.
    unsafe { (*skb).ifindex }
}

/// An IPv4 packet.
#[inline(always)]
fn try_ipv4(ctx: &TcContext) -> Result<(), Event> {
    let Some(packet) = parse(ctx) else {
        return Ok(());
    };
    let (tuple, l4_offset, fragment) = match packet {
        Packet::LaterFragment(key) => return later_fragment(ctx, &key),
        Packet::IcmpError {
            source,
            destination,
            at,
        } => return icmp_error_about_an_endpoints_flow(ctx, (source, destination), at),
        Packet::Segment {
            tuple,
            l4_offset,
            first_fragment,
        } => (tuple, l4_offset, first_fragment),
    };
    // Its checksum is over the whole SCTP packet, which a first fragment does not hold: refused
    // before it moves the flow's state.
    let refusal = || {
        if tuple.proto == proto::SCTP && fragment.is_some() {
            Err(Event::DROP_SCTP_FRAGMENT)
        } else {
            Ok(())
        }
    };
    let Some(Restore {
        frontend,
        client_port,
    }) = reverse_nat(
        &tuple,
        SourceFilter::Passed,
        refusal,
        acknowledgment(ctx, l4_offset),
    )?
    else {
        return Ok(());
    };
    if tuple.proto == proto::SCTP {
        return snat_sctp(ctx, &tuple, l4_offset, frontend, client_port)
            .map_err(|_| Event::DROP_NAT_FAILED);
    }
    snat(ctx, &tuple, l4_offset, frontend.0, frontend.1).map_err(|_| Event::DROP_NAT_FAILED)?;
    if client_port != tuple.dport {
        restore_client_port(ctx, &tuple, l4_offset, client_port)
            .map_err(|_| Event::DROP_NAT_FAILED)?;
    }
    if let Some(key) = fragment {
        let mut later = Frag4Value {
            saddr: frontend.0,
            daddr: tuple.daddr,
            ..Default::default()
        };
        remember_fragment(&FRAGMENTS4, &key, &mut later);
    }
    Ok(())
}

/// What [`try_ipv6`] leaves to the next step.
enum Ipv6Next {
    Done,
    /// An SCTP packet: [`try_sctp6`]'s.
    Sctp,
}

/// An IPv6 packet: an answer of a local endpoint's flow gets its source (and, for a remapped
/// flow, its destination port) back as the client sent to, later fragments as their first one;
/// SCTP is left to [`try_sctp6`]. A BPF function of its own (see [`lb_tc_egress6`]).
#[inline(never)]
fn try_ipv6(ctx: &TcContext) -> Result<Ipv6Next, Event> {
    let (tuple, l4_offset, behind_extensions, udp_checksum, fragment) = match parse6(ctx) {
        Some(Packet6::Segment {
            tuple,
            l4_offset,
            behind_extensions,
            udp_checksum,
            first_fragment,
        }) => (
            tuple,
            l4_offset,
            behind_extensions,
            udp_checksum,
            first_fragment,
        ),
        Some(Packet6::LaterFragment(key)) => {
            return later_fragment6(ctx, &key).map(|()| Ipv6Next::Done);
        }
        None => return Ok(Ipv6Next::Done),
    };
    if tuple.proto == proto::SCTP {
        return Ok(Ipv6Next::Sctp);
    }
    translate6(
        ctx,
        tuple,
        SourceFilter::Unchecked,
        l4_offset,
        behind_extensions,
        udp_checksum,
        fragment,
    )
    .map(|()| Ipv6Next::Done)
}

/// A TCP or UDP answer's translation ([`reverse_nat`]), with, for a first fragment (`fragment`:
/// its datagram's identification), the record its later fragments follow.
#[inline(always)]
fn translate6(
    ctx: &TcContext,
    tuple: Tuple<V6>,
    source: SourceFilter,
    l4_offset: usize,
    behind_extensions: bool,
    udp_checksum: u16,
    fragment: Option<u32>,
) -> Result<(), Event> {
    // A UDP checksum of 0 means "none" over IPv4 only: over IPv6 the receiver drops it (RFC
    // 8200 section 8.1), and an incremental update of it would make a wrong one. Refused before
    // it moves the flow's state.
    let refusal = || {
        if tuple.proto == proto::UDP && udp_checksum == 0 {
            Err(Event::DROP_MALFORMED)
        } else {
            Ok(())
        }
    };
    let Some(Restore {
        frontend,
        client_port,
    }) = reverse_nat(&tuple, source, refusal, acknowledgment(ctx, l4_offset))?
    else {
        return Ok(());
    };
    snat6(ctx, &tuple, l4_offset, behind_extensions, frontend)
        .map_err(|_| Event::DROP_NAT_FAILED)?;
    if client_port != tuple.dport {
        restore_client_port(ctx, &tuple, l4_offset, client_port)
            .map_err(|_| Event::DROP_NAT_FAILED)?;
    }
    if let Some(id) = fragment {
        remember_fragment6(|record| {
            record.key.saddr = tuple.saddr;
            record.key.daddr = tuple.daddr;
            record.key.id = id;
            // The rest of the value (no MACs, no service) stays as every record leaves it.
            record.value.saddr = frontend.0;
            record.value.daddr = tuple.daddr;
            record.value.action = frag_action::PASS;
        });
    }
    Ok(())
}

/// An IPv6 SCTP packet: an answer of a local endpoint's association gets its source and its
/// destination port back as the client sent to, its CRC32c brought up to date. A BPF function
/// of its own beside [`try_ipv6`], which parsed it first: in one frame they need more than the
/// 512 bytes of stack the verifier allows.
#[inline(never)]
fn try_sctp6(ctx: &TcContext) -> Result<(), Event> {
    let Some(Packet6::Segment {
        mut tuple,
        l4_offset,
        behind_extensions,
        first_fragment,
        ..
    }) = parse6(ctx)
    else {
        return Ok(());
    };
    let Some(header) =
        transport_bytes::<{ sctp::HDR_AND_CHUNK_LEN }>(ctx, l4_offset, behind_extensions)
    else {
        return Ok(());
    };
    (tuple.tcp_flags, tuple.seq, tuple.seq_end) = sctp_segment(&header);
    // Its checksum is over the whole SCTP packet, which a first fragment does not hold: refused
    // before it moves the flow's state, as over IPv4.
    let refusal = || {
        if first_fragment.is_some() {
            Err(Event::DROP_SCTP_FRAGMENT)
        } else {
            Ok(())
        }
    };
    let Some(Restore {
        frontend,
        client_port,
    }) = reverse_nat(&tuple, SourceFilter::Unchecked, refusal, || None)?
    else {
        return Ok(());
    };
    snat6_sctp(ctx, l4_offset, behind_extensions, frontend, client_port)
        .map_err(|_| Event::DROP_NAT_FAILED)
}

/// What an answer of a local endpoint's flow gets back: the frontend it must leave from, and
/// the client's own port as its destination (the answer's own but for a flow whose source port
/// XDP remapped).
struct Restore<A> {
    frontend: (A, u16),
    client_port: u16,
}

/// The part of tc egress both families share: an answer from a possible backend (the backend
/// filter) that belongs to a local endpoint's flow (its FLOW entry or its REPLY entry) is checked
/// (a blind RST is dropped; `refusal` says whether the family refuses it), tracked (how far the
/// endpoint has sent, a FIN or RST moves the flow's state), and what it gets back is returned
/// for the family's rewrite. `None`: it leaves untouched.
#[inline(always)]
fn reverse_nat<F: Family>(
    tuple: &Tuple<F>,
    source: SourceFilter,
    refusal: impl FnOnce() -> Result<(), Event>,
    acknowledged: impl FnOnce() -> Option<u32>,
) -> Result<Option<Restore<F::Addr>>, Event> {
    if source == SourceFilter::Unchecked && !maybe_backend(tuple) {
        return Ok(None);
    }
    let look = flow_cache::answer_hit(tuple);
    if let Look::Hit(slot) = look {
        refusal()?;
        return Ok(Some(Restore {
            frontend: (slot.frontend_addr, slot.frontend_port),
            client_port: tuple.dport,
        }));
    }
    let Some(answer) = answer_of(tuple, acknowledged) else {
        return Ok(None);
    };
    refusal()?;
    let (frontend, client_port) = match answer {
        Answer::Whole(entry) => {
            // SAFETY: the entry stays valid for this run (RCU); see flow::destination for races.
            let entry = unsafe { &mut *entry };
            let client_record = entry.seq_next;
            if blind_rst(tuple, FlowValue::of(entry).backend_seq_next, || {
                client_record
            }) {
                return Err(Event::DROP_RST_OUT_OF_WINDOW);
            }
            if !blind_fin(tuple, FlowValue::of(entry).backend_seq_next) {
                track_answer(entry, tuple);
            }
            let flow = FlowValue::of(entry);
            let frontend = (flow.frontend_addr, flow.frontend_port);
            flow_cache::remember_answer(&look, entry, tuple, frontend);
            (frontend, tuple.dport)
        }
        Answer::Reply(entry) => {
            // SAFETY: as above.
            let entry = unsafe { &mut *entry };
            if blind_rst(tuple, entry.seq_next, || {
                client_record_of_reply(entry, tuple)
            }) {
                return Err(Event::DROP_RST_OUT_OF_WINDOW);
            }
            // Answers of a local endpoint keep no SNAT port: the client's packets keep the flow
            // alive.
            if !blind_fin(tuple, entry.seq_next) {
                track_reply(entry, tuple, false);
            }
            let remapped = entry.flags & ct_flags::PORT_REMAP != 0;
            (
                (entry.nat_addr, entry.nat_port),
                if remapped {
                    entry.snat_port
                } else {
                    tuple.dport
                },
            )
        }
    };
    Ok(Some(Restore {
        frontend,
        client_port,
    }))
}

/// Whether the program that handed a packet on checked its source against the backend filter
/// already ([`maybe_backend`]): `lb_tc_egress` does in its IPv4 parse and for what it hands to
/// [`lb_tc_egress6_direct`], where a second look was about 7% of that program's samples (perf).
#[derive(Clone, Copy, PartialEq, Eq)]
enum SourceFilter {
    Unchecked,
    Passed,
}

/// Whether the packet's source may be a backend's address and port (the backend filter, one
/// for both families: the agent sets an IPv6 backend's bit by [`Family::filter_bit`] too): the
/// node's own traffic and pods' traffic to elsewhere leave without a conntrack lookup.
#[inline(always)]
fn maybe_backend<F: Family>(tuple: &Tuple<F>) -> bool {
    maybe_backend_at::<F>(tuple.saddr, tuple.sport, tuple.proto)
}

/// [`maybe_backend`] by source address, port and protocol.
#[inline(always)]
fn maybe_backend_at<F: Family>(saddr: F::Addr, sport: u16, protocol: u8) -> bool {
    let bit = F::filter_bit(saddr, sport, protocol);
    BACKEND_FILTER
        .get(bit >> 6)
        .is_some_and(|word| word & (1u64 << (bit & 63)) != 0)
}

/// A fragment after the first of a reply: the source its first fragment got, if it got one.
/// Without a record (no flow's, or it came first) it leaves untouched, counted.
#[inline(always)]
fn later_fragment(ctx: &TcContext, key: &Frag4Key) -> Result<(), Event> {
    let Some(first) = first_fragment_record(&FRAGMENTS4, key).copied() else {
        count_event(Event::PASS_FRAGMENT);
        return Ok(());
    };
    let old = key.saddr.to_be();
    let new = first.saddr.to_be();
    ctx.l3_csum_replace(
        ETH_HDR_LEN + IPV4_CSUM_OFFSET,
        u64::from(old),
        u64::from(new),
        4,
    )
    .and_then(|()| ctx.store(ETH_HDR_LEN + IPV4_SADDR_OFFSET, &new, 0))
    .map_err(|_| Event::DROP_NAT_FAILED)
}

/// [`later_fragment`] for IPv6: the source address alone (no header checksum; the transport
/// checksum, in the first fragment, covered the new one).
#[inline(always)]
fn later_fragment6(ctx: &TcContext, key: &Frag6Key) -> Result<(), Event> {
    let Some(first) = first_fragment_record(&FRAGMENTS6, key) else {
        count_event(Event::PASS_FRAGMENT);
        return Ok(());
    };
    let source = first.saddr;
    ctx.store(ETH_HDR_LEN + IPV6_SADDR_OFFSET, &source, 0)
        .map_err(|_| Event::DROP_NAT_FAILED)
}

/// What tc egress looks at.
enum Packet {
    /// A TCP/UDP packet with its transport header: a whole one, or the first fragment of a
    /// datagram (then with the key its later fragments will have).
    Segment {
        tuple: Tuple,
        l4_offset: usize,
        first_fragment: Option<Frag4Key>,
    },
    /// A later fragment of a TCP/UDP datagram: no transport header.
    LaterFragment(Frag4Key),
    /// An unfragmented ICMP message from `source` to `destination`, at `at` (past the header's
    /// options).
    IcmpError {
        source: u32,
        destination: u32,
        at: usize,
    },
}

/// An ICMP error about a client's packet to a local endpoint, sent by the endpoint (e.g. port
/// unreachable for a closed UDP port) or by the node while it forwarded the packet to the
/// endpoint (fragmentation needed on a pod link of a smaller MTU, time exceeded): the client
/// gets it from the frontend it used, about the packet as it sent it (to the frontend), so that
/// its socket matches it, as netfilter's NAT translates an error related to a flow
/// (nf_nat_icmp_reply_translation). The quoted destination and port (and the quoted source port
/// of a remapped flow), the quoted IP and UDP checksums, the outer source and the ICMP checksum
/// are rewritten. Anything else leaves untouched ([`translates_error`]).
#[inline(always)]
fn icmp_error_about_an_endpoints_flow(
    ctx: &TcContext,
    (source, destination): (u32, u32),
    at: usize,
) -> Result<(), Event> {
    let mut error = [0u8; ICMP_ERROR_LEN];
    let load_transport = |offset, bytes: &mut [u8; 8]| load_into(ctx, offset)(bytes);
    let Some(transport_at) = icmp::gather(&mut error, at, load_into(ctx, at), load_transport)
    else {
        return Ok(());
    };
    let Some(quote) = icmp::quoted(&error) else {
        return Ok(());
    };
    // The quoted packet went from the client to the endpoint: its flow is found as an answer
    // from the endpoint to the client would find it (FLOW entry, else REPLY entry).
    let ((client, client_port), (endpoint, endpoint_port)) = (quote.source, quote.destination);
    let answer = Tuple::<V4> {
        saddr: endpoint,
        daddr: client,
        sport: endpoint_port,
        dport: client_port,
        proto: quote.proto,
        tcp_flags: 0,
        seq: 0,
        seq_end: 0,
    };
    if !translates_error(ctx, (source == endpoint, destination == client)) {
        return Ok(());
    }
    let Some((frontend, from_port)) = endpoint_flow(&answer) else {
        return Ok(());
    };
    icmp::rewrite_quoted(&mut error, &quote, (client, from_port), frontend);
    let nat_failed = |_| Event::DROP_NAT_FAILED;
    let (head, transport) = icmp::parts(&error).ok_or(Event::DROP_NAT_FAILED)?;
    ctx.store(at, head, 0).map_err(nat_failed)?;
    ctx.store(transport_at, transport, 0).map_err(nat_failed)?;
    ctx.l3_csum_replace(
        ETH_HDR_LEN + IPV4_CSUM_OFFSET,
        u64::from(source.to_be()),
        u64::from(frontend.0.to_be()),
        4,
    )
    .map_err(nat_failed)?;
    ctx.store(ETH_HDR_LEN + IPV4_SADDR_OFFSET, &frontend.0.to_be(), 0)
        .map_err(nat_failed)?;
    count_event(Event::ICMP_ERROR_TRANSLATED);
    Ok(())
}

/// The frontend of the flow of an answer from a local endpoint (`answer`, as the endpoint sends
/// it), and the port its client sent from.
#[inline(always)]
fn endpoint_flow<F: Family>(answer: &Tuple<F>) -> Option<((F::Addr, u16), u16)> {
    match answer_of(answer, || None)? {
        Answer::Whole(entry) => {
            // SAFETY: a read-only use of an entry that stays valid for this run (RCU).
            let flow = FlowValue::of(unsafe { &*entry });
            Some(((flow.frontend_addr, flow.frontend_port), answer.dport))
        }
        Answer::Reply(entry) => {
            // SAFETY: as above.
            let entry = unsafe { &*entry };
            if entry.flags & ct_flags::SNAT != 0 {
                return None;
            }
            let from_port = if entry.flags & ct_flags::PORT_REMAP != 0 {
                entry.snat_port
            } else {
                answer.dport
            };
            Some(((entry.nat_addr, entry.nat_port), from_port))
        }
    }
}

/// Whether an ICMP error quoting a client's packet to a local endpoint is one to translate:
/// addressed to that client (netfilter holds an error whose outer destination is not the quoted
/// source INVALID and leaves it untranslated, nf_conntrack_inet_error), and sent by the endpoint
/// itself or made by this node's stack (an error about the packet it forwarded to the
/// endpoint). A skb the stack made has no ingress interface; one forwarded from a pod behind a
/// veth has the veth: another such pod may not have its forged error sent from the frontend,
/// matching the client's socket. A pod whose packets reach the NIC without being received on
/// the node (ipvlan, macvlan) or in the node's namespace (hostNetwork) looks made by the node;
/// with NET_RAW such a pod can send from the frontend's address anyway.
#[inline(always)]
fn translates_error(ctx: &TcContext, (from_endpoint, to_client): (bool, bool)) -> bool {
    to_client && (from_endpoint || made_by_this_node(ctx))
}

/// Whether the packet was made by this node's stack (no ingress interface), not forwarded.
#[inline(always)]
fn made_by_this_node(ctx: &TcContext) -> bool {
    let skb = ctx.as_ptr().cast::<__sk_buff>();
    // SAFETY: the program's own skb, valid for the whole run.
    unsafe { (*skb).ingress_ifindex == 0 }
}

/// An ICMPv6 error (at `at`) about a client's packet to a local endpoint, sent by the endpoint
/// or by this node's stack (packet too big), translated as [`icmp_error_about_an_endpoints_flow`]
/// does for IPv4: the client gets it from the frontend it used,
/// about the packet as it sent it (with its extension headers, if it had any). The quoted
/// destination and port (and the quoted source port of a remapped flow), a quoted UDP checksum,
/// the outer source and the ICMPv6 checksum (whose pseudo-header holds the outer source) are
/// rewritten. Anything else leaves untouched.
///
/// A BPF function of its own (see [`lb_tc_egress6`]).
#[inline(never)]
fn icmp6_error_about_an_endpoints_flow(ctx: &TcContext, at: usize) -> Result<(), Event> {
    let Some(fixed) = read::<IPV6_HDR_LEN>(ctx, ETH_HDR_LEN) else {
        return Ok(());
    };
    let source = words_at(&fixed, 8);
    let mut error = [0u8; ICMP6_ERROR_LEN];
    let peek = |offset| ctx.load::<[u8; EXT_HDR_PEEK]>(offset).ok();
    let Some(gathered) = icmp::gather6(&mut error, at, load_into(ctx, at), peek) else {
        return Ok(());
    };
    let Some(quote) = icmp::quoted6(&error, gathered.protocol) else {
        return Ok(());
    };
    let ((client, client_port), (endpoint, endpoint_port)) = (quote.source, quote.destination);
    let answer = Tuple::<V6> {
        saddr: endpoint,
        daddr: client,
        sport: endpoint_port,
        dport: client_port,
        proto: quote.proto,
        tcp_flags: 0,
        seq: 0,
        seq_end: 0,
    };
    let to_client = V6::same(&words_at(&fixed, IPV6_DADDR_OFFSET), &client);
    if !translates_error(ctx, (V6::same(&source, &endpoint), to_client)) {
        return Ok(());
    }
    let Some((frontend, from_port)) = endpoint_flow(&answer) else {
        return Ok(());
    };
    icmp::rewrite_quoted6(
        &mut error,
        &quote,
        (client, from_port),
        frontend,
        (source, frontend.0),
    );
    let nat_failed = |_| Event::DROP_NAT_FAILED;
    let (head, transport) = icmp::parts6(&error).ok_or(Event::DROP_NAT_FAILED)?;
    ctx.store(at, head, 0).map_err(nat_failed)?;
    ctx.store(gathered.transport_at, transport, 0)
        .map_err(nat_failed)?;
    ctx.store(
        ETH_HDR_LEN + IPV6_SADDR_OFFSET,
        &icmp::bytes_of(&frontend.0),
        0,
    )
    .map_err(nat_failed)?;
    count_event(Event::ICMP_ERROR_TRANSLATED);
    Ok(())
}

/// A loader of `N` bytes at `offset` into a buffer, through the helper, for [`icmp::gather`]
/// and [`icmp::gather6`]; false when the packet ends first.
#[inline(always)]
fn load_into<const N: usize>(ctx: &TcContext, offset: usize) -> impl FnOnce(&mut [u8; N]) -> bool {
    move |into| match ctx.load::<[u8; N]>(offset) {
        Ok(bytes) => {
            *into = bytes;
            true
        }
        Err(_) => false,
    }
}

/// `N` bytes at `offset`: read straight from the skb's linear data when they are in it (every
/// egress packet goes through here, and bpf_skb_load_bytes is a helper call, 20-30 ns each),
/// else through the helper (a header in paged data). Reads only: a direct write would make the
/// verifier unclone every skb at the program's start (`tc_cls_act_prologue`), and TCP's egress
/// skbs are clones.
#[inline(always)]
fn read<const N: usize>(ctx: &TcContext, offset: usize) -> Option<[u8; N]> {
    let start = ctx.data() + offset;
    if start + N <= ctx.data_end() {
        // SAFETY: inside the skb's linear data, checked against data_end just above.
        return Some(unsafe { *(start as *const [u8; N]) });
    }
    ctx.load(offset).ok()
}

/// The reply's 5-tuple and transport offset, or the key of a later fragment, of an IPv4 frame;
/// `None` for anything that is not a TCP/UDP/SCTP packet with a complete header from a source
/// the backend filter may have (it passes untouched).
#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Packet> {
    let ip = read::<IPV4_MIN_HDR_LEN>(ctx, ETH_HDR_LEN)?;
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || header_len < IPV4_MIN_HDR_LEN {
        return None;
    }
    let protocol = ip[9];
    let saddr = u32::from_be_bytes([ip[12], ip[13], ip[14], ip[15]]);
    let flags_fragment = u16::from_be_bytes([ip[6], ip[7]]);
    let unfragmented = flags_fragment & (IPV4_FRAG_OFFSET_MASK | IPV4_MORE_FRAGMENTS) == 0;
    if protocol == IPPROTO_ICMP && unfragmented {
        return Some(Packet::IcmpError {
            source: saddr,
            destination: u32::from_be_bytes([ip[16], ip[17], ip[18], ip[19]]),
            at: ETH_HDR_LEN + header_len,
        });
    }
    if protocol != proto::TCP && protocol != proto::UDP && protocol != proto::SCTP {
        return None;
    }
    let daddr = u32::from_be_bytes([ip[16], ip[17], ip[18], ip[19]]);
    let fragment_key = Frag4Key {
        saddr,
        daddr,
        id: u16::from_be_bytes([ip[4], ip[5]]),
        proto: protocol,
        _pad: 0,
    };
    if flags_fragment & IPV4_FRAG_OFFSET_MASK != 0 {
        return Some(Packet::LaterFragment(fragment_key));
    }
    let first_fragment = (flags_fragment & IPV4_MORE_FRAGMENTS != 0).then_some(fragment_key);
    let l4_offset = ETH_HDR_LEN + header_len;
    let ports = read::<4>(ctx, l4_offset)?;
    // The node's own traffic and pods' traffic to elsewhere, most of what leaves, is no
    // backend's: it goes no further than this (as IPv6's, in `ipv6_program`).
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    if !maybe_backend_at::<V4>(saddr, sport, protocol) {
        return None;
    }
    let sequence = if protocol == proto::TCP {
        segment(ctx, l4_offset)?
    } else if protocol == proto::SCTP {
        sctp_segment(&read::<{ sctp::HDR_AND_CHUNK_LEN }>(ctx, l4_offset)?)
    } else {
        (0, 0, 0)
    };
    Some(Packet::Segment {
        tuple: tuple_of::<V4>((saddr, daddr), &ports, protocol, sequence),
        l4_offset,
        first_fragment,
    })
}

/// A TCP segment's flags, sequence number and the sequence number after it. Its length comes
/// from the skb, not the IP total length, which a GSO packet of more than 64 KiB leaves 0
/// (BIG TCP, net/ipv4/ip_output.c __ip_local_out with iph_set_totlen).
#[inline(always)]
fn segment(ctx: &TcContext, l4_offset: usize) -> Option<(u8, u32, u32)> {
    segment_of(ctx, l4_offset, read::<14>(ctx, l4_offset)?)
}

/// As [`segment`], with the first 14 bytes of the TCP header read.
#[inline(always)]
fn segment_of(ctx: &TcContext, l4_offset: usize, header: [u8; 14]) -> Option<(u8, u32, u32)> {
    let header_len = usize::from(header[TCP_DATA_OFFSET_OFFSET] >> 4) * 4;
    let flags = header[TCP_FLAGS_OFFSET];
    let seq = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let payload_len = (ctx.len() as usize).saturating_sub(l4_offset + header_len);
    let seq_end = tcp_seq::segment_end(
        seq,
        payload_len as u32,
        flags & TCP_SYN != 0,
        flags & TCP_FIN != 0,
    );
    Some((flags, seq, seq_end))
}

/// A TCP segment's acknowledgment number, read when asked for (only a SYN-ACK's is).
#[inline(always)]
fn acknowledgment(ctx: &TcContext, l4_offset: usize) -> impl FnOnce() -> Option<u32> + '_ {
    move || read::<4>(ctx, l4_offset + TCP_ACK_SEQ_OFFSET).map(u32::from_be_bytes)
}

/// The client's own port back as the destination, for a flow whose source port XDP remapped.
#[inline(always)]
fn restore_client_port<F: Family>(
    ctx: &TcContext,
    tuple: &Tuple<F>,
    l4_offset: usize,
    port: u16,
) -> Result<(), i64> {
    let (csum_offset, flags) = l4_checksum(tuple, l4_offset);
    ctx.l4_csum_replace(
        csum_offset,
        u64::from(tuple.dport.to_be()),
        u64::from(port.to_be()),
        flags | 2,
    )?;
    ctx.store(l4_offset + 2, &port.to_be(), 0)?;
    Ok(())
}

/// Where the TCP or UDP checksum is, and the l4_csum_replace flags it needs (a UDP checksum of
/// 0 means none and stays 0: BPF_F_MARK_MANGLED_0).
#[inline(always)]
fn l4_checksum<F: Family>(tuple: &Tuple<F>, l4_offset: usize) -> (usize, u64) {
    if tuple.proto == proto::TCP {
        (l4_offset + TCP_CSUM_OFFSET, 0)
    } else {
        (l4_offset + UDP_CSUM_OFFSET, u64::from(BPF_F_MARK_MANGLED_0))
    }
}

/// Rewrites the source address and port to the frontend's, fixing the IPv4 and TCP/UDP checksums.
/// The transport checksum goes through the helper, which knows whether the skb carries a
/// partial one (the address is in the pseudo-header, the port is not); the IPv4 header checksum
/// is always complete on egress, so it is computed here, and without IP options one store writes
/// it with both addresses and the port.
#[inline(always)]
fn snat(ctx: &TcContext, tuple: &Tuple, l4_offset: usize, addr: u32, port: u16) -> Result<(), i64> {
    let old_addr = tuple.saddr.to_be();
    let new_addr = addr.to_be();
    let old_port = tuple.sport.to_be();
    let new_port = port.to_be();
    let (csum_offset, flags) = l4_checksum(tuple, l4_offset);
    ctx.l4_csum_replace(
        csum_offset,
        u64::from(old_addr),
        u64::from(new_addr),
        flags | u64::from(BPF_F_PSEUDO_HDR) | 4,
    )?;
    ctx.l4_csum_replace(
        csum_offset,
        u64::from(old_port),
        u64::from(new_port),
        flags | 2,
    )?;
    rewrite_source(ctx, tuple, l4_offset, addr, port)
}

/// Writes the source address and port, with the IPv4 header checksum (the transport checksum is
/// the caller's).
#[inline(always)]
fn rewrite_source(
    ctx: &TcContext,
    tuple: &Tuple,
    l4_offset: usize,
    addr: u32,
    port: u16,
) -> Result<(), i64> {
    if l4_offset == ETH_HDR_LEN + IPV4_MIN_HDR_LEN {
        return store_source(ctx, tuple, addr, port);
    }
    ctx.l3_csum_replace(
        ETH_HDR_LEN + IPV4_CSUM_OFFSET,
        u64::from(tuple.saddr.to_be()),
        u64::from(addr.to_be()),
        4,
    )?;
    ctx.store(ETH_HDR_LEN + IPV4_SADDR_OFFSET, &addr.to_be(), 0)?;
    ctx.store(l4_offset, &port.to_be(), 0)?;
    Ok(())
}

/// Rewrites an SCTP answer's source address and port to the frontend's and its destination port
/// to `client_port`. SCTP has no pseudo-header: the address changes the IPv4 checksum only, the
/// ports the CRC32c ([`checksum_after_ports`]), which no helper updates; a field of 0 is one the
/// stack computes later (skb_crc32c_csum_help, or the NIC), over the new ports.
#[inline(always)]
fn snat_sctp(
    ctx: &TcContext,
    tuple: &Tuple,
    l4_offset: usize,
    frontend: (u32, u16),
    client_port: u16,
) -> Result<(), i64> {
    let header = read::<{ sctp::COMMON_HDR_LEN }>(ctx, l4_offset).ok_or(-1i64)?;
    // From the IP total length: the skb may end in padding the checksum does not cover.
    let total = read::<2>(ctx, ETH_HDR_LEN + 2).ok_or(-1i64)?;
    let len = usize::from(u16::from_be_bytes(total)).saturating_sub(l4_offset - ETH_HDR_LEN);
    rewrite_sctp_ports(ctx, l4_offset, &header, len, (frontend.1, client_port))?;
    rewrite_source(ctx, tuple, l4_offset, frontend.0, frontend.1)
}

/// Rewrites an SCTP packet's ports to `ports` (source, destination) and brings its CRC32c up to
/// date ([`checksum_after_ports`]); `header` is its common header, `len` the SCTP packet's
/// length.
#[inline(always)]
fn rewrite_sctp_ports(
    ctx: &TcContext,
    l4_offset: usize,
    header: &[u8; sctp::COMMON_HDR_LEN],
    len: usize,
    (source, destination): (u16, u16),
) -> Result<(), i64> {
    let old_ports = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut ports = [0u8; 4];
    ports[0..2].copy_from_slice(&source.to_be_bytes());
    ports[2..4].copy_from_slice(&destination.to_be_bytes());
    let new_ports = u32::from_le_bytes(ports);
    let check = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if let Some(check) =
        checksum_after_ports(check, len, old_ports, new_ports).map_err(|()| -1i64)?
    {
        ctx.store(l4_offset + sctp::CHECKSUM_OFFSET, &check.to_le_bytes(), 0)?;
    }
    ctx.store(l4_offset, &ports, 0)?;
    Ok(())
}

/// [`snat_sctp`] for IPv6: no header checksum, and the address is in no pseudo-header.
#[inline(always)]
fn snat6_sctp(
    ctx: &TcContext,
    l4_offset: usize,
    behind_extensions: bool,
    frontend: (Ipv6Words, u16),
    client_port: u16,
) -> Result<(), i64> {
    let header = transport_bytes::<{ sctp::COMMON_HDR_LEN }>(ctx, l4_offset, behind_extensions)
        .ok_or(-1i64)?;
    // From the payload length, as IPv4's from its total length.
    let payload = read::<2>(ctx, ETH_HDR_LEN + 4).ok_or(-1i64)?;
    let len =
        (usize::from(u16::from_be_bytes(payload)) + PLAIN_L4_OFFSET).saturating_sub(l4_offset);
    rewrite_sctp_ports(ctx, l4_offset, &header, len, (frontend.1, client_port))?;
    let source = frontend.0;
    ctx.store(ETH_HDR_LEN + IPV6_SADDR_OFFSET, &source, 0)?;
    Ok(())
}

/// A header without options: the IPv4 checksum, both addresses and the source port are
/// contiguous (bytes 10-21 of the IPv4 header), written with one store.
#[inline(always)]
fn store_source(ctx: &TcContext, tuple: &Tuple, addr: u32, port: u16) -> Result<(), i64> {
    let check = read::<2>(ctx, ETH_HDR_LEN + IPV4_CSUM_OFFSET).ok_or(-1i64)?;
    let check = checksum::replace_u32(u16::from_be_bytes(check), tuple.saddr, addr);
    let mut bytes = [0u8; 12];
    bytes[0..2].copy_from_slice(&check.to_be_bytes());
    bytes[2..6].copy_from_slice(&addr.to_be_bytes());
    bytes[6..10].copy_from_slice(&tuple.daddr.to_be_bytes());
    bytes[10..12].copy_from_slice(&port.to_be_bytes());
    ctx.store(ETH_HDR_LEN + IPV4_CSUM_OFFSET, &bytes, 0)?;
    Ok(())
}

/// An SCTP packet's [`Tuple`] fields from its common header and first chunk header: the flags
/// the chunk stands for, the verification tag, the chunk's summary.
#[inline(always)]
fn sctp_segment(header: &[u8; sctp::HDR_AND_CHUNK_LEN]) -> (u8, u32, u32) {
    let chunk = sctp::COMMON_HDR_LEN;
    let tag = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    (
        sctp::flags_of_chunk(header[chunk]),
        tag,
        sctp::chunk_summary(header[chunk], header[chunk + 1]),
    )
}

/// What tc egress looks at in an IPv6 frame.
enum Packet6 {
    /// A TCP, UDP or SCTP packet with its ports (TCP: with its flags and sequence), behind its
    /// extension headers; for UDP, its checksum.
    Segment {
        tuple: Tuple<V6>,
        l4_offset: usize,
        /// Whether extension headers come before the transport header.
        behind_extensions: bool,
        udp_checksum: u16,
        /// The identification of the datagram whose first fragment this is.
        first_fragment: Option<u32>,
    },
    /// A fragment after the first, with the key of its datagram.
    LaterFragment(Frag6Key),
}

/// The parse of an IPv6 frame: the fixed header, then, when extension headers follow it, the
/// walk over them ([`walk`]) to the transport header. `None` for anything else, which passes
/// untouched: another upper layer (ICMPv6 among them: neighbour discovery and the rest; errors
/// are [`icmp6_error_about_an_endpoints_flow`]'s), ESP, more extension headers than the walk
/// crosses, a header cut short. A payload length of 0 is a BIG TCP packet's
/// ([`ipv6::next_header_on_egress`]): translated as any other, its length the skb's.
#[inline(always)]
fn parse6(ctx: &TcContext) -> Option<Packet6> {
    let start = read(ctx, ETH_HDR_LEN)?;
    let mut next = ipv6::next_header_on_egress(&start)?;
    let mut l4_offset = PLAIN_L4_OFFSET;
    let behind_extensions = !is_transport(next) && next != next_header::ICMPV6;
    // The identification is set on every path, also when unused: an `Option` set on one path
    // only had LLVM spill a register the other path never wrote, which the verifier refuses
    // ("R6 !read_ok").
    let (mut is_first_fragment, mut fragment_id) = (false, 0);
    if behind_extensions {
        let walked = walk(ctx, next)?;
        if walked.later_fragment {
            let (saddr, daddr) = addresses6(ctx)?;
            return Some(Packet6::LaterFragment(Frag6Key {
                saddr,
                daddr,
                id: walked.fragment_id,
            }));
        }
        (is_first_fragment, fragment_id) = (walked.first_fragment, walked.fragment_id);
        (next, l4_offset) = (walked.next, walked.offset);
    }
    if !is_transport(next) || (big_tcp_length(&start) && next != proto::TCP) {
        return None;
    }
    let l4 = transport_bytes::<EXT_HDR_PEEK>(ctx, l4_offset, behind_extensions)?;
    let segment = if next == proto::TCP {
        segment_of(
            ctx,
            l4_offset,
            transport_bytes::<14>(ctx, l4_offset, behind_extensions)?,
        )?
    } else {
        (0, 0, 0)
    };
    let ports = [l4[0], l4[1], l4[2], l4[3]];
    Some(Packet6::Segment {
        tuple: tuple_of::<V6>(addresses6(ctx)?, &ports, next, segment),
        l4_offset,
        behind_extensions,
        udp_checksum: u16::from_be_bytes([l4[6], l4[7]]),
        first_fragment: is_first_fragment.then_some(fragment_id),
    })
}

/// Whether the fixed header's payload length is 0, which only a BIG TCP packet has on egress
/// ([`ipv6::next_header_on_egress`]): another protocol with it passes untouched (SCTP's CRC32c
/// is brought up to date over the length the field gives).
#[inline(always)]
fn big_tcp_length(start: &[u8; ipv6::FIXED_FIELDS_LEN]) -> bool {
    start[4] | start[5] == 0
}

/// The parse of an IPv6 frame whose TCP or UDP header follows the fixed header, as
/// [`lb_tc_egress`] found it for [`lb_tc_egress6_direct`] (read again: a tail call hands on
/// nothing but the packet), from the skb's linear data only; `None` when the headers are not
/// all in it (or the frame is not such a packet after all).
#[inline(always)]
fn parse6_plain(ctx: &TcContext) -> Option<(Tuple<V6>, u16)> {
    let fixed = linear::<IPV6_HDR_LEN>(ctx, ETH_HDR_LEN)?;
    let start = linear::<{ ipv6::FIXED_FIELDS_LEN }>(ctx, ETH_HDR_LEN)?;
    let next = ipv6::next_header_on_egress(start)?;
    let l4 = linear::<EXT_HDR_PEEK>(ctx, PLAIN_L4_OFFSET)?;
    let segment = if next == proto::TCP {
        segment_of(ctx, PLAIN_L4_OFFSET, *linear::<14>(ctx, PLAIN_L4_OFFSET)?)?
    } else if next == proto::UDP && !big_tcp_length(start) {
        (0, 0, 0)
    } else {
        return None;
    };
    let addresses = (
        packet_words(fixed, IPV6_SADDR_OFFSET),
        packet_words(fixed, IPV6_DADDR_OFFSET),
    );
    let ports = [l4[0], l4[1], l4[2], l4[3]];
    Some((
        tuple_of::<V6>(addresses, &ports, next, segment),
        u16::from_be_bytes([l4[6], l4[7]]),
    ))
}

/// `N` bytes at `offset` of the skb's linear data, in place, if they are in it.
#[inline(always)]
fn linear<const N: usize>(ctx: &TcContext, offset: usize) -> Option<&[u8; N]> {
    let start = ctx.data() + offset;
    if start + N > ctx.data_end() {
        return None;
    }
    // SAFETY: inside the skb's linear data, checked against data_end just above; only read.
    Some(unsafe { &*(start as *const [u8; N]) })
}

/// The tuple of a packet from its addresses, the first 4 bytes of its transport header (the
/// ports, of protocol `proto`) and what [`segment_of`] (TCP) or [`sctp_segment`] found.
#[inline(always)]
fn tuple_of<F: Family>(
    (saddr, daddr): (F::Addr, F::Addr),
    ports: &[u8; 4],
    proto: u8,
    (tcp_flags, seq, seq_end): (u8, u32, u32),
) -> Tuple<F> {
    Tuple {
        saddr,
        daddr,
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        proto,
        tcp_flags,
        seq,
        seq_end,
    }
}

/// Where the ICMPv6 error of an IPv6 frame whose first header after the fixed one is
/// `first_header` starts, or [`NO_ICMP6_ERROR`] when the frame is no ICMPv6 error (behind
/// extension headers or not; not a fragment). A BPF function of its own,
/// one number back: inlined, the walk's locals pushed `lb_tc_egress6`'s frame and the calls
/// under it past 512 bytes.
#[inline(never)]
fn icmp6_error_at(ctx: &TcContext, first_header: u8) -> usize {
    icmp6_error_offset(ctx, first_header).unwrap_or(NO_ICMP6_ERROR)
}

const NO_ICMP6_ERROR: usize = 0;

#[inline(always)]
fn icmp6_error_offset(ctx: &TcContext, first_header: u8) -> Option<usize> {
    let at = if first_header == next_header::ICMPV6 {
        PLAIN_L4_OFFSET
    } else {
        let walked = walk(ctx, first_header)?;
        if walked.next != next_header::ICMPV6 || walked.first_fragment || walked.later_fragment {
            return None;
        }
        walked.offset
    };
    let icmp6_type = ctx.load::<[u8; 1]>(at).ok()?;
    icmp::is_icmp6_error(icmp6_type[0]).then_some(at)
}

/// Where the transport header of an IPv6 packet without extension headers is.
const PLAIN_L4_OFFSET: usize = ETH_HDR_LEN + IPV6_HDR_LEN;

/// The upper layers tc egress translates (or counts) over IPv6.
#[inline(always)]
fn is_transport(next: u8) -> bool {
    next == proto::TCP || next == proto::UDP || next == proto::SCTP
}

/// Where the walk over extension headers ends.
struct Walked {
    /// The upper-layer protocol and where its header starts (a later fragment: what its
    /// Fragment header says follows, and no offset).
    next: u8,
    offset: usize,
    /// A Fragment header of offset 0 with More Fragments set was crossed.
    first_fragment: bool,
    /// The walk stopped at a Fragment header of an offset past 0.
    later_fragment: bool,
    /// The identification of the Fragment header crossed, if one was.
    fragment_id: u32,
}

/// The walk over the extension headers of an IPv6 packet ([`ipv6::step`], at most
/// [`MAX_EXT_HEADERS`]), from the first one, of type `next`, to the upper-layer header or to
/// the Fragment header of a later fragment; `None` past the last header crossed, at a header
/// cut short, or at a Routing header with segments left ([`ipv6::routes_on`]: the fixed
/// header's destination is a hop of a source route, not the client, as XDP's walk reads it).
#[inline(always)]
fn walk(ctx: &TcContext, first: u8) -> Option<Walked> {
    let mut walked = Walked {
        next: first,
        offset: PLAIN_L4_OFFSET,
        first_fragment: false,
        later_fragment: false,
        fragment_id: 0,
    };
    for _ in 0..=MAX_EXT_HEADERS {
        // Every header the walk crosses is at least 8 bytes, and so is every transport header
        // read after it (UDP's is 8): reading 8 at the upper-layer header too is no loss.
        let peek = read::<EXT_HDR_PEEK>(ctx, walked.offset)?;
        if routes_on(walked.next, &peek) {
            return None;
        }
        match ipv6::step(walked.next, &peek) {
            Step::Upper { .. } => return Some(walked),
            Step::Extension { next_header, len } => {
                walked.next = next_header;
                walked.offset += len;
            }
            Step::Fragment {
                next_header,
                fragment,
            } => {
                walked.next = next_header;
                walked.fragment_id = fragment.id;
                if fragment.is_later() {
                    walked.later_fragment = true;
                    return Some(walked);
                }
                walked.first_fragment = fragment.is_first();
                walked.offset += fragment_header_len(&peek[1]);
            }
        }
    }
    None
}

/// [`ipv6::routes_on`] on copies read again: tested on the values the walk goes on with, the
/// verifier would know more of them on one side than the other and walk every later state
/// twice (`lb_tc_egress6` 82,000 instructions to 182,000).
#[inline(always)]
fn routes_on(header_type: u8, peek: &[u8; EXT_HDR_PEEK]) -> bool {
    // SAFETY: reads of a live local and a live array.
    let (header_type, peek) = unsafe {
        (
            core::ptr::read_volatile(&header_type),
            core::ptr::read_volatile(peek),
        )
    };
    ipv6::routes_on(header_type, &peek)
}

/// `N` bytes of the transport header. Behind extension headers through the helper: a packet
/// pointer at a variable offset would make the verifier walk the rest of the program once for
/// each number of headers the walk crossed (the offset's range differs each time), where an
/// offset the program only hands to helpers is one it does not tell apart. Extension headers
/// are rare; the common packet reads its linear data at a constant offset. (Each branch returns
/// its own `None`: two `Option`s of bytes merging would have LLVM read an unset register.)
#[inline(always)]
fn transport_bytes<const N: usize>(
    ctx: &TcContext,
    l4_offset: usize,
    behind_extensions: bool,
) -> Option<[u8; N]> {
    let bytes = if behind_extensions {
        ctx.load::<[u8; N]>(l4_offset).ok()?
    } else {
        read::<N>(ctx, PLAIN_L4_OFFSET)?
    };
    Some(bytes)
}

/// The source and destination addresses of an IPv6 frame, as conntrack keeps them (the
/// packet's bytes): four 32-bit loads each from the skb's linear data when the fixed header is
/// in it ([`packet_words`]), else from a copy through the helper.
#[inline(always)]
fn addresses6(ctx: &TcContext) -> Option<(Ipv6Words, Ipv6Words)> {
    if let Some(fixed) = linear::<IPV6_HDR_LEN>(ctx, ETH_HDR_LEN) {
        return Some((
            packet_words(fixed, IPV6_SADDR_OFFSET),
            packet_words(fixed, IPV6_DADDR_OFFSET),
        ));
    }
    let fixed = ctx.load::<[u8; IPV6_HDR_LEN]>(ETH_HDR_LEN).ok()?;
    Some((words_at(&fixed, 8), words_at(&fixed, 24)))
}

/// The IPv6 address at `at` of the fixed header, as conntrack keeps it (the packet's bytes).
#[inline(always)]
fn words_at(fixed: &[u8; IPV6_HDR_LEN], at: usize) -> Ipv6Words {
    let word = |i: usize| {
        let start = at + i * 4;
        u32::from_ne_bytes([
            fixed[start],
            fixed[start + 1],
            fixed[start + 2],
            fixed[start + 3],
        ])
    };
    [word(0), word(1), word(2), word(3)]
}

/// Rewrites an IPv6 answer's source address and port to the frontend's, fixing the TCP/UDP
/// checksum (IPv6 has no header checksum). The address is 16 bytes, which
/// `bpf_l4_csum_replace` takes as a checksum difference ([`checksum::ipv6_diff`], size 0) with
/// BPF_F_PSEUDO_HDR, as it takes an IPv4 address; the port is not in the pseudo-header. Without
/// extension headers the source address, the destination address and the source port are
/// contiguous (bytes 8-41 from the IPv6 header), written with one store.
#[inline(always)]
fn snat6(
    ctx: &TcContext,
    tuple: &Tuple<V6>,
    l4_offset: usize,
    behind_extensions: bool,
    frontend: (Ipv6Words, u16),
) -> Result<(), i64> {
    let (addr, port) = frontend;
    let (csum_offset, flags) = l4_checksum(tuple, l4_offset);
    ctx.l4_csum_replace(
        csum_offset,
        0,
        u64::from(checksum::ipv6_diff(&tuple.saddr, &addr)),
        flags | u64::from(BPF_F_PSEUDO_HDR),
    )?;
    ctx.l4_csum_replace(
        csum_offset,
        u64::from(tuple.sport.to_be()),
        u64::from(port.to_be()),
        flags | 2,
    )?;
    let mut bytes = [0u8; 34];
    for (i, word) in addr.iter().enumerate() {
        bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    if !behind_extensions {
        for (i, word) in tuple.daddr.iter().enumerate() {
            bytes[16 + i * 4..20 + i * 4].copy_from_slice(&word.to_ne_bytes());
        }
        bytes[32..34].copy_from_slice(&port.to_be_bytes());
        ctx.store(ETH_HDR_LEN + IPV6_SADDR_OFFSET, &bytes, 0)?;
        return Ok(());
    }
    let mut source = [0u8; 16];
    source.copy_from_slice(&bytes[..16]);
    ctx.store(ETH_HDR_LEN + IPV6_SADDR_OFFSET, &source, 0)?;
    ctx.store(l4_offset, &port.to_be(), 0)?;
    Ok(())
}

/// Offset of the source address inside the IPv6 header.
const IPV6_SADDR_OFFSET: usize = 8;
/// Offset of the destination address inside the IPv6 header.
const IPV6_DADDR_OFFSET: usize = 24;
