//! Fuzz target `engine`: three engines on virtual time driven by an arbitrary
//! sequence of operations; see `fuzz/engine_case.rs`.
#![no_main]

#[path = "../engine_case.rs"]
mod engine_case;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    engine_case::run(data);
});
