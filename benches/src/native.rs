//! The C and C++ benchmark programs under `benches/c/`, built here against
//! the workspace's `libremem.so` and `remem.h`/`remem.hpp`, and run as
//! child processes: remem measured the way a C or C++ program sees it.
//!
//! Under `cargo run`, [`Toolchain::new`] first runs `cargo build --release
//! -p remem-ffi` so that the library is the one the sources describe. The
//! programs go to `<target>/release/remem-bench-native/`. Each program
//! prints one line per case, `CASE NS_PER_OP`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// Where the programs' sources, the headers and the library are.
pub struct Toolchain {
    sources: PathBuf,
    include: PathBuf,
    lib_dir: PathBuf,
    out: PathBuf,
}

/// The language of a program, and so its compiler and flags.
#[derive(Copy, Clone, Debug)]
pub enum Lang {
    /// `cc -std=c11`.
    C,
    /// `c++ -std=c++17`.
    Cxx,
}

impl Toolchain {
    /// Finds (under `cargo run`: builds) `libremem.so` beside this binary.
    pub fn new() -> anyhow::Result<Toolchain> {
        let exe = std::env::current_exe().context("finding remem-bench's own path")?;
        let lib_dir = exe.parent().context("remem-bench has no directory")?.to_path_buf();
        if let Some(cargo) = std::env::var_os("CARGO") {
            let status = Command::new(cargo)
                .args(["build", "--release", "--quiet", "-p", "remem-ffi"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .context("running cargo build -p remem-ffi")?;
            if !status.success() {
                bail!("cargo build --release -p remem-ffi failed ({status})");
            }
        }
        if !lib_dir.join("libremem.so").is_file() {
            bail!(
                "{} has no libremem.so: build it with `cargo build --release -p remem-ffi` (or run \
                 remem-bench through `cargo run --release -p remem-bench`)",
                lib_dir.display()
            );
        }
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = lib_dir.join("remem-bench-native");
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        Ok(Toolchain { sources: manifest.join("c"), include: manifest.join("../ffi/include"), lib_dir, out })
    }

    /// Compiles `benches/c/<source>` into a program named `name`, linked
    /// with libremem and `libs` (`-ljemalloc`, ...).
    pub fn build(&self, name: &str, source: &str, lang: Lang, libs: &[&str]) -> anyhow::Result<PathBuf> {
        let exe = self.out.join(name);
        let (compiler, std) = match lang {
            Lang::C => (std::env::var("CC").unwrap_or_else(|_| "cc".into()), "-std=c11"),
            Lang::Cxx => (std::env::var("CXX").unwrap_or_else(|_| "c++".into()), "-std=c++17"),
        };
        let mut cmd = Command::new(&compiler);
        cmd.args(["-O2", "-g", std, "-Wall", "-Wextra", "-pthread"])
            .arg(format!("-I{}", self.include.display()))
            .arg(self.sources.join(source))
            .arg("-o")
            .arg(&exe)
            .arg(format!("-L{}", self.lib_dir.display()))
            .arg(format!("-Wl,-rpath,{}", self.lib_dir.display()))
            .arg("-lremem")
            .args(libs);
        let output = cmd.output().with_context(|| format!("running {compiler} (scripts/setup installs gcc/g++)"))?;
        if !output.status.success() {
            bail!(
                "building {name}: {cmd:?} failed ({}):\n{}\n(scripts/setup installs the -dev packages: \
                 libpmemobj-dev, libjemalloc-dev, libmimalloc-dev)",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(exe)
    }
}

/// Runs `exe` with `args`; its `CASE NS_PER_OP` lines.
pub fn run(exe: &Path, args: &[String]) -> anyhow::Result<Vec<(String, f64)>> {
    let output = Command::new(exe).args(args).output().with_context(|| format!("running {}", exe.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "{} {} failed ({}): {}",
            exe.display(),
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    stdout
        .lines()
        .map(|line| {
            let mut it = line.split_whitespace();
            match (it.next(), it.next().and_then(|v| v.parse::<f64>().ok()), it.next()) {
                (Some(case), Some(ns), None) if ns.is_finite() && ns > 0.0 => Ok((case.to_owned(), ns)),
                _ => bail!("{}: unexpected output line {line:?}", exe.display()),
            }
        })
        .collect()
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
