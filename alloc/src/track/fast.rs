//! Fast mode: `UFFD_FEATURE_WP_ASYNC` + `PAGEMAP_SCAN` (Linux ≥ 6.7).
//!
//! The region is registered for write-protection in async mode: the kernel
//! resolves a write fault on a protected page itself (it clears the page's
//! uffd-wp bit, which `PAGEMAP_SCAN` reports as `PAGE_IS_WRITTEN`), without
//! any thread of ours. A harvest is a `PAGEMAP_SCAN` pass with
//! `PM_SCAN_WP_MATCHING`, which returns the written pages and re-protects
//! them in the same page-table walk.
//!
//! The dirty set exists only in the page tables between harvests: once the
//! process is gone, pages written since the last harvest are unknown (the
//! agent must seal the lists, see docs/design.md). No thread, no lock.
//!
//! [`Tracker::harvest_into`] moves each `PAGEMAP_SCAN` batch into the
//! closing bitmap as soon as the ioctl returns, so a closing bitmap in a
//! shared control region is complete once the call returns (for every
//! write the scan passed); it cannot be complete at every instant, since
//! the current set is in page tables no other process can read.
//! [`FastTracker::peek_into`] reads the current set without taking it.

use super::bitmap::DirtyBitmap;
use super::builder::{check_features, open_registered, probe_with, TrackerBuilder};
use super::error::{Result, TrackError};
use super::features::UffdFeatures;
use super::sys::{self, PageRegion, Pagemap, Uffd};
use super::{Region, TrackMode, Tracker};

/// Regions fetched per `PAGEMAP_SCAN` call (the kernel's own bounce buffer
/// holds 512; 12 KiB on the stack).
const SCAN_BATCH: usize = 512;

/// Says which pages are known unwritten whatever their page table entry
/// says (see [`FastTracker::with_known_clean`]).
pub(crate) type KnownClean = Box<dyn Fn(u64) -> bool + Send + Sync>;

/// Asynchronous write-protect tracking harvested by `PAGEMAP_SCAN`.
pub struct FastTracker {
    region: Region,
    uffd: Uffd,
    pagemap: Pagemap,
    /// Pages marked by [`Tracker::mark_dirty`] (and, until the first harvest
    /// or `protect_all`, every page): merged into the next harvest.
    marked: DirtyBitmap,
    /// Pages never to report from a scan (a lazily loading heap's holes).
    known_clean: Option<KnownClean>,
}

impl std::fmt::Debug for FastTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastTracker")
            .field("region", &self.region)
            .field("known_clean", &self.known_clean.is_some())
            .finish_non_exhaustive()
    }
}

impl FastTracker {
    pub(crate) fn build(b: &TrackerBuilder, region: Region) -> Result<Self> {
        let supported = probe_with(b.close_on_exec)?;
        let required = UffdFeatures::WP_ASYNC | UffdFeatures::WP_UNPOPULATED | b.require;
        check_features(
            supported,
            required,
            "TrackMode::Precise works on older kernels (memfd from 5.19) with a slower first write \
             per page; TrackMode::Off opts out of tracking",
        )?;
        let wanted = required | (supported & UffdFeatures::WP_HUGETLBFS_SHMEM);

        let uffd = open_registered(
            b,
            wanted,
            region,
            "6.7",
            "use a memfd, anonymous or file mapping, or TrackMode::Off to opt out",
        )?;
        let this = Self::with_uffd(region, uffd)?;
        // Never seen clean: the first harvest reports every page.
        this.marked.fill();
        Ok(this)
    }

    /// A fast tracker on a userfaultfd someone else opened with
    /// `WP_ASYNC` and registered over `region` for write-protection (and
    /// for missing pages: the lazy loader, which shares its context so that
    /// one context per range carries loading and tracking). Starts clean:
    /// the loader installs every page write-protected.
    pub(crate) fn on_shared(region: Region, uffd: Uffd) -> Result<Self> {
        Self::with_uffd(region, uffd)
    }

    fn with_uffd(region: Region, uffd: Uffd) -> Result<Self> {
        let pagemap = Pagemap::open_self().map_err(TrackError::sys("open /proc/self/pagemap"))?;
        // One get-only call on the first page: proves PAGEMAP_SCAN exists
        // and sees the range as async-registered.
        let mut one = [PageRegion::default()];
        let first_page_end = region.base + region.page_size() as u64;
        match pagemap.scan(region.base, first_page_end, sys::PM_SCAN_CHECK_WPASYNC, sys::PAGE_IS_WRITTEN, &mut one) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY) | Some(libc::EINVAL)) => {
                return Err(TrackError::FeatureMissing {
                    feature: "the PAGEMAP_SCAN ioctl",
                    since: "6.7",
                    kernel: sys::kernel_release(),
                    hint: "TrackMode::Precise works on older kernels; TrackMode::Off opts out",
                })
            }
            Err(e) => return Err(TrackError::Sys { op: "PAGEMAP_SCAN", source: e }),
        }
        let marked = DirtyBitmap::new(region.pages())?;
        Ok(Self { region, uffd, pagemap, marked, known_clean: None })
    }

    /// Pages for which `clean` says true are left out of every scan's
    /// result (they are still re-protected by a harvest). For a lazily
    /// loading heap: a page not installed yet is an empty entry, which
    /// `PAGEMAP_SCAN` counts as written unless a write-protect marker was
    /// put there; `clean` says which pages are such holes (known zero and
    /// never touched: a write to one would first raise a missing-page
    /// fault and install it), so the range need not be marked up front (a
    /// walk over every page table of the heap). The first harvest marks
    /// them in passing.
    pub(crate) fn with_known_clean(mut self, clean: KnownClean) -> Self {
        self.known_clean = Some(clean);
        self
    }

    /// One get-and-re-protect pass over the region: calls `f(first, end)`
    /// for each run of written pages, batch by batch, as soon as each
    /// `PAGEMAP_SCAN` call returns (before the next call).
    ///
    /// Why a racing write is never lost: `PM_SCAN_WP_MATCHING` tests a
    /// page's written state and write-protects it under the page-table lock
    /// in one step, and the ioctl flushes the TLB before it returns. A write
    /// that completes before that step is in memory when the caller copies
    /// the page after this harvest; a write after it faults, and the
    /// kernel's async resolution marks the page written again, so the next
    /// harvest reports it.
    fn scan_with(&self, protect: bool, mut f: impl FnMut(u64, u64)) -> Result<()> {
        let r = &self.region;
        let end = r.base + r.len;
        let flags =
            if protect { sys::PM_SCAN_WP_MATCHING | sys::PM_SCAN_CHECK_WPASYNC } else { sys::PM_SCAN_CHECK_WPASYNC };
        let mut vec = [PageRegion::default(); SCAN_BATCH];
        let mut start = r.base;
        loop {
            let (n, walk_end) = self
                .pagemap
                .scan(start, end, flags, sys::PAGE_IS_WRITTEN, &mut vec)
                .map_err(TrackError::sys("PAGEMAP_SCAN"))?;
            for reg in &vec[..n] {
                let (a, b) = (r.page_of_clamped(reg.start), r.page_of_clamped(reg.end));
                match &self.known_clean {
                    None => f(a, b),
                    Some(clean) => {
                        // The run without its known-clean pages, as sub-runs.
                        let mut s = a;
                        for p in a..b {
                            if clean(p) {
                                if s < p {
                                    f(s, p);
                                }
                                s = p + 1;
                            }
                        }
                        if s < b {
                            f(s, b);
                        }
                    }
                }
            }
            // A call that returns fewer regions than the buffer holds has
            // walked the whole range. Its walk_end can then be stale (an
            // internal 512-region boundary, docs/design.md), so it is not used
            // to decide completion.
            if n < vec.len() {
                return Ok(());
            }
            // Buffer full: resume where the walk stopped. Resuming early
            // only re-reads pages already re-protected (or rewritten since),
            // and the caller deduplicates.
            let next = if walk_end > start { walk_end } else { vec[n - 1].end };
            if next >= end {
                return Ok(());
            }
            start = next;
        }
    }

    /// Replaces the contents of `out` with the current dirty set (pages
    /// written since the last harvest, per the page tables, and pages
    /// marked by [`Tracker::mark_dirty`]), ascending, without taking or
    /// re-protecting anything: what the next harvest would report if no
    /// page were written meanwhile.
    pub fn peek_into(&self, out: &mut Vec<u64>) -> Result<()> {
        out.clear();
        self.scan_with(false, |a, b| out.extend(a..b))?;
        self.marked.collect_into(out);
        sort_dedup(out);
        Ok(())
    }
}

fn sort_dedup(out: &mut Vec<u64>) {
    if !out.windows(2).all(|w| w[0] < w[1]) {
        out.sort_unstable();
        out.dedup();
    }
}

impl Tracker for FastTracker {
    fn mode(&self) -> TrackMode {
        TrackMode::Fast
    }

    fn pages(&self) -> u64 {
        self.region.pages()
    }

    fn page_size(&self) -> usize {
        self.region.page_size()
    }

    fn harvest(&self, out: &mut Vec<u64>) -> Result<()> {
        out.clear();
        self.scan_with(true, |a, b| out.extend(a..b))?;
        self.marked.take_into(out);
        sort_dedup(out);
        Ok(())
    }

    /// Each batch of runs goes into `closing` before the next
    /// `PAGEMAP_SCAN` call (and before the batch buffer is reused or
    /// dropped); marked pages are set in `closing` before their bits are
    /// cleared ([`DirtyBitmap::move_into`]).
    fn harvest_into(&self, closing: &DirtyBitmap, out: &mut Vec<u64>) -> Result<()> {
        super::check_closing(closing, self.pages(), Some(&self.marked))?;
        out.clear();
        self.scan_with(true, |a, b| {
            closing.set_range(a, b - a);
            out.extend(a..b);
        })?;
        self.marked.move_into(closing, out);
        sort_dedup(out);
        Ok(())
    }

    fn current_set(&self) -> Option<&DirtyBitmap> {
        None
    }

    fn protect_all(&self) -> Result<()> {
        self.uffd
            .writeprotect(self.region.base, self.region.len, true)
            .map_err(TrackError::sys("UFFDIO_WRITEPROTECT"))?;
        self.marked.clear();
        Ok(())
    }

    fn mark_dirty(&self, first: u64, count: u64) {
        self.marked.set_range(first, count);
    }
}
