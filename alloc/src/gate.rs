//! The flush gate: lets the flusher stop every mutating heap call for the
//! moment it takes to capture a consistent cut, at almost no cost to the
//! calls themselves.
//!
//! Each lane has an `active` word that its thread sets while inside a
//! mutating call. The fast path is a plain store, a compiler fence and a
//! load of `pausing`; the flusher stores `pausing`, then runs
//! `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which executes a full
//! memory barrier on every CPU running one of our threads, then waits for
//! every `active` word to read 0 (the asymmetric Dekker pattern of RCU and
//! folly's `asymmetricHeavyBarrier`). Either the flusher sees a thread's
//! `active`, or that thread sees `pausing` and waits. Without membarrier
//! the fast path uses a full fence instead.
//!
//! Calls nest (a transaction commit frees blocks): only the outermost
//! entry checks `pausing`.

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{compiler_fence, fence, AtomicBool, AtomicU32};

#[repr(align(64))]
#[derive(Debug, Default)]
struct Slot(AtomicU32);

/// The gate of one heap.
#[derive(Debug)]
pub(crate) struct Gate {
    active: Box<[Slot]>,
    pausing: AtomicBool,
    asymmetric: bool,
}

impl Gate {
    pub(crate) fn new(nlanes: u32) -> Gate {
        Gate {
            active: (0..nlanes).map(|_| Slot::default()).collect(),
            pausing: AtomicBool::new(false),
            asymmetric: crate::region::membarrier_register(),
        }
    }

    /// Marks lane `l` (held by this thread) as inside a mutating call,
    /// waiting while the flusher has the heap paused.
    /// The `active` word of lane `l`.
    #[inline(always)]
    fn slot(&self, l: u32) -> &AtomicU32 {
        debug_assert!((l as usize) < self.active.len());
        // SAFETY: lanes are numbered 0..nlanes (lanes.rs hands out no
        // other), and `active` has one slot per lane.
        unsafe { &self.active.get_unchecked(l as usize).0 }
    }

    /// Returns the depth to hand back to [`Gate::exit`].
    #[inline(always)]
    pub(crate) fn enter(&self, l: u32) -> u32 {
        let a = self.slot(l);
        let depth = a.load(Relaxed);
        a.store(depth + 1, Relaxed);
        if depth == 0 {
            self.check_pausing(a);
        }
        depth
    }

    /// The outermost entry: publish `active`, then look at `pausing`.
    #[inline(always)]
    fn check_pausing(&self, a: &AtomicU32) {
        if self.asymmetric {
            compiler_fence(SeqCst);
        } else {
            fence(SeqCst);
        }
        if self.pausing.load(Relaxed) {
            self.wait_paused(a);
        }
    }

    #[cold]
    #[inline(never)]
    fn wait_paused(&self, a: &AtomicU32) {
        loop {
            a.store(0, Release);
            self.wait_resume();
            a.store(1, Relaxed);
            if self.asymmetric {
                compiler_fence(SeqCst);
            } else {
                fence(SeqCst);
            }
            if !self.pausing.load(Relaxed) {
                return;
            }
        }
    }

    #[cold]
    fn wait_resume(&self) {
        let mut spins = 0u32;
        while self.pausing.load(Acquire) {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Ends the call [`Gate::enter`] began; `depth` is what it returned
    /// (stored as is: no load, so calls do not wait on each other's stores).
    #[inline(always)]
    pub(crate) fn exit(&self, l: u32, depth: u32) {
        self.slot(l).store(depth, Release);
    }

    /// Stops every mutating call until the guard is dropped. One pauser at
    /// a time (the caller serialises flushes).
    pub(crate) fn pause(&self) -> Paused<'_> {
        self.pausing.store(true, SeqCst);
        if self.asymmetric {
            crate::region::membarrier();
        }
        fence(SeqCst);
        for slot in self.active.iter() {
            let mut spins = 0u32;
            while slot.0.load(Acquire) != 0 {
                spins += 1;
                if spins < 256 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
        fence(SeqCst);
        Paused(self)
    }
}

/// The heap is paused while this lives.
pub(crate) struct Paused<'a>(&'a Gate);

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.pausing.store(false, Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    /// While paused, no thread is inside; every call that started also finished.
    #[test]
    fn pause_excludes_every_caller() {
        let gate = Arc::new(Gate::new(4));
        let inside = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (1..4u32)
            .map(|l| {
                let (gate, inside, stop) = (gate.clone(), inside.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Relaxed) {
                        let outer = gate.enter(l);
                        let nested = gate.enter(l);
                        inside.fetch_add(1, SeqCst);
                        std::hint::spin_loop();
                        inside.fetch_sub(1, SeqCst);
                        gate.exit(l, nested);
                        gate.exit(l, outer);
                    }
                })
            })
            .collect();
        for _ in 0..2000 {
            let p = gate.pause();
            assert_eq!(inside.load(SeqCst), 0, "a caller is inside while paused");
            std::hint::spin_loop();
            assert_eq!(inside.load(SeqCst), 0, "a caller entered while paused");
            drop(p);
        }
        stop.store(true, Relaxed);
        for t in threads {
            t.join().unwrap();
        }
    }
}
