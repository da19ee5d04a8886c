//! Building a tracker: mode, userfaultfd options, feature checks.

use super::bitmap::WordStore;
use super::error::{Result, TrackError};
use super::fast::FastTracker;
use super::features::UffdFeatures;
use super::precise::PreciseTracker;
use super::sys::{self, Uffd};
use super::{NoTracking, Region, TrackMode, Tracker};

/// Builds a [`Tracker`] over a region.
///
/// ```no_run
/// # use remem_alloc::track::{TrackMode, TrackerBuilder, Tracker};
/// # fn demo(base: *mut u8, len: usize) -> remem_alloc::track::Result<()> {
/// let tracker = TrackerBuilder::new(TrackMode::Fast).build(base, len)?;
/// tracker.protect_all()?;
/// let mut dirty = Vec::new();
/// tracker.harvest(&mut dirty)?; // pages written since protect_all
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct TrackerBuilder {
    pub(crate) mode: TrackMode,
    pub(crate) close_on_exec: bool,
    pub(crate) non_blocking: bool,
    pub(crate) require: UffdFeatures,
}

impl TrackerBuilder {
    /// A builder for `mode`, with `close_on_exec` and `non_blocking` on and
    /// no feature required beyond what the mode needs.
    pub fn new(mode: TrackMode) -> Self {
        Self { mode, close_on_exec: true, non_blocking: true, require: UffdFeatures::EMPTY }
    }

    /// Whether the userfaultfd is closed on `execve` (default: yes).
    pub fn close_on_exec(mut self, on: bool) -> Self {
        self.close_on_exec = on;
        self
    }

    /// Whether the userfaultfd is non-blocking (default: yes). Either way
    /// the precise handler waits in poll(2) and drains every pending event
    /// per wake-up; non-blocking lets it read until EAGAIN.
    pub fn non_blocking(mut self, on: bool) -> Self {
        self.non_blocking = on;
        self
    }

    /// Features to insist on beyond the mode's own (fast mode needs
    /// `WP_ASYNC` and `WP_UNPOPULATED`); building fails with
    /// [`TrackError::FeatureMissing`] when the kernel lacks one.
    pub fn require_features(mut self, features: UffdFeatures) -> Self {
        self.require |= features;
        self
    }

    /// The mode this builder builds.
    pub fn mode(&self) -> TrackMode {
        self.mode
    }

    /// Builds the tracker for this builder's mode over `[base, base + len)`,
    /// which must be page-aligned and mapped (a memfd `MAP_SHARED` mapping
    /// for the heap; precise mode also takes anonymous memory, fast mode
    /// also takes disk files).
    ///
    /// The tracker never reads or writes the region; it only changes its
    /// write-protection. A new tracker has never seen the pages clean: its
    /// first harvest reports every page. Call [`Tracker::protect_all`] to
    /// start from "all clean" instead.
    ///
    /// Precise mode starts a handler thread that must never write to the
    /// region: do not track memory that the global allocator hands out.
    pub fn build(&self, base: *mut u8, len: usize) -> Result<Box<dyn Tracker>> {
        Ok(match self.mode {
            TrackMode::Off => Box::new(self.build_off(base, len)?),
            TrackMode::Precise => Box::new(self.build_precise(base, len)?),
            TrackMode::Fast => Box::new(self.build_fast(base, len)?),
        })
    }

    /// The explicit opt-out: a [`NoTracking`] over the region.
    pub fn build_off(&self, base: *mut u8, len: usize) -> Result<NoTracking> {
        let r = Region::new(base, len)?;
        Ok(NoTracking::new(r.pages(), r.page_size()))
    }

    /// A [`PreciseTracker`] whose dirty set lives in a private mapping.
    pub fn build_precise(&self, base: *mut u8, len: usize) -> Result<PreciseTracker> {
        PreciseTracker::build(self, Region::new(base, len)?, None)
    }

    /// A [`PreciseTracker`] whose dirty set lives in `store` (e.g. a shared
    /// control region, given as [`RawWords`](super::RawWords)), which must
    /// hold at least
    /// [`DirtyBitmap::words_for`](super::DirtyBitmap::words_for)`(pages)`
    /// words and must not be tracked memory. Its contents are overwritten.
    ///
    /// The current set is exactly the first `words_for(pages)` words of
    /// `store` (bit `p % 64` of word `p / 64` is page `p`; extra words are
    /// left alone) for the tracker's whole life: the owner of the control
    /// region finds them at [`PreciseTracker::dirty_set`] /
    /// [`Tracker::current_set`], and
    /// [`DirtyBitmap::offset_in`](super::DirtyBitmap::offset_in) gives
    /// their byte offset in the region. Pair it with a closing bitmap in
    /// other words of the same region for [`Tracker::harvest_into`].
    pub fn build_precise_in(&self, base: *mut u8, len: usize, store: Box<dyn WordStore>) -> Result<PreciseTracker> {
        PreciseTracker::build(self, Region::new(base, len)?, Some(store))
    }

    /// A [`FastTracker`].
    pub fn build_fast(&self, base: *mut u8, len: usize) -> Result<FastTracker> {
        FastTracker::build(self, Region::new(base, len)?)
    }
}

/// The userfaultfd features the running kernel offers (opens and closes a
/// userfaultfd): e.g. to choose between the fast and the precise mode.
pub fn probe_features() -> Result<UffdFeatures> {
    probe_with(true)
}

pub(crate) fn probe_with(close_on_exec: bool) -> Result<UffdFeatures> {
    let u = Uffd::open(close_on_exec, true).map_err(TrackError::from_open)?;
    // UFFDIO_API can be negotiated once per descriptor; asking for no
    // feature answers with every supported one. The real descriptor is
    // opened afterwards.
    let api = u.api(0).map_err(TrackError::sys("UFFDIO_API"))?;
    Ok(UffdFeatures::from_bits_retain(api.features))
}

/// Fails with the first feature of `required` that `supported` lacks.
pub(crate) fn check_features(supported: UffdFeatures, required: UffdFeatures, hint: &'static str) -> Result<()> {
    let missing = required.difference(supported);
    if missing.is_empty() {
        return Ok(());
    }
    let (feature, since) = missing.named().next().unwrap_or(("an unnamed UFFD_FEATURE bit", "a newer kernel"));
    Err(TrackError::FeatureMissing { feature, since, kernel: sys::kernel_release(), hint })
}

/// Opens a userfaultfd with `wanted` features and registers `region` for
/// write-protection, failing with a message naming `since` (the kernels
/// that can) and `hint` when the kernel cannot write-protect this mapping.
pub(crate) fn open_registered(
    b: &TrackerBuilder,
    wanted: UffdFeatures,
    region: Region,
    since: &'static str,
    hint: &'static str,
) -> Result<Uffd> {
    let uffd = Uffd::open(b.close_on_exec, b.non_blocking).map_err(TrackError::from_open)?;
    uffd.api(wanted.bits()).map_err(TrackError::sys("UFFDIO_API"))?;
    let ioctls = uffd
        .register_wp(region.base, region.len)
        .map_err(|e| TrackError::from_register(region.base as usize, region.len as usize, e))?;
    if ioctls & sys::UFFDIO_WRITEPROTECT_IOCTL_BIT == 0 {
        return Err(TrackError::FeatureMissing {
            feature: "UFFDIO_WRITEPROTECT on this kind of mapping",
            since,
            kernel: sys::kernel_release(),
            hint,
        });
    }
    Ok(uffd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_feature_names_feature_and_version() {
        let e = check_features(
            UffdFeatures::WP_UNPOPULATED,
            UffdFeatures::WP_ASYNC | UffdFeatures::WP_UNPOPULATED,
            "use TrackMode::Precise",
        )
        .unwrap_err();
        let m = e.to_string();
        assert!(m.contains("UFFD_FEATURE_WP_ASYNC") && m.contains("Linux >= 6.7"), "{m}");
        assert!(check_features(UffdFeatures::WP_ASYNC, UffdFeatures::EMPTY, "").is_ok());
    }

    #[test]
    fn this_kernel_offers_what_both_modes_need() {
        let f = probe_features().expect("userfaultfd (tests run as root)");
        assert!(
            f.contains(UffdFeatures::WP_ASYNC | UffdFeatures::WP_UNPOPULATED | UffdFeatures::WP_HUGETLBFS_SHMEM),
            "{f:?}"
        );
    }

    #[test]
    fn require_features_is_enforced() {
        let b = TrackerBuilder::new(TrackMode::Precise).require_features(UffdFeatures::from_bits_retain(1 << 62));
        let r = sys::TestRegion::memfd(4 * sys::page_size(), true).unwrap();
        let e = b.build(r.base(), r.len()).unwrap_err();
        assert!(matches!(e, TrackError::FeatureMissing { .. }), "{e}");
    }
}
