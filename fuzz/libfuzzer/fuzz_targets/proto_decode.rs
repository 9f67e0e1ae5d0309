//! `proto_decode` under libFuzzer: see `onehead_fuzz::proto`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| onehead_fuzz::proto::run(data));
