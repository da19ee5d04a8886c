//! Output of the benches: one JSON object per line, or a table whose last
//! column compares each system with remem measured in the same run.

use std::io::{self, Write};

use serde::Serialize;

/// The system every other one is compared with.
pub const BASELINE: &str = "remem";

/// One figure: the best of `reps` repetitions of one case on one system.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Measurement {
    /// Suite name, as given on the command line (`alloc`).
    pub suite: &'static str,
    /// Case name; the same on every thread count.
    pub case: &'static str,
    /// System name (`remem`, `glibc`, `jemalloc`, `mimalloc`, `pmdk`).
    pub system: &'static str,
    /// Nanoseconds per operation per thread, best (minimum) over the
    /// repetitions, averaged over the threads of that repetition.
    pub ns_per_op: f64,
    /// Threads that ran the case at once, each on its own loop.
    pub threads: usize,
    /// Repetitions the minimum was taken over.
    pub reps: u32,
}

/// What a suite hands back: its figures and a legend for the table.
#[derive(Clone, Debug)]
pub struct SuiteReport {
    /// Suite name.
    pub suite: &'static str,
    /// Lines printed under the table: what one operation of each case is,
    /// and how the figures were taken.
    pub legend: Vec<String>,
    /// The figures, grouped by case and thread count, in run order.
    pub measurements: Vec<Measurement>,
}

/// Writes one JSON object per line.
pub fn write_json(out: &mut impl Write, measurements: &[Measurement]) -> io::Result<()> {
    for m in measurements {
        let rounded = Measurement { ns_per_op: round2(m.ns_per_op), ..m.clone() };
        serde_json::to_writer(&mut *out, &rounded)?;
        writeln!(out)?;
    }
    Ok(())
}

/// Writes a table, one row per figure, with a ratio against remem from the
/// same case and thread count.
pub fn write_table(out: &mut impl Write, report: &SuiteReport) -> io::Result<()> {
    let ms = &report.measurements;
    let case_w = ms.iter().map(|m| m.case.len()).max().unwrap_or(4).max(4);
    let sys_w = ms.iter().map(|m| m.system.len()).max().unwrap_or(6).max(6);
    writeln!(out, "suite {}", report.suite)?;
    writeln!(out, "{:<case_w$}  {:>7}  {:<sys_w$}  {:>10}  vs {BASELINE}", "case", "threads", "system", "ns/op")?;
    let mut previous: Option<(&str, usize)> = None;
    for m in ms {
        let group = (m.case, m.threads);
        if previous.is_some_and(|p| p != group) {
            writeln!(out)?;
        }
        previous = Some(group);
        let base = ms.iter().find(|b| b.case == m.case && b.threads == m.threads && b.system == BASELINE);
        let ratio = match base {
            _ if m.system == BASELINE => String::new(),
            Some(b) => ratio_text(m.system, m.ns_per_op, b.ns_per_op),
            None => format!("({BASELINE} not run)"),
        };
        writeln!(out, "{:<case_w$}  {:>7}  {:<sys_w$}  {:>10.1}  {}", m.case, m.threads, m.system, m.ns_per_op, ratio)?;
    }
    for line in &report.legend {
        writeln!(out, "  {line}")?;
    }
    writeln!(out)
}

/// `"pmdk/remem = 35.2x"` when the peer is slower, `"remem/glibc = 1.4x"`
/// when remem is: the slower system over the faster, so the figure is ≥ 1.
fn ratio_text(system: &str, ns: f64, baseline_ns: f64) -> String {
    if ns >= baseline_ns {
        format!("{system}/{BASELINE} = {:.1}x", ns / baseline_ns)
    } else {
        format!("{BASELINE}/{system} = {:.1}x", baseline_ns / ns)
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(case: &'static str, system: &'static str, ns: f64, threads: usize) -> Measurement {
        Measurement { suite: "alloc", case, system, ns_per_op: ns, threads, reps: 5 }
    }

    #[test]
    fn ratio_puts_the_slower_system_on_top() {
        assert_eq!(ratio_text("pmdk", 352.0, 10.0), "pmdk/remem = 35.2x");
        assert_eq!(ratio_text("glibc", 10.0, 14.0), "remem/glibc = 1.4x");
    }

    #[test]
    fn json_line_has_the_documented_fields() {
        let mut buf = Vec::new();
        write_json(&mut buf, &[m("alloc_free_64", "glibc", 7.123, 2)]).unwrap();
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "{\"suite\":\"alloc\",\"case\":\"alloc_free_64\",\"system\":\"glibc\",\
             \"ns_per_op\":7.12,\"threads\":2,\"reps\":5}\n"
        );
    }

    #[test]
    fn table_compares_within_the_same_case_and_thread_count() {
        let report = SuiteReport {
            suite: "alloc",
            legend: vec![],
            measurements: vec![
                m("a", "remem", 10.0, 1),
                m("a", "pmdk", 100.0, 1),
                m("a", "remem", 20.0, 2),
                m("a", "pmdk", 100.0, 2),
                m("b", "glibc", 5.0, 1),
            ],
        };
        let mut buf = Vec::new();
        write_table(&mut buf, &report).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert!(text.contains("pmdk/remem = 10.0x"), "{text}");
        assert!(text.contains("pmdk/remem = 5.0x"), "{text}");
        assert!(text.contains("(remem not run)"), "{text}");
    }
}
