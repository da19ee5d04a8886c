#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

pub use remem_alloc as alloc;
pub use remem_alloc::{Heap, HeapOptions, PPtr};
pub use remem_recovery as recovery;
