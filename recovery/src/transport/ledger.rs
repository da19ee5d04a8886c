//! The accounting both initiators share: queue depth, local buffers and the
//! reads outstanding into each. Pure.
//!
//! A read is outstanding from `post` until its completion is handed to the
//! caller by `poll` or `wait`; it holds one slot of the depth and makes its
//! buffer busy for that long.

use super::error::{BufError, PostError};
use super::region::{BufId, ReadRequest, MAX_READ_LEN};

#[derive(Debug)]
pub(crate) struct Ledger {
    depth: usize,
    outstanding: usize,
    /// Per buffer: (length, reads outstanding into it).
    bufs: Vec<(usize, usize)>,
}

impl Ledger {
    pub(crate) fn new(depth: usize) -> Ledger {
        Ledger { depth: depth.max(1), outstanding: 0, bufs: Vec::new() }
    }

    pub(crate) fn depth(&self) -> usize {
        self.depth
    }

    pub(crate) fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Records a new buffer of `len` bytes.
    pub(crate) fn add_buf(&mut self, len: usize) -> Result<BufId, BufError> {
        let id = u32::try_from(self.bufs.len()).map_err(|_| BufError::BadLength { len })?;
        self.bufs.push((len, 0));
        Ok(BufId(id))
    }

    /// Checks that a buffer exists and no read into it is outstanding.
    pub(crate) fn check_idle(&self, id: BufId) -> Result<(), BufError> {
        match self.bufs.get(id.index()) {
            None => Err(BufError::Unknown(id)),
            Some(&(_, 0)) => Ok(()),
            Some(&(_, outstanding)) => Err(BufError::Busy { buf: id, outstanding }),
        }
    }

    /// Checks a whole batch before any of it is posted.
    pub(crate) fn check_batch(&self, reads: &[ReadRequest]) -> Result<(), PostError> {
        if self.outstanding + reads.len() > self.depth {
            return Err(PostError::QueueFull { outstanding: self.outstanding, batch: reads.len(), depth: self.depth });
        }
        for r in reads {
            if r.len == 0 {
                return Err(PostError::ZeroLength { wr_id: r.wr_id });
            }
            if r.len > MAX_READ_LEN {
                return Err(PostError::TooLong { wr_id: r.wr_id, len: r.len, max: MAX_READ_LEN });
            }
            let Some(&(buf_len, _)) = self.bufs.get(r.buf.index()) else {
                return Err(PostError::UnknownBuf { wr_id: r.wr_id, buf: r.buf });
            };
            if r.buf_offset.checked_add(r.len as usize).is_none_or(|end| end > buf_len) {
                return Err(PostError::LocalRange {
                    wr_id: r.wr_id,
                    buf: r.buf,
                    offset: r.buf_offset,
                    len: r.len,
                    buf_len,
                });
            }
        }
        Ok(())
    }

    /// One read into `buf` was posted (after `check_batch`).
    pub(crate) fn posted(&mut self, buf: BufId) {
        self.outstanding += 1;
        self.bufs[buf.index()].1 += 1;
    }

    /// The completion of one read into `buf` was handed to the caller.
    pub(crate) fn returned(&mut self, buf: BufId) {
        self.outstanding -= 1;
        self.bufs[buf.index()].1 -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::RegionDesc;

    fn read(wr_id: u64, buf: BufId, buf_offset: usize, len: u32) -> ReadRequest {
        ReadRequest { wr_id, region: RegionDesc { addr: 0, rkey: 0, len: 0 }, offset: 0, len, buf, buf_offset }
    }

    #[test]
    fn batches_are_checked_whole() {
        let mut l = Ledger::new(2);
        let b = l.add_buf(100).unwrap();
        assert!(l.check_batch(&[read(1, b, 0, 100), read(2, b, 50, 50)]).is_ok());
        assert!(matches!(l.check_batch(&[read(3, b, 0, 0)]), Err(PostError::ZeroLength { wr_id: 3 })));
        assert!(matches!(l.check_batch(&[read(4, b, 1, 100)]), Err(PostError::LocalRange { wr_id: 4, .. })));
        assert!(matches!(l.check_batch(&[read(5, b, usize::MAX, 1)]), Err(PostError::LocalRange { .. })));
        assert!(matches!(l.check_batch(&[read(6, BufId(9), 0, 1)]), Err(PostError::UnknownBuf { wr_id: 6, .. })));
        assert!(matches!(l.check_batch(&[read(7, b, 0, MAX_READ_LEN + 1)]), Err(PostError::TooLong { wr_id: 7, .. })));
        let three = [read(1, b, 0, 1), read(2, b, 0, 1), read(3, b, 0, 1)];
        assert!(matches!(l.check_batch(&three), Err(PostError::QueueFull { outstanding: 0, batch: 3, depth: 2 })));
    }

    #[test]
    fn buffers_are_busy_until_returned() {
        let mut l = Ledger::new(4);
        let a = l.add_buf(8).unwrap();
        let b = l.add_buf(8).unwrap();
        l.posted(a);
        l.posted(a);
        assert!(matches!(l.check_idle(a), Err(BufError::Busy { outstanding: 2, .. })));
        assert!(l.check_idle(b).is_ok());
        assert!(matches!(l.check_idle(BufId(2)), Err(BufError::Unknown(_))));
        assert_eq!(l.outstanding(), 2);
        assert!(matches!(l.check_batch(&[read(1, b, 0, 1); 3]), Err(PostError::QueueFull { .. })));
        l.returned(a);
        l.returned(a);
        assert!(l.check_idle(a).is_ok());
        assert_eq!(l.outstanding(), 0);
    }
}
