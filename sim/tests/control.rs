//! The simulated tailnet under the real coordination server
//! (`wgmesh-control`): the scenarios of `sim/scenarios` about control, with
//! assertions of their own, and the server's faults (a restart, a cut to
//! some nodes, a late push) driven through the `Tailnet` API.

use std::path::Path;
use std::time::Duration;

use wgmesh_sim::runner::{RunOptions, run};
use wgmesh_sim::scenario::{Backend, Scenario};
use wgmesh_sim::{Keep, Tailnet, TraceEntry};

/// The first trace entry of `kind` at `node` at or after `since` whose
/// detail contains `needle`.
fn find<'a>(
    entries: &'a [TraceEntry],
    node: &str,
    kind: &str,
    needle: &str,
    since: Duration,
) -> Option<&'a TraceEntry> {
    entries
        .iter()
        .find(|e| e.at >= since && e.node == node && e.kind == kind && e.detail.contains(needle))
}

fn metric(report: &wgmesh_sim::report::Report, name: &str) -> f64 {
    report
        .metrics
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no metric {name} in {:?}", report.metrics))
}

/// Alpha and beta on a 20 ms network with a 200 ms control delay, the
/// trace kept, one second after the start (both have their netmaps).
fn alpha_and_beta(seed: u64) -> (Tailnet, wgmesh_sim::NodeId, wgmesh_sim::NodeId) {
    let mut net = Tailnet::builder()
        .seed(seed)
        .latency(Duration::from_millis(20))
        .control_delay(Duration::from_millis(200))
        .node("alpha")
        .node("beta")
        .keep_trace(true)
        .build();
    let (alpha, beta) = (net.id("alpha").unwrap(), net.id("beta").unwrap());
    net.run_for(Duration::from_secs(1));
    (net, alpha, beta)
}

/// (a) beta restarts; alpha's traffic to it is back one handshake round
/// trip plus one way after the server's push of beta's new disco key, the
/// first datagram alpha sends after the push included.
#[test]
fn a_restart_recovers_one_round_trip_after_the_push() {
    let latency = Duration::from_millis(20);
    let interval = Duration::from_millis(10);
    let (mut net, alpha, beta) = alpha_and_beta(31);
    let ip = net.ip4(beta);
    let stream = net.send_stream(alpha, ip, 3000, interval, 64, None);
    net.run_until(Duration::from_secs(20));
    net.restart(beta, Duration::ZERO);
    net.run_until(Duration::from_secs(25));
    let restart = Duration::from_secs(20);
    let push = find(
        net.trace().entries(),
        "alpha",
        "peer-delta",
        "flushed=1",
        restart,
    )
    .expect("alpha applied beta's new disco key as a peer delta")
    .at;
    assert_eq!(
        push,
        restart + Duration::from_millis(200),
        "the push reaches alpha one control delay after the restart"
    );
    let recovery = net.streams()[stream]
        .recovery_after(push)
        .expect("the stream recovered");
    let round_trip_plus_one_way = latency * 3;
    assert!(
        recovery <= round_trip_plus_one_way + interval,
        "recovered {recovery:?} after the push; want at most one round trip plus one way ({round_trip_plus_one_way:?}) after the next send"
    );
    assert_eq!(net.counter(Some(alpha), "sessions_flushed"), Some(1));
    assert!(net.violations().is_empty(), "{:?}", net.violations());
}

/// The same through the scenario file, on both backends.
#[test]
fn restart_scenario_passes_on_both_backends() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/restart-recovers-after-push.toml");
    let scenario = Scenario::from_file(&path).unwrap();
    for backend in [Backend::Event, Backend::Turmoil] {
        let report = run(
            &scenario,
            RunOptions {
                seed: None,
                backend: Some(backend),
                keep: Keep::Nothing,
            },
        )
        .unwrap();
        assert!(report.passed, "{backend:?}: {:?}", report.failures());
        assert!(metric(&report, "control_deltas_sent") >= 2.0);
    }
}

/// (b) The server restarts (5 s down): no datagram is lost, every node
/// reconnects to the restored server, which still knows every node.
#[test]
fn a_server_restart_loses_no_node() {
    let mut builder = Tailnet::builder()
        .seed(41)
        .latency(Duration::from_millis(15))
        .control_delay(Duration::from_millis(100))
        .keep_trace(true);
    for name in ["alpha", "beta", "gamma", "delta"] {
        builder = builder.node(name);
    }
    let mut net = builder.build();
    let ids: Vec<_> = ["alpha", "beta", "gamma", "delta"]
        .iter()
        .map(|n| net.id(n).unwrap())
        .collect();
    net.run_for(Duration::from_secs(1));
    assert_eq!(net.control_streams(), 4);
    let mut streams = Vec::new();
    for (from, to) in [(0, 1), (1, 2), (2, 3), (3, 0)] {
        let ip = net.ip4(ids[to]);
        streams.push(net.send_stream(ids[from], ip, 600, Duration::from_millis(100), 64, None));
    }
    net.run_until(Duration::from_secs(30));
    net.restart_control(Duration::from_secs(5));
    net.run_until(Duration::from_secs(31));
    assert_eq!(
        net.control_streams(),
        0,
        "every stream closed with the server"
    );
    net.run_until(Duration::from_secs(70));
    assert_eq!(net.control_streams(), 4, "every node is back on a stream");
    for s in streams {
        let record = &net.streams()[s];
        assert_eq!(record.lost_count(), 0, "stream {s} lost datagrams");
    }
    let restored = find(
        net.trace().entries(),
        "-",
        "control-up",
        "restored 4 nodes",
        Duration::ZERO,
    );
    assert!(
        restored.is_some(),
        "the server restored all 4 nodes from its records"
    );
    // Each node got a full netmap from the restored server.
    for name in ["alpha", "beta", "gamma", "delta"] {
        assert!(
            find(
                net.trace().entries(),
                name,
                "netmap",
                "3 peers",
                Duration::from_secs(35)
            )
            .is_some(),
            "{name} got no full netmap after the server came back"
        );
    }
    assert_eq!(net.control_stats().restarts, 1);
    assert!(net.violations().is_empty(), "{:?}", net.violations());
}

/// (c) A policy change cuts alpha -> beta within one push; alpha -> gamma
/// goes on (the scenario file, on both backends, plus the cut's timing).
#[test]
fn a_policy_change_cuts_a_flow_within_one_push() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/policy-change-cuts-flow.toml");
    let scenario = Scenario::from_file(&path).unwrap();
    for backend in [Backend::Event, Backend::Turmoil] {
        let report = run(
            &scenario,
            RunOptions {
                seed: None,
                backend: Some(backend),
                keep: Keep::Nothing,
            },
        )
        .unwrap();
        assert!(report.passed, "{backend:?}: {:?}", report.failures());
    }
    let mut net = wgmesh_sim::backend::event::build_tailnet(&scenario, scenario.seed, Keep::All);
    let (alpha, beta, gamma) = (
        net.id("alpha").unwrap(),
        net.id("beta").unwrap(),
        net.id("gamma").unwrap(),
    );
    net.run_until(Duration::from_secs(1));
    let to_beta = net.send_stream(
        alpha,
        net.ip4(beta),
        1500,
        Duration::from_millis(10),
        64,
        None,
    );
    let to_gamma = net.send_stream(
        alpha,
        net.ip4(gamma),
        1500,
        Duration::from_millis(10),
        64,
        None,
    );
    net.run_until(Duration::from_secs(10));
    let policy = wgmesh_control::Policy::parse(
        "[[acls]]\naction = \"accept\"\nsrc = [\"100.64.0.1\"]\ndst = [\"100.64.0.3:*\"]\n",
        "test",
    )
    .unwrap();
    net.set_policy(policy);
    // Both streams end at 16 s; the last datagrams land by 16.02 s.
    net.run_until(Duration::from_secs(17));
    let push = Duration::from_secs(10) + Duration::from_millis(100);
    let last_sent_and_delivered = net.streams()[to_beta]
        .sent
        .iter()
        .zip(&net.streams()[to_beta].delivered)
        .filter(|(_, d)| d.is_some())
        .map(|(s, _)| *s)
        .max()
        .unwrap();
    assert!(
        last_sent_and_delivered < push,
        "a datagram sent at {last_sent_and_delivered:?}, after the push at {push:?}, still arrived"
    );
    assert_eq!(net.streams()[to_gamma].lost_count(), 0);
    assert_eq!(
        net.is_configured(alpha, beta),
        None,
        "beta left alpha's peers"
    );
    assert!(net.violations().is_empty(), "{:?}", net.violations());
}

/// (d) One node restarts in a tailnet of `nodes`: what the server sends
/// for that change.
fn bytes_per_restart(nodes: usize) -> f64 {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/large/thousand-node-restart.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replace("node_count = 1000", &format!("node_count = {nodes}"));
    assert!(text.contains(&format!("node_count = {nodes}")));
    let scenario = Scenario::parse(&path.display().to_string(), &text).unwrap();
    let report = run(
        &scenario,
        RunOptions {
            seed: None,
            backend: Some(Backend::Event),
            keep: Keep::Nothing,
        },
    )
    .unwrap();
    assert!(report.passed, "{nodes} nodes: {:?}", report.failures());
    metric(&report, "control_bytes_per_change")
}

/// (d) at test size: the 1,000-node file with 50 and 100 nodes. A restart
/// costs the server O(peers of the node): twice the peers, about twice the
/// bytes, and a few hundred bytes per peer.
#[test]
fn a_restart_costs_the_server_bytes_linear_in_its_peers() {
    let fifty = bytes_per_restart(50);
    let hundred = bytes_per_restart(100);
    let per_peer = hundred / 99.0;
    assert!(
        (100.0..800.0).contains(&per_peer),
        "{hundred} bytes for 99 peers ({per_peer:.0} per peer)"
    );
    let ratio = hundred / fifty;
    assert!(
        (1.8..2.3).contains(&ratio),
        "50 nodes: {fifty} bytes, 100 nodes: {hundred} bytes (ratio {ratio:.2}); want linear"
    );
}

/// A node cut from the server misses beta's restart; it keeps its data
/// plane (WireGuard still reaches beta by node key) and, once the cut
/// heals, the next keep-alive shows it missed messages: it reconnects and
/// its full netmap carries beta's new disco key.
#[test]
fn a_node_cut_from_the_server_catches_up_after_the_heal() {
    let (mut net, alpha, beta) = alpha_and_beta(71);
    let ip = net.ip4(beta);
    let stream = net.send_stream(alpha, ip, 1200, Duration::from_millis(100), 64, None);
    net.run_until(Duration::from_secs(10));
    net.partition_control(&[alpha]);
    net.run_until(Duration::from_secs(20));
    net.restart(beta, Duration::ZERO);
    net.run_until(Duration::from_secs(40));
    assert!(
        find(
            net.trace().entries(),
            "alpha",
            "peer-delta",
            "flushed=1",
            Duration::from_secs(20)
        )
        .is_none(),
        "alpha cannot have heard of beta's new key while cut off"
    );
    // The data plane does not wait for control: without beta's new disco
    // key alpha's old session is refused by beta's new engine only until
    // WireGuard's own timers start a new handshake.
    let recovery = net.streams()[stream]
        .recovery_after(Duration::from_secs(20))
        .expect("alpha's traffic reached the restarted beta");
    assert!(
        recovery < Duration::from_secs(20),
        "recovered after {recovery:?}"
    );
    net.heal();
    net.run_until(Duration::from_secs(100));
    let caught_up = find(
        net.trace().entries(),
        "alpha",
        "reconfig",
        "flushed=1",
        Duration::from_secs(40),
    )
    .expect("alpha learned beta's new disco key after the heal");
    assert!(
        caught_up.at <= Duration::from_secs(40) + Duration::from_secs(35),
        "alpha caught up at {:?}; want within a keep-alive period (30 s) and a retry of the heal",
        caught_up.at
    );
    assert!(
        find(
            net.trace().entries(),
            "alpha",
            "control-retry",
            "missed map messages",
            Duration::from_secs(40)
        )
        .is_some()
    );
    assert!(net.violations().is_empty(), "{:?}", net.violations());
}

/// A late push: alpha's own control delay is 2 s, so it learns beta's new
/// disco key 1.1 s after beta's restart (0.1 s beta -> server, 1 s server
/// -> alpha), while gamma (the default 200 ms) learns it at 0.2 s.
#[test]
fn a_node_with_a_late_control_link_learns_late() {
    let text = r#"
name = "late-push"
duration_s = 30
[network]
latency_ms = 20
control_delay_ms = 200
[[node]]
name = "alpha"
control_delay_ms = 2000
[[node]]
name = "beta"
[[node]]
name = "gamma"
"#;
    let scenario = Scenario::parse("late-push.toml", text).unwrap();
    let mut net = wgmesh_sim::backend::event::build_tailnet(&scenario, 1, Keep::All);
    let beta = net.id("beta").unwrap();
    net.run_until(Duration::from_secs(20));
    net.restart(beta, Duration::ZERO);
    net.run_until(Duration::from_secs(30));
    let entries = net.trace().entries();
    let restart = Duration::from_secs(20);
    let alpha_at = find(entries, "alpha", "peer-delta", "flushed=1", restart)
        .map(|e| e.at)
        .or_else(|| find(entries, "alpha", "peer-delta", "applied", restart).map(|e| e.at));
    let gamma_at = find(entries, "gamma", "peer-delta", "applied", restart).map(|e| e.at);
    assert_eq!(gamma_at, Some(restart + Duration::from_millis(200)));
    assert_eq!(alpha_at, Some(restart + Duration::from_millis(1100)));
}

/// An endpoint update that never reaches the server is sent again. Beta
/// moves (a major link change) while it is cut from the server, so its
/// update is lost; after the heal its client sends it again once 5 s pass
/// without the server's answer, and alpha, which only ever sends to beta,
/// learns the new endpoint from control and reaches beta there. Before the
/// retry, one lost update left alpha sending to the old address for good
/// (three pairs of `sim/tests/soak.rs`'s short soak never answered).
#[test]
fn a_lost_endpoint_update_is_sent_again() {
    let (mut net, alpha, beta) = alpha_and_beta(73);
    net.partition_control(&[beta]);
    net.run_until(Duration::from_secs(2));
    net.link_change(beta, wgmesh_sim::LinkKind::Major);
    net.run_until(Duration::from_secs(3));
    let moved = Duration::from_secs(2);
    let lost = find(
        net.trace().entries(),
        "beta",
        "to-control-drop",
        "endpoint-update partition",
        moved,
    );
    assert!(lost.is_some(), "beta's update was lost to the cut");
    net.heal();
    net.run_until(Duration::from_secs(20));
    let retry = find(
        net.trace().entries(),
        "beta",
        "control-retry",
        "endpoint update unanswered",
        moved,
    )
    .expect("beta sent its update again");
    assert!(
        retry.at <= moved + Duration::from_secs(6),
        "sent again at {:?}; want 5 s after the first try",
        retry.at
    );
    let ip = net.ip4(beta);
    let stream = net.send_stream(alpha, ip, 20, Duration::from_millis(100), 64, None);
    net.run_until(Duration::from_secs(30));
    let record = &net.streams()[stream];
    assert!(
        record.delivered.iter().all(Option::is_some),
        "alpha reached beta at its new endpoint: {:?}",
        record.delivered
    );
    assert!(net.violations().is_empty(), "{:?}", net.violations());
}

/// A route the server refuses (here: it is down) is not the node's in the
/// simulated world either. Before, the world moved the subnet at once, so
/// alpha's sends into it counted as activity with beta, whom alpha had
/// trimmed and whose netmap never changed, and the invariants failed on a
/// correct engine ("peer beta active 0 ms ago is not configured").
#[test]
fn a_refused_route_leaves_the_world_as_control_describes_it() {
    let text = r#"
name = "refused-route"
description = "a route approved while the server is down"
seed = 3
duration_s = 400

[network]
latency_ms = 20
control_delay_ms = 200

[[node]]
name = "alpha"

[[node]]
name = "beta"
subnets = ["10.55.0.0/24"]

[[action]]
at_s = 0.5
do = "set_allowed_ips"
node = "beta"
allowed_ips = ["100.64.0.2/32", "fd7a:115c:a1e0::2/128"]

[[action]]
at_s = 1
do = "send"
from = "alpha"
to = "beta"
count = 1
interval_ms = 100

[[action]]
at_s = 320
do = "control_restart"
downtime_s = 30

[[action]]
at_s = 325
do = "set_allowed_ips"
node = "beta"
allowed_ips = ["100.64.0.2/32", "fd7a:115c:a1e0::2/128", "10.55.0.0/24"]

[[action]]
at_s = 330.05
do = "send"
from = "alpha"
ip = "10.55.0.1"
count = 10
interval_ms = 100
label = "into-subnet"

[[expect]]
check = "peer"
at_s = 329
node = "alpha"
peer = "beta"
state = "trimmed"

[[expect]]
check = "delivery"
label = "into-subnet"
lost = 10

[[expect]]
check = "counter"
counter = "drop_no_peer_for_dst"
node = "alpha"
equals = 10
"#;
    let scenario = Scenario::parse("refused-route.toml", text).unwrap();
    for backend in [Backend::Event, Backend::Turmoil] {
        let report = run(
            &scenario,
            RunOptions {
                seed: None,
                backend: Some(backend),
                keep: Keep::Nothing,
            },
        )
        .unwrap();
        assert!(report.passed, "{backend:?}: {:?}", report.failures());
    }
}

/// A route the node does not advertise could only ever be refused: the
/// file is refused when it is loaded, at the action's line.
#[test]
fn a_route_the_node_does_not_advertise_is_refused_at_load() {
    let text = r#"
name = "unadvertised"
duration_s = 10

[[node]]
name = "alpha"

[[node]]
name = "beta"

[[action]]
at_s = 1
do = "set_allowed_ips"
node = "beta"
allowed_ips = ["100.64.0.2/32", "10.55.0.0/24"]
"#;
    let err = Scenario::parse("unadvertised.toml", text).expect_err("refused");
    let shown = err.to_string();
    assert!(shown.contains("unadvertised.toml:11"), "{shown}");
    assert!(shown.contains("does not advertise 10.55.0.0/24"), "{shown}");
}
