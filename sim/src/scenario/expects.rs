//! `[[expect]]`: each entry names its check, which refers to a labelled
//! action of the right kind or to nodes, with the bounds that check reads.

use std::collections::BTreeMap;

use toml::Spanned;

use super::ctx::{Ctx, NodeNames, millis, resolve_node, secs};
use super::model::{CounterScope, Expect, ExpectKind, ScenarioError};
use super::raw::RawExpect;
use crate::world::records::FAILURE_CAUSES;

/// The kind of action (`ping`, `send`, `flow` or `other`) each label names.
pub(super) type ActionLabels = BTreeMap<String, &'static str>;

/// One `[[expect]]` entry. The checks that name a label (`ping`,
/// `delivery`, `recovery`, `flow`) are built here; `peer`, `counter` and
/// `stat` have their own functions below.
pub(super) fn expect(
    ctx: &Ctx<'_>,
    names: &NodeNames,
    labels: &ActionLabels,
    se: &Spanned<RawExpect>,
    duration_s: f64,
) -> Result<Expect, ScenarioError> {
    let line = ctx.line_of(se.span().start);
    let e = se.get_ref();
    let check = e.check.get_ref().as_str();
    if let (Some(scope), false) = (&e.scope, check == "counter") {
        return Err(ctx.at(
            scope,
            "scope",
            format!("is only used by check \"counter\", not {check:?}"),
        ));
    }
    if let (Some(cause), false) = (&e.cause, check == "open_failure") {
        return Err(ctx.at(
            cause,
            "cause",
            format!("is only used by check \"open_failure\", not {check:?}"),
        ));
    }
    let label_of = |want: &str| -> Result<Option<String>, ScenarioError> {
        let Some(label) = &e.label else {
            return Err(ctx.err(
                Some(se.span().start),
                Some("label"),
                format!("check {check:?} needs the label of a {want} action"),
            ));
        };
        match labels.get(label.get_ref()) {
            Some(kind) if *kind == want => Ok(Some(label.get_ref().clone())),
            Some(kind) => Err(ctx.at(
                label,
                "label",
                format!("{:?} labels a {kind} action, not a {want}", label.get_ref()),
            )),
            None => Err(ctx.at(
                label,
                "label",
                format!("no action has label {:?}", label.get_ref()),
            )),
        }
    };
    let outcome_in = |allowed: &[&str]| -> Result<Option<String>, ScenarioError> {
        match &e.outcome {
            None => Ok(None),
            Some(o) if allowed.contains(&o.get_ref().as_str()) => Ok(Some(o.get_ref().clone())),
            Some(o) => Err(ctx.at(
                o,
                "outcome",
                format!("must be one of {}", allowed.join(", ")),
            )),
        }
    };
    let (kind, label) = match check {
        "ping" => (
            ExpectKind::Ping {
                outcome: outcome_in(&["pong", "timeout", "error"])?,
                min_latency: e.min_latency_ms.map(millis),
                max_latency: e.max_latency_ms.map(millis),
            },
            label_of("ping")?,
        ),
        "peer" => (peer_check(ctx, names, se, duration_s)?, None),
        "delivery" => (
            ExpectKind::Delivery {
                delivered: e.delivered,
                min_delivered: e.min_delivered,
                lost: e.lost,
                min_lost: e.min_lost,
                max_lost: e.max_lost,
                max_loss_run: e.max_loss_run,
                min_loss_run: e.min_loss_run,
                max_delay: e.max_delay_ms.map(millis),
            },
            label_of("send")?,
        ),
        "recovery" => {
            let Some(since) = e.since_s else {
                return Err(ctx.err(
                    Some(se.span().start),
                    Some("since_s"),
                    "check \"recovery\" needs it",
                ));
            };
            (
                ExpectKind::Recovery {
                    since: secs(since),
                    min: e.min_ms.map(millis),
                    max: e.max_ms.map(millis),
                },
                label_of("send")?,
            )
        }
        "flow" => (
            ExpectKind::Flow {
                outcome: outcome_in(&["completed", "failed"])?,
                max: e.max_ms.map(millis),
                min_retransmits: e.min_retransmits,
                max_retransmits: e.max_retransmits,
            },
            label_of("flow")?,
        ),
        "open_failure" => {
            let cause = match &e.cause {
                Some(c) if FAILURE_CAUSES.contains(&c.get_ref().as_str()) => c.get_ref().clone(),
                Some(c) => {
                    return Err(ctx.at(
                        c,
                        "cause",
                        format!("must be one of {}", FAILURE_CAUSES.join(", ")),
                    ));
                }
                None => {
                    return Err(ctx.err(
                        Some(se.span().start),
                        Some("cause"),
                        "check \"open_failure\" needs it",
                    ));
                }
            };
            (ExpectKind::OpenFailure { cause }, label_of("flow")?)
        }
        "counter" => (counter_check(ctx, names, se)?, None),
        "stat" => (stat_check(ctx, se)?, None),
        other => {
            return Err(ctx.at(
                &e.check,
                "check",
                format!(
                    "unknown check {other:?} (ping, peer, delivery, recovery, flow, open_failure, counter, stat)"
                ),
            ));
        }
    };
    Ok(Expect { kind, label, line })
}

/// `peer`: whether `node` has `peer` configured, trimmed or absent at `at_s`,
/// which must fall inside the run (`0..=duration_s`).
fn peer_check(
    ctx: &Ctx<'_>,
    names: &NodeNames,
    se: &Spanned<RawExpect>,
    duration_s: f64,
) -> Result<ExpectKind, ScenarioError> {
    let node_ref = |s: &Spanned<String>, field: &str| resolve_node(ctx, names, s, field);
    let e = se.get_ref();
    let node = match &e.node {
        Some(n) => node_ref(n, "node")?,
        None => {
            return Err(ctx.err(
                Some(se.span().start),
                Some("node"),
                "check \"peer\" needs it",
            ));
        }
    };
    let peer = match &e.peer {
        Some(n) => node_ref(n, "peer")?,
        None => {
            return Err(ctx.err(
                Some(se.span().start),
                Some("peer"),
                "check \"peer\" needs it",
            ));
        }
    };
    let at = match &e.at_s {
        Some(t) if (0.0..=duration_s).contains(t.get_ref()) => secs(*t.get_ref()),
        Some(t) => return Err(ctx.at(t, "at_s", "is outside the run")),
        None => {
            return Err(ctx.err(
                Some(se.span().start),
                Some("at_s"),
                "check \"peer\" needs it",
            ));
        }
    };
    let state = match &e.state {
        Some(s) if ["configured", "trimmed", "absent"].contains(&s.get_ref().as_str()) => {
            s.get_ref().clone()
        }
        Some(s) => {
            return Err(ctx.at(s, "state", "must be configured, trimmed or absent"));
        }
        None => {
            return Err(ctx.err(
                Some(se.span().start),
                Some("state"),
                "check \"peer\" needs it",
            ));
        }
    };
    Ok(ExpectKind::Peer {
        at,
        node,
        peer,
        state,
    })
}

/// `counter`: an engine counter on one node or summed over all.
fn counter_check(
    ctx: &Ctx<'_>,
    names: &NodeNames,
    se: &Spanned<RawExpect>,
) -> Result<ExpectKind, ScenarioError> {
    let node_ref = |s: &Spanned<String>, field: &str| resolve_node(ctx, names, s, field);
    let e = se.get_ref();
    let Some(counter) = &e.counter else {
        return Err(ctx.err(
            Some(se.span().start),
            Some("counter"),
            "check \"counter\" needs it",
        ));
    };
    let known = wgmesh_core::Counters::default()
        .iter()
        .any(|(k, _)| k == counter.get_ref());
    if !known {
        return Err(ctx.at(
            counter,
            "counter",
            format!("unknown engine counter {:?}", counter.get_ref()),
        ));
    }
    let scope = match &e.scope {
        None => CounterScope::Incarnation,
        Some(s) => match s.get_ref().as_str() {
            "incarnation" => CounterScope::Incarnation,
            "total" => CounterScope::Total,
            other => {
                return Err(ctx.at(
                    s,
                    "scope",
                    format!("unknown scope {other:?} (incarnation or total)"),
                ));
            }
        },
    };
    Ok(ExpectKind::Counter {
        counter: counter.get_ref().clone(),
        node: e.node.as_ref().map(|n| node_ref(n, "node")).transpose()?,
        min: e.min,
        max: e.max,
        equals: e.equals,
        scope,
    })
}

/// `stat`: one of the run's counts (`world::Stats`).
fn stat_check(ctx: &Ctx<'_>, se: &Spanned<RawExpect>) -> Result<ExpectKind, ScenarioError> {
    let e = se.get_ref();
    let Some(stat) = &e.stat else {
        return Err(ctx.err(
            Some(se.span().start),
            Some("stat"),
            "check \"stat\" needs it",
        ));
    };
    let known = crate::world::Stats::default()
        .iter()
        .into_iter()
        .chain(crate::world::control::ControlStats::default().iter())
        .any(|(k, _)| k == stat.get_ref());
    if !known {
        return Err(ctx.at(
            stat,
            "stat",
            format!("unknown statistic {:?}", stat.get_ref()),
        ));
    }
    Ok(ExpectKind::Stat {
        stat: stat.get_ref().clone(),
        min: e.min,
        max: e.max,
        equals: e.equals,
    })
}
