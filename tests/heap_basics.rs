//! Heap basics: create, allocate, free, reopen, bad pointers.

use std::ptr::NonNull;

use remem::alloc::{AllocError, Error, PointerError};
use remem::{Heap, HeapOptions};

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("remem-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("heap")
}

#[test]
fn alloc_free_reopen_keeps_objects_and_root() {
    let path = tmp("reopen");
    let heap = Heap::create(&path, &HeapOptions::new(64 << 20)).unwrap();
    let (root, created) = heap.root_or_alloc(64).unwrap();
    assert!(created);
    let mut ptrs = Vec::new();
    for i in 0..2000usize {
        let size = 1 + (i * 37) % 20000;
        let p = heap.alloc(size).unwrap();
        // SAFETY: the block is ours and `size` bytes long.
        unsafe { std::ptr::write_bytes(p.as_ptr(), (i % 251) as u8, size) };
        ptrs.push((p, size, (i % 251) as u8));
    }
    // Link every object from the root, as a database would.
    let table = heap.alloc(ptrs.len() * 8).unwrap().cast::<usize>();
    for (i, (p, _, _)) in ptrs.iter().enumerate() {
        // SAFETY: `table` has room for every pointer.
        unsafe { table.as_ptr().add(i).write(p.as_ptr() as usize) };
    }
    // SAFETY: root is 64 zeroed bytes.
    unsafe { root.cast::<usize>().as_ptr().write(table.as_ptr() as usize) };
    for (p, _, _) in ptrs.iter().step_by(3) {
        heap.free(*p).unwrap();
    }
    let kept: Vec<_> = ptrs.iter().enumerate().filter(|(i, _)| i % 3 != 0).map(|(_, x)| *x).collect();
    let live: Vec<*const u8> =
        kept.iter().map(|(p, _, _)| p.as_ptr() as *const u8).chain([table.as_ptr() as *const u8]).collect();
    let report = heap.check_live(live.iter().copied());
    assert!(report.is_ok(), "{report}");
    heap.close().unwrap();

    let heap = Heap::open(&path).unwrap();
    assert_eq!(heap.root(), Some(root));
    for (p, size, fill) in &kept {
        // SAFETY: the object survived the reopen at the same address.
        let bytes = unsafe { std::slice::from_raw_parts(p.as_ptr(), *size) };
        assert!(bytes.iter().all(|b| b == fill));
        assert!(heap.usable_size(*p).unwrap() >= *size);
    }
    let report = heap.check_live(live.iter().copied());
    assert!(report.is_ok(), "{report}");
    assert!(heap.recovery_report().cached_blocks_released > 0, "{:?}", heap.recovery_report());
}

#[test]
fn bad_pointers_are_refused() {
    let path = tmp("bad");
    let heap = Heap::create(&path, &HeapOptions::new(4 << 20)).unwrap();
    let p = heap.alloc(64).unwrap();
    heap.free(p).unwrap();
    assert!(matches!(heap.free(p), Err(Error::Pointer(PointerError::DoubleFree(_)))));
    let big = heap.alloc(100_000).unwrap();
    heap.free(big).unwrap();
    assert!(matches!(heap.free(big), Err(Error::Pointer(PointerError::DoubleFree(_)))));
    let q = heap.alloc(64).unwrap();
    // SAFETY: pointer arithmetic only; the result is never dereferenced.
    let inner = unsafe { NonNull::new_unchecked(q.as_ptr().add(8)) };
    assert!(matches!(heap.free(inner), Err(Error::Pointer(PointerError::NotABlock(_)))));
    let boxed = Box::new(5u64);
    let outside = NonNull::from(&*boxed).cast::<u8>();
    assert!(matches!(heap.free(outside), Err(Error::Pointer(PointerError::NotInHeap(_)))));
    assert!(heap.alloc(0).is_err());
    assert!(heap.alloc(usize::MAX).is_err());
    assert!(heap.alloc_aligned(8, 8192).is_err());
    for align in [0, 3, 24] {
        assert!(
            matches!(heap.alloc_aligned(8, align), Err(Error::Alloc(AllocError::Alignment(a))) if a == align),
            "alignment {align} accepted"
        );
    }
    heap.free(q).unwrap();
    assert!(heap.check().is_ok());
}

#[test]
fn create_refuses_existing_and_open_refuses_garbage() {
    let path = tmp("garbage");
    std::fs::write(&path, vec![7u8; 8192]).unwrap();
    assert!(matches!(Heap::create(&path, &HeapOptions::new(4 << 20)), Err(Error::Open(_))));
    let e = Heap::open(&path).unwrap_err();
    assert!(e.to_string().contains("not a usable remem baseline"), "{e}");
}

#[test]
fn fills_up_then_reports_out_of_memory() {
    let path = tmp("oom");
    let heap = Heap::create(&path, &HeapOptions::new(2 << 20)).unwrap();
    let mut n = 0;
    let err = loop {
        match heap.alloc(1000) {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
    };
    assert!(n > 500, "{n}");
    assert!(err.to_string().contains("heap is full"), "{err}");
    assert!(heap.check().is_ok());
}

/// Fresh memory comes out in ascending address order, within a slab, across
/// cache refills and across slabs (issue 14: descending order walked
/// memory backwards for anything read in allocation order).
#[test]
fn consecutive_allocations_ascend() {
    let heap = Heap::create_memfd(&HeapOptions::new(64 << 20)).unwrap();
    for size in [16usize, 48, 64, 200, 1000] {
        let ptrs: Vec<usize> = (0..4000).map(|_| heap.alloc(size).unwrap().as_ptr() as usize).collect();
        let class = heap.usable_size(NonNull::new(ptrs[0] as *mut u8).unwrap()).unwrap();
        let steps: Vec<isize> = ptrs.windows(2).map(|w| w[1] as isize - w[0] as isize).collect();
        let backwards = steps.iter().filter(|&&d| d < 0).count();
        let adjacent = steps.iter().filter(|&&d| d == class as isize).count();
        assert_eq!(backwards, 0, "{size} B: {backwards} of {} steps go down", steps.len());
        // Only the jumps from one slab to the next are not adjacent.
        let slabs = 4000 * class / (64 << 10) + 2;
        assert!(adjacent >= steps.len() - slabs, "{size} B: only {adjacent} of {} steps are +{class}", steps.len());
        for p in ptrs {
            heap.free(NonNull::new(p as *mut u8).unwrap()).unwrap();
        }
    }
    assert!(heap.check().is_ok(), "{:?}", heap.check());
}
