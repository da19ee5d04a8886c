//! Errors of the baseline file.

use std::io;

/// `Result` with [`BaselineError`].
pub type Result<T, E = BaselineError> = std::result::Result<T, E>;

/// Where a page whose CRC did not match was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageSource {
    /// The image area (checked against the CRC table).
    Image,
    /// The committed journal (checked against its segment header).
    Journal,
}

impl std::fmt::Display for PageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Image => "image area",
            Self::Journal => "journal",
        })
    }
}

/// Everything that can go wrong with a baseline file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BaselineError {
    /// A read, write, resize or sync of the backend failed. Failed writes and syncs
    /// also poison the baseline (see [`BaselineError::Poisoned`]).
    #[error("{op}: {source}")]
    Io {
        /// What the baseline was doing, with the offset where it matters.
        op: String,
        /// What the backend said.
        source: io::Error,
    },
    /// A write or sync failed earlier; this baseline refuses to commit, apply or fence
    /// again. Reopen the file (ideally after fixing the storage) to see what is durable.
    #[error(
        "baseline durability is poisoned by an earlier failure ({cause}); refusing to write again: \
         what the file holds is the last successful commit or the one that failed, reopen it to find out"
    )]
    Poisoned {
        /// The error that poisoned it, as text.
        cause: String,
    },
    /// Neither superblock slot holds a valid superblock (or the file is too short to hold them).
    #[error("not a usable remem baseline: slot 0: {slot0}; slot 1: {slot1}")]
    NoSuperblock {
        /// What is wrong with slot 0.
        slot0: String,
        /// What is wrong with slot 1.
        slot1: String,
    },
    /// The superblock is written in a format version this build does not read.
    #[error("baseline format version {found}; this build reads version {supported}")]
    Version {
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// A structure of the file (superblock fields, journal segment, file length) is damaged.
    #[error("corrupt baseline: {what}")]
    Corrupt {
        /// What is wrong, and where.
        what: String,
    },
    /// Committed page data does not match its CRC.
    #[error(
        "corrupt baseline: page {page} read from the {source_area} at file offset {offset} has CRC {found:#010x}, \
         committed CRC is {expected:#010x}"
    )]
    PageCrc {
        /// Page index in the heap.
        page: u64,
        /// Where the page was read from.
        source_area: PageSource,
        /// File offset of the page.
        offset: u64,
        /// CRC the baseline committed.
        expected: u32,
        /// CRC of the bytes read.
        found: u32,
    },
    /// A newer generation fenced this writer: another host took the heap over.
    #[error(
        "fenced: the baseline's generation is {found}, this writer holds {ours}; another host has taken \
         the heap over and this writer must stop flushing"
    )]
    Fenced {
        /// Generation this writer holds.
        ours: u64,
        /// Generation in the baseline's superblock.
        found: u64,
    },
    /// The superblock changed under this writer without a newer generation: a second writer
    /// with the same generation, or a racing commit that overwrote this host's fence.
    #[error(
        "the baseline changed under this writer: it expected generation {ours_generation} seq {ours_seq}, \
         the file has generation {found_generation} seq {found_seq}; another writer is active (re-fence \
         or reopen before writing)"
    )]
    Diverged {
        /// Generation this writer holds.
        ours_generation: u64,
        /// Superblock seq this writer last wrote or read.
        ours_seq: u64,
        /// Generation in the file.
        found_generation: u64,
        /// Superblock seq in the file.
        found_seq: u64,
    },
    /// `fence` was asked for a generation that is not newer than the file's.
    #[error("cannot fence with generation {requested}: the baseline already has generation {current}")]
    StaleGeneration {
        /// Generation asked for.
        requested: u64,
        /// Generation in the file.
        current: u64,
    },
    /// The baseline belongs to another heap.
    #[error(
        "the baseline belongs to heap {found} ({found_size} bytes), not to heap {expected} ({expected_size} bytes)"
    )]
    WrongHeap {
        /// UUID asked for.
        expected: String,
        /// Heap size asked for.
        expected_size: u64,
        /// UUID in the file.
        found: String,
        /// Heap size in the file.
        found_size: u64,
    },
    /// A buffer handed in does not have the size the baseline needs.
    #[error("size mismatch: {what} is {found} bytes, expected {expected}")]
    SizeMismatch {
        /// Which buffer.
        what: String,
        /// Bytes needed.
        expected: u64,
        /// Bytes given.
        found: u64,
    },
    /// The heap size given to `create` cannot be described.
    #[error("heap size {0} bytes cannot have a baseline: it must be a non-zero multiple of 4096, at most 1 TiB")]
    BadHeapSize(u64),
    /// `create` was given a backend that already holds data.
    #[error("refusing to create a baseline over {len} existing bytes; open it, or remove it to start afresh")]
    NotEmpty {
        /// Bytes already in the backend.
        len: u64,
    },
    /// A page index beyond the heap.
    #[error("page {page} is outside the heap ({npages} pages)")]
    PageOutOfRange {
        /// Page index given.
        page: u64,
        /// Pages in the heap.
        npages: u64,
    },
    /// The commit would grow the journal past its cap: `apply` first.
    #[error("the journal holds {len} bytes and may not grow past {max}; apply it before committing more")]
    JournalFull {
        /// Bytes of committed journal.
        len: u64,
        /// The cap.
        max: u64,
    },
    /// A commit's epoch is not newer than the last committed one.
    #[error("epoch {given} is not newer than the last committed epoch {last}")]
    EpochOrder {
        /// Last committed epoch.
        last: u64,
        /// Epoch given.
        given: u64,
    },
}
