//! Two engines back to back on virtual time: the WireGuard data plane.

use std::time::Duration;

use wgmesh_core::test_support::Net;
use wgmesh_core::*;

const RTT_HALF: Duration = Duration::from_millis(10);

fn full_config() -> Knobs {
    Knobs {
        keep_full_wg_config: true,
        ..Knobs::default()
    }
}

#[test]
fn handshake_and_packets_both_ways_byte_exact() {
    let mut net = Net::new(2, RTT_HALF, |_, _| {});
    net.configure_all(full_config());
    let ip_b4 = net.nodes[1].ip4;
    let ip_a6 = net.nodes[0].ip6;
    let sent = net.send_udp(0, ip_b4, b"hello over v4");
    net.run_for(Duration::from_secs(1));
    let got: Vec<_> = net.nodes[1]
        .tun_out
        .iter()
        .map(|(_, p)| p.clone())
        .collect();
    assert_eq!(got, vec![sent], "B received exactly the packet A sent");
    assert!(
        net.nodes[0]
            .events
            .iter()
            .any(|(_, e)| matches!(e, Event::HandshakeCompleted { .. }))
    );
    assert!(
        net.nodes[1]
            .events
            .iter()
            .any(|(_, e)| matches!(e, Event::HandshakeCompleted { .. }))
    );

    let sent6 = net.send_udp(1, ip_a6, b"and back over v6");
    net.run_for(Duration::from_secs(1));
    let got: Vec<_> = net.nodes[0]
        .tun_out
        .iter()
        .map(|(_, p)| p.clone())
        .collect();
    assert_eq!(got, vec![sent6]);
    assert_eq!(net.nodes[0].engine.counters().handshakes_completed, 1);
}

#[test]
fn rekey_after_120_seconds_of_traffic() {
    let mut net = Net::new(2, RTT_HALF, |_, _| {});
    net.configure_all(full_config());
    let ip_b = net.nodes[1].ip4;
    for i in 0..130u32 {
        net.send_udp(0, ip_b, &i.to_be_bytes());
        net.run_for(Duration::from_secs(1));
    }
    assert_eq!(
        net.nodes[1].tun_out.len(),
        130,
        "every packet delivered across the rekey"
    );
    let handshakes = net.nodes[0].engine.counters().handshakes_completed;
    assert!(
        handshakes >= 2,
        "a rekey handshake happened after 120 s, got {handshakes}"
    );
    let rekey_at = net.nodes[0]
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::HandshakeCompleted { .. }))
        .nth(1)
        .map(|(t, _)| t.duration_since(net.base))
        .unwrap();
    assert!(
        rekey_at >= Duration::from_secs(120) && rekey_at < Duration::from_secs(123),
        "rekey at {rekey_at:?}"
    );
}

#[test]
fn persistent_keepalive_is_sent_on_schedule() {
    let mut net = Net::new(2, RTT_HALF, |_, _| {});
    net.nodes[1].persistent_keepalive_secs = Some(25);
    net.configure_all(full_config());
    net.run_for(Duration::from_secs(1));
    let ip_b = net.nodes[1].ip4;
    net.send_udp(0, ip_b, b"x");
    net.run_for(Duration::from_secs(100));
    // Node 0 has B with keepalive 25 s: it sends a 32-byte keepalive every 25 s.
    let keepalives = net.nodes[0]
        .sent
        .iter()
        .filter(|(_, _, len)| *len == 32)
        .count();
    assert!(
        (3..=5).contains(&keepalives),
        "expected about 4 keepalives in 100 s, got {keepalives}"
    );
    assert!(net.nodes[0].engine.counters().keepalives_sent >= 3);
}

#[test]
fn status_byte_counters_match_traffic() {
    let mut net = Net::new(2, RTT_HALF, |_, _| {});
    net.configure_all(full_config());
    let ip_b = net.nodes[1].ip4;
    let mut total = 0u64;
    for i in 0..10 {
        total += net.send_udp(0, ip_b, &vec![7u8; 100 + i]).len() as u64;
    }
    net.run_for(Duration::from_secs(2));
    net.input(0, Input::StatusRequest).unwrap();
    net.input(0, Input::StatusRequest).unwrap();
    net.input(1, Input::StatusRequest).unwrap();
    let status_a = net.nodes[0].statuses.last().unwrap().1.clone();
    let status_b = net.nodes[1].statuses.last().unwrap().1.clone();
    let peer_b = status_a
        .peers
        .iter()
        .find(|p| p.node_key == net.key(1))
        .unwrap();
    let peer_a = status_b
        .peers
        .iter()
        .find(|p| p.node_key == net.key(0))
        .unwrap();
    assert_eq!(peer_b.tx_bytes, total);
    assert_eq!(peer_a.rx_bytes, total);
    assert!(peer_b.last_handshake_ago.is_some());
    assert!(peer_b.configured);
}

#[test]
fn status_requests_are_coalesced() {
    let mut net = Net::new(2, RTT_HALF, |_, _| {});
    net.configure_all(full_config());
    let now = net.now;
    let engine = &mut net.nodes[0].engine;
    for _ in 0..5 {
        engine.handle_input(now, Input::StatusRequest).unwrap();
    }
    let mut answers = 0;
    while let Some(out) = engine.poll_output() {
        if matches!(out, Output::Status(_)) {
            answers += 1;
        }
    }
    assert_eq!(answers, 1);
    assert_eq!(engine.counters().status_requests_coalesced, 4);
}

/// The next deadline comes with its reason: a packet to a peer with no
/// session starts a handshake, and the deadline is that handshake's retry.
#[test]
fn timeout_reason_names_the_handshake_retry() {
    let mut net = Net::new(2, RTT_HALF, |_, _| {});
    // Node 1 has no disco key and no known endpoint: nothing answers, and no
    // disco timer competes with WireGuard's.
    let mut peer = net.peer_config(1);
    peer.disco_key = None;
    peer.endpoints.clear();
    let reconfig = wgmesh_core::test_support::node_reconfig(
        net.nodes[0].ip4,
        net.nodes[0].ip6,
        vec![peer],
        full_config(),
    );
    net.input(0, Input::Reconfig(Box::new(reconfig))).unwrap();
    assert_eq!(net.nodes[0].engine.poll_timeout(), None);
    assert_eq!(net.nodes[0].engine.timeout_reason(), None);

    let ip_b = net.nodes[1].ip4;
    net.send_udp(0, ip_b, b"anyone there?");
    let expected = TimeoutReason::Peer {
        peer: net.key(1),
        timer: PeerTimer::HandshakeRetry,
    };
    let started = net.now;
    assert_eq!(
        net.nodes[0].engine.poll_timeout(),
        Some(started + Duration::from_secs(5))
    );
    assert_eq!(net.nodes[0].engine.timeout_reason(), Some(expected));

    // The retry goes out and the next retry is the next deadline.
    net.run_for(Duration::from_millis(5_001));
    assert_eq!(net.nodes[0].engine.counters().handshake_initiations_sent, 2);
    assert_eq!(net.nodes[0].engine.timeout_reason(), Some(expected));
}
