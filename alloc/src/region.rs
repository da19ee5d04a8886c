//! The heap's memory: a memfd mapped `MAP_SHARED` at a fixed address.
//!
//! This is the only module that maps or unmaps memory.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::error::OpenError;
use crate::format::PAGE_SIZE;

/// A memfd and its fixed-address shared mapping. Unmapped on drop.
#[derive(Debug)]
pub(crate) struct Region {
    fd: OwnedFd,
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; `Region` only hands out the
// address, and users synchronise their own accesses.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> OpenError {
    let what = what.into();
    move |source| OpenError::Io { what, source }
}

/// Creates a memfd of `len` bytes, sealed against resizing
/// (`F_SEAL_SHRINK | F_SEAL_GROW`): a process it is handed to (the agent)
/// can map all of it without fearing SIGBUS from a later `ftruncate`, and
/// checks the seals before it does.
pub(crate) fn memfd(name: &str, len: u64) -> Result<OwnedFd, OpenError> {
    let cname = std::ffi::CString::new(name).expect("memfd name has no NUL");
    // SAFETY: `cname` is a valid C string; the flags are valid.
    let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(io_err("memfd_create")(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor that we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    File::from(fd.try_clone().map_err(io_err("dup memfd"))?)
        .set_len(len)
        .map_err(io_err(format!("sizing the heap memfd to {len} bytes")))?;
    // SAFETY: F_ADD_SEALS on our own memfd with valid seal bits.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) };
    if r < 0 {
        return Err(io_err("sealing the memfd's size")(io::Error::last_os_error()));
    }
    Ok(fd)
}

/// The length of a memfd (or file) in bytes.
pub(crate) fn fd_len(fd: &OwnedFd) -> io::Result<u64> {
    Ok(File::from(fd.try_clone()?).metadata()?.len())
}

impl Region {
    /// Maps `fd` (at least `len` bytes) at exactly `base`.
    pub(crate) fn map(fd: OwnedFd, base: u64, len: u64) -> Result<Region, OpenError> {
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; the
        // kernel checks the range, and we check the result below.
        let p = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED_NOREPLACE,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EEXIST) {
                return Err(OpenError::AddressInUse {
                    base,
                    end: base + len,
                    conflict: conflicting_mapping(base, len),
                });
            }
            return Err(io_err(format!("mapping the heap at {base:#x}"))(e));
        }
        if p as u64 != base {
            // A kernel older than 4.17 treats NOREPLACE as a hint.
            // SAFETY: we just mapped `p` for `len` bytes and nothing uses it.
            unsafe { libc::munmap(p, len as usize) };
            return Err(OpenError::AddressInUse {
                base,
                end: base + len,
                conflict: "the kernel placed it elsewhere".into(),
            });
        }
        let region = Region { fd, base: p.cast(), len: len as usize };
        dont_fork(region.base, region.len)
            .map_err(io_err(format!("madvise(MADV_DONTFORK) on the heap at {base:#x}")))?;
        Ok(region)
    }

    /// First byte.
    pub(crate) fn base(&self) -> *mut u8 {
        self.base
    }

    /// Bytes mapped.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The memfd.
    pub(crate) fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Ranges of the memfd that hold data (others read as zero).
    pub(crate) fn data_ranges(&self) -> io::Result<Vec<(u64, u64)>> {
        data_ranges(self.fd.as_raw_fd(), self.len as u64)
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly this range; the owning heap is gone, so
        // nothing refers to it any more.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// Keeps `[base, base + len)` out of forked children: a child made by
/// `fork()` has no mapping there, so its stray writes fault instead of
/// reaching the parent's shared pages (see [`crate::fork`]).
fn dont_fork(base: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: madvise on a range this process just mapped; MADV_DONTFORK
    // changes no contents, only what fork() copies.
    if unsafe { libc::madvise(base.cast(), len, libc::MADV_DONTFORK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `(start, end)` byte ranges of `fd` that hold data, by SEEK_DATA/SEEK_HOLE.
pub(crate) fn data_ranges(fd: i32, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some((start, end)) = data_range_from(fd, pos, len)? {
        out.push((start, end));
        pos = end;
    }
    Ok(out)
}

/// The first `(start, end)` byte range of `fd` at or after `pos` that
/// holds data (`end` at most `len`), or `None` if there is none before
/// `len`.
pub(crate) fn data_range_from(fd: i32, pos: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
    if pos >= len {
        return Ok(None);
    }
    let pos = i64::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on a descriptor the caller holds; no memory is passed.
    let start = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
    if start < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(e) };
    }
    if start as u64 >= len {
        return Ok(None);
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    if end < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some((start as u64, (end as u64).min(len))))
}

/// The line of a /proc/self/maps text that overlaps `[base, base + len)`.
fn overlapping(maps: &str, base: u64, len: u64) -> Option<&str> {
    maps.lines().find(|line| {
        let range = line.split(' ').next().unwrap_or("");
        let Some((a, b)) = range.split_once('-') else { return false };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else { return false };
        a < base + len && base < b
    })
}

/// What maps `[base, base + len)` in this process, for an error message.
fn conflicting_mapping(base: u64, len: u64) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    overlapping(&maps, base, len).map_or_else(|| "an overlapping mapping".into(), |l| format!("mapped: {}", l.trim()))
}

/// Picks a free, 64 KiB aligned base address for a new heap of `len`
/// bytes: slots of 64 GiB above 0x5e00_0000_0000, starting from one chosen
/// by the heap's UUID, so that heaps rarely collide and the address is
/// likely free in a recovering process as well.
pub(crate) fn choose_base(uuid: &[u8; 16], len: u64) -> Result<u64, OpenError> {
    const ZONE: u64 = 0x5e00_0000_0000;
    const SLOT: u64 = 1 << 36;
    const SLOTS: u64 = 256;
    let first = u64::from(uuid[0]);
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(io_err("reading /proc/self/maps"))?;
    (0..SLOTS)
        .map(|i| ZONE + ((first + i) % SLOTS) * SLOT)
        .find(|&base| overlapping(&maps, base, len).is_none())
        .ok_or(OpenError::NoAddress(len))
}

/// Checks a user-chosen base address.
pub(crate) fn check_base(base: u64, len: u64) -> Result<(), OpenError> {
    if !crate::format::base_ok(base, len) {
        return Err(OpenError::BadBase(base));
    }
    Ok(())
}

/// The system page size must be 4 KiB.
pub(crate) fn check_page_size() -> Result<(), OpenError> {
    // SAFETY: sysconf has no memory arguments.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    if ps != PAGE_SIZE {
        return Err(OpenError::PageSize(ps));
    }
    Ok(())
}

/// 16 random bytes from the kernel, as a version-4 UUID.
pub(crate) fn random_uuid() -> Result<[u8; 16], OpenError> {
    let mut u = [0u8; 16];
    let mut got = 0;
    while got < u.len() {
        // SAFETY: writes at most the remaining bytes of `u`.
        let n = unsafe { libc::getrandom(u[got..].as_mut_ptr().cast(), u.len() - got, 0) };
        if n < 0 {
            return Err(io_err("getrandom")(io::Error::last_os_error()));
        }
        got += n as usize;
    }
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    Ok(u)
}

/// The byte of a baseline file whose OFD lock a writer holds (exclusive)
/// or a reader shares.
pub(crate) const LOCK_WRITER: i64 = 0;
/// The byte whose OFD lock a recovery that takes over from a hung owner
/// holds (the hung owner keeps [`LOCK_WRITER`]).
pub(crate) const LOCK_TAKEOVER: i64 = 1;

/// A non-blocking open-file-description (OFD) lock on byte `byte` of
/// `file` (a lock on a byte range need not lie inside the file's data):
/// exclusive (`file` must be open for writing) or shared. `false` when
/// another open of the same file holds a conflicting lock. The lock belongs
/// to the file's inode, not to the name it was opened by, so a symlink, a
/// hard link or another mount path of the same file meets the same lock;
/// it is released when the last descriptor of this open is closed (and,
/// unlike a POSIX record lock, not when some other descriptor of the same
/// file is closed), and it conflicts with another open of the same file in
/// the same process too.
pub(crate) fn try_lock(file: &File, exclusive: bool, byte: i64) -> io::Result<bool> {
    // SAFETY: `flock` is plain old data; all-zero is a valid value (and
    // OFD locks require `l_pid` to be 0).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if exclusive { libc::F_WRLCK } else { libc::F_RDLCK } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: fcntl(F_OFD_SETLK) on a descriptor we hold, with a valid `flock`.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(e),
    }
}

/// Copies all of `src` into `dst` (an empty file): a reflink where the
/// filesystem offers one, else keeping holes: only the extents `SEEK_DATA`/`SEEK_HOLE` report as data are copied (with
/// `copy_file_range`, in the kernel), then `dst` is extended to `src`'s
/// length. A baseline of a large, mostly empty heap stays mostly holes.
pub(crate) fn copy_sparse(src: &File, dst: &File) -> io::Result<()> {
    let len = src.metadata()?.len();
    let (sfd, dfd) = (src.as_raw_fd(), dst.as_raw_fd());
    // A reflink first, where the filesystem shares extents (btrfs, XFS).
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: ioctl(FICLONE) takes the source descriptor as its argument.
    if unsafe { libc::ioctl(dfd, FICLONE, sfd) } == 0 {
        return Ok(());
    }
    let mut at: i64 = 0;
    while (at as u64) < len {
        // SAFETY: lseek on a descriptor we hold.
        let data = unsafe { libc::lseek(sfd, at, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(sfd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            let want = (hole - off_in) as usize;
            // SAFETY: copy_file_range between two descriptors we hold, with
            // explicit offsets that the kernel advances.
            let n = unsafe { libc::copy_file_range(sfd, &mut off_in, dfd, &mut off_out, want, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file shrank while it was copied"));
            }
        }
        at = hole;
    }
    dst.set_len(len)
}

/// `true` when `path` names the inode `file` has open (it was not renamed
/// over or removed since `file` was opened).
pub(crate) fn same_inode(file: &File, path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let (a, b) = (file.metadata()?, std::fs::metadata(path)?);
    Ok(a.dev() == b.dev() && a.ino() == b.ino())
}

/// Fsyncs the directory that holds `path`, so a rename in it is durable.
pub(crate) fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

/// Registers this process for private expedited membarriers; false when
/// the kernel does not offer them.
pub(crate) fn membarrier_register() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        // SAFETY: membarrier takes no pointers.
        unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0 }
    })
}

/// A full memory barrier on every CPU that runs a thread of this process.
pub(crate) fn membarrier() {
    // SAFETY: membarrier takes no pointers; registration happened first.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) };
    assert_eq!(r, 0, "membarrier failed after registration: {}", io::Error::last_os_error());
}

/// A memfd mapped shared wherever the kernel likes. Unmapped on drop.
#[derive(Debug)]
pub(crate) struct AnyMapping {
    fd: OwnedFd,
    base: *mut u8,
    len: usize,
}

// SAFETY: plain shared memory; users synchronise their accesses.
unsafe impl Send for AnyMapping {}
// SAFETY: as above.
unsafe impl Sync for AnyMapping {}

impl AnyMapping {
    /// Maps `len` bytes of `fd`.
    pub(crate) fn map(fd: OwnedFd, len: usize) -> Result<AnyMapping, OpenError> {
        // SAFETY: a fresh mapping at an address the kernel chooses.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io_err("mapping a memfd")(io::Error::last_os_error()));
        }
        let map = AnyMapping { fd, base: p.cast(), len };
        dont_fork(map.base, len).map_err(io_err("madvise(MADV_DONTFORK) on the control region"))?;
        Ok(map)
    }

    /// First byte.
    pub(crate) fn base(&self) -> *mut u8 {
        self.base
    }

    /// The memfd.
    pub(crate) fn fd(&self) -> &OwnedFd {
        &self.fd
    }
}

impl Drop for AnyMapping {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly this range and nothing uses it any more.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileExt, MetadataExt};

    #[test]
    fn copy_sparse_copies_the_data_and_keeps_the_holes() {
        let dir = std::env::temp_dir().join(format!("remem-copy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src =
            std::fs::File::options().read(true).write(true).create(true).truncate(true).open(dir.join("a")).unwrap();
        src.write_all_at(&[1; 8192], 0).unwrap();
        src.write_all_at(&[2; 4096], 64 << 20).unwrap();
        src.set_len(128 << 20).unwrap();
        let dst =
            std::fs::File::options().read(true).write(true).create(true).truncate(true).open(dir.join("b")).unwrap();
        super::copy_sparse(&src, &dst).unwrap();
        assert_eq!(dst.metadata().unwrap().len(), 128 << 20);
        let mut b = vec![0u8; 8192];
        dst.read_exact_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 1));
        dst.read_exact_at(&mut b[..4096], 64 << 20).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 2));
        dst.read_exact_at(&mut b[..4096], 32 << 20).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0));
        // Far less than 128 MiB allocated (unless the filesystem shared extents).
        assert!(dst.metadata().unwrap().blocks() * 512 < 16 << 20);
        assert!(super::same_inode(&dst, &dir.join("b")).unwrap());
        assert!(!super::same_inode(&src, &dir.join("b")).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
