//! Offset pointers: a heap offset instead of an address, for code that
//! wants its data to survive relocation of the heap.

use std::fmt;
use std::marker::PhantomData;

use crate::Heap;

/// A pointer to a `T` inside a heap, stored as its offset from the heap's
/// base (0 is null). Eight bytes, `Copy`, valid in any mapping of the heap.
#[repr(transparent)]
pub struct PPtr<T> {
    off: u64,
    _t: PhantomData<fn() -> T>,
}

impl<T> PPtr<T> {
    /// The null offset pointer.
    pub const fn null() -> PPtr<T> {
        PPtr { off: 0, _t: PhantomData }
    }

    /// An offset pointer to heap offset `off`.
    pub const fn from_offset(off: u64) -> PPtr<T> {
        PPtr { off, _t: PhantomData }
    }

    /// The offset pointer for `ptr`, or `None` when `ptr` is not in `heap`.
    pub fn from_ptr(heap: &Heap, ptr: *const T) -> Option<PPtr<T>> {
        heap.offset_of(ptr.cast()).map(|o| PPtr::from_offset(o as u64))
    }

    /// True for the null pointer.
    pub const fn is_null(self) -> bool {
        self.off == 0
    }

    /// The heap offset.
    pub const fn offset(self) -> u64 {
        self.off
    }

    /// The address in `heap` (null for the null pointer or an offset past
    /// the heap's end). Dereferencing it is up to the caller.
    pub fn as_ptr(self, heap: &Heap) -> *mut T {
        if self.off == 0 {
            return std::ptr::null_mut();
        }
        heap.at_offset(self.off as usize).map_or(std::ptr::null_mut(), |p| p.as_ptr().cast())
    }

    /// The same offset, viewed as a pointer to `U`.
    pub const fn cast<U>(self) -> PPtr<U> {
        PPtr::from_offset(self.off)
    }
}

impl<T> Clone for PPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for PPtr<T> {}
impl<T> PartialEq for PPtr<T> {
    fn eq(&self, other: &Self) -> bool {
        self.off == other.off
    }
}
impl<T> Eq for PPtr<T> {}
impl<T> Default for PPtr<T> {
    fn default() -> Self {
        PPtr::null()
    }
}
impl<T> fmt::Debug for PPtr<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PPtr({:#x})", self.off)
    }
}
