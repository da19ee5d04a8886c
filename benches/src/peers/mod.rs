//! The systems under test, each behind the narrow [`Peer`] trait.
//!
//! Bench loops are generic over `P: Peer` and reached through
//! [`System::visit`], so every system's calls are direct (no vtable in the
//! loop that would tax the fastest allocators more than the slow ones).

mod glibc;
mod jemalloc;
mod mimalloc;
mod pmdk;
mod remem;

use std::path::Path;

use clap::ValueEnum;

pub use self::glibc::Glibc;
pub use self::jemalloc::Jemalloc;
pub use self::mimalloc::Mimalloc;
pub use self::pmdk::Pmdk;
pub use self::remem::Remem;

/// An allocator as the benches see it: allocate, free, nothing more.
///
/// Shared by the threads of a case, hence `Sync`.
///
/// # Safety
///
/// Implementations return from `alloc` either null or a pointer to at least
/// `size` writable bytes that no other live allocation overlaps.
pub unsafe trait Peer: Sync {
    /// Name in the report (`remem`, `glibc`, ...).
    fn name(&self) -> &'static str;

    /// Allocates `size` bytes (`size > 0`); null when the system cannot,
    /// after saying why on stderr.
    fn alloc(&self, size: usize) -> *mut u8;

    /// Frees `p`.
    ///
    /// # Safety
    ///
    /// `p` came from `self.alloc(size)` with this same `size` and has not been
    /// freed since.
    unsafe fn free(&self, p: *mut u8, size: usize);
}

/// A system with undo-log transactions (remem and PMDK), for the `tx` suite.
///
/// # Safety
///
/// Implementations return from `tx_alloc` a pointer to at least `size`
/// writable bytes that no other live allocation overlaps, which
/// [`Peer::free`] takes back with the same `size`.
pub unsafe trait TxPeer: Peer {
    /// One transaction: begin, log the `len` bytes at `p` (inside one live
    /// block of this system), overwrite them with `byte`, commit. Panics if
    /// any step fails (the figure would be void).
    ///
    /// # Safety
    ///
    /// `p..p + len` lies inside a live block from `self.alloc` that no other
    /// thread uses.
    unsafe fn tx_update(&self, p: *mut u8, len: usize, byte: u8);

    /// One transaction: begin, allocate `size` bytes inside it, commit; the
    /// block stays allocated. Panics if any step fails.
    fn tx_alloc(&self, size: usize) -> *mut u8;
}

/// Runs generic code on a concrete peer; see [`System::visit`].
pub trait PeerVisitor {
    /// What the visit returns.
    type Output;
    /// Called with the concrete peer.
    fn visit<P: Peer>(&mut self, peer: &P) -> Self::Output;
}

/// The names accepted by `--systems`, in report order.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum SystemName {
    /// remem's heap (`remem_alloc::Heap`).
    Remem,
    /// glibc malloc/free.
    Glibc,
    /// jemalloc (prefixed build from `tikv-jemalloc-sys`).
    Jemalloc,
    /// mimalloc (`libmimalloc-sys`).
    Mimalloc,
    /// PMDK libpmemobj, pool on /dev/shm.
    Pmdk,
}

impl SystemName {
    /// Every system, remem first.
    pub const ALL: [SystemName; 5] =
        [SystemName::Remem, SystemName::Glibc, SystemName::Jemalloc, SystemName::Mimalloc, SystemName::Pmdk];

    /// Name in the report and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            SystemName::Remem => "remem",
            SystemName::Glibc => "glibc",
            SystemName::Jemalloc => "jemalloc",
            SystemName::Mimalloc => "mimalloc",
            SystemName::Pmdk => "pmdk",
        }
    }
}

/// A started system. Dropping it closes it and removes its files.
pub enum System {
    /// remem.
    Remem(Remem),
    /// glibc.
    Glibc(Glibc),
    /// jemalloc.
    Jemalloc(Jemalloc),
    /// mimalloc.
    Mimalloc(Mimalloc),
    /// PMDK.
    Pmdk(Pmdk),
}

impl System {
    /// Calls `visitor` with the concrete peer inside.
    pub fn visit<V: PeerVisitor>(&self, visitor: &mut V) -> V::Output {
        match self {
            System::Remem(p) => visitor.visit(p),
            System::Glibc(p) => visitor.visit(p),
            System::Jemalloc(p) => visitor.visit(p),
            System::Mimalloc(p) => visitor.visit(p),
            System::Pmdk(p) => visitor.visit(p),
        }
    }

    /// Name in the report.
    pub fn name(&self) -> &'static str {
        struct Name;
        impl PeerVisitor for Name {
            type Output = &'static str;
            fn visit<P: Peer>(&mut self, peer: &P) -> &'static str {
                peer.name()
            }
        }
        self.visit(&mut Name)
    }
}

/// Starts the named systems, in the order given; remem's heap file goes
/// in a directory of its own under `dir`. One that cannot start is
/// reported on stderr, with the fix, and left out.
pub fn open(names: &[SystemName], dir: &Path) -> Vec<System> {
    let mut systems = Vec::new();
    for &name in names {
        let started = match name {
            SystemName::Remem => Remem::open(dir).map(System::Remem),
            SystemName::Glibc => Ok(System::Glibc(Glibc)),
            SystemName::Jemalloc => Ok(System::Jemalloc(Jemalloc)),
            SystemName::Mimalloc => Ok(System::Mimalloc(Mimalloc)),
            SystemName::Pmdk => Pmdk::open().map(System::Pmdk),
        };
        match started {
            Ok(system) => systems.push(system),
            Err(why) => eprintln!("remem-bench: skipping {}: {why}", name.as_str()),
        }
    }
    systems
}

/// Runs generic code on a concrete transactional peer; see [`TxSystem::visit`].
pub trait TxVisitor {
    /// What the visit returns.
    type Output;
    /// Called with the concrete peer.
    fn visit<P: TxPeer>(&mut self, peer: &P) -> Self::Output;
}

/// A started system of the `tx` suite. Dropping it closes it and removes
/// its files.
pub enum TxSystem {
    /// remem, with its default background flush (see [`Remem::open_for_tx`]).
    Remem(Remem),
    /// PMDK.
    Pmdk(Pmdk),
}

impl TxSystem {
    /// Calls `visitor` with the concrete peer inside.
    pub fn visit<V: TxVisitor>(&self, visitor: &mut V) -> V::Output {
        match self {
            TxSystem::Remem(p) => visitor.visit(p),
            TxSystem::Pmdk(p) => visitor.visit(p),
        }
    }

    /// Name in the report.
    pub fn name(&self) -> &'static str {
        match self {
            TxSystem::Remem(p) => p.name(),
            TxSystem::Pmdk(p) => p.name(),
        }
    }
}

/// Starts the named systems that have transactions (remem, PMDK), in the
/// order given; the others are not applicable and are left out silently.
/// One that cannot start is reported on stderr and left out.
pub fn open_tx(names: &[SystemName], dir: &Path) -> Vec<TxSystem> {
    let mut systems = Vec::new();
    for &name in names {
        let started = match name {
            SystemName::Remem => Remem::open_for_tx(dir).map(TxSystem::Remem),
            SystemName::Pmdk => Pmdk::open().map(TxSystem::Pmdk),
            SystemName::Glibc | SystemName::Jemalloc | SystemName::Mimalloc => continue,
        };
        match started {
            Ok(system) => systems.push(system),
            Err(why) => eprintln!("remem-bench: skipping {}: {why}", name.as_str()),
        }
    }
    systems
}
