//! The engine: one tailnet node as a sans-IO state machine.

mod buffers;
mod control;
mod disco;
mod endpoints;
mod inbound;
mod nat;
mod opens;
mod outbound;
mod peers;
mod pending;
mod pings;
mod reconfig;
mod slot;
mod staged;
mod timer;
mod wg;

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::time::Instant;

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use crate::api::*;
use crate::config::{EngineConfig, PeerDelta, Reconfig, ReconfigError};
use crate::conntrack::Conntrack;
use crate::counters::Counters;
use crate::filter::PacketFilter;
use crate::keys::{DiscoPublicKey, NodePublicKey};
use crate::routing::SharedPrefixTable;
use buffers::Buffers;
use disco::DiscoState;
use endpoints::EndpointDiscovery;
use peers::PeerTable;
use pending::{PendingOpens, PendingPings};
use reconfig::RunningConfig;
use slot::PeerSlot;
use timer::{EngineTimer, TimerKey, TimerQueue};
use wg::WgDevice;

pub use timer::{PeerTimer, TimeoutReason};

pub use pings::PeerForIpError;

/// Where [`Engine::handle_tun_burst`] takes its packets from: called until
/// it returns `false`, each call hands at most one packet to the function
/// it is given.
pub type TunBurstSource<'a> = dyn FnMut(&mut dyn FnMut(&[u8])) -> bool + 'a;

/// One tailnet node: WireGuard sessions, lazy peers, pings, routes and DNS,
/// as a deterministic state machine with no I/O.
///
/// # The contract
///
/// The engine never reads a clock, opens a socket or draws from the OS. The
/// caller owns all of that and drives the engine in a loop, in this order
/// (the one drain order; every method below fits into it):
///
/// 1. Feed **one** event with [`Engine::handle_input`] (a TUN packet, a
///    datagram, a reconfig, a peer delta, a ping request, ...) or, when the
///    deadline from [`Engine::poll_timeout`] has passed, call
///    [`Engine::handle_timeout`].
/// 2. Drain [`Engine::poll_output`] until it returns `None`, executing every
///    [`Output`] in the order given: send datagrams, write packets to the
///    TUN, apply effects, deliver ping results and status. Give packet
///    buffers back with [`Engine::recycle`] so the data path allocates
///    nothing.
/// 3. Read [`Engine::poll_timeout`] again: it may have moved.
///
/// Every time-dependent call takes `now`; it must never go backwards. The
/// same inputs at the same times with the same seed produce the same outputs
/// (except WireGuard ciphertext, whose handshake ephemerals the WireGuard
/// implementation draws from the OS). `handle_timeout` is idempotent and
/// early calls are no-ops.
///
/// # Methods, by group
///
/// - **Getters** read the state and change nothing: [`Engine::node_key`],
///   [`Engine::counters`], [`Engine::configured_peers`],
///   [`Engine::peer_for_ip`], ...
/// - **`handle_*`** feed events: [`Engine::handle_input`] (the one way in for
///   every change of state) and [`Engine::handle_timeout`].
/// - **Commands** are conveniences over `handle_input` with the outcome
///   unwrapped ([`Engine::reconfig`], [`Engine::apply_peer_delta`]), and
///   [`Engine::recycle`].
/// - **`poll_*`** say what to do and when: [`Engine::poll_output`],
///   [`Engine::poll_timeout`], and [`Engine::timeout_reason`] for why.
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
    /// This node's WireGuard side: static key, handshake rate limiter, clock.
    device: WgDevice,
    rng: ChaCha20Rng,
    now: Instant,

    peers: PeerTable,
    by_key: BTreeMap<NodePublicKey, PeerSlot>,
    by_disco: BTreeMap<DiscoPublicKey, PeerSlot>,
    by_index: BTreeMap<u32, PeerSlot>,
    /// Cryptokey routing over the full config; a subnet listed by several
    /// peers routes to the one that has listed it longest (see
    /// [`SharedPrefixTable`]).
    routes: SharedPrefixTable<PeerSlot>,
    next_tunnel_index: u32,
    configured_count: usize,
    /// Slots in the order of the last reconfig's peer list (for the fast diff).
    peer_order: Vec<PeerSlot>,
    /// Two-phase flushes done by the last peer change.
    last_flush_count: usize,
    /// Staged packets of peers in the middle of a two-phase flush.
    flush_carry: Vec<(PeerSlot, staged::Staged)>,
    /// Bytes waiting in all peers' staged queues together.
    staged_bytes_total: usize,
    /// The disco and pending-open deadlines currently in the timer queue.
    disco_timer_at: Option<Instant>,
    opens_timer_at: Option<Instant>,
    stun_timer_at: Option<Instant>,

    applied: RunningConfig,
    trimming: bool,
    filter: PacketFilter,
    /// Flows this node opened, whose replies pass the filter.
    conntrack: Conntrack,
    capture: bool,
    /// False while no link is up (the last [`LinkChange`]): no disco
    /// message is sent then.
    network_up: bool,
    closed: bool,
    /// The current problem of every subsystem the adapters reported one
    /// for ([`Input::Health`]), with when it was first reported.
    health: BTreeMap<HealthSubsystem, (HealthProblem, Instant)>,

    timers: TimerQueue,
    outputs: VecDeque<Output>,
    buffers: Buffers,
    /// The bookkeeping of the TUN burst being handled (kept between bursts
    /// for its allocation); see [`Engine::handle_tun_burst`].
    burst: outbound::TunBurst,

    pings: PendingPings,
    opens: PendingOpens,
    disco: DiscoState,
    /// This node's own endpoints: local ones and the STUN-reflexive one.
    endpoints: EndpointDiscovery,
    /// The NAT settings in force (peers' relayed addresses).
    nat: nat::NatState,

    status_pending: bool,
    last_status_push: Option<Instant>,
    counters: Counters,
    /// Every log line of this engine is inside this span (one per node).
    span: tracing::Span,
}

impl Engine {
    /// Creates an engine at time `now` with its RNG seeded from `rng_seed`.
    ///
    /// `now` is also the epoch of the clock WireGuard sees. The engine starts
    /// with no peers; the first [`Input::Reconfig`] gives it its config.
    pub fn new(config: EngineConfig, now: Instant, rng_seed: u64) -> Self {
        let node_key = config.private_key.public_key();
        let disco_key = config.disco_private_key.public_key();
        let device = WgDevice::new(&config.private_key, now);
        let mut rng = ChaCha20Rng::seed_from_u64(rng_seed);
        let next_tunnel_index = rng.next_u32() & 0x00ff_ffff;
        let disco = DiscoState::new(*config.disco_private_key.as_bytes());
        Self {
            node_key,
            disco_key,
            device,
            rng,
            now,
            peers: PeerTable::default(),
            by_key: BTreeMap::new(),
            by_disco: BTreeMap::new(),
            by_index: BTreeMap::new(),
            routes: SharedPrefixTable::default(),
            next_tunnel_index,
            configured_count: 0,
            peer_order: Vec::new(),
            last_flush_count: 0,
            flush_carry: Vec::new(),
            staged_bytes_total: 0,
            disco_timer_at: None,
            opens_timer_at: None,
            stun_timer_at: None,
            trimming: config.trim_override.unwrap_or(true),
            applied: RunningConfig::default(),
            filter: PacketFilter::allow_all(),
            conntrack: Conntrack::default(),
            capture: false,
            network_up: true,
            closed: false,
            health: BTreeMap::new(),
            timers: TimerQueue::default(),
            outputs: VecDeque::new(),
            buffers: Buffers::new(),
            burst: outbound::TunBurst::default(),
            pings: PendingPings::default(),
            opens: PendingOpens::default(),
            disco,
            endpoints: EndpointDiscovery::new(now),
            nat: nat::NatState::default(),
            status_pending: false,
            last_status_push: None,
            counters: Counters::default(),
            span: tracing::debug_span!("engine", node = %config.name, key = ?node_key),
            config,
        }
    }

    // --- Getters ---------------------------------------------------------

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
    pub fn gauges(&self) -> [(&'static str, u64); 6] {
        [
            ("configured_peers", self.configured_count as u64),
            ("full_config_peers", self.peers.len() as u64),
            ("pending_pings", self.pings.len() as u64),
            ("pending_opens", self.opens.len() as u64),
            ("conntrack_flows", self.conntrack.len() as u64),
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

    /// Disco path candidates kept for `peer` (0 while it has no disco
    /// state; `None`: not in the config), to check their bound.
    pub fn disco_candidate_count(&self, peer: &NodePublicKey) -> Option<usize> {
        self.by_key
            .get(peer)
            .map(|&slot| self.disco.candidate_count(slot))
    }

    /// Entries in the timer queue (live and stale), to check it stays bounded.
    pub fn timer_queue_len(&self) -> usize {
        self.timers.len()
    }

    /// True once [`Input::Close`] was handled.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Finds the peer for a ping target, like the reference: an exact
    /// single-IP match first, then our own addresses, then the longest prefix
    /// over the full config (trimmed peers included).
    pub fn peer_for_ip(&self, ip: IpAddr) -> Result<NodePublicKey, PeerForIpError> {
        self.peer_slot_for_ip(ip)
            .map(|slot| self.peers[slot].config.public_key)
    }

    // --- handle_*: the events ------------------------------------------------

    /// Feeds one input. Drain [`Engine::poll_output`] afterwards.
    ///
    /// This is the one way in: every other method that changes the state is
    /// a convenience that goes through here.
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
                Input::Reconfig(_)
                | Input::PeerDelta(_)
                | Input::LinkChange(_)
                | Input::Ping(_)
                | Input::StatusRequest
                | Input::SetPacketFilter(_)
                | Input::SetCapture(_)
                | Input::Health(_)
                | Input::SetNat(_)
                | Input::SetLocalEndpoints(_) => return Err(InputError::Closed),
            }
        }
        match input {
            Input::TunPacket(packet) => self.handle_tun_packet(now, packet),
            Input::Datagram { from, data } => self.handle_datagram(now, from, data),
            Input::Reconfig(reconfig) => {
                return self
                    .apply_reconfig(now, &reconfig)
                    .map(InputOutcome::Reconfig)
                    .map_err(InputError::from);
            }
            Input::PeerDelta(delta) => {
                return self
                    .apply_delta(now, delta)
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
            Input::Health(report) => self.record_health(now, report),
            Input::SetNat(config) => self.set_nat(now, config)?,
            Input::SetLocalEndpoints(local) => self.set_local_endpoints(&local)?,
            Input::Close => self.close(),
        }
        Ok(InputOutcome::Done)
    }

    /// Feeds a burst of packets read from the TUN at one instant: the same
    /// as one [`Input::TunPacket`] per packet, in order, with the per-packet
    /// bookkeeping done once per burst per peer instead (the peer lookup
    /// is remembered while the destination stays the same; send activity,
    /// WireGuard's timer refresh and the rescheduling of the peer's timer
    /// happen for the first packet to each peer and once at the end).
    ///
    /// `next` is called until it returns `false`; each call hands at most
    /// one packet to the function it is given (a device lends its buffers
    /// that way, without copying them into a list). Returns how many
    /// packets were handed in. Drain [`Engine::poll_output`] afterwards.
    pub fn handle_tun_burst(&mut self, now: Instant, next: &mut TunBurstSource<'_>) -> usize {
        let _span = self.span.clone().entered();
        self.advance(now);
        let mut burst = std::mem::take(&mut self.burst);
        burst.clear();
        let mut count = 0;
        while next(&mut |packet: &[u8]| {
            count += 1;
            if self.closed {
                self.counters.drop_closed += 1;
            } else {
                self.handle_tun_packet_in_burst(now, packet, &mut burst);
            }
        }) {}
        for &slot in &burst.touched {
            self.reschedule_peer(slot);
        }
        self.burst = burst;
        count
    }

    /// Runs every timer due at `now`. Idempotent; early calls do nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        let _span = self.span.clone().entered();
        self.advance(now);
        while let Some((at, key)) = self.timers.pop_due(now) {
            if !self.timer_is_current(at, key) {
                continue;
            }
            match key {
                TimerKey::Peer(slot) => {
                    if let Some(wg) = self.peers[slot].wg.as_mut() {
                        wg.deadline = None;
                    }
                    self.peer_timer(now, slot);
                }
                TimerKey::Ping(id) => {
                    if let Some(result) = self.pings.time_out(id) {
                        self.counters.pings_timed_out += 1;
                        self.outputs.push_back(Output::PingResult(Box::new(result)));
                    }
                }
                TimerKey::Engine(EngineTimer::PendingOpens) => {
                    self.opens_timer_at = None;
                    self.check_pending_opens(now);
                }
                TimerKey::Engine(EngineTimer::Disco) => {
                    self.disco_timer_at = None;
                    let actions = self.disco.on_timer(now, &mut self.rng);
                    self.run_disco_actions(now, actions);
                }
                TimerKey::Engine(EngineTimer::Stun) => {
                    self.stun_timer_at = None;
                    self.stun_timer(now);
                }
            }
        }
    }

    // --- Commands -------------------------------------------------------------

    /// Gives a packet buffer from [`Output::Transmit`] or [`Output::TunWrite`]
    /// back for reuse.
    pub fn recycle(&mut self, buffer: Vec<u8>) {
        self.buffers.recycle(buffer);
    }

    /// Applies a full desired state: [`Input::Reconfig`] through
    /// [`Engine::handle_input`], with the outcome unwrapped.
    ///
    /// When the peer list has the same length as the last one, it is first
    /// compared position by position with what the engine holds; if only a
    /// few peers differ, only those are validated and applied (the cost is
    /// one comparison per peer, no copies). Otherwise the whole config is
    /// validated and diffed by key.
    pub fn reconfig(
        &mut self,
        now: Instant,
        reconfig: &Reconfig,
    ) -> Result<ReconfigOutcome, ReconfigError> {
        match self.handle_input(now, Input::Reconfig(Box::new(reconfig.clone()))) {
            Ok(InputOutcome::Reconfig(outcome)) => Ok(outcome),
            // Like `Done`, a NAT refusal never answers a reconfig: only
            // `SetNat` and `SetLocalEndpoints` are refused with it.
            Ok(InputOutcome::Done) | Err(InputError::Nat(_)) => Ok(ReconfigOutcome::NoChanges),
            Err(InputError::Reconfig(e)) => Err(e),
            Err(InputError::Closed) => Err(ReconfigError::EngineClosed),
        }
    }

    /// Applies a change to some peers without resending the whole netmap:
    /// [`Input::PeerDelta`] through [`Engine::handle_input`], reduced to how
    /// many peers changed. The cost is proportional to the change, not to
    /// the number of peers.
    pub fn apply_peer_delta(
        &mut self,
        now: Instant,
        delta: &PeerDelta,
    ) -> Result<usize, ReconfigError> {
        match self.handle_input(now, Input::PeerDelta(delta)) {
            Ok(InputOutcome::Reconfig(ReconfigOutcome::Applied(changes))) => {
                Ok(changes.peers_changed)
            }
            // A NAT refusal never answers a peer delta (see `reconfig`).
            Ok(InputOutcome::Reconfig(ReconfigOutcome::NoChanges) | InputOutcome::Done)
            | Err(InputError::Nat(_)) => Ok(0),
            Err(InputError::Reconfig(e)) => Err(e),
            Err(InputError::Closed) => Err(ReconfigError::EngineClosed),
        }
    }

    // --- poll_*: what to do, and when -----------------------------------------

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
        self.next_live_timer().map(|(at, _)| at)
    }

    /// Why the engine wants to be woken at the deadline [`Engine::poll_timeout`]
    /// returns (for traces and logs); `None` when there is no deadline.
    ///
    /// Like `poll_timeout` it may drop stale entries from the timer queue,
    /// which changes nothing but [`Engine::timer_queue_len`].
    pub fn timeout_reason(&mut self) -> Option<TimeoutReason> {
        let (_, key) = self.next_live_timer()?;
        Some(match key {
            TimerKey::Peer(slot) => {
                let peer = self.peers.get(slot)?;
                TimeoutReason::Peer {
                    peer: peer.config.public_key,
                    timer: peer.timer_deadline()?.1,
                }
            }
            TimerKey::Ping(id) => TimeoutReason::Ping {
                id: self.pings.request_id(id)?,
            },
            TimerKey::Engine(EngineTimer::PendingOpens) => TimeoutReason::PendingOpens,
            TimerKey::Engine(EngineTimer::Disco) => TimeoutReason::Disco,
            TimerKey::Engine(EngineTimer::Stun) => TimeoutReason::EndpointDiscovery,
        })
    }

    // --- Internals ----------------------------------------------------------

    /// Whether a queued deadline is still the one its owner wants. Owners
    /// remember one deadline each and the queue cancels lazily, so an entry
    /// whose owner moved on (or is gone) is stale: this is the one check.
    fn timer_is_current(&self, at: Instant, key: TimerKey) -> bool {
        match key {
            TimerKey::Peer(slot) => self
                .peers
                .get(slot)
                .is_some_and(|p| p.timer_deadline().map(|(t, _)| t) == Some(at)),
            TimerKey::Ping(id) => self.pings.deadline_of(id) == Some(at),
            TimerKey::Engine(EngineTimer::PendingOpens) => self.opens_timer_at == Some(at),
            TimerKey::Engine(EngineTimer::Disco) => self.disco_timer_at == Some(at),
            TimerKey::Engine(EngineTimer::Stun) => self.stun_timer_at == Some(at),
        }
    }

    /// The earliest current entry of the timer queue, dropping stale ones.
    fn next_live_timer(&mut self) -> Option<(Instant, TimerKey)> {
        while let Some((at, key)) = self.timers.peek() {
            if self.timer_is_current(at, key) {
                return Some((at, key));
            }
            self.timers.pop();
        }
        None
    }

    fn advance(&mut self, now: Instant) {
        if now > self.now {
            self.now = now;
        }
        self.device.tick(now);
    }
}
