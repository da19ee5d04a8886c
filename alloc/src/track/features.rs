//! userfaultfd feature bits (`UFFD_FEATURE_*`), with the kernel release
//! that introduced each, for error messages that name the fix.

use std::fmt;
use std::ops::{BitAnd, BitOr, BitOrAssign};

/// A set of `UFFD_FEATURE_*` bits, as negotiated by `UFFDIO_API`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct UffdFeatures(u64);

/// (bit, name, first Linux release with it)
const TABLE: [(u64, &str, &str); 17] = [
    (1 << 0, "UFFD_FEATURE_PAGEFAULT_FLAG_WP", "5.7"),
    (1 << 1, "UFFD_FEATURE_EVENT_FORK", "4.11"),
    (1 << 2, "UFFD_FEATURE_EVENT_REMAP", "4.11"),
    (1 << 3, "UFFD_FEATURE_EVENT_REMOVE", "4.11"),
    (1 << 4, "UFFD_FEATURE_MISSING_HUGETLBFS", "4.11"),
    (1 << 5, "UFFD_FEATURE_MISSING_SHMEM", "4.11"),
    (1 << 6, "UFFD_FEATURE_EVENT_UNMAP", "4.11"),
    (1 << 7, "UFFD_FEATURE_SIGBUS", "4.14"),
    (1 << 8, "UFFD_FEATURE_THREAD_ID", "4.14"),
    (1 << 9, "UFFD_FEATURE_MINOR_HUGETLBFS", "5.13"),
    (1 << 10, "UFFD_FEATURE_MINOR_SHMEM", "5.14"),
    (1 << 11, "UFFD_FEATURE_EXACT_ADDRESS", "5.18"),
    (1 << 12, "UFFD_FEATURE_WP_HUGETLBFS_SHMEM", "5.19"),
    (1 << 13, "UFFD_FEATURE_WP_UNPOPULATED", "6.4"),
    (1 << 14, "UFFD_FEATURE_POISON", "6.6"),
    (1 << 15, "UFFD_FEATURE_WP_ASYNC", "6.7"),
    (1 << 16, "UFFD_FEATURE_MOVE", "6.8"),
];

impl UffdFeatures {
    /// No feature.
    pub const EMPTY: Self = Self(0);
    /// Page-fault messages carry the write-protect flag.
    pub const PAGEFAULT_FLAG_WP: Self = Self(1 << 0);
    /// Report fork() of the registered process.
    pub const EVENT_FORK: Self = Self(1 << 1);
    /// Report mremap() of registered ranges.
    pub const EVENT_REMAP: Self = Self(1 << 2);
    /// Report MADV_DONTNEED/MADV_REMOVE of registered ranges.
    pub const EVENT_REMOVE: Self = Self(1 << 3);
    /// Missing faults on hugetlbfs.
    pub const MISSING_HUGETLBFS: Self = Self(1 << 4);
    /// Missing faults on shmem (memfd).
    pub const MISSING_SHMEM: Self = Self(1 << 5);
    /// Report munmap() of registered ranges.
    pub const EVENT_UNMAP: Self = Self(1 << 6);
    /// Raise SIGBUS instead of queueing fault events.
    pub const SIGBUS: Self = Self(1 << 7);
    /// Fault messages carry the faulting thread's id.
    pub const THREAD_ID: Self = Self(1 << 8);
    /// Minor faults on hugetlbfs.
    pub const MINOR_HUGETLBFS: Self = Self(1 << 9);
    /// Minor faults on shmem (memfd).
    pub const MINOR_SHMEM: Self = Self(1 << 10);
    /// Fault addresses are not masked to the page.
    pub const EXACT_ADDRESS: Self = Self(1 << 11);
    /// Write-protection of hugetlbfs and shmem (memfd) mappings.
    pub const WP_HUGETLBFS_SHMEM: Self = Self(1 << 12);
    /// Write-protection also covers pages not yet populated (anonymous memory).
    pub const WP_UNPOPULATED: Self = Self(1 << 13);
    /// UFFDIO_POISON.
    pub const POISON: Self = Self(1 << 14);
    /// The kernel resolves write-protect faults itself; `PAGEMAP_SCAN` harvests.
    pub const WP_ASYNC: Self = Self(1 << 15);
    /// UFFDIO_MOVE.
    pub const MOVE: Self = Self(1 << 16);

    /// The raw bits.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// From raw bits, keeping bits this crate has no name for.
    pub const fn from_bits_retain(bits: u64) -> Self {
        Self(bits)
    }

    /// Whether every bit of `other` is in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Bits in `self` but not in `other`.
    pub const fn difference(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }

    /// Whether no bit is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// `(name, first Linux release)` of each named bit in the set.
    pub fn named(self) -> impl Iterator<Item = (&'static str, &'static str)> {
        TABLE.iter().filter(move |(b, _, _)| self.0 & b != 0).map(|&(_, n, s)| (n, s))
    }
}

impl BitOr for UffdFeatures {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl BitOrAssign for UffdFeatures {
    fn bitor_assign(&mut self, rhs: Self) {
        self.0 |= rhs.0;
    }
}

impl BitAnd for UffdFeatures {
    type Output = Self;
    fn bitand(self, rhs: Self) -> Self {
        Self(self.0 & rhs.0)
    }
}

impl fmt::Debug for UffdFeatures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut l = f.debug_set();
        for (n, _) in self.named() {
            l.entry(&format_args!("{}", n.trim_start_matches("UFFD_FEATURE_")));
        }
        let unknown = TABLE.iter().fold(self.0, |acc, (b, _, _)| acc & !b);
        if unknown != 0 {
            l.entry(&format_args!("{unknown:#x}"));
        }
        l.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_match_kernel_headers() {
        assert_eq!(UffdFeatures::WP_HUGETLBFS_SHMEM.bits(), 0x1000);
        assert_eq!(UffdFeatures::WP_UNPOPULATED.bits(), 1 << 13);
        assert_eq!(UffdFeatures::WP_ASYNC.bits(), 1 << 15);
        assert_eq!(UffdFeatures::MOVE.bits(), 1 << 16);
        assert_eq!(UffdFeatures::THREAD_ID.bits(), 0x100);
        for (i, (b, _, _)) in TABLE.iter().enumerate() {
            assert_eq!(*b, 1 << i);
        }
    }

    #[test]
    fn set_operations_and_names() {
        let f = UffdFeatures::WP_ASYNC | UffdFeatures::WP_UNPOPULATED;
        assert!(f.contains(UffdFeatures::WP_ASYNC));
        assert!(!f.contains(UffdFeatures::MOVE));
        assert_eq!(f.difference(UffdFeatures::WP_ASYNC), UffdFeatures::WP_UNPOPULATED);
        let names: Vec<_> = f.named().collect();
        assert_eq!(names, [("UFFD_FEATURE_WP_UNPOPULATED", "6.4"), ("UFFD_FEATURE_WP_ASYNC", "6.7")]);
        assert_eq!(
            format!("{:?}", f | UffdFeatures::from_bits_retain(1 << 40)),
            "{WP_UNPOPULATED, WP_ASYNC, 0x10000000000}"
        );
    }
}
