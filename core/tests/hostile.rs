//! Hostile peers, on virtual time: spoofed inner sources, replayed WireGuard
//! data, forged and broken disco, a flood of forged handshake initiations
//! during a legitimate transfer, and a peer claiming another's AllowedIPs.
//! Everything hostile is dropped and counted, changes no state, and leaves
//! the legitimate traffic flowing.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use crypto_box::aead::{AeadInPlace, generic_array::GenericArray};
use ipnet::IpNet;
use wgmesh_core::test_support::Net;
use wgmesh_core::*;

const HALF_RTT: Duration = Duration::from_millis(10);

fn full() -> Knobs {
    Knobs {
        keep_full_wg_config: true,
        ..Knobs::default()
    }
}

fn mesh(n: usize, knobs: Knobs) -> Net {
    let mut net = Net::new(n, HALF_RTT, |_, _| {});
    net.configure_all(knobs);
    net
}

fn udp_packet(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    wire::udp::emit_datagram(src, dst, payload, &mut p).unwrap();
    p
}

/// Feeds a TUN packet to node `i` and returns the datagrams it produced,
/// without delivering them.
fn capture_transmits(net: &mut Net, i: usize, packet: &[u8]) -> Vec<Transmit> {
    let now = net.now;
    net.nodes[i]
        .engine
        .handle_input(now, Input::TunPacket(packet))
        .unwrap();
    let mut out = Vec::new();
    while let Some(o) = net.nodes[i].engine.poll_output() {
        if let Output::Transmit(t) = o {
            out.push(t);
        }
    }
    out
}

/// Everything a hostile input must leave untouched on a node.
#[derive(Debug, PartialEq)]
struct Snapshot {
    peers: Vec<PeerStatus>,
    configured: Vec<NodePublicKey>,
    pending_pings: usize,
    timers: usize,
    events: usize,
    effects: usize,
    tun_out: usize,
    sent: usize,
}

fn snapshot(net: &mut Net, i: usize) -> Snapshot {
    // A status request's answer comes out on the next drain.
    net.input(i, Input::StatusRequest).unwrap();
    let status = net.nodes[i].statuses.pop().expect("a status answer").1;
    let n = &net.nodes[i];
    Snapshot {
        peers: status.peers,
        configured: n.engine.configured_peers(),
        pending_pings: n.engine.pending_ping_count(),
        timers: n.engine.timer_queue_len(),
        events: n.events.len(),
        effects: n.effects.len(),
        tun_out: n.tun_out.len(),
        sent: n.sent.len(),
    }
}

// ---------------------------------------------------------------------------
// Source outside AllowedIPs
// ---------------------------------------------------------------------------

#[test]
fn sources_outside_the_senders_allowed_ips_are_dropped_and_counted() {
    let mut net = mesh(3, full());
    // A subnet routed to node 2, and an address nobody owns.
    let ip0 = net.nodes[0].ip4;
    let ip0_6 = net.nodes[0].ip6;
    let ip1 = net.nodes[1].ip4;
    net.send_udp(1, ip0, b"legit before");
    net.run_for(Duration::from_secs(1));
    assert_eq!(net.delivered(0, b"legit before").len(), 1);
    let spoofed_sources: Vec<IpAddr> = vec![
        net.nodes[2].ip4,                      // another peer's address
        net.nodes[2].ip6,                      // ... in IPv6
        "100.64.0.200".parse().unwrap(),       // inside the tailnet range, owned by nobody
        "8.8.8.8".parse().unwrap(),            // the internet
        ip0,                                   // the receiver's own address
        "fd7a:115c:a1e0::99".parse().unwrap(), // IPv6, owned by nobody
    ];
    for (k, src) in spoofed_sources.iter().enumerate() {
        let dst = if src.is_ipv4() { ip0 } else { ip0_6 };
        let p = udp_packet(
            SocketAddr::new(*src, 1000 + k as u16),
            SocketAddr::new(dst, 53),
            format!("spoof{k}").as_bytes(),
        );
        net.input(1, Input::TunPacket(&p)).unwrap();
    }
    net.run_for(Duration::from_secs(1));
    for (k, src) in spoofed_sources.iter().enumerate() {
        assert!(
            net.delivered(0, format!("spoof{k}").as_bytes()).is_empty(),
            "spoofed packet {k} from {src} was delivered"
        );
    }
    assert_eq!(
        net.nodes[0].engine.counters().drop_spoofed_source,
        spoofed_sources.len() as u64
    );
    // Node 1 stays a legitimate peer for its own address.
    net.send_udp(1, ip0, b"legit after");
    net.run_for(Duration::from_secs(1));
    assert_eq!(net.delivered(0, b"legit after").len(), 1);
    // And node 0 still talks to node 1.
    net.send_udp(0, ip1, b"and back");
    net.run_for(Duration::from_secs(1));
    assert_eq!(net.delivered(1, b"and back").len(), 1);
}

#[test]
fn a_subnet_router_may_not_source_from_another_routers_subnet() {
    let mut net = Net::new(3, HALF_RTT, |_, _| {});
    net.nodes[1]
        .extra_allowed
        .push("10.1.0.0/16".parse::<IpNet>().unwrap());
    net.nodes[2]
        .extra_allowed
        .push("10.2.0.0/16".parse::<IpNet>().unwrap());
    net.configure_all(full());
    let ip0 = net.nodes[0].ip4;
    let dst = SocketAddr::new(ip0, 80);
    let own = udp_packet("10.1.3.4:1".parse().unwrap(), dst, b"own subnet");
    let other = udp_packet("10.2.3.4:1".parse().unwrap(), dst, b"other subnet");
    net.input(1, Input::TunPacket(&own)).unwrap();
    net.input(1, Input::TunPacket(&other)).unwrap();
    net.run_for(Duration::from_secs(1));
    assert_eq!(net.delivered(0, b"own subnet").len(), 1);
    assert!(net.delivered(0, b"other subnet").is_empty());
    assert_eq!(net.nodes[0].engine.counters().drop_spoofed_source, 1);
}

// ---------------------------------------------------------------------------
// Replayed WireGuard data
// ---------------------------------------------------------------------------

#[test]
fn replayed_data_packets_are_dropped_in_any_order_and_from_any_address() {
    let mut net = mesh(2, full());
    let ip1 = net.nodes[1].ip4;
    net.send_udp(0, ip1, b"handshake");
    net.run_for(Duration::from_secs(1));
    assert_eq!(net.delivered(1, b"handshake").len(), 1);
    let src = SocketAddr::new(net.nodes[0].ip4, 7);
    let dst = SocketAddr::new(ip1, 8);
    // Forty data packets taken off the wire.
    let mut captured = Vec::new();
    for k in 0..40u32 {
        let p = udp_packet(src, dst, format!("burst-{k:03}").as_bytes());
        let t = capture_transmits(&mut net, 0, &p);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].data[0], 4, "a data message");
        captured.push(t.into_iter().next().unwrap().data);
    }
    let from = net.nodes[0].endpoint;
    let deliver = |net: &mut Net, data: &[u8], from: SocketAddr| {
        net.input(1, Input::Datagram { from, data }).unwrap();
    };
    // Delivered out of order (reversed), once each: all accepted.
    for d in captured.iter().rev() {
        deliver(&mut net, d, from);
    }
    let delivered = |net: &Net| {
        (0..40)
            .map(|k| net.delivered(1, format!("burst-{k:03}").as_bytes()).len())
            .sum::<usize>()
    };
    assert_eq!(delivered(&net), 40);
    let replays_before = net.nodes[1].engine.counters().drop_wg_replay;
    // Every one again, in order, reversed, and from an attacker's address.
    let attacker: SocketAddr = "203.0.113.66:4444".parse().unwrap();
    for d in &captured {
        deliver(&mut net, d, from);
    }
    for d in captured.iter().rev() {
        deliver(&mut net, d, attacker);
    }
    assert_eq!(delivered(&net), 40, "no replay reached the TUN");
    assert_eq!(
        net.nodes[1].engine.counters().drop_wg_replay - replays_before,
        80
    );
    // A replay from another address does not move the peer's endpoint.
    net.send_udp(1, net.nodes[0].ip4, b"reply goes home");
    net.run_for(Duration::from_secs(1));
    assert_eq!(net.delivered(0, b"reply goes home").len(), 1);
    assert!(
        net.nodes[1].sent.iter().all(|(_, dst, _)| *dst != attacker),
        "the attacker's address never became the peer's endpoint"
    );
    // A packet far behind the replay window (thousands of packets later) is also dropped.
    for k in 0..3000u32 {
        let p = udp_packet(src, dst, &k.to_be_bytes());
        for t in capture_transmits(&mut net, 0, &p) {
            deliver(&mut net, &t.data, from);
        }
    }
    let before = net.nodes[1].engine.counters().drop_wg_replay;
    deliver(&mut net, &captured[0], from);
    assert_eq!(net.nodes[1].engine.counters().drop_wg_replay, before + 1);
    assert_eq!(delivered(&net), 40);
}

// ---------------------------------------------------------------------------
// Disco: unknown sender, bad box, truncated, malformed plaintext
// ---------------------------------------------------------------------------

/// Seals an arbitrary plaintext (not necessarily a valid message) as disco.
fn seal_raw(sender: &DiscoPrivateKey, recipient: &DiscoPublicKey, plaintext: &[u8]) -> Vec<u8> {
    let secret = crypto_box::SecretKey::from(*sender.as_bytes());
    let public = crypto_box::PublicKey::from(recipient.0);
    let b = crypto_box::SalsaBox::new(&public, &secret);
    let nonce = [9u8; 24];
    let mut body = plaintext.to_vec();
    let tag = b
        .encrypt_in_place_detached(GenericArray::from_slice(&nonce), b"", &mut body)
        .unwrap();
    let mut out = wire::disco::MAGIC.to_vec();
    out.extend_from_slice(&sender.public_key().0);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&tag);
    out.extend_from_slice(&body);
    out
}

#[test]
fn bad_disco_is_dropped_counted_and_changes_nothing() {
    let mut net = mesh(2, Knobs::default());
    // Some real state first: a session and a disco path.
    let ip1 = net.nodes[1].ip4;
    net.send_udp(0, ip1, b"warm up");
    net.run_for(Duration::from_secs(2));
    assert_eq!(net.delivered(1, b"warm up").len(), 1);
    net.run_for(Duration::from_secs(1));
    let me = net.nodes[0].engine.disco_key();
    let peer_disco = net.nodes[1].disco_private.clone();
    let stranger = DiscoPrivateKey::from_bytes([0x5a; 32]);
    let from = net.nodes[1].endpoint;
    let tx_id = [3u8; 12];
    let ping = wire::disco::DiscoMessage::Ping {
        tx_id,
        node_key: Some(net.key(1).0),
    };
    let mut ping_plain = Vec::new();
    ping.emit(&mut ping_plain);
    let pong = |src| wire::disco::DiscoMessage::Pong { tx_id, src };
    let mut pong_plain = Vec::new();
    pong(from).emit(&mut pong_plain);

    let before = snapshot(&mut net, 0);
    let c0 = net.nodes[0].engine.counters().clone();
    type Case = (&'static str, Vec<u8>, fn(&Counters) -> u64);
    let mut truncated = seal_raw(&peer_disco, &me, &ping_plain);
    truncated.truncate(wire::disco::MIN_LEN - 1);
    let mut tampered = seal_raw(&peer_disco, &me, &ping_plain);
    let last = tampered.len() - 1;
    tampered[last] ^= 0x80;
    let cases: Vec<Case> = vec![
        // A valid box from a disco key no peer has.
        (
            "unknown sender ping",
            seal_raw(&stranger, &me, &ping_plain),
            |c| c.drop_disco_unknown_sender,
        ),
        (
            "unknown sender pong",
            seal_raw(&stranger, &me, &pong_plain),
            |c| c.drop_disco_unknown_sender,
        ),
        // The peer's key in the header, but a box it did not seal.
        (
            "bad box (stranger sealed, peer's key claimed)",
            {
                let mut d = seal_raw(&stranger, &me, &ping_plain);
                d[6..38].copy_from_slice(&peer_disco.public_key().0);
                d
            },
            |c| c.drop_disco_bad,
        ),
        ("bad box (tampered)", tampered, |c| c.drop_disco_bad),
        (
            "bad box (sealed for another recipient)",
            seal_raw(&peer_disco, &stranger.public_key(), &ping_plain),
            |c| c.drop_disco_bad,
        ),
        // Valid boxes from the peer with plaintexts that are not messages.
        (
            "truncated plaintext",
            seal_raw(&peer_disco, &me, &[1, 0, 1, 2, 3]),
            |c| c.drop_disco_bad,
        ),
        (
            "unknown type",
            seal_raw(&peer_disco, &me, &[0x7f, 0, 1, 2]),
            |c| c.drop_disco_bad,
        ),
        ("empty plaintext", seal_raw(&peer_disco, &me, &[]), |c| {
            c.drop_disco_bad
        }),
        // Shorter than a header and a tag: not even disco.
        ("truncated datagram", truncated, |c| c.drop_datagram_unknown),
        ("magic only", wire::disco::MAGIC.to_vec(), |c| {
            c.drop_datagram_unknown
        }),
    ];
    for (name, data, counter) in &cases {
        let was = counter(net.nodes[0].engine.counters());
        for _ in 0..3 {
            net.input(0, Input::Datagram { from, data }).unwrap();
        }
        let now = counter(net.nodes[0].engine.counters());
        assert_eq!(now - was, 3, "{name}: counted once per datagram");
    }
    // Nothing answered, nothing changed.
    let after = snapshot(&mut net, 0);
    assert_eq!(before, after, "hostile disco changed the node's state");
    let c1 = net.nodes[0].engine.counters();
    assert_eq!(
        c1.disco_pongs_sent, c0.disco_pongs_sent,
        "no pong to a forged ping"
    );
    assert_eq!(c1.path_changes, c0.path_changes);
    assert_eq!(
        c1.disco_call_me_maybe_received,
        c0.disco_call_me_maybe_received
    );
}

#[test]
fn pongs_for_pings_never_sent_do_not_move_the_path() {
    let mut net = mesh(2, Knobs::default());
    let ip1 = net.nodes[1].ip4;
    net.send_udp(0, ip1, b"warm up");
    net.run_for(Duration::from_secs(3));
    let me = net.nodes[0].engine.disco_key();
    let peer_disco = net.nodes[1].disco_private.clone();
    let from = net.nodes[1].endpoint;
    let path_changes = net.nodes[0].engine.counters().path_changes;
    let before = snapshot(&mut net, 0);
    // The peer's real key, valid boxes, but transaction ids never sent and an
    // observed address an attacker would like us to use: 10,000 of them.
    for k in 0..10_000u32 {
        let mut tx_id = [0u8; 12];
        tx_id[..4].copy_from_slice(&k.to_le_bytes());
        let mut plain = Vec::new();
        wire::disco::DiscoMessage::Pong {
            tx_id,
            src: "203.0.113.66:4444".parse().unwrap(),
        }
        .emit(&mut plain);
        let d = seal_raw(&peer_disco, &me, &plain);
        net.input(0, Input::Datagram { from, data: &d }).unwrap();
    }
    let mut after = snapshot(&mut net, 0);
    let timers_after = after.timers;
    after.timers = before.timers;
    assert_eq!(before, after, "unsolicited pongs changed the node's state");
    assert_eq!(net.nodes[0].engine.counters().path_changes, path_changes);
    // Known cost (reported): each unsolicited pong pushes one stale entry on
    // the lazy-cancellation timer queue; they drain at the next disco tick.
    eprintln!(
        "timer queue: {} before, {} after 10,000 unsolicited pongs",
        before.timers, timers_after
    );
    net.run_for(Duration::from_secs(10));
    assert!(
        net.nodes[0].engine.timer_queue_len() <= before.timers,
        "the timer queue drains: {} entries left",
        net.nodes[0].engine.timer_queue_len()
    );
    assert!(
        net.nodes[0]
            .sent
            .iter()
            .all(|(_, dst, _)| dst.ip() != IpAddr::from([203, 0, 113, 66])),
        "nothing was sent to the address the pongs advertised"
    );
}

// ---------------------------------------------------------------------------
// A flood of forged handshake initiations
// ---------------------------------------------------------------------------

/// `n` handshake initiations to `target` from throwaway keys, each with a
/// valid MAC1 (what an attacker who knows our public key can make).
fn forged_initiations(target: &NodePublicKey, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|k| {
            let mut secret = [0u8; 32];
            secret[..8].copy_from_slice(&(k as u64 + 1).to_le_bytes());
            secret[31] = 0x5f;
            let mut tunn = Tunn::new(
                StaticSecret::from(secret),
                PublicKey::from(target.0),
                None,
                None,
                k as u32,
                None,
            );
            let mut buf = [0u8; 148];
            match tunn.format_handshake_initiation(&mut buf, true) {
                TunnResult::WriteToNetwork(p) => p.to_vec(),
                _ => panic!("no initiation"),
            }
        })
        .collect()
}

struct FloodResult {
    delivered: usize,
    sent: usize,
    forged: u64,
    cookies: u64,
    victim_counters: Counters,
    handshake_done_at: Option<Duration>,
}

/// Node 0 sends `pps` legitimate packets per second to node 1 for `secs`
/// seconds, starting `start_after` into the run; meanwhile node 1 receives
/// `flood_per_ms` forged initiations every millisecond (100: 100,000 per
/// second) from random addresses for the whole run.
fn transfer_under_flood(
    warm: bool,
    flood_per_ms: usize,
    start_after: Duration,
    secs: u64,
    pps: u64,
) -> FloodResult {
    let mut net = mesh(2, Knobs::default());
    let ip1 = net.nodes[1].ip4;
    if warm {
        net.send_udp(0, ip1, b"warm");
        net.run_for(Duration::from_secs(1));
        assert_eq!(net.delivered(1, b"warm").len(), 1);
    }
    let flood = flood_per_ms > 0;
    let forged = if flood {
        forged_initiations(&net.key(1), 256)
    } else {
        vec![]
    };
    let start = net.now;
    let total = start_after + Duration::from_secs(secs);
    let ms_total = total.as_millis() as u64;
    let per_ms_forged = flood_per_ms;
    let legit_every_ms = 1000 / pps;
    let legit_from_ms = start_after.as_millis() as u64;
    let mut seq = 0usize;
    let mut forged_sent = 0u64;
    let src = SocketAddr::new(net.nodes[0].ip4, 9000);
    let dst = SocketAddr::new(ip1, 9001);
    let mut handshake_done_at = None;
    for ms in 0..ms_total {
        let t: Instant = start + Duration::from_millis(ms);
        net.run_until(t);
        if flood {
            for k in 0..per_ms_forged {
                let x = forged_sent as usize;
                let from = SocketAddr::new(
                    IpAddr::from([198, 18, (x >> 8) as u8, x as u8]),
                    1024 + (k as u16),
                );
                let data = &forged[x % forged.len()];
                net.input(1, Input::Datagram { from, data }).unwrap();
                forged_sent += 1;
            }
        }
        if ms >= legit_from_ms && (ms - legit_from_ms) % legit_every_ms == 0 {
            let p = udp_packet(src, dst, format!("legit-{seq:06}").as_bytes());
            net.input(0, Input::TunPacket(&p)).unwrap();
            seq += 1;
        }
        if handshake_done_at.is_none()
            && net.nodes[1]
                .events
                .iter()
                .any(|(_, e)| matches!(e, Event::HandshakeCompleted { .. }))
        {
            handshake_done_at = Some(net.now - start);
        }
    }
    net.run_for(Duration::from_secs(1));
    let delivered = net.nodes[1]
        .tun_out
        .iter()
        .filter(|(_, p)| p.windows(6).any(|w| w == b"legit-"))
        .count();
    let victim_counters = net.nodes[1].engine.counters().clone();
    FloodResult {
        delivered,
        sent: seq,
        forged: forged_sent,
        cookies: victim_counters.cookie_replies_sent,
        victim_counters,
        handshake_done_at,
    }
}

#[test]
fn forged_initiation_flood_leaves_an_established_transfer_at_full_speed() {
    // 1 s at 100,000 forged initiations per second (100,000 of them) while
    // an established session carries 500 packets per second.
    let base = transfer_under_flood(true, 0, Duration::ZERO, 1, 500);
    let flooded = transfer_under_flood(true, 100, Duration::ZERO, 1, 500);
    eprintln!(
        "established: baseline {}/{} delivered, under flood {}/{} delivered; {} forged, {} cookie replies, {} forged reached DH and were dropped as unknown peers",
        base.delivered,
        base.sent,
        flooded.delivered,
        flooded.sent,
        flooded.forged,
        flooded.cookies,
        flooded.victim_counters.drop_wg_unknown_peer
    );
    assert_eq!(base.delivered, base.sent);
    assert!(
        flooded.delivered * 100 >= base.delivered * 80,
        "the legitimate transfer kept {}/{} packets",
        flooded.delivered,
        base.delivered
    );
    assert!(flooded.cookies > 0, "the cookie mechanism engaged");
    assert_eq!(flooded.forged, 100_000);
    // Only the rate limit's worth of forged initiations reached the expensive
    // DH (512 per second, wireguard-go's queue threshold), the rest got
    // cookies.
    assert!(
        flooded.victim_counters.drop_wg_unknown_peer <= 2 * 512,
        "{} forged initiations reached DH",
        flooded.victim_counters.drop_wg_unknown_peer
    );
    assert_eq!(
        flooded.victim_counters.drop_wg_unknown_peer + flooded.cookies,
        flooded.forged,
        "every forged initiation was either answered with a cookie or dropped after DH"
    );
}

/// A new handshake under the flood: node 0 (lazy, never talked to node 1)
/// starts sending while node 1 receives 100,000 forged initiations per
/// second. Its first initiation gets a cookie reply like everyone's; the
/// retry carries a valid MAC2 and passes the rate limit.
fn handshake_under_flood(secs: u64, per_ms: usize) -> (FloodResult, FloodResult) {
    let base = transfer_under_flood(false, 0, Duration::from_millis(500), secs, 100);
    let flooded = transfer_under_flood(false, per_ms, Duration::from_millis(500), secs, 100);
    eprintln!(
        "new handshake, {secs} s, {per_ms} forged/ms: baseline {}/{} delivered (handshake at {:?}), under flood {}/{} delivered (handshake at {:?}); {} forged, {} cookie replies",
        base.delivered,
        base.sent,
        base.handshake_done_at,
        flooded.delivered,
        flooded.sent,
        flooded.handshake_done_at,
        flooded.forged,
        flooded.cookies,
    );
    assert_eq!(base.delivered, base.sent);
    assert!(flooded.cookies > 0, "the cookie mechanism engaged");
    let done = flooded
        .handshake_done_at
        .expect("the legitimate handshake completed under the flood");
    // One retransmission (REKEY_TIMEOUT, 5 s, plus jitter) after the cookie.
    assert!(
        done <= Duration::from_millis(500) + Duration::from_millis(5_500),
        "handshake took {done:?}"
    );
    (base, flooded)
}

#[test]
fn a_new_handshake_completes_under_the_flood_through_the_cookie() {
    // 10,000 forged per second (about 20x the rate limit; the limiter's verdict is
    // the same as at 100,000/s, and debug builds stay fast): the 100,000/s
    // run is the ignored test below.
    let (_, flooded) = handshake_under_flood(7, 10);
    // Everything sent after the handshake arrived, and the packets queued
    // while it ran were delivered too.
    let after_handshake =
        7 * 100 - (flooded.handshake_done_at.unwrap().as_millis() as usize - 500) / 10;
    assert!(
        flooded.delivered >= after_handshake,
        "{} delivered, {} sent after the handshake",
        flooded.delivered,
        after_handshake
    );
}

/// The full measurement (3,000,000 forged initiations; run it in release:
/// `cargo test --release -p wgmesh-core --test hostile -- --ignored`).
#[test]
#[ignore = "long: 30 s of flood at 100,000/s; run with --release -- --ignored"]
fn a_new_transfer_keeps_80_percent_of_its_throughput_over_30_s_of_flood() {
    let (base, flooded) = handshake_under_flood(30, 100);
    assert!(
        flooded.delivered * 100 >= base.delivered * 80,
        "kept {}/{}",
        flooded.delivered,
        base.delivered
    );
}

// ---------------------------------------------------------------------------
// A peer claiming another peer's AllowedIPs
// ---------------------------------------------------------------------------

#[test]
fn a_peer_claiming_another_peers_address_is_refused_at_reconfig() {
    let mut net = mesh(3, full());
    let ip1 = net.nodes[1].ip4;
    net.send_udp(0, ip1, b"before");
    net.run_for(Duration::from_secs(1));
    assert_eq!(net.delivered(1, b"before").len(), 1);
    let good = net.reconfig_for(0, full());
    let before = snapshot(&mut net, 0);
    let refused_before = net.nodes[0].engine.counters().reconfigs_refused;
    let k1 = net.key(1);
    let k2 = net.key(2);
    let claims: Vec<(&str, Vec<IpNet>)> = vec![
        ("node1's IPv4", vec![IpNet::from(net.nodes[1].ip4)]),
        ("node1's IPv6", vec![IpNet::from(net.nodes[1].ip6)]),
        (
            "its own plus node1's",
            vec![IpNet::from(net.nodes[2].ip4), IpNet::from(net.nodes[1].ip4)],
        ),
    ];
    for (what, allowed) in &claims {
        let mut rc = good.clone();
        let peers = &mut rc.wireguard.as_mut().unwrap().peers;
        let p2 = peers.iter_mut().find(|p| p.public_key == k2).unwrap();
        p2.allowed_ips = allowed.clone();
        let err = net.input(0, Input::Reconfig(Box::new(rc))).unwrap_err();
        match err {
            InputError::Reconfig(ReconfigError::OverlappingAllowedIp { first, second, .. }) => {
                assert!(
                    [first, second].contains(&k1) && [first, second].contains(&k2),
                    "{what}: the error names both peers"
                );
            }
            other => panic!("{what}: refused for the wrong reason: {other:?}"),
        }
    }
    // A newcomer claiming node 1's address, and a delta doing the same.
    let mut rc = good.clone();
    let mut thief = PeerConfig::new(
        NodePrivateKey::from_bytes([0x42; 32]).public_key(),
        vec![IpNet::from(net.nodes[1].ip4)],
    );
    thief.endpoints = vec!["203.0.113.66:41641".parse().unwrap()];
    rc.wireguard.as_mut().unwrap().peers.push(thief.clone());
    assert!(matches!(
        net.input(0, Input::Reconfig(Box::new(rc))),
        Err(InputError::Reconfig(
            ReconfigError::OverlappingAllowedIp { .. }
        ))
    ));
    let now = net.now;
    let delta = PeerDelta {
        upsert: vec![thief],
        remove: vec![],
    };
    assert!(matches!(
        net.nodes[0].engine.apply_peer_delta(now, &delta),
        Err(ReconfigError::OverlappingAllowedIp { .. })
    ));
    // Nothing changed: same peers, same routing, traffic still goes to node 1.
    let after = snapshot(&mut net, 0);
    assert_eq!(before.peers, after.peers);
    assert_eq!(before.configured, after.configured);
    assert_eq!(
        net.nodes[0].engine.counters().reconfigs_refused - refused_before,
        claims.len() as u64 + 1,
        "each refused reconfig is counted"
    );
    assert_eq!(net.nodes[0].engine.peer_for_ip(ip1), Ok(k1));
    net.send_udp(0, ip1, b"after");
    net.run_for(Duration::from_secs(1));
    assert_eq!(net.delivered(1, b"after").len(), 1);
    assert!(
        net.nodes[0]
            .sent
            .iter()
            .all(|(_, d, _)| d.port() != 41641 || d.ip() != IpAddr::from([203, 0, 113, 66]))
    );
    // The good config applied again is no change at all.
    assert_eq!(
        net.input(0, Input::Reconfig(Box::new(good))).unwrap(),
        InputOutcome::Reconfig(ReconfigOutcome::NoChanges)
    );
}

/// Regression test for a finding (fixed): every disco message
/// that opens (here: pongs with unknown transaction ids from a real peer)
/// makes `run_disco_actions` push one more `EngineTimer::Disco` entry, even
/// when the disco deadline did not move, so a peer can grow the timer queue
/// by one entry per datagram (they drain at the next disco tick, ~5 s).
/// Fix: push the disco deadline only when it is earlier than the one queued.
#[test]
fn disco_messages_do_not_grow_the_timer_queue() {
    let mut net = mesh(2, Knobs::default());
    let ip1 = net.nodes[1].ip4;
    net.send_udp(0, ip1, b"warm up");
    net.run_for(Duration::from_secs(3));
    let me = net.nodes[0].engine.disco_key();
    let peer_disco = net.nodes[1].disco_private.clone();
    let from = net.nodes[1].endpoint;
    let before = net.nodes[0].engine.timer_queue_len();
    for k in 0..1000u32 {
        let mut tx_id = [0u8; 12];
        tx_id[..4].copy_from_slice(&k.to_le_bytes());
        let mut plain = Vec::new();
        wire::disco::DiscoMessage::Pong { tx_id, src: from }.emit(&mut plain);
        let d = seal_raw(&peer_disco, &me, &plain);
        net.input(0, Input::Datagram { from, data: &d }).unwrap();
    }
    let after = net.nodes[0].engine.timer_queue_len();
    assert!(
        after <= before + 2,
        "1000 disco pongs grew the timer queue from {before} to {after}"
    );
}
