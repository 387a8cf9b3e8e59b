//! The virtual network on the event backend: latency, partitions and links
//! that are down, decided when a datagram is sent; random loss, jitter and
//! everything else the network model ([`fabric`]) draws.

use std::net::SocketAddr;

use wgmesh_core::{Effect, Input};

use super::queue::SimEvent;
use super::state::Tailnet;
use crate::trace::Category;
use crate::world::datagram_kind;
use crate::world::fabric::{self, Fabric, Routed};
use crate::world::fabric_seed;
use crate::world::servers::{STUN_SERVER, relayed_node};
use crate::world::spec::{NetworkSpec, NodeId, NodeSpec};

impl Tailnet {
    pub(super) fn transmit(&mut self, i: usize, dst: SocketAddr, data: Vec<u8>) {
        self.stats.datagrams_sent += 1;
        if self.fabric.is_some() {
            self.transmit_fabric(i, dst, data);
            return;
        }
        let kind = datagram_kind(&data);
        let size = data.len();
        let to = self.addr_book.get(&dst).copied();
        let to_name = to.map_or_else(|| dst.to_string(), |j| self.nodes[j].spec.name.clone());
        let drop = if !self.nodes[i].link_up {
            self.stats.dropped_link_down += 1;
            Some("link-down")
        } else if let Some(j) = to {
            if self.partitions.contains(&(i.min(j), i.max(j)))
                || self.one_way_cuts.contains(&(i, j))
            {
                self.stats.dropped_partition += 1;
                Some("partition")
            } else {
                None
            }
        } else {
            self.stats.dropped_no_route += 1;
            Some("no-route")
        };
        match drop {
            Some(why) => {
                self.log(
                    Some(i),
                    Category::Packet,
                    "tx-drop",
                    format!("-> {to_name} {kind} {size}B {why}"),
                );
                self.recycle(i, data);
            }
            None => {
                // Random loss and jitter are the fabric's (see
                // `fabric::routes`): this network only delays.
                let at = self.now + self.network.latency;
                self.log(
                    Some(i),
                    Category::Packet,
                    "tx",
                    format!("-> {to_name} {kind} {size}B"),
                );
                let from = self.nodes[i].endpoint;
                self.push(at, SimEvent::Arrival { dst, from, data });
            }
        }
    }

    pub(super) fn arrival(&mut self, dst: SocketAddr, from: SocketAddr, data: Vec<u8>) {
        if self.fabric.is_some() {
            self.arrival_fabric(dst, from, data);
            return;
        }
        let kind = datagram_kind(&data);
        let size = data.len();
        let from_name = self
            .addr_book
            .get(&from)
            .map_or_else(|| from.to_string(), |&j| self.nodes[j].spec.name.clone());
        let Some(&j) = self.addr_book.get(&dst) else {
            self.stats.dropped_no_route += 1;
            self.log(
                None,
                Category::Packet,
                "rx-drop",
                format!("{from_name} -> {dst} {kind} {size}B moved"),
            );
            return;
        };
        self.deliver_if_up(j, from, from_name, kind, size, data);
    }

    /// Hands a datagram that reached node `j` to its engine, or drops it
    /// (counted and traced) while the node's link is down or it restarts.
    fn deliver_if_up(
        &mut self,
        j: usize,
        from: SocketAddr,
        from_name: String,
        kind: &str,
        size: usize,
        data: Vec<u8>,
    ) {
        if !self.nodes[j].link_up || self.nodes[j].engine.is_none() {
            self.stats.dropped_link_down += 1;
            self.log(
                Some(j),
                Category::Packet,
                "rx-drop",
                format!("<- {from_name} {kind} {size}B down"),
            );
            return;
        }
        self.deliver(j, from, from_name, data);
    }

    /// Hands a datagram that reached node `j` to its engine.
    fn deliver(&mut self, j: usize, from: SocketAddr, from_name: String, data: Vec<u8>) {
        let kind = datagram_kind(&data);
        let size = data.len();
        self.stats.datagrams_delivered += 1;
        self.log(
            Some(j),
            Category::Packet,
            "rx",
            format!("<- {from_name} {kind} {size}B"),
        );
        let drops_before = self.receive_drops_before(j);
        let input = Input::Datagram { from, data: &data };
        if let Some(result) = self.call_engine(j, |engine, now| engine.handle_input(now, input)) {
            if let Err(e) = result {
                self.log(Some(j), Category::Engine, "input-refused", e.to_string());
            }
            self.recycle(j, data);
        }
        self.trace_receive_drop(j, drops_before, &from_name, kind, size);
        self.drain(j);
    }
}

/// The network model on the event backend: the shared [`Fabric`] and what
/// each node's engine last reported as its own endpoints.
pub(super) struct EventFabric {
    fabric: Fabric,
    /// Whether engines learn their endpoints from the model (see
    /// [`fabric::models_endpoints`]); without it the fabric only draws the
    /// network's loss and jitter.
    models_endpoints: bool,
    /// Node by node, the endpoints its engine last reported (empty until
    /// it reports any).
    endpoints: Vec<Vec<SocketAddr>>,
}

impl EventFabric {
    /// The model for a run, if the scenario asks for one.
    pub(super) fn for_run(seed: u64, network: &NetworkSpec, nodes: &[NodeSpec]) -> Option<Self> {
        fabric::routes(network, nodes).then(|| Self {
            fabric: Fabric::new(network, nodes, fabric_seed(seed)),
            models_endpoints: fabric::models_endpoints(network, nodes),
            endpoints: vec![Vec::new(); nodes.len()],
        })
    }
}

impl Tailnet {
    fn inside_endpoints(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.endpoint).collect()
    }

    /// The name of whoever is at `addr`, for the trace.
    fn fabric_name(&self, addr: SocketAddr) -> String {
        if addr == STUN_SERVER {
            return "stun".into();
        }
        let inside = self.inside_endpoints();
        let owner = self
            .fabric
            .as_ref()
            .and_then(|f| f.fabric.owner_of(addr, &inside));
        match (owner, relayed_node(addr)) {
            (Some(j), Some(_)) => format!("relay:{}", self.nodes[j].spec.name),
            (Some(j), None) => self.nodes[j].spec.name.clone(),
            (None, _) => addr.to_string(),
        }
    }

    /// The endpoints node `i` tells control about: what its engine last
    /// reported (local and STUN-reflexive) in a run with the network
    /// model, its one endpoint otherwise.
    pub(super) fn own_endpoints(&self, i: usize) -> Vec<SocketAddr> {
        match &self.fabric {
            Some(f) if f.models_endpoints && !f.endpoints[i].is_empty() => f.endpoints[i].clone(),
            _ => vec![self.nodes[i].endpoint],
        }
    }

    /// A new engine of node `i` learns the network model's servers and its
    /// own local endpoint, as the daemon tells its engine at start.
    pub(super) fn fabric_engine_started(&mut self, i: usize) {
        let Some(f) = self.fabric.as_mut().filter(|f| f.models_endpoints) else {
            return;
        };
        f.endpoints[i].clear();
        let keys: Vec<_> = self.nodes.iter().map(|n| n.public_key).collect();
        let config = f.fabric.nat_config(i, &keys);
        let local = vec![self.nodes[i].endpoint];
        self.feed(i, Input::SetNat(config));
        self.feed(i, Input::SetLocalEndpoints(local));
    }

    /// Node `i`'s engine asked for `effect`: with the network model, the
    /// endpoint effects are the model's (returns `true` when handled).
    pub(super) fn fabric_effect(&mut self, i: usize, effect: &Effect) -> bool {
        let Some(f) = self.fabric.as_mut().filter(|f| f.models_endpoints) else {
            return false;
        };
        match effect {
            Effect::ReDiscoverEndpoints { .. } => {
                // The engine re-asks the STUN server itself; it learns its
                // (maybe new) local endpoint here, as the daemon tells it.
                let local = vec![self.nodes[i].endpoint];
                self.feed(i, Input::SetLocalEndpoints(local));
                true
            }
            Effect::EndpointsChanged(endpoints) => {
                let addrs: Vec<SocketAddr> = endpoints.iter().map(|e| e.addr).collect();
                f.endpoints[i] = addrs.clone();
                let now = self.now;
                let actions = self.nodes[i].client.endpoints_changed(now, addrs);
                self.client_actions(i, actions);
                true
            }
            Effect::ApplyRouter(_)
            | Effect::ApplyDns(_)
            | Effect::FlushDnsCaches
            | Effect::Rebind
            | Effect::SetNetworkUp(_)
            | Effect::SetBirdProtocol { .. }
            | Effect::SetListenPort(_)
            | Effect::SetPathMtuDiscovery(_)
            | Effect::SetDnsViaTunnel(_) => false,
            // Effects added to the (non-exhaustive) enum later are traced
            // by the caller like every other.
            _ => false,
        }
    }

    /// Whether a message between node `i` and the coordination server is
    /// lost to the network's random loss (never without the fabric: a
    /// network that loses datagrams always has one).
    pub(super) fn control_lost(&mut self, i: usize, toward_server: bool) -> bool {
        self.fabric
            .as_mut()
            .is_some_and(|f| f.fabric.control_lost(i, toward_server))
    }

    /// Node `i` sends `data` to `dst` through the network model.
    fn transmit_fabric(&mut self, i: usize, dst: SocketAddr, data: Vec<u8>) {
        let kind = datagram_kind(&data);
        let size = data.len();
        let to_name = self.fabric_name(dst);
        let routed = if !self.nodes[i].link_up {
            Routed::Drop("link-down")
        } else {
            let inside = self.inside_endpoints();
            let (partitions, one_way) = (&self.partitions, &self.one_way_cuts);
            let cut = |a: usize, b: usize| {
                partitions.contains(&(a.min(b), a.max(b))) || one_way.contains(&(a, b))
            };
            let Some(f) = self.fabric.as_mut() else {
                return;
            };
            f.fabric.route(self.now, i, &inside, dst, &data, cut)
        };
        match routed {
            Routed::Drop(why) => {
                match why {
                    "link-down" => self.stats.dropped_link_down += 1,
                    "partition" => self.stats.dropped_partition += 1,
                    "loss" => self.stats.dropped_loss += 1,
                    _ => self.stats.dropped_no_route += 1,
                }
                self.log(
                    Some(i),
                    Category::Packet,
                    "tx-drop",
                    format!("-> {to_name} {kind} {size}B {why}"),
                );
                self.recycle(i, data);
            }
            Routed::Deliver(d) => {
                self.log(
                    Some(i),
                    Category::Packet,
                    "tx",
                    format!("-> {to_name} {kind} {size}B"),
                );
                let data = match d.reply {
                    Some(answer) => {
                        self.recycle(i, data);
                        answer
                    }
                    None => data,
                };
                let at = self.now + d.delay;
                self.push(
                    at,
                    SimEvent::Arrival {
                        dst: d.dst,
                        from: d.from,
                        data,
                    },
                );
            }
        }
    }

    /// A datagram arrives at `dst` through the network model.
    fn arrival_fabric(&mut self, dst: SocketAddr, from: SocketAddr, data: Vec<u8>) {
        let kind = datagram_kind(&data);
        let size = data.len();
        let from_name = self.fabric_name(from);
        let inside = self.inside_endpoints();
        let now = self.now;
        let Some(f) = self.fabric.as_mut() else {
            return;
        };
        let Some(j) = f.fabric.owner_of(dst, &inside) else {
            self.stats.dropped_no_route += 1;
            self.log(
                None,
                Category::Packet,
                "rx-drop",
                format!("{from_name} -> {dst} {kind} {size}B moved"),
            );
            return;
        };
        if let Err(why) = f.fabric.arrive(now, j, inside[j], dst, from) {
            self.stats.dropped_no_route += 1;
            self.log(
                Some(j),
                Category::Packet,
                "rx-drop",
                format!("<- {from_name} {kind} {size}B {why}"),
            );
            return;
        }
        self.deliver_if_up(j, from, from_name, kind, size, data);
    }

    /// The `nat_rebind` action: node `i`'s NAT box forgets its mappings.
    pub(super) fn nat_rebind(&mut self, node: NodeId) {
        let i = node.0;
        let rebound = self.fabric.as_mut().is_some_and(|f| f.fabric.rebind(i));
        let detail = if rebound {
            "mappings forgotten"
        } else {
            "no NAT"
        };
        self.log(Some(i), Category::Action, "nat-rebind", detail.to_string());
    }

    /// The network model's counts (empty without one).
    pub(super) fn fabric_counts(&self) -> Vec<(&'static str, u64)> {
        self.fabric
            .as_ref()
            .map_or_else(Vec::new, |f| f.fabric.counts())
    }
}
