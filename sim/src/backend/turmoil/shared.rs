//! The turmoil backend's shared state: what the outer loop and every host
//! read and write (all on one thread, behind one mutex), the commands the
//! loop sends a node's agent, and the coordination server with its clients.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU16;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ipnet::IpNet;
use rand_chacha::ChaCha20Rng;
use tokio::sync::mpsc;
use wgmesh_core::{DiscoPrivateKey, LinkChange, NodePrivateKey, NodePublicKey, PingKind};

use super::control::ControlPlane;
use crate::evaluate::Probes;
use crate::trace::{Category, Trace};
use crate::world::address::{tailnet_ip4, tailnet_ip6};
use crate::world::control::Apply;
use crate::world::records::{FlowRecord, PingRecord, StreamRecord, Violation};

/// What the outer loop asks a node's agent to do.
pub(super) enum Cmd {
    Apply(Apply),
    Ping {
        index: usize,
        ip: IpAddr,
        kind: PingKind,
        size: usize,
    },
    /// One datagram of a stream, built by the outer loop, for the OS to
    /// hand to the engine.
    Datagram(Vec<u8>),
    Probe {
        expect: usize,
        peer: NodePublicKey,
    },
    Counters,
    Close,
    Link(LinkChange),
    /// The network model's settings for the engine: the NAT settings (at
    /// start) and the node's local endpoints.
    Nat {
        config: Option<wgmesh_core::NatConfig>,
        local: Vec<std::net::SocketAddr>,
    },
}

/// State shared by the outer loop and every host (all on one thread).
pub(super) struct Shared {
    pub(super) now: Duration,
    pub(super) names: Vec<String>,
    pub(super) keys: Vec<NodePrivateKey>,
    pub(super) disco: Vec<DiscoPrivateKey>,
    /// Each node's disco key before its current one, if it restarted.
    pub(super) previous_disco: Vec<Option<DiscoPrivateKey>>,
    /// Nodes whose next start goes back to `previous_disco`
    /// (`restore_disco_key`) instead of drawing a new key.
    pub(super) restore_disco: Vec<bool>,
    pub(super) incarnation: Vec<u64>,
    /// When each node's current incarnation came up (or will come up after
    /// a restart's downtime): control learns its new disco key from then.
    pub(super) up_at: Vec<Duration>,
    /// Every node's turmoil address, by index.
    pub(super) addresses: Vec<IpAddr>,
    /// Pairs of nodes (lower index first) a partition cuts.
    pub(super) cut: BTreeSet<(usize, usize)>,
    /// (from, to) pairs a one-way partition cuts.
    pub(super) one_way_cuts: BTreeSet<(usize, usize)>,
    /// Nodes whose link is down.
    pub(super) link_down: BTreeSet<usize>,
    pub(super) key_rng: ChaCha20Rng,
    pub(super) cmds: Vec<Option<mpsc::UnboundedSender<Cmd>>>,
    pub(super) trace: Trace,
    pub(super) pings: Vec<PingRecord>,
    pub(super) streams: Vec<StreamRecord>,
    pub(super) probes: Probes,
    pub(super) counters: Vec<Vec<(&'static str, u64)>>,
    /// The counters of each node's closed engines, added up.
    pub(super) earlier_counters: Vec<Vec<(&'static str, u64)>>,
    pub(super) violations: Vec<Violation>,
    pub(super) seed: u64,
    pub(super) control: ControlPlane,
    pub(super) ports: Vec<u16>,
    pub(super) next_ports: Vec<Arc<AtomicU16>>,
    pub(super) pending_move: Vec<Option<u16>>,
    pub(super) subnets: Vec<Vec<IpNet>>,
    /// Nodes whose OS never answers flows (`silent_service`).
    pub(super) silent_service: Vec<bool>,
    pub(super) flows: Vec<FlowRecord>,
    /// Flow timers the hosts started (a flow that moved on to its request),
    /// for the outer loop to take.
    pub(super) flow_timers: Vec<(Duration, usize, u32)>,
    /// The network model, for a scenario that asks for one.
    pub(super) fabric: Option<super::fabric::TurmoilFabric>,
}

impl Shared {
    pub(super) fn is_ours(&self, i: usize, ip: IpAddr) -> bool {
        ip == IpAddr::V4(tailnet_ip4(i))
            || ip == IpAddr::V6(tailnet_ip6(i))
            || self.subnets[i].iter().any(|n| n.contains(&ip))
    }

    pub(super) fn log(
        &mut self,
        node: Option<usize>,
        category: Category,
        kind: &'static str,
        detail: String,
    ) {
        let name = node.map_or("-", |i| self.names[i].as_str()).to_string();
        self.trace.record(self.now, &name, category, kind, detail);
    }

    /// The name of the node at `addr` (any port), or the address itself.
    pub(super) fn node_name_at(&self, addr: SocketAddr) -> String {
        self.addresses
            .iter()
            .position(|a| *a == addr.ip())
            .map_or_else(|| addr.to_string(), |j| self.names[j].clone())
    }

    /// Why a datagram from node `i` to `dst` is lost on the way (turmoil
    /// drops it silently), as the event backend names it; `None` when it
    /// travels.
    pub(super) fn cut_reason(&self, i: usize, dst: SocketAddr) -> Option<&'static str> {
        let j = self.addresses.iter().position(|a| *a == dst.ip())?;
        if self.link_down.contains(&i) || self.link_down.contains(&j) {
            Some("link-down")
        } else if self.cut.contains(&(i.min(j), i.max(j))) || self.one_way_cuts.contains(&(i, j)) {
            Some("partition")
        } else {
            None
        }
    }

    pub(super) fn peer_name(&self, key: &NodePublicKey) -> String {
        self.keys
            .iter()
            .position(|k| k.public_key() == *key)
            .map_or_else(|| key.short(), |i| self.names[i].clone())
    }
}

pub(super) type SharedRef = Arc<Mutex<Shared>>;

/// Sends `cmd` to node `node`'s agent (dropped while the node has none).
pub(super) fn send(shared: &SharedRef, node: usize, cmd: Cmd) {
    if let Some(tx) = &lock(shared).cmds[node] {
        let _ = tx.send(cmd);
    }
}

pub(super) fn lock(shared: &SharedRef) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}
