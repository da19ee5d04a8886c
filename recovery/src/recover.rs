//! Recovery of a heap on another host: load the baseline, pull the pages
//! that are newer than it out of the failed host's memory (through its
//! agent), verify them, roll back transactions in flight, fence the old
//! owner, and commit the result to the baseline so the database opens it.
//!
//! The steps, and what a failure at each leaves behind:
//! 1. connect to the agent and read its info block; wait until the owner is
//!    gone and the lists are sealed (nothing changed yet);
//! 2. fence: bump the generation in the baseline, so the old owner's later
//!    flushes are refused (the heap is unchanged);
//! 3. load the baseline into a fresh memfd at the heap's address and pull
//!    the listed pages over it in batches, checking each page's CRC and,
//!    at the end, the digest of the whole image against the agent's. A lost
//!    connection is retried; if it cannot finish, the open fails and the
//!    baseline keeps its last commit — a half-pulled heap is never
//!    committed;
//! 4. run the heap's recovery (roll back transactions in flight, repair
//!    the allocator) and flush everything to the baseline in one commit.
//!
//! Without an agent (the host is gone with its memory), recovery proceeds
//! from the baseline alone only when asked to ([`RecoverOptions::allow_data_loss`]),
//! and reports the baseline's age: the updates that may be lost.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use remem_alloc::baseline::{Baseline, FileBackend};
use remem_alloc::{Heap, HeapOptions, TrackMode};
use serde::Serialize;

use crate::agent::info;
use crate::transport::{self, Completion, ConnectOptions, Initiator, Kind, ReadRequest, RegionDesc, Status, Token};

/// How to recover.
pub struct RecoverOptions {
    /// The heap's baseline file (shared storage).
    pub baseline: PathBuf,
    /// The failed host's agent, if any.
    pub agent: Option<SocketAddr>,
    /// The shared token (needed with an agent).
    pub token: Option<Token>,
    /// Transport.
    pub kind: Kind,
    /// Proceed from the baseline alone when the agent cannot be reached.
    pub allow_data_loss: bool,
    /// How long to wait for the agent to seal (the owner to die).
    pub wait_sealed: Duration,
    /// Tracking mode of the recovered heap.
    pub tracking: TrackMode,
    /// Called with (pages done, pages to pull) while pulling.
    pub progress: Option<Box<dyn FnMut(u64, u64) + Send>>,
}

impl RecoverOptions {
    /// Recover the heap of `baseline`, from the agent at `agent` if given.
    pub fn new(baseline: impl Into<PathBuf>, agent: Option<SocketAddr>, token: Option<Token>) -> RecoverOptions {
        RecoverOptions {
            baseline: baseline.into(),
            agent,
            token,
            kind: Kind::Tcp,
            allow_data_loss: false,
            wait_sealed: Duration::from_secs(10),
            tracking: TrackMode::Fast,
            progress: None,
        }
    }
}

impl std::fmt::Debug for RecoverOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecoverOptions")
            .field("baseline", &self.baseline)
            .field("agent", &self.agent)
            .field("allow_data_loss", &self.allow_data_loss)
            .finish_non_exhaustive()
    }
}

/// What recovery did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RecoverReport {
    /// Heap UUID.
    pub uuid: String,
    /// Epoch of the baseline that was loaded.
    pub baseline_epoch: u64,
    /// Pages of the heap loaded from the baseline.
    pub pages_from_baseline: u64,
    /// Pages pulled from the agent.
    pub pages_pulled: u64,
    /// Bytes pulled.
    pub bytes_pulled: u64,
    /// Pulled pages whose CRC matched the agent's.
    pub pages_verified: u64,
    /// The whole image equalled the agent's memory (BLAKE3), when an agent was used.
    pub image_identical: Option<bool>,
    /// Seconds spent loading the baseline.
    pub seconds_baseline: f64,
    /// Seconds spent pulling.
    pub seconds_pull: f64,
    /// Seconds in all.
    pub seconds: f64,
    /// Transactions in flight rolled back.
    pub txs_rolled_back: u64,
    /// The generation the old owner was fenced with.
    pub generation: u64,
    /// Epoch of the commit that holds the recovered heap.
    pub committed_epoch: u64,
    /// True when the heap came from the baseline alone.
    pub baseline_only: bool,
    /// Recovery point: updates younger than this may be lost (0 when the
    /// dirty pages were pulled).
    pub rpo_seconds: f64,
    /// Connection attempts that failed and were retried.
    pub retries: u64,
}

/// Why recovery failed. The baseline is left as it was (except the fence).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecoverError {
    /// The agent could not be reached.
    #[error(
        "cannot reach the agent at {addr}: {reason}; to recover from the baseline alone (losing the updates \
         since its last flush) pass --allow-data-loss"
    )]
    AgentUnreachable {
        /// The agent's address.
        addr: SocketAddr,
        /// What failed.
        reason: String,
    },
    /// Neither an agent nor permission to lose data was given.
    #[error("no agent given: pass --agent ADDR, or --allow-data-loss to recover from the baseline alone")]
    NoAgent,
    /// The agent serves another heap.
    #[error("the agent serves heap {agent}, the baseline is heap {baseline}")]
    WrongHeap {
        /// UUID the agent holds.
        agent: String,
        /// UUID of the baseline.
        baseline: String,
    },
    /// The owner is still running.
    #[error("the heap's database (pid {pid}) is still running on the source host: stop it first")]
    OwnerAlive {
        /// Its pid there.
        pid: u64,
    },
    /// The agent's data is not what was expected.
    #[error("agent protocol: {0}")]
    Protocol(String),
    /// The baseline could not be opened or fenced.
    #[error("baseline {path}: {reason}")]
    Baseline {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// Opening, patching or flushing the heap failed.
    #[error(transparent)]
    Heap(#[from] remem_alloc::Error),
    /// A token is needed to talk to an agent.
    #[error("a token is needed to pull from an agent: set REMEM_TOKEN or pass --token-file")]
    NoToken,
}

/// What the agent told us.
struct AgentView {
    init: Box<dyn Initiator>,
    uuid: [u8; 16],
    npages: u64,
    heap: RegionDesc,
    control: RegionDesc,
    crc: RegionDesc,
    sealed: RegionDesc,
    digest: [u8; 32],
}

fn read_all(init: &mut dyn Initiator, region: RegionDesc, offset: u64, len: usize) -> Result<Vec<u8>, String> {
    let buf = init.alloc_buf(len.max(1)).map_err(|e| e.to_string())?;
    let mut done = 0usize;
    let mut reqs = Vec::new();
    while done < len {
        let n = (len - done).min(transport::MAX_READ_LEN as usize);
        reqs.push(ReadRequest {
            wr_id: done as u64,
            region,
            offset: offset + done as u64,
            len: n as u32,
            buf,
            buf_offset: done,
        });
        done += n;
    }
    init.post(&reqs).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    while out.len() < reqs.len() {
        let missing = reqs.len() - out.len();
        let got = init.wait(&mut out, missing, Duration::from_secs(30)).map_err(|e| e.to_string())?;
        if got == 0 {
            return Err("the agent did not answer within 30 s".into());
        }
    }
    if let Some(c) = out.iter().find(|c| c.status != Status::Success) {
        return Err(format!("read failed: {:?}", c.status));
    }
    Ok(init.buf(buf).map_err(|e| e.to_string())?[..len].to_vec())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn connect(opts: &RecoverOptions, addr: SocketAddr) -> Result<Box<dyn Initiator>, String> {
    let token = opts.token.clone().ok_or("no token")?;
    transport::connect(opts.kind, &ConnectOptions::new(addr, token)).map_err(|e| e.to_string())
}

/// Connects, waits for sealing, and reads the region table.
fn agent_view(opts: &RecoverOptions, addr: SocketAddr) -> Result<AgentView, RecoverError> {
    let unreachable = |reason: String| RecoverError::AgentUnreachable { addr, reason };
    let deadline = Instant::now() + opts.wait_sealed;
    loop {
        let mut init = connect(opts, addr).map_err(unreachable)?;
        // The info block is the region of its size that starts with its magic.
        let mut block = None;
        for r in init.regions().to_vec().into_iter().filter(|r| r.len == info::LEN as u64) {
            let b = read_all(&mut *init, r, 0, info::LEN).map_err(unreachable)?;
            if b[..8] == info::MAGIC_BYTES {
                block = Some(b);
                break;
            }
        }
        let Some(block) = block else {
            return Err(RecoverError::Protocol("the agent announced no info block".into()));
        };
        let state = u32_at(&block, info::STATE);
        if state == info::SEALED || state == info::CLOSED {
            let find = |n: usize| {
                let key = u32_at(&block, info::RKEYS + 4 * n);
                init.regions().iter().copied().find(|r| r.rkey == key).ok_or_else(|| {
                    RecoverError::Protocol(format!("the agent did not announce region {n} (rkey {key})"))
                })
            };
            let (heap, control, crc, sealed) = (find(0)?, find(1)?, find(2)?, find(3)?);
            let mut uuid = [0u8; 16];
            uuid.copy_from_slice(&block[info::UUID..info::UUID + 16]);
            let mut digest = [0u8; 32];
            digest.copy_from_slice(&block[info::DIGEST..info::DIGEST + 32]);
            return Ok(AgentView {
                init,
                uuid,
                npages: u64_at(&block, info::NPAGES),
                heap,
                control,
                crc,
                sealed,
                digest,
            });
        }
        if Instant::now() >= deadline {
            return match state {
                info::RUNNING => Err(RecoverError::OwnerAlive { pid: u64_at(&block, info::OWNER_PID) }),
                _ => Err(RecoverError::Protocol("the agent holds no heap".into())),
            };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pages to pull: the owner's current and closing sets, and the sealed list.
fn page_list(v: &mut AgentView) -> Result<(Vec<u64>, Vec<u32>), String> {
    let words = (v.npages as usize).div_ceil(64);
    let ctl = read_all(&mut *v.init, v.control, 0, v.control.len as usize)?;
    let (cur, clo) = (u64_at(&ctl, 48) as usize, u64_at(&ctl, 56) as usize);
    if cur + words * 8 > ctl.len() || clo + words * 8 > ctl.len() {
        return Err("the control region is smaller than its sets".into());
    }
    let sealed = read_all(&mut *v.init, v.sealed, 0, words * 8)?;
    let crc = read_all(&mut *v.init, v.crc, 0, v.npages as usize * 4)?;
    let mut pages = Vec::new();
    for w in 0..words {
        let mut bits = u64_at(&ctl, cur + 8 * w) | u64_at(&ctl, clo + 8 * w) | u64_at(&sealed, 8 * w);
        while bits != 0 {
            let p = w as u64 * 64 + u64::from(bits.trailing_zeros());
            if p < v.npages {
                pages.push(p);
            }
            bits &= bits - 1;
        }
    }
    let crcs = crc.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4"))).collect();
    Ok((pages, crcs))
}

/// Pulls `pages` into `dst` in pipelined batches; returns pages verified.
fn pull(
    v: &mut AgentView,
    pages: &[u64],
    crcs: &[u32],
    dst: &mut [u8],
    progress: &mut Option<Box<dyn FnMut(u64, u64) + Send>>,
) -> Result<u64, String> {
    const BUF: usize = 8 << 20;
    const NBUF: usize = 4;
    // Runs of consecutive pages, at most one buffer long.
    let mut runs: Vec<(u64, usize)> = Vec::new();
    for &p in pages {
        match runs.last_mut() {
            Some((s, n)) if *s + *n as u64 == p && (*n + 1) * 4096 <= BUF => *n += 1,
            _ => runs.push((p, 1)),
        }
    }
    let bufs: Vec<_> = (0..NBUF).map(|_| v.init.alloc_buf(BUF)).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    // Batches: consecutive runs filling one buffer.
    let mut batches: Vec<Vec<(u64, usize, usize)>> = Vec::new();
    let mut cur = Vec::new();
    let mut fill = 0usize;
    for (s, n) in runs {
        if fill + n * 4096 > BUF {
            batches.push(std::mem::take(&mut cur));
            fill = 0;
        }
        cur.push((s, n, fill));
        fill += n * 4096;
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    let mut verified = 0u64;
    let mut done = 0u64;
    let total = pages.len() as u64;
    let mut inflight: std::collections::VecDeque<(usize, usize)> = Default::default(); // (batch, buf)
    let mut next = 0usize;
    let mut out: Vec<Completion> = Vec::new();
    let heap_region = v.heap;
    let mut posted: std::collections::VecDeque<usize> = Default::default(); // outstanding reads per batch
    while next < batches.len() || !inflight.is_empty() {
        while next < batches.len() && inflight.len() < NBUF {
            let slot = (0..NBUF).find(|i| !inflight.iter().any(|&(_, b)| b == *i)).expect("a free buffer");
            let reqs: Vec<ReadRequest> = batches[next]
                .iter()
                .map(|&(s, n, at)| ReadRequest {
                    wr_id: next as u64,
                    region: heap_region,
                    offset: s * 4096,
                    len: (n * 4096) as u32,
                    buf: bufs[slot],
                    buf_offset: at,
                })
                .collect();
            v.init.post(&reqs).map_err(|e| e.to_string())?;
            posted.push_back(reqs.len());
            inflight.push_back((next, slot));
            next += 1;
        }
        let (batch, slot) = *inflight.front().expect("in flight");
        let want = *posted.front().expect("posted");
        // Completions come back in posting order; one wait may return those
        // of later batches too: they stay in `out` for the next round.
        while out.len() < want {
            let missing = want - out.len();
            let got = v.init.wait(&mut out, missing, Duration::from_secs(30)).map_err(|e| e.to_string())?;
            if got == 0 {
                return Err("the agent did not answer within 30 s".into());
            }
        }
        if let Some(c) = out[..want].iter().find(|c| c.status != Status::Success || c.wr_id != batch as u64) {
            return Err(format!("pull failed: {:?} (batch {})", c.status, c.wr_id));
        }
        out.drain(..want);
        let bytes = v.init.buf(bufs[slot]).map_err(|e| e.to_string())?;
        for &(s, n, at) in &batches[batch] {
            for k in 0..n {
                let p = s + k as u64;
                let page = &bytes[at + k * 4096..at + (k + 1) * 4096];
                if crc32fast::hash(page) != crcs[p as usize] {
                    return Err(format!("page {p}: CRC mismatch with the agent's (changed during the pull?)"));
                }
                verified += 1;
                dst[p as usize * 4096..(p as usize + 1) * 4096].copy_from_slice(page);
            }
            done += n as u64;
        }
        inflight.pop_front();
        posted.pop_front();
        if let Some(f) = progress.as_mut() {
            f(done, total);
        }
    }
    Ok(verified)
}

/// Recovers the heap (see the module docs) and returns it open, with the
/// recovered state committed to its baseline.
pub fn recover(mut opts: RecoverOptions) -> Result<(Heap, RecoverReport), RecoverError> {
    let t0 = Instant::now();
    let mut report = RecoverReport::default();
    let path = opts.baseline.clone();
    let bl_err = |reason: String| RecoverError::Baseline { path: path.clone(), reason };
    // 1. The agent.
    let mut view = match opts.agent {
        Some(addr) => {
            if opts.token.is_none() {
                return Err(RecoverError::NoToken);
            }
            match agent_view(&opts, addr) {
                Ok(v) => Some(v),
                Err(RecoverError::AgentUnreachable { .. }) if opts.allow_data_loss => None,
                Err(e) => return Err(e),
            }
        }
        None if opts.allow_data_loss => None,
        None => return Err(RecoverError::NoAgent),
    };
    // 2. Fence.
    {
        let backend = FileBackend::open(&path).map_err(|e| bl_err(e.to_string()))?;
        let mut bl = Baseline::open(backend).map_err(|e| bl_err(e.to_string()))?;
        if let Some(v) = &view {
            if v.uuid != bl.uuid() {
                return Err(RecoverError::WrongHeap {
                    agent: remem_alloc::format::uuid_string(&v.uuid),
                    baseline: remem_alloc::format::uuid_string(&bl.uuid()),
                });
            }
        }
        let g = bl.info().generation + 1;
        bl.fence(g).map_err(|e| bl_err(format!("fencing the old owner: {e}")))?;
        report.generation = g;
    }
    // 3. Load and pull.
    report.baseline_only = view.is_none();
    let mut progress = opts.progress.take();
    let mut pulled = (0u64, 0u64, None, 0.0f64);
    let t_load = Instant::now();
    let hopts = HeapOptions::new(0).tracking(opts.tracking).flush_interval(Some(Duration::from_secs(1)));
    let mut hook = |header: &remem_alloc::Header, dst: &mut [u8], ranges: &[(u64, u64)]| -> Result<Vec<u64>, String> {
        report.seconds_baseline = t_load.elapsed().as_secs_f64();
        let Some(v) = view.as_mut() else { return Ok(Vec::new()) };
        if v.npages != header.layout.npages() {
            return Err("the agent's heap has another size".into());
        }
        let t = Instant::now();
        let (pages, crcs) = page_list(v)?;
        let mut attempt = 0;
        let verified = loop {
            match pull(v, &pages, &crcs, dst, &mut progress) {
                Ok(n) => break n,
                Err(e) if attempt < 3 => {
                    attempt += 1;
                    report.retries += 1;
                    eprintln!("remem recover: pull interrupted ({e}); reconnecting");
                    let addr = opts.agent.expect("an agent");
                    v.init = connect(&opts, addr).map_err(|e| format!("reconnecting: {e}"))?;
                }
                Err(e) => return Err(format!("pulling pages failed after {attempt} retries: {e}")),
            }
        };
        let identical = crate::digest::image_digest(dst, ranges, &pages) == v.digest;
        pulled = (pages.len() as u64, verified, Some(identical), t.elapsed().as_secs_f64());
        if !identical {
            return Err("the assembled image differs from the agent's memory (BLAKE3)".into());
        }
        Ok(pages)
    };
    let heap = Heap::open_patched(&path, &hopts, &mut hook)?;
    // The heap must have opened the baseline as we fenced it: if the old
    // owner overwrote the fence in between, stop here (nothing committed).
    let opened_gen = heap.opened_from().map_or(0, |f| f.generation);
    if opened_gen != report.generation {
        return Err(RecoverError::Baseline {
            path: path.clone(),
            reason: format!(
                "the fence was lost: fenced with generation {}, the baseline now says {opened_gen}; \
                 stop the old owner and recover again",
                report.generation
            ),
        });
    }
    report.pages_pulled = pulled.0;
    report.bytes_pulled = pulled.0 * 4096;
    report.pages_verified = pulled.1;
    report.image_identical = pulled.2;
    report.seconds_pull = pulled.3;
    let npages = heap.size() / 4096;
    report.pages_from_baseline = npages - report.pages_pulled;
    report.uuid = heap.uuid();
    let from = heap.opened_from().expect("opened from a baseline");
    report.baseline_epoch = from.epoch;
    report.txs_rolled_back = heap.recovery_report().txs_rolled_back;
    report.rpo_seconds = if report.baseline_only { from.age.as_secs_f64() } else { 0.0 };
    // 4. Commit the recovered heap.
    report.committed_epoch = heap.flush().map_err(remem_alloc::Error::from)?;
    report.seconds = t0.elapsed().as_secs_f64();
    Ok((heap, report))
}
