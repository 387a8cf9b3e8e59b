//! Reconfig change detection and validation.

use std::net::IpAddr;
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
    // Every link went down: what the resolver cached is stale.
    assert_eq!(
        effects,
        vec![Effect::SetNetworkUp(false), Effect::FlushDnsCaches]
    );
    // Still down: nothing more to flush.
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
        (1, 1, 2)
    );
}

#[test]
fn health_reports_are_kept_with_their_first_time_until_cleared() {
    let mut net = Net::new(2, Duration::from_millis(5), |_, _| {});
    net.configure_all(Knobs::default());
    let status = |net: &mut Net| {
        net.input(0, Input::StatusRequest).unwrap();
        net.nodes[0].statuses.pop().expect("a status answer").1
    };
    assert!(status(&mut net).health.is_empty());
    assert_eq!(status(&mut net).health_severity(), None);

    let dns_failed = HealthReport::failed(
        HealthSubsystem::Dns,
        HealthSeverity::Error,
        "/etc/resolv.conf: Read-only file system",
    );
    net.input(0, Input::Health(dns_failed.clone())).unwrap();
    net.run_for(Duration::from_secs(3));
    // The same problem again keeps its first time.
    net.input(0, Input::Health(dns_failed.clone())).unwrap();
    net.input(
        0,
        Input::Health(HealthReport::failed(
            HealthSubsystem::Bird,
            HealthSeverity::Warning,
            "connection refused",
        )),
    )
    .unwrap();
    net.run_for(Duration::from_secs(2));
    let s = status(&mut net);
    assert_eq!(s.health_severity(), Some(HealthSeverity::Error));
    let found: Vec<(HealthSubsystem, HealthSeverity, u64)> = s
        .health
        .iter()
        .map(|h| (h.subsystem, h.problem.severity, h.since_ago.as_secs()))
        .collect();
    assert_eq!(
        found,
        vec![
            (HealthSubsystem::Dns, HealthSeverity::Error, 5),
            (HealthSubsystem::Bird, HealthSeverity::Warning, 2),
        ]
    );
    assert_eq!(
        s.health[0].problem.reason,
        "/etc/resolv.conf: Read-only file system"
    );
    assert_eq!(s.counters.health_problems_reported, 2);

    net.input(0, Input::Health(HealthReport::ok(HealthSubsystem::Dns)))
        .unwrap();
    let s = status(&mut net);
    assert_eq!(s.health.len(), 1);
    assert_eq!(s.health_severity(), Some(HealthSeverity::Warning));
    net.input(0, Input::Health(HealthReport::ok(HealthSubsystem::Bird)))
        .unwrap();
    assert!(status(&mut net).health.is_empty());
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

/// The ICMP echo requests (and replies) in `node`'s TUN writes with this ident.
fn echoes_in_tun(
    net: &Net,
    node: usize,
    ident: u16,
) -> Vec<(wire::icmp::EchoKind, IpAddr, IpAddr)> {
    net.nodes[node]
        .tun_out
        .iter()
        .filter_map(|(_, p)| {
            let header = wire::ip::IpHeader::parse(p).ok()?;
            let echo = wire::icmp::parse_echo(&header, p)?;
            (echo.ident == ident).then_some((echo.kind, header.src, header.dst))
        })
        .collect()
}

/// Fake mode (the reference's `RespondToPing`) answers echo requests that
/// arrive from peers through the tunnel and encrypts the reply back to them;
/// the request never reaches this node's TUN. The local OS's own pings to
/// peers go out through WireGuard untouched.
#[test]
fn fake_mode_answers_echo_requests_from_peers_and_sends_the_reply_back() {
    let mut net = Net::new(2, Duration::from_millis(5), |_, _| {});
    for i in 0..2 {
        let knobs = Knobs {
            fake_icmp_echo: i == 1,
            ..Knobs::default()
        };
        let rc = net.reconfig_for(i, knobs);
        net.input(i, Input::Reconfig(Box::new(rc))).unwrap();
    }
    for v6 in [false, true] {
        let (a, b) = if v6 {
            (net.nodes[0].ip6, net.nodes[1].ip6)
        } else {
            (net.nodes[0].ip4, net.nodes[1].ip4)
        };
        let ident = if v6 { 61 } else { 41 };
        // A's OS pings B's address; B is in fake mode.
        let mut request = Vec::new();
        wire::icmp::emit_echo(
            a,
            b,
            wire::icmp::EchoKind::Request,
            ident,
            2,
            b"abc",
            &mut request,
        )
        .unwrap();
        net.input(0, Input::TunPacket(&request)).unwrap();
        assert!(
            echoes_in_tun(&net, 0, ident).is_empty(),
            "A's engine does not answer its own OS's ping"
        );
        net.run_for(Duration::from_secs(1));
        assert_eq!(
            echoes_in_tun(&net, 0, ident),
            vec![(wire::icmp::EchoKind::Reply, b, a)],
            "v6={v6}: the reply came back to A through the tunnel"
        );
        assert!(
            echoes_in_tun(&net, 1, ident).is_empty(),
            "v6={v6}: B's TUN saw nothing of the ping"
        );
    }
    assert_eq!(net.nodes[1].engine.counters().fake_icmp_replies, 2);
    assert_eq!(net.nodes[0].engine.counters().fake_icmp_replies, 0);

    // B's OS pings A: B's engine does not answer it locally, the request
    // goes to A (not in fake mode), whose OS sees it.
    let (a, b) = (net.nodes[0].ip4, net.nodes[1].ip4);
    let mut request = Vec::new();
    wire::icmp::emit_echo(
        b,
        a,
        wire::icmp::EchoKind::Request,
        77,
        1,
        b"xyz",
        &mut request,
    )
    .unwrap();
    net.input(1, Input::TunPacket(&request)).unwrap();
    assert!(
        echoes_in_tun(&net, 1, 77).is_empty(),
        "no local answer at B"
    );
    net.run_for(Duration::from_secs(1));
    assert_eq!(
        echoes_in_tun(&net, 0, 77),
        vec![(wire::icmp::EchoKind::Request, b, a)]
    );
    assert!(echoes_in_tun(&net, 1, 77).is_empty());
    assert_eq!(net.nodes[1].engine.counters().fake_icmp_replies, 2);

    // The engine's own ICMP ping from A to B is answered by B's engine.
    net.ping(0, b, PingKind::Icmp, 9);
    net.run_for(Duration::from_secs(1));
    let (_, result) = net.nodes[0].pings.iter().find(|(_, r)| r.id == 9).unwrap();
    assert!(
        matches!(result.outcome, PingOutcome::Pong { .. }),
        "{:?}",
        result.outcome
    );
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

/// Disco datagrams `node` has sent so far (every datagram that is not WireGuard).
fn disco_sent(net: &Net, node: usize) -> usize {
    net.nodes[node].sent.len() - net.nodes[node].sent_wg.len()
}

/// While no link is up the engine sends no disco message (heartbeats, pings
/// or pongs), even to a peer with traffic; when a link comes back it pings
/// the active peers' candidates at once and heartbeats resume.
#[test]
fn no_disco_while_every_link_is_down_and_pings_resume_when_one_comes_back() {
    let mut net = Net::new(2, Duration::from_millis(10), |_, _| {});
    net.configure_all(Knobs {
        keep_full_wg_config: true,
        ..Knobs::default()
    });
    let ip1 = net.nodes[1].ip4;
    net.send_udp(0, ip1, b"start");
    net.run_for(Duration::from_secs(5));
    assert!(disco_sent(&net, 0) > 0, "disco runs while the link is up");
    net.input(
        0,
        Input::LinkChange(LinkChange {
            any_link_up: false,
            major: false,
        }),
    )
    .unwrap();
    let disco_before = disco_sent(&net, 0);
    let pings_before = net.nodes[0].engine.counters().disco_pings_sent;
    let pongs_before = net.nodes[0].engine.counters().disco_pongs_sent;
    // A minute of virtual time with the peer active both ways (node 1's
    // link is up: its own disco pings keep arriving).
    for i in 0..30u32 {
        net.send_udp(0, ip1, format!("down-{i}").as_bytes());
        net.send_udp(1, net.nodes[0].ip4, format!("back-{i}").as_bytes());
        net.run_for(Duration::from_secs(2));
    }
    assert_eq!(
        disco_sent(&net, 0),
        disco_before,
        "no disco datagram left while every link was down"
    );
    let c = net.nodes[0].engine.counters();
    assert_eq!(
        (c.disco_pings_sent, c.disco_pongs_sent),
        (pings_before, pongs_before)
    );
    assert!(
        !net.delivered(1, b"down-29").is_empty(),
        "WireGuard traffic itself is not paused"
    );
    net.input(
        0,
        Input::LinkChange(LinkChange {
            any_link_up: true,
            major: false,
        }),
    )
    .unwrap();
    assert!(
        disco_sent(&net, 0) > disco_before,
        "the active peer's candidates are pinged when the link comes back"
    );
    let resumed = disco_sent(&net, 0);
    for i in 0..5u32 {
        net.send_udp(0, ip1, format!("up-{i}").as_bytes());
        net.run_for(Duration::from_secs(2));
    }
    assert!(
        disco_sent(&net, 0) > resumed,
        "heartbeats resume after the link is back"
    );
}
/// Every `PeerRemoved` and `PeerConfigured` event `node` reported since `from`.
fn peer_churn(net: &Net, node: usize, from: usize) -> Vec<Event> {
    net.nodes[node].events[from..]
        .iter()
        .map(|(_, e)| e.clone())
        .filter(|e| matches!(e, Event::PeerRemoved { .. } | Event::PeerConfigured { .. }))
        .collect()
}

/// Keepalives (32-byte WireGuard datagrams) `node` sent in `[from, to)`.
fn keepalives_between(
    net: &Net,
    node: usize,
    from: std::time::Instant,
    to: std::time::Instant,
) -> usize {
    net.nodes[node]
        .sent
        .iter()
        .filter(|(t, _, len)| *len == 32 && *t >= from && *t < to)
        .count()
}

/// wireguard-go changes a peer's persistent keepalive in place: the session
/// survives (no removal, no new handshake), turning it on sends a keepalive
/// at once, and the new interval is what the session follows.
#[test]
fn persistent_keepalive_change_keeps_the_session_and_takes_effect() {
    let mut net = Net::new(2, Duration::from_millis(10), |_, _| {});
    let knobs = Knobs {
        keep_full_wg_config: true,
        ..Knobs::default()
    };
    net.configure_all(knobs.clone());
    let (ip0, ip1) = (net.nodes[0].ip4, net.nodes[1].ip4);
    net.send_udp(0, ip1, b"before");
    net.run_for(Duration::from_secs(1));
    assert_eq!(net.delivered(1, b"before").len(), 1);
    let events_from = net.nodes[0].events.len();
    let initiations = |net: &Net| {
        (0..2)
            .map(|i| net.nodes[i].engine.counters().handshake_initiations_sent)
            .sum::<u64>()
    };
    let initiations_before = initiations(&net);

    net.nodes[1].persistent_keepalive_secs = Some(5);
    let rc = net.reconfig_for(0, knobs.clone());
    let changed_at = net.now;
    net.input(0, Input::Reconfig(Box::new(rc))).unwrap();
    assert_eq!(peer_churn(&net, 0, events_from), vec![]);
    assert_eq!(
        keepalives_between(&net, 0, changed_at, changed_at + Duration::from_millis(1)),
        1,
        "turning the keepalive on sends one at once"
    );
    net.run_for(Duration::from_secs(21));
    let kept = keepalives_between(&net, 0, changed_at, net.now);
    assert!(
        (5..=6).contains(&kept),
        "one at once and one every 5 s for 21 s, got {kept}"
    );
    net.send_udp(0, ip1, b"during");
    net.send_udp(1, ip0, b"reply");
    net.run_for(Duration::from_secs(1));
    assert_eq!(net.delivered(1, b"during").len(), 1);
    assert_eq!(net.delivered(0, b"reply").len(), 1);

    // Off again: no more persistent keepalives, still the same session.
    net.nodes[1].persistent_keepalive_secs = None;
    let rc = net.reconfig_for(0, knobs);
    net.input(0, Input::Reconfig(Box::new(rc))).unwrap();
    // Let the passive keepalive for "reply" go first.
    net.run_for(Duration::from_secs(11));
    let off_at = net.now;
    net.run_for(Duration::from_secs(30));
    assert_eq!(keepalives_between(&net, 0, off_at, net.now), 0);
    assert_eq!(peer_churn(&net, 0, events_from), vec![]);
    assert_eq!(initiations(&net), initiations_before, "no new handshake");
    assert_eq!(
        net.nodes[0].engine.counters().handshakes_completed,
        1,
        "the first session is still the one in use"
    );
}

/// wireguard-go changes a peer's preshared key in place: the live session
/// survives and the new key is used from the next handshake on. Node 0 gets
/// the key first: the session keeps carrying traffic, but the next handshake
/// (forced by a restart of node 1) only completes once node 1 has the same key.
#[test]
fn preshared_key_change_keeps_the_session_and_applies_to_the_next_handshake() {
    let mut net = Net::new(2, Duration::from_millis(10), |_, _| {});
    let knobs = Knobs {
        keep_full_wg_config: true,
        ..Knobs::default()
    };
    net.configure_all(knobs.clone());
    let (ip0, ip1) = (net.nodes[0].ip4, net.nodes[1].ip4);
    net.send_udp(0, ip1, b"before");
    net.run_for(Duration::from_secs(1));
    let events_from = net.nodes[0].events.len();
    let completed = |net: &Net, i: usize| net.nodes[i].engine.counters().handshakes_completed;
    assert_eq!(completed(&net, 0), 1);

    let psk = [5u8; 32];
    let mut rc = net.reconfig_for(0, knobs.clone());
    rc.wireguard.as_mut().unwrap().peers[0].preshared_key = Some(psk);
    net.input(0, Input::Reconfig(Box::new(rc))).unwrap();
    assert_eq!(peer_churn(&net, 0, events_from), vec![]);
    net.send_udp(0, ip1, b"same-session");
    net.send_udp(1, ip0, b"same-back");
    net.run_for(Duration::from_secs(1));
    assert_eq!(net.delivered(1, b"same-session").len(), 1);
    assert_eq!(net.delivered(0, b"same-back").len(), 1);
    assert_eq!(completed(&net, 0), 1, "no new handshake for a key change");

    // Node 1 restarts without a preshared key: its initiation is answered
    // with node 0's new key, so it cannot complete.
    net.restart(1, 77);
    let rc1 = net.reconfig_for(1, knobs.clone());
    net.input(1, Input::Reconfig(Box::new(rc1))).unwrap();
    net.send_udp(1, ip0, b"no-psk");
    net.run_for(Duration::from_secs(12));
    assert!(net.delivered(0, b"no-psk").is_empty(), "keys differ");
    assert_eq!(completed(&net, 1), 0);

    // With the same key on node 1 the next attempt completes.
    let mut rc1 = net.reconfig_for(1, knobs);
    rc1.wireguard.as_mut().unwrap().peers[0].preshared_key = Some(psk);
    net.input(1, Input::Reconfig(Box::new(rc1))).unwrap();
    net.send_udp(1, ip0, b"with-psk");
    net.run_for(Duration::from_secs(12));
    assert!(completed(&net, 1) >= 1);
    assert_eq!(net.delivered(0, b"with-psk").len(), 1);
}
