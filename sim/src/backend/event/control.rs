//! The coordination server on the event backend: the world's
//! [`ControlHost`](crate::world::control) and every node's client, with
//! their messages on the event queue. A message between a node and the
//! server takes the node's control latency (half its control delay) and is
//! lost like any datagram: to a node whose link is down, across a cut
//! between the node and the server (`control_partition`), or by the
//! network's loss.

use std::time::Duration;

use wgmesh_control::Policy;
use wgmesh_core::{Input, InputOutcome, NodePublicKey, ReconfigOutcome};

use super::queue::SimEvent;
use super::state::Tailnet;
use crate::trace::Category;
use crate::world::control::{
    Apply, ClientAction, FromControl, KEEPALIVE, LocalSettings, Outgoing, ToControl, control_key,
};

impl Tailnet {
    /// The one-way latency between node `i` and the server.
    pub(super) fn control_leg(&self, i: usize) -> Duration {
        self.nodes[i]
            .spec
            .control_delay
            .unwrap_or(self.network.control_delay)
            / 2
    }

    /// Why a message between node `i` and the server (toward the server
    /// when `toward_server`) is lost now, if it is.
    fn control_path_drop(&mut self, i: usize, toward_server: bool) -> Option<&'static str> {
        if !self.nodes[i].link_up {
            Some("link-down")
        } else if self.control_cut.contains(&i) {
            Some("partition")
        } else if self.control_lost(i, toward_server) {
            Some("loss")
        } else {
            None
        }
    }

    /// What node `i`'s client builds into its engine's config besides the netmap.
    fn local_settings(&self, i: usize) -> LocalSettings {
        LocalSettings {
            knobs: self.nodes[i].knobs.clone(),
            keepalives: self.keepalives.clone(),
            deltas_as_reconfig: false,
        }
    }

    /// Node `i` sends `message` to the server.
    fn send_to_control(&mut self, i: usize, message: ToControl) {
        let kind = message.kind();
        if let Some(why) = self.control_path_drop(i, true) {
            self.stats.control_lost += 1;
            self.log(
                Some(i),
                Category::Control,
                "to-control-drop",
                format!("{kind} {why}"),
            );
            return;
        }
        let at = self.now + self.control_leg(i);
        self.log(Some(i), Category::Control, "to-control", kind.to_string());
        self.push(
            at,
            SimEvent::ToControl {
                node: i,
                message: Box::new(message),
            },
        );
    }

    /// The server sends each message to its node.
    pub(super) fn send_control_messages(&mut self, outgoing: Vec<Outgoing>) {
        self.send_from_control(outgoing);
    }

    /// The server sends each message to its node.
    fn send_from_control(&mut self, outgoing: Vec<Outgoing>) {
        for (j, message) in outgoing {
            let (kind, size) = message.describe();
            if let Some(why) = self.control_path_drop(j, false) {
                self.stats.control_lost += 1;
                self.log(
                    Some(j),
                    Category::Control,
                    "from-control-drop",
                    format!("{kind} {size}B {why}"),
                );
                continue;
            }
            let at = self.now + self.control_leg(j);
            let incarnation = self.nodes[j].incarnation;
            self.push(
                at,
                SimEvent::FromControl {
                    node: j,
                    incarnation,
                    message: Box::new(message),
                },
            );
        }
    }

    /// A message from node `i` reaches the server.
    pub(super) fn control_arrival(&mut self, i: usize, message: ToControl) {
        let (outgoing, line) = self.control.handle(self.now, i, message);
        self.log(Some(i), Category::Control, "control", line);
        self.send_from_control(outgoing);
    }

    /// The server's keep-alives for every open stream, then the next round.
    pub(super) fn control_keepalive(&mut self) {
        let outgoing = self.control.keepalives();
        self.send_from_control(outgoing);
        let at = self.now + KEEPALIVE;
        self.push(at, SimEvent::ControlKeepalive);
    }

    /// Node `i`'s engine (re)started: its client connects with the engine's
    /// disco key and the node's endpoint.
    pub(super) fn client_start(&mut self, i: usize) {
        let disco = self.nodes[i].disco_public;
        let endpoints = self.own_endpoints(i);
        let now = self.now;
        let actions = self.nodes[i]
            .client
            .start(now, disco, endpoints, &self.control_auth_key);
        self.client_actions(i, actions);
    }

    /// Node `i` was killed: its connection to the server closes (the
    /// server sees the disconnect, as it would see the TCP connection end).
    pub(super) fn client_killed(&mut self, i: usize) {
        if let Some((epoch, stream)) = self.nodes[i].client.stream() {
            if epoch == self.control.epoch {
                let node_key = control_key(&self.nodes[i].public_key);
                self.send_to_control(i, ToControl::Disconnect { node_key, stream });
                self.control.forget_stream(i, stream);
            }
        }
    }

    /// Node `i` re-discovered its endpoints: its client reports them.
    pub(super) fn client_endpoints(&mut self, i: usize) {
        let endpoints = vec![self.nodes[i].endpoint];
        let now = self.now;
        let actions = self.nodes[i].client.endpoints_changed(now, endpoints);
        self.client_actions(i, actions);
    }

    /// A message from the server reaches node `i` (of `incarnation`).
    pub(super) fn client_message(&mut self, i: usize, incarnation: u64, message: FromControl) {
        let (kind, size) = message.describe();
        if self.nodes[i].incarnation != incarnation
            || self.nodes[i].engine.is_none()
            || !self.nodes[i].link_up
        {
            self.stats.control_dropped += 1;
            self.log(
                Some(i),
                Category::Control,
                "control-dropped",
                format!("{kind} {size}B: the connection is gone"),
            );
            return;
        }
        let local = self.local_settings(i);
        let now = self.now;
        let actions = self.nodes[i].client.on_message(now, message, &local);
        self.client_actions(i, actions);
    }

    /// Node `i`'s client deadline.
    pub(super) fn client_timer(&mut self, i: usize, incarnation: u64) {
        let n = &self.nodes[i];
        if n.incarnation != incarnation
            || n.engine.is_none()
            || n.client.deadline() != Some(self.now)
        {
            return;
        }
        let now = self.now;
        let actions = self.nodes[i].client.on_timer(now, &self.control_auth_key);
        self.client_actions(i, actions);
    }

    /// Carries out what node `i`'s client asked for, then re-arms its timer.
    pub(super) fn client_actions(&mut self, i: usize, actions: Vec<ClientAction>) {
        for action in actions {
            match action {
                ClientAction::Send(message) => self.send_to_control(i, message),
                ClientAction::Apply(apply) => self.apply_control(i, apply),
                ClientAction::Log(kind, line) => self.log(Some(i), Category::Control, kind, line),
            }
        }
        if let Some(at) = self.nodes[i].client.deadline() {
            if self.nodes[i].client_timer_at != Some(at) {
                self.nodes[i].client_timer_at = Some(at);
                let incarnation = self.nodes[i].incarnation;
                self.push(
                    at.max(self.now),
                    SimEvent::ClientTimer {
                        node: i,
                        incarnation,
                    },
                );
            }
        }
    }

    /// Gives node `i`'s engine what its client made of a netmap.
    fn apply_control(&mut self, i: usize, apply: Apply) {
        if self.nodes[i].engine.is_none() {
            self.stats.control_dropped += 1;
            return;
        }
        match apply {
            Apply::Filter(filter) => {
                let rules = filter.rules.len();
                self.feed(i, Input::SetPacketFilter(filter));
                self.log(
                    Some(i),
                    Category::Control,
                    "filter",
                    format!("{rules} accept rules"),
                );
            }
            Apply::Reconfig(reconfig) => {
                let subnet_peers: Vec<NodePublicKey> = reconfig
                    .wireguard
                    .as_ref()
                    .map(|wg| {
                        wg.peers
                            .iter()
                            .filter(|p| !p.is_trimmable())
                            .map(|p| p.public_key)
                            .collect()
                    })
                    .unwrap_or_default();
                let Some(result) = self.call_engine(i, |engine, now| {
                    engine.handle_input(now, Input::Reconfig(reconfig))
                }) else {
                    return;
                };
                if matches!(
                    result,
                    Ok(InputOutcome::Reconfig(ReconfigOutcome::Applied(_)))
                ) {
                    self.nodes[i].subnet_peers = subnet_peers;
                }
                self.engine_verdict(i, "reconfig", result);
            }
            Apply::Delta(delta) => {
                let upserted: Vec<(NodePublicKey, bool)> = delta
                    .upsert
                    .iter()
                    .map(|p| (p.public_key, !p.is_trimmable()))
                    .collect();
                let removed = delta.remove.clone();
                let Some(result) = self.call_engine(i, |engine, now| {
                    engine.handle_input(now, Input::PeerDelta(&delta))
                }) else {
                    return;
                };
                if result.is_ok() {
                    let subnet_peers = &mut self.nodes[i].subnet_peers;
                    subnet_peers.retain(|k| !removed.contains(k));
                    for (key, pinned) in upserted {
                        subnet_peers.retain(|k| *k != key);
                        if pinned {
                            subnet_peers.push(key);
                        }
                    }
                }
                self.engine_verdict(i, "peer-delta", result);
            }
        }
    }

    fn engine_verdict(
        &mut self,
        i: usize,
        kind: &'static str,
        result: Result<InputOutcome, wgmesh_core::InputError>,
    ) {
        let detail = match result {
            Ok(InputOutcome::Reconfig(ReconfigOutcome::NoChanges)) => {
                self.stats.reconfigs += 1;
                "no-changes".to_string()
            }
            Ok(InputOutcome::Reconfig(ReconfigOutcome::Applied(c))) => {
                self.stats.reconfigs += 1;
                format!(
                    "applied peers_changed={} flushed={}",
                    c.peers_changed, c.sessions_flushed
                )
            }
            Ok(other) => format!("{other:?}"),
            Err(e) => {
                self.stats.reconfigs_refused += 1;
                format!("refused: {e}")
            }
        };
        self.log(Some(i), Category::Control, kind, detail);
        self.drain(i);
    }

    /// Node `i`'s knobs changed: its client applies its netmap again with them.
    pub(super) fn reapply_local(&mut self, i: usize, incarnation: u64) {
        if self.nodes[i].incarnation != incarnation {
            return;
        }
        let local = self.local_settings(i);
        if let Some(apply) = self.nodes[i].client.reapply(&local) {
            self.apply_control(i, apply);
        }
    }

    /// Puts `policy` in force at the server now.
    pub(super) fn control_set_policy(&mut self, policy: Policy) {
        let (outgoing, line) = self.control.set_policy(self.now, policy);
        self.log(None, Category::Control, "policy", line);
        self.send_from_control(outgoing);
    }

    /// The server goes down for `downtime`: every stream closes.
    pub(super) fn control_down(&mut self, downtime: Duration) {
        let outgoing = self.control.stop();
        self.log(
            None,
            Category::Control,
            "control-down",
            format!("{} streams closed", outgoing.len()),
        );
        self.send_from_control(outgoing);
        let at = self.now + downtime;
        let epoch = self.control.epoch;
        self.push(at, SimEvent::ControlUp { epoch });
    }

    /// The server starts again from its stored records.
    pub(super) fn control_up(&mut self, epoch: u64) {
        if self.control.epoch != epoch || self.control.is_up() {
            return;
        }
        let line = self.control.start(self.now);
        self.log(None, Category::Control, "control-up", line);
    }
}
