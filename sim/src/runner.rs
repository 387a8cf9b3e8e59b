//! Runs a [`Scenario`] on the backend it asks for (or the one given) and
//! returns the [`Report`]. Only dispatching happens here: the backends live
//! in [`crate::backend`], the checks in [`crate::evaluate`].

use crate::backend;
use crate::report::Report;
use crate::scenario::{Backend, Scenario};
use crate::trace::Keep;

pub use crate::evaluate::RunError;

/// How to run a scenario.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Overrides the file's seed.
    pub seed: Option<u64>,
    /// Overrides the file's backend.
    pub backend: Option<Backend>,
    /// Which trace entries to keep for the report's timeline.
    pub keep: Keep,
}

/// Runs a scenario and checks its expectations.
pub fn run(scenario: &Scenario, options: RunOptions) -> Result<Report, RunError> {
    let seed = options.seed.unwrap_or(scenario.seed);
    match options.backend.unwrap_or(scenario.backend) {
        Backend::Event => Ok(backend::event::run(scenario, seed, options.keep)),
        Backend::Turmoil => backend::turmoil::run(scenario, seed, options.keep),
    }
}
