//! Tests of the baseline: a model-based proptest with faults, crashes at every
//! sync, damage detection, poisoning, fencing and its race windows, the file
//! backend; and an ignored flush benchmark.

use std::collections::BTreeSet;
use std::sync::Arc;

use parking_lot::Mutex;
use proptest::prelude::*;

use super::format::{sb, Superblock, PAGE, PAGE_SIZE, SLOT_SIZE, TABLE_OFF};
use super::*;

const UUID: [u8; 16] = *b"remem-baseline-t";

/// Page contents that name their page and fill, so misplaced or stale pages show.
fn page_bytes(page: u64, fill: u8) -> Vec<u8> {
    let mut b: Vec<u8> = (0..PAGE_SIZE).map(|i| fill.wrapping_add((i / 61) as u8)).collect();
    b[..8].copy_from_slice(&page.to_le_bytes());
    b
}

fn set_page(heap: &mut [u8], page: u64, fill: u8) {
    heap[(page * PAGE) as usize..((page + 1) * PAGE) as usize].copy_from_slice(&page_bytes(page, fill));
}

fn page_of(heap: &[u8], page: u64) -> &[u8] {
    &heap[(page * PAGE) as usize..((page + 1) * PAGE) as usize]
}

/// Loads with `load_into` (over garbage) and with `load_into_zeroed` (over zeros), and
/// checks that both give the same heap.
fn load<B: Backend>(bl: &Baseline<B>) -> Vec<u8> {
    let mut v = vec![0xA5; bl.heap_size() as usize];
    let r = bl.load_into(&mut v).unwrap();
    assert_eq!((r.pages, r.from_journal, r.info), (bl.npages(), r.info.journal_pages, bl.info()));
    assert_eq!((r.hole_pages, r.zero_pages, r.bytes_read), (0, 0, bl.heap_size() + r.from_journal * PAGE));
    let mut z = vec![0; bl.heap_size() as usize];
    let rz = bl.load_into_zeroed(&mut z).unwrap();
    assert_eq!((rz.pages, rz.from_journal, rz.info), (r.pages, r.from_journal, r.info));
    assert!(rz.bytes_read + rz.hole_pages * PAGE <= r.bytes_read, "{rz:?} reads more than {r:?}");
    assert!(z == v, "load_into_zeroed differs from load_into");
    v
}

/// Both loads fail, with the same error; returns it.
fn load_err<B: Backend>(bl: &Baseline<B>) -> BaselineError {
    let mut v = vec![0xA5; bl.heap_size() as usize];
    let e = bl.load_into(&mut v).unwrap_err();
    let mut z = vec![0; bl.heap_size() as usize];
    let ez = bl.load_into_zeroed(&mut z).unwrap_err();
    assert_eq!(e.to_string(), ez.to_string());
    e
}

/// Opens an image as a rebooted machine would, and loads it.
fn open_image(image: Vec<u8>) -> (Baseline<FaultyBackend>, Vec<u8>) {
    let bl = Baseline::open(FaultyBackend::from_image(image)).unwrap_or_else(|e| panic!("reopen: {e}"));
    let heap = load(&bl);
    (bl, heap)
}

fn commit_pages(bl: &mut Baseline<FaultyBackend>, epoch: u64, heap: &[u8], pages: &[u64]) -> Result<CommitInfo> {
    bl.commit(epoch, pages.iter().map(|&p| (p, page_of(heap, p))))
}

fn persist_modes() -> Vec<Persist> {
    let mut v = vec![Persist::Nothing, Persist::Everything];
    v.extend((0..6).map(|seed| Persist::Torn { seed }));
    v
}

fn all_faults() -> Vec<SyncFault> {
    persist_modes().into_iter().flat_map(|p| [SyncFault::Crash(p), SyncFault::Eio(p)]).collect()
}

fn assert_refuses_writes(bl: &mut Baseline<FaultyBackend>) {
    let e = bl.info().epoch + 1;
    assert!(matches!(bl.commit(e, []), Err(BaselineError::Poisoned { .. })));
    assert!(matches!(bl.apply(), Err(BaselineError::Poisoned { .. })));
    assert!(matches!(bl.fence(u64::MAX), Err(BaselineError::Poisoned { .. })));
}

// ---------------------------------------------------------------------------
// Model-based proptest.

#[derive(Debug, Clone)]
enum Op {
    Write {
        page: u64,
        fill: u8,
    },
    WriteRun {
        first: u64,
        n: u64,
        fill: u8,
    },
    Commit,
    Apply,
    /// One bounded compaction step (commits and faults interleave with the steps).
    ApplyStep {
        pages: usize,
    },
    CommitFault {
        after: u64,
        fault: SyncFault,
    },
    ApplyFault {
        after: u64,
        fault: SyncFault,
    },
    CommitWriteFails {
        after: u64,
    },
    Reopen,
}

const SIM_PAGES: u64 = 64;

fn persist_strategy() -> impl Strategy<Value = Persist> {
    prop_oneof![Just(Persist::Nothing), Just(Persist::Everything), any::<u64>().prop_map(|seed| Persist::Torn { seed })]
}

fn fault_strategy() -> impl Strategy<Value = SyncFault> {
    prop_oneof![persist_strategy().prop_map(SyncFault::Crash), persist_strategy().prop_map(SyncFault::Eio)]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..SIM_PAGES, any::<u8>()).prop_map(|(page, fill)| Op::Write { page, fill }),
        2 => (0..SIM_PAGES, 1..24u64, any::<u8>()).prop_map(|(first, n, fill)| Op::WriteRun { first, n, fill }),
        4 => Just(Op::Commit),
        2 => Just(Op::Apply),
        3 => (1usize..6).prop_map(|pages| Op::ApplyStep { pages }),
        2 => (0..3u64, fault_strategy()).prop_map(|(after, fault)| Op::CommitFault { after, fault }),
        1 => (0..3u64, fault_strategy()).prop_map(|(after, fault)| Op::ApplyFault { after, fault }),
        1 => (0..3u64).prop_map(|after| Op::CommitWriteFails { after }),
        1 => Just(Op::Reopen),
    ]
}

/// A baseline beside the naive model: the full image as of the last successful commit.
struct Sim {
    fb: FaultyBackend,
    bl: Baseline<FaultyBackend>,
    heap: Vec<u8>,
    dirty: BTreeSet<u64>,
    committed: Vec<u8>,
    epoch: u64,
}

impl Sim {
    fn new() -> Sim {
        let fb = FaultyBackend::new();
        let bl = Baseline::create(fb.clone(), UUID, SIM_PAGES * PAGE, 1).unwrap();
        let heap = vec![0; (SIM_PAGES * PAGE) as usize];
        Sim { fb, bl, committed: heap.clone(), heap, dirty: BTreeSet::new(), epoch: 0 }
    }

    fn commit(&mut self) -> Result<CommitInfo> {
        let dirty: Vec<u64> = self.dirty.iter().copied().collect();
        commit_pages(&mut self.bl, self.epoch + 1, &self.heap, &dirty)
    }

    fn committed_ok(&mut self) {
        self.committed = self.heap.clone();
        self.epoch += 1;
        self.dirty.clear();
    }

    fn restart(&mut self, image: Vec<u8>) {
        self.fb = FaultyBackend::from_image(image);
        self.bl = Baseline::open(self.fb.clone()).unwrap();
    }

    /// After a commit failed: the file holds the old or the new state, never a mix; go on from it.
    fn settle_failed_commit(&mut self) {
        if !self.fb.has_crashed() {
            assert!(self.bl.is_poisoned());
            assert_refuses_writes(&mut self.bl);
            assert_eq!(load(&self.bl), self.committed, "a poisoned baseline still serves its last commit");
            // What a restarted process would read through the page cache.
            let (b, got) = open_image(self.fb.live_image());
            assert!(self.is_old_or_new(&got, b.info().epoch).is_some(), "live image is a mix");
        }
        let (b, got) = open_image(self.fb.durable_image());
        match self.is_old_or_new(&got, b.info().epoch) {
            Some(false) => {}
            Some(true) => self.committed_ok(),
            None => panic!("durable image is neither the old nor the new state (epoch {})", b.info().epoch),
        }
        self.restart(self.fb.durable_image());
    }

    fn is_old_or_new(&self, got: &[u8], epoch: u64) -> Option<bool> {
        if got == self.committed && epoch == self.epoch {
            Some(false)
        } else if got == self.heap && epoch == self.epoch + 1 {
            Some(true)
        } else {
            None
        }
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Write { page, fill } => {
                set_page(&mut self.heap, page, fill);
                self.dirty.insert(page);
            }
            Op::WriteRun { first, n, fill } => {
                for p in first..(first + n).min(SIM_PAGES) {
                    set_page(&mut self.heap, p, fill);
                    self.dirty.insert(p);
                }
            }
            Op::Commit => {
                self.commit().unwrap();
                self.committed_ok();
            }
            Op::Apply => self.bl.apply().unwrap(),
            Op::ApplyStep { pages } => {
                self.bl.apply_step(pages).unwrap();
            }
            Op::CommitFault { after, fault } => {
                self.fb.fault_at_sync(after, fault);
                let r = self.commit();
                self.fb.clear_faults();
                match r {
                    Ok(_) => self.committed_ok(),
                    Err(_) => self.settle_failed_commit(),
                }
            }
            Op::CommitWriteFails { after } => {
                self.fb.fail_write(after);
                let r = self.commit();
                self.fb.clear_faults();
                match r {
                    Ok(_) => self.committed_ok(),
                    Err(e) => {
                        assert!(matches!(e, BaselineError::Io { .. }), "{e}");
                        self.settle_failed_commit();
                    }
                }
            }
            Op::ApplyFault { after, fault } => {
                self.fb.fault_at_sync(after, fault);
                let r = self.bl.apply();
                self.fb.clear_faults();
                if r.is_err() {
                    if !self.fb.has_crashed() {
                        assert_refuses_writes(&mut self.bl);
                    }
                    let (b, got) = open_image(self.fb.durable_image());
                    assert_eq!((got, b.info().epoch), (self.committed.clone(), self.epoch));
                    self.restart(self.fb.durable_image());
                }
            }
            Op::Reopen => self.restart(self.fb.live_image()),
        }
    }

    fn check(&self) {
        assert!(!self.bl.is_poisoned());
        assert_eq!(self.bl.info().epoch, self.epoch);
        assert!(load(&self.bl) == self.committed, "the baseline does not load the model");
        let crcs = self.bl.crc_table();
        for p in 0..SIM_PAGES {
            let want = crc32fast::hash(page_of(&self.committed, p));
            assert_eq!((self.bl.page_crc(p).unwrap(), crcs[p as usize]), (want, want), "page {p}");
        }
        let (b, got) = open_image(self.fb.durable_image());
        assert!(got == self.committed, "a crash now would not give the last commit");
        assert_eq!(b.info(), self.bl.info());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn baseline_matches_model_through_faults(ops in proptest::collection::vec(op_strategy(), 1..40)) {
        let mut sim = Sim::new();
        for op in &ops {
            sim.step(op);
            sim.check();
        }
    }
}

// ---------------------------------------------------------------------------
// A crash (or EIO) at every sync.

type Accept<'a> = &'a dyn Fn(&[u8], &CommitInfo) -> Option<&'static str>;

/// Runs `op` on the baseline in `base` with each fault at each of its syncs; the file
/// must then open and load as a state `accept` names (old or new). Returns the names seen.
fn every_sync(
    base: &[u8],
    op: &dyn Fn(&mut Baseline<FaultyBackend>) -> Result<()>,
    accept: Accept,
) -> BTreeSet<&'static str> {
    let fb = FaultyBackend::from_image(base.to_vec());
    let mut bl = Baseline::open(fb.clone()).unwrap();
    let s0 = fb.sync_count();
    op(&mut bl).unwrap();
    let nsyncs = fb.sync_count() - s0;
    assert_eq!(accept(&load(&bl), &bl.info()), Some("new"), "without faults, the op gives the new state");
    let mut seen = BTreeSet::new();
    for k in 0..nsyncs {
        for fault in all_faults() {
            let fb = FaultyBackend::from_image(base.to_vec());
            let mut bl = Baseline::open(fb.clone()).unwrap();
            fb.fault_at_sync(k, fault);
            assert!(op(&mut bl).is_err(), "{fault:?} at sync {k} went unnoticed");
            let mut images = vec![fb.durable_image()];
            if let SyncFault::Eio(_) = fault {
                assert_refuses_writes(&mut bl);
                images.push(fb.live_image());
            }
            for image in images {
                let (mut b, got) = open_image(image);
                let name = accept(&got, &b.info())
                    .unwrap_or_else(|| panic!("{fault:?} at sync {k}: the file holds a mixed state {:?}", b.info()));
                seen.insert(name);
                // The survivor takes further commits.
                let e = b.info().epoch + 1;
                b.commit(e, [(7, &page_bytes(7, 0xEE)[..])]).unwrap();
                b.apply().unwrap();
                let (_, after) = open_image(b.backend().durable_image());
                assert_eq!(page_of(&after, 7), page_bytes(7, 0xEE));
                assert_eq!(page_of(&after, 8), page_of(&got, 8));
            }
        }
    }
    seen
}

/// A 1024-page baseline with data in both the image area and the journal, and its heap.
fn busy_base() -> (Vec<u8>, Vec<u8>) {
    let fb = FaultyBackend::new();
    let mut bl = Baseline::create(fb.clone(), UUID, 1024 * PAGE, 1).unwrap();
    let mut heap = vec![0; 1024 * PAGE_SIZE];
    let first: Vec<u64> = (0..300).collect();
    first.iter().for_each(|&p| set_page(&mut heap, p, 1));
    commit_pages(&mut bl, 1, &heap, &first).unwrap();
    bl.apply().unwrap();
    let second: Vec<u64> = (100..200).chain(500..520).collect();
    second.iter().for_each(|&p| set_page(&mut heap, p, 2));
    commit_pages(&mut bl, 2, &heap, &second).unwrap();
    assert_eq!(load(&bl), heap);
    (fb.durable_image(), heap)
}

#[test]
fn crash_at_every_sync_of_a_multi_segment_commit() {
    let (base, old) = busy_base();
    let mut new = old.clone();
    let pages: Vec<u64> = (50..650).collect(); // 3 segments: 254 + 254 + 92
    pages.iter().for_each(|&p| set_page(&mut new, p, 3));
    let op = |bl: &mut Baseline<FaultyBackend>| commit_pages(bl, 3, &new, &pages).map(drop);
    let accept = |got: &[u8], info: &CommitInfo| match info.epoch {
        2 if got == old => Some("old"),
        3 if got == new => Some("new"),
        _ => None,
    };
    let seen = every_sync(&base, &op, &accept);
    assert_eq!(seen.len(), 2, "both outcomes occur: {seen:?}");
}

#[test]
fn crash_at_every_sync_of_an_empty_commit() {
    let (base, old) = busy_base();
    let op = |bl: &mut Baseline<FaultyBackend>| bl.commit(3, []).map(drop);
    let accept = |got: &[u8], info: &CommitInfo| match info.epoch {
        2 if got == old => Some("old"),
        3 if got == old => Some("new"),
        _ => None,
    };
    assert_eq!(every_sync(&base, &op, &accept).len(), 2);
}

#[test]
fn crash_at_every_sync_of_an_apply() {
    let (base, heap) = busy_base();
    let journal_len = Baseline::open(FaultyBackend::from_image(base.clone())).unwrap().info().journal_len;
    assert!(journal_len > 0);
    let op = |bl: &mut Baseline<FaultyBackend>| bl.apply();
    let accept = |got: &[u8], info: &CommitInfo| match info.journal_len {
        _ if got != heap || info.epoch != 2 => None,
        0 => Some("new"),
        l if l == journal_len => Some("old"),
        _ => None,
    };
    assert_eq!(every_sync(&base, &op, &accept).len(), 2);
}

/// Commits interleaved with a compaction in bounded steps: a crash at any of their syncs
/// leaves the state before the commit or after it, never a mix, and the compaction
/// finishes with the pages committed meanwhile.
#[test]
fn crash_at_every_sync_of_commits_interleaved_with_apply_steps() {
    let (base, old) = busy_base();
    let mut new = old.clone();
    let pages: Vec<u64> = (150..160).chain(600..650).collect();
    pages.iter().for_each(|&p| set_page(&mut new, p, 3));
    let op = |bl: &mut Baseline<FaultyBackend>| {
        assert!(!bl.apply_step(40)?);
        commit_pages(bl, 3, &new, &pages)?;
        let mut steps = 0;
        while !bl.apply_step(40)? {
            steps += 1;
        }
        assert!(steps >= 3 && !bl.is_applying() && bl.info().journal_len == 0);
        Ok(())
    };
    let accept = |got: &[u8], info: &CommitInfo| match info.epoch {
        2 if got == old => Some("old"),
        3 if got == new => Some("new"),
        _ => None,
    };
    assert_eq!(every_sync(&base, &op, &accept).len(), 2);
}

#[test]
fn crash_at_every_sync_of_a_fence() {
    let (base, heap) = busy_base();
    let op = |bl: &mut Baseline<FaultyBackend>| bl.fence(5).map(drop);
    let accept = |got: &[u8], info: &CommitInfo| match info.generation {
        _ if got != heap || info.epoch != 2 => None,
        1 => Some("old"),
        5 => Some("new"),
        _ => None,
    };
    assert_eq!(every_sync(&base, &op, &accept).len(), 2);
}

#[test]
fn crash_at_every_sync_of_create() {
    let mut outcomes = BTreeSet::new();
    for k in 0..2 {
        for fault in all_faults() {
            let fb = FaultyBackend::new();
            fb.fault_at_sync(k, fault);
            assert!(Baseline::create(fb.clone(), UUID, 64 * PAGE, 1).is_err());
            match Baseline::open(FaultyBackend::from_image(fb.durable_image())) {
                Err(BaselineError::NoSuperblock { .. }) => outcomes.insert("none"),
                Ok(bl) => {
                    assert_eq!((load(&bl), bl.info().epoch), (vec![0; 64 * PAGE_SIZE], 0));
                    outcomes.insert("empty")
                }
                Err(e) => panic!("{fault:?} at sync {k}: {e}"),
            };
        }
    }
    assert_eq!(outcomes.len(), 2);
}

// ---------------------------------------------------------------------------
// Poisoning.

#[test]
fn a_failed_sync_poisons_and_the_durable_state_is_the_last_commit() {
    let (base, old) = busy_base();
    let fb = FaultyBackend::from_image(base);
    let mut bl = Baseline::open(fb.clone()).unwrap();
    let mut new = old.clone();
    set_page(&mut new, 9, 9);
    fb.fault_at_sync(0, SyncFault::Eio(Persist::Nothing));
    let e = commit_pages(&mut bl, 3, &new, &[9]).unwrap_err();
    assert!(
        matches!(&e, BaselineError::Io { op, source } if op.contains("syncing the journal") && source.raw_os_error() == Some(libc::EIO)),
        "{e}"
    );
    assert!(bl.is_poisoned());
    assert!(bl.poison_cause().unwrap().contains("syncing the journal segments of epoch 3"));
    let syncs = fb.sync_count();
    match commit_pages(&mut bl, 3, &new, &[9]) {
        Err(BaselineError::Poisoned { cause }) => assert!(cause.contains("Input/output error"), "{cause}"),
        other => panic!("{other:?}"),
    }
    assert_refuses_writes(&mut bl);
    assert_eq!((fb.sync_count(), fb.write_count() > 0), (syncs, true), "no sync retried over the failure");
    assert_eq!(load(&bl), old);
    let (b, got) = open_image(fb.durable_image());
    assert_eq!((got, b.info().epoch), (old, 2));
}

#[test]
fn a_failed_write_poisons() {
    let fb = FaultyBackend::new();
    let mut bl = Baseline::create(fb.clone(), UUID, 64 * PAGE, 1).unwrap();
    fb.fail_write(0);
    assert!(matches!(bl.commit(1, [(0, &page_bytes(0, 1)[..])]), Err(BaselineError::Io { .. })));
    assert!(bl.is_poisoned());
    assert_refuses_writes(&mut bl);
}

#[test]
fn argument_errors_do_not_poison() {
    let fb = FaultyBackend::new();
    let mut bl = Baseline::create(fb.clone(), UUID, 64 * PAGE, 1).unwrap();
    let p = page_bytes(1, 1);
    let many: Vec<(u64, &[u8])> = (0..300).map(|i| (i % 64, &p[..])).chain([(64, &p[..])]).collect();
    assert!(matches!(bl.commit(1, many), Err(BaselineError::PageOutOfRange { page: 64, npages: 64 })));
    assert!(matches!(bl.commit(1, [(3, &p[..100])]), Err(BaselineError::SizeMismatch { found: 100, .. })));
    bl.commit(2, [(1, &p[..])]).unwrap();
    assert!(matches!(bl.commit(2, []), Err(BaselineError::EpochOrder { last: 2, given: 2 })));
    assert!(matches!(bl.load_into(&mut [0; 10]), Err(BaselineError::SizeMismatch { .. })));
    assert!(matches!(bl.load_into_zeroed(&mut [0; 10]), Err(BaselineError::SizeMismatch { .. })));
    assert!(matches!(bl.page_crc(64), Err(BaselineError::PageOutOfRange { .. })));
    assert!(!bl.is_poisoned());
    let (_, got) = open_image(fb.durable_image());
    assert_eq!(page_of(&got, 1), p);
    assert!(page_of(&got, 0).iter().all(|&b| b == 0), "the failed commit's segment is not committed");
    let mut one = vec![0; PAGE_SIZE];
    bl.read_page(1, &mut one).unwrap();
    assert_eq!(one, p);
    assert!(matches!(
        Baseline::create(FaultyBackend::from_image(vec![1]), UUID, 64 * PAGE, 1),
        Err(BaselineError::NotEmpty { len: 1 })
    ));
    assert!(matches!(Baseline::create(FaultyBackend::new(), UUID, 100, 1), Err(BaselineError::BadHeapSize(100))));
    assert!(bl.check_heap(UUID, 64 * PAGE).is_ok());
    assert!(matches!(bl.check_heap([0; 16], 64 * PAGE), Err(BaselineError::WrongHeap { .. })));
}

// ---------------------------------------------------------------------------
// Damage is detected, byte by byte.

/// A small baseline: pages 1..=3 applied to the image (epoch 1), pages 2 and 5 in the
/// journal (epoch 2). Superblocks: seq 1 create (slot 1), 2 commit, 3 and 4 apply
/// (the copy, then the empty journal; slot 0), 5 commit (slot 1).
fn small() -> (FaultyBackend, Vec<u8>, Vec<u8>) {
    let fb = FaultyBackend::new();
    let mut bl = Baseline::create(fb.clone(), UUID, 64 * PAGE, 1).unwrap();
    let mut heap = vec![0; 64 * PAGE_SIZE];
    (1..=3).for_each(|p| set_page(&mut heap, p, 1));
    commit_pages(&mut bl, 1, &heap, &[1, 2, 3]).unwrap();
    bl.apply().unwrap();
    let after_apply = heap.clone();
    set_page(&mut heap, 2, 2);
    set_page(&mut heap, 5, 2);
    commit_pages(&mut bl, 2, &heap, &[2, 5]).unwrap();
    assert_eq!(bl.info().seq, 5);
    (fb, after_apply, heap)
}

fn damaged(fb: &FaultyBackend, off: u64, xor: u8) -> FaultyBackend {
    let mut img = fb.durable_image();
    img[off as usize] ^= xor;
    FaultyBackend::from_image(img)
}

#[test]
fn a_damaged_newest_superblock_falls_back_to_the_older_intact_state() {
    let (fb, older, _) = small();
    for i in 0..sb::LEN as u64 {
        let bl = Baseline::open(damaged(&fb, SLOT_SIZE + i, 0x20)).unwrap_or_else(|e| panic!("byte {i}: {e}"));
        assert_eq!((bl.info().seq, bl.info().epoch), (4, 1), "byte {i}");
        assert_eq!(load(&bl), older);
    }
    // Right after an apply, the older slot still describes the applied journal.
    let mut bl = Baseline::open(fb.clone()).unwrap();
    bl.apply().unwrap();
    let newest = bl.info().seq;
    for i in [sb::SEQ, sb::JOURNAL_LEN, sb::CRC] {
        let b = Baseline::open(damaged(&fb, (newest % 2) * SLOT_SIZE + i as u64, 1)).unwrap();
        assert_eq!((b.info().seq, b.info().journal_pages), (newest - 1, 2));
        assert_eq!(load(&b), load(&bl));
    }
    let both = damaged(&damaged(&fb, 3, 1), SLOT_SIZE + 3, 1);
    match Baseline::open(both) {
        Err(e @ BaselineError::NoSuperblock { .. }) => assert!(e.to_string().contains("bad magic"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(Baseline::open(FaultyBackend::from_image(vec![0; 100])), Err(BaselineError::NoSuperblock { .. })));
}

#[test]
fn a_damaged_newest_slot_after_a_crash_in_apply_still_gives_a_consistent_state() {
    let (fb, epoch1, heap) = small();
    for k in 0..3 {
        let img = FaultyBackend::from_image(fb.durable_image());
        let mut bl = Baseline::open(img.clone()).unwrap();
        img.fault_at_sync(k, SyncFault::Crash(Persist::Nothing));
        assert!(bl.apply().is_err());
        let durable = FaultyBackend::from_image(img.durable_image());
        let newest = Baseline::open(durable.clone()).unwrap().info().seq;
        // Whichever slot survives describes a whole state (epoch 2's, or epoch 1's before
        // the image area changed), never epoch 1's label on a partly applied image.
        let b = Baseline::open(damaged(&durable, (newest % 2) * SLOT_SIZE + sb::SEQ as u64, 1)).unwrap();
        let (got, epoch) = (load(&b), b.info().epoch);
        assert!(
            (epoch == 2 && got == heap) || (epoch == 1 && got == epoch1),
            "crash at sync {k} of apply, newest slot damaged: a mixed state labelled epoch {epoch}"
        );
        if k > 0 {
            assert_eq!(epoch, 2, "once the image area may have changed, both slots describe epoch 2");
        }
    }
}

#[test]
fn a_newer_format_version_is_refused_not_skipped() {
    let (fb, _, _) = small();
    let mut img = fb.durable_image();
    img[sb::VERSION] = 2;
    let crc = crc32fast::hash(&img[..sb::CRC]);
    img[sb::CRC..sb::CRC + 4].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(
        Baseline::open(FaultyBackend::from_image(img)),
        Err(BaselineError::Version { found: 2, supported: 1 })
    ));
}

#[test]
fn damaged_segment_headers_are_corrupt() {
    let (fb, _, _) = small();
    let j = Baseline::open(fb.clone()).unwrap().layout().journal_off;
    // The committed journal: epoch 2's segment of two pages.
    for i in 0..(32 + 2 * 16) as u64 {
        match Baseline::open(damaged(&fb, j + i, 0x02)) {
            Err(BaselineError::Corrupt { what }) => {
                assert!(what.contains("journal segment at journal offset 0"), "{what}")
            }
            other => panic!("byte {i} of the segment header: {other:?}"),
        }
    }
}

#[test]
fn damaged_pages_and_table_entries_name_the_page() {
    let (fb, _, heap) = small();
    let bl = Baseline::open(fb.clone()).unwrap();
    let l = bl.layout();
    let j = l.journal_off;
    // Journal copy of page 5 (second page after the header).
    let b = Baseline::open(damaged(&fb, j + 2 * PAGE + 100, 1)).unwrap();
    let e = load_err(&b);
    assert!(matches!(e, BaselineError::PageCrc { page: 5, source_area: PageSource::Journal, .. }), "{e}");
    assert!(e.to_string().contains("page 5 read from the journal"), "{e}");
    assert!(matches!(b.read_page(5, &mut [0; PAGE_SIZE]), Err(BaselineError::PageCrc { page: 5, .. })));
    let mut b = b;
    assert!(matches!(b.apply(), Err(BaselineError::PageCrc { page: 5, .. })));
    assert!(!b.is_poisoned());
    // Image copy of page 1.
    let b = Baseline::open(damaged(&fb, l.image_page(1) + 7, 1)).unwrap();
    let e = load_err(&b);
    assert!(matches!(e, BaselineError::PageCrc { page: 1, source_area: PageSource::Image, .. }), "{e}");
    // A never-written page of the image area.
    let b = Baseline::open(damaged(&fb, l.image_page(40), 1)).unwrap();
    assert!(matches!(load_err(&b), BaselineError::PageCrc { page: 40, .. }));
    // The table entry of page 3.
    let b = Baseline::open(damaged(&fb, TABLE_OFF + 4 * 3, 1)).unwrap();
    assert!(matches!(load_err(&b), BaselineError::PageCrc { page: 3, source_area: PageSource::Image, .. }));
    // The table entry of a hole (page 40, never written): the zeroed load does not read
    // the hole, and still reports the mismatch, as the full load does after reading zeros.
    let b = Baseline::open(damaged(&fb, TABLE_OFF + 4 * 40, 1)).unwrap();
    let e = load_err(&b);
    let (off, zero) = (l.image_page(40), format::zero_page_crc());
    match e {
        BaselineError::PageCrc { page: 40, source_area: PageSource::Image, offset, expected, found } => {
            assert_eq!((offset, expected, found), (off, zero ^ 1, zero))
        }
        e => panic!("{e}"),
    }
    // The table entries of page 2 (applied, then in the journal) and page 5 (a hole in
    // the image, in the journal) are overridden by the journal: not read.
    for p in [2, 5] {
        let b = Baseline::open(damaged(&fb, TABLE_OFF + 4 * p, 1)).unwrap();
        assert_eq!(load(&b), heap);
    }
}

/// A backend that cannot tell holes (the default `data_ranges`).
struct NoHoles<B>(B);

impl<B: Backend> Backend for NoHoles<B> {
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_at(off, buf)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> std::io::Result<()> {
        self.0.write_at(off, buf)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
}

/// A backend whose `data_ranges` are unsorted, overlapping, unaligned and out of bounds
/// (over-approximating the inner backend's): the loader must cope.
struct MessyRanges<B>(B);

impl<B: Backend> Backend for MessyRanges<B> {
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_at(off, buf)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> std::io::Result<()> {
        self.0.write_at(off, buf)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
    fn data_ranges(&self, off: u64, len: u64) -> std::io::Result<Option<Vec<(u64, u64)>>> {
        let Some(mut r) = self.0.data_ranges(off, len)? else { return Ok(None) };
        let widened: Vec<(u64, u64)> = r.iter().map(|&(s, e)| (s.saturating_sub(100), e + 3)).collect();
        r.extend(widened);
        r.push((0, 1));
        r.push((off + len + 10, u64::MAX));
        r.push((off + 5, off + 5));
        r.reverse();
        Ok(Some(r))
    }
}

#[test]
fn zeroed_loads_skip_holes_and_zero_pages() {
    let (fb, _, mut heap) = small();
    let mut bl = Baseline::open(fb.clone()).unwrap();
    // Page 3 becomes a written page of zeros (data in the image after apply), page 1
    // a zero page in the journal.
    heap[3 * PAGE_SIZE..4 * PAGE_SIZE].fill(0);
    bl.commit(3, [(3, page_of(&heap, 3))]).unwrap();
    bl.apply().unwrap();
    heap[PAGE_SIZE..2 * PAGE_SIZE].fill(0);
    bl.commit(4, [(1, page_of(&heap, 1))]).unwrap();
    let info = bl.info();
    let image = fb.durable_image();
    let full = load(&bl);
    assert_eq!(full, heap);
    let l = bl.layout();
    // The zeroed load writes only non-zero pages: over garbage, the rest stays garbage.
    // Image data: pages 1 (stale: in the journal), 2, 3 (zeros) and 5. The faulty
    // backend reports zero sectors as holes (page 3 too); the messy one widens every
    // range into the neighbouring pages (0..7); without holes, all 64 pages are read.
    // Expected: (hole pages, zero pages not written, pages read incl. 1 journal page).
    let n = l.npages;
    type Counts = (u64, u64, u64);
    let cases: [(Arc<dyn Backend>, Counts); 3] = [
        (Arc::new(FaultyBackend::from_image(image.clone())), (n - 3, 1, 4)),
        (Arc::new(MessyRanges(FaultyBackend::from_image(image.clone()))), (n - 7, 5, 8)),
        (Arc::new(NoHoles(FaultyBackend::from_image(image.clone()))), (0, n - 2, n + 1)),
    ];
    for (backend, (holes, zeros, pages_read)) in cases {
        let b = Baseline::open(backend).unwrap();
        assert_eq!(b.info(), info);
        let mut z = vec![0xA5; heap.len()];
        let r = b.load_into_zeroed(&mut z).unwrap();
        for p in 0..n {
            let want = page_of(&heap, p);
            let got = page_of(&z, p);
            if want.iter().any(|&x| x != 0) {
                assert_eq!(got, want, "page {p}");
            } else {
                assert!(got.iter().all(|&x| x == 0xA5), "page {p}, all zero, was written");
            }
        }
        assert_eq!((r.hole_pages, r.zero_pages, r.bytes_read / PAGE, r.from_journal), (holes, zeros, pages_read, 1));
        let mut zeroed = vec![0; heap.len()];
        b.load_into_zeroed(&mut zeroed).unwrap();
        assert!(zeroed == heap);
    }
}

#[test]
fn lengths_read_back_are_checked() {
    let (fb, _, _) = small();
    let l = Baseline::open(fb.clone()).unwrap().layout();
    let mut img = fb.durable_image();
    img.truncate((l.journal_off + PAGE) as usize);
    match Baseline::open(FaultyBackend::from_image(img)) {
        Err(BaselineError::Corrupt { what }) => assert!(what.contains("bytes of committed journal"), "{what}"),
        other => panic!("{other:?}"),
    }
    // A superblock (valid CRC) whose journal_len ends inside a segment.
    let reseal = |s: Superblock| {
        let mut img = fb.durable_image();
        let off = (s.slot() * SLOT_SIZE) as usize;
        img[off..off + SLOT_SIZE as usize].copy_from_slice(&s.encode());
        FaultyBackend::from_image(img)
    };
    let bl = Baseline::open(fb.clone()).unwrap();
    let img = fb.durable_image();
    let cur = Superblock::decode(&img[SLOT_SIZE as usize..2 * SLOT_SIZE as usize]).unwrap();
    assert_eq!(cur.seq, bl.info().seq);
    let short = Superblock { seq: cur.seq + 2, journal_len: 2 * PAGE, ..cur };
    assert!(matches!(Baseline::open(reseal(short)), Err(BaselineError::Corrupt { .. })));
    // A superblock that claims the journal of before the last apply: stale segments.
    let stale = Superblock { seq: cur.seq + 1, journal_base_seq: cur.seq, ..cur };
    match Baseline::open(reseal(stale)) {
        Err(BaselineError::Corrupt { what }) => assert!(what.contains("stale"), "{what}"),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Fencing.

/// The lazy recovery's fence: written and read back without a sync; the
/// old writer is fenced at once; it reaches the storage with the next sync
/// (here the fencing writer's own first commit), and a clone made without
/// reading serves the same committed pages.
#[test]
fn an_unsynced_fence_stops_the_old_writer_and_is_made_durable_by_the_next_commit() {
    let fb = FaultyBackend::new();
    let mut old = Baseline::create(fb.clone(), UUID, 64 * PAGE, 1).unwrap();
    let mut heap = vec![0; 64 * PAGE_SIZE];
    set_page(&mut heap, 4, 4);
    commit_pages(&mut old, 1, &heap, &[4]).unwrap();
    let mut failover = Baseline::open(fb.clone()).unwrap();
    let durable_before = fb.durable_image();
    let info = failover.fence_unsynced(2).unwrap();
    assert_eq!(info.generation, 2);
    assert_eq!(fb.durable_image(), durable_before, "not synced yet");
    let mut later = heap.clone();
    set_page(&mut later, 6, 6);
    assert!(matches!(commit_pages(&mut old, 2, &later, &[6]), Err(BaselineError::Fenced { ours: 1, found: 2 })));
    let reader = failover.try_clone().unwrap();
    assert_eq!(load(&reader), heap);
    assert_eq!(reader.info().generation, 2);
    commit_pages(&mut failover, 2, &later, &[6]).unwrap();
    let (b, got) = open_image(fb.durable_image());
    assert_eq!(got, later);
    assert_eq!(b.info().generation, 2);
}

#[test]
fn fencing_stops_the_old_writer() {
    let fb = FaultyBackend::new();
    let mut old = Baseline::create(fb.clone(), UUID, 64 * PAGE, 1).unwrap();
    let mut failover = Baseline::open(fb.clone()).unwrap();
    let mut heap = vec![0; 64 * PAGE_SIZE];
    set_page(&mut heap, 4, 4);
    commit_pages(&mut old, 1, &heap, &[4]).unwrap();
    // The failover host opened before that commit; fencing adopts it.
    let info = failover.fence(2).unwrap();
    assert_eq!((info.generation, info.epoch, info.seq), (2, 1, 3));
    assert_eq!(load(&failover), heap);
    let mut later = heap.clone();
    set_page(&mut later, 6, 6);
    match commit_pages(&mut old, 2, &later, &[6]) {
        Err(e @ BaselineError::Fenced { ours: 1, found: 2 }) => assert!(e.to_string().contains("taken the heap over")),
        other => panic!("{other:?}"),
    }
    assert!(matches!(old.apply(), Err(BaselineError::Fenced { ours: 1, found: 2 })));
    assert!(matches!(old.check_fence(), Err(BaselineError::Fenced { .. })));
    assert!(!old.is_poisoned());
    assert!(matches!(old.fence(2), Err(BaselineError::StaleGeneration { requested: 2, current: 2 })));
    assert!(matches!(failover.fence(2), Err(BaselineError::StaleGeneration { .. })));
    let (b, got) = open_image(fb.durable_image());
    assert_eq!((got, b.info().generation), (heap, 2));
    commit_pages(&mut failover, 2, &later, &[6]).unwrap();
    failover.apply().unwrap();
    assert_eq!(failover.check_fence().unwrap().epoch, 2);
    assert_eq!(open_image(fb.durable_image()).1, later);
}

#[test]
fn a_second_writer_with_the_same_generation_is_detected() {
    let fb = FaultyBackend::new();
    let mut a = Baseline::create(fb.clone(), UUID, 64 * PAGE, 1).unwrap();
    let mut b = Baseline::open(fb.clone()).unwrap();
    a.commit(1, [(1, &page_bytes(1, 1)[..])]).unwrap();
    assert!(matches!(b.commit(1, []), Err(BaselineError::Diverged { ours_seq: 1, found_seq: 2, .. })));
}

/// A backend that runs a hook once, before the `n`-th write or after the `n`-th sync
/// (counted from when it is armed): a second host acting in the middle of a commit.
struct Hooked {
    inner: FaultyBackend,
    hook: Mutex<Option<Hook>>,
}

type Hook = (Trigger, Box<dyn FnOnce() + Send>);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Trigger {
    BeforeWrite(u64),
    AfterSync(u64),
}

impl Hooked {
    fn arm(&self, t: Trigger, f: impl FnOnce() + Send + 'static) {
        let t = match t {
            Trigger::BeforeWrite(n) => Trigger::BeforeWrite(self.inner.write_count() + n),
            Trigger::AfterSync(n) => Trigger::AfterSync(self.inner.sync_count() + n),
        };
        *self.hook.lock() = Some((t, Box::new(f)));
    }

    fn fire(&self, now: Trigger) {
        let mut h = self.hook.lock();
        if h.as_ref().is_some_and(|(t, _)| *t == now) {
            let (_, f) = h.take().unwrap();
            drop(h);
            f();
        }
    }
}

impl Backend for Hooked {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_at(off, buf)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> std::io::Result<()> {
        self.fire(Trigger::BeforeWrite(self.inner.write_count()));
        self.inner.write_at(off, buf)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        let r = self.inner.sync_data();
        self.fire(Trigger::AfterSync(self.inner.sync_count() - 1));
        r
    }
}

/// The old writer (generation 1) with one commit done, a failover host, and the heaps
/// before and after the old writer's next commit.
struct Race {
    hooked: Arc<Hooked>,
    old: Baseline<Arc<Hooked>>,
    failover: Arc<Mutex<Baseline<FaultyBackend>>>,
    before: Vec<u8>,
    after: Vec<u8>,
}

fn race_setup() -> Race {
    let fb = FaultyBackend::new();
    let hooked = Arc::new(Hooked { inner: fb.clone(), hook: Mutex::new(None) });
    let mut old = Baseline::create(hooked.clone(), UUID, 64 * PAGE, 1).unwrap();
    let mut before = vec![0; 64 * PAGE_SIZE];
    set_page(&mut before, 1, 1);
    old.commit(1, [(1, page_of(&before, 1))]).unwrap();
    let failover = Arc::new(Mutex::new(Baseline::open(fb).unwrap()));
    let mut after = before.clone();
    set_page(&mut after, 2, 2);
    Race { hooked, old, failover, before, after }
}

#[test]
fn a_fence_before_the_old_writers_superblock_stops_its_commit() {
    let Race { hooked, mut old, failover, before, after } = race_setup();
    let f = failover.clone();
    // Between the old writer's first check and its segment write.
    hooked.arm(Trigger::BeforeWrite(0), move || {
        f.lock().fence(2).unwrap();
    });
    assert!(matches!(old.commit(2, [(2, page_of(&after, 2))]), Err(BaselineError::Fenced { ours: 1, found: 2 })));
    assert_eq!(old.info().epoch, 1);
    let (b, got) = open_image(hooked.inner.durable_image());
    assert_eq!((got, b.info().generation), (before, 2));
}

#[test]
fn a_fence_after_the_old_writers_superblock_makes_its_commit_unacknowledged() {
    let Race { hooked, mut old, failover, after, .. } = race_setup();
    let f = failover.clone();
    // After the old writer's superblock sync (its second sync), before its confirming read.
    hooked.arm(Trigger::AfterSync(1), move || {
        f.lock().fence(2).unwrap();
    });
    assert!(matches!(old.commit(2, [(2, page_of(&after, 2))]), Err(BaselineError::Fenced { ours: 1, found: 2 })));
    assert_eq!(old.info().epoch, 1, "not acknowledged");
    // ... but durable: the fence adopted it.
    assert_eq!(load(&failover.lock()), after);
    assert_eq!(open_image(hooked.inner.durable_image()).1, after);
}

#[test]
fn a_fence_overwritten_by_a_racing_commit_is_noticed_by_the_failover_host() {
    let Race { hooked, mut old, failover, after, .. } = race_setup();
    let f = failover.clone();
    // The documented window: the fence lands between the old writer's last check and its
    // superblock write (the old writer's third write: segment, then superblock).
    hooked.arm(Trigger::BeforeWrite(1), move || {
        f.lock().fence(2).unwrap();
    });
    old.commit(2, [(2, page_of(&after, 2))]).unwrap();
    let mut failover = failover.lock();
    assert!(matches!(
        failover.check_fence(),
        Err(BaselineError::Diverged { ours_generation: 2, found_generation: 1, .. })
    ));
    assert!(matches!(failover.commit(2, []), Err(BaselineError::Diverged { .. })));
    // Fencing again adopts the racing commit and stops the old writer for good.
    failover.fence(3).unwrap();
    assert_eq!(load(&failover), after);
    assert!(matches!(old.commit(3, []), Err(BaselineError::Fenced { ours: 1, found: 3 })));
}

// ---------------------------------------------------------------------------
// The file backend.

fn scratch_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("remem-baseline-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn file_backend_round_trip() {
    let dir = scratch_dir("file");
    let path = dir.join("heap.baseline");
    let mut heap = vec![0; 300 * PAGE_SIZE];
    {
        let mut bl = Baseline::create(FileBackend::create(&path).unwrap(), UUID, 300 * PAGE, 7).unwrap();
        let pages: Vec<u64> = (0..300).step_by(2).collect();
        pages.iter().for_each(|&p| set_page(&mut heap, p, 1));
        bl.commit(1, pages.iter().map(|&p| (p, page_of(&heap, p)))).unwrap();
        bl.apply().unwrap();
        set_page(&mut heap, 299, 2);
        bl.commit(2, [(299, page_of(&heap, 299))]).unwrap();
    }
    assert_eq!(FileBackend::create(&path).unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);
    let bl = Baseline::open(FileBackend::open(&path).unwrap()).unwrap();
    assert_eq!((bl.info().epoch, bl.info().generation, bl.info().journal_pages), (2, 7, 1));
    assert_eq!(load(&bl), heap);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn file_backend_reports_holes() {
    let dir = scratch_dir("holes");
    let path = dir.join("sparse");
    let fb = FileBackend::create(&path).unwrap();
    fb.set_len(4 << 20).unwrap();
    fb.write_at(1 << 20, &[1; 8192]).unwrap();
    let r = fb.data_ranges(0, 4 << 20).unwrap();
    assert_eq!(fb.data_ranges(8 << 20, 4096).unwrap().map(|v| v.is_empty()), r.as_ref().map(|_| true), "past the end");
    match r {
        None => eprintln!("file_backend_reports_holes: the filesystem cannot report holes (lseek SEEK_DATA)"),
        Some(r) => {
            assert!(r.windows(2).all(|w| w[0].1 < w[1].0) && r.iter().all(|&(s, e)| s < e && e <= 4 << 20), "{r:?}");
            let covered = |o: u64| r.iter().any(|&(s, e)| s <= o && o < e);
            assert!(covered(1 << 20) && covered((1 << 20) + 8191), "{r:?}");
            if r.len() == 1 && r[0] == (0, 4 << 20) {
                eprintln!("file_backend_reports_holes: the filesystem reports no holes");
            } else {
                assert!(!covered(0) && !covered((4 << 20) - 1), "{r:?}");
            }
            // A window inside the data, and one inside a hole.
            assert_eq!(fb.data_ranges((1 << 20) + 100, 200).unwrap(), Some(vec![((1 << 20) + 100, (1 << 20) + 300)]));
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A sparse baseline file: the zeroed load (holes skipped) gives exactly what the full
/// load gives, and a hole whose table CRC is not a zero page's is corruption.
#[test]
fn sparse_file_loads_match_full_loads() {
    let dir = scratch_dir("sparse-load");
    let path = dir.join("heap.baseline");
    let npages = 16384; // 64 MiB: several 1 MiB runs and holes between them
    let mut heap = vec![0; npages * PAGE_SIZE];
    {
        let mut bl = Baseline::create(FileBackend::create(&path).unwrap(), UUID, npages as u64 * PAGE, 1).unwrap();
        let first: Vec<u64> = (0..700).chain([1000, 1002, 5000]).chain(9000..9600).chain([16383]).collect();
        first.iter().for_each(|&p| set_page(&mut heap, p, 1));
        heap[1002 * PAGE_SIZE..1003 * PAGE_SIZE].fill(0); // a written page of zeros
        bl.commit(1, first.iter().map(|&p| (p, page_of(&heap, p)))).unwrap();
        bl.apply().unwrap();
        // The journal: over data, over holes, and a zero page over data.
        let second: Vec<u64> = (650..760).chain([3000, 9001]).collect();
        second.iter().for_each(|&p| set_page(&mut heap, p, 2));
        heap[9001 * PAGE_SIZE..9002 * PAGE_SIZE].fill(0);
        bl.commit(2, second.iter().map(|&p| (p, page_of(&heap, p)))).unwrap();
    }
    let bl = Baseline::open(FileBackend::open(&path).unwrap()).unwrap();
    assert_eq!(load(&bl), heap);
    let mut z = vec![0; heap.len()];
    let r = bl.load_into_zeroed(&mut z).unwrap();
    assert!(z == heap);
    assert_eq!(r.from_journal, 112);
    let l = bl.layout();
    let sparse = bl.backend().data_ranges(l.image_off, l.journal_off - l.image_off).unwrap();
    if sparse.as_ref().is_some_and(|v| v.iter().map(|&(s, e)| e - s).sum::<u64>() < l.journal_off - l.image_off) {
        assert!(r.hole_pages > 10000 && r.bytes_read < 8 << 20, "{r:?}");
    } else {
        eprintln!("sparse_file_loads_match_full_loads: the filesystem reports no holes: {r:?}");
    }
    drop(bl);
    // A hole's table entry (page 12000) damaged: corruption, without reading the hole.
    let f = FileBackend::open(&path).unwrap();
    let zero = format::zero_page_crc();
    f.write_at(TABLE_OFF + 4 * 12000, &(zero ^ 0x10).to_le_bytes()).unwrap();
    let b = Baseline::open(f).unwrap();
    match load_err(&b) {
        BaselineError::PageCrc { page: 12000, source_area: PageSource::Image, offset, expected, found } => {
            assert_eq!((offset, expected, found), (l.image_page(12000), zero ^ 0x10, zero))
        }
        e => panic!("{e}"),
    }
    // Restored, and a byte of a data page flipped instead.
    let f = b.into_backend();
    f.write_at(TABLE_OFF + 4 * 12000, &zero.to_le_bytes()).unwrap();
    f.write_at(l.image_page(9500) + 17, &[0xFF]).unwrap();
    let b = Baseline::open(f).unwrap();
    assert!(matches!(load_err(&b), BaselineError::PageCrc { page: 9500, source_area: PageSource::Image, .. }));
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------
// Benchmark (ignored): committing a fraction of a heap's pages vs. pwrite + fdatasync.

/// `REMEM_BENCH_DIR` (default: the temp dir), `REMEM_BENCH_MIB` (256), `REMEM_BENCH_PCT` (10),
/// `REMEM_BENCH_ROUNDS` (5).
#[test]
#[ignore = "benchmark: cargo test --release -p remem-alloc baseline::tests::flush_benchmark -- --ignored --nocapture"]
fn flush_benchmark() {
    use std::os::unix::fs::FileExt;
    use std::time::Instant;
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let dir = std::env::var_os("REMEM_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = dir.join(format!("remem-baseline-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (mib, pct, rounds) = (env("REMEM_BENCH_MIB", 256), env("REMEM_BENCH_PCT", 10), env("REMEM_BENCH_ROUNDS", 5));
    let npages = mib * 256;
    let mut rng = 0x1234_5678_9abc_def1u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut heap: Vec<u8> = (0..npages * PAGE).map(|i| (i.wrapping_mul(0x9e37_79b9) >> 24) as u8).collect();
    let mut pages: Vec<u64> = (0..npages).filter(|_| next() % 100 < pct).collect();
    pages.sort_unstable();
    let bytes = pages.len() as u64 * PAGE;
    let mb = |secs: f64| bytes as f64 / secs / 1e6;
    let touch = |heap: &mut Vec<u8>, round: u64| {
        for &p in &pages {
            heap[(p * PAGE) as usize] = round as u8;
        }
    };

    let peer_path = dir.join("peer.img");
    let peer = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&peer_path).unwrap();
    peer.write_all_at(&heap, 0).unwrap();
    peer.sync_data().unwrap();
    // The ceiling of a journal: the same bytes as one sequential stream of 1 MiB writes.
    let seq_path = dir.join("sequential.img");
    let seq = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&seq_path).unwrap();
    seq.write_all_at(&vec![1; bytes as usize], 0).unwrap();
    seq.sync_data().unwrap();
    let mut stream = vec![0u8; 1 << 20];
    let path = dir.join("heap.baseline");
    let mut bl = Baseline::create(FileBackend::create(&path).unwrap(), UUID, npages * PAGE, 1).unwrap();
    let t = Instant::now();
    bl.commit(1, pages.iter().map(|&p| (p, page_of(&heap, p)))).unwrap();
    let first = t.elapsed().as_secs_f64();
    let t = Instant::now();
    bl.apply().unwrap();
    let apply = t.elapsed().as_secs_f64();
    println!(
        "{} of {} pages ({pct} %, {:.1} MB) of a {mib} MiB heap; first commit (file grows) {:.1} ms = {:.0} MB/s; \
         apply {:.1} ms",
        pages.len(),
        npages,
        bytes as f64 / 1e6,
        first * 1e3,
        mb(first),
        apply * 1e3
    );
    let (mut ours, mut theirs, mut sequential) = (Vec::new(), Vec::new(), Vec::new());
    for round in 2..2 + rounds {
        touch(&mut heap, round);
        let t = Instant::now();
        for &p in &pages {
            peer.write_all_at(page_of(&heap, p), p * PAGE).unwrap();
        }
        peer.sync_data().unwrap();
        theirs.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        for (i, group) in pages.chunks(256).enumerate() {
            for (k, &p) in group.iter().enumerate() {
                stream[k * PAGE_SIZE..(k + 1) * PAGE_SIZE].copy_from_slice(page_of(&heap, p));
            }
            seq.write_all_at(&stream[..group.len() * PAGE_SIZE], (i << 20) as u64).unwrap();
        }
        seq.sync_data().unwrap();
        sequential.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        bl.commit(round, pages.iter().map(|&p| (p, page_of(&heap, p)))).unwrap();
        ours.push(t.elapsed().as_secs_f64());
        bl.apply().unwrap();
    }
    let ms = |v: &[f64]| v.iter().map(|s| (s * 1e4).round() / 10.0).collect::<Vec<_>>();
    println!("  baseline commits (ms):          {:?}", ms(&ours));
    println!("  pwrite per page + fdatasync:    {:?}", ms(&theirs));
    println!("  sequential 1 MiB pwrites + sync: {:?}", ms(&sequential));
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (o, p, q) = (median(&mut ours), median(&mut theirs), median(&mut sequential));
    println!(
        "steady state, median of {rounds}: baseline commit {:.1} ms = {:.0} MB/s; pwrite per page in place + \
         fdatasync {:.1} ms = {:.0} MB/s (baseline/peer throughput {:.2}); same bytes as one sequential stream + \
         fdatasync {:.1} ms = {:.0} MB/s ({:.2})",
        o * 1e3,
        mb(o),
        p * 1e3,
        mb(p),
        p / o,
        q * 1e3,
        mb(q),
        q / o
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
