//! Rust-side tests of the C ABI: what C programs cannot easily provoke (a
//! panic inside the boundary, a full undo log, races with close). The C
//! programs under examples/ test the rest through the real library.

use std::ffi::{c_void, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::ptr::null_mut;

use crate::alloc::*;
use crate::handles::remem_heap;
use crate::heap::*;
use crate::status::remem_status::*;
use crate::status::*;
use crate::tx::*;

fn last_error() -> String {
    // SAFETY: remem_last_error never returns NULL and the string lives
    // until the next call on this thread.
    unsafe { CStr::from_ptr(remem_last_error()) }.to_string_lossy().into_owned()
}

fn path(name: &str) -> CString {
    let dir = std::env::temp_dir().join(format!("remem-ffi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    CString::new(p.into_os_string().into_encoded_bytes()).unwrap()
}

fn memfd_heap(size: u64) -> *mut remem_heap {
    let mut h = null_mut();
    // SAFETY: `h` is a valid out-parameter.
    assert_eq!(unsafe { remem_create_memfd(size, 0, &mut h) }, REMEM_OK, "{}", last_error());
    h
}

fn alloc(h: *mut remem_heap, size: usize) -> *mut c_void {
    let mut p = null_mut();
    // SAFETY: `p` is a valid out-parameter.
    assert_eq!(unsafe { remem_alloc(h, size, &mut p) }, REMEM_OK, "{}", last_error());
    p
}

fn close(h: *mut remem_heap) {
    // SAFETY: a handle.
    assert_eq!(unsafe { remem_close(h) }, REMEM_OK, "{}", last_error());
}

#[test]
fn a_panic_becomes_a_status_and_a_message() {
    let s = boundary("remem_test", |_| panic!("boom {}", 42));
    assert_eq!(s, REMEM_PANIC);
    assert_eq!(last_error(), "remem_test: panic inside remem: boom 42");
    assert_eq!(boundary("remem_test", |_| Ok(())), REMEM_OK);
    assert_eq!(last_error(), "", "success clears the message");
}

#[test]
fn bad_handles_are_reported() {
    let mut p = null_mut();
    for (h, want) in [
        (null_mut(), REMEM_NULL_PARAMETER),
        (8usize as *mut remem_heap, REMEM_BAD_HANDLE),
        (&mut p as *mut *mut c_void as *mut remem_heap, REMEM_BAD_HANDLE),
        (usize::MAX as *mut remem_heap, REMEM_BAD_HANDLE),
    ] {
        // SAFETY: out-parameters are valid; the handle is what is tested.
        unsafe {
            assert_eq!(remem_alloc(h, 16, &mut p), want);
            assert!(p.is_null());
            assert_eq!(remem_free(h, null_mut()), want);
            assert_eq!(remem_tx_begin(h), want);
        }
    }
    let h = memfd_heap(4 << 20);
    close(h);
    // SAFETY: as above.
    unsafe {
        assert_eq!(remem_alloc(h, 16, &mut p), REMEM_BAD_HANDLE);
        assert!(last_error().contains("not open"), "{}", last_error());
        assert_eq!(remem_close(h), REMEM_BAD_HANDLE, "never twice, but detected");
        assert_eq!(remem_close(null_mut()), REMEM_OK, "NULL is fine");
    }
}

#[test]
fn status_names_cover_every_status() {
    for s in 0..=REMEM_FORKED as i32 {
        // SAFETY: static strings.
        let name = unsafe { CStr::from_ptr(remem_status_name(s)) }.to_str().unwrap();
        assert!(name.starts_with("REMEM_") && name != "REMEM_UNKNOWN_STATUS", "{s}: {name}");
    }
    // SAFETY: as above.
    assert_eq!(unsafe { CStr::from_ptr(remem_status_name(-1)) }.to_str().unwrap(), "REMEM_UNKNOWN_STATUS");
    // SAFETY: as above.
    assert_eq!(unsafe { CStr::from_ptr(remem_status_name(21)) }.to_str().unwrap(), "REMEM_UNKNOWN_STATUS");
}

#[test]
fn heap_at_finds_heaps_by_address_and_forgets_closed_ones() {
    let a = memfd_heap(4 << 20);
    let b = memfd_heap(4 << 20);
    let pb = alloc(b, 100);
    let mut found = null_mut();
    let mut stats = std::mem::MaybeUninit::<remem_heap_stats>::uninit();
    // SAFETY: valid out-parameters.
    unsafe {
        assert_eq!(remem_heap_at(pb, &mut found), REMEM_OK);
        assert_eq!(found, b);
        assert_eq!(remem_stats(a, stats.as_mut_ptr()), REMEM_OK);
        assert_eq!(remem_heap_at(stats.assume_init().base, &mut found), REMEM_OK);
        assert_eq!(found, a);
        assert_eq!(remem_heap_at(&found as *const _ as *const c_void, &mut found), REMEM_NOT_IN_HEAP);
        assert!(found.is_null());
    }
    close(b);
    // SAFETY: as above.
    assert_eq!(unsafe { remem_heap_at(pb, &mut found) }, REMEM_NOT_IN_HEAP);
    close(a);
}

#[test]
fn alloc_at_and_free_at_find_the_heap_by_address() {
    let a = memfd_heap(4 << 20);
    let mut st = std::mem::MaybeUninit::<remem_heap_stats>::uninit();
    // SAFETY: valid out-parameters; the pointers freed are this heap's blocks.
    unsafe {
        assert_eq!(remem_stats(a, st.as_mut_ptr()), REMEM_OK);
        let base = st.assume_init().base;
        let mut p = null_mut();
        assert_eq!(remem_alloc_at(base, 100, 64, &mut p), REMEM_OK, "{}", last_error());
        assert_eq!(p as usize % 64, 0);
        let mut n = 0;
        assert_eq!(remem_usable_size(a, p, &mut n), REMEM_OK);
        assert!(n >= 100);
        // Any address inside the heap names it; a block freed twice is reported.
        assert_eq!(remem_free_at(p, p), REMEM_OK);
        assert_eq!(remem_free_at(base, p), REMEM_DOUBLE_FREE);
        let mut local = 0u64;
        let outside = (&mut local as *mut u64).cast::<c_void>();
        assert_eq!(remem_alloc_at(outside, 16, 16, &mut p), REMEM_NOT_IN_HEAP);
        assert!(p.is_null());
        assert_eq!(remem_free_at(outside, outside), REMEM_NOT_IN_HEAP);
        assert_eq!(remem_free_at(base, outside), REMEM_NOT_IN_HEAP);
        close(a);
        assert_eq!(remem_alloc_at(base, 16, 16, &mut p), REMEM_NOT_IN_HEAP, "a closed heap is not found");
    }
}

#[test]
fn wrapping_ranges_are_refused_without_poisoning_the_transaction() {
    let h = memfd_heap(4 << 20);
    let p = alloc(h, 64).cast::<u64>();
    // SAFETY: `p` is a live 64-byte block; handles and out-parameters are valid.
    unsafe {
        p.write(1);
        assert_eq!(remem_tx_begin(h), REMEM_OK);
        assert_eq!(remem_tx_add_range(h, p.cast(), usize::MAX), REMEM_BAD_ARGUMENT);
        assert_eq!(remem_tx_add_range(h, p.cast(), 8), REMEM_OK);
        p.write(2);
        assert_eq!(remem_tx_abort(h), REMEM_OK);
        assert_eq!(p.read(), 1, "the later add_range was logged");
    }
    close(h);
}

#[test]
fn a_full_undo_log_rolls_back_and_aborts() {
    let h = memfd_heap(1 << 20);
    let mut depth = 0;
    // SAFETY: valid handles and out-parameters; ranges are inside blocks.
    unsafe {
        assert_eq!(remem_tx_begin(h), REMEM_OK);
        let mut blocks = Vec::new();
        let mut p = null_mut();
        while remem_alloc(h, 16 << 10, &mut p) == REMEM_OK {
            blocks.push(p);
        }
        let mut last = REMEM_OK;
        for &b in &blocks {
            last = remem_tx_add_range(h, b, 16 << 10);
            if last != REMEM_OK {
                break;
            }
        }
        assert_eq!(last, REMEM_TX_LOG_FULL, "{}", last_error());
        assert_eq!(remem_tx_depth(h, &mut depth), REMEM_OK);
        assert_eq!(depth, 1, "the caller ends the level");
        assert_eq!(remem_tx_add_range(h, blocks[0], 8), REMEM_TX_ABORTED);
        assert_eq!(remem_tx_abort(h), REMEM_OK);
        assert_eq!(remem_tx_commit(h), REMEM_NO_TRANSACTION);
        for b in blocks {
            assert_eq!(remem_free(h, b), REMEM_OK);
        }
        let mut r = remem_check_report::default();
        assert_eq!(remem_check(h, &mut r), REMEM_OK, "{}", last_error());
    }
    close(h);
}

#[test]
fn closing_while_other_threads_use_the_heap_gives_statuses() {
    let h = memfd_heap(16 << 20) as usize;
    let workers: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let h = h as *mut remem_heap;
                let mut n = 0u64;
                loop {
                    let mut p = null_mut();
                    // SAFETY: valid out-parameter; the handle may close under us.
                    let s = unsafe { remem_alloc(h, 48, &mut p) };
                    if s != REMEM_OK {
                        assert_eq!(s, REMEM_BAD_HANDLE, "{}", last_error());
                        return n;
                    }
                    // SAFETY: as above.
                    let s = unsafe { remem_free(h, p) };
                    assert!(s == REMEM_OK || s == REMEM_BAD_HANDLE, "{}", last_error());
                    n += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(50));
    close(h as *mut remem_heap);
    for w in workers {
        w.join().unwrap();
    }
}

#[test]
fn file_heaps_survive_close_and_open() {
    let path = path("file.heap");
    let mut h = null_mut();
    let mut root = null_mut();
    let mut created = false;
    // SAFETY: valid C string and out-parameters; the root holds 64 bytes.
    unsafe {
        assert_eq!(remem_create(path.as_ptr(), 4 << 20, 0, &mut h), REMEM_OK, "{}", last_error());
        assert_eq!(remem_root_or_alloc(h, 64, &mut root, &mut created), REMEM_OK);
        assert!(created);
        assert_eq!(remem_alloc_into(h, root.cast(), 100), REMEM_OK);
        let block = root.cast::<*mut u64>().read();
        block.write(77);
        assert_eq!(remem_create(path.as_ptr(), 4 << 20, 0, &mut h), REMEM_EXISTS);
        assert!(h.is_null());
        let mut again = null_mut();
        assert_eq!(remem_open(path.as_ptr(), &mut again), REMEM_LOCKED, "{}", last_error());
        close(remem_heap_of(root));
        assert_eq!(remem_open(path.as_ptr(), &mut h), REMEM_OK, "{}", last_error());
        let mut root2 = null_mut();
        assert_eq!(remem_root_or_alloc(h, 64, &mut root2, &mut created), REMEM_OK);
        assert!(!created);
        assert_eq!(root2, root, "same address after reopen");
        assert_eq!(root.cast::<*mut u64>().read().read(), 77);
        let live = [root.cast_const(), root.cast::<*const c_void>().read()];
        let mut r = remem_check_report::default();
        assert_eq!(remem_check_live(h, live.as_ptr(), 1, &mut r), REMEM_CORRUPT, "the block is not named");
        assert_eq!(r.leaked, 1);
        assert_eq!(remem_check_live(h, live[1..].as_ptr(), 1, &mut r), REMEM_OK, "{}", last_error());
        assert!(r.ok);
    }
    close(h);
    let _ =
        std::fs::remove_dir_all(std::path::Path::new(std::ffi::OsStr::from_bytes(path.as_bytes())).parent().unwrap());
}

/// The heap containing `p`.
fn remem_heap_of(p: *mut c_void) -> *mut remem_heap {
    let mut h = null_mut();
    // SAFETY: valid out-parameter.
    assert_eq!(unsafe { remem_heap_at(p, &mut h) }, REMEM_OK);
    h
}

#[test]
fn a_stale_handle_stays_dead_when_its_slot_is_reused() {
    let old = memfd_heap(4 << 20);
    close(old);
    // Slots are reused (most recently freed first); generations are not.
    let new = memfd_heap(4 << 20);
    assert_ne!(new, old);
    let mut p = null_mut();
    // SAFETY: valid out-parameters; `old` is the handle under test.
    unsafe {
        assert_eq!(remem_alloc(old, 16, &mut p), REMEM_BAD_HANDLE);
        assert_eq!(remem_close(old), REMEM_BAD_HANDLE);
        assert_eq!(remem_alloc(new, 16, &mut p), REMEM_OK, "{}", last_error());
        assert_eq!(remem_free(new, p), REMEM_OK);
    }
    close(new);
    // A handle-looking value whose slot was never used, and one with a
    // generation from the future.
    for v in [0x7e3e_0000_0000_0fffu64, (new as u64) + (1 << 40)] {
        // SAFETY: as above.
        assert_eq!(unsafe { remem_alloc(v as usize as *mut remem_heap, 16, &mut p) }, REMEM_BAD_HANDLE);
    }
}

#[test]
fn racing_closes_end_the_heap_once() {
    for _ in 0..50 {
        let h = memfd_heap(4 << 20) as usize;
        let closers: Vec<_> = (0..3)
            // SAFETY: a handle; the race is what is tested.
            .map(|_| std::thread::spawn(move || unsafe { remem_close(h as *mut remem_heap) }))
            .collect();
        let statuses: Vec<_> = closers.into_iter().map(|c| c.join().unwrap()).collect();
        assert_eq!(statuses.iter().filter(|&&s| s == REMEM_OK).count(), 1, "{statuses:?}");
        assert!(statuses.iter().all(|&s| s == REMEM_OK || s == REMEM_BAD_HANDLE), "{statuses:?}");
    }
}

#[test]
fn heap_at_finds_every_address_of_heaps_sharing_a_granule() {
    let heaps: Vec<_> = (0..3).map(|_| memfd_heap(2 << 20)).collect();
    for &h in &heaps {
        let mut st = std::mem::MaybeUninit::<remem_heap_stats>::uninit();
        // SAFETY: valid out-parameter.
        assert_eq!(unsafe { remem_stats(h, st.as_mut_ptr()) }, REMEM_OK);
        // SAFETY: filled by remem_stats.
        let st = unsafe { st.assume_init() };
        for off in [0, 1, st.size as usize / 2, st.size as usize - 1] {
            let mut found = null_mut();
            // SAFETY: valid out-parameter; the address is not dereferenced.
            assert_eq!(unsafe { remem_heap_at(st.base.cast::<u8>().wrapping_add(off).cast(), &mut found) }, REMEM_OK);
            assert_eq!(found, h, "offset {off}");
        }
        let mut found = null_mut();
        // SAFETY: as above.
        let past = unsafe { remem_heap_at(st.base.cast::<u8>().wrapping_add(st.size as usize).cast(), &mut found) };
        assert!(past == REMEM_NOT_IN_HEAP || found != h, "one past the end is not in the heap");
    }
    for h in heaps {
        close(h);
    }
}

#[test]
fn agent_and_recovery_calls_refuse_bad_input_with_a_status() {
    use crate::agent::*;
    use crate::recover::*;
    let h = memfd_heap(4 << 20);
    let sock = path("no-agent.sock");
    // SAFETY: NUL-terminated strings and valid out-parameters throughout.
    unsafe {
        assert_eq!(remem_agent_register(h, std::ptr::null()), REMEM_NULL_PARAMETER);
        assert!(last_error().contains("`socket` is NULL"), "{}", last_error());
        assert_eq!(remem_agent_register(h, sock.as_ptr()), REMEM_UNSUPPORTED, "{}", last_error());
        let mut st = remem_lazy_status::default();
        assert_eq!(remem_lazy_progress(h, &mut st), REMEM_BAD_ARGUMENT);
        assert!(last_error().contains("not recovered lazily"), "{}", last_error());
        assert_eq!(remem_lazy_wait(h, std::ptr::null_mut()), REMEM_BAD_ARGUMENT);
        close(h);

        // A file heap and no agent listening: REMEM_IO naming the socket.
        let p = path("agent-reg.heap");
        let mut fh = null_mut();
        assert_eq!(remem_create(p.as_ptr(), 4 << 20, 0, &mut fh), REMEM_OK, "{}", last_error());
        assert_eq!(remem_agent_register(fh, sock.as_ptr()), REMEM_IO);
        assert!(last_error().contains("no-agent.sock"), "{}", last_error());
        close(fh);

        let mut out = null_mut();
        assert_eq!(remem_reattach(sock.as_ptr(), std::ptr::null(), &mut out), REMEM_NULL_PARAMETER);
        assert_eq!(remem_reattach(sock.as_ptr(), p.as_ptr(), &mut out), REMEM_IO, "{}", last_error());
        assert!(out.is_null());

        assert_eq!(remem_recover_with(std::ptr::null(), &mut out, std::ptr::null_mut()), REMEM_NULL_PARAMETER);
        let mut o: remem_recover_options = std::mem::zeroed();
        o.baseline = p.as_ptr();
        assert_eq!(remem_recover_with(&o, &mut out, std::ptr::null_mut()), REMEM_BAD_ARGUMENT);
        assert!(last_error().contains("sizeof(remem_recover_options)"), "{}", last_error());
        o.size = std::mem::size_of::<remem_recover_options>();
        o.baseline = std::ptr::null();
        assert_eq!(remem_recover_with(&o, &mut out, std::ptr::null_mut()), REMEM_NULL_PARAMETER);
        assert!(last_error().contains("`baseline` is NULL"), "{}", last_error());
        // No agent and no permission to lose data: refused, nothing fenced.
        o.baseline = p.as_ptr();
        assert_eq!(remem_recover_with(&o, &mut out, std::ptr::null_mut()), REMEM_BAD_ARGUMENT, "{}", last_error());
        // From the baseline alone, lazily: the heap opens, loads and commits.
        o.allow_data_loss = 1;
        o.lazy = 1;
        let mut rep = remem_recover_report::default();
        assert_eq!(remem_recover_with(&o, &mut out, &mut rep), REMEM_OK, "{}", last_error());
        assert_eq!(rep.baseline_only, 1);
        let mut st = remem_lazy_status::default();
        assert_eq!(remem_lazy_wait(out, &mut st), REMEM_OK, "{}", last_error());
        assert!(st.settled == 1 && st.committed_epoch > 0 && st.pages > 0, "{st:?}");
        assert_eq!(remem_lazy_progress(out, &mut st), REMEM_OK);
        assert_eq!(st.settled, 1);
        close(out);
    }
}
