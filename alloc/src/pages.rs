//! The volatile index of free pages: rebuilt by recovery from the page
//! descriptors, kept in ordinary memory, never persisted. Pure code.

use std::collections::{BTreeMap, BTreeSet};

/// Free page runs, findable by address (to coalesce) and by length (best fit).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct PageIndex {
    by_start: BTreeMap<u64, u64>,
    by_len: BTreeSet<(u64, u64)>,
    free_pages: u64,
}

impl PageIndex {
    /// Adds the free run `[start, start + len)`, merging with neighbours.
    pub(crate) fn insert(&mut self, mut start: u64, mut len: u64) {
        if len == 0 {
            return;
        }
        self.free_pages += len;
        if let Some((&s, &l)) = self.by_start.range(..start).next_back() {
            debug_assert!(s + l <= start, "overlapping free runs");
            if s + l == start {
                self.remove_exact(s, l);
                start = s;
                len += l;
            }
        }
        if let Some(&l) = self.by_start.get(&(start + len)) {
            self.remove_exact(start + len, l);
            len += l;
        }
        self.by_start.insert(start, len);
        self.by_len.insert((len, start));
    }

    fn remove_exact(&mut self, start: u64, len: u64) {
        self.by_start.remove(&start);
        self.by_len.remove(&(len, start));
    }

    /// Takes `len` pages from the smallest run that holds them (lowest
    /// address among equals); `None` when no run is long enough.
    pub(crate) fn take(&mut self, len: u64) -> Option<u64> {
        let &(l, s) = self.by_len.range((len, 0)..).next()?;
        self.by_len.remove(&(l, s));
        self.by_start.remove(&s);
        self.free_pages -= l;
        if l > len {
            self.by_start.insert(s + len, l - len);
            self.by_len.insert((l - len, s + len));
            self.free_pages += l - len;
        }
        Some(s)
    }

    /// Free pages in all runs.
    pub(crate) fn free_pages(&self) -> u64 {
        self.free_pages
    }

    /// The runs in address order.
    pub(crate) fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.by_start.iter().map(|(&s, &l)| (s, l))
    }

    /// The longest run.
    pub(crate) fn largest(&self) -> u64 {
        self.by_len.iter().next_back().map_or(0, |&(l, _)| l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn index_matches_a_page_bitmap(ops in proptest::collection::vec((any::<bool>(), 1u64..20), 1..200)) {
            const N: u64 = 512;
            let mut idx = PageIndex::default();
            idx.insert(0, N);
            let mut free = vec![true; N as usize];
            let mut taken: Vec<(u64, u64)> = Vec::new();
            for (take, len) in ops {
                if take || taken.is_empty() {
                    if let Some(s) = idx.take(len) {
                        for p in s..s + len {
                            prop_assert!(free[p as usize], "page {} handed out twice", p);
                            free[p as usize] = false;
                        }
                        taken.push((s, len));
                    } else {
                        // No run of `len` free pages may exist.
                        let mut run = 0;
                        for f in &free { run = if *f { run + 1 } else { 0 }; prop_assert!(run < len); }
                    }
                } else {
                    let (s, l) = taken.swap_remove((len as usize) % taken.len());
                    for p in s..s + l { free[p as usize] = true; }
                    idx.insert(s, l);
                }
                prop_assert_eq!(idx.free_pages(), free.iter().filter(|f| **f).count() as u64);
                // Runs are maximal: no two are adjacent.
                let runs: Vec<_> = idx.runs().collect();
                for w in runs.windows(2) { prop_assert!(w[0].0 + w[0].1 < w[1].0); }
            }
        }
    }
}
