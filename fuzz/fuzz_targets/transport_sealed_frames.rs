//! Fuzz target: `remem_recovery::transport::fuzzing::sealed_frames` (see its doc).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| remem_recovery::transport::fuzzing::sealed_frames(data));
