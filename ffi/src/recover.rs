//! Recovery of a heap on another host, through the C ABI.

use std::ffi::{c_char, CStr};

use remem_recovery::recover::{recover, RecoverError, RecoverOptions};
use remem_recovery::transport::Token;

use crate::handles::remem_heap;
use crate::heap::{open_with, path_arg};
use crate::status::remem_status::{self, *};
use crate::status::{boundary, Fail};

/// What remem_recover() did.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct remem_recover_report {
    /// Pages loaded from the baseline.
    pub pages_from_baseline: u64,
    /// Pages pulled from the failed host's agent.
    pub pages_pulled: u64,
    /// Transactions in flight rolled back.
    pub txs_rolled_back: u64,
    /// Epoch of the commit that holds the recovered heap.
    pub committed_epoch: u64,
    /// Generation the old owner was fenced with.
    pub generation: u64,
    /// Nanoseconds of updates that may be lost (0 when the pages were pulled).
    pub rpo_ns: u64,
    /// 1 when the heap came from the baseline alone.
    pub baseline_only: u8,
    /// 1 when the recovered image equalled the agent's memory (BLAKE3).
    pub image_identical: u8,
}

fn recover_status(e: &RecoverError) -> remem_status {
    match e {
        RecoverError::AgentUnreachable { .. } | RecoverError::Baseline { .. } => REMEM_IO,
        RecoverError::NoAgent | RecoverError::NoToken => REMEM_BAD_ARGUMENT,
        RecoverError::OwnerAlive { .. } => REMEM_TX_ABORTED,
        RecoverError::Heap(e) => crate::status::error_status(e),
        _ => REMEM_ERROR,
    }
}

/// Rebuilds the heap whose baseline is `baseline` on this host: loads the
/// baseline, pulls the pages newer than it from the failed host's agent at
/// `agent` ("host:port"; the token comes from the REMEM_TOKEN environment
/// variable), fences the old owner, rolls back transactions in flight,
/// commits the result to the baseline, and returns the open heap in `*out`.
/// With `agent` NULL (or unreachable), recovery from the baseline alone
/// happens only when `allow_data_loss` is non-zero; `report->rpo_ns` then
/// says how old it was.
///
/// NULL: `baseline` or `out` NULL is REMEM_NULL_PARAMETER; `agent` NULL means
/// no agent; `report` NULL means no report. Ownership: strings are only
/// read; the caller owns the handle and must remem_close() it.
/// REMEM_TX_ABORTED: the database still runs on the source host.
///
/// # Safety
///
/// `baseline` and `agent` must be NULL or NUL-terminated strings; `out` NULL
/// or valid for writing a pointer; `report` NULL or valid for writing a
/// remem_recover_report.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_recover(
    baseline: *const c_char,
    agent: *const c_char,
    allow_data_loss: i32,
    out: *mut *mut remem_heap,
    report: *mut remem_recover_report,
) -> remem_status {
    boundary("remem_recover", |_| {
        // SAFETY: forwarded from the caller.
        let path = unsafe { path_arg(baseline) }?.to_owned();
        let agent = if agent.is_null() {
            None
        } else {
            // SAFETY: not NULL; the caller guarantees a NUL-terminated string.
            let s = unsafe { CStr::from_ptr(agent) }.to_string_lossy().into_owned();
            Some(s.parse().map_err(|e| Fail::new(REMEM_BAD_ARGUMENT, format!("agent address {s:?}: {e}")))?)
        };
        let token = match agent {
            Some(_) => Some(Token::from_env().map_err(|e| Fail::new(REMEM_BAD_ARGUMENT, e.to_string()))?),
            None => None,
        };
        let mut opts = RecoverOptions::new(path, agent, token);
        opts.allow_data_loss = allow_data_loss != 0;
        let mut rep = None;
        // SAFETY: forwarded from the caller.
        unsafe {
            open_with(out, || {
                let (heap, r) = recover(opts).map_err(|e| Fail::new(recover_status(&e), e.to_string()))?;
                rep = Some(r);
                Ok(heap)
            })
        }?;
        if let (false, Some(r)) = (report.is_null(), rep) {
            let c = remem_recover_report {
                pages_from_baseline: r.pages_from_baseline,
                pages_pulled: r.pages_pulled,
                txs_rolled_back: r.txs_rolled_back,
                committed_epoch: r.committed_epoch,
                generation: r.generation,
                rpo_ns: (r.rpo_seconds * 1e9) as u64,
                baseline_only: u8::from(r.baseline_only),
                image_identical: u8::from(r.image_identical == Some(true)),
            };
            // SAFETY: not NULL; the caller guarantees it is writable.
            unsafe { report.write(c) };
        }
        Ok(())
    })
}
