//! Fuzz target: `remem_alloc::fuzzing::control_region` (see its doc).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| remem_alloc::fuzzing::control_region(data));
