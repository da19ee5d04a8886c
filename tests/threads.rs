//! Several threads allocate, free each other's blocks, and check at the end.

use std::sync::{Arc, Mutex};

use remem::{Heap, HeapOptions};

#[test]
fn threads_allocate_and_free_across_threads_then_check_passes() {
    let dir = std::env::temp_dir().join(format!("remem-threads-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("heap");
    let _ = std::fs::remove_file(&path);
    let heap = Arc::new(Heap::create(&path, &HeapOptions::new(256 << 20)).unwrap());
    // Blocks handed between threads, freed by whoever takes them.
    let exchange: Arc<Mutex<Vec<(usize, usize, u8)>>> = Arc::default();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let heap = heap.clone();
            let exchange = exchange.clone();
            std::thread::spawn(move || {
                let mut rng = t.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                let mut mine: Vec<(usize, usize, u8)> = Vec::new();
                for i in 0..60_000u64 {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let size = match rng % 16 {
                        0 => 8193 + (rng >> 8) as usize % 40_000,
                        1..=4 => 512 + (rng >> 8) as usize % 7680,
                        _ => 1 + (rng >> 8) as usize % 512,
                    };
                    let fill = (rng >> 40) as u8;
                    let p = heap.alloc(size).unwrap();
                    // SAFETY: our fresh block.
                    unsafe { std::ptr::write_bytes(p.as_ptr(), fill, size) };
                    if i % 3 == 0 {
                        exchange.lock().unwrap().push((p.as_ptr() as usize, size, fill));
                    } else {
                        mine.push((p.as_ptr() as usize, size, fill));
                    }
                    if mine.len() > 500 || rng % 4 == 0 {
                        let taken = if rng % 2 == 0 { exchange.lock().unwrap().pop() } else { None };
                        if let Some(x) = taken
                            .or_else(|| (!mine.is_empty()).then(|| mine.swap_remove((rng >> 20) as usize % mine.len())))
                        {
                            // SAFETY: a live block of `x.1` bytes.
                            let ok =
                                unsafe { std::slice::from_raw_parts(x.0 as *const u8, x.1) }.iter().all(|&b| b == x.2);
                            assert!(ok, "block damaged: another thread wrote into it");
                            heap.free(std::ptr::NonNull::new(x.0 as *mut u8).unwrap()).unwrap();
                        }
                    }
                }
                mine
            })
        })
        .collect();
    let mut live: Vec<(usize, usize, u8)> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    live.extend(exchange.lock().unwrap().drain(..));
    for &(p, size, fill) in &live {
        // SAFETY: live blocks.
        assert!(unsafe { std::slice::from_raw_parts(p as *const u8, size) }.iter().all(|&b| b == fill));
    }
    let report = heap.check_live(live.iter().map(|x| x.0 as *const u8));
    assert!(report.is_ok(), "{report}");
    assert!(report.allocated_blocks + report.large_runs == live.len() as u64, "{report}");
}
