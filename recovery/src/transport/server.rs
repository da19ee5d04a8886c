//! A target's listener: accepts connections, authenticates them, hands the
//! authenticated ones to the transport, and closes everything on drop.
//!
//! One thread accepts; each connection has its own thread (a target serves
//! a few initiators, not thousands).

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use parking_lot::Mutex;
use rustix::event::{poll, PollFd, PollFlags, Timespec};

use super::error::ServeError;
use super::handshake;
use super::token::Token;
use super::{Kind, ServeOptions, TargetStats};

/// How often the accept loop looks at the closed flag.
const ACCEPT_TICK: Duration = Duration::from_millis(50);

/// The transport-specific part of a target.
pub(crate) trait Service: Send + Sync + 'static {
    /// Which transport initiators must ask for.
    fn kind(&self) -> Kind;

    /// Runs one authenticated connection until it ends: sends ACCEPT (or a
    /// REJECT), then serves. `conn` has the handshake's timeouts set.
    fn serve(&self, conn: TcpStream, peer: SocketAddr, counters: &Counters);
}

/// A target's counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) accepted: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) active: AtomicU64,
    pub(crate) reads_served: AtomicU64,
    pub(crate) access_errors: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> TargetStats {
        TargetStats {
            accepted: self.accepted.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            reads_served: self.reads_served.load(Ordering::Relaxed),
            access_errors: self.access_errors.load(Ordering::Relaxed),
        }
    }
}

struct Shared {
    closed: AtomicBool,
    token: Token,
    handshake_timeout: Duration,
    counters: Counters,
    /// Open connections (a clone of each socket, to shut it down), and the
    /// threads serving them.
    conns: Mutex<Conns>,
}

#[derive(Default)]
struct Conns {
    next_id: u64,
    sockets: HashMap<u64, TcpStream>,
    threads: Vec<JoinHandle<()>>,
}

/// A running listener. Dropping it stops accepting, shuts every connection
/// down and waits for their threads.
pub(crate) struct Server {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl Server {
    pub(crate) fn start(opts: &ServeOptions, service: Arc<dyn Service>) -> Result<Server, ServeError> {
        let bind_err = |source| ServeError::Bind { addr: opts.listen, source };
        let listener = TcpListener::bind(opts.listen).map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(|source| ServeError::Io { what: "listener O_NONBLOCK", source })?;
        let shared = Arc::new(Shared {
            closed: AtomicBool::new(false),
            token: opts.token.clone(),
            handshake_timeout: opts.handshake_timeout,
            counters: Counters::default(),
            conns: Mutex::new(Conns::default()),
        });
        let sh = shared.clone();
        let acceptor = thread::Builder::new()
            .name(format!("remem-{}-accept", service.kind()))
            .spawn(move || accept_loop(&listener, &sh, &service))
            .map_err(|source| ServeError::Io { what: "spawning the accept thread", source })?;
        Ok(Server { shared, local_addr, acceptor: Some(acceptor) })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub(crate) fn stats(&self) -> TargetStats {
        self.shared.counters.snapshot()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        let threads = {
            let mut conns = self.shared.conns.lock();
            for s in conns.sockets.values() {
                let _ = s.shutdown(Shutdown::Both);
            }
            std::mem::take(&mut conns.threads)
        };
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, service: &Arc<dyn Service>) {
    let tick = Timespec { tv_sec: 0, tv_nsec: ACCEPT_TICK.as_nanos() as _ };
    while !shared.closed.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(listener, PollFlags::IN)];
        if poll(&mut fds, Some(&tick)).is_err() {
            continue;
        }
        let (stream, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::warn!("remem transport: accept failed: {e}");
                thread::sleep(ACCEPT_TICK);
                continue;
            }
        };
        if let Err(e) = start_conn(stream, peer, shared, service) {
            log::warn!("remem transport: dropped connection from {peer}: {e}");
        }
    }
}

fn start_conn(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    service: &Arc<dyn Service>,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(shared.handshake_timeout))?;
    stream.set_write_timeout(Some(shared.handshake_timeout))?;
    let clone = stream.try_clone()?;
    let mut conns = shared.conns.lock();
    if shared.closed.load(Ordering::SeqCst) {
        return Ok(()); // dropped: the target is closing
    }
    conns.threads.retain(|t| !t.is_finished());
    let id = conns.next_id;
    conns.next_id += 1;
    let (sh, svc) = (shared.clone(), service.clone());
    let t = thread::Builder::new()
        .name(format!("remem-{}-conn", service.kind()))
        .spawn(move || run_conn(stream, peer, id, &sh, &*svc))?;
    conns.sockets.insert(id, clone);
    conns.threads.push(t);
    Ok(())
}

fn run_conn(mut stream: TcpStream, peer: SocketAddr, id: u64, shared: &Shared, service: &dyn Service) {
    let c = &shared.counters;
    match handshake::respond(&mut stream, &shared.token, service.kind()) {
        Err(e) => {
            Counters::add(&c.rejected, 1);
            log::warn!("remem transport: refused connection from {peer}: {e}");
        }
        Ok(()) => {
            Counters::add(&c.accepted, 1);
            Counters::add(&c.active, 1);
            service.serve(stream, peer, c);
            c.active.fetch_sub(1, Ordering::Relaxed);
        }
    }
    shared.conns.lock().sockets.remove(&id);
}
