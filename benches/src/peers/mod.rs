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

/// Starts the named systems, in the order given. One that cannot start is
/// reported on stderr, with the fix, and left out.
pub fn open(names: &[SystemName]) -> Vec<System> {
    let mut systems = Vec::new();
    for &name in names {
        let started = match name {
            SystemName::Remem => Remem::open().map(System::Remem),
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
