//! Snapshots of the timelines of the canonical scenarios. A change in what
//! the engine does shows up here as a readable diff.

use std::path::Path;

use wgmesh_sim::runner::{RunOptions, run};
use wgmesh_sim::scenario::Scenario;
use wgmesh_sim::timeline::summary_text;
use wgmesh_sim::trace::Keep;

fn timeline(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(file);
    let scenario = Scenario::from_file(&path).unwrap();
    let report = run(
        &scenario,
        RunOptions {
            seed: None,
            backend: None,
            keep: Keep::Notable,
        },
    )
    .unwrap();
    // The trace hash and the checks' measured details are left out: the
    // hash covers every datagram and the details every millisecond, so both
    // would change with any timing detail. The determinism test watches the
    // hash and the scenario files bound the details.
    let checks: String = report
        .checks
        .iter()
        .map(|c| format!("  {}  {}\n", if c.passed { "PASS" } else { "FAIL" }, c.name))
        .collect();
    format!("{}\nchecks:\n{checks}", summary_text(&report.timeline, 400))
}

#[test]
fn tour() {
    insta::assert_snapshot!("tour", timeline("tour.toml"));
}

#[test]
fn idle_trim_wake_both_sides() {
    insta::assert_snapshot!(
        "idle_trim_wake_both_sides",
        timeline("idle-trim-wake-both-sides.toml")
    );
}

#[test]
fn disco_key_change() {
    insta::assert_snapshot!("disco_key_change", timeline("disco-key-change.toml"));
}

#[test]
fn disco_key_change_no_flush() {
    insta::assert_snapshot!(
        "disco_key_change_no_flush",
        timeline("disco-key-change-no-flush.toml")
    );
}

#[test]
fn ping_timeouts() {
    insta::assert_snapshot!("ping_timeouts", timeline("ping-timeouts.toml"));
}

#[test]
fn major_link_change() {
    insta::assert_snapshot!("major_link_change", timeline("major-link-change.toml"));
}
