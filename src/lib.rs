//! remem: a recoverable heap for databases.
//!
//! This umbrella crate re-exports the parts; see the README for the
//! architecture. `remem_alloc` holds the heap, allocator and tracker.
#![forbid(unsafe_code)]

pub use remem_alloc as alloc;
pub use remem_alloc::{Heap, HeapOptions, PPtr};
