//! The control connection: the Noise handshake (see `channel.rs`), then the
//! exchange of region descriptors (and, for verbs, of queue-pair
//! endpoints), sealed.
//!
//! Every message is a frame: `type u8, 3 reserved bytes, body length u32`,
//! then the body; integers little-endian; bodies are capped at
//! [`MAX_BODY`]. The first two frames of each side are plaintext (they
//! carry the Noise handshake); every frame after them is sealed in the
//! channel.
//!
//! ```text
//! initiator                                     target
//!  HELLO     magic "REMEMXP\0", version u16, ──▶  (plaintext; the Noise prologue)
//!            kind u8, 0u8
//!  NOISE     -> psk, e  (48 bytes)           ──▶  (plaintext)
//!                                           ◀── NOISE <- e, ee (48 bytes), or REJECT (plaintext)
//!  CONFIRM   empty                           ══▶  sealed: the initiator holds the session keys
//!                                           ◀══ ACCEPT  n u32, 0u32, n × (addr u64, rkey u32,
//!                                                       0u32, len u64), m u32, endpoint [m]   (sealed)
//!  verbs only:
//!  ENDPOINT  endpoint of the initiator's QP  ══▶
//!                                           ◀══ READY
//! ```
//!
//! The target reads HELLO and the first Noise message without a thread of
//! their own (`server.rs`), checks the message's tag (a key derived from
//! the token: a stranger costs one HKDF and one AEAD, no Diffie-Hellman),
//! and only then answers. A peer counts as authenticated once its CONFIRM
//! opens under the session key, which a replayed first message cannot give.
//! Either side may send `REJECT(code u8, 0, 0, 0, UTF-8 reason)` instead of
//! its next message and close; before the channel exists it is plaintext
//! (a path attacker can forge it: that is a denial of service, which it
//! can do anyway). After ACCEPT (or READY), a TCP connection carries the
//! sealed data frames of `wire.rs`; a verbs connection stays open, idle,
//! for as long as the queue pair lives.
//!
//! Every value read is checked before use: frame types and lengths, the
//! region count, each region (no empty region, no range past the top of a
//! 57-bit address space, no duplicate key) and the endpoint's length.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

use super::channel::{self, Channel, HANDSHAKE_MSG};
use super::error::ConnectError;
use super::region::RegionDesc;
use super::token::Token;
use super::Kind;

/// Frame magic at the start of HELLO.
const MAGIC: [u8; 8] = *b"REMEMXP\0";
/// Protocol version (1: challenge-response without a channel; 2: Noise).
pub(crate) const VERSION: u16 = 2;
/// Largest frame body accepted.
pub(crate) const MAX_BODY: usize = 256 << 10;
/// Most regions one target announces.
pub(crate) const MAX_REGIONS: usize = 4096;
/// Regions must end at or below this address (57-bit virtual addresses, the
/// most any x86-64 or AArch64 kernel gives a process).
pub(crate) const MAX_REMOTE_END: u64 = 1 << 57;
pub(crate) const HELLO_LEN: usize = 8 + 2 + 1 + 1;
/// The longest plaintext frame body a target reads before authentication.
pub(crate) const MAX_PREAUTH_BODY: usize = 64;
/// Header length of every frame.
pub(crate) const FRAME_HDR: usize = 8;
const REGION_LEN: usize = 24;
const MAX_REASON: usize = 1024;

/// Frame types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    Hello = 1,
    Noise = 2,
    Confirm = 3,
    Accept = 4,
    Reject = 5,
    Endpoint = 6,
    Ready = 7,
}

impl Frame {
    pub(crate) fn from_u8(b: u8) -> Option<Frame> {
        Some(match b {
            1 => Frame::Hello,
            2 => Frame::Noise,
            3 => Frame::Confirm,
            4 => Frame::Accept,
            5 => Frame::Reject,
            6 => Frame::Endpoint,
            7 => Frame::Ready,
            _ => return None,
        })
    }
}

/// Why a side refuses the other, sent in REJECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RejectCode {
    Auth = 1,
    Version = 2,
    Kind = 3,
    Internal = 4,
    Protocol = 5,
    Busy = 6,
}

/// Why a target dropped a connection during the handshake (logged, counted).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    /// The initiator's first Noise message did not open with this target's token.
    #[error("authentication failed: the initiator does not hold this target's token")]
    BadKey,
    /// The initiator's CONFIRM did not open under the session key (a
    /// replayed first message, or tampering).
    #[error("authentication failed: the initiator's confirmation did not open under the session key: {0}")]
    BadConfirm(String),
    /// Another protocol version.
    #[error("the initiator speaks protocol version {0}, this target {VERSION}")]
    Version(u16),
    /// The initiator wants another transport.
    #[error("the initiator asked for the {asked} transport, this target serves {served}")]
    Kind {
        /// What was asked.
        asked: String,
        /// What this target is.
        served: Kind,
    },
    /// Too many connections are open.
    #[error("too many connections ({0} open)")]
    Busy(u64),
    /// Malformed messages.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Not a remem initiator (answered with silence).
    #[error("not a remem initiator: {0}")]
    Foreign(String),
    /// The handshake took longer than allowed, as a whole.
    #[error("the handshake did not finish in time")]
    Deadline,
    /// The socket failed or timed out.
    #[error("{what}: {source}")]
    Io {
        /// The step.
        what: &'static str,
        /// What the operating system said.
        source: io::Error,
    },
    /// The target could not set the connection up (e.g. create a queue pair).
    #[error("{0}")]
    Internal(String),
}

impl Refused {
    /// What to tell the peer before closing, if anything.
    pub(crate) fn reject(&self) -> Option<RejectCode> {
        match self {
            Refused::BadKey => Some(RejectCode::Auth),
            Refused::Version(_) => Some(RejectCode::Version),
            Refused::Kind { .. } => Some(RejectCode::Kind),
            Refused::Busy(_) => Some(RejectCode::Busy),
            Refused::Protocol(_) => Some(RejectCode::Protocol),
            Refused::Internal(_) => Some(RejectCode::Internal),
            Refused::BadConfirm(_) | Refused::Foreign(_) | Refused::Deadline | Refused::Io { .. } => None,
        }
    }
}

/// What an initiator learns from ACCEPT.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Welcome {
    pub(crate) regions: Vec<RegionDesc>,
    pub(crate) endpoint: Vec<u8>,
}

/// A socket whose reads and writes share one deadline: each call gets the
/// time left, so a peer that trickles bytes cannot stretch the handshake.
#[derive(Debug)]
pub(crate) struct Deadline<'a> {
    pub(crate) s: &'a TcpStream,
    pub(crate) at: Instant,
}

impl Deadline<'_> {
    fn arm(&self, write: bool) -> io::Result<()> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "the handshake deadline passed"));
        }
        if write {
            self.s.set_write_timeout(Some(left))
        } else {
            self.s.set_read_timeout(Some(left))
        }
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm(false)?;
        let mut s = self.s;
        s.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm(true)?;
        let mut s = self.s;
        s.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn frame_bytes(ty: Frame, body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(FRAME_HDR + body.len());
    msg.push(ty as u8);
    msg.extend_from_slice(&[0; 3]);
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    msg
}

/// Writes one plaintext frame (the handshake's first frames, and REJECT before the channel).
pub(crate) fn write_frame<W: Write>(w: &mut W, ty: Frame, body: &[u8]) -> io::Result<()> {
    debug_assert!(body.len() <= MAX_BODY);
    w.write_all(&frame_bytes(ty, body))?;
    w.flush()
}

/// Reads one plaintext frame of at most `max` body bytes. `Ok(Err(what))` is a malformed frame.
pub(crate) fn read_frame<R: Read>(r: &mut R, max: usize) -> io::Result<Result<(Frame, Vec<u8>), String>> {
    let mut hdr = [0u8; FRAME_HDR];
    r.read_exact(&mut hdr)?;
    let Some(ty) = Frame::from_u8(hdr[0]) else {
        return Ok(Err(format!("unknown message type {}", hdr[0])));
    };
    let len = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
    if len > max {
        return Ok(Err(format!("message of {len} bytes exceeds the {max}-byte limit")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Ok((ty, body)))
}

pub(crate) fn encode_reject(code: RejectCode, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut body = vec![code as u8, 0, 0, 0];
    body.extend_from_slice(&reason.as_bytes()[..end]);
    body
}

fn decode_reject(body: &[u8]) -> (u8, String) {
    let code = body.first().copied().unwrap_or(0);
    let text = body.get(4..).unwrap_or_default();
    let reason = String::from_utf8_lossy(&text[..text.len().min(MAX_REASON)]).into_owned();
    (code, reason)
}

/// The bytes of a plaintext REJECT frame.
pub(crate) fn reject_frame(code: RejectCode, reason: &str) -> Vec<u8> {
    frame_bytes(Frame::Reject, &encode_reject(code, reason))
}

/// Sends a plaintext REJECT; errors are ignored (the connection is being dropped anyway).
pub(crate) fn send_reject<W: Write>(w: &mut W, code: RejectCode, reason: &str) {
    let _ = write_frame(w, Frame::Reject, &encode_reject(code, reason));
}

pub(crate) fn encode_hello(kind: Kind) -> Vec<u8> {
    let mut b = Vec::with_capacity(HELLO_LEN);
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.push(kind.wire());
    b.push(0);
    b
}

/// Checks a HELLO body against what this target serves.
pub(crate) fn check_hello(hello: &[u8], kind: Kind) -> Result<(), Refused> {
    if hello.get(..8) != Some(&MAGIC[..]) {
        return Err(Refused::Foreign(format!("a first message of {} bytes without the magic", hello.len())));
    }
    let Some(v) = hello.get(8..10) else {
        return Err(Refused::Protocol(format!("HELLO of {} bytes", hello.len())));
    };
    let version = u16::from_le_bytes([v[0], v[1]]);
    if version != VERSION {
        return Err(Refused::Version(version));
    }
    if hello.len() != HELLO_LEN {
        return Err(Refused::Protocol(format!("HELLO of {} bytes, expected {HELLO_LEN}", hello.len())));
    }
    if Kind::from_wire(hello[10]) != Some(kind) {
        let asked = Kind::from_wire(hello[10]).map_or_else(|| format!("unknown ({})", hello[10]), |k| k.to_string());
        return Err(Refused::Kind { asked, served: kind });
    }
    Ok(())
}

/// The target's first step, on the bytes a peer sent so far (HELLO, then
/// the first NOISE frame): how many bytes it must have in all before
/// [`open_preauth`] can judge them. Never asks for more than two small
/// frames; refuses as soon as the bytes show a stranger or a mismatch.
pub(crate) fn preauth_need(buf: &[u8], kind: Kind) -> Result<usize, Refused> {
    let Some(hdr) = buf.get(..FRAME_HDR) else { return Ok(FRAME_HDR) };
    if hdr[0] != Frame::Hello as u8 {
        return Err(Refused::Foreign(format!("a first message of type {}", hdr[0])));
    }
    let len = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
    if len > MAX_PREAUTH_BODY {
        return Err(Refused::Foreign(format!("a first message of {len} bytes")));
    }
    let end = FRAME_HDR + len;
    let Some(hello) = buf.get(FRAME_HDR..end) else { return Ok(end) };
    check_hello(hello, kind)?;
    let Some(hdr) = buf.get(end..end + FRAME_HDR) else { return Ok(end + FRAME_HDR) };
    let len2 = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
    if hdr[0] != Frame::Noise as u8 || len2 != HANDSHAKE_MSG {
        return Err(Refused::Protocol(format!(
            "expected NOISE of {HANDSHAKE_MSG} bytes, got type {} of {len2}",
            hdr[0]
        )));
    }
    Ok(end + FRAME_HDR + len2)
}

/// The target's second step, once [`preauth_need`] is satisfied: opens the
/// initiator's first Noise message with the token. Cheap for a stranger.
pub(crate) fn open_preauth(buf: &[u8], token: &Token, kind: Kind) -> Result<snow::HandshakeState, Refused> {
    let need = preauth_need(buf, kind)?;
    if buf.len() != need {
        return Err(Refused::Protocol(format!("{} bytes before the target's answer, expected {need}", buf.len())));
    }
    let hello_end = need - HANDSHAKE_MSG - FRAME_HDR;
    let hello = &buf[FRAME_HDR..hello_end];
    let noise = &buf[need - HANDSHAKE_MSG..];
    let mut hs = channel::responder(token, hello).map_err(|e| Refused::Internal(e.to_string()))?;
    hs.read_message(noise, &mut []).map_err(|_| Refused::BadKey)?;
    Ok(hs)
}

/// The target's third step, on a connection thread: answers with its own
/// Noise message and waits for the initiator's sealed CONFIRM.
pub(crate) fn finish<S: Read + Write>(s: &mut S, mut hs: snow::HandshakeState) -> Result<Channel, Refused> {
    let io = |what| move |source| Refused::Io { what, source };
    let mut m2 = [0u8; HANDSHAKE_MSG];
    let n = hs.write_message(&[], &mut m2).map_err(|e| Refused::Internal(e.to_string()))?;
    write_frame(s, Frame::Noise, &m2[..n]).map_err(io("sending NOISE"))?;
    let mut ch = Channel::new(hs).map_err(|e| Refused::Internal(e.to_string()))?;
    match ch.read_frame(s).map_err(io("reading CONFIRM"))? {
        Ok((Frame::Confirm, body)) if body.is_empty() => Ok(ch),
        Ok((ty, body)) => Err(Refused::Protocol(format!("expected CONFIRM, got {ty:?} of {} bytes", body.len()))),
        Err(why) => Err(Refused::BadConfirm(why)),
    }
}

/// The whole target side on a blocking stream, up to an open channel; the
/// caller sends ACCEPT. On error the REJECT, if any, has been sent.
pub(crate) fn respond<S: Read + Write>(s: &mut S, token: &Token, kind: Kind) -> Result<Channel, Refused> {
    let mut buf = Vec::new();
    let step = (|| {
        loop {
            let need = preauth_need(&buf, kind)?;
            if buf.len() == need {
                break;
            }
            let at = buf.len();
            buf.resize(need, 0);
            s.read_exact(&mut buf[at..]).map_err(|source| Refused::Io { what: "reading HELLO", source })?;
        }
        open_preauth(&buf, token, kind)
    })();
    match step {
        Ok(hs) => finish(s, hs),
        Err(e) => {
            if let Some(code) = e.reject() {
                send_reject(s, code, &e.to_string());
            }
            Err(e)
        }
    }
}

pub(crate) fn encode_accept(regions: &[RegionDesc], endpoint: &[u8]) -> Vec<u8> {
    debug_assert!(regions.len() <= MAX_REGIONS);
    let mut b = Vec::with_capacity(12 + regions.len() * REGION_LEN + endpoint.len());
    b.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    for r in regions {
        b.extend_from_slice(&r.addr.to_le_bytes());
        b.extend_from_slice(&r.rkey.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&r.len.to_le_bytes());
    }
    b.extend_from_slice(&(endpoint.len() as u32).to_le_bytes());
    b.extend_from_slice(endpoint);
    b
}

/// Decodes and validates ACCEPT: nothing above the transport sees a region
/// that is empty, wraps, ends past [`MAX_REMOTE_END`] or repeats a key.
pub(crate) fn decode_accept(body: &[u8]) -> Result<Welcome, String> {
    let short = || format!("ACCEPT of {} bytes is truncated", body.len());
    let u32_at = |at: usize| -> Result<u32, String> {
        body.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).ok_or_else(short)
    };
    let u64_at = |at: usize| -> Result<u64, String> {
        let b = body.get(at..at + 8).ok_or_else(short)?;
        Ok(u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    };
    let n = u32_at(0)? as usize;
    if n > MAX_REGIONS {
        return Err(format!("ACCEPT announces {n} regions, more than {MAX_REGIONS}"));
    }
    if body.len() < 8 + n * REGION_LEN + 4 {
        return Err(short());
    }
    let mut regions = Vec::with_capacity(n);
    let mut keys = std::collections::HashSet::with_capacity(n);
    let mut at = 8;
    for i in 0..n {
        let r = RegionDesc { addr: u64_at(at)?, rkey: u32_at(at + 8)?, len: u64_at(at + 16)? };
        if r.len == 0 || r.addr.checked_add(r.len).is_none_or(|end| end > MAX_REMOTE_END) {
            return Err(format!("ACCEPT region {i} at {:#x} of {} bytes is empty or out of range", r.addr, r.len));
        }
        if !keys.insert(r.rkey) {
            return Err(format!("ACCEPT announces key {:#x} twice", r.rkey));
        }
        regions.push(r);
        at += REGION_LEN;
    }
    let m = u32_at(at)? as usize;
    at += 4;
    let endpoint = at.checked_add(m).and_then(|end| body.get(at..end)).ok_or_else(short)?.to_vec();
    if at + m != body.len() {
        return Err(format!("ACCEPT has {} trailing bytes", body.len() - at - m));
    }
    Ok(Welcome { regions, endpoint })
}

/// The initiator's side, up to and including ACCEPT, on a blocking stream
/// (give it a [`Deadline`]). Returns the open channel for what follows.
pub(crate) fn initiate<S: Read + Write>(
    s: &mut S,
    token: &Token,
    kind: Kind,
    addr: SocketAddr,
) -> Result<(Welcome, Channel), ConnectError> {
    let io = |what| move |source| ConnectError::Io { addr, what, source };
    let protocol = |what: String| ConnectError::Protocol { addr, what };
    let tampered = |what: String| ConnectError::Tampered { addr, what };
    let hello = encode_hello(kind);
    let mut hs = channel::initiator(token, &hello).map_err(|e| protocol(e.to_string()))?;
    let mut m1 = [0u8; HANDSHAKE_MSG];
    let n = hs.write_message(&[], &mut m1).map_err(|e| protocol(e.to_string()))?;
    let mut first = frame_bytes(Frame::Hello, &hello);
    first.extend_from_slice(&frame_bytes(Frame::Noise, &m1[..n]));
    s.write_all(&first).map_err(io("sending HELLO"))?;

    let (ty, body) = read_frame(s, MAX_REASON + 4).map_err(io("reading NOISE"))?.map_err(protocol)?;
    let body = expect(ty, body, Frame::Noise, addr)?;
    if hs.read_message(&body, &mut []).is_err() {
        return Err(tampered("the target's handshake message failed authentication".into()));
    }
    let mut ch = Channel::new(hs).map_err(|e| protocol(e.to_string()))?;
    ch.write_frame(s, Frame::Confirm, &[]).map_err(io("sending CONFIRM"))?;
    let (ty, body) = ch.read_frame(s).map_err(io("reading ACCEPT"))?.map_err(tampered)?;
    let body = expect(ty, body, Frame::Accept, addr)?;
    let welcome = decode_accept(&body).map_err(protocol)?;
    Ok((welcome, ch))
}

/// `body` if the frame is `want`; a REJECT becomes its error.
pub(crate) fn expect(ty: Frame, body: Vec<u8>, want: Frame, addr: SocketAddr) -> Result<Vec<u8>, ConnectError> {
    if ty == want {
        return Ok(body);
    }
    if ty == Frame::Reject {
        let (code, reason) = decode_reject(&body);
        if code == RejectCode::Auth as u8 {
            return Err(ConnectError::AuthFailed { addr });
        }
        return Err(ConnectError::Rejected { addr, reason });
    }
    Err(ConnectError::Protocol { addr, what: format!("expected {want:?}, got {ty:?}") })
}

/// What two RC queue pairs learn about each other (the ENDPOINT blob and the
/// endpoint in ACCEPT), 28 bytes: `qpn u32, psn u32, lid u16, mtu u8, 0u8,
/// gid [16]`.
#[cfg(any(test, feature = "verbs"))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct QpEndpoint {
    /// Queue pair number.
    pub(crate) qpn: u32,
    /// Initial packet sequence number (24 bits).
    pub(crate) psn: u32,
    /// Port LID (InfiniBand; 0 on RoCE).
    pub(crate) lid: u16,
    /// The port's active MTU (`ibv_mtu` code, 1..=5).
    pub(crate) mtu: u8,
    /// The GID the peer routes to (RoCE).
    pub(crate) gid: [u8; 16],
}

#[cfg(any(test, feature = "verbs"))]
impl QpEndpoint {
    pub(crate) const LEN: usize = 28;

    pub(crate) fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&self.qpn.to_le_bytes());
        b[4..8].copy_from_slice(&self.psn.to_le_bytes());
        b[8..10].copy_from_slice(&self.lid.to_le_bytes());
        b[10] = self.mtu;
        b[12..28].copy_from_slice(&self.gid);
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Result<QpEndpoint, String> {
        let b: &[u8; Self::LEN] =
            b.try_into().map_err(|_| format!("queue-pair endpoint of {} bytes, expected {}", b.len(), Self::LEN))?;
        let e = QpEndpoint {
            qpn: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            psn: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            lid: u16::from_le_bytes([b[8], b[9]]),
            mtu: b[10],
            gid: b[12..28].try_into().unwrap_or_default(),
        };
        if e.qpn > 0xff_ffff || e.psn > 0xff_ffff {
            return Err(format!("queue-pair number {:#x} or PSN {:#x} exceeds 24 bits", e.qpn, e.psn));
        }
        if !(1..=5).contains(&e.mtu) {
            return Err(format!("MTU code {} is not 1..=5", e.mtu));
        }
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1))
    }

    #[test]
    fn accept_round_trips_and_rejects_malformed() {
        let regions = vec![
            RegionDesc { addr: 0x7f00_0000_1000, rkey: 0xdead_beef, len: 1 << 30 },
            RegionDesc { addr: 1, rkey: 2, len: 3 },
        ];
        let body = encode_accept(&regions, b"endpoint");
        let w = decode_accept(&body).unwrap();
        assert_eq!(w, Welcome { regions: regions.clone(), endpoint: b"endpoint".to_vec() });
        for cut in 0..body.len() {
            assert!(decode_accept(&body[..cut]).is_err(), "truncated at {cut}");
        }
        let mut long = body.clone();
        long.push(0);
        assert!(decode_accept(&long).is_err());
        let mut many = body.clone();
        many[0..4].copy_from_slice(&(MAX_REGIONS as u32 + 1).to_le_bytes());
        assert!(decode_accept(&many).unwrap_err().contains("regions"));
        let mut endpoint_huge = body;
        let at = endpoint_huge.len() - 8 - 4;
        endpoint_huge[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_accept(&endpoint_huge).is_err());
    }

    /// Descriptors that would feed garbage to the layers above are refused
    /// here: empty, wrapping, past the address space, a key twice.
    #[test]
    fn inconsistent_descriptors_are_refused() {
        let ok = RegionDesc { addr: 0x1000, rkey: 1, len: 4096 };
        for bad in [
            vec![RegionDesc { len: 0, ..ok }],
            vec![RegionDesc { addr: u64::MAX - 10, len: 4096, ..ok }],
            vec![RegionDesc { addr: MAX_REMOTE_END - 4095, len: 4096, ..ok }],
            vec![RegionDesc { len: u64::MAX, ..ok }],
            vec![ok, RegionDesc { addr: 0x9000, ..ok }],
        ] {
            assert!(decode_accept(&encode_accept(&bad, &[])).is_err(), "{bad:?}");
        }
        assert!(decode_accept(&encode_accept(&[ok, RegionDesc { rkey: 2, ..ok }], &[])).is_ok());
        assert!(decode_accept(&encode_accept(&[RegionDesc { addr: MAX_REMOTE_END - 4096, ..ok }], &[])).is_ok());
    }

    #[test]
    fn frames_are_capped_and_typed() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Frame::Ready, &[]).unwrap();
        assert_eq!(buf, [7, 0, 0, 0, 0, 0, 0, 0]);
        let (ty, body) = read_frame(&mut &buf[..], MAX_BODY).unwrap().unwrap();
        assert_eq!((ty, body.len()), (Frame::Ready, 0));
        let huge = [1u8, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f];
        assert!(read_frame(&mut &huge[..], MAX_BODY).unwrap().unwrap_err().contains("limit"));
        let unknown = [99u8, 0, 0, 0, 0, 0, 0, 0];
        assert!(read_frame(&mut &unknown[..], MAX_BODY).unwrap().is_err());
    }

    #[test]
    fn reject_reasons_are_bounded_and_decoded() {
        let long = "é".repeat(MAX_REASON);
        let body = encode_reject(RejectCode::Kind, &long);
        assert!(body.len() <= 4 + MAX_REASON);
        let (code, reason) = decode_reject(&body);
        assert_eq!(code, RejectCode::Kind as u8);
        assert!(reason.chars().all(|c| c == 'é'));
        assert!(matches!(
            expect(Frame::Reject, encode_reject(RejectCode::Auth, "x"), Frame::Accept, addr()),
            Err(ConnectError::AuthFailed { .. })
        ));
        assert!(matches!(
            expect(Frame::Reject, encode_reject(RejectCode::Kind, "why"), Frame::Accept, addr()),
            Err(ConnectError::Rejected { reason, .. }) if reason == "why"
        ));
        assert!(matches!(expect(Frame::Ready, vec![], Frame::Accept, addr()), Err(ConnectError::Protocol { .. })));
    }

    #[test]
    fn preauth_asks_for_two_small_frames_only() {
        let t = Token::generate().unwrap();
        let hello = encode_hello(Kind::Tcp);
        let mut hs = channel::initiator(&t, &hello).unwrap();
        let mut m1 = [0u8; HANDSHAKE_MSG];
        hs.write_message(&[], &mut m1).unwrap();
        let mut all = frame_bytes(Frame::Hello, &hello);
        all.extend_from_slice(&frame_bytes(Frame::Noise, &m1));
        let mut have = 0;
        let mut steps = 0;
        loop {
            let need = preauth_need(&all[..have], Kind::Tcp).unwrap();
            assert!(need <= all.len());
            if need == have {
                break;
            }
            have = need;
            steps += 1;
        }
        assert_eq!((have, steps), (all.len(), 4));
        assert!(open_preauth(&all, &t, Kind::Tcp).is_ok());
        assert!(matches!(open_preauth(&all, &Token::generate().unwrap(), Kind::Tcp), Err(Refused::BadKey)));
        assert!(matches!(preauth_need(&all, Kind::Verbs), Err(Refused::Kind { .. })));
        assert!(matches!(preauth_need(b"GET / HTTP/1.0\r\n", Kind::Tcp), Err(Refused::Foreign(_))));
        let mut huge = all.clone();
        huge[4..8].copy_from_slice(&1_000_000u32.to_le_bytes());
        assert!(matches!(preauth_need(&huge, Kind::Tcp), Err(Refused::Foreign(_))));
        let mut v1 = all.clone();
        v1[16..18].copy_from_slice(&1u16.to_le_bytes());
        assert!(matches!(preauth_need(&v1, Kind::Tcp), Err(Refused::Version(1))));
    }

    #[test]
    fn qp_endpoint_round_trips_and_is_validated() {
        let e = QpEndpoint { qpn: 0x12_3456, psn: 0xab_cdef, lid: 7, mtu: 5, gid: *b"fe80::0123456789" };
        let b = e.encode();
        assert_eq!(&b[0..4], &[0x56, 0x34, 0x12, 0], "little-endian");
        assert_eq!(QpEndpoint::decode(&b), Ok(e));
        assert!(QpEndpoint::decode(&b[..27]).is_err());
        let mut bad = b;
        bad[3] = 1;
        assert!(QpEndpoint::decode(&bad).unwrap_err().contains("24 bits"));
        let mut bad = b;
        bad[10] = 6;
        assert!(QpEndpoint::decode(&bad).unwrap_err().contains("MTU"));
    }

    type Outcome = (Result<(Welcome, Channel), ConnectError>, Result<Channel, Refused>);

    /// Runs the handshake over loopback with the two tokens and kinds.
    fn run(initiator: (&Token, Kind), target: (&Token, Kind)) -> Outcome {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        let (tt, tk) = (target.0.clone(), target.1);
        let server = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let r = respond(&mut s, &tt, tk);
            r.map(|mut ch| {
                let accept = encode_accept(&[RegionDesc { addr: 4096, rkey: 9, len: 8 }], &[]);
                ch.write_frame(&mut s, Frame::Accept, &accept).unwrap();
                ch
            })
        });
        let mut s = TcpStream::connect(a).unwrap();
        let w = initiate(&mut s, initiator.0, initiator.1, a);
        drop(s);
        (w, server.join().unwrap())
    }

    #[test]
    fn same_token_is_accepted() {
        let t = Token::generate().unwrap();
        let (w, r) = run((&t, Kind::Tcp), (&t, Kind::Tcp));
        assert_eq!(w.unwrap().0.regions, vec![RegionDesc { addr: 4096, rkey: 9, len: 8 }]);
        r.unwrap();
    }

    #[test]
    fn wrong_token_fails_on_both_sides() {
        let (t, u) = (Token::generate().unwrap(), Token::generate().unwrap());
        let (w, r) = run((&t, Kind::Tcp), (&u, Kind::Tcp));
        assert!(matches!(w, Err(ConnectError::AuthFailed { .. })), "{w:?}");
        assert!(matches!(r, Err(Refused::BadKey)), "{r:?}");
    }

    #[test]
    fn wrong_kind_is_named() {
        let t = Token::generate().unwrap();
        let (w, r) = run((&t, Kind::Verbs), (&t, Kind::Tcp));
        let e = w.unwrap_err().to_string();
        assert!(e.contains("asked for the verbs transport, this target serves tcp"), "{e}");
        assert!(matches!(r, Err(Refused::Kind { .. })));
    }

    /// A replay of a genuine first message passes the cheap check but can
    /// never confirm: the replayer lacks the initiator's ephemeral key.
    #[test]
    fn replayed_first_message_cannot_confirm() {
        let t = Token::generate().unwrap();
        let hello = encode_hello(Kind::Tcp);
        let mut hs = channel::initiator(&t, &hello).unwrap();
        let mut m1 = [0u8; HANDSHAKE_MSG];
        hs.write_message(&[], &mut m1).unwrap();
        let mut recorded = frame_bytes(Frame::Hello, &hello);
        recorded.extend_from_slice(&frame_bytes(Frame::Noise, &m1));
        let hs = open_preauth(&recorded, &t, Kind::Tcp).unwrap();
        // The replayer answers with a CONFIRM sealed under keys of its own.
        let (mut fake, _) = {
            let mut i = channel::initiator(&t, &hello).unwrap();
            let mut r = channel::responder(&t, &hello).unwrap();
            let mut a = [0u8; HANDSHAKE_MSG];
            let mut b = [0u8; HANDSHAKE_MSG];
            i.write_message(&[], &mut a).unwrap();
            r.read_message(&a, &mut []).unwrap();
            r.write_message(&[], &mut b).unwrap();
            i.read_message(&b, &mut []).unwrap();
            (Channel::new(i).unwrap(), Channel::new(r).unwrap())
        };
        let mut confirm = Vec::new();
        fake.write_frame(&mut confirm, Frame::Confirm, &[]).unwrap();
        let mut duplex = Duplex { input: &confirm[..], output: Vec::new() };
        assert!(matches!(finish(&mut duplex, hs), Err(Refused::BadConfirm(_))));
    }

    /// A stream reading from a slice and writing to a vector.
    struct Duplex<'a> {
        input: &'a [u8],
        output: Vec<u8>,
    }

    impl Read for Duplex<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Duplex<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}
