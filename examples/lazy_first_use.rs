//! Time to first use of a lazily opened heap, against an eager open of the
//! same baseline in the same run.
//!
//! ```text
//! cargo run --release --example lazy_first_use -- [GIB | MIBm ...] [--reps N]
//! ```
//!
//! For each size (default 1 GiB): creates a heap filled to 50 % with 1 MiB
//! blobs linked from the root, closes it (the baseline holds everything),
//! then, `N` times each (default 3), measures from the start of the open to
//! the first read of the root object's first word and of the first blob's
//! first byte returning: `Heap::open_lazy` (from the baseline alone, the
//! source's baseline opened inside the timed span) and `Heap::open`
//! (eager). Prints every repetition, then the time until the lazy heap is
//! fully loaded and its recovered state committed. The baseline file is in
//! the page cache (it was just written); nothing is subtracted.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use remem::alloc::baseline::{Baseline, FileBackend};
use remem::alloc::source::BaselineSource;
use remem::{Heap, HeapOptions};

const BLOB: usize = 1 << 20;

fn fill(path: &Path, mib: u64) -> usize {
    let heap = Heap::create(path, &HeapOptions::new(mib << 20).flush_interval(None)).expect("create");
    let n = ((mib << 20) / 2) as usize / BLOB;
    let (root, _) = heap.root_or_alloc(16).expect("root");
    let table = heap.alloc(n * 8).expect("table").cast::<usize>();
    for i in 0..n {
        let p = heap.alloc(BLOB).expect("blob");
        // SAFETY: the blob is ours and BLOB bytes long; the table has n slots.
        unsafe {
            std::ptr::write_bytes(p.as_ptr(), (i % 251 + 1) as u8, BLOB);
            table.as_ptr().add(i).write(p.as_ptr() as usize);
        }
    }
    // SAFETY: the root holds 16 bytes.
    unsafe {
        root.cast::<usize>().as_ptr().write(table.as_ptr() as usize);
        root.cast::<usize>().as_ptr().add(1).write(n);
    }
    heap.close().expect("close");
    n
}

/// Reads the root's first word and the first blob's first byte.
fn first_use(heap: &Heap) -> u8 {
    let root = heap.root().expect("root").cast::<usize>();
    // SAFETY: written by `fill`.
    unsafe {
        let table = std::ptr::read_volatile(root.as_ptr()) as *const usize;
        std::ptr::read_volatile(std::ptr::read_volatile(table) as *const u8)
    }
}

fn main() {
    // RUST_LOG=debug prints the steps of each lazy open and their timings.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let mut sizes = Vec::new();
    let mut reps = 3;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--reps" {
            reps = args.next().and_then(|s| s.parse().ok()).expect("--reps N");
        } else {
            // GiB, or MiB with an `m` suffix (short runs).
            let mib = match a.strip_suffix('m') {
                Some(m) => m.parse::<u64>().expect("a heap size in MiB"),
                None => a.parse::<u64>().expect("a heap size in GiB") << 10,
            };
            sizes.push(mib);
        }
    }
    if sizes.is_empty() {
        sizes.push(1);
    }
    let dir: PathBuf = std::env::temp_dir().join(format!("remem-lazy-first-use-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let opts = HeapOptions::new(0).flush_interval(None);
    for mib in sizes {
        let path = dir.join(format!("heap-{mib}"));
        let _ = std::fs::remove_file(&path);
        let t = Instant::now();
        let blobs = fill(&path, mib);
        println!("heap {mib} MiB, {blobs} blobs of 1 MiB (50 %), filled and closed in {:.1?}", t.elapsed());
        let (mut lazy_t, mut eager_t) = (Vec::new(), Vec::new());
        for rep in 0..reps {
            let t = Instant::now();
            let source = Arc::new(BaselineSource::new(
                Baseline::open(FileBackend::open(&path).expect("open baseline")).expect("baseline"),
            ));
            let heap = Heap::open_lazy(&path, &opts, source).expect("open_lazy");
            let b = first_use(&heap);
            let first = t.elapsed();
            assert_eq!(b, 1);
            let st = heap.wait_lazy().expect("lazy");
            let full = t.elapsed();
            assert!(st.failed.is_none(), "{st:?}");
            let committed = heap.flush_stats().map_or(0, |f| f.pages_flushed);
            heap.close().expect("close");
            let t = Instant::now();
            let heap = Heap::open_with(&path, &opts).expect("open");
            assert_eq!(first_use(&heap), 1);
            let eager = t.elapsed();
            heap.close().expect("close");
            println!(
                "rep {rep}: lazy first use {:.2} ms (fully loaded and committed {:.0} ms, {} faults, {} pages \
                 committed); eager open to first use {:.0} ms; eager/lazy first use {:.0}x",
                ms(first),
                ms(full),
                st.faults,
                committed,
                ms(eager),
                eager.as_secs_f64() / first.as_secs_f64()
            );
            lazy_t.push(first);
            eager_t.push(eager);
        }
        let med = |v: &mut Vec<Duration>| {
            v.sort();
            v[v.len() / 2]
        };
        println!(
            "{mib} MiB: median lazy first use {:.2} ms, median eager {:.0} ms (max lazy {:.2} ms)",
            ms(med(&mut lazy_t)),
            ms(med(&mut eager_t)),
            ms(*lazy_t.iter().max().expect("reps > 0"))
        );
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(dir.join(format!("heap-{mib}.lock")));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
