use std::net::SocketAddr;
use std::time::Instant;

use proptest::prelude::*;
use wgmesh_control::{DiscoKey, DnsConfig as ControlDns, NodeKey, PeerChange, SelfNode};
use wgmesh_core::{DiscoPrivateKey, Engine, EngineConfig, NodePrivateKey, wire};

use super::*;

const DOMAIN: &str = "example.ts.net";

/// The node's own private key in these tests; its public key is the netmap's
/// self key.
fn own_private() -> NodePrivateKey {
    NodePrivateKey::from_bytes([0xee; 32])
}

fn peer(byte: u8) -> Peer {
    Peer {
        node_key: NodeKey(NodePrivateKey::from_bytes([byte; 32]).public_key().0),
        disco_key: Some(DiscoKey([byte; 32])),
        name: format!("n{byte}.{DOMAIN}"),
        allowed_ips: vec![format!("100.64.0.{byte}/32").parse().unwrap()],
        endpoints: vec![SocketAddr::from(([10, 0, 0, byte], 41641))],
        online: true,
        tags: vec![],
        relay: None,
    }
}

fn netmap(mut peers: Vec<Peer>) -> Netmap {
    peers.sort_by_key(|p| p.node_key);
    Netmap {
        self_node: SelfNode {
            node_key: NodeKey(own_private().public_key().0),
            name: format!("me.{DOMAIN}"),
            addresses: vec![
                "100.64.0.200/32".parse().unwrap(),
                "fd7a:115c:a1e0::c8/128".parse().unwrap(),
            ],
            advertised_routes: vec![],
            primary_routes: vec![],
            tags: vec![],
            key_expiry: None,
        },
        peers,
        packet_filter: vec![wgmesh_control::FilterRule {
            src: "100.64.0.0/10".parse().unwrap(),
            dst: "100.64.0.200/32".parse().unwrap(),
            protocol: Some(wire::ip::PROTO_TCP),
            dst_ports: Some((22, 22)),
        }],
        dns: ControlDns {
            domain: DOMAIN.into(),
            nameservers: vec!["100.100.100.100".parse().unwrap()],
            search_domains: vec![DOMAIN.into()],
        },
        nat: Default::default(),
    }
}

fn local() -> LocalSettings {
    LocalSettings {
        listen_port: 41641,
        mtu: 1280,
        knobs: Knobs::default(),
        magicdns: true,
    }
}

#[test]
fn without_magicdns_the_system_is_not_pointed_at_it() {
    let map = netmap(vec![peer(1)]);
    let with = reconfig_from_netmap(&map, &local());
    assert_eq!(with.dns.unwrap().nameservers.len(), 1);
    let without = reconfig_from_netmap(
        &map,
        &LocalSettings {
            magicdns: false,
            ..local()
        },
    );
    assert!(without.dns.unwrap().nameservers.is_empty());
}

fn engine() -> Engine {
    let config = EngineConfig::new(own_private(), DiscoPrivateKey::from_bytes([7; 32]));
    #[allow(clippy::disallowed_methods)]
    Engine::new(config, Instant::now(), 1)
}

#[test]
fn host_labels_strip_the_tailnet_domain_only() {
    assert_eq!(host_label("laptop.example.ts.net", DOMAIN), "laptop");
    assert_eq!(
        host_label("laptop.example.ts.net.", "example.ts.net."),
        "laptop"
    );
    assert_eq!(host_label("laptop.other.net", DOMAIN), "laptop.other.net");
    assert_eq!(host_label("xexample.ts.net", DOMAIN), "xexample.ts.net");
    assert_eq!(host_label("laptop", ""), "laptop");
}

#[test]
fn a_netmap_becomes_a_reconfig_the_engine_accepts() {
    let map = netmap(vec![peer(1), peer(2)]);
    let reconfig = reconfig_from_netmap(&map, &local());
    let valid = reconfig.validate(&own_private().public_key()).unwrap();
    assert_eq!(valid.wireguard.listen_port, 41641);
    assert_eq!(valid.router.mtu, 1280);
    assert_eq!(valid.router.local_addrs.len(), 2);
    let routes: Vec<String> = valid.router.routes.iter().map(|r| r.to_string()).collect();
    assert_eq!(routes, vec!["100.64.0.0/10", "fd7a:115c:a1e0::/48"]);
    assert_eq!(valid.dns.search_domains, vec![DOMAIN.to_string()]);
    let names: Vec<&str> = valid
        .wireguard
        .peers
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    let mut expected: Vec<String> = map
        .peers
        .iter()
        .map(|p| host_label(&p.name, DOMAIN))
        .collect();
    expected.sort();
    let mut got: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    got.sort();
    assert_eq!(got, expected);
    let first = &valid.wireguard.peers[0];
    let source = map.peer(&NodeKey(first.public_key.0)).unwrap();
    assert_eq!(first.disco_key.map(|k| k.0), source.disco_key.map(|k| k.0));
    assert_eq!(first.endpoints, source.endpoints);
    assert_eq!(
        dns_names(&map),
        DnsNames {
            domain: DOMAIN.into(),
            hostname: "me".into()
        }
    );
    let mut engine = engine();
    #[allow(clippy::disallowed_methods)]
    let now = Instant::now();
    let _ = engine.reconfig(now, &reconfig).unwrap();
    assert_eq!(engine.peer_count(), 2);
}

#[test]
fn a_node_without_ipv6_gets_no_ipv6_route() {
    let mut map = netmap(vec![peer(1)]);
    map.self_node.addresses.truncate(1);
    let reconfig = reconfig_from_netmap(&map, &local());
    let valid = reconfig.validate(&own_private().public_key()).unwrap();
    let routes: Vec<String> = valid.router.routes.iter().map(|r| r.to_string()).collect();
    assert_eq!(routes, vec!["100.64.0.0/10"]);
}

#[test]
fn the_policy_filter_accepts_its_rules_and_drops_the_rest() {
    let filter = packet_filter(&netmap(vec![]).packet_filter);
    assert_eq!(filter.default_action, FilterAction::Drop);
    let syn = |port: u16| {
        let mut p = Vec::new();
        wire::tcp::emit_segment(
            "100.64.0.1:40000".parse().unwrap(),
            SocketAddr::new("100.64.0.200".parse().unwrap(), port),
            1,
            0,
            wire::tcp::FLAG_SYN,
            &[],
            &mut p,
        )
        .unwrap();
        p
    };
    for (port, want) in [(22, FilterAction::Accept), (23, FilterAction::Drop)] {
        let p = syn(port);
        let header = wire::ip::IpHeader::parse(&p).unwrap();
        assert_eq!(filter.check(&header, &p), want, "port {port}");
    }
}

#[test]
fn a_restarted_peer_is_one_upsert_with_its_new_disco_key() {
    let mut map = netmap(vec![peer(1), peer(2), peer(3)]);
    let reconfig = reconfig_from_netmap(&map, &local());
    let mut engine = engine();
    #[allow(clippy::disallowed_methods)]
    let now = Instant::now();
    let _ = engine.reconfig(now, &reconfig).unwrap();

    let restarted = peer(2).node_key;
    let delta = NetmapDelta {
        peers_changed: vec![PeerChange {
            disco_key: Some(DiscoKey([0x42; 32])),
            endpoints: Some(vec!["10.0.0.2:50000".parse().unwrap()]),
            ..PeerChange::new(restarted)
        }],
        ..NetmapDelta::default()
    };
    let plan = apply_delta(&mut map, &delta, &local()).unwrap();
    assert!(plan.filter.is_none());
    assert!(!plan.dns_changed, "disco key and endpoints name no one");
    let PeerPlan::Delta(peer_delta) = plan.peers else {
        panic!("expected a peer delta, got {:?}", plan.peers);
    };
    assert!(peer_delta.remove.is_empty());
    assert_eq!(peer_delta.upsert.len(), 1);
    assert_eq!(peer_delta.upsert[0].public_key.0, restarted.0);
    assert_eq!(
        peer_delta.upsert[0].disco_key,
        Some(DiscoPublicKey([0x42; 32]))
    );
    assert_eq!(engine.apply_peer_delta(now, &peer_delta).unwrap(), 1);
}

#[test]
fn new_filters_names_and_subnet_routes_are_planned_as_such() {
    let mut map = netmap(vec![peer(1)]);
    // A new filter alone.
    let delta = NetmapDelta {
        packet_filter: Some(vec![]),
        ..NetmapDelta::default()
    };
    let plan = apply_delta(&mut map, &delta, &local()).unwrap();
    assert_eq!(plan.peers, PeerPlan::Unchanged);
    assert_eq!(plan.filter.unwrap().rules.len(), 0);

    // A peer added: an upsert and new names.
    let delta = NetmapDelta {
        peers_added: vec![peer(5)],
        ..NetmapDelta::default()
    };
    let plan = apply_delta(&mut map, &delta, &local()).unwrap();
    assert!(plan.dns_changed);
    assert!(matches!(plan.peers, PeerPlan::Delta(ref d) if d.upsert.len() == 1));

    // A subnet router: the routes change, so a full reconfig.
    let mut router = peer(6);
    router.allowed_ips.push("10.9.0.0/16".parse().unwrap());
    let delta = NetmapDelta {
        peers_added: vec![router.clone()],
        ..NetmapDelta::default()
    };
    let plan = apply_delta(&mut map, &delta, &local()).unwrap();
    let PeerPlan::Full(full) = plan.peers else {
        panic!("expected a full reconfig");
    };
    assert!(
        full.router
            .unwrap()
            .routes
            .contains(&"10.9.0.0/16".parse().unwrap())
    );
    // ... and its removal too, so the route goes.
    let delta = NetmapDelta {
        peers_removed: vec![router.node_key],
        ..NetmapDelta::default()
    };
    let plan = apply_delta(&mut map, &delta, &local()).unwrap();
    let PeerPlan::Full(full) = plan.peers else {
        panic!("expected a full reconfig");
    };
    assert!(
        !full
            .router
            .unwrap()
            .routes
            .contains(&"10.9.0.0/16".parse().unwrap())
    );
}

#[test]
fn a_delta_out_of_step_is_refused_and_changes_nothing() {
    let mut map = netmap(vec![peer(1)]);
    let before = map.clone();
    let delta = NetmapDelta {
        peers_removed: vec![peer(9).node_key],
        ..NetmapDelta::default()
    };
    assert!(apply_delta(&mut map, &delta, &local()).is_err());
    assert_eq!(map, before);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Applying the planned peer deltas to the recorded reconfig, one after
    /// another, gives the same reconfig as rebuilding it from the netmap:
    /// the daemon's record never drifts from what control says.
    #[test]
    fn incremental_deltas_match_a_rebuild(
        ops in proptest::collection::vec((0u8..3, 1u8..12, any::<u8>()), 1..30),
    ) {
        let mut map = netmap(vec![peer(1), peer(2)]);
        let mut recorded = reconfig_from_netmap(&map, &local());
        for (op, byte, salt) in ops {
            let key = peer(byte).node_key;
            let present = map.peer(&key).is_some();
            let delta = match (op, present) {
                (0, false) => NetmapDelta { peers_added: vec![peer(byte)], ..NetmapDelta::default() },
                (1, true) => NetmapDelta { peers_removed: vec![key], ..NetmapDelta::default() },
                (_, true) => NetmapDelta {
                    peers_changed: vec![PeerChange {
                        disco_key: Some(DiscoKey([salt; 32])),
                        name: (salt % 2 == 0).then(|| format!("renamed{salt}.{DOMAIN}")),
                        ..PeerChange::new(key)
                    }],
                    ..NetmapDelta::default()
                },
                (_, false) => continue,
            };
            let plan = apply_delta(&mut map, &delta, &local()).unwrap();
            match plan.peers {
                PeerPlan::Unchanged => {}
                PeerPlan::Delta(d) => apply_peer_delta_to_reconfig(&mut recorded, &d),
                PeerPlan::Full(full) => recorded = *full,
            }
            prop_assert_eq!(&recorded, &reconfig_from_netmap(&map, &local()));
        }
    }
}

#[test]
fn control_nat_settings_become_the_engines_and_the_sockets() {
    let relayed = SocketAddr::from(([198, 51, 100, 1], 49170));
    let mut with_relay = peer(2);
    with_relay.relay = Some(relayed);
    let mut map = netmap(vec![peer(1), with_relay]);
    map.nat = NatMap {
        stun_servers: vec![SocketAddr::from(([198, 51, 100, 1], 3478))],
        relay: Some(wgmesh_control::RelayCredentials {
            server: SocketAddr::from(([198, 51, 100, 1], 3478)),
            username: "1700003600:me".into(),
            password: "pw".into(),
            expires: wgmesh_control::Timestamp::from_unix_secs(1_700_003_600),
        }),
    };
    let nat = nat_config(&map);
    assert_eq!(nat.stun_servers, map.nat.stun_servers);
    assert_eq!(
        nat.peer_relays,
        vec![PeerRelay {
            peer: node_public_key(&peer(2).node_key),
            addr: relayed,
        }]
    );
    // The engine takes them as they are.
    let mut engine = engine();
    #[allow(clippy::disallowed_methods)]
    let now = Instant::now();
    let _outcome = engine
        .reconfig(now, &reconfig_from_netmap(&map, &LocalSettings::default()))
        .unwrap();
    engine
        .handle_input(now, wgmesh_core::Input::SetNat(nat))
        .unwrap();

    let before = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let settings = relay_settings(&map.nat, before).expect("valid credentials");
    assert_eq!(settings.server, SocketAddr::from(([198, 51, 100, 1], 3478)));
    match settings.credentials {
        RelayCredentialSource::Issued {
            username, expires, ..
        } => {
            assert_eq!(username, "1700003600:me");
            assert_eq!(expires, UNIX_EPOCH + Duration::from_secs(1_700_003_600));
        }
        RelayCredentialSource::SharedSecret { .. } => panic!("control's credentials are issued"),
    }
    // Expired ones (a cached netmap's) are not used; no relay, no settings.
    let after = UNIX_EPOCH + Duration::from_secs(1_700_003_600);
    assert!(relay_settings(&map.nat, after).is_none());
    assert!(relay_settings(&NatMap::default(), before).is_none());
}

#[test]
fn only_deltas_that_name_relays_or_nat_settings_touch_the_nat_config() {
    let mut change = PeerChange::new(peer(1).node_key);
    change.online = Some(false);
    let quiet = NetmapDelta {
        peers_changed: vec![change.clone()],
        ..NetmapDelta::default()
    };
    assert!(!delta_touches_nat(&quiet));
    change.relay = Some(None);
    let relay_gone = NetmapDelta {
        peers_changed: vec![change],
        ..NetmapDelta::default()
    };
    assert!(delta_touches_nat(&relay_gone));
    let new_nat = NetmapDelta {
        nat: Some(NatMap::default()),
        ..NetmapDelta::default()
    };
    assert!(delta_touches_nat(&new_nat));
    let removed = NetmapDelta {
        peers_removed: vec![peer(1).node_key],
        ..NetmapDelta::default()
    };
    assert!(delta_touches_nat(&removed));
}
