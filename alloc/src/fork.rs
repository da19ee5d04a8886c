//! What a forked child may do with the heaps its parent had open: nothing.
//!
//! A heap is a `MAP_SHARED` memfd mapping, so a child made by `fork()` would
//! share its pages with the parent, inherit the parent's lanes and hand out
//! the very blocks the parent hands out, while its writes stay invisible to
//! the parent's userfaultfd tracker. remem does what RDMA libraries do for
//! registered memory, and what SQLite does for open connections:
//!
//! - the heap's mapping and the control region's mapping are made
//!   `MADV_DONTFORK` (in `region.rs`): the child has no mapping there, so a
//!   stray raw write through a pointer into the heap faults (`SIGSEGV`)
//!   instead of corrupting the parent's pages;
//! - a `pthread_atfork` child handler, registered once when the first heap
//!   opens, bumps the process's *fork generation* and forgets the forking
//!   thread's lane cache (the only thread the child has). Every heap records
//!   the generation it was opened in ([`Owner`]); a heap whose generation is
//!   older was inherited, and every call on it fails with [`Forked`]
//!   ("this heap was opened by process P; open it again in this process").
//!
//! Cost on the fast path: none. Allocation and free find their lane in the
//! thread's lane cache; the child handler empties it, so the first call in
//! the child takes the slow path, where the generation is compared. Calls
//! that always take a slow path (flush, open, close, root, check) compare
//! it first: one load of a process-wide word.
//!
//! Dropping an inherited heap in the child releases nothing: the parent's
//! mapping, files, lock, tracker and flusher thread belong to the parent
//! (the child has no flusher thread, and unmapping the heap's address
//! range there could destroy a mapping the child made since). A child that
//! execs (`system`, `popen`, `posix_spawn`, `std::process::Command`) never
//! sees any of this: the handler only runs between `fork` and `exec`, and
//! every descriptor remem opens is close-on-exec.
//!
//! The handler only runs for forks made through the C library's `fork()`
//! (which `std::process::Command` also uses when it forks); a raw `clone`
//! system call bypasses it, and then the child's first call faults.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Once;

/// Bumped in every forked child: heaps opened in an older generation were
/// inherited from a parent.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Why a call on a heap (or agent link) inherited across `fork()` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "this heap was opened by process {owner}; process {pid} is a fork of it and cannot use it \
     (its memory is not mapped in a forked child): open it again in this process"
)]
#[non_exhaustive]
pub struct Forked {
    /// The process that opened the heap.
    pub owner: u32,
    /// This process, a fork (or a fork of a fork) of `owner`.
    pub pid: u32,
}

/// The process (and fork generation) that opened something.
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    pid: u32,
    generation: u64,
}

impl Owner {
    /// This process, now. Installs the fork handler on first use.
    pub fn current() -> Owner {
        install();
        Owner { pid: std::process::id(), generation: GENERATION.load(Relaxed) }
    }

    /// `Err` when this process is a fork of the owner (the thing was inherited).
    #[inline]
    pub fn check(&self) -> Result<(), Forked> {
        if GENERATION.load(Relaxed) == self.generation {
            Ok(())
        } else {
            Err(self.forked())
        }
    }

    /// True when this process is a fork of the owner.
    #[inline]
    pub fn inherited(&self) -> bool {
        self.check().is_err()
    }

    #[cold]
    fn forked(&self) -> Forked {
        Forked { owner: self.pid, pid: std::process::id() }
    }
}

/// Runs in the child, in the thread that called `fork()` (the child's only
/// thread), before `fork()` returns there: only async-signal-safe work.
extern "C" fn in_child() {
    GENERATION.fetch_add(1, Relaxed);
    crate::lanes::forget_after_fork();
}

fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: registers a handler with no prepare or parent part; the
        // child part only touches atomics and this thread's lane cache.
        let r = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
        // Only ENOMEM is possible; without the handler a child's calls
        // would reach the unmapped heap and fault, so say so loudly.
        assert_eq!(r, 0, "remem: pthread_atfork failed ({r}): cannot protect heaps from forked children");
    });
}
