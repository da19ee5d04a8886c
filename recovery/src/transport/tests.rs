//! The conformance suite: one set of cases, run against every transport.
//!
//! TCP runs everywhere. The verbs cases are ignored (they need an RDMA
//! device); on an RDMA host run them with
//! `cargo test -p remem-recovery --features verbs -- --ignored`.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

const T: Duration = Duration::from_secs(10);
const PAGE: usize = 4096;
const REGION: usize = 256 * PAGE;

/// Distinct bytes everywhere, and a different pattern per `version`.
fn pattern(len: usize, version: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1 + i % 3] ^ version).collect()
}

fn loopback() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

struct Fixture {
    target: Box<dyn Target>,
    token: Token,
    mem: Arc<SharedBytes>,
    region: RegionDesc,
    ini: Box<dyn Initiator>,
}

impl Fixture {
    fn new(kind: Kind) -> Fixture {
        let token = Token::generate().unwrap();
        let target = serve(kind, ServeOptions::new(token.clone()).listen(loopback())).unwrap();
        let mem = Arc::new(SharedBytes::from(pattern(REGION, 1)));
        let region = target.register(mem.clone()).unwrap();
        let ini = connect(kind, &ConnectOptions::new(target.local_addr(), token.clone()).depth(64)).unwrap();
        Fixture { target, token, mem, region, ini }
    }

    fn connect(&self, kind: Kind, depth: usize) -> Box<dyn Initiator> {
        connect(kind, &ConnectOptions::new(self.target.local_addr(), self.token.clone()).depth(depth)).unwrap()
    }

    fn source(&self, offset: usize, len: usize) -> Vec<u8> {
        self.mem.read(offset, len).unwrap()
    }
}

fn read(wr_id: u64, region: RegionDesc, offset: u64, len: u32, buf: BufId, buf_offset: usize) -> ReadRequest {
    ReadRequest { wr_id, region, offset, len, buf, buf_offset }
}

/// Posts `reads` and waits for all their completions.
fn run(ini: &mut dyn Initiator, reads: &[ReadRequest]) -> Vec<Completion> {
    ini.post(reads).unwrap();
    let mut out = Vec::new();
    ini.wait(&mut out, reads.len(), T).unwrap();
    assert_eq!(out.len(), reads.len());
    out
}

fn statuses(c: &[Completion]) -> Vec<(u64, Status)> {
    c.iter().map(|c| (c.wr_id, c.status)).collect()
}

/// Waits until the target's counters satisfy `f` (its threads lag a little).
fn eventually(target: &dyn Target, f: impl Fn(&TargetStats) -> bool) -> TargetStats {
    let deadline = Instant::now() + T;
    loop {
        let s = target.stats();
        if f(&s) || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub(super) fn announces_registered_regions(kind: Kind) {
    let f = Fixture::new(kind);
    assert_eq!(f.ini.regions(), [f.region]);
    assert_eq!(f.region.len, REGION as u64);
    let extra = f.target.register(Arc::new(vec![5u8; 100])).unwrap();
    assert!(matches!(f.target.register(Arc::new(Vec::<u8>::new())), Err(RegisterError::Empty)));
    let mut seen = f.connect(kind, 8).regions().to_vec();
    seen.sort_by_key(|r| r.rkey);
    let mut want = vec![f.region, extra];
    want.sort_by_key(|r| r.rkey);
    assert_eq!(seen, want);
    f.target.deregister(extra.rkey).unwrap();
    assert!(matches!(f.target.deregister(extra.rkey), Err(RegisterError::UnknownKey(_))));
    assert_eq!(f.connect(kind, 8).regions(), [f.region]);
}

pub(super) fn reads_of_many_sizes_and_offsets_match(kind: Kind) {
    let mut f = Fixture::new(kind);
    let buf = f.ini.alloc_buf(REGION + 8).unwrap();
    let sizes = [1, 2, 7, 63, 64, 65, 4095, 4096, 4097, 65_539, 1 << 20, REGION];
    let mut id = 0;
    for &len in &sizes {
        for offset in [0, 1, 4093, REGION - len] {
            if offset + len > REGION {
                continue;
            }
            for buf_offset in [0, 5] {
                id += 1;
                let c = run(&mut *f.ini, &[read(id, f.region, offset as u64, len as u32, buf, buf_offset)]);
                let crc = (kind == Kind::Tcp).then(|| crc32fast::hash(&f.source(offset, len)));
                assert_eq!(c, [Completion { wr_id: id, status: Status::Success, len: len as u32, crc }]);
                let got = &f.ini.buf(buf).unwrap()[buf_offset..buf_offset + len];
                assert!(got == f.source(offset, len), "{len} bytes at {offset} into {buf_offset}");
            }
        }
    }
}

pub(super) fn batches_complete_in_posting_order(kind: Kind) {
    let mut f = Fixture::new(kind);
    let mut ini = f.connect(kind, 512);
    let pages = REGION / PAGE;
    let buf = ini.alloc_buf(REGION).unwrap();
    // Two batches in flight at once, pages in a scrambled order.
    let order: Vec<usize> = (0..pages).map(|i| (i * 97 + 13) % pages).collect();
    let reads: Vec<ReadRequest> = order
        .iter()
        .enumerate()
        .map(|(i, &p)| read(1000 + i as u64, f.region, (p * PAGE) as u64, PAGE as u32, buf, i * PAGE))
        .collect();
    let (a, b) = reads.split_at(pages / 3);
    ini.post(a).unwrap();
    ini.post(b).unwrap();
    assert_eq!(ini.max_outstanding(), 512);
    let mut out = Vec::new();
    while out.len() < pages {
        let want = if out.len() % 2 == 0 { 1 } else { pages - out.len() };
        ini.wait(&mut out, want, T).unwrap();
    }
    let ids: Vec<u64> = out.iter().map(|c| c.wr_id).collect();
    assert_eq!(ids, (1000..1000 + pages as u64).collect::<Vec<_>>(), "completions come in posting order");
    assert!(out.iter().all(|c| c.status == Status::Success && c.len == PAGE as u32));
    let got = ini.buf(buf).unwrap();
    for (i, &p) in order.iter().enumerate() {
        assert!(got[i * PAGE..(i + 1) * PAGE] == f.source(p * PAGE, PAGE), "page {p}");
    }
    // The fixture's own connection still works beside this one.
    let small = f.ini.alloc_buf(8).unwrap();
    assert_eq!(run(&mut *f.ini, &[read(1, f.region, 8, 8, small, 0)])[0].status, Status::Success);
}

pub(super) fn bad_key_is_an_access_error_then_flushed(kind: Kind) {
    let mut f = Fixture::new(kind);
    let buf = f.ini.alloc_buf(4 * PAGE).unwrap();
    let bad = RegionDesc { rkey: f.region.rkey ^ 0x5a5a_0000, ..f.region };
    let c = run(
        &mut *f.ini,
        &[
            read(1, f.region, 0, PAGE as u32, buf, 0),
            read(2, bad, 0, PAGE as u32, buf, PAGE),
            read(3, f.region, 0, PAGE as u32, buf, 2 * PAGE),
            read(4, f.region, 0, PAGE as u32, buf, 3 * PAGE),
        ],
    );
    assert_eq!(
        statuses(&c),
        [(1, Status::Success), (2, Status::AccessError), (3, Status::Flushed), (4, Status::Flushed)]
    );
    assert_eq!(f.ini.buf(buf).unwrap()[..PAGE], f.source(0, PAGE)[..]);
    // Later reads on the connection are flushed too, however good.
    let c = run(&mut *f.ini, &[read(5, f.region, 0, 8, buf, 0), read(6, f.region, 8, 8, buf, 8)]);
    assert_eq!(statuses(&c), [(5, Status::Flushed), (6, Status::Flushed)]);
    // Other connections are unaffected.
    let mut other = f.connect(kind, 8);
    let b = other.alloc_buf(8).unwrap();
    assert_eq!(run(&mut *other, &[read(7, f.region, 0, 8, b, 0)])[0].status, Status::Success);
    if kind == Kind::Tcp {
        assert_eq!(eventually(&*f.target, |s| s.access_errors == 1).access_errors, 1);
    }
}

pub(super) fn out_of_range_is_an_access_error(kind: Kind) {
    let f = Fixture::new(kind);
    let len = REGION as u64;
    let cases = [(len - 10, 20), (len, 1), (u64::MAX - 4, 8), (0, (REGION + 1) as u32)];
    for (i, &(offset, n)) in cases.iter().enumerate() {
        let mut ini = f.connect(kind, 8);
        let buf = ini.alloc_buf(REGION + 1).unwrap();
        let c = run(&mut *ini, &[read(i as u64, f.region, offset, n, buf, 0), read(99, f.region, 0, 1, buf, 0)]);
        assert_eq!(statuses(&c), [(i as u64, Status::AccessError), (99, Status::Flushed)], "{n} bytes at {offset}");
    }
    // The last byte itself is in range.
    let mut ini = f.connect(kind, 8);
    let buf = ini.alloc_buf(1).unwrap();
    assert_eq!(run(&mut *ini, &[read(1, f.region, len - 1, 1, buf, 0)])[0].status, Status::Success);
    assert_eq!(ini.buf(buf).unwrap(), &f.source(REGION - 1, 1)[..]);
}

pub(super) fn deregistered_region_is_refused(kind: Kind) {
    let mut f = Fixture::new(kind);
    f.target.deregister(f.region.rkey).unwrap();
    let buf = f.ini.alloc_buf(8).unwrap();
    assert_eq!(run(&mut *f.ini, &[read(1, f.region, 0, 8, buf, 0)])[0].status, Status::AccessError);
}

pub(super) fn wrong_token_is_refused_on_both_sides(kind: Kind) {
    let f = Fixture::new(kind);
    let wrong = Token::generate().unwrap();
    let e = connect(kind, &ConnectOptions::new(f.target.local_addr(), wrong.clone())).err().unwrap();
    assert!(matches!(e, ConnectError::AuthFailed { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("different tokens"), "{msg}");
    for t in [&wrong, &f.token] {
        assert!(!msg.contains(&t.to_hex()[..16]), "an error message shows a token");
    }
    let s = eventually(&*f.target, |s| s.rejected == 1);
    assert_eq!((s.rejected, s.accepted), (1, 1));
}

pub(super) fn source_changes_are_seen(kind: Kind) {
    let mut f = Fixture::new(kind);
    let buf = f.ini.alloc_buf(PAGE).unwrap();
    let page = 3 * PAGE;
    assert_eq!(run(&mut *f.ini, &[read(1, f.region, page as u64, PAGE as u32, buf, 0)])[0].status, Status::Success);
    assert_eq!(f.ini.buf(buf).unwrap(), &pattern(REGION, 1)[page..page + PAGE]);
    for version in 2..5u8 {
        assert!(f.mem.write(page, &pattern(REGION, version)[page..page + PAGE]));
        assert_eq!(run(&mut *f.ini, &[read(2, f.region, page as u64, PAGE as u32, buf, 0)])[0].status, Status::Success);
        assert_eq!(f.ini.buf(buf).unwrap(), &pattern(REGION, version)[page..page + PAGE], "version {version}");
    }
}

pub(super) fn concurrent_initiators(kind: Kind) {
    let f = Fixture::new(kind);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (mut ini, region, mem) = (f.connect(kind, 32), f.region, f.mem.clone());
            std::thread::spawn(move || {
                let buf = ini.alloc_buf(32 * PAGE).unwrap();
                for round in 0..16u64 {
                    let pages: Vec<usize> = (0..32).map(|i| ((t * 7 + round * 13 + i * 31) % 256) as usize).collect();
                    let reads: Vec<ReadRequest> = pages
                        .iter()
                        .enumerate()
                        .map(|(i, &p)| read(i as u64, region, (p * PAGE) as u64, PAGE as u32, buf, i * PAGE))
                        .collect();
                    assert!(run(&mut *ini, &reads).iter().all(|c| c.status == Status::Success));
                    let got = ini.buf(buf).unwrap();
                    for (i, &p) in pages.iter().enumerate() {
                        assert!(got[i * PAGE..(i + 1) * PAGE] == mem.read(p * PAGE, PAGE).unwrap()[..]);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(eventually(&*f.target, |s| s.accepted == 5).accepted, 5);
}

pub(super) fn local_errors_are_refused_at_post(kind: Kind) {
    let f = Fixture::new(kind);
    let mut ini = f.connect(kind, 2);
    let buf = ini.alloc_buf(16).unwrap();
    let r = f.region;
    assert!(matches!(ini.post(&[read(1, r, 0, 0, buf, 0)]), Err(PostError::ZeroLength { wr_id: 1 })));
    assert!(matches!(ini.post(&[read(2, r, 0, 17, buf, 0)]), Err(PostError::LocalRange { wr_id: 2, .. })));
    assert!(matches!(ini.post(&[read(3, r, 0, 8, BufId(7), 0)]), Err(PostError::UnknownBuf { wr_id: 3, .. })));
    assert!(matches!(ini.alloc_buf(0), Err(BufError::BadLength { len: 0 })));
    // A batch is posted whole or not at all.
    let bad_last = [read(4, r, 0, 8, buf, 0), read(5, r, 0, 8, buf, 9)];
    assert!(matches!(ini.post(&bad_last), Err(PostError::LocalRange { wr_id: 5, .. })));
    let three = [read(6, r, 0, 8, buf, 0), read(7, r, 0, 8, buf, 8), read(8, r, 0, 8, buf, 0)];
    assert!(matches!(ini.post(&three), Err(PostError::QueueFull { outstanding: 0, batch: 3, depth: 2 })));
    std::thread::sleep(Duration::from_millis(20));
    let mut out = Vec::new();
    assert_eq!(ini.poll(&mut out, 16).unwrap(), 0, "refused posts make no completion");
    // The slots are held until the completions are polled.
    ini.post(&three[..2]).unwrap();
    assert!(matches!(ini.post(&three[2..]), Err(PostError::QueueFull { outstanding: 2, .. })));
    ini.wait(&mut out, 2, T).unwrap();
    assert_eq!(statuses(&out), [(6, Status::Success), (7, Status::Success)]);
    ini.post(&three[2..]).unwrap();
    ini.wait(&mut out, 1, T).unwrap();
    assert_eq!(out.last().map(|c| (c.wr_id, c.status)), Some((8, Status::Success)));
}

pub(super) fn buffers_are_busy_until_polled(kind: Kind) {
    let mut f = Fixture::new(kind);
    let (a, b) = (f.ini.alloc_buf(PAGE).unwrap(), f.ini.alloc_buf(PAGE).unwrap());
    f.ini.post(&[read(1, f.region, 0, PAGE as u32, a, 0)]).unwrap();
    assert!(matches!(f.ini.buf(a), Err(BufError::Busy { outstanding: 1, .. })));
    assert_eq!(f.ini.buf(b).unwrap(), &[0u8; PAGE][..], "new buffers are zeroed");
    assert!(matches!(f.ini.buf(BufId(9)), Err(BufError::Unknown(_))));
    let mut out = Vec::new();
    assert!(matches!(f.ini.wait(&mut out, 2, T), Err(PollError::NotOutstanding { wanted: 2, outstanding: 1 })));
    f.ini.wait(&mut out, 1, T).unwrap();
    assert_eq!(f.ini.buf(a).unwrap(), &f.source(0, PAGE)[..]);
}

pub(super) fn target_gone_fails_the_reads(kind: Kind) {
    let Fixture { target, region, mut ini, .. } = Fixture::new(kind);
    let buf = ini.alloc_buf(2 * PAGE).unwrap();
    assert_eq!(run(&mut *ini, &[read(1, region, 0, 8, buf, 0)])[0].status, Status::Success);
    drop(target);
    let c = run(&mut *ini, &[read(2, region, 0, PAGE as u32, buf, 0), read(3, region, 0, PAGE as u32, buf, PAGE)]);
    assert!(matches!(c[0].status, Status::ConnectionLost | Status::Device(_)), "{c:?}");
    assert_eq!(c[1].status, Status::Flushed);
}

/// Every case, one `#[test]` each, for one transport.
macro_rules! conformance {
    ($kind:expr $(, #[$attr:meta])*) => {
        conformance!(@each $kind, { $(#[$attr])* };
            announces_registered_regions, reads_of_many_sizes_and_offsets_match,
            batches_complete_in_posting_order, bad_key_is_an_access_error_then_flushed,
            out_of_range_is_an_access_error, deregistered_region_is_refused,
            wrong_token_is_refused_on_both_sides, source_changes_are_seen, concurrent_initiators,
            local_errors_are_refused_at_post, buffers_are_busy_until_polled, target_gone_fails_the_reads);
    };
    (@each $kind:expr, $attrs:tt; $($case:ident),*) => {
        $( conformance!(@one $kind, $attrs, $case); )*
    };
    (@one $kind:expr, { $($attr:tt)* }, $case:ident) => {
        #[test]
        $($attr)*
        fn $case() {
            super::$case($kind);
        }
    };
}

mod tcp {
    conformance!(super::Kind::Tcp);
}

#[cfg(feature = "verbs")]
mod verbs {
    conformance!(
        super::Kind::Verbs,
        #[ignore = "needs an RDMA device: cargo test -p remem-recovery --features verbs -- --ignored"]
    );
}

mod tcp_only;

/// Without a device (or without the feature) the verbs transport fails
/// with a message that says what to do.
#[test]
fn verbs_without_a_device_fails_clearly() {
    let token = Token::generate().unwrap();
    let served = serve(Kind::Verbs, ServeOptions::new(token.clone()).listen(loopback()));
    let e = match served {
        Ok(_) => return, // an RDMA host: the ignored suite covers it
        Err(e) => e,
    };
    let msg = e.to_string();
    assert!(msg.contains("TCP transport"), "{msg}");
    #[cfg(not(feature = "verbs"))]
    assert!(matches!(e, ServeError::Device(DeviceError::NotBuilt)) && msg.contains("--features verbs"), "{msg}");
    #[cfg(feature = "verbs")]
    assert!(matches!(e, ServeError::Device(DeviceError::NoKernelSupport | DeviceError::NoDevice { .. })), "{msg}");
    let c = connect(Kind::Verbs, &ConnectOptions::new(loopback(), token)).err().unwrap();
    assert!(matches!(c, ConnectError::Device(_)), "{c}");
    eprintln!("verbs: {msg}");
}
