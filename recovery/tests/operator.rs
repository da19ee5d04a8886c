//! What a confused operator can do to a baseline, and what remem now does
//! about it (issue 10, items 10-13): the lock is on the file itself, so a
//! symlink or a hard link to a live heap's baseline meets it; `check` and
//! `inspect` never write; a discarded superblock slot is reported.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use remem_alloc::baseline::format::{sb, SLOT_SIZE};
use remem_alloc::baseline::{Baseline, FileBackend};
use remem_alloc::{BaselineLock, Error, Heap, HeapOptions, OpenError};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("remem-operator-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn remem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_remem")).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A heap with some committed data, closed.
fn make_heap(path: &Path) {
    let heap = Heap::create(path, &HeapOptions::new(8 << 20).flush_interval(None)).unwrap();
    let (root, _) = heap.root_or_alloc(64).unwrap();
    // SAFETY: the root is a fresh 64-byte block.
    unsafe { root.as_ptr().write_bytes(0x5a, 64) };
    heap.flush().unwrap();
    // A second commit, so that both superblock slots hold a commit.
    // SAFETY: as above.
    unsafe { root.as_ptr().write_bytes(0x5b, 64) };
    heap.flush().unwrap();
    heap.close().unwrap();
}

fn locked(r: Result<Heap, Error>) -> bool {
    matches!(r, Err(Error::Open(OpenError::Locked(_))))
}

#[test]
fn a_symlink_or_hard_link_to_a_live_baseline_meets_its_lock() {
    let d = dir("links");
    let path = d.join("db.heap");
    make_heap(&path);
    let live = Heap::open_with(&path, &HeapOptions::new(0).flush_interval(None)).unwrap();
    let sym = d.join("sym.heap");
    std::os::unix::fs::symlink(&path, &sym).unwrap();
    let hard = d.join("hard.heap");
    std::fs::hard_link(&path, &hard).unwrap();
    for p in [&path, &sym, &hard] {
        assert!(locked(Heap::open_with(p, &HeapOptions::new(0).flush_interval(None))), "{}", p.display());
        assert!(locked(Heap::open_with(p, &HeapOptions::new(0).read_only(true))), "{}", p.display());
        assert!(BaselineLock::take(p).is_err(), "{}", p.display());
        // The CLI check through the link refuses, and writes nothing.
        let o = remem(&["check", p.to_str().unwrap()]);
        assert!(!o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("in use"), "{}", text(&o));
    }
    // The live writer was not disturbed: it still flushes and commits.
    let (root, _) = live.root_or_alloc(64).unwrap();
    // SAFETY: the root block is 64 bytes.
    unsafe { root.as_ptr().write_bytes(0x77, 64) };
    live.flush().unwrap();
    live.close().unwrap();
    // Once it is closed, the link opens it.
    let h = Heap::open_with(&sym, &HeapOptions::new(0).flush_interval(None)).unwrap();
    // SAFETY: the root block is 64 bytes.
    assert_eq!(unsafe { *h.root().unwrap().as_ptr() }, 0x77);
    h.close().unwrap();
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn check_and_inspect_never_write_the_baseline() {
    let d = dir("readonly");
    let path = d.join("db.heap");
    make_heap(&path);
    let before = std::fs::read(&path).unwrap();
    let o = remem(&["check", path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("read-only"), "{}", text(&o));
    let o = remem(&["inspect", path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(&path).unwrap(), before, "check or inspect changed the baseline");
    // Two readers at once are fine (shared lock: a read-only open here, a
    // `check` in another process); a writer is kept out meanwhile.
    let r1 = Heap::open_with(&path, &HeapOptions::new(0).read_only(true)).unwrap();
    let o = remem(&["check", path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(BaselineLock::take(&path).is_err());
    assert!(r1.check().is_ok());
    r1.close().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), before, "a read-only open changed the baseline");
    // --repair commits.
    let o = remem(&["check", "--repair", path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_ne!(std::fs::read(&path).unwrap(), before, "--repair committed nothing");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_damaged_newest_superblock_is_reported_not_silently_rolled_back() {
    let d = dir("slot");
    let path = d.join("db.heap");
    make_heap(&path);
    let seq = Baseline::open(FileBackend::open(&path).unwrap()).unwrap().info().seq;
    let newest = seq % 2;
    // Damage one byte of the newest slot's sequence number (its CRC no longer matches).
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(newest * SLOT_SIZE) as usize + sb::SEQ] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();

    let b = Baseline::open(FileBackend::open_read_only(&path).unwrap()).unwrap();
    let disc = b.discarded_slot().expect("the damaged slot is reported");
    assert_eq!(disc.slot, newest);
    assert!(b.info().seq < seq, "opened from the older slot");

    let o = remem(&["inspect", path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("WARNING: superblock slot"), "{}", text(&o));
    let o = remem(&["check", path.to_str().unwrap()]);
    assert!(text(&o).contains("WARNING: superblock slot"), "{}", text(&o));
    let h = Heap::open_with(&path, &HeapOptions::new(0).read_only(true)).unwrap();
    assert_eq!(h.opened_from().unwrap().discarded_slot.unwrap().slot, newest);
    h.close().unwrap();
    let _ = std::fs::remove_dir_all(&d);
}
