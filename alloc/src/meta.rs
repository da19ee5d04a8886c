//! Typed access to the allocator metadata inside a heap's bytes: page
//! descriptors, slab headers and bitmaps, lanes. Shared by a live heap and
//! by a heap image being recovered or checked (which may sit at another
//! address: metadata holds offsets only).

use std::sync::atomic::{AtomicU32, AtomicU64};

use crate::format::{hdr, lane, slab, Desc, Header, Layout, PAGE_SIZE};
use crate::mem::Mem;
use crate::size_class::{ClassInfo, CLASSES, SLAB_BYTES, SLAB_PAGES};

/// A heap's metadata, viewed through its bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Meta {
    pub mem: Mem,
    pub layout: Layout,
    /// The base address recorded in the header: raw pointers stored in the
    /// heap (roots, `alloc_into` destinations) are relative to it.
    pub recorded_base: u64,
}

impl Meta {
    pub(crate) fn new(mem: Mem, header: &Header) -> Meta {
        Meta { mem, layout: header.layout, recorded_base: header.base }
    }

    /// Descriptor of page `page`.
    #[inline]
    pub(crate) fn desc(&self, page: u64) -> &AtomicU64 {
        self.mem.u64(self.layout.desc(page))
    }

    /// Decoded descriptor of page `page` (`None`: unknown kind).
    #[inline]
    pub(crate) fn desc_of(&self, page: u64) -> Option<Desc> {
        Desc::decode(self.desc(page).load(std::sync::atomic::Ordering::Acquire))
    }

    /// A `u64` field of lane `l`.
    #[inline]
    pub(crate) fn lane_u64(&self, l: u32, field: usize) -> &AtomicU64 {
        self.mem.u64(self.layout.lane(l) + field)
    }

    /// Cache count of class `c` in lane `l`.
    #[inline]
    pub(crate) fn cache_count(&self, l: u32, c: usize) -> &AtomicU32 {
        self.mem.u32(self.layout.lane(l) + lane::count(c))
    }

    /// Cache entry `i` of class `c` in lane `l` (heap offset / 16).
    #[inline]
    pub(crate) fn cache_entry(&self, l: u32, c: usize, i: usize) -> &AtomicU32 {
        self.mem.u32(self.layout.lane(l) + lane::entry(c, i))
    }

    /// Byte offset of page `page`.
    #[inline]
    pub(crate) fn page_off(page: u64) -> usize {
        page as usize * PAGE_SIZE
    }

    /// Slab header tag of the slab at page `page`.
    pub(crate) fn slab_tag(&self, page: u64) -> &AtomicU32 {
        self.mem.u32(Self::page_off(page) + slab::TAG_OFF)
    }

    /// Class field of the slab at page `page`.
    pub(crate) fn slab_class(&self, page: u64) -> &AtomicU32 {
        self.mem.u32(Self::page_off(page) + slab::CLASS)
    }

    /// Owner field of the slab at page `page`.
    #[inline]
    pub(crate) fn slab_owner(&self, page: u64) -> &AtomicU64 {
        self.mem.u64(Self::page_off(page) + slab::OWNER)
    }

    /// Bitmap word `w` of the slab at page `page`.
    #[inline]
    pub(crate) fn slab_word(&self, page: u64, w: usize) -> &AtomicU64 {
        self.mem.u64(Self::page_off(page) + slab::BITMAP + 8 * w)
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
    pub(crate) fn data_pages(&self) -> (u64, u64) {
        (self.layout.first_data_page(), self.layout.npages())
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
                if dist == 0 || dist >= SLAB_PAGES as u64 || dist > page - first {
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
