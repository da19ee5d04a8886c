//! Pulling any set of pages of a remote region through an [`Initiator`],
//! whatever its queue depth: one page, every page, scattered or in runs.
//!
//! The pages are given as sorted runs `(first page, pages)`. They are cut
//! into *pieces* (at most one local buffer long, at most
//! [`MAX_READ_LEN`]) and the pieces into *batches* (pieces that fill one
//! buffer, at most `depth / buffers` of them), so that with every buffer in
//! flight no more than [`Initiator::max_outstanding`] reads are outstanding,
//! for any page set. Batches complete in posting order; each is handed to
//! the caller's sink (first page, bytes, and the response's CRC-32 from the
//! source memory where the transport carries one) before its buffer is
//! reused.
//!
//! ```text
//!  runs     [5..9) [12] [40..3000) ...
//!  pieces   [5..9) [12] [40..2088) [2088..3000)   (≤ one buffer each)
//!  batches  {[5..9) [12] [40..2088)} {[2088..3000) ...}   (≤ depth/NBUF reads, ≤ one buffer)
//!  in flight: ≤ NBUF batches  =>  ≤ depth reads
//! ```

use std::collections::VecDeque;
use std::time::Duration;

use crate::transport::{BufId, Completion, Initiator, ReadRequest, RegionDesc, Status, MAX_READ_LEN};

/// Page size of the heaps pulled.
pub const PAGE: usize = 4096;
/// Bytes of one local buffer.
const BUF: usize = 8 << 20;
/// Local buffers (batches in flight at once).
const NBUF: usize = 4;
/// How long to wait for a batch before declaring the connection dead.
const WAIT: Duration = Duration::from_secs(30);

/// Why a pull stopped. The connection should be dropped after any of them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PullError {
    /// Posting, polling or a buffer failed locally.
    #[error("{0}")]
    Transport(String),
    /// A read completed with an error (connection lost, access error).
    #[error("read of page {page} failed: {status:?}")]
    Read {
        /// First page of the failed read.
        page: u64,
        /// Its status.
        status: Status,
    },
    /// The target stopped answering.
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    /// A completion that does not belong to the batch waited for.
    #[error("completion out of order: got wr_id {got}, expected {want}")]
    Order {
        /// The `wr_id` received.
        got: u64,
        /// The `wr_id` expected.
        want: u64,
    },
    /// A page set that is not sorted, or outside the region.
    #[error("bad page set: {0}")]
    BadRuns(String),
    /// The sink refused the data (e.g. a CRC mismatch).
    #[error("{0}")]
    Sink(String),
}

/// One read: `pages` pages from `page`, landing at `at` in its buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    page: u64,
    pages: usize,
    at: usize,
}

/// Cuts runs into pieces and pieces into batches (pure: see the module docs).
#[derive(Debug)]
struct Batcher<'r> {
    runs: &'r [(u64, u64)],
    run: usize,
    /// Pages of `runs[run]` already handed out.
    done: u64,
    buf_pages: usize,
    per_batch: usize,
}

impl<'r> Batcher<'r> {
    fn new(runs: &'r [(u64, u64)], buf_len: usize, per_batch: usize) -> Batcher<'r> {
        let max_read_pages = MAX_READ_LEN as usize / PAGE;
        Batcher { runs, run: 0, done: 0, buf_pages: (buf_len / PAGE).min(max_read_pages).max(1), per_batch }
    }

    fn next_batch(&mut self) -> Option<Vec<Piece>> {
        let mut batch = Vec::new();
        let mut fill = 0usize; // pages of the buffer used
        while batch.len() < self.per_batch && fill < self.buf_pages {
            let Some(&(first, count)) = self.runs.get(self.run) else { break };
            let left = count - self.done;
            if left == 0 {
                self.run += 1;
                self.done = 0;
                continue;
            }
            let n = (left.min((self.buf_pages - fill) as u64)) as usize;
            batch.push(Piece { page: first + self.done, pages: n, at: fill * PAGE });
            fill += n;
            self.done += n as u64;
        }
        (!batch.is_empty()).then_some(batch)
    }
}

/// Checks that `runs` are sorted, disjoint, non-empty and inside a region of `npages` pages.
pub fn check_runs(runs: &[(u64, u64)], npages: u64) -> Result<(), PullError> {
    let mut end = 0u64;
    for (i, &(first, count)) in runs.iter().enumerate() {
        let stop = first.checked_add(count).ok_or_else(|| PullError::BadRuns(format!("run {i} overflows")))?;
        if count == 0 || first < end || stop > npages {
            return Err(PullError::BadRuns(format!(
                "run {i} ({first}, {count}) is empty, overlaps the previous one or ends past page {npages}"
            )));
        }
        end = stop;
    }
    Ok(())
}

/// Coalesces sorted page numbers into runs.
pub fn runs_of(pages: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for p in pages {
        match runs.last_mut() {
            Some((s, n)) if *s + *n == p => *n += 1,
            _ => runs.push((p, 1)),
        }
    }
    runs
}

/// Local buffers of one connection, reused across pulls.
#[derive(Debug)]
pub struct Puller {
    bufs: Vec<BufId>,
    buf_len: usize,
    per_batch: usize,
    next_wr: u64,
}

impl Puller {
    /// Allocates the buffers on `init`, sized for its depth.
    pub fn new(init: &mut dyn Initiator) -> Result<Puller, PullError> {
        Puller::with_buf_len(init, BUF)
    }

    /// Same, with buffers of `buf_len` bytes (tests use small ones to make many batches).
    pub fn with_buf_len(init: &mut dyn Initiator, buf_len: usize) -> Result<Puller, PullError> {
        let depth = init.max_outstanding().max(1);
        let nbuf = NBUF.min(depth);
        let per_batch = depth / nbuf;
        let buf_len = buf_len.max(PAGE) / PAGE * PAGE;
        let bufs = (0..nbuf)
            .map(|_| init.alloc_buf(buf_len))
            .collect::<Result<_, _>>()
            .map_err(|e| PullError::Transport(e.to_string()))?;
        Ok(Puller { bufs, buf_len, per_batch, next_wr: 0 })
    }

    /// Pulls `runs` (sorted, disjoint; see [`check_runs`]) of `region` and
    /// calls `sink(first page, bytes, crc)` for every piece (one read), in
    /// page order; `crc` is the CRC-32 the target computed over the piece in
    /// its memory (TCP; none over verbs).
    /// Never has more than `init.max_outstanding()` reads outstanding.
    pub fn pull(
        &mut self,
        init: &mut dyn Initiator,
        region: RegionDesc,
        runs: &[(u64, u64)],
        mut sink: impl FnMut(u64, &[u8], Option<u32>) -> Result<(), String>,
    ) -> Result<(), PullError> {
        check_runs(runs, region.len / PAGE as u64)?;
        let depth = init.max_outstanding().max(1);
        let mut batcher = Batcher::new(runs, self.buf_len, self.per_batch);
        let mut free: Vec<usize> = (0..self.bufs.len()).rev().collect();
        // (wr_id, slot, pieces) of the batches in flight, oldest first.
        let mut inflight: VecDeque<(u64, usize, Vec<Piece>)> = VecDeque::new();
        let mut outstanding = 0usize;
        let mut out: Vec<Completion> = Vec::new();
        let mut reqs = Vec::new();
        loop {
            while let Some(&slot) = free.last() {
                let Some(batch) = batcher.next_batch() else { break };
                if outstanding + batch.len() > depth {
                    // Cannot happen (per_batch * buffers <= depth); refuse rather than overrun.
                    return Err(PullError::Transport(format!(
                        "internal: {outstanding} reads outstanding + {} would exceed the depth {depth}",
                        batch.len()
                    )));
                }
                free.pop();
                let wr_id = self.next_wr;
                self.next_wr += 1;
                reqs.clear();
                reqs.extend(batch.iter().map(|p| ReadRequest {
                    wr_id,
                    region,
                    offset: p.page * PAGE as u64,
                    len: (p.pages * PAGE) as u32,
                    buf: self.bufs[slot],
                    buf_offset: p.at,
                }));
                init.post(&reqs).map_err(|e| PullError::Transport(e.to_string()))?;
                outstanding += batch.len();
                inflight.push_back((wr_id, slot, batch));
            }
            let Some((wr_id, slot, batch)) = inflight.pop_front() else { return Ok(()) };
            let want = batch.len();
            // Completions come in posting order; a wait may also return
            // those of later batches: they stay in `out` for the next round.
            while out.len() < want {
                let missing = want - out.len();
                match init.wait(&mut out, missing, WAIT) {
                    Ok(0) => return Err(PullError::Timeout(WAIT)),
                    Ok(_) => {}
                    Err(crate::transport::PollError::Timeout { .. }) => return Err(PullError::Timeout(WAIT)),
                    Err(e) => return Err(PullError::Transport(e.to_string())),
                }
            }
            for (c, p) in out[..want].iter().zip(&batch) {
                if c.wr_id != wr_id {
                    return Err(PullError::Order { got: c.wr_id, want: wr_id });
                }
                if c.status != Status::Success || c.len as usize != p.pages * PAGE {
                    return Err(PullError::Read { page: p.page, status: c.status });
                }
            }
            let crcs: Vec<Option<u32>> = out.drain(..want).map(|c| c.crc).collect();
            outstanding -= want;
            let bytes = init.buf(self.bufs[slot]).map_err(|e| PullError::Transport(e.to_string()))?;
            for (p, crc) in batch.iter().zip(crcs) {
                sink(p.page, &bytes[p.at..p.at + p.pages * PAGE], crc).map_err(PullError::Sink)?;
            }
            free.push(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::transport::{connect, serve, ConnectOptions, Kind, ServeOptions, Token};

    fn all(runs: &[(u64, u64)], buf_len: usize, per_batch: usize) -> Vec<Vec<Piece>> {
        let mut b = Batcher::new(runs, buf_len, per_batch);
        std::iter::from_fn(|| b.next_batch()).collect()
    }

    #[test]
    fn batches_respect_the_buffer_and_the_read_count() {
        let runs = [(0, 3), (5, 1), (7, 10), (100, 1)];
        let batches = all(&runs, 4 * PAGE, 2);
        for b in &batches {
            assert!(b.len() <= 2);
            assert!(b.iter().map(|p| p.pages).sum::<usize>() <= 4);
            let mut at = 0;
            for p in b {
                assert_eq!(p.at, at);
                at += p.pages * PAGE;
            }
        }
        let pages: Vec<u64> =
            batches.iter().flatten().flat_map(|p| (p.page..p.page + p.pages as u64).collect::<Vec<_>>()).collect();
        let want: Vec<u64> = runs.iter().flat_map(|&(s, n)| s..s + n).collect();
        assert_eq!(pages, want);
    }

    /// A TCP target serving `npages` pages of anonymous memory in which the
    /// pages of `runs` carry their page number (the others are never touched).
    fn target(npages: u64, runs: &[(u64, u64)]) -> (Box<dyn crate::transport::Target>, Token, RegionDesc) {
        let mut mem = memmap2::MmapMut::map_anon(npages as usize * PAGE).unwrap();
        for &(s, n) in runs {
            for p in s..s + n {
                let at = p as usize * PAGE;
                mem[at..at + 8].copy_from_slice(&p.to_le_bytes());
                mem[at + PAGE - 8..at + PAGE].copy_from_slice(&(!p).to_le_bytes());
            }
        }
        let token = Token::generate().unwrap();
        let target = serve(Kind::Tcp, ServeOptions::new(token.clone()).listen("127.0.0.1:0".parse().unwrap())).unwrap();
        let region = target.register(Arc::new(mem.make_read_only().unwrap())).unwrap();
        (target, token, region)
    }

    /// Pulls `runs` at `depth` with buffers of `buf_len` and checks every page arrived once, in order.
    fn pull_and_check(
        target: &dyn crate::transport::Target,
        token: &Token,
        region: RegionDesc,
        runs: &[(u64, u64)],
        depth: usize,
        buf_len: usize,
    ) {
        let mut init =
            connect(Kind::Tcp, &ConnectOptions::new(target.local_addr(), token.clone()).depth(depth)).unwrap();
        assert_eq!(init.max_outstanding(), depth);
        let mut p = Puller::with_buf_len(&mut *init, buf_len).unwrap();
        let mut want = runs.iter().flat_map(|&(s, n)| s..s + n);
        let mut seen = 0u64;
        p.pull(&mut *init, region, runs, |first, bytes, _| {
            for (k, page) in bytes.chunks_exact(PAGE).enumerate() {
                let pg = first + k as u64;
                assert_eq!(Some(pg), want.next(), "pages in order, each once");
                assert_eq!(page[..8], pg.to_le_bytes(), "page {pg}");
                assert_eq!(page[PAGE - 8..], (!pg).to_le_bytes(), "page {pg}");
                seen += 1;
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("depth {depth}, buffers of {buf_len}: {e}"));
        assert_eq!(want.next(), None, "every page pulled");
        assert!(seen > 0 || runs.is_empty());
    }

    #[test]
    fn a_hundred_thousand_scattered_pages_at_any_depth() {
        // Every other page of 200 000: 100 000 runs of one page each.
        let runs: Vec<(u64, u64)> = (0..100_000u64).map(|i| (2 * i + 1, 1)).collect();
        let (target, token, region) = target(200_000, &runs);
        for depth in [2048, 64, 3, 1] {
            pull_and_check(&*target, &token, region, &runs, depth, BUF);
        }
    }

    #[test]
    fn every_page_and_random_runs_at_small_depths() {
        let npages = 16_384u64; // 64 MiB
        let all = [(0, npages)];
        let (target, token, region) = target(npages, &all);
        for (depth, buf_len) in [(2048, BUF), (5, 64 * 1024), (1, PAGE), (7, 3 * PAGE)] {
            pull_and_check(&*target, &token, region, &all, depth, buf_len);
        }
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..12 {
            let mut runs = Vec::new();
            let mut p = next() % 64;
            while p < npages {
                let n = (1 + next() % 300).min(npages - p);
                runs.push((p, n));
                p += n + 1 + next() % 200;
            }
            let depth = 1 + (next() % 40) as usize;
            let buf_len = PAGE * (1 + (next() % 512) as usize);
            pull_and_check(&*target, &token, region, &runs, depth, buf_len);
        }
    }

    #[test]
    fn one_page_and_no_page() {
        let (target, token, region) = target(8, &[(7, 1)]);
        pull_and_check(&*target, &token, region, &[(7, 1)], 2048, BUF);
        pull_and_check(&*target, &token, region, &[], 4, BUF);
        let mut init = connect(Kind::Tcp, &ConnectOptions::new(target.local_addr(), token.clone())).unwrap();
        let mut p = Puller::new(&mut *init).unwrap();
        assert!(matches!(p.pull(&mut *init, region, &[(7, 2)], |_, _, _| Ok(())), Err(PullError::BadRuns(_))));
    }

    #[test]
    fn runs_are_checked() {
        assert!(check_runs(&[(0, 1), (1, 2)], 3).is_ok());
        assert!(check_runs(&[(0, 2), (1, 2)], 10).is_err());
        assert!(check_runs(&[(0, 0)], 10).is_err());
        assert!(check_runs(&[(9, 2)], 10).is_err());
        assert!(check_runs(&[(u64::MAX, 2)], u64::MAX).is_err());
        assert_eq!(runs_of([1, 2, 3, 5, 7, 8]), vec![(1, 3), (5, 1), (7, 2)]);
    }
}
