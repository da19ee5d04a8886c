//! Errors of the heap, one enum per kind of operation, and the crate's
//! `Result` alias.

use std::io;
use std::path::PathBuf;

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a heap operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Creating or opening the heap failed.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// An allocation could not be satisfied.
    #[error(transparent)]
    Alloc(AllocError),
    /// A pointer handed back to the heap was not acceptable.
    #[error(transparent)]
    Pointer(#[from] PointerError),
    /// A flush to the baseline failed, or durability is poisoned.
    #[error(transparent)]
    Flush(crate::flush::FlushError),
    /// This process is a fork of the one that opened the heap: the heap
    /// cannot be used here (see [`crate::fork`]).
    #[error(transparent)]
    Forked(#[from] crate::fork::Forked),
}

impl From<AllocError> for Error {
    fn from(e: AllocError) -> Error {
        match e {
            AllocError::Forked(f) => Error::Forked(f),
            e => Error::Alloc(e),
        }
    }
}

impl From<crate::flush::FlushError> for Error {
    fn from(e: crate::flush::FlushError) -> Error {
        match e {
            crate::flush::FlushError::Forked(f) => Error::Forked(f),
            e => Error::Flush(e),
        }
    }
}

/// Why a heap could not be created or opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// An operating-system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What remem was doing.
        what: String,
        /// What the operating system said.
        source: io::Error,
    },
    /// `create` was asked to make a heap at a path that already holds one.
    #[error("{0} already exists; open it instead, or remove it to start afresh")]
    AlreadyExists(PathBuf),
    /// The requested size is outside what remem supports.
    #[error("heap size {size} bytes is not supported: it must be between {min} and {max} bytes")]
    BadSize {
        /// The requested size.
        size: u64,
        /// Smallest supported size.
        min: u64,
        /// Largest supported size.
        max: u64,
    },
    /// The requested base address is not usable.
    #[error("base address {0:#x} is not usable: it must be non-zero, 64 KiB aligned and below 2^47")]
    BadBase(u64),
    /// The fixed address range of the heap is taken in this process.
    #[error(
        "the heap must be mapped at [{base:#x}, {end:#x}) but that range is already in use in \
         this process ({conflict}); close whatever maps it (another open heap?) or create the \
         heap with another base address"
    )]
    AddressInUse {
        /// Heap base address.
        base: u64,
        /// One past the heap's last byte.
        end: u64,
        /// The conflicting mapping, as /proc/self/maps shows it.
        conflict: String,
    },
    /// No free address range was found for a new heap.
    #[error("no free address range of {0} bytes found for the heap; pass an explicit base address")]
    NoAddress(u64),
    /// The system page size is not the 4 KiB remem's format assumes.
    #[error("the system page size is {0} bytes; remem supports 4096-byte pages only")]
    PageSize(usize),
    /// The heap image is not a remem heap or is damaged.
    #[error("{path}: {reason}")]
    Corrupt {
        /// Where the image came from.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The image was written by a format version this build does not read.
    #[error("{path}: heap format version {found}, this build reads version {supported}")]
    Version {
        /// Where the image came from.
        path: PathBuf,
        /// Version in the image.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// The baseline file could not be created, read or validated.
    #[error("baseline {path}: {source}")]
    Baseline {
        /// The baseline file.
        path: PathBuf,
        /// What is wrong.
        source: crate::baseline::BaselineError,
    },
    /// The hook that patches a loaded image (pages pulled from a failed
    /// host) failed; the baseline is unchanged.
    #[error("recovering {path}: {reason}")]
    Patch {
        /// The baseline file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Dirty-page tracking could not be set up.
    #[error(transparent)]
    Track(#[from] crate::track::TrackError),
    /// Lazy loading could not start.
    #[error(transparent)]
    Lazy(#[from] crate::lazy::LazyError),
    /// Another open of the same baseline file holds its lock (by this path
    /// or any other: symlink, hard link, another mount).
    #[error(
        "{0} is in use: another open of this baseline file (in this or another process, by this path or a link to \
         it) holds its lock; close it there first, or check a copy"
    )]
    Locked(PathBuf),
}

/// Why an allocation failed. The heap is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AllocError {
    /// No free space large enough is left in the heap.
    #[error("heap is full: no room for {size} bytes (heap size {heap_size} bytes)")]
    OutOfMemory {
        /// Requested size.
        size: usize,
        /// Total heap size.
        heap_size: u64,
    },
    /// The alignment asked for is larger than remem supports (4096).
    #[error("alignment {0} is not supported; remem aligns to at most 4096 bytes")]
    Alignment(usize),
    /// A zero-sized or absurdly large request.
    #[error("cannot allocate {0} bytes")]
    BadSize(usize),
    /// The destination slot given to `alloc_into` is not in the heap's data area.
    #[error("destination slot {0:#x} is not an 8-byte aligned word in the heap's data area")]
    BadDestination(usize),
    /// This process is a fork of the one that opened the heap (see
    /// [`crate::fork`]); nothing was allocated.
    #[error(transparent)]
    Forked(#[from] crate::fork::Forked),
}

/// Why a pointer passed to `free`, `realloc`, `usable_size` or `set_root`
/// was refused. The heap is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PointerError {
    /// The pointer is not inside this heap.
    #[error("pointer {0:#x} is not inside this heap")]
    NotInHeap(usize),
    /// The pointer is inside the heap but is not the start of a block the heap handed out.
    #[error("pointer {0:#x} was never returned by this heap's allocator (not the start of a block)")]
    NotABlock(usize),
    /// The block is already free.
    #[error("double free: the block at {0:#x} is not allocated (already freed)")]
    DoubleFree(usize),
}
