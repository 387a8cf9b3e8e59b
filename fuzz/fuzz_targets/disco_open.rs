//! Fuzz target `disco_open`: see `fuzz/parsers.rs`.
#![no_main]

#[path = "../parsers.rs"]
mod parsers;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    parsers::disco_open(data);
});
