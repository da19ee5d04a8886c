//! mimalloc, built from source by `libmimalloc-sys` (not overriding malloc).

use super::Peer;

/// mimalloc's `mi_malloc`/`mi_free`.
pub struct Mimalloc;

// SAFETY: mi_malloc returns null or `size` fresh bytes.
unsafe impl Peer for Mimalloc {
    fn name(&self) -> &'static str {
        "mimalloc"
    }

    #[inline]
    fn alloc(&self, size: usize) -> *mut u8 {
        // SAFETY: mi_malloc accepts any size and has no other precondition.
        unsafe { libmimalloc_sys::mi_malloc(size) }.cast()
    }

    #[inline]
    unsafe fn free(&self, p: *mut u8, _size: usize) {
        // SAFETY: the caller guarantees `p` came from mi_malloc and is live.
        unsafe { libmimalloc_sys::mi_free(p.cast()) }
    }
}
