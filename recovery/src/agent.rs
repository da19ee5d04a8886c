//! The agent: a separate process (or, for tests, a thread) that holds a
//! heap's memfd and control region so they outlive the database process,
//! and serves read-only pulls of them to a recovering host.
//!
//! The database hands over its descriptors on a Unix socket
//! ([`register`]: one JSON line and two descriptors by `SCM_RIGHTS`) and
//! keeps that connection open for the heap's life. When the connection
//! closes without a `closed` message, the database is gone: the agent
//! *seals* the dirty lists. In fast mode pages written after the last
//! harvest are known only to the dead process's page tables, so the agent
//! compares the CRC32 of every page with the baseline's committed CRC and
//! lists every page that differs (a CRC collision, 2^-32 per page, is the
//! only way to miss one; precise mode's lists need no sealing and are
//! served as well). It also records each page's CRC, for the puller to
//! verify, and a BLAKE3 digest of the whole image.
//!
//! Regions served (read-only; there is no remote write):
//! ```text
//!  info     4096 B  this block (layout in [`info`]), always the first region
//!  heap     size B  the heap's memfd
//!  control  ...     the control region (current and closing sets)
//!  crc      4·npages  CRC32 of each page at sealing
//!  sealed   8·words  pages found to differ from the baseline at sealing
//! ```

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use remem_alloc::baseline::{Baseline, FileBackend};
use remem_alloc::fork::{NotInherited, Owner};
use remem_alloc::{Heap, HeapOptions};
use serde::{Deserialize, Serialize};

use crate::sys::{recv_fds, send_fds, ReadMap};
use crate::transport::{self, Kind, RegionDesc, ServeOptions, SharedBytes, Target};

/// Layout of the info block (little-endian).
pub mod info {
    /// `[u8; 8]` `"REMEMAGT"`.
    pub const MAGIC: usize = 0;
    /// `u32` version (1).
    pub const VERSION: usize = 8;
    /// `u32` state: [`WAITING`], [`RUNNING`], [`SEALED`], [`CLOSED`].
    pub const STATE: usize = 12;
    /// `[u8; 16]` heap UUID.
    pub const UUID: usize = 16;
    /// `u64` heap size.
    pub const SIZE: usize = 32;
    /// `u64` heap base address.
    pub const BASE: usize = 40;
    /// `u64` pages.
    pub const NPAGES: usize = 48;
    /// `u32` rkeys of the heap, control, crc and sealed regions.
    pub const RKEYS: usize = 64;
    /// `u64` pages listed by sealing.
    pub const SEALED_PAGES: usize = 80;
    /// `[u8; 32]` BLAKE3 of the whole heap image at sealing.
    pub const DIGEST: usize = 88;
    /// `u64` pid of the database process.
    pub const OWNER_PID: usize = 120;
    /// `u64` 1 when sealing could not read the baseline (then every page with data is listed).
    pub const NO_BASELINE: usize = 128;
    /// Bytes of the block.
    pub const LEN: usize = 4096;
    /// No heap registered yet.
    pub const WAITING: u32 = 0;
    /// The database process is running.
    pub const RUNNING: u32 = 1;
    /// The database process died; the lists are sealed.
    pub const SEALED: u32 = 2;
    /// The database closed the heap cleanly (everything is in the baseline).
    pub const CLOSED: u32 = 3;
    /// Magic.
    pub const MAGIC_BYTES: [u8; 8] = *b"REMEMAGT";
}

/// What the database sends when it registers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registration {
    /// `"register"` or `"reattach"`.
    pub op: String,
    /// Heap UUID (text form).
    pub uuid: String,
    /// The baseline file (on storage the agent can read too).
    pub baseline: PathBuf,
    /// The database's pid.
    pub pid: u32,
}

/// Why the agent or a registration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// A socket or descriptor operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What the agent was doing.
        what: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The transport could not start.
    #[error(transparent)]
    Serve(#[from] transport::ServeError),
    /// Registering a region with the transport failed.
    #[error(transparent)]
    Register(#[from] transport::RegisterError),
    /// The peer sent something the protocol does not allow.
    #[error("agent protocol: {0}")]
    Protocol(String),
    /// The heap has no baseline or control region (memfd-only heaps cannot be served).
    #[error("the heap has no baseline: only heaps created with a baseline file can be handed to an agent")]
    NoBaseline,
    /// Re-attaching the heap failed.
    #[error(transparent)]
    Heap(#[from] remem_alloc::Error),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
}

/// How to run an agent.
#[derive(Debug)]
pub struct AgentOptions {
    /// The Unix socket the database registers on.
    pub socket: PathBuf,
    /// Transport options (listen address, token).
    pub serve: ServeOptions,
    /// Which transport.
    pub kind: Kind,
}

struct Hosted {
    reg: Registration,
    heap_fd: OwnedFd,
    heap: Arc<ReadMap>,
    /// Kept mapped while served.
    _control: Arc<ReadMap>,
    crc: Arc<SharedBytes>,
    sealed: Arc<SharedBytes>,
    npages: u64,
}

struct Shared {
    info: Arc<SharedBytes>,
    hosted: Mutex<Option<Hosted>>,
    changed: Condvar,
}

/// A running agent. Dropping it stops accepting databases and closes its
/// listener once the connections it serves end.
pub struct Agent {
    target: Arc<dyn Target>,
    shared: Arc<Shared>,
    socket: PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop so it sees the flag, then remove the socket.
        let _ = UnixStream::connect(&self.socket);
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("socket", &self.socket).field("listen", &self.target.local_addr()).finish()
    }
}

impl Agent {
    /// Starts serving: the transport listener and the Unix socket.
    pub fn start(opts: AgentOptions) -> Result<Agent, AgentError> {
        let target: Arc<dyn Target> = Arc::from(transport::serve(opts.kind, opts.serve)?);
        let info = Arc::new(SharedBytes::zeroed(info::LEN));
        info.write(info::MAGIC, &info::MAGIC_BYTES);
        info.write(info::VERSION, &1u32.to_le_bytes());
        target.register(info.clone())?;
        let _ = std::fs::remove_file(&opts.socket);
        let listener = UnixListener::bind(&opts.socket).map_err(io(format!("binding {}", opts.socket.display())))?;
        let shared = Arc::new(Shared { info, hosted: Mutex::new(None), changed: Condvar::new() });
        let (sh, tg) = (shared.clone(), target.clone());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        std::thread::Builder::new()
            .name("remem-agent".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stopping.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let (sh, tg) = (sh.clone(), tg.clone());
                    std::thread::spawn(move || {
                        if let Err(e) = serve_db(&sh, &*tg, conn) {
                            eprintln!("remem agent: {e}");
                        }
                    });
                }
            })
            .map_err(io("spawning the agent thread"))?;
        Ok(Agent { target, shared, socket: opts.socket, stop })
    }

    /// Where pulls are served.
    pub fn local_addr(&self) -> SocketAddr {
        self.target.local_addr()
    }

    /// The state in the info block.
    pub fn state(&self) -> u32 {
        state_of(&self.shared.info)
    }

    /// Waits until the state is `want` (or `timeout` passes); returns the state.
    pub fn wait_state(&self, want: u32, timeout: Duration) -> u32 {
        let deadline = std::time::Instant::now() + timeout;
        let mut g = self.shared.hosted.lock();
        loop {
            let s = self.state();
            if s == want || std::time::Instant::now() >= deadline {
                return s;
            }
            self.shared.changed.wait_until(&mut g, deadline);
        }
    }

    /// A BLAKE3 digest of the hosted heap's memory now.
    pub fn heap_digest(&self) -> Option<[u8; 32]> {
        self.shared.hosted.lock().as_ref().map(|h| *blake3::hash(h.heap.bytes()).as_bytes())
    }
}

fn state_of(info: &SharedBytes) -> u32 {
    let b = info.read(info::STATE, 4).expect("in range");
    u32::from_le_bytes(b.try_into().expect("4 bytes"))
}

fn set_state(sh: &Shared, s: u32) {
    sh.info.write(info::STATE, &s.to_le_bytes());
    sh.changed.notify_all();
}

/// Serves one database connection: registration (or re-attach), then
/// waits for it to end, then seals.
fn serve_db(sh: &Shared, target: &dyn Target, conn: UnixStream) -> Result<(), AgentError> {
    let mut buf = vec![0u8; 64 * 1024];
    let (reg, fds) = recv_registration(&conn, &mut buf)?;
    match reg.op.as_str() {
        "register" => host(sh, target, reg, fds)?,
        "reattach" => {
            let g = sh.hosted.lock();
            let Some(h) = g.as_ref() else { return Err(AgentError::Protocol("no heap to re-attach".into())) };
            if h.reg.uuid != reg.uuid {
                return Err(AgentError::Protocol(format!("the agent holds heap {}, not {}", h.reg.uuid, reg.uuid)));
            }
            if state_of(&sh.info) == info::RUNNING {
                return Err(AgentError::Protocol("the heap's database is still running".into()));
            }
            // The restarted process finds the pages that differ from the
            // baseline itself (a CRC pass over the mapped memfd: no copy).
            let line = b"ok\n";
            send_fds(&conn, line, &[h.heap_fd.as_raw_fd()]).map_err(io("sending the heap memfd back"))?;
            drop(g);
            // The restarted database now registers on this same connection.
            let (reg, fds) = recv_registration(&conn, &mut buf)?;
            host(sh, target, reg, fds)?;
        }
        op => return Err(AgentError::Protocol(format!("unknown operation {op:?}"))),
    }
    (&conn).write_all(b"ok\n").map_err(io("answering the database"))?;
    // Wait for the database to go away (or say it closed cleanly).
    let mut line = String::new();
    let mut r = BufReader::new(&conn);
    let clean = loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => break false,
            Ok(_) if line.trim() == "closed" => break true,
            Ok(_) => {}
        }
    };
    seal(sh);
    set_state(sh, if clean { info::CLOSED } else { info::SEALED });
    Ok(())
}

/// Receives one registration message and the descriptors it carries.
fn recv_registration(conn: &UnixStream, buf: &mut [u8]) -> Result<(Registration, Vec<OwnedFd>), AgentError> {
    let (n, fds) = recv_fds(conn, buf, 2).map_err(io("receiving a registration"))?;
    let reg = serde_json::from_slice(buf[..n].trim_ascii_end())
        .map_err(|e| AgentError::Protocol(format!("bad registration message: {e}")))?;
    Ok((reg, fds))
}

/// Sends one registration message with `fds`.
fn send_message(conn: &UnixStream, reg: &Registration, fds: &[std::os::fd::RawFd]) -> Result<(), AgentError> {
    let mut line = serde_json::to_vec(reg).expect("serializable");
    line.push(b'\n');
    send_fds(conn, &line, fds).map_err(io("sending to the agent"))
}

fn host(sh: &Shared, target: &dyn Target, reg: Registration, fds: Vec<OwnedFd>) -> Result<(), AgentError> {
    let mut fds = fds.into_iter();
    let (Some(heap_fd), Some(ctl_fd)) = (fds.next(), fds.next()) else {
        return Err(AgentError::Protocol("a registration carries the heap and control memfds".into()));
    };
    let heap_file = std::fs::File::from(heap_fd.try_clone().map_err(io("dup heap memfd"))?);
    let heap = Arc::new(ReadMap::new(&heap_file).map_err(io("mapping the heap memfd"))?);
    let control = Arc::new(ReadMap::new(&std::fs::File::from(ctl_fd)).map_err(io("mapping the control memfd"))?);
    let hb = heap.bytes();
    let header = remem_alloc::format::Header::decode(&hb[..4096])
        .map_err(|e| AgentError::Protocol(format!("the memfd does not hold a heap: {e}")))?;
    let npages = header.layout.npages();
    let crc = Arc::new(SharedBytes::zeroed(npages as usize * 4));
    let sealed = Arc::new(SharedBytes::zeroed((npages as usize).div_ceil(64) * 8));
    let keys: Vec<RegionDesc> = vec![
        target.register(heap.clone())?,
        target.register(control.clone())?,
        target.register(crc.clone())?,
        target.register(sealed.clone())?,
    ];
    let i = &sh.info;
    i.write(info::UUID, &header.uuid);
    i.write(info::SIZE, &header.layout.size.to_le_bytes());
    i.write(info::BASE, &header.base.to_le_bytes());
    i.write(info::NPAGES, &npages.to_le_bytes());
    for (n, k) in keys.iter().enumerate() {
        i.write(info::RKEYS + 4 * n, &k.rkey.to_le_bytes());
    }
    i.write(info::OWNER_PID, &u64::from(reg.pid).to_le_bytes());
    i.write(info::SEALED_PAGES, &0u64.to_le_bytes());
    *sh.hosted.lock() = Some(Hosted { reg, heap_fd, heap, _control: control, crc, sealed, npages });
    set_state(sh, info::RUNNING);
    Ok(())
}

/// Seals the lists of the hosted heap: see the module docs.
fn seal(sh: &Shared) {
    let g = sh.hosted.lock();
    let Some(h) = g.as_ref() else { return };
    let bytes = h.heap.bytes();
    let baseline = FileBackend::open(&h.reg.baseline).ok().and_then(|b| Baseline::open(b).ok());
    use std::os::fd::AsFd;
    let ranges = remem_alloc::memfd_data_ranges(h.heap_fd.as_fd(), bytes.len() as u64)
        .unwrap_or_else(|_| vec![(0, bytes.len() as u64)]);
    let mut crcs = vec![0u8; h.npages as usize * 4];
    let mut sealed = vec![0u64; (h.npages as usize).div_ceil(64)];
    let mut count = 0u64;
    let zero_crc = crc32fast::hash(&[0u8; 4096]);
    let mut hasher = blake3::Hasher::new();
    crate::digest::for_each_page(bytes, &ranges, &[], |p, page, is_data| {
        hasher.update(page);
        let p = p as usize;
        let c = if is_data { crc32fast::hash(page) } else { zero_crc };
        crcs[4 * p..4 * p + 4].copy_from_slice(&c.to_le_bytes());
        let differs = match &baseline {
            Some(b) => b.page_crc(p as u64).map_or(true, |want| want != c),
            None => c != zero_crc || page.iter().any(|&x| x != 0),
        };
        if differs {
            sealed[p / 64] |= 1 << (p % 64);
            count += 1;
        }
    });
    h.crc.write(0, &crcs);
    let words: Vec<u8> = sealed.iter().flat_map(|w| w.to_le_bytes()).collect();
    h.sealed.write(0, &words);
    let i = &sh.info;
    i.write(info::SEALED_PAGES, &count.to_le_bytes());
    i.write(info::NO_BASELINE, &u64::from(baseline.is_none()).to_le_bytes());
    i.write(info::DIGEST, hasher.finalize().as_bytes());
}

/// The database's end of the agent connection: keep it for the heap's
/// life; [`AgentLink::closed`] tells the agent the heap was closed cleanly.
/// A forked child does not keep the connection (the agent sees the
/// database die when it dies, whatever its children do) and cannot use the
/// link (see `remem_alloc::fork`).
#[derive(Debug)]
pub struct AgentLink {
    conn: NotInherited<UnixStream>,
    owner: Owner,
}

impl AgentLink {
    fn new(conn: UnixStream) -> AgentLink {
        AgentLink { conn: NotInherited::new(conn), owner: Owner::current() }
    }

    /// Tells the agent the heap was closed cleanly (call after `Heap::close`).
    /// Refused in a forked child: only the database may say so.
    pub fn closed(self) -> Result<(), AgentError> {
        self.owner.check().map_err(|f| AgentError::Heap(f.into()))?;
        let mut conn = self.conn.get();
        conn.write_all(b"closed\n").map_err(io("telling the agent"))
    }
}

fn send_registration(conn: &UnixStream, heap: &Heap, op: &str) -> Result<(), AgentError> {
    // A forked child cannot hand over a heap it inherited.
    heap.check_process().map_err(remem_alloc::Error::from)?;
    let (Some(ctl), Some(path)) = (heap.control_memfd(), heap.path()) else { return Err(AgentError::NoBaseline) };
    let reg = Registration { op: op.into(), uuid: heap.uuid(), baseline: path.to_owned(), pid: std::process::id() };
    send_message(conn, &reg, &[heap.memfd().as_raw_fd(), ctl.as_raw_fd()])
}

fn read_ok(conn: &UnixStream) -> Result<(), AgentError> {
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line).map_err(io("reading the agent's answer"))?;
    if line.trim() != "ok" {
        return Err(AgentError::Protocol(format!("the agent refused the heap ({})", line.trim())));
    }
    Ok(())
}

/// Hands `heap`'s memfd and control region to the agent listening on
/// `socket`, so that they outlive this process.
pub fn register(heap: &Heap, socket: &Path) -> Result<AgentLink, AgentError> {
    let conn = UnixStream::connect(socket).map_err(io(format!("connecting to the agent at {}", socket.display())))?;
    send_registration(&conn, heap, "register")?;
    read_ok(&conn)?;
    Ok(AgentLink::new(conn))
}

/// Pages of the memfd `fd` whose CRC differs from the baseline's.
fn differing_pages(fd: &OwnedFd, baseline: &Path) -> Result<Vec<u64>, AgentError> {
    let map = ReadMap::new(&std::fs::File::from(fd.try_clone().map_err(io("dup memfd"))?))
        .map_err(io("mapping the heap memfd"))?;
    let bl = Baseline::open(FileBackend::open(baseline).map_err(io(format!("opening {}", baseline.display())))?)
        .map_err(|e| AgentError::Protocol(format!("baseline {}: {e}", baseline.display())))?;
    Ok(map
        .bytes()
        .chunks_exact(4096)
        .enumerate()
        .filter(|(p, page)| bl.page_crc(*p as u64).map_or(true, |c| c != crc32fast::hash(page)))
        .map(|(p, _)| p as u64)
        .collect())
}

/// Same-host restart: takes the heap's memfd back from the agent (no
/// copy), maps it, flushes the pages the dead process left dirty, and
/// registers the new process as the heap's owner.
pub fn reattach(socket: &Path, baseline: &Path, opts: &HeapOptions) -> Result<(Heap, AgentLink), AgentError> {
    let bl = Baseline::open(FileBackend::open(baseline).map_err(io(format!("opening {}", baseline.display())))?)
        .map_err(|e| AgentError::Protocol(format!("baseline {}: {e}", baseline.display())))?;
    let uuid = remem_alloc::format::uuid_string(&bl.uuid());
    drop(bl);
    let conn = UnixStream::connect(socket).map_err(io(format!("connecting to the agent at {}", socket.display())))?;
    let reg = Registration { op: "reattach".into(), uuid, baseline: baseline.to_owned(), pid: std::process::id() };
    send_message(&conn, &reg, &[])?;
    let mut buf = [0u8; 64];
    let (n, fds) = recv_fds(&conn, &mut buf, 1).map_err(io("receiving the heap memfd"))?;
    if buf[..n].trim_ascii() != b"ok" {
        return Err(AgentError::Protocol(format!("the agent refused: {}", String::from_utf8_lossy(&buf[..n]))));
    }
    let Some(fd) = fds.into_iter().next() else { return Err(AgentError::Protocol("no memfd in the answer".into())) };
    let dirty = differing_pages(&fd, baseline)?;
    let heap = Heap::attach_durable(fd, baseline, opts, &dirty)?;
    send_registration(&conn, &heap, "register")?;
    read_ok(&conn)?;
    Ok((heap, AgentLink::new(conn)))
}
