//! The invariant scan: validates every allocator invariant of a heap (live
//! and quiescent, or an image) and reports what it finds, including blocks
//! that are allocated but unreachable when the caller says what is live.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::{Acquire, Relaxed};

use crate::format::{lane, Desc, PAGE_SIZE};
use crate::meta::{Located, Meta};
use crate::pages::PageIndex;
use crate::recover::check_slab;
use crate::size_class::{CLASSES, SLAB_PAGES};

/// What [`crate::Heap::check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckReport {
    /// Broken invariants, one sentence each. Empty when the heap is sound.
    pub problems: Vec<String>,
    /// Slabs in use.
    pub slabs: u64,
    /// Allocated small blocks (not counting blocks cached as free).
    pub allocated_blocks: u64,
    /// Page runs in use.
    pub large_runs: u64,
    /// Bytes in allocated blocks and runs.
    pub allocated_bytes: u64,
    /// Free blocks held in per-thread caches.
    pub cached_blocks: u64,
    /// Free data pages.
    pub free_pages: u64,
    /// Allocated blocks that the caller's live set did not name (heap
    /// offsets). Empty when no live set was given.
    pub leaked: Vec<u64>,
    /// Live pointers named more than once, or that are not allocated blocks
    /// (heap offsets).
    pub doubly_owned: Vec<u64>,
}

impl CheckReport {
    /// A report of a heap that could not be checked at all, for `why`.
    pub(crate) fn refused(why: String) -> CheckReport {
        CheckReport { problems: vec![why], ..CheckReport::default() }
    }

    /// True when no invariant is broken and nothing leaked or is doubly owned.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty() && self.leaked.is_empty() && self.doubly_owned.is_empty()
    }
}

impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} slabs, {} blocks, {} page runs, {} bytes allocated, {} cached, {} pages free, {} leaked, {} doubly owned",
            if self.is_ok() { "ok" } else { "BROKEN" },
            self.slabs,
            self.allocated_blocks,
            self.large_runs,
            self.allocated_bytes,
            self.cached_blocks,
            self.free_pages,
            self.leaked.len(),
            self.doubly_owned.len()
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// Volatile state of a live heap to compare with the durable state.
pub(crate) struct LiveState<'a> {
    pub pages: &'a PageIndex,
}

/// Scans `meta`. `live` (heap offsets of the blocks the caller holds)
/// turns on the leak check.
pub(crate) fn check(meta: &Meta, vol: Option<LiveState<'_>>, live: Option<&[u64]>) -> CheckReport {
    let mut r = CheckReport::default();
    let layout = meta.layout;
    let (first, end) = meta.data_pages();
    // Allocated blocks and runs: offset -> size.
    let mut allocated: HashMap<u64, u64> = HashMap::new();
    let mut free_runs = PageIndex::default();
    let mut page = first;
    while page < end {
        match meta.desc_of(page) {
            None => {
                r.problems.push(format!("page {page}: unknown descriptor"));
                page += 1;
            }
            Some(Desc::Large(n)) => {
                if n == 0 || page + n > end {
                    r.problems.push(format!("page {page}: run of {n} pages does not fit"));
                    break;
                }
                r.large_runs += 1;
                allocated.insert(page * PAGE_SIZE as u64, n * PAGE_SIZE as u64);
                page += n;
            }
            Some(Desc::Slab(c)) => {
                if let Err(e) = check_slab(meta, page, c as usize, end) {
                    r.problems.push(e);
                    break;
                }
                r.slabs += 1;
                let info = &CLASSES[c as usize];
                for idx in 0..info.nblocks as usize {
                    if meta.slab_word(page, idx / 64).load(Acquire) & (1 << (idx % 64)) != 0 {
                        allocated.insert(Meta::block_off(page, info, idx) as u64, u64::from(info.size));
                    }
                }
                page += SLAB_PAGES as u64;
            }
            Some(Desc::Meta) => {
                r.problems.push(format!("page {page}: metadata descriptor in the data area"));
                page += 1;
            }
            Some(Desc::Free | Desc::Cont(_)) => {
                free_runs.insert(page, 1);
                page += 1;
            }
        }
    }
    r.free_pages = free_runs.free_pages();
    // Lanes: no intent in flight, cached blocks valid and owned once.
    let mut cached = HashSet::new();
    for l in 0..layout.nlanes {
        if meta.lane_u64(l, lane::STATE).load(Acquire) != lane::IDLE {
            r.problems.push(format!("lane {l}: an alloc_into is in flight (the heap needs recovery)"));
        }
        for (c, info) in CLASSES.iter().enumerate() {
            let n = meta.cache_count(l, c).load(Acquire);
            if n > info.cache_cap {
                r.problems.push(format!("lane {l} class {c}: cache count {n} over its capacity"));
                continue;
            }
            for i in 0..n as usize {
                let off = u64::from(meta.cache_entry(l, c, i).load(Relaxed)) << 4;
                let ok = matches!(meta.locate(off as usize), Located::Block { class, .. } if class == c);
                if !ok || allocated.remove(&off).is_none() {
                    r.problems.push(format!(
                        "lane {l} class {c}: cached block {off:#x} is not an allocated block of its class"
                    ));
                } else if !cached.insert(off) {
                    r.problems.push(format!("block {off:#x} is cached twice (doubly owned)"));
                }
            }
        }
    }
    r.cached_blocks = cached.len() as u64;
    r.allocated_blocks = allocated.len() as u64 - r.large_runs;
    r.allocated_bytes = allocated.values().sum();
    // Root.
    let root = meta.root().load(Acquire);
    if root != 0 {
        let off = root.wrapping_sub(meta.recorded_base);
        if !allocated.contains_key(&off) {
            r.problems.push(format!("root {root:#x} is not an allocated block"));
        }
    }
    // Volatile state agrees with the durable state.
    if let Some(v) = vol {
        let want: Vec<_> = free_runs.runs().collect();
        let have: Vec<_> = v.pages.runs().collect();
        if want != have {
            r.problems.push(format!(
                "free-page index disagrees with the descriptors ({} runs / {} pages indexed, {} runs / {} pages free)",
                have.len(),
                v.pages.free_pages(),
                want.len(),
                free_runs.free_pages()
            ));
        }
    }
    // Leak check.
    if let Some(live) = live {
        let mut seen = HashSet::new();
        for &off in live {
            if !allocated.contains_key(&off) || !seen.insert(off) {
                r.doubly_owned.push(off);
            }
        }
        let mut leaked: Vec<u64> = allocated
            .keys()
            .copied()
            .filter(|o| !seen.contains(o) && root.wrapping_sub(meta.recorded_base) != *o)
            .collect();
        leaked.sort_unstable();
        r.leaked = leaked;
    }
    r
}
