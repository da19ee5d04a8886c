//! Durability: flush, wait for an epoch, statistics.

use crate::handles;
use crate::status::{boundary, non_null, remem_status, Fail};

/// Durability statistics of a heap with a baseline.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct remem_flush_stats {
    /// The epoch writes land in now.
    pub current_epoch: u64,
    /// The last epoch durable in the baseline.
    pub committed_epoch: u64,
    /// Pages known to differ from the baseline now.
    pub dirty_pages: u64,
    /// Flushes committed since the heap was opened.
    pub flushes: u64,
    /// Bytes written to the baseline since the heap was opened.
    pub bytes_flushed: u64,
    /// Nanoseconds since the last commit (what a host failure would lose).
    pub rpo_lag_ns: u64,
    /// Pause of the last flush, nanoseconds.
    pub last_pause_ns: u64,
    /// Median pause of recent flushes, nanoseconds.
    pub pause_p50_ns: u64,
    /// 99th percentile pause of recent flushes, nanoseconds.
    pub pause_p99_ns: u64,
    /// 1 when durability is poisoned (a flush failed; reopen the heap).
    pub poisoned: u8,
}

/// Flushes every page changed since the last flush to the baseline and
/// stores the epoch now durable in `*epoch` (which may be NULL).
///
/// NULL: `heap` NULL is REMEM_NULL_PARAMETER. A memfd-only heap gives
/// REMEM_UNSUPPORTED; a failed write or sync gives REMEM_IO and poisons
/// durability (every later flush fails; the baseline keeps the last commit).
///
/// # Safety
///
/// `epoch` must be NULL or valid for writing a u64.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_flush(heap: *mut crate::handles::remem_heap, epoch: *mut u64) -> remem_status {
    boundary("remem_flush", |t| {
        let e = handles::with_heap(t, heap, |h| h.flush().map_err(Fail::from))?;
        if !epoch.is_null() {
            // SAFETY: not NULL; the caller guarantees it is writable.
            unsafe { epoch.write(e) };
        }
        Ok(())
    })
}

/// Blocks until flush epoch `epoch` is durable in the baseline.
///
/// NULL: `heap` NULL is REMEM_NULL_PARAMETER. REMEM_IO when durability is
/// poisoned; REMEM_UNSUPPORTED for a memfd-only heap.
///
/// # Safety
///
/// None beyond passing a handle or NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_wait_durable(heap: *mut crate::handles::remem_heap, epoch: u64) -> remem_status {
    boundary("remem_wait_durable", |t| handles::with_heap(t, heap, |h| h.wait_durable(epoch).map_err(Fail::from)))
}

/// Stores in `*epoch` the epoch that writes made now belong to: they are
/// durable once remem_wait_durable(heap, *epoch) returns REMEM_OK.
///
/// NULL: `heap` or `epoch` NULL is REMEM_NULL_PARAMETER.
///
/// # Safety
///
/// `epoch` must be NULL or valid for writing a u64.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_current_epoch(heap: *mut crate::handles::remem_heap, epoch: *mut u64) -> remem_status {
    boundary("remem_current_epoch", |t| {
        let out = non_null(epoch, "epoch")?;
        let e = handles::with_heap(t, heap, |h| h.current_epoch().map_err(Fail::from))?;
        // SAFETY: not NULL; the caller guarantees it is writable.
        unsafe { out.write(e) };
        Ok(())
    })
}

/// Fills `*out` with the heap's durability statistics.
///
/// NULL: `heap` or `out` NULL is REMEM_NULL_PARAMETER. REMEM_UNSUPPORTED
/// for a memfd-only heap. Ownership: `*out` is the caller's.
///
/// # Safety
///
/// `out` must be NULL or valid for writing a remem_flush_stats.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_durability(
    heap: *mut crate::handles::remem_heap,
    out: *mut remem_flush_stats,
) -> remem_status {
    boundary("remem_durability", |t| {
        let out = non_null(out, "out")?;
        let s = handles::with_heap(t, heap, |h| {
            h.check_process()?;
            h.flush_stats().ok_or_else(|| Fail::from(remem_alloc::FlushError::NoBaseline))
        })?;
        let ns = |d: std::time::Duration| d.as_nanos().min(u128::from(u64::MAX)) as u64;
        let st = remem_flush_stats {
            current_epoch: s.current_epoch,
            committed_epoch: s.committed_epoch,
            dirty_pages: s.dirty_pages,
            flushes: s.flushes,
            bytes_flushed: s.bytes_flushed,
            rpo_lag_ns: ns(s.rpo_lag),
            last_pause_ns: ns(s.last_pause),
            pause_p50_ns: ns(s.pause_p50),
            pause_p99_ns: ns(s.pause_p99),
            poisoned: u8::from(s.poisoned.is_some()),
        };
        // SAFETY: not NULL; the caller guarantees it is valid for writes.
        unsafe { out.write(st) };
        Ok(())
    })
}
