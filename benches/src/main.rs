//! `remem-bench`: runs remem and its peers (glibc, jemalloc, mimalloc, PMDK)
//! in one process run and prints each figure beside a ratio against remem.
//!
//! ```text
//! cargo run --release -p remem-bench -- alloc          # table with ratios
//! cargo run --release -p remem-bench -- alloc --json   # one JSON object per line
//! cargo run --release -p remem-bench -- tx track flush # several suites, in order
//! cargo run --release -p remem-bench -- pull --json    # remem's TCP pull and recovery
//! cargo run --release -p remem-bench -- failover --json --reps 3 --heap-gib 0.25   # a short failover run
//! cargo run --release -p remem-bench -- mt             # larson, threadtest (C programs)
//! cargo run --release -p remem-bench -- c cpp          # remem from C and C++ (libremem.so)
//! ```
//!
//! Layout: `peers/` wraps each system behind the narrow [`peers::Peer`]
//! trait (and [`peers::TxPeer`] for the systems with transactions),
//! `suites/` holds one file per suite, `report.rs` turns
//! [`report::Measurement`]s into JSON lines or a table, `scratch.rs` makes
//! and removes the run's directories. A new suite is a variant of [`Suite`]
//! and a module under `suites/`. `alloc` and `tx` run the peers chosen with
//! `--systems`; `track` and `flush` compare variants of remem (and a raw
//! file write) that they start themselves; `pull` runs remem's TCP
//! transport against a plain TCP stream, and whole recoveries of a heap
//! whose database child process (this binary re-executed with the hidden
//! subcommand `__pull-db`) it kills; `mt` builds libremem and the C
//! programs in `benches/c/` and runs them; `c` and `cpp` build the C and
//! C++ programs under `benches/c/` against `libremem.so` ([`native`]) and
//! run them beside remem's Rust path. Each suite starts what it needs
//! and stops it before the next suite runs, so that no heap's background
//! flusher runs during another suite.

mod native;
mod peers;
mod report;
mod scratch;
mod suites;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::peers::SystemName;
use crate::suites::Config;

/// The suites this binary knows; a new one slots in here and under `suites/`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Suite {
    /// Allocation and free: 64 B pairs and a mixed 16 B–4 KiB working set.
    Alloc,
    /// Undo-log transactions, remem against PMDK: 64 B update, 64 B allocation.
    Tx,
    /// Dirty-page tracking: first write to a protected page; hot 64 B updates under a 100 ms flusher.
    Track,
    /// Flushing 10 % of a 1 GiB heap against pwrite+fdatasync of the same pages.
    Flush,
    /// Pulling 256 MiB over remem's TCP transport against a TCP stream; recovering a 1 GiB heap.
    Pull,
    /// Failover: SIGKILL of a database, then recovery of its 1/4/8 GiB heap, against a raw copy of the same bytes.
    Failover,
    /// Multi-threaded allocator benchmarks larson and threadtest (C, through libremem) against glibc, jemalloc, mimalloc.
    Mt,
    /// remem from C through libremem.so: alloc/free and a transaction against malloc and PMDK; a transactional hash map against PMDK.
    C,
    /// std::map through remem.hpp against std::allocator and jemalloc.
    Cpp,
}

#[derive(Parser, Debug)]
#[command(
    name = "remem-bench",
    about = "Benchmarks remem against glibc, jemalloc, mimalloc and PMDK in one run and prints ratios"
)]
struct Cli {
    /// Suites to run, in order (none given: alloc).
    #[arg(value_enum)]
    suites: Vec<Suite>,

    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    json: bool,

    /// Repetitions per figure; the median is reported with the fastest and
    /// slowest beside it (pull: rounds of pull_256mib, best and median; each
    /// suite's legend says what it reports).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    reps: u32,

    /// Length of one repetition, in milliseconds.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    rep_ms: u64,

    /// Thread counts to run each case on (each thread runs its own loop).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2])]
    threads: Vec<usize>,

    /// Systems to run in alloc and tx, comma-separated (none given: all; tx
    /// runs remem and pmdk only). track, flush and pull run all their variants.
    #[arg(long, value_enum, value_delimiter = ',')]
    systems: Vec<SystemName>,

    /// Directory for heap files and flush's raw-write file (default: the
    /// temp dir); the run makes and removes directories of its own inside.
    #[arg(long)]
    dir: Option<PathBuf>,

    /// Heap sizes of the failover suite, in GiB (a short run: --heap-gib 0.25).
    #[arg(long, value_delimiter = ',', default_values_t = [1.0f64, 4.0, 8.0])]
    heap_gib: Vec<f64>,

    /// Length of one repetition of track's hot_update and random_update_1gib, in milliseconds.
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u64).range(1..))]
    hot_ms: u64,

    /// Keys of the c suite's transactional hash map.
    #[arg(long, default_value_t = 500_000, value_parser = clap::value_parser!(u64).range(1..))]
    kv_keys: u64,

    /// Keys of the cpp suite's std::map.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    map_keys: u64,

    /// Time per system of flush's stall case, in milliseconds.
    #[arg(long, default_value_t = 6000, value_parser = clap::value_parser!(u64).range(1..))]
    stall_ms: u64,
}

fn main() -> anyhow::Result<()> {
    // libpmemobj decides at pool creation whether the pool is persistent
    // memory; a pool on /dev/shm is not, and would msync on every persist.
    // Set before any thread starts (set_var races with getenv on other threads).
    if std::env::var_os("PMEM_IS_PMEM_FORCE").is_none() {
        std::env::set_var("PMEM_IS_PMEM_FORCE", "1");
    }
    // remem's warnings (and, with RUST_LOG=debug, the timings of its steps) on stderr.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();

    // The database child of the failover suite.
    if std::env::args_os().nth(1).is_some_and(|a| a == suites::failover::CHILD_CMD) {
        let name = format!("remem-bench {}", suites::failover::CHILD_CMD);
        let args =
            suites::failover::DbArgs::parse_from(std::iter::once(name.into()).chain(std::env::args_os().skip(2)));
        return suites::failover::db_main(&args);
    }
    // The database child of the pull suite: `remem-bench __pull-db ...`.
    if std::env::args_os().nth(1).is_some_and(|a| a == suites::pull::CHILD_CMD) {
        let name = format!("remem-bench {}", suites::pull::CHILD_CMD);
        let args = suites::pull::DbArgs::parse_from(std::iter::once(name.into()).chain(std::env::args_os().skip(2)));
        return suites::pull::db_main(&args);
    }

    let cli = Cli::parse();
    if cli.threads.contains(&0) {
        anyhow::bail!("--threads: thread counts must be at least 1");
    }
    let suites = if cli.suites.is_empty() { vec![Suite::Alloc] } else { cli.suites.clone() };
    let systems = if cli.systems.is_empty() { SystemName::ALL.to_vec() } else { cli.systems.clone() };
    let config = Config {
        reps: cli.reps,
        rep_time: Duration::from_millis(cli.rep_ms),
        threads: cli.threads.clone(),
        dir: cli.dir.clone().unwrap_or_else(std::env::temp_dir),
        hot_time: Duration::from_millis(cli.hot_ms),
        kv_keys: cli.kv_keys,
        map_keys: cli.map_keys,
        heap_gib: cli.heap_gib.clone(),
        stall_time: Duration::from_millis(cli.stall_ms),
    };
    if cli.heap_gib.iter().any(|&g| !(0.0625..=1024.0).contains(&g)) {
        anyhow::bail!("--heap-gib: sizes from 0.0625 to 1024 GiB");
    }
    if !config.dir.is_dir() {
        anyhow::bail!("--dir {}: not a directory", config.dir.display());
    }

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for suite in suites {
        // Peers that cannot start (no /dev/shm, ...) are reported on stderr
        // and skipped; the others run. They are stopped (their files
        // removed) at the end of their suite.
        let report = match suite {
            Suite::Alloc => {
                let systems = peers::open(&systems, &config.dir);
                if systems.is_empty() {
                    anyhow::bail!("alloc: no system could be started; see the messages above");
                }
                suites::alloc::run(&systems, &config)
            }
            Suite::Tx => {
                let systems = peers::open_tx(&systems, &config.dir);
                if systems.is_empty() {
                    anyhow::bail!(
                        "tx: no system could be started (tx runs remem and pmdk, if --systems names them); \
                         see the messages above"
                    );
                }
                suites::tx::run(&systems, &config)
            }
            Suite::Track => suites::track::run(&config)?,
            Suite::Flush => suites::flush::run(&config)?,
            Suite::Pull => suites::pull::run(&config)?,
            Suite::Failover => suites::failover::run(&config)?,
            Suite::Mt => suites::mt::run(&config).map_err(anyhow::Error::msg)?,
            Suite::C => suites::c::run_suite(&config, config.kv_keys)?,
            Suite::Cpp => suites::cpp::run_suite(&config, config.map_keys)?,
        };
        if cli.json {
            report::write_json(&mut out, &report.measurements)?;
        } else {
            report::write_table(&mut out, &report)?;
        }
        out.flush()?;
    }
    Ok(())
}
