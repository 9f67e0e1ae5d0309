//! `router_stream` under libFuzzer: see `onehead_fuzz::stream`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| onehead_fuzz::stream::run(data));
