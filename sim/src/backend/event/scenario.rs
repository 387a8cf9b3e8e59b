//! Running a scenario file on the event backend: the schedule is walked in
//! time order; at each point the tailnet first processes everything due up
//! to that instant, then the actions scheduled for it are applied (in file
//! order), then the `peer` expectations that ask about that instant are
//! sampled.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use super::state::Tailnet;
use crate::evaluate::{Labels, Outcomes, Probes, evaluate_outcomes, peer_state};
use crate::report::{Check, Report};
use crate::scenario::{Action, ActionKind, CounterScope, ExpectKind, Scenario};
use crate::trace::Keep;
use crate::world::NodeId;
use crate::world::spec::set_knob;

/// Builds the event-backend tailnet a scenario describes.
pub fn build_tailnet(scenario: &Scenario, seed: u64, keep: Keep) -> Tailnet {
    let mut builder = Tailnet::builder()
        .seed(seed)
        .network(scenario.network.clone())
        .knobs(scenario.knobs.clone())
        .keep(keep);
    if let Some(text) = &scenario.policy {
        // Checked when the scenario was loaded; a policy that no longer
        // parses runs under the default rather than a guess.
        if let Ok(policy) = wgmesh_control::Policy::parse(text, "policy") {
            builder = builder.policy(policy);
        }
    }
    for spec in &scenario.nodes {
        builder = builder.node_spec(spec.clone());
    }
    builder.build()
}
fn apply(net: &mut Tailnet, action: &Action, labels: &mut Labels) {
    let label = action.label.clone();
    match &action.kind {
        ActionKind::Send {
            from,
            to,
            count,
            interval,
            size,
        } => {
            let ip = to.ip();
            let index = net.send_stream(NodeId(*from), ip, *count, *interval, *size, label.clone());
            if let Some(l) = label {
                labels.streams.insert(l, index);
            }
        }
        ActionKind::Ping {
            from,
            to,
            kind,
            size,
        } => {
            let ip = to.ip();
            let index = net.ping(NodeId(*from), ip, *kind, *size, label.clone());
            if let Some(l) = label {
                labels.pings.insert(l, index);
            }
        }
        ActionKind::Flow {
            from,
            to,
            size,
            response_size,
        } => {
            let ip = to.ip();
            let index = net.start_flow(NodeId(*from), ip, *size, *response_size, label.clone());
            if let Some(l) = label {
                labels.flows.insert(l, index);
            }
        }
        ActionKind::Restart { node, downtime } => net.restart(NodeId(*node), *downtime),
        ActionKind::RestoreDiscoKey { node, downtime } => {
            net.restore_disco_key(NodeId(*node), *downtime)
        }
        ActionKind::Partition { a, b, one_way } => {
            let a: Vec<NodeId> = a.iter().map(|&i| NodeId(i)).collect();
            let b: Vec<NodeId> = b.iter().map(|&i| NodeId(i)).collect();
            if *one_way {
                net.partition_one_way(&a, &b);
            } else {
                net.partition(&a, &b);
            }
        }
        ActionKind::Heal => net.heal(),
        ActionKind::LinkChange { node, link } => net.link_change(NodeId(*node), *link),
        ActionKind::SetKnob { node, knob, value } => {
            net.set_knobs(node.map(NodeId), |k| set_knob(k, knob, *value));
        }
        ActionKind::SetAllowedIps { node, allowed_ips } => {
            net.set_allowed_ips(NodeId(*node), allowed_ips.clone());
        }
        ActionKind::SetPolicy { policy } => match wgmesh_control::Policy::parse(policy, "policy") {
            Ok(policy) => net.set_policy(policy),
            // Checked when the scenario was loaded.
            Err(e) => net.note(None, "policy-refused", e.to_string()),
        },
        ActionKind::ControlRestart { downtime } => net.restart_control(*downtime),
        ActionKind::ControlPartition { nodes } => {
            let nodes: Vec<NodeId> = nodes.iter().map(|&i| NodeId(i)).collect();
            net.partition_control(&nodes);
        }
        ActionKind::Idle { note } => net.note(None, "idle", note.clone()),
        ActionKind::NatRebind { node } => net.nat_rebind(NodeId(*node)),
    }
}

/// Runs a scenario on the event backend (a panic becomes a failed check).
pub fn run(scenario: &Scenario, seed: u64, keep: Keep) -> Report {
    let wall = Instant::now();
    let outcome = catch_unwind(AssertUnwindSafe(|| simulate(scenario, seed, keep)));
    let wall_secs = wall.elapsed().as_secs_f64();
    match outcome {
        Ok(mut report) => {
            report.wall_secs = wall_secs;
            report.metrics.push((
                "virtual_per_wall".into(),
                (report.speed() * 10.0).round() / 10.0,
            ));
            report
        }
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Report {
                scenario: scenario.name.clone(),
                seed,
                backend: "event".into(),
                passed: false,
                checks: vec![Check {
                    name: "no panic".into(),
                    passed: false,
                    detail: message,
                }],
                metrics: Vec::new(),
                trace_hash: String::new(),
                virtual_secs: 0.0,
                wall_secs,
                timeline: Vec::new(),
            }
        }
    }
}

fn simulate(scenario: &Scenario, seed: u64, keep: Keep) -> Report {
    let mut net = build_tailnet(scenario, seed, keep);
    let schedule = scenario.schedule(seed);
    // Points in time: actions (order 0) before probes (order 1) at the same instant.
    let points = scenario.points(&schedule);
    let mut labels = Labels::default();
    let mut probes = Probes::new();
    // The server's map bytes before the first change, and the changes.
    let mut boot_bytes: Option<u64> = None;
    let mut changes = 0u64;
    for (at, order, index) in points {
        net.run_until(at);
        if order == 0 {
            if is_control_change(&schedule[index].kind) {
                boot_bytes.get_or_insert(net.control_stats().map_bytes);
                changes += 1;
            }
            apply(&mut net, &schedule[index], &mut labels);
        } else if let ExpectKind::Peer { node, peer, .. } = scenario.expects[index].kind {
            let state = peer_state(net.is_configured(NodeId(node), NodeId(peer)));
            let detail = format!(
                "{} sees {}: {state}",
                scenario.nodes[node].name, scenario.nodes[peer].name
            );
            net.note(Some(NodeId(node)), "probe", detail);
            probes.insert(index, state);
        }
    }
    net.run_until(scenario.duration);
    net.check_all();
    let mut report = evaluate(scenario, seed, &net, &labels, &probes);
    let total = net.control_stats().map_bytes;
    let boot = boot_bytes.unwrap_or(total);
    report
        .metrics
        .push(("control_bytes_boot".into(), boot as f64));
    if changes > 0 {
        report.metrics.push((
            "control_bytes_per_change".into(),
            ((total - boot) as f64 / changes as f64).round(),
        ));
    }
    // What the network model did (NAT drops by reason, relayed datagrams,
    // STUN answers), for scenarios that have one.
    for (name, count) in net.fabric_counts() {
        let name = format!("net_{}", name.replace('-', "_"));
        report.metrics.push((name, count as f64));
    }
    report
}

/// Whether an action makes the coordination server tell nodes something:
/// the changes `control_bytes_per_change` divides the server's map bytes by
/// (everything it sent after the first of them).
fn is_control_change(kind: &ActionKind) -> bool {
    match kind {
        ActionKind::Restart { .. }
        | ActionKind::RestoreDiscoKey { .. }
        | ActionKind::LinkChange { .. }
        | ActionKind::SetAllowedIps { .. }
        | ActionKind::SetPolicy { .. }
        | ActionKind::ControlRestart { .. } => true,
        ActionKind::Send { .. }
        | ActionKind::Ping { .. }
        | ActionKind::Flow { .. }
        | ActionKind::Partition { .. }
        | ActionKind::Heal
        | ActionKind::SetKnob { .. }
        | ActionKind::ControlPartition { .. }
        | ActionKind::NatRebind { .. }
        | ActionKind::Idle { .. } => false,
    }
}
fn evaluate(
    scenario: &Scenario,
    seed: u64,
    net: &Tailnet,
    labels: &Labels,
    probes: &Probes,
) -> Report {
    let counter = |node: Option<usize>, name: &str, scope: CounterScope| {
        net.counter_in(node.map(NodeId), name, scope)
    };
    let mut stats = net.stats().iter();
    stats.extend(net.control_stats().iter());
    let outcomes = Outcomes {
        pings: net.pings(),
        streams: net.streams(),
        flows: net.flows(),
        counter: &counter,
        stats,
        violations: net.violations(),
        violation_count: net.stats().violations,
        steps: net.stats().steps,
        nodes: net.len(),
        trace: net.trace(),
        backend: "event",
    };
    evaluate_outcomes(scenario, seed, &outcomes, labels, probes)
}
