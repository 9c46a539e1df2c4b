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
//! A bucket of two slots holds all its frontends but for a few percent of them at 100k
//! frontends in 2^18 slots; the others stay in the frontends map alone, behind `overflow`.

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
};

use lb_common::{
    FrontendKey, FrontendSlot4, FrontendSlot6, FrontendSlotHead, Ipv6Words, ServiceValue,
    frontend_filter, frontend_index,
};

/// A slot type of an index: its head, and the hash that places its key.
pub(super) trait IndexSlot: Copy + Default {
    type Addr: Copy + Eq + Hash;
    fn head(&self) -> &FrontendSlotHead<Self::Addr>;
    fn head_mut(&mut self) -> &mut FrontendSlotHead<Self::Addr>;
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
    fn filter_bit(key: &FrontendKey<Ipv6Words>) -> u32 {
        frontend_filter::bit6(key.addr, u16::from_be(key.port), key.proto)
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
/// `entries` the frontends map's entries (those of scope ANY are the index's).
pub(super) fn open<S: IndexSlot + aya::Pod>(
    pin_dir: &std::path::Path,
    name: &'static str,
    entries: impl IntoIterator<Item = (FrontendKey<S::Addr>, ServiceValue)>,
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
    FrontendIndex::adopt(store, slots, entries)
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
    /// How many of them each bucket (by its first slot) lacks: its `overflow` is set while any.
    missing_by_bucket: HashMap<u32, u32>,
}

impl<S: IndexSlot, M: SlotStore<S>> FrontendIndex<S, M> {
    /// The index in `store`, which may hold what an earlier agent wrote (`slots`: each slot it
    /// holds that is live or has `overflow` set). Every live slot that is not a copy of its
    /// frontend's entry in `entries` (the frontends map's entries of scope ANY) is retired, and
    /// every other entry is missing until [`Self::refill`]. Slots not live may still be read by
    /// a program (one an earlier agent retired just before it stopped): they are free only
    /// after the first grace period too.
    pub(super) fn adopt(
        store: M,
        slots: impl IntoIterator<Item = (u32, S)>,
        entries: HashMap<FrontendKey<S::Addr>, ServiceValue>,
    ) -> Result<Self, M::Error> {
        let mut index = Self::empty(store);
        index.states.fill(SlotState::Retired);
        index.retired_all = true;
        let mut stale = Vec::new();
        let mut flagged = Vec::new();
        for (slot, value) in slots {
            let head = value.head();
            if head.overflow != 0 {
                flagged.push(slot);
            }
            if head.live == 0 {
                continue;
            }
            let current = entries.get(&head.key) == Some(&head.value)
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
        for slot in flagged {
            let lacks = index.missing_by_bucket.contains_key(&slot);
            if !lacks {
                index.set_overflow(slot, false)?;
            }
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
        }
    }

    /// The first slot of `key`'s bucket.
    fn bucket(key: &FrontendKey<S::Addr>) -> u32 {
        frontend_index::first_slot(S::filter_bit(key))
    }

    /// Before `key`'s entry in the frontends map becomes `value`: a slot with another entry is
    /// retired (its frontend missing meanwhile).
    pub(super) fn before_write(
        &mut self,
        key: &FrontendKey<S::Addr>,
        value: &ServiceValue,
    ) -> Result<(), M::Error> {
        let Some(&slot) = self.placed.get(key) else {
            return Ok(());
        };
        if self.store.read(slot)?.head().value == *value {
            return Ok(());
        }
        self.mark_missing(*key)?;
        self.placed.remove(key);
        self.retire(slot)
    }

    /// After `key`'s entry in the frontends map became `value`: a frontend the index lacks goes
    /// into a free slot of its bucket, or stays missing.
    pub(super) fn after_write(
        &mut self,
        key: &FrontendKey<S::Addr>,
        value: &ServiceValue,
    ) -> Result<(), M::Error> {
        if self.placed.contains_key(key) {
            return Ok(());
        }
        if self.place(key, value)? {
            self.unmark_missing(key)
        } else {
            self.mark_missing(*key)
        }
    }

    /// Before `key`'s entry leaves the frontends map: its slot is retired. The frontend is
    /// missing until [`Self::after_remove`], so that it is still found if the removal fails.
    pub(super) fn before_remove(&mut self, key: &FrontendKey<S::Addr>) -> Result<(), M::Error> {
        let Some(slot) = self.placed.remove(key) else {
            return Ok(());
        };
        self.mark_missing(*key)?;
        self.retire(slot)
    }

    /// After `key`'s entry left the frontends map.
    pub(super) fn after_remove(&mut self, key: &FrontendKey<S::Addr>) -> Result<(), M::Error> {
        self.unmark_missing(key)
    }

    /// Whether slots wait for a grace period before [`Self::refill`] can free them.
    pub(super) fn has_retired(&self) -> bool {
        self.retired_all || !self.retired.is_empty()
    }

    /// After a grace period that began after every retirement so far: the retired slots are
    /// free, and each missing frontend goes into a free slot of its bucket with its entry in the
    /// frontends map (`lookup`) if there is one.
    pub(super) fn refill(
        &mut self,
        lookup: impl Fn(&FrontendKey<S::Addr>) -> Result<Option<ServiceValue>, M::Error>,
    ) -> Result<(), M::Error> {
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
        let missing: Vec<FrontendKey<S::Addr>> = self.missing.iter().copied().collect();
        for key in missing {
            match lookup(&key)? {
                None => self.unmark_missing(&key)?,
                Some(value) => {
                    if self.place(&key, &value)? {
                        self.unmark_missing(&key)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// How many frontends the index serves, and how many it lacks.
    pub(super) fn counts(&self) -> (usize, usize) {
        (self.placed.len(), self.missing.len())
    }

    /// Writes `key` and `value` into a free slot of the key's bucket, then makes it live.
    fn place(
        &mut self,
        key: &FrontendKey<S::Addr>,
        value: &ServiceValue,
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
        self.store.write(slot, &contents)?;
        contents.head_mut().live = 1;
        self.store.write(slot, &contents)?;
        self.states[slot as usize] = SlotState::Live;
        self.placed.insert(*key, slot);
        Ok(true)
    }

    /// Clears a slot's `live`; the slot is free after the next grace period.
    fn retire(&mut self, slot: u32) -> Result<(), M::Error> {
        let mut contents = self.store.read(slot)?;
        contents.head_mut().live = 0;
        self.store.write(slot, &contents)?;
        self.states[slot as usize] = SlotState::Retired;
        self.retired.push(slot);
        Ok(())
    }

    fn mark_missing(&mut self, key: FrontendKey<S::Addr>) -> Result<(), M::Error> {
        if !self.missing.insert(key) {
            return Ok(());
        }
        let bucket = Self::bucket(&key);
        let count = self.missing_by_bucket.entry(bucket).or_insert(0);
        *count += 1;
        if *count == 1 {
            self.set_overflow(bucket, true)?;
        }
        Ok(())
    }

    fn unmark_missing(&mut self, key: &FrontendKey<S::Addr>) -> Result<(), M::Error> {
        if !self.missing.remove(key) {
            return Ok(());
        }
        let bucket = Self::bucket(key);
        let count = self.missing_by_bucket.entry(bucket).or_insert(1);
        *count -= 1;
        if *count == 0 {
            self.missing_by_bucket.remove(&bucket);
            self.set_overflow(bucket, false)?;
        }
        Ok(())
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

    /// The index's slots in memory: what the kernel's array would hold.
    #[derive(Default)]
    struct Slots(HashMap<u32, FrontendSlot4>);

    impl SlotStore<FrontendSlot4> for Slots {
        type Error = std::convert::Infallible;
        fn read(&self, slot: u32) -> Result<FrontendSlot4, Self::Error> {
            Ok(self.0.get(&slot).copied().unwrap_or_default())
        }
        fn write(&mut self, slot: u32, value: &FrontendSlot4) -> Result<(), Self::Error> {
            self.0.insert(slot, *value);
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
        slots: &Slots,
        key: &FrontendKey<u32>,
    ) -> Result<Option<ServiceValue>, &'static str> {
        let first = Index::bucket(key);
        for slot in first..first + frontend_index::BUCKET_SLOTS {
            let head = slots.read(slot).unwrap().head;
            if head.live != 0 && head.key == *key {
                return Ok(Some(head.value));
            }
        }
        if slots.read(first).unwrap().head.overflow != 0 {
            Err("the frontends map")
        } else {
            Ok(None)
        }
    }

    fn index() -> Index {
        Index::empty(Slots::default())
    }

    #[test]
    fn a_new_frontend_is_served_from_its_bucket_at_once() {
        let mut index = index();
        index.after_write(&key(80), &value(1)).unwrap();
        assert_eq!(xdp_sees(&index.store, &key(80)), Ok(Some(value(1))));
        assert_eq!(xdp_sees(&index.store, &key(81)), Ok(None));
        assert_eq!(index.counts(), (1, 0));
        assert!(!index.has_retired());
    }

    #[test]
    fn a_third_frontend_of_a_bucket_is_found_through_the_map_until_a_slot_frees() {
        let [a, b, c] = three_in_one_bucket();
        let mut index = index();
        for (n, key) in [a, b, c].iter().enumerate() {
            index.after_write(key, &value(n as u32 + 1)).unwrap();
        }
        assert_eq!(xdp_sees(&index.store, &a), Ok(Some(value(1))));
        assert_eq!(xdp_sees(&index.store, &b), Ok(Some(value(2))));
        assert_eq!(xdp_sees(&index.store, &c), Err("the frontends map"));
        assert_eq!(index.counts(), (2, 1));

        // a goes: the map has b and c; c takes a's slot after the grace period.
        index.before_remove(&a).unwrap();
        assert_eq!(xdp_sees(&index.store, &a), Err("the frontends map"));
        index.after_remove(&a).unwrap();
        assert_eq!(xdp_sees(&index.store, &c), Err("the frontends map"));
        assert!(index.has_retired());
        let map = HashMap::from([(b, value(2)), (c, value(3))]);
        index.refill(|key| Ok(map.get(key).copied())).unwrap();
        assert_eq!(xdp_sees(&index.store, &a), Ok(None));
        assert_eq!(xdp_sees(&index.store, &b), Ok(Some(value(2))));
        assert_eq!(xdp_sees(&index.store, &c), Ok(Some(value(3))));
        assert_eq!(index.counts(), (2, 0));
    }

    #[test]
    fn a_changed_entry_is_read_from_the_map_until_its_slot_is_written_again_after_a_grace_period() {
        let mut index = index();
        index.after_write(&key(80), &value(1)).unwrap();
        let slot = index.placed[&key(80)];

        index.before_write(&key(80), &value(2)).unwrap();
        assert_eq!(xdp_sees(&index.store, &key(80)), Err("the frontends map"));
        // The old entry stays in the retired slot for readers still inside it.
        assert_eq!(index.store.read(slot).unwrap().head.value, value(1));
        index.after_write(&key(80), &value(2)).unwrap();
        // The bucket's other slot was free: the new entry went there at once.
        assert_eq!(xdp_sees(&index.store, &key(80)), Ok(Some(value(2))));
        assert_eq!(index.store.read(slot).unwrap().head.value, value(1));
        assert!(index.has_retired());
        index.refill(|_| Ok(Some(value(2)))).unwrap();
        assert_eq!(xdp_sees(&index.store, &key(80)), Ok(Some(value(2))));
        assert_eq!(index.counts(), (1, 0));
    }

    #[test]
    fn a_changed_entry_in_a_full_bucket_waits_for_the_grace_period() {
        let [a, b, _] = three_in_one_bucket();
        let mut index = index();
        index.after_write(&a, &value(1)).unwrap();
        index.after_write(&b, &value(2)).unwrap();
        index.before_write(&a, &value(3)).unwrap();
        index.after_write(&a, &value(3)).unwrap();
        assert_eq!(xdp_sees(&index.store, &a), Err("the frontends map"));
        assert_eq!(xdp_sees(&index.store, &b), Ok(Some(value(2))));
        index
            .refill(|key| Ok(Some(if *key == a { value(3) } else { value(2) })))
            .unwrap();
        assert_eq!(xdp_sees(&index.store, &a), Ok(Some(value(3))));
        assert_eq!(index.counts(), (2, 0));
    }

    #[test]
    fn an_unchanged_entry_keeps_its_slot() {
        let mut index = index();
        index.after_write(&key(80), &value(1)).unwrap();
        let writes_before = index.store.0.clone();
        index.before_write(&key(80), &value(1)).unwrap();
        index.after_write(&key(80), &value(1)).unwrap();
        assert_eq!(index.store.0, writes_before);
        assert!(!index.has_retired());
    }

    #[test]
    fn a_failed_removal_leaves_the_frontend_found_through_the_map() {
        let mut index = index();
        index.after_write(&key(80), &value(1)).unwrap();
        index.before_remove(&key(80)).unwrap();
        // The map's delete failed: no after_remove. The refill copies the entry in again.
        assert_eq!(xdp_sees(&index.store, &key(80)), Err("the frontends map"));
        index.refill(|_| Ok(Some(value(1)))).unwrap();
        assert_eq!(xdp_sees(&index.store, &key(80)), Ok(Some(value(1))));
    }

    #[test]
    fn adopting_an_earlier_agent_s_index_retires_what_the_map_no_longer_has() {
        let [a, b, c] = three_in_one_bucket();
        let mut earlier = index();
        earlier.after_write(&a, &value(1)).unwrap();
        earlier.after_write(&b, &value(2)).unwrap();
        earlier.after_write(&key(80), &value(5)).unwrap();
        let slots: Vec<(u32, FrontendSlot4)> =
            earlier.store.0.iter().map(|(s, v)| (*s, *v)).collect();
        // Meanwhile: a's entry changed, b left, c arrived, key 80 is as it was.
        let map = HashMap::from([(a, value(3)), (c, value(4)), (key(80), value(5))]);
        let mut index = Index::adopt(earlier.store, slots, map.clone()).unwrap();
        assert_eq!(xdp_sees(&index.store, &a), Err("the frontends map"));
        assert_eq!(xdp_sees(&index.store, &b), Err("the frontends map"));
        assert_eq!(xdp_sees(&index.store, &key(80)), Ok(Some(value(5))));
        index.refill(|key| Ok(map.get(key).copied())).unwrap();
        assert_eq!(xdp_sees(&index.store, &a), Ok(Some(value(3))));
        assert_eq!(xdp_sees(&index.store, &b), Ok(None));
        assert_eq!(xdp_sees(&index.store, &c), Ok(Some(value(4))));
        assert_eq!(index.counts(), (3, 0));
    }
}
