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

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand_core::RngCore;

use super::slot::PeerSlot;
use crate::keys::DiscoPublicKey;
use crate::wire::disco::{DiscoError, DiscoMessage, DiscoShared};

use crate::limits::{
    DISCO_PING_TIMEOUT, HEARTBEAT_INTERVAL, MAX_DISCO_CANDIDATES as MAX_CANDIDATES,
    SESSION_ACTIVE_TIMEOUT, TRUST_UDP_ADDR_DURATION, UPGRADE_INTERVAL,
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
}

#[derive(Debug, Default, Clone, Copy)]
struct Candidate {
    last_pong: Option<Instant>,
    latency: Option<Duration>,
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
            last_active: None,
            pending: BTreeMap::new(),
            next_at: None,
        }
    }

    fn set_candidates(&mut self, endpoints: &[SocketAddr]) {
        for e in endpoints.iter().take(MAX_CANDIDATES) {
            self.candidates.entry(*e).or_default();
        }
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
    schedule: BTreeSet<(Instant, PeerSlot)>,
}

impl DiscoState {
    pub(crate) fn new(secret: [u8; 32]) -> Self {
        Self {
            secret,
            peers: BTreeMap::new(),
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
            self.remove_peer(slot);
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

    pub(crate) fn remove_peer(&mut self, slot: PeerSlot) {
        if let Some(peer) = self.peers.remove(&slot) {
            if let Some(at) = peer.next_at {
                self.schedule.remove(&(at, slot));
            }
        }
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

    /// Opens a disco datagram from the peer in `slot`.
    pub(crate) fn open(
        &mut self,
        slot: PeerSlot,
        datagram: &[u8],
    ) -> Result<DiscoMessage, DiscoError> {
        match self.shared(slot) {
            Some(shared) => shared.open(datagram),
            None => Err(DiscoError::NotDisco),
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
                if peer.candidates.len() < MAX_CANDIDATES {
                    peer.candidates.entry(from).or_default();
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
                        let candidate = peer.candidates.entry(from).or_default();
                        candidate.last_pong = Some(now);
                        candidate.latency = Some(latency);
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
                peer.set_candidates(&endpoints);
                peer.last_active = Some(now);
                Self::full_ping(peer, slot, now, rng, &mut out);
            }
        }
        self.reschedule(now, slot);
        out
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
            if peer.is_active(now) {
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
