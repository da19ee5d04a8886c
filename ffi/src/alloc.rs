//! Allocation and the root object.
//!
//! Blocks are 16-byte aligned (remem_alloc_aligned: up to 4096) and live
//! at the same address in every process that opens the heap, so raw
//! pointers to them may be stored inside the heap.

use std::ffi::c_void;
use std::ptr::NonNull;

use remem_alloc::Heap;

use crate::handles::{remem_heap, with_heap};
use crate::status::remem_status::{self, *};
use crate::status::{boundary, clear_out, non_null, Fail, FfiResult};
use crate::thread::ThreadState;

/// Runs an allocating call and stores its block in `*out` (set to NULL first).
///
/// # Safety
///
/// `out` must be NULL or valid for writing a pointer.
#[inline(always)]
unsafe fn alloc_out(
    t: &ThreadState,
    heap: *mut remem_heap,
    out: *mut *mut c_void,
    f: impl FnOnce(&Heap) -> FfiResult<NonNull<u8>>,
) -> FfiResult {
    // SAFETY: forwarded from the caller.
    let out = unsafe { clear_out(out, "out") }?;
    let p = with_heap(t, heap, f)?;
    // SAFETY: checked for NULL; the caller guarantees it is writable.
    unsafe { out.write(p.as_ptr().cast()) };
    Ok(())
}

fn nonzero(size: usize) -> FfiResult {
    if size == 0 {
        Err(Fail::new(REMEM_BAD_ARGUMENT, "size 0: remem does not allocate empty blocks"))
    } else {
        Ok(())
    }
}

/// Allocates `size` bytes (16-byte aligned) and returns the block in
/// `*out`. A `size` of 0 is REMEM_BAD_ARGUMENT; one larger than the free
/// space (SIZE_MAX, say) is REMEM_OUT_OF_MEMORY.
///
/// A block allocated this way leaks if the process dies before a pointer
/// to it is stored in the heap: use remem_alloc_into() or remem_tx_alloc()
/// when that matters.
///
/// NULL: `heap` or `out` NULL is REMEM_NULL_PARAMETER. Ownership: the
/// block belongs to the heap's user; release it with remem_free() (once).
///
/// # Safety
///
/// `out` must be NULL or valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_alloc(heap: *mut remem_heap, size: usize, out: *mut *mut c_void) -> remem_status {
    boundary("remem_alloc", |t| {
        // SAFETY: forwarded from the caller.
        // SAFETY: forwarded from the caller; `t.lanes` lives in THREAD, a
        // thread-local without destructor (remem-alloc's contract).
        unsafe { alloc_out(t, heap, out, |h| Ok(h.alloc_in(&t.lanes, size, 16)?)) }
    })
}

/// remem_alloc() aligned to `align`, a power of two up to 4096 (anything
/// else is REMEM_BAD_ARGUMENT).
///
/// NULL: as remem_alloc(). Ownership: as remem_alloc().
///
/// # Safety
///
/// `out` must be NULL or valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_alloc_aligned(
    heap: *mut remem_heap,
    size: usize,
    align: usize,
    out: *mut *mut c_void,
) -> remem_status {
    boundary("remem_alloc_aligned", |t| {
        // Checked here as well as in the heap: the contract is the C API's.
        if !align.is_power_of_two() || align > 4096 {
            // SAFETY: forwarded from the caller.
            unsafe { clear_out(out, "out") }?;
            return Err(Fail::new(REMEM_BAD_ARGUMENT, format!("alignment {align} is not a power of two up to 4096")));
        }
        // SAFETY: forwarded from the caller.
        // SAFETY: forwarded from the caller; `t.lanes` as in remem_alloc.
        unsafe { alloc_out(t, heap, out, |h| Ok(h.alloc_in(&t.lanes, size, align)?)) }
    })
}

/// remem_alloc(), with the block's first `size` bytes set to zero.
///
/// NULL: as remem_alloc(). Ownership: as remem_alloc().
///
/// # Safety
///
/// `out` must be NULL or valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_alloc_zeroed(heap: *mut remem_heap, size: usize, out: *mut *mut c_void) -> remem_status {
    boundary("remem_alloc_zeroed", |t| {
        // SAFETY: forwarded from the caller.
        unsafe { alloc_out(t, heap, out, |h| Ok(h.alloc_zeroed(size)?)) }
    })
}

/// Frees a block of this heap. A pointer from elsewhere (malloc, another
/// heap) is REMEM_NOT_IN_HEAP, one into the middle of a block
/// REMEM_INVALID_POINTER, an already-free block REMEM_DOUBLE_FREE; in
/// each case nothing changes.
///
/// NULL is fine (`ptr` NULL does nothing, REMEM_OK); never twice (a second
/// free is detected as REMEM_DOUBLE_FREE unless the block was allocated
/// again meanwhile, or two threads free it at the same instant). `heap`
/// NULL is REMEM_NULL_PARAMETER.
///
/// # Safety
///
/// None: `ptr` is only compared with the heap's bounds and metadata
/// before anything is written. No pointer to the block may be used after.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_free(heap: *mut remem_heap, ptr: *mut c_void) -> remem_status {
    boundary("remem_free", |t| {
        with_heap(t, heap, |h| match NonNull::new(ptr.cast::<u8>()) {
            None => Ok(()),
            // SAFETY: `t.lanes` as in remem_alloc.
            Some(p) => Ok(unsafe { h.free_in(&t.lanes, p) }?),
        })
    })
}

/// The heap open in this process whose address range contains `base` (as
/// remem_heap_at() finds it: a table lookup of a few loads, no lock).
fn heap_containing(base: *const c_void) -> FfiResult<*mut remem_heap> {
    crate::handles::heap_at(base as usize).ok_or_else(|| not_in_heap(base))
}

#[cold]
#[inline(never)]
fn not_in_heap(base: *const c_void) -> Fail {
    Fail::new(REMEM_NOT_IN_HEAP, format!("no heap open in this process contains {base:p}"))
}

/// remem_alloc_aligned() on the heap open in this process whose address
/// range contains `base` (its base address, say), in one call: what
/// remem_heap_at() and remem_alloc_aligned() do, without the second call.
/// For data kept in a heap that names its heap by address (the C++
/// remem::persistent_allocator). No such heap is REMEM_NOT_IN_HEAP;
/// `align` as for remem_alloc_aligned(), `size` as for remem_alloc().
///
/// NULL: `out` NULL is REMEM_NULL_PARAMETER; `base` NULL is never in a
/// heap. Ownership: as remem_alloc(); free the block with remem_free()
/// or remem_free_at() (once).
///
/// # Safety
///
/// `out` must be NULL or valid for writing a pointer. `base` is not dereferenced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_alloc_at(
    base: *const c_void,
    size: usize,
    align: usize,
    out: *mut *mut c_void,
) -> remem_status {
    boundary("remem_alloc_at", |t| {
        if !align.is_power_of_two() || align > 4096 {
            // SAFETY: forwarded from the caller.
            unsafe { clear_out(out, "out") }?;
            return Err(Fail::new(REMEM_BAD_ARGUMENT, format!("alignment {align} is not a power of two up to 4096")));
        }
        let heap = match heap_containing(base) {
            Ok(h) => h,
            Err(e) => {
                // SAFETY: forwarded from the caller.
                unsafe { clear_out(out, "out") }?;
                return Err(e);
            }
        };
        // SAFETY: forwarded from the caller; `t.lanes` as in remem_alloc.
        unsafe { alloc_out(t, heap, out, |h| Ok(h.alloc_in(&t.lanes, size, align)?)) }
    })
}

/// remem_free() on the heap open in this process whose address range
/// contains `base`, in one call (see remem_alloc_at()). No such heap is
/// REMEM_NOT_IN_HEAP, and nothing is freed.
///
/// NULL is fine (`ptr` NULL does nothing, REMEM_OK); never twice (as
/// remem_free()). `base` NULL is never in a heap.
///
/// # Safety
///
/// None: `base` is not dereferenced, `ptr` is checked as by remem_free().
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_free_at(base: *const c_void, ptr: *mut c_void) -> remem_status {
    boundary("remem_free_at", |t| {
        let Some(p) = NonNull::new(ptr.cast::<u8>()) else { return Ok(()) };
        let heap = heap_containing(base)?;
        // SAFETY: `t.lanes` as in remem_alloc.
        with_heap(t, heap, |h| Ok(unsafe { h.free_in(&t.lanes, p) }?))
    })
}

/// Resizes the block `ptr` to `size` bytes and returns the (possibly
/// moved) block in `*out`; when it moves, the contents are copied and the
/// old block freed. `ptr` NULL allocates, like remem_alloc(). `size` 0 is
/// REMEM_BAD_ARGUMENT. On failure `ptr` is untouched and still allocated.
/// Not failure-atomic: a crash in the middle may leak one of the blocks
/// (use a transaction when that matters).
///
/// NULL: `heap` or `out` NULL is REMEM_NULL_PARAMETER. Ownership: the
/// caller owns `*out` and no longer owns `ptr` (unless they are equal).
///
/// # Safety
///
/// `out` must be NULL or valid for writing a pointer. `ptr` is checked
/// against the heap's metadata before it is read.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_realloc(
    heap: *mut remem_heap,
    ptr: *mut c_void,
    size: usize,
    out: *mut *mut c_void,
) -> remem_status {
    boundary("remem_realloc", |t| {
        // SAFETY: forwarded from the caller.
        unsafe {
            alloc_out(t, heap, out, |h| {
                nonzero(size)?;
                match NonNull::new(ptr.cast::<u8>()) {
                    None => Ok(h.alloc(size)?),
                    Some(p) => Ok(h.realloc(p, size)?),
                }
            })
        }
    })
}

/// Returns in `*out` how many bytes the block `ptr` can hold (at least
/// what was asked for).
///
/// NULL: `heap`, `ptr` or `out` NULL is REMEM_NULL_PARAMETER. Ownership:
/// nothing changes hands.
///
/// # Safety
///
/// `out` must be NULL or valid for writing a size_t.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_usable_size(heap: *mut remem_heap, ptr: *const c_void, out: *mut usize) -> remem_status {
    boundary("remem_usable_size", |t| {
        let out = non_null(out, "out")?;
        let p = NonNull::new(ptr.cast_mut().cast::<u8>()).ok_or_else(|| Fail::null("ptr"))?;
        let n = with_heap(t, heap, |h| Ok(h.usable_size(p)?))?;
        // SAFETY: not NULL; the caller guarantees it is valid for writes.
        unsafe { out.write(n) };
        Ok(())
    })
}

/// Allocates `size` bytes and stores the block's address in `*dest`, in
/// one failure-atomic step: after a crash at any instant, the block is
/// allocated iff `*dest` points to it. `dest` must be an 8-byte aligned
/// word inside the heap's data area (a field of a block), else
/// REMEM_INVALID_POINTER and nothing is written.
///
/// NULL: `heap` or `dest` NULL is REMEM_NULL_PARAMETER. Ownership: the
/// block is referenced from `*dest`; free it with remem_free() (once).
///
/// # Safety
///
/// `dest` is checked to be inside the heap before it is written; the
/// caller must not be using `*dest` from another thread meanwhile.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_alloc_into(heap: *mut remem_heap, dest: *mut *mut c_void, size: usize) -> remem_status {
    boundary("remem_alloc_into", |t| {
        let dest = non_null(dest, "dest")?;
        with_heap(t, heap, |h| Ok(h.alloc_into(dest.cast::<*mut u8>(), size).map(drop)?))
    })
}

/// Returns the heap's root object in `*out` (NULL when none was set). The
/// root is how a program finds its data after opening a heap.
///
/// NULL: `heap` or `out` NULL is REMEM_NULL_PARAMETER. Ownership: the root
/// belongs to the heap; it is a block like any other.
///
/// # Safety
///
/// `out` must be NULL or valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_root(heap: *mut remem_heap, out: *mut *mut c_void) -> remem_status {
    boundary("remem_root", |t| {
        // SAFETY: forwarded from the caller.
        let out = unsafe { clear_out(out, "out") }?;
        let root = with_heap(t, heap, |h| {
            h.check_process()?;
            Ok(h.root())
        })?;
        // SAFETY: checked for NULL; the caller guarantees it is writable.
        unsafe { out.write(root.map_or(std::ptr::null_mut(), |p| p.as_ptr().cast())) };
        Ok(())
    })
}

/// Makes the block `ptr` (allocated from this heap) the root object, or
/// clears the root when `ptr` is NULL. The old root is not freed.
///
/// NULL: `heap` NULL is REMEM_NULL_PARAMETER; `ptr` NULL clears the root.
/// Ownership: the block now belongs to the heap's root; free it only
/// after clearing or replacing the root.
///
/// # Safety
///
/// None: `ptr` is checked against the heap's metadata.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_set_root(heap: *mut remem_heap, ptr: *mut c_void) -> remem_status {
    boundary("remem_set_root", |t| with_heap(t, heap, |h| Ok(h.set_root(NonNull::new(ptr.cast::<u8>()))?)))
}

/// Returns the root object in `*out`; when there is none, allocates `size`
/// zeroed bytes and makes them the root in one failure-atomic step.
/// `*created` (if `created` is not NULL) tells whether this call made it.
///
/// NULL: `heap` or `out` NULL is REMEM_NULL_PARAMETER; `created` may be
/// NULL. Ownership: the root belongs to the heap.
///
/// # Safety
///
/// `out` must be NULL or valid for writing a pointer, `created` NULL or
/// valid for writing a bool.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_root_or_alloc(
    heap: *mut remem_heap,
    size: usize,
    out: *mut *mut c_void,
    created: *mut bool,
) -> remem_status {
    boundary("remem_root_or_alloc", |t| {
        // SAFETY: forwarded from the caller.
        let out = unsafe { clear_out(out, "out") }?;
        let (root, made) = with_heap(t, heap, |h| Ok(h.root_or_alloc(size)?))?;
        // SAFETY: checked for NULL; the caller guarantees it is writable.
        unsafe { out.write(root.as_ptr().cast()) };
        if !created.is_null() {
            // SAFETY: not NULL; the caller guarantees it is writable.
            unsafe { created.write(made) };
        }
        Ok(())
    })
}
