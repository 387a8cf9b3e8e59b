//! Fuzz target `scenario`: the simulator's scenario parser
//! (`wgmesh_sim::scenario::Scenario::parse`) and its schedule expansion.
#![no_main]

#[path = "../scenario_parser.rs"]
mod scenario_parser;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    scenario_parser::scenario(data);
});
