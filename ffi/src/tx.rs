//! Undo-log transactions. A transaction belongs to the thread that began
//! it; every call here acts on the calling thread's transaction on the
//! given heap. Nested begins join the outermost transaction.
//!
//! ```c
//! if (remem_tx_begin(h) != REMEM_OK) goto fail;
//! if (remem_tx_add_range(h, &node->value, sizeof node->value) != REMEM_OK) goto abort;
//! node->value = 42;
//! if (remem_tx_commit(h) != REMEM_OK) goto fail;
//! ```

use std::ffi::c_void;
use std::ptr::NonNull;

use crate::handles::{remem_heap, with_heap};
use crate::status::remem_status::{self, *};
use crate::status::{boundary, clear_out, non_null, Fail};

/// Begins a transaction on this thread (or, when one is running, enters a
/// nested level of it). Every level must be ended with remem_tx_commit()
/// or remem_tx_abort(). Fails with REMEM_NO_LANE when too many threads run
/// transactions at once.
///
/// NULL: `heap` NULL is REMEM_NULL_PARAMETER.
///
/// # Safety
///
/// None beyond passing a handle or NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_tx_begin(heap: *mut remem_heap) -> remem_status {
    boundary("remem_tx_begin", |t| {
        // SAFETY: `t.lanes` lives in THREAD, a thread-local without
        // destructor (remem-alloc's contract for every `*_in` call here).
        with_heap(t, heap, |h| Ok(unsafe { h.tx_begin_in(&t.lanes) }?))
    })
}

/// Records the `len` bytes at `ptr` (inside one allocated block of the
/// heap) in the undo log, so that they are restored if the transaction
/// does not commit (abort, or a crash before the commit). Call it before
/// modifying them. A range that is not inside one block is
/// REMEM_INVALID_POINTER; one that wraps around the address space
/// REMEM_BAD_ARGUMENT. REMEM_TX_LOG_FULL: the heap had no room for the
/// log; the transaction was rolled back and is aborted (end it with
/// remem_tx_abort()).
///
/// NULL: `heap` or `ptr` NULL is REMEM_NULL_PARAMETER. Ownership: the
/// range is only read.
///
/// # Safety
///
/// None: the range is checked against the heap's metadata before it is read.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_tx_add_range(heap: *mut remem_heap, ptr: *const c_void, len: usize) -> remem_status {
    boundary("remem_tx_add_range", |t| {
        if ptr.is_null() {
            return Err(Fail::null("ptr"));
        }
        with_heap(t, heap, |h| {
            if (ptr as usize).checked_add(len).is_none_or(|end| len as u64 > h.size() || end > isize::MAX as usize) {
                return Err(Fail::new(REMEM_BAD_ARGUMENT, format!("range {ptr:p}+{len} is larger than the heap")));
            }
            // SAFETY: `t.lanes` as in remem_tx_begin.
            Ok(unsafe { h.tx_add_range_in(&t.lanes, ptr.cast(), len) }?)
        })
    })
}

/// Allocates `size` bytes inside the running transaction: if the
/// transaction does not commit, the block is released again.
///
/// NULL: `heap` or `out` NULL is REMEM_NULL_PARAMETER. Ownership: once the
/// transaction commits, the block is the caller's (free it with
/// remem_free() or remem_tx_free(), once).
///
/// # Safety
///
/// `out` must be NULL or valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_tx_alloc(heap: *mut remem_heap, size: usize, out: *mut *mut c_void) -> remem_status {
    boundary("remem_tx_alloc", |t| {
        // SAFETY: forwarded from the caller.
        let out = unsafe { clear_out(out, "out") }?;
        // SAFETY: `t.lanes` as in remem_tx_begin.
        let p = with_heap(t, heap, |h| Ok(unsafe { h.tx_alloc_in(&t.lanes, size, false) }?))?;
        // SAFETY: checked for NULL; the caller guarantees it is writable.
        unsafe { out.write(p.as_ptr().cast()) };
        Ok(())
    })
}

/// remem_tx_alloc(), with the block's first `size` bytes set to zero.
///
/// NULL: as remem_tx_alloc(). Ownership: as remem_tx_alloc().
///
/// # Safety
///
/// `out` must be NULL or valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_tx_alloc_zeroed(
    heap: *mut remem_heap,
    size: usize,
    out: *mut *mut c_void,
) -> remem_status {
    boundary("remem_tx_alloc_zeroed", |t| {
        // SAFETY: forwarded from the caller.
        let out = unsafe { clear_out(out, "out") }?;
        // SAFETY: `t.lanes` as in remem_tx_begin.
        let p = with_heap(t, heap, |h| Ok(unsafe { h.tx_alloc_in(&t.lanes, size, false) }?))?;
        // SAFETY: the block was just allocated for us and holds at least
        // `size` bytes; nothing else knows it yet.
        unsafe { std::ptr::write_bytes(p.as_ptr(), 0, size) };
        // SAFETY: checked for NULL; the caller guarantees it is writable.
        unsafe { out.write(p.as_ptr().cast()) };
        Ok(())
    })
}

/// Frees the block `ptr` when, and only if, the running transaction
/// commits. The block stays usable until then.
///
/// NULL is fine (`ptr` NULL does nothing); never twice (freeing a block
/// twice in one transaction, or a free block, is REMEM_DOUBLE_FREE).
/// `heap` NULL is REMEM_NULL_PARAMETER.
///
/// # Safety
///
/// None: `ptr` is checked against the heap's metadata.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_tx_free(heap: *mut remem_heap, ptr: *mut c_void) -> remem_status {
    boundary("remem_tx_free", |t| {
        with_heap(t, heap, |h| match NonNull::new(ptr.cast::<u8>()) {
            None => Ok(()),
            // SAFETY: `t.lanes` as in remem_tx_begin.
            Some(p) => Ok(unsafe { h.tx_free_in(&t.lanes, p) }?),
        })
    })
}

/// Commits the running transaction (for a nested level: ends that level;
/// the outermost commit makes everything durable at once). Returns
/// REMEM_TX_ABORTED, and ends the level, when an inner level aborted.
///
/// NULL: `heap` NULL is REMEM_NULL_PARAMETER.
///
/// # Safety
///
/// None beyond passing a handle or NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_tx_commit(heap: *mut remem_heap) -> remem_status {
    boundary("remem_tx_commit", |t| {
        // SAFETY: `t.lanes` as in remem_tx_begin.
        with_heap(t, heap, |h| Ok(unsafe { h.tx_commit_in(&t.lanes) }?))
    })
}

/// Rolls the running transaction back, whatever the nesting level:
/// logged ranges get their old bytes back, its allocations are released,
/// its frees do not happen. It ends one level; outer levels must still
/// be ended (their commit returns REMEM_TX_ABORTED).
///
/// NULL: `heap` NULL is REMEM_NULL_PARAMETER.
///
/// # Safety
///
/// None beyond passing a handle or NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_tx_abort(heap: *mut remem_heap) -> remem_status {
    boundary("remem_tx_abort", |t| {
        // SAFETY: `t.lanes` as in remem_tx_begin.
        with_heap(t, heap, |h| Ok(unsafe { h.tx_abort_in(&t.lanes) }?))
    })
}

/// Returns in `*out` the nesting depth of this thread's transaction on
/// the heap (0: none running).
///
/// NULL: `heap` or `out` NULL is REMEM_NULL_PARAMETER.
///
/// # Safety
///
/// `out` must be NULL or valid for writing a uint32_t.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_tx_depth(heap: *mut remem_heap, out: *mut u32) -> remem_status {
    boundary("remem_tx_depth", |t| {
        let out = non_null(out, "out")?;
        let d = with_heap(t, heap, |h| {
            h.check_process()?;
            // SAFETY: `t.lanes` as in remem_tx_begin.
            Ok(unsafe { h.tx_depth_in(&t.lanes) })
        })?;
        // SAFETY: not NULL; the caller guarantees it is valid for writes.
        unsafe { out.write(d) };
        Ok(())
    })
}
