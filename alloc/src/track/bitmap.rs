//! The dirty set: one bit per page in `AtomicU64` words.
//!
//! The words live wherever a [`WordStore`] puts them: by default in a
//! private anonymous mapping ([`OwnedWords`]), never in tracked memory; or
//! in memory the caller maps, given as a pointer and a length
//! ([`RawWords`]): a shared memfd control region, so that the agent and
//! remote readers see them. Bit `p % 64` of word `p / 64` is page `p` of the region;
//! bits past the last page are always zero. The words are native-endian
//! `u64`s in memory: a reader on the same host (or an RDMA reader of the
//! same architecture) interprets them directly.
//!
//! This file makes no system call and has no `unsafe`.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::{Result, TrackError};
pub use super::sys::{OwnedWords, RawWords};

/// Memory holding the words of a [`DirtyBitmap`].
///
/// Whoever implements it for memory it maps (e.g. a shared control region)
/// must make sure the memory is never part of a tracked region: the fault
/// handler writes to it while writers of tracked pages wait for it.
pub trait WordStore: Send + Sync + 'static {
    /// The words; the same slice on every call.
    fn words(&self) -> &[AtomicU64];
}

impl WordStore for OwnedWords {
    fn words(&self) -> &[AtomicU64] {
        self
    }
}

impl WordStore for RawWords {
    fn words(&self) -> &[AtomicU64] {
        self
    }
}

impl WordStore for Box<[AtomicU64]> {
    fn words(&self) -> &[AtomicU64] {
        self
    }
}

impl WordStore for Vec<AtomicU64> {
    fn words(&self) -> &[AtomicU64] {
        self
    }
}

impl WordStore for &'static [AtomicU64] {
    fn words(&self) -> &[AtomicU64] {
        self
    }
}

/// One bit per page of a region; safe to update from any thread.
pub struct DirtyBitmap {
    store: Box<dyn WordStore>,
    pages: u64,
    words: usize,
}

impl DirtyBitmap {
    /// Words needed for `pages` pages.
    pub const fn words_for(pages: u64) -> usize {
        pages.div_ceil(64) as usize
    }

    /// An empty bitmap for `pages` pages in its own anonymous mapping.
    pub fn new(pages: u64) -> Result<Self> {
        let store = OwnedWords::new(Self::words_for(pages)).map_err(TrackError::sys("mmap"))?;
        Self::with_store(Box::new(store), pages)
    }

    /// A bitmap over caller-provided words (which may hold more words than
    /// needed; the extra ones are left alone). The current contents are kept.
    pub fn with_store(store: Box<dyn WordStore>, pages: u64) -> Result<Self> {
        let need = Self::words_for(pages);
        let have = store.words().len();
        if have < need {
            return Err(TrackError::StorageTooSmall { have, need, pages });
        }
        Ok(Self { store, pages, words: need })
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The words, exactly [`words_for`](Self::words_for)`(pages)` of them.
    pub fn words(&self) -> &[AtomicU64] {
        &self.store.words()[..self.words]
    }

    /// Marks `page` dirty. Panics when `page` is out of the region.
    #[inline]
    pub fn set(&self, page: u64) {
        assert!(page < self.pages, "page {page} out of a {}-page region", self.pages);
        self.words()[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Release);
    }

    /// Marks `count` pages from `first` dirty. Panics when the range leaves the region.
    pub fn set_range(&self, first: u64, count: u64) {
        let end = first.checked_add(count).filter(|&e| e <= self.pages);
        let end = end.unwrap_or_else(|| panic!("pages {first}+{count} out of a {}-page region", self.pages));
        let words = self.words();
        let mut p = first;
        while p < end {
            let bit = p % 64;
            let n = (64 - bit).min(end - p);
            let mask = if n == 64 { !0 } else { ((1u64 << n) - 1) << bit };
            words[(p / 64) as usize].fetch_or(mask, Ordering::Release);
            p += n;
        }
    }

    /// Whether `page` is dirty.
    pub fn contains(&self, page: u64) -> bool {
        page < self.pages && self.words()[(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// Marks every page dirty (and clears the bits past the last page).
    pub fn fill(&self) {
        let words = self.words();
        for (i, w) in words.iter().enumerate() {
            w.store(tail_mask(i, self.pages), Ordering::Release);
        }
    }

    /// Marks every page clean.
    pub fn clear(&self) {
        for w in self.words() {
            w.store(0, Ordering::Release);
        }
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words().iter().map(|w| u64::from(w.load(Ordering::Acquire).count_ones())).sum()
    }

    /// Appends the dirty pages, ascending, without changing the set.
    pub fn collect_into(&self, out: &mut Vec<u64>) {
        for (i, w) in self.words().iter().enumerate() {
            push_bits(out, i, w.load(Ordering::Acquire));
        }
    }

    /// Appends the dirty pages, ascending, and clears them (word by word,
    /// atomically: a bit set concurrently is either taken now or kept).
    pub fn take_into(&self, out: &mut Vec<u64>) {
        for (i, w) in self.words().iter().enumerate() {
            if w.load(Ordering::Relaxed) != 0 {
                push_bits(out, i, w.swap(0, Ordering::AcqRel));
            }
        }
    }

    /// Moves the dirty pages into `dst` and appends them to `out`,
    /// ascending: word by word, each bit is set in `dst` *before* it is
    /// cleared here, so at every instant a page is in `self` or in `dst`
    /// (for a reader that loads a word of `self` and then the same word of
    /// `dst`). A bit set here concurrently is either moved now or kept.
    /// Panics when `dst` covers a different number of pages.
    pub fn move_into(&self, dst: &DirtyBitmap, out: &mut Vec<u64>) {
        assert_eq!(dst.pages, self.pages, "move_into: bitmaps of different sizes");
        for (i, (w, d)) in self.words().iter().zip(dst.words()).enumerate() {
            let bits = w.load(Ordering::Acquire);
            if bits != 0 {
                d.fetch_or(bits, Ordering::Release);
                // Only the bits loaded (and now in `dst`) are cleared.
                w.fetch_and(!bits, Ordering::Release);
                push_bits(out, i, bits);
            }
        }
    }

    /// Whether the words of `self` and `other` share memory.
    pub fn overlaps(&self, other: &DirtyBitmap) -> bool {
        let span = |b: &DirtyBitmap| {
            let w = b.words().as_ptr_range();
            (w.start as usize, w.end as usize)
        };
        let ((a0, a1), (b0, b1)) = (span(self), span(other));
        a0 < b1 && b0 < a1
    }

    /// Where the words lie in a mapping at `base` of `len` bytes (e.g. the
    /// control region the caller gave the store from): the byte offset of
    /// word 0, when all [`words_for`](Self::words_for)`(pages)` words lie
    /// inside it; `None` otherwise. Pure address arithmetic.
    pub fn offset_in(&self, base: *const u8, len: usize) -> Option<usize> {
        let w = self.words().as_ptr_range();
        let (start, end) = (w.start as usize, w.end as usize);
        let off = start.checked_sub(base as usize)?;
        (end - base as usize <= len).then_some(off)
    }
}

impl fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyBitmap").field("pages", &self.pages).field("dirty", &self.count()).finish()
    }
}

/// The valid bits of word `i` of a `pages`-page bitmap.
fn tail_mask(i: usize, pages: u64) -> u64 {
    let first = i as u64 * 64;
    match pages.saturating_sub(first) {
        0 => 0,
        n if n >= 64 => !0,
        n => (1 << n) - 1,
    }
}

/// Appends the pages of the set bits of word `i`.
pub(crate) fn push_bits(out: &mut Vec<u64>, i: usize, mut bits: u64) {
    let base = i as u64 * 64;
    while bits != 0 {
        out.push(base + u64::from(bits.trailing_zeros()));
        bits &= bits - 1;
    }
}

/// The runs of consecutive set bits of word `i`, as page ranges `[start, end)`.
pub(crate) fn word_runs(i: usize, mut bits: u64) -> impl Iterator<Item = (u64, u64)> {
    let base = i as u64 * 64;
    std::iter::from_fn(move || {
        if bits == 0 {
            return None;
        }
        let lo = bits.trailing_zeros();
        let ones = (bits >> lo).trailing_ones();
        let mask = if ones == 64 { !0 } else { ((1u64 << ones) - 1) << lo };
        bits &= !mask;
        Some((base + u64::from(lo), base + u64::from(lo + ones)))
    })
}

/// Merges ascending page runs that touch into maximal runs.
pub(crate) struct RunMerger {
    cur: Option<(u64, u64)>,
}

impl RunMerger {
    pub(crate) fn new() -> Self {
        Self { cur: None }
    }

    /// Adds `[s, e)` (with `s >=` the end of every earlier run); returns a
    /// finished run when this one does not continue it.
    pub(crate) fn push(&mut self, s: u64, e: u64) -> Option<(u64, u64)> {
        match self.cur {
            Some((cs, ce)) if ce == s => {
                self.cur = Some((cs, e));
                None
            }
            prev => {
                self.cur = Some((s, e));
                prev
            }
        }
    }

    /// The last run, if any.
    pub(crate) fn finish(self) -> Option<(u64, u64)> {
        self.cur
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn set_fill_take() {
        let b = DirtyBitmap::new(130).unwrap();
        assert_eq!(b.words().len(), 3);
        b.set(0);
        b.set(64);
        b.set(129);
        assert!(b.contains(64) && !b.contains(63) && !b.contains(130));
        let mut v = vec![];
        b.take_into(&mut v);
        assert_eq!(v, [0, 64, 129]);
        assert_eq!(b.count(), 0);
        b.fill();
        assert_eq!(b.count(), 130);
        assert_eq!(b.words()[2].load(Ordering::Relaxed), 0b11);
        b.clear();
        b.set_range(60, 70);
        v.clear();
        b.collect_into(&mut v);
        assert_eq!(v, (60..130).collect::<Vec<_>>());
    }

    #[test]
    #[should_panic(expected = "out of a 10-page region")]
    fn set_out_of_range_panics() {
        DirtyBitmap::new(10).unwrap().set(10);
    }

    #[test]
    fn external_storage() {
        let words: Vec<AtomicU64> = (0..4).map(|_| AtomicU64::new(0)).collect();
        let b = DirtyBitmap::with_store(Box::new(words), 200).unwrap();
        b.set(199);
        assert!(b.contains(199));
        let small: Vec<AtomicU64> = (0..1).map(|_| AtomicU64::new(0)).collect();
        assert!(matches!(
            DirtyBitmap::with_store(Box::new(small), 65),
            Err(TrackError::StorageTooSmall { have: 1, need: 2, pages: 65 })
        ));
    }

    #[test]
    fn raw_storage_move_and_offsets() {
        // A stand-in for a control region: 8 words, the bitmap at word 3.
        let region: &'static [AtomicU64] = Box::leak((0..8).map(|_| AtomicU64::new(0)).collect());
        let base = region.as_ptr().cast::<u8>();
        let cur = DirtyBitmap::with_store(Box::new(super::super::sys::raw_words_of(&region[3..5])), 100).unwrap();
        let closing = DirtyBitmap::with_store(Box::new(super::super::sys::raw_words_of(&region[5..8])), 100).unwrap();
        assert_eq!(cur.offset_in(base, 64), Some(24));
        assert_eq!(closing.offset_in(base, 64), Some(40));
        assert_eq!(closing.offset_in(base, 55), None, "last word outside");
        assert_eq!(cur.offset_in(base.wrapping_add(32), 32), None, "starts before");
        assert!(!cur.overlaps(&closing) && cur.overlaps(&cur));
        cur.set(1);
        cur.set(99);
        closing.set(5);
        let mut v = vec![];
        cur.move_into(&closing, &mut v);
        assert_eq!(v, [1, 99]);
        assert_eq!(cur.count(), 0);
        v.clear();
        closing.collect_into(&mut v);
        assert_eq!(v, [1, 5, 99]);
        assert_eq!(region[3].load(Ordering::Relaxed), 0);
        assert_eq!(region[5].load(Ordering::Relaxed), (1 << 1) | (1 << 5));
    }

    proptest! {
        /// Runs extracted word by word and merged equal the naive list of set pages.
        #[test]
        fn runs_match_bits(words in proptest::collection::vec(any::<u64>(), 0..6)) {
            let mut naive = vec![];
            for (i, &w) in words.iter().enumerate() {
                push_bits(&mut naive, i, w);
            }
            let mut merged = vec![];
            let mut m = RunMerger::new();
            for (i, &w) in words.iter().enumerate() {
                for (s, e) in word_runs(i, w) {
                    merged.extend(m.push(s, e));
                }
            }
            merged.extend(m.finish());
            for pair in merged.windows(2) {
                prop_assert!(pair[0].1 < pair[1].0, "runs not maximal: {:?}", pair);
            }
            let expanded: Vec<u64> = merged.iter().flat_map(|&(s, e)| s..e).collect();
            prop_assert_eq!(expanded, naive);
        }
    }
}
