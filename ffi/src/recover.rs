//! Recovery of a heap on another host, through the C ABI.

use std::ffi::{c_char, CStr};
use std::time::Duration;

use remem_alloc::TrackMode;
use remem_recovery::recover::{recover, RecoverError, RecoverOptions};
use remem_recovery::transport::Token;

use crate::handles::{remem_heap, with_heap};
use crate::heap::{open_handle, path_named};
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
        let opts = remem_recover_options {
            size: std::mem::size_of::<remem_recover_options>(),
            baseline,
            agent,
            allow_data_loss,
            lazy: 0,
            precise: 0,
            wait_sealed_ms: 0,
        };
        // SAFETY: forwarded from the caller.
        unsafe { recover_with(&opts, out, report) }
    })
}

/// How remem_recover_with() recovers. Zero-initialise it, set `size` to
/// `sizeof(remem_recover_options)` and `baseline`, and change what you need:
/// zero means the default for every other field.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct remem_recover_options {
    /// `sizeof(remem_recover_options)` from the remem.h the caller was built
    /// with; another size (a header of another version) is refused.
    pub size: usize,
    /// The heap's baseline file (required).
    pub baseline: *const c_char,
    /// The failed host's agent, "host:port"; NULL for none. The token comes
    /// from REMEM_TOKEN (or the file REMEM_TOKEN_FILE names).
    pub agent: *const c_char,
    /// Non-zero: without a reachable agent, recover from the baseline alone
    /// (losing what was newer; `report->rpo_ns` says how much time).
    pub allow_data_loss: i32,
    /// Non-zero: lazy recovery. The heap is returned open as soon as the
    /// pages its own recovery needs are in; every other page arrives on
    /// first touch or from a background prefetcher, and the recovered state
    /// is committed once every page is in (remem_lazy_wait()). A page that
    /// no source can supply is poisoned: touching it raises SIGBUS, never
    /// wrong bytes.
    pub lazy: i32,
    /// Non-zero: the recovered heap tracks writes in precise mode (default:
    /// fast).
    pub precise: i32,
    /// How long to wait for the agent to seal the old owner's lists, in
    /// milliseconds (0: 10 000).
    pub wait_sealed_ms: u32,
}

/// remem_recover() with options (`opts`): lazy recovery, the recovered
/// heap's tracking mode, how long to wait for the agent. When
/// REMEM_AGENT_SOCKET is set, the recovered heap is registered with the
/// agent on this host, so it is protected here too.
///
/// NULL: `opts`, `opts->baseline` or `out` NULL is REMEM_NULL_PARAMETER;
/// `report` NULL means no report. A `size` other than this library's
/// `sizeof(remem_recover_options)` is REMEM_BAD_ARGUMENT.
/// Ownership: as remem_recover(). For a lazy recovery, `report` says what
/// was planned (`pages_pulled` pages are to come from the agent) and
/// `committed_epoch` is 0 until remem_lazy_wait() returns.
///
/// # Safety
///
/// `opts` must be NULL or point to a remem_recover_options of at least
/// `opts->size` bytes whose strings are NULL or NUL-terminated; `out` and
/// `report` as for remem_recover().
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_recover_with(
    opts: *const remem_recover_options,
    out: *mut *mut remem_heap,
    report: *mut remem_recover_report,
) -> remem_status {
    boundary("remem_recover_with", |_| {
        let opts = crate::status::non_null_const(opts, "opts")?;
        // SAFETY: not NULL; the caller guarantees `size` readable bytes, and
        // `size` is the first field.
        let size = unsafe { std::ptr::addr_of!((*opts).size).read_unaligned() };
        let ours = std::mem::size_of::<remem_recover_options>();
        if size != ours {
            return Err(Fail::new(
                REMEM_BAD_ARGUMENT,
                format!(
                    "opts->size is {size}, this libremem's remem_recover_options is {ours} bytes: set it to \
                     sizeof(remem_recover_options) from the remem.h you build with"
                ),
            ));
        }
        // SAFETY: the caller's struct has our size.
        let opts = unsafe { opts.read() };
        // SAFETY: forwarded from the caller.
        unsafe { recover_with(&opts, out, report) }
    })
}

/// # Safety
///
/// The strings of `o` NULL or NUL-terminated; `out` and `report` as for
/// remem_recover().
unsafe fn recover_with(
    o: &remem_recover_options,
    out: *mut *mut remem_heap,
    report: *mut remem_recover_report,
) -> crate::status::FfiResult {
    // SAFETY: forwarded from the caller.
    let path = unsafe { path_named(o.baseline, "baseline") }?.to_owned();
    let agent = if o.agent.is_null() {
        None
    } else {
        // SAFETY: not NULL; the caller guarantees a NUL-terminated string.
        let s = unsafe { CStr::from_ptr(o.agent) }.to_string_lossy().into_owned();
        Some(s.parse().map_err(|e| Fail::new(REMEM_BAD_ARGUMENT, format!("agent address {s:?}: {e}")))?)
    };
    let token = match agent {
        Some(_) => Some(Token::from_env().map_err(|e| Fail::new(REMEM_BAD_ARGUMENT, e.to_string()))?),
        None => None,
    };
    let mut opts = RecoverOptions::new(path, agent, token);
    opts.allow_data_loss = o.allow_data_loss != 0;
    opts.lazy = o.lazy != 0;
    if o.precise != 0 {
        opts.tracking = TrackMode::Precise;
    }
    if o.wait_sealed_ms != 0 {
        opts.wait_sealed = Duration::from_millis(o.wait_sealed_ms.into());
    }
    let mut rep = None;
    // SAFETY: forwarded from the caller.
    unsafe {
        open_handle(out, || {
            let (heap, r) = recover(opts).map_err(|e| Fail::new(recover_status(&e), e.to_string()))?;
            rep = Some(r);
            crate::agent::insert_recovered(heap)
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
}

/// Where the loading of a lazily recovered heap stands (remem_lazy_progress()
/// and remem_lazy_wait()).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct remem_lazy_status {
    /// Pages in the heap.
    pub pages: u64,
    /// Pages installed in memory.
    pub resident: u64,
    /// Pages known to be zero (installed on first touch).
    pub zero: u64,
    /// Pages poisoned: no source held a current copy; touching one raises
    /// SIGBUS (the first of them are named in remem_last_error() after
    /// remem_lazy_wait()).
    pub poisoned: u64,
    /// Missing-page faults served so far.
    pub faults: u64,
    /// Nanoseconds from the start of the recovery's load to every page
    /// settled (0 until then).
    pub load_ns: u64,
    /// Epoch of the commit of the recovered state (0 until it is durable).
    pub committed_epoch: u64,
    /// 1 once every page is resident, zero or poisoned.
    pub settled: u8,
}

fn lazy_out(s: &remem_alloc::lazy::LazyStatus) -> remem_lazy_status {
    remem_lazy_status {
        pages: s.pages,
        resident: s.resident,
        zero: s.zero,
        poisoned: s.poisoned,
        faults: s.faults,
        load_ns: s.load_time.map_or(0, |d| d.as_nanos() as u64),
        committed_epoch: s.committed_epoch.unwrap_or(0),
        settled: u8::from(s.settled),
    }
}

fn not_lazy() -> Fail {
    Fail::new(REMEM_BAD_ARGUMENT, "the heap was not recovered lazily (remem_recover_with() with lazy set)")
}

/// Writes in `*out` where the loading of a lazily recovered heap stands,
/// without waiting. REMEM_BAD_ARGUMENT for a heap not recovered lazily.
///
/// NULL: `heap` or `out` NULL is REMEM_NULL_PARAMETER.
///
/// # Safety
///
/// `out` must be NULL or valid for writing a remem_lazy_status.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_lazy_progress(heap: *mut remem_heap, out: *mut remem_lazy_status) -> remem_status {
    boundary("remem_lazy_progress", |t| {
        let out = crate::status::non_null(out, "out")?;
        let s = with_heap(t, heap, |h| h.lazy_status().ok_or_else(not_lazy))?;
        // SAFETY: not NULL; the caller guarantees it is writable.
        unsafe { out.write(lazy_out(&s)) };
        Ok(())
    })
}

/// Blocks until every page of a lazily recovered heap is in and the
/// recovered state is committed to the baseline, then writes the final
/// status in `*out` (NULL: not wanted). With REMEM_AGENT_SOCKET set, the
/// heap is then registered with the agent on this host. REMEM_IO when loading or the
/// commit failed (remem_last_error() says why; the heap stays open and
/// the baseline keeps its previous commit); REMEM_CORRUPT when pages were
/// poisoned (they are named in remem_last_error(); every other page is in
/// and committed; the heap is then not registered with an agent). REMEM_BAD_ARGUMENT for a heap not recovered lazily.
///
/// NULL: `heap` NULL is REMEM_NULL_PARAMETER.
///
/// # Safety
///
/// `out` must be NULL or valid for writing a remem_lazy_status.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_lazy_wait(heap: *mut remem_heap, out: *mut remem_lazy_status) -> remem_status {
    boundary("remem_lazy_wait", |t| {
        let s = with_heap(t, heap, |h| {
            h.check_process()?;
            let s = h.wait_lazy().ok_or_else(not_lazy)?;
            if s.failed.is_none() && s.poisoned == 0 {
                crate::agent::register_loaded(heap, h)?;
            }
            Ok(s)
        })?;
        if !out.is_null() {
            // SAFETY: not NULL; the caller guarantees it is writable.
            unsafe { out.write(lazy_out(&s)) };
        }
        if let Some(why) = &s.failed {
            return Err(Fail::new(REMEM_IO, format!("lazy loading failed: {why}")));
        }
        if s.poisoned > 0 {
            return Err(Fail::new(
                REMEM_CORRUPT,
                format!(
                    "{} pages could not be read from any source and are poisoned (touching them raises SIGBUS); the \
                     first of them: {:?}",
                    s.poisoned,
                    &s.poisoned_pages[..s.poisoned_pages.len().min(32)]
                ),
            ));
        }
        Ok(())
    })
}
