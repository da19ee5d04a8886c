//! The heap's metadata pages, pulled from the agent early.
//!
//! A lazy recovery that starts while the agent still seals gets every page
//! beyond the seal's cursor from the agent, and the heap's open begins by
//! reading its metadata pages (header, page descriptors, lanes: 4 176 pages
//! at 8 GiB), which the seal has usually not reached yet. [`Early::pull`]
//! pulls those the agent claims as soon as the agent has answered, while the
//! baseline's CRC table and journal are still being read, through the same
//! [`AgentSource`] (so every page is verified, and those the seal had not
//! covered are confirmed against it before the commit, as any other). The
//! lazy open then takes them from memory, as the first layer of its source.
//! Nothing is lost when the early pull fails: the pages then come from the
//! agent during the open, as before.

use parking_lot::RwLock;
use remem_alloc::source::{check_request, PageRead, PageSource, SourceError};

use super::agent_source::AgentSource;
use super::pull::PAGE;

/// Pages pulled before the heap opened, served from memory.
pub(super) struct Early {
    /// Dropped once the recovery is over ([`PageSource::recovered`]).
    held: RwLock<Option<Held>>,
}

struct Held {
    /// Bit p: page p is in `buf`, verified.
    have: Vec<u64>,
    /// Pages `[0, have.len() * 64)`, `PAGE` bytes each.
    buf: Vec<u8>,
}

impl Held {
    fn has(&self, p: u64) -> bool {
        self.have.get((p / 64) as usize).is_some_and(|w| w & (1 << (p % 64)) != 0)
    }
}

impl Early {
    /// Pulls the metadata pages `src` claims (the header first, whose layout
    /// says where the metadata ends). `None`, after a debug log, when the
    /// header is not the agent's to give or a pull fails.
    pub(super) fn pull(src: &AgentSource) -> Option<Early> {
        if !src.claims(0) {
            return None;
        }
        let mut header = vec![0u8; PAGE];
        let mut one = [PageRead::Unreadable];
        if let Err(e) = src.read_pages(0, &mut header, &mut one) {
            log::debug!("remem recover: no early pull of the metadata: the header: {e}");
            return None;
        }
        if one[0] != PageRead::Data {
            return None;
        }
        let layout = match remem_alloc::Header::decode(&header) {
            Ok(h) => h.layout,
            Err(e) => {
                log::debug!("remem recover: no early pull of the metadata: the agent's header: {e}");
                return None;
            }
        };
        if layout.npages() != src.npages() {
            return None;
        }
        let end = layout.first_data_page().min(src.npages());
        let mut buf = vec![0u8; end as usize * PAGE];
        buf[..PAGE].copy_from_slice(&header);
        let mut status = vec![PageRead::Unreadable; end as usize];
        status[0] = PageRead::Data;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for p in (1..end).filter(|&p| src.claims(p)) {
            match runs.last_mut() {
                Some((s, n)) if *s + *n == p => *n += 1,
                _ => runs.push((p, 1)),
            }
        }
        if let Err(e) = src.read_runs(0, &runs, &mut buf, &mut status) {
            log::debug!("remem recover: the early pull of the metadata failed: {e}");
            return None;
        }
        let mut have = vec![0u64; end.div_ceil(64) as usize];
        for (p, _) in status.iter().enumerate().filter(|(_, &s)| s == PageRead::Data) {
            have[p / 64] |= 1 << (p % 64);
        }
        Some(Early { held: RwLock::new(Some(Held { have, buf })) })
    }

    /// Pages held.
    pub(super) fn pages(&self) -> u64 {
        self.held.read().as_ref().map_or(0, |h| h.have.iter().map(|w| u64::from(w.count_ones())).sum())
    }
}

impl PageSource for Early {
    fn claims(&self, page: u64) -> bool {
        self.held.read().as_ref().is_some_and(|h| h.has(page))
    }

    fn read_pages(&self, first: u64, dst: &mut [u8], status: &mut [PageRead]) -> Result<(), SourceError> {
        check_request("agent (early)", dst, status)?;
        let held = self.held.read();
        for (k, st) in status.iter_mut().enumerate() {
            let p = first + k as u64;
            match held.as_ref().filter(|h| h.has(p)) {
                Some(h) => {
                    let at = p as usize * PAGE;
                    dst[k * PAGE..(k + 1) * PAGE].copy_from_slice(&h.buf[at..at + PAGE]);
                    *st = PageRead::Data;
                }
                // Not held (never, or no longer): the next layer has it.
                None => *st = PageRead::Unreadable,
            }
        }
        Ok(())
    }

    fn recovered(&self) {
        *self.held.write() = None;
    }

    fn name(&self) -> &str {
        "agent (early)"
    }
}
