//! A target's listener: accepts connections, authenticates them, hands the
//! authenticated ones to the transport, and closes everything on drop.
//!
//! One thread (the gate) accepts and reads every new connection's first
//! two frames (HELLO and the first Noise message, under 150 bytes) without
//! blocking, polling them all at once: a peer that connects and stays
//! silent, or trickles bytes, costs one file descriptor and a few bytes of
//! memory, never a thread, and is dropped when the handshake deadline
//! (measured from `accept`, for the whole handshake) passes. At most
//! [`MAX_PENDING`] connections wait there; a new one pushes the oldest out.
//! Only a peer whose first Noise message opens with the token gets a
//! thread, and at most [`ServeOptions::max_connections`] threads serve at
//! once (more are told "busy").

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustix::event::{poll, PollFd, PollFlags, Timespec};

use super::channel::Channel;
use super::error::ServeError;
use super::handshake::{self, Deadline, Refused};
use super::token::Token;
use super::{Kind, ServeOptions, TargetStats};

/// How often the gate looks at the closed flag.
const ACCEPT_TICK: Duration = Duration::from_millis(50);
/// Connections waiting for their first two frames, at most.
pub(crate) const MAX_PENDING: usize = 256;

/// The transport-specific part of a target.
pub(crate) trait Service: Send + Sync + 'static {
    /// Which transport initiators must ask for.
    fn kind(&self) -> Kind;

    /// Runs one authenticated connection until it ends: sends ACCEPT (or a
    /// REJECT) through `ch`, then serves. `conn` is blocking; what remains
    /// of the handshake must finish by `deadline`.
    fn serve(&self, conn: TcpStream, ch: Channel, peer: SocketAddr, deadline: Instant, counters: &Counters);
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
    max_connections: usize,
    counters: Counters,
    /// Connections with a thread (a clone of each socket, to shut it down),
    /// and those threads.
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
            max_connections: opts.max_connections.max(1),
            counters: Counters::default(),
            conns: Mutex::new(Conns::default()),
        });
        let sh = shared.clone();
        let acceptor = thread::Builder::new()
            .name(format!("remem-{}-accept", service.kind()))
            .spawn(move || gate(&listener, &sh, &service))
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

/// A connection whose first frames are still arriving.
struct Pending {
    stream: TcpStream,
    peer: SocketAddr,
    buf: Vec<u8>,
    deadline: Instant,
}

/// Where a pending connection stands.
enum Step {
    /// More bytes are needed.
    Wait,
    /// Judged: authenticated (its first Noise message opened) or refused.
    Done(Result<Box<snow::HandshakeState>, Refused>),
}

impl Pending {
    /// Reads what the peer sent, never more than the two frames need.
    fn step(&mut self, kind: Kind, token: &Token) -> Step {
        loop {
            let need = match handshake::preauth_need(&self.buf, kind) {
                Ok(n) => n,
                Err(e) => return Step::Done(Err(e)),
            };
            let have = self.buf.len();
            if need == have {
                return Step::Done(handshake::open_preauth(&self.buf, token, kind).map(Box::new));
            }
            self.buf.resize(need, 0);
            match (&self.stream).read(&mut self.buf[have..]) {
                Ok(0) => {
                    let e = io::Error::from(io::ErrorKind::UnexpectedEof);
                    return Step::Done(Err(Refused::Io { what: "reading HELLO", source: e }));
                }
                Ok(n) => self.buf.truncate(have + n),
                Err(e) => {
                    self.buf.truncate(have);
                    match e.kind() {
                        io::ErrorKind::WouldBlock => return Step::Wait,
                        io::ErrorKind::Interrupted => {}
                        _ => return Step::Done(Err(Refused::Io { what: "reading HELLO", source: e })),
                    }
                }
            }
        }
    }
}

fn refuse(shared: &Shared, mut stream: &TcpStream, peer: SocketAddr, e: &Refused) {
    Counters::add(&shared.counters.rejected, 1);
    if let Some(code) = e.reject() {
        // Non-blocking and tiny: the socket buffer takes it, or it is lost.
        let _ = stream.write_all(&handshake::reject_frame(code, &e.to_string()));
    }
    match e {
        Refused::BadKey | Refused::BadConfirm(_) => log::warn!("remem transport: refused {peer}: {e}"),
        _ => log::info!("remem transport: refused {peer}: {e}"),
    }
}

fn timespec(d: Duration) -> Timespec {
    Timespec { tv_sec: d.as_secs().min(i64::MAX as u64) as i64, tv_nsec: i64::from(d.subsec_nanos()) }
}

fn gate(listener: &TcpListener, shared: &Arc<Shared>, service: &Arc<dyn Service>) {
    let kind = service.kind();
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut ready: Vec<bool> = Vec::new();
    while !shared.closed.load(Ordering::SeqCst) {
        let now = Instant::now();
        let wait = pending.iter().map(|p| p.deadline.saturating_duration_since(now)).min().unwrap_or(ACCEPT_TICK);
        ready.clear();
        {
            let mut fds = Vec::with_capacity(1 + pending.len());
            fds.push(PollFd::new(listener, PollFlags::IN));
            fds.extend(pending.iter().map(|p| PollFd::new(&p.stream, PollFlags::IN)));
            let tick = timespec(wait.min(ACCEPT_TICK));
            if poll(&mut fds, Some(&tick)).is_err() {
                continue;
            }
            ready.extend(fds.iter().map(|f| !f.revents().is_empty()));
        }
        // Pending connections with something to read, and expired ones.
        let now = Instant::now();
        let mut keep = VecDeque::with_capacity(pending.len());
        for (mut p, r) in pending.drain(..).zip(ready.iter().skip(1).copied()) {
            let step = if r { p.step(kind, &shared.token) } else { Step::Wait };
            match step {
                Step::Wait if now >= p.deadline => refuse(shared, &p.stream, p.peer, &Refused::Deadline),
                Step::Wait => keep.push_back(p),
                Step::Done(Err(e)) => refuse(shared, &p.stream, p.peer, &e),
                Step::Done(Ok(hs)) => start_conn(p, hs, shared, service),
            }
        }
        pending = keep;
        if !ready.first().copied().unwrap_or(false) {
            continue;
        }
        loop {
            let (stream, peer) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    log::warn!("remem transport: accept failed: {e}");
                    thread::sleep(ACCEPT_TICK);
                    break;
                }
            };
            if stream.set_nonblocking(true).and_then(|()| stream.set_nodelay(true)).is_err() {
                continue;
            }
            if pending.len() >= MAX_PENDING {
                if let Some(old) = pending.pop_front() {
                    refuse(shared, &old.stream, old.peer, &Refused::Deadline);
                }
            }
            let deadline = Instant::now() + shared.handshake_timeout;
            pending.push_back(Pending { stream, peer, buf: Vec::new(), deadline });
        }
    }
}

/// Gives an authenticated connection its thread, within the cap.
fn start_conn(p: Pending, hs: Box<snow::HandshakeState>, shared: &Arc<Shared>, service: &Arc<dyn Service>) {
    let Pending { stream, peer, deadline, .. } = p;
    let mut conns = shared.conns.lock();
    if shared.closed.load(Ordering::SeqCst) {
        return; // dropped: the target is closing
    }
    conns.threads.retain(|t| !t.is_finished());
    if conns.sockets.len() >= shared.max_connections {
        let open = conns.sockets.len() as u64;
        drop(conns);
        return refuse(shared, &stream, peer, &Refused::Busy(open));
    }
    let clone = match stream.set_nonblocking(false).and_then(|()| stream.try_clone()) {
        Ok(c) => c,
        Err(e) => return refuse(shared, &stream, peer, &Refused::Io { what: "setting the socket up", source: e }),
    };
    let id = conns.next_id;
    conns.next_id += 1;
    let (sh, svc) = (shared.clone(), service.clone());
    let spawned = thread::Builder::new()
        .name(format!("remem-{}-conn", service.kind()))
        .spawn(move || run_conn(stream, hs, peer, deadline, id, &sh, &*svc));
    match spawned {
        Ok(t) => {
            conns.sockets.insert(id, clone);
            conns.threads.push(t);
        }
        Err(e) => {
            drop(conns);
            refuse(shared, &clone, peer, &Refused::Internal(format!("no thread for the connection: {e}")));
        }
    }
}

fn run_conn(
    stream: TcpStream,
    hs: Box<snow::HandshakeState>,
    peer: SocketAddr,
    deadline: Instant,
    id: u64,
    shared: &Shared,
    service: &dyn Service,
) {
    let c = &shared.counters;
    match handshake::finish(&mut Deadline { s: &stream, at: deadline }, *hs) {
        Err(e) => refuse(shared, &stream, peer, &e),
        Ok(ch) => {
            Counters::add(&c.accepted, 1);
            Counters::add(&c.active, 1);
            service.serve(stream, ch, peer, deadline, c);
            c.active.fetch_sub(1, Ordering::Relaxed);
        }
    }
    shared.conns.lock().sockets.remove(&id);
}
