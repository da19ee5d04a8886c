//! A forked child never corrupts its parent's heap (issue 13): the heap's
//! mapping is not inherited (`MADV_DONTFORK`), every call on an inherited
//! heap fails with `Forked`, dropping it in the child releases nothing, and
//! a child that execs is unaffected. See `alloc/src/fork.rs`.
//!
//! The children report through their exit status only (a forked child of
//! this multithreaded test process avoids locks other threads may hold).

use std::ptr::NonNull;
use std::sync::Mutex;

use remem::alloc::track::TrackMode;
use remem::alloc::{Error, FlushError, Forked, TxError};
use remem::{Heap, HeapOptions};

/// One forking test at a time: a child should not inherit another test's
/// half-done fork.
static FORKING: Mutex<()> = Mutex::new(());

const BLOCKS: usize = 10_000;

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("remem-fork-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("heap")
}

/// Forks; the child runs `child` and exits with its result (0 = as
/// expected, otherwise the number of the failed expectation). Returns the
/// child's pid.
fn fork_child(child: impl FnOnce() -> i32) -> libc::pid_t {
    // SAFETY: fork in a test process; the child only runs `child` and
    // leaves with _exit (no destructors, no atexit handlers).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(100);
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(code) };
    }
    pid
}

/// Waits for `pid`; its exit code, or `-signal` if a signal killed it.
fn wait(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    // SAFETY: waits for our own child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid: {}", std::io::Error::last_os_error());
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -libc::WTERMSIG(status)
    }
}

/// The error of a call on an inherited heap, as every call must give it.
fn is_forked(f: &Forked, parent: u32) -> bool {
    f.owner == parent && f.pid == std::process::id() && f.pid != parent
}

fn fill(p: NonNull<u8>, byte: u8) {
    // SAFETY: a live 64-byte block of ours.
    unsafe { std::ptr::write_bytes(p.as_ptr(), byte, 64) };
}

fn holds(p: NonNull<u8>, byte: u8) -> bool {
    // SAFETY: a live 64-byte block of ours.
    unsafe { std::slice::from_raw_parts(p.as_ptr(), 64) }.iter().all(|&b| b == byte)
}

/// The scenario: the parent has 10 000 blocks of 64 B, forks; the
/// child tries to allocate 10 000 more and fill them with 0xCC while the
/// parent allocates 10 000 and fills them with 0xAA. Every child call is
/// refused with `Forked`; every parent block is intact, `check_live` is
/// clean, and the reopened heap has them all.
fn scenario(mode: TrackMode) {
    let _g = FORKING.lock().unwrap_or_else(|e| e.into_inner());
    let path = tmp(&format!("scenario-{mode}"));
    let heap = Heap::create(&path, &HeapOptions::new(64 << 20).tracking(mode)).unwrap();
    let before: Vec<NonNull<u8>> = (0..BLOCKS).map(|_| heap.alloc(64).unwrap()).collect();
    before.iter().for_each(|&p| fill(p, 0x11));
    let parent = std::process::id();
    let child = fork_child(|| {
        let mut refused = 0;
        for _ in 0..BLOCKS {
            match heap.alloc(64) {
                Err(Error::Forked(f)) if is_forked(&f, parent) => refused += 1,
                Ok(p) => fill(p, 0xCC), // what the issue saw; must not happen
                Err(_) => return 2,
            }
        }
        if refused != BLOCKS {
            return 1;
        }
        if !matches!(heap.free(before[0]), Err(Error::Forked(_))) {
            return 3;
        }
        0
    });
    let after: Vec<NonNull<u8>> = (0..BLOCKS).map(|_| heap.alloc(64).unwrap()).collect();
    after.iter().for_each(|&p| fill(p, 0xAA));
    assert_eq!(wait(child), 0, "the child's calls on the inherited heap were not all refused");
    assert!(before.iter().all(|&p| holds(p, 0x11)), "a block allocated before the fork changed");
    let overwritten = after.iter().filter(|&&p| !holds(p, 0xAA)).count();
    assert_eq!(overwritten, 0, "{overwritten} of the parent's new blocks were overwritten");
    let live: Vec<*const u8> = before.iter().chain(&after).map(|p| p.as_ptr() as *const u8).collect();
    let report = heap.check_live(live.iter().copied());
    assert!(report.is_ok(), "{report}");
    heap.close().unwrap();
    let heap = Heap::open(&path).unwrap();
    assert!(before.iter().all(|&p| holds(p, 0x11)) && after.iter().all(|&p| holds(p, 0xAA)));
    let report = heap.check_live(live.iter().copied());
    assert!(report.is_ok(), "{report}");
}

#[test]
fn child_cannot_allocate_from_inherited_heap_fast() {
    scenario(TrackMode::Fast);
}

#[test]
fn child_cannot_allocate_from_inherited_heap_precise() {
    scenario(TrackMode::Precise);
}

#[test]
fn child_cannot_allocate_from_inherited_heap_untracked() {
    scenario(TrackMode::Off);
}

/// Every kind of call on an inherited heap fails (or, with no error to
/// return, panics) with the same message; nothing reaches the parent.
#[test]
fn every_call_in_the_child_is_refused() {
    let _g = FORKING.lock().unwrap_or_else(|e| e.into_inner());
    let path = tmp("every-call");
    let heap = Heap::create(&path, &HeapOptions::new(16 << 20)).unwrap();
    let (root, _) = heap.root_or_alloc(64).unwrap();
    let p = heap.alloc(100).unwrap();
    let parent = std::process::id();
    let child = fork_child(|| {
        let forked = |e: &Error| matches!(e, Error::Forked(f) if is_forked(f, parent));
        let checks: [(i32, bool); 16] = [
            (1, heap.check_process().is_err_and(|f| is_forked(&f, parent))),
            (2, heap.alloc(64).is_err_and(|e| forked(&e))),
            (3, heap.alloc(1 << 20).is_err_and(|e| forked(&e))),
            (4, heap.free(p).is_err_and(|e| forked(&e))),
            (5, heap.realloc(p, 300).is_err_and(|e| forked(&e))),
            (6, heap.usable_size(p).is_err_and(|e| forked(&e))),
            (7, heap.set_root(None).is_err_and(|e| forked(&e))),
            (8, heap.root_or_alloc(64).is_err_and(|e| forked(&e))),
            (9, heap.mark_dirty(p.as_ptr(), 8).is_err_and(|e| forked(&e))),
            (10, matches!(heap.flush(), Err(FlushError::Forked(_)))),
            (11, matches!(heap.wait_durable(1), Err(FlushError::Forked(_)))),
            (12, matches!(heap.current_epoch(), Err(FlushError::Forked(_)))),
            (13, matches!(heap.tx(|_| Ok::<_, TxError>(())), Err(TxError::Forked(_)))),
            (14, matches!(heap.tx_begin(), Err(TxError::Forked(_)))),
            (15, !heap.check().is_ok() && heap.check().problems[0].contains("open it again in this process")),
            (16, heap.alloc_into(root.as_ptr().cast(), 64).is_err_and(|e| forked(&e))),
        ];
        if let Some(&(n, _)) = checks.iter().find(|(_, ok)| !ok) {
            return n;
        }
        // Calls with no error to return panic with the same message.
        let msg = |r: std::thread::Result<()>| {
            r.err().and_then(|e| e.downcast_ref::<String>().cloned()).unwrap_or_default().contains("is a fork of it")
        };
        std::panic::set_hook(Box::new(|_| {}));
        let catch = |f: &dyn Fn()| msg(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
        let panics = [
            catch(&|| {
                let _ = heap.root();
            }),
            catch(&|| {
                let _ = heap.stats();
            }),
            catch(&|| {
                let _ = heap.dirty_pages();
            }),
            catch(&|| {
                let _ = heap.flush_stats();
            }),
            catch(&|| {
                let _ = heap.tx_depth();
            }),
        ];
        if let Some(i) = panics.iter().position(|ok| !ok) {
            return 20 + i as i32;
        }
        // A persistent handle finds the heap, whose allocator refuses.
        let r = allocator_api2::alloc::Allocator::allocate(&heap.handle(), std::alloc::Layout::new::<u64>());
        if r.is_ok() {
            return 30;
        }
        0
    });
    let code = wait(child);
    assert_eq!(code, 0, "check number {code} failed in the child (see the numbers above)");
    // The parent carries on as if nothing happened.
    heap.free(p).unwrap();
    let q = heap.alloc(100).unwrap();
    heap.tx(|tx| {
        tx.add_range(root.as_ptr(), 8)?;
        // SAFETY: the root is 64 bytes of ours.
        unsafe { root.as_ptr().write(7) };
        Ok::<_, TxError>(())
    })
    .unwrap();
    let report = heap.check_live([q.as_ptr() as *const u8]);
    assert!(report.is_ok(), "{report}");
    heap.close().unwrap();
}

/// A transaction the parent began before forking cannot be continued in
/// the child; the parent commits it.
#[test]
fn transaction_across_fork_is_refused_in_the_child() {
    let _g = FORKING.lock().unwrap_or_else(|e| e.into_inner());
    let path = tmp("tx");
    let heap = Heap::create(&path, &HeapOptions::new(16 << 20)).unwrap();
    let (root, _) = heap.root_or_alloc(64).unwrap();
    let parent = std::process::id();
    heap.tx(|tx| {
        let child = fork_child(|| {
            let refused = |r: Result<(), TxError>| matches!(r, Err(TxError::Forked(f)) if is_forked(&f, parent));
            if !refused(tx.add_range(root.as_ptr(), 8)) {
                return 1;
            }
            if !refused(tx.alloc(64).map(drop)) {
                return 2;
            }
            if !refused(heap.tx_commit()) {
                return 3;
            }
            0
        });
        assert_eq!(wait(child), 0);
        tx.add_range(root.as_ptr(), 8)?;
        // SAFETY: the root is 64 bytes of ours.
        unsafe { root.as_ptr().cast::<u64>().write(42) };
        Ok::<_, TxError>(())
    })
    .unwrap();
    heap.close().unwrap();
    let heap = Heap::open(&path).unwrap();
    // SAFETY: the root survived the reopen.
    assert_eq!(unsafe { heap.root().unwrap().cast::<u64>().as_ptr().read() }, 42);
}

/// A raw write through a pointer into an inherited heap faults in the
/// child (the mapping is not inherited), and the parent's block is intact.
#[test]
fn raw_write_in_the_child_faults() {
    let _g = FORKING.lock().unwrap_or_else(|e| e.into_inner());
    let path = tmp("raw");
    let heap = Heap::create(&path, &HeapOptions::new(16 << 20)).unwrap();
    let p = heap.alloc(64).unwrap();
    fill(p, 0x11);
    let child = fork_child(|| {
        // SAFETY: not safe at all in the child: the heap is not mapped there,
        // and the write must fault rather than reach the parent's pages.
        unsafe { std::ptr::write_volatile(p.as_ptr(), 0xCC) };
        1
    });
    assert_eq!(wait(child), -libc::SIGSEGV, "a raw write in the child did not fault");
    assert!(holds(p, 0x11));
    heap.close().unwrap();
}

/// Dropping an inherited heap in the child (with or without `close`)
/// flushes, unmaps, commits and unlocks nothing: the baseline file is
/// byte-for-byte what it was, and the parent goes on using, flushing and
/// closing the heap.
#[test]
fn drop_in_the_child_leaves_parent_and_baseline_alone() {
    let _g = FORKING.lock().unwrap_or_else(|e| e.into_inner());
    for (n, with_close) in [(0, false), (1, true)] {
        let path = tmp(&format!("drop-{n}"));
        let heap = Heap::create(&path, &HeapOptions::new(16 << 20).flush_interval(None)).unwrap();
        let blocks: Vec<NonNull<u8>> = (0..1000).map(|_| heap.alloc(64).unwrap()).collect();
        blocks.iter().for_each(|&p| fill(p, 0x11));
        heap.flush().unwrap();
        // Dirty pages the child's drop would flush, if it flushed.
        blocks.iter().for_each(|&p| fill(p, 0x22));
        let file_before = std::fs::read(&path).unwrap();
        let heap = std::cell::Cell::new(Some(heap));
        let child = fork_child(|| {
            let h = heap.take().unwrap();
            if with_close {
                return if matches!(h.close(), Err(Error::Forked(_))) { 0 } else { 1 };
            }
            drop(h);
            0
        });
        assert_eq!(wait(child), 0);
        assert!(std::fs::read(&path).unwrap() == file_before, "the child's drop wrote to the baseline");
        let heap = heap.take().unwrap();
        assert!(blocks.iter().all(|&p| holds(p, 0x22)));
        let more = heap.alloc(64).unwrap();
        fill(more, 0x33);
        heap.flush().unwrap();
        let live: Vec<*const u8> = blocks.iter().chain([&more]).map(|p| p.as_ptr() as *const u8).collect();
        assert!(heap.check_live(live.iter().copied()).is_ok());
        heap.close().unwrap();
        let heap = Heap::open(&path).unwrap();
        assert!(blocks.iter().all(|&p| holds(p, 0x22)) && holds(more, 0x33));
        assert!(heap.check_live(live.iter().copied()).is_ok());
    }
}

/// A heap the child opens itself is its own: usable as usual.
#[test]
fn child_can_use_a_heap_it_opens() {
    let _g = FORKING.lock().unwrap_or_else(|e| e.into_inner());
    let path = tmp("own");
    let heap = Heap::create(&path, &HeapOptions::new(16 << 20)).unwrap();
    let mine = tmp("own-child");
    let child = fork_child(|| {
        let Ok(h) = Heap::create_memfd(&HeapOptions::new(16 << 20)) else { return 1 };
        let Ok(p) = h.alloc(64) else { return 2 };
        fill(p, 0x44);
        if h.free(p).is_err() || !h.check().is_ok() {
            return 3;
        }
        let Ok(f) = Heap::create(&mine, &HeapOptions::new(16 << 20).flush_interval(None)) else { return 4 };
        if f.alloc(64).is_err() || f.close().is_err() {
            return 5;
        }
        // The inherited one still refuses.
        if !matches!(heap.alloc(64), Err(Error::Forked(_))) {
            return 6;
        }
        0
    });
    assert_eq!(wait(child), 0);
    assert!(Heap::open(&mine).unwrap().check().is_ok());
    heap.alloc(64).unwrap();
    heap.close().unwrap();
}

/// Children that only exec are unaffected, and so is the parent.
#[test]
fn children_that_exec_are_unaffected() {
    let _g = FORKING.lock().unwrap_or_else(|e| e.into_inner());
    let path = tmp("exec");
    let heap = Heap::create(&path, &HeapOptions::new(16 << 20)).unwrap();
    let p = heap.alloc(64).unwrap();
    fill(p, 0x11);
    // std::process::Command (posix_spawn, or fork + exec).
    let out = std::process::Command::new("sh").arg("-c").arg("echo spawned; exit 3").output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(out.stdout, b"spawned\n");
    // system(3).
    // SAFETY: a NUL-terminated command line.
    let st = unsafe { libc::system(c"exit 5".as_ptr()) };
    assert!(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 5, "system: {st}");
    // A plain fork() followed by exec (the fork handler runs first).
    let child = fork_child(|| {
        let args = [c"sh".as_ptr(), c"-c".as_ptr(), c"exit 7".as_ptr(), std::ptr::null()];
        // SAFETY: a NULL-terminated argument vector of C strings.
        unsafe { libc::execv(c"/bin/sh".as_ptr(), args.as_ptr()) };
        99
    });
    assert_eq!(wait(child), 7);
    assert!(holds(p, 0x11));
    let q = heap.alloc(64).unwrap();
    assert!(heap.check_live([p.as_ptr() as *const u8, q.as_ptr() as *const u8]).is_ok());
    heap.close().unwrap();
}

/// A grandchild inherits the child's own heap as well, and refuses it.
#[test]
fn grandchild_refuses_the_childs_heap() {
    let _g = FORKING.lock().unwrap_or_else(|e| e.into_inner());
    let child = fork_child(|| {
        let Ok(h) = Heap::create_memfd(&HeapOptions::new(16 << 20)) else { return 1 };
        let Ok(p) = h.alloc(64) else { return 2 };
        let me = std::process::id();
        let grandchild = fork_child(|| match h.alloc(64) {
            Err(Error::Forked(f)) if is_forked(&f, me) => 0,
            _ => 1,
        });
        if wait(grandchild) != 0 {
            return 3;
        }
        if h.free(p).is_err() {
            return 4;
        }
        0
    });
    assert_eq!(wait(child), 0);
}

/// The agent paths: a child cannot register a heap it inherited, nor tell
/// the agent it closed; and a child that outlives the database keeps
/// neither the agent connection (the agent seals when the database dies)
/// nor the heap's lock (the heap can be opened again at once).
#[test]
fn agent_sees_the_database_die_whatever_its_children_do() {
    use remem::recovery::agent::{self, info, Agent, AgentOptions};
    use remem::recovery::transport::{ServeOptions, Token};
    use std::time::Duration;
    let _g = FORKING.lock().unwrap_or_else(|e| e.into_inner());
    let path = tmp("agent");
    // The agent creates its socket's directory, private (0700).
    let socket = path.with_file_name("agent").join("agent.sock");
    let mut serve = ServeOptions::new(Token::generate().unwrap());
    serve.listen = "127.0.0.1:0".parse().unwrap();
    let agent = Agent::start(AgentOptions::new(socket.clone(), serve)).unwrap();
    // The database: a child of this test that registers, forks a long-lived
    // helper, checks what the helper may not do, then dies without closing.
    let database = fork_child(|| {
        let Ok(heap) = Heap::create(&path, &HeapOptions::new(16 << 20)) else { return 1 };
        let Ok(link) = agent::register(&heap, &socket) else { return 2 };
        let Ok(p) = heap.alloc(64) else { return 3 };
        fill(p, 0x11);
        if heap.flush().is_err() {
            return 4;
        }
        let db = std::process::id();
        let link = std::cell::Cell::new(Some(link));
        let refused = fork_child(|| {
            let forked =
                |e: &agent::AgentError| matches!(e, agent::AgentError::Heap(Error::Forked(f)) if f.owner == db);
            if !agent::register(&heap, &socket).is_err_and(|e| forked(&e)) {
                return 1;
            }
            if !link.take().unwrap().closed().is_err_and(|e| forked(&e)) {
                return 2;
            }
            0
        });
        if wait(refused) != 0 {
            return 5;
        }
        // A helper that outlives the database (killed by the test).
        let helper = fork_child(|| {
            std::thread::sleep(Duration::from_secs(60));
            0
        });
        if std::fs::write(path.with_file_name("helper.pid"), helper.to_string()).is_err() {
            return 6;
        }
        0 // _exit: the database dies without closing the heap
    });
    assert_eq!(wait(database), 0);
    let helper: libc::pid_t = std::fs::read_to_string(path.with_file_name("helper.pid")).unwrap().parse().unwrap();
    struct Kill(libc::pid_t);
    impl Drop for Kill {
        fn drop(&mut self) {
            // SAFETY: kill(2) of the helper the database forked (an orphan now).
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
    let _kill = Kill(helper);
    // SAFETY: kill(2) with signal 0 only checks that the helper is alive.
    assert_eq!(unsafe { libc::kill(helper, 0) }, 0, "the helper should outlive the database");
    assert_eq!(agent.wait_state(info::SEALED, Duration::from_secs(20)), info::SEALED, "the agent did not seal");
    // The heap's lock went with the database: it opens here at once, with the flushed block.
    let heap = Heap::open(&path).unwrap();
    assert!(heap.check().is_ok());
    heap.close().unwrap();
}

/// A child that opens its parent's heap again (after the parent closed it)
/// gets its own copy through `HeapRef`, not the dead inherited one.
#[test]
fn a_heap_reopened_in_the_child_is_found_by_address() {
    let _g = FORKING.lock().unwrap_or_else(|e| e.into_inner());
    let path = tmp("reopen");
    let heap: &'static Heap =
        Box::leak(Box::new(Heap::create(&path, &HeapOptions::new(16 << 20).flush_interval(None)).unwrap()));
    heap.flush().unwrap();
    let (rd, wr) = {
        let mut p = [0i32; 2];
        // SAFETY: pipe(2) into a two-element array.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        (p[0], p[1])
    };
    let child = fork_child(|| {
        let mut b = [0u8; 1];
        // SAFETY: waits for the parent's word that the heap is closed.
        if unsafe { libc::read(rd, b.as_mut_ptr().cast(), 1) } != 1 {
            return 1;
        }
        // The inherited copy stays listed (leaked); the reopened one is at the same base.
        let Ok(mine) = Heap::open_with(&path, &HeapOptions::new(0).flush_interval(None)) else { return 2 };
        use allocator_api2::alloc::Allocator;
        let Ok(p) = mine.handle().allocate(std::alloc::Layout::from_size_align(64, 8).unwrap()) else { return 3 };
        if !mine.contains(p.as_ptr().cast()) {
            return 4;
        }
        if !matches!(heap.alloc(64), Err(Error::Forked(_))) {
            return 5;
        }
        0
    });
    // SAFETY: the parent's end of the pipe is not used.
    unsafe { libc::close(rd) };
    // The parent closes its heap (releasing the lock), then lets the child go on.
    // SAFETY: the leaked heap is not used after this read of its state.
    let owned = unsafe { std::ptr::read(heap) };
    owned.close().unwrap();
    // SAFETY: writes one byte to our pipe.
    assert_eq!(unsafe { libc::write(wr, [1u8].as_ptr().cast(), 1) }, 1);
    assert_eq!(wait(child), 0);
}

/// A child whose descriptors were closed behind remem's back, and reused,
/// keeps them in its own children: the fork handler only touches
/// descriptors the parent had registered, once.
#[test]
fn a_grandchild_keeps_the_childs_own_descriptors() {
    let _g = FORKING.lock().unwrap_or_else(|e| e.into_inner());
    let path = tmp("fds");
    let heap = Heap::create(&path, &HeapOptions::new(16 << 20)).unwrap();
    let child = fork_child(|| {
        // A daemon-style close of every inherited descriptor, then a pipe
        // that reuses the lowest numbers.
        for fd in 3..256 {
            // SAFETY: closes descriptors of this child only.
            unsafe { libc::close(fd) };
        }
        let mut p = [0i32; 2];
        // SAFETY: pipe(2) into a two-element array.
        if unsafe { libc::pipe(p.as_mut_ptr()) } != 0 {
            return 1;
        }
        let grandchild = fork_child(|| {
            // SAFETY: writes to the inherited pipe's write end.
            let n = unsafe { libc::write(p[1], b"hi".as_ptr().cast(), 2) };
            if n == 2 {
                0
            } else {
                1
            }
        });
        // SAFETY: this child's own write end.
        unsafe { libc::close(p[1]) };
        if wait(grandchild) != 0 {
            return 2;
        }
        let mut b = [0u8; 2];
        // SAFETY: reads this child's own pipe.
        if unsafe { libc::read(p[0], b.as_mut_ptr().cast(), 2) } != 2 || &b != b"hi" {
            return 3;
        }
        0
    });
    assert_eq!(wait(child), 0);
    heap.close().unwrap();
}
