//! The liveness oracle every run applies: a datagram sent while the network
//! is healthy arrives, once, within the default bound; a ping or a flow
//! started while it is healthy is answered within its own (see
//! `exchange_check`).
//!
//! The scenario's own checks say what a run must show; this one says what
//! every run must never show, the way the invariants do for safety. A stall
//! (a handshake storm, a replayed stamp, a packet waiting for the wrong
//! handshake) and a loss are failures wherever they happen, also in files
//! that never thought to check for them, and in every case `explore` makes.
//!
//! **Healthy** means: the network drops nothing (`loss = 0`), and no fault (a restart, a partition or its heal, a link
//! change, an AllowedIPs change through control, or from a policy
//! change on to the end; a knob change is none, see `impaired_spans`) happened from
//! [`SETTLE`] before the send until the deadline. After a fault the tailnet
//! gets [`SETTLE`] to recover (control's delay, a handshake retry at 5 s, a
//! disco path's 6.5 s trust) before it is judged again. A partition is a
//! fault until [`SETTLE`] after the heal, a restart until [`SETTLE`] after
//! the node is back, a link down until [`SETTLE`] after it is up again.
//!
//! **Control outages.** The coordination server being down or cut off is
//! no fault in itself: a node keeps its last netmap, and its tunnels keep
//! working. But a fault that needs control to recover from (a restarted
//! node learns its peers only from a netmap, peers learn a new disco key or
//! endpoint only from a push) cannot recover while control is unreachable.
//! So a fault whose span overlaps a control outage (a server restart's
//! downtime, or a `control_partition` until its heal) or the
//! [`CONTROL_RECONNECT`] after it stays unjudged until [`CONTROL_RECONNECT`]
//! plus [`SETTLE`] after the outage ends: the time a client needs to notice
//! and reconnect, then the usual recovery.
//!
//! **The default bound** for a datagram is one handshake round trip plus one
//! way, each of the three trips with its full jitter: `3 x (latency +
//! jitter)`. When the receiver was itself sending to the sender (a stream's
//! datagram, a flow's opening, a TSMP or ICMP ping) within one
//! round trip of the send, before or after (a crossing wake: both sides initiate, and WireGuard's
//! rules make one side's packets wait for the other's session to be
//! confirmed) the bound is one round trip more. That holds for whichever
//! side started first: the one with the higher key is the initiator. Only streams addressed to a
//! node's tailnet address are judged (a send into a subnet or to an address
//! nobody has is a scenario about that, with its own checks).

use std::net::IpAddr;
use std::time::Duration;

use crate::report::Check;
use crate::scenario::{ActionKind, Scenario};
use crate::world::address::{tailnet_ip4, tailnet_ip6};
use wgmesh_core::{PingKind, PingOutcome};

use crate::world::{FlowRecord, FlowState, LinkKind, NodeId, PingRecord, StreamRecord};

/// How long after a fault the tailnet is given to recover before its
/// datagrams are judged again.
pub const SETTLE: Duration = Duration::from_secs(20);

/// The longest a client may take to be back on a map stream after a
/// control outage ends: after a partition it notices only when a
/// keep-alive names messages it missed or its stream has been silent for
/// [`STREAM_SILENCE`], and its next attempt may be up to [`RETRY_MAX`]
/// away.
///
/// [`STREAM_SILENCE`]: crate::world::control::STREAM_SILENCE
/// [`RETRY_MAX`]: crate::world::control::RETRY_MAX
pub const CONTROL_RECONNECT: Duration = Duration::from_secs(
    crate::world::control::STREAM_SILENCE.as_secs() + crate::world::control::RETRY_MAX.as_secs(),
);

/// A span of virtual time during which the network is not healthy.
#[derive(Debug, Clone, Copy)]
struct Impaired {
    from: Duration,
    until: Duration,
}

/// The spans in which datagrams are not judged, from the run's schedule
/// (the file's actions and the churn expanded for this seed); `None` when
/// the whole run is unjudged (the network loses datagrams).
fn impaired_spans(scenario: &Scenario, seed: u64) -> Option<Vec<Impaired>> {
    if scenario.network.loss > 0.0 || crate::world::fabric::lossy(&scenario.network) {
        return None;
    }
    let end = scenario.duration + SETTLE;
    let actions = scenario.schedule(seed);
    let mut spans = Vec::new();
    let mut open_partition: Option<Duration> = None;
    let mut open_control_cut: Option<Duration> = None;
    let mut control_outages: Vec<Impaired> = Vec::new();
    let mut down_links: Vec<(usize, Duration)> = Vec::new();
    for action in &actions {
        let at = action.at;
        match &action.kind {
            ActionKind::Send { .. }
            | ActionKind::Ping { .. }
            | ActionKind::Flow { .. }
            | ActionKind::Idle { .. } => {}
            ActionKind::Restart { downtime, .. } | ActionKind::RestoreDiscoKey { downtime, .. } => {
                spans.push(Impaired {
                    from: at,
                    until: at + *downtime + SETTLE,
                })
            }
            ActionKind::Partition { .. } => {
                open_partition.get_or_insert(at);
            }
            ActionKind::Heal => {
                if let Some(from) = open_control_cut.take() {
                    control_outages.push(Impaired { from, until: at });
                }
                let from = open_partition.take().unwrap_or(at);
                spans.push(Impaired {
                    from,
                    until: at + SETTLE,
                });
            }
            ActionKind::LinkChange { node, link } => match link {
                LinkKind::Down => down_links.push((*node, at)),
                LinkKind::Up => {
                    let from = down_links
                        .iter()
                        .position(|(n, _)| n == node)
                        .map_or(at, |i| down_links.remove(i).1);
                    spans.push(Impaired {
                        from,
                        until: at + SETTLE,
                    });
                }
                LinkKind::Major | LinkKind::Minor => spans.push(Impaired {
                    from: at,
                    until: at + SETTLE,
                }),
            },
            // A knob changes how the engine holds its peers (trimming
            // forced off or on) or who answers an ICMP echo, never whether
            // a datagram gets through: turning trimming on keeps every peer
            // active in the last 5 min, and a trimmed peer wakes on its next
            // packet as after any trim. So a knob change is no fault; what
            // is sent across it is judged like everything else.
            ActionKind::SetKnob { .. } => {}
            ActionKind::SetAllowedIps { .. } => {
                spans.push(Impaired {
                    from: at,
                    until: at + SETTLE,
                });
            }
            // A new policy may cut flows for good: what is sent after it is
            // the scenario's to judge.
            ActionKind::SetPolicy { .. } => spans.push(Impaired {
                from: at,
                until: end,
            }),
            // The data plane does not depend on the coordination server
            // being reachable: a node keeps its last netmap, so a server
            // restart or a cut to it is no fault for the oracle. Only the
            // faults it overlaps wait for it (below).
            ActionKind::ControlRestart { downtime } => control_outages.push(Impaired {
                from: at,
                until: at + *downtime,
            }),
            ActionKind::ControlPartition { .. } => {
                open_control_cut.get_or_insert(at);
            }
            // A rebinding breaks the direct path until the peers learn the
            // new mapping (through disco or the relay), as a link change does.
            ActionKind::NatRebind { .. } => spans.push(Impaired {
                from: at,
                until: at + SETTLE,
            }),
        }
    }
    if let Some(from) = open_partition {
        spans.push(Impaired { from, until: end });
    }
    for (_, from) in down_links {
        spans.push(Impaired { from, until: end });
    }
    if let Some(from) = open_control_cut {
        control_outages.push(Impaired { from, until: end });
    }
    // Clients are back on their streams only up to `CONTROL_RECONNECT`
    // after control is: a fault in that time is as blind as one during the
    // outage (found by explore: a node restarted 76 ms after the server came
    // back; its peer, still in its 30 s retry, heard of the new disco key 23
    // s later and flushed the session both had made meanwhile).
    for span in &mut spans {
        for outage in &control_outages {
            let reconnected = outage.until + CONTROL_RECONNECT;
            if outage.from <= span.until && span.from <= reconnected {
                span.until = span.until.max(reconnected + SETTLE);
            }
        }
    }
    Some(spans)
}

/// The node whose tailnet address `ip` is.
fn node_of(scenario: &Scenario, ip: IpAddr) -> Option<usize> {
    (0..scenario.nodes.len())
        .find(|&i| ip == IpAddr::V4(tailnet_ip4(i)) || ip == IpAddr::V6(tailnet_ip6(i)))
}

/// One liveness check per stream to a node, in stream order.
///
/// `flows` and `pings` count as traffic the other way for the crossing
/// allowance: a flow's opening or a TSMP or ICMP ping from the receiver
/// needs a session as much as a stream does (found by explore: a flow
/// opened 61 ms after a stream the other way made the stream's first
/// datagram wait for the crossing, and the oracle called it late).
///
/// `queue_refusals(node)` is how many packets node's engine refused to
/// queue behind a handshake over the whole run, its full wake queue's
/// counted drops (`drop_queue_overflow` and `drop_queue_budget_exceeded`):
/// a burst larger than the documented bound loses its excess at the
/// sender, counted, which is no fault of the network or of the wake. Each
/// sender's refusals excuse that many lost datagrams of its streams, in
/// stream order, and the check says how many it excused.
pub(crate) fn liveness_checks(
    scenario: &Scenario,
    seed: u64,
    streams: &[StreamRecord],
    flows: &[FlowRecord],
    pings: &[PingRecord],
    queue_refusals: &dyn Fn(usize) -> u64,
) -> Vec<Check> {
    let Some(spans) = impaired_spans(scenario, seed) else {
        return Vec::new();
    };
    let mut refusals_left: std::collections::BTreeMap<usize, u64> =
        std::collections::BTreeMap::new();
    let one_way = crate::world::fabric::slowest_one_way(&scenario.network);
    let bound = one_way * 3;
    let crossing_bound = one_way * 5;
    let round_trip = one_way * 2;
    let mut checks = Vec::new();
    for (index, stream) in streams.iter().enumerate() {
        let Some(receiver) = node_of(scenario, stream.dst) else {
            continue;
        };
        let sender = stream.from.0;
        let name = stream.label.clone().unwrap_or_else(|| format!("#{index}"));
        // Sends of the receiver to the sender, for the crossing allowance:
        // its streams' datagrams, its flows' openings and its pings that
        // travel inside the tunnel (a disco ping needs no session).
        let towards_sender = |from: NodeId, dst: IpAddr| {
            from.0 == receiver && node_of(scenario, dst) == Some(sender)
        };
        let reverse_sends: Vec<Duration> = streams
            .iter()
            .filter(|s| towards_sender(s.from, s.dst))
            .flat_map(|s| s.sent.iter().copied())
            .chain(
                flows
                    .iter()
                    .filter(|f| towards_sender(f.from, f.dst.ip()))
                    .map(|f| f.started),
            )
            .chain(
                pings
                    .iter()
                    .filter(|p| p.kind != PingKind::Disco && towards_sender(p.from, p.ip))
                    .map(|p| p.started),
            )
            .collect();
        let (mut judged, mut late, mut lost) = (0u64, 0u64, 0u64);
        let mut first_lost: Option<Duration> = None;
        let mut worst: Option<(Duration, Duration, Duration)> = None;
        for (sent, delivered) in stream.sent.iter().zip(&stream.delivered) {
            let crossing = reverse_sends
                .iter()
                .any(|r| r.abs_diff(*sent) <= round_trip);
            let allowed = if crossing { crossing_bound } else { bound };
            let deadline = *sent + allowed;
            if deadline > scenario.duration {
                continue;
            }
            let window_from = sent.saturating_sub(SETTLE);
            if spans
                .iter()
                .any(|s| s.from <= deadline && window_from <= s.until)
            {
                continue;
            }
            judged += 1;
            match delivered {
                None => {
                    lost += 1;
                    first_lost.get_or_insert(*sent);
                }
                Some(at) => {
                    let delay = at.saturating_sub(*sent);
                    if delay > allowed {
                        late += 1;
                    }
                    if worst.is_none_or(|(d, _, _)| delay > d) {
                        worst = Some((delay, *sent, allowed));
                    }
                }
            }
        }
        if judged == 0 {
            continue;
        }
        let left = refusals_left
            .entry(sender)
            .or_insert_with(|| queue_refusals(sender));
        let excused = lost.min(*left);
        *left -= excused;
        let mut detail = match worst {
            Some((delay, sent, allowed)) => format!(
                "{judged} sent while healthy: {lost} lost, {late} late; longest delay {} (sent at {:.3}s, bound {})",
                fmt_ms(delay),
                sent.as_secs_f64(),
                fmt_ms(allowed)
            ),
            None => format!("{judged} sent while healthy: all {lost} lost"),
        };
        if let Some(at) = first_lost {
            detail.push_str(&format!("; first lost sent at {:.3}s", at.as_secs_f64()));
        }
        if excused > 0 {
            detail.push_str(&format!(
                "; {excused} of the lost refused by the sender's full wake queue (counted)"
            ));
        }
        checks.push(Check {
            name: format!("liveness {name}"),
            passed: lost == excused && late == 0,
            detail,
        });
    }
    let traffic = Traffic {
        streams,
        flows,
        pings,
    };
    // A ping is a datagram each way; it may wait for a handshake first.
    let ping_exchanges: Vec<Exchange> = pings
        .iter()
        .enumerate()
        .map(|(index, ping)| Exchange {
            name: ping.label.clone().unwrap_or_else(|| format!("#{index}")),
            from: ping.from.0,
            to: ping.ip,
            started: ping.started,
            answered: match &ping.result {
                Some((at, PingOutcome::Pong { .. })) => Some(*at),
                Some((_, PingOutcome::Timeout | PingOutcome::Error { .. })) | None => None,
            },
            round_trips: 1,
        })
        .collect();
    checks.extend(exchange_check(
        "pings",
        scenario,
        &spans,
        &traffic,
        &ping_exchanges,
    ));
    // A flow opens (a round trip), then asks and is answered (another),
    // after a handshake, and retransmits nothing in a healthy network.
    let flow_exchanges: Vec<Exchange> = flows
        .iter()
        .enumerate()
        .map(|(index, flow)| Exchange {
            name: flow.label.clone().unwrap_or_else(|| format!("#{index}")),
            from: flow.from.0,
            to: flow.dst.ip(),
            started: flow.started,
            answered: match flow.state {
                FlowState::Done if flow.retransmits == 0 => flow.finished,
                FlowState::Done
                | FlowState::Opening
                | FlowState::Requesting
                | FlowState::Failed => None,
            },
            round_trips: 2,
        })
        .collect();
    checks.extend(exchange_check(
        "flows",
        scenario,
        &spans,
        &traffic,
        &flow_exchanges,
    ));
    checks
}

/// Everything the run sent, for the crossing allowance.
struct Traffic<'a> {
    streams: &'a [StreamRecord],
    flows: &'a [FlowRecord],
    pings: &'a [PingRecord],
}

impl Traffic<'_> {
    /// Whether node `from` sent anything through the tunnel to node `to`
    /// within `window` of `at`.
    fn sent_near(
        &self,
        scenario: &Scenario,
        from: usize,
        to: usize,
        at: Duration,
        window: Duration,
    ) -> bool {
        let towards =
            |node: NodeId, dst: IpAddr| node.0 == from && node_of(scenario, dst) == Some(to);
        let near = |t: Duration| t.abs_diff(at) <= window;
        self.streams
            .iter()
            .filter(|s| towards(s.from, s.dst))
            .any(|s| s.sent.iter().any(|&t| near(t)))
            || self
                .flows
                .iter()
                .any(|f| towards(f.from, f.dst.ip()) && near(f.started))
            || self
                .pings
                .iter()
                .any(|p| p.kind != PingKind::Disco && towards(p.from, p.ip) && near(p.started))
    }
}

/// A request and its answer between two nodes: a ping, or a flow's
/// opening, request and response.
struct Exchange {
    name: String,
    from: usize,
    to: IpAddr,
    started: Duration,
    /// When it was answered in full, if it was (a flow that needed a
    /// retransmission counts as unanswered).
    answered: Option<Duration>,
    /// Round trips it takes once a session exists, the handshake's not
    /// counted.
    round_trips: u32,
}

/// One check for every exchange of a kind between two nodes' tailnet
/// addresses started while the network was healthy: it is answered within
/// one handshake round trip plus its own round trips, one round trip more
/// when the target was itself sending to the initiator (a crossing wake).
/// Pings and flows are datagrams each way, so they are judged as streams
/// are (found by explore: a ping sent 24 ms before the peer's idle trim
/// timed out in a healthy network, and only a later stream showed it).
fn exchange_check(
    kind: &str,
    scenario: &Scenario,
    spans: &[Impaired],
    traffic: &Traffic<'_>,
    exchanges: &[Exchange],
) -> Option<Check> {
    let one_way = crate::world::fabric::slowest_one_way(&scenario.network);
    let round_trip = one_way * 2;
    let (mut judged, mut unanswered, mut late) = (0u64, 0u64, 0u64);
    let mut worst: Option<(Duration, Duration, Duration)> = None;
    let mut first_unanswered: Option<(Duration, &str)> = None;
    for exchange in exchanges {
        let Some(target) = node_of(scenario, exchange.to) else {
            continue;
        };
        if target == exchange.from {
            continue;
        }
        let crossing = traffic.sent_near(
            scenario,
            target,
            exchange.from,
            exchange.started,
            round_trip,
        );
        let round_trips = 1 + exchange.round_trips + u32::from(crossing);
        let allowed = round_trip * round_trips;
        let deadline = exchange.started + allowed;
        if deadline > scenario.duration {
            continue;
        }
        let window_from = exchange.started.saturating_sub(SETTLE);
        if spans
            .iter()
            .any(|s| s.from <= deadline && window_from <= s.until)
        {
            continue;
        }
        judged += 1;
        match exchange.answered {
            Some(at) => {
                let delay = at.saturating_sub(exchange.started);
                if delay > allowed {
                    late += 1;
                }
                if worst.is_none_or(|(d, _, _)| delay > d) {
                    worst = Some((delay, exchange.started, allowed));
                }
            }
            None => {
                unanswered += 1;
                first_unanswered.get_or_insert((exchange.started, &exchange.name));
            }
        }
    }
    if judged == 0 {
        return None;
    }
    let mut detail =
        format!("{judged} started while healthy: {unanswered} unanswered, {late} late");
    if let Some((delay, sent, allowed)) = worst {
        detail.push_str(&format!(
            "; longest {} (started at {:.3}s, bound {})",
            fmt_ms(delay),
            sent.as_secs_f64(),
            fmt_ms(allowed)
        ));
    }
    if let Some((at, name)) = first_unanswered {
        detail.push_str(&format!(
            "; first unanswered: {name} started at {:.3}s",
            at.as_secs_f64()
        ));
    }
    Some(Check {
        name: format!("liveness {kind}"),
        passed: unanswered == 0 && late == 0,
        detail,
    })
}

fn fmt_ms(d: Duration) -> String {
    format!("{:.3}ms", d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans_of(actions: &str) -> Vec<(f64, f64)> {
        let text = format!(
            "name = \"t\"\ndescription = \"t\"\nseed = 1\nduration_s = 400\n\n[network]\nlatency_ms = 20\n\n[[node]]\nname = \"a\"\n\n[[node]]\nname = \"b\"\n{actions}"
        );
        let scenario = Scenario::parse("t.toml", &text).unwrap();
        impaired_spans(&scenario, 1)
            .unwrap()
            .iter()
            .map(|s| (s.from.as_secs_f64(), s.until.as_secs_f64()))
            .collect()
    }

    #[test]
    fn a_control_outage_alone_is_no_fault() {
        assert!(
            spans_of("\n[[action]]\nat_s = 10\ndo = \"control_restart\"\ndowntime_s = 30\n")
                .is_empty()
        );
    }

    #[test]
    fn a_restart_during_a_server_outage_waits_for_the_server() {
        let restart = "\n[[action]]\nat_s = 50\ndo = \"restart\"\nnode = \"b\"\ndowntime_s = 2\n";
        // Alone: back at 52 s, judged again from 72 s.
        assert_eq!(spans_of(restart), vec![(50.0, 72.0)]);
        // The server is down from 40 s to 70 s: the restarted node has no
        // netmap until it reconnects, so it is unjudged until 70 + 95 + 20.
        let outage = "\n[[action]]\nat_s = 40\ndo = \"control_restart\"\ndowntime_s = 30\n";
        assert_eq!(spans_of(&format!("{outage}{restart}")), vec![(50.0, 185.0)]);
        // So does a restart while clients may still be reconnecting: the
        // server was back at 20 s, clients are sure to be only at 115 s.
        let recent = "\n[[action]]\nat_s = 5\ndo = \"control_restart\"\ndowntime_s = 15\n";
        assert_eq!(spans_of(&format!("{recent}{restart}")), vec![(50.0, 135.0)]);
        // An outage long over before the restart changes nothing.
        let early = "\n[[action]]\nat_s = 1\ndo = \"control_restart\"\ndowntime_s = 0\n";
        let later = restart.replace("at_s = 50", "at_s = 200");
        assert_eq!(spans_of(&format!("{early}{later}")), vec![(200.0, 222.0)]);
    }

    #[test]
    fn a_link_change_during_a_control_cut_waits_for_the_heal() {
        let actions = "\n[[action]]\nat_s = 10\ndo = \"control_partition\"\nnodes = [\"a\"]\n\n[[action]]\nat_s = 30\ndo = \"link_change\"\nnode = \"a\"\nlink = \"major\"\n\n[[action]]\nat_s = 100\ndo = \"heal\"\n";
        // The link change's own span (30-50 s) overlaps the cut (10-100 s);
        // the heal's span (100-120 s) overlaps it too.
        assert_eq!(spans_of(actions), vec![(30.0, 215.0), (100.0, 215.0)]);
    }

    /// A test ping: sent at (s), to, and its end (after s, answered).
    type TestPing<'a> = (f64, &'a str, Option<(f64, bool)>);

    fn ping_verdict(actions: &str, pings: &[TestPing<'_>]) -> Option<Check> {
        let text = format!(
            "name = \"t\"\ndescription = \"t\"\nseed = 1\nduration_s = 400\n\n[network]\nlatency_ms = 20\n\n[[node]]\nname = \"a\"\n\n[[node]]\nname = \"b\"\n{actions}"
        );
        let scenario = Scenario::parse("t.toml", &text).unwrap();
        let records: Vec<PingRecord> = pings
            .iter()
            .map(|&(at, ip, result)| {
                let mut record = PingRecord::new(
                    None,
                    NodeId(0),
                    ip.parse().unwrap(),
                    PingKind::Icmp,
                    Duration::from_secs_f64(at),
                    0,
                );
                record.result = result.map(|(after, answered)| {
                    let outcome = if answered {
                        PingOutcome::Pong {
                            latency: Duration::from_secs_f64(after),
                            node_ip: None,
                            node_name: "b".into(),
                            node_key: wgmesh_core::NodePublicKey([0; 32]),
                            endpoint: None,
                            peerapi_port: None,
                        }
                    } else {
                        PingOutcome::Timeout
                    };
                    (Duration::from_secs_f64(at + after), outcome)
                });
                record
            })
            .collect();
        liveness_checks(&scenario, 1, &[], &[], &records, &|_| 0)
            .into_iter()
            .find(|c| c.name == "liveness pings")
    }

    #[test]
    fn a_ping_in_a_healthy_network_is_answered_within_two_round_trips() {
        let b = "100.64.0.2";
        // One handshake round trip and the ping's own: 80 ms at 20 ms.
        let check = ping_verdict("", &[(10.0, b, Some((0.080, true)))]).unwrap();
        assert!(check.passed, "{}", check.detail);
        let check = ping_verdict("", &[(10.0, b, Some((0.081, true)))]).unwrap();
        assert!(!check.passed, "late: {}", check.detail);
        let check = ping_verdict("", &[(10.0, b, Some((10.0, false)))]).unwrap();
        assert!(!check.passed, "timed out: {}", check.detail);
        assert!(check.detail.contains("1 unanswered"), "{}", check.detail);
        // A restart of the target before the deadline excuses it, and so
        // does a ping that would end after the run.
        let restart =
            "\n[[action]]\nat_s = 10.05\ndo = \"restart\"\nnode = \"b\"\ndowntime_s = 2\n";
        assert!(ping_verdict(restart, &[(10.0, b, Some((10.0, false)))]).is_none());
        assert!(ping_verdict("", &[(399.99, b, None)]).is_none());
        // Pings to addresses that are no node's are the scenario's business.
        assert!(ping_verdict("", &[(10.0, "10.9.9.9", Some((10.0, false)))]).is_none());
    }

    #[test]
    fn a_flow_in_a_healthy_network_completes_in_three_round_trips_without_retransmits() {
        let text = "name = \"t\"\ndescription = \"t\"\nseed = 1\nduration_s = 400\n\n[network]\nlatency_ms = 20\n\n[[node]]\nname = \"a\"\n\n[[node]]\nname = \"b\"\n";
        let scenario = Scenario::parse("t.toml", text).unwrap();
        let flow = |finished_after: f64, retransmits: u32| {
            let started = Duration::from_secs(10);
            let mut record = FlowRecord::new(
                None,
                NodeId(0),
                0,
                "100.64.0.1".parse().unwrap(),
                "100.64.0.2".parse().unwrap(),
                100,
                1000,
                started,
            );
            record.state = FlowState::Done;
            record.finished = Some(started + Duration::from_secs_f64(finished_after));
            record.retransmits = retransmits;
            let checks = liveness_checks(&scenario, 1, &[], &[record], &[], &|_| 0);
            checks
                .into_iter()
                .find(|c| c.name == "liveness flows")
                .unwrap()
        };
        // A handshake, the opening and the request: 120 ms at 20 ms.
        assert!(flow(0.120, 0).passed);
        assert!(!flow(0.121, 0).passed);
        assert!(!flow(0.100, 1).passed, "a retransmission is a loss");
    }
}
