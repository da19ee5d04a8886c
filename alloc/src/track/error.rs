//! Errors of the dirty-page tracker.

use std::io;

/// `Result` with [`TrackError`].
pub type Result<T, E = TrackError> = std::result::Result<T, E>;

/// Why a tracker could not be built or could not harvest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrackError {
    /// The process may not create a userfaultfd (EPERM from userfaultfd(2) and from `/dev/userfaultfd`).
    #[error(
        "userfaultfd is not permitted for this process (EPERM): run as root, or \
         `sysctl vm.unprivileged_userfaultfd=1`, or grant read/write access to /dev/userfaultfd; \
         or opt out of tracking with TrackMode::Off (every flush then writes the whole heap)"
    )]
    NotPermitted,

    /// The kernel has no userfaultfd at all (ENOSYS).
    #[error(
        "this kernel has no userfaultfd (ENOSYS: built without CONFIG_USERFAULTFD); use a kernel \
         with userfaultfd (write-protection needs Linux >= 5.7, memfd write-protection >= 5.19), \
         or opt out of tracking with TrackMode::Off (every flush then writes the whole heap)"
    )]
    Unavailable,

    /// The kernel lacks a feature the chosen mode (or `require_features`) needs.
    #[error("the running kernel ({kernel}) lacks {feature}, which needs Linux >= {since}; {hint}")]
    FeatureMissing {
        /// The feature, e.g. `UFFD_FEATURE_WP_ASYNC` or `PAGEMAP_SCAN`.
        feature: &'static str,
        /// The first Linux release that has it.
        since: &'static str,
        /// `uname -r` of the running kernel.
        kernel: String,
        /// What to do instead.
        hint: &'static str,
    },

    /// The region is empty, not page-aligned, or wraps around the address space.
    #[error("region {base:#x}+{len:#x} must be non-empty and aligned to the {page_size}-byte page size")]
    Misaligned {
        /// Start address given.
        base: usize,
        /// Length given.
        len: usize,
        /// The system page size.
        page_size: usize,
    },

    /// `UFFDIO_REGISTER` refused the region.
    #[error("cannot register {base:#x}+{len:#x} for write-protect tracking: {source}{hint}")]
    Register {
        /// Start address given.
        base: usize,
        /// Length given.
        len: usize,
        /// What the errno usually means here.
        hint: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },

    /// Storage given for the dirty set is smaller than the region needs.
    #[error("dirty-set storage holds {have} words but {pages} pages need {need}")]
    StorageTooSmall {
        /// Words provided.
        have: usize,
        /// Words needed.
        need: usize,
        /// Pages in the region.
        pages: u64,
    },

    /// The `closing` bitmap given to `harvest_into` covers another number of pages.
    #[error("the closing dirty set covers {closing} pages but the tracked region has {pages}")]
    ClosingSizeMismatch {
        /// Pages the closing bitmap covers.
        closing: u64,
        /// Pages in the region.
        pages: u64,
    },

    /// The `closing` bitmap given to `harvest_into` shares words with the
    /// tracker's current dirty set (moving a page would then drop it).
    #[error("the closing dirty set shares memory with the current dirty set; give them disjoint words")]
    ClosingAliasesCurrent,

    /// A system call failed.
    #[error("{op} failed: {source}")]
    Sys {
        /// The call, e.g. `UFFDIO_WRITEPROTECT`.
        op: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },

    /// The precise mode's fault-handler thread failed; the dirty set is no longer known to be complete.
    #[error(
        "the write-fault handler failed in {op}: {source}; tracking stopped (the region was \
         unregistered so writers do not hang) and the dirty set is no longer complete: \
         flush the whole heap and rebuild the tracker"
    )]
    HandlerFailed {
        /// The call that failed.
        op: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
}

impl TrackError {
    pub(crate) fn sys(op: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Sys { op, source }
    }

    /// Maps the error of opening a userfaultfd.
    pub(crate) fn from_open(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => Self::NotPermitted,
            Some(libc::ENOSYS) => Self::Unavailable,
            _ => Self::Sys { op: "userfaultfd(2)", source: e },
        }
    }

    /// Maps the error of `UFFDIO_REGISTER`.
    pub(crate) fn from_register(base: usize, len: usize, source: io::Error) -> Self {
        let hint = match source.raw_os_error() {
            Some(libc::EINVAL) => {
                " (EINVAL: synchronous write-protection works on memfd/shmem and anonymous \
                 mappings only; a MAP_SHARED disk file supports TrackMode::Fast only)"
            }
            Some(libc::ENOMEM) => " (ENOMEM: the range is not entirely mapped)",
            Some(libc::EBUSY) => " (EBUSY: another userfaultfd already covers part of the range)",
            Some(libc::EPERM) => " (EPERM: the mapping is not writable by this process)",
            _ => "",
        };
        Self::Register { base, len, hint, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_fix() {
        let m = TrackError::from_open(io::Error::from_raw_os_error(libc::EPERM)).to_string();
        assert!(m.contains("vm.unprivileged_userfaultfd=1") && m.contains("/dev/userfaultfd"), "{m}");
        let m = TrackError::from_open(io::Error::from_raw_os_error(libc::ENOSYS)).to_string();
        assert!(m.contains("CONFIG_USERFAULTFD"), "{m}");
        let m = TrackError::FeatureMissing {
            feature: "UFFD_FEATURE_WP_ASYNC",
            since: "6.7",
            kernel: "6.1.0".into(),
            hint: "use TrackMode::Precise",
        }
        .to_string();
        assert!(m.contains("UFFD_FEATURE_WP_ASYNC") && m.contains(">= 6.7"), "{m}");
        let m = TrackError::from_register(0x1000, 0x2000, io::Error::from_raw_os_error(libc::EINVAL)).to_string();
        assert!(m.contains("TrackMode::Fast"), "{m}");
    }
}
