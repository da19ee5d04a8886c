//! remem's recovery side: the agent that keeps a heap's memory alive after
//! the database process dies, the transports that pull pages from it, and
//! the recovery that rebuilds a heap on another host. Filled in by the
//! recovery issues; today it re-exports the heap's own crash recovery.
#![deny(unsafe_code)]

pub use remem_alloc::{Heap, RecoveryReport};

pub mod agent;
pub mod digest;
pub mod recover;
#[allow(unsafe_code)]
mod sys;
pub mod transport;
// The workload plays the database: it reads and writes heap memory through raw pointers.
#[allow(unsafe_code)]
pub mod workload;
