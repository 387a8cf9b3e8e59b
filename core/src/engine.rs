//! The engine: one tailnet node as a sans-IO state machine.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use ipnet::IpNet;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use slab::Slab;
use tracing::{debug, info, trace, warn};

use crate::api::*;
use crate::config::{
    DnsConfig, EngineConfig, Knobs, PeerConfig, Reconfig, ReconfigError, RouterConfig,
};
use crate::counters::Counters;
use crate::disco::{DiscoAction, DiscoState};
use crate::filter::{FilterAction, PacketFilter};
use crate::keys::{DiscoPublicKey, NodePublicKey};
use crate::pending::{MatchKey, PendingOpens, PendingPings};
use crate::routing::PrefixTable;
use crate::timer::{EngineTimer, TimerKey, TimerQueue};
use crate::wg::{TimerResult, WgClock, WgTunnel, consts};
use crate::wire;

/// A trimmable peer with no send or receive activity for this long leaves WireGuard.
pub const LAZY_PEER_IDLE_THRESHOLD: Duration = Duration::from_secs(5 * 60);
/// Receive activity per peer is noted at most this often.
pub const RECEIVE_ACTIVITY_GRANULARITY: Duration = Duration::from_secs(10);
/// Send activity per destination is recorded at most this often.
pub const SEND_ACTIVITY_GRANULARITY: Duration = Duration::from_secs(10);
/// A send after a gap this long (or a first send) re-checks the WireGuard config.
pub const SEND_RECHECK_GAP: Duration = Duration::from_secs(60);
/// Every ping ends after this long at the latest.
pub const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// While there is receive activity, status is pushed at most this often.
pub const STATUS_PUSH_INTERVAL: Duration = Duration::from_secs(60);
/// An outbound TCP SYN with no answer for this long is diagnosed.
pub const PENDING_OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest IP packet the engine handles.
pub const MAX_PACKET_SIZE: usize = 65535;
/// Handshake messages per second above which cookies are required.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Buffers kept for reuse.
const BUFFER_POOL_LIMIT: usize = 512;
/// Buffers larger than this are freed rather than pooled.
const POOLED_BUFFER_MAX_CAPACITY: usize = 16 * 1024;
/// Extra room WireGuard needs around a payload.
const WG_OVERHEAD: usize = 32;
/// The largest WireGuard message is the 148-byte initiation.
const WG_MIN_BUFFER: usize = 148;

/// The WireGuard part of a configured peer.
struct WgPeer {
    tunnel: WgTunnel,
    /// The 24-bit index boringtun puts in the upper bits of its session indices.
    index: u32,
    last_sent: Option<Instant>,
    last_received: Option<Instant>,
    handshake_started: Option<Instant>,
    last_initiation_sent: Option<Instant>,
    session_established: Option<Instant>,
    next_persistent_keepalive: Option<Instant>,
    /// Packets boringtun holds for us while a handshake runs.
    queued: usize,
    /// boringtun gave up (REKEY_ATTEMPT_TIME or key expiry): nothing to do until traffic.
    expired: bool,
    /// Where WireGuard sends when disco has no better path: the last address
    /// the peer was heard from, else its first configured endpoint.
    endpoint: Option<SocketAddr>,
    last_handshake_at: Option<Instant>,
    /// When it was woken from the trimmed state, and whether it has been
    /// heard from since (for connection diagnostics).
    woken_at: Option<Instant>,
    heard_since_wake: bool,
    /// The deadline currently in the timer queue for this peer. Only peers in
    /// WireGuard have timers (the idle check included).
    deadline: Option<Instant>,
}

/// A peer of the full config.
struct Peer {
    generation: u64,
    config: PeerConfig,
    trimmable: bool,
    wg: Option<Box<WgPeer>>,
    last_send_activity: Option<Instant>,
    last_receive_activity: Option<Instant>,
    rx_bytes: u64,
    tx_bytes: u64,
}

impl Peer {
    fn timer_deadline(&self) -> Option<Instant> {
        self.wg.as_ref().and_then(|wg| wg.deadline)
    }

    fn last_activity(&self) -> Option<Instant> {
        match (self.last_send_activity, self.last_receive_activity) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The parts of the last accepted reconfig the engine keeps.
#[derive(Default)]
struct Applied {
    have_config: bool,
    listen_port: u16,
    router: RouterConfig,
    dns: DnsConfig,
    knobs: Knobs,
    primary_routes: Vec<IpNet>,
    is_subnet_router: bool,
    dns_via_tunnel: bool,
}

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

/// A datagram classified for dispatch.
enum WgTarget {
    Peer(usize),
    Drop,
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

    // ----------------------------------------------------------------------
    // Outbound: TUN -> WireGuard
    // ----------------------------------------------------------------------

    fn handle_tun_packet(&mut self, now: Instant, packet: &[u8]) {
        self.counters.tun_packets_in += 1;
        let header = match wire::ip::IpHeader::parse(packet) {
            Ok(h) => h,
            Err(e) => {
                self.count_tun_error(&e);
                return;
            }
        };
        if packet.len() > MAX_PACKET_SIZE {
            self.counters.drop_tun_too_large += 1;
            return;
        }
        let packet = &packet[..header.total_len];
        if self.capture {
            self.capture_packet(now, true, packet);
        }
        if self.is_local_addr(header.dst) {
            // The OS routed a packet for one of our own addresses into the
            // tunnel (a stale route): hand it straight back, as the reference does.
            self.counters.packets_reflected += 1;
            let mut buf = self.buffer();
            buf.extend_from_slice(packet);
            self.counters.tun_packets_out += 1;
            self.outputs.push_back(Output::TunWrite(buf));
            return;
        }
        let route = self.routes.lookup(header.dst).map(|(_, &slot)| slot);
        if header.protocol == wire::ip::PROTO_TCP {
            if let Some(tcp) = wire::tcp::parse(&header, packet) {
                if tcp.is_syn_only() {
                    let peer = route.map(|slot| self.peers[slot].config.public_key);
                    let src = SocketAddr::new(header.src, tcp.src_port);
                    let dst = SocketAddr::new(header.dst, tcp.dst_port);
                    if self.opens.track(now, src, dst, peer) {
                        self.schedule_opens();
                    }
                }
            }
        }
        let Some(slot) = route else {
            self.counters.drop_no_peer_for_dst += 1;
            trace!(dst = %header.dst, "no peer for destination");
            return;
        };
        if self.applied.knobs.fake_icmp_echo {
            let mut reply = std::mem::take(&mut self.scratch2);
            if wire::icmp::echo_reply_for(packet, &mut reply).is_some() {
                self.counters.fake_icmp_replies += 1;
                let mut buf = self.buffer();
                buf.extend_from_slice(&reply);
                self.counters.tun_packets_out += 1;
                self.outputs.push_back(Output::TunWrite(buf));
                self.scratch2 = reply;
                return;
            }
            self.scratch2 = reply;
        }
        self.note_send_activity(now, slot, header.dst);
        self.send_to_peer(now, slot, packet);
    }

    fn count_tun_error(&mut self, e: &wire::ip::IpError) {
        use wire::ip::IpError;
        match e {
            IpError::Empty | IpError::Truncated { .. } => self.counters.drop_tun_truncated += 1,
            IpError::UnknownVersion(_) => self.counters.drop_tun_bad_version += 1,
            _ => self.counters.drop_tun_bad_length += 1,
        }
    }

    /// Records send activity (coarsely, like the reference) and makes sure the
    /// peer is in WireGuard before the packet is handed over, so the packet
    /// that wakes a trimmed peer is not lost.
    fn note_send_activity(&mut self, now: Instant, slot: usize, dst: IpAddr) {
        let peer = &mut self.peers[slot];
        let last = peer.last_send_activity;
        let record =
            last.is_none_or(|t| now.saturating_duration_since(t) >= SEND_ACTIVITY_GRANULARITY);
        if record {
            peer.last_send_activity = Some(now);
        }
        // The reference re-checks its WireGuard config on a first send or after
        // a gap of SEND_RECHECK_GAP; our lookup already covers the full config,
        // so the re-check reduces to "is the peer configured?", done for every
        // packet at the cost of one branch.
        if peer.wg.is_none() {
            self.wake_peer(now, slot, WakeReason::SendTo(dst));
        } else if record {
            self.reschedule_peer(slot);
        }
        if record {
            let actions = self.disco.note_active(now, slot, &mut self.rng);
            self.run_disco_actions(now, actions);
        }
    }

    fn note_receive_activity(&mut self, now: Instant, slot: usize) {
        let peer = &mut self.peers[slot];
        let record = peer
            .last_receive_activity
            .is_none_or(|t| now.saturating_duration_since(t) >= RECEIVE_ACTIVITY_GRANULARITY);
        if record {
            peer.last_receive_activity = Some(now);
            if peer.wg.is_none() {
                self.wake_peer(now, slot, WakeReason::Receive);
            } else {
                self.reschedule_peer(slot);
            }
            let actions = self.disco.note_active(now, slot, &mut self.rng);
            self.run_disco_actions(now, actions);
            if self
                .last_status_push
                .is_none_or(|t| now.saturating_duration_since(t) >= STATUS_PUSH_INTERVAL)
            {
                self.last_status_push = Some(now);
                self.status_pending = true;
            }
        }
    }

    /// Encrypts `packet` for the peer in `slot` and queues the datagram.
    /// The caller has made sure the peer is in WireGuard (woken if needed).
    fn send_to_peer(&mut self, now: Instant, slot: usize, packet: &[u8]) {
        self.refresh_peer_timers(now, slot);
        let max_queued = self.config.max_queued_packets_per_peer;
        let needed = (packet.len() + WG_OVERHEAD).max(WG_MIN_BUFFER);
        let mut buf = self.sized_buffer(needed);
        let peer = &mut self.peers[slot];
        let Some(wg) = peer.wg.as_mut() else {
            return;
        };
        if wg.queued >= max_queued && !Self::has_session(wg) {
            self.counters.drop_queue_overflow += 1;
            self.recycle(buf);
            return;
        }
        if wg.expired {
            wg.expired = false;
        }
        let result = wg.tunnel.encapsulate(now, packet, &mut buf);
        match result {
            TunnResult::WriteToNetwork(out) => {
                let len = out.len();
                let is_data = out.first() == Some(&4);
                if is_data {
                    wg.last_sent = Some(now);
                    peer.tx_bytes += packet.len() as u64;
                } else {
                    // A handshake initiation: the packet itself was queued.
                    wg.queued += 1;
                    Self::note_initiation(wg, now);
                    self.counters.handshake_initiations_sent += 1;
                }
                buf.truncate(len);
                self.transmit_to_peer(slot, buf);
            }
            TunnResult::Done => {
                // Queued behind a handshake already in progress.
                wg.queued += 1;
                self.recycle(buf);
            }
            TunnResult::Err(e) => {
                self.count_wg_error(&e);
                self.recycle(buf);
            }
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => self.recycle(buf),
        }
        self.reschedule_peer(slot);
    }

    fn has_session(wg: &WgPeer) -> bool {
        wg.session_established.is_some() && !wg.expired
    }

    fn note_initiation(wg: &mut WgPeer, now: Instant) {
        if wg.handshake_started.is_none() {
            wg.handshake_started = Some(now);
        }
        wg.last_initiation_sent = Some(now);
        wg.last_sent = Some(now);
    }

    /// Sends a WireGuard datagram to the peer's current endpoint.
    fn transmit_to_peer(&mut self, slot: usize, data: Vec<u8>) {
        let peer = &self.peers[slot];
        let endpoint = self
            .disco
            .best_endpoint(slot)
            .or(peer.wg.as_ref().and_then(|w| w.endpoint));
        match endpoint {
            Some(dst) => {
                self.counters.datagrams_out += 1;
                self.outputs
                    .push_back(Output::Transmit(Transmit { dst, data }));
            }
            None => {
                // No endpoint known yet; the peer can still reach us and we
                // answer to where it came from.
                trace!(peer = ?peer.config.public_key, "no endpoint for peer");
                self.recycle(data);
            }
        }
    }

    // ----------------------------------------------------------------------
    // Inbound: network -> WireGuard -> TUN
    // ----------------------------------------------------------------------

    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        self.counters.datagrams_in += 1;
        if wire::disco::looks_like_disco(data) {
            self.handle_disco(now, from, data);
            return;
        }
        let target = match Tunn::parse_incoming_packet(data) {
            Ok(packet) => self.classify_wg(now, from, data, packet),
            Err(WireGuardError::InvalidPacket) => {
                if data.len() >= 4
                    && matches!(
                        u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
                        1..=4
                    )
                {
                    self.counters.drop_wg_bad_size += 1;
                } else {
                    self.counters.drop_datagram_unknown += 1;
                }
                WgTarget::Drop
            }
            Err(e) => {
                self.count_wg_error(&e);
                WgTarget::Drop
            }
        };
        let WgTarget::Peer(slot) = target else {
            return;
        };
        self.decapsulate(now, slot, from, data);
    }

    fn classify_wg(
        &mut self,
        now: Instant,
        from: SocketAddr,
        data: &[u8],
        packet: Packet<'_>,
    ) -> WgTarget {
        match packet {
            Packet::HandshakeInit(ref init) => {
                // Rate-limit and check MAC1 with the shared limiter before the
                // expensive DH; under load, answer with a cookie instead.
                if now.saturating_duration_since(self.rate_limiter_reset_at)
                    >= Duration::from_secs(1)
                {
                    self.rate_limiter_reset_at = now;
                    self.clock.with(now, || self.rate_limiter.reset_count());
                }
                let mut cookie = [0u8; 64];
                let verdict = self.clock.with(now, || {
                    match self
                        .rate_limiter
                        .verify_packet(Some(from.ip()), data, &mut cookie)
                    {
                        Ok(_) => Ok(()),
                        Err(TunnResult::WriteToNetwork(reply)) => Err(Some(reply.len())),
                        Err(_) => Err(None),
                    }
                });
                match verdict {
                    Ok(()) => {}
                    Err(Some(len)) => {
                        self.counters.cookie_replies_sent += 1;
                        let mut buf = self.buffer();
                        buf.extend_from_slice(&cookie[..len]);
                        self.counters.datagrams_out += 1;
                        self.outputs.push_back(Output::Transmit(Transmit {
                            dst: from,
                            data: buf,
                        }));
                        return WgTarget::Drop;
                    }
                    Err(None) => {
                        self.counters.drop_wg_bad_mac += 1;
                        return WgTarget::Drop;
                    }
                }
                let Ok(half) =
                    parse_handshake_anon(&self.static_private, &self.static_public, init)
                else {
                    self.counters.drop_wg_unknown_peer += 1;
                    return WgTarget::Drop;
                };
                let key = NodePublicKey(half.peer_static_public);
                let Some(&slot) = self.by_key.get(&key) else {
                    self.counters.drop_wg_unknown_peer += 1;
                    debug!(peer = ?key, "handshake from a key not in the config");
                    return WgTarget::Drop;
                };
                if self.peers[slot].wg.is_none() {
                    // The reference drops this and waits 5 s for a retry; we
                    // re-add the peer and answer the same initiation.
                    self.wake_peer(now, slot, WakeReason::Handshake);
                }
                WgTarget::Peer(slot)
            }
            Packet::HandshakeResponse(ref p) => self.slot_for_index(p.receiver_idx),
            Packet::PacketCookieReply(ref p) => self.slot_for_index(p.receiver_idx),
            Packet::PacketData(ref p) => self.slot_for_index(p.receiver_idx),
        }
    }

    fn slot_for_index(&mut self, receiver_idx: u32) -> WgTarget {
        match self.by_index.get(&(receiver_idx >> 8)) {
            Some(&slot) => WgTarget::Peer(slot),
            None => {
                self.counters.drop_wg_unknown_index += 1;
                WgTarget::Drop
            }
        }
    }

    fn decapsulate(&mut self, now: Instant, slot: usize, from: SocketAddr, data: &[u8]) {
        self.refresh_peer_timers(now, slot);
        let message_type = data[0];
        // Decrypt straight into a pooled buffer: the plaintext then goes to
        // the TUN without another copy.
        let mut buf = self.sized_buffer(data.len().max(WG_MIN_BUFFER * 2));
        let Some(wg) = self.peers[slot].wg.as_mut() else {
            self.recycle(buf);
            return;
        };
        let result = wg.tunnel.decapsulate(now, Some(from.ip()), data, &mut buf);
        match result {
            TunnResult::Done => {
                wg.last_received = Some(now);
                self.recycle(buf);
                self.peer_heard(now, slot, from);
            }
            TunnResult::Err(e) => {
                self.recycle(buf);
                self.count_wg_error(&e);
            }
            TunnResult::WriteToNetwork(reply) => {
                wg.last_received = Some(now);
                wg.last_sent = Some(now);
                let len = reply.len();
                buf.truncate(len);
                if message_type == 1 || message_type == 2 {
                    // We answered an initiation (we are the responder), or our
                    // initiation was answered and `reply` is the first keepalive.
                    self.session_established(now, slot, from);
                }
                self.peer_heard(now, slot, from);
                self.counters.datagrams_out += 1;
                self.outputs.push_back(Output::Transmit(Transmit {
                    dst: from,
                    data: buf,
                }));
                let mut scratch = std::mem::take(&mut self.scratch);
                self.flush_queue(now, slot, from, &mut scratch);
                self.scratch = scratch;
            }
            TunnResult::WriteToTunnelV4(inner, _) | TunnResult::WriteToTunnelV6(inner, _) => {
                wg.last_received = Some(now);
                let len = inner.len();
                buf.truncate(len);
                self.peer_heard(now, slot, from);
                self.deliver_inbound(now, slot, buf);
            }
        }
        self.reschedule_peer(slot);
    }

    /// Authenticated traffic from a peer: roam to its address and note activity.
    fn peer_heard(&mut self, now: Instant, slot: usize, from: SocketAddr) {
        let peer = &mut self.peers[slot];
        if let Some(wg) = peer.wg.as_mut() {
            wg.endpoint = Some(from);
            wg.heard_since_wake = true;
        }
        self.note_receive_activity(now, slot);
    }

    fn session_established(&mut self, now: Instant, slot: usize, from: SocketAddr) {
        let peer = &mut self.peers[slot];
        let Some(wg) = peer.wg.as_mut() else { return };
        wg.session_established = Some(now);
        wg.handshake_started = None;
        wg.last_initiation_sent = None;
        wg.expired = false;
        wg.last_handshake_at = Some(now);
        self.counters.handshakes_completed += 1;
        let key = peer.config.public_key;
        debug!(peer = ?key, endpoint = %from, "handshake completed");
        self.outputs
            .push_back(Output::Event(Event::HandshakeCompleted {
                peer: key,
                endpoint: from,
            }));
    }

    /// Sends what boringtun queued while the handshake ran.
    fn flush_queue(&mut self, now: Instant, slot: usize, to: SocketAddr, scratch: &mut [u8]) {
        loop {
            let Some(wg) = self.peers[slot].wg.as_mut() else {
                return;
            };
            match wg.tunnel.decapsulate(now, None, &[], scratch) {
                TunnResult::WriteToNetwork(out) => {
                    let is_data = out.first() == Some(&4);
                    let len = out.len();
                    if is_data {
                        wg.queued = wg.queued.saturating_sub(1);
                        wg.last_sent = Some(now);
                        self.peers[slot].tx_bytes += (len - WG_OVERHEAD) as u64;
                    } else {
                        // boringtun re-queued the packet and started its own handshake.
                        Self::note_initiation(wg, now);
                        self.counters.handshake_initiations_sent += 1;
                    }
                    let mut buf = self.buffer();
                    buf.extend_from_slice(&scratch[..len]);
                    self.counters.datagrams_out += 1;
                    let dst = self.disco.best_endpoint(slot).unwrap_or(to);
                    self.outputs
                        .push_back(Output::Transmit(Transmit { dst, data: buf }));
                    if !is_data {
                        return;
                    }
                }
                _ => return,
            }
        }
    }

    /// A decrypted packet from a peer: check its source, filter it, intercept
    /// what is ours (TSMP, ping replies), deliver the rest to the TUN.
    fn deliver_inbound(&mut self, now: Instant, slot: usize, packet: Vec<u8>) {
        let header = match wire::ip::IpHeader::parse(&packet) {
            Ok(h) => h,
            Err(_) => {
                self.counters.drop_inner_malformed += 1;
                self.recycle(packet);
                return;
            }
        };
        let allowed = self
            .routes
            .lookup(header.src)
            .is_some_and(|(_, &s)| s == slot);
        if !allowed {
            self.counters.drop_spoofed_source += 1;
            self.recycle(packet);
            debug!(peer = ?self.peers[slot].config.public_key, src = %header.src, "source outside allowed IPs");
            return;
        }
        self.peers[slot].rx_bytes += packet.len() as u64;
        match header.protocol {
            wire::ip::PROTO_TSMP => {
                self.handle_tsmp(now, slot, &header, &packet);
                self.recycle(packet);
                return;
            }
            wire::ip::PROTO_ICMP | wire::ip::PROTO_ICMPV6 => {
                if let Some(echo) = wire::icmp::parse_echo(&header, &packet) {
                    if echo.kind == wire::icmp::EchoKind::Reply {
                        let key = MatchKey::Icmp(wire::icmp::ping_key(echo.ident, echo.seq));
                        if self.complete_ping(now, key, slot, None, None) {
                            self.recycle(packet);
                            return;
                        }
                    }
                }
            }
            wire::ip::PROTO_TCP => {
                if let Some(tcp) = wire::tcp::parse(&header, &packet) {
                    if tcp.is_syn_ack() || tcp.is_rst() {
                        let src = SocketAddr::new(header.dst, tcp.dst_port);
                        let dst = SocketAddr::new(header.src, tcp.src_port);
                        self.opens.answered(src, dst);
                    }
                }
            }
            _ => {}
        }
        if self.filter.check(&header, &packet) == FilterAction::Drop {
            self.counters.drop_filtered += 1;
            // A refused connection attempt gets a TSMP reject, so the other
            // side can tell "blocked by policy" from "no answer".
            if header.protocol == wire::ip::PROTO_TCP {
                if let Some(tcp) = wire::tcp::parse(&header, &packet).filter(|t| t.is_syn_only()) {
                    let reject = wire::tsmp::TsmpMessage::Reject {
                        ip_proto: wire::ip::PROTO_TCP,
                        reason: wire::tsmp::RejectReason::Acl,
                        src_port: tcp.src_port,
                        dst_port: tcp.dst_port,
                        maybe_broken: false,
                    };
                    let mut out = std::mem::take(&mut self.scratch2);
                    if reject.emit_packet(header.dst, header.src, &mut out).is_ok() {
                        self.counters.tsmp_rejects_sent += 1;
                        self.send_to_peer(now, slot, &out);
                    }
                    self.scratch2 = out;
                }
            }
            self.recycle(packet);
            return;
        }
        if self.capture {
            self.capture_packet(now, false, &packet);
        }
        self.counters.tun_packets_out += 1;
        self.outputs.push_back(Output::TunWrite(packet));
    }

    fn handle_tsmp(
        &mut self,
        now: Instant,
        slot: usize,
        header: &wire::ip::IpHeader,
        packet: &[u8],
    ) {
        let payload = packet
            .get(header.header_len..header.total_len)
            .unwrap_or(&[]);
        let message = match wire::tsmp::TsmpMessage::parse(payload) {
            Ok(m) => m,
            Err(_) => {
                self.counters.drop_tsmp_malformed += 1;
                return;
            }
        };
        match message {
            wire::tsmp::TsmpMessage::Ping { data } => {
                if !self.is_local_addr(header.dst) {
                    self.counters.drop_tsmp_malformed += 1;
                    return;
                }
                let pong = wire::tsmp::TsmpMessage::Pong {
                    data,
                    peerapi_port: self.applied.knobs.peerapi_port,
                };
                let mut out = std::mem::take(&mut self.scratch2);
                if pong.emit_packet(header.dst, header.src, &mut out).is_ok() {
                    self.counters.tsmp_pongs_sent += 1;
                    self.send_to_peer(now, slot, &out);
                }
                self.scratch2 = out;
            }
            wire::tsmp::TsmpMessage::Pong { data, peerapi_port } => {
                if !self.complete_ping(now, MatchKey::Tsmp(data), slot, None, peerapi_port) {
                    trace!("unmatched TSMP pong");
                }
            }
            wire::tsmp::TsmpMessage::Reject {
                src_port, dst_port, ..
            } => {
                // A reject is about a flow we opened: our address is its destination.
                let ours = SocketAddr::new(header.dst, src_port);
                let theirs = SocketAddr::new(header.src, dst_port);
                self.opens.rejected(ours, theirs);
            }
        }
    }

    fn count_wg_error(&mut self, e: &WireGuardError) {
        let c = &mut self.counters;
        match e {
            WireGuardError::InvalidMac => c.drop_wg_bad_mac += 1,
            WireGuardError::InvalidAeadTag | WireGuardError::InvalidPacket => {
                c.drop_wg_decrypt_failed += 1
            }
            WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => {
                c.drop_wg_replay += 1
            }
            WireGuardError::WrongTai64nTimestamp => c.drop_wg_stale_timestamp += 1,
            WireGuardError::WrongIndex
            | WireGuardError::NoCurrentSession
            | WireGuardError::UnexpectedPacket => c.drop_wg_unknown_index += 1,
            _ => c.drop_wg_other += 1,
        }
    }

    // ----------------------------------------------------------------------
    // Peers in and out of WireGuard
    // ----------------------------------------------------------------------

    fn allocate_tunnel_index(&mut self) -> u32 {
        loop {
            let index = self.next_tunnel_index & 0x00ff_ffff;
            self.next_tunnel_index = self.next_tunnel_index.wrapping_add(1);
            if !self.by_index.contains_key(&index) {
                return index;
            }
        }
    }

    /// Hands a peer to WireGuard (a fresh `Tunn`, so no old session survives).
    fn configure_peer(&mut self, now: Instant, slot: usize, woken: Option<WakeReason>) {
        if self.peers[slot].wg.is_some() {
            return;
        }
        let index = self.allocate_tunnel_index();
        let peer = &mut self.peers[slot];
        let tunnel = WgTunnel::new(
            self.clock,
            now,
            self.static_private.clone(),
            peer.config.public_key.0,
            peer.config.preshared_key,
            peer.config.persistent_keepalive_secs,
            index,
            Arc::clone(&self.rate_limiter),
        );
        let keepalive = peer
            .config
            .persistent_keepalive_secs
            .filter(|&s| s > 0)
            .map(|s| now + Duration::from_secs(u64::from(s)));
        peer.wg = Some(Box::new(WgPeer {
            tunnel,
            index,
            last_sent: None,
            last_received: None,
            handshake_started: None,
            last_initiation_sent: None,
            session_established: None,
            next_persistent_keepalive: keepalive,
            queued: 0,
            expired: false,
            endpoint: peer.config.endpoints.first().copied(),
            last_handshake_at: None,
            woken_at: None,
            heard_since_wake: false,
            deadline: None,
        }));

        self.by_index.insert(index, slot);
        self.configured_count += 1;
        self.counters.peers_configured += 1;
        let key = peer.config.public_key;
        debug!(peer = ?key, ?woken, "peer configured");
        self.outputs
            .push_back(Output::Event(Event::PeerConfigured { peer: key, woken }));
        if let Some(disco_key) = peer.config.disco_key {
            self.disco
                .ensure_peer(slot, disco_key, &peer.config.endpoints);
        }
        self.reschedule_peer(slot);
    }

    /// Takes a peer out of WireGuard, dropping its `Tunn` and keys.
    fn unconfigure_peer(&mut self, slot: usize, reason: RemoveReason) {
        let peer = &mut self.peers[slot];
        let Some(wg) = peer.wg.take() else { return };
        self.by_index.remove(&wg.index);
        self.configured_count -= 1;
        if wg.queued > 0 && !matches!(reason, RemoveReason::DiscoKeyChanged) {
            self.counters.drop_queue_discarded += wg.queued as u64;
        }
        let key = peer.config.public_key;
        self.disco.remove_peer(slot);
        debug!(peer = ?key, ?reason, "peer removed from WireGuard");
        self.outputs
            .push_back(Output::Event(Event::PeerRemoved { peer: key, reason }));
        self.reschedule_peer(slot);
    }

    fn wake_peer(&mut self, now: Instant, slot: usize, reason: WakeReason) {
        if self.peers[slot].wg.is_some() {
            return;
        }
        match reason {
            WakeReason::SendTo(_) => self.counters.peers_woken_by_send += 1,
            WakeReason::Receive => self.counters.peers_woken_by_receive += 1,
            WakeReason::Handshake => self.counters.peers_woken_by_handshake += 1,
            WakeReason::Ping => self.counters.peers_woken_by_ping += 1,
        }
        let peer = &mut self.peers[slot];
        // The waking traffic is activity, so the idle timer starts from now.
        match reason {
            WakeReason::SendTo(_) | WakeReason::Ping => peer.last_send_activity = Some(now),
            WakeReason::Receive | WakeReason::Handshake => peer.last_receive_activity = Some(now),
        }
        info!(peer = ?peer.config.public_key, ?reason, "waking trimmed peer");
        self.configure_peer(now, slot, Some(reason));
        if let Some(wg) = self.peers[slot].wg.as_mut() {
            wg.woken_at = Some(now);
        }
    }

    /// Runs a peer's due timers: the idle check first (an idle peer leaves
    /// without its timers getting a chance to start a handshake), then
    /// WireGuard's.
    fn peer_timer(&mut self, now: Instant, slot: usize) {
        if self.idle_deadline(slot).is_some_and(|d| d <= now) {
            let idle_since = self.peers[slot].last_activity();
            let idle_secs = idle_since.map_or(0, |t| now.saturating_duration_since(t).as_secs());
            self.counters.peers_trimmed += 1;
            info!(peer = ?self.peers[slot].config.public_key, idle_secs, "trimming idle peer");
            self.unconfigure_peer(slot, RemoveReason::Idle { idle_secs });
            return;
        }
        let peer = &mut self.peers[slot];
        let keepalive_secs = peer.config.persistent_keepalive_secs.unwrap_or(0).max(1);
        if let Some(wg) = peer.wg.as_mut() {
            if wg.next_persistent_keepalive.is_some_and(|t| t <= now) {
                wg.next_persistent_keepalive =
                    Some(now + Duration::from_secs(u64::from(keepalive_secs)));
            }
            let mut scratch = std::mem::take(&mut self.scratch);
            let result = result_owned(wg.tunnel.update_timers(now, &mut scratch));
            self.scratch = scratch;
            self.handle_timer_result(now, slot, result);
        }
        self.reschedule_peer(slot);
    }

    /// Refreshes boringtun's clock for a peer before an operation and sends
    /// whatever its timers wanted.
    fn refresh_peer_timers(&mut self, now: Instant, slot: usize) {
        let Some(wg) = self.peers[slot].wg.as_mut() else {
            return;
        };
        let mut scratch = std::mem::take(&mut self.scratch);
        let owned = result_owned(wg.tunnel.refresh(now, &mut scratch));
        self.scratch = scratch;
        if !matches!(owned, OwnedTimerResult::Nothing) {
            self.handle_timer_result(now, slot, owned);
        }
    }

    fn handle_timer_result(&mut self, now: Instant, slot: usize, result: OwnedTimerResult) {
        match result {
            OwnedTimerResult::Nothing => {}
            OwnedTimerResult::Send(len) => {
                let Some(wg) = self.peers[slot].wg.as_mut() else {
                    return;
                };
                let message_type = self.scratch.first().copied();
                if message_type == Some(1) {
                    Self::note_initiation(wg, now);
                    self.counters.handshake_initiations_sent += 1;
                } else {
                    wg.last_sent = Some(now);
                    self.counters.keepalives_sent += 1;
                }
                let mut buf = self.buffer();
                buf.extend_from_slice(&self.scratch[..len]);
                self.transmit_to_peer(slot, buf);
            }
            OwnedTimerResult::Expired => {
                let Some(wg) = self.peers[slot].wg.as_mut() else {
                    return;
                };
                if !wg.expired {
                    wg.expired = true;
                    self.counters.drop_queue_discarded += wg.queued as u64;
                    wg.queued = 0;
                    wg.session_established = None;
                    wg.handshake_started = None;
                    wg.last_initiation_sent = None;
                    debug!(peer = ?self.peers[slot].config.public_key, "WireGuard connection expired");
                }
            }
        }
    }

    fn idle_deadline(&self, slot: usize) -> Option<Instant> {
        let peer = &self.peers[slot];
        if !self.trimming || !peer.trimmable || peer.wg.is_none() {
            return None;
        }
        // A peer that never had activity is trimmed at once (the reference's
        // "tracked with no activity" case); otherwise at last activity + threshold.
        Some(
            peer.last_activity()
                .map_or(self.now, |t| t + LAZY_PEER_IDLE_THRESHOLD),
        )
    }

    /// The next instant boringtun's timers could act for this peer, derived
    /// from what the engine has seen (boringtun exposes no deadline).
    ///
    /// Only the timers that fire on their own in WireGuard are listed:
    /// handshake retransmission and give-up, passive keepalive, the
    /// "sent but heard nothing" re-handshake, and persistent keepalive. The
    /// session-age rules (rekey after 120 s, reject after 180 s) apply "after
    /// sending" or "after receiving" in the protocol, and every send and
    /// receive runs boringtun's timers first, so they need no deadline. That
    /// matters: boringtun would otherwise re-key an idle session at 120 s,
    /// and that handshake would count as activity and keep idle peers from
    /// ever being trimmed.
    fn wg_deadline_after(wg: &WgPeer, now: Instant) -> Option<Instant> {
        if wg.expired {
            return None;
        }
        let candidates = [
            wg.last_initiation_sent.map(|t| t + consts::REKEY_TIMEOUT),
            wg.handshake_started.map(|t| t + consts::REKEY_ATTEMPT_TIME),
            wg.last_sent
                .map(|t| t + consts::KEEPALIVE_TIMEOUT + consts::REKEY_TIMEOUT),
            wg.last_received.map(|t| t + consts::KEEPALIVE_TIMEOUT),
            wg.next_persistent_keepalive,
        ];
        candidates.into_iter().flatten().filter(|t| *t > now).min()
    }

    /// Recomputes a peer's deadline and queues it when it moved earlier.
    fn reschedule_peer(&mut self, slot: usize) {
        let now = self.now;
        let peer = &self.peers[slot];
        // Only deadlines still ahead count: the ones behind have been acted on.
        let wg_deadline = peer
            .wg
            .as_deref()
            .and_then(|wg| Self::wg_deadline_after(wg, now));
        let idle = self.idle_deadline(slot);
        let next = [wg_deadline, idle].into_iter().flatten().min();
        let peer = &mut self.peers[slot];
        let generation = peer.generation;
        let Some(wg) = peer.wg.as_mut() else { return };
        match (next, wg.deadline) {
            (Some(n), Some(current)) if n >= current && current > now => {}
            (Some(n), _) => {
                wg.deadline = Some(n);
                self.timers.push(n, TimerKey::Peer { slot, generation });
            }
            (None, _) => wg.deadline = None,
        }
    }

    // ----------------------------------------------------------------------
    // Reconfig
    // ----------------------------------------------------------------------

    /// Applies a full desired state. See [`Input::Reconfig`].
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
        self.advance(now);
        let result = match self.reconfig_by_position(now, reconfig) {
            Some(result) => result,
            None => self.reconfig_full(now, reconfig),
        };
        if let Err(e) = &result {
            self.counters.reconfigs_refused += 1;
            warn!(error = %e, "reconfig refused");
        }
        result
    }

    /// The fast path; `None` when it does not apply.
    fn reconfig_by_position(
        &mut self,
        now: Instant,
        reconfig: &Reconfig,
    ) -> Option<Result<ReconfigOutcome, ReconfigError>> {
        let (Some(wg), Some(router), Some(dns)) =
            (&reconfig.wireguard, &reconfig.router, &reconfig.dns)
        else {
            return None;
        };
        if !self.applied.have_config
            || *router != self.applied.router
            || wg.peers.len() != self.peer_order.len()
        {
            return None;
        }
        let limit = (wg.peers.len() / 8).max(16);
        let mut changed_positions = Vec::new();
        for (i, cfg) in wg.peers.iter().enumerate() {
            if self.peers[self.peer_order[i]].config != *cfg {
                changed_positions.push(i);
                if changed_positions.len() > limit {
                    return None;
                }
            }
        }
        let mut changes = ReconfigChanges::default();
        if !changed_positions.is_empty() {
            let old_slots: std::collections::BTreeSet<usize> = changed_positions
                .iter()
                .map(|&i| self.peer_order[i])
                .collect();
            let new_keys: std::collections::BTreeSet<NodePublicKey> = changed_positions
                .iter()
                .map(|&i| wg.peers[i].public_key)
                .collect();
            let remove: Vec<NodePublicKey> = old_slots
                .iter()
                .map(|&slot| self.peers[slot].config.public_key)
                .filter(|k| !new_keys.contains(k))
                .collect();
            let upsert: Vec<PeerConfig> = changed_positions
                .iter()
                .map(|&i| wg.peers[i].clone())
                .collect();
            match self.apply_peers(now, upsert, &remove, Some(&old_slots)) {
                Ok(n) => changes.peers_changed = n,
                Err(e) => return Some(Err(e)),
            }
            changes.sessions_flushed = self.last_flush_count;
            for &i in &changed_positions {
                self.peer_order[i] = self.by_key[&wg.peers[i].public_key];
            }
        }
        Some(Ok(self.apply_parts(
            now,
            changes,
            wg.listen_port,
            router,
            dns,
            &reconfig.knobs,
            &reconfig.primary_routes,
        )))
    }

    /// The full path: validate everything, diff by key.
    fn reconfig_full(
        &mut self,
        now: Instant,
        reconfig: &Reconfig,
    ) -> Result<ReconfigOutcome, ReconfigError> {
        let valid = reconfig.validate(&self.node_key)?;
        let mut changes = ReconfigChanges::default();
        let old_count = self.by_key.len();
        let growth = valid.wireguard.peers.len().saturating_sub(self.peers.len());
        self.peers.reserve_exact(growth);
        let mut matched = 0usize;
        let mut flushes = Vec::new();
        for cfg in &valid.wireguard.peers {
            match self.by_key.get(&cfg.public_key).copied() {
                Some(slot) => {
                    matched += 1;
                    if self.peers[slot].config != *cfg {
                        changes.peers_changed += 1;
                        if let Some(flush) = self.update_peer(now, slot, cfg.clone()) {
                            flushes.push(flush);
                        }
                    }
                }
                None => {
                    changes.peers_changed += 1;
                    self.add_peer(now, cfg.clone());
                }
            }
        }
        if matched != old_count {
            // Something was removed: find what, with one pass over the new keys.
            let seen: std::collections::BTreeSet<NodePublicKey> =
                valid.wireguard.peers.iter().map(|p| p.public_key).collect();
            let gone: Vec<usize> = self
                .by_key
                .iter()
                .filter(|(k, _)| !seen.contains(*k))
                .map(|(_, s)| *s)
                .collect();
            for slot in gone {
                changes.peers_changed += 1;
                self.remove_peer(slot);
            }
        }
        changes.sessions_flushed = flushes.len();
        self.finish_flushes(now, flushes);
        self.peer_order = valid
            .wireguard
            .peers
            .iter()
            .map(|p| self.by_key[&p.public_key])
            .collect();
        Ok(self.apply_parts(
            now,
            changes,
            valid.wireguard.listen_port,
            &valid.router,
            &valid.dns,
            &valid.knobs,
            &valid.primary_routes,
        ))
    }

    /// Phase two of disco-key flushes: re-add each peer with a fresh session.
    fn finish_flushes(
        &mut self,
        now: Instant,
        flushes: Vec<(usize, DiscoPublicKey, DiscoPublicKey)>,
    ) {
        self.last_flush_count = flushes.len();
        for (slot, old_disco, new_disco) in flushes {
            self.counters.sessions_flushed += 1;
            let peer = self.peers[slot].config.public_key;
            self.outputs.push_back(Output::Event(Event::SessionFlushed {
                peer,
                old_disco,
                new_disco,
            }));
            self.configure_peer(now, slot, None);
        }
    }

    /// Compares and applies every part of a reconfig but the peers.
    #[allow(clippy::too_many_arguments)]
    fn apply_parts(
        &mut self,
        now: Instant,
        mut changes: ReconfigChanges,
        listen_port: u16,
        router: &RouterConfig,
        dns: &DnsConfig,
        knobs: &Knobs,
        primary_routes: &[IpNet],
    ) -> ReconfigOutcome {
        let applied = &self.applied;
        let first = !applied.have_config;
        changes.listen_port = first
            || applied.listen_port != listen_port
            || applied.knobs.randomize_client_port != knobs.randomize_client_port;
        changes.wireguard = changes.peers_changed > 0 || changes.listen_port;
        changes.router = first || applied.router != *router;
        changes.dns = first || applied.dns != *dns;
        changes.path_mtu = first || applied.knobs.path_mtu_discovery != knobs.path_mtu_discovery;
        changes.knobs = first || applied.knobs != *knobs;
        let is_subnet_router = overlaps(primary_routes, &router.advertised_routes);
        changes.subnet_router = first
            || applied.is_subnet_router != is_subnet_router
            || applied.knobs.bird_protocol != knobs.bird_protocol;
        let primary_changed = applied.primary_routes != primary_routes;

        if !changes.wireguard
            && !changes.router
            && !changes.dns
            && !changes.knobs
            && !changes.subnet_router
            && !primary_changed
        {
            self.counters.reconfigs_unchanged += 1;
            return ReconfigOutcome::NoChanges;
        }
        self.counters.reconfigs_applied += 1;

        if changes.listen_port {
            let port = if knobs.randomize_client_port {
                0
            } else {
                listen_port
            };
            self.outputs
                .push_back(Output::Effect(Effect::SetListenPort(port)));
        }
        if changes.router {
            self.outputs
                .push_back(Output::Effect(Effect::ApplyRouter(router.clone())));
        }
        if changes.dns {
            self.outputs
                .push_back(Output::Effect(Effect::ApplyDns(dns.clone())));
        }
        // A resolver inside a peer's AllowedIPs or a tunnel route is reached
        // through the tunnel: the DNS config belongs on the tunnel link.
        let dns_via_tunnel = dns.nameservers.iter().any(|ns| {
            self.routes.lookup(*ns).is_some() || router.routes.iter().any(|r| r.contains(ns))
        });
        if first || dns_via_tunnel != self.applied.dns_via_tunnel {
            self.outputs
                .push_back(Output::Effect(Effect::SetDnsViaTunnel(dns_via_tunnel)));
        }
        if changes.path_mtu {
            self.outputs
                .push_back(Output::Effect(Effect::SetPathMtuDiscovery(
                    knobs.path_mtu_discovery,
                )));
        }
        if changes.subnet_router {
            if let Some(old) = self
                .applied
                .knobs
                .bird_protocol
                .clone()
                .filter(|p| Some(p) != knobs.bird_protocol.as_ref())
            {
                if self.applied.is_subnet_router {
                    self.outputs
                        .push_back(Output::Effect(Effect::SetBirdProtocol {
                            protocol: old,
                            enabled: false,
                        }));
                }
            }
            if let Some(protocol) = knobs.bird_protocol.clone() {
                self.outputs
                    .push_back(Output::Effect(Effect::SetBirdProtocol {
                        protocol,
                        enabled: is_subnet_router,
                    }));
            }
        }
        let trimming = self
            .config
            .trim_override
            .unwrap_or(!knobs.keep_full_wg_config);
        self.applied = Applied {
            have_config: true,
            listen_port,
            router: router.clone(),
            dns: dns.clone(),
            knobs: knobs.clone(),
            primary_routes: primary_routes.to_vec(),
            is_subnet_router,
            dns_via_tunnel,
        };
        if trimming != self.trimming {
            self.set_trimming(now, trimming);
        }
        ReconfigOutcome::Applied(changes)
    }

    /// Applies a change to some peers without resending the whole netmap: the
    /// cost is proportional to the change, not to the number of peers.
    /// Returns how many peers changed.
    pub fn apply_peer_delta(
        &mut self,
        now: Instant,
        delta: &PeerDelta,
    ) -> Result<usize, ReconfigError> {
        self.advance(now);
        let peers_before = self.peers.len();
        let changed = self.apply_peers(now, delta.upsert.clone(), &delta.remove, None)?;
        if !delta.remove.is_empty() || self.peers.len() != peers_before {
            // The peer list's order is unknown now: the next full reconfig
            // takes the keyed path and records the order again.
            self.peer_order.clear();
        }
        Ok(changed)
    }

    /// Validates and applies upserts and removals against the running state.
    /// With `replaced`, an upsert whose key belongs to a peer outside that set
    /// is a duplicate (a full reconfig lists each key once).
    fn apply_peers(
        &mut self,
        now: Instant,
        upsert: Vec<PeerConfig>,
        remove: &[NodePublicKey],
        replaced: Option<&std::collections::BTreeSet<usize>>,
    ) -> Result<usize, ReconfigError> {
        let mut normalized = Vec::with_capacity(upsert.len());
        let mut seen = std::collections::BTreeSet::new();
        let local_addrs = &self.applied.router.local_addrs;
        for mut cfg in upsert {
            if cfg.public_key == self.node_key {
                return Err(ReconfigError::SelfAsPeer(cfg.public_key));
            }
            if !seen.insert(cfg.public_key) {
                return Err(ReconfigError::DuplicatePeer(cfg.public_key));
            }
            if let (Some(replaced), Some(slot)) = (replaced, self.by_key.get(&cfg.public_key)) {
                if !replaced.contains(slot) {
                    return Err(ReconfigError::DuplicatePeer(cfg.public_key));
                }
            }
            crate::config::normalize_peer(&mut cfg, local_addrs)?;
            normalized.push(cfg);
        }
        // Disco keys: unique within the batch, and not held by a peer that
        // stays outside it.
        let mut batch_disco = std::collections::BTreeSet::new();
        for cfg in &normalized {
            let Some(disco) = cfg.disco_key else { continue };
            let held_elsewhere = self.by_disco.get(&disco).is_some_and(|&owner| {
                let owner_key = self.peers[owner].config.public_key;
                owner_key != cfg.public_key
                    && !remove.contains(&owner_key)
                    && !seen.contains(&owner_key)
            });
            if !batch_disco.insert(disco) || held_elsewhere {
                return Err(ReconfigError::DuplicateDiscoKey(disco));
            }
        }
        // Single-IP claims: unique within the batch, and not held by a peer
        // that stays outside it.
        let mut claims: BTreeMap<IpNet, NodePublicKey> = BTreeMap::new();
        for cfg in &normalized {
            for net in cfg
                .allowed_ips
                .iter()
                .filter(|n| n.prefix_len() == n.max_prefix_len())
            {
                if let Some(first) = claims.insert(*net, cfg.public_key) {
                    return Err(ReconfigError::OverlappingAllowedIp {
                        addr: *net,
                        first,
                        second: cfg.public_key,
                    });
                }
                if let Some(&owner) = self.routes.get_exact(net) {
                    let owner_key = self.peers[owner].config.public_key;
                    let released = owner_key == cfg.public_key
                        || remove.contains(&owner_key)
                        || seen.contains(&owner_key);
                    if !released {
                        return Err(ReconfigError::OverlappingAllowedIp {
                            addr: *net,
                            first: owner_key,
                            second: cfg.public_key,
                        });
                    }
                }
            }
        }
        let mut changed = 0;
        for key in remove {
            if let Some(&slot) = self.by_key.get(key) {
                self.remove_peer(slot);
                changed += 1;
            }
        }
        let mut flushes = Vec::new();
        for cfg in normalized {
            match self.by_key.get(&cfg.public_key).copied() {
                Some(slot) if self.peers[slot].config == cfg => {}
                Some(slot) => {
                    changed += 1;
                    if let Some(flush) = self.update_peer(now, slot, cfg) {
                        flushes.push(flush);
                    }
                }
                None => {
                    changed += 1;
                    self.add_peer(now, cfg);
                }
            }
        }
        self.finish_flushes(now, flushes);
        Ok(changed)
    }

    fn add_peer(&mut self, now: Instant, cfg: PeerConfig) {
        let generation = self.next_generation;
        self.next_generation += 1;
        let key = cfg.public_key;
        let disco = cfg.disco_key;
        let trimmable = cfg.is_trimmable();
        let nets = cfg.allowed_ips.clone();
        let endpoints = cfg.endpoints.clone();
        let slot = self.peers.insert(Peer {
            generation,
            config: cfg,
            trimmable,
            wg: None,
            last_send_activity: None,
            last_receive_activity: None,
            rx_bytes: 0,
            tx_bytes: 0,
        });
        self.by_key.insert(key, slot);
        if let Some(d) = disco {
            self.by_disco.insert(d, slot);
        }
        for net in nets {
            self.routes.insert(net, slot);
        }
        let _ = endpoints;
        if !self.trimming || !trimmable {
            self.configure_peer(now, slot, None);
        }
    }

    /// Updates a peer's config in place. Returns the flush to finish when its
    /// disco key changed while it was configured (phase one already done).
    fn update_peer(
        &mut self,
        now: Instant,
        slot: usize,
        cfg: PeerConfig,
    ) -> Option<(usize, DiscoPublicKey, DiscoPublicKey)> {
        let old = std::mem::replace(&mut self.peers[slot].config, cfg);
        let new = &self.peers[slot].config;
        if old.allowed_ips != new.allowed_ips {
            for net in &old.allowed_ips {
                if self.routes.get_exact(net) == Some(&slot) {
                    self.routes.remove(net);
                }
            }
            for net in new.allowed_ips.clone() {
                self.routes.insert(net, slot);
            }
        }
        if old.disco_key != new.disco_key {
            if let Some(d) = old.disco_key {
                if self.by_disco.get(&d) == Some(&slot) {
                    self.by_disco.remove(&d);
                }
            }
            if let Some(d) = new.disco_key {
                self.by_disco.insert(d, slot);
            }
        }
        let new_endpoints = new.endpoints.clone();
        let key = new.public_key;
        let new_disco = new.disco_key;
        if old.endpoints != new.endpoints {
            if let Some(wg) = self.peers[slot].wg.as_mut() {
                if wg
                    .endpoint
                    .is_none_or(|e| old.endpoints.contains(&e) && !new_endpoints.contains(&e))
                {
                    wg.endpoint = new_endpoints.first().copied();
                }
            }
        }
        let actions =
            self.disco
                .update_peer(self.now, slot, new_disco, &new_endpoints, &mut self.rng);
        self.run_disco_actions(now, actions);
        let peer = &mut self.peers[slot];
        peer.trimmable = peer.config.is_trimmable();
        let keys_changed = old.preshared_key != peer.config.preshared_key
            || old.persistent_keepalive_secs != peer.config.persistent_keepalive_secs;
        let mut flush = None;
        if peer.wg.is_some() {
            match (old.disco_key, new_disco) {
                (Some(a), Some(b)) if a != b && !self.config.testing.disable_disco_key_flush => {
                    // Phase one: drop the old session. The caller re-adds the
                    // peer once every change of this reconfig is applied.
                    info!(peer = ?key, "disco key changed: flushing WireGuard session");
                    self.unconfigure_peer(slot, RemoveReason::DiscoKeyChanged);
                    flush = Some((slot, a, b));
                }
                _ if keys_changed => {
                    self.unconfigure_peer(slot, RemoveReason::ConfigChanged);
                    self.configure_peer(now, slot, None);
                }
                _ => {}
            }
        }
        if self.peers[slot].wg.is_none()
            && flush.is_none()
            && (!self.trimming || !self.peers[slot].trimmable)
        {
            self.configure_peer(now, slot, None);
        }
        self.reschedule_peer(slot);
        flush
    }

    fn remove_peer(&mut self, slot: usize) {
        self.unconfigure_peer(slot, RemoveReason::RemovedFromConfig);
        let peer = self.peers.remove(slot);
        self.by_key.remove(&peer.config.public_key);
        if let Some(d) = peer.config.disco_key {
            if self.by_disco.get(&d) == Some(&slot) {
                self.by_disco.remove(&d);
            }
        }
        for net in &peer.config.allowed_ips {
            if self.routes.get_exact(net) == Some(&slot) {
                self.routes.remove(net);
            }
        }
        self.disco.remove_peer(slot);
    }

    fn set_trimming(&mut self, now: Instant, on: bool) {
        self.trimming = on;
        let slots: Vec<usize> = self.by_key.values().copied().collect();
        for slot in slots {
            if on {
                self.reschedule_peer(slot);
            } else {
                self.configure_peer(now, slot, None);
            }
        }
    }

    // ----------------------------------------------------------------------
    // Link changes, status, close
    // ----------------------------------------------------------------------

    fn link_change(&mut self, change: LinkChange) {
        self.outputs
            .push_back(Output::Effect(Effect::SetNetworkUp(change.any_link_up)));
        self.network_up = change.any_link_up;
        if !change.any_link_up {
            self.counters.link_changes_down += 1;
            info!("all links down; pausing");
            return;
        }
        if change.major {
            self.counters.link_changes_major += 1;
            info!("major link change");
            self.outputs
                .push_back(Output::Effect(Effect::FlushDnsCaches));
            if self.applied.have_config {
                self.outputs
                    .push_back(Output::Effect(Effect::ApplyDns(self.applied.dns.clone())));
            }
            self.outputs.push_back(Output::Effect(Effect::Rebind));
            self.outputs
                .push_back(Output::Effect(Effect::ReDiscoverEndpoints {
                    reason: "link-change-major",
                }));
            let actions = self.disco.reset_paths(self.now, &mut self.rng);
            self.run_disco_actions(self.now, actions);
        } else {
            self.counters.link_changes_minor += 1;
            self.outputs
                .push_back(Output::Effect(Effect::ReDiscoverEndpoints {
                    reason: "link-change-minor",
                }));
        }
    }

    fn build_status(&self) -> Status {
        let peers = self
            .by_key
            .values()
            .map(|&slot| {
                let p = &self.peers[slot];
                PeerStatus {
                    node_key: p.config.public_key,
                    disco_key: p.config.disco_key,
                    name: p.config.name.clone(),
                    allowed_ips: p.config.allowed_ips.clone(),
                    configured: p.wg.is_some(),
                    endpoint: self
                        .disco
                        .best_endpoint(slot)
                        .or(p.wg.as_ref().and_then(|w| w.endpoint)),
                    last_handshake_ago: p
                        .wg
                        .as_ref()
                        .and_then(|w| w.last_handshake_at)
                        .map(|t| self.now.saturating_duration_since(t)),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    persistent_keepalive_secs: p.config.persistent_keepalive_secs,
                }
            })
            .collect();
        Status {
            node_key: self.node_key,
            disco_key: self.disco_key,
            listen_port: self.applied.listen_port,
            local_addrs: self.applied.router.local_addrs.clone(),
            peers,
            relay_count: 0,
            configured_peers: self.configured_count,
            full_config_peers: self.peers.len(),
            counters: self.counters.clone(),
        }
    }

    fn close(&mut self) {
        info!("closing engine");
        // 1. Every pending ping ends.
        for result in self.pings.drain_closed() {
            self.counters.pings_failed += 1;
            self.outputs.push_back(Output::PingResult(result));
        }
        self.opens.clear();
        // 2. Peers leave WireGuard.
        let slots: Vec<usize> = self.by_key.values().copied().collect();
        for slot in slots {
            self.unconfigure_peer(slot, RemoveReason::Closed);
        }
        // 3. The OS is given back its routes and DNS.
        if self.applied.have_config {
            self.outputs
                .push_back(Output::Effect(Effect::ApplyRouter(RouterConfig::default())));
            self.outputs
                .push_back(Output::Effect(Effect::ApplyDns(DnsConfig::default())));
            if self.applied.is_subnet_router {
                if let Some(protocol) = self.applied.knobs.bird_protocol.clone() {
                    self.outputs
                        .push_back(Output::Effect(Effect::SetBirdProtocol {
                            protocol,
                            enabled: false,
                        }));
                }
            }
        }
        self.closed = true;
    }

    // ----------------------------------------------------------------------
    // Pings
    // ----------------------------------------------------------------------

    fn is_local_addr(&self, ip: IpAddr) -> bool {
        self.applied
            .router
            .local_addrs
            .iter()
            .any(|net| net.addr() == ip)
    }

    fn local_addr_for(&self, target: IpAddr) -> Option<IpAddr> {
        self.applied
            .router
            .local_addrs
            .iter()
            .map(|n| n.addr())
            .find(|a| a.is_ipv4() == target.is_ipv4())
    }

    /// Finds the peer for a ping target, like the reference: an exact
    /// single-IP match first, then our own addresses, then the longest prefix
    /// over the full config (trimmed peers included).
    pub fn peer_for_ip(&self, ip: IpAddr) -> Result<NodePublicKey, PeerForIpError> {
        self.peer_slot_for_ip(ip)
            .map(|slot| self.peers[slot].config.public_key)
    }

    fn peer_slot_for_ip(&self, ip: IpAddr) -> Result<usize, PeerForIpError> {
        if let Some(&slot) = self.routes.get_exact(&IpNet::from(ip)) {
            return Ok(slot);
        }
        if self.is_local_addr(ip) {
            return Err(PeerForIpError::IsLocalIp(ip));
        }
        self.routes
            .lookup(ip)
            .map(|(_, &slot)| slot)
            .ok_or(PeerForIpError::NoMatchingPeer(ip))
    }

    fn start_ping(&mut self, now: Instant, request: PingRequest) {
        self.counters.pings_started += 1;
        let fail = |engine: &mut Self, message: String, is_local_ip: bool| {
            engine.counters.pings_failed += 1;
            engine.outputs.push_back(Output::PingResult(PingResult {
                id: request.id,
                ip: request.ip,
                kind: request.kind,
                outcome: PingOutcome::Error {
                    message,
                    is_local_ip,
                },
            }));
        };
        let slot = match self.peer_slot_for_ip(request.ip) {
            Ok(slot) => slot,
            Err(e) => {
                let local = matches!(e, PeerForIpError::IsLocalIp(_));
                fail(self, e.to_string(), local);
                return;
            }
        };
        let Some(src) = self.local_addr_for(request.ip) else {
            fail(
                self,
                format!("no local address of the family of {}", request.ip),
                false,
            );
            return;
        };
        let peer = &self.peers[slot];
        let info = crate::pending::PingTarget {
            slot,
            node_key: peer.config.public_key,
            node_name: peer.config.name.clone(),
            node_ip: peer.config.allowed_ips.first().map(|n| n.addr()),
        };
        if self.peers[slot].wg.is_none() {
            self.wake_peer(now, slot, WakeReason::Ping);
        }
        match request.kind {
            PingKind::Tsmp => {
                let mut data = [0u8; 8];
                self.rng.fill_bytes(&mut data);
                let id = self.pings.insert(now, request, MatchKey::Tsmp(data), info);
                self.timers.push(now + PING_TIMEOUT, TimerKey::Ping(id));
                let mut out = std::mem::take(&mut self.scratch2);
                let message = wire::tsmp::TsmpMessage::Ping { data };
                if message.emit_packet(src, request.ip, &mut out).is_ok() {
                    self.send_to_peer(now, slot, &out);
                }
                self.scratch2 = out;
            }
            PingKind::Icmp => {
                let key = self.unused_icmp_key();
                let (ident, seq) = wire::icmp::ident_seq_from_key(key);
                let id = self.pings.insert(now, request, MatchKey::Icmp(key), info);
                self.timers.push(now + PING_TIMEOUT, TimerKey::Ping(id));
                let payload = vec![0u8; request.size.min(1400)];
                let mut out = std::mem::take(&mut self.scratch2);
                if wire::icmp::emit_echo(
                    src,
                    request.ip,
                    wire::icmp::EchoKind::Request,
                    ident,
                    seq,
                    &payload,
                    &mut out,
                )
                .is_ok()
                {
                    self.send_to_peer(now, slot, &out);
                }
                self.scratch2 = out;
            }
            PingKind::Disco => {
                if self.peers[slot].config.disco_key.is_none() {
                    fail(self, "peer has no disco key".into(), false);
                    return;
                }
                let mut tx_id = [0u8; 12];
                self.rng.fill_bytes(&mut tx_id);
                let id = self
                    .pings
                    .insert(now, request, MatchKey::Disco(tx_id), info);
                self.timers.push(now + PING_TIMEOUT, TimerKey::Ping(id));
                let actions = self.disco.ping_user(now, slot, tx_id);
                self.run_disco_actions(now, actions);
            }
        }
    }

    fn unused_icmp_key(&mut self) -> u32 {
        loop {
            let key = self.rng.next_u32();
            if !self.pings.contains(&MatchKey::Icmp(key)) {
                return key;
            }
        }
    }

    /// Ends the ping waiting for `key` if the answer came from its peer.
    fn complete_ping(
        &mut self,
        now: Instant,
        key: MatchKey,
        slot: usize,
        endpoint: Option<SocketAddr>,
        peerapi_port: Option<u16>,
    ) -> bool {
        let endpoint = endpoint.or_else(|| {
            self.disco
                .best_endpoint(slot)
                .or(self.peers[slot].wg.as_ref().and_then(|w| w.endpoint))
        });
        match self.pings.complete(now, key, slot, endpoint, peerapi_port) {
            Some(result) => {
                self.counters.pings_answered += 1;
                self.outputs.push_back(Output::PingResult(result));
                true
            }
            None => false,
        }
    }

    // ----------------------------------------------------------------------
    // Disco
    // ----------------------------------------------------------------------

    fn handle_disco(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        let Some(sender) = wire::disco::sender_key(data) else {
            self.counters.drop_disco_bad += 1;
            return;
        };
        let Some(&slot) = self.by_disco.get(&DiscoPublicKey(sender)) else {
            self.counters.drop_disco_unknown_sender += 1;
            return;
        };
        let peer = &self.peers[slot];
        self.disco
            .ensure_peer(slot, DiscoPublicKey(sender), &peer.config.endpoints);
        let message = match self.disco.open(slot, data) {
            Ok(m) => m,
            Err(_) => {
                self.counters.drop_disco_bad += 1;
                return;
            }
        };
        let actions = self
            .disco
            .handle_message(now, slot, from, message, &mut self.rng);
        self.run_disco_actions(now, actions);
    }

    fn run_disco_actions(&mut self, now: Instant, actions: Vec<DiscoAction>) {
        for action in actions {
            match action {
                DiscoAction::Send { slot, dst, message } => {
                    let mut nonce = [0u8; 24];
                    self.rng.fill_bytes(&mut nonce);
                    let mut buf = self.buffer();
                    if self
                        .disco
                        .seal(slot, self.disco_key.0, nonce, &message, &mut buf)
                    {
                        match message {
                            wire::disco::DiscoMessage::Ping { .. } => {
                                self.counters.disco_pings_sent += 1
                            }
                            wire::disco::DiscoMessage::Pong { .. } => {
                                self.counters.disco_pongs_sent += 1
                            }
                            _ => {}
                        }
                        self.counters.datagrams_out += 1;
                        self.outputs
                            .push_back(Output::Transmit(Transmit { dst, data: buf }));
                    } else {
                        self.recycle(buf);
                    }
                }
                DiscoAction::PongReceived { slot, tx_id, from } => {
                    self.complete_ping(now, MatchKey::Disco(tx_id), slot, Some(from), None);
                }
                DiscoAction::PathChanged {
                    slot,
                    endpoint,
                    latency,
                } => {
                    self.counters.path_changes += 1;
                    let peer = self.peers[slot].config.public_key;
                    self.outputs.push_back(Output::Event(Event::PathChanged {
                        peer,
                        endpoint,
                        latency,
                    }));
                }
                DiscoAction::CallMeMaybeReceived => self.counters.disco_call_me_maybe_received += 1,
            }
        }
        self.schedule_disco();
    }

    /// Queues the disco deadline if it is earlier than the one already
    /// queued: one entry per deadline, not one per disco message.
    fn schedule_disco(&mut self) {
        if let Some(at) = self.disco.next_deadline() {
            if self.disco_timer_at.is_none_or(|queued| at < queued) {
                self.disco_timer_at = Some(at);
                self.timers.push(at, TimerKey::Engine(EngineTimer::Disco));
            }
        }
    }

    // ----------------------------------------------------------------------
    // Pending opens (failed-connection diagnostics)
    // ----------------------------------------------------------------------

    fn schedule_opens(&mut self) {
        if let Some(at) = self.opens.next_deadline() {
            if self.opens_timer_at.is_none_or(|queued| at < queued) {
                self.opens_timer_at = Some(at);
                self.timers
                    .push(at, TimerKey::Engine(EngineTimer::PendingOpens));
            }
        }
    }

    fn check_pending_opens(&mut self, now: Instant) {
        for open in self.opens.expire(now) {
            let cause = self.diagnose(&open);
            self.counters.connections_failed += 1;
            let failed = FailedConnection {
                src: open.src,
                dst: open.dst,
                peer: open.peer,
                cause,
            };
            info!(src = %failed.src, dst = %failed.dst, ?cause, "outbound connection got no answer");
            self.outputs
                .push_back(Output::Event(Event::ConnectionFailed(Box::new(failed))));
        }
        self.schedule_opens();
    }

    fn diagnose(&self, open: &crate::pending::PendingOpen) -> FailureCause {
        if open.rejected {
            return FailureCause::PeerRejected;
        }
        let Some(key) = open.peer else {
            return FailureCause::NoPeerForAddress;
        };
        let Some(&slot) = self.by_key.get(&key) else {
            return FailureCause::NoPeerForAddress;
        };
        let peer = &self.peers[slot];
        // Woken by (or just before) this SYN and never heard from since.
        if let Some(wg) = peer.wg.as_deref() {
            if wg.woken_at.is_some_and(|w| w >= open.at) && !wg.heard_since_wake {
                return FailureCause::PeerTrimmedNeverAnswered;
            }
        }
        let has_session = peer.wg.as_deref().is_some_and(Self::has_session);
        if !has_session {
            return FailureCause::NoHandshake;
        }
        if self.disco.has_candidates(slot) && self.disco.best_endpoint(slot).is_none() {
            return FailureCause::NoEndpointReachable;
        }
        FailureCause::NoAnswerFromService
    }

    fn capture_packet(&mut self, now: Instant, outbound: bool, packet: &[u8]) {
        self.outputs.push_back(Output::Capture(CapturedPacket {
            outbound,
            at: now,
            packet: packet.to_vec(),
        }));
    }
}

/// A change to part of the peer list (see [`Engine::apply_peer_delta`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerDelta {
    /// Peers to add or replace.
    pub upsert: Vec<PeerConfig>,
    /// Peers to remove.
    pub remove: Vec<NodePublicKey>,
}

/// Why peer-for-IP found no peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerForIpError {
    /// No peer's AllowedIPs contain the address.
    #[error("no matching peer for {0}")]
    NoMatchingPeer(IpAddr),
    /// The address is one of this node's own.
    #[error("{0} is local IP")]
    IsLocalIp(IpAddr),
}

fn overlaps(a: &[IpNet], b: &[IpNet]) -> bool {
    a.iter()
        .any(|x| b.iter().any(|y| x.contains(y) || y.contains(x)))
}

/// A timer result detached from the scratch buffer's borrow.
enum OwnedTimerResult {
    Nothing,
    /// This many bytes at the start of the scratch buffer must be sent.
    Send(usize),
    Expired,
}

fn result_owned(result: TimerResult<'_>) -> OwnedTimerResult {
    match result {
        TimerResult::Nothing => OwnedTimerResult::Nothing,
        TimerResult::Send(packet) => OwnedTimerResult::Send(packet.len()),
        TimerResult::Error(WireGuardError::ConnectionExpired) => OwnedTimerResult::Expired,
        TimerResult::Error(_) => OwnedTimerResult::Nothing,
    }
}
