//! The fault thread: serves every event of the heap's userfaultfd for the
//! heap's whole life.
//!
//! - A missing-page fault on an absent page: claim it and up to 15 absent
//!   pages after it (read-ahead), read them in one source call, install them
//!   (zero pages too), one wake.
//! - On a page someone else has in flight (the prefetcher): remember it and
//!   look again at the next turn (a 1 ms poll while any is waiting); once
//!   it is settled, install it if it was left as a known zero page, and wake.
//! - On a page already settled: install a known zero page, or just wake (the
//!   fault raced with the install; a poisoned page then raises SIGBUS).
//! - A write-protect fault (precise tracking) goes to the tracker, which
//!   records the page and un-protects it.
//!
//! Everything it needs is allocated before its loop starts; it never
//! touches the heap's memory.

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;

use userfaultfd::{Event, EventBuffer, FaultKind};

use super::{Lazy, PS};
use crate::format::PAGE_SIZE;
use crate::source::{PageRead, PageState};
use crate::track;

/// Pages read per missing-page fault (the faulting one and the absent ones after it).
const READ_AHEAD: u64 = 16;
/// Faults waiting on pages in flight elsewhere, at most (more: the thread waits in place).
const MAX_DEFERRED: usize = 4096;

pub(super) fn run(l: &Lazy) {
    let mut events = EventBuffer::new(64);
    let mut buf = vec![0u8; READ_AHEAD as usize * PAGE_SIZE];
    let mut status = vec![PageRead::Zero; READ_AHEAD as usize];
    let mut deferred: Vec<u64> = Vec::with_capacity(MAX_DEFERRED);
    let mut still: Vec<u64> = Vec::with_capacity(MAX_DEFERRED);
    loop {
        let timeout = if deferred.is_empty() { -1 } else { 1 };
        match track::poll_in2(l.uffd.as_fd(), l.stop_fd.as_fd(), timeout) {
            Ok((_, stop)) if stop != 0 => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return l.fail(format!("poll(2) on the userfaultfd: {e}")),
        }
        if l.stop.load(Ordering::Acquire) {
            return;
        }
        loop {
            let evs = match l.uffd.read_events(&mut events) {
                Ok(evs) => evs,
                Err(e) => return l.fail(format!("reading userfaultfd events: {e}")),
            };
            let mut n = 0;
            for ev in evs {
                n += 1;
                let Ok(Event::Pagefault { kind, addr, .. }) = ev else { continue };
                let addr = addr as u64 & !(PS - 1);
                let Some(page) = addr.checked_sub(l.base).map(|o| o / PS).filter(|&p| p < l.pages()) else {
                    let _ = l.uffd.wake(addr as *mut libc::c_void, PS as usize);
                    continue;
                };
                match kind {
                    FaultKind::WriteProtected => match &l.wp {
                        Some(wp) => {
                            if let Err(e) = wp.fault(addr) {
                                l.fail(format!("un-protecting page {page} after recording it: {e}"));
                            }
                        }
                        None => {
                            let _ = l.uffd.remove_write_protection(addr as *mut libc::c_void, PS as usize, true);
                        }
                    },
                    _ => {
                        l.faults.fetch_add(1, Ordering::Relaxed);
                        serve(l, page, &mut buf, &mut status, &mut deferred);
                    }
                }
            }
            if n < 64 {
                break;
            }
        }
        // Pages that were in flight elsewhere: settled now?
        still.clear();
        for &p in &deferred {
            if !settle(l, p) {
                still.push(p);
            }
        }
        std::mem::swap(&mut deferred, &mut still);
    }
}

/// Serves a missing-page fault on `page`.
fn serve(l: &Lazy, page: u64, buf: &mut [u8], status: &mut [PageRead], deferred: &mut Vec<u64>) {
    loop {
        match l.states.get(page) {
            PageState::Absent => {
                let n = l.claim_run(page, READ_AHEAD);
                if n == 0 {
                    continue; // someone else claimed it meanwhile
                }
                let (b, s) = (&mut buf[..(n * PS) as usize], &mut status[..n as usize]);
                if let Err(e) = l.read(page, b, s) {
                    // The source is gone: poison the page rather than let the
                    // faulting thread wait for ever.
                    l.fail(format!("reading page {page} from {}: {e}", l.source.name()));
                    s.fill(PageRead::Unreadable);
                }
                if let Err((p, e)) = l.install(page, b, s, true) {
                    l.fail(format!("installing page {p}: {e}"));
                }
                l.wake(page, n);
                return;
            }
            PageState::InFlight if deferred.len() < MAX_DEFERRED => {
                deferred.push(page);
                return;
            }
            PageState::InFlight => std::thread::yield_now(),
            _ => {
                if !settle(l, page) {
                    continue;
                }
                return;
            }
        }
    }
}

/// For a page that was in flight: once settled, installs it if it is a known
/// zero page, wakes its waiters and returns true; false while still in flight.
fn settle(l: &Lazy, page: u64) -> bool {
    match l.states.get(page) {
        PageState::InFlight => false,
        PageState::Absent => {
            // Given back after a failure: serve it afresh.
            let n = l.claim_run(page, 1);
            if n == 0 {
                return false;
            }
            let mut one = [0u8; PAGE_SIZE];
            let mut s = [PageRead::Unreadable];
            if let Err(e) = l.read(page, &mut one, &mut s) {
                l.fail(format!("reading page {page} from {}: {e}", l.source.name()));
                s[0] = PageRead::Unreadable;
            }
            if let Err((p, e)) = l.install(page, &one, &s, true) {
                l.fail(format!("installing page {p}: {e}"));
            }
            l.wake(page, 1);
            true
        }
        PageState::Zero => {
            if l.states.claim_zero(page) {
                if let Err((p, e)) = l.install_known_zero(page) {
                    l.fail(format!("installing zero page {p}: {e}"));
                }
                l.wake(page, 1);
                true
            } else {
                false
            }
        }
        _ => {
            l.wake(page, 1);
            true
        }
    }
}
