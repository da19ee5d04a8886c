//! Crash harness: a child process runs a workload on a memfd heap that the
//! parent holds, acknowledging each commit over a pipe; the parent kills it
//! with SIGKILL at a random instant, then a fresh verifier process attaches
//! to the same memory, runs recovery and checks that every acknowledged
//! transaction is there, none is half-applied, `check()` passes and nothing
//! leaked beyond what the operation in flight could hold.
//!
//! `REMEM_CRASH_ITERS=N` sets the number of kills per workload (default 25).
//! Run: `cargo test --release --test crash_tx`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::ptr::NonNull;
use std::time::Duration;

use remem::{Heap, HeapOptions};

mod common;
use common::{fill, op, verify_value, Root, SLOTS};

fn child_fd() -> Option<OwnedFd> {
    let fd: i32 = std::env::var("REMEM_FD").ok()?.parse().ok()?;
    // SAFETY: the parent passed us this descriptor, which we now own.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

use common::root;

/// Child: the transactional workload.
#[test]
fn child_tx_workload() {
    if std::env::var("REMEM_CRASH_CHILD").as_deref() != Ok("tx") {
        return;
    }
    let heap = Heap::attach(child_fd().unwrap()).unwrap();
    let root = root(&heap);
    println!("ready");
    loop {
        common::tx_step(&heap, root);
        println!("ack {}", common::counter(root));
    }
}

/// Child: verifies the transactional workload after a crash.
#[test]
fn child_tx_verify() {
    if std::env::var("REMEM_CRASH_CHILD").as_deref() != Ok("verify-tx") {
        return;
    }
    let acked: u64 = std::env::var("REMEM_ACKED").unwrap().parse().unwrap();
    let heap = Heap::attach(child_fd().unwrap()).unwrap();
    let report = heap.recovery_report().clone();
    let Some(r) = heap.root() else {
        assert_eq!(acked, 0, "no root object, yet {acked} transactions were acknowledged");
        println!("result 0 0");
        return;
    };
    // SAFETY: the root is the table the workload wrote.
    let root = unsafe { &*r.cast::<Root>().as_ptr() };
    let counter = root.counter;
    assert!(counter >= acked, "acknowledged transaction lost: counter {counter} < acked {acked}");
    assert!(counter <= acked + 1, "counter {counter} is ahead of acked {acked} by more than the one in flight");
    let mut live = vec![r.as_ptr() as *const u8];
    let mut versions = Vec::with_capacity(SLOTS);
    for (key, s) in root.slots.iter().enumerate() {
        if s.value.is_null() {
            versions.push(u64::MAX);
            continue;
        }
        assert!(s.version < counter, "key {key}: version {} of an uncommitted transaction", s.version);
        live.push(s.value as *const u8);
        versions.push(s.version);
    }
    let check = heap.check_live(live.iter().copied());
    assert!(check.problems.is_empty() && check.doubly_owned.is_empty(), "{check}");
    assert!(check.leaked.len() <= 1, "{} blocks leaked: {check}", check.leaked.len());
    for (key, s) in root.slots.iter().enumerate() {
        if !s.value.is_null() {
            verify_value(s.value, key, Some(s.version)).unwrap();
        }
    }
    collect_leaks(&heap, &check.leaked);
    let v: Vec<String> = versions.iter().map(|v| v.to_string()).collect();
    println!("result {counter} {} {}", report.txs_rolled_back + report.txs_finished, v.join(","));
}

/// Child: raw `alloc_into`/`free` workload without transactions.
#[test]
fn child_raw_workload() {
    if std::env::var("REMEM_CRASH_CHILD").as_deref() != Ok("raw") {
        return;
    }
    let heap = Heap::attach(child_fd().unwrap()).unwrap();
    let table = heap.root_or_alloc(SLOTS * 8).unwrap().0.cast::<*mut u8>().as_ptr();
    println!("ready");
    for i in 0u64.. {
        let (key, size) = op(i);
        // SAFETY: `key < SLOTS`: a slot of the table.
        let slot = unsafe { table.add(key) };
        // SAFETY: as above.
        match NonNull::new(unsafe { slot.read() }) {
            Some(p) => {
                // Unlink, then free: a crash in between leaks this one block.
                // SAFETY: as above.
                unsafe { slot.write(std::ptr::null_mut()) };
                heap.free(p).unwrap();
            }
            None => {
                let size = size.unwrap_or(64);
                let p = heap.alloc_into(slot, size).unwrap();
                fill(p, key, i, size);
            }
        }
    }
}

/// Child: verifies the raw workload after a crash.
#[test]
fn child_raw_verify() {
    if std::env::var("REMEM_CRASH_CHILD").as_deref() != Ok("verify-raw") {
        return;
    }
    let heap = Heap::attach(child_fd().unwrap()).unwrap();
    let Some(r) = heap.root() else {
        println!("result 0");
        return;
    };
    let table = r.cast::<*mut u8>().as_ptr();
    // SAFETY: the root is the slot table.
    let slots: Vec<*mut u8> = (0..SLOTS).map(|k| unsafe { table.add(k).read() }).collect();
    let live: Vec<*const u8> = std::iter::once(r.as_ptr() as *const u8)
        .chain(slots.iter().filter(|p| !p.is_null()).map(|p| *p as *const u8))
        .collect();
    let check = heap.check_live(live.iter().copied());
    assert!(check.problems.is_empty(), "{check}");
    assert!(check.doubly_owned.is_empty(), "a slot names a block that is not allocated: {check}");
    assert!(check.leaked.len() <= 1, "{} blocks leaked: {check}", check.leaked.len());
    // Only the block allocated by the operation in flight may be unfilled.
    let bad = slots.iter().enumerate().filter(|(k, p)| !p.is_null() && verify_value(**p, *k, None).is_err()).count();
    assert!(bad <= 1, "{bad} value blocks are damaged");
    collect_leaks(&heap, &check.leaked);
    // Repair the one in flight so later rounds see a consistent table.
    for (k, p) in slots.iter().enumerate() {
        if !p.is_null() && verify_value(*p, k, None).is_err() {
            fill(NonNull::new(*p).unwrap(), k, 0, 32);
        }
    }
    println!("result {} {}", heap.recovery_report().allocs_completed, heap.recovery_report().allocs_rolled_back);
}

/// Frees the blocks a crash leaked (the test's garbage collector), so that
/// every round starts with none.
fn collect_leaks(heap: &Heap, leaked: &[u64]) {
    for &off in leaked {
        heap.free(NonNull::new(heap.base().wrapping_add(off as usize)).unwrap()).unwrap();
    }
}

fn spawn(role: &str, test: &str, fd: &OwnedFd, acked: u64) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1", "-q"])
        .env("REMEM_CRASH_CHILD", role)
        .env("REMEM_FD", fd.as_raw_fd().to_string())
        .env("REMEM_ACKED", acked.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// A heap in a memfd that the parent holds; its descriptor survives exec.
fn shared_heap() -> OwnedFd {
    let heap = Heap::create_memfd(&HeapOptions::new(64 << 20)).unwrap();
    // SAFETY: dup of a descriptor we hold; the copy has no CLOEXEC flag.
    let fd = unsafe { libc::dup(heap.memfd().as_raw_fd()) };
    assert!(fd >= 0);
    drop(heap);
    // SAFETY: `fd` is a fresh descriptor we own.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn iters() -> usize {
    std::env::var("REMEM_CRASH_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(25)
}

/// Runs a workload child, kills it after a random delay, returns the last ack.
fn run_and_kill(role: &str, test: &str, fd: &OwnedFd, rng: &mut u64) -> u64 {
    common::kill_after(spawn(role, test, fd, 0), "ack ", Duration::from_micros(common::next(rng) % 20_000))
}

fn verify(role: &str, test: &str, fd: &OwnedFd, acked: u64) -> Vec<String> {
    let child = spawn(role, test, fd, acked);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "verifier failed ({}) after {acked} acks: {stdout}", out.status);
    let line = stdout.lines().find_map(|l| l.strip_prefix("result ")).expect("verifier printed no result");
    line.split(' ').map(str::to_owned).collect()
}

#[test]
fn transactions_survive_sigkill() {
    if std::env::var("REMEM_CRASH_CHILD").is_ok() {
        return;
    }
    let fd = shared_heap();
    let mut rng = 0x2545_f491_4f6c_dd1du64 ^ u64::from(std::process::id());
    // The parent's model of the table: version per key, advanced by replaying ops.
    let mut model = vec![u64::MAX; SLOTS];
    let mut applied = 0u64;
    let (mut kills, mut recovered_txs) = (0, 0u64);
    for _ in 0..iters() {
        // Acks are counter values; the last verified counter counts as acked.
        let acked = run_and_kill("tx", "child_tx_workload", &fd, &mut rng).max(applied);
        let res = verify("verify-tx", "child_tx_verify", &fd, acked);
        kills += 1;
        let counter: u64 = res[0].parse().unwrap();
        recovered_txs += res[1].parse::<u64>().unwrap();
        while applied < counter {
            let (key, action) = op(applied);
            model[key] = if action.is_some() { applied } else { u64::MAX };
            applied += 1;
        }
        if counter > 0 {
            let got: Vec<u64> = res[2].split(',').map(|v| v.parse().unwrap()).collect();
            assert_eq!(got, model, "the recovered table differs from the committed transactions");
        }
    }
    eprintln!("transactions: {kills} kills, {applied} transactions committed, {recovered_txs} in flight recovered");
}

#[test]
fn raw_alloc_into_survives_sigkill() {
    if std::env::var("REMEM_CRASH_CHILD").is_ok() {
        return;
    }
    let fd = shared_heap();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    let (mut completed, mut rolled_back) = (0u64, 0u64);
    for _ in 0..iters() {
        run_and_kill("raw", "child_raw_workload", &fd, &mut rng);
        let res = verify("verify-raw", "child_raw_verify", &fd, 0);
        if res.len() == 2 {
            completed += res[0].parse::<u64>().unwrap();
            rolled_back += res[1].parse::<u64>().unwrap();
        }
    }
    eprintln!("raw: {} kills, {completed} alloc_into completed and {rolled_back} rolled back by recovery", iters());
}
