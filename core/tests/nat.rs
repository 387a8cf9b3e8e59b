//! Through NATs: endpoint discovery with STUN, call-me-maybe over a relay,
//! hole punching, and the relay as the fallback path.
//!
//! Two engines back to back, each behind a NAT box of the test's own (the
//! harness in `test_support` has no NATs): a box maps the node's socket to
//! a public port, per destination for a symmetric NAT or once for all
//! (endpoint-independent mapping), and lets a datagram in only from an
//! address the node sent to from that mapping (address-and-port-dependent
//! filtering, what `masquerade` with conntrack does). A STUN server answers
//! binding requests with the public address it sees. A relay forwards a
//! datagram sent to a peer's relayed address to that peer, from the
//! sender's relayed address, with a longer delay (the TURN wrapping is the
//! daemon's, not the engine's). The test plays the control server: the
//! endpoints one node reports go into the other's config.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use stun_proto::types::attribute::XorMappedAddress;
use stun_proto::types::message::{Message, MessageWriteVec};
use stun_proto::types::prelude::*;
use wgmesh_core::test_support::{keys, node_reconfig};
use wgmesh_core::*;

const HOP: Duration = Duration::from_millis(10);
const RELAY_DELAY: Duration = Duration::from_millis(40);

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn stun_server() -> SocketAddr {
    addr("198.51.100.1:3478")
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mapping {
    EndpointIndependent,
    /// A new public port per destination ("symmetric").
    PerDestination,
}

struct Node {
    engine: Engine,
    private: SocketAddr,
    public_ip: IpAddr,
    relay: SocketAddr,
    ip4: IpAddr,
    ip6: IpAddr,
    mapping: Mapping,
    /// Destination -> public port.
    ports: BTreeMap<SocketAddr, u16>,
    /// (public port, remote) pairs the filter lets in.
    open: BTreeSet<(u16, SocketAddr)>,
    endpoints: Vec<SocketAddr>,
    tun_out: Vec<(Instant, Vec<u8>)>,
    events: Vec<(Instant, Event)>,
    effects: Vec<(Instant, Effect)>,
    statuses: Vec<Status>,
}

struct Datagram {
    at: Instant,
    seq: u64,
    from: SocketAddr,
    to: SocketAddr,
    data: Vec<u8>,
}

impl PartialEq for Datagram {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Datagram {}
impl PartialOrd for Datagram {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Datagram {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

struct World {
    base: Instant,
    now: Instant,
    nodes: Vec<Node>,
    queue: BinaryHeap<Reverse<Datagram>>,
    seq: u64,
    /// Whether datagrams between the two NATs' public addresses pass.
    direct_cut: bool,
    /// Datagrams the NAT filters dropped.
    filtered: u64,
    /// Whether the STUN server answers.
    stun_answers: bool,
}

impl World {
    fn new(mappings: [Mapping; 2]) -> Self {
        // The test owns the clock; this reading only fixes the base.
        #[allow(clippy::disallowed_methods)]
        let base = Instant::now();
        let nodes = (0..2)
            .map(|i| {
                let (private, disco) = keys(7, i);
                let mut config = EngineConfig::new(private, disco);
                config.name = format!("node{i}");
                Node {
                    engine: Engine::new(config, base, 10 + i as u64),
                    private: addr(&format!("10.0.{i}.2:41641")),
                    public_ip: format!("203.0.113.{}", i + 1).parse().unwrap(),
                    relay: addr(&format!("192.0.2.{}:49152", 100 + i)),
                    ip4: format!("100.64.0.{}", i + 1).parse().unwrap(),
                    ip6: format!("fd7a:115c:a1e0::{}", i + 1).parse().unwrap(),
                    mapping: mappings[i],
                    ports: BTreeMap::new(),
                    open: BTreeSet::new(),
                    endpoints: Vec::new(),
                    tun_out: Vec::new(),
                    events: Vec::new(),
                    effects: Vec::new(),
                    statuses: Vec::new(),
                }
            })
            .collect();
        Self {
            base,
            now: base,
            nodes,
            queue: BinaryHeap::new(),
            seq: 0,
            direct_cut: false,
            filtered: 0,
            stun_answers: true,
        }
    }

    fn key(&self, i: usize) -> NodePublicKey {
        self.nodes[i].engine.node_key()
    }

    fn peer_config(&self, j: usize) -> PeerConfig {
        let n = &self.nodes[j];
        let mut peer = PeerConfig::new(
            n.engine.node_key(),
            vec![ipnet::IpNet::from(n.ip4), ipnet::IpNet::from(n.ip6)],
        );
        peer.disco_key = Some(n.engine.disco_key());
        peer.name = format!("node{j}");
        peer.endpoints = n.endpoints.clone();
        peer
    }

    /// Configures both nodes: the peer, the STUN server, the peer's relay,
    /// the local endpoint.
    fn start(&mut self) {
        for i in 0..2 {
            let j = 1 - i;
            let reconfig = node_reconfig(
                self.nodes[i].ip4,
                self.nodes[i].ip6,
                vec![self.peer_config(j)],
                Knobs::default(),
            );
            self.input(i, Input::Reconfig(Box::new(reconfig))).unwrap();
            let nat = NatConfig {
                stun_servers: vec![stun_server()],
                peer_relays: vec![PeerRelay {
                    peer: self.key(j),
                    addr: self.nodes[j].relay,
                }],
            };
            self.input(i, Input::SetNat(nat)).unwrap();
            let local = vec![self.nodes[i].private];
            self.input(i, Input::SetLocalEndpoints(local)).unwrap();
        }
    }

    fn input(&mut self, i: usize, input: Input<'_>) -> Result<InputOutcome, InputError> {
        let now = self.now;
        let r = self.nodes[i].engine.handle_input(now, input);
        self.drain(i);
        r
    }

    fn send(&mut self, at: Instant, from: SocketAddr, to: SocketAddr, data: Vec<u8>) {
        self.seq += 1;
        self.queue.push(Reverse(Datagram {
            at,
            seq: self.seq,
            from,
            to,
            data,
        }));
    }

    fn drain(&mut self, i: usize) {
        let mut updated_endpoints = false;
        while let Some(out) = self.nodes[i].engine.poll_output() {
            match out {
                Output::Transmit(t) => self.leave(i, t.dst, t.data),
                Output::TunWrite(p) => self.nodes[i].tun_out.push((self.now, p)),
                Output::Effect(e) => {
                    if let Effect::EndpointsChanged(endpoints) = &*e {
                        self.nodes[i].endpoints = endpoints.iter().map(|e| e.addr).collect();
                        updated_endpoints = true;
                    }
                    self.nodes[i].effects.push((self.now, *e));
                }
                Output::Event(e) => self.nodes[i].events.push((self.now, *e)),
                Output::Status(s) => self.nodes[i].statuses.push(*s),
                other => drop(other),
            }
        }
        if updated_endpoints {
            // Control pushes the new endpoints to the peer.
            let j = 1 - i;
            let delta = PeerDelta {
                upsert: vec![self.peer_config(i)],
                remove: vec![],
            };
            let now = self.now;
            self.nodes[j].engine.apply_peer_delta(now, &delta).unwrap();
            self.drain(j);
        }
    }

    /// A datagram leaves node `i` for `dst`: through its NAT, or to the relay.
    fn leave(&mut self, i: usize, dst: SocketAddr, data: Vec<u8>) {
        let j = 1 - i;
        if dst == self.nodes[j].relay {
            let from = self.nodes[i].relay;
            self.send(self.now + RELAY_DELAY, from, dst, data);
            return;
        }
        if dst.ip() == self.nodes[j].private.ip() {
            return; // another private network: unreachable
        }
        let n = &mut self.nodes[i];
        let next_port = 40000 + n.ports.len() as u16;
        let port = match n.mapping {
            Mapping::EndpointIndependent => *n.ports.entry(stun_server()).or_insert(40000),
            Mapping::PerDestination => *n.ports.entry(dst).or_insert(next_port),
        };
        if n.mapping == Mapping::EndpointIndependent {
            n.ports.insert(dst, port);
        }
        n.open.insert((port, dst));
        let public = SocketAddr::new(n.public_ip, port);
        self.send(self.now + HOP, public, dst, data);
    }

    /// A datagram arrives at its destination.
    fn arrive(&mut self, d: Datagram) {
        if d.to == stun_server() {
            if !self.stun_answers {
                return;
            }
            let Ok(request) = Message::from_bytes(&d.data) else {
                return;
            };
            let mut response = Message::builder_success(&request, MessageWriteVec::new());
            response
                .add_attribute(&XorMappedAddress::new(d.from, request.transaction_id()))
                .unwrap();
            let data = response.finish();
            self.send(self.now + HOP, stun_server(), d.from, data);
            return;
        }
        let Some(i) =
            (0..2).find(|&i| self.nodes[i].relay == d.to || self.nodes[i].public_ip == d.to.ip())
        else {
            return;
        };
        let relayed = self.nodes[i].relay == d.to;
        if !relayed {
            let between_nats = (0..2).any(|k| self.nodes[k].public_ip == d.from.ip());
            if between_nats && self.direct_cut {
                return;
            }
            if !self.nodes[i].open.contains(&(d.to.port(), d.from)) {
                self.filtered += 1;
                return;
            }
        }
        let now = self.now;
        self.nodes[i]
            .engine
            .handle_input(
                now,
                Input::Datagram {
                    from: d.from,
                    data: &d.data,
                },
            )
            .unwrap();
        self.drain(i);
    }

    fn run_until(&mut self, until: Instant) {
        for _ in 0..1_000_000 {
            let mut next = self.queue.peek().map(|Reverse(d)| d.at);
            for n in &mut self.nodes {
                if let Some(t) = n.engine.poll_timeout() {
                    next = Some(next.map_or(t, |x: Instant| x.min(t)));
                }
            }
            let Some(t) = next.filter(|t| *t <= until) else {
                self.now = self.now.max(until);
                return;
            };
            self.now = self.now.max(t);
            if self.queue.peek().is_some_and(|Reverse(d)| d.at <= self.now) {
                let Reverse(d) = self.queue.pop().unwrap();
                self.arrive(d);
                continue;
            }
            for i in 0..2 {
                if self.nodes[i]
                    .engine
                    .poll_timeout()
                    .is_some_and(|d| d <= self.now)
                {
                    let now = self.now;
                    self.nodes[i].engine.handle_timeout(now);
                    self.drain(i);
                }
            }
        }
        panic!("runaway simulation");
    }

    fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    /// Node `from` sends a UDP packet with `payload` to node `to` through
    /// its TUN.
    fn send_udp(&mut self, from: usize, to: usize, payload: &[u8]) {
        let src = SocketAddr::new(self.nodes[from].ip4, 5000);
        let dst = SocketAddr::new(self.nodes[to].ip4, 6000);
        let mut packet = Vec::new();
        wire::udp::emit_datagram(src, dst, payload, &mut packet).unwrap();
        self.input(from, Input::TunPacket(&packet)).unwrap();
    }

    fn delivered(&self, i: usize, payload: &[u8]) -> Vec<Instant> {
        self.nodes[i]
            .tun_out
            .iter()
            .filter(|(_, p)| p.windows(payload.len()).any(|w| w == payload))
            .map(|(t, _)| *t)
            .collect()
    }

    fn peer_status(&mut self, i: usize) -> PeerStatus {
        self.input(i, Input::StatusRequest).unwrap();
        let status = self.nodes[i].statuses.pop().expect("a status");
        status.peers[0].clone()
    }

    /// The first time node `i`'s path to its peer became `endpoint`.
    fn path_changed_to(&self, i: usize, endpoint: SocketAddr) -> Option<Instant> {
        self.path_changed_after(i, endpoint, self.base)
    }

    /// The first time after `after` that node `i`'s path to its peer
    /// became `endpoint`.
    fn path_changed_after(
        &self,
        i: usize,
        endpoint: SocketAddr,
        after: Instant,
    ) -> Option<Instant> {
        self.nodes[i].events.iter().find_map(|(t, e)| match e {
            Event::PathChanged {
                endpoint: Some(e), ..
            } if *e == endpoint && *t >= after => Some(*t),
            _ => None,
        })
    }

    fn public(&self, i: usize) -> SocketAddr {
        SocketAddr::new(self.nodes[i].public_ip, 40000)
    }

    fn secs(&self, t: Instant) -> f64 {
        t.duration_since(self.base).as_secs_f64()
    }
}

#[test]
fn stun_finds_the_reflexive_address_and_endpoints_are_reported() {
    let mut w = World::new([Mapping::EndpointIndependent; 2]);
    w.start();
    w.run_for(Duration::from_secs(1));
    let expected = vec![
        Endpoint {
            addr: w.nodes[0].private,
            kind: EndpointKind::Local,
        },
        Endpoint {
            addr: w.public(0),
            kind: EndpointKind::Stun,
        },
    ];
    let last = w.nodes[0].effects.iter().rev().find_map(|(_, e)| match e {
        Effect::EndpointsChanged(endpoints) => Some(endpoints.clone()),
        _ => None,
    });
    assert_eq!(last, Some(expected.clone()));
    w.input(0, Input::StatusRequest).unwrap();
    assert_eq!(w.nodes[0].statuses.last().unwrap().endpoints, expected);
    let c = w.nodes[0].engine.counters();
    assert_eq!((c.stun_requests_sent, c.stun_responses), (1, 1));

    // A forged answer to the next round, from the wrong address, changes
    // nothing; the real one arrives and is taken.
    w.run_for(STUN_REFRESH_INTERVAL);
    assert_eq!(w.nodes[0].engine.counters().stun_requests_sent, 2);
    let forged = {
        let request =
            Message::builder_request(stun_proto::types::message::BINDING, MessageWriteVec::new())
                .finish();
        let request = Message::from_bytes(&request).unwrap();
        let mut response = Message::builder_success(&request, MessageWriteVec::new());
        response
            .add_attribute(&XorMappedAddress::new(
                addr("192.0.2.66:1"),
                request.transaction_id(),
            ))
            .unwrap();
        response.finish()
    };
    w.input(
        0,
        Input::Datagram {
            from: stun_server(),
            data: &forged,
        },
    )
    .unwrap();
    assert_eq!(
        w.nodes[0].engine.counters().drop_stun_unknown_transaction,
        1
    );
    w.input(0, Input::StatusRequest).unwrap();
    assert_eq!(w.nodes[0].statuses.last().unwrap().endpoints, expected);

    // A major link change forgets the reflexive address and finds it again.
    let before = w.nodes[0].effects.len();
    w.input(
        0,
        Input::LinkChange(LinkChange {
            any_link_up: true,
            major: true,
        }),
    )
    .unwrap();
    w.run_for(Duration::from_secs(1));
    let changes: Vec<usize> = w.nodes[0].effects[before..]
        .iter()
        .filter_map(|(_, e)| match e {
            Effect::EndpointsChanged(endpoints) => Some(endpoints.len()),
            _ => None,
        })
        .collect();
    assert_eq!(changes, vec![1, 2]);
}

#[test]
fn bad_nat_settings_are_refused_and_the_old_ones_kept() {
    let mut w = World::new([Mapping::EndpointIndependent; 2]);
    w.start();
    w.run_for(Duration::from_secs(1));
    let key1 = w.key(1);
    let bad = NatConfig {
        stun_servers: vec![addr("0.0.0.0:3478")],
        peer_relays: vec![],
    };
    assert_eq!(
        w.input(0, Input::SetNat(bad)),
        Err(InputError::Nat(NatConfigError::BadStunServer(addr(
            "0.0.0.0:3478"
        ))))
    );
    let twice = NatConfig {
        stun_servers: vec![],
        peer_relays: vec![
            PeerRelay {
                peer: key1,
                addr: addr("192.0.2.9:1"),
            },
            PeerRelay {
                peer: key1,
                addr: addr("192.0.2.9:2"),
            },
        ],
    };
    assert_eq!(
        w.input(0, Input::SetNat(twice)),
        Err(InputError::Nat(NatConfigError::DuplicateRelayPeer(key1)))
    );
    assert!(matches!(
        w.input(0, Input::SetLocalEndpoints(vec![addr("10.0.0.2:0")])),
        Err(InputError::Nat(NatConfigError::BadLocalEndpoint(_)))
    ));
    // The running settings still work: the next round asks the same server.
    w.run_for(STUN_REFRESH_INTERVAL);
    assert_eq!(w.nodes[0].engine.counters().stun_requests_sent, 2);
    assert_eq!(w.nodes[0].endpoints.len(), 2);
}

/// Runs traffic from node 0 to node 1 (one packet every 500 ms) for `d`.
fn traffic(w: &mut World, d: Duration, tag: &[u8]) {
    let steps = (d.as_millis() / 500) as usize;
    for k in 0..steps {
        let mut payload = tag.to_vec();
        payload.extend_from_slice(format!("-{k}.").as_bytes());
        w.send_udp(0, 1, &payload);
        w.run_for(Duration::from_millis(500));
    }
}

#[test]
fn two_endpoint_independent_nats_punch_a_direct_path() {
    let mut w = World::new([Mapping::EndpointIndependent; 2]);
    w.start();
    w.run_for(Duration::from_secs(1));
    assert_eq!(w.nodes[1].endpoints, vec![w.nodes[1].private, w.public(1)]);
    let first = w.now;
    w.send_udp(0, 1, b"hello");
    w.run_for(Duration::from_secs(3));

    // Node 0 told node 1 over the relay where to find it...
    assert_eq!(w.nodes[0].engine.counters().disco_call_me_maybe_sent, 1);
    assert_eq!(w.nodes[1].engine.counters().disco_call_me_maybe_received, 1);
    // ...its first ping to node 1's NAT was dropped there, but opened its
    // own NAT for node 1's pings, whose pongs and our pings-back went
    // through: both ends have the direct path.
    assert!(w.filtered >= 1);
    let direct0 = w.path_changed_to(0, w.public(1)).expect("node 0 direct");
    let direct1 = w.path_changed_to(1, w.public(0)).expect("node 1 direct");
    println!(
        "first packet to direct path: node0 {:.3} s, node1 {:.3} s",
        (direct0 - first).as_secs_f64(),
        (direct1 - first).as_secs_f64()
    );
    assert!(direct0 - first < Duration::from_millis(500));
    assert!(direct1 - first < Duration::from_millis(500));
    assert_eq!(w.delivered(1, b"hello").len(), 1);

    traffic(&mut w, Duration::from_secs(20), b"flow");
    let s0 = w.peer_status(0);
    assert_eq!((s0.endpoint, s0.via_relay), (Some(w.public(1)), false));
    let s1 = w.peer_status(1);
    assert_eq!((s1.endpoint, s1.via_relay), (Some(w.public(0)), false));
    // Every packet arrived.
    for k in 0..40 {
        assert_eq!(
            w.delivered(1, format!("flow-{k}.").as_bytes()).len(),
            1,
            "flow-{k} at {:.3}",
            w.secs(w.now)
        );
    }
}

#[test]
fn a_symmetric_nat_falls_back_to_the_relay() {
    let mut w = World::new([Mapping::EndpointIndependent, Mapping::PerDestination]);
    w.start();
    w.run_for(Duration::from_secs(1));
    let first = w.now;
    w.send_udp(0, 1, b"hello");
    traffic(&mut w, Duration::from_secs(20), b"flow");
    let relay0 = w
        .path_changed_to(0, w.nodes[1].relay)
        .expect("node 0 relay");
    println!(
        "first packet to relay path: {:.3} s",
        (relay0 - first).as_secs_f64()
    );
    let s0 = w.peer_status(0);
    assert_eq!((s0.endpoint, s0.via_relay), (Some(w.nodes[1].relay), true));
    let s1 = w.peer_status(1);
    assert!(s1.via_relay, "node 1 uses {:?}", s1.endpoint);
    assert_eq!(w.delivered(1, b"hello").len(), 1);
    for k in 0..40 {
        assert_eq!(w.delivered(1, format!("flow-{k}.").as_bytes()).len(), 1);
    }
}

#[test]
fn traffic_moves_to_the_relay_when_the_direct_path_dies_and_back_when_it_returns() {
    let mut w = World::new([Mapping::EndpointIndependent; 2]);
    w.start();
    w.run_for(Duration::from_secs(1));
    traffic(&mut w, Duration::from_secs(5), b"warm");
    assert_eq!(w.peer_status(0).endpoint, Some(w.public(1)));

    w.direct_cut = true;
    let cut = w.now;
    traffic(&mut w, Duration::from_secs(20), b"cut");
    let to_relay = w
        .path_changed_after(0, w.nodes[1].relay, cut)
        .expect("moved to the relay");
    let failover = to_relay - cut;
    let lost = (0..40)
        .filter(|k| w.delivered(1, format!("cut-{k}.").as_bytes()).is_empty())
        .count();
    println!(
        "direct path cut: relay after {:.3} s, {lost} of 40 packets (one per 500 ms) lost",
        failover.as_secs_f64()
    );
    assert!(failover <= TRUST_UDP_ADDR_DURATION + DISCO_PING_TIMEOUT);
    assert!(w.peer_status(0).via_relay);
    // Everything sent after the move arrived.
    for k in ((failover.as_millis() / 500) as usize + 2)..40 {
        assert_eq!(w.delivered(1, format!("cut-{k}.").as_bytes()).len(), 1);
    }

    w.direct_cut = false;
    let healed = w.now;
    traffic(&mut w, Duration::from_secs(20), b"healed");
    let back = w
        .path_changed_after(0, w.public(1), healed)
        .expect("back to the direct path");
    println!(
        "direct path back after {:.3} s",
        (back - healed).as_secs_f64()
    );
    assert!(back - healed <= RELAY_UPGRADE_INTERVAL + Duration::from_secs(1));
    assert!(!w.peer_status(0).via_relay);
    for k in 0..40 {
        assert_eq!(w.delivered(1, format!("healed-{k}.").as_bytes()).len(), 1);
    }
}

#[test]
fn a_wake_after_the_direct_path_lapsed_unseen_goes_over_the_relay_too() {
    let mut w = World::new([Mapping::EndpointIndependent; 2]);
    w.start();
    w.run_for(Duration::from_secs(1));
    traffic(&mut w, Duration::from_secs(5), b"warm");
    assert_eq!(w.peer_status(0).endpoint, Some(w.public(1)));
    assert_eq!(w.nodes[0].engine.counters().sent_via_relay_too, 0);

    // Idle past the disco heartbeats and the trust window (the session
    // itself is still valid), then the direct path dies without anyone
    // seeing it, as a NAT mapping that lapsed during the idle period does.
    w.run_for(Duration::from_secs(90));
    w.direct_cut = true;
    w.send_udp(0, 1, b"wake");
    w.run_for(Duration::from_millis(500));
    // The direct path was untrusted, so the datagram went over the relay as
    // well (as the reference sends to its best address and DERP then), and
    // arrived although the direct copy was lost.
    assert_eq!(w.delivered(1, b"wake").len(), 1);
    assert!(w.nodes[0].engine.counters().sent_via_relay_too >= 1);
}

#[test]
fn a_trimmed_peer_wakes_over_its_last_direct_path_in_one_direct_round_trip() {
    let mut w = World::new([Mapping::EndpointIndependent; 2]);
    w.start();
    w.run_for(Duration::from_secs(1));
    traffic(&mut w, Duration::from_secs(5), b"warm");
    assert_eq!(w.peer_status(0).endpoint, Some(w.public(1)));

    // Idle past the lazy-peer threshold: each side trims the other out of
    // WireGuard. The direct path stays up (both NATs keep their mappings).
    w.run_for(LAZY_PEER_IDLE_THRESHOLD + Duration::from_secs(30));
    for i in 0..2 {
        assert_eq!(w.nodes[i].engine.counters().peers_trimmed, 1, "node {i}");
    }

    // The wake's handshake goes to the last best path as well as the
    // relay (its trust lapsed long ago), as the reference's magicsock
    // keeps an endpoint's best address while WireGuard drops the peer. So
    // the handshake and the packet behind it take one direct round trip
    // and a hop, not the relay's.
    let wake = w.now;
    w.send_udp(0, 1, b"wake");
    w.run_for(Duration::from_secs(1));
    let delivered = w.delivered(1, b"wake");
    assert_eq!(delivered.len(), 1);
    let took = delivered[0] - wake;
    println!("wake delivered after {:.3} s", took.as_secs_f64());
    assert!(
        took <= 3 * HOP + Duration::from_millis(1),
        "the wake took {took:?}: 3 direct hops are {:?}, the relay's one-way delay is {RELAY_DELAY:?}",
        3 * HOP
    );
    assert!(w.nodes[0].engine.counters().sent_via_relay_too >= 1);
    // Traffic stays on the direct path once the peers are awake.
    traffic(&mut w, Duration::from_secs(5), b"after");
    assert_eq!(w.peer_status(0).endpoint, Some(w.public(1)));
    assert!(!w.peer_status(0).via_relay);
}
