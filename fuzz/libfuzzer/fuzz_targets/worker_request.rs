//! `worker_request` under libFuzzer: see `onehead_fuzz::worker`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| onehead_fuzz::worker::run(data));
