//! Fuzz target: `remem_alloc::fuzzing::baseline_file` (see its doc).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| remem_alloc::fuzzing::baseline_file(data));
