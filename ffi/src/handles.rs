//! The open heaps behind `remem_heap*` handles.
//!
//! A handle is not the address of anything: it is a slot number and a
//! generation, with a tag in its top 16 bits (which no user-space pointer
//! has on Linux):
//!
//! ```text
//!  63        48 47                       12 11          0
//! +------------+---------------------------+-------------+
//! |   0x7e3e   |  generation (36 bits)      | slot (12)   |
//! +------------+---------------------------+-------------+
//! ```
//!
//! A slot of a fixed table holds the open heap and the handle it was
//! opened under. A call checks the tag, announces itself ([`quiesce`]),
//! and compares the slot's handle with its own: plain loads, no lock, no
//! shared write. So a closed handle, a handle of another process, a
//! pointer from malloc or a random value gives `REMEM_BAD_HANDLE` instead
//! of a crash, and a closed handle never comes back to life: generations
//! are not reused. Closing clears the slot's handle (one closer wins), then
//! waits for the calls that saw it open ([`quiesce::wait_until_left`])
//! before it takes the heap out.
//!
//! [`heap_at`] finds the heap containing an address through a table of
//! 4 GiB granules of the address space, each naming the one open heap that
//! overlaps it (or saying that several do).

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{fence, AtomicPtr, AtomicU16, AtomicU64};
use std::sync::{Mutex, PoisonError};

use remem_alloc::Heap;

use crate::quiesce;
use crate::status::remem_status::*;
use crate::status::{Fail, FfiResult};
use crate::thread::ThreadState;

/// An open heap, as C sees it: opaque. A `remem_heap*` is a handle, not a
/// memory address; never dereference it. It stays valid until
/// remem_close(); after that every call with it returns REMEM_BAD_HANDLE.
pub struct remem_heap {
    _opaque: [u8; 0],
}

const TAG: u64 = 0x7e3e << 48;
const TAG_MASK: u64 = 0xffff << 48;
const SLOT_BITS: u32 = 12;
/// Heaps open at once through the C ABI.
const SLOTS: usize = 1 << SLOT_BITS;
const SLOT_MASK: u64 = SLOTS as u64 - 1;
const GEN_LIMIT: u64 = 1 << (48 - SLOT_BITS);

/// One open heap (or none).
struct Slot {
    /// The handle the heap was opened under; 0 while free or closing.
    handle: AtomicU64,
    /// The heap, boxed; written before `handle` is published.
    heap: AtomicPtr<Heap>,
    /// The heap's base address and size (for [`heap_at`]), written before
    /// `handle` is published.
    base: AtomicU64,
    size: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)] // only used to build the table
const FREE_SLOT: Slot = Slot {
    handle: AtomicU64::new(0),
    heap: AtomicPtr::new(std::ptr::null_mut()),
    base: AtomicU64::new(0),
    size: AtomicU64::new(0),
};

static TABLE: [Slot; SLOTS] = [FREE_SLOT; SLOTS];

/// Granules of the user address space (47 bits) for [`heap_at`].
const GRANULE_SHIFT: u32 = 32;
const GRANULES: usize = 1 << (47 - GRANULE_SHIFT);
/// A granule that several heaps overlap.
const MANY: u16 = u16::MAX;

#[allow(clippy::declare_interior_mutable_const)] // only used to build the table
const NO_HEAP: AtomicU16 = AtomicU16::new(0);

/// Per granule: 0, the slot + 1 of the one open heap that overlaps it, or [`MANY`].
static GRANULE: [AtomicU16; GRANULES] = [NO_HEAP; GRANULES];

/// Opening and closing (rare): which slots are free, the next generation.
struct Registry {
    /// Slots never used yet start at `unused`; freed ones are in `free`.
    unused: usize,
    free: Vec<usize>,
    next_gen: u64,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry { unused: 0, free: Vec::new(), next_gen: 1 });

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

fn encode(v: u64) -> *mut remem_heap {
    std::ptr::without_provenance_mut(usize::try_from(v).expect("remem's C ABI needs 64-bit pointers"))
}

/// The handle's value and its slot.
#[inline]
fn decode(h: *mut remem_heap) -> FfiResult<(u64, &'static Slot)> {
    let v = h as usize as u64;
    if v & TAG_MASK != TAG {
        return Err(bad(h));
    }
    Ok((v, &TABLE[(v & SLOT_MASK) as usize]))
}

#[cold]
#[inline(never)]
fn bad(h: *mut remem_heap) -> Fail {
    if h.is_null() {
        Fail::null("heap")
    } else {
        Fail::new(REMEM_BAD_HANDLE, format!("{h:p} is not a remem_heap handle"))
    }
}

#[cold]
#[inline(never)]
fn not_open(h: *mut remem_heap) -> Fail {
    Fail::new(REMEM_BAD_HANDLE, format!("heap handle {h:p} is not open (closed already?)"))
}

/// The granules `[base, base + size)` overlaps (none above 47 bits).
fn granules(base: u64, size: u64) -> std::ops::Range<usize> {
    let first = (base >> GRANULE_SHIFT) as usize;
    let last = ((base + size.max(1) - 1) >> GRANULE_SHIFT) as usize;
    first.min(GRANULES)..(last + 1).min(GRANULES)
}

/// Registers an open heap and returns its new handle. With every slot
/// taken the heap is closed again and the call fails.
pub(crate) fn insert(heap: Heap) -> FfiResult<*mut remem_heap> {
    quiesce::init();
    let (base, size) = (heap.base() as u64, heap.size());
    let mut reg = registry();
    let slot = match reg.free.pop() {
        Some(slot) => Some(slot),
        None if reg.unused < SLOTS => {
            reg.unused += 1;
            Some(reg.unused - 1)
        }
        None => None,
    };
    let Some(slot) = slot else {
        drop(reg);
        let _ = heap.close();
        return Err(Fail::new(REMEM_ERROR, format!("{SLOTS} heaps are open already; close one first")));
    };
    let generation = reg.next_gen;
    assert!(generation < GEN_LIMIT, "remem: out of heap handles");
    reg.next_gen += 1;
    let v = TAG | generation << SLOT_BITS | slot as u64;
    let s = &TABLE[slot];
    s.heap.store(Box::into_raw(Box::new(heap)), Relaxed);
    s.base.store(base, Relaxed);
    s.size.store(size, Relaxed);
    s.handle.store(v, Release);
    for g in granules(base, size) {
        let e = &GRANULE[g];
        e.store(if e.load(Relaxed) == 0 { slot as u16 + 1 } else { MANY }, Release);
    }
    Ok(encode(v))
}

/// Runs `f` with the heap behind handle `h` (on the thread whose state
/// is `t`); the heap is not closed while `f` runs.
#[inline(always)]
pub(crate) fn with_heap<R>(t: &ThreadState, h: *mut remem_heap, f: impl FnOnce(&Heap) -> FfiResult<R>) -> FfiResult<R> {
    let v = h as usize as u64;
    if v & TAG_MASK == TAG {
        if let Some(call) = quiesce::enter(t, v) {
            let slot = &TABLE[(v & SLOT_MASK) as usize];
            if slot.handle.load(Acquire) != v {
                drop(call);
                return Err(not_open(h));
            }
            // SAFETY: as in `with_heap_slow`.
            let r = f(unsafe { &*slot.heap.load(Relaxed) });
            drop(call);
            return r;
        }
    }
    with_heap_slow(t, h, f)
}

/// [`with_heap`] for a bad handle, a thread's first call, a nested call
/// or one during thread teardown.
#[cold]
#[inline(never)]
fn with_heap_slow<R>(t: &ThreadState, h: *mut remem_heap, f: impl FnOnce(&Heap) -> FfiResult<R>) -> FfiResult<R> {
    let (v, slot) = decode(h)?;
    let _call = quiesce::enter_slow(t, v);
    if slot.handle.load(Acquire) != v {
        return Err(not_open(h));
    }
    // SAFETY: the slot held handle `v` after this thread announced its
    // call on `v`, so the closer of `v` waits for this call to end before
    // it takes the heap out (see `quiesce`); the pointer was written
    // before `handle` was published (Release/Acquire).
    let heap = unsafe { &*slot.heap.load(Relaxed) };
    f(heap)
}

/// Unregisters the heap behind `h` once no call on it is in flight, and
/// hands it over (to be closed). Of two closers racing, one gets the heap
/// and the other `REMEM_BAD_HANDLE`.
pub(crate) fn remove(h: *mut remem_heap) -> FfiResult<Heap> {
    let (v, slot) = decode(h)?;
    if slot.handle.compare_exchange(v, 0, SeqCst, Relaxed).is_err() {
        return Err(not_open(h));
    }
    quiesce::wait_until_left(v);
    let heap = slot.heap.swap(std::ptr::null_mut(), Acquire);
    // SAFETY: `insert` boxed it; this closer won the slot, every call that
    // saw it open has ended, and calls starting now see it closed.
    let heap = *unsafe { Box::from_raw(heap) };
    let (base, size) = (slot.base.load(Relaxed), slot.size.load(Relaxed));
    let index = (v & SLOT_MASK) as usize;
    let mut reg = registry();
    for g in granules(base, size) {
        // What overlaps the granule now, among the heaps still open.
        let mut e = 0u16;
        for (i, s) in TABLE.iter().enumerate().take(reg.unused) {
            if i != index
                && s.handle.load(Relaxed) != 0
                && granules(s.base.load(Relaxed), s.size.load(Relaxed)).contains(&g)
            {
                e = if e == 0 { i as u16 + 1 } else { MANY };
            }
        }
        GRANULE[g].store(e, Release);
    }
    reg.free.push(index);
    Ok(heap)
}

/// The handle of `slot` if it is open and its heap contains `addr`.
#[inline]
fn slot_containing(slot: &Slot, addr: u64) -> Option<u64> {
    let v = slot.handle.load(Acquire);
    if v == 0 {
        return None;
    }
    let (base, size) = (slot.base.load(Relaxed), slot.size.load(Relaxed));
    // The slot may have been closed and reused meanwhile: base and size
    // belong to `v` only if the slot still holds it.
    fence(Acquire);
    (slot.handle.load(Relaxed) == v && addr.wrapping_sub(base) < size).then_some(v)
}

/// The handle of the open heap whose address range contains `addr`: a
/// load of its granule's entry and of one slot, no lock.
pub(crate) fn heap_at(addr: usize) -> Option<*mut remem_heap> {
    let addr = addr as u64;
    let e = GRANULE.get((addr >> GRANULE_SHIFT) as usize)?.load(Acquire);
    let v = match e {
        0 => None,
        MANY => TABLE.iter().find_map(|s| slot_containing(s, addr)),
        e => slot_containing(&TABLE[usize::from(e) - 1], addr),
    };
    v.map(encode)
}
