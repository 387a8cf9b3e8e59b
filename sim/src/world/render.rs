//! How what an engine reports is written into the trace, in one place for
//! both backends: datagram kinds, engine events, effects and ping results.
//!
//! The two backends have always written some of these differently (the
//! turmoil backend leaves out path latencies, prints ping latencies in
//! microseconds and cuts unfamiliar values to 60 characters). Since the trace
//! hash covers every line, [`Rendering`] keeps both forms, so a backend's
//! hashes do not change with this module; making them one form is a
//! deliberate hash change for later.

use std::net::IpAddr;
use std::time::Duration;

use wgmesh_core::wire;
use wgmesh_core::{Effect, Event, NodePublicKey, PingKind, PingOutcome, RemoveReason, WakeReason};

/// Which form a backend writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rendering {
    /// The event backend's: every field it knows, latencies in milliseconds.
    Full,
    /// The turmoil backend's: fewer fields, the `Debug` form of anything
    /// else cut to 60 characters.
    Compact,
}

/// The `Debug` form of `value`, cut to 60 characters.
fn compact_debug(value: &impl std::fmt::Debug) -> String {
    format!("{value:?}").chars().take(60).collect()
}

/// A duration in milliseconds with three decimals (`20.000ms`).
pub(crate) fn ms(d: Duration) -> String {
    format!("{}.{:03}ms", d.as_millis(), d.subsec_micros() % 1000)
}

/// What a WireGuard or disco datagram is, from its first bytes and size.
pub fn datagram_kind(data: &[u8]) -> &'static str {
    if wire::disco::looks_like_disco(data) {
        return "disco";
    }
    match (data.first(), data.len()) {
        (Some(1), _) => "wg-init",
        (Some(2), _) => "wg-resp",
        (Some(3), _) => "wg-cookie",
        (Some(4), 32) => "wg-keepalive",
        (Some(4), _) => "wg-data",
        _ => "other",
    }
}

/// Why a peer was woken, in words.
pub(crate) fn wake_name(w: &WakeReason) -> String {
    match w {
        WakeReason::SendTo(ip) => format!("send-to {ip}"),
        WakeReason::Receive => "receive".into(),
        WakeReason::Handshake => "handshake".into(),
        WakeReason::Ping => "ping".into(),
    }
}

/// Why a peer left WireGuard, in words.
pub(crate) fn remove_name(r: &RemoveReason) -> String {
    match r {
        RemoveReason::Idle { idle_secs } => format!("idle {idle_secs}s"),
        RemoveReason::RemovedFromConfig => "removed-from-config".into(),
        RemoveReason::DiscoKeyChanged => "disco-key-changed".into(),
        RemoveReason::ConfigChanged => "config-changed".into(),
        RemoveReason::Closed => "closed".into(),
    }
}

/// An engine event as a trace entry's kind and detail; `peer_name` names a
/// peer by its key.
pub(crate) fn event_line(
    event: &Event,
    peer_name: impl Fn(&NodePublicKey) -> String,
    rendering: Rendering,
) -> (&'static str, String) {
    match (event, rendering) {
        (Event::PeerConfigured { peer, woken }, _) => (
            "peer-configured",
            match woken {
                Some(w) => format!("{} woken by {}", peer_name(peer), wake_name(w)),
                None => peer_name(peer),
            },
        ),
        (Event::PeerRemoved { peer, reason }, _) => (
            "peer-removed",
            format!("{} {}", peer_name(peer), remove_name(reason)),
        ),
        (Event::SessionFlushed { peer, .. }, _) => ("session-flushed", peer_name(peer)),
        (Event::HandshakeCompleted { peer, endpoint }, _) => {
            ("handshake", format!("{} via {endpoint}", peer_name(peer)))
        }
        (
            Event::PathChanged {
                peer,
                endpoint,
                latency,
            },
            rendering,
        ) => {
            let endpoint = endpoint.map_or_else(|| "none".to_string(), |e| e.to_string());
            let detail = match rendering {
                Rendering::Full => format!(
                    "{} {} {}",
                    peer_name(peer),
                    endpoint,
                    latency.map_or_else(|| "-".to_string(), ms)
                ),
                Rendering::Compact => format!("{} {}", peer_name(peer), endpoint),
            };
            ("path-changed", detail)
        }
        (Event::ConnectionFailed(f), Rendering::Full) => (
            "conn-failed",
            format!("{} -> {} {:?}", f.src, f.dst, f.cause),
        ),
        (other, Rendering::Full) => ("event", format!("{other:?}")),
        (other, Rendering::Compact) => ("event", compact_debug(other)),
    }
}

/// An effect as a trace entry's detail.
pub(crate) fn effect_detail(effect: &Effect, rendering: Rendering) -> String {
    match (effect, rendering) {
        (Effect::Rebind, _) => "rebind".into(),
        (Effect::ReDiscoverEndpoints { reason }, _) => format!("rediscover-endpoints {reason}"),
        (other, Rendering::Compact) => compact_debug(other),
        (Effect::ApplyRouter(r), Rendering::Full) => format!(
            "apply-router addrs={} routes={} advertised={}",
            r.local_addrs.len(),
            r.routes.len(),
            r.advertised_routes.len()
        ),
        (Effect::ApplyDns(d), Rendering::Full) => {
            format!("apply-dns nameservers={}", d.nameservers.len())
        }
        (Effect::FlushDnsCaches, Rendering::Full) => "flush-dns-caches".into(),
        (Effect::SetNetworkUp(up), Rendering::Full) => format!("network-up {up}"),
        (Effect::SetBirdProtocol { protocol, enabled }, Rendering::Full) => {
            format!("bird {protocol} {enabled}")
        }
        (Effect::SetListenPort(p), Rendering::Full) => format!("listen-port {p}"),
        (Effect::SetPathMtuDiscovery(on), Rendering::Full) => format!("path-mtu {on}"),
        (other, Rendering::Full) => format!("{other:?}"),
    }
}

/// How ping `id` of `kind` to `ip` ended, as a trace entry's detail.
pub(crate) fn ping_result_detail(
    id: u64,
    kind: PingKind,
    ip: IpAddr,
    outcome: &PingOutcome,
    rendering: Rendering,
) -> String {
    let kind = kind.as_str();
    match outcome {
        // Both backends write the latency in milliseconds, to the
        // microsecond, so two timelines read alike.
        PingOutcome::Pong {
            latency, node_name, ..
        } => match rendering {
            Rendering::Full | Rendering::Compact => format!(
                "#{id} {kind} {ip} pong from {node_name} in {}",
                ms(*latency)
            ),
        },
        PingOutcome::Timeout => format!("#{id} {kind} {ip} timeout"),
        PingOutcome::Error { message, .. } => format!("#{id} {kind} {ip} error: {message}"),
    }
}
