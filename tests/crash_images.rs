//! Crash images: while worker threads allocate and free, the test stops
//! them at random instants (a signal whose handler spins), copies the
//! heap's memory, runs recovery on the copy and requires `check()` to pass,
//! with every block that the heap's own slots name allocated.
//!
//! `REMEM_SNAPSHOTS=N` sets the number of images (default 150).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use remem::alloc::{check_image, image_base, recover_image};
use remem::{Heap, HeapOptions};

static PAUSE: AtomicBool = AtomicBool::new(false);
static PARKED: AtomicUsize = AtomicUsize::new(0);

extern "C" fn park(_: libc::c_int) {
    PARKED.fetch_add(1, Ordering::SeqCst);
    while PAUSE.load(Ordering::SeqCst) {
        std::hint::spin_loop();
    }
    PARKED.fetch_sub(1, Ordering::SeqCst);
}

const SLOTS: usize = 256;
const WORKERS: usize = 2;

#[test]
fn recovery_of_images_taken_at_random_instants_passes_check() {
    let snapshots: usize = std::env::var("REMEM_SNAPSHOTS").ok().and_then(|s| s.parse().ok()).unwrap_or(150);
    // SAFETY: installs a handler that only touches atomics.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = park as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
    let dir = std::env::temp_dir().join(format!("remem-images-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("heap");
    let _ = std::fs::remove_file(&path);
    let heap = Arc::new(Heap::create(&path, &HeapOptions::new(16 << 20)).unwrap());
    // Each worker owns SLOTS pointer slots inside the heap: the database's
    // "data structure". Blocks are only ever reachable through a slot.
    let tables: Vec<usize> = (0..WORKERS).map(|_| heap.alloc_zeroed(SLOTS * 8).unwrap().as_ptr() as usize).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = tables
        .iter()
        .enumerate()
        .map(|(w, &table)| {
            let (heap, stop) = (heap.clone(), stop.clone());
            let (tx, rx) = std::sync::mpsc::channel();
            let h = std::thread::spawn(move || {
                // SAFETY: pthread_self has no preconditions.
                tx.send(unsafe { libc::pthread_self() }).unwrap();
                let slots = table as *mut *mut u8;
                let mut rng = (w as u64 + 1) * 0x2545_f491_4f6c_dd1d;
                while !stop.load(Ordering::Relaxed) {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let i = (rng % SLOTS as u64) as usize;
                    // SAFETY: `i < SLOTS`; the table is this worker's.
                    let slot = unsafe { slots.add(i) };
                    // SAFETY: as above.
                    let cur = unsafe { slot.read_volatile() };
                    if let Some(p) = std::ptr::NonNull::new(cur) {
                        // Unlink, then free: a crash in between leaks one block.
                        // SAFETY: as above.
                        unsafe { slot.write_volatile(std::ptr::null_mut()) };
                        heap.free(p).unwrap();
                    } else {
                        let size = if rng.is_multiple_of(32) {
                            8193 + (rng >> 12) as usize % 30_000
                        } else {
                            1 + (rng >> 12) as usize % 2048
                        };
                        heap.alloc_into(slot, size).unwrap();
                    }
                }
            });
            (h, rx.recv().unwrap())
        })
        .collect();
    let size = heap.size() as usize;
    let mut image = vec![0u64; size / 8];
    let mut rng = 0x1234_5678u64;
    let (mut completed, mut rolled_back, mut cached) = (0, 0, 0);
    for n in 0..snapshots {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_micros(200 + rng % 3000));
        PAUSE.store(true, Ordering::SeqCst);
        for (_, tid) in &workers {
            // SAFETY: the thread is alive (it runs until `stop`).
            assert_eq!(unsafe { libc::pthread_kill(*tid, libc::SIGUSR1) }, 0);
        }
        while PARKED.load(Ordering::SeqCst) < WORKERS {
            std::hint::spin_loop();
        }
        // Every worker is frozen mid-instruction: copy the memory.
        // SAFETY: the heap's mapping is `size` bytes; nobody writes it now.
        unsafe { std::ptr::copy_nonoverlapping(heap.base(), image.as_mut_ptr().cast::<u8>(), size) };
        PAUSE.store(false, Ordering::SeqCst);
        while PARKED.load(Ordering::SeqCst) > 0 {
            std::hint::spin_loop();
        }
        let report = recover_image(&mut image).unwrap_or_else(|e| panic!("image {n}: recovery failed: {e}"));
        completed += report.allocs_completed;
        rolled_back += report.allocs_rolled_back;
        cached += report.cached_blocks_released;
        let base = image_base(&mut image).unwrap();
        let mut live: Vec<u64> = tables.iter().map(|&t| t as u64 - base).collect();
        for &t in &tables {
            let first = (t as u64 - base) as usize / 8;
            live.extend(image[first..first + SLOTS].iter().filter(|&&p| p != 0).map(|&p| p - base));
        }
        let check = check_image(&mut image, Some(&live)).unwrap();
        assert!(check.problems.is_empty() && check.doubly_owned.is_empty(), "image {n}: {check}");
        // A worker stopped between unlinking and freeing leaks one block.
        assert!(check.leaked.len() <= WORKERS, "image {n}: {} blocks leaked: {check}", check.leaked.len());
    }
    stop.store(true, Ordering::Relaxed);
    for (h, _) in workers {
        h.join().unwrap();
    }
    eprintln!("{snapshots} images: {completed} alloc_into completed, {rolled_back} rolled back, {cached} cached blocks released");
    assert!(heap.check().is_ok());
}
