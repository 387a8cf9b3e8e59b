//! The turmoil backend's outer loop, one step at a time: restarts through
//! `Sim::bounce`, scenario actions (those on the simulation itself directly,
//! those on a node as commands to its agent), and `peer` probes; the
//! coordination server's messages run in `control`.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use wgmesh_core::PingOutcome;

use super::shared::{Cmd, SharedRef, lock, send};
use crate::evaluate::Labels;
use crate::scenario::{Action, ActionKind, ExpectKind, Scenario};
use crate::trace::Category;
use crate::world::address::{FLOW_PORT, tailnet_source};
use crate::world::records::{FlowRecord, FlowState, PingRecord, StreamRecord};
use crate::world::spec::{LinkKind, NodeId, set_knob};
use crate::world::traffic::{FLOW_INITIAL_RTO, FLOW_MAX_ATTEMPTS, flow_segment, stream_datagram};

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
    /// The (from, to) pairs a one-way `partition` cut, until `heal`.
    one_way_partitions: Vec<(String, String)>,
    /// Restarted nodes to bring back up (`Sim::bounce`) once their
    /// downtime is over: (when, when it was restarted, node).
    bounces: Vec<(Duration, Duration, usize)>,
    /// Streams with datagrams still to send: (when the next is due, stream).
    /// The outer loop sends them, as the event backend's queue does, so a
    /// stream goes on (its datagrams lost) while its sender is down.
    streams_due: Vec<(Duration, usize)>,
    /// Flow retransmission timers: (when, flow, the attempt it ends).
    flow_timers: Vec<(Duration, usize, u32)>,
    /// Nodes whose link is down (cut from everyone).
    down: Vec<usize>,
}

impl<'a> Outer<'a> {
    /// The loop's state for `sim`, whose hosts are already registered.
    pub(super) fn new(scenario: &'a Scenario, sim: turmoil::Sim<'a>, shared: SharedRef) -> Self {
        let addresses: Vec<IpAddr> = scenario
            .nodes
            .iter()
            .map(|s| sim.lookup(s.name.as_str()))
            .collect();
        lock(&shared).addresses = addresses.clone();
        Self {
            scenario,
            sim,
            shared,
            labels: Labels::default(),
            addresses,
            partitions: Vec::new(),
            one_way_partitions: Vec::new(),
            bounces: Vec::new(),
            streams_due: Vec::new(),
            flow_timers: Vec::new(),
            down: Vec::new(),
        }
    }

    /// Brings up the restarted nodes whose downtime is over by `now`. The
    /// old engine's `Close` needs one step to run, so a restart without
    /// downtime brings the host up one tick (1 ms) later; control still
    /// counts the node as up from the restart's instant plus its downtime
    /// (`Shared::up_at`), as on the event backend.
    pub(super) fn bounce_restarted(&mut self, now: Duration) {
        let (due, later): (Vec<_>, Vec<_>) = self
            .bounces
            .iter()
            .partition(|(at, restarted, _)| *at <= now && *restarted < now);
        self.bounces = later;
        for (at, _, i) in due {
            lock(&self.shared).up_at[i] = at;
            self.sim.bounce(self.scenario.nodes[i].name.as_str());
        }
    }

    /// Sends the stream datagrams and fires the flow timers due by `now`.
    pub(super) fn stream_ticks(&mut self, now: Duration) {
        // Earliest first, so two streams interleave as they do on the event
        // backend; a stream faster than the tick sends every datagram due
        // by now, not one per tick.
        while let Some((k, _)) = self
            .streams_due
            .iter()
            .enumerate()
            .filter(|(_, (at, _))| *at <= now)
            .min_by_key(|(_, (at, index))| (*at, *index))
        {
            let (at, index) = self.streams_due.remove(k);
            self.stream_tick(index, at, now);
        }
        while let Some(k) = self.flow_timers.iter().position(|(at, ..)| *at <= now) {
            let (_, index, attempt) = self.flow_timers.remove(k);
            self.flow_timer(index, attempt, now);
        }
    }

    /// Sends the next datagram of stream `index`, which was due at `due`
    /// (lost when its sender is down), and schedules the one after. The
    /// datagram enters the TUN at this tick (`now`), and the next one is
    /// due one interval after this one was, so a stream keeps its rate
    /// whatever the interval's remainder against the 1 ms tick.
    fn stream_tick(&mut self, index: usize, due: Duration, now: Duration) {
        let mut s = lock(&self.shared);
        let record = &mut s.streams[index];
        if record.remaining == 0 {
            return;
        }
        record.remaining -= 1;
        let seq = record.sent.len() as u64;
        record.sent.push(now);
        record.delivered.push(None);
        let (from, dst, size) = (record.from.0, record.dst, record.size);
        if record.remaining > 0 {
            self.streams_due.push((due + record.interval, index));
        }
        drop(s);
        let mut packet = Vec::new();
        if stream_datagram(
            tailnet_source(from, dst),
            dst,
            index,
            seq,
            size,
            &mut packet,
        ) {
            send(&self.shared, from, Cmd::Datagram(packet));
        }
    }

    /// Flow `index`'s timer for `attempt`: a retransmission, or the end
    /// after the last attempt, as on the event backend.
    fn flow_timer(&mut self, index: usize, attempt: u32, now: Duration) {
        let mut s = lock(&self.shared);
        let flow = &mut s.flows[index];
        if flow.attempt != attempt || matches!(flow.state, FlowState::Done | FlowState::Failed) {
            return;
        }
        let from = flow.from.0;
        if attempt + 1 >= FLOW_MAX_ATTEMPTS {
            flow.state = FlowState::Failed;
            flow.finished = Some(now);
            let detail = format!(
                "flow #{index} to {} failed after {} attempts",
                flow.dst,
                attempt + 1
            );
            s.log(Some(from), Category::Traffic, "flow-failed", detail);
            return;
        }
        flow.attempt += 1;
        flow.retransmits += 1;
        let next = flow.attempt;
        self.flow_timers
            .push((now + FLOW_INITIAL_RTO * (1 << next), index, next));
        let segment = flow_segment(
            flow.state,
            flow.src,
            flow.dst,
            flow.request_size,
            flow.response_size,
        );
        drop(s);
        if let Some(segment) = segment {
            send(&self.shared, from, Cmd::Datagram(segment));
        }
    }

    /// Takes the flow timers the hosts started (a flow that moved to its
    /// request) into the loop's list.
    pub(super) fn collect_flow_timers(&mut self) {
        let started = std::mem::take(&mut lock(&self.shared).flow_timers);
        self.flow_timers.extend(started);
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

    /// Restarts `node` at `now`: its engine closes, and `Sim::bounce`
    /// brings it back after `downtime`.
    fn restart(&mut self, node: usize, downtime: Duration, now: Duration) {
        let mut s = lock(&self.shared);
        s.log(Some(node), Category::Action, "restart", String::new());
        s.client_killed(node);
        drop(s);
        send(&self.shared, node, Cmd::Close);
        // Until it is back, commands to the node are lost (the old agent
        // would hand them to a closed driver).
        lock(&self.shared).cmds[node] = None;
        self.bounces.push((now + downtime, now, node));
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
                // The first datagram leaves now, as on the event backend;
                // the rest keep the action's own schedule (`action.at`,
                // which may fall between two ticks).
                self.stream_tick(index, action.at.min(now), now);
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
                if let Some(l) = &action.label {
                    self.labels.pings.insert(l.clone(), index);
                }
                if s.cmds[*from].is_none() {
                    // The node is down (restarting): the ping fails at once,
                    // as on the event backend.
                    let record = &mut s.pings[index];
                    record.results = 1;
                    record.result = Some((
                        now,
                        PingOutcome::Error {
                            message: "node is restarting".into(),
                            is_local_ip: false,
                        },
                    ));
                    return;
                }
                drop(s);
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
            ActionKind::Restart { node, downtime } => self.restart(*node, *downtime, now),
            ActionKind::RestoreDiscoKey { node, downtime } => {
                let mut s = lock(&self.shared);
                s.restore_disco[*node] = true;
                s.log(
                    Some(*node),
                    Category::Action,
                    "restore-disco-key",
                    "the next engine goes back to the previous disco key".into(),
                );
                drop(s);
                self.restart(*node, *downtime, now);
            }
            ActionKind::Partition { a, b, one_way } => {
                for &i in a {
                    for &j in b {
                        if i == j {
                            continue;
                        }
                        let (x, y) = (
                            self.scenario.nodes[i].name.clone(),
                            self.scenario.nodes[j].name.clone(),
                        );
                        if *one_way {
                            lock(&self.shared).one_way_cuts.insert((i, j));
                            self.sim.partition_oneway(x.as_str(), y.as_str());
                            self.one_way_partitions.push((x, y));
                        } else {
                            lock(&self.shared).cut.insert((i.min(j), i.max(j)));
                            self.sim.partition(x.as_str(), y.as_str());
                            self.partitions.push((x, y));
                        }
                    }
                }
                lock(&self.shared).log(None, Category::Action, "partition", String::new());
            }
            ActionKind::Heal => {
                lock(&self.shared).cut.clear();
                lock(&self.shared).one_way_cuts.clear();
                for (x, y) in self.one_way_partitions.drain(..) {
                    self.sim.repair_oneway(x.as_str(), y.as_str());
                }
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
                    s.link_down.remove(&i);
                } else {
                    s.control.down.insert(i);
                    s.link_down.insert(i);
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
                let segment = {
                    let f = &s.flows[index];
                    flow_segment(f.state, f.src, f.dst, f.request_size, f.response_size)
                };
                drop(s);
                if let Some(l) = &action.label {
                    self.labels.flows.insert(l.clone(), index);
                }
                self.flow_timers.push((now + FLOW_INITIAL_RTO, index, 0));
                if let Some(segment) = segment {
                    send(&self.shared, *from, Cmd::Datagram(segment));
                }
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
            ActionKind::NatRebind { node } => lock(&self.shared).fabric_rebind(*node),
            ActionKind::SetAllowedIps { node, allowed_ips } => {
                lock(&self.shared).control_set_allowed_ips(*node, allowed_ips);
            }
        }
    }
}
