//! Which lane a thread uses. A lane is a per-thread slice of the heap's
//! metadata (an intent slot and free-block caches); each private lane is
//! used by one thread at a time, and lane 0 is shared behind a mutex by
//! threads that find no free lane.
//!
//! A thread finds its lane through a [`ThreadLanes`]: the heap and lane it
//! used last, one compare on the fast path. remem-alloc keeps one per thread
//! for its own calls; an embedder that has a thread-local of its own (the C
//! ABI) can keep its `ThreadLanes` there and pass it in (the `*_in` calls of
//! `Heap`), so that a call costs one thread-local lookup, not two: in a
//! shared object each one is a call to `__tls_get_addr`.
//!
//! Every `ThreadLanes` a thread used is remembered beside the lanes it
//! holds, and forgotten when they are handed back (at thread exit) or lost
//! (in a forked child), so that no cache outlives its lane.

use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::sync::Weak;

use parking_lot::Mutex;

/// The lanes a heap can hand out.
#[derive(Debug)]
pub(crate) struct LaneSet {
    free: Mutex<Vec<u32>>,
    /// Serialises threads on the shared lane 0.
    pub(crate) shared: Mutex<()>,
}

impl LaneSet {
    pub(crate) fn new(nlanes: u32) -> LaneSet {
        LaneSet { free: Mutex::new((1..nlanes).rev().collect()), shared: Mutex::new(()) }
    }

    fn take(&self) -> Option<u32> {
        self.free.lock().pop()
    }

    fn give_back(&self, lane: u32) {
        self.free.lock().push(lane);
    }
}

/// Something that owns a [`LaneSet`] (the heap's shared state).
pub(crate) trait HasLanes: Send + Sync + 'static {
    fn lanes(&self) -> &LaneSet;
}

/// One thread's lane cache: the heap it used last and the private lane it
/// holds there. Neither `Send` nor `Sync`: it belongs to one thread. Keep
/// it in a thread-local (see the `*_in` calls of `Heap`); remem-alloc's own
/// calls use one of its own.
#[derive(Debug)]
pub struct ThreadLanes {
    /// (heap id, lane); heap ids are never 0 and never reused.
    last: Cell<(u64, u32)>,
    /// This cache is in the thread's list of caches to forget.
    registered: Cell<bool>,
    _one_thread: PhantomData<*const ()>,
}

impl ThreadLanes {
    /// An empty cache.
    pub const fn new() -> ThreadLanes {
        ThreadLanes { last: Cell::new((0, 0)), registered: Cell::new(false), _one_thread: PhantomData }
    }

    /// The lane this thread holds for heap `heap_id`, if it used it last.
    #[inline(always)]
    pub(crate) fn last(&self, heap_id: u64) -> Option<u32> {
        let (id, lane) = self.last.get();
        (id == heap_id).then_some(lane)
    }

    fn forget(&self) {
        self.last.set((0, 0));
        self.registered.set(false);
    }
}

impl Default for ThreadLanes {
    fn default() -> ThreadLanes {
        ThreadLanes::new()
    }
}

struct Held {
    heap_id: u64,
    lane: u32,
    home: Weak<dyn HasLanes>,
}

/// The lanes a thread holds, and the caches that name them.
struct HeldList {
    held: Vec<Held>,
    /// Thread-locals of this thread (see [`acquire`]'s safety contract).
    caches: Vec<*const ThreadLanes>,
}

impl HeldList {
    fn forget_caches(&mut self) {
        for c in self.caches.drain(..) {
            // SAFETY: `acquire`'s callers promise that each cache is a
            // thread-local of this thread without destructor: it lives
            // until the thread is gone, and this runs on the thread.
            unsafe { (*c).forget() };
        }
    }
}

impl Drop for HeldList {
    fn drop(&mut self) {
        // First the caches: a later call (from another thread-local's
        // destructor) must not find a lane that is handed back below.
        self.forget_caches();
        for h in self.held.drain(..) {
            if let Some(home) = h.home.upgrade() {
                home.lanes().give_back(h.lane);
            }
        }
    }
}

thread_local! {
    /// remem-alloc's own lane cache for this thread.
    static OWN: ThreadLanes = const { ThreadLanes::new() };
    /// Every lane this thread holds, returned when the thread exits.
    static HELD: RefCell<HeldList> = const { RefCell::new(HeldList { held: Vec::new(), caches: Vec::new() }) };
}

/// Runs `f` with remem-alloc's own lane cache of this thread.
#[inline(always)]
pub(crate) fn with_own<R>(f: impl FnOnce(&ThreadLanes) -> R) -> R {
    // The address only: `LocalKey::with` around all of `f` is not inlined.
    let t = OWN.with(|t| t as *const ThreadLanes);
    // SAFETY: OWN has no destructor, so this thread's instance lives as
    // long as the thread, which outlives this call.
    f(unsafe { &*t })
}

/// In a forked child (called by the fork handler, in the child's only
/// thread): forgets this thread's lanes and empties its caches. The lanes
/// belong to the parent's heaps, which the child cannot use; with the
/// caches empty, the child's first call on such a heap takes the slow
/// path, which refuses it. The list is leaked, not dropped: dropping would
/// hand the lanes back under a lock another thread of the parent may have
/// held at the fork.
pub(crate) fn forget_after_fork() {
    let _ = OWN.try_with(ThreadLanes::forget);
    let _ = HELD.try_with(|held| {
        if let Ok(mut held) = held.try_borrow_mut() {
            held.forget_caches();
            std::mem::forget(std::mem::take(&mut held.held));
        }
    });
}

/// The lane this thread holds (or now takes) for heap `heap_id`, noted in
/// `cache`; 0 when every private lane is taken (or the thread is exiting).
///
/// # Safety
///
/// `cache` is a thread-local of the calling thread whose type has no
/// destructor (so it lives as long as the thread): it is remembered, and
/// emptied when the thread exits.
pub(crate) unsafe fn acquire(heap_id: u64, home: &std::sync::Arc<dyn HasLanes>, cache: &ThreadLanes) -> u32 {
    let held = HELD.try_with(|held| {
        let mut held = held.borrow_mut();
        if !cache.registered.get() {
            held.caches.push(cache);
            cache.registered.set(true);
        }
        if let Some(h) = held.held.iter().find(|h| h.heap_id == heap_id) {
            return h.lane;
        }
        held.held.retain(|h| h.home.strong_count() > 0);
        match home.lanes().take() {
            Some(lane) => {
                held.held.push(Held { heap_id, lane, home: std::sync::Arc::downgrade(home) });
                lane
            }
            None => 0,
        }
    });
    // During thread teardown the registry is gone: use the shared lane.
    let lane = held.unwrap_or(0);
    if lane != 0 {
        cache.last.set((heap_id, lane));
    }
    lane
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Heap, HeapOptions};

    thread_local! {
        static EXT: ThreadLanes = const { ThreadLanes::new() };
    }

    /// A cache passed in by an embedder is remembered with the thread's
    /// lanes and emptied with them (here: as in a forked child).
    #[test]
    fn caches_are_forgotten_with_the_lanes() {
        let heap = Heap::create_memfd(&HeapOptions::new(4 << 20)).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                EXT.with(|t| {
                    // SAFETY: EXT is a thread-local without destructor.
                    let p = unsafe { heap.alloc_in(t, 64, 16) }.unwrap();
                    let l = t.last(heap.inner_id()).expect("the call noted its lane");
                    assert_ne!(l, 0);
                    heap.free(p).unwrap();
                    assert_eq!(OWN.with(|o| o.last(heap.inner_id())), Some(l), "one lane per thread and heap");
                    forget_after_fork();
                    assert_eq!(t.last(heap.inner_id()), None);
                    assert_eq!(OWN.with(|o| o.last(heap.inner_id())), None);
                });
            });
        });
    }
}
