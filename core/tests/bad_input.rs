//! Bad input never panics, is dropped, and is counted under its own reason.

use std::net::SocketAddr;
use std::time::Duration;

use proptest::prelude::*;
use wgmesh_core::test_support::Net;
use wgmesh_core::*;

fn pair() -> Net {
    let mut net = Net::new(2, Duration::from_millis(5), |_, _| {});
    net.configure_all(Knobs {
        keep_full_wg_config: true,
        ..Knobs::default()
    });
    net
}

fn from_b(net: &Net) -> SocketAddr {
    net.nodes[1].endpoint
}

#[test]
fn each_malformed_input_is_counted_under_its_own_reason() {
    let mut net = pair();
    let c = |net: &Net| net.nodes[0].engine.counters().clone();

    net.input(0, Input::TunPacket(&[0x45, 0, 0])).unwrap();
    assert_eq!(c(&net).drop_tun_truncated, 1, "truncated header");
    net.input(0, Input::TunPacket(&[0x75; 40])).unwrap();
    assert_eq!(c(&net).drop_tun_bad_version, 1, "wrong IP version");
    let mut bad_len = vec![0u8; 20];
    bad_len[0] = 0x45;
    bad_len[3] = 200; // total length beyond the buffer
    net.input(0, Input::TunPacket(&bad_len)).unwrap();
    assert_eq!(c(&net).drop_tun_bad_length, 1, "inconsistent length");
    let mut unknown = Vec::new();
    wire::udp::emit_datagram(
        "100.64.0.1:1".parse().unwrap(),
        "198.18.0.1:2".parse().unwrap(),
        b"x",
        &mut unknown,
    )
    .unwrap();
    net.input(0, Input::TunPacket(&unknown)).unwrap();
    assert_eq!(c(&net).drop_no_peer_for_dst, 1, "unknown destination");

    let from = from_b(&net);
    // WireGuard messages of the wrong size for their type.
    for (ty, len) in [(1u8, 100usize), (2, 50), (3, 10), (4, 20)] {
        let mut m = vec![0u8; len];
        m[0] = ty;
        net.input(0, Input::Datagram { from, data: &m }).unwrap();
    }
    assert_eq!(c(&net).drop_wg_bad_size, 4, "wrong sizes");
    net.input(
        0,
        Input::Datagram {
            from,
            data: b"GET / HTTP/1.1",
        },
    )
    .unwrap();
    assert_eq!(c(&net).drop_datagram_unknown, 1);
    // A data message for an index nobody owns.
    let mut data = vec![0u8; 64];
    data[0] = 4;
    data[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
    net.input(0, Input::Datagram { from, data: &data }).unwrap();
    assert_eq!(c(&net).drop_wg_unknown_index, 1);
    // An initiation with a bad MAC1.
    let mut init = vec![0u8; 148];
    init[0] = 1;
    net.input(0, Input::Datagram { from, data: &init }).unwrap();
    assert_eq!(c(&net).drop_wg_bad_mac, 1);
    // A truncated disco message and one from an unknown disco key.
    let mut disco = wire::disco::MAGIC.to_vec();
    disco.extend_from_slice(&[7u8; 100]);
    net.input(0, Input::Datagram { from, data: &disco })
        .unwrap();
    assert_eq!(c(&net).drop_disco_unknown_sender, 1);
    let mut disco_bad = wire::disco::MAGIC.to_vec();
    disco_bad.extend_from_slice(&net.nodes[1].engine.disco_key().0);
    disco_bad.extend_from_slice(&[0u8; 60]);
    net.input(
        0,
        Input::Datagram {
            from,
            data: &disco_bad,
        },
    )
    .unwrap();
    assert_eq!(c(&net).drop_disco_bad, 1);
    // The engine still works.
    let ip1 = net.nodes[1].ip4;
    net.send_udp(0, ip1, b"fine");
    net.run_for(Duration::from_secs(1));
    assert_eq!(net.delivered(1, b"fine").len(), 1);
}

#[test]
fn spoofed_inner_source_is_dropped_and_counted() {
    let mut net = Net::new(3, Duration::from_millis(5), |_, _| {});
    net.configure_all(Knobs {
        keep_full_wg_config: true,
        ..Knobs::default()
    });
    // Node 1 sends a packet claiming node 2's address as its source. Node 1's
    // own engine routes by destination, so it encrypts it to node 0.
    let mut spoof = Vec::new();
    let src = SocketAddr::new(net.nodes[2].ip4, 1);
    let dst = SocketAddr::new(net.nodes[0].ip4, 2);
    wire::udp::emit_datagram(src, dst, b"spoof", &mut spoof).unwrap();
    net.input(1, Input::TunPacket(&spoof)).unwrap();
    net.run_for(Duration::from_secs(1));
    assert!(net.delivered(0, b"spoof").is_empty());
    assert_eq!(net.nodes[0].engine.counters().drop_spoofed_source, 1);
}

#[test]
fn replayed_data_packets_are_dropped() {
    let mut net = pair();
    let ip1 = net.nodes[1].ip4;
    net.send_udp(0, ip1, b"once");
    net.run_for(Duration::from_secs(1));
    // Take one data packet off the wire and deliver it twice.
    let from = net.nodes[0].endpoint;
    let mut captured = None;
    let now = net.now;
    let mut probe = Vec::new();
    wire::udp::emit_datagram(
        SocketAddr::new(net.nodes[0].ip4, 5),
        SocketAddr::new(ip1, 6),
        b"replay me",
        &mut probe,
    )
    .unwrap();
    net.nodes[0]
        .engine
        .handle_input(now, Input::TunPacket(&probe))
        .unwrap();
    while let Some(out) = net.nodes[0].engine.poll_output() {
        if let Output::Transmit(t) = out {
            captured = Some(t.data);
        }
    }
    let packet = captured.unwrap();
    for _ in 0..2 {
        net.nodes[1]
            .engine
            .handle_input(
                now,
                Input::Datagram {
                    from,
                    data: &packet,
                },
            )
            .unwrap();
        while net.nodes[1].engine.poll_output().is_some() {}
    }
    assert_eq!(net.nodes[1].engine.counters().drop_wg_replay, 1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_tun_packets_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), v in 0u8..3) {
        let mut net = pair();
        let mut packet = bytes;
        // Bias towards something that looks like IP so the deeper code runs.
        if let Some(first) = packet.first_mut() {
            *first = match v { 0 => 0x45, 1 => 0x60, _ => *first };
        }
        net.input(0, Input::TunPacket(&packet)).unwrap();
        net.run_for(Duration::from_millis(100));
    }

    #[test]
    fn arbitrary_datagrams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), kind in 0u8..6) {
        let mut net = pair();
        let mut data = bytes;
        match kind {
            0..=3 if data.len() >= 4 => { data[0] = kind + 1; data[1] = 0; data[2] = 0; data[3] = 0; }
            4 => { let mut d = wire::disco::MAGIC.to_vec(); d.extend_from_slice(&data); data = d; }
            _ => {}
        }
        let from = from_b(&net);
        net.input(0, Input::Datagram { from, data: &data }).unwrap();
        net.run_for(Duration::from_millis(100));
        let ip1 = net.nodes[1].ip4;
        net.send_udp(0, ip1, b"after garbage");
        net.run_for(Duration::from_secs(1));
        prop_assert_eq!(net.delivered(1, b"after garbage").len(), 1);
    }

    #[test]
    fn arbitrary_input_sequences_keep_invariants(ops in proptest::collection::vec((0u8..8, any::<u16>()), 1..40)) {
        let mut net = Net::new(3, Duration::from_millis(7), |_, _| {});
        net.configure_all(Knobs::default());
        for (op, arg) in ops {
            let node = usize::from(arg % 3);
            let other = (node + 1 + usize::from(arg % 2)) % 3;
            match op {
                0 => { let ip = net.nodes[other].ip4; net.send_udp(node, ip, &arg.to_be_bytes()); }
                1 => { let ip = net.nodes[other].ip6; net.ping(node, ip, [PingKind::Tsmp, PingKind::Icmp, PingKind::Disco][usize::from(arg % 3)], u64::from(arg)); }
                2 => net.run_for(Duration::from_millis(u64::from(arg) * 20)),
                3 => { let knobs = Knobs { keep_full_wg_config: arg % 2 == 0, ..Knobs::default() }; let rc = net.reconfig_for(node, knobs); net.input(node, Input::Reconfig(Box::new(rc))).unwrap(); }
                4 => net.input(node, Input::LinkChange(LinkChange { any_link_up: arg % 3 != 0, major: arg % 2 == 0 })).map(|_| ()).unwrap(),
                5 => { net.restart(node, u64::from(arg)); let rc = net.reconfig_for(node, Knobs::default()); net.input(node, Input::Reconfig(Box::new(rc))).unwrap(); for j in 0..3 { if j != node { let rc = net.reconfig_for(j, Knobs::default()); net.input(j, Input::Reconfig(Box::new(rc))).unwrap(); } } }
                6 => net.input(node, Input::StatusRequest).map(|_| ()).unwrap(),
                _ => net.run_for(Duration::from_secs(u64::from(arg % 400))),
            }
            for n in &net.nodes {
                let full = n.engine.full_config_peers();
                for k in n.engine.configured_peers() {
                    prop_assert!(full.contains(&k));
                }
                prop_assert!(n.engine.pending_ping_count() <= 64);
            }
        }
        net.run_for(Duration::from_secs(11));
        for n in &net.nodes {
            prop_assert_eq!(n.engine.pending_ping_count(), 0, "every ping ended");
            prop_assert_eq!(n.engine.counters().pings_started, n.pings.len() as u64, "each ping ended exactly once");
        }
    }
}
