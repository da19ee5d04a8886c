//! Calls in flight: how `remem_close` waits until no thread is inside a
//! call on the handle it closes, without any shared write on the calls'
//! path.
//!
//! Every thread that calls remem owns a *record* (a cache line of its own,
//! taken from a process-wide list the first time it calls and handed back
//! when it exits). A call on handle `v` stores `v` in its record, then
//! reads the handle's slot; when it is done it stores 0. The closer first
//! makes the slot say "not open" (so calls that read it from now on give
//! up), then runs `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` (a full
//! memory barrier on every CPU that runs one of our threads), then waits
//! until no record holds `v`. Either the closer sees a call's store, or
//! that call sees "not open": the asymmetric Dekker pattern of RCU and
//! folly's `asymmetricHeavyBarrier`, as in remem-alloc's flush gate.
//! Where the kernel offers no membarrier, the calls use a full fence
//! instead of a compiler fence.
//!
//! Records are never freed (a closer may be reading one while its thread
//! exits), only reused by later threads. In a forked child, the records of
//! the parent's other threads may still name handles they were calling on
//! at the fork; the child refuses to close inherited handles (see
//! `remem_close`), and handles it opens itself have new generations, so
//! no closer waits on such a record. A call made while its thread's
//! thread-locals are being torn down, or nested in another call, takes a
//! record for the duration of the call.

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{compiler_fence, fence, AtomicBool, AtomicPtr, AtomicU64};
use std::sync::OnceLock;

use crate::thread::{ThreadState, THREAD};

/// One thread's word "inside a call on handle ...", alone on its cache
/// lines so that no two threads write one line.
#[repr(align(128))]
pub(crate) struct Record {
    /// The handle of the call in flight, 0 outside calls.
    active: AtomicU64,
    /// Owned by a live thread (or a call, for temporary use).
    taken: AtomicBool,
    /// The next record of the list (records are only ever pushed).
    next: AtomicPtr<Record>,
}

/// Every record ever made, newest first.
static RECORDS: AtomicPtr<Record> = AtomicPtr::new(std::ptr::null_mut());

/// True once this process is registered for private expedited membarriers
/// (set by [`init`], before any handle exists, and never cleared).
static ASYMMETRIC: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Hands the thread's record back when the thread exits.
    static OWNER: Owner = const { Owner };
}

struct Owner;

impl Drop for Owner {
    fn drop(&mut self) {
        let null = std::ptr::null();
        let recs = THREAD.try_with(|t| [t.record.replace(null), t.fenced_record.replace(null)]).unwrap_or([null; 2]);
        for rec in recs {
            // SAFETY: records are never freed; this one was ours.
            if let Some(rec) = unsafe { rec.as_ref() } {
                rec.active.store(0, Release);
                rec.taken.store(false, Release);
            }
        }
    }
}

const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

/// Prepares the protocol; called before the first handle is published.
pub(crate) fn init() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        // SAFETY: membarrier takes no pointers.
        let ok = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) } == 0;
        ASYMMETRIC.store(ok, SeqCst);
    });
}

/// A call in flight on one handle, on the thread's own record; dropping
/// it ends the call (one store, also when the call unwinds).
pub(crate) struct InCall {
    rec: &'static Record,
}

impl Drop for InCall {
    #[inline(always)]
    fn drop(&mut self) {
        self.rec.active.store(0, Release);
    }
}

/// [`InCall`] for a call that took its record on the slow path
/// ([`enter_slow`]): the first call of a thread, a nested call, a call
/// during thread teardown.
pub(crate) struct InCallSlow {
    rec: &'static Record,
    /// The record was taken for this call only.
    temporary: bool,
}

impl Drop for InCallSlow {
    fn drop(&mut self) {
        self.rec.active.store(0, Release);
        if self.temporary {
            self.rec.taken.store(false, Release);
        }
    }
}

/// Says that this thread (whose state is `t`) is now inside a call on
/// handle `v`, on its own record; the caller reads the handle's slot
/// after this returns. `None` (nothing done) when the thread has no
/// record here yet or is inside a call already: then use [`enter_slow`].
/// Only a process registered for membarrier keeps records here (see
/// `ThreadState::fenced_record`), so this path needs no fence.
#[inline(always)]
pub(crate) fn enter(t: &ThreadState, v: u64) -> Option<InCall> {
    let rec = t.record.get();
    // SAFETY: records are never freed.
    match unsafe { rec.as_ref() } {
        Some(rec) if rec.active.load(Relaxed) == 0 => {
            rec.active.store(v, Relaxed);
            // The closer's membarrier orders this store before our loads.
            compiler_fence(SeqCst);
            Some(InCall { rec })
        }
        _ => None,
    }
}

/// Orders this thread's record store before its later loads of the slot,
/// against [`wait_until_left`].
#[inline(always)]
fn publish() {
    if ASYMMETRIC.load(Relaxed) {
        compiler_fence(SeqCst);
    } else {
        fence(SeqCst);
    }
}

/// [`enter`] where it gave up: takes a record (and keeps it, on a
/// thread's first call).
#[cold]
#[inline(never)]
pub(crate) fn enter_slow(t: &ThreadState, v: u64) -> InCallSlow {
    let fenced = t.fenced_record.get();
    // SAFETY: records are never freed.
    if let Some(rec) = unsafe { fenced.as_ref() } {
        if rec.active.load(Relaxed) == 0 {
            rec.active.store(v, Relaxed);
            fence(SeqCst);
            return InCallSlow { rec, temporary: false };
        }
    }
    let nested = !t.record.get().is_null() || !fenced.is_null();
    let rec = take_record();
    rec.active.store(v, Relaxed);
    publish();
    // A first call keeps its record; a nested call (or one during thread
    // teardown) gives it back when it ends. Without membarrier the record
    // is kept where only this path, which fences, finds it.
    let keep = !nested && OWNER.try_with(|_| ()).is_ok();
    if keep {
        if ASYMMETRIC.load(Relaxed) {
            t.record.set(rec);
        } else {
            t.fenced_record.set(rec);
        }
    }
    InCallSlow { rec, temporary: !keep }
}

/// A free record, or a new one.
fn take_record() -> &'static Record {
    let mut p = RECORDS.load(Acquire);
    // SAFETY: records are never freed.
    while let Some(rec) = unsafe { p.as_ref() } {
        if !rec.taken.load(Relaxed) && rec.taken.compare_exchange(false, true, Acquire, Relaxed).is_ok() {
            return rec;
        }
        p = rec.next.load(Acquire);
    }
    let rec: &'static Record = Box::leak(Box::new(Record {
        active: AtomicU64::new(0),
        taken: AtomicBool::new(true),
        next: AtomicPtr::new(std::ptr::null_mut()),
    }));
    let mut head = RECORDS.load(Relaxed);
    loop {
        rec.next.store(head, Relaxed);
        match RECORDS.compare_exchange_weak(head, rec as *const Record as *mut Record, Release, Relaxed) {
            Ok(_) => return rec,
            Err(h) => head = h,
        }
    }
}

/// Waits until no thread is inside a call on handle `v`. The caller has
/// already made the handle's slot say "not open", so calls that start now
/// give up; this waits for those that read the slot before.
pub(crate) fn wait_until_left(v: u64) {
    fence(SeqCst);
    if ASYMMETRIC.load(SeqCst) {
        // SAFETY: membarrier takes no pointers; the process registered in `init`.
        let barrier = || unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) };
        if barrier() != 0 {
            // A forked child may not inherit the registration: register
            // again (idempotent) and retry.
            // SAFETY: membarrier takes no pointers.
            unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) };
            let r = barrier();
            assert_eq!(r, 0, "membarrier failed after registration: {}", std::io::Error::last_os_error());
        }
    }
    fence(SeqCst);
    let mut p = RECORDS.load(Acquire);
    // SAFETY: records are never freed.
    while let Some(rec) = unsafe { p.as_ref() } {
        let mut spins = 0u32;
        while rec.active.load(Acquire) == v {
            spins += 1;
            if spins < 256 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        p = rec.next.load(Acquire);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::sync::Arc;

    /// Once `wait_until_left` returns, no call that saw the handle open is
    /// still inside, and none starts.
    #[test]
    fn waiting_excludes_every_call_that_saw_the_handle_open() {
        init();
        for round in 1..=200u64 {
            let open = Arc::new(AtomicU64::new(round));
            let inside = Arc::new(AtomicU32::new(0));
            let threads: Vec<_> = (0..3)
                .map(|_| {
                    let (open, inside) = (open.clone(), inside.clone());
                    std::thread::spawn(move || loop {
                        let call = THREAD.with(|t| enter_slow(t, round));
                        if open.load(Acquire) != round {
                            return;
                        }
                        inside.fetch_add(1, SeqCst);
                        std::hint::spin_loop();
                        inside.fetch_sub(1, SeqCst);
                        drop(call);
                    })
                })
                .collect();
            std::thread::yield_now();
            open.store(0, SeqCst);
            wait_until_left(round);
            assert_eq!(inside.load(SeqCst), 0, "a call is inside after the wait");
            for t in threads {
                t.join().unwrap();
            }
        }
    }

    #[test]
    fn nested_calls_take_a_record_of_their_own() {
        init();
        THREAD.with(|t| {
            let outer = enter(t, 7).map_or_else(|| enter_slow(t, 7), |c| InCallSlow { rec: c.rec, temporary: false });
            assert!(enter(t, 8).is_none(), "the fast path refuses a nested call");
            let inner = enter_slow(t, 8);
            assert!(inner.temporary);
            assert_eq!(outer.rec.active.load(SeqCst), 7);
            drop(inner);
            assert_eq!(outer.rec.active.load(SeqCst), 7, "the outer call is still announced");
            drop(outer);
        });
    }
}
