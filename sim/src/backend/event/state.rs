//! The event backend's state: the nodes as the harness sees them, the
//! queue, the records, and the run loop that takes one entry at a time.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use rand_chacha::ChaCha20Rng;
use wgmesh_core::{DiscoPrivateKey, DiscoPublicKey, Engine, Knobs, NodePrivateKey, NodePublicKey};

use super::error_log::ErrorCounter;
use super::queue::{Scheduled, SimEvent};
use crate::scenario::CounterScope;
use crate::trace::{Category, Keep, Trace};
use crate::world::address::{endpoint, tailnet_ip4, tailnet_ip6};
use crate::world::control::{ControlClient, ControlHost, KEEPALIVE, control_key};
use crate::world::records::{FlowRecord, PingRecord, Stats, StreamRecord, Violation};
use crate::world::spec::{NetworkSpec, NodeId, NodeSpec, node_knobs};
use crate::world::{CONTROL_SEED_STREAM, KEY_STREAM, rng_stream};

/// Events processed within one virtual millisecond before the harness declares a livelock.
const MAX_EVENTS_PER_INSTANT: u64 = 1_000_000;
/// Queue entries a run may process by default before it is stopped.
pub const DEFAULT_MAX_STEPS: u64 = 200_000_000;
/// Violations kept in full; later ones are only counted.
const MAX_KEPT_VIOLATIONS: usize = 200;

/// Builds a [`Tailnet`].
#[derive(Debug, Clone)]
pub struct TailnetBuilder {
    seed: u64,
    network: NetworkSpec,
    knobs: Knobs,
    nodes: Vec<NodeSpec>,
    keep_trace: Keep,
    max_steps: u64,
    policy: Option<wgmesh_control::Policy>,
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

    /// The coordination server's policy (default: every node may reach
    /// every node).
    pub fn policy(mut self, policy: wgmesh_control::Policy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// Creates the nodes; each starts and joins the coordination server at
    /// time zero.
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
            policy: None,
        }
    }
}

pub(super) struct Node {
    pub(super) spec: NodeSpec,
    pub(super) private_key: NodePrivateKey,
    pub(super) public_key: NodePublicKey,
    pub(super) disco_private: DiscoPrivateKey,
    pub(super) disco_public: DiscoPublicKey,
    pub(super) ip4: Ipv4Addr,
    pub(super) ip6: Ipv6Addr,
    pub(super) endpoint: SocketAddr,
    pub(super) address_generation: u8,
    pub(super) allowed_ips: Vec<IpNet>,
    pub(super) knobs: Knobs,
    pub(super) engine: Option<Engine>,
    pub(super) incarnation: u64,
    pub(super) timer_at: Option<Duration>,
    pub(super) link_up: bool,
    pub(super) subnet_peers: Vec<NodePublicKey>,
    pub(super) activity: Vec<Option<Duration>>,
    pub(super) outstanding_pings: usize,
    pub(super) client: ControlClient,
    pub(super) client_timer_at: Option<Duration>,
    /// The counters of the node's closed engines, added up (a restart
    /// starts the new engine's from zero).
    pub(super) earlier_counters: Vec<(&'static str, u64)>,
    /// The disco key the node had before its current one, if it restarted.
    pub(super) previous_disco: Option<DiscoPrivateKey>,
    /// The pending restart goes back to `previous_disco`
    /// (`restore_disco_key`) instead of drawing a new key.
    pub(super) restore_disco: bool,
}

/// A whole tailnet on the event backend. See the module docs.
pub struct Tailnet {
    pub(super) seed: u64,
    pub(super) base: Instant,
    pub(super) now: Duration,
    pub(super) seq: u64,
    pub(super) queue: BinaryHeap<Scheduled>,
    pub(super) nodes: Vec<Node>,
    pub(super) by_name: BTreeMap<String, usize>,
    pub(super) by_key: BTreeMap<NodePublicKey, usize>,
    pub(super) addr_book: BTreeMap<SocketAddr, usize>,
    pub(super) host_owner: BTreeMap<IpAddr, usize>,
    pub(super) subnet_owner: Vec<(IpNet, usize)>,
    pub(super) network: NetworkSpec,
    pub(super) partitions: BTreeSet<(usize, usize)>,
    pub(super) control: ControlHost,
    pub(super) control_auth_key: String,
    pub(super) control_cut: BTreeSet<usize>,
    pub(super) keepalives: BTreeMap<wgmesh_control::NodeKey, u16>,
    /// One-way cuts: (from, to) pairs whose datagrams from `from` to `to`
    /// are lost, while the other direction travels.
    pub(super) one_way_cuts: BTreeSet<(usize, usize)>,
    pub(super) key_rng: ChaCha20Rng,
    pub(super) trace: Trace,
    pub(super) pings: Vec<PingRecord>,
    pub(super) outstanding: BTreeSet<(Duration, usize)>,
    pub(super) streams: Vec<StreamRecord>,
    pub(super) flows: Vec<FlowRecord>,
    pub(super) violations: Vec<Violation>,
    pub(super) stats: Stats,
    pub(super) errors: Arc<ErrorCounter>,
    pub(super) dispatch: tracing::Dispatch,
    pub(super) instant_events: (Duration, u64),
    pub(super) os_depth: u32,
    pub(super) scratch: Vec<u8>,
    pub(super) max_steps: u64,
    /// The network model, for a scenario that asks for one (NAT boxes,
    /// servers, per-link parameters, random loss or jitter); `None` keeps
    /// the plain network, which only delays.
    pub(super) fabric: Option<super::network::EventFabric>,
}

impl Tailnet {
    /// A builder with one default node list (empty), seed 1 and the default network.
    pub fn builder() -> TailnetBuilder {
        TailnetBuilder::default()
    }

    fn new(b: TailnetBuilder) -> Self {
        let errors = Arc::new(ErrorCounter::default());
        let dispatch = tracing::Dispatch::from(Arc::clone(&errors));
        let mut key_rng = rng_stream(b.seed, KEY_STREAM);
        let n = b.nodes.len();
        let fabric = super::network::EventFabric::for_run(b.seed, &b.network, &b.nodes);
        let mut nodes = Vec::with_capacity(n);
        let mut by_name = BTreeMap::new();
        let mut by_key = BTreeMap::new();
        let mut addr_book = BTreeMap::new();
        for (i, spec) in b.nodes.into_iter().enumerate() {
            let private_key = NodePrivateKey::generate(&mut key_rng);
            let disco_private = DiscoPrivateKey::generate(&mut key_rng);
            let ip4 = tailnet_ip4(i);
            let ip6 = tailnet_ip6(i);
            let endpoint = endpoint(i, 0);
            let mut allowed_ips = vec![IpNet::from(IpAddr::V4(ip4)), IpNet::from(IpAddr::V6(ip6))];
            allowed_ips.extend(spec.subnets.iter().copied());
            let knobs = node_knobs(&spec, &b.knobs);
            by_name.insert(spec.name.clone(), i);
            by_key.insert(private_key.public_key(), i);
            addr_book.insert(endpoint, i);
            let client = ControlClient::new(
                control_key(&private_key.public_key()),
                spec.name.clone(),
                spec.subnets.clone(),
                ip4,
            );
            nodes.push(Node {
                client,
                client_timer_at: None,
                public_key: private_key.public_key(),
                disco_public: disco_private.public_key(),
                private_key,
                disco_private,
                ip4,
                ip6,
                endpoint,
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
                earlier_counters: Vec::new(),
                previous_disco: None,
                restore_disco: false,
                spec,
            });
        }
        let keys: Vec<NodePublicKey> = nodes.iter().map(|n: &Node| n.public_key).collect();
        let keepalives = nodes
            .iter()
            .filter_map(|n: &Node| {
                n.spec
                    .persistent_keepalive_secs
                    .map(|k| (control_key(&n.public_key), k))
            })
            .collect();
        let control_seed = {
            use rand_core::RngCore;
            rng_stream(b.seed, CONTROL_SEED_STREAM).next_u64()
        };
        let control = ControlHost::new(
            control_seed,
            b.policy.unwrap_or_else(wgmesh_control::Policy::allow_all),
            &keys,
        );
        let control_auth_key = control.auth_key().to_string();
        let mut net = Tailnet {
            control,
            control_auth_key,
            control_cut: BTreeSet::new(),
            keepalives,
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
            one_way_cuts: BTreeSet::new(),
            key_rng,
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
            fabric,
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
                net.client_start(i);
            }
            net.push(KEEPALIVE, SimEvent::ControlKeepalive);
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
        self.counter_in(node, name, CounterScope::Incarnation)
    }

    /// [`Tailnet::counter`] over the running engines only
    /// (`Incarnation`) or over every engine each node ran (`Total`).
    pub fn counter_in(&self, node: Option<NodeId>, name: &str, scope: CounterScope) -> Option<u64> {
        let mut total = None;
        for (i, n) in self.nodes.iter().enumerate() {
            if node.is_some_and(|id| id.0 != i) {
                continue;
            }
            if scope == CounterScope::Total {
                if let Some((_, v)) = n.earlier_counters.iter().find(|(k, _)| *k == name) {
                    total = Some(total.unwrap_or(0) + v);
                }
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

    pub(super) fn instant(&self) -> Instant {
        self.base + self.now
    }

    /// Queues `event` for virtual time `at`.
    pub(super) fn push(&mut self, at: Duration, event: SimEvent) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at,
            phase: event.phase(),
            seq: self.seq,
            event,
        });
    }

    pub(super) fn log(
        &mut self,
        node: Option<usize>,
        category: Category,
        kind: &'static str,
        detail: String,
    ) {
        let name = node.map_or("-", |i| self.nodes[i].spec.name.as_str());
        self.trace.record(self.now, name, category, kind, detail);
    }

    pub(super) fn violation(&mut self, node: Option<usize>, message: String) {
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

    pub(super) fn peer_name(&self, key: &NodePublicKey) -> String {
        self.by_key
            .get(key)
            .map_or_else(|| key.short(), |&i| self.nodes[i].spec.name.clone())
    }

    pub(super) fn rebuild_owners(&mut self) {
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
    pub(super) fn owner_of(&self, ip: IpAddr) -> Option<usize> {
        if let Some(&i) = self.host_owner.get(&ip) {
            return Some(i);
        }
        self.subnet_owner
            .iter()
            .find(|(net, _)| net.contains(&ip))
            .map(|(_, i)| *i)
    }

    pub(super) fn is_own_address(&self, i: usize, ip: IpAddr) -> bool {
        let n = &self.nodes[i];
        ip == IpAddr::V4(n.ip4)
            || ip == IpAddr::V6(n.ip6)
            || n.allowed_ips
                .iter()
                .any(|net| net.prefix_len() != net.max_prefix_len() && net.contains(&ip))
    }

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
            SimEvent::ToControl { node, message } => self.control_arrival(node, *message),
            SimEvent::FromControl {
                node,
                incarnation,
                message,
            } => self.client_message(node, incarnation, *message),
            SimEvent::ClientTimer { node, incarnation } => self.client_timer(node, incarnation),
            SimEvent::ControlUp { epoch } => self.control_up(epoch),
            SimEvent::ControlKeepalive => self.control_keepalive(),
            SimEvent::Reapply { node, incarnation } => self.reapply_local(node, incarnation),
            SimEvent::Timer { node, incarnation } => {
                let n = &mut self.nodes[node];
                if n.incarnation != incarnation || n.timer_at != Some(self.now) {
                    return;
                }
                n.timer_at = None;
                self.call_engine(node, |engine, now| engine.handle_timeout(now));
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

    pub(super) fn with_dispatch<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let dispatch = self.dispatch.clone();
        let r = tracing::dispatcher::with_default(&dispatch, || f(self));
        self.check_global();
        r
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::time::Duration;

    use wgmesh_core::PingKind;

    use super::Tailnet;

    fn two() -> Tailnet {
        Tailnet::builder()
            .seed(7)
            .node("a")
            .node("b")
            .keep_trace(true)
            .build()
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
