//! Size classes: pure arithmetic, no memory touched.
//!
//! Small objects (up to [`MAX_SMALL`] bytes) live in slabs of
//! [`SLAB_PAGES`] pages that hold blocks of one class; larger objects get
//! page runs. Classes step by 16 bytes up to 128, then by quarters of each
//! power of two, which bounds internal waste at 25 %.

use crate::format::PAGE_SIZE;

/// Pages per slab.
pub const SLAB_PAGES: usize = 16;
/// Bytes per slab.
pub const SLAB_BYTES: usize = SLAB_PAGES * PAGE_SIZE;
/// Largest size served from slabs.
pub const MAX_SMALL: usize = 8192;
/// Bytes of slab header before the bitmap (tag, class, owner).
pub const SLAB_HEADER: usize = 64;
/// Block sizes of the classes.
pub const CLASS_SIZES: [u32; NCLASSES] = [
    16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 1792,
    2048, 2560, 3072, 3584, 4096, 5120, 6144, 7168, 8192,
];
/// Number of classes.
pub const NCLASSES: usize = 32;

/// What a class's slabs look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassInfo {
    /// Block size in bytes.
    pub size: u32,
    /// Blocks per slab.
    pub nblocks: u32,
    /// Offset of the first block from the slab start (64-byte aligned).
    pub data_start: u32,
    /// `ceil(2^32 / size)`: `(rel * magic) >> 32 == rel / size` for every
    /// `rel < SLAB_BYTES`, which avoids a division on the free path.
    pub magic: u64,
    /// Blocks a thread's cache holds at most.
    pub cache_cap: u32,
}

const fn bitmap_words(nblocks: usize) -> usize {
    nblocks.div_ceil(64)
}

const fn header_bytes(nblocks: usize) -> usize {
    (SLAB_HEADER + bitmap_words(nblocks) * 8).next_multiple_of(64)
}

const fn class_info(size: u32) -> ClassInfo {
    let s = size as usize;
    let mut n = SLAB_BYTES / s;
    while header_bytes(n) + n * s > SLAB_BYTES {
        n -= 1;
    }
    let cap = CACHE_BYTES / s;
    let cap = if cap < 4 {
        4
    } else if cap > CACHE_CAP {
        CACHE_CAP
    } else {
        cap
    };
    ClassInfo {
        size,
        nblocks: n as u32,
        data_start: header_bytes(n) as u32,
        magic: (1u64 << 32).div_ceil(size as u64),
        cache_cap: cap as u32,
    }
}

/// Entries of a per-thread cache array (the largest `cache_cap`).
pub const CACHE_CAP: usize = 32;
/// Bytes a per-thread cache aims to hold per class.
const CACHE_BYTES: usize = 32 * 1024;

/// Class layouts, indexed by class.
pub const CLASSES: [ClassInfo; NCLASSES] = {
    let mut out = [ClassInfo { size: 0, nblocks: 0, data_start: 0, magic: 0, cache_cap: 0 }; NCLASSES];
    let mut i = 0;
    while i < NCLASSES {
        out[i] = class_info(CLASS_SIZES[i]);
        i += 1;
    }
    out
};

/// `SIZE_TO_CLASS[(size + 15) / 16]` is the smallest class that holds `size`.
const SIZE_TO_CLASS: [u8; MAX_SMALL / 16 + 1] = {
    let mut t = [0u8; MAX_SMALL / 16 + 1];
    let mut i = 0;
    let mut c = 0;
    while i < t.len() {
        while (CLASS_SIZES[c] as usize) < i * 16 {
            c += 1;
        }
        t[i] = c as u8;
        i += 1;
    }
    t
};

/// The class for `size` bytes at `align` (a power of two), or `None` when
/// the request needs a page run.
#[inline]
pub fn class_for(size: usize, align: usize) -> Option<usize> {
    if size > MAX_SMALL {
        return None;
    }
    let mut c = SIZE_TO_CLASS[size.div_ceil(16)] as usize;
    if align <= 16 {
        return Some(c);
    }
    if align > 64 {
        return None;
    }
    // Blocks start at 64-byte aligned offsets; a class whose size is a
    // multiple of `align` keeps every block aligned.
    while c < NCLASSES {
        if (CLASS_SIZES[c] as usize).is_multiple_of(align) {
            return Some(c);
        }
        c += 1;
    }
    None
}

/// The smallest class that holds `size` bytes (`1 ..= MAX_SMALL`) at the
/// default alignment of 16.
#[inline(always)]
pub fn class_small(size: usize) -> usize {
    debug_assert!((1..=MAX_SMALL).contains(&size));
    SIZE_TO_CLASS[size.div_ceil(16)] as usize
}

/// Block index of byte offset `rel` (from the first block) in class `info`,
/// or `None` when `rel` is not the start of a block.
#[inline]
pub fn block_index(info: &ClassInfo, rel: usize) -> Option<usize> {
    let idx = ((rel as u64 * info.magic) >> 32) as usize;
    if idx * info.size as usize == rel && idx < info.nblocks as usize {
        Some(idx)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_fit_their_slabs() {
        for info in CLASSES {
            let words = (info.nblocks as usize).div_ceil(64);
            assert!(SLAB_HEADER + words * 8 <= info.data_start as usize);
            assert_eq!(info.data_start % 64, 0);
            assert!(info.data_start as usize + info.nblocks as usize * info.size as usize <= SLAB_BYTES);
            assert!(info.nblocks >= 7, "{info:?}");
            assert!(info.cache_cap as usize <= CACHE_CAP && info.cache_cap >= 4);
        }
    }

    #[test]
    fn class_for_is_smallest_fit() {
        for size in 1..=MAX_SMALL {
            let c = class_for(size, 8).unwrap();
            assert!(CLASS_SIZES[c] as usize >= size);
            assert!(c == 0 || (CLASS_SIZES[c - 1] as usize) < size);
        }
        assert_eq!(class_for(MAX_SMALL + 1, 8), None);
        for align in [32, 64] {
            for size in 1..=MAX_SMALL {
                if let Some(c) = class_for(size, align) {
                    assert_eq!(CLASS_SIZES[c] as usize % align, 0);
                    assert!(CLASS_SIZES[c] as usize >= size);
                }
            }
        }
        assert_eq!(class_for(8, 128), None);
    }

    #[test]
    fn magic_division_is_exact() {
        for info in CLASSES {
            for rel in 0..SLAB_BYTES {
                let want = (rel % info.size as usize == 0 && rel / (info.size as usize) < info.nblocks as usize)
                    .then(|| rel / info.size as usize);
                assert_eq!(block_index(&info, rel), want, "size {} rel {rel}", info.size);
            }
        }
    }
}
