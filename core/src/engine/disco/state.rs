//! The disco state of all peers: which candidates each has, the pings in
//! flight, the best path, and what timers and messages do to them.

use super::*;

/// The disco state of every peer that has a disco key and has been active or
/// heard from. Peers with no entry fall back to WireGuard's own endpoint.
pub(crate) struct DiscoState {
    secret: [u8; 32],
    /// This node's own endpoints, offered in the call-me-maybes we send.
    own_endpoints: Vec<SocketAddr>,
    peers: BTreeMap<PeerSlot, PeerDisco>,
    /// Kept apart from `peers`, whose entry goes when the peer leaves
    /// WireGuard for any reason but idleness (a disco-key flush, say): that
    /// must not reopen the window for a captured datagram. It goes
    /// when the peer leaves the config or loses its disco key.
    replay: BTreeMap<PeerSlot, Box<ReplayWindow>>,
    schedule: BTreeSet<(Instant, PeerSlot)>,
}

impl DiscoState {
    pub(crate) fn new(secret: [u8; 32]) -> Self {
        Self {
            secret,
            own_endpoints: Vec::new(),
            peers: BTreeMap::new(),
            replay: BTreeMap::new(),
            schedule: BTreeSet::new(),
        }
    }

    /// This node's own endpoints changed: later call-me-maybes offer these.
    pub(crate) fn set_own_endpoints(&mut self, endpoints: Vec<SocketAddr>) {
        self.own_endpoints = endpoints;
    }

    /// Sets the peer's relayed address (`None`: it has none); a previous
    /// one stops being a candidate. A peer with no disco state yet gets it
    /// when it has (see [`DiscoState::ensure_peer`], whose callers set the
    /// relay right after).
    pub(crate) fn set_relay(&mut self, now: Instant, slot: PeerSlot, relay: Option<SocketAddr>) {
        let Some(peer) = self.peers.get_mut(&slot) else {
            return;
        };
        if peer.relay == relay {
            return;
        }
        if let Some(old) = peer.relay.take() {
            if peer
                .candidates
                .get(&old)
                .is_some_and(|c| c.origin == Origin::Relay)
            {
                peer.forget_candidate(old);
            }
            if peer.best.is_some_and(|(addr, _)| addr == old) {
                peer.best = None;
                peer.best_pong_at = None;
            }
        }
        if let Some(addr) = relay {
            match peer.admit(addr, Origin::Relay, &[]) {
                Admitted::Yes | Admitted::Evicting => peer.relay = Some(addr),
                // Sixteen configured endpoints leave no room: the relay is
                // not a candidate (and no call-me-maybe can be sent).
                Admitted::Full => {}
            }
        }
        self.reschedule(now, slot);
    }

    /// The earliest disco deadline.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.schedule.first().map(|(at, _)| *at)
    }

    fn reschedule(&mut self, now: Instant, slot: PeerSlot) {
        self.reschedule_from(now, slot, true);
    }

    /// Re-arms the peer's deadline; `include_now` is false only for the
    /// timer itself (see `PeerDisco::compute_next`).
    fn reschedule_from(&mut self, now: Instant, slot: PeerSlot, include_now: bool) {
        let Some(peer) = self.peers.get_mut(&slot) else {
            return;
        };
        if let Some(old) = peer.next_at.take() {
            self.schedule.remove(&(old, slot));
        }
        peer.next_at = peer.compute_next(now, include_now);
        if let Some(at) = peer.next_at {
            self.schedule.insert((at, slot));
        }
    }

    /// Whether the peer has disco state.
    pub(crate) fn has_peer(&self, slot: PeerSlot) -> bool {
        self.peers.contains_key(&slot)
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
        let relay = peer.relay;
        peer.candidates
            .retain(|addr, _| endpoints.contains(addr) || Some(*addr) == relay);
        peer.pending
            .retain(|_, p| endpoints.contains(&p.dst) || Some(p.dst) == relay);
        peer.set_candidates(endpoints);
        if peer
            .best
            .is_some_and(|(addr, _)| !endpoints.contains(&addr) && Some(addr) != relay)
        {
            peer.best = None;
            peer.best_pong_at = None;
            out.push(DiscoAction::PathChanged {
                slot,
                endpoint: None,
                latency: None,
            });
            if peer.is_active(now) {
                Self::full_ping(peer, slot, now, rng, &mut out, Some(&self.own_endpoints));
            }
        }
        self.reschedule(now, slot);
        out
    }

    /// The peer left WireGuard other than by the idle trim (which keeps
    /// its paths, see `Engine::unconfigure_peer`): its paths go, its replay
    /// window stays.
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

    /// The best trusted-or-last-known path to the peer, and whether it is a
    /// direct one whose trust has lapsed (no pong within the trust window):
    /// such a path may be dead, for example a NAT mapping that expired while
    /// the peer was idle. One lookup, for the send path.
    pub(crate) fn best_path(&self, slot: PeerSlot, now: Instant) -> Option<(SocketAddr, bool)> {
        let peer = self.peers.get(&slot)?;
        let (addr, _) = peer.best?;
        Some((addr, !peer.is_relay(addr) && !peer.best_trusted(now)))
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

    /// Pings every candidate. `call` is our endpoint list when a
    /// call-me-maybe may go with it (not when this answers one): it goes
    /// over the relay to a peer we have no trusted direct path to, at most
    /// once per [`DISCO_FULL_PING_MIN_INTERVAL`], and only once we know
    /// endpoints to offer.
    fn full_ping(
        peer: &mut PeerDisco,
        slot: PeerSlot,
        now: Instant,
        rng: &mut impl RngCore,
        out: &mut Vec<DiscoAction>,
        call: Option<&[SocketAddr]>,
    ) {
        if let Some(own) = call.filter(|own| !own.is_empty()) {
            let due = peer
                .last_call_me_maybe
                .is_none_or(|t| now.saturating_duration_since(t) >= DISCO_FULL_PING_MIN_INTERVAL);
            if due && !peer.direct_trusted(now) {
                peer.last_call_me_maybe = Some(now);
                match peer.relay {
                    Some(relay) => out.push(DiscoAction::Send {
                        slot,
                        dst: relay,
                        message: DiscoMessage::CallMeMaybe {
                            endpoints: own.to_vec(),
                        },
                    }),
                    None => out.push(DiscoAction::CallMeMaybeNoRelay),
                }
            }
        }
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
            Self::full_ping(peer, slot, now, rng, &mut out, Some(&self.own_endpoints));
        }
        self.reschedule(now, slot);
        out
    }

    /// A user ping: measure the path to the best endpoint while it is
    /// trusted; otherwise ping every candidate, the relay among them, and
    /// let the first pong answer, as the reference pings DERP and every
    /// endpoint when it has no trusted direct path. Pinging only a best
    /// path whose trust had lapsed timed out whenever that path had died
    /// meanwhile (a NAT mapping expired while the peer was idle), though the
    /// relay would have answered (found by `wgmesh-sim explore --seed 130`).
    /// Like the reference, the ping is activity for the path's heartbeat.
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
        peer.last_active = Some(now);
        let targets: Vec<SocketAddr> = match peer.best {
            Some((addr, _)) if peer.best_trusted(now) => vec![addr],
            Some(_) | None => peer.candidates.keys().copied().collect(),
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
                Self::full_ping(peer, slot, now, rng, &mut out, Some(&self.own_endpoints));
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
                Self::full_ping(peer, slot, now, rng, &mut out, Some(&self.own_endpoints));
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
                // Hole punching: the peer pings us from `from` because it
                // wants a direct path; our own ping there now goes out
                // while its NAT expects an answer from us (an earlier one
                // of ours may have been dropped by that NAT before the
                // peer's ping opened it). At most one per
                // DISCO_FULL_PING_MIN_INTERVAL.
                let punch = peer.relay.is_some()
                    && !peer.is_relay(from)
                    && !peer.direct_trusted(now)
                    && peer.candidates.contains_key(&from)
                    && peer.last_punch.is_none_or(|t| {
                        now.saturating_duration_since(t) >= DISCO_FULL_PING_MIN_INTERVAL
                    });
                if punch {
                    peer.last_punch = Some(now);
                    let mut tx_id = [0u8; 12];
                    rng.fill_bytes(&mut tx_id);
                    Self::send_ping(peer, slot, now, from, tx_id, &mut out);
                }
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
                        let from_relay = peer.is_relay(from);
                        let switch = match peer.best {
                            None => true,
                            Some((addr, _)) if addr == from => {
                                peer.best = Some((from, latency));
                                peer.best_pong_at = Some(now);
                                false
                            }
                            Some((addr, best_latency)) => match (from_relay, peer.is_relay(addr)) {
                                // Any working direct path beats the relay.
                                (false, true) => true,
                                // The relay only replaces a direct path
                                // that is no longer trusted.
                                (true, false) => !peer.best_trusted(now),
                                // More than 1% better, or the best path is
                                // no longer trusted.
                                (false, false) | (true, true) => {
                                    latency.as_nanos() * 100 < best_latency.as_nanos() * 99
                                        || !peer.best_trusted(now)
                                }
                            },
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
            Some(_) | None => Self::full_ping(peer, slot, now, rng, out, None),
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
                // that answered within the trust window (a direct one before
                // the relay), or none.
                let fallback = peer
                    .candidates
                    .iter()
                    .filter(|(addr, c)| {
                        Some(**addr) != peer.best.map(|b| b.0)
                            && c.last_pong
                                .is_some_and(|t| now < t + TRUST_UDP_ADDR_DURATION)
                    })
                    .filter_map(|(addr, c)| c.latency.map(|l| (*addr, l)))
                    .min_by_key(|(addr, l)| (peer.is_relay(*addr), *l));
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
                Self::full_ping(peer, slot, now, rng, &mut out, None);
            } else if peer.is_active(now) {
                let recently_full = peer
                    .last_full_ping
                    .is_some_and(|t| now.saturating_duration_since(t) < DISCO_PING_TIMEOUT);
                let upgrade_interval = peer.upgrade_interval();
                let upgrade_due = peer
                    .last_full_ping
                    .is_none_or(|t| now.saturating_duration_since(t) >= upgrade_interval);
                if (!peer.best_trusted(now) && !recently_full) || upgrade_due {
                    Self::full_ping(peer, slot, now, rng, &mut out, Some(&self.own_endpoints));
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
            self.reschedule_from(now, slot, false);
        }
        out
    }
}

#[cfg(test)]
mod tests;
