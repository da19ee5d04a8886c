//! The Rust allocator traits: collections living in the heap.

use std::alloc::{GlobalAlloc, Layout};

use allocator_api2::vec::Vec as HeapVec;
use hashbrown::HashMap;
use remem::alloc::GlobalHeap;
use remem::{Heap, HeapOptions};

fn heap(name: &str) -> Heap {
    let dir = std::env::temp_dir().join(format!("remem-traits-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("heap");
    let _ = std::fs::remove_file(&path);
    Heap::create(&path, &HeapOptions::new(64 << 20)).unwrap()
}

#[test]
fn hashbrown_and_vec_live_in_the_heap() {
    let heap = heap("collections");
    let mut map = HashMap::with_hasher_in(hashbrown::DefaultHashBuilder::default(), &heap);
    for i in 0..100_000u64 {
        map.insert(i, i * i);
    }
    let mut v = HeapVec::new_in(&heap);
    v.extend(0..50_000u32);
    assert!(heap.contains(v.as_ptr().cast()));
    assert_eq!(map.get(&777), Some(&(777 * 777)));
    assert_eq!(v.iter().map(|&x| u64::from(x)).sum::<u64>(), 49_999 * 50_000 / 2);
    drop(map);
    drop(v);
    let report = heap.check_live(std::iter::empty());
    assert!(report.is_ok(), "everything freed: {report}");
}

#[test]
fn global_alloc_adapter_serves_from_the_heap_once_installed() {
    static GLOBAL: GlobalHeap = GlobalHeap::new();
    let layout = Layout::from_size_align(100, 8).unwrap();
    // SAFETY: valid layout; the block is freed with the same layout.
    let before = unsafe { GLOBAL.alloc(layout) };
    let heap: &'static Heap = Box::leak(Box::new(heap("global")));
    assert!(!heap.contains(before));
    GLOBAL.install(heap);
    // SAFETY: as above.
    let after = unsafe { GLOBAL.alloc(Layout::from_size_align(100, 64).unwrap()) };
    assert!(heap.contains(after));
    assert_eq!(after as usize % 64, 0);
    // SAFETY: each block is returned with the layout it came with.
    unsafe {
        GLOBAL.dealloc(after, Layout::from_size_align(100, 64).unwrap());
        GLOBAL.dealloc(before, layout);
    }
    assert!(heap.check_live(std::iter::empty()).is_ok());
}

#[test]
fn heap_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Heap>();
}
