//! The flusher: epochs, the consistent cut by iterative pre-copy, commits to
//! the baseline, the background worker (periodic flushes and journal
//! compaction), and the durability state.
//!
//! # A flush
//!
//! 1. Take the flush lock (one flush at a time).
//! 2. **Pre-copy, while the database runs.** Harvest the tracker *into the
//!    closing set* (re-protecting the pages, so that later writes are seen
//!    again) and copy every page of the closing set into the copy buffer
//!    (the closing set also holds the pages of a flush that failed before
//!    its commit). Then, round after round, harvest the pages written
//!    meanwhile and copy those again, over their older copies. Stop when a
//!    round found at most [`FINAL_PAGES`] pages, or after [`MAX_ROUNDS`].
//! 3. **The cut, paused.** Pause the heap's mutating calls
//!    ([`crate::gate`]), harvest once more into the closing set, copy those
//!    pages, bump the current epoch, resume. Only this last round runs under
//!    the pause, so the pause does not grow with the epoch's dirty set.
//! 4. Write the copies of every page of the closing set to the baseline
//!    (journal, sync, commit record, sync), outside the pause.
//! 5. Only then clear the closing set; wake `wait_durable` callers. A large
//!    journal is compacted by the background worker in bounded steps
//!    ([`Baseline::apply_step`]), between which flushes commit: never inside
//!    `flush()` or the pause.
//!
//! # Why the copies form one consistent cut
//!
//! Let T be the instant of the last harvest, under the pause. Take a page
//! p of the closing set, and the last round that copied it, which began
//! with a harvest at t ≤ T. Every harvest re-protects the pages it takes,
//! atomically with respect to writers ([`Tracker::harvest_into`]): a write
//! to p after the harvest at t is reported by a later harvest, at the
//! latest the one at T, which would have copied p again. So p was not
//! written between t and T, and its copy (made after t) holds p's bytes at
//! T. Pages outside the closing set were not written since the last
//! committed flush, so the baseline already holds their bytes at T. The
//! baseline therefore receives the heap as it was at T, one instant.
//!
//! At T no mutating call is in flight (the gate waits for every call to
//! leave and holds new ones): the allocator's metadata and every
//! transaction's undo log, which live in the heap, are whole, and recovery
//! rolls back the transactions that had begun and not committed at T,
//! exactly as after a crash at T. Raw writes by the database outside
//! mutating calls are not paused: like a crash, the cut takes them as
//! they are, and in a transaction they are covered by its undo log.
//!
//! # Convergence: bounded work under the pause
//!
//! The pause copies what was written during the last pre-copy round. A
//! round that finds more than half the pages of the round before means the
//! writers dirty pages nearly as fast as the flusher copies them: the
//! flusher then *throttles* the mutating calls ([`crate::gate`]): every
//! outermost call waits a delay before it starts, 10 µs at first, doubled
//! on each such round, at most [`crate::gate::MAX_THROTTLE`], and lifted at
//! the end of the cut. Writers slow down in proportion to how far the
//! copier is behind, never stop. The first delay is long enough to make
//! the next round small at once: a milder one would delay many more
//! transactions, each by less, for longer, and the slowest thousandth of
//! them is what a database sees (`remem-bench flush`, case `stall`).
//! After [`STUCK_ROUNDS`] rounds in which the rounds did not fall to half
//! of where they were (the writers do not slow down enough: they write
//! outside mutating calls, which are not throttled), or after
//! [`MAX_ROUNDS`] rounds, the cut is taken anyway: more rounds would copy
//! the same pages again and make the writers fault on them again; the
//! pause then copies what the writers dirtied in the last round.
//! Raw writes outside mutating calls are not throttled: a thread that
//! writes many pages without calling the heap makes the last round, and so
//! the pause, longer.
//!
//! Untracked heaps ([`TrackMode::Off`]) cannot know what changed during a
//! pre-copy round: their cut copies every page under the pause, as before.
//!
//! # The dirty lists
//!
//! The closing set only grows during a flush, and each page enters it
//! before it leaves the tracker's current set; it is cleared only once the
//! commit that holds every one of its pages is durable. So in precise mode
//! the current and closing sets together cover every page newer than the
//! committed baseline at every instant, and in fast mode after every
//! harvest (the agent seals the rest).
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
use crate::gate::Gate;
use crate::track::{DirtyBitmap, TrackError, TrackMode, Tracker};

/// A pre-copy round that found at most this many pages ends the pre-copy:
/// the pause copies about as many (4 MiB at most, well under a millisecond
/// of memcpy).
pub const FINAL_PAGES: usize = 1024;
/// Pre-copy rounds at most (the first included) before the cut is taken.
pub const MAX_ROUNDS: u32 = 16;
/// First throttle delay per mutating call.
const THROTTLE_START: Duration = Duration::from_micros(10);
/// Rounds in which the pre-copy's rounds did not fall to half of where they
/// were, after which the cut is taken at once (see the module docs).
pub const STUCK_ROUNDS: u32 = 3;
/// Journal pages per background compaction step (1 MiB): the longest a
/// commit waits for the compactor, besides its syncs.
const APPLY_STEP_PAGES: usize = 256;
/// Compaction starts when the journal passes this share of the heap size.
const COMPACT_DIVISOR: u64 = 4;

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
    /// Longest of the recent pauses (the last 1024 flushes).
    pub pause_max: Duration,
    /// Pre-copy rounds of the last flush (0 for untracked heaps).
    pub last_rounds: u32,
    /// Pages the last flush copied under the pause.
    pub last_paused_pages: u64,
    /// Pages copied by every flush (pre-copy copies included, so at least
    /// `pages_flushed`): the price of a short pause.
    pub pages_copied: u64,
    /// Flushes whose pre-copy had to throttle the mutating calls.
    pub throttled_flushes: u64,
    /// Journal compactions finished since the heap was opened.
    pub compactions: u64,
    /// A journal compaction is pending or running in the background.
    pub compacting: bool,
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
    last_rounds: u32,
    last_paused_pages: u64,
    pages_copied: u64,
    throttled_flushes: u64,
    compactions: u64,
    /// The journal passed its threshold: the worker compacts it.
    compact: bool,
    stop: bool,
}

/// A baseline on any backend.
type SharedBaseline = Baseline<Arc<dyn Backend>>;

/// The copies of one flush, reused by every flush (already faulted in, so
/// no round pays for fresh memory). The mutex around it is the flush lock.
struct Copies {
    /// Page copies, one slot each.
    buf: Vec<u8>,
    /// Per heap page: its slot in `buf`, or `u32::MAX`.
    slot: Vec<u32>,
    /// The pages that have a slot, in slot order.
    pages: Vec<u64>,
    /// Harvest scratch.
    harvested: Vec<u64>,
}

impl Copies {
    /// Copies each page of `pages` from the heap at `mem` into its slot
    /// (a new slot for a page not copied yet in this flush).
    fn copy(&mut self, mem: *const u8, pages: &[u64]) {
        for &p in pages {
            // SAFETY: `p` < npages (the tracker reports only pages of the
            // heap, and `slot` has one entry per page), so the page lies
            // inside the heap mapping that `mem` starts, which lives as long
            // as the heap. The bytes may change under the copy (writers run
            // during pre-copy rounds); such a page is reported by the next
            // harvest and copied again, see the module docs.
            let src = unsafe { std::slice::from_raw_parts(mem.add(p as usize * PAGE_SIZE), PAGE_SIZE) };
            let slot = &mut self.slot[p as usize];
            if *slot == u32::MAX {
                *slot = self.pages.len() as u32;
                self.pages.push(p);
                self.buf.extend_from_slice(src);
            } else {
                let at = *slot as usize * PAGE_SIZE;
                self.buf[at..at + PAGE_SIZE].copy_from_slice(src);
            }
        }
    }

    /// Forgets every copy (keeps the memory).
    fn reset(&mut self) {
        for &p in &self.pages {
            self.slot[p as usize] = u32::MAX;
        }
        self.pages.clear();
        self.buf.clear();
    }

    /// The copies, by ascending page.
    fn sorted(&self) -> Vec<(u64, &[u8])> {
        let mut out: Vec<(u64, &[u8])> =
            self.pages.iter().enumerate().map(|(i, &p)| (p, &self.buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])).collect();
        out.sort_unstable_by_key(|&(p, _)| p);
        out
    }
}

/// The pre-copy's pacing (module docs, "Convergence"): whether another
/// round is worth it, and how hard to throttle the writers.
#[derive(Debug)]
struct Pace {
    /// Pages the last round found.
    last: usize,
    /// The throttle now (zero: none).
    throttle: Duration,
    /// Rounds since the rounds last fell to half of `anchor`.
    stuck: u32,
    /// The pages of the round where that count began.
    anchor: usize,
}

impl Pace {
    /// After the first round, which found `first` pages.
    fn new(first: usize) -> Pace {
        Pace { last: first, throttle: Duration::ZERO, stuck: 0, anchor: first }
    }

    /// Another round is worth it after `rounds` rounds.
    fn more(&self, rounds: u32) -> bool {
        self.last > FINAL_PAGES && rounds < MAX_ROUNDS && self.stuck < STUCK_ROUNDS
    }

    /// A round found `n` pages: the new throttle if it must change.
    fn round(&mut self, n: usize) -> Option<Duration> {
        let last = std::mem::replace(&mut self.last, n);
        if n * 2 <= self.anchor {
            // Half of where the last STUCK_ROUNDS rounds began: progress.
            (self.anchor, self.stuck) = (n, 0);
        } else {
            // No halving for STUCK_ROUNDS rounds: the throttle is not
            // reaching the writers (raw writes outside mutating calls), or
            // not enough, and more rounds would mostly copy the same pages
            // again and make the writers fault on them again.
            self.stuck += 1;
        }
        (n > FINAL_PAGES && n * 2 > last).then(|| {
            // The round did not halve: the writers dirty pages nearly as
            // fast as they are copied. Slow the mutating calls down, more
            // on every such round.
            self.throttle = (self.throttle * 2).max(THROTTLE_START);
            self.throttle
        })
    }
}

/// Lifts the throttle when the cut is over, however it ends.
struct Unthrottle<'a>(&'a Gate);

impl Drop for Unthrottle<'_> {
    fn drop(&mut self) {
        self.0.unthrottle();
    }
}

/// The durability machinery of a heap with a baseline.
pub(crate) struct Durability {
    /// The flush lock and the copies.
    copies: Mutex<Copies>,
    /// The baseline: held by a commit, or by one compaction step.
    baseline: Mutex<SharedBaseline>,
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
        let npages = tracker.pages() as usize;
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
                last_rounds: 0,
                last_paused_pages: 0,
                pages_copied: 0,
                throttled_flushes: 0,
                compactions: 0,
                compact: false,
                stop: false,
            }),
            copies: Mutex::new(Copies {
                buf: Vec::new(),
                slot: vec![u32::MAX; npages],
                pages: Vec::new(),
                harvested: Vec::new(),
            }),
            baseline: Mutex::new(baseline),
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

    fn check_poisoned(&self) -> Result<(), FlushError> {
        match &self.state.lock().poisoned {
            Some(p) => Err(FlushError::Poisoned(p.clone())),
            None => Ok(()),
        }
    }

    /// One flush (see the module docs): pre-copy rounds, the cut under
    /// `gate`'s pause, the commit. `mem` is the heap's first byte.
    pub(crate) fn flush(&self, mem: *const u8, gate: &Gate) -> Result<u64, FlushError> {
        let mut guard = self.copies.lock();
        let copies = &mut *guard;
        self.check_poisoned()?;
        copies.reset();
        let epoch = self.state.lock().current;
        let track = |e: TrackError| FlushError::Track(e.to_string());
        let tracked = self.tracker.mode() != TrackMode::Off;
        let mut harvested = std::mem::take(&mut copies.harvested);
        let (mut rounds, mut copied, mut throttled) = (0u32, 0u64, false);
        let _unthrottle = Unthrottle(gate);
        if tracked {
            // Round 1: everything of the closing set (this epoch's pages and
            // those of a flush that failed before its commit).
            self.tracker.harvest_into(&self.closing, &mut harvested).map_err(track)?;
            harvested.clear();
            self.closing.collect_into(&mut harvested);
            copies.copy(mem, &harvested);
            copied += harvested.len() as u64;
            rounds = 1;
            let mut pace = Pace::new(harvested.len());
            while pace.more(rounds) {
                self.tracker.harvest_into(&self.closing, &mut harvested).map_err(track)?;
                copies.copy(mem, &harvested);
                copied += harvested.len() as u64;
                rounds += 1;
                if let Some(delay) = pace.round(harvested.len()) {
                    gate.throttle(delay);
                    throttled = true;
                }
            }
        }
        // The cut.
        let (result, paused_for) = {
            let t = Instant::now();
            let _paused = gate.pause();
            let r = self.tracker.harvest_into(&self.closing, &mut harvested);
            if r.is_ok() {
                copies.copy(mem, &harvested);
                self.control.word(ctl::CURRENT_EPOCH).store(epoch + 1, Release);
            }
            (r, t.elapsed())
        };
        drop(_unthrottle);
        result.map_err(track)?;
        let paused_pages = harvested.len() as u64;
        copied += paused_pages;
        copies.harvested = harvested;
        {
            let mut st = self.state.lock();
            st.current = epoch + 1;
            st.last_pause = paused_for;
            if st.pauses.len() >= 1024 {
                st.pauses.remove(0);
            }
            st.pauses.push(paused_for);
            st.last_rounds = rounds;
            st.last_paused_pages = paused_pages;
            st.pages_copied += copied;
            st.throttled_flushes += u64::from(throttled);
        }
        if copies.pages.is_empty() {
            // Nothing changed: the epoch is durable without a write.
            let mut st = self.state.lock();
            st.committed = epoch;
            st.last_commit = SystemTime::now();
            self.control.word(ctl::COMMITTED_EPOCH).store(epoch, Release);
            self.cond.notify_all();
            return Ok(epoch);
        }
        let info = {
            let mut baseline = self.baseline.lock();
            match baseline.commit(epoch, copies.sorted()) {
                Ok(info) => info,
                Err(e) => return Err(self.fail(e)),
            }
        };
        self.closing.clear();
        self.control.word(ctl::COMMITTED_EPOCH).store(epoch, Release);
        let mut st = self.state.lock();
        st.committed = epoch;
        st.flushes += 1;
        st.pages += copies.pages.len() as u64;
        st.last_commit = unix(info.commit_unix_ns);
        if info.journal_len > self.tracker.pages() * PAGE_SIZE as u64 / COMPACT_DIVISOR {
            st.compact = true;
        }
        self.cond.notify_all();
        Ok(epoch)
    }

    fn fail(&self, e: BaselineError) -> FlushError {
        self.poison(e.to_string())
    }

    /// One bounded step of the journal compaction (the worker's).
    fn compact_step(&self) {
        let done = {
            let mut baseline = self.baseline.lock();
            if self.is_poisoned() {
                return;
            }
            baseline.apply_step(APPLY_STEP_PAGES)
        };
        match done {
            Ok(false) => {}
            Ok(true) => {
                let mut st = self.state.lock();
                st.compact = false;
                st.compactions += 1;
            }
            Err(e) => {
                let _ = self.fail(e);
            }
        }
    }

    /// Compacts the journal into the image, finishing a compaction in
    /// progress (at close).
    pub(crate) fn apply(&self) -> Result<(), FlushError> {
        let mut baseline = self.baseline.lock();
        self.check_poisoned()?;
        baseline.apply().map_err(|e| self.fail(e))?;
        self.state.lock().compact = false;
        Ok(())
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
            pause_max: sorted.last().copied().unwrap_or_default(),
            last_rounds: st.last_rounds,
            last_paused_pages: st.last_paused_pages,
            pages_copied: st.pages_copied,
            throttled_flushes: st.throttled_flushes,
            compactions: st.compactions,
            compacting: st.compact,
            poisoned: st.poisoned.clone(),
        }
    }

    /// Starts the background worker: every `interval` (if any) it upgrades
    /// `heap` and calls `flush`; between flushes it compacts the journal in
    /// bounded steps once a flush found it too long. A failure is recorded
    /// in the durability state (poisoned), never lost; a panic is caught
    /// and poisons.
    pub(crate) fn start<H: Send + Sync + 'static>(
        self: &Arc<Self>,
        interval: Option<Duration>,
        heap: Weak<H>,
        flush: fn(&H) -> Result<u64, FlushError>,
    ) {
        enum Work {
            Flush,
            Compact,
        }
        let me = Arc::downgrade(self);
        let handle = std::thread::Builder::new()
            .name("remem-flusher".into())
            .spawn(move || {
                let mut next_flush = interval.map(|i| Instant::now() + i);
                loop {
                    let Some(d) = me.upgrade() else { return };
                    let work = {
                        let mut st = d.state.lock();
                        loop {
                            if st.stop {
                                return;
                            }
                            if next_flush.is_some_and(|t| Instant::now() >= t) {
                                break Work::Flush;
                            }
                            if st.compact && st.poisoned.is_none() {
                                break Work::Compact;
                            }
                            match next_flush {
                                Some(t) => {
                                    d.cond.wait_until(&mut st, t);
                                }
                                None => d.cond.wait(&mut st),
                            }
                        }
                    };
                    let outcome = match work {
                        Work::Flush => {
                            next_flush = interval.map(|i| Instant::now() + i);
                            let Some(h) = heap.upgrade() else { return };
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match flush(&h) {
                                Ok(_) | Err(FlushError::Poisoned(_)) => {}
                                Err(e) => eprintln!("remem: background flush failed: {e}"),
                            }))
                        }
                        Work::Compact => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| d.compact_step())),
                    };
                    if outcome.is_err() {
                        let _ = d.poison("the background flusher panicked".into());
                    }
                }
            })
            .expect("spawning the flusher thread");
        *self.thread.lock() = Some(handle);
    }

    /// Stops the background worker and waits for it.
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
        self.baseline.lock().page_crc(page).ok()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Rounds that halve go on without a throttle until one is small.
    #[test]
    fn shrinking_rounds_run_unthrottled_to_the_cut() {
        let mut pace = Pace::new(16_000);
        let mut rounds = 1;
        for n in [8_000, 3_900, 1_800, 900] {
            assert!(pace.more(rounds));
            assert_eq!(pace.round(n), None, "round of {n} pages throttled");
            rounds += 1;
        }
        assert!(!pace.more(rounds), "a round of at most FINAL_PAGES ends the pre-copy");
    }

    /// Rounds that do not halve throttle, doubling each time, up to the cap.
    #[test]
    fn slow_rounds_throttle_harder_each_time() {
        let mut pace = Pace::new(100_000);
        let delays: Vec<_> = [80_000, 60_000, 40_000, 30_000].into_iter().map(|n| pace.round(n)).collect();
        assert_eq!(
            delays,
            [1, 2, 4, 8].map(|k| Some(THROTTLE_START * k)).to_vec(),
            "each round that found more than half the one before doubles the throttle"
        );
        assert!(pace.more(5), "shrinking rounds, if slowly, go on");
    }

    /// Rounds that do not shrink between rounds that do, as long as the
    /// rounds keep halving every STUCK_ROUNDS rounds, are no reason to stop.
    #[test]
    fn rounds_that_keep_halving_if_slowly_go_on() {
        let mut pace = Pace::new(100_000);
        let mut rounds = 1;
        for n in [95_000, 50_000, 48_000, 30_000, 24_000] {
            assert!(pace.more(rounds));
            pace.round(n);
            rounds += 1;
        }
        assert!(pace.more(rounds), "ended after {rounds} rounds at 24 000 pages, the rounds halving");
    }

    /// Rounds that shrink by a fifth each time (raw writers slowed only by
    /// their own faults) do not halve within STUCK_ROUNDS rounds: the
    /// pre-copy ends rather than run every round.
    #[test]
    fn slowly_shrinking_rounds_end_the_precopy() {
        let mut pace = Pace::new(262_000);
        let mut rounds = 1;
        let mut n = 262_000usize;
        while pace.more(rounds) {
            n = n * 4 / 5;
            pace.round(n);
            rounds += 1;
        }
        assert_eq!(rounds, 1 + STUCK_ROUNDS, "rounds at a fifth less each");
    }

    /// Rounds of raw writers wobble (a few tenths down, then up again):
    /// that is no progress, and the pre-copy still ends.
    #[test]
    fn wobbling_rounds_end_the_precopy() {
        let mut pace = Pace::new(262_000);
        let mut rounds = 1;
        for n in [261_000, 230_000, 259_000, 262_000] {
            if !pace.more(rounds) {
                break;
            }
            pace.round(n);
            rounds += 1;
        }
        assert!(!pace.more(rounds), "still going after {rounds} rounds that never halved");
    }

    /// Rounds that find (nearly) as many pages as the one before, whatever
    /// the throttle, end the pre-copy after STUCK_ROUNDS of them.
    #[test]
    fn rounds_that_do_not_shrink_end_the_precopy() {
        let mut pace = Pace::new(262_144);
        let mut rounds = 1;
        while pace.more(rounds) {
            pace.round(262_000);
            rounds += 1;
        }
        assert_eq!(rounds, 1 + STUCK_ROUNDS, "stuck rounds taken before the cut");
        assert!(rounds < MAX_ROUNDS);
    }
}
