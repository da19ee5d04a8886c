//! The tracker's syscall layer: the only file of `track` with `unsafe`.
//!
//! Precise mode (and lazy loading) use the `userfaultfd` crate; what it
//! lacks is here: the fast mode's descriptor (`UFFD_FEATURE_WP_ASYNC`
//! negotiated and registered by hand, and the feature probe),
//! `PAGEMAP_SCAN`, `UFFDIO_COPY` with `UFFDIO_COPY_MODE_WP` and
//! `UFFDIO_POISON`. Neither `libc` nor `linux-raw-sys` defines the
//! userfaultfd write-protect structs or `PAGEMAP_SCAN`, so they are written
//! out here once, from the
//! kernel's uapi headers (`linux/userfaultfd.h`, `linux/fs.h`), and a test
//! checks every ioctl number, struct size and field offset against the
//! values the kernel headers give (measured on Linux 6.18).
//!
//! Every wrapper here is safe to call: the kernel only ever writes into
//! buffers that the wrapper borrows for the call, and changing the
//! write-protection of pages (of any range) never makes Rust memory unsound;
//! at worst a writer blocks until the fault handler resolves the fault.
//!
//! Memory the fault handler writes to must never be tracked memory (the
//! handler would fault on its own write and wait for itself). [`OwnedWords`]
//! and [`MmapBox`] therefore take their memory straight from `mmap(2)`,
//! never from the global allocator, which may itself be serving the tracked
//! region.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::size_of;
use std::ops::Deref;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

// ---------------------------------------------------------------------------
// ioctl numbers (include/uapi/asm-generic/ioctl.h)
// ---------------------------------------------------------------------------

const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = 8;
const IOC_SIZESHIFT: u32 = 16;
const IOC_DIRSHIFT: u32 = 30;
const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOC(dir, type, nr, size)`.
pub(crate) const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    assert!(size < (1 << 14), "ioctl argument too large for _IOC");
    (dir << IOC_DIRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
        | ((ty as u32) << IOC_TYPESHIFT)
        | ((nr as u32) << IOC_NRSHIFT)
}

/// `_IO(type, nr)`.
pub(crate) const fn io_(ty: u8, nr: u8) -> u32 {
    ioc(IOC_NONE, ty, nr, 0)
}

/// `_IOWR(type, nr, size)`.
pub(crate) const fn iowr(ty: u8, nr: u8, size: usize) -> u32 {
    ioc(IOC_READ | IOC_WRITE, ty, nr, size)
}

/// The userfaultfd ioctl type byte.
const UFFDIO: u8 = 0xAA;
/// The userfaultfd API version that `UFFDIO_API` negotiates.
pub(crate) const UFFD_API: u64 = 0xAA;

pub(crate) const UFFDIO_API: u32 = iowr(UFFDIO, 0x3F, size_of::<UffdioApi>());
pub(crate) const UFFDIO_REGISTER: u32 = iowr(UFFDIO, 0x00, size_of::<UffdioRegister>());
pub(crate) const UFFDIO_WRITEPROTECT: u32 = iowr(UFFDIO, 0x06, size_of::<UffdioWriteprotect>());
/// `/dev/userfaultfd`'s only ioctl: make a new userfaultfd (Linux ≥ 6.1).
pub(crate) const USERFAULTFD_IOC_NEW: u32 = io_(UFFDIO, 0x00);
/// `PAGEMAP_SCAN` on `/proc/<pid>/pagemap` (Linux ≥ 6.7).
pub(crate) const PAGEMAP_SCAN: u32 = iowr(b'f', 16, size_of::<PmScanArg>());

/// Bit of `uffdio_register.ioctls` saying `UFFDIO_WRITEPROTECT` works on the range.
pub(crate) const UFFDIO_WRITEPROTECT_IOCTL_BIT: u64 = 1 << 0x06;

pub(crate) const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub(crate) const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

// PAGEMAP_SCAN flags and page categories (include/uapi/linux/fs.h).
pub(crate) const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
pub(crate) const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
pub(crate) const PAGE_IS_WRITTEN: u64 = 1 << 1;

// ---------------------------------------------------------------------------
// Kernel structs
// ---------------------------------------------------------------------------

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}

/// `struct pm_scan_arg` (12 × u64).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

/// `struct page_region`: `[start, end)` with the categories it matched.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The system page size.
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf takes no pointers and has no preconditions.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(ps).ok().filter(|p| p.is_power_of_two()).unwrap_or(4096)
}

/// `uname -r`, for error messages.
pub(crate) fn kernel_release() -> String {
    // SAFETY: utsname is plain old data; all-zero is a valid value.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname writes into the struct we exclusively borrow.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    // SAFETY: on success the kernel NUL-terminates `release` inside its
    // fixed-size array, which lives as long as `u`.
    let rel = unsafe { CStr::from_ptr(u.release.as_ptr()) };
    rel.to_string_lossy().into_owned()
}

fn ioctl_ptr<T>(fd: BorrowedFd<'_>, request: u32, arg: &mut T) -> io::Result<libc::c_int> {
    // SAFETY: every caller passes the `#[repr(C)]` struct whose size is
    // encoded in `request` (checked by the tests), so the kernel reads and
    // writes only within `*arg`, which is exclusively borrowed for the call.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::Ioctl, arg as *mut T) })
}

// ---------------------------------------------------------------------------
// userfaultfd
// ---------------------------------------------------------------------------

/// An owned userfaultfd.
#[derive(Debug)]
pub(crate) struct Uffd(OwnedFd);

impl Uffd {
    /// A new userfaultfd: userfaultfd(2), and where that is refused with
    /// EPERM (`vm.unprivileged_userfaultfd=0`), `/dev/userfaultfd`. The
    /// error is the syscall's when both fail.
    pub(crate) fn open(close_on_exec: bool, non_blocking: bool) -> io::Result<Self> {
        let mut flags = 0;
        if close_on_exec {
            flags |= libc::O_CLOEXEC;
        }
        if non_blocking {
            flags |= libc::O_NONBLOCK;
        }
        // SAFETY: userfaultfd(2) takes one integer and returns a new
        // descriptor or -1; no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if fd >= 0 {
            // SAFETY: the kernel just returned this descriptor; nothing else owns it.
            return Ok(Self(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) }));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EPERM) {
            return Err(err);
        }
        Self::open_dev(flags).map_err(|_| err)
    }

    fn open_dev(flags: libc::c_int) -> io::Result<Self> {
        let dev: File =
            OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open("/dev/userfaultfd")?;
        // SAFETY: USERFAULTFD_IOC_NEW takes the open flags as an integer
        // argument (not a pointer) and returns a new descriptor or -1.
        let fd = cvt(unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as libc::Ioctl, flags) })?;
        // SAFETY: the kernel just returned this descriptor; nothing else owns it.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// A second descriptor for the same userfaultfd context.
    pub(crate) fn try_clone(&self) -> io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }

    /// `UFFDIO_API` with `features`; returns what the kernel wrote back
    /// (with `features == 0`: every feature it supports).
    pub(crate) fn api(&self, features: u64) -> io::Result<UffdioApi> {
        let mut a = UffdioApi { api: UFFD_API, features, ioctls: 0 };
        ioctl_ptr(self.0.as_fd(), UFFDIO_API, &mut a)?;
        Ok(a)
    }

    /// `UFFDIO_REGISTER` with `UFFDIO_REGISTER_MODE_WP`; returns the
    /// ioctls the kernel allows on the range.
    pub(crate) fn register_wp(&self, start: u64, len: u64) -> io::Result<u64> {
        let mut r = UffdioRegister { range: UffdioRange { start, len }, mode: UFFDIO_REGISTER_MODE_WP, ioctls: 0 };
        ioctl_ptr(self.0.as_fd(), UFFDIO_REGISTER, &mut r)?;
        Ok(r.ioctls)
    }

    /// `UFFDIO_WRITEPROTECT`: protect (`mode WP`) or unprotect and wake
    /// (`mode 0`). Retries while the kernel answers EAGAIN (the mm is
    /// changing under a concurrent non-cooperative event).
    pub(crate) fn writeprotect(&self, start: u64, len: u64, protect: bool) -> io::Result<()> {
        let mode = if protect { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 };
        loop {
            let mut w = UffdioWriteprotect { range: UffdioRange { start, len }, mode };
            match ioctl_ptr(self.0.as_fd(), UFFDIO_WRITEPROTECT, &mut w) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => std::thread::yield_now(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// `struct uffdio_copy` (40 bytes).
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct UffdioCopy {
    pub(crate) dst: u64,
    pub(crate) src: u64,
    pub(crate) len: u64,
    pub(crate) mode: u64,
    pub(crate) copy: i64,
}

/// `struct uffdio_poison` (32 bytes).
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct UffdioPoison {
    pub(crate) range: UffdioRange,
    pub(crate) mode: u64,
    pub(crate) updated: i64,
}

pub(crate) const UFFDIO_COPY: u32 = iowr(UFFDIO, 0x03, size_of::<UffdioCopy>());
pub(crate) const UFFDIO_POISON: u32 = iowr(UFFDIO, 0x08, size_of::<UffdioPoison>());
/// `UFFDIO_COPY_MODE_DONTWAKE` (also `UFFDIO_POISON_MODE_DONTWAKE`).
pub(crate) const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_COPY_MODE_WP`: install the pages write-protected.
pub(crate) const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;

/// `UFFDIO_COPY` of `len` bytes from `src` to `dst` (registered for MISSING
/// faults) with `mode`, on the userfaultfd `fd`. Returns the bytes copied
/// and the error, if any: on `EAGAIN` (and `EEXIST` at a later page) the
/// kernel has copied a prefix, and the caller retries or skips from there.
/// The `userfaultfd` crate's `copy` has no `UFFDIO_COPY_MODE_WP`.
///
/// # Safety
///
/// `src..src + len` must be readable memory of this process. `dst..dst + len`
/// is written by the kernel only where no page exists yet (a missing page
/// of a registered range), so it cannot overwrite anything a reference
/// points to.
pub(crate) unsafe fn uffd_copy(
    fd: BorrowedFd<'_>,
    dst: u64,
    src: *const u8,
    len: u64,
    mode: u64,
) -> (u64, Option<io::Error>) {
    let mut c = UffdioCopy { dst, src: src as u64, len, mode, copy: 0 };
    let r = ioctl_ptr(fd, UFFDIO_COPY, &mut c);
    let copied = if c.copy > 0 { c.copy as u64 } else { 0 };
    (copied, r.err())
}

/// `UFFDIO_POISON` of `len` bytes at `start` (Linux >= 6.6): touching those
/// pages raises SIGBUS. The crate has no binding for it.
pub(crate) fn uffd_poison(fd: BorrowedFd<'_>, start: u64, len: u64, mode: u64) -> (u64, Option<io::Error>) {
    let mut p = UffdioPoison { range: UffdioRange { start, len }, mode, updated: 0 };
    let r = ioctl_ptr(fd, UFFDIO_POISON, &mut p);
    let done = if p.updated > 0 { p.updated as u64 } else { 0 };
    (done, r.err())
}

/// The `userfaultfd` crate's handle on the userfaultfd `fd` (which it
/// then owns and closes).
pub(crate) fn crate_uffd(fd: OwnedFd) -> userfaultfd::Uffd {
    // SAFETY: `fd` is an open descriptor we own, handed over whole: the
    // crate's `Uffd` is its only owner from here on.
    unsafe { userfaultfd::Uffd::from_raw_fd(fd.into_raw_fd()) }
}

impl Uffd {
    /// Adopts a descriptor that is a userfaultfd (e.g. one opened with the
    /// `userfaultfd` crate, for a shared context).
    pub(crate) fn from_owned(fd: OwnedFd) -> Self {
        Self(fd)
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

// ---------------------------------------------------------------------------
// poll
// ---------------------------------------------------------------------------

/// poll(2) for readability of one descriptor; returns its `revents`.
pub(crate) fn poll_in(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<i16> {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: `p` is one pollfd, exclusively borrowed for the call.
    cvt(unsafe { libc::poll(&mut p, 1, timeout_ms) })?;
    Ok(p.revents)
}

/// poll(2) for readability of two descriptors; returns both `revents`.
pub(crate) fn poll_in2(a: BorrowedFd<'_>, b: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<(i16, i16)> {
    let mut p = [
        libc::pollfd { fd: a.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: b.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    // SAFETY: `p` is two pollfds, exclusively borrowed for the call.
    cvt(unsafe { libc::poll(p.as_mut_ptr(), 2, timeout_ms) })?;
    Ok((p[0].revents, p[1].revents))
}

/// An eventfd: a descriptor another thread can make readable (to stop a
/// thread waiting in poll(2)).
#[derive(Debug)]
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: eventfd(2) takes two integers and returns a new descriptor or -1.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: the kernel just returned this descriptor; nothing else owns it.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Makes the descriptor readable (for good: it is never read).
    // eventfd(2) counters are host-endian u64 by definition.
    #[allow(clippy::host_endian_bytes)]
    pub(crate) fn signal(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: write(2) reads 8 bytes from `one`, which lives across the call.
        unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

// ---------------------------------------------------------------------------
// /proc/self/pagemap and PAGEMAP_SCAN
// ---------------------------------------------------------------------------

/// This process's `/proc/self/pagemap`, for `PAGEMAP_SCAN`.
#[derive(Debug)]
pub(crate) struct Pagemap(File);

impl Pagemap {
    pub(crate) fn open_self() -> io::Result<Self> {
        Ok(Self(OpenOptions::new().read(true).custom_flags(libc::O_CLOEXEC).open("/proc/self/pagemap")?))
    }

    /// One `PAGEMAP_SCAN` call over `[start, end)` selecting pages whose
    /// categories match `mask` (and returning those categories), at most
    /// `vec.len()` regions. Returns the number of regions written into `vec`
    /// and the `walk_end` the kernel reported.
    pub(crate) fn scan(
        &self,
        start: u64,
        end: u64,
        flags: u64,
        mask: u64,
        vec: &mut [PageRegion],
    ) -> io::Result<(usize, u64)> {
        let mut arg = PmScanArg {
            size: size_of::<PmScanArg>() as u64,
            flags,
            start,
            end,
            walk_end: 0,
            vec: vec.as_mut_ptr() as u64,
            vec_len: vec.len() as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: mask,
            category_anyof_mask: 0,
            return_mask: mask,
        };
        loop {
            // SAFETY: PAGEMAP_SCAN reads `arg` (whose size is encoded in the
            // request and in `arg.size`) and writes back only its `walk_end`;
            // it writes at most `arg.vec_len` page_region entries at
            // `arg.vec`, which is `vec`, exclusively borrowed for the call.
            // With PM_SCAN_WP_MATCHING it write-protects pages of this
            // process's async-registered ranges, which changes no memory.
            let rc =
                unsafe { libc::ioctl(self.0.as_raw_fd(), PAGEMAP_SCAN as libc::Ioctl, &mut arg as *mut PmScanArg) };
            if rc >= 0 {
                return Ok(((rc as usize).min(vec.len()), arg.walk_end));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Memory from mmap(2), never from the global allocator
// ---------------------------------------------------------------------------

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// A private anonymous, pre-faulted, zero-filled mapping of `len` bytes.
fn mmap_anon(len: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: an anonymous mapping at an address the kernel chooses aliases
    // no existing Rust memory; no pointer is passed in.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast()).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))
}

fn munmap(p: NonNull<u8>, len: usize) {
    // SAFETY: callers pass a mapping made by `mmap_anon` with its length,
    // once, after the last reference into it is gone.
    unsafe { libc::munmap(p.as_ptr().cast(), len) };
}

/// `len` zeroed `AtomicU64` words in a private anonymous mapping that this
/// value owns: storage for a dirty bitmap that is guaranteed not to be in
/// tracked memory, whatever the global allocator is.
pub struct OwnedWords {
    ptr: NonNull<AtomicU64>,
    len: usize,
    map_len: usize,
}

impl OwnedWords {
    /// Maps `len` zeroed words.
    pub fn new(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Ok(Self { ptr: NonNull::dangling(), len: 0, map_len: 0 });
        }
        let bytes = len.checked_mul(8).ok_or(io::ErrorKind::InvalidInput)?;
        let map_len = round_up(bytes, page_size());
        let ptr = mmap_anon(map_len)?.cast();
        Ok(Self { ptr, len, map_len })
    }
}

impl Deref for OwnedWords {
    type Target = [AtomicU64];

    fn deref(&self) -> &[AtomicU64] {
        // SAFETY: `ptr` points to `map_len >= 8 * len` bytes of a mapping
        // owned by `self` and alive until drop; it is page-aligned (so
        // aligned for AtomicU64), and zero-filled by the kernel (a valid
        // AtomicU64). Only shared references are handed out, and AtomicU64
        // allows mutation through them. For `len == 0` the dangling pointer
        // is non-null and aligned.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for OwnedWords {
    fn drop(&mut self) {
        if self.map_len > 0 {
            munmap(self.ptr.cast(), self.map_len);
        }
    }
}

impl std::fmt::Debug for OwnedWords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedWords").field("len", &self.len).finish()
    }
}

// SAFETY: OwnedWords exclusively owns its mapping and exposes it only as
// `&[AtomicU64]`; AtomicU64 is Send and Sync.
unsafe impl Send for OwnedWords {}
// SAFETY: as above: shared access is only through atomics.
unsafe impl Sync for OwnedWords {}

/// `len` `AtomicU64` words at a raw address owned by someone else: the
/// storage of a [`DirtyBitmap`](super::DirtyBitmap) placed in memory the
/// caller maps, e.g. the shared memfd control region that the agent maps
/// too and registers for remote reads.
///
/// It never maps, unmaps or frees anything; the words are only ever
/// accessed atomically through `&[AtomicU64]`.
pub struct RawWords {
    ptr: NonNull<AtomicU64>,
    len: usize,
}

impl RawWords {
    /// Words `ptr[0..len]`.
    ///
    /// Panics when `ptr` is null or not 8-byte aligned.
    ///
    /// # Safety
    ///
    /// For as long as the `RawWords` (and any `DirtyBitmap` or tracker
    /// built over it) lives:
    ///
    /// - `ptr .. ptr + len` (`8 * len` bytes) is mapped readable and
    ///   writable and stays mapped (not unmapped, not remapped read-only);
    /// - nothing in this process accesses those bytes other than through
    ///   atomics of the same size (no `&mut`, no plain reads or writes, no
    ///   overlapping atomics of another width). Other processes (the agent)
    ///   and devices (an RDMA NIC reading them) may access them.
    ///
    /// Not a safety condition, but a liveness one: the memory must not be
    /// part of a tracked region (the precise fault handler and a harvest
    /// write these words while writers of tracked pages wait for them).
    pub unsafe fn new(ptr: *const AtomicU64, len: usize) -> Self {
        let ptr = NonNull::new(ptr.cast_mut()).expect("RawWords: null pointer");
        assert!(ptr.as_ptr().is_aligned(), "RawWords: {ptr:p} is not 8-byte aligned");
        Self { ptr, len }
    }

    /// The first word's address.
    pub fn as_ptr(&self) -> *const AtomicU64 {
        self.ptr.as_ptr()
    }
}

impl Deref for RawWords {
    type Target = [AtomicU64];

    fn deref(&self) -> &[AtomicU64] {
        // SAFETY: `new`'s contract: `ptr` is non-null and aligned (checked
        // there), `len` words are mapped for as long as `self` lives, and
        // they are only accessed atomically, so a shared slice of atomics
        // over them is sound (AtomicU64 allows mutation through `&`).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for RawWords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawWords").field("ptr", &self.ptr).field("len", &self.len).finish()
    }
}

// SAFETY: RawWords exposes its memory only as `&[AtomicU64]` (Send and
// Sync), and `new`'s contract keeps the memory alive and atomic-only from
// any thread.
unsafe impl Send for RawWords {}
// SAFETY: as above: shared access is only through atomics.
unsafe impl Sync for RawWords {}

/// Test helper: `RawWords` over words that live for ever (a leaked
/// mapping standing in for a control region), so tests need no `unsafe`.
#[cfg(test)]
pub(crate) fn raw_words_of(words: &'static [AtomicU64]) -> RawWords {
    // SAFETY: a `'static` slice of atomics is mapped, aligned, and only
    // accessed atomically for the rest of the process.
    unsafe { RawWords::new(words.as_ptr(), words.len()) }
}

/// A `Box` whose memory comes from its own anonymous mapping: for state
/// the fault handler writes (its lock and counters).
pub(crate) struct MmapBox<T> {
    ptr: NonNull<T>,
    map_len: usize,
}

impl<T> MmapBox<T> {
    pub(crate) fn new(value: T) -> io::Result<Self> {
        let ps = page_size();
        assert!(std::mem::align_of::<T>() <= ps, "MmapBox: alignment above page size");
        let map_len = round_up(size_of::<T>().max(1), ps);
        let ptr = mmap_anon(map_len)?.cast::<T>();
        // SAFETY: `ptr` is page-aligned (>= align_of::<T>()) and points to
        // `map_len >= size_of::<T>()` writable bytes that nothing references.
        unsafe { ptr.as_ptr().write(value) };
        Ok(Self { ptr, map_len })
    }
}

impl<T> Deref for MmapBox<T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: initialised in `new`, alive until drop, and only shared
        // references are ever handed out.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> Drop for MmapBox<T> {
    fn drop(&mut self) {
        // SAFETY: the value was initialised in `new` and is dropped once,
        // here, while `&mut self` guarantees no reference to it remains.
        unsafe { std::ptr::drop_in_place(self.ptr.as_ptr()) };
        munmap(self.ptr.cast(), self.map_len);
    }
}

// SAFETY: MmapBox<T> owns its T exactly like Box<T> does.
unsafe impl<T: Send> Send for MmapBox<T> {}
// SAFETY: MmapBox<T> hands out only &T, like Box<T>.
unsafe impl<T: Sync> Sync for MmapBox<T> {}

// ---------------------------------------------------------------------------
// Test regions
// ---------------------------------------------------------------------------

/// A region to track in tests and benches: a memfd mapped `MAP_SHARED` (as
/// the heap is) or anonymous memory, accessed through atomics only.
#[cfg(test)]
pub(crate) struct TestRegion {
    ptr: NonNull<u8>,
    len: usize,
    _fd: Option<OwnedFd>,
}

#[cfg(test)]
impl TestRegion {
    /// A memfd of `len` bytes mapped `MAP_SHARED`; `populate` touches every page.
    pub(crate) fn memfd(len: usize, populate: bool) -> io::Result<Self> {
        // SAFETY: the name is a NUL-terminated literal; memfd_create returns
        // a new descriptor or -1.
        let fd = cvt(unsafe { libc::memfd_create(c"remem-track-test".as_ptr(), libc::MFD_CLOEXEC) })?;
        // SAFETY: the kernel just returned this descriptor; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        File::from(fd.try_clone()?).set_len(len as u64)?;
        Self::map(len, libc::MAP_SHARED, Some(fd), populate)
    }

    /// Private anonymous memory of `len` bytes; `populate` touches every page.
    pub(crate) fn anon(len: usize, populate: bool) -> io::Result<Self> {
        Self::map(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None, populate)
    }

    fn map(len: usize, flags: libc::c_int, fd: Option<OwnedFd>, populate: bool) -> io::Result<Self> {
        let raw = fd.as_ref().map_or(-1, |f| f.as_raw_fd());
        // SAFETY: a new mapping at an address the kernel chooses aliases no
        // existing Rust memory.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, raw, 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: advice on the mapping just made; 4 KiB PTEs keep the
        // per-page figures meaningful.
        unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
        let r = Self { ptr: NonNull::new(p.cast()).expect("mmap returned null"), len, _fd: fd };
        if populate {
            let ps = page_size();
            for off in (0..len).step_by(ps) {
                r.word(off).store(0, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(r)
    }

    pub(crate) fn base(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The 8-byte word at byte `offset`.
    pub(crate) fn word(&self, offset: usize) -> &AtomicU64 {
        assert!(offset & 7 == 0 && offset + 8 <= self.len, "offset {offset} out of the region");
        // SAFETY: in bounds and 8-aligned (checked above; the base is page
        // aligned); the mapping lives as long as `self` and is only ever
        // accessed through atomics, so shared references are sound.
        unsafe { &*self.ptr.as_ptr().add(offset).cast::<AtomicU64>() }
    }
}

#[cfg(test)]
impl Drop for TestRegion {
    fn drop(&mut self) {
        // SAFETY: our mapping, unmapped once; `&mut self` means no `word`
        // reference is alive.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

// SAFETY: the region is shared memory only ever accessed through atomics.
#[cfg(test)]
unsafe impl Send for TestRegion {}
// SAFETY: as above.
#[cfg(test)]
unsafe impl Sync for TestRegion {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    /// Every number and layout checked against the kernel's uapi headers
    /// (values printed by a C program including `linux/userfaultfd.h` and
    /// the probe's `pm_scan_arg` definition, on Linux 6.18).
    #[test]
    fn constants_match_kernel_headers() {
        assert_eq!(UFFDIO_API, 0xC018_AA3F);
        assert_eq!(UFFDIO_REGISTER, 0xC020_AA00);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xC018_AA06);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xAA00);
        assert_eq!(PAGEMAP_SCAN, 0xC060_6610);
        assert_eq!(UFFD_API, 0xAA);
        assert_eq!(UFFDIO_WRITEPROTECT_IOCTL_BIT, 1 << 6);
        assert_eq!(UFFDIO_REGISTER_MODE_WP, 2);
        assert_eq!(UFFDIO_WRITEPROTECT_MODE_WP, 1);
        assert_eq!(PM_SCAN_WP_MATCHING, 1);
        assert_eq!(PM_SCAN_CHECK_WPASYNC, 2);
        assert_eq!(PAGE_IS_WRITTEN, 2);

        assert_eq!(size_of::<UffdioApi>(), 24);
        assert_eq!(size_of::<UffdioRange>(), 16);
        assert_eq!(size_of::<UffdioRegister>(), 32);
        assert_eq!(size_of::<UffdioWriteprotect>(), 24);
        assert_eq!(size_of::<PmScanArg>(), 96);
        assert_eq!(size_of::<PageRegion>(), 24);

        // struct pm_scan_arg field order.
        assert_eq!(offset_of!(PmScanArg, walk_end), 32);
        assert_eq!(offset_of!(PmScanArg, vec_len), 48);
        assert_eq!(offset_of!(PmScanArg, return_mask), 88);
        assert_eq!(offset_of!(UffdioRegister, ioctls), 24);
    }

    #[test]
    fn ioc_formula() {
        assert_eq!(iowr(0xAA, 0x3F, 24), 0xC018_AA3F);
        assert_eq!(io_(0xAA, 0), 0xAA00);
        // <linux/userfaultfd.h>: _IOWR(UFFDIO, _UFFDIO_COPY, struct uffdio_copy) and
        // _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison).
        assert_eq!(UFFDIO_COPY, 0xC028_AA03);
        assert_eq!(UFFDIO_POISON, 0xC020_AA08);
        assert_eq!(offset_of!(UffdioCopy, copy), 32);
        assert_eq!(offset_of!(UffdioPoison, updated), 24);
    }

    /// The kernel agrees: UFFDIO_API (our number and struct) succeeds and
    /// reports write-protect support, and a pagemap scan of a plain mapping
    /// answers (not ENOTTY).
    #[test]
    fn kernel_accepts_our_ioctls() {
        let u = Uffd::open(true, true).expect("userfaultfd (run as root)");
        let a = u.api(0).expect("UFFDIO_API");
        assert_eq!(a.api, UFFD_API);
        assert!(a.ioctls & (1 << 0x3F) != 0, "UFFDIO_API bit in api.ioctls");
        let r = TestRegion::anon(4 * page_size(), true).unwrap();
        let pm = Pagemap::open_self().unwrap();
        let mut v = [PageRegion::default(); 4];
        let base = r.base() as u64;
        let (n, walk_end) = pm.scan(base, base + r.len() as u64, 0, PAGE_IS_WRITTEN, &mut v).expect("PAGEMAP_SCAN");
        // Not registered: no uffd-wp bit, so every present page reads as written.
        assert_eq!(n, 1);
        assert_eq!((v[0].start, v[0].end), (base, base + r.len() as u64));
        assert_eq!(walk_end, base + r.len() as u64);
    }

    #[test]
    fn raw_words_alias_the_memory_they_are_given() {
        use std::sync::atomic::Ordering::Relaxed;
        let backing = OwnedWords::new(8).unwrap();
        {
            // SAFETY: `backing` outlives `raw` and is only used atomically.
            let raw = unsafe { RawWords::new(backing[2..].as_ptr(), 5) };
            assert_eq!((raw.len(), raw.as_ptr()), (5, backing[2..].as_ptr()));
            raw[4].store(9, Relaxed);
            assert_eq!(backing[6].load(Relaxed), 9);
        }
        assert_eq!(backing[6].load(Relaxed), 9, "RawWords frees nothing");
    }

    #[test]
    #[should_panic(expected = "not 8-byte aligned")]
    fn raw_words_reject_misaligned_pointers() {
        let backing = OwnedWords::new(2).unwrap();
        let odd = backing.as_ptr().cast::<u8>().wrapping_add(4).cast::<AtomicU64>();
        // SAFETY: never dereferenced: the constructor panics first.
        let _ = unsafe { RawWords::new(odd, 1) };
    }

    #[test]
    fn owned_words_and_mmap_box() {
        let w = OwnedWords::new(1000).unwrap();
        assert_eq!(w.len(), 1000);
        assert!(w.iter().all(|x| x.load(std::sync::atomic::Ordering::Relaxed) == 0));
        w[999].store(7, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(OwnedWords::new(0).unwrap().len(), 0);
        let b = MmapBox::new(std::sync::Mutex::new(5u32)).unwrap();
        *b.lock().unwrap() += 1;
        assert_eq!(*b.lock().unwrap(), 6);
    }
}
