//! The flusher: epochs, the consistent cut, commits to the baseline, the
//! background thread, and the durability state.
//!
//! # An epoch switch
//!
//! 1. Take the flush lock (one flush at a time).
//! 2. Pause the heap's mutating calls ([`crate::gate`]), harvest the
//!    tracker *into the closing set* (re-protecting the pages, so later
//!    writes land in the next epoch), and copy every page of the closing set
//!    into a buffer; bump the current epoch; resume. This is the consistent
//!    cut: while paused no allocator or transaction call runs, so the copy
//!    is one instant of the heap, which recovery makes transaction-consistent
//!    (undo logs roll back transactions that were running). Raw writes by the
//!    database to data outside transactions are not paused and are copied as
//!    they are, as a crash would leave them.
//! 3. Write the copies to the baseline (journal, sync, commit record, sync).
//! 4. Only then clear the closing set; wake `wait_durable` callers.
//!
//! A failed write or sync poisons the heap's durability: every later
//! flush fails with [`FlushError::Poisoned`], and the control region says
//! so; nothing is retried over a failed fsync.

use std::sync::atomic::Ordering::Release;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};

use crate::baseline::{Backend, Baseline, BaselineError};
use crate::control::{ctl, Control};
use crate::format::PAGE_SIZE;
use crate::track::{DirtyBitmap, TrackError, Tracker};

/// Why a flush (or a wait for durability) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FlushError {
    /// A previous flush failed to reach the disk; durability is off until the
    /// heap is reopened (which loads the last committed baseline).
    #[error("durability is poisoned since a flush failed ({0}); no flush is accepted; reopen the heap")]
    Poisoned(String),
    /// Writing this flush to the baseline failed; the heap is now poisoned.
    #[error("flush failed: {0}")]
    Baseline(String),
    /// The dirty-page tracker failed.
    #[error("dirty-page tracking failed: {0}")]
    Track(String),
    /// The heap has no baseline (a memfd-only heap).
    #[error("this heap has no baseline file to flush to (it lives in a memfd only)")]
    NoBaseline,
    /// This process is a fork of the one that opened the heap; only that
    /// process flushes it (see [`crate::fork`]).
    #[error(transparent)]
    Forked(#[from] crate::fork::Forked),
}

/// Durability statistics.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct FlushStats {
    /// The epoch writes land in now.
    pub current_epoch: u64,
    /// The last epoch durable in the baseline.
    pub committed_epoch: u64,
    /// Pages known to differ from the baseline now (precise mode: exact;
    /// fast mode: as of the last harvest, plus the flush in progress).
    pub dirty_pages: u64,
    /// Flushes committed since the heap was opened.
    pub flushes: u64,
    /// Pages written to the baseline since the heap was opened.
    pub pages_flushed: u64,
    /// Bytes written to the baseline since the heap was opened (pages only).
    pub bytes_flushed: u64,
    /// When the last flush committed (or the baseline was opened).
    pub last_commit: Option<SystemTime>,
    /// Time since the last commit: what a host failure would lose (RPO).
    pub rpo_lag: Duration,
    /// Pause of the last flush.
    pub last_pause: Duration,
    /// Median and 99th percentile of recent pauses.
    pub pause_p50: Duration,
    /// 99th percentile of recent pauses.
    pub pause_p99: Duration,
    /// Set when durability is poisoned.
    pub poisoned: Option<String>,
}

struct State {
    committed: u64,
    current: u64,
    poisoned: Option<String>,
    flushes: u64,
    pages: u64,
    last_commit: SystemTime,
    last_pause: Duration,
    pauses: Vec<Duration>,
    stop: bool,
}

/// A baseline on any backend.
type SharedBaseline = Baseline<Arc<dyn Backend>>;

/// The durability machinery of a heap with a baseline.
pub(crate) struct Durability {
    /// The baseline, and the copy buffer reused by every flush (already
    /// faulted in, so the pause does not pay for fresh memory). The mutex
    /// is the flush lock.
    baseline: Mutex<(SharedBaseline, Vec<u8>)>,
    pub(crate) tracker: Box<dyn Tracker>,
    closing: DirtyBitmap,
    pub(crate) control: Control,
    state: Mutex<State>,
    cond: Condvar,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durability").field("tracker", &self.tracker.mode()).finish()
    }
}

fn unix(t: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(t)
}

impl Durability {
    pub(crate) fn new(
        baseline: Baseline<Arc<dyn Backend>>,
        tracker: Box<dyn Tracker>,
        control: Control,
    ) -> Result<Durability, TrackError> {
        let closing = DirtyBitmap::with_store(Box::new(control.closing_words()), tracker.pages())?;
        let info = baseline.info();
        control.word(ctl::CURRENT_EPOCH).store(info.epoch + 1, Release);
        control.word(ctl::COMMITTED_EPOCH).store(info.epoch, Release);
        Ok(Durability {
            state: Mutex::new(State {
                committed: info.epoch,
                current: info.epoch + 1,
                poisoned: None,
                flushes: 0,
                pages: 0,
                last_commit: unix(info.commit_unix_ns),
                last_pause: Duration::ZERO,
                pauses: Vec::new(),
                stop: false,
            }),
            baseline: Mutex::new((baseline, Vec::new())),
            tracker,
            closing,
            control,
            cond: Condvar::new(),
            thread: Mutex::new(None),
        })
    }

    fn poison(&self, why: String) -> FlushError {
        self.control.word(ctl::STATE).store(ctl::POISONED, Release);
        let mut st = self.state.lock();
        st.poisoned.get_or_insert(why.clone());
        self.cond.notify_all();
        FlushError::Baseline(why)
    }

    /// One epoch switch (see the module docs). `pause` runs `f` with the
    /// heap's mutating calls stopped; `mem` is the heap's first byte.
    pub(crate) fn flush(
        &self,
        mem: *const u8,
        pause: impl FnOnce(&mut dyn FnMut()) -> Duration,
    ) -> Result<u64, FlushError> {
        let mut guard = self.baseline.lock();
        let (baseline, buf) = &mut *guard;
        if let Some(p) = &self.state.lock().poisoned {
            return Err(FlushError::Poisoned(p.clone()));
        }
        let epoch = self.state.lock().current;
        let mut harvested = Vec::new();
        let mut pages = Vec::new();
        buf.clear();
        let mut result = Ok(());
        let paused_for = pause(&mut || {
            result = self.tracker.harvest_into(&self.closing, &mut harvested);
            if result.is_err() {
                return;
            }
            // The closing set also holds the pages of a flush that failed
            // before its commit.
            self.closing.collect_into(&mut pages);
            buf.reserve(pages.len() * PAGE_SIZE);
            for &p in &pages {
                // SAFETY: `p` < npages, so the page lies inside the heap
                // mapping that `mem` starts; mutating calls are paused.
                let src = unsafe { std::slice::from_raw_parts(mem.add(p as usize * PAGE_SIZE), PAGE_SIZE) };
                buf.extend_from_slice(src);
            }
            self.control.word(ctl::CURRENT_EPOCH).store(epoch + 1, Release);
        });
        {
            let mut st = self.state.lock();
            st.current = epoch + 1;
            st.last_pause = paused_for;
            if st.pauses.len() >= 1024 {
                st.pauses.remove(0);
            }
            st.pauses.push(paused_for);
        }
        result.map_err(|e| FlushError::Track(e.to_string()))?;
        if pages.is_empty() {
            // Nothing changed: the epoch is durable without a write.
            let mut st = self.state.lock();
            st.committed = epoch;
            st.last_commit = SystemTime::now();
            self.control.word(ctl::COMMITTED_EPOCH).store(epoch, Release);
            self.cond.notify_all();
            return Ok(epoch);
        }
        let commit = baseline.commit(epoch, pages.iter().copied().zip(buf.chunks_exact(PAGE_SIZE)));
        let info = match commit {
            Ok(info) => info,
            Err(e) => return Err(self.fail(e)),
        };
        self.closing.clear();
        if info.journal_len > baseline.heap_size() / 4 {
            if let Err(e) = baseline.apply() {
                return Err(self.fail(e));
            }
        }
        self.control.word(ctl::COMMITTED_EPOCH).store(epoch, Release);
        let mut st = self.state.lock();
        st.committed = epoch;
        st.flushes += 1;
        st.pages += pages.len() as u64;
        st.last_commit = unix(info.commit_unix_ns);
        self.cond.notify_all();
        Ok(epoch)
    }

    fn fail(&self, e: BaselineError) -> FlushError {
        self.poison(e.to_string())
    }

    /// Compacts the journal into the image (at close).
    pub(crate) fn apply(&self) -> Result<(), FlushError> {
        let mut guard = self.baseline.lock();
        let baseline = &mut guard.0;
        if let Some(p) = &self.state.lock().poisoned {
            return Err(FlushError::Poisoned(p.clone()));
        }
        baseline.apply().map_err(|e| self.fail(e))
    }

    /// Blocks until `epoch` is durable.
    pub(crate) fn wait_durable(&self, epoch: u64) -> Result<(), FlushError> {
        let mut st = self.state.lock();
        loop {
            if st.committed >= epoch {
                return Ok(());
            }
            if let Some(p) = &st.poisoned {
                return Err(FlushError::Poisoned(p.clone()));
            }
            self.cond.wait(&mut st);
        }
    }

    pub(crate) fn current_epoch(&self) -> u64 {
        self.state.lock().current
    }

    pub(crate) fn stats(&self) -> FlushStats {
        let st = self.state.lock();
        let mut sorted = st.pauses.clone();
        sorted.sort_unstable();
        let pct = |q: f64| sorted.get(((sorted.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or_default();
        let dirty = self.tracker.current_set().map_or(0, |s| s.count()) + self.closing.count();
        FlushStats {
            current_epoch: st.current,
            committed_epoch: st.committed,
            dirty_pages: dirty,
            flushes: st.flushes,
            pages_flushed: st.pages,
            bytes_flushed: st.pages * PAGE_SIZE as u64,
            last_commit: Some(st.last_commit),
            rpo_lag: st.last_commit.elapsed().unwrap_or_default(),
            last_pause: st.last_pause,
            pause_p50: pct(0.5),
            pause_p99: pct(0.99),
            poisoned: st.poisoned.clone(),
        }
    }

    /// Starts the background flusher: every `interval`, it upgrades `heap`
    /// and calls `flush`. A failure is recorded in the durability state
    /// (poisoned), never lost; a panic in a flush is caught and poisons.
    pub(crate) fn start<H: Send + Sync + 'static>(
        self: &Arc<Self>,
        interval: Duration,
        heap: Weak<H>,
        flush: fn(&H) -> Result<u64, FlushError>,
    ) {
        let me = Arc::downgrade(self);
        let handle = std::thread::Builder::new()
            .name("remem-flusher".into())
            .spawn(move || loop {
                let Some(d) = me.upgrade() else { return };
                {
                    let mut st = d.state.lock();
                    if !st.stop {
                        d.cond.wait_for(&mut st, interval);
                    }
                    if st.stop {
                        return;
                    }
                }
                let Some(h) = heap.upgrade() else { return };
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| flush(&h))) {
                    Ok(Ok(_)) | Ok(Err(FlushError::Poisoned(_))) => {}
                    Ok(Err(e)) => eprintln!("remem: background flush failed: {e}"),
                    Err(_) => {
                        let _ = d.poison("the background flusher panicked".into());
                    }
                }
            })
            .expect("spawning the flusher thread");
        *self.thread.lock() = Some(handle);
    }

    /// Stops the background flusher and waits for it.
    pub(crate) fn stop(&self) {
        self.state.lock().stop = true;
        self.cond.notify_all();
        if let Some(h) = self.thread.lock().take() {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }

    pub(crate) fn dirty_pages(&self, out: &mut Vec<u64>) {
        if let Some(cur) = self.tracker.current_set() {
            cur.collect_into(out);
        }
        let mut more = Vec::new();
        self.closing.collect_into(&mut more);
        out.extend(more);
        out.sort_unstable();
        out.dedup();
    }

    /// The committed CRC of `page` in the baseline (lazy loading compares
    /// the pages it installs with it, to know which ones the next flush must write).
    pub(crate) fn committed_crc(&self, page: u64) -> Option<u32> {
        self.baseline.lock().0.page_crc(page).ok()
    }

    pub(crate) fn is_poisoned(&self) -> bool {
        self.state.lock().poisoned.is_some()
    }

    pub(crate) fn mark_closed(&self) {
        if !self.is_poisoned() {
            self.control.word(ctl::STATE).store(ctl::CLOSED, Release);
        }
    }
}

/// Pauses with timing.
pub(crate) fn timed(f: &mut dyn FnMut()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}
