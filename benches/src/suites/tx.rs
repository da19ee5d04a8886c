//! `tx`: the cost of a small undo-log transaction, remem against PMDK.
//!
//! - `tx_update_64`: begin, log 64 B of an existing block (allocated per
//!   thread before the clock starts), overwrite those 64 B, commit; one op
//!   is the whole transaction.
//! - `tx_alloc_64`: begin, allocate 64 B inside the transaction, commit; one
//!   op is the whole transaction. The clock runs over batches of [`BATCH`]
//!   transactions; after each batch it stops while the batch's blocks are
//!   freed with the system's plain (non-transactional) free, so every system
//!   allocates from the same steady state and no free is timed.
//!
//! remem: a file-backed heap of 1 GiB made as a user gets it
//! (`Heap::create` with its defaults: fast tracking, background flush every
//! second, which runs during the repetitions), through
//! `Heap::tx_begin` / `tx_add_range` / `tx_alloc` / `tx_commit`. PMDK: the
//! pool of the `alloc` suite (on /dev/shm, `PMEM_IS_PMEM_FORCE=1`), through
//! `pmemobj_tx_begin(pop, NULL, TX_PARAM_NONE)` / `pmemobj_tx_add_range` /
//! `pmemobj_tx_alloc` / `pmemobj_tx_commit` / `pmemobj_tx_end`, the stage
//! checked after each commit. Every step's result is checked on both.
//!
//! As in `alloc`, each repetition runs every system in turn, each case runs
//! on every `--threads` count (each thread its own loop and its own block),
//! and the figure is the median repetition (`min_ns`, `max_ns`: the
//! fastest and the slowest).

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use super::{all_of, progress, Config};
use crate::native::median;
use crate::peers::{TxPeer, TxSystem, TxVisitor};
use crate::report::{Extra, Measurement, SuiteReport, BASELINE};

/// Suite name on the command line and in the report.
pub const SUITE: &str = "tx";
/// Bytes logged and written by `tx_update_64`, allocated by `tx_alloc_64`.
const SIZE: usize = 64;
/// Transactions between two looks at the clock (and, in `tx_alloc_64`,
/// between two untimed rounds of frees).
const BATCH: usize = 256;
/// Untimed batches each thread runs before the timed loop.
const WARMUP_BATCHES: usize = 16;

/// The cases of the suite.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Case {
    /// Log and overwrite 64 B of an existing block.
    Update64,
    /// Allocate 64 B inside a transaction.
    Alloc64,
}

impl Case {
    /// Every case, in report order.
    pub const ALL: [Case; 2] = [Case::Update64, Case::Alloc64];

    /// Name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Case::Update64 => "tx_update_64",
            Case::Alloc64 => "tx_alloc_64",
        }
    }

    /// What one op is, for the table's legend.
    fn op(self) -> String {
        match self {
            Case::Update64 => {
                format!("one op = tx begin, add_range {SIZE} B of a live block, write the {SIZE} B, commit")
            }
            Case::Alloc64 => format!(
                "one op = tx begin, tx alloc {SIZE} B, commit; every {BATCH} ops the clock stops and \
                 the {BATCH} blocks are freed (plain free, untimed)"
            ),
        }
    }
}

/// Runs every case on every thread count on every system.
pub fn run(systems: &[TxSystem], config: &Config) -> SuiteReport {
    let mut measurements = Vec::new();
    for case in Case::ALL {
        for &threads in &config.threads {
            progress(SUITE, format_args!("{} on {threads} thread(s)", case.name()));
            let all = all_of(systems, config.reps, |system| {
                system.visit(&mut RunCase { case, threads, rep_time: config.rep_time })
            });
            for (system, ns) in systems.iter().zip(all) {
                let lo = ns.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = ns.iter().copied().fold(0.0, f64::max);
                measurements.push(Measurement {
                    suite: SUITE,
                    case: case.name(),
                    system: system.name(),
                    ns_per_op: median(&ns),
                    threads,
                    reps: config.reps,
                    extra: Extra::default().with("min_ns", lo).with("max_ns", hi),
                });
            }
        }
    }
    let mut legend: Vec<String> = Case::ALL.iter().map(|c| format!("{}: {}", c.name(), c.op())).collect();
    legend.push(
        "remem: Heap::create, 1 GiB, with its defaults (fast tracking, background flush every second, running \
         during the reps); pmdk: pool on /dev/shm, PMEM_IS_PMEM_FORCE=1, pmemobj_tx_* calls with a NULL jmp_buf"
            .to_owned(),
    );
    legend.push(super::c::DURABILITY.to_owned());
    legend.push(format!(
        "ns/op per thread, median of {} reps of {} ms (min_ns, max_ns: fastest and slowest); with N threads \
         each runs its own loop at once",
        config.reps,
        config.rep_time.as_millis()
    ));
    legend.extend(verdicts(&measurements));
    SuiteReport { suite: SUITE, baseline: BASELINE, legend, measurements }
}

/// "pmdk/remem = 14.2x on tx_update_64 (1 thread): target >= 10x met".
fn verdicts(ms: &[Measurement]) -> Vec<String> {
    let mut out = Vec::new();
    for r in ms.iter().filter(|m| m.system == BASELINE) {
        for p in ms.iter().filter(|m| m.system == "pmdk" && m.case == r.case && m.threads == r.threads) {
            let x = p.ns_per_op / r.ns_per_op;
            out.push(format!(
                "target pmdk/remem >= 10x on {} ({} thread(s)): {x:.1}x, {}",
                r.case,
                r.threads,
                if x >= 10.0 { "met" } else { "NOT met" }
            ));
        }
    }
    out
}

/// One repetition of one case on one system: ns per op per thread.
pub(crate) struct RunCase {
    pub(crate) case: Case,
    pub(crate) threads: usize,
    pub(crate) rep_time: Duration,
}

impl TxVisitor for RunCase {
    type Output = f64;

    fn visit<P: TxPeer>(&mut self, peer: &P) -> f64 {
        let barrier = Barrier::new(self.threads);
        let (case, rep_time) = (self.case, self.rep_time);
        let total: f64 = std::thread::scope(|s| {
            let workers: Vec<_> = (0..self.threads)
                .map(|_| {
                    let barrier = &barrier;
                    s.spawn(move || match case {
                        Case::Update64 => tx_update(peer, barrier, rep_time),
                        Case::Alloc64 => tx_alloc(peer, barrier, rep_time),
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).sum()
        });
        total / self.threads as f64
    }
}

/// Timed loop of update transactions on one block of this thread; ns per
/// transaction.
fn tx_update<P: TxPeer>(peer: &P, start_together: &Barrier, rep_time: Duration) -> f64 {
    let block = peer.alloc(SIZE);
    assert!(!block.is_null(), "{}: allocating the {SIZE} B block to update failed", peer.name());
    let tx = |i: usize| {
        // SAFETY: `block` is a live block of `SIZE` bytes from `peer`, used by
        // this thread only.
        unsafe { peer.tx_update(block, SIZE, i as u8) };
    };
    (0..WARMUP_BATCHES * BATCH).for_each(tx);
    start_together.wait();
    let start = Instant::now();
    let mut ops = 0usize;
    let ns_per_op = loop {
        (ops..ops + BATCH).for_each(tx);
        ops += BATCH;
        let elapsed = start.elapsed();
        if elapsed >= rep_time {
            break elapsed.as_nanos() as f64 / ops as f64;
        }
    };
    black_box(block);
    // SAFETY: `block` came from `peer.alloc(SIZE)` and is freed once.
    unsafe { peer.free(block, SIZE) };
    ns_per_op
}

/// Timed batches of allocating transactions, each batch's blocks freed
/// outside the clock; ns per transaction.
fn tx_alloc<P: TxPeer>(peer: &P, start_together: &Barrier, rep_time: Duration) -> f64 {
    // Allocated once, before the clock: pushing is a store, never a realloc.
    let mut blocks: Vec<*mut u8> = Vec::with_capacity(BATCH);
    let batch = |blocks: &mut Vec<*mut u8>| {
        for _ in 0..BATCH {
            blocks.push(black_box(peer.tx_alloc(SIZE)));
        }
    };
    let free_all = |blocks: &mut Vec<*mut u8>| {
        for p in blocks.drain(..) {
            // SAFETY: `p` came from `peer.tx_alloc(SIZE)`, whose transaction
            // committed, and is freed once.
            unsafe { peer.free(p, SIZE) };
        }
    };
    for _ in 0..WARMUP_BATCHES {
        batch(&mut blocks);
        free_all(&mut blocks);
    }
    start_together.wait();
    let mut timed = Duration::ZERO;
    let mut ops = 0usize;
    while timed < rep_time {
        let start = Instant::now();
        batch(&mut blocks);
        timed += start.elapsed();
        ops += BATCH;
        free_all(&mut blocks);
    }
    timed.as_nanos() as f64 / ops as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_says_whether_the_target_is_met() {
        let m = |system, ns| Measurement {
            suite: SUITE,
            case: "tx_update_64",
            system,
            ns_per_op: ns,
            threads: 1,
            reps: 1,
            extra: Extra::default(),
        };
        let v = verdicts(&[m("remem", 100.0), m("pmdk", 1500.0)]);
        assert_eq!(v.len(), 1);
        assert!(v[0].contains("15.0x, met"), "{v:?}");
        let v = verdicts(&[m("remem", 100.0), m("pmdk", 500.0)]);
        assert!(v[0].contains("NOT met"), "{v:?}");
    }

    #[test]
    fn every_case_runs_on_pmdk() {
        // Without PMEM_IS_PMEM_FORCE (main sets it; tests cannot safely)
        // PMDK msyncs, which is slow but correct.
        let pmdk = match crate::peers::Pmdk::open() {
            Ok(p) => p,
            Err(why) => return eprintln!("skipped: {why}"),
        };
        for case in Case::ALL {
            let ns = RunCase { case, threads: 2, rep_time: Duration::from_millis(5) }.visit(&pmdk);
            assert!(ns.is_finite() && ns > 0.0, "{case:?}: {ns}");
        }
    }

    #[test]
    fn every_case_runs_on_remem() {
        let dir = std::env::temp_dir();
        let remem = crate::peers::Remem::open_for_tx(&dir).expect("remem heap");
        for case in Case::ALL {
            for threads in [1, 2] {
                let ns = RunCase { case, threads, rep_time: Duration::from_millis(5) }.visit(&remem);
                assert!(ns.is_finite() && ns > 0.0, "{case:?} {threads}: {ns}");
            }
        }
    }
}
