//! What the C ABI keeps per calling thread, in one thread-local so that a
//! call looks its thread's state up once: libremem is a shared object, so
//! each thread-local costs a `__tls_get_addr` call.

use std::cell::Cell;

/// The calling thread's state.
pub(crate) struct ThreadState {
    /// This thread's in-flight record (see `quiesce`), null until its
    /// first call on a heap.
    pub(crate) record: Cell<*const crate::quiesce::Record>,
    /// The last-error message may be set (see `status`): a success skips
    /// the message's own thread-local (lazily initialised, with a
    /// destructor) when there is nothing to clear.
    pub(crate) has_error: Cell<bool>,
}

thread_local! {
    pub(crate) static THREAD: ThreadState = const {
        ThreadState { record: Cell::new(std::ptr::null()), has_error: Cell::new(false) }
    };
}
