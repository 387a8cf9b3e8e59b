//! Link changes, status snapshots, packet capture and close.

use std::time::Instant;

use tracing::info;

use super::Engine;
use super::slot::PeerSlot;
use crate::api::*;
use crate::config::{DnsConfig, RouterConfig};

impl Engine {
    pub(super) fn link_change(&mut self, change: LinkChange) {
        self.outputs
            .push_back(Output::Effect(Box::new(Effect::SetNetworkUp(
                change.any_link_up,
            ))));
        let was_up = self.network_up;
        // While no link is up no disco message leaves (see
        // `run_disco_actions`): heartbeats and path pings pause.
        self.network_up = change.any_link_up;
        if !change.any_link_up {
            self.counters.link_changes_down += 1;
            // What the OS resolver cached was learnt over links that are
            // gone (the reference flushes on the same transition).
            if was_up {
                info!("all links down; pausing disco and flushing DNS caches");
                self.outputs
                    .push_back(Output::Effect(Box::new(Effect::FlushDnsCaches)));
            }
            return;
        }
        if !was_up && !change.major {
            // Back from "all links down": what was learnt about the paths
            // is stale, so every active peer's candidates are pinged again
            // now rather than at the next heartbeat. (A major change resets
            // the paths below, which pings them too.)
            info!("a link is up again; resuming disco");
            let actions = self.disco.ping_active_peers(self.now, &mut self.rng);
            self.run_disco_actions(self.now, actions);
        }
        // Our own endpoints are asked for again (STUN): a major change
        // forgets the reflexive address first.
        self.rediscover_endpoints(self.now, change.major);
        if change.major {
            self.counters.link_changes_major += 1;
            info!("major link change");
            self.outputs
                .push_back(Output::Effect(Box::new(Effect::FlushDnsCaches)));
            if self.applied.have_config {
                self.outputs
                    .push_back(Output::Effect(Box::new(Effect::ApplyDns(
                        self.applied.dns.clone(),
                    ))));
            }
            self.outputs
                .push_back(Output::Effect(Box::new(Effect::Rebind)));
            self.outputs
                .push_back(Output::Effect(Box::new(Effect::ReDiscoverEndpoints {
                    reason: "link-change-major",
                })));
            let actions = self.disco.reset_paths(self.now, &mut self.rng);
            self.run_disco_actions(self.now, actions);
        } else {
            self.counters.link_changes_minor += 1;
            self.outputs
                .push_back(Output::Effect(Box::new(Effect::ReDiscoverEndpoints {
                    reason: "link-change-minor",
                })));
        }
    }

    /// Takes over `previous`'s current health problems, each with when it
    /// was first reported. The daemon replaces its engine when the private
    /// key changes, and the OS's problems (a route the kernel refuses, a
    /// read-only resolv.conf) do not go away with the key: without this the
    /// new engine would show a healthy node until each fails again.
    pub fn carry_health_from(&mut self, previous: &Engine) {
        self.health = previous.health.clone();
    }

    /// Keeps the reported problem of a subsystem, or clears it. A report
    /// repeating the current problem keeps its first time, so status says
    /// since when the subsystem has been failing.
    pub(super) fn record_health(&mut self, now: Instant, report: HealthReport) {
        let subsystem = report.subsystem;
        match report.problem {
            None => {
                if self.health.remove(&subsystem).is_some() {
                    info!(subsystem = subsystem.as_str(), "health problem cleared");
                }
            }
            Some(problem) => {
                if self.health.get(&subsystem).map(|(p, _)| p) == Some(&problem) {
                    return;
                }
                self.counters.health_problems_reported += 1;
                info!(
                    subsystem = subsystem.as_str(),
                    severity = problem.severity.as_str(),
                    reason = %problem.reason,
                    "health problem"
                );
                self.health.insert(subsystem, (problem, now));
            }
        }
    }

    pub(super) fn build_status(&self) -> Status {
        let peers = self
            .by_key
            .values()
            .map(|&slot| {
                let p = &self.peers[slot];
                let endpoint = self
                    .disco
                    .best_endpoint(slot)
                    .or(p.wg.as_ref().and_then(|w| w.endpoint));
                PeerStatus {
                    node_key: p.config.public_key,
                    disco_key: p.config.disco_key,
                    name: p.config.name.clone(),
                    allowed_ips: p.config.allowed_ips.clone(),
                    configured: p.wg.is_some(),
                    endpoint,
                    via_relay: endpoint.is_some()
                        && endpoint == self.nat.relays.get(&p.config.public_key).copied(),
                    last_handshake_ago: p
                        .wg
                        .as_ref()
                        .and_then(|w| w.timers.last_handshake())
                        .map(|t| self.now.saturating_duration_since(t)),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    persistent_keepalive_secs: p.config.persistent_keepalive_secs,
                }
            })
            .collect();
        Status {
            node_key: self.node_key,
            disco_key: self.disco_key,
            listen_port: self.applied.listen_port,
            local_addrs: self.applied.router.local_addrs.clone(),
            endpoints: self.endpoints.endpoints().to_vec(),
            peers,
            relay_count: 0,
            relay: None,
            configured_peers: self.configured_count,
            full_config_peers: self.peers.len(),
            counters: self.counters.clone(),
            health: self
                .health
                .iter()
                .map(|(&subsystem, (problem, since))| HealthIssue {
                    subsystem,
                    problem: problem.clone(),
                    since_ago: self.now.saturating_duration_since(*since),
                })
                .collect(),
        }
    }

    pub(super) fn close(&mut self) {
        info!("closing engine");
        // 1. Every pending ping ends.
        for result in self.pings.drain_closed() {
            self.counters.pings_failed += 1;
            self.outputs.push_back(Output::PingResult(Box::new(result)));
        }
        self.opens.clear();
        // 2. Peers leave WireGuard.
        let slots: Vec<PeerSlot> = self.by_key.values().copied().collect();
        for slot in slots {
            self.unconfigure_peer(slot, RemoveReason::Closed);
        }
        // 3. The OS is given back its routes and DNS.
        if self.applied.have_config {
            self.outputs
                .push_back(Output::Effect(Box::new(Effect::ApplyRouter(
                    RouterConfig::default(),
                ))));
            self.outputs
                .push_back(Output::Effect(Box::new(Effect::ApplyDns(
                    DnsConfig::default(),
                ))));
            if self.applied.is_subnet_router {
                if let Some(protocol) = self.applied.knobs.bird_protocol.clone() {
                    self.outputs
                        .push_back(Output::Effect(Box::new(Effect::SetBirdProtocol {
                            protocol,
                            enabled: false,
                        })));
                }
            }
        }
        self.closed = true;
    }

    pub(super) fn capture_packet(&mut self, now: Instant, outbound: bool, packet: &[u8]) {
        self.outputs.push_back(Output::Capture(CapturedPacket {
            outbound,
            at: now,
            packet: packet.to_vec(),
        }));
    }
}
