//! The crash tests' workload lives in the recovery crate (`remem demo` runs
//! it too); this adds the harness that runs a child and kills it.
#![allow(unused_imports, dead_code)]

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::time::Duration;

pub use remem::recovery::workload::*;

/// Waits for the child to print `ready`, lets it run for `delay`, kills it
/// with SIGKILL and returns the last number it printed after `prefix`
/// (0 when none).
pub fn kill_after(mut child: Child, prefix: &'static str, delay: Duration) -> u64 {
    let out = BufReader::new(child.stdout.take().expect("the child's stdout is piped"));
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut last = 0;
        for line in out.lines().map_while(Result::ok) {
            if line == "ready" {
                let _ = tx.send(());
            } else if let Some(n) = line.strip_prefix(prefix) {
                last = n.parse().unwrap_or(last);
            }
        }
        last
    });
    rx.recv_timeout(Duration::from_secs(60)).expect("the child did not start");
    std::thread::sleep(delay);
    // SAFETY: kill(2) on our own child's pid; no memory is passed.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().expect("waiting for the killed child");
    reader.join().expect("the reader thread")
}

/// The next value of a xorshift generator.
pub fn next(rng: &mut u64) -> u64 {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    *rng
}
