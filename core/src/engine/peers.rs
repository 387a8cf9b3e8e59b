//! Peers in and out of WireGuard: configure, wake, trim, and their timers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info};

use super::Engine;
use super::timer::TimerKey;
use super::wg::{TimerResult, WgTunnel};
use crate::api::*;
use crate::config::PeerConfig;
use crate::keys::DiscoPublicKey;
use crate::limits::*;
use boringtun::noise::errors::WireGuardError;

/// The WireGuard part of a configured peer.
pub(super) struct WgPeer {
    pub(super) tunnel: WgTunnel,
    /// The 24-bit index boringtun puts in the upper bits of its session indices.
    pub(super) index: u32,
    pub(super) last_sent: Option<Instant>,
    pub(super) last_received: Option<Instant>,
    pub(super) handshake_started: Option<Instant>,
    pub(super) last_initiation_sent: Option<Instant>,
    pub(super) session_established: Option<Instant>,
    pub(super) next_persistent_keepalive: Option<Instant>,
    /// Packets boringtun holds for us while a handshake runs.
    pub(super) queued: usize,
    /// boringtun gave up (REKEY_ATTEMPT_TIME or key expiry): nothing to do until traffic.
    pub(super) expired: bool,
    /// Where WireGuard sends when disco has no better path: the last address
    /// the peer was heard from, else its first configured endpoint.
    pub(super) endpoint: Option<SocketAddr>,
    pub(super) last_handshake_at: Option<Instant>,
    /// When it was woken from the trimmed state, and whether it has been
    /// heard from since (for connection diagnostics).
    pub(super) woken_at: Option<Instant>,
    pub(super) heard_since_wake: bool,
    /// The deadline currently in the timer queue for this peer. Only peers in
    /// WireGuard have timers (the idle check included).
    pub(super) deadline: Option<Instant>,
}

/// A peer of the full config.
pub(super) struct Peer {
    pub(super) generation: u64,
    pub(super) config: PeerConfig,
    pub(super) trimmable: bool,
    pub(super) wg: Option<Box<WgPeer>>,
    pub(super) last_send_activity: Option<Instant>,
    pub(super) last_receive_activity: Option<Instant>,
    pub(super) rx_bytes: u64,
    pub(super) tx_bytes: u64,
}

impl Peer {
    pub(super) fn timer_deadline(&self) -> Option<Instant> {
        self.wg.as_ref().and_then(|wg| wg.deadline)
    }

    pub(super) fn last_activity(&self) -> Option<Instant> {
        match (self.last_send_activity, self.last_receive_activity) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

impl Engine {
    pub(super) fn allocate_tunnel_index(&mut self) -> u32 {
        loop {
            let index = self.next_tunnel_index & 0x00ff_ffff;
            self.next_tunnel_index = self.next_tunnel_index.wrapping_add(1);
            if !self.by_index.contains_key(&index) {
                return index;
            }
        }
    }

    /// Hands a peer to WireGuard (a fresh `Tunn`, so no old session survives).
    pub(super) fn configure_peer(&mut self, now: Instant, slot: usize, woken: Option<WakeReason>) {
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
    pub(super) fn unconfigure_peer(&mut self, slot: usize, reason: RemoveReason) {
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

    pub(super) fn wake_peer(&mut self, now: Instant, slot: usize, reason: WakeReason) {
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
    pub(super) fn peer_timer(&mut self, now: Instant, slot: usize) {
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
    pub(super) fn refresh_peer_timers(&mut self, now: Instant, slot: usize) {
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

    pub(super) fn handle_timer_result(
        &mut self,
        now: Instant,
        slot: usize,
        result: OwnedTimerResult,
    ) {
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

    pub(super) fn idle_deadline(&self, slot: usize) -> Option<Instant> {
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
    pub(super) fn wg_deadline_after(wg: &WgPeer, now: Instant) -> Option<Instant> {
        if wg.expired {
            return None;
        }
        let candidates = [
            wg.last_initiation_sent
                .map(|t| t + crate::limits::REKEY_TIMEOUT),
            wg.handshake_started
                .map(|t| t + crate::limits::REKEY_ATTEMPT_TIME),
            wg.last_sent
                .map(|t| t + crate::limits::KEEPALIVE_TIMEOUT + crate::limits::REKEY_TIMEOUT),
            wg.last_received
                .map(|t| t + crate::limits::KEEPALIVE_TIMEOUT),
            wg.next_persistent_keepalive,
        ];
        candidates.into_iter().flatten().filter(|t| *t > now).min()
    }

    /// Recomputes a peer's deadline and queues it when it moved earlier.
    pub(super) fn reschedule_peer(&mut self, slot: usize) {
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

    pub(super) fn add_peer(&mut self, now: Instant, cfg: PeerConfig) {
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
    pub(super) fn update_peer(
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

    pub(super) fn remove_peer(&mut self, slot: usize) {
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

    pub(super) fn set_trimming(&mut self, now: Instant, on: bool) {
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
}

/// A timer result detached from the scratch buffer's borrow.
pub(super) enum OwnedTimerResult {
    Nothing,
    /// This many bytes at the start of the scratch buffer must be sent.
    Send(usize),
    Expired,
}

pub(super) fn result_owned(result: TimerResult<'_>) -> OwnedTimerResult {
    match result {
        TimerResult::Nothing => OwnedTimerResult::Nothing,
        TimerResult::Send(packet) => OwnedTimerResult::Send(packet.len()),
        TimerResult::Error(WireGuardError::ConnectionExpired) => OwnedTimerResult::Expired,
        TimerResult::Error(_) => OwnedTimerResult::Nothing,
    }
}
