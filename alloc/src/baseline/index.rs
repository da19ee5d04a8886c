//! The in-memory index of a baseline's committed journal: the newest entry
//! of each page, as one vector sorted by page.
//!
//! Opening a baseline builds it from every segment header, in journal order
//! ([`JournalIndex::from_iter`]): a stable sort by page (the journal is a
//! few ascending runs, one per commit, so the sort mostly merges runs),
//! then the last entry of each page is kept. A vector rather than a tree:
//! building and cloning it is one allocation and a copy (a million entries
//! at 8 GiB), which lazy recovery does before the heap is usable; lookups
//! are a binary search.

use std::ops::Range;

/// Where a committed journal page is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct JEntry {
    /// File offset of the page.
    pub(super) off: u64,
    /// CRC32 of the page.
    pub(super) crc: u32,
}

/// The newest journal entry per page, sorted by page, one entry per page.
#[derive(Debug, Clone, Default)]
pub(super) struct JournalIndex {
    v: Vec<(u64, JEntry)>,
}

/// Sorts `v` by page, keeping the order of equal pages, then keeps the
/// last (newest) entry of each page.
fn newest_per_page(mut v: Vec<(u64, JEntry)>) -> Vec<(u64, JEntry)> {
    v.sort_by_key(|&(p, _)| p);
    let mut w = 0;
    for r in 0..v.len() {
        if r + 1 < v.len() && v[r + 1].0 == v[r].0 {
            continue;
        }
        v[w] = v[r];
        w += 1;
    }
    v.truncate(w);
    v
}

impl JournalIndex {
    /// Pages with an entry.
    pub(super) fn len(&self) -> usize {
        self.v.len()
    }

    fn find(&self, page: u64) -> Result<usize, usize> {
        self.v.binary_search_by_key(&page, |&(p, _)| p)
    }

    /// The entry of `page`.
    pub(super) fn get(&self, page: &u64) -> Option<&JEntry> {
        self.find(*page).ok().map(|i| &self.v[i].1)
    }

    /// Whether `page` has an entry.
    pub(super) fn contains_key(&self, page: &u64) -> bool {
        self.find(*page).is_ok()
    }

    /// Every entry, by page.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&u64, &JEntry)> + '_ {
        self.v.iter().map(|(p, e)| (p, e))
    }

    /// Every page with an entry, ascending.
    pub(super) fn keys(&self) -> impl Iterator<Item = &u64> + '_ {
        self.v.iter().map(|(p, _)| p)
    }

    /// The entries of pages in `r`, by page.
    pub(super) fn range(&self, r: Range<u64>) -> impl Iterator<Item = (&u64, &JEntry)> + '_ {
        let s = self.v.partition_point(|&(p, _)| p < r.start);
        let e = s + self.v[s..].partition_point(|&(p, _)| p < r.end);
        self.v[s..e].iter().map(|(p, e)| (p, e))
    }

    /// The entries as a sorted vector (one per page).
    pub(super) fn to_vec(&self) -> Vec<(u64, JEntry)> {
        self.v.clone()
    }

    /// Adds newer entries (in commit order; a later entry of a page wins,
    /// and every new entry replaces the page's older one).
    pub(super) fn extend(&mut self, newer: Vec<(u64, JEntry)>) {
        let newer = newest_per_page(newer);
        if newer.is_empty() {
            return;
        }
        if self.v.last().is_none_or(|&(p, _)| p < newer[0].0) {
            self.v.extend_from_slice(&newer);
            return;
        }
        // Replace in place where the page has an entry; merge the rest in
        // from the back (one pass, no second vector).
        let mut added = Vec::new();
        for (p, e) in newer {
            match self.find(p) {
                Ok(i) => self.v[i].1 = e,
                Err(_) => added.push((p, e)),
            }
        }
        if added.is_empty() {
            return;
        }
        let (n, k) = (self.v.len(), added.len());
        let filler = added[0];
        self.v.resize(n + k, filler);
        let (mut i, mut j, mut w) = (n, k, n + k);
        while j > 0 {
            if i > 0 && self.v[i - 1].0 > added[j - 1].0 {
                self.v[w - 1] = self.v[i - 1];
                i -= 1;
            } else {
                self.v[w - 1] = added[j - 1];
                j -= 1;
            }
            w -= 1;
        }
    }
}

impl FromIterator<(u64, JEntry)> for JournalIndex {
    /// Entries in journal order (oldest first): the newest per page is kept.
    fn from_iter<I: IntoIterator<Item = (u64, JEntry)>>(entries: I) -> Self {
        JournalIndex { v: newest_per_page(entries.into_iter().collect()) }
    }
}

impl<'a> IntoIterator for &'a JournalIndex {
    type Item = (&'a u64, &'a JEntry);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (u64, JEntry)>, fn(&'a (u64, JEntry)) -> (&'a u64, &'a JEntry)>;
    fn into_iter(self) -> Self::IntoIter {
        self.v.iter().map(|(p, e)| (p, e))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn e(off: u64) -> JEntry {
        JEntry { off, crc: off as u32 }
    }

    proptest! {
        /// The index answers as a map that inserts every entry in order.
        #[test]
        fn matches_a_map_built_entry_by_entry(
            first in proptest::collection::vec(0u64..200, 0..300),
            commits in proptest::collection::vec(proptest::collection::vec(0u64..200, 0..60), 0..6),
            probe in 0u64..210, span in 0u64..50,
        ) {
            let mut off = 0;
            let mut next = || { off += 1; e(off) };
            let mut model = BTreeMap::new();
            let entries: Vec<(u64, JEntry)> = first.iter().map(|&p| (p, next())).collect();
            for &(p, x) in &entries { model.insert(p, x); }
            let mut idx: JournalIndex = entries.into_iter().collect();
            for c in commits {
                let batch: Vec<(u64, JEntry)> = c.iter().map(|&p| (p, next())).collect();
                for &(p, x) in &batch { model.insert(p, x); }
                idx.extend(batch);
                let got: Vec<(u64, JEntry)> = idx.iter().map(|(&p, &x)| (p, x)).collect();
                let want: Vec<(u64, JEntry)> = model.iter().map(|(&p, &x)| (p, x)).collect();
                prop_assert_eq!(got, want);
            }
            prop_assert_eq!(idx.len(), model.len());
            prop_assert_eq!(idx.get(&probe), model.get(&probe));
            prop_assert_eq!(idx.contains_key(&probe), model.contains_key(&probe));
            let got: Vec<u64> = idx.range(probe..probe + span).map(|(&p, _)| p).collect();
            let want: Vec<u64> = model.range(probe..probe + span).map(|(&p, _)| p).collect();
            prop_assert_eq!(got, want);
        }
    }
}
