//! The network model on the turmoil backend. When a scenario asks for one
//! (NAT boxes, servers, per-link parameters; see [`crate::world::fabric`]),
//! datagrams do not cross turmoil's own links: the node's socket hands each
//! one to the shared [`Fabric`] (the same one the event backend uses), which
//! translates, forwards or drops it and says how long it travels; the outer
//! loop delivers it into the receiving socket's inbox once it is due, after
//! the receiver's NAT has filtered it. Turmoil still runs the hosts, the
//! production driver and virtual time, in 1 ms ticks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;

use super::shared::Shared;
use crate::trace::Category;
use crate::world::fabric::{self, Fabric, Routed};
use crate::world::fabric_seed;
use crate::world::render::datagram_kind;
use crate::world::servers::{STUN_SERVER, relayed_node};
use crate::world::spec::{NetworkSpec, NodeSpec};

/// What a node's socket receives: (source, datagram).
pub(super) type Inbound = (SocketAddr, Vec<u8>);

/// A datagram on its way.
struct InFlight {
    to: usize,
    dst: SocketAddr,
    from: SocketAddr,
    data: Vec<u8>,
}

/// The network model's state on this backend.
pub(super) struct TurmoilFabric {
    fabric: Fabric,
    /// Whether engines learn their endpoints from the model (see
    /// [`fabric::models_endpoints`]); without it the fabric only draws the
    /// network's loss and jitter.
    models_endpoints: bool,
    /// Datagrams on their way, by (due time, sequence).
    in_flight: BTreeMap<(Duration, u64), InFlight>,
    seq: u64,
    /// Each node's socket inbox (replaced when the node starts again).
    inboxes: Vec<Option<mpsc::UnboundedSender<Inbound>>>,
    /// Node by node, the endpoints its engine last reported.
    endpoints: Vec<Vec<SocketAddr>>,
}

impl TurmoilFabric {
    /// The model for a run, if the scenario asks for one.
    pub(super) fn for_run(seed: u64, network: &NetworkSpec, nodes: &[NodeSpec]) -> Option<Self> {
        fabric::routes(network, nodes).then(|| Self {
            fabric: Fabric::new(network, nodes, fabric_seed(seed)),
            models_endpoints: fabric::models_endpoints(network, nodes),
            in_flight: BTreeMap::new(),
            seq: 0,
            inboxes: vec![None; nodes.len()],
            endpoints: vec![Vec::new(); nodes.len()],
        })
    }

    /// Whether a message between node `i` and the coordination server is
    /// lost to the network's loss.
    pub(super) fn control_lost(&mut self, i: usize, toward_server: bool) -> bool {
        self.fabric.control_lost(i, toward_server)
    }
}

impl Shared {
    /// Whether engines learn their endpoints from the network model (with
    /// NAT boxes, servers or per-link settings), as a daemon's do.
    pub(super) fn models_endpoints(&self) -> bool {
        self.fabric.as_ref().is_some_and(|f| f.models_endpoints)
    }

    /// Every node's current endpoint (its turmoil address and port).
    fn inside_endpoints(&self) -> Vec<SocketAddr> {
        self.addresses
            .iter()
            .zip(&self.ports)
            .map(|(ip, port)| SocketAddr::new(*ip, *port))
            .collect()
    }

    /// The name of whoever is at `addr`, as the event backend writes it.
    pub(super) fn fabric_name(&self, addr: SocketAddr) -> String {
        if addr == STUN_SERVER {
            return "stun".into();
        }
        let inside = self.inside_endpoints();
        let owner = self
            .fabric
            .as_ref()
            .and_then(|f| f.fabric.owner_of(addr, &inside));
        match (owner, relayed_node(addr)) {
            (Some(j), Some(_)) => format!("relay:{}", self.names[j]),
            (Some(j), None) => self.names[j].clone(),
            (None, _) => self.node_name_at(addr),
        }
    }

    /// Node `i`'s socket opened: its inbox, when the run has a network
    /// model (`None` otherwise: the socket reads turmoil's network).
    pub(super) fn fabric_socket_opened(
        &mut self,
        i: usize,
    ) -> Option<mpsc::UnboundedReceiver<Inbound>> {
        let f = self.fabric.as_mut()?;
        let (tx, rx) = mpsc::unbounded_channel();
        f.inboxes[i] = Some(tx);
        f.endpoints[i].clear();
        Some(rx)
    }

    /// The NAT settings node `i`'s engine gets (the STUN server, the peers'
    /// relayed addresses), when the run has a network model.
    pub(super) fn fabric_nat_config(&self, i: usize) -> Option<wgmesh_core::NatConfig> {
        let f = self.fabric.as_ref().filter(|f| f.models_endpoints)?;
        let keys: Vec<_> = self.keys.iter().map(|k| k.public_key()).collect();
        Some(f.fabric.nat_config(i, &keys))
    }

    /// The endpoints node `i` tells control about: what its engine last
    /// reported with a network model, its one endpoint otherwise.
    pub(super) fn own_endpoints(&self, i: usize) -> Vec<SocketAddr> {
        let endpoint = SocketAddr::new(self.addresses[i], self.ports[i]);
        match &self.fabric {
            Some(f) if f.models_endpoints && !f.endpoints[i].is_empty() => f.endpoints[i].clone(),
            _ => vec![endpoint],
        }
    }

    /// Node `i`'s engine reported its endpoints: its client tells control.
    pub(super) fn fabric_endpoints_changed(&mut self, i: usize, endpoints: Vec<SocketAddr>) {
        if let Some(f) = self.fabric.as_mut() {
            f.endpoints[i] = endpoints.clone();
        }
        let actions = self.control.clients[i].endpoints_changed(self.now, endpoints);
        self.client_actions(i, actions);
    }

    /// Node `i`'s socket sends `data` to `dst` through the network model.
    pub(super) fn fabric_send(&mut self, i: usize, dst: SocketAddr, data: &[u8]) {
        let kind = datagram_kind(data);
        let size = data.len();
        let to_name = self.fabric_name(dst);
        let now = self.now;
        let routed = if self.link_down.contains(&i) {
            Routed::Drop("link-down")
        } else {
            let inside = self.inside_endpoints();
            let (cut, one_way) = (&self.cut, &self.one_way_cuts);
            let is_cut = |a: usize, b: usize| {
                cut.contains(&(a.min(b), a.max(b))) || one_way.contains(&(a, b))
            };
            let Some(f) = self.fabric.as_mut() else {
                return;
            };
            f.fabric.route(now, i, &inside, dst, data, is_cut)
        };
        match routed {
            Routed::Drop(why) => {
                let detail = format!("-> {to_name} {kind} {size}B {why}");
                self.log(Some(i), Category::Packet, "tx-drop", detail);
            }
            Routed::Deliver(d) => {
                let detail = format!("-> {to_name} {kind} {size}B");
                self.log(Some(i), Category::Packet, "tx", detail);
                let Some(f) = self.fabric.as_mut() else {
                    return;
                };
                f.seq += 1;
                let datagram = InFlight {
                    to: d.to,
                    dst: d.dst,
                    from: d.from,
                    data: d.reply.unwrap_or_else(|| data.to_vec()),
                };
                f.in_flight.insert((now + d.delay, f.seq), datagram);
            }
        }
    }

    /// Delivers the datagrams due by `now` into their receivers' inboxes
    /// (or drops them: the receiver is down or restarting, its NAT refuses
    /// them, it moved away).
    pub(super) fn fabric_deliver_due(&mut self, now: Duration) {
        loop {
            let Some(f) = self.fabric.as_mut() else {
                return;
            };
            let Some(entry) = f.in_flight.first_entry() else {
                return;
            };
            if entry.key().0 > now {
                return;
            }
            let datagram = entry.remove();
            let j = datagram.to;
            let from_name = self.fabric_name(datagram.from);
            let kind = datagram_kind(&datagram.data);
            let size = datagram.data.len();
            let inside = SocketAddr::new(self.addresses[j], self.ports[j]);
            let Some(f) = self.fabric.as_mut() else {
                return;
            };
            let verdict = match f.fabric.arrive(now, j, inside, datagram.dst, datagram.from) {
                Err(why) => Err(why),
                Ok(()) if self.link_down.contains(&j) || self.cmds[j].is_none() => Err("down"),
                Ok(()) => match &f.inboxes[j] {
                    Some(inbox) => inbox
                        .send((datagram.from, datagram.data))
                        .map_err(|_| "down"),
                    None => Err("down"),
                },
            };
            if let Err(why) = verdict {
                let detail = format!("<- {from_name} {kind} {size}B {why}");
                self.log(Some(j), Category::Packet, "rx-drop", detail);
            }
        }
    }

    /// The `nat_rebind` action: node `i`'s NAT box forgets its mappings.
    pub(super) fn fabric_rebind(&mut self, i: usize) {
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
