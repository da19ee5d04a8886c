//! One module per suite. A suite takes the started systems (or starts its
//! own variants) and a [`Config`], and returns a
//! [`crate::report::SuiteReport`].

pub mod alloc;
pub mod c;
pub mod cpp;
pub mod failover;
pub mod flush;
pub mod mt;
pub mod pull;
pub mod stall;
pub mod track;
pub mod tx;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

/// How every suite measures.
#[derive(Clone, Debug)]
pub struct Config {
    /// Repetitions per figure; the minimum is reported.
    pub reps: u32,
    /// Length of one repetition (each thread runs until it has spent this).
    pub rep_time: Duration,
    /// Thread counts to run each case on (`alloc`, `tx`).
    pub threads: Vec<usize>,
    /// Where heap baselines and data files go (a directory of the run's
    /// own is made inside it).
    pub dir: PathBuf,
    /// Length of one repetition of `track`'s `hot_update` and `random_update_1gib`.
    pub hot_time: Duration,
    /// Keys of the `c` suite's hash map.
    pub kv_keys: u64,
    /// Keys of the `cpp` suite's map.
    pub map_keys: u64,
    /// Heap sizes of `failover`, in GiB.
    pub heap_gib: Vec<f64>,
    /// Time per system of `flush`'s `stall` case.
    pub stall_time: Duration,
}

/// Every ns/op of each system over `reps` rounds (within a round the
/// systems take turns, so bursts of noise hit them alike).
pub fn all_of<S>(systems: &[S], reps: u32, mut run: impl FnMut(&S) -> f64) -> Vec<Vec<f64>> {
    let mut all = vec![Vec::new(); systems.len()];
    for _ in 0..reps {
        for (system, all) in systems.iter().zip(&mut all) {
            all.push(run(system));
        }
    }
    all
}

/// Says what runs now on stderr, when stderr is a terminal.
pub fn progress(suite: &str, what: std::fmt::Arguments<'_>) {
    if std::io::stderr().is_terminal() {
        eprintln!("remem-bench: {suite} {what} ...");
    }
}

/// Marsaglia's xorshift64: the same sequence for every system.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed` (0 is replaced: xorshift would stay at 0).
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 { 0x9E37_79B9_7F4A_7C15 } else { seed })
    }

    /// The next 64 random bits.
    #[inline(always)]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `0..n` (multiply-shift on the high 32 bits; `n < 2^32`).
    #[inline(always)]
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0 && n <= u32::MAX as u64);
        ((self.next_u64() >> 32) * n) >> 32
    }
}

/// `count` distinct values of `0..n`, sorted ascending, drawn by a partial
/// Fisher–Yates shuffle seeded with `seed`.
pub fn sample_sorted(n: u64, count: usize, seed: u64) -> Vec<u64> {
    assert!(count as u64 <= n, "cannot draw {count} distinct values from {n}");
    let mut all: Vec<u64> = (0..n).collect();
    let mut rng = Rng::new(seed);
    for i in 0..count {
        let j = i + rng.below(n - i as u64) as usize;
        all.swap(i, j);
    }
    all.truncate(count);
    all.sort_unstable();
    all
}

/// The `q` quantile (0..=1) of `values` by nearest rank (the same rule as
/// remem's `FlushStats`); 0 for no values.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_is_distinct_sorted_in_range_and_fixed() {
        let a = sample_sorted(1000, 100, 7);
        assert_eq!(a.len(), 100);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert!(a.iter().all(|&x| x < 1000));
        assert_eq!(a, sample_sorted(1000, 100, 7));
        assert_ne!(a, sample_sorted(1000, 100, 8));
        // Spread: not bunched at the start.
        assert!(*a.last().unwrap() > 500 && a[0] < 500);
    }

    #[test]
    fn quantile_by_nearest_rank() {
        assert_eq!(quantile(&[], 0.5), 0.0);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), 2.0);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.99), 3.0);
    }

    #[test]
    fn below_stays_below() {
        let mut r = Rng::new(1);
        assert!((0..10_000).all(|_| r.below(4096) < 4096));
    }
}
