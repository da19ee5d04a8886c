//! [`Baseline`]: create/open, commit, apply, fence and load over a [`Backend`].

use std::io;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::backend::Backend;
use super::error::{BaselineError, PageSource, Result};
use super::format::{
    decode_table, encode_table, zero_page_crc, Layout, SegEntry, SegHeader, SlotError, Superblock, MAX_JOURNAL_LEN,
    PAGE, PAGE_SIZE, SEG_HEADER, SEG_MAX_BYTES, SEG_MAX_PAGES, SLOT_SIZE, TABLE_OFF, VERSION,
};
use super::index::{JEntry, JournalIndex};
use crate::source::PageRead;

/// Pages per read or write of the image area and CRC table (the I/O buffer is one
/// full segment, just under 1 MiB).
const RUN_PAGES: usize = SEG_MAX_BYTES / PAGE_SIZE;
/// Image pages per read when loading into a zeroed destination (1 MiB).
const LOAD_RUN_PAGES: u64 = 256;
/// Image pages per [`Backend::data_ranges`] query when loading (1 GiB): bounds the
/// ranges held at once.
const DATA_WINDOW_PAGES: u64 = 1 << 18;
/// CRC table entries per table page.
const TABLE_PER_PAGE: u64 = PAGE / 4;
/// How often `fence` re-reads and re-writes when a racing commit overwrote its superblock.
const FENCE_ATTEMPTS: usize = 3;

/// The committed state as the superblock describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitInfo {
    /// Fencing generation in the superblock.
    pub generation: u64,
    /// Superblock sequence number.
    pub seq: u64,
    /// Epoch of the last committed flush (0 = none yet).
    pub epoch: u64,
    /// Wall-clock time of the last committed flush (or of creation), ns since the Unix epoch.
    pub commit_unix_ns: u64,
    /// Bytes of committed journal (0 right after `apply`).
    pub journal_len: u64,
    /// Distinct pages in the committed journal.
    pub journal_pages: u64,
}

/// What `load_into` or `load_into_zeroed` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadReport {
    /// Pages loaded (every page of the heap).
    pub pages: u64,
    /// Pages taken from the journal rather than the image area.
    pub from_journal: u64,
    /// Bytes read from the backend.
    pub bytes_read: u64,
    /// Image-area pages not read because the backend reported them as holes
    /// (`load_into_zeroed` only; `load_into` reads every page).
    pub hole_pages: u64,
    /// Pages not written to the destination because they are all zero
    /// (`load_into_zeroed` only).
    pub zero_pages: u64,
    /// The state loaded.
    pub info: CommitInfo,
}

/// A compaction in progress ([`Baseline::apply_step`]).
struct Applying {
    /// The whole journal when this pass began (sorted by page).
    journal: Vec<(u64, JEntry)>,
    /// The pages this pass copies into the image area (sorted by page): all of
    /// `journal` in the first pass, the pages committed since in later ones.
    entries: Vec<(u64, JEntry)>,
    /// How many of `entries` are in the image area already.
    done: usize,
    /// `seq` of the superblock that last made both slots describe the same state.
    dup_seq: u64,
    /// Passes begun: after [`MAX_APPLY_PASSES`], the last step takes any delta.
    passes: u32,
}

/// Passes of a compaction in steps before its last step takes the pages committed
/// meanwhile whatever their number (so commits cannot keep it from finishing).
const MAX_APPLY_PASSES: u32 = 4;

/// The committed state read back from a backend.
struct Committed {
    sb: Superblock,
    discarded: Option<DiscardedSlot>,
    table: Vec<u32>,
    journal: JournalIndex,
}

/// The crash-atomic, durable copy of a heap: see the [module documentation](super).
///
/// Writers (`commit`, `apply`, `fence`) take `&mut self`; readers (`load_into`,
/// `read_page`, `page_crc`) take `&self` and see the last state this instance
/// committed or opened.
pub struct Baseline<B: Backend> {
    backend: B,
    layout: Layout,
    /// The superblock this instance last wrote or read (what it believes is on disk).
    sb: Superblock,
    /// The CRC table as on disk (as of the last apply). Shared with clones
    /// ([`Baseline::try_clone`]) until one of them changes it.
    table: Arc<Vec<u32>>,
    /// The committed journal, newest entry per page (shared like `table`).
    journal: Arc<JournalIndex>,
    /// I/O buffer: one segment (header + 254 pages), also used for image and table runs.
    buf: Vec<u8>,
    /// Why writes are refused, after a failed write or sync.
    poisoned: Option<String>,
    /// The superblock slot refused when this baseline was opened.
    discarded: Option<DiscardedSlot>,
    /// The compaction in progress, between [`Baseline::apply_step`] calls.
    applying: Option<Applying>,
}

impl<B: Backend> std::fmt::Debug for Baseline<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Baseline")
            .field("uuid", &uuid_string(&self.sb.uuid))
            .field("heap_size", &self.sb.heap_size)
            .field("info", &self.info())
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

fn now_unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn uuid_string(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// Whether `b` is all zero bytes (vectorizes: no early exit inside a 64-byte chunk).
fn is_zero(b: &[u8]) -> bool {
    b.chunks(64).all(|c| c.iter().fold(0, |acc, &x| acc | x) == 0)
}

fn io_err(op: String) -> impl FnOnce(io::Error) -> BaselineError {
    move |source| BaselineError::Io { op, source }
}

fn corrupt(what: String) -> BaselineError {
    BaselineError::Corrupt { what }
}

fn backend_len<B: Backend>(backend: &B) -> Result<u64> {
    backend.len().map_err(io_err("reading the baseline's length".into()))
}

fn read_at<B: Backend>(backend: &B, off: u64, buf: &mut [u8], what: &str) -> Result<()> {
    backend.read_at(off, buf).map_err(io_err(format!("reading {what} ({} bytes at offset {off})", buf.len())))
}

/// A superblock slot that held something (not blank) but was refused, so
/// the baseline was opened from the other slot: the newest commit may be
/// the one that was lost (a torn superblock write of a commit that never
/// completed, or damage to the file). Reported by `open`, never silent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscardedSlot {
    /// Which slot (0 or 1).
    pub slot: u64,
    /// Why it was refused.
    pub reason: SlotError,
    /// The `seq` of the slot that was used instead.
    pub used_seq: u64,
}

impl std::fmt::Display for DiscardedSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "superblock slot {} was discarded ({}); opened from the other slot (seq {}): if slot {} held a newer \
             commit, its flush is lost",
            self.slot, self.reason, self.used_seq, self.slot
        )
    }
}

/// Reads both superblock slots and returns the valid one with the highest
/// `seq`, and the other slot when it was refused rather than blank.
fn read_superblock_slots<B: Backend>(backend: &B) -> Result<(Superblock, Option<DiscardedSlot>)> {
    let len = backend_len(backend)?;
    if len < TABLE_OFF {
        let why = format!("the file is {len} bytes, too short to hold the two {SLOT_SIZE}-byte superblock slots");
        return Err(BaselineError::NoSuperblock { slot0: why.clone(), slot1: why });
    }
    let mut b = vec![0u8; TABLE_OFF as usize];
    read_at(backend, 0, &mut b, "the superblock slots")?;
    let decode = |slot: u64| {
        let s = Superblock::decode(&b[(slot * SLOT_SIZE) as usize..])?;
        if s.slot() != slot {
            return Err(SlotError::Invalid(format!("seq {} does not belong in slot {slot}", s.seq)));
        }
        Ok(s)
    };
    match (decode(0), decode(1)) {
        (Ok(a), Ok(b)) if a.seq == b.seq => Err(corrupt(format!("both superblock slots claim seq {}", a.seq))),
        (Ok(a), Ok(b)) if a.uuid != b.uuid || a.heap_size != b.heap_size => Err(corrupt(format!(
            "the two superblock slots describe different heaps ({} bytes and {} bytes, or another UUID): the file \
             was pieced together from two baselines",
            a.heap_size, b.heap_size
        ))),
        (Ok(a), Ok(b)) => Ok((if a.seq > b.seq { a } else { b }, None)),
        // Never fall back to an older slot past a newer format: refuse instead.
        (Err(SlotError::Version(found)), _) | (_, Err(SlotError::Version(found))) => {
            Err(BaselineError::Version { found, supported: VERSION })
        }
        (Ok(s), Err(SlotError::Blank)) | (Err(SlotError::Blank), Ok(s)) => Ok((s, None)),
        (Ok(s), Err(reason)) => Ok((s, Some(DiscardedSlot { slot: 1, reason, used_seq: s.seq }))),
        (Err(reason), Ok(s)) => Ok((s, Some(DiscardedSlot { slot: 0, reason, used_seq: s.seq }))),
        (Err(e0), Err(e1)) => Err(BaselineError::NoSuperblock { slot0: e0.to_string(), slot1: e1.to_string() }),
    }
}

/// Reads both superblock slots and returns the valid one with the highest `seq`.
fn read_superblock<B: Backend>(backend: &B) -> Result<Superblock> {
    read_superblock_slots(backend).map(|(sb, _)| sb)
}

/// Reads the committed state: superblock, CRC table, journal index. Reads every
/// segment header of the committed journal, not the pages.
fn read_committed<B: Backend>(backend: &B) -> Result<Committed> {
    let (sb, discarded) = read_superblock_slots(backend)?;
    let layout = sb.layout();
    let len = backend_len(backend)?;
    let need = layout.journal_off + sb.journal_len;
    if len < need {
        return Err(corrupt(format!(
            "the file is {len} bytes, but superblock seq {} needs {need} (image area up to {} and {} bytes of \
             committed journal)",
            sb.seq, layout.journal_off, sb.journal_len
        )));
    }
    let t0 = std::time::Instant::now();
    let mut table = Vec::with_capacity(layout.npages as usize);
    let mut chunk = vec![0u8; SEG_MAX_BYTES.min(layout.table_len as usize)];
    let mut off = 0;
    while off < layout.table_len {
        let n = chunk.len().min((layout.table_len - off) as usize);
        read_at(backend, TABLE_OFF + off, &mut chunk[..n], "the page CRC table")?;
        table.extend(decode_table(&chunk[..n], layout.npages - table.len() as u64));
        off += n as u64;
    }
    let t_table = t0.elapsed();
    let journal = read_journal(backend, &sb, &layout)?;
    log::debug!(
        "remem: baseline read: CRC table of {} pages in {:.1} ms, journal index of {} pages ({} bytes) in {:.1} ms",
        layout.npages,
        t_table.as_secs_f64() * 1e3,
        journal.len(),
        sb.journal_len,
        (t0.elapsed() - t_table).as_secs_f64() * 1e3
    );
    Ok(Committed { sb, discarded, table, journal })
}

/// Indexes the committed journal: the newest entry per page.
fn read_journal<B: Backend>(backend: &B, sb: &Superblock, layout: &Layout) -> Result<JournalIndex> {
    // Every entry in journal order, then one bulk build (a stable sort that
    // keeps the last entry of each page: the newest).
    // At most one entry per journal page after the first header: one
    // allocation (growing a vector this large would copy and fault it twice).
    let mut journal = Vec::with_capacity((sb.journal_len / PAGE) as usize);
    let mut hdr = vec![0u8; SEG_HEADER];
    let (mut off, mut prev_seq, mut prev_epoch) = (0u64, 0u64, 0u64);
    while off < sb.journal_len {
        let at = layout.journal_off + off;
        let bad = |what: String| corrupt(format!("journal segment at journal offset {off} (file offset {at}): {what}"));
        if sb.journal_len - off < (SEG_HEADER + PAGE_SIZE) as u64 {
            return Err(bad(format!("only {} bytes left before the committed end", sb.journal_len - off)));
        }
        read_at(backend, at, &mut hdr, "a journal segment header")?;
        let h = SegHeader::decode(&hdr, layout.npages).map_err(bad)?;
        if h.seq <= sb.journal_base_seq || h.seq > sb.seq || h.seq < prev_seq {
            return Err(bad(format!(
                "seq {} out of order (previous segment {prev_seq}, journal started after seq {}, superblock seq {}): \
                 a stale or misplaced segment",
                h.seq, sb.journal_base_seq, sb.seq
            )));
        }
        if h.epoch > sb.epoch || h.epoch < prev_epoch {
            return Err(bad(format!(
                "epoch {} out of order (previous segment {prev_epoch}, superblock {})",
                h.epoch, sb.epoch
            )));
        }
        if h.bytes() > sb.journal_len - off {
            return Err(bad(format!("{} bytes run past the committed journal end {}", h.bytes(), sb.journal_len)));
        }
        for (i, e) in h.entries.iter().enumerate() {
            journal.push((e.page, JEntry { off: at + ((1 + i) * PAGE_SIZE) as u64, crc: e.crc }));
        }
        (prev_seq, prev_epoch) = (h.seq, h.epoch);
        off += h.bytes();
    }
    Ok(journal.into_iter().collect())
}

/// Reads journal pages into `out` (page `k` of `entries` at `out[k*4096..]`), coalescing
/// reads of adjacent pages, and checks every page's CRC.
fn read_journal_pages<B: Backend>(backend: &B, entries: &[(u64, JEntry)], out: &mut [u8]) -> Result<()> {
    let mut k = 0;
    while k < entries.len() {
        let mut l = k + 1;
        while l < entries.len() && entries[l].1.off == entries[l - 1].1.off + PAGE {
            l += 1;
        }
        read_at(backend, entries[k].1.off, &mut out[k * PAGE_SIZE..l * PAGE_SIZE], "journal pages")?;
        k = l;
    }
    for (k, &(page, e)) in entries.iter().enumerate() {
        let found = crc32fast::hash(&out[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]);
        if found != e.crc {
            let source_area = PageSource::Journal;
            return Err(BaselineError::PageCrc { page, source_area, offset: e.off, expected: e.crc, found });
        }
    }
    Ok(())
}

/// Checks that `found` (just read from disk) is the superblock this writer expects.
fn compare(expected: &Superblock, found: &Superblock) -> Result<()> {
    if found.generation > expected.generation {
        return Err(BaselineError::Fenced { ours: expected.generation, found: found.generation });
    }
    if found != expected {
        return Err(BaselineError::Diverged {
            ours_generation: expected.generation,
            ours_seq: expected.seq,
            found_generation: found.generation,
            found_seq: found.seq,
        });
    }
    Ok(())
}

impl<B: Backend> Baseline<B> {
    /// Creates a baseline of an all-zero heap of `heap_size` bytes in an empty backend,
    /// with fencing generation `generation`, and syncs it.
    pub fn create(backend: B, uuid: [u8; 16], heap_size: u64, generation: u64) -> Result<Self> {
        let layout = Layout::for_heap(heap_size).map_err(|_| BaselineError::BadHeapSize(heap_size))?;
        let len = backend_len(&backend)?;
        if len != 0 {
            return Err(BaselineError::NotEmpty { len });
        }
        let table = vec![zero_page_crc(); layout.npages as usize];
        let mut this = Baseline {
            backend,
            layout,
            sb: Superblock {
                uuid,
                heap_size,
                generation,
                seq: 1,
                epoch: 0,
                commit_unix_ns: now_unix_ns(),
                journal_len: 0,
                journal_base_seq: 1,
            },
            table: Arc::new(table),
            journal: Arc::default(),
            buf: vec![0u8; SEG_MAX_BYTES],
            poisoned: None,
            discarded: None,
            applying: None,
        };
        let r = this.backend.set_len(layout.journal_off);
        this.check_io(r, || format!("extending the new baseline to {} bytes", layout.journal_off))?;
        this.write_table_pages(0, layout.table_len / PAGE)?;
        let r = this.backend.sync_data();
        this.check_io(r, || "syncing the new baseline's CRC table".into())?;
        let sb = this.sb;
        this.write_superblock_unchecked(&sb)?;
        Ok(this)
    }

    /// The heap's UUID and page count from the newest valid superblock alone,
    /// without reading the CRC table or the journal ([`Baseline::open`]
    /// reads and checks them): for a caller that wants to start other work
    /// on the heap's identity while the baseline is opened.
    pub fn peek(backend: &B) -> Result<([u8; 16], u64)> {
        let (sb, _) = read_superblock_slots(backend)?;
        Ok((sb.uuid, sb.layout().npages))
    }

    /// Opens a baseline: picks the superblock, validates the layout, the file length and
    /// every committed segment header (page data is checked by `load_into`).
    pub fn open(backend: B) -> Result<Self> {
        let c = read_committed(&backend)?;
        Ok(Baseline {
            backend,
            layout: c.sb.layout(),
            sb: c.sb,
            table: Arc::new(c.table),
            journal: Arc::new(c.journal),
            buf: vec![0u8; SEG_MAX_BYTES],
            poisoned: None,
            discarded: c.discarded,
            applying: None,
        })
    }

    /// A second instance over the same backend that knows the same committed
    /// state, without reading it again (the CRC table and the journal index
    /// are copied from memory). For a reader beside a writer: lazy recovery
    /// serves pages from one while the heap commits through the other.
    /// Refused on a poisoned baseline.
    pub fn try_clone(&self) -> Result<Self>
    where
        B: Clone,
    {
        self.writable()?;
        Ok(Baseline {
            backend: self.backend.clone(),
            layout: self.layout,
            sb: self.sb,
            table: Arc::clone(&self.table),
            journal: Arc::clone(&self.journal),
            buf: vec![0u8; SEG_MAX_BYTES],
            poisoned: None,
            discarded: self.discarded.clone(),
            applying: None,
        })
    }

    /// The superblock slot that was refused when this baseline was opened
    /// (damaged or torn, not blank), if any: the newest commit may be lost.
    pub fn discarded_slot(&self) -> Option<&DiscardedSlot> {
        self.discarded.as_ref()
    }

    /// The committed state this instance knows.
    pub fn info(&self) -> CommitInfo {
        CommitInfo {
            generation: self.sb.generation,
            seq: self.sb.seq,
            epoch: self.sb.epoch,
            commit_unix_ns: self.sb.commit_unix_ns,
            journal_len: self.sb.journal_len,
            journal_pages: self.journal.len() as u64,
        }
    }

    /// UUID of the heap.
    pub fn uuid(&self) -> [u8; 16] {
        self.sb.uuid
    }

    /// Heap size in bytes.
    pub fn heap_size(&self) -> u64 {
        self.sb.heap_size
    }

    /// Pages in the heap.
    pub fn npages(&self) -> u64 {
        self.layout.npages
    }

    /// The file layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Gives the backend back.
    pub fn into_backend(self) -> B {
        self.backend
    }

    /// Whether a failed write or sync has poisoned this baseline.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// The failure that poisoned this baseline, if any.
    pub fn poison_cause(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    /// Checks that this baseline belongs to heap `uuid` of `heap_size` bytes.
    pub fn check_heap(&self, uuid: [u8; 16], heap_size: u64) -> Result<()> {
        if uuid != self.sb.uuid || heap_size != self.sb.heap_size {
            return Err(BaselineError::WrongHeap {
                expected: uuid_string(&uuid),
                expected_size: heap_size,
                found: uuid_string(&self.sb.uuid),
                found_size: self.sb.heap_size,
            });
        }
        Ok(())
    }

    /// The committed CRC32 of `page` (the journal's, else the table's).
    pub fn page_crc(&self, page: u64) -> Result<u32> {
        if page >= self.layout.npages {
            return Err(BaselineError::PageOutOfRange { page, npages: self.layout.npages });
        }
        Ok(self.journal.get(&page).map_or(self.table[page as usize], |e| e.crc))
    }

    /// The committed CRC32 of every page.
    pub fn crc_table(&self) -> Vec<u32> {
        let mut t: Vec<u32> = self.table.to_vec();
        for (&p, e) in self.journal.iter() {
            t[p as usize] = e.crc;
        }
        t
    }

    /// Re-reads the superblock and checks that it is still the one this instance
    /// committed or read: `Fenced` if a newer generation took over, `Diverged` if it
    /// changed otherwise. A failover host calls it after loading, to learn whether
    /// its fence survived (see the module documentation on the race window).
    pub fn check_fence(&self) -> Result<CommitInfo> {
        compare(&self.sb, &read_superblock(&self.backend)?)?;
        Ok(self.info())
    }

    /// Commits flush epoch `epoch` (newer than the last committed one): appends `pages`
    /// (page index, 4096 bytes) to the journal in segments of up to 254 pages, one write
    /// per segment, syncs, then writes and syncs the next superblock: the commit point.
    /// A page given twice keeps its last bytes. The CRCs are taken from the copy that is
    /// written, so a page changing under the call is committed consistently (as some
    /// version of its bytes). Sorted pages make `apply` read the journal sequentially.
    ///
    /// On `Err`, nothing new is committed, except after `Fenced`/`Diverged` from the
    /// check that follows the superblock write, or an `Io` error from the final
    /// superblock write or sync: then the new state may be on disk (the file holds
    /// either the old or the new state, never a mix).
    pub fn commit<'p, I>(&mut self, epoch: u64, pages: I) -> Result<CommitInfo>
    where
        I: IntoIterator<Item = (u64, &'p [u8])>,
    {
        self.writable()?;
        if epoch <= self.sb.epoch {
            return Err(BaselineError::EpochOrder { last: self.sb.epoch, given: epoch });
        }
        self.check_fence()?;
        let seq = self.sb.seq + 1;
        let npages = self.layout.npages;
        let mut end = self.sb.journal_len;
        let mut staged: Vec<(u64, JEntry)> = Vec::new();
        let mut entries: Vec<SegEntry> = Vec::with_capacity(SEG_MAX_PAGES);
        let mut pages = pages.into_iter();
        loop {
            entries.clear();
            for (page, bytes) in pages.by_ref() {
                if page >= npages {
                    return Err(BaselineError::PageOutOfRange { page, npages });
                }
                if bytes.len() != PAGE_SIZE {
                    return Err(BaselineError::SizeMismatch {
                        what: format!("page {page} given to commit"),
                        expected: PAGE,
                        found: bytes.len() as u64,
                    });
                }
                let at = SEG_HEADER + entries.len() * PAGE_SIZE;
                let copy = &mut self.buf[at..at + PAGE_SIZE];
                copy.copy_from_slice(bytes);
                entries.push(SegEntry { page, crc: crc32fast::hash(copy) });
                if entries.len() == SEG_MAX_PAGES {
                    break;
                }
            }
            if entries.is_empty() {
                break;
            }
            SegHeader::encode_into(seq, epoch, &entries, &mut self.buf);
            let n = SEG_HEADER + entries.len() * PAGE_SIZE;
            if end + n as u64 > MAX_JOURNAL_LEN {
                return Err(BaselineError::JournalFull { len: end, max: MAX_JOURNAL_LEN });
            }
            let off = self.layout.journal_off + end;
            let r = self.backend.write_at(off, &self.buf[..n]);
            self.check_io(r, || format!("appending a {}-page journal segment at offset {off}", entries.len()))?;
            for (i, e) in entries.iter().enumerate() {
                staged.push((e.page, JEntry { off: off + ((1 + i) * PAGE_SIZE) as u64, crc: e.crc }));
            }
            end += n as u64;
            if entries.len() < SEG_MAX_PAGES {
                break;
            }
        }
        if end > self.sb.journal_len {
            let r = self.backend.sync_data();
            self.check_io(r, || format!("syncing the journal segments of epoch {epoch}"))?;
        }
        let new = Superblock { seq, epoch, commit_unix_ns: now_unix_ns(), journal_len: end, ..self.sb };
        self.write_superblock(&new)?;
        self.sb = new;
        Arc::make_mut(&mut self.journal).extend(staged);
        Ok(self.info())
    }

    /// Applies (compacts) the journal: copies the current superblock into the other slot
    /// and syncs (so both slots describe the current state), copies the newest version of
    /// every journal page into the image area and its CRC into the table (sorted by
    /// offset, in runs of up to 1 MiB), syncs, then writes and syncs a superblock with an
    /// empty journal. A crash at any point leaves a file that loads the same heap. Does
    /// nothing when the journal is empty. The file keeps its length (the journal space
    /// is reused). Finishes a compaction that [`Baseline::apply_step`] began.
    pub fn apply(&mut self) -> Result<()> {
        while !self.apply_step(usize::MAX)? {}
        Ok(())
    }

    /// One bounded step of a compaction that commits may interleave with: the same
    /// writes as [`Baseline::apply`], cut into steps that each copy at most `max_pages`
    /// journal pages into the image area (at least one), so that a writer holding the
    /// baseline between steps commits without waiting for the whole compaction. Returns
    /// `true` once the journal is empty (nothing in progress).
    ///
    /// 1. The first step duplicates the current superblock into the other slot and
    ///    syncs, and takes the journal's pages as they are then.
    /// 2. Each step copies the next `max_pages` of them into the image area (no sync).
    ///    Both slots' journals hold every one of those pages for as long as the
    ///    compaction runs (commits only append, and a commit replaces the older slot
    ///    with a newer state), so load never reads these image pages: any committed
    ///    version may be there.
    /// 3. When they are done, the pages committed since (newer entries) are the delta.
    ///    A delta larger than `max_pages` starts another pass over it (after a new
    ///    duplication of the superblock, since the older slot may not hold them), up
    ///    to four passes, so that commits cannot keep a compaction from finishing.
    ///    Otherwise the last step duplicates the superblock if a commit happened since
    ///    the last duplication, copies the delta, writes the CRC table pages of every
    ///    journal page, syncs, and writes and syncs the superblock with an empty
    ///    journal: the same commit point as `apply`.
    ///
    /// A crash between or within steps leaves the last committed state (the journal
    /// replays over whatever the image area holds for its pages).
    pub fn apply_step(&mut self, max_pages: usize) -> Result<bool> {
        self.writable()?;
        let max_pages = max_pages.max(1);
        let mut a = match self.applying.take() {
            Some(a) => a,
            None if self.sb.journal_len == 0 => return Ok(true),
            None => {
                let dup_seq = self.duplicate_superblock()?;
                let journal: Vec<(u64, JEntry)> = self.journal.to_vec();
                Applying { entries: journal.clone(), journal, done: 0, dup_seq, passes: 1 }
            }
        };
        let end = a.done.saturating_add(max_pages).min(a.entries.len());
        self.write_image_pages(&a.entries[a.done..end])?;
        a.done = end;
        if a.done < a.entries.len() {
            self.applying = Some(a);
            return Ok(false);
        }
        // Pages committed since this pass began, or committed again.
        let delta: Vec<(u64, JEntry)> = self
            .journal
            .iter()
            .filter(|&(p, e)| a.journal.binary_search_by_key(p, |&(q, _)| q).map_or(true, |i| a.journal[i].1 != *e))
            .map(|(&p, &e)| (p, e))
            .collect();
        if delta.len() > max_pages && a.passes < MAX_APPLY_PASSES {
            let dup_seq = self.duplicate_superblock()?;
            let journal = self.journal.to_vec();
            self.applying = Some(Applying { journal, entries: delta, done: 0, dup_seq, passes: a.passes + 1 });
            return Ok(false);
        }
        if !delta.is_empty() && self.sb.seq != a.dup_seq {
            self.duplicate_superblock()?;
        }
        self.write_image_pages(&delta)?;
        // The table pages that hold a changed CRC, in runs of adjacent table pages.
        let entries: Vec<(u64, JEntry)> = self.journal.to_vec();
        let mut chunks: Vec<u64> = entries.iter().map(|&(p, _)| p / TABLE_PER_PAGE).collect();
        chunks.dedup();
        let mut k = 0;
        while k < chunks.len() {
            let mut l = k + 1;
            while l < chunks.len() && l - k < RUN_PAGES && chunks[l] == chunks[l - 1] + 1 {
                l += 1;
            }
            self.write_table_pages_with(chunks[k], (l - k) as u64, &entries)?;
            k = l;
        }
        let r = self.backend.sync_data();
        self.check_io(r, || "syncing the applied image and CRC table".into())?;
        let seq = self.sb.seq + 1;
        let new = Superblock { seq, journal_len: 0, journal_base_seq: seq, ..self.sb };
        self.write_superblock(&new)?;
        let table = Arc::make_mut(&mut self.table);
        for (p, e) in entries {
            table[p as usize] = e.crc;
        }
        self.journal = Arc::default();
        self.sb = new;
        Ok(true)
    }

    /// Whether a compaction begun by [`Baseline::apply_step`] is unfinished.
    pub fn is_applying(&self) -> bool {
        self.applying.is_some()
    }

    /// Copies the current superblock into the other slot (`seq + 1`) and syncs, so that
    /// both slots describe the current state before the image area changes; returns the
    /// new `seq`.
    fn duplicate_superblock(&mut self) -> Result<u64> {
        let dup = Superblock { seq: self.sb.seq + 1, ..self.sb };
        self.write_superblock(&dup)?;
        self.sb = dup;
        Ok(dup.seq)
    }

    /// Copies `entries` (journal pages, sorted by page) into the image area, in runs of
    /// adjacent pages of up to 1 MiB. No sync.
    fn write_image_pages(&mut self, entries: &[(u64, JEntry)]) -> Result<()> {
        let mut i = 0;
        while i < entries.len() {
            let mut j = i + 1;
            while j < entries.len() && j - i < RUN_PAGES && entries[j].0 == entries[j - 1].0 + 1 {
                j += 1;
            }
            read_journal_pages(&self.backend, &entries[i..j], &mut self.buf)?;
            let off = self.layout.image_page(entries[i].0);
            let r = self.backend.write_at(off, &self.buf[..(j - i) * PAGE_SIZE]);
            self.check_io(r, || format!("applying {} journal pages to the image at offset {off}", j - i))?;
            i = j;
        }
        Ok(())
    }

    /// Fences older writers: re-reads the committed state from the backend (adopting
    /// commits this instance has not seen), then writes and syncs a superblock with
    /// `new_generation` (which must be newer). From then on, a writer holding an older
    /// generation gets [`BaselineError::Fenced`] at its next commit or apply. If a racing
    /// commit overwrites the fence before it is confirmed, `fence` re-reads and fences
    /// again (a few times). See the module documentation for the window it cannot close.
    pub fn fence(&mut self, new_generation: u64) -> Result<CommitInfo> {
        self.fence_with(new_generation, true)
    }

    /// [`Baseline::fence`] that leaves the fence's superblock to be synced
    /// later (by the caller, or by the next commit of the fencing writer:
    /// every commit syncs the file before its own superblock, which carries
    /// the new generation too). It is written and read back, so other opens
    /// on this host see it at once; an old writer on another host sees it
    /// once it reaches the storage. For a recovery that must not wait for a
    /// sync before the heap is usable (lazy recovery syncs it in the
    /// background).
    pub fn fence_unsynced(&mut self, new_generation: u64) -> Result<CommitInfo> {
        self.fence_with(new_generation, false)
    }

    fn fence_with(&mut self, new_generation: u64, sync: bool) -> Result<CommitInfo> {
        self.writable()?;
        // A compaction in progress restarts from the state read below.
        self.applying = None;
        let mut attempt = 0;
        loop {
            attempt += 1;
            // The committed state, re-read only when the superblock moved
            // since this instance read it (the CRC table and the journal
            // index grow with the heap).
            let (sb, _) = read_superblock_slots(&self.backend)?;
            if sb != self.sb {
                let c = read_committed(&self.backend)?;
                if c.sb.uuid != self.sb.uuid || c.sb.heap_size != self.sb.heap_size {
                    return Err(BaselineError::WrongHeap {
                        expected: uuid_string(&self.sb.uuid),
                        expected_size: self.sb.heap_size,
                        found: uuid_string(&c.sb.uuid),
                        found_size: c.sb.heap_size,
                    });
                }
                (self.sb, self.table, self.journal) = (c.sb, Arc::new(c.table), Arc::new(c.journal));
            }
            if new_generation <= self.sb.generation {
                return Err(BaselineError::StaleGeneration { requested: new_generation, current: self.sb.generation });
            }
            let new = Superblock { generation: new_generation, seq: self.sb.seq + 1, ..self.sb };
            let written = if sync {
                self.write_superblock(&new)
            } else {
                self.check_fence().and_then(|_| {
                    let mut slot = [0u8; SLOT_SIZE as usize];
                    new.encode_into(&mut slot);
                    let r = self.backend.write_at(new.slot() * SLOT_SIZE, &slot);
                    self.check_io(r, || format!("writing superblock seq {} to slot {}", new.seq, new.slot()))?;
                    compare(&new, &read_superblock(&self.backend)?)
                })
            };
            match written {
                Ok(()) => {
                    self.sb = new;
                    return Ok(self.info());
                }
                Err(BaselineError::Diverged { .. }) if attempt < FENCE_ATTEMPTS => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Loads the committed heap into `dst` (`heap_size` bytes): the image area, then the
    /// newest journal version of each journal page; every page's CRC is checked. Writes
    /// every byte of `dst`; reads every byte of the image area, holes included (see
    /// [`Baseline::load_into_zeroed`] for the fast path into zeroed memory).
    pub fn load_into(&self, dst: &mut [u8]) -> Result<LoadReport> {
        self.check_dst(dst, "the load_into destination")?;
        let npages = self.layout.npages;
        let mut in_journal = self.journal.keys().copied().peekable();
        let mut start = 0;
        while start < npages {
            let end = (start + RUN_PAGES as u64).min(npages);
            let d = &mut dst[(start * PAGE) as usize..(end * PAGE) as usize];
            read_at(&self.backend, self.layout.image_page(start), d, "the image area")?;
            for p in start..end {
                if in_journal.next_if_eq(&p).is_some() {
                    continue;
                }
                let at = ((p - start) * PAGE) as usize;
                self.check_image_page(p, &d[at..at + PAGE_SIZE])?;
            }
            start = end;
        }
        let (from_journal, _) = self.load_journal(dst, false)?;
        Ok(LoadReport {
            pages: npages,
            from_journal,
            bytes_read: self.sb.heap_size + from_journal * PAGE,
            hole_pages: 0,
            zero_pages: 0,
            info: self.info(),
        })
    }

    /// Loads the committed heap into `dst` (`heap_size` bytes), which **must already be
    /// all zero** (a fresh memfd or anonymous mapping): the result is then the same as
    /// [`Baseline::load_into`]'s, with the same CRC checks and the same error for a
    /// damaged page (I/O errors name different offsets), but
    ///
    /// * image-area pages that the backend reports as holes
    ///   ([`Backend::data_ranges`]) are not read: their table CRC is compared with the
    ///   CRC of a zero page instead (a mismatch is [`BaselineError::PageCrc`] with
    ///   `found` = that CRC, as `load_into` would report after reading the zeros);
    /// * the data is read in sequential runs of up to 1 MiB, each page checked against
    ///   its CRC, and only pages that are not all zero are written to `dst` (journal
    ///   pages too), so the destination's untouched pages are never populated.
    ///
    /// If `dst` is not zeroed, the pages skipped keep their old bytes: memory-safe, but
    /// not the committed heap. With a backend that cannot tell holes
    /// (`data_ranges` returns `None`), every page is read, and still only non-zero
    /// pages are written.
    pub fn load_into_zeroed(&self, dst: &mut [u8]) -> Result<LoadReport> {
        self.check_dst(dst, "the load_into_zeroed destination")?;
        let npages = self.layout.npages;
        let zero_crc = zero_page_crc();
        let mut journal = self.journal.keys().copied().peekable();
        // Pages are asked for in increasing order.
        let mut in_journal = |p: u64| {
            while journal.next_if(|&j| j < p).is_some() {}
            journal.peek() == Some(&p)
        };
        let mut buf = vec![0u8; LOAD_RUN_PAGES as usize * PAGE_SIZE];
        let (mut bytes_read, mut hole_pages, mut zero_pages) = (0u64, 0u64, 0u64);
        let mut window = 0;
        while window < npages {
            let window_end = (window + DATA_WINDOW_PAGES).min(npages);
            let mut next = window;
            for (first, end) in self.image_data_runs(window, window_end)?.into_iter().chain([(window_end, window_end)])
            {
                // Pages next..first are holes: they read as zeros.
                self.check_hole_pages(next, first)?;
                hole_pages += first - next;
                let mut at = first;
                while at < end {
                    let run_end = (at + LOAD_RUN_PAGES).min(end);
                    let b = &mut buf[..((run_end - at) * PAGE) as usize];
                    read_at(&self.backend, self.layout.image_page(at), b, "the image area")?;
                    bytes_read += b.len() as u64;
                    for (p, page) in (at..run_end).zip(b.chunks_exact(PAGE_SIZE)) {
                        if in_journal(p) {
                            continue;
                        }
                        if self.check_image_page(p, page)? == zero_crc && is_zero(page) {
                            zero_pages += 1;
                        } else {
                            dst[(p * PAGE) as usize..((p + 1) * PAGE) as usize].copy_from_slice(page);
                        }
                    }
                    at = run_end;
                }
                next = end;
            }
            window = window_end;
        }
        let (from_journal, zero_in_journal) = self.load_journal(dst, true)?;
        Ok(LoadReport {
            pages: npages,
            from_journal,
            bytes_read: bytes_read + from_journal * PAGE,
            hole_pages,
            zero_pages: zero_pages + zero_in_journal,
            info: self.info(),
        })
    }

    fn check_dst(&self, dst: &[u8], what: &str) -> Result<()> {
        if dst.len() as u64 != self.sb.heap_size {
            return Err(BaselineError::SizeMismatch {
                what: what.into(),
                expected: self.sb.heap_size,
                found: dst.len() as u64,
            });
        }
        Ok(())
    }

    /// Checks image page `p`, read as `bytes`, against the table; returns its CRC.
    fn check_image_page(&self, p: u64, bytes: &[u8]) -> Result<u32> {
        let found = crc32fast::hash(bytes);
        let expected = self.table[p as usize];
        if found != expected {
            let (source_area, offset) = (PageSource::Image, self.layout.image_page(p));
            return Err(BaselineError::PageCrc { page: p, source_area, offset, expected, found });
        }
        Ok(found)
    }

    /// Checks image pages `first..end`, holes in the image area (all zero), against the
    /// table without reading them; pages in the journal are not checked.
    fn check_hole_pages(&self, first: u64, end: u64) -> Result<()> {
        let zero_crc = zero_page_crc();
        let table = &self.table[first as usize..end as usize];
        for (p, &expected) in (first..end).zip(table) {
            if expected != zero_crc && !self.journal.contains_key(&p) {
                let (source_area, offset) = (PageSource::Image, self.layout.image_page(p));
                return Err(BaselineError::PageCrc { page: p, source_area, offset, expected, found: zero_crc });
            }
        }
        Ok(())
    }

    /// The runs of image pages in `first..end` that may hold data, as sorted, disjoint,
    /// non-adjacent page ranges: the backend's [`Backend::data_ranges`] rounded out to
    /// whole pages, or all of `first..end` if it cannot tell.
    fn image_data_runs(&self, first: u64, end: u64) -> Result<Vec<(u64, u64)>> {
        let (off, len) = (self.layout.image_page(first), (end - first) * PAGE);
        let ranges = self
            .backend
            .data_ranges(off, len)
            .map_err(io_err(format!("finding the data in the image area ({len} bytes at offset {off})")))?;
        let Some(ranges) = ranges else {
            return Ok(vec![(first, end)]);
        };
        // Do not trust the backend's order or bounds: clip, round out, sort, merge.
        let mut runs: Vec<(u64, u64)> = ranges
            .into_iter()
            .map(|(s, e)| (s.max(off), e.min(off + len)))
            .filter(|&(s, e)| s < e)
            .map(|(s, e)| (first + (s - off) / PAGE, first + (e - off).div_ceil(PAGE)))
            .collect();
        runs.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
        for (a, b) in runs {
            match merged.last_mut() {
                Some(last) if last.1 >= a => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        Ok(merged)
    }

    /// Copies the newest journal version of each journal page into `dst` (reading in
    /// file order, checking each page's CRC); with `skip_zero`, all-zero pages are not
    /// written (`dst` holds zeros there). Returns the journal pages and those skipped.
    fn load_journal(&self, dst: &mut [u8], skip_zero: bool) -> Result<(u64, u64)> {
        let mut by_off: Vec<(u64, JEntry)> = self.journal.to_vec();
        by_off.sort_unstable_by_key(|&(_, e)| e.off);
        let mut skipped = 0;
        let mut tmp = vec![0u8; RUN_PAGES * PAGE_SIZE];
        for group in by_off.chunks(RUN_PAGES) {
            read_journal_pages(&self.backend, group, &mut tmp)?;
            for (&(p, e), page) in group.iter().zip(tmp.chunks_exact(PAGE_SIZE)) {
                if skip_zero && e.crc == zero_page_crc() && is_zero(page) {
                    skipped += 1;
                } else {
                    dst[(p * PAGE) as usize..((p + 1) * PAGE) as usize].copy_from_slice(page);
                }
            }
        }
        Ok((by_off.len() as u64, skipped))
    }

    /// Reads the committed pages `first..first + status.len()` into `out`
    /// (`status.len()` pages) for a [`crate::source::PageSource`], page by page
    /// verdict in `status`: [`PageRead::Zero`] for a page whose committed CRC is
    /// that of a zero page (not read, `out` left as it was: holes and zero pages
    /// cost no I/O), [`PageRead::Data`] for a page read and matching its committed
    /// CRC, [`PageRead::Unreadable`] for one that does not match (damaged storage).
    /// Runs of adjacent image pages are read with one `read_at` each. An `Err` is
    /// an I/O error or a bad request (range, buffer size). Allocates nothing.
    pub fn read_pages(&self, first: u64, out: &mut [u8], status: &mut [PageRead]) -> Result<()> {
        let n = status.len() as u64;
        let end = first.checked_add(n).filter(|&e| e <= self.layout.npages).ok_or(BaselineError::PageOutOfRange {
            page: first.saturating_add(n.saturating_sub(1)),
            npages: self.layout.npages,
        })?;
        if out.len() as u64 != n * PAGE {
            return Err(BaselineError::SizeMismatch {
                what: "the read_pages buffer".into(),
                expected: n * PAGE,
                found: out.len() as u64,
            });
        }
        let zero_crc = zero_page_crc();
        let mut journal = self.journal.range(first..end).peekable();
        // Image pages first..p that are waiting to be read as one run.
        let mut run_start: Option<u64> = None;
        let mut p = first;
        while p <= end {
            let in_journal = if p < end { journal.next_if(|&(&j, _)| j == p).map(|(_, &e)| e) } else { None };
            let image_data = p < end && in_journal.is_none() && self.table[p as usize] != zero_crc;
            if !image_data {
                if let Some(s) = run_start.take() {
                    self.read_image_run(s, p, first, out, status)?;
                }
            } else if run_start.is_none() {
                run_start = Some(p);
            }
            if p == end {
                break;
            }
            let k = (p - first) as usize;
            let page = &mut out[k * PAGE_SIZE..(k + 1) * PAGE_SIZE];
            match in_journal {
                Some(e) if e.crc == zero_crc => status[k] = PageRead::Zero,
                Some(e) => {
                    read_at(&self.backend, e.off, page, "a journal page")?;
                    status[k] = if crc32fast::hash(page) == e.crc { PageRead::Data } else { PageRead::Unreadable };
                }
                None if !image_data => status[k] = PageRead::Zero,
                None => {}
            }
            p += 1;
        }
        Ok(())
    }

    /// Reads image pages `s..e` (all with data, none in the journal) into their
    /// places in `out` (which starts at page `first`) and checks them.
    fn read_image_run(&self, s: u64, e: u64, first: u64, out: &mut [u8], status: &mut [PageRead]) -> Result<()> {
        let (a, b) = ((s - first) as usize, (e - first) as usize);
        let bytes = &mut out[a * PAGE_SIZE..b * PAGE_SIZE];
        read_at(&self.backend, self.layout.image_page(s), bytes, "image pages")?;
        for (k, page) in (a..b).zip(bytes.chunks_exact(PAGE_SIZE)) {
            let ok = crc32fast::hash(page) == self.table[first as usize + k];
            status[k] = if ok { PageRead::Data } else { PageRead::Unreadable };
        }
        Ok(())
    }

    /// Reads the committed bytes of one page into `out` (4096 bytes), checking its CRC.
    pub fn read_page(&self, page: u64, out: &mut [u8]) -> Result<()> {
        let expected = self.page_crc(page)?;
        if out.len() != PAGE_SIZE {
            return Err(BaselineError::SizeMismatch {
                what: "the read_page buffer".into(),
                expected: PAGE,
                found: out.len() as u64,
            });
        }
        if let Some(&e) = self.journal.get(&page) {
            return read_journal_pages(&self.backend, &[(page, e)], out);
        }
        let offset = self.layout.image_page(page);
        read_at(&self.backend, offset, out, "an image page")?;
        let found = crc32fast::hash(out);
        if found != expected {
            return Err(BaselineError::PageCrc { page, source_area: PageSource::Image, offset, expected, found });
        }
        Ok(())
    }

    fn writable(&self) -> Result<()> {
        match &self.poisoned {
            Some(cause) => Err(BaselineError::Poisoned { cause: cause.clone() }),
            None => Ok(()),
        }
    }

    /// Turns a failed write or sync into an `Io` error and poisons the baseline.
    fn check_io(&mut self, r: io::Result<()>, op: impl FnOnce() -> String) -> Result<()> {
        r.map_err(|source| {
            let op = op();
            self.poisoned = Some(format!("{op}: {source}"));
            BaselineError::Io { op, source }
        })
    }

    /// Writes table pages `first..first+n` from the in-memory table.
    fn write_table_pages(&mut self, first: u64, n: u64) -> Result<()> {
        let mut done = 0;
        while done < n {
            let m = (n - done).min(RUN_PAGES as u64);
            self.write_table_pages_with(first + done, m, &[])?;
            done += m;
        }
        Ok(())
    }

    /// Writes table pages `first..first+n` (at most a buffer's worth) from the in-memory
    /// table overridden by `entries` (sorted by page; those outside the range are skipped).
    fn write_table_pages_with(&mut self, first: u64, n: u64, entries: &[(u64, JEntry)]) -> Result<()> {
        let bytes = (n * PAGE) as usize;
        let (lo, hi) = (first * TABLE_PER_PAGE, (first + n) * TABLE_PER_PAGE);
        let out = &mut self.buf[..bytes];
        encode_table(&self.table, lo as usize, out);
        let from = entries.partition_point(|&(p, _)| p < lo);
        for &(p, e) in entries[from..].iter().take_while(|&&(p, _)| p < hi) {
            let at = ((p - lo) * 4) as usize;
            out[at..at + 4].copy_from_slice(&e.crc.to_le_bytes());
        }
        let off = TABLE_OFF + first * PAGE;
        let r = self.backend.write_at(off, &self.buf[..bytes]);
        self.check_io(r, || format!("writing {n} CRC table pages at offset {off}"))
    }

    /// The commit point: checks the fence, writes `new` to its slot, syncs, and checks
    /// that it is the superblock the file now holds.
    fn write_superblock(&mut self, new: &Superblock) -> Result<()> {
        self.check_fence()?;
        self.write_superblock_unchecked(new)?;
        match read_superblock(&self.backend) {
            Ok(found) => compare(new, &found),
            Err(e) => {
                self.poisoned = Some(format!("confirming superblock seq {} after syncing it: {e}", new.seq));
                Err(e)
            }
        }
    }

    fn write_superblock_unchecked(&mut self, new: &Superblock) -> Result<()> {
        let mut slot = [0u8; SLOT_SIZE as usize];
        new.encode_into(&mut slot);
        let off = new.slot() * SLOT_SIZE;
        let r = self.backend.write_at(off, &slot);
        self.check_io(r, || format!("writing superblock seq {} to slot {}", new.seq, new.slot()))?;
        let r = self.backend.sync_data();
        self.check_io(r, || format!("syncing superblock seq {}", new.seq))
    }
}
