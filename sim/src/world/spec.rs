//! What a simulated tailnet is made of, as both backends take it: nodes,
//! the network between them, and the link changes a node can go through.

use std::time::Duration;

use ipnet::IpNet;
use wgmesh_core::Knobs;

use super::links::{BurstLoss, LinkSpec};
use super::nat::NatSpec;

/// A node's index in the tailnet, in the order nodes were added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub usize);

/// How a node is set up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSpec {
    /// Its name (in traces, ping results and scenario files).
    pub name: String,
    /// `EngineConfig::trim_override`: `Some(true)` forces lazy peers on,
    /// `Some(false)` off, `None` follows the `keep_full_wg_config` knob.
    pub trim_override: Option<bool>,
    /// `TestingKnobs::disable_disco_key_flush` for this node's engine.
    pub disable_disco_key_flush: bool,
    /// The `keep_full_wg_config` knob control sends this node (`None`: the tailnet default).
    pub keep_full_wg_config: Option<bool>,
    /// The `fake_icmp_echo` knob control sends this node.
    pub fake_icmp_echo: bool,
    /// The PeerAPI port this node announces in TSMP pongs.
    pub peerapi_port: Option<u16>,
    /// Subnets this node routes for (peers get them as AllowedIPs, which
    /// makes this node non-trimmable for them).
    pub subnets: Vec<IpNet>,
    /// The persistent keepalive peers configure for this node.
    pub persistent_keepalive_secs: Option<u16>,
    /// This node's own control delay (`None`: the network's): how long a
    /// change takes from a node through the coordination server to this one.
    pub control_delay: Option<Duration>,
    /// The NAT box in front of this node (`None`: it is reached directly).
    pub nat: Option<NatSpec>,
    /// Its OS does not answer flows (TCP port 80): a service that hangs, so
    /// a peer's connection to it fails with the session and paths fine.
    pub silent_service: bool,
}

impl NodeSpec {
    /// A node with defaults for everything but its name.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }
}

/// The virtual network's behaviour.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkSpec {
    /// One-way latency of every datagram.
    pub latency: Duration,
    /// Extra one-way delay drawn uniformly from `0..=jitter` per datagram.
    pub jitter: Duration,
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// Delay from a change at a node, through the coordination server, to
    /// its delivery to another node: every message between a node and the
    /// server takes half of it (a node's own `control_delay` overrides it
    /// for the messages of that node).
    pub control_delay: Duration,
    /// Gilbert-Elliott burst loss on every hop that no `links` entry
    /// overrides (`loss` is then the loss outside bursts).
    pub burst: Option<BurstLoss>,
    /// Links between two nodes whose latency, jitter and loss replace the
    /// network's for their direct datagrams.
    pub links: Vec<LinkSpec>,
    /// Whether the network has a STUN server (every node's engine is told
    /// about it and learns its reflexive address from it).
    pub stun: bool,
    /// Whether the network has a relay (every node has a relayed address,
    /// which its peers' engines get as its `peer_relays` entry).
    pub relay: bool,
}

impl Default for NetworkSpec {
    fn default() -> Self {
        Self {
            latency: Duration::from_millis(10),
            jitter: Duration::ZERO,
            loss: 0.0,
            control_delay: Duration::from_millis(200),
            burst: None,
            links: Vec::new(),
            stun: false,
            relay: false,
        }
    }
}

/// A link change a node can go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LinkKind {
    /// Every interface goes down: the node neither sends nor receives.
    Down,
    /// Interfaces come back (a minor change, same address).
    Up,
    /// A minor change: same address, endpoints are re-discovered.
    Minor,
    /// A major change: the node moves to a new UDP address and rebinds.
    Major,
}

impl LinkKind {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkKind::Down => "down",
            LinkKind::Up => "up",
            LinkKind::Minor => "minor",
            LinkKind::Major => "major",
        }
    }
}

/// The knobs control sends a node: the tailnet's `base` knobs with the
/// node's own settings on top.
pub(crate) fn node_knobs(spec: &NodeSpec, base: &Knobs) -> Knobs {
    Knobs {
        keep_full_wg_config: spec.keep_full_wg_config.unwrap_or(base.keep_full_wg_config),
        fake_icmp_echo: spec.fake_icmp_echo || base.fake_icmp_echo,
        peerapi_port: spec.peerapi_port.or(base.peerapi_port),
        ..base.clone()
    }
}

/// Sets the knob the scenario action `set_knob` names. The scenario parser
/// accepts only the names below, so no other name reaches this.
pub(crate) fn set_knob(knobs: &mut Knobs, knob: &str, value: bool) {
    match knob {
        "keep_full_wg_config" => knobs.keep_full_wg_config = value,
        "fake_icmp_echo" => knobs.fake_icmp_echo = value,
        _ => {}
    }
}
