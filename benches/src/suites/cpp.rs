//! `cpp`: a `std::map<uint64_t, uint64_t>` as a C++ program uses it, its
//! nodes from `std::allocator` or from a remem heap through `remem.hpp`
//! (the program is `benches/c/cppmap.cpp`, built and run by
//! [`crate::native`]).
//!
//! `cpp_map`: `--map-keys` distinct random keys; cases `map_insert` (one
//! op = one `emplace`), `map_find_insert_order` (one `find`, keys in the
//! order they were inserted), `map_find_reverse` (the reverse order),
//! `map_erase` (one `erase`, insertion order). Systems: `std`
//! (`std::allocator`, glibc's malloc), `jemalloc` (the same program linked
//! with `-ljemalloc`), `remem` (`remem::allocator`, which holds the heap
//! handle) and `remem_persistent` (`remem::persistent_allocator`, which
//! holds the heap's base address and allocates and frees with
//! `remem_alloc_at` and `remem_free_at`, which find the heap by that
//! address inside the call). The heap is made by `remem_create()`
//! with its defaults (fast tracking, background flush every second).
//! 1 thread; each repetition runs every system in turn; the figure is the
//! median repetition.

use super::c::Table;
use super::{progress, Config};
use crate::native::{run, Lang, Toolchain};
use crate::report::{Measurement, SuiteReport};
use crate::scratch::ScratchDir;

/// Suite name on the command line and in the report.
pub const SUITE: &str = "cpp";
/// The system the others are compared with.
pub const BASELINE: &str = "std";
/// The cases, in report order.
const CASES: [&str; 4] = ["map_insert", "map_find_insert_order", "map_find_reverse", "map_erase"];

/// Runs `cpp_map`.
pub fn run_suite(config: &Config, map_keys: u64) -> anyhow::Result<SuiteReport> {
    let tc = Toolchain::new()?;
    let plain = tc.build("cppmap", "cppmap.cpp", Lang::Cxx, &[])?;
    let je = tc.build("cppmap-jemalloc", "cppmap.cpp", Lang::Cxx, &["-ljemalloc"])?;
    let dir = ScratchDir::new(&config.dir, "cpp").map_err(anyhow::Error::msg)?;
    let d = dir.path().display().to_string();
    let mut table = Table::default();
    progress(SUITE, format_args!("cpp_map with {map_keys} keys"));
    for rep in 0..config.reps {
        for (system, exe, arg) in [
            (BASELINE, &plain, "std"),
            ("jemalloc", &je, "std"),
            ("remem", &plain, "remem"),
            ("remem_persistent", &plain, "remem_persistent"),
        ] {
            let args = [map_keys.to_string(), (1 + u64::from(rep)).to_string(), d.clone(), arg.into()];
            for (case, ns) in run(exe, &args)? {
                let Some(&case) = CASES.iter().find(|&&c| c == case) else {
                    anyhow::bail!("cppmap printed an unknown case {case}");
                };
                table.push(case, 1, system, ns);
            }
        }
    }
    let mut measurements = table.measurements(SUITE);
    // Grouped by case, as the table prints them.
    measurements.sort_by_key(|m| CASES.iter().position(|&c| c == m.case));
    let mut legend = vec![
        format!(
            "cpp_map: std::map<uint64_t, uint64_t> of {map_keys} random keys; one op = one emplace (map_insert), \
             find in insertion order (map_find_insert_order), find in reverse order (map_find_reverse), erase \
             in insertion order (map_erase); 1 thread"
        ),
        format!(
            "std = std::allocator (glibc malloc); jemalloc = the same program linked with -ljemalloc; remem = \
             remem::allocator, remem_persistent = remem::persistent_allocator (remem.hpp) on a heap made by \
             remem_create() with its defaults, file in {}",
            dir.describe()
        ),
        format!("ns/op: the median of {} runs, min_ns/max_ns the fastest and slowest", config.reps),
    ];
    legend.extend(verdicts(&measurements));
    Ok(SuiteReport { suite: SUITE, baseline: BASELINE, legend, measurements })
}

/// "target remem <= 1.1x std on map_erase: 1.05x, met".
fn verdicts(ms: &[Measurement]) -> Vec<String> {
    let mut out = Vec::new();
    for case in CASES {
        let Some(base) = ms.iter().find(|m| m.case == case && m.system == BASELINE) else { continue };
        for m in ms.iter().filter(|m| m.case == case && m.system.starts_with("remem")) {
            let x = m.ns_per_op / base.ns_per_op;
            out.push(format!(
                "target {} <= 1.1x std on {case}: {x:.2}x, {}",
                m.system,
                if x <= 1.1 { "met" } else { "NOT met" }
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Extra;

    #[test]
    fn verdicts_compare_with_std() {
        let m = |system, ns| Measurement {
            suite: SUITE,
            case: "map_erase",
            system,
            ns_per_op: ns,
            threads: 1,
            reps: 1,
            extra: Extra::default(),
        };
        let v = verdicts(&[m("std", 100.0), m("remem", 105.0), m("remem_persistent", 250.0), m("jemalloc", 300.0)]);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].contains("remem <= 1.1x std on map_erase: 1.05x, met"), "{v:?}");
        assert!(v[1].contains("2.50x, NOT met"), "{v:?}");
    }
}
