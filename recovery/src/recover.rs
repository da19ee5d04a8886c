//! Recovery of a heap on another host: load the baseline, pull the pages
//! that are newer than it out of the failed host's memory (through its
//! agent), verify them, roll back transactions in flight, fence the old
//! owner, and commit the result to the baseline so the database opens it.
//!
//! The steps, and what a failure at each leaves behind:
//! 1. take the baseline's lock (only its holder fences and recovers: a
//!    second recovery, or a live database on this host, is refused here,
//!    with nothing changed);
//! 2. connect to the agent and read its info block; wait until the owner is
//!    gone and the lists are sealed; read the lists and the page CRCs and
//!    check every value against the baseline and the announced regions
//!    (nothing changed yet; a wrong token or a bad answer stops here, and is
//!    never mistaken for an unreachable agent);
//! 3. fence: bump the generation in the baseline, so the old owner's later
//!    flushes are refused (the heap is unchanged);
//! 4. load the baseline into a fresh memfd at the heap's address and pull
//!    the listed pages over it ([`pull`]: any page set, never more reads
//!    outstanding than the transport's depth), checking each page's CRC and,
//!    at the end, the digest of the whole image against the agent's. A lost
//!    connection is retried with backoff from the first page not received;
//!    if it cannot finish, the open fails and the baseline keeps its last
//!    commit — a half-pulled heap is never committed;
//! 5. run the heap's recovery (roll back transactions in flight, repair
//!    the allocator) and flush everything to the baseline in one commit.
//!
//! Without an agent (the host is gone with its memory), recovery proceeds
//! from the baseline alone only when asked to ([`RecoverOptions::allow_data_loss`]),
//! and reports the baseline's age: the updates that may be lost.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use std::sync::Arc;

use remem_alloc::baseline::{Backend, Baseline, FileBackend};
use remem_alloc::{BaselineLock, Heap, HeapOptions, TrackMode};
use serde::Serialize;

use crate::transport::{Kind, Token};

mod agent_source;
mod agent_view;
mod early;
pub mod pull;
pub mod resume;

pub use agent_source::AgentSource;
use agent_view::agent_view;

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
    /// Lazy recovery: return the heap open as soon as the pages its own
    /// recovery pass needs are in; every other page comes from the agent (or
    /// the baseline) on first touch or from a background prefetcher, and the
    /// recovered state is committed once every page is in
    /// ([`Heap::wait_lazy`]). The resume file serves the pages an
    /// interrupted earlier recovery pulled, and keeps the pages pulled now;
    /// it is removed once the recovered state is durable.
    pub lazy: bool,
    /// Also compare a BLAKE3 digest of the whole assembled image with the
    /// agent's (off by default: every pulled page is CRC-checked already,
    /// and a whole-image pass grows with the heap; tests and the demo use it).
    pub verify_image: bool,
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
            verify_image: false,
            lazy: false,
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
    /// Pages of the heap loaded from the baseline (lazy: the others, as
    /// known when the heap opened).
    pub pages_from_baseline: u64,
    /// Pages pulled from the agent (lazy: the pages its lists and its seal
    /// named when the heap opened, not yet the pages beyond a seal still in
    /// progress, which come from the agent too until the seal covers them).
    pub pages_pulled: u64,
    /// Bytes pulled.
    pub bytes_pulled: u64,
    /// Pulled pages whose CRC matched the agent's.
    pub pages_verified: u64,
    /// Pages taken from the resume file of an interrupted earlier recovery
    /// (`<baseline>.recovering`) instead of being pulled again.
    pub pages_resumed: u64,
    /// Pages of the heap's metadata (header, descriptors, lanes) pulled
    /// from the agent while the baseline was opened (a lazy recovery that
    /// started during the seal), served to the heap's open from memory.
    pub pages_early: u64,
    /// The whole image equalled the agent's memory (BLAKE3), when asked ([`RecoverOptions::verify_image`]).
    pub image_identical: Option<bool>,
    /// Seconds spent connecting to the agent, waiting for its seal (or for
    /// the owner's lease to expire) and reading its lists.
    pub seconds_agent: f64,
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
    /// Epoch of the commit that holds the recovered heap (0 for a lazy
    /// recovery: it commits once every page is in; see [`Heap::wait_lazy`]).
    pub committed_epoch: u64,
    /// The heap was opened lazily.
    pub lazy: bool,
    /// True when the heap came from the baseline alone.
    pub baseline_only: bool,
    /// Recovery point: updates younger than this may be lost (0 when the
    /// dirty pages were pulled).
    pub rpo_seconds: f64,
    /// Connection attempts that failed and were retried.
    pub retries: u64,
    /// The owner was hung (its lease expired; failure F2): recovered from
    /// its lists without the agent's seal.
    pub owner_hung: bool,
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
    /// The agent answered but refused us (wrong token) or broke the
    /// protocol: never treated as unreachable, even with `allow_data_loss`.
    #[error("the agent at {addr} refused the recovery: {reason}")]
    AgentRefused {
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
    /// The owner is hung (its lease expired) and tracks in fast mode: the
    /// pages written since its last harvest are known only to it.
    #[error(
        "the heap's owner is hung (its lease expired) and tracks writes in fast mode, so the pages it wrote since \
         its last harvest cannot be found without it: restart or kill it (then its agent seals the lists), or pass \
         --allow-data-loss to recover from its lists as they are"
    )]
    OwnerHung,
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

/// Recovers the heap (see the module docs) and returns it open, with the
/// recovered state committed to its baseline.
pub fn recover(mut opts: RecoverOptions) -> Result<(Heap, RecoverReport), RecoverError> {
    let t0 = Instant::now();
    let mut report = RecoverReport::default();
    let path = opts.baseline.clone();
    let bl_err = |reason: String| RecoverError::Baseline { path: path.clone(), reason };
    if opts.agent.is_some() && opts.token.is_none() {
        return Err(RecoverError::NoToken);
    }
    if opts.agent.is_none() && !opts.allow_data_loss {
        return Err(RecoverError::NoAgent);
    }
    // 1. The lock: only its holder fences and recovers. A hung owner still
    //    holds it: then, once its lease is found expired (step 2), the
    //    take-over lock stands in for it.
    let lock = match BaselineLock::take(&path) {
        Ok(l) => Ok(l),
        Err(e) if opts.agent.is_some() && matches!(&e, remem_alloc::Error::Open(remem_alloc::OpenError::Locked(_))) => {
            Err(e)
        }
        Err(e) => return Err(e.into()),
    };
    let backend_of = || -> Result<Arc<dyn Backend>, RecoverError> {
        Ok(Arc::new(FileBackend::open(&path).map_err(|e| bl_err(e.to_string()))?))
    };
    let open_on = |b: Arc<dyn Backend>| Baseline::open(b).map_err(|e| bl_err(e.to_string()));
    // 2. The baseline, and the agent: everything it says is read and checked
    //    before anything changes. The two are independent once the
    //    superblock names the heap, so the agent is asked while the
    //    baseline's CRC table and journal are read (tens of milliseconds
    //    on a large heap); a broken baseline is still reported first.
    let view_opts = agent_view::ViewOptions::of(&opts);
    let agent_addr = opts.agent;
    let backend = backend_of()?;
    // A superblock that cannot be read: the open below says why.
    let (mut bl, answer) = match Baseline::peek(&backend) {
        Ok((uuid, npages)) if agent_addr.is_some() => {
            // The agent is asked on a thread of its own, which is not waited
            // for if the baseline fails: its error is reported at once, and
            // the thread gives up at its next look (`cancel`).
            let (tx, rx) = std::sync::mpsc::channel();
            let vo = view_opts.clone();
            let asked = std::thread::Builder::new()
                .name("remem-recover-agent".into())
                .spawn(move || drop(tx.send(ask_agent(&vo, agent_addr, uuid, npages, t0))));
            let bl = open_on(backend);
            log::debug!("remem recover: baseline open at {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
            let bl = match bl {
                Ok(bl) => bl,
                Err(e) => {
                    view_opts.cancel.store(true, std::sync::atomic::Ordering::Release);
                    return Err(e);
                }
            };
            let answer = match asked {
                Ok(_) => rx.recv().unwrap_or_else(|_| {
                    Err(RecoverError::Protocol("the thread reading the agent's answer ended without one".into()))
                }),
                // No thread: ask now.
                Err(_) => ask_agent(&view_opts, agent_addr, uuid, npages, t0),
            }?;
            if (bl.uuid(), bl.npages()) != (uuid, npages) {
                return Err(bl_err("the baseline's superblock changed while it was opened".into()));
            }
            (bl, answer)
        }
        _ => {
            let bl = open_on(backend)?;
            log::debug!("remem recover: baseline open at {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
            let answer = ask_agent(&view_opts, agent_addr, bl.uuid(), bl.npages(), t0)?;
            (bl, answer)
        }
    };
    let (lock, took_over) = match lock {
        Ok(l) => (l, false),
        Err(_) if answer.hung() => (BaselineLock::take_over(&path)?, true),
        Err(e) => return Err(e.into()),
    };

    report.owner_hung = answer.hung();
    report.seconds_agent = answer.seconds;
    // 3. Fence.
    let g = bl.info().generation + 1;
    if opts.lazy {
        // Lazy recovery must not wait for a sync before the heap is
        // usable: the fence is synced in the background, and the recovered
        // heap's first commit syncs the file before its own superblock
        // (which carries generation `g` too) in any case.
        bl.fence_unsynced(g).map_err(|e| bl_err(format!("fencing the old owner: {e}")))?;
        sync_in_background(&path);
    } else {
        bl.fence(g).map_err(|e| bl_err(format!("fencing the old owner: {e}")))?;
    }

    report.generation = g;
    // A hung owner may resume mid-write: the recovered baseline moves to a
    // new inode its descriptors cannot reach.
    let lock = if took_over {
        drop(bl);
        let lock = lock.move_from_hung_owner()?;
        bl = open_on(backend_of()?)?;
        lock
    } else {
        lock
    };
    log::debug!("remem recover: fenced at {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
    if opts.lazy {
        return recover_lazy(opts, lock, bl, answer, report, t0);
    }
    let view = answer.view;
    drop(bl);
    // 4. Load and pull.
    report.baseline_only = view.as_ref().is_none_or(|v| v.lossy);
    let mut progress = opts.progress.take();
    let mut pulled = (0u64, 0u64, None, 0.0f64);
    let t_load = Instant::now();
    let hopts = HeapOptions::new(0).tracking(opts.tracking).flush_interval(Some(Duration::from_secs(1)));
    let source = match (view, opts.agent) {
        (Some(v), Some(addr)) => Some((v.digest, AgentSource::new(v, &view_opts, addr))),
        _ => None,
    };
    let verify_image = opts.verify_image;
    let mut resumed = 0u64;
    let mut hook = |header: &remem_alloc::Header, dst: &mut [u8], ranges: &[(u64, u64)]| -> Result<Vec<u64>, String> {
        report.seconds_baseline = t_load.elapsed().as_secs_f64();
        let Some((digest, src)) = source.as_ref() else { return Ok(Vec::new()) };
        if dst.len() as u64 != header.layout.npages() * 4096 {
            return Err("the agent's heap has another size".into());
        }
        let t = Instant::now();
        let total = src.pages().len() as u64;
        let mut done = 0u64;
        let mut tick = |n: u64| {
            done += n;
            if let Some(f) = progress.as_mut() {
                f(done, total);
            }
        };
        // Pages a killed earlier recovery already pulled, when still current.
        let mut resume = if src.verifies() {
            match resume::ResumeFile::open(&resume::path_of(&path), &header.uuid, header.layout.npages()) {
                Ok(r) => Some(r),
                Err(e) => {
                    log::warn!("remem recover: no resume file ({e}): pulling every page");
                    None
                }
            }
        } else {
            None
        };
        let mut to_pull = Vec::with_capacity(src.pages().len());
        for &p in src.pages() {
            let held = resume.as_ref().is_some_and(|r| r.crc_of(p).is_some() && r.crc_of(p) == src.crc(p));
            let at = p as usize * 4096;
            let ok = held && resume.as_ref().is_some_and(|r| r.read(p, &mut dst[at..at + 4096]).unwrap_or(false));
            if ok {
                resumed += 1;
            } else {
                to_pull.push(p);
            }
        }
        tick(resumed);
        let bad = src
            .pull_into(&to_pull, dst, |p, page| {
                if let Some(r) = resume.as_mut() {
                    r.append(p, crc32fast::hash(page), page).map_err(|e| format!("writing the resume file: {e}"))?;
                }
                tick(1);
                Ok(())
            })
            .map_err(|e| e.to_string())?;
        if let Some(r) = resume.as_mut() {
            r.sync().map_err(|e| format!("syncing the resume file: {e}"))?;
        }
        drop(resume);
        if let Some(p) = bad.first() {
            return Err(format!(
                "{} pulled pages do not match the agent's CRC (first: page {p}); nothing was committed",
                bad.len()
            ));
        }
        let pages = src.pages().to_vec();
        let identical = digest
            .filter(|_| verify_image && src.verifies())
            .map(|d| crate::digest::image_digest(dst, ranges, &pages) == d);
        let verified = if src.verifies() { pages.len() as u64 } else { 0 };
        pulled = (pages.len() as u64 - resumed, verified, identical, t.elapsed().as_secs_f64());
        if identical == Some(false) {
            return Err("the assembled image differs from the agent's memory (BLAKE3)".into());
        }
        Ok(pages)
    };
    let heap = Heap::open_patched(lock, &hopts, &mut hook)?;
    report.retries = source.as_ref().map_or(0, |(_, s)| s.retries());
    // The heap must have opened the baseline as we fenced it (we held the
    // lock, but an old owner that kept running could still write it).
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
    report.pages_from_baseline = npages - report.pages_pulled - resumed;
    report.uuid = heap.uuid();
    let Some(from) = heap.opened_from() else {
        return Err(RecoverError::Baseline { path, reason: "the heap was not opened from its baseline".into() });
    };
    report.baseline_epoch = from.epoch;
    report.txs_rolled_back = heap.recovery_report().txs_rolled_back;
    report.rpo_seconds = if report.baseline_only { from.age.as_secs_f64() } else { 0.0 };
    // 5. Commit the recovered heap.
    report.committed_epoch = heap.flush().map_err(remem_alloc::Error::from)?;
    report.pages_resumed = resumed;
    if std::fs::remove_file(resume::path_of(&path)).is_ok() {
        log::debug!("remem recover: resume file removed");
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok((heap, report))
}

/// Step 2's question to the agent (none without an agent; unreachable
/// counts as no answer when data loss is allowed). A lazy recovery during
/// the seal also pulls the heap's metadata pages now (see `early`).
fn ask_agent(
    opts: &agent_view::ViewOptions,
    agent: Option<SocketAddr>,
    uuid: [u8; 16],
    npages: u64,
    t0: Instant,
) -> Result<Answer, RecoverError> {
    let t_agent = Instant::now();
    let view = match agent {
        Some(addr) => match agent_view(opts, addr, uuid, npages) {
            Ok(v) => Some(v),
            Err(RecoverError::AgentUnreachable { .. }) if opts.allow_data_loss && !opts.cancelled() => None,
            Err(e) => return Err(e),
        },
        None => None,
    };
    log::debug!(
        "remem recover: the agent's answer in {:.1} ms, at {:.1} ms",
        t_agent.elapsed().as_secs_f64() * 1e3,
        t0.elapsed().as_secs_f64() * 1e3
    );
    let seconds = t_agent.elapsed().as_secs_f64();
    let (view, early) = match (view, agent) {
        (Some(v), Some(addr)) if opts.lazy && v.sealing.is_some() && !v.lossy && !v.hung && !opts.cancelled() => {
            let src = AgentSource::new(v, opts, addr);
            let e = early::Early::pull(&src);
            log::debug!(
                "remem recover: {} metadata pages pulled early, at {:.1} ms",
                e.as_ref().map_or(0, |e| e.pages()),
                t0.elapsed().as_secs_f64() * 1e3
            );
            (None, Some((src, e)))
        }
        (v, _) => (v, None),
    };
    Ok(Answer { view, early, seconds })
}

/// What the agent answered (step 2 of `recover`).
struct Answer {
    /// Its view, unless `early` was built from it.
    view: Option<agent_view::AgentView>,
    /// A lazy recovery during the seal: the source built from the view,
    /// and the heap's metadata pages pulled through it (none if that
    /// failed). Only from a view of an owner that was neither hung nor
    /// lossy.
    early: Option<(AgentSource, Option<early::Early>)>,
    /// Seconds the answer took.
    seconds: f64,
}

impl Answer {
    /// The agent answered (not unreachable with data loss allowed).
    fn answered(&self) -> bool {
        self.view.is_some() || self.early.is_some()
    }

    /// The owner was found hung.
    fn hung(&self) -> bool {
        self.view.as_ref().is_some_and(|v| v.hung)
    }

    /// The agent's view is lossy: the baseline alone is used.
    fn lossy(&self) -> bool {
        self.view.as_ref().is_some_and(|v| v.lossy)
    }
}

/// Syncs the baseline at `path` in a background thread (the lazy fence's
/// superblock): a failure is logged; the recovered heap's first commit
/// syncs the file again and reports its own failure.
fn sync_in_background(path: &std::path::Path) {
    let owned = path.to_owned();
    let spawned = std::thread::Builder::new().name("remem-fence-sync".into()).spawn(move || {
        if let Err(e) = std::fs::File::open(&owned).and_then(|f| f.sync_data()) {
            log::warn!("remem recover: syncing the fence of {} failed: {e}", owned.display());
        }
    });
    if let Err(e) = spawned {
        log::warn!("remem recover: no thread to sync the fence of {}: {e}", path.display());
    }
}

/// Lazy recovery (steps 4 and 5 of the module docs, on first touch): the
/// heap opens over a layered source, the agent's pages first, then the
/// baseline's; it commits itself once every page is in.
fn recover_lazy(
    opts: RecoverOptions,
    lock: BaselineLock,
    bl: Baseline<Arc<dyn Backend>>,
    answer: Answer,
    mut report: RecoverReport,
    t0: Instant,
) -> Result<(Heap, RecoverReport), RecoverError> {
    use remem_alloc::source::{BaselineSource, Layered, PageSource};
    let path = opts.baseline.clone();
    let bl_err = |reason: String| RecoverError::Baseline { path: path.clone(), reason };
    let mut layers: Vec<Arc<dyn PageSource>> = Vec::new();
    report.baseline_only = !answer.answered() || answer.lossy();
    let source = match (answer.early, answer.view, opts.agent) {
        (Some(early), _, _) => Some(early),
        (None, Some(v), Some(addr)) => Some((AgentSource::new(v, &agent_view::ViewOptions::of(&opts), addr), None)),
        _ => None,
    };
    if let Some((mut src, early)) = source {
        if let Some(e) = early {
            // Served from memory, ahead of every other layer.
            report.pages_early = e.pages();
            layers.push(Arc::new(e));
        }
        report.pages_pulled = src.pages().len() as u64;
        if src.verifies() {
            // Pages an interrupted earlier recovery pulled come from its
            // resume file; every page pulled now goes there too.
            match resume::ResumeFile::open_with(&resume::path_of(&path), &bl.uuid(), bl.npages(), false) {
                Ok(f) => {
                    let file: resume::SharedResume = Arc::new(parking_lot::Mutex::new(Some(f)));
                    // Only pages the agent claims, whose seal CRC it has.
                    let held = resume::ResumeSource::new(file.clone(), bl.npages(), |p| {
                        remem_alloc::source::PageSource::claims(&src, p).then(|| src.crc(p)).flatten()
                    });
                    report.pages_resumed = held.pages();
                    layers.push(Arc::new(held));
                    src = src.with_resume(file);
                }
                Err(e) => log::warn!("remem recover: no resume file ({e}): every page comes from the agent"),
            }
        }
        report.pages_pulled = report.pages_pulled.saturating_sub(report.pages_resumed);
        report.bytes_pulled = report.pages_pulled * 4096;
        layers.push(Arc::new(src));
    }
    if layers.is_empty() {
        // Nothing to resume from the agent: a resume file left by an
        // earlier recovery of it is of no use once this one commits.
        if std::fs::remove_file(resume::path_of(&path)).is_ok() {
            log::info!("remem recover: removed the resume file of an earlier recovery");
        }
    }
    layers.push(Arc::new(BaselineSource::new(bl.try_clone().map_err(|e| bl_err(e.to_string()))?)));
    let hopts = HeapOptions::new(0).tracking(opts.tracking).flush_interval(Some(Duration::from_secs(1)));
    log::debug!("remem recover: page sources ready at {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
    let heap = Heap::open_lazy_fenced(lock, bl, &hopts, Arc::new(Layered::new(layers)))?;
    let Some(from) = heap.opened_from() else {
        return Err(RecoverError::Baseline { path, reason: "the heap was not opened from its baseline".into() });
    };
    if from.generation != report.generation {
        return Err(RecoverError::Baseline {
            path: path.clone(),
            reason: format!(
                "the fence was lost: fenced with generation {}, the baseline now says {}; stop the old owner and \
                 recover again",
                report.generation, from.generation
            ),
        });
    }
    report.lazy = true;
    report.uuid = heap.uuid();
    report.baseline_epoch = from.epoch;
    report.txs_rolled_back = heap.recovery_report().txs_rolled_back;
    report.rpo_seconds = if report.baseline_only { from.age.as_secs_f64() } else { 0.0 };
    report.pages_from_baseline = (heap.size() / 4096).saturating_sub(report.pages_pulled + report.pages_resumed);
    report.seconds = t0.elapsed().as_secs_f64();
    Ok((heap, report))
}
