#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

pub use remem_alloc as alloc;
pub use remem_alloc::{Heap, HeapOptions, PPtr};
