//! Liveness on virtual time: crossing wakes, sparse one-way traffic, many
//! wakes in a row, sessions completed by the other side, bursts on wake and
//! subnets listed by two routers. Every test states its bound from the
//! WireGuard rules (one handshake round trip, REKEY_AFTER_TIME 120 s,
//! REKEY_TIMEOUT 5 s), not from the engine's own constants.

use std::time::{Duration, Instant};

use ipnet::IpNet;
use wgmesh_core::test_support::Net;
use wgmesh_core::*;

/// Initiations `node` sent, by its counters.
fn initiations(net: &Net, node: usize) -> u64 {
    net.nodes[node].engine.counters().handshake_initiations_sent
}

/// The delay from `sent_at` to the delivery of `payload` at `node`; fails
/// unless it was delivered exactly once.
fn delivered_once(net: &Net, node: usize, payload: &[u8], sent_at: Instant) -> Duration {
    let at = net.delivered(node, payload);
    assert_eq!(
        at.len(),
        1,
        "{:?} delivered {} times at node{node}",
        String::from_utf8_lossy(&payload[..payload.len().min(8)]),
        at.len()
    );
    at[0].duration_since(sent_at)
}

/// Two trimmed peers that start sending to each other within one one-way
/// delay both initiate. The crossing must settle in at most one extra round
/// trip, with no initiation storm and nothing lost.
#[test]
fn crossing_wakes_settle_within_one_extra_round_trip() {
    let one_way = Duration::from_millis(50);
    for offset_ms in [0u64, 1, 10, 25, 49, 50] {
        let mut net = Net::new(2, one_way, |_, _| {});
        net.configure_all(Knobs::default());
        let (ip0, ip1) = (net.nodes[0].ip4, net.nodes[1].ip4);
        assert!(!net.configured(0, 1) && !net.configured(1, 0));
        let start = net.now;
        for i in 0..10u8 {
            net.send_udp(0, ip1, &[b'a', i]);
        }
        net.run_for(Duration::from_millis(offset_ms));
        let b_start = net.now;
        for i in 0..10u8 {
            net.send_udp(1, ip0, &[b'b', i]);
        }
        net.run_for(Duration::from_secs(3));
        // One handshake round trip, one extra round trip, one way.
        let bound = one_way * 2 + one_way * 2 + one_way;
        for i in 0..10u8 {
            let a_to_b = delivered_once(&net, 1, &[b'a', i], start);
            let b_to_a = delivered_once(&net, 0, &[b'b', i], b_start);
            assert!(
                a_to_b <= bound && b_to_a <= bound,
                "offset {offset_ms} ms: a->b {a_to_b:?}, b->a {b_to_a:?}, bound {bound:?}"
            );
        }
        for node in 0..2 {
            assert!(
                initiations(&net, node) <= 2,
                "offset {offset_ms} ms: node{node} sent {} initiations",
                initiations(&net, node)
            );
            assert_eq!(
                net.nodes[node].engine.counters().drop_wg_unknown_index,
                0,
                "offset {offset_ms} ms: node{node} dropped messages for unknown indices"
            );
        }
    }
}

/// One datagram a minute to a passive receiver: the protocol re-keys only
/// when the session is REKEY_AFTER_TIME (120 s) old, so ten minutes need at
/// most 1 + 600 / 120 initiations.
#[test]
fn sparse_one_way_flow_rekeys_only_when_the_session_ages() {
    let mut net = Net::new(2, Duration::from_millis(20), |_, _| {});
    net.configure_all(Knobs::default());
    let ip1 = net.nodes[1].ip4;
    for minute in 0..10u8 {
        let sent_at = net.now;
        net.send_udp(0, ip1, &[b's', minute]);
        net.run_for(Duration::from_secs(60));
        let delay = delivered_once(&net, 1, &[b's', minute], sent_at);
        assert!(
            delay <= Duration::from_millis(60),
            "minute {minute}: {delay:?}"
        );
    }
    let sender = initiations(&net, 0);
    let receiver = initiations(&net, 1);
    assert!(
        sender <= 1 + 600 / 120,
        "the sender sent {sender} initiations in 10 minutes"
    );
    assert_eq!(receiver, 0, "the passive receiver never initiates");
}

/// A hub that wakes 60 one-way peers, then 60 more: every wake completes in
/// one handshake round trip plus one way, and nobody answers with a cookie
/// (the handshake rate limiter is reset every second by time, not only when
/// an initiation arrives).
#[test]
fn a_hub_waking_two_waves_of_peers_is_never_under_load() {
    let one_way = Duration::from_millis(10);
    let mut net = Net::new(121, one_way, |_, _| {});
    net.configure_all(Knobs::default());
    for wave in 0..2usize {
        let start = net.now;
        for peer in 1 + wave * 60..1 + (wave + 1) * 60 {
            let ip = net.nodes[peer].ip4;
            net.send_udp(0, ip, &[b'h', wave as u8, peer as u8]);
        }
        net.run_for(Duration::from_secs(30));
        for peer in 1 + wave * 60..1 + (wave + 1) * 60 {
            let delay = delivered_once(&net, peer, &[b'h', wave as u8, peer as u8], start);
            assert!(
                delay <= one_way * 3,
                "wave {wave}: peer {peer} woke after {delay:?}"
            );
        }
    }
    for node in 0..net.nodes.len() {
        assert_eq!(
            net.nodes[node].engine.counters().cookie_replies_sent,
            0,
            "node{node} answered with a cookie"
        );
    }
}

/// A hub and 249 peers that wake each other at one instant, both ways: the
/// hub waking all of them (a monitoring server's scrape), then all of them
/// waking the hub (a restarted hub's peers re-handshaking when they learn
/// its new disco key). wireguard-go and the kernel ask for cookies only
/// once 512 handshake messages wait in their queue; boringtun's 100 per
/// second made the hub send 149 cookies and those peers wait the 5 s retry.
/// Every wake completes in one handshake round trip plus one way.
#[test]
fn a_hub_and_249_peers_waking_each_other_at_once_need_no_cookies() {
    let one_way = Duration::from_millis(10);
    let peers = 249;
    let mut net = Net::new(peers + 1, one_way, |_, _| {});
    // A star, as a hub's tailnet is: the hub has every peer, each peer the
    // hub.
    let hub_config = net.reconfig_for(0, Knobs::default());
    net.input(0, Input::Reconfig(Box::new(hub_config)))
        .expect("valid reconfig");
    for peer in 1..=peers {
        let node = &net.nodes[peer];
        let config = wgmesh_core::test_support::node_reconfig(
            node.ip4,
            node.ip6,
            vec![net.peer_config(0)],
            Knobs::default(),
        );
        net.input(peer, Input::Reconfig(Box::new(config)))
            .expect("valid reconfig");
    }
    let start = net.now;
    for peer in 1..=peers {
        let ip = net.nodes[peer].ip4;
        net.send_udp(0, ip, format!("scrape-{peer:03}").as_bytes());
    }
    net.run_for(Duration::from_secs(30));
    for peer in 1..=peers {
        let payload = format!("scrape-{peer:03}");
        let delay = delivered_once(&net, peer, payload.as_bytes(), start);
        assert!(delay <= one_way * 3, "peer {peer} woke after {delay:?}");
    }
    // Past the 5 min idle trim every side has forgotten the others.
    net.run_for(Duration::from_secs(360));
    let hub_ip = net.nodes[0].ip4;
    let start = net.now;
    for peer in 1..=peers {
        net.send_udp(peer, hub_ip, format!("rejoin-{peer:03}").as_bytes());
    }
    net.run_for(Duration::from_secs(30));
    for peer in 1..=peers {
        let payload = format!("rejoin-{peer:03}");
        let delay = delivered_once(&net, 0, payload.as_bytes(), start);
        assert!(
            delay <= one_way * 3,
            "peer {peer} woke the hub after {delay:?}"
        );
    }
    for node in 0..net.nodes.len() {
        assert_eq!(
            net.nodes[node].engine.counters().cookie_replies_sent,
            0,
            "node{node} answered with a cookie"
        );
    }
    assert_eq!(initiations(&net, 0), peers as u64);
}

/// Packets queued behind a handshake leave as soon as any usable session
/// exists: here the peer completes one from its side (we answer its
/// initiation and its first data confirms it) while ours were refused.
#[test]
fn queued_packets_leave_when_the_peer_completes_the_session() {
    let one_way = Duration::from_millis(20);
    let mut net = Net::new(2, one_way, |_, _| {});
    // Node 0 knows node 1; node 1 does not know node 0 yet and drops its
    // initiations as coming from an unknown key.
    let rc0 = net.reconfig_for(0, Knobs::default());
    net.input(0, Input::Reconfig(Box::new(rc0))).unwrap();
    let mut rc1 = net.reconfig_for(1, Knobs::default());
    rc1.wireguard.as_mut().unwrap().peers.clear();
    net.input(1, Input::Reconfig(Box::new(rc1))).unwrap();
    let (ip0, ip1) = (net.nodes[0].ip4, net.nodes[1].ip4);
    for i in 0..5u8 {
        net.send_udp(0, ip1, &[b'q', i]);
    }
    net.run_for(Duration::from_secs(2));
    assert!(net.delivered(1, &[b'q', 0]).is_empty());
    // Node 1 learns node 0 and speaks first, while node 0's retry is still
    // seconds away.
    let rc1 = net.reconfig_for(1, Knobs::default());
    net.input(1, Input::Reconfig(Box::new(rc1))).unwrap();
    let start = net.now;
    net.send_udp(1, ip0, b"hello from 1");
    net.run_for(Duration::from_secs(2));
    delivered_once(&net, 0, b"hello from 1", start);
    // Its initiation, our response, its data (which confirms our session),
    // then our queued packets: four one-way trips.
    for i in 0..5u8 {
        let delay = delivered_once(&net, 1, &[b'q', i], start);
        assert!(delay <= one_way * 4, "queued packet {i} waited {delay:?}");
    }
}

/// A wake burst well above wireguard-go's 128 staged packets, sent in one
/// go, arrives whole.
#[test]
fn a_wake_burst_of_500_packets_is_not_lost() {
    let mut net = Net::new(2, Duration::from_millis(25), |_, _| {});
    net.configure_all(Knobs::default());
    let ip1 = net.nodes[1].ip4;
    let start = net.now;
    for i in 0..500u16 {
        let mut payload = vec![b'B'];
        payload.extend_from_slice(&i.to_be_bytes());
        payload.extend_from_slice(&[0x5a; 1000]);
        net.send_udp(0, ip1, &payload);
    }
    net.run_for(Duration::from_secs(2));
    for i in 0..500u16 {
        let mut payload = vec![b'B'];
        payload.extend_from_slice(&i.to_be_bytes());
        payload.extend_from_slice(&[0x5a; 1000]);
        let delay = delivered_once(&net, 1, &payload, start);
        assert!(delay <= Duration::from_millis(75), "packet {i}: {delay:?}");
    }
    assert_eq!(net.nodes[0].engine.counters().drop_queue_overflow, 0);
}

/// Two subnet routers list the same prefix; when one of them drops it, the
/// other keeps it routed (as a fresh engine given the same netmap would).
#[test]
fn a_subnet_listed_by_two_routers_stays_routed_when_one_drops_it() {
    let subnet: IpNet = "10.90.0.0/24".parse().unwrap();
    let inside: std::net::IpAddr = "10.90.0.5".parse().unwrap();
    let mut net = Net::new(3, Duration::from_millis(10), |_, _| {});
    net.nodes[1].extra_allowed.push(subnet);
    net.nodes[2].extra_allowed.push(subnet);
    net.configure_all(Knobs::default());
    let both = net.nodes[0].engine.peer_for_ip(inside).unwrap();
    assert!(both == net.key(1) || both == net.key(2));
    // Router 2 drops the prefix (whichever owned it before).
    net.nodes[2].extra_allowed.clear();
    let rc = net.reconfig_for(0, Knobs::default());
    net.input(0, Input::Reconfig(Box::new(rc))).unwrap();
    assert_eq!(net.nodes[0].engine.peer_for_ip(inside), Ok(net.key(1)));
    // And traffic to the subnet reaches router 1.
    let before = net.nodes[1].engine.counters().datagrams_in;
    net.send_udp(0, inside, b"to the subnet");
    net.run_for(Duration::from_secs(1));
    assert!(net.nodes[1].engine.counters().datagrams_in > before);
    assert_eq!(net.nodes[0].engine.counters().drop_no_peer_for_dst, 0);
}

/// A steady one-way stream (every 100 ms, as a media stream) to a passive
/// receiver: the receiver's passive keepalives answer it, so the sender
/// initiates once, then only when the session is REKEY_AFTER_TIME old.
#[test]
fn a_steady_one_way_stream_rekeys_only_when_the_session_ages() {
    let mut net = Net::new(2, Duration::from_millis(20), |_, _| {});
    net.configure_all(Knobs::default());
    let ip1 = net.nodes[1].ip4;
    for i in 0..1100u32 {
        net.send_udp(0, ip1, &i.to_be_bytes());
        net.run_for(Duration::from_millis(100));
    }
    let (sender, receiver) = (initiations(&net, 0), initiations(&net, 1));
    // 110 s is less than REKEY_AFTER_TIME (120 s): the first initiation is
    // the only one.
    assert!(
        sender <= 1 && receiver == 0,
        "110 s of stream: the sender sent {sender} initiations, the receiver {receiver}"
    );
}

/// A day of one-way traffic every 7 minutes (each send wakes the peer, which
/// was trimmed after 5 idle minutes): every wake takes one handshake round
/// trip plus one way, all day. With the rate limiter reset only by arriving
/// initiations, the sender counted the answers to its own initiations and
/// was "under load" for good after the 100th (hour 11 or so): every wake
/// from then on waited for the 5 s retry with a cookie.
#[test]
fn a_day_of_wakes_every_seven_minutes_stays_one_round_trip() {
    let one_way = Duration::from_millis(20);
    let mut net = Net::new(2, one_way, |_, _| {});
    net.configure_all(Knobs::default());
    let ip1 = net.nodes[1].ip4;
    let wakes = 24 * 60 / 7;
    for wake in 0..wakes {
        let sent_at = net.now;
        let payload = format!("day-wake-{wake:04}").into_bytes();
        net.send_udp(0, ip1, &payload);
        net.run_for(Duration::from_secs(7 * 60));
        let delay = delivered_once(&net, 1, &payload, sent_at);
        assert!(
            delay <= one_way * 3,
            "wake {wake} (hour {}): {delay:?}",
            wake * 7 / 60
        );
    }
    for node in 0..2 {
        assert_eq!(net.nodes[node].engine.counters().cookie_replies_sent, 0);
    }
    assert!(net.nodes[0].engine.counters().peers_woken_by_send >= wakes as u64 - 1);
}

/// A packet sent just before the session's keys expire (180 s) on the
/// sender's clock arrives just after they expired on the receiver's (the
/// responder made its copy one one-way delay earlier). It must wait for a
/// fresh handshake instead of going out on keys the peer no longer holds.
/// Found by `wgmesh-sim explore` with the liveness oracle on.
#[test]
fn a_packet_sent_at_the_edge_of_the_session_lifetime_is_not_lost() {
    let one_way = Duration::from_millis(20);
    let mut net = Net::new(2, one_way, |_, _| {});
    let knobs = Knobs {
        keep_full_wg_config: true,
        ..Knobs::default()
    };
    net.configure_all(knobs);
    let ip1 = net.nodes[1].ip4;
    let start = net.now;
    net.send_udp(0, ip1, b"opens the session");
    net.run_for(Duration::from_secs(1));
    delivered_once(&net, 1, b"opens the session", start);
    // The initiator's keys date from start + 40 ms, the responder's from
    // start + 20 ms. At start + 179.99 s + 20 ms the responder's are 180.01 s
    // old when the packet arrives.
    net.run_until(start + Duration::from_millis(180_030) - one_way);
    let sent_at = net.now;
    net.send_udp(0, ip1, b"at the edge");
    net.run_for(Duration::from_secs(2));
    let delay = delivered_once(&net, 1, b"at the edge", sent_at);
    assert!(delay <= one_way * 3, "{delay:?}");
}

/// A peer WireGuard keeps (trimming off here; a subnet router always) and
/// that had no session for 9 minutes: boringtun clears a tunnel's handshake
/// state at its first timer run 540 s (3 x REJECT_AFTER_TIME) after it was
/// made or last had a session. When that moment fell between the timer run
/// before our first initiation and the answer (the peer's disco pong,
/// which arrives first, runs WireGuard's timers), the answer found no
/// handshake to complete and the packet waited for a retry. Found by
/// `wgmesh-sim explore --seed 191`: a flow's opening waited 1 s. Every
/// wake, at any idle length, completes in one handshake round trip plus
/// one way.
#[test]
fn a_kept_peer_idle_for_nine_minutes_wakes_in_one_round_trip() {
    let one_way = Duration::from_millis(2);
    // Since the tunnel was made: 540 s fall in the first handshake's round
    // trip (4 ms) for the first two.
    for idle_ms in [539_997u64, 539_999, 540_000, 600_000, 1_080_000] {
        let mut net = Net::new(2, one_way, |_, _| {});
        net.configure_all(Knobs {
            keep_full_wg_config: true,
            ..Knobs::default()
        });
        let ip1 = net.nodes[1].ip4;
        net.run_for(Duration::from_millis(idle_ms));
        let sent_at = net.now;
        let payload = format!("kept-{idle_ms}").into_bytes();
        net.send_udp(0, ip1, &payload);
        net.run_for(Duration::from_secs(3));
        let delay = delivered_once(&net, 1, &payload, sent_at);
        assert!(
            delay <= one_way * 3,
            "idle {idle_ms} ms: delivered after {delay:?}"
        );
    }
}
