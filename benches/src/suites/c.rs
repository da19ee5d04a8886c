//! `c`: remem as a C program sees it, through `libremem.so` and `remem.h`
//! (the program is `benches/c/cbench.c`, built and run by
//! [`crate::native`]).
//!
//! - `c_alloc_free_64`: `remem_alloc(64)`, write its first byte,
//!   `remem_free`; one op is the pair. Against `malloc`/`free` of glibc,
//!   jemalloc and mimalloc (the same program linked plainly, with
//!   `-ljemalloc`, with `-lmimalloc`), and against remem's Rust path
//!   (`Heap::alloc`/`Heap::free` in this process, `remem_rust`). On each
//!   thread count; with N threads each runs its own loop at once.
//! - `c_tx_update_64`: `remem_tx_begin`, `remem_tx_add_range` of a 64 B
//!   block, overwrite it, `remem_tx_commit`; against PMDK
//!   (`pmemobj_tx_begin`, `pmemobj_tx_add_range_direct`,
//!   `pmemobj_tx_commit`, `pmemobj_tx_end`) and remem's Rust path.
//! - `kv_insert_tx`, `kv_update_tx`, `kv_lookup`: one chained hash map
//!   (bucket array + entries {key, next, 64 B value}) of `--kv-keys`
//!   random keys, the same code on remem and on PMDK: each insert and
//!   each update is its own transaction (allocate the entry and log the
//!   bucket; log and overwrite the value), lookups of random keys run
//!   outside transactions. 1 thread.
//!
//! Every remem heap is made the way a user gets it: `remem_create()` with
//! its defaults (fast write tracking, background flush every second; the
//! Rust path uses `HeapOptions::new`, the same defaults). Each repetition
//! runs every system in turn; the figure is the median repetition, with
//! the fastest and slowest beside it.

use super::{alloc, progress, tx, Config};
use crate::native::{median, run, Lang, Toolchain};
use crate::peers::{PeerVisitor, Remem, TxVisitor};
use crate::report::{Extra, Measurement, SuiteReport, BASELINE};
use crate::scratch::ScratchDir;

/// Suite name on the command line and in the report.
pub const SUITE: &str = "c";

/// What remem's and PMDK's commits guarantee, for the legend and the README.
pub const DURABILITY: &str = "durability differs: a remem commit is atomic in DRAM at once (it survives \
     the death of the process: the agent holds the memory) and reaches the baseline file at the next \
     background flush (at most ~1 s later, plus the flush itself; a host loss loses what is younger); a \
     PMDK commit flushes its cache lines and fences before it returns (durable at commit on real \
     persistent memory; here the pool is on /dev/shm, DRAM, with PMEM_IS_PMEM_FORCE=1)";

/// The figures of one (case, threads, system), one per repetition.
pub(crate) struct Samples {
    case: &'static str,
    threads: usize,
    system: &'static str,
    ns: Vec<f64>,
}

/// Every figure of a suite, grouped by (case, threads, system).
#[derive(Default)]
pub(crate) struct Table(Vec<Samples>);

impl Table {
    pub(crate) fn push(&mut self, case: &'static str, threads: usize, system: &'static str, ns: f64) {
        match self.0.iter_mut().find(|s| s.case == case && s.threads == threads && s.system == system) {
            Some(s) => s.ns.push(ns),
            None => self.0.push(Samples { case, threads, system, ns: vec![ns] }),
        }
    }

    /// The medians, in the order first seen.
    pub(crate) fn measurements(self, suite: &'static str) -> Vec<Measurement> {
        self.0
            .into_iter()
            .map(|s| {
                let lo = s.ns.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = s.ns.iter().copied().fold(0.0, f64::max);
                Measurement {
                    suite,
                    case: s.case,
                    system: s.system,
                    ns_per_op: median(&s.ns),
                    threads: s.threads,
                    reps: s.ns.len() as u32,
                    extra: Extra::default().with("min_ns", lo).with("max_ns", hi),
                }
            })
            .collect()
    }
}

/// Runs every case.
pub fn run_suite(config: &Config, kv_keys: u64) -> anyhow::Result<SuiteReport> {
    let tc = Toolchain::new()?;
    let plain = tc.build("cbench", "cbench.c", Lang::C, &["-lpmemobj"])?;
    let je = tc.build("cbench-jemalloc", "cbench.c", Lang::C, &["-lpmemobj", "-ljemalloc"])?;
    let mi = tc.build("cbench-mimalloc", "cbench.c", Lang::C, &["-lpmemobj", "-lmimalloc"])?;
    let dir = ScratchDir::new(&config.dir, "c").map_err(anyhow::Error::msg)?;
    let d = dir.path().display().to_string();
    let ms = config.rep_time.as_millis().max(1).to_string();
    let rust = Remem::open(dir.path()).map_err(anyhow::Error::msg)?;
    let mut table = Table::default();

    for &threads in &config.threads {
        progress(SUITE, format_args!("c_alloc_free_64 on {threads} thread(s)"));
        for _ in 0..config.reps {
            for (system, exe, arg) in [
                ("remem", &plain, "remem"),
                ("glibc", &plain, "malloc"),
                ("jemalloc", &je, "malloc"),
                ("mimalloc", &mi, "malloc"),
            ] {
                let args = ["alloc_free_64".into(), threads.to_string(), ms.clone(), d.clone(), arg.into()];
                for (_, ns) in run(exe, &args)? {
                    table.push("c_alloc_free_64", threads, system, ns);
                }
            }
            let ns = alloc::RunCase { case: alloc::Case::AllocFree64, threads, rep_time: config.rep_time }.visit(&rust);
            table.push("c_alloc_free_64", threads, "remem_rust", ns);
        }
    }
    for &threads in &config.threads {
        progress(SUITE, format_args!("c_tx_update_64 on {threads} thread(s)"));
        for _ in 0..config.reps {
            for system in ["remem", "pmdk"] {
                let args = ["tx_update_64".into(), threads.to_string(), ms.clone(), d.clone(), system.into()];
                for (_, ns) in run(&plain, &args)? {
                    table.push("c_tx_update_64", threads, system, ns);
                }
            }
            let ns = tx::RunCase { case: tx::Case::Update64, threads, rep_time: config.rep_time }.visit(&rust);
            table.push("c_tx_update_64", threads, "remem_rust", ns);
        }
    }
    drop(rust);
    progress(SUITE, format_args!("kv_* with {kv_keys} keys"));
    for rep in 0..config.reps {
        for system in ["remem", "pmdk"] {
            let args = ["kv".into(), kv_keys.to_string(), (1 + u64::from(rep)).to_string(), d.clone(), system.into()];
            for (case, ns) in run(&plain, &args)? {
                let case = match case.as_str() {
                    "kv_insert_tx" => "kv_insert_tx",
                    "kv_update_tx" => "kv_update_tx",
                    "kv_lookup" => "kv_lookup",
                    other => anyhow::bail!("cbench kv printed an unknown case {other}"),
                };
                table.push(case, 1, system, ns);
            }
        }
    }
    let measurements = table.measurements(SUITE);
    let mut legend = vec![
        "c_alloc_free_64: one op = remem_alloc(64) (malloc(64) for glibc/jemalloc/mimalloc, Heap::alloc for \
         remem_rust), write the first byte, free; with N threads each runs its own loop at once"
            .to_owned(),
        "c_tx_update_64: one op = one transaction: begin, add_range 64 B, overwrite them, commit (PMDK: \
         pmemobj_tx_begin/add_range_direct/commit/end)"
            .to_owned(),
        format!(
            "kv_*: a chained hash map of {kv_keys} random keys with 64 B values, the same code on both systems; \
             one op = one insert transaction (allocate the entry, log the bucket), one update transaction (log \
             and overwrite the value) or one lookup (no transaction); 1 thread"
        ),
        format!(
            "remem = libremem.so through remem.h from C (benches/c/cbench.c), heap made by remem_create() with \
             its defaults: fast tracking, background flush every second, file in {}; remem_rust = the same \
             calls from Rust in this process, same defaults; PMDK pool of 1 GiB on /dev/shm",
            dir.describe()
        ),
        DURABILITY.to_owned(),
        format!(
            "ns/op per thread: the median of {} reps of {} ms (kv: of {} runs), min_ns/max_ns the fastest and \
             slowest rep; within a rep the systems take turns",
            config.reps,
            config.rep_time.as_millis(),
            config.reps
        ),
    ];
    legend.extend(verdicts(&measurements));
    Ok(SuiteReport { suite: SUITE, baseline: BASELINE, legend, measurements })
}

/// The targets of the C ABI, met or not.
fn verdicts(ms: &[Measurement]) -> Vec<String> {
    let ns = |case: &str, system: &str, threads: usize| {
        ms.iter().find(|m| m.case == case && m.system == system && m.threads == threads).map(|m| m.ns_per_op)
    };
    let mut out = Vec::new();
    let mut threads: Vec<usize> = ms.iter().map(|m| m.threads).collect();
    threads.dedup();
    threads.sort_unstable();
    threads.dedup();
    for &t in &threads {
        if let (Some(r), Some(g)) = (ns("c_alloc_free_64", BASELINE, t), ns("c_alloc_free_64", "glibc", t)) {
            let x = r / g;
            out.push(format!(
                "target C remem/glibc <= 1.5x on c_alloc_free_64 ({t} thread(s)): {x:.2}x, {}",
                if x <= 1.5 { "met" } else { "NOT met" }
            ));
        }
        for case in ["c_alloc_free_64", "c_tx_update_64"] {
            if let (Some(c), Some(r)) = (ns(case, BASELINE, t), ns(case, "remem_rust", t)) {
                let x = c / r;
                out.push(format!(
                    "target C call within 1.1x of the Rust call on {case} ({t} thread(s)): remem/remem_rust = \
                     {x:.2}x, {}",
                    if x <= 1.1 { "met" } else { "NOT met" }
                ));
            }
        }
    }
    if let (Some(r), Some(p)) = (ns("kv_update_tx", BASELINE, 1), ns("kv_update_tx", "pmdk", 1)) {
        let x = p / r;
        out.push(format!(
            "target pmdk/remem >= 10x on kv_update_tx: {x:.1}x, {}",
            if x >= 10.0 { "met" } else { "NOT met" }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(case: &'static str, system: &'static str, ns: f64, threads: usize) -> Measurement {
        Measurement { suite: SUITE, case, system, ns_per_op: ns, threads, reps: 1, extra: Extra::default() }
    }

    #[test]
    fn verdicts_say_whether_each_target_is_met() {
        let v = verdicts(&[
            m("c_alloc_free_64", "remem", 12.0, 1),
            m("c_alloc_free_64", "glibc", 10.0, 1),
            m("c_alloc_free_64", "remem_rust", 10.0, 1),
            m("kv_update_tx", "remem", 100.0, 1),
            m("kv_update_tx", "pmdk", 500.0, 1),
        ]);
        assert!(v.iter().any(|l| l.contains("glibc <= 1.5x") && l.contains("1.20x, met")), "{v:?}");
        assert!(v.iter().any(|l| l.contains("within 1.1x") && l.contains("1.20x, NOT met")), "{v:?}");
        assert!(v.iter().any(|l| l.contains("kv_update_tx: 5.0x, NOT met")), "{v:?}");
    }

    #[test]
    fn medians_with_their_extremes() {
        let mut t = Table::default();
        for ns in [3.0, 1.0, 2.0] {
            t.push("x", 1, "remem", ns);
        }
        let ms = t.measurements(SUITE);
        assert_eq!(ms.len(), 1);
        assert_eq!(ms[0].ns_per_op, 2.0);
        assert_eq!(ms[0].extra.0, vec![("min_ns", 1.0), ("max_ns", 3.0)]);
    }
}
