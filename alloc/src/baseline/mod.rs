//! The baseline file: the crash-atomic, durable copy of a heap on (shared)
//! storage that the flusher writes dirty pages to and a failover host loads.
//!
//! Pure Rust, no knowledge of the heap's internals: a heap here is
//! `heap_size` bytes of 4096-byte pages. `docs/baseline.md` has the same
//! format as byte tables.
//!
//! ```text
//!  0           4096        8192                T = 8192 + roundup(4·npages, 4096)       J = T + heap_size
//!  ┌───────────┬───────────┬──────────────────┬──────────────────────────────────────┬───────────────────────────┐
//!  │superblock │superblock │ page CRC table   │ image area: heap_size bytes, page i  │ journal: segments, the    │
//!  │slot 0     │slot 1     │ u32 per page, as │ at T + 4096·i; never-written pages   │ first journal_len bytes   │
//!  │(even seq) │(odd seq)  │ last applied     │ are holes (zeros)                    │ committed; space reused   │
//!  └───────────┴───────────┴──────────────────┴──────────────────────────────────────┴───────────────────────────┘
//!
//!  superblock (first 108 bytes of a slot; the rest zero)   journal segment: 4096 · (1 + count) bytes
//!  ┌───────────────────────────────────────────────┐       ┌───────────────────────────────────────────────┐
//!  │  0 magic "REMEMBL1"    8 version u32 = 1      │       │  0 magic "REMEMSEG"   8 seq u64   16 epoch u64 │
//!  │ 12 page_size u32       16 heap uuid [u8; 16]  │       │ 24 count u32 (1..=254)                         │
//!  │ 32 heap_size u64       40 generation u64      │       │ 28 crc u32: bytes 0..28 + the entries          │
//!  │ 48 seq u64             56 epoch u64           │       │ 32 count × (page u64, page crc32 u32, 0 u32)   │
//!  │ 64 commit_unix_ns u64  72 journal_len u64     │       │    ...header padded with zeros to 4096 bytes   │
//!  │ 80 journal_base_seq u64                       │       ├───────────────────────────────────────────────┤
//!  │ 88 image_off u64 (T)   96 journal_off u64 (J) │       │ page of entry 0 │ page of entry 1 │ ...        │
//!  │104 crc32 of bytes 0..104                      │       └───────────────────────────────────────────────┘
//!  └───────────────────────────────────────────────┘
//! ```
//!
//! Every integer is little-endian and fixed width; every CRC is CRC-32 (IEEE,
//! `crc32fast`). Lengths read back are capped: heap size ≤ 1 TiB, journal
//! length ≤ 2^48 and within the file, segment count ≤ 254, page index <
//! npages; offsets must equal the ones computed from the heap size.
//!
//! # Protocol
//!
//! * **Superblock.** Two slots, written alternately (`seq % 2`); the valid
//!   one (magic, version, CRC, fields in range, `seq` matching its slot) with
//!   the highest `seq` is the committed state. A torn superblock write leaves
//!   the other slot, written and synced earlier, in charge. A slot with a
//!   newer format version is never skipped: `open` refuses the file.
//! * **Commit** of epoch E: append segments after the committed journal end
//!   (one `write_at` per segment of up to 254 pages, just under 1 MiB;
//!   offsets increase, so the writes are sorted), `sync_data`; write the next
//!   slot with `seq + 1`, `epoch = E`, `journal_len` extended; `sync_data`.
//!   The commit point is that superblock reaching the disk. The first sync
//!   orders the segments before the superblock: with a single sync the disk
//!   may persist the superblock and not (all of) the segments it points to.
//!   A one-sync variant is possible (`open` would read and CRC-check every
//!   page of the newest commit and fall back to the older slot when one
//!   fails), at the price of that read on every open; the second sync of 4
//!   KiB costs about one device flush.
//! * **Apply** (compaction): copy the current superblock into the other
//!   slot with `seq + 1`, `sync_data` (now both slots describe the current
//!   state); copy the newest journal version of every page into the image
//!   area and its CRC into the table (sorted runs of up to 1 MiB),
//!   `sync_data`; then a superblock with `journal_len = 0` and
//!   `journal_base_seq = seq`, `sync_data`. A crash before that superblock
//!   lands leaves one that replays the same journal over the partly applied
//!   image: idempotent. The file keeps its length; the next commit
//!   overwrites the old segments.
//! * **Load**: pick the superblock, index the committed segments (headers
//!   only, in `open`), read the image area checking each page against the
//!   table (pages in the journal excepted), then read each journal page's
//!   newest version checking it against its segment entry. A mismatch is
//!   [`BaselineError::PageCrc`], naming the page, where it was read and the
//!   two CRCs. [`Baseline::load_into`] reads and writes every page;
//!   [`Baseline::load_into_zeroed`] (into memory that is already zero) asks the
//!   backend where the image area has data ([`Backend::data_ranges`]: `lseek`
//!   `SEEK_DATA`/`SEEK_HOLE` for a file), checks hole pages by comparing their
//!   table entry with the CRC of a zero page instead of reading them, reads the
//!   data in sequential runs of up to 1 MiB, and writes only the pages that
//!   are not all zero. Same result, and the same error for a damaged page.
//!
//! **Why a crash never mixes states.** Before a commit's superblock is
//! durable, the only bytes written lie past the committed journal end, which
//! no valid superblock references. The superblock goes to the slot not in
//! use, so the committed one is never overwritten. Both slots always
//! describe an intact state: commits only append to the journal, so the
//! older slot's journal prefix is untouched; apply, the only writer of the
//! image area and table, first makes both slots describe the current
//! journal, and then writes values that journal replays anyway. So a damaged
//! or torn newest slot falls back to a consistent (older) heap, never a mix.
//! Segments carry the `seq` of their commit, and a committed segment must
//! have `journal_base_seq < seq ≤ superblock seq`, so stale segments from
//! before an apply are never replayed (say, after a lost write). The tests
//! crash at every sync of create, commit, apply and fence, persisting none,
//! all, or a random subset of 512-byte sectors of the unsynced writes, and
//! reopen: the heap is always exactly the old or the new state.
//!
//! # Durability errors
//!
//! A failed `write_at`, `set_len` or `sync_data` during create, commit,
//! apply or fence (or a failure to re-read the superblock right after
//! syncing it) poisons the baseline: every later commit, apply and fence
//! returns [`BaselineError::Poisoned`] with the original error's text. It is
//! never retried over: after a failed `fsync` the kernel may have dropped the
//! dirty pages and marked them clean, so a retry could "succeed" over lost
//! data. What the file holds afterwards is the last successful commit or the
//! failed one, never a mix; reopen it (from a new process, after fixing the
//! storage) to find out. Reads (`load_into`, `page_crc`) keep serving the
//! last state this instance committed. Read errors and validation errors do
//! not poison: they change nothing on disk.
//!
//! # Fencing, and the window it leaves open
//!
//! The superblock holds a `generation`. A failover host opens the baseline
//! and calls [`Baseline::fence`] with a newer generation: it re-reads the
//! committed state, writes a superblock with the new generation, syncs, and
//! re-reads to confirm (re-fencing up to three times if a racing commit
//! overwrote it). The old writer re-reads the superblock before writing its
//! segments, again right before writing its superblock, and once more after
//! syncing it; any change gives [`BaselineError::Fenced`] (a newer generation)
//! or [`BaselineError::Diverged`] (any other change). This is
//! compare-and-commit done with plain reads and writes, so it is best effort:
//! a shared filesystem without locks or leases cannot make "check, then
//! write" atomic. The window that remains is between the old writer's last
//! check and its superblock write reaching the storage. If the fence lands in
//! that window:
//!
//! * the fence goes to the same slot as the old writer's superblock (both
//!   use `seq + 1`), and whichever write lands last wins. If the old writer's
//!   wins, the fence is lost and the old writer carries on until its next
//!   commit's check; the new host sees [`BaselineError::Diverged`] (a lower
//!   generation than its own) from its next `check_fence`, commit or apply,
//!   and must fence and load again;
//! * journal segments the old writer appends after the new host's first
//!   commit began can overwrite the new host's segments at the same offsets;
//!   segment CRCs catch a torn mix, but a whole segment of the old writer's
//!   is self-consistent.
//!
//! When the old writer is a hung process on the same filesystem (failure
//! F2: it still holds the baseline open and may resume at any instruction,
//! including between a check and a write), recovery closes the window
//! another way: after fencing, it copies the baseline to a new inode and
//! renames the copy over the path
//! (`BaselineLock::move_from_hung_owner`), so the resumed writer's
//! descriptors reach only the old, fenced inode.
//!
//! So a failover host should, in order: make the old writer unable to write
//! if it can (kill the process, cut the host off the storage); `fence`; wait
//! longer than the old writer's longest commit; `check_fence`; only then
//! load the baseline and pull the dirty pages; and `check_fence` again
//! before trusting the result. An error from an old writer's commit after it
//! was fenced means "not acknowledged": the epoch may or may not be in the
//! baseline, and its dirty pages must be kept (the agent keeps them).
//! Checks read the superblock through the backend; on a filesystem that
//! caches reads on the client (NFS), reads must see other hosts' writes
//! (e.g. attribute caching off), or the checks see stale superblocks.
//!
//! # Performance
//!
//! A commit copies each page once into its segment buffer (and takes the CRC
//! of that copy, so a page changing under the call is still committed with a
//! matching CRC), writes each segment with one `pwrite`, and syncs twice. Its
//! writes are sequential, so at low dirty fractions it is faster than
//! writing the same pages in place. Apply writes every journal page a second
//! time, in place; run it when the journal passes a threshold (and at
//! close), off the flush path. `open` reads the CRC table (4 bytes per
//! page) and every segment header; memory use is the table plus one index
//! entry per journal page and a 1 MiB buffer. Loading a mostly empty heap
//! with `load_into` costs the whole heap size (the kernel zero-fills every
//! hole it reads, and every destination page gets populated);
//! `load_into_zeroed` costs the data: a 1 GiB heap holding 164 MB of image
//! data loads into a fresh memfd in about 0.2–0.35 s instead of 1–5 s (on
//! a busy 2-core VM, file in the page cache).
//!
//! Files: `format.rs` (pure encoding), `backend.rs` (the [`Backend`] trait,
//! [`FileBackend`]), `faulty.rs` ([`FaultyBackend`] for crash tests),
//! `store.rs` ([`Baseline`]), `error.rs`, `tests.rs`.

// One `unsafe` call, `lseek(SEEK_DATA / SEEK_HOLE)` in `backend.rs`, allowed there.
#![deny(unsafe_code)]

mod backend;
mod error;
mod faulty;
pub mod format;
mod index;
mod store;
#[cfg(test)]
mod tests;

pub use backend::{Backend, FileBackend};
pub use error::{BaselineError, PageSource, Result};
pub use faulty::{FaultyBackend, Persist, SyncFault};
pub use store::{Baseline, CommitInfo, DiscardedSlot, LoadReport};
