//! The event backend and the test harness: a whole tailnet of [`Engine`]s on
//! virtual time.
//!
//! Every node is one sans-IO engine. A priority queue ordered by
//! `(virtual time, sequence number)` holds what is due next: datagram
//! arrivals, control-plane deliveries, engine deadlines from
//! [`Engine::poll_timeout`], restarts and the harness's own traffic timers.
//! Time jumps straight to the next entry, so idle minutes cost nothing. Every
//! `Instant` handed to an engine is one fixed base `Instant` plus the virtual
//! elapsed time; every random choice (keys, loss, jitter, engine seeds) comes
//! from the seed through separate ChaCha streams.
//!
//! After each input the harness drains [`Engine::poll_output`] and acts like
//! the rest of the world would: datagrams travel the virtual network, TUN
//! writes reach a small model of the node's operating system (which answers
//! ICMP echo requests, counts UDP deliveries and runs a TCP-like
//! request/response exchange with retransmits), and events, effects and ping
//! results are written to the [`Trace`]. Invariants are checked after every
//! step; a broken one is recorded as a [`Violation`], never a panic.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use wgmesh_core::wire::{self, IpHeader};
use wgmesh_core::{
    DiscoPrivateKey, DiscoPublicKey, DnsConfig, Effect, Engine, EngineConfig, Event, Input,
    InputOutcome, Knobs, LAZY_PEER_IDLE_THRESHOLD, LinkChange, NodePrivateKey, NodePublicKey,
    Output, PING_TIMEOUT, PeerConfig, PingKind, PingOutcome, PingRequest,
    RECEIVE_ACTIVITY_GRANULARITY, Reconfig, ReconfigOutcome, RemoveReason, RouterConfig,
    TestingKnobs, WakeReason, WgConfig,
};

use crate::trace::{Category, Keep, Trace};

/// The UDP port every node's WireGuard socket listens on.
pub const WG_PORT: u16 = 41641;
/// The UDP port the harness's datagram streams are sent to.
pub const SINK_PORT: u16 = 9;
/// The TCP port the harness's request/response flows connect to.
pub const FLOW_PORT: u16 = 80;
/// The first retransmission timeout of a flow; it doubles on every retry.
pub const FLOW_INITIAL_RTO: Duration = Duration::from_secs(1);
/// Attempts per flow stage before the flow is declared failed.
pub const FLOW_MAX_ATTEMPTS: u32 = 6;
/// Events processed within one virtual millisecond before the harness declares a livelock.
const MAX_EVENTS_PER_INSTANT: u64 = 1_000_000;
/// Queue entries a run may process by default before it is stopped.
pub const DEFAULT_MAX_STEPS: u64 = 200_000_000;
/// Violations kept in full; later ones are only counted.
const MAX_KEPT_VIOLATIONS: usize = 200;
/// Nesting depth of OS reactions (a reply to a reply ...) before the harness stops.
const MAX_OS_DEPTH: u32 = 8;

/// A node's index in the tailnet, in the order nodes were added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub usize);

/// How a node is set up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSpec {
    /// Its name (in traces, ping results and scenario files).
    pub name: String,
    /// `EngineConfig::trim_override`: `Some(true)` forces lazy peers on,
    /// `Some(false)` off, `None` follows the `keep_full_wg_config` knob.
    pub trim_override: Option<bool>,
    /// `TestingKnobs::disable_disco_key_flush` for this node's engine.
    pub disable_disco_key_flush: bool,
    /// The `keep_full_wg_config` knob control sends this node (`None`: the tailnet default).
    pub keep_full_wg_config: Option<bool>,
    /// The `fake_icmp_echo` knob control sends this node.
    pub fake_icmp_echo: bool,
    /// The PeerAPI port this node announces in TSMP pongs.
    pub peerapi_port: Option<u16>,
    /// Subnets this node routes for (peers get them as AllowedIPs, which
    /// makes this node non-trimmable for them).
    pub subnets: Vec<IpNet>,
    /// The persistent keepalive peers configure for this node.
    pub persistent_keepalive_secs: Option<u16>,
}

impl NodeSpec {
    /// A node with defaults for everything but its name.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }
}

/// The virtual network's behaviour.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NetworkSpec {
    /// One-way latency of every datagram.
    pub latency: Duration,
    /// Extra one-way delay drawn uniformly from `0..=jitter` per datagram.
    pub jitter: Duration,
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// Delay from a change at the control plane to its delivery to a node.
    pub control_delay: Duration,
}

impl Default for NetworkSpec {
    fn default() -> Self {
        Self {
            latency: Duration::from_millis(10),
            jitter: Duration::ZERO,
            loss: 0.0,
            control_delay: Duration::from_millis(200),
        }
    }
}

/// A link change a node can go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LinkKind {
    /// Every interface goes down: the node neither sends nor receives.
    Down,
    /// Interfaces come back (a minor change, same address).
    Up,
    /// A minor change: same address, endpoints are re-discovered.
    Minor,
    /// A major change: the node moves to a new UDP address and rebinds.
    Major,
}

impl LinkKind {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkKind::Down => "down",
            LinkKind::Up => "up",
            LinkKind::Minor => "minor",
            LinkKind::Major => "major",
        }
    }
}

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// When it was seen.
    pub at: Duration,
    /// Where (a node name or `-`).
    pub node: String,
    /// What was wrong.
    pub message: String,
}

/// A ping started by the harness and how it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct PingRecord {
    /// The scenario's label, if any.
    pub label: Option<String>,
    /// The pinging node.
    pub from: NodeId,
    /// The target address.
    pub ip: IpAddr,
    /// The kind.
    pub kind: PingKind,
    /// When it started.
    pub started: Duration,
    /// When and how it ended (the first result).
    pub result: Option<(Duration, PingOutcome)>,
    /// How many results arrived (must end up exactly 1).
    pub results: u32,
    pub(crate) incarnation: u64,
}

impl PingRecord {
    /// How long it took, if it ended.
    pub fn elapsed(&self) -> Option<Duration> {
        self.result.as_ref().map(|(at, _)| *at - self.started)
    }

    /// "pong", "timeout", "error" or "pending".
    pub fn outcome_name(&self) -> &'static str {
        match &self.result {
            None => "pending",
            Some((_, PingOutcome::Pong { .. })) => "pong",
            Some((_, PingOutcome::Timeout)) => "timeout",
            Some((_, PingOutcome::Error { .. })) => "error",
        }
    }
}

/// A stream of UDP datagrams from one node to an address, and what arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRecord {
    /// The scenario's label, if any.
    pub label: Option<String>,
    /// The sending node.
    pub from: NodeId,
    /// The destination address.
    pub dst: IpAddr,
    /// Payload bytes per datagram (at least 16).
    pub size: usize,
    /// Time between two datagrams.
    pub interval: Duration,
    /// Datagrams still to send.
    pub remaining: u64,
    /// Send time of every datagram sent, in order.
    pub sent: Vec<Duration>,
    /// Arrival time of every datagram sent (same index), `None` if lost so far.
    pub delivered: Vec<Option<Duration>>,
    /// Copies that arrived more than once.
    pub duplicates: u64,
}

impl StreamRecord {
    /// Datagrams that arrived.
    pub fn delivered_count(&self) -> u64 {
        self.delivered.iter().filter(|d| d.is_some()).count() as u64
    }

    /// Datagrams sent that did not arrive.
    pub fn lost_count(&self) -> u64 {
        self.sent.len() as u64 - self.delivered_count()
    }

    /// The longest run of consecutive lost datagrams.
    pub fn longest_loss_run(&self) -> u64 {
        let mut best = 0;
        let mut run = 0;
        for d in &self.delivered {
            if d.is_some() {
                run = 0;
            } else {
                run += 1;
                best = best.max(run);
            }
        }
        best
    }

    /// The time from `since` to the arrival of the first datagram sent at or
    /// after `since` that arrived; `None` if none did.
    pub fn recovery_after(&self, since: Duration) -> Option<Duration> {
        self.sent
            .iter()
            .zip(&self.delivered)
            .find(|(s, d)| **s >= since && d.is_some())
            .and_then(|(_, d)| *d)
            .map(|d| d.saturating_sub(since))
    }
}

/// Where a request/response flow stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowState {
    /// The opening (SYN) was sent; waiting for its answer.
    Opening,
    /// The request was sent; waiting for the response.
    Requesting,
    /// The response arrived.
    Done,
    /// A stage ran out of attempts.
    Failed,
}

/// A TCP-like request/response flow with retransmissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowRecord {
    /// The scenario's label, if any.
    pub label: Option<String>,
    /// The client node.
    pub from: NodeId,
    /// The server address.
    pub dst: SocketAddr,
    /// The client's address.
    pub src: SocketAddr,
    /// Request payload bytes.
    pub request_size: usize,
    /// Response payload bytes.
    pub response_size: usize,
    /// When it started.
    pub started: Duration,
    /// Its state.
    pub state: FlowState,
    /// When it completed or failed.
    pub finished: Option<Duration>,
    /// Segments sent again after a timeout.
    pub retransmits: u32,
    pub(crate) attempt: u32,
}

impl FlowRecord {
    /// Time from start to completion, if it completed.
    pub fn completion_time(&self) -> Option<Duration> {
        match self.state {
            FlowState::Done => self.finished.map(|f| f - self.started),
            _ => None,
        }
    }
}

/// Counts over the whole run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Queue entries processed.
    pub steps: u64,
    /// Datagrams handed to the network.
    pub datagrams_sent: u64,
    /// Datagrams handed to their destination engine.
    pub datagrams_delivered: u64,
    /// Dropped by random loss.
    pub dropped_loss: u64,
    /// Dropped by a partition.
    pub dropped_partition: u64,
    /// Dropped because the sender's or receiver's link was down or it was restarting.
    pub dropped_link_down: u64,
    /// Dropped because no node had the destination address.
    pub dropped_no_route: u64,
    /// Packets the OS wrote to a TUN.
    pub tun_in: u64,
    /// Packets an engine wrote to a TUN.
    pub tun_out: u64,
    /// Handshakes completed (events).
    pub handshakes: u64,
    /// Peers trimmed for idleness (events).
    pub trims: u64,
    /// Peers woken from the trimmed state (events).
    pub wakes: u64,
    /// Sessions flushed on a disco-key change (events).
    pub flushes: u64,
    /// Pings started.
    pub pings: u64,
    /// Pings answered.
    pub pongs: u64,
    /// Pings timed out.
    pub ping_timeouts: u64,
    /// Pings that ended with an error.
    pub ping_errors: u64,
    /// Reconfigs delivered to a running engine.
    pub reconfigs: u64,
    /// Reconfigs the engine refused.
    pub reconfigs_refused: u64,
    /// Node restarts.
    pub restarts: u64,
    /// Control deliveries that found the node restarting.
    pub control_dropped: u64,
    /// ERROR-level log events from wgmesh code.
    pub error_logs: u64,
    /// ERROR-level log events from boringtun (e.g. a handshake that gave up).
    pub boringtun_errors: u64,
    /// The largest timer queue seen on any engine.
    pub max_timer_queue: u64,
    /// Invariant violations (all, including ones not kept in full).
    pub violations: u64,
}

impl Stats {
    /// Every count as `(name, value)`, in a fixed order.
    pub fn iter(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("steps", self.steps),
            ("datagrams_sent", self.datagrams_sent),
            ("datagrams_delivered", self.datagrams_delivered),
            ("dropped_loss", self.dropped_loss),
            ("dropped_partition", self.dropped_partition),
            ("dropped_link_down", self.dropped_link_down),
            ("dropped_no_route", self.dropped_no_route),
            ("tun_in", self.tun_in),
            ("tun_out", self.tun_out),
            ("handshakes", self.handshakes),
            ("trims", self.trims),
            ("wakes", self.wakes),
            ("flushes", self.flushes),
            ("pings", self.pings),
            ("pongs", self.pongs),
            ("ping_timeouts", self.ping_timeouts),
            ("ping_errors", self.ping_errors),
            ("reconfigs", self.reconfigs),
            ("reconfigs_refused", self.reconfigs_refused),
            ("restarts", self.restarts),
            ("control_dropped", self.control_dropped),
            ("error_logs", self.error_logs),
            ("boringtun_errors", self.boringtun_errors),
            ("max_timer_queue", self.max_timer_queue),
            ("violations", self.violations),
        ]
    }
}

/// Builds a [`Tailnet`].
#[derive(Debug, Clone)]
pub struct TailnetBuilder {
    seed: u64,
    network: NetworkSpec,
    knobs: Knobs,
    nodes: Vec<NodeSpec>,
    keep_trace: Keep,
    max_steps: u64,
}

impl TailnetBuilder {
    /// The seed every random choice comes from.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The whole network spec.
    pub fn network(mut self, network: NetworkSpec) -> Self {
        self.network = network;
        self
    }

    /// One-way latency.
    pub fn latency(mut self, latency: Duration) -> Self {
        self.network.latency = latency;
        self
    }

    /// Per-datagram jitter bound.
    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.network.jitter = jitter;
        self
    }

    /// Per-datagram loss probability.
    pub fn loss(mut self, loss: f64) -> Self {
        self.network.loss = loss;
        self
    }

    /// Control-plane delivery delay.
    pub fn control_delay(mut self, delay: Duration) -> Self {
        self.network.control_delay = delay;
        self
    }

    /// The knobs control sends every node (per-node specs may override some).
    pub fn knobs(mut self, knobs: Knobs) -> Self {
        self.knobs = knobs;
        self
    }

    /// Adds a node with default settings.
    pub fn node(self, name: &str) -> Self {
        self.node_spec(NodeSpec::new(name))
    }

    /// Adds a node.
    pub fn node_spec(mut self, spec: NodeSpec) -> Self {
        self.nodes.push(spec);
        self
    }

    /// Keep every trace entry in memory (for timelines, snapshots and tests).
    pub fn keep_trace(mut self, keep: bool) -> Self {
        self.keep_trace = if keep { Keep::All } else { Keep::Nothing };
        self
    }

    /// Which trace entries to keep in memory (all of them are hashed).
    pub fn keep(mut self, keep: Keep) -> Self {
        self.keep_trace = keep;
        self
    }

    /// The most queue entries a run may process before it is stopped as a
    /// runaway (recorded as a violation).
    pub fn max_steps(mut self, max_steps: u64) -> Self {
        self.max_steps = max_steps;
        self
    }

    /// Creates the nodes and queues their first netmap for time zero.
    pub fn build(self) -> Tailnet {
        Tailnet::new(self)
    }
}

impl Default for TailnetBuilder {
    fn default() -> Self {
        Self {
            seed: 1,
            network: NetworkSpec::default(),
            knobs: Knobs::default(),
            nodes: Vec::new(),
            keep_trace: Keep::Nothing,
            max_steps: DEFAULT_MAX_STEPS,
        }
    }
}

/// What the queue holds.
#[derive(Debug)]
enum SimEvent {
    Arrival {
        dst: SocketAddr,
        from: SocketAddr,
        data: Vec<u8>,
    },
    Control {
        node: usize,
        reconfig: Box<Reconfig>,
    },
    Timer {
        node: usize,
        incarnation: u64,
    },
    NodeUp {
        node: usize,
        incarnation: u64,
    },
    StreamTick {
        stream: usize,
    },
    FlowTimer {
        flow: usize,
        attempt: u32,
    },
}

#[derive(Debug)]
struct Scheduled {
    at: Duration,
    seq: u64,
    event: SimEvent,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        // BinaryHeap is a max-heap: reverse so the earliest entry is on top.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

struct Node {
    spec: NodeSpec,
    private_key: NodePrivateKey,
    public_key: NodePublicKey,
    disco_private: DiscoPrivateKey,
    disco_public: DiscoPublicKey,
    ip4: Ipv4Addr,
    ip6: Ipv6Addr,
    endpoint: SocketAddr,
    reported_endpoint: SocketAddr,
    address_generation: u8,
    allowed_ips: Vec<IpNet>,
    knobs: Knobs,
    engine: Option<Engine>,
    incarnation: u64,
    timer_at: Option<Duration>,
    link_up: bool,
    subnet_peers: Vec<NodePublicKey>,
    activity: Vec<Option<Duration>>,
    outstanding_pings: usize,
}

/// Counts ERROR-level log events: ours (a broken invariant) apart from
/// boringtun's (which logs a handshake that gave up at ERROR).
#[derive(Debug, Default)]
struct ErrorCounter {
    ours: AtomicU64,
    boringtun: AtomicU64,
    next_span: AtomicU64,
}

impl tracing::Subscriber for ErrorCounter {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() == tracing::Level::ERROR
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(self.next_span.fetch_add(1, AtomicOrdering::Relaxed) + 1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if event.metadata().target().starts_with("boringtun") {
            self.boringtun.fetch_add(1, AtomicOrdering::Relaxed);
        } else {
            self.ours.fetch_add(1, AtomicOrdering::Relaxed);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// A whole tailnet on the event backend. See the module docs.
pub struct Tailnet {
    seed: u64,
    base: Instant,
    now: Duration,
    seq: u64,
    queue: BinaryHeap<Scheduled>,
    nodes: Vec<Node>,
    by_name: BTreeMap<String, usize>,
    by_key: BTreeMap<NodePublicKey, usize>,
    addr_book: BTreeMap<SocketAddr, usize>,
    host_owner: BTreeMap<IpAddr, usize>,
    subnet_owner: Vec<(IpNet, usize)>,
    network: NetworkSpec,
    partitions: BTreeSet<(usize, usize)>,
    key_rng: ChaCha20Rng,
    net_rng: ChaCha20Rng,
    trace: Trace,
    pings: Vec<PingRecord>,
    outstanding: BTreeSet<(Duration, usize)>,
    streams: Vec<StreamRecord>,
    flows: Vec<FlowRecord>,
    violations: Vec<Violation>,
    stats: Stats,
    errors: Arc<ErrorCounter>,
    dispatch: tracing::Dispatch,
    instant_events: (Duration, u64),
    os_depth: u32,
    scratch: Vec<u8>,
    max_steps: u64,
}

/// A seed for one engine incarnation, mixed from the scenario seed (splitmix64).
fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let mut z =
        seed ^ a.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ b.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn rng_stream(seed: u64, stream: u64) -> ChaCha20Rng {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// A uniform float in `[0, 1)` from 53 random bits.
fn unit(rng: &mut ChaCha20Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// The host part of node `index` (1-based, spread over two octets).
fn host_octets(index: usize) -> (u8, u8) {
    let n = index + 1;
    ((n >> 8) as u8, (n & 0xff) as u8)
}

/// What a WireGuard or disco datagram is, from its first bytes and size.
pub fn datagram_kind(data: &[u8]) -> &'static str {
    if wire::disco::looks_like_disco(data) {
        return "disco";
    }
    match (data.first(), data.len()) {
        (Some(1), _) => "wg-init",
        (Some(2), _) => "wg-resp",
        (Some(3), _) => "wg-cookie",
        (Some(4), 32) => "wg-keepalive",
        (Some(4), _) => "wg-data",
        _ => "other",
    }
}

pub(crate) fn wake_name(w: &WakeReason) -> String {
    match w {
        WakeReason::SendTo(ip) => format!("send-to {ip}"),
        WakeReason::Receive => "receive".into(),
        WakeReason::Handshake => "handshake".into(),
        WakeReason::Ping => "ping".into(),
    }
}

pub(crate) fn remove_name(r: &RemoveReason) -> String {
    match r {
        RemoveReason::Idle { idle_secs } => format!("idle {idle_secs}s"),
        RemoveReason::RemovedFromConfig => "removed-from-config".into(),
        RemoveReason::DiscoKeyChanged => "disco-key-changed".into(),
        RemoveReason::ConfigChanged => "config-changed".into(),
        RemoveReason::Closed => "closed".into(),
    }
}

/// Whether every element of the sorted `small` is in the sorted `big`.
fn sorted_subset<T: Ord>(small: &[T], big: &[T]) -> bool {
    let mut it = big.iter();
    small.iter().all(|x| it.by_ref().any(|y| y == x))
}

fn ms(d: Duration) -> String {
    format!("{}.{:03}ms", d.as_millis(), d.subsec_micros() % 1000)
}

impl Tailnet {
    /// A builder with one default node list (empty), seed 1 and the default network.
    pub fn builder() -> TailnetBuilder {
        TailnetBuilder::default()
    }

    fn new(b: TailnetBuilder) -> Self {
        let errors = Arc::new(ErrorCounter::default());
        let dispatch = tracing::Dispatch::from(Arc::clone(&errors));
        let mut key_rng = rng_stream(b.seed, 1);
        let n = b.nodes.len();
        let mut nodes = Vec::with_capacity(n);
        let mut by_name = BTreeMap::new();
        let mut by_key = BTreeMap::new();
        let mut addr_book = BTreeMap::new();
        for (i, spec) in b.nodes.into_iter().enumerate() {
            let private_key = NodePrivateKey::generate(&mut key_rng);
            let disco_private = DiscoPrivateKey::generate(&mut key_rng);
            let (hi, lo) = host_octets(i);
            let ip4 = Ipv4Addr::new(100, 64, hi, lo);
            let ip6 = Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, (i + 1) as u16);
            let endpoint = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, hi, lo)), WG_PORT);
            let mut allowed_ips = vec![IpNet::from(IpAddr::V4(ip4)), IpNet::from(IpAddr::V6(ip6))];
            allowed_ips.extend(spec.subnets.iter().copied());
            let knobs = Knobs {
                keep_full_wg_config: spec
                    .keep_full_wg_config
                    .unwrap_or(b.knobs.keep_full_wg_config),
                fake_icmp_echo: spec.fake_icmp_echo || b.knobs.fake_icmp_echo,
                peerapi_port: spec.peerapi_port.or(b.knobs.peerapi_port),
                ..b.knobs.clone()
            };
            by_name.insert(spec.name.clone(), i);
            by_key.insert(private_key.public_key(), i);
            addr_book.insert(endpoint, i);
            nodes.push(Node {
                public_key: private_key.public_key(),
                disco_public: disco_private.public_key(),
                private_key,
                disco_private,
                ip4,
                ip6,
                endpoint,
                reported_endpoint: endpoint,
                address_generation: 0,
                allowed_ips,
                knobs,
                engine: None,
                incarnation: 0,
                timer_at: None,
                link_up: true,
                subnet_peers: Vec::new(),
                activity: vec![None; n],
                outstanding_pings: 0,
                spec,
            });
        }
        let mut net = Tailnet {
            seed: b.seed,
            base: Instant::now(),
            now: Duration::ZERO,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes,
            by_name,
            by_key,
            addr_book,
            host_owner: BTreeMap::new(),
            subnet_owner: Vec::new(),
            network: b.network,
            partitions: BTreeSet::new(),
            key_rng,
            net_rng: rng_stream(b.seed, 2),
            trace: Trace::keeping(b.keep_trace),
            pings: Vec::new(),
            outstanding: BTreeSet::new(),
            streams: Vec::new(),
            flows: Vec::new(),
            violations: Vec::new(),
            stats: Stats::default(),
            errors,
            dispatch,
            instant_events: (Duration::ZERO, 0),
            os_depth: 0,
            scratch: Vec::with_capacity(2048),
            max_steps: b.max_steps,
        };
        net.rebuild_owners();
        for i in 0..n {
            // The keys come from the seed, so the trace (and its hash) names
            // the seed's identities as well as what they did.
            let node = &net.nodes[i];
            let detail = format!(
                "{} {} {} key {} disco {}",
                node.ip4,
                node.ip6,
                node.endpoint,
                node.public_key.short(),
                node.disco_public.short()
            );
            net.log(Some(i), Category::Action, "node", detail);
        }
        let dispatch = net.dispatch.clone();
        tracing::dispatcher::with_default(&dispatch, || {
            for i in 0..n {
                net.start_engine(i);
            }
            for i in 0..n {
                let reconfig = Box::new(net.reconfig_for(i));
                net.push(Duration::ZERO, SimEvent::Control { node: i, reconfig });
            }
        });
        net
    }

    // ------------------------------------------------------------------
    // Reading the state
    // ------------------------------------------------------------------

    /// The seed of this run.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Virtual time since the start.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when the tailnet has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The node with this name.
    pub fn id(&self, name: &str) -> Option<NodeId> {
        self.by_name.get(name).map(|&i| NodeId(i))
    }

    /// A node's name.
    pub fn name(&self, id: NodeId) -> &str {
        &self.nodes[id.0].spec.name
    }

    /// A node's tailnet IPv4 address (100.64.x.y).
    pub fn ip4(&self, id: NodeId) -> IpAddr {
        IpAddr::V4(self.nodes[id.0].ip4)
    }

    /// A node's tailnet IPv6 address (fd7a:115c:a1e0::n).
    pub fn ip6(&self, id: NodeId) -> IpAddr {
        IpAddr::V6(self.nodes[id.0].ip6)
    }

    /// A node's current UDP endpoint on the virtual network.
    pub fn endpoint(&self, id: NodeId) -> SocketAddr {
        self.nodes[id.0].endpoint
    }

    /// A node's WireGuard public key.
    pub fn node_key(&self, id: NodeId) -> NodePublicKey {
        self.nodes[id.0].public_key
    }

    /// A node's current disco public key.
    pub fn disco_key(&self, id: NodeId) -> DiscoPublicKey {
        self.nodes[id.0].disco_public
    }

    /// A node's running engine (`None` while it restarts).
    pub fn engine(&self, id: NodeId) -> Option<&Engine> {
        self.nodes[id.0].engine.as_ref()
    }

    /// Whether `node` has `peer` in WireGuard right now (`None`: not in its
    /// config, or the node is restarting).
    pub fn is_configured(&self, node: NodeId, peer: NodeId) -> Option<bool> {
        let key = self.nodes[peer.0].public_key;
        self.engine(node)?.is_peer_configured(&key)
    }

    /// The trace so far.
    pub fn trace(&self) -> &Trace {
        &self.trace
    }

    /// Every ping started so far.
    pub fn pings(&self) -> &[PingRecord] {
        &self.pings
    }

    /// Every datagram stream started so far.
    pub fn streams(&self) -> &[StreamRecord] {
        &self.streams
    }

    /// Every flow started so far.
    pub fn flows(&self) -> &[FlowRecord] {
        &self.flows
    }

    /// The invariant violations seen so far (the first ones, in full).
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// Counts over the run so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The sum of one engine counter (see `wgmesh_core::Counters::iter`) over
    /// the running engines, or for one node.
    pub fn counter(&self, node: Option<NodeId>, name: &str) -> Option<u64> {
        let mut total = None;
        for (i, n) in self.nodes.iter().enumerate() {
            if node.is_some_and(|id| id.0 != i) {
                continue;
            }
            if let Some(engine) = &n.engine {
                for (k, v) in engine.counters().iter() {
                    if k == name {
                        total = Some(total.unwrap_or(0) + v);
                    }
                }
            }
        }
        total
    }

    fn instant(&self) -> Instant {
        self.base + self.now
    }

    fn push(&mut self, at: Duration, event: SimEvent) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at,
            seq: self.seq,
            event,
        });
    }

    fn log(&mut self, node: Option<usize>, category: Category, kind: &'static str, detail: String) {
        let name = node.map_or("-", |i| self.nodes[i].spec.name.as_str());
        self.trace.record(self.now, name, category, kind, detail);
    }

    fn violation(&mut self, node: Option<usize>, message: String) {
        self.stats.violations += 1;
        let name = node
            .map_or("-", |i| self.nodes[i].spec.name.as_str())
            .to_string();
        self.log(node, Category::Violation, "VIOLATION", message.clone());
        if self.violations.len() < MAX_KEPT_VIOLATIONS {
            self.violations.push(Violation {
                at: self.now,
                node: name,
                message,
            });
        }
    }

    fn peer_name(&self, key: &NodePublicKey) -> String {
        self.by_key
            .get(key)
            .map_or_else(|| key.short(), |&i| self.nodes[i].spec.name.clone())
    }

    fn rebuild_owners(&mut self) {
        self.host_owner.clear();
        self.subnet_owner.clear();
        for (i, n) in self.nodes.iter().enumerate() {
            for net in &n.allowed_ips {
                if net.prefix_len() == net.max_prefix_len() {
                    self.host_owner.insert(net.addr(), i);
                } else {
                    self.subnet_owner.push((*net, i));
                }
            }
        }
        self.subnet_owner
            .sort_by(|a, b| b.0.prefix_len().cmp(&a.0.prefix_len()).then(a.cmp(b)));
    }

    /// The node an address belongs to, by the control plane's AllowedIPs.
    fn owner_of(&self, ip: IpAddr) -> Option<usize> {
        if let Some(&i) = self.host_owner.get(&ip) {
            return Some(i);
        }
        self.subnet_owner
            .iter()
            .find(|(net, _)| net.contains(&ip))
            .map(|(_, i)| *i)
    }

    fn is_own_address(&self, i: usize, ip: IpAddr) -> bool {
        let n = &self.nodes[i];
        ip == IpAddr::V4(n.ip4)
            || ip == IpAddr::V6(n.ip6)
            || n.allowed_ips
                .iter()
                .any(|net| net.prefix_len() != net.max_prefix_len() && net.contains(&ip))
    }

    // ------------------------------------------------------------------
    // Control plane
    // ------------------------------------------------------------------

    /// The full desired state control sends node `i`.
    fn reconfig_for(&self, i: usize) -> Reconfig {
        let me = &self.nodes[i];
        let peers = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| PeerConfig {
                public_key: n.public_key,
                disco_key: Some(n.disco_public),
                name: n.spec.name.clone(),
                allowed_ips: n.allowed_ips.clone(),
                endpoints: vec![n.reported_endpoint],
                persistent_keepalive_secs: n.spec.persistent_keepalive_secs,
                preshared_key: None,
            })
            .collect();
        let subnets = |n: &Node| -> Vec<IpNet> {
            n.allowed_ips
                .iter()
                .filter(|net| net.prefix_len() != net.max_prefix_len())
                .copied()
                .collect()
        };
        let other_subnets = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .flat_map(|(_, n)| subnets(n));
        netmap_reconfig(
            (me.ip4, me.ip6),
            peers,
            other_subnets,
            subnets(me),
            me.knobs.clone(),
        )
    }

    /// Sends every node its netmap, delivered after the control delay.
    fn push_netmaps(&mut self, why: &str) {
        let at = self.now + self.network.control_delay;
        self.log(None, Category::Control, "netmap-push", why.to_string());
        for i in 0..self.nodes.len() {
            let reconfig = Box::new(self.reconfig_for(i));
            self.push(at, SimEvent::Control { node: i, reconfig });
        }
    }

    fn deliver_control(&mut self, i: usize, reconfig: Box<Reconfig>) {
        if self.nodes[i].engine.is_none() {
            self.stats.control_dropped += 1;
            self.log(
                Some(i),
                Category::Control,
                "control-dropped",
                "node is restarting".into(),
            );
            return;
        }
        let subnet_peers: Vec<NodePublicKey> = reconfig
            .wireguard
            .as_ref()
            .map(|wg| {
                wg.peers
                    .iter()
                    .filter(|p| !p.is_trimmable())
                    .map(|p| p.public_key)
                    .collect()
            })
            .unwrap_or_default();
        let now = self.instant();
        let Some(engine) = self.nodes[i].engine.as_mut() else {
            return;
        };
        let result = engine.handle_input(now, Input::Reconfig(reconfig));
        let detail = match result {
            Ok(InputOutcome::Reconfig(ReconfigOutcome::NoChanges)) => {
                self.stats.reconfigs += 1;
                "no-changes".to_string()
            }
            Ok(InputOutcome::Reconfig(ReconfigOutcome::Applied(c))) => {
                self.stats.reconfigs += 1;
                self.nodes[i].subnet_peers = subnet_peers;
                format!(
                    "applied peers_changed={} flushed={}",
                    c.peers_changed, c.sessions_flushed
                )
            }
            Ok(other) => format!("{other:?}"),
            Err(e) => {
                self.stats.reconfigs_refused += 1;
                format!("refused: {e}")
            }
        };
        self.log(Some(i), Category::Control, "reconfig", detail);
        self.drain(i);
    }

    // ------------------------------------------------------------------
    // Engines
    // ------------------------------------------------------------------

    fn start_engine(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let mut config = EngineConfig::new(n.private_key.clone(), n.disco_private.clone());
        config.name = n.spec.name.clone();
        config.trim_override = n.spec.trim_override;
        config.testing = TestingKnobs {
            disable_disco_key_flush: n.spec.disable_disco_key_flush,
        };
        n.incarnation += 1;
        n.timer_at = None;
        n.outstanding_pings = 0;
        n.subnet_peers.clear();
        for a in &mut n.activity {
            *a = None;
        }
        let seed = mix(self.seed, i as u64, n.incarnation);
        let now = self.base + self.now;
        n.engine = Some(Engine::new(config, now, seed));
        self.drain(i);
    }

    /// Feeds one input to node `i` and drains its outputs.
    fn feed(&mut self, i: usize, input: Input<'_>) -> bool {
        let now = self.instant();
        let Some(engine) = self.nodes[i].engine.as_mut() else {
            return false;
        };
        if let Err(e) = engine.handle_input(now, input) {
            self.log(Some(i), Category::Engine, "input-refused", e.to_string());
        }
        self.drain(i);
        true
    }

    /// Drains node `i`'s outputs, lets the OS react, and re-arms its timer.
    fn drain(&mut self, i: usize) {
        let mut os_inputs: Vec<Vec<u8>> = Vec::new();
        while let Some(out) = self.nodes[i].engine.as_mut().and_then(Engine::poll_output) {
            self.handle_output(i, out, &mut os_inputs);
        }
        if !os_inputs.is_empty() {
            if self.os_depth >= MAX_OS_DEPTH {
                self.log(
                    Some(i),
                    Category::Tun,
                    "os-loop-cut",
                    format!("{} packets", os_inputs.len()),
                );
            } else {
                self.os_depth += 1;
                for packet in os_inputs {
                    self.os_send(i, packet);
                }
                self.os_depth -= 1;
            }
        }
        self.arm_timer(i);
        self.check_node(i);
    }

    fn arm_timer(&mut self, i: usize) {
        let Some(engine) = self.nodes[i].engine.as_mut() else {
            return;
        };
        let deadline = engine.poll_timeout();
        let queue_len = engine.timer_queue_len() as u64;
        self.stats.max_timer_queue = self.stats.max_timer_queue.max(queue_len);
        match deadline {
            None => self.nodes[i].timer_at = None,
            Some(d) => {
                let at = d.saturating_duration_since(self.base).max(self.now);
                if self.nodes[i].timer_at != Some(at) {
                    self.nodes[i].timer_at = Some(at);
                    let incarnation = self.nodes[i].incarnation;
                    self.push(
                        at,
                        SimEvent::Timer {
                            node: i,
                            incarnation,
                        },
                    );
                }
            }
        }
    }

    fn handle_output(&mut self, i: usize, out: Output, os_inputs: &mut Vec<Vec<u8>>) {
        match out {
            Output::Transmit(t) => self.transmit(i, t.dst, t.data),
            Output::TunWrite(packet) => {
                self.stats.tun_out += 1;
                self.os_receive(i, &packet, os_inputs);
                if let Some(engine) = self.nodes[i].engine.as_mut() {
                    engine.recycle(packet);
                }
            }
            Output::Effect(e) => self.effect(i, e),
            Output::Event(e) => self.engine_event(i, e),
            Output::PingResult(r) => self.ping_result(i, r),
            Output::Status(s) => {
                let configured = s.peers.iter().filter(|p| p.configured).count();
                self.log(
                    Some(i),
                    Category::Engine,
                    "status",
                    format!("peers={} configured={}", s.peers.len(), configured),
                );
            }
            Output::Capture(_) => {}
            other => self.log(Some(i), Category::Engine, "output", format!("{other:?}")),
        }
    }

    fn effect(&mut self, i: usize, e: Effect) {
        let detail = match &e {
            Effect::ApplyRouter(r) => format!(
                "apply-router addrs={} routes={} advertised={}",
                r.local_addrs.len(),
                r.routes.len(),
                r.advertised_routes.len()
            ),
            Effect::ApplyDns(d) => format!("apply-dns nameservers={}", d.nameservers.len()),
            Effect::FlushDnsCaches => "flush-dns-caches".into(),
            Effect::Rebind => "rebind".into(),
            Effect::ReDiscoverEndpoints { reason } => format!("rediscover-endpoints {reason}"),
            Effect::SetNetworkUp(up) => format!("network-up {up}"),
            Effect::SetBirdProtocol { protocol, enabled } => format!("bird {protocol} {enabled}"),
            Effect::SetListenPort(p) => format!("listen-port {p}"),
            Effect::SetPathMtuDiscovery(on) => format!("path-mtu {on}"),
            other => format!("{other:?}"),
        };
        self.log(Some(i), Category::Effect, "effect", detail);
        if let Effect::ReDiscoverEndpoints { .. } = e {
            // The node tells control where it can be reached now; control
            // passes it on to everyone.
            if self.nodes[i].reported_endpoint != self.nodes[i].endpoint {
                self.nodes[i].reported_endpoint = self.nodes[i].endpoint;
                let why = format!(
                    "{} endpoint {}",
                    self.nodes[i].spec.name, self.nodes[i].endpoint
                );
                self.push_netmaps(&why);
            }
        }
    }

    fn engine_event(&mut self, i: usize, e: Event) {
        let (kind, detail) = match &e {
            Event::PeerConfigured { peer, woken } => {
                if woken.is_some() {
                    self.stats.wakes += 1;
                }
                let name = self.peer_name(peer);
                (
                    "peer-configured",
                    match woken {
                        Some(w) => format!("{name} woken by {}", wake_name(w)),
                        None => name,
                    },
                )
            }
            Event::PeerRemoved { peer, reason } => {
                if let RemoveReason::Idle { .. } = reason {
                    self.stats.trims += 1;
                    if self.nodes[i].subnet_peers.contains(peer) {
                        let message = format!("subnet router {} was trimmed", self.peer_name(peer));
                        self.violation(Some(i), message);
                    }
                }
                (
                    "peer-removed",
                    format!("{} {}", self.peer_name(peer), remove_name(reason)),
                )
            }
            Event::SessionFlushed { peer, .. } => {
                self.stats.flushes += 1;
                ("session-flushed", self.peer_name(peer))
            }
            Event::HandshakeCompleted { peer, endpoint } => {
                self.stats.handshakes += 1;
                (
                    "handshake",
                    format!("{} via {endpoint}", self.peer_name(peer)),
                )
            }
            Event::PathChanged {
                peer,
                endpoint,
                latency,
            } => (
                "path-changed",
                format!(
                    "{} {} {}",
                    self.peer_name(peer),
                    endpoint.map_or_else(|| "none".to_string(), |e| e.to_string()),
                    latency.map_or_else(|| "-".to_string(), ms)
                ),
            ),
            Event::ConnectionFailed(f) => (
                "conn-failed",
                format!("{} -> {} {:?}", f.src, f.dst, f.cause),
            ),
            other => ("event", format!("{other:?}")),
        };
        self.log(Some(i), Category::Engine, kind, detail);
    }

    fn ping_result(&mut self, i: usize, r: wgmesh_core::PingResult) {
        let Ok(index) = usize::try_from(r.id) else {
            return;
        };
        let Some(record) = self.pings.get_mut(index) else {
            self.violation(Some(i), format!("result for unknown ping {}", r.id));
            return;
        };
        record.results += 1;
        let started = record.started;
        let results = record.results;
        let detail = match &r.outcome {
            PingOutcome::Pong {
                latency, node_name, ..
            } => {
                self.stats.pongs += 1;
                format!(
                    "#{} {} {} pong from {node_name} in {}",
                    r.id,
                    r.kind.as_str(),
                    r.ip,
                    ms(*latency)
                )
            }
            PingOutcome::Timeout => {
                self.stats.ping_timeouts += 1;
                format!("#{} {} {} timeout", r.id, r.kind.as_str(), r.ip)
            }
            PingOutcome::Error { message, .. } => {
                self.stats.ping_errors += 1;
                format!("#{} {} {} error: {message}", r.id, r.kind.as_str(), r.ip)
            }
        };
        self.log(Some(i), Category::Ping, "ping-result", detail);
        if results > 1 {
            self.violation(Some(i), format!("ping {} ended {results} times", r.id));
            return;
        }
        let record = &mut self.pings[index];
        record.result = Some((self.now, r.outcome));
        self.outstanding.remove(&(started + PING_TIMEOUT, index));
        let same_engine = record.incarnation == self.nodes[i].incarnation;
        if same_engine {
            self.nodes[i].outstanding_pings = self.nodes[i].outstanding_pings.saturating_sub(1);
        }
        if self.now > started + PING_TIMEOUT {
            self.violation(
                Some(i),
                format!("ping {} ended after {}", r.id, ms(self.now - started)),
            );
        }
    }

    // ------------------------------------------------------------------
    // The network
    // ------------------------------------------------------------------

    fn transmit(&mut self, i: usize, dst: SocketAddr, data: Vec<u8>) {
        self.stats.datagrams_sent += 1;
        let kind = datagram_kind(&data);
        let size = data.len();
        let to = self.addr_book.get(&dst).copied();
        let to_name = to.map_or_else(|| dst.to_string(), |j| self.nodes[j].spec.name.clone());
        let drop = if !self.nodes[i].link_up {
            self.stats.dropped_link_down += 1;
            Some("link-down")
        } else if let Some(j) = to {
            if self.partitions.contains(&(i.min(j), i.max(j))) {
                self.stats.dropped_partition += 1;
                Some("partition")
            } else if self.network.loss > 0.0 && unit(&mut self.net_rng) < self.network.loss {
                self.stats.dropped_loss += 1;
                Some("loss")
            } else {
                None
            }
        } else {
            self.stats.dropped_no_route += 1;
            Some("no-route")
        };
        match drop {
            Some(why) => {
                self.log(
                    Some(i),
                    Category::Packet,
                    "tx-drop",
                    format!("-> {to_name} {kind} {size}B {why}"),
                );
                if let Some(engine) = self.nodes[i].engine.as_mut() {
                    engine.recycle(data);
                }
            }
            None => {
                let jitter = if self.network.jitter.is_zero() {
                    Duration::ZERO
                } else {
                    let span = self.network.jitter.as_nanos() as u64 + 1;
                    Duration::from_nanos(self.net_rng.next_u64() % span)
                };
                let at = self.now + self.network.latency + jitter;
                self.log(
                    Some(i),
                    Category::Packet,
                    "tx",
                    format!("-> {to_name} {kind} {size}B"),
                );
                let from = self.nodes[i].endpoint;
                self.push(at, SimEvent::Arrival { dst, from, data });
            }
        }
    }

    fn arrival(&mut self, dst: SocketAddr, from: SocketAddr, data: Vec<u8>) {
        let kind = datagram_kind(&data);
        let size = data.len();
        let from_name = self
            .addr_book
            .get(&from)
            .map_or_else(|| from.to_string(), |&j| self.nodes[j].spec.name.clone());
        let Some(&j) = self.addr_book.get(&dst) else {
            self.stats.dropped_no_route += 1;
            self.log(
                None,
                Category::Packet,
                "rx-drop",
                format!("{from_name} -> {dst} {kind} {size}B moved"),
            );
            return;
        };
        if !self.nodes[j].link_up || self.nodes[j].engine.is_none() {
            self.stats.dropped_link_down += 1;
            self.log(
                Some(j),
                Category::Packet,
                "rx-drop",
                format!("<- {from_name} {kind} {size}B down"),
            );
            return;
        }
        self.stats.datagrams_delivered += 1;
        self.log(
            Some(j),
            Category::Packet,
            "rx",
            format!("<- {from_name} {kind} {size}B"),
        );
        let now = self.instant();
        if let Some(engine) = self.nodes[j].engine.as_mut() {
            if let Err(e) = engine.handle_input(now, Input::Datagram { from, data: &data }) {
                self.log(Some(j), Category::Engine, "input-refused", e.to_string());
            }
            if let Some(engine) = self.nodes[j].engine.as_mut() {
                engine.recycle(data);
            }
        }
        self.drain(j);
    }

    // ------------------------------------------------------------------
    // The operating system of each node
    // ------------------------------------------------------------------

    /// The OS of node `i` writes `packet` to the TUN.
    fn os_send(&mut self, i: usize, packet: Vec<u8>) {
        self.stats.tun_in += 1;
        if let Ok(h) = IpHeader::parse(&packet) {
            let fake_echo = self.nodes[i].knobs.fake_icmp_echo
                && matches!(h.protocol, wire::ip::PROTO_ICMP | wire::ip::PROTO_ICMPV6);
            if !fake_echo {
                // Only a peer the engine knows can have activity: a packet
                // sent before the netmap arrived is dropped, not noted.
                if let Some(j) = self.owner_of(h.dst).filter(|&j| j != i) {
                    let key = self.nodes[j].public_key;
                    let known = self.nodes[i]
                        .engine
                        .as_ref()
                        .is_some_and(|e| e.is_peer_configured(&key).is_some());
                    if known {
                        self.nodes[i].activity[j] = Some(self.now);
                    }
                }
            }
            self.log(
                Some(i),
                Category::Tun,
                "tun-in",
                format!("-> {} proto {} {}B", h.dst, h.protocol, packet.len()),
            );
        }
        self.feed(i, Input::TunPacket(&packet));
        if let Some(engine) = self.nodes[i].engine.as_mut() {
            engine.recycle(packet);
        }
    }

    /// The OS of node `i` reads `packet` from the TUN.
    fn os_receive(&mut self, i: usize, packet: &[u8], replies: &mut Vec<Vec<u8>>) {
        let Ok(h) = IpHeader::parse(packet) else {
            self.log(
                Some(i),
                Category::Tun,
                "tun-out-bad",
                format!("{}B", packet.len()),
            );
            return;
        };
        let fake = self.nodes[i].knobs.fake_icmp_echo;
        if let Some(j) = self.owner_of(h.src).filter(|&j| j != i) {
            let icmp = matches!(h.protocol, wire::ip::PROTO_ICMP | wire::ip::PROTO_ICMPV6);
            if !(fake && icmp) {
                self.nodes[i].activity[j] = Some(self.now);
            }
        }
        self.log(
            Some(i),
            Category::Tun,
            "tun-out",
            format!("<- {} proto {} {}B", h.src, h.protocol, packet.len()),
        );
        match h.protocol {
            wire::ip::PROTO_UDP => {
                if let Some(udp) = wire::udp::parse(&h, packet) {
                    if udp.dst_port == SINK_PORT {
                        self.stream_delivery(i, udp.payload);
                    }
                }
            }
            wire::ip::PROTO_ICMP | wire::ip::PROTO_ICMPV6 => {
                if let Some(echo) = wire::icmp::parse_echo(&h, packet) {
                    if echo.kind == wire::icmp::EchoKind::Request && self.is_own_address(i, h.dst) {
                        let mut reply = Vec::new();
                        if wire::icmp::echo_reply_for(packet, &mut reply).is_some() {
                            replies.push(reply);
                        }
                    }
                }
            }
            wire::ip::PROTO_TCP => self.tcp_receive(i, &h, packet, replies),
            _ => {}
        }
    }

    fn stream_delivery(&mut self, i: usize, payload: &[u8]) {
        let (Some(a), Some(b)) = (payload.get(0..8), payload.get(8..16)) else {
            return;
        };
        let stream = u64::from_be_bytes(a.try_into().unwrap_or([0; 8])) as usize;
        let seq = u64::from_be_bytes(b.try_into().unwrap_or([0; 8])) as usize;
        let now = self.now;
        let Some(dst) = self.streams.get(stream).map(|r| r.dst) else {
            return;
        };
        if !self.is_own_address(i, dst) {
            return;
        }
        let record = &mut self.streams[stream];
        match record.delivered.get_mut(seq) {
            Some(slot @ None) => *slot = Some(now),
            Some(Some(_)) => record.duplicates += 1,
            None => {}
        }
    }

    fn tcp_receive(&mut self, i: usize, h: &IpHeader, packet: &[u8], replies: &mut Vec<Vec<u8>>) {
        let Some(seg) = wire::tcp::parse_segment(h, packet) else {
            return;
        };
        let src = SocketAddr::new(h.src, seg.summary.src_port);
        let dst = SocketAddr::new(h.dst, seg.summary.dst_port);
        if dst.port() == FLOW_PORT && self.is_own_address(i, h.dst) {
            if let Some(answer) = server_answer(&seg, src, dst) {
                replies.push(answer);
            }
            return;
        }
        // The client side: find the flow by its local address.
        let now = self.now;
        let Some(index) = self
            .flows
            .iter()
            .position(|f| f.from.0 == i && f.src == dst && f.dst == src)
        else {
            return;
        };
        let flow = &mut self.flows[index];
        match flow.state {
            FlowState::Opening if seg.summary.is_syn_ack() => {
                flow.state = FlowState::Requesting;
                flow.attempt = 0;
                if let Some(p) = self.flow_packet(index) {
                    replies.push(p);
                }
                let at = now + FLOW_INITIAL_RTO;
                self.push(
                    at,
                    SimEvent::FlowTimer {
                        flow: index,
                        attempt: 0,
                    },
                );
            }
            FlowState::Requesting if !seg.payload.is_empty() => {
                flow.state = FlowState::Done;
                flow.finished = Some(now);
                let detail = format!(
                    "flow #{index} to {} done in {} ({} retransmits)",
                    flow.dst,
                    ms(now - flow.started),
                    flow.retransmits
                );
                self.log(Some(i), Category::Traffic, "flow-done", detail);
            }
            _ => {}
        }
    }

    /// The segment flow `index` sends in its current stage.
    fn flow_packet(&self, index: usize) -> Option<Vec<u8>> {
        let flow = &self.flows[index];
        let mut out = Vec::new();
        let result = match flow.state {
            FlowState::Opening => wire::tcp::emit_segment(
                flow.src,
                flow.dst,
                1000,
                0,
                wire::tcp::FLAG_SYN,
                &[],
                &mut out,
            ),
            FlowState::Requesting => {
                let mut body = vec![0x61; flow.request_size.clamp(4, 1200)];
                body[0..4].copy_from_slice(&(flow.response_size as u32).to_be_bytes());
                wire::tcp::emit_segment(
                    flow.src,
                    flow.dst,
                    1001,
                    7001,
                    wire::tcp::FLAG_ACK | wire::tcp::FLAG_PSH,
                    &body,
                    &mut out,
                )
            }
            FlowState::Done | FlowState::Failed => return None,
        };
        result.ok().map(|_| out)
    }

    fn flow_timer(&mut self, index: usize, attempt: u32) {
        let flow = &self.flows[index];
        if flow.attempt != attempt || matches!(flow.state, FlowState::Done | FlowState::Failed) {
            return;
        }
        let from = flow.from.0;
        if attempt + 1 >= FLOW_MAX_ATTEMPTS {
            let flow = &mut self.flows[index];
            flow.state = FlowState::Failed;
            flow.finished = Some(self.now);
            let detail = format!(
                "flow #{index} to {} failed after {} attempts",
                flow.dst,
                attempt + 1
            );
            self.log(Some(from), Category::Traffic, "flow-failed", detail);
            return;
        }
        let flow = &mut self.flows[index];
        flow.attempt += 1;
        flow.retransmits += 1;
        let rto = FLOW_INITIAL_RTO * (1 << flow.attempt);
        let next = flow.attempt;
        self.push(
            self.now + rto,
            SimEvent::FlowTimer {
                flow: index,
                attempt: next,
            },
        );
        if let Some(p) = self.flow_packet(index) {
            if self.nodes[from].engine.is_some() {
                self.os_send(from, p);
            }
        }
    }

    fn stream_tick(&mut self, index: usize) {
        let record = &mut self.streams[index];
        if record.remaining == 0 {
            return;
        }
        record.remaining -= 1;
        let seq = record.sent.len();
        record.sent.push(self.now);
        record.delivered.push(None);
        let from = record.from.0;
        let dst = record.dst;
        let size = record.size.max(16);
        if record.remaining > 0 {
            let at = self.now + record.interval;
            self.push(at, SimEvent::StreamTick { stream: index });
        }
        let src_ip = match dst {
            IpAddr::V4(_) => IpAddr::V4(self.nodes[from].ip4),
            IpAddr::V6(_) => IpAddr::V6(self.nodes[from].ip6),
        };
        let mut payload = vec![0u8; size];
        payload[0..8].copy_from_slice(&(index as u64).to_be_bytes());
        payload[8..16].copy_from_slice(&(seq as u64).to_be_bytes());
        let mut packet = std::mem::take(&mut self.scratch);
        let built = wire::udp::emit_datagram(
            SocketAddr::new(src_ip, 40000),
            SocketAddr::new(dst, SINK_PORT),
            &payload,
            &mut packet,
        );
        if built.is_ok() && self.nodes[from].engine.is_some() {
            self.os_send(from, packet);
        } else {
            self.scratch = packet;
        }
    }

    // ------------------------------------------------------------------
    // Invariants
    // ------------------------------------------------------------------

    fn check_node(&mut self, i: usize) {
        let Some(engine) = self.nodes[i].engine.as_ref().filter(|e| !e.is_closed()) else {
            return;
        };
        let mut problems: Vec<String> = Vec::new();
        let configured = engine.configured_peers();
        let full = engine.full_config_peers();
        if !sorted_subset(&configured, &full) {
            problems.push("configured peers are not a subset of the full config".into());
        }
        if engine.trimming_enabled() {
            let slack = LAZY_PEER_IDLE_THRESHOLD - RECEIVE_ACTIVITY_GRANULARITY;
            for (j, last) in self.nodes[i].activity.iter().enumerate() {
                let Some(last) = last else { continue };
                if self.now + Duration::from_millis(1) < *last + slack
                    && engine.is_peer_configured(&self.nodes[j].public_key) == Some(false)
                {
                    problems.push(format!(
                        "peer {} active {} ago is not configured",
                        self.nodes[j].spec.name,
                        ms(self.now - *last)
                    ));
                }
            }
        }
        for key in &self.nodes[i].subnet_peers {
            if engine.is_peer_configured(key) == Some(false) {
                problems.push(format!(
                    "subnet router {} is not configured",
                    self.peer_name(key)
                ));
            }
        }
        let pending = engine.pending_ping_count();
        if pending != self.nodes[i].outstanding_pings {
            problems.push(format!(
                "engine holds {pending} pending pings, harness expects {}",
                self.nodes[i].outstanding_pings
            ));
        }
        let bound = 256 + 16 * (engine.peer_count() + pending + engine.pending_open_count());
        if engine.timer_queue_len() > bound {
            problems.push(format!(
                "timer queue holds {} entries (bound {bound})",
                engine.timer_queue_len()
            ));
        }
        for p in problems {
            self.violation(Some(i), p);
        }
    }

    fn check_global(&mut self) {
        while let Some(&(deadline, index)) = self.outstanding.first() {
            if deadline >= self.now {
                break;
            }
            self.outstanding.remove(&(deadline, index));
            let from = self.pings[index].from.0;
            self.violation(Some(from), format!("ping {index} did not end within 10 s"));
        }
        let ours = self.errors.ours.load(AtomicOrdering::Relaxed);
        if ours > self.stats.error_logs {
            self.stats.error_logs = ours;
            self.violation(None, "an ERROR was logged".into());
        }
        self.stats.boringtun_errors = self.errors.boringtun.load(AtomicOrdering::Relaxed);
    }

    // ------------------------------------------------------------------
    // Running
    // ------------------------------------------------------------------

    /// Processes every queued entry due at or before `until`, then sets the
    /// clock to `until`.
    pub fn run_until(&mut self, until: Duration) {
        let dispatch = self.dispatch.clone();
        tracing::dispatcher::with_default(&dispatch, || self.run_inner(until));
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        self.run_until(self.now + d);
    }

    fn run_inner(&mut self, until: Duration) {
        while let Some(top) = self.queue.peek() {
            if top.at > until {
                break;
            }
            let Some(entry) = self.queue.pop() else { break };
            if entry.at > self.now {
                self.now = entry.at;
            }
            // A burst is counted over a sliding millisecond, so a timer that
            // re-fires a nanosecond later each time is caught too.
            if self.now >= self.instant_events.0 + Duration::from_millis(1) {
                self.instant_events = (self.now, 0);
            }
            self.instant_events.1 += 1;
            if self.instant_events.1 > MAX_EVENTS_PER_INSTANT {
                self.violation(
                    None,
                    "livelock: too many events within one millisecond".into(),
                );
                self.queue.clear();
                break;
            }
            self.stats.steps += 1;
            if self.stats.steps > self.max_steps {
                self.violation(None, format!("step budget of {} exhausted", self.max_steps));
                self.queue.clear();
                break;
            }
            self.step(entry.event);
            self.check_global();
        }
        if until > self.now {
            self.now = until;
        }
        self.check_global();
    }

    fn step(&mut self, event: SimEvent) {
        match event {
            SimEvent::Arrival { dst, from, data } => self.arrival(dst, from, data),
            SimEvent::Control { node, reconfig } => self.deliver_control(node, reconfig),
            SimEvent::Timer { node, incarnation } => {
                let n = &mut self.nodes[node];
                if n.incarnation != incarnation || n.timer_at != Some(self.now) {
                    return;
                }
                n.timer_at = None;
                let now = self.base + self.now;
                if let Some(engine) = n.engine.as_mut() {
                    engine.handle_timeout(now);
                }
                self.drain(node);
            }
            SimEvent::NodeUp { node, incarnation } => {
                if self.nodes[node].incarnation == incarnation && self.nodes[node].engine.is_none()
                {
                    self.bring_up(node);
                }
            }
            SimEvent::StreamTick { stream } => self.stream_tick(stream),
            SimEvent::FlowTimer { flow, attempt } => self.flow_timer(flow, attempt),
        }
    }

    fn with_dispatch<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let dispatch = self.dispatch.clone();
        let r = tracing::dispatcher::with_default(&dispatch, || f(self));
        self.check_global();
        r
    }

    // ------------------------------------------------------------------
    // Actions
    // ------------------------------------------------------------------

    /// Starts a stream of `count` UDP datagrams of `size` payload bytes from
    /// `from` to `dst`, one every `interval`, the first one now. Returns the
    /// stream's index in [`Tailnet::streams`].
    pub fn send_stream(
        &mut self,
        from: NodeId,
        dst: IpAddr,
        count: u64,
        interval: Duration,
        size: usize,
        label: Option<String>,
    ) -> usize {
        let index = self.streams.len();
        self.streams.push(StreamRecord {
            label,
            from,
            dst,
            size: size.max(16),
            interval,
            remaining: count,
            sent: Vec::new(),
            delivered: Vec::new(),
            duplicates: 0,
        });
        let detail = format!(
            "stream #{index} -> {dst} count={count} every {}",
            ms(interval)
        );
        self.log(Some(from.0), Category::Action, "send", detail);
        self.with_dispatch(|net| net.stream_tick(index));
        index
    }

    /// Sends one UDP datagram from `from` to `dst` now (a stream of one).
    pub fn send_datagram(&mut self, from: NodeId, dst: IpAddr, size: usize) -> usize {
        self.send_stream(from, dst, 1, Duration::from_secs(1), size, None)
    }

    /// Starts a TCP-like request/response flow from `from` to `dst` port 80.
    /// Returns its index in [`Tailnet::flows`].
    pub fn start_flow(
        &mut self,
        from: NodeId,
        dst: IpAddr,
        request_size: usize,
        response_size: usize,
        label: Option<String>,
    ) -> usize {
        let index = self.flows.len();
        let src_ip = match dst {
            IpAddr::V4(_) => IpAddr::V4(self.nodes[from.0].ip4),
            IpAddr::V6(_) => IpAddr::V6(self.nodes[from.0].ip6),
        };
        let port = 20000 + (index % 40000) as u16;
        self.flows.push(FlowRecord {
            label,
            from,
            dst: SocketAddr::new(dst, FLOW_PORT),
            src: SocketAddr::new(src_ip, port),
            request_size,
            response_size,
            started: self.now,
            state: FlowState::Opening,
            finished: None,
            retransmits: 0,
            attempt: 0,
        });
        self.log(
            Some(from.0),
            Category::Action,
            "flow",
            format!("flow #{index} -> {dst}:{FLOW_PORT}"),
        );
        self.with_dispatch(|net| {
            let at = net.now + FLOW_INITIAL_RTO;
            net.push(
                at,
                SimEvent::FlowTimer {
                    flow: index,
                    attempt: 0,
                },
            );
            if let Some(p) = net.flow_packet(index) {
                if net.nodes[from.0].engine.is_some() {
                    net.os_send(from.0, p);
                }
            }
        });
        index
    }

    /// Starts a ping of `kind` from `from` to `ip`. Returns its index in
    /// [`Tailnet::pings`] (also its ping id).
    pub fn ping(
        &mut self,
        from: NodeId,
        ip: IpAddr,
        kind: PingKind,
        size: usize,
        label: Option<String>,
    ) -> usize {
        let index = self.pings.len();
        let incarnation = self.nodes[from.0].incarnation;
        self.pings.push(PingRecord {
            label,
            from,
            ip,
            kind,
            started: self.now,
            result: None,
            results: 0,
            incarnation,
        });
        self.stats.pings += 1;
        self.log(
            Some(from.0),
            Category::Ping,
            "ping",
            format!("#{index} {} {ip}", kind.as_str()),
        );
        if self.nodes[from.0].engine.is_none() {
            let record = &mut self.pings[index];
            record.results = 1;
            record.result = Some((
                self.now,
                PingOutcome::Error {
                    message: "node is restarting".into(),
                    is_local_ip: false,
                },
            ));
            self.stats.ping_errors += 1;
            return index;
        }
        self.outstanding.insert((self.now + PING_TIMEOUT, index));
        self.nodes[from.0].outstanding_pings += 1;
        let request = PingRequest {
            id: index as u64,
            ip,
            kind,
            size,
        };
        self.with_dispatch(|net| {
            net.feed(from.0, Input::Ping(request));
        });
        index
    }

    /// Restarts a node: its engine closes (pending pings end), and after
    /// `downtime` a new engine starts with a new disco key and the same node
    /// key. Control then sends everyone the new netmap after its delay.
    pub fn restart(&mut self, id: NodeId, downtime: Duration) {
        let i = id.0;
        self.stats.restarts += 1;
        self.log(
            Some(i),
            Category::Action,
            "restart",
            format!("down for {}", ms(downtime)),
        );
        self.with_dispatch(|net| {
            net.feed(i, Input::Close);
            // Pings still open on the closed engine ended in `Close`; whatever
            // the old incarnation left is not this engine's any more.
            net.nodes[i].engine = None;
            net.nodes[i].incarnation += 1;
            net.nodes[i].timer_at = None;
            let incarnation = net.nodes[i].incarnation;
            if downtime.is_zero() {
                net.bring_up(i);
            } else {
                let at = net.now + downtime;
                net.push(
                    at,
                    SimEvent::NodeUp {
                        node: i,
                        incarnation,
                    },
                );
            }
        });
    }

    fn bring_up(&mut self, i: usize) {
        let disco = DiscoPrivateKey::generate(&mut self.key_rng);
        self.nodes[i].disco_public = disco.public_key();
        self.nodes[i].disco_private = disco;
        self.start_engine(i);
        self.log(
            Some(i),
            Category::Action,
            "node-up",
            format!("disco {}", self.nodes[i].disco_public.short()),
        );
        let why = format!("{} restarted", self.nodes[i].spec.name);
        self.push_netmaps(&why);
    }

    /// Cuts every path between a node of `a` and a node of `b`.
    pub fn partition(&mut self, a: &[NodeId], b: &[NodeId]) {
        for x in a {
            for y in b {
                if x != y {
                    self.partitions.insert((x.0.min(y.0), x.0.max(y.0)));
                }
            }
        }
        let names = |ids: &[NodeId]| {
            ids.iter()
                .map(|i| self.name(*i))
                .collect::<Vec<_>>()
                .join(",")
        };
        let detail = format!("{} | {}", names(a), names(b));
        self.log(None, Category::Action, "partition", detail);
    }

    /// Removes every partition.
    pub fn heal(&mut self) {
        self.partitions.clear();
        self.log(None, Category::Action, "heal", String::new());
    }

    /// Puts a node through a link change. `Major` moves it to a new UDP
    /// address (datagrams to the old one are lost) and the engine rebinds;
    /// control learns the new endpoint when the engine re-discovers endpoints.
    pub fn link_change(&mut self, id: NodeId, kind: LinkKind) {
        let i = id.0;
        let change = match kind {
            LinkKind::Down => {
                self.nodes[i].link_up = false;
                LinkChange {
                    any_link_up: false,
                    major: false,
                }
            }
            LinkKind::Up | LinkKind::Minor => {
                self.nodes[i].link_up = true;
                LinkChange {
                    any_link_up: true,
                    major: false,
                }
            }
            LinkKind::Major => {
                let n = &mut self.nodes[i];
                n.link_up = true;
                n.address_generation = n.address_generation.wrapping_add(1);
                let (hi, lo) = host_octets(i);
                let new = SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(10, n.address_generation, hi, lo)),
                    WG_PORT,
                );
                let old = std::mem::replace(&mut n.endpoint, new);
                self.addr_book.remove(&old);
                self.addr_book.insert(new, i);
                LinkChange {
                    any_link_up: true,
                    major: true,
                }
            }
        };
        let detail = format!("{} endpoint {}", kind.as_str(), self.nodes[i].endpoint);
        self.log(Some(i), Category::Action, "link-change", detail);
        self.with_dispatch(|net| {
            net.feed(i, Input::LinkChange(change));
        });
    }

    /// Changes the knobs control sends to `node` (or to every node) and
    /// pushes the new netmap.
    pub fn set_knobs(&mut self, node: Option<NodeId>, f: impl Fn(&mut Knobs)) {
        for (i, n) in self.nodes.iter_mut().enumerate() {
            if node.is_none_or(|id| id.0 == i) {
                f(&mut n.knobs);
            }
        }
        let who = node.map_or("all", |id| self.name(id)).to_string();
        self.log(None, Category::Action, "set-knobs", who.clone());
        self.with_dispatch(|net| net.push_netmaps(&format!("knobs of {who}")));
    }

    /// Replaces the AllowedIPs control hands out for `node` and pushes the
    /// new netmap.
    pub fn set_allowed_ips(&mut self, node: NodeId, allowed_ips: Vec<IpNet>) {
        let detail = allowed_ips
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",");
        self.nodes[node.0].allowed_ips = allowed_ips;
        self.rebuild_owners();
        self.log(Some(node.0), Category::Action, "set-allowed-ips", detail);
        let why = format!("allowed IPs of {}", self.name(node));
        self.with_dispatch(|net| net.push_netmaps(&why));
    }

    /// Checks every node's invariants now (the harness does this after each
    /// step for the nodes involved; this checks all of them).
    pub fn check_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.check_node(i);
        }
        self.check_global();
    }

    /// Records a note in the trace (for scenario probes and checks).
    pub fn note(&mut self, node: Option<NodeId>, kind: &'static str, detail: String) {
        self.log(node.map(|n| n.0), Category::Action, kind, detail);
    }
}

/// The server side of a flow, shared by both backends: stateless answers, so
/// retransmits get answers too.
pub(crate) fn server_answer(
    seg: &wire::tcp::TcpSegment<'_>,
    src: SocketAddr,
    dst: SocketAddr,
) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    if seg.summary.is_syn_only() {
        wire::tcp::emit_segment(
            dst,
            src,
            7000,
            seg.seq.wrapping_add(1),
            wire::tcp::FLAG_SYN | wire::tcp::FLAG_ACK,
            &[],
            &mut out,
        )
        .ok()?;
    } else if !seg.payload.is_empty() {
        let size = seg
            .payload
            .get(0..4)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
        let body = vec![0x5a; size.min(1200)];
        wire::tcp::emit_segment(
            dst,
            src,
            7001,
            seg.seq.wrapping_add(seg.payload.len() as u32),
            wire::tcp::FLAG_ACK | wire::tcp::FLAG_PSH,
            &body,
            &mut out,
        )
        .ok()?;
    } else {
        return None;
    }
    Some(out)
}

/// The desired state control sends one node, in both backends: its tailnet
/// addresses, its peers, routes for the whole tailnet plus every other
/// node's subnets, its own subnets advertised (and primary), the simulated
/// DNS, and its knobs.
pub(crate) fn netmap_reconfig(
    (ip4, ip6): (Ipv4Addr, Ipv6Addr),
    peers: Vec<PeerConfig>,
    other_subnets: impl IntoIterator<Item = IpNet>,
    own_subnets: Vec<IpNet>,
    knobs: Knobs,
) -> Reconfig {
    let mut routes: Vec<IpNet> = vec![
        "100.64.0.0/10".parse().expect("valid prefix"),
        "fd7a:115c:a1e0::/48".parse().expect("valid prefix"),
    ];
    routes.extend(other_subnets);
    Reconfig {
        wireguard: Some(WgConfig {
            listen_port: WG_PORT,
            peers,
        }),
        router: Some(RouterConfig {
            local_addrs: vec![IpNet::from(IpAddr::V4(ip4)), IpNet::from(IpAddr::V6(ip6))],
            routes,
            advertised_routes: own_subnets.clone(),
            mtu: 1280,
        }),
        dns: Some(DnsConfig {
            nameservers: vec![IpAddr::V4(Ipv4Addr::new(100, 100, 100, 100))],
            search_domains: vec!["tailnet.example".into()],
        }),
        knobs,
        primary_routes: own_subnets,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two() -> Tailnet {
        Tailnet::builder()
            .seed(7)
            .node("a")
            .node("b")
            .keep_trace(true)
            .build()
    }

    #[test]
    fn subset_check() {
        assert!(sorted_subset(&[1, 3], &[1, 2, 3]));
        assert!(sorted_subset::<u8>(&[], &[1]));
        assert!(!sorted_subset(&[4], &[1, 2, 3]));
    }

    #[test]
    fn addresses_follow_the_index() {
        let net = two();
        let b = net.id("b").unwrap();
        assert_eq!(net.ip4(b), "100.64.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(net.ip6(b), "fd7a:115c:a1e0::2".parse::<IpAddr>().unwrap());
        assert_eq!(net.endpoint(b), "10.0.0.2:41641".parse().unwrap());
    }

    #[test]
    fn datagram_reaches_the_peer_os() {
        let mut net = two();
        let (a, b) = (net.id("a").unwrap(), net.id("b").unwrap());
        net.run_for(Duration::from_secs(1));
        let ip = net.ip4(b);
        let s = net.send_stream(a, ip, 5, Duration::from_millis(100), 64, None);
        net.run_for(Duration::from_secs(2));
        assert_eq!(net.streams()[s].delivered_count(), 5);
        assert_eq!(net.is_configured(a, b), Some(true));
        assert!(net.violations().is_empty(), "{:?}", net.violations());
    }

    #[test]
    fn tsmp_ping_to_a_healthy_peer_takes_a_round_trip_after_the_handshake() {
        let mut net = two();
        let (a, b) = (net.id("a").unwrap(), net.id("b").unwrap());
        net.run_for(Duration::from_secs(1));
        let ip = net.ip4(b);
        net.send_datagram(a, ip, 32);
        net.run_for(Duration::from_secs(1));
        let p = net.ping(a, ip, PingKind::Tsmp, 0, None);
        net.run_for(Duration::from_secs(1));
        let record = &net.pings()[p];
        assert_eq!(record.outcome_name(), "pong");
        assert_eq!(record.elapsed(), Some(Duration::from_millis(20)));
        assert!(net.violations().is_empty(), "{:?}", net.violations());
    }
}
