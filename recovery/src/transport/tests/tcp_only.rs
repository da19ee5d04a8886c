//! What only the TCP transport can show, and the attacks on it: a relay
//! that keeps an authenticated connection, a rewritten ACCEPT, peers that
//! trickle their handshake, a reader that never reads.

use super::*;
use crate::transport::channel::Channel;
use crate::transport::handshake::{self, Frame, Welcome};
use crate::transport::tcp::TcpTarget;
use crate::transport::wire::{Request, Response, WireStatus, CRC_LEN, OP_READ, REQ_LEN, RESP_LEN};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;

/// A raw authenticated session: what a token holder can do by hand.
fn raw_session(addr: SocketAddr, token: &Token) -> (TcpStream, Channel, Welcome) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let (w, ch) = handshake::initiate(&mut s, token, Kind::Tcp, addr).unwrap();
    (s, ch, w)
}

fn send_requests(s: &mut TcpStream, ch: &mut Channel, reqs: &[Request]) {
    let plain: Vec<u8> = reqs.iter().flat_map(|r| r.encode()).collect();
    let mut wire = Vec::new();
    ch.seal(&plain, &mut wire).unwrap();
    s.write_all(&wire).unwrap();
}

/// Reads and opens until `n` plaintext bytes arrived, or the stream ends.
fn receive(s: &mut TcpStream, ch: &mut Channel, n: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < n {
        while let Some(p) = ch.open_next().unwrap() {
            got.extend_from_slice(p);
        }
        if got.len() >= n || ch.fill_from(s).unwrap_or(0) == 0 {
            break;
        }
    }
    got
}

#[test]
fn listens_on_loopback_by_default() {
    let o = ServeOptions::new(Token::generate().unwrap());
    assert!(o.listen.ip().is_loopback());
    assert_eq!(o.listen.port(), DEFAULT_PORT);
}

/// A raw client that passed the handshake asks for an operation other
/// than READ: refused, and the connection enters the error state.
#[test]
fn there_is_no_remote_write() {
    let f = Fixture::new(Kind::Tcp);
    let (mut s, mut ch, w) = raw_session(f.target.local_addr(), &f.token);
    assert_eq!(w.regions, [f.region]);
    let write = Request { op: 2, rkey: f.region.rkey, addr: f.region.addr, len: 8, seq: 0 };
    let good = Request { op: OP_READ, seq: 1, ..write };
    send_requests(&mut s, &mut ch, &[write, good]);
    let got = receive(&mut s, &mut ch, usize::MAX);
    assert_eq!(got, Response { status: WireStatus::BadRequest, len: 0, seq: 0 }.encode(), "nothing after the error");
    assert_eq!(f.mem.read(0, REGION).unwrap(), pattern(REGION, 1), "the source is untouched");
}

#[test]
fn silent_and_foreign_peers_are_dropped() {
    let token = Token::generate().unwrap();
    let opts = ServeOptions { handshake_timeout: Duration::from_millis(100), ..ServeOptions::new(token) };
    let target = serve(Kind::Tcp, opts.listen(loopback())).unwrap();
    let silent = TcpStream::connect(target.local_addr()).unwrap();
    let mut http = TcpStream::connect(target.local_addr()).unwrap();
    http.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(eventually(&*target, |s| s.rejected == 2).rejected, 2);
    drop(silent);
}

#[test]
fn a_verbs_initiator_is_told_this_is_tcp() {
    let f = Fixture::new(Kind::Tcp);
    let mut s = TcpStream::connect(f.target.local_addr()).unwrap();
    let e = handshake::initiate(&mut s, &f.token, Kind::Verbs, f.target.local_addr()).unwrap_err();
    assert!(e.to_string().contains("asked for the verbs transport, this target serves tcp"), "{e}");
}

#[test]
fn bind_errors_name_the_address() {
    let f = Fixture::new(Kind::Tcp);
    let e = TcpTarget::serve(ServeOptions::new(f.token.clone()).listen(f.target.local_addr())).unwrap_err();
    assert!(e.to_string().starts_with(&format!("cannot listen on {}", f.target.local_addr())), "{e}");
}

/// A scripted target: authenticates, announces `regions`, reads `n`
/// requests and answers them with `answer` (plaintext), sealed in messages
/// of the given sizes with pauses, so that the initiator sees headers and
/// data split anywhere; then hangs up, or waits for the initiator to.
fn scripted_with(
    regions: Vec<RegionDesc>,
    n: usize,
    pieces: &'static [usize],
    hang_up: bool,
    answer: impl FnOnce(&[Request]) -> Vec<u8> + Send + 'static,
) -> (Result<Box<dyn Initiator>, ConnectError>, thread::JoinHandle<()>) {
    let token = Token::generate().unwrap();
    let l = TcpListener::bind(loopback()).unwrap();
    let addr = l.local_addr().unwrap();
    let t = token.clone();
    let server = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut ch = handshake::respond(&mut s, &t, Kind::Tcp).unwrap();
        ch.write_frame(&mut s, Frame::Accept, &handshake::encode_accept(&regions, &[])).unwrap();
        let raw = receive(&mut s, &mut ch, n * REQ_LEN);
        if raw.len() < n * REQ_LEN {
            return; // the initiator refused the ACCEPT
        }
        let reqs: Vec<Request> = raw.chunks_exact(REQ_LEN).map(|c| Request::decode(c.try_into().unwrap())).collect();
        let bytes = answer(&reqs);
        let mut at = 0;
        for &k in pieces.iter().cycle() {
            if at == bytes.len() {
                break;
            }
            let end = (at + k).min(bytes.len());
            let mut wire = Vec::new();
            ch.seal(&bytes[at..end], &mut wire).unwrap();
            s.write_all(&wire).unwrap();
            at = end;
            thread::sleep(Duration::from_micros(300));
        }
        if hang_up {
            return;
        }
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    (connect(Kind::Tcp, &ConnectOptions::new(addr, token).depth(64)), server)
}

fn scripted(
    n: usize,
    pieces: &'static [usize],
    hang_up: bool,
    answer: impl FnOnce(&[Request]) -> Vec<u8> + Send + 'static,
) -> (Box<dyn Initiator>, RegionDesc, thread::JoinHandle<()>) {
    let region = RegionDesc { addr: 1 << 20, rkey: 7, len: 1 << 20 };
    let (ini, server) = scripted_with(vec![region], n, pieces, hang_up, answer);
    (ini.unwrap(), region, server)
}

/// The bytes a region of the scripted target holds at `addr`.
fn remote_bytes(addr: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| ((addr + i) * 7 % 251) as u8).collect()
}

fn ok_responses(reqs: &[Request]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in reqs {
        let data = remote_bytes(r.addr, r.len as usize);
        out.extend_from_slice(&Response { status: WireStatus::Ok, len: r.len, seq: r.seq }.encode());
        out.extend_from_slice(&data);
        out.extend_from_slice(&crc32fast::hash(&data).to_le_bytes());
    }
    out
}

#[test]
fn responses_split_anywhere_are_reassembled() {
    const LENS: [u32; 12] = [1, 15, 16, 17, 100, 4096, 4097, 3, 8191, 2, 33, 5000];
    let (mut ini, region, server) = scripted(LENS.len(), &[1, 3, 7, 16, 17, 5, 4096, 31, 2, 9000], false, ok_responses);
    let buf = ini.alloc_buf(64 << 10).unwrap();
    let mut at = 0;
    let reads: Vec<ReadRequest> = LENS
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let r = read(i as u64, region, (i * 1000) as u64, len, buf, at);
            at += len as usize + 3;
            r
        })
        .collect();
    let c = run(&mut *ini, &reads);
    assert!(c.iter().all(|c| c.status == Status::Success), "{c:?}");
    let got = ini.buf(buf).unwrap();
    for (r, c) in reads.iter().zip(&c) {
        let want = remote_bytes(region.addr + r.offset, r.len as usize);
        assert_eq!(got[r.buf_offset..r.buf_offset + r.len as usize], want[..], "read {}", r.wr_id);
        assert_eq!(c.crc, Some(crc32fast::hash(&want)));
    }
    drop(ini);
    server.join().unwrap();
}

/// Reads into overlapping local ranges land in order: the last one's bytes stay.
#[test]
fn overlapping_destinations_land_in_order() {
    let (mut ini, region, server) = scripted(6, &[4096 + 16 + 5, 11, 70_000], false, ok_responses);
    let buf = ini.alloc_buf(3 * PAGE).unwrap();
    let reads: Vec<ReadRequest> =
        (0..6).map(|i| read(i, region, i * PAGE as u64, PAGE as u32, buf, (i as usize % 3) * 100)).collect();
    assert!(run(&mut *ini, &reads).iter().all(|c| c.status == Status::Success));
    let got = ini.buf(buf).unwrap();
    assert_eq!(got[200..200 + PAGE], remote_bytes(region.addr + 5 * PAGE as u64, PAGE)[..]);
    assert_eq!(got[..100], remote_bytes(region.addr + 3 * PAGE as u64, 100)[..]);
    drop(ini);
    server.join().unwrap();
}

#[test]
fn a_response_out_of_order_breaks_the_connection() {
    let swapped = |reqs: &[Request]| {
        let mut v = reqs.to_vec();
        v.swap(0, 1);
        ok_responses(&v)
    };
    let (mut ini, region, server) = scripted(3, &[1 << 20], false, swapped);
    let buf = ini.alloc_buf(3 * 64).unwrap();
    let reads: Vec<ReadRequest> = (0..3).map(|i| read(i, region, 0, 64, buf, i as usize * 64)).collect();
    let c = run(&mut *ini, &reads);
    assert_eq!(statuses(&c), [(0, Status::ConnectionLost), (1, Status::Flushed), (2, Status::Flushed)]);
    drop(ini);
    server.join().unwrap();
}

#[test]
fn a_target_that_stops_mid_response_loses_the_read() {
    let cut = |reqs: &[Request]| {
        let mut v = ok_responses(reqs);
        v.truncate(RESP_LEN + 64 + CRC_LEN + RESP_LEN + 10);
        v
    };
    let (mut ini, region, server) = scripted(2, &[1 << 20], true, cut);
    let buf = ini.alloc_buf(128).unwrap();
    let c = run(&mut *ini, &[read(1, region, 0, 64, buf, 0), read(2, region, 64, 64, buf, 64)]);
    assert_eq!(statuses(&c), [(1, Status::Success), (2, Status::ConnectionLost)]);
    server.join().unwrap();
}

#[test]
fn kinds_parse_and_print() {
    assert_eq!("tcp".parse::<Kind>(), Ok(Kind::Tcp));
    assert_eq!("verbs".parse::<Kind>(), Ok(Kind::Verbs));
    assert!("udp".parse::<Kind>().is_err());
    assert_eq!(Kind::Verbs.to_string(), "verbs");
}

/// Recorded traffic of a relay, per direction.
#[derive(Default)]
struct Taps {
    to_target: Vec<u8>,
    to_initiator: Vec<u8>,
}

/// A relay between an initiator and `target`: forwards bytes both ways,
/// recording them and letting `alter` rewrite bytes heading to the
/// initiator (given their offset in that stream), until `cut` is set; then
/// it drops the initiator's side and hands back the target's socket.
fn relay(
    target: SocketAddr,
    cut: Arc<AtomicBool>,
    alter: impl Fn(usize, &mut [u8]) + Send + 'static,
) -> (SocketAddr, thread::JoinHandle<(TcpStream, Taps)>) {
    let l = TcpListener::bind(loopback()).unwrap();
    let addr = l.local_addr().unwrap();
    let h = thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        let t = TcpStream::connect(target).unwrap();
        let tick = Some(Duration::from_millis(20));
        for s in [&c, &t] {
            s.set_read_timeout(tick).unwrap();
            s.set_nodelay(true).unwrap();
        }
        let mut taps = Taps::default();
        let mut buf = vec![0u8; 1 << 16];
        let (mut c_open, mut t_open) = (true, true);
        while !cut.load(Ordering::SeqCst) && (c_open || t_open) {
            for (from, to, up) in [(&c, &t, true), (&t, &c, false)] {
                match (&*from).read(&mut buf) {
                    Ok(0) => {
                        *(if up { &mut c_open } else { &mut t_open }) = false;
                    }
                    Ok(n) => {
                        let tap = if up { &mut taps.to_target } else { &mut taps.to_initiator };
                        if !up {
                            alter(tap.len(), &mut buf[..n]);
                        }
                        tap.extend_from_slice(&buf[..n]);
                        let _ = (&*to).write_all(&buf[..n]);
                    }
                    Err(_) => {}
                }
            }
        }
        drop(c);
        t.set_read_timeout(Some(T)).unwrap();
        (t, taps)
    });
    (addr, h)
}

/// Issue 10, network item 1: a relay passes one genuine handshake and a
/// read through, drops the initiator and keeps the authenticated
/// connection. It saw no byte of the served memory, and neither plaintext
/// requests nor replays of the initiator's sealed ones get anything.
#[test]
fn a_relay_that_keeps_the_connection_can_neither_read_nor_inject() {
    let f = Fixture::new(Kind::Tcp);
    for (k, attack) in ["plaintext", "replay", "bit flip"].into_iter().enumerate() {
        let cut = Arc::new(AtomicBool::new(false));
        let (addr, h) = relay(f.target.local_addr(), cut.clone(), |_, _| {});
        let mut ini = connect(Kind::Tcp, &ConnectOptions::new(addr, f.token.clone()).depth(8)).unwrap();
        let buf = ini.alloc_buf(4 * PAGE).unwrap();
        let reads: Vec<ReadRequest> =
            (0..4).map(|i| read(i, f.region, i * PAGE as u64, PAGE as u32, buf, i as usize * PAGE)).collect();
        assert!(run(&mut *ini, &reads).iter().all(|c| c.status == Status::Success));
        assert_eq!(ini.buf(buf).unwrap(), &f.source(0, 4 * PAGE)[..]);
        let served = eventually(&*f.target, |s| s.reads_served >= 4 * (k as u64 + 1)).reads_served;
        assert_eq!(served, 4 * (k as u64 + 1));
        cut.store(true, Ordering::SeqCst);
        let (mut t, taps) = h.join().unwrap();
        drop(ini);

        let secret = f.source(0, 4 * PAGE);
        for w in secret.chunks(32) {
            assert!(
                !taps.to_initiator.windows(32).any(|x| x == w),
                "{attack}: served bytes crossed the relay in the clear"
            );
        }
        let handshake_len = 8 + handshake::HELLO_LEN + 8 + 48;
        let injected = match attack {
            "plaintext" => {
                let r = Request { op: OP_READ, rkey: f.region.rkey, addr: f.region.addr, len: PAGE as u32, seq: 4 };
                r.encode().to_vec()
            }
            "replay" => taps.to_target[handshake_len..].to_vec(),
            _ => {
                let mut v = taps.to_target[handshake_len..].to_vec();
                let last = v.len() - 1;
                v[last] ^= 1;
                v
            }
        };
        let _ = t.write_all(&injected);
        let mut answer = Vec::new();
        let _ = t.read_to_end(&mut answer);
        assert!(answer.is_empty(), "{attack}: the target answered {} bytes", answer.len());
        let after = f.target.stats();
        assert_eq!(after.reads_served, served, "{attack}: no read was served for the relay");
    }
    assert_eq!(f.mem.read(0, REGION).unwrap(), pattern(REGION, 1), "the source is untouched");
}

/// Issue 10, network item 2: an ACCEPT rewritten on the way (a region's
/// length, or any other byte) fails the connection cleanly, before
/// anything above the transport sees it.
#[test]
fn a_rewritten_accept_fails_the_connection_cleanly() {
    let f = Fixture::new(Kind::Tcp);
    // The target's NOISE frame is 56 bytes; ACCEPT's sealed message follows.
    for at in [56, 57, 58 + 8 + 8 + 16, 58 + 30] {
        let cut = Arc::new(AtomicBool::new(false));
        let (addr, h) = relay(f.target.local_addr(), cut.clone(), move |off, bytes| {
            if (off..off + bytes.len()).contains(&at) {
                bytes[at - off] ^= 0x10;
            }
        });
        let e = connect(Kind::Tcp, &ConnectOptions::new(addr, f.token.clone())).err().unwrap();
        assert!(matches!(e, ConnectError::Tampered { .. } | ConnectError::Io { .. }), "byte {at}: {e}");
        cut.store(true, Ordering::SeqCst);
        drop(h.join().unwrap());
    }
    assert_eq!(f.target.stats().reads_served, 0);
}

/// A target that holds the token but announces inconsistent regions
/// (empty, wrapping, past the address space, a key twice) is refused by
/// the transport itself: nothing above it is fed such descriptors.
#[test]
fn inconsistent_regions_from_a_token_holder_are_refused() {
    let ok = RegionDesc { addr: 1 << 20, rkey: 7, len: 16 };
    for regions in [
        vec![RegionDesc { len: 0, ..ok }],
        vec![RegionDesc { addr: u64::MAX - 8, ..ok }],
        vec![RegionDesc { len: u64::MAX, ..ok }],
        vec![ok, RegionDesc { addr: 1 << 30, ..ok }],
    ] {
        let (ini, server) = scripted_with(regions.clone(), 1, &[64], true, ok_responses);
        let e = ini.err().unwrap();
        assert!(matches!(e, ConnectError::Protocol { .. }), "{regions:?}: {e}");
        server.join().unwrap();
    }
}

fn threads_of_this_process() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Issue 10, network item 3: 300 peers that connect and trickle bytes of
/// a HELLO hold no thread each, are dropped at the deadline of the whole
/// handshake (not of each read), and a genuine initiator gets through
/// while they trickle.
#[test]
fn trickling_peers_hold_no_threads_and_are_dropped_at_the_deadline() {
    let token = Token::generate().unwrap();
    let opts = ServeOptions { handshake_timeout: Duration::from_millis(1500), ..ServeOptions::new(token.clone()) };
    let target = serve(Kind::Tcp, opts.listen(loopback())).unwrap();
    let mem = Arc::new(SharedBytes::from(pattern(PAGE, 3)));
    let region = target.register(mem).unwrap();
    let before = threads_of_this_process();
    let mut peers: Vec<TcpStream> = (0..300).map(|_| TcpStream::connect(target.local_addr()).unwrap()).collect();
    let hello = {
        let mut v = vec![Frame::Hello as u8, 0, 0, 0];
        v.extend_from_slice(&(handshake::HELLO_LEN as u32).to_le_bytes());
        v.extend_from_slice(&handshake::encode_hello(Kind::Tcp));
        v
    };
    let start = Instant::now();
    let mut most = 0;
    let mut genuine = None;
    // A byte every 100 ms: each read would meet a per-read timeout, never the whole-handshake one.
    for (round, byte) in hello.iter().cycle().take(25).enumerate() {
        for p in &mut peers {
            let _ = p.write_all(&[*byte]);
        }
        most = most.max(threads_of_this_process());
        if round == 3 {
            let mut ini = connect(Kind::Tcp, &ConnectOptions::new(target.local_addr(), token.clone())).unwrap();
            let buf = ini.alloc_buf(PAGE).unwrap();
            genuine = Some(run(&mut *ini, &[read(1, region, 0, PAGE as u32, buf, 0)])[0].status);
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(genuine, Some(Status::Success), "a genuine initiator got through");
    assert!(most < before + 100, "{most} threads with 300 trickling peers (started with {before})");
    let s = eventually(&*target, |s| s.rejected >= 300);
    assert!(s.rejected >= 300 && start.elapsed() < Duration::from_secs(30), "{s:?}");
    // Every trickler was dropped: its socket reads end of stream (or a reset).
    for p in &mut peers {
        p.set_read_timeout(Some(T)).unwrap();
        let mut rest = Vec::new();
        let _ = p.read_to_end(&mut rest);
    }
    assert_eq!(target.stats().accepted, 1);
}

/// Connections beyond `max_connections` are told "busy"; one frees a place.
#[test]
fn connections_beyond_the_cap_are_refused_as_busy() {
    let token = Token::generate().unwrap();
    let opts = ServeOptions { max_connections: 2, ..ServeOptions::new(token.clone()) };
    let target = serve(Kind::Tcp, opts.listen(loopback())).unwrap();
    let copts = ConnectOptions::new(target.local_addr(), token);
    let a = connect(Kind::Tcp, &copts).unwrap();
    let _b = connect(Kind::Tcp, &copts).unwrap();
    let e = connect(Kind::Tcp, &copts).err().unwrap();
    assert!(matches!(&e, ConnectError::Rejected { reason, .. } if reason.contains("too many connections")), "{e}");
    drop(a);
    let deadline = Instant::now() + T;
    while connect(Kind::Tcp, &copts).is_err() {
        assert!(Instant::now() < deadline, "a place was freed");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 10, network item 4: a peer queues 2044 page reads and never
/// reads the answers. Registration, deregistration, the owner's writes to
/// the served memory and other initiators all proceed.
#[test]
fn a_reader_that_never_reads_stalls_nobody() {
    let f = Fixture::new(Kind::Tcp);
    let (mut s, mut ch, _) = raw_session(f.target.local_addr(), &f.token);
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&s, 4096);
    let reqs: Vec<Request> = (0..2044)
        .map(|i| Request {
            op: OP_READ,
            rkey: f.region.rkey,
            addr: f.region.addr + (i % 256) * PAGE as u64,
            len: PAGE as u32,
            seq: i,
        })
        .collect();
    send_requests(&mut s, &mut ch, &reqs);
    eventually(&*f.target, |st| st.reads_served > 0);
    let (tx, rx) = mpsc::channel();
    let target: Arc<dyn Target> = Arc::from(f.target);
    let (t, mem, token) = (target.clone(), f.mem.clone(), f.token.clone());
    thread::spawn(move || {
        let extra = t.register(Arc::new(vec![1u8; PAGE])).unwrap();
        t.deregister(extra.rkey).unwrap();
        assert!(mem.write(0, b"newer bytes"));
        let mut ini = connect(Kind::Tcp, &ConnectOptions::new(t.local_addr(), token).depth(4)).unwrap();
        let region = ini.regions()[0];
        let buf = ini.alloc_buf(PAGE).unwrap();
        let c = run(&mut *ini, &[read(1, region, 0, PAGE as u32, buf, 0)]);
        let _ = tx.send((c[0].status, ini.buf(buf).unwrap()[..11].to_vec()));
    });
    let got = rx.recv_timeout(Duration::from_secs(30)).expect("register, deregister, write and a read completed");
    assert_eq!(got, (Status::Success, b"newer bytes".to_vec()));
    assert!(target.stats().reads_served < 2044, "the slow reader is still stuck on its own connection");
    s.shutdown(Shutdown::Both).unwrap();
}

/// Bytes of the target's handshake reply and sealed ACCEPT for one region,
/// ahead of the first response in the stream to the initiator.
fn reply_len(f: &Fixture) -> usize {
    let accept = handshake::encode_accept(&[f.region], &[]);
    56 + crate::transport::channel::LEN_PREFIX + 8 + accept.len() + crate::transport::channel::TAG
}

/// A bit flipped deep inside a large sealed message (one of many pages,
/// sent by the writer thread) fails the reads from there on: the reads
/// whose bytes all came in earlier messages land intact, the first one
/// touching the altered message is lost, the rest are flushed, and no
/// altered byte reaches a completed read.
#[test]
fn a_bit_flipped_inside_a_multi_page_message_fails_the_reads_from_there_on() {
    let f = Fixture::new(Kind::Tcp);
    let skip = reply_len(&f);
    // Into the third sealed message of the responses, well past its start.
    for at in [skip + 2 * 65537 + 30_000, skip + 9 * 65537 + 17] {
        let cut = Arc::new(AtomicBool::new(false));
        let (addr, h) = relay(f.target.local_addr(), cut.clone(), move |off, bytes| {
            if (off..off + bytes.len()).contains(&at) {
                bytes[at - off] ^= 0x01;
            }
        });
        let mut ini = connect(Kind::Tcp, &ConnectOptions::new(addr, f.token.clone()).depth(256)).unwrap();
        let buf = ini.alloc_buf(REGION).unwrap();
        let reads: Vec<ReadRequest> =
            (0..256).map(|i| read(i, f.region, i * PAGE as u64, PAGE as u32, buf, i as usize * PAGE)).collect();
        let c = run(&mut *ini, &reads);
        let ok = c.iter().take_while(|c| c.status == Status::Success).count();
        // Each message holds 65519 bytes of plaintext: 4116 per read of a page.
        assert!(ok > 0 && ok < (at - skip) / (PAGE + 20) + 1, "byte {at}: {ok} reads succeeded");
        assert_eq!(c[ok].status, Status::ConnectionLost, "byte {at}");
        assert!(c[ok + 1..].iter().all(|c| c.status == Status::Flushed), "byte {at}");
        let got = ini.buf(buf).unwrap();
        assert_eq!(got[..ok * PAGE], f.source(0, ok * PAGE)[..], "byte {at}: what landed is intact");
        for (c, r) in c[..ok].iter().zip(&reads) {
            assert_eq!(c.crc, Some(crc32fast::hash(&f.source(r.offset as usize, PAGE))));
        }
        drop(ini);
        cut.store(true, Ordering::SeqCst);
        drop(h.join().unwrap());
    }
}

/// An access error behind hundreds of pages in the same batch: every page
/// before it arrives (the writer thread sent them all before the target
/// half-closed), then the error, then nothing.
#[test]
fn an_error_behind_many_pages_arrives_after_all_of_them() {
    let f = Fixture::new(Kind::Tcp);
    let mut ini = f.connect(Kind::Tcp, 1024);
    let buf = ini.alloc_buf(600 * PAGE).unwrap();
    let mut reads: Vec<ReadRequest> =
        (0..600).map(|i| read(i, f.region, (i % 256) * PAGE as u64, PAGE as u32, buf, i as usize * PAGE)).collect();
    reads[550].region.rkey ^= 0x5a5a;
    let c = run(&mut *ini, &reads);
    assert!(c[..550].iter().all(|c| c.status == Status::Success));
    assert_eq!(c[550].status, Status::AccessError);
    assert!(c[551..].iter().all(|c| c.status == Status::Flushed));
    let got = ini.buf(buf).unwrap();
    for i in 0..550 {
        assert_eq!(got[i * PAGE..(i + 1) * PAGE], f.source((i % 256) * PAGE, PAGE)[..], "page {i}");
    }
    // The writer thread counts a batch's reads once it has sent them, after
    // the serving thread counted the error: wait for both.
    let st = eventually(&*f.target, |s| s.access_errors == 1 && s.reads_served >= 550);
    assert_eq!((st.access_errors, st.reads_served), (1, 550));
}

/// A target dropped while its writer thread is blocked on a peer that
/// reads nothing shuts down promptly (the writer's write fails; the
/// serving thread, waiting for a free buffer, sees the writer go).
#[test]
fn a_target_with_a_stuck_writer_drops_promptly() {
    let f = Fixture::new(Kind::Tcp);
    let (mut s, mut ch, _) = raw_session(f.target.local_addr(), &f.token);
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&s, 4096);
    let reqs: Vec<Request> = (0..4000)
        .map(|i| Request {
            op: OP_READ,
            rkey: f.region.rkey,
            addr: f.region.addr + (i % 256) * PAGE as u64,
            len: PAGE as u32,
            seq: i,
        })
        .collect();
    send_requests(&mut s, &mut ch, &reqs);
    eventually(&*f.target, |st| st.reads_served > 0);
    thread::sleep(Duration::from_millis(200));
    let Fixture { target, ini, .. } = f;
    let start = Instant::now();
    drop(target);
    assert!(start.elapsed() < T, "dropped in {:?}", start.elapsed());
    drop(ini);
    drop(s);
}

/// Peers that stop reading and send nothing more are dropped once they
/// took no data for the write timeout, however far the serving thread got
/// (still copying, or done and waiting for requests while the writer is
/// stuck): the writer thread's failed write ends the serving thread's wait
/// for requests too.
#[test]
fn peers_that_neither_read_nor_ask_are_dropped_after_the_write_timeout() {
    let token = Token::generate().unwrap();
    let opts = ServeOptions { write_timeout: Duration::from_millis(300), ..ServeOptions::new(token.clone()) };
    let target = serve(Kind::Tcp, opts.listen(loopback())).unwrap();
    let region = target.register(Arc::new(SharedBytes::from(pattern(REGION, 1)))).unwrap();
    // Replies of 8 to 16 MiB: more than the socket buffers take (a reply
    // they hold would leave nothing to time out, and the connection waits
    // for requests, as any idle one does).
    let sizes: Vec<u64> = (2048..4096).step_by(128).collect();
    let mut peers = Vec::new();
    for &n in &sizes {
        let (mut s, mut ch, _) = raw_session(target.local_addr(), &token);
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&s, 4096);
        let reqs: Vec<Request> = (0..n)
            .map(|i| Request {
                op: OP_READ,
                rkey: region.rkey,
                addr: region.addr + (i % 256) * PAGE as u64,
                len: PAGE as u32,
                seq: i,
            })
            .collect();
        send_requests(&mut s, &mut ch, &reqs);
        peers.push(s);
    }
    let n = sizes.len() as u64;
    let st = eventually(&*target, |st| st.accepted == n && st.active == 0);
    assert_eq!(st.active, 0, "every connection was dropped: {st:?}");
    drop(peers);
}
