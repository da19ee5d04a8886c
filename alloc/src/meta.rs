//! Typed access to the allocator metadata inside a heap's bytes: page
//! descriptors, slab headers and bitmaps, lanes. Shared by a live heap and
//! by a heap image being recovered or checked (which may sit at another
//! address: metadata holds offsets only).

use std::sync::atomic::{AtomicU32, AtomicU64};

use crate::format::{hdr, lane, slab, Desc, Header, Layout, PAGE_SIZE};
use crate::mem::{Mem, Words};
use crate::size_class::{ClassInfo, CACHE_CAP, CLASSES, NCLASSES, SLAB_BYTES, SLAB_HEADER, SLAB_PAGES};

/// A lane as laid out in the heap ([`lane`] has the byte offsets).
#[repr(C)]
pub(crate) struct LaneWords {
    /// The intent and transaction words, `lane::STATE / 8 ..= lane::TX_SEQ / 8`.
    pub words: [AtomicU64; lane::COUNTS / 8],
    /// Cached blocks per class.
    pub counts: [AtomicU32; NCLASSES],
    /// Cached blocks (heap offset / 16), per class.
    pub entries: [[AtomicU32; CACHE_CAP]; NCLASSES],
}

// SAFETY: `#[repr(C)]`, 8-aligned, atomics only.
unsafe impl Words for LaneWords {}

const _: () = {
    assert!(std::mem::offset_of!(LaneWords, counts) == lane::COUNTS);
    assert!(std::mem::offset_of!(LaneWords, entries) == lane::ENTRIES);
    assert!(std::mem::size_of::<LaneWords>() <= lane::BYTES);
};

/// Most bitmap words a slab has (class 0).
pub(crate) const MAX_BITMAP_WORDS: usize = 64;

/// The header and bitmap at the start of a slab ([`slab`] has the byte offsets).
#[repr(C)]
pub(crate) struct SlabWords {
    /// [`slab::TAG`].
    pub tag: AtomicU32,
    /// The slab's class.
    pub class: AtomicU32,
    /// Lane + 1 that may claim free blocks, 0 = none.
    pub owner: AtomicU64,
    _unused: [AtomicU64; (SLAB_HEADER - 16) / 8],
    /// Allocation bitmap (only the class's first `ceil(nblocks / 64)` words are used).
    pub bitmap: [AtomicU64; MAX_BITMAP_WORDS],
}

// SAFETY: `#[repr(C)]`, 8-aligned, atomics only.
unsafe impl Words for SlabWords {}

const _: () = {
    assert!(std::mem::offset_of!(SlabWords, class) == slab::CLASS);
    assert!(std::mem::offset_of!(SlabWords, owner) == slab::OWNER);
    assert!(std::mem::offset_of!(SlabWords, bitmap) == slab::BITMAP);
    assert!(std::mem::size_of::<SlabWords>() <= PAGE_SIZE);
    let mut c = 0;
    while c < NCLASSES {
        assert!((CLASSES[c].nblocks as usize).div_ceil(64) <= MAX_BITMAP_WORDS);
        c += 1;
    }
};

/// A heap's metadata, viewed through its bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Meta {
    pub mem: Mem,
    pub layout: Layout,
    /// The base address recorded in the header: raw pointers stored in the
    /// heap (roots, `alloc_into` destinations) are relative to it.
    pub recorded_base: u64,
    /// The first data page (from the layout, kept at hand for the free path).
    first_page: u64,
    /// Pages in the heap (from the layout).
    npages: u64,
}

impl Meta {
    /// A view of the heap `header` describes. The header's layout must be
    /// validated (as `Header::decode` does) and `mem` hold the whole heap:
    /// the accessors below rely on both to skip per-field bounds checks.
    pub(crate) fn new(mem: Mem, header: &Header) -> Meta {
        assert!(
            mem.len() as u64 >= header.layout.size && header.layout.validate().is_ok(),
            "remem bug: a heap view of {} bytes for layout {:?}",
            mem.len(),
            header.layout
        );
        Meta {
            mem,
            layout: header.layout,
            recorded_base: header.base,
            first_page: header.layout.first_data_page(),
            npages: header.layout.npages(),
        }
    }

    /// Descriptor of page `page`.
    #[inline]
    pub(crate) fn desc(&self, page: u64) -> &AtomicU64 {
        if page >= self.npages {
            bad_index("page", page);
        }
        // SAFETY: the descriptor table is `npages` words at `desc_off`, inside
        // the heap (validated layout, `new`), and `page < npages`.
        unsafe { self.mem.view_unchecked(self.layout.desc(page)) }
    }

    /// Decoded descriptor of page `page` (`None`: unknown kind).
    #[inline]
    pub(crate) fn desc_of(&self, page: u64) -> Option<Desc> {
        Desc::decode(self.desc(page).load(std::sync::atomic::Ordering::Acquire))
    }

    /// Lane `l`.
    #[inline]
    pub(crate) fn lane(&self, l: u32) -> &LaneWords {
        if l >= self.layout.nlanes {
            bad_index("lane", u64::from(l));
        }
        // SAFETY: lanes `0..nlanes` are `lane::BYTES` each from `lanes_off`,
        // inside the heap (validated layout, `new`); `LaneWords` fits in
        // `lane::BYTES` and lane offsets are multiples of 64.
        unsafe { self.mem.view_unchecked(self.layout.lane(l)) }
    }

    /// Lane `l`, one this heap's lane set handed out (so below `nlanes`:
    /// the fast paths' lanes come from a thread's lane cache, keyed by the
    /// heap's id), without the bounds check of [`Meta::lane`].
    #[inline(always)]
    pub(crate) fn held_lane(&self, l: u32) -> &LaneWords {
        debug_assert!(l < self.layout.nlanes, "lane {l} of {}", self.layout.nlanes);
        // SAFETY: as in `lane`; `l < nlanes` because the lane set of a heap
        // with this layout only hands out lanes below `nlanes`.
        unsafe { self.mem.view_unchecked(self.layout.lane(l)) }
    }

    /// A `u64` field of lane `l`.
    #[inline]
    pub(crate) fn lane_u64(&self, l: u32, field: usize) -> &AtomicU64 {
        &self.lane(l).words[field / 8]
    }

    /// Cache count of class `c` in lane `l`.
    #[inline]
    pub(crate) fn cache_count(&self, l: u32, c: usize) -> &AtomicU32 {
        &self.lane(l).counts[c]
    }

    /// Cache entry `i` of class `c` in lane `l` (heap offset / 16).
    #[inline]
    pub(crate) fn cache_entry(&self, l: u32, c: usize, i: usize) -> &AtomicU32 {
        &self.lane(l).entries[c][i]
    }

    /// Byte offset of page `page`.
    #[inline]
    pub(crate) fn page_off(page: u64) -> usize {
        page as usize * PAGE_SIZE
    }

    /// The header of the slab at page `page`.
    #[inline]
    pub(crate) fn slab(&self, page: u64) -> &SlabWords {
        if page >= self.npages {
            bad_index("page", page);
        }
        // SAFETY: page `page` lies inside the heap (`page < npages`, `new`)
        // and `SlabWords` fits in a page.
        unsafe { self.mem.view_unchecked(Self::page_off(page)) }
    }

    /// Slab header tag of the slab at page `page`.
    pub(crate) fn slab_tag(&self, page: u64) -> &AtomicU32 {
        &self.slab(page).tag
    }

    /// Class field of the slab at page `page`.
    pub(crate) fn slab_class(&self, page: u64) -> &AtomicU32 {
        &self.slab(page).class
    }

    /// Owner field of the slab at page `page`.
    #[inline]
    pub(crate) fn slab_owner(&self, page: u64) -> &AtomicU64 {
        &self.slab(page).owner
    }

    /// Bitmap word `w` of the slab at page `page`.
    #[inline]
    pub(crate) fn slab_word(&self, page: u64, w: usize) -> &AtomicU64 {
        &self.slab(page).bitmap[w]
    }

    /// [`Meta::slab_word`] of block `idx` of the slab at page `head`, for a
    /// `(head, _, idx)` that [`Meta::block_at`] returned: no bounds checks
    /// (`block_at` found `head` below `npages` and `idx` below its class's
    /// block count, whose bitmap fits [`MAX_BITMAP_WORDS`]).
    #[inline(always)]
    pub(crate) fn block_word(&self, head: u64, idx: usize) -> &AtomicU64 {
        debug_assert!(head < self.npages && idx / 64 < MAX_BITMAP_WORDS);
        // SAFETY: the slab header lies in page `head`, inside the heap
        // (`head < npages`, `new`), and `idx / 64 < MAX_BITMAP_WORDS`.
        unsafe { self.mem.view_unchecked::<SlabWords>(Self::page_off(head)).bitmap.get_unchecked(idx / 64) }
    }

    /// Offset of block `idx` of class `info` in the slab at `page`.
    #[inline]
    pub(crate) fn block_off(page: u64, info: &ClassInfo, idx: usize) -> usize {
        Self::page_off(page) + info.data_start as usize + idx * info.size as usize
    }

    /// The root word in the header.
    pub(crate) fn root(&self) -> &AtomicU64 {
        self.mem.u64(hdr::ROOT)
    }

    /// Data page range `[first, end)`.
    #[inline(always)]
    pub(crate) fn data_pages(&self) -> (u64, u64) {
        (self.first_page, self.npages)
    }

    /// The fast path of [`Meta::locate`] for slab blocks: `(slab page,
    /// class, block index)` when `off` is the start of a block of a live
    /// slab, `None` otherwise (then ask `locate`).
    #[inline(always)]
    pub(crate) fn block_at(&self, off: usize) -> Option<(u64, usize, usize)> {
        let (first, end) = self.data_pages();
        let page = (off / PAGE_SIZE) as u64;
        if page < first || page >= end {
            return None;
        }
        let d = self.desc(page).load(std::sync::atomic::Ordering::Acquire);
        let (head, hd) = match d & 0xff {
            Desc::SLAB => (page, d),
            Desc::CONT => {
                let dist = d >> 8;
                if dist.wrapping_sub(1) >= SLAB_PAGES as u64 - 1 || dist > page - first {
                    return None;
                }
                (page - dist, self.desc(page - dist).load(std::sync::atomic::Ordering::Acquire))
            }
            _ => return None,
        };
        if hd & 0xff != Desc::SLAB {
            return None;
        }
        let c = ((hd >> 8) & 0xff) as usize;
        let info = CLASSES.get(c)?;
        let rel = (off - Self::page_off(head)).wrapping_sub(info.data_start as usize);
        if rel >= SLAB_BYTES {
            return None;
        }
        let idx = crate::size_class::block_index(info, rel)?;
        Some((head, c, idx))
    }

    /// Where a byte offset lands, as the allocator sees it.
    pub(crate) fn locate(&self, off: usize) -> Located {
        let (first, end) = self.data_pages();
        let page = (off / PAGE_SIZE) as u64;
        if page < first || page >= end {
            return Located::Outside;
        }
        let head = match self.desc_of(page) {
            Some(Desc::Slab(_)) => page,
            Some(Desc::Cont(d)) if d > 0 && d < SLAB_PAGES as u64 && d <= page - first => page - d,
            Some(Desc::Large(n)) if off.is_multiple_of(PAGE_SIZE) => return Located::Large { page, npages: n },
            _ => return Located::Nothing,
        };
        let Some(Desc::Slab(c)) = self.desc_of(head) else { return Located::Nothing };
        let Some(info) = CLASSES.get(c as usize) else { return Located::Nothing };
        let rel = off - Self::page_off(head);
        if rel >= SLAB_BYTES || rel < info.data_start as usize {
            return Located::Nothing;
        }
        match crate::size_class::block_index(info, rel - info.data_start as usize) {
            Some(idx) => Located::Block { slab: head, class: c as usize, idx },
            None => Located::Nothing,
        }
    }
}

impl Meta {
    /// The allocated block or page run that contains byte offset `off`:
    /// `(start offset, usable size)`. Blocks cached as free still count as
    /// allocated here; callers that care check the canary.
    pub(crate) fn containing(&self, off: usize) -> Option<(usize, usize)> {
        let (first, end) = self.data_pages();
        let page = (off / PAGE_SIZE) as u64;
        if page < first || page >= end {
            return None;
        }
        let head = match self.desc_of(page)? {
            Desc::Slab(_) | Desc::Large(_) => page,
            Desc::Cont(d) if d <= page - first => page - d,
            _ => return None,
        };
        match self.desc_of(head)? {
            Desc::Slab(c) if page - head < SLAB_PAGES as u64 => {
                let info = CLASSES.get(c as usize)?;
                let rel = (off - Self::page_off(head)).checked_sub(info.data_start as usize)?;
                let idx = rel / info.size as usize;
                if idx >= info.nblocks as usize
                    || self.slab_word(head, idx / 64).load(std::sync::atomic::Ordering::Acquire) & (1 << (idx % 64))
                        == 0
                {
                    return None;
                }
                Some((Self::block_off(head, info, idx), info.size as usize))
            }
            Desc::Large(n) if page - head < n => Some((Self::page_off(head), n as usize * PAGE_SIZE)),
            _ => None,
        }
    }
}

/// A page or lane index beyond the heap: a bug in remem (indexes come from
/// validated metadata), never something to continue from.
#[cold]
#[inline(never)]
fn bad_index(what: &str, i: u64) -> ! {
    panic!("remem bug: {what} {i} is outside the heap")
}

/// What [`Meta::locate`] found at an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Located {
    /// Not in the data pages.
    Outside,
    /// In the data pages but not the start of a block or run.
    Nothing,
    /// Start of block `idx` of the slab at page `slab`.
    Block { slab: u64, class: usize, idx: usize },
    /// Start of a page run.
    Large { page: u64, npages: u64 },
}
