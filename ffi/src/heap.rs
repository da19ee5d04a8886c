//! Creating, opening and closing heaps; memfd heaps; statistics and the
//! invariant check.

use std::ffi::{c_char, c_int, c_void, CStr, OsStr};
use std::os::fd::{BorrowedFd, IntoRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use remem_alloc::{CheckReport, Heap, HeapOptions};

use crate::handles::{self, remem_heap};
use crate::status::remem_status::{self, *};
use crate::status::{boundary, clear_out, non_null, non_null_const, Fail, FfiResult};

/// Statistics of a heap, from remem_stats().
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct remem_heap_stats {
    /// First byte of the heap: its fixed address, the same in every
    /// process that opens it.
    pub base: *mut c_void,
    /// Heap size in bytes.
    pub size: u64,
    /// 4 KiB pages available for data.
    pub data_pages: u64,
    /// Data pages in no slab or run.
    pub free_pages: u64,
    /// Longest run of free pages.
    pub largest_free_run: u64,
}

/// What remem_check found. `ok` is true when no invariant is broken and
/// (for remem_check_live) nothing leaked or is doubly owned; the other
/// fields count what the scan saw.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct remem_check_report {
    /// No problem found.
    pub ok: bool,
    /// Broken invariants (their sentences are in remem_last_error()).
    pub problems: u64,
    /// Slabs in use.
    pub slabs: u64,
    /// Allocated small blocks.
    pub allocated_blocks: u64,
    /// Page runs (large blocks) in use.
    pub large_runs: u64,
    /// Bytes in allocated blocks and runs.
    pub allocated_bytes: u64,
    /// Free blocks held in per-thread caches.
    pub cached_blocks: u64,
    /// Free data pages.
    pub free_pages: u64,
    /// remem_check_live: allocated blocks the live set did not name (0 for remem_check).
    pub leaked: u64,
    /// remem_check_live: live pointers named twice or not allocated (0 for remem_check).
    pub doubly_owned: u64,
}

/// What recovery did when the heap was opened or attached (all zero for
/// a heap created by this process), from remem_recovery().
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct remem_recovery_report {
    /// Transactions in flight at the crash, rolled back.
    pub txs_rolled_back: u64,
    /// Transactions that had committed and were releasing their frees: finished.
    pub txs_finished: u64,
    /// Undo records applied by the rollbacks.
    pub undo_records_applied: u64,
    /// Blocks released by the rollbacks (their allocations) and the finished commits (their frees).
    pub tx_blocks_released: u64,
    /// remem_alloc_into() calls in flight whose destination already held the block: kept.
    pub allocs_completed: u64,
    /// remem_alloc_into() calls in flight whose destination did not: the block was freed.
    pub allocs_rolled_back: u64,
    /// Free blocks that sat in per-thread caches, returned to their slabs.
    pub cached_blocks_released: u64,
    /// Allocated small blocks after recovery.
    pub allocated_blocks: u64,
    /// Page runs (large blocks) in use after recovery.
    pub large_runs: u64,
}

/// # Safety
///
/// `path`, when not NULL, must point to a NUL-terminated string.
pub(crate) unsafe fn path_arg<'a>(path: *const c_char) -> FfiResult<&'a Path> {
    // SAFETY: forwarded from the caller.
    unsafe { path_named(path, "path") }
}

/// [`path_arg`] for the parameter called `name`.
///
/// # Safety
///
/// As [`path_arg`].
pub(crate) unsafe fn path_named<'a>(path: *const c_char, name: &str) -> FfiResult<&'a Path> {
    let path = non_null_const(path, name)?;
    // SAFETY: not NULL; the caller guarantees a NUL-terminated string that
    // outlives the call.
    let bytes = unsafe { CStr::from_ptr(path) }.to_bytes();
    if bytes.is_empty() {
        return Err(Fail::new(REMEM_BAD_ARGUMENT, format!("`{name}` is empty")));
    }
    Ok(Path::new(OsStr::from_bytes(bytes)))
}

fn options(size: u64, base: u64) -> FfiResult<HeapOptions> {
    use remem_alloc::format::{MAX_HEAP, MIN_HEAP};
    // Checked here too: remem-alloc rounds the size up before checking it,
    // which overflows for sizes near 2^64.
    if !(MIN_HEAP..=MAX_HEAP).contains(&size) {
        return Err(Fail::new(
            REMEM_BAD_ARGUMENT,
            format!("heap size {size} bytes is not supported: it must be between {MIN_HEAP} and {MAX_HEAP} bytes"),
        ));
    }
    let opts = HeapOptions::new(size);
    Ok(if base == 0 { opts } else { opts.base(base) })
}

/// # Safety
///
/// `out` must be valid for writing a pointer (checked for NULL).
pub(crate) unsafe fn open_with(out: *mut *mut remem_heap, open: impl FnOnce() -> FfiResult<Heap>) -> FfiResult {
    // SAFETY: forwarded from the caller.
    unsafe { open_handle(out, || handles::insert(open()?)) }
}

/// [`open_with`] for an `open` that makes the handle itself.
///
/// # Safety
///
/// As [`open_with`].
pub(crate) unsafe fn open_handle(
    out: *mut *mut remem_heap,
    open: impl FnOnce() -> FfiResult<*mut remem_heap>,
) -> FfiResult {
    // SAFETY: forwarded from the caller.
    let out = unsafe { clear_out(out, "out") }?;
    let heap = open()?;
    // SAFETY: checked for NULL above; the caller guarantees it is writable.
    unsafe { out.write(heap) };
    Ok(())
}

/// Creates a heap of `size` bytes (rounded up to 64 KiB; 1 MiB to 64 GiB)
/// whose baseline file is `path`, and returns
/// its handle in `*out`. `base` is the fixed address to map it at (64 KiB
/// aligned), or 0 to let remem choose one; every process that opens the
/// heap later needs that address range free.
///
/// Written pages are tracked (userfaultfd, fast mode) and flushed to the
/// baseline every second in the background, by remem_flush(), and by
/// remem_close(); a heap that is never closed keeps its last committed
/// flush (see remem_durability() for how old that is).
///
/// NULL: `path` or `out` NULL is REMEM_NULL_PARAMETER. Ownership: `path` is
/// only read during the call. The caller owns the returned handle and
/// must remem_close() it (once). Fails with REMEM_EXISTS if `path` exists.
///
/// # Safety
///
/// `path` must be NULL or a NUL-terminated string; `out` NULL or valid for
/// writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_create(
    path: *const c_char,
    size: u64,
    base: u64,
    out: *mut *mut remem_heap,
) -> remem_status {
    boundary("remem_create", |_| {
        // SAFETY: forwarded from the caller (both pointers).
        unsafe { open_handle(out, || crate::agent::create(path_arg(path)?, &options(size, base)?)) }
    })
}

/// Opens the heap whose image is the file `path`: maps it at its recorded
/// address, runs recovery, and returns its handle in `*out`.
///
/// NULL: `path` or `out` NULL is REMEM_NULL_PARAMETER. Ownership: `path` is
/// only read during the call; the caller owns the handle and must
/// remem_close() it (once). Fails with REMEM_LOCKED when another process
/// (or another handle in this one) has it open, REMEM_ADDRESS_IN_USE when
/// its address range is taken here.
///
/// # Safety
///
/// `path` must be NULL or a NUL-terminated string; `out` NULL or valid for
/// writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_open(path: *const c_char, out: *mut *mut remem_heap) -> remem_status {
    boundary("remem_open", |_| {
        // SAFETY: forwarded from the caller (both pointers).
        unsafe { open_handle(out, || crate::agent::open(path_arg(path)?)) }
    })
}

/// Creates a heap that lives only in a memfd (no image file; remem_close()
/// just unmaps it). Its memory outlives this process for as long as some
/// process holds the memfd: see remem_memfd() and remem_attach(). `size`
/// and `base` as for remem_create().
///
/// NULL: `out` NULL is REMEM_NULL_PARAMETER. Ownership: the caller owns
/// the handle and must remem_close() it (once).
///
/// # Safety
///
/// `out` must be NULL or valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_create_memfd(size: u64, base: u64, out: *mut *mut remem_heap) -> remem_status {
    boundary("remem_create_memfd", |_| {
        // SAFETY: forwarded from the caller.
        unsafe { open_with(out, || Ok(Heap::create_memfd(&options(size, base)?)?)) }
    })
}

/// Maps the heap held by the memfd `fd` (from remem_memfd(), possibly in a
/// process that has since died at any instant) at the heap's recorded
/// address, runs recovery, and returns its handle in `*out`. The memory is
/// shared with every other process that maps the memfd, not copied.
///
/// NULL: `out` NULL is REMEM_NULL_PARAMETER; a negative `fd` is
/// REMEM_BAD_ARGUMENT. Ownership: `fd` is not consumed (remem duplicates
/// it; close yours when you like). The caller owns the handle and must
/// remem_close() it (once); closing unmaps, the memfd lives on in other
/// holders.
///
/// # Safety
///
/// `out` must be NULL or valid for writing a pointer; `fd`, if not
/// negative, must not be closed by another thread during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_attach(fd: c_int, out: *mut *mut remem_heap) -> remem_status {
    boundary("remem_attach", |_| {
        // SAFETY: forwarded from the caller.
        let out = unsafe { clear_out(out, "out") }?;
        if fd < 0 {
            return Err(Fail::new(REMEM_BAD_ARGUMENT, format!("file descriptor {fd} is negative")));
        }
        // SAFETY: `fd` is not -1 and, per the caller's contract, stays open
        // for this call; a descriptor that is not open makes the dup fail.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let owned = borrowed
            .try_clone_to_owned()
            .map_err(|e| Fail::new(REMEM_BAD_ARGUMENT, format!("file descriptor {fd} cannot be duplicated: {e}")))?;
        let heap = Heap::attach(owned)?;
        // SAFETY: checked for NULL; the caller guarantees it is writable.
        unsafe { out.write(handles::insert(heap)?) };
        Ok(())
    })
}

/// Closes the heap: flushes what changed to its baseline and compacts it
/// (when it has one), unmaps it, and ends
/// the handle. Every later call with the handle returns REMEM_BAD_HANDLE.
/// Pointers into the heap are dangling afterwards. A transaction still
/// running on some thread is rolled back when the heap is next opened.
///
/// NULL is fine (nothing happens, REMEM_OK); never twice (a second close
/// returns REMEM_BAD_HANDLE). The handle is ended even when the final
/// flush fails (REMEM_IO; the baseline keeps its last committed flush).
///
/// # Safety
///
/// None beyond passing a value that was returned as a handle or NULL; any
/// other value is reported as REMEM_BAD_HANDLE.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_close(heap: *mut remem_heap) -> remem_status {
    boundary("remem_close", |t| {
        if heap.is_null() {
            return Ok(());
        }
        // An inherited handle in a forked child stays open and is refused:
        // closing would wait for calls in flight of threads that are not in
        // the child.
        handles::with_heap(t, heap, |h| Ok(h.check_process()?))?;
        let closed = handles::remove(heap)?.close();
        let link = crate::agent::take_link(heap);
        closed?;
        // Only after the last flush succeeded: otherwise the connection just
        // ends and the agent keeps the memory, as after a crash.
        if let Some(link) = link {
            link.closed().map_err(|e| {
                Fail::new(REMEM_IO, format!("the heap is closed and flushed, but telling the agent failed: {e}"))
            })?;
        }
        Ok(())
    })
}

/// Returns in `*out_fd` a new file descriptor for the heap's memfd (with
/// FD_CLOEXEC set: clear it with fcntl() to pass it across exec). Another
/// process that holds it can remem_attach() the heap, and the heap's
/// memory lives as long as some process holds it.
///
/// NULL: `heap` or `out_fd` NULL is REMEM_NULL_PARAMETER. Ownership: the
/// caller owns the descriptor and must close() it.
///
/// # Safety
///
/// `out_fd` must be NULL or valid for writing an int.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_memfd(heap: *mut remem_heap, out_fd: *mut c_int) -> remem_status {
    boundary("remem_memfd", |t| {
        let out = non_null(out_fd, "out_fd")?;
        let fd = handles::with_heap(t, heap, |h| {
            h.check_process()?;
            h.memfd().try_clone().map_err(|e| Fail::new(REMEM_IO, format!("duplicating the memfd: {e}")))
        })?;
        // SAFETY: not NULL; the caller guarantees it is valid for writes.
        unsafe { out.write(fd.into_raw_fd()) };
        Ok(())
    })
}

/// Returns in `*out` the handle of the heap opened through this C API in
/// this process whose address range contains `addr` (its base address,
/// or any address inside it), or REMEM_NOT_IN_HEAP when there is none. This is how data stored
/// in a heap finds the heap again after it was closed and reopened (the
/// C++ remem::persistent_allocator stores the heap's base address and
/// calls this).
///
/// NULL: `out` NULL is REMEM_NULL_PARAMETER; `addr` NULL is never in a
/// heap. Ownership: the handle is borrowed; it belongs to whoever opened
/// the heap.
///
/// # Safety
///
/// `out` must be NULL or valid for writing a pointer. `addr` is not dereferenced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_heap_at(addr: *const c_void, out: *mut *mut remem_heap) -> remem_status {
    boundary("remem_heap_at", |_| {
        // SAFETY: forwarded from the caller.
        let out = unsafe { clear_out(out, "out") }?;
        let h = handles::heap_at(addr as usize)
            .ok_or_else(|| Fail::new(REMEM_NOT_IN_HEAP, format!("no heap open in this process contains {addr:p}")))?;
        // SAFETY: checked for NULL; the caller guarantees it is writable.
        unsafe { out.write(h) };
        Ok(())
    })
}

/// Fills `*out` with the heap's statistics.
///
/// NULL: `heap` or `out` NULL is REMEM_NULL_PARAMETER. Ownership: `*out`
/// is the caller's.
///
/// # Safety
///
/// `out` must be NULL or valid for writing a remem_heap_stats.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_stats(heap: *mut remem_heap, out: *mut remem_heap_stats) -> remem_status {
    boundary("remem_stats", |t| {
        let out = non_null(out, "out")?;
        let stats = handles::with_heap(t, heap, |h| {
            h.check_process()?;
            let s = h.stats();
            Ok(remem_heap_stats {
                base: h.base().cast(),
                size: s.size,
                data_pages: s.data_pages,
                free_pages: s.free_pages,
                largest_free_run: s.largest_free_run,
            })
        })?;
        // SAFETY: not NULL; the caller guarantees it is valid for writes.
        unsafe { out.write(stats) };
        Ok(())
    })
}

/// Fills `*out` with what recovery did when the heap was opened or
/// attached.
///
/// NULL: `heap` or `out` NULL is REMEM_NULL_PARAMETER. Ownership: `*out`
/// is the caller's.
///
/// # Safety
///
/// `out` must be NULL or valid for writing a remem_recovery_report.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_recovery(heap: *mut remem_heap, out: *mut remem_recovery_report) -> remem_status {
    boundary("remem_recovery", |t| {
        let out = non_null(out, "out")?;
        let r = handles::with_heap(t, heap, |h| {
            h.check_process()?;
            let r = h.recovery_report();
            Ok(remem_recovery_report {
                txs_rolled_back: r.txs_rolled_back,
                txs_finished: r.txs_finished,
                undo_records_applied: r.undo_records_applied,
                tx_blocks_released: r.tx_blocks_released,
                allocs_completed: r.allocs_completed,
                allocs_rolled_back: r.allocs_rolled_back,
                cached_blocks_released: r.cached_blocks_released,
                allocated_blocks: r.allocated_blocks,
                large_runs: r.large_runs,
            })
        })?;
        // SAFETY: not NULL; the caller guarantees it is valid for writes.
        unsafe { out.write(r) };
        Ok(())
    })
}

fn report(out: *mut remem_check_report, r: &CheckReport) -> FfiResult {
    let c = remem_check_report {
        ok: r.is_ok(),
        problems: r.problems.len() as u64,
        slabs: r.slabs,
        allocated_blocks: r.allocated_blocks,
        large_runs: r.large_runs,
        allocated_bytes: r.allocated_bytes,
        cached_blocks: r.cached_blocks,
        free_pages: r.free_pages,
        leaked: r.leaked.len() as u64,
        doubly_owned: r.doubly_owned.len() as u64,
    };
    // SAFETY: the exported callers checked `out` for NULL and pass on
    // their callers' guarantee that it is valid for writes.
    unsafe { out.write(c) };
    if r.is_ok() {
        Ok(())
    } else {
        Err(Fail::new(REMEM_CORRUPT, r.to_string()))
    }
}

/// Validates every allocator invariant of the heap and fills `*out`.
/// Returns REMEM_OK when the heap is sound and REMEM_CORRUPT when not (with
/// `*out` filled in both cases, and every problem, one sentence each, in
/// remem_last_error()). Call it while no other thread uses the heap.
///
/// NULL: `heap` or `out` NULL is REMEM_NULL_PARAMETER. Ownership: `*out`
/// is the caller's.
///
/// # Safety
///
/// `out` must be NULL or valid for writing a remem_check_report.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_check(heap: *mut remem_heap, out: *mut remem_check_report) -> remem_status {
    boundary("remem_check", |t| {
        let out = non_null(out, "out")?;
        let r = handles::with_heap(t, heap, |h| {
            h.check_process()?;
            Ok(h.check())
        })?;
        report(out, &r)
    })
}

/// remem_check(), plus a leak check: `live[0..n]` lists every block the
/// program holds; allocated blocks not listed (nor the root object, nor
/// remem's own transaction logs) count as `leaked`, and pointers listed
/// twice or not allocated as `doubly_owned`. Either makes it REMEM_CORRUPT.
///
/// NULL: `heap` or `out` NULL is REMEM_NULL_PARAMETER; `live` may be NULL
/// when `n` is 0. Ownership: `live` is only read during the call.
///
/// # Safety
///
/// `live` must point to `n` readable pointers (or be NULL with `n` 0);
/// `out` must be NULL or valid for writing a remem_check_report.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_check_live(
    heap: *mut remem_heap,
    live: *const *const c_void,
    n: usize,
    out: *mut remem_check_report,
) -> remem_status {
    boundary("remem_check_live", |t| {
        let out = non_null(out, "out")?;
        let live: &[*const c_void] = if n == 0 {
            &[]
        } else {
            let live = non_null_const(live, "live")?;
            // SAFETY: not NULL; the caller guarantees `n` readable pointers.
            unsafe { std::slice::from_raw_parts(live, n) }
        };
        let r = handles::with_heap(t, heap, |h| {
            h.check_process()?;
            Ok(h.check_live(live.iter().map(|p| p.cast::<u8>())))
        })?;
        report(out, &r)
    })
}
