//! Conntrack entries written by an earlier datapath, brought to today's layout at load.

use std::collections::HashMap as StdHashMap;

use aya::maps::{HashMap, MapData, MapError};
use lb_common::{Ct4Key, Ct4Value, Flow4Value, ct_direction, ct_flags, flow_key, map_names};

use super::error::{Result, map_error};

/// include/uapi/linux/bpf.h: insert only if the key is new.
const BPF_NOEXIST: u64 = 1;

/// Gives every flow to a local endpoint that an earlier datapath kept as an ORIGINAL and a
/// REPLY entry its FLOW entry too, keyed by its client, so that it holds its client's key as
/// today's flows do: a new flow of the same client address and port to another frontend of the
/// same endpoint then finds the key held and is remapped, instead of sharing the reply tuple.
/// The old entries stay for the old programs, which run until the new ones are attached; the
/// new programs find the FLOW entry first, and the old entries age out. A key another flow
/// holds already is left alone (that flow goes on as a pair). Returns how many were added.
pub(super) fn pairs_to_flow_entries(
    conntrack: &mut HashMap<MapData, Ct4Key, Ct4Value>,
    entries: &[(Ct4Key, Ct4Value)],
) -> Result<usize> {
    let replies: StdHashMap<&Ct4Key, &Ct4Value> = entries
        .iter()
        .filter(|(key, _)| key.direction == ct_direction::REPLY)
        .map(|(key, value)| (key, value))
        .collect();
    let mut added = 0;
    for (key, original) in entries {
        if key.direction != ct_direction::ORIGINAL
            || original.flags & (ct_flags::SNAT | ct_flags::PORT_REMAP) != 0
        {
            continue;
        }
        let reply_key = Ct4Key {
            saddr: original.nat_addr,
            daddr: key.saddr,
            sport: original.nat_port,
            dport: key.sport,
            proto: key.proto,
            direction: ct_direction::REPLY,
            _pad: [0; 2],
        };
        let flow = Flow4Value {
            last_seen_ns: original.last_seen_ns,
            backend_id: original.backend_id,
            service_id: original.service_id,
            backend_addr: original.nat_addr,
            backend_port: original.nat_port,
            state: original.state,
            flags: original.flags | ct_flags::CLIENT_IN_FLOW,
            frontend_addr: key.daddr,
            frontend_port: key.dport,
            backend_seq_next: replies.get(&reply_key).map_or(0, |reply| reply.seq_next),
            seq_next: original.seq_next,
            ..Flow4Value::default()
        };
        match conntrack.insert(
            &flow_key(key.saddr, key.sport, key.proto),
            &flow.into_entry(),
            BPF_NOEXIST,
        ) {
            Ok(()) => added += 1,
            Err(MapError::SyscallError(error))
                if error.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(source) => return Err(map_error(map_names::CONNTRACK4, "migrate", source)),
        }
    }
    Ok(added)
}
