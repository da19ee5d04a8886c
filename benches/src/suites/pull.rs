//! `pull`: how fast remem gets a dead database's memory back over its TCP
//! transport, against a plain TCP stream, and how long a whole recovery of
//! a 1 GiB heap takes.
//!
//! - `pull_256mib`, system `remem_tcp`: `remem_recovery::transport::bench_pull`
//!   with `BenchOptions::new(256)`: 256 MiB of 4 KiB pages drawn at random
//!   (each once) from a 1 GiB source region, pulled through remem's TCP
//!   transport on loopback in batches of reads, each batch into its own
//!   landing buffer, several batches in flight (`BenchOptions::new`'s
//!   defaults; the legend prints them); every page is compared with the
//!   source, that time not counted. System `tcp_stream`: the same 256 MiB
//!   sent as one plain TCP stream on the same loopback (per round the better
//!   of default socket buffers and the 4 MiB ones the transport asks for). One op is the whole 256 MiB; the rounds
//!   (`--reps`) alternate stream and pull, and the best of each is reported.
//!   `throughput_ratio` = remem_tcp MB/s / tcp_stream MB/s (best rounds),
//!   `median_ratio` the same of the median rounds.
//! - `recover_1gib`, system `remem_tcp`, `dirty_pct` 1 and 10: the whole
//!   recovery of a 1 GiB heap whose database died, on this machine over
//!   loopback. A database child process (this binary re-executed with the
//!   hidden subcommand [`CHILD_CMD`]) creates the heap (`Heap::create`,
//!   `flush_interval(None)`, fast tracking), registers it with an agent that
//!   runs in this process (`remem_recovery::agent::Agent`, TCP transport on
//!   127.0.0.1), allocates `dirty_pct` % of the heap's data pages as one
//!   block, fills it with 0xFF and flushes once (the baseline holds that
//!   first version: real data to load, where a zeroed block would be
//!   skipped by the loader like the rest of the heap's holes), then writes
//!   one byte into each of the block's pages (dirty, never flushed), says
//!   `ready` and sleeps. It is killed with SIGKILL; once the agent has
//!   sealed, then `remem_recovery::recover::recover` (lock, lists, fence,
//!   load the baseline, pull the sealed pages with a CRC per page and a
//!   BLAKE3 of the whole image, heap recovery, commit). One op is the plain
//!   wall time from the SIGKILL to `recover()` returning: the seal is
//!   inside it. At least three repetitions (`--reps`, each a fresh child),
//!   median reported with min and max; a reconnect inside `recover()`, a
//!   failed `recover()` or a dirtied page missing from the recovered heap
//!   fails the suite (never retried). Afterwards, untimed, the byte the
//!   child wrote into each dirtied page is checked in the recovered heap.
//!
//! Single-threaded from the bench's side (the transport's and agent's
//! threads are remem's own); `--threads` does not apply.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use remem_alloc::{Heap, HeapOptions};
use remem_recovery::agent::{self, info, Agent, AgentOptions};
use remem_recovery::recover::{recover, RecoverOptions};
use remem_recovery::transport::{bench_pull, BenchOptions, ServeOptions, Token};

use super::{progress, Config};
use crate::report::{Extra, Measurement, SuiteReport};
use crate::scratch::ScratchDir;

/// Suite name on the command line and in the report.
pub const SUITE: &str = "pull";
/// remem's TCP transport; the system the ratio column compares with.
pub const REMEM_TCP: &str = "remem_tcp";
/// A plain TCP stream of the same bytes.
pub const TCP_STREAM: &str = "tcp_stream";
/// The hidden subcommand that runs the database child of `recover_1gib`.
pub const CHILD_CMD: &str = "__pull-db";
/// MiB pulled (and streamed) by `pull_256mib`.
const PULL_MIB: usize = 256;
/// Size of `recover_1gib`'s heap.
const HEAP_SIZE: u64 = 1 << 30;
/// Shares of the data pages the database child leaves dirty, in percent.
const DIRTY_PCTS: [u64; 2] = [1, 10];
/// Page size of the heap.
const PAGE: usize = remem_alloc::format::PAGE_SIZE;
/// remem_tcp must reach this share of tcp_stream's throughput.
const TARGET: f64 = 0.80;
/// Repetitions of `recover_1gib` at least (each with a fresh child).
const MIN_RECOVER_REPS: u32 = 3;
/// What the child's block holds in its first (flushed) version.
const FILL: u8 = 0xFF;
/// Time the child has to create its heap and say `ready`.
const CHILD_START: Duration = Duration::from_secs(300);
/// Time the agent has to seal once the child is dead.
const SEAL_WAIT: Duration = Duration::from_secs(30);

/// Runs both cases.
pub fn run(config: &Config) -> anyhow::Result<SuiteReport> {
    let mut measurements = Vec::new();
    let mut legend = Vec::new();

    progress(SUITE, format_args!("pull_256mib ({} rounds)", config.reps));
    let (ms, pull_legend) = pull_case(config)?;
    measurements.extend(ms);

    let dir = ScratchDir::new(&config.dir, "pull").map_err(anyhow::Error::msg)?;
    let reps = config.reps.max(MIN_RECOVER_REPS);
    for pct in DIRTY_PCTS {
        let mut runs = Vec::new();
        for r in 0..reps {
            progress(SUITE, format_args!("recover_1gib, {pct} % dirty, repetition {}", r + 1));
            runs.push(recover_case(dir.path(), pct, r)?);
        }
        measurements.push(summarize_recover(pct, runs));
    }

    legend.extend(pull_legend);
    legend.push(format!(
        "recover_1gib: one op = from the SIGKILL of the database child to recover() returning the open heap: \
         the agent's seal (CRC of every page, BLAKE3 of the image), then recover() (lock, the agent's lists, \
         fence, load the baseline, pull the sealed pages over TCP on 127.0.0.1 with a CRC per page, heap \
         recovery, commit) of a {} MiB heap with dirty_pct % of its data pages (one block, 0xFF in the \
         flushed version) written since its only flush; agent in this process; plain wall time, median of \
         {reps} repetitions (each a fresh child; min and max beside); a reconnect inside recover() or a failed \
         recover() fails the suite",
        HEAP_SIZE >> 20
    ));
    legend.push(format!(
        "recover_1gib figures (medians): seconds_seal (kill until sealed), seconds_recover (recover() alone), \
         seconds_baseline and seconds_pull from RecoverReport; pages_checked = the child's bytes found in the \
         recovered heap (must equal pages_dirtied); files in {}",
        dir.describe()
    ));
    Ok(SuiteReport { suite: SUITE, baseline: REMEM_TCP, legend, measurements })
}

/// `pull_256mib`: both systems from one `bench_pull`, and the legend lines
/// (what ran, and the verdict).
fn pull_case(config: &Config) -> anyhow::Result<(Vec<Measurement>, Vec<String>)> {
    let mut opts = BenchOptions::new(PULL_MIB);
    opts.rounds = config.reps as usize;
    let r = bench_pull(&opts).map_err(|e| anyhow::anyhow!("bench_pull({PULL_MIB} MiB): {e}"))?;
    let bytes = r.bytes as f64;
    let measurement = |system, best: Duration, median: Duration, extra: Extra| Measurement {
        suite: SUITE,
        case: "pull_256mib",
        system,
        ns_per_op: best.as_secs_f64() * 1e9,
        threads: 1,
        reps: config.reps,
        extra: Extra::default()
            .with("seconds", best.as_secs_f64())
            .with("mb_per_s", bytes / best.as_secs_f64() / 1e6)
            .with("median_seconds", median.as_secs_f64())
            .with_all(extra),
    };
    let ms = vec![
        measurement(
            REMEM_TCP,
            r.pull.best,
            r.pull.median,
            Extra::default()
                .with("pages", (r.bytes / r.page as u64) as f64)
                .with("throughput_ratio", r.ratio())
                .with("median_ratio", r.median_ratio()),
        ),
        measurement(TCP_STREAM, r.stream.best, r.stream.median, Extra::default()),
    ];
    let met = if r.ratio() >= TARGET { "met" } else { "NOT met" };
    let what = format!(
        "pull_256mib: one op = {PULL_MIB} MiB; {REMEM_TCP} = bench_pull: scattered {} KiB pages (each once, \
         random order, from a {} MiB region) through remem's TCP transport, {} reads per batch, {} batches \
         in flight, every page verified (not timed); {TCP_STREAM} = one plain TCP stream of the same bytes, \
         better of default and 4 MiB socket buffers; both on 127.0.0.1, best of {} interleaved rounds; \
         mb_per_s = 10^6 B/s",
        opts.page >> 10,
        PULL_MIB * opts.spread,
        opts.batch,
        opts.buffers,
        opts.rounds
    );
    let verdict = format!(
        "target {REMEM_TCP} >= {:.0} % of {TCP_STREAM}'s throughput: {:.1} % on the best rounds ({met}), \
         {:.1} % on the medians",
        TARGET * 100.0,
        r.ratio() * 100.0,
        r.median_ratio() * 100.0
    );
    Ok((ms, vec![what, verdict]))
}

/// The database child, killed on drop unless it was reaped already.
struct DbChild {
    child: Child,
    reaped: bool,
}

impl DbChild {
    /// SIGKILLs the child and reaps it.
    fn kill(&mut self) -> anyhow::Result<()> {
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: kill(2) on the pid of our own child, which is not reaped
        // yet, so the pid cannot have been reused.
        if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
            return Err(anyhow::anyhow!("kill({pid}, SIGKILL): {}", std::io::Error::last_os_error()));
        }
        self.child.wait()?;
        self.reaped = true;
        Ok(())
    }
}

impl Drop for DbChild {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What the child says when its pages are dirty: where its block starts and
/// how many pages it has.
fn parse_ready(line: &str) -> Option<(u64, u64)> {
    let mut words = line.split_whitespace();
    if words.next()? != "ready" {
        return None;
    }
    let first = words.next()?.parse().ok()?;
    let count = words.next()?.parse().ok()?;
    words.next().is_none().then_some((first, count))
}

/// The byte the child writes into page `p` after the flush (1..=251: never
/// [`FILL`], so the page differs from its flushed version), and where in
/// the page.
fn mark(p: u64) -> (usize, u8) {
    ((p % 64) as usize * 64, (p % 251) as u8 + 1)
}

/// `recover_1gib` at `pct` % dirty: repetition `rep`.
fn recover_case(dir: &Path, pct: u64, rep: u32) -> anyhow::Result<RecoverRun> {
    let baseline = dir.join(format!("heap-{pct}-{rep}"));
    // The agent creates the socket's directory, private (0700).
    let socket = dir.join(format!("agent-{pct}-{rep}")).join("agent.sock");
    let token = Token::generate().map_err(|e| anyhow::anyhow!("generating a token: {e}"))?;
    let mut serve = ServeOptions::new(token.clone());
    serve.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let agent = Agent::start(AgentOptions::new(socket.clone(), serve).digest(true))
        .map_err(|e| anyhow::anyhow!("starting the agent on {}: {e}", socket.display()))?;

    // The child registers over the Unix socket, which needs no token (the
    // token guards the TCP pulls, made from this process): it gets none.
    let mut child = DbChild {
        child: Command::new(std::env::current_exe()?)
            .arg(CHILD_CMD)
            .arg("--baseline")
            .arg(&baseline)
            .arg("--socket")
            .arg(&socket)
            .arg("--dirty-pct")
            .arg(pct.to_string())
            .env_remove(Token::ENV)
            .env_remove(Token::FILE_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting the database child: {e}"))?,
        reaped: false,
    };
    let stdout = child.child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(CHILD_START)
        .map_err(|_| anyhow::anyhow!("the database child did not get ready within {CHILD_START:?}"))?;
    let Some((first_page, dirtied)) = parse_ready(&line) else {
        return Err(anyhow::anyhow!("the database child failed (said {:?}); see its message above", line.trim()));
    };
    if agent.state() != info::RUNNING {
        return Err(anyhow::anyhow!("the agent holds no running heap after the child said ready"));
    }

    let killed = Instant::now();
    child.kill()?;
    let state = agent.wait_state(info::SEALED, SEAL_WAIT);
    if state != info::SEALED {
        return Err(anyhow::anyhow!("the agent did not seal within {SEAL_WAIT:?} (state {state})"));
    }
    let seconds_seal = killed.elapsed().as_secs_f64();

    let mut o = RecoverOptions::new(&baseline, Some(agent.local_addr()), Some(token.clone()));
    o.verify_image = true;
    let t = Instant::now();
    let (heap, report) = recover(o).map_err(|e| anyhow::anyhow!("recover({}): {e}", baseline.display()))?;
    let seconds_recover = t.elapsed().as_secs_f64();
    let seconds_total = killed.elapsed().as_secs_f64();
    if report.retries > 0 {
        return Err(anyhow::anyhow!("recover() reconnected {} times: counted as a failure", report.retries));
    }
    if report.image_identical != Some(true) {
        return Err(anyhow::anyhow!("recover: image_identical is {:?}, not Some(true)", report.image_identical));
    }
    let checked = check_marks(&heap, first_page, dirtied);
    if checked != dirtied {
        return Err(anyhow::anyhow!(
            "recover_1gib {pct} %: only {checked} of {dirtied} dirtied pages hold the child's byte after recovery"
        ));
    }
    heap.close().map_err(|e| anyhow::anyhow!("closing the recovered heap: {e}"))?;
    drop(agent);
    Ok(RecoverRun {
        seconds_total,
        seconds_seal,
        seconds_recover,
        seconds_baseline: report.seconds_baseline,
        seconds_pull: report.seconds_pull,
        pages_pulled: report.pages_pulled,
        dirtied,
    })
}

/// One repetition of `recover_1gib`.
struct RecoverRun {
    seconds_total: f64,
    seconds_seal: f64,
    seconds_recover: f64,
    seconds_baseline: f64,
    seconds_pull: f64,
    pages_pulled: u64,
    dirtied: u64,
}

/// The median (nearest rank) of the repetitions, with min and max of the total.
fn summarize_recover(pct: u64, runs: Vec<RecoverRun>) -> Measurement {
    let med = |f: fn(&RecoverRun) -> f64| super::quantile(&runs.iter().map(f).collect::<Vec<_>>(), 0.5);
    let totals: Vec<f64> = runs.iter().map(|r| r.seconds_total).collect();
    let total = super::quantile(&totals, 0.5);
    Measurement {
        suite: SUITE,
        case: "recover_1gib",
        system: REMEM_TCP,
        ns_per_op: total * 1e9,
        threads: 1,
        reps: runs.len() as u32,
        extra: Extra::default()
            .with("dirty_pct", pct as f64)
            .with("seconds_total", total)
            .with("seconds_min", totals.iter().copied().fold(f64::INFINITY, f64::min))
            .with("seconds_max", totals.iter().copied().fold(0.0, f64::max))
            .with("seconds_seal", med(|r| r.seconds_seal))
            .with("seconds_recover", med(|r| r.seconds_recover))
            .with("seconds_baseline", med(|r| r.seconds_baseline))
            .with("seconds_pull", med(|r| r.seconds_pull))
            .with("pages_pulled", med(|r| r.pages_pulled as f64))
            .with("pages_dirtied", med(|r| r.dirtied as f64))
            .with("image_identical", 1.0),
    }
}

/// How many of the `count` pages from `first` hold the child's byte, and
/// [`FILL`] (the flushed version) beside it.
fn check_marks(heap: &Heap, first: u64, count: u64) -> u64 {
    let npages = heap.size() / PAGE as u64;
    let base = heap.base();
    (first..(first + count).min(npages))
        .filter(|&p| {
            let (at, byte) = mark(p);
            // SAFETY: page `p` is inside the heap (p < npages), which is
            // mapped at `base` and open for the whole call; nothing else
            // writes it. `at + 32` is inside the page too (at <= 4032).
            unsafe {
                let page = base.add(p as usize * PAGE);
                page.add(at).read_volatile() == byte && page.add(at + 32).read_volatile() == FILL
            }
        })
        .count() as u64
}

/// Arguments of the database child ([`CHILD_CMD`]).
#[derive(clap::Parser, Debug)]
#[command(name = "remem-bench __pull-db", about = "The database child of the pull suite (internal)")]
pub struct DbArgs {
    /// The heap's baseline file (created).
    #[arg(long)]
    baseline: PathBuf,
    /// The agent's Unix socket.
    #[arg(long)]
    socket: PathBuf,
    /// Share of the data pages to leave dirty, in percent.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=90))]
    dirty_pct: u64,
}

/// The database child: heap, agent, one block filled and flushed, one byte
/// written into each of its pages, `ready`, sleep
/// until killed. Returns only on failure (after saying so on stdout, so the
/// parent stops waiting).
pub fn db_main(args: &DbArgs) -> anyhow::Result<()> {
    let result = db_setup(args);
    let mut out = std::io::stdout().lock();
    match result {
        Ok((heap, link, first, count)) => {
            writeln!(out, "ready {first} {count}")?;
            out.flush()?;
            drop(out);
            loop {
                std::thread::sleep(Duration::from_secs(3600));
                // Kept alive until the SIGKILL.
                let _ = (&heap, &link);
            }
        }
        Err(e) => {
            writeln!(out, "failed")?;
            out.flush()?;
            Err(e)
        }
    }
}

/// Creates and registers the heap, fills one block with [`FILL`] and
/// flushes it, writes one byte into each of its pages; returns
/// the heap, the agent link, the block's first page and its page count.
fn db_setup(args: &DbArgs) -> anyhow::Result<(Heap, agent::AgentLink, u64, u64)> {
    let p = &args.baseline;
    let heap = Heap::create(p, &HeapOptions::new(HEAP_SIZE).flush_interval(None))
        .map_err(|e| anyhow::anyhow!("Heap::create({}): {e}", p.display()))?;
    let link = agent::register(&heap, &args.socket)
        .map_err(|e| anyhow::anyhow!("registering with the agent at {}: {e}", args.socket.display()))?;
    let count = heap.stats().data_pages * args.dirty_pct / 100;
    let block = heap.alloc(count as usize * PAGE).map_err(|e| anyhow::anyhow!("allocating {count} pages: {e}"))?;
    let first = (heap.offset_of(block.as_ptr()).expect("the block is in the heap") / PAGE) as u64;
    // SAFETY: the block is `count` pages long, allocated above and used by
    // this thread only.
    unsafe { block.as_ptr().write_bytes(FILL, count as usize * PAGE) };
    heap.flush().map_err(|e| anyhow::anyhow!("first flush: {e}"))?;
    let base = heap.base();
    for page in first..first + count {
        let (at, byte) = mark(page);
        // SAFETY: the page is inside the block allocated above, which stays
        // allocated and is written by this thread only.
        unsafe { base.add(page as usize * PAGE + at).write_volatile(byte) };
    }
    Ok((heap, link, first, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_is_parsed() {
        assert_eq!(parse_ready("ready 12 345\n"), Some((12, 345)));
        assert_eq!(parse_ready("failed\n"), None);
        assert_eq!(parse_ready(""), None);
        assert_eq!(parse_ready("ready 1"), None);
        assert_eq!(parse_ready("ready 1 2 3"), None);
    }

    #[test]
    fn marks_differ_from_the_fill_and_stay_inside_the_page() {
        for p in 0..10_000 {
            let (at, byte) = mark(p);
            assert!(byte != 0 && byte != FILL && at + 32 < PAGE);
        }
    }
}
