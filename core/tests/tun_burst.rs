//! `Engine::handle_tun_burst` does what one `Input::TunPacket` per packet
//! does: two identical networks, one fed packet by packet and one in
//! bursts, send the same datagrams at the same times, deliver the same
//! packets and count the same things, before and after the session exists
//! and while the timers run on.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use wgmesh_core::test_support::Net;
use wgmesh_core::*;

const RTT_HALF: Duration = Duration::from_millis(10);

fn net() -> Net {
    let mut net = Net::new(3, RTT_HALF, |_, _| {});
    net.configure_all(Knobs {
        keep_full_wg_config: true,
        ..Knobs::default()
    });
    net
}

/// A UDP packet from node 0 to `dst` with `len` bytes of payload.
fn packet(net: &Net, dst: IpAddr, len: usize, tag: u8) -> Vec<u8> {
    let src = if dst.is_ipv4() {
        net.nodes[0].ip4
    } else {
        net.nodes[0].ip6
    };
    let payload: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_add(tag)).collect();
    let mut out = Vec::new();
    wire::udp::emit_datagram(
        SocketAddr::new(src, 5000),
        SocketAddr::new(dst, 6000),
        &payload,
        &mut out,
    )
    .unwrap();
    out
}

/// Everything observable about a network, with times relative to its base.
#[derive(Debug, PartialEq)]
struct Seen {
    sent: Vec<Vec<(Duration, SocketAddr, usize)>>,
    tun_out: Vec<Vec<(Duration, Vec<u8>)>>,
    counters: Vec<Counters>,
    events: Vec<Vec<String>>,
    timer_deadline: Vec<Option<Duration>>,
}

fn seen(net: &mut Net) -> Seen {
    let base = net.base;
    let rel = |t: Instant| t.saturating_duration_since(base);
    Seen {
        sent: net
            .nodes
            .iter()
            .map(|n| n.sent.iter().map(|(t, a, l)| (rel(*t), *a, *l)).collect())
            .collect(),
        tun_out: net
            .nodes
            .iter()
            .map(|n| {
                n.tun_out
                    .iter()
                    .map(|(t, p)| (rel(*t), p.clone()))
                    .collect()
            })
            .collect(),
        counters: net
            .nodes
            .iter()
            .map(|n| n.engine.counters().clone())
            .collect(),
        events: net
            .nodes
            .iter()
            .map(|n| {
                n.events
                    .iter()
                    .map(|(t, e)| format!("{:?} {e:?}", rel(*t)))
                    .collect()
            })
            .collect(),
        timer_deadline: net
            .nodes
            .iter_mut()
            .map(|n| n.engine.poll_timeout().map(rel))
            .collect(),
    }
}

/// The packets of one round: to nodes 1 and 2 over IPv4 and IPv6 in
/// runs and alternating, one to nobody, one malformed.
fn round(net: &Net, shape: &[(u8, usize)], tag: u8) -> Vec<Vec<u8>> {
    let dsts = [
        net.nodes[1].ip4,
        net.nodes[1].ip6,
        net.nodes[2].ip4,
        net.nodes[2].ip6,
        "100.99.0.1".parse().unwrap(),
    ];
    shape
        .iter()
        .map(|&(which, len)| match which {
            5 => vec![0x45, 0, 0, 200, 1, 2],
            w => packet(net, dsts[usize::from(w) % dsts.len()], len, tag),
        })
        .collect()
}

/// Runs the same rounds on two networks, one packet at a time and in
/// bursts, and compares everything after each round.
fn compare(rounds: &[(Vec<(u8, usize)>, Duration)]) {
    let mut alone = net();
    let mut burst = net();
    for (i, (shape, pause)) in rounds.iter().enumerate() {
        let packets = round(&alone, shape, i as u8);
        for p in &packets {
            alone.input(0, Input::TunPacket(p)).unwrap();
        }
        assert_eq!(burst.tun_burst(0, &packets), packets.len());
        assert_eq!(
            seen(&mut alone),
            seen(&mut burst),
            "after round {i}, at once"
        );
        alone.run_for(*pause);
        burst.run_for(*pause);
        assert_eq!(
            seen(&mut alone),
            seen(&mut burst),
            "after round {i}, {pause:?} later"
        );
    }
}

#[test]
fn a_burst_does_what_single_packets_do_before_and_after_the_handshake() {
    let mixed = vec![
        (0, 100),
        (0, 1300),
        (0, 1300),
        (1, 40),
        (2, 500),
        (0, 1300),
        (4, 60),
        (5, 0),
        (3, 1200),
        (3, 1200),
    ];
    compare(&[
        // No session yet: packets are staged and handshakes start.
        (mixed.clone(), Duration::from_secs(1)),
        // Sessions exist: everything is encrypted at once.
        (mixed.clone(), Duration::from_millis(5)),
        (
            (0..64).map(|i| (0, 1000 + i)).collect(),
            Duration::from_secs(30),
        ),
        // Past keepalive and rekey timers.
        (mixed, Duration::from_secs(130)),
    ]);
}

#[test]
fn an_empty_burst_changes_nothing() {
    let mut net = net();
    let before = seen(&mut net);
    assert_eq!(net.tun_burst(0, &[]), 0);
    assert_eq!(seen(&mut net), before);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn any_burst_does_what_single_packets_do(
        rounds in prop::collection::vec(
            (
                prop::collection::vec((0u8..6, 20usize..1400), 0..40),
                0u64..20_000,
            ),
            1..5,
        )
    ) {
        let rounds: Vec<_> = rounds
            .into_iter()
            .map(|(shape, ms)| (shape, Duration::from_millis(ms)))
            .collect();
        compare(&rounds);
    }
}
