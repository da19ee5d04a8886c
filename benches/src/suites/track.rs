//! `track`: what dirty-page tracking costs the writes it watches.
//!
//! - `first_write`: a 256 MiB memfd mapped `MAP_SHARED`, every page written
//!   once beforehand (so the page cache is populated and no allocation is
//!   timed). Per repetition and system, untimed: a tracker is built with
//!   `TrackerBuilder::new(mode).build(base, len)` and `protect_all()`ed;
//!   timed: one byte written to each page, in ascending order; untimed: a
//!   harvest checks that the tracker saw every page (a mismatch is reported
//!   on stderr and in the `pages_seen` field). One op is one first write to
//!   a write-protected page. `untracked` writes the same bytes with no
//!   tracker; each system has its own region, so no tracker ever touched
//!   the `untracked` pages.
//! - `hot_update`: a hot set of [`HOT_PAGES`] pages, one large block of a
//!   1 GiB heap, all written once before the clock starts (dirty in the
//!   current epoch); timed: 64 B writes (`memset`) at random 64 B-aligned
//!   offsets of the hot set (xorshift, fixed seed), for `--hot-ms`. One op
//!   is one 64 B update. `untracked`: `Heap::create_memfd` (no tracking,
//!   no flushing). `fast`: `Heap::create` with `TrackMode::Fast` and
//!   `flush_interval(Some(100 ms))`, so the background flusher harvests
//!   (re-protecting the hot pages, whose next write faults again), copies
//!   and writes the hot set every 100 ms while the updates run. A fresh heap
//!   per repetition and system; its flush figures (`flushes`,
//!   `pause_p50_us`, `pause_p99_us` from `Heap::flush_stats`) are those of
//!   the median repetition. `cpu_ns_per_op` is the writing thread's own CPU
//!   time (`CLOCK_THREAD_CPUTIME_ID`, user + system, so its page faults
//!   included) per update: on a machine with few cores the flusher and
//!   other processes take the writer's core away, which the wall-clock
//!   figure counts and this one does not. `minor_faults` is the writer's
//!   minor page faults during the run (`getrusage(RUSAGE_THREAD)`): in fast
//!   mode, one per hot page written after each harvest re-protected it.
//! - `random_update_1gib`: the same 64 B updates, at uniformly random
//!   offsets of a 1 GiB block (every page written once before the clock
//!   starts), for `--hot-ms`: the working set a database with a large
//!   table spreads its writes over, so nearly every page is dirtied again
//!   after each harvest re-protects it. `untracked`: `Heap::create_memfd`.
//!   `fast`: `Heap::create` with the defaults a user gets (fast tracking,
//!   background flush every second), so each flush writes the pages the
//!   updates dirtied since the last one.
//!
//! Single-threaded (the flusher is remem's own thread); `--threads` does
//! not apply. Each repetition runs every system in turn; the figure is the
//! median repetition, with the fastest and slowest as `min_ns` / `max_ns`.

use std::hint::black_box;
use std::path::Path;
use std::ptr::{self, NonNull};
use std::time::{Duration, Instant};

use remem_alloc::track::{Tracker, TrackerBuilder};
use remem_alloc::{Heap, HeapOptions, TrackMode};

use super::{progress, Config, Rng};
use crate::report::{Extra, Measurement, SuiteReport};
use crate::scratch::ScratchDir;

/// Suite name on the command line and in the report.
pub const SUITE: &str = "track";
/// The system the others are compared with.
pub const BASELINE: &str = "untracked";
/// Size of `first_write`'s region.
pub const FIRST_WRITE_BYTES: usize = 256 << 20;
/// Pages in `hot_update`'s hot set (a power of two).
pub const HOT_PAGES: usize = 4096;
/// Size of the heaps of `hot_update`.
const HOT_HEAP_SIZE: u64 = 1 << 30;
/// Background flush interval of `hot_update`'s `fast` heap.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Pages of `random_update_1gib`'s block (a power of two): 1 GiB of 4 KiB pages.
pub const RANDOM_PAGES: usize = 1 << 18;
/// Size of the heaps of `random_update_1gib`: the block and room for metadata.
const RANDOM_HEAP_SIZE: u64 = (1 << 30) + (256 << 20);
/// Bytes per update in `hot_update` and `random_update_1gib`.
const UPDATE: usize = 64;
/// Updates between two looks at the clock.
const BATCH: u64 = 256;
/// Seed of the update offsets.
const SEED: u64 = 0x2545_F491_4F6C_DD1D;

/// Runs both cases.
pub fn run(config: &Config) -> anyhow::Result<SuiteReport> {
    let mut measurements = first_write(config)?;
    let dir = ScratchDir::new(&config.dir, "track").map_err(anyhow::Error::msg)?;
    measurements.extend(hot_update(config, &dir)?);
    measurements.extend(random_update(config, &dir)?);
    let mut legend = vec![
        format!(
            "first_write: one op = the first write (1 byte) to a write-protected page of a {} MiB \
             memfd mapped MAP_SHARED and populated beforehand; tracker built and protect_all()ed \
             per rep, untimed; untracked = the same writes, no tracker",
            FIRST_WRITE_BYTES >> 20
        ),
        format!(
            "hot_update: one op = a {UPDATE} B write at a random {UPDATE} B-aligned offset of a hot set \
             of {HOT_PAGES} pages ({} MiB) already dirty in the epoch, for {} ms per rep; untracked = \
             Heap::create_memfd (no tracking, no flush); fast = Heap::create, TrackMode::Fast, \
             background flush every {} ms; heaps of {} MiB, files in {}; flushes, pause_* = \
             Heap::flush_stats of the median rep",
            (HOT_PAGES * page_size()) >> 20,
            config.hot_time.as_millis(),
            FLUSH_EVERY.as_millis(),
            HOT_HEAP_SIZE >> 20,
            dir.describe()
        ),
        format!(
            "random_update_1gib: one op = a {UPDATE} B write at a uniformly random {UPDATE} B-aligned offset \
             of a {} MiB block, every page written once before, for {} ms per rep; untracked = \
             Heap::create_memfd; fast = Heap::create with its defaults (fast tracking, background flush every \
             second); heaps of {} MiB",
            (RANDOM_PAGES * page_size()) >> 20,
            config.hot_time.as_millis(),
            RANDOM_HEAP_SIZE >> 20
        ),
        format!("ns/op, 1 thread: the median of {} reps, min_ns/max_ns the fastest and slowest", config.reps),
    ];
    legend.extend(verdict(&measurements));
    Ok(SuiteReport { suite: SUITE, baseline: BASELINE, legend, measurements })
}

/// "fast is 4.1 % slower than untracked on hot_update: target <= 10 % met",
/// and the same for random_update_1gib.
fn verdict(ms: &[Measurement]) -> Vec<String> {
    ["hot_update", "random_update_1gib"].into_iter().filter_map(|case| verdict_on(ms, case)).collect()
}

fn verdict_on(ms: &[Measurement], case: &str) -> Option<String> {
    let find = |system| ms.iter().find(|m| m.case == case && m.system == system);
    let (u, f) = (find(BASELINE)?, find("fast")?);
    let over = (f.ns_per_op / u.ns_per_op - 1.0) * 100.0;
    let cpu = |m: &Measurement| m.extra.0.iter().find(|(k, _)| *k == "cpu_ns_per_op").map(|&(_, v)| v);
    let cpu_over = match (cpu(u), cpu(f)) {
        (Some(a), Some(b)) => format!("; writer CPU time per update {:+.1} %", (b / a - 1.0) * 100.0),
        _ => String::new(),
    };
    Some(format!(
        "target fast within 10 % of untracked on {case}: fast is {over:+.1} % ({}){cpu_over}",
        if over <= 10.0 { "met" } else { "NOT met" }
    ))
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(ps).ok().filter(|&p| p > 0).unwrap_or(4096)
}

// ---------------------------------------------------------------- first_write

/// A memfd of `len` bytes mapped shared, every page written once.
struct SharedRegion {
    base: NonNull<u8>,
    len: usize,
    fd: libc::c_int,
}

impl SharedRegion {
    fn new(len: usize) -> anyhow::Result<SharedRegion> {
        // SAFETY: the name is NUL-terminated; flags are valid.
        let fd = unsafe { libc::memfd_create(c"remem-bench-track".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            anyhow::bail!("memfd_create: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is our open memfd.
        if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: `fd` is ours and closed once.
            unsafe { libc::close(fd) };
            anyhow::bail!("ftruncate(memfd, {len}): {e}");
        }
        // SAFETY: a fresh shared mapping of our memfd at an address the
        // kernel chooses; nothing else uses that range.
        let p =
            unsafe { libc::mmap(ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0) };
        if p == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            // SAFETY: `fd` is ours and closed once.
            unsafe { libc::close(fd) };
            anyhow::bail!("mmap(memfd, {len}): {e}");
        }
        let region = SharedRegion { base: NonNull::new(p.cast()).expect("mmap never maps at 0"), len, fd };
        let ps = page_size();
        for off in (0..len).step_by(ps) {
            // SAFETY: `off < len`: inside our mapping.
            unsafe { region.base.as_ptr().add(off).write_volatile(1) };
        }
        Ok(region)
    }

    fn pages(&self) -> usize {
        self.len / page_size()
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: the mapping and the descriptor are ours, released once;
        // no tracker outlives the region (each is dropped in its rep).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
            libc::close(self.fd);
        }
    }
}

/// `first_write` for each system: (name, tracking mode).
const FIRST_WRITE_SYSTEMS: [(&str, Option<TrackMode>); 3] =
    [(BASELINE, None), ("precise", Some(TrackMode::Precise)), ("fast", Some(TrackMode::Fast))];

fn first_write(config: &Config) -> anyhow::Result<Vec<Measurement>> {
    progress(SUITE, format_args!("first_write: populating 3 x {} MiB", FIRST_WRITE_BYTES >> 20));
    let mut systems = Vec::new();
    for (name, mode) in FIRST_WRITE_SYSTEMS {
        systems.push((name, mode, SharedRegion::new(FIRST_WRITE_BYTES)?));
    }
    progress(SUITE, format_args!("first_write"));
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
    let mut seen = vec![u64::MAX; systems.len()];
    let mut failed = vec![false; systems.len()];
    for rep in 0..config.reps {
        for (i, (name, mode, region)) in systems.iter().enumerate() {
            if failed[i] {
                continue;
            }
            match first_write_rep(region, *mode, rep as u8) {
                Ok((ns, pages_seen)) => {
                    runs[i].push(ns);
                    seen[i] = seen[i].min(pages_seen);
                }
                Err(e) => {
                    eprintln!("remem-bench: skipping {name} in first_write: {e}");
                    failed[i] = true;
                }
            }
        }
    }
    Ok(systems
        .iter()
        .enumerate()
        .filter(|&(i, _)| !failed[i])
        .map(|(i, (name, _, region))| Measurement {
            suite: SUITE,
            case: "first_write",
            system: name,
            ns_per_op: crate::native::median(&runs[i]),
            threads: 1,
            reps: config.reps,
            extra: Extra::default()
                .with("pages", region.pages() as f64)
                .with("pages_seen", seen[i] as f64)
                .with("min_ns", runs[i].iter().copied().fold(f64::INFINITY, f64::min))
                .with("max_ns", runs[i].iter().copied().fold(0.0, f64::max)),
        })
        .collect())
}

/// One repetition: ns per first write, and the pages the tracker reported
/// (all of them, without a tracker).
fn first_write_rep(region: &SharedRegion, mode: Option<TrackMode>, byte: u8) -> Result<(f64, u64), String> {
    let tracker: Option<Box<dyn Tracker>> = match mode {
        None => None,
        Some(m) => {
            let t = TrackerBuilder::new(m)
                .build(region.base.as_ptr(), region.len)
                .map_err(|e| format!("building the {m} tracker: {e}"))?;
            t.protect_all().map_err(|e| format!("protect_all: {e}"))?;
            Some(t)
        }
    };
    let (base, ps, pages) = (region.base.as_ptr(), page_size(), region.pages());
    let start = Instant::now();
    for p in 0..pages {
        // SAFETY: page `p` is inside the mapping; a tracked page is only
        // write-protected, which the tracker (or the kernel) resolves.
        unsafe { base.add(p * ps).write_volatile(byte) };
    }
    let ns = start.elapsed().as_nanos() as f64 / pages as f64;
    let seen = match &tracker {
        None => pages as u64,
        Some(t) => {
            let mut out = Vec::new();
            t.harvest(&mut out).map_err(|e| format!("harvest: {e}"))?;
            if out.len() != pages {
                eprintln!(
                    "remem-bench: WARNING: the {} tracker reported {} of the {pages} pages written",
                    t.mode(),
                    out.len()
                );
            }
            out.len() as u64
        }
    };
    drop(tracker);
    Ok((ns, seen))
}

// ----------------------------------------------------------------- hot_update

/// What one `hot_update` repetition measured.
struct HotRep {
    ns_per_op: f64,
    extra: Extra,
}

fn hot_update(config: &Config, dir: &ScratchDir) -> anyhow::Result<Vec<Measurement>> {
    progress(SUITE, format_args!("hot_update ({} ms per rep and system)", config.hot_time.as_millis()));
    compare_reps(
        config,
        "hot_update",
        |rep| hot_rep_untracked(config.hot_time, rep),
        |rep| hot_rep_fast(dir.path(), config.hot_time, rep),
    )
}

/// Runs `untracked` and `tracked` alternately, `config.reps` times each,
/// and reports each system's median repetition (with its own figures),
/// plus the fastest and slowest as `min_ns` / `max_ns`: no best-of.
fn compare_reps(
    config: &Config,
    case: &'static str,
    mut untracked: impl FnMut(u32) -> anyhow::Result<HotRep>,
    mut tracked: impl FnMut(u32) -> anyhow::Result<HotRep>,
) -> anyhow::Result<Vec<Measurement>> {
    let mut runs: [Vec<HotRep>; 2] = [Vec::new(), Vec::new()];
    for rep in 0..config.reps {
        runs[0].push(untracked(rep)?);
        runs[1].push(tracked(rep)?);
    }
    Ok([BASELINE, "fast"]
        .into_iter()
        .zip(runs)
        .filter(|(_, r)| !r.is_empty())
        .map(|(name, mut r)| {
            r.sort_by(|a, b| a.ns_per_op.total_cmp(&b.ns_per_op));
            let (lo, hi) = (r[0].ns_per_op, r[r.len() - 1].ns_per_op);
            let mid = r.swap_remove(r.len() / 2);
            Measurement {
                suite: SUITE,
                case,
                system: name,
                ns_per_op: mid.ns_per_op,
                threads: 1,
                reps: config.reps,
                extra: mid.extra.with("min_ns", lo).with("max_ns", hi),
            }
        })
        .collect())
}

/// Allocates a block of `pages` pages in `heap` and writes each page once.
fn hot_set(heap: &Heap, pages: usize) -> anyhow::Result<NonNull<u8>> {
    let ps = page_size();
    let block = heap.alloc(pages * ps).map_err(|e| anyhow::anyhow!("allocating {pages} pages: {e}"))?;
    for p in 0..pages {
        // SAFETY: the block is ours and `pages * ps` bytes long.
        unsafe { block.as_ptr().add(p * ps).write_volatile(1) };
    }
    Ok(block)
}

/// CPU time this thread has used.
fn thread_cpu_time() -> Duration {
    // SAFETY: an all-zero timespec is valid; clock_gettime fills it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and a valid destination.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID): {}", std::io::Error::last_os_error());
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Minor page faults this thread has taken.
fn thread_minor_faults() -> u64 {
    // SAFETY: an all-zero rusage is valid; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid `who` and a valid destination.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    assert_eq!(rc, 0, "getrusage(RUSAGE_THREAD): {}", std::io::Error::last_os_error());
    ru.ru_minflt as u64
}

/// What [`hot_loop`] measured.
struct HotLoop {
    ns_per_op: f64,
    cpu_ns_per_op: f64,
    minor_faults: u64,
}

/// Random 64 B updates of the `pages` pages (a power of two) at `block` for `time`.
fn hot_loop(block: NonNull<u8>, pages: usize, time: Duration, seed: u64) -> HotLoop {
    let ps = page_size();
    let slots = (ps / UPDATE) as u64;
    let mut rng = Rng::new(seed);
    let base = block.as_ptr();
    let faults_start = thread_minor_faults();
    let cpu_start = thread_cpu_time();
    let start = Instant::now();
    let mut ops = 0u64;
    loop {
        for i in 0..BATCH {
            let r = rng.next_u64();
            let page = (r >> 32) as usize & (pages - 1);
            let slot = ((r >> 8) % slots) as usize;
            // SAFETY: `page < pages` and `slot * UPDATE + UPDATE <= ps`:
            // inside the block, which only this thread writes.
            unsafe { ptr::write_bytes(black_box(base.add(page * ps + slot * UPDATE)), (ops + i) as u8, UPDATE) };
        }
        ops += BATCH;
        let elapsed = start.elapsed();
        if elapsed >= time {
            let cpu = thread_cpu_time() - cpu_start;
            return HotLoop {
                ns_per_op: elapsed.as_nanos() as f64 / ops as f64,
                cpu_ns_per_op: cpu.as_nanos() as f64 / ops as f64,
                minor_faults: thread_minor_faults() - faults_start,
            };
        }
    }
}

fn hot_rep_untracked(time: Duration, rep: u32) -> anyhow::Result<HotRep> {
    let heap = Heap::create_memfd(&HeapOptions::new(HOT_HEAP_SIZE))
        .map_err(|e| anyhow::anyhow!("Heap::create_memfd({} MiB): {e}", HOT_HEAP_SIZE >> 20))?;
    let block = hot_set(&heap, HOT_PAGES)?;
    let r = hot_loop(block, HOT_PAGES, time, SEED + u64::from(rep));
    heap.close().map_err(|e| anyhow::anyhow!("closing the memfd heap: {e}"))?;
    let extra = Extra::default().with("cpu_ns_per_op", r.cpu_ns_per_op).with("minor_faults", r.minor_faults as f64);
    Ok(HotRep { ns_per_op: r.ns_per_op, extra })
}

fn hot_rep_fast(dir: &Path, time: Duration, rep: u32) -> anyhow::Result<HotRep> {
    let opts = HeapOptions::new(HOT_HEAP_SIZE).tracking(TrackMode::Fast).flush_interval(Some(FLUSH_EVERY));
    tracked_rep(dir, &opts, HOT_PAGES, time, rep)
}

/// One repetition on a file-backed heap made with `opts`: `pages` pages
/// written once, then `time` of random updates over them.
fn tracked_rep(dir: &Path, opts: &HeapOptions, pages: usize, time: Duration, rep: u32) -> anyhow::Result<HotRep> {
    let path = dir.join(format!("track-{rep}.heap"));
    let heap = Heap::create(&path, opts).map_err(|e| anyhow::anyhow!("Heap::create({}): {e}", path.display()))?;
    let block = hot_set(&heap, pages)?;
    let before = heap.flush_stats().expect("a file-backed heap has flush stats");
    let r = hot_loop(block, pages, time, SEED + u64::from(rep));
    let after = heap.flush_stats().expect("a file-backed heap has flush stats");
    if let Some(p) = &after.poisoned {
        anyhow::bail!("the fast heap's durability was poisoned during hot_update: {p}");
    }
    heap.close().map_err(|e| anyhow::anyhow!("closing {}: {e}", path.display()))?;
    let _ = std::fs::remove_file(&path);
    let flushes = after.flushes - before.flushes;
    let extra = Extra::default()
        .with("cpu_ns_per_op", r.cpu_ns_per_op)
        .with("minor_faults", r.minor_faults as f64)
        .with("flushes", flushes as f64)
        .with("pages_per_flush", (after.pages_flushed - before.pages_flushed) as f64 / flushes.max(1) as f64)
        .with("pause_p50_us", after.pause_p50.as_secs_f64() * 1e6)
        .with("pause_p99_us", after.pause_p99.as_secs_f64() * 1e6);
    Ok(HotRep { ns_per_op: r.ns_per_op, extra })
}

// ---------------------------------------------------------- random_update_1gib

fn random_update(config: &Config, dir: &ScratchDir) -> anyhow::Result<Vec<Measurement>> {
    progress(SUITE, format_args!("random_update_1gib ({} ms per rep and system)", config.hot_time.as_millis()));
    compare_reps(
        config,
        "random_update_1gib",
        |rep| random_rep_untracked(config.hot_time, rep),
        |rep| tracked_rep(dir.path(), &HeapOptions::new(RANDOM_HEAP_SIZE), RANDOM_PAGES, config.hot_time, rep),
    )
}

fn random_rep_untracked(time: Duration, rep: u32) -> anyhow::Result<HotRep> {
    let heap = Heap::create_memfd(&HeapOptions::new(RANDOM_HEAP_SIZE))
        .map_err(|e| anyhow::anyhow!("Heap::create_memfd({} MiB): {e}", RANDOM_HEAP_SIZE >> 20))?;
    let block = hot_set(&heap, RANDOM_PAGES)?;
    let r = hot_loop(block, RANDOM_PAGES, time, SEED + u64::from(rep));
    heap.close().map_err(|e| anyhow::anyhow!("closing the memfd heap: {e}"))?;
    let extra = Extra::default().with("cpu_ns_per_op", r.cpu_ns_per_op).with("minor_faults", r.minor_faults as f64);
    Ok(HotRep { ns_per_op: r.ns_per_op, extra })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_write_runs_on_every_system_and_sees_every_page() {
        let region = SharedRegion::new(4 << 20).unwrap();
        for (name, mode) in FIRST_WRITE_SYSTEMS {
            let (ns, seen) = first_write_rep(&region, mode, 7).unwrap();
            assert!(ns.is_finite() && ns > 0.0, "{name}: {ns}");
            assert_eq!(seen, region.pages() as u64, "{name}");
        }
    }

    #[test]
    fn hot_update_runs_on_both_systems() {
        let dir = ScratchDir::new(&std::env::temp_dir(), "track-test").unwrap();
        let u = hot_rep_untracked(Duration::from_millis(20), 0).unwrap();
        assert!(u.ns_per_op.is_finite() && u.ns_per_op > 0.0);
        // The background flusher runs every 100 ms; a loaded machine can
        // hold a flush up for longer than a short run, so runs grow until
        // one saw a flush.
        let flushed = |f: &HotRep| f.extra.0.iter().any(|&(k, v)| k == "flushes" && v >= 1.0);
        let mut extras = Vec::new();
        for ms in [250, 1000, 4000] {
            let f = hot_rep_fast(dir.path(), Duration::from_millis(ms), 0).unwrap();
            assert!(f.ns_per_op.is_finite() && f.ns_per_op > 0.0);
            if flushed(&f) {
                return;
            }
            extras.push(f.extra);
        }
        panic!("no background flush in 5 s of updates: {extras:?}");
    }
}
