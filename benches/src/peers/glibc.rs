//! glibc's malloc/free, the process allocator.

use super::Peer;

/// glibc malloc/free through `libc`.
pub struct Glibc;

// SAFETY: malloc returns null or `size` fresh bytes.
unsafe impl Peer for Glibc {
    fn name(&self) -> &'static str {
        "glibc"
    }

    #[inline]
    fn alloc(&self, size: usize) -> *mut u8 {
        // SAFETY: malloc accepts any size and has no other precondition.
        unsafe { libc::malloc(size) }.cast()
    }

    #[inline]
    unsafe fn free(&self, p: *mut u8, _size: usize) {
        // SAFETY: the caller guarantees `p` came from malloc and is live.
        unsafe { libc::free(p.cast()) }
    }
}
