//! An in-memory [`Backend`] for crash tests: it keeps a *live* image (what
//! reads see) and a *durable* image (what survived the last successful
//! sync), and injects faults at a chosen sync or write (redb's crash-test
//! backend is the model).

use std::io;
use std::sync::Arc;

use parking_lot::Mutex;

use super::backend::Backend;

/// Which of the writes since the last successful sync a faulted sync leaves durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persist {
    /// None of them (the device lost its cache, or the kernel dropped the dirty pages).
    Nothing,
    /// All of them (they reached the medium, but the sync did not report it).
    Everything,
    /// Each 512-byte sector of each write (and each resize) independently, chosen by a PRNG
    /// seeded with `seed`: torn and reordered writes.
    Torn {
        /// PRNG seed.
        seed: u64,
    },
}

/// A fault injected at a sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncFault {
    /// The sync returns `EIO`; the pending writes become durable as `Persist` says and are
    /// forgotten (the live image keeps them, like a page cache after a failed writeback).
    /// Later calls work.
    Eio(Persist),
    /// The machine "crashes" at the sync: the pending writes become durable as `Persist`
    /// says, and from then on every call fails and nothing more becomes durable.
    Crash(Persist),
}

#[derive(Debug)]
enum Pending {
    Write { off: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct State {
    live: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Pending>,
    syncs: u64,
    writes: u64,
    sync_fault: Option<(u64, SyncFault)>,
    write_fault: Option<u64>,
    crashed: bool,
}

/// In-memory backend with fault injection. Clones share the same state, so a test
/// can keep a handle to inspect the images while a baseline owns another.
#[derive(Debug, Clone, Default)]
pub struct FaultyBackend {
    state: Arc<Mutex<State>>,
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

fn crashed() -> io::Error {
    io::Error::other("the simulated machine has crashed")
}

fn apply_write(img: &mut Vec<u8>, off: u64, data: &[u8]) {
    let (off, end) = (off as usize, off as usize + data.len());
    if img.len() < end {
        img.resize(end, 0);
    }
    img[off..end].copy_from_slice(data);
}

/// xorshift64*: enough randomness to tear writes, with no dependency.
fn next(rng: &mut u64) -> u64 {
    *rng ^= *rng >> 12;
    *rng ^= *rng << 25;
    *rng ^= *rng >> 27;
    rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

impl State {
    fn persist(&mut self, how: Persist) {
        let pending = std::mem::take(&mut self.pending);
        let mut rng = match how {
            Persist::Nothing => return,
            Persist::Everything => 0,
            Persist::Torn { seed } => seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
        };
        for p in pending {
            match p {
                Pending::SetLen(len) => {
                    if rng == 0 || next(&mut rng) & 1 == 1 {
                        self.durable.resize(len as usize, 0);
                    }
                }
                Pending::Write { off, data } if rng == 0 => apply_write(&mut self.durable, off, &data),
                Pending::Write { off, data } => {
                    let mut o = off;
                    let mut rest = &data[..];
                    while !rest.is_empty() {
                        let n = ((512 - o % 512) as usize).min(rest.len());
                        if next(&mut rng) & 1 == 1 {
                            apply_write(&mut self.durable, o, &rest[..n]);
                        }
                        o += n as u64;
                        rest = &rest[n..];
                    }
                }
            }
        }
    }

    fn check(&self) -> io::Result<()> {
        if self.crashed {
            Err(crashed())
        } else {
            Ok(())
        }
    }
}

impl FaultyBackend {
    /// An empty backend.
    pub fn new() -> FaultyBackend {
        FaultyBackend::default()
    }

    /// A backend whose live and durable images are `image` (a reboot after a crash).
    pub fn from_image(image: Vec<u8>) -> FaultyBackend {
        let s = State { live: image.clone(), durable: image, ..State::default() };
        FaultyBackend { state: Arc::new(Mutex::new(s)) }
    }

    /// What survived: the image as of the last successful sync, plus what a faulted sync let through.
    pub fn durable_image(&self) -> Vec<u8> {
        self.state.lock().durable.clone()
    }

    /// What reads see now.
    pub fn live_image(&self) -> Vec<u8> {
        self.state.lock().live.clone()
    }

    /// Syncs attempted so far (successful or not).
    pub fn sync_count(&self) -> u64 {
        self.state.lock().syncs
    }

    /// Writes attempted so far.
    pub fn write_count(&self) -> u64 {
        self.state.lock().writes
    }

    /// Injects `fault` at the sync after the next `after` syncs (0 = the next sync).
    pub fn fault_at_sync(&self, after: u64, fault: SyncFault) {
        let mut s = self.state.lock();
        s.sync_fault = Some((s.syncs + after, fault));
    }

    /// Makes the write after the next `after` writes fail with `EIO`, writing nothing.
    pub fn fail_write(&self, after: u64) {
        let mut s = self.state.lock();
        s.write_fault = Some(s.writes + after);
    }

    /// Removes injected faults that have not fired.
    pub fn clear_faults(&self) {
        let mut s = self.state.lock();
        s.sync_fault = None;
        s.write_fault = None;
    }

    /// Whether the simulated machine has crashed.
    pub fn has_crashed(&self) -> bool {
        self.state.lock().crashed
    }

    /// Writes `data` at `off` straight into both images (to damage a file in tests).
    pub fn poke(&self, off: u64, data: &[u8]) {
        let mut s = self.state.lock();
        apply_write(&mut s.live, off, data);
        apply_write(&mut s.durable, off, data);
    }
}

/// Granularity of [`FaultyBackend`]'s holes: a sector, finer than a page, so that
/// loaders must round the ranges to pages themselves.
const HOLE_GRAIN: u64 = 512;

impl Backend for FaultyBackend {
    fn len(&self) -> io::Result<u64> {
        let s = self.state.lock();
        s.check()?;
        Ok(s.live.len() as u64)
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let s = self.state.lock();
        s.check()?;
        let end = off.checked_add(buf.len() as u64).filter(|&e| e <= s.live.len() as u64);
        let Some(end) = end else {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("read past the end at {off}")));
        };
        buf.copy_from_slice(&s.live[off as usize..end as usize]);
        Ok(())
    }

    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        let mut s = self.state.lock();
        s.check()?;
        s.writes += 1;
        if s.write_fault == Some(s.writes - 1) {
            s.write_fault = None;
            return Err(eio());
        }
        apply_write(&mut s.live, off, buf);
        s.pending.push(Pending::Write { off, data: buf.to_vec() });
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.state.lock();
        s.check()?;
        s.live.resize(len as usize, 0);
        s.pending.push(Pending::SetLen(len));
        Ok(())
    }

    /// The runs of 512-byte sectors of the live image that hold a non-zero byte
    /// (clipped to `off..off + len`): every zero sector counts as a hole, as on a file
    /// system that punched out every zero block.
    fn data_ranges(&self, off: u64, len: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
        let s = self.state.lock();
        s.check()?;
        let end = off.saturating_add(len).min(s.live.len() as u64);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut at = off - off % HOLE_GRAIN;
        while at < end {
            let next = (at + HOLE_GRAIN).min(end);
            let lo = at.max(off);
            if s.live[lo as usize..next as usize].iter().any(|&b| b != 0) {
                match out.last_mut() {
                    Some(r) if r.1 == lo => r.1 = next,
                    _ => out.push((lo, next)),
                }
            }
            at = next;
        }
        Ok(Some(out))
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.state.lock();
        s.check()?;
        s.syncs += 1;
        match s.sync_fault {
            Some((at, fault)) if at == s.syncs - 1 => {
                s.sync_fault = None;
                match fault {
                    SyncFault::Eio(how) => {
                        s.persist(how);
                        Err(eio())
                    }
                    SyncFault::Crash(how) => {
                        s.persist(how);
                        s.crashed = true;
                        Err(crashed())
                    }
                }
            }
            _ => {
                s.persist(Persist::Everything);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_and_durable_images() {
        let b = FaultyBackend::new();
        b.write_at(0, b"hello").unwrap();
        assert_eq!(b.live_image(), b"hello");
        assert!(b.durable_image().is_empty());
        b.sync_data().unwrap();
        assert_eq!(b.durable_image(), b"hello");
        b.write_at(1, b"EL").unwrap();
        b.fault_at_sync(0, SyncFault::Eio(Persist::Nothing));
        assert!(b.sync_data().is_err());
        assert_eq!((b.live_image(), b.durable_image()), (b"hELlo".to_vec(), b"hello".to_vec()));
        b.sync_data().unwrap();
        assert_eq!(b.durable_image(), b"hello", "a failed sync forgets its writes");
        b.write_at(0, b"X").unwrap();
        b.fault_at_sync(0, SyncFault::Crash(Persist::Everything));
        assert!(b.sync_data().is_err());
        assert!(b.has_crashed() && b.len().is_err() && b.write_at(0, b"Y").is_err());
        assert_eq!(b.durable_image(), b"Xello");
    }

    #[test]
    fn torn_writes_keep_whole_sectors_from_either_side() {
        let b = FaultyBackend::from_image(vec![0; 8192]);
        b.write_at(0, &[1; 8192]).unwrap();
        b.fault_at_sync(0, SyncFault::Crash(Persist::Torn { seed: 5 }));
        assert!(b.sync_data().is_err());
        let d = b.durable_image();
        let sectors: Vec<u8> = d.chunks(512).map(|c| c[0]).collect();
        assert!(d.chunks(512).all(|c| c.iter().all(|&x| x == c[0])));
        assert!(sectors.contains(&0) && sectors.contains(&1), "{sectors:?}");
    }

    #[test]
    fn write_faults() {
        let b = FaultyBackend::new();
        b.fail_write(1);
        b.write_at(0, b"a").unwrap();
        assert!(b.write_at(1, b"b").is_err());
        b.write_at(1, b"c").unwrap();
        assert_eq!(b.live_image(), b"ac");
        assert_eq!(b.write_count(), 3);
    }
}
