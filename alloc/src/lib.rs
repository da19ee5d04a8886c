//! remem's heap: a memfd-backed region mapped at a fixed address, with a
//! recoverable allocator whose metadata lives inside the heap.
//!
//! Layers, pure first:
//! - [`format`], [`size_class`], `pages`: layout arithmetic, no syscalls;
//! - `meta`, `recover`, `check`: the allocator metadata inside the heap's
//!   bytes, its recovery pass and its invariant scan;
//! - `mem`, `region`: the unsafe parts (atomic views of raw memory; memfd
//!   and fixed-address mappings);
//! - [`Heap`]: the allocator itself, with [`PPtr`] offset pointers and the
//!   Rust allocator traits in `api`.
//!
//! ```no_run
//! use remem_alloc::{Heap, HeapOptions};
//! let heap = Heap::create("/tmp/example.heap", &HeapOptions::new(64 << 20))?;
//! let (root, _) = heap.root_or_alloc(64)?;
//! let p = heap.alloc(100)?;
//! heap.free(p)?;
//! heap.close()?;
//! let heap = Heap::open("/tmp/example.heap")?;
//! assert_eq!(heap.root(), Some(root));
//! # Ok::<(), remem_alloc::Error>(())
//! ```

mod api;
pub mod baseline;
mod check;
mod control;
mod error;
pub mod flush;
pub mod fork;
pub mod format;
#[doc(hidden)]
pub mod fuzzing;
mod gate;
mod heap;
mod lanes;
pub mod lazy;
mod mem;
mod meta;
mod pages;
mod pptr;
mod recover;
mod region;
pub mod size_class;
pub mod source;
pub mod track;
mod tx;

pub use api::{GlobalHeap, HeapRef};
pub use check::CheckReport;
pub use control::{ctl, ControlError, ControlView, LEASE_PERIOD};
pub use error::{AllocError, Error, OpenError, PointerError, Result};
pub use flush::{FlushError, FlushStats};
pub use fork::Forked;
pub use format::Header;
pub use heap::{
    check_image, image_base, recover_image, BaselineInfo, BaselineLock, Heap, HeapOptions, HeapStats, PatchHook,
};
pub use lanes::ThreadLanes;
pub use pptr::PPtr;
pub use recover::RecoveryReport;
pub use track::TrackMode;

/// The `(start, end)` byte ranges of the first `len` bytes of a memfd (or
/// file) that hold data; everything else reads as zero. Reading a hole of
/// a shared memfd mapping allocates a page, so whole-image passes (CRCs,
/// digests) use this to skip them.
pub fn memfd_data_ranges(fd: std::os::fd::BorrowedFd<'_>, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    region::data_ranges(fd.as_raw_fd(), len)
}

/// The first `(start, end)` byte range at or after `pos` (and before `len`)
/// of a memfd (or file) that holds data, `None` if there is none: for a
/// pass that walks the memfd in order and should not wait for a scan of
/// all of it ([`memfd_data_ranges`]) before it starts.
pub fn memfd_data_range_from(
    fd: std::os::fd::BorrowedFd<'_>,
    pos: u64,
    len: u64,
) -> std::io::Result<Option<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    region::data_range_from(fd.as_raw_fd(), pos, len)
}
pub use tx::{Tx, TxError};
