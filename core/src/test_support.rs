//! Test support (the `test-support` feature): a small virtual network for
//! back-to-back engine tests. Engines exchange datagrams through a priority
//! queue on virtual time, with no sockets. (quinn-proto's test `Pair` is the
//! model; the simulator crate is the big version of this.)
//!
//! Used by the core's own integration tests and by the engine fuzz case
//! (`fuzz/engine_case.rs`), which builds its reconfigs with [`node_reconfig`].
//! Not part of the engine: nothing in the crate uses it, and it is compiled
//! only with the feature.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::*;
use ipnet::IpNet;
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

/// The wall-clock time (seconds since the Unix epoch) at which the harness's
/// virtual time starts.
pub const WALL_CLOCK_EPOCH_SECS: u64 = 1_700_000_000;

/// One node: its engine and everything it produced.
pub struct Node {
    /// Its name (`node0`, `node1`, ...), also the engine's name.
    pub name: String,
    /// The engine under test.
    pub engine: Engine,
    /// Its node key.
    pub private: NodePrivateKey,
    /// Its current disco key (a restart draws a new one).
    pub disco_private: DiscoPrivateKey,
    /// The UDP address it is reached at.
    pub endpoint: SocketAddr,
    /// Its tunnel IPv4 address.
    pub ip4: IpAddr,
    /// Its tunnel IPv6 address.
    pub ip6: IpAddr,
    /// Every packet it wrote to its TUN.
    pub tun_out: Vec<(Instant, Vec<u8>)>,
    /// Every event it reported.
    pub events: Vec<(Instant, Event)>,
    /// Every effect it asked for.
    pub effects: Vec<(Instant, Effect)>,
    /// Every ping result it delivered.
    pub pings: Vec<(Instant, PingResult)>,
    /// Every status snapshot it produced.
    pub statuses: Vec<(Instant, Status)>,
    /// Every datagram it sent: when, where, how long.
    pub sent: Vec<(Instant, SocketAddr, usize)>,
    /// When each WireGuard (not disco) datagram was sent.
    pub sent_wg: Vec<Instant>,
    /// AllowedIPs its peers get for it besides its two addresses.
    pub extra_allowed: Vec<IpNet>,
    /// Endpoints its peers get for it besides its own.
    pub extra_endpoints: Vec<SocketAddr>,
    /// The persistent keepalive its peers configure for it.
    pub persistent_keepalive_secs: Option<u16>,
}

struct Arrival {
    at: Instant,
    seq: u64,
    to: usize,
    from: SocketAddr,
    /// The address it was sent to (the node's endpoint or an alias).
    via: SocketAddr,
    data: Vec<u8>,
}

impl PartialEq for Arrival {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Arrival {}
impl PartialOrd for Arrival {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Arrival {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// The virtual network.
pub struct Net {
    /// The start of virtual time.
    pub base: Instant,
    /// The current virtual time.
    pub now: Instant,
    /// The nodes, by index.
    pub nodes: Vec<Node>,
    /// The one-way latency between endpoints.
    pub latency: Duration,
    /// Directed links that drop everything: (from, to).
    pub cut: BTreeSet<(usize, usize)>,
    /// Extra endpoints that swallow datagrams (unreachable candidates).
    queue: BinaryHeap<Reverse<Arrival>>,
    seq: u64,
    /// One line per output while `record_trace` is on.
    pub trace: Vec<String>,
    /// Whether outputs are recorded in `trace`.
    pub record_trace: bool,
    /// Extra addresses that reach a node with their own one-way delay.
    pub aliases: std::collections::BTreeMap<SocketAddr, (usize, Duration)>,
    /// Addresses that drop everything sent to them.
    pub blackholed: BTreeSet<SocketAddr>,
    /// While a node handles an arrival: (node, sender, address it came in on).
    replying: Option<(usize, SocketAddr, SocketAddr)>,
}

/// The keys of node `i` in a net seeded with `seed`.
pub fn keys(seed: u64, i: usize) -> (NodePrivateKey, DiscoPrivateKey) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(1000) + i as u64);
    (
        NodePrivateKey::generate(&mut rng),
        DiscoPrivateKey::generate(&mut rng),
    )
}

impl Net {
    /// `n` nodes with one-way latency `latency`, not yet configured.
    pub fn new(
        n: usize,
        latency: Duration,
        engine_config: impl Fn(usize, &mut EngineConfig),
    ) -> Self {
        // The harness is the engine's outside world: it owns the clock, and
        // only uses this reading as the fixed base of virtual time.
        #[allow(clippy::disallowed_methods)]
        let base = Instant::now();
        let nodes = (0..n)
            .map(|i| {
                let (private, disco_private) = keys(1, i);
                let mut cfg = EngineConfig::new(private.clone(), disco_private.clone());
                cfg.name = format!("node{i}");
                engine_config(i, &mut cfg);
                Node {
                    name: cfg.name.clone(),
                    engine: Engine::new(cfg, base, 100 + i as u64),
                    private,
                    disco_private,
                    endpoint: format!("192.0.2.{}:41641", i + 1).parse().unwrap(),
                    ip4: format!("100.64.0.{}", i + 1).parse().unwrap(),
                    ip6: format!("fd7a:115c:a1e0::{}", i + 1).parse().unwrap(),
                    tun_out: Vec::new(),
                    events: Vec::new(),
                    effects: Vec::new(),
                    pings: Vec::new(),
                    statuses: Vec::new(),
                    sent: Vec::new(),
                    sent_wg: Vec::new(),
                    extra_allowed: Vec::new(),
                    extra_endpoints: Vec::new(),
                    persistent_keepalive_secs: None,
                }
            })
            .collect();
        Self {
            base,
            now: base,
            nodes,
            latency,
            cut: BTreeSet::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            trace: Vec::new(),
            record_trace: false,
            aliases: Default::default(),
            blackholed: BTreeSet::new(),
            replying: None,
        }
    }

    /// Node `i`'s public key.
    pub fn key(&self, i: usize) -> NodePublicKey {
        self.nodes[i].engine.node_key()
    }

    /// Node `j` as its peers configure it.
    pub fn peer_config(&self, j: usize) -> PeerConfig {
        let n = &self.nodes[j];
        let mut allowed = vec![IpNet::from(n.ip4), IpNet::from(n.ip6)];
        allowed.extend(n.extra_allowed.iter().copied());
        PeerConfig {
            public_key: n.engine.node_key(),
            disco_key: Some(n.engine.disco_key()),
            name: n.name.clone(),
            allowed_ips: allowed,
            endpoints: [vec![n.endpoint], n.extra_endpoints.clone()].concat(),
            persistent_keepalive_secs: n.persistent_keepalive_secs,
            preshared_key: None,
        }
    }

    /// The reconfig node `i` gets from control: every other node as a peer.
    pub fn reconfig_for(&self, i: usize, knobs: Knobs) -> Reconfig {
        let me = &self.nodes[i];
        let peers = (0..self.nodes.len())
            .filter(|&j| j != i)
            .map(|j| self.peer_config(j))
            .collect();
        node_reconfig(me.ip4, me.ip6, peers, knobs)
    }

    /// Pushes the full config to every node.
    pub fn configure_all(&mut self, knobs: Knobs) {
        for i in 0..self.nodes.len() {
            let rc = self.reconfig_for(i, knobs.clone());
            self.input(i, Input::Reconfig(Box::new(rc)))
                .expect("valid reconfig");
        }
    }

    /// Feeds one input to node `i` and drains its outputs into the network.
    pub fn input(&mut self, i: usize, input: Input<'_>) -> Result<InputOutcome, InputError> {
        self.enter_wall_clock();
        let now = self.now;
        let r = self.nodes[i].engine.handle_input(now, input);
        self.drain(i);
        r
    }

    /// Feeds `packets` to node `i` as one TUN burst
    /// ([`Engine::handle_tun_burst`]) and drains its outputs into the
    /// network. Returns how many packets the engine took.
    pub fn tun_burst(&mut self, i: usize, packets: &[Vec<u8>]) -> usize {
        self.enter_wall_clock();
        let now = self.now;
        let mut rest = packets.iter();
        let taken = self.nodes[i]
            .engine
            .handle_tun_burst(now, &mut |handle| match rest.next() {
                Some(packet) => {
                    handle(packet);
                    true
                }
                None => false,
            });
        self.drain(i);
        taken
    }

    /// Sends a UDP packet from node `from` to `dst` through its TUN.
    pub fn send_udp(&mut self, from: usize, dst: IpAddr, payload: &[u8]) -> Vec<u8> {
        let src = if dst.is_ipv4() {
            self.nodes[from].ip4
        } else {
            self.nodes[from].ip6
        };
        let mut packet = Vec::new();
        wire::udp::emit_datagram(
            SocketAddr::new(src, 5000),
            SocketAddr::new(dst, 6000),
            payload,
            &mut packet,
        )
        .unwrap();
        self.input(from, Input::TunPacket(&packet)).unwrap();
        packet
    }

    /// Starts ping `id` of `kind` from node `from` to `ip`.
    pub fn ping(&mut self, from: usize, ip: IpAddr, kind: PingKind, id: u64) {
        self.input(
            from,
            Input::Ping(PingRequest {
                id,
                ip,
                kind,
                size: 0,
            }),
        )
        .unwrap();
    }

    fn drain(&mut self, i: usize) {
        let now = self.now;
        while let Some(out) = self.nodes[i].engine.poll_output() {
            match out {
                Output::Transmit(t) => {
                    if self.record_trace {
                        self.trace.push(format!(
                            "{:>8.3} {} -> {} datagram {}B",
                            self.t(),
                            self.nodes[i].name,
                            t.dst,
                            t.data.len()
                        ));
                    }
                    self.nodes[i].sent.push((now, t.dst, t.data.len()));
                    if !wire::disco::looks_like_disco(&t.data) {
                        self.nodes[i].sent_wg.push(now);
                    }
                    let route = match self.nodes.iter().position(|n| n.endpoint == t.dst) {
                        Some(to) => Some((to, self.latency)),
                        None => self.aliases.get(&t.dst).map(|(to, d)| (*to, *d)),
                    };
                    if let Some((to, mut delay)) = route {
                        // An answer sent while handling an arrival leaves from the
                        // address that arrival came in on, over the same path.
                        let mut from = self.nodes[i].endpoint;
                        if let Some((node, sender, via)) = self.replying {
                            if node == i && sender == t.dst && via != from {
                                from = via;
                                if self.blackholed.contains(&via) {
                                    delay = Duration::MAX;
                                } else if let Some((_, d)) = self.aliases.get(&via) {
                                    delay = *d;
                                }
                            }
                        }
                        if !self.cut.contains(&(i, to))
                            && !self.blackholed.contains(&t.dst)
                            && delay != Duration::MAX
                        {
                            self.seq += 1;
                            self.queue.push(Reverse(Arrival {
                                at: now + delay,
                                seq: self.seq,
                                to,
                                from,
                                via: t.dst,
                                data: t.data.clone(),
                            }));
                        }
                    }
                    self.nodes[i].engine.recycle(t.data);
                }
                Output::TunWrite(p) => {
                    if self.record_trace {
                        self.trace.push(format!(
                            "{:>8.3} {} tun-write {}B",
                            self.t(),
                            self.nodes[i].name,
                            p.len()
                        ));
                    }
                    self.nodes[i].tun_out.push((now, p));
                }
                Output::Effect(e) => {
                    if self.record_trace {
                        self.trace.push(format!(
                            "{:>8.3} {} effect {}",
                            self.t(),
                            self.nodes[i].name,
                            effect_name(&e)
                        ));
                    }
                    self.nodes[i].effects.push((now, *e));
                }
                Output::Event(e) => {
                    if self.record_trace {
                        self.trace.push(format!(
                            "{:>8.3} {} event {}",
                            self.t(),
                            self.nodes[i].name,
                            event_name(&e, self)
                        ));
                    }
                    self.nodes[i].events.push((now, *e));
                }
                Output::PingResult(r) => {
                    if self.record_trace {
                        self.trace.push(format!(
                            "{:>8.3} {} ping {:?} {}",
                            self.t(),
                            self.nodes[i].name,
                            r.kind,
                            match &r.outcome {
                                PingOutcome::Pong { latency, .. } =>
                                    format!("pong {}ms", latency.as_millis()),
                                PingOutcome::Timeout => "timeout".into(),
                                PingOutcome::Error { message, .. } => format!("error {message}"),
                            }
                        ));
                    }
                    self.nodes[i].pings.push((now, *r));
                }
                Output::Status(s) => self.nodes[i].statuses.push((now, *s)),
                Output::Capture(_) => {}
            }
        }
    }

    fn t(&self) -> f64 {
        self.now.duration_since(self.base).as_secs_f64()
    }

    /// The next instant anything happens.
    fn next_event(&mut self) -> Option<Instant> {
        let mut next = self.queue.peek().map(|Reverse(a)| a.at);
        for n in &mut self.nodes {
            if let Some(t) = n.engine.poll_timeout() {
                next = Some(next.map_or(t, |x: Instant| x.min(t)));
            }
        }
        next
    }

    /// Points this thread's wall clock at the harness's virtual time
    /// ([`WALL_CLOCK_EPOCH_SECS`] plus the time since `base`), so that
    /// the WireGuard implementation's handshake stamps (its one wall-clock read, when a tunnel
    /// is created) follow virtual time as they follow real time in
    /// production: a tunnel re-created after a trim or restart stamps later
    /// than its predecessor, never earlier.
    fn enter_wall_clock(&self) {
        wgmesh_vclock::set(
            Duration::from_secs(WALL_CLOCK_EPOCH_SECS)
                + self.now.saturating_duration_since(self.base),
        );
    }

    /// Runs every event up to and including `until`; time ends at `until`.
    pub fn run_until(&mut self, until: Instant) {
        let mut steps = 0u64;
        while let Some(t) = self.next_event() {
            if t > until {
                break;
            }
            steps += 1;
            assert!(steps < 10_000_000, "runaway simulation");
            self.now = self.now.max(t);
            self.enter_wall_clock();
            if let Some(Reverse(a)) = self.queue.peek() {
                if a.at <= self.now {
                    let Reverse(a) = self.queue.pop().unwrap();
                    let now = self.now;
                    self.nodes[a.to]
                        .engine
                        .handle_input(
                            now,
                            Input::Datagram {
                                from: a.from,
                                data: &a.data,
                            },
                        )
                        .unwrap();
                    self.replying = Some((a.to, a.from, a.via));
                    self.drain(a.to);
                    self.replying = None;
                    continue;
                }
            }
            for i in 0..self.nodes.len() {
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

    /// Runs every event of the next `d`.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    /// Replaces node `i`'s engine: same node key, new disco key.
    pub fn restart(&mut self, i: usize, seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let disco = DiscoPrivateKey::generate(&mut rng);
        let mut cfg = EngineConfig::new(self.nodes[i].private.clone(), disco.clone());
        cfg.name = self.nodes[i].name.clone();
        self.nodes[i].disco_private = disco;
        // The old engine's pings died with it (a crash, not a close).
        self.nodes[i].pings.clear();
        self.nodes[i].engine = Engine::new(cfg, self.now, seed);
    }

    /// Whether node `i` has node `j` in WireGuard.
    pub fn configured(&self, i: usize, j: usize) -> bool {
        self.nodes[i].engine.is_peer_configured(&self.key(j)) == Some(true)
    }

    /// Packets that node `i` wrote to its TUN carrying `payload`.
    pub fn delivered(&self, i: usize, payload: &[u8]) -> Vec<Instant> {
        self.nodes[i]
            .tun_out
            .iter()
            .filter(|(_, p)| p.windows(payload.len()).any(|w| w == payload))
            .map(|(t, _)| *t)
            .collect()
    }
}

/// The reconfig of a node with tunnel addresses `ip4` and `ip6` and these
/// peers: the tailnet's CGNAT and ULA routes, MTU 1280, listen port 41641,
/// and the tailnet resolver.
pub fn node_reconfig(ip4: IpAddr, ip6: IpAddr, peers: Vec<PeerConfig>, knobs: Knobs) -> Reconfig {
    Reconfig {
        wireguard: Some(WgConfig {
            listen_port: 41641,
            peers,
        }),
        router: Some(RouterConfig {
            local_addrs: vec![IpNet::from(ip4), IpNet::from(ip6)],
            routes: vec![
                "100.64.0.0/10".parse().unwrap(),
                "fd7a:115c:a1e0::/48".parse().unwrap(),
            ],
            advertised_routes: vec![],
            mtu: 1280,
        }),
        dns: Some(DnsConfig {
            nameservers: vec![IpAddr::from([100, 100, 100, 100])],
            search_domains: vec!["example.ts.net".into()],
        }),
        knobs,
        primary_routes: vec![],
    }
}

fn effect_name(e: &Effect) -> String {
    match e {
        Effect::ApplyRouter(_) => "apply-router".into(),
        Effect::ApplyDns(_) => "apply-dns".into(),
        Effect::SetListenPort(p) => format!("listen-port {p}"),
        other => format!("{other:?}"),
    }
}

fn event_name(e: &Event, net: &Net) -> String {
    let name = |k: &NodePublicKey| {
        net.nodes
            .iter()
            .find(|n| n.engine.node_key() == *k)
            .map_or("?".to_string(), |n| n.name.clone())
    };
    match e {
        Event::PeerConfigured { peer, woken } => {
            format!("peer-configured {} woken={:?}", name(peer), woken)
        }
        Event::PeerRemoved { peer, reason } => format!("peer-removed {} {:?}", name(peer), reason),
        Event::SessionFlushed { peer, .. } => format!("session-flushed {}", name(peer)),
        Event::HandshakeCompleted { peer, .. } => format!("handshake-completed {}", name(peer)),
        Event::PathChanged {
            peer,
            endpoint,
            latency,
        } => format!("path-changed {} {:?} {:?}", name(peer), endpoint, latency),
        other => format!("{other:?}"),
    }
}
