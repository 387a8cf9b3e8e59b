//! The stateful engine fuzz case: three engines on a virtual network and
//! virtual time, driven by an arbitrary sequence of operations decoded from
//! bytes, with the engine's invariants checked after every operation.
//!
//! Shared (by `#[path]`) by the `engine` fuzz target and by
//! `core/tests/fuzz_corpus_replay.rs`, which replays the committed corpus
//! through exactly this code under `cargo test`. It depends on nothing but
//! `std`, `ipnet` and `wgmesh-core` (with its `test-support` feature, whose
//! `node_reconfig` builds the nodes' reconfigs as the core's own tests do).
//!
//! Nodes 0 and 1 know each other from the start; node 2 is an outsider that
//! knows both but is known by nobody until a reconfig operation adds it.
//! Operations: TUN traffic (UDP, TCP SYN, ICMP echo, raw bytes), raw and
//! forged datagrams, advancing time (milliseconds to an hour), dropping,
//! corrupting and replaying datagrams in flight, valid and invalid reconfigs,
//! peer deltas, pings of every kind, link changes, status requests, capture,
//! packet filters, restarts (new disco key) and close.
//!
//! Invariants: no panic; every refused input is an invalid reconfig or input
//! after close, and a refused reconfig changes nothing; configured peers are
//! a subset of the full config; counters never decrease; every ping ends
//! exactly once (with its own id) and within `PING_TIMEOUT`; a deadline in
//! the past is consumed by `handle_timeout` (no timer livelock); every TUN
//! write is a valid IP packet; every transmit is non-empty.
#![allow(dead_code, clippy::disallowed_methods)]

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use wgmesh_core::filter::{FilterAction, FilterRule, PacketFilter};
use wgmesh_core::*;

/// Nodes in the world.
pub const NODES: usize = 3;
/// Operations decoded from one input at most (bounds the cost of one run).
pub const MAX_OPS: usize = 96;
/// One-way latency of the virtual network.
const LATENCY: Duration = Duration::from_millis(5);
/// Events one `advance` may process before it is declared a livelock.
const MAX_STEPS: usize = 200_000;
/// Timer firings at one instant before it is declared a timer livelock.
const MAX_SAME_INSTANT: usize = 10_000;

/// A byte reader that yields zeros once the input is exhausted.
pub struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Reads `data` from the start.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }
    /// True when every byte was read.
    pub fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
    /// One byte, 0 past the end.
    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    /// Two bytes, big-endian.
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    /// Up to `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = (start + n).min(self.data.len());
        self.pos = start + n;
        &self.data[start..end]
    }
}

/// One datagram on the virtual wire.
struct InFlight {
    at: Instant,
    to: usize,
    from: SocketAddr,
    data: Vec<u8>,
}

struct Node {
    engine: Engine,
    private: NodePrivateKey,
    disco: DiscoPrivateKey,
    endpoint: SocketAddr,
    ip4: IpAddr,
    ip6: IpAddr,
    /// Which nodes this node's config holds as peers.
    knows: [bool; NODES],
    /// Extra subnet AllowedIP this node is announced with (makes it untrimmable).
    subnet: bool,
    knobs: Knobs,
    closed: bool,
    /// Pings started on the current engine and not yet ended.
    outstanding: BTreeMap<PingId, Instant>,
    next_ping_id: PingId,
    last_counters: Counters,
    incarnation: u64,
}

/// The whole world of one fuzz case.
pub struct World {
    base: Instant,
    now: Instant,
    nodes: Vec<Node>,
    wire: VecDeque<InFlight>,
    /// Recently transmitted datagrams, for replay.
    recent: VecDeque<(usize, SocketAddr, Vec<u8>)>,
    scratch: Vec<u8>,
}

fn node_keys(i: usize, generation: u8) -> (NodePrivateKey, DiscoPrivateKey) {
    let mut node = [0u8; 32];
    // X25519 clamps the low three bits of byte 0: vary other bytes.
    node[1] = 1 + i as u8;
    node[31] = 0x40;
    let mut disco = [0u8; 32];
    disco[1] = 100 + i as u8;
    disco[2] = generation;
    disco[31] = 0x40;
    (
        NodePrivateKey::from_bytes(node),
        DiscoPrivateKey::from_bytes(disco),
    )
}

fn engine_for(
    i: usize,
    private: &NodePrivateKey,
    disco: &DiscoPrivateKey,
    now: Instant,
    seed: u64,
) -> Engine {
    let mut cfg = EngineConfig::new(private.clone(), disco.clone());
    cfg.name = format!("node{i}");
    cfg.max_queued_packets_per_peer = 8;
    Engine::new(cfg, now, seed)
}

impl World {
    /// Three fresh engines; nodes 0 and 1 configured with each other.
    pub fn new() -> Self {
        let base = Instant::now();
        let nodes = (0..NODES)
            .map(|i| {
                let (private, disco) = node_keys(i, 0);
                Node {
                    engine: engine_for(i, &private, &disco, base, 7 + i as u64),
                    private,
                    disco,
                    endpoint: SocketAddr::new(IpAddr::from([192, 0, 2, 1 + i as u8]), 41641),
                    ip4: IpAddr::from([100, 64, 0, 1 + i as u8]),
                    ip6: format!("fd7a:115c:a1e0::{}", i + 1).parse().unwrap(),
                    knows: [false; NODES],
                    subnet: false,
                    knobs: Knobs::default(),
                    closed: false,
                    outstanding: BTreeMap::new(),
                    next_ping_id: 1,
                    last_counters: Counters::default(),
                    incarnation: 0,
                }
            })
            .collect();
        let mut world = Self {
            base,
            now: base,
            nodes,
            wire: VecDeque::new(),
            recent: VecDeque::new(),
            scratch: Vec::new(),
        };
        // Who knows whom at the start: 0 <-> 1, and 2 knows both.
        world.nodes[0].knows = [false, true, false];
        world.nodes[1].knows = [true, false, false];
        world.nodes[2].knows = [true, true, false];
        for i in 0..NODES {
            world.reconfigure(i);
        }
        world
    }

    fn peer_config(&self, j: usize) -> PeerConfig {
        let n = &self.nodes[j];
        let mut allowed = vec![IpNet::from(n.ip4), IpNet::from(n.ip6)];
        if n.subnet {
            allowed.push(format!("10.{}.0.0/16", j + 1).parse().unwrap());
        }
        PeerConfig {
            public_key: n.private.public_key(),
            disco_key: Some(n.disco.public_key()),
            name: format!("node{j}"),
            allowed_ips: allowed,
            endpoints: vec![n.endpoint],
            persistent_keepalive_secs: None,
            preshared_key: None,
        }
    }

    fn reconfig_for(&self, i: usize) -> Reconfig {
        let me = &self.nodes[i];
        let peers = (0..NODES)
            .filter(|&j| j != i && me.knows[j])
            .map(|j| self.peer_config(j))
            .collect();
        test_support::node_reconfig(me.ip4, me.ip6, peers, me.knobs.clone())
    }

    /// Pushes node `i` its current (valid) full config.
    fn reconfigure(&mut self, i: usize) {
        let rc = self.reconfig_for(i);
        let r = self.input(i, Input::Reconfig(Box::new(rc)));
        match r {
            Ok(_) => {}
            Err(InputError::Closed) if self.nodes[i].closed => {}
            Err(e) => panic!("valid reconfig of node{i} refused: {e}"),
        }
    }

    /// Feeds one input to node `i` and drains its outputs.
    fn input(&mut self, i: usize, input: Input<'_>) -> Result<InputOutcome, InputError> {
        let now = self.now;
        let is_ping = match &input {
            Input::Ping(p) => Some(p.id),
            _ => None,
        };
        let r = self.nodes[i].engine.handle_input(now, input);
        if let Some(id) = is_ping {
            if r.is_ok() {
                self.nodes[i].outstanding.insert(id, now);
            }
        }
        if let Err(InputError::Closed) = r {
            assert!(
                self.nodes[i].closed,
                "node{i}: Closed error from an open engine"
            );
        }
        self.drain(i);
        r
    }

    fn drain(&mut self, i: usize) {
        let now = self.now;
        while let Some(out) = self.nodes[i].engine.poll_output() {
            match out {
                Output::Transmit(t) => {
                    assert!(!t.data.is_empty(), "node{i}: empty transmit");
                    assert!(
                        t.data.len() <= MAX_PACKET_SIZE + 64,
                        "node{i}: oversized transmit"
                    );
                    if let Some(to) = self.nodes.iter().position(|n| n.endpoint == t.dst) {
                        let from = self.nodes[i].endpoint;
                        if self.recent.len() >= 8 {
                            self.recent.pop_front();
                        }
                        self.recent.push_back((to, from, t.data.clone()));
                        if self.wire.len() < 4096 {
                            self.wire.push_back(InFlight {
                                at: now + LATENCY,
                                to,
                                from,
                                data: t.data.clone(),
                            });
                        }
                    }
                    self.nodes[i].engine.recycle(t.data);
                }
                Output::TunWrite(p) => {
                    if let Err(e) = wire::ip::IpHeader::parse(&p) {
                        panic!("node{i}: TUN write of an invalid IP packet ({e:?}): {p:02x?}");
                    }
                    self.nodes[i].engine.recycle(p);
                }
                Output::PingResult(r) => {
                    let started = self.nodes[i].outstanding.remove(&r.id);
                    let Some(started) = started else {
                        panic!(
                            "node{i}: ping {} ended twice or was never started: {r:?}",
                            r.id
                        );
                    };
                    assert!(
                        now.duration_since(started) <= PING_TIMEOUT + Duration::from_millis(1),
                        "node{i}: ping {} ended after {:?}",
                        r.id,
                        now.duration_since(started)
                    );
                }
                _ => {}
            }
        }
    }

    /// Runs the network and the engines' timers up to `until`.
    fn advance(&mut self, until: Instant) {
        let mut steps = 0usize;
        let mut same_instant = 0usize;
        let mut last = self.now;
        loop {
            let mut next = self.wire.front().map(|d| d.at);
            for n in &mut self.nodes {
                if let Some(t) = n.engine.poll_timeout() {
                    next = Some(next.map_or(t, |x| x.min(t)));
                }
            }
            let Some(t) = next else { break };
            if t > until {
                break;
            }
            steps += 1;
            assert!(steps < MAX_STEPS, "runaway: {steps} events in one advance");
            self.now = self.now.max(t);
            if self.now == last {
                same_instant += 1;
                assert!(same_instant < MAX_SAME_INSTANT, "livelock at one instant");
            } else {
                same_instant = 0;
                last = self.now;
            }
            if self.wire.front().is_some_and(|d| d.at <= self.now) {
                let d = self.wire.pop_front().unwrap();
                let now = self.now;
                let r = self.nodes[d.to].engine.handle_input(
                    now,
                    Input::Datagram {
                        from: d.from,
                        data: &d.data,
                    },
                );
                assert!(r.is_ok(), "a datagram was refused: {r:?}");
                self.drain(d.to);
                continue;
            }
            for i in 0..NODES {
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
        self.now = self.now.max(until);
    }

    fn check(&mut self) {
        for (i, n) in self.nodes.iter_mut().enumerate() {
            let full = n.engine.full_config_peers();
            for k in n.engine.configured_peers() {
                assert!(
                    full.contains(&k),
                    "node{i}: configured peer outside the full config"
                );
            }
            assert!(
                n.engine.configured_peer_count() <= n.engine.peer_count(),
                "node{i}: more configured than known peers"
            );
            assert_eq!(
                n.engine.pending_ping_count(),
                n.outstanding.len(),
                "node{i}: pending pings disagree with pings started and not ended"
            );
            let c = n.engine.counters().clone();
            for ((name, new), (_, old)) in c.iter().zip(n.last_counters.iter()) {
                assert!(
                    new >= old,
                    "node{i}: counter {name} went down: {old} -> {new}"
                );
            }
            n.last_counters = c;
        }
    }

    fn ip_of(&self, j: usize, v6: bool) -> IpAddr {
        if v6 {
            self.nodes[j].ip6
        } else {
            self.nodes[j].ip4
        }
    }

    /// Executes one operation read from `r`.
    fn op(&mut self, r: &mut Reader<'_>) {
        let op = r.u8();
        let a = usize::from(r.u8()) % NODES;
        let b = (a + 1 + usize::from(op >> 7)) % NODES;
        match op % 20 {
            0 | 1 => {
                // UDP through the TUN to a peer.
                let v6 = r.u8() & 1 == 1;
                let len = usize::from(r.u8());
                let payload = r.bytes(len).to_vec();
                let src = SocketAddr::new(self.ip_of(a, v6), 5000);
                let dst = SocketAddr::new(self.ip_of(b, v6), 6000);
                let mut p = std::mem::take(&mut self.scratch);
                wire::udp::emit_datagram(src, dst, &payload, &mut p).unwrap();
                let _ = self.input(a, Input::TunPacket(&p));
                self.scratch = p;
            }
            2 => {
                // A TCP segment (SYN, SYN-ACK or RST by the flag byte).
                let v6 = r.u8() & 1 == 1;
                let flags = r.u8();
                let src = SocketAddr::new(self.ip_of(a, v6), 40000 + u16::from(r.u8()));
                let dst = SocketAddr::new(self.ip_of(b, v6), 22);
                let mut p = std::mem::take(&mut self.scratch);
                wire::tcp::emit_segment(src, dst, 1, 0, flags, b"", &mut p).unwrap();
                let _ = self.input(a, Input::TunPacket(&p));
                self.scratch = p;
            }
            3 => {
                // An ICMP echo request or reply.
                let v6 = r.u8() & 1 == 1;
                let kind = if r.u8() & 1 == 0 {
                    wire::icmp::EchoKind::Request
                } else {
                    wire::icmp::EchoKind::Reply
                };
                let (ident, seq) = (r.u16(), r.u16());
                let mut p = std::mem::take(&mut self.scratch);
                wire::icmp::emit_echo(
                    self.ip_of(a, v6),
                    self.ip_of(b, v6),
                    kind,
                    ident,
                    seq,
                    b"fuzz",
                    &mut p,
                )
                .unwrap();
                let _ = self.input(a, Input::TunPacket(&p));
                self.scratch = p;
            }
            4 => {
                // Raw bytes from the TUN, biased towards IP.
                let first = r.u8();
                let len = usize::from(r.u8());
                let mut p = r.bytes(len).to_vec();
                if let Some(f) = p.first_mut() {
                    *f = match first % 3 {
                        0 => 0x45,
                        1 => 0x60,
                        _ => *f,
                    };
                }
                let _ = self.input(a, Input::TunPacket(&p));
            }
            5 => {
                // A raw datagram from b's endpoint, biased towards WireGuard and disco.
                let kind = r.u8();
                let len = usize::from(r.u16() % 400);
                let mut d = r.bytes(len).to_vec();
                match kind % 6 {
                    0..=3 if d.len() >= 4 => {
                        d[..4].copy_from_slice(&u32::from(kind % 6 + 1).to_le_bytes())
                    }
                    4 => {
                        let mut x = wire::disco::MAGIC.to_vec();
                        x.extend_from_slice(&self.nodes[b].disco.public_key().0);
                        x.extend_from_slice(&d);
                        d = x;
                    }
                    _ => {}
                }
                let from = self.nodes[b].endpoint;
                let _ = self.input(a, Input::Datagram { from, data: &d });
            }
            6 => {
                // A well-formed disco message sealed by b (or its old key), to a.
                let mut tx = [0u8; 12];
                tx.copy_from_slice(&[r.u8(); 12]);
                let msg = match r.u8() % 3 {
                    0 => wire::disco::DiscoMessage::Ping {
                        tx_id: tx,
                        node_key: Some(self.nodes[b].private.public_key().0),
                    },
                    1 => wire::disco::DiscoMessage::Pong {
                        tx_id: tx,
                        src: SocketAddr::new(IpAddr::from([198, 51, 100, r.u8()]), r.u16()),
                    },
                    _ => wire::disco::DiscoMessage::CallMeMaybe {
                        endpoints: (0..r.u8() % 5)
                            .map(|k| SocketAddr::new(IpAddr::from([192, 0, 2, 1 + k]), 41641))
                            .collect(),
                    },
                };
                let sender = self.nodes[b].disco.clone();
                let mut nonce = [0u8; 24];
                nonce[..2].copy_from_slice(&r.u16().to_be_bytes());
                let mut out = Vec::new();
                wire::disco::seal(
                    sender.as_bytes(),
                    &sender.public_key().0,
                    &self.nodes[a].disco.public_key().0,
                    nonce,
                    &msg,
                    &mut out,
                );
                let from = if r.u8() & 1 == 0 {
                    self.nodes[b].endpoint
                } else {
                    SocketAddr::new(IpAddr::from([203, 0, 113, 9]), 1234)
                };
                let _ = self.input(a, Input::Datagram { from, data: &out });
            }
            7 => {
                let ms = u64::from(r.u8()) * 4;
                let until = self.now + Duration::from_millis(ms);
                self.advance(until);
            }
            8 => {
                // Up to about an hour.
                let s = u64::from(r.u8()) * 15;
                let until = self.now + Duration::from_secs(s);
                self.advance(until);
            }
            9 => {
                // Drop, corrupt or duplicate the datagram at the head of the wire.
                let how = r.u8();
                let at = usize::from(r.u16());
                let x = r.u8() | 1;
                match how % 3 {
                    0 => {
                        self.wire.pop_front();
                    }
                    1 => {
                        if let Some(d) = self.wire.front_mut() {
                            let n = d.data.len();
                            d.data[at % n] ^= x;
                        }
                    }
                    _ => {
                        if let Some(d) = self.wire.front() {
                            let copy = InFlight {
                                at: d.at,
                                to: d.to,
                                from: d.from,
                                data: d.data.clone(),
                            };
                            self.wire.push_back(copy);
                        }
                    }
                }
            }
            10 => {
                // Replay a recent datagram, maybe from another address.
                let k = usize::from(r.u8());
                let other = r.u8() & 1 == 1;
                if !self.recent.is_empty() {
                    let (to, from, data) = self.recent[k % self.recent.len()].clone();
                    let from = if other {
                        SocketAddr::new(IpAddr::from([203, 0, 113, 7]), 999)
                    } else {
                        from
                    };
                    let _ = self.input(to, Input::Datagram { from, data: &data });
                }
            }
            11 => {
                // A valid reconfig: who a knows, a's knobs, b's subnet.
                let bits = r.u8();
                let node = &mut self.nodes[a];
                node.knows[b] = bits & 1 == 1 || b != 2 && bits & 2 == 0;
                node.knobs.keep_full_wg_config = bits & 4 != 0;
                node.knobs.fake_icmp_echo = bits & 8 != 0;
                node.knobs.peerapi_port = (bits & 16 != 0).then_some(8080);
                node.knobs.path_mtu_discovery = bits & 32 != 0;
                node.knobs.randomize_client_port = bits & 64 != 0;
                if bits & 128 != 0 {
                    self.nodes[b].subnet = !self.nodes[b].subnet;
                    for j in 0..NODES {
                        if self.nodes[j].knows[b] {
                            self.reconfigure(j);
                        }
                    }
                }
                self.reconfigure(a);
            }
            12 => {
                // An invalid reconfig: refused, nothing changes.
                let mut rc = self.reconfig_for(a);
                let kind = r.u8();
                match kind % 7 {
                    0 => rc.router = None,
                    1 => rc.dns = None,
                    2 => rc.wireguard = None,
                    3 => {
                        let me = PeerConfig::new(self.nodes[a].private.public_key(), vec![]);
                        rc.wireguard.as_mut().unwrap().peers.push(me);
                    }
                    4 => {
                        let p = self.peer_config(b);
                        rc.wireguard.as_mut().unwrap().peers.push(p);
                        rc.wireguard
                            .as_mut()
                            .unwrap()
                            .peers
                            .push(self.peer_config(b));
                    }
                    5 => {
                        // A third key claiming b's address.
                        let mut thief = self.peer_config(b);
                        thief.public_key = NodePrivateKey::from_bytes([0x77; 32]).public_key();
                        let wg = rc.wireguard.as_mut().unwrap();
                        if !wg
                            .peers
                            .iter()
                            .any(|p| p.public_key == self.nodes[b].private.public_key())
                        {
                            wg.peers.push(self.peer_config(b));
                        }
                        wg.peers.push(thief);
                    }
                    _ => rc.router.as_mut().unwrap().mtu = 100,
                }
                let before = (
                    self.nodes[a].engine.full_config_peers(),
                    self.nodes[a].engine.configured_peers(),
                    self.nodes[a].engine.counters().reconfigs_applied,
                );
                let res = self.input(a, Input::Reconfig(Box::new(rc)));
                match res {
                    Err(InputError::Reconfig(_)) => {}
                    Err(InputError::Closed) => {}
                    other => panic!("invalid reconfig (kind {}) accepted: {other:?}", kind % 7),
                }
                let after = (
                    self.nodes[a].engine.full_config_peers(),
                    self.nodes[a].engine.configured_peers(),
                    self.nodes[a].engine.counters().reconfigs_applied,
                );
                assert_eq!(before, after, "a refused reconfig changed the state");
            }
            13 => {
                // A peer delta: remove b, or upsert b with its current config.
                let now = self.now;
                if self.nodes[a].closed {
                    return;
                }
                let remove = r.u8() & 1 == 1;
                let delta = if remove {
                    PeerDelta {
                        upsert: vec![],
                        remove: vec![self.nodes[b].private.public_key()],
                    }
                } else {
                    PeerDelta {
                        upsert: vec![self.peer_config(b)],
                        remove: vec![],
                    }
                };
                let res = self.nodes[a].engine.apply_peer_delta(now, &delta);
                assert!(res.is_ok(), "a valid peer delta was refused: {res:?}");
                self.nodes[a].knows[b] = !remove;
                self.drain(a);
            }
            14 => {
                let kind =
                    [PingKind::Disco, PingKind::Tsmp, PingKind::Icmp][usize::from(r.u8() % 3)];
                let which = r.u8();
                let ip = match which % 5 {
                    0 | 1 => self.ip_of(b, which % 5 == 1),
                    2 => self.nodes[a].ip4,
                    3 => IpAddr::from([10, 2, 0, 9]),
                    _ => IpAddr::from([198, 18, 0, 1]),
                };
                let id = self.nodes[a].next_ping_id;
                self.nodes[a].next_ping_id += 1;
                let size = usize::from(r.u8()) * 8;
                let _ = self.input(a, Input::Ping(PingRequest { id, ip, kind, size }));
            }
            15 => {
                let bits = r.u8();
                let _ = self.input(
                    a,
                    Input::LinkChange(LinkChange {
                        any_link_up: bits & 1 == 0,
                        major: bits & 2 != 0,
                    }),
                );
            }
            16 => {
                let input = match r.u8() % 5 {
                    0 | 1 => Input::StatusRequest,
                    2 => Input::SetCapture(true),
                    3 => Input::SetCapture(false),
                    _ => Input::SetPacketFilter(if r.u8() & 1 == 0 {
                        PacketFilter::allow_all()
                    } else {
                        PacketFilter {
                            rules: vec![FilterRule {
                                src: "100.64.0.0/10".parse().unwrap(),
                                dst: "0.0.0.0/0".parse().unwrap(),
                                protocol: Some(wire::ip::PROTO_UDP),
                                dst_ports: Some((6000, 6000)),
                                action: FilterAction::Drop,
                            }],
                            default_action: FilterAction::Accept,
                        }
                    }),
                };
                let _ = self.input(a, input);
            }
            17 => {
                // Restart a: new engine, new disco key; control tells the others.
                let generation = r.u8();
                let (_, disco) = node_keys(a, generation);
                let n = &mut self.nodes[a];
                n.incarnation += 1;
                n.disco = disco;
                n.engine = engine_for(a, &n.private, &n.disco, self.now, 1000 + n.incarnation);
                n.closed = false;
                n.outstanding.clear();
                n.last_counters = Counters::default();
                self.reconfigure(a);
                for j in 0..NODES {
                    if j != a && self.nodes[j].knows[a] {
                        self.reconfigure(j);
                    }
                }
            }
            18 => {
                // Close (rarely).
                if r.u8() == 0xc1 {
                    let _ = self.input(a, Input::Close);
                    self.nodes[a].closed = true;
                    assert!(self.nodes[a].engine.is_closed());
                    assert_eq!(
                        self.nodes[a].engine.pending_ping_count(),
                        0,
                        "close left pings"
                    );
                    assert!(
                        self.nodes[a].outstanding.is_empty(),
                        "close did not end every ping"
                    );
                }
            }
            _ => {
                // Many packets at once to a possibly trimmed peer (queue bounds).
                let count = r.u8() % 40;
                let v6 = r.u8() & 1 == 1;
                for k in 0..count {
                    let src = SocketAddr::new(self.ip_of(a, v6), 5000);
                    let dst = SocketAddr::new(self.ip_of(b, v6), 6000);
                    let mut p = std::mem::take(&mut self.scratch);
                    wire::udp::emit_datagram(src, dst, &[k; 32], &mut p).unwrap();
                    let _ = self.input(a, Input::TunPacket(&p));
                    self.scratch = p;
                }
            }
        }
    }
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs one fuzz case. Panics when an invariant breaks.
pub fn run(data: &[u8]) {
    let mut world = World::new();
    world.check();
    let mut r = Reader::new(data);
    let mut ops = 0;
    while !r.done() && ops < MAX_OPS {
        if std::env::var_os("ENGINE_CASE_DEBUG").is_some() {
            eprintln!("op {ops} at byte {}", r.pos);
        }
        world.op(&mut r);
        world.check();
        ops += 1;
    }
    // Every ping ends within PING_TIMEOUT.
    let until = world.now + PING_TIMEOUT + Duration::from_millis(10);
    world.advance(until);
    world.check();
    for (i, n) in world.nodes.iter().enumerate() {
        assert!(
            n.outstanding.is_empty(),
            "node{i}: pings never ended: {:?}",
            n.outstanding
        );
    }
}
