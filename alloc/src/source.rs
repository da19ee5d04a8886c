//! Where the pages of a heap being recovered come from: one interface for
//! every place that may hold the newest copy of a page, and one per-page
//! state table shared by whoever installs pages (the lazy fault handler,
//! the prefetcher, an eager loader).
//!
//! The newest copy of a page is, in order: in the failed host's memory (the
//! agent, or a hung host's registered memory), else in the baseline journal,
//! else in the baseline image, else zero. A durable "resume" file of pages
//! already pulled is one more place. Eager, lazy and hung-host recovery
//! differ only in *when* pages are fetched, so they all read through a
//! [`PageSource`], usually a [`Layered`] one whose last layer is a
//! [`BaselineSource`]:
//!
//! ```text
//!   Layered [ agent (claims pages not known clean) , resume file , BaselineSource ]
//!             │ read_pages(first, dst, status)       per page: Data | Zero | Unreadable
//!             ▼
//!   PageStates: Absent ─claim─▶ InFlight ─install─▶ Resident
//!                                    └──────────────▶ Poisoned (no current copy)
//! ```
//!
//! The trait is the one of `docs/recovery.md` ("Page sources"). The only
//! addition to the interface agreed there: the state table has a fifth
//! state, [`PageState::Zero`], for a page known to be all zero whose
//! installation is left to its first touch (a lazy heap does not populate
//! the holes of a half-empty heap). Pure Rust apart from the table's
//! storage (an anonymous mapping, [`OwnedWords`], so that a fault handler
//! never touches the heap it serves even when the heap is the global
//! allocator).

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::baseline::{Backend, Baseline, BaselineError};
use crate::format::PAGE_SIZE;
use crate::track::OwnedWords;

/// The outcome of reading one page from a [`PageSource`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PageRead {
    /// The page's bytes are in the destination, verified where the source
    /// has a checksum.
    Data,
    /// The page is all zero; the destination was not written for it.
    Zero,
    /// The page could not be read or failed verification; the destination
    /// bytes for it are unspecified.
    Unreadable,
}

/// Why a whole [`PageSource::read_pages`] call failed (a per-page failure is
/// [`PageRead::Unreadable`] instead).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The request itself is wrong: pages outside the heap, or a buffer whose
    /// size does not match the page count.
    #[error("bad page request to source {source_name}: {what}")]
    BadRequest {
        /// The source's name.
        source_name: String,
        /// What is wrong with the request.
        what: String,
    },
    /// Reading from the source failed as a whole (an I/O error, a lost
    /// connection); the caller may retry or reconnect.
    #[error("page source {source_name} failed: {what}: {source}")]
    Io {
        /// The source's name.
        source_name: String,
        /// What it was doing.
        what: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The source failed for a reason other than I/O (e.g. a protocol error).
    #[error("page source {source_name} failed: {reason}")]
    Failed {
        /// The source's name.
        source_name: String,
        /// Why.
        reason: String,
    },
    /// No layer of a [`Layered`] source claims the page (its last layer
    /// should be a baseline, which claims every page).
    #[error("no layer of the page source claims page {page}")]
    Unclaimed {
        /// The page.
        page: u64,
    },
}

/// A place that holds copies of a heap's pages.
///
/// Implementations must be callable from any thread; a fault handler calls
/// `read_pages` while threads of the process wait for the page, so an
/// implementation should not allocate from (or touch) the heap being
/// recovered.
pub trait PageSource: Send + Sync {
    /// Does this source hold the newest copy of `page` (or may it: e.g. not
    /// yet sealed)? A [`Layered`] source asks its layers in order; the last
    /// layer (the baseline) claims every page. A source may stop claiming a
    /// page later (its seal progressed and found the page clean), never the
    /// other way round.
    fn claims(&self, page: u64) -> bool;

    /// Reads `status.len()` pages starting at `first` into `dst`
    /// (`status.len() * PAGE_SIZE` bytes), verifying each page's CRC where
    /// the source provides one, and sets each page's outcome in `status`. A
    /// page that fails verification or cannot be read is
    /// [`PageRead::Unreadable`]. `Err`: the whole source failed (e.g. a lost
    /// connection); the caller may retry or reconnect.
    fn read_pages(&self, first: u64, dst: &mut [u8], status: &mut [PageRead]) -> Result<(), SourceError>;

    /// Reads the pages of `runs` (`(first page, count)`, sorted, disjoint,
    /// inside `[first, first + status.len())`) into their places in `dst`
    /// and `status`, which cover the pages from `first` on; leaves the
    /// other pages alone. The default reads run by run; a source with a
    /// round trip per call (the agent) reads them all in one pipelined
    /// pass.
    fn read_runs(
        &self,
        first: u64,
        runs: &[(u64, u64)],
        dst: &mut [u8],
        status: &mut [PageRead],
    ) -> Result<(), SourceError> {
        check_request(self.name(), dst, status)?;
        for &(s, n) in runs {
            let k = s
                .checked_sub(first)
                .filter(|&k| k.checked_add(n).is_some_and(|e| e <= status.len() as u64))
                .ok_or_else(|| SourceError::BadRequest {
                    source_name: self.name().into(),
                    what: format!("run {s}+{n} outside pages {first}+{}", status.len()),
                })? as usize;
            let n = n as usize;
            self.read_pages(s, &mut dst[k * PAGE_SIZE..(k + n) * PAGE_SIZE], &mut status[k..k + n])?;
        }
        Ok(())
    }

    /// Asked once by a lazy loader when every page is in, before the
    /// recovered state is committed: `Err` refuses the commit (the heap
    /// stays usable; its flushes fail). A source that served pages it could
    /// not verify fully at the time (the agent, while its seal ran) checks
    /// them now. Default: `Ok`.
    fn confirm(&self) -> Result<(), String> {
        Ok(())
    }

    /// Told once, by a lazy loader, when every page is in and the
    /// recovered state is committed and durable: a source may drop what it
    /// kept only to resume an interrupted recovery (the agent's resume
    /// file). Default: nothing.
    fn recovered(&self) {}

    /// Short name for reports ("baseline", "agent", "resume").
    fn name(&self) -> &str;
}

impl<S: PageSource + ?Sized> PageSource for Arc<S> {
    fn claims(&self, page: u64) -> bool {
        (**self).claims(page)
    }
    fn read_pages(&self, first: u64, dst: &mut [u8], status: &mut [PageRead]) -> Result<(), SourceError> {
        (**self).read_pages(first, dst, status)
    }
    fn read_runs(
        &self,
        first: u64,
        runs: &[(u64, u64)],
        dst: &mut [u8],
        status: &mut [PageRead],
    ) -> Result<(), SourceError> {
        (**self).read_runs(first, runs, dst, status)
    }
    fn confirm(&self) -> Result<(), String> {
        (**self).confirm()
    }
    fn recovered(&self) {
        (**self).recovered()
    }
    fn name(&self) -> &str {
        (**self).name()
    }
}

/// Checks that `dst` holds `status.len()` pages.
pub fn check_request(source_name: &str, dst: &[u8], status: &[PageRead]) -> Result<(), SourceError> {
    if dst.len() != status.len() * PAGE_SIZE {
        return Err(SourceError::BadRequest {
            source_name: source_name.into(),
            what: format!("{} bytes of buffer for {} pages", dst.len(), status.len()),
        });
    }
    Ok(())
}

/// Ordered layers, newest first: each page is read from the first layer
/// that claims it. Each layer gets one [`PageSource::read_runs`] call per
/// request, with every run of the request's pages it claims (a 4 MiB
/// prefetch with scattered newer pages is one pipelined pull from the
/// agent and reads of the baseline between, not a round trip per page).
///
/// A page a layer reports [`PageRead::Unreadable`] is asked of the next
/// claiming layer only if the failing layer no longer claims it when asked
/// again (its knowledge moved on, e.g. a seal found the page clean): then
/// the next layer's copy is current. Otherwise it stays `Unreadable`, and
/// the caller poisons the page (never older bytes in place of newer ones).
pub struct Layered {
    layers: Vec<Arc<dyn PageSource>>,
    name: String,
}

impl fmt::Debug for Layered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Layered").field("name", &self.name).finish()
    }
}

impl Layered {
    /// The layers, newest first.
    pub fn new(layers: Vec<Arc<dyn PageSource>>) -> Layered {
        let name = layers.iter().map(|l| l.name()).collect::<Vec<_>>().join("+");
        Layered { layers, name }
    }

    /// The layers, newest first.
    pub fn layers(&self) -> &[Arc<dyn PageSource>] {
        &self.layers
    }

    /// Index of the first layer from `from` on that claims `page`.
    pub fn layer_of(&self, page: u64, from: usize) -> Option<usize> {
        (from..self.layers.len()).find(|&i| self.layers[i].claims(page))
    }

    /// Reads the pages starting at `first` from layers `from..`, each page from
    /// the first of them that claims it.
    fn read_from(&self, from: usize, first: u64, dst: &mut [u8], status: &mut [PageRead]) -> Result<(), SourceError> {
        let n = status.len();
        // Runs of adjacent pages per layer, in page order.
        let mut runs: Vec<Vec<(u64, u64)>> = vec![Vec::new(); self.layers.len()];
        let mut k = 0;
        while k < n {
            let page = first + k as u64;
            let layer = self.layer_of(page, from).ok_or(SourceError::Unclaimed { page })?;
            let mut e = k + 1;
            while e < n && self.layer_of(first + e as u64, from) == Some(layer) {
                e += 1;
            }
            runs[layer].push((page, (e - k) as u64));
            k = e;
        }
        for (layer, runs) in runs.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
            let l = &self.layers[layer];
            l.read_runs(first, runs, dst, status)?;
            for &(s, c) in runs {
                for p in s..s + c {
                    let j = (p - first) as usize;
                    if status[j] == PageRead::Unreadable && !l.claims(p) && layer + 1 < self.layers.len() {
                        let one = &mut dst[j * PAGE_SIZE..(j + 1) * PAGE_SIZE];
                        self.read_from(layer + 1, p, one, &mut status[j..=j])?;
                    }
                }
            }
        }
        Ok(())
    }
}

impl PageSource for Layered {
    fn claims(&self, page: u64) -> bool {
        self.layer_of(page, 0).is_some()
    }

    fn confirm(&self) -> Result<(), String> {
        self.layers.iter().try_for_each(|l| l.confirm().map_err(|e| format!("{}: {e}", l.name())))
    }

    fn recovered(&self) {
        for l in &self.layers {
            l.recovered();
        }
    }

    fn read_pages(&self, first: u64, dst: &mut [u8], status: &mut [PageRead]) -> Result<(), SourceError> {
        check_request(&self.name, dst, status)?;
        self.read_from(0, first, dst, status)
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// The pages of a [`Baseline`]: the newest committed version of each page
/// (journal, else image), zero for holes and zero pages (not read), every
/// page read checked against its committed CRC (a mismatch is
/// [`PageRead::Unreadable`]). Claims every page.
pub struct BaselineSource<B: Backend> {
    baseline: Baseline<B>,
}

impl<B: Backend> fmt::Debug for BaselineSource<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BaselineSource").field("baseline", &self.baseline).finish()
    }
}

impl<B: Backend> BaselineSource<B> {
    /// Serves the committed state of `baseline` as it was opened.
    pub fn new(baseline: Baseline<B>) -> Self {
        BaselineSource { baseline }
    }

    /// The baseline.
    pub fn baseline(&self) -> &Baseline<B> {
        &self.baseline
    }

    /// Gives the baseline back.
    pub fn into_inner(self) -> Baseline<B> {
        self.baseline
    }
}

impl<B: Backend> PageSource for BaselineSource<B> {
    fn claims(&self, _page: u64) -> bool {
        true
    }

    fn read_pages(&self, first: u64, dst: &mut [u8], status: &mut [PageRead]) -> Result<(), SourceError> {
        self.baseline.read_pages(first, dst, status).map_err(|e| match e {
            BaselineError::Io { op, source } => SourceError::Io { source_name: "baseline".into(), what: op, source },
            e => SourceError::BadRequest { source_name: "baseline".into(), what: e.to_string() },
        })
    }

    fn name(&self) -> &str {
        "baseline"
    }
}

/// An in-memory image as a source (tests, and a copy already in memory):
/// claims the pages in its claimed set (all of them by default), reports
/// all-zero pages as [`PageRead::Zero`] and the pages in its unreadable set
/// as [`PageRead::Unreadable`].
#[derive(Debug, Clone)]
pub struct ImageSource {
    name: String,
    image: Arc<Vec<u8>>,
    claimed: Option<Arc<BTreeSet<u64>>>,
    unreadable: Arc<BTreeSet<u64>>,
}

impl ImageSource {
    /// A source of `image` (a whole number of pages), claiming every page.
    pub fn new(name: &str, image: Vec<u8>) -> ImageSource {
        ImageSource { name: name.into(), image: Arc::new(image), claimed: None, unreadable: Arc::default() }
    }

    /// Claims only `pages`.
    pub fn claiming(mut self, pages: impl IntoIterator<Item = u64>) -> ImageSource {
        self.claimed = Some(Arc::new(pages.into_iter().collect()));
        self
    }

    /// Reports `pages` as unreadable.
    pub fn unreadable(mut self, pages: impl IntoIterator<Item = u64>) -> ImageSource {
        self.unreadable = Arc::new(pages.into_iter().collect());
        self
    }

    fn npages(&self) -> u64 {
        (self.image.len() / PAGE_SIZE) as u64
    }
}

impl PageSource for ImageSource {
    fn claims(&self, page: u64) -> bool {
        page < self.npages() && self.claimed.as_ref().is_none_or(|c| c.contains(&page))
    }

    fn read_pages(&self, first: u64, dst: &mut [u8], status: &mut [PageRead]) -> Result<(), SourceError> {
        check_request(&self.name, dst, status)?;
        if first.checked_add(status.len() as u64).is_none_or(|e| e > self.npages()) {
            return Err(SourceError::BadRequest {
                source_name: self.name.clone(),
                what: format!("pages {first}+{} beyond {} pages", status.len(), self.npages()),
            });
        }
        for (k, (d, s)) in dst.chunks_exact_mut(PAGE_SIZE).zip(status.iter_mut()).enumerate() {
            let p = first + k as u64;
            let src = &self.image[p as usize * PAGE_SIZE..(p as usize + 1) * PAGE_SIZE];
            *s = if self.unreadable.contains(&p) {
                PageRead::Unreadable
            } else if src.iter().all(|&b| b == 0) {
                PageRead::Zero
            } else {
                d.copy_from_slice(src);
                PageRead::Data
            };
        }
        Ok(())
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// The state of one page of a heap being recovered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum PageState {
    /// Not fetched yet, nobody is fetching it.
    Absent = 0,
    /// Someone claimed it and is fetching or installing it.
    InFlight = 1,
    /// Installed in the heap's memory.
    Resident = 2,
    /// No current copy could be read: installed as poison (touching it
    /// raises SIGBUS).
    Poisoned = 3,
    /// Known to be all zero; installed on first touch (not populated before).
    Zero = 4,
}

impl PageState {
    fn from_u8(v: u8) -> PageState {
        match v {
            0 => PageState::Absent,
            1 => PageState::InFlight,
            2 => PageState::Resident,
            3 => PageState::Poisoned,
            _ => PageState::Zero,
        }
    }

    /// Whether the page's content is settled (resident, poisoned, or known zero).
    pub fn is_settled(self) -> bool {
        matches!(self, PageState::Resident | PageState::Poisoned | PageState::Zero)
    }
}

/// Pages per word of the table (one byte each).
const PER_WORD: u64 = 8;

/// One atomic byte per page (packed eight to an `AtomicU64`, updated with
/// compare-and-swap), in an anonymous mapping of its own, plus counters.
/// Transitions: `Absent → InFlight` by [`PageStates::claim`] (exactly one
/// claimer wins), `InFlight → Resident | Poisoned | Zero | Absent` by the
/// winner ([`PageStates::finish`]), `Zero → InFlight` by the one who
/// installs a known-zero page on its first touch ([`PageStates::claim_zero`]).
pub struct PageStates {
    words: OwnedWords,
    pages: u64,
    /// Pages settled (resident, poisoned or known zero).
    settled: AtomicU64,
    resident: AtomicU64,
    poisoned: AtomicU64,
}

impl fmt::Debug for PageStates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageStates")
            .field("pages", &self.pages)
            .field("settled", &self.settled())
            .field("resident", &self.resident())
            .field("poisoned", &self.poisoned())
            .finish()
    }
}

impl PageStates {
    /// `pages` pages, all [`PageState::Absent`].
    pub fn new(pages: u64) -> io::Result<PageStates> {
        let words = OwnedWords::new(pages.div_ceil(PER_WORD) as usize)?;
        Ok(PageStates {
            words,
            pages,
            settled: AtomicU64::new(0),
            resident: AtomicU64::new(0),
            poisoned: AtomicU64::new(0),
        })
    }

    /// Pages in the table.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    fn slot(&self, page: u64) -> (&AtomicU64, u32) {
        assert!(page < self.pages, "page {page} out of a {}-page table", self.pages);
        (&self.words[(page / PER_WORD) as usize], (page % PER_WORD) as u32 * 8)
    }

    /// The state of `page`.
    pub fn get(&self, page: u64) -> PageState {
        let (w, shift) = self.slot(page);
        PageState::from_u8((w.load(Ordering::Acquire) >> shift) as u8)
    }

    /// Moves `page` from `from` to `to` if it is in `from`; returns whether it did.
    fn transition(&self, page: u64, from: PageState, to: PageState) -> bool {
        let (w, shift) = self.slot(page);
        let mask = 0xffu64 << shift;
        let mut cur = w.load(Ordering::Acquire);
        loop {
            if (cur & mask) >> shift != from as u64 {
                return false;
            }
            let new = (cur & !mask) | ((to as u64) << shift);
            match w.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(c) => cur = c,
            }
        }
    }

    /// Claims an absent page for fetching (`Absent → InFlight`); false if it
    /// is not absent (someone else has it, or it is settled).
    pub fn claim(&self, page: u64) -> bool {
        self.transition(page, PageState::Absent, PageState::InFlight)
    }

    /// Claims a known-zero page for installing (`Zero → InFlight`).
    pub fn claim_zero(&self, page: u64) -> bool {
        let won = self.transition(page, PageState::Zero, PageState::InFlight);
        if won {
            self.settled.fetch_sub(1, Ordering::AcqRel);
        }
        won
    }

    /// Ends a claim: `InFlight → to`. Panics if the page was not in flight
    /// (a claim protocol bug).
    pub fn finish(&self, page: u64, to: PageState) {
        assert!(self.transition(page, PageState::InFlight, to), "page {page} finished while not in flight");
        if to.is_settled() {
            self.settled.fetch_add(1, Ordering::AcqRel);
        }
        match to {
            PageState::Resident => self.resident.fetch_add(1, Ordering::AcqRel),
            PageState::Poisoned => self.poisoned.fetch_add(1, Ordering::AcqRel),
            _ => 0,
        };
    }

    /// Pages resident, poisoned or known zero.
    pub fn settled(&self) -> u64 {
        self.settled.load(Ordering::Acquire)
    }

    /// Pages installed.
    pub fn resident(&self) -> u64 {
        self.resident.load(Ordering::Acquire)
    }

    /// Pages poisoned.
    pub fn poisoned(&self) -> u64 {
        self.poisoned.load(Ordering::Acquire)
    }

    /// Whether every page is settled.
    pub fn all_settled(&self) -> bool {
        self.settled() == self.pages
    }

    /// The first page at or after `from` that is [`PageState::Absent`]
    /// (skipping eight settled pages per word load).
    pub fn next_absent(&self, from: u64) -> Option<u64> {
        let mut p = from;
        while p < self.pages {
            let w = self.words[(p / PER_WORD) as usize].load(Ordering::Acquire);
            if p.is_multiple_of(PER_WORD) && p + PER_WORD <= self.pages && !has_zero_byte(w) {
                p += PER_WORD;
                continue;
            }
            if (w >> ((p % PER_WORD) * 8)) as u8 == PageState::Absent as u8 {
                return Some(p);
            }
            p += 1;
        }
        None
    }
}

/// Whether some byte of `w` is zero.
fn has_zero_byte(w: u64) -> bool {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    (w.wrapping_sub(LO) & !w & HI) != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::baseline::FaultyBackend;

    fn page_of(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_SIZE]
    }

    /// A baseline of `npages` pages where page `p` holds byte `p + 1` for the
    /// pages in `data` (committed in epoch 1), then the pages in `journal`
    /// rewritten with byte `p + 101` (epoch 2, not applied).
    fn baseline(npages: u64, data: &[u64], journal: &[u64]) -> Baseline<FaultyBackend> {
        let mut b = Baseline::create(FaultyBackend::new(), [7; 16], npages * PAGE_SIZE as u64, 1).unwrap();
        let pages: Vec<(u64, Vec<u8>)> = data.iter().map(|&p| (p, page_of(p as u8 + 1))).collect();
        b.commit(1, pages.iter().map(|(p, v)| (*p, v.as_slice()))).unwrap();
        b.apply().unwrap();
        let pages: Vec<(u64, Vec<u8>)> = journal.iter().map(|&p| (p, page_of(p as u8 + 101))).collect();
        b.commit(2, pages.iter().map(|(p, v)| (*p, v.as_slice()))).unwrap();
        b
    }

    fn read_all(s: &dyn PageSource, first: u64, n: usize) -> (Vec<u8>, Vec<PageRead>) {
        let mut dst = vec![0xEEu8; n * PAGE_SIZE];
        let mut st = vec![PageRead::Unreadable; n];
        s.read_pages(first, &mut dst, &mut st).unwrap();
        (dst, st)
    }

    #[test]
    fn baseline_source_reads_journal_image_and_holes() {
        let src = BaselineSource::new(baseline(16, &[1, 2, 3, 8], &[3, 5]));
        let (dst, st) = read_all(&src, 0, 10);
        let page = |k: usize| &dst[k * PAGE_SIZE..(k + 1) * PAGE_SIZE];
        assert_eq!(st[0], PageRead::Zero);
        assert_eq!((st[1], page(1)), (PageRead::Data, &page_of(2)[..]));
        assert_eq!((st[2], page(2)), (PageRead::Data, &page_of(3)[..]));
        assert_eq!((st[3], page(3)), (PageRead::Data, &page_of(104)[..]), "journal beats image");
        assert_eq!(st[4], PageRead::Zero);
        assert_eq!((st[5], page(5)), (PageRead::Data, &page_of(106)[..]));
        assert_eq!((st[8], page(8)), (PageRead::Data, &page_of(9)[..]));
        assert!(page(0).iter().all(|&b| b == 0xEE), "zero pages are not written");
        // A run in the middle equals the single-page reads.
        for p in 0..16 {
            let (one, s1) = read_all(&src, p, 1);
            let mut want = vec![0u8; PAGE_SIZE];
            src.baseline().read_page(p, &mut want).unwrap();
            match s1[0] {
                PageRead::Data => assert_eq!(one, want, "page {p}"),
                PageRead::Zero => assert!(want.iter().all(|&b| b == 0), "page {p}"),
                PageRead::Unreadable => panic!("page {p} unreadable"),
            }
        }
    }

    #[test]
    fn baseline_source_reports_damaged_pages_and_bad_requests() {
        let b = baseline(8, &[1, 2, 3], &[]);
        let off = b.layout().image_page(2);
        b.backend().write_at(off + 100, &[0x55]).unwrap();
        let src = BaselineSource::new(b);
        let (_, st) = read_all(&src, 0, 4);
        assert_eq!(st, vec![PageRead::Zero, PageRead::Data, PageRead::Unreadable, PageRead::Data]);
        let mut dst = vec![0u8; 2 * PAGE_SIZE];
        let mut st = vec![PageRead::Zero; 2];
        assert!(matches!(src.read_pages(7, &mut dst, &mut st), Err(SourceError::BadRequest { .. })));
        assert!(matches!(src.read_pages(0, &mut dst[..100], &mut st), Err(SourceError::BadRequest { .. })));
    }

    fn image(npages: usize, fill: u8) -> Vec<u8> {
        let mut v = vec![0u8; npages * PAGE_SIZE];
        for p in 0..npages {
            if p % 3 != 0 {
                v[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].fill(fill.wrapping_add(p as u8));
            }
        }
        v
    }

    #[test]
    fn layered_takes_each_page_from_the_first_claiming_layer() {
        let newer = Arc::new(ImageSource::new("agent", image(12, 100)).claiming([2, 3, 4, 9]));
        let older = Arc::new(ImageSource::new("base", image(12, 1)));
        let l = Layered::new(vec![newer, older]);
        assert_eq!(l.name(), "agent+base");
        let (dst, st) = read_all(&l, 0, 12);
        for p in 0..12usize {
            let fill = if [2, 3, 4, 9].contains(&p) { 100 } else { 1 };
            let want = image(12, fill)[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].to_vec();
            if p % 3 == 0 {
                assert_eq!(st[p], PageRead::Zero, "page {p}");
            } else {
                assert_eq!((st[p], &dst[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]), (PageRead::Data, &want[..]), "page {p}");
            }
        }
    }

    #[test]
    fn layered_asks_each_layer_once_per_request_with_all_its_runs() {
        struct Counting(ImageSource, AtomicU64, std::sync::Mutex<Vec<(u64, u64)>>);
        impl PageSource for Counting {
            fn claims(&self, p: u64) -> bool {
                self.0.claims(p)
            }
            fn read_pages(&self, f: u64, d: &mut [u8], s: &mut [PageRead]) -> Result<(), SourceError> {
                self.0.read_pages(f, d, s)
            }
            fn read_runs(
                &self,
                first: u64,
                runs: &[(u64, u64)],
                dst: &mut [u8],
                status: &mut [PageRead],
            ) -> Result<(), SourceError> {
                self.1.fetch_add(1, Ordering::Relaxed);
                self.2.lock().unwrap().extend_from_slice(runs);
                for &(s, n) in runs {
                    let k = (s - first) as usize;
                    let n = n as usize;
                    self.0.read_pages(s, &mut dst[k * PAGE_SIZE..(k + n) * PAGE_SIZE], &mut status[k..k + n])?;
                }
                Ok(())
            }
            fn name(&self) -> &str {
                "counting"
            }
        }
        let newer = Arc::new(Counting(
            ImageSource::new("agent", image(40, 100)).claiming([3, 4, 10, 20, 21, 22, 39]),
            AtomicU64::new(0),
            Default::default(),
        ));
        let l = Layered::new(vec![newer.clone(), Arc::new(ImageSource::new("base", image(40, 1)))]);
        let (dst, st) = read_all(&l, 2, 38);
        assert_eq!(newer.1.load(Ordering::Relaxed), 1, "one call for the whole request");
        assert_eq!(*newer.2.lock().unwrap(), vec![(3, 2), (10, 1), (20, 3), (39, 1)]);
        for k in 0..38usize {
            let p = k + 2;
            let fill = if [3, 4, 10, 20, 21, 22, 39].contains(&p) { 100 } else { 1 };
            let want = &image(40, fill)[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
            if p % 3 != 0 {
                assert_eq!((st[k], &dst[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]), (PageRead::Data, want), "page {p}");
            }
        }
    }

    #[test]
    fn layered_falls_back_only_when_the_failing_layer_disowns_the_page() {
        let older = Arc::new(ImageSource::new("base", image(4, 1)));
        // The newer layer claims page 1 and cannot read it: stays unreadable.
        let claims = Arc::new(ImageSource::new("agent", image(4, 100)).claiming([1]).unreadable([1]));
        let (_, st) = read_all(&Layered::new(vec![claims, older.clone()]), 1, 1);
        assert_eq!(st[0], PageRead::Unreadable);
        // A layer that stops claiming the page once a read of it failed (its
        // seal found it clean meanwhile): the next layer's copy is current.
        struct Disowning(ImageSource, std::sync::atomic::AtomicBool);
        impl PageSource for Disowning {
            fn claims(&self, p: u64) -> bool {
                !self.1.load(Ordering::Relaxed) && self.0.claims(p)
            }
            fn read_pages(&self, f: u64, d: &mut [u8], s: &mut [PageRead]) -> Result<(), SourceError> {
                self.1.store(true, Ordering::Relaxed);
                self.0.read_pages(f, d, s)
            }
            fn name(&self) -> &str {
                "disowning"
            }
        }
        let agent = ImageSource::new("a", image(4, 100)).unreadable([1]);
        let l = Layered::new(vec![Arc::new(Disowning(agent, Default::default())), older]);
        let (dst, st) = read_all(&l, 1, 2);
        assert_eq!((st[0], dst[0]), (PageRead::Data, 2), "page 1 from the base");
        assert_eq!((st[1], dst[PAGE_SIZE]), (PageRead::Data, 102), "page 2 from the agent");
        let empty = Layered::new(vec![Arc::new(ImageSource::new("a", image(4, 1)).claiming([]))]);
        let mut d = vec![0u8; PAGE_SIZE];
        assert!(matches!(empty.read_pages(0, &mut d, &mut [PageRead::Zero]), Err(SourceError::Unclaimed { page: 0 })));
    }

    #[test]
    fn state_table_transitions_and_counts() {
        let t = PageStates::new(21).unwrap();
        assert_eq!(t.get(20), PageState::Absent);
        assert!(t.claim(3));
        assert!(!t.claim(3), "one claimer wins");
        assert_eq!(t.get(3), PageState::InFlight);
        t.finish(3, PageState::Resident);
        assert!(t.claim(4));
        t.finish(4, PageState::Zero);
        assert!(t.claim(5));
        t.finish(5, PageState::Poisoned);
        assert!(t.claim(6));
        t.finish(6, PageState::Absent);
        assert_eq!((t.settled(), t.resident(), t.poisoned()), (3, 1, 1));
        assert!(t.claim_zero(4));
        assert!(!t.claim_zero(4));
        t.finish(4, PageState::Resident);
        assert_eq!((t.settled(), t.resident()), (3, 2));
        assert_eq!(t.next_absent(3), Some(6));
        for p in 0..21 {
            if t.claim(p) {
                t.finish(p, PageState::Resident);
            }
        }
        assert!(t.all_settled());
        assert_eq!(t.next_absent(0), None);
    }

    #[test]
    fn state_table_claims_race_to_one_winner() {
        let t = Arc::new(PageStates::new(4096).unwrap());
        let wins: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    let t = &t;
                    s.spawn(move || (0..4096).filter(|&p| t.claim(p)).count() as u64)
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(wins, 4096);
    }

    #[test]
    fn zero_byte_test() {
        assert!(has_zero_byte(0x0202_0202_0202_0002));
        assert!(!has_zero_byte(0x0202_0202_0202_0202));
        assert!(has_zero_byte(0));
    }
}
