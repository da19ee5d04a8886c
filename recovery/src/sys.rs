//! The recovery crate's operating-system edge outside the verbs transport:
//! read-only mappings of memfds, descriptors received over Unix sockets,
//! the credentials of a Unix socket's peer, memfd seals, group lookup.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use sendfd::{RecvWithFd, SendWithFd};

/// A read-only shared mapping of a whole memfd (or file).
#[derive(Debug)]
pub struct ReadMap {
    map: memmap2::Mmap,
}

impl ReadMap {
    /// Maps all of `file` read-only, shared. The caller makes sure the file
    /// cannot shrink while mapped (the agent requires `F_SEAL_SHRINK`), or
    /// reading past the new end would raise SIGBUS.
    pub fn new(file: &File) -> io::Result<ReadMap> {
        // SAFETY: the mapping is read-only; the bytes may change under it
        // (the database writes the memfd while it lives), which is why every
        // reader copies them out (the transport serves copies, sealing hashes
        // a snapshot) and never holds references into them across changes
        // in a way that assumes they are stable.
        let map = unsafe { memmap2::MmapOptions::new().map(file)? };
        Ok(ReadMap { map })
    }

    /// A private (copy-on-write) mapping of all of `file` in which the pages
    /// `damaged` (4096-byte page indices; those past the end are ignored)
    /// hold other bytes than the file: every byte inverted. Pages not
    /// damaged read the file's current bytes. A test hook: the agent serves
    /// such a mapping to simulate pages it cannot read correctly.
    pub fn with_damaged_pages(file: &File, damaged: &[u64]) -> io::Result<ReadMap> {
        // SAFETY: a private mapping: our writes below go to private copies of
        // the pages, never to the file; the bytes of pages we do not write
        // may change under us (see `new`).
        let mut map = unsafe { memmap2::MmapOptions::new().map_copy(file)? };
        for &p in damaged {
            let Some(start) = usize::try_from(p).ok().and_then(|p| p.checked_mul(4096)) else { continue };
            if let Some(page) = map.get_mut(start..start.saturating_add(4096)) {
                page.iter_mut().for_each(|b| *b = !*b);
            }
        }
        Ok(ReadMap { map: map.make_read_only()? })
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Maps the pages of bytes `start..start + len` into this process's
    /// page tables in one call (`MADV_POPULATE_READ`, Linux 5.14), so that
    /// reading them next takes no page fault per page. Only for ranges that
    /// hold data: populating a hole of a memfd allocates it. A kernel
    /// without it (or a range past the end) just leaves the faults to the
    /// reads: `false`.
    pub fn populate(&self, start: usize, len: usize) -> bool {
        const MADV_POPULATE_READ: libc::c_int = 22;
        let Some(end) = start.checked_add(len).filter(|&e| e <= self.map.len()) else { return false };
        let page = 4096;
        let first = start / page * page;
        if end <= first {
            return true;
        }
        // SAFETY: the range lies inside our mapping; MADV_POPULATE_READ only
        // faults pages in for reading and changes no contents.
        unsafe {
            libc::madvise(self.map.as_ptr().add(first) as *mut libc::c_void, end - first, MADV_POPULATE_READ) == 0
        }
    }
}

impl AsRef<[u8]> for ReadMap {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

/// Sends `msg` and `fds` in one message.
pub fn send_fds(sock: &UnixStream, msg: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let n = sock.send_with_fd(msg, fds)?;
    if n != msg.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short send of a descriptor message"));
    }
    Ok(())
}

/// Receives one message (up to `buf.len()` bytes) and up to `max_fds` descriptors.
pub fn recv_fds(sock: &UnixStream, buf: &mut [u8], max_fds: usize) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut raw = vec![-1 as RawFd; max_fds];
    let (n, nfds) = sock.recv_with_fd(buf, &mut raw)?;
    let fds = raw[..nfds.min(max_fds)]
        .iter()
        // SAFETY: the kernel installed these descriptors in our table for
        // this message; nobody else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    Ok((n, fds))
}

/// Who is at the other end of a Unix socket, as the kernel recorded it
/// when the peer connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id (in the agent's pid namespace).
    pub pid: u32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
    /// Supplementary groups (`SO_PEERGROUPS`).
    pub groups: Vec<u32>,
}

/// `SO_PEERGROUPS` (Linux 4.13; the same value on every architecture but
/// mips, sparc and parisc, which this crate does not build for).
const SO_PEERGROUPS: libc::c_int = 59;

/// The credentials of `sock`'s peer.
pub fn peer_cred(sock: &UnixStream) -> io::Result<PeerCred> {
    let mut c = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `c` is a ucred of `len` bytes, what SO_PEERCRED writes.
    let r = unsafe {
        libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&raw mut c).cast(), &mut len)
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut groups = vec![0 as libc::gid_t; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` has room for `len` bytes; the kernel writes at
        // most that many and stores the length it needs (or wrote) in `len`.
        let r = unsafe {
            libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, SO_PEERGROUPS, groups.as_mut_ptr().cast(), &mut len)
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(n);
            break;
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && n > groups.len() && n <= 1 << 16 {
            groups.resize(n, 0);
            continue;
        }
        return Err(e);
    }
    Ok(PeerCred { pid: c.pid.max(0) as u32, uid: c.uid, gid: c.gid, groups })
}

/// This process's effective user id.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The id of the group named `name`, or `None` when there is no such group.
pub fn group_id(name: &str) -> io::Result<Option<u32>> {
    let cname = CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a group name"))?;
    let mut buf = vec![0u8; 16 << 10];
    loop {
        // SAFETY: `group` and `result` are written by getgrnam_r; `buf` is
        // the scratch space it may use, `buf.len()` bytes; `cname` is a
        // valid C string.
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as above.
        let r =
            unsafe { libc::getgrnam_r(cname.as_ptr(), &mut group, buf.as_mut_ptr().cast(), buf.len(), &mut result) };
        if r == libc::ERANGE && buf.len() < 1 << 24 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        return Ok((!result.is_null()).then_some(group.gr_gid));
    }
}

/// The seals of a memfd (`F_GET_SEALS`): `Err` with `EINVAL` when `fd` is
/// not a memfd (or other file that supports seals).
pub fn seals(fd: impl AsFd) -> io::Result<u32> {
    // SAFETY: F_GET_SEALS takes no argument and only reads the descriptor's
    // file; an invalid descriptor is an error return.
    let r = unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), libc::F_GET_SEALS) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as u32)
}

/// `F_SEAL_SHRINK | F_SEAL_GROW`: the seals the agent requires.
pub const SEALS_FIXED_SIZE: u32 = (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) as u32;
