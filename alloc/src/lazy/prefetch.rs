//! The background prefetcher: brings in every absent page, in runs.
//!
//! It walks the state table from page 0, claims runs of absent pages, reads
//! each run with one source call and installs it with `UFFDIO_COPY_MODE_WP |
//! DONTWAKE` (adjacent data pages in one call), then wakes the run once.
//! The run length starts at 64 KiB and doubles up to 4 MiB while no
//! missing-page fault arrives, and drops back to 64 KiB when one does, so
//! a thread waiting on a fault never waits behind a long read (CRIU's lazy
//! pages do the same). Pages known to be zero are not populated. Once a pass
//! finds no absent page it waits for pages in flight elsewhere, then
//! declares the heap settled and commits the recovered state once.

use std::sync::atomic::Ordering;

use super::Lazy;
use crate::flush::FlushError;
use crate::format::PAGE_SIZE;
use crate::source::PageRead;

/// Smallest and largest run, in pages (64 KiB and 4 MiB).
const MIN_RUN: u64 = 16;
const MAX_RUN: u64 = 1024;

pub(super) fn run(l: &Lazy, commit: Box<dyn FnOnce() -> Option<Result<u64, FlushError>> + Send>) {
    let mut buf = vec![0u8; MAX_RUN as usize * PAGE_SIZE];
    let mut status = vec![PageRead::Zero; MAX_RUN as usize];
    let mut run = MIN_RUN;
    let mut faults_seen = l.faults.load(Ordering::Relaxed);
    'passes: loop {
        let mut cursor = 0;
        let mut found = false;
        while let Some(p) = l.states.next_absent(cursor) {
            if l.stop.load(Ordering::Acquire) {
                return;
            }
            found = true;
            let n = l.claim_run(p, run);
            if n == 0 {
                cursor = p + 1;
                continue;
            }
            let (b, s) = (&mut buf[..n as usize * PAGE_SIZE], &mut status[..n as usize]);
            if let Err(e) = l.read(p, b, s) {
                l.release(p, n);
                l.fail(format!("prefetching pages {p}..{} from {}: {e}", p + n, l.source.name()));
                break 'passes;
            }
            if let Err((page, e)) = l.install(p, b, s, false) {
                l.fail(format!("installing page {page}: {e}"));
                l.wake(p, n);
                break 'passes;
            }
            l.wake(p, n);
            cursor = p + n;
            let faults = l.faults.load(Ordering::Relaxed);
            run = if faults == faults_seen { (run * 2).min(MAX_RUN) } else { MIN_RUN };
            faults_seen = faults;
        }
        if !found {
            // Nothing absent: wait for the pages others have in flight.
            while !l.states.all_settled() {
                if l.stop.load(Ordering::Acquire) {
                    return;
                }
                if l.states.next_absent(0).is_some() {
                    continue 'passes;
                }
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            break;
        }
    }
    {
        let mut d = l.done.lock();
        if d.failed.is_some() {
            l.cond.notify_all();
            return;
        }
        d.settled = true;
        d.load_time = Some(l.started.elapsed());
        l.cond.notify_all();
    }
    let poisoned = l.states.poisoned();
    if poisoned > 0 {
        l.fail(format!("{poisoned} pages could not be read from any current copy and are poisoned"));
        return;
    }
    if let Err(e) = l.source.confirm() {
        l.fail(format!("the recovered state is not committed: {e}"));
        return;
    }
    // The one commit of the recovered state.
    match commit() {
        Some(Ok(epoch)) => {
            if l.durability.wait_durable(epoch).is_ok() {
                l.source.recovered();
            }
            let mut d = l.done.lock();
            d.committed_epoch = Some(epoch);
            l.cond.notify_all();
        }
        Some(Err(e)) => l.fail(format!("committing the recovered state: {e}")),
        None => {}
    }
}
