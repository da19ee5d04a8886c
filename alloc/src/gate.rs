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
//! `pausing` keeps a [`FENCE`] bit set for good, which sends every
//! outermost entry to the slow path: a full fence, then `pausing` read
//! again (so the fast path has no branch of its own for that case).
//!
//! Calls nest (a transaction commit frees blocks): only the outermost
//! entry checks `pausing`.
//!
//! Besides the pause, the flusher can *throttle* mutating calls while its
//! pre-copy rounds do not converge (see [`crate::flush`]): each outermost
//! entry then waits a set delay before it goes on, outside the call (its
//! `active` word is 0 meanwhile, so a pause never waits for a throttled
//! thread). The flag word is the same one the fast path already loads, so
//! throttling costs the calls nothing while it is off.

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{compiler_fence, fence, AtomicU32};
use std::time::{Duration, Instant};

/// `pausing` bit: mutating calls wait until it clears.
const PAUSE: u32 = 1;
/// `pausing` bit: each outermost entry waits `throttle_ns` first.
const THROTTLE: u32 = 2;
/// `pausing` bit, set for good when the process has no membarrier: each
/// outermost entry takes the slow path, which fences before it reads
/// `pausing` again.
const FENCE: u32 = 4;
/// Longest throttle delay per call.
pub(crate) const MAX_THROTTLE: Duration = Duration::from_micros(200);

#[repr(align(64))]
#[derive(Debug, Default)]
struct Slot(AtomicU32);

/// The gate of one heap.
#[derive(Debug)]
pub(crate) struct Gate {
    active: Box<[Slot]>,
    /// [`PAUSE`] | [`THROTTLE`]; 0 on the fast path.
    pausing: AtomicU32,
    /// Delay per outermost entry while [`THROTTLE`] is set.
    throttle_ns: AtomicU32,
    asymmetric: bool,
}

impl Gate {
    pub(crate) fn new(nlanes: u32) -> Gate {
        Gate::with_membarrier(nlanes, crate::region::membarrier_register())
    }

    fn with_membarrier(nlanes: u32, asymmetric: bool) -> Gate {
        Gate {
            active: (0..nlanes).map(|_| Slot::default()).collect(),
            pausing: AtomicU32::new(if asymmetric { 0 } else { FENCE }),
            throttle_ns: AtomicU32::new(0),
            asymmetric,
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
    #[cfg(test)]
    pub(crate) fn enter(&self, l: u32) -> u32 {
        self.enter_slot(l).1
    }

    /// [`Gate::enter`], returning lane `l`'s `active` word as well: the
    /// caller ends the call with [`Gate::exit_slot`] on it, so that the
    /// word's address is not computed again after the call's fence.
    #[inline(always)]
    pub(crate) fn enter_slot(&self, l: u32) -> (&AtomicU32, u32) {
        let a = self.slot(l);
        let depth = a.load(Relaxed);
        a.store(depth + 1, Relaxed);
        if depth == 0 {
            self.check_pausing(a);
        }
        (a, depth)
    }

    /// Ends the call whose [`Gate::enter_slot`] returned `(a, depth)`.
    #[inline(always)]
    pub(crate) fn exit_slot(a: &AtomicU32, depth: u32) {
        a.store(depth, Release);
    }

    /// [`Gate::enter_slot`] as a guard that ends the call when dropped
    /// (also when the call unwinds).
    #[inline(always)]
    pub(crate) fn inside(&self, l: u32) -> Inside<'_> {
        let (a, depth) = self.enter_slot(l);
        Inside(a, depth)
    }

    /// The outermost entry: publish `active`, then look at `pausing`
    /// (without membarrier, [`FENCE`] is set and the slow path fences).
    #[inline(always)]
    fn check_pausing(&self, a: &AtomicU32) {
        compiler_fence(SeqCst);
        if self.pausing.load(Relaxed) != 0 {
            self.wait_paused(a);
        }
    }

    /// Leaves the call (`active` 0) while paused, or for one throttle delay,
    /// then re-enters and looks again; a throttled call waits once.
    #[cold]
    #[inline(never)]
    fn wait_paused(&self, a: &AtomicU32) {
        if !self.asymmetric {
            // `active` is stored: order it before the reads of `pausing`.
            fence(SeqCst);
        }
        let mut throttled = false;
        loop {
            let flags = self.pausing.load(Relaxed) & !FENCE;
            if flags == 0 || (flags & PAUSE == 0 && throttled) {
                return;
            }
            a.store(0, Release);
            if flags & PAUSE != 0 {
                self.wait_resume();
            } else {
                throttled = true;
                delay(Duration::from_nanos(u64::from(self.throttle_ns.load(Relaxed))));
            }
            a.store(1, Relaxed);
            if self.asymmetric {
                compiler_fence(SeqCst);
            } else {
                fence(SeqCst);
            }
            if self.pausing.load(Relaxed) & PAUSE == 0 && throttled {
                return;
            }
        }
    }

    #[cold]
    fn wait_resume(&self) {
        let mut spins = 0u32;
        while self.pausing.load(Acquire) & PAUSE != 0 {
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
    #[cfg(test)]
    pub(crate) fn exit(&self, l: u32, depth: u32) {
        Gate::exit_slot(self.slot(l), depth);
    }

    /// Stops every mutating call until the guard is dropped. One pauser at
    /// a time (the caller serialises flushes).
    pub(crate) fn pause(&self) -> Paused<'_> {
        self.pausing.fetch_or(PAUSE, SeqCst);
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

    /// Makes every outermost entry wait `per_call` (at most
    /// [`MAX_THROTTLE`]) before it goes on, until [`Gate::unthrottle`];
    /// `Duration::ZERO` turns throttling off. Only the flusher calls it.
    pub(crate) fn throttle(&self, per_call: Duration) {
        let ns = per_call.min(MAX_THROTTLE).as_nanos() as u32;
        self.throttle_ns.store(ns, Relaxed);
        if ns == 0 {
            self.pausing.fetch_and(!THROTTLE, Release);
        } else {
            self.pausing.fetch_or(THROTTLE, Release);
        }
    }

    /// Turns throttling off.
    pub(crate) fn unthrottle(&self) {
        self.throttle(Duration::ZERO);
    }
}

/// Waits `d`: spinning (yielding the CPU to the flusher) for short delays,
/// sleeping for long ones.
fn delay(d: Duration) {
    if d >= Duration::from_micros(100) {
        std::thread::sleep(d);
        return;
    }
    let until = Instant::now() + d;
    while Instant::now() < until {
        std::thread::yield_now();
    }
}

/// A mutating call on one lane is inside the gate while this lives.
pub(crate) struct Inside<'a>(&'a AtomicU32, u32);

impl Drop for Inside<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        Gate::exit_slot(self.0, self.1);
    }
}

/// The heap is paused while this lives.
pub(crate) struct Paused<'a>(&'a Gate);

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.pausing.fetch_and(!PAUSE, Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64};
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
        for i in 0..2000u32 {
            // Throttling on and off meanwhile changes nothing to the pause.
            gate.throttle(Duration::from_nanos(u64::from(i % 3) * 500));
            let p = gate.pause();
            assert_eq!(inside.load(SeqCst), 0, "a caller is inside while paused");
            std::hint::spin_loop();
            assert_eq!(inside.load(SeqCst), 0, "a caller entered while paused");
            drop(p);
        }
        stop.store(true, Relaxed);
        gate.unthrottle();
        for t in threads {
            t.join().unwrap();
        }
    }

    /// A throttled call waits at least the delay, outside the call (a
    /// pause does not wait for it), and goes on once throttling is lifted.
    #[test]
    fn throttle_delays_each_outermost_call_once() {
        let gate = Gate::new(2);
        gate.throttle(Duration::from_millis(5));
        let t = Instant::now();
        let outer = gate.enter(1);
        let nested = gate.enter(1); // nested: no second delay
        assert!(t.elapsed() >= Duration::from_micros(200), "throttled call went straight in");
        gate.exit(1, nested);
        gate.exit(1, outer);
        gate.unthrottle();
        let d = gate.enter(1);
        gate.exit(1, d);
        // Capped: a huge delay is MAX_THROTTLE.
        gate.throttle(Duration::from_secs(10));
        assert_eq!(gate.throttle_ns.load(Relaxed) as u128, MAX_THROTTLE.as_nanos());
        gate.unthrottle();
        assert_eq!(gate.pausing.load(Relaxed) & !FENCE, 0);
    }

    /// Without membarrier every outermost entry fences on the slow path,
    /// and a pause still excludes every caller.
    #[test]
    fn without_membarrier_the_slow_path_fences() {
        let gate = Arc::new(Gate::with_membarrier(3, false));
        assert_eq!(gate.pausing.load(Relaxed), FENCE);
        let inside = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (1..3u32)
            .map(|l| {
                let (gate, inside, stop) = (gate.clone(), inside.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Relaxed) {
                        let d = gate.enter(l);
                        inside.fetch_add(1, SeqCst);
                        inside.fetch_sub(1, SeqCst);
                        gate.exit(l, d);
                    }
                })
            })
            .collect();
        for _ in 0..500 {
            let p = gate.pause();
            assert_eq!(inside.load(SeqCst), 0, "a caller is inside while paused");
            drop(p);
        }
        assert_eq!(gate.pausing.load(Relaxed), FENCE, "the pause left the FENCE bit alone");
        stop.store(true, Relaxed);
        for t in threads {
            t.join().unwrap();
        }
    }
}
