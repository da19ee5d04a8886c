//! The failed host's memory, through its agent, as a [`PageSource`]: it
//! claims the pages the agent's lists name (those that may be newer than
//! the baseline), pulls any set of them ([`Puller`]: never more reads
//! outstanding than the transport's depth), verifies each page's CRC
//! against the agent's table (a mismatch is [`PageRead::Unreadable`]), and
//! reconnects with backoff when the connection is lost, going on from the
//! first page not yet received.

use std::net::SocketAddr;
use std::time::Duration;

use parking_lot::Mutex;
use remem_alloc::source::{check_request, PageRead, PageSource, SourceError};

use super::agent_view::{connect, AgentView, ConnectFail};
use super::pull::{runs_of, Puller, PAGE};
use super::RecoverOptions;
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

/// The agent's copy of the heap (see the module docs).
pub struct AgentSource {
    conn: Mutex<Conn>,
    /// Bit p: page p is in the agent's lists.
    claimed: Vec<u64>,
    /// The pages claimed, sorted.
    pages: Vec<u64>,
    crcs: Option<Vec<u32>>,
    npages: u64,
    addr: SocketAddr,
    kind: Kind,
    token: Option<Token>,
    /// Reconnections made.
    retries: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for AgentSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSource").field("addr", &self.addr).field("pages", &self.pages.len()).finish()
    }
}

impl AgentSource {
    /// The source of what `view` (read from the agent at `addr`) lists.
    pub(super) fn new(view: AgentView, opts: &RecoverOptions, addr: SocketAddr) -> AgentSource {
        let npages = view.npages as usize;
        let mut claimed = vec![0u64; npages.div_ceil(64)];
        for &p in &view.pages {
            claimed[p as usize / 64] |= 1 << (p % 64);
        }
        AgentSource {
            conn: Mutex::new(Conn { init: view.init, puller: None, heap: view.heap }),
            claimed,
            pages: view.pages,
            crcs: view.crcs,
            npages: view.npages,
            addr,
            kind: opts.kind,
            token: opts.token.clone(),
            retries: Default::default(),
        }
    }

    /// The pages this source claims, sorted.
    pub fn pages(&self) -> &[u64] {
        &self.pages
    }

    /// Whether pages are checked against CRCs (not from a hung owner, whose lists were never sealed).
    pub fn verifies(&self) -> bool {
        self.crcs.is_some()
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
            let crcs = &self.crcs;
            let r = puller.pull(&mut *c.init, c.heap, &left, |first, bytes| {
                for (k, page) in bytes.chunks_exact(PAGE).enumerate() {
                    let p = first + k as u64;
                    let ok = match crcs {
                        Some(c) => c.get(p as usize).is_some_and(|&want| crc32fast::hash(page) == want),
                        None => true,
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

    /// The agent's CRC of `page` (none from a hung owner).
    pub fn crc(&self, page: u64) -> Option<u32> {
        self.crcs.as_ref().and_then(|c| c.get(page as usize).copied())
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
        self.claimed.get(page as usize / 64).is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    fn read_pages(&self, first: u64, dst: &mut [u8], status: &mut [PageRead]) -> Result<(), SourceError> {
        check_request("agent", dst, status)?;
        if first.checked_add(status.len() as u64).is_none_or(|e| e > self.npages) {
            return Err(SourceError::BadRequest {
                source_name: "agent".into(),
                what: format!("pages {first}+{} beyond the heap", status.len()),
            });
        }
        if status.is_empty() {
            return Ok(());
        }
        self.pull_runs(&[(first, status.len() as u64)], |p, page, ok| {
            let k = (p - first) as usize;
            if ok {
                dst[k * PAGE..(k + 1) * PAGE].copy_from_slice(page);
                status[k] = PageRead::Data;
            } else {
                status[k] = PageRead::Unreadable;
            }
            Ok(())
        })
    }

    fn name(&self) -> &str {
        "agent"
    }
}
