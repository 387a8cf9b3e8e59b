//! Lazy WireGuard peers and disco-key changes, on virtual time.

use std::time::Duration;

use ipnet::IpNet;
use wgmesh_core::test_support::{Net, node_reconfig};
use wgmesh_core::*;

const HALF_RTT: Duration = Duration::from_millis(20);

fn lazy() -> Knobs {
    Knobs::default()
}

fn removed_idle(net: &Net, i: usize, j: usize) -> usize {
    let key = net.key(j);
    net.nodes[i]
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::PeerRemoved { peer, reason: RemoveReason::Idle { .. } } if *peer == key))
        .count()
}

#[test]
fn never_active_single_ip_peer_is_tracked_and_trimmed() {
    let mut net = Net::new(2, HALF_RTT, |_, _| {});
    net.configure_all(lazy());
    assert_eq!(net.nodes[0].engine.peer_count(), 1);
    assert_eq!(
        net.nodes[0].engine.configured_peer_count(),
        0,
        "a never-active single-IP peer is trimmed"
    );
    assert_eq!(
        net.nodes[0].engine.is_peer_configured(&net.key(1)),
        Some(false)
    );
}

#[test]
fn subnet_router_is_never_trimmed() {
    let mut net = Net::new(2, HALF_RTT, |_, _| {});
    net.nodes[1]
        .extra_allowed
        .push("10.1.0.0/16".parse::<IpNet>().unwrap());
    net.configure_all(lazy());
    assert!(
        net.configured(0, 1),
        "a peer with a subnet AllowedIP is configured"
    );
    net.run_for(Duration::from_secs(3600));
    assert!(net.configured(0, 1), "and stays configured when idle");
    assert_eq!(removed_idle(&net, 0, 1), 0);
}

#[test]
fn receive_activity_for_untracked_key_changes_nothing() {
    let mut net = Net::new(3, HALF_RTT, |_, _| {});
    // Node 2 is not in node 0's config.
    let mut rc = net.reconfig_for(0, lazy());
    let k2 = net.key(2);
    rc.wireguard
        .as_mut()
        .unwrap()
        .peers
        .retain(|p| p.public_key != k2);
    net.input(0, Input::Reconfig(Box::new(rc))).unwrap();
    let rc1 = net.reconfig_for(2, lazy());
    net.input(2, Input::Reconfig(Box::new(rc1))).unwrap();
    let before = net.nodes[0].events.len();
    let ip0 = net.nodes[0].ip4;
    net.send_udp(2, ip0, b"from a stranger");
    net.run_for(Duration::from_secs(1));
    assert_eq!(
        net.nodes[0].events.len(),
        before,
        "no reconfigure, no event"
    );
    assert_eq!(net.nodes[0].engine.configured_peer_count(), 0);
    assert!(net.nodes[0].engine.counters().drop_wg_unknown_peer >= 1);
    assert!(net.nodes[0].tun_out.is_empty());
}

#[test]
fn receive_from_configured_peer_does_not_reconfigure_and_from_trimmed_peer_re_adds() {
    let mut net = Net::new(2, HALF_RTT, |_, _| {});
    net.configure_all(lazy());
    let ip1 = net.nodes[1].ip4;
    net.send_udp(0, ip1, b"wake");
    net.run_for(Duration::from_secs(1));
    assert!(
        net.configured(1, 0),
        "receive from a trimmed peer re-added it"
    );
    let configured_events = |net: &Net| {
        net.nodes[1]
            .events
            .iter()
            .filter(|(_, e)| matches!(e, Event::PeerConfigured { .. }))
            .count()
    };
    let before = configured_events(&net);
    let ip1 = net.nodes[1].ip4;
    net.send_udp(0, ip1, b"more");
    net.run_for(Duration::from_secs(11));
    net.send_udp(0, ip1, b"even more");
    net.run_for(Duration::from_secs(1));
    assert_eq!(
        configured_events(&net),
        before,
        "receive from a configured peer does not reconfigure"
    );
    assert_eq!(net.delivered(1, b"even more").len(), 1);
}

#[test]
fn idle_peer_is_trimmed_at_threshold_and_its_tunnel_dropped() {
    let mut net = Net::new(2, HALF_RTT, |_, _| {});
    net.configure_all(lazy());
    let ip1 = net.nodes[1].ip4;
    net.send_udp(0, ip1, b"one packet");
    net.run_for(Duration::from_secs(1));
    assert!(net.configured(0, 1));
    let sent_at = net.base;
    net.run_for(Duration::from_secs(400));
    assert!(!net.configured(0, 1));
    assert!(!net.configured(1, 0));
    let (t, reason) = net.nodes[0]
        .events
        .iter()
        .find_map(|(t, e)| match e {
            Event::PeerRemoved {
                reason: r @ RemoveReason::Idle { .. },
                ..
            } => Some((*t, *r)),
            _ => None,
        })
        .unwrap();
    // The last activity A saw is B's passive keepalive, 10 s after B received
    // the packet: A trims B exactly one threshold after it arrived.
    let last_from_b = net.nodes[1]
        .sent_wg
        .iter()
        .copied()
        .filter(|x| *x < t)
        .max()
        .unwrap()
        + HALF_RTT;
    assert_eq!(
        t.duration_since(last_from_b),
        Duration::from_secs(5 * 60),
        "trimmed exactly at last activity + 5 min (the reference's threshold)"
    );
    assert!(last_from_b.duration_since(sent_at) >= Duration::from_secs(10));
    assert_eq!(reason, RemoveReason::Idle { idle_secs: 300 });
    assert_eq!(net.nodes[0].engine.configured_peer_count(), 0);
    assert_eq!(net.nodes[0].engine.counters().peers_trimmed, 1);
}

/// Runs the wake test: returns the delay between sending and delivery.
fn wake_latency(trim_a: bool, trim_b: bool) -> Duration {
    let mut net = Net::new(2, HALF_RTT, |i, cfg| {
        cfg.trim_override = Some(if i == 0 { trim_a } else { trim_b });
    });
    net.configure_all(lazy());
    let ip1 = net.nodes[1].ip4;
    // Warm up, then go idle long enough for trimming.
    net.send_udp(0, ip1, b"warm-up");
    net.run_for(Duration::from_secs(400));
    assert_eq!(net.configured(0, 1), !trim_a);
    assert_eq!(net.configured(1, 0), !trim_b);
    let start = net.now;
    let payloads: Vec<Vec<u8>> = (0..10u8).map(|i| vec![b'w', i, 0xaa, 0x55]).collect();
    for p in &payloads {
        net.send_udp(0, ip1, p);
    }
    net.run_for(Duration::from_secs(2));
    let mut last = start;
    for p in &payloads {
        let d = net.delivered(1, p);
        assert_eq!(d.len(), 1, "packet {p:?} delivered exactly once");
        last = last.max(d[0]);
    }
    last.duration_since(start)
}

#[test]
fn waking_packet_is_delivered_within_one_handshake_round_trip_with_no_loss() {
    // Handshake round trip (2 one-way delays) plus the data's one-way trip.
    let bound = HALF_RTT * 3;
    for (a, b) in [(true, true), (true, false), (false, true)] {
        let latency = wake_latency(a, b);
        assert!(
            latency <= bound,
            "trim a={a} b={b}: delivered after {latency:?}, bound {bound:?}"
        );
        eprintln!("wake latency with trim a={a} b={b}: {latency:?}");
    }
}

#[test]
fn wake_in_the_other_direction_too() {
    let mut net = Net::new(2, HALF_RTT, |_, _| {});
    net.configure_all(lazy());
    let ip0 = net.nodes[0].ip4;
    net.send_udp(1, ip0, b"b to a");
    net.run_for(Duration::from_secs(1));
    assert_eq!(net.delivered(0, b"b to a").len(), 1);
    assert_eq!(net.nodes[0].engine.counters().peers_woken_by_handshake, 1);
    assert_eq!(net.nodes[1].engine.counters().peers_woken_by_send, 1);
}

#[test]
fn queue_overflow_is_bounded_and_counted() {
    let mut net = Net::new(2, HALF_RTT, |i, cfg| {
        if i == 0 {
            cfg.max_queued_packets_per_peer = 8;
        }
    });
    net.configure_all(lazy());
    let ip1 = net.nodes[1].ip4;
    for i in 0..20u8 {
        net.send_udp(0, ip1, &[b'q', i]);
    }
    net.run_for(Duration::from_secs(1));
    assert_eq!(net.nodes[0].engine.counters().drop_queue_overflow, 12);
    let delivered = (0..20u8)
        .filter(|i| !net.delivered(1, &[b'q', *i]).is_empty())
        .count();
    assert_eq!(delivered, 8);
}

fn flushes(net: &Net, i: usize) -> usize {
    net.nodes[i]
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::SessionFlushed { .. }))
        .count()
}

#[test]
fn disco_key_changes_flush_only_configured_peers_with_a_previous_key() {
    let mut net = Net::new(2, HALF_RTT, |_, _| {});
    let knobs = Knobs {
        keep_full_wg_config: true,
        ..Knobs::default()
    };
    // none -> A: not a change.
    let mut rc = net.reconfig_for(0, knobs.clone());
    rc.wireguard.as_mut().unwrap().peers[0].disco_key = None;
    net.input(0, Input::Reconfig(Box::new(rc))).unwrap();
    net.input(
        0,
        Input::Reconfig(Box::new(net.reconfig_for(0, knobs.clone()))),
    )
    .unwrap();
    assert_eq!(flushes(&net, 0), 0, "none -> A is not a change");
    // A -> A: none.
    let outcome = net
        .input(
            0,
            Input::Reconfig(Box::new(net.reconfig_for(0, knobs.clone()))),
        )
        .unwrap();
    assert_eq!(outcome, InputOutcome::Reconfig(ReconfigOutcome::NoChanges));
    assert_eq!(flushes(&net, 0), 0);
    // A -> B on a configured peer: exactly one two-phase flush.
    net.restart(1, 999);
    net.input(
        0,
        Input::Reconfig(Box::new(net.reconfig_for(0, knobs.clone()))),
    )
    .unwrap();
    assert_eq!(flushes(&net, 0), 1);
    let key1 = net.key(1);
    let tail: Vec<_> = net.nodes[0]
        .events
        .iter()
        .rev()
        .take(3)
        .map(|(_, e)| e.clone())
        .collect();
    assert!(
        matches!(tail[2], Event::PeerRemoved { peer, reason: RemoveReason::DiscoKeyChanged } if peer == key1),
        "{tail:?}"
    );
    assert!(matches!(tail[1], Event::SessionFlushed { peer, .. } if peer == key1));
    assert!(matches!(tail[0], Event::PeerConfigured { peer, woken: None } if peer == key1));
    // On a trimmed peer: none.
    net.input(
        0,
        Input::Reconfig(Box::new(net.reconfig_for(0, Knobs::default()))),
    )
    .unwrap();
    net.run_for(Duration::from_secs(1));
    assert!(!net.configured(0, 1));
    net.restart(1, 1234);
    net.input(
        0,
        Input::Reconfig(Box::new(net.reconfig_for(0, Knobs::default()))),
    )
    .unwrap();
    assert_eq!(flushes(&net, 0), 1, "a trimmed peer needs no flush");
}

/// B restarts; A learns B's new disco key; A sends only. Returns the time from
/// the reconfig to the first delivery at the restarted B.
fn restart_recovery(flush: bool) -> Option<Duration> {
    let mut net = Net::new(2, HALF_RTT, |i, cfg| {
        if i == 0 {
            cfg.testing.disable_disco_key_flush = !flush;
        }
    });
    let knobs = Knobs {
        keep_full_wg_config: true,
        ..Knobs::default()
    };
    net.configure_all(knobs.clone());
    let ip1 = net.nodes[1].ip4;
    let ip0 = net.nodes[0].ip4;
    net.send_udp(0, ip1, b"before restart");
    // Two-way traffic right up to the restart, as in a live session.
    for _ in 0..50 {
        net.send_udp(1, ip0, b"b talks");
        net.run_for(Duration::from_millis(100));
    }
    assert_eq!(net.delivered(1, b"before restart").len(), 1);
    net.restart(1, 4242);
    net.input(
        1,
        Input::Reconfig(Box::new(net.reconfig_for(1, knobs.clone()))),
    )
    .unwrap();
    net.run_for(Duration::from_secs(1));
    let reconfig_at = net.now;
    net.input(0, Input::Reconfig(Box::new(net.reconfig_for(0, knobs))))
        .unwrap();
    // A keeps sending one packet every 100 ms for 60 s.
    for i in 0..600u32 {
        let payload = [b"after ".as_slice(), &i.to_be_bytes()].concat();
        net.send_udp(0, ip1, &payload);
        net.run_for(Duration::from_millis(100));
    }
    net.nodes[1]
        .tun_out
        .iter()
        .find(|(_, p)| p.windows(6).any(|w| w == b"after "))
        .map(|(t, _)| t.duration_since(reconfig_at))
}

#[test]
fn restart_recovers_within_one_round_trip_thanks_to_the_flush() {
    let with = restart_recovery(true).expect("recovers with the flush");
    let without = restart_recovery(false);
    eprintln!("restart recovery: with flush {with:?}, without flush {without:?}");
    assert!(with <= HALF_RTT * 3, "with the two-phase flush: {with:?}");
    match without {
        None => {}
        Some(d) => assert!(
            d >= Duration::from_secs(10),
            "without the flush the blackout is long: {d:?}"
        ),
    }
}

#[test]
fn trim_override_and_knob() {
    let mut net = Net::new(2, HALF_RTT, |i, cfg| {
        if i == 1 {
            cfg.trim_override = Some(true);
        }
    });
    let knobs = Knobs {
        keep_full_wg_config: true,
        ..Knobs::default()
    };
    net.configure_all(knobs);
    assert!(net.configured(0, 1), "keep_full_wg_config keeps every peer");
    assert!(
        !net.configured(1, 0),
        "WGMESH_TRIM_WIREGUARD=1 forces trimming over the knob"
    );
    assert!(net.nodes[1].engine.trimming_enabled());
    assert!(!net.nodes[0].engine.trimming_enabled());
}

mod property {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::time::Instant;

    #[derive(Debug, Clone)]
    enum Step {
        Send { from: usize, to: usize },
        Idle { secs: u64 },
        Reconfig { node: usize },
        Restart { node: usize },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0usize..4, 0usize..4).prop_map(|(from, to)| Step::Send { from, to }),
            3 => prop_oneof![Just(1u64), Just(9), Just(61), Just(299), Just(301), Just(900)].prop_map(|secs| Step::Idle { secs }),
            1 => (0usize..4).prop_map(|node| Step::Reconfig { node }),
            1 => (0usize..4).prop_map(|node| Step::Restart { node }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Random traffic, idle periods, reconfigs and restarts: the
        /// WireGuard peer set stays within the full config, recently active
        /// peers are configured, the subnet router is never trimmed, and no
        /// packet to a known peer is lost to trimming.
        #[test]
        fn lazy_peer_invariants(steps in proptest::collection::vec(step(), 1..30)) {
            let mut net = Net::new(4, HALF_RTT, |_, _| {});
            net.nodes[3].extra_allowed.push("10.3.0.0/16".parse::<IpNet>().unwrap());
            net.configure_all(lazy());
            let mut last_activity: BTreeMap<(usize, usize), Instant> = BTreeMap::new();
            let mut sent: BTreeMap<(usize, usize), Vec<Vec<u8>>> = BTreeMap::new();
            let mut seq = 0u32;
            let mut restarts = 0u64;
            for step in steps {
                match step {
                    Step::Send { from, to } if from != to => {
                        seq += 1;
                        let payload = [b"prop".as_slice(), &seq.to_be_bytes()].concat();
                        let ip = net.nodes[to].ip4;
                        net.send_udp(from, ip, &payload);
                        sent.entry((from, to)).or_default().push(payload);
                        last_activity.insert((from, to), net.now);
                        last_activity.insert((to, from), net.now);
                        net.run_for(Duration::from_millis(200));
                    }
                    Step::Send { .. } => {}
                    Step::Idle { secs } => net.run_for(Duration::from_secs(secs)),
                    Step::Reconfig { node } => {
                        let rc = net.reconfig_for(node, lazy());
                        net.input(node, Input::Reconfig(Box::new(rc))).unwrap();
                    }
                    Step::Restart { node } => {
                        restarts += 1;
                        net.restart(node, 7000 + restarts);
                        for j in 0..4 {
                            let rc = net.reconfig_for(j, lazy());
                            net.input(j, Input::Reconfig(Box::new(rc))).unwrap();
                        }
                        // A restarted node forgets everything it had.
                        last_activity.retain(|(a, _), _| *a != node);
                        net.run_for(Duration::from_millis(200));
                    }
                }
                for i in 0..4 {
                    let engine = &net.nodes[i].engine;
                    let full = engine.full_config_peers();
                    for k in engine.configured_peers() {
                        prop_assert!(full.contains(&k), "configured peer outside the full config");
                    }
                    if i != 3 {
                        prop_assert!(net.configured(i, 3), "the subnet router is never trimmed");
                    }
                    for j in 0..4 {
                        if let Some(t) = last_activity.get(&(i, j)) {
                            // Activity is recorded every 10 s, so allow that much.
                            let horizon = LAZY_PEER_IDLE_THRESHOLD - RECEIVE_ACTIVITY_GRANULARITY;
                            if net.now.duration_since(*t) < horizon {
                                prop_assert!(net.configured(i, j), "node {i} trimmed active peer {j}");
                            }
                        }
                    }
                }
            }
            net.run_for(Duration::from_secs(12));
            for ((from, to), payloads) in &sent {
                // Handshake stamps follow virtual time (the harness's virtual
                // wall clock), so no destination ever refuses one as stale
                // and no destination is left out of the no-loss check.
                prop_assert_eq!(net.nodes[*to].engine.counters().drop_wg_stale_timestamp, 0);
                for p in payloads {
                    prop_assert_eq!(net.delivered(*to, p).len(), 1, "packet {} -> {} lost", from, to);
                }
            }
        }
    }
}

#[test]
fn status_counts_configured_and_full_config_peers() {
    let mut net = Net::new(3, HALF_RTT, |_, _| {});
    net.configure_all(lazy());
    let ip1 = net.nodes[1].ip4;
    net.send_udp(0, ip1, b"one active peer");
    net.run_for(Duration::from_secs(1));
    net.input(0, Input::StatusRequest).unwrap();
    let status = net.nodes[0].statuses.last().unwrap().1.clone();
    assert_eq!((status.configured_peers, status.full_config_peers), (1, 2));
    let trimmed: Vec<bool> = status.peers.iter().map(|p| p.configured).collect();
    assert_eq!(trimmed.iter().filter(|c| **c).count(), 1);
    let gauges = net.nodes[0].engine.gauges();
    assert_eq!(gauges[0], ("configured_peers", 1));
    assert_eq!(gauges[1], ("full_config_peers", 2));
}

/// The case the property test found: a subnet router (never trimmed on the
/// other side) re-creates its tunnel to a restarted peer after a long idle.
/// Before handshake stamps followed virtual time, its first initiation could
/// carry an older TAI64N stamp than the peer kept and waited for the 5 s
/// retry. Now it is answered at once: one handshake round trip plus one way.
#[test]
fn a_tunnel_recreated_after_a_long_idle_is_answered_at_once() {
    let mut net = Net::new(4, HALF_RTT, |_, _| {});
    net.nodes[3]
        .extra_allowed
        .push("10.3.0.0/16".parse::<IpNet>().unwrap());
    net.configure_all(lazy());
    let ip0 = net.nodes[0].ip4;
    net.send_udp(3, ip0, b"first");
    net.run_for(Duration::from_millis(200));
    net.restart(0, 9001);
    for j in 0..4 {
        let rc = net.reconfig_for(j, lazy());
        net.input(j, Input::Reconfig(Box::new(rc))).unwrap();
    }
    net.send_udp(3, ip0, b"second");
    net.run_for(Duration::from_secs(900));
    let third_sent = net.now;
    net.send_udp(3, ip0, b"third");
    net.run_for(Duration::from_secs(12));
    for p in [&b"first"[..], b"second", b"third"] {
        assert_eq!(
            net.delivered(0, p).len(),
            1,
            "{:?}",
            String::from_utf8_lossy(p)
        );
    }
    let third = net.delivered(0, b"third")[0].duration_since(third_sent);
    assert!(
        third <= Duration::from_millis(60),
        "one handshake round trip plus one way (60 ms), took {third:?}"
    );
    for node in 0..4 {
        assert_eq!(net.nodes[node].engine.counters().drop_wg_stale_timestamp, 0);
    }
}

/// A WireGuard transport datagram with no payload: 16 bytes of header and
/// the 16-byte tag.
const KEEPALIVE_DATAGRAM_BYTES: usize = 32;

/// WireGuard datagrams of `len` bytes node `i` sent to node `j` from `since`.
fn sent_of_len(net: &Net, i: usize, j: usize, since: std::time::Instant, len: usize) -> usize {
    let to = net.nodes[j].endpoint;
    net.nodes[i]
        .sent
        .iter()
        .filter(|(at, dst, n)| *at >= since && *dst == to && *n == len)
        .count()
}

/// As in wireguard-go, the initiator confirms a fresh session with a
/// keepalive only when nothing is staged: a wake's first staged packet
/// confirms it instead, so the woken flow's packets are the session's first
/// datagrams. A handshake with nothing staged (a rekey under one-way
/// traffic) still sends the keepalive, since the peer needs a datagram on
/// the new session before it may use it.
#[test]
fn a_wake_confirms_the_session_with_its_staged_packets_not_a_keepalive() {
    let mut net = Net::new(2, HALF_RTT, |_, _| {});
    net.configure_all(lazy());
    let ip1 = net.nodes[1].ip4;
    let start = net.now;
    let payloads: Vec<Vec<u8>> = (0..5u8).map(|i| vec![b'k', i]).collect();
    for p in &payloads {
        net.send_udp(0, ip1, p);
    }
    net.run_for(Duration::from_millis(500));
    for p in &payloads {
        assert_eq!(net.delivered(1, p).len(), 1, "{p:?} delivered once");
    }
    assert_eq!(net.nodes[0].engine.counters().handshakes_completed, 1);
    assert_eq!(
        sent_of_len(&net, 0, 1, start, KEEPALIVE_DATAGRAM_BYTES),
        0,
        "the initiator sent a keepalive ahead of its staged packets"
    );

    // One-way traffic every 5 s past the 120 s rekey: node 0 initiates the
    // new handshake from a live session, with nothing staged, so it
    // confirms it with a keepalive. (Node 0 never sends a passive
    // keepalive: it is the one sending data.)
    let before_rekey = net.now;
    for i in 0..30u8 {
        net.send_udp(0, ip1, &[b'r', i]);
        net.run_for(Duration::from_secs(5));
    }
    for i in 0..30u8 {
        assert_eq!(net.delivered(1, &[b'r', i]).len(), 1, "r{i} delivered once");
    }
    assert!(net.nodes[0].engine.counters().handshakes_completed >= 2);
    assert!(
        sent_of_len(&net, 0, 1, before_rekey, KEEPALIVE_DATAGRAM_BYTES) >= 1,
        "the rekey's session was not confirmed with a keepalive"
    );
}

/// Found by `wgmesh-sim explore --seed 45`
/// (`corpus/crossing-wake-onto-a-stale-session.toml`). A node holds a
/// session too old to send on (175 s of its 180 s) that WireGuard has not
/// yet thrown away, and its peer no longer has it (here control removed
/// and re-added the node at the peer; in the corpus file the peer had
/// trimmed it). Both start sending at once: the node answers the peer's
/// initiation (it has the lower key; the peer yields the crossing). It used
/// to count the answered handshake as a fresh session and send its staged
/// packets at once, but WireGuard encrypts with the session that was
/// current, the stale one, until the peer confirms the new one: every one
/// was dropped at the peer as `drop_wg_unknown_index`. A session we only
/// answered for carries data once the peer confirms it (its first packet,
/// one round trip later), as in wireguard-go.
#[test]
fn an_answered_handshake_does_not_revive_a_stale_session() {
    let mut net = Net::new(2, HALF_RTT, |_, _| {});
    // In a crossing, the node with the higher key yields.
    let (peer, node) = if net.key(0) > net.key(1) {
        (0, 1)
    } else {
        (1, 0)
    };
    net.configure_all(lazy());
    let (peer_ip, node_ip) = (net.nodes[peer].ip4, net.nodes[node].ip4);
    net.send_udp(node, peer_ip, b"first");
    net.run_for(Duration::from_millis(177_000));
    assert_eq!(net.delivered(peer, b"first").len(), 1);
    // Control removes the node at the peer and adds it back: the peer's
    // tunnel, and every session it had with the node, is new.
    let (ip4, ip6) = (net.nodes[peer].ip4, net.nodes[peer].ip6);
    let without = node_reconfig(ip4, ip6, Vec::new(), lazy());
    net.input(peer, Input::Reconfig(Box::new(without))).unwrap();
    let with = net.reconfig_for(peer, lazy());
    net.input(peer, Input::Reconfig(Box::new(with))).unwrap();
    net.run_for(Duration::from_millis(900));

    let start = net.now;
    net.send_udp(peer, node_ip, b"from the peer");
    net.run_for(Duration::from_millis(8));
    net.send_udp(node, peer_ip, b"from the node");
    net.run_for(Duration::from_secs(2));
    assert_eq!(net.delivered(node, b"from the peer").len(), 1);
    let delivered = net.delivered(peer, b"from the node");
    assert_eq!(delivered.len(), 1, "the node's packet was lost");
    // Sent 8 ms in; the crossing bound is a round trip more than a wake's.
    let delay = delivered[0].duration_since(start + Duration::from_millis(8));
    assert!(delay <= HALF_RTT * 5, "delivered after {delay:?}");
    assert_eq!(net.nodes[peer].engine.counters().drop_wg_unknown_index, 0);
    assert_eq!(
        net.nodes[peer]
            .engine
            .counters()
            .handshake_crossings_yielded,
        1
    );
}

/// Found by `wgmesh-sim explore --seed 49`
/// (`corpus/late-disco-key-orphans-a-fresh-session.toml`). B restarted
/// while A's control stream was down, and the two made a new session
/// before A heard of B's new disco key. The flush that key brings then
/// drops that fresh session on A's side only: B kept sending on it into a
/// session A no longer had, every packet lost until B's no-reply rule
/// re-handshook 15 s later. A now handshakes at once when it flushes a
/// session young enough for the peer to still use, so B moves to the new
/// session one round trip after the flush.
#[test]
fn a_late_disco_key_flush_rehandshakes_a_session_the_peer_still_uses() {
    let mut net = Net::new(2, HALF_RTT, |_, _| {});
    let knobs = Knobs {
        keep_full_wg_config: true,
        ..Knobs::default()
    };
    net.configure_all(knobs.clone());
    let (ip0, ip1) = (net.nodes[0].ip4, net.nodes[1].ip4);
    net.send_udp(0, ip1, b"before the restart");
    net.run_for(Duration::from_secs(1));
    net.restart(1, 4343);
    net.input(
        1,
        Input::Reconfig(Box::new(net.reconfig_for(1, knobs.clone()))),
    )
    .unwrap();
    // The restarted B speaks first: A answers its handshake, B confirms.
    net.send_udp(1, ip0, b"b is back");
    net.run_for(Duration::from_secs(1));
    assert_eq!(net.delivered(0, b"b is back").len(), 1);
    assert_eq!(flushes(&net, 0), 0);

    // A hears of B's new disco key only now, and flushes.
    let initiations_before = net.nodes[0].engine.counters().handshake_initiations_sent;
    net.input(0, Input::Reconfig(Box::new(net.reconfig_for(0, knobs))))
        .unwrap();
    assert_eq!(flushes(&net, 0), 1);
    assert_eq!(
        net.nodes[0].engine.counters().handshake_initiations_sent,
        initiations_before + 1,
        "the flush of a young session starts a handshake at once"
    );
    net.run_for(Duration::from_millis(200));

    // B, which never restarted again, sends on the session it has.
    let sent = net.now;
    net.send_udp(1, ip0, b"b again");
    net.run_for(Duration::from_secs(20));
    let delivered = net.delivered(0, b"b again");
    assert_eq!(delivered.len(), 1);
    let delay = delivered[0].duration_since(sent);
    assert!(delay <= HALF_RTT, "one way, on the new session: {delay:?}");
    assert_eq!(net.nodes[0].engine.counters().drop_wg_unknown_index, 0);
}
