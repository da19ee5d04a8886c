//! The registry of open heaps behind `remem_heap*` handles.
//!
//! A handle is not the address of anything: it is a serial number with a
//! tag in its top 16 bits (which no user-space pointer has on Linux), and
//! every call looks it up here. So a closed handle, a handle of another
//! process, a pointer from malloc or a random value gives
//! `REMEM_BAD_HANDLE` instead of a crash, and a closed handle never comes
//! back to life: serial numbers are not reused.
//!
//! Calls on a heap hold the registry's read lock while they run; closing
//! takes the write lock, so a heap is never closed under a running call.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard};

use remem_alloc::Heap;

use crate::status::remem_status::*;
use crate::status::{Fail, FfiResult};

/// An open heap, as C sees it: opaque. A `remem_heap*` is a handle, not a
/// memory address; never dereference it. It stays valid until
/// remem_close(); after that every call with it returns REMEM_BAD_HANDLE.
pub struct remem_heap {
    _opaque: [u8; 0],
}

const TAG: u64 = 0x7e3e << 48;
const SERIAL_MASK: u64 = (1 << 48) - 1;

static HEAPS: RwLock<BTreeMap<u64, Heap>> = RwLock::new(BTreeMap::new());
static NEXT_SERIAL: AtomicU64 = AtomicU64::new(1);

fn read() -> RwLockReadGuard<'static, BTreeMap<u64, Heap>> {
    HEAPS.read().unwrap_or_else(PoisonError::into_inner)
}

fn encode(serial: u64) -> *mut remem_heap {
    std::ptr::without_provenance_mut(usize::try_from(TAG | serial).expect("remem's C ABI needs 64-bit pointers"))
}

fn decode(h: *mut remem_heap) -> FfiResult<u64> {
    if h.is_null() {
        return Err(Fail::null("heap"));
    }
    let v = h as usize as u64;
    if v & !SERIAL_MASK != TAG {
        return Err(Fail::new(REMEM_BAD_HANDLE, format!("{h:p} is not a remem_heap handle")));
    }
    Ok(v & SERIAL_MASK)
}

fn not_open(h: *mut remem_heap) -> Fail {
    Fail::new(REMEM_BAD_HANDLE, format!("heap handle {h:p} is not open (closed already?)"))
}

/// Registers an open heap and returns its new handle.
pub(crate) fn insert(heap: Heap) -> *mut remem_heap {
    let serial = NEXT_SERIAL.fetch_add(1, Ordering::Relaxed);
    assert!(serial <= SERIAL_MASK, "remem: out of heap handles");
    HEAPS.write().unwrap_or_else(PoisonError::into_inner).insert(serial, heap);
    encode(serial)
}

/// Runs `f` with the heap behind handle `h`.
pub(crate) fn with_heap<R>(h: *mut remem_heap, f: impl FnOnce(&Heap) -> FfiResult<R>) -> FfiResult<R> {
    let serial = decode(h)?;
    let heaps = read();
    let heap = heaps.get(&serial).ok_or_else(|| not_open(h))?;
    f(heap)
}

/// Unregisters the heap behind `h` and hands it over (to be closed).
pub(crate) fn remove(h: *mut remem_heap) -> FfiResult<Heap> {
    let serial = decode(h)?;
    HEAPS.write().unwrap_or_else(PoisonError::into_inner).remove(&serial).ok_or_else(|| not_open(h))
}

/// The handle of the open heap whose address range contains `addr`.
pub(crate) fn heap_at(addr: usize) -> Option<*mut remem_heap> {
    read().iter().find(|(_, heap)| heap.offset_of(addr as *const u8).is_some()).map(|(&serial, _)| encode(serial))
}
