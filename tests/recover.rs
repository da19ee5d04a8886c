//! Recovery on "another host" through the agent: a database process runs a
//! transactional workload on a heap with a baseline, registered with an
//! agent; it is killed with SIGKILL; the agent seals the lists; recovery
//! loads the baseline, pulls the dirty pages over TCP, verifies them and
//! commits. Every acknowledged transaction must be present, `check()`
//! clean, and the pulled image identical to the agent's memory. Also: the
//! baseline-only path, and a same-host restart that re-attaches the memfd.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use remem::recovery::agent::{self, dir, info, Agent, AgentOptions};
use remem::recovery::recover::{recover, RecoverError, RecoverOptions};
use remem::recovery::transport::{Kind, ServeOptions, Token};
use remem::{Heap, HeapOptions};

mod common;
use common::{model, root, scatter, tx_step, verify_table};

fn opts() -> HeapOptions {
    HeapOptions::new(32 << 20).flush_interval(Some(Duration::from_millis(20)))
}

/// Child: create the heap, register with the agent, run transactions.
#[test]
fn child_database() {
    let (Ok(path), Ok(socket)) = (std::env::var("REMEM_TEST_BASELINE"), std::env::var("REMEM_TEST_SOCKET")) else {
        return;
    };
    let heap = Heap::create(&path, &opts()).unwrap();
    let _link = agent::register(&heap, Path::new(&socket)).unwrap();
    let root = root(&heap);
    println!("ready");
    loop {
        tx_step(&heap, root);
        // SAFETY: the root is ours.
        println!("ack {}", unsafe { (*root).counter });
    }
}

/// Child: a heap whose data block is dirtied after the last flush at the
/// pages `REMEM_TEST_SCATTER` = "heap_mib,data_pages,stride,offset,precise|fast"
/// names (every `stride`-th page from `offset`), then it waits to be killed.
#[test]
fn child_scatter() {
    let (Ok(path), Ok(socket), Ok(spec)) =
        (std::env::var("REMEM_TEST_BASELINE"), std::env::var("REMEM_TEST_SOCKET"), std::env::var("REMEM_TEST_SCATTER"))
    else {
        return;
    };
    let f: Vec<&str> = spec.split(',').collect();
    let n = |i: usize| f[i].parse::<usize>().unwrap();
    let mode = if f[4] == "precise" { remem::alloc::TrackMode::Precise } else { remem::alloc::TrackMode::Fast };
    let heap = Heap::create(&path, &HeapOptions::new((n(0) as u64) << 20).tracking(mode).flush_interval(None)).unwrap();
    let _link = agent::register(&heap, Path::new(&socket)).unwrap();
    let d = scatter::setup(&heap, n(1)).unwrap();
    scatter::dirty(d, (n(3)..n(1)).step_by(n(2)), 1);
    println!("ready");
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

struct Setup {
    dir: PathBuf,
    baseline: PathBuf,
    agent: Agent,
    token: Token,
}

/// Starts the `child_scatter` database on `s`'s baseline and agent, with
/// `REMEM_TEST_SCATTER` = `spec`.
fn spawn_scatter(s: &Setup, spec: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_scatter", "--nocapture", "--test-threads=1", "-q"])
        .env("REMEM_TEST_BASELINE", &s.baseline)
        .env("REMEM_TEST_SOCKET", s.dir.join("agent").join("agent.sock"))
        .env("REMEM_TEST_SCATTER", spec)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn setup(name: &str) -> Setup {
    let dir = std::env::temp_dir().join(format!("remem-recover-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let token = Token::generate().unwrap();
    let mut serve = ServeOptions::new(token.clone());
    serve.listen = "127.0.0.1:0".parse().unwrap();
    let agent = Agent::start(AgentOptions::new(dir.join("agent").join("agent.sock"), serve).digest(true)).unwrap();
    Setup { baseline: dir.join("heap"), dir, agent, token }
}

/// Runs the database child until it acknowledged some transactions, kills it, returns the last ack.
fn run_and_kill(s: &Setup, wait_ms: u64) -> u64 {
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_database", "--nocapture", "--test-threads=1", "-q"])
        .env("REMEM_TEST_BASELINE", &s.baseline)
        .env("REMEM_TEST_SOCKET", s.dir.join("agent").join("agent.sock"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    common::kill_after(child, "ack ", Duration::from_millis(wait_ms))
}

#[test]
fn sigkill_then_recover_from_the_agent_loses_nothing() {
    if std::env::var("REMEM_TEST_BASELINE").is_ok() {
        return;
    }
    let s = setup("agent");
    let acked = run_and_kill(&s, 150);
    assert_eq!(s.agent.wait_state(info::SEALED, Duration::from_secs(30)), info::SEALED);
    let digest = s.agent.heap_digest().unwrap();
    let mut o = RecoverOptions::new(&s.baseline, Some(s.agent.local_addr()), Some(s.token.clone()));
    o.tracking = remem::alloc::TrackMode::Fast;
    o.verify_image = true;
    let (heap, report) = recover(o).unwrap();
    assert!(report.pages_pulled > 0, "{report:?}");
    assert_eq!(report.pages_verified, report.pages_pulled);
    assert_eq!(report.image_identical, Some(true));
    let _ = digest;
    let (counter, versions) = verify_table(&heap, 1);
    assert!(counter >= acked, "acknowledged transactions lost: {counter} < {acked}");
    assert!(counter <= acked + 1);
    assert_eq!(versions, model(counter));
    heap.close().unwrap();
    // The committed recovery is what the database opens next.
    let heap = Heap::open(&s.baseline).unwrap();
    let (again, _) = verify_table(&heap, 0);
    assert_eq!(again, counter);
    eprintln!("recovered {counter} transactions (acked {acked}): {report:?}");
}

/// Kills a `child_scatter` database (see there for `spec`), recovers it and
/// checks every page of its data; returns the recovery's report.
fn scatter_case(
    name: &str,
    heap_mib: usize,
    data_pages: usize,
    stride: usize,
    offset: usize,
    mode: &str,
    lazy: bool,
) -> remem::recovery::recover::RecoverReport {
    let s = setup(name);
    let child = spawn_scatter(&s, &format!("{heap_mib},{data_pages},{stride},{offset},{mode}"));
    common::kill_after(child, "ack ", Duration::ZERO);
    assert_eq!(s.agent.wait_state(info::SEALED, Duration::from_secs(120)), info::SEALED);
    let mut o = RecoverOptions::new(&s.baseline, Some(s.agent.local_addr()), Some(s.token.clone()));
    o.lazy = lazy;
    let (heap, report) = recover(o).unwrap();
    let dirty = data_pages.saturating_sub(offset).div_ceil(stride) as u64;
    assert!(report.pages_pulled >= dirty, "{dirty} data pages dirtied: {report:?}");
    if !lazy {
        assert_eq!(report.pages_verified, report.pages_pulled);
        assert_eq!(report.retries, 0, "{report:?}");
    }
    let d = scatter::find(&heap, data_pages).unwrap();
    let round = |p: usize| u64::from(p >= offset && (p - offset).is_multiple_of(stride));
    // Four threads read their quarters at once (concurrent first touches, when lazy).
    let quarter = data_pages.div_ceil(4);
    let base = d.base.as_ptr() as usize;
    std::thread::scope(|sc| {
        for t in 0..4 {
            sc.spawn(move || {
                let first = (t * quarter).min(data_pages);
                let pages = quarter.min(data_pages - first);
                let part =
                    scatter::Data { base: std::ptr::NonNull::new((base + first * 4096) as *mut u8).unwrap(), pages };
                scatter::verify_from(part, first, round).unwrap();
            });
        }
    });
    if lazy {
        let st = heap.wait_lazy().unwrap();
        assert!(st.failed.is_none() && st.poisoned == 0, "{st:?}");
        assert!(st.committed_epoch.is_some(), "{st:?}");
    }
    heap.close().unwrap();
    // What was committed is what the database opens next.
    let heap = Heap::open(&s.baseline).unwrap();
    scatter::verify(scatter::find(&heap, data_pages).unwrap(), round).unwrap();
    heap.close().unwrap();
    let _ = std::fs::remove_dir_all(&s.dir);
    report
}

/// Issue 9: a pull of more scattered pages than the transport's depth
/// (2048) failed. Here ≥ 100 000 scattered pages (every other page of the
/// data), fast tracking (the agent's seal finds them).
/// `REMEM_TEST_SCATTER_MIB` sets the heap size (default 1024).
#[test]
fn a_hundred_thousand_scattered_dirty_pages_are_pulled() {
    if std::env::var("REMEM_TEST_BASELINE").is_ok() {
        return;
    }
    let mib: usize = std::env::var("REMEM_TEST_SCATTER_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(1024);
    let data_pages = (mib << 20) / 4096 * 7 / 8;
    let r = scatter_case("scatter", mib, data_pages, 2, 1, "fast", false);
    eprintln!("scattered: {r:?}");
}

/// Every page of the data dirty, precise tracking (the lists are exact).
#[test]
fn every_page_dirty_is_pulled() {
    if std::env::var("REMEM_TEST_BASELINE").is_ok() {
        return;
    }
    let r = scatter_case("alldirty", 64, 14_000, 1, 0, "precise", false);
    assert!(r.pages_pulled >= 14_000);
}

/// Lazy recovery (issue 9 §2): the heap opens before its pages are in;
/// four threads touch scattered dirty pages and clean ones at once; every
/// page is right, and once every page is in, the recovered state is
/// committed and is what the next open finds.
#[test]
fn lazy_recovery_serves_concurrent_first_touches() {
    if std::env::var("REMEM_TEST_BASELINE").is_ok() {
        return;
    }
    let r = scatter_case("lazy", 128, 24_000, 3, 1, "fast", true);
    assert!(r.lazy, "{r:?}");
}

#[test]
fn without_the_agent_only_when_data_loss_is_allowed() {
    if std::env::var("REMEM_TEST_BASELINE").is_ok() {
        return;
    }
    let s = setup("noagent");
    run_and_kill(&s, 100);
    // An agent address where none listens.
    let dead: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let e = recover(RecoverOptions::new(&s.baseline, Some(dead), Some(s.token.clone()))).unwrap_err();
    assert!(matches!(e, RecoverError::AgentUnreachable { .. }), "{e}");
    assert!(e.to_string().contains("--allow-data-loss"), "{e}");
    let e = recover(RecoverOptions::new(&s.baseline, None, None)).unwrap_err();
    assert!(matches!(e, RecoverError::NoAgent), "{e}");
    let mut o = RecoverOptions::new(&s.baseline, Some(dead), Some(s.token.clone()));
    o.allow_data_loss = true;
    let (heap, report) = recover(o).unwrap();
    assert!(report.baseline_only && report.pages_pulled == 0);
    assert!(report.rpo_seconds > 0.0, "the report says how old the baseline was: {report:?}");
    let (counter, versions) = verify_table(&heap, 1);
    assert_eq!(versions, model(counter), "transaction-consistent as of the last flush");
}

#[test]
fn same_host_restart_reattaches_the_memfd() {
    if std::env::var("REMEM_TEST_BASELINE").is_ok() {
        return;
    }
    let s = setup("reattach");
    let acked = run_and_kill(&s, 100);
    assert_eq!(s.agent.wait_state(info::SEALED, Duration::from_secs(30)), info::SEALED);
    let (heap, link) = agent::reattach(&s.dir.join("agent").join("agent.sock"), &s.baseline, &opts()).unwrap();
    assert_eq!(s.agent.wait_state(info::RUNNING, Duration::from_secs(10)), info::RUNNING);
    let (counter, versions) = verify_table(&heap, 1);
    assert!(counter >= acked && counter <= acked + 1, "{counter} vs {acked}");
    assert_eq!(versions, model(counter));
    // Keep working, then close cleanly: everything is in the baseline.
    let r = root(&heap);
    for _ in 0..100 {
        tx_step(&heap, r);
    }
    heap.close().unwrap();
    link.closed().unwrap();
    assert_eq!(s.agent.wait_state(info::CLOSED, Duration::from_secs(10)), info::CLOSED);
    let heap = Heap::open(&s.baseline).unwrap();
    assert_eq!(verify_table(&heap, 0).0, counter + 100);
}

#[test]
fn a_fenced_owner_can_no_longer_commit() {
    if std::env::var("REMEM_TEST_BASELINE").is_ok() {
        return;
    }
    use remem::alloc::baseline::{Baseline, FileBackend};
    let dir = std::env::temp_dir().join(format!("remem-fence-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("heap");
    let heap = Heap::create(&path, &HeapOptions::new(8 << 20).flush_interval(None)).unwrap();
    let p = heap.alloc(64).unwrap();
    heap.flush().unwrap();
    // A failover host fences the baseline.
    let mut other = Baseline::open(FileBackend::open(&path).unwrap()).unwrap();
    let g = other.info().generation;
    other.fence(g + 1).unwrap();
    // SAFETY: our block.
    unsafe { p.as_ptr().write(1) };
    let e = heap.flush().unwrap_err();
    assert!(e.to_string().to_lowercase().contains("fence"), "{e}");
    assert!(matches!(heap.flush(), Err(remem::alloc::FlushError::Poisoned(_))));
}

/// The generation in a baseline (what a fence bumps).
fn generation(path: &Path) -> u64 {
    use remem::alloc::baseline::{Baseline, FileBackend};
    Baseline::open(FileBackend::open(path).unwrap()).unwrap().info().generation
}

/// A baseline of a small closed heap, in a fresh directory.
fn closed_heap(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("remem-recover-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("heap");
    let heap = Heap::create(&path, &HeapOptions::new(8 << 20).flush_interval(None)).unwrap();
    heap.alloc(64).unwrap();
    heap.close().unwrap();
    (dir, path)
}

/// Issue 10 item 2: a lying agent (here a bare transport target serving a
/// crafted info block: a 16-byte control region, offsets that wrap, short
/// CRC tables, another page count) makes recovery fail with a protocol
/// error, without a panic and before anything is fenced.
#[test]
fn a_lying_agent_is_refused_before_the_fence() {
    if std::env::var("REMEM_TEST_BASELINE").is_ok() {
        return;
    }
    use remem::recovery::transport::{serve, SharedBytes};
    use std::sync::Arc;
    let (dir, path) = closed_heap("liar");
    let (uuid, npages) = {
        use remem::alloc::baseline::{Baseline, FileBackend};
        let b = Baseline::open(FileBackend::open(&path).unwrap()).unwrap();
        (b.uuid(), b.npages())
    };
    let g0 = generation(&path);
    let words = npages.div_ceil(64) as usize;
    let good_ctl = 4096 + 2 * (words * 8).next_multiple_of(4096);
    // (what is wrong, control length, current set offset, crc length, npages announced, heap length)
    let cases: Vec<(&str, usize, u64, usize, u64, usize)> = vec![
        ("16-byte control region", 16, 4096, npages as usize * 4, npages, npages as usize * 4096),
        ("set offset that wraps", good_ctl, u64::MAX - 7, npages as usize * 4, npages, npages as usize * 4096),
        ("set offset past the end", good_ctl, good_ctl as u64, npages as usize * 4, npages, npages as usize * 4096),
        ("short CRC table", good_ctl, 4096, 8, npages, npages as usize * 4096),
        ("other page count", good_ctl, 4096, npages as usize * 4, npages * 2, npages as usize * 4096),
        ("short heap region", good_ctl, 4096, npages as usize * 4, npages, 4096),
        ("huge page count", good_ctl, 4096, npages as usize * 4, u64::MAX, npages as usize * 4096),
    ];
    for (what, ctl_len, cur, crc_len, announced, heap_len) in cases {
        let token = Token::generate().unwrap();
        let mut so = ServeOptions::new(token.clone());
        so.listen = "127.0.0.1:0".parse().unwrap();
        let target = serve(Kind::Tcp, so).unwrap();
        // A directory of one slot, as the agent publishes it.
        let block = Arc::new(SharedBytes::zeroed(dir::len(1)));
        target.register(block.clone()).unwrap();
        let ctl = Arc::new(SharedBytes::zeroed(ctl_len));
        ctl.write(remem::alloc::ctl::CURRENT_OFF, &cur.to_le_bytes());
        ctl.write(remem::alloc::ctl::CLOSING_OFF, &4096u64.to_le_bytes());
        let regions = [
            target.register(Arc::new(SharedBytes::zeroed(heap_len))).unwrap(),
            target.register(ctl).unwrap(),
            target.register(Arc::new(SharedBytes::zeroed(crc_len))).unwrap(),
            target.register(Arc::new(SharedBytes::zeroed(words * 8))).unwrap(),
        ];
        let at = write_directory(&block, uuid, announced, &regions);
        block.write(at + info::STATE, &info::SEALED.to_le_bytes());
        let mut o = RecoverOptions::new(&path, Some(target.local_addr()), Some(token));
        o.allow_data_loss = true;
        let e = recover(o).unwrap_err();
        assert!(matches!(e, RecoverError::Protocol(_)), "{what}: {e}");
        assert_eq!(generation(&path), g0, "{what}: nothing may be fenced before the agent's answer is checked");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 10 item 8: a wrong token is an authentication failure, never
/// "unreachable", even with `allow_data_loss`; nothing is fenced.
#[test]
fn a_wrong_token_is_not_an_unreachable_agent() {
    if std::env::var("REMEM_TEST_BASELINE").is_ok() {
        return;
    }
    let s = setup("wrongtoken");
    run_and_kill(&s, 50);
    let g0 = generation(&s.baseline);
    let mut o = RecoverOptions::new(&s.baseline, Some(s.agent.local_addr()), Some(Token::generate().unwrap()));
    o.allow_data_loss = true;
    let e = recover(o).unwrap_err();
    assert!(matches!(e, RecoverError::AgentRefused { .. }), "{e}");
    assert_eq!(generation(&s.baseline), g0);
}

/// Issue 10 item 9: the lock is taken before the fence: a recovery against
/// the baseline of a live database (or a second recovery) is refused and
/// fences nothing; the database keeps flushing.
#[test]
fn recovery_of_a_locked_baseline_fences_nothing() {
    if std::env::var("REMEM_TEST_BASELINE").is_ok() {
        return;
    }
    let (dir, path) = closed_heap("locked");
    let heap = Heap::open_with(&path, &HeapOptions::new(0).flush_interval(None)).unwrap();
    let g0 = generation(&path);
    let mut o = RecoverOptions::new(&path, None, None);
    o.allow_data_loss = true;
    let e = recover(o).unwrap_err();
    assert!(e.to_string().contains("holds its lock"), "{e}");
    assert_eq!(generation(&path), g0);
    let p = heap.alloc(64).unwrap();
    // SAFETY: our block.
    unsafe { p.as_ptr().write(7) };
    heap.flush().unwrap();
    heap.close().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Child: a database that runs transactions and flushes every 50 of them;
/// a failed flush is printed (`flusherr ...`) and ends its work.
/// `REMEM_TEST_HUNG` names the tracking mode.
#[test]
fn child_hung_database() {
    let (Ok(path), Ok(socket), Ok(mode)) =
        (std::env::var("REMEM_TEST_BASELINE"), std::env::var("REMEM_TEST_SOCKET"), std::env::var("REMEM_TEST_HUNG"))
    else {
        return;
    };
    let mode = if mode == "precise" { remem::alloc::TrackMode::Precise } else { remem::alloc::TrackMode::Fast };
    let heap = Heap::create(&path, &opts().tracking(mode)).unwrap();
    let _link = agent::register(&heap, Path::new(&socket)).unwrap();
    let root = root(&heap);
    println!("ready");
    loop {
        tx_step(&heap, root);
        // SAFETY: the root is ours.
        let n = unsafe { (*root).counter };
        println!("ack {n}");
        if n % 50 == 0 {
            if let Err(e) = heap.flush() {
                println!("flusherr {e}");
                break;
            }
        }
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A `child_hung_database` and its output lines.
struct HungChild {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl HungChild {
    fn start(s: &Setup, mode: &str) -> HungChild {
        use std::io::BufRead;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_hung_database", "--nocapture", "--test-threads=1", "-q"])
            .env("REMEM_TEST_BASELINE", &s.baseline)
            .env("REMEM_TEST_SOCKET", s.dir.join("agent").join("agent.sock"))
            .env("REMEM_TEST_HUNG", mode)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        let c = HungChild { child, lines };
        while c.lines.recv_timeout(Duration::from_secs(60)).unwrap() != "ready" {}
        c
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Lets it run for `ms`, stops it with SIGSTOP, returns its last ack.
    fn run_then_stop(&self, ms: u64) -> u64 {
        std::thread::sleep(Duration::from_millis(ms));
        self.signal(libc::SIGSTOP);
        let mut last = 0;
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(300)) {
            if let Some(n) = l.strip_prefix("ack ") {
                last = n.parse().unwrap();
            }
        }
        last
    }
}

impl Drop for HungChild {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Issue 9 §4 (F2): the owner is hung (SIGSTOP) while its agent keeps
/// serving. Precise mode: recovery finds the lease expired, fences the
/// owner and recovers from its lists without a seal, losing nothing; once
/// resumed (SIGCONT), the old owner's flushes fail with a fence error and
/// the recovered baseline is untouched.
#[test]
fn a_hung_owner_is_fenced_and_recovered_from_its_precise_lists() {
    if std::env::var("REMEM_TEST_BASELINE").is_ok() {
        return;
    }
    let s = setup("hung");
    let c = HungChild::start(&s, "precise");
    let acked = c.run_then_stop(300);
    assert!(acked > 0);
    assert_eq!(s.agent.state(), info::RUNNING, "the agent still serves the stopped owner");
    // A descriptor of the baseline as the owner holds it: the owner may
    // have been stopped between a fence check and a write.
    let owners_fd = std::fs::OpenOptions::new().write(true).open(&s.baseline).unwrap();
    let mut o = RecoverOptions::new(&s.baseline, Some(s.agent.local_addr()), Some(s.token.clone()));
    o.wait_sealed = Duration::from_secs(5);
    let (heap, report) = recover(o).unwrap();
    assert!(report.owner_hung, "{report:?}");
    let (counter, versions) = verify_table(&heap, 1);
    assert!(counter >= acked && counter <= acked + 1, "{counter} vs acked {acked}");
    assert_eq!(versions, model(counter));
    heap.close().unwrap();
    // The old owner wakes up: its next flush is refused.
    c.signal(libc::SIGCONT);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let err = loop {
        let l = c.lines.recv_timeout(Duration::from_secs(30)).expect("the resumed owner says its flush failed");
        if let Some(e) = l.strip_prefix("flusherr ") {
            break e.to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "no failed flush");
    };
    assert!(err.to_lowercase().contains("fence"), "{err}");
    drop(c);
    // Whatever the owner wrote through its descriptors after it resumed,
    // even past every fence check (it may have been stopped between a check
    // and a write), reached only the inode it had open, which no longer is
    // the baseline.
    {
        use std::os::unix::fs::FileExt;
        let len = owners_fd.metadata().unwrap().len();
        for at in (0..len).step_by(1 << 20) {
            owners_fd.write_all_at(&[0xa5; 4096], at).unwrap();
        }
        drop(owners_fd);
    }
    // The baseline holds the recovery, not the old owner's later work.
    let heap = Heap::open(&s.baseline).unwrap();
    assert_eq!(verify_table(&heap, 0).0, counter);
    heap.close().unwrap();
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// F2 in fast mode: the hung owner's newest pages are known only to it, so
/// recovery refuses (nothing fenced) unless data loss is allowed.
#[test]
fn a_hung_owner_in_fast_mode_is_refused_unless_data_loss_is_allowed() {
    if std::env::var("REMEM_TEST_BASELINE").is_ok() {
        return;
    }
    let s = setup("hungfast");
    let c = HungChild::start(&s, "fast");
    c.run_then_stop(200);
    let g0 = generation(&s.baseline);
    let mut o = RecoverOptions::new(&s.baseline, Some(s.agent.local_addr()), Some(s.token.clone()));
    o.wait_sealed = Duration::from_secs(1);
    let e = recover(o).unwrap_err();
    assert!(matches!(e, RecoverError::OwnerHung), "{e}");
    assert!(e.to_string().contains("--allow-data-loss"), "{e}");
    assert_eq!(generation(&s.baseline), g0, "nothing fenced");
    let mut o = RecoverOptions::new(&s.baseline, Some(s.agent.local_addr()), Some(s.token.clone()));
    o.wait_sealed = Duration::from_secs(1);
    o.allow_data_loss = true;
    let (heap, report) = recover(o).unwrap();
    assert!(report.owner_hung && report.baseline_only && report.pages_pulled == 0, "{report:?}");
    let (counter, versions) = verify_table(&heap, 1);
    assert_eq!(versions, model(counter), "consistent as of the last flush");
    heap.close().unwrap();
    drop(c);
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// Child: a recovery (`recover()`) of `REMEM_TEST_BASELINE` from the agent
/// at `REMEM_TEST_RECOVER_ADDR` with the token `REMEM_TEST_RECOVER_TOKEN` (hex).
#[test]
fn child_recover() {
    let (Ok(path), Ok(addr), Ok(token)) = (
        std::env::var("REMEM_TEST_BASELINE"),
        std::env::var("REMEM_TEST_RECOVER_ADDR"),
        std::env::var("REMEM_TEST_RECOVER_TOKEN"),
    ) else {
        return;
    };
    let token = Token::from_hex(&token, "test").unwrap();
    let mut o = RecoverOptions::new(&path, Some(addr.parse().unwrap()), Some(token));
    o.lazy = std::env::var("REMEM_TEST_RECOVER_LAZY").is_ok();
    let (heap, _) = recover(o).unwrap();
    if let Some(st) = heap.wait_lazy() {
        assert!(st.failed.is_none(), "{st:?}");
    }
    heap.close().unwrap();
    println!("recovered");
}

/// Issue 9 §5: a recovery killed (SIGKILL) in the middle of its pull
/// (eager), or of its prefetch (lazy), resumes from its resume file
/// (`<baseline>.recovering`) when run again: it pulls fewer pages, and the
/// heap is whole.
#[test]
fn a_killed_recovery_resumes_where_it_stopped() {
    if std::env::var("REMEM_TEST_BASELINE").is_ok() {
        return;
    }
    for lazy in [false, true] {
        killed_recovery_resumes(lazy);
    }
}

fn killed_recovery_resumes(lazy: bool) {
    let s = setup(if lazy { "resume-lazy" } else { "resume" });
    let data_pages = 50_000;
    let child = spawn_scatter(&s, &format!("256,{data_pages},1,0,fast"));
    common::kill_after(child, "ack ", Duration::ZERO);
    assert_eq!(s.agent.wait_state(info::SEALED, Duration::from_secs(120)), info::SEALED);
    // The first recovery, in a child process, killed once its resume file holds some pages.
    let resume = remem::recovery::recover::resume::path_of(&s.baseline);
    let mut first = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_recover", "--nocapture", "--test-threads=1", "-q"])
        .env("REMEM_TEST_BASELINE", &s.baseline)
        .env("REMEM_TEST_RECOVER_ADDR", s.agent.local_addr().to_string())
        .env("REMEM_TEST_RECOVER_TOKEN", s.token.to_hex().as_str())
        .envs(lazy.then_some(("REMEM_TEST_RECOVER_LAZY", "1")))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while std::fs::metadata(&resume).map_or(0, |m| m.len()) < 20 << 20 {
        assert!(first.try_wait().unwrap().is_none(), "the first recovery ended before it could be killed");
        assert!(std::time::Instant::now() < deadline, "no resume file grew");
        std::thread::sleep(Duration::from_millis(2));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let mut o = RecoverOptions::new(&s.baseline, Some(s.agent.local_addr()), Some(s.token.clone()));
    o.lazy = lazy;
    let (heap, report) = recover(o).unwrap();
    assert!(report.pages_resumed >= 4_000, "lazy {lazy}: {report:?}");
    assert!(report.pages_pulled + report.pages_resumed >= data_pages as u64, "lazy {lazy}: {report:?}");
    assert!(report.pages_pulled < data_pages as u64, "fewer pages pulled the second time: {report:?}");
    let d = scatter::find(&heap, data_pages).unwrap();
    if let Some(st) = heap.wait_lazy() {
        assert!(st.failed.is_none() && st.poisoned == 0 && st.committed_epoch.is_some(), "{st:?}");
        // Removed once the commit is durable, just after `wait_lazy` returns.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while resume.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    scatter::verify(d, |_| 1).unwrap();
    heap.close().unwrap();
    assert!(!resume.exists(), "lazy {lazy}: the resume file is removed once the recovery is committed");
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// Issue 9 §5: a page the agent cannot serve correctly (its hook serves it
/// damaged under its true CRC). Eager recovery refuses, with nothing
/// committed; lazy recovery poisons that page alone, reports it, and does
/// not commit, while a damaged page the lists call clean comes from the
/// baseline and every other page is intact.
#[test]
fn a_page_the_agent_cannot_serve_is_refused_eagerly_and_poisoned_lazily() {
    if std::env::var("REMEM_TEST_BASELINE").is_ok() {
        return;
    }
    let (heap_mib, data_pages) = (32usize, 2000usize);
    // Where the child's data block will be: the same allocations on a
    // fresh heap of the same size land at the same pages.
    let dir = std::env::temp_dir().join(format!("remem-recover-{}-poisonprobe", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let probe = Heap::create(
        dir.join("probe"),
        &HeapOptions::new((heap_mib as u64) << 20).tracking(remem::alloc::TrackMode::Fast).flush_interval(None),
    )
    .unwrap();
    let d = scatter::setup(&probe, data_pages).unwrap();
    let block = (d.base.as_ptr() as u64 - probe.base() as u64) / 4096;
    probe.close().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    // Data page 100 is dirtied (every other page from 0), 101 is not.
    let (dirty_victim, clean_victim) = (block + 100, block + 101);

    let s = {
        let dir = std::env::temp_dir().join(format!("remem-recover-{}-poison", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let token = Token::generate().unwrap();
        let mut serve = ServeOptions::new(token.clone());
        serve.listen = "127.0.0.1:0".parse().unwrap();
        let o = AgentOptions::new(dir.join("agent").join("agent.sock"), serve)
            .damaged_pages(vec![dirty_victim, clean_victim]);
        Setup { baseline: dir.join("heap"), agent: Agent::start(o).unwrap(), dir, token }
    };
    let child = spawn_scatter(&s, &format!("{heap_mib},{data_pages},2,0,fast"));
    common::kill_after(child, "ready", Duration::ZERO);
    assert_eq!(s.agent.wait_state(info::SEALED, Duration::from_secs(60)), info::SEALED);
    let epoch = || {
        use remem::alloc::baseline::{Baseline, FileBackend};
        Baseline::open(FileBackend::open_read_only(&s.baseline).unwrap()).unwrap().info().epoch
    };
    let before = epoch();

    let e = recover(RecoverOptions::new(&s.baseline, Some(s.agent.local_addr()), Some(s.token.clone())))
        .expect_err("an eager recovery with a page that fails its CRC");
    assert!(e.to_string().contains("do not match the agent's CRC"), "{e}");
    assert!(e.to_string().contains(&format!("page {dirty_victim}")), "{e}");
    assert_eq!(epoch(), before, "nothing committed");

    let mut o = RecoverOptions::new(&s.baseline, Some(s.agent.local_addr()), Some(s.token.clone()));
    o.lazy = true;
    let (heap, _) = recover(o).unwrap();
    let st = heap.wait_lazy().unwrap();
    assert_eq!((st.poisoned, st.poisoned_pages.clone()), (1, vec![dirty_victim]), "{st:?}");
    assert!(st.failed.is_some() && st.committed_epoch.is_none(), "a poisoned heap is not committed: {st:?}");
    let d = scatter::find(&heap, data_pages).unwrap();
    let round = |p: usize| u64::from(p.is_multiple_of(2));
    // Every page but the poisoned one (touching it would raise SIGBUS:
    // tests/lazy.rs checks that), the damaged clean one included.
    let first = scatter::Data { base: d.base, pages: 100 };
    scatter::verify_from(first, 0, round).unwrap();
    // SAFETY: data page 101 onward lie inside the data block.
    let rest = scatter::Data { base: unsafe { d.base.add(101 * 4096) }, pages: data_pages - 101 };
    scatter::verify_from(rest, 101, round).unwrap();
    drop(heap);
    assert_eq!(epoch(), before, "a poisoned heap is never committed");
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// Issue 9 §3: a lazy recovery of a fast-mode heap does not wait for the
/// agent's seal (a whole pass over the dead owner's memory, seconds on a
/// large heap; here slowed by a pause after every chunk). It starts while
/// the agent is still sealing, takes every page the seal has not covered
/// from the agent, follows the seal to take the clean pages from the
/// baseline, and ends with every page right: the dirty ones before and
/// beyond the cursor it started at, and the clean ones.
#[test]
fn a_lazy_recovery_starts_while_the_agent_seals_and_follows_the_seal() {
    if std::env::var("REMEM_TEST_BASELINE").is_ok() {
        return;
    }
    let _serial = FOLLOWERS.lock().unwrap_or_else(|e| e.into_inner());
    // A seal far slower than the load (the recovery is open and loaded long
    // before it ends), then one about as fast (the seal's progress takes
    // pages off the agent while the prefetcher runs).
    for pause_ms in [200u64, 15] {
        lazy_recovery_during_the_seal(pause_ms);
    }
}

fn lazy_recovery_during_the_seal(pause_ms: u64) {
    let (heap_mib, data_pages) = (64usize, 9000usize);
    let s = {
        let dir = std::env::temp_dir().join(format!("remem-recover-{}-sealing-{pause_ms}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let token = Token::generate().unwrap();
        let mut serve = ServeOptions::new(token.clone());
        serve.listen = "127.0.0.1:0".parse().unwrap();
        // 16 chunks of 1024 pages.
        let o =
            AgentOptions::new(dir.join("agent").join("agent.sock"), serve).seal_pause(Duration::from_millis(pause_ms));
        Setup { baseline: dir.join("heap"), agent: Agent::start(o).unwrap(), dir, token }
    };
    let child = spawn_scatter(&s, &format!("{heap_mib},{data_pages},3,1,fast"));
    common::kill_after(child, "ready", Duration::ZERO);
    assert_eq!(s.agent.wait_state(info::SEALING, Duration::from_secs(60)), info::SEALING);
    let mut o = RecoverOptions::new(&s.baseline, Some(s.agent.local_addr()), Some(s.token.clone()));
    o.lazy = true;
    let (heap, report) = recover(o).unwrap();
    if pause_ms >= 200 {
        assert_eq!(s.agent.state(), info::SEALING, "the recovery waited for the seal");
        // The seal had covered nothing yet (it pauses before each chunk):
        // the heap's metadata came from the agent, pulled while the
        // baseline was opened.
        assert!(report.pages_early > 0, "no metadata pages pulled early: {report:?}");
    }
    assert!(report.lazy && !report.baseline_only, "{report:?}");
    let round = |p: usize| u64::from(p % 3 == 1);
    let d = scatter::find(&heap, data_pages).unwrap();
    scatter::verify(d, round).unwrap();
    let st = heap.wait_lazy().unwrap();
    assert!(st.failed.is_none() && st.poisoned == 0, "{st:?}");
    let epoch = st.committed_epoch.expect("the recovered state is committed");
    heap.wait_durable(epoch).unwrap();
    scatter::verify(d, round).unwrap();
    heap.close().unwrap();
    // What was committed is the recovered state.
    let again = Heap::open_with(&s.baseline, &HeapOptions::new(0).flush_interval(None)).unwrap();
    scatter::verify(scatter::find(&again, data_pages).unwrap(), round).unwrap();
    again.close().unwrap();
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// Serializes the tests that count follower threads or panics process-wide.
static FOLLOWERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// CRC-32 (IEEE, as crc32fast), bit by bit.
fn crc32_of(d: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in d {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0xEDB8_8320 } else { c >> 1 };
        }
    }
    !c
}

/// Sets `page[at..at + 4]` so that the page's CRC-32 is 0 (CRC is affine in
/// the message bits: solve the 32x32 system over GF(2)).
fn forge_crc_zero(page: &mut [u8], at: usize) {
    page[at..at + 4].fill(0);
    let base = crc32_of(page);
    let mut basis: Vec<(u32, u32)> = Vec::new();
    for i in 0..32 {
        page[at + i / 8] = 1 << (i % 8);
        let mut v = crc32_of(page) ^ base;
        page[at + i / 8] = 0;
        let mut m = 1u32 << i;
        for &(bv, bm) in &basis {
            if v ^ bv < v {
                v ^= bv;
                m ^= bm;
            }
        }
        if v != 0 {
            basis.push((v, m));
            basis.sort_by_key(|b| std::cmp::Reverse(b.0));
        }
    }
    let (mut t, mut combo) = (base, 0u32);
    for &(bv, bm) in &basis {
        if t ^ bv < t {
            t ^= bv;
            combo ^= bm;
        }
    }
    assert_eq!(t, 0, "no solution");
    for i in 0..32 {
        if combo & (1 << i) != 0 {
            page[at + i / 8] |= 1 << (i % 8);
        }
    }
    assert_eq!(crc32_of(page), 0);
}

/// A precise-mode seal computes CRCs only for the pages its lists name (the
/// agent's CRC table holds 0 elsewhere). A lazy recovery's resume layer
/// claims only records of pages the agent claims, so a record left by an
/// older recovery (or planted) for an unlisted page, even one whose CRC is
/// 0, is never served in place of the baseline's page.
#[test]
fn a_resume_record_for_a_page_the_agent_does_not_list_is_never_served() {
    if std::env::var("REMEM_TEST_BASELINE").is_ok() {
        return;
    }
    let s = setup("precise-resume");
    let (data_pages, stride) = (64usize, 8usize);
    let child = spawn_scatter(&s, &format!("32,{data_pages},{stride},0,precise"));
    common::kill_after(child, "ready", Duration::ZERO);
    assert_eq!(s.agent.wait_state(info::SEALED, Duration::from_secs(60)), info::SEALED);
    // Where the data block lies, from a copy of the baseline.
    let copy = s.dir.join("copy");
    std::fs::copy(&s.baseline, &copy).unwrap();
    let (first, uuid, npages) = {
        let bl =
            remem::alloc::baseline::Baseline::open(remem::alloc::baseline::FileBackend::open(&copy).unwrap()).unwrap();
        let (uuid, npages) = (bl.uuid(), bl.npages());
        drop(bl);
        let heap = Heap::open_with(&copy, &HeapOptions::new(0).flush_interval(None)).unwrap();
        let first = heap.offset_of(heap.root().unwrap().as_ptr()).unwrap() as u64 / 4096;
        heap.close().unwrap();
        (first, uuid, npages)
    };
    // A resume file with records of CRC 0 for data pages 1..stride (unlisted:
    // the baseline's round 0 is current).
    let resume_path = remem::recovery::recover::resume::path_of(&s.baseline);
    {
        let mut f = remem::recovery::recover::resume::ResumeFile::open(&resume_path, &uuid, npages).unwrap();
        for k in 1..stride as u64 {
            let mut page = vec![0xEEu8; 4096];
            page[..8].copy_from_slice(&k.to_le_bytes());
            page[8..16].copy_from_slice(&99u64.to_le_bytes());
            forge_crc_zero(&mut page, 100);
            f.append(first + k, 0, &page).unwrap();
        }
        f.sync().unwrap();
    }
    let mut o = RecoverOptions::new(&s.baseline, Some(s.agent.local_addr()), Some(s.token.clone()));
    o.lazy = true;
    let (heap, report) = recover(o).unwrap();
    eprintln!("report: {report:?}");
    let round = |p: usize| u64::from(p.is_multiple_of(stride));
    let d = scatter::find(&heap, data_pages).unwrap();
    let got = scatter::verify(d, round);
    let st = heap.wait_lazy().unwrap();
    heap.close().unwrap();
    // What the baseline now holds (the commit of the recovered state).
    let again = Heap::open_with(&s.baseline, &HeapOptions::new(0).flush_interval(None)).unwrap();
    let committed = scatter::verify(scatter::find(&again, data_pages).unwrap(), round);
    again.close().unwrap();
    let _ = std::fs::remove_dir_all(&s.dir);
    assert!(
        report.pages_resumed == 0 && got.is_ok() && committed.is_ok(),
        "records for pages the agent does not list were resumed ({}); recovered data: {got:?}; committed: {committed:?}",
        report.pages_resumed
    );
    assert!(st.failed.is_none(), "{st:?}");
}

/// A bare transport target serving a crafted agent directory for the heap
/// at `path` (a hostile or buggy agent): one slot whose heap region holds
/// the baseline's image, an empty control region, the image's CRCs and a
/// zero sealed bitmap, after `tweak(image, crc bytes, sealed bits)`. The
/// slot's state, cursor and `assigned` are the test's to write.
struct CraftedAgent {
    target: Box<dyn remem::recovery::transport::Target>,
    token: Token,
    block: std::sync::Arc<remem::recovery::transport::SharedBytes>,
    at: usize,
    sealed: std::sync::Arc<remem::recovery::transport::SharedBytes>,
    npages: u64,
    words: usize,
}

/// Writes a directory of one slot into `block`, as the agent publishes it:
/// the heap `uuid` of `npages` pages and its four regions (heap, control,
/// crc, sealed). Returns the slot's offset.
fn write_directory(
    block: &remem::recovery::transport::SharedBytes,
    uuid: [u8; 16],
    npages: u64,
    regions: &[remem::recovery::transport::RegionDesc],
) -> usize {
    block.write(dir::MAGIC, &dir::MAGIC_BYTES);
    block.write(dir::VERSION, &dir::CURRENT_VERSION.to_le_bytes());
    block.write(dir::SLOTS, &1u32.to_le_bytes());
    let at = dir::slot_offset(0);
    block.write(at + info::MAGIC, &info::MAGIC_BYTES);
    block.write(at + info::VERSION, &info::CURRENT_VERSION.to_le_bytes());
    block.write(at + info::UUID, &uuid);
    block.write(at + info::NPAGES, &npages.to_le_bytes());
    for (n, r) in regions.iter().enumerate() {
        let d = at + info::region(n);
        block.write(d, &r.addr.to_le_bytes());
        block.write(d + 8, &r.len.to_le_bytes());
        block.write(d + 16, &r.rkey.to_le_bytes());
    }
    at
}

fn crafted_agent(path: &Path, tweak: impl FnOnce(&mut [u8], &mut [u8], &mut [u8])) -> CraftedAgent {
    use remem::alloc::baseline::{Baseline, FileBackend};
    use remem::alloc::source::{BaselineSource, PageRead, PageSource};
    use remem::recovery::transport::{serve, SharedBytes};
    use std::sync::Arc;
    let b = Baseline::open(FileBackend::open(path).unwrap()).unwrap();
    let (uuid, npages) = (b.uuid(), b.npages());
    let src = BaselineSource::new(b);
    let mut img = vec![0u8; npages as usize * 4096];
    let mut st = vec![PageRead::Zero; npages as usize];
    src.read_pages(0, &mut img, &mut st).unwrap();
    for (k, s) in st.iter().enumerate() {
        if *s == PageRead::Zero {
            img[k * 4096..(k + 1) * 4096].fill(0);
        }
    }
    let words = npages.div_ceil(64) as usize;
    let mut crcs: Vec<u8> = img.chunks(4096).flat_map(|p| crc32_of(p).to_le_bytes()).collect();
    let mut bits = vec![0u8; words * 8];
    tweak(&mut img, &mut crcs, &mut bits);
    let token = Token::generate().unwrap();
    let mut so = ServeOptions::new(token.clone());
    so.listen = "127.0.0.1:0".parse().unwrap();
    let target = serve(Kind::Tcp, so).unwrap();
    let block = Arc::new(SharedBytes::zeroed(dir::len(1)));
    target.register(block.clone()).unwrap();
    let ctl = Arc::new(SharedBytes::zeroed(4096 + 2 * (words * 8).next_multiple_of(4096)));
    ctl.write(remem::alloc::ctl::CURRENT_OFF, &4096u64.to_le_bytes());
    ctl.write(remem::alloc::ctl::CLOSING_OFF, &4096u64.to_le_bytes());
    let heap_mem = Arc::new(SharedBytes::zeroed(img.len()));
    heap_mem.write(0, &img);
    let crc_mem = Arc::new(SharedBytes::zeroed(crcs.len()));
    crc_mem.write(0, &crcs);
    let sealed = Arc::new(SharedBytes::zeroed(words * 8));
    sealed.write(0, &bits);
    let regions = [
        target.register(heap_mem).unwrap(),
        target.register(ctl).unwrap(),
        target.register(crc_mem).unwrap(),
        target.register(sealed.clone()).unwrap(),
    ];
    let at = write_directory(&block, uuid, npages, &regions);
    CraftedAgent { target, token, block, at, sealed, npages, words }
}

/// A hostile or buggy agent at SEALING (a bare target
/// serving a crafted directory whose heap region is the baseline's image):
/// cursors not a multiple of 64, going backwards, beyond the heap, a state
/// that changes to garbage, a reassigned slot, a SEALED with every page
/// dirty. Recovery must not panic (the follower thread included: a panic
/// hook counts panics anywhere) and must load a consistent heap; it
/// commits only when the seal ended (SEALED) and confirmed the pages served
/// before it, and otherwise refuses the commit with a clear reason.
#[test]
fn a_hostile_sealing_agent_neither_panics_nor_gets_an_unconfirmed_commit() {
    if std::env::var("REMEM_TEST_BASELINE").is_ok() {
        return;
    }
    let _serial = FOLLOWERS.lock().unwrap_or_else(|e| e.into_inner());
    use std::sync::atomic::{AtomicU64, Ordering};
    static PANICS: AtomicU64 = AtomicU64::new(0);
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |i| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        prev(i);
    }));
    let (dir, path) = closed_heap("hostile-sealing");
    // (case, steps: (delay ms, state, cursor, assigned, sealed bits all ones))
    type Step = (u64, u32, u64, u64, bool);
    let cases: Vec<(&str, Vec<Step>)> = vec![
        (
            "odd cursors",
            vec![(0, info::SEALING, 37, 1, false), (30, info::SEALING, 101, 1, false), (30, info::SEALED, 0, 1, false)],
        ),
        ("backwards", vec![(0, info::SEALING, 200, 1, false), (30, info::SEALING, 3, 1, false)]),
        ("beyond", vec![(0, info::SEALING, 5, 1, false), (30, info::SEALING, u64::MAX, 1, false)]),
        ("garbage state", vec![(0, info::SEALING, 64, 1, false), (30, 77, 64, 1, false)]),
        ("reassigned", vec![(0, info::SEALING, 64, 1, false), (30, info::SEALING, 128, 9, false)]),
        ("sealed all dirty", vec![(0, info::SEALING, 1, 1, false), (30, info::SEALED, 1, 1, true)]),
    ];
    for (what, steps) in cases {
        let CraftedAgent { target, token, block, at, sealed, words, .. } = crafted_agent(&path, |_, _, _| {});
        let apply = |&(_, state, cursor, assigned, dirty): &Step| {
            if dirty {
                sealed.write(0, &vec![0xff; words * 8]);
            }
            block.write(at + info::SEAL_CURSOR, &cursor.to_le_bytes());
            block.write(at + info::ASSIGNED, &assigned.to_le_bytes());
            block.write(at + info::STATE, &state.to_le_bytes());
        };
        apply(&steps[0]);
        let mut o = RecoverOptions::new(&path, Some(target.local_addr()), Some(token));
        o.lazy = true;
        let (heap, report) = recover(o).unwrap_or_else(|e| panic!("{what}: {e}"));
        for s in &steps[1..] {
            std::thread::sleep(Duration::from_millis(s.0));
            apply(s);
        }
        let st = heap.wait_lazy().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let c = heap.check();
        let sealed_in_the_end = steps.last().is_some_and(|s| s.1 == info::SEALED);
        eprintln!("{what}: {st:?} {report:?}");
        assert_eq!(st.poisoned, 0, "{what}: {st:?}");
        assert!(c.is_ok(), "{what}: {c:?}");
        if sealed_in_the_end {
            assert!(st.failed.is_none() && st.committed_epoch.is_some(), "{what}: {st:?}");
            heap.close().unwrap();
        } else {
            let why = st.failed.clone().unwrap_or_default();
            assert!(st.committed_epoch.is_none() && why.contains("not committed"), "{what}: {st:?}");
            assert!(heap.close().is_err(), "{what}: an uncommitted recovery closes with an error");
        }
        drop(target);
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a panic happened somewhere");
}

/// A recovery that does not use the resume file (baseline only here)
/// removes one left by an earlier recovery, eager and lazy alike.
#[test]
fn a_lazy_recovery_without_the_agent_removes_a_stale_resume_file() {
    if std::env::var("REMEM_TEST_BASELINE").is_ok() {
        return;
    }
    for lazy in [false, true] {
        let (dir, path) = closed_heap(&format!("stale-resume-{lazy}"));
        let (uuid, npages) = {
            use remem::alloc::baseline::{Baseline, FileBackend};
            let b = Baseline::open(FileBackend::open(&path).unwrap()).unwrap();
            (b.uuid(), b.npages())
        };
        let resume_path = remem::recovery::recover::resume::path_of(&path);
        {
            let mut f = remem::recovery::recover::resume::ResumeFile::open(&resume_path, &uuid, npages).unwrap();
            let page = vec![1u8; 4096];
            f.append(npages - 1, crc32_of(&page), &page).unwrap();
        }
        let mut o = RecoverOptions::new(&path, None, None);
        o.allow_data_loss = true;
        o.lazy = lazy;
        let (heap, _) = recover(o).unwrap();
        if let Some(st) = heap.wait_lazy() {
            assert!(st.failed.is_none() && st.committed_epoch.is_some(), "{st:?}");
        }
        heap.close().unwrap();
        let left = resume_path.exists();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!left, "lazy {lazy}: the resume file is still there after the recovered state was committed");
    }
}

/// A page a lazy recovery takes from the agent before the seal covered it
/// is checked against the seal's CRC once the seal ends, before the commit.
/// Here a crafted agent serves page X for the last page while its seal
/// (SEALED, bit set) says the page is Y (as when the memory was not frozen:
/// a reattach, a live owner on an unlocked shared baseline, a buggy agent):
/// the eager path refuses the agent, and the lazy one refuses the commit.
#[test]
fn a_page_served_before_the_seal_covered_it_is_checked_against_the_seal() {
    if std::env::var("REMEM_TEST_BASELINE").is_ok() {
        return;
    }
    let mut outcome = Vec::new();
    for lazy in [false, true] {
        let (dir, path) = closed_heap(&format!("beyond-cursor-{lazy}"));
        let mut last = 0;
        let CraftedAgent { target, token, block, at, npages, .. } = crafted_agent(&path, |img, crcs, bits| {
            last = img.len() / 4096 - 1;
            img[last * 4096..].fill(0xAB); // X, served
            let y_crc = crc32_of(&[0xCDu8; 4096]); // the seal says Y
            crcs[4 * last..4 * last + 4].copy_from_slice(&y_crc.to_le_bytes());
            bits[last / 8] |= 1 << (last % 8);
        });
        block.write(at + info::ASSIGNED, &1u64.to_le_bytes());
        let (state, cursor) = if lazy { (info::SEALING, 0u64) } else { (info::SEALED, npages) };
        block.write(at + info::SEAL_CURSOR, &cursor.to_le_bytes());
        block.write(at + info::STATE, &state.to_le_bytes());
        let mut o = RecoverOptions::new(&path, Some(target.local_addr()), Some(token));
        o.lazy = lazy;
        let r = match recover(o) {
            Err(e) => format!("refused: {e}"),
            Ok((heap, _)) => {
                // The seal ends (SEALED, every CRC published) once the load
                // has settled. (Flipping it earlier makes the outcome a race:
                // the page is then poisoned if, and only if, the prefetcher
                // reads it after the follower saw the seal's CRC.)
                while !heap.lazy_status().unwrap().settled {
                    std::thread::sleep(Duration::from_millis(1));
                }
                block.write(at + info::SEAL_CURSOR, &npages.to_le_bytes());
                block.write(at + info::STATE, &info::SEALED.to_le_bytes());
                let st = heap.wait_lazy().unwrap();
                std::thread::sleep(Duration::from_millis(100));
                let _ = heap.close();
                match (st.failed, st.poisoned, st.committed_epoch) {
                    (Some(f), _, _) => format!("failed: {f}"),
                    (None, p, _) if p > 0 => format!("{p} pages poisoned"),
                    (None, _, e) => format!("committed epoch {e:?} with page {last} = X, the seal says Y"),
                }
            }
        };
        eprintln!("lazy {lazy}: {r}");
        outcome.push(r);
        drop(target);
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert!(outcome[0].starts_with("refused"), "eager: {}", outcome[0]);
    assert!(!outcome[1].starts_with("committed"), "lazy at SEALING: {}", outcome[1]);
}

fn follow_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.trim() == "remem-follow-se")
        .count()
}

/// A seal that never ends (an agent whose seal thread
/// died or never started leaves the slot SEALING at its cursor). The
/// follower gives up once the cursor has not moved for the recovery's
/// `wait_sealed`; the pages served before the seal covered them cannot be
/// confirmed, so the recovered state is not committed (the heap stays
/// usable, its flushes fail), and no follower thread is left polling.
#[test]
fn a_seal_that_never_ends_is_given_up_and_the_commit_refused() {
    if std::env::var("REMEM_TEST_BASELINE").is_ok() {
        return;
    }
    let _serial = FOLLOWERS.lock().unwrap_or_else(|e| e.into_inner());
    let (dir, path) = closed_heap("stuck-seal");
    let CraftedAgent { target, token, block, at, .. } = crafted_agent(&path, |_, _, _| {});
    block.write(at + info::ASSIGNED, &1u64.to_le_bytes());
    block.write(at + info::SEAL_CURSOR, &64u64.to_le_bytes());
    block.write(at + info::STATE, &info::SEALING.to_le_bytes());
    let mut o = RecoverOptions::new(&path, Some(target.local_addr()), Some(token));
    o.lazy = true;
    o.wait_sealed = Duration::from_secs(1);
    let (heap, _) = recover(o).unwrap();
    let st = heap.wait_lazy().unwrap();
    let why = st.failed.clone().unwrap_or_default();
    assert!(st.committed_epoch.is_none() && why.contains("never covered"), "{st:?}");
    std::thread::sleep(Duration::from_millis(200));
    let after_commit = follow_threads();
    assert!(heap.close().is_err(), "an uncommitted recovery closes with an error");
    std::thread::sleep(Duration::from_millis(200));
    let after_close = follow_threads();
    drop(target);
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("follower threads after the refused commit: {after_commit}; after close: {after_close}");
    assert_eq!(after_close, 0, "the follower outlived the heap");
    assert_eq!(after_commit, 0, "the follower still polls the agent after it gave up");
}

/// A baseline whose superblock is intact but the rest is not is reported
/// at once, even when the agent (asked meanwhile) never answers: the
/// recovery does not wait for the agent's handshake deadline.
#[test]
fn a_broken_baseline_is_reported_without_waiting_for_a_silent_agent() {
    if std::env::var("REMEM_TEST_BASELINE").is_ok() {
        return;
    }
    let (dir, path) = closed_heap("silent-agent");
    // Keep both superblock slots (8 KiB), lose the CRC table and the image.
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(8192).unwrap();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap(); // never accepts
    let t = std::time::Instant::now();
    let o = RecoverOptions::new(&path, Some(silent.local_addr().unwrap()), Some(Token::generate().unwrap()));
    let e = recover(o).unwrap_err();
    assert!(matches!(e, RecoverError::Baseline { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}: it waited for the agent", t.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}
