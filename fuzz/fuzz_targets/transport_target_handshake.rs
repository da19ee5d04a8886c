//! Fuzz target: `remem_recovery::transport::fuzzing::target_handshake` (see its doc).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| remem_recovery::transport::fuzzing::target_handshake(data));
