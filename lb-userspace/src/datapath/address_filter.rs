//! The address filters the programs skip lookups with: one-hash Bloom filters of (address,
//! port, protocol) keys ([`lb_common::frontend_filter::bit`]), kept in step with the keys they
//! stand for: a bit is set before a key with it is written to its map and cleared after the
//! last one is removed, so a program never skips a key that is there.
//!
//! - the frontend filter ([`lb_common::map_names::FRONTEND_FILTER`]): XDP passes a packet to no frontend
//!   without a conntrack or frontend lookup;
//! - the backend filter ([`lb_common::map_names::BACKEND_FILTER`]): tc egress lets a packet from no
//!   backend leave without a conntrack lookup. Its bits are set, never cleared while the agent
//!   runs (a flow keeps its backend after the backend leaves the maps), and rebuilt at load from
//!   the backends and the sources of the REPLY entries in conntrack.

use std::collections::HashMap;

use aya::maps::{Array, MapData};
use std::net::IpAddr;

use lb_common::limits;

use super::error::{Result, map_error};
use crate::compile::model::{Backend, FrontendKey};

/// A key of a filter: address and port as numbers (host order of the wire bytes), protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FilterKey {
    addr: FilterAddr,
    port: u16,
    proto: u8,
}

/// A filter key's address: IPv4 as a number, IPv6 as conntrack keeps it (the packet's bytes,
/// [`lb_common::Ipv6Words`]). Each family hashes its own ([`lb_common::frontend_filter::bit`],
/// [`lb_common::frontend_filter::bit6`]) into the one filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FilterAddr {
    V4(u32),
    V6(lb_common::Ipv6Words),
}

impl FilterKey {
    /// Address and port as numbers (host order of the wire bytes, as conntrack keys hold them).
    pub(super) fn new(addr: u32, port: u16, proto: u8) -> Self {
        Self {
            addr: FilterAddr::V4(addr),
            port,
            proto,
        }
    }

    fn bit(self) -> u32 {
        match self.addr {
            FilterAddr::V4(addr) => lb_common::frontend_filter::bit(addr, self.port, self.proto),
            FilterAddr::V6(addr) => lb_common::frontend_filter::bit6(addr, self.port, self.proto),
        }
    }

    /// The key of a frontend of either family: XDP serves both.
    pub(super) fn of_frontend(key: &FrontendKey) -> Option<Self> {
        Some(match key {
            FrontendKey::V4(key) => Self {
                addr: FilterAddr::V4(u32::from_be(key.addr)),
                port: u16::from_be(key.port),
                proto: key.proto,
            },
            FrontendKey::V6(key) => Self {
                addr: FilterAddr::V6(key.addr),
                port: u16::from_be(key.port),
                proto: key.proto,
            },
        })
    }

    /// An IPv6 key: address as conntrack keys hold it, port as a number.
    pub(super) fn new6(addr: lb_common::Ipv6Words, port: u16, proto: u8) -> Self {
        Self {
            addr: FilterAddr::V6(addr),
            port,
            proto,
        }
    }

    /// The key of a backend of either family: tc egress serves the answers of both.
    pub(super) fn of_backend(backend: &Backend) -> Option<Self> {
        let addr = match backend.addr {
            IpAddr::V4(addr) => FilterAddr::V4(u32::from(addr)),
            IpAddr::V6(addr) => FilterAddr::V6(crate::compile::model::ipv6_words(addr)),
        };
        Some(Self {
            addr,
            port: backend.port,
            proto: backend.proto,
        })
    }
}

/// A filter as the programs read it, and how many keys have each bit.
pub(super) struct AddressFilter {
    name: &'static str,
    map: Array<MapData, u64>,
    words: Vec<u64>,
    keys: HashMap<u32, usize>,
}

impl AddressFilter {
    /// The filter `name` of these keys, written whole.
    pub(super) fn rebuild(
        name: &'static str,
        map: Array<MapData, u64>,
        keys: impl Iterator<Item = FilterKey>,
    ) -> Result<Self> {
        let mut filter = Self {
            name,
            map,
            words: vec![0; limits::FRONTEND_FILTER_WORDS as usize],
            keys: HashMap::new(),
        };
        for key in keys {
            let bit = key.bit();
            *filter.keys.entry(bit).or_default() += 1;
            filter.words[(bit >> 6) as usize] |= 1 << (bit & 63);
        }
        for index in 0..limits::FRONTEND_FILTER_WORDS {
            filter.write(index)?;
        }
        Ok(filter)
    }

    /// Sets the bits of these keys (before they are written to their map).
    pub(super) fn mark(&mut self, keys: impl Iterator<Item = FilterKey>) -> Result<()> {
        for key in keys {
            let bit = key.bit();
            let word = bit >> 6;
            let mask = 1u64 << (bit & 63);
            if self.words[word as usize] & mask == 0 {
                self.words[word as usize] |= mask;
                self.write(word)?;
            }
        }
        Ok(())
    }

    /// One more key has this key's bit.
    pub(super) fn count(&mut self, key: FilterKey) {
        *self.keys.entry(key.bit()).or_default() += 1;
    }

    /// One key less has this key's bit; the last one clears it.
    pub(super) fn release(&mut self, key: FilterKey) -> Result<()> {
        let bit = key.bit();
        let Some(count) = self.keys.get_mut(&bit) else {
            return Ok(());
        };
        *count -= 1;
        if *count == 0 {
            self.keys.remove(&bit);
            self.words[(bit >> 6) as usize] &= !(1u64 << (bit & 63));
            self.write(bit >> 6)?;
        }
        Ok(())
    }

    fn write(&mut self, index: u32) -> Result<()> {
        self.map
            .set(index, &self.words[index as usize], 0)
            .map_err(|source| map_error(self.name, "write", source))
    }
}
