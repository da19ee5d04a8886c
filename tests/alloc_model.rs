//! Property test: the allocator against a shadow model. Every object is
//! filled with a pattern of its own, so any overlap between two live
//! objects shows up as a damaged pattern.

use std::ptr::NonNull;

use proptest::prelude::*;
use remem::{Heap, HeapOptions};

#[derive(Debug, Clone)]
enum Op {
    Alloc { size: usize, align_shift: u8 },
    AllocZeroed { size: usize },
    AllocInto { slot: usize, size: usize },
    Free { pick: usize },
    Realloc { pick: usize, size: usize },
}

fn size() -> impl Strategy<Value = usize> {
    prop_oneof![8 => 1usize..512, 4 => 512usize..8193, 1 => 8193usize..200_000]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (size(), 0u8..8).prop_map(|(size, align_shift)| Op::Alloc { size, align_shift }),
        1 => size().prop_map(|size| Op::AllocZeroed { size }),
        1 => (0usize..64, size()).prop_map(|(slot, size)| Op::AllocInto { slot, size }),
        4 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => (any::<usize>(), size()).prop_map(|(pick, size)| Op::Realloc { pick, size }),
    ]
}

struct Obj {
    ptr: NonNull<u8>,
    size: usize,
    id: u8,
}

fn fill(o: &Obj) {
    // SAFETY: the object is live and `size` bytes long.
    unsafe { std::ptr::write_bytes(o.ptr.as_ptr(), o.id, o.size) };
}

fn intact(o: &Obj) -> bool {
    // SAFETY: as above.
    unsafe { std::slice::from_raw_parts(o.ptr.as_ptr(), o.size) }.iter().all(|&b| b == o.id)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn allocator_matches_shadow_model(ops in proptest::collection::vec(op(), 1..400)) {
        let dir = std::env::temp_dir().join(format!("remem-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("heap");
        let _ = std::fs::remove_file(&path);
        let heap = Heap::create(&path, &HeapOptions::new(32 << 20)).unwrap();
        // 64 destination slots for alloc_into, themselves in the heap.
        let slots = heap.alloc_zeroed(64 * 8).unwrap().cast::<*mut u8>();
        let mut live: Vec<Obj> = Vec::new();
        let mut next_id = 1u8;
        let mut id = || { next_id = next_id.wrapping_add(1).max(1); next_id };
        for op in ops {
            match op {
                Op::Alloc { size, align_shift } => {
                    let align = 1usize << (align_shift + 3);
                    let p = heap.alloc_aligned(size, align).unwrap();
                    prop_assert_eq!(p.as_ptr() as usize % align, 0);
                    prop_assert!(heap.usable_size(p).unwrap() >= size);
                    let o = Obj { ptr: p, size, id: id() };
                    fill(&o);
                    live.push(o);
                }
                Op::AllocZeroed { size } => {
                    let p = heap.alloc_zeroed(size).unwrap();
                    // SAFETY: fresh block of `size` bytes.
                    let zeroed = unsafe { std::slice::from_raw_parts(p.as_ptr(), size) }.iter().all(|&b| b == 0);
                    prop_assert!(zeroed, "alloc_zeroed returned non-zero bytes");
                    let o = Obj { ptr: p, size, id: id() };
                    fill(&o);
                    live.push(o);
                }
                Op::AllocInto { slot, size } => {
                    // SAFETY: `slot` < 64, inside the slots block.
                    let dest = unsafe { slots.as_ptr().add(slot) };
                    // SAFETY: the slot is a word we own.
                    let old = unsafe { dest.read() };
                    if let Some(old) = NonNull::new(old) {
                        let i = live.iter().position(|o| o.ptr == old).unwrap();
                        let o = live.swap_remove(i);
                        prop_assert!(intact(&o));
                        heap.free(o.ptr).unwrap();
                    }
                    let p = heap.alloc_into(dest, size).unwrap();
                    // SAFETY: as above.
                    prop_assert_eq!(unsafe { dest.read() }, p.as_ptr());
                    let o = Obj { ptr: p, size, id: id() };
                    fill(&o);
                    live.push(o);
                }
                Op::Free { pick } if !live.is_empty() => {
                    let o = live.swap_remove(pick % live.len());
                    prop_assert!(intact(&o), "object of {} bytes damaged before free", o.size);
                    // Clear any slot that names it.
                    for i in 0..64 {
                        // SAFETY: slot words we own.
                        unsafe { if slots.as_ptr().add(i).read() == o.ptr.as_ptr() { slots.as_ptr().add(i).write(std::ptr::null_mut()) } }
                    }
                    heap.free(o.ptr).unwrap();
                    prop_assert!(heap.free(o.ptr).is_err(), "double free accepted");
                }
                Op::Realloc { pick, size } if !live.is_empty() => {
                    let i = pick % live.len();
                    let in_slot = (0..64).any(|s| {
                        // SAFETY: slot words we own.
                        unsafe { slots.as_ptr().add(s).read() == live[i].ptr.as_ptr() }
                    });
                    if in_slot { continue; }
                    let o = &mut live[i];
                    prop_assert!(intact(o));
                    let keep = o.size.min(size);
                    let p = heap.realloc(o.ptr, size).unwrap();
                    // SAFETY: the new block holds at least `keep` bytes.
                    let kept = unsafe { std::slice::from_raw_parts(p.as_ptr(), keep) }.iter().all(|&b| b == o.id);
                    prop_assert!(kept, "realloc lost contents");
                    o.ptr = p;
                    o.size = size;
                    fill(o);
                }
                _ => {}
            }
        }
        for o in &live {
            prop_assert!(intact(o), "object of {} bytes damaged", o.size);
        }
        let names: Vec<*const u8> = live.iter().map(|o| o.ptr.as_ptr() as *const u8).chain([slots.as_ptr() as *const u8]).collect();
        let report = heap.check_live(names);
        prop_assert!(report.is_ok(), "{}", report);
        heap.close().unwrap();
        let heap = Heap::open(&path).unwrap();
        for o in &live {
            prop_assert!(intact(o), "object of {} bytes damaged by reopen", o.size);
        }
        let names: Vec<*const u8> = live.iter().map(|o| o.ptr.as_ptr() as *const u8).chain([slots.as_ptr() as *const u8]).collect();
        let report = heap.check_live(names);
        prop_assert!(report.is_ok(), "after reopen: {}", report);
        drop(heap);
        let _ = std::fs::remove_file(&path);
    }
}
