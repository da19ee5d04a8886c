//! `flush` case `stall`: what background flushes cost the latency of a
//! database's transactions, the slow ones above all.
//!
//! One op is one update transaction through the Rust API (`Heap::tx`:
//! `add_range` of a 64 B object, the object rewritten, commit) on an object
//! drawn at random (xorshift, fixed seed) from [`OBJECTS`] objects of 64 B,
//! each allocated with `Heap::alloc(64)`: a working set of 64 MiB in a
//! 1 GiB heap. Each transaction is timed on its own (`Instant::now()`
//! before and after, so both systems pay the clock reads); the latencies
//! go to a log-linear histogram (1/64 relative resolution; the maximum is
//! exact).
//!
//! - `remem`: `Heap::create` with the default options (`TrackMode::Fast`,
//!   background flush every second): the flusher pre-copies, pauses for
//!   the cut, commits and compacts while the transactions run.
//! - `untracked`: `Heap::create_memfd` (no tracking, no flushing), the
//!   same objects and transactions.
//!
//! Both heaps are filled before the clock starts; then the systems take
//! turns, [`SEGMENTS`] segments each of `--stall-ms / SEGMENTS`, so that
//! noise on the machine hits both alike. Every transaction of every
//! segment counts (no best-of). `flushes` and `pages_per_flush` are
//! remem's background flushes committed during its segments, and the
//! pages they wrote; `pause_max_us` is the longest flush pause of the run.
//! Single-threaded (the flusher is remem's own thread).

use std::time::{Duration, Instant};

use remem_alloc::{Heap, HeapOptions, TxError};

use super::{progress, Config, Rng};
use crate::report::{Extra, Measurement};
use crate::scratch::ScratchDir;

/// Objects in the working set.
pub const OBJECTS: usize = 1 << 20;
/// Bytes per object (and per update).
pub const OBJECT: usize = 64;
/// Heap size.
const HEAP_SIZE: u64 = 1 << 30;
/// Turns per system.
const SEGMENTS: u32 = 2;
/// Target: the slowest remem transaction.
const TARGET_MAX: Duration = Duration::from_millis(1);
/// Target: remem's p99.9 within this factor of untracked's.
const TARGET_P999: f64 = 2.0;
/// Seed of the object choice.
const SEED: u64 = 0x2545_F491_4F6C_DD1D;

/// A log-linear latency histogram: exact below 128 ns, then 64 buckets per
/// power of two.
pub struct Histogram {
    counts: Vec<u64>,
    max: u64,
    total: u128,
    n: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        // 128 exact buckets, then 64 per power of two from 2^7 to 2^63.
        Histogram { counts: vec![0; 128 + 57 * 64], max: 0, total: 0, n: 0 }
    }
}

impl Histogram {
    fn index(v: u64) -> usize {
        if v < 128 {
            return v as usize;
        }
        let e = 63 - v.leading_zeros() as usize; // >= 7
        let sub = (v >> (e - 6)) as usize - 64;
        128 + (e - 7) * 64 + sub
    }

    /// The middle of bucket `i`.
    fn value(i: usize) -> u64 {
        if i < 128 {
            return i as u64;
        }
        let (e, sub) = ((i - 128) / 64 + 7, ((i - 128) % 64) as u64);
        let lo = (64 + sub) << (e - 6);
        lo + (1u64 << (e - 6)) / 2
    }

    /// Records one latency in ns.
    #[inline]
    pub fn record(&mut self, ns: u64) {
        self.counts[Self::index(ns)] += 1;
        self.max = self.max.max(ns);
        self.total += u128::from(ns);
        self.n += 1;
    }

    /// The `q` quantile (nearest rank), in ns; the exact maximum for q = 1.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.n == 0 {
            return 0;
        }
        if q >= 1.0 {
            return self.max;
        }
        let rank = ((self.n as f64 * q).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i).min(self.max);
            }
        }
        self.max
    }

    /// Mean in ns.
    pub fn mean(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.total as f64 / self.n as f64
        }
    }
}

/// One system's heap and objects.
struct Subject {
    heap: Heap,
    objects: Vec<usize>,
    hist: Histogram,
    rng: Rng,
}

impl Subject {
    fn new(heap: Heap) -> anyhow::Result<Subject> {
        let mut objects = Vec::with_capacity(OBJECTS);
        for i in 0..OBJECTS {
            let p = heap.alloc(OBJECT).map_err(|e| anyhow::anyhow!("allocating object {i}: {e}"))?;
            // SAFETY: a fresh 64 B block of ours.
            unsafe { std::ptr::write_bytes(p.as_ptr(), i as u8, OBJECT) };
            objects.push(p.as_ptr() as usize);
        }
        Ok(Subject { heap, objects, hist: Histogram::default(), rng: Rng::new(SEED) })
    }

    /// Runs update transactions for `time`.
    fn run(&mut self, time: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + time;
        let mut stamp = 0u64;
        loop {
            for _ in 0..256 {
                let p = self.objects[self.rng.below(OBJECTS as u64) as usize] as *mut u8;
                stamp += 1;
                let t = Instant::now();
                self.heap.tx(|tx| {
                    tx.add_range(p, OBJECT)?;
                    // SAFETY: `p` is one of our 64 B objects, logged above.
                    unsafe { std::ptr::write_bytes(p, stamp as u8, OBJECT) };
                    Ok::<_, TxError>(())
                })?;
                self.hist.record(t.elapsed().as_nanos() as u64);
            }
            if Instant::now() >= end {
                return Ok(());
            }
        }
    }
}

/// Runs the case; returns its two measurements and legend lines.
pub fn run(config: &Config, dir: &ScratchDir) -> anyhow::Result<(Vec<Measurement>, Vec<String>)> {
    let path = dir.path().join("stall.heap");
    progress(super::flush::SUITE, format_args!("stall: allocating {OBJECTS} objects in each heap"));
    let remem = Heap::create(&path, &HeapOptions::new(HEAP_SIZE))
        .map_err(|e| anyhow::anyhow!("Heap::create({}): {e}", path.display()))?;
    let mut remem = Subject::new(remem)?;
    let untracked =
        Heap::create_memfd(&HeapOptions::new(HEAP_SIZE)).map_err(|e| anyhow::anyhow!("Heap::create_memfd: {e}"))?;
    let mut untracked = Subject::new(untracked)?;
    let segment = config.stall_time / SEGMENTS;
    let (mut flushes, mut pages) = (0u64, 0u64);
    let mut remem_time = Duration::ZERO;
    progress(super::flush::SUITE, format_args!("stall: {} per system", humantime(config.stall_time)));
    for s in 0..SEGMENTS {
        untracked.run(segment)?;
        let before = remem.heap.flush_stats().expect("a file-backed heap has flush stats");
        let t = Instant::now();
        remem.run(segment)?;
        remem_time += t.elapsed();
        let after = remem.heap.flush_stats().expect("a file-backed heap has flush stats");
        flushes += after.flushes - before.flushes;
        pages += after.pages_flushed - before.pages_flushed;
        let _ = s;
    }
    let stats = remem.heap.flush_stats().expect("a file-backed heap has flush stats");
    let pause_max = stats.pause_max;
    drop(untracked.heap);
    remem.heap.close().map_err(|e| anyhow::anyhow!("closing {}: {e}", path.display()))?;

    let m = |system, h: &Histogram, extra: Extra| Measurement {
        suite: super::flush::SUITE,
        case: "stall",
        system,
        ns_per_op: h.mean(),
        threads: 1,
        reps: SEGMENTS,
        extra: Extra::default()
            .with("p50_ns", h.quantile(0.5) as f64)
            .with("p99_ns", h.quantile(0.99) as f64)
            .with("p999_ns", h.quantile(0.999) as f64)
            .with("max_ns", h.max as f64)
            .with("txs", h.n as f64)
            .with_all(extra),
    };
    let per_flush = if flushes == 0 { 0.0 } else { (pages as f64 / flushes as f64).round() };
    let measurements = vec![
        m(
            "remem",
            &remem.hist,
            Extra::default()
                .with("flushes", flushes as f64)
                .with("pages_per_flush", per_flush)
                .with("pause_p50_us", stats.pause_p50.as_secs_f64() * 1e6)
                .with("pause_max_us", pause_max.as_secs_f64() * 1e6)
                .with("pages_copied_per_flush", stats.pages_copied as f64 / stats.flushes.max(1) as f64)
                .with("throttled_flushes", stats.throttled_flushes as f64),
        ),
        m("untracked", &untracked.hist, Extra::default().with("flushes", 0.0).with("pages_per_flush", 0.0)),
    ];
    let (r, u) = (&remem.hist, &untracked.hist);
    let p999_ratio = r.quantile(0.999) as f64 / u.quantile(0.999).max(1) as f64;
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let legend = vec![
        format!(
            "stall: one op = one update transaction (Rust API: Heap::tx, add_range of a 64 B object, rewrite, \
             commit) on a random object of {OBJECTS} x {OBJECT} B ({} MiB working set) in a {} MiB heap; \
             remem = Heap::create, default options (TrackMode::Fast, background flush every second); \
             untracked = Heap::create_memfd (no tracking, no flush); {SEGMENTS} alternating segments of {} \
             per system, every transaction timed; ns_per_op = mean",
            (OBJECTS * OBJECT) >> 20,
            HEAP_SIZE >> 20,
            humantime(segment)
        ),
        format!(
            "stall: remem ran {flushes} background flushes in {:.1} s ({per_flush} pages each, {} copied per \
             flush with the pre-copy rounds; {} throttled); flush pauses p50 {:.0} us, max {:.0} us",
            remem_time.as_secs_f64(),
            (stats.pages_copied as f64 / stats.flushes.max(1) as f64).round(),
            stats.throttled_flushes,
            stats.pause_p50.as_secs_f64() * 1e6,
            pause_max.as_secs_f64() * 1e6,
        ),
        format!(
            "stall targets: max <= {} us: remem max {:.0} us ({}); p99.9 <= {TARGET_P999}x untracked: {:.2}x ({})",
            TARGET_MAX.as_micros(),
            r.max as f64 / 1e3,
            met(r.max as u128 <= TARGET_MAX.as_nanos()),
            p999_ratio,
            met(p999_ratio <= TARGET_P999),
        ),
    ];
    Ok((measurements, legend))
}

fn humantime(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_within_resolution() {
        let mut h = Histogram::default();
        for v in 1..=100_000u64 {
            h.record(v);
        }
        h.record(5_000_000);
        let p50 = h.quantile(0.5) as f64;
        assert!((p50 - 50_000.0).abs() / 50_000.0 < 0.02, "{p50}");
        let p99 = h.quantile(0.99) as f64;
        assert!((p99 - 99_000.0).abs() / 99_000.0 < 0.02, "{p99}");
        assert_eq!(h.quantile(1.0), 5_000_000);
        assert_eq!(h.max, 5_000_000);
        assert_eq!(Histogram::index(127), 127);
        assert_eq!(Histogram::value(Histogram::index(100)), 100);
        // Every bucket's middle maps back to the bucket.
        for i in 0..h.counts.len() {
            assert_eq!(Histogram::index(Histogram::value(i)), i, "bucket {i}");
        }
    }
}
