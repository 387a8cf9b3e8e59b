//! Reconfig: the full desired state and peer deltas against the running state.

use std::collections::BTreeSet;
use std::time::Instant;

use ipnet::IpNet;
use tracing::warn;

use super::Engine;
use super::peers::Flush;
use super::slot::PeerSlot;
use crate::api::*;
use crate::config::{DnsConfig, Knobs, PeerConfig, Reconfig, ReconfigError, RouterConfig};
use crate::config::{PeerDelta, RunningPeers, check_peer_batch};
use crate::keys::{DiscoPublicKey, NodePublicKey};

/// The parts of the last accepted reconfig the engine keeps.
#[derive(Default)]
pub(super) struct RunningConfig {
    pub(super) have_config: bool,
    pub(super) listen_port: u16,
    pub(super) router: RouterConfig,
    pub(super) dns: DnsConfig,
    pub(super) knobs: Knobs,
    pub(super) primary_routes: Vec<IpNet>,
    pub(super) is_subnet_router: bool,
    pub(super) dns_via_tunnel: bool,
}

impl Engine {
    /// Applies a full desired state ([`Input::Reconfig`]).
    ///
    /// When the peer list has the same length as the last one, it is first
    /// compared position by position with what the engine holds; if only a
    /// few peers differ, only those are validated and applied (the cost is
    /// one comparison per peer, no copies). Otherwise the whole config is
    /// validated and diffed by key.
    pub(super) fn apply_reconfig(
        &mut self,
        now: Instant,
        reconfig: &Reconfig,
    ) -> Result<ReconfigOutcome, ReconfigError> {
        let result = match self.reconfig_by_position(now, reconfig) {
            Some(result) => result,
            None => self.reconfig_full(now, reconfig),
        };
        if let Err(e) = &result {
            self.counters.reconfigs_refused += 1;
            warn!(error = %e, "reconfig refused");
        }
        result
    }

    /// The fast path; `None` when it does not apply.
    pub(super) fn reconfig_by_position(
        &mut self,
        now: Instant,
        reconfig: &Reconfig,
    ) -> Option<Result<ReconfigOutcome, ReconfigError>> {
        let (Some(wg), Some(router), Some(dns)) =
            (&reconfig.wireguard, &reconfig.router, &reconfig.dns)
        else {
            return None;
        };
        if !self.applied.have_config
            || *router != self.applied.router
            || wg.peers.len() != self.peer_order.len()
        {
            return None;
        }
        let limit = (wg.peers.len() / 8).max(16);
        let mut changed_positions = Vec::new();
        for (i, cfg) in wg.peers.iter().enumerate() {
            if self.peers[self.peer_order[i]].config != *cfg {
                changed_positions.push(i);
                if changed_positions.len() > limit {
                    return None;
                }
            }
        }
        let mut changes = ReconfigChanges::default();
        if !changed_positions.is_empty() {
            let old_slots: BTreeSet<PeerSlot> = changed_positions
                .iter()
                .map(|&i| self.peer_order[i])
                .collect();
            let new_keys: BTreeSet<NodePublicKey> = changed_positions
                .iter()
                .map(|&i| wg.peers[i].public_key)
                .collect();
            let remove: Vec<NodePublicKey> = old_slots
                .iter()
                .map(|&slot| self.peers[slot].config.public_key)
                .filter(|k| !new_keys.contains(k))
                .collect();
            let upsert: Vec<PeerConfig> = changed_positions
                .iter()
                .map(|&i| wg.peers[i].clone())
                .collect();
            match self.apply_peers(now, upsert, &remove, Some(&old_slots)) {
                Ok(n) => changes.peers_changed = n,
                Err(e) => return Some(Err(e)),
            }
            changes.sessions_flushed = self.last_flush_count;
            for &i in &changed_positions {
                self.peer_order[i] = self.by_key[&wg.peers[i].public_key];
            }
        }
        Some(Ok(self.apply_parts(
            now,
            changes,
            wg.listen_port,
            router,
            dns,
            &reconfig.knobs,
            &reconfig.primary_routes,
        )))
    }

    /// The full path: validate everything, diff by key.
    pub(super) fn reconfig_full(
        &mut self,
        now: Instant,
        reconfig: &Reconfig,
    ) -> Result<ReconfigOutcome, ReconfigError> {
        let valid = reconfig.validate(&self.node_key)?;
        let mut changes = ReconfigChanges::default();
        let old_count = self.by_key.len();
        let growth = valid.wireguard.peers.len().saturating_sub(self.peers.len());
        self.peers.reserve_exact(growth);
        let mut matched = 0usize;
        let mut flushes = Vec::new();
        for cfg in &valid.wireguard.peers {
            match self.by_key.get(&cfg.public_key).copied() {
                Some(slot) => {
                    matched += 1;
                    if self.peers[slot].config != *cfg {
                        changes.peers_changed += 1;
                        if let Some(flush) = self.update_peer(now, slot, cfg.clone()) {
                            flushes.push(flush);
                        }
                    }
                }
                None => {
                    changes.peers_changed += 1;
                    self.add_peer(now, cfg.clone());
                }
            }
        }
        if matched != old_count {
            // Something was removed: find what, with one pass over the new keys.
            let seen: BTreeSet<NodePublicKey> =
                valid.wireguard.peers.iter().map(|p| p.public_key).collect();
            let gone: Vec<PeerSlot> = self
                .by_key
                .iter()
                .filter(|(k, _)| !seen.contains(*k))
                .map(|(_, s)| *s)
                .collect();
            for slot in gone {
                changes.peers_changed += 1;
                self.remove_peer(slot);
            }
        }
        changes.sessions_flushed = flushes.len();
        self.finish_flushes(now, flushes);
        self.peer_order = valid
            .wireguard
            .peers
            .iter()
            .map(|p| self.by_key[&p.public_key])
            .collect();
        Ok(self.apply_parts(
            now,
            changes,
            valid.wireguard.listen_port,
            &valid.router,
            &valid.dns,
            &valid.knobs,
            &valid.primary_routes,
        ))
    }

    /// Phase two of disco-key flushes: re-add each peer with a fresh session.
    ///
    /// A flushed session the peer may still send on gets a handshake at
    /// once. Usually the flushed session is the one the peer lost when it
    /// restarted. But when the new key reaches us late (our control stream
    /// was down, or is slow), we and the restarted peer may already have
    /// made a session since; the flush drops it on our side only, and the
    /// peer's next packets would go to a session we no longer have until
    /// its no-reply rule re-handshakes 15 s later. Our handshake gives it
    /// the new session first (it moves to it on our confirmation, one round
    /// trip later). An older session is one the peer has expired too: that
    /// peer stays lazy, and handshakes on its first packet.
    pub(super) fn finish_flushes(&mut self, now: Instant, flushes: Vec<Flush>) {
        self.last_flush_count = flushes.len();
        for flush in flushes {
            let slot = flush.slot;
            self.counters.sessions_flushed += 1;
            let peer = self.peers[slot].config.public_key;
            self.outputs
                .push_back(Output::Event(Box::new(Event::SessionFlushed {
                    peer,
                    old_disco: flush.old_disco,
                    new_disco: flush.new_disco,
                })));
            self.configure_peer(now, slot, None);
            if flush.peer_may_hold_session {
                self.initiate_after_flush(now, slot);
            }
        }
        for (slot, mut staged) in std::mem::take(&mut self.flush_carry) {
            let Some(wg) = self.peers.get_mut(slot).and_then(|p| p.wg.as_mut()) else {
                self.discard_staged(&mut staged);
                continue;
            };
            wg.staged = staged;
            self.start_handshake_if_allowed(now, slot);
            self.reschedule_peer(slot);
        }
    }

    /// Compares and applies every part of a reconfig but the peers.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn apply_parts(
        &mut self,
        now: Instant,
        mut changes: ReconfigChanges,
        listen_port: u16,
        router: &RouterConfig,
        dns: &DnsConfig,
        knobs: &Knobs,
        primary_routes: &[IpNet],
    ) -> ReconfigOutcome {
        let applied = &self.applied;
        let first = !applied.have_config;
        changes.listen_port = first
            || applied.listen_port != listen_port
            || applied.knobs.randomize_client_port != knobs.randomize_client_port;
        changes.wireguard = changes.peers_changed > 0 || changes.listen_port;
        changes.router = first || applied.router != *router;
        changes.dns = first || applied.dns != *dns;
        changes.path_mtu = first || applied.knobs.path_mtu_discovery != knobs.path_mtu_discovery;
        changes.knobs = first || applied.knobs != *knobs;
        let is_subnet_router = overlaps(primary_routes, &router.advertised_routes);
        changes.subnet_router = first
            || applied.is_subnet_router != is_subnet_router
            || applied.knobs.bird_protocol != knobs.bird_protocol;
        let primary_changed = applied.primary_routes != primary_routes;

        if !changes.wireguard
            && !changes.router
            && !changes.dns
            && !changes.knobs
            && !changes.subnet_router
            && !primary_changed
        {
            self.counters.reconfigs_unchanged += 1;
            return ReconfigOutcome::NoChanges;
        }
        self.counters.reconfigs_applied += 1;

        if changes.listen_port {
            let port = if knobs.randomize_client_port {
                0
            } else {
                listen_port
            };
            self.outputs
                .push_back(Output::Effect(Box::new(Effect::SetListenPort(port))));
        }
        if changes.router {
            self.outputs
                .push_back(Output::Effect(Box::new(Effect::ApplyRouter(
                    router.clone(),
                ))));
        }
        if changes.dns {
            self.outputs
                .push_back(Output::Effect(Box::new(Effect::ApplyDns(dns.clone()))));
        }
        // A resolver inside a peer's AllowedIPs or a tunnel route is reached
        // through the tunnel: the DNS config belongs on the tunnel link.
        let dns_via_tunnel = dns.nameservers.iter().any(|ns| {
            self.routes.lookup(*ns).is_some() || router.routes.iter().any(|r| r.contains(ns))
        });
        if first || dns_via_tunnel != self.applied.dns_via_tunnel {
            self.outputs
                .push_back(Output::Effect(Box::new(Effect::SetDnsViaTunnel(
                    dns_via_tunnel,
                ))));
        }
        if changes.path_mtu {
            self.outputs
                .push_back(Output::Effect(Box::new(Effect::SetPathMtuDiscovery(
                    knobs.path_mtu_discovery,
                ))));
        }
        if changes.subnet_router {
            if let Some(old) = self
                .applied
                .knobs
                .bird_protocol
                .clone()
                .filter(|p| Some(p) != knobs.bird_protocol.as_ref())
            {
                if self.applied.is_subnet_router {
                    self.outputs
                        .push_back(Output::Effect(Box::new(Effect::SetBirdProtocol {
                            protocol: old,
                            enabled: false,
                        })));
                }
            }
            if let Some(protocol) = knobs.bird_protocol.clone() {
                self.outputs
                    .push_back(Output::Effect(Box::new(Effect::SetBirdProtocol {
                        protocol,
                        enabled: is_subnet_router,
                    })));
            }
        }
        let trimming = self
            .config
            .trim_override
            .unwrap_or(!knobs.keep_full_wg_config);
        self.applied = RunningConfig {
            have_config: true,
            listen_port,
            router: router.clone(),
            dns: dns.clone(),
            knobs: knobs.clone(),
            primary_routes: primary_routes.to_vec(),
            is_subnet_router,
            dns_via_tunnel,
        };
        if trimming != self.trimming {
            self.set_trimming(now, trimming);
        }
        ReconfigOutcome::Applied(changes)
    }

    /// Applies a peer delta ([`Input::PeerDelta`]) against the running state.
    pub(super) fn apply_delta(
        &mut self,
        now: Instant,
        delta: &PeerDelta,
    ) -> Result<ReconfigOutcome, ReconfigError> {
        let peers_before = self.peers.len();
        let changed = self.apply_peers(now, delta.upsert.clone(), &delta.remove, None)?;
        if !delta.remove.is_empty() || self.peers.len() != peers_before {
            // The peer list's order is unknown now: the next full reconfig
            // takes the keyed path and records the order again.
            self.peer_order.clear();
        }
        if changed == 0 {
            return Ok(ReconfigOutcome::NoChanges);
        }
        Ok(ReconfigOutcome::Applied(ReconfigChanges {
            wireguard: true,
            peers_changed: changed,
            sessions_flushed: self.last_flush_count,
            ..ReconfigChanges::default()
        }))
    }

    /// Validates and applies upserts and removals against the running state.
    /// With `replaced`, an upsert whose key belongs to a peer outside that set
    /// is a duplicate (a full reconfig lists each key once).
    pub(super) fn apply_peers(
        &mut self,
        now: Instant,
        upsert: Vec<PeerConfig>,
        remove: &[NodePublicKey],
        replaced: Option<&BTreeSet<PeerSlot>>,
    ) -> Result<usize, ReconfigError> {
        let mut normalized = upsert;
        let running = RunningView {
            engine: self,
            replaced,
        };
        check_peer_batch(
            &mut normalized,
            &self.node_key,
            &self.applied.router.local_addrs,
            Some(&running),
            remove,
        )?;
        let mut changed = 0;
        for key in remove {
            if let Some(&slot) = self.by_key.get(key) {
                self.remove_peer(slot);
                changed += 1;
            }
        }
        let mut flushes = Vec::new();
        for cfg in normalized {
            match self.by_key.get(&cfg.public_key).copied() {
                Some(slot) if self.peers[slot].config == cfg => {}
                Some(slot) => {
                    changed += 1;
                    if let Some(flush) = self.update_peer(now, slot, cfg) {
                        flushes.push(flush);
                    }
                }
                None => {
                    changed += 1;
                    self.add_peer(now, cfg);
                }
            }
        }
        self.finish_flushes(now, flushes);
        Ok(changed)
    }
}

/// The engine's peers as the peer-set rules see them.
struct RunningView<'a> {
    engine: &'a Engine,
    /// The slots a reconfig's changed positions replace, if that is the batch.
    replaced: Option<&'a BTreeSet<PeerSlot>>,
}

impl RunningPeers for RunningView<'_> {
    fn stays_outside_batch(&self, key: &NodePublicKey) -> bool {
        match (self.replaced, self.engine.by_key.get(key)) {
            (Some(replaced), Some(slot)) => !replaced.contains(slot),
            (None, _) | (_, None) => false,
        }
    }

    fn disco_owner(&self, disco: &DiscoPublicKey) -> Option<NodePublicKey> {
        let slot = *self.engine.by_disco.get(disco)?;
        Some(self.engine.peers[slot].config.public_key)
    }

    fn single_ip_owner(&self, net: &IpNet) -> Option<NodePublicKey> {
        let slot = self.engine.routes.owner_exact(net)?;
        Some(self.engine.peers[slot].config.public_key)
    }
}

pub(super) fn overlaps(a: &[IpNet], b: &[IpNet]) -> bool {
    a.iter()
        .any(|x| b.iter().any(|y| x.contains(y) || y.contains(x)))
}
