//! Pull throughput against its peer: scattered pages pulled through a
//! transport versus a plain TCP stream of the same bytes, both on loopback,
//! in one run. For the bench binary (not a test; the ignored test
//! `pull_vs_stream` prints it). Wall-clock ratios on a small shared VM
//! swing with other load; the CPU time per byte of each side, measured in
//! the same process, is reported beside them because it barely does.

use std::fmt;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rustix::time::{clock_gettime, ClockId};

use super::error::BenchError;
use super::{
    connect, serve, BufId, Completion, ConnectOptions, Kind, ReadRequest, RegionDesc, ServeOptions, SourceMemory,
    Status, Token,
};

/// What [`bench_pull`] measures.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct BenchOptions {
    /// MiB pulled (and streamed).
    pub mib: usize,
    /// Page size in bytes.
    pub page: usize,
    /// The source region is this many times the pulled bytes; the pulled
    /// pages are drawn at random from it, each once.
    pub spread: usize,
    /// Reads per posted batch (one landing buffer each).
    pub batch: usize,
    /// Landing buffers in flight.
    pub buffers: usize,
    /// Runs of each, interleaved; the best of each is reported.
    pub rounds: usize,
    /// The transport pulled through.
    pub kind: Kind,
    /// Compare every pulled page with the source (time not counted).
    pub verify: bool,
}

impl BenchOptions {
    /// `mib` MiB of 4 KiB pages from a region 4 times larger, batches of 64,
    /// 32 buffers (8 MiB in flight: more than the 4 MiB socket buffers, so
    /// that neither side waits for the other), 5 rounds, TCP, verified.
    pub fn new(mib: usize) -> BenchOptions {
        BenchOptions { mib, page: 4096, spread: 4, batch: 64, buffers: 32, rounds: 5, kind: Kind::Tcp, verify: true }
    }

    /// Pull through `kind` instead of TCP.
    pub fn kind(mut self, kind: Kind) -> BenchOptions {
        self.kind = kind;
        self
    }
}

/// The best and the median of a benchmark's rounds.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct Times {
    /// The fastest round.
    pub best: Duration,
    /// The median round.
    pub median: Duration,
}

impl Times {
    fn of(mut rounds: Vec<Duration>) -> Times {
        rounds.sort_unstable();
        Times { best: rounds[0], median: rounds[rounds.len() / 2] }
    }
}

/// What [`bench_pull`] measured.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct BenchReport {
    /// The transport pulled through.
    pub kind: Kind,
    /// Bytes pulled (and streamed).
    pub bytes: u64,
    /// Page size.
    pub page: usize,
    /// Time to pull them.
    pub pull: Times,
    /// Time to stream them.
    pub stream: Times,
    /// CPU time of the whole process (target and initiator threads) while
    /// pulling: unlike the wall time, barely moved by other load.
    pub pull_cpu: Times,
    /// CPU time of the whole process (sender and receiver) while streaming.
    pub stream_cpu: Times,
}

impl BenchReport {
    fn rate(&self, d: Duration) -> f64 {
        self.bytes as f64 / d.as_secs_f64()
    }

    /// Pull throughput of the best round, bytes per second.
    pub fn pull_rate(&self) -> f64 {
        self.rate(self.pull.best)
    }

    /// Stream throughput of the best round, bytes per second.
    pub fn stream_rate(&self) -> f64 {
        self.rate(self.stream.best)
    }

    /// Best pull throughput over best stream throughput.
    pub fn ratio(&self) -> f64 {
        self.pull_rate() / self.stream_rate()
    }

    /// Median pull throughput over median stream throughput.
    pub fn median_ratio(&self) -> f64 {
        self.rate(self.pull.median) / self.rate(self.stream.median)
    }

    /// Median CPU time of a pull over that of a stream (1.2: the pull
    /// costs 20 % more CPU per byte).
    pub fn cpu_ratio(&self) -> f64 {
        self.pull_cpu.median.as_secs_f64() / self.stream_cpu.median.as_secs_f64()
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gb = |d| self.rate(d) / 1e9;
        let per_gb = |d: Duration| d.as_secs_f64() / (self.bytes as f64 / 1e9);
        write!(
            f,
            "pull of {} MiB in scattered {} KiB pages over {} vs a plain TCP stream, loopback: \
             best {:.2} vs {:.2} GB/s (ratio {:.2}); median {:.2} vs {:.2} GB/s (ratio {:.2}); \
             CPU per GB {:.3} vs {:.3} s (ratio {:.2})",
            self.bytes >> 20,
            self.page / 1024,
            self.kind,
            gb(self.pull.best),
            gb(self.stream.best),
            self.ratio(),
            gb(self.pull.median),
            gb(self.stream.median),
            self.median_ratio(),
            per_gb(self.pull_cpu.median),
            per_gb(self.stream_cpu.median),
            self.cpu_ratio()
        )
    }
}

/// Measures a pull of `opts.mib` MiB of scattered pages through
/// `opts.kind` against a plain TCP stream of the same bytes, on loopback.
pub fn bench_pull(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    if opts.mib == 0 || opts.page == 0 || opts.spread == 0 || opts.batch == 0 || opts.buffers == 0 {
        return Err(BenchError::Options("mib, page, spread, batch and buffers must be positive"));
    }
    if opts.page > super::MAX_READ_LEN as usize {
        return Err(BenchError::Options("page is longer than one read may be"));
    }
    let bytes = opts.mib << 20;
    let npages = bytes / opts.page;
    if npages == 0 {
        return Err(BenchError::Options("mib holds no whole page"));
    }
    let source: Arc<Vec<u8>> = Arc::new(pattern(npages * opts.spread * opts.page));
    let pages = choose(npages, npages * opts.spread);
    let (mut pulls, mut streams) = (Vec::new(), Vec::new());
    for _ in 0..opts.rounds.max(1) {
        // The peer at its best: default socket buffers, and the 4 MiB the
        // transport asks for.
        let (a, b) = (stream_once(&source[..bytes], false)?, stream_once(&source[..bytes], true)?);
        streams.push(if a.wall <= b.wall { a } else { b });
        pulls.push(pull_once(opts, &source, &pages)?);
    }
    Ok(BenchReport {
        kind: opts.kind,
        bytes: (npages * opts.page) as u64,
        page: opts.page,
        pull: Times::of(pulls.iter().map(|r| r.wall).collect()),
        stream: Times::of(streams.iter().map(|r| r.wall).collect()),
        pull_cpu: Times::of(pulls.iter().map(|r| r.cpu).collect()),
        stream_cpu: Times::of(streams.iter().map(|r| r.cpu).collect()),
    })
}

/// One round: wall time, and CPU time of the whole process.
#[derive(Clone, Copy, Debug)]
struct Round {
    wall: Duration,
    cpu: Duration,
}

fn cpu_time(id: ClockId) -> Duration {
    let t = clock_gettime(id);
    Duration::new(u64::try_from(t.tv_sec).unwrap_or(0), u32::try_from(t.tv_nsec).unwrap_or(0))
}

/// CPU time of every thread of this process.
fn process_cpu() -> Duration {
    cpu_time(ClockId::ProcessCPUTime)
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    cpu_time(ClockId::ThreadCPUTime)
}

/// Bytes where every 8-byte word differs from its neighbours and pages differ.
fn pattern(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// `n` distinct page indices out of `total`, in random order.
fn choose(n: usize, total: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (0..total).collect();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in (1..total).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        all.swap(i, (x % (i as u64 + 1)) as usize);
    }
    all.truncate(n);
    all
}

fn pull_once(opts: &BenchOptions, source: &Arc<Vec<u8>>, pages: &[usize]) -> Result<Round, BenchError> {
    let token = Token::generate()?;
    let target = serve(opts.kind, ServeOptions::new(token.clone()).listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))))?;
    let memory: Arc<dyn SourceMemory> = source.clone();
    let region: RegionDesc = target.register(memory)?;
    let copts = ConnectOptions::new(target.local_addr(), token).depth(opts.batch * opts.buffers);
    let mut ini = connect(opts.kind, &copts)?;
    let bufs: Vec<BufId> =
        (0..opts.buffers).map(|_| ini.alloc_buf(opts.batch * opts.page)).collect::<Result<_, _>>()?;
    // Per buffer: the first page index of its batch, its length, reads still out.
    let mut batch_of: Vec<(usize, usize, usize)> = vec![(0, 0, 0); opts.buffers];
    let mut free: Vec<usize> = (0..opts.buffers).rev().collect();
    let (mut next, mut done, mut verifying, mut verifying_cpu) = (0usize, 0usize, Duration::ZERO, Duration::ZERO);
    let mut reads = Vec::with_capacity(opts.batch);
    let mut completions: Vec<Completion> = Vec::with_capacity(opts.batch * opts.buffers);
    let (start, cpu) = (Instant::now(), process_cpu());
    while done < pages.len() {
        while next < pages.len() {
            let Some(slot) = free.pop() else { break };
            let end = (next + opts.batch).min(pages.len());
            reads.clear();
            // wr_id: the buffer above bit 32, the page's place in `pages` below.
            reads.extend((next..end).map(|i| ReadRequest {
                wr_id: (slot as u64) << 32 | i as u64,
                region,
                offset: (pages[i] * opts.page) as u64,
                len: opts.page as u32,
                buf: bufs[slot],
                buf_offset: (i - next) * opts.page,
            }));
            ini.post(&reads)?;
            batch_of[slot] = (next, end - next, end - next);
            next = end;
        }
        completions.clear();
        ini.wait(&mut completions, 1, Duration::from_secs(60))?;
        for c in &completions {
            if c.status != Status::Success {
                return Err(BenchError::Read { wr_id: c.wr_id, status: c.status });
            }
            let slot = (c.wr_id >> 32) as usize;
            done += 1;
            batch_of[slot].2 -= 1;
            if batch_of[slot].2 > 0 {
                continue;
            }
            if opts.verify {
                let (t, tc) = (Instant::now(), thread_cpu());
                let (first, n, _) = batch_of[slot];
                let got = ini.buf(bufs[slot])?;
                for (k, &p) in pages[first..first + n].iter().enumerate() {
                    if got[k * opts.page..(k + 1) * opts.page] != source[p * opts.page..(p + 1) * opts.page] {
                        return Err(BenchError::Mismatch { page: p });
                    }
                }
                verifying += t.elapsed();
                verifying_cpu += thread_cpu().saturating_sub(tc);
            }
            free.push(slot);
        }
    }
    let wall = start.elapsed().saturating_sub(verifying);
    Ok(Round { wall, cpu: process_cpu().saturating_sub(cpu).saturating_sub(verifying_cpu) })
}

fn stream_once(bytes: &[u8], big_buffers: bool) -> Result<Round, BenchError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(BenchError::Stream)?;
    let addr = listener.local_addr().map_err(BenchError::Stream)?;
    let total = bytes.len();
    let data: Arc<[u8]> = Arc::from(bytes);
    let cpu = process_cpu();
    let sender = thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        if big_buffers {
            rustix::net::sockopt::set_socket_send_buffer_size(&s, 4 << 20)?;
        }
        for chunk in data.chunks(1 << 20) {
            s.write_all(chunk)?;
        }
        Ok(())
    });
    let mut s = TcpStream::connect(addr).map_err(BenchError::Stream)?;
    if big_buffers {
        rustix::net::sockopt::set_socket_recv_buffer_size(&s, 4 << 20).map_err(|e| BenchError::Stream(e.into()))?;
    }
    let mut sink = vec![0u8; 2 << 20];
    let start = Instant::now();
    let mut got = 0;
    while got < total {
        match s.read(&mut sink) {
            Ok(0) => return Err(BenchError::Stream(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(BenchError::Stream(e)),
        }
    }
    let wall = start.elapsed();
    sender
        .join()
        .map_err(|_| BenchError::Stream(std::io::Error::other("sender panicked")))?
        .map_err(BenchError::Stream)?;
    Ok(Round { wall, cpu: process_cpu().saturating_sub(cpu) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choose_draws_distinct_pages() {
        let mut p = choose(100, 400);
        assert_eq!(p.len(), 100);
        p.sort_unstable();
        p.dedup();
        assert_eq!(p.len(), 100);
        assert!(p.iter().all(|&x| x < 400));
    }

    #[test]
    fn small_pull_runs_and_verifies() {
        let opts = BenchOptions { rounds: 1, ..BenchOptions::new(2) };
        let r = bench_pull(&opts).unwrap();
        assert_eq!(r.bytes, 2 << 20);
        assert!(r.ratio() > 0.0);
    }

    /// `cargo test -p remem-recovery --release -- --ignored pull_vs_stream --nocapture`
    #[test]
    #[ignore = "a measurement, not a test: run it by name"]
    fn pull_vs_stream() {
        let env = |name: &str, default: usize| std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default);
        let d = BenchOptions::new(env("REMEM_BENCH_MIB", 256));
        let opts = BenchOptions {
            batch: env("REMEM_BENCH_BATCH", d.batch),
            buffers: env("REMEM_BENCH_BUFFERS", d.buffers),
            spread: env("REMEM_BENCH_SPREAD", d.spread),
            rounds: env("REMEM_BENCH_ROUNDS", d.rounds),
            ..d
        };
        let r = bench_pull(&opts).unwrap();
        println!("{r}");
    }
}
