//! Outbound: a packet from the TUN, through WireGuard, to the network.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use tracing::trace;

use super::Engine;
use super::peers::WgPeer;
use super::slot::PeerSlot;
use super::wg::{DATA_OVERHEAD, Encapsulated, Initiated, MIN_BUFFER};
use crate::api::*;
use crate::limits::*;
use crate::wire;

/// What one burst of TUN packets ([`Engine::handle_tun_burst`]) has done
/// so far: the peers it sent to (their timers are refreshed once, at the
/// first packet, and rescheduled once, at the end) and the last route
/// looked up.
#[derive(Debug, Default)]
pub(crate) struct TunBurst {
    /// Peers sent to in this burst, in the order first sent to.
    pub(super) touched: Vec<PeerSlot>,
    /// The last destination looked up and its peer.
    last_route: Option<(IpAddr, Option<PeerSlot>)>,
}

impl TunBurst {
    /// Ready for a new burst (the list keeps its allocation).
    pub(super) fn clear(&mut self) {
        self.touched.clear();
        self.last_route = None;
    }
}

impl Engine {
    pub(super) fn handle_tun_packet(&mut self, now: Instant, packet: &[u8]) {
        self.tun_packet(now, packet, None);
    }

    /// One packet of a burst (see [`Engine::handle_tun_burst`]).
    pub(super) fn handle_tun_packet_in_burst(
        &mut self,
        now: Instant,
        packet: &[u8],
        burst: &mut TunBurst,
    ) {
        self.tun_packet(now, packet, Some(burst));
    }

    /// One packet from the TUN, alone (`burst` is `None`: every step for
    /// this packet) or as part of a burst.
    fn tun_packet(&mut self, now: Instant, packet: &[u8], mut burst: Option<&mut TunBurst>) {
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
            let mut buf = self.buffers.empty();
            buf.extend_from_slice(packet);
            self.counters.tun_packets_out += 1;
            self.outputs.push_back(Output::TunWrite(buf));
            return;
        }
        // Within a burst the routes cannot change, so a run of packets to
        // one destination is looked up once.
        let route = match burst.as_deref_mut() {
            Some(TunBurst {
                last_route: Some((dst, slot)),
                ..
            }) if *dst == header.dst => *slot,
            Some(burst) => {
                let slot = self.routes.lookup(header.dst).map(|(_, slot)| slot);
                burst.last_route = Some((header.dst, slot));
                slot
            }
            None => self.routes.lookup(header.dst).map(|(_, slot)| slot),
        };
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
        self.conntrack.note_outbound(now, &header, packet);
        self.sync_conntrack_counters();
        match burst {
            None => {
                self.note_send_activity(now, slot, header.dst);
                self.send_to_peer(now, slot, packet);
            }
            Some(burst) => {
                // The first packet to a peer in the burst does what a lone
                // packet does; the next ones, at the same instant, would
                // find nothing more to record (activity is recorded with a
                // granularity, timers refreshed at the same instant have
                // nothing new to do), except that a peer removed from
                // WireGuard meanwhile is woken again.
                let first = !burst.touched.contains(&slot);
                if first || self.peers[slot].wg.is_none() {
                    self.note_send_activity(now, slot, header.dst);
                }
                if first {
                    burst.touched.push(slot);
                }
                self.send_to_peer_unscheduled(now, slot, packet, first);
            }
        }
    }

    /// Copies the connection-tracking table's counters into the engine's.
    pub(super) fn sync_conntrack_counters(&mut self) {
        let stats = self.conntrack.stats();
        self.counters.conntrack_replies_accepted = stats.replies_accepted;
        self.counters.conntrack_flows_tracked = stats.flows_tracked;
        self.counters.conntrack_flows_evicted = stats.flows_evicted;
        self.counters.conntrack_flows_expired = stats.flows_expired;
    }

    pub(super) fn count_tun_error(&mut self, e: &wire::ip::IpError) {
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
    pub(super) fn note_send_activity(&mut self, now: Instant, slot: PeerSlot, dst: IpAddr) {
        let record = self.record_send_activity(now, slot);
        let peer = &mut self.peers[slot];
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

    /// Moves the peer's last send activity to `now` unless it was recorded
    /// less than [`SEND_ACTIVITY_GRANULARITY`] ago; says whether it did.
    pub(super) fn record_send_activity(&mut self, now: Instant, slot: PeerSlot) -> bool {
        let peer = &mut self.peers[slot];
        let record = peer
            .last_send_activity
            .is_none_or(|t| now.saturating_duration_since(t) >= SEND_ACTIVITY_GRANULARITY);
        if record {
            peer.last_send_activity = Some(now);
        }
        record
    }

    /// Encrypts `packet` for the peer in `slot` and queues the datagram, or
    /// stages it until a session exists. The caller has made sure the peer
    /// is in WireGuard (woken if needed).
    pub(super) fn send_to_peer(&mut self, now: Instant, slot: PeerSlot, packet: &[u8]) {
        if self.send_to_peer_unscheduled(now, slot, packet, true) {
            self.reschedule_peer(slot);
        }
    }

    /// [`Engine::send_to_peer`] without rescheduling the peer's timer (a
    /// burst does that once at its end), refreshing WireGuard's timers
    /// first only when `refresh` says. Returns false when the peer is not
    /// in WireGuard (nothing was done).
    fn send_to_peer_unscheduled(
        &mut self,
        now: Instant,
        slot: PeerSlot,
        packet: &[u8],
        refresh: bool,
    ) -> bool {
        if refresh {
            self.refresh_peer_timers(now, slot);
        }
        let Some(wg) = self.peers[slot].wg.as_mut() else {
            return false;
        };
        wg.timers.on_outbound_packet();
        if wg.staged.is_empty() && Self::can_send_data(wg, now) {
            self.encrypt_to_peer(now, slot, packet);
        } else {
            self.stage_packet(slot, packet);
            self.start_handshake_if_allowed(now, slot);
            self.drain_staged(now, slot);
        }
        true
    }

    /// Encrypts one packet on the current session and transmits it.
    fn encrypt_to_peer(&mut self, now: Instant, slot: PeerSlot, packet: &[u8]) {
        let needed = (packet.len() + DATA_OVERHEAD).max(MIN_BUFFER);
        let mut buf = self.buffers.sized(needed);
        let peer = &mut self.peers[slot];
        let Some(wg) = peer.wg.as_mut() else {
            self.buffers.recycle(buf);
            return;
        };
        match wg.tunnel.encapsulate(now, packet, &mut buf) {
            Encapsulated::Data { len } => {
                wg.timers.on_data_sent(now);
                peer.tx_bytes += packet.len() as u64;
                buf.truncate(len);
                self.transmit_to_peer(now, slot, buf);
            }
            Encapsulated::Initiation { len } => {
                // The session went away between the check and the call
                // (it cannot today: both run at the same instant); WireGuard
                // queued the packet behind this initiation and sends it when
                // the handshake completes.
                wg.timers.on_initiation_sent(now);
                self.counters.handshake_initiations_sent += 1;
                buf.truncate(len);
                self.transmit_to_peer(now, slot, buf);
            }
            Encapsulated::Queued => self.buffers.recycle(buf),
            Encapsulated::Error(e) => {
                self.count_wg_error(e);
                self.buffers.recycle(buf);
            }
        }
    }

    /// Whether data may go out on the peer's current session now: one
    /// exists, the peer can decrypt it (we initiated it, or the peer
    /// confirmed the one we answered for) and it is younger than its send
    /// limit (`SEND_ON_ANSWERED_SESSION_UNTIL`, or `SEND_ON_INITIATED_SESSION_UNTIL`
    /// for one we initiated).
    fn can_send_data(wg: &WgPeer, now: Instant) -> bool {
        wg.tunnel.has_session(now) && wg.timers.session_usable_for_data(now)
    }

    /// Keeps a packet until the peer has a usable session (wireguard-go's
    /// staged packets), within the per-peer and global bounds. Staged
    /// packets never go into WireGuard before a session exists, so it never
    /// starts a handshake of its own for them.
    fn stage_packet(&mut self, slot: PeerSlot, packet: &[u8]) {
        let max_packets = self.config.max_queued_packets_per_peer;
        let max_bytes = self.config.max_queued_bytes_per_peer;
        let budget = self.config.max_queued_bytes_total;
        let Some(wg) = self.peers[slot].wg.as_mut() else {
            return;
        };
        if wg.staged.len() >= max_packets || wg.staged.bytes() + packet.len() > max_bytes {
            self.counters.drop_queue_overflow += 1;
            return;
        }
        if self.staged_bytes_total + packet.len() > budget {
            self.counters.drop_queue_budget_exceeded += 1;
            return;
        }
        let mut copy = self.buffers.sized(packet.len());
        copy.clear();
        copy.extend_from_slice(packet);
        wg.staged.push(copy);
        self.staged_bytes_total += packet.len();
    }

    /// Sends the staged packets, in order, once a session exists, whichever
    /// side completed it.
    pub(super) fn drain_staged(&mut self, now: Instant, slot: PeerSlot) {
        loop {
            let Some(wg) = self.peers[slot].wg.as_mut() else {
                return;
            };
            if wg.staged.is_empty() || !Self::can_send_data(wg, now) {
                return;
            }
            let Some(packet) = wg.staged.pop() else {
                return;
            };
            self.staged_bytes_total -= packet.len();
            self.encrypt_to_peer(now, slot, &packet);
            self.buffers.recycle(packet);
        }
    }

    /// Starts a handshake for staged packets unless WireGuard's rules say to
    /// wait: an initiation of ours is in flight, or we answered the peer's
    /// and it has not confirmed that session yet (see
    /// `SessionTimers::handshake_must_wait`).
    pub(super) fn start_handshake_if_allowed(&mut self, now: Instant, slot: PeerSlot) {
        let Some(wg) = self.peers[slot].wg.as_mut() else {
            return;
        };
        if wg.staged.is_empty()
            || Self::can_send_data(wg, now)
            || wg.timers.handshake_must_wait(now)
        {
            return;
        }
        self.send_initiation(now, slot);
    }

    /// Starts a handshake with a peer whose session a disco-key flush just
    /// dropped while the peer may still hold it (see `finish_flushes`),
    /// whether or not packets are staged.
    pub(super) fn initiate_after_flush(&mut self, now: Instant, slot: PeerSlot) {
        let Some(wg) = self.peers[slot].wg.as_mut() else {
            return;
        };
        if wg.timers.handshake_must_wait(now) {
            return;
        }
        self.send_initiation(now, slot);
        self.reschedule_peer(slot);
    }

    /// Sends a handshake initiation unless one is in progress.
    fn send_initiation(&mut self, now: Instant, slot: PeerSlot) {
        let Some(wg) = self.peers[slot].wg.as_mut() else {
            return;
        };
        match wg.tunnel.initiate(now, &mut self.buffers.wg_scratch) {
            Initiated::Sent { len } => {
                wg.timers.on_initiation_sent(now);
                self.counters.handshake_initiations_sent += 1;
                let buf = self.buffers.copy_of_wg_scratch(len);
                self.transmit_to_peer(now, slot, buf);
            }
            Initiated::InProgress => {}
            Initiated::Error(e) => self.count_wg_error(e),
        }
    }

    /// Sends a WireGuard datagram to the peer's current endpoint: the best
    /// disco path; before any path answered, the peer's relay if it has
    /// one (the one path that needs no NAT to be open, as the reference
    /// sends to DERP then); else where WireGuard last heard it from.
    ///
    /// While the best path is a direct one whose trust has lapsed, a copy
    /// also goes over the peer's relay, as the reference sends to both its
    /// best address and DERP then: the direct path may have died unseen (a
    /// NAT mapping that expired during an idle period), and the first
    /// packets of a wake must not be lost on it while disco finds out.
    pub(super) fn transmit_to_peer(&mut self, now: Instant, slot: PeerSlot, data: Vec<u8>) {
        let peer = &self.peers[slot];
        let (best, best_untrusted_direct) = match self.disco.best_path(slot, now) {
            Some((addr, untrusted_direct)) => (Some(addr), untrusted_direct),
            None => (None, false),
        };
        // The relay is looked up only when it can be used: no best path yet,
        // or a best path that may be dead.
        let relay = if best.is_none() || best_untrusted_direct {
            self.nat.relays.get(&peer.config.public_key).copied()
        } else {
            None
        };
        let endpoint = best.or(relay).or(peer.wg.as_ref().and_then(|w| w.endpoint));
        if best_untrusted_direct
            && let Some(relay) = relay
            && endpoint != Some(relay)
        {
            let mut copy = self.buffers.empty();
            copy.extend_from_slice(&data);
            self.counters.datagrams_out += 1;
            self.counters.sent_via_relay_too += 1;
            self.outputs.push_back(Output::Transmit(Transmit {
                dst: relay,
                data: copy,
            }));
        }
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
                self.buffers.recycle(data);
            }
        }
    }
}
