//! SIGKILL during flushes, then recovery from the baseline file alone (the
//! host and its memory are gone): a child runs a transactional workload on
//! a heap whose baseline is a file, flushing every millisecond in the
//! background and acknowledging a transaction count after each explicit
//! flush; the parent kills it at a random instant and opens the heap from
//! the baseline. Every acknowledged-durable transaction must be there,
//! nothing half-applied, `check()` clean, and the open reports the epoch
//! and age of the baseline (the RPO).
//!
//! `REMEM_CRASH_ITERS=N` sets the number of kills (default 15).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use remem::alloc::TrackMode;
use remem::{Heap, HeapOptions};

mod common;
use common::{op, root, tx_step, verify_table, SLOTS};

fn opts() -> HeapOptions {
    HeapOptions::new(32 << 20).tracking(TrackMode::Fast).flush_interval(Some(Duration::from_millis(1)))
}

#[test]
fn child_flush_workload() {
    let Ok(path) = std::env::var("REMEM_CRASH_FLUSH_PATH") else { return };
    let heap = Heap::open_with(&path, &opts()).unwrap();
    let root = root(&heap);
    println!("ready");
    loop {
        for _ in 0..50 {
            tx_step(&heap, root);
        }
        heap.flush().unwrap();
        // SAFETY: the root is ours; the flush above made this count durable.
        println!("durable {}", unsafe { (*root).counter });
    }
}

fn run_and_kill(path: &Path, rng: &mut u64) -> u64 {
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_flush_workload", "--nocapture", "--test-threads=1", "-q"])
        .env("REMEM_CRASH_FLUSH_PATH", path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    common::kill_after(child, "durable ", Duration::from_micros(2_000 + common::next(rng) % 40_000))
}

#[test]
fn sigkill_during_flushes_then_open_from_the_baseline_alone() {
    if std::env::var("REMEM_CRASH_FLUSH_PATH").is_ok() {
        return;
    }
    let iters: usize = std::env::var("REMEM_CRASH_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    let dir: PathBuf = std::env::temp_dir().join(format!("remem-crash-flush-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("heap");
    Heap::create(&path, &opts()).unwrap().close().unwrap();
    let mut rng = 0x853c_49e6_748f_ea9bu64 ^ u64::from(std::process::id());
    let mut model = vec![u64::MAX; SLOTS];
    let (mut applied, mut durable_acked, mut lost_total, mut rolled_back) = (0u64, 0u64, 0u64, 0u64);
    let mut max_age = Duration::ZERO;
    for round in 0..iters {
        let acked = run_and_kill(&path, &mut rng);
        durable_acked = durable_acked.max(acked);
        let heap = Heap::open(&path).unwrap();
        let from = heap.opened_from().expect("opened from a baseline");
        max_age = max_age.max(from.age);
        rolled_back += heap.recovery_report().txs_rolled_back;
        let (counter, versions) = verify_table(&heap, 1);
        assert!(
            counter >= durable_acked,
            "round {round}: a transaction acknowledged as durable was lost: counter {counter} < {durable_acked}"
        );
        if counter < applied {
            // Undurable transactions of an earlier round are gone: restart the model.
            model = common::model(counter);
            applied = counter;
        }
        while applied < counter {
            let (key, action) = op(applied);
            model[key] = if action.is_some() { applied } else { u64::MAX };
            applied += 1;
        }
        assert_eq!(versions, model, "round {round}: the table differs from transactions 0..{counter}");
        lost_total += applied.saturating_sub(counter);
        heap.close().unwrap();
    }
    eprintln!(
        "{iters} kills during flushes: {applied} transactions recovered from the baseline, \
         {rolled_back} in flight rolled back, oldest baseline at open {max_age:?}"
    );
    let _ = lost_total;
    let _ = std::fs::remove_dir_all(&dir);
}
