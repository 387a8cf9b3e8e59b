//! Turns what a backend recorded into a [`Report`]: the scenario's checks,
//! the invariants and every-ping-ended checks, metrics and the trace hash.
//!
//! Both backends hand over their records as `Outcomes`; the checks never
//! look at a backend directly, so a check (or a liveness oracle) added here
//! holds on both.

use std::collections::BTreeMap;
use std::time::Duration;

use wgmesh_core::PingOutcome;

use crate::report::{Check, Report};
use crate::scenario::{CounterScope, ExpectKind, Scenario};
use crate::trace::{Trace, fmt_time};
use crate::world::{FlowRecord, FlowState, PingRecord, StreamRecord, Violation};

/// Why a run could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// The requested backend cannot run in this build.
    #[error("backend {0} is not available: {1}")]
    BackendUnavailable(&'static str, String),
}

/// Where labelled actions ended up in the harness's records.
#[derive(Debug, Default)]
pub(crate) struct Labels {
    pub pings: BTreeMap<String, usize>,
    pub streams: BTreeMap<String, usize>,
    pub flows: BTreeMap<String, usize>,
}

/// What the `peer` probes saw, by the index of their expectation.
pub(crate) type Probes = BTreeMap<usize, &'static str>;

/// A probe's answer: whether a node has a peer in WireGuard (`Some(true)`),
/// has it trimmed (`Some(false)`) or does not know it (`None`).
pub(crate) fn peer_state(configured: Option<bool>) -> &'static str {
    match configured {
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
/// An engine counter by node (or all) and name, in a scope.
pub(crate) type CounterFn<'a> = dyn Fn(Option<usize>, &str, CounterScope) -> Option<u64> + 'a;

/// What a backend recorded, in the shape the checks read.
pub(crate) struct Outcomes<'a> {
    pub pings: &'a [PingRecord],
    pub streams: &'a [StreamRecord],
    pub flows: &'a [FlowRecord],
    /// An engine counter: the current engines' (`Incarnation`) or every
    /// engine's the node ran (`Total`); one node or all.
    pub counter: &'a CounterFn<'a>,
    pub stats: Vec<(&'static str, u64)>,
    pub violations: &'a [Violation],
    pub violation_count: u64,
    pub steps: u64,
    pub nodes: usize,
    pub trace: &'a Trace,
    pub backend: &'static str,
}

/// Checks the scenario's expectations against what a backend recorded.
pub(crate) fn evaluate_outcomes(
    scenario: &Scenario,
    seed: u64,
    net: &Outcomes<'_>,
    labels: &Labels,
    probes: &Probes,
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
                max_delay,
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
                    let longest = s.max_delay();
                    let delay_ok =
                        max_delay.is_none_or(|bound| longest.is_none_or(|delay| delay <= bound));
                    let ok = bound_check(d, *min_delivered, None, *delivered)
                        && bound_check(l, *min_lost, *max_lost, *lost)
                        && bound_check(run, *min_loss_run, *max_loss_run, None)
                        && delay_ok;
                    let mut detail = format!(
                        "sent {} delivered {d} lost {l} longest loss run {run} (duplicates {})",
                        s.sent.len(),
                        s.duplicates
                    );
                    if let Some(bound) = max_delay {
                        detail.push_str(&format!(
                            "; longest delay {}, want <= {}",
                            longest.map_or_else(|| "-".to_string(), fmt_ms),
                            fmt_ms(*bound)
                        ));
                    }
                    Check {
                        name: format!("delivery {label}"),
                        passed: ok,
                        detail,
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
            ExpectKind::OpenFailure { cause } => {
                match labels.flows.get(&label).map(|&f| &net.flows[f]) {
                    None => Check {
                        name: format!("open failure {label}"),
                        passed: false,
                        detail: "the flow never started".into(),
                    },
                    Some(f) => Check {
                        name: format!("open failure {label}"),
                        passed: f.open_failure == Some(cause.as_str()),
                        detail: format!(
                            "diagnosed {}; want {cause}",
                            f.open_failure.unwrap_or("nothing")
                        ),
                    },
                }
            }
            ExpectKind::Counter {
                counter,
                node,
                min,
                max,
                equals,
                scope,
            } => {
                let value = (net.counter)(*node, counter, *scope).unwrap_or(0);
                let whose = node.map_or_else(
                    || "all nodes".to_string(),
                    |n| scenario.nodes[n].name.clone(),
                );
                // The default scope keeps its old name (and trace hashes).
                let name = match scope {
                    CounterScope::Incarnation => format!("counter {counter} on {whose}"),
                    CounterScope::Total => {
                        format!("counter {counter} on {whose} (every incarnation)")
                    }
                };
                Check {
                    name,
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
    let queue_refusals = |node: usize| {
        ["drop_queue_overflow", "drop_queue_budget_exceeded"]
            .iter()
            .map(|name| (net.counter)(Some(node), name, CounterScope::Total).unwrap_or(0))
            .sum()
    };
    checks.extend(crate::liveness::liveness_checks(
        scenario,
        seed,
        net.streams,
        net.flows,
        net.pings,
        &queue_refusals,
    ));
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
    // Handshakes refused as replays. With the simulated wall clock (see
    // sim/README.md) only a replayed or reordered initiation causes one, so
    // a run with any of them deserves a second look.
    let stale = (net.counter)(None, "drop_wg_stale_timestamp", CounterScope::Total).unwrap_or(0);
    metrics.push(("stale_timestamp_drops".into(), stale as f64));
    metrics.push(("nodes".into(), net.nodes as f64));
    metrics.push(("trace_entries".into(), net.trace.len() as f64));
    if let Some(kib) = peak_memory_kib() {
        metrics.push(("peak_memory_kib".into(), kib as f64));
    }
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

/// The process's peak resident memory so far in KiB (`VmHWM` in
/// `/proc/self/status`), or `None` where the kernel does not say. It is the
/// peak of the whole process, so for several runs in one process (tests,
/// `explore`) it is the largest so far, not this run's own; a run of
/// `wgmesh-sim run` is one run per process. It never enters the trace hash.
fn peak_memory_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_memory_is_read_on_linux() {
        // Holding a few MiB makes the peak at least that.
        let held = vec![1u8; 4 << 20];
        let kib = peak_memory_kib().expect("Linux reports VmHWM");
        assert!(kib >= 4096, "peak {kib} KiB while holding 4 MiB");
        drop(held);
    }
}
