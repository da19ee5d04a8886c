//! The encrypted channel: a Noise handshake keyed by the token, then every
//! byte in both directions sealed with an AEAD. Pure (no socket of its own:
//! callers hand it the bytes they read and write the bytes it gives them).
//!
//! Protocol `Noise_NNpsk0_25519_AESGCM_SHA256`, the handshake through the
//! `snow` crate, the transport messages sealed in place with `ring`'s
//! AES-256-GCM under the handshake's Split() keys (as Noise specifies):
//! the pre-shared key is a keyed BLAKE3 of the token with its own label;
//! the prologue is the plaintext HELLO (magic, version, transport), so a
//! rewritten HELLO fails the handshake.
//!
//! ```text
//!  -> psk, e        (48 bytes: e, and an empty payload's tag under a key from the PSK;
//!                    the target checks it with one HKDF and one AEAD: no DH for a stranger)
//!  <- e, ee         (48 bytes: the target's e and its tag; the session keys now come from
//!                    the PSK and a fresh X25519 exchange)
//!  then: messages   len u16 LE (16..=65535), AES-256-GCM ciphertext and tag
//! ```
//!
//! After the handshake the connection is a byte stream in each direction,
//! cut into messages of at most [`MAX_MSG`] bytes; message boundaries carry
//! no meaning. Each direction numbers its messages (the Noise nonce), so a
//! message replayed, dropped, reordered or altered fails authentication and
//! ends the connection. A relay that passed one genuine handshake through
//! holds neither session key: it can neither read nor inject a byte.

use std::io::{self, Read, Write};

use ring::aead;
use zeroize::Zeroizing;

use super::handshake::{Frame, MAX_BODY};
use super::token::Token;

/// The Noise protocol name.
pub(crate) const PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// The longest Noise message.
pub(crate) const MAX_MSG: usize = 65535;
/// AEAD tag length.
pub(crate) const TAG: usize = 16;
/// The most plaintext one message carries.
pub(crate) const MAX_PLAIN: usize = MAX_MSG - TAG;
/// Bytes of the length before each message.
pub(crate) const LEN_PREFIX: usize = 2;
/// Length of either handshake message (an ephemeral key and an empty payload's tag).
pub(crate) const HANDSHAKE_MSG: usize = 32 + TAG;
/// Receive buffer: several whole messages.
const WIRE_CAP: usize = 512 << 10;
const PSK_LABEL: &[u8] = b"remem-transport-v2 noise psk";

/// Why the channel failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum ChannelError {
    /// A message failed authentication: altered, replayed, reordered, or
    /// sealed under another key.
    #[error("a message failed authentication (altered, replayed or reordered, or another key)")]
    Tampered,
    /// A message's length is impossible.
    #[error("a message of {0} bytes (a sealed message has 16 to 65535)")]
    BadLength(usize),
    /// The Noise library refused (setup, or a handshake message).
    #[error("noise: {0}")]
    Noise(#[from] snow::Error),
    /// A channel was asked of an unfinished handshake.
    #[error("the handshake is not finished")]
    Unfinished,
    /// The cipher refused a key (cannot happen with 32-byte keys).
    #[error("the cipher refused its key")]
    Key,
    /// 2^64 - 1 messages in one direction.
    #[error("the channel's nonces are exhausted")]
    Exhausted,
}

fn psk(token: &Token) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(*token.mac(PSK_LABEL, &[]).as_bytes())
}

fn params() -> Result<snow::params::NoiseParams, snow::Error> {
    PARAMS.parse()
}

/// The initiator's handshake state, bound to `prologue`.
pub(crate) fn initiator(token: &Token, prologue: &[u8]) -> Result<snow::HandshakeState, ChannelError> {
    let k = psk(token);
    Ok(snow::Builder::new(params()?).prologue(prologue)?.psk(0, &k)?.build_initiator()?)
}

/// The responder's handshake state, bound to `prologue`.
pub(crate) fn responder(token: &Token, prologue: &[u8]) -> Result<snow::HandshakeState, ChannelError> {
    let k = psk(token);
    Ok(snow::Builder::new(params()?).prologue(prologue)?.psk(0, &k)?.build_responder()?)
}

/// One direction's Noise cipher state: a key and the next nonce.
struct CipherState {
    key: aead::LessSafeKey,
    n: u64,
}

impl CipherState {
    fn new(raw: &[u8; 32]) -> Result<CipherState, ChannelError> {
        let key = aead::UnboundKey::new(&aead::AES_256_GCM, raw).map_err(|_| ChannelError::Key)?;
        Ok(CipherState { key: aead::LessSafeKey::new(key), n: 0 })
    }

    /// The next nonce (Noise: 32 zero bits, then the counter big-endian;
    /// 2^64 - 1 is reserved).
    fn next(&mut self) -> Result<aead::Nonce, ChannelError> {
        if self.n == u64::MAX {
            return Err(ChannelError::Exhausted);
        }
        let mut b = [0u8; 12];
        b[4..].copy_from_slice(&self.n.to_be_bytes());
        self.n += 1;
        Ok(aead::Nonce::assume_unique_for_key(b))
    }
}

/// One side of an established channel.
pub(crate) struct Channel {
    tx: CipherState,
    rx: CipherState,
    /// Received wire bytes: `wire[wire_at..wire_end]` are not yet opened.
    /// Allocated once; grows only when fed more than it holds.
    wire: Vec<u8>,
    wire_at: usize,
    wire_end: usize,
    /// Opened bytes not yet consumed by `read_frame`.
    pending: Vec<u8>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").field("buffered", &(self.wire_end - self.wire_at)).finish_non_exhaustive()
    }
}

impl Channel {
    /// From a finished handshake: the two keys of its Split(), each
    /// direction numbering its own messages from 0, as Noise's
    /// `CipherState` does. (Sealing and opening are done here, in place,
    /// rather than by snow's `TransportState`, which copies every message
    /// once more; `sealed_messages_are_noise_transport_messages` checks that
    /// the bytes are the same.)
    pub(crate) fn new(mut hs: snow::HandshakeState) -> Result<Channel, ChannelError> {
        if !hs.is_handshake_finished() {
            return Err(ChannelError::Unfinished);
        }
        let (k1, k2) = hs.dangerously_get_raw_split();
        let (k1, k2) = (Zeroizing::new(k1), Zeroizing::new(k2));
        let (tx, rx) = if hs.is_initiator() { (&k1, &k2) } else { (&k2, &k1) };
        Ok(Channel {
            tx: CipherState::new(tx)?,
            rx: CipherState::new(rx)?,
            wire: vec![0u8; WIRE_CAP],
            wire_at: 0,
            wire_end: 0,
            pending: Vec::new(),
        })
    }

    /// Seals `plain` as one or more messages appended to `out`.
    pub(crate) fn seal(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), ChannelError> {
        for piece in plain.chunks(MAX_PLAIN) {
            let start = Channel::begin(out);
            out.extend_from_slice(piece);
            self.finish(out, start)?;
        }
        Ok(())
    }

    /// Starts a message at the end of `out`: the caller appends up to
    /// [`MAX_PLAIN`] bytes of plaintext, then calls [`Channel::finish`] with
    /// the returned start. (The plaintext is sealed where it lies: no copy.)
    pub(crate) fn begin(out: &mut Vec<u8>) -> usize {
        out.extend_from_slice(&[0; LEN_PREFIX]);
        out.len()
    }

    /// Seals `out[start..]` in place, appends its tag and fills in its length.
    pub(crate) fn finish(&mut self, out: &mut Vec<u8>, start: usize) -> Result<(), ChannelError> {
        let plain_len = out.len() - start;
        if plain_len > MAX_PLAIN || start < LEN_PREFIX {
            return Err(ChannelError::BadLength(plain_len + TAG));
        }
        let nonce = self.tx.next()?;
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(nonce, aead::Aad::empty(), &mut out[start..])
            .map_err(|_| ChannelError::Key)?;
        out.extend_from_slice(tag.as_ref());
        out[start - LEN_PREFIX..start].copy_from_slice(&((plain_len + TAG) as u16).to_le_bytes());
        Ok(())
    }

    /// Makes room for at least `want` more bytes at the end of the wire buffer.
    fn room(&mut self, want: usize) {
        if self.wire_at == self.wire_end {
            (self.wire_at, self.wire_end) = (0, 0);
        }
        if self.wire.len() - self.wire_end < want && self.wire_at > 0 {
            self.wire.copy_within(self.wire_at..self.wire_end, 0);
            (self.wire_at, self.wire_end) = (0, self.wire_end - self.wire_at);
        }
        if self.wire.len() - self.wire_end < want {
            self.wire.resize(self.wire_end + want, 0);
        }
    }

    /// Reads once from `r` into the wire buffer; 0 at end of stream.
    pub(crate) fn fill_from(&mut self, r: &mut impl Read) -> io::Result<usize> {
        self.room(LEN_PREFIX + MAX_MSG);
        let n = r.read(&mut self.wire[self.wire_end..])?;
        self.wire_end += n;
        Ok(n)
    }

    /// Appends bytes received by other means (tests, fuzzing).
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        self.room(bytes.len());
        self.wire[self.wire_end..self.wire_end + bytes.len()].copy_from_slice(bytes);
        self.wire_end += bytes.len();
    }

    /// Opens the next whole message of the wire buffer: its plaintext, or
    /// `None` while it is incomplete.
    pub(crate) fn open_next(&mut self) -> Result<Option<&[u8]>, ChannelError> {
        let wire = &self.wire[self.wire_at..self.wire_end];
        let Some(prefix) = wire.get(..LEN_PREFIX) else { return Ok(None) };
        let len = usize::from(u16::from_le_bytes([prefix[0], prefix[1]]));
        if len < TAG {
            return Err(ChannelError::BadLength(len));
        }
        if wire.len() < LEN_PREFIX + len {
            return Ok(None);
        }
        let at = self.wire_at + LEN_PREFIX;
        self.wire_at += LEN_PREFIX + len;
        let nonce = self.rx.next()?;
        let msg = &mut self.wire[at..at + len];
        // A message that fails leaves the channel dead: its nonce is spent.
        let plain = self.rx.key.open_in_place(nonce, aead::Aad::empty(), msg).map_err(|_| ChannelError::Tampered)?;
        Ok(Some(plain))
    }

    /// Sends one control frame (type, 3 zero bytes, body length u32, body), sealed.
    pub(crate) fn write_frame(&mut self, w: &mut impl Write, ty: Frame, body: &[u8]) -> io::Result<()> {
        let mut plain = Vec::with_capacity(8 + body.len());
        plain.push(ty as u8);
        plain.extend_from_slice(&[0; 3]);
        plain.extend_from_slice(&(body.len() as u32).to_le_bytes());
        plain.extend_from_slice(body);
        let mut out = Vec::with_capacity(plain.len() + 64);
        self.seal(&plain, &mut out).map_err(io::Error::other)?;
        w.write_all(&out)?;
        w.flush()
    }

    /// Reads one sealed control frame. `Ok(Err(what))`: a malformed frame or
    /// a message that failed authentication (the connection is then dead).
    pub(crate) fn read_frame(&mut self, r: &mut impl Read) -> io::Result<Result<(Frame, Vec<u8>), String>> {
        loop {
            if let Some(hdr) = self.pending.get(..8) {
                let Some(ty) = Frame::from_u8(hdr[0]) else {
                    return Ok(Err(format!("unknown message type {}", hdr[0])));
                };
                let len = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
                if len > MAX_BODY {
                    return Ok(Err(format!("message of {len} bytes exceeds the {MAX_BODY}-byte limit")));
                }
                if self.pending.len() >= 8 + len {
                    let body = self.pending[8..8 + len].to_vec();
                    self.pending.drain(..8 + len);
                    return Ok(Ok((ty, body)));
                }
            }
            match self.open_next() {
                Ok(Some(p)) => {
                    let p = p.to_vec();
                    self.pending.extend_from_slice(&p);
                    continue;
                }
                Ok(None) => {}
                Err(e) => return Ok(Err(e.to_string())),
            }
            if self.fill_from(r)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Opened bytes that `read_frame` has not consumed (the start of the data phase).
    pub(crate) fn take_pending(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn pair(token: &Token) -> (Channel, Channel) {
        let mut i = initiator(token, b"p").unwrap();
        let mut r = responder(token, b"p").unwrap();
        let mut m1 = [0u8; MAX_MSG];
        let mut m2 = [0u8; MAX_MSG];
        let n = i.write_message(&[], &mut m1).unwrap();
        assert_eq!(n, HANDSHAKE_MSG);
        r.read_message(&m1[..n], &mut []).unwrap();
        let n = r.write_message(&[], &mut m2).unwrap();
        assert_eq!(n, HANDSHAKE_MSG);
        i.read_message(&m2[..n], &mut []).unwrap();
        (Channel::new(i).unwrap(), Channel::new(r).unwrap())
    }

    /// Our messages are Noise transport messages: snow's own transport
    /// state, built from the same handshake, opens them and seals the same bytes.
    #[test]
    fn sealed_messages_are_noise_transport_messages() {
        let t = Token::generate().unwrap();
        let mut i = initiator(&t, b"p").unwrap();
        let mut r = responder(&t, b"p").unwrap();
        let (mut m1, mut m2) = ([0u8; HANDSHAKE_MSG], [0u8; HANDSHAKE_MSG]);
        i.write_message(&[], &mut m1).unwrap();
        r.read_message(&m1, &mut []).unwrap();
        r.write_message(&[], &mut m2).unwrap();
        i.read_message(&m2, &mut []).unwrap();
        let (mut ours, mut snow_r) = (Channel::new(i).unwrap(), r.into_transport_mode().unwrap());
        for len in [1usize, 100, MAX_PLAIN] {
            let plain: Vec<u8> = (0..len).map(|k| k as u8).collect();
            let mut wire = Vec::new();
            ours.seal(&plain, &mut wire).unwrap();
            let mut got = vec![0u8; MAX_MSG];
            let n = snow_r.read_message(&wire[LEN_PREFIX..], &mut got).unwrap();
            assert_eq!(&got[..n], &plain[..]);
            let mut back = vec![0u8; MAX_MSG];
            let n = snow_r.write_message(&plain, &mut back).unwrap();
            let mut framed = ((n as u16).to_le_bytes()).to_vec();
            framed.extend_from_slice(&back[..n]);
            ours.feed(&framed);
            assert_eq!(ours.open_next().unwrap().unwrap(), &plain[..]);
        }
    }

    #[test]
    fn params_parse() {
        assert_eq!(params().unwrap().name, PARAMS);
    }

    #[test]
    fn sealed_bytes_round_trip_in_order_only() {
        let t = Token::generate().unwrap();
        let (mut a, mut b) = pair(&t);
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut wire = Vec::new();
        a.seal(&big, &mut wire).unwrap();
        assert_eq!(wire.len(), big.len() + 4 * (LEN_PREFIX + TAG), "4 messages");
        assert!(!wire.windows(64).any(|w| big.windows(64).take(1000).any(|p| p == w)), "no plaintext on the wire");
        b.feed(&wire[..100]);
        assert!(b.open_next().unwrap().is_none());
        b.feed(&wire[100..]);
        let mut got = Vec::new();
        while let Some(p) = b.open_next().unwrap() {
            got.extend_from_slice(p);
        }
        assert_eq!(got, big);

        // A replayed message fails, and so does one sealed under another key.
        let mut one = Vec::new();
        a.seal(b"hello", &mut one).unwrap();
        let (mut x, mut y) = pair(&t);
        let _ = &mut x;
        y.feed(&one);
        assert!(matches!(y.open_next(), Err(ChannelError::Tampered)));
        b.feed(&wire[..LEN_PREFIX + MAX_MSG]);
        assert!(matches!(b.open_next(), Err(ChannelError::Tampered)), "replay");
    }

    #[test]
    fn altered_or_short_messages_fail() {
        let t = Token::generate().unwrap();
        let (mut a, mut b) = pair(&t);
        let mut wire = Vec::new();
        a.seal(b"some bytes", &mut wire).unwrap();
        wire[5] ^= 1;
        b.feed(&wire);
        assert!(matches!(b.open_next(), Err(ChannelError::Tampered)));
        let (_, mut c) = pair(&t);
        c.feed(&[3, 0, 1, 2, 3]);
        assert!(matches!(c.open_next(), Err(ChannelError::BadLength(3))));
    }

    #[test]
    fn wrong_psk_or_prologue_fails_the_first_message() {
        let (t, u) = (Token::generate().unwrap(), Token::generate().unwrap());
        let mut m1 = [0u8; MAX_MSG];
        let n = initiator(&t, b"p").unwrap().write_message(&[], &mut m1).unwrap();
        assert!(responder(&u, b"p").unwrap().read_message(&m1[..n], &mut []).is_err());
        assert!(responder(&t, b"q").unwrap().read_message(&m1[..n], &mut []).is_err());
        assert!(responder(&t, b"p").unwrap().read_message(&m1[..n], &mut []).is_ok());
    }

    #[test]
    fn frames_cross_message_boundaries() {
        let t = Token::generate().unwrap();
        let (mut a, mut b) = pair(&t);
        let mut wire = Vec::new();
        let body = vec![9u8; 100_000];
        a.write_frame(&mut wire, Frame::Accept, &body).unwrap();
        a.write_frame(&mut wire, Frame::Ready, &[]).unwrap();
        let mut r = &wire[..];
        assert_eq!(b.read_frame(&mut r).unwrap().unwrap(), (Frame::Accept, body));
        assert_eq!(b.read_frame(&mut r).unwrap().unwrap(), (Frame::Ready, vec![]));
        assert!(b.read_frame(&mut r).is_err(), "end of stream");
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// `cargo test -p remem-recovery --release -- --ignored channel_speed --nocapture`
    #[test]
    #[ignore = "a measurement"]
    fn channel_speed() {
        let t = Token::generate().unwrap();
        let (mut a, mut b) = tests::pair(&t);
        let data = vec![7u8; MAX_PLAIN];
        let mut wire = Vec::with_capacity(2 * MAX_MSG);
        let n = 4096;
        let start = std::time::Instant::now();
        let mut got = 0;
        for _ in 0..n {
            wire.clear();
            a.seal(&data, &mut wire).unwrap();
            b.feed(&wire);
            got += b.open_next().unwrap().unwrap().len();
        }
        let s = start.elapsed().as_secs_f64();
        let c = std::time::Instant::now();
        let mut dst = vec![0u8; MAX_PLAIN];
        for _ in 0..n {
            dst.copy_from_slice(&data);
        }
        let cs = c.elapsed().as_secs_f64();
        println!("seal+open {:.2} GB/s; memcpy {:.2} GB/s ({got})", got as f64 / s / 1e9, got as f64 / cs / 1e9);
    }
}
