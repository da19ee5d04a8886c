//! Replays the committed corpora of the alloc crate's fuzz targets
//! (`fuzz/corpus/<target>/*`, see `fuzz/README.md`) through the same entry
//! points on stable Rust, and feeds each entry point a real input with
//! every byte of its header area flipped in turn (and a sample of the rest):
//! no input may panic.

use std::path::PathBuf;

use remem_alloc::baseline::{Baseline, FaultyBackend};
use remem_alloc::fuzzing;
use remem_alloc::{Heap, HeapOptions};

type Entry = fn(&[u8]);

const TARGETS: &[(&str, Entry)] = &[
    ("baseline_file", fuzzing::baseline_file),
    ("heap_header", fuzzing::heap_header),
    ("control_region", fuzzing::control_region),
];

#[test]
fn committed_corpora_replay_without_a_panic() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let mut n = 0;
    for (target, entry) in TARGETS {
        let Ok(dir) = std::fs::read_dir(root.join(target)) else { continue };
        for f in dir {
            let path = f.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            entry(&data);
            n += 1;
        }
    }
    eprintln!("fuzz_corpus: replayed {n} inputs");
}

/// A real baseline (1 MiB heap, two commits), as bytes.
fn real_baseline() -> Vec<u8> {
    let backend = FaultyBackend::new();
    let heap =
        Heap::create_on(std::sync::Arc::new(backend.clone()), &HeapOptions::new(1 << 20).flush_interval(None)).unwrap();
    let (root, _) = heap.root_or_alloc(64).unwrap();
    // SAFETY: the root is a fresh 64-byte block.
    unsafe { root.as_ptr().write_bytes(0x33, 64) };
    heap.flush().unwrap();
    // SAFETY: as above.
    unsafe { root.as_ptr().write_bytes(0x44, 64) };
    heap.flush().unwrap();
    drop(heap);
    backend.durable_image()
}

#[test]
fn every_flipped_byte_of_a_real_baseline_is_handled() {
    let image = real_baseline();
    assert!(Baseline::open(FaultyBackend::from_image(image.clone())).is_ok());
    // The fields of both superblock slots and the start of the CRC table:
    // every byte; the rest of the file: a deterministic sample.
    let dense = (0..256).chain(4096..4096 + 256).chain(8192..8192 + 64);
    let sparse = (8192 + 64..image.len()).step_by(4099);
    for i in dense.chain(sparse) {
        let mut bad = image.clone();
        bad[i] ^= 0x01;
        fuzzing::baseline_file(&bad);
    }
    // Truncations.
    for len in [0, 1, 4095, 4096, 8191, 8192, 12288, image.len() / 2, image.len() - 1] {
        fuzzing::baseline_file(&image[..len]);
    }
    // Page 0 of the heap as a header.
    let b = Baseline::open(FaultyBackend::from_image(image)).unwrap();
    let mut page = vec![0u8; 4096];
    b.read_page(0, &mut page).unwrap();
    for i in 0..256 {
        let mut bad = page.clone();
        bad[i] ^= 0x10;
        fuzzing::heap_header(&bad);
    }
}
