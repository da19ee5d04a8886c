//! What the C ABI keeps per calling thread, in one thread-local so that a
//! call looks its thread's state up once: libremem is a shared object, so
//! each thread-local costs a `__tls_get_addr` call.

use std::cell::Cell;

use remem_alloc::ThreadLanes;

/// The calling thread's state.
pub(crate) struct ThreadState {
    /// This thread's in-flight record (see `quiesce`), null until its
    /// first call on a heap.
    pub(crate) record: Cell<*const crate::quiesce::Record>,
    /// The same, kept instead of `record` when the process has no
    /// membarrier: then every call takes `quiesce`'s slow path, which
    /// fences (so the fast path has no branch for that case).
    pub(crate) fenced_record: Cell<*const crate::quiesce::Record>,
    /// The last-error message may be set (see `status`): a success skips
    /// the message's own thread-local (lazily initialised, with a
    /// destructor) when there is nothing to clear.
    pub(crate) has_error: Cell<bool>,
    /// The lane this thread holds on the heap it used last (remem-alloc's
    /// `*_in` calls take it from here instead of a thread-local of their own).
    pub(crate) lanes: ThreadLanes,
}

thread_local! {
    /// No destructor (so it lives as long as its thread, as remem-alloc's
    /// `*_in` calls require of `lanes`, and a call from another
    /// thread-local's destructor still finds it).
    pub(crate) static THREAD: ThreadState = const {
        ThreadState {
            record: Cell::new(std::ptr::null()),
            fenced_record: Cell::new(std::ptr::null()),
            has_error: Cell::new(false),
            lanes: ThreadLanes::new(),
        }
    };
}
