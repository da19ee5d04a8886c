//! PMDK's libpmemobj (Debian's `libpmemobj-dev`, 1.12): a pool on /dev/shm,
//! persistent allocations through `pmemobj_alloc` / `pmemobj_free`, and
//! transactions through the functions under the `TX_BEGIN`/`TX_END` macros
//! (`pmemobj_tx_begin` with a NULL `jmp_buf`, so a failing call aborts the
//! transaction and returns an error instead of jumping; `pmemobj_tx_commit`;
//! `pmemobj_tx_end`).
//!
//! The pool is treated as persistent memory because `main` sets
//! `PMEM_IS_PMEM_FORCE=1` before any thread starts (without it every persist
//! on a tmpfs pool would be an msync). The pool file has a unique name and is
//! removed when the peer is dropped.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr;

use super::{Peer, TxPeer};

/// Size of the pool: room for both threads' working sets many times over.
const POOL_SIZE: usize = 256 << 20;
/// Where pools go: tmpfs, so that PMDK is measured and not a disk.
const POOL_DIR: &str = "/dev/shm";

/// `PMEMoid` from `<libpmemobj/base.h>`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct PmemOid {
    pool_uuid_lo: u64,
    off: u64,
}

/// Opaque `PMEMobjpool`.
#[repr(C)]
struct PmemObjPool {
    _opaque: [u8; 0],
}

type Constructor = unsafe extern "C" fn(pop: *mut PmemObjPool, ptr: *mut c_void, arg: *mut c_void) -> c_int;

#[link(name = "pmemobj")]
extern "C" {
    fn pmemobj_create(
        path: *const c_char,
        layout: *const c_char,
        poolsize: usize,
        mode: libc::mode_t,
    ) -> *mut PmemObjPool;
    fn pmemobj_close(pop: *mut PmemObjPool);
    fn pmemobj_alloc(
        pop: *mut PmemObjPool,
        oidp: *mut PmemOid,
        size: usize,
        type_num: u64,
        constructor: Option<Constructor>,
        arg: *mut c_void,
    ) -> c_int;
    fn pmemobj_free(oidp: *mut PmemOid);
    fn pmemobj_errormsg() -> *const c_char;
    // `jmp_buf env` decays to a pointer; the variadic part is a list of
    // `enum pobj_tx_param` (C `int`) arguments ending with TX_PARAM_NONE.
    fn pmemobj_tx_begin(pop: *mut PmemObjPool, env: *mut c_void, ...) -> c_int;
    fn pmemobj_tx_add_range(oid: PmemOid, off: u64, size: usize) -> c_int;
    fn pmemobj_tx_alloc(size: usize, type_num: u64) -> PmemOid;
    fn pmemobj_tx_commit();
    fn pmemobj_tx_end() -> c_int;
    fn pmemobj_tx_stage() -> c_int;
}

/// `TX_PARAM_NONE` of `enum pobj_tx_param`: ends `pmemobj_tx_begin`'s list.
const TX_PARAM_NONE: c_int = 0;
/// `TX_STAGE_ONCOMMIT` of `enum pobj_tx_stage`.
const TX_STAGE_ONCOMMIT: c_int = 2;

/// libpmemobj's last error message on this thread.
fn errormsg() -> String {
    // SAFETY: pmemobj_errormsg takes no argument and returns null or a
    // NUL-terminated thread-local string, valid until the next call.
    let msg = unsafe { pmemobj_errormsg() };
    if msg.is_null() {
        return "(no message)".to_owned();
    }
    // SAFETY: non-null, NUL-terminated, alive until the next pmemobj call on
    // this thread; copied out at once.
    unsafe { CStr::from_ptr(msg) }.to_string_lossy().into_owned()
}

/// A libpmemobj pool on /dev/shm.
pub struct Pmdk {
    pop: *mut PmemObjPool,
    /// `pool_uuid_lo` of this pool, so that a pointer can be turned back
    /// into its `PMEMoid` for `pmemobj_free`.
    uuid_lo: u64,
    path: PathBuf,
}

impl Pmdk {
    /// Creates the pool, or says what to fix.
    pub fn open() -> Result<Pmdk, String> {
        if !Path::new(POOL_DIR).is_dir() {
            return Err(format!(
                "{POOL_DIR} does not exist; mount a tmpfs there \
                 (`mount -t tmpfs -o size=512m tmpfs {POOL_DIR}`) or run on a host that has one"
            ));
        }
        let path = PathBuf::from(format!("{POOL_DIR}/remem-bench-{}.pmemobj", std::process::id()));
        // A file of ours left by a crashed run with the same pid would make
        // pmemobj_create fail with EEXIST.
        let _ = std::fs::remove_file(&path);
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| format!("pool path {} contains a NUL byte", path.display()))?;
        let layout = c"remem-bench";
        // SAFETY: both strings are NUL-terminated and outlive the call.
        let pop = unsafe { pmemobj_create(c_path.as_ptr(), layout.as_ptr(), POOL_SIZE, 0o600) };
        if pop.is_null() {
            let why = errormsg();
            let _ = std::fs::remove_file(&path);
            return Err(format!(
                "pmemobj_create({}, {} MiB) failed: {why}; fix: make {POOL_DIR} a writable \
                 tmpfs with at least {} MiB free (`mount -o remount,size=1g {POOL_DIR}`)",
                path.display(),
                POOL_SIZE >> 20,
                POOL_SIZE >> 20,
            ));
        }
        let mut pmdk = Pmdk { pop, uuid_lo: 0, path };
        // (From here on, an early return drops `pmdk`, which closes the pool
        // and removes its file.)
        // Learn the pool's uuid_lo from one allocation.
        let mut oid = PmemOid { pool_uuid_lo: 0, off: 0 };
        // SAFETY: `pop` is an open pool; `oid` is a valid destination.
        let rc = unsafe { pmemobj_alloc(pmdk.pop, &mut oid, 64, 0, None, ptr::null_mut()) };
        if rc != 0 {
            return Err(format!("pmemobj_alloc in a fresh pool failed: {}", errormsg()));
        }
        pmdk.uuid_lo = oid.pool_uuid_lo;
        // SAFETY: `oid` was just allocated from this pool and not freed.
        unsafe { pmemobj_free(&mut oid) };
        Ok(pmdk)
    }
}

impl Pmdk {
    /// The `PMEMoid` of the object at `p` (what pmemobj_oid computes).
    #[inline]
    fn oid_of(&self, p: *mut u8) -> PmemOid {
        PmemOid { pool_uuid_lo: self.uuid_lo, off: (p as usize - self.pop as usize) as u64 }
    }

    /// Begins a transaction on this thread's pool lane; panics on failure.
    #[inline]
    fn tx_begin(&self) {
        // SAFETY: `pop` is open until drop; a NULL `jmp_buf` makes failures
        // return instead of jumping; the parameter list is terminated.
        let rc = unsafe { pmemobj_tx_begin(self.pop, ptr::null_mut(), TX_PARAM_NONE) };
        if rc != 0 {
            tx_failed("pmemobj_tx_begin", rc);
        }
    }

    /// Commits and ends the running transaction; panics if it did not commit.
    #[inline]
    fn tx_commit_end(&self) {
        // SAFETY: a transaction begun by `tx_begin` is in TX_STAGE_WORK on
        // this thread (every failing step before this one panics after
        // ending it).
        let stage = unsafe {
            pmemobj_tx_commit();
            pmemobj_tx_stage()
        };
        // SAFETY: the transaction is past TX_STAGE_WORK, as pmemobj_tx_end needs.
        let rc = unsafe { pmemobj_tx_end() };
        if stage != TX_STAGE_ONCOMMIT || rc != 0 {
            commit_failed(stage, rc);
        }
    }
}

/// Ends the transaction a failed step aborted, then panics.
#[cold]
#[inline(never)]
fn tx_abort_and_fail(step: &str, rc: c_int) -> ! {
    // SAFETY: the failed step moved the transaction to TX_STAGE_ONABORT (a
    // NULL jmp_buf makes it return), where pmemobj_tx_end is allowed.
    unsafe { pmemobj_tx_end() };
    tx_failed(step, rc)
}

#[cold]
#[inline(never)]
fn commit_failed(stage: c_int, rc: c_int) -> ! {
    panic!(
        "pmdk transaction did not commit (stage after pmemobj_tx_commit: {stage}, pmemobj_tx_end: {rc}): {}",
        errormsg()
    )
}

#[cold]
#[inline(never)]
fn tx_failed(step: &str, rc: c_int) -> ! {
    panic!("pmdk {step} failed ({rc}): {}; the figures would be void", errormsg())
}

impl Drop for Pmdk {
    fn drop(&mut self) {
        // SAFETY: `pop` is open, and no thread uses it any more (`&mut self`).
        unsafe { pmemobj_close(self.pop) };
        if let Err(e) = std::fs::remove_file(&self.path) {
            eprintln!("remem-bench: could not remove {}: {e}", self.path.display());
        }
    }
}

// SAFETY: libpmemobj's allocator is thread-safe on one pool; the struct only
// holds the pool handle, which every thread may use at once.
unsafe impl Sync for Pmdk {}

// SAFETY: pmemobj_alloc returns OIDs of fresh objects of at least `size` bytes
// inside the pool, which stays mapped at `pop` while the pool is open.
unsafe impl Peer for Pmdk {
    fn name(&self) -> &'static str {
        "pmdk"
    }

    #[inline]
    fn alloc(&self, size: usize) -> *mut u8 {
        let mut oid = PmemOid { pool_uuid_lo: 0, off: 0 };
        // SAFETY: `pop` is open until drop; `oid` is a valid destination.
        let rc = unsafe { pmemobj_alloc(self.pop, &mut oid, size, 0, None, ptr::null_mut()) };
        if rc != 0 {
            eprintln!("remem-bench: pmemobj_alloc({size}) failed: {}", errormsg());
            return ptr::null_mut();
        }
        // What pmemobj_direct does once it has found the pool: the pool is
        // mapped at `pop` and `off` is relative to it.
        self.pop.cast::<u8>().wrapping_add(oid.off as usize)
    }

    #[inline]
    unsafe fn free(&self, p: *mut u8, _size: usize) {
        // The inverse of `alloc`'s translation.
        let mut oid = self.oid_of(p);
        // SAFETY: the caller guarantees `p` came from `alloc` and is live, so
        // `oid` names a live object of this pool.
        unsafe { pmemobj_free(&mut oid) };
    }
}

// SAFETY: pmemobj_tx_alloc returns the OID of a fresh object of at least
// `size` bytes inside the pool, published when the transaction commits and
// freed by pmemobj_free like any other.
unsafe impl TxPeer for Pmdk {
    #[inline]
    unsafe fn tx_update(&self, p: *mut u8, len: usize, byte: u8) {
        self.tx_begin();
        // SAFETY: in TX_STAGE_WORK; the caller guarantees `p..p + len` is
        // inside a live object of this pool.
        let rc = unsafe { pmemobj_tx_add_range(self.oid_of(p), 0, len) };
        if rc != 0 {
            tx_abort_and_fail("pmemobj_tx_add_range", rc);
        }
        // SAFETY: the caller guarantees `p..p + len` is inside a live object
        // that only this thread uses; it is logged now.
        unsafe { ptr::write_bytes(p, byte, len) };
        self.tx_commit_end();
    }

    #[inline]
    fn tx_alloc(&self, size: usize) -> *mut u8 {
        self.tx_begin();
        // SAFETY: in TX_STAGE_WORK on this thread.
        let oid = unsafe { pmemobj_tx_alloc(size, 0) };
        if oid.off == 0 {
            tx_abort_and_fail("pmemobj_tx_alloc", -1);
        }
        self.tx_commit_end();
        self.pop.cast::<u8>().wrapping_add(oid.off as usize)
    }
}
