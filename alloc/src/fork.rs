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
//! Descriptors whose mere presence in a child would change what others see
//! are not left to it ([`NotInherited`]): the descriptor that holds the
//! baseline's OFD lock (a child's copy shares the lock's open file
//! description, so the child would keep the heap locked after the parent
//! closed it or died) and the
//! agent connection (the agent would not see the parent die, and would
//! never seal its lists). The fork handler points them at `/dev/null`.
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

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicI32, AtomicU64};
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
    neutralize_child_fds();
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

/// Descriptors that forked children must not keep open (see
/// [`NotInherited`]); -1 marks a free slot.
static CHILD_FDS: [AtomicI32; 256] = [const { AtomicI32::new(-1) }; 256];

/// A descriptor a forked child must not keep: the baseline lock's descriptor (the
/// child would hold the lock after the parent closed or died) or the
/// agent connection (the agent would not see the parent die). In the child,
/// the fork handler points it at `/dev/null` (`dup3`, close-on-exec), so the
/// child holds nothing of the parent's and can still drop its copy as
/// usual. Registering costs an atomic compare-and-swap when opened; beyond
/// 256 such descriptors at once, the extra ones stay inherited as before.
#[derive(Debug)]
pub struct NotInherited<T: AsRawFd> {
    // Declared first: unregistered before `inner` closes the descriptor, so
    // a fork in between never points a reused number at /dev/null.
    _slot: Slot,
    inner: T,
}

#[derive(Debug)]
struct Slot(Option<usize>);

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            CHILD_FDS[i].store(-1, Release);
        }
    }
}

impl<T: AsRawFd> NotInherited<T> {
    /// Registers `inner`'s descriptor.
    pub fn new(inner: T) -> NotInherited<T> {
        install();
        let fd = inner.as_raw_fd();
        let slot = CHILD_FDS.iter().position(|s| s.compare_exchange(-1, fd, AcqRel, Relaxed).is_ok());
        NotInherited { _slot: Slot(slot), inner }
    }

    /// The descriptor's owner.
    pub fn get(&self) -> &T {
        &self.inner
    }
}

/// In the child: every registered descriptor now refers to /dev/null.
fn neutralize_child_fds() {
    // SAFETY: open(2) of a constant path; async-signal-safe.
    let null = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    for s in &CHILD_FDS {
        let fd = s.load(Acquire);
        if fd < 0 || fd == null {
            continue;
        }
        if null >= 0 {
            // SAFETY: dup3 onto a descriptor this process holds (registered
            // and not yet unregistered at the fork); async-signal-safe.
            unsafe { libc::dup3(null, fd, libc::O_CLOEXEC) };
        }
        // The child holds nothing of the parent's any more: forget the
        // number, so that a later fork of this child never points whatever
        // the child opened under it since at /dev/null (the inherited
        // owner is leaked in the child and never unregisters it).
        s.store(-1, Release);
    }
    if null >= 0 {
        // SAFETY: closes the descriptor opened above.
        unsafe { libc::close(null) };
    }
}
