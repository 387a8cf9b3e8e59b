//! `[[action]]`: each entry names what it does (`do`), may carry only the
//! fields that action uses, and must carry the ones it needs. One function
//! per action checks its fields.

use std::net::IpAddr;

use ipnet::IpNet;
use toml::Spanned;
use wgmesh_core::PingKind;

use super::ctx::{Ctx, NodeNames, millis, resolve_node, secs};
use super::model::{Action, ActionKind, ScenarioError, Target};
use super::raw::RawAction;
use crate::world::LinkKind;

/// One `[[action]]` entry, which must fall inside the run (`0..=duration_s`).
/// A `ping` with `count` becomes that many pings `interval_ms` apart,
/// labelled `label#1`, `label#2`, ...; every other entry is one action.
pub(super) fn action(
    ctx: &Ctx<'_>,
    names: &NodeNames,
    sa: &Spanned<RawAction>,
    duration_s: f64,
) -> Result<Vec<Action>, ScenarioError> {
    let line = ctx.line_of(sa.span().start);
    let a = sa.get_ref();
    let at_s = *a.at_s.get_ref();
    if !(0.0..=duration_s).contains(&at_s) {
        return Err(ctx.at(
            &a.at_s,
            "at_s",
            format!("{at_s} is outside the run (0..={duration_s})"),
        ));
    }
    let what = a.action.get_ref().as_str();
    let Some(allowed) = allowed_fields(what) else {
        return Err(ctx.at(
            &a.action,
            "do",
            format!(
                "unknown action {what:?} (send, ping, flow, restart, restore_disco_key, partition, heal, link_change, set_knob, set_allowed_ips, set_policy, control_restart, control_partition, idle, nat_rebind)"
            ),
        ));
    };
    refuse_foreign_fields(ctx, sa, what, allowed)?;
    let entry = Entry {
        ctx,
        names,
        sa,
        a,
        what,
    };
    let kind = match what {
        "send" => send(&entry)?,
        "ping" => ping(&entry)?,
        "flow" => flow(&entry)?,
        "restart" => restart(&entry)?,
        "restore_disco_key" => restore_disco_key(&entry)?,
        "partition" => partition(&entry)?,
        "heal" => ActionKind::Heal,
        "link_change" => link_change(&entry)?,
        "set_knob" => set_knob(&entry)?,
        "set_allowed_ips" => set_allowed_ips(&entry)?,
        "set_policy" => set_policy(&entry)?,
        "control_restart" => ActionKind::ControlRestart {
            downtime: secs(a.downtime_s.as_ref().map_or(0.0, |d| *d.get_ref())),
        },
        "control_partition" => control_partition(&entry)?,
        "nat_rebind" => ActionKind::NatRebind {
            node: entry.need("node", a.node.as_ref())?,
        },
        _ => idle(&entry),
    };
    let label = a.label.as_ref().map(|l| l.get_ref().clone());
    if what == "ping" {
        match (&a.count, &a.interval_ms) {
            (Some(_), _) => return periodic_pings(&entry, kind, at_s, duration_s, label, line),
            (None, Some(i)) => {
                return Err(ctx.at(i, "interval_ms", "a ping's interval_ms needs a count"));
            }
            (None, None) => {}
        }
    }
    Ok(vec![Action {
        at: secs(at_s),
        kind,
        label,
        line,
    }])
}

/// A `ping` with `count` (1..=10000) and `interval_ms` (default 1000, at
/// least 1): `count` pings, the last of which must start inside the run.
fn periodic_pings(
    e: &Entry<'_>,
    kind: ActionKind,
    at_s: f64,
    duration_s: f64,
    label: Option<String>,
    line: usize,
) -> Result<Vec<Action>, ScenarioError> {
    let count = e.a.count.as_ref().map_or(1, |c| *c.get_ref());
    if !(1..=10_000).contains(&count) {
        let c = e.a.count.as_ref().expect("count is present");
        return Err(e.ctx.at(c, "count", "must be between 1 and 10000"));
    }
    let interval_ms = e.a.interval_ms.as_ref().map_or(1000.0, |i| *i.get_ref());
    if !(1.0..=3_600_000.0).contains(&interval_ms) {
        let i = e.a.interval_ms.as_ref().expect("a bad interval is present");
        return Err(e.ctx.at(i, "interval_ms", "must be between 1 and 3600000"));
    }
    let last_s = at_s + interval_ms * (count - 1) as f64 / 1000.0;
    if last_s > duration_s {
        let c = e.a.count.as_ref().expect("count is present");
        return Err(e.ctx.at(
            c,
            "count",
            format!("the last ping would start at {last_s}s, after the run ends ({duration_s}s)"),
        ));
    }
    Ok((0..count)
        .map(|k| Action {
            at: secs(at_s) + millis(interval_ms) * k as u32,
            kind: kind.clone(),
            label: label.as_ref().map(|l| format!("{l}#{}", k + 1)),
            line,
        })
        .collect())
}

/// The fields action `what` uses; `None` for an unknown action.
fn allowed_fields(what: &str) -> Option<&'static [&'static str]> {
    Some(match what {
        "send" => &[
            "from",
            "to",
            "ip",
            "family",
            "count",
            "interval_ms",
            "size",
            "label",
        ],
        "ping" => &[
            "from",
            "to",
            "ip",
            "family",
            "kind",
            "size",
            "count",
            "interval_ms",
            "label",
        ],
        "flow" => &[
            "from",
            "to",
            "ip",
            "family",
            "size",
            "response_size",
            "label",
        ],
        "restart" | "restore_disco_key" => &["node", "downtime_s", "label"],
        "partition" => &["a", "b", "one_way", "label"],
        "heal" => &["label"],
        "link_change" => &["node", "link", "label"],
        "set_knob" => &["node", "knob", "value", "label"],
        "set_allowed_ips" => &["node", "allowed_ips", "label"],
        "set_policy" => &["policy", "label"],
        "control_restart" => &["downtime_s", "label"],
        "control_partition" => &["nodes", "label"],
        "idle" => &["note", "label"],
        "nat_rebind" => &["node", "label"],
        _ => return None,
    })
}

/// Refuses the first field (in this order) that action `what` does not use,
/// so nothing written in a file is silently ignored.
fn refuse_foreign_fields(
    ctx: &Ctx<'_>,
    sa: &Spanned<RawAction>,
    what: &str,
    allowed: &[&str],
) -> Result<(), ScenarioError> {
    let a = sa.get_ref();
    let present: [(&str, Option<usize>); 22] = [
        ("from", a.from.as_ref().map(|s| s.span().start)),
        ("to", a.to.as_ref().map(|s| s.span().start)),
        ("node", a.node.as_ref().map(|s| s.span().start)),
        ("a", a.a.as_ref().map(|_| sa.span().start)),
        ("b", a.b.as_ref().map(|_| sa.span().start)),
        ("ip", a.ip.as_ref().map(|s| s.span().start)),
        ("family", a.family.as_ref().map(|s| s.span().start)),
        ("kind", a.kind.as_ref().map(|s| s.span().start)),
        ("link", a.link.as_ref().map(|s| s.span().start)),
        ("count", a.count.as_ref().map(|s| s.span().start)),
        (
            "interval_ms",
            a.interval_ms.as_ref().map(|s| s.span().start),
        ),
        ("size", a.size.as_ref().map(|s| s.span().start)),
        (
            "response_size",
            a.response_size.as_ref().map(|s| s.span().start),
        ),
        ("downtime_s", a.downtime_s.as_ref().map(|s| s.span().start)),
        ("knob", a.knob.as_ref().map(|s| s.span().start)),
        ("value", a.value.as_ref().map(|s| s.span().start)),
        (
            "allowed_ips",
            a.allowed_ips.as_ref().map(|_| sa.span().start),
        ),
        ("label", a.label.as_ref().map(|s| s.span().start)),
        ("note", a.note.as_ref().map(|s| s.span().start)),
        ("nodes", a.nodes.as_ref().map(|_| sa.span().start)),
        ("policy", a.policy.as_ref().map(|s| s.span().start)),
        ("one_way", a.one_way.as_ref().map(|s| s.span().start)),
    ];
    for (field, offset) in present {
        if let Some(offset) = offset {
            if !allowed.contains(&field) {
                return Err(ctx.err(
                    Some(offset),
                    Some(field),
                    format!("is not used by action {what:?}"),
                ));
            }
        }
    }
    Ok(())
}

/// One entry being checked, with what its checks need to report errors.
struct Entry<'a> {
    ctx: &'a Ctx<'a>,
    names: &'a NodeNames,
    sa: &'a Spanned<RawAction>,
    a: &'a RawAction,
    what: &'a str,
}

impl Entry<'_> {
    /// An error for a missing `field`, pointing at the entry.
    fn missing(&self, field: &str, message: impl Into<String>) -> ScenarioError {
        self.ctx
            .err(Some(self.sa.span().start), Some(field), message)
    }

    /// The node `s` names, or an error pointing at it as `field`.
    fn node_ref(&self, s: &Spanned<String>, field: &str) -> Result<usize, ScenarioError> {
        resolve_node(self.ctx, self.names, s, field)
    }

    /// The node a required `field` names.
    fn need(&self, field: &str, v: Option<&Spanned<String>>) -> Result<usize, ScenarioError> {
        match v {
            Some(s) => self.node_ref(s, field),
            None => Err(self.missing(field, format!("action {:?} needs it", self.what))),
        }
    }

    /// Where traffic goes: a node (`to`, with `family` 4 or 6) or an
    /// address (`ip`), exactly one of them.
    fn target(&self) -> Result<Target, ScenarioError> {
        let a = self.a;
        let family = a.family.as_ref().map_or(4, |f| *f.get_ref());
        if let Some(f) = &a.family {
            if family != 4 && family != 6 {
                return Err(self.ctx.at(f, "family", "must be 4 or 6"));
            }
        }
        match (&a.to, &a.ip) {
            (Some(to), None) => Ok(Target::Node {
                node: self.node_ref(to, "to")?,
                family,
            }),
            (None, Some(ip)) => ip.get_ref().parse().map(Target::Ip).map_err(|_| {
                self.ctx
                    .at(ip, "ip", format!("{:?} is not an IP address", ip.get_ref()))
            }),
            (Some(to), Some(_)) => Err(self.ctx.at(to, "to", "give either `to` or `ip`, not both")),
            (None, None) => {
                Err(self.missing("to", format!("action {:?} needs `to` or `ip`", self.what)))
            }
        }
    }
}

/// `send`: a stream of `count` datagrams every `interval_ms`.
fn send(e: &Entry<'_>) -> Result<ActionKind, ScenarioError> {
    let a = e.a;
    let interval = a.interval_ms.as_ref().map_or(100.0, |v| *v.get_ref());
    if interval <= 0.0 {
        if let Some(v) = &a.interval_ms {
            return Err(e.ctx.at(v, "interval_ms", "must be above 0"));
        }
    }
    let count = a.count.as_ref().map_or(1, |c| *c.get_ref());
    if count > 1_000_000 {
        if let Some(c) = &a.count {
            return Err(e.ctx.at(c, "count", "at most 1000000"));
        }
    }
    Ok(ActionKind::Send {
        from: e.need("from", a.from.as_ref())?,
        to: e.target()?,
        count,
        interval: millis(interval),
        size: a.size.as_ref().map_or(64, |s| *s.get_ref()).clamp(16, 1200),
    })
}

/// `ping` of a `kind`.
fn ping(e: &Entry<'_>) -> Result<ActionKind, ScenarioError> {
    let a = e.a;
    let kind = match &a.kind {
        None => {
            return Err(e.missing("kind", "action \"ping\" needs it (disco, tsmp or icmp)"));
        }
        Some(k) => match k.get_ref().as_str() {
            "disco" => PingKind::Disco,
            "tsmp" => PingKind::Tsmp,
            "icmp" => PingKind::Icmp,
            other => {
                return Err(e.ctx.at(
                    k,
                    "kind",
                    format!("unknown ping kind {other:?} (disco, tsmp or icmp)"),
                ));
            }
        },
    };
    Ok(ActionKind::Ping {
        from: e.need("from", a.from.as_ref())?,
        to: e.target()?,
        kind,
        size: a.size.as_ref().map_or(0, |s| *s.get_ref()).min(1400),
    })
}

/// `flow`: a request of `size` bytes asking for `response_size` back.
fn flow(e: &Entry<'_>) -> Result<ActionKind, ScenarioError> {
    let a = e.a;
    Ok(ActionKind::Flow {
        from: e.need("from", a.from.as_ref())?,
        to: e.target()?,
        size: a.size.as_ref().map_or(100, |s| *s.get_ref()).clamp(4, 1200),
        response_size: a
            .response_size
            .as_ref()
            .map_or(1000, |s| *s.get_ref())
            .min(1200),
    })
}

/// `restart` of a node, down for `downtime_s`.
fn restart(e: &Entry<'_>) -> Result<ActionKind, ScenarioError> {
    let a = e.a;
    Ok(ActionKind::Restart {
        node: e.need("node", a.node.as_ref())?,
        downtime: secs(a.downtime_s.as_ref().map_or(0.0, |d| *d.get_ref())),
    })
}

/// `restore_disco_key` of a node, down for `downtime_s`: a restart back to
/// the disco key it had before its current one. Whether it has one (an
/// earlier restart in the file) is checked once every action is known
/// (`check_restores`).
fn restore_disco_key(e: &Entry<'_>) -> Result<ActionKind, ScenarioError> {
    let a = e.a;
    Ok(ActionKind::RestoreDiscoKey {
        node: e.need("node", a.node.as_ref())?,
        downtime: secs(a.downtime_s.as_ref().map_or(0.0, |d| *d.get_ref())),
    })
}

/// A `restore_disco_key` needs an earlier disco key to go back to: an
/// earlier `restart` or `restore_disco_key` of the same node in the file
/// (restarts from `[churn]` are random, so they do not count).
pub(super) fn check_restores(ctx: &Ctx<'_>, actions: &[Action]) -> Result<(), ScenarioError> {
    let mut order: Vec<&Action> = actions.iter().collect();
    order.sort_by_key(|a| (a.at, a.line));
    let mut restarted: Vec<usize> = Vec::new();
    for action in order {
        match &action.kind {
            ActionKind::Restart { node, .. } => restarted.push(*node),
            ActionKind::RestoreDiscoKey { node, .. } => {
                if !restarted.contains(node) {
                    return Err(ScenarioError {
                        file: ctx.file.to_string(),
                        line: Some(action.line),
                        field: Some("node".into()),
                        message: "restore_disco_key needs an earlier restart of this node (a disco key to go back to)".into(),
                    });
                }
            }
            ActionKind::Send { .. }
            | ActionKind::Ping { .. }
            | ActionKind::Flow { .. }
            | ActionKind::Partition { .. }
            | ActionKind::Heal
            | ActionKind::LinkChange { .. }
            | ActionKind::SetKnob { .. }
            | ActionKind::SetAllowedIps { .. }
            | ActionKind::SetPolicy { .. }
            | ActionKind::ControlRestart { .. }
            | ActionKind::ControlPartition { .. }
            | ActionKind::Idle { .. }
            | ActionKind::NatRebind { .. } => {}
        }
    }
    Ok(())
}

/// `partition` between two non-empty groups `a` and `b`.
fn partition(e: &Entry<'_>) -> Result<ActionKind, ScenarioError> {
    let group = |v: &Option<Vec<Spanned<String>>>,
                 field: &str|
     -> Result<Vec<usize>, ScenarioError> {
        match v {
            Some(list) if !list.is_empty() => list.iter().map(|s| e.node_ref(s, field)).collect(),
            _ => Err(e.missing(field, "action \"partition\" needs a non-empty list")),
        }
    };
    Ok(ActionKind::Partition {
        a: group(&e.a.a, "a")?,
        b: group(&e.a.b, "b")?,
        one_way: e.a.one_way.as_ref().is_some_and(|v| *v.get_ref()),
    })
}

/// `link_change` of a node: down, up, minor or major.
fn link_change(e: &Entry<'_>) -> Result<ActionKind, ScenarioError> {
    let link = match &e.a.link {
        None => {
            return Err(e.missing(
                "link",
                "action \"link_change\" needs it (down, up, minor or major)",
            ));
        }
        Some(l) => match l.get_ref().as_str() {
            "down" => LinkKind::Down,
            "up" => LinkKind::Up,
            "minor" => LinkKind::Minor,
            "major" => LinkKind::Major,
            other => {
                return Err(e.ctx.at(
                    l,
                    "link",
                    format!("unknown link change {other:?} (down, up, minor or major)"),
                ));
            }
        },
    };
    Ok(ActionKind::LinkChange {
        node: e.need("node", e.a.node.as_ref())?,
        link,
    })
}

/// `set_knob`: a knob control sends one node (or every node) changes.
fn set_knob(e: &Entry<'_>) -> Result<ActionKind, ScenarioError> {
    let a = e.a;
    let knob = match &a.knob {
        None => return Err(e.missing("knob", "action \"set_knob\" needs it")),
        Some(k) => match k.get_ref().as_str() {
            "keep_full_wg_config" | "fake_icmp_echo" => k.get_ref().clone(),
            other => {
                return Err(e.ctx.at(
                    k,
                    "knob",
                    format!("unknown knob {other:?} (keep_full_wg_config or fake_icmp_echo)"),
                ));
            }
        },
    };
    let value = match &a.value {
        Some(v) => *v.get_ref(),
        None => return Err(e.missing("value", "action \"set_knob\" needs it")),
    };
    Ok(ActionKind::SetKnob {
        node: a.node.as_ref().map(|s| e.node_ref(s, "node")).transpose()?,
        knob,
        value,
    })
}

/// `set_allowed_ips`: the prefixes (or addresses) control hands out for a
/// node. With the real coordination server a node's AllowedIPs are its own
/// addresses plus its approved routes, so this is the admin approving the
/// listed prefixes that are not the node's own addresses (each must be one
/// the node advertises, or the server refuses it).
fn set_allowed_ips(e: &Entry<'_>) -> Result<ActionKind, ScenarioError> {
    let node = e.need("node", e.a.node.as_ref())?;
    let Some(list) = &e.a.allowed_ips else {
        return Err(e.missing("allowed_ips", "action \"set_allowed_ips\" needs it"));
    };
    let mut allowed_ips = Vec::new();
    for s in list {
        let net: IpNet = s
            .get_ref()
            .parse()
            .or_else(|_| s.get_ref().parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| {
                e.ctx.at(
                    s,
                    "allowed_ips",
                    format!("{:?} is not a prefix", s.get_ref()),
                )
            })?;
        allowed_ips.push(net.trunc());
    }
    Ok(ActionKind::SetAllowedIps { node, allowed_ips })
}

/// `set_policy`: a new policy file's text, checked now.
fn set_policy(e: &Entry<'_>) -> Result<ActionKind, ScenarioError> {
    let Some(text) = &e.a.policy else {
        return Err(e.missing("policy", "action \"set_policy\" needs it"));
    };
    super::parse::check_policy(e.ctx, text)?;
    Ok(ActionKind::SetPolicy {
        policy: text.get_ref().clone(),
    })
}

/// `control_partition`: the nodes cut off from the coordination server.
fn control_partition(e: &Entry<'_>) -> Result<ActionKind, ScenarioError> {
    match &e.a.nodes {
        Some(list) if !list.is_empty() => Ok(ActionKind::ControlPartition {
            nodes: list
                .iter()
                .map(|s| e.node_ref(s, "nodes"))
                .collect::<Result<_, _>>()?,
        }),
        _ => Err(e.missing(
            "nodes",
            "action \"control_partition\" needs a non-empty list",
        )),
    }
}

/// `idle`: nothing happens but a note in the trace.
fn idle(e: &Entry<'_>) -> ActionKind {
    ActionKind::Idle {
        note: e
            .a
            .note
            .as_ref()
            .map(|n| n.get_ref().clone())
            .unwrap_or_default(),
    }
}
