//! Inbound: a datagram from the network, through WireGuard (or disco), to the TUN.

use std::net::SocketAddr;
use std::time::Instant;

use rand_core::RngCore;
use tracing::{debug, trace};

use super::Engine;
use super::disco::{DiscoAction, DiscoBound, OpenError};
use super::pending::MatchKey;
use super::slot::PeerSlot;
use super::timer::{EngineTimer, TimerKey};
use super::wg::{Arrival, ArrivalDrop, Decapsulated, MIN_BUFFER, Reply, WgError};
use crate::api::*;
use crate::filter::FilterAction;
use crate::keys::DiscoPublicKey;
use crate::limits::*;
use crate::wire;

impl Engine {
    pub(super) fn handle_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        self.counters.datagrams_in += 1;
        if wire::disco::looks_like_disco(data) {
            self.handle_disco(now, from, data);
            return;
        }
        if wire::stun::looks_like_stun(data) {
            self.handle_stun(now, from, data);
            return;
        }
        let slot = match self.device.classify(now, from, data) {
            Arrival::Initiation { peer } => {
                let Some(&slot) = self.by_key.get(&peer) else {
                    self.counters.drop_wg_unknown_peer += 1;
                    debug!(?peer, "handshake from a key not in the config");
                    return;
                };
                if self.peers[slot].wg.is_none() {
                    // The key `classify` read can be forged by anyone who
                    // knows both public keys: wake only for an initiation
                    // that authenticates as the peer, so a forged one leaves
                    // it trimmed (no tunnel, no event, no idle timer).
                    if let Err(error) = self.device.authenticate_initiation(now, from, &peer, data)
                    {
                        self.counters.drop_wg_unauthenticated_wake += 1;
                        debug!(?peer, %from, ?error, "initiation for a trimmed peer did not authenticate");
                        return;
                    }
                    // The reference drops this and waits 5 s for a retry; we
                    // re-add the peer and answer the same initiation.
                    self.wake_peer(now, slot, WakeReason::Handshake);
                } else if self.yields_to_crossing(now, slot) {
                    self.counters.handshake_crossings_yielded += 1;
                    debug!(?peer, "crossing initiation left for ours to settle");
                    return;
                }
                slot
            }
            Arrival::ForTunnel { index } => match self.by_index.get(&index) {
                Some(&slot) => slot,
                None => {
                    self.counters.drop_wg_unknown_index += 1;
                    return;
                }
            },
            Arrival::CookieReply { reply, len } => {
                self.counters.cookie_replies_sent += 1;
                let mut buf = self.buffers.empty();
                buf.extend_from_slice(&reply[..len]);
                self.counters.datagrams_out += 1;
                self.outputs.push_back(Output::Transmit(Transmit {
                    dst: from,
                    data: buf,
                }));
                return;
            }
            Arrival::Dropped(reason) => {
                match reason {
                    ArrivalDrop::BadSize => self.counters.drop_wg_bad_size += 1,
                    ArrivalDrop::NotWireGuard => self.counters.drop_datagram_unknown += 1,
                    ArrivalDrop::BadMac => self.counters.drop_wg_bad_mac += 1,
                    ArrivalDrop::NotForUs => self.counters.drop_wg_unknown_peer += 1,
                    ArrivalDrop::Error(e) => self.count_wg_error(e),
                }
                return;
            }
        };
        self.decapsulate(now, slot, from, data);
    }

    pub(super) fn decapsulate(
        &mut self,
        now: Instant,
        slot: PeerSlot,
        from: SocketAddr,
        data: &[u8],
    ) {
        let refresh_after = self.refresh_peer_timers(now, slot);
        // Decrypt straight into a pooled buffer: the plaintext then goes to
        // the TUN without another copy.
        let mut buf = self.buffers.sized(data.len().max(MIN_BUFFER * 2));
        let Some(wg) = self.peers[slot].wg.as_mut() else {
            self.buffers.recycle(buf);
            return;
        };
        match wg.tunnel.decapsulate(now, from.ip(), data, &mut buf) {
            Decapsulated::Keepalive => {
                wg.timers.on_keepalive_received(now);
                self.buffers.recycle(buf);
                self.peer_heard(now, slot, from);
            }
            Decapsulated::CookieStored => {
                // The peer is under load; our retry carries the cookie.
                self.buffers.recycle(buf);
            }
            Decapsulated::Error(e) => {
                self.buffers.recycle(buf);
                self.count_wg_error(e);
            }
            Decapsulated::Send { len, reply } => {
                buf.truncate(len);
                let mut send_reply = true;
                match reply {
                    Reply::Cookie => {
                        // Under load: no handshake happened, the peer
                        // retries with the cookie.
                        self.counters.cookie_replies_sent += 1;
                    }
                    Reply::Response => {
                        wg.timers.on_authenticated_received(now);
                        wg.timers.on_response_sent(now);
                        self.session_established(now, slot, from, HandshakeRole::Responder);
                        self.peer_heard(now, slot, from);
                    }
                    Reply::FirstKeepalive => {
                        let rtt = wg.timers.initiation_round_trip(now);
                        wg.timers.on_authenticated_received(now);
                        // The keepalive only confirms the session to the
                        // peer. When packets are staged, the first of them
                        // (drained below) confirms it as well, so the
                        // keepalive is left out, as wireguard-go sends it
                        // only when nothing is staged: the peer gets the
                        // woken flow's first packet as the session's first
                        // datagram, not behind an empty one.
                        send_reply = wg.staged.is_empty();
                        if send_reply {
                            wg.timers.on_keepalive_sent(now);
                        }
                        if rtt.is_some() {
                            self.peers[slot].handshake_rtt = rtt;
                        }
                        self.session_established(now, slot, from, HandshakeRole::Initiator);
                        self.peer_heard(now, slot, from);
                    }
                }
                if send_reply {
                    self.counters.datagrams_out += 1;
                    self.outputs.push_back(Output::Transmit(Transmit {
                        dst: from,
                        data: buf,
                    }));
                } else {
                    self.buffers.recycle(buf);
                }
            }
            Decapsulated::Deliver { len } => {
                wg.timers.on_data_received(now);
                buf.truncate(len);
                self.peer_heard(now, slot, from);
                self.deliver_inbound(now, slot, buf);
            }
        }
        // Whichever side completed it, a usable session sends what waited.
        self.drain_staged(now, slot);
        if refresh_after {
            self.refresh_peer_timers(now, slot);
        }
        self.reschedule_peer(slot);
    }

    /// Whether to leave the peer's initiation unanswered because ours to it
    /// is in flight and crossed it. Answering both would make each side
    /// discard the handshake state the other's answer needs, and both would
    /// start again (a storm, one round each round trip). So exactly one side
    /// yields, the one with the higher node key, once per run of attempts:
    /// the peer answers ours, and the session exists one round trip after
    /// our initiation left.
    ///
    /// A peer initiation can only have crossed ours if it arrives within
    /// about one round trip of ours leaving; one that comes later means ours
    /// was lost or refused, and it is answered. The round trip is the last
    /// one measured to this peer (twice it, for jitter), or
    /// `CROSSING_WINDOW_UNKNOWN_RTT` before any was measured.
    fn yields_to_crossing(&mut self, now: Instant, slot: PeerSlot) -> bool {
        let node_key = self.node_key;
        let peer = &mut self.peers[slot];
        if node_key <= peer.config.public_key {
            return false;
        }
        let window = peer
            .handshake_rtt
            .map_or(CROSSING_WINDOW_UNKNOWN_RTT, |rtt| rtt * 2);
        peer.wg
            .as_mut()
            .is_some_and(|wg| wg.timers.yield_to_crossing(now, window))
    }

    /// Authenticated traffic from a peer: roam to its address and note activity.
    pub(super) fn peer_heard(&mut self, now: Instant, slot: PeerSlot, from: SocketAddr) {
        let peer = &mut self.peers[slot];
        if let Some(wg) = peer.wg.as_mut() {
            wg.endpoint = Some(from);
            wg.heard_since_wake = true;
        }
        self.note_receive_activity(now, slot);
    }

    pub(super) fn session_established(
        &mut self,
        now: Instant,
        slot: PeerSlot,
        from: SocketAddr,
        role: HandshakeRole,
    ) {
        let peer = &mut self.peers[slot];
        let Some(wg) = peer.wg.as_mut() else { return };
        match role {
            HandshakeRole::Initiator => wg.timers.on_session_established(now),
            HandshakeRole::Responder => wg.timers.on_session_answered(now),
        }
        self.counters.handshakes_completed += 1;
        let key = peer.config.public_key;
        debug!(peer = ?key, endpoint = %from, "handshake completed");
        self.outputs
            .push_back(Output::Event(Box::new(Event::HandshakeCompleted {
                peer: key,
                endpoint: from,
            })));
    }

    /// A decrypted packet from a peer: check its source, filter it, intercept
    /// what is ours (TSMP, ping replies), deliver the rest to the TUN.
    pub(super) fn deliver_inbound(&mut self, now: Instant, slot: PeerSlot, packet: Vec<u8>) {
        let header = match wire::ip::IpHeader::parse(&packet) {
            Ok(h) => h,
            Err(_) => {
                self.counters.drop_inner_malformed += 1;
                self.buffers.recycle(packet);
                return;
            }
        };
        let allowed = self
            .routes
            .lookup_owners(header.src)
            .is_some_and(|(_, owners)| owners.contains(&slot));
        if !allowed {
            self.counters.drop_spoofed_source += 1;
            self.buffers.recycle(packet);
            debug!(peer = ?self.peers[slot].config.public_key, src = %header.src, "source outside allowed IPs");
            return;
        }
        self.peers[slot].rx_bytes += packet.len() as u64;
        match header.protocol {
            wire::ip::PROTO_TSMP => {
                self.handle_tsmp(now, slot, &header, &packet);
                self.buffers.recycle(packet);
                return;
            }
            wire::ip::PROTO_ICMP | wire::ip::PROTO_ICMPV6 => {
                if let Some(echo) = wire::icmp::parse_echo(&header, &packet) {
                    if echo.kind == wire::icmp::EchoKind::Reply {
                        let key = MatchKey::Icmp(wire::icmp::ping_key(echo.ident, echo.seq));
                        if self.complete_ping(now, key, slot, None, None) {
                            self.buffers.recycle(packet);
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
        // The policy says who may reach us; replies to flows we opened
        // pass whatever it says (checked only when the filter refuses, so
        // an allow-all filter costs no lookup).
        let refused = if self.filter.check(&header, &packet) == FilterAction::Drop {
            let answers_ours = self.conntrack.accepts_inbound(now, &header, &packet);
            self.sync_conntrack_counters();
            !answers_ours
        } else {
            false
        };
        if refused {
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
                    let mut out = self.buffers.empty();
                    if reject.emit_packet(header.dst, header.src, &mut out).is_ok() {
                        self.counters.tsmp_rejects_sent += 1;
                        self.send_to_peer(now, slot, &out);
                    }
                    self.buffers.recycle(out);
                }
            }
            self.buffers.recycle(packet);
            return;
        }
        if self.applied.knobs.fake_icmp_echo && self.answer_echo_request(now, slot, &packet) {
            self.buffers.recycle(packet);
            return;
        }
        if self.capture {
            self.capture_packet(now, false, &packet);
        }
        self.counters.tun_packets_out += 1;
        self.outputs.push_back(Output::TunWrite(packet));
    }

    /// Fake mode (the reference's "respond to ping"): an ICMP echo request
    /// that came in from a peer and passed the packet filter is answered
    /// here, whatever its destination, and the reply is encrypted back to
    /// that peer. The request goes no further: in the reference the packet
    /// is then delivered to a TUN that discards everything, so nothing of it
    /// reaches the OS; delivering it to a real TUN would answer it twice.
    /// Returns whether the packet was such a request.
    fn answer_echo_request(&mut self, now: Instant, slot: PeerSlot, packet: &[u8]) -> bool {
        let mut reply = self.buffers.empty();
        if wire::icmp::echo_reply_for(packet, &mut reply).is_none() {
            self.buffers.recycle(reply);
            return false;
        }
        self.counters.fake_icmp_replies += 1;
        self.send_to_peer(now, slot, &reply);
        self.buffers.recycle(reply);
        true
    }

    pub(super) fn handle_tsmp(
        &mut self,
        now: Instant,
        slot: PeerSlot,
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
                // The reference answers every TSMP ping a peer sends, for
                // any destination (one of our addresses or one we route,
                // like an address in an advertised subnet), from that
                // destination. The source was checked against the peer's
                // AllowedIPs already, so the pong goes back to the peer.
                let pong = wire::tsmp::TsmpMessage::Pong {
                    data,
                    peerapi_port: self.applied.knobs.peerapi_port,
                };
                let mut out = self.buffers.empty();
                if pong.emit_packet(header.dst, header.src, &mut out).is_ok() {
                    self.counters.tsmp_pongs_sent += 1;
                    self.send_to_peer(now, slot, &out);
                }
                self.buffers.recycle(out);
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

    pub(super) fn count_wg_error(&mut self, e: WgError) {
        let c = &mut self.counters;
        match e {
            WgError::BadMac => c.drop_wg_bad_mac += 1,
            WgError::DecryptFailed => c.drop_wg_decrypt_failed += 1,
            WgError::Replay => c.drop_wg_replay += 1,
            WgError::StaleTimestamp => c.drop_wg_stale_timestamp += 1,
            WgError::UnknownIndex => c.drop_wg_unknown_index += 1,
            WgError::Other => c.drop_wg_other += 1,
        }
    }

    pub(super) fn note_receive_activity(&mut self, now: Instant, slot: PeerSlot) {
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

    pub(super) fn handle_disco(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
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
        let relay = self.nat.relays.get(&peer.config.public_key).copied();
        self.disco.set_relay(now, slot, relay);
        let message = match self.disco.open(slot, data) {
            Ok(m) => m,
            Err(OpenError::Bad(_)) => {
                self.counters.drop_disco_bad += 1;
                return;
            }
            Err(OpenError::Replay) => {
                self.counters.drop_disco_replay += 1;
                debug!(peer = ?self.peers[slot].config.public_key, %from, "replayed disco datagram");
                return;
            }
        };
        let actions = self
            .disco
            .handle_message(now, slot, from, message, &mut self.rng);
        self.run_disco_actions(now, actions);
    }

    pub(super) fn run_disco_actions(&mut self, now: Instant, actions: Vec<DiscoAction>) {
        for action in actions {
            match action {
                DiscoAction::Send { slot, dst, message } => {
                    if !self.network_up {
                        // No link is up: like the reference's magicsock,
                        // send no disco message at all, and forget a ping
                        // that could not leave so it does not count as lost.
                        self.counters.drop_disco_network_down += 1;
                        if let wire::disco::DiscoMessage::Ping { tx_id, .. } = message {
                            self.disco.forget_ping(slot, tx_id);
                        }
                        continue;
                    }
                    let mut nonce = [0u8; 24];
                    self.rng.fill_bytes(&mut nonce);
                    let mut buf = self.buffers.empty();
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
                            wire::disco::DiscoMessage::CallMeMaybe { ref endpoints } => {
                                self.counters.disco_call_me_maybe_sent += 1;
                                debug!(
                                    peer = ?self.peers[slot].config.public_key,
                                    relay = %dst,
                                    endpoints = endpoints.len(),
                                    "call-me-maybe sent over the relay"
                                );
                            }
                        }
                        self.counters.datagrams_out += 1;
                        self.outputs
                            .push_back(Output::Transmit(Transmit { dst, data: buf }));
                    } else {
                        self.buffers.recycle(buf);
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
                    self.outputs
                        .push_back(Output::Event(Box::new(Event::PathChanged {
                            peer,
                            endpoint,
                            latency,
                        })));
                }
                DiscoAction::CallMeMaybeReceived => self.counters.disco_call_me_maybe_received += 1,
                DiscoAction::CallMeMaybeNoRelay => {
                    self.counters.disco_call_me_maybe_no_relay += 1;
                    trace!("call-me-maybe wanted, but the peer has no relay address");
                }
                DiscoAction::Bounded { what, n } => {
                    let counter = match what {
                        DiscoBound::CandidateEvicted => &mut self.counters.disco_candidates_evicted,
                        DiscoBound::BadCandidate => &mut self.counters.drop_disco_bad_candidate,
                        DiscoBound::FullPingDeferred => {
                            &mut self.counters.disco_full_pings_deferred
                        }
                    };
                    *counter += n;
                }
            }
        }
        self.schedule_disco();
    }

    /// Queues the disco deadline if it is earlier than the one already
    /// queued: one entry per deadline, not one per disco message.
    pub(super) fn schedule_disco(&mut self) {
        if let Some(at) = self.disco.next_deadline() {
            if self.disco_timer_at.is_none_or(|queued| at < queued) {
                self.disco_timer_at = Some(at);
                self.timers.push(at, TimerKey::Engine(EngineTimer::Disco));
            }
        }
    }
}

/// Which side of a completed handshake this node was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HandshakeRole {
    /// We sent the initiation: the session carries data at once.
    Initiator,
    /// We answered the peer's: the session carries data once the peer
    /// confirms it.
    Responder,
}
