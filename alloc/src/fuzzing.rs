//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz, its own
//! workspace) and for the tests that replay their corpora on stable Rust
//! (`alloc/tests/fuzz_corpus.rs`): each takes arbitrary bytes, as read from
//! a file, a memfd or a socket, and must return without panicking whatever
//! they hold. Not part of the API a database uses.

use crate::baseline::{Baseline, FaultyBackend};
use crate::control::ControlView;
use crate::format::{Header, PAGE_SIZE};

/// The largest heap a fuzz input may describe and still be loaded (bigger
/// ones are decoded and validated, not loaded).
const LOAD_CAP: u64 = 16 << 20;

/// A baseline file: both superblock slots, the CRC table, the journal
/// index, then (for small heaps) a full load and a read of every page.
pub fn baseline_file(data: &[u8]) {
    let Ok(b) = Baseline::open(FaultyBackend::from_image(data.to_vec())) else { return };
    let _ = b.info();
    let _ = b.discarded_slot().map(|d| d.to_string());
    if b.heap_size() > LOAD_CAP {
        return;
    }
    let mut img = vec![0u8; b.heap_size() as usize];
    if b.load_into(&mut img).is_err() {
        return;
    }
    let mut page = vec![0u8; PAGE_SIZE];
    for p in 0..b.npages() {
        if b.read_page(p, &mut page).is_err() {
            return;
        }
        let _ = b.page_crc(p);
    }
}

/// A heap header page (page 0 of every heap image and memfd).
pub fn heap_header(data: &[u8]) {
    if let Ok(h) = Header::decode(data) {
        let _ = h.layout.npages();
        let _ = h.encode();
    }
}

/// A control region (the dirty lists another process or host hands over).
pub fn control_region(data: &[u8]) {
    if let Ok(v) = ControlView::decode(data) {
        assert!(v.dirty.iter().all(|&p| p < v.npages), "a decoded dirty page lies outside the heap");
    }
}
