//! The agent, through the C ABI: a heap registered with the local agent
//! (`remem agent`) keeps its memory alive when the process dies, so it can
//! be re-attached on this host (remem_reattach()) or recovered on another
//! (remem_recover()).
//!
//! Each registered heap keeps its connection to the agent (an
//! [`AgentLink`]) in a table keyed by its handle, touched only when a heap
//! is registered or closed, never on the calls' path. remem_close() tells
//! the agent the heap was closed cleanly after its last flush succeeded;
//! if the flush failed, the connection just ends and the agent keeps the
//! memory, as it does when the process dies.
//!
//! With `REMEM_AGENT_SOCKET` set in the environment, remem_create(),
//! remem_open() and remem_recover() register the heap on their own (and
//! remem_open() first takes back a heap the agent holds after a crash), so
//! an existing program gets failover protection without a code change.

use std::ffi::{c_char, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use remem_alloc::{Heap, HeapOptions};
use remem_recovery::agent::{self, AgentError, AgentLink};

use crate::handles::{self, remem_heap};
use crate::heap::path_named;
use crate::status::remem_status::{self, *};
use crate::status::{boundary, clear_out, Fail, FfiResult};

/// The environment variable naming the agent's socket for automatic
/// registration.
pub const SOCKET_ENV: &str = "REMEM_AGENT_SOCKET";

/// The agent connections of registered heaps, by handle.
static LINKS: Mutex<Vec<(usize, AgentLink)>> = Mutex::new(Vec::new());

fn links() -> std::sync::MutexGuard<'static, Vec<(usize, AgentLink)>> {
    LINKS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Keeps `link` for the heap behind `h` until it is closed.
fn keep(h: *mut remem_heap, link: AgentLink) {
    links().push((h as usize, link));
}

fn is_registered(h: *mut remem_heap) -> bool {
    links().iter().any(|(k, _)| *k == h as usize)
}

/// The agent connection of the heap behind `h`, taken out of the table
/// (by remem_close()).
pub(crate) fn take_link(h: *mut remem_heap) -> Option<AgentLink> {
    let mut l = links();
    let i = l.iter().position(|(k, _)| *k == h as usize)?;
    Some(l.swap_remove(i).1)
}

fn agent_status(e: &AgentError) -> remem_status {
    match e {
        AgentError::Heap(e) => crate::status::error_status(e),
        AgentError::NoBaseline => REMEM_UNSUPPORTED,
        AgentError::StillLoading { .. } => REMEM_BAD_ARGUMENT,
        AgentError::NotAllowed(_) => REMEM_LOCKED,
        AgentError::Refused(_) | AgentError::NothingHeld(_) => REMEM_LOCKED,
        _ => REMEM_IO,
    }
}

fn agent_fail(socket: &Path, e: AgentError) -> Fail {
    Fail::new(agent_status(&e), format!("agent at {}: {e}", socket.display()))
}

/// The socket `REMEM_AGENT_SOCKET` names, if it is set (and not empty).
fn socket_from_env() -> Option<PathBuf> {
    std::env::var_os(SOCKET_ENV).filter(|s| !s.is_empty()).map(|s: OsString| PathBuf::from(s))
}

/// remem_create(): a new heap, registered when `REMEM_AGENT_SOCKET` is
/// set. A failed registration removes the file just created (nothing was
/// in it), so the call can be retried.
pub(crate) fn create(path: &Path, opts: &HeapOptions) -> FfiResult<*mut remem_heap> {
    let heap = Heap::create(path, opts)?;
    let Some(socket) = socket_from_env() else { return handles::insert(heap) };
    match agent::register(&heap, &socket) {
        Ok(link) => {
            let h = handles::insert(heap)?;
            keep(h, link);
            Ok(h)
        }
        Err(e) => {
            let fail = agent_fail(&socket, e);
            drop(heap.close());
            let _ = std::fs::remove_file(path);
            Err(Fail::new(
                fail.status,
                format!(
                    "{} (set by {SOCKET_ENV}; unset it to run without an agent); {} was not created",
                    fail.msg,
                    path.display()
                ),
            ))
        }
    }
}

/// remem_open(): with `REMEM_AGENT_SOCKET` set, takes back the heap's
/// memory from the agent when it holds it (the last process died), else
/// opens the baseline and registers the heap.
pub(crate) fn open(path: &Path) -> FfiResult<*mut remem_heap> {
    let Some(socket) = socket_from_env() else { return handles::insert(Heap::open(path)?) };
    let (heap, link, _) = agent::open_registered(&socket, path, &HeapOptions::new(0)).map_err(|e| {
        let f = agent_fail(&socket, e);
        Fail::new(f.status, format!("{} (set by {SOCKET_ENV}; unset it to run without an agent)", f.msg))
    })?;
    let h = handles::insert(heap)?;
    keep(h, link);
    Ok(h)
}

/// A heap remem_recover() returns: registered when `REMEM_AGENT_SOCKET`
/// is set, so that it is protected on its new host too. A lazily
/// recovered heap is registered by remem_lazy_wait() instead, once every
/// page is in and committed (the agent must not serve missing pages).
pub(crate) fn insert_recovered(heap: Heap) -> FfiResult<*mut remem_heap> {
    let socket = socket_from_env().filter(|_| heap.lazy_status().is_none());
    let link = match &socket {
        Some(s) => Some(agent::register(&heap, s).map_err(|e| {
            let f = agent_fail(s, e);
            Fail::new(
                f.status,
                format!(
                    "the heap was recovered and committed, but registering it failed: {} (set by {SOCKET_ENV}); \
                     it is closed again: open it with remem_open()",
                    f.msg
                ),
            )
        })?),
        None => None,
    };
    let h = handles::insert(heap)?;
    if let Some(link) = link {
        keep(h, link);
    }
    Ok(h)
}

/// After remem_lazy_wait() succeeded: registers the heap when
/// `REMEM_AGENT_SOCKET` is set and it is not registered yet.
pub(crate) fn register_loaded(h: *mut remem_heap, heap: &Heap) -> FfiResult {
    let Some(socket) = socket_from_env() else { return Ok(()) };
    if is_registered(h) {
        return Ok(());
    }
    let link = agent::register(heap, &socket).map_err(|e| {
        let f = agent_fail(&socket, e);
        Fail::new(
            f.status,
            format!("every page is in and committed, but registering the heap failed: {} (set by {SOCKET_ENV})", f.msg),
        )
    })?;
    keep(h, link);
    Ok(())
}

/// Registers the heap with the agent listening on the Unix socket
/// `socket` (`remem agent --socket PATH`): the agent takes a descriptor of
/// the heap's memory and of its control region, so both outlive this
/// process. If the process dies, the agent seals the heap's lists and
/// keeps its memory for remem_reattach() on this host or remem_recover()
/// on another. Only heaps with a baseline file can be registered; a heap
/// is registered at most once (REMEM_EXISTS otherwise). remem_close()
/// ends the registration.
///
/// REMEM_LOCKED: the agent refused (another live process registered this
/// heap, or this user may not use the agent); REMEM_IO: no agent listens
/// on `socket`; REMEM_UNSUPPORTED: a memfd-only heap.
///
/// NULL: `heap` or `socket` NULL is REMEM_NULL_PARAMETER. Ownership:
/// `socket` is only read during the call.
///
/// # Safety
///
/// `socket` must be NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_agent_register(heap: *mut remem_heap, socket: *const c_char) -> remem_status {
    boundary("remem_agent_register", |t| {
        // SAFETY: forwarded from the caller.
        let socket = unsafe { path_named(socket, "socket") }?.to_owned();
        let link = handles::with_heap(t, heap, |h| {
            if is_registered(heap) {
                return Err(Fail::new(REMEM_EXISTS, "the heap is registered with an agent already"));
            }
            agent::register(h, &socket).map_err(|e| agent_fail(&socket, e))
        })?;
        keep(heap, link);
        Ok(())
    })
}

/// Restarts a database on the same host after its process died: takes
/// the heap of `baseline` back from the agent on `socket` (the heap's
/// memory itself, nothing copied and nothing lost: the newest state, not
/// the baseline's), flushes the pages the dead process left unflushed,
/// registers this process as the heap's owner, and returns its handle in
/// `*out`. The heap is registered: remem_close() ends that.
///
/// REMEM_LOCKED: the agent holds no copy newer than the baseline (open
/// the baseline with remem_open()), or the heap's process still runs, or
/// it belongs to another user; REMEM_IO: no agent listens on `socket`.
///
/// NULL: any argument NULL is REMEM_NULL_PARAMETER. Ownership: strings
/// are only read; the caller owns the handle and must remem_close() it.
///
/// # Safety
///
/// `socket` and `baseline` must be NULL or NUL-terminated strings; `out`
/// NULL or valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remem_reattach(
    socket: *const c_char,
    baseline: *const c_char,
    out: *mut *mut remem_heap,
) -> remem_status {
    boundary("remem_reattach", |_| {
        // SAFETY: forwarded from the caller.
        let out = unsafe { clear_out(out, "out") }?;
        // SAFETY: forwarded from the caller.
        let socket = unsafe { path_named(socket, "socket") }?.to_owned();
        // SAFETY: forwarded from the caller.
        let baseline = unsafe { path_named(baseline, "baseline") }?.to_owned();
        let (heap, link) =
            agent::reattach(&socket, &baseline, &HeapOptions::new(0)).map_err(|e| agent_fail(&socket, e))?;
        let h = handles::insert(heap)?;
        keep(h, link);
        // SAFETY: checked for NULL; the caller guarantees it is writable.
        unsafe { out.write(h) };
        Ok(())
    })
}
