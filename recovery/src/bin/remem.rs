//! The `remem` command: run an agent, recover a heap, inspect or check a
//! baseline, and `demo`, the whole create → work → crash → recover cycle.

use std::io::{BufRead, BufReader, IsTerminal};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use remem_alloc::baseline::{Baseline, FileBackend};
use remem_alloc::{Heap, HeapOptions, TrackMode};
use remem_recovery::agent::{self, Agent, AgentOptions};
use remem_recovery::recover::{recover, RecoverOptions};
use remem_recovery::transport::{ServeOptions, Token, DEFAULT_PORT};
use remem_recovery::workload;
use serde::{Deserialize, Serialize};

#[derive(Parser)]
#[command(name = "remem", version, about = "remem: a recoverable heap for databases")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Tracking {
    Fast,
    Precise,
    Off,
}

impl From<Tracking> for TrackMode {
    fn from(t: Tracking) -> TrackMode {
        match t {
            Tracking::Fast => TrackMode::Fast,
            Tracking::Precise => TrackMode::Precise,
            Tracking::Off => TrackMode::Off,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Hold the memory of databases' heaps and serve pulls of it (token from REMEM_TOKEN or --token-file).
    ///
    /// The socket is created mode 0600 in a private directory: the agent creates the directory (0700) if
    /// it is missing, and refuses one that other users can enter, so pass a path such as
    /// $XDG_RUNTIME_DIR/remem/agent.sock or /run/remem/agent.sock (not /tmp/agent.sock). Only processes
    /// of the agent's user (and of --group) may register or re-attach heaps.
    Agent {
        /// Unix socket databases register on, in a private directory (e.g. /run/remem/agent.sock).
        #[arg(long)]
        socket: PathBuf,
        /// Address to serve pulls on (loopback unless told otherwise).
        #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)))]
        listen: SocketAddr,
        /// File holding the shared token (mode 0600).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Also admit the members of this group (socket 0660, directory 0710, owned by the group).
        #[arg(long)]
        group: Option<String>,
        /// Heaps held at once.
        #[arg(long, default_value_t = remem_recovery::agent::dir::DEFAULT_SLOTS)]
        max_heaps: usize,
        /// Publish a BLAKE3 digest of each sealed image (a whole-image pass while sealing).
        #[arg(long)]
        digest: bool,
    },
    /// Write a new random token to a file (mode 0600).
    Token {
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
    },
    /// Rebuild a heap on this host from its baseline and its failed host's agent.
    Recover {
        /// The heap's baseline file.
        #[arg(long)]
        baseline: PathBuf,
        /// The failed host's agent.
        #[arg(long)]
        agent: Option<SocketAddr>,
        /// File holding the shared token (else REMEM_TOKEN).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Recover from the baseline alone if the agent cannot be reached.
        #[arg(long)]
        allow_data_loss: bool,
        /// Tracking mode of the recovered heap.
        #[arg(long, value_enum, default_value = "fast")]
        tracking: Tracking,
        /// Seconds to wait for the agent to seal the lists.
        #[arg(long, default_value_t = 10)]
        wait_secs: u64,
        /// Lazy recovery: open the heap at once, fetch pages on first touch and in the
        /// background; prints the time to the first read of the root, then waits until
        /// every page is in and the recovered state is committed.
        #[arg(long)]
        lazy: bool,
        /// Also compare a BLAKE3 digest of the whole recovered image with the
        /// agent's (every pulled page is CRC-checked anyway; this pass grows with the heap).
        #[arg(long)]
        verify_image: bool,
        /// Print a JSON summary.
        #[arg(long)]
        json: bool,
    },
    /// Describe a baseline file.
    Inspect {
        /// The baseline file.
        path: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Open a heap (running its recovery on a private copy) and validate every allocator invariant.
    /// Never writes the baseline unless --repair is given.
    Check {
        /// The baseline file.
        path: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Commit the recovery pass's repairs (rolled-back transactions, returned caches) to the
        /// baseline; without it the file is opened read-only and left exactly as it was.
        #[arg(long)]
        repair: bool,
    },
    /// Run the whole cycle: create a heap, work on it, kill the database, recover it elsewhere, verify.
    Demo {
        /// Print a JSON summary.
        #[arg(long)]
        json: bool,
        /// Working directory (the "shared storage").
        #[arg(long, default_value = "target/remem-demo")]
        dir: PathBuf,
        /// Seconds the database works before it is killed.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        /// Kill the agent too (the source host is gone): recover from the baseline alone.
        #[arg(long)]
        agent_gone: bool,
        /// Use loopback even when network namespaces are available.
        #[arg(long)]
        no_netns: bool,
        /// Recover lazily (see `recover --lazy`) and print the time to first use.
        #[arg(long)]
        lazy: bool,
    },
    /// (demo) The database: create the heap, register with the agent, run transactions.
    #[command(hide = true)]
    DemoDb {
        #[arg(long)]
        baseline: PathBuf,
        #[arg(long)]
        socket: PathBuf,
    },
    /// (demo) Open the recovered heap and verify the workload's table.
    #[command(hide = true)]
    DemoVerify {
        #[arg(long)]
        baseline: PathBuf,
    },
}

fn token(file: &Option<PathBuf>) -> Result<Token> {
    match file {
        Some(f) => Token::from_file(f).with_context(|| format!("reading the token from {}", f.display())),
        None => Token::from_env().context("no token: set REMEM_TOKEN or pass --token-file (see `remem token`)"),
    }
}

fn main() -> Result<()> {
    // Warnings (a resume file that could not be used, a fence sync that
    // failed) on stderr; RUST_LOG=info or debug for more.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match Cli::parse().cmd {
        Cmd::Agent { socket, listen, token_file, group, max_heaps, digest } => {
            let mut serve = ServeOptions::new(token(&token_file)?);
            serve.listen = listen;
            let mut o = AgentOptions::new(socket.clone(), serve).max_heaps(max_heaps).digest(digest);
            if let Some(g) = group {
                o = o.group(g);
            }
            // Test hook: pages served damaged (see remem_recovery::agent).
            if let Ok(pages) = std::env::var("REMEM_AGENT_DAMAGED_PAGES") {
                o = o.damaged_pages(agent::parse_page_list(&pages).map_err(anyhow::Error::msg)?);
            }
            // Test hook: a slow seal (a pause before each chunk of 1024 pages).
            if let Ok(ms) = std::env::var("REMEM_AGENT_SEAL_PAUSE_MS") {
                let ms: u64 = ms
                    .parse()
                    .map_err(|_| anyhow::anyhow!("REMEM_AGENT_SEAL_PAUSE_MS={ms:?}: give milliseconds, e.g. 20"))?;
                o = o.seal_pause(std::time::Duration::from_millis(ms));
            }
            let agent = Agent::start(o)?;
            println!("listening {}", agent.local_addr());
            eprintln!(
                "remem agent: serving pulls on {}, databases register on {}",
                agent.local_addr(),
                socket.display()
            );
            loop {
                std::thread::park();
            }
        }
        Cmd::Token { out } => {
            Token::generate()?.write_new_file(&out)?;
            eprintln!("remem: wrote a new token to {}", out.display());
            Ok(())
        }
        Cmd::Recover {
            baseline,
            agent,
            token_file,
            allow_data_loss,
            tracking,
            wait_secs,
            lazy,
            verify_image,
            json,
        } => {
            let tok = if agent.is_some() { Some(token(&token_file)?) } else { None };
            let mut o = RecoverOptions::new(&baseline, agent, tok);
            o.allow_data_loss = allow_data_loss;
            o.tracking = tracking.into();
            o.wait_sealed = Duration::from_secs(wait_secs);
            o.verify_image = verify_image;
            o.lazy = lazy;
            if std::io::stderr().is_terminal() && !json {
                let bar = indicatif::ProgressBar::new(0);
                bar.set_style(
                    indicatif::ProgressStyle::with_template("pulling {bar:40} {pos}/{len} pages ({per_sec})")
                        .expect("valid template"),
                );
                o.progress = Some(Box::new(move |done, total| {
                    bar.set_length(total);
                    bar.set_position(done);
                    if done == total {
                        bar.finish_and_clear();
                    }
                }));
            }
            let t0 = Instant::now();
            let (heap, mut report) = recover(o)?;
            // The database's first use: a read of its root.
            let _ = workload::first_use(&heap);
            let seconds_first_use = t0.elapsed().as_secs_f64();
            if lazy {
                let st = heap.wait_lazy().context("not a lazy heap")?;
                if let Some(f) = st.failed {
                    bail!("lazy recovery failed after the heap opened: {f}");
                }
                report.committed_epoch = st.committed_epoch.unwrap_or(0);
                if st.poisoned > 0 {
                    eprintln!(
                        "remem recover: {} pages could not be read from any current copy and are poisoned \
                         (SIGBUS on touch): {:?}",
                        st.poisoned, st.poisoned_pages
                    );
                }
            }
            let seconds_full = t0.elapsed().as_secs_f64();
            heap.close()?;
            if json {
                let mut v = serde_json::to_value(&report)?;
                v["seconds_first_use"] = seconds_first_use.into();
                v["seconds_full"] = seconds_full.into();
                println!("{v}");
            } else {
                println!(
                    "first use (read of the root) {seconds_first_use:.3} s after the start; every page in and \
                     committed after {seconds_full:.3} s"
                );
                println!(
                    "recovered heap {} into {}: {} pages from the baseline (epoch {}), {} pages pulled ({} verified, \
                     image identical: {}), {} transactions rolled back, committed as epoch {} with generation {}, \
                     in {:.3} s",
                    report.uuid,
                    baseline.display(),
                    report.pages_from_baseline,
                    report.baseline_epoch,
                    report.pages_pulled,
                    report.pages_verified,
                    report.image_identical.map_or("n/a".into(), |b| b.to_string()),
                    report.txs_rolled_back,
                    report.committed_epoch,
                    report.generation,
                    report.seconds
                );
                if report.baseline_only {
                    println!(
                        "DATA MAY BE LOST: recovered from the baseline alone; updates made in the {:.3} s before the \
                         failure (after epoch {}) are gone",
                        report.rpo_seconds, report.baseline_epoch
                    );
                }
            }
            Ok(())
        }
        Cmd::Inspect { path, json } => inspect(&path, json),
        Cmd::Check { path, json, repair } => {
            // The check always runs on a read-only, private copy; --repair
            // then reopens the heap for writing and commits only a heap that
            // passed.
            let heap = Heap::open_with(&path, &HeapOptions::new(0).flush_interval(None).read_only(true))?;
            let r = heap.check();
            let discarded = heap.opened_from().and_then(|f| f.discarded_slot).map(|d| d.to_string());
            if json {
                println!(
                    "{}",
                    serde_json::json!({"ok": r.is_ok(), "problems": r.problems, "slabs": r.slabs,
                        "allocated_blocks": r.allocated_blocks, "large_runs": r.large_runs,
                        "allocated_bytes": r.allocated_bytes, "free_pages": r.free_pages,
                        "recovery": heap.recovery_report().to_string(), "discarded_slot": discarded,
                        "repaired": repair})
                );
            } else {
                if let Some(d) = &discarded {
                    println!("WARNING: {d}");
                }
                println!("{}\n{r}", heap.recovery_report());
                if !repair {
                    println!("(read-only: the baseline was not changed; --repair commits the recovery pass)");
                }
            }
            let ok = r.is_ok();
            heap.close()?;
            if !ok {
                bail!("the heap is damaged (see above); nothing was written to the baseline");
            }
            if repair {
                let heap = Heap::open_with(&path, &HeapOptions::new(0).flush_interval(None))?;
                let epoch = heap.flush()?;
                heap.close()?;
                println!("repaired: the recovery pass is committed to the baseline (epoch {epoch})");
            }
            Ok(())
        }
        Cmd::Demo { json, dir, seconds, agent_gone, no_netns, lazy } => {
            demo(json, &dir, seconds, agent_gone, no_netns, lazy)
        }
        Cmd::DemoDb { baseline, socket } => {
            let heap =
                Heap::create(&baseline, &HeapOptions::new(256 << 20).flush_interval(Some(Duration::from_millis(100))))?;
            let _link = agent::register(&heap, &socket)?;
            let root = workload::root(&heap);
            println!("ready");
            loop {
                workload::tx_step(&heap, root);
                println!("ack {}", workload::counter(root));
            }
        }
        Cmd::DemoVerify { baseline } => {
            let heap = Heap::open_with(&baseline, &HeapOptions::new(0).flush_interval(None))?;
            let v = match workload::try_verify_table(&heap, 1) {
                Ok((counter, versions)) if versions == workload::model(counter) => {
                    Verify { counter, ok: true, error: None }
                }
                Ok((counter, _)) => Verify {
                    counter,
                    ok: false,
                    error: Some("the table differs from the committed transactions".into()),
                },
                Err(e) => Verify { counter: 0, ok: false, error: Some(e) },
            };
            heap.close()?;
            println!("{}", serde_json::to_string(&v)?);
            Ok(())
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Verify {
    counter: u64,
    ok: bool,
    error: Option<String>,
}

fn inspect(path: &Path, json: bool) -> Result<()> {
    let backend = FileBackend::open_read_only(path).with_context(|| format!("opening {}", path.display()))?;
    let b = Baseline::open(backend)?;
    let i = b.info();
    let age = (std::time::UNIX_EPOCH + Duration::from_nanos(i.commit_unix_ns)).elapsed().unwrap_or_default();
    let mut first = vec![0u8; 4096];
    b.read_page(0, &mut first)?;
    let h = remem_alloc::format::Header::decode(&first).map_err(|e| anyhow::anyhow!("page 0: {e}"))?;
    let uuid = remem_alloc::format::uuid_string(&b.uuid());
    if json {
        println!(
            "{}",
            serde_json::json!({"uuid": uuid, "size": b.heap_size(), "base": format!("{:#x}", h.base),
                "epoch": i.epoch, "generation": i.generation, "seq": i.seq, "journal_len": i.journal_len,
                "journal_pages": i.journal_pages, "age_seconds": age.as_secs_f64(),
                "discarded_slot": b.discarded_slot().map(|d| d.to_string())})
        );
    } else {
        println!(
            "heap {uuid}: {} MiB at {:#x}; last flush epoch {} committed {:.3} s ago; generation {}; journal {} pages \
             ({} bytes)",
            b.heap_size() >> 20,
            h.base,
            i.epoch,
            age.as_secs_f64(),
            i.generation,
            i.journal_pages,
            i.journal_len
        );
        if let Some(d) = b.discarded_slot() {
            println!("WARNING: {d}");
        }
    }
    Ok(())
}

/// Two network namespaces joined by a veth pair: the source and failover hosts.
struct Netns {
    src: String,
    dst: String,
}

impl Netns {
    const SRC_IP: &'static str = "10.77.0.1";

    fn available() -> bool {
        std::fs::metadata("/proc/self/ns/net").is_ok()
            && Command::new("ip")
                .arg("-V")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
            && std::env::var("USER").map_or(true, |u| u == "root")
            && Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0")
    }

    fn create() -> Result<Netns> {
        let id = std::process::id();
        let n = Netns { src: format!("remem-src-{id}"), dst: format!("remem-dst-{id}") };
        let (a, b) = (format!("rmv{}a", id % 100_000), format!("rmv{}b", id % 100_000));
        let ip = |args: &[&str]| -> Result<()> {
            let out = Command::new("ip").args(args).output().context("running ip")?;
            if !out.status.success() {
                bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(())
        };
        ip(&["netns", "add", &n.src])?;
        ip(&["netns", "add", &n.dst])?;
        ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
        ip(&["link", "set", &a, "netns", &n.src])?;
        ip(&["link", "set", &b, "netns", &n.dst])?;
        for (ns, dev, addr) in [(&n.src, &a, "10.77.0.1/24"), (&n.dst, &b, "10.77.0.2/24")] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(n)
    }

    fn cmd(&self, ns: &str, exe: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(exe);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in [&self.src, &self.dst] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[derive(Serialize)]
struct DemoSummary {
    network: String,
    acked_transactions: u64,
    recovered_transactions: u64,
    lost_transactions: u64,
    pages_from_baseline: u64,
    pages_pulled: u64,
    bytes_pulled: u64,
    seconds_baseline: f64,
    seconds_pull: f64,
    seconds_recover: f64,
    /// Lazy: from the start of recover to the first read of the root returning.
    seconds_first_use: Option<f64>,
    rpo_seconds: f64,
    image_identical: Option<bool>,
    check_ok: bool,
    verified: bool,
    error: Option<String>,
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn demo(json: bool, dir: &Path, seconds: f64, agent_gone: bool, no_netns: bool, lazy: bool) -> Result<()> {
    let say = |s: String| {
        if !json {
            println!("{s}");
        }
    };
    let exe = std::env::current_exe()?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    let baseline = dir.join("heap.baseline");
    // The agent makes its socket's directory private (0700).
    let socket = dir.join("agent").join("agent.sock");
    let tok = Token::generate()?;
    let netns = if !no_netns && Netns::available() { Some(Netns::create()?) } else { None };
    let (network, listen) = match &netns {
        Some(n) => (
            format!("network namespaces {} (source) and {} (failover) joined by a veth pair", n.src, n.dst),
            format!("{}:{DEFAULT_PORT}", Netns::SRC_IP),
        ),
        None => {
            ("loopback (run as root with iproute2 for two network namespaces)".to_string(), "127.0.0.1:0".to_string())
        }
    };
    say(format!("remem demo: source and failover hosts on {network}; shared storage {}", dir.display()));
    let on_src = |args: &[&str]| {
        let mut c = match &netns {
            Some(n) => n.cmd(&n.src, &exe),
            None => Command::new(&exe),
        };
        c.args(args).env("REMEM_TOKEN", tok.to_hex().as_str());
        c
    };
    let on_dst = |args: &[&str]| {
        let mut c = match &netns {
            Some(n) => n.cmd(&n.dst, &exe),
            None => Command::new(&exe),
        };
        c.args(args).env("REMEM_TOKEN", tok.to_hex().as_str());
        c
    };
    // 1. The agent on the source host.
    let sock = socket.to_string_lossy().to_string();
    let mut agent = Kill(
        on_src(&["agent", "--socket", &sock, "--listen", &listen, "--digest"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let mut line = String::new();
    BufReader::new(agent.0.stdout.take().expect("piped")).read_line(&mut line)?;
    let addr: SocketAddr = line.trim().strip_prefix("listening ").context("the agent did not start")?.parse()?;
    say(format!("1. agent listening on {addr}"));
    // 2. The database on the source host.
    let bl = baseline.to_string_lossy().to_string();
    let mut db = Kill(on_src(&["demo-db", "--baseline", &bl, "--socket", &sock]).stdout(Stdio::piped()).spawn()?);
    let out = BufReader::new(db.0.stdout.take().expect("piped"));
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut last = 0u64;
        for l in out.lines().map_while(Result::ok) {
            if l == "ready" {
                let _ = tx.send(());
            } else if let Some(n) = l.strip_prefix("ack ") {
                last = n.parse().unwrap_or(last);
            }
        }
        last
    });
    rx.recv_timeout(Duration::from_secs(60)).context("the database did not start")?;
    say(format!(
        "2. database created a 256 MiB heap, registered it with the agent, and runs transactions for {seconds} s"
    ));
    std::thread::sleep(Duration::from_secs_f64(seconds));
    // 3. Crash.
    kill9(db.0.id() as i32);
    let _ = db.0.wait();
    let acked = reader.join().expect("reader");
    say(format!("3. database killed with SIGKILL after {acked} acknowledged transactions"));
    if agent_gone {
        drop(agent);
        say("   ... and the agent with it: the source host is gone".into());
    }
    // 4. Recover on the failover host.
    let t = Instant::now();
    let mut args = vec!["recover", "--baseline", &bl, "--json"];
    args.push(if lazy { "--lazy" } else { "--verify-image" });
    let addr_s = addr.to_string();
    args.extend(["--agent", &addr_s]);
    if agent_gone {
        args.push("--allow-data-loss");
    }
    let rec = on_dst(&args).stderr(Stdio::inherit()).output()?;
    let seconds_recover = t.elapsed().as_secs_f64();
    if !rec.status.success() {
        bail!("recovery failed");
    }
    let report: serde_json::Value = serde_json::from_slice(rec.stdout.trim_ascii())?;
    let pulled = report["pages_pulled"].as_u64().unwrap_or(0);
    if agent_gone {
        say(format!(
            "4. failover host recovered from the baseline alone (epoch {}, {:.3} s old): updates after it are lost; {:.3} s",
            report["baseline_epoch"],
            report["rpo_seconds"].as_f64().unwrap_or(0.0),
            seconds_recover
        ));
    } else if lazy {
        say(format!(
            "4. failover host recovered lazily: first use (read of the root) {:.3} s after recover started \
             ({:.3} s of it waiting for the agent's seal); {pulled} pages from the agent over TCP, the rest from \
             the baseline, all in and committed after {:.3} s",
            report["seconds_first_use"].as_f64().unwrap_or(0.0),
            report["seconds_agent"].as_f64().unwrap_or(0.0),
            report["seconds_full"].as_f64().unwrap_or(0.0)
        ));
    } else {
        say(format!(
            "4. failover host recovered: {} pages from the baseline, {pulled} pages pulled over TCP from the agent, \
             image identical to the agent's memory: {}, in {seconds_recover:.3} s",
            report["pages_from_baseline"], report["image_identical"]
        ));
    }
    // 5. Verify.
    let v = on_dst(&["demo-verify", "--baseline", &bl]).output()?;
    let ver: Verify = serde_json::from_slice(v.stdout.trim_ascii()).context("the verifier printed no result")?;
    let image = report["image_identical"].as_bool();
    let enough = if agent_gone { ver.counter <= acked + 1 } else { ver.counter >= acked && ver.counter <= acked + 1 };
    let verified = ver.ok && enough && (agent_gone || lazy || image == Some(true));
    let lost = acked.saturating_sub(ver.counter);
    say(format!(
        "5. reopened the recovered heap: {} transactions present ({} acknowledged{}), check() {}, every value intact: {}",
        ver.counter,
        acked,
        if agent_gone { format!(", {lost} lost with the host") } else { String::new() },
        if ver.ok { "ok" } else { "FAILED" },
        ver.ok
    ));
    let summary = DemoSummary {
        network: if netns.is_some() { "netns".into() } else { "loopback".into() },
        acked_transactions: acked,
        recovered_transactions: ver.counter,
        lost_transactions: lost,
        pages_from_baseline: report["pages_from_baseline"].as_u64().unwrap_or(0),
        pages_pulled: pulled,
        bytes_pulled: report["bytes_pulled"].as_u64().unwrap_or(0),
        seconds_baseline: report["seconds_baseline"].as_f64().unwrap_or(0.0),
        seconds_pull: report["seconds_pull"].as_f64().unwrap_or(0.0),
        seconds_recover,
        seconds_first_use: report["seconds_first_use"].as_f64().filter(|_| lazy),
        rpo_seconds: report["rpo_seconds"].as_f64().unwrap_or(0.0),
        image_identical: image,
        check_ok: ver.ok,
        verified,
        error: ver.error,
    };
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else if verified {
        println!(
            "ok: verified recovery ({} transactions{})",
            ver.counter,
            if agent_gone { format!(", RPO {:.3} s", summary.rpo_seconds) } else { ", nothing lost".into() }
        );
    } else {
        println!("NOT VERIFIED: {}", summary.error.as_deref().unwrap_or("acknowledged transactions are missing"));
    }
    if !verified {
        std::process::exit(1);
    }
    Ok(())
}

fn kill9(pid: i32) {
    // Through the `kill` command: this binary has no unsafe code.
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}
