//! What the scenario suites share: which committed files are too slow on
//! the turmoil backend for every `cargo test`.

use std::path::Path;

/// Files that list both backends but take minutes of wall time on turmoil,
/// which steps every node's host once per 1 ms tick: `hub-with-120-peers`
/// (121 nodes, about 4 minutes in a release build) and
/// `fifty-node-churn-hour` (50 nodes for a virtual hour). `cargo test` runs
/// them on the event backend only; `WGMESH_SIM_SLOW=1` (the `just
/// sim-slow` recipe) runs them on turmoil too, in a release build.
pub const SLOW_ON_TURMOIL: [&str; 2] = ["hub-with-120-peers.toml", "fifty-node-churn-hour.toml"];

/// Whether `path`'s turmoil run is left out of this run of the suite.
pub fn skip_on_turmoil(path: &Path) -> bool {
    let slow = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| SLOW_ON_TURMOIL.contains(&n));
    slow && std::env::var("WGMESH_SIM_SLOW")
        .ok()
        .is_none_or(|v| v != "1")
}
