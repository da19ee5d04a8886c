//! Precise mode: synchronous userfaultfd write-protect faults.
//!
//! Every page starts write-protected (after [`Tracker::protect_all`] or a
//! harvest). The first write to a page blocks the writer in the kernel and
//! queues a fault event; the handler thread reads it, sets the page's bit in
//! the dirty set and only then un-protects the page (`UFFDIO_WRITEPROTECT`
//! mode 0, which also wakes the writer). Hence the invariant the F2 failure
//! case relies on:
//!
//! > **a page that is writable has its bit set**, at every instant.
//!
//! The handler never writes to tracked memory: its message buffer is on its
//! own stack, the dirty set is in a [`WordStore`] (an anonymous mapping by
//! default, a shared control region later), and its lock and counters are in
//! an [`MmapBox`]; it never allocates. Were it to write to a tracked page it
//! would wait for itself.
//!
//! Stopping: besides the region, the userfaultfd covers one private
//! *doorbell* page, kept write-protected. `drop` sets the stop flag and
//! writes the doorbell; the handler wakes on that fault whether it waits in
//! poll(2) (non-blocking descriptor) or in read(2) (blocking descriptor,
//! which poll(2) cannot wait on: the kernel answers `EPOLLERR`).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use super::bitmap::{push_bits, word_runs, DirtyBitmap, OwnedWords, RunMerger, WordStore};
use super::builder::{check_features, probe_with, TrackerBuilder};
use super::error::{Result, TrackError};
use super::features::UffdFeatures;
use super::sys::{self, MmapBox};
use super::{Region, TrackMode, Tracker};

/// Events read per `read(2)`.
const MSG_BATCH: usize = 64;

/// What the handler thread was doing when it failed (index of `Control::failed_op`).
const OPS: [&str; 5] =
    ["", "poll(2) on the userfaultfd", "read(2) of fault events", "UFFDIO_WRITEPROTECT (un-protect)", "UFFDIO_WAKE"];
const OP_POLL: u32 = 1;
const OP_READ: u32 = 2;
const OP_UNPROTECT: u32 = 3;
const OP_WAKE: u32 = 4;

/// The userfaultfd of a precise tracker: the `userfaultfd` crate's, with
/// the EAGAIN retries and the `io::Error`s this module uses (everything
/// precise mode needs is in the crate; fast mode's `WP_ASYNC` and
/// `PAGEMAP_SCAN` are not, and stay in `sys`).
#[derive(Debug)]
struct Uffd(userfaultfd::Uffd);

/// One fault event: the page address and whether it is a write-protect fault.
#[derive(Clone, Copy, Default)]
struct Fault {
    addr: u64,
    wp: bool,
}

fn crate_err(e: userfaultfd::Error) -> io::Error {
    match e {
        userfaultfd::Error::SystemError(errno) => io::Error::from_raw_os_error(errno as i32),
        userfaultfd::Error::OpenDevUserfaultfd(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

impl Uffd {
    /// A new userfaultfd with `features` negotiated. Faults from the kernel
    /// (a `read(2)` into tracked memory) are reported too, not only user
    /// mode ones.
    fn open(close_on_exec: bool, non_blocking: bool, features: UffdFeatures) -> io::Result<Uffd> {
        userfaultfd::UffdBuilder::new()
            .close_on_exec(close_on_exec)
            .non_blocking(non_blocking)
            .user_mode_only(false)
            .require_features(userfaultfd::FeatureFlags::from_bits_retain(features.bits()))
            .create()
            .map(Uffd)
            .map_err(crate_err)
    }

    /// Adopts a descriptor that is a userfaultfd (a shared context).
    fn from_owned(fd: OwnedFd) -> Uffd {
        Uffd(sys::crate_uffd(fd))
    }

    fn try_clone(&self) -> io::Result<Uffd> {
        Ok(Uffd::from_owned(self.as_fd().try_clone_to_owned()?))
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    /// `UFFDIO_REGISTER` for write-protection; whether the kernel allows
    /// `UFFDIO_WRITEPROTECT` on the range.
    fn register_wp(&self, start: u64, len: u64) -> io::Result<bool> {
        let ioctls = self
            .0
            .register_with_mode(start as *mut libc::c_void, len as usize, userfaultfd::RegisterMode::WRITE_PROTECT)
            .map_err(crate_err)?;
        Ok(ioctls.contains(userfaultfd::IoctlFlags::WRITE_PROTECT))
    }

    fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        self.0.unregister(start as *mut libc::c_void, len as usize).map_err(crate_err)
    }

    /// Protects, or un-protects and wakes. Retries while the kernel answers
    /// EAGAIN (the mm is changing under a concurrent event).
    fn writeprotect(&self, start: u64, len: u64, protect: bool) -> io::Result<()> {
        let (ptr, len) = (start as *mut libc::c_void, len as usize);
        loop {
            let r =
                if protect { self.0.write_protect(ptr, len) } else { self.0.remove_write_protection(ptr, len, true) };
            match r.map_err(crate_err) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => std::thread::yield_now(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        self.0.wake(start as *mut libc::c_void, len as usize).map_err(crate_err)
    }

    /// Reads one event (the crate reads it into a buffer on the stack, so
    /// the handler allocates nothing): `None` when none is pending on a
    /// non-blocking descriptor. Events other than page faults (none are
    /// asked for) read as a non-write-protect fault at address 0.
    fn read_fault(&self) -> io::Result<Option<Fault>> {
        match self.0.read_event().map_err(crate_err)? {
            None => Ok(None),
            Some(userfaultfd::Event::Pagefault { kind, addr, .. }) => {
                Ok(Some(Fault { addr: addr as u64, wp: kind == userfaultfd::FaultKind::WriteProtected }))
            }
            Some(_) => Ok(Some(Fault::default())),
        }
    }
}

/// State the handler thread writes; lives in its own mapping (never in
/// tracked memory). `std::sync::Mutex` is a single futex word with no
/// global tables, so it can live here (parking_lot's slow path could not).
struct Control {
    /// Held by the handler while it records and un-protects a batch of
    /// faults, and by `harvest`/`protect_all` while they re-protect pages
    /// and clear their bits.
    fault_lock: Mutex<()>,
    /// Set by the handler once it runs (after the thread start-up, which
    /// may touch allocator memory, is over).
    ready: AtomicBool,
    /// Set by `drop` before it rings the doorbell.
    stop: AtomicBool,
    /// Fault events handled.
    faults: AtomicU64,
    /// First failure: index into `OPS` (0: none) and errno.
    failed_op: AtomicU32,
    failed_errno: AtomicI32,
}

struct Shared {
    region: Region,
    /// The current dirty set.
    dirty: DirtyBitmap,
    /// Harvest scratch: the bits taken by the harvest in progress.
    snap: OwnedWords,
    ctl: MmapBox<Control>,
    /// One private page, registered and write-protected: writing it wakes
    /// the handler (see the module docs).
    doorbell: OwnedWords,
}

impl Shared {
    fn doorbell_addr(&self) -> u64 {
        self.doorbell.as_ptr() as u64
    }

    /// Records the first failure and unregisters the region (and the
    /// doorbell) so that no writer waits for ever on a stopped handler.
    fn fail(&self, uffd: &Uffd, op: u32, e: &io::Error) {
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        if self.ctl.failed_op.compare_exchange(0, op, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.ctl.failed_errno.store(errno, Ordering::Release);
        }
        let _ = uffd.unregister(self.region.base, self.region.len);
        let _ = uffd.unregister(self.doorbell_addr(), self.region.page_size() as u64);
    }

    fn check(&self) -> Result<()> {
        match self.ctl.failed_op.load(Ordering::Acquire) {
            0 => Ok(()),
            op => Err(TrackError::HandlerFailed {
                op: OPS[op as usize],
                source: io::Error::from_raw_os_error(self.ctl.failed_errno.load(Ordering::Acquire)),
            }),
        }
    }

    fn lock_faults(&self) -> MutexGuard<'_, ()> {
        self.ctl.fault_lock.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Handles one batch of events.
    fn handle(&self, uffd: &Uffd, faults: &[Fault]) -> std::result::Result<(), (u32, io::Error)> {
        let ps = self.region.page_size() as u64;
        let _g = self.lock_faults();
        // Counted before any writer is released, so a writer that returns
        // from its fault sees its fault counted.
        self.ctl.faults.fetch_add(faults.len() as u64, Ordering::Relaxed);
        for m in faults {
            if m.addr == 0 {
                continue; // no other event was asked for
            }
            let addr = m.addr & !(ps - 1);
            match self.region.page_of(addr) {
                Some(page) if m.wp => {
                    // Record first, then un-protect: the page becomes
                    // writable only once its bit is set.
                    self.dirty.set(page);
                    uffd.writeprotect(addr, ps, false).map_err(|e| (OP_UNPROTECT, e))?;
                }
                // The doorbell: let the ringer go on; the caller checks the stop flag.
                _ if addr == self.doorbell_addr() => {
                    uffd.writeprotect(addr, ps, false).map_err(|e| (OP_UNPROTECT, e))?;
                }
                // A fault we never registered for: wake the thread so it
                // retries rather than waits for ever.
                _ => uffd.wake(addr, ps).map_err(|e| (OP_WAKE, e))?,
            }
        }
        Ok(())
    }
}

/// The write-protect fault path of a [`PreciseTracker`] built on a shared
/// userfaultfd: the thread that reads the context's events calls
/// [`WpFaults::fault`] for each write-protect fault. Allocates nothing and
/// touches only the dirty set and the tracker's control block.
pub(crate) struct WpFaults {
    shared: Arc<Shared>,
    uffd: Uffd,
}

impl WpFaults {
    /// Records the write to the page at `addr` in the dirty set, then
    /// un-protects it (which wakes the writer). On failure the tracker is
    /// failed (its next harvest says so) and the region unregistered, so no
    /// writer waits for ever.
    pub(crate) fn fault(&self, addr: u64) -> io::Result<()> {
        let sh = &*self.shared;
        let ps = sh.region.page_size() as u64;
        let addr = addr & !(ps - 1);
        let _g = sh.lock_faults();
        sh.ctl.faults.fetch_add(1, Ordering::Relaxed);
        match sh.region.page_of(addr) {
            Some(page) => {
                sh.dirty.set(page);
                self.uffd.writeprotect(addr, ps, false).inspect_err(|e| sh.fail(&self.uffd, OP_UNPROTECT, e))
            }
            None => self.uffd.wake(addr, ps),
        }
    }
}

/// Synchronous write-protect tracking: see the module docs.
pub struct PreciseTracker {
    shared: Arc<Shared>,
    /// `Option` only so that `drop` can close it before joining the handler.
    uffd: Option<Uffd>,
    handler: Option<JoinHandle<()>>,
    /// Serialises harvests and `protect_all` (they share `snap`).
    harvest_lock: Mutex<()>,
}

impl std::fmt::Debug for PreciseTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreciseTracker")
            .field("region", &self.shared.region)
            .field("dirty", &self.shared.dirty)
            .field("faults", &self.faults_handled())
            .finish()
    }
}

impl PreciseTracker {
    pub(crate) fn build(b: &TrackerBuilder, region: Region, store: Option<Box<dyn WordStore>>) -> Result<Self> {
        let supported = probe_with(b.close_on_exec)?;
        check_features(
            supported,
            b.require,
            "choose TrackMode::Fast if it is available, or TrackMode::Off to opt out",
        )?;
        let wanted = b.require | (supported & (UffdFeatures::WP_HUGETLBFS_SHMEM | UffdFeatures::WP_UNPOPULATED));

        let pages = region.pages();
        let dirty = match store {
            Some(s) => DirtyBitmap::with_store(s, pages)?,
            None => DirtyBitmap::new(pages)?,
        };
        // Never seen clean: every page counts as dirty until the first
        // harvest or protect_all (and no page is protected yet).
        dirty.fill();
        let snap = OwnedWords::new(DirtyBitmap::words_for(pages)).map_err(TrackError::sys("mmap"))?;
        let ctl = MmapBox::new(Control {
            fault_lock: Mutex::new(()),
            ready: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            faults: AtomicU64::new(0),
            failed_op: AtomicU32::new(0),
            failed_errno: AtomicI32::new(0),
        })
        .map_err(TrackError::sys("mmap"))?;

        let uffd = Uffd::open(b.close_on_exec, b.non_blocking, wanted).map_err(TrackError::from_open)?;
        let wp = uffd
            .register_wp(region.base, region.len)
            .map_err(|e| TrackError::from_register(region.base as usize, region.len as usize, e))?;
        if !wp {
            return Err(TrackError::FeatureMissing {
                feature: "UFFDIO_WRITEPROTECT on this kind of mapping",
                since: "5.19 for memfd/shmem (5.7 for anonymous memory)",
                kernel: sys::kernel_release(),
                hint: "use a memfd or anonymous mapping, or TrackMode::Off to opt out",
            });
        }

        let ps = region.page_size() as u64;
        let doorbell = OwnedWords::new(ps as usize / 8).map_err(TrackError::sys("mmap"))?;
        let bell = doorbell.as_ptr() as u64;
        uffd.register_wp(bell, ps).map_err(TrackError::sys("UFFDIO_REGISTER (doorbell page)"))?;
        uffd.writeprotect(bell, ps, true).map_err(TrackError::sys("UFFDIO_WRITEPROTECT (doorbell page)"))?;

        let shared = Arc::new(Shared { region, dirty, snap, ctl, doorbell });
        let h_uffd = uffd.try_clone().map_err(TrackError::sys("dup"))?;
        let h_shared = Arc::clone(&shared);
        let non_blocking = b.non_blocking;
        let handler = std::thread::Builder::new()
            .name("remem-uffd-wp".into())
            .spawn(move || run_handler(h_uffd, h_shared, non_blocking))
            .map_err(TrackError::sys("spawning the fault-handler thread"))?;
        while !shared.ctl.ready.load(Ordering::Acquire) && !handler.is_finished() {
            std::thread::yield_now();
        }
        Ok(Self { shared, uffd: Some(uffd), handler: Some(handler), harvest_lock: Mutex::new(()) })
    }

    /// A precise tracker on a userfaultfd someone else opened and registered
    /// over `region` for write-protection and missing pages (the lazy
    /// loader: one context per range carries loading and tracking). It
    /// starts no thread: whoever reads the context's events hands each
    /// write-protect fault to the returned [`WpFaults`]. Starts clean: the
    /// loader installs every page write-protected.
    pub(crate) fn on_shared(
        region: Region,
        store: Option<Box<dyn WordStore>>,
        uffd: OwnedFd,
    ) -> Result<(Self, WpFaults)> {
        let uffd = Uffd::from_owned(uffd);
        let pages = region.pages();
        let dirty = match store {
            Some(s) => DirtyBitmap::with_store(s, pages)?,
            None => DirtyBitmap::new(pages)?,
        };
        dirty.clear();
        let snap = OwnedWords::new(DirtyBitmap::words_for(pages)).map_err(TrackError::sys("mmap"))?;
        let ctl = MmapBox::new(Control {
            fault_lock: Mutex::new(()),
            ready: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            faults: AtomicU64::new(0),
            failed_op: AtomicU32::new(0),
            failed_errno: AtomicI32::new(0),
        })
        .map_err(TrackError::sys("mmap"))?;
        let doorbell = OwnedWords::new(region.page_size() / 8).map_err(TrackError::sys("mmap"))?;
        let shared = Arc::new(Shared { region, dirty, snap, ctl, doorbell });
        let sink = WpFaults { shared: Arc::clone(&shared), uffd: uffd.try_clone().map_err(TrackError::sys("dup"))? };
        Ok((Self { shared, uffd: Some(uffd), handler: None, harvest_lock: Mutex::new(()) }, sink))
    }

    fn uffd(&self) -> &Uffd {
        self.uffd.as_ref().expect("userfaultfd is open until drop")
    }

    /// The current dirty set (pages written since the last harvest): the
    /// words of the store given to
    /// [`TrackerBuilder::build_precise_in`](super::TrackerBuilder::build_precise_in),
    /// if one was; same as [`Tracker::current_set`].
    pub fn dirty_set(&self) -> &DirtyBitmap {
        &self.shared.dirty
    }

    /// Write-protect fault events handled so far.
    pub fn faults_handled(&self) -> u64 {
        self.shared.ctl.faults.load(Ordering::Relaxed)
    }

    /// Harvest, optionally moving the taken pages into `closing`.
    ///
    /// Why a write racing with this harvest is never lost. Take a page `p`
    /// whose bit the harvest sees set (the harvest reports `p` and the
    /// caller copies `p` after the harvest returns):
    ///
    /// 1. The harvest holds `fault_lock` from its first load to its last
    ///    clear, so the handler can neither set bits nor un-protect pages
    ///    in between: the bits it loads are the bits it clears.
    /// 2. It write-protects `p` (the ioctl returns after the TLB flush), and
    ///    only then clears `p`'s bit. A write to `p` that completes before
    ///    the protection is in memory before the caller's copy. A write
    ///    after it faults; its event waits for `fault_lock`, so the handler
    ///    sets `p`'s bit only after the clear, and the page is reported by
    ///    the next harvest. Had the bit been cleared first, a write in
    ///    between would land with neither a bit nor a fault.
    /// 3. A page whose bit was clear at the load is not touched: its bit,
    ///    if set later (by a fault waiting for the lock, or by
    ///    `mark_dirty`, which takes no lock), survives because only the
    ///    loaded bits are cleared (`fetch_and`, not a store of 0).
    ///
    /// The invariant holds throughout: `p` is protected before its bit
    /// goes, so a writable page always has its bit set.
    ///
    /// With `closing`: `p`'s bit is set in `closing` right after the load
    /// (a `fetch_or`, so bits already there stay), i.e. before the
    /// protection and before the clear. The clear is a `Release` RMW on the
    /// current word, so a reader whose `Acquire` load of that word sees the
    /// bit gone also sees it in `closing`: `p` is in one of the two at every
    /// instant. If protecting fails half-way, the loaded bits stay in the
    /// current set (nothing was cleared), and may also be in `closing`.
    ///
    /// `out` is filled after the locks are released, so it may live
    /// anywhere, tracked memory included; `closing` must not (it is written
    /// while the handler is held off).
    fn take(&self, closing: Option<&DirtyBitmap>, out: &mut Vec<u64>) -> Result<()> {
        out.clear();
        let sh = &*self.shared;
        let _serial = self.harvest_lock.lock().unwrap_or_else(PoisonError::into_inner);
        sh.check()?;
        {
            // Nothing below allocates or writes anything but the dirty set,
            // `closing` and `snap`: the handler is blocked meanwhile, so a
            // write to a tracked page here would deadlock.
            let _faults = sh.lock_faults();
            let words = sh.dirty.words();
            let closing = closing.map(DirtyBitmap::words);
            let mut runs = RunMerger::new();
            for (i, (w, s)) in words.iter().zip(sh.snap.iter()).enumerate() {
                let bits = w.load(Ordering::Acquire);
                s.store(bits, Ordering::Relaxed);
                if bits == 0 {
                    continue;
                }
                if let Some(c) = closing {
                    c[i].fetch_or(bits, Ordering::Release);
                }
                for (a, b) in word_runs(i, bits) {
                    if let Some(run) = runs.push(a, b) {
                        self.protect(run)?;
                    }
                }
            }
            if let Some(run) = runs.finish() {
                self.protect(run)?;
            }
            // Every loaded page is protected (and in `closing`) now; clear
            // exactly those bits.
            for (w, s) in words.iter().zip(sh.snap.iter()) {
                let bits = s.load(Ordering::Relaxed);
                if bits != 0 {
                    w.fetch_and(!bits, Ordering::Release);
                }
            }
        }
        for (i, s) in sh.snap.iter().enumerate() {
            push_bits(out, i, s.load(Ordering::Relaxed));
        }
        Ok(())
    }

    fn protect(&self, (first, end): (u64, u64)) -> Result<()> {
        let r = &self.shared.region;
        self.uffd()
            .writeprotect(r.addr(first), (end - first) << r.page_shift, true)
            .map_err(TrackError::sys("UFFDIO_WRITEPROTECT"))
    }
}

impl Tracker for PreciseTracker {
    fn mode(&self) -> TrackMode {
        TrackMode::Precise
    }

    fn pages(&self) -> u64 {
        self.shared.region.pages()
    }

    fn page_size(&self) -> usize {
        self.shared.region.page_size()
    }

    // Why a write racing with this harvest is never lost: see `take`.
    fn harvest(&self, out: &mut Vec<u64>) -> Result<()> {
        self.take(None, out)
    }

    // `take` with a closing set: each taken page is set in `closing` before
    // it is protected and before its current bit goes.
    fn harvest_into(&self, closing: &DirtyBitmap, out: &mut Vec<u64>) -> Result<()> {
        super::check_closing(closing, self.pages(), Some(&self.shared.dirty))?;
        self.take(Some(closing), out)
    }

    fn current_set(&self) -> Option<&DirtyBitmap> {
        Some(&self.shared.dirty)
    }

    fn protect_all(&self) -> Result<()> {
        let sh = &*self.shared;
        let _serial = self.harvest_lock.lock().unwrap_or_else(PoisonError::into_inner);
        sh.check()?;
        // Protect, then clear, under the lock: same argument as `harvest`.
        let _faults = sh.lock_faults();
        self.uffd()
            .writeprotect(sh.region.base, sh.region.len, true)
            .map_err(TrackError::sys("UFFDIO_WRITEPROTECT"))?;
        sh.dirty.clear();
        Ok(())
    }

    fn mark_dirty(&self, first: u64, count: u64) {
        self.shared.dirty.set_range(first, count);
    }
}

impl Drop for PreciseTracker {
    fn drop(&mut self) {
        // 1. Raise the stop flag, which the handler checks after each batch.
        // 2. Close our descriptor. The userfaultfd context (registration and
        //    protection) lives on while the handler holds its copy, so a
        //    writer faulting now is still served; once the handler drops its
        //    copy, the kernel unregisters everything, clears the protection
        //    and wakes any writer still waiting.
        // 3. Ring the doorbell: if the handler is still in its loop, the
        //    fault wakes it, it un-protects the doorbell and sees the flag;
        //    if it has already left (after a batch, or on failure), the
        //    context is gone or going, and the write goes through or is
        //    released when the handler's copy closes. It never waits for ever.
        // 4. Join. The thread's exit path may write allocator memory, but by
        //    then nothing is protected any more.
        self.shared.ctl.stop.store(true, Ordering::Release);
        drop(self.uffd.take());
        self.shared.doorbell[0].store(1, Ordering::Relaxed);
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
    }
}

fn run_handler(uffd: Uffd, shared: Arc<Shared>, non_blocking: bool) {
    shared.ctl.ready.store(true, Ordering::Release);
    if let Err((op, e)) = handler_loop(&uffd, &shared, non_blocking) {
        shared.fail(&uffd, op, &e);
    }
    // Dropping `uffd` here (our copy) lets the kernel release the context
    // once the tracker has closed its own.
}

/// Waits for fault events and handles every pending event per wake-up,
/// until the stop flag is up. Touches only its stack, the dirty set and
/// `Control`.
fn handler_loop(uffd: &Uffd, shared: &Shared, non_blocking: bool) -> std::result::Result<(), (u32, io::Error)> {
    let mut msgs = [Fault::default(); MSG_BATCH];
    loop {
        if non_blocking {
            match sys::poll_in(uffd.as_fd(), -1) {
                Ok(ev) if ev & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 => {
                    return Err((OP_POLL, io::Error::from_raw_os_error(libc::EIO)))
                }
                Ok(ev) if ev & libc::POLLIN == 0 => continue,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err((OP_POLL, e)),
            }
        }
        // Drain, a batch of up to MSG_BATCH events per lock. A non-blocking
        // descriptor is read until no event is pending. A blocking one waits
        // for the first event, which is handled alone (a second read would
        // wait for another event); the next pass picks up the rest.
        loop {
            let mut n = 0;
            while n < MSG_BATCH {
                match uffd.read_fault() {
                    Ok(Some(f)) => {
                        msgs[n] = f;
                        n += 1;
                        if !non_blocking {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err((OP_READ, e)),
                }
            }
            if n > 0 {
                shared.handle(uffd, &msgs[..n])?;
            }
            if n < MSG_BATCH || !non_blocking {
                break;
            }
        }
        if shared.ctl.stop.load(Ordering::Acquire) {
            return Ok(());
        }
    }
}
