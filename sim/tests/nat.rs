//! The network model end to end: NAT pairs, mapping expiry, rebinding,
//! relay failover, per-link latency and burst loss, run as scenarios
//! (the committed `scenarios/nat-*.toml` and `scenarios/links-*.toml`, and
//! the NAT-pair matrix generated below), plus malformed network sections.
//!
//! The NAT-pair table in `sim/README.md` is this file's output:
//! `cargo test -p wgmesh-sim --test nat nat_pair_table -- --nocapture`.

use std::path::Path;

use wgmesh_sim::report::Report;
use wgmesh_sim::runner::{RunOptions, run};
use wgmesh_sim::scenario::{Backend, Scenario};
use wgmesh_sim::trace::{Keep, TraceEntry};

/// The four NAT types of the table, as scenario presets.
const TYPES: [&str; 4] = ["full-cone", "restricted", "port-restricted", "symmetric"];

/// One-way latency of every hop in the pair scenarios.
const LATENCY_MS: f64 = 20.0;

/// When the sender starts its stream.
const SEND_AT_S: f64 = 2.0;

/// A two-node scenario: `a` behind `nat_a`, `b` behind `nat_b`, a STUN
/// server and a relay; `a` streams to `b` from 2 s to 12 s.
fn pair_scenario(nat_a: &str, nat_b: &str) -> Scenario {
    let text = format!(
        r#"
name = "nat-pair-{nat_a}-{nat_b}"
duration_s = 20
[network]
latency_ms = {LATENCY_MS}
stun = true
relay = true
[[node]]
name = "a"
nat = {{ preset = "{nat_a}" }}
[[node]]
name = "b"
nat = {{ preset = "{nat_b}" }}
[[action]]
at_s = {SEND_AT_S}
do = "send"
from = "a"
to = "b"
count = 100
interval_ms = 100
label = "flow"
[[expect]]
check = "delivery"
label = "flow"
lost = 0
"#
    );
    Scenario::parse("nat-pair", &text).expect("the generated pair scenario parses")
}

fn run_on(scenario: &Scenario, backend: Backend) -> Report {
    run(
        scenario,
        RunOptions {
            backend: Some(backend),
            keep: Keep::All,
            ..RunOptions::default()
        },
    )
    .expect("the scenario runs")
}

/// Whether a `path-changed` detail names a direct path (not the relay).
fn is_direct(detail: &str) -> bool {
    detail
        .split_whitespace()
        .nth(1)
        .is_some_and(|addr| !addr.starts_with("198.51.100.2:"))
}

/// What a pair run showed from `a`'s side: when its path to `b` first
/// became direct (ms after the first send), and whether it ended direct.
struct PairOutcome {
    first_direct_ms: Option<f64>,
    ends_direct: bool,
}

fn pair_outcome(timeline: &[TraceEntry]) -> PairOutcome {
    let changes: Vec<&TraceEntry> = timeline
        .iter()
        .filter(|e| e.node == "a" && e.kind == "path-changed" && e.detail.starts_with("b "))
        .collect();
    let first_direct_ms = changes
        .iter()
        .find(|e| is_direct(&e.detail))
        .map(|e| e.at.as_secs_f64() * 1000.0 - SEND_AT_S * 1000.0);
    let ends_direct = changes.last().is_some_and(|e| is_direct(&e.detail));
    PairOutcome {
        first_direct_ms,
        ends_direct,
    }
}

/// Which pairs RFC 4787's behaviours let two hole-punching nodes reach
/// directly: every pair but a port-restricted or symmetric NAT facing a
/// symmetric one (the symmetric side's mapping towards the peer is not the
/// one STUN reported, and the other side filters by port).
fn direct_possible(a: &str, b: &str) -> bool {
    let port_filtering_against_symmetric =
        |x: &str, y: &str| y == "symmetric" && (x == "port-restricted" || x == "symmetric");
    !(port_filtering_against_symmetric(a, b) || port_filtering_against_symmetric(b, a))
}

fn check_passed(report: &Report) {
    let failed: Vec<String> = report
        .failures()
        .iter()
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect();
    assert!(failed.is_empty(), "{}: {failed:?}", report.scenario);
}

#[test]
fn nat_pair_table() {
    let mut rows = Vec::new();
    let mut direct = 0;
    let mut total = 0;
    for (i, a) in TYPES.iter().enumerate() {
        for b in &TYPES[i..] {
            let scenario = pair_scenario(a, b);
            let report = run_on(&scenario, Backend::Event);
            check_passed(&report);
            let outcome = pair_outcome(&report.timeline);
            // The turmoil backend routes through the same model: the same
            // path, found within its 1 ms ticks of the event backend's time.
            let turmoil = run_on(&scenario, Backend::Turmoil);
            check_passed(&turmoil);
            let on_turmoil = pair_outcome(&turmoil.timeline);
            assert_eq!(on_turmoil.ends_direct, outcome.ends_direct, "{a} / {b}");
            if let (Some(e), Some(t)) = (outcome.first_direct_ms, on_turmoil.first_direct_ms) {
                assert!((e - t).abs() <= 10.0, "{a} / {b}: {e} ms vs {t} ms");
            }
            assert_eq!(
                outcome.ends_direct,
                direct_possible(a, b),
                "{a} / {b}: direct path {} where RFC 4787 says {}",
                outcome.ends_direct,
                direct_possible(a, b)
            );
            total += 1;
            let path = if outcome.ends_direct {
                direct += 1;
                "direct"
            } else {
                "relay"
            };
            let round_trip_ms = 2.0 * LATENCY_MS;
            let (ms, trips) = match outcome.first_direct_ms {
                Some(ms) => (format!("{ms:.0}"), format!("{:.1}", ms / round_trip_ms)),
                None => ("-".into(), "-".into()),
            };
            let delay = report
                .checks
                .iter()
                .find(|c| c.name.starts_with("liveness"))
                .map_or(String::new(), |c| {
                    c.detail
                        .split("longest delay ")
                        .nth(1)
                        .and_then(|d| d.split_whitespace().next())
                        .unwrap_or("")
                        .to_string()
                });
            rows.push(format!("| {a} | {b} | {path} | {ms} | {trips} | {delay} |"));
        }
    }
    println!("| a | b | path | direct after (ms) | round trips | longest delay |");
    println!("|---|---|---|---|---|---|");
    for row in &rows {
        println!("{row}");
    }
    println!(
        "{direct} of {total} pairs direct (RFC 4787 allows {direct}); the others relay with no loss"
    );
}

/// The committed network-model scenarios pass on the backends they name.
#[test]
fn committed_network_scenarios_pass() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut ran = 0;
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .expect("scenarios/ exists")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                (n.starts_with("nat-") || n.starts_with("links-")) && n.ends_with(".toml")
            })
        })
        .collect();
    paths.sort();
    for path in paths {
        let scenario = Scenario::from_file(&path).expect("committed files parse");
        // Both backends, whatever the file lists: the turmoil backend may
        // refuse a file for a feature it lacks (keepalives), nothing else.
        for backend in [Backend::Event, Backend::Turmoil] {
            let options = RunOptions {
                backend: Some(backend),
                keep: Keep::All,
                ..RunOptions::default()
            };
            let report = match run(&scenario, options) {
                Ok(report) => report,
                Err(e) => {
                    let keepalives = scenario
                        .nodes
                        .iter()
                        .any(|n| n.persistent_keepalive_secs.is_some());
                    assert!(
                        backend == Backend::Turmoil && keepalives,
                        "{}: {e}",
                        path.display()
                    );
                    eprintln!("{}: skipped on turmoil: {e}", path.display());
                    continue;
                }
            };
            // A file with a known bug may fail (`tests/scenarios.rs` prints
            // a note when it passes); its own test below pins what it shows.
            if scenario.known_bug.is_none() {
                check_passed(&report);
            }
            ran += 1;
        }
    }
    assert!(ran >= 5, "only {ran} runs of network-model scenarios");
}

/// The network model's sections refuse malformed values with the file and
/// key they sit at.
#[test]
fn malformed_network_sections_are_refused_with_file_and_key() {
    let base = |extra_node: &str, extra: &str| {
        format!(
            "name = \"bad\"\nduration_s = 5\n[network]\nstun = true\n{extra}\n[[node]]\nname = \"a\"\n{extra_node}\n[[node]]\nname = \"b\"\n"
        )
    };
    let cases: [(&str, String, &str, &str); 9] = [
        (
            "unknown mapping",
            base(
                "nat = { mapping = \"cone\", filtering = \"endpoint-independent\" }",
                "",
            ),
            "node.a.nat.mapping",
            "unknown behaviour \"cone\"",
        ),
        (
            "unknown preset",
            base("nat = { preset = \"open\" }", ""),
            "node.a.nat.preset",
            "unknown preset \"open\"",
        ),
        (
            "no behaviour",
            base("nat = { timeout_s = 30 }", ""),
            "node.a.nat.mapping",
            "needs a preset or a mapping",
        ),
        (
            "bad timeout",
            base("nat = { preset = \"symmetric\", timeout_s = 0 }", ""),
            "node.a.nat.timeout_s",
            "outside 1..=86400",
        ),
        (
            "unknown nat key",
            base("nat = { preset = \"symmetric\", hairpinning = true }", ""),
            "hairpinning",
            "unknown field",
        ),
        (
            "burst probability",
            base("", "burst = { enter = 1.5, exit = 0.1 }"),
            "network.burst.enter",
            "not between 0 and 1",
        ),
        (
            "burst never ends",
            base("", "burst = { enter = 0.1, exit = 0 }"),
            "network.burst.exit",
            "last for ever",
        ),
        (
            "link to itself",
            format!("{}[[link]]\na = \"a\"\nb = \"a\"\n", base("", "")),
            "link.b",
            "two different nodes",
        ),
        (
            "link loss",
            format!("{}[[link]]\na = \"a\"\nb = \"b\"\nloss = 2\n", base("", "")),
            "link.loss",
            "not between 0 and 1",
        ),
    ];
    for (what, text, field, message) in cases {
        let err = Scenario::parse("bad-net.toml", &text).expect_err(what);
        let shown = err.to_string();
        assert!(shown.contains("bad-net.toml"), "{what}: {shown}");
        assert!(shown.contains(field), "{what}: {shown} should name {field}");
        assert!(
            shown.contains(message),
            "{what}: {shown} should say {message}"
        );
    }
    let rebind_without_nat = format!(
        "{}[[action]]\nat_s = 1\ndo = \"nat_rebind\"\nnode = \"b\"\n",
        base("", "")
    );
    let err = Scenario::parse("bad-net.toml", &rebind_without_nat).expect_err("no NAT");
    assert!(err.to_string().contains("has no NAT"), "{err}");
    let twice = format!(
        "{}[[link]]\na = \"a\"\nb = \"b\"\n[[link]]\na = \"b\"\nb = \"a\"\n",
        base("", "")
    );
    let err = Scenario::parse("bad-net.toml", &twice).expect_err("a link twice");
    assert!(err.to_string().contains("defined twice"), "{err}");
}

fn load(name: &str) -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(name);
    Scenario::from_file(&path).expect("committed files parse")
}

/// The `path-changed` details of `node` towards `peer`, in order, each as
/// (seconds, direct).
fn path_changes(report: &Report, node: &str, peer: &str) -> Vec<(f64, bool)> {
    report
        .timeline
        .iter()
        .filter(|e| {
            e.node == node && e.kind == "path-changed" && e.detail.starts_with(&format!("{peer} "))
        })
        .map(|e| (e.at.as_secs_f64(), is_direct(&e.detail)))
        .collect()
}

fn delivery_detail<'a>(report: &'a Report, label: &str) -> &'a str {
    report
        .checks
        .iter()
        .find(|c| c.name == format!("delivery {label}"))
        .map_or("", |c| c.detail.as_str())
}

#[test]
fn relay_failover_moves_to_the_relay_on_the_cut_and_back_after_the_heal() {
    let report = run_on(&load("nat-relay-failover.toml"), Backend::Event);
    check_passed(&report);
    let changes = path_changes(&report, "a", "b");
    let direct_before = changes.iter().any(|&(t, d)| d && t < 10.0);
    let relay_during = changes
        .iter()
        .any(|&(t, d)| !d && (10.0..30.0).contains(&t));
    let last = changes.last().copied();
    assert!(direct_before, "{changes:?}");
    assert!(relay_during, "{changes:?}");
    assert!(last.is_some_and(|(t, d)| d && t > 30.0), "{changes:?}");
}

#[test]
fn a_rebinding_is_learnt_by_the_peer_through_disco() {
    let report = run_on(&load("nat-rebinding.toml"), Backend::Event);
    check_passed(&report);
    // b's path to a moves to a new outside port of a's box after 10 s.
    let moved = report.timeline.iter().any(|e| {
        e.node == "b"
            && e.kind == "path-changed"
            && e.at.as_secs_f64() > 10.0
            && e.detail.starts_with("a 198.18.0.1:")
            && !e.detail.starts_with("a 198.18.0.1:41641 ")
    });
    assert!(moved, "b never moved to a's new mapping");
}

#[test]
fn the_keepalive_keeps_the_mapping_and_a_lapsed_one_wakes_over_the_relay_too() {
    let report = run_on(&load("nat-mapping-expiry.toml"), Backend::Event);
    assert!(
        delivery_detail(&report, "kept-after").contains("lost 0 "),
        "{}",
        delivery_detail(&report, "kept-after")
    );
    // While the lapsed direct path is untrusted the wake's datagrams also go
    // over the relay, so the dead mapping costs nothing (it once cost the
    // first datagram: the engine sent it to the direct path alone).
    assert!(
        delivery_detail(&report, "lapsed-after").contains("lost 0 "),
        "{}",
        delivery_detail(&report, "lapsed-after")
    );
}
