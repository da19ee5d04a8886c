//! remem's main job, for now: create a heap, keep a `hashbrown::HashMap`
//! in it (hanging off the root object), close it, reopen it, and show that
//! every entry is there.
//!
//! `cargo run --release --example hashmap -- [DIR] [ENTRIES]`

use std::hash::BuildHasherDefault;
use std::time::Instant;

use remem::alloc::HeapRef;
use remem::{Heap, HeapOptions};

/// A hasher with no per-process random seed: the map's hash state is
/// stored in the heap and must mean the same thing after a reopen.
type Hasher = BuildHasherDefault<std::hash::DefaultHasher>;
type Map = hashbrown::HashMap<u64, [u64; 4], Hasher, HeapRef>;

fn value(k: u64) -> [u64; 4] {
    [k, k.wrapping_mul(0x9e37_79b9_7f4a_7c15), !k, k ^ 0xdead_beef]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().unwrap_or_else(|| "target/remem-example".into()));
    let entries: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1_000_000);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("hashmap.heap");
    let _ = std::fs::remove_file(&path);

    let t = Instant::now();
    let heap = Heap::create(&path, &HeapOptions::new(1 << 30))?;
    println!(
        "created heap {} at {:#x} ({} MiB) in {}",
        heap.uuid(),
        heap.base() as usize,
        heap.size() >> 20,
        path.display()
    );
    let (root, _) = heap.root_or_alloc(std::mem::size_of::<Map>())?;
    let map = root.cast::<Map>().as_ptr();
    // SAFETY: the root is a fresh, zeroed, suitably aligned block of the
    // map's size; we initialise it before any use.
    unsafe { map.write(Map::with_hasher_in(Hasher::default(), heap.handle())) };
    // SAFETY: initialised above; only this thread uses it.
    let m = unsafe { &mut *map };
    for k in 0..entries {
        m.insert(k, value(k));
    }
    println!("inserted {} entries into a HashMap living in the heap in {:.2?}", m.len(), t.elapsed());
    let report = heap.check();
    println!("check: {report}");
    let t = Instant::now();
    heap.close()?;
    println!("closed (flushed to the baseline) in {:.2?}", t.elapsed());

    let t = Instant::now();
    let heap = Heap::open(&path)?;
    println!("reopened in {:.2?}; {}", t.elapsed(), heap.recovery_report());
    let root = heap.root().ok_or("the reopened heap has no root object")?;
    // SAFETY: the root holds the map written above; the heap is mapped at
    // the same address, so its internal pointers are valid.
    let m = unsafe { &*root.cast::<Map>().as_ptr() };
    let wrong = (0..entries).filter(|k| m.get(k) != Some(&value(*k))).count();
    println!("found {} entries after reopen, {} wrong or missing", m.len(), wrong);
    let report = heap.check();
    println!("check: {report}");
    if wrong != 0 || m.len() as u64 != entries || !report.is_ok() {
        return Err("the reopened map does not match what was written".into());
    }
    println!("ok: every entry survived close and reopen");
    Ok(())
}
