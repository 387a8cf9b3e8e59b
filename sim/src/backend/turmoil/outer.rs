//! The turmoil backend's outer loop, one step at a time: restarts through
//! `Sim::bounce`, scenario actions (those on the simulation itself directly,
//! those on a node as commands to its agent), and `peer` probes; the
//! coordination server's messages run in `control`.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::shared::{Cmd, SharedRef, lock, send};
use crate::evaluate::Labels;
use crate::scenario::{Action, ActionKind, ExpectKind, Scenario};
use crate::trace::Category;
use crate::world::address::{FLOW_PORT, tailnet_source};
use crate::world::records::{FlowRecord, PingRecord, StreamRecord};
use crate::world::spec::{LinkKind, NodeId, set_knob};

/// What the outer loop keeps between steps.
pub(super) struct Outer<'a> {
    /// The scenario being run.
    pub(super) scenario: &'a Scenario,
    /// The turmoil simulation.
    pub(super) sim: turmoil::Sim<'a>,
    /// The state shared with the hosts.
    pub(super) shared: SharedRef,
    /// Where labelled actions ended up in the records.
    pub(super) labels: Labels,
    /// Every node's turmoil address, by index.
    pub(super) addresses: Vec<IpAddr>,
    /// The pairs a `partition` action cut (by host name), until `heal`.
    partitions: Vec<(String, String)>,
    /// Hosts to bounce (restart) at the next step.
    bounces: Vec<String>,
    /// Nodes whose link is down (cut from everyone).
    down: Vec<usize>,
}

impl<'a> Outer<'a> {
    /// The loop's state for `sim`, whose hosts are already registered.
    pub(super) fn new(scenario: &'a Scenario, sim: turmoil::Sim<'a>, shared: SharedRef) -> Self {
        let addresses = scenario
            .nodes
            .iter()
            .map(|s| sim.lookup(s.name.as_str()))
            .collect();
        Self {
            scenario,
            sim,
            shared,
            labels: Labels::default(),
            addresses,
            partitions: Vec::new(),
            bounces: Vec::new(),
            down: Vec::new(),
        }
    }

    /// Restarts the hosts whose engines were closed in the previous step.
    pub(super) fn bounce_restarted(&mut self) {
        for name in self.bounces.drain(..) {
            self.sim.bounce(name.as_str());
        }
    }

    /// Asks a node about a peer for the `peer` expectation `index`.
    pub(super) fn probe(&self, index: usize) {
        if let ExpectKind::Peer { node, peer, .. } = self.scenario.expects[index].kind {
            let key = lock(&self.shared).keys[peer].public_key();
            send(
                &self.shared,
                node,
                Cmd::Probe {
                    expect: index,
                    peer: key,
                },
            );
        }
    }

    /// Applies one scenario action at `now`.
    pub(super) fn apply(&mut self, action: &Action, now: Duration) {
        match &action.kind {
            ActionKind::Send {
                from,
                to,
                count,
                interval,
                size,
            } => {
                let mut s = lock(&self.shared);
                let index = s.streams.len();
                let dst = to.ip();
                s.streams.push(StreamRecord::new(
                    action.label.clone(),
                    NodeId(*from),
                    dst,
                    *count,
                    *interval,
                    *size,
                ));
                s.log(
                    Some(*from),
                    Category::Action,
                    "send",
                    format!("stream #{index} -> {dst} count={count}"),
                );
                drop(s);
                if let Some(l) = &action.label {
                    self.labels.streams.insert(l.clone(), index);
                }
                send(&self.shared, *from, Cmd::Stream { index });
            }
            ActionKind::Ping {
                from,
                to,
                kind,
                size,
            } => {
                let mut s = lock(&self.shared);
                let index = s.pings.len();
                let ip = to.ip();
                s.pings.push(PingRecord::new(
                    action.label.clone(),
                    NodeId(*from),
                    ip,
                    *kind,
                    now,
                    0,
                ));
                s.log(
                    Some(*from),
                    Category::Ping,
                    "ping",
                    format!("#{index} {} {ip}", kind.as_str()),
                );
                drop(s);
                if let Some(l) = &action.label {
                    self.labels.pings.insert(l.clone(), index);
                }
                send(
                    &self.shared,
                    *from,
                    Cmd::Ping {
                        index,
                        ip,
                        kind: *kind,
                        size: *size,
                    },
                );
            }
            ActionKind::Restart { node, .. } => {
                let mut s = lock(&self.shared);
                s.log(Some(*node), Category::Action, "restart", String::new());
                s.client_killed(*node);
                drop(s);
                send(&self.shared, *node, Cmd::Close);
                // Nothing more reaches the old incarnation's agent.
                lock(&self.shared).cmds[*node] = None;
                self.bounces.push(self.scenario.nodes[*node].name.clone());
            }
            ActionKind::Partition { a, b } => {
                for x in a {
                    for y in b {
                        let (x, y) = (
                            self.scenario.nodes[*x].name.clone(),
                            self.scenario.nodes[*y].name.clone(),
                        );
                        self.sim.partition(x.as_str(), y.as_str());
                        self.partitions.push((x, y));
                    }
                }
                lock(&self.shared).log(None, Category::Action, "partition", String::new());
            }
            ActionKind::Heal => {
                for (x, y) in self.partitions.drain(..) {
                    self.sim.repair(x.as_str(), y.as_str());
                }
                let mut s = lock(&self.shared);
                s.control.cut.clear();
                s.log(None, Category::Action, "heal", String::new());
            }
            ActionKind::Idle { note } => {
                lock(&self.shared).log(None, Category::Action, "idle", note.clone())
            }
            ActionKind::LinkChange { node, link } => {
                let i = *node;
                let name = self.scenario.nodes[i].name.clone();
                let others: Vec<String> = (0..self.scenario.nodes.len())
                    .filter(|&j| j != i)
                    .map(|j| self.scenario.nodes[j].name.clone())
                    .collect();
                let up = *link != LinkKind::Down;
                if !up && !self.down.contains(&i) {
                    self.down.push(i);
                    for o in &others {
                        self.sim.partition(name.as_str(), o.as_str());
                    }
                }
                if up && self.down.contains(&i) {
                    self.down.retain(|&d| d != i);
                    for o in &others {
                        let cut = self
                            .partitions
                            .iter()
                            .any(|(x, y)| (*x == name && y == o) || (x == o && *y == name));
                        if !cut {
                            self.sim.repair(name.as_str(), o.as_str());
                        }
                    }
                }
                let mut s = lock(&self.shared);
                if up {
                    s.control.down.remove(&i);
                } else {
                    s.control.down.insert(i);
                }
                if *link == LinkKind::Major {
                    let port = s.ports[i] + 1;
                    s.next_ports[i].store(port, Ordering::Relaxed);
                    s.pending_move[i] = Some(port);
                }
                s.log(
                    Some(i),
                    Category::Action,
                    "link-change",
                    link.as_str().to_string(),
                );
                drop(s);
                let change = wgmesh_core::LinkChange {
                    any_link_up: up,
                    major: *link == LinkKind::Major,
                };
                send(&self.shared, i, Cmd::Link(change));
            }
            ActionKind::Flow {
                from,
                to,
                size,
                response_size,
            } => {
                let mut s = lock(&self.shared);
                let index = s.flows.len();
                let dst = to.ip();
                s.flows.push(FlowRecord::new(
                    action.label.clone(),
                    NodeId(*from),
                    index,
                    tailnet_source(*from, dst),
                    dst,
                    *size,
                    *response_size,
                    now,
                ));
                s.log(
                    Some(*from),
                    Category::Action,
                    "flow",
                    format!("flow #{index} -> {dst}:{FLOW_PORT}"),
                );
                drop(s);
                if let Some(l) = &action.label {
                    self.labels.flows.insert(l.clone(), index);
                }
                send(&self.shared, *from, Cmd::Flow { index });
            }
            ActionKind::SetKnob { node, knob, value } => {
                let mut s = lock(&self.shared);
                for j in 0..self.scenario.nodes.len() {
                    if node.is_none_or(|x| x == j) {
                        set_knob(&mut s.control.local[j].knobs, knob, *value);
                        s.client_reapply_later(j);
                    }
                }
                s.log(None, Category::Action, "set-knobs", knob.clone());
            }
            ActionKind::SetPolicy { policy } => {
                let mut s = lock(&self.shared);
                s.log(None, Category::Action, "set-policy", String::new());
                match wgmesh_control::Policy::parse(policy, "policy") {
                    Ok(policy) => s.control_set_policy(policy),
                    // Checked when the scenario was loaded.
                    Err(e) => s.log(None, Category::Action, "policy-refused", e.to_string()),
                }
            }
            ActionKind::ControlRestart { downtime } => {
                let mut s = lock(&self.shared);
                s.log(None, Category::Action, "control-restart", String::new());
                s.control_down(*downtime);
            }
            ActionKind::ControlPartition { nodes } => {
                let mut s = lock(&self.shared);
                s.control.cut.extend(nodes.iter().copied());
                s.log(None, Category::Action, "control-partition", String::new());
            }
            // Refused before the run starts (see `run`).
            ActionKind::SetAllowedIps { .. } => {}
        }
    }
}
