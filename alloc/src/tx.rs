//! Undo-log transactions, in the spirit of PMDK's `TX_BEGIN`.
//!
//! A transaction belongs to a thread (it uses the thread's lane). Before a
//! range is modified, [`Tx::add_range`] copies its old contents into the
//! lane's undo log in the heap; [`Tx::alloc`] allocates blocks that are
//! released if the transaction does not commit; [`Tx::free`] frees blocks
//! only when it commits. Nested transactions flatten into the outermost.
//!
//! # Crash consistency
//!
//! The lane's `TX_STATE` word is the commit point:
//! - begin: bump `TX_SEQ`, reset the first log block, store `TX_ACTIVE`;
//! - each record is written, then published by storing the block's `USED`;
//! - commit without frees: store `TX_NONE`. With frees: store
//!   `TX_COMMITTING`, release each freed block, store `TX_NONE`.
//!
//! Recovery rolls an `ACTIVE` transaction back (undo records applied newest
//! first, its allocations released) and finishes a `COMMITTING` one. A
//! block is released either into the lane's cache and then its record
//! marked done, or (when it would become visible to other threads) its
//! record marked done first; a crash in that window leaks that one block,
//! which the transaction held anyway.

use std::collections::HashSet;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use crate::error::{AllocError, PointerError};
use crate::format::{lane, log};
use crate::lanes::ThreadLanes;
use crate::meta::{Located, Meta};
use crate::Heap;

/// Why a transaction operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TxError {
    /// The call needs a running transaction on this thread and there is none
    /// (never begun, already committed or aborted, or begun on another thread).
    #[error(
        "no transaction is running on this thread (begin one first; transactions belong to the thread that began them)"
    )]
    NoTransaction,
    /// The transaction was aborted (by `abort` or an inner failure); only
    /// ending it is possible.
    #[error("the transaction was aborted and rolled back")]
    Aborted,
    /// Every private lane is taken by other threads.
    #[error("no private lane is free for this thread: at most {0} threads can run transactions at once")]
    NoLane(u32),
    /// The range is not inside one allocated block of the heap.
    #[error("range {ptr:#x}+{len} is not inside one allocated block of this heap")]
    OutOfHeap {
        /// Start of the range.
        ptr: usize,
        /// Its length.
        len: usize,
    },
    /// The undo log could not grow: the heap is full. The transaction was rolled back.
    #[error("the undo log could not grow ({0}); the transaction was rolled back")]
    LogFull(AllocError),
    /// An allocation inside the transaction failed.
    #[error(transparent)]
    Alloc(AllocError),
    /// A pointer given to `free` was refused.
    #[error(transparent)]
    Pointer(#[from] PointerError),
    /// This process is a fork of the one that opened the heap (see
    /// [`crate::fork`]); nothing was changed.
    #[error(transparent)]
    Forked(#[from] crate::fork::Forked),
}

impl From<AllocError> for TxError {
    fn from(e: AllocError) -> TxError {
        match e {
            AllocError::Forked(f) => TxError::Forked(f),
            e => TxError::Alloc(e),
        }
    }
}

/// The volatile part of a lane's transaction.
#[derive(Debug, Default)]
pub(crate) struct TxVolatile {
    /// Nesting depth (0: none).
    depth: u32,
    aborted: bool,
    /// Current log block and bytes used in it.
    block: usize,
    used: usize,
    seq: u64,
    /// Blocks this transaction frees at commit.
    freed: HashSet<usize>,
    has_frees: bool,
    /// Ranges already logged (small, for the common repeated add_range).
    logged: Vec<(usize, usize)>,
}

/// A running transaction; see [`Heap::tx`]. Not `Send`: it belongs to the
/// thread that began it.
#[derive(Debug)]
pub struct Tx<'h> {
    heap: &'h Heap,
    lane: u32,
    _thread_bound: PhantomData<*const ()>,
}

impl Tx<'_> {
    /// Logs `len` bytes at `ptr` (inside one allocated block) so that they
    /// are restored if the transaction does not commit. Call it before
    /// modifying them.
    pub fn add_range(&self, ptr: *const u8, len: usize) -> Result<(), TxError> {
        self.heap.tx_add_range_lane(self.lane, ptr, len)
    }

    /// Allocates `size` bytes that are released if the transaction does not commit.
    pub fn alloc(&self, size: usize) -> Result<NonNull<u8>, TxError> {
        self.heap.tx_alloc_lane(self.lane, size, false)
    }

    /// [`Tx::alloc`], zeroed.
    pub fn alloc_zeroed(&self, size: usize) -> Result<NonNull<u8>, TxError> {
        self.heap.tx_alloc_lane(self.lane, size, true)
    }

    /// Frees the block at `ptr` when (and only if) the transaction commits.
    pub fn free(&self, ptr: NonNull<u8>) -> Result<(), TxError> {
        self.heap.tx_free_lane(self.lane, ptr)
    }

    /// The heap.
    pub fn heap(&self) -> &Heap {
        self.heap
    }
}

/// What recovery did to transactions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TxRecovery {
    pub rolled_back: u64,
    pub finished: u64,
    pub undo_applied: u64,
    pub undo_skipped: u64,
    pub blocks_released: u64,
}

struct Record {
    kind: u32,
    at: usize,
    off: usize,
    len: usize,
}

/// The records of lane `l`'s running transaction, oldest first.
fn records(meta: &Meta, l: u32) -> Result<Vec<Record>, String> {
    let seq = meta.lane_u64(l, lane::TX_SEQ).load(Acquire);
    let mut block = meta.lane_u64(l, lane::TX_LOG).load(Acquire) as usize;
    let mut out = Vec::new();
    let mut hops = 0;
    while block != 0 {
        hops += 1;
        let Some((start, size)) = meta.containing(block) else {
            return Err(format!("lane {l}: undo log block {block:#x} is not an allocated block"));
        };
        if start != block || hops > 1 << 20 {
            return Err(format!("lane {l}: undo log block {block:#x} is damaged"));
        }
        // A block of an older transaction, or one linked but not yet
        // initialised (allocated zeroed: SEQ 0), ends the log.
        if meta.mem.u64(block + log::SEQ).load(Acquire) != seq {
            break;
        }
        let cap = meta.mem.u64(block + log::CAP).load(Relaxed) as usize;
        if cap > size || cap < log::RECORDS {
            return Err(format!("lane {l}: undo log block {block:#x} is damaged"));
        }
        let used = meta.mem.u64(block + log::USED).load(Acquire) as usize;
        if used > cap - log::RECORDS {
            return Err(format!("lane {l}: undo log block {block:#x} claims {used} bytes"));
        }
        let mut at = block + log::RECORDS;
        let end = at + used;
        while at < end {
            let kind = meta.mem.u32(at).load(Relaxed);
            let off = meta.mem.u64(at + log::REC_OFF).load(Relaxed) as usize;
            let len = meta.mem.u64(at + log::REC_LEN).load(Relaxed) as usize;
            let size = match kind {
                log::UNDO if len <= log::MAX_UNDO => log::RECORD_HEADER + len.next_multiple_of(8),
                log::ALLOC | log::FREE => log::RECORD_HEADER,
                _ => return Err(format!("lane {l}: undo log record at {at:#x} is damaged")),
            };
            if at + size > end {
                return Err(format!("lane {l}: undo log record at {at:#x} runs past the block"));
            }
            out.push(Record { kind, at, off, len });
            at += size;
        }
        block = meta.mem.u64(block + log::NEXT).load(Acquire) as usize;
    }
    Ok(out)
}

/// Releases the block at `off` during recovery (lane `l`'s cache still
/// holds what it held at the crash).
fn ensure_free(meta: &Meta, l: u32, off: usize) -> Result<(), String> {
    match meta.locate(off) {
        Located::Block { slab, class, idx } => {
            let entry = (off >> 4) as u32;
            let n = (meta.cache_count(l, class).load(Relaxed) as usize).min(crate::size_class::CACHE_CAP);
            if (0..n).any(|i| meta.cache_entry(l, class, i).load(Relaxed) == entry) {
                return Ok(()); // cached: the cache pass frees it
            }
            meta.slab_word(slab, idx / 64).fetch_and(!(1 << (idx % 64)), Release);
            Ok(())
        }
        Located::Large { page, npages } => {
            meta.desc(page).store(crate::format::Desc::Free.encode(), Release);
            let _ = npages;
            Ok(())
        }
        Located::Nothing | Located::Outside => Err(format!("transaction block {off:#x} is not a block")),
    }
}

/// Recovery of lane transactions: roll back active ones, finish committing ones.
pub(crate) fn recover_txs(meta: &Meta) -> Result<TxRecovery, String> {
    let mut r = TxRecovery::default();
    for l in 0..meta.layout.nlanes {
        let state = meta.lane_u64(l, lane::TX_STATE).load(Acquire);
        if state == lane::TX_NONE {
            continue;
        }
        let recs = records(meta, l)?;
        match state {
            lane::TX_ACTIVE => {
                for rec in recs.iter().rev() {
                    match rec.kind {
                        log::UNDO => {
                            if meta.containing(rec.off).is_none_or(|(s, n)| rec.off + rec.len > s + n) {
                                // The block was freed outside the transaction
                                // (a misuse): restoring would write into free
                                // memory, so leave it.
                                r.undo_skipped += 1;
                                continue;
                            }
                            let mut buf = vec![0u8; rec.len];
                            meta.mem.read(rec.at + log::RECORD_HEADER, &mut buf);
                            meta.mem.write(rec.off, &buf);
                            r.undo_applied += 1;
                        }
                        log::ALLOC if rec.off != 0 => {
                            ensure_free(meta, l, rec.off)?;
                            meta.mem.u64(rec.at + log::REC_OFF).store(0, Release);
                            r.blocks_released += 1;
                        }
                        _ => {}
                    }
                }
                r.rolled_back += 1;
            }
            lane::TX_COMMITTING => {
                for rec in &recs {
                    if rec.kind == log::FREE && rec.off != 0 {
                        ensure_free(meta, l, rec.off)?;
                        meta.mem.u64(rec.at + log::REC_OFF).store(0, Release);
                        r.blocks_released += 1;
                    }
                }
                r.finished += 1;
            }
            s => return Err(format!("lane {l}: unknown transaction state {s}")),
        }
        meta.lane_u64(l, lane::TX_STATE).store(lane::TX_NONE, Release);
    }
    Ok(r)
}

/// Heap offsets of every lane's undo-log blocks (owned by the heap itself).
pub(crate) fn log_blocks(meta: &Meta) -> Vec<u64> {
    let mut out = Vec::new();
    for l in 0..meta.layout.nlanes {
        let mut block = meta.lane_u64(l, lane::TX_LOG).load(Acquire) as usize;
        while block != 0 && out.len() < 1 << 20 {
            if meta.containing(block).is_none_or(|(s, _)| s != block) {
                break;
            }
            out.push(block as u64);
            block = meta.mem.u64(block + log::NEXT).load(Acquire) as usize;
        }
    }
    out
}

impl Heap {
    /// Runs `f` in a transaction: commits when it returns `Ok`, rolls back
    /// when it returns `Err` or panics. Nested calls join the outer
    /// transaction.
    pub fn tx<R, E: From<TxError>>(&self, f: impl FnOnce(&Tx<'_>) -> Result<R, E>) -> Result<R, E> {
        let lane = self.tx_begin_lane()?;
        let tx = Tx { heap: self, lane, _thread_bound: PhantomData };
        struct AbortOnUnwind<'a>(&'a Heap, u32, bool);
        impl Drop for AbortOnUnwind<'_> {
            fn drop(&mut self) {
                if !self.2 {
                    let _ = self.0.tx_abort_lane(self.1);
                }
            }
        }
        let mut guard = AbortOnUnwind(self, lane, false);
        let out = f(&tx);
        guard.2 = true;
        match out {
            Ok(v) => {
                self.tx_commit_lane(lane)?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.tx_abort_lane(lane);
                Err(e)
            }
        }
    }

    /// Begins a transaction on this thread (or joins the running one).
    pub fn tx_begin(&self) -> Result<(), TxError> {
        self.tx_begin_lane().map(|_| ())
    }

    /// [`Tx::add_range`] for the transaction running on this thread.
    pub fn tx_add_range(&self, ptr: *const u8, len: usize) -> Result<(), TxError> {
        let l = self.tx_lane()?;
        self.tx_add_range_lane(l, ptr, len)
    }

    /// [`Tx::alloc`] for the transaction running on this thread.
    pub fn tx_alloc(&self, size: usize) -> Result<NonNull<u8>, TxError> {
        let l = self.tx_lane()?;
        self.tx_alloc_lane(l, size, false)
    }

    /// [`Tx::alloc_zeroed`] for the transaction running on this thread.
    pub fn tx_alloc_zeroed(&self, size: usize) -> Result<NonNull<u8>, TxError> {
        let l = self.tx_lane()?;
        self.tx_alloc_lane(l, size, true)
    }

    /// [`Tx::free`] for the transaction running on this thread.
    pub fn tx_free(&self, ptr: NonNull<u8>) -> Result<(), TxError> {
        let l = self.tx_lane()?;
        self.tx_free_lane(l, ptr)
    }

    /// Commits the transaction running on this thread (an inner commit
    /// only ends its nesting level).
    pub fn tx_commit(&self) -> Result<(), TxError> {
        let l = self.tx_lane()?;
        self.tx_commit_lane(l)
    }

    /// Rolls back the transaction running on this thread, whatever the
    /// nesting level; outer levels must still end it (their commit returns
    /// [`TxError::Aborted`]).
    pub fn tx_abort(&self) -> Result<(), TxError> {
        let l = self.tx_lane()?;
        self.tx_abort_lane(l)
    }

    /// Nesting depth of this thread's transaction (0: none).
    ///
    /// # Panics
    /// In a forked child, on a heap the parent opened (see [`crate::fork`]).
    pub fn tx_depth(&self) -> u32 {
        match self.private_lane().unwrap_or_else(|e| panic!("remem: {e}")) {
            Some(l) if l != 0 => self.txv(l).depth,
            _ => 0,
        }
    }

    /// The `tx_*` calls with the caller's lane cache `lanes` instead of
    /// remem-alloc's own (see [`Heap::alloc_in`]): [`Heap::tx_begin`].
    ///
    /// # Safety
    ///
    /// As [`Heap::alloc_in`] (for this and the other `tx_*_in` calls).
    #[inline]
    pub unsafe fn tx_begin_in(&self, lanes: &ThreadLanes) -> Result<(), TxError> {
        let l = self.private_lane_in(lanes)?.ok_or(TxError::NoLane(self.nlanes() - 1))?;
        self.in_gate(l, |l| self.tx_begin_in_lane(l)).map(|_| ())
    }

    /// [`Heap::tx_add_range`] with the caller's lane cache.
    ///
    /// # Safety
    ///
    /// As [`Heap::tx_begin_in`].
    #[inline]
    pub unsafe fn tx_add_range_in(&self, lanes: &ThreadLanes, ptr: *const u8, len: usize) -> Result<(), TxError> {
        let l = self.tx_lane_in(lanes)?;
        self.tx_add_range_lane(l, ptr, len)
    }

    /// [`Heap::tx_alloc`] (`zero`: [`Heap::tx_alloc_zeroed`]) with the caller's lane cache.
    ///
    /// # Safety
    ///
    /// As [`Heap::tx_begin_in`].
    #[inline]
    pub unsafe fn tx_alloc_in(&self, lanes: &ThreadLanes, size: usize, zero: bool) -> Result<NonNull<u8>, TxError> {
        let l = self.tx_lane_in(lanes)?;
        self.tx_alloc_lane(l, size, zero)
    }

    /// [`Heap::tx_free`] with the caller's lane cache.
    ///
    /// # Safety
    ///
    /// As [`Heap::tx_begin_in`].
    #[inline]
    pub unsafe fn tx_free_in(&self, lanes: &ThreadLanes, ptr: NonNull<u8>) -> Result<(), TxError> {
        let l = self.tx_lane_in(lanes)?;
        self.tx_free_lane(l, ptr)
    }

    /// [`Heap::tx_commit`] with the caller's lane cache.
    ///
    /// # Safety
    ///
    /// As [`Heap::tx_begin_in`].
    #[inline]
    pub unsafe fn tx_commit_in(&self, lanes: &ThreadLanes) -> Result<(), TxError> {
        let l = self.tx_lane_in(lanes)?;
        self.tx_commit_lane(l)
    }

    /// [`Heap::tx_abort`] with the caller's lane cache.
    ///
    /// # Safety
    ///
    /// As [`Heap::tx_begin_in`].
    #[inline]
    pub unsafe fn tx_abort_in(&self, lanes: &ThreadLanes) -> Result<(), TxError> {
        let l = self.tx_lane_in(lanes)?;
        self.tx_abort_lane(l)
    }

    /// [`Heap::tx_depth`] with the caller's lane cache.
    ///
    /// # Safety
    ///
    /// As [`Heap::tx_begin_in`].
    ///
    /// # Panics
    /// As [`Heap::tx_depth`].
    pub unsafe fn tx_depth_in(&self, lanes: &ThreadLanes) -> u32 {
        match self.private_lane_in(lanes).unwrap_or_else(|e| panic!("remem: {e}")) {
            Some(l) if l != 0 => self.txv(l).depth,
            _ => 0,
        }
    }

    #[inline]
    fn tx_lane_in(&self, lanes: &ThreadLanes) -> Result<u32, TxError> {
        match self.private_lane_in(lanes)? {
            // The `_in` functions check (under their one lock) that a
            // transaction is running.
            Some(l) if l != 0 => Ok(l),
            _ => Err(TxError::NoTransaction),
        }
    }

    fn tx_lane(&self) -> Result<u32, TxError> {
        match self.private_lane()? {
            // The `_in` functions check (under their one lock) that a
            // transaction is running.
            Some(l) if l != 0 => Ok(l),
            _ => Err(TxError::NoTransaction),
        }
    }

    fn tx_begin_lane(&self) -> Result<u32, TxError> {
        let l = self.private_lane()?.ok_or(TxError::NoLane(self.nlanes() - 1))?;
        self.in_gate(l, |l| self.tx_begin_in_lane(l))
    }

    fn tx_begin_in_lane(&self, l: u32) -> Result<u32, TxError> {
        let m = self.meta();
        let v = self.txv(l);
        if v.depth > 0 {
            v.depth += 1;
            return Ok(l);
        }
        let head_field = m.lane_u64(l, lane::TX_LOG);
        if head_field.load(Acquire) == 0 {
            self.new_log_block(l, m.layout.lane(l) + lane::TX_LOG, log::FIRST_BLOCK).map_err(TxError::Alloc)?;
        }
        let head = head_field.load(Acquire) as usize;
        let seq = m.lane_u64(l, lane::TX_SEQ).load(Relaxed) + 1;
        m.lane_u64(l, lane::TX_SEQ).store(seq, Relaxed);
        m.mem.u64(head + log::USED).store(0, Relaxed);
        m.mem.u64(head + log::SEQ).store(seq, Release);
        m.lane_u64(l, lane::TX_STATE).store(lane::TX_ACTIVE, Release);
        // Reset in place: the collections keep their memory between transactions.
        v.depth = 1;
        v.aborted = false;
        v.block = head;
        v.used = 0;
        v.seq = seq;
        v.has_frees = false;
        if !v.freed.is_empty() {
            v.freed.clear();
        }
        v.logged.clear();
        Ok(l)
    }

    /// Allocates a log block of `size` bytes into the word at `dest`.
    fn new_log_block(&self, l: u32, dest: usize, size: usize) -> Result<usize, AllocError> {
        // Zeroed before it is linked: a crash right after the link leaves a
        // block with SEQ 0, which ends the log walk (see `records`).
        let off = self.alloc_into_off_lane(l, dest, lane::DEST_OFFSET, size, true)?;
        let m = self.meta();
        m.mem.u64(off + log::CAP).store(size as u64, Release);
        Ok(off)
    }

    /// Appends a record with `data` (for UNDO) and returns its offset.
    fn append(
        &self,
        l: u32,
        v: &mut TxVolatile,
        kind: u32,
        off: usize,
        len: usize,
        data: bool,
    ) -> Result<usize, TxError> {
        let m = self.meta();
        let need = log::RECORD_HEADER + if data { len.next_multiple_of(8) } else { 0 };
        let cap = m.mem.u64(v.block + log::CAP).load(Relaxed) as usize;
        if log::RECORDS + v.used + need > cap {
            let next_field = v.block + log::NEXT;
            let mut next = m.mem.u64(next_field).load(Acquire) as usize;
            if next == 0 {
                let size = (cap * 2).min(log::MAX_BLOCK);
                next = self.new_log_block(l, next_field, size).map_err(TxError::LogFull)?;
            }
            m.mem.u64(next + log::USED).store(0, Relaxed);
            m.mem.u64(next + log::SEQ).store(v.seq, Release);
            v.block = next;
            v.used = 0;
        }
        let at = v.block + log::RECORDS + v.used;
        m.mem.u32(at).store(kind, Relaxed);
        m.mem.u32(at + 4).store(0, Relaxed);
        m.mem.u64(at + log::REC_OFF).store(off as u64, Relaxed);
        m.mem.u64(at + log::REC_LEN).store(len as u64, Relaxed);
        if data {
            // The range is inside an allocated block, the record inside our log block.
            let mut buf = [0u8; log::MAX_UNDO];
            m.mem.read(off, &mut buf[..len]);
            m.mem.write(at + log::RECORD_HEADER, &buf[..len]);
        }
        v.used += need;
        m.mem.u64(v.block + log::USED).store(v.used as u64, Release);
        Ok(at)
    }

    fn live_tx(v: &mut TxVolatile) -> Result<&mut TxVolatile, TxError> {
        if v.depth == 0 {
            return Err(TxError::NoTransaction);
        }
        if v.aborted {
            return Err(TxError::Aborted);
        }
        Ok(v)
    }

    pub(crate) fn tx_add_range_lane(&self, l: u32, ptr: *const u8, len: usize) -> Result<(), TxError> {
        self.check_process()?;
        self.in_gate(l, |l| self.tx_add_range_lane_in(l, ptr, len))
    }

    fn tx_add_range_lane_in(&self, l: u32, ptr: *const u8, len: usize) -> Result<(), TxError> {
        let g = self.txv(l);
        let v = Self::live_tx(g)?;
        let bad = TxError::OutOfHeap { ptr: ptr as usize, len };
        let off = self.offset_of(ptr).ok_or(bad.clone())?;
        if len == 0 {
            return Ok(());
        }
        let end = off.checked_add(len).ok_or(bad.clone())?;
        match self.meta().containing(off) {
            Some((s, n)) if end <= s + n => {}
            _ => return Err(bad),
        }
        if v.logged.iter().any(|&(s, n)| s <= off && off + len <= s + n) {
            return Ok(());
        }
        let mut at = off;
        while at < off + len {
            let chunk = (off + len - at).min(log::MAX_UNDO);
            if let Err(e) = self.append(l, v, log::UNDO, at, chunk, true) {
                self.fail_tx(l);
                return Err(e);
            }
            at += chunk;
        }
        if v.logged.len() < 16 {
            v.logged.push((off, len));
        }
        Ok(())
    }

    pub(crate) fn tx_alloc_lane(&self, l: u32, size: usize, zero: bool) -> Result<NonNull<u8>, TxError> {
        self.check_process()?;
        self.in_gate(l, |l| self.tx_alloc_lane_in(l, size, zero))
    }

    fn tx_alloc_lane_in(&self, l: u32, size: usize, zero: bool) -> Result<NonNull<u8>, TxError> {
        let g = self.txv(l);
        let v = Self::live_tx(g)?;
        let rec = match self.append(l, v, log::ALLOC, 0, 0, false) {
            Ok(r) => r,
            Err(e) => {
                self.fail_tx(l);
                return Err(e);
            }
        };
        let off = self.alloc_into_off_lane(l, rec + log::REC_OFF, lane::DEST_OFFSET, size, zero)?;
        Ok(self.ptr(off))
    }

    pub(crate) fn tx_free_lane(&self, l: u32, ptr: NonNull<u8>) -> Result<(), TxError> {
        self.check_process()?;
        self.in_gate(l, |l| self.tx_free_lane_in(l, ptr))
    }

    fn tx_free_lane_in(&self, l: u32, ptr: NonNull<u8>) -> Result<(), TxError> {
        self.usable_size(ptr).map_err(|e| match e {
            crate::Error::Pointer(p) => TxError::Pointer(p),
            crate::Error::Forked(f) => TxError::Forked(f),
            _ => TxError::Pointer(PointerError::NotABlock(ptr.as_ptr() as usize)),
        })?;
        let g = self.txv(l);
        let v = Self::live_tx(g)?;
        let off = self.offset_of(ptr.as_ptr()).expect("usable_size checked it");
        if !v.freed.insert(off) {
            return Err(TxError::Pointer(PointerError::DoubleFree(ptr.as_ptr() as usize)));
        }
        v.has_frees = true;
        if let Err(e) = self.append(l, v, log::FREE, off, 0, false) {
            self.fail_tx(l);
            return Err(e);
        }
        Ok(())
    }

    pub(crate) fn tx_commit_lane(&self, l: u32) -> Result<(), TxError> {
        self.check_process()?;
        self.in_gate(l, |l| self.tx_commit_lane_in(l))
    }

    fn tx_commit_lane_in(&self, l: u32) -> Result<(), TxError> {
        let v = self.txv(l);
        if v.depth == 0 {
            return Err(TxError::NoTransaction);
        }
        v.depth -= 1;
        if v.depth > 0 {
            return if v.aborted { Err(TxError::Aborted) } else { Ok(()) };
        }
        if v.aborted {
            v.aborted = false;
            return Err(TxError::Aborted);
        }
        let m = self.meta();
        if v.has_frees {
            m.lane_u64(l, lane::TX_STATE).store(lane::TX_COMMITTING, Release);
            for rec in records(m, l).expect("own log is well formed") {
                if rec.kind == log::FREE && rec.off != 0 {
                    self.release(l, rec.at, rec.off);
                }
            }
        }
        m.lane_u64(l, lane::TX_STATE).store(lane::TX_NONE, Release);
        v.freed.clear();
        v.logged.clear();
        v.has_frees = false;
        Ok(())
    }

    pub(crate) fn tx_abort_lane(&self, l: u32) -> Result<(), TxError> {
        self.check_process()?;
        self.in_gate(l, |l| self.tx_abort_lane_in(l))
    }

    fn tx_abort_lane_in(&self, l: u32) -> Result<(), TxError> {
        let v = self.txv(l);
        if v.depth == 0 {
            return Err(TxError::NoTransaction);
        }
        if !v.aborted {
            self.rollback(l, v);
        }
        // This level ends; outer levels still have to end the transaction
        // (their commit reports `Aborted`).
        v.depth -= 1;
        v.aborted = v.depth > 0;
        Ok(())
    }

    /// Rolls the running transaction back and marks it aborted, leaving
    /// the nesting depth alone (the caller's `abort` or `commit` ends it).
    fn fail_tx(&self, l: u32) {
        let v = self.txv(l);
        if v.depth > 0 && !v.aborted {
            self.rollback(l, v);
            v.aborted = true;
        }
    }

    fn rollback(&self, l: u32, v: &mut TxVolatile) {
        let m = self.meta();
        for rec in records(m, l).expect("own log is well formed").iter().rev() {
            match rec.kind {
                log::UNDO => {
                    let mut buf = [0u8; log::MAX_UNDO];
                    m.mem.read(rec.at + log::RECORD_HEADER, &mut buf[..rec.len]);
                    m.mem.write(rec.off, &buf[..rec.len]);
                }
                log::ALLOC if rec.off != 0 => self.release(l, rec.at, rec.off),
                _ => {}
            }
        }
        m.lane_u64(l, lane::TX_STATE).store(lane::TX_NONE, Release);
        v.freed.clear();
        v.logged.clear();
        v.has_frees = false;
    }

    /// Releases the block at `off` named by the record at `rec`, marking the
    /// record done in the order the module docs give.
    fn release(&self, l: u32, rec: usize, off: usize) {
        let m = self.meta();
        let done = m.mem.u64(rec + log::REC_OFF);
        if self.push_to_cache(l, off) {
            done.store(0, Release);
        } else {
            done.store(0, Release);
            let p = self.ptr(off);
            let r = self.free(p);
            debug_assert!(r.is_ok(), "remem: releasing a transaction block: {r:?}");
        }
    }
}
