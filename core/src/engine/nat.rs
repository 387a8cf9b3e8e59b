//! NAT traversal in the engine: the NAT settings, endpoint discovery's
//! inputs and timers, and the STUN datagrams it sends and receives.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use tracing::{debug, info};

use super::Engine;
use super::endpoints::{
    StunTransmit, usable_remote, validate_local_endpoints, validate_stun_servers,
};
use super::timer::{EngineTimer, TimerKey};
use crate::api::*;
use crate::keys::NodePublicKey;

/// The NAT settings in force.
#[derive(Debug, Default)]
pub(crate) struct NatState {
    /// Each peer's relayed address.
    pub(crate) relays: BTreeMap<NodePublicKey, SocketAddr>,
}

impl NatConfig {
    /// Checks the settings: bounded, usable addresses, no duplicates.
    pub fn validate(&self) -> Result<(), NatConfigError> {
        validate_stun_servers(&self.stun_servers)?;
        for (i, relay) in self.peer_relays.iter().enumerate() {
            if !usable_remote(&relay.addr) {
                return Err(NatConfigError::BadRelay {
                    peer: relay.peer,
                    addr: relay.addr,
                });
            }
            if self.peer_relays[..i].iter().any(|r| r.peer == relay.peer) {
                return Err(NatConfigError::DuplicateRelayPeer(relay.peer));
            }
        }
        Ok(())
    }
}

impl Engine {
    /// [`Input::SetNat`]: checked first; a refused config changes nothing.
    pub(super) fn set_nat(&mut self, now: Instant, config: NatConfig) -> Result<(), InputError> {
        config.validate()?;
        let mut out = Vec::new();
        let changed = self.endpoints.set_servers(
            now,
            &config.stun_servers,
            self.network_up,
            &mut self.rng,
            &mut self.counters,
            &mut out,
        );
        let relays: BTreeMap<NodePublicKey, SocketAddr> = config
            .peer_relays
            .iter()
            .map(|r| (r.peer, r.addr))
            .collect();
        if relays != self.nat.relays {
            info!(relays = relays.len(), "peer relay addresses set");
            self.nat.relays = relays;
            // Peers with disco state get their new relay candidate now;
            // the others when they get disco state.
            let slots: Vec<(NodePublicKey, super::slot::PeerSlot)> =
                self.by_key.iter().map(|(k, s)| (*k, *s)).collect();
            for (key, slot) in slots {
                let relay = self.nat.relays.get(&key).copied();
                self.disco.set_relay(now, slot, relay);
            }
            self.schedule_disco();
        }
        self.run_stun(out, changed);
        Ok(())
    }

    /// [`Input::SetLocalEndpoints`]: checked first; refused ones change nothing.
    pub(super) fn set_local_endpoints(&mut self, local: &[SocketAddr]) -> Result<(), InputError> {
        validate_local_endpoints(local)?;
        let changed = self.endpoints.set_local(local);
        self.run_stun(Vec::new(), changed);
        Ok(())
    }

    /// A link change: a major one forgets the reflexive address (the NAT
    /// mapping is probably new) and asks again at once; a minor one, or a
    /// link coming back, asks again and keeps what it knew meanwhile.
    pub(super) fn rediscover_endpoints(&mut self, now: Instant, major: bool) {
        let mut out = Vec::new();
        let changed = self.endpoints.restart(
            now,
            major,
            self.network_up,
            &mut self.rng,
            &mut self.counters,
            &mut out,
        );
        self.run_stun(out, changed);
    }

    /// The endpoint-discovery timer.
    pub(super) fn stun_timer(&mut self, now: Instant) {
        let mut out = Vec::new();
        let changed = self.endpoints.on_timer(
            now,
            self.network_up,
            &mut self.rng,
            &mut self.counters,
            &mut out,
        );
        self.run_stun(out, changed);
    }

    /// A datagram that looks like STUN.
    pub(super) fn handle_stun(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        let mut out = Vec::new();
        let changed = self
            .endpoints
            .handle_datagram(now, from, data, &mut self.counters, &mut out);
        self.run_stun(out, changed);
    }

    /// Sends what endpoint discovery asked for, reports a changed endpoint
    /// set and re-arms its timer.
    fn run_stun(&mut self, transmits: Vec<StunTransmit>, endpoints_changed: bool) {
        for (dst, data) in transmits {
            self.counters.datagrams_out += 1;
            let mut buf = self.buffers.empty();
            buf.extend_from_slice(&data);
            self.outputs
                .push_back(Output::Transmit(Transmit { dst, data: buf }));
        }
        if endpoints_changed {
            let endpoints = self.endpoints.endpoints().to_vec();
            self.disco
                .set_own_endpoints(endpoints.iter().map(|e| e.addr).collect());
            info!(
                endpoints = ?endpoints.iter().map(|e| (e.addr, e.kind.as_str())).collect::<Vec<_>>(),
                "own endpoints changed"
            );
            self.outputs
                .push_back(Output::Effect(Box::new(Effect::EndpointsChanged(
                    endpoints,
                ))));
        }
        if let Some(at) = self.endpoints.next_deadline() {
            if self.stun_timer_at.is_none_or(|queued| at < queued) {
                debug!(?at, "endpoint discovery timer");
                self.stun_timer_at = Some(at);
                self.timers.push(at, TimerKey::Engine(EngineTimer::Stun));
            }
        }
    }
}
