//! The turmoil backend: one turmoil host per node running the production
//! driver from `wgmesh-adapters`.
//!
//! Not built yet: it waits for the generic driver (TUN, socket and clock
//! traits) in `wgmesh_adapters::driver`. Until then asking for it is a clear
//! error rather than a silent fallback to the event backend.

use crate::report::Report;
use crate::runner::RunError;
use crate::scenario::Scenario;
use crate::trace::Keep;

/// Runs a scenario on the turmoil backend.
pub fn run(_scenario: &Scenario, _seed: u64, _keep: Keep) -> Result<Report, RunError> {
    Err(RunError::BackendUnavailable(
        "turmoil",
        "the generic driver in wgmesh_adapters::driver is not wired to turmoil yet".into(),
    ))
}
