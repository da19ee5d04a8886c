//! The Rust allocator traits: `allocator_api2::alloc::Allocator` for
//! `&Heap` (so `allocator_api2::vec::Vec` and `hashbrown::HashMap` can live
//! in a heap) and a `GlobalAlloc` adapter.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, Ordering};

use allocator_api2::alloc::{AllocError, Allocator};

use crate::Heap;

fn dangling(layout: Layout) -> NonNull<[u8]> {
    // An aligned, non-null address for zero-sized allocations.
    let p = NonNull::new(layout.align() as *mut u8).expect("alignment is non-zero");
    NonNull::slice_from_raw_parts(p, 0)
}

// SAFETY: blocks returned by `allocate` are valid for `layout.size()` bytes
// at `layout.align()`, stay valid until deallocated or the heap is dropped
// (which the `&Heap` borrow prevents), and `deallocate` only frees blocks of
// this heap. Zero-sized requests get a dangling aligned pointer that is
// never freed.
unsafe impl Allocator for &Heap {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            return Ok(dangling(layout));
        }
        let p = self.alloc_aligned(layout.size(), layout.align().max(16)).map_err(|_| AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, layout.size()))
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() != 0 {
            let r = self.free(ptr);
            debug_assert!(r.is_ok(), "remem: deallocate: {r:?}");
        }
    }
}

/// A persistent handle to an open heap: its base address. Unlike `&Heap`
/// it can be stored inside the heap, so a collection whose allocator is a
/// `HeapRef` (a `hashbrown::HashMap` hanging off the root object, say) is
/// usable again after the heap is closed and reopened. Allocation fails
/// (and deallocation leaks) while no heap is open at that address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct HeapRef {
    base: u64,
}

impl HeapRef {
    pub(crate) fn new(base: u64) -> HeapRef {
        HeapRef { base }
    }
}

// SAFETY: allocations are served by the heap open at `base` (the same heap
// for as long as it stays open: two heaps cannot be mapped at one address),
// with the guarantees of the `&Heap` implementation above.
unsafe impl Allocator for HeapRef {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        crate::heap::with_open_heap(self.base, |h| h.allocate(layout)).unwrap_or(Err(AllocError))
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        crate::heap::with_open_heap(self.base, |h| {
            // SAFETY: forwarded from our caller.
            unsafe { h.deallocate(ptr, layout) }
        });
    }
}

thread_local! {
    /// Set while this thread is inside the heap on behalf of [`GlobalHeap`],
    /// so allocations the heap itself makes go to the system allocator.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// A `GlobalAlloc` that serves allocations from a heap once one is
/// installed, and from the system allocator before that (and for the
/// heap's own bookkeeping). Frees go wherever the block came from.
///
/// ```no_run
/// use remem_alloc::{GlobalHeap, Heap, HeapOptions};
/// static GLOBAL: GlobalHeap = GlobalHeap::new();
/// // #[global_allocator] static A: &GlobalHeap = &GLOBAL; // or use it directly
/// let heap: &'static Heap = Box::leak(Box::new(Heap::create("/tmp/g.heap", &HeapOptions::new(64 << 20)).unwrap()));
/// GLOBAL.install(heap);
/// ```
#[derive(Debug)]
pub struct GlobalHeap {
    heap: AtomicPtr<Heap>,
}

impl GlobalHeap {
    /// An adapter with no heap installed yet.
    pub const fn new() -> GlobalHeap {
        GlobalHeap { heap: AtomicPtr::new(std::ptr::null_mut()) }
    }

    /// Serves later allocations from `heap`.
    pub fn install(&self, heap: &'static Heap) {
        self.heap.store(heap as *const Heap as *mut Heap, Ordering::Release);
    }

    fn heap(&self) -> Option<&'static Heap> {
        let p = self.heap.load(Ordering::Acquire);
        // SAFETY: only `install` stores here, from a `&'static Heap`.
        unsafe { p.as_ref() }
    }

    fn inside<R>(f: impl FnOnce() -> R) -> Option<R> {
        let entered = INSIDE.try_with(|i| !i.replace(true)).unwrap_or(false);
        if !entered {
            return None;
        }
        let r = f();
        let _ = INSIDE.try_with(|i| i.set(false));
        Some(r)
    }
}

impl Default for GlobalHeap {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: every block comes from either the heap or `System` with the
// layout's size and alignment, and is returned to the one it came from
// (decided by address); re-entrant calls are sent to `System`.
unsafe impl GlobalAlloc for GlobalHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if let Some(h) = self.heap() {
            if layout.align() <= 4096 {
                if let Some(r) = Self::inside(|| h.alloc_aligned(layout.size().max(1), layout.align().max(16))) {
                    return r.map_or(std::ptr::null_mut(), |p| p.as_ptr());
                }
            }
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let (Some(h), Some(p)) = (self.heap(), NonNull::new(ptr)) {
            if h.contains(ptr) {
                let _ = Self::inside(|| h.free(p)).or_else(|| Some(h.free(p)));
                return;
            }
        }
        // SAFETY: the block came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}
