//! The engine: one tailnet node as a sans-IO state machine.

mod control;
mod disco;
mod inbound;
mod opens;
mod outbound;
mod peers;
mod pending;
mod pings;
mod reconfig;
mod timer;
mod wg;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::x25519;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use slab::Slab;

use crate::api::*;
use crate::config::EngineConfig;
use crate::counters::Counters;
use crate::filter::PacketFilter;
use crate::keys::{DiscoPublicKey, NodePublicKey};
use crate::limits::*;
use crate::routing::PrefixTable;
use disco::DiscoState;
use peers::Peer;
use pending::{PendingOpens, PendingPings};
use reconfig::Applied;
use timer::{EngineTimer, TimerKey, TimerQueue};
use wg::WgClock;

pub use pings::PeerForIpError;
pub use reconfig::PeerDelta;

/// Extra room WireGuard needs around a payload.
const WG_OVERHEAD: usize = 32;
/// The largest WireGuard message is the 148-byte initiation.
const WG_MIN_BUFFER: usize = 148;

/// One tailnet node: WireGuard sessions, lazy peers, pings, routes and DNS,
/// as a deterministic state machine with no I/O.
///
/// # The contract
///
/// The engine never reads a clock, opens a socket or draws from the OS. The
/// caller owns all of that and drives the engine in a loop:
///
/// 1. Feed **one** event with [`Engine::handle_input`] (a TUN packet, a
///    datagram, a reconfig, a ping request, ...) or, when the deadline from
///    [`Engine::poll_timeout`] has passed, call [`Engine::handle_timeout`].
/// 2. Drain [`Engine::poll_output`] until it returns `None`, executing every
///    [`Output`]: send datagrams, write packets to the TUN, apply effects,
///    deliver ping results and status. Give packet buffers back with
///    [`Engine::recycle`] so the data path allocates nothing.
/// 3. Read [`Engine::poll_timeout`] again: it may have moved.
///
/// Every time-dependent call takes `now`; it must never go backwards. The
/// same inputs at the same times with the same seed produce the same outputs
/// (except WireGuard ciphertext, whose handshake ephemerals boringtun draws
/// from the OS). `handle_timeout` is idempotent and early calls are no-ops.
///
/// ```
/// use std::time::Instant;
/// use wgmesh_core::{Engine, EngineConfig, Input, NodePrivateKey, DiscoPrivateKey};
///
/// let now = Instant::now(); // the caller's clock, never the engine's
/// let config = EngineConfig::new(NodePrivateKey::from_bytes([1; 32]), DiscoPrivateKey::from_bytes([2; 32]));
/// let mut engine = Engine::new(config, now, 42);
/// engine.handle_input(now, Input::StatusRequest).unwrap();
/// while let Some(output) = engine.poll_output() {
///     // execute it, then recycle any buffer
///     let _ = output;
/// }
/// let _next_deadline = engine.poll_timeout();
/// ```
pub struct Engine {
    config: EngineConfig,
    node_key: NodePublicKey,
    disco_key: DiscoPublicKey,
    static_private: x25519::StaticSecret,
    static_public: x25519::PublicKey,
    clock: WgClock,
    rng: ChaCha20Rng,
    rate_limiter: Arc<RateLimiter>,
    rate_limiter_reset_at: Instant,
    now: Instant,

    peers: Slab<Peer>,
    by_key: BTreeMap<NodePublicKey, usize>,
    by_disco: BTreeMap<DiscoPublicKey, usize>,
    by_index: BTreeMap<u32, usize>,
    routes: PrefixTable<usize>,
    next_generation: u64,
    next_tunnel_index: u32,
    configured_count: usize,
    /// Slots in the order of the last reconfig's peer list (for the fast diff).
    peer_order: Vec<usize>,
    /// Two-phase flushes done by the last peer change.
    last_flush_count: usize,
    /// The disco and pending-open deadlines currently in the timer queue.
    disco_timer_at: Option<Instant>,
    opens_timer_at: Option<Instant>,

    applied: Applied,
    trimming: bool,
    filter: PacketFilter,
    capture: bool,
    network_up: bool,
    closed: bool,

    timers: TimerQueue,
    outputs: VecDeque<Output>,
    pool: Vec<Vec<u8>>,
    scratch: Vec<u8>,
    scratch2: Vec<u8>,

    pings: PendingPings,
    opens: PendingOpens,
    disco: DiscoState,

    status_pending: bool,
    last_status_push: Option<Instant>,
    counters: Counters,
    /// Every log line of this engine is inside this span (one per node).
    span: tracing::Span,
}

impl Engine {
    /// Creates an engine at time `now` with its RNG seeded from `rng_seed`.
    ///
    /// `now` is also the epoch of the clock boringtun sees. The engine starts
    /// with no peers; the first [`Input::Reconfig`] gives it its config.
    pub fn new(config: EngineConfig, now: Instant, rng_seed: u64) -> Self {
        let static_private = x25519::StaticSecret::from(*config.private_key.as_bytes());
        let static_public = x25519::PublicKey::from(&static_private);
        let node_key = config.private_key.public_key();
        let disco_key = config.disco_private_key.public_key();
        let clock = WgClock::new(now);
        let rate_limiter = clock.with(now, || {
            Arc::new(RateLimiter::new(&static_public, HANDSHAKE_RATE_LIMIT))
        });
        let mut rng = ChaCha20Rng::seed_from_u64(rng_seed);
        let next_tunnel_index = rng.next_u32() & 0x00ff_ffff;
        let disco = DiscoState::new(*config.disco_private_key.as_bytes());
        Self {
            node_key,
            disco_key,
            static_private,
            static_public,
            clock,
            rng,
            rate_limiter,
            rate_limiter_reset_at: now,
            now,
            peers: Slab::new(),
            by_key: BTreeMap::new(),
            by_disco: BTreeMap::new(),
            by_index: BTreeMap::new(),
            routes: PrefixTable::new(),
            next_generation: 1,
            next_tunnel_index,
            configured_count: 0,
            peer_order: Vec::new(),
            last_flush_count: 0,
            disco_timer_at: None,
            opens_timer_at: None,
            trimming: config.trim_override.unwrap_or(true),
            applied: Applied::default(),
            filter: PacketFilter::allow_all(),
            capture: false,
            network_up: true,
            closed: false,
            timers: TimerQueue::default(),
            outputs: VecDeque::new(),
            pool: Vec::new(),
            scratch: vec![0; MAX_PACKET_SIZE + WG_OVERHEAD + WG_MIN_BUFFER],
            scratch2: Vec::with_capacity(2048),
            pings: PendingPings::default(),
            opens: PendingOpens::default(),
            disco,
            status_pending: false,
            last_status_push: None,
            counters: Counters::default(),
            span: tracing::debug_span!("engine", node = %config.name, key = ?node_key),
            config,
        }
    }

    /// This node's WireGuard public key.
    pub fn node_key(&self) -> NodePublicKey {
        self.node_key
    }

    /// This node's disco public key.
    pub fn disco_key(&self) -> DiscoPublicKey {
        self.disco_key
    }

    /// The counters of every drop and decision so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Number of peers in the full config.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Number of peers currently handed to WireGuard.
    pub fn configured_peer_count(&self) -> usize {
        self.configured_count
    }

    /// Whether `peer` is currently handed to WireGuard (`None`: not in the config).
    pub fn is_peer_configured(&self, peer: &NodePublicKey) -> Option<bool> {
        self.by_key
            .get(peer)
            .map(|&slot| self.peers[slot].wg.is_some())
    }

    /// The keys of the peers handed to WireGuard, sorted.
    pub fn configured_peers(&self) -> Vec<NodePublicKey> {
        self.by_key
            .iter()
            .filter(|(_, slot)| self.peers[**slot].wg.is_some())
            .map(|(k, _)| *k)
            .collect()
    }

    /// The keys of every peer in the full config, sorted.
    pub fn full_config_peers(&self) -> Vec<NodePublicKey> {
        self.by_key.keys().copied().collect()
    }

    /// Current levels (not counters) for metrics: `(name, value)` pairs.
    pub fn gauges(&self) -> [(&'static str, u64); 5] {
        [
            ("configured_peers", self.configured_count as u64),
            ("full_config_peers", self.peers.len() as u64),
            ("pending_pings", self.pings.len() as u64),
            ("pending_opens", self.opens.len() as u64),
            ("timer_queue_entries", self.timers.len() as u64),
        ]
    }

    /// Whether lazy peers (trimming) are in effect.
    pub fn trimming_enabled(&self) -> bool {
        self.trimming
    }

    /// Number of pings still waiting for an answer.
    pub fn pending_ping_count(&self) -> usize {
        self.pings.len()
    }

    /// Number of outbound TCP opens still being watched.
    pub fn pending_open_count(&self) -> usize {
        self.opens.len()
    }

    /// Entries in the timer queue (live and stale), to check it stays bounded.
    pub fn timer_queue_len(&self) -> usize {
        self.timers.len()
    }

    /// True once [`Input::Close`] was handled.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Gives a packet buffer from [`Output::Transmit`] or [`Output::TunWrite`]
    /// back for reuse.
    pub fn recycle(&mut self, buffer: Vec<u8>) {
        // Buffers keep their length: a buffer resized to the same packet size
        // next time needs no zeroing.
        // Oversized buffers (a rare jumbo packet) are not kept, so the pool
        // stays bounded at BUFFER_POOL_LIMIT small buffers.
        if self.pool.len() < BUFFER_POOL_LIMIT && buffer.capacity() <= POOLED_BUFFER_MAX_CAPACITY {
            self.pool.push(buffer);
        }
    }

    /// An empty pooled buffer, for appending.
    fn buffer(&mut self) -> Vec<u8> {
        let mut buffer = self.pool.pop().unwrap_or_else(|| Vec::with_capacity(2048));
        buffer.clear();
        buffer
    }

    /// A pooled buffer of exactly `len` bytes, contents unspecified, for
    /// boringtun to write into. Only bytes beyond its previous length are zeroed.
    fn sized_buffer(&mut self, len: usize) -> Vec<u8> {
        let mut buffer = self.pool.pop().unwrap_or_else(|| Vec::with_capacity(2048));
        buffer.resize(len, 0);
        buffer
    }

    /// The next output, if any. Call until `None` after every input or timeout.
    pub fn poll_output(&mut self) -> Option<Output> {
        if let Some(out) = self.outputs.pop_front() {
            return Some(out);
        }
        if self.status_pending {
            self.status_pending = false;
            self.counters.status_answers += 1;
            return Some(Output::Status(Box::new(self.build_status())));
        }
        None
    }

    /// The next instant at which [`Engine::handle_timeout`] has work, if any.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let peers = &self.peers;
        let pings = &self.pings;
        let (opens_at, disco_at) = (self.opens_timer_at, self.disco_timer_at);
        self.timers.peek(|at, key| match key {
            TimerKey::Peer { slot, generation } => peers
                .get(slot)
                .is_some_and(|p| p.generation == generation && p.timer_deadline() == Some(at)),
            TimerKey::Ping(id) => pings.deadline_of(id) == Some(at),
            TimerKey::Engine(EngineTimer::PendingOpens) => opens_at == Some(at),
            TimerKey::Engine(EngineTimer::Disco) => disco_at == Some(at),
        })
    }

    /// Runs every timer due at `now`. Idempotent; early calls do nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        let _span = self.span.clone().entered();
        self.advance(now);
        while let Some((at, key)) = self.timers.pop_due(now) {
            match key {
                TimerKey::Peer { slot, generation } => {
                    let current = self.peers.get(slot).is_some_and(|p| {
                        p.generation == generation && p.timer_deadline() == Some(at)
                    });
                    if current {
                        if let Some(wg) = self.peers[slot].wg.as_mut() {
                            wg.deadline = None;
                        }
                        self.peer_timer(now, slot);
                    }
                }
                TimerKey::Ping(id) => {
                    if self.pings.deadline_of(id) == Some(at) {
                        if let Some(result) = self.pings.time_out(id) {
                            self.counters.pings_timed_out += 1;
                            self.outputs.push_back(Output::PingResult(result));
                        }
                    }
                }
                TimerKey::Engine(EngineTimer::PendingOpens) => {
                    if self.opens_timer_at == Some(at) {
                        self.opens_timer_at = None;
                        self.check_pending_opens(now);
                    }
                }
                TimerKey::Engine(EngineTimer::Disco) => {
                    if self.disco_timer_at == Some(at) {
                        self.disco_timer_at = None;
                        let actions = self.disco.on_timer(now, &mut self.rng);
                        self.run_disco_actions(now, actions);
                    }
                }
            }
        }
    }

    fn advance(&mut self, now: Instant) {
        if now > self.now {
            self.now = now;
        }
    }

    /// Feeds one input. Drain [`Engine::poll_output`] afterwards.
    ///
    /// Bad packets are counted and dropped, never reported as errors; only a
    /// refused reconfig or input after close is an `Err`, and neither changes
    /// the running state.
    pub fn handle_input(
        &mut self,
        now: Instant,
        input: Input<'_>,
    ) -> Result<InputOutcome, InputError> {
        let _span = self.span.clone().entered();
        self.advance(now);
        if self.closed {
            match input {
                Input::Close => return Ok(InputOutcome::Done),
                Input::TunPacket(_) | Input::Datagram { .. } => {
                    self.counters.drop_closed += 1;
                    return Ok(InputOutcome::Done);
                }
                _ => return Err(InputError::Closed),
            }
        }
        match input {
            Input::TunPacket(packet) => self.handle_tun_packet(now, packet),
            Input::Datagram { from, data } => self.handle_datagram(now, from, data),
            Input::Reconfig(reconfig) => {
                return self
                    .reconfig(now, &reconfig)
                    .map(InputOutcome::Reconfig)
                    .map_err(InputError::from);
            }
            Input::LinkChange(change) => self.link_change(change),
            Input::Ping(request) => self.start_ping(now, request),
            Input::StatusRequest => {
                if self.status_pending {
                    self.counters.status_requests_coalesced += 1;
                }
                self.status_pending = true;
            }
            Input::SetPacketFilter(filter) => self.filter = filter,
            Input::SetCapture(on) => self.capture = on,
            Input::Close => self.close(),
        }
        Ok(InputOutcome::Done)
    }
}
