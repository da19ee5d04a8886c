//! Fuzz target: `remem_alloc::fuzzing::heap_header` (see its doc).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| remem_alloc::fuzzing::heap_header(data));
