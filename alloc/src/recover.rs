//! The recovery pass: turns whatever the heap's memory held when its
//! process died into a consistent heap, and rebuilds the volatile state.
//!
//! It runs on every open, single-threaded, before anyone else sees the heap.
//! Every step is idempotent, so a crash during recovery is recovered by
//! running it again.
//!
//! 1. Lane intents: an `alloc_into` in flight is completed when its
//!    destination already holds the block, and rolled back otherwise.
//! 2. Lane caches: cached blocks keep their allocation bit while cached;
//!    the bits are cleared and the caches emptied.
//! 3. The descriptor walk: slab owners are reset, empty slabs are returned
//!    to the free pages, and the free-page index and per-class lists of
//!    slabs with free blocks are rebuilt.

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use crate::format::{hdr, lane, slab, Desc};
use crate::meta::{Located, Meta};
use crate::pages::PageIndex;
use crate::size_class::{CLASSES, NCLASSES, SLAB_PAGES};

/// What recovery found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// `alloc_into` calls in flight whose destination already held the block: kept.
    pub allocs_completed: u64,
    /// `alloc_into` calls in flight whose destination did not: the block was freed.
    pub allocs_rolled_back: u64,
    /// Transactions in flight, rolled back.
    pub txs_rolled_back: u64,
    /// Transactions that had committed and were releasing their frees: finished.
    pub txs_finished: u64,
    /// Undo records applied by the rollbacks.
    pub undo_records_applied: u64,
    /// Undo records not applied because their block had been freed outside
    /// the transaction (a misuse of the API; the data there is not restored).
    pub undo_records_skipped: u64,
    /// Blocks released by the rollbacks (their allocations) and the finished commits (their frees).
    pub tx_blocks_released: u64,
    /// Free blocks that sat in per-thread caches, returned to their slabs.
    pub cached_blocks_released: u64,
    /// Slabs with no allocated block, returned to the free pages.
    pub empty_slabs_released: u64,
    /// Slabs in use after recovery.
    pub slabs: u64,
    /// Page runs (large objects) in use.
    pub large_runs: u64,
    /// Allocated small blocks.
    pub allocated_blocks: u64,
    /// Free data pages.
    pub free_pages: u64,
}

impl std::fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "recovery: {} transactions rolled back ({} undo records), {} finished; {} alloc_into completed, \
             {} rolled back; {} cached blocks and {} empty slabs released; {} slabs, {} blocks, {} page runs in use, \
             {} pages free",
            self.txs_rolled_back,
            self.undo_records_applied,
            self.txs_finished,
            self.allocs_completed,
            self.allocs_rolled_back,
            self.cached_blocks_released,
            self.empty_slabs_released,
            self.slabs,
            self.allocated_blocks,
            self.large_runs,
            self.free_pages
        )
    }
}

/// Volatile allocator state rebuilt by recovery.
#[derive(Debug, Default)]
pub(crate) struct Volatile {
    /// Free page runs.
    pub pages: PageIndex,
    /// Slabs with free blocks, per class.
    pub partial: Vec<Vec<u64>>,
}

/// Where the bit of a block is.
fn bit_of(meta: &Meta, slab: u64, idx: usize) -> (&std::sync::atomic::AtomicU64, u64) {
    (meta.slab_word(slab, idx / 64), 1u64 << (idx % 64))
}

fn in_data(meta: &Meta, off: u64, len: u64) -> bool {
    off >= meta.layout.data_off && off.checked_add(len).is_some_and(|e| e <= meta.layout.size)
}

/// Runs recovery over `meta`, which nobody else uses meanwhile. `Err` names
/// the first damage that recovery cannot repair.
pub(crate) fn recover(meta: &Meta) -> Result<(RecoveryReport, Volatile), String> {
    let mut r = RecoveryReport::default();
    let layout = meta.layout;
    // 1. Intents.
    for l in 0..layout.nlanes {
        let state = meta.lane_u64(l, lane::STATE).load(Acquire);
        match state {
            lane::IDLE => continue,
            lane::ALLOC_INTO => {}
            s => return Err(format!("lane {l}: unknown intent state {s}")),
        }
        let block = meta.lane_u64(l, lane::BLOCK).load(Relaxed);
        let dest = meta.lane_u64(l, lane::DEST).load(Relaxed);
        let kind = meta.lane_u64(l, lane::DEST_KIND).load(Relaxed);
        let pages = meta.lane_u64(l, lane::PAGES).load(Relaxed);
        let in_lanes =
            dest >= layout.lanes_off && dest < layout.lanes_off + u64::from(layout.nlanes) * lane::BYTES as u64;
        if !(in_data(meta, dest, 8) || dest == hdr::ROOT as u64 || in_lanes) || !dest.is_multiple_of(8) {
            return Err(format!("lane {l}: intent destination {dest:#x} outside the data area"));
        }
        if !in_data(meta, block, 16) {
            return Err(format!("lane {l}: intent block {block:#x} outside the data area"));
        }
        let want = match kind {
            lane::DEST_RAW => meta.recorded_base + block,
            lane::DEST_OFFSET => block,
            k => return Err(format!("lane {l}: unknown destination kind {k}")),
        };
        let published = meta.mem.u64(dest as usize).load(Acquire) == want;
        if pages == 0 {
            let Located::Block { slab, class, idx } = meta.locate(block as usize) else {
                return Err(format!("lane {l}: intent block {block:#x} is not a slab block"));
            };
            let (word, bit) = bit_of(meta, slab, idx);
            if published {
                // Keep it: out of the lane's cache, bit set.
                let count = meta.cache_count(l, class);
                let n = count.load(Relaxed).min(CLASSES[class].cache_cap);
                let entry = (block >> 4) as u32;
                if let Some(i) = (0..n as usize).find(|&i| meta.cache_entry(l, class, i).load(Relaxed) == entry) {
                    let last = meta.cache_entry(l, class, n as usize - 1).load(Relaxed);
                    meta.cache_entry(l, class, i).store(last, Relaxed);
                    count.store(n - 1, Release);
                }
                word.fetch_or(bit, Release);
                r.allocs_completed += 1;
            } else {
                word.fetch_and(!bit, Release);
                r.allocs_rolled_back += 1;
            }
        } else {
            let page = block / crate::format::PAGE_SIZE as u64;
            if !block.is_multiple_of(crate::format::PAGE_SIZE as u64)
                || !in_data(meta, block, pages * crate::format::PAGE_SIZE as u64)
            {
                return Err(format!("lane {l}: intent run {block:#x}+{pages} pages is not in the data area"));
            }
            let d = meta.desc(page);
            if published {
                d.store(Desc::Large(pages).encode(), Release);
                r.allocs_completed += 1;
            } else {
                if Desc::decode(d.load(Acquire)) == Some(Desc::Large(pages)) {
                    d.store(Desc::Free.encode(), Release);
                }
                r.allocs_rolled_back += 1;
            }
        }
        meta.lane_u64(l, lane::STATE).store(lane::IDLE, Release);
    }
    // 2. Transactions (before the caches: a released block may sit in one).
    let t = crate::tx::recover_txs(meta)?;
    r.txs_rolled_back = t.rolled_back;
    r.txs_finished = t.finished;
    r.undo_records_applied = t.undo_applied;
    r.undo_records_skipped = t.undo_skipped;
    r.tx_blocks_released = t.blocks_released;
    // 3. Caches.
    for l in 0..layout.nlanes {
        for (c, info) in CLASSES.iter().enumerate() {
            let count = meta.cache_count(l, c);
            let n = count.load(Acquire);
            if n > info.cache_cap {
                return Err(format!("lane {l} class {c}: cache count {n} exceeds {}", info.cache_cap));
            }
            for i in 0..n as usize {
                let off = (meta.cache_entry(l, c, i).load(Relaxed) as usize) << 4;
                match meta.locate(off) {
                    Located::Block { slab, class, idx } if class == c => {
                        let (word, bit) = bit_of(meta, slab, idx);
                        word.fetch_and(!bit, Release);
                    }
                    _ => return Err(format!("lane {l} class {c}: cached block {off:#x} is not a block of its class")),
                }
            }
            count.store(0, Release);
            r.cached_blocks_released += u64::from(n);
        }
    }
    // 4. Descriptor walk.
    let mut vol = Volatile { pages: PageIndex::default(), partial: vec![Vec::new(); NCLASSES] };
    let (first, end) = meta.data_pages();
    let mut page = first;
    let mut free_start = None;
    let flush = |vol: &mut Volatile, free_start: &mut Option<u64>, upto: u64| {
        if let Some(s) = free_start.take() {
            vol.pages.insert(s, upto - s);
        }
    };
    while page < end {
        match meta.desc_of(page) {
            None => return Err(format!("page {page}: unknown descriptor {:#x}", meta.desc(page).load(Relaxed))),
            Some(Desc::Large(n)) => {
                if n == 0 || page + n > end {
                    return Err(format!("page {page}: page run of {n} pages does not fit the heap"));
                }
                flush(&mut vol, &mut free_start, page);
                r.large_runs += 1;
                page += n;
            }
            Some(Desc::Slab(c)) => {
                let c = c as usize;
                check_slab(meta, page, c, end)?;
                meta.slab_owner(page).store(0, Release);
                let info = &CLASSES[c];
                let used: u32 = (0..(info.nblocks as usize).div_ceil(64))
                    .map(|w| meta.slab_word(page, w).load(Acquire).count_ones())
                    .sum();
                if used == 0 {
                    meta.desc(page).store(Desc::Free.encode(), Release);
                    r.empty_slabs_released += 1;
                    free_start.get_or_insert(page);
                } else {
                    flush(&mut vol, &mut free_start, page);
                    r.slabs += 1;
                    r.allocated_blocks += u64::from(used);
                    if used < info.nblocks {
                        vol.partial[c].push(page);
                    }
                }
                page += SLAB_PAGES as u64;
            }
            Some(Desc::Meta) => return Err(format!("page {page}: metadata descriptor in the data area")),
            Some(Desc::Free | Desc::Cont(_)) => {
                free_start.get_or_insert(page);
                page += 1;
            }
        }
    }
    flush(&mut vol, &mut free_start, end);
    r.free_pages = vol.pages.free_pages();
    Ok((r, vol))
}

/// Validates the slab at `page` of class `c`: tag, class, continuation
/// descriptors, no bits beyond its blocks.
pub(crate) fn check_slab(meta: &Meta, page: u64, c: usize, end: u64) -> Result<(), String> {
    if c >= NCLASSES {
        return Err(format!("page {page}: slab of unknown class {c}"));
    }
    if page + SLAB_PAGES as u64 > end {
        return Err(format!("page {page}: slab does not fit the heap"));
    }
    if meta.slab_tag(page).load(Relaxed) != slab::TAG || meta.slab_class(page).load(Relaxed) as usize != c {
        return Err(format!("page {page}: slab header does not match its descriptor (class {c})"));
    }
    for d in 1..SLAB_PAGES as u64 {
        if meta.desc_of(page + d) != Some(Desc::Cont(d)) {
            return Err(format!("page {}: slab continuation descriptor is wrong", page + d));
        }
    }
    let info = &CLASSES[c];
    let words = (info.nblocks as usize).div_ceil(64);
    let tail = info.nblocks as usize % 64;
    if tail != 0 && meta.slab_word(page, words - 1).load(Relaxed) >> tail != 0 {
        return Err(format!("page {page}: slab bitmap has bits beyond its {} blocks", info.nblocks));
    }
    Ok(())
}
