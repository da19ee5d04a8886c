//! `mt`: the classic multi-threaded allocator benchmarks, larson and
//! threadtest, as C programs (`benches/c/larson.c`, `benches/c/threadtest.c`,
//! whose headers say what they do) through libremem and `remem.h`, against
//! glibc, jemalloc and mimalloc.
//!
//! - `larson`: workers free a random slot of their array of blocks and
//!   allocate a random size (16–128 B) into it; every 10 000 steps a worker
//!   hands its array to a new thread, so frees cross threads all the time.
//! - `threadtest`: each thread allocates 10 000 blocks of 64 B, then frees
//!   them all, 100 times.
//!
//! The suite builds libremem (`cargo build --release -p remem-ffi`), then
//! each program three times with `cc`: plain (glibc's malloc; this build
//! also runs remem, selected on its command line), with `-ljemalloc` and
//! with `-lmimalloc` (Debian's shared libraries, which replace malloc); a
//! peer whose build fails is skipped with a message. Each repetition runs
//! every system in turn (one process each); the figure is the median over
//! the repetitions, with the fastest and slowest beside it. One op is a free
//! plus an allocation; `ns_per_op` is wall time per op per thread, and
//! `ops_per_sec` the throughput of all threads together.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{progress, Config};
use crate::report::{Extra, Measurement, SuiteReport, BASELINE};
use crate::scratch::ScratchDir;

/// Suite name on the command line and in the report.
pub const SUITE: &str = "mt";
/// The programs, by case name.
const PROGRAMS: [&str; 2] = ["larson", "threadtest"];
/// threadtest's rounds of 10 000 allocations and frees per thread.
const THREADTEST_ITERATIONS: u32 = 100;

/// A system: its name, the build it runs in and the argument that selects it.
struct Sys {
    name: &'static str,
    build: &'static str,
    arg: &'static str,
}

const SYSTEMS: [Sys; 4] = [
    Sys { name: "remem", build: "glibc", arg: "remem" },
    Sys { name: "glibc", build: "glibc", arg: "malloc" },
    Sys { name: "jemalloc", build: "jemalloc", arg: "malloc" },
    Sys { name: "mimalloc", build: "mimalloc", arg: "malloc" },
];

/// The builds: name and extra linker flags.
const BUILDS: [(&str, &[&str]); 3] = [("glibc", &[]), ("jemalloc", &["-ljemalloc"]), ("mimalloc", &["-lmimalloc"])];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("benches/ is inside the workspace").to_owned()
}

fn run_cmd(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds libremem and the programs; returns the builds that succeeded.
fn build(dir: &Path) -> Result<Vec<&'static str>, String> {
    let root = root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    progress(SUITE, format_args!("building libremem"));
    run_cmd(Command::new(cargo).args(["build", "--release", "-p", "remem-ffi"]).current_dir(&root))?;
    let lib = root.join("target/release");
    let mut ok = Vec::new();
    for (build, flags) in BUILDS {
        let mut built = true;
        for prog in PROGRAMS {
            let mut cmd = Command::new("cc");
            cmd.args(["-O2", "-pthread", "-I"])
                .arg(root.join("ffi/include"))
                .arg(root.join(format!("benches/c/{prog}.c")))
                .arg("-o")
                .arg(dir.join(format!("{prog}-{build}")))
                .arg(format!("-L{}", lib.display()))
                .arg(format!("-Wl,-rpath,{}", lib.display()))
                .arg("-lremem")
                .args(flags);
            if let Err(e) = run_cmd(&mut cmd) {
                if build == "glibc" {
                    return Err(e);
                }
                eprintln!("remem-bench: {SUITE}: skipping {build}: {e}");
                built = false;
                break;
            }
        }
        if built {
            ok.push(build);
        }
    }
    Ok(ok)
}

/// One run of `prog` on `sys`: (ns per op per thread, ops per second).
fn run_once(dir: &Path, prog: &str, sys: &Sys, threads: usize, work: &str) -> Result<(f64, f64), String> {
    let exe = dir.join(format!("{prog}-{}", sys.build));
    let out = run_cmd(Command::new(&exe).arg(sys.arg).arg(threads.to_string()).arg(work).arg(dir))?;
    // "<prog> THREADS OPS SECONDS NS_PER_OP"
    let f: Vec<&str> = out.split_whitespace().collect();
    let parse = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok());
    match (f.first(), parse(2), parse(3), parse(4)) {
        (Some(&name), Some(ops), Some(secs), Some(ns)) if name == prog && secs > 0.0 => Ok((ns, ops / secs)),
        _ => Err(format!("{}: unexpected output {out:?}", exe.display())),
    }
}

/// Runs both programs on every system and thread count.
pub fn run(config: &Config) -> Result<SuiteReport, String> {
    let scratch = ScratchDir::new(&config.dir, SUITE)?;
    let dir = scratch.path();
    let builds = build(dir)?;
    let systems: Vec<&Sys> = SYSTEMS.iter().filter(|s| builds.contains(&s.build)).collect();
    let larson_time = (config.rep_time * 5).max(Duration::from_millis(500));
    let mut measurements = Vec::new();
    for prog in PROGRAMS {
        let work = match prog {
            "larson" => format!("{:.3}", larson_time.as_secs_f64()),
            _ => THREADTEST_ITERATIONS.to_string(),
        };
        for &threads in &config.threads {
            progress(SUITE, format_args!("{prog} on {threads} thread(s)"));
            let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); systems.len()];
            for _ in 0..config.reps {
                for (sys, runs) in systems.iter().zip(&mut runs) {
                    runs.push(run_once(dir, prog, sys, threads, &work)?);
                }
            }
            for (sys, mut runs) in systems.iter().zip(runs) {
                runs.sort_by(|a, b| a.0.total_cmp(&b.0));
                let (ns, ops_per_sec) = runs[runs.len() / 2];
                measurements.push(Measurement {
                    suite: SUITE,
                    case: prog,
                    system: sys.name,
                    ns_per_op: ns,
                    threads,
                    reps: config.reps,
                    extra: Extra::default()
                        .with("ops_per_sec", ops_per_sec.round())
                        .with("min_ns", runs[0].0)
                        .with("max_ns", runs[runs.len() - 1].0),
                });
            }
        }
    }
    let legend = vec![
        format!(
            "larson: workers free a random one of their 1000 blocks and allocate 16-128 B in its place; every \
             10000 steps a worker hands its blocks to a new thread (frees cross threads); {:.1} s per run",
            larson_time.as_secs_f64()
        ),
        format!(
            "threadtest: each thread allocates 10000 blocks of 64 B then frees them, {THREADTEST_ITERATIONS} times"
        ),
        format!(
            "one op = free + alloc; ns/op per thread (wall time x threads / ops), median of {} runs (min_ns, max_ns \
             beside it); C programs in benches/c/ through libremem's C ABI, remem with its defaults (fast tracking, \
             flush every second)",
            config.reps
        ),
    ];
    Ok(SuiteReport { suite: SUITE, baseline: BASELINE, legend, measurements })
}
