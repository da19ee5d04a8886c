//! Tests of the trackers against real userfaultfd (run as root), a naive
//! oracle, and racing writers; plus an `#[ignore]`d measurement.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::sys::{page_size, TestRegion};
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
