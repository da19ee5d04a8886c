//! The resume file: pages already pulled by a recovery, kept durably next to
//! the baseline (`<baseline>.recovering`), so that a recovery that was
//! killed, or lost its agent, goes on from where it stopped instead of
//! pulling everything again. Removed once the recovered heap is committed.
//!
//! ```text
//!  header, 64 bytes:  0 magic "REMEMRSM"  8 version u32 (1)  12 reserved u32
//!                    16 heap uuid [16]   32 npages u64      40 reserved [20]
//!                    60 CRC32 of bytes 0..60
//!  records, 4112 bytes each, appended:
//!                     0 page u64   8 CRC32 of the page u32   12 reserved u32
//!                    16 the page [4096]
//! ```
//!
//! Little-endian. Records are appended as pages arrive and synced every
//! [`SYNC_EVERY`] bytes and at the end; a record torn by a crash (short, or
//! its CRC wrong) ends the usable part of the file. A record is used again
//! only for a page the agent lists and when its CRC equals the CRC the
//! agent's seal gives for that page now (so a resume file left by another
//! seal is harmless), and its bytes are checked
//! against it when read back. A file of another heap is discarded.
//!
//! Eager recovery appends every page it pulls and reads the file back
//! before pulling. Lazy recovery appends every page its agent source
//! pulls (faults and prefetch alike) and serves the pages the file holds
//! through [`ResumeSource`], a layer before the agent; the file is removed
//! once the recovered state is committed and durable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use remem_alloc::source::{check_request, PageRead, PageSource, SourceError};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Header length.
const HEADER: usize = 64;
/// Record length.
const RECORD: usize = 16 + PAGE;
/// Page size.
const PAGE: usize = 4096;
/// Magic.
const MAGIC: [u8; 8] = *b"REMEMRSM";
/// Bytes appended between syncs.
const SYNC_EVERY: usize = 8 << 20;

/// The resume file of a baseline: `<baseline>.recovering`.
pub fn path_of(baseline: &Path) -> PathBuf {
    let mut p = baseline.as_os_str().to_owned();
    p.push(".recovering");
    PathBuf::from(p)
}

fn header(uuid: &[u8; 16], npages: u64) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&1u32.to_le_bytes());
    h[16..32].copy_from_slice(uuid);
    h[32..40].copy_from_slice(&npages.to_le_bytes());
    let c = crc32fast::hash(&h[..60]);
    h[60..64].copy_from_slice(&c.to_le_bytes());
    h
}

/// An open resume file: what it holds, and the writer of new records.
#[derive(Debug)]
pub struct ResumeFile {
    file: File,
    path: PathBuf,
    /// page -> (record offset, CRC) of the records read back.
    held: HashMap<u64, (u64, u32)>,
    end: u64,
    unsynced: usize,
    buf: Vec<u8>,
    /// Sync each full batch (else only write it out).
    sync_batches: bool,
}

impl ResumeFile {
    /// Opens (or starts) the resume file of the heap `uuid` of `npages`
    /// pages at `path`, reading back the intact records it holds.
    pub fn open(path: &Path, uuid: &[u8; 16], npages: u64) -> std::io::Result<ResumeFile> {
        Self::open_with(path, uuid, npages, true)
    }

    /// [`ResumeFile::open`]; without `sync`, nothing is synced but at
    /// [`ResumeFile::sync`] and drop: records reach the page cache as
    /// batches fill (they survive the recovering process's death, not its
    /// host's crash), so that a lazy recovery never waits for the disk.
    pub fn open_with(path: &Path, uuid: &[u8; 16], npages: u64, sync: bool) -> std::io::Result<ResumeFile> {
        use std::os::unix::fs::OpenOptionsExt;
        // Never through a symbolic link planted at the path.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        let want = header(uuid, npages);
        let len = file.metadata()?.len();
        let mut held = HashMap::new();
        let mut end = HEADER as u64;
        let mut h = [0u8; HEADER];
        let ours = len >= HEADER as u64 && file.read_exact_at(&mut h, 0).is_ok() && h == want;
        if ours {
            let mut rec = vec![0u8; RECORD];
            while end + RECORD as u64 <= len {
                file.read_exact_at(&mut rec, end)?;
                let page = u64::from_le_bytes(rec[..8].try_into().unwrap_or_default());
                let crc = u32::from_le_bytes(rec[8..12].try_into().unwrap_or_default());
                if page >= npages || crc32fast::hash(&rec[16..]) != crc {
                    break; // a torn record: the usable part ends here
                }
                held.insert(page, (end, crc));
                end += RECORD as u64;
            }
            file.set_len(end)?;
        } else {
            file.set_len(0)?;
            file.write_all_at(&want, 0)?;
            if sync {
                file.sync_data()?;
            }
        }
        if let Some(dir) = path.parent().filter(|_| sync) {
            if let Ok(d) = File::open(if dir.as_os_str().is_empty() { Path::new(".") } else { dir }) {
                let _ = d.sync_all();
            }
        }
        let buf = Vec::with_capacity(SYNC_EVERY);
        Ok(ResumeFile { file, path: path.to_owned(), held, end, unsynced: 0, buf, sync_batches: sync })
    }

    /// The CRC of the record of `page`, if the file holds one.
    pub fn crc_of(&self, page: u64) -> Option<u32> {
        self.held.get(&page).map(|&(_, c)| c)
    }

    /// Every page held, with its record's CRC.
    pub fn records(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.held.iter().map(|(&p, &(_, c))| (p, c))
    }

    /// Pages held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether no page is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Reads the held copy of `page` into `dst` (4096 bytes); false when it
    /// is not held or fails its CRC.
    pub fn read(&self, page: u64, dst: &mut [u8]) -> std::io::Result<bool> {
        let Some(&(at, crc)) = self.held.get(&page) else { return Ok(false) };
        self.file.read_exact_at(dst, at + 16)?;
        Ok(crc32fast::hash(dst) == crc)
    }

    /// Appends a pulled page (synced in batches; see [`ResumeFile::sync`]).
    pub fn append(&mut self, page: u64, crc: u32, bytes: &[u8]) -> std::io::Result<()> {
        self.buf.extend_from_slice(&page.to_le_bytes());
        self.buf.extend_from_slice(&crc.to_le_bytes());
        self.buf.extend_from_slice(&[0u8; 4]);
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= SYNC_EVERY {
            if self.sync_batches {
                self.sync()?;
            } else {
                self.write_out()?;
            }
        }
        Ok(())
    }

    fn write_out(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.file.write_all_at(&self.buf, self.end)?;
            self.end += self.buf.len() as u64;
            self.unsynced += self.buf.len();
            self.buf.clear();
        }
        Ok(())
    }

    /// Writes and syncs the records appended so far.
    pub fn sync(&mut self) -> std::io::Result<()> {
        self.write_out()?;
        if self.unsynced > 0 {
            self.file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(())
    }

    /// Removes the file (the recovered heap is committed).
    pub fn remove(self) -> std::io::Result<()> {
        std::fs::remove_file(&self.path)
    }
}

impl Drop for ResumeFile {
    fn drop(&mut self) {
        let _ = self.sync();
    }
}

/// A resume file shared by the lazy recovery's sources: the agent's
/// source appends to it, [`ResumeSource`] reads from it. `None` once it
/// failed (recovery goes on without it) or was removed.
pub type SharedResume = Arc<Mutex<Option<ResumeFile>>>;

/// The pages an interrupted earlier recovery pulled, as a [`PageSource`]
/// in front of the agent: it claims a page the file holds when the
/// record's CRC is the agent's CRC of that page now (the same seal of the
/// same memory), checks the bytes against it when read, and gives up a
/// page whose record fails (the agent's copy is read instead).
pub struct ResumeSource {
    file: SharedResume,
    /// Bit p: page p is served from the file.
    claimed: Vec<AtomicU64>,
    npages: u64,
}

impl std::fmt::Debug for ResumeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResumeSource").field("npages", &self.npages).finish_non_exhaustive()
    }
}

impl ResumeSource {
    /// Serves the records of `file` whose CRC `current(page)` confirms.
    pub fn new(file: SharedResume, npages: u64, current: impl Fn(u64) -> Option<u32>) -> ResumeSource {
        let claimed: Vec<AtomicU64> = (0..npages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        if let Some(f) = file.lock().as_ref() {
            for (p, crc) in f.records() {
                if p < npages && current(p) == Some(crc) {
                    claimed[p as usize / 64].fetch_or(1 << (p % 64), Ordering::Relaxed);
                }
            }
        }
        ResumeSource { file, claimed, npages }
    }

    /// Pages served from the file.
    pub fn pages(&self) -> u64 {
        self.claimed.iter().map(|w| u64::from(w.load(Ordering::Relaxed).count_ones())).sum()
    }
}

impl PageSource for ResumeSource {
    fn claims(&self, page: u64) -> bool {
        self.claimed.get(page as usize / 64).is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
    }

    fn read_pages(&self, first: u64, dst: &mut [u8], status: &mut [PageRead]) -> Result<(), SourceError> {
        check_request("resume", dst, status)?;
        if first.checked_add(status.len() as u64).is_none_or(|e| e > self.npages) {
            return Err(SourceError::BadRequest {
                source_name: "resume".into(),
                what: format!("pages {first}+{} beyond the heap", status.len()),
            });
        }
        let file = self.file.lock();
        for (k, st) in status.iter_mut().enumerate() {
            let p = first + k as u64;
            let ok = file.as_ref().is_some_and(|f| f.read(p, &mut dst[k * PAGE..(k + 1) * PAGE]).unwrap_or(false));
            *st = if ok { PageRead::Data } else { PageRead::Unreadable };
            if !ok {
                // Disowned: the next layer (the agent) serves it.
                self.claimed[p as usize / 64].fetch_and(!(1 << (p % 64)), Ordering::AcqRel);
            }
        }
        Ok(())
    }

    fn name(&self) -> &str {
        "resume"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_reopen_and_a_torn_tail_is_dropped() {
        let dir = std::env::temp_dir().join(format!("remem-resume-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("heap.recovering");
        let _ = std::fs::remove_file(&path);
        let uuid = [7u8; 16];
        let page = |p: u64| vec![p as u8; PAGE];
        {
            let mut r = ResumeFile::open(&path, &uuid, 100).unwrap();
            assert!(r.is_empty());
            for p in [3u64, 9, 42] {
                r.append(p, crc32fast::hash(&page(p)), &page(p)).unwrap();
            }
        }
        // A torn record at the end.
        let f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all_at(&[1, 2, 3], f.metadata().unwrap().len()).unwrap();
        let r = ResumeFile::open(&path, &uuid, 100).unwrap();
        assert_eq!(r.len(), 3);
        let mut buf = vec![0u8; PAGE];
        assert!(r.read(42, &mut buf).unwrap());
        assert_eq!(buf, page(42));
        assert!(!r.read(4, &mut buf).unwrap());
        assert_eq!(r.crc_of(9), Some(crc32fast::hash(&page(9))));
        drop(r);
        // Another heap's file is discarded.
        let r = ResumeFile::open(&path, &[8u8; 16], 100).unwrap();
        assert!(r.is_empty());
        r.remove().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
