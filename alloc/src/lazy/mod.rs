//! Lazy loading: a recovered heap is usable before its pages have arrived.
//!
//! [`crate::Heap::open_lazy`] maps a fresh memfd at the heap's address and
//! registers it **once** with userfaultfd (the `userfaultfd` crate) for
//! missing pages *and* write-protection. That one context carries both
//! loading and the heap's write tracking:
//!
//! ```text
//!  first touch of page p ──MISSING fault──▶ fault thread ──read_pages──▶ PageSource
//!                                              │  UFFDIO_COPY_MODE_WP (page installed write-protected)
//!                                              ▼
//!  later writes ──WP fault (precise: fault thread records it; fast: WP_ASYNC, the kernel)──▶ tracker
//!
//!  prefetcher: runs of Absent pages (64 KiB, doubling to 4 MiB while no fault arrives,
//!              back to 64 KiB on a fault) ──▶ UFFDIO_COPY_MODE_WP|DONTWAKE ... one UFFDIO_WAKE per run
//! ```
//!
//! Steps of `open_lazy`: read the header from the baseline; map; open and
//! register the userfaultfd; build the tracker on the same context (fast
//! mode: `WP_ASYNC` + `PAGEMAP_SCAN`; precise mode: the fault thread hands
//! write-protect faults to the tracker); start the fault thread; fetch the
//! pages the recovery pass reads (header, page descriptors, lanes) in one
//! batch, zero pages included; run the recovery pass (anything else it
//! touches, such as undo-log blocks, faults in); return the open heap while
//! the prefetcher brings in the rest.
//!
//! Rules:
//! - The per-page state table ([`PageStates`]) decides who installs a page:
//!   whoever moves it `Absent → InFlight`. A page already resident is never
//!   fetched again, so a page the database wrote before the prefetcher got
//!   there keeps its bytes. `EEXIST` from `UFFDIO_COPY` (the page exists
//!   anyway) is never retried over; `EAGAIN` is retried from the first page
//!   not copied.
//! - Pages known to be zero are not populated by the prefetcher (state
//!   `Zero`); their first touch installs a zero page. Pages the source
//!   cannot read are poisoned (`UFFDIO_POISON`: touching them raises
//!   SIGBUS, never wrong bytes) and listed in [`LazyStatus::poisoned_pages`].
//! - Every installed page is compared with the baseline's committed CRC;
//!   pages that differ (from a newer source) are marked dirty, so the first
//!   flush after loading writes exactly the recovered state.
//! - No flush commits before every page is settled (a partial image is not
//!   transaction-consistent). Then the prefetcher commits once; with
//!   poisoned pages or a failed source, flushes fail with
//!   [`FlushError::Poisoned`] instead (the baseline keeps the old state).
//! - The fault thread never allocates once started and never touches the
//!   heap's memory: its buffers are its own, the state table is an
//!   anonymous mapping of its own.
//!
//! Files: `mod.rs` (the loader state, installing pages), `fault.rs` (the
//! fault thread), `prefetch.rs` (the background prefetcher).

mod fault;
mod prefetch;

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::flush::{Durability, FlushError};
use crate::format::PAGE_SIZE;
use crate::source::{PageRead, PageSource, PageState, PageStates, SourceError};
use crate::track::{self, EventFd, RawUffd, UffdFeatures, WpFaults};

/// Most poisoned pages listed in the status (the count is exact).
const MAX_LISTED: usize = 1024;
/// Attempts at a source read before the loader gives up on the source.
const SOURCE_ATTEMPTS: u32 = 5;
const PS: u64 = PAGE_SIZE as u64;

/// Why a lazy open failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LazyError {
    /// Setting up the userfaultfd failed (no permission, a kernel without
    /// missing-page or write-protect support for shared memory).
    #[error("lazy loading needs userfaultfd: {op}: {reason}")]
    Uffd {
        /// What failed.
        op: &'static str,
        /// The error.
        reason: String,
    },
    /// The page source failed while fetching the pages the recovery pass needs.
    #[error("fetching the heap's metadata pages: {0}")]
    Source(#[from] SourceError),
    /// A page the recovery pass needs could not be read from any current copy.
    #[error("metadata page {page} could not be read from any current copy (source {source_name})")]
    Unreadable {
        /// The page.
        page: u64,
        /// The source's name.
        source_name: String,
    },
    /// Installing a page failed.
    #[error("installing page {page}: {source}")]
    Install {
        /// The page.
        page: u64,
        /// The ioctl's error.
        source: io::Error,
    },
}

/// Where a lazily opened heap stands ([`crate::Heap::lazy_status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LazyStatus {
    /// Pages in the heap.
    pub pages: u64,
    /// Pages installed in memory.
    pub resident: u64,
    /// Pages known to be zero, not populated (installed on first touch).
    pub zero: u64,
    /// Pages poisoned (no current copy could be read).
    pub poisoned: u64,
    /// Up to 1024 of the poisoned pages.
    pub poisoned_pages: Vec<u64>,
    /// Missing-page faults served by the fault thread.
    pub faults: u64,
    /// Every page is settled (resident, zero or poisoned).
    pub settled: bool,
    /// The epoch of the commit of the recovered state, once durable.
    pub committed_epoch: Option<u64>,
    /// Why loading (or its commit) failed, if it did.
    pub failed: Option<String>,
    /// From the start of `open_lazy` to every page settled.
    pub load_time: Option<Duration>,
}

#[derive(Default)]
struct Done {
    settled: bool,
    committed_epoch: Option<u64>,
    failed: Option<String>,
    load_time: Option<Duration>,
    poisoned_pages: Vec<u64>,
}

/// The state of a heap being loaded lazily, shared by the fault thread, the
/// prefetcher and the heap.
pub(crate) struct Lazy {
    base: u64,
    uffd: userfaultfd::Uffd,
    /// The same context, for the hand-written ioctls.
    raw: RawUffd,
    source: Arc<dyn PageSource>,
    states: Arc<PageStates>,
    durability: Arc<Durability>,
    wp: Option<WpFaults>,
    faults: AtomicU64,
    stop: AtomicBool,
    stop_fd: EventFd,
    started: Instant,
    done: Mutex<Done>,
    cond: Condvar,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Lazy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lazy").field("source", &self.source.name()).field("states", &self.states).finish()
    }
}

fn uffd_err(op: &'static str) -> impl FnOnce(userfaultfd::Error) -> LazyError {
    move |e| LazyError::Uffd { op, reason: e.to_string() }
}

/// The userfaultfd for a lazy heap: opened with the features loading and
/// the tracking `mode` need, registered over `base..base + len` for missing
/// pages and write-protection. Returns it and a second descriptor of the
/// same context for the tracker.
pub(crate) fn open_uffd(base: *mut u8, len: usize, fast: bool) -> Result<(userfaultfd::Uffd, RawUffd), LazyError> {
    let supported = track::probe_features().map_err(|e| LazyError::Uffd { op: "probing", reason: e.to_string() })?;
    let mut want = UffdFeatures::MISSING_SHMEM | UffdFeatures::WP_HUGETLBFS_SHMEM;
    if fast {
        want |= UffdFeatures::WP_ASYNC | UffdFeatures::WP_UNPOPULATED;
    }
    if let Some((name, since)) = want.difference(supported).named().next() {
        return Err(LazyError::Uffd {
            op: "checking kernel features",
            reason: format!("this kernel lacks {name} (Linux {since})"),
        });
    }
    want |= supported & UffdFeatures::POISON;
    let uffd = userfaultfd::UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .require_features(userfaultfd::FeatureFlags::from_bits_retain(want.bits()))
        .create()
        .map_err(uffd_err("creating the userfaultfd"))?;
    let mode = userfaultfd::RegisterMode::MISSING | userfaultfd::RegisterMode::WRITE_PROTECT;
    let ioctls = uffd.register_with_mode(base.cast(), len, mode).map_err(uffd_err("registering the heap"))?;
    if !ioctls.contains(userfaultfd::IoctlFlags::COPY | userfaultfd::IoctlFlags::WRITE_PROTECT) {
        return Err(LazyError::Uffd {
            op: "registering the heap",
            reason: format!("the kernel allows only {ioctls:?} on this mapping"),
        });
    }
    let dup = uffd.as_fd().try_clone_to_owned().map_err(|e| LazyError::Uffd { op: "dup", reason: e.to_string() })?;
    Ok((uffd, RawUffd::from_owned(dup)))
}

/// A page of zeros to copy from.
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

impl Lazy {
    pub(crate) fn new(
        base: *mut u8,
        (uffd, raw): (userfaultfd::Uffd, RawUffd),
        source: Arc<dyn PageSource>,
        states: Arc<PageStates>,
        (durability, wp): (Arc<Durability>, Option<WpFaults>),
    ) -> Result<Lazy, LazyError> {
        let sys = |op| move |e: io::Error| LazyError::Uffd { op, reason: e.to_string() };
        Ok(Lazy {
            base: base as u64,
            uffd,
            raw,
            source,
            states,
            durability,
            wp,
            faults: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            stop_fd: EventFd::new().map_err(sys("eventfd"))?,
            started: Instant::now(),
            done: Mutex::new(Done::default()),
            cond: Condvar::new(),
            threads: Mutex::new(Vec::new()),
        })
    }

    fn pages(&self) -> u64 {
        self.states.pages()
    }

    fn addr(&self, page: u64) -> u64 {
        self.base + page * PS
    }

    /// Starts the fault thread.
    pub(crate) fn start_faults(self: &Arc<Self>) -> Result<(), LazyError> {
        let me = Arc::clone(self);
        let h = std::thread::Builder::new()
            .name("remem-lazy-fault".into())
            .spawn(move || fault::run(&me))
            .map_err(|e| LazyError::Uffd { op: "spawning the fault thread", reason: e.to_string() })?;
        self.threads.lock().push(h);
        Ok(())
    }

    /// Starts the prefetcher; once every page is settled it calls `commit`
    /// (a flush of the heap) once.
    pub(crate) fn start_prefetch(
        self: &Arc<Self>,
        commit: Box<dyn FnOnce() -> Option<Result<u64, FlushError>> + Send>,
    ) -> Result<(), LazyError> {
        let me = Arc::clone(self);
        let h = std::thread::Builder::new()
            .name("remem-lazy-prefetch".into())
            .spawn(move || prefetch::run(&me, commit))
            .map_err(|e| LazyError::Uffd { op: "spawning the prefetcher", reason: e.to_string() })?;
        self.threads.lock().push(h);
        Ok(())
    }

    /// Fetches and installs every absent page of `first..end` (zero pages
    /// included), and waits for pages others have in flight there: for the
    /// pages the recovery pass reads (the page descriptors grow with the
    /// heap: 16 MiB at 8 GiB). A large range is fetched by two threads, each
    /// a half.
    pub(crate) fn fetch_now(&self, first: u64, end: u64) -> Result<(), LazyError> {
        const SPLIT_ABOVE: u64 = 256;
        if end.saturating_sub(first) <= SPLIT_ABOVE {
            return self.fetch_range(first, end);
        }
        let mid = first + (end - first) / 2;
        std::thread::scope(|s| {
            let upper = std::thread::Builder::new().spawn_scoped(s, || self.fetch_range(mid, end));
            let lower = self.fetch_range(first, mid);
            match upper {
                Ok(h) => {
                    let upper = h.join().unwrap_or_else(|_| {
                        Err(LazyError::Uffd {
                            op: "fetching metadata pages",
                            reason: "the fetching thread panicked".into(),
                        })
                    });
                    lower.and(upper)
                }
                // No second thread: this one does the rest.
                Err(_) => lower.and_then(|()| self.fetch_range(mid, end)),
            }
        })
    }

    fn fetch_range(&self, first: u64, end: u64) -> Result<(), LazyError> {
        let chunk = 256u64;
        let mut buf = vec![0u8; chunk as usize * PAGE_SIZE];
        let mut status = vec![PageRead::Zero; chunk as usize];
        let mut p = first;
        while p < end {
            let n = self.claim_run(p, chunk.min(end - p));
            if n == 0 {
                p += 1;
                continue;
            }
            let (b, s) = (&mut buf[..n as usize * PAGE_SIZE], &mut status[..n as usize]);
            if let Err(e) = self.read(p, b, s) {
                self.release(p, n);
                return Err(e.into());
            }
            if let Some(k) = s.iter().position(|&r| r == PageRead::Unreadable) {
                self.release(p, n);
                return Err(LazyError::Unreadable { page: p + k as u64, source_name: self.source.name().into() });
            }
            self.install(p, b, s, true).map_err(|(page, source)| LazyError::Install { page, source })?;
            self.wake(p, n);
            p += n;
        }
        for p in first..end {
            while !self.states.get(p).is_settled() {
                std::thread::yield_now();
            }
            if self.states.get(p) == PageState::Zero && self.states.claim_zero(p) {
                self.install_known_zero(p).map_err(|(page, source)| LazyError::Install { page, source })?;
            }
        }
        Ok(())
    }

    /// Claims up to `max` absent pages from `first` on (stopping at the first
    /// page that is not absent); returns how many.
    fn claim_run(&self, first: u64, max: u64) -> u64 {
        let mut n = 0;
        while n < max && first + n < self.pages() && self.states.claim(first + n) {
            n += 1;
        }
        n
    }

    /// Gives claimed pages back (`InFlight → Absent`).
    fn release(&self, first: u64, n: u64) {
        for p in first..first + n {
            self.states.finish(p, PageState::Absent);
        }
    }

    /// Reads pages from the source, retrying a failed source a few times
    /// with growing pauses.
    fn read(&self, first: u64, buf: &mut [u8], status: &mut [PageRead]) -> Result<(), SourceError> {
        let mut attempt = 0;
        loop {
            match self.source.read_pages(first, buf, status) {
                Ok(()) => return Ok(()),
                Err(e @ SourceError::BadRequest { .. }) => return Err(e),
                Err(e) => {
                    attempt += 1;
                    if attempt >= SOURCE_ATTEMPTS || self.stop.load(Ordering::Acquire) {
                        return Err(e);
                    }
                    std::thread::sleep(Duration::from_millis(10 << attempt));
                }
            }
        }
    }

    /// Installs claimed pages `first..` (in flight, by the caller) from `buf`
    /// as `status` says, without waking anyone: `Data` pages with
    /// `UFFDIO_COPY_MODE_WP` (runs of them in one call), `Zero` pages as zero
    /// pages if `install_zero`, else left to their first touch, `Unreadable`
    /// pages poisoned. Returns the page and error of a failed ioctl.
    fn install(&self, first: u64, buf: &[u8], status: &[PageRead], install_zero: bool) -> Result<(), (u64, io::Error)> {
        let n = status.len();
        let mut k = 0;
        while k < n {
            let p = first + k as u64;
            match status[k] {
                PageRead::Data => {
                    let mut e = k + 1;
                    while e < n && status[e] == PageRead::Data {
                        e += 1;
                    }
                    self.copy_run(p, &buf[k * PAGE_SIZE..e * PAGE_SIZE], true)?;
                    k = e;
                    continue;
                }
                PageRead::Zero if install_zero => self.copy_run(p, &ZERO_PAGE, true)?,
                PageRead::Zero => {
                    self.note_installed(p, crate::baseline::format::zero_page_crc());
                    self.states.finish(p, PageState::Zero);
                }
                _ => self.poison(p)?,
            }
            k += 1;
        }
        Ok(())
    }

    /// `UFFDIO_COPY_MODE_WP | DONTWAKE` of `bytes` at page `first` on: retried
    /// from the first page not copied on `EAGAIN`; a page that exists already
    /// (`EEXIST`) is left as it is and counted resident.
    ///
    /// With `note`, each page copied is compared with the baseline's copy
    /// ([`Lazy::note_installed`]); without, the caller noted it earlier (a
    /// known zero page installed on first touch). Noting takes the flush
    /// lock, so it must not happen once flushes may run (after every page is
    /// settled, a flush holds that lock while it reads, i.e. faults in, pages).
    fn copy_run(&self, first: u64, bytes: &[u8], note: bool) -> Result<(), (u64, io::Error)> {
        let n = (bytes.len() / PAGE_SIZE) as u64;
        let mut done = 0u64;
        while done < n {
            let at = (done * PS) as usize;
            // SAFETY: the source is `bytes[at..]`, readable memory of ours; the
            // destination pages are in flight (claimed by us), so the kernel
            // writes only pages no one has installed (EEXIST otherwise).
            let (copied, err) = unsafe {
                track::uffd_copy(
                    self.raw.as_fd(),
                    self.addr(first + done),
                    bytes[at..].as_ptr(),
                    (n - done) * PS,
                    track::UFFDIO_COPY_MODE_WP | track::UFFDIO_COPY_MODE_DONTWAKE,
                )
            };
            let copied = copied / PS;
            for p in first + done..first + done + copied {
                let k = ((p - first) * PS) as usize;
                if note {
                    self.note_installed(p, crc32fast::hash(&bytes[k..k + PAGE_SIZE]));
                }
                self.states.finish(p, PageState::Resident);
            }
            done += copied;
            match err {
                None if done >= n => {}
                None => {}
                Some(e) if e.raw_os_error() == Some(libc::EAGAIN) => std::thread::yield_now(),
                Some(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // Someone's page is there: never overwrite it.
                    self.states.finish(first + done, PageState::Resident);
                    done += 1;
                }
                Some(e) => {
                    self.release(first + done, n - done);
                    return Err((first + done, e));
                }
            }
        }
        Ok(())
    }

    /// Installs a known zero page claimed with [`PageStates::claim_zero`]
    /// (noted when it became known zero).
    fn install_known_zero(&self, page: u64) -> Result<(), (u64, io::Error)> {
        self.copy_run(page, &ZERO_PAGE, false)
    }

    /// Poisons a claimed page (or, on a kernel without `UFFDIO_POISON`,
    /// fails): touching it raises SIGBUS.
    fn poison(&self, page: u64) -> Result<(), (u64, io::Error)> {
        // UFFDIO_POISON wants an empty entry: drop the write-protect marker
        // a fast-mode hole carries (un-protecting an empty entry clears it).
        if let Err(e) = self.raw.writeprotect(self.addr(page), PS, false) {
            self.states.finish(page, PageState::Absent);
            return Err((page, e));
        }
        loop {
            let (_, err) = track::uffd_poison(self.raw.as_fd(), self.addr(page), PS, track::UFFDIO_COPY_MODE_DONTWAKE);
            match err {
                None => break,
                Some(e) if e.raw_os_error() == Some(libc::EAGAIN) => std::thread::yield_now(),
                Some(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    self.states.finish(page, PageState::Resident);
                    return Ok(());
                }
                Some(e) => {
                    self.states.finish(page, PageState::Absent);
                    return Err((page, e));
                }
            }
        }
        self.states.finish(page, PageState::Poisoned);
        let mut d = self.done.lock();
        if d.poisoned_pages.len() < MAX_LISTED {
            d.poisoned_pages.push(page);
        }
        Ok(())
    }

    /// Marks `page` dirty when `bytes` differ from the baseline's committed
    /// copy (a page from a newer source): the next flush writes it.
    fn note_installed(&self, page: u64, crc: u32) {
        if self.durability.committed_crc(page) != Some(crc) {
            self.durability.tracker.mark_dirty(page, 1);
        }
    }

    /// One `UFFDIO_WAKE` for pages `first..first + n`.
    fn wake(&self, first: u64, n: u64) {
        let _ = self.uffd.wake(self.addr(first) as *mut libc::c_void, (n * PS) as usize);
    }

    fn fail(&self, why: String) {
        let mut d = self.done.lock();
        d.failed.get_or_insert(why);
        self.cond.notify_all();
    }

    /// Blocks until a flush may commit: every page settled, none poisoned,
    /// loading not failed.
    pub(crate) fn wait_committable(&self) -> Result<(), FlushError> {
        let mut d = self.done.lock();
        loop {
            if let Some(f) = &d.failed {
                return Err(FlushError::Poisoned(format!("lazy loading failed: {f}")));
            }
            if d.settled {
                let poisoned = self.states.poisoned();
                if poisoned > 0 {
                    return Err(FlushError::Poisoned(format!(
                        "{poisoned} pages of the recovered heap could not be read from any current copy and are \
                         poisoned (first: {:?}); the baseline keeps the state it had",
                        d.poisoned_pages.first()
                    )));
                }
                return Ok(());
            }
            self.cond.wait(&mut d);
        }
    }

    /// Blocks until every page is settled and the recovered state committed
    /// (or loading failed), then returns the status.
    pub(crate) fn wait_done(&self) -> LazyStatus {
        let mut d = self.done.lock();
        while d.failed.is_none() && d.committed_epoch.is_none() {
            self.cond.wait(&mut d);
        }
        drop(d);
        self.status()
    }

    pub(crate) fn status(&self) -> LazyStatus {
        let d = self.done.lock();
        let (resident, poisoned, settled) = (self.states.resident(), self.states.poisoned(), self.states.settled());
        LazyStatus {
            pages: self.pages(),
            resident,
            zero: settled - resident - poisoned,
            poisoned,
            poisoned_pages: d.poisoned_pages.clone(),
            faults: self.faults.load(Ordering::Relaxed),
            settled: d.settled,
            committed_epoch: d.committed_epoch,
            failed: d.failed.clone(),
            load_time: d.load_time,
        }
    }

    /// Stops both threads and waits for them (except the calling one). The
    /// heap must not be touched afterwards: missing pages are no longer served.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.stop_fd.signal();
        self.cond.notify_all();
        let hs: Vec<_> = std::mem::take(&mut *self.threads.lock());
        for h in hs {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

/// The durability state of a lazy heap: the control region and a tracker on
/// the loader's userfaultfd context (`raw`), starting clean (every page is
/// installed write-protected). Returns the write-protect fault path the
/// fault thread must serve in precise mode.
pub(crate) fn durability(
    base: *mut u8,
    len: usize,
    uuid: &[u8; 16],
    baseline: crate::baseline::Baseline<Arc<dyn crate::baseline::Backend>>,
    mode: track::TrackMode,
    raw: &RawUffd,
    states: &Arc<PageStates>,
) -> Result<(Arc<Durability>, Option<WpFaults>), crate::error::OpenError> {
    use crate::track::{FastTracker, NoTracking, PreciseTracker, TrackError, TrackMode, Tracker};
    if (states.pages() as usize).checked_mul(PAGE_SIZE) != Some(len) {
        return Err(crate::error::OpenError::Corrupt {
            path: "<lazy heap>".into(),
            reason: format!("a state table of {} pages for a range of {len} bytes", states.pages()),
        });
    }
    let region = track::Region::new(base, len)?;
    let control = crate::control::Control::create(uuid, region.pages(), mode)?;
    let dup = || raw.try_clone().map_err(TrackError::sys("dup"));
    let (tracker, wp): (Box<dyn Tracker>, Option<WpFaults>) = match mode {
        // Nothing is installed yet, and a hole without a write-protect
        // marker counts as written for PAGEMAP_SCAN. Rather than marking
        // every hole now (a walk over the whole range before first use),
        // scans leave out the pages still known zero and never touched
        // (state Zero: a write to one first raises a missing-page fault,
        // which installs it write-protected); no flush runs before every
        // page is settled, and pages installed since are write-protected
        // by UFFDIO_COPY_MODE_WP. The first harvest marks the holes.
        TrackMode::Fast => {
            let states = Arc::clone(states);
            let clean = Box::new(move |p: u64| states.get(p) == PageState::Zero);
            (Box::new(FastTracker::on_shared(region, dup()?)?.with_known_clean(clean)), None)
        }
        TrackMode::Precise => {
            use std::os::fd::AsFd;
            let fd = raw.as_fd().try_clone_to_owned().map_err(TrackError::sys("dup"))?;
            let (t, wp) = PreciseTracker::on_shared(region, Some(Box::new(control.current_words())), fd)?;
            (Box::new(t), Some(wp))
        }
        _ => (Box::new(NoTracking::new(region.pages(), region.page_size())), None),
    };
    Ok((Arc::new(Durability::new(baseline, tracker, control)?), wp))
}
