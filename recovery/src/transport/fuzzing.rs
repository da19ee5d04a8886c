//! Entry points of the transport's fuzz targets (`fuzz/`), also replayed
//! over their committed corpora by the ordinary tests
//! (`recovery/tests/fuzz_corpus.rs`). Each takes arbitrary bytes as what a
//! peer sent and must end in a clean refusal or success, never a panic, a
//! hang or an unbounded allocation. Not a stable API.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use super::channel::{self, Channel, HANDSHAKE_MSG};
use super::handshake::{self, MAX_REMOTE_END};
use super::tcp::initiator::{Pending, Receiver};
use super::tcp::target;
use super::token::Token;
use super::{BufId, Kind, SharedBytes, SourceMemory};

/// The token every target and initiator of the fuzz targets holds.
fn token() -> Token {
    Token::from_hex(&"5a".repeat(32), "fuzzing").unwrap_or_else(|_| unreachable!("64 hex digits"))
}

/// A stream that reads the fuzzer's bytes and swallows what is written.
struct Peer<'a> {
    input: &'a [u8],
    written: usize,
}

impl Read for Peer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Peer<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1))
}

/// The target's handshake on bytes from an initiator: HELLO, the first
/// Noise message, CONFIRM. Also runs the gate's incremental reading (the
/// bytes in every split the first byte chooses).
pub fn target_handshake(data: &[u8]) {
    let kind = if data.first().is_some_and(|b| b & 1 == 1) { Kind::Verbs } else { Kind::Tcp };
    let _ = handshake::respond(&mut Peer { input: data, written: 0 }, &token(), kind);
    let step = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let mut have = 0;
    loop {
        match handshake::preauth_need(&data[..have], kind) {
            Ok(need) if need == have => {
                let _ = handshake::open_preauth(&data[..have], &token(), kind);
                break;
            }
            Ok(need) if need <= data.len() => {
                assert!(need > have && need - have <= handshake::MAX_PREAUTH_BODY + 8);
                have = (have + step).min(need);
            }
            _ => break,
        }
    }
}

/// The initiator's handshake on bytes from a target: its NOISE (or
/// REJECT), then sealed frames. A valid NOISE cannot be forged, so the
/// sealed part is reached through [`sealed_frames`].
pub fn initiator_handshake(data: &[u8]) {
    let kind = if data.first().is_some_and(|b| b & 1 == 1) { Kind::Verbs } else { Kind::Tcp };
    let _ = handshake::initiate(&mut Peer { input: data, written: 0 }, &token(), kind, addr());
}

/// ACCEPT bodies: whatever decodes holds only consistent regions.
pub fn accept(data: &[u8]) {
    if let Ok(w) = handshake::decode_accept(data) {
        let mut keys = std::collections::HashSet::new();
        for r in &w.regions {
            assert!(r.len > 0 && r.addr.checked_add(r.len).is_some_and(|e| e <= MAX_REMOTE_END));
            assert!(keys.insert(r.rkey));
        }
    }
}

/// A pair of channels from one real handshake (the fuzzer cannot forge
/// one): sealed traffic the fuzzer's bytes become the plaintext of.
fn pair() -> Option<(Channel, Channel)> {
    let t = token();
    let hello = handshake::encode_hello(Kind::Tcp);
    let mut i = channel::initiator(&t, &hello).ok()?;
    let mut r = channel::responder(&t, &hello).ok()?;
    let (mut m1, mut m2) = ([0u8; HANDSHAKE_MSG], [0u8; HANDSHAKE_MSG]);
    i.write_message(&[], &mut m1).ok()?;
    r.read_message(&m1, &mut []).ok()?;
    r.write_message(&[], &mut m2).ok()?;
    i.read_message(&m2, &mut []).ok()?;
    Some((Channel::new(i).ok()?, Channel::new(r).ok()?))
}

/// Sealed control frames: the bytes, sealed by a genuine peer in pieces,
/// read back as frames; and the same bytes as raw wire (forged messages).
pub fn sealed_frames(data: &[u8]) {
    let Some((mut a, mut b)) = pair() else { return };
    let mut wire = Vec::new();
    let cut = usize::from(data.first().copied().unwrap_or(0)) * 7 + 1;
    for piece in data.chunks(cut) {
        if a.seal(piece, &mut wire).is_err() {
            return;
        }
    }
    let mut r = &wire[..];
    while let Ok(Ok((ty, body))) = b.read_frame(&mut r) {
        if ty == handshake::Frame::Accept {
            accept(&body);
        }
    }
    let Some((_, mut c)) = pair() else { return };
    c.feed(data);
    while let Ok(Some(_)) = c.open_next() {}
}

/// Response bytes (already opened) on the initiator: the first bytes
/// choose the reads on the wire, the rest is what the target answered.
pub fn responses(data: &[u8]) {
    let (head, body) = data.split_at(data.len().min(8));
    let mut rx = Receiver::default();
    let mut bufs: Vec<Box<[u8]>> = vec![vec![0u8; 1 << 16].into_boxed_slice(); 2];
    for (k, &b) in head.iter().enumerate() {
        let len = usize::from(b) * 64 + 1;
        let buf = k % 2;
        let offset = (k * 4096) % ((1 << 16) - len);
        rx.pending.push_back(Pending { wr_id: k as u64, seq: k as u64, buf: BufId(buf as u32), offset, len });
    }
    let step = usize::from(head.first().copied().unwrap_or(0)) + 1;
    for piece in body.chunks(step) {
        if rx.feed(piece, &mut bufs).is_err() {
            break;
        }
    }
}

/// Request bytes (already opened) on the target, answered from two
/// registered regions into a sink.
pub fn requests(data: &[u8]) {
    static REGIONS: OnceLock<Vec<Arc<dyn SourceMemory>>> = OnceLock::new();
    let regions = REGIONS.get_or_init(|| {
        vec![Arc::new(SharedBytes::from(vec![7u8; 3 * 4096])) as Arc<dyn SourceMemory>, Arc::new(vec![9u8; 100])]
    });
    let Some((a, _)) = pair() else { return };
    let table: HashMap<u32, Arc<dyn SourceMemory>> =
        regions.iter().enumerate().map(|(k, m)| (k as u32 + 1, m.clone())).collect();
    target::answer_for_fuzzing(table, a, data);
}

fn frame(ty: handshake::Frame, body: &[u8]) -> Vec<u8> {
    let mut v = vec![ty as u8, 0, 0, 0];
    v.extend_from_slice(&(body.len() as u32).to_le_bytes());
    v.extend_from_slice(body);
    v
}

/// Starting inputs for each target: (target, bytes). Written to the
/// corpus directories by `recovery/tests/fuzz_corpus.rs` (`write_seeds`).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use super::wire::{Request, Response, WireStatus, OP_READ};
    use handshake::Frame;
    let mut out = Vec::new();
    let hello = handshake::encode_hello(Kind::Tcp);
    if let Ok(mut hs) = channel::initiator(&token(), &hello) {
        let mut m1 = [0u8; HANDSHAKE_MSG];
        if hs.write_message(&[], &mut m1).is_ok() {
            let mut v = frame(Frame::Hello, &hello);
            v.extend_from_slice(&frame(Frame::Noise, &m1));
            out.push(("transport_target_handshake", v.clone()));
            v.extend_from_slice(&[19, 0]);
            v.extend_from_slice(&[0u8; 19]);
            out.push(("transport_target_handshake", v));
        }
    }
    let mut v1 = frame(Frame::Hello, &hello);
    v1[16] = 1;
    out.push(("transport_target_handshake", v1));
    out.push(("transport_target_handshake", b"GET / HTTP/1.0\r\n\r\n".to_vec()));
    out.push(("transport_initiator_handshake", frame(Frame::Noise, &[3u8; HANDSHAKE_MSG])));
    out.push(("transport_initiator_handshake", frame(Frame::Reject, b"\x01\0\0\0wrong token")));
    out.push(("transport_initiator_handshake", frame(Frame::Reject, b"\x06\0\0\0too many connections")));
    let regions = [
        super::RegionDesc { addr: 0x7f00_0000_0000, rkey: 1, len: 1 << 20 },
        super::RegionDesc { addr: 0x7f00_1000_0000, rkey: 2, len: 16 },
    ];
    let accept = handshake::encode_accept(&regions, &[]);
    out.push(("transport_sealed_frames", frame(Frame::Accept, &accept)));
    out.push(("transport_sealed_frames", frame(Frame::Reject, b"\x04\0\0\0busy")));
    out.push(("transport_sealed_frames", frame(Frame::Ready, &[])));
    let mut resp = vec![64u8, 0, 1, 2, 3, 4, 5, 6];
    for (k, &b) in resp.clone().iter().enumerate() {
        let len = usize::from(b) * 64 + 1;
        let data = vec![k as u8; len];
        resp.extend_from_slice(&Response { status: WireStatus::Ok, len: len as u32, seq: k as u64 }.encode());
        resp.extend_from_slice(&data);
        resp.extend_from_slice(&crc32fast::hash(&data).to_le_bytes());
    }
    out.push(("transport_responses", resp));
    out.push(("transport_responses", {
        let mut v = vec![1u8; 8];
        v.extend_from_slice(&Response { status: WireStatus::Access, len: 0, seq: 0 }.encode());
        v
    }));
    let reqs: Vec<u8> = (0..6u64)
        .flat_map(|k| Request { op: OP_READ, rkey: 1 + (k % 2) as u32, addr: k * 10, len: 50, seq: k }.encode())
        .chain(Request { op: 2, rkey: 1, addr: 0, len: 8, seq: 6 }.encode())
        .collect();
    out.push(("transport_requests", reqs));
    out
}
