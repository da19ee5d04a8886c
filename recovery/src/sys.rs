//! The recovery crate's operating-system edge outside the verbs transport:
//! read-only mappings of memfds and descriptors received over Unix sockets.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use sendfd::{RecvWithFd, SendWithFd};

/// A read-only shared mapping of a whole memfd (or file).
#[derive(Debug)]
pub struct ReadMap {
    map: memmap2::Mmap,
}

impl ReadMap {
    /// Maps all of `file` read-only, shared.
    pub fn new(file: &File) -> io::Result<ReadMap> {
        // SAFETY: the mapping is read-only; the bytes may change under it
        // (the database writes the memfd while it lives), which is why every
        // reader copies them out (the transport serves copies, sealing hashes
        // a snapshot) and never holds references into them across changes
        // in a way that assumes they are stable.
        let map = unsafe { memmap2::MmapOptions::new().map(file)? };
        Ok(ReadMap { map })
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
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
    let fds = raw[..nfds]
        .iter()
        // SAFETY: the kernel installed these descriptors in our table for
        // this message; nobody else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    Ok((n, fds))
}
