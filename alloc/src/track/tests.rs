//! Tests of the trackers against real userfaultfd (run as root), a naive
//! oracle, and racing writers; plus an `#[ignore]`d measurement.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::sys::{page_size, raw_words_of, TestRegion};
use super::*;

fn ps() -> usize {
    page_size()
}

/// Writes `v` into `page`, at word `v % 512` of it (so faults do not all
/// hit page starts).
fn write(r: &TestRegion, page: u64, v: u64) {
    let word = (v as usize % (ps() / 8)) * 8;
    r.word(page as usize * ps() + word).store(v, Ordering::Relaxed);
}

fn write0(r: &TestRegion, page: u64, v: u64) {
    r.word(page as usize * ps()).store(v, Ordering::Relaxed);
}

fn read0(r: &TestRegion, page: u64) -> u64 {
    r.word(page as usize * ps()).load(Ordering::Relaxed)
}

fn build(mode: TrackMode, r: &TestRegion) -> Box<dyn Tracker> {
    TrackerBuilder::new(mode).build(r.base(), r.len()).unwrap_or_else(|e| panic!("{mode}: {e}"))
}

fn harvest(t: &dyn Tracker) -> Vec<u64> {
    let mut v = vec![1, 2, 3]; // harvest replaces, never appends
    t.harvest(&mut v).unwrap();
    v
}

const MODES: [TrackMode; 2] = [TrackMode::Precise, TrackMode::Fast];

#[test]
fn first_harvest_reports_every_page() {
    for mode in [TrackMode::Off, TrackMode::Precise, TrackMode::Fast] {
        let r = TestRegion::memfd(40 * ps(), false).unwrap();
        let t = build(mode, &r);
        assert_eq!(t.mode(), mode);
        assert_eq!((t.pages(), t.page_size()), (40, ps()));
        assert_eq!(harvest(&*t), (0..40).collect::<Vec<_>>(), "{mode}");
        let second = harvest(&*t);
        if mode == TrackMode::Off {
            assert_eq!(second.len(), 40);
        } else {
            assert!(second.is_empty(), "{mode}: {second:?}");
        }
    }
}

fn two_writers(mode: TrackMode, builder: TrackerBuilder) {
    let r = TestRegion::memfd(256 * ps(), true).unwrap();
    let t = builder.build(r.base(), r.len()).unwrap();
    assert_eq!(t.mode(), mode);
    t.protect_all().unwrap();
    assert!(harvest(&*t).is_empty(), "{mode}: clean after protect_all");
    let a: Vec<u64> = (0..130).step_by(3).collect();
    let b: Vec<u64> = (100..140).chain([255]).collect();
    thread::scope(|s| {
        for set in [&a, &b] {
            let r = &r;
            s.spawn(move || {
                for round in 0..2 {
                    for &p in set {
                        write(r, p, p * 10 + round);
                    }
                }
            });
        }
    });
    let expected: Vec<u64> = a.iter().chain(&b).copied().collect::<BTreeSet<_>>().into_iter().collect();
    assert_eq!(harvest(&*t), expected, "{mode}");
    assert!(harvest(&*t).is_empty(), "{mode}: second harvest");
    write(&r, 7, 1);
    write(&r, 255, 2);
    write(&r, 7, 3);
    assert_eq!(harvest(&*t), [7, 255], "{mode}: writes after a harvest");
    // Reads do not count.
    let _ = read0(&r, 9);
    assert!(harvest(&*t).is_empty(), "{mode}: reads");
}

#[test]
fn precise_two_writer_threads() {
    two_writers(TrackMode::Precise, TrackerBuilder::new(TrackMode::Precise));
}

#[test]
fn precise_two_writer_threads_blocking_fd() {
    two_writers(TrackMode::Precise, TrackerBuilder::new(TrackMode::Precise).non_blocking(false));
}

#[test]
fn fast_two_writer_threads() {
    two_writers(TrackMode::Fast, TrackerBuilder::new(TrackMode::Fast));
}

#[test]
fn precise_counts_faults_and_exposes_the_set() {
    let r = TestRegion::memfd(8 * ps(), true).unwrap();
    let t = TrackerBuilder::new(TrackMode::Precise).build_precise(r.base(), r.len()).unwrap();
    t.protect_all().unwrap();
    write(&r, 2, 1);
    write(&r, 2, 2);
    write(&r, 5, 3);
    let faults = t.faults_handled();
    assert_eq!(faults, 2, "faults");
    // The set is complete while the pages are still dirty (what F2 reads).
    assert!(t.dirty_set().contains(2) && t.dirty_set().contains(5) && !t.dirty_set().contains(3));
    assert_eq!(harvest(&t), [2, 5]);
    assert_eq!(t.dirty_set().count(), 0);
}

#[test]
fn precise_dirty_set_in_caller_storage() {
    let r = TestRegion::memfd(100 * ps(), true).unwrap();
    let words = OwnedWords::new(DirtyBitmap::words_for(100)).unwrap();
    let t = TrackerBuilder::new(TrackMode::Precise).build_precise_in(r.base(), r.len(), Box::new(words)).unwrap();
    t.protect_all().unwrap();
    write(&r, 99, 1);
    assert_eq!(t.dirty_set().words()[1].load(Ordering::Relaxed), 1 << (99 - 64));
    assert_eq!(harvest(&t), [99]);
    let small: Vec<std::sync::atomic::AtomicU64> = Vec::new();
    let e = TrackerBuilder::new(TrackMode::Precise).build_precise_in(r.base(), r.len(), Box::new(small));
    assert!(matches!(e, Err(TrackError::StorageTooSmall { need: 2, .. })));
}

#[test]
fn mark_dirty_is_merged() {
    for mode in MODES {
        let r = TestRegion::memfd(32 * ps(), true).unwrap();
        let t = build(mode, &r);
        t.protect_all().unwrap();
        t.mark_dirty(3, 2);
        write(&r, 10, 1);
        write(&r, 4, 1);
        assert_eq!(harvest(&*t), [3, 4, 10], "{mode}");
        assert!(harvest(&*t).is_empty());
    }
    let off = NoTracking::new(4, ps());
    off.mark_dirty(0, 4);
    assert_eq!(harvest(&off), [0, 1, 2, 3]);
}

/// More than 512 separate runs: the fast harvest needs several
/// PAGEMAP_SCAN calls (and meets the walk_end quirk); the precise one
/// re-protects many ranges.
#[test]
fn many_separate_runs() {
    for mode in MODES {
        let r = TestRegion::memfd(4096 * ps(), true).unwrap();
        let t = build(mode, &r);
        t.protect_all().unwrap();
        let pages: Vec<u64> = (0..4096).step_by(3).chain([4094, 4095]).collect::<BTreeSet<_>>().into_iter().collect();
        for &p in &pages {
            write0(&r, p, p);
        }
        assert_eq!(harvest(&*t), pages, "{mode}");
        assert!(harvest(&*t).is_empty(), "{mode}");
        // Everything dirty: a single run.
        for p in 0..4096 {
            write0(&r, p, p + 1);
        }
        assert_eq!(harvest(&*t).len(), 4096, "{mode}");
    }
}

#[test]
fn unpopulated_memfd_and_anonymous_memory() {
    for mode in MODES {
        for anon in [false, true] {
            let r = if anon { TestRegion::anon(64 * ps(), false) } else { TestRegion::memfd(64 * ps(), false) };
            let r = r.unwrap();
            let t = build(mode, &r);
            t.protect_all().unwrap();
            write(&r, 0, 1);
            write(&r, 33, 2);
            write(&r, 63, 3);
            assert_eq!(harvest(&*t), [0, 33, 63], "{mode} anon={anon}");
            write(&r, 33, 4);
            write(&r, 34, 5);
            assert_eq!(harvest(&*t), [33, 34], "{mode} anon={anon}");
        }
    }
}

/// Dropping a precise tracker with pages protected leaves the region
/// writable (the kernel clears the protection when the userfaultfd closes).
#[test]
fn drop_leaves_the_region_writable() {
    for mode in MODES {
        let r = TestRegion::memfd(16 * ps(), true).unwrap();
        let t = build(mode, &r);
        t.protect_all().unwrap();
        write(&r, 1, 1);
        drop(t);
        let (tx, rx) = mpsc::channel();
        thread::scope(|s| {
            let r = &r;
            s.spawn(move || {
                for p in 0..16 {
                    write0(r, p, 42);
                }
                tx.send(()).unwrap();
            });
            rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|_| panic!("{mode}: writer hung after drop"));
        });
        assert!((0..16).all(|p| read0(&r, p) == 42));
    }
}

#[test]
fn region_errors() {
    let b = TrackerBuilder::new(TrackMode::Fast);
    let r = TestRegion::memfd(4 * ps(), true).unwrap();
    let odd = r.base().wrapping_add(8);
    assert!(matches!(b.build(odd, ps()), Err(TrackError::Misaligned { .. })));
    assert!(matches!(b.build(r.base(), 0), Err(TrackError::Misaligned { .. })));
    assert!(matches!(b.build(r.base(), ps() + 1), Err(TrackError::Misaligned { .. })));
    // Below mmap_min_addr: never mapped.
    let low = ps() as *mut u8;
    for mode in MODES {
        let e = TrackerBuilder::new(mode).build(low, ps()).unwrap_err();
        assert!(matches!(e, TrackError::Register { .. }), "{mode}: {e}");
    }
}

// ---------------------------------------------------------------------------
// Clever path = naive oracle
// ---------------------------------------------------------------------------

const ORACLE_PAGES: u64 = 48;

#[derive(Clone, Debug)]
enum Op {
    Write(u64),
    Mark(u64),
    Harvest,
    ProtectAll,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..ORACLE_PAGES).prop_map(Op::Write),
        1 => (0..ORACLE_PAGES).prop_map(Op::Mark),
        3 => Just(Op::Harvest),
        1 => Just(Op::ProtectAll),
    ]
}

fn oracle_check(mode: TrackMode, populated: bool, ops: &[Op]) -> std::result::Result<(), TestCaseError> {
    let r = TestRegion::memfd(ORACLE_PAGES as usize * ps(), populated).unwrap();
    let t = build(mode, &r);
    t.protect_all().unwrap();
    let mut shadow = BTreeSet::new();
    let mut out = Vec::new();
    for (v, op) in ops.iter().enumerate() {
        match *op {
            Op::Write(p) => {
                write(&r, p, v as u64 + 1);
                shadow.insert(p);
            }
            Op::Mark(p) => {
                t.mark_dirty(p, 1);
                shadow.insert(p);
            }
            Op::Harvest => {
                t.harvest(&mut out).unwrap();
                prop_assert_eq!(&out, &shadow.iter().copied().collect::<Vec<_>>());
                shadow.clear();
            }
            Op::ProtectAll => {
                t.protect_all().unwrap();
                shadow.clear();
            }
        }
    }
    t.harvest(&mut out).unwrap();
    prop_assert_eq!(&out, &shadow.into_iter().collect::<Vec<_>>());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn precise_matches_naive_oracle(populated in any::<bool>(), ops in prop::collection::vec(op_strategy(), 1..60)) {
        oracle_check(TrackMode::Precise, populated, &ops)?;
    }

    #[test]
    fn fast_matches_naive_oracle(populated in any::<bool>(), ops in prop::collection::vec(op_strategy(), 1..60)) {
        oracle_check(TrackMode::Fast, populated, &ops)?;
    }
}

// ---------------------------------------------------------------------------
// Racing writers
// ---------------------------------------------------------------------------

/// Two writers store ever-increasing counters into random pages while the
/// harvester harvests in a loop and copies every reported page (as the
/// flusher would). At the end every page must equal its last copy: a write
/// that landed after a page's last harvest without being reported would
/// leave the copy stale.
fn no_write_is_lost(mode: TrackMode, run_for: Duration) {
    const PAGES: u64 = 64;
    let r = TestRegion::memfd(PAGES as usize * ps(), true).unwrap();
    let t = build(mode, &r);
    t.protect_all().unwrap();
    let mut copy: Vec<u64> = (0..PAGES).map(|p| read0(&r, p)).collect();
    let stop = AtomicBool::new(false);
    let (mut harvests, mut reported) = (0u64, 0u64);
    let mut out = Vec::new();
    thread::scope(|s| {
        for w in 0..2u64 {
            let (r, stop) = (&r, &stop);
            s.spawn(move || {
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (w + 1);
                let mut ctr = (w << 56) | 1;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    write0(r, x % PAGES, ctr);
                    ctr += 1;
                }
            });
        }
        let deadline = Instant::now() + run_for;
        while Instant::now() < deadline {
            t.harvest(&mut out).unwrap();
            for &p in &out {
                copy[p as usize] = read0(&r, p);
            }
            harvests += 1;
            reported += out.len() as u64;
        }
        stop.store(true, Ordering::Relaxed);
    });
    t.harvest(&mut out).unwrap();
    for &p in &out {
        copy[p as usize] = read0(&r, p);
    }
    for p in 0..PAGES {
        assert_eq!(
            copy[p as usize],
            read0(&r, p),
            "{mode}: page {p} changed after its last harvest but was not reported"
        );
    }
    assert!(harvests > 10 && reported > 10, "{mode}: {harvests} harvests, {reported} pages");
}

#[test]
fn precise_no_write_is_lost_under_concurrent_harvests() {
    no_write_is_lost(TrackMode::Precise, Duration::from_millis(700));
}

#[test]
fn fast_no_write_is_lost_under_concurrent_harvests() {
    no_write_is_lost(TrackMode::Fast, Duration::from_millis(700));
}

// ---------------------------------------------------------------------------
// Two epochs: harvest_into a closing bitmap
// ---------------------------------------------------------------------------

/// A stand-in for the shared control region: `words` zeroed words that
/// live for the rest of the process (a leaked private mapping).
fn control_region(words: usize) -> &'static [AtomicU64] {
    let w: &'static OwnedWords = Box::leak(Box::new(OwnedWords::new(words).unwrap()));
    w
}

/// A bitmap of `pages` pages over `words[..]` of a control region.
fn bitmap_in(words: &'static [AtomicU64], pages: u64) -> DirtyBitmap {
    DirtyBitmap::with_store(Box::new(raw_words_of(words)), pages).unwrap()
}

fn pages_of(b: &DirtyBitmap) -> Vec<u64> {
    let mut v = vec![];
    b.collect_into(&mut v);
    v
}

/// The current set as a list: the bitmap (precise) or a non-taking scan (fast).
fn current_pages(t: &dyn Tracker, fast: Option<&FastTracker>) -> Vec<u64> {
    let mut v = vec![];
    match (t.current_set(), fast) {
        (Some(b), _) => b.collect_into(&mut v),
        (None, Some(f)) => f.peek_into(&mut v).unwrap(),
        (None, None) => unreachable!("no way to read the current set"),
    }
    v
}

#[test]
fn harvest_into_moves_pages_into_closing() {
    const PAGES: u64 = 200;
    let w = DirtyBitmap::words_for(PAGES);
    for mode in MODES {
        let r = TestRegion::memfd(PAGES as usize * ps(), true).unwrap();
        let ctl = control_region(2 * w + 1);
        let closing = bitmap_in(&ctl[1..1 + w], PAGES);
        let (precise, fast) = match mode {
            TrackMode::Precise => {
                let store = Box::new(raw_words_of(&ctl[1 + w..]));
                (Some(TrackerBuilder::new(mode).build_precise_in(r.base(), r.len(), store).unwrap()), None)
            }
            _ => (None, Some(TrackerBuilder::new(mode).build_fast(r.base(), r.len()).unwrap())),
        };
        let fast_ref = fast.as_ref();
        let t: &dyn Tracker = match (&precise, &fast) {
            (Some(p), _) => p,
            (_, Some(f)) => f,
            _ => unreachable!(),
        };
        match t.current_set() {
            // The owner of the control region finds the current set where it put it.
            Some(cur) => assert_eq!(cur.offset_in(ctl.as_ptr().cast(), ctl.len() * 8), Some((1 + w) * 8)),
            None => assert_eq!(mode, TrackMode::Fast),
        }
        // A new tracker: every page moves.
        let mut out = vec![7];
        t.harvest_into(&closing, &mut out).unwrap();
        assert_eq!(out, (0..PAGES).collect::<Vec<_>>(), "{mode}");
        assert_eq!(closing.count(), PAGES, "{mode}");
        closing.clear();
        t.protect_all().unwrap();
        for p in [0, 63, 64, 150, 199] {
            write(&r, p, p + 1);
        }
        t.mark_dirty(10, 3);
        if mode == TrackMode::Fast {
            assert_eq!(current_pages(t, fast_ref), [0, 10, 11, 12, 63, 64, 150, 199]);
        }
        closing.set(100); // left over from an uncommitted flush: kept
        t.harvest_into(&closing, &mut out).unwrap();
        assert_eq!(out, [0, 10, 11, 12, 63, 64, 150, 199], "{mode}");
        assert_eq!(pages_of(&closing), [0, 10, 11, 12, 63, 64, 100, 150, 199], "{mode}");
        assert!(current_pages(t, fast_ref).is_empty(), "{mode}");
        // Re-protected: the next write is seen again, in the current set.
        write(&r, 64, 9);
        assert_eq!(current_pages(t, fast_ref), [64], "{mode}");
        assert_eq!(harvest(t), [64], "{mode}");
        assert_eq!(closing.count(), 9, "{mode}: plain harvest leaves closing alone");

        let wrong = DirtyBitmap::new(PAGES + 1).unwrap();
        let e = t.harvest_into(&wrong, &mut out).unwrap_err();
        assert!(matches!(e, TrackError::ClosingSizeMismatch { closing: 201, pages: 200 }), "{mode}: {e}");
        if mode == TrackMode::Precise {
            let alias = bitmap_in(&ctl[1 + w..], PAGES);
            assert!(matches!(t.harvest_into(&alias, &mut out), Err(TrackError::ClosingAliasesCurrent)));
        }
    }
    let off = NoTracking::new(70, ps());
    let closing = DirtyBitmap::new(70).unwrap();
    let mut out = vec![];
    off.harvest_into(&closing, &mut out).unwrap();
    assert_eq!((out.len(), closing.count()), (70, 70));
    assert!(off.current_set().is_none());
}

/// The writer's side of a pause handshake: a checker raises `req`, waits
/// for `paused`, compares memory, lowers `req` and waits for `paused` to
/// drop again. The writer only looks at `req` between two writes, so while
/// it is paused every one of its writes is complete (and, in precise mode,
/// its fault handled).
#[derive(Default)]
struct Pause {
    req: AtomicBool,
    paused: AtomicBool,
    /// Set by the writer when it leaves (it counts as paused for ever).
    gone: AtomicBool,
}

impl Pause {
    fn hold(&self) {
        self.req.store(true, Ordering::SeqCst);
        while !self.paused.load(Ordering::SeqCst) && !self.gone.load(Ordering::SeqCst) {
            thread::yield_now();
        }
    }

    fn release(&self) {
        self.req.store(false, Ordering::SeqCst);
        while self.paused.load(Ordering::SeqCst) && !self.gone.load(Ordering::SeqCst) {
            thread::yield_now();
        }
    }
}

struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    fn next(&mut self) -> u64 {
        let x = &mut self.0;
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Writes ever-increasing counters into word 0 of random pages (1 in 16
/// also reported with `mark_dirty`, as a DMA completion would be) until
/// `stop`, pausing on request. After each write completes, its counter is published in `shadow[page]`
/// (counters only grow, so a page's memory and shadow only grow too).
fn epoch_writer(r: &TestRegion, t: &dyn Tracker, shadow: &[AtomicU64], seed: u64, stop: &AtomicBool, pause: &Pause) {
    let pages = shadow.len() as u64;
    let mut rng = XorShift::new(seed);
    let mut ctr = 1u64;
    while !stop.load(Ordering::SeqCst) {
        if pause.req.load(Ordering::SeqCst) {
            pause.paused.store(true, Ordering::SeqCst);
            while pause.req.load(Ordering::SeqCst) {
                thread::yield_now();
            }
            pause.paused.store(false, Ordering::SeqCst);
            continue;
        }
        let x = rng.next();
        let p = x % pages;
        write0(r, p, ctr);
        if x >> 60 == 0 {
            t.mark_dirty(p, 1);
        }
        shadow[p as usize].store(ctr, Ordering::Release);
        ctr += 1;
    }
    pause.gone.store(true, Ordering::SeqCst);
}

/// With the writer paused: every page whose word 0 differs from its last
/// committed copy must be in `current` or in `closing` (sorted lists).
fn union_covers(
    r: &TestRegion,
    committed: &[u64],
    current: &[u64],
    closing: &[u64],
) -> std::result::Result<(), String> {
    for (p, &c) in committed.iter().enumerate() {
        let p = p as u64;
        let now = read0(r, p);
        if now != c && current.binary_search(&p).is_err() && closing.binary_search(&p).is_err() {
            return Err(format!("page {p} holds {now}, committed {c}, but is in neither the current set nor closing"));
        }
    }
    Ok(())
}

/// Without pausing the writer: every page whose last completed write
/// (`seen`, loaded before the two sets) is newer than its committed copy
/// must be in `current` or in `closing` (sorted lists).
fn shadow_covered(
    seen: &[u64],
    committed: &[u64],
    current: &[u64],
    closing: &[u64],
) -> std::result::Result<(), String> {
    for (p, (&v, &c)) in seen.iter().zip(committed).enumerate() {
        let p = p as u64;
        if v > c && current.binary_search(&p).is_err() && closing.binary_search(&p).is_err() {
            return Err(format!(
                "page {p}: a completed write of {v} is newer than the committed {c}, \
                 but the page is in neither the current set nor closing"
            ));
        }
    }
    Ok(())
}

fn bits_of(words: &[AtomicU64]) -> Vec<u64> {
    let mut v = vec![];
    for (i, w) in words.iter().enumerate() {
        bitmap::push_bits(&mut v, i, w.load(Ordering::Acquire));
    }
    v
}

/// Spins (yielding) for about `us` microseconds.
fn pause_for(us: u64) {
    let until = Instant::now() + Duration::from_micros(us);
    while Instant::now() < until {
        thread::yield_now();
    }
}

#[derive(Debug, Default)]
struct EpochStats {
    harvests: u64,
    moved: u64,
    checks: u64,
    checks_mid_harvest: u64,
    /// Checks made without pausing the writer (precise mode).
    unpaused_checks: u64,
}

/// Precise mode, three threads: a writer; a flusher that loops
/// `harvest_into` → copy the harvested pages into a staging area → commit
/// (install the staged copies as the committed image and clear `closing`,
/// one step under `committed`'s lock); and a checker that, at random
/// instants (in the middle of harvests too), pauses the writer and checks
/// that the current set ∪ `closing` covers every page that differs from the
/// committed image. Both bitmaps live in one "control region" given as raw
/// words. The checker reads the current set before `closing`, word by word,
/// as a remote reader would; commits are excluded by the lock, harvests
/// are not.
///
/// Pausing the writer rarely lands inside a harvest (the writer is then
/// mostly blocked in a fault that waits for the harvest's lock), so two
/// thirds of the checks do not pause it: they read the writer's shadow
/// (the last *completed* write per page), then the current set, then
/// `closing`. A completed write of `v` to `p` that the committed image
/// lacks (`committed[p] < v`) must have `p` in the union: its bit was set
/// before the write completed, and the only step that drops it, a commit,
/// installs a copy taken after `p` was re-protected, i.e. `>= v`. Half of
/// those unpaused checks wait for a harvest to start and check at once.
/// Harvest rounds the two-epoch tests run at least, however slow the machine.
const MIN_ROUNDS: u64 = 8;

fn precise_two_epochs(
    seed: u64,
    pages: u64,
    max_gap_us: u64,
    run_for: Duration,
) -> std::result::Result<EpochStats, String> {
    let r = TestRegion::memfd(pages as usize * ps(), true).unwrap();
    let w = DirtyBitmap::words_for(pages);
    let ctl = control_region(2 * w);
    let closing = bitmap_in(&ctl[..w], pages);
    let t = TrackerBuilder::new(TrackMode::Precise)
        .build_precise_in(r.base(), r.len(), Box::new(raw_words_of(&ctl[w..])))
        .unwrap();
    t.protect_all().unwrap();
    let current = t.current_set().unwrap();
    assert_eq!(current.offset_in(ctl.as_ptr().cast(), ctl.len() * 8), Some(w * 8));

    let committed = Mutex::new((0..pages).map(|p| read0(&r, p)).collect::<Vec<u64>>());
    let shadow: Vec<AtomicU64> = (0..pages).map(|_| AtomicU64::new(0)).collect();
    let shadow = &shadow[..];
    let (stop, pause, harvesting) = (AtomicBool::new(false), Pause::default(), AtomicBool::new(false));
    let failure = Mutex::new(None::<String>);
    let fail = |m: String| {
        failure.lock().unwrap().get_or_insert(m);
        stop.store(true, Ordering::SeqCst);
    };
    let mut st = EpochStats::default();
    let (mut checks, mut mid, mut unpaused) = (0, 0, 0);
    thread::scope(|s| {
        let (r, t, stop, pause) = (&r, &t, &stop, &pause);
        s.spawn(move || epoch_writer(r, t, shadow, seed, stop, pause));
        let checker = s.spawn(|| {
            let mut rng = XorShift::new(seed.rotate_left(17) ^ 0x5555);
            let (mut checks, mut mid, mut unpaused) = (0u64, 0u64, 0u64);
            let mut seen = Vec::with_capacity(pages as usize);
            while !stop.load(Ordering::SeqCst) {
                let kind = rng.below(3);
                if kind == 2 {
                    // Aim at the start of a harvest (give up after ~1 ms).
                    let until = Instant::now() + Duration::from_millis(1);
                    while !harvesting.load(Ordering::SeqCst) && Instant::now() < until {
                        std::hint::spin_loop();
                    }
                } else {
                    pause_for(rng.below(max_gap_us));
                }
                if kind == 0 {
                    pause.hold();
                }
                {
                    let committed = committed.lock().unwrap();
                    let during = harvesting.load(Ordering::SeqCst);
                    seen.clear();
                    seen.extend(shadow.iter().map(|v| v.load(Ordering::Acquire)));
                    let cur = bits_of(current.words()); // current first, then closing
                    let clo = bits_of(closing.words());
                    let during = during && harvesting.load(Ordering::SeqCst);
                    let res = if kind == 0 {
                        union_covers(r, &committed, &cur, &clo)
                    } else {
                        shadow_covered(&seen, &committed, &cur, &clo)
                    };
                    if let Err(m) = res {
                        fail(format!("check {checks} (writer paused: {}, mid-harvest: {during}): {m}", kind == 0));
                    }
                    checks += 1;
                    mid += u64::from(during);
                    unpaused += u64::from(kind != 0);
                }
                if kind == 0 {
                    pause.release();
                }
            }
            (checks, mid, unpaused)
        });
        let deadline = Instant::now() + run_for;
        let mut rng = XorShift::new(seed ^ 0xABCD);
        let (mut out, mut staged) = (Vec::new(), Vec::new());
        // Run for `run_for`, and on a loaded machine until enough rounds
        // happened (the assertions count rounds, never time).
        while (Instant::now() < deadline || st.harvests < MIN_ROUNDS) && !stop.load(Ordering::SeqCst) {
            harvesting.store(true, Ordering::SeqCst);
            let res = t.harvest_into(&closing, &mut out);
            harvesting.store(false, Ordering::SeqCst);
            if let Err(e) = res {
                fail(format!("harvest_into: {e}"));
                break;
            }
            // `closing` was empty (committed each round): it is what was taken.
            if pages_of(&closing) != out {
                fail(format!("closing {:?} != harvested {out:?}", pages_of(&closing)));
                break;
            }
            staged.clear();
            staged.extend(out.iter().map(|&p| (p, read0(r, p))));
            pause_for(rng.below(max_gap_us)); // the write + fsync
            let mut c = committed.lock().unwrap();
            for &(p, v) in &staged {
                c[p as usize] = v;
            }
            closing.clear();
            drop(c);
            st.harvests += 1;
            st.moved += out.len() as u64;
            pause_for(rng.below(max_gap_us));
        }
        stop.store(true, Ordering::SeqCst);
        (checks, mid, unpaused) = checker.join().unwrap();
    });
    if let Some(m) = failure.into_inner().unwrap() {
        return Err(m);
    }
    // Writer stopped: one last flush leaves the committed image equal to memory.
    let mut out = vec![];
    t.harvest_into(&closing, &mut out).unwrap();
    let mut c = committed.into_inner().unwrap();
    for &p in &out {
        c[p as usize] = read0(&r, p);
    }
    union_covers(&r, &c, &[], &[])?;
    st.checks = checks;
    st.checks_mid_harvest = mid;
    st.unpaused_checks = unpaused;
    Ok(st)
}

/// Fast mode, two threads: a writer, and a flusher that loops
/// `harvest_into` → stage copies → commit, and checks with the writer
/// paused (a) right after each harvest (the writer having run during it,
/// or paused throughout, when `closing` alone must cover), (b) at a random
/// instant between harvests. The current set is read with
/// `FastTracker::peek_into` (page tables + marked pages); there is no
/// check in the middle of a harvest: that is the window where a batch is
/// only in the scan buffer.
fn fast_two_epochs(
    seed: u64,
    pages: u64,
    max_gap_us: u64,
    run_for: Duration,
) -> std::result::Result<EpochStats, String> {
    let r = TestRegion::memfd(pages as usize * ps(), true).unwrap();
    let w = DirtyBitmap::words_for(pages);
    let ctl = control_region(w);
    let closing = bitmap_in(ctl, pages);
    let t = TrackerBuilder::new(TrackMode::Fast).build_fast(r.base(), r.len()).unwrap();
    t.protect_all().unwrap();
    let mut committed: Vec<u64> = (0..pages).map(|p| read0(&r, p)).collect();
    let shadow: Vec<AtomicU64> = (0..pages).map(|_| AtomicU64::new(0)).collect();
    let shadow = &shadow[..];
    let (stop, pause) = (AtomicBool::new(false), Pause::default());
    let mut st = EpochStats::default();
    let result = thread::scope(|s| {
        let (r, t, stop, pause) = (&r, &t, &stop, &pause);
        s.spawn(move || epoch_writer(r, t, shadow, seed, stop, pause));
        let res = (|| {
            let deadline = Instant::now() + run_for;
            let mut rng = XorShift::new(seed ^ 0xF00D);
            let (mut out, mut cur, mut staged) = (Vec::new(), Vec::new(), Vec::new());
            let check = |cur: &mut Vec<u64>, committed: &[u64], what: &str, st: &mut EpochStats| {
                t.peek_into(cur).map_err(|e| e.to_string())?;
                st.checks += 1;
                union_covers(r, committed, cur, &pages_of(&closing)).map_err(|m| format!("{what}: {m}"))
            };
            while Instant::now() < deadline || st.harvests < MIN_ROUNDS {
                let quiet = rng.below(4) == 0;
                if quiet {
                    pause.hold();
                }
                t.harvest_into(&closing, &mut out).map_err(|e| e.to_string())?;
                if !quiet {
                    pause.hold();
                }
                if pages_of(&closing) != out {
                    pause.release();
                    return Err(format!("closing {:?} != harvested {out:?}", pages_of(&closing)));
                }
                let res = check(&mut cur, &committed, "right after a harvest", &mut st);
                if quiet && res.is_ok() && !cur.is_empty() {
                    pause.release();
                    return Err(format!("writer paused throughout, yet {cur:?} remain after the harvest"));
                }
                pause.release();
                res?;
                staged.clear();
                staged.extend(out.iter().map(|&p| (p, read0(r, p))));
                pause_for(rng.below(max_gap_us));
                for &(p, v) in &staged {
                    committed[p as usize] = v;
                }
                closing.clear();
                st.harvests += 1;
                st.moved += out.len() as u64;
                pause_for(rng.below(max_gap_us));
                pause.hold();
                let res = check(&mut cur, &committed, "between harvests", &mut st);
                pause.release();
                res?;
            }
            Ok(())
        })();
        stop.store(true, Ordering::SeqCst);
        res
    });
    result?;
    let mut out = vec![];
    t.harvest_into(&closing, &mut out).unwrap();
    for &p in &out {
        committed[p as usize] = read0(&r, p);
    }
    union_covers(&r, &committed, &[], &[])?;
    Ok(st)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3, max_shrink_iters: 8, ..ProptestConfig::default() })]

    /// Precise mode: current ∪ closing covers every page changed since the
    /// last commit, at random instants, harvests in progress included.
    #[test]
    fn precise_two_epochs_stay_complete(seed in any::<u64>(), pages in 16u64..1200, max_gap_us in 1u64..300) {
        let st = precise_two_epochs(seed, pages, max_gap_us, Duration::from_millis(700)).map_err(TestCaseError::fail)?;
        eprintln!("precise two epochs, {pages} pages, gaps < {max_gap_us} µs: {st:?}");
        // The checker thread's rate depends on the machine's load: it must
        // have run, however often.
        prop_assert!(st.harvests >= MIN_ROUNDS && st.moved > 5 && st.checks > 0, "{:?}", st);
    }

    /// Fast mode: current (page tables + marked) ∪ closing covers every
    /// page changed since the last commit, right after each harvest and
    /// between harvests.
    #[test]
    fn fast_two_epochs_stay_complete(seed in any::<u64>(), pages in 16u64..1200, max_gap_us in 1u64..300) {
        let st = fast_two_epochs(seed, pages, max_gap_us, Duration::from_millis(700)).map_err(TestCaseError::fail)?;
        eprintln!("fast two epochs, {pages} pages, gaps < {max_gap_us} µs: {st:?}");
        prop_assert!(st.harvests >= MIN_ROUNDS && st.moved > 5 && st.checks >= 2 * MIN_ROUNDS, "{:?}", st);
    }
}

// ---------------------------------------------------------------------------
// Measurement
// ---------------------------------------------------------------------------

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ns_per(t: Instant, n: usize) -> f64 {
    t.elapsed().as_nanos() as f64 / n as f64
}

/// First-write cost per page and harvest cost, precise and fast vs
/// untracked, on a 64 MiB memfd mapping:
/// `cargo test --release -p remem-alloc track::tests::measure -- --ignored --nocapture`
#[test]
#[ignore = "measurement; run with --release --ignored --nocapture"]
fn measure() {
    let len = 64 << 20;
    let pages = (len / ps()) as u64;
    let reps = 5;
    let dirty1: Vec<u64> = (0..pages).step_by(100).collect(); // 1 % strided
    println!("# {} MiB memfd MAP_SHARED, {pages} pages of {} B, median of {reps}", len >> 20, ps());

    let (mut fresh, mut plain) = (vec![], vec![]);
    for _ in 0..reps {
        let r = TestRegion::memfd(len, false).unwrap();
        let t0 = Instant::now();
        (0..pages).for_each(|p| write0(&r, p, 1));
        fresh.push(ns_per(t0, pages as usize));
        let t0 = Instant::now();
        (0..pages).for_each(|p| write0(&r, p, 2));
        plain.push(ns_per(t0, pages as usize));
    }
    println!("{:<20} first touch of a fresh memfd page  {:>10.1} ns/page", "untracked", median(fresh));
    println!("{:<20} write to a populated page          {:>10.1} ns/page", "untracked", median(plain));

    let variants = [
        ("precise", TrackerBuilder::new(TrackMode::Precise)),
        ("precise/blocking-fd", TrackerBuilder::new(TrackMode::Precise).non_blocking(false)),
        ("fast", TrackerBuilder::new(TrackMode::Fast)),
    ];
    for (mode, builder) in variants {
        let r = TestRegion::memfd(len, true).unwrap();
        let t = builder.build(r.base(), r.len()).unwrap();
        let mut out = Vec::with_capacity(pages as usize);
        let (mut prot, mut first, mut second, mut h_all, mut h_clean, mut h_1) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for rep in 0..reps {
            let t0 = Instant::now();
            t.protect_all().unwrap();
            prot.push(ns_per(t0, pages as usize));
            let t0 = Instant::now();
            (0..pages).for_each(|p| write0(&r, p, rep + 3));
            first.push(ns_per(t0, pages as usize));
            let t0 = Instant::now();
            (0..pages).for_each(|p| write0(&r, p, rep + 4));
            second.push(ns_per(t0, pages as usize));
            let t0 = Instant::now();
            t.harvest(&mut out).unwrap();
            h_all.push(t0.elapsed().as_secs_f64() * 1e3);
            assert_eq!(out.len() as u64, pages);
            let t0 = Instant::now();
            t.harvest(&mut out).unwrap();
            h_clean.push(t0.elapsed().as_secs_f64() * 1e3);
            assert!(out.is_empty());
            dirty1.iter().for_each(|&p| write0(&r, p, rep));
            let t0 = Instant::now();
            t.harvest(&mut out).unwrap();
            h_1.push(ns_per(t0, dirty1.len()));
            assert_eq!(out, dirty1);
        }
        println!("{mode:<20} protect_all                        {:>10.1} ns/page", median(prot));
        println!("{mode:<20} first write after protect          {:>10.1} ns/page", median(first));
        println!("{mode:<20} second write                       {:>10.1} ns/page", median(second));
        let all = median(h_all);
        println!(
            "{mode:<20} harvest, 100 % dirty               {all:>10.3} ms ({:.1} ns/dirty page)",
            all * 1e6 / pages as f64
        );
        println!("{mode:<20} harvest, clean                     {:>10.3} ms", median(h_clean));
        println!("{mode:<20} harvest, 1 % dirty (strided)       {:>10.1} ns/dirty page", median(h_1));
    }
}
