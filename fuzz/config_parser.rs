//! The `config` fuzz check: the daemon's config file parser. Shared (by
//! `#[path]`) by the `config` fuzz target and the corpus replay test.
#![allow(dead_code)]

use std::path::Path;

/// The daemon's config parser: a config, or an error whose line and column
/// lie inside the text and whose message is not empty; never a panic.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // `private_key_file` reads a file: keep the fuzzer away from device files
    // that never end (reading them is the operator's business, not a parse).
    if ["/dev", "/proc", "/sys"].iter().any(|s| text.contains(s)) {
        return;
    }
    match wgmesh_adapters::config::DaemonConfig::parse(Path::new("fuzz.toml"), text) {
        Ok(config) => {
            let _ = config.reconfig();
            let _ = config.interface_name("wgmesh0");
        }
        Err(e @ wgmesh_adapters::config::ConfigError::Invalid { .. }) => {
            let wgmesh_adapters::config::ConfigError::Invalid {
                line,
                column,
                message,
                ..
            } = &e
            else {
                unreachable!()
            };
            let lines = text.matches('\n').count() + 1;
            assert!(
                *line >= 1 && *line <= lines,
                "line {line} outside 1..={lines}: {e}"
            );
            assert!(*column >= 1, "column {column}: {e}");
            assert!(
                !message.trim().is_empty(),
                "an error without a message: {e:?}"
            );
        }
        Err(_) => {}
    }
}
