//! The agent's published blocks: the directory region and the info block of
//! each hosted heap. Pure constants and offsets; `docs/recovery.md` has the
//! same layout as byte tables. All integers little-endian.
//!
//! ```text
//!  directory region: 4096 · (1 + slots) bytes, the first region the agent registers
//!  0      4096          8192                 4096·(1+slots)
//!  ┌──────┬─────────────┬─────────────┬─────┐
//!  │header│ info block  │ info block  │ ... │   slot i at 4096·(1+i)
//!  │      │ of slot 0   │ of slot 1   │     │
//!  └──────┴─────────────┴─────────────┴─────┘
//!  header: 0 magic "REMEMDIR", 8 version u32 (2), 12 slots u32, 16 changes u64
//!
//!  info block (4096 B):
//!    0 magic "REMEMAGT"   8 version u32 (2)   12 state u32   16 uuid [u8;16]
//!   32 size u64   40 base u64   48 npages u64   56 mode u32 (0 off, 1 precise, 2 fast)   60 zero
//!   64 regions: 4 × {addr u64, len u64, rkey u32, zero u32}: heap, control, crc, sealed
//!  160 seal_cursor u64   168 sealed_pages u64   176 owner_pid u64   184 no_baseline u64
//!  192 generation u64    200 assigned u64       208 digest_ready u64 216 digest [u8;32]
//! ```

/// The directory region's header (its first 4096 bytes).
pub mod dir {
    use super::info;

    /// `[u8; 8]` `"REMEMDIR"`.
    pub const MAGIC: usize = 0;
    /// `u32` version (2).
    pub const VERSION: usize = 8;
    /// `u32` number of info-block slots that follow the header.
    pub const SLOTS: usize = 12;
    /// `u64` bumped each time a slot is assigned to a heap or freed.
    pub const CHANGES: usize = 16;
    /// Bytes of the header.
    pub const HEADER_LEN: usize = 4096;
    /// Magic.
    pub const MAGIC_BYTES: [u8; 8] = *b"REMEMDIR";
    /// The version this layout describes.
    pub const CURRENT_VERSION: u32 = 2;
    /// Slots an agent has unless told otherwise.
    pub const DEFAULT_SLOTS: usize = 64;
    /// The most slots an agent accepts (a 4 MiB directory).
    pub const MAX_SLOTS: usize = 1023;

    /// Offset of slot `slot`'s info block in the directory region.
    pub const fn slot_offset(slot: usize) -> usize {
        HEADER_LEN + slot * info::LEN
    }

    /// Length of a directory of `slots` slots.
    pub const fn len(slots: usize) -> usize {
        slot_offset(slots)
    }
}

/// Layout of one heap's info block (a slot of the directory).
pub mod info {
    /// `[u8; 8]` `"REMEMAGT"`.
    pub const MAGIC: usize = 0;
    /// `u32` version (2).
    pub const VERSION: usize = 8;
    /// `u32` state: [`FREE`], [`RUNNING`], [`SEALING`], [`SEALED`], [`CLOSED`].
    pub const STATE: usize = 12;
    /// `[u8; 16]` heap UUID (zero when [`FREE`]).
    pub const UUID: usize = 16;
    /// `u64` heap size in bytes.
    pub const SIZE: usize = 32;
    /// `u64` heap base address.
    pub const BASE: usize = 40;
    /// `u64` pages in the heap.
    pub const NPAGES: usize = 48;
    /// `u32` tracking mode from the control region: 0 off, 1 precise, 2 fast.
    pub const MODE: usize = 56;
    /// The four region descriptors: [`HEAP`], [`CONTROL`], [`CRC`], [`SEALED_MAP`],
    /// each `{addr u64, len u64, rkey u32, 0 u32}` (24 bytes) at [`region`]`(n)`.
    pub const REGIONS: usize = 64;
    /// Bytes of one region descriptor.
    pub const REGION_LEN: usize = 24;
    /// `u64` pages `[0, seal_cursor)` are covered by the seal: their CRC is in
    /// the crc region and their bit in the sealed region says whether they
    /// differ from the baseline. `npages` once [`SEALED`].
    pub const SEAL_CURSOR: usize = 160;
    /// `u64` pages found to differ from the baseline so far.
    pub const SEALED_PAGES: usize = 168;
    /// `u64` pid of the heap's current (or last) owner, from the kernel's peer credentials.
    pub const OWNER_PID: usize = 176;
    /// `u64` 1 when sealing could not read the baseline (then every page with data is listed).
    pub const NO_BASELINE: usize = 184;
    /// `u64` the baseline's fencing generation when the heap was registered.
    pub const GENERATION: usize = 192;
    /// `u64` the directory's `changes` count when this slot was assigned to
    /// this heap: a poller that sees it change knows the slot was reused.
    pub const ASSIGNED: usize = 200;
    /// `u64` 1 when [`DIGEST`] holds the image's BLAKE3 (only for an agent
    /// started with `digest`, once [`SEALED`]).
    pub const DIGEST_READY: usize = 208;
    /// `[u8; 32]` BLAKE3 of the whole heap image at sealing (see [`DIGEST_READY`]).
    pub const DIGEST: usize = 216;
    /// Bytes of the block.
    pub const LEN: usize = 4096;
    /// Region index of the heap memfd.
    pub const HEAP: usize = 0;
    /// Region index of the control memfd.
    pub const CONTROL: usize = 1;
    /// Region index of the per-page CRC table (`u32` per page).
    pub const CRC: usize = 2;
    /// Region index of the sealed bitmap (bit p = page p differs from the baseline).
    pub const SEALED_MAP: usize = 3;
    /// The slot holds no heap.
    pub const FREE: u32 = 0;
    /// The owner is connected: its memory changes; do not recover.
    pub const RUNNING: u32 = 1;
    /// The owner is gone and nothing can change the memory any more; the
    /// seal is in progress (see [`SEAL_CURSOR`]): a recoverer may start.
    pub const SEALING: u32 = 4;
    /// The owner is gone and the seal covers every page.
    pub const SEALED: u32 = 2;
    /// The owner closed the heap cleanly (everything is in the baseline), or
    /// a recovery elsewhere superseded it; the agent holds no memory for it.
    pub const CLOSED: u32 = 3;
    /// Magic.
    pub const MAGIC_BYTES: [u8; 8] = *b"REMEMAGT";
    /// The version this layout describes.
    pub const CURRENT_VERSION: u32 = 2;

    /// Offset of region descriptor `n` ([`HEAP`], [`CONTROL`], [`CRC`], [`SEALED_MAP`]).
    pub const fn region(n: usize) -> usize {
        REGIONS + n * REGION_LEN
    }

    /// The name of a state, for messages.
    pub fn state_name(state: u32) -> &'static str {
        match state {
            FREE => "FREE",
            RUNNING => "RUNNING",
            SEALING => "SEALING",
            SEALED => "SEALED",
            CLOSED => "CLOSED",
            _ => "UNKNOWN",
        }
    }
}

/// Reads a little-endian `u64` at `at`, if in range.
pub fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let end = at.checked_add(8)?;
    Some(u64::from_le_bytes(b.get(at..end)?.try_into().ok()?))
}

/// Reads a little-endian `u32` at `at`, if in range.
pub fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let end = at.checked_add(4)?;
    Some(u32::from_le_bytes(b.get(at..end)?.try_into().ok()?))
}

/// A region descriptor as published in an info block.
pub fn region_desc(block: &[u8], n: usize) -> Option<crate::transport::RegionDesc> {
    let at = info::region(n);
    Some(crate::transport::RegionDesc {
        addr: u64_at(block, at)?,
        len: u64_at(block, at + 8)?,
        rkey: u32_at(block, at + 16)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_do_not_overlap_and_fit() {
        assert_eq!(info::region(4), info::SEAL_CURSOR);
        const { assert!(info::DIGEST + 32 <= info::LEN) };
        assert_eq!(dir::slot_offset(0), 4096);
        assert_eq!(dir::len(dir::MAX_SLOTS), 4 << 20);
        let mut b = vec![0u8; info::LEN];
        b[info::region(1)..info::region(1) + 8].copy_from_slice(&7u64.to_le_bytes());
        b[info::region(1) + 16..info::region(1) + 20].copy_from_slice(&9u32.to_le_bytes());
        let d = region_desc(&b, 1).unwrap();
        assert_eq!((d.addr, d.rkey), (7, 9));
        assert_eq!(u64_at(&b, info::LEN - 7), None);
        assert_eq!(region_desc(&b[..100], 3), None);
    }
}
