//! The seam between the baseline and its storage: five methods (redb's
//! `StorageBackend` shape), a file implementation, and impls for shared handles.

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
}

/// A baseline in a file on any filesystem: `pread`, `pwrite`, `ftruncate`, `fdatasync`.
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
}
