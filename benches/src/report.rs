//! Output of the benches: one JSON object per line, or a table whose ratio
//! column compares each system with the suite's baseline system (remem in
//! `alloc`, `tx` and `flush`; `untracked` in `track`) measured in the same
//! run.

use std::io::{self, Write};

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

/// The system every other one is compared with, unless a suite says otherwise.
pub const BASELINE: &str = "remem";

/// One figure: `reps` repetitions of one case on one system, summed up as
/// the suite's legend says (most suites: the median).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Measurement {
    /// Suite name, as given on the command line (`alloc`).
    pub suite: &'static str,
    /// Case name; the same on every thread count.
    pub case: &'static str,
    /// System name (`remem`, `glibc`, `jemalloc`, `mimalloc`, `pmdk`, or a
    /// suite's own variants such as `untracked`, `fast`, `pwrite_fdatasync`).
    pub system: &'static str,
    /// Nanoseconds per operation per thread over the repetitions (the median
    /// in most suites, see the legend), averaged over the threads of a
    /// repetition.
    pub ns_per_op: f64,
    /// Threads that ran the case at once, each on its own loop.
    pub threads: usize,
    /// Repetitions the figure sums up.
    pub reps: u32,
    /// Suite-specific figures (`mb_per_s`, `pause_p99_us`, ...), written as
    /// further fields of the JSON object and after the ratio in the table.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Named extra figures of a measurement, in the order they were added.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Extra(pub Vec<(&'static str, f64)>);

impl Extra {
    /// Adds `name = value`.
    pub fn with(mut self, name: &'static str, value: f64) -> Extra {
        self.0.push((name, value));
        self
    }

    /// Adds every figure of `more`, after these.
    pub fn with_all(mut self, more: Extra) -> Extra {
        self.0.extend(more.0);
        self
    }
}

impl Serialize for Extra {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for &(name, value) in &self.0 {
            // Counts (pages, flushes) as JSON integers, other figures rounded.
            if value.fract() == 0.0 && value.abs() < 9.0e15 {
                map.serialize_entry(name, &(value as i64))?;
            } else {
                map.serialize_entry(name, &round2(value))?;
            }
        }
        map.end()
    }
}

/// What a suite hands back: its figures and a legend for the table.
#[derive(Clone, Debug)]
pub struct SuiteReport {
    /// Suite name.
    pub suite: &'static str,
    /// The system the ratio column compares with.
    pub baseline: &'static str,
    /// Lines printed under the table: what one operation of each case is,
    /// how the figures were taken, and any verdicts computed from them.
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

/// Writes a table, one row per figure, with a ratio against the suite's
/// baseline from the same case and thread count, then the extra figures.
pub fn write_table(out: &mut impl Write, report: &SuiteReport) -> io::Result<()> {
    let ms = &report.measurements;
    let baseline = report.baseline;
    let case_w = ms.iter().map(|m| m.case.len()).max().unwrap_or(4).max(4);
    let sys_w = ms.iter().map(|m| m.system.len()).max().unwrap_or(6).max(6);
    let ns_w = ms.iter().map(|m| format!("{:.1}", m.ns_per_op).len()).max().unwrap_or(10).max(10);
    let ratios: Vec<String> = ms
        .iter()
        .map(|m| {
            let base = ms.iter().find(|b| b.case == m.case && b.threads == m.threads && b.system == baseline);
            match base {
                _ if m.system == baseline => String::new(),
                Some(b) => ratio_text(m.system, m.ns_per_op, baseline, b.ns_per_op),
                None => format!("({baseline} not run)"),
            }
        })
        .collect();
    let ratio_w = ratios.iter().map(String::len).max().unwrap_or(0);
    writeln!(out, "suite {}", report.suite)?;
    let header =
        format!("{:<case_w$}  {:>7}  {:<sys_w$}  {:>ns_w$}  vs {baseline}", "case", "threads", "system", "ns/op");
    writeln!(out, "{}", header.trim_end())?;
    let mut previous: Option<(&str, usize)> = None;
    for (m, ratio) in ms.iter().zip(&ratios) {
        let group = (m.case, m.threads);
        if previous.is_some_and(|p| p != group) {
            writeln!(out)?;
        }
        previous = Some(group);
        let extra: Vec<String> = m.extra.0.iter().map(|(k, v)| format!("{k}={}", short(*v))).collect();
        let line = format!(
            "{:<case_w$}  {:>7}  {:<sys_w$}  {:>ns_w$.1}  {ratio:<ratio_w$}  {}",
            m.case,
            m.threads,
            m.system,
            m.ns_per_op,
            extra.join(" ")
        );
        writeln!(out, "{}", line.trim_end())?;
    }
    for line in &report.legend {
        writeln!(out, "  {line}")?;
    }
    writeln!(out)
}

/// `"pmdk/remem = 35.2x"` when the peer is slower, `"remem/glibc = 1.4x"`
/// when the baseline is: the slower system over the faster, so the figure
/// is ≥ 1.
fn ratio_text(system: &str, ns: f64, baseline: &str, baseline_ns: f64) -> String {
    if ns >= baseline_ns {
        format!("{system}/{baseline} = {:.2}x", ns / baseline_ns)
    } else {
        format!("{baseline}/{system} = {:.2}x", baseline_ns / ns)
    }
}

/// An extra figure for the table: integers without decimals, others with
/// up to three significant decimals.
fn short(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(case: &'static str, system: &'static str, ns: f64, threads: usize) -> Measurement {
        Measurement { suite: "alloc", case, system, ns_per_op: ns, threads, reps: 5, extra: Extra::default() }
    }

    #[test]
    fn ratio_puts_the_slower_system_on_top() {
        assert_eq!(ratio_text("pmdk", 352.0, "remem", 10.0), "pmdk/remem = 35.20x");
        assert_eq!(ratio_text("glibc", 10.0, "remem", 14.0), "remem/glibc = 1.40x");
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
    fn extra_fields_follow_the_documented_ones() {
        let mut x = m("flush_10pct", "remem", 1.0e9, 1);
        x.extra = Extra::default().with("mb_per_s", 123.456).with("pages", 26214.0);
        let mut buf = Vec::new();
        write_json(&mut buf, &[x.clone()]).unwrap();
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "{\"suite\":\"alloc\",\"case\":\"flush_10pct\",\"system\":\"remem\",\
             \"ns_per_op\":1000000000.0,\"threads\":1,\"reps\":5,\"mb_per_s\":123.46,\"pages\":26214}\n"
        );
        let report = SuiteReport { suite: "flush", baseline: "remem", legend: vec![], measurements: vec![x] };
        let mut buf = Vec::new();
        write_table(&mut buf, &report).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert!(text.contains("1000000000.0") && text.contains("mb_per_s=123.5 pages=26214"), "{text}");
    }

    #[test]
    fn table_compares_within_the_same_case_and_thread_count() {
        let report = SuiteReport {
            suite: "alloc",
            baseline: BASELINE,
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
        assert!(text.contains("pmdk/remem = 10.00x"), "{text}");
        assert!(text.contains("pmdk/remem = 5.00x"), "{text}");
        assert!(text.contains("(remem not run)"), "{text}");
    }

    #[test]
    fn table_uses_the_suite_baseline() {
        let report = SuiteReport {
            suite: "track",
            baseline: "untracked",
            legend: vec![],
            measurements: vec![m("hot", "untracked", 10.0, 1), m("hot", "fast", 10.5, 1)],
        };
        let mut buf = Vec::new();
        write_table(&mut buf, &report).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert!(text.contains("fast/untracked = 1.05x"), "{text}");
    }
}
