//! The TCP target: two threads per connection. The serving thread opens
//! the sealed requests and answers them in chunks of up to [`CHUNK`]: it
//! resolves a chunk under the region table's lock (held for lookups
//! only), copies each response's bytes out of the served memory into a
//! buffer (computing their CRC there, and touching the pages it will copy
//! next so that their misses overlap), and seals the buffer a Noise
//! message at a time, where the bytes lie. A full buffer goes to the
//! connection's writer thread, which sends it and hands it back; the
//! serving thread meanwhile fills the next one ([`BUFFERS`] in all). No
//! lock, and no memory view (which may be a lock guard), is ever held
//! while waiting for the writer or for the socket: a peer that stops
//! reading stalls its own connection only, never registration,
//! deregistration or the owner's writes.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use crate::transport::channel::{Channel, MAX_MSG, MAX_PLAIN};
use crate::transport::error::{RegisterError, ServeError};
use crate::transport::handshake::{self, Deadline, Frame, RejectCode, MAX_REGIONS};
use crate::transport::memory::{MemoryView, SourceMemory};
use crate::transport::server::{Counters, Server, Service};
use crate::transport::token::random;
use crate::transport::wire::{Request, Response, WireStatus, OP_READ, REQ_LEN};
use crate::transport::{Kind, RegionDesc, ServeOptions, Target, TargetStats, MAX_READ_LEN};

/// Requests resolved per look at the region table.
const CHUNK: usize = 512;
/// Sealed bytes gathered before they go to the writer (every view released first).
const OUT_FLUSH: usize = 1 << 20;
/// Buffers of a connection: one being filled, the others being written or free.
const BUFFERS: usize = 3;
/// Pages touched ahead of the copy, a group at a time: a byte every
/// [`TOUCH_STRIDE`] of the next group's pages, so that their page walks
/// and first cache misses overlap instead of stalling each page's copy
/// in turn (a copy of scattered 4 KiB pages out of 1 GiB costs about a
/// third less on its own; within a loopback pull the gain is lost in the
/// noise).
const TOUCH_GROUP: usize = 8;
const TOUCH_STRIDE: usize = 1024;
/// Send buffer asked for (the kernel caps it at `net.core.wmem_max`).
const SNDBUF: usize = 4 << 20;

/// A TCP target; see the [module](crate::transport) docs.
pub struct TcpTarget {
    service: Arc<TcpService>,
    server: Server,
}

impl std::fmt::Debug for TcpTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTarget").field("local_addr", &self.server.local_addr()).finish_non_exhaustive()
    }
}

struct Served {
    desc: RegionDesc,
    memory: Arc<dyn SourceMemory>,
}

struct TcpService {
    regions: RwLock<HashMap<u32, Arc<Served>>>,
    write_timeout: Duration,
}

impl TcpTarget {
    /// Listens on `opts.listen` and serves the regions registered from now on.
    pub fn serve(opts: ServeOptions) -> Result<TcpTarget, ServeError> {
        let service = Arc::new(TcpService { regions: RwLock::new(HashMap::new()), write_timeout: opts.write_timeout });
        let server = Server::start(&opts, service.clone())?;
        Ok(TcpTarget { service, server })
    }
}

impl Target for TcpTarget {
    fn register(&self, memory: Arc<dyn SourceMemory>) -> Result<RegionDesc, RegisterError> {
        let (addr, len) = {
            let view = memory.view();
            (view.as_ptr() as u64, view.len() as u64)
        };
        if len == 0 {
            return Err(RegisterError::Empty);
        }
        let mut regions = self.service.regions.write();
        let rkey = loop {
            let mut b = [0u8; 4];
            random(&mut b).map_err(|e| RegisterError::Random(e.to_string()))?;
            let k = u32::from_le_bytes(b);
            if k != 0 && !regions.contains_key(&k) {
                break k;
            }
        };
        let desc = RegionDesc { addr, rkey, len };
        regions.insert(rkey, Arc::new(Served { desc, memory }));
        Ok(desc)
    }

    fn deregister(&self, rkey: u32) -> Result<(), RegisterError> {
        self.service.regions.write().remove(&rkey).map(drop).ok_or(RegisterError::UnknownKey(rkey))
    }

    fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    fn stats(&self) -> TargetStats {
        self.server.stats()
    }
}

/// How a chunk of requests ended.
enum Answered {
    /// All answered; keep serving.
    Ok,
    /// An error response was sent: the connection is in the error state.
    Failed,
}

impl Service for TcpService {
    fn kind(&self) -> Kind {
        Kind::Tcp
    }

    fn serve(&self, mut conn: TcpStream, mut ch: Channel, peer: SocketAddr, deadline: Instant, counters: &Counters) {
        let mut regions: Vec<RegionDesc> = self.regions.read().values().map(|s| s.desc).collect();
        let mut d = Deadline { s: &conn, at: deadline };
        if regions.len() > MAX_REGIONS {
            let body = handshake::encode_reject(RejectCode::Internal, "the target has too many regions");
            let _ = ch.write_frame(&mut d, Frame::Reject, &body);
            return;
        }
        regions.sort_by_key(|r| r.addr);
        let accept = handshake::encode_accept(&regions, &[]);
        if let Err(e) = ch.write_frame(&mut d, Frame::Accept, &accept) {
            log::warn!("remem transport: sending ACCEPT to {peer}: {e}");
            return;
        }
        // Reads wait for requests indefinitely; a peer that takes no data
        // for write_timeout is dropped.
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(&conn, SNDBUF);
        if conn.set_read_timeout(None).and_then(|()| conn.set_write_timeout(Some(self.write_timeout))).is_err() {
            return;
        }
        let reqs = ch.take_pending();
        let writer_conn = match conn.try_clone() {
            Ok(c) => c,
            Err(e) => return log::warn!("remem transport: connection from {peer}: no socket for its writer: {e}"),
        };
        let ended = thread::scope(|scope| {
            let (full_tx, full_rx) = mpsc::sync_channel::<Batch>(BUFFERS);
            let (empty_tx, empty_rx) = mpsc::sync_channel::<Vec<u8>>(BUFFERS);
            for _ in 1..BUFFERS {
                let _ = empty_tx.send(Vec::with_capacity(OUT_CAP));
            }
            let writer = thread::Builder::new()
                .name("remem-tcp-write".into())
                .spawn_scoped(scope, move || write_batches(writer_conn, &full_rx, &empty_tx, counters))
                .map_err(|e| io::Error::other(format!("no writer thread: {e}")))?;
            let mut tx = Outbox::new(ch, Sink::Writer { full: full_tx, empty: empty_rx }, counters);
            let served = self.serve_requests(&mut conn, &mut tx, reqs);
            // Closing the outbox ends the writer once it sent every buffer.
            drop(tx);
            let written = writer.join().unwrap_or_else(|_| Err(io::Error::other("the writer panicked")));
            // The writer's error says why, when the serving thread only saw it go.
            written.and(served)
        });
        match ended {
            Ok(Answered::Ok) => {}
            Ok(Answered::Failed) => {
                // Error state: nothing more is answered. Half-close so that
                // the error response (written: the writer is done) is not
                // lost to a reset, and wait for the initiator to hang up.
                if conn.shutdown(Shutdown::Write).and_then(|()| conn.set_read_timeout(Some(self.write_timeout))).is_ok()
                {
                    let _ = io::copy(&mut conn, &mut io::sink());
                }
            }
            Err(e) => {
                if !matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) {
                    log::info!("remem transport: connection from {peer} ended: {e}");
                }
            }
        }
    }
}

/// Capacity of a buffer: a flush's worth and the messages that may finish past it.
const OUT_CAP: usize = OUT_FLUSH + 2 * MAX_MSG;

/// A full buffer on its way to the writer.
struct Batch {
    bytes: Vec<u8>,
    /// Reads whose last byte is in `bytes`: served once it is written.
    served: u64,
}

/// The writer thread of a connection: sends each buffer, counts its reads
/// as served, hands it back; ends when the serving thread closes its
/// outbox, or at the first failed write (a peer that took nothing for the
/// write timeout, or a closed connection), which also shuts the socket
/// down so that the serving thread stops waiting for requests.
fn write_batches(
    mut conn: TcpStream,
    full: &mpsc::Receiver<Batch>,
    empty: &mpsc::SyncSender<Vec<u8>>,
    counters: &Counters,
) -> io::Result<()> {
    for mut batch in full {
        if let Err(e) = conn.write_all(&batch.bytes) {
            // The serving thread may be waiting for requests: end its read too.
            let _ = conn.shutdown(Shutdown::Both);
            return Err(e);
        }
        Counters::add(&counters.reads_served, batch.served);
        batch.bytes.clear();
        // The serving thread may be gone already; then nothing waits for it.
        let _ = empty.try_send(batch.bytes);
    }
    Ok(())
}

/// Where an outbox's full buffers go.
enum Sink<'a> {
    /// To the connection's writer thread, which hands them back empty.
    Writer { full: mpsc::SyncSender<Batch>, empty: mpsc::Receiver<Vec<u8>> },
    /// Written at once, on the calling thread (fuzzing).
    Direct(&'a mut dyn Write),
}

/// The sending half of a connection: plaintext written straight into
/// the open Noise message at the end of `out` and sealed there, full
/// buffers handed to the sink.
struct Outbox<'a> {
    ch: Channel,
    out: Vec<u8>,
    /// Where the open message's plaintext starts in `out`.
    open: Option<usize>,
    /// Reads whose last byte is in `out`.
    served: u64,
    sink: Sink<'a>,
    counters: &'a Counters,
}

fn writer_gone() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the connection's writer stopped")
}

impl<'a> Outbox<'a> {
    fn new(ch: Channel, sink: Sink<'a>, counters: &'a Counters) -> Outbox<'a> {
        Outbox { ch, out: Vec::with_capacity(OUT_CAP), open: None, served: 0, sink, counters }
    }

    /// Room left in the open message, opening one if none is.
    fn room(&mut self) -> usize {
        let out = &mut self.out;
        let start = *self.open.get_or_insert_with(|| Channel::begin(out));
        MAX_PLAIN - (self.out.len() - start)
    }

    /// Appends `bytes` as plaintext, sealing each message that fills up;
    /// `crc`, if given, also hashes them (from where they lie in `out`).
    fn push(&mut self, mut bytes: &[u8], mut crc: Option<&mut crc32fast::Hasher>) -> io::Result<()> {
        while !bytes.is_empty() {
            let n = self.room().min(bytes.len());
            let from = self.out.len();
            self.out.extend_from_slice(&bytes[..n]);
            if let Some(c) = crc.as_deref_mut() {
                c.update(&self.out[from..]);
            }
            bytes = &bytes[n..];
            if self.room() == 0 {
                self.seal()?;
            }
        }
        Ok(())
    }

    /// Seals the open message, if any.
    fn seal(&mut self) -> io::Result<()> {
        match self.open.take() {
            Some(start) => self.ch.finish(&mut self.out, start).map_err(io::Error::other),
            None => Ok(()),
        }
    }

    /// Seals what is open and hands every sealed byte to the sink; may
    /// block until the writer frees a buffer (the caller holds no lock and
    /// no view).
    fn flush(&mut self) -> io::Result<()> {
        self.seal()?;
        if self.out.is_empty() {
            return Ok(());
        }
        let served = std::mem::take(&mut self.served);
        match &mut self.sink {
            Sink::Writer { full, empty } => {
                let next = Vec::new();
                let bytes = std::mem::replace(&mut self.out, next);
                full.send(Batch { bytes, served }).map_err(|_| writer_gone())?;
                self.out = empty.recv().map_err(|_| writer_gone())?;
            }
            Sink::Direct(to) => {
                to.write_all(&self.out)?;
                self.out.clear();
                Counters::add(&self.counters.reads_served, served);
            }
        }
        Ok(())
    }
}

impl TcpService {
    fn serve_requests(&self, conn: &mut TcpStream, tx: &mut Outbox<'_>, mut reqs: Vec<u8>) -> io::Result<Answered> {
        loop {
            while let Some(p) = tx.ch.open_next().map_err(io::Error::other)? {
                reqs.extend_from_slice(p);
            }
            let whole = reqs.len() / REQ_LEN * REQ_LEN;
            for chunk in reqs[..whole].chunks(CHUNK * REQ_LEN) {
                if let Answered::Failed = self.answer(tx, chunk)? {
                    return Ok(Answered::Failed);
                }
            }
            reqs.drain(..whole);
            // Everything answered goes out before waiting for more requests.
            tx.flush()?;
            if tx.ch.fill_from(conn)? == 0 {
                return Ok(Answered::Ok);
            }
        }
    }

    /// Answers up to [`CHUNK`] requests into `tx`.
    fn answer(&self, tx: &mut Outbox<'_>, chunk: &[u8]) -> io::Result<Answered> {
        // Resolve every request to (region index, start, end) while holding
        // the table; the regions stay alive through their Arcs.
        let mut used: Vec<Arc<Served>> = Vec::new();
        let mut plan: Vec<(u64, usize, usize, usize)> = Vec::with_capacity(chunk.len() / REQ_LEN);
        let mut failure: Option<(WireStatus, u64)> = None;
        {
            let table = self.regions.read();
            for raw in chunk.chunks_exact(REQ_LEN) {
                let req = Request::decode(raw.try_into().map_err(io::Error::other)?);
                if req.op != OP_READ || req.len == 0 || req.len > MAX_READ_LEN {
                    failure = Some((WireStatus::BadRequest, req.seq));
                    break;
                }
                let served = table.get(&req.rkey).filter(|s| s.desc.contains_addr(req.addr, u64::from(req.len)));
                let Some(served) = served else {
                    failure = Some((WireStatus::Access, req.seq));
                    break;
                };
                let idx = match used.iter().position(|u| Arc::ptr_eq(u, served)) {
                    Some(i) => i,
                    None => {
                        used.push(served.clone());
                        used.len() - 1
                    }
                };
                let start = (req.addr - served.desc.addr) as usize;
                plan.push((req.seq, idx, start, start + req.len as usize));
            }
        }
        let mut views: Vec<MemoryView<'_>> = used.iter().map(|s| s.memory.view()).collect();
        for (k, &(seq, i, start, end)) in plan.iter().enumerate() {
            // A view shorter than at registration cannot serve the range.
            if end > views[i].len() {
                failure = Some((WireStatus::Access, seq));
                break;
            }
            if k % TOUCH_GROUP == 0 {
                touch(&views, plan.get(k + TOUCH_GROUP..).unwrap_or_default());
            }
            tx.push(&Response { status: WireStatus::Ok, len: (end - start) as u32, seq }.encode(), None)?;
            let mut crc = crc32fast::Hasher::new();
            let mut at = start;
            while at < end {
                if tx.out.len() >= OUT_FLUSH {
                    drop(views);
                    tx.flush()?;
                    views = used.iter().map(|s| s.memory.view()).collect();
                    if end > views[i].len() {
                        return Err(io::Error::other("a region shrank while one of its reads was being sent"));
                    }
                }
                let n = tx.room().min(end - at);
                tx.push(&views[i][at..at + n], Some(&mut crc))?;
                at += n;
            }
            tx.push(&crc.finalize().to_le_bytes(), None)?;
            tx.served += 1;
        }
        drop(views);
        if let Some((status, seq)) = failure {
            tx.push(&Response { status, len: 0, seq }.encode(), None)?;
            tx.flush()?;
            Counters::add(&tx.counters.access_errors, 1);
            return Ok(Answered::Failed);
        }
        Ok(Answered::Ok)
    }
}

/// Reads a byte every [`TOUCH_STRIDE`] of the next [`TOUCH_GROUP`] planned
/// ranges (those in range of their views; the rest are checked when served).
fn touch(views: &[MemoryView<'_>], next: &[(u64, usize, usize, usize)]) {
    let mut acc = 0u8;
    for &(_, i, start, end) in next.iter().take(TOUCH_GROUP) {
        if let Some(bytes) = views.get(i).and_then(|v| v.get(start..end)) {
            for b in bytes.iter().step_by(TOUCH_STRIDE) {
                acc ^= *b;
            }
        }
    }
    std::hint::black_box(acc);
}

/// The fuzz target `transport_requests` (`transport::fuzzing`): `data` as
/// opened request bytes on a connection of a target serving `table`
/// (addresses in the requests are offsets from each region's start),
/// answered into a sink.
pub(crate) fn answer_for_fuzzing(table: HashMap<u32, Arc<dyn SourceMemory>>, ch: Channel, data: &[u8]) {
    let svc = TcpService { regions: RwLock::new(HashMap::new()), write_timeout: Duration::from_secs(1) };
    let mut bases = HashMap::new();
    for (rkey, memory) in table {
        let (addr, len) = {
            let v = memory.view();
            (v.as_ptr() as u64, v.len() as u64)
        };
        bases.insert(rkey, addr);
        svc.regions.write().insert(rkey, Arc::new(Served { desc: RegionDesc { addr, rkey, len }, memory }));
    }
    let mut reqs = data.to_vec();
    for raw in reqs.chunks_exact_mut(REQ_LEN) {
        let Ok(bytes) = <&[u8; REQ_LEN]>::try_from(&*raw) else { continue };
        let mut r = Request::decode(bytes);
        if let Some(base) = bases.get(&r.rkey) {
            r.addr = r.addr.wrapping_add(*base);
        }
        raw.copy_from_slice(&r.encode());
    }
    let counters = Counters::default();
    let mut sink = io::sink();
    let mut tx = Outbox::new(ch, Sink::Direct(&mut sink), &counters);
    let whole = reqs.len() / REQ_LEN * REQ_LEN;
    for chunk in reqs[..whole].chunks(CHUNK * REQ_LEN) {
        match svc.answer(&mut tx, chunk) {
            Ok(Answered::Ok) => {}
            _ => return,
        }
    }
    let _ = tx.flush();
}
