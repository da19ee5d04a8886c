//! remem's heap through its direct calls (`Heap::alloc`, `Heap::free`, and
//! `Heap::tx_begin` / `tx_add_range` / `tx_alloc` / `tx_commit`).
//!
//! The heap is 1 GiB, its file in a directory of its own under the run's
//! directory (named after the process id), so that the heap's file and
//! whatever remem keeps beside it (its lock file) go when the peer is
//! dropped.

use std::mem::ManuallyDrop;
use std::path::Path;
use std::ptr::{self, NonNull};

use remem_alloc::{Heap, HeapOptions};

use super::{Peer, TxPeer};
use crate::scratch::ScratchDir;

/// Size of the heap.
pub const HEAP_SIZE: u64 = 1 << 30;

/// A remem heap made for the run.
pub struct Remem {
    /// Open until drop closes it (no `Option` to test in the hot path).
    heap: ManuallyDrop<Heap>,
    /// Directory holding the heap's files; removed on drop, after the heap
    /// is closed (fields drop after `Drop::drop`).
    _dir: ScratchDir,
}

impl Remem {
    /// Creates the heap for the `alloc` suite (default options: fast
    /// tracking, background flush every second), or says why it could not.
    pub fn open(dir: &Path) -> Result<Remem, String> {
        Self::open_with(dir, "alloc", &HeapOptions::new(HEAP_SIZE))
    }

    /// Creates the heap for the `tx` suite: the same defaults a user gets
    /// (fast tracking, background flush every second), so that the
    /// figures include what tracking and flushing cost the transactions.
    pub fn open_for_tx(dir: &Path) -> Result<Remem, String> {
        Self::open_with(dir, "tx", &HeapOptions::new(HEAP_SIZE))
    }

    fn open_with(dir: &Path, tag: &str, opts: &HeapOptions) -> Result<Remem, String> {
        let dir = ScratchDir::new(dir, tag)?;
        let path = dir.path().join("bench.heap");
        match Heap::create(&path, opts) {
            Ok(heap) => Ok(Remem { heap: ManuallyDrop::new(heap), _dir: dir }),
            Err(e) => Err(format!("Heap::create({}, {} MiB) failed: {e}", path.display(), HEAP_SIZE >> 20)),
        }
    }
}

impl Drop for Remem {
    fn drop(&mut self) {
        // SAFETY: `heap` is taken once, here, and never used after.
        let heap = unsafe { ManuallyDrop::take(&mut self.heap) };
        if let Err(e) = heap.close() {
            eprintln!("remem-bench: closing the remem heap failed: {e}");
        }
    }
}

// SAFETY: `Heap::alloc` returns fresh blocks of at least `size` bytes inside
// the heap, which stays mapped while the heap is open.
unsafe impl Peer for Remem {
    fn name(&self) -> &'static str {
        "remem"
    }

    #[inline]
    fn alloc(&self, size: usize) -> *mut u8 {
        match self.heap.alloc(size) {
            Ok(p) => p.as_ptr(),
            Err(e) => {
                eprintln!("remem-bench: remem Heap::alloc({size}) failed: {e}");
                ptr::null_mut()
            }
        }
    }

    #[inline]
    unsafe fn free(&self, p: *mut u8, _size: usize) {
        // SAFETY: the caller guarantees `p` came from `alloc` (or
        // `tx_alloc`), which never hand out null.
        let p = unsafe { NonNull::new_unchecked(p) };
        if let Err(e) = self.heap.free(p) {
            panic!("remem Heap::free failed: {e}");
        }
    }
}

#[cold]
#[inline(never)]
fn tx_failed(step: &str, e: &dyn std::fmt::Display) -> ! {
    panic!("remem {step} failed: {e}; the figures would be void")
}

// SAFETY: `Heap::tx_alloc` returns a fresh block of at least `size` bytes,
// which stays allocated once the transaction commits and is freed by
// `Heap::free` like any other.
unsafe impl TxPeer for Remem {
    #[inline]
    unsafe fn tx_update(&self, p: *mut u8, len: usize, byte: u8) {
        let heap = &*self.heap;
        if let Err(e) = heap.tx_begin() {
            tx_failed("Heap::tx_begin", &e);
        }
        if let Err(e) = heap.tx_add_range(p, len) {
            tx_failed("Heap::tx_add_range", &e);
        }
        // SAFETY: the caller guarantees `p..p + len` is inside a live block
        // that only this thread uses.
        unsafe { ptr::write_bytes(p, byte, len) };
        if let Err(e) = heap.tx_commit() {
            tx_failed("Heap::tx_commit", &e);
        }
    }

    #[inline]
    fn tx_alloc(&self, size: usize) -> *mut u8 {
        let heap = &*self.heap;
        if let Err(e) = heap.tx_begin() {
            tx_failed("Heap::tx_begin", &e);
        }
        let p = match heap.tx_alloc(size) {
            Ok(p) => p,
            Err(e) => tx_failed("Heap::tx_alloc", &e),
        };
        if let Err(e) = heap.tx_commit() {
            tx_failed("Heap::tx_commit", &e);
        }
        p.as_ptr()
    }
}
