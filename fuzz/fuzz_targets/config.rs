//! Fuzz target `config`: the daemon's TOML config parser
//! (`wgmesh_adapters::config::DaemonConfig::parse`). Any text gives a config
//! or an error that names a line and column inside the text, never a panic;
//! an accepted config turns into a `Reconfig` the engine accepts.
#![no_main]

#[path = "../config_parser.rs"]
mod config_parser;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    config_parser::config(data);
});
