//! The virtual network between the nodes when a scenario asks for more than
//! one shared latency: NAT boxes in front of nodes ([`super::nat`]), the STUN
//! server and the relay ([`super::servers`]), and per-link latency, loss and
//! burst loss ([`super::links`]). Both backends route every datagram of such
//! a scenario through one [`Fabric`], so they translate, filter, forward and
//! lose the same datagrams.
//!
//! A datagram's way is decided in two steps: [`Fabric::route`] when it is
//! sent (the sender's NAT maps it, the servers answer or forward it, the
//! link draws its delay or loss) and [`Fabric::arrive`] when it arrives (the
//! receiver's NAT filters it against the mappings it has *then*, so a
//! mapping that lapses while a datagram is in flight drops it, as a real box
//! would).
//!
//! Addresses: node *i* keeps its inside endpoint `10.g.x.y:41641`
//! ([`super::address::endpoint`]); a node behind a NAT is reached only
//! through its box's outside address `198.18.x.y` (RFC 2544's benchmarking
//! range), its inside address being private; a node with no NAT is reached
//! at its endpoint directly.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use wgmesh_core::{NatConfig, NodePublicKey, PeerRelay};

use super::address::host_octets;
use super::links::{Hop, LinkParams, Links};
use super::nat::NatBox;
use super::servers::{STUN_SERVER, relayed_address, relayed_node, stun_answer};
use super::spec::{NetworkSpec, NodeSpec};

/// Node `index`'s NAT box's outside address, `198.18.x.y`.
pub fn outside_ip(index: usize) -> IpAddr {
    let (hi, lo) = host_octets(index);
    IpAddr::V4(Ipv4Addr::new(198, 18, hi, lo))
}

/// Whether `network` and `nodes` ask for what only the full model has: NAT
/// boxes, the servers or per-link settings. Engines then learn their
/// endpoints from the model (their local one, and what STUN reflects), as
/// the daemon's do. Otherwise a node keeps its one endpoint, so older
/// scenarios' traces do not change.
pub fn models_endpoints(network: &NetworkSpec, nodes: &[NodeSpec]) -> bool {
    network.stun
        || network.relay
        || network.burst.is_some()
        || !network.links.is_empty()
        || nodes.iter().any(|n| n.nat.is_some())
}

/// Whether datagrams go through the fabric at all: with the full model, and
/// whenever the network loses or delays datagrams at random. Each direction
/// of each hop then draws from its own stream, so both backends lose and
/// delay the same datagrams however they order what is sent at one instant.
pub fn routes(network: &NetworkSpec, nodes: &[NodeSpec]) -> bool {
    models_endpoints(network, nodes) || network.loss > 0.0 || !network.jitter.is_zero()
}

/// Whether `network` loses datagrams anywhere (a link's loss, or bursts),
/// so no datagram's fate can be judged by the liveness oracles' default
/// bound.
pub fn lossy(network: &NetworkSpec) -> bool {
    network.burst.is_some()
        || network
            .links
            .iter()
            .any(|l| l.params.loss > 0.0 || l.params.burst.is_some())
}

/// The slowest one-way trip a datagram between two nodes can take on a
/// healthy network, jitter included: the slowest link, or two of the
/// network's hops when a relay may carry the traffic (the liveness
/// oracles' default bound is built on it).
pub fn slowest_one_way(network: &NetworkSpec) -> Duration {
    let hop = network.latency + network.jitter;
    let direct = network
        .links
        .iter()
        .map(|l| l.params.latency + l.params.jitter)
        .fold(hop, Duration::max);
    if network.relay {
        direct.max(hop * 2)
    } else {
        direct
    }
}

/// Where a datagram goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The node it reaches (unless the receiver's NAT drops it on arrival).
    pub to: usize,
    /// Whether it crossed a server (the relay or the STUN server) rather
    /// than the direct path between two nodes: a partition between two
    /// nodes cuts only their direct path.
    pub via_server: bool,
    /// The source address the receiver sees.
    pub from: SocketAddr,
    /// The address it arrives at (a NAT box's outside address, or the
    /// receiver's own endpoint).
    pub dst: SocketAddr,
    /// How long it travels.
    pub delay: Duration,
    /// The STUN server's answer, which travels back instead of the request.
    pub reply: Option<Vec<u8>>,
}

/// What happened to a datagram when it was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routed {
    /// It travels.
    Deliver(Delivery),
    /// It is lost, for this reason (as the trace writes it).
    Drop(&'static str),
}

/// The fabric: NAT boxes, servers and links. See the module docs.
#[derive(Debug, Clone)]
pub struct Fabric {
    /// Each node's NAT box, if it is behind one.
    nats: Vec<Option<NatBox>>,
    /// Which node's box has which outside address.
    outside_owner: BTreeMap<IpAddr, usize>,
    stun: bool,
    relay: bool,
    links: Links,
    /// Datagrams dropped or handled, by reason or kind.
    counts: BTreeMap<&'static str, u64>,
}

impl Fabric {
    /// The fabric `network` and `nodes` describe; its draws come from
    /// streams made from `seed`.
    pub fn new(network: &NetworkSpec, nodes: &[NodeSpec], seed: u64) -> Self {
        let nats: Vec<Option<NatBox>> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| n.nat.map(|spec| NatBox::new(spec, outside_ip(i))))
            .collect();
        let outside_owner = nats
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.as_ref().map(|b| (b.outside_ip(), i)))
            .collect();
        let params = LinkParams {
            latency: network.latency,
            jitter: network.jitter,
            loss: network.loss,
            burst: network.burst,
        };
        Self {
            nats,
            outside_owner,
            stun: network.stun,
            relay: network.relay,
            links: Links::new(params, &network.links, seed),
            counts: BTreeMap::new(),
        }
    }

    /// Node `i`'s NAT box, if it has one.
    pub fn nat(&self, i: usize) -> Option<&NatBox> {
        self.nats.get(i).and_then(Option::as_ref)
    }

    /// The NAT settings node `i`'s engine gets: the STUN server, and every
    /// other node's relayed address (`keys` by node index).
    pub fn nat_config(&self, i: usize, keys: &[NodePublicKey]) -> NatConfig {
        let peer_relays = if self.relay {
            keys.iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .filter_map(|(j, key)| {
                    relayed_address(j).map(|addr| PeerRelay { peer: *key, addr })
                })
                .collect()
        } else {
            Vec::new()
        };
        NatConfig {
            stun_servers: if self.stun {
                vec![STUN_SERVER]
            } else {
                Vec::new()
            },
            peer_relays,
        }
    }

    /// Counts of what the fabric dropped or handled, by name, in name order.
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        self.counts.iter().map(|(k, v)| (*k, *v)).collect()
    }

    fn count(&mut self, what: &'static str) {
        *self.counts.entry(what).or_insert(0) += 1;
    }

    fn drop(&mut self, why: &'static str) -> Routed {
        self.count(why);
        Routed::Drop(why)
    }

    /// Whether a message between node `i` and the coordination server is
    /// lost to the network's loss (`toward_server` gives its direction).
    /// Each node's two directions draw from streams of their own.
    pub fn control_lost(&mut self, i: usize, toward_server: bool) -> bool {
        let (from, to) = if toward_server {
            (Hop::Node(i), Hop::Control)
        } else {
            (Hop::Control, Hop::Node(i))
        };
        self.links.cross(from, to).is_none()
    }

    /// Node `i`'s box forgets its mappings (a rebinding: new outside ports
    /// from the next datagram on). Returns whether `i` is behind a NAT.
    pub fn rebind(&mut self, i: usize) -> bool {
        match self.nats.get_mut(i).and_then(Option::as_mut) {
            Some(b) => {
                b.rebind();
                true
            }
            None => false,
        }
    }

    /// The node whose endpoint or NAT box `addr` is on (for trace names).
    pub fn owner_of(&self, addr: SocketAddr, inside: &[SocketAddr]) -> Option<usize> {
        self.outside_owner
            .get(&addr.ip())
            .copied()
            .or_else(|| inside.iter().position(|a| *a == addr))
            .or_else(|| relayed_node(addr).filter(|&j| self.relay && j < inside.len()))
    }

    /// The source node `i`'s datagram to `remote` leaves its NAT with (its
    /// endpoint where it has no NAT).
    fn translate(
        &mut self,
        now: Duration,
        i: usize,
        inside: SocketAddr,
        remote: SocketAddr,
    ) -> Result<SocketAddr, &'static str> {
        match self.nats.get_mut(i).and_then(Option::as_mut) {
            Some(b) => b.outbound(now, inside, remote).map_err(|e| e.as_str()),
            None => Ok(inside),
        }
    }

    /// Node `i` sends `data` to `dst` at `now`. `inside` holds every
    /// node's current endpoint; `cut(i, j)` says whether the direct path
    /// from `i` to `j` is cut (a partition).
    pub fn route(
        &mut self,
        now: Duration,
        i: usize,
        inside: &[SocketAddr],
        dst: SocketAddr,
        data: &[u8],
        cut: impl Fn(usize, usize) -> bool,
    ) -> Routed {
        let src_inside = inside[i];
        if self.stun && dst == STUN_SERVER {
            let source = match self.translate(now, i, src_inside, dst) {
                Ok(s) => s,
                Err(why) => return self.drop(why),
            };
            let Some(up) = self.links.cross(Hop::Node(i), Hop::Server) else {
                return self.drop("loss");
            };
            let answer = match stun_answer(data, source) {
                Ok(a) => a,
                Err(_) => return self.drop("stun-refused"),
            };
            let Some(down) = self.links.cross(Hop::Server, Hop::Node(i)) else {
                return self.drop("loss");
            };
            self.count("stun-answered");
            return Routed::Deliver(Delivery {
                to: i,
                via_server: true,
                from: STUN_SERVER,
                dst: source,
                delay: up + down,
                reply: Some(answer),
            });
        }
        if let Some(j) = relayed_node(dst).filter(|&j| self.relay && j < inside.len()) {
            let (Some(from), Some(up)) = (
                relayed_address(i),
                self.links.cross(Hop::Node(i), Hop::Server),
            ) else {
                return self.drop("loss");
            };
            let Some(down) = self.links.cross(Hop::Server, Hop::Node(j)) else {
                return self.drop("loss");
            };
            self.count("relayed");
            return Routed::Deliver(Delivery {
                to: j,
                via_server: true,
                from,
                dst: inside[j],
                delay: up + down,
                reply: None,
            });
        }
        let target = match self.outside_owner.get(&dst.ip()) {
            Some(&j) if j == i => {
                // To our own box's outside address: hairpinning.
                let Some(b) = self.nats[i].as_mut() else {
                    return self.drop("no-route");
                };
                return match b.hairpin(now, src_inside, dst) {
                    Ok((from, to_inside)) if to_inside == src_inside => {
                        self.count("hairpinned");
                        Routed::Deliver(Delivery {
                            to: i,
                            via_server: false,
                            from,
                            dst: to_inside,
                            delay: Duration::ZERO,
                            reply: None,
                        })
                    }
                    Ok(_) => self.drop("moved"),
                    Err(e) => self.drop(e.as_str()),
                };
            }
            Some(&j) => j,
            None => match inside.iter().position(|a| *a == dst) {
                Some(j) if j != i && self.nats[j].is_some() => {
                    // A private address behind another node's NAT.
                    return self.drop("private-address");
                }
                Some(j) => j,
                None => return self.drop("no-route"),
            },
        };
        // The sender's box maps the datagram whether or not it gets through
        // what lies beyond.
        let source = match self.translate(now, i, src_inside, dst) {
            Ok(s) => s,
            Err(why) => return self.drop(why),
        };
        if cut(i, target) {
            return self.drop("partition");
        }
        let Some(delay) = self.links.cross(Hop::Node(i), Hop::Node(target)) else {
            return self.drop("loss");
        };
        Routed::Deliver(Delivery {
            to: target,
            via_server: false,
            from: source,
            dst,
            delay,
            reply: None,
        })
    }

    /// A datagram from `from` arrives at `dst` for node `to` at `now`, whose
    /// endpoint is `inside` by then: `Ok` when it reaches the node, or why
    /// it is dropped (its NAT has no mapping or filters the sender; the node
    /// moved away from the address it was sent to).
    pub fn arrive(
        &mut self,
        now: Duration,
        to: usize,
        inside: SocketAddr,
        dst: SocketAddr,
        from: SocketAddr,
    ) -> Result<(), &'static str> {
        if dst == inside {
            return Ok(());
        }
        let result = match self.nats.get(to).and_then(Option::as_ref) {
            Some(b) if b.outside_ip() == dst.ip() => match b.inbound(now, dst.port(), from) {
                Ok(a) if a == inside => Ok(()),
                Ok(_) => Err("moved"),
                Err(e) => Err(e.as_str()),
            },
            _ => Err("moved"),
        };
        if let Err(why) = result {
            self.count(why);
        }
        result
    }
}
