//! Flushes to the baseline: the baseline equals a naive copy of the heap
//! at every flush point (every tracking mode), a crash at every sync of a
//! flush leaves the previous or the new flush and never a mix, a failed
//! sync poisons durability, and the dirty lists always cover every page
//! that differs from the baseline.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use proptest::prelude::*;
use remem::alloc::baseline::{Baseline, FaultyBackend, Persist, SyncFault};
use remem::alloc::{FlushError, TrackMode};
use remem::{Heap, HeapOptions};

const PAGE: usize = 4096;

fn opts(mode: TrackMode) -> HeapOptions {
    HeapOptions::new(4 << 20).tracking(mode).flush_interval(None)
}

/// The heap's memory, byte for byte.
fn snapshot(heap: &Heap) -> Vec<u8> {
    // SAFETY: the heap maps `size` bytes at `base`; no thread writes meanwhile.
    unsafe { std::slice::from_raw_parts(heap.base(), heap.size() as usize) }.to_vec()
}

/// What a host that opened the durable bytes would load (before recovery).
fn durable(backend: &FaultyBackend) -> Vec<u8> {
    let b = Baseline::open(FaultyBackend::from_image(backend.durable_image())).unwrap();
    let mut out = vec![0u8; b.heap_size() as usize];
    b.load_into(&mut out).unwrap();
    out
}

fn differing_pages(a: &[u8], b: &[u8]) -> Vec<u64> {
    a.chunks(PAGE).zip(b.chunks(PAGE)).enumerate().filter(|(_, (x, y))| x != y).map(|(i, _)| i as u64).collect()
}

#[derive(Debug, Clone)]
enum Op {
    Write { page: usize, at: usize, byte: u8 },
    Alloc(usize),
    Free(usize),
    Tx { page: usize, byte: u8 },
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..32, 0usize..PAGE, any::<u8>()).prop_map(|(page, at, byte)| Op::Write { page, at, byte }),
        2 => (1usize..20_000).prop_map(Op::Alloc),
        1 => any::<usize>().prop_map(Op::Free),
        1 => (0usize..32, any::<u8>()).prop_map(|(page, byte)| Op::Tx { page, byte }),
        2 => Just(Op::Flush),
    ]
}

fn run_model(mode: TrackMode, ops: &[Op]) -> Result<(), TestCaseError> {
    let backend = FaultyBackend::new();
    let heap = Heap::create_on(Arc::new(backend.clone()), &opts(mode)).unwrap();
    let area = heap.alloc_zeroed(32 * PAGE).unwrap();
    let mut blocks = Vec::new();
    let mut flushes = 0;
    for op in ops.iter().chain([&Op::Flush]) {
        match *op {
            Op::Write { page, at, byte } => {
                // SAFETY: inside the 32-page block.
                unsafe { area.as_ptr().add(page * PAGE + at).write(byte) };
            }
            Op::Alloc(n) => blocks.push(heap.alloc(n).unwrap()),
            Op::Free(i) if !blocks.is_empty() => heap.free(blocks.swap_remove(i % blocks.len())).unwrap(),
            Op::Tx { page, byte } => {
                // SAFETY: inside the block.
                let p = unsafe { area.as_ptr().add(page * PAGE) };
                heap.tx(|tx| {
                    tx.add_range(p, 64)?;
                    // SAFETY: as above.
                    unsafe { std::ptr::write_bytes(p, byte, 64) };
                    Ok::<_, remem::alloc::TxError>(())
                })
                .unwrap();
            }
            Op::Flush => {
                heap.flush().unwrap();
                flushes += 1;
                let mem = snapshot(&heap);
                let base = durable(&backend);
                prop_assert!(
                    mem == base,
                    "{mode:?}: after flush {flushes} pages {:?} differ",
                    differing_pages(&mem, &base)
                );
            }
            Op::Free(_) => {}
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
    #[test]
    fn baseline_equals_naive_copy_at_every_flush_fast(ops in proptest::collection::vec(op(), 1..80)) {
        run_model(TrackMode::Fast, &ops)?;
    }

    #[test]
    fn baseline_equals_naive_copy_at_every_flush_precise(ops in proptest::collection::vec(op(), 1..80)) {
        run_model(TrackMode::Precise, &ops)?;
    }

    #[test]
    fn baseline_equals_naive_copy_at_every_flush_untracked(ops in proptest::collection::vec(op(), 1..40)) {
        run_model(TrackMode::Off, &ops)?;
    }
}

/// A heap with one committed flush (state A) and uncommitted changes
/// (state B, the memory now).
fn two_states(backend: &FaultyBackend) -> (Heap, Vec<u8>, Vec<u8>) {
    let heap = Heap::create_on(Arc::new(backend.clone()), &opts(TrackMode::Fast)).unwrap();
    let (root, _) = heap.root_or_alloc(64 * PAGE).unwrap();
    // SAFETY: the root block is 64 pages.
    unsafe { std::ptr::write_bytes(root.as_ptr(), 0xa1, 64 * PAGE) };
    heap.flush().unwrap();
    let a = snapshot(&heap);
    // SAFETY: as above.
    unsafe { std::ptr::write_bytes(root.as_ptr().add(PAGE), 0xb2, 40 * PAGE) };
    for _ in 0..50 {
        heap.alloc(300).unwrap();
    }
    let b = snapshot(&heap);
    (heap, a, b)
}

#[test]
fn a_crash_at_any_sync_of_a_flush_leaves_the_old_or_the_new_flush() {
    // How many syncs does a flush take?
    let probe = FaultyBackend::new();
    let (heap, _, _) = two_states(&probe);
    let before = probe.sync_count();
    heap.flush().unwrap();
    let syncs = probe.sync_count() - before;
    drop(heap);
    assert!(syncs >= 2, "a flush syncs data, then its commit record");
    let (mut old, mut new) = (0, 0);
    for k in 0..syncs {
        for (i, persist) in
            [Persist::Nothing, Persist::Everything, Persist::Torn { seed: k + 7 }].into_iter().enumerate()
        {
            let backend = FaultyBackend::new();
            let (heap, a, b) = two_states(&backend);
            backend.fault_at_sync(k, SyncFault::Crash(persist));
            assert!(heap.flush().is_err(), "sync {k} crashed, yet the flush reported success");
            let got = durable(&backend);
            if got == a {
                old += 1;
            } else if got == b {
                new += 1;
            } else {
                panic!(
                    "crash at sync {k} ({persist:?}): the baseline is neither flush (pages {:?} differ from the old)",
                    differing_pages(&got, &a)
                );
            }
            // The crashed "host" is gone; another opens the durable bytes.
            drop(heap);
            let reopened =
                Heap::open_on(Arc::new(FaultyBackend::from_image(backend.durable_image())), &opts(TrackMode::Fast))
                    .unwrap();
            assert!(reopened.check().is_ok(), "crash {k}/{i}: {}", reopened.check());
            assert!(reopened.opened_from().is_some());
        }
    }
    assert!(old > 0 && new > 0, "both outcomes occur: old {old}, new {new}");
}

#[test]
fn a_failed_sync_poisons_durability() {
    let backend = FaultyBackend::new();
    let (heap, a, _) = two_states(&backend);
    backend.fault_at_sync(0, SyncFault::Eio(Persist::Nothing));
    let e = heap.flush().unwrap_err();
    assert!(matches!(e, FlushError::Baseline(_)), "{e}");
    // Never retried over: every later flush is refused, and says why.
    let again = heap.flush().unwrap_err();
    assert!(matches!(again, FlushError::Poisoned(_)), "{again}");
    assert!(again.to_string().contains("reopen"), "{again}");
    assert!(heap.flush_stats().unwrap().poisoned.is_some());
    assert!(matches!(heap.wait_durable(heap.current_epoch().unwrap()), Err(FlushError::Poisoned(_))));
    assert_eq!(durable(&backend), a, "the baseline keeps the last commit");
}

/// Precise mode: at every instant (sampled while a writer runs and flushes
/// happen), every page that differs from the baseline is in the lists.
#[test]
fn dirty_lists_cover_every_changed_page_precise_at_every_instant() {
    dirty_lists_cover(TrackMode::Precise, false);
}

/// Fast mode: right after each harvest (flush), with the writer stopped.
#[test]
fn dirty_lists_cover_every_changed_page_fast_at_every_harvest() {
    dirty_lists_cover(TrackMode::Fast, true);
}

fn dirty_lists_cover(mode: TrackMode, pause_for_flush: bool) {
    let backend = FaultyBackend::new();
    let heap = Arc::new(Heap::create_on(Arc::new(backend.clone()), &opts(mode)).unwrap());
    let area = heap.alloc_zeroed(64 * PAGE).unwrap().as_ptr() as usize;
    let pause = Arc::new(AtomicBool::new(false));
    let parked = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let (pause, parked, stop, writes) = (pause.clone(), parked.clone(), stop.clone(), writes.clone());
        std::thread::spawn(move || {
            let mut x = 0x1234_5678_9abc_def1u64;
            while !stop.load(Ordering::Relaxed) {
                if pause.load(Ordering::Acquire) {
                    parked.store(true, Ordering::Release);
                    while pause.load(Ordering::Acquire) {
                        std::hint::spin_loop();
                    }
                    parked.store(false, Ordering::Release);
                }
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x % (64 * PAGE as u64)) as usize;
                // SAFETY: inside the 64-page block.
                unsafe { ((area + at) as *mut u8).write_volatile(x as u8) };
                writes.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let hold = |on: bool| {
        pause.store(on, Ordering::Release);
        while on && !parked.load(Ordering::Acquire) {
            std::hint::spin_loop();
        }
    };
    let mut checks = 0;
    for round in 0..60 {
        if pause_for_flush {
            hold(true);
        }
        heap.flush().unwrap();
        if !pause_for_flush {
            std::thread::sleep(std::time::Duration::from_micros(300 + (round * 97) % 2000));
            hold(true);
        }
        let diff = differing_pages(&snapshot(&heap), &durable(&backend));
        let listed = heap.dirty_pages();
        let missing: Vec<_> = diff.iter().filter(|p| listed.binary_search(p).is_err()).collect();
        assert!(
            missing.is_empty(),
            "{mode:?} round {round}: pages {missing:?} differ from the baseline but are in no list"
        );
        checks += 1;
        hold(false);
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(writes.load(Ordering::Relaxed) > 0 && checks == 60);
}

/// The cut stays transaction-consistent while writers run during the
/// pre-copy: threads move amounts between accounts spread over more pages
/// than one pre-copy round leaves for the pause (so pages are copied while
/// transactions rewrite them, and copied again), and allocate and free
/// meanwhile. Every durable baseline, recovered as a failover host would,
/// must hold the same total, with clean allocator metadata. A cut made of
/// copies from different instants would split a transfer across them.
#[test]
fn cut_is_transaction_consistent_while_writers_run_fast() {
    cut_is_consistent(TrackMode::Fast);
}

#[test]
fn cut_is_transaction_consistent_while_writers_run_precise() {
    cut_is_consistent(TrackMode::Precise);
}

#[test]
fn cut_is_transaction_consistent_while_writers_run_untracked() {
    cut_is_consistent(TrackMode::Off);
}

fn cut_is_consistent(mode: TrackMode) {
    /// Accounts, 1 KiB apart: 6 MiB, 1536 pages (more than the pause's share).
    const ACCOUNTS: usize = 6144;
    const STRIDE: usize = 1024;
    const START: u64 = 1000;
    let backend = FaultyBackend::new();
    let opts = HeapOptions::new(16 << 20).tracking(mode).flush_interval(None);
    let heap = Arc::new(Heap::create_on(Arc::new(backend.clone()), &opts).unwrap());
    let block = heap.alloc(ACCOUNTS * STRIDE).unwrap();
    for i in 0..ACCOUNTS {
        // SAFETY: inside the block; no other thread yet.
        unsafe { block.as_ptr().add(i * STRIDE).cast::<u64>().write(START) };
    }
    let accounts_off = heap.offset_of(block.as_ptr()).unwrap();
    let base = block.as_ptr() as usize;
    let stop = Arc::new(AtomicBool::new(false));
    let hold = Arc::new(AtomicBool::new(false));
    let transfers = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..3u64)
        .map(|t| {
            let (heap, stop, hold, transfers) = (heap.clone(), stop.clone(), hold.clone(), transfers.clone());
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t << 32 | 1);
                let mut held = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if hold.load(Ordering::Relaxed) {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                        continue;
                    }
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Thread t owns the accounts i with i % 3 == t.
                    let own = |r: u64| (r % (ACCOUNTS as u64 / 3)) as usize * 3 + t as usize;
                    let (i, j) = (own(x), own(x >> 20));
                    if i == j {
                        continue;
                    }
                    let (a, b) = ((base + i * STRIDE) as *mut u64, (base + j * STRIDE) as *mut u64);
                    heap.tx(|tx| {
                        tx.add_range(a.cast(), 8)?;
                        tx.add_range(b.cast(), 8)?;
                        // SAFETY: accounts inside the block, owned by this
                        // thread, logged above.
                        unsafe {
                            let amount = x % 7;
                            a.write_volatile(a.read_volatile().wrapping_sub(amount));
                            b.write_volatile(b.read_volatile().wrapping_add(amount));
                        }
                        Ok::<_, remem::alloc::TxError>(())
                    })
                    .unwrap();
                    if x.is_multiple_of(16) {
                        held.push(heap.alloc(16 + (x >> 40) as usize % 3000).unwrap());
                        if held.len() > 64 {
                            heap.free(held.swap_remove((x >> 8) as usize % held.len())).unwrap();
                        }
                    }
                    transfers.fetch_add(1, Ordering::Relaxed);
                }
                for p in held {
                    heap.free(p).unwrap();
                }
            })
        })
        .collect();
    let check = |what: &str| {
        let bytes = durable(&backend);
        let mut image: Vec<u64> = bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        remem::alloc::recover_image(&mut image).unwrap();
        let report = remem::alloc::check_image(&mut image, None).unwrap();
        assert!(report.is_ok(), "{mode:?} {what}: recovered baseline fails check: {report}");
        let sum = (0..ACCOUNTS).fold(0u64, |s, i| s.wrapping_add(image[(accounts_off + i * STRIDE) / 8]));
        assert_eq!(sum, START * ACCOUNTS as u64, "{mode:?} {what}: a transfer is split across the cut");
    };
    let mut max_rounds = 0;
    for round in 0..10 {
        std::thread::sleep(std::time::Duration::from_millis(2));
        heap.flush().unwrap();
        max_rounds = max_rounds.max(heap.flush_stats().unwrap().last_rounds);
        // The writers rest while the baseline is checked (it is a copy).
        hold.store(true, Ordering::Relaxed);
        check(&format!("flush {round}"));
        hold.store(false, Ordering::Relaxed);
    }
    stop.store(true, Ordering::Relaxed);
    writers.into_iter().for_each(|w| w.join().unwrap());
    heap.flush().unwrap();
    check("final flush");
    let stats = heap.flush_stats().unwrap();
    eprintln!(
        "{mode:?}: {} transfers, up to {max_rounds} pre-copy rounds, {} pages copied for {} flushed, {} compactions",
        transfers.load(Ordering::Relaxed),
        stats.pages_copied,
        stats.pages_flushed,
        stats.compactions
    );
    assert!(transfers.load(Ordering::Relaxed) > 0);
}

/// A writer that keeps rewriting more pages than the pause's share without
/// calling the heap (raw writes: the throttle cannot slow it): every flush
/// still completes, and the baseline holds each page as the cut saw it,
/// never a copy older than what the page held when the flush began. (How
/// many rounds such a flush runs is `Pace`'s unit tests.)
#[test]
fn flushes_complete_and_stay_current_under_raw_writers() {
    const PAGES: usize = 4096;
    let backend = FaultyBackend::new();
    let opts = HeapOptions::new(32 << 20).tracking(TrackMode::Fast).flush_interval(None);
    let heap = Arc::new(Heap::create_on(Arc::new(backend.clone()), &opts).unwrap());
    let block = heap.alloc_zeroed(PAGES * PAGE).unwrap();
    let off = heap.offset_of(block.as_ptr()).unwrap();
    let base = block.as_ptr() as usize;
    let stop = Arc::new(AtomicBool::new(false));
    let sweeps = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, sweeps) = (stop.clone(), sweeps.clone());
        std::thread::spawn(move || {
            let mut sweep = 1u64;
            while !stop.load(Ordering::Relaxed) {
                for p in 0..PAGES {
                    // SAFETY: inside the block, which lives until the join.
                    unsafe { ((base + p * PAGE) as *mut u64).write_volatile(sweep) };
                }
                sweeps.store(sweep, Ordering::Release);
                sweep += 1;
            }
        })
    };
    while sweeps.load(Ordering::Acquire) < 2 {
        std::thread::yield_now();
    }
    for _ in 0..5 {
        let before = sweeps.load(Ordering::Acquire);
        heap.flush().unwrap();
        let image = durable(&backend);
        for p in 0..PAGES {
            let at = off + p * PAGE;
            let v = u64::from_le_bytes(image[at..at + 8].try_into().unwrap());
            assert!(
                v >= before,
                "page {p} holds sweep {v} in the baseline, older than sweep {before} done before the flush"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
}
