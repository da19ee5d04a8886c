//! N pairs of 64 B allocate + write the first byte + free, on one thread,
//! in a memfd-only heap or in glibc's malloc: a fixed workload for
//! instruction counts (the README's callgrind figure) and profilers.
//!
//! ```text
//! cargo build --release -p remem-alloc --example alloc_pairs
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/alloc_pairs 2000000 remem
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/alloc_pairs 2000000 glibc
//! ```
//!
//! "I refs" divided by N is the instructions per pair (the heap's creation
//! adds well under one per pair at N = 2 000 000).

use std::hint::black_box;

use remem_alloc::{Heap, HeapOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().map_or(Ok(1_000_000), |s| s.parse())?;
    let system = args.next().unwrap_or_else(|| "remem".into());
    match system.as_str() {
        "remem" => {
            let heap = Heap::create_memfd(&HeapOptions::new(64 << 20))?;
            for i in 0..n {
                let p = heap.alloc(64)?;
                // SAFETY: `p` is a fresh block of at least 64 bytes.
                unsafe { p.as_ptr().write(i as u8) };
                heap.free(black_box(p))?;
            }
        }
        "glibc" => {
            for i in 0..n {
                // SAFETY: malloc's result is checked, written within its 64
                // bytes and freed once.
                unsafe {
                    let p = libc::malloc(64).cast::<u8>();
                    assert!(!p.is_null(), "malloc failed");
                    p.write(i as u8);
                    libc::free(black_box(p).cast());
                }
            }
        }
        other => return Err(format!("unknown system {other} (remem or glibc)").into()),
    }
    Ok(())
}
