//! remem's C ABI. The exported functions arrive with the C ABI issue; this
//! crate exists so the workspace shows where they will live.
#![forbid(unsafe_code)]
