//! The frontend filter ([`lb_common::map_names::FRONTEND_FILTER`]), kept in step with the
//! frontends: a bit for every frontend key's hash, set before a frontend with it is written and
//! cleared after the last one is removed.

use aya::maps::{Array, MapData};
use lb_common::{Frontend4Key, limits, map_names};

use super::error::{Result, map_error};

/// The frontend filter XDP passes the node's own traffic with ([`map_names::FRONTEND_FILTER`]),
/// and how many frontends have each bit. A bit is set before a frontend with it is written and
/// cleared after the last one is removed, so XDP never skips a frontend.
pub(super) struct FrontendFilter {
    map: Array<MapData, u64>,
    words: Vec<u64>,
    frontends: std::collections::HashMap<u32, usize>,
}

/// A frontend key's bit in the filter.
fn filter_bit(key: &Frontend4Key) -> u32 {
    lb_common::frontend_filter::bit(u32::from_be(key.addr), u16::from_be(key.port), key.proto)
}

impl FrontendFilter {
    /// The filter of these frontends, written whole.
    pub(super) fn rebuild<'a>(
        map: Array<MapData, u64>,
        keys: impl Iterator<Item = &'a Frontend4Key>,
    ) -> Result<Self> {
        let mut filter = Self {
            map,
            words: vec![0; limits::FRONTEND_FILTER_WORDS as usize],
            frontends: std::collections::HashMap::new(),
        };
        for key in keys {
            let bit = filter_bit(key);
            *filter.frontends.entry(bit).or_default() += 1;
            filter.words[(bit >> 6) as usize] |= 1 << (bit & 63);
        }
        for index in 0..limits::FRONTEND_FILTER_WORDS {
            filter.write(index)?;
        }
        Ok(filter)
    }

    /// Sets the bits of these frontends.
    pub(super) fn mark<'a>(&mut self, keys: impl Iterator<Item = &'a Frontend4Key>) -> Result<()> {
        for key in keys {
            let bit = filter_bit(key);
            let word = bit >> 6;
            let mask = 1u64 << (bit & 63);
            if self.words[word as usize] & mask == 0 {
                self.words[word as usize] |= mask;
                self.write(word)?;
            }
        }
        Ok(())
    }

    /// One more frontend has this key's bit.
    pub(super) fn count(&mut self, key: &Frontend4Key) {
        *self.frontends.entry(filter_bit(key)).or_default() += 1;
    }

    /// One frontend less has this key's bit; the last one clears it.
    pub(super) fn release(&mut self, key: &Frontend4Key) -> Result<()> {
        let bit = filter_bit(key);
        let Some(count) = self.frontends.get_mut(&bit) else {
            return Ok(());
        };
        *count -= 1;
        if *count == 0 {
            self.frontends.remove(&bit);
            self.words[(bit >> 6) as usize] &= !(1u64 << (bit & 63));
            self.write(bit >> 6)?;
        }
        Ok(())
    }

    fn write(&mut self, index: u32) -> Result<()> {
        self.map
            .set(index, &self.words[index as usize], 0)
            .map_err(|source| map_error(map_names::FRONTEND_FILTER, "write", source))
    }
}
