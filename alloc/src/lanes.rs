//! Which lane a thread uses. A lane is a per-thread slice of the heap's
//! metadata (an intent slot and free-block caches); each private lane is
//! used by one thread at a time, and lane 0 is shared behind a mutex by
//! threads that find no free lane.

use std::cell::{Cell, RefCell};
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

struct Held {
    heap_id: u64,
    lane: u32,
    home: Weak<dyn HasLanes>,
}

struct HeldList(Vec<Held>);

impl Drop for HeldList {
    fn drop(&mut self) {
        for h in self.0.drain(..) {
            if let Some(home) = h.home.upgrade() {
                home.lanes().give_back(h.lane);
            }
        }
    }
}

thread_local! {
    /// The (heap id, lane) this thread used last: the fast path.
    static LAST: Cell<(u64, u32)> = const { Cell::new((0, 0)) };
    /// Every lane this thread holds, returned when the thread exits.
    static HELD: RefCell<HeldList> = const { RefCell::new(HeldList(Vec::new())) };
}

/// In a forked child (called by the fork handler, in the child's only
/// thread): forgets this thread's lanes. The lanes belong to the parent's
/// heaps, which the child cannot use; with the cache empty, the child's
/// first call on such a heap takes the slow path, which refuses it. The
/// list is leaked, not dropped: dropping would hand the lanes back under a
/// lock another thread of the parent may have held at the fork.
pub(crate) fn forget_after_fork() {
    let _ = LAST.try_with(|l| l.set((0, 0)));
    let _ = HELD.try_with(|held| {
        if let Ok(mut held) = held.try_borrow_mut() {
            std::mem::forget(std::mem::take(&mut held.0));
        }
    });
}

/// The lane this thread holds for heap `heap_id`, if it used it last.
#[inline]
pub(crate) fn last(heap_id: u64) -> Option<u32> {
    let (id, lane) = LAST.get();
    (id == heap_id).then_some(lane)
}

/// The lane this thread holds (or now takes) for heap `heap_id`; 0 when
/// every private lane is taken.
pub(crate) fn acquire(heap_id: u64, home: &std::sync::Arc<dyn HasLanes>) -> u32 {
    let held = HELD.try_with(|held| {
        let mut held = held.borrow_mut();
        if let Some(h) = held.0.iter().find(|h| h.heap_id == heap_id) {
            return h.lane;
        }
        held.0.retain(|h| h.home.strong_count() > 0);
        match home.lanes().take() {
            Some(lane) => {
                held.0.push(Held { heap_id, lane, home: std::sync::Arc::downgrade(home) });
                lane
            }
            None => 0,
        }
    });
    // During thread teardown the registry is gone: use the shared lane.
    let lane = held.unwrap_or(0);
    if lane != 0 {
        let _ = LAST.try_with(|l| l.set((heap_id, lane)));
    }
    lane
}
