//! The same scenario and seed give the same trace hash; another seed gives
//! another one.

use std::path::Path;

use wgmesh_sim::runner::{RunOptions, run};
use wgmesh_sim::scenario::{Backend, Scenario};
use wgmesh_sim::trace::Keep;

fn hash(file: &str, seed: u64) -> String {
    hash_on(file, seed, Backend::Event)
}

fn hash_on(file: &str, seed: u64, backend: Backend) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(file);
    let scenario = Scenario::from_file(&path).unwrap();
    let report = run(
        &scenario,
        RunOptions {
            seed: Some(seed),
            backend: Some(backend),
            keep: Keep::Nothing,
        },
    )
    .unwrap();
    assert!(report.passed, "{file} seed {seed}: {:?}", report.failures());
    report.trace_hash
}

#[test]
fn same_seed_same_hash_other_seed_other_hash() {
    for file in ["tour.toml", "disco-key-change.toml", "ping-timeouts.toml"] {
        let a = hash(file, 7);
        let b = hash(file, 7);
        let c = hash(file, 8);
        assert_eq!(a, b, "{file}: two runs with seed 7 differ");
        assert_ne!(a, c, "{file}: seeds 7 and 8 gave the same trace");
    }
}

#[test]
fn turmoil_same_seed_same_hash_other_seed_other_hash() {
    let a = hash_on("disco-key-change.toml", 7, Backend::Turmoil);
    let b = hash_on("disco-key-change.toml", 7, Backend::Turmoil);
    let c = hash_on("disco-key-change.toml", 8, Backend::Turmoil);
    assert_eq!(a, b, "two turmoil runs with seed 7 differ");
    assert_ne!(a, c, "turmoil seeds 7 and 8 gave the same trace");
}
