//! The frontend indexes XDP looks frontends up in ([`map_names::FRONTEND_INDEX4`],
//! [`map_names::FRONTEND_INDEX6`]): a copy of each frontends-map entry of scope ANY in one cache
//! line, in a bucket of two slots chosen by the frontend's hash ([`lb_common::frontend_index`]).
//! The frontends maps stay the truth: the socket hooks and the inspection read them, and XDP does
//! for a packet its bucket lacks while the bucket's `overflow` byte is set.
//!
//! A reader never sees a slot half written, without locks: each write the agent makes changes
//! one byte a reader looks at, or bytes no reader can be looking at (see
//! [`lb_common::FrontendSlotHead`]):
//! - a frontend new to the index goes into a free slot of its bucket, key and entry first, then
//!   `live` (two updates);
//! - before a frontend's entry changes or goes, its bucket's `overflow` is set, then its slot's
//!   `live` cleared: XDP finds it in the frontends map meanwhile. The slot is free again only
//!   after a grace period ([`FrontendIndex::refill`]), once no program can still be reading it;
//! - after that grace period each frontend its bucket lacks is copied in again from the
//!   frontends map, and the bucket's `overflow` cleared once it lacks none.
//!
//! A slot also carries its frontend's selection table (the backend ids of its cells in the slot
//! array) when the table is small enough ([`lb_common::FrontendSlot`]): XDP then selects a new
//! flow's backend from the line it read the frontend from. The slot's copy is written with the
//! entry. An entry can come back to cells it named before with another table in them (the slot
//! array hands out its first free cells), so a slot stays only while both its entry and its
//! table are the ones the agent writes: a write compares both, and an adopted slot's table is
//! checked against the table the slot array holds.
//!
//! A bucket of two slots holds all its frontends but for a few percent of them at 100k
//! frontends in 2^18 slots; the others stay in the frontends map alone, behind `overflow`.

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
};

use lb_common::{
    FrontendKey, FrontendSlot, FrontendSlot4, FrontendSlot6, FrontendSlotHead, Ipv6Words,
    ServiceValue, frontend_filter, frontend_index,
};

/// A slot type of an index: its head, and the hash that places its key.
pub(super) trait IndexSlot: Copy + Default {
    type Addr: Copy + Eq + Hash;
    fn head(&self) -> &FrontendSlotHead<Self::Addr>;
    fn head_mut(&mut self) -> &mut FrontendSlotHead<Self::Addr>;
    /// Makes the slot carry `table` (the backend ids of the entry's table, in cell order), or
    /// no table when it holds more than the slot has room for, or none is given.
    fn carry(&mut self, table: &[u32]);
    /// The table the slot carries (empty: none).
    fn carried(&self) -> &[u32];
    /// The frontend filter's bit of `key` (the index shares its hash).
    fn filter_bit(key: &FrontendKey<Self::Addr>) -> u32;
}

impl IndexSlot for FrontendSlot4 {
    type Addr = u32;
    fn head(&self) -> &FrontendSlotHead<u32> {
        &self.head
    }
    fn head_mut(&mut self) -> &mut FrontendSlotHead<u32> {
        &mut self.head
    }
    fn carry(&mut self, table: &[u32]) {
        carry(self, table);
    }
    fn carried(&self) -> &[u32] {
        carried(self)
    }
    fn filter_bit(key: &FrontendKey<u32>) -> u32 {
        frontend_filter::bit(u32::from_be(key.addr), u16::from_be(key.port), key.proto)
    }
}

impl IndexSlot for FrontendSlot6 {
    type Addr = Ipv6Words;
    fn head(&self) -> &FrontendSlotHead<Ipv6Words> {
        &self.head
    }
    fn head_mut(&mut self) -> &mut FrontendSlotHead<Ipv6Words> {
        &mut self.head
    }
    fn carry(&mut self, table: &[u32]) {
        carry(self, table);
    }
    fn carried(&self) -> &[u32] {
        carried(self)
    }
    fn filter_bit(key: &FrontendKey<Ipv6Words>) -> u32 {
        frontend_filter::bit6(key.addr, u16::from_be(key.port), key.proto)
    }
}

/// [`IndexSlot::carry`] for a slot with room for `N` backend ids.
fn carry<A, const N: usize>(slot: &mut FrontendSlot<A, N>, table: &[u32]) {
    slot.backends = [0; N];
    if table.len() > N {
        slot.head.inline_backends = 0;
        return;
    }
    slot.backends[..table.len()].copy_from_slice(table);
    // N is at most 7 (a slot is one cache line).
    slot.head.inline_backends = table.len() as u8;
}

/// [`IndexSlot::carried`] for a slot with room for `N` backend ids.
fn carried<A, const N: usize>(slot: &FrontendSlot<A, N>) -> &[u32] {
    &slot.backends[..usize::from(slot.head.inline_backends).min(N)]
}

/// Whether `slot` holds `value` and carries what the agent would write with it for `table`.
fn holds<S: IndexSlot>(slot: &S, value: &ServiceValue, table: &[u32]) -> bool {
    let mut expected = S::default();
    expected.carry(table_to_carry(value, table));
    slot.head().value == *value
        && slot.head().inline_backends == expected.head().inline_backends
        && slot.carried() == expected.carried()
}

/// `table` if it is `value`'s size, else none (XDP then reads the slot array).
fn table_to_carry<'t>(value: &ServiceValue, table: &'t [u32]) -> &'t [u32] {
    if table.len() == usize::from(value.backend_count) {
        table
    } else {
        &[]
    }
}

/// Where an index's slots are: the kernel's array (one syscall per read or write, which keeps
/// the 16 MiB out of the agent's memory), or a vector in the unit tests.
pub(super) trait SlotStore<S> {
    type Error;
    fn read(&self, slot: u32) -> Result<S, Self::Error>;
    fn write(&mut self, slot: u32, value: &S) -> Result<(), Self::Error>;
}

impl<S: aya::Pod> SlotStore<S> for aya::maps::Array<aya::maps::MapData, S> {
    type Error = aya::maps::MapError;
    fn read(&self, slot: u32) -> Result<S, Self::Error> {
        self.get(&slot, 0)
    }
    fn write(&mut self, slot: u32, value: &S) -> Result<(), Self::Error> {
        self.set(slot, value, 0)
    }
}

/// The index pinned as `name` under `pin_dir`, adopted as [`FrontendIndex::adopt`] says, with
/// `entries` the frontends map's entries (those of scope ANY are the index's) and `table_of`
/// the table the slot array holds for an entry (empty when unknown).
pub(super) fn open<S: IndexSlot + aya::Pod>(
    pin_dir: &std::path::Path,
    name: &'static str,
    entries: impl IntoIterator<Item = (FrontendKey<S::Addr>, ServiceValue)>,
    table_of: impl Fn(&ServiceValue) -> Vec<u32>,
) -> super::error::Result<FrontendIndex<S, aya::maps::Array<aya::maps::MapData, S>>> {
    use std::os::fd::AsFd as _;
    let store: aya::maps::Array<aya::maps::MapData, S> =
        super::maps::open_map(pin_dir, name, super::bpf_obj::Access::ReadWrite)?;
    let mut slots = Vec::new();
    super::batch::visit_all(
        aya::maps::IterableMap::map(&store).fd().as_fd(),
        |slot: u32, value: S| {
            if value.head().live != 0 || value.head().overflow != 0 {
                slots.push((slot, value));
            }
        },
    )
    .map_err(|io_error| walk_error(name, io_error))?;
    let entries = entries
        .into_iter()
        .filter(|(key, _)| key.scope == lb_common::scope::ANY)
        .collect();
    FrontendIndex::adopt(store, slots, entries, table_of)
        .map_err(|source| super::error::map_error(name, "adopt", source))
}

fn walk_error(name: &'static str, io_error: std::io::Error) -> super::DatapathError {
    super::error::map_error(
        name,
        "read",
        aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_lookup_batch",
            io_error,
        }),
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    Live,
    /// Not live any more, but a program may still be reading it: free after a grace period.
    Retired,
}

/// One family's index, as the agent keeps it.
///
/// Invariants: a frontend (scope ANY, in the frontends map) is placed (a live slot of its
/// bucket), missing (read from the map by XDP: its bucket's `overflow` is set), or neither only
/// while it is new and being placed, or in `retry` after a write failed. A bucket's `overflow`
/// goes 0 only a grace period after its last missing frontend stopped being missing: a program
/// that read the bucket before that frontend's slot went live may still be about to read the
/// byte.
pub(super) struct FrontendIndex<S: IndexSlot, M> {
    store: M,
    states: Vec<SlotState>,
    /// Where each frontend the index serves is.
    placed: HashMap<FrontendKey<S::Addr>, u32>,
    retired: Vec<u32>,
    /// Every slot not live is retired (an adopted index, until its first grace period).
    retired_all: bool,
    /// Frontends of the frontends map (scope ANY) the index lacks, served from there.
    missing: HashSet<FrontendKey<S::Addr>>,
    /// How many of them each bucket (by its first slot) lacks.
    missing_by_bucket: HashMap<u32, u32>,
    /// Buckets whose `overflow` byte is 1 in the map.
    flagged: HashSet<u32>,
    /// Flagged buckets that lacked nothing any more since the last grace period.
    settling: HashSet<u32>,
    /// Frontends whose marking as missing failed (a map write): marked by the next refill.
    retry: HashSet<FrontendKey<S::Addr>>,
    /// The last refill failed part way: the next one finishes it.
    refill_failed: bool,
}

impl<S: IndexSlot, M: SlotStore<S>> FrontendIndex<S, M> {
    /// The index in `store`, which may hold what an earlier agent wrote (`slots`: each slot it
    /// holds that is live or has `overflow` set). Every live slot that is not a copy of its
    /// frontend's entry in `entries` (the frontends map's entries of scope ANY) with the table
    /// `table_of` gives for that entry (the slot array's cells) is retired, and every other
    /// entry is missing until [`Self::refill`]. Slots not live may still be read by
    /// a program (one an earlier agent retired just before it stopped): they are free only
    /// after the first grace period too, as buckets flagged with nothing missing are cleared.
    pub(super) fn adopt(
        store: M,
        slots: impl IntoIterator<Item = (u32, S)>,
        entries: HashMap<FrontendKey<S::Addr>, ServiceValue>,
        table_of: impl Fn(&ServiceValue) -> Vec<u32>,
    ) -> Result<Self, M::Error> {
        let mut index = Self::empty(store);
        index.states.fill(SlotState::Retired);
        index.retired_all = true;
        let mut stale = Vec::new();
        for (slot, value) in slots {
            let head = value.head();
            if head.overflow != 0 && slot % frontend_index::BUCKET_SLOTS == 0 {
                index.flagged.insert(slot);
                index.settling.insert(slot);
            }
            if head.live == 0 {
                continue;
            }
            let current = entries
                .get(&head.key)
                .is_some_and(|entry| holds(&value, entry, &table_of(entry)))
                && Self::bucket(&head.key) == slot & !(frontend_index::BUCKET_SLOTS - 1)
                && !index.placed.contains_key(&head.key);
            if current {
                index.placed.insert(head.key, slot);
                index.states[slot as usize] = SlotState::Live;
            } else {
                stale.push(slot);
            }
        }
        // Flags before slots go: a packet whose slot goes must find its frontend in the map.
        for key in entries.keys() {
            if !index.placed.contains_key(key) {
                index.mark_missing(*key)?;
            }
        }
        for slot in stale {
            index.retire(slot)?;
        }
        Ok(index)
    }

    /// The index in `store`, whose slots no program has read yet (all free).
    fn empty(store: M) -> Self {
        Self {
            store,
            states: vec![SlotState::Free; frontend_index::SLOTS as usize],
            placed: HashMap::new(),
            retired: Vec::new(),
            retired_all: false,
            missing: HashSet::new(),
            missing_by_bucket: HashMap::new(),
            flagged: HashSet::new(),
            settling: HashSet::new(),
            retry: HashSet::new(),
            refill_failed: false,
        }
    }

    /// The first slot of `key`'s bucket.
    fn bucket(key: &FrontendKey<S::Addr>) -> u32 {
        frontend_index::first_slot(S::filter_bit(key))
    }

    /// Before `key`'s entry in the frontends map becomes `value` with the selection table
    /// `table`: a slot with another entry, or another table, is retired, its frontend missing
    /// from then on. On an error nothing changed, and the map must not be written either.
    pub(super) fn before_write(
        &mut self,
        key: &FrontendKey<S::Addr>,
        value: &ServiceValue,
        table: &[u32],
    ) -> Result<(), M::Error> {
        let Some(&slot) = self.placed.get(key) else {
            return Ok(());
        };
        if holds(&self.store.read(slot)?, value, table) {
            return Ok(());
        }
        self.take_out(key, slot)
    }

    /// After `key`'s entry in the frontends map became `value`, whose selection table holds
    /// `table` (the backend ids in cell order): a frontend new to the index goes into a free
    /// slot of its bucket, else it is (or stays) missing. On an error the frontend is missing,
    /// or in `retry` for the next refill.
    pub(super) fn after_write(
        &mut self,
        key: &FrontendKey<S::Addr>,
        value: &ServiceValue,
        table: &[u32],
    ) -> Result<(), M::Error> {
        if self.placed.contains_key(key) {
            return Ok(());
        }
        if self.missing.contains(key) {
            // Its old slot may still be read: the bucket keeps its `overflow` until a grace
            // period after the frontend is back in a slot.
            if self.place(key, value, table)? {
                self.unmark_missing(key);
            }
            return Ok(());
        }
        // New to the index: a program that finds it in no slot yet takes it for not yet there.
        match self.place(key, value, table) {
            Ok(true) => Ok(()),
            Ok(false) => self.mark_missing_or_retry(*key),
            Err(error) => {
                // The error is the one to report; the frontend goes to the map or to `retry`.
                let _ = self.mark_missing_or_retry(*key);
                Err(error)
            }
        }
    }

    /// Before `key`'s entry leaves the frontends map: its slot is retired, and the frontend
    /// missing until [`Self::after_remove`] (still found if the removal fails). On an error
    /// nothing changed, and the map must not be written either.
    pub(super) fn before_remove(&mut self, key: &FrontendKey<S::Addr>) -> Result<(), M::Error> {
        match self.placed.get(key) {
            Some(&slot) => self.take_out(key, slot),
            None => Ok(()),
        }
    }

    /// After `key`'s entry left the frontends map.
    pub(super) fn after_remove(&mut self, key: &FrontendKey<S::Addr>) {
        self.retry.remove(key);
        self.unmark_missing(key);
    }

    /// Whether a refill has work after a grace period: slots to free, buckets whose `overflow`
    /// may go, frontends to mark, or a failed refill to finish.
    pub(super) fn needs_refill(&self) -> bool {
        self.retired_all
            || !self.retired.is_empty()
            || !self.settling.is_empty()
            || !self.retry.is_empty()
            || self.refill_failed
    }

    /// After a grace period that began after every change so far: the retired slots are free,
    /// each missing frontend goes into a free slot of its bucket with its entry in the frontends
    /// map and that entry's table (`lookup`) if there is one, and the buckets that lacked
    /// nothing before the grace period lose their `overflow`. A failure leaves the rest for the next refill, which
    /// [`Self::needs_refill`] then asks for.
    pub(super) fn refill(
        &mut self,
        lookup: impl Fn(&FrontendKey<S::Addr>) -> Result<Option<(ServiceValue, Vec<u32>)>, M::Error>,
    ) -> Result<(), M::Error> {
        let settled = std::mem::take(&mut self.settling);
        if std::mem::take(&mut self.retired_all) {
            for state in &mut self.states {
                if *state == SlotState::Retired {
                    *state = SlotState::Free;
                }
            }
        }
        for slot in std::mem::take(&mut self.retired) {
            self.states[slot as usize] = SlotState::Free;
        }
        let mut first_error = None;
        let mut note = |result: Result<(), M::Error>| {
            if let Err(error) = result
                && first_error.is_none()
            {
                first_error = Some(error);
            }
        };
        for key in std::mem::take(&mut self.retry) {
            note(self.mark_missing_or_retry(key));
        }
        let missing: Vec<FrontendKey<S::Addr>> = self.missing.iter().copied().collect();
        for key in missing {
            note(self.refill_one(&key, &lookup));
        }
        for bucket in settled {
            if self.missing_by_bucket.contains_key(&bucket) || !self.flagged.contains(&bucket) {
                continue;
            }
            match self.set_overflow(bucket, false) {
                Ok(()) => {
                    self.flagged.remove(&bucket);
                }
                Err(error) => {
                    self.settling.insert(bucket);
                    note(Err(error));
                }
            }
        }
        self.refill_failed = first_error.is_some();
        first_error.map_or(Ok(()), Err)
    }

    /// A missing frontend back into a slot with its entry in the map, or forgotten when the map
    /// has none.
    fn refill_one(
        &mut self,
        key: &FrontendKey<S::Addr>,
        lookup: impl Fn(&FrontendKey<S::Addr>) -> Result<Option<(ServiceValue, Vec<u32>)>, M::Error>,
    ) -> Result<(), M::Error> {
        match lookup(key)? {
            None => self.unmark_missing(key),
            Some((value, table)) => {
                if self.place(key, &value, &table)? {
                    self.unmark_missing(key);
                }
            }
        }
        Ok(())
    }

    /// How many frontends the index serves, and how many it lacks.
    pub(super) fn counts(&self) -> (usize, usize) {
        (self.placed.len(), self.missing.len() + self.retry.len())
    }

    /// Retires the placed `key`'s slot, the key missing from before: on an error, as before.
    fn take_out(&mut self, key: &FrontendKey<S::Addr>, slot: u32) -> Result<(), M::Error> {
        let was_missing = self.missing.contains(key);
        self.mark_missing(*key)?;
        if let Err(error) = self.retire(slot) {
            if !was_missing {
                // Still live with its entry: not missing after all (its bucket's `overflow`
                // goes after a grace period, like any).
                self.unmark_missing(key);
            }
            return Err(error);
        }
        self.placed.remove(key);
        Ok(())
    }

    /// Writes `key`, `value` and its `table` into a free slot of the key's bucket, then makes
    /// it live. A table that is not the entry's size is not carried (XDP then reads the slot
    /// array).
    fn place(
        &mut self,
        key: &FrontendKey<S::Addr>,
        value: &ServiceValue,
        table: &[u32],
    ) -> Result<bool, M::Error> {
        let first = Self::bucket(key);
        let Some(slot) = (first..first + frontend_index::BUCKET_SLOTS)
            .find(|slot| self.states[*slot as usize] == SlotState::Free)
        else {
            return Ok(false);
        };
        let mut contents = self.store.read(slot)?;
        let head = contents.head_mut();
        head.key = *key;
        head.value = *value;
        head.live = 0;
        contents.carry(table_to_carry(value, table));
        self.store.write(slot, &contents)?;
        contents.head_mut().live = 1;
        self.store.write(slot, &contents)?;
        self.states[slot as usize] = SlotState::Live;
        self.placed.insert(*key, slot);
        Ok(true)
    }

    /// Clears a slot's `live`; the slot is free after the next grace period. On an error, as
    /// before.
    fn retire(&mut self, slot: u32) -> Result<(), M::Error> {
        let mut contents = self.store.read(slot)?;
        contents.head_mut().live = 0;
        self.store.write(slot, &contents)?;
        self.states[slot as usize] = SlotState::Retired;
        self.retired.push(slot);
        Ok(())
    }

    /// Marks `key` missing, its bucket's `overflow` set first. On an error, as before.
    fn mark_missing(&mut self, key: FrontendKey<S::Addr>) -> Result<(), M::Error> {
        if self.missing.contains(&key) {
            return Ok(());
        }
        let bucket = Self::bucket(&key);
        if !self.flagged.contains(&bucket) {
            self.set_overflow(bucket, true)?;
            self.flagged.insert(bucket);
        }
        self.missing.insert(key);
        *self.missing_by_bucket.entry(bucket).or_insert(0) += 1;
        Ok(())
    }

    /// [`Self::mark_missing`], or `key` into `retry` when that fails.
    fn mark_missing_or_retry(&mut self, key: FrontendKey<S::Addr>) -> Result<(), M::Error> {
        self.mark_missing(key).inspect_err(|_| {
            self.retry.insert(key);
        })
    }

    /// `key` is no longer missing; its bucket's `overflow` may go after the next grace period
    /// if nothing else of the bucket is missing by then.
    fn unmark_missing(&mut self, key: &FrontendKey<S::Addr>) {
        if !self.missing.remove(key) {
            return;
        }
        let bucket = Self::bucket(key);
        if let Some(count) = self.missing_by_bucket.get_mut(&bucket) {
            *count -= 1;
            if *count == 0 {
                self.missing_by_bucket.remove(&bucket);
                self.settling.insert(bucket);
            }
        }
    }

    fn set_overflow(&mut self, first: u32, overflow: bool) -> Result<(), M::Error> {
        let mut contents = self.store.read(first)?;
        contents.head_mut().overflow = u8::from(overflow);
        self.store.write(first, &contents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{proto, scope};

    /// The index's slots in memory: what the kernel's array would hold (an in-memory stand-in,
    /// so that every interleaving and write failure can be set up; the kernel tests in
    /// tests/tests/frontend_index.rs run the same code against the real map and XDP).
    #[derive(Clone, Default)]
    struct Slots {
        slots: HashMap<u32, FrontendSlot4>,
        /// Writes to let through, then writes to fail.
        failing: Option<(usize, usize)>,
    }

    impl SlotStore<FrontendSlot4> for Slots {
        type Error = &'static str;
        fn read(&self, slot: u32) -> Result<FrontendSlot4, Self::Error> {
            Ok(self.slots.get(&slot).copied().unwrap_or_default())
        }
        fn write(&mut self, slot: u32, value: &FrontendSlot4) -> Result<(), Self::Error> {
            match &mut self.failing {
                Some((0, 0)) | None => {}
                Some((0, fail)) => {
                    *fail -= 1;
                    return Err("injected write failure");
                }
                Some((pass, _)) => *pass -= 1,
            }
            self.slots.insert(slot, *value);
            Ok(())
        }
    }

    type Index = FrontendIndex<FrontendSlot4, Slots>;

    fn key(port: u16) -> FrontendKey<u32> {
        key_at(u32::from_be_bytes([10, 96, 0, 1]), port)
    }

    fn key_at(addr: u32, port: u16) -> FrontendKey<u32> {
        FrontendKey {
            addr: addr.to_be(),
            port: port.to_be(),
            proto: proto::TCP,
            scope: scope::ANY,
        }
    }

    /// The selection table of [`value`]'s entries: one backend, its id from the service id.
    fn table_of(value: &ServiceValue) -> Vec<u32> {
        vec![value.service_id + 100]
    }

    /// What the agent's lookup gives a refill: `map`'s entry for `key`, with its table.
    fn entry(
        map: &HashMap<FrontendKey<u32>, ServiceValue>,
        key: &FrontendKey<u32>,
    ) -> Option<(ServiceValue, Vec<u32>)> {
        map.get(key).map(|value| (*value, table_of(value)))
    }

    /// The agent's write of `value` for `key`, with its table, after the map took it.
    fn write(
        index: &mut Index,
        key: &FrontendKey<u32>,
        value: ServiceValue,
    ) -> Result<(), &'static str> {
        index.after_write(key, &value, &table_of(&value))
    }

    fn value(service_id: u32) -> ServiceValue {
        ServiceValue {
            service_id,
            backend_count: 1,
            slots: service_id * 10,
            ..Default::default()
        }
    }

    /// Three frontends on port 80 that share a bucket, found by the hash itself among
    /// scattered addresses of 10.0.0.0/8. (Addresses and ports in runs, as Services get them,
    /// hardly ever share one: Fibonacci hashing spreads an arithmetic progression evenly.)
    fn three_in_one_bucket() -> [FrontendKey<u32>; 3] {
        let mut by_bucket: HashMap<u32, Vec<FrontendKey<u32>>> = HashMap::new();
        let mut state: u32 = 0x2545_f491;
        loop {
            // xorshift32: addresses in no order.
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let key = key_at(0x0a00_0000 | (state & 0x00ff_ffff), 80);
            let keys = by_bucket.entry(Index::bucket(&key)).or_default();
            if !keys.contains(&key) {
                keys.push(key);
            }
            if keys.len() == 3 {
                return [keys[0], keys[1], keys[2]];
            }
        }
    }

    /// What XDP would find for `key`, read from the slots as it reads them: the entry of a live
    /// slot of the bucket with the key, else "look in the map" when the bucket overflows.
    fn xdp_sees(
        index: &Index,
        key: &FrontendKey<u32>,
    ) -> Result<Option<ServiceValue>, &'static str> {
        let first = Index::bucket(key);
        for slot in first..first + frontend_index::BUCKET_SLOTS {
            let head = index.store.read(slot).unwrap().head;
            if head.live != 0 && head.key == *key {
                return Ok(Some(head.value));
            }
        }
        if index.store.read(first).unwrap().head.overflow != 0 {
            Err("the frontends map")
        } else {
            Ok(None)
        }
    }

    fn overflow(index: &Index, key: &FrontendKey<u32>) -> u8 {
        index.store.read(Index::bucket(key)).unwrap().head.overflow
    }

    fn index() -> Index {
        Index::empty(Slots::default())
    }

    /// Refills (after the grace period the caller waited for) with `map` as the frontends map.
    fn refill(index: &mut Index, map: &HashMap<FrontendKey<u32>, ServiceValue>) {
        index.refill(|key| Ok(entry(map, key))).unwrap();
    }

    #[test]
    fn a_new_frontend_is_served_from_its_bucket_at_once() {
        let mut index = index();
        write(&mut index, &key(80), value(1)).unwrap();
        assert_eq!(xdp_sees(&index, &key(80)), Ok(Some(value(1))));
        assert_eq!(xdp_sees(&index, &key(81)), Ok(None));
        assert_eq!(index.counts(), (1, 0));
        assert!(!index.needs_refill());
    }

    /// The table the live slot of `key` carries (empty: none).
    fn carried(index: &Index, key: &FrontendKey<u32>) -> Vec<u32> {
        let slot = index.store.read(index.placed[key]).unwrap();
        assert_eq!(slot.head.live, 1);
        let carried = usize::from(slot.head.inline_backends);
        assert!(
            slot.backends[carried..].iter().all(|id| *id == 0),
            "cells past the table are zero: {:?}",
            slot.backends
        );
        slot.backends[..carried].to_vec()
    }

    fn value_of(service_id: u32, backend_count: u16) -> ServiceValue {
        ServiceValue {
            backend_count,
            ..value(service_id)
        }
    }

    #[test]
    fn a_slot_carries_its_entry_s_table_when_the_table_fits() {
        let mut index = index();
        let seven = [11, 12, 13, 14, 15, 16, 17];
        index
            .after_write(&key(80), &value_of(1, 7), &seven)
            .unwrap();
        assert_eq!(carried(&index, &key(80)), seven);
        index
            .after_write(&key(81), &value_of(2, 3), &[21, 22, 21])
            .unwrap();
        assert_eq!(carried(&index, &key(81)), [21, 22, 21]);
    }

    #[test]
    fn a_slot_carries_no_table_too_large_for_it_or_not_its_entry_s_size() {
        let mut index = index();
        let eight: Vec<u32> = (1..=8).collect();
        index
            .after_write(&key(80), &value_of(1, 8), &eight)
            .unwrap();
        assert_eq!(carried(&index, &key(80)), [] as [u32; 0]);
        index.after_write(&key(81), &value_of(2, 2), &[5]).unwrap();
        assert_eq!(carried(&index, &key(81)), [] as [u32; 0]);
        index.after_write(&key(82), &value_of(3, 0), &[]).unwrap();
        assert_eq!(carried(&index, &key(82)), [] as [u32; 0]);
    }

    #[test]
    fn a_slot_used_again_carries_only_its_new_entry_s_table() {
        let [a, b, _] = three_in_one_bucket();
        let mut index = index();
        index
            .after_write(&a, &value_of(1, 5), &[1, 2, 3, 4, 5])
            .unwrap();
        index.after_write(&b, &value_of(2, 1), &[9]).unwrap();
        let slot = index.placed[&a];
        index.before_remove(&a).unwrap();
        index.after_remove(&a);
        index.before_write(&b, &value_of(3, 2), &[7, 8]).unwrap();
        index.after_write(&b, &value_of(3, 2), &[7, 8]).unwrap();
        // The bucket's other slot was retired by a's removal: b waits for the grace period.
        assert_eq!(xdp_sees(&index, &b), Err("the frontends map"));
        let map = HashMap::from([(b, value_of(3, 2))]);
        index
            .refill(|key| Ok(map.get(key).map(|value| (*value, vec![7, 8]))))
            .unwrap();
        assert_eq!(xdp_sees(&index, &b), Ok(Some(value_of(3, 2))));
        assert_eq!(index.placed[&b], slot, "b took a's old slot");
        assert_eq!(carried(&index, &b), [7, 8]);
    }

    #[test]
    fn a_third_frontend_of_a_bucket_is_found_through_the_map_until_a_slot_frees() {
        let [a, b, c] = three_in_one_bucket();
        let mut index = index();
        for (n, key) in [a, b, c].iter().enumerate() {
            write(&mut index, key, value(n as u32 + 1)).unwrap();
        }
        assert_eq!(xdp_sees(&index, &a), Ok(Some(value(1))));
        assert_eq!(xdp_sees(&index, &b), Ok(Some(value(2))));
        assert_eq!(xdp_sees(&index, &c), Err("the frontends map"));
        assert_eq!(index.counts(), (2, 1));

        // a goes: the map has b and c; c takes a's slot after the grace period.
        index.before_remove(&a).unwrap();
        assert_eq!(xdp_sees(&index, &a), Err("the frontends map"));
        index.after_remove(&a);
        assert_eq!(xdp_sees(&index, &c), Err("the frontends map"));
        assert!(index.needs_refill());
        let map = HashMap::from([(b, value(2)), (c, value(3))]);
        refill(&mut index, &map);
        assert_eq!(xdp_sees(&index, &a), Err("the frontends map"));
        assert_eq!(xdp_sees(&index, &b), Ok(Some(value(2))));
        assert_eq!(xdp_sees(&index, &c), Ok(Some(value(3))));
        assert_eq!(carried(&index, &c), table_of(&value(3)));
        assert_eq!(index.counts(), (2, 0));
        // c went into a slot after that grace period: the overflow byte waits for another.
        assert_eq!(overflow(&index, &a), 1);
        assert!(index.needs_refill());
        refill(&mut index, &map);
        assert_eq!(overflow(&index, &a), 0);
        assert_eq!(xdp_sees(&index, &a), Ok(None));
        assert!(!index.needs_refill());
    }

    #[test]
    fn a_changed_entry_moves_to_the_free_slot_and_its_bucket_overflows_until_a_grace_period_later()
    {
        let mut index = index();
        write(&mut index, &key(80), value(1)).unwrap();
        let slot = index.placed[&key(80)];

        index
            .before_write(&key(80), &value(2), &table_of(&value(2)))
            .unwrap();
        assert_eq!(xdp_sees(&index, &key(80)), Err("the frontends map"));
        // The old entry stays in the retired slot for programs still reading it.
        assert_eq!(index.store.read(slot).unwrap().head.value, value(1));
        write(&mut index, &key(80), value(2)).unwrap();
        assert_eq!(xdp_sees(&index, &key(80)), Ok(Some(value(2))));
        assert_ne!(index.placed[&key(80)], slot);
        // A program that found the new slot not yet live, and the old one no longer live, reads
        // the overflow byte next: it must still send it to the map.
        assert_eq!(overflow(&index, &key(80)), 1);
        assert_eq!(index.store.read(slot).unwrap().head.value, value(1));
        assert!(index.needs_refill());
        refill(&mut index, &HashMap::from([(key(80), value(2))]));
        assert_eq!(overflow(&index, &key(80)), 0);
        assert_eq!(xdp_sees(&index, &key(80)), Ok(Some(value(2))));
        assert_eq!(index.counts(), (1, 0));
        assert!(!index.needs_refill());
    }

    #[test]
    fn a_changed_entry_in_a_full_bucket_waits_for_the_grace_period() {
        let [a, b, _] = three_in_one_bucket();
        let mut index = index();
        write(&mut index, &a, value(1)).unwrap();
        write(&mut index, &b, value(2)).unwrap();
        index
            .before_write(&a, &value(3), &table_of(&value(3)))
            .unwrap();
        write(&mut index, &a, value(3)).unwrap();
        assert_eq!(xdp_sees(&index, &a), Err("the frontends map"));
        assert_eq!(xdp_sees(&index, &b), Ok(Some(value(2))));
        let map = HashMap::from([(a, value(3)), (b, value(2))]);
        refill(&mut index, &map);
        assert_eq!(xdp_sees(&index, &a), Ok(Some(value(3))));
        refill(&mut index, &map);
        assert_eq!(overflow(&index, &a), 0);
        assert_eq!(index.counts(), (2, 0));
    }

    #[test]
    fn an_unchanged_entry_keeps_its_slot() {
        let mut index = index();
        write(&mut index, &key(80), value(1)).unwrap();
        let writes_before = index.store.slots.clone();
        index
            .before_write(&key(80), &value(1), &table_of(&value(1)))
            .unwrap();
        write(&mut index, &key(80), value(1)).unwrap();
        assert_eq!(index.store.slots, writes_before);
        assert!(!index.needs_refill());
    }

    #[test]
    fn a_failed_removal_leaves_the_frontend_found_through_the_map() {
        let mut index = index();
        write(&mut index, &key(80), value(1)).unwrap();
        index.before_remove(&key(80)).unwrap();
        // The map's delete failed: no after_remove. The refill copies the entry in again.
        assert_eq!(xdp_sees(&index, &key(80)), Err("the frontends map"));
        refill(&mut index, &HashMap::from([(key(80), value(1))]));
        assert_eq!(xdp_sees(&index, &key(80)), Ok(Some(value(1))));
    }

    #[test]
    fn a_failed_write_before_the_map_changes_leaves_everything_as_it_was() {
        for pass in 0..2 {
            let mut index = index();
            write(&mut index, &key(80), value(1)).unwrap();
            let before = index.store.slots.clone();
            // Fails setting the overflow byte (pass 0) or retiring the slot (pass 1).
            index.store.failing = Some((pass, 1));
            assert!(
                index
                    .before_write(&key(80), &value(2), &table_of(&value(2)))
                    .is_err()
            );
            assert_eq!(
                xdp_sees(&index, &key(80)),
                Ok(Some(value(1))),
                "pass {pass}"
            );
            assert_eq!(
                index.placed.get(&key(80)).copied(),
                before
                    .keys()
                    .find(|slot| before[slot].head.live == 1)
                    .copied()
            );
            assert!(index.before_remove(&key(80)).is_ok(), "pass {pass}");
        }
    }

    #[test]
    fn a_new_frontend_whose_slot_write_fails_is_found_through_the_map_then_placed() {
        let mut index = index();
        // The slot's first write passes, making it live fails; the overflow byte is written.
        index.store.failing = Some((1, 1));
        assert!(write(&mut index, &key(80), value(1)).is_err());
        assert_eq!(xdp_sees(&index, &key(80)), Err("the frontends map"));
        assert_eq!(index.counts(), (0, 1));
        let map = HashMap::from([(key(80), value(1))]);
        refill(&mut index, &map);
        assert_eq!(xdp_sees(&index, &key(80)), Ok(Some(value(1))));
        refill(&mut index, &map);
        assert_eq!(overflow(&index, &key(80)), 0);
    }

    #[test]
    fn a_frontend_that_cannot_be_marked_is_retried_by_the_refill() {
        let mut index = index();
        // Both writes fail: the slot's and the overflow byte's.
        index.store.failing = Some((0, 2));
        assert!(write(&mut index, &key(80), value(1)).is_err());
        assert_eq!(index.counts(), (0, 1), "counted as read from the map");
        assert!(index.needs_refill());
        let map = HashMap::from([(key(80), value(1))]);
        refill(&mut index, &map);
        assert_eq!(xdp_sees(&index, &key(80)), Ok(Some(value(1))));
        assert_eq!(index.counts(), (1, 0));
    }

    #[test]
    fn a_refill_that_fails_part_way_asks_for_another() {
        let [a, b, c] = three_in_one_bucket();
        let mut index = index();
        for (n, key) in [a, b, c].iter().enumerate() {
            write(&mut index, key, value(n as u32 + 1)).unwrap();
        }
        index.before_remove(&a).unwrap();
        index.after_remove(&a);
        index.store.failing = Some((0, 1));
        let map = HashMap::from([(b, value(2)), (c, value(3))]);
        assert!(index.refill(|key| Ok(entry(&map, key))).is_err());
        assert!(index.needs_refill());
        assert_eq!(xdp_sees(&index, &c), Err("the frontends map"));
        refill(&mut index, &map);
        assert_eq!(xdp_sees(&index, &c), Ok(Some(value(3))));
    }

    #[test]
    fn an_entry_back_at_its_old_cells_with_another_table_does_not_keep_the_old_table() {
        // The slot array hands out its first free cells: an entry can name the same cells
        // again, with other backend ids in them.
        let mut index = index();
        index
            .after_write(&key(80), &value_of(1, 2), &[1, 2])
            .unwrap();
        index
            .before_write(&key(80), &value_of(1, 2), &[1, 3])
            .unwrap();
        assert_eq!(xdp_sees(&index, &key(80)), Err("the frontends map"));
        index
            .after_write(&key(80), &value_of(1, 2), &[1, 3])
            .unwrap();
        assert_eq!(xdp_sees(&index, &key(80)), Ok(Some(value_of(1, 2))));
        assert_eq!(carried(&index, &key(80)), [1, 3]);
        // The same entry and table again: the slot stays; so does a slot of a table too large
        // to carry.
        let eight: Vec<u32> = (1..=8).collect();
        index
            .after_write(&key(81), &value_of(2, 8), &eight)
            .unwrap();
        let before = index.store.slots.clone();
        index
            .before_write(&key(80), &value_of(1, 2), &[1, 3])
            .unwrap();
        index
            .before_write(&key(81), &value_of(2, 8), &eight)
            .unwrap();
        assert_eq!(index.store.slots, before);
    }

    #[test]
    fn adopting_keeps_a_slot_only_with_the_table_the_slot_array_holds_for_its_entry() {
        let mut earlier = index();
        earlier
            .after_write(&key(80), &value_of(1, 2), &[1, 2])
            .unwrap();
        earlier
            .after_write(&key(81), &value_of(2, 1), &[5])
            .unwrap();
        earlier
            .after_write(&key(82), &value_of(3, 1), &[6])
            .unwrap();
        let eight: Vec<u32> = (1..=8).collect();
        earlier
            .after_write(&key(83), &value_of(4, 8), &eight)
            .unwrap();
        earlier.after_write(&key(84), &value_of(5, 1), &[]).unwrap();
        let slots: Vec<(u32, FrontendSlot4)> =
            earlier.store.slots.iter().map(|(s, v)| (*s, *v)).collect();
        // While no agent of this release ran, an earlier one moved key 80's service to other
        // cells and back with other backends in them; key 82's and key 84's tables are ones the
        // agent does not know (the slot array's cells are not their services' current ones):
        // only a slot that carries none may stay. Key 83's table is too large to carry.
        let map = HashMap::from([
            (key(80), value_of(1, 2)),
            (key(81), value_of(2, 1)),
            (key(82), value_of(3, 1)),
            (key(83), value_of(4, 8)),
            (key(84), value_of(5, 1)),
        ]);
        let tables = |value: &ServiceValue| match value.service_id {
            1 => vec![1, 3],
            2 => vec![5],
            4 => (1..=8).collect(),
            _ => vec![],
        };
        let mut index = Index::adopt(earlier.store, slots, map.clone(), tables).unwrap();
        assert_eq!(xdp_sees(&index, &key(80)), Err("the frontends map"));
        assert_eq!(carried(&index, &key(81)), [5], "kept");
        assert_eq!(xdp_sees(&index, &key(82)), Err("the frontends map"));
        assert_eq!(carried(&index, &key(83)), [] as [u32; 0], "kept");
        assert_eq!(carried(&index, &key(84)), [] as [u32; 0], "kept");
        index
            .refill(|key| Ok(map.get(key).map(|value| (*value, tables(value)))))
            .unwrap();
        assert_eq!(carried(&index, &key(80)), [1, 3]);
        assert_eq!(carried(&index, &key(82)), [] as [u32; 0]);
        assert_eq!(xdp_sees(&index, &key(82)), Ok(Some(value_of(3, 1))));
    }

    #[test]
    fn adopting_an_earlier_agent_s_index_retires_what_the_map_no_longer_has() {
        let [a, b, c] = three_in_one_bucket();
        let mut earlier = index();
        write(&mut earlier, &a, value(1)).unwrap();
        write(&mut earlier, &b, value(2)).unwrap();
        write(&mut earlier, &key(80), value(5)).unwrap();
        let slots: Vec<(u32, FrontendSlot4)> =
            earlier.store.slots.iter().map(|(s, v)| (*s, *v)).collect();
        // Meanwhile: a's entry changed, b left, c arrived, key 80 is as it was.
        let map = HashMap::from([(a, value(3)), (c, value(4)), (key(80), value(5))]);
        let mut index = Index::adopt(earlier.store, slots, map.clone(), table_of).unwrap();
        assert_eq!(xdp_sees(&index, &a), Err("the frontends map"));
        assert_eq!(xdp_sees(&index, &b), Err("the frontends map"));
        assert_eq!(xdp_sees(&index, &key(80)), Ok(Some(value(5))));
        refill(&mut index, &map);
        refill(&mut index, &map);
        assert_eq!(xdp_sees(&index, &a), Ok(Some(value(3))));
        assert_eq!(xdp_sees(&index, &b), Ok(None));
        assert_eq!(xdp_sees(&index, &c), Ok(Some(value(4))));
        assert_eq!(index.counts(), (3, 0));
        assert!(!index.needs_refill());
    }
}
