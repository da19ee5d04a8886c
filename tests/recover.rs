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

use remem::recovery::agent::{self, info, Agent, AgentOptions};
use remem::recovery::recover::{recover, RecoverError, RecoverOptions};
use remem::recovery::transport::{Kind, ServeOptions, Token};
use remem::{Heap, HeapOptions};

mod common;
use common::{model, root, tx_step, verify_table};

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

struct Setup {
    dir: PathBuf,
    baseline: PathBuf,
    agent: Agent,
    token: Token,
}

fn setup(name: &str) -> Setup {
    let dir = std::env::temp_dir().join(format!("remem-recover-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let token = Token::generate().unwrap();
    let mut serve = ServeOptions::new(token.clone());
    serve.listen = "127.0.0.1:0".parse().unwrap();
    let agent = Agent::start(AgentOptions { socket: dir.join("agent.sock"), serve, kind: Kind::Tcp }).unwrap();
    Setup { baseline: dir.join("heap"), dir, agent, token }
}

/// Runs the database child until it acknowledged some transactions, kills it, returns the last ack.
fn run_and_kill(s: &Setup, wait_ms: u64) -> u64 {
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_database", "--nocapture", "--test-threads=1", "-q"])
        .env("REMEM_TEST_BASELINE", &s.baseline)
        .env("REMEM_TEST_SOCKET", s.dir.join("agent.sock"))
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
    let (heap, link) = agent::reattach(&s.dir.join("agent.sock"), &s.baseline, &opts()).unwrap();
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
