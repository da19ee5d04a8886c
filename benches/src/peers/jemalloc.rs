//! jemalloc, built from source by `tikv-jemalloc-sys` with its symbols
//! prefixed `_rjem_`, so it sits beside the process's malloc instead of
//! replacing it.

use super::Peer;

/// jemalloc's malloc/free (`_rjem_malloc`, `_rjem_free`).
pub struct Jemalloc;

// SAFETY: malloc returns null or `size` fresh bytes.
unsafe impl Peer for Jemalloc {
    fn name(&self) -> &'static str {
        "jemalloc"
    }

    #[inline]
    fn alloc(&self, size: usize) -> *mut u8 {
        // SAFETY: malloc accepts any size and has no other precondition.
        unsafe { tikv_jemalloc_sys::malloc(size) }.cast()
    }

    #[inline]
    unsafe fn free(&self, p: *mut u8, _size: usize) {
        // SAFETY: the caller guarantees `p` came from this malloc and is live.
        unsafe { tikv_jemalloc_sys::free(p.cast()) }
    }
}
