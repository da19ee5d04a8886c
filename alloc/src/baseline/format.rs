//! The baseline file's on-disk format: layout arithmetic and the encoding of
//! superblocks and journal segment headers. Pure: no syscalls. The module
//! doc of [`super`] draws the layout; `docs/baseline.md` has the byte tables.

/// Bytes per page; the only page size a baseline supports.
pub const PAGE_SIZE: usize = 4096;
/// [`PAGE_SIZE`] as a file offset.
pub const PAGE: u64 = PAGE_SIZE as u64;
/// First eight bytes of a valid superblock slot.
pub const SB_MAGIC: [u8; 8] = *b"REMEMBL1";
/// First eight bytes of a journal segment header.
pub const SEG_MAGIC: [u8; 8] = *b"REMEMSEG";
/// Format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Bytes per superblock slot; slot `s` is at `s * SLOT_SIZE`.
pub const SLOT_SIZE: u64 = 4096;
/// Offset of the page CRC table (after the two superblock slots).
pub const TABLE_OFF: u64 = 2 * SLOT_SIZE;
/// Largest heap a baseline describes (caps the CRC table read back: 1 GiB of CRCs).
pub const MAX_HEAP_SIZE: u64 = 1 << 40;
/// Largest committed journal (caps `journal_len` read back).
pub const MAX_JOURNAL_LEN: u64 = 1 << 48;
/// Bytes of a segment header.
pub const SEG_HEADER: usize = 4096;
/// Bytes per segment entry: page `u64`, page CRC `u32`, zero `u32`.
pub const SEG_ENTRY: usize = 16;
/// Most pages in one segment: what fits in the header after its 32 fixed bytes.
pub const SEG_MAX_PAGES: usize = (SEG_HEADER - seg::ENTRIES) / SEG_ENTRY;
/// Bytes of the largest segment (header + [`SEG_MAX_PAGES`] pages, just under 1 MiB).
pub const SEG_MAX_BYTES: usize = SEG_HEADER + SEG_MAX_PAGES * PAGE_SIZE;

const _: () = assert!(SEG_MAX_PAGES == 254 && SEG_MAX_BYTES <= 1 << 20);

/// Byte offsets inside a superblock slot.
pub mod sb {
    /// `[u8; 8]` magic, [`super::SB_MAGIC`].
    pub const MAGIC: usize = 0;
    /// `u32` format version.
    pub const VERSION: usize = 8;
    /// `u32` page size (4096).
    pub const PAGE_SIZE: usize = 12;
    /// `[u8; 16]` UUID of the heap this baseline belongs to.
    pub const UUID: usize = 16;
    /// `u64` heap size in bytes.
    pub const HEAP_SIZE: usize = 32;
    /// `u64` fencing generation of the writer that wrote this superblock.
    pub const GENERATION: usize = 40;
    /// `u64` superblock sequence number; the valid slot with the highest wins.
    pub const SEQ: usize = 48;
    /// `u64` epoch of the last committed flush.
    pub const EPOCH: usize = 56;
    /// `u64` wall-clock time of the last committed flush, ns since the Unix epoch.
    pub const COMMIT_UNIX_NS: usize = 64;
    /// `u64` bytes of committed journal.
    pub const JOURNAL_LEN: usize = 72;
    /// `u64` `seq` of the superblock that last emptied the journal; every committed segment has a larger `seq`.
    pub const JOURNAL_BASE_SEQ: usize = 80;
    /// `u64` offset of the image area (must equal the computed one).
    pub const IMAGE_OFF: usize = 88;
    /// `u64` offset of the journal (must equal the computed one).
    pub const JOURNAL_OFF: usize = 96;
    /// `u32` CRC32 of bytes `0..CRC`.
    pub const CRC: usize = 104;
    /// Bytes covered by the encoding (the rest of the slot is zero).
    pub const LEN: usize = CRC + 4;
}

/// Byte offsets inside a journal segment header.
pub mod seg {
    /// `[u8; 8]` magic, [`super::SEG_MAGIC`].
    pub const MAGIC: usize = 0;
    /// `u64` `seq` of the superblock that commits this segment.
    pub const SEQ: usize = 8;
    /// `u64` flush epoch of the commit.
    pub const EPOCH: usize = 16;
    /// `u32` number of entries (and of pages after the header), `1..=254`.
    pub const COUNT: usize = 24;
    /// `u32` CRC32 of bytes `0..CRC` followed by the `COUNT` entries.
    pub const CRC: usize = 28;
    /// First entry: `u64` page index, `u32` CRC32 of the page, `u32` zero.
    pub const ENTRIES: usize = 32;
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

fn put_u32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// Where everything is in the baseline of a heap of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Heap size in bytes.
    pub heap_size: u64,
    /// Pages in the heap.
    pub npages: u64,
    /// Bytes of the CRC table (`4 * npages` rounded up to a page).
    pub table_len: u64,
    /// Offset of page 0 of the image area.
    pub image_off: u64,
    /// Offset of the journal (end of the image area).
    pub journal_off: u64,
}

impl Layout {
    /// The layout for a heap of `heap_size` bytes: a non-zero multiple of
    /// 4096, at most [`MAX_HEAP_SIZE`].
    pub fn for_heap(heap_size: u64) -> Result<Layout, String> {
        if heap_size == 0 || !heap_size.is_multiple_of(PAGE) || heap_size > MAX_HEAP_SIZE {
            return Err(format!(
                "heap size {heap_size} is not a non-zero multiple of {PAGE_SIZE} no larger than {MAX_HEAP_SIZE}"
            ));
        }
        let npages = heap_size / PAGE;
        let table_len = (4 * npages).next_multiple_of(PAGE);
        let image_off = TABLE_OFF + table_len;
        Ok(Layout { heap_size, npages, table_len, image_off, journal_off: image_off + heap_size })
    }

    /// File offset of page `page` in the image area.
    pub fn image_page(&self, page: u64) -> u64 {
        self.image_off + page * PAGE
    }
}

/// The contents of a superblock slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// UUID of the heap.
    pub uuid: [u8; 16],
    /// Heap size in bytes.
    pub heap_size: u64,
    /// Fencing generation.
    pub generation: u64,
    /// Sequence number, +1 per superblock written.
    pub seq: u64,
    /// Epoch of the last committed flush (0 = none yet).
    pub epoch: u64,
    /// Time of the last committed flush, ns since the Unix epoch.
    pub commit_unix_ns: u64,
    /// Bytes of committed journal.
    pub journal_len: u64,
    /// `seq` of the superblock that last emptied the journal.
    pub journal_base_seq: u64,
}

/// Why a superblock slot was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SlotError {
    /// Every byte is zero: the slot was never written.
    #[error("never written (all zero)")]
    Blank,
    /// Wrong magic.
    #[error("bad magic (not a remem baseline superblock)")]
    Magic,
    /// A format version this build does not read.
    #[error("format version {0}, this build reads version {VERSION}")]
    Version(u32),
    /// The CRC does not match (a torn or damaged write).
    #[error("checksum mismatch (torn or damaged)")]
    Crc,
    /// A field is out of range.
    #[error("invalid: {0}")]
    Invalid(String),
}

impl Superblock {
    /// The slot this superblock is written to (`seq % 2`).
    pub fn slot(&self) -> u64 {
        self.seq % 2
    }

    /// The layout of this superblock's heap (valid once decoded).
    pub fn layout(&self) -> Layout {
        Layout::for_heap(self.heap_size).expect("validated heap size")
    }

    /// Encodes into the first [`sb::LEN`] bytes of `out` (a slot buffer, whose rest the caller zeroes).
    pub fn encode_into(&self, out: &mut [u8]) {
        let layout = self.layout();
        let b = &mut out[..sb::LEN];
        b.fill(0);
        b[sb::MAGIC..sb::MAGIC + 8].copy_from_slice(&SB_MAGIC);
        put_u32(b, sb::VERSION, VERSION);
        put_u32(b, sb::PAGE_SIZE, PAGE_SIZE as u32);
        b[sb::UUID..sb::UUID + 16].copy_from_slice(&self.uuid);
        put_u64(b, sb::HEAP_SIZE, self.heap_size);
        put_u64(b, sb::GENERATION, self.generation);
        put_u64(b, sb::SEQ, self.seq);
        put_u64(b, sb::EPOCH, self.epoch);
        put_u64(b, sb::COMMIT_UNIX_NS, self.commit_unix_ns);
        put_u64(b, sb::JOURNAL_LEN, self.journal_len);
        put_u64(b, sb::JOURNAL_BASE_SEQ, self.journal_base_seq);
        put_u64(b, sb::IMAGE_OFF, layout.image_off);
        put_u64(b, sb::JOURNAL_OFF, layout.journal_off);
        let crc = crc32fast::hash(&b[..sb::CRC]);
        put_u32(b, sb::CRC, crc);
    }

    /// Encodes into a whole slot.
    pub fn encode(&self) -> [u8; SLOT_SIZE as usize] {
        let mut b = [0u8; SLOT_SIZE as usize];
        self.encode_into(&mut b);
        b
    }

    /// Decodes and validates a slot (at least [`sb::LEN`] bytes).
    pub fn decode(b: &[u8]) -> Result<Superblock, SlotError> {
        if b.len() < sb::LEN {
            return Err(SlotError::Invalid(format!("{} bytes, a superblock needs {}", b.len(), sb::LEN)));
        }
        let b = &b[..sb::LEN];
        if b.iter().all(|&x| x == 0) {
            return Err(SlotError::Blank);
        }
        if b[sb::MAGIC..sb::MAGIC + 8] != SB_MAGIC {
            return Err(SlotError::Magic);
        }
        // The CRC before the version: every version keeps magic, version and this CRC in
        // place, so a damaged version field reads as damage, not as a newer format.
        if crc32fast::hash(&b[..sb::CRC]) != u32_at(b, sb::CRC) {
            return Err(SlotError::Crc);
        }
        let version = u32_at(b, sb::VERSION);
        if version != VERSION {
            return Err(SlotError::Version(version));
        }
        let page_size = u32_at(b, sb::PAGE_SIZE);
        if page_size as usize != PAGE_SIZE {
            return Err(SlotError::Invalid(format!("page size {page_size}, only {PAGE_SIZE} is supported")));
        }
        let s = Superblock {
            uuid: b[sb::UUID..sb::UUID + 16].try_into().expect("16 bytes"),
            heap_size: u64_at(b, sb::HEAP_SIZE),
            generation: u64_at(b, sb::GENERATION),
            seq: u64_at(b, sb::SEQ),
            epoch: u64_at(b, sb::EPOCH),
            commit_unix_ns: u64_at(b, sb::COMMIT_UNIX_NS),
            journal_len: u64_at(b, sb::JOURNAL_LEN),
            journal_base_seq: u64_at(b, sb::JOURNAL_BASE_SEQ),
        };
        let layout = Layout::for_heap(s.heap_size).map_err(SlotError::Invalid)?;
        let (image_off, journal_off) = (u64_at(b, sb::IMAGE_OFF), u64_at(b, sb::JOURNAL_OFF));
        if image_off != layout.image_off || journal_off != layout.journal_off {
            return Err(SlotError::Invalid(format!(
                "image/journal offsets {image_off}/{journal_off}, a {}-byte heap has {}/{}",
                s.heap_size, layout.image_off, layout.journal_off
            )));
        }
        if s.seq == 0 || s.journal_base_seq == 0 || s.journal_base_seq > s.seq {
            return Err(SlotError::Invalid(format!("seq {} with journal base seq {}", s.seq, s.journal_base_seq)));
        }
        if s.journal_len > MAX_JOURNAL_LEN || !s.journal_len.is_multiple_of(PAGE) {
            return Err(SlotError::Invalid(format!("journal length {}", s.journal_len)));
        }
        Ok(s)
    }
}

/// One entry of a segment header: a page and the CRC32 of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegEntry {
    /// Page index in the heap.
    pub page: u64,
    /// CRC32 of the page's 4096 bytes.
    pub crc: u32,
}

/// A decoded journal segment header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegHeader {
    /// `seq` of the superblock that commits the segment.
    pub seq: u64,
    /// Flush epoch.
    pub epoch: u64,
    /// One entry per page following the header, in order.
    pub entries: Vec<SegEntry>,
}

impl SegHeader {
    /// Bytes of the segment (header and pages).
    pub fn bytes(&self) -> u64 {
        (SEG_HEADER + self.entries.len() * PAGE_SIZE) as u64
    }

    /// Encodes a header for `entries` (1..=254 of them) into `out` (4096 bytes).
    pub fn encode_into(seq: u64, epoch: u64, entries: &[SegEntry], out: &mut [u8]) {
        assert!((1..=SEG_MAX_PAGES).contains(&entries.len()), "segment of {} pages", entries.len());
        let out = &mut out[..SEG_HEADER];
        out.fill(0);
        out[seg::MAGIC..seg::MAGIC + 8].copy_from_slice(&SEG_MAGIC);
        put_u64(out, seg::SEQ, seq);
        put_u64(out, seg::EPOCH, epoch);
        put_u32(out, seg::COUNT, entries.len() as u32);
        for (i, e) in entries.iter().enumerate() {
            let o = seg::ENTRIES + i * SEG_ENTRY;
            put_u64(out, o, e.page);
            put_u32(out, o + 8, e.crc);
        }
        let crc = Self::crc(out, entries.len());
        put_u32(out, seg::CRC, crc);
    }

    fn crc(b: &[u8], count: usize) -> u32 {
        let mut h = crc32fast::Hasher::new();
        h.update(&b[..seg::CRC]);
        h.update(&b[seg::ENTRIES..seg::ENTRIES + count * SEG_ENTRY]);
        h.finalize()
    }

    /// Decodes a 4096-byte header; page indices are checked against `npages`.
    pub fn decode(b: &[u8], npages: u64) -> Result<SegHeader, String> {
        if b.len() < SEG_HEADER {
            return Err(format!("{} bytes, a segment header needs {SEG_HEADER}", b.len()));
        }
        if b[seg::MAGIC..seg::MAGIC + 8] != SEG_MAGIC {
            return Err("bad segment magic".into());
        }
        let count = u32_at(b, seg::COUNT) as usize;
        if !(1..=SEG_MAX_PAGES).contains(&count) {
            return Err(format!("segment page count {count} (must be 1..={SEG_MAX_PAGES})"));
        }
        if Self::crc(b, count) != u32_at(b, seg::CRC) {
            return Err("segment header checksum mismatch".into());
        }
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let o = seg::ENTRIES + i * SEG_ENTRY;
            let (page, crc, zero) = (u64_at(b, o), u32_at(b, o + 8), u32_at(b, o + 12));
            if page >= npages || zero != 0 {
                return Err(format!("segment entry {i}: page {page} of {npages}, padding {zero:#x}"));
            }
            entries.push(SegEntry { page, crc });
        }
        Ok(SegHeader { seq: u64_at(b, seg::SEQ), epoch: u64_at(b, seg::EPOCH), entries })
    }
}

/// CRC32 of a page of zeros (what every page of a new baseline holds).
pub fn zero_page_crc() -> u32 {
    static CRC: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *CRC.get_or_init(|| crc32fast::hash(&[0u8; PAGE_SIZE]))
}

/// Encodes CRC table entries `first..` of `table` into `out` (a whole number of table pages;
/// entries past the end of `table` are zero).
pub fn encode_table(table: &[u32], first: usize, out: &mut [u8]) {
    for (i, chunk) in out.chunks_exact_mut(4).enumerate() {
        chunk.copy_from_slice(&table.get(first + i).copied().unwrap_or(0).to_le_bytes());
    }
}

/// Decodes the first `npages` entries of a CRC table.
pub fn decode_table(b: &[u8], npages: u64) -> Vec<u32> {
    b.chunks_exact(4).take(npages as usize).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            uuid: *b"0123456789abcdef",
            heap_size: 64 * PAGE,
            generation: 3,
            seq: 7,
            epoch: 5,
            commit_unix_ns: 1_700_000_000_123_456_789,
            journal_len: 3 * PAGE,
            journal_base_seq: 4,
        }
    }

    #[test]
    fn layout_arithmetic() {
        let l = Layout::for_heap(64 * PAGE).unwrap();
        assert_eq!((l.npages, l.table_len, l.image_off, l.journal_off), (64, 4096, 12288, 12288 + 64 * 4096));
        let l = Layout::for_heap(256 << 20).unwrap();
        assert_eq!((l.npages, l.table_len, l.image_off), (65536, 262144, 8192 + 262144));
        assert_eq!(l.image_page(2), l.image_off + 8192);
        for bad in [0, 100, MAX_HEAP_SIZE + PAGE] {
            assert!(Layout::for_heap(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn superblock_round_trips_and_detects_every_flip() {
        let s = sample();
        let b = s.encode();
        assert_eq!(Superblock::decode(&b), Ok(s));
        for i in 0..sb::LEN {
            for bit in [0x01, 0x80] {
                let mut bad = b;
                bad[i] ^= bit;
                assert!(Superblock::decode(&bad).is_err(), "flip {bit:#x} at byte {i} not detected");
            }
        }
        assert_eq!(Superblock::decode(&[0u8; 4096]), Err(SlotError::Blank));
        let mut v2 = b;
        v2[sb::VERSION] = 2;
        assert_eq!(Superblock::decode(&v2), Err(SlotError::Crc), "damage, until the CRC says otherwise");
        let crc = crc32fast::hash(&v2[..sb::CRC]);
        put_u32(&mut v2, sb::CRC, crc);
        assert_eq!(Superblock::decode(&v2), Err(SlotError::Version(2)));
    }

    #[test]
    fn superblock_fields_are_range_checked_even_with_a_valid_crc() {
        let reseal = |mut b: [u8; 4096]| {
            let crc = crc32fast::hash(&b[..sb::CRC]);
            put_u32(&mut b, sb::CRC, crc);
            b
        };
        for (off, val) in [
            (sb::HEAP_SIZE, 100),
            (sb::HEAP_SIZE, MAX_HEAP_SIZE * 2),
            (sb::JOURNAL_LEN, 5),
            (sb::JOURNAL_LEN, MAX_JOURNAL_LEN + PAGE),
            (sb::JOURNAL_BASE_SEQ, 8),
            (sb::SEQ, 0),
            (sb::IMAGE_OFF, 0),
            (sb::JOURNAL_OFF, 1 << 20),
        ] {
            let mut b = sample().encode();
            put_u64(&mut b, off, val);
            assert!(matches!(Superblock::decode(&reseal(b)), Err(SlotError::Invalid(_))), "{off} = {val}");
        }
        let mut b = sample().encode();
        put_u32(&mut b, sb::PAGE_SIZE, 8192);
        assert!(matches!(Superblock::decode(&reseal(b)), Err(SlotError::Invalid(_))));
    }

    /// A version-1 superblock and segment header as bytes: the format must keep reading them.
    #[test]
    fn version_1_fixtures_decode() {
        const SB_V1: &str = "52454d454d424c310100000000100000303132333435363738396162636465660000040000000000\
                             03000000000000000700000000000000050000000000000015cd853dfe9c97170030000000000000\
                             040000000000000000300000000000000030040000000000ac2e864d";
        const SEG_V1: &str = "52454d454d5345470900000000000000060000000000000002000000eeb12b420300000000000000\
                              efbeadde000000003f000000000000007856341200000000";
        let hex = |s: &str| -> Vec<u8> {
            let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
            (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap()).collect()
        };
        let mut slot = hex(SB_V1);
        slot.resize(4096, 0);
        assert_eq!(Superblock::decode(&slot), Ok(sample()));
        let mut h = hex(SEG_V1);
        h.resize(4096, 0);
        let want = SegHeader {
            seq: 9,
            epoch: 6,
            entries: vec![SegEntry { page: 3, crc: 0xdead_beef }, SegEntry { page: 63, crc: 0x1234_5678 }],
        };
        assert_eq!(SegHeader::decode(&h, 64), Ok(want));
    }

    #[test]
    fn segment_header_round_trips_and_detects_damage() {
        let entries: Vec<SegEntry> =
            (0..SEG_MAX_PAGES as u64).map(|p| SegEntry { page: p % 64, crc: p as u32 * 7 }).collect();
        for n in [1, 2, SEG_MAX_PAGES] {
            let mut b = vec![0u8; SEG_HEADER];
            SegHeader::encode_into(11, 4, &entries[..n], &mut b);
            let h = SegHeader::decode(&b, 64).unwrap();
            assert_eq!((h.seq, h.epoch, &h.entries[..]), (11, 4, &entries[..n]));
            assert_eq!(h.bytes(), ((n + 1) * PAGE_SIZE) as u64);
            for i in 0..seg::ENTRIES + n * SEG_ENTRY {
                let mut bad = b.clone();
                bad[i] ^= 0x04;
                assert!(SegHeader::decode(&bad, 64).is_err(), "flip at byte {i} of a {n}-page header");
            }
        }
        let mut b = vec![0u8; SEG_HEADER];
        SegHeader::encode_into(1, 1, &[SegEntry { page: 64, crc: 0 }], &mut b);
        assert!(SegHeader::decode(&b, 64).unwrap_err().contains("page 64 of 64"));
    }

    #[test]
    fn table_round_trips() {
        let t: Vec<u32> = (0..1030).map(|i| i * 3 + 1).collect();
        let mut b = vec![0u8; 2 * PAGE_SIZE];
        encode_table(&t, 0, &mut b);
        assert_eq!(decode_table(&b, 1030), t);
        assert!(b[4 * 1030..].iter().all(|&x| x == 0));
        let mut c = vec![0u8; PAGE_SIZE];
        encode_table(&t, 1024, &mut c);
        assert_eq!(decode_table(&c, 6), t[1024..]);
    }
}
