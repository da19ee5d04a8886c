//! The transactional workload of `remem demo` and the crash tests: a
//! commit counter and a table of slots in the root object, each slot naming
//! a value block whose contents say which transaction wrote it. Transaction
//! `i` is a pure function of `i`, so the table after `n` commits is known
//! ([`model`]) and a recovered heap can be checked exactly ([`verify_table`]).

// The workload plays a database that owns its heap: every pointer it is
// given is a root or value block that this module itself allocated in the
// heap (the crash tests' verifiers pass blocks that `check_live` confirmed),
// so its functions take raw pointers without being `unsafe fn`.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use std::ptr::NonNull;

use remem_alloc::{Heap, TxError};

pub const SLOTS: usize = 1024;
pub const MAGIC: u64 = 0x7265_6d65_6d5f_7478;

/// The root object: a commit counter and a table of slots.
#[repr(C)]
pub struct Root {
    pub counter: u64,
    pub slots: [Slot; SLOTS],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Slot {
    pub value: *mut u8,
    pub version: u64,
}

/// What transaction `i` does: `(key, Some(value size))` to upsert, `(key, None)` to delete.
pub fn op(i: u64) -> (usize, Option<usize>) {
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5555;
    x ^= x >> 29;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 32;
    let key = (x % SLOTS as u64) as usize;
    if x.is_multiple_of(5) {
        (key, None)
    } else {
        (key, Some(32 + (x >> 20) as usize % 3000))
    }
}

/// Writes value `version` of `key` into a block: a header and a pattern.
pub fn fill(p: NonNull<u8>, key: usize, version: u64, size: usize) {
    // SAFETY: `p` is a block of at least `size` (>= 32) bytes that we own.
    unsafe {
        let w = p.cast::<u64>().as_ptr();
        w.write(MAGIC);
        w.add(1).write(key as u64);
        w.add(2).write(version);
        w.add(3).write(size as u64);
        std::ptr::write_bytes(p.as_ptr().add(32), version as u8, size - 32);
    }
}

/// Checks a value block; `Err` says what is wrong.
pub fn verify_value(p: *const u8, key: usize, version: Option<u64>) -> Result<u64, String> {
    // SAFETY: `p` is an allocated block of the attached heap (check_live
    // verified that) of at least 32 bytes.
    unsafe {
        let w = p.cast::<u64>();
        if w.read() != MAGIC || w.add(1).read() != key as u64 {
            return Err(format!("value block {p:?} of key {key} has a bad header"));
        }
        let v = w.add(2).read();
        if version.is_some_and(|want| want != v) {
            return Err(format!("key {key}: value block says version {v}, slot says {version:?}"));
        }
        let size = w.add(3).read() as usize;
        if std::slice::from_raw_parts(p.add(32), size - 32).iter().any(|&b| b != v as u8) {
            return Err(format!("key {key}: value of version {v} is torn"));
        }
        Ok(v)
    }
}

/// A database's first use of a recovered heap: reads the first byte of its
/// root (`None` when it has none). On a lazily recovered heap this waits for
/// the root's page.
pub fn first_use(heap: &Heap) -> Option<u8> {
    // SAFETY: the root is an allocated block of the open heap, at least one byte long.
    heap.root().map(|r| unsafe { r.as_ptr().read_volatile() })
}

/// The root table, created zeroed on first use.
pub fn root(heap: &Heap) -> *mut Root {
    heap.root_or_alloc(std::mem::size_of::<Root>()).unwrap().0.cast::<Root>().as_ptr()
}

/// The commit counter in the root table.
pub fn counter(root: *mut Root) -> u64 {
    // SAFETY: `root` is the workload's root block, used by this thread.
    unsafe { (*root).counter }
}

/// Runs transaction number `counter` of the workload.
pub fn tx_step(heap: &Heap, root: *mut Root) {
    // SAFETY: the root block is ours; only this thread uses it.
    let i = unsafe { (*root).counter };
    let (key, action) = op(i);
    heap.tx(|tx| -> Result<(), TxError> {
        // SAFETY: fields of the root block.
        unsafe {
            tx.add_range((&raw const (*root).counter).cast(), 8)?;
            (*root).counter = i + 1;
            let slot = &raw mut (*root).slots[key];
            tx.add_range(slot.cast(), std::mem::size_of::<Slot>())?;
            if let Some(old) = NonNull::new((*slot).value) {
                tx.free(old)?;
            }
            *slot = match action {
                Some(size) => {
                    let p = tx.alloc(size)?;
                    fill(p, key, i, size);
                    Slot { value: p.as_ptr(), version: i }
                }
                None => Slot { value: std::ptr::null_mut(), version: 0 },
            };
        }
        Ok(())
    })
    .unwrap();
}

/// Checks a recovered table: nothing of an uncommitted transaction, every
/// value intact, `check()` clean, at most `max_leaks` leaked blocks (which
/// it frees). Returns the counter and the version of every slot.
///
/// # Panics
/// When the table is not sound (tests call it; see [`try_verify_table`]).
pub fn verify_table(heap: &Heap, max_leaks: usize) -> (u64, Vec<u64>) {
    try_verify_table(heap, max_leaks).unwrap_or_else(|e| panic!("{e}"))
}

/// [`verify_table`], returning what is wrong instead of panicking.
pub fn try_verify_table(heap: &Heap, max_leaks: usize) -> Result<(u64, Vec<u64>), String> {
    let Some(r) = heap.root() else { return Ok((0, vec![u64::MAX; SLOTS])) };
    // SAFETY: the root is the table the workload wrote.
    let root = unsafe { &*r.cast::<Root>().as_ptr() };
    let counter = root.counter;
    let mut live = vec![r.as_ptr() as *const u8];
    let mut versions = Vec::with_capacity(SLOTS);
    for (key, s) in root.slots.iter().enumerate() {
        if s.value.is_null() {
            versions.push(u64::MAX);
            continue;
        }
        if s.version >= counter {
            return Err(format!("key {key}: version {} of an uncommitted transaction", s.version));
        }
        live.push(s.value as *const u8);
        versions.push(s.version);
    }
    let check = heap.check_live(live.iter().copied());
    if !check.problems.is_empty() || !check.doubly_owned.is_empty() {
        return Err(format!("check failed: {check}"));
    }
    if check.leaked.len() > max_leaks {
        return Err(format!("{} blocks leaked: {check}", check.leaked.len()));
    }
    for (key, s) in root.slots.iter().enumerate() {
        if !s.value.is_null() {
            verify_value(s.value, key, Some(s.version))?;
        }
    }
    for &off in &check.leaked {
        heap.free(NonNull::new(heap.base().wrapping_add(off as usize)).expect("in the heap"))
            .map_err(|e| e.to_string())?;
    }
    Ok((counter, versions))
}

/// The versions the table must hold after transactions `0..counter`.
pub fn model(counter: u64) -> Vec<u64> {
    let mut m = vec![u64::MAX; SLOTS];
    for i in 0..counter {
        let (key, action) = op(i);
        m[key] = if action.is_some() { i } else { u64::MAX };
    }
    m
}

/// The scattered workload of the failover tests and benchmark: one large
/// block (the "data"), named by the root, whose pages each say which page
/// they are and which round last wrote them; rounds after the last flush
/// dirty a chosen set of pages (scattered, random, or all).
pub mod scatter {
    use std::ptr::NonNull;

    use remem_alloc::Heap;

    const PAGE: usize = 4096;

    /// The data block: `(address, pages)`.
    #[derive(Clone, Copy, Debug)]
    pub struct Data {
        /// First byte (page aligned).
        pub base: NonNull<u8>,
        /// Pages.
        pub pages: usize,
    }

    /// Writes page `p` of the data as of round `round`.
    fn stamp(d: Data, p: usize, round: u64) {
        // SAFETY: `p < d.pages`; the data block is ours and page aligned.
        unsafe {
            let at = d.base.as_ptr().add(p * PAGE);
            std::ptr::write_bytes(at.add(16), (p as u64 ^ round) as u8, PAGE - 16);
            at.cast::<u64>().write(p as u64);
            at.cast::<u64>().add(1).write(round);
        }
    }

    /// Allocates a data block of `pages` pages (page aligned: a page run),
    /// names it as the root, writes round 0 into every page, and flushes.
    pub fn setup(heap: &Heap, pages: usize) -> Result<Data, String> {
        let base = heap.alloc(pages * PAGE).map_err(|e| e.to_string())?;
        if !(base.as_ptr() as usize).is_multiple_of(PAGE) {
            return Err("the data block is not page aligned".into());
        }
        heap.set_root(Some(base)).map_err(|e| e.to_string())?;
        let d = Data { base, pages };
        for p in 0..pages {
            stamp(d, p, 0);
        }
        heap.flush().map_err(|e| e.to_string())?;
        Ok(d)
    }

    /// Writes round `round` into each page of `which`.
    pub fn dirty(d: Data, which: impl IntoIterator<Item = usize>, round: u64) {
        for p in which {
            if p < d.pages {
                stamp(d, p, round);
            }
        }
    }

    /// The data block of a recovered heap (the root), given its page count.
    pub fn find(heap: &Heap, pages: usize) -> Result<Data, String> {
        let base = heap.root().ok_or("the heap has no root")?;
        Ok(Data { base, pages })
    }

    /// Checks every page: those for which `round_of(p)` says so hold that round, intact.
    pub fn verify(d: Data, round_of: impl Fn(usize) -> u64) -> Result<(), String> {
        verify_from(d, 0, round_of)
    }

    /// [`verify`] of a part of the data: `d` starts at data page `first`.
    pub fn verify_from(d: Data, first: usize, round_of: impl Fn(usize) -> u64) -> Result<(), String> {
        for k in 0..d.pages {
            let p = first + k;
            let want = round_of(p);
            // SAFETY: page `p` of the data block, which the recovered heap holds.
            let page = unsafe { std::slice::from_raw_parts(d.base.as_ptr().add(k * PAGE), PAGE) };
            let (id, round) = (
                u64::from_le_bytes(page[..8].try_into().unwrap_or_default()),
                u64::from_le_bytes(page[8..16].try_into().unwrap_or_default()),
            );
            if id != p as u64 || round != want || page[16..].iter().any(|&b| b != (p as u64 ^ want) as u8) {
                return Err(format!(
                    "data page {p}: holds page {id} of round {round}, expected round {want} (or torn)"
                ));
            }
        }
        Ok(())
    }
}
