//! The coordination server on the turmoil backend: the world's
//! [`ControlHost`] and every node's [`ControlClient`] run beside turmoil's
//! hosts, in the outer loop, with their messages on a queue of their own that
//! the loop drains every tick. A message takes the node's control latency
//! (half its control delay) and is lost to a node whose link is down or
//! that is cut from the server, or to the network's random loss (drawn by
//! the network model, as on the event backend).
//!
//! The production driver takes whole reconfigs (it has no peer-delta
//! request yet), so on this backend a client applies every change of its
//! netmap as a full reconfig; the engine's diff then changes the same peers
//! a peer delta would.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use wgmesh_control::Policy;

use super::shared::{Cmd, Shared};
use crate::trace::Category;
use crate::world::address::{tailnet_ip4, tailnet_ip6};
use crate::world::control::{
    AllowedIpsChange, ClientAction, ControlClient, ControlHost, FromControl, KEEPALIVE,
    LocalSettings, Outgoing, ToControl, control_key,
};

/// A message on its way.
pub(super) enum Msg {
    /// From node `.0` to the server.
    ToControl(usize, ToControl),
    /// From the server to node `node` (its engine `incarnation`).
    FromControl {
        node: usize,
        incarnation: u64,
        message: FromControl,
    },
    /// Node `.0` applies its netmap again (its knobs changed).
    Reapply(usize),
}

/// The server, the clients and what is on its way between them.
pub(super) struct ControlPlane {
    pub(super) host: ControlHost,
    pub(super) auth_key: String,
    pub(super) clients: Vec<ControlClient>,
    /// Each node's one-way latency to the server.
    pub(super) legs: Vec<Duration>,
    /// Nodes cut from the server.
    pub(super) cut: BTreeSet<usize>,
    /// Nodes whose link is down.
    pub(super) down: BTreeSet<usize>,
    /// Each node's settings that are not control's.
    pub(super) local: Vec<LocalSettings>,
    queue: BTreeMap<(Duration, u64), Msg>,
    seq: u64,
    next_keepalive: Duration,
    /// When the server comes back, and the incarnation it comes back from.
    up_at: Option<(Duration, u64)>,
}

impl ControlPlane {
    pub(super) fn new(
        host: ControlHost,
        clients: Vec<ControlClient>,
        legs: Vec<Duration>,
        local: Vec<LocalSettings>,
    ) -> Self {
        Self {
            auth_key: host.auth_key().to_string(),
            host,
            clients,
            legs,
            cut: BTreeSet::new(),
            down: BTreeSet::new(),
            local,
            queue: BTreeMap::new(),
            seq: 0,
            next_keepalive: KEEPALIVE,
            up_at: None,
        }
    }

    fn push(&mut self, at: Duration, msg: Msg) {
        self.seq += 1;
        self.queue.insert((at, self.seq), msg);
    }

    fn blocked(&self, i: usize) -> Option<&'static str> {
        if self.down.contains(&i) {
            Some("link-down")
        } else if self.cut.contains(&i) {
            Some("partition")
        } else {
            None
        }
    }
}

impl Shared {
    /// Why a message between node `i` and the server (toward the server
    /// when `toward_server`) is lost now, if it is: the same reasons in the
    /// same order as on the event backend, so the loss draws line up.
    fn control_path_drop(&mut self, i: usize, toward_server: bool) -> Option<&'static str> {
        self.control.blocked(i).or_else(|| {
            self.fabric
                .as_mut()
                .is_some_and(|f| f.control_lost(i, toward_server))
                .then_some("loss")
        })
    }

    /// Node `i` sends `message` to the server.
    fn send_to_control(&mut self, i: usize, message: ToControl) {
        let kind = message.kind();
        if let Some(why) = self.control_path_drop(i, true) {
            self.log(
                Some(i),
                Category::Control,
                "to-control-drop",
                format!("{kind} {why}"),
            );
            return;
        }
        let at = self.now + self.control.legs[i];
        self.log(Some(i), Category::Control, "to-control", kind.to_string());
        self.control.push(at, Msg::ToControl(i, message));
    }

    /// The server sends each message to its node.
    fn send_from_control(&mut self, outgoing: Vec<Outgoing>) {
        for (j, message) in outgoing {
            let (kind, size) = message.describe();
            if let Some(why) = self.control_path_drop(j, false) {
                self.log(
                    Some(j),
                    Category::Control,
                    "from-control-drop",
                    format!("{kind} {size}B {why}"),
                );
                continue;
            }
            let at = self.now + self.control.legs[j];
            let incarnation = self.incarnation[j];
            self.control.push(
                at,
                Msg::FromControl {
                    node: j,
                    incarnation,
                    message,
                },
            );
        }
    }

    /// Carries out what node `i`'s client asked for.
    pub(super) fn client_actions(&mut self, i: usize, actions: Vec<ClientAction>) {
        for action in actions {
            match action {
                ClientAction::Send(message) => self.send_to_control(i, message),
                ClientAction::Apply(apply) => {
                    if let Some(tx) = &self.cmds[i] {
                        let _ = tx.send(Cmd::Apply(apply));
                    }
                }
                ClientAction::Log(kind, line) => self.log(Some(i), Category::Control, kind, line),
            }
        }
    }

    /// Node `i`'s engine started with its current disco key at `endpoint`.
    ///
    /// The client starts at the instant the node came back (`up_at`: the
    /// restart plus its downtime), not at the tick turmoil ran the host
    /// again, which is one tick later for a restart without downtime (the
    /// old engine's `Close` needs that step). Its first message then reaches
    /// the server when it does on the event backend, and the server's
    /// answers and deltas land at the same instants on both backends, where
    /// the same-instant order (control before stream datagrams) decides
    /// which datagram still goes the old way.
    pub(super) fn client_start(&mut self, i: usize, endpoint: SocketAddr) {
        let disco = self.disco[i].public_key();
        let tick_now = self.now;
        let started = self.up_at[i].min(tick_now);
        self.now = started;
        let auth_key = self.control.auth_key.clone();
        let endpoints = if self.models_endpoints() {
            self.own_endpoints(i)
        } else {
            vec![endpoint]
        };
        let actions = self.control.clients[i].start(started, disco, endpoints, &auth_key);
        self.client_actions(i, actions);
        self.now = tick_now;
    }

    /// Node `i` was killed: the server sees its connection close.
    pub(super) fn client_killed(&mut self, i: usize) {
        if let Some((epoch, stream)) = self.control.clients[i].stream() {
            if epoch == self.control.host.epoch {
                let node_key = control_key(&self.keys[i].public_key());
                self.send_to_control(i, ToControl::Disconnect { node_key, stream });
                self.control.host.forget_stream(i, stream);
            }
        }
    }

    /// Node `i` moved to `endpoint`: its client reports it.
    pub(super) fn client_endpoint(&mut self, i: usize, endpoint: SocketAddr) {
        let actions = self.control.clients[i].endpoints_changed(self.now, vec![endpoint]);
        self.client_actions(i, actions);
    }

    /// Node `i`'s knobs changed: it applies its netmap again after its
    /// control delay.
    pub(super) fn client_reapply_later(&mut self, i: usize) {
        let at = self.now + self.control.legs[i] * 2;
        self.control.push(at, Msg::Reapply(i));
    }

    /// Puts `policy` in force at the server.
    pub(super) fn control_set_policy(&mut self, policy: Policy) {
        let now = self.now;
        let (outgoing, line) = self.control.host.set_policy(now, policy);
        self.log(None, Category::Control, "policy", line);
        self.send_from_control(outgoing);
    }

    /// The `set_allowed_ips` action, as on the event backend: node `i` keeps
    /// its own addresses, and the admin approves the other listed prefixes
    /// as its routes at the server, which pushes the change to its peers (a
    /// prefix the node does not advertise is refused, and the trace says
    /// so). Its OS then answers for those prefixes, when the server took
    /// them (a refused change leaves the world as control describes it).
    pub(super) fn control_set_allowed_ips(&mut self, i: usize, allowed_ips: &[IpNet]) {
        let AllowedIpsChange { detail, routes, .. } =
            AllowedIpsChange::new(allowed_ips, tailnet_ip4(i), tailnet_ip6(i));
        self.log(Some(i), Category::Action, "set-allowed-ips", detail);
        let key = control_key(&self.keys[i].public_key());
        let now = self.now;
        let (outgoing, line, accepted) = self.control.host.approve_routes(now, key, routes.clone());
        self.log(Some(i), Category::Control, "approve-routes", line);
        if accepted {
            self.subnets[i] = routes;
        }
        self.send_from_control(outgoing);
    }

    /// The server goes down for `downtime`.
    pub(super) fn control_down(&mut self, downtime: Duration) {
        let outgoing = self.control.host.stop();
        let line = format!("{} streams closed", outgoing.len());
        self.log(None, Category::Control, "control-down", line);
        self.send_from_control(outgoing);
        self.control.up_at = Some((self.now + downtime, self.control.host.epoch));
    }

    /// Everything of the control plane that is due by now: the server's
    /// restart, messages, keep-alives and client deadlines.
    pub(super) fn control_tick(&mut self) {
        let now = self.now;
        if let Some((at, epoch)) = self.control.up_at {
            if at <= now {
                self.control.up_at = None;
                if self.control.host.epoch == epoch && !self.control.host.is_up() {
                    let line = self.control.host.start(now);
                    self.log(None, Category::Control, "control-up", line);
                }
            }
        }
        while let Some(entry) = self.control.queue.first_entry() {
            if entry.key().0 > now {
                break;
            }
            match entry.remove() {
                Msg::ToControl(i, message) => {
                    let (outgoing, line) = self.control.host.handle(now, i, message);
                    self.log(Some(i), Category::Control, "control", line);
                    self.send_from_control(outgoing);
                }
                Msg::FromControl {
                    node,
                    incarnation,
                    message,
                } => {
                    if self.incarnation[node] != incarnation
                        || self.cmds[node].is_none()
                        || self.control.down.contains(&node)
                    {
                        let (kind, size) = message.describe();
                        self.log(
                            Some(node),
                            Category::Control,
                            "control-dropped",
                            format!("{kind} {size}B: the connection is gone"),
                        );
                        continue;
                    }
                    let local = self.control.local[node].clone();
                    let actions = self.control.clients[node].on_message(now, message, &local);
                    self.client_actions(node, actions);
                }
                Msg::Reapply(i) => {
                    let local = self.control.local[i].clone();
                    if let Some(apply) = self.control.clients[i].reapply(&local) {
                        self.client_actions(i, vec![ClientAction::Apply(apply)]);
                    }
                }
            }
        }
        if self.control.next_keepalive <= now {
            self.control.next_keepalive = now + KEEPALIVE;
            let outgoing = self.control.host.keepalives();
            self.send_from_control(outgoing);
        }
        let auth_key = self.control.auth_key.clone();
        for i in 0..self.control.clients.len() {
            if self.control.clients[i].deadline().is_some_and(|d| d <= now)
                && self.cmds[i].is_some()
            {
                let actions = self.control.clients[i].on_timer(now, &auth_key);
                self.client_actions(i, actions);
            }
        }
    }
}
