//! Which cells of the slot array (`lb4_slot_v2`) are free. Each service's selection table is one
//! run of consecutive cells; a changed table goes into a new run before the service's frontends
//! move to it, and its old run is given back after. Cell 0 is never handed out, so that a
//! `slots` field of 0 means "no table".

use std::collections::BTreeMap;

/// The free runs of an array of `capacity` cells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotRanges {
    /// Free runs, start -> length; never adjacent (neighbours are merged) and never empty.
    free: BTreeMap<u32, u32>,
    free_cells: u32,
}

impl SlotRanges {
    /// Every cell but cell 0 free.
    pub fn new(capacity: u32) -> Self {
        let mut ranges = Self {
            free: BTreeMap::new(),
            free_cells: 0,
        };
        if capacity > 1 {
            ranges.free.insert(1, capacity - 1);
            ranges.free_cells = capacity - 1;
        }
        ranges
    }

    pub fn free_cells(&self) -> u32 {
        self.free_cells
    }

    /// The start of a run of `len` free cells, now taken (the first run that fits, so that
    /// the low end of the array fills first and the high end stays in one piece). None when no
    /// run is that long. An empty table takes nothing and starts at 0.
    pub fn allocate(&mut self, len: u32) -> Option<u32> {
        if len == 0 {
            return Some(0);
        }
        let (&start, &run) = self.free.iter().find(|&(_, &run)| run >= len)?;
        self.free.remove(&start);
        if run > len {
            self.free.insert(start + len, run - len);
        }
        self.free_cells -= len;
        Some(start)
    }

    /// Takes the run `start..start + len` as found in the maps at load. False (nothing taken)
    /// when any cell of it is not free: cell 0, past the end, or another table's.
    pub fn reserve(&mut self, start: u32, len: u32) -> bool {
        if len == 0 {
            return true;
        }
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        let Some((&run_start, &run)) = self.free.range(..=start).next_back() else {
            return false;
        };
        if end > run_start + run {
            return false;
        }
        self.free.remove(&run_start);
        if start > run_start {
            self.free.insert(run_start, start - run_start);
        }
        if run_start + run > end {
            self.free.insert(end, run_start + run - end);
        }
        self.free_cells -= len;
        true
    }

    /// Gives back a run taken by [`allocate`](Self::allocate) or [`reserve`](Self::reserve).
    pub fn release(&mut self, start: u32, len: u32) {
        if len == 0 {
            return;
        }
        self.free_cells += len;
        let (mut start, mut len) = (start, len);
        if let Some((&before, &run)) = self.free.range(..start).next_back()
            && before + run == start
        {
            self.free.remove(&before);
            start = before;
            len += run;
        }
        if let Some(after) = self.free.remove(&(start + len)) {
            len += after;
        }
        self.free.insert(start, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The free runs as (start, end) pairs.
    fn runs(ranges: &SlotRanges) -> Vec<(u32, u32)> {
        ranges
            .free
            .iter()
            .map(|(&start, &len)| (start, start + len))
            .collect()
    }

    #[test]
    fn cell_zero_is_never_handed_out() {
        let mut ranges = SlotRanges::new(8);
        assert_eq!(ranges.allocate(7), Some(1));
        assert_eq!(ranges.allocate(1), None);
        assert_eq!(ranges.free_cells(), 0);
        assert!(!ranges.reserve(0, 1));
    }

    #[test]
    fn runs_are_first_fit_and_given_back_runs_merge() {
        let mut ranges = SlotRanges::new(100);
        let a = ranges.allocate(10).unwrap();
        let b = ranges.allocate(20).unwrap();
        let c = ranges.allocate(5).unwrap();
        assert_eq!((a, b, c), (1, 11, 31));
        ranges.release(b, 20);
        assert_eq!(runs(&ranges), [(11, 31), (36, 100)]);
        // A run that fits the hole goes there; a longer one past it.
        assert_eq!(ranges.allocate(30), Some(36));
        assert_eq!(ranges.allocate(15), Some(11));
        assert_eq!(runs(&ranges), [(26, 31), (66, 100)]);
        ranges.release(a, 10);
        ranges.release(11, 15);
        ranges.release(c, 5);
        assert_eq!(runs(&ranges), [(1, 36), (66, 100)]);
        ranges.release(36, 30);
        assert_eq!(runs(&ranges), [(1, 100)]);
        assert_eq!(ranges.free_cells(), 99);
    }

    #[test]
    fn reserving_takes_exactly_the_run_found_in_the_maps() {
        let mut ranges = SlotRanges::new(50);
        assert!(ranges.reserve(10, 5));
        assert!(ranges.reserve(1, 3));
        assert!(ranges.reserve(45, 5));
        assert_eq!(runs(&ranges), [(4, 10), (15, 45)]);
        assert_eq!(ranges.free_cells(), 36);
        // Overlapping another run, past the end, or wrapping around: refused, nothing taken.
        assert!(!ranges.reserve(12, 2));
        assert!(!ranges.reserve(8, 4));
        assert!(!ranges.reserve(44, 2));
        assert!(!ranges.reserve(40, u32::MAX));
        assert_eq!(ranges.free_cells(), 36);
        assert_eq!(ranges.allocate(7), Some(15));
    }

    #[test]
    fn empty_tables_take_nothing() {
        let mut ranges = SlotRanges::new(4);
        assert_eq!(ranges.allocate(0), Some(0));
        assert!(ranges.reserve(0, 0));
        ranges.release(0, 0);
        assert_eq!(ranges.free_cells(), 3);
    }
}
