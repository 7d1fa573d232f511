#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| edgemux::fuzzing::grpc_timeout(data));
