//! The crash tests' workload lives in the recovery crate (`remem demo` runs it too).
#![allow(unused_imports, dead_code)]

pub use remem::recovery::workload::*;
