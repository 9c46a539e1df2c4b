//! Maglev's lookup table and flow hash as docs/maglev.md specifies them, implemented apart from
//! the agent and the datapath (other crates for SipHash and MurmurHash3) for tests to check their
//! choices against.

/// A lookup table of `m` slots as docs/maglev.md specifies it: each backend's preference list
/// is Maglev's permutation (Eisenbud et al., NSDI 2016, section 3.4), offset and skip from
/// SipHash-1-3 (the `siphasher` crate) of the identity under the documented keys; in round `j`
/// every backend below its cap (105% of `m / n` rounded down, or `m / n` rounded up if more), in
/// the order of the identities, takes its list's `j`-th slot if it is free; then every backend
/// below its floor (85% of `m / n` rounded up, or `m / n` rounded down if less) walks its list
/// from the start and takes the slots of backends holding more than `m / n` rounded down. Returns,
/// for each slot, the index into `identities` of its backend.
pub fn table(identities: &[String], m: usize) -> Vec<usize> {
    use std::hash::Hasher as _;
    let siphash = |key: &[u8; 16], data: &[u8]| {
        let k0 = u64::from_le_bytes(key[..8].try_into().expect("8 bytes"));
        let k1 = u64::from_le_bytes(key[8..].try_into().expect("8 bytes"));
        let mut hasher = siphasher::sip::SipHasher13::new_with_keys(k0, k1);
        hasher.write(data);
        hasher.finish()
    };
    let n = identities.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| identities[a].cmp(&identities[b]));
    let lists: Vec<Vec<usize>> = order
        .iter()
        .map(|&i| {
            let identity = identities[i].as_bytes();
            let offset = siphash(b"lb-maglev-offset", identity) % m as u64;
            let skip = siphash(b"lb-maglev-skip!!", identity) % (m as u64 - 1) + 1;
            (0..m as u64)
                .map(|j| ((offset + j * skip) % m as u64) as usize)
                .collect()
        })
        .collect();
    let cap = ((m * 105) / (n * 100)).max(m.div_ceil(n));
    let floor = (m * 85).div_ceil(n * 100).min(m / n);
    let mut owner: Vec<Option<usize>> = vec![None; m];
    let mut held = vec![0usize; n];
    for j in 0..m {
        for (turn, list) in lists.iter().enumerate() {
            let backend = order[turn];
            if held[backend] < cap && owner[list[j]].is_none() {
                owner[list[j]] = Some(backend);
                held[backend] += 1;
            }
        }
    }
    for (turn, list) in lists.iter().enumerate() {
        let backend = order[turn];
        for &slot in list {
            if held[backend] >= floor {
                break;
            }
            let other = owner[slot].expect("every slot raced for");
            if other != backend && held[other] > m / n {
                owner[slot] = Some(backend);
                held[other] -= 1;
                held[backend] += 1;
            }
        }
    }
    owner
        .into_iter()
        .map(|o| o.expect("every slot raced for"))
        .collect()
}

/// The flow hash docs/maglev.md specifies: MurmurHash3 x86_32 (the `murmur3` crate), seed
/// "lbfh" little-endian, over the 16 little-endian bytes of saddr, daddr, sport << 16 | dport
/// and the protocol.
pub fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, protocol: u8) -> u32 {
    let mut bytes = Vec::with_capacity(16);
    for word in [
        saddr,
        daddr,
        u32::from(sport) << 16 | u32::from(dport),
        u32::from(protocol),
    ] {
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    let seed = u32::from_le_bytes(*b"lbfh");
    murmur3::murmur3_32(&mut std::io::Cursor::new(bytes), seed).expect("hashing a buffer")
}

/// The IPv6 flow hash docs/maglev.md specifies: as [`flow_hash`], over the 40 little-endian bytes
/// of the source's four words, the destination's four (each word `u32::from_be_bytes` of four
/// address bytes), sport << 16 | dport and the protocol.
pub fn flow_hash6(
    saddr: std::net::Ipv6Addr,
    daddr: std::net::Ipv6Addr,
    sport: u16,
    dport: u16,
    protocol: u8,
) -> u32 {
    let mut bytes = Vec::with_capacity(40);
    for addr in [saddr, daddr] {
        for word in addr.octets().as_chunks::<4>().0 {
            let word = u32::from_be_bytes(*word);
            bytes.extend_from_slice(&word.to_le_bytes());
        }
    }
    for word in [
        u32::from(sport) << 16 | u32::from(dport),
        u32::from(protocol),
    ] {
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    let seed = u32::from_le_bytes(*b"lbfh");
    murmur3::murmur3_32(&mut std::io::Cursor::new(bytes), seed).expect("hashing a buffer")
}

#[cfg(test)]
mod tests {
    /// The agent's generator gives the tables this one does, at the sizes the datapath gives
    /// 1 to 300 backends, and at sizes so small that the caps round up to the share and the
    /// floors down to it.
    #[test]
    fn the_agent_builds_the_same_tables() {
        for (n, m) in [
            (1, 2),
            (2, 3),
            (3, 7),
            (50, 251),
            (250, 251),
            (1, 251),
            (2, 251),
            (3, 509),
            (10, 1021),
            (33, 1021),
            (100, 16381),
            (250, 16381),
            (300, 32749),
        ] {
            let identities: Vec<String> = (0..n)
                .map(|i| format!("10.244.{}.{}:8080/6", i / 250, i % 250 + 1))
                .collect();
            let agent: Vec<usize> = lb_userspace::datapath::maglev::table(&identities, m as u32)
                .expect("table")
                .into_iter()
                .map(|owner| owner as usize)
                .collect();
            assert!(agent == super::table(&identities, m), "N={n} M={m}");
        }
    }
}
