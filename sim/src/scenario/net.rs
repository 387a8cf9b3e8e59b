//! Checking the network model's sections: a node's `nat`, `[network]`'s
//! `burst`, `[[link]]`, and the routes a `set_allowed_ips` approves. Every
//! malformed value is refused with the file,
//! line and key it sits at.

use std::net::IpAddr;

use ipnet::IpNet;
use toml::Spanned;

use super::ctx::{Ctx, NodeNames, millis, resolve_node, secs};
use super::model::{Action, ActionKind, ScenarioError};
use super::raw::{RawBurst, RawLink, RawNat};
use crate::world::links::{BurstLoss, LinkParams, LinkSpec};
use crate::world::nat::{DEFAULT_TIMEOUT, Dependence, NatSpec};
use crate::world::{NetworkSpec, NodeSpec};

/// The behaviours' names, for error messages.
const BEHAVIOURS: &str = "endpoint-independent, address-dependent, address-and-port-dependent";

/// A probability in the file, checked to lie in `0..=1`.
fn probability(ctx: &Ctx<'_>, at: usize, field: &str, value: f64) -> Result<f64, ScenarioError> {
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(ctx.err(
            Some(at),
            Some(field),
            format!("{value} is not between 0 and 1"),
        ))
    }
}

/// `burst = { enter, exit, loss_bad }` at `field`.
pub(super) fn burst(
    ctx: &Ctx<'_>,
    field: &str,
    raw: &Spanned<RawBurst>,
) -> Result<BurstLoss, ScenarioError> {
    let at = raw.span().start;
    let b = raw.get_ref();
    let burst = BurstLoss {
        enter: probability(ctx, at, &format!("{field}.enter"), b.enter)?,
        exit: probability(ctx, at, &format!("{field}.exit"), b.exit)?,
        loss_bad: probability(
            ctx,
            at,
            &format!("{field}.loss_bad"),
            b.loss_bad.unwrap_or(1.0),
        )?,
    };
    if burst.enter > 0.0 && burst.exit == 0.0 {
        return Err(ctx.err(
            Some(at),
            Some(&format!("{field}.exit")),
            "0 would make the first burst last for ever; cut the link with a partition instead",
        ));
    }
    Ok(burst)
}

/// A mapping or filtering behaviour named at `field`.
fn dependence(
    ctx: &Ctx<'_>,
    field: &str,
    raw: &Spanned<String>,
) -> Result<Dependence, ScenarioError> {
    Dependence::parse(raw.get_ref()).ok_or_else(|| {
        ctx.at(
            raw,
            field,
            format!("unknown behaviour {:?} ({BEHAVIOURS})", raw.get_ref()),
        )
    })
}

/// Node `node`'s `nat = { ... }`: a preset, explicit behaviours, or a
/// preset with some of its settings replaced.
pub(super) fn nat(
    ctx: &Ctx<'_>,
    node: &str,
    raw: &Spanned<RawNat>,
) -> Result<NatSpec, ScenarioError> {
    let at = raw.span().start;
    let n = raw.get_ref();
    let field = |key: &str| format!("node.{node}.nat.{key}");
    let base = match &n.preset {
        Some(p) => Some(NatSpec::preset(p.get_ref()).ok_or_else(|| {
            ctx.at(
                p,
                &field("preset"),
                format!(
                    "unknown preset {:?} (full-cone, restricted, port-restricted, symmetric)",
                    p.get_ref()
                ),
            )
        })?),
        None => None,
    };
    let mapping = match (&n.mapping, base) {
        (Some(m), _) => dependence(ctx, &field("mapping"), m)?,
        (None, Some(b)) => b.mapping,
        (None, None) => {
            return Err(ctx.err(
                Some(at),
                Some(&field("mapping")),
                format!("a NAT needs a preset or a mapping behaviour ({BEHAVIOURS})"),
            ));
        }
    };
    let filtering = match (&n.filtering, base) {
        (Some(f), _) => dependence(ctx, &field("filtering"), f)?,
        (None, Some(b)) => b.filtering,
        (None, None) => {
            return Err(ctx.err(
                Some(at),
                Some(&field("filtering")),
                format!("a NAT needs a preset or a filtering behaviour ({BEHAVIOURS})"),
            ));
        }
    };
    let timeout = match &n.timeout_s {
        Some(t) if !(*t.get_ref() >= 1.0 && *t.get_ref() <= 86_400.0) => {
            return Err(ctx.at(
                t,
                &field("timeout_s"),
                format!("{} is outside 1..=86400", t.get_ref()),
            ));
        }
        Some(t) => secs(*t.get_ref()),
        None => base.map_or(DEFAULT_TIMEOUT, |b| b.timeout),
    };
    Ok(NatSpec {
        mapping,
        filtering,
        timeout,
        hairpin: n.hairpin.or(base.map(|b| b.hairpin)).unwrap_or(false),
        preserve_port: n
            .preserve_port
            .or(base.map(|b| b.preserve_port))
            .unwrap_or(true),
    })
}

/// `[[link]]`: each names two different nodes, once per pair; unset
/// values are the network's.
pub(super) fn links(
    ctx: &Ctx<'_>,
    names: &NodeNames,
    network: &NetworkSpec,
    raw: &[Spanned<RawLink>],
) -> Result<Vec<LinkSpec>, ScenarioError> {
    let mut out: Vec<LinkSpec> = Vec::new();
    for sl in raw {
        let at = sl.span().start;
        let l = sl.get_ref();
        let a = resolve_node(ctx, names, &l.a, "link.a")?;
        let b = resolve_node(ctx, names, &l.b, "link.b")?;
        if a == b {
            return Err(ctx.at(&l.b, "link.b", "a link joins two different nodes"));
        }
        if out
            .iter()
            .any(|o| (o.a.min(o.b), o.a.max(o.b)) == (a.min(b), a.max(b)))
        {
            return Err(ctx.at(
                &l.a,
                "link",
                format!(
                    "the link between {:?} and {:?} is defined twice",
                    l.a.get_ref(),
                    l.b.get_ref()
                ),
            ));
        }
        for (key, v) in [("latency_ms", l.latency_ms), ("jitter_ms", l.jitter_ms)] {
            if v.is_some_and(|v| !(0.0..=600_000.0).contains(&v)) {
                return Err(ctx.err(
                    Some(at),
                    Some(&format!("link.{key}")),
                    "must be between 0 and 600000",
                ));
            }
        }
        let loss = match l.loss {
            Some(v) => probability(ctx, at, "link.loss", v)?,
            None => network.loss,
        };
        let burst = match &l.burst {
            Some(b) => Some(burst(ctx, "link.burst", b)?),
            None => network.burst,
        };
        out.push(LinkSpec {
            a,
            b,
            params: LinkParams {
                latency: l.latency_ms.map_or(network.latency, millis),
                jitter: l.jitter_ms.map_or(network.jitter, millis),
                loss,
                burst,
            },
        });
    }
    Ok(out)
}

/// Every `nat_rebind` names a node behind a NAT (there is nothing else to
/// rebind).
pub(super) fn check_nat_rebinds(
    ctx: &Ctx<'_>,
    nodes: &[NodeSpec],
    actions: &[Action],
) -> Result<(), ScenarioError> {
    for action in actions {
        if let ActionKind::NatRebind { node } = action.kind
            && nodes[node].nat.is_none()
        {
            return Err(ScenarioError {
                file: ctx.file.to_string(),
                line: Some(action.line),
                field: Some("node".into()),
                message: format!(
                    "nat_rebind: node {:?} has no NAT (give it `nat = {{ ... }}`)",
                    nodes[node].name
                ),
            });
        }
    }
    Ok(())
}

/// Every route a `set_allowed_ips` approves (a listed prefix other than
/// the node's own addresses) must be one the node advertises (its
/// `subnets`): the coordination server refuses any other, so such an
/// action could only ever be refused, which is a mistake in the file.
pub(super) fn check_allowed_ips(
    ctx: &Ctx<'_>,
    nodes: &[NodeSpec],
    actions: &[Action],
) -> Result<(), ScenarioError> {
    for action in actions {
        let ActionKind::SetAllowedIps { node, allowed_ips } = &action.kind else {
            continue;
        };
        let own = [
            IpNet::from(IpAddr::V4(crate::world::address::tailnet_ip4(*node))),
            IpNet::from(IpAddr::V6(crate::world::address::tailnet_ip6(*node))),
        ];
        if let Some(route) = allowed_ips
            .iter()
            .find(|net| !own.contains(net) && !nodes[*node].subnets.contains(net))
        {
            return Err(ScenarioError {
                file: ctx.file.to_string(),
                line: Some(action.line),
                field: Some("allowed_ips".into()),
                message: format!(
                    "set_allowed_ips: node {:?} does not advertise {route} (add it to the node's `subnets`; control approves only advertised routes)",
                    nodes[*node].name
                ),
            });
        }
    }
    Ok(())
}
