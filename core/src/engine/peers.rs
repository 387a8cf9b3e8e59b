//! Peers in and out of WireGuard: configure, wake, trim, and their timers.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tracing::{debug, info};

use super::Engine;
use super::slot::{PeerSlot, SlotTable};
use super::staged::Staged;
use super::timer::TimerKey;
use super::timer::{PeerTimer, SessionTimers};
use super::wg::{TimerAction, WgTunnel};
use crate::api::*;
use crate::config::PeerConfig;
use crate::keys::DiscoPublicKey;
use crate::limits::*;

/// Every peer of the full config, by slot.
pub(super) type PeerTable = SlotTable<Peer>;

/// The WireGuard part of a configured peer.
pub(super) struct WgPeer {
    pub(super) tunnel: WgTunnel,
    /// The 24-bit index WireGuard puts in the upper bits of its session indices.
    pub(super) index: u32,
    /// The session's protocol times, changed only through their hooks.
    pub(super) timers: SessionTimers,
    /// Packets waiting for a usable session.
    pub(super) staged: Staged,
    /// Where WireGuard sends when disco has no better path: the last address
    /// the peer was heard from, else its first configured endpoint.
    pub(super) endpoint: Option<SocketAddr>,
    /// When it was woken from the trimmed state, and whether it has been
    /// heard from since (for connection diagnostics).
    pub(super) woken_at: Option<Instant>,
    pub(super) heard_since_wake: bool,
    /// The deadline currently in the timer queue for this peer, and which
    /// timer it is for. Only peers in WireGuard have timers (the idle check
    /// included).
    pub(super) deadline: Option<(Instant, PeerTimer)>,
}

/// A peer of the full config.
pub(super) struct Peer {
    pub(super) config: PeerConfig,
    pub(super) trimmable: bool,
    pub(super) wg: Option<Box<WgPeer>>,
    pub(super) last_send_activity: Option<Instant>,
    pub(super) last_receive_activity: Option<Instant>,
    pub(super) rx_bytes: u64,
    pub(super) tx_bytes: u64,
    /// The round trip of our last answered initiation to this peer (kept
    /// while the peer is trimmed): how long a crossing can take.
    pub(super) handshake_rtt: Option<Duration>,
}

/// The engine's copy of a peer's preshared key is wiped when the peer leaves
/// the config. `PeerConfig` itself has no `Drop`, so that callers can keep
/// building it with struct-update syntax; holders of keys in the adapters
/// wipe theirs the same way.
impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(key) = self.config.preshared_key.as_mut() {
            zeroize::Zeroize::zeroize(key);
        }
    }
}

impl Peer {
    /// The deadline this peer has in the timer queue, and what it is for.
    pub(super) fn timer_deadline(&self) -> Option<(Instant, PeerTimer)> {
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
    pub(super) fn configure_peer(
        &mut self,
        now: Instant,
        slot: PeerSlot,
        woken: Option<WakeReason>,
    ) {
        if self.peers[slot].wg.is_some() {
            return;
        }
        let index = self.allocate_tunnel_index();
        let peer = &mut self.peers[slot];
        let tunnel = self.device.new_tunnel(
            now,
            &peer.config.public_key,
            peer.config.preshared_key,
            index,
        );
        peer.wg = Some(Box::new(WgPeer {
            tunnel,
            index,
            timers: SessionTimers::new(now, peer.config.persistent_keepalive_secs),
            staged: Staged::default(),
            endpoint: peer.config.endpoints.first().copied(),
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
            .push_back(Output::Event(Box::new(Event::PeerConfigured {
                peer: key,
                woken,
            })));
        if let Some(disco_key) = peer.config.disco_key {
            self.disco
                .ensure_peer(slot, disco_key, &peer.config.endpoints);
            let relay = self.nat.relays.get(&key).copied();
            self.disco.set_relay(now, slot, relay);
        }
        self.reschedule_peer(slot);
    }

    /// Takes a peer out of WireGuard, dropping its `Tunn` and keys.
    pub(super) fn unconfigure_peer(&mut self, slot: PeerSlot, reason: RemoveReason) {
        let Some(mut wg) = self.peers[slot].wg.take() else {
            return;
        };
        self.by_index.remove(&wg.index);
        self.configured_count -= 1;
        if matches!(reason, RemoveReason::DiscoKeyChanged) {
            // The peer restarted: what waited for it waits for the new
            // session instead of being lost with the old one.
            if !wg.staged.is_empty() {
                self.flush_carry
                    .push((slot, std::mem::take(&mut wg.staged)));
            }
        } else {
            self.discard_staged(&mut wg.staged);
        }
        let key = self.peers[slot].config.public_key;
        match reason {
            // An idle peer keeps its paths, as the reference's magicsock
            // keeps an endpoint's best address while WireGuard drops the
            // peer: the first packet after the wake goes to the last best
            // path (whose trust has lapsed by then, so over the relay too)
            // instead of over the relay alone, and a wake whose direct path
            // still works completes in one direct round trip. Nothing of it
            // runs while the peer is idle (no heartbeat for an inactive
            // peer), so idle peers cost no wake-ups.
            RemoveReason::Idle { .. } => {}
            RemoveReason::RemovedFromConfig
            | RemoveReason::DiscoKeyChanged
            | RemoveReason::ConfigChanged
            | RemoveReason::Closed => self.disco.remove_peer(slot),
        }
        debug!(peer = ?key, ?reason, "peer removed from WireGuard");
        self.outputs
            .push_back(Output::Event(Box::new(Event::PeerRemoved {
                peer: key,
                reason,
            })));
        self.reschedule_peer(slot);
    }

    /// Drops packets that will never get a session, counted.
    pub(super) fn discard_staged(&mut self, staged: &mut Staged) {
        let (packets, bytes) = staged.discard(&mut self.buffers);
        self.staged_bytes_total -= bytes;
        self.counters.drop_queue_discarded += packets as u64;
    }

    pub(super) fn wake_peer(&mut self, now: Instant, slot: PeerSlot, reason: WakeReason) {
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
    pub(super) fn peer_timer(&mut self, now: Instant, slot: PeerSlot) {
        if self.idle_deadline(slot).is_some_and(|d| d <= now) {
            let idle_since = self.peers[slot].last_activity();
            let idle_secs = idle_since.map_or(0, |t| now.saturating_duration_since(t).as_secs());
            self.counters.peers_trimmed += 1;
            info!(peer = ?self.peers[slot].config.public_key, idle_secs, "trimming idle peer");
            self.unconfigure_peer(slot, RemoveReason::Idle { idle_secs });
            return;
        }
        let peer = &mut self.peers[slot];
        let keepalive_secs = peer.config.persistent_keepalive_secs.unwrap_or(0);
        if let Some(wg) = peer.wg.as_mut() {
            // Woken for the idle check of a peer that was active since, or
            // at a deadline that moved later: WireGuard's timers are left
            // alone (see `SessionTimers::wireguard_timer_due`), and the
            // next send or receive runs them as before.
            if !wg.timers.wireguard_timer_due(now, !wg.staged.is_empty()) {
                self.reschedule_peer(slot);
                return;
            }
            let keepalive_due = wg.timers.persistent_keepalive_due(now);
            wg.timers.on_timers_run(now, keepalive_secs);
            let mut action = wg.tunnel.update_timers(now, &mut self.buffers.wg_scratch);
            // The persistent keepalive is the engine's (see
            // `WgDevice::new_tunnel`), with the WireGuard implementation's rules: not while our
            // initiation awaits its answer, and one keepalive covers both
            // it and a passive keepalive WireGuard wanted at the same time.
            if keepalive_due && action == TimerAction::Nothing && !wg.timers.initiation_in_flight()
            {
                action = wg.tunnel.send_keepalive(now, &mut self.buffers.wg_scratch);
            }
            self.handle_timer_action(now, slot, action);
            self.start_handshake_if_allowed(now, slot);
            self.drain_staged(now, slot);
        }
        self.reschedule_peer(slot);
    }

    /// Refreshes WireGuard's clock for a peer before an operation and sends
    /// whatever its timers wanted. Returns `true` when the refresh had to
    /// wait (see `SessionTimers::refresh_would_rehandshake_early`): the
    /// caller refreshes again after the operation.
    pub(super) fn refresh_peer_timers(&mut self, now: Instant, slot: PeerSlot) -> bool {
        let Some(wg) = self.peers[slot].wg.as_mut() else {
            return false;
        };
        if wg.timers.refresh_would_rehandshake_early(now) {
            return true;
        }
        let action = wg.tunnel.refresh(now, &mut self.buffers.wg_scratch);
        if action != TimerAction::Nothing {
            self.handle_timer_action(now, slot, action);
        }
        false
    }

    /// Carries out what WireGuard's timers asked for; the packet, if any, is
    /// at the start of the WireGuard scratch buffer.
    fn handle_timer_action(&mut self, now: Instant, slot: PeerSlot, action: TimerAction) {
        let Some(wg) = self.peers[slot].wg.as_mut() else {
            return;
        };
        match action {
            TimerAction::Nothing => {}
            TimerAction::SendInitiation { len } => {
                wg.timers.on_initiation_sent(now);
                self.counters.handshake_initiations_sent += 1;
                let buf = self.buffers.copy_of_wg_scratch(len);
                self.transmit_to_peer(now, slot, buf);
            }
            TimerAction::SendKeepalive { len } => {
                wg.timers.on_keepalive_sent(now);
                self.counters.keepalives_sent += 1;
                let buf = self.buffers.copy_of_wg_scratch(len);
                self.transmit_to_peer(now, slot, buf);
            }
            TimerAction::Expired => {
                if wg.timers.on_expired() {
                    let (packets, bytes) = wg.staged.discard(&mut self.buffers);
                    self.staged_bytes_total -= bytes;
                    self.counters.drop_queue_discarded += packets as u64;
                    debug!(peer = ?self.peers[slot].config.public_key, "WireGuard connection expired");
                }
            }
        }
    }

    pub(super) fn idle_deadline(&self, slot: PeerSlot) -> Option<Instant> {
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

    /// Recomputes a peer's deadline and queues it when it moved earlier.
    pub(super) fn reschedule_peer(&mut self, slot: PeerSlot) {
        let now = self.now;
        let peer = &self.peers[slot];
        // Only deadlines still ahead count: the ones behind have been acted on.
        let wg_deadline = peer
            .wg
            .as_deref()
            .and_then(|wg| wg.timers.next_deadline(now, !wg.staged.is_empty()));
        let idle = self.idle_deadline(slot).map(|at| (at, PeerTimer::IdleTrim));
        let next = match (wg_deadline, idle) {
            (Some(wg), Some(idle)) if idle.0 < wg.0 => Some(idle),
            (wg, idle) => wg.or(idle),
        };
        let peer = &mut self.peers[slot];
        let Some(wg) = peer.wg.as_mut() else { return };
        match (next, wg.deadline) {
            (Some((n, _)), Some((current, _))) if n >= current && current > now => {}
            (Some((n, timer)), _) => {
                wg.deadline = Some((n, timer));
                self.timers.push(n, TimerKey::Peer(slot));
            }
            (None, _) => wg.deadline = None,
        }
    }

    pub(super) fn add_peer(&mut self, now: Instant, cfg: PeerConfig) {
        let key = cfg.public_key;
        let disco = cfg.disco_key;
        let trimmable = cfg.is_trimmable();
        let nets = cfg.allowed_ips.clone();
        let endpoints = cfg.endpoints.clone();
        let slot = self.peers.insert(Peer {
            config: cfg,
            trimmable,
            wg: None,
            last_send_activity: None,
            last_receive_activity: None,
            rx_bytes: 0,
            handshake_rtt: None,
            tx_bytes: 0,
        });
        self.by_key.insert(key, slot);
        if let Some(d) = disco {
            self.by_disco.insert(d, slot);
        }
        for net in nets {
            self.routes.add(net, slot);
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
        slot: PeerSlot,
        cfg: PeerConfig,
    ) -> Option<Flush> {
        let old = std::mem::replace(&mut self.peers[slot].config, cfg);
        let new = &self.peers[slot].config;
        if old.allowed_ips != new.allowed_ips {
            for net in &old.allowed_ips {
                if !new.allowed_ips.contains(net) {
                    self.routes.remove(net, slot);
                }
            }
            for net in new.allowed_ips.clone() {
                self.routes.add(net, slot);
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
        // A peer in WireGuard got its disco state when it was configured,
        // if it had a disco key then. One configured before its key was
        // known (a subnet router, never trimmed, listed by control before
        // the node reported its disco key), or whose key was withdrawn and
        // came back, gets it now: without it a disco ping to the peer went
        // nowhere, and it had no path discovery or relay until the peer
        // happened to ping first.
        if let Some(disco_key) = new_disco {
            if self.peers[slot].wg.is_some() && !self.disco.has_peer(slot) {
                self.disco.ensure_peer(slot, disco_key, &new_endpoints);
                let relay = self.nat.relays.get(&key).copied();
                self.disco.set_relay(now, slot, relay);
            }
        }
        let actions =
            self.disco
                .update_peer(self.now, slot, new_disco, &new_endpoints, &mut self.rng);
        self.run_disco_actions(now, actions);
        let peer = &mut self.peers[slot];
        peer.trimmable = peer.config.is_trimmable();
        let mut flush = None;
        if peer.wg.is_some() {
            match (old.disco_key, new_disco) {
                (Some(a), Some(b)) if a != b && !self.config.testing.disable_disco_key_flush => {
                    // Phase one: drop the old session. The caller re-adds the
                    // peer once every change of this reconfig is applied.
                    info!(peer = ?key, "disco key changed: flushing WireGuard session");
                    let peer_may_hold_session = peer.wg.as_ref().is_some_and(|wg| {
                        wg.timers
                            .last_handshake()
                            .is_some_and(|at| now < at + REJECT_AFTER_TIME)
                    });
                    self.unconfigure_peer(slot, RemoveReason::DiscoKeyChanged);
                    flush = Some(Flush {
                        slot,
                        old_disco: a,
                        new_disco: b,
                        peer_may_hold_session,
                    });
                }
                _ => self.update_session_keys_in_place(now, slot, &old),
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

    /// A changed preshared key or persistent keepalive is applied to the
    /// live tunnel, as wireguard-go does: the session survives. The new
    /// preshared key is used from the next handshake on; a keepalive that
    /// is switched on sends one at once (wireguard-go's `pkaOn`), and every
    /// change restarts the interval from now.
    fn update_session_keys_in_place(&mut self, now: Instant, slot: PeerSlot, old: &PeerConfig) {
        let peer = &mut self.peers[slot];
        let new_psk = peer.config.preshared_key;
        let new_keepalive = peer.config.persistent_keepalive_secs.filter(|&s| s > 0);
        let Some(wg) = peer.wg.as_mut() else { return };
        if old.preshared_key != new_psk {
            debug!(peer = ?peer.config.public_key, "preshared key changed in place");
            wg.tunnel.set_preshared_key(new_psk);
        }
        let old_keepalive = old.persistent_keepalive_secs.filter(|&s| s > 0);
        if old_keepalive == new_keepalive {
            return;
        }
        debug!(peer = ?peer.config.public_key, ?new_keepalive, "persistent keepalive changed in place");
        wg.timers
            .on_persistent_keepalive_changed(now, new_keepalive);
        if old_keepalive.is_none() {
            let action = wg.tunnel.send_keepalive(now, &mut self.buffers.wg_scratch);
            self.handle_timer_action(now, slot, action);
        }
    }

    pub(super) fn remove_peer(&mut self, slot: PeerSlot) {
        self.unconfigure_peer(slot, RemoveReason::RemovedFromConfig);
        let Some(peer) = self.peers.remove(slot) else {
            return;
        };
        self.by_key.remove(&peer.config.public_key);
        if let Some(d) = peer.config.disco_key {
            if self.by_disco.get(&d) == Some(&slot) {
                self.by_disco.remove(&d);
            }
        }
        for net in &peer.config.allowed_ips {
            self.routes.remove(net, slot);
        }
        self.disco.forget_peer(slot);
    }

    pub(super) fn set_trimming(&mut self, now: Instant, on: bool) {
        self.trimming = on;
        let slots: Vec<PeerSlot> = self.by_key.values().copied().collect();
        for slot in slots {
            if on {
                self.reschedule_peer(slot);
            } else {
                self.configure_peer(now, slot, None);
            }
        }
    }
}

/// Phase one of a disco-key flush, done: what phase two needs.
#[derive(Debug, Clone, Copy)]
pub(super) struct Flush {
    /// The peer.
    pub(super) slot: PeerSlot,
    /// The disco key it had.
    pub(super) old_disco: DiscoPublicKey,
    /// The disco key it has now.
    pub(super) new_disco: DiscoPublicKey,
    /// The dropped session was young enough (`REJECT_AFTER_TIME`) for the
    /// peer to still send on it: the new key may have reached us only after
    /// the restarted peer and we had already made that session.
    pub(super) peer_may_hold_session: bool,
}
