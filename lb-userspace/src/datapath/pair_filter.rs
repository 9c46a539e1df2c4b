//! The pair filter ([`lb_common::pair_filter`], [`map_names::PAIR_FILTER`]): which clients may
//! have a flow kept as an ORIGINAL and a REPLY entry, so that XDP looks an ORIGINAL entry up
//! only for those. The programs set a new pair's bit in both generations; the agent keeps the
//! filter from filling up by emptying one generation at a time and setting again the bits of
//! the ORIGINAL entries conntrack then holds ([`PairFilterKeeper`]).
//!
//! The map is mmapped: the agent's word stores touch only the generation it empties, where a
//! map update would rewrite both words of an entry, the programs' ORs into the other
//! generation included.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    ptr::NonNull,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering, fence},
    },
    time::{Duration, Instant},
};

use aya::maps::{Array, MapData};
use lb_common::{CtAddr, CtKey, CtValue, ct_direction, map_names, pair_filter};

const WORDS: usize = pair_filter::ENTRIES as usize * pair_filter::GENERATIONS;

/// The filter's memory, mapped from the map.
pub struct PairFilter {
    words: NonNull<AtomicU64>,
    /// The generation the next rebuild empties, held for the whole of a rebuild: two keepers
    /// (the agent's, and a caller of `Datapath::rebuild_pair_filter`) take turns, and never
    /// empty both generations at once.
    next: Mutex<usize>,
    /// The agent's grace map and its inner map ([`map_names::GRACE`]): updating the one with
    /// the other returns once every program run that began before it has ended.
    grace: (OwnedFd, OwnedFd),
    /// The map, kept open as long as its memory is mapped.
    _map: Array<MapData, [u64; pair_filter::GENERATIONS]>,
}

// SAFETY: the memory stays mapped until drop and is only ever touched through atomics.
unsafe impl Send for PairFilter {}
// SAFETY: as above.
unsafe impl Sync for PairFilter {}

impl PairFilter {
    /// Maps the filter's memory (the map is created `BPF_F_MMAPABLE`).
    pub(super) fn map(
        map: Array<MapData, [u64; pair_filter::GENERATIONS]>,
        grace: (OwnedFd, OwnedFd),
    ) -> io::Result<Self> {
        use aya::maps::IterableMap as _;
        let length = WORDS * size_of::<u64>();
        // SAFETY: a shared mapping of the map's value area (kernel/bpf/arraymap.c,
        // `array_map_mmap`: the values start at offset 0, 16 bytes each here), unmapped in drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                length,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.map().fd().as_fd().as_raw_fd(),
                0,
            )
        };
        let Some(words) =
            NonNull::new(base.cast::<AtomicU64>()).filter(|_| base != libc::MAP_FAILED)
        else {
            return Err(io::Error::last_os_error());
        };
        Ok(Self {
            words,
            next: Mutex::new(0),
            grace,
            _map: map,
        })
    }

    /// Returns once every program run that began before the call has ended (the kernel's
    /// synchronize_rcu after an update of an array of maps: kernel/bpf/syscall.c,
    /// `maybe_wait_bpf_programs`).
    fn wait_for_running_programs(&self) -> io::Result<()> {
        let (outer, inner) = &self.grace;
        super::batch::set_array_entries(outer.as_fd(), &[(0, inner.as_fd())])
    }

    fn word(&self, entry: u32, generation: usize) -> &AtomicU64 {
        let index = entry as usize * pair_filter::GENERATIONS + generation;
        assert!(index < WORDS);
        // SAFETY: within the mapping, which lives as long as self; u64-aligned (page-aligned
        // base, 8-byte words).
        unsafe { self.words.add(index).as_ref() }
    }

    /// Sets every bit of `generation`: every client may have a pair. A load that may run beside
    /// an earlier agent's programs starts so (they write pairs without setting bits here).
    pub fn fill(&self, generation: usize) {
        for entry in 0..pair_filter::ENTRIES {
            self.word(entry, generation)
                .store(u64::MAX, Ordering::Relaxed);
        }
    }

    fn empty(&self, generation: usize) {
        for entry in 0..pair_filter::ENTRIES {
            self.word(entry, generation).store(0, Ordering::Relaxed);
        }
    }

    fn set(&self, generation: usize, bit: u32) {
        self.word(pair_filter::entry(bit), generation)
            .fetch_or(pair_filter::mask(bit), Ordering::Relaxed);
    }

    /// Whether `bit` is set in either generation (what XDP reads).
    pub fn holds(&self, bit: u32) -> bool {
        let entry = pair_filter::entry(bit);
        (0..pair_filter::GENERATIONS).any(|generation| {
            self.word(entry, generation).load(Ordering::Relaxed) & pair_filter::mask(bit) != 0
        })
    }

    /// The bits set in either generation.
    pub fn bits_set(&self) -> u32 {
        (0..pair_filter::ENTRIES)
            .map(|entry| {
                (0..pair_filter::GENERATIONS)
                    .fold(0, |bits, generation| {
                        bits | self.word(entry, generation).load(Ordering::Relaxed)
                    })
                    .count_ones()
            })
            .sum()
    }
}

impl Drop for PairFilter {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of this length, not used after this.
        unsafe {
            libc::munmap(self.words.as_ptr().cast(), WORDS * size_of::<u64>());
        }
    }
}

/// The agent's side of the filter: rebuilds one generation at a time from conntrack.
pub struct PairFilterKeeper {
    filter: Arc<PairFilter>,
    conntrack4: OwnedFd,
    conntrack6: OwnedFd,
}

/// What a rebuild found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rebuilt {
    pub generation: usize,
    /// ORIGINAL entries in conntrack (both families).
    pub pairs: u64,
    /// Bits set in either generation afterwards.
    pub bits_set: u32,
    pub took: Duration,
}

impl PairFilterKeeper {
    pub(super) fn new(filter: Arc<PairFilter>, conntrack4: OwnedFd, conntrack6: OwnedFd) -> Self {
        Self {
            filter,
            conntrack4,
            conntrack6,
        }
    }

    /// Empties the next generation, then sets the bit of every ORIGINAL entry conntrack holds.
    /// Emptied first: a pair the programs make during the walk sets its own bit (again after
    /// its insert), and one made before it is in the walk. The other generation, untouched,
    /// covers both meanwhile; and the emptying waits until no program that may have read this
    /// generation during the last rebuild (of the other) is still running, so that no reader
    /// sees one generation mid-rebuild and the other emptied. A walk that fails leaves its
    /// generation full, so the next rebuild (of the other) stays safe.
    pub fn rebuild_next(&mut self) -> io::Result<Rebuilt> {
        let mut next = self
            .filter
            .next
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let generation = *next;
        let started = Instant::now();
        self.filter.wait_for_running_programs()?;
        *next = (generation + 1) % pair_filter::GENERATIONS;
        self.filter.empty(generation);
        // The emptying before the walk's reads: a walk that misses an entry inserted meanwhile
        // then meets the bit the program sets after its insert.
        fence(Ordering::SeqCst);
        let mut pairs = 0;
        let mut found = |bit| {
            pairs += 1;
            self.filter.set(generation, bit);
        };
        let walked = walk_originals(
            &self.conntrack4,
            map_names::CONNTRACK4,
            pair_filter::bit,
            &mut found,
        )
        .and_then(|()| {
            walk_originals(
                &self.conntrack6,
                map_names::CONNTRACK6,
                pair_filter::bit6,
                &mut found,
            )
        });
        if let Err(error) = walked {
            self.filter.fill(generation);
            return Err(error);
        }
        Ok(Rebuilt {
            generation,
            pairs,
            bits_set: self.filter.bits_set(),
            took: started.elapsed(),
        })
    }

    /// Rebuilds both generations, one after the other: after it, the filter holds the bits of
    /// the pairs conntrack holds and of none else. A load's filter starts full where an earlier
    /// agent's programs may still be writing pairs: this, once this load's programs are the
    /// ones attached, is what empties it.
    pub fn rebuild_all(&mut self) -> io::Result<Rebuilt> {
        let started = Instant::now();
        self.rebuild_next()?;
        let last = self.rebuild_next()?;
        Ok(Rebuilt {
            took: started.elapsed(),
            ..last
        })
    }

    /// Rebuilds a generation every `period`, both at once first, in a thread of its own (a
    /// walk of a full conntrack map takes a while, and must not hold up syncs); `report` hears
    /// how each rebuild went.
    pub fn spawn(
        mut self,
        period: Duration,
        mut report: impl FnMut(io::Result<Rebuilt>) + Send + 'static,
    ) -> io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("pair-filter".into())
            .spawn(move || {
                report(self.rebuild_all());
                loop {
                    std::thread::sleep(period);
                    report(self.rebuild_next());
                }
            })
    }
}

/// Hands `found` the pair filter's bit (by `bit`) of the client of every ORIGINAL entry of the
/// conntrack map `map` (named `name`, for the error).
fn walk_originals<A: CtAddr>(
    map: &OwnedFd,
    name: &str,
    bit: fn(A, u16, u8) -> u32,
    found: &mut impl FnMut(u32),
) -> io::Result<()>
where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
{
    super::batch::visit_all(map.as_fd(), |key: CtKey<A>, _: CtValue<A>| {
        if key.direction == ct_direction::ORIGINAL {
            found(bit(key.saddr, key.sport, key.proto));
        }
    })
    .map_err(|error| io::Error::new(error.kind(), format!("walking {name}: {error}")))
}

/// An error of the filter's map, from a syscall on it.
pub(super) fn map_error(
    operation: &str,
    call: &'static str,
    io_error: io::Error,
) -> super::DatapathError {
    super::error::map_error(
        map_names::PAIR_FILTER,
        operation,
        aya::maps::MapError::SyscallError(aya::sys::SyscallError { call, io_error }),
    )
}

impl super::Datapath {
    /// The agent's keeper of the pair filter, with conntrack maps of its own to walk. Its
    /// first rebuild belongs after this load's programs are attached.
    pub fn pair_filter_keeper(&self) -> super::error::Result<PairFilterKeeper> {
        use aya::maps::IterableMap as _;
        Ok(PairFilterKeeper::new(
            self.pair_filter.clone(),
            super::load::duplicate_fd(
                self.maps.conntrack.map().fd().as_fd(),
                map_names::CONNTRACK4,
            )?,
            super::load::duplicate_fd(
                self.maps.conntrack6.map().fd().as_fd(),
                map_names::CONNTRACK6,
            )?,
        ))
    }

    /// The bits of the pair filter set now, in either generation.
    pub fn pair_filter_bits(&self) -> u32 {
        self.pair_filter.bits_set()
    }

    /// Rebuilds the pair filter whole from conntrack now ([`PairFilterKeeper::rebuild_all`]),
    /// as the agent's keeper does first once attached.
    pub fn rebuild_pair_filter(&self) -> super::error::Result<Rebuilt> {
        self.pair_filter_keeper()?
            .rebuild_all()
            .map_err(|io_error| map_error("rebuild from conntrack", "bpf", io_error))
    }

    /// Whether XDP would look up the ORIGINAL entry of this client (address and port as a
    /// conntrack key holds them).
    pub fn pair_filter_holds(&self, client: std::net::IpAddr, port: u16, protocol: u8) -> bool {
        self.pair_filter.holds(match client {
            std::net::IpAddr::V4(addr) => pair_filter::bit(u32::from(addr), port, protocol),
            std::net::IpAddr::V6(addr) => {
                pair_filter::bit6(crate::compile::model::ipv6_words(addr), port, protocol)
            }
        })
    }
}
