//! remem's C ABI: `libremem.so` and `libremem.a`, described by the
//! generated header `include/remem.h` (C) and wrapped by `include/remem.hpp`
//! (C++ allocator adapters).
//!
//! - [`status`]: the status codes, the panic boundary every export runs
//!   behind, and the thread-local last-error message;
//! - [`handles`]: the table of open heaps. A `remem_heap*` is not a
//!   memory address but a slot and a generation, so a closed, foreign or
//!   random handle is reported, never dereferenced;
//! - `quiesce`: how closing a heap waits for the calls in flight on it,
//!   with no shared write on the calls' path;
//! - [`heap`]: create, open, close, memfd heaps, statistics and `check`;
//! - [`alloc`]: allocation, the root object;
//! - [`tx`]: undo-log transactions of the calling thread;
//! - [`flush`]: flushes and durability;
//! - [`recover`]: recovery on another host, eager or lazy;
//! - [`agent`]: registration with the agent, re-attach after a restart.
//!
//! Every exported function returns a [`status::remem_status`] and writes its
//! results through out-parameters.
#![deny(unsafe_op_in_unsafe_fn)]
// The exported names are C names (`remem_heap`, `REMEM_OK`).
#![allow(non_camel_case_types)]

// The header lists the items in this order.
pub mod status;

pub mod handles;

mod quiesce;

mod thread;

pub mod heap;

pub mod alloc;

pub mod tx;

pub mod flush;

pub mod recover;

pub mod agent;

#[cfg(test)]
mod tests;
