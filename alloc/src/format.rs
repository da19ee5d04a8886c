//! The heap's in-memory (and on-file) format: pure layout arithmetic and
//! header encoding, no syscalls. `docs/format.md` has the same layout as a
//! byte table.
//!
//! ```text
//!  offset 0            4096                desc_off+8*npages  lanes_off+nlanes*LANE_BYTES   size
//!  ┌──────────────────┬──────────────────┬───────────────────┬─────────────────────────────┐
//!  │ header (1 page)  │ page descriptors │ lanes (per-thread │ data pages: slabs of 16     │
//!  │ magic, version,  │ one u64 per page │ intent + caches)  │ pages and page runs         │
//!  │ uuid, size, base │ of the heap      │                   │ (data_off is 64 KiB aligned)│
//!  │ ... CRC; root    │                  │                   │                             │
//!  └──────────────────┴──────────────────┴───────────────────┴─────────────────────────────┘
//! ```
//!
//! Every integer is little-endian and fixed width. The header's immutable
//! part (bytes 0..88) is covered by a CRC32 at byte 88; the root pointer at
//! byte 128 changes with single atomic stores and is not covered.

use crate::size_class::SLAB_HEADER;

/// Bytes per page; the only page size remem supports.
pub const PAGE_SIZE: usize = 4096;
/// First eight bytes of every heap image.
pub const MAGIC: [u8; 8] = *b"REMEMHP1";
/// Format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Smallest heap.
pub const MIN_HEAP: u64 = 1 << 20;
/// Largest heap: per-thread caches hold block offsets in 16-byte units in a u32.
pub const MAX_HEAP: u64 = 1 << 36;
/// Alignment of the base address and of `data_off`.
pub const HEAP_ALIGN: u64 = 64 * 1024;
/// Most lanes (threads with a private cache at once).
pub const MAX_LANES: u32 = 64;

/// Byte offsets inside the header page.
pub mod hdr {
    /// `[u8; 8]` magic.
    pub const MAGIC: usize = 0;
    /// `u32` format version.
    pub const VERSION: usize = 8;
    /// `u32` page size.
    pub const PAGE_SIZE: usize = 12;
    /// `[u8; 16]` heap UUID.
    pub const UUID: usize = 16;
    /// `u64` heap size in bytes.
    pub const SIZE: usize = 32;
    /// `u64` fixed base address.
    pub const BASE: usize = 40;
    /// `u64` generation (bumped when a failover host takes the heap over).
    pub const GENERATION: usize = 48;
    /// `u32` number of lanes.
    pub const NLANES: usize = 56;
    /// `u64` offset of the page descriptor table.
    pub const DESC_OFF: usize = 64;
    /// `u64` offset of the lanes.
    pub const LANES_OFF: usize = 72;
    /// `u64` offset of the first data page.
    pub const DATA_OFF: usize = 80;
    /// `u32` CRC32 of bytes `0..CRC`.
    pub const CRC: usize = 88;
    /// `u64` root object address (0 = none). Mutable, atomic.
    pub const ROOT: usize = 128;
}

/// A page descriptor (one `u64` per page of the heap).
///
/// Only *heads* are authoritative: recovery walks the data pages from the
/// first, and a `Large(n)` or `Slab(c)` head covers the pages after it; any
/// other descriptor at a walk position means a free page. A head is written
/// with one atomic store after its pages are prepared, and reset to `Free`
/// with one atomic store when the run is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Desc {
    /// Free page (or the stale interior of a released run).
    Free,
    /// Head of an allocated run of `n` pages.
    Large(u64),
    /// Head of a slab of class `c`.
    Slab(u8),
    /// Page `d` pages after the head of a slab (written before the head).
    Cont(u64),
    /// Metadata page (header, descriptors, lanes).
    Meta,
}

impl Desc {
    pub(crate) const FREE: u64 = 0;
    pub(crate) const LARGE: u64 = 1;
    pub(crate) const SLAB: u64 = 2;
    pub(crate) const CONT: u64 = 3;
    pub(crate) const META: u64 = 4;

    /// The descriptor's word.
    pub const fn encode(self) -> u64 {
        match self {
            Desc::Free => Self::FREE,
            Desc::Large(n) => (n << 8) | Self::LARGE,
            Desc::Slab(c) => ((c as u64) << 8) | Self::SLAB,
            Desc::Cont(d) => (d << 8) | Self::CONT,
            Desc::Meta => Self::META,
        }
    }

    /// Decodes a word; `None` for a kind this version does not know.
    pub const fn decode(w: u64) -> Option<Desc> {
        Some(match w & 0xff {
            Self::FREE => Desc::Free,
            Self::LARGE => Desc::Large(w >> 8),
            Self::SLAB => Desc::Slab((w >> 8) as u8),
            Self::CONT => Desc::Cont(w >> 8),
            Self::META => Desc::Meta,
            _ => return None,
        })
    }
}

/// Byte offsets inside a lane (one per thread that allocates).
///
/// A lane holds one *intent* (an `alloc_into` in flight) and a cache of
/// free blocks per class. Blocks in a cache keep their allocation bit set;
/// recovery clears them.
pub mod lane {
    use crate::size_class::{CACHE_CAP, NCLASSES};
    /// `u64` intent state: [`IDLE`] or [`ALLOC_INTO`].
    pub const STATE: usize = 0;
    /// `u64` heap offset of the block being allocated.
    pub const BLOCK: usize = 8;
    /// `u64` heap offset of the destination word.
    pub const DEST: usize = 16;
    /// `u64` how the destination holds the block: [`DEST_RAW`] or [`DEST_OFFSET`].
    pub const DEST_KIND: usize = 24;
    /// `u64` pages of the block when it is a page run, else 0.
    pub const PAGES: usize = 32;
    /// `u64` transaction state: [`TX_NONE`], [`TX_ACTIVE`] or [`TX_COMMITTING`].
    pub const TX_STATE: usize = 40;
    /// `u64` heap offset of the lane's first undo-log block (0 = none yet).
    pub const TX_LOG: usize = 48;
    /// `u64` sequence number of the lane's current (or last) transaction.
    pub const TX_SEQ: usize = 56;
    /// No transaction.
    pub const TX_NONE: u64 = 0;
    /// A transaction is running: recovery rolls it back.
    pub const TX_ACTIVE: u64 = 1;
    /// A transaction committed and is releasing its freed blocks: recovery finishes that.
    pub const TX_COMMITTING: u64 = 2;
    /// `[u32; NCLASSES]` number of cached blocks per class.
    pub const COUNTS: usize = 64;
    /// `[[u32; CACHE_CAP]; NCLASSES]` cached blocks (heap offset / 16).
    pub const ENTRIES: usize = COUNTS + 4 * NCLASSES;
    /// Bytes per lane.
    pub const BYTES: usize = (ENTRIES + 4 * CACHE_CAP * NCLASSES).next_multiple_of(64);
    /// No operation in flight.
    pub const IDLE: u64 = 0;
    /// An `alloc_into` is in flight.
    pub const ALLOC_INTO: u64 = 1;
    /// Destination holds the block's absolute address.
    pub const DEST_RAW: u64 = 0;
    /// Destination holds the block's heap offset (a `PPtr`).
    pub const DEST_OFFSET: u64 = 1;

    /// Offset of the cache count of class `c` in a lane.
    pub const fn count(c: usize) -> usize {
        COUNTS + 4 * c
    }
    /// Offset of cache entry `i` of class `c` in a lane.
    pub const fn entry(c: usize, i: usize) -> usize {
        ENTRIES + 4 * (c * CACHE_CAP + i)
    }
}

/// The undo log: a chain of heap blocks per lane, reused by every
/// transaction of the lane. A block belongs to the running transaction iff
/// its `SEQ` equals the lane's `TX_SEQ`; recovery walks the chain while it does.
pub mod log {
    /// `u64` heap offset of the next log block (0 = none).
    pub const NEXT: usize = 0;
    /// `u64` bytes in this block, header included.
    pub const CAP: usize = 8;
    /// `u64` sequence number of the transaction that last used the block.
    pub const SEQ: usize = 16;
    /// `u64` bytes of records published in this block (stored after each record).
    pub const USED: usize = 24;
    /// First record.
    pub const RECORDS: usize = 32;
    /// Record header: `u32` kind, `u32` zero, `u64` heap offset, `u64` length.
    pub const RECORD_HEADER: usize = 24;
    /// Offset of the record's heap offset field (0 once an ALLOC/FREE record is done).
    pub const REC_OFF: usize = 8;
    /// Offset of the record's length field.
    pub const REC_LEN: usize = 16;
    /// Undo record: the `len` bytes at `off` as they were before the transaction; data follows, padded to 8.
    pub const UNDO: u32 = 1;
    /// The transaction allocated the block at `off`: released on rollback.
    pub const ALLOC: u32 = 2;
    /// The transaction frees the block at `off`: released at commit.
    pub const FREE: u32 = 3;
    /// Largest data in one undo record (bigger ranges are split).
    pub const MAX_UNDO: usize = 4096;
    /// Size of a lane's first log block.
    pub const FIRST_BLOCK: usize = 16 * 1024;
    /// Largest log block.
    pub const MAX_BLOCK: usize = 1 << 20;
}

/// Byte offsets inside a slab's first page.
pub mod slab {
    /// `u32` tag, [`TAG`].
    pub const TAG_OFF: usize = 0;
    /// `u32` class.
    pub const CLASS: usize = 4;
    /// `u64` lane that may claim free blocks (lane + 1; 0 = none). Volatile: reset by recovery.
    pub const OWNER: usize = 8;
    /// First bitmap word; bit `i % 64` of word `i / 64` is set when block `i` is allocated (or cached).
    pub const BITMAP: usize = super::SLAB_HEADER;
    /// "SLAB".
    pub const TAG: u32 = u32::from_le_bytes(*b"SLAB");
}

/// Where everything is in a heap of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Heap size in bytes.
    pub size: u64,
    /// Number of lanes.
    pub nlanes: u32,
    /// Offset of the descriptor table.
    pub desc_off: u64,
    /// Offset of the first lane.
    pub lanes_off: u64,
    /// Offset of the first data page.
    pub data_off: u64,
}

impl Layout {
    /// The layout of a new heap of `size` bytes (a multiple of 64 KiB).
    pub fn for_size(size: u64) -> Layout {
        let npages = size / PAGE_SIZE as u64;
        let desc_off = PAGE_SIZE as u64;
        let lanes_off = (desc_off + 8 * npages).next_multiple_of(PAGE_SIZE as u64);
        let nlanes = ((size >> 20) as u32).clamp(2, MAX_LANES);
        let data_off = (lanes_off + nlanes as u64 * lane::BYTES as u64).next_multiple_of(HEAP_ALIGN);
        Layout { size, nlanes, desc_off, lanes_off, data_off }
    }

    /// Pages in the heap.
    pub fn npages(&self) -> u64 {
        self.size / PAGE_SIZE as u64
    }

    /// Page index of the first data page.
    pub fn first_data_page(&self) -> u64 {
        self.data_off / PAGE_SIZE as u64
    }

    /// Offset of descriptor `page`.
    pub fn desc(&self, page: u64) -> usize {
        (self.desc_off + 8 * page) as usize
    }

    /// Offset of lane `l`.
    pub fn lane(&self, l: u32) -> usize {
        (self.lanes_off + l as u64 * lane::BYTES as u64) as usize
    }

    /// Checks that a layout read back from an image is self-consistent.
    pub fn validate(&self) -> Result<(), String> {
        let want = Layout::for_size(self.size);
        if self.size < MIN_HEAP || self.size > MAX_HEAP || !self.size.is_multiple_of(HEAP_ALIGN) {
            return Err(format!("heap size {} is out of range", self.size));
        }
        if *self != want {
            return Err(format!("layout {self:?} does not match the layout of a {}-byte heap", self.size));
        }
        Ok(())
    }
}

/// The immutable part of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Heap identity.
    pub uuid: [u8; 16],
    /// Fixed base address.
    pub base: u64,
    /// Generation (bumped by failover).
    pub generation: u64,
    /// Where everything is.
    pub layout: Layout,
}

impl Header {
    /// Encodes the immutable part into the first [`hdr::CRC`] + 4 bytes.
    pub fn encode(&self) -> [u8; hdr::CRC + 4] {
        let mut b = [0u8; hdr::CRC + 4];
        b[hdr::MAGIC..hdr::MAGIC + 8].copy_from_slice(&MAGIC);
        b[hdr::VERSION..hdr::VERSION + 4].copy_from_slice(&VERSION.to_le_bytes());
        b[hdr::PAGE_SIZE..hdr::PAGE_SIZE + 4].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        b[hdr::UUID..hdr::UUID + 16].copy_from_slice(&self.uuid);
        b[hdr::SIZE..hdr::SIZE + 8].copy_from_slice(&self.layout.size.to_le_bytes());
        b[hdr::BASE..hdr::BASE + 8].copy_from_slice(&self.base.to_le_bytes());
        b[hdr::GENERATION..hdr::GENERATION + 8].copy_from_slice(&self.generation.to_le_bytes());
        b[hdr::NLANES..hdr::NLANES + 4].copy_from_slice(&self.layout.nlanes.to_le_bytes());
        b[hdr::DESC_OFF..hdr::DESC_OFF + 8].copy_from_slice(&self.layout.desc_off.to_le_bytes());
        b[hdr::LANES_OFF..hdr::LANES_OFF + 8].copy_from_slice(&self.layout.lanes_off.to_le_bytes());
        b[hdr::DATA_OFF..hdr::DATA_OFF + 8].copy_from_slice(&self.layout.data_off.to_le_bytes());
        let crc = crc32fast::hash(&b[..hdr::CRC]);
        b[hdr::CRC..hdr::CRC + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates a header from the first bytes of an image.
    pub fn decode(b: &[u8]) -> Result<Header, HeaderError> {
        if b.len() < hdr::CRC + 4 {
            return Err(HeaderError::Short);
        }
        if b[..8] != MAGIC {
            return Err(HeaderError::Magic);
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        // The CRC before the version: every version keeps magic, version and
        // this CRC in place, so a damaged version field reads as damage, not
        // as a newer format.
        let crc = crc32fast::hash(&b[..hdr::CRC]);
        if crc != u32_at(hdr::CRC) {
            return Err(HeaderError::Crc);
        }
        let version = u32_at(hdr::VERSION);
        if version != VERSION {
            return Err(HeaderError::Version(version));
        }
        if u32_at(hdr::PAGE_SIZE) as usize != PAGE_SIZE {
            return Err(HeaderError::Invalid(format!("page size {}", u32_at(hdr::PAGE_SIZE))));
        }
        let layout = Layout {
            size: u64_at(hdr::SIZE),
            nlanes: u32_at(hdr::NLANES),
            desc_off: u64_at(hdr::DESC_OFF),
            lanes_off: u64_at(hdr::LANES_OFF),
            data_off: u64_at(hdr::DATA_OFF),
        };
        layout.validate().map_err(HeaderError::Invalid)?;
        let base = u64_at(hdr::BASE);
        if !base_ok(base, layout.size) {
            return Err(HeaderError::Invalid(format!("base address {base:#x}")));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[hdr::UUID..hdr::UUID + 16]);
        Ok(Header { uuid, base, generation: u64_at(hdr::GENERATION), layout })
    }
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// Fewer bytes than a header.
    #[error("too short to hold a heap header")]
    Short,
    /// Wrong magic: not a remem heap.
    #[error("not a remem heap (bad magic)")]
    Magic,
    /// A format version this build does not read.
    #[error("format version {0}")]
    Version(u32),
    /// The header CRC does not match.
    #[error("header checksum mismatch (damaged header)")]
    Crc,
    /// A field is out of range.
    #[error("invalid header: {0}")]
    Invalid(String),
}

/// A usable base address for a heap of `size` bytes: non-zero, 64 KiB
/// aligned, and the whole heap below 2^47 (user space on x86-64).
pub fn base_ok(base: u64, size: u64) -> bool {
    base != 0 && base.is_multiple_of(HEAP_ALIGN) && base.checked_add(size).is_some_and(|e| e <= 1 << 47)
}

/// Formats a UUID the usual way.
pub fn uuid_string(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_detects_damage() {
        let h = Header { uuid: [7; 16], base: 0x5e00_0000_0000, generation: 3, layout: Layout::for_size(64 << 20) };
        let b = h.encode();
        assert_eq!(Header::decode(&b), Ok(h));
        for i in 0..hdr::CRC + 4 {
            let mut bad = b;
            bad[i] ^= 0x10;
            assert!(Header::decode(&bad).is_err(), "flip at byte {i} not detected");
        }
    }

    #[test]
    fn a_damaged_version_field_reads_as_damage_not_as_another_format() {
        let h = Header { uuid: [7; 16], base: 0x5e00_0000_0000, generation: 3, layout: Layout::for_size(64 << 20) };
        let mut b = h.encode();
        b[hdr::VERSION] ^= 0x01;
        assert_eq!(Header::decode(&b), Err(HeaderError::Crc));
    }

    #[test]
    fn desc_round_trips() {
        for d in [Desc::Free, Desc::Large(1), Desc::Large(1 << 30), Desc::Slab(31), Desc::Cont(15), Desc::Meta] {
            assert_eq!(Desc::decode(d.encode()), Some(d));
        }
        assert_eq!(Desc::decode(0xff), None);
    }

    #[test]
    fn layouts_leave_room_for_data() {
        for size in [MIN_HEAP, 4 << 20, 1 << 30, MAX_HEAP] {
            let l = Layout::for_size(size);
            assert!(l.data_off < size / 2, "{l:?}");
            assert_eq!(l.data_off % HEAP_ALIGN, 0);
            assert!(l.validate().is_ok());
        }
    }
}
