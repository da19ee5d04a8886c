//! Whole-image passes that do not touch the holes of a memfd (reading a
//! hole through a shared mapping would allocate a page for it).

/// One zero page.
static ZERO: [u8; 4096] = [0; 4096];

/// Whether page `p` lies in one of the sorted, disjoint `ranges` (bytes).
pub(crate) fn in_ranges(ranges: &[(u64, u64)], p: u64) -> bool {
    let at = p * 4096;
    match ranges.binary_search_by(|&(s, _)| s.cmp(&at)) {
        Ok(_) => true,
        Err(0) => false,
        Err(i) => at < ranges[i - 1].1,
    }
}

/// Calls `f(page, bytes, is_data)` for every page of `image`, with a
/// shared zero page (and `is_data` false) for pages outside `ranges` and
/// not in `extra` (sorted).
pub fn for_each_page(image: &[u8], ranges: &[(u64, u64)], extra: &[u64], mut f: impl FnMut(u64, &[u8], bool)) {
    for (p, page) in image.chunks_exact(4096).enumerate() {
        let p = p as u64;
        if in_ranges(ranges, p) || extra.binary_search(&p).is_ok() {
            f(p, page, true);
        } else {
            f(p, &ZERO, false);
        }
    }
}

/// BLAKE3 of `image`, holes read as zeros without touching them.
pub fn image_digest(image: &[u8], ranges: &[(u64, u64)], extra: &[u64]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for_each_page(image, ranges, extra, |_, page, _| {
        h.update(page);
    });
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_hash_as_zeros() {
        let mut img = vec![0u8; 8 * 4096];
        img[4096 * 3 + 5] = 7;
        img[4096 * 6] = 9;
        let full = *blake3::hash(&img).as_bytes();
        assert_eq!(image_digest(&img, &[(3 * 4096, 4 * 4096)], &[6]), full);
        assert_ne!(image_digest(&img, &[(3 * 4096, 4 * 4096)], &[]), full, "page 6 is data");
        assert!(in_ranges(&[(0, 4096), (8192, 16384)], 3));
        assert!(!in_ranges(&[(0, 4096), (8192, 16384)], 1));
    }
}
