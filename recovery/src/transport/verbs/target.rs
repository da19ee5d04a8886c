//! The verbs target: regions registered for remote read, and one queue pair
//! per authenticated initiator, alive as long as its control connection.
//! The target's CPU takes no part in the reads.

use std::collections::HashMap;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::RwLock;
use rdma_sys::ibv_access_flags;

use super::device::Device;
use super::mr::Mr;
use super::qp::Qp;
use crate::transport::channel::Channel;
use crate::transport::handshake::{self, Deadline, Frame, QpEndpoint, RejectCode, MAX_REGIONS};
use crate::transport::memory::SourceMemory;
use crate::transport::server::{Counters, Server, Service};
use crate::transport::{Kind, RegionDesc, RegisterError, ServeError, ServeOptions, Target, TargetStats};

/// A verbs target; see the [module](super) docs.
pub struct VerbsTarget {
    // Dropped first: closes the connections, destroying their queue pairs.
    server: Server,
    service: Arc<VerbsService>,
}

impl std::fmt::Debug for VerbsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsTarget")
            .field("device", &self.service.dev.name())
            .field("local_addr", &self.server.local_addr())
            .finish_non_exhaustive()
    }
}

struct Served {
    desc: RegionDesc,
    // Deregistered before the memory it names can go.
    _mr: Mr,
    _memory: Arc<dyn SourceMemory>,
}

struct VerbsService {
    dev: Arc<Device>,
    regions: RwLock<HashMap<u32, Served>>,
}

impl VerbsTarget {
    /// Opens the RDMA device, then listens on `opts.listen`.
    pub fn serve(opts: ServeOptions) -> Result<VerbsTarget, ServeError> {
        let dev = Device::open(&opts.device)?;
        let service = Arc::new(VerbsService { dev, regions: RwLock::new(HashMap::new()) });
        let server = Server::start(&opts, service.clone())?;
        Ok(VerbsTarget { server, service })
    }
}

impl Target for VerbsTarget {
    fn register(&self, memory: Arc<dyn SourceMemory>) -> Result<RegionDesc, RegisterError> {
        let (ptr, len) = {
            let view = memory.view();
            (view.as_ptr().cast_mut(), view.len())
        };
        if len == 0 {
            return Err(RegisterError::Empty);
        }
        // SAFETY: the bytes stay mapped while `memory` lives, and `Served`
        // keeps it until after the MR is deregistered; the access is
        // remote read only, so the device never writes through `ptr`
        // (which is why casting away `const` is sound).
        let mr = unsafe { Mr::register(&self.service.dev, ptr, len, ibv_access_flags::IBV_ACCESS_REMOTE_READ) }?;
        let desc = RegionDesc { addr: mr.addr(), rkey: mr.rkey(), len: len as u64 };
        self.service.regions.write().insert(desc.rkey, Served { desc, _mr: mr, _memory: memory });
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

impl Service for VerbsService {
    fn kind(&self) -> Kind {
        Kind::Verbs
    }

    fn serve(&self, conn: TcpStream, mut ch: Channel, peer: SocketAddr, deadline: Instant, _counters: &Counters) {
        let qp = match self.connect_qp(&mut Deadline { s: &conn, at: deadline }, &mut ch) {
            Ok(Some(qp)) => qp,
            Ok(None) => return, // the initiator went away
            Err(why) => {
                log::warn!("remem transport: verbs connection from {peer}: {why}");
                let body = handshake::encode_reject(RejectCode::Internal, &why);
                let _ = ch.write_frame(&mut Deadline { s: &conn, at: deadline }, Frame::Reject, &body);
                return;
            }
        };
        // The queue pair lives until the initiator hangs up (or the target
        // closes). The control connection carries nothing more.
        if conn.set_read_timeout(None).is_err() {
            return;
        }
        let mut byte = [0u8; 1];
        match (&conn).read(&mut byte) {
            Ok(0) | Err(_) => {}
            Ok(_) => log::warn!("remem transport: verbs initiator {peer} sent data on the control connection"),
        }
        drop(qp);
    }
}

impl VerbsService {
    /// ACCEPT with this connection's queue pair, ENDPOINT, then READY.
    /// `Err` is a reason to send the initiator; `Ok(None)` a broken socket.
    fn connect_qp(&self, conn: &mut Deadline<'_>, ch: &mut Channel) -> Result<Option<Qp>, String> {
        let qp = Qp::new(&self.dev, 1).map_err(|e| format!("the target cannot create a queue pair: {e}"))?;
        let mut regions: Vec<RegionDesc> = self.regions.read().values().map(|s| s.desc).collect();
        if regions.len() > MAX_REGIONS {
            return Err("the target has too many regions".to_owned());
        }
        regions.sort_by_key(|r| r.addr);
        let accept = handshake::encode_accept(&regions, &qp.endpoint().encode());
        if ch.write_frame(conn, Frame::Accept, &accept).is_err() {
            return Ok(None);
        }
        let remote = match ch.read_frame(conn) {
            Ok(Ok((Frame::Endpoint, body))) => QpEndpoint::decode(&body)?,
            Ok(Ok((ty, _))) => return Err(format!("expected ENDPOINT, got {ty:?}")),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(None),
        };
        qp.connect(&remote, ibv_access_flags::IBV_ACCESS_REMOTE_READ)
            .map_err(|e| format!("the target cannot connect its queue pair: {e}"))?;
        if ch.write_frame(conn, Frame::Ready, &[]).is_err() {
            return Ok(None);
        }
        Ok(Some(qp))
    }
}
