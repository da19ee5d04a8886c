//! The control connection: authentication, then the exchange of region
//! descriptors (and, for verbs, of queue-pair endpoints).
//!
//! Every message is a frame: `type u8, 3 reserved bytes, body length u32`,
//! then the body; integers little-endian; bodies are capped at
//! [`MAX_BODY`].
//!
//! ```text
//! initiator                                     target
//!  HELLO     magic "REMEMXP\0", version u16, ──▶
//!            kind u8, 0u8, nonce_i [32]
//!                                           ◀── CHALLENGE nonce_t [32], proof_t [32]
//!  (checks proof_t; on mismatch sends REJECT(auth) and stops)
//!  PROOF     proof_i [32]                    ──▶ (checks proof_i; on mismatch REJECT(auth))
//!                                           ◀── ACCEPT  n u32, 0u32, n × (addr u64, rkey u32,
//!                                                       0u32, len u64), m u32, endpoint [m]
//!  verbs only:
//!  ENDPOINT  endpoint of the initiator's QP  ──▶
//!                                           ◀── READY
//! proof_t = keyed-BLAKE3(token, "remem-transport-v1 target",    HELLO body, nonce_t)
//! proof_i = keyed-BLAKE3(token, "remem-transport-v1 initiator", HELLO body, nonce_t)
//! ```
//!
//! Each side contributes a fresh nonce, so no proof can be replayed; the
//! labels differ, so a target's proof is never an initiator's. Either side
//! may send `REJECT(code u8, 0, 0, 0, UTF-8 reason)` instead of its next
//! message and close. After ACCEPT (or READY), a TCP connection carries the
//! data frames of `wire.rs`; a verbs connection stays open, idle, for as
//! long as the queue pair lives.

use std::io::{self, Read, Write};
use std::net::SocketAddr;

use super::error::ConnectError;
use super::region::RegionDesc;
use super::token::{random, Token};
use super::Kind;

/// Frame magic at the start of HELLO.
const MAGIC: [u8; 8] = *b"REMEMXP\0";
/// Protocol version.
pub(crate) const VERSION: u16 = 1;
/// Largest frame body accepted.
pub(crate) const MAX_BODY: usize = 256 << 10;
/// Most regions one target announces.
pub(crate) const MAX_REGIONS: usize = 4096;
const HELLO_LEN: usize = 8 + 2 + 1 + 1 + 32;
const REGION_LEN: usize = 24;
const MAX_REASON: usize = 1024;
const LABEL_TARGET: &[u8] = b"remem-transport-v1 target";
const LABEL_INITIATOR: &[u8] = b"remem-transport-v1 initiator";

/// Frame types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    Hello = 1,
    Challenge = 2,
    Proof = 3,
    Accept = 4,
    Reject = 5,
    Endpoint = 6,
    Ready = 7,
}

impl Frame {
    fn from_u8(b: u8) -> Option<Frame> {
        Some(match b {
            1 => Frame::Hello,
            2 => Frame::Challenge,
            3 => Frame::Proof,
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
}

/// Why a target dropped a connection during the handshake (logged, counted).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    /// The initiator's proof did not match the token.
    #[error("authentication failed: the initiator's proof does not match this target's token")]
    BadProof,
    /// The initiator found that the target's proof did not match its token.
    #[error("authentication failed: the initiator holds a different token")]
    PeerRejectedProof,
    /// The initiator refused for another reason.
    #[error("the initiator gave up: {0}")]
    PeerRejected(String),
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
    /// Malformed messages.
    #[error("protocol error: {0}")]
    Protocol(String),
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

/// What an initiator learns from ACCEPT.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Welcome {
    pub(crate) regions: Vec<RegionDesc>,
    pub(crate) endpoint: Vec<u8>,
}

pub(crate) fn write_frame<W: Write>(w: &mut W, ty: Frame, body: &[u8]) -> io::Result<()> {
    debug_assert!(body.len() <= MAX_BODY);
    let mut msg = Vec::with_capacity(8 + body.len());
    msg.push(ty as u8);
    msg.extend_from_slice(&[0; 3]);
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    w.write_all(&msg)?;
    w.flush()
}

/// Reads one frame. `Ok(Err(what))` is a malformed frame.
pub(crate) fn read_frame<R: Read>(r: &mut R) -> io::Result<Result<(Frame, Vec<u8>), String>> {
    let mut hdr = [0u8; 8];
    r.read_exact(&mut hdr)?;
    let Some(ty) = Frame::from_u8(hdr[0]) else {
        return Ok(Err(format!("unknown message type {}", hdr[0])));
    };
    let len = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
    if len > MAX_BODY {
        return Ok(Err(format!("message of {len} bytes exceeds the {MAX_BODY}-byte limit")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Ok((ty, body)))
}

fn encode_reject(code: RejectCode, reason: &str) -> Vec<u8> {
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
    let reason = String::from_utf8_lossy(body.get(4..).unwrap_or_default()).into_owned();
    (code, reason)
}

/// Sends REJECT; errors are ignored (the connection is being dropped anyway).
pub(crate) fn send_reject<W: Write>(w: &mut W, code: RejectCode, reason: &str) {
    let _ = write_frame(w, Frame::Reject, &encode_reject(code, reason));
}

fn encode_hello(kind: Kind, nonce: &[u8; 32]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HELLO_LEN);
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.push(kind.wire());
    b.push(0);
    b.extend_from_slice(nonce);
    b
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
    let mut regions = Vec::with_capacity(n);
    let mut at = 8;
    for _ in 0..n {
        regions.push(RegionDesc { addr: u64_at(at)?, rkey: u32_at(at + 8)?, len: u64_at(at + 16)? });
        at += REGION_LEN;
    }
    let m = u32_at(at)? as usize;
    at += 4;
    let endpoint = body.get(at..at + m).ok_or_else(short)?.to_vec();
    if at + m != body.len() {
        return Err(format!("ACCEPT has {} trailing bytes", body.len() - at - m));
    }
    Ok(Welcome { regions, endpoint })
}

/// The initiator's side, up to and including ACCEPT.
pub(crate) fn initiate<S: Read + Write>(
    s: &mut S,
    token: &Token,
    kind: Kind,
    addr: SocketAddr,
) -> Result<Welcome, ConnectError> {
    let io = |what| move |source| ConnectError::Io { addr, what, source };
    let protocol = |what: String| ConnectError::Protocol { addr, what };
    let mut nonce = [0u8; 32];
    random(&mut nonce).map_err(|e| ConnectError::Io { addr, what: "nonce", source: io::Error::other(e) })?;
    let hello = encode_hello(kind, &nonce);
    write_frame(s, Frame::Hello, &hello).map_err(io("sending HELLO"))?;

    let (ty, body) = read_frame(s).map_err(io("reading CHALLENGE"))?.map_err(protocol)?;
    let body = expect(ty, body, Frame::Challenge, addr)?;
    if body.len() != 64 {
        return Err(protocol(format!("CHALLENGE of {} bytes, expected 64", body.len())));
    }
    let (nonce_t, proof_t) = body.split_at(32);
    if token.mac(LABEL_TARGET, &[&hello, nonce_t]) != *proof_t {
        send_reject(s, RejectCode::Auth, "the target's proof does not match the initiator's token");
        return Err(ConnectError::AuthFailed { addr });
    }
    let proof_i = token.mac(LABEL_INITIATOR, &[&hello, nonce_t]);
    write_frame(s, Frame::Proof, proof_i.as_bytes()).map_err(io("sending PROOF"))?;

    let (ty, body) = read_frame(s).map_err(io("reading ACCEPT"))?.map_err(protocol)?;
    let body = expect(ty, body, Frame::Accept, addr)?;
    decode_accept(&body).map_err(protocol)
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

/// The target's side, up to a verified PROOF. The caller sends ACCEPT (or
/// a REJECT of its own). On error the REJECT, if any, has been sent.
pub(crate) fn respond<S: Read + Write>(s: &mut S, token: &Token, kind: Kind) -> Result<(), Refused> {
    let io = |what| move |source| Refused::Io { what, source };
    let (ty, hello) = read_frame(s).map_err(io("reading HELLO"))?.map_err(Refused::Protocol)?;
    if ty != Frame::Hello || hello.len() != HELLO_LEN || hello[..8] != MAGIC {
        // Not a remem initiator: say nothing it could use, and close.
        return Err(Refused::Protocol(format!("expected HELLO, got {ty:?} of {} bytes", hello.len())));
    }
    let version = u16::from_le_bytes([hello[8], hello[9]]);
    if version != VERSION {
        let e = Refused::Version(version);
        send_reject(s, RejectCode::Version, &e.to_string());
        return Err(e);
    }
    if Kind::from_wire(hello[10]) != Some(kind) {
        let asked = Kind::from_wire(hello[10]).map_or_else(|| format!("unknown ({})", hello[10]), |k| k.to_string());
        let e = Refused::Kind { asked, served: kind };
        send_reject(s, RejectCode::Kind, &e.to_string());
        return Err(e);
    }
    let mut nonce_t = [0u8; 32];
    random(&mut nonce_t).map_err(|e| Refused::Internal(e.to_string()))?;
    let proof_t = token.mac(LABEL_TARGET, &[&hello, &nonce_t]);
    let mut challenge = nonce_t.to_vec();
    challenge.extend_from_slice(proof_t.as_bytes());
    write_frame(s, Frame::Challenge, &challenge).map_err(io("sending CHALLENGE"))?;

    let (ty, body) = read_frame(s).map_err(io("reading PROOF"))?.map_err(Refused::Protocol)?;
    match ty {
        Frame::Proof if body.len() == 32 => {
            if token.mac(LABEL_INITIATOR, &[&hello, &nonce_t]) == body[..] {
                Ok(())
            } else {
                send_reject(s, RejectCode::Auth, "the initiator's proof does not match the target's token");
                Err(Refused::BadProof)
            }
        }
        Frame::Reject => match decode_reject(&body) {
            (code, _) if code == RejectCode::Auth as u8 => Err(Refused::PeerRejectedProof),
            (_, reason) => Err(Refused::PeerRejected(reason)),
        },
        _ => {
            let e = Refused::Protocol(format!("expected PROOF, got {ty:?} of {} bytes", body.len()));
            send_reject(s, RejectCode::Protocol, &e.to_string());
            Err(e)
        }
    }
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
    use std::net::{TcpListener, TcpStream};
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
        let mut many = body;
        many[0..4].copy_from_slice(&(MAX_REGIONS as u32 + 1).to_le_bytes());
        assert!(decode_accept(&many).unwrap_err().contains("regions"));
    }

    #[test]
    fn frames_are_capped_and_typed() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Frame::Ready, &[]).unwrap();
        assert_eq!(buf, [7, 0, 0, 0, 0, 0, 0, 0]);
        let (ty, body) = read_frame(&mut &buf[..]).unwrap().unwrap();
        assert_eq!((ty, body.len()), (Frame::Ready, 0));
        let huge = [1u8, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f];
        assert!(read_frame(&mut &huge[..]).unwrap().unwrap_err().contains("limit"));
        let unknown = [99u8, 0, 0, 0, 0, 0, 0, 0];
        assert!(read_frame(&mut &unknown[..]).unwrap().is_err());
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

    /// Runs the handshake over loopback with the two tokens and kinds.
    fn run(initiator: (&Token, Kind), target: (&Token, Kind)) -> (Result<Welcome, ConnectError>, Result<(), Refused>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        let (tt, tk) = (target.0.clone(), target.1);
        let server = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let r = respond(&mut s, &tt, tk);
            if r.is_ok() {
                write_frame(&mut s, Frame::Accept, &encode_accept(&[RegionDesc { addr: 4096, rkey: 9, len: 8 }], &[]))
                    .unwrap();
            }
            r
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
        assert_eq!(w.unwrap().regions, vec![RegionDesc { addr: 4096, rkey: 9, len: 8 }]);
        r.unwrap();
    }

    #[test]
    fn wrong_token_fails_on_both_sides() {
        let (t, u) = (Token::generate().unwrap(), Token::generate().unwrap());
        let (w, r) = run((&t, Kind::Tcp), (&u, Kind::Tcp));
        assert!(matches!(w, Err(ConnectError::AuthFailed { .. })), "{w:?}");
        assert!(matches!(r, Err(Refused::PeerRejectedProof)), "{r:?}");
    }

    #[test]
    fn wrong_kind_is_named() {
        let t = Token::generate().unwrap();
        let (w, r) = run((&t, Kind::Verbs), (&t, Kind::Tcp));
        let e = w.unwrap_err().to_string();
        assert!(e.contains("asked for the verbs transport, this target serves tcp"), "{e}");
        assert!(matches!(r, Err(Refused::Kind { .. })));
    }

    /// An initiator that does not know the token cannot pass by replaying
    /// the target's own proof.
    #[test]
    fn forged_proof_is_refused() {
        let t = Token::generate().unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        let tt = t.clone();
        let server = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            respond(&mut s, &tt, Kind::Tcp)
        });
        let mut s = TcpStream::connect(a).unwrap();
        write_frame(&mut s, Frame::Hello, &encode_hello(Kind::Tcp, &[0; 32])).unwrap();
        let (_, challenge) = read_frame(&mut s).unwrap().unwrap();
        write_frame(&mut s, Frame::Proof, &challenge[32..]).unwrap();
        let (ty, body) = read_frame(&mut s).unwrap().unwrap();
        assert_eq!((ty, body[0]), (Frame::Reject, RejectCode::Auth as u8));
        assert!(matches!(server.join().unwrap(), Err(Refused::BadProof)));
    }
}
