//! `alloc`: the cost of allocation and free.
//!
//! - `alloc_free_64`: allocate 64 B, write its first byte, free it; one op is
//!   the pair.
//! - `mixed_16_4096`: a ring of [`WORKING_SET`] live objects with sizes drawn
//!   uniformly from 16 B–4 KiB by a fixed-seed xorshift; one op frees the
//!   oldest object and allocates (and writes the first byte of) a new one.
//!
//! Each case runs on 1 and 2 threads; with 2, each thread runs its own loop
//! on the same system at once and the figure is ns per op per thread,
//! averaged over the threads. Each repetition runs every system in turn
//! (so a burst of noise on the shared machine hits them alike), and the
//! figure is the median repetition, with the fastest and slowest as
//! `min_ns` / `max_ns` (no best-of that hides a slow repetition).

use std::hint::black_box;
use std::io::IsTerminal;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use super::{all_of, Config};
use crate::peers::{Peer, PeerVisitor, System};
use crate::report::{Extra, Measurement, SuiteReport, BASELINE};

/// Suite name on the command line and in the report.
pub const SUITE: &str = "alloc";
/// Live objects per thread in `mixed_16_4096` (a power of two).
pub const WORKING_SET: usize = 1024;
/// Smallest and largest size in `mixed_16_4096`.
const MIXED_MIN: usize = 16;
const MIXED_MAX: usize = 4096;
/// Seed of the size sequence; thread `t` uses `SEED + t`.
const SEED: u64 = 0x9E37_79B9_7F4A_7C15;
/// Ops between two looks at the clock.
const BATCH: u64 = 256;
/// Untimed ops each thread runs before the timed loop, to fill its caches.
const WARMUP: u64 = 16 * BATCH;

/// The cases of the suite.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Case {
    /// 64 B alloc immediately followed by free.
    AllocFree64,
    /// Free the oldest of a ring of live objects, allocate a new one.
    Mixed16To4096,
}

impl Case {
    /// Every case, in report order.
    pub const ALL: [Case; 2] = [Case::AllocFree64, Case::Mixed16To4096];

    /// Name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Case::AllocFree64 => "alloc_free_64",
            Case::Mixed16To4096 => "mixed_16_4096",
        }
    }

    /// What one op is, for the table's legend.
    fn op(self) -> String {
        match self {
            Case::AllocFree64 => "one op = alloc 64 B, write its first byte, free it".to_owned(),
            Case::Mixed16To4096 => format!(
                "one op = free the oldest of {WORKING_SET} live objects, alloc a new one of \
                 {MIXED_MIN}-{MIXED_MAX} B (xorshift, fixed seed), write its first byte"
            ),
        }
    }
}

/// Runs every case on every thread count on every system.
pub fn run(systems: &[System], config: &Config) -> SuiteReport {
    let progress = std::io::stderr().is_terminal();
    let mut measurements = Vec::new();
    for case in Case::ALL {
        for &threads in &config.threads {
            if progress {
                eprintln!("remem-bench: {SUITE} {} on {threads} thread(s) ...", case.name());
            }
            let all = all_of(systems, config.reps, |system| {
                system.visit(&mut RunCase { case, threads, rep_time: config.rep_time })
            });
            for (system, runs) in systems.iter().zip(all) {
                measurements.push(Measurement {
                    suite: SUITE,
                    case: case.name(),
                    system: system.name(),
                    ns_per_op: crate::native::median(&runs),
                    threads,
                    reps: config.reps,
                    extra: Extra::default()
                        .with("min_ns", runs.iter().copied().fold(f64::INFINITY, f64::min))
                        .with("max_ns", runs.iter().copied().fold(0.0, f64::max)),
                });
            }
        }
    }
    let mut legend: Vec<String> = Case::ALL.iter().map(|c| format!("{}: {}", c.name(), c.op())).collect();
    legend.push(format!(
        "ns/op per thread, the median of {} reps of {} ms (min_ns/max_ns the fastest and slowest); with N \
         threads each runs its own loop at once",
        config.reps,
        config.rep_time.as_millis()
    ));
    SuiteReport { suite: SUITE, baseline: BASELINE, legend, measurements }
}

/// One repetition of one case on one system: ns per op per thread.
pub(crate) struct RunCase {
    pub(crate) case: Case,
    pub(crate) threads: usize,
    pub(crate) rep_time: Duration,
}

impl PeerVisitor for RunCase {
    type Output = f64;

    fn visit<P: Peer>(&mut self, peer: &P) -> f64 {
        let barrier = Barrier::new(self.threads);
        let (case, rep_time) = (self.case, self.rep_time);
        let total: f64 = std::thread::scope(|s| {
            let workers: Vec<_> = (0..self.threads)
                .map(|t| {
                    let barrier = &barrier;
                    s.spawn(move || match case {
                        Case::AllocFree64 => alloc_free_64(peer, barrier, rep_time),
                        Case::Mixed16To4096 => mixed(peer, SEED + t as u64, barrier, rep_time),
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).sum()
        });
        total / self.threads as f64
    }
}

/// Allocates `size` bytes and writes the first one, the same way for every
/// system; panics if the system is out of memory (the figure would be void).
#[inline(always)]
fn alloc_touch<P: Peer>(peer: &P, size: usize, byte: u8) -> *mut u8 {
    let p = peer.alloc(size);
    if p.is_null() {
        alloc_failed(peer.name(), size);
    }
    // SAFETY: `p` is non-null, so by `Peer`'s contract it points to at least
    // `size >= 1` writable bytes of a fresh allocation.
    unsafe { p.write(byte) };
    black_box(p)
}

#[cold]
#[inline(never)]
fn alloc_failed(system: &str, size: usize) -> ! {
    panic!("{system}: allocating {size} B failed; the figures would be void")
}

/// Timed loop of 64 B alloc+free pairs; ns per pair.
fn alloc_free_64<P: Peer>(peer: &P, start_together: &Barrier, rep_time: Duration) -> f64 {
    let pair = |i: u64| {
        let p = alloc_touch(peer, 64, i as u8);
        // SAFETY: `p` came from `peer.alloc(64)` just now and is freed once.
        unsafe { peer.free(p, 64) };
    };
    (0..WARMUP).for_each(pair);
    start_together.wait();
    let start = Instant::now();
    let mut ops = 0u64;
    loop {
        (ops..ops + BATCH).for_each(pair);
        ops += BATCH;
        let elapsed = start.elapsed();
        if elapsed >= rep_time {
            return elapsed.as_nanos() as f64 / ops as f64;
        }
    }
}

/// Timed loop over a ring of live objects; ns per free+alloc step.
fn mixed<P: Peer>(peer: &P, seed: u64, start_together: &Barrier, rep_time: Duration) -> f64 {
    let mut sizes = XorShift64::new(seed);
    // The ring itself lives in the process's malloc, allocated before the
    // clock starts; it holds (pointer, size) of each live object.
    let mut ring: Vec<(*mut u8, usize)> = (0..WORKING_SET)
        .map(|i| {
            let size = sizes.size();
            (alloc_touch(peer, size, i as u8), size)
        })
        .collect();
    let mut next = 0usize;
    let mut step = |i: u64| {
        let (old, old_size) = ring[next];
        // SAFETY: `old` came from `peer.alloc(old_size)` and is still live:
        // each slot is freed once before it is refilled.
        unsafe { peer.free(old, old_size) };
        let size = sizes.size();
        ring[next] = (alloc_touch(peer, size, i as u8), size);
        next = (next + 1) & (WORKING_SET - 1);
    };
    (0..WARMUP).for_each(&mut step);
    start_together.wait();
    let start = Instant::now();
    let mut ops = 0u64;
    let ns_per_op = loop {
        (ops..ops + BATCH).for_each(&mut step);
        ops += BATCH;
        let elapsed = start.elapsed();
        if elapsed >= rep_time {
            break elapsed.as_nanos() as f64 / ops as f64;
        }
    };
    for (p, size) in ring {
        // SAFETY: every slot holds a live allocation of `size` bytes from
        // `peer`, freed once here.
        unsafe { peer.free(p, size) };
    }
    ns_per_op
}

/// Marsaglia's xorshift64: the same size sequence for every system.
struct XorShift64(u64);

impl XorShift64 {
    fn new(seed: u64) -> Self {
        XorShift64(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `MIXED_MIN..=MIXED_MAX` (multiply-shift, no division).
    fn size(&mut self) -> usize {
        let span = (MIXED_MAX - MIXED_MIN + 1) as u64;
        MIXED_MIN + (((self.next() >> 32) * span) >> 32) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_stay_in_range_and_cover_it() {
        let mut rng = XorShift64::new(SEED);
        let sizes: Vec<usize> = (0..100_000).map(|_| rng.size()).collect();
        assert!(sizes.iter().all(|&s| (MIXED_MIN..=MIXED_MAX).contains(&s)));
        assert!(sizes.iter().any(|&s| s < MIXED_MIN + 64));
        assert!(sizes.iter().any(|&s| s > MIXED_MAX - 64));
    }

    #[test]
    fn size_sequence_is_fixed() {
        let a: Vec<usize> = {
            let mut r = XorShift64::new(SEED);
            (0..8).map(|_| r.size()).collect()
        };
        let b: Vec<usize> = {
            let mut r = XorShift64::new(SEED);
            (0..8).map(|_| r.size()).collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn every_case_runs_on_glibc() {
        let glibc = crate::peers::Glibc;
        for case in Case::ALL {
            for threads in [1, 2] {
                let ns = RunCase { case, threads, rep_time: Duration::from_millis(5) }.visit(&glibc);
                assert!(ns.is_finite() && ns > 0.0, "{case:?} {threads}: {ns}");
            }
        }
    }
}
