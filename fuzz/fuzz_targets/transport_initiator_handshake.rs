//! Fuzz target: `remem_recovery::transport::fuzzing::initiator_handshake` (see its doc).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| remem_recovery::transport::fuzzing::initiator_handshake(data));
