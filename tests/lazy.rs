//! Lazy recovery: a heap opened with `Heap::open_lazy` is usable at once,
//! its pages arriving on first touch (userfaultfd) and from a background
//! prefetcher; the result equals an eager load; writes are tracked and
//! reach the baseline; unreadable pages raise SIGBUS, never wrong bytes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use remem::alloc::baseline::{Baseline, FileBackend};
use remem::alloc::source::{BaselineSource, ImageSource, Layered, PageSource};
use remem::alloc::track::TrackMode;
use remem::{Heap, HeapOptions};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("remem-lazy-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("heap")
}

fn baseline_source(path: &Path) -> Arc<dyn PageSource> {
    let b = Baseline::open(FileBackend::open(path).unwrap()).unwrap();
    Arc::new(BaselineSource::new(b))
}

fn opts(mode: TrackMode) -> HeapOptions {
    HeapOptions::new(0).tracking(mode).flush_interval(None)
}

/// Creates a heap with `n` blocks of `size` bytes, block `i` filled with
/// byte `i % 251 + 1`, linked from a table in the root; returns the blocks.
fn fill(path: &Path, heap_size: u64, n: usize, size: usize) -> Vec<usize> {
    fill_with(path, &HeapOptions::new(heap_size).flush_interval(None), n, size)
}

fn fill_with(path: &Path, o: &HeapOptions, n: usize, size: usize) -> Vec<usize> {
    let heap = Heap::create(path, o).unwrap();
    let (root, _) = heap.root_or_alloc(16).unwrap();
    let table = heap.alloc(n * 8).unwrap().cast::<usize>();
    let mut blocks = Vec::new();
    for i in 0..n {
        let p = heap.alloc(size).unwrap();
        // SAFETY: the block is ours and `size` bytes long; the table has n slots.
        unsafe {
            std::ptr::write_bytes(p.as_ptr(), (i % 251 + 1) as u8, size);
            table.as_ptr().add(i).write(p.as_ptr() as usize);
        }
        blocks.push(p.as_ptr() as usize);
    }
    // SAFETY: the root holds 16 bytes.
    unsafe {
        root.cast::<usize>().as_ptr().write(table.as_ptr() as usize);
        root.cast::<usize>().as_ptr().add(1).write(n);
    }
    heap.close().unwrap();
    blocks
}

/// Checks every block through the root, as a database would.
fn check_blocks(heap: &Heap, size: usize) {
    let root = heap.root().expect("root").cast::<usize>();
    // SAFETY: the root and the table were written by `fill`.
    unsafe {
        let table = root.as_ptr().read() as *const usize;
        let n = root.as_ptr().add(1).read();
        for i in 0..n {
            let b = std::slice::from_raw_parts(table.add(i).read() as *const u8, size);
            assert!(b.iter().all(|&x| x == (i % 251 + 1) as u8), "block {i}");
        }
    }
}

#[test]
fn lazy_open_from_the_baseline_serves_every_page_and_commits_once() {
    for mode in [TrackMode::Fast, TrackMode::Precise] {
        let path = tmp(&format!("basic-{mode}"));
        fill(&path, 64 << 20, 200, 40_000);
        let heap = Heap::open_lazy(&path, &opts(mode), baseline_source(&path)).unwrap();
        check_blocks(&heap, 40_000);
        // A write after the lazy open is tracked and reaches the baseline.
        let p = heap.alloc(5000).unwrap();
        // SAFETY: the block is ours.
        unsafe { std::ptr::write_bytes(p.as_ptr(), 0x5A, 5000) };
        let root = heap.root().unwrap().cast::<usize>();
        let keep = heap.alloc(8).unwrap().cast::<usize>();
        // SAFETY: `keep` is an 8-byte block of ours.
        unsafe { keep.as_ptr().write(p.as_ptr() as usize) };
        let st = heap.wait_lazy().unwrap();
        assert!(st.settled && st.failed.is_none(), "{st:?}");
        assert_eq!(st.poisoned, 0);
        assert_eq!(st.resident + st.zero, st.pages, "{st:?}");
        let epoch = st.committed_epoch.expect("committed");
        // The commit of the recovered state writes what changed, not the
        // pages the heap never touched.
        let flushed = heap.flush_stats().unwrap().pages_flushed;
        assert!(flushed < st.pages / 4, "{mode}: {flushed} of {} pages committed", st.pages);
        heap.wait_durable(epoch).unwrap();
        let e = heap.flush().unwrap();
        heap.wait_durable(e).unwrap();
        let (pa, ka, ra) = (p.as_ptr() as usize, keep.as_ptr() as usize, root.as_ptr() as usize);
        heap.close().unwrap();
        let heap = Heap::open_with(&path, &opts(mode)).unwrap();
        check_blocks(&heap, 40_000);
        assert_eq!(heap.root().unwrap().as_ptr() as usize, ra);
        // SAFETY: the blocks survived at the same addresses.
        unsafe {
            assert_eq!((ka as *const usize).read(), pa);
            assert!(std::slice::from_raw_parts(pa as *const u8, 5000).iter().all(|&b| b == 0x5A));
        }
        heap.close().unwrap();
    }
}

/// A source that sleeps before every read the prefetcher makes (so the
/// database gets ahead of it).
struct SlowPrefetch(Arc<dyn PageSource>, std::time::Duration);

impl PageSource for SlowPrefetch {
    fn claims(&self, page: u64) -> bool {
        self.0.claims(page)
    }
    fn read_pages(
        &self,
        first: u64,
        dst: &mut [u8],
        status: &mut [remem::alloc::source::PageRead],
    ) -> Result<(), remem::alloc::source::SourceError> {
        if std::thread::current().name() == Some("remem-lazy-prefetch") {
            std::thread::sleep(self.1);
        }
        self.0.read_pages(first, dst, status)
    }
    fn name(&self) -> &str {
        "slow"
    }
}

#[test]
fn many_threads_fault_at_once() {
    let path = tmp("threads");
    let blocks = fill(&path, 128 << 20, 600, 100_000);
    let source = Arc::new(SlowPrefetch(baseline_source(&path), std::time::Duration::from_millis(5)));
    let heap = Heap::open_lazy(&path, &opts(TrackMode::Fast), source).unwrap();
    std::thread::scope(|s| {
        for t in 0..8usize {
            let blocks = &blocks;
            s.spawn(move || {
                for (i, &b) in blocks.iter().enumerate().skip(t).step_by(8) {
                    // SAFETY: block `i` is 100 000 bytes, filled by `fill`.
                    let bytes = unsafe { std::slice::from_raw_parts(b as *const u8, 100_000) };
                    assert!(bytes.iter().all(|&x| x == (i % 251 + 1) as u8), "block {i}");
                }
            });
        }
    });
    let st = heap.lazy_status().unwrap();
    assert!(st.faults > 0, "{st:?}");
    let st = heap.wait_lazy().unwrap();
    assert!(st.failed.is_none() && st.committed_epoch.is_some(), "{st:?}");
    heap.close().unwrap();
}

#[test]
fn a_page_written_before_the_prefetcher_gets_there_keeps_its_bytes() {
    for mode in [TrackMode::Fast, TrackMode::Precise] {
        let path = tmp(&format!("ahead-{mode}"));
        let blocks = fill(&path, 64 << 20, 300, 100_000);
        let source = Arc::new(SlowPrefetch(baseline_source(&path), std::time::Duration::from_millis(20)));
        let heap = Heap::open_lazy(&path, &opts(mode), source).unwrap();
        // The last blocks are far from where the prefetcher starts.
        let written: Vec<usize> = blocks.iter().rev().take(5).copied().collect();
        for &b in &written {
            // SAFETY: the block is 100 000 bytes and ours.
            unsafe { std::ptr::write_bytes(b as *mut u8, 0xC3, 100_000) };
        }
        let st = heap.wait_lazy().unwrap();
        assert!(st.failed.is_none(), "{st:?}");
        for &b in &written {
            // SAFETY: as above.
            let bytes = unsafe { std::slice::from_raw_parts(b as *const u8, 100_000) };
            assert!(bytes.iter().all(|&x| x == 0xC3), "{mode}: the prefetcher overwrote a written page");
        }
        heap.close().unwrap();
        let heap = Heap::open_with(&path, &opts(mode)).unwrap();
        for &b in &written {
            // SAFETY: as above, after an eager reopen at the same address.
            let bytes = unsafe { std::slice::from_raw_parts(b as *const u8, 100_000) };
            assert!(bytes.iter().all(|&x| x == 0xC3), "{mode}: the write did not reach the baseline");
        }
        heap.close().unwrap();
    }
}

/// Child side of the poison test: opens lazily with a newer layer that
/// claims one page and cannot read it, then touches that page.
#[test]
fn child_touches_a_poisoned_page() {
    let (Ok(path), Ok(addr)) = (std::env::var("REMEM_LAZY_POISON_PATH"), std::env::var("REMEM_LAZY_POISON_ADDR"))
    else {
        return;
    };
    let path = PathBuf::from(path);
    let addr: usize = addr.parse().unwrap();
    let probe = Heap::open_with(&path, &opts(TrackMode::Fast)).unwrap();
    let (base, size) = (probe.base() as usize, probe.size() as usize);
    drop(probe);
    let page = ((addr - base) / 4096) as u64;
    let agent = ImageSource::new("agent", vec![0; size]).claiming([page]).unreadable([page]);
    let source = Arc::new(Layered::new(vec![Arc::new(agent), baseline_source(&path)]));
    let heap = Heap::open_lazy(&path, &opts(TrackMode::Fast), source).unwrap();
    println!("ready");
    // SAFETY: the address is inside the heap; the page is poisoned, so this
    // read raises SIGBUS (that is what the parent checks).
    let v = unsafe { std::ptr::read_volatile(addr as *const u8) };
    println!("read {v}");
    std::mem::forget(heap);
}

#[test]
fn an_unreadable_page_is_poisoned_reported_and_blocks_the_commit() {
    use std::os::unix::process::ExitStatusExt;
    if std::env::var("REMEM_LAZY_POISON_PATH").is_ok() {
        return;
    }
    let path = tmp("poison");
    let blocks = fill(&path, 32 << 20, 50, 50_000);
    let target = blocks[40] + 8192;
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_touches_a_poisoned_page", "--nocapture", "--test-threads=1", "-q"])
        .env("REMEM_LAZY_POISON_PATH", &path)
        .env("REMEM_LAZY_POISON_ADDR", target.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ready"), "child did not open: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(!stdout.contains("read "), "the child read bytes from a poisoned page: {stdout}");
    assert_eq!(out.status.signal(), Some(libc::SIGBUS), "{:?}", out.status);

    // In process, without touching it: reported, and no commit.
    let base = Heap::open_with(&path, &opts(TrackMode::Fast)).unwrap();
    let (b, size) = (base.base() as usize, base.size() as usize);
    base.close().unwrap();
    let page = ((target - b) / 4096) as u64;
    let agent = ImageSource::new("agent", vec![0; size]).claiming([page]).unreadable([page]);
    let source = Arc::new(Layered::new(vec![Arc::new(agent), baseline_source(&path)]));
    let before = std::fs::read(&path).unwrap();
    let heap = Heap::open_lazy(&path, &opts(TrackMode::Fast), source).unwrap();
    let st = heap.wait_lazy().unwrap();
    assert_eq!((st.poisoned, st.poisoned_pages.clone()), (1, vec![page]), "{st:?}");
    assert!(st.failed.is_some() && st.committed_epoch.is_none(), "{st:?}");
    assert!(matches!(heap.flush(), Err(remem::alloc::FlushError::Poisoned(_))));
    drop(heap); // its final flush fails the same way (and says so)
    assert!(std::fs::read(&path).unwrap() == before, "the baseline changed");
}

/// The whole image of an open heap.
fn image_of(heap: &Heap) -> Vec<u8> {
    // SAFETY: the heap maps `size` bytes at `base`; a lazy heap serves every page on touch.
    unsafe { std::slice::from_raw_parts(heap.base() as *const u8, heap.size() as usize) }.to_vec()
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 6, ..Default::default() })]

    /// The lazy result equals the naive oracle: load everything eagerly, lay
    /// the newer layer's pages over it, compare whole images (and again after
    /// the commit of the recovered state, reopened eagerly).
    #[test]
    fn lazy_equals_eager_load_with_a_newer_layer(
        sizes in proptest::collection::vec(1usize..300_000, 1..25),
        newer in proptest::collection::vec((0usize..1000, 1u8..255), 0..40),
        precise in proptest::bool::ANY,
    ) {
        let mode = if precise { TrackMode::Precise } else { TrackMode::Fast };
        let path = tmp(&format!("prop-{}", sizes.len() * 1000 + newer.len()));
        let heap = Heap::create(&path, &HeapOptions::new(16 << 20).flush_interval(None)).unwrap();
        let mut large_pages = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            let p = heap.alloc(size).unwrap();
            // SAFETY: the block is ours.
            unsafe { std::ptr::write_bytes(p.as_ptr(), (i * 7 + 1) as u8, size) };
            let off = p.as_ptr() as usize - heap.base() as usize;
            // Whole pages of page-run blocks: data the allocator never reads.
            if size >= 16384 {
                large_pages.extend((off.div_ceil(4096)..(off + size) / 4096).map(|pg| pg as u64));
            }
        }
        heap.close().unwrap();
        // Oracle: an eager load, with the newer layer's pages laid over it.
        let eager = Heap::open_with(&path, &opts(mode)).unwrap();
        let mut oracle = image_of(&eager);
        eager.close().unwrap();
        let mut agent = vec![0u8; oracle.len()];
        let mut claimed = Vec::new();
        if !large_pages.is_empty() {
            for &(k, fill) in &newer {
                let pg = large_pages[k % large_pages.len()];
                let r = pg as usize * 4096..(pg as usize + 1) * 4096;
                agent[r.clone()].fill(fill);
                oracle[r].fill(fill);
                claimed.push(pg);
            }
        }
        let layer = ImageSource::new("agent", agent).claiming(claimed);
        let source = Arc::new(Layered::new(vec![Arc::new(layer), baseline_source(&path)]));
        let heap = Heap::open_lazy(&path, &opts(mode), source).unwrap();
        let st = heap.wait_lazy().unwrap();
        proptest::prop_assert!(st.failed.is_none() && st.committed_epoch.is_some(), "{:?}", st);
        proptest::prop_assert!(image_of(&heap) == oracle, "lazy image differs from the oracle");
        heap.close().unwrap();
        let again = Heap::open_with(&path, &opts(mode)).unwrap();
        proptest::prop_assert!(image_of(&again) == oracle, "the committed recovered state differs");
        again.close().unwrap();
    }
}

/// Fast mode: the pages a lazily loading heap never installed (holes, known
/// zero) are not write-protected up front; scans leave them out until the
/// first harvest marks them. Neither that commit nor a later one writes
/// them, and a write to one after the load (its first touch installs it
/// write-protected) is tracked and committed.
#[test]
fn fast_mode_holes_stay_out_of_commits_and_a_write_to_one_is_committed() {
    let path = tmp("holes-fast");
    fill(&path, 64 << 20, 50, 40_000);
    let heap = Heap::open_lazy(&path, &opts(TrackMode::Fast), baseline_source(&path)).unwrap();
    let st = heap.wait_lazy().unwrap();
    assert!(st.settled && st.failed.is_none() && st.committed_epoch.is_some(), "{st:?}");
    assert!(st.zero > st.pages / 2, "the heap should be mostly holes: {st:?}");
    let after_load = heap.flush_stats().unwrap().pages_flushed;
    assert!(after_load < st.pages / 4, "{after_load} of {} pages committed", st.pages);
    let e = heap.flush().unwrap();
    heap.wait_durable(e).unwrap();
    let idle = heap.flush_stats().unwrap().pages_flushed - after_load;
    assert!(idle < 16, "a flush with nothing written committed {idle} pages");
    // A 1 MiB block: fresh pages, holes until now.
    let p = heap.alloc(1 << 20).unwrap();
    // SAFETY: the block is ours.
    unsafe { std::ptr::write_bytes(p.as_ptr(), 0x77, 1 << 20) };
    let e = heap.flush().unwrap();
    heap.wait_durable(e).unwrap();
    let wrote = heap.flush_stats().unwrap().pages_flushed - after_load - idle;
    assert!(wrote >= 256, "the written block's 256 pages were not all committed: {wrote}");
    let pa = p.as_ptr() as usize;
    heap.close().unwrap();
    let heap = Heap::open_with(&path, &opts(TrackMode::Fast)).unwrap();
    // SAFETY: the block survived at the same address (never freed).
    let bytes = unsafe { std::slice::from_raw_parts(pa as *const u8, 1 << 20) };
    assert!(bytes.iter().all(|&b| b == 0x77), "the write to a hole page did not reach the baseline");
    check_blocks(&heap, 40_000);
    heap.close().unwrap();
}

/// A heap whose metadata (page descriptors) is large enough that the lazy
/// open fetches it with two threads: every block and the allocator's state
/// come back whole.
#[test]
fn a_large_heap_opens_lazily_with_its_metadata_fetched_in_halves() {
    for mode in [TrackMode::Fast, TrackMode::Precise] {
        let path = tmp(&format!("large-{mode}"));
        let blocks = fill(&path, 1 << 30, 64, 300_000);
        let heap = Heap::open_lazy(&path, &opts(mode), baseline_source(&path)).unwrap();
        check_blocks(&heap, 300_000);
        // The allocator works on the recovered metadata: new blocks do not
        // overlap the old ones.
        let fresh: Vec<usize> = (0..32).map(|_| heap.alloc(300_000).unwrap().as_ptr() as usize).collect();
        for f in &fresh {
            assert!(blocks.iter().all(|b| f + 300_000 <= *b || b + 300_000 <= *f), "{mode}: overlap");
        }
        let st = heap.wait_lazy().unwrap();
        assert!(st.failed.is_none() && st.committed_epoch.is_some(), "{mode}: {st:?}");
        check_blocks(&heap, 300_000);
        let c = heap.check();
        assert!(c.is_ok(), "{mode}: {:?}", c.problems);
        heap.close().unwrap();
        let _ = std::fs::remove_file(&path);
    }
}

/// Fast mode, holes left unmarked. Threads write fresh
/// blocks (hole pages, state Zero) while the heap loads, across its one
/// commit and across later flushes; every write must reach the baseline.
#[test]
fn writes_to_holes_during_load_and_commit_all_reach_the_baseline() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let path = tmp("holes-race");
    fill(&path, 64 << 20, 40, 30_000);
    let source = Arc::new(SlowPrefetch(baseline_source(&path), std::time::Duration::from_millis(2)));
    let heap = Heap::open_lazy(&path, &opts(TrackMode::Fast), source).unwrap();
    let stop = AtomicBool::new(false);
    let written: Vec<(usize, usize, u8)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..2u8)
            .map(|t| {
                let (heap, stop) = (&heap, &stop);
                sc.spawn(move || {
                    let mut out = Vec::new();
                    let mut i = 0u32;
                    while !stop.load(Ordering::Relaxed) && out.len() < 3000 {
                        let size = 4096 * (1 + (i as usize % 5));
                        let Ok(p) = heap.alloc(size) else { break };
                        let v = (t.wrapping_mul(97).wrapping_add(i as u8)) | 1;
                        // SAFETY: the block is ours, `size` bytes.
                        unsafe { std::ptr::write_bytes(p.as_ptr(), v, size) };
                        out.push((p.as_ptr() as usize, size, v));
                        i += 1;
                        if i.is_multiple_of(64) {
                            std::thread::yield_now();
                        }
                    }
                    out
                })
            })
            .collect();
        let st = heap.wait_lazy().unwrap();
        assert!(st.failed.is_none() && st.committed_epoch.is_some(), "{st:?}");
        for _ in 0..5 {
            let e = heap.flush().unwrap();
            heap.wait_durable(e).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let e = heap.flush().unwrap();
    heap.wait_durable(e).unwrap();
    heap.close().unwrap();
    eprintln!("{} blocks written", written.len());
    let heap = Heap::open_with(&path, &opts(TrackMode::Fast)).unwrap();
    let mut bad = 0;
    for &(p, size, v) in &written {
        // SAFETY: the blocks were never freed; same address after reopen.
        let b = unsafe { std::slice::from_raw_parts(p as *const u8, size) };
        if !b.iter().all(|&x| x == v) {
            bad += 1;
        }
    }
    check_blocks(&heap, 30_000);
    heap.close().unwrap();
    assert_eq!(bad, 0, "{bad} of {} written blocks did not reach the baseline", written.len());
}

/// The default `PageSource::read_runs` refuses a run whose count
/// overflows with a `BadRequest`, never a panic.
#[test]
fn read_runs_with_an_overflowing_run_is_a_bad_request_not_a_panic() {
    use remem::alloc::source::{PageRead, SourceError};
    let src = ImageSource::new("img", vec![1u8; 4 * 4096]);
    let mut dst = vec![0u8; 2 * 4096];
    let mut st = vec![PageRead::Zero; 2];
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        src.read_runs(0, &[(1, u64::MAX)], &mut dst, &mut st).map_err(|e| matches!(e, SourceError::BadRequest { .. }))
    }));
    assert!(matches!(r, Ok(Err(true))), "expected a BadRequest, got {r:?}");
}
