//! `failover`: what a failover costs, from the SIGKILL of a database to a
//! recovered heap, against the raw copy of the same bytes, on this machine.
//!
//! For each heap size (`--heap-gib`, default 1, 4, 8) and each dirty share
//! (1 % and 10 % of the heap's pages), each repetition (`--reps`) runs a
//! fresh database child (this binary re-executed with the hidden subcommand
//! [`CHILD_CMD`]): it creates the heap (fast tracking, no background
//! flusher), registers it with an agent that runs in this process (TCP on
//! 127.0.0.1), fills 50 % of the heap's data pages with one block
//! (`remem_recovery::workload::scatter`: each page says which page it is and
//! which round wrote it), flushes, then rewrites `dirty_pct` % of the heap's
//! pages, drawn at random among the block's pages (scattered), never
//! flushed; says `ready` and sleeps. It is killed with SIGKILL, and:
//!
//! - `full`, `remem_eager`: the wall time of `recover()` (lock, read and
//!   check the agent's lists, fence, load the baseline, pull the dirty pages
//!   with a CRC check per page, heap recovery, commit), started once the
//!   agent has sealed;
//! - `kill_to_first_use`, `remem_eager`: from the SIGKILL to `recover()`
//!   returning the open heap (seal included): eager recovery's first use;
//! - `full`, `raw_copy`: the reference, measured in the same repetition
//!   after the recovery: a sequential read of the baseline file (4 MiB
//!   reads) plus the dirty pages' bytes sent over one plain TCP stream on
//!   127.0.0.1 (the read runs after the recovery in odd repetitions, before
//!   it in even ones, so that the page cache favours neither side);
//! - `baseline_load`, `remem_eager` and `sequential_read`: the load step of
//!   the recovery (`RecoverReport::seconds_baseline`) against the sequential
//!   read of the same file alone.
//!
//! Every repetition then checks every page of the block in the recovered
//! heap (the dirtied ones hold round 1, the others round 0) and fails the
//! suite on any difference; a retry inside `recover()` is counted and
//! reported (`retries`), never hidden. Figures are medians over the
//! repetitions, with min and max beside them.
//!
//! Each repetition then crashes a second child of the same shape and
//! recovers it lazily (`RecoverOptions::lazy`), starting as soon as the
//! agent has seen the owner go (state SEALING: the lazy recovery follows
//! the seal instead of waiting for it):
//! - `first_use`, `remem_lazy`: from the start of `recover()` to the first
//!   read of the root (and of the block's header) returning;
//! - `full`, `remem_lazy`: to every page resident and the recovered state
//!   committed (`Heap::wait_lazy`), against the same `raw_copy`;
//! - `kill_to_first_use`, `remem_lazy`: from the SIGKILL to the first read
//!   (the agent noticing the death included).
//!
//! It checks every page of the block the same way.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use remem_alloc::{Heap, HeapOptions};
use remem_recovery::agent::{self, info, Agent, AgentOptions};
use remem_recovery::recover::{recover, RecoverOptions};
use remem_recovery::transport::{ServeOptions, Token};
use remem_recovery::workload::scatter;

use super::{progress, quantile, sample_sorted, Config};
use crate::report::{Extra, Measurement, SuiteReport};
use crate::scratch::ScratchDir;

/// Suite name.
pub const SUITE: &str = "failover";
/// The hidden subcommand of the database child.
pub const CHILD_CMD: &str = "__failover-db";
/// Dirty shares of the heap's pages, in percent.
const DIRTY_PCTS: [u64; 2] = [1, 10];
/// Page size.
const PAGE: usize = 4096;
/// Seed of the dirty-page draw (the child and the checker draw the same set).
const SEED: u64 = 0x5eed_f00d;
/// Time the child has to get ready.
const CHILD_START: Duration = Duration::from_secs(900);
/// Time the agent has to seal.
const SEAL_WAIT: Duration = Duration::from_secs(300);

/// One repetition's figures.
#[derive(Clone, Copy, Debug, Default)]
struct Rep {
    full: f64,
    kill_to_first_use: f64,
    seal: f64,
    load: f64,
    pull: f64,
    raw_read: f64,
    raw_stream: f64,
    pages_pulled: u64,
    retries: u64,
    /// Lazy recovery of a second crash of the same shape.
    lazy_first_use: f64,
    lazy_full: f64,
    lazy_kill_to_first_use: f64,
    lazy_faults: u64,
}

/// Runs every size and dirty share.
pub fn run(config: &Config) -> anyhow::Result<SuiteReport> {
    let dir = ScratchDir::new(&config.dir, "failover").map_err(anyhow::Error::msg)?;
    let mut measurements = Vec::new();
    for &gib in &config.heap_gib {
        for pct in DIRTY_PCTS {
            let mut reps = Vec::new();
            for r in 0..config.reps {
                progress(SUITE, format_args!("{gib} GiB heap, {pct} % dirty, repetition {}", r + 1));
                let mut rep = one_rep(dir.path(), gib, pct, r % 2 == 1)?;
                lazy_rep(dir.path(), gib, pct, &mut rep)?;
                reps.push(rep);
            }
            measurements.extend(summarize(config.reps, gib, pct, &reps));
        }
    }
    let legend = vec![
        "failover: per heap size and dirty share (1 %, 10 % of the heap's pages, scattered at random in a block \
         filling 50 % of the heap), a database child is SIGKILLed and its heap recovered on this machine from its \
         agent over TCP on 127.0.0.1; seconds = median of the repetitions (min, max beside); every page of the \
         block checked after every recovery"
            .to_string(),
        "full/remem_eager = recover() wall time once sealed (lists, fence, baseline load, pull with a CRC per page, \
         heap recovery, commit); kill_to_first_use/remem_eager = SIGKILL to the open heap, seal included; \
         full/raw_copy = sequential read of the baseline file + the dirty bytes over one TCP stream, same \
         repetition; baseline_load = recover's load step against sequential_read of the same file"
            .to_string(),
        "first_use/remem_lazy = recover() with lazy set, from its start to the first read of the root (and of \
         the block's header) returning; full/remem_lazy = to every page resident and the recovered state \
         committed (Heap::wait_lazy); kill_to_first_use/remem_lazy = SIGKILL to that first read, seal included; \
         each on a second crash of the same shape in the same repetition"
            .to_string(),
        format!("files in {}", dir.describe()),
    ];
    Ok(SuiteReport { suite: SUITE, baseline: "remem_eager", legend, measurements })
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(0.0, f64::max);
    (quantile(v, 0.5), min, max)
}

fn summarize(reps: u32, gib: f64, pct: u64, r: &[Rep]) -> Vec<Measurement> {
    let m = |case: &'static str, system: &'static str, v: Vec<f64>, extra: Extra| {
        let (median, min, max) = stats(&v);
        Measurement {
            suite: SUITE,
            case,
            system,
            ns_per_op: median * 1e9,
            threads: 1,
            reps,
            extra: Extra::default()
                .with("heap_gib", gib)
                .with("dirty_pct", pct as f64)
                .with("seconds", median)
                .with("seconds_min", min)
                .with("seconds_max", max)
                .with_all(extra),
        }
    };
    let raw: Vec<f64> = r.iter().map(|x| x.raw_read + x.raw_stream).collect();
    let full: Vec<f64> = r.iter().map(|x| x.full).collect();
    let ratio = quantile(&full, 0.5) / quantile(&raw, 0.5);
    let load: Vec<f64> = r.iter().map(|x| x.load).collect();
    let read: Vec<f64> = r.iter().map(|x| x.raw_read).collect();
    let load_ratio = quantile(&read, 0.5) / quantile(&load, 0.5);
    let pulled = r.first().map_or(0, |x| x.pages_pulled) as f64;
    vec![
        m(
            "full",
            "remem_eager",
            full,
            Extra::default()
                .with("ratio_to_raw_copy", ratio)
                .with("pages_pulled", pulled)
                .with("seconds_pull", quantile(&r.iter().map(|x| x.pull).collect::<Vec<_>>(), 0.5))
                .with("retries", r.iter().map(|x| x.retries).sum::<u64>() as f64)
                .with("verified_pages", 1.0),
        ),
        m("full", "raw_copy", raw.clone(), Extra::default().with("dirty_bytes", pulled * PAGE as f64)),
        m(
            "kill_to_first_use",
            "remem_eager",
            r.iter().map(|x| x.kill_to_first_use).collect(),
            Extra::default().with("seconds_seal", quantile(&r.iter().map(|x| x.seal).collect::<Vec<_>>(), 0.5)),
        ),
        m(
            "first_use",
            "remem_lazy",
            r.iter().map(|x| x.lazy_first_use).collect(),
            Extra::default().with("faults", quantile(&r.iter().map(|x| x.lazy_faults as f64).collect::<Vec<_>>(), 0.5)),
        ),
        m(
            "full",
            "remem_lazy",
            r.iter().map(|x| x.lazy_full).collect(),
            Extra::default()
                .with(
                    "ratio_to_raw_copy",
                    quantile(&r.iter().map(|x| x.lazy_full).collect::<Vec<_>>(), 0.5) / quantile(&raw, 0.5),
                )
                .with("verified_pages", 1.0),
        ),
        m("kill_to_first_use", "remem_lazy", r.iter().map(|x| x.lazy_kill_to_first_use).collect(), Extra::default()),
        m("baseline_load", "remem_eager", load, Extra::default().with("share_of_sequential_read", load_ratio)),
        m("baseline_load", "sequential_read", read, Extra::default()),
    ]
}

/// The database child, killed on drop unless reaped.
struct DbChild(Child, bool);

impl DbChild {
    fn kill(&mut self) -> anyhow::Result<()> {
        let pid = libc::pid_t::try_from(self.0.id())?;
        // SAFETY: kill(2) on our own child, not reaped yet (its pid cannot be reused).
        if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
            return Err(anyhow::anyhow!("kill({pid}): {}", std::io::Error::last_os_error()));
        }
        self.0.wait()?;
        self.1 = true;
        Ok(())
    }
}

impl Drop for DbChild {
    fn drop(&mut self) {
        if !self.1 {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The block's page count and the dirtied pages of a heap of `heap_bytes`.
fn plan(data_pages: u64, heap_pages: u64, pct: u64) -> (u64, Vec<u64>) {
    let block = data_pages / 2;
    let count = (heap_pages * pct / 100).min(block) as usize;
    (block, sample_sorted(block, count, SEED ^ pct))
}

/// A database child killed with SIGKILL once its heap was filled, flushed
/// and partly rewritten, with its agent sealed.
struct Crashed {
    agent: Agent,
    token: Token,
    baseline: PathBuf,
    block: u64,
    dirty: Vec<u64>,
    killed: Instant,
    seal: f64,
}

/// `sealed`: wait until the agent's seal is complete (eager recovery waits
/// for it); otherwise only until the agent saw the owner go (SEALING: a lazy
/// recovery starts then).
fn crash(dir: &Path, gib: f64, pct: u64, sealed: bool) -> anyhow::Result<Crashed> {
    let heap_bytes = ((gib * (1u64 << 30) as f64) as u64).next_multiple_of(1 << 21);
    let baseline = dir.join(format!("heap-{gib}-{pct}"));
    let _ = std::fs::remove_file(&baseline);
    let _ = std::fs::remove_file(dir.join(format!("heap-{gib}-{pct}.lock")));
    // The agent creates the socket's directory, private (0700).
    let socket = dir.join(format!("agent-{gib}-{pct}")).join("agent.sock");
    let token = Token::generate().map_err(|e| anyhow::anyhow!("token: {e}"))?;
    let mut serve = ServeOptions::new(token.clone());
    serve.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let agent = Agent::start(AgentOptions::new(socket.clone(), serve))
        .map_err(|e| anyhow::anyhow!("starting the agent: {e}"))?;
    let mut child = DbChild(
        Command::new(std::env::current_exe()?)
            .arg(CHILD_CMD)
            .args(["--baseline".as_ref(), baseline.as_os_str(), "--socket".as_ref(), socket.as_os_str()])
            .args(["--heap-bytes", &heap_bytes.to_string(), "--dirty-pct", &pct.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?,
        false,
    );
    let stdout = child.0.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(CHILD_START).map_err(|_| anyhow::anyhow!("the database child did not get ready"))?;
    let mut words = line.split_whitespace();
    let (Some("ready"), Some(block), Some(data_pages)) = (words.next(), words.next(), words.next()) else {
        return Err(anyhow::anyhow!("the database child failed: {line:?}"));
    };
    let (block, data_pages): (u64, u64) = (block.parse()?, data_pages.parse()?);
    let (_, dirty) = plan(data_pages, heap_bytes / PAGE as u64, pct);
    let killed = Instant::now();
    child.kill()?;
    let want: &[u32] = if sealed { &[info::SEALED] } else { &[info::SEALING, info::SEALED] };
    if !want.contains(&agent.wait_state_in(want, SEAL_WAIT)) {
        return Err(anyhow::anyhow!("the agent did not seal within {SEAL_WAIT:?}"));
    }
    let seal = killed.elapsed().as_secs_f64();
    Ok(Crashed { agent, token, baseline, block, dirty, killed, seal })
}

/// One repetition; `read_first`: the reference's sequential read runs
/// before the recovery instead of after it (alternated, so that the page
/// cache favours neither side).
fn one_rep(dir: &Path, gib: f64, pct: u64, read_first: bool) -> anyhow::Result<Rep> {
    let Crashed { agent, token, baseline, block, dirty, seal, .. } = crash(dir, gib, pct, true)?;
    let mut raw_read = None;
    if read_first {
        raw_read = Some(sequential_read(&baseline)?);
    }
    let t = Instant::now();
    let (heap, report) = recover(RecoverOptions::new(&baseline, Some(agent.local_addr()), Some(token)))
        .map_err(|e| anyhow::anyhow!("recover: {e}"))?;
    let full = t.elapsed().as_secs_f64();
    let kill_to_first_use = seal + full; // without the reference read of even repetitions
                                         // Every page of the block.
    let d = scatter::find(&heap, block as usize).map_err(anyhow::Error::msg)?;
    scatter::verify(d, |p| u64::from(dirty.binary_search(&(p as u64)).is_ok())).map_err(anyhow::Error::msg)?;
    heap.close().map_err(|e| anyhow::anyhow!("closing: {e}"))?;
    drop(agent);
    // The reference, same repetition.
    let raw_read = match raw_read {
        Some(r) => r,
        None => sequential_read(&baseline)?,
    };
    let raw_stream = tcp_stream(report.bytes_pulled)?;
    let _ = std::fs::remove_file(&baseline);
    Ok(Rep {
        full,
        kill_to_first_use,
        seal,
        load: report.seconds_baseline,
        pull: report.seconds_pull,
        raw_read,
        raw_stream,
        pages_pulled: report.pages_pulled,
        retries: report.retries,
        ..Rep::default()
    })
}

/// The lazy half of a repetition: a second crash of the same shape,
/// recovered lazily; fills the `lazy_*` figures of `rep`.
fn lazy_rep(dir: &Path, gib: f64, pct: u64, rep: &mut Rep) -> anyhow::Result<()> {
    let Crashed { agent, token, baseline, block, dirty, killed, .. } = crash(dir, gib, pct, false)?;
    let mut o = RecoverOptions::new(&baseline, Some(agent.local_addr()), Some(token));
    o.lazy = true;
    let t = Instant::now();
    let (heap, _) = recover(o).map_err(|e| anyhow::anyhow!("lazy recover: {e}"))?;
    // The first use: the root and the block's header.
    let d = scatter::find(&heap, block as usize).map_err(anyhow::Error::msg)?;
    rep.lazy_first_use = t.elapsed().as_secs_f64();
    rep.lazy_kill_to_first_use = killed.elapsed().as_secs_f64();
    let st = heap.wait_lazy().ok_or_else(|| anyhow::anyhow!("the heap was not opened lazily"))?;
    rep.lazy_full = t.elapsed().as_secs_f64();
    if let Some(why) = st.failed {
        return Err(anyhow::anyhow!("lazy loading failed: {why}"));
    }
    if st.poisoned > 0 || st.committed_epoch.is_none() {
        return Err(anyhow::anyhow!(
            "lazy loading ended with {} poisoned pages, committed {:?}",
            st.poisoned,
            st.committed_epoch
        ));
    }
    rep.lazy_faults = st.faults;
    scatter::verify(d, |p| u64::from(dirty.binary_search(&(p as u64)).is_ok())).map_err(anyhow::Error::msg)?;
    heap.close().map_err(|e| anyhow::anyhow!("closing: {e}"))?;
    drop(agent);
    let _ = std::fs::remove_file(&baseline);
    Ok(())
}

/// Seconds to read `path` front to back in 4 MiB reads.
fn sequential_read(path: &Path) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 4 << 20];
    while f.read(&mut buf)? > 0 {}
    Ok(t.elapsed().as_secs_f64())
}

/// Seconds to send `bytes` over one TCP stream on 127.0.0.1 (connection included).
fn tcp_stream(bytes: u64) -> anyhow::Result<f64> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = l.local_addr()?;
    let t = Instant::now();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let mut s = TcpStream::connect(addr)?;
        let buf = vec![0x5au8; 4 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            s.write_all(&buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    });
    let (mut s, _) = l.accept()?;
    let mut buf = vec![0u8; 4 << 20];
    let mut got = 0u64;
    while got < bytes {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    sender.join().map_err(|_| anyhow::anyhow!("the sender panicked"))??;
    if got != bytes {
        return Err(anyhow::anyhow!("the stream carried {got} of {bytes} bytes"));
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Arguments of the database child.
#[derive(clap::Parser, Debug)]
#[command(name = "remem-bench __failover-db", about = "The database child of the failover suite (internal)")]
pub struct DbArgs {
    /// The baseline (created).
    #[arg(long)]
    baseline: PathBuf,
    /// The agent's socket.
    #[arg(long)]
    socket: PathBuf,
    /// Heap size in bytes.
    #[arg(long)]
    heap_bytes: u64,
    /// Share of the heap's pages to dirty after the flush.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=50))]
    dirty_pct: u64,
}

/// The database child: heap, agent, block, flush, dirty pages, `ready
/// <block pages> <data pages>`, sleep until killed.
pub fn db_main(args: &DbArgs) -> anyhow::Result<()> {
    let heap = Heap::create(&args.baseline, &HeapOptions::new(args.heap_bytes).flush_interval(None))
        .map_err(|e| anyhow::anyhow!("creating the heap: {e}"))?;
    let link = agent::register(&heap, &args.socket).map_err(|e| anyhow::anyhow!("registering: {e}"))?;
    let data_pages = heap.stats().data_pages;
    let (block, dirty) = plan(data_pages, args.heap_bytes / PAGE as u64, args.dirty_pct);
    let d = scatter::setup(&heap, block as usize).map_err(anyhow::Error::msg)?;
    scatter::dirty(d, dirty.iter().map(|&p| p as usize), 1);
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {block} {data_pages}")?;
    out.flush()?;
    drop(out);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
        let _ = (&heap, &link);
    }
}
