//! Runs a [`Scenario`] on a backend and turns what happened into a [`Report`].
//!
//! The schedule is walked in time order. At each point in time the runner
//! first lets the backend process everything due up to that instant, then
//! applies the actions scheduled for it (in file order), then samples the
//! `peer` expectations that ask about that instant.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use wgmesh_core::PingOutcome;

use crate::report::{Check, Report};
use crate::scenario::{Action, ActionKind, Backend, ExpectKind, Scenario, Target};
use crate::tailnet::{FlowState, NodeId, Tailnet};
use crate::trace::{Keep, fmt_time};

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

/// Why a run could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// The requested backend cannot run in this build.
    #[error("backend {0} is not available: {1}")]
    BackendUnavailable(&'static str, String),
}

/// Runs a scenario and checks its expectations.
pub fn run(scenario: &Scenario, options: RunOptions) -> Result<Report, RunError> {
    let seed = options.seed.unwrap_or(scenario.seed);
    match options.backend.unwrap_or(scenario.backend) {
        Backend::Event => Ok(run_event(scenario, seed, options.keep)),
        Backend::Turmoil => crate::turmoil_backend::run(scenario, seed, options.keep),
    }
}

/// Builds the event-backend tailnet a scenario describes.
pub fn build_tailnet(scenario: &Scenario, seed: u64, keep: Keep) -> Tailnet {
    let mut builder = Tailnet::builder()
        .seed(seed)
        .network(scenario.network)
        .knobs(scenario.knobs.clone())
        .keep(keep);
    for spec in &scenario.nodes {
        builder = builder.node_spec(spec.clone());
    }
    builder.build()
}

/// Where labelled actions ended up in the harness's records.
#[derive(Debug, Default)]
pub(crate) struct Labels {
    pub pings: BTreeMap<String, usize>,
    pub streams: BTreeMap<String, usize>,
    pub flows: BTreeMap<String, usize>,
}

fn target_ip(net: &Tailnet, t: &Target) -> IpAddr {
    match t {
        Target::Node { node, family: 6 } => net.ip6(NodeId(*node)),
        Target::Node { node, .. } => net.ip4(NodeId(*node)),
        Target::Ip(ip) => *ip,
    }
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
            let ip = target_ip(net, to);
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
            let ip = target_ip(net, to);
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
            let ip = target_ip(net, to);
            let index = net.start_flow(NodeId(*from), ip, *size, *response_size, label.clone());
            if let Some(l) = label {
                labels.flows.insert(l, index);
            }
        }
        ActionKind::Restart { node, downtime } => net.restart(NodeId(*node), *downtime),
        ActionKind::Partition { a, b } => {
            let a: Vec<NodeId> = a.iter().map(|&i| NodeId(i)).collect();
            let b: Vec<NodeId> = b.iter().map(|&i| NodeId(i)).collect();
            net.partition(&a, &b);
        }
        ActionKind::Heal => net.heal(),
        ActionKind::LinkChange { node, link } => net.link_change(NodeId(*node), *link),
        ActionKind::SetKnob { node, knob, value } => {
            let value = *value;
            let knob = knob.clone();
            net.set_knobs(node.map(NodeId), move |k| match knob.as_str() {
                "keep_full_wg_config" => k.keep_full_wg_config = value,
                "fake_icmp_echo" => k.fake_icmp_echo = value,
                _ => {}
            });
        }
        ActionKind::SetAllowedIps { node, allowed_ips } => {
            net.set_allowed_ips(NodeId(*node), allowed_ips.clone());
        }
        ActionKind::Idle { note } => net.note(None, "idle", note.clone()),
    }
}

fn peer_state(net: &Tailnet, node: usize, peer: usize) -> &'static str {
    match net.is_configured(NodeId(node), NodeId(peer)) {
        Some(true) => "configured",
        Some(false) => "trimmed",
        None => "absent",
    }
}

fn fmt_ms(d: Duration) -> String {
    let micros = d.as_micros();
    format!("{}.{:03}ms", micros / 1000, micros % 1000)
}

fn bound_check<T: PartialOrd + Copy>(
    value: T,
    min: Option<T>,
    max: Option<T>,
    equals: Option<T>,
) -> bool {
    min.is_none_or(|m| value >= m)
        && max.is_none_or(|m| value <= m)
        && equals.is_none_or(|e| value == e)
}

fn bounds_text(min: Option<u64>, max: Option<u64>, equals: Option<u64>) -> String {
    let mut parts = Vec::new();
    if let Some(e) = equals {
        parts.push(format!("= {e}"));
    }
    if let Some(m) = min {
        parts.push(format!(">= {m}"));
    }
    if let Some(m) = max {
        parts.push(format!("<= {m}"));
    }
    parts.join(", ")
}

/// Runs a scenario on the event backend.
pub fn run_event(scenario: &Scenario, seed: u64, keep: Keep) -> Report {
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
    let mut probes: BTreeMap<usize, &'static str> = BTreeMap::new();
    for (at, order, index) in points {
        net.run_until(at);
        if order == 0 {
            apply(&mut net, &schedule[index], &mut labels);
        } else if let ExpectKind::Peer { node, peer, .. } = scenario.expects[index].kind {
            let state = peer_state(&net, node, peer);
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
    evaluate(scenario, seed, &net, &labels, &probes)
}

/// What a backend recorded, in the shape the checks read.
pub(crate) struct Outcomes<'a> {
    pub pings: &'a [crate::tailnet::PingRecord],
    pub streams: &'a [crate::tailnet::StreamRecord],
    pub flows: &'a [crate::tailnet::FlowRecord],
    pub counter: &'a dyn Fn(Option<usize>, &str) -> Option<u64>,
    pub stats: Vec<(&'static str, u64)>,
    pub violations: &'a [crate::tailnet::Violation],
    pub violation_count: u64,
    pub steps: u64,
    pub nodes: usize,
    pub trace: &'a crate::trace::Trace,
    pub backend: &'static str,
}

fn evaluate(
    scenario: &Scenario,
    seed: u64,
    net: &Tailnet,
    labels: &Labels,
    probes: &BTreeMap<usize, &'static str>,
) -> Report {
    let counter = |node: Option<usize>, name: &str| net.counter(node.map(NodeId), name);
    let outcomes = Outcomes {
        pings: net.pings(),
        streams: net.streams(),
        flows: net.flows(),
        counter: &counter,
        stats: net.stats().iter(),
        violations: net.violations(),
        violation_count: net.stats().violations,
        steps: net.stats().steps,
        nodes: net.len(),
        trace: net.trace(),
        backend: "event",
    };
    evaluate_outcomes(scenario, seed, &outcomes, labels, probes)
}

pub(crate) fn evaluate_outcomes(
    scenario: &Scenario,
    seed: u64,
    net: &Outcomes<'_>,
    labels: &Labels,
    probes: &BTreeMap<usize, &'static str>,
) -> Report {
    let mut checks = Vec::new();
    for (i, e) in scenario.expects.iter().enumerate() {
        let label = e.label.clone().unwrap_or_default();
        let check = match &e.kind {
            ExpectKind::Ping {
                outcome,
                min_latency,
                max_latency,
            } => {
                let record = labels.pings.get(&label).map(|&p| &net.pings[p]);
                match record {
                    None => Check {
                        name: format!("ping {label}"),
                        passed: false,
                        detail: "the ping never started".into(),
                    },
                    Some(r) => {
                        let got = r.outcome_name();
                        let elapsed = r.elapsed();
                        let latency = match &r.result {
                            Some((_, PingOutcome::Pong { latency, .. })) => Some(*latency),
                            _ => elapsed,
                        };
                        let outcome_ok = outcome.as_deref().is_none_or(|o| o == got);
                        let latency_ok = latency
                            .is_some_and(|l| bound_check(l, *min_latency, *max_latency, None))
                            || (min_latency.is_none() && max_latency.is_none());
                        let mut detail = got.to_string();
                        if let Some(l) = latency {
                            detail.push_str(&format!(" after {}", fmt_ms(l)));
                        }
                        if let Some((_, PingOutcome::Error { message, .. })) = &r.result {
                            detail.push_str(&format!(" ({message})"));
                        }
                        let mut want = Vec::new();
                        if let Some(o) = outcome {
                            want.push(o.clone());
                        }
                        if let Some(m) = min_latency {
                            want.push(format!(">= {}", fmt_ms(*m)));
                        }
                        if let Some(m) = max_latency {
                            want.push(format!("<= {}", fmt_ms(*m)));
                        }
                        detail.push_str(&format!("; want {}", want.join(" ")));
                        Check {
                            name: format!("ping {label}"),
                            passed: outcome_ok && latency_ok,
                            detail,
                        }
                    }
                }
            }
            ExpectKind::Peer {
                at,
                node,
                peer,
                state,
            } => {
                let got = probes.get(&i).copied().unwrap_or("unsampled");
                Check {
                    name: format!(
                        "peer {} at {} on {}",
                        scenario.nodes[*peer].name,
                        fmt_time(*at),
                        scenario.nodes[*node].name
                    ),
                    passed: got == state,
                    detail: format!("{got}; want {state}"),
                }
            }
            ExpectKind::Delivery {
                delivered,
                min_delivered,
                lost,
                min_lost,
                max_lost,
                max_loss_run,
                min_loss_run,
            } => match labels.streams.get(&label).map(|&s| &net.streams[s]) {
                None => Check {
                    name: format!("delivery {label}"),
                    passed: false,
                    detail: "the stream never started".into(),
                },
                Some(s) => {
                    let d = s.delivered_count();
                    let l = s.lost_count();
                    let run = s.longest_loss_run();
                    let ok = bound_check(d, *min_delivered, None, *delivered)
                        && bound_check(l, *min_lost, *max_lost, *lost)
                        && bound_check(run, *min_loss_run, *max_loss_run, None);
                    Check {
                        name: format!("delivery {label}"),
                        passed: ok,
                        detail: format!(
                            "sent {} delivered {d} lost {l} longest loss run {run} (duplicates {})",
                            s.sent.len(),
                            s.duplicates
                        ),
                    }
                }
            },
            ExpectKind::Recovery { since, min, max } => {
                match labels.streams.get(&label).map(|&s| &net.streams[s]) {
                    None => Check {
                        name: format!("recovery {label}"),
                        passed: false,
                        detail: "the stream never started".into(),
                    },
                    Some(s) => {
                        let r = s.recovery_after(*since);
                        let ok = match r {
                            Some(r) => bound_check(r, *min, *max, None),
                            None => max.is_none(),
                        };
                        let mut want = Vec::new();
                        if let Some(m) = min {
                            want.push(format!(">= {}", fmt_ms(*m)));
                        }
                        if let Some(m) = max {
                            want.push(format!("<= {}", fmt_ms(*m)));
                        }
                        Check {
                            name: format!("recovery {label} since {}", fmt_time(*since)),
                            passed: ok,
                            detail: format!(
                                "{}; want {}",
                                r.map_or_else(
                                    || "never recovered".to_string(),
                                    |r| format!("recovered after {}", fmt_ms(r))
                                ),
                                want.join(" ")
                            ),
                        }
                    }
                }
            }
            ExpectKind::Flow {
                outcome,
                max,
                min_retransmits,
                max_retransmits,
            } => match labels.flows.get(&label).map(|&f| &net.flows[f]) {
                None => Check {
                    name: format!("flow {label}"),
                    passed: false,
                    detail: "the flow never started".into(),
                },
                Some(f) => {
                    let got = match f.state {
                        FlowState::Done => "completed",
                        FlowState::Failed => "failed",
                        _ => "unfinished",
                    };
                    let ok = outcome.as_deref().is_none_or(|o| o == got)
                        && max.is_none_or(|m| f.completion_time().is_some_and(|t| t <= m))
                        && bound_check(f.retransmits, *min_retransmits, *max_retransmits, None);
                    Check {
                        name: format!("flow {label}"),
                        passed: ok,
                        detail: format!(
                            "{got}{} with {} retransmits",
                            f.completion_time()
                                .map_or_else(String::new, |t| format!(" in {}", fmt_ms(t))),
                            f.retransmits
                        ),
                    }
                }
            },
            ExpectKind::Counter {
                counter,
                node,
                min,
                max,
                equals,
            } => {
                let value = (net.counter)(*node, counter).unwrap_or(0);
                let whose = node.map_or_else(
                    || "all nodes".to_string(),
                    |n| scenario.nodes[n].name.clone(),
                );
                Check {
                    name: format!("counter {counter} on {whose}"),
                    passed: bound_check(value, *min, *max, *equals),
                    detail: format!("{value}; want {}", bounds_text(*min, *max, *equals)),
                }
            }
            ExpectKind::Stat {
                stat,
                min,
                max,
                equals,
            } => {
                let value = net
                    .stats
                    .iter()
                    .copied()
                    .find(|(k, _)| k == stat)
                    .map_or(0, |(_, v)| v);
                Check {
                    name: format!("stat {stat}"),
                    passed: bound_check(value, *min, *max, *equals),
                    detail: format!("{value}; want {}", bounds_text(*min, *max, *equals)),
                }
            }
        };
        checks.push(check);
    }
    let violations = net.violations;
    checks.push(Check {
        name: "invariants".into(),
        passed: net.violation_count == 0,
        detail: if violations.is_empty() {
            format!("held after each of {} steps", net.steps)
        } else {
            let first: Vec<String> = violations
                .iter()
                .take(3)
                .map(|v| format!("{} {}: {}", fmt_time(v.at), v.node, v.message))
                .collect();
            format!(
                "{} violations, first: {}",
                net.violation_count,
                first.join("; ")
            )
        },
    });
    let unfinished = net.pings.iter().filter(|p| p.result.is_none()).count();
    checks.push(Check {
        name: "every ping ended".into(),
        passed: unfinished == 0,
        detail: format!("{} pings, {unfinished} unfinished", net.pings.len()),
    });
    let passed = checks.iter().all(|c| c.passed);
    let mut metrics: Vec<(String, f64)> = net
        .stats
        .iter()
        .map(|(k, v)| (k.to_string(), *v as f64))
        .collect();
    // Handshakes refused as replays: in the simulator these come from the
    // TAI64N caveat (see sim/README.md), the one place where the wall clock
    // can reach a run, so a run with any of them deserves a second look.
    let stale = (net.counter)(None, "drop_wg_stale_timestamp").unwrap_or(0);
    metrics.push(("stale_timestamp_drops".into(), stale as f64));
    metrics.push(("nodes".into(), net.nodes as f64));
    metrics.push(("trace_entries".into(), net.trace.len() as f64));
    Report {
        scenario: scenario.name.clone(),
        seed,
        backend: net.backend.into(),
        passed,
        checks,
        metrics,
        trace_hash: net.trace.hash_hex(),
        virtual_secs: scenario.duration.as_secs_f64(),
        wall_secs: 0.0,
        timeline: net.trace.entries().to_vec(),
    }
}
