//! The failed host's memory, through its agent, as a [`PageSource`]: it
//! claims the pages the agent's lists name (those that may be newer than
//! the baseline), pulls any set of them ([`Puller`]: never more reads
//! outstanding than the transport's depth), verifies each page's CRC
//! against the agent's table (a mismatch is [`PageRead::Unreadable`]), and
//! reconnects with backoff when the connection is lost, going on from the
//! first page not yet received.
//!
//! A lazy recovery may start while the agent is still sealing (fast mode:
//! the seal compares every page of the dead owner's frozen memory with the
//! baseline, which takes seconds on a large heap). Then the source claims
//! every page from the seal's cursor on (the agent's copy is the newest of
//! every page), and a thread ([`follow`]) reads the seal's progress over a
//! connection of its own: for each chunk newly covered it stores the
//! agent's CRCs, then stops claiming the chunk's pages the seal found equal
//! to the baseline, then publishes how far it got. A page read from the
//! agent is checked against the seal's CRC when the seal covered it when
//! it was verified; a page beyond it, against the CRC-32 the agent's target
//! computed over the response in its memory (TCP). The claims only ever
//! shrink, as [`PageSource::claims`] requires.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use remem_alloc::source::{check_request, PageRead, PageSource, SourceError};

use super::agent_view::{connect, read_bytes, AgentView, ConnectFail, Sealing, ViewOptions};
use super::pull::{runs_of, Puller, PAGE};
use crate::agent::{info, layout};
use crate::transport::{Initiator, Kind, RegionDesc, Token};

/// Reconnections tried when a pull is interrupted, with a doubling pause
/// from [`RETRY_PAUSE`].
const RETRIES: u32 = 4;
/// The first pause before a reconnection.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

struct Conn {
    init: Box<dyn Initiator>,
    puller: Option<Puller>,
    heap: RegionDesc,
}

/// How often the seal's progress is read while it runs.
const FOLLOW_EVERY: Duration = Duration::from_millis(10);
/// Consecutive failures after which the seal is no longer followed (the
/// pages beyond its cursor then stay claimed, and those served are not
/// confirmed: the commit is refused).
const FOLLOW_FAILURES: u32 = 20;

/// What the source knows of the seal; shared with [`follow`].
struct Known {
    /// Bit p: page p may be newer than the baseline (claimed).
    claimed: Vec<AtomicU64>,
    /// Bit p: page p is in the owner's dirty lists (claimed whatever the seal says).
    listed: Vec<u64>,
    /// The agent's CRCs of pages `[0, start)`, as read when recovery began.
    crcs: Vec<u32>,
    /// Their CRCs of pages `[start, npages)`, valid below `cursor`.
    later: Vec<AtomicU32>,
    start: u64,
    /// Pages `[0, cursor)` are covered by the seal: claims final, CRCs known.
    cursor: AtomicU64,
    /// Whether pages are verified against the seal's CRCs at all (not from a
    /// hung owner, whose lists were never sealed).
    verifies: bool,
    /// Set when the source is dropped or the recovery is over: [`follow`] stops.
    stop: AtomicBool,
    /// [`follow`] has ended (or never ran): `cursor` moves no more.
    followed: AtomicBool,
    /// Bit p: page p (at or beyond `start`) was served before the seal
    /// covered it; its CRC as served is in `served`.
    served_bits: Vec<AtomicU64>,
    served: Vec<AtomicU32>,
}

impl Known {
    fn claimed(&self, page: u64) -> bool {
        self.claimed.get(page as usize / 64).is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
    }

    /// The seal's CRC of `page` as published, if the seal covers it
    /// (meaningful only where the seal hashed the page: every page in fast
    /// mode, the listed ones in precise mode).
    fn sealed_crc(&self, page: u64) -> Option<u32> {
        if !self.verifies || page >= self.cursor.load(Ordering::Acquire) {
            return None;
        }
        match page.checked_sub(self.start) {
            None => self.crcs.get(page as usize).copied(),
            Some(k) => self.later.get(k as usize).map(|c| c.load(Ordering::Relaxed)),
        }
    }

    /// The seal's CRC of a page this source claims (the seal hashed it).
    fn crc(&self, page: u64) -> Option<u32> {
        self.sealed_crc(page).filter(|_| self.claimed(page))
    }

    /// Records the CRC of a page served before the seal covered it.
    fn note_served(&self, page: u64, crc: u32) {
        if let (Some(k), Some(w)) = (page.checked_sub(self.start), self.served_bits.get(page as usize / 64)) {
            if let Some(c) = self.served.get(k as usize) {
                c.store(crc, Ordering::Relaxed);
                w.fetch_or(1 << (page % 64), Ordering::AcqRel);
            }
        }
    }
}

/// The agent's copy of the heap (see the module docs).
pub struct AgentSource {
    conn: Mutex<Conn>,
    known: Arc<Known>,
    /// The pages listed when recovery began, sorted (with a seal in
    /// progress: those below its cursor the seal found changed, and every
    /// page of the owner's lists).
    pages: Vec<u64>,
    npages: u64,
    addr: SocketAddr,
    kind: Kind,
    token: Option<Token>,
    /// Reconnections made.
    retries: std::sync::atomic::AtomicU64,
    /// Where pages read through [`PageSource::read_runs`] are kept for a
    /// resumed recovery (lazy recovery).
    resume: Option<super::resume::SharedResume>,
}

impl Drop for AgentSource {
    fn drop(&mut self) {
        self.known.stop.store(true, Ordering::Release);
    }
}

impl std::fmt::Debug for AgentSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSource").field("addr", &self.addr).field("pages", &self.pages.len()).finish()
    }
}

impl AgentSource {
    /// The source of what `view` (read from the agent at `addr`) lists.
    /// With a seal in progress (`view.sealing`), a thread follows it until
    /// it covers every page.
    pub(super) fn new(view: AgentView, opts: &ViewOptions, addr: SocketAddr) -> AgentSource {
        let npages = view.npages;
        let words = npages.div_ceil(64) as usize;
        let mut listed = vec![0u64; words];
        for &p in &view.pages {
            listed[p as usize / 64] |= 1 << (p % 64);
        }
        let start = view.sealing.map_or(npages, |s| s.cursor.min(npages));
        // Claimed: the lists, and everything the seal has not covered yet.
        let claimed = (0..words)
            .map(|w| {
                let first = w as u64 * 64;
                let beyond = match start.saturating_sub(first) {
                    0 => u64::MAX,
                    k if k < 64 => !((1u64 << k) - 1),
                    _ => 0,
                };
                AtomicU64::new(listed[w] | beyond)
            })
            .collect();
        log::debug!(
            "remem recover: the agent's seal is at page {start} of {npages}; {} listed pages",
            view.pages.len()
        );
        let beyond = (npages - start) as usize;
        let known = Arc::new(Known {
            claimed,
            listed,
            verifies: view.crcs.is_some(),
            crcs: view.crcs.unwrap_or_default(),
            later: (0..beyond).map(|_| AtomicU32::new(0)).collect(),
            start,
            cursor: AtomicU64::new(start),
            stop: AtomicBool::new(false),
            followed: AtomicBool::new(true),
            served_bits: if beyond > 0 { (0..words).map(|_| AtomicU64::new(0)).collect() } else { Vec::new() },
            served: (0..beyond).map(|_| AtomicU32::new(0)).collect(),
        });
        if let Some(sealing) = view.sealing.filter(|_| start < npages) {
            known.followed.store(false, Ordering::Release);
            let (k, kind, token, stall) = (Arc::clone(&known), opts.kind, opts.token.clone(), opts.wait_sealed);
            let spawned = std::thread::Builder::new().name("remem-follow-seal".into()).spawn(move || {
                follow(&k, sealing, (npages, stall), kind, token.as_ref(), addr);
                k.followed.store(true, Ordering::Release);
            });
            if let Err(e) = spawned {
                known.followed.store(true, Ordering::Release);
                log::warn!(
                    "remem recover: cannot follow the agent's seal ({e}): every page it has not sealed comes from \
                     the agent, and the recovered state cannot be confirmed against the seal"
                );
            }
        }
        AgentSource {
            conn: Mutex::new(Conn { init: view.init, puller: None, heap: view.heap }),
            known,
            pages: view.pages,
            npages,
            addr,
            kind: opts.kind,
            token: opts.token.clone(),
            retries: Default::default(),
            resume: None,
        }
    }

    /// Keeps every page read through [`PageSource::read_runs`] in `file`,
    /// which [`PageSource::recovered`] removes.
    pub(super) fn with_resume(mut self, file: super::resume::SharedResume) -> AgentSource {
        self.resume = Some(file);
        self
    }

    /// Pages of the heap.
    pub fn npages(&self) -> u64 {
        self.npages
    }

    /// The pages this source claims, sorted.
    pub fn pages(&self) -> &[u64] {
        &self.pages
    }

    /// Whether pages are checked against CRCs (not from a hung owner, whose lists were never sealed).
    pub fn verifies(&self) -> bool {
        self.known.verifies
    }

    /// Pages covered by the agent's seal so far, as this source knows it.
    pub fn sealed_through(&self) -> u64 {
        self.known.cursor.load(Ordering::Acquire)
    }

    /// Reconnections made so far.
    pub fn retries(&self) -> u64 {
        self.retries.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn reconnect(&self, conn: &mut Conn, attempt: &mut u32) -> Result<(), SourceError> {
        let failed = |reason: String| SourceError::Failed { source_name: "agent".into(), reason };
        loop {
            std::thread::sleep(RETRY_PAUSE * 2u32.pow(*attempt));
            *attempt += 1;
            self.retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match connect(self.kind, self.token.as_ref(), self.addr) {
                Ok(init) => {
                    let heap =
                        init.regions().iter().copied().find(|r| r.rkey == conn.heap.rkey && r.len == conn.heap.len);
                    conn.heap =
                        heap.ok_or_else(|| failed("after reconnecting, the agent no longer serves the heap".into()))?;
                    conn.init = init;
                    conn.puller = None;
                    return Ok(());
                }
                Err(ConnectFail::Unreachable(e)) if *attempt < RETRIES => {
                    log::warn!("remem recover: reconnecting to {} failed ({e}); retrying", self.addr);
                }
                Err(ConnectFail::Unreachable(e) | ConnectFail::Refused(e)) => {
                    return Err(failed(format!("reconnecting: {e}")))
                }
            }
        }
    }

    /// Pulls the pages of `runs` (sorted, disjoint), calling
    /// `sink(page, bytes, verified)` for each page in order (`verified`
    /// false: its CRC differs from the agent's table). Reconnects when the
    /// connection is lost, from the first page not yet received.
    pub fn pull_runs(
        &self,
        runs: &[(u64, u64)],
        mut sink: impl FnMut(u64, &[u8], bool) -> Result<(), String>,
    ) -> Result<(), SourceError> {
        let failed = |reason: String| SourceError::Failed { source_name: "agent".into(), reason };
        let mut conn = self.conn.lock();
        let mut from = 0u64;
        let mut attempt = 0u32;
        loop {
            let left: Vec<(u64, u64)> = runs
                .iter()
                .filter(|&&(s, n)| s + n > from)
                .map(|&(s, n)| if s < from { (from, s + n - from) } else { (s, n) })
                .collect();
            let c = &mut *conn;
            if c.puller.is_none() {
                match Puller::new(&mut *c.init) {
                    Ok(p) => c.puller = Some(p),
                    Err(e) if attempt < RETRIES => {
                        log::warn!("remem recover: {e}; reconnecting");
                        self.reconnect(c, &mut attempt)?;
                        continue;
                    }
                    Err(e) => return Err(failed(e.to_string())),
                }
            }
            let Some(puller) = c.puller.as_mut() else { continue };
            let known = &*self.known;
            let r = puller.pull(&mut *c.init, c.heap, &left, |first, bytes, response_crc| {
                // Pages the seal has not covered yet: the response's CRC
                // from the agent's memory (computed once for the piece).
                let n = (bytes.len() / PAGE) as u64;
                let piece_ok = !known.verifies
                    || known.crc(first + n - 1).is_some()
                    || response_crc.is_none_or(|want| crc32fast::hash(bytes) == want);
                for (k, page) in bytes.chunks_exact(PAGE).enumerate() {
                    let p = first + k as u64;
                    let ok = match known.crc(p) {
                        Some(want) => crc32fast::hash(page) == want,
                        None if piece_ok && known.verifies => {
                            // Checked against the seal before the commit (`confirm`).
                            known.note_served(p, crc32fast::hash(page));
                            true
                        }
                        None => piece_ok,
                    };
                    sink(p, page, ok)?;
                    from = p + 1;
                }
                Ok(())
            });
            match r {
                Ok(()) => return Ok(()),
                Err(super::pull::PullError::Sink(e)) => return Err(failed(e)),
                Err(super::pull::PullError::BadRuns(e)) => {
                    return Err(SourceError::BadRequest { source_name: "agent".into(), what: e })
                }
                Err(e) if attempt < RETRIES => {
                    log::warn!("remem recover: pull interrupted ({e}); reconnecting");
                    self.reconnect(c, &mut attempt)?;
                }
                Err(e) => return Err(failed(format!("pulling failed after {attempt} reconnections: {e}"))),
            }
        }
    }

    /// The agent's CRC of `page` (none from a hung owner, nor beyond the
    /// seal's cursor while it runs).
    pub fn crc(&self, page: u64) -> Option<u32> {
        self.known.crc(page)
    }

    /// Pulls `pages` (sorted) into `image` (the heap's bytes), calling
    /// `on_page(page, bytes)` for each page that passed its CRC check;
    /// returns the pages whose CRC did not match (left as they were in `image`).
    pub fn pull_into(
        &self,
        pages: &[u64],
        image: &mut [u8],
        mut on_page: impl FnMut(u64, &[u8]) -> Result<(), String>,
    ) -> Result<Vec<u64>, SourceError> {
        let mut bad = Vec::new();
        self.pull_runs(&runs_of(pages.iter().copied()), |p, page, ok| {
            let at = p as usize * PAGE;
            let dst = image.get_mut(at..at + PAGE).ok_or_else(|| format!("page {p} outside the image"))?;
            if ok {
                dst.copy_from_slice(page);
                on_page(p, page)?;
            } else {
                bad.push(p);
            }
            Ok(())
        })?;
        Ok(bad)
    }
}

impl PageSource for AgentSource {
    fn claims(&self, page: u64) -> bool {
        self.known.claimed(page)
    }

    /// Waits until the seal covers every page this source served before the
    /// seal reached it, then checks each against the seal's CRC: a page
    /// whose bytes as served differ from what the seal found (the agent's
    /// memory changed under the recovery), or that the seal never covered
    /// (the seal stopped, or could not be followed), refuses the commit.
    fn confirm(&self) -> Result<(), String> {
        let k = &*self.known;
        if k.served_bits.is_empty() {
            return Ok(());
        }
        while !k.followed.load(Ordering::Acquire) {
            std::thread::sleep(FOLLOW_EVERY);
        }
        let cursor = k.cursor.load(Ordering::Acquire);
        let (mut unsealed, mut differ) = (Vec::new(), Vec::new());
        for (w, bits) in k.served_bits.iter().enumerate() {
            let mut b = bits.load(Ordering::Acquire);
            while b != 0 {
                let p = w as u64 * 64 + u64::from(b.trailing_zeros());
                b &= b - 1;
                let served = k.served.get((p - k.start) as usize).map(|c| c.load(Ordering::Relaxed));
                match k.sealed_crc(p) {
                    None => unsealed.push(p),
                    Some(c) if Some(c) != served => differ.push(p),
                    Some(_) => {}
                }
            }
        }
        if let Some(p) = differ.first() {
            return Err(format!(
                "{} pages the agent served before its seal covered them differ from what the seal found (first: page \
                 {p}): the failed host's memory changed during the recovery",
                differ.len()
            ));
        }
        if let Some(p) = unsealed.first() {
            return Err(format!(
                "the agent's seal stopped at page {cursor} and never covered {} pages served before it (first: page \
                 {p}); recover again",
                unsealed.len()
            ));
        }
        Ok(())
    }

    fn read_pages(&self, first: u64, dst: &mut [u8], status: &mut [PageRead]) -> Result<(), SourceError> {
        self.read_runs(first, &[(first, status.len() as u64)], dst, status)
    }

    fn read_runs(
        &self,
        first: u64,
        runs: &[(u64, u64)],
        dst: &mut [u8],
        status: &mut [PageRead],
    ) -> Result<(), SourceError> {
        check_request("agent", dst, status)?;
        let end = first.checked_add(status.len() as u64).filter(|&e| e <= self.npages);
        let inside = |&(s, n): &(u64, u64)| s >= first && s.checked_add(n).is_some_and(|e| Some(e) <= end);
        if end.is_none() || !runs.iter().all(inside) {
            return Err(SourceError::BadRequest {
                source_name: "agent".into(),
                what: format!("runs outside pages {first}+{} of a heap of {} pages", status.len(), self.npages),
            });
        }
        let runs: Vec<(u64, u64)> = runs.iter().copied().filter(|&(_, n)| n > 0).collect();
        if runs.is_empty() {
            return Ok(());
        }
        let mut resume = self.resume.as_ref().map(|r| r.lock());
        self.pull_runs(&runs, |p, page, ok| {
            let k = (p - first) as usize;
            if ok {
                dst[k * PAGE..(k + 1) * PAGE].copy_from_slice(page);
                status[k] = PageRead::Data;
                if let Some(file) = resume.as_mut() {
                    if let Some(Err(e)) = file.as_mut().map(|f| f.append(p, crc32fast::hash(page), page)) {
                        log::warn!("remem recover: writing the resume file failed ({e}); going on without it");
                        **file = None;
                    }
                }
            } else {
                status[k] = PageRead::Unreadable;
            }
            Ok(())
        })
    }

    fn recovered(&self) {
        self.known.stop.store(true, Ordering::Release);
        if let Some(file) = self.resume.as_ref().and_then(|r| r.lock().take()) {
            if let Err(e) = file.remove() {
                log::warn!("remem recover: removing the resume file: {e}");
            }
        }
    }

    fn name(&self) -> &str {
        "agent"
    }
}

/// Follows a seal in progress (see the module docs) until it covers every
/// page, the source is dropped, or the agent stops answering sensibly.
/// A seal whose cursor does not move for `stall` (the recovery's
/// `wait_sealed`) is no longer followed.
fn follow(
    known: &Known,
    sealing: Sealing,
    (npages, stall): (u64, Duration),
    kind: Kind,
    token: Option<&Token>,
    addr: SocketAddr,
) {
    let mut failures = 0u32;
    let mut init: Option<Box<dyn Initiator>> = None;
    let (mut last, mut moved) = (known.cursor.load(Ordering::Acquire), std::time::Instant::now());
    let mut first = true;
    while !known.stop.load(Ordering::Acquire) && known.cursor.load(Ordering::Acquire) < npages {
        // The first look at once: the seal's first chunks are what the
        // heap's opening reads.
        if !std::mem::take(&mut first) {
            std::thread::sleep(FOLLOW_EVERY);
        }
        let now = known.cursor.load(Ordering::Acquire);
        if now != last {
            (last, moved) = (now, std::time::Instant::now());
        } else if moved.elapsed() > stall {
            log::warn!(
                "remem recover: the agent's seal has not moved past page {now} for {stall:?}: no longer following it"
            );
            return;
        }
        if init.is_none() {
            match connect(kind, token, addr) {
                Ok(i) => init = Some(i),
                Err(ConnectFail::Unreachable(e) | ConnectFail::Refused(e)) => {
                    failures += 1;
                    if failures >= FOLLOW_FAILURES {
                        log::warn!("remem recover: stopped following the agent's seal ({e}): the pages beyond come from the agent");
                        return;
                    }
                    continue;
                }
            }
        }
        let step = match init.as_mut() {
            Some(i) => follow_step(known, &sealing, npages, &mut **i),
            None => continue,
        };
        match step {
            Ok(()) => failures = 0,
            Err(e) => {
                init = None;
                failures += 1;
                if failures >= FOLLOW_FAILURES {
                    log::warn!(
                        "remem recover: stopped following the agent's seal at page {} ({e}): the pages beyond \
                         come from the agent",
                        known.cursor.load(Ordering::Acquire)
                    );
                    return;
                }
            }
        }
    }
}

/// One look at the seal's progress: takes in what it newly covers.
fn follow_step(known: &Known, s: &Sealing, npages: u64, init: &mut dyn Initiator) -> Result<(), String> {
    let block = read_bytes(init, s.directory, s.slot_off, info::LEN)?;
    let u64_of = |at: usize| layout::u64_at(&block, at).ok_or_else(|| format!("no u64 at {at} of the info block"));
    if layout::u64_at(&block, info::ASSIGNED) != Some(s.assigned) {
        // The slot went to another heap: nothing more is learnt (and the
        // source's own reads will fail if the heap is gone).
        known.stop.store(true, Ordering::Release);
        return Err("the agent's slot for the heap was reassigned".into());
    }
    let cursor = match layout::u32_at(&block, info::STATE) {
        Some(info::SEALED) => npages,
        Some(info::SEALING) => u64_of(info::SEAL_CURSOR)?,
        other => {
            known.stop.store(true, Ordering::Release);
            return Err(format!("the heap's slot is in state {other:?}, neither sealing nor sealed"));
        }
    };
    let from = known.cursor.load(Ordering::Acquire);
    if cursor > npages || cursor < from {
        known.stop.store(true, Ordering::Release);
        return Err(format!("the seal cursor went from {from} to {cursor} (the heap has {npages} pages)"));
    }
    if cursor == from {
        return Ok(());
    }
    // The bits and CRCs of [from, cursor): the agent wrote them before it
    // advanced the cursor just read.
    let (w0, w1) = (from / 64, cursor.div_ceil(64));
    let bits = read_bytes(init, s.sealed, w0 * 8, ((w1 - w0) * 8) as usize)?;
    let crcs = read_bytes(init, s.crc, from * 4, ((cursor - from) * 4) as usize)?;
    for p in from..cursor {
        let k = (p - from) as usize;
        let crc = u32::from_le_bytes([crcs[4 * k], crcs[4 * k + 1], crcs[4 * k + 2], crcs[4 * k + 3]]);
        if let Some(c) = known.later.get((p - known.start) as usize) {
            c.store(crc, Ordering::Relaxed);
        }
        let w = (p / 64 - w0) as usize;
        let word = u64::from_le_bytes(bits[8 * w..8 * w + 8].try_into().unwrap_or([0xff; 8]));
        let bit = 1u64 << (p % 64);
        let listed = known.listed.get(p as usize / 64).is_some_and(|l| l & bit != 0);
        if word & bit == 0 && !listed {
            if let Some(c) = known.claimed.get(p as usize / 64) {
                c.fetch_and(!bit, Ordering::AcqRel);
            }
        }
    }
    known.cursor.store(cursor, Ordering::Release);
    Ok(())
}
