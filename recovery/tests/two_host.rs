//! Two hosts: network namespaces joined by a veth pair (the source host
//! runs the agent and the database; the failover host recovers over TCP;
//! a directory is the shared storage). Runs `remem demo`, which kills the
//! database with SIGKILL and verifies the recovered heap: every
//! acknowledged transaction present, `check()` clean, and the image
//! byte-identical (BLAKE3) to the agent's memory at the kill. Also the case
//! where the agent is gone too (baseline alone, RPO reported).
//!
//! Needs root and iproute2 (CI runs as root); elsewhere it runs on
//! loopback and says so.

use std::process::Command;

fn demo(extra: &[&str], dir: &str) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_remem"))
        .args(["demo", "--json", "--seconds", "0.5", "--dir", dir])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "remem demo failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.trim()).unwrap()
}

#[test]
fn failover_host_recovers_over_tcp_with_nothing_lost() {
    let dir = std::env::temp_dir().join(format!("remem-two-host-{}", std::process::id()));
    let s = demo(&[], dir.to_str().unwrap());
    if s["network"] != "netns" {
        eprintln!("two_host: no network namespaces here (not root, or no iproute2): ran on loopback");
    }
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(s["image_identical"], true, "{s}");
    assert_eq!(s["lost_transactions"], 0, "{s}");
    assert!(s["pages_pulled"].as_u64().unwrap() > 0, "{s}");
    assert!(s["acked_transactions"].as_u64().unwrap() > 0, "{s}");
}

#[test]
fn with_the_agent_gone_the_baseline_alone_is_consistent_and_the_rpo_reported() {
    let dir = std::env::temp_dir().join(format!("remem-two-host-gone-{}", std::process::id()));
    let s = demo(&["--agent-gone"], dir.to_str().unwrap());
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(s["pages_pulled"], 0, "{s}");
    assert!(s["rpo_seconds"].as_f64().unwrap() > 0.0, "{s}");
}
