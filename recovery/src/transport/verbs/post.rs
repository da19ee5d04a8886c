//! Work requests and completion statuses. Pure: nothing here calls the
//! device, so the request building is tested without one.

use std::ptr;

use rdma_sys::{ibv_send_flags, ibv_send_wr, ibv_sge, ibv_wc_status, ibv_wr_opcode, rdma_t};

use crate::transport::Status;

/// One READ of a batch: where from, where to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ReadWr {
    /// The initiator's internal id (its slot), echoed by the completion.
    pub(crate) wr_id: u64,
    pub(crate) remote_addr: u64,
    pub(crate) rkey: u32,
    pub(crate) local_addr: u64,
    pub(crate) lkey: u32,
    pub(crate) len: u32,
}

/// A batch of signalled `IBV_WR_RDMA_READ`s, linked in order, one
/// scatter-gather entry each, handed to `ibv_post_send` in one call.
pub(crate) struct WrBatch {
    sges: Vec<ibv_sge>,
    wrs: Vec<ibv_send_wr>,
}

// SAFETY: the raw pointers inside point into the batch's own vectors; the
// batch is used from one thread at a time, by its owner.
unsafe impl Send for WrBatch {}

impl WrBatch {
    pub(crate) fn new() -> WrBatch {
        WrBatch { sges: Vec::new(), wrs: Vec::new() }
    }

    /// Rebuilds the batch from `reads` and returns its head (null when
    /// empty). The pointers stay valid until the next `build`.
    pub(crate) fn build(&mut self, reads: &[ReadWr]) -> *mut ibv_send_wr {
        self.sges.clear();
        self.wrs.clear();
        self.sges.extend(reads.iter().map(|r| ibv_sge { addr: r.local_addr, length: r.len, lkey: r.lkey }));
        self.wrs.extend(reads.iter().map(|r| {
            // SAFETY: ibv_send_wr is plain data (integers, raw pointers,
            // unions of those), for which all-zero bytes are valid: null
            // pointers, no flags.
            let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
            wr.wr_id = r.wr_id;
            wr.num_sge = 1;
            wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_READ;
            wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
            wr.wr.rdma = rdma_t { remote_addr: r.remote_addr, rkey: r.rkey };
            wr
        }));
        // Link with pointers derived from the vectors' own base pointers,
        // after both are complete (no reallocation follows).
        let (wrs, sges) = (self.wrs.as_mut_ptr(), self.sges.as_mut_ptr());
        for i in 0..reads.len() {
            // SAFETY: `i < len` of both vectors, so every pointer formed is in
            // bounds (`i + 1 == len` forms none); nothing else refers to them.
            unsafe {
                let wr = wrs.add(i);
                (*wr).sg_list = sges.add(i);
                (*wr).next = if i + 1 < reads.len() { wrs.add(i + 1) } else { ptr::null_mut() };
            }
        }
        if reads.is_empty() {
            ptr::null_mut()
        } else {
            wrs
        }
    }

    /// The batch index of `wr` (what `ibv_post_send` reports as `bad_wr`).
    pub(crate) fn index_of(&self, wr: *const ibv_send_wr) -> Option<usize> {
        let base = self.wrs.as_ptr() as usize;
        let off = (wr as usize).checked_sub(base)?;
        let i = off / std::mem::size_of::<ibv_send_wr>();
        (off % std::mem::size_of::<ibv_send_wr>() == 0 && i < self.wrs.len()).then_some(i)
    }
}

/// The transport's status for an `ibv_wc_status`.
pub(crate) fn status_of(s: ibv_wc_status::Type) -> Status {
    match s {
        ibv_wc_status::IBV_WC_SUCCESS => Status::Success,
        ibv_wc_status::IBV_WC_REM_ACCESS_ERR => Status::AccessError,
        ibv_wc_status::IBV_WC_WR_FLUSH_ERR => Status::Flushed,
        ibv_wc_status::IBV_WC_RETRY_EXC_ERR | ibv_wc_status::IBV_WC_RNR_RETRY_EXC_ERR => Status::ConnectionLost,
        other => Status::Device(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reads(n: u64) -> Vec<ReadWr> {
        (0..n)
            .map(|i| ReadWr {
                wr_id: 100 + i,
                remote_addr: 0x7f00_0000_0000 + i * 4096,
                rkey: 0xabcd,
                local_addr: 0x5000_0000 + i * 4096,
                lkey: 0x1234,
                len: 4096 - i as u32,
            })
            .collect()
    }

    #[test]
    fn a_batch_is_a_chain_of_signalled_reads() {
        let mut b = WrBatch::new();
        let rs = reads(3);
        let head = b.build(&rs);
        assert_eq!(head, b.wrs.as_mut_ptr());
        for (i, (wr, r)) in b.wrs.iter().zip(&rs).enumerate() {
            assert_eq!(wr.wr_id, r.wr_id);
            assert_eq!(wr.opcode, ibv_wr_opcode::IBV_WR_RDMA_READ);
            assert_eq!(wr.send_flags, ibv_send_flags::IBV_SEND_SIGNALED.0);
            assert_eq!(wr.num_sge, 1);
            // SAFETY: `build` wrote the `rdma` member of the union.
            let rdma = unsafe { wr.wr.rdma };
            assert_eq!((rdma.remote_addr, rdma.rkey), (r.remote_addr, r.rkey));
            assert_eq!(wr.sg_list, &b.sges[i] as *const ibv_sge as *mut ibv_sge);
            let sge = &b.sges[i];
            assert_eq!((sge.addr, sge.length, sge.lkey), (r.local_addr, r.len, r.lkey));
            let next = if i + 1 < rs.len() { &b.wrs[i + 1] as *const ibv_send_wr } else { ptr::null() };
            assert_eq!(wr.next as *const ibv_send_wr, next);
            assert_eq!(b.index_of(wr), Some(i));
        }
        assert_eq!(b.index_of(ptr::null()), None);
        // SAFETY: only the address is formed, never dereferenced.
        let past = unsafe { b.wrs.as_ptr().add(3) };
        assert_eq!(b.index_of(past), None);
        assert!(b.build(&[]).is_null());
        let head = b.build(&rs[..1]);
        // SAFETY: `head` points to the batch's first request, alive in `b`.
        assert!(unsafe { (*head).next }.is_null());
    }

    #[test]
    fn completion_statuses_map_to_the_transports() {
        assert_eq!(status_of(ibv_wc_status::IBV_WC_SUCCESS), Status::Success);
        assert_eq!(status_of(ibv_wc_status::IBV_WC_REM_ACCESS_ERR), Status::AccessError);
        assert_eq!(status_of(ibv_wc_status::IBV_WC_WR_FLUSH_ERR), Status::Flushed);
        assert_eq!(status_of(ibv_wc_status::IBV_WC_RETRY_EXC_ERR), Status::ConnectionLost);
        assert_eq!(status_of(ibv_wc_status::IBV_WC_LOC_PROT_ERR), Status::Device(4));
    }
}
