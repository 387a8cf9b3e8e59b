//! Disco: finding and keeping the best UDP path to each peer.
//!
//! Each peer has candidate endpoints (from the netmap, from call-me-maybe, and
//! from where its pings come from). The engine pings every candidate with a
//! disco ping outside WireGuard; the pongs measure latency, and WireGuard
//! traffic goes to the best one. The timings follow the reference's
//! magicsock:
//! - a ponged path is trusted for [`TRUST_UDP_ADDR_DURATION`] (6.5 s);
//! - while the peer was active in the last [`SESSION_ACTIVE_TIMEOUT`] (45 s),
//!   the best path gets a heartbeat ping every [`HEARTBEAT_INTERVAL`] (3 s);
//! - a disco ping with no pong after [`DISCO_PING_TIMEOUT`] (5 s) failed;
//! - a new path replaces the best one only if it is more than 1% faster, or
//!   the best one is no longer trusted;
//! - every [`UPGRADE_INTERVAL`] an active peer's candidates are all pinged
//!   again, so a faster path that came back is found.
//!
//! When the trust of the best path lapses the engine pings every candidate;
//! if no pong arrives within the ping timeout, the best path is dropped and
//! WireGuard falls back to the last address the peer was heard from.
//!
//! What a peer (or anyone holding one of its datagrams) can make us do is
//! bounded:
//! - at most [`MAX_CANDIDATES`] candidates per peer. Configured endpoints
//!   stay; a learned candidate (from a call-me-maybe or a ping's source)
//!   beyond the bound evicts the learned one that proved itself least, and
//!   each call-me-maybe replaces the candidates the previous one taught;
//! - learned candidates no path can use (loopback, multicast, unspecified,
//!   broadcast, port 0) are refused;
//! - a call-me-maybe pings every candidate at most once per
//!   [`DISCO_FULL_PING_MIN_INTERVAL`]; sooner ones share a deferred ping;
//! - a datagram whose nonce is among the peer's last [`DISCO_REPLAY_WINDOW`]
//!   authenticated ones is a replay and is dropped (so a captured ping
//!   replayed from another address gets no pong).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand_core::RngCore;

use super::slot::PeerSlot;
use crate::keys::DiscoPublicKey;
use crate::wire::disco::{DiscoError, DiscoMessage, DiscoShared, NONCE_LEN};

use crate::limits::{
    DISCO_FULL_PING_MIN_INTERVAL, DISCO_PING_TIMEOUT, DISCO_REPLAY_WINDOW, HEARTBEAT_INTERVAL,
    MAX_DISCO_CANDIDATES as MAX_CANDIDATES, SESSION_ACTIVE_TIMEOUT, TRUST_UDP_ADDR_DURATION,
    UPGRADE_INTERVAL,
};

/// What the disco layer asks the engine to do or know.
#[derive(Debug)]
pub(crate) enum DiscoAction {
    /// Seal and send a message to a peer's endpoint.
    Send {
        slot: PeerSlot,
        dst: SocketAddr,
        message: DiscoMessage,
    },
    /// A pong arrived (the engine ends a user ping with this id).
    PongReceived {
        slot: PeerSlot,
        tx_id: [u8; 12],
        from: SocketAddr,
    },
    /// The best path changed.
    PathChanged {
        slot: PeerSlot,
        endpoint: Option<SocketAddr>,
        latency: Option<Duration>,
    },
    /// A call-me-maybe arrived.
    CallMeMaybeReceived,
    /// Something bounded happened `n` times (the engine counts it).
    Bounded { what: DiscoBound, n: u64 },
}

/// The bounds on what a peer can make the disco layer do, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DiscoBound {
    /// A learned candidate was evicted, or left out, at the candidate bound.
    CandidateEvicted,
    /// A learned candidate no path can use was refused.
    BadCandidate,
    /// A call-me-maybe's ping of every candidate was deferred.
    FullPingDeferred,
}

/// Why [`DiscoState::open`] refused a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenError {
    /// It did not open as a message from the peer.
    Bad(DiscoError),
    /// It opened, but its nonce was seen among the peer's recent messages.
    Replay,
}

/// Where a candidate came from, which decides whether it can be evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// From the config (the netmap): never evicted, only reconfig removes it.
    Configured,
    /// Taught by the last call-me-maybe, at this time.
    CallMeMaybe(Instant),
    /// The source of a ping, first seen at this time.
    PingSource(Instant),
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    origin: Origin,
    last_pong: Option<Instant>,
    latency: Option<Duration>,
}

impl Candidate {
    fn new(origin: Origin) -> Self {
        Self {
            origin,
            last_pong: None,
            latency: None,
        }
    }

    /// The eviction order of learned candidates: those that never answered
    /// go first, oldest first; then those whose last pong is oldest.
    /// `None` for configured ones, which are never evicted.
    fn eviction_rank(&self) -> Option<(bool, Instant)> {
        let learned_at = match self.origin {
            Origin::Configured => return None,
            Origin::CallMeMaybe(at) | Origin::PingSource(at) => at,
        };
        Some(match self.last_pong {
            Some(pong) => (true, pong),
            None => (false, learned_at),
        })
    }
}

/// Whether a learned endpoint could be a path to a peer at all. Anything
/// else would point our pings at this host's own services or at a whole
/// segment (the amplification a forged or replayed call-me-maybe is after).
fn usable_learned_endpoint(addr: &SocketAddr) -> bool {
    if addr.port() == 0 {
        return false;
    }
    match addr.ip() {
        IpAddr::V4(ip) => {
            !(ip.is_loopback() || ip.is_multicast() || ip.is_unspecified() || ip.is_broadcast())
        }
        IpAddr::V6(ip) => !(ip.is_loopback() || ip.is_multicast() || ip.is_unspecified()),
    }
}

/// The outcome of offering a candidate to a peer's set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admitted {
    /// It is in the set (it was already, or there was room).
    Yes,
    /// It is in the set; a learned candidate was evicted for it.
    Evicting,
    /// The set is full of candidates that may not be evicted.
    Full,
}

/// The nonces of a peer's last [`DISCO_REPLAY_WINDOW`] authenticated disco
/// messages, each folded to 64 bits (XOR of its three 8-byte words, so that
/// random nonces and counters in any word both stay distinct).
struct ReplayWindow {
    disco_key: DiscoPublicKey,
    seen: [u64; DISCO_REPLAY_WINDOW],
    len: usize,
    next: usize,
}

impl ReplayWindow {
    fn new(disco_key: DiscoPublicKey) -> Self {
        Self {
            disco_key,
            seen: [0; DISCO_REPLAY_WINDOW],
            len: 0,
            next: 0,
        }
    }

    fn fold(nonce: &[u8; NONCE_LEN]) -> u64 {
        nonce.chunks_exact(8).fold(0u64, |acc, word| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(word);
            acc ^ u64::from_le_bytes(bytes)
        })
    }

    /// Records the nonce; false if it was already among the recent ones.
    fn record(&mut self, nonce: &[u8; NONCE_LEN]) -> bool {
        let folded = Self::fold(nonce);
        if self.seen[..self.len].contains(&folded) {
            return false;
        }
        self.seen[self.next] = folded;
        self.next = (self.next + 1) % DISCO_REPLAY_WINDOW;
        self.len = (self.len + 1).min(DISCO_REPLAY_WINDOW);
        true
    }
}

struct SentPing {
    dst: SocketAddr,
    sent_at: Instant,
}

struct PeerDisco {
    disco_key: DiscoPublicKey,
    shared: Option<Box<DiscoShared>>,
    candidates: BTreeMap<SocketAddr, Candidate>,
    best: Option<(SocketAddr, Duration)>,
    best_pong_at: Option<Instant>,
    last_heartbeat: Option<Instant>,
    last_full_ping: Option<Instant>,
    /// A ping of every candidate a call-me-maybe asked for, deferred to
    /// this time by [`DISCO_FULL_PING_MIN_INTERVAL`].
    full_ping_due: Option<Instant>,
    last_active: Option<Instant>,
    pending: BTreeMap<[u8; 12], SentPing>,
    next_at: Option<Instant>,
}

impl PeerDisco {
    fn new(disco_key: DiscoPublicKey) -> Self {
        Self {
            disco_key,
            shared: None,
            candidates: BTreeMap::new(),
            best: None,
            best_pong_at: None,
            last_heartbeat: None,
            last_full_ping: None,
            full_ping_due: None,
            last_active: None,
            pending: BTreeMap::new(),
            next_at: None,
        }
    }

    /// Adds the configured endpoints (the first [`MAX_CANDIDATES`]); one
    /// already known as learned becomes configured. Both callers leave no
    /// learned candidate in the way (a fresh peer, the same endpoints as
    /// before, or a set just cut down to the configured ones), so nothing
    /// is evicted here; if that ever changed, the bound would still hold.
    fn set_candidates(&mut self, endpoints: &[SocketAddr]) {
        for e in endpoints.iter().take(MAX_CANDIDATES) {
            // Never `Full` for configured endpoints: there are at most
            // MAX_CANDIDATES of them, and learned ones give way.
            self.admit(*e, Origin::Configured, &[]);
        }
    }

    /// Offers a candidate, within the bound. A known candidate keeps its
    /// state; configured wins over learned, and a call-me-maybe claims a
    /// ping source it names (so the next one may replace it). When the set
    /// is full, the learned candidate ranked first for eviction goes,
    /// except the best path and those in `keep` (the rest of the same
    /// call-me-maybe).
    fn admit(&mut self, addr: SocketAddr, origin: Origin, keep: &[SocketAddr]) -> Admitted {
        if let Some(existing) = self.candidates.get_mut(&addr) {
            match (existing.origin, origin) {
                (Origin::Configured, _) => {}
                (_, Origin::Configured) | (Origin::PingSource(_), Origin::CallMeMaybe(_)) => {
                    existing.origin = origin
                }
                (Origin::CallMeMaybe(_), Origin::CallMeMaybe(_) | Origin::PingSource(_))
                | (Origin::PingSource(_), Origin::PingSource(_)) => {}
            }
            return Admitted::Yes;
        }
        let mut admitted = Admitted::Yes;
        if self.candidates.len() >= MAX_CANDIDATES {
            let best = self.best.map(|(a, _)| a);
            let victim = self
                .candidates
                .iter()
                .filter(|(a, _)| Some(**a) != best && !keep.contains(a))
                .filter_map(|(a, c)| c.eviction_rank().map(|rank| (rank, *a)))
                .min()
                .map(|(_, a)| a);
            match victim {
                Some(victim) => {
                    self.forget_candidate(victim);
                    admitted = Admitted::Evicting;
                }
                None => return Admitted::Full,
            }
        }
        self.candidates.insert(addr, Candidate::new(origin));
        admitted
    }

    /// Removes a candidate and the pings waiting for its pongs (a late pong
    /// then matches nothing and cannot bring it back past the bound).
    fn forget_candidate(&mut self, addr: SocketAddr) {
        self.candidates.remove(&addr);
        self.pending.retain(|_, p| p.dst != addr);
    }

    /// A heartbeat is due one interval after the later of the last heartbeat
    /// and the last pong of the best path (a fresh pong is as good as one).
    fn heartbeat_due(&self) -> Option<Instant> {
        let last = match (self.last_heartbeat, self.best_pong_at) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        last.map(|t| t + HEARTBEAT_INTERVAL)
    }

    fn is_active(&self, now: Instant) -> bool {
        self.last_active
            .is_some_and(|t| now.saturating_duration_since(t) < SESSION_ACTIVE_TIMEOUT)
    }

    fn best_trusted(&self, now: Instant) -> bool {
        self.best.is_some()
            && self
                .best_pong_at
                .is_some_and(|t| now < t + TRUST_UDP_ADDR_DURATION)
    }

    /// The next instant this peer's disco state needs attention. Only
    /// instants after `now` count: what was due has been done by the caller.
    fn compute_next(&self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| {
            if t > now {
                next = Some(next.map_or(t, |n: Instant| n.min(t)));
            }
        };
        for ping in self.pending.values() {
            consider(ping.sent_at + DISCO_PING_TIMEOUT);
        }
        if let Some(due) = self.full_ping_due {
            consider(due);
        }
        if self.is_active(now) {
            if let Some(at) = self.best_pong_at.filter(|_| self.best.is_some()) {
                consider(at + TRUST_UDP_ADDR_DURATION);
            }
            if self.best_trusted(now) {
                if let Some(at) = self.heartbeat_due() {
                    consider(at);
                }
            }
            if let Some(full) = self.last_full_ping {
                consider(full + UPGRADE_INTERVAL);
            }
            if let Some(active) = self.last_active {
                // Wake once more when the peer stops counting as active.
                consider(active + SESSION_ACTIVE_TIMEOUT);
            }
        }
        next
    }
}

/// The disco state of every peer that has a disco key and has been active or
/// heard from. Peers with no entry fall back to WireGuard's own endpoint.
pub(crate) struct DiscoState {
    secret: [u8; 32],
    peers: BTreeMap<PeerSlot, PeerDisco>,
    /// Kept apart from `peers`, whose entry goes when the peer is trimmed:
    /// a trim must not reopen the window for a captured datagram. It goes
    /// when the peer leaves the config or loses its disco key.
    replay: BTreeMap<PeerSlot, Box<ReplayWindow>>,
    schedule: BTreeSet<(Instant, PeerSlot)>,
}

impl DiscoState {
    pub(crate) fn new(secret: [u8; 32]) -> Self {
        Self {
            secret,
            peers: BTreeMap::new(),
            replay: BTreeMap::new(),
            schedule: BTreeSet::new(),
        }
    }

    /// The earliest disco deadline.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.schedule.first().map(|(at, _)| *at)
    }

    fn reschedule(&mut self, now: Instant, slot: PeerSlot) {
        let Some(peer) = self.peers.get_mut(&slot) else {
            return;
        };
        if let Some(old) = peer.next_at.take() {
            self.schedule.remove(&(old, slot));
        }
        peer.next_at = peer.compute_next(now);
        if let Some(at) = peer.next_at {
            self.schedule.insert((at, slot));
        }
    }

    /// Makes sure a peer with a disco key has state; updates its key and
    /// candidates. A changed disco key resets the peer's paths.
    pub(crate) fn ensure_peer(
        &mut self,
        slot: PeerSlot,
        disco_key: DiscoPublicKey,
        endpoints: &[SocketAddr],
    ) {
        let peer = self
            .peers
            .entry(slot)
            .or_insert_with(|| PeerDisco::new(disco_key));
        if peer.disco_key != disco_key {
            *peer = PeerDisco::new(disco_key);
        }
        peer.set_candidates(endpoints);
    }

    /// Updates a peer that already has state (from a reconfig).
    /// Updates a peer that already has state from a reconfig. Endpoints
    /// that left the netmap stop being candidates, as in the reference; if
    /// the best path was one of them it is dropped at once and, while the
    /// peer is active, every remaining candidate is pinged.
    pub(crate) fn update_peer(
        &mut self,
        now: Instant,
        slot: PeerSlot,
        disco_key: Option<DiscoPublicKey>,
        endpoints: &[SocketAddr],
        rng: &mut impl RngCore,
    ) -> Vec<DiscoAction> {
        let mut out = Vec::new();
        let Some(key) = disco_key else {
            self.forget_peer(slot);
            return out;
        };
        let Some(peer) = self.peers.get_mut(&slot) else {
            return out;
        };
        if peer.disco_key != key {
            *peer = PeerDisco::new(key);
        }
        peer.candidates.retain(|addr, _| endpoints.contains(addr));
        peer.pending.retain(|_, p| endpoints.contains(&p.dst));
        peer.set_candidates(endpoints);
        if peer
            .best
            .is_some_and(|(addr, _)| !endpoints.contains(&addr))
        {
            peer.best = None;
            peer.best_pong_at = None;
            out.push(DiscoAction::PathChanged {
                slot,
                endpoint: None,
                latency: None,
            });
            if peer.is_active(now) {
                Self::full_ping(peer, slot, now, rng, &mut out);
            }
        }
        self.reschedule(now, slot);
        out
    }

    /// The peer left WireGuard: its paths go, its replay window stays.
    pub(crate) fn remove_peer(&mut self, slot: PeerSlot) {
        if let Some(peer) = self.peers.remove(&slot) {
            if let Some(at) = peer.next_at {
                self.schedule.remove(&(at, slot));
            }
        }
    }

    /// The peer left the config (or lost its disco key): everything goes.
    pub(crate) fn forget_peer(&mut self, slot: PeerSlot) {
        self.remove_peer(slot);
        self.replay.remove(&slot);
    }

    /// How many candidates the peer has.
    pub(crate) fn candidate_count(&self, slot: PeerSlot) -> usize {
        self.peers.get(&slot).map_or(0, |p| p.candidates.len())
    }

    /// The best trusted-or-last-known path to the peer.
    pub(crate) fn best_endpoint(&self, slot: PeerSlot) -> Option<SocketAddr> {
        self.peers
            .get(&slot)
            .and_then(|p| p.best.map(|(addr, _)| addr))
    }

    /// Whether the peer has any disco candidates at all.
    pub(crate) fn has_candidates(&self, slot: PeerSlot) -> bool {
        self.peers
            .get(&slot)
            .is_some_and(|p| !p.candidates.is_empty())
    }

    fn shared(&mut self, slot: PeerSlot) -> Option<&DiscoShared> {
        let secret = self.secret;
        let peer = self.peers.get_mut(&slot)?;
        if peer.shared.is_none() {
            peer.shared = Some(Box::new(DiscoShared::new(&secret, &peer.disco_key.0)));
        }
        peer.shared.as_deref()
    }

    /// Opens a disco datagram from the peer in `slot`, refusing one whose
    /// nonce the peer used recently. Only a datagram that opened records its
    /// nonce, so forgeries cannot fill the window.
    pub(crate) fn open(
        &mut self,
        slot: PeerSlot,
        datagram: &[u8],
    ) -> Result<DiscoMessage, OpenError> {
        let nonce =
            crate::wire::disco::nonce(datagram).ok_or(OpenError::Bad(DiscoError::Truncated))?;
        let message = match self.shared(slot) {
            Some(shared) => shared.open(datagram).map_err(OpenError::Bad)?,
            None => return Err(OpenError::Bad(DiscoError::NotDisco)),
        };
        let Some(disco_key) = self.peers.get(&slot).map(|p| p.disco_key) else {
            return Err(OpenError::Bad(DiscoError::NotDisco));
        };
        let window = self
            .replay
            .entry(slot)
            .or_insert_with(|| Box::new(ReplayWindow::new(disco_key)));
        if window.disco_key != disco_key {
            // A new disco key (the peer restarted): nothing sealed under the
            // old one opens any more, so its nonces need not be kept.
            **window = ReplayWindow::new(disco_key);
        }
        if window.record(&nonce) {
            Ok(message)
        } else {
            Err(OpenError::Replay)
        }
    }

    /// Seals a message for the peer in `slot`; false when it has no disco key.
    pub(crate) fn seal(
        &mut self,
        slot: PeerSlot,
        our_public: [u8; 32],
        nonce: [u8; 24],
        message: &DiscoMessage,
        out: &mut Vec<u8>,
    ) -> bool {
        match self.shared(slot) {
            Some(shared) => {
                shared.seal(&our_public, nonce, message, out);
                true
            }
            None => false,
        }
    }

    fn send_ping(
        peer: &mut PeerDisco,
        slot: PeerSlot,
        now: Instant,
        dst: SocketAddr,
        tx_id: [u8; 12],
        out: &mut Vec<DiscoAction>,
    ) {
        peer.pending.insert(tx_id, SentPing { dst, sent_at: now });
        out.push(DiscoAction::Send {
            slot,
            dst,
            message: DiscoMessage::Ping {
                tx_id,
                node_key: None,
            },
        });
    }

    fn full_ping(
        peer: &mut PeerDisco,
        slot: PeerSlot,
        now: Instant,
        rng: &mut impl RngCore,
        out: &mut Vec<DiscoAction>,
    ) {
        peer.last_full_ping = Some(now);
        peer.full_ping_due = None;
        let targets: Vec<SocketAddr> = peer.candidates.keys().copied().collect();
        for dst in targets {
            let mut tx_id = [0u8; 12];
            rng.fill_bytes(&mut tx_id);
            Self::send_ping(peer, slot, now, dst, tx_id, out);
        }
    }

    /// The peer had traffic: keep its paths fresh while it is active.
    pub(crate) fn note_active(
        &mut self,
        now: Instant,
        slot: PeerSlot,
        rng: &mut impl RngCore,
    ) -> Vec<DiscoAction> {
        let mut out = Vec::new();
        let Some(peer) = self.peers.get_mut(&slot) else {
            return out;
        };
        peer.last_active = Some(now);
        let recently_full = peer
            .last_full_ping
            .is_some_and(|t| now.saturating_duration_since(t) < DISCO_PING_TIMEOUT);
        if !peer.best_trusted(now) && !recently_full {
            Self::full_ping(peer, slot, now, rng, &mut out);
        }
        self.reschedule(now, slot);
        out
    }

    /// A user ping: measure the path to the best endpoint (or every candidate).
    pub(crate) fn ping_user(
        &mut self,
        now: Instant,
        slot: PeerSlot,
        tx_id: [u8; 12],
    ) -> Vec<DiscoAction> {
        let mut out = Vec::new();
        let Some(peer) = self.peers.get_mut(&slot) else {
            return out;
        };
        let targets: Vec<SocketAddr> = match peer.best {
            Some((addr, _)) => vec![addr],
            None => peer.candidates.keys().copied().collect(),
        };
        for dst in targets {
            Self::send_ping(peer, slot, now, dst, tx_id, &mut out);
        }
        self.reschedule(now, slot);
        out
    }

    /// Forgets a ping that was never sent (no link was up).
    pub(crate) fn forget_ping(&mut self, slot: PeerSlot, tx_id: [u8; 12]) {
        if let Some(peer) = self.peers.get_mut(&slot) {
            peer.pending.remove(&tx_id);
        }
    }

    /// A link came back after all were down: every active peer's candidates
    /// are pinged again at once.
    pub(crate) fn ping_active_peers(
        &mut self,
        now: Instant,
        rng: &mut impl RngCore,
    ) -> Vec<DiscoAction> {
        let mut out = Vec::new();
        let slots: Vec<PeerSlot> = self.peers.keys().copied().collect();
        for slot in slots {
            let Some(peer) = self.peers.get_mut(&slot) else {
                continue;
            };
            if peer.is_active(now) {
                Self::full_ping(peer, slot, now, rng, &mut out);
            }
            self.reschedule(now, slot);
        }
        out
    }

    /// A major link change: every path must be proven again.
    pub(crate) fn reset_paths(&mut self, now: Instant, rng: &mut impl RngCore) -> Vec<DiscoAction> {
        let mut out = Vec::new();
        let slots: Vec<PeerSlot> = self.peers.keys().copied().collect();
        for slot in slots {
            let peer = self.peers.get_mut(&slot).expect("listed above");
            peer.best_pong_at = None;
            if peer.is_active(now) {
                Self::full_ping(peer, slot, now, rng, &mut out);
            }
            self.reschedule(now, slot);
        }
        out
    }

    /// Handles an opened disco message from the peer in `slot`.
    pub(crate) fn handle_message(
        &mut self,
        now: Instant,
        slot: PeerSlot,
        from: SocketAddr,
        message: DiscoMessage,
        rng: &mut impl RngCore,
    ) -> Vec<DiscoAction> {
        let mut out = Vec::new();
        let Some(peer) = self.peers.get_mut(&slot) else {
            return out;
        };
        match message {
            DiscoMessage::Ping { tx_id, .. } => {
                // Where a ping comes from is a path that works one way at least.
                if usable_learned_endpoint(&from) {
                    match peer.admit(from, Origin::PingSource(now), &[]) {
                        Admitted::Yes => {}
                        Admitted::Evicting | Admitted::Full => out.push(DiscoAction::Bounded {
                            what: DiscoBound::CandidateEvicted,
                            n: 1,
                        }),
                    }
                } else {
                    out.push(DiscoAction::Bounded {
                        what: DiscoBound::BadCandidate,
                        n: 1,
                    });
                }
                out.push(DiscoAction::Send {
                    slot,
                    dst: from,
                    message: DiscoMessage::Pong { tx_id, src: from },
                });
            }
            DiscoMessage::Pong { tx_id, .. } => {
                if let Some(sent) = peer.pending.remove(&tx_id) {
                    if sent.dst == from {
                        let latency = now.saturating_duration_since(sent.sent_at);
                        // A pending ping's destination is a candidate: a
                        // forgotten candidate's pings go with it.
                        if let Some(candidate) = peer.candidates.get_mut(&from) {
                            candidate.last_pong = Some(now);
                            candidate.latency = Some(latency);
                        }
                        let switch = match peer.best {
                            None => true,
                            Some((addr, _)) if addr == from => {
                                peer.best = Some((from, latency));
                                peer.best_pong_at = Some(now);
                                false
                            }
                            Some((_, best_latency)) => {
                                // More than 1% better, or the best path is no longer trusted.
                                latency.as_nanos() * 100 < best_latency.as_nanos() * 99
                                    || !peer.best_trusted(now)
                            }
                        };
                        if switch {
                            peer.best = Some((from, latency));
                            peer.best_pong_at = Some(now);
                            peer.last_heartbeat = Some(now);
                            out.push(DiscoAction::PathChanged {
                                slot,
                                endpoint: Some(from),
                                latency: Some(latency),
                            });
                        }
                        out.push(DiscoAction::PongReceived { slot, tx_id, from });
                    } else {
                        // A pong from elsewhere than we pinged: keep waiting.
                        peer.pending.insert(tx_id, sent);
                    }
                }
            }
            DiscoMessage::CallMeMaybe { endpoints } => {
                out.push(DiscoAction::CallMeMaybeReceived);
                Self::call_me_maybe(peer, slot, now, &endpoints, rng, &mut out);
            }
        }
        self.reschedule(now, slot);
        out
    }

    /// A call-me-maybe: its endpoints replace those the previous one taught
    /// (the best path stays), within the bound, and every candidate is
    /// pinged unless that was done less than [`DISCO_FULL_PING_MIN_INTERVAL`]
    /// ago: then the ping is deferred to the end of the interval.
    fn call_me_maybe(
        peer: &mut PeerDisco,
        slot: PeerSlot,
        now: Instant,
        endpoints: &[SocketAddr],
        rng: &mut impl RngCore,
        out: &mut Vec<DiscoAction>,
    ) {
        let mut bad = 0u64;
        let mut left_out = 0u64;
        let mut taught: Vec<SocketAddr> = Vec::new();
        for e in endpoints {
            if !usable_learned_endpoint(e) {
                bad += 1;
            } else if taught.contains(e) {
                // Listed twice: one candidate.
            } else if taught.len() < MAX_CANDIDATES {
                taught.push(*e);
            } else {
                left_out += 1;
            }
        }
        let best = peer.best.map(|(a, _)| a);
        let replaced: Vec<SocketAddr> = peer
            .candidates
            .iter()
            .filter(|(a, c)| {
                matches!(c.origin, Origin::CallMeMaybe(_))
                    && !taught.contains(a)
                    && Some(**a) != best
            })
            .map(|(a, _)| *a)
            .collect();
        for addr in replaced {
            peer.forget_candidate(addr);
        }
        for e in &taught {
            match peer.admit(*e, Origin::CallMeMaybe(now), &taught) {
                Admitted::Yes => {}
                Admitted::Evicting | Admitted::Full => left_out += 1,
            }
        }
        if bad > 0 {
            out.push(DiscoAction::Bounded {
                what: DiscoBound::BadCandidate,
                n: bad,
            });
        }
        if left_out > 0 {
            out.push(DiscoAction::Bounded {
                what: DiscoBound::CandidateEvicted,
                n: left_out,
            });
        }
        peer.last_active = Some(now);
        match peer.last_full_ping {
            Some(last) if now.saturating_duration_since(last) < DISCO_FULL_PING_MIN_INTERVAL => {
                peer.full_ping_due = Some(last + DISCO_FULL_PING_MIN_INTERVAL);
                out.push(DiscoAction::Bounded {
                    what: DiscoBound::FullPingDeferred,
                    n: 1,
                });
            }
            Some(_) | None => Self::full_ping(peer, slot, now, rng, out),
        }
    }

    /// Runs the disco timers due at `now`.
    pub(crate) fn on_timer(&mut self, now: Instant, rng: &mut impl RngCore) -> Vec<DiscoAction> {
        let mut out = Vec::new();
        while let Some(&(at, slot)) = self.schedule.first() {
            if at > now {
                break;
            }
            self.schedule.pop_first();
            let Some(peer) = self.peers.get_mut(&slot) else {
                continue;
            };
            peer.next_at = None;
            // Pings past their timeout failed.
            let expired: Vec<[u8; 12]> = peer
                .pending
                .iter()
                .filter(|(_, p)| now >= p.sent_at + DISCO_PING_TIMEOUT)
                .map(|(id, _)| *id)
                .collect();
            let mut best_failed = false;
            for id in expired {
                if let Some(p) = peer.pending.remove(&id) {
                    let answered_since = peer
                        .candidates
                        .get(&p.dst)
                        .and_then(|c| c.last_pong)
                        .is_some_and(|t| t > p.sent_at);
                    if peer.best.is_some_and(|(addr, _)| addr == p.dst) && !answered_since {
                        best_failed = true;
                    }
                }
            }
            if best_failed && !peer.best_trusted(now) {
                // The best path stopped answering: use the best other candidate
                // that answered within the trust window, or none.
                let fallback = peer
                    .candidates
                    .iter()
                    .filter(|(addr, c)| {
                        Some(**addr) != peer.best.map(|b| b.0)
                            && c.last_pong
                                .is_some_and(|t| now < t + TRUST_UDP_ADDR_DURATION)
                    })
                    .filter_map(|(addr, c)| c.latency.map(|l| (*addr, l)))
                    .min_by_key(|(_, l)| *l);
                peer.best = fallback;
                peer.best_pong_at = fallback
                    .and_then(|(addr, _)| peer.candidates.get(&addr).and_then(|c| c.last_pong));
                out.push(DiscoAction::PathChanged {
                    slot,
                    endpoint: fallback.map(|f| f.0),
                    latency: fallback.map(|f| f.1),
                });
            }
            if peer.full_ping_due.is_some_and(|due| due <= now) {
                // A call-me-maybe's deferred ping (it also made the peer active).
                Self::full_ping(peer, slot, now, rng, &mut out);
            } else if peer.is_active(now) {
                let recently_full = peer
                    .last_full_ping
                    .is_some_and(|t| now.saturating_duration_since(t) < DISCO_PING_TIMEOUT);
                let upgrade_due = peer
                    .last_full_ping
                    .is_none_or(|t| now.saturating_duration_since(t) >= UPGRADE_INTERVAL);
                if (!peer.best_trusted(now) && !recently_full) || upgrade_due {
                    Self::full_ping(peer, slot, now, rng, &mut out);
                } else if let Some((best, _)) = peer.best {
                    if peer
                        .last_heartbeat
                        .is_none_or(|t| now.saturating_duration_since(t) >= HEARTBEAT_INTERVAL)
                    {
                        peer.last_heartbeat = Some(now);
                        let mut tx_id = [0u8; 12];
                        rng.fill_bytes(&mut tx_id);
                        Self::send_ping(peer, slot, now, best, tx_id, &mut out);
                    }
                }
            }
            self.reschedule(now, slot);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(k: u16) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, (k % 250) as u8 + 1], 1000 + k))
    }

    #[test]
    fn eviction_takes_learned_never_answered_oldest_first_and_keeps_configured_and_best() {
        // The harness owns the clock; this reading only fixes an epoch.
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let mut peer = PeerDisco::new(DiscoPublicKey([1; 32]));
        let configured = addr(0);
        peer.set_candidates(&[configured]);
        // Fill the set with ping sources learned one second apart.
        for k in 1..MAX_CANDIDATES as u16 {
            let at = t0 + Duration::from_secs(u64::from(k));
            assert_eq!(
                peer.admit(addr(k), Origin::PingSource(at), &[]),
                Admitted::Yes
            );
        }
        assert_eq!(peer.candidates.len(), MAX_CANDIDATES);
        // The oldest learned one answered, and the second oldest is the best
        // path: the third oldest goes first.
        peer.candidates.get_mut(&addr(1)).unwrap().last_pong = Some(t0);
        peer.best = Some((addr(2), Duration::from_millis(5)));
        let later = t0 + Duration::from_secs(100);
        assert_eq!(
            peer.admit(addr(100), Origin::PingSource(later), &[]),
            Admitted::Evicting
        );
        assert!(!peer.candidates.contains_key(&addr(3)));
        assert!(peer.candidates.contains_key(&configured));
        assert!(peer.candidates.contains_key(&addr(1)));
        assert!(peer.candidates.contains_key(&addr(2)));
        assert_eq!(peer.candidates.len(), MAX_CANDIDATES);
        // All configured: nothing can be evicted, a learned one is left out.
        let mut full = PeerDisco::new(DiscoPublicKey([1; 32]));
        let all: Vec<SocketAddr> = (0..MAX_CANDIDATES as u16).map(addr).collect();
        full.set_candidates(&all);
        assert_eq!(
            full.admit(addr(200), Origin::CallMeMaybe(t0), &[]),
            Admitted::Full
        );
        assert_eq!(full.candidates.len(), MAX_CANDIDATES);
    }

    #[test]
    fn the_replay_window_refuses_recent_nonces_and_survives_a_trim() {
        let mut window = ReplayWindow::new(DiscoPublicKey([1; 32]));
        let nonce = |k: u32| {
            let mut n = [0u8; NONCE_LEN];
            // A counter in the last word: folding must keep it distinct.
            n[20..].copy_from_slice(&k.to_le_bytes());
            n
        };
        assert!(window.record(&nonce(0)));
        assert!(!window.record(&nonce(0)));
        for k in 1..DISCO_REPLAY_WINDOW as u32 {
            assert!(window.record(&nonce(k)), "{k}");
        }
        assert!(!window.record(&nonce(0)), "still in the window");
        // One newer message pushes the oldest out.
        assert!(window.record(&nonce(DISCO_REPLAY_WINDOW as u32)));
        assert!(window.record(&nonce(0)));

        // Through DiscoState: a trim (remove_peer) keeps the window, leaving
        // the config (forget_peer) drops it.
        let ours = [3u8; 32];
        let theirs = [4u8; 32];
        let their_public = DiscoPublicKey(crate::wire::disco::public_from_secret(&theirs));
        let mut state = DiscoState::new(ours);
        let slot = {
            let mut table = super::super::slot::SlotTable::default();
            table.insert(())
        };
        let message = DiscoMessage::Ping {
            tx_id: [1; 12],
            node_key: None,
        };
        let mut datagram = Vec::new();
        crate::wire::disco::seal(
            &theirs,
            &their_public.0,
            &crate::wire::disco::public_from_secret(&ours),
            [9; 24],
            &message,
            &mut datagram,
        );
        state.ensure_peer(slot, their_public, &[]);
        assert_eq!(state.open(slot, &datagram), Ok(message.clone()));
        assert_eq!(state.open(slot, &datagram), Err(OpenError::Replay));
        state.remove_peer(slot);
        state.ensure_peer(slot, their_public, &[]);
        assert_eq!(state.open(slot, &datagram), Err(OpenError::Replay));
        state.forget_peer(slot);
        state.ensure_peer(slot, their_public, &[]);
        assert_eq!(state.open(slot, &datagram), Ok(message));
    }
}
