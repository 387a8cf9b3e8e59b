//! Property suite: random small tailnets with random churn keep every
//! invariant. CI runs a few cases; `just explore` runs many more through the
//! explorer, which also shrinks and records failures.

use proptest::prelude::*;
use wgmesh_sim::explore::{Motif, Shape};
use wgmesh_sim::runner::{RunOptions, run};
use wgmesh_sim::scenario::Scenario;
use wgmesh_sim::trace::Keep;

/// The explorer's set pieces, early enough for the shortest run (60 s).
fn motif() -> impl Strategy<Value = Motif> {
    prop_oneof![
        Just(Motif::None),
        (2u32..=40, 0u32..=50)
            .prop_map(|(at_s, offset_ms)| Motif::CrossingWake { at_s, offset_ms }),
        // At most the wake queue's bound (1,024, boringtun's replay window):
        // with jitter, a burst above it could have a datagram sent after the
        // flushed queue arrive ahead of it (see explore.rs and
        // corpus/wake-burst-beyond-the-replay-window.toml).
        (2u32..=40, 50u32..=1024).prop_map(|(at_s, count)| Motif::Burst { at_s, count }),
        (2u32..=40, 100u32..=3000, any::<bool>())
            .prop_map(|(at_s, gap_ms, back)| Motif::DiscoKeyTwice { at_s, gap_ms, back }),
        (2u32..=40, 1u32..=120)
            .prop_map(|(at_s, delay_ms)| Motif::PartitionDuringHandshake { at_s, delay_ms }),
        (4u32..=40, 0u32..=40_000)
            .prop_map(|(at_s, downtime_ms)| Motif::ControlOutage { at_s, downtime_ms }),
        // Only the short silence: the trimmed wakes need over 5 minutes.
        Just(Motif::ControlCutWake { idle_ms: 10_000 }),
        (2u32..=15, 0u32..=150, any::<bool>(), any::<bool>()).prop_map(
            |(at_s, delay_ms, at_n2, major)| Motif::LinkChangeDuringHandshake {
                at_s,
                delay_ms,
                at_n2,
                major,
            }
        ),
        // Under a stream only: the flips around the trim need over 5 minutes.
        (3000u32..=30_000, 0u32..=20_000, any::<bool>()).prop_map(|(at_ms, gap_ms, all)| {
            Motif::KnobFlip {
                at_ms,
                gap_ms,
                all,
                quiet: false,
                delay_ms: 0,
            }
        }),
    ]
}

fn shape() -> impl Strategy<Value = Shape> {
    (
        (2u32..=5, 60u32..=400, 1u32..=50, 0u32..=10, 0u32..=30),
        (any::<bool>(), any::<bool>(), motif()),
        (0u32..=3, 0u32..=10, 0u32..=8, 0u32..=4, 0u32..=2),
        // No box, or one in front of n1, n2 or both, of any preset.
        (0u32..=3, 0u32..=0xfff),
    )
        .prop_map(
            |(
                (nodes, duration_s, latency_ms, jitter_ms, loss_permille),
                (subnet_router, one_untrimmed, motif),
                (restarts, streams, pings, flows, link_changes),
                (nat_mask, nat_presets),
            )| Shape {
                nodes,
                duration_s,
                latency_ms,
                jitter_ms,
                loss_permille,
                subnet_router,
                one_untrimmed,
                restarts,
                streams,
                pings,
                flows,
                link_changes,
                motif,
                nat_mask,
                nat_presets,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_under_random_churn(shape in shape(), seed in 0u64..(1 << 63)) {
        let text = shape.to_toml("prop", seed, "");
        let scenario = Scenario::parse("prop.toml", &text).unwrap();
        let report = run(&scenario, RunOptions { seed: Some(seed), backend: None, keep: Keep::Nothing }).unwrap();
        prop_assert!(report.passed, "{}\n{}", text, report.checks_text());
    }
}
