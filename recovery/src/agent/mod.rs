//! The agent: a separate process (or, for tests, a thread) that holds the
//! memfds and control regions of many heaps so they outlive their database
//! processes, and serves read-only pulls of them to a recovering host.
//!
//! # Local peers (the Unix socket)
//!
//! A database hands over its descriptors on a Unix socket ([`register`]:
//! one JSON line and two descriptors by `SCM_RIGHTS`; answer `ok` or
//! `error: REASON`) and keeps that connection open for the heap's life.
//! The socket is created `0600` in a private `0700` directory ([`socket`]
//! rules: pass e.g. `$XDG_RUNTIME_DIR/remem/agent.sock`); every peer's
//! kernel credentials (`SO_PEERCRED`, `SO_PEERGROUPS`) must show the
//! agent's user or a member of the group named by
//! [`AgentOptions::group`]. The memfds must be sealed against resizing
//! (`F_SEAL_SHRINK | F_SEAL_GROW`) and be exactly the sizes their headers
//! state; the control region's header must match the heap; the control
//! region must name the registrant as its owner (a forked child cannot
//! register its parent's heap); the baseline path is opened read-only and
//! only if the registrant may read it ([`validate`]).
//!
//! Heaps are keyed by UUID, each bound to the connection that registered
//! it ([`hosted`] has the rules: a second live registration is refused; the
//! end of a connection seals only its own heap; a heap that leaves frees
//! its regions). When the connection ends after `closed` and the control
//! region says "closed cleanly", the heap leaves at once (CLOSED). Otherwise
//! the owner is gone: the state becomes SEALING and the heap is sealed in
//! the background ([`seal`]), publishing its progress.
//!
//! [`reattach`] (same host, after a restart) hands the heap memfd back, to
//! the registrant's user only, and only once its owner is gone.
//!
//! # What a recoverer reads (the transport's regions)
//!
//! ```text
//!  directory  4096·(1+slots)  registered first, when the agent starts: a header, then one
//!                             info block per slot (layout in [`layout`]); find your heap's
//!                             slot by its UUID
//!  per hosted heap, described (addr, len, rkey) in its info block:
//!   heap      size B          the heap's memfd (live while RUNNING; frozen once the owner is gone)
//!   control   ...             the control region (current and closing sets)
//!   crc       4·npages        CRC-32 of each page, valid below seal_cursor
//!   sealed    8·ceil(npages/64)  bit p: page p differs from the baseline, valid below seal_cursor
//! ```
//!
//! Finding a heap: read the directory region (the region whose first 8
//! bytes are `"REMEMDIR"`), pick the slot whose `uuid` is the baseline's
//! and whose state is not FREE, then poll that info block. Once the state is
//! SEALING or SEALED, page `p` comes from: the baseline when `p <
//! seal_cursor` and its sealed bit is clear; the agent otherwise (its memory
//! holds the newest copy; for `p < seal_cursor` its CRC is in the crc
//! region). CLOSED: everything is in the baseline. A recoverer that sees
//! the slot's `assigned` change, or its UUID go, starts over.
//!
//! Test hook: [`AgentOptions::damaged_pages`] (the `remem agent` command
//! reads `REMEM_AGENT_DAMAGED_PAGES`, e.g. `3,17,100-120`) names pages the
//! agent serves with every byte inverted while its crc region holds the
//! CRC of the true bytes: a puller sees them fail verification, as for a
//! page the agent's memory could not hold correctly.
//!
//! Files: `layout.rs` (the published blocks), `socket.rs` (private socket,
//! peer check), `message.rs` (the Unix-socket protocol), `validate.rs`
//! (memfds, control region, baseline), `hosted.rs` (the table of heaps),
//! `seal.rs` (background sealing), `client.rs` (the database's side),
//! `error.rs`.

mod client;
mod error;
mod hosted;
pub mod layout;
mod message;
mod seal;
pub mod socket;
mod validate;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use remem_alloc::ctl;
use remem_alloc::format::uuid_string;

pub use client::{open_registered, reattach, register, request, AgentLink, Opened};
pub use error::AgentError;
pub use layout::{dir, info};
pub use message::Registration;

use error::io;
use hosted::{Held, NewHeap, Owner, Shared, Table};
use layout::{u32_at, u64_at};
use message::{recv_request, send_error, send_ok};
use socket::Policy;
use validate::newest_superblock;

use crate::sys::{peer_cred, PeerCred, ReadMap};
use crate::transport::{self, Kind, ServeOptions, SharedBytes, SourceMemory, Target};

/// Time a peer has to send its request after connecting.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a re-attaching database has to register after it got the memfd
/// (it reads the whole memfd first).
const REATTACH_TIMEOUT: Duration = Duration::from_secs(600);
/// Unix-socket connections served at once.
const MAX_CONNECTIONS: usize = 256;

/// How to run an agent.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AgentOptions {
    /// The Unix socket databases register on. Its directory is created
    /// `0700` (or must already be private to the agent's user): pass e.g.
    /// `$XDG_RUNTIME_DIR/remem/agent.sock` or `/run/remem/agent.sock`.
    pub socket: PathBuf,
    /// Transport options (listen address, token).
    pub serve: ServeOptions,
    /// Which transport.
    pub kind: Kind,
    /// A group whose members may register too (the socket becomes `0660`
    /// and its directory `0710`, owned by that group).
    pub group: Option<String>,
    /// Heaps held at once (slots of the directory), 1..=[`dir::MAX_SLOTS`].
    pub max_heaps: usize,
    /// Compute a BLAKE3 digest of each image while sealing and publish it
    /// (off by default: it is a whole-image pass).
    pub digest: bool,
    /// Test hook: pages served damaged (see the module docs).
    pub damaged_pages: Vec<u64>,
    /// Test hook: a pause before each sealed chunk of [`seal::CHUNK`] pages
    /// (a slow seal, as on a large heap; the `remem agent` command reads
    /// `REMEM_AGENT_SEAL_PAUSE_MS`).
    pub seal_pause: std::time::Duration,
}

impl AgentOptions {
    /// Databases register on `socket`; pulls are served over TCP as `serve` says.
    pub fn new(socket: impl Into<PathBuf>, serve: ServeOptions) -> AgentOptions {
        AgentOptions {
            socket: socket.into(),
            serve,
            kind: Kind::Tcp,
            group: None,
            max_heaps: dir::DEFAULT_SLOTS,
            digest: false,
            damaged_pages: Vec::new(),
            seal_pause: std::time::Duration::ZERO,
        }
    }

    /// Serve pulls with this transport.
    pub fn kind(mut self, kind: Kind) -> AgentOptions {
        self.kind = kind;
        self
    }

    /// Admit the members of group `name` as well as the agent's user.
    pub fn group(mut self, name: impl Into<String>) -> AgentOptions {
        self.group = Some(name.into());
        self
    }

    /// Hold at most `n` heaps.
    pub fn max_heaps(mut self, n: usize) -> AgentOptions {
        self.max_heaps = n;
        self
    }

    /// Publish a BLAKE3 digest of each sealed image.
    pub fn digest(mut self, on: bool) -> AgentOptions {
        self.digest = on;
        self
    }

    /// Test hook: serve these pages damaged.
    pub fn damaged_pages(mut self, pages: Vec<u64>) -> AgentOptions {
        self.damaged_pages = pages;
        self
    }

    /// Test hook: pause this long after each sealed chunk.
    pub fn seal_pause(mut self, pause: std::time::Duration) -> AgentOptions {
        self.seal_pause = pause;
        self
    }
}

/// Parses a page list such as `3,17,100-120` (for `REMEM_AGENT_DAMAGED_PAGES`).
pub fn parse_page_list(s: &str) -> Result<Vec<u64>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |x: &str| x.trim().parse::<u64>().map_err(|e| format!("bad page number {x:?} in {s:?}: {e}"));
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if b < a || b - a > 1 << 20 {
                    return Err(format!("bad page range {part:?}"));
                }
                out.extend(a..=b);
            }
            None => out.push(num(part)?),
        }
    }
    Ok(out)
}

/// One hosted heap, as [`Agent::heaps`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeapStatus {
    /// Slot in the directory.
    pub slot: usize,
    /// Heap UUID.
    pub uuid: String,
    /// State ([`info`]).
    pub state: u32,
    /// Pid of the owner (or the last one).
    pub owner_pid: u64,
    /// Pages in the heap.
    pub npages: u64,
    /// Pages covered by the seal.
    pub seal_cursor: u64,
    /// Pages found to differ from the baseline.
    pub sealed_pages: u64,
    /// Whether the agent still holds the heap's memory.
    pub held: bool,
}

/// A running agent. Dropping it stops accepting databases and closes its
/// listener once the connections it serves end.
pub struct Agent {
    shared: Arc<Shared>,
    socket: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag, then remove the socket.
        let _ = UnixStream::connect(&self.socket);
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("socket", &self.socket).field("listen", &self.shared.target.local_addr()).finish()
    }
}

impl Agent {
    /// Starts serving: the private Unix socket and the transport listener.
    pub fn start(opts: AgentOptions) -> Result<Agent, AgentError> {
        if opts.max_heaps == 0 || opts.max_heaps > dir::MAX_SLOTS {
            return Err(AgentError::Protocol(format!("max_heaps must be 1..={}", dir::MAX_SLOTS)));
        }
        let group = match &opts.group {
            Some(name) => {
                let gid = crate::sys::group_id(name)
                    .map_err(io(format!("looking up group {name}")))?
                    .ok_or_else(|| AgentError::Socket(format!("there is no group named {name}")))?;
                Some((name.clone(), gid))
            }
            None => None,
        };
        let policy = Policy { uid: crate::sys::euid(), group };
        let listener = socket::bind(&opts.socket, &policy)?;
        let target: Arc<dyn Target> = Arc::from(transport::serve(opts.kind, opts.serve)?);
        let dir_bytes = Arc::new(SharedBytes::zeroed(dir::len(opts.max_heaps)));
        let shared = Arc::new(Shared {
            target,
            dir: dir_bytes.clone(),
            table: Mutex::new(Table { slots: (0..opts.max_heaps).map(|_| None).collect(), ..Table::default() }),
            changed: parking_lot::Condvar::new(),
            policy,
            digest: opts.digest,
            damaged: opts.damaged_pages,
            seal_pause: opts.seal_pause,
            stopping: AtomicBool::new(false),
        });
        shared.init_dir(opts.max_heaps);
        shared.target.register(dir_bytes)?;
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("remem-agent".into())
            .spawn(move || accept_loop(&listener, &sh))
            .map_err(io("spawning the agent thread"))?;
        Ok(Agent { shared, socket: opts.socket })
    }

    /// Where pulls are served.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.target.local_addr()
    }

    /// The Unix socket databases register on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Every slot that holds (or held) a heap.
    pub fn heaps(&self) -> Vec<HeapStatus> {
        let t = self.shared.table.lock();
        let block = self.shared.dir.read(0, self.shared.dir.len()).unwrap_or_default();
        t.slots
            .iter()
            .enumerate()
            .filter_map(|(slot, h)| {
                let h = h.as_ref()?;
                let b = block.get(dir::slot_offset(slot)..dir::slot_offset(slot) + info::LEN)?;
                Some(HeapStatus {
                    slot,
                    uuid: uuid_string(&h.uuid),
                    state: u32_at(b, info::STATE)?,
                    owner_pid: u64_at(b, info::OWNER_PID)?,
                    npages: u64_at(b, info::NPAGES)?,
                    seal_cursor: u64_at(b, info::SEAL_CURSOR)?,
                    sealed_pages: u64_at(b, info::SEALED_PAGES)?,
                    held: h.held.is_some(),
                })
            })
            .collect()
    }

    /// The state of heap `uuid` (text form), if the agent has a slot for it.
    pub fn heap_state(&self, uuid: &str) -> Option<u32> {
        let t = self.shared.table.lock();
        t.slots.iter().flatten().find(|h| uuid_string(&h.uuid) == uuid).map(|h| h.state)
    }

    /// The state of the heap registered most recently ([`info::FREE`] if none).
    pub fn state(&self) -> u32 {
        let t = self.shared.table.lock();
        latest_state(&t)
    }

    /// Waits until the most recently registered heap's state is `want` (or
    /// `timeout` passes); returns the state.
    pub fn wait_state(&self, want: u32, timeout: Duration) -> u32 {
        self.wait_for(timeout, |t| {
            let s = latest_state(t);
            (s == want).then_some(s).ok_or(s)
        })
    }

    /// Waits until the most recently registered heap's state is one of
    /// `want` (or `timeout` passes); returns the state.
    pub fn wait_state_in(&self, want: &[u32], timeout: Duration) -> u32 {
        self.wait_for(timeout, |t| {
            let s = latest_state(t);
            want.contains(&s).then_some(s).ok_or(s)
        })
    }

    /// Waits until heap `uuid`'s state is `want` (or `timeout` passes);
    /// returns the state (`None`: no slot for it).
    pub fn wait_heap_state(&self, uuid: &str, want: u32, timeout: Duration) -> Option<u32> {
        self.wait_for(timeout, |t| {
            let s = t.slots.iter().flatten().find(|h| uuid_string(&h.uuid) == uuid).map(|h| h.state);
            if s == Some(want) {
                Ok(s)
            } else {
                Err(s)
            }
        })
    }

    fn wait_for<T>(&self, timeout: Duration, mut f: impl FnMut(&Table) -> Result<T, T>) -> T {
        let deadline = Instant::now() + timeout;
        let mut t = self.shared.table.lock();
        loop {
            match f(&t) {
                Ok(v) => return v,
                Err(v) if Instant::now() >= deadline => return v,
                Err(_) => {
                    self.shared.changed.wait_until(&mut t, deadline);
                }
            }
        }
    }

    /// A BLAKE3 digest of the most recently registered heap's memory now.
    pub fn heap_digest(&self) -> Option<[u8; 32]> {
        use std::os::fd::AsFd;
        let t = self.shared.table.lock();
        let held = t.slots.get(t.latest?)?.as_ref()?.held.as_ref()?;
        let bytes = held.heap.bytes();
        let len = bytes.len() as u64;
        let ranges = remem_alloc::memfd_data_ranges(held.heap_fd.as_fd(), len).unwrap_or_else(|_| vec![(0, len)]);
        Some(crate::digest::image_digest(bytes, &ranges, &[]))
    }
}

fn latest_state(t: &Table) -> u32 {
    t.latest.and_then(|s| t.slots[s].as_ref()).map_or(info::FREE, |h| h.state)
}

fn accept_loop(listener: &UnixListener, sh: &Arc<Shared>) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut next_id = 0u64;
    for conn in listener.incoming() {
        if sh.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else {
            // EMFILE and friends: back off instead of spinning.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            send_error(&conn, &AgentError::Refused(format!("the agent serves {MAX_CONNECTIONS} connections already")));
            continue;
        }
        next_id += 1;
        let (id, sh, act) = (next_id, sh.clone(), active.clone());
        act.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new().name("remem-agent-conn".into()).spawn(move || {
            if let Err(e) = serve_conn(&sh, &conn, id) {
                send_error(&conn, &e);
                eprintln!("remem agent: {e}");
            }
            act.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The heap a connection owns; when the connection ends, its owner left.
struct Claim<'a> {
    sh: &'a Arc<Shared>,
    id: u64,
    slot: Option<usize>,
    clean: bool,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            owner_left(self.sh, slot, self.id, self.clean);
        }
    }
}

/// Serves one database connection: registration (or re-attach), then waits
/// for it to end.
fn serve_conn(sh: &Arc<Shared>, conn: &UnixStream, id: u64) -> Result<(), AgentError> {
    let cred = peer_cred(conn).map_err(io("reading the peer's credentials"))?;
    sh.policy.check(&cred)?;
    conn.set_read_timeout(Some(REQUEST_TIMEOUT)).map_err(io("setting a timeout"))?;
    let (req, fds) = recv_request(conn)?;
    let mut claim = Claim { sh, id, slot: None, clean: false };
    match req.op.as_str() {
        "register" => claim.slot = Some(register_heap(sh, id, &cred, &req, fds)?),
        "reattach" => {
            if !fds.is_empty() {
                return Err(AgentError::Protocol("a reattach request carries no descriptors".into()));
            }
            claim.slot = Some(reattach_heap(sh, id, &cred, &req, conn)?);
            conn.set_read_timeout(Some(REATTACH_TIMEOUT)).map_err(io("setting a timeout"))?;
            let (again, fds) = recv_request(conn)?;
            if again.op != "register" || again.uuid != req.uuid {
                return Err(AgentError::Protocol(format!(
                    "after a reattach of {}, expected its registration, got {:?} of {}",
                    req.uuid, again.op, again.uuid
                )));
            }
            register_heap(sh, id, &cred, &again, fds)?;
        }
        op => return Err(AgentError::Protocol(format!("unknown operation {op:?}"))),
    }
    send_ok(conn, &[])?;
    conn.set_read_timeout(None).map_err(io("clearing the timeout"))?;
    // Wait for the database to go away (or say it closed cleanly).
    let mut r = BufReader::new(conn.take(1 << 20));
    let mut line = String::new();
    claim.clean = loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => break false,
            Ok(_) if line.trim() == "closed" => break true,
            Ok(_) => {}
        }
    };
    Ok(())
}

fn register_heap(
    sh: &Arc<Shared>,
    id: u64,
    cred: &PeerCred,
    req: &Registration,
    fds: Vec<std::os::fd::OwnedFd>,
) -> Result<usize, AgentError> {
    let checked = validate::check_memfds(fds)?;
    let uuid = checked.header.uuid;
    if req.uuid != uuid_string(&uuid) {
        return Err(AgentError::Protocol(format!(
            "the message names heap {}, the memfd holds heap {}",
            req.uuid,
            uuid_string(&uuid)
        )));
    }
    if cred.pid != 0 && checked.control_pid != u64::from(cred.pid) {
        return Err(AgentError::NotAllowed(format!(
            "the control region belongs to pid {}, the registrant is pid {}: a process registers only the heaps it \
             opened (a forked child cannot register its parent's heap)",
            checked.control_pid, cred.pid
        )));
    }
    let (baseline, generation) = validate::open_baseline(&req.baseline, cred, &uuid, checked.header.layout.size)?;
    let heap_fd = checked.heap.try_clone().map_err(io("dup of the heap memfd"))?.into();
    let heap = Arc::new(ReadMap::new(&checked.heap).map_err(io("mapping the heap memfd"))?);
    let served: Arc<dyn SourceMemory> = if sh.damaged.is_empty() {
        heap.clone()
    } else {
        Arc::new(ReadMap::with_damaged_pages(&checked.heap, &sh.damaged).map_err(io("mapping the heap memfd"))?)
    };
    let control = Arc::new(ReadMap::new(&checked.control).map_err(io("mapping the control memfd"))?);
    hosted::host(
        sh,
        id,
        NewHeap { checked, heap_fd, heap, served, control, baseline, generation, uid: cred.uid, pid: cred.pid },
    )
}

fn reattach_heap(
    sh: &Arc<Shared>,
    id: u64,
    cred: &PeerCred,
    req: &Registration,
    conn: &UnixStream,
) -> Result<usize, AgentError> {
    let mut t = sh.table.lock();
    let slot = t
        .slots
        .iter()
        .position(|s| s.as_ref().is_some_and(|h| uuid_string(&h.uuid) == req.uuid))
        .ok_or_else(|| AgentError::NothingHeld(format!("the agent holds no heap {}", req.uuid)))?;
    let h = t.slots[slot].as_mut().expect("found");
    if let Owner::Conn(_) = h.owner {
        return Err(AgentError::Refused(format!("heap {}'s database (pid {}) is still running", req.uuid, h.pid)));
    }
    if h.uid != cred.uid {
        return Err(AgentError::NotAllowed(format!(
            "heap {} was registered by uid {}; only that user may re-attach it (pid {} is uid {})",
            req.uuid, h.uid, cred.pid, cred.uid
        )));
    }
    let Some(held) = &h.held else {
        return Err(AgentError::NothingHeld(format!(
            "heap {} was closed cleanly or recovered elsewhere: the agent holds nothing newer than its baseline; open \
             the baseline",
            req.uuid
        )));
    };
    let same_file = |a: &std::fs::Metadata, b: &std::fs::Metadata| {
        use std::os::unix::fs::MetadataExt;
        a.dev() == b.dev() && a.ino() == b.ino()
    };
    match (std::fs::metadata(&req.baseline), held.baseline.metadata()) {
        (Ok(a), Ok(b)) if same_file(&a, &b) => {}
        _ => {
            return Err(AgentError::Refused(format!(
                "{} is not the baseline heap {} was registered with",
                req.baseline.display(),
                req.uuid
            )));
        }
    }
    // Stop the seal: the restarted database finds its dirty pages itself.
    h.stop.store(true, Ordering::SeqCst);
    h.stop = Arc::new(AtomicBool::new(false));
    send_ok(conn, &[held.heap_fd.as_raw_fd()])?;
    h.owner = Owner::Conn(id);
    h.pid = cred.pid;
    h.dead_epoch = u64::MAX;
    sh.put_u64(slot, info::OWNER_PID, u64::from(cred.pid));
    sh.set_state(&mut t, slot, info::RUNNING);
    Ok(slot)
}

/// The connection `id` that owned `slot` ended (after `closed` if `clean`).
fn owner_left(sh: &Arc<Shared>, slot: usize, id: u64, clean: bool) {
    let mut t = sh.table.lock();
    let Some(h) = t.slots.get_mut(slot).and_then(Option::as_mut) else { return };
    if h.owner != Owner::Conn(id) {
        return;
    }
    h.owner = Owner::Gone;
    let control_closed =
        h.held.as_ref().is_some_and(|held| u64_at(held.control.bytes(), ctl::STATE) == Some(ctl::CLOSED));
    if clean && !control_closed {
        eprintln!(
            "remem agent: heap {} said closed, but its control region does not: sealing it as if its owner died",
            uuid_string(&h.uuid)
        );
    }
    if clean && control_closed || h.held.is_none() {
        sh.release(h);
        sh.set_state(&mut t, slot, info::CLOSED);
        return;
    }
    let held: &Held = h.held.as_ref().expect("held");
    h.dead_epoch = newest_superblock(&held.baseline).map_or(u64::MAX, |s| s.epoch);
    h.stop = Arc::new(AtomicBool::new(false));
    let job = match (held.heap_fd.try_clone(), held.baseline.try_clone()) {
        (Ok(heap_fd), Ok(baseline)) => Some(seal::Job {
            slot,
            assigned: h.assigned,
            stop: h.stop.clone(),
            heap_fd,
            heap: held.heap.clone(),
            control: held.control.clone(),
            crc: held.crc.clone(),
            sealed: held.sealed.clone(),
            npages: held.npages,
            mode: held.mode,
            sets: held.sets,
            baseline,
            generation: held.generation,
            dead_epoch: h.dead_epoch,
        }),
        _ => None,
    };
    for field in [info::SEAL_CURSOR, info::SEALED_PAGES, info::NO_BASELINE, info::DIGEST_READY] {
        sh.put_u64(slot, field, 0);
    }
    match job {
        Some(job) => {
            sh.set_state(&mut t, slot, info::SEALING);
            drop(t);
            seal::spawn(sh.clone(), job);
        }
        None => {
            // Cannot seal (out of descriptors): list every page, from the agent.
            let words = held.npages.div_ceil(64) as usize;
            held.sealed.write(0, &vec![0xff; words * 8]);
            let npages = held.npages;
            sh.put_u64(slot, info::NO_BASELINE, 1);
            sh.put_u64(slot, info::SEAL_CURSOR, npages);
            sh.put_u64(slot, info::SEALED_PAGES, npages);
            sh.set_state(&mut t, slot, info::SEALED);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_lists_parse() {
        assert_eq!(parse_page_list("3, 17,5-7").unwrap(), vec![3, 17, 5, 6, 7]);
        assert_eq!(parse_page_list("").unwrap(), Vec::<u64>::new());
        assert!(parse_page_list("x").is_err());
        assert!(parse_page_list("7-5").is_err());
    }
}
