//! The TCP initiator: single-threaded and non-blocking. `post` seals the
//! requests and sends what the socket takes; `poll` and `wait` send the
//! rest, read sealed bytes, open each whole Noise message and copy the
//! responses it carries into the local buffers ([`Receiver`], pure).
//!
//! Requests and responses move in the same calls, so a large batch never
//! deadlocks on full socket buffers in both directions.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};

use crate::transport::channel::Channel;
use crate::transport::error::{BufError, ConnectError, PollError, PostError};
use crate::transport::handshake::{self, Deadline};
use crate::transport::ledger::Ledger;
use crate::transport::wire::{Request, Response, WireStatus, CRC_LEN, OP_READ, RESP_LEN};
use crate::transport::{BufId, Completion, ConnectOptions, Initiator, Kind, ReadRequest, RegionDesc, Status};

/// Receive buffer asked for (the kernel caps it at `net.core.rmem_max`).
const RCVBUF: usize = 4 << 20;
/// Socket reads per `poll`, so that a fast stream cannot hold `poll` forever.
const READS_PER_POLL: usize = 64;

/// A TCP initiator; see the [module](crate::transport) docs.
pub struct TcpInitiator {
    addr: SocketAddr,
    stream: TcpStream,
    regions: Vec<RegionDesc>,
    ledger: Ledger,
    bufs: Vec<Box<[u8]>>,
    ch: Channel,
    rx: Receiver,
    /// Sealed requests not yet taken by the socket, from `tx_sent` on.
    tx: Vec<u8>,
    tx_sent: usize,
    /// Requests of one `post`, before sealing.
    plain_tx: Vec<u8>,
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

/// A read on the wire, waiting for its response.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pending {
    pub(crate) wr_id: u64,
    pub(crate) seq: u64,
    pub(crate) buf: BufId,
    pub(crate) offset: usize,
    pub(crate) len: usize,
}

#[derive(Clone, Copy, Debug, Default)]
struct Front {
    hdr: [u8; RESP_LEN],
    hdr_got: usize,
    data_got: usize,
    crc: [u8; CRC_LEN],
    crc_got: usize,
}

/// The responses side, pure: the reads on the wire, in order, and the
/// progress within the first one's response. Every header is checked
/// against the read it answers before a byte of data lands.
#[derive(Debug, Default)]
pub(crate) struct Receiver {
    pub(crate) pending: VecDeque<Pending>,
    pub(crate) ready: VecDeque<(Completion, BufId)>,
    front: Front,
}

impl Receiver {
    /// Consumes opened response bytes, landing data in `bufs` (every
    /// pending read's range lies inside its buffer: the ledger checked it).
    /// `Err`: the connection must fail with this status for the oldest read.
    pub(crate) fn feed(&mut self, mut b: &[u8], bufs: &mut [Box<[u8]>]) -> Result<(), (Status, String)> {
        while !b.is_empty() {
            let Some(&p) = self.pending.front() else {
                return Err((Status::ConnectionLost, "a response nobody asked for".into()));
            };
            let f = &mut self.front;
            if f.hdr_got < RESP_LEN {
                let n = b.len().min(RESP_LEN - f.hdr_got);
                f.hdr[f.hdr_got..f.hdr_got + n].copy_from_slice(&b[..n]);
                f.hdr_got += n;
                b = &b[n..];
                if f.hdr_got < RESP_LEN {
                    return Ok(());
                }
                match Response::decode(&f.hdr) {
                    Some(r) if r.seq != p.seq => {
                        let why = format!("response to request {} while expecting {}", r.seq, p.seq);
                        return Err((Status::ConnectionLost, why));
                    }
                    Some(r) if r.status == WireStatus::Access => {
                        return Err((Status::AccessError, "access error".into()))
                    }
                    Some(r) if r.status == WireStatus::Ok && r.len as usize == p.len => {}
                    other => {
                        return Err((
                            Status::ConnectionLost,
                            format!("bad response {other:?} to a read of {} bytes", p.len),
                        ))
                    }
                }
            }
            if f.data_got < p.len {
                let n = b.len().min(p.len - f.data_got);
                let at = p.offset + f.data_got;
                let Some(dst) = bufs.get_mut(p.buf.index()).and_then(|buf| buf.get_mut(at..at + n)) else {
                    return Err((Status::ConnectionLost, "a read outside its buffer".into()));
                };
                dst.copy_from_slice(&b[..n]);
                f.data_got += n;
                b = &b[n..];
                if f.data_got < p.len {
                    return Ok(());
                }
            }
            let n = b.len().min(CRC_LEN - f.crc_got);
            f.crc[f.crc_got..f.crc_got + n].copy_from_slice(&b[..n]);
            f.crc_got += n;
            b = &b[n..];
            if f.crc_got < CRC_LEN {
                return Ok(());
            }
            let crc = Some(u32::from_le_bytes(f.crc));
            self.pending.pop_front();
            self.ready
                .push_back((Completion { wr_id: p.wr_id, status: Status::Success, len: p.len as u32, crc }, p.buf));
            self.front = Front::default();
        }
        Ok(())
    }
}

impl TcpInitiator {
    /// Connects and authenticates, all within `opts.timeout`.
    pub fn connect(opts: &ConnectOptions) -> Result<TcpInitiator, ConnectError> {
        let addr = opts.addr;
        let deadline = Instant::now() + opts.timeout;
        let io = |what| move |source| ConnectError::Io { addr, what, source };
        let stream =
            TcpStream::connect_timeout(&addr, opts.timeout).map_err(|source| ConnectError::Connect { addr, source })?;
        stream.set_nodelay(true).map_err(io("TCP_NODELAY"))?;
        let (welcome, mut ch) =
            handshake::initiate(&mut Deadline { s: &stream, at: deadline }, &opts.token, Kind::Tcp, addr)?;
        if !welcome.endpoint.is_empty() {
            let what = format!("a TCP target sent a {}-byte endpoint", welcome.endpoint.len());
            return Err(ConnectError::Protocol { addr, what });
        }
        if !ch.take_pending().is_empty() {
            return Err(ConnectError::Protocol { addr, what: "data before any request".into() });
        }
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&stream, RCVBUF);
        stream.set_nonblocking(true).map_err(io("O_NONBLOCK"))?;
        Ok(TcpInitiator {
            addr,
            stream,
            regions: welcome.regions,
            ledger: Ledger::new(opts.depth),
            bufs: Vec::new(),
            ch,
            rx: Receiver::default(),
            tx: Vec::new(),
            tx_sent: 0,
            plain_tx: Vec::new(),
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
        while let Some(p) = self.rx.pending.pop_front() {
            let status = head.take().unwrap_or(Status::Flushed);
            self.rx.ready.push_back((Completion { wr_id: p.wr_id, status, len: 0, crc: None }, p.buf));
        }
        self.tx.clear();
        self.tx_sent = 0;
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Sends sealed requests until the socket would block.
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

    /// Opens every whole message received and lands its responses.
    fn open_all(&mut self) {
        let TcpInitiator { ch, rx, bufs, .. } = self;
        let failure = loop {
            match ch.open_next() {
                Ok(Some(plain)) => {
                    if let Err(f) = rx.feed(plain, bufs) {
                        break Some(f);
                    }
                }
                Ok(None) => break None,
                Err(e) => break Some((Status::ConnectionLost, format!("the connection was tampered with: {e}"))),
            }
        };
        if let Some((status, why)) = failure {
            self.fail(status, &why);
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
            if self.rx.pending.is_empty() || self.failed {
                break;
            }
            match self.ch.fill_from(&mut &self.stream) {
                Ok(0) => self.fail(Status::ConnectionLost, &"the target closed the connection"),
                Ok(_) => self.open_all(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.fail(Status::ConnectionLost, &e),
            }
            if !self.failed {
                if let Err(e) = self.flush_tx() {
                    self.fail(Status::ConnectionLost, &e);
                }
            }
        }
    }

    fn drain(&mut self, out: &mut Vec<Completion>, max: usize) -> usize {
        let n = max.min(self.rx.ready.len());
        for (c, buf) in self.rx.ready.drain(..n) {
            self.ledger.returned(buf);
            out.push(c);
        }
        n
    }
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
        self.bufs.get(id.index()).map(|b| &b[..]).ok_or(BufError::Unknown(id))
    }

    fn post(&mut self, reads: &[ReadRequest]) -> Result<(), PostError> {
        self.ledger.check_batch(reads)?;
        self.plain_tx.clear();
        for r in reads {
            self.ledger.posted(r.buf);
            if self.failed {
                self.rx
                    .ready
                    .push_back((Completion { wr_id: r.wr_id, status: Status::Flushed, len: 0, crc: None }, r.buf));
                continue;
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            let req = Request { op: OP_READ, rkey: r.region.rkey, addr: r.remote_addr(), len: r.len, seq };
            self.plain_tx.extend_from_slice(&req.encode());
            self.rx.pending.push_back(Pending {
                wr_id: r.wr_id,
                seq,
                buf: r.buf,
                offset: r.buf_offset,
                len: r.len as usize,
            });
        }
        if !self.failed {
            if let Err(e) = self.ch.seal(&self.plain_tx, &mut self.tx) {
                self.fail(Status::ConnectionLost, &e);
            } else if let Err(e) = self.flush_tx() {
                self.fail(Status::ConnectionLost, &e);
            }
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Completion>, max: usize) -> Result<usize, PollError> {
        if self.rx.ready.len() < max {
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
            if self.rx.ready.len() >= min {
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

    fn pending(wr_id: u64, seq: u64, buf: u32, offset: usize, len: usize) -> Pending {
        Pending { wr_id, seq, buf: BufId(buf), offset, len }
    }

    fn ok(seq: u64, data: &[u8]) -> Vec<u8> {
        let mut v = Response { status: WireStatus::Ok, len: data.len() as u32, seq }.encode().to_vec();
        v.extend_from_slice(data);
        v.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
        v
    }

    #[test]
    fn responses_split_anywhere_land_with_their_crc() {
        let mut stream = ok(0, b"abcdef");
        stream.extend_from_slice(&ok(1, &[7u8; 100]));
        for step in [1, 2, 3, 5, 16, 17, 1000] {
            let mut bufs = vec![vec![0u8; 200].into_boxed_slice()];
            let mut rx = Receiver::default();
            rx.pending.extend([pending(10, 0, 0, 0, 6), pending(11, 1, 0, 50, 100)]);
            for piece in stream.chunks(step) {
                rx.feed(piece, &mut bufs).unwrap();
            }
            let done: Vec<_> = rx.ready.iter().map(|(c, _)| (c.wr_id, c.status, c.crc)).collect();
            assert_eq!(
                done,
                [
                    (10, Status::Success, Some(crc32fast::hash(b"abcdef"))),
                    (11, Status::Success, Some(crc32fast::hash(&[7u8; 100])))
                ]
            );
            assert_eq!(&bufs[0][..6], b"abcdef");
            assert_eq!(&bufs[0][50..150], &[7u8; 100][..]);
        }
    }

    #[test]
    fn wrong_headers_fail_before_any_data_lands() {
        let mut bufs = vec![vec![0u8; 16].into_boxed_slice()];
        for (bytes, status) in [
            (ok(5, b"12345678"), Status::ConnectionLost),
            (ok(0, b"1234"), Status::ConnectionLost),
            (Response { status: WireStatus::Access, len: 0, seq: 0 }.encode().to_vec(), Status::AccessError),
            (Response { status: WireStatus::BadRequest, len: 0, seq: 0 }.encode().to_vec(), Status::ConnectionLost),
            (vec![9u8; 16], Status::ConnectionLost),
        ] {
            let mut rx = Receiver::default();
            rx.pending.push_back(pending(1, 0, 0, 0, 8));
            assert_eq!(rx.feed(&bytes, &mut bufs).unwrap_err().0, status);
            assert_eq!(&bufs[0][..], &[0u8; 16], "nothing landed");
        }
        let mut rx = Receiver::default();
        assert!(rx.feed(&[0], &mut bufs).is_err(), "a response nobody asked for");
    }
}
