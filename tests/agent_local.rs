//! Local peers on the agent's Unix socket (issue 10, items 5, 6, 7 and the
//! agent's part of 12): each attack or mistake is reproduced and must now
//! fail cleanly, with the agent still serving and nothing lost.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use remem::alloc::TrackMode;
use remem::recovery::agent::{self, dir, info, layout, Agent, AgentError, AgentOptions, Registration};
use remem::recovery::transport::{self, ConnectOptions, Initiator, Kind, ReadRequest, RegionDesc, ServeOptions, Token};
use remem::{Heap, HeapOptions};

fn is_child() -> bool {
    std::env::var("REMEM_TEST_SOCKET").is_ok()
}

struct Setup {
    dir: PathBuf,
    agent: Agent,
    token: Token,
}

impl Setup {
    fn new(name: &str, f: impl FnOnce(AgentOptions) -> AgentOptions) -> Setup {
        let dir = std::env::temp_dir().join(format!("remem-agent-local-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let token = Token::generate().unwrap();
        let mut serve = ServeOptions::new(token.clone());
        serve.listen = "127.0.0.1:0".parse().unwrap();
        let agent = Agent::start(f(AgentOptions::new(dir.join("agent").join("agent.sock"), serve))).unwrap();
        Setup { dir, agent, token }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("agent").join("agent.sock")
    }

    fn heap(&self, name: &str) -> Heap {
        let opts = HeapOptions::new(4 << 20).flush_interval(None).tracking(TrackMode::Fast);
        Heap::create(self.dir.join(name), &opts).unwrap()
    }

    fn connect(&self) -> Box<dyn Initiator> {
        transport::connect(Kind::Tcp, &ConnectOptions::new(self.agent.local_addr(), self.token.clone())).unwrap()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn read(init: &mut dyn Initiator, region: RegionDesc, offset: u64, len: usize) -> Vec<u8> {
    let buf = init.alloc_buf(len).unwrap();
    init.post(&[ReadRequest { wr_id: 1, region, offset, len: len as u32, buf, buf_offset: 0 }]).unwrap();
    let mut out = Vec::new();
    init.wait(&mut out, 1, Duration::from_secs(10)).unwrap();
    assert!(out[0].status.is_success(), "{:?}", out[0]);
    init.buf(buf).unwrap()[..len].to_vec()
}

/// The info block of heap `uuid`, as a recoverer finds it.
fn info_block(init: &mut dyn Initiator, uuid: &str) -> Option<Vec<u8>> {
    let regions = init.regions().to_vec();
    let d = regions.into_iter().find(|r| r.len >= 16 && read(init, *r, 0, 8) == dir::MAGIC_BYTES).unwrap();
    let bytes = read(init, d, 0, d.len as usize);
    assert_eq!(&bytes[..8], &dir::MAGIC_BYTES);
    let slots = layout::u32_at(&bytes, dir::SLOTS).unwrap() as usize;
    (0..slots).map(|s| bytes[dir::slot_offset(s)..dir::slot_offset(s) + info::LEN].to_vec()).find(|b| {
        layout::u32_at(b, info::STATE) != Some(info::FREE)
            && remem::alloc::format::uuid_string(&b[16..32].try_into().unwrap()) == uuid
    })
}

fn memfd(len: u64, sealed: bool) -> File {
    let name = c"remem-test";
    let flags = libc::MFD_CLOEXEC | if sealed { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: a valid C string and flags.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor we own.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(len).unwrap();
    if sealed {
        // SAFETY: F_ADD_SEALS on our memfd.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) }, 0);
    }
    f
}

/// A memfd holding a copy of `fd`'s bytes (the first `len` of them).
fn copy_of(fd: &OwnedFd, len: u64, sealed: bool) -> File {
    let src = File::from(fd.try_clone().unwrap());
    let n = src.metadata().unwrap().len().min(len);
    let f = memfd(len, false);
    let mut buf = vec![0u8; n as usize];
    src.read_exact_at(&mut buf, 0).unwrap();
    f.write_all_at(&buf, 0).unwrap();
    if sealed {
        // SAFETY: as in `memfd` (created without MFD_ALLOW_SEALING: this fails, see below).
        let _ = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) };
    }
    f
}

/// A sealed memfd of `len` bytes starting with `fd`'s bytes.
fn sealed_copy(fd: &OwnedFd, len: u64) -> File {
    let src = File::from(fd.try_clone().unwrap());
    let n = src.metadata().unwrap().len().min(len);
    let f = memfd(len, true);
    let mut buf = vec![0u8; n as usize];
    src.read_exact_at(&mut buf, 0).unwrap();
    f.write_all_at(&buf, 0).unwrap();
    f
}

fn reg(op: &str, heap: &Heap) -> Registration {
    Registration {
        op: op.into(),
        uuid: heap.uuid(),
        baseline: heap.path().unwrap().canonicalize().unwrap(),
        pid: std::process::id(),
    }
}

fn refused(r: Result<impl std::fmt::Debug, AgentError>, want: &str) -> String {
    let e = r.expect_err("the agent must refuse");
    let s = e.to_string();
    assert!(s.contains(want), "expected {want:?} in: {s}");
    s
}

/// Item 7: empty, short, oversized and unsealed memfds, and descriptors
/// that are not memfds, get a clear refusal; the agent keeps serving; a
/// sealed memfd cannot be shrunk under it; `attach_durable` checks lengths.
#[test]
fn bad_memfds_are_refused_with_a_reason_and_the_agent_keeps_serving() {
    if is_child() {
        return;
    }
    let s = Setup::new("memfds", |o| o);
    let heap = s.heap("a");
    let size = heap.size();
    let ctl = heap.control_memfd().unwrap();
    let r = reg("register", &heap);
    let sock = s.socket();
    let send = |h: &File, c: &OwnedFd| agent::request(&sock, &r, &[h.as_fd(), c.as_fd()]);
    refused(send(&memfd(0, true), ctl), "too short");
    refused(send(&memfd(1000, true), ctl), "too short");
    refused(send(&sealed_copy(heap.memfd(), 2 * size), ctl), &format!("is {} bytes, its header says", 2 * size));
    refused(send(&sealed_copy(heap.memfd(), size - 4096), ctl), "bytes, its header says");
    refused(send(&copy_of(heap.memfd(), size, true), ctl), "not sealed against resizing");
    refused(send(&File::open("/proc/self/exe").unwrap(), ctl), "not a memfd");
    let hfd = File::from(heap.memfd().try_clone().unwrap());
    refused(agent::request(&sock, &r, &[hfd.as_fd()]), "exactly two");
    refused(send(&hfd, &copy_of(ctl, 4096, false).into()), "control memfd");
    let mut wrong = r.clone();
    wrong.op = "steal".into();
    refused(agent::request(&sock, &wrong, &[]), "unknown operation");
    // Nothing was hosted by any of that, and a good registration works.
    assert!(s.agent.heaps().is_empty(), "{:?}", s.agent.heaps());
    let link = agent::register(&heap, &sock).unwrap();
    assert_eq!(s.agent.heap_state(&heap.uuid()), Some(info::RUNNING));
    // The registered memfd can no longer be shrunk (the SIGBUS attack).
    let e = File::from(heap.memfd().try_clone().unwrap()).set_len(4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    // attach_durable refuses a memfd of the wrong length (no SIGBUS, no panic).
    let path = s.dir.join("b");
    let other = Heap::create(&path, &HeapOptions::new(4 << 20).flush_interval(None)).unwrap();
    let short: OwnedFd = sealed_copy(other.memfd(), 8192).into();
    other.close().unwrap();
    let e = Heap::attach_durable(short, &path, &HeapOptions::new(0), &[]).unwrap_err();
    assert!(e.to_string().contains("8192 bytes"), "{e}");
    drop(link);
}

/// Item 6: a second live registration of a UUID is refused; the end of one
/// connection seals only the heap it registered; a dead owner's heap keeps
/// its pages (a registration of other bytes under its UUID is refused).
#[test]
fn heaps_are_keyed_by_uuid_and_bound_to_their_connection() {
    if is_child() {
        return;
    }
    let s = Setup::new("split", |o| o);
    let a = s.heap("a");
    let c = s.heap("c");
    let link_a = agent::register(&a, &s.socket()).unwrap();
    let link_c = agent::register(&c, &s.socket()).unwrap();
    // B: A's UUID, other bytes.
    let b = sealed_copy(a.memfd(), a.size());
    b.write_all_at(&[0xB5; 4096], a.size() - 4096).unwrap();
    let bctl = sealed_copy(
        a.control_memfd().unwrap(),
        File::from(a.control_memfd().unwrap().try_clone().unwrap()).metadata().unwrap().len(),
    );
    let r = reg("register", &a);
    refused(agent::request(&s.socket(), &r, &[b.as_fd(), bctl.as_fd()]), "already registered by a live process");
    // A's connection ends (its owner "dies"): only A is sealed.
    drop(link_a);
    let st = s.agent.wait_heap_state(&a.uuid(), info::SEALED, Duration::from_secs(30));
    assert_eq!(st, Some(info::SEALED));
    assert_eq!(s.agent.heap_state(&c.uuid()), Some(info::RUNNING), "closing A's connection sealed C");
    // B cannot take A's place while the agent holds A's newer pages.
    refused(agent::request(&s.socket(), &r, &[b.as_fd(), bctl.as_fd()]), "re-attach it");
    // What is served for A is A's memory, not B's.
    let mut init = s.connect();
    let block = info_block(&mut *init, &a.uuid()).unwrap();
    let heap_region = layout::region_desc(&block, info::HEAP).unwrap();
    let last = read(&mut *init, heap_region, a.size() - 4096, 4096);
    let mut mine = vec![0u8; 4096];
    File::from(a.memfd().try_clone().unwrap()).read_exact_at(&mut mine, a.size() - 4096).unwrap();
    assert_eq!(last, mine);
    assert_eq!(layout::u64_at(&block, info::SEAL_CURSOR), layout::u64_at(&block, info::NPAGES));
    drop(link_c);
}

/// Item 7 (leak): regions are withdrawn when heaps leave; the number of
/// heaps held is capped and a slot is reused once its heap left.
#[test]
fn regions_are_freed_when_heaps_leave_and_slots_are_capped() {
    if is_child() {
        return;
    }
    let s = Setup::new("leak", |o| o.max_heaps(2));
    for round in 0..4 {
        let h = s.heap(&format!("h{round}"));
        let link = agent::register(&h, &s.socket()).unwrap();
        assert_eq!(s.connect().regions().len(), 1 + 4, "round {round}");
        h.close().unwrap();
        link.closed().unwrap();
        assert_eq!(s.agent.wait_state(info::CLOSED, Duration::from_secs(10)), info::CLOSED);
        assert_eq!(s.connect().regions().len(), 1, "round {round}: regions leaked");
    }
    let (x, y, z) = (s.heap("x"), s.heap("y"), s.heap("z"));
    let lx = agent::register(&x, &s.socket()).unwrap();
    let _ly = agent::register(&y, &s.socket()).unwrap();
    refused(agent::register(&z, &s.socket()), "its maximum");
    x.close().unwrap();
    lx.closed().unwrap();
    let _lz = agent::register(&z, &s.socket()).unwrap();
    assert_eq!(s.connect().regions().len(), 1 + 8);
}

/// Item 12 (agent part): the agent opens the baseline read-only.
#[test]
fn the_agent_opens_the_baseline_read_only() {
    if is_child() {
        return;
    }
    let s = Setup::new("readonly", |o| o);
    let h = s.heap("a");
    let path = h.path().unwrap().canonicalize().unwrap();
    let fds_on = |p: &Path| -> Vec<(String, u32)> {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == p))
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{n}")).ok()?;
                let flags = fdinfo.lines().find_map(|l| l.strip_prefix("flags:"))?.trim().to_owned();
                Some((n, u32::from_str_radix(&flags, 8).ok()?))
            })
            .collect()
    };
    let before: Vec<String> = fds_on(&path).into_iter().map(|(n, _)| n).collect();
    let _link = agent::register(&h, &s.socket()).unwrap();
    let new: Vec<(String, u32)> = fds_on(&path).into_iter().filter(|(n, _)| !before.contains(n)).collect();
    assert!(!new.is_empty(), "the agent keeps the baseline open");
    for (n, flags) in new {
        assert_eq!(flags & libc::O_ACCMODE as u32, libc::O_RDONLY as u32, "fd {n} flags {flags:o}");
    }
    // A path the registrant names that is not this heap's baseline is refused.
    let mut r = reg("register", &h);
    let c = s.heap("c");
    r.baseline = c.path().unwrap().canonicalize().unwrap();
    let (hf, cf) = (h.memfd(), h.control_memfd().unwrap());
    refused(agent::request(&s.socket(), &r, &[hf.as_fd(), cf.as_fd()]), "not of the heap registered");
}

const NOBODY: u32 = 65534;

/// Run as another user: every request is refused, and no memfd comes back.
#[test]
fn child_other_user() {
    let (Ok(sock), Ok(uuid), Ok(baseline)) =
        (std::env::var("REMEM_TEST_SOCKET"), std::env::var("REMEM_TEST_UUID"), std::env::var("REMEM_TEST_BASELINE"))
    else {
        return;
    };
    let r = Registration { op: "reattach".into(), uuid, baseline: baseline.into(), pid: std::process::id() };
    match agent::request(Path::new(&sock), &r, &[]) {
        Ok((_, fd)) => panic!("reattach by another user succeeded (memfd handed out: {})", fd.is_some()),
        Err(e) => println!("reattach refused: {e}"),
    }
    let mut r2 = r.clone();
    r2.op = "register".into();
    let e = agent::request(Path::new(&sock), &r2, &[]).unwrap_err();
    println!("register refused: {e}");
}

/// Item 5: another user's process that can reach the socket (here because
/// an operator opened its directory up) is refused by its credentials: it
/// can neither re-attach a dead owner's heap (no memfd handed out) nor
/// register; the heap's own user can re-attach.
#[test]
fn another_user_cannot_reattach_or_register() {
    if is_child() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run a process as another user");
        return;
    }
    let s = Setup::new("peers", |o| o);
    let h = s.heap("a");
    let link = agent::register(&h, &s.socket()).unwrap();
    drop(link); // the owner's connection ends: the heap is the agent's to guard
    assert_eq!(s.agent.wait_heap_state(&h.uuid(), info::SEALED, Duration::from_secs(30)), Some(info::SEALED));
    // The operator's mistake: the socket and its directory opened to all.
    std::fs::set_permissions(&s.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(s.socket().parent().unwrap(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(s.socket(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_other_user", "--nocapture", "--test-threads=1", "-q"])
        .env("REMEM_TEST_SOCKET", s.socket())
        .env("REMEM_TEST_UUID", h.uuid())
        .env("REMEM_TEST_BASELINE", h.path().unwrap().canonicalize().unwrap())
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for op in ["reattach", "register"] {
        let line = text.lines().find(|l| l.starts_with(&format!("{op} refused:"))).unwrap_or_default();
        assert!(line.contains("not allowed") && line.contains("uid 65534"), "{op}: {text}");
    }
    // The heap is still held, sealed; its own user gets the memfd back.
    assert_eq!(s.agent.heap_state(&h.uuid()), Some(info::SEALED));
    let r = reg("reattach", &h);
    let (conn, fd) = agent::request(&s.socket(), &r, &[]).unwrap();
    assert!(fd.is_some());
    assert_eq!(s.agent.heap_state(&h.uuid()), Some(info::RUNNING));
    drop(conn); // re-attach abandoned: sealed again
    assert_eq!(s.agent.wait_heap_state(&h.uuid(), info::SEALED, Duration::from_secs(30)), Some(info::SEALED));
}

/// Writes a byte into `pages` fresh 4 KiB blocks after a flush; returns their page indices.
fn dirty_after_flush(heap: &Heap, pages: usize) -> Vec<u64> {
    let blocks: Vec<_> = (0..pages).map(|_| heap.alloc_zeroed(8192).unwrap()).collect();
    heap.flush().unwrap();
    let base = heap.base() as usize;
    let mut out: Vec<u64> = blocks
        .iter()
        .map(|b| {
            // SAFETY: our block of 8192 bytes; the write lands in its second page.
            unsafe { b.as_ptr().add(4096).write(0x5A) };
            ((b.as_ptr() as usize + 4096 - base) / 4096) as u64
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

fn bit(bits: &[u8], p: u64) -> bool {
    bits[(p / 8) as usize] & (1 << (p % 8)) != 0
}

/// Issue 9 §3: the seal runs after the owner is gone and publishes its
/// cursor; in fast mode it finds the pages written after the last flush;
/// precise heaps are sealed from their exact lists with no scan.
#[test]
fn sealing_finds_unflushed_pages_and_precise_heaps_need_no_scan() {
    if is_child() {
        return;
    }
    let s = Setup::new("seal", |o| o);
    for mode in [TrackMode::Fast, TrackMode::Precise] {
        let opts = HeapOptions::new(16 << 20).flush_interval(None).tracking(mode);
        let heap = Heap::create(s.dir.join(format!("{mode:?}")), &opts).unwrap();
        let link = agent::register(&heap, &s.socket()).unwrap();
        let dirty = dirty_after_flush(&heap, 40);
        drop(link);
        let st = s.agent.wait_heap_state(&heap.uuid(), info::SEALED, Duration::from_secs(30));
        assert_eq!(st, Some(info::SEALED), "{mode:?}");
        let mut init = s.connect();
        let block = info_block(&mut *init, &heap.uuid()).unwrap();
        let npages = layout::u64_at(&block, info::NPAGES).unwrap();
        assert_eq!(layout::u64_at(&block, info::SEAL_CURSOR), Some(npages));
        assert_eq!(layout::u64_at(&block, info::DIGEST_READY), Some(0), "no digest unless asked");
        let sealed = layout::region_desc(&block, info::SEALED_MAP).unwrap();
        let bits = read(&mut *init, sealed, 0, sealed.len as usize);
        let crc = layout::region_desc(&block, info::CRC).unwrap();
        let crcs = read(&mut *init, crc, 0, crc.len as usize);
        let memfd = File::from(heap.memfd().try_clone().unwrap());
        for &p in &dirty {
            assert!(bit(&bits, p), "{mode:?}: page {p} written after the flush is not sealed");
            let mut page = vec![0u8; 4096];
            memfd.read_exact_at(&mut page, p * 4096).unwrap();
            let c = u32::from_le_bytes(crcs[4 * p as usize..4 * p as usize + 4].try_into().unwrap());
            assert_eq!(c, crc32fast_hash(&page), "{mode:?}: page {p}'s published CRC");
        }
        let count = layout::u64_at(&block, info::SEALED_PAGES).unwrap();
        assert!(count >= dirty.len() as u64 && count < npages / 2, "{mode:?}: {count} pages sealed");
        if mode == TrackMode::Precise {
            // Exactly the lists: nothing else is listed.
            let listed = (0..npages).filter(|&p| bit(&bits, p)).count() as u64;
            assert_eq!(listed, count);
        }
    }
}

fn crc32fast_hash(b: &[u8]) -> u32 {
    // CRC-32 (IEEE), bitwise: the test does not depend on the crate under test's hasher.
    let mut c = !0u32;
    for &x in b {
        c ^= u32::from(x);
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0xEDB8_8320 } else { c >> 1 };
        }
    }
    !c
}

/// Issue 9 §5's hook: damaged pages are served with other bytes while the
/// crc region holds the true CRC, so a puller's check fails on them only.
#[test]
fn damaged_pages_are_served_wrong_under_their_true_crc() {
    if is_child() {
        return;
    }
    // Page 0 (the heap's header) always holds data.
    let victim = 0;
    let s = Setup::new("damaged", |o| o.damaged_pages(vec![victim]));
    let heap2 = s.heap("b");
    let dirty2 = dirty_after_flush(&heap2, 3);
    let link = agent::register(&heap2, &s.socket()).unwrap();
    drop(link);
    assert_eq!(s.agent.wait_heap_state(&heap2.uuid(), info::SEALED, Duration::from_secs(30)), Some(info::SEALED));
    let mut init = s.connect();
    let block = info_block(&mut *init, &heap2.uuid()).unwrap();
    let (hr, cr) = (layout::region_desc(&block, info::HEAP).unwrap(), layout::region_desc(&block, info::CRC).unwrap());
    let crcs = read(&mut *init, cr, 0, cr.len as usize);
    let memfd = File::from(heap2.memfd().try_clone().unwrap());
    for p in dirty2.iter().copied().chain([victim]) {
        let served = read(&mut *init, hr, p * 4096, 4096);
        let mut truth = vec![0u8; 4096];
        memfd.read_exact_at(&mut truth, p * 4096).unwrap();
        let published = u32::from_le_bytes(crcs[4 * p as usize..4 * p as usize + 4].try_into().unwrap());
        assert_eq!(published, crc32fast_hash(&truth), "page {p}");
        if p == victim {
            assert_ne!(served, truth, "page {p} is served damaged");
            assert_ne!(crc32fast_hash(&served), published);
        } else {
            assert_eq!(served, truth, "page {p}");
        }
    }
}
