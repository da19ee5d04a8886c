//! Dirty-page tracking: which pages of the heap were written since the
//! last flush.
//!
//! Dependencies: none beyond what `remem-alloc` already has (`libc`,
//! `thiserror`; `proptest` in tests). The userfaultfd and `PAGEMAP_SCAN`
//! definitions are written out in `sys.rs` rather than taken from the
//! `userfaultfd` crate, whose build runs bindgen.
//!
//! ```text
//!   Tracker (trait: mode, harvest, harvest_into, current_set, protect_all, mark_dirty)
//!      ┌─────────────────────┬──────────────────────┬──────────────────┐
//!  NoTracking (Off)    PreciseTracker (Precise)    FastTracker (Fast)
//!  every page, every   sync WP faults → handler    WP_ASYNC: kernel resolves
//!  harvest (full-      thread sets a bit in the    faults; harvest = one
//!  image flushes)      DirtyBitmap, then un-       PAGEMAP_SCAN pass that gets
//!                      protects; harvest re-       written pages and re-
//!                      protects, then clears       protects them atomically
//!                             │
//!                      DirtyBitmap over a WordStore (own mapping, or
//!                      RawWords: caller memory such as a shared memfd
//!                      control region, for the agent)
//! ```
//!
//! ## Two epochs across a flush
//!
//! A flusher that must keep the dirty lists complete while it flushes
//! (docs/design.md, F2) keeps a second bitmap, the *closing* epoch, next to the
//! tracker's *current* set, both in the shared control region:
//!
//! ```text
//! loop {
//!     tracker.harvest_into(&closing, &mut pages)?; // current -> closing, re-protected
//!     copy, checksum and write `pages`; fsync; write the commit record;
//!     closing.clear();                             // only once committed
//! }
//! ```
//!
//! In precise mode a page written since the last committed flush is, at
//! every instant, in the current set or in `closing` (see
//! [`Tracker::harvest_into`] for what holds in fast mode).
//!
//! Files: `sys.rs` (every `unsafe`: raw structs, ioctls, mappings),
//! `features.rs` (feature bits and the kernels that have them),
//! `bitmap.rs` (the dirty set, pure), `precise.rs`, `fast.rs`,
//! `builder.rs`, `error.rs`, `tests.rs`.
//!
//! Writes the page tables do not see (device DMA, O_DIRECT reads into the
//! heap, RDMA writes, io_uring fixed buffers) are invisible to both modes:
//! report them with [`Tracker::mark_dirty`].

mod bitmap;
mod builder;
mod error;
mod fast;
mod features;
mod precise;
mod sys;
#[cfg(test)]
mod tests;

pub use bitmap::{DirtyBitmap, OwnedWords, RawWords, WordStore};
pub use builder::{probe_features, TrackerBuilder};
pub use error::{Result, TrackError};
pub use fast::FastTracker;
pub use features::UffdFeatures;
pub use precise::PreciseTracker;
pub(crate) use precise::WpFaults;
pub(crate) use sys::{
    poll_in2, uffd_copy, uffd_poison, EventFd, Uffd as RawUffd, UFFDIO_COPY_MODE_DONTWAKE, UFFDIO_COPY_MODE_WP,
};

use std::fmt;

/// How pages are tracked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TrackMode {
    /// No tracking, chosen explicitly: every harvest returns every page, so
    /// every flush writes the full image. Works everywhere.
    Off,
    /// Synchronous write-protect faults recorded by a handler thread before
    /// the page is un-protected: the dirty set is complete at every instant
    /// (survives the host OS hanging while its memory stays readable).
    /// First write to a page after a harvest ≈ 6–45 µs.
    Precise,
    /// `UFFD_FEATURE_WP_ASYNC` + `PAGEMAP_SCAN` (Linux ≥ 6.7): the kernel
    /// resolves faults itself (first write ≈ 1 µs) and harvests read the
    /// page tables; pages written after the last harvest are unknown once
    /// the process is gone.
    Fast,
}

impl fmt::Display for TrackMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Precise => "precise",
            Self::Fast => "fast",
        })
    }
}

/// The seam between the heap/flusher and the way dirty pages are found.
///
/// Pages are numbered from 0 at the region's start. Every method may be
/// called from any thread, concurrently with writers.
pub trait Tracker: Send + Sync + fmt::Debug {
    /// The mode this tracker runs in.
    fn mode(&self) -> TrackMode;

    /// Number of pages in the region.
    fn pages(&self) -> u64;

    /// Page size in bytes.
    fn page_size(&self) -> usize;

    /// Replaces the contents of `out` with the pages written since the
    /// previous harvest (or [`protect_all`](Self::protect_all)), ascending
    /// and without duplicates, and re-protects them so that their next
    /// write is seen again. A new tracker's first harvest reports every page.
    ///
    /// Atomic with respect to concurrent writers: a write racing with the
    /// harvest is either in memory before the harvest returns (its page is
    /// reported now, and a copy made after this call sees it) or reported by
    /// the next harvest; never lost.
    fn harvest(&self, out: &mut Vec<u64>) -> Result<()>;

    /// Like [`harvest`](Self::harvest), but every page it takes from the
    /// current set is set in `closing` *before* it leaves the current set,
    /// so that a flusher which clears `closing` only once its flush is
    /// committed never has a page that was written since the last committed
    /// flush in neither. `out` receives the pages taken by this call
    /// (ascending, without duplicates); `closing` is only ever added to, so
    /// after an uncommitted flush a second call accumulates into it and the
    /// flush must write all of `closing` ([`DirtyBitmap::collect_into`]).
    ///
    /// What holds, by mode:
    ///
    /// - **Precise**: at every instant, including in the middle of this
    ///   call, every page written since the last committed flush is in
    ///   [`current_set`](Self::current_set) or in `closing` (and every
    ///   writable page is in the current set). A reader that loads a word of
    ///   the current set and then the same word of `closing` sees the page
    ///   in one of them; so does anyone reading a frozen image of both.
    /// - **Fast**: the current set is the kernel's page tables (plus the
    ///   [`mark_dirty`](Self::mark_dirty) bitmap), which no other process
    ///   can read. Each `PAGEMAP_SCAN` batch is set in `closing` as soon as
    ///   the ioctl returns, before the next batch and before the results
    ///   are dropped, so the pages pass only through the caller's stack.
    ///   Once this call returns, `closing` holds every page written before
    ///   the scan passed it; pages written after the scan, i.e. between
    ///   harvests, are known only to the page tables and are lost with the
    ///   process (the agent must seal the lists, docs/design.md). `closing` is
    ///   complete *after each harvest*, not at every instant.
    /// - **Off**: sets every page in `closing` and reports every page.
    ///
    /// `closing` must cover [`pages`](Self::pages) pages
    /// ([`TrackError::ClosingSizeMismatch`]), must not share words with the
    /// current set ([`TrackError::ClosingAliasesCurrent`]), and must not be
    /// in tracked memory (in precise mode it is written while the fault
    /// handler is held off). On error the pages not yet taken stay in the
    /// current set; some of them may already be in `closing` too.
    fn harvest_into(&self, closing: &DirtyBitmap, out: &mut Vec<u64>) -> Result<()>;

    /// The current dirty set, when it is a bitmap in memory: in precise
    /// mode, the words of the [`WordStore`] given to
    /// [`TrackerBuilder::build_precise_in`] (or of the tracker's own
    /// mapping); [`DirtyBitmap::offset_in`] tells where they lie in a
    /// control region. `None` in fast mode (the current set is in the page
    /// tables) and when tracking is off.
    fn current_set(&self) -> Option<&DirtyBitmap>;

    /// Write-protects every page and empties the dirty set: afterwards only
    /// pages written from now on are reported (writes before the call are
    /// forgotten; a write racing with it is either forgotten, i.e. it
    /// happened before, or reported).
    fn protect_all(&self) -> Result<()>;

    /// Reports `count` pages from `first` as written, for writes the page
    /// tables do not see (DMA, O_DIRECT reads into the heap, RDMA writes).
    /// Call it after such a write completes. Panics when the range leaves
    /// the region.
    fn mark_dirty(&self, first: u64, count: u64);
}

/// The explicit opt-out: tracks nothing, so every harvest returns every
/// page and every flush is a full image.
#[derive(Clone, Debug)]
pub struct NoTracking {
    pages: u64,
    page_size: usize,
}

impl NoTracking {
    /// For a region of `pages` pages of `page_size` bytes.
    pub fn new(pages: u64, page_size: usize) -> Self {
        Self { pages, page_size }
    }
}

impl Tracker for NoTracking {
    fn mode(&self) -> TrackMode {
        TrackMode::Off
    }

    fn pages(&self) -> u64 {
        self.pages
    }

    fn page_size(&self) -> usize {
        self.page_size
    }

    fn harvest(&self, out: &mut Vec<u64>) -> Result<()> {
        out.clear();
        out.extend(0..self.pages);
        Ok(())
    }

    fn harvest_into(&self, closing: &DirtyBitmap, out: &mut Vec<u64>) -> Result<()> {
        check_closing(closing, self.pages, None)?;
        closing.fill();
        self.harvest(out)
    }

    fn current_set(&self) -> Option<&DirtyBitmap> {
        None
    }

    fn protect_all(&self) -> Result<()> {
        Ok(())
    }

    fn mark_dirty(&self, first: u64, count: u64) {
        assert!(
            first.checked_add(count).is_some_and(|e| e <= self.pages),
            "pages {first}+{count} out of a {}-page region",
            self.pages
        );
    }
}

/// Checks the `closing` bitmap given to `harvest_into`.
pub(crate) fn check_closing(closing: &DirtyBitmap, pages: u64, current: Option<&DirtyBitmap>) -> Result<()> {
    if closing.pages() != pages {
        return Err(TrackError::ClosingSizeMismatch { closing: closing.pages(), pages });
    }
    if current.is_some_and(|c| c.overlaps(closing)) {
        return Err(TrackError::ClosingAliasesCurrent);
    }
    Ok(())
}

/// A validated, page-aligned address range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Region {
    pub(crate) base: u64,
    pub(crate) len: u64,
    pub(crate) page_shift: u32,
}

impl Region {
    pub(crate) fn new(base: *mut u8, len: usize) -> Result<Self> {
        let page_size = sys::page_size();
        let addr = base as usize;
        let ok = !base.is_null()
            && len > 0
            && addr & (page_size - 1) == 0
            && len & (page_size - 1) == 0
            && addr.checked_add(len).is_some();
        if !ok {
            return Err(TrackError::Misaligned { base: addr, len, page_size });
        }
        Ok(Self { base: addr as u64, len: len as u64, page_shift: page_size.trailing_zeros() })
    }

    pub(crate) fn page_size(&self) -> usize {
        1 << self.page_shift
    }

    pub(crate) fn pages(&self) -> u64 {
        self.len >> self.page_shift
    }

    /// Address of `page`.
    pub(crate) fn addr(&self, page: u64) -> u64 {
        self.base + (page << self.page_shift)
    }

    /// The page holding `addr`, if it is in the region.
    pub(crate) fn page_of(&self, addr: u64) -> Option<u64> {
        addr.checked_sub(self.base).filter(|&off| off < self.len).map(|off| off >> self.page_shift)
    }

    /// The page boundary index of `addr` clamped to `0..=pages`.
    pub(crate) fn page_of_clamped(&self, addr: u64) -> u64 {
        (addr.saturating_sub(self.base) >> self.page_shift).min(self.pages())
    }
}
