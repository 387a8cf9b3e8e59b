//! What a scenario (or a test) does to a running tailnet on the event
//! backend: traffic, pings, restarts, partitions, link changes and control
//! changes.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use wgmesh_core::{
    DiscoPrivateKey, Input, Knobs, LinkChange, PING_TIMEOUT, PingKind, PingOutcome, PingRequest,
};

use super::queue::SimEvent;
use super::state::Tailnet;
use crate::trace::Category;
use crate::world::address::{FLOW_PORT, endpoint, tailnet_source};
use crate::world::control::AllowedIpsChange;
use crate::world::records::{FlowRecord, PingRecord, StreamRecord};
use crate::world::render::ms;
use crate::world::spec::{LinkKind, NodeId};
use crate::world::traffic::FLOW_INITIAL_RTO;

impl Tailnet {
    /// Starts a stream of `count` UDP datagrams of `size` payload bytes from
    /// `from` to `dst`, one every `interval`, the first one now. Returns the
    /// stream's index in [`Tailnet::streams`].
    pub fn send_stream(
        &mut self,
        from: NodeId,
        dst: IpAddr,
        count: u64,
        interval: Duration,
        size: usize,
        label: Option<String>,
    ) -> usize {
        let index = self.streams.len();
        self.streams
            .push(StreamRecord::new(label, from, dst, count, interval, size));
        let detail = format!(
            "stream #{index} -> {dst} count={count} every {}",
            ms(interval)
        );
        self.log(Some(from.0), Category::Action, "send", detail);
        self.with_dispatch(|net| net.stream_tick(index));
        index
    }

    /// Sends one UDP datagram from `from` to `dst` now (a stream of one).
    pub fn send_datagram(&mut self, from: NodeId, dst: IpAddr, size: usize) -> usize {
        self.send_stream(from, dst, 1, Duration::from_secs(1), size, None)
    }

    /// Starts a TCP-like request/response flow from `from` to `dst` port 80.
    /// Returns its index in [`Tailnet::flows`].
    pub fn start_flow(
        &mut self,
        from: NodeId,
        dst: IpAddr,
        request_size: usize,
        response_size: usize,
        label: Option<String>,
    ) -> usize {
        let index = self.flows.len();
        let src_ip = tailnet_source(from.0, dst);
        self.flows.push(FlowRecord::new(
            label,
            from,
            index,
            src_ip,
            dst,
            request_size,
            response_size,
            self.now,
        ));
        self.log(
            Some(from.0),
            Category::Action,
            "flow",
            format!("flow #{index} -> {dst}:{FLOW_PORT}"),
        );
        self.with_dispatch(|net| {
            let at = net.now + FLOW_INITIAL_RTO;
            net.push(
                at,
                SimEvent::FlowTimer {
                    flow: index,
                    attempt: 0,
                },
            );
            if let Some(p) = net.flow_packet(index) {
                if net.nodes[from.0].engine.is_some() {
                    net.os_send(from.0, p);
                }
            }
        });
        index
    }

    /// Starts a ping of `kind` from `from` to `ip`. Returns its index in
    /// [`Tailnet::pings`] (also its ping id).
    pub fn ping(
        &mut self,
        from: NodeId,
        ip: IpAddr,
        kind: PingKind,
        size: usize,
        label: Option<String>,
    ) -> usize {
        let index = self.pings.len();
        let incarnation = self.nodes[from.0].incarnation;
        self.pings.push(PingRecord::new(
            label,
            from,
            ip,
            kind,
            self.now,
            incarnation,
        ));
        self.stats.pings += 1;
        self.log(
            Some(from.0),
            Category::Ping,
            "ping",
            format!("#{index} {} {ip}", kind.as_str()),
        );
        if self.nodes[from.0].engine.is_none() {
            let record = &mut self.pings[index];
            record.results = 1;
            record.result = Some((
                self.now,
                PingOutcome::Error {
                    message: "node is restarting".into(),
                    is_local_ip: false,
                },
            ));
            self.stats.ping_errors += 1;
            return index;
        }
        self.outstanding.insert((self.now + PING_TIMEOUT, index));
        self.nodes[from.0].outstanding_pings += 1;
        let request = PingRequest {
            id: index as u64,
            ip,
            kind,
            size,
        };
        self.with_dispatch(|net| {
            net.feed(from.0, Input::Ping(request));
        });
        index
    }

    /// Restarts a node: its engine closes (pending pings end), and after
    /// `downtime` a new engine starts with a new disco key and the same node
    /// key. Control then sends everyone the new netmap after its delay.
    pub fn restart(&mut self, id: NodeId, downtime: Duration) {
        let i = id.0;
        self.stats.restarts += 1;
        self.log(
            Some(i),
            Category::Action,
            "restart",
            format!("down for {}", ms(downtime)),
        );
        self.with_dispatch(|net| {
            net.client_killed(i);
            net.feed(i, Input::Close);
            // Pings still open on the closed engine ended in `Close`; whatever
            // the old incarnation left is not this engine's any more, but its
            // counters still count towards the node's total.
            if let Some(engine) = net.nodes[i].engine.take() {
                add_counters(&mut net.nodes[i].earlier_counters, engine.counters().iter());
            }
            net.nodes[i].incarnation += 1;
            net.nodes[i].timer_at = None;
            let incarnation = net.nodes[i].incarnation;
            if downtime.is_zero() {
                net.bring_up(i);
            } else {
                let at = net.now + downtime;
                net.push(
                    at,
                    SimEvent::NodeUp {
                        node: i,
                        incarnation,
                    },
                );
            }
        });
    }

    /// Restarts a node like [`Tailnet::restart`], but its new engine gets
    /// the disco key it had before its current one (a node restored from a
    /// snapshot), so its peers see the disco key go back to an earlier
    /// value. A node that never restarted has no earlier key and gets a new
    /// one, as in a plain restart (scenario files refuse that case).
    pub fn restore_disco_key(&mut self, id: NodeId, downtime: Duration) {
        self.nodes[id.0].restore_disco = true;
        self.note(
            Some(id),
            "restore-disco-key",
            "the next engine goes back to the previous disco key".into(),
        );
        self.restart(id, downtime);
    }

    pub(super) fn bring_up(&mut self, i: usize) {
        let restored = std::mem::take(&mut self.nodes[i].restore_disco)
            .then(|| self.nodes[i].previous_disco.clone())
            .flatten();
        let disco = match restored {
            Some(key) => key,
            None => DiscoPrivateKey::generate(&mut self.key_rng),
        };
        let current = std::mem::replace(&mut self.nodes[i].disco_private, disco.clone());
        self.nodes[i].previous_disco = Some(current);
        self.nodes[i].disco_public = disco.public_key();
        self.start_engine(i);
        self.log(
            Some(i),
            Category::Action,
            "node-up",
            format!("disco {}", self.nodes[i].disco_public.short()),
        );
        // A node that starts tells control its new disco key and where it
        // can be reached now: its address may have changed while it was
        // down (a link change during the downtime reaches no engine, so no
        // re-discovery reported it).
        self.client_start(i);
    }

    /// Cuts every path between a node of `a` and a node of `b`.
    pub fn partition(&mut self, a: &[NodeId], b: &[NodeId]) {
        for x in a {
            for y in b {
                if x != y {
                    self.partitions.insert((x.0.min(y.0), x.0.max(y.0)));
                }
            }
        }
        let names = |ids: &[NodeId]| {
            ids.iter()
                .map(|i| self.name(*i))
                .collect::<Vec<_>>()
                .join(",")
        };
        let detail = format!("{} | {}", names(a), names(b));
        self.log(None, Category::Action, "partition", detail);
    }

    /// Cuts every path from a node of `a` to a node of `b`, one way: `b`
    /// still reaches `a`.
    pub fn partition_one_way(&mut self, a: &[NodeId], b: &[NodeId]) {
        for x in a {
            for y in b {
                if x != y {
                    self.one_way_cuts.insert((x.0, y.0));
                }
            }
        }
        let names = |ids: &[NodeId]| {
            ids.iter()
                .map(|i| self.name(*i))
                .collect::<Vec<_>>()
                .join(",")
        };
        let detail = format!("{} -> {} one way", names(a), names(b));
        self.log(None, Category::Action, "partition", detail);
    }

    /// Removes every partition, two-way and one-way, and every cut between
    /// nodes and the coordination server.
    pub fn heal(&mut self) {
        self.partitions.clear();
        self.one_way_cuts.clear();
        self.control_cut.clear();
        self.log(None, Category::Action, "heal", String::new());
    }

    /// Puts a node through a link change. `Major` moves it to a new UDP
    /// address (datagrams to the old one are lost) and the engine rebinds;
    /// control learns the new endpoint when the engine re-discovers endpoints.
    pub fn link_change(&mut self, id: NodeId, kind: LinkKind) {
        let i = id.0;
        let change = match kind {
            LinkKind::Down => {
                self.nodes[i].link_up = false;
                LinkChange {
                    any_link_up: false,
                    major: false,
                }
            }
            LinkKind::Up | LinkKind::Minor => {
                self.nodes[i].link_up = true;
                LinkChange {
                    any_link_up: true,
                    major: false,
                }
            }
            LinkKind::Major => {
                let n = &mut self.nodes[i];
                n.link_up = true;
                n.address_generation = n.address_generation.wrapping_add(1);
                let new = endpoint(i, n.address_generation);
                let old = std::mem::replace(&mut n.endpoint, new);
                self.addr_book.remove(&old);
                self.addr_book.insert(new, i);
                LinkChange {
                    any_link_up: true,
                    major: true,
                }
            }
        };
        let detail = format!("{} endpoint {}", kind.as_str(), self.nodes[i].endpoint);
        self.log(Some(i), Category::Action, "link-change", detail);
        self.with_dispatch(|net| {
            net.feed(i, Input::LinkChange(change));
        });
    }

    /// Changes the knobs of `node` (or of every node). The knobs are not
    /// part of the control crate's netmap, so each node applies its netmap
    /// again with the new knobs after its control delay, as if they came
    /// with a push.
    pub fn set_knobs(&mut self, node: Option<NodeId>, f: impl Fn(&mut Knobs)) {
        let mut changed = Vec::new();
        for (i, n) in self.nodes.iter_mut().enumerate() {
            if node.is_none_or(|id| id.0 == i) {
                f(&mut n.knobs);
                changed.push(i);
            }
        }
        let who = node.map_or("all", |id| self.name(id)).to_string();
        self.log(None, Category::Action, "set-knobs", who);
        for i in changed {
            let at = self.now + self.control_leg(i) * 2;
            let incarnation = self.nodes[i].incarnation;
            self.push(
                at,
                SimEvent::Reapply {
                    node: i,
                    incarnation,
                },
            );
        }
    }

    /// Sets the AllowedIPs of `node`: its own addresses stay, and the admin
    /// approves the other listed prefixes as its routes at the coordination
    /// server, which pushes the change to its peers (a prefix the node does
    /// not advertise, or one approved for another node, is refused by the
    /// server, and the trace says so). The node's OS answers for the new
    /// prefixes only when the server took them: a refused change leaves the
    /// world as control describes it, so the invariants judge the engines
    /// against the netmap they really have.
    pub fn set_allowed_ips(&mut self, node: NodeId, allowed_ips: Vec<IpNet>) {
        let AllowedIpsChange {
            detail,
            own,
            routes,
        } = AllowedIpsChange::new(&allowed_ips, self.nodes[node.0].ip4, self.nodes[node.0].ip6);
        self.log(Some(node.0), Category::Action, "set-allowed-ips", detail);
        let key = wgmesh_control::NodeKey(*self.nodes[node.0].public_key.as_bytes());
        let approved = routes.clone();
        let accepted = self.with_dispatch(|net| {
            let (outgoing, line, accepted) = net.control.approve_routes(net.now, key, routes);
            net.log(Some(node.0), Category::Control, "approve-routes", line);
            net.send_control_messages(outgoing);
            accepted
        });
        if accepted {
            self.nodes[node.0].allowed_ips = own.iter().copied().chain(approved).collect();
            self.rebuild_owners();
        }
    }

    /// Puts a new policy in force at the coordination server.
    pub fn set_policy(&mut self, policy: wgmesh_control::Policy) {
        self.log(None, Category::Action, "set-policy", String::new());
        self.with_dispatch(|net| net.control_set_policy(policy));
    }

    /// Restarts the coordination server: it is down for `downtime`, then
    /// starts again from its stored records.
    pub fn restart_control(&mut self, downtime: Duration) {
        self.log(
            None,
            Category::Action,
            "control-restart",
            format!("down for {}", ms(downtime)),
        );
        self.with_dispatch(|net| net.control_down(downtime));
    }

    /// Cuts every path between the coordination server and `nodes` (until
    /// [`Tailnet::heal`]).
    pub fn partition_control(&mut self, nodes: &[NodeId]) {
        for n in nodes {
            self.control_cut.insert(n.0);
        }
        let names = nodes
            .iter()
            .map(|i| self.name(*i))
            .collect::<Vec<_>>()
            .join(",");
        self.log(None, Category::Action, "control-partition", names);
    }

    /// The coordination server's counts so far.
    pub fn control_stats(&self) -> &crate::world::control::ControlStats {
        &self.control.stats
    }

    /// How many nodes hold an open map stream at the server now.
    pub fn control_streams(&self) -> usize {
        self.control.open_streams()
    }

    /// Checks every node's invariants now (the harness does this after each
    /// step for the nodes involved; this checks all of them).
    pub fn check_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.check_node(i);
        }
        self.check_global();
    }

    /// Records a note in the trace (for scenario probes and checks).
    pub fn note(&mut self, node: Option<NodeId>, kind: &'static str, detail: String) {
        self.log(node.map(|n| n.0), Category::Action, kind, detail);
    }
}

/// Adds one engine's counters into a node's running totals.
pub(super) fn add_counters(
    totals: &mut Vec<(&'static str, u64)>,
    counters: impl Iterator<Item = (&'static str, u64)>,
) {
    for (name, value) in counters {
        match totals.iter_mut().find(|(k, _)| *k == name) {
            Some((_, total)) => *total += value,
            None => totals.push((name, value)),
        }
    }
}
