//! Disco under abuse, on virtual time: call-me-maybe floods, byte-identical
//! replays of a captured datagram, a captured ping replayed from another
//! address, and call-me-maybes naming addresses no path can use. What a peer
//! (or anyone holding one of its datagrams) can make a node send is bounded
//! and counted, and normal path discovery is untouched.

use std::net::SocketAddr;
use std::time::Duration;

use wgmesh_core::test_support::Net;
use wgmesh_core::wire::disco::DiscoMessage;
use wgmesh_core::*;

const HALF_RTT: Duration = Duration::from_millis(10);

/// Two nodes with a session and a disco path between them.
fn warm_pair() -> Net {
    let mut net = Net::new(2, HALF_RTT, |_, _| {});
    net.configure_all(Knobs::default());
    let ip1 = net.nodes[1].ip4;
    net.send_udp(0, ip1, b"warm up");
    net.run_for(Duration::from_secs(2));
    assert_eq!(net.delivered(1, b"warm up").len(), 1);
    net
}

/// A disco message from node 1 to node 0, sealed with node 1's real disco
/// key (what node 1, or a capture of its traffic, can produce).
fn sealed_from_node1(net: &Net, nonce_seed: u64, message: &DiscoMessage) -> Vec<u8> {
    let sender = &net.nodes[1].disco_private;
    let mut nonce = [0u8; 24];
    nonce[..8].copy_from_slice(&nonce_seed.to_le_bytes());
    nonce[23] = 0xd1;
    let mut out = Vec::new();
    wire::disco::seal(
        sender.as_bytes(),
        &sender.public_key().0,
        &net.nodes[0].engine.disco_key().0,
        nonce,
        message,
        &mut out,
    );
    out
}

/// `k`-th call-me-maybe with 16 endpoints nobody taught before.
fn fresh_call_me_maybe(k: u16) -> DiscoMessage {
    DiscoMessage::CallMeMaybe {
        endpoints: (0..16u16)
            .map(|j| SocketAddr::from(([198, 18, (k >> 8) as u8, k as u8], 4000 + j)))
            .collect(),
    }
}

fn pings_sent(net: &Net) -> u64 {
    net.nodes[0].engine.counters().disco_pings_sent
}

fn deliver(net: &mut Net, from: SocketAddr, data: &[u8]) {
    net.input(0, Input::Datagram { from, data }).unwrap();
}

/// The measurement: 60 call-me-maybes of 16 new endpoints each,
/// then 100 byte-identical replays of the last one, all at once. Returns
/// (pings sent by the burst, pings sent by the replays, pings sent in the
/// 10 s that follow).
fn flood_then_replay(net: &mut Net) -> (u64, u64, u64) {
    let from = net.nodes[1].endpoint;
    let start = pings_sent(net);
    let mut last = Vec::new();
    for k in 0..60u16 {
        last = sealed_from_node1(net, 1000 + u64::from(k), &fresh_call_me_maybe(k));
        deliver(net, from, &last);
    }
    let after_burst = pings_sent(net);
    for _ in 0..100 {
        deliver(net, from, &last);
    }
    let after_replays = pings_sent(net);
    net.run_for(Duration::from_secs(10));
    let after_run = pings_sent(net);
    eprintln!(
        "60 call-me-maybes: {} disco pings; 100 replays of the last: {}; the next 10 s: {}",
        after_burst - start,
        after_replays - after_burst,
        after_run - after_replays
    );
    (
        after_burst - start,
        after_replays - after_burst,
        after_run - after_replays,
    )
}

#[test]
fn a_call_me_maybe_flood_and_its_replays_send_a_bounded_number_of_pings() {
    let mut net = warm_pair();
    let (burst, replays, next_10s) = flood_then_replay(&mut net);
    // Before the fix: 29,340 pings for the burst (sum of 16k + 1 over 60
    // messages) and 96,100 for the replays (961 candidates, 100 times).
    // Now: the first call-me-maybe pings its peer's candidates once (at most
    // MAX_DISCO_CANDIDATES), the other 59 defer to one shared ping.
    let bound = MAX_DISCO_CANDIDATES as u64;
    assert!(burst <= bound, "{burst} pings for the burst");
    assert_eq!(replays, 0, "replays send nothing");
    // Over 10 s: the deferred ping (at most one per candidate), then the
    // ordinary schedule of an active peer (heartbeats of the best path every
    // 3 s, and a full ping when a path's trust lapses, at most every 5 s).
    let intervals = 10 / DISCO_FULL_PING_MIN_INTERVAL.as_secs() + 1;
    assert!(
        next_10s <= bound * intervals + 10 / HEARTBEAT_INTERVAL.as_secs() + 1,
        "{next_10s} pings in the next 10 s"
    );
    let c = net.nodes[0].engine.counters().clone();
    assert_eq!(c.drop_disco_replay, 100, "every replay dropped and counted");
    assert_eq!(c.disco_call_me_maybe_received, 60);
    // The warm-up pinged every candidate under 5 s before: all 60 deferred
    // to one shared ping.
    assert_eq!(c.disco_full_pings_deferred, 60);
    // Each call-me-maybe replaced the 15 the previous one taught (the 16th
    // place is the configured endpoint's): one endpoint of each left out.
    assert_eq!(c.disco_candidates_evicted, 60);
    assert_eq!(
        net.nodes[0].engine.disco_candidate_count(&net.key(1)),
        Some(MAX_DISCO_CANDIDATES)
    );
    // The configured path is kept and still carries traffic.
    let ip1 = net.nodes[1].ip4;
    net.send_udp(0, ip1, b"after the flood");
    net.run_for(Duration::from_secs(1));
    assert_eq!(net.delivered(1, b"after the flood").len(), 1);
    let real = net.nodes[1].endpoint;
    assert!(
        net.nodes[0]
            .events
            .iter()
            .rev()
            .find_map(|(_, e)| match e {
                Event::PathChanged { endpoint, .. } => Some(*endpoint),
                _ => None,
            })
            .is_some_and(|e| e == Some(real)),
        "the best path is still the peer's real endpoint"
    );
}

#[test]
fn a_call_me_maybe_after_the_interval_pings_at_once_and_later_ones_share_one_ping() {
    let mut net = warm_pair();
    let from = net.nodes[1].endpoint;
    net.run_for(DISCO_FULL_PING_MIN_INTERVAL);
    let start = pings_sent(&net);
    let first = sealed_from_node1(&net, 1, &fresh_call_me_maybe(1));
    deliver(&mut net, from, &first);
    let at_once = pings_sent(&net) - start;
    // 15 taught plus the configured endpoint: the whole bound, at once.
    assert_eq!(at_once, MAX_DISCO_CANDIDATES as u64);
    for k in 2..12u16 {
        let m = sealed_from_node1(&net, u64::from(k), &fresh_call_me_maybe(k));
        deliver(&mut net, from, &m);
        net.run_for(Duration::from_millis(100));
    }
    assert_eq!(net.nodes[0].engine.counters().disco_full_pings_deferred, 10);
    let before_deferred = pings_sent(&net);
    net.run_for(DISCO_FULL_PING_MIN_INTERVAL);
    let deferred = pings_sent(&net) - before_deferred;
    eprintln!(
        "at once: {at_once} pings; 10 later call-me-maybes: one deferred ping, {deferred} pings over 5 s"
    );
    // One deferred ping of every candidate, and the best path's heartbeats.
    assert!(
        deferred <= MAX_DISCO_CANDIDATES as u64 + 2,
        "{deferred} pings"
    );
    assert!(
        deferred >= MAX_DISCO_CANDIDATES as u64,
        "the deferred ping ran"
    );
}

#[test]
fn call_me_maybe_endpoints_no_path_can_use_are_refused_and_counted() {
    let mut net = warm_pair();
    net.run_for(DISCO_FULL_PING_MIN_INTERVAL);
    let from = net.nodes[1].endpoint;
    let good: SocketAddr = "198.51.100.7:41641".parse().unwrap();
    let bad: Vec<SocketAddr> = [
        "127.0.0.1:53",
        "[::1]:22",
        "224.0.0.251:5353",
        "[ff02::1]:41641",
        "0.0.0.0:41641",
        "[::]:41641",
        "255.255.255.255:41641",
        "198.51.100.8:0",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    let mut endpoints = bad.clone();
    endpoints.push(good);
    let m = sealed_from_node1(&net, 5, &DiscoMessage::CallMeMaybe { endpoints });
    let sent_before = net.nodes[0].sent.len();
    deliver(&mut net, from, &m);
    assert_eq!(
        net.nodes[0].engine.counters().drop_disco_bad_candidate,
        bad.len() as u64
    );
    let dsts: Vec<SocketAddr> = net.nodes[0].sent[sent_before..]
        .iter()
        .map(|(_, d, _)| *d)
        .collect();
    assert!(dsts.contains(&good), "the usable endpoint is pinged");
    for b in &bad {
        assert!(!dsts.contains(b), "{b} was pinged");
    }
    assert_eq!(
        net.nodes[0].engine.disco_candidate_count(&net.key(1)),
        Some(2),
        "the configured endpoint and the usable one"
    );
}

#[test]
fn configured_endpoints_survive_a_flood_of_learned_candidates() {
    // Node 1 has three configured endpoints; a flood of call-me-maybes and
    // pings from many sources evicts only learned candidates.
    let mut net = Net::new(2, HALF_RTT, |_, _| {});
    let extra: Vec<SocketAddr> = vec![
        "198.51.100.1:41641".parse().unwrap(),
        "198.51.100.2:41641".parse().unwrap(),
    ];
    net.nodes[1].extra_endpoints = extra.clone();
    net.configure_all(Knobs::default());
    let ip1 = net.nodes[1].ip4;
    net.send_udp(0, ip1, b"warm up");
    net.run_for(Duration::from_secs(2));
    let from = net.nodes[1].endpoint;
    for k in 0..20u16 {
        let m = sealed_from_node1(&net, 100 + u64::from(k), &fresh_call_me_maybe(k));
        deliver(&mut net, from, &m);
        let ping = sealed_from_node1(
            &net,
            500 + u64::from(k),
            &DiscoMessage::Ping {
                tx_id: [k as u8; 12],
                node_key: None,
            },
        );
        let source = SocketAddr::from(([203, 0, 113, k as u8], 5000));
        deliver(&mut net, source, &ping);
    }
    assert_eq!(
        net.nodes[0].engine.disco_candidate_count(&net.key(1)),
        Some(MAX_DISCO_CANDIDATES)
    );
    assert!(net.nodes[0].engine.counters().disco_candidates_evicted > 0);
    // After the flood the configured endpoints are still pinged: the
    // flood's deferred ping of every candidate reaches all three.
    let sent_before = net.nodes[0].sent.len();
    net.run_for(DISCO_FULL_PING_MIN_INTERVAL);
    let dsts: Vec<SocketAddr> = net.nodes[0].sent[sent_before..]
        .iter()
        .map(|(_, d, _)| *d)
        .collect();
    for e in extra.iter().chain([&from]) {
        assert!(dsts.contains(e), "configured endpoint {e} was not pinged");
    }
    net.send_udp(0, ip1, b"after the flood");
    net.run_for(Duration::from_secs(1));
    assert_eq!(net.delivered(1, b"after the flood").len(), 1);
}

#[test]
fn a_ping_replayed_from_another_address_gets_no_pong() {
    let mut net = warm_pair();
    let from = net.nodes[1].endpoint;
    let attacker: SocketAddr = "203.0.113.66:4444".parse().unwrap();
    let ping = sealed_from_node1(
        &net,
        77,
        &DiscoMessage::Ping {
            tx_id: [7; 12],
            node_key: Some(net.key(1).0),
        },
    );
    let pongs = |net: &Net| net.nodes[0].engine.counters().disco_pongs_sent;
    let before = pongs(&net);
    deliver(&mut net, from, &ping);
    assert_eq!(pongs(&net), before + 1, "the original ping is answered");
    for _ in 0..10 {
        deliver(&mut net, attacker, &ping);
        deliver(&mut net, from, &ping);
    }
    eprintln!(
        "pongs to 20 replays of one ping: {}",
        pongs(&net) - before - 1
    );
    assert_eq!(pongs(&net), before + 1, "no replay is answered");
    assert!(
        net.nodes[0].sent.iter().all(|(_, dst, _)| *dst != attacker),
        "nothing went to the replaying address"
    );
}
