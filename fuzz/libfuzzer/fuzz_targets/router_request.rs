//! `router_request` under libFuzzer: see `onehead_fuzz::router`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| onehead_fuzz::router::run(data));
