//! The seam between the baseline and its storage: five methods (redb's
//! `StorageBackend` shape) plus an optional sparseness query, a file
//! implementation, and impls for shared handles.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// Byte storage under a baseline: a file, or an in-memory image in tests
/// ([`super::FaultyBackend`]).
///
/// Durability contract: after `sync_data` returns `Ok`, every completed
/// `write_at` and `set_len` before it survives a crash. Nothing is promised
/// about writes that no successful sync followed: any subset of them, at any
/// granularity, may survive. A failed `sync_data` may have lost writes.
pub trait Backend: Send + Sync {
    /// Length in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Whether the length is zero.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Fills `buf` from `off`; reading past the end is an error.
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Writes all of `buf` at `off`, extending the length if needed.
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()>;

    /// Truncates or extends (with zeros) to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Makes every completed write and resize durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;

    /// Where `off..off + len` may hold non-zero bytes: sorted, disjoint, non-empty
    /// half-open byte ranges `(start, end)` inside it. Every byte of `off..off + len`
    /// outside the returned ranges must read as zero (a hole of a sparse file, or
    /// bytes past the end); the ranges may over-approximate (a written page of zeros
    /// may be reported as data). `Ok(None)`: unknown, treat everything as data (the
    /// default). Loading uses it to skip holes instead of reading zeros.
    fn data_ranges(&self, off: u64, len: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
        let _ = (off, len);
        Ok(None)
    }
}

impl<B: Backend + ?Sized> Backend for Arc<B> {
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(off, buf)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        (**self).write_at(off, buf)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        (**self).sync_data()
    }
    fn data_ranges(&self, off: u64, len: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
        (**self).data_ranges(off, len)
    }
}

impl<B: Backend + ?Sized> Backend for &B {
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(off, buf)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        (**self).write_at(off, buf)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        (**self).sync_data()
    }
    fn data_ranges(&self, off: u64, len: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
        (**self).data_ranges(off, len)
    }
}

/// A baseline in a file on any filesystem: `pread`, `pwrite`, `ftruncate`, `fdatasync`,
/// and `lseek(SEEK_DATA / SEEK_HOLE)` to find the holes of the sparse image area.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
}

impl FileBackend {
    /// Creates a new file at `path` (it must not exist) and syncs its directory, so
    /// that the file itself survives a crash once its data is synced.
    pub fn create(path: &Path) -> io::Result<FileBackend> {
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()?;
        Ok(FileBackend { file })
    }

    /// Opens an existing file for reading and writing.
    pub fn open(path: &Path) -> io::Result<FileBackend> {
        Ok(FileBackend { file: OpenOptions::new().read(true).write(true).open(path)? })
    }

    /// Opens an existing file for reading only: every write through this
    /// backend fails (EBADF), so a reader cannot change the file by mistake.
    pub fn open_read_only(path: &Path) -> io::Result<FileBackend> {
        Ok(FileBackend { file: File::open(path)? })
    }

    /// Wraps an open file (opened for reading, and for writing if the baseline will write).
    pub fn from_file(file: File) -> FileBackend {
        FileBackend { file }
    }

    /// The file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Backend for FileBackend {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, off)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, off)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    /// `lseek(SEEK_DATA)` / `lseek(SEEK_HOLE)` pairs from `off`. These move the file
    /// position of the open file (shared with clones of [`FileBackend::file`]); the
    /// baseline itself only uses positioned I/O. `None` when the filesystem or kernel
    /// does not support them (`EINVAL`, `EOPNOTSUPP`); filesystems without real hole
    /// tracking report the whole file as data, which is also correct.
    fn data_ranges(&self, off: u64, len: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
        let end = off.saturating_add(len);
        let mut out = Vec::new();
        let mut pos = off;
        while pos < end {
            let data = match seek(&self.file, pos, Whence::Data) {
                Ok(Some(d)) => d,
                // ENXIO: no data at or after `pos` (the rest is a hole or past the end).
                Ok(None) => break,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => return Ok(None),
                Err(e) => return Err(e),
            };
            if data >= end {
                break;
            }
            // The end of the file counts as a hole, so this only finds nothing if the
            // file shrank under us: then the rest reads as nothing, report it as data.
            let hole = seek(&self.file, data, Whence::Hole)?.unwrap_or(end).min(end);
            if hole <= data {
                // Only if the file changed between the two calls: give up on sparseness.
                return Ok(None);
            }
            out.push((data, hole));
            pos = hole;
        }
        Ok(Some(out))
    }
}

#[derive(Clone, Copy)]
enum Whence {
    Data,
    Hole,
}

/// `lseek(fd, off, SEEK_DATA or SEEK_HOLE)`: the offset found, or `None` for `ENXIO`
/// (no data, or no hole, at or after `off`: `off` is at or past the end of the file,
/// or for `SEEK_DATA` only holes follow). An offset that does not fit `off_t` is
/// `EINVAL` (reported as unsupported by the caller).
#[allow(unsafe_code)]
fn seek(file: &File, off: u64, whence: Whence) -> io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    let Ok(off) = libc::off_t::try_from(off) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    let whence = match whence {
        Whence::Data => libc::SEEK_DATA,
        Whence::Hole => libc::SEEK_HOLE,
    };
    // SAFETY: `lseek` takes no pointers; the descriptor is owned by `file`, which
    // the borrow keeps open for the duration of the call.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r >= 0 {
        // `r` is a non-negative `off_t`, so it fits a `u64`.
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        return Ok(None);
    }
    Err(e)
}
