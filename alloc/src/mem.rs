//! A view of a heap's bytes as atomic words.
//!
//! All allocator metadata lives inside the heap and is read and written
//! through this view only, always with atomic operations: the same bytes
//! may be copied by another thread (a crash-image test), read by another
//! process (the agent), or be the image of a process that died mid-store.

use std::sync::atomic::{AtomicU32, AtomicU64};

/// A metadata offset outside the heap: a bug in remem (or memory damage),
/// never something to continue from.
#[cold]
#[inline(never)]
fn out_of_range(off: usize, len: usize) -> ! {
    panic!("remem bug: metadata access at {off:#x} outside the {len:#x}-byte heap")
}

/// A `#[repr(C)]` type made only of atomic integers (and arrays of them),
/// which [`Mem::view_unchecked`] shows in place over heap bytes.
///
/// # Safety
/// Implementors are `#[repr(C)]`, aligned to at most 8 bytes, and every
/// field is an atomic integer or an array of them: every bit pattern is a
/// valid value and every shared access is atomic.
pub(crate) unsafe trait Words: Sized {}

// SAFETY: `AtomicU64` is an 8-aligned atomic integer.
unsafe impl Words for AtomicU64 {}

/// Bytes `[base, base + len)` that stay mapped, readable and writable for
/// the lifetime of the view.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mem {
    base: *mut u8,
    len: usize,
}

// SAFETY: `Mem` is an address range; every access through it is atomic or
// through raw pointers whose users uphold their own synchronisation.
unsafe impl Send for Mem {}
// SAFETY: as above, shared access only performs atomic operations.
unsafe impl Sync for Mem {}

impl Mem {
    /// A view of `len` bytes at `base`.
    ///
    /// # Safety
    /// `base` must be 8-byte aligned and `[base, base + len)` must stay
    /// mapped readable and writable for as long as the view (or any copy of
    /// it) is used, and be accessed by others only atomically or through
    /// raw pointers.
    pub(crate) unsafe fn new(base: *mut u8, len: usize) -> Mem {
        debug_assert_eq!(base as usize % 8, 0);
        // The bounds checks below compute `len - 8`.
        assert!(len >= 8, "a heap view is at least one word long");
        Mem { base, len }
    }

    /// The `u64` at byte offset `off`.
    ///
    /// Panics when `off` is misaligned or out of range: offsets come from
    /// validated metadata, so that would be a bug in remem.
    #[inline]
    pub(crate) fn u64(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off.is_multiple_of(8), "remem bug: misaligned u64 at {off:#x}");
        if off > self.len - 8 {
            out_of_range(off, self.len);
        }
        // SAFETY: in range (checked above); aligned: every offset remem
        // computes for a u64 is a multiple of 8 (debug-checked), and base is
        // 8-aligned;
        // the memory is valid for the view's lifetime (see `new`) and is
        // only accessed atomically.
        unsafe { AtomicU64::from_ptr(self.base.add(off).cast()) }
    }

    /// The `u32` at byte offset `off`.
    #[inline]
    pub(crate) fn u32(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off.is_multiple_of(4), "remem bug: misaligned u32 at {off:#x}");
        if off > self.len - 4 {
            out_of_range(off, self.len);
        }
        // SAFETY: as in `u64` (multiples of 4 for u32 offsets).
        unsafe { AtomicU32::from_ptr(self.base.add(off).cast()) }
    }

    /// The `T` at byte offset `off`, with no bounds check: for offsets that
    /// the caller has already bounded (a validated layout).
    ///
    /// # Safety
    /// `off + size_of::<T>() <= len`, and `off` is a multiple of `T`'s alignment.
    #[inline(always)]
    pub(crate) unsafe fn view_unchecked<T: Words>(&self, off: usize) -> &T {
        debug_assert!(off + std::mem::size_of::<T>() <= self.len, "remem bug: view at {off:#x} out of range");
        // SAFETY: in range and aligned (the caller's contract); base is
        // 8-aligned; every bit pattern is a valid `T` and `T` is only
        // accessed atomically (`Words`); the memory is valid for the view's
        // lifetime (`new`).
        unsafe { &*self.base.add(off).cast::<T>() }
    }

    /// Bytes in the view.
    #[inline(always)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The address of byte offset `off` (`off <= len`).
    #[inline]
    pub(crate) fn ptr(&self, off: usize) -> *mut u8 {
        assert!(off <= self.len, "remem bug: byte {off:#x} of {:#x}", self.len);
        self.base.wrapping_add(off)
    }

    /// [`Mem::ptr`] for an offset the caller has just accessed through
    /// this view (so it is in range): checked in debug builds only.
    #[inline(always)]
    pub(crate) fn ptr_seen(&self, off: usize) -> *mut u8 {
        debug_assert!(off <= self.len, "remem bug: byte {off:#x} of {:#x}", self.len);
        self.base.wrapping_add(off)
    }

    /// Copies `len` bytes at `off` out (racy reads of user data are fine:
    /// the result is only used as a snapshot).
    pub(crate) fn read(&self, off: usize, out: &mut [u8]) {
        assert!(off + out.len() <= self.len);
        // SAFETY: in range; `out` is a distinct Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(off), out.as_mut_ptr(), out.len()) }
    }

    /// Copies `data` in at `off`. Callers own those bytes exclusively.
    pub(crate) fn write(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len);
        // SAFETY: in range; callers own the destination bytes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.add(off), data.len()) }
    }

    /// Fills `len` bytes at `off` with `byte`. Callers own those bytes exclusively.
    pub(crate) fn fill(&self, off: usize, byte: u8, len: usize) {
        assert!(off + len <= self.len);
        // SAFETY: in range; callers own the destination bytes.
        unsafe { std::ptr::write_bytes(self.base.add(off), byte, len) }
    }
}
