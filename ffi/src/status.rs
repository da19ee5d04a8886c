//! Status codes, the panic boundary and the thread-local last-error message.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::thread::{ThreadState, THREAD};
use remem_alloc::{AllocError, Error, Forked, OpenError, PointerError, TxError};

/// What a remem function did. Every function returns one; REMEM_OK (0) is
/// success, and for every other value remem_last_error() says more.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum remem_status {
    /// Success.
    REMEM_OK = 0,
    /// A pointer argument that must not be NULL was NULL.
    REMEM_NULL_PARAMETER = 1,
    /// remem panicked (a bug in remem, or a heap whose metadata was
    /// overwritten by the program); the message says where.
    REMEM_PANIC = 2,
    /// The heap has no free space large enough, or the size is larger than
    /// the heap. Nothing was allocated.
    REMEM_OUT_OF_MEMORY = 3,
    /// The pointer is inside the heap but is not the start of a block the
    /// heap handed out (or a range is not inside one allocated block).
    REMEM_INVALID_POINTER = 4,
    /// The block is already free.
    REMEM_DOUBLE_FREE = 5,
    /// The pointer is not inside this heap (it came from malloc, the stack,
    /// or another heap).
    REMEM_NOT_IN_HEAP = 6,
    /// An operating-system call failed (opening, reading or saving the image).
    REMEM_IO = 7,
    /// The heap image is damaged or not a remem heap, or remem_check found
    /// a broken invariant.
    REMEM_CORRUPT = 8,
    /// The heap's fixed address range is taken in this process (another
    /// open heap, or some other mapping), or no free range was found.
    REMEM_ADDRESS_IN_USE = 9,
    /// Another process has the heap open.
    REMEM_LOCKED = 10,
    /// remem_create was given a path that already exists.
    REMEM_EXISTS = 11,
    /// The call needs a transaction running on this thread and there is none.
    REMEM_NO_TRANSACTION = 12,
    /// The transaction was aborted (by remem_tx_abort at an inner level);
    /// it has been rolled back and can only be ended.
    REMEM_TX_ABORTED = 13,
    /// An argument is out of range: a zero size, an alignment that is not a
    /// power of two up to 4096, a heap size outside 1 MiB - 64 GiB, a bad
    /// base address or file descriptor, a range that wraps around.
    REMEM_BAD_ARGUMENT = 14,
    /// The remem_heap* is not an open heap (closed, never opened, or not a
    /// handle at all).
    REMEM_BAD_HANDLE = 15,
    /// The image uses a format version, or the system a page size, that
    /// this build does not support.
    REMEM_UNSUPPORTED = 16,
    /// Every private lane of the heap is taken: too many threads run
    /// transactions at once.
    REMEM_NO_LANE = 17,
    /// The undo log could not grow (the heap is full). The transaction was
    /// rolled back and is aborted: end each level with remem_tx_abort() (or
    /// remem_tx_commit(), which returns REMEM_TX_ABORTED).
    REMEM_TX_LOG_FULL = 18,
    /// Any other failure; remem_last_error() says what it was.
    REMEM_ERROR = 19,
    /// This process is a fork() of the one that opened the heap: an
    /// inherited heap cannot be used in the child (its memory is not mapped
    /// there; raw accesses to it fault), and every call with its handle
    /// fails with this status, remem_close() included (which then releases
    /// nothing the parent uses). Open the heap again in this process.
    /// Children that only exec (system, popen, posix_spawn) are unaffected.
    REMEM_FORKED = 20,
}

use remem_status::*;

/// A failed call: its status and what to tell the caller (see [`Failure`]).
/// Boxed, so that an [`FfiResult`] is a word or two and the calls' success
/// path passes it in registers, not through memory.
#[derive(Debug)]
pub(crate) struct Fail(Box<Failure>);

/// What a [`Fail`] holds.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) status: remem_status,
    pub(crate) msg: String,
}

impl std::ops::Deref for Fail {
    type Target = Failure;
    fn deref(&self) -> &Failure {
        &self.0
    }
}

/// The result of an exported function's body.
pub(crate) type FfiResult<T = ()> = Result<T, Fail>;

impl Fail {
    #[cold]
    pub(crate) fn new(status: remem_status, msg: impl Into<String>) -> Fail {
        Fail(Box::new(Failure { status, msg: msg.into() }))
    }

    /// A NULL argument named `what`.
    pub(crate) fn null(what: &str) -> Fail {
        Fail::new(REMEM_NULL_PARAMETER, format!("`{what}` is NULL"))
    }
}

fn alloc_status(e: &AllocError) -> remem_status {
    match e {
        AllocError::OutOfMemory { .. } => REMEM_OUT_OF_MEMORY,
        AllocError::BadSize(0) | AllocError::Alignment(_) => REMEM_BAD_ARGUMENT,
        AllocError::BadSize(_) => REMEM_OUT_OF_MEMORY,
        AllocError::BadDestination(_) => REMEM_INVALID_POINTER,
        AllocError::Forked(_) => REMEM_FORKED,
        _ => REMEM_ERROR,
    }
}

fn pointer_status(e: &PointerError) -> remem_status {
    match e {
        PointerError::NotInHeap(_) => REMEM_NOT_IN_HEAP,
        PointerError::NotABlock(_) => REMEM_INVALID_POINTER,
        PointerError::DoubleFree(_) => REMEM_DOUBLE_FREE,
        _ => REMEM_ERROR,
    }
}

fn open_status(e: &OpenError) -> remem_status {
    match e {
        OpenError::Io { .. } => REMEM_IO,
        OpenError::AlreadyExists(_) => REMEM_EXISTS,
        OpenError::BadSize { .. } | OpenError::BadBase(_) => REMEM_BAD_ARGUMENT,
        OpenError::AddressInUse { .. } | OpenError::NoAddress(_) => REMEM_ADDRESS_IN_USE,
        OpenError::PageSize(_) | OpenError::Version { .. } => REMEM_UNSUPPORTED,
        OpenError::Corrupt { .. } => REMEM_CORRUPT,
        OpenError::Locked(_) => REMEM_LOCKED,
        OpenError::Baseline { source, .. } => match source {
            remem_alloc::baseline::BaselineError::Io { .. } => REMEM_IO,
            _ => REMEM_CORRUPT,
        },
        OpenError::Track(_) => REMEM_UNSUPPORTED,
        _ => REMEM_ERROR,
    }
}

pub(crate) fn flush_status(e: &remem_alloc::FlushError) -> remem_status {
    match e {
        remem_alloc::FlushError::NoBaseline => REMEM_UNSUPPORTED,
        remem_alloc::FlushError::Forked(_) => REMEM_FORKED,
        _ => REMEM_IO,
    }
}

impl From<remem_alloc::FlushError> for Fail {
    fn from(e: remem_alloc::FlushError) -> Fail {
        Fail::new(flush_status(&e), e.to_string())
    }
}

/// The status of a heap error.
pub(crate) fn error_status(e: &Error) -> remem_status {
    match e {
        Error::Open(o) => open_status(o),
        Error::Alloc(a) => alloc_status(a),
        Error::Pointer(p) => pointer_status(p),
        Error::Flush(f) => flush_status(f),
        Error::Forked(_) => REMEM_FORKED,
        _ => REMEM_ERROR,
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail::new(error_status(&e), e.to_string())
    }
}

impl From<TxError> for Fail {
    fn from(e: TxError) -> Fail {
        let status = match &e {
            TxError::NoTransaction => REMEM_NO_TRANSACTION,
            TxError::Aborted => REMEM_TX_ABORTED,
            TxError::NoLane(_) => REMEM_NO_LANE,
            TxError::OutOfHeap { .. } => REMEM_INVALID_POINTER,
            TxError::LogFull(_) => REMEM_TX_LOG_FULL,
            TxError::Alloc(a) => alloc_status(a),
            TxError::Pointer(p) => pointer_status(p),
            TxError::Forked(_) => REMEM_FORKED,
            _ => REMEM_ERROR,
        };
        Fail::new(status, e.to_string())
    }
}

impl From<Forked> for Fail {
    fn from(e: Forked) -> Fail {
        Fail::new(REMEM_FORKED, e.to_string())
    }
}

thread_local! {
    /// The message of this thread's last failed call ("" after a success).
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

#[cold]
#[inline(never)]
fn set_last_error(t: &ThreadState, msg: String) {
    let msg = CString::new(msg.replace('\0', "\\0")).expect("NULs were replaced");
    if LAST_ERROR.try_with(|l| *l.borrow_mut() = msg).is_ok() {
        t.has_error.set(true);
    }
}

#[cold]
#[inline(never)]
fn clear_last_error(t: &ThreadState) {
    t.has_error.set(false);
    let _ = LAST_ERROR.try_with(|l| *l.borrow_mut() = CString::default());
}

/// The panic boundary every exported function runs its body behind: a
/// `Fail` or a panic becomes a status and this thread's last-error message
/// (prefixed with the function's name); success clears the message. The
/// body gets the calling thread's state (looked up once per call).
#[inline(always)]
pub(crate) fn boundary(name: &str, body: impl FnOnce(&ThreadState) -> FfiResult) -> remem_status {
    let t = THREAD.with(|t| t as *const ThreadState);
    // SAFETY: THREAD has no destructor, so this thread's instance lives as
    // long as the thread, which outlives this call.
    let t = unsafe { &*t };
    match catch_unwind(AssertUnwindSafe(|| body(t))) {
        Ok(Ok(())) => {
            if t.has_error.get() {
                clear_last_error(t);
            }
            REMEM_OK
        }
        Ok(Err(fail)) => failed(t, name, fail),
        Err(payload) => panicked(t, name, payload),
    }
}

#[cold]
#[inline(never)]
fn failed(t: &ThreadState, name: &str, fail: Fail) -> remem_status {
    set_last_error(t, format!("{name}: {}", fail.msg));
    fail.status
}

#[cold]
#[inline(never)]
fn panicked(t: &ThreadState, name: &str, payload: Box<dyn std::any::Any + Send>) -> remem_status {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-string payload".into());
    // Dropping a payload can itself panic; keep it out of the way.
    std::mem::forget(payload);
    set_last_error(t, format!("{name}: panic inside remem: {what}"));
    REMEM_PANIC
}

/// The message of the last failed remem call on this thread, or "" when
/// the last call succeeded. Never NULL. The string belongs to remem and
/// stays valid until this thread next calls a remem function that returns a
/// remem_status (copy it to keep it).
#[unsafe(no_mangle)]
pub extern "C" fn remem_last_error() -> *const c_char {
    LAST_ERROR.try_with(|l| l.borrow().as_ptr()).unwrap_or(c"remem: thread is exiting".as_ptr())
}

/// The name of a status code ("REMEM_OK", "REMEM_DOUBLE_FREE", ...), or
/// "REMEM_UNKNOWN_STATUS" for a value that is not one. Never NULL; the
/// string is static.
#[unsafe(no_mangle)]
pub extern "C" fn remem_status_name(status: c_int) -> *const c_char {
    let name = match status {
        0 => c"REMEM_OK",
        1 => c"REMEM_NULL_PARAMETER",
        2 => c"REMEM_PANIC",
        3 => c"REMEM_OUT_OF_MEMORY",
        4 => c"REMEM_INVALID_POINTER",
        5 => c"REMEM_DOUBLE_FREE",
        6 => c"REMEM_NOT_IN_HEAP",
        7 => c"REMEM_IO",
        8 => c"REMEM_CORRUPT",
        9 => c"REMEM_ADDRESS_IN_USE",
        10 => c"REMEM_LOCKED",
        11 => c"REMEM_EXISTS",
        12 => c"REMEM_NO_TRANSACTION",
        13 => c"REMEM_TX_ABORTED",
        14 => c"REMEM_BAD_ARGUMENT",
        15 => c"REMEM_BAD_HANDLE",
        16 => c"REMEM_UNSUPPORTED",
        17 => c"REMEM_NO_LANE",
        18 => c"REMEM_TX_LOG_FULL",
        19 => c"REMEM_ERROR",
        20 => c"REMEM_FORKED",
        _ => c"REMEM_UNKNOWN_STATUS",
    };
    name.as_ptr()
}

/// The library's version ("0.1.0"). Never NULL; the string is static.
#[unsafe(no_mangle)]
pub extern "C" fn remem_version() -> *const c_char {
    const V: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    V.as_ptr().cast()
}

/// `p`, or REMEM_NULL_PARAMETER naming `what`.
pub(crate) fn non_null<T>(p: *mut T, what: &str) -> FfiResult<*mut T> {
    if p.is_null() {
        Err(Fail::null(what))
    } else {
        Ok(p)
    }
}

/// `p`, or REMEM_NULL_PARAMETER naming `what`.
pub(crate) fn non_null_const<T>(p: *const T, what: &str) -> FfiResult<*const T> {
    if p.is_null() {
        Err(Fail::null(what))
    } else {
        Ok(p)
    }
}

/// Checks a pointer out-parameter and sets it to NULL, so that it is NULL
/// if the call fails.
///
/// # Safety
///
/// `out`, when not NULL, must be valid for writing a pointer.
pub(crate) unsafe fn clear_out<T>(out: *mut *mut T, what: &str) -> FfiResult<*mut *mut T> {
    let out = non_null(out, what)?;
    // SAFETY: not NULL, and the caller guarantees it is valid for writes.
    unsafe { out.write(std::ptr::null_mut()) };
    Ok(out)
}
