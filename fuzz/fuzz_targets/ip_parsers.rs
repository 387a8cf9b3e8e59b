//! Fuzz target `ip_parsers`: see `fuzz/parsers.rs`.
#![no_main]

#[path = "../parsers.rs"]
mod parsers;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    parsers::ip_parsers(data);
});
