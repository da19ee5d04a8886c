//! The TCP target: a thread per connection reads requests and answers them
//! with one `writev` per chunk of up to [`CHUNK`] requests, straight from
//! the served memory (no copy in user space).

use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

use crate::transport::error::{RegisterError, ServeError};
use crate::transport::handshake::{self, Frame, RejectCode, MAX_REGIONS};
use crate::transport::memory::{MemoryView, SourceMemory};
use crate::transport::server::{Counters, Server, Service};
use crate::transport::token::random;
use crate::transport::wire::{Request, Response, WireStatus, OP_READ, REQ_LEN};
use crate::transport::{Kind, RegionDesc, ServeOptions, Target, TargetStats, MAX_READ_LEN};

/// Requests answered per `writev`: two iovecs each, plus one for an error
/// header, within Linux's `IOV_MAX` of 1024.
const CHUNK: usize = 511;
/// Bytes of requests read at once.
const RX_LEN: usize = 64 << 10;
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

    fn serve(&self, mut conn: TcpStream, peer: SocketAddr, counters: &Counters) {
        let mut regions: Vec<RegionDesc> = self.regions.read().values().map(|s| s.desc).collect();
        if regions.len() > MAX_REGIONS {
            handshake::send_reject(&mut conn, RejectCode::Internal, "the target has too many regions");
            return;
        }
        regions.sort_by_key(|r| r.addr);
        let accept = handshake::encode_accept(&regions, &[]);
        if let Err(e) = handshake::write_frame(&mut conn, Frame::Accept, &accept) {
            log::warn!("remem transport: sending ACCEPT to {peer}: {e}");
            return;
        }
        // Reads wait for requests indefinitely; a peer that takes no data
        // for write_timeout is dropped.
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(&conn, SNDBUF);
        if conn.set_read_timeout(None).and_then(|()| conn.set_write_timeout(Some(self.write_timeout))).is_err() {
            return;
        }
        if let Err(e) = self.serve_requests(&mut conn, counters) {
            if !matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) {
                log::info!("remem transport: connection from {peer} ended: {e}");
            }
        }
    }
}

impl TcpService {
    fn serve_requests(&self, conn: &mut TcpStream, counters: &Counters) -> io::Result<()> {
        let mut rx = vec![0u8; RX_LEN];
        let mut have = 0;
        loop {
            let n = match conn.read(&mut rx[have..]) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            have += n;
            let whole = have / REQ_LEN * REQ_LEN;
            for chunk in rx[..whole].chunks(CHUNK * REQ_LEN) {
                if let Answered::Failed = self.answer(conn, chunk, counters)? {
                    // Error state: nothing more is answered. Half-close so
                    // that the error response is not lost to a reset, and
                    // wait for the initiator to hang up.
                    conn.shutdown(Shutdown::Write)?;
                    conn.set_read_timeout(Some(self.write_timeout))?;
                    let _ = io::copy(conn, &mut io::sink());
                    return Ok(());
                }
            }
            rx.copy_within(whole..have, 0);
            have -= whole;
        }
    }

    /// Answers up to [`CHUNK`] requests with one gathered write.
    fn answer(&self, conn: &mut TcpStream, chunk: &[u8], counters: &Counters) -> io::Result<Answered> {
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
        let views: Vec<MemoryView<'_>> = used.iter().map(|s| s.memory.view()).collect();
        // A view shorter than at registration cannot serve the range.
        if let Some(cut) = plan.iter().position(|&(_, i, _, end)| end > views[i].len()) {
            failure = Some((WireStatus::Access, plan[cut].0));
            plan.truncate(cut);
        }
        let mut headers: Vec<[u8; 16]> = plan
            .iter()
            .map(|&(seq, _, start, end)| Response { status: WireStatus::Ok, len: (end - start) as u32, seq }.encode())
            .collect();
        if let Some((status, seq)) = failure {
            headers.push(Response { status, len: 0, seq }.encode());
        }
        let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(2 * headers.len());
        for (h, &(_, i, start, end)) in headers.iter().zip(&plan) {
            iov.push(IoSlice::new(h));
            iov.push(IoSlice::new(&views[i][start..end]));
        }
        if failure.is_some() {
            iov.push(IoSlice::new(&headers[plan.len()]));
        }
        write_all_vectored(conn, &mut iov)?;
        Counters::add(&counters.reads_served, plan.len() as u64);
        if failure.is_some() {
            Counters::add(&counters.access_errors, 1);
            return Ok(Answered::Failed);
        }
        Ok(Answered::Ok)
    }
}

fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
