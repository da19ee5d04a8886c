//! The Unix-socket protocol between a database and its agent: one JSON line
//! per request, descriptors by `SCM_RIGHTS`, one answer line (`ok` or
//! `error: REASON`).

use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::{io, AgentError};
use crate::sys::{recv_fds, send_fds};

/// The longest request line the agent reads.
pub(crate) const MAX_MESSAGE: usize = 64 << 10;
/// The most descriptors a request may carry (a registration carries two).
pub(crate) const MAX_FDS: usize = 2;

/// What the database sends when it registers or re-attaches.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registration {
    /// `"register"` or `"reattach"`.
    pub op: String,
    /// Heap UUID (text form).
    pub uuid: String,
    /// The baseline file (on storage the agent can read too). The agent
    /// opens it read-only, and only if the registrant may read it.
    pub baseline: PathBuf,
    /// The database's pid (informational: the agent uses the kernel's
    /// peer credentials).
    pub pid: u32,
}

/// Receives one request and the descriptors it carries.
pub(crate) fn recv_request(conn: &UnixStream) -> Result<(Registration, Vec<OwnedFd>), AgentError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let (n, fds) = recv_fds(conn, &mut buf, MAX_FDS).map_err(io("receiving a request"))?;
    if n == 0 {
        return Err(AgentError::Protocol("the peer closed the connection before sending a request".into()));
    }
    let reg = serde_json::from_slice(buf[..n].trim_ascii_end())
        .map_err(|e| AgentError::Protocol(format!("bad request message: {e}")))?;
    Ok((reg, fds))
}

/// Sends one request with `fds`.
pub(crate) fn send_request(conn: &UnixStream, reg: &Registration, fds: &[RawFd]) -> Result<(), AgentError> {
    let mut line = serde_json::to_vec(reg).map_err(|e| AgentError::Protocol(e.to_string()))?;
    line.push(b'\n');
    send_fds(conn, &line, fds).map_err(io("sending to the agent"))
}

/// The agent's answer: `ok`, with `fds`.
pub(crate) fn send_ok(conn: &UnixStream, fds: &[RawFd]) -> Result<(), AgentError> {
    send_fds(conn, b"ok\n", fds).map_err(io("answering the database"))
}

/// The agent's answer to a request it refuses (best effort: the peer may be gone).
pub(crate) fn send_error(conn: &UnixStream, e: &AgentError) {
    let mut line = format!("error: {e}").replace('\n', " ");
    line.truncate(4000);
    line.push('\n');
    let _ = send_fds(conn, line.as_bytes(), &[]);
}

/// Turns an answer line into `Ok` or the agent's reason.
pub(crate) fn parse_answer(line: &[u8]) -> Result<(), AgentError> {
    let line = String::from_utf8_lossy(line);
    let line = line.trim();
    if line == "ok" {
        return Ok(());
    }
    match line.strip_prefix("error: ") {
        Some(reason) => Err(match reason.strip_prefix(super::error::NOTHING_HELD) {
            Some(why) => AgentError::NothingHeld(why.to_owned()),
            None => AgentError::Refused(reason.to_owned()),
        }),
        None if line.is_empty() => Err(AgentError::Refused("the agent closed the connection without an answer".into())),
        None => Err(AgentError::Protocol(format!("unexpected answer {line:?}"))),
    }
}

/// Reads one answer line with up to one descriptor.
pub(crate) fn read_answer_fd(conn: &UnixStream) -> Result<Option<OwnedFd>, AgentError> {
    let mut buf = [0u8; 4096];
    let (n, fds) = recv_fds(conn, &mut buf, 1).map_err(io("reading the agent's answer"))?;
    parse_answer(&buf[..n])?;
    Ok(fds.into_iter().next())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse() {
        assert!(parse_answer(b"ok\n").is_ok());
        assert!(matches!(parse_answer(b"error: nope\n"), Err(AgentError::Refused(r)) if r == "nope"));
        assert!(matches!(parse_answer(b""), Err(AgentError::Refused(_))));
        let held = AgentError::NothingHeld("heap x".into()).to_string();
        let line = format!("error: {held}\n");
        assert!(matches!(parse_answer(line.as_bytes()), Err(AgentError::NothingHeld(r)) if r == "heap x"));
        assert!(matches!(parse_answer(b"what"), Err(AgentError::Protocol(_))));
    }
}
