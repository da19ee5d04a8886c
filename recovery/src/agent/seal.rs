//! Sealing, in the background, after a heap's owner is gone.
//!
//! Fast mode: pages written after the last harvest are known only to the
//! dead process's page tables, so the seal compares the CRC-32 of every
//! page with the baseline's committed CRC, in chunks of [`CHUNK`] pages
//! from page 0 up. After each chunk it publishes the chunk's CRCs (crc
//! region) and bits (sealed region), then advances `seal_cursor` in the
//! info block: a recoverer can start at once (state SEALING) and take a page
//! below the cursor from the baseline when its bit is clear, and every other
//! page from the agent (whose memory, the owner being dead, is the newest
//! copy). Only a CRC collision (2^-32 per page) can hide a written page.
//! Holes of the memfd are never read (reading one would allocate it).
//!
//! Precise mode: the control region's sets are exact, so nothing is
//! scanned: the sealed bitmap is their union, the CRCs of those pages only
//! are computed, and the heap is SEALED at once.
//!
//! No whole-image digest is computed unless the agent was started with
//! `digest` (then it is, during the same pass, and published with SEALED).
//!
//! After sealing, the thread watches the baseline (every [`WATCH`]): once a
//! recovery elsewhere committed (a newer generation and a newer epoch), the
//! heap's memory is released and the slot says CLOSED.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use remem_alloc::baseline::{Baseline, FileBackend};

use super::hosted::{superseded, Shared, Table};
use super::layout::{info, u64_at};
use crate::digest::in_ranges;
use crate::sys::ReadMap;
use crate::transport::SharedBytes;

/// Pages sealed between two publications of the cursor (4 MiB).
pub(crate) const CHUNK: u64 = 1024;
/// How often a sealed heap's baseline is looked at.
const WATCH: Duration = Duration::from_millis(500);

static ZERO: [u8; 4096] = [0; 4096];

/// What the background thread of one gone heap works on.
pub(crate) struct Job {
    pub slot: usize,
    pub assigned: u64,
    pub stop: Arc<AtomicBool>,
    pub heap_fd: OwnedFd,
    pub heap: Arc<ReadMap>,
    pub control: Arc<ReadMap>,
    pub crc: Arc<SharedBytes>,
    pub sealed: Arc<SharedBytes>,
    pub npages: u64,
    pub mode: u32,
    pub sets: (u64, u64),
    pub baseline: File,
    pub generation: u64,
    pub dead_epoch: u64,
}

/// Starts the heap's background thread: seal, then watch the baseline.
pub(crate) fn spawn(sh: Arc<Shared>, job: Job) {
    let r = std::thread::Builder::new().name("remem-agent-seal".into()).spawn(move || {
        if seal(&sh, &job) {
            watch(&sh, &job);
        }
    });
    if let Err(e) = r {
        eprintln!("remem agent: cannot start sealing: {e}");
    }
}

/// Runs `f` under the table lock if the slot still belongs to this job.
fn publish(sh: &Shared, job: &Job, f: impl FnOnce(&Shared, &mut Table)) -> bool {
    let mut t = sh.table.lock();
    let current = t.slots.get(job.slot).and_then(Option::as_ref).is_some_and(|h| h.assigned == job.assigned);
    if job.stop.load(Ordering::SeqCst) || !current {
        return false;
    }
    f(sh, &mut t);
    true
}

/// Seals; `false` when stopped (the heap left or was re-attached).
fn seal(sh: &Shared, job: &Job) -> bool {
    let t0 = std::time::Instant::now();
    let bytes = job.heap.bytes();
    let len = bytes.len() as u64;
    // Where the memfd holds data, found as the pass gets there: a scan of
    // all of a large memfd takes tens of milliseconds, which the first
    // chunks, those a lazy recovery needs first, should not wait for.
    let mut map = DataMap::new(job.heap_fd.as_fd(), len);
    let page = |map: &DataMap<'_>, p: u64| -> (&[u8], bool) {
        if map.is_data(p) {
            (&bytes[(p * 4096) as usize..(p * 4096 + 4096) as usize], true)
        } else {
            (&ZERO, false)
        }
    };
    let zero_crc = crc32fast::hash(&ZERO);
    let mut hasher = sh.digest.then(blake3::Hasher::new);
    let mut count = 0u64;
    if job.mode == 1 {
        // Precise: the sets are the whole truth.
        map.scan_to(len);
        let ctl = job.control.bytes();
        let words = job.npages.div_ceil(64) as usize;
        let mut union = vec![0u8; words * 8];
        for w in 0..words {
            let at = |off: u64| u64_at(ctl, off as usize + 8 * w).unwrap_or(u64::MAX);
            let mut bits = at(job.sets.0) | at(job.sets.1);
            let first = w as u64 * 64;
            if job.npages - first < 64 {
                bits &= (1u64 << (job.npages - first)) - 1;
            }
            union[8 * w..8 * w + 8].copy_from_slice(&bits.to_le_bytes());
            if bits == 0 {
                continue;
            }
            let mut crcs =
                job.crc.read(4 * first as usize, 4 * 64.min((job.npages - first) as usize)).unwrap_or_default();
            let mut b = bits;
            while b != 0 {
                let k = b.trailing_zeros() as usize;
                let (pg, data) = page(&map, first + k as u64);
                let c = if data { crc32fast::hash(pg) } else { zero_crc };
                if let Some(dst) = crcs.get_mut(4 * k..4 * k + 4) {
                    dst.copy_from_slice(&c.to_le_bytes());
                }
                count += 1;
                b &= b - 1;
            }
            job.crc.write(4 * first as usize, &crcs);
        }
        job.sealed.write(0, &union);
        if let Some(h) = hasher.as_mut() {
            for p in 0..job.npages {
                h.update(page(&map, p).0);
            }
        }
    } else {
        // Fast (or untracked): compare every page with the baseline.
        // A baseline that cannot be read (or its descriptor duplicated) is
        // no baseline: every page is then listed, with its CRC like any other.
        let table = job
            .baseline
            .try_clone()
            .ok()
            .and_then(|f| Baseline::open(FileBackend::from_file(f)).ok())
            .map(|b| b.crc_table())
            .filter(|t| t.len() as u64 == job.npages);
        log::debug!("remem agent: seal: the baseline's CRCs read at {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
        if table.is_none() && !publish(sh, job, |sh, _| sh.put_u64(job.slot, info::NO_BASELINE, 1)) {
            return false;
        }
        let mut start = 0u64;
        while start < job.npages {
            if !sh.seal_pause.is_zero() {
                std::thread::sleep(sh.seal_pause);
            }
            let end = (start + CHUNK).min(job.npages);
            map.scan_to(end * 4096);
            // The chunk's data pages, faulted in at once rather than one by one.
            let from = map.ranges.partition_point(|&(_, e)| e <= start * 4096);
            for &(s, e) in map.ranges[from..].iter().take_while(|&&(s, _)| s < end * 4096) {
                let (s, e) = (s.max(start * 4096), e.min(end * 4096));
                if s < e {
                    job.heap.populate(s as usize, (e - s) as usize);
                }
            }
            let mut crcs = Vec::with_capacity(4 * (end - start) as usize);
            let mut words = vec![0u64; (end - start).div_ceil(64) as usize];
            for p in start..end {
                let (pg, data) = page(&map, p);
                let c = if data { crc32fast::hash(pg) } else { zero_crc };
                if let Some(h) = hasher.as_mut() {
                    h.update(pg);
                }
                crcs.extend_from_slice(&c.to_le_bytes());
                // Without the baseline's CRCs nothing is known to be clean:
                // a page zeroed since the last flush (or a hole) may differ
                // from a baseline the recoverer can read.
                let differs = table.as_ref().is_none_or(|t| t[p as usize] != c);
                if differs {
                    let i = p - start;
                    words[(i / 64) as usize] |= 1 << (i % 64);
                    count += 1;
                }
            }
            job.crc.write(4 * start as usize, &crcs);
            let w: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            job.sealed.write(8 * (start / 64) as usize, &w);
            // The chunk's CRCs and bits are in place before the cursor moves past them.
            let ok = publish(sh, job, |sh, _| {
                sh.put_u64(job.slot, info::SEALED_PAGES, count);
                sh.put_u64(job.slot, info::SEAL_CURSOR, end);
            });
            if !ok {
                return false;
            }
            if start == 0 {
                log::debug!("remem agent: seal: first chunk published at {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
            }
            start = end;
        }
    }
    let digest = hasher.map(|h| *h.finalize().as_bytes());
    publish(sh, job, |sh, t| {
        sh.put_u64(job.slot, info::SEALED_PAGES, count);
        sh.put_u64(job.slot, info::SEAL_CURSOR, job.npages);
        if let Some(d) = digest {
            sh.put(job.slot, info::DIGEST, &d);
            sh.put_u64(job.slot, info::DIGEST_READY, 1);
        }
        sh.set_state(t, job.slot, info::SEALED);
    })
}

/// The byte ranges of a memfd that hold data, found in order
/// (SEEK_DATA/SEEK_HOLE) as far as a pass has asked: a page beyond is
/// never asked about before [`DataMap::scan_to`] passed it.
struct DataMap<'a> {
    fd: std::os::fd::BorrowedFd<'a>,
    len: u64,
    /// Sorted, disjoint.
    ranges: Vec<(u64, u64)>,
    /// Bytes `[0, scanned)` are mapped out.
    scanned: u64,
}

impl<'a> DataMap<'a> {
    fn new(fd: std::os::fd::BorrowedFd<'a>, len: u64) -> Self {
        DataMap { fd, len, ranges: Vec::new(), scanned: 0 }
    }

    /// Maps out bytes `[0, upto)` at least. Where the memfd cannot be
    /// asked, the rest counts as data (read, never skipped).
    fn scan_to(&mut self, upto: u64) {
        while self.scanned < upto.min(self.len) {
            match remem_alloc::memfd_data_range_from(self.fd, self.scanned, self.len) {
                Ok(Some((s, e))) if e > self.scanned && s >= self.scanned => {
                    self.ranges.push((s, e));
                    self.scanned = e;
                }
                Ok(None) => self.scanned = self.len,
                Ok(Some(_)) | Err(_) => {
                    self.ranges.push((self.scanned, self.len));
                    self.scanned = self.len;
                }
            }
        }
    }

    /// Page `p` (below the scanned part) holds data.
    fn is_data(&self, p: u64) -> bool {
        in_ranges(&self.ranges, p)
    }
}

/// Waits until a recovery elsewhere supersedes the heap, then releases it.
fn watch(sh: &Shared, job: &Job) {
    while !job.stop.load(Ordering::SeqCst) && !sh.stopping.load(Ordering::SeqCst) {
        std::thread::sleep(WATCH);
        if superseded(&job.baseline, job.generation, job.dead_epoch) {
            publish(sh, job, |sh, t| {
                if let Some(h) = t.slots[job.slot].as_mut() {
                    sh.release(h);
                }
                sh.set_state(t, job.slot, info::CLOSED);
            });
            return;
        }
    }
}

#[cfg(test)]
#[allow(unsafe_code)]
mod tests {
    use std::io::Write;
    use std::mem::ManuallyDrop;
    use std::os::fd::FromRawFd;

    use super::super::hosted::{Hosted, Owner};
    use super::super::layout::dir;
    use super::super::socket::Policy;
    use super::*;
    use crate::transport::{self, Kind, ServeOptions, Token};

    fn memfd(bytes: &[u8]) -> File {
        // SAFETY: memfd_create with a valid name; the descriptor is checked.
        let fd = unsafe { libc::memfd_create(c"remem-seal-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: just created, owned by nothing else.
        let mut f = unsafe { File::from_raw_fd(fd) };
        f.write_all(bytes).unwrap();
        f
    }

    /// A seal that cannot duplicate the baseline's descriptor (as with
    /// EMFILE) knows nothing clean: it lists every page, the all-zero ones
    /// too (zeroed since the last flush, they may differ from a baseline the
    /// recoverer reads), each with its CRC.
    #[test]
    fn a_seal_without_a_baseline_lists_every_page() {
        let npages = 4u64;
        let mut image = vec![0u8; (npages * 4096) as usize];
        image[0] = 1;
        let heap_file = memfd(&image);
        let ctl_file = memfd(&[0u8; 4096]);
        let target: Arc<dyn transport::Target> = Arc::from(
            transport::serve(
                Kind::Tcp,
                ServeOptions {
                    listen: "127.0.0.1:0".parse().unwrap(),
                    ..ServeOptions::new(Token::generate().unwrap())
                },
            )
            .unwrap(),
        );
        let sh = Shared {
            target,
            dir: Arc::new(SharedBytes::zeroed(dir::len(1))),
            table: parking_lot::Mutex::new(Table::default()),
            changed: parking_lot::Condvar::new(),
            policy: Policy { uid: 0, group: None },
            digest: false,
            damaged: Vec::new(),
            seal_pause: Duration::ZERO,
            stopping: AtomicBool::new(false),
        };
        sh.init_dir(1);
        let stop = Arc::new(AtomicBool::new(false));
        sh.table.lock().slots.push(Some(Hosted {
            uuid: [7; 16],
            owner: Owner::Gone,
            uid: 0,
            pid: 0,
            state: info::SEALING,
            held: None,
            stop: stop.clone(),
            assigned: 1,
            dead_epoch: 0,
        }));
        let sealed = Arc::new(SharedBytes::zeroed(8));
        let crc = Arc::new(SharedBytes::zeroed((npages * 4) as usize));
        // SAFETY: a descriptor number above any RLIMIT_NOFILE, so that
        // duplicating it fails as it would with EMFILE; never used otherwise
        // and never closed (the job is not dropped).
        let bogus = unsafe { File::from_raw_fd(1 << 30) };
        let job = ManuallyDrop::new(Job {
            slot: 0,
            assigned: 1,
            stop,
            heap_fd: OwnedFd::from(heap_file.try_clone().unwrap()),
            heap: Arc::new(ReadMap::new(&heap_file).unwrap()),
            control: Arc::new(ReadMap::new(&ctl_file).unwrap()),
            crc: crc.clone(),
            sealed: sealed.clone(),
            npages,
            mode: 0,
            sets: (0, 0),
            baseline: bogus,
            generation: 1,
            dead_epoch: 0,
        });
        assert!(seal(&sh, &job));
        let word = u64::from_le_bytes(sealed.read(0, 8).unwrap().try_into().unwrap());
        assert_eq!(word & 0b1111, 0b1111, "with no baseline every page must be listed: bits {word:#b}");
        let crcs = crc.read(0, 16).unwrap();
        let want: Vec<u8> = image.chunks(4096).flat_map(|pg| crc32fast::hash(pg).to_le_bytes()).collect();
        assert_eq!(crcs, want, "every listed page carries its CRC");
    }
}
