//! Maglev as docs/maglev.md specifies it, implemented apart from the agent and the datapath
//! (other crates for SipHash and MurmurHash3) for tests to check their choices against.

/// A Maglev lookup table of `m` slots by pseudocode 1 of Eisenbud et al., "Maglev: A Fast and
/// Reliable Software Network Load Balancer" (NSDI 2016, section 3.4), as docs/maglev.md
/// specifies it: backends in the order of their identities, offset and skip from SipHash-1-3
/// (the `siphasher` crate) of the identity under the documented keys. Returns, for each slot,
/// the index into `identities` of its backend.
pub fn table(identities: &[String], m: usize) -> Vec<usize> {
    use std::hash::Hasher as _;
    let siphash = |key: &[u8; 16], data: &[u8]| {
        let k0 = u64::from_le_bytes(key[..8].try_into().expect("8 bytes"));
        let k1 = u64::from_le_bytes(key[8..].try_into().expect("8 bytes"));
        let mut hasher = siphasher::sip::SipHasher13::new_with_keys(k0, k1);
        hasher.write(data);
        hasher.finish()
    };
    let mut order: Vec<usize> = (0..identities.len()).collect();
    order.sort_by(|&a, &b| identities[a].cmp(&identities[b]));
    let permutation: Vec<(usize, usize)> = order
        .iter()
        .map(|&i| {
            let identity = identities[i].as_bytes();
            let offset = siphash(b"lb-maglev-offset", identity) % m as u64;
            let skip = siphash(b"lb-maglev-skip!!", identity) % (m as u64 - 1) + 1;
            (offset as usize, skip as usize)
        })
        .collect();
    let mut next = vec![0usize; order.len()];
    let mut entry: Vec<Option<usize>> = vec![None; m];
    let mut filled = 0;
    loop {
        for (turn, &(offset, skip)) in permutation.iter().enumerate() {
            let mut c = (offset + next[turn] * skip) % m;
            while entry[c].is_some() {
                next[turn] += 1;
                c = (offset + next[turn] * skip) % m;
            }
            entry[c] = Some(order[turn]);
            next[turn] += 1;
            filled += 1;
            if filled == m {
                return entry.into_iter().map(|e| e.expect("filled")).collect();
            }
        }
    }
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
