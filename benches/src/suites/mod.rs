//! One module per suite. A suite takes the started systems and a
//! [`Config`], and returns a [`crate::report::SuiteReport`].

pub mod alloc;

use std::time::Duration;

/// How every suite measures.
#[derive(Clone, Debug)]
pub struct Config {
    /// Repetitions per figure; the minimum is reported.
    pub reps: u32,
    /// Length of one repetition (each thread runs until it has spent this).
    pub rep_time: Duration,
    /// Thread counts to run each case on.
    pub threads: Vec<usize>,
}
