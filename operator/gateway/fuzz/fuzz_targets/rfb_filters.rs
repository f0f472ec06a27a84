//! Every property of the RFB filters on libFuzzer's inputs (see
//! `noexit_gateway::rfb::harness` for the input layout and the properties).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    noexit_gateway::rfb::harness::exercise(data);
});
