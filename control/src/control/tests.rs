//! Tests of the control state machine: one per behaviour, a snapshot of a
//! small tailnet, and a property test that deltas rebuild the full netmap.

use super::*;
use crate::netmap::AppliedDelta;
use proptest::prelude::*;

const T0: Timestamp = Timestamp(1_700_000_000_000);

fn node_key(i: u8) -> NodeKey {
    let mut bytes = [0u8; 32];
    bytes[0] = i;
    bytes[31] = 0x4b;
    NodeKey(bytes)
}

fn disco_key(i: u8, generation: u16) -> DiscoKey {
    let mut bytes = [0u8; 32];
    bytes[0] = i;
    bytes[1..3].copy_from_slice(&generation.to_le_bytes());
    bytes[31] = 0xd1;
    DiscoKey(bytes)
}

fn endpoint(i: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, i)), port)
}

fn prefix(text: &str) -> IpNet {
    text.parse().unwrap()
}

/// What one node holds: its stream, the next sequence number it expects,
/// and its netmap rebuilt from the messages it received.
#[derive(Debug)]
struct Received {
    stream: StreamId,
    next_seq: u64,
    netmap: Netmap,
}

/// A control and the nodes' view of their streams.
struct Net {
    control: Control,
    now: Timestamp,
    received: BTreeMap<NodeKey, Received>,
    /// Every message, as (node, JSON bytes).
    log: Vec<(NodeKey, usize, MapResponse)>,
    closes: Vec<(NodeKey, CloseReason)>,
    /// The store a server keeps from the persistence outputs.
    stored_nodes: BTreeMap<NodeKey, StoredNode>,
    stored_auth_keys: BTreeMap<u64, StoredAuthKey>,
}

impl Net {
    fn new(policy: Policy) -> Self {
        Self::with_config(ControlConfig::new("example.ts.net"), policy)
    }

    fn with_config(config: ControlConfig, policy: Policy) -> Self {
        Self {
            control: Control::new(config, policy, T0, 7),
            now: T0,
            received: BTreeMap::new(),
            log: Vec::new(),
            closes: Vec::new(),
            stored_nodes: BTreeMap::new(),
            stored_auth_keys: BTreeMap::new(),
        }
    }

    fn input(&mut self, input: Input) -> Result<InputOutcome, InputError> {
        let before = self.control.nodes();
        let result = self.control.handle_input(self.now, input);
        if result.is_err() {
            assert_eq!(
                self.control.nodes(),
                before,
                "a refused input changed state"
            );
            assert!(
                self.control.poll_output().is_none(),
                "a refused input sent something"
            );
        }
        self.drain();
        result
    }

    fn advance(&mut self, d: Duration) {
        self.now = self.now.saturating_add(d);
        self.control.handle_timeout(self.now);
        self.drain();
    }

    /// Delivers every output to the node it is for, checking sequence
    /// numbers and applying deltas.
    fn drain(&mut self) {
        while let Some(out) = self.control.poll_output() {
            match out {
                Output::Map {
                    node_key,
                    stream,
                    response,
                } => {
                    let bytes = response.to_json();
                    let decoded = MapResponse::from_json(&bytes).expect("own output decodes");
                    assert_eq!(decoded, response);
                    self.log.push((node_key, bytes.len(), response.clone()));
                    match response.body {
                        MapBody::Full(netmap) => {
                            assert_eq!(response.seq, 0, "a stream opens with seq 0");
                            self.received.insert(
                                node_key,
                                Received {
                                    stream,
                                    next_seq: 1,
                                    netmap: *netmap,
                                },
                            );
                        }
                        MapBody::Delta(delta) => {
                            let held = self
                                .received
                                .get_mut(&node_key)
                                .expect("a delta only after a full netmap");
                            assert_eq!(held.stream, stream);
                            assert_eq!(response.seq, held.next_seq, "no gap, no repeat");
                            held.next_seq += 1;
                            assert!(!delta.is_empty(), "empty deltas are not sent");
                            held.netmap.apply(&delta).expect("delta applies");
                        }
                    }
                }
                Output::StoreNode(stored) => {
                    self.stored_nodes.insert(stored.node_key, *stored);
                }
                Output::ForgetNode(node_key) => {
                    assert!(self.stored_nodes.remove(&node_key).is_some());
                }
                Output::StoreAuthKey(stored) => {
                    self.stored_auth_keys.insert(stored.id, *stored);
                }
                Output::CloseStream {
                    node_key,
                    stream,
                    reason,
                } => {
                    if self
                        .received
                        .get(&node_key)
                        .is_some_and(|r| r.stream == stream)
                    {
                        self.received.remove(&node_key);
                    }
                    self.closes.push((node_key, reason));
                }
            }
        }
    }

    /// Every online node's rebuilt netmap equals a fresh full one, and the
    /// store kept from the persistence outputs equals the durable state.
    fn check_consistent(&self) {
        let state = self.control.state();
        let nodes: BTreeMap<NodeKey, StoredNode> =
            state.nodes.into_iter().map(|n| (n.node_key, n)).collect();
        assert_eq!(self.stored_nodes, nodes, "the store missed a node change");
        let keys: BTreeMap<u64, StoredAuthKey> =
            state.auth_keys.into_iter().map(|k| (k.id, k)).collect();
        assert_eq!(
            self.stored_auth_keys, keys,
            "the store missed an auth key change"
        );
        for view in self.control.nodes() {
            if !view.online {
                continue;
            }
            let held = &self.received[&view.node_key];
            let fresh = self
                .control
                .netmap(&view.node_key)
                .expect("online node is live");
            assert_eq!(held.netmap, fresh, "node {:?} drifted", view.node_key);
        }
    }

    fn auth_key(&mut self, user: &str, reusable: bool, tags: &[&str]) -> String {
        match self.input(Input::Admin(AdminCommand::CreateAuthKey {
            user: user.into(),
            reusable,
            expiry: None,
            tags: tags.iter().map(|t| t.to_string()).collect(),
        })) {
            Ok(InputOutcome::AuthKeyCreated(created)) => created.key,
            other => panic!("auth key not created: {other:?}"),
        }
    }

    fn register(&mut self, i: u8, auth_key: &str, hostname: &str, routes: &[&str]) -> Registration {
        match self.input(Input::Register(RegisterRequest {
            node_key: node_key(i),
            auth_key: auth_key.into(),
            hostname: hostname.into(),
            advertised_routes: routes.iter().map(|r| prefix(r)).collect(),
            requested_ipv4: None,
        })) {
            Ok(InputOutcome::Registered(registration)) => registration,
            other => panic!("node {i} not registered: {other:?}"),
        }
    }

    fn poll(&mut self, i: u8, generation: u16) -> Result<InputOutcome, InputError> {
        self.input(Input::MapRequest(MapRequest {
            node_key: node_key(i),
            disco_key: disco_key(i, generation),
            endpoints: vec![endpoint(i, 41641 + generation)],
            relay: None,
        }))
    }

    fn messages_since(&self, start: usize) -> &[(NodeKey, usize, MapResponse)] {
        &self.log[start..]
    }
}

const POLICY: &str = r#"
[groups]
"group:eng" = ["alice@example.com"]

[[acls]]
action = "accept"
src = ["group:eng"]
dst = ["tag:server:22,443"]

[[acls]]
action = "accept"
src = ["tag:ci"]
dst = ["10.1.0.0/16:8000-8999"]
proto = "tcp"

[autoApprovers.routes]
"10.1.0.0/16" = ["tag:server"]
"#;

/// alice (1), bob (2), a tagged server advertising 10.1.0.0/16 (3) and a
/// CI runner (4), all online.
fn small_tailnet() -> Net {
    let mut net = Net::new(Policy::parse(POLICY, "acl.toml").unwrap());
    let alice = net.auth_key("alice@example.com", false, &[]);
    let bob = net.auth_key("bob@example.com", false, &[]);
    let server = net.auth_key("ops@example.com", true, &["tag:server"]);
    let ci = net.auth_key("ops@example.com", true, &["tag:ci"]);
    net.register(1, &alice, "Alice's Laptop", &[]);
    net.register(2, &bob, "bob-laptop.local", &[]);
    net.register(3, &server, "server", &["10.1.0.0/16"]);
    net.register(4, &ci, "ci", &[]);
    for i in 1..=4 {
        net.poll(i, 1).unwrap();
    }
    net.check_consistent();
    net
}

#[test]
fn registration_allocates_addresses_and_names_in_order() {
    let mut net = Net::new(Policy::allow_all());
    let key = net.auth_key("alice@example.com", true, &[]);
    let first = net.register(1, &key, "Web", &[]);
    let second = net.register(2, &key, "web.example.org", &[]);
    assert_eq!(
        first.addresses,
        vec![prefix("100.64.0.1/32"), prefix("fd7a:115c:a1e0::1/128")]
    );
    assert_eq!(
        second.addresses,
        vec![prefix("100.64.0.2/32"), prefix("fd7a:115c:a1e0::2/128")]
    );
    assert_eq!(first.name, "web.example.ts.net");
    assert_eq!(second.name, "web-2.example.ts.net");
    assert_eq!(
        first.key_expiry,
        Some(T0.saturating_add(Duration::from_secs(180 * 86400)))
    );
    assert_eq!(net.control.counters().registrations, 2);
    assert!(
        net.log.is_empty(),
        "nothing is pushed before a node opens its stream"
    );
}

#[test]
fn many_nodes_with_one_host_name_get_numbered_names() {
    let mut net = Net::new(Policy::allow_all());
    let key = net.auth_key("alice@example.com", true, &[]);
    let names: Vec<String> = (1..=200u8)
        .map(|i| net.register(i, &key, "laptop", &[]).name)
        .collect();
    assert_eq!(names[0], "laptop.example.ts.net");
    assert_eq!(names[1], "laptop-2.example.ts.net");
    assert_eq!(names[199], "laptop-200.example.ts.net");
    let long = "x".repeat(63);
    assert_eq!(
        net.register(201, &key, &long, &[]).name,
        format!("{long}.example.ts.net")
    );
    let second = net.register(202, &key, &long, &[]).name;
    assert_eq!(second, format!("{}-2.example.ts.net", "x".repeat(61)));
}

#[test]
fn address_indices_skip_the_magic_dns_address_and_wrap() {
    assert_eq!(index_of(Ipv4Addr::new(100, 100, 100, 100)), None);
    assert_eq!(index_of(Ipv4Addr::new(100, 64, 0, 0)), None);
    assert_eq!(index_of(Ipv4Addr::new(100, 128, 0, 0)), None);
    assert_eq!(index_of(Ipv4Addr::new(100, 64, 1, 2)), Some(258));
    assert_eq!(
        ipv6_of(0x1_0002),
        "fd7a:115c:a1e0::1:2".parse::<Ipv6Addr>().unwrap()
    );
    assert_eq!(next_index(MAX_ADDRESS_INDEX), 1);
}

#[test]
fn auth_keys_are_checked_for_secret_use_and_expiry() {
    let mut net = Net::new(Policy::allow_all());
    let single = net.auth_key("alice@example.com", false, &[]);
    net.register(1, &single, "one", &[]);
    let refused = |net: &mut Net, i: u8, key: &str| {
        net.input(Input::Register(RegisterRequest {
            node_key: node_key(i),
            auth_key: key.into(),
            hostname: "x".into(),
            advertised_routes: vec![],
            requested_ipv4: None,
        }))
        .unwrap_err()
    };
    assert_eq!(
        refused(&mut net, 2, &single),
        InputError::Register(RegisterError::AuthKeyUsed)
    );
    let mut wrong = single.clone();
    wrong.replace_range(
        wrong.len() - 1..,
        if single.ends_with('0') { "1" } else { "0" },
    );
    assert_eq!(
        refused(&mut net, 2, &wrong),
        InputError::Register(RegisterError::UnknownAuthKey)
    );
    assert_eq!(
        refused(&mut net, 2, "tskey-nonsense"),
        InputError::Register(RegisterError::UnknownAuthKey)
    );
    let expiring = match net.input(Input::Admin(AdminCommand::CreateAuthKey {
        user: "bob@example.com".into(),
        reusable: true,
        expiry: Some(T0.saturating_add(Duration::from_secs(60))),
        tags: vec![],
    })) {
        Ok(InputOutcome::AuthKeyCreated(created)) => created.key,
        other => panic!("{other:?}"),
    };
    net.register(2, &expiring, "two", &[]);
    net.advance(Duration::from_secs(61));
    assert_eq!(
        refused(&mut net, 3, &expiring),
        InputError::Register(RegisterError::AuthKeyExpired)
    );
    let refused_counts = &net.control.counters().refused;
    assert_eq!(refused_counts["register.auth_key_used"], 1);
    assert_eq!(refused_counts["register.unknown_auth_key"], 2);
    assert_eq!(refused_counts["register.auth_key_expired"], 1);
    let listed = net.control.auth_keys();
    assert_eq!(
        listed.iter().map(|k| k.uses).collect::<Vec<_>>(),
        vec![1, 1]
    );
}

#[test]
fn admin_refuses_bad_auth_key_requests() {
    let mut net = Net::new(Policy::allow_all());
    let create = |user: &str, tags: Vec<String>, expiry| {
        Input::Admin(AdminCommand::CreateAuthKey {
            user: user.into(),
            reusable: false,
            expiry,
            tags,
        })
    };
    assert_eq!(
        net.input(create("alice", vec![], None)),
        Err(InputError::Admin(AdminError::BadUser("alice".into())))
    );
    assert_eq!(
        net.input(create("a@x", vec!["server".into()], None)),
        Err(InputError::Admin(AdminError::BadTag("server".into())))
    );
    assert_eq!(
        net.input(create("a@x", vec![], Some(T0))),
        Err(InputError::Admin(AdminError::ExpiryInPast))
    );
    assert!(net.control.auth_keys().is_empty());
}

#[test]
fn a_replayed_registration_is_refused_and_changes_nothing() {
    let mut net = Net::new(Policy::allow_all());
    let key = net.auth_key("alice@example.com", true, &[]);
    net.register(1, &key, "one", &[]);
    let replay = Input::Register(RegisterRequest {
        node_key: node_key(1),
        auth_key: key.clone(),
        hostname: "other-name".into(),
        advertised_routes: vec![prefix("10.9.0.0/16")],
        requested_ipv4: None,
    });
    assert_eq!(
        net.input(replay),
        Err(InputError::Register(RegisterError::AlreadyRegistered(
            node_key(1)
        )))
    );
    assert_eq!(net.control.nodes()[0].name, "one.example.ts.net");
    assert_eq!(
        net.control.auth_keys()[0].uses,
        1,
        "the key was not used again"
    );
    let zero = Input::Register(RegisterRequest {
        node_key: NodeKey::default(),
        auth_key: key,
        hostname: "z".into(),
        advertised_routes: vec![],
        requested_ipv4: None,
    });
    assert_eq!(
        net.input(zero),
        Err(InputError::Register(RegisterError::BadNodeKey))
    );
}

#[test]
fn a_node_cannot_claim_another_nodes_address_or_the_tailnets() {
    let mut net = Net::new(Policy::allow_all());
    let key = net.auth_key("alice@example.com", true, &[]);
    net.register(1, &key, "one", &[]);
    let request = |i: u8, ipv4: Option<Ipv4Addr>, routes: Vec<IpNet>, hostname: &str| {
        Input::Register(RegisterRequest {
            node_key: node_key(i),
            auth_key: key.clone(),
            hostname: hostname.into(),
            advertised_routes: routes,
            requested_ipv4: ipv4,
        })
    };
    assert_eq!(
        net.input(request(
            2,
            Some(Ipv4Addr::new(100, 64, 0, 1)),
            vec![],
            "two"
        )),
        Err(InputError::Register(RegisterError::AddressInUse {
            addr: "100.64.0.1".parse().unwrap(),
            holder: node_key(1),
        }))
    );
    for outside in [
        Ipv4Addr::new(100, 100, 100, 100),
        Ipv4Addr::new(10, 0, 0, 1),
    ] {
        assert_eq!(
            net.input(request(2, Some(outside), vec![], "two")),
            Err(InputError::Register(RegisterError::AddressOutsideTailnet(
                IpAddr::V4(outside)
            )))
        );
    }
    assert_eq!(
        net.input(request(2, None, vec![prefix("100.64.0.1/32")], "two")),
        Err(InputError::Register(RegisterError::RouteOverlapsTailnet(
            prefix("100.64.0.1/32")
        )))
    );
    assert_eq!(
        net.input(request(2, None, vec![prefix("fd7a:115c::/32")], "two")),
        Err(InputError::Register(RegisterError::RouteOverlapsTailnet(
            prefix("fd7a:115c::/32")
        )))
    );
    assert_eq!(
        net.input(request(2, None, vec![prefix("0.0.0.0/0")], "two")),
        Err(InputError::Register(RegisterError::ExitNodeNotSupported(
            prefix("0.0.0.0/0")
        )))
    );
    let many: Vec<IpNet> = (0..=256u32)
        .map(|i| IpNet::from(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (i << 8)))))
        .collect();
    assert_eq!(
        net.input(request(2, None, many, "two")),
        Err(InputError::Register(RegisterError::TooManyRoutes {
            count: 257,
            max: 256
        }))
    );
    assert_eq!(
        net.input(request(2, None, vec![], "...")),
        Err(InputError::Register(RegisterError::BadHostname(
            "...".into()
        )))
    );
    assert_eq!(net.control.nodes().len(), 1);
    match net.input(request(
        2,
        Some(Ipv4Addr::new(100, 64, 9, 9)),
        vec![],
        "two",
    )) {
        Ok(InputOutcome::Registered(r)) => assert_eq!(r.addresses[0], prefix("100.64.9.9/32")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_first_poll_gets_a_full_netmap_and_later_changes_only_deltas() {
    let mut net = Net::new(Policy::allow_all());
    let key = net.auth_key("alice@example.com", true, &[]);
    net.register(1, &key, "one", &[]);
    net.register(2, &key, "two", &[]);
    assert_eq!(net.poll(1, 1), Ok(InputOutcome::StreamOpened(StreamId(1))));
    let (to, _, first) = &net.log[0];
    assert_eq!(*to, node_key(1));
    let MapBody::Full(netmap) = &first.body else {
        panic!("first message is not full: {first:?}");
    };
    assert_eq!(netmap.peers.len(), 1);
    assert!(!netmap.peers[0].online);
    assert_eq!(netmap.peers[0].disco_key, None);

    net.poll(2, 1).unwrap();
    // Node 1 learns that 2 came online with its disco key and endpoint.
    let (to, _, second) = &net.log[1];
    assert_eq!(*to, node_key(1));
    let MapBody::Delta(delta) = &second.body else {
        panic!("later message is not a delta");
    };
    assert_eq!(
        delta.peers_changed,
        vec![PeerChange {
            disco_key: Some(disco_key(2, 1)),
            endpoints: Some(vec![endpoint(2, 41642)]),
            online: Some(true),
            ..PeerChange::new(node_key(2))
        }]
    );
    net.check_consistent();
    assert_eq!(net.control.counters().full_netmaps_sent, 2);
    assert_eq!(net.control.counters().deltas_sent, 1);
}

#[test]
fn a_restart_sends_each_peer_just_the_changed_fields() {
    let mut net = Net::new(Policy::allow_all());
    let key = net.auth_key("alice@example.com", true, &[]);
    for i in 1..=5 {
        net.register(i, &key, &format!("n{i}"), &[]);
        net.poll(i, 1).unwrap();
    }
    let start = net.log.len();
    // Node 3 restarts: new process, new disco key, same endpoint port
    // offset (generation 2 moves the port too).
    net.poll(3, 2).unwrap();
    let messages = net.messages_since(start);
    assert_eq!(
        messages.len(),
        5,
        "a full netmap for 3 and one delta per peer"
    );
    for (to, _, response) in messages {
        match &response.body {
            MapBody::Full(_) => assert_eq!(*to, node_key(3)),
            MapBody::Delta(delta) => {
                assert_eq!(
                    **delta,
                    NetmapDelta {
                        peers_changed: vec![PeerChange {
                            disco_key: Some(disco_key(3, 2)),
                            endpoints: Some(vec![endpoint(3, 41643)]),
                            ..PeerChange::new(node_key(3))
                        }],
                        ..NetmapDelta::default()
                    }
                );
            }
        }
    }
    assert_eq!(
        net.closes,
        vec![(node_key(3), CloseReason::Replaced)],
        "the old stream is closed"
    );
    net.check_consistent();
}

#[test]
fn a_restart_costs_only_the_restarted_nodes_peers() {
    // 60 nodes in 6 teams of 10 that only see their own team.
    let mut policy_text = String::from("[groups]\n");
    for team in 0..6 {
        let users: Vec<String> = (0..10).map(|m| format!("\"u{team}-{m}@x\"")).collect();
        policy_text.push_str(&format!("\"group:t{team}\" = [{}]\n", users.join(", ")));
    }
    for team in 0..6 {
        policy_text.push_str(&format!(
            "[[acls]]\naction = \"accept\"\nsrc = [\"group:t{team}\"]\ndst = [\"group:t{team}:*\"]\n"
        ));
    }
    let mut net = Net::new(Policy::parse(&policy_text, "teams.toml").unwrap());
    for i in 0..60u8 {
        let key = net.auth_key(&format!("u{}-{}@x", i / 10, i % 10), false, &[]);
        net.register(i + 1, &key, &format!("n{i}"), &[]);
    }
    for i in 0..60u8 {
        net.poll(i + 1, 1).unwrap();
    }
    let full = net.control.netmap(&node_key(1)).unwrap();
    assert_eq!(full.peers.len(), 9, "only the team is visible");
    let start = net.log.len();
    net.poll(1, 2).unwrap();
    let recipients: BTreeSet<NodeKey> = net.messages_since(start).iter().map(|m| m.0).collect();
    let team: BTreeSet<NodeKey> = (1..=10).map(node_key).collect();
    assert_eq!(recipients, team);
    net.check_consistent();
}

#[test]
fn requests_from_unknown_or_expired_nodes_are_refused() {
    let config = ControlConfig {
        node_key_expiry: Some(Duration::from_secs(3600)),
        ..ControlConfig::new("example.ts.net")
    };
    let mut net = Net::with_config(config, Policy::allow_all());
    assert_eq!(
        net.poll(9, 1),
        Err(InputError::Map(MapError::UnknownNode(node_key(9))))
    );
    let key = net.auth_key("alice@example.com", true, &[]);
    net.register(1, &key, "one", &[]);
    net.register(2, &key, "two", &[]);
    net.poll(1, 1).unwrap();
    net.poll(2, 1).unwrap();
    assert_eq!(
        net.control.poll_timeout(),
        Some(T0.saturating_add(Duration::from_secs(3600)))
    );
    // Node 2 claims node 1's disco key.
    assert_eq!(
        net.input(Input::MapRequest(MapRequest {
            node_key: node_key(2),
            disco_key: disco_key(1, 1),
            endpoints: vec![],
            relay: None,
        })),
        Err(InputError::Map(MapError::DiscoKeyInUse(node_key(1))))
    );
    assert_eq!(
        net.input(Input::MapRequest(MapRequest {
            node_key: node_key(2),
            disco_key: DiscoKey::default(),
            endpoints: vec![],
            relay: None,
        })),
        Err(InputError::Map(MapError::BadDiscoKey))
    );
    assert_eq!(
        net.input(Input::EndpointUpdate(EndpointUpdate {
            node_key: node_key(2),
            endpoints: vec![endpoint(2, 1); 65],
            relay: None,
        })),
        Err(InputError::EndpointUpdate(
            EndpointUpdateError::TooManyEndpoints { count: 65, max: 64 }
        ))
    );
    net.advance(Duration::from_secs(3599));
    assert!(net.closes.is_empty(), "an early timeout expires nothing");
    net.advance(Duration::from_secs(1));
    assert_eq!(
        net.closes,
        vec![
            (node_key(1), CloseReason::KeyExpired),
            (node_key(2), CloseReason::KeyExpired)
        ]
    );
    assert_eq!(
        net.poll(1, 2),
        Err(InputError::Map(MapError::NodeExpired(node_key(1))))
    );
    assert_eq!(
        net.input(Input::EndpointUpdate(EndpointUpdate {
            node_key: node_key(1),
            endpoints: vec![],
            relay: None,
        })),
        Err(InputError::EndpointUpdate(
            EndpointUpdateError::NodeExpired(node_key(1))
        ))
    );
    assert_eq!(
        net.input(Input::Disconnect {
            node_key: node_key(8),
            stream: StreamId(1),
        }),
        Err(InputError::Disconnect(DisconnectError::UnknownNode(
            node_key(8)
        )))
    );
    assert_eq!(net.control.counters().nodes_expired, 2);
    assert_eq!(net.control.poll_timeout(), None);
    // Re-registration with a key brings node 1 back with its address.
    let again = net.register(1, &key, "uno", &[]);
    assert_eq!(again.addresses[0], prefix("100.64.0.1/32"));
    assert_eq!(
        again.name, "uno.example.ts.net",
        "a re-registration renames"
    );
    net.poll(1, 2).unwrap();
    assert!(net.control.netmap(&node_key(1)).unwrap().peers.is_empty());
    net.check_consistent();
    let refused = &net.control.counters().refused;
    assert_eq!(refused["map.unknown_node"], 1);
    assert_eq!(refused["map.node_expired"], 1);
    assert_eq!(refused["map.disco_key_in_use"], 1);
}

#[test]
fn an_expiring_peer_is_removed_from_the_others_netmaps() {
    let mut net = Net::new(Policy::allow_all());
    let key = net.auth_key("alice@example.com", true, &[]);
    for i in 1..=3 {
        net.register(i, &key, &format!("n{i}"), &[]);
        net.poll(i, 1).unwrap();
    }
    let start = net.log.len();
    net.input(Input::Admin(AdminCommand::ExpireNode { node: node_key(2) }))
        .unwrap();
    let removals: Vec<(NodeKey, Vec<NodeKey>)> = net
        .messages_since(start)
        .iter()
        .map(|(to, _, r)| match &r.body {
            MapBody::Delta(d) => (*to, d.peers_removed.clone()),
            MapBody::Full(_) => panic!("no full netmap"),
        })
        .collect();
    assert_eq!(
        removals,
        vec![
            (node_key(1), vec![node_key(2)]),
            (node_key(3), vec![node_key(2)])
        ]
    );
    assert!(net.control.node(&node_key(2)).unwrap().expired);
    net.check_consistent();
    net.input(Input::Admin(AdminCommand::DeleteNode { node: node_key(3) }))
        .unwrap();
    assert!(net.control.node(&node_key(3)).is_none());
    assert_eq!(
        net.closes.last(),
        Some(&(node_key(3), CloseReason::Deleted))
    );
    assert!(net.control.netmap(&node_key(1)).unwrap().peers.is_empty());
    net.check_consistent();
    assert_eq!(
        net.input(Input::Admin(AdminCommand::DeleteNode { node: node_key(3) })),
        Err(InputError::Admin(AdminError::UnknownNode(node_key(3))))
    );
}

#[test]
fn disconnects_mark_peers_offline_and_stale_ones_change_nothing() {
    let mut net = Net::new(Policy::allow_all());
    let key = net.auth_key("alice@example.com", true, &[]);
    net.register(1, &key, "one", &[]);
    net.register(2, &key, "two", &[]);
    net.poll(1, 1).unwrap();
    let Ok(InputOutcome::StreamOpened(old)) = net.poll(2, 1) else {
        panic!("no stream");
    };
    let Ok(InputOutcome::StreamOpened(new)) = net.poll(2, 2) else {
        panic!("no stream");
    };
    let start = net.log.len();
    assert_eq!(
        net.input(Input::Disconnect {
            node_key: node_key(2),
            stream: old
        }),
        Ok(InputOutcome::Disconnected { current: false })
    );
    assert_eq!(net.log.len(), start);
    assert_eq!(
        net.input(Input::Disconnect {
            node_key: node_key(2),
            stream: new
        }),
        Ok(InputOutcome::Disconnected { current: true })
    );
    let peer = net.received[&node_key(1)]
        .netmap
        .peer(&node_key(2))
        .unwrap()
        .clone();
    assert!(!peer.online);
    assert_eq!(
        net.input(Input::EndpointUpdate(EndpointUpdate {
            node_key: node_key(1),
            endpoints: vec![endpoint(1, 41642)],
            relay: None,
        })),
        Ok(InputOutcome::EndpointsUpdated { changed: false })
    );
    net.check_consistent();
}

#[test]
fn endpoint_updates_reach_the_peers() {
    let mut net = Net::new(Policy::allow_all());
    let key = net.auth_key("alice@example.com", true, &[]);
    net.register(1, &key, "one", &[]);
    net.register(2, &key, "two", &[]);
    net.poll(1, 1).unwrap();
    net.poll(2, 1).unwrap();
    let moved = vec![endpoint(2, 5000), endpoint(2, 5001)];
    assert_eq!(
        net.input(Input::EndpointUpdate(EndpointUpdate {
            node_key: node_key(2),
            endpoints: moved.clone(),
            relay: None,
        })),
        Ok(InputOutcome::EndpointsUpdated { changed: true })
    );
    let peer = net.received[&node_key(1)]
        .netmap
        .peer(&node_key(2))
        .unwrap()
        .clone();
    assert_eq!(peer.endpoints, moved);
    net.check_consistent();
}

#[test]
fn the_policy_decides_peers_and_filters() {
    let net = small_tailnet();
    let names = |i: u8| -> Vec<String> {
        net.control
            .netmap(&node_key(i))
            .unwrap()
            .peers
            .iter()
            .map(|p| p.name.clone())
            .collect()
    };
    assert_eq!(names(1), vec!["server.example.ts.net"]);
    assert!(names(2).is_empty(), "bob may reach nobody and nobody bob");
    let mut server_peers = names(3);
    server_peers.sort();
    assert_eq!(
        server_peers,
        vec!["alice-s-laptop.example.ts.net", "ci.example.ts.net"]
    );
    assert_eq!(names(4), vec!["server.example.ts.net"]);
    let server = net.control.node(&node_key(3)).unwrap();
    assert_eq!(
        server.approved_routes,
        vec![prefix("10.1.0.0/16")],
        "auto-approved"
    );
    let ci_view = net.control.netmap(&node_key(4)).unwrap();
    assert_eq!(
        ci_view.peers[0].allowed_ips,
        vec![
            prefix("100.64.0.3/32"),
            prefix("fd7a:115c:a1e0::3/128"),
            prefix("10.1.0.0/16")
        ]
    );
    assert!(ci_view.packet_filter.is_empty(), "nobody may reach ci");
    assert_eq!(ci_view.routes().len(), 3);
}

#[test]
fn a_policy_change_cuts_and_adds_peers_with_deltas() {
    let mut net = small_tailnet();
    let start = net.log.len();
    let open = "[[acls]]\naction = \"accept\"\nsrc = [\"bob@example.com\"]\ndst = [\"alice@example.com:*\"]\n";
    let outcome = net
        .input(Input::SetPolicy(Box::new(
            Policy::parse(open, "acl.toml").unwrap(),
        )))
        .unwrap();
    assert_eq!(outcome, InputOutcome::PolicyApplied { nodes_notified: 4 });
    for (_, _, response) in net.messages_since(start) {
        assert!(
            matches!(response.body, MapBody::Delta(_)),
            "no full netmaps"
        );
    }
    let alice = &net.received[&node_key(1)].netmap;
    assert_eq!(alice.peers.len(), 1);
    assert_eq!(alice.peers[0].node_key, node_key(2));
    assert_eq!(
        alice.packet_filter,
        vec![
            FilterRule {
                src: prefix("100.64.0.2/32"),
                dst: prefix("100.64.0.1/32"),
                protocol: None,
                dst_ports: None
            },
            FilterRule {
                src: prefix("fd7a:115c:a1e0::2/128"),
                dst: prefix("fd7a:115c:a1e0::1/128"),
                protocol: None,
                dst_ports: None
            },
        ]
    );
    assert!(net.received[&node_key(3)].netmap.peers.is_empty());
    net.check_consistent();
    // The same policy again changes nothing.
    let start = net.log.len();
    let outcome = net
        .input(Input::SetPolicy(Box::new(
            Policy::parse(open, "acl.toml").unwrap(),
        )))
        .unwrap();
    assert_eq!(outcome, InputOutcome::PolicyApplied { nodes_notified: 0 });
    assert_eq!(net.log.len(), start);
}

#[test]
fn approving_routes_updates_the_router_and_its_peers() {
    let mut net = Net::new(Policy::allow_all());
    let key = net.auth_key("alice@example.com", true, &[]);
    net.register(1, &key, "one", &[]);
    net.register(2, &key, "router", &["10.2.0.0/16", "10.3.0.0/16"]);
    net.poll(1, 1).unwrap();
    net.poll(2, 1).unwrap();
    assert_eq!(
        net.input(Input::Admin(AdminCommand::ApproveRoutes {
            node: node_key(2),
            routes: vec![prefix("10.4.0.0/16")],
        })),
        Err(InputError::Admin(AdminError::RouteNotAdvertised(prefix(
            "10.4.0.0/16"
        ))))
    );
    net.input(Input::Admin(AdminCommand::ApproveRoutes {
        node: node_key(2),
        routes: vec![prefix("10.3.0.0/16")],
    }))
    .unwrap();
    let router = net.received[&node_key(2)].netmap.self_node.clone();
    assert_eq!(router.primary_routes, vec![prefix("10.3.0.0/16")]);
    let seen = net.received[&node_key(1)]
        .netmap
        .peer(&node_key(2))
        .unwrap()
        .clone();
    assert!(seen.allowed_ips.contains(&prefix("10.3.0.0/16")));
    assert!(!seen.allowed_ips.contains(&prefix("10.2.0.0/16")));
    assert!(
        net.received[&node_key(2)]
            .netmap
            .packet_filter
            .iter()
            .any(|r| r.dst == prefix("10.3.0.0/16")),
        "the router accepts traffic for its approved subnet"
    );
    net.check_consistent();
}

#[test]
fn a_single_address_route_is_approved_on_one_node_at_a_time() {
    let mut net = Net::new(Policy::allow_all());
    let key = net.auth_key("alice@example.com", true, &[]);
    net.register(1, &key, "one", &["10.5.0.1/32", "10.6.0.0/16"]);
    net.register(2, &key, "two", &["10.5.0.1/32", "10.6.0.0/16"]);
    let approve = |i: u8, routes: &[&str]| {
        Input::Admin(AdminCommand::ApproveRoutes {
            node: node_key(i),
            routes: routes.iter().map(|r| prefix(r)).collect(),
        })
    };
    net.input(approve(1, &["10.5.0.1/32", "10.6.0.0/16"]))
        .unwrap();
    assert_eq!(
        net.input(approve(2, &["10.5.0.1/32"])),
        Err(InputError::Admin(AdminError::RouteApprovedElsewhere {
            route: prefix("10.5.0.1/32"),
            holder: node_key(1),
        }))
    );
    net.input(approve(2, &["10.6.0.0/16"]))
        .expect("a subnet may have several routers");
    net.input(Input::Admin(AdminCommand::ExpireNode { node: node_key(1) }))
        .unwrap();
    net.input(approve(2, &["10.5.0.1/32", "10.6.0.0/16"]))
        .expect("the address is free once its router expired");
    let again = net.register(1, &key, "one", &["10.5.0.1/32", "10.6.0.0/16"]);
    assert_eq!(again.approved_routes, vec![prefix("10.6.0.0/16")]);
}

#[test]
fn a_restored_control_keeps_every_node_and_refuses_bad_state() {
    let mut net = small_tailnet();
    net.input(Input::Admin(AdminCommand::ExpireNode { node: node_key(4) }))
        .unwrap();
    check_restore(&net);
    let mut restored = Control::restore(
        net.control.config.clone(),
        net.control.policy().clone(),
        net.control.state(),
        net.now,
        9,
    )
    .unwrap();
    // New auth keys, addresses and host names do not collide with stored ones.
    let created = restored
        .handle_input(
            net.now,
            Input::Admin(AdminCommand::CreateAuthKey {
                user: "carol@example.com".into(),
                reusable: false,
                expiry: None,
                tags: vec![],
            }),
        )
        .unwrap();
    let InputOutcome::AuthKeyCreated(created) = created else {
        panic!("{created:?}");
    };
    assert_eq!(created.id, 5);
    let registered = restored
        .handle_input(
            net.now,
            Input::Register(RegisterRequest {
                node_key: node_key(5),
                auth_key: created.key,
                hostname: "server".into(),
                advertised_routes: vec![],
                requested_ipv4: None,
            }),
        )
        .unwrap();
    let InputOutcome::Registered(registration) = registered else {
        panic!("{registered:?}");
    };
    assert_eq!(registration.addresses[0], prefix("100.64.0.5/32"));
    assert_eq!(registration.name, "server-2.example.ts.net");

    let mut twice = net.control.state();
    twice.nodes.push(twice.nodes[0].clone());
    assert_eq!(
        Control::restore(
            net.control.config.clone(),
            Policy::allow_all(),
            twice,
            net.now,
            9
        )
        .unwrap_err(),
        RestoreError::DuplicateNode(node_key(1))
    );
    let mut same_address = net.control.state();
    same_address.nodes[1].ipv4 = same_address.nodes[0].ipv4;
    assert_eq!(
        Control::restore(
            net.control.config.clone(),
            Policy::allow_all(),
            same_address,
            net.now,
            9
        )
        .unwrap_err(),
        RestoreError::DuplicateAddress(Ipv4Addr::new(100, 64, 0, 1))
    );
}

#[test]
fn the_same_inputs_give_the_same_bytes() {
    let run = || {
        let net = small_tailnet();
        net.log
            .iter()
            .map(|(to, _, r)| (to.to_string(), String::from_utf8(r.to_json()).unwrap()))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}

#[test]
fn netmaps_of_a_small_tailnet() {
    let net = small_tailnet();
    let mut text = String::new();
    for i in 1..=4 {
        let netmap = net.control.netmap(&node_key(i)).unwrap();
        text.push_str(&serde_json::to_string_pretty(&netmap).unwrap());
        text.push('\n');
    }
    insta::assert_snapshot!(text);
}

#[test]
fn applied_deltas_name_the_peers_to_upsert() {
    let mut net = Net::new(Policy::allow_all());
    let key = net.auth_key("alice@example.com", true, &[]);
    net.register(1, &key, "one", &[]);
    net.register(2, &key, "two", &[]);
    net.poll(1, 1).unwrap();
    let mut netmap = net.control.netmap(&node_key(1)).unwrap();
    let start = net.log.len();
    net.poll(2, 1).unwrap();
    let MapBody::Delta(delta) = &net.messages_since(start)[0].2.body else {
        panic!("expected a delta");
    };
    assert_eq!(
        netmap.apply(delta),
        Ok(AppliedDelta {
            upserted: vec![node_key(2)],
            ..AppliedDelta::default()
        })
    );
}

#[test]
fn hostnames_are_sanitised_into_dns_labels() {
    assert_eq!(
        sanitize_hostname("Alice's Laptop"),
        Some("alice-s-laptop".into())
    );
    assert_eq!(
        sanitize_hostname("web01.corp.example"),
        Some("web01".into())
    );
    assert_eq!(sanitize_hostname("---"), None);
    assert_eq!(sanitize_hostname(""), None);
    assert_eq!(sanitize_hostname(&"a".repeat(100)).unwrap().len(), 63);
}

#[test]
fn auth_key_text_round_trips() {
    let secret = [0xab; 16];
    let text = format_auth_key(42, &secret);
    assert_eq!(parse_auth_key(&text), Some((42, secret)));
    assert_eq!(parse_auth_key("wgmesh-auth-zz-00"), None);
    assert_eq!(parse_auth_key(&text[..text.len() - 1]), None);
    assert!(constant_time_eq(&secret, &secret));
    assert!(!constant_time_eq(&secret, &[0; 16]));
}

// ----------------------------------------------------------------------
// Property: deltas rebuild the full netmap
// ----------------------------------------------------------------------

const POLICIES: [&str; 3] = [
    "[[acls]]\naction = \"accept\"\nsrc = [\"*\"]\ndst = [\"*:*\"]\n",
    POLICY,
    "[[acls]]\naction = \"accept\"\nsrc = [\"alice@example.com\"]\ndst = [\"bob@example.com:*\"]\n\n[[acls]]\naction = \"accept\"\nsrc = [\"*\"]\ndst = [\"tag:server:443\", \"10.1.0.0/16:*\"]\n",
];

#[derive(Debug, Clone)]
enum Op {
    Register { node: u8, key: usize, route: bool },
    Poll { node: u8 },
    Disconnect { node: u8 },
    Endpoints { node: u8, port: u16 },
    Policy(usize),
    Approve { node: u8, approve: bool },
    Expire { node: u8 },
    Delete { node: u8 },
    Advance { secs: u16 },
}

fn op() -> impl Strategy<Value = Op> {
    let node = 1u8..=8;
    prop_oneof![
        3 => (node.clone(), 0usize..4, any::<bool>())
            .prop_map(|(node, key, route)| Op::Register { node, key, route }),
        4 => node.clone().prop_map(|node| Op::Poll { node }),
        1 => node.clone().prop_map(|node| Op::Disconnect { node }),
        2 => (node.clone(), 1u16..4).prop_map(|(node, port)| Op::Endpoints { node, port }),
        1 => (0usize..3).prop_map(Op::Policy),
        1 => (node.clone(), any::<bool>()).prop_map(|(node, approve)| Op::Approve { node, approve }),
        1 => node.clone().prop_map(|node| Op::Expire { node }),
        1 => node.prop_map(|node| Op::Delete { node }),
        1 => (1u16..400).prop_map(|secs| Op::Advance { secs }),
    ]
}

fn run_ops(ops: &[Op]) {
    let config = ControlConfig {
        node_key_expiry: Some(Duration::from_secs(900)),
        ..ControlConfig::new("prop.ts.net")
    };
    let mut net = Net::with_config(config, Policy::allow_all());
    let keys = [
        net.auth_key("alice@example.com", true, &[]),
        net.auth_key("bob@example.com", true, &[]),
        net.auth_key("ops@example.com", true, &["tag:server"]),
        net.auth_key("ops@example.com", true, &["tag:ci"]),
    ];
    let mut generation = [0u16; 9];
    let mut streams: BTreeMap<u8, StreamId> = BTreeMap::new();
    for op in ops {
        match op.clone() {
            Op::Register { node, key, route } => {
                let routes = if route {
                    vec![prefix(&format!("10.1.{node}.0/24"))]
                } else {
                    vec![]
                };
                let _ = net.input(Input::Register(RegisterRequest {
                    node_key: node_key(node),
                    auth_key: keys[key].clone(),
                    hostname: format!("host{}", node % 4),
                    advertised_routes: routes,
                    requested_ipv4: None,
                }));
            }
            Op::Poll { node } => {
                generation[node as usize] += 1;
                if let Ok(InputOutcome::StreamOpened(stream)) =
                    net.poll(node, generation[node as usize])
                {
                    streams.insert(node, stream);
                }
            }
            Op::Disconnect { node } => {
                let stream = streams.get(&node).copied().unwrap_or_default();
                let _ = net.input(Input::Disconnect {
                    node_key: node_key(node),
                    stream,
                });
            }
            Op::Endpoints { node, port } => {
                let _ = net.input(Input::EndpointUpdate(EndpointUpdate {
                    node_key: node_key(node),
                    endpoints: vec![endpoint(node, port)],
                    relay: None,
                }));
            }
            Op::Policy(index) => {
                let policy = Policy::parse(POLICIES[index], "prop.toml").unwrap();
                net.input(Input::SetPolicy(Box::new(policy))).unwrap();
            }
            Op::Approve { node, approve } => {
                let routes = if approve {
                    net.control
                        .node(&node_key(node))
                        .map(|n| n.advertised_routes)
                        .unwrap_or_default()
                } else {
                    vec![]
                };
                let _ = net.input(Input::Admin(AdminCommand::ApproveRoutes {
                    node: node_key(node),
                    routes,
                }));
            }
            Op::Expire { node } => {
                let _ = net.input(Input::Admin(AdminCommand::ExpireNode {
                    node: node_key(node),
                }));
            }
            Op::Delete { node } => {
                let _ = net.input(Input::Admin(AdminCommand::DeleteNode {
                    node: node_key(node),
                }));
            }
            Op::Advance { secs } => net.advance(Duration::from_secs(u64::from(secs))),
        }
        net.check_consistent();
    }
    check_restore(&net);
}

/// A control restored from the stored state gives every live node the
/// netmap it had, with every peer offline until it polls again.
fn check_restore(net: &Net) {
    let state = TailnetState {
        nodes: net.stored_nodes.values().cloned().collect(),
        auth_keys: net.stored_auth_keys.values().cloned().collect(),
    };
    let restored = Control::restore(
        net.control.config.clone(),
        net.control.policy().clone(),
        state,
        net.now,
        9,
    )
    .expect("stored state restores");
    for view in net.control.nodes() {
        let Some(mut before) = net.control.netmap(&view.node_key) else {
            assert!(restored.netmap(&view.node_key).is_none());
            continue;
        };
        for peer in &mut before.peers {
            peer.online = false;
        }
        assert_eq!(restored.netmap(&view.node_key), Some(before));
    }
    assert_eq!(restored.poll_timeout(), net.control.poll_timeout());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever happens, every online node's netmap rebuilt from its first
    /// full netmap and every delta since equals a fresh full netmap.
    #[test]
    fn deltas_applied_to_the_first_netmap_equal_a_fresh_one(ops in prop::collection::vec(op(), 1..60)) {
        run_ops(&ops);
    }
}

/// A tailnet whose server issues STUN servers and TURN credentials valid
/// for an hour, with two online nodes.
fn nat_tailnet() -> Net {
    let mut config = ControlConfig::new("example.ts.net");
    config.nat = crate::nat::NatIssuer {
        stun_servers: vec!["198.51.100.1:3478".parse().unwrap()],
        relay: Some(crate::nat::RelayIssuer {
            server: "198.51.100.1:3478".parse().unwrap(),
            shared_secret: zeroize::Zeroizing::new("turn-secret".into()),
            credential_ttl: Duration::from_secs(3600),
        }),
    };
    let mut net = Net::with_config(config, Policy::allow_all());
    let key = net.auth_key("alice@example.com", true, &[]);
    net.register(1, &key, "one", &[]);
    net.register(2, &key, "two", &[]);
    net.poll(1, 1).unwrap();
    net.poll(2, 1).unwrap();
    net
}

#[test]
fn every_netmap_carries_stun_servers_and_the_nodes_own_relay_credentials() {
    let net = nat_tailnet();
    let one = &net.received[&node_key(1)].netmap.nat;
    let two = &net.received[&node_key(2)].netmap.nat;
    assert_eq!(
        one.stun_servers,
        vec!["198.51.100.1:3478".parse::<SocketAddr>().unwrap()]
    );
    let expiry_secs = T0.unix_millis() / 1000 + 3600;
    let one_relay = one.relay.as_ref().expect("credentials issued");
    assert_eq!(one_relay.username, format!("{expiry_secs}:one"));
    assert_eq!(
        one_relay.password,
        crate::nat::rest_credentials("turn-secret", "one", expiry_secs).1
    );
    assert_eq!(one_relay.expires, Timestamp::from_unix_secs(expiry_secs));
    let two_relay = two.relay.as_ref().expect("credentials issued");
    assert_eq!(two_relay.username, format!("{expiry_secs}:two"));
    assert_ne!(one_relay.password, two_relay.password);
    assert_eq!(net.control.counters().relay_credentials_issued, 2);
}

#[test]
fn relay_credentials_are_reissued_half_way_through_their_ttl_by_a_delta() {
    let mut net = nat_tailnet();
    let first = net.received[&node_key(1)].netmap.nat.relay.clone().unwrap();
    assert_eq!(
        net.control.poll_timeout(),
        Some(T0.saturating_add(Duration::from_secs(1800)))
    );
    let start = net.log.len();
    net.advance(Duration::from_secs(1799));
    assert_eq!(net.log.len(), start, "nothing is due before half the TTL");
    net.advance(Duration::from_secs(1));
    let refreshes: Vec<&NetmapDelta> = net
        .messages_since(start)
        .iter()
        .filter_map(|(_, _, r)| match &r.body {
            MapBody::Delta(d) => Some(&**d),
            MapBody::Full(_) => None,
        })
        .collect();
    assert_eq!(refreshes.len(), 2, "one delta per online node");
    for delta in refreshes {
        let nat = delta.nat.as_ref().expect("the delta carries new settings");
        assert!(delta.peers_changed.is_empty() && delta.peers_added.is_empty());
        assert!(nat.relay.is_some());
    }
    let second = net.received[&node_key(1)].netmap.nat.relay.clone().unwrap();
    assert_eq!(
        second.expires,
        first.expires.saturating_add(Duration::from_secs(1800))
    );
    assert_ne!(second.password, first.password);
    // An offline node gets no refresh; its next poll brings fresh ones.
    net.input(Input::Disconnect {
        node_key: node_key(2),
        stream: net.received[&node_key(2)].stream,
    })
    .unwrap();
    let start = net.log.len();
    net.advance(Duration::from_secs(1800));
    assert!(
        net.messages_since(start)
            .iter()
            .all(|(to, _, _)| *to == node_key(1)),
        "only the online node is sent new credentials"
    );
    net.poll(2, 2).unwrap();
    let fresh = net.received[&node_key(2)].netmap.nat.relay.clone().unwrap();
    assert_eq!(
        fresh.expires,
        Timestamp::from_unix_secs(net.now.unix_millis() / 1000 + 3600)
    );
}

#[test]
fn a_nodes_relayed_address_reaches_its_peers_and_its_loss_too() {
    let mut net = nat_tailnet();
    let relayed: SocketAddr = "198.51.100.1:49160".parse().unwrap();
    net.input(Input::EndpointUpdate(EndpointUpdate {
        node_key: node_key(2),
        endpoints: vec![endpoint(2, 41642)],
        relay: Some(relayed),
    }))
    .unwrap();
    let peer = net.received[&node_key(1)]
        .netmap
        .peer(&node_key(2))
        .unwrap()
        .clone();
    assert_eq!(peer.relay, Some(relayed));
    assert_eq!(net.stored_nodes[&node_key(2)].relay, Some(relayed));
    // The same report again changes nothing and sends nothing.
    let start = net.log.len();
    assert_eq!(
        net.input(Input::EndpointUpdate(EndpointUpdate {
            node_key: node_key(2),
            endpoints: vec![endpoint(2, 41642)],
            relay: Some(relayed),
        })),
        Ok(InputOutcome::EndpointsUpdated { changed: false })
    );
    assert_eq!(net.log.len(), start);
    // The allocation is lost: peers hear `relay: null`, not "unchanged".
    net.input(Input::EndpointUpdate(EndpointUpdate {
        node_key: node_key(2),
        endpoints: vec![endpoint(2, 41642)],
        relay: None,
    }))
    .unwrap();
    let (_, _, last) = net.log.last().unwrap();
    let json = String::from_utf8(last.to_json()).unwrap();
    assert!(json.contains("\"relay\":null"), "{json}");
    assert_eq!(
        net.received[&node_key(1)]
            .netmap
            .peer(&node_key(2))
            .unwrap()
            .relay,
        None
    );
    // A stream opened with a relay reports it at once.
    net.input(Input::MapRequest(MapRequest {
        node_key: node_key(2),
        disco_key: disco_key(2, 3),
        endpoints: vec![],
        relay: Some(relayed),
    }))
    .unwrap();
    assert_eq!(
        net.received[&node_key(1)]
            .netmap
            .peer(&node_key(2))
            .unwrap()
            .relay,
        Some(relayed)
    );
    assert!(
        net.received[&node_key(2)].netmap.nat.relay.is_some(),
        "the reopened stream's full netmap carries credentials"
    );
}

#[test]
fn an_unusable_relayed_address_is_refused_and_changes_nothing() {
    let mut net = nat_tailnet();
    for bad in ["0.0.0.0:49160", "198.51.100.1:0", "224.0.0.1:5000"] {
        let bad: SocketAddr = bad.parse().unwrap();
        assert_eq!(
            net.input(Input::EndpointUpdate(EndpointUpdate {
                node_key: node_key(1),
                endpoints: vec![],
                relay: Some(bad),
            })),
            Err(InputError::EndpointUpdate(EndpointUpdateError::BadRelay(
                bad
            )))
        );
        assert_eq!(
            net.input(Input::MapRequest(MapRequest {
                node_key: node_key(1),
                disco_key: disco_key(1, 9),
                endpoints: vec![],
                relay: Some(bad),
            })),
            Err(InputError::Map(MapError::BadRelay(bad)))
        );
    }
    assert_eq!(net.control.counters().refused["endpoints.bad_relay"], 3);
}
