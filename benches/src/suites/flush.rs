//! `flush`: how fast remem's flush makes dirty pages durable, against the
//! raw ceiling of writing the same bytes to a file, and what background
//! flushes cost a database's transactions (case `stall`, in `stall.rs`).
//!
//! - `flush_10pct`, system `remem`: a 1 GiB heap (`Heap::create`,
//!   `TrackMode::Fast`, `flush_interval(None)`: only explicit flushes, the
//!   background worker compacts the journal) whose data pages are nearly
//!   all one large block. [`FLUSH_REPS`] repetitions in a row (or `--reps`
//!   if more); per repetition, untimed: one byte written to each of a fresh
//!   random 10 % of the heap's data pages (sorted; a different fixed-seed
//!   sample per repetition); timed: one `heap.flush()`. The journal passes
//!   its compaction threshold (a quarter of the heap) every few flushes, so
//!   the run includes several compactions, which run in the background
//!   beside the writes and the flushes. After the last flush the run also
//!   waits, timed, until the compaction in progress is done. One op is one
//!   flush; `ns_per_op` is the run's timed total (every flush plus that
//!   final wait) over the flushes: sustained, every repetition counted,
//!   none dropped. `flush_p99_ns` / `flush_max_ns` are those of single
//!   flushes; `pause_mean_us` / `pause_p99_us` the flush pauses
//!   (`FlushStats::last_pause`); `pages_flushed` what `FlushStats` says a
//!   flush wrote (the sample plus the allocator's own dirty pages).
//! - system `pwrite_seq_fdatasync` (the peer the target is set against):
//!   as many pages, written as one sequential run (1 MiB `pwrite`s from
//!   offset 0 of a plain 1 GiB file that was written in full and synced
//!   beforehand), then one `fdatasync`: the ceiling for a flush that, like
//!   remem's journal, writes its pages sequentially whatever their place in
//!   the heap. One op is the writes plus the sync; mean over the reps.
//! - system `pwrite_fdatasync`: the same pages, 4 KiB each, `pwrite`n at the
//!   same offsets, ascending, into that file, then one `fdatasync`.
//!
//! The remem run goes first and ends when its compaction is done, so the
//! peers' writes never share the disk with it. All write the same number of
//! data pages (`pages`); `mb_per_s` is those pages' bytes (10^6 B) per
//! second. Files live under `--dir` (default: the temp dir), whose
//! filesystem the legend names. Single-threaded; `--threads` does not apply.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use remem_alloc::{Heap, HeapOptions, TrackMode};

use super::{progress, quantile, sample_sorted, Config};
use crate::report::{Extra, Measurement, SuiteReport, BASELINE};
use crate::scratch::ScratchDir;

/// Suite name on the command line and in the report.
pub const SUITE: &str = "flush";
/// The raw-write system: the pages at their offsets.
pub const RAW: &str = "pwrite_fdatasync";
/// The raw-write system: as many pages in one sequential run.
pub const RAW_SEQ: &str = "pwrite_seq_fdatasync";
/// Bytes per `pwrite` of [`RAW_SEQ`] (what remem's journal segments are, about).
const SEQ_CHUNK: usize = 1 << 20;
/// Heap size, and size of the raw file.
const HEAP_SIZE: u64 = 1 << 30;
/// Share of the data pages dirtied before each flush, in percent.
const PERCENT: u64 = 10;
/// Page size of the heap and of the raw writes.
const PAGE: usize = remem_alloc::format::PAGE_SIZE;
/// Seed of the page samples; repetition `r` uses `SEED + r`.
const SEED: u64 = 0x5851_F42D_4C95_7F2D;
/// remem must reach this share of a sequential write of the same bytes.
const TARGET: f64 = 0.80;

/// Flushes in the `flush_10pct` run at least (enough for several
/// compactions: each flush adds about 100 MiB to the journal, compacted
/// past 256 MiB).
pub const FLUSH_REPS: u32 = 12;

/// Every figure of one system over the repetitions.
#[derive(Default)]
struct Runs {
    secs: Vec<f64>,
    pauses_us: Vec<f64>,
    pages_flushed: Vec<f64>,
}

impl Runs {
    fn mean(v: &[f64]) -> f64 {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    }
}

/// Runs the suite: `flush_10pct`, then `stall`.
pub fn run(config: &Config) -> anyhow::Result<SuiteReport> {
    let dir = ScratchDir::new(&config.dir, "flush").map_err(anyhow::Error::msg)?;
    let (mut measurements, mut legend) = flush_10pct(config, &dir)?;
    let (m, l) = super::stall::run(config, &dir)?;
    measurements.extend(m);
    legend.extend(l);
    Ok(SuiteReport { suite: SUITE, baseline: BASELINE, legend, measurements })
}

fn flush_10pct(config: &Config, dir: &ScratchDir) -> anyhow::Result<(Vec<Measurement>, Vec<String>)> {
    let path = dir.path().join("flush.heap");
    let opts = HeapOptions::new(HEAP_SIZE).tracking(TrackMode::Fast).flush_interval(None);
    let heap = Heap::create(&path, &opts).map_err(|e| anyhow::anyhow!("Heap::create({}): {e}", path.display()))?;

    // Nearly every data page in one block, so the writes below land in
    // allocated memory.
    let stats = heap.stats();
    let run_pages = stats.largest_free_run;
    let block = heap
        .alloc(run_pages as usize * PAGE)
        .map_err(|e| anyhow::anyhow!("allocating a block of {run_pages} pages: {e}"))?;
    let first_page = heap.offset_of(block.as_ptr()).expect("the block is in the heap") as u64 / PAGE as u64;
    let count = (stats.data_pages * PERCENT / 100) as usize;
    // The allocation's own metadata pages go in an untimed flush.
    heap.flush().map_err(|e| anyhow::anyhow!("first flush: {e}"))?;
    let reps = config.reps.max(FLUSH_REPS);
    let samples: Vec<Vec<u64>> = (0..reps)
        .map(|rep| sample_sorted(run_pages, count, SEED + u64::from(rep)).into_iter().map(|p| first_page + p).collect())
        .collect();

    progress(SUITE, format_args!("flush_10pct: remem, {reps} flushes of {count} pages, with compactions"));
    let mut remem = Runs::default();
    for (rep, pages) in samples.iter().enumerate() {
        remem_rep(&heap, pages, rep as u8, &mut remem)?;
    }
    let start = Instant::now();
    while heap.flush_stats().is_some_and(|s| s.compacting && s.poisoned.is_none()) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let compaction_wait = start.elapsed().as_secs_f64();
    let fstats = heap.flush_stats().expect("a file-backed heap has flush stats");
    if let Some(p) = &fstats.poisoned {
        anyhow::bail!("flush_10pct: durability poisoned: {p}");
    }
    progress(SUITE, format_args!("closing the heap (final flush and journal apply)"));
    heap.close().map_err(|e| anyhow::anyhow!("closing {}: {e}", path.display()))?;

    progress(SUITE, format_args!("writing the {} MiB raw file", HEAP_SIZE >> 20));
    let raw = prefill(&dir.path().join("raw.dat"), HEAP_SIZE)?;
    let page_buf = vec![0x5Au8; PAGE];
    let seq_buf = vec![0x5Bu8; SEQ_CHUNK];
    progress(SUITE, format_args!("flush_10pct: raw writes"));
    let (mut pwrite, mut pwrite_seq) = (Runs::default(), Runs::default());
    for (rep, pages) in samples.iter().enumerate() {
        for turn in 0..2 {
            match (turn + rep) % 2 {
                0 => raw_rep(&raw, pages, &page_buf, &mut pwrite)?,
                _ => raw_seq_rep(&raw, count * PAGE, &seq_buf, &mut pwrite_seq)?,
            }
        }
    }

    let bytes = (count * PAGE) as f64;
    let remem_total = remem.secs.iter().sum::<f64>() + compaction_wait;
    let remem_mean = remem_total / reps as f64;
    let measurement = |system, mean: f64, runs: &Runs, extra: Extra| Measurement {
        suite: SUITE,
        case: "flush_10pct",
        system,
        ns_per_op: mean * 1e9,
        threads: 1,
        reps,
        extra: Extra::default()
            .with("mb_per_s", bytes / mean / 1e6)
            .with("pages", count as f64)
            .with("flush_p99_ns", quantile(&runs.secs, 0.99) * 1e9)
            .with("flush_max_ns", quantile(&runs.secs, 1.0) * 1e9)
            .with_all(extra),
    };
    let measurements = vec![
        measurement(
            BASELINE,
            remem_mean,
            &remem,
            Extra::default()
                .with("pages_flushed", quantile(&remem.pages_flushed, 1.0))
                .with("pause_mean_us", Runs::mean(&remem.pauses_us))
                .with("pause_p99_us", quantile(&remem.pauses_us, 0.99))
                .with("compactions", fstats.compactions as f64)
                .with("compaction_wait_ns", compaction_wait * 1e9),
        ),
        measurement(RAW_SEQ, Runs::mean(&pwrite_seq.secs), &pwrite_seq, Extra::default()),
        measurement(RAW, Runs::mean(&pwrite.secs), &pwrite, Extra::default()),
    ];
    let share = |i: usize| measurements[i].ns_per_op / measurements[0].ns_per_op;
    let met = |x: f64| if x >= TARGET { "met" } else { "NOT met" };
    let legend = vec![
        format!(
            "flush_10pct: one op = heap.flush() after 1 byte was written to each of {count} random data \
             pages ({PERCENT} % of {}; {} MiB heap, TrackMode::Fast, no background flush, background \
             compaction); {RAW_SEQ} = as many bytes in one sequential run of {} KiB pwrites into a {} MiB \
             file written in full beforehand, then one fdatasync; {RAW} = pwrite of the same {count} pages \
             (4 KiB, same offsets, ascending) into that file, then one fdatasync",
            stats.data_pages,
            HEAP_SIZE >> 20,
            SEQ_CHUNK >> 10,
            HEAP_SIZE >> 20,
        ),
        format!(
            "files in {}; {reps} flushes in a row, every one counted: remem ns_per_op = (sum of the flushes \
             + {:.0} ms waiting for the last compaction) / {reps}; {} compactions ran in the background \
             during the run; peers: mean of {reps} reps, run after remem's run (no shared disk time), \
             taking turns",
            dir.describe(),
            compaction_wait * 1e3,
            fstats.compactions,
        ),
        format!(
            "pause_* = FlushStats::last_pause of each flush: mean {:.0} us, p99 {:.0} us; single flushes \
             p99 {:.1} ms",
            Runs::mean(&remem.pauses_us),
            quantile(&remem.pauses_us, 0.99),
            quantile(&remem.secs, 0.99) * 1e3,
        ),
        format!(
            "target remem >= {:.0} % of a sequential write of the same bytes: remem sustains {:.1} % of \
             {RAW_SEQ} ({}), {:.1} % of {RAW}",
            TARGET * 100.0,
            share(1) * 100.0,
            met(share(1)),
            share(2) * 100.0,
        ),
    ];
    Ok((measurements, legend))
}

/// Dirties `pages` of `heap` (untimed), then times one flush.
fn remem_rep(heap: &Heap, pages: &[u64], byte: u8, runs: &mut Runs) -> anyhow::Result<()> {
    let base = heap.base();
    for &p in pages {
        // SAFETY: each page is inside the block allocated in `run`, which
        // stays allocated and is written by this thread only.
        unsafe { base.add(p as usize * PAGE + (p as usize % 64) * 64).write_volatile(byte.wrapping_add(1)) };
    }
    let before = heap.flush_stats().expect("a file-backed heap has flush stats");
    let start = Instant::now();
    heap.flush().map_err(|e| anyhow::anyhow!("heap.flush(): {e}"))?;
    let secs = start.elapsed().as_secs_f64();
    let after = heap.flush_stats().expect("a file-backed heap has flush stats");
    runs.secs.push(secs);
    runs.pauses_us.push(after.last_pause.as_secs_f64() * 1e6);
    runs.pages_flushed.push((after.pages_flushed - before.pages_flushed) as f64);
    Ok(())
}

/// Times the `pwrite`s of `pages` into `file` and one `fdatasync`.
fn raw_rep(file: &File, pages: &[u64], buf: &[u8], runs: &mut Runs) -> anyhow::Result<()> {
    let start = Instant::now();
    for &p in pages {
        file.write_all_at(buf, p * PAGE as u64)?;
    }
    file.sync_data()?;
    runs.secs.push(start.elapsed().as_secs_f64());
    Ok(())
}

/// Times writing `bytes` from offset 0 of `file` in `buf`-sized `pwrite`s
/// and one `fdatasync`.
fn raw_seq_rep(file: &File, bytes: usize, buf: &[u8], runs: &mut Runs) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut off = 0;
    while off < bytes {
        let n = (bytes - off).min(buf.len());
        file.write_all_at(&buf[..n], off as u64)?;
        off += n;
    }
    file.sync_data()?;
    runs.secs.push(start.elapsed().as_secs_f64());
    Ok(())
}

/// Creates `path` with `len` bytes written (not sparse, not preallocated:
/// every block allocated and initialised) and synced.
fn prefill(path: &Path, len: u64) -> anyhow::Result<File> {
    let mut file = OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
    let chunk = vec![0xA5u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    file.sync_all()?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_rep_writes_and_times() {
        let dir = ScratchDir::new(&std::env::temp_dir(), "flush-test").unwrap();
        let f = prefill(&dir.path().join("raw"), 64 * PAGE as u64).unwrap();
        let mut runs = Runs::default();
        raw_rep(&f, &[1, 5, 63], &[7u8; PAGE], &mut runs).unwrap();
        assert_eq!(runs.secs.len(), 1);
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 5 * PAGE as u64).unwrap();
        assert_eq!(b[0], 7);
        f.read_exact_at(&mut b, 4 * PAGE as u64).unwrap();
        assert_eq!(b[0], 0xA5);
        raw_seq_rep(&f, 3 * PAGE, &[9u8; 2 * PAGE], &mut runs).unwrap();
        assert_eq!(runs.secs.len(), 2);
        f.read_exact_at(&mut b, 2 * PAGE as u64 + 5).unwrap();
        assert_eq!(b[0], 9);
        f.read_exact_at(&mut b, 3 * PAGE as u64).unwrap();
        assert_eq!(b[0], 0xA5);
    }
}
