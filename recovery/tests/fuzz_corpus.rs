//! Replays every committed fuzz corpus file (`fuzz/corpus/<target>/*`)
//! through the same entry points as the fuzz targets, on stable, as an
//! ordinary test: an input that once crashed stays fixed. `fuzz/README.md`
//! says how to add a target.

use std::path::Path;

use remem_recovery::transport::fuzzing;

/// A fuzz target's entry point.
type Entry = fn(&[u8]);

/// Fuzz target name, and its entry point.
const TARGETS: &[(&str, Entry)] = &[
    ("transport_target_handshake", fuzzing::target_handshake),
    ("transport_initiator_handshake", fuzzing::initiator_handshake),
    ("transport_sealed_frames", fuzzing::sealed_frames),
    ("transport_responses", fuzzing::responses),
    ("transport_requests", fuzzing::requests),
];

#[test]
fn every_corpus_file_runs_cleanly() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (target, entry) in TARGETS {
        let dir = corpus.join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{}: an empty corpus", dir.display());
        for f in &files {
            entry(&std::fs::read(f).unwrap());
        }
        eprintln!("{target}: {} inputs", files.len());
    }
}

/// Writes the starting inputs of `fuzzing::seeds` into the corpus
/// directories: `cargo test -p remem-recovery --test fuzz_corpus -- --ignored write_seeds`.
#[test]
#[ignore = "writes files: run by name when adding a target"]
fn write_seeds() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (k, (target, bytes)) in fuzzing::seeds().into_iter().enumerate() {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{k:02}")), bytes).unwrap();
    }
}
