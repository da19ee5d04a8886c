//! remem's heap through its direct calls (`Heap::alloc`, `Heap::free`).
//!
//! The heap is 1 GiB, its file in a directory of its own under the temp dir
//! (named after the process id), so that the heap's file and whatever remem
//! keeps beside it (its lock file) go when the peer is dropped.

use std::mem::ManuallyDrop;
use std::path::PathBuf;
use std::ptr::{self, NonNull};

use remem_alloc::{Heap, HeapOptions};

use super::Peer;

/// Size of the heap.
const HEAP_SIZE: u64 = 1 << 30;

/// A remem heap made for the run.
pub struct Remem {
    /// Open until drop closes it (no `Option` to test in the hot path).
    heap: ManuallyDrop<Heap>,
    /// Directory holding the heap's files; removed on drop.
    dir: PathBuf,
}

impl Remem {
    /// Creates the heap, or says why it could not.
    pub fn open() -> Result<Remem, String> {
        let dir = std::env::temp_dir().join(format!("remem-bench-{}", std::process::id()));
        // Files of ours left by a crashed run with the same pid.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let path = dir.join("bench.heap");
        match Heap::create(&path, &HeapOptions::new(HEAP_SIZE)) {
            Ok(heap) => Ok(Remem { heap: ManuallyDrop::new(heap), dir }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(format!("Heap::create({}, {} MiB) failed: {e}", path.display(), HEAP_SIZE >> 20))
            }
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
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("remem-bench: could not remove {}: {e}", self.dir.display());
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
        // SAFETY: the caller guarantees `p` came from `alloc`, which never
        // hands out null.
        let p = unsafe { NonNull::new_unchecked(p) };
        if let Err(e) = self.heap.free(p) {
            panic!("remem Heap::free failed: {e}");
        }
    }
}
