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
//! Through NATs: a peer may have a *relayed* address (its TURN allocation,
//! from [`crate::NatConfig`]). It is a candidate like the others, pinged and
//! measured, with two differences: any trusted direct path is preferred to
//! it whatever the latencies, and while it carries the traffic the direct
//! candidates are all pinged every [`RELAY_UPGRADE_INTERVAL`] instead of
//! every [`UPGRADE_INTERVAL`], so traffic moves back soon after a direct
//! path returns. When the engine pings every candidate of a peer it has no
//! trusted direct path to, it also sends the peer a call-me-maybe with this
//! node's own endpoints over the relay (at most once per
//! [`DISCO_FULL_PING_MIN_INTERVAL`]), so that both sides ping each other at
//! about the same time and open their NATs for each other (hole punching);
//! and a ping that arrives from a peer with a relay while no direct path to
//! it is trusted is answered with a ping of our own to where it came from.
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
    MAX_DISCO_CANDIDATES as MAX_CANDIDATES, RELAY_UPGRADE_INTERVAL, SESSION_ACTIVE_TIMEOUT,
    TRUST_UDP_ADDR_DURATION, UPGRADE_INTERVAL,
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
    /// A call-me-maybe was wanted but the peer has no relay to carry it.
    CallMeMaybeNoRelay,
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
    /// The peer's relayed address (from the NAT settings): never evicted,
    /// only new NAT settings remove it.
    Relay,
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
            Origin::Configured | Origin::Relay => return None,
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
    /// The peer's relayed address, also among the candidates.
    relay: Option<SocketAddr>,
    /// When we last sent the peer a call-me-maybe.
    last_call_me_maybe: Option<Instant>,
    /// When we last answered its ping with a ping of our own (hole punching).
    last_punch: Option<Instant>,
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
            relay: None,
            last_call_me_maybe: None,
            last_punch: None,
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
                (Origin::Configured | Origin::Relay, _) => {}
                (_, Origin::Configured | Origin::Relay)
                | (Origin::PingSource(_), Origin::CallMeMaybe(_)) => existing.origin = origin,
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

    fn is_relay(&self, addr: SocketAddr) -> bool {
        self.relay == Some(addr)
    }

    /// Whether the best path is a direct one that is still trusted.
    fn direct_trusted(&self, now: Instant) -> bool {
        self.best_trusted(now) && self.best.is_some_and(|(addr, _)| !self.is_relay(addr))
    }

    /// How long after the last ping of every candidate the next is due
    /// while the peer is active: sooner while the relay carries the traffic.
    fn upgrade_interval(&self) -> Duration {
        match self.best {
            Some((addr, _)) if self.is_relay(addr) => RELAY_UPGRADE_INTERVAL,
            Some(_) | None => UPGRADE_INTERVAL,
        }
    }

    /// The next instant this peer's disco state needs attention. Only
    /// instants after `now` count when the caller is the timer (what was
    /// due has been done); any other caller (a message, a reconfig) counts
    /// an instant equal to `now` too, because the timer due at this very
    /// instant may not have run yet: dropping it would skip, say, a
    /// heartbeat due when a datagram arrived at the same instant.
    fn compute_next(&self, now: Instant, include_now: bool) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| {
            if t > now || (include_now && t == now) {
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
                consider(full + self.upgrade_interval());
            }
            if let Some(active) = self.last_active {
                // Wake once more when the peer stops counting as active.
                consider(active + SESSION_ACTIVE_TIMEOUT);
            }
        }
        next
    }
}

mod state;

pub(crate) use state::DiscoState;
