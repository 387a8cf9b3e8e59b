//! Pings: TSMP, ICMP and disco pings, and finding the peer for an address.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use ipnet::IpNet;
use rand_core::RngCore;

use super::Engine;
use super::pending::MatchKey;
use super::slot::PeerSlot;
use super::timer::TimerKey;
use crate::api::*;
use crate::limits::*;
use crate::wire;

impl Engine {
    pub(super) fn is_local_addr(&self, ip: IpAddr) -> bool {
        self.applied
            .router
            .local_addrs
            .iter()
            .any(|net| net.addr() == ip)
    }

    pub(super) fn local_addr_for(&self, target: IpAddr) -> Option<IpAddr> {
        self.applied
            .router
            .local_addrs
            .iter()
            .map(|n| n.addr())
            .find(|a| a.is_ipv4() == target.is_ipv4())
    }

    pub(super) fn peer_slot_for_ip(&self, ip: IpAddr) -> Result<PeerSlot, PeerForIpError> {
        if let Some(slot) = self.routes.owner_exact(&IpNet::from(ip)) {
            return Ok(slot);
        }
        if self.is_local_addr(ip) {
            return Err(PeerForIpError::IsLocalIp(ip));
        }
        self.routes
            .lookup(ip)
            .map(|(_, slot)| slot)
            .ok_or(PeerForIpError::NoMatchingPeer(ip))
    }

    pub(super) fn start_ping(&mut self, now: Instant, request: PingRequest) {
        self.counters.pings_started += 1;
        let fail = |engine: &mut Self, message: String, is_local_ip: bool| {
            engine.counters.pings_failed += 1;
            engine
                .outputs
                .push_back(Output::PingResult(Box::new(PingResult {
                    id: request.id,
                    ip: request.ip,
                    kind: request.kind,
                    outcome: PingOutcome::Error {
                        message,
                        is_local_ip,
                    },
                })));
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
        let info = super::pending::PingTarget {
            slot,
            node_key: peer.config.public_key,
            node_name: peer.config.name.clone(),
            node_ip: peer.config.allowed_ips.first().map(|n| n.addr()),
        };
        // A TSMP or ICMP ping goes through WireGuard like the OS's packets,
        // so it is send activity as theirs is (recorded below): without it a
        // ping sent just before the peer's idle trim lost its handshake and
        // its request to the trim (`wgmesh-sim explore --seed 117`). A disco
        // ping does not need WireGuard, but wakes the peer as the others do
        // and is activity as well (below).
        if self.peers[slot].wg.is_none() {
            self.wake_peer(now, slot, WakeReason::Ping);
        }
        match request.kind {
            PingKind::Tsmp => {
                let mut data = [0u8; 8];
                self.rng.fill_bytes(&mut data);
                let id = self.pings.insert(now, request, MatchKey::Tsmp(data), info);
                self.timers.push(now + PING_TIMEOUT, TimerKey::Ping(id));
                let mut out = self.buffers.empty();
                let message = wire::tsmp::TsmpMessage::Ping { data };
                if message.emit_packet(src, request.ip, &mut out).is_ok() {
                    self.note_send_activity(now, slot, request.ip);
                    self.send_to_peer(now, slot, &out);
                }
                self.buffers.recycle(out);
            }
            PingKind::Icmp => {
                let key = self.unused_icmp_key();
                let (ident, seq) = wire::icmp::ident_seq_from_key(key);
                let id = self.pings.insert(now, request, MatchKey::Icmp(key), info);
                self.timers.push(now + PING_TIMEOUT, TimerKey::Ping(id));
                let payload = vec![0u8; request.size.min(1400)];
                let mut out = self.buffers.empty();
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
                    self.note_send_activity(now, slot, request.ip);
                    self.send_to_peer(now, slot, &out);
                }
                self.buffers.recycle(out);
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
                // A disco ping is activity too: the user wants the peer.
                // When the trim still took the peer's disco state, a ping
                // sent in the last round trip before the trim lost its
                // pending entry with it and timed out though the peer
                // answered (`explore --seed 900`); the trim keeps that state
                // now, and the activity still keeps the peer for the answer.
                if self.record_send_activity(now, slot) {
                    self.reschedule_peer(slot);
                }
                let actions = self.disco.ping_user(now, slot, tx_id);
                self.run_disco_actions(now, actions);
            }
        }
    }

    pub(super) fn unused_icmp_key(&mut self) -> u32 {
        loop {
            let key = self.rng.next_u32();
            if !self.pings.contains(&MatchKey::Icmp(key)) {
                return key;
            }
        }
    }

    /// Ends the ping waiting for `key` if the answer came from its peer.
    pub(super) fn complete_ping(
        &mut self,
        now: Instant,
        key: MatchKey,
        slot: PeerSlot,
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
                self.outputs.push_back(Output::PingResult(Box::new(result)));
                true
            }
            None => false,
        }
    }
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
