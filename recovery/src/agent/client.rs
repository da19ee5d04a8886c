//! The database's side of the agent: [`register`] a heap, keep the
//! [`AgentLink`] for the heap's life, and [`reattach`] after a restart on
//! the same host.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use remem_alloc::baseline::{Baseline, FileBackend};
use remem_alloc::fork::{NotInherited, Owner};
use remem_alloc::{Heap, HeapOptions};

use super::error::{io, AgentError};
use super::message::{read_answer_fd, send_request, Registration};
use crate::sys::ReadMap;

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

    /// Tells the agent the heap was closed cleanly (call after `Heap::close`;
    /// the agent checks the control region says so, else it seals as if the
    /// owner had died). Refused in a forked child: only the database may say so.
    pub fn closed(self) -> Result<(), AgentError> {
        self.owner.check().map_err(|f| AgentError::Heap(f.into()))?;
        let mut conn = self.conn.get();
        conn.write_all(b"closed\n").map_err(io("telling the agent"))?;
        // Wait for the agent to hang up: it has then released the heap.
        let mut b = [0u8; 1];
        let _ = std::io::Read::read(&mut conn, &mut b);
        Ok(())
    }
}

fn connect(socket: &Path) -> Result<UnixStream, AgentError> {
    UnixStream::connect(socket).map_err(io(format!("connecting to the agent at {}", socket.display())))
}

/// Sends a request and reads the answer (and the descriptor it carries).
/// An agent that refuses a peer before reading its request has hung up by
/// the time the request is sent: its reason is still there to read.
fn exchange(conn: &UnixStream, reg: &Registration, fds: &[std::os::fd::RawFd]) -> Result<Option<OwnedFd>, AgentError> {
    if let Err(e) = send_request(conn, reg, fds) {
        return Err(match read_answer_fd(conn) {
            Err(refused @ (AgentError::Refused(_) | AgentError::NothingHeld(_))) => refused,
            _ => e,
        });
    }
    read_answer_fd(conn)
}

/// What registering `heap` sends: checked before anything is connected.
fn registration(heap: &Heap) -> Result<(Registration, [std::os::fd::RawFd; 2]), AgentError> {
    // A forked child cannot hand over a heap it inherited.
    heap.check_process().map_err(remem_alloc::Error::from)?;
    if let Some(s) = heap.lazy_status().filter(|s| !s.settled || s.committed_epoch.is_none()) {
        return Err(AgentError::StillLoading { resident: s.resident + s.zero, pages: s.pages });
    }
    let (Some(ctl), Some(path)) = (heap.control_memfd(), heap.path()) else { return Err(AgentError::NoBaseline) };
    // The agent runs elsewhere in the file system: give it an absolute path.
    let baseline = std::fs::canonicalize(path).map_err(io(format!("resolving {}", path.display())))?;
    let reg = Registration { op: "register".into(), uuid: heap.uuid(), baseline, pid: std::process::id() };
    Ok((reg, [heap.memfd().as_raw_fd(), ctl.as_raw_fd()]))
}

fn send_registration(conn: &UnixStream, heap: &Heap) -> Result<(), AgentError> {
    let (reg, fds) = registration(heap)?;
    exchange(conn, &reg, &fds).map(drop)
}

/// Hands `heap`'s memfd and control region to the agent listening on
/// `socket`, so that they outlive this process.
pub fn register(heap: &Heap, socket: &Path) -> Result<AgentLink, AgentError> {
    registration(heap)?;
    let conn = connect(socket)?;
    send_registration(&conn, heap)?;
    Ok(AgentLink::new(conn))
}

/// Pages of the memfd `fd` whose CRC differs from the baseline's (holes,
/// which read as zeros, are not touched: reading one would allocate it).
fn differing_pages(fd: &OwnedFd, bl: &Baseline<FileBackend>) -> Result<Vec<u64>, AgentError> {
    use std::os::fd::AsFd;
    let map = ReadMap::new(&std::fs::File::from(fd.try_clone().map_err(io("dup memfd"))?))
        .map_err(io("mapping the heap memfd"))?;
    let len = map.bytes().len() as u64;
    let ranges = remem_alloc::memfd_data_ranges(fd.as_fd(), len).unwrap_or_else(|_| vec![(0, len)]);
    let mut out = Vec::new();
    crate::digest::for_each_page(map.bytes(), &ranges, &[], |p, page, _| {
        if bl.page_crc(p).map_or(true, |c| c != crc32fast::hash(page)) {
            out.push(p);
        }
    });
    Ok(out)
}

/// Same-host restart: takes the heap's memfd back from the agent (no
/// copy), maps it, flushes the pages the dead process left dirty, and
/// registers the new process as the heap's owner. The agent hands the
/// memfd only to the user that registered the heap, and only once its
/// owner is gone.
pub fn reattach(socket: &Path, baseline: &Path, opts: &HeapOptions) -> Result<(Heap, AgentLink), AgentError> {
    let open = || -> Result<Baseline<FileBackend>, AgentError> {
        let f = std::fs::File::open(baseline).map_err(io(format!("opening {}", baseline.display())))?;
        Baseline::open(FileBackend::from_file(f))
            .map_err(|e| AgentError::Protocol(format!("baseline {}: {e}", baseline.display())))
    };
    let bl = open()?;
    let uuid = remem_alloc::format::uuid_string(&bl.uuid());
    let conn = connect(socket)?;
    let path = std::fs::canonicalize(baseline).map_err(io(format!("resolving {}", baseline.display())))?;
    let reg = Registration { op: "reattach".into(), uuid, baseline: path, pid: std::process::id() };
    let Some(fd) = exchange(&conn, &reg, &[])? else {
        return Err(AgentError::Protocol("the agent answered ok without the memfd".into()));
    };
    let dirty = differing_pages(&fd, &bl)?;
    drop(bl);
    let heap = Heap::attach_durable(fd, baseline, opts, &dirty)?;
    send_registration(&conn, &heap)?;
    Ok((heap, AgentLink::new(conn)))
}

/// How [`open_registered`] opened the heap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// The agent held the heap's memory (its last process died): taken
    /// back with [`reattach`], nothing lost.
    Reattached,
    /// The agent held nothing newer than the baseline: opened from the
    /// baseline with [`Heap::open`], then registered.
    FromBaseline,
}

/// Opens the heap of `baseline` under the agent on `socket`, the way a
/// database starts: if the agent holds the heap's memory because the
/// database's last process died, takes it back ([`reattach`]: the newest
/// state, not the baseline's); otherwise opens the baseline ([`Heap::open_with`]) and
/// registers the heap. Any other answer (the old process still runs, another user's
/// heap, no agent listening) is an error and nothing is opened.
pub fn open_registered(
    socket: &Path,
    baseline: &Path,
    opts: &HeapOptions,
) -> Result<(Heap, AgentLink, Opened), AgentError> {
    match reattach(socket, baseline, opts) {
        Ok((heap, link)) => Ok((heap, link, Opened::Reattached)),
        Err(AgentError::NothingHeld(_)) => {
            let heap = Heap::open_with(baseline, opts)?;
            let link = register(&heap, socket)?;
            Ok((heap, link, Opened::FromBaseline))
        }
        Err(e) => Err(e),
    }
}

/// Sends one raw request (`reg` and the descriptors `fds`) to the agent on
/// `socket` and reads its answer: the connection (keep it open to stay the
/// owner of what was registered) and the descriptor the answer carried, if
/// any. [`register`] and [`reattach`] are built on the same messages; this
/// is for clients in other languages and for tests of the agent's checks.
pub fn request(
    socket: &Path,
    reg: &Registration,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<(UnixStream, Option<OwnedFd>), AgentError> {
    let conn = connect(socket)?;
    let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let fd = exchange(&conn, reg, &raw)?;
    Ok((conn, fd))
}
