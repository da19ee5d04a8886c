//! The control region: a small memfd, separate from the heap, that holds
//! the dirty-page lists, so that another process (the agent) can map it and
//! read them after the database process is gone.
//!
//! ```text
//!  0        4096                     4096 + W·8 (rounded to 4096)
//!  ┌────────┬────────────────────────┬────────────────────────┐
//!  │ header │ current set: W words,  │ closing set: W words,  │
//!  │        │ bit p = page p written │ pages of the flush in  │
//!  │        │ (precise mode only)    │ progress (all modes)   │
//!  └────────┴────────────────────────┴────────────────────────┘
//!  W = ceil(npages / 64); bit p is bit p % 64 of word p / 64.
//! ```
//!
//! Header (little-endian): 0 magic `"REMEMCTL"`, 8 version u32 (1), 12 mode
//! u32 (0 off, 1 precise, 2 fast), 16 heap uuid, 32 npages u64, 40 words
//! u64, 48 current_off u64, 56 closing_off u64, 64 current epoch u64 (the
//! epoch writes land in now), 72 committed epoch u64 (last epoch durable in
//! the baseline), 80 owner pid u64, 88 state u64 (0 open, 1 closed cleanly,
//! 2 durability poisoned), 96 lease u64 (renewals so far), 104 lease period
//! u64 (milliseconds). The words after offset 64 change at run time, with
//! atomic stores.
//!
//! The lease: while the heap is open, a small timer thread of the owner
//! process ([`Lease`], one per heap, named `remem-lease`) adds one to the
//! lease word every lease period ([`LEASE_PERIOD`]). A recovering host that
//! reads the word twice, more than two periods apart, and sees it unchanged
//! knows that the owner process has not run for that long: it is hung
//! (stopped, its host's OS hung) or dead, so it is safe to fence it and take
//! the heap over from its lists (failure F2). The lease says that the
//! process runs, not that the database in it makes progress.
//!
//! A page differs from the baseline only if it is in the current set or the
//! closing set: at every instant in precise mode, and as of the last
//! harvest in fast mode (pages written since are known only to the page
//! tables; the agent seals the lists by comparing page CRCs with the
//! baseline's).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::OpenError;
use crate::format::PAGE_SIZE;
use crate::mem::Mem;
use crate::region::{self, AnyMapping};
use crate::track::{DirtyBitmap, RawWords, TrackMode};

/// Header field offsets.
pub mod ctl {
    /// `[u8; 8]` magic.
    pub const MAGIC: usize = 0;
    /// `u32` version.
    pub const VERSION: usize = 8;
    /// `u32` tracking mode.
    pub const MODE: usize = 12;
    /// `[u8; 16]` heap UUID.
    pub const UUID: usize = 16;
    /// `u64` pages in the heap.
    pub const NPAGES: usize = 32;
    /// `u64` words per set.
    pub const WORDS: usize = 40;
    /// `u64` offset of the current set.
    pub const CURRENT_OFF: usize = 48;
    /// `u64` offset of the closing set.
    pub const CLOSING_OFF: usize = 56;
    /// `u64` the epoch writes land in now.
    pub const CURRENT_EPOCH: usize = 64;
    /// `u64` the last epoch durable in the baseline.
    pub const COMMITTED_EPOCH: usize = 72;
    /// `u64` pid of the process that owns the heap.
    pub const OWNER_PID: usize = 80;
    /// `u64` 0 open, 1 closed cleanly, 2 durability poisoned.
    pub const STATE: usize = 88;
    /// `u64` lease renewals so far (see the module docs).
    pub const LEASE: usize = 96;
    /// `u64` lease period in milliseconds.
    pub const LEASE_PERIOD_MS: usize = 104;
    /// Magic value.
    pub const MAGIC_BYTES: [u8; 8] = *b"REMEMCTL";
    /// State: open.
    pub const OPEN: u64 = 0;
    /// State: closed cleanly.
    pub const CLOSED: u64 = 1;
    /// State: a flush failed; the baseline is stale.
    pub const POISONED: u64 = 2;
}

/// How often the owner renews its lease.
pub const LEASE_PERIOD: Duration = Duration::from_millis(100);

/// The owner's lease renewer: a thread that adds one to the lease word of
/// its own mapping of the control region every [`LEASE_PERIOD`], until
/// dropped.
struct Lease {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Lease {
    fn start(fd: &OwnedFd, len: usize) -> Result<Lease, OpenError> {
        let fd = fd.try_clone().map_err(|e| OpenError::Io { what: "dup of the control memfd".into(), source: e })?;
        let map = AnyMapping::map(fd, len)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("remem-lease".into())
            .spawn(move || {
                // SAFETY: the thread's own mapping of `len` bytes, page aligned, alive
                // as long as `map`, which this closure owns.
                let mem = unsafe { Mem::new(map.base(), len) };
                while !stopping.load(Ordering::Acquire) {
                    mem.u64(ctl::LEASE).fetch_add(1, Ordering::Release);
                    std::thread::park_timeout(LEASE_PERIOD);
                }
                drop(map);
            })
            .map_err(|e| OpenError::Io { what: "starting the lease thread".into(), source: e })?;
        Ok(Lease { stop, thread: Some(thread) })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// A control region, mapped in this process.
pub(crate) struct Control {
    map: AnyMapping,
    mem: Mem,
    words: usize,
    _lease: Lease,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").field("words", &self.words).finish()
    }
}

impl Control {
    /// Creates the control region of a heap of `npages` pages.
    pub(crate) fn create(uuid: &[u8; 16], npages: u64, mode: TrackMode) -> Result<Control, OpenError> {
        let words = DirtyBitmap::words_for(npages);
        let set_bytes = (words * 8).next_multiple_of(PAGE_SIZE);
        let len = PAGE_SIZE + 2 * set_bytes;
        let fd = region::memfd(&format!("remem-ctl:{}", crate::format::uuid_string(uuid)), len as u64)?;
        let map = AnyMapping::map(fd, len)?;
        // SAFETY: the mapping is `len` bytes, page aligned, and lives in
        // `Control` as long as `mem` is used.
        let mem = unsafe { Mem::new(map.base(), len) };
        let mut h = [0u8; 64];
        h[ctl::MAGIC..ctl::MAGIC + 8].copy_from_slice(&ctl::MAGIC_BYTES);
        h[ctl::VERSION..ctl::VERSION + 4].copy_from_slice(&1u32.to_le_bytes());
        let m: u32 = match mode {
            TrackMode::Precise => 1,
            TrackMode::Fast => 2,
            _ => 0,
        };
        h[ctl::MODE..ctl::MODE + 4].copy_from_slice(&m.to_le_bytes());
        h[ctl::UUID..ctl::UUID + 16].copy_from_slice(uuid);
        h[ctl::NPAGES..ctl::NPAGES + 8].copy_from_slice(&npages.to_le_bytes());
        h[ctl::WORDS..ctl::WORDS + 8].copy_from_slice(&(words as u64).to_le_bytes());
        h[ctl::CURRENT_OFF..ctl::CURRENT_OFF + 8].copy_from_slice(&(PAGE_SIZE as u64).to_le_bytes());
        h[ctl::CLOSING_OFF..ctl::CLOSING_OFF + 8].copy_from_slice(&((PAGE_SIZE + set_bytes) as u64).to_le_bytes());
        mem.write(0, &h);
        mem.u64(ctl::OWNER_PID).store(u64::from(std::process::id()), Ordering::Release);
        mem.u64(ctl::LEASE_PERIOD_MS).store(LEASE_PERIOD.as_millis() as u64, Ordering::Release);
        let lease = Lease::start(map.fd(), len)?;
        Ok(Control { map, mem, words, _lease: lease })
    }

    fn set(&self, off: usize) -> RawWords {
        // SAFETY: `words` u64s at `off` lie inside the mapping (see
        // `create`), which outlives every bitmap made here because the heap
        // drops its tracker and bitmaps before its control region; they are
        // only accessed atomically, and are not part of the tracked heap.
        unsafe { RawWords::new(self.mem.ptr(off).cast::<AtomicU64>(), self.words) }
    }

    /// The current set's words (the precise tracker's store).
    pub(crate) fn current_words(&self) -> RawWords {
        self.set(PAGE_SIZE)
    }

    /// The closing set.
    pub(crate) fn closing_words(&self) -> RawWords {
        self.set(PAGE_SIZE + (self.words * 8).next_multiple_of(PAGE_SIZE))
    }

    /// A header word.
    pub(crate) fn word(&self, field: usize) -> &AtomicU64 {
        self.mem.u64(field)
    }

    /// The memfd (for the agent).
    pub(crate) fn fd(&self) -> &OwnedFd {
        self.map.fd()
    }
}

/// Why bytes that claim to be a control region were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// Shorter than its header, or than the sets its header describes.
    #[error("the control region is {len} bytes, it needs {need}")]
    Short {
        /// Bytes given.
        len: usize,
        /// Bytes its header calls for.
        need: u64,
    },
    /// Not a control region.
    #[error("bad magic (not a remem control region)")]
    Magic,
    /// A format version this build does not read.
    #[error("control region version {0}, this build reads version 1")]
    Version(u32),
    /// A field is out of range or inconsistent with another.
    #[error("invalid control region: {0}")]
    Invalid(String),
}

/// A control region read back as bytes (from a memfd another process
/// handed over, or from the network), validated before any of it is used:
/// every length and offset is checked against the bytes present and
/// against the largest heap remem makes, and nothing is allocated from an
/// unchecked length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlView {
    /// 0 off, 1 precise, 2 fast.
    pub mode: u32,
    /// The heap's UUID.
    pub uuid: [u8; 16],
    /// Pages in the heap.
    pub npages: u64,
    /// The epoch writes landed in.
    pub current_epoch: u64,
    /// The last epoch durable in the baseline.
    pub committed_epoch: u64,
    /// Pid of the owner.
    pub owner_pid: u64,
    /// 0 open, 1 closed cleanly, 2 poisoned.
    pub state: u64,
    /// Pages in the current or closing set, ascending.
    pub dirty: Vec<u64>,
}

impl ControlView {
    /// Decodes and validates `b`.
    pub fn decode(b: &[u8]) -> Result<ControlView, ControlError> {
        if b.len() < PAGE_SIZE {
            return Err(ControlError::Short { len: b.len(), need: PAGE_SIZE as u64 });
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        if b[ctl::MAGIC..ctl::MAGIC + 8] != ctl::MAGIC_BYTES {
            return Err(ControlError::Magic);
        }
        let version = u32_at(ctl::VERSION);
        if version != 1 {
            return Err(ControlError::Version(version));
        }
        let mode = u32_at(ctl::MODE);
        if mode > 2 {
            return Err(ControlError::Invalid(format!("tracking mode {mode}")));
        }
        let npages = u64_at(ctl::NPAGES);
        let max_pages = crate::format::MAX_HEAP / PAGE_SIZE as u64;
        if npages == 0 || npages > max_pages {
            return Err(ControlError::Invalid(format!("{npages} pages (1..={max_pages})")));
        }
        let words = u64_at(ctl::WORDS);
        if words != npages.div_ceil(64) {
            return Err(ControlError::Invalid(format!("{words} words per set for {npages} pages")));
        }
        let set_bytes = words * 8;
        let mut sets = [&b[..0], &b[..0]];
        for (i, field) in [ctl::CURRENT_OFF, ctl::CLOSING_OFF].into_iter().enumerate() {
            let off = u64_at(field);
            if off < PAGE_SIZE as u64 {
                return Err(ControlError::Invalid(format!("a dirty set at offset {off}, inside the header")));
            }
            let end = off.checked_add(set_bytes).ok_or_else(|| ControlError::Invalid(format!("set offset {off}")))?;
            if end > b.len() as u64 {
                return Err(ControlError::Short { len: b.len(), need: end });
            }
            sets[i] = &b[off as usize..end as usize];
        }
        let mut dirty = Vec::new();
        for w in 0..words as usize {
            let word = |s: &[u8]| u64::from_le_bytes(s[8 * w..8 * w + 8].try_into().expect("8 bytes"));
            let mut bits = word(sets[0]) | word(sets[1]);
            while bits != 0 {
                let p = w as u64 * 64 + u64::from(bits.trailing_zeros());
                if p >= npages {
                    return Err(ControlError::Invalid(format!("page {p} listed dirty in a heap of {npages} pages")));
                }
                dirty.push(p);
                bits &= bits - 1;
            }
        }
        Ok(ControlView {
            mode,
            uuid: b[ctl::UUID..ctl::UUID + 16].try_into().expect("16 bytes"),
            npages,
            current_epoch: u64_at(ctl::CURRENT_EPOCH),
            committed_epoch: u64_at(ctl::COMMITTED_EPOCH),
            owner_pid: u64_at(ctl::OWNER_PID),
            state: u64_at(ctl::STATE),
            dirty,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_control_region_decodes_and_damage_is_refused() {
        let c = Control::create(&[3; 16], 1000, TrackMode::Precise).unwrap();
        let len = PAGE_SIZE + 2 * (DirtyBitmap::words_for(1000) * 8).next_multiple_of(PAGE_SIZE);
        c.current_words()[0].fetch_or(1 << 7, Ordering::Relaxed);
        c.closing_words()[999 / 64].fetch_or(1 << (999 % 64), Ordering::Relaxed);
        // SAFETY: the mapping is `len` bytes (see `create`) and stays mapped while `c` lives.
        let bytes = unsafe { std::slice::from_raw_parts(c.mem.ptr(0), len) }.to_vec();
        let v = ControlView::decode(&bytes).unwrap();
        assert_eq!((v.mode, v.uuid, v.npages, v.dirty.clone()), (1, [3; 16], 1000, vec![7, 999]));
        // Cut inside the closing set (it starts at 2 pages and holds 16 words).
        assert!(matches!(ControlView::decode(&bytes[..2 * PAGE_SIZE + 100]), Err(ControlError::Short { .. })));
        let mut bad = bytes.clone();
        bad[ctl::CURRENT_OFF..ctl::CURRENT_OFF + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(ControlView::decode(&bad).is_err());
        let mut bad = bytes.clone();
        bad[ctl::NPAGES..ctl::NPAGES + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(ControlView::decode(&bad).is_err());
        let mut bad = bytes;
        // A bit past the last page.
        bad[PAGE_SIZE + 15 * 8 + 7] = 0x80;
        assert!(ControlView::decode(&bad).is_err());
    }
}
