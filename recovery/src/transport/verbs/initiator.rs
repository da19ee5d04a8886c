//! The verbs initiator: batches of RDMA READs posted with one
//! `ibv_post_send`, completions taken with `ibv_poll_cq`.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma_sys::{ibv_access_flags, ibv_wc};

use super::device::Device;
use super::mr::LocalBuf;
use super::post::{status_of, ReadWr, WrBatch};
use super::qp::Qp;
use crate::transport::handshake::{self, Deadline, Frame, QpEndpoint};
use crate::transport::ledger::Ledger;
use crate::transport::{
    BufError, BufId, Completion, ConnectError, ConnectOptions, Initiator, Kind, PollError, PostError, ReadRequest,
    RegionDesc, Status,
};

/// Completions taken per `ibv_poll_cq`.
const POLL_BATCH: usize = 64;

/// A verbs initiator; see the [module](super) docs.
pub struct VerbsInitiator {
    // Destroyed first: once the QP is gone the device writes no buffer.
    qp: Qp,
    bufs: Vec<LocalBuf>,
    dev: Arc<Device>,
    /// Keeps the target's queue pair alive; closed last.
    _control: TcpStream,
    addr: SocketAddr,
    regions: Vec<RegionDesc>,
    ledger: Ledger,
    /// Per internal wr_id: the caller's wr_id and the buffer, while outstanding.
    slots: Vec<Option<(u64, BufId)>>,
    free_slots: Vec<u32>,
    batch: WrBatch,
    wrs: Vec<ReadWr>,
    wcs: Vec<ibv_wc>,
}

impl std::fmt::Debug for VerbsInitiator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsInitiator")
            .field("addr", &self.addr)
            .field("outstanding", &self.ledger.outstanding())
            .finish_non_exhaustive()
    }
}

impl VerbsInitiator {
    /// Opens the device (first, so that a host without RDMA fails before
    /// any network traffic), connects, authenticates and connects the
    /// queue pairs.
    pub fn connect(opts: &ConnectOptions) -> Result<VerbsInitiator, ConnectError> {
        let dev = Device::open(&opts.device)?;
        let qp = Qp::new(&dev, u32::try_from(opts.depth).unwrap_or(u32::MAX))?;
        let addr = opts.addr;
        let io = |what| move |source| ConnectError::Io { addr, what, source };
        let protocol = |what: String| ConnectError::Protocol { addr, what };
        let deadline = Instant::now() + opts.timeout;
        let s =
            TcpStream::connect_timeout(&addr, opts.timeout).map_err(|source| ConnectError::Connect { addr, source })?;
        s.set_nodelay(true).map_err(io("TCP_NODELAY"))?;
        let mut d = Deadline { s: &s, at: deadline };
        let (welcome, mut ch) = handshake::initiate(&mut d, &opts.token, Kind::Verbs, addr)?;
        let remote = QpEndpoint::decode(&welcome.endpoint).map_err(protocol)?;
        qp.connect(&remote, ibv_access_flags(0))?;
        ch.write_frame(&mut d, Frame::Endpoint, &qp.endpoint().encode()).map_err(io("sending ENDPOINT"))?;
        let (ty, body) = ch
            .read_frame(&mut d)
            .map_err(io("reading READY"))?
            .map_err(|what| ConnectError::Tampered { addr, what })?;
        handshake::expect(ty, body, Frame::Ready, addr)?;
        s.set_read_timeout(None).map_err(io("socket timeout"))?;
        let depth = qp.depth() as usize;
        let wcs = (0..POLL_BATCH)
            .map(|_| {
                // SAFETY: ibv_wc is plain data (integers and a union of
                // integers): all-zero bytes are a valid value.
                unsafe { std::mem::zeroed::<ibv_wc>() }
            })
            .collect();
        Ok(VerbsInitiator {
            qp,
            bufs: Vec::new(),
            dev,
            _control: s,
            addr,
            regions: welcome.regions,
            ledger: Ledger::new(depth),
            slots: vec![None; depth],
            free_slots: (0..depth as u32).rev().collect(),
            batch: WrBatch::new(),
            wrs: Vec::new(),
            wcs,
        })
    }

    /// Takes up to `max` completions off the CQ.
    fn take(&mut self, out: &mut Vec<Completion>, max: usize) -> Result<usize, PollError> {
        let mut total = 0;
        while total < max {
            let want = (max - total).min(self.wcs.len());
            let n = self.qp.poll(&mut self.wcs[..want])?;
            for wc in &self.wcs[..n] {
                let slot = wc.wr_id as usize;
                let Some((wr_id, buf)) = self.slots.get_mut(slot).and_then(Option::take) else {
                    let what = "ibv_poll_cq returned an unknown work request";
                    return Err(PollError::Io { what, source: std::io::Error::other(format!("wr_id {slot}")) });
                };
                self.free_slots.push(slot as u32);
                self.ledger.returned(buf);
                let status = status_of(wc.status);
                let len = if status == Status::Success { wc.byte_len } else { 0 };
                out.push(Completion { wr_id, status, len, crc: None });
            }
            total += n;
            if n < want {
                break;
            }
        }
        Ok(total)
    }
}

impl Initiator for VerbsInitiator {
    fn regions(&self) -> &[RegionDesc] {
        &self.regions
    }

    fn alloc_buf(&mut self, len: usize) -> Result<BufId, BufError> {
        let buf = LocalBuf::new(&self.dev, len).ok_or(BufError::BadLength { len })??;
        let id = self.ledger.add_buf(len)?;
        self.bufs.push(buf);
        Ok(id)
    }

    fn buf(&self, id: BufId) -> Result<&[u8], BufError> {
        self.ledger.check_idle(id)?;
        // SAFETY: no read into the buffer is outstanding (checked just
        // above), and none can be posted while `&self` is borrowed.
        Ok(unsafe { self.bufs[id.index()].bytes() })
    }

    fn post(&mut self, reads: &[ReadRequest]) -> Result<(), PostError> {
        self.ledger.check_batch(reads)?;
        self.wrs.clear();
        for r in reads {
            let slot = self.free_slots.pop().expect("the ledger keeps the batch within the depth");
            self.slots[slot as usize] = Some((r.wr_id, r.buf));
            let (local_addr, lkey) = self.bufs[r.buf.index()].dest(r.buf_offset);
            self.wrs.push(ReadWr {
                wr_id: u64::from(slot),
                remote_addr: r.remote_addr(),
                rkey: r.region.rkey,
                local_addr,
                lkey,
                len: r.len,
            });
        }
        let head = self.batch.build(&self.wrs);
        // SAFETY: every request lands inside a buffer of this initiator
        // (checked by the ledger), registered in this device's PD; the
        // buffers live as long as `self`, outlived by nothing the device
        // does (the QP is destroyed first), and `buf()` refuses to show a
        // buffer while reads into it are outstanding.
        let posted = match unsafe { self.qp.post(head) } {
            Ok(()) => reads.len(),
            Err((bad, source)) => {
                let refused = self.batch.index_of(bad).unwrap_or(0);
                for w in &self.wrs[refused..] {
                    self.slots[w.wr_id as usize] = None;
                    self.free_slots.push(w.wr_id as u32);
                }
                for r in &reads[..refused] {
                    self.ledger.posted(r.buf);
                }
                return Err(PostError::Device { refused, source });
            }
        };
        for r in &reads[..posted] {
            self.ledger.posted(r.buf);
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Completion>, max: usize) -> Result<usize, PollError> {
        self.take(out, max)
    }

    fn wait(&mut self, out: &mut Vec<Completion>, min: usize, timeout: Duration) -> Result<usize, PollError> {
        let outstanding = self.ledger.outstanding();
        if min > outstanding {
            return Err(PollError::NotOutstanding { wanted: min, outstanding });
        }
        let start = Instant::now();
        let mut got = 0;
        let mut idle = 0u32;
        loop {
            let n = self.take(out, usize::MAX)?;
            got += n;
            if got >= min {
                return Ok(got);
            }
            if start.elapsed() >= timeout {
                return Err(PollError::Timeout { got, wanted: min, waited: timeout });
            }
            // Spin briefly (completions come in microseconds), then yield,
            // then sleep, so that a long wait does not burn a CPU.
            idle = if n == 0 { idle.saturating_add(1) } else { 0 };
            match idle {
                0..=1000 => std::hint::spin_loop(),
                1001..=10_000 => std::thread::yield_now(),
                _ => std::thread::sleep(Duration::from_micros(50)),
            }
        }
    }

    fn max_outstanding(&self) -> usize {
        self.ledger.depth()
    }
}
