//! The TCP initiator: single-threaded and non-blocking. `post` queues
//! requests and sends what the socket takes; `poll` and `wait` send the
//! rest and receive responses with `readv` straight into the local buffers
//! (header and data of up to [`MAX_GATHER`] responses per call, no copy in
//! user space). The window offered to each `readv` follows what the last
//! one completed, so that a trickle of responses does not cost a full
//! 1022-entry iovec per call.
//!
//! Requests and responses move in the same calls, so a large batch never
//! deadlocks on full socket buffers in both directions.

use std::collections::VecDeque;
use std::io::{self, IoSliceMut, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};

use crate::transport::error::{BufError, ConnectError, PollError, PostError};
use crate::transport::handshake;
use crate::transport::ledger::Ledger;
use crate::transport::wire::{Request, Response, WireStatus, OP_READ, RESP_LEN};
use crate::transport::{BufId, Completion, ConnectOptions, Initiator, Kind, ReadRequest, RegionDesc, Status};

/// Responses received per `readv`: two iovecs each, within `IOV_MAX`.
const MAX_GATHER: usize = 511;
/// The smallest gather window.
const MIN_GATHER: usize = 32;
/// Receive buffer asked for (the kernel caps it at `net.core.rmem_max`).
const RCVBUF: usize = 4 << 20;
/// `readv` calls per `poll`, so that a fast stream cannot hold `poll` forever.
const READS_PER_POLL: usize = 64;

/// A TCP initiator; see the [module](crate::transport) docs.
pub struct TcpInitiator {
    addr: SocketAddr,
    stream: TcpStream,
    regions: Vec<RegionDesc>,
    ledger: Ledger,
    bufs: Vec<Box<[u8]>>,
    /// Reads sent (or queued in `tx`), in order: their responses come in this order.
    pending: VecDeque<Pending>,
    /// Completions not yet handed to the caller, with their buffers.
    ready: VecDeque<(Completion, BufId)>,
    /// Encoded requests not yet taken by the socket, from `tx_sent` on.
    tx: Vec<u8>,
    tx_sent: usize,
    /// Progress within the response to `pending.front()`.
    front: Front,
    /// Where the headers of the responses after the front land.
    scratch: Vec<[u8; RESP_LEN]>,
    /// Responses offered to the next `readv`: twice what the last one
    /// completed, so that the per-call work follows what actually arrives.
    window: usize,
    next_seq: u64,
    failed: bool,
}

impl std::fmt::Debug for TcpInitiator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpInitiator")
            .field("addr", &self.addr)
            .field("outstanding", &self.ledger.outstanding())
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    wr_id: u64,
    seq: u64,
    buf: BufId,
    offset: usize,
    len: usize,
}

#[derive(Clone, Copy, Debug, Default)]
struct Front {
    hdr: [u8; RESP_LEN],
    hdr_got: usize,
    data_got: usize,
}

impl TcpInitiator {
    /// Connects and authenticates.
    pub fn connect(opts: &ConnectOptions) -> Result<TcpInitiator, ConnectError> {
        let addr = opts.addr;
        let io = |what| move |source| ConnectError::Io { addr, what, source };
        let mut stream =
            TcpStream::connect_timeout(&addr, opts.timeout).map_err(|source| ConnectError::Connect { addr, source })?;
        stream.set_nodelay(true).map_err(io("TCP_NODELAY"))?;
        stream.set_read_timeout(Some(opts.timeout)).map_err(io("socket timeout"))?;
        stream.set_write_timeout(Some(opts.timeout)).map_err(io("socket timeout"))?;
        let welcome = handshake::initiate(&mut stream, &opts.token, Kind::Tcp, addr)?;
        if !welcome.endpoint.is_empty() {
            let what = format!("a TCP target sent a {}-byte endpoint", welcome.endpoint.len());
            return Err(ConnectError::Protocol { addr, what });
        }
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&stream, RCVBUF);
        stream.set_nonblocking(true).map_err(io("O_NONBLOCK"))?;
        Ok(TcpInitiator {
            addr,
            stream,
            regions: welcome.regions,
            ledger: Ledger::new(opts.depth),
            bufs: Vec::new(),
            pending: VecDeque::new(),
            ready: VecDeque::new(),
            tx: Vec::new(),
            tx_sent: 0,
            front: Front::default(),
            scratch: vec![[0; RESP_LEN]; MAX_GATHER],
            window: MIN_GATHER,
            next_seq: 0,
            failed: false,
        })
    }

    /// The error state: `head` for the oldest read on the wire, `Flushed`
    /// for the others; nothing more is sent or received.
    fn fail(&mut self, head: Status, why: &dyn std::fmt::Display) {
        if !self.failed {
            log::debug!("remem transport: connection to {} failed: {why}", self.addr);
        }
        self.failed = true;
        let mut head = Some(head);
        while let Some(p) = self.pending.pop_front() {
            let status = head.take().unwrap_or(Status::Flushed);
            self.ready.push_back((Completion { wr_id: p.wr_id, status, len: 0 }, p.buf));
        }
        self.tx.clear();
        self.tx_sent = 0;
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Sends queued requests until the socket would block.
    fn flush_tx(&mut self) -> io::Result<()> {
        while self.tx_sent < self.tx.len() {
            match (&self.stream).write(&self.tx[self.tx_sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.tx_sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.tx.clear();
        self.tx_sent = 0;
        Ok(())
    }

    /// One `readv` into the headers and buffers of the next responses.
    fn receive(&mut self) -> io::Result<usize> {
        let k = self.pending.len().min(self.window);
        let ranges: Vec<(usize, usize, usize)> = self
            .pending
            .iter()
            .take(k)
            .enumerate()
            .map(|(i, p)| {
                let done = if i == 0 { self.front.data_got } else { 0 };
                (p.buf.index(), p.offset + done, p.offset + p.len)
            })
            .collect();
        let TcpInitiator { stream, bufs, front, scratch, .. } = self;
        // Overlapping destinations cannot be borrowed at once: then one at a time.
        let slices = match carve(bufs, &ranges) {
            Some(s) => s,
            None => carve(bufs, &ranges[..1]).unwrap_or_default(),
        };
        if slices.is_empty() {
            return Err(io::Error::other("no destination for the next response"));
        }
        let mut iov: Vec<IoSliceMut<'_>> = Vec::with_capacity(2 * slices.len());
        let mut dests = slices.into_iter().zip(scratch.iter_mut());
        if let Some((dst, _)) = dests.next() {
            if front.hdr_got < RESP_LEN {
                iov.push(IoSliceMut::new(&mut front.hdr[front.hdr_got..]));
            }
            iov.push(IoSliceMut::new(dst));
        }
        for (dst, hdr) in dests {
            iov.push(IoSliceMut::new(hdr));
            iov.push(IoSliceMut::new(dst));
        }
        (&*stream).read_vectored(&mut iov)
    }

    /// Accounts for `n` bytes that `receive` placed.
    fn consume(&mut self, mut n: usize) {
        let mut i = 0;
        while n > 0 {
            let Some(&p) = self.pending.front() else {
                return self.fail(Status::ConnectionLost, &"a response nobody asked for");
            };
            let f = &mut self.front;
            if f.hdr_got < RESP_LEN {
                let take = n.min(RESP_LEN - f.hdr_got);
                f.hdr_got += take;
                n -= take;
                if f.hdr_got < RESP_LEN {
                    return;
                }
                match Response::decode(&f.hdr) {
                    Some(r) if r.seq != p.seq => {
                        let why = format!("response to request {} while expecting {}", r.seq, p.seq);
                        return self.fail(Status::ConnectionLost, &why);
                    }
                    Some(r) if r.status == WireStatus::Access => {
                        return self.fail(Status::AccessError, &"access error");
                    }
                    Some(r) if r.status == WireStatus::Ok && r.len as usize == p.len => {}
                    other => {
                        let why = format!("bad response {other:?} to a read of {} bytes", p.len);
                        return self.fail(Status::ConnectionLost, &why);
                    }
                }
            }
            let take = n.min(p.len - f.data_got);
            f.data_got += take;
            n -= take;
            if f.data_got < p.len {
                return;
            }
            self.pending.pop_front();
            self.ready.push_back((Completion { wr_id: p.wr_id, status: Status::Success, len: p.len as u32 }, p.buf));
            i += 1;
            self.front = Front { hdr: self.scratch.get(i).copied().unwrap_or_default(), hdr_got: 0, data_got: 0 };
        }
    }

    /// Sends and receives whatever the socket allows without blocking.
    fn progress(&mut self) {
        if self.failed {
            return;
        }
        if let Err(e) = self.flush_tx() {
            return self.fail(Status::ConnectionLost, &e);
        }
        for _ in 0..READS_PER_POLL {
            if self.pending.is_empty() || self.failed {
                break;
            }
            match self.receive() {
                Ok(0) => self.fail(Status::ConnectionLost, &"the target closed the connection"),
                Ok(n) => {
                    let before = self.ready.len();
                    self.consume(n);
                    let completed = self.ready.len().saturating_sub(before);
                    self.window = (2 * completed).clamp(MIN_GATHER, MAX_GATHER);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.fail(Status::ConnectionLost, &e),
            }
            if let Err(e) = self.flush_tx() {
                self.fail(Status::ConnectionLost, &e);
            }
        }
    }

    fn drain(&mut self, out: &mut Vec<Completion>, max: usize) -> usize {
        let n = max.min(self.ready.len());
        for (c, buf) in self.ready.drain(..n) {
            self.ledger.returned(buf);
            out.push(c);
        }
        n
    }
}

/// Disjoint mutable slices `bufs[b][start..end]` for each `(b, start, end)`
/// of `ranges`, in the order given; `None` if two of them overlap.
fn carve<'a>(bufs: &'a mut [Box<[u8]>], ranges: &[(usize, usize, usize)]) -> Option<Vec<&'a mut [u8]>> {
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    // Reads are usually posted in buffer order: then there is nothing to sort.
    if !ranges.windows(2).all(|w| (w[0].0, w[0].1) <= (w[1].0, w[1].1)) {
        order.sort_unstable_by_key(|&i| (ranges[i].0, ranges[i].1));
    }
    let mut out: Vec<Option<&'a mut [u8]>> = (0..ranges.len()).map(|_| None).collect();
    let mut next = order.iter().peekable();
    for (b, buf) in bufs.iter_mut().enumerate() {
        let mut rest: &'a mut [u8] = buf;
        let mut base = 0;
        while let Some(&&i) = next.peek() {
            let (rb, start, end) = ranges[i];
            if rb != b {
                break;
            }
            next.next();
            if start < base {
                return None;
            }
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(start - base);
            let (mid, tail) = tail.split_at_mut(end - start);
            out[i] = Some(mid);
            rest = tail;
            base = end;
        }
    }
    out.into_iter().collect()
}

fn timespec(d: Duration) -> Timespec {
    Timespec { tv_sec: d.as_secs().min(i64::MAX as u64) as i64, tv_nsec: i64::from(d.subsec_nanos()) }
}

impl Initiator for TcpInitiator {
    fn regions(&self) -> &[RegionDesc] {
        &self.regions
    }

    fn alloc_buf(&mut self, len: usize) -> Result<BufId, BufError> {
        if len == 0 || len > isize::MAX as usize {
            return Err(BufError::BadLength { len });
        }
        let mut v = Vec::new();
        v.try_reserve_exact(len).map_err(|_| BufError::BadLength { len })?;
        v.resize(len, 0u8);
        let id = self.ledger.add_buf(len)?;
        self.bufs.push(v.into_boxed_slice());
        Ok(id)
    }

    fn buf(&self, id: BufId) -> Result<&[u8], BufError> {
        self.ledger.check_idle(id)?;
        Ok(&self.bufs[id.index()])
    }

    fn post(&mut self, reads: &[ReadRequest]) -> Result<(), PostError> {
        self.ledger.check_batch(reads)?;
        for r in reads {
            self.ledger.posted(r.buf);
            if self.failed {
                self.ready.push_back((Completion { wr_id: r.wr_id, status: Status::Flushed, len: 0 }, r.buf));
                continue;
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            let req = Request { op: OP_READ, rkey: r.region.rkey, addr: r.remote_addr(), len: r.len, seq };
            self.tx.extend_from_slice(&req.encode());
            self.pending.push_back(Pending {
                wr_id: r.wr_id,
                seq,
                buf: r.buf,
                offset: r.buf_offset,
                len: r.len as usize,
            });
        }
        if !self.failed {
            if let Err(e) = self.flush_tx() {
                self.fail(Status::ConnectionLost, &e);
            }
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Completion>, max: usize) -> Result<usize, PollError> {
        if self.ready.len() < max {
            self.progress();
        }
        Ok(self.drain(out, max))
    }

    fn wait(&mut self, out: &mut Vec<Completion>, min: usize, timeout: Duration) -> Result<usize, PollError> {
        let outstanding = self.ledger.outstanding();
        if min > outstanding {
            return Err(PollError::NotOutstanding { wanted: min, outstanding });
        }
        let deadline = Instant::now() + timeout;
        loop {
            self.progress();
            if self.ready.len() >= min {
                return Ok(self.drain(out, usize::MAX));
            }
            let now = Instant::now();
            if now >= deadline {
                let got = self.drain(out, usize::MAX);
                return Err(PollError::Timeout { got, wanted: min, waited: timeout });
            }
            let mut flags = PollFlags::IN;
            if self.tx_sent < self.tx.len() {
                flags |= PollFlags::OUT;
            }
            let mut fds = [PollFd::new(&self.stream, flags)];
            match poll(&mut fds, Some(&timespec(deadline - now))) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(PollError::Io { what: "poll(2) on the connection", source: e.into() }),
            }
        }
    }

    fn max_outstanding(&self) -> usize {
        self.ledger.depth()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bufs() -> Vec<Box<[u8]>> {
        vec![vec![0u8; 16].into_boxed_slice(), vec![0u8; 8].into_boxed_slice()]
    }

    #[test]
    fn carve_gives_disjoint_slices_in_request_order() {
        let mut b = bufs();
        let s = carve(&mut b, &[(1, 4, 8), (0, 8, 16), (0, 0, 4), (1, 0, 2)]).unwrap();
        let lens: Vec<usize> = s.iter().map(|s| s.len()).collect();
        assert_eq!(lens, [4, 8, 4, 2]);
        for (k, s) in s.into_iter().enumerate() {
            s.fill(k as u8 + 1);
        }
        assert_eq!(&b[0][..], &[3, 3, 3, 3, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2]);
        assert_eq!(&b[1][..], &[4, 4, 0, 0, 1, 1, 1, 1]);
    }

    #[test]
    fn carve_refuses_overlaps() {
        let mut b = bufs();
        assert!(carve(&mut b, &[(0, 0, 8), (0, 7, 9)]).is_none());
        assert!(carve(&mut b, &[(0, 2, 4), (0, 2, 4)]).is_none());
        assert!(carve(&mut b, &[(0, 0, 8), (0, 8, 9)]).is_some());
        assert_eq!(carve(&mut b, &[]).map(|v| v.len()), Some(0));
    }
}
