//! Checking a scenario file, one function per section of the format: the
//! top level, `[network]`, `[knobs]`, `[[node]]`, `[[action]]` (in
//! `actions`), `[churn]` and `[[expect]]` (in `expects`). Sections are
//! checked in that order, so the first error reported is the first one in
//! that order.

use ipnet::IpNet;
use wgmesh_core::Knobs;

use super::actions::{action, check_restores};
use super::ctx::{Ctx, NodeNames, millis, secs};
use super::expects::{ActionLabels, expect};
use super::model::{Action, ActionKind, Backend, Churn, Scenario, ScenarioError};
use super::raw::{RawChurn, RawKnobs, RawNetwork, RawScenario};
use crate::world::{NetworkSpec, NodeSpec};
use toml::Spanned;

/// Parses scenario `text` (serde's pass) and checks it (ours); `file` names
/// it in errors.
pub(super) fn parse(file: &str, text: &str) -> Result<Scenario, ScenarioError> {
    let ctx = Ctx { file, text };
    let raw: RawScenario = toml::from_str(text).map_err(|e| {
        let offset = e.span().map(|s| s.start);
        let field = e
            .message()
            .split('`')
            .nth(1)
            .filter(|_| {
                e.message().starts_with("unknown field") || e.message().starts_with("missing field")
            })
            .map(str::to_string)
            .or_else(|| offset.and_then(|o| key_on_line(text, o)));
        // toml leaves the message empty for some lexer errors (a control
        // character in a comment, for one); never print an empty reason.
        let reason = match e.message().trim() {
            "" => "invalid TOML here (a control character or a stray byte?)",
            m => m,
        };
        ctx.err(offset, field.as_deref(), reason.to_string())
    })?;
    build(&ctx, raw)
}

/// The key written on the line of a `toml` error, for naming the field.
fn key_on_line(text: &str, offset: usize) -> Option<String> {
    let start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |p| p + 1);
    let line = text[start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    (!key.is_empty() && !key.starts_with('[')).then(|| key.to_string())
}
/// Checks every section and assembles the scenario.
fn build(ctx: &Ctx<'_>, raw: RawScenario) -> Result<Scenario, ScenarioError> {
    let (duration_s, backend, backends) = top_level(ctx, &raw)?;
    let network = network(ctx, &raw.network)?;
    let knobs = knobs(&raw.knobs);
    let policy = match &raw.control.policy {
        Some(text) => {
            check_policy(ctx, text)?;
            Some(text.get_ref().clone())
        }
        None => None,
    };
    let (nodes, names) = nodes(ctx, &raw)?;
    let mut network = network;
    network.links = super::net::links(ctx, &names, &network, &raw.links)?;
    let mut actions = Vec::new();
    for sa in &raw.actions {
        actions.extend(action(ctx, &names, sa, duration_s)?);
    }
    super::net::check_nat_rebinds(ctx, &nodes, &actions)?;
    super::net::check_allowed_ips(ctx, &nodes, &actions)?;
    check_restores(ctx, &actions)?;
    let churn = churn(ctx, raw.churn.as_ref(), duration_s)?;
    let labels = action_labels(&actions);
    let expects = raw
        .expects
        .iter()
        .map(|se| expect(ctx, &names, &labels, se, duration_s))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Scenario {
        name: raw.name,
        description: raw.description.trim().to_string(),
        known_bug: raw.known_bug,
        seed: raw.seed.unwrap_or(1),
        backend,
        backends,
        duration: secs(duration_s),
        network,
        knobs,
        policy,
        nodes,
        actions,
        churn,
        expects,
    })
}

/// The top level: the run's length (in seconds, checked) and its backends.
fn top_level(
    ctx: &Ctx<'_>,
    raw: &RawScenario,
) -> Result<(f64, Backend, Vec<Backend>), ScenarioError> {
    let duration_s = *raw.duration_s.get_ref();
    if !(duration_s > 0.0 && duration_s <= 7.0 * 86400.0) {
        return Err(ctx.at(
            &raw.duration_s,
            "duration_s",
            "must be above 0 and at most a week",
        ));
    }
    let backend = match &raw.backend {
        None => Backend::Event,
        Some(b) => Backend::parse(b.get_ref()).ok_or_else(|| {
            ctx.at(
                b,
                "backend",
                format!("unknown backend {:?} (event or turmoil)", b.get_ref()),
            )
        })?,
    };
    let mut backends = Vec::new();
    for b in &raw.backends {
        backends.push(
            Backend::parse(b.get_ref()).ok_or_else(|| {
                ctx.at(b, "backends", format!("unknown backend {:?}", b.get_ref()))
            })?,
        );
    }
    if backends.is_empty() {
        backends.push(backend);
    }
    Ok((duration_s, backend, backends))
}

/// `[network]`.
fn network(ctx: &Ctx<'_>, n: &RawNetwork) -> Result<NetworkSpec, ScenarioError> {
    let defaults = NetworkSpec::default();
    for (name, v) in [
        ("latency_ms", n.latency_ms),
        ("jitter_ms", n.jitter_ms),
        ("control_delay_ms", n.control_delay_ms),
    ] {
        if v.is_some_and(|v| !(0.0..=600_000.0).contains(&v)) {
            return Err(ctx.err(
                None,
                Some(&format!("network.{name}")),
                "must be between 0 and 600000",
            ));
        }
    }
    if n.loss.is_some_and(|l| !(0.0..=1.0).contains(&l)) {
        return Err(ctx.err(None, Some("network.loss"), "must be between 0 and 1"));
    }
    Ok(NetworkSpec {
        latency: n.latency_ms.map_or(defaults.latency, millis),
        jitter: n.jitter_ms.map_or(defaults.jitter, millis),
        loss: n.loss.unwrap_or(defaults.loss),
        control_delay: n.control_delay_ms.map_or(defaults.control_delay, millis),
        burst: n
            .burst
            .as_ref()
            .map(|b| super::net::burst(ctx, "network.burst", b))
            .transpose()?,
        links: Vec::new(),
        stun: n.stun.unwrap_or(false),
        relay: n.relay.unwrap_or(false),
    })
}

/// `[knobs]`, sent to every node.
fn knobs(k: &RawKnobs) -> Knobs {
    Knobs {
        keep_full_wg_config: k.keep_full_wg_config.unwrap_or(false),
        fake_icmp_echo: k.fake_icmp_echo.unwrap_or(false),
        peerapi_port: k.peerapi_port,
        ..Knobs::default()
    }
}

/// `[[node]]`, then the generated nodes `node_count` asks for; a scenario
/// has 2 to 1000 nodes.
fn nodes(ctx: &Ctx<'_>, raw: &RawScenario) -> Result<(Vec<NodeSpec>, NodeNames), ScenarioError> {
    let mut nodes: Vec<NodeSpec> = Vec::new();
    let mut names = NodeNames::new();
    for rn in &raw.nodes {
        let name = rn.name.get_ref().clone();
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(ctx.at(
                &rn.name,
                "name",
                "a node name must be non-empty without spaces",
            ));
        }
        if names.insert(name.clone(), nodes.len()).is_some() {
            return Err(ctx.at(&rn.name, "name", format!("node {name:?} is defined twice")));
        }
        let mut subnets = Vec::new();
        for s in &rn.subnets {
            let net: IpNet = s
                .get_ref()
                .parse()
                .map_err(|_| ctx.at(s, "subnets", format!("{:?} is not a prefix", s.get_ref())))?;
            subnets.push(net.trunc());
        }
        nodes.push(NodeSpec {
            name,
            trim_override: rn.trim,
            disable_disco_key_flush: rn.disable_disco_key_flush,
            keep_full_wg_config: rn.keep_full_wg_config,
            fake_icmp_echo: rn.fake_icmp_echo,
            peerapi_port: rn.peerapi_port,
            subnets,
            persistent_keepalive_secs: rn.keepalive_s,
            control_delay: match rn.control_delay_ms {
                Some(ms) if !(0.0..=3_600_000.0).contains(&ms) => {
                    return Err(ctx.at(
                        &rn.name,
                        "control_delay_ms",
                        format!("{ms} is outside 0..=3600000"),
                    ));
                }
                ms => ms.map(millis),
            },
            nat: rn
                .nat
                .as_ref()
                .map(|nat| super::net::nat(ctx, rn.name.get_ref(), nat))
                .transpose()?,
            silent_service: rn.silent_service,
        });
    }
    if let Some(count) = raw.node_count {
        let prefix = raw.node_prefix.clone().unwrap_or_else(|| "n".into());
        let mut k = 1;
        while nodes.len() < count {
            let name = format!("{prefix}{k}");
            k += 1;
            if names.contains_key(&name) {
                continue;
            }
            names.insert(name.clone(), nodes.len());
            nodes.push(NodeSpec::new(name));
        }
    }
    if nodes.len() < 2 || nodes.len() > 1000 {
        return Err(ctx.err(
            None,
            Some("node"),
            format!("a scenario needs 2 to 1000 nodes, it has {}", nodes.len()),
        ));
    }
    Ok((nodes, names))
}

/// `[churn]`, which needs `0 <= start_s <= end_s <= duration_s`.
fn churn(
    ctx: &Ctx<'_>,
    raw: Option<&Spanned<RawChurn>>,
    duration_s: f64,
) -> Result<Option<Churn>, ScenarioError> {
    Ok(match raw {
        None => None,
        Some(sc) => {
            let c = sc.get_ref();
            let start = c.start_s.unwrap_or(0.0);
            let end = c.end_s.unwrap_or((duration_s - 15.0).max(start));
            if !(0.0 <= start && start <= end && end <= duration_s) {
                return Err(ctx.at(sc, "churn", "needs 0 <= start_s <= end_s <= duration_s"));
            }
            Some(Churn {
                start: secs(start),
                end: secs(end),
                restarts: c.restarts,
                streams: c.streams,
                pings: c.pings,
                flows: c.flows,
                link_changes: c.link_changes,
            })
        }
    })
}

/// The kind of action each label names, for checking expectations.
fn action_labels(actions: &[Action]) -> ActionLabels {
    actions
        .iter()
        .filter_map(|a| {
            let kind = match a.kind {
                ActionKind::Ping { .. } => "ping",
                ActionKind::Send { .. } => "send",
                ActionKind::Flow { .. } => "flow",
                _ => "other",
            };
            a.label.clone().map(|l| (l, kind))
        })
        .collect()
}

/// Checks a policy file's text with the control crate's parser: an error
/// names the scenario field and the policy's own line and column.
pub(super) fn check_policy(ctx: &Ctx<'_>, text: &Spanned<String>) -> Result<(), ScenarioError> {
    wgmesh_control::Policy::parse(text.get_ref(), "policy")
        .map(|_| ())
        .map_err(|e| ctx.at(text, "policy", e.to_string()))
}
