//! Reconfig change detection and validation.

use std::time::Duration;

use ipnet::IpNet;
use wgmesh_core::test_support::Net;
use wgmesh_core::*;

type Mutation = (
    &'static str,
    fn(&mut Reconfig),
    fn(&ReconfigChanges) -> bool,
);

/// One mutation per config field. The destructuring below has no `..`, so
/// adding a field to any config struct fails to compile until its case is
/// added here.
fn mutations() -> Vec<Mutation> {
    fn _every_field_is_listed(r: Reconfig) {
        let Reconfig {
            wireguard,
            router,
            dns,
            knobs,
            primary_routes: _,
        } = r;
        let WgConfig {
            listen_port: _,
            peers,
        } = wireguard.unwrap();
        let PeerConfig {
            public_key: _,
            disco_key: _,
            name: _,
            allowed_ips: _,
            endpoints: _,
            persistent_keepalive_secs: _,
            preshared_key: _,
        } = peers[0].clone();
        let RouterConfig {
            local_addrs: _,
            routes: _,
            advertised_routes: _,
            mtu: _,
        } = router.unwrap();
        let DnsConfig {
            nameservers: _,
            search_domains: _,
        } = dns.unwrap();
        let Knobs {
            keep_full_wg_config: _,
            randomize_client_port: _,
            path_mtu_discovery: _,
            fake_icmp_echo: _,
            peerapi_port: _,
            bird_protocol: _,
        } = knobs;
    }
    fn peer(r: &mut Reconfig) -> &mut PeerConfig {
        &mut r.wireguard.as_mut().unwrap().peers[0]
    }
    fn router(r: &mut Reconfig) -> &mut RouterConfig {
        r.router.as_mut().unwrap()
    }
    vec![
        (
            "wireguard.listen_port",
            |r| r.wireguard.as_mut().unwrap().listen_port = 1,
            |c| c.listen_port && c.wireguard,
        ),
        (
            "wireguard.peers (removed)",
            |r| r.wireguard.as_mut().unwrap().peers.clear(),
            |c| c.wireguard && c.peers_changed == 1,
        ),
        (
            "peer.public_key",
            |r| peer(r).public_key = NodePublicKey([9; 32]),
            |c| c.wireguard && c.peers_changed == 2,
        ),
        (
            "peer.disco_key",
            |r| peer(r).disco_key = Some(DiscoPublicKey([9; 32])),
            |c| c.wireguard && c.peers_changed == 1,
        ),
        (
            "peer.name",
            |r| peer(r).name = "renamed".into(),
            |c| c.wireguard,
        ),
        (
            "peer.allowed_ips",
            |r| peer(r).allowed_ips.push("10.9.0.0/16".parse().unwrap()),
            |c| c.wireguard,
        ),
        (
            "peer.endpoints",
            |r| peer(r).endpoints.push("192.0.2.200:1".parse().unwrap()),
            |c| c.wireguard,
        ),
        (
            "peer.persistent_keepalive_secs",
            |r| peer(r).persistent_keepalive_secs = Some(25),
            |c| c.wireguard,
        ),
        (
            "peer.preshared_key",
            |r| peer(r).preshared_key = Some([3; 32]),
            |c| c.wireguard,
        ),
        (
            "router.local_addrs",
            |r| router(r).local_addrs.push("100.64.9.9/32".parse().unwrap()),
            |c| c.router && !c.wireguard,
        ),
        (
            "router.routes",
            |r| router(r).routes.push("10.0.0.0/8".parse().unwrap()),
            |c| c.router,
        ),
        (
            "router.advertised_routes",
            |r| {
                router(r)
                    .advertised_routes
                    .push("10.5.0.0/16".parse().unwrap())
            },
            |c| c.router,
        ),
        ("router.mtu", |r| router(r).mtu = 1400, |c| c.router),
        (
            "dns.nameservers",
            |r| r.dns.as_mut().unwrap().nameservers.clear(),
            |c| c.dns && !c.router,
        ),
        (
            "dns.search_domains",
            |r| r.dns.as_mut().unwrap().search_domains.push("x.test".into()),
            |c| c.dns,
        ),
        (
            "knobs.keep_full_wg_config",
            |r| r.knobs.keep_full_wg_config = true,
            |c| c.knobs,
        ),
        (
            "knobs.randomize_client_port",
            |r| r.knobs.randomize_client_port = true,
            |c| c.knobs && c.listen_port,
        ),
        (
            "knobs.path_mtu_discovery",
            |r| r.knobs.path_mtu_discovery = true,
            |c| c.knobs && c.path_mtu,
        ),
        (
            "knobs.fake_icmp_echo",
            |r| r.knobs.fake_icmp_echo = true,
            |c| c.knobs,
        ),
        (
            "knobs.peerapi_port",
            |r| r.knobs.peerapi_port = Some(1),
            |c| c.knobs,
        ),
        (
            "knobs.bird_protocol",
            |r| r.knobs.bird_protocol = Some("tailnet".into()),
            |c| c.knobs && c.subnet_router,
        ),
        (
            "primary_routes",
            |r| r.primary_routes.push("10.5.0.0/16".parse().unwrap()),
            |_| true,
        ),
    ]
}

#[test]
fn equal_config_twice_is_no_changes_and_every_field_change_is_detected() {
    for (name, mutate, expect) in mutations() {
        let mut net = Net::new(2, Duration::from_millis(5), |_, _| {});
        let base = net.reconfig_for(0, Knobs::default());
        let first = net
            .input(0, Input::Reconfig(Box::new(base.clone())))
            .unwrap();
        assert!(matches!(
            first,
            InputOutcome::Reconfig(ReconfigOutcome::Applied(_))
        ));
        let again = net
            .input(0, Input::Reconfig(Box::new(base.clone())))
            .unwrap();
        assert_eq!(
            again,
            InputOutcome::Reconfig(ReconfigOutcome::NoChanges),
            "{name}: same config twice"
        );
        let mut changed = base.clone();
        mutate(&mut changed);
        assert_ne!(changed, base, "{name}: the mutation changes something");
        match net.input(0, Input::Reconfig(Box::new(changed))).unwrap() {
            InputOutcome::Reconfig(ReconfigOutcome::Applied(c)) => {
                assert!(expect(&c), "{name}: {c:?}")
            }
            other => panic!("{name}: change not detected: {other:?}"),
        }
    }
}

#[test]
fn router_and_dns_effects_only_when_those_parts_change() {
    let mut net = Net::new(2, Duration::from_millis(5), |_, _| {});
    let base = net.reconfig_for(0, Knobs::default());
    net.input(0, Input::Reconfig(Box::new(base.clone())))
        .unwrap();
    let count = |net: &Net, f: fn(&Effect) -> bool| {
        net.nodes[0].effects.iter().filter(|(_, e)| f(e)).count()
    };
    let is_router = |e: &Effect| matches!(e, Effect::ApplyRouter(_));
    let is_dns = |e: &Effect| matches!(e, Effect::ApplyDns(_));
    assert_eq!((count(&net, is_router), count(&net, is_dns)), (1, 1));
    let mut peers_only = base.clone();
    peers_only.wireguard.as_mut().unwrap().peers[0].name = "x".into();
    net.input(0, Input::Reconfig(Box::new(peers_only))).unwrap();
    assert_eq!((count(&net, is_router), count(&net, is_dns)), (1, 1));
    let mut dns = base.clone();
    dns.dns.as_mut().unwrap().search_domains.clear();
    net.input(0, Input::Reconfig(Box::new(dns))).unwrap();
    assert_eq!((count(&net, is_router), count(&net, is_dns)), (1, 2));
}

#[test]
fn invalid_reconfigs_are_typed_errors_and_keep_the_running_state() {
    let mut net = Net::new(3, Duration::from_millis(5), |_, _| {});
    let good = net.reconfig_for(
        0,
        Knobs {
            keep_full_wg_config: true,
            ..Knobs::default()
        },
    );
    net.input(0, Input::Reconfig(Box::new(good.clone())))
        .unwrap();
    let configured = net.nodes[0].engine.configured_peers();
    let key1 = net.key(1);

    let mut missing = good.clone();
    missing.dns = None;
    let mut missing_router = good.clone();
    missing_router.router = None;
    let mut duplicate = good.clone();
    let p = duplicate.wireguard.as_ref().unwrap().peers[0].clone();
    duplicate.wireguard.as_mut().unwrap().peers.push(p);
    let mut overlap = good.clone();
    let ip1 = IpNet::from(net.nodes[1].ip4);
    overlap.wireguard.as_mut().unwrap().peers[1]
        .allowed_ips
        .push(ip1);
    let mut family = good.clone();
    family
        .router
        .as_mut()
        .unwrap()
        .local_addrs
        .retain(|a| a.addr().is_ipv4());
    let mut selfpeer = good.clone();
    selfpeer.wireguard.as_mut().unwrap().peers[0].public_key = net.key(0);
    let mut mtu = good.clone();
    mtu.router.as_mut().unwrap().mtu = 100;

    type Check = fn(&ReconfigError) -> bool;
    let cases: Vec<(Reconfig, Check)> = vec![
        (missing, |e| matches!(e, ReconfigError::MissingPart("dns"))),
        (missing_router, |e| {
            matches!(e, ReconfigError::MissingPart("router"))
        }),
        (duplicate, |e| matches!(e, ReconfigError::DuplicatePeer(_))),
        (overlap, |e| {
            matches!(e, ReconfigError::OverlappingAllowedIp { .. })
        }),
        (family, |e| {
            matches!(e, ReconfigError::WrongFamily { family: "IPv6", .. })
        }),
        (selfpeer, |e| matches!(e, ReconfigError::SelfAsPeer(_))),
        (mtu, |e| matches!(e, ReconfigError::BadMtu(100))),
    ];
    for (bad, check) in cases {
        match net.input(0, Input::Reconfig(Box::new(bad))) {
            Err(InputError::Reconfig(e)) => assert!(check(&e), "unexpected error {e}"),
            other => panic!("accepted a bad config: {other:?}"),
        }
        assert_eq!(
            net.nodes[0].engine.configured_peers(),
            configured,
            "previous state kept"
        );
    }
    assert_eq!(net.nodes[0].engine.counters().reconfigs_refused, 7);
    // Traffic still flows on the previous state.
    let ip1 = net.nodes[1].ip4;
    net.input(
        1,
        Input::Reconfig(Box::new(net.reconfig_for(1, Knobs::default()))),
    )
    .unwrap();
    net.send_udp(0, ip1, b"still works");
    net.run_for(Duration::from_secs(1));
    assert_eq!(net.delivered(1, b"still works").len(), 1);
    assert!(net.nodes[0].engine.is_peer_configured(&key1).unwrap());
}

#[test]
fn peer_delta_changes_one_peer_without_touching_the_rest() {
    let mut net = Net::new(3, Duration::from_millis(5), |_, _| {});
    net.configure_all(Knobs {
        keep_full_wg_config: true,
        ..Knobs::default()
    });
    let now = net.now;
    let mut p = net.peer_config(1);
    p.allowed_ips.push("10.7.0.0/16".parse().unwrap());
    let changed = net.nodes[0]
        .engine
        .apply_peer_delta(
            now,
            &PeerDelta {
                upsert: vec![p],
                remove: vec![],
            },
        )
        .unwrap();
    assert_eq!(changed, 1);
    assert_eq!(
        net.nodes[0].engine.peer_for_ip("10.7.1.1".parse().unwrap()),
        Ok(net.key(1))
    );
    // A delta that steals another peer's address is refused.
    let mut thief = net.peer_config(2);
    thief.allowed_ips.push(IpNet::from(net.nodes[1].ip4));
    let err = net.nodes[0].engine.apply_peer_delta(
        now,
        &PeerDelta {
            upsert: vec![thief],
            remove: vec![],
        },
    );
    assert!(matches!(
        err,
        Err(ReconfigError::OverlappingAllowedIp { .. })
    ));
    let key2 = net.key(2);
    net.nodes[0]
        .engine
        .apply_peer_delta(
            now,
            &PeerDelta {
                upsert: vec![],
                remove: vec![key2],
            },
        )
        .unwrap();
    assert_eq!(net.nodes[0].engine.peer_count(), 1);
}

#[test]
fn link_changes_emit_the_reference_effects() {
    let mut net = Net::new(2, Duration::from_millis(5), |_, _| {});
    net.configure_all(Knobs::default());
    net.nodes[0].effects.clear();
    net.input(
        0,
        Input::LinkChange(LinkChange {
            any_link_up: true,
            major: true,
        }),
    )
    .unwrap();
    let effects: Vec<Effect> = net.nodes[0].effects.drain(..).map(|(_, e)| e).collect();
    assert_eq!(effects[0], Effect::SetNetworkUp(true));
    assert!(effects.contains(&Effect::FlushDnsCaches));
    assert!(effects.iter().any(|e| matches!(e, Effect::ApplyDns(_))));
    assert!(effects.contains(&Effect::Rebind));
    assert!(effects.contains(&Effect::ReDiscoverEndpoints {
        reason: "link-change-major"
    }));
    net.input(
        0,
        Input::LinkChange(LinkChange {
            any_link_up: true,
            major: false,
        }),
    )
    .unwrap();
    let effects: Vec<Effect> = net.nodes[0].effects.drain(..).map(|(_, e)| e).collect();
    assert_eq!(
        effects,
        vec![
            Effect::SetNetworkUp(true),
            Effect::ReDiscoverEndpoints {
                reason: "link-change-minor"
            }
        ]
    );
    net.input(
        0,
        Input::LinkChange(LinkChange {
            any_link_up: false,
            major: true,
        }),
    )
    .unwrap();
    let effects: Vec<Effect> = net.nodes[0].effects.drain(..).map(|(_, e)| e).collect();
    assert_eq!(effects, vec![Effect::SetNetworkUp(false)]);
    let c = net.nodes[0].engine.counters();
    assert_eq!(
        (
            c.link_changes_major,
            c.link_changes_minor,
            c.link_changes_down
        ),
        (1, 1, 1)
    );
}

#[test]
fn subnet_router_state_drives_bird() {
    let mut net = Net::new(2, Duration::from_millis(5), |_, _| {});
    let mut rc = net.reconfig_for(
        0,
        Knobs {
            bird_protocol: Some("tailnet".into()),
            ..Knobs::default()
        },
    );
    rc.router.as_mut().unwrap().advertised_routes = vec!["10.5.0.0/16".parse().unwrap()];
    net.input(0, Input::Reconfig(Box::new(rc.clone()))).unwrap();
    let bird = |net: &Net| {
        net.nodes[0]
            .effects
            .iter()
            .filter_map(|(_, e)| match e {
                Effect::SetBirdProtocol { enabled, .. } => Some(*enabled),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(bird(&net), vec![false]);
    rc.primary_routes = vec!["10.5.0.0/16".parse().unwrap()];
    net.input(0, Input::Reconfig(Box::new(rc.clone()))).unwrap();
    assert_eq!(bird(&net), vec![false, true]);
    net.input(0, Input::Reconfig(Box::new(rc.clone()))).unwrap();
    assert_eq!(
        bird(&net),
        vec![false, true],
        "no repeat when nothing changed"
    );
}

#[test]
fn fake_mode_answers_icmp_echo_itself() {
    let mut net = Net::new(2, Duration::from_millis(5), |_, _| {});
    net.configure_all(Knobs {
        fake_icmp_echo: true,
        ..Knobs::default()
    });
    let mut req = Vec::new();
    let (src, dst) = (net.nodes[0].ip4, net.nodes[1].ip4);
    wire::icmp::emit_echo(
        src,
        dst,
        wire::icmp::EchoKind::Request,
        1,
        2,
        b"abc",
        &mut req,
    )
    .unwrap();
    net.input(0, Input::TunPacket(&req)).unwrap();
    let (_, reply) = net.nodes[0].tun_out.last().unwrap().clone();
    let header = wire::ip::IpHeader::parse(&reply).unwrap();
    assert_eq!((header.src, header.dst), (dst, src));
    let echo = wire::icmp::parse_echo(&header, &reply).unwrap();
    assert_eq!(
        (echo.kind, echo.ident, echo.seq, echo.payload),
        (wire::icmp::EchoKind::Reply, 1, 2, &b"abc"[..])
    );
    assert!(net.nodes[0].sent.is_empty(), "nothing went to the network");
}

#[test]
fn packet_filter_drops_and_counts() {
    let mut net = Net::new(2, Duration::from_millis(5), |_, _| {});
    net.configure_all(Knobs::default());
    let filter = filter::PacketFilter {
        rules: vec![filter::FilterRule {
            src: "0.0.0.0/0".parse().unwrap(),
            dst: "0.0.0.0/0".parse().unwrap(),
            protocol: Some(wire::ip::PROTO_UDP),
            dst_ports: Some((6000, 6000)),
            action: filter::FilterAction::Drop,
        }],
        default_action: filter::FilterAction::Accept,
    };
    net.input(1, Input::SetPacketFilter(filter)).unwrap();
    let ip1 = net.nodes[1].ip4;
    net.send_udp(0, ip1, b"blocked");
    net.run_for(Duration::from_secs(1));
    assert!(net.delivered(1, b"blocked").is_empty());
    assert_eq!(net.nodes[1].engine.counters().drop_filtered, 1);
}

#[test]
fn close_is_ordered_and_idempotent() {
    let mut net = Net::new(2, Duration::from_millis(5), |_, _| {});
    net.configure_all(Knobs {
        keep_full_wg_config: true,
        ..Knobs::default()
    });
    net.cut.insert((0, 1));
    let ip1 = net.nodes[1].ip4;
    net.ping(0, ip1, PingKind::Tsmp, 5);
    net.nodes[0].effects.clear();
    net.nodes[0].events.clear();
    net.input(0, Input::Close).unwrap();
    assert_eq!(net.nodes[0].pings.len(), 1, "the pending ping ended");
    assert!(matches!(
        net.nodes[0].events[0].1,
        Event::PeerRemoved {
            reason: RemoveReason::Closed,
            ..
        }
    ));
    assert_eq!(
        net.nodes[0].effects[0].1,
        Effect::ApplyRouter(RouterConfig::default())
    );
    assert_eq!(
        net.nodes[0].effects[1].1,
        Effect::ApplyDns(DnsConfig::default())
    );
    let outputs = (net.nodes[0].events.len(), net.nodes[0].effects.len());
    net.input(0, Input::Close).unwrap();
    assert_eq!(
        (net.nodes[0].events.len(), net.nodes[0].effects.len()),
        outputs,
        "second close does nothing"
    );
    assert_eq!(net.input(0, Input::StatusRequest), Err(InputError::Closed));
    net.run_for(Duration::from_secs(20));
    assert_eq!(net.nodes[0].pings.len(), 1, "no second ending after close");
}

#[test]
fn same_length_reconfigs_take_the_positional_path_correctly() {
    let mut net = Net::new(4, Duration::from_millis(5), |_, _| {});
    let knobs = Knobs {
        keep_full_wg_config: true,
        ..Knobs::default()
    };
    net.configure_all(knobs.clone());
    let mut rc = net.reconfig_for(0, knobs.clone());
    // Reordered peers are the same config.
    rc.wireguard.as_mut().unwrap().peers.swap(0, 2);
    assert_eq!(
        net.input(0, Input::Reconfig(Box::new(rc.clone()))).unwrap(),
        InputOutcome::Reconfig(ReconfigOutcome::NoChanges)
    );
    // Two peers swap an address: valid, because both change at once.
    let peers = &mut rc.wireguard.as_mut().unwrap().peers;
    let (a, b) = (peers[0].allowed_ips[0], peers[1].allowed_ips[0]);
    peers[0].allowed_ips[0] = b;
    peers[1].allowed_ips[0] = a;
    let (ka, kb) = (peers[0].public_key, peers[1].public_key);
    net.input(0, Input::Reconfig(Box::new(rc.clone()))).unwrap();
    assert_eq!(net.nodes[0].engine.peer_for_ip(a.addr()), Ok(kb));
    assert_eq!(net.nodes[0].engine.peer_for_ip(b.addr()), Ok(ka));
    // A key listed twice at a changed position is still a duplicate.
    let mut dup = rc.clone();
    let k = dup.wireguard.as_ref().unwrap().peers[2].public_key;
    dup.wireguard.as_mut().unwrap().peers[0].public_key = k;
    assert!(matches!(
        net.input(0, Input::Reconfig(Box::new(dup))),
        Err(InputError::Reconfig(ReconfigError::DuplicatePeer(_)))
    ));
    assert_eq!(net.nodes[0].engine.peer_count(), 3, "state kept");
}

#[test]
fn duplicate_disco_keys_are_refused_on_both_paths() {
    let mut net = Net::new(3, Duration::from_millis(5), |_, _| {});
    let knobs = Knobs::default();
    net.configure_all(knobs.clone());
    let mut rc = net.reconfig_for(0, knobs);
    let d = rc.wireguard.as_ref().unwrap().peers[0].disco_key;
    rc.wireguard.as_mut().unwrap().peers[1].disco_key = d;
    // Same length: the positional path.
    assert!(matches!(
        net.input(0, Input::Reconfig(Box::new(rc.clone()))),
        Err(InputError::Reconfig(ReconfigError::DuplicateDiscoKey(_)))
    ));
    // Different length: the full path.
    rc.wireguard
        .as_mut()
        .unwrap()
        .peers
        .push(PeerConfig::new(NodePublicKey([5; 32]), vec![]));
    assert!(matches!(
        net.input(0, Input::Reconfig(Box::new(rc))),
        Err(InputError::Reconfig(ReconfigError::DuplicateDiscoKey(_)))
    ));
}

/// A peer delta is an input like any other: answered through
/// `handle_input`, refused after close, and `apply_peer_delta` reports the
/// same through the same path.
#[test]
fn peer_delta_is_an_input_and_is_refused_after_close() {
    let mut net = Net::new(3, Duration::from_millis(5), |_, _| {});
    net.configure_all(Knobs::default());
    let remove_two = PeerDelta {
        upsert: vec![],
        remove: vec![net.key(2)],
    };
    match net.input(0, Input::PeerDelta(&remove_two)) {
        Ok(InputOutcome::Reconfig(ReconfigOutcome::Applied(changes))) => {
            assert_eq!(changes.peers_changed, 1);
            assert!(changes.wireguard);
            assert!(!changes.router && !changes.dns, "only peers changed");
        }
        other => panic!("unexpected outcome {other:?}"),
    }
    assert_eq!(
        net.input(0, Input::PeerDelta(&remove_two)),
        Ok(InputOutcome::Reconfig(ReconfigOutcome::NoChanges)),
        "removing a peer that is gone changes nothing"
    );
    assert_eq!(net.nodes[0].engine.full_config_peers(), vec![net.key(1)]);

    let add_two = PeerDelta {
        upsert: vec![net.peer_config(2)],
        remove: vec![],
    };
    let now = net.now;
    assert_eq!(net.nodes[0].engine.apply_peer_delta(now, &add_two), Ok(1));
    assert_eq!(net.nodes[0].engine.peer_count(), 2);

    net.input(0, Input::Close).unwrap();
    assert_eq!(
        net.input(0, Input::PeerDelta(&remove_two)),
        Err(InputError::Closed)
    );
    assert_eq!(
        net.nodes[0].engine.apply_peer_delta(now, &remove_two),
        Err(ReconfigError::EngineClosed)
    );
    assert_eq!(
        net.nodes[0].engine.peer_count(),
        2,
        "a closed engine keeps its state"
    );
}
