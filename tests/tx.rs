//! Transactions: commit, abort, nesting, growth of the log, bad input.

use std::ptr::NonNull;

use remem::alloc::{PointerError, TxError};
use remem::{Heap, HeapOptions};

fn heap(name: &str) -> Heap {
    let dir = std::env::temp_dir().join(format!("remem-tx-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("heap");
    let _ = std::fs::remove_file(&path);
    Heap::create(&path, &HeapOptions::new(64 << 20)).unwrap()
}

fn read_u64(p: NonNull<u8>) -> u64 {
    // SAFETY: test blocks hold at least 8 bytes.
    unsafe { p.cast::<u64>().as_ptr().read() }
}

fn write_u64(p: NonNull<u8>, v: u64) {
    // SAFETY: as above.
    unsafe { p.cast::<u64>().as_ptr().write(v) }
}

#[test]
fn commit_keeps_and_abort_restores() {
    let heap = heap("basic");
    let a = heap.alloc_zeroed(64).unwrap();
    let doomed = heap.alloc(32).unwrap();
    let made = heap
        .tx(|tx| {
            tx.add_range(a.as_ptr(), 8)?;
            write_u64(a, 7);
            tx.free(doomed)?;
            tx.alloc(100)
        })
        .unwrap();
    assert_eq!(read_u64(a), 7);
    assert!(heap.usable_size(made).is_ok());
    assert!(heap.usable_size(doomed).is_err(), "freed at commit");

    let mut inside = None;
    let r: Result<(), TxError> = heap.tx(|tx| {
        tx.add_range(a.as_ptr(), 8)?;
        write_u64(a, 99);
        inside = Some(tx.alloc(5000)?);
        tx.free(made)?;
        Err(TxError::Aborted)
    });
    assert!(r.is_err());
    assert_eq!(read_u64(a), 7, "undo restored the old value");
    assert!(heap.usable_size(inside.unwrap()).is_err(), "allocation released on abort");
    assert!(heap.usable_size(made).is_ok(), "free did not happen");
    let report = heap.check_live([a.as_ptr() as *const u8, made.as_ptr()]);
    assert!(report.is_ok(), "{report}");
}

#[test]
fn panic_inside_rolls_back() {
    let heap = heap("panic");
    let a = heap.alloc_zeroed(8).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _: Result<(), TxError> = heap.tx(|tx| {
            tx.add_range(a.as_ptr(), 8)?;
            write_u64(a, 5);
            panic!("boom");
        });
    }));
    assert!(r.is_err());
    assert_eq!(read_u64(a), 0);
    assert_eq!(heap.tx_depth(), 0);
}

#[test]
fn nesting_flattens_and_inner_abort_aborts_all() {
    let heap = heap("nest");
    let a = heap.alloc_zeroed(16).unwrap();
    heap.tx_begin().unwrap();
    heap.tx_add_range(a.as_ptr(), 8).unwrap();
    write_u64(a, 1);
    heap.tx_begin().unwrap();
    assert_eq!(heap.tx_depth(), 2);
    heap.tx_commit().unwrap(); // inner: nothing durable yet
    heap.tx_abort().unwrap(); // outer abort undoes the inner work too
    assert_eq!(read_u64(a), 0);
    assert_eq!(heap.tx_commit(), Err(TxError::NoTransaction));

    let r: Result<(), TxError> = heap.tx(|tx| {
        tx.add_range(a.as_ptr(), 8)?;
        write_u64(a, 2);
        let inner: Result<(), TxError> = heap.tx(|_| Err(TxError::Aborted));
        assert!(inner.is_err());
        // The outer transaction is aborted too.
        assert_eq!(tx.add_range(a.as_ptr(), 8), Err(TxError::Aborted));
        Ok(())
    });
    assert_eq!(r, Err(TxError::Aborted));
    assert_eq!(read_u64(a), 0);
    assert_eq!(heap.tx_depth(), 0);
}

#[test]
fn log_grows_for_big_transactions_and_fails_cleanly_when_full() {
    let heap = heap("grow");
    let big = heap.alloc(8 << 20).unwrap();
    // SAFETY: the block is 8 MiB.
    unsafe { std::ptr::write_bytes(big.as_ptr(), 1, 8 << 20) };
    let r: Result<(), TxError> = heap.tx(|tx| {
        tx.add_range(big.as_ptr(), 8 << 20)?;
        // SAFETY: as above.
        unsafe { std::ptr::write_bytes(big.as_ptr(), 2, 8 << 20) };
        Err(TxError::Aborted)
    });
    assert!(r.is_err());
    // SAFETY: as above.
    assert!(unsafe { std::slice::from_raw_parts(big.as_ptr(), 8 << 20) }.iter().all(|&b| b == 1));
    // A range larger than the free space: the log cannot hold it.
    let huge = heap.alloc(40 << 20).unwrap();
    let r = heap.tx(|tx| tx.add_range(huge.as_ptr(), 40 << 20));
    assert!(matches!(r, Err(TxError::LogFull(_))), "{r:?}");
    assert_eq!(heap.tx_depth(), 0);
    assert!(heap.check_live([big.as_ptr() as *const u8, huge.as_ptr()]).is_ok());
}

#[test]
fn bad_input_is_refused_without_damage() {
    let heap = heap("bad");
    let a = heap.alloc_zeroed(64).unwrap();
    // No transaction.
    assert_eq!(heap.tx_add_range(a.as_ptr(), 8), Err(TxError::NoTransaction));
    assert_eq!(heap.tx_commit(), Err(TxError::NoTransaction));
    assert_eq!(heap.tx_abort(), Err(TxError::NoTransaction));
    heap.tx(|tx| {
        // Outside the heap, across a block's end, inside a free block.
        let stack = 5u64;
        assert!(matches!(tx.add_range(&stack as *const u64 as *const u8, 8), Err(TxError::OutOfHeap { .. })));
        // SAFETY: pointer arithmetic only.
        assert!(matches!(tx.add_range(unsafe { a.as_ptr().add(60) }, 8), Err(TxError::OutOfHeap { .. })));
        let f = heap.alloc(64).unwrap();
        heap.free(f).unwrap();
        // Double free inside one transaction, and free of a freed block.
        tx.free(a)?;
        assert_eq!(tx.free(a), Err(TxError::Pointer(PointerError::DoubleFree(a.as_ptr() as usize))));
        assert!(matches!(tx.free(f), Err(TxError::Pointer(PointerError::DoubleFree(_)))));
        let boxed = Box::new(1u64);
        assert!(matches!(tx.free(NonNull::from(&*boxed).cast()), Err(TxError::Pointer(PointerError::NotInHeap(_)))));
        Err::<(), _>(TxError::Aborted)
    })
    .unwrap_err();
    assert!(heap.usable_size(a).is_ok(), "the aborted free did not happen");

    // A transaction begun on one thread is not visible from another.
    heap.tx_begin().unwrap();
    let addr = a.as_ptr() as usize;
    std::thread::scope(|s| {
        s.spawn(|| {
            assert_eq!(heap.tx_add_range(addr as *const u8, 8), Err(TxError::NoTransaction));
            assert_eq!(heap.tx_commit(), Err(TxError::NoTransaction));
        });
    });
    heap.tx_commit().unwrap();
    assert!(heap.check_live([a.as_ptr() as *const u8]).is_ok());
}

#[test]
fn reopen_after_commit_keeps_data() {
    let dir = std::env::temp_dir().join(format!("remem-tx-{}-reopen", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("heap");
    let _ = std::fs::remove_file(&path);
    let heap = Heap::create(&path, &HeapOptions::new(8 << 20)).unwrap();
    let (root, _) = heap.root_or_alloc(8).unwrap();
    heap.tx(|tx| -> Result<(), TxError> {
        tx.add_range(root.as_ptr(), 8)?;
        let p = tx.alloc(24)?;
        write_u64(root, p.as_ptr() as u64);
        write_u64(p, 1234);
        Ok(())
    })
    .unwrap();
    heap.close().unwrap();
    let heap = Heap::open(&path).unwrap();
    let p = NonNull::new(read_u64(heap.root().unwrap()) as *mut u8).unwrap();
    assert_eq!(read_u64(p), 1234);
    assert!(heap.check_live([p.as_ptr() as *const u8]).is_ok());
}
