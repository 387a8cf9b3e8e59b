//! The coordination state machine: the node table, the policy and the
//! per-node map streams.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::errors::{
    AdminError, DisconnectError, EndpointUpdateError, InputError, MapError, RegisterError,
};
use crate::keys::{DiscoKey, NodeKey, Timestamp};
use crate::nat::NatIssuer;
use crate::netmap::{
    DnsConfig, FilterRule, MapBody, MapResponse, NatMap, Netmap, NetmapDelta, Peer, PeerChange,
    SelfNode, TAILNET_IPV4_RANGE, TAILNET_IPV6_RANGE, WIRE_VERSION,
};
use crate::policy::{ClassKey, NodeFacts, Policy};

/// The first address of the IPv4 node range, 100.64.0.0, as a number.
const IPV4_BASE: u32 = 0x6440_0000;
/// Node address indices run from 1 to this (100.127.255.254).
const MAX_ADDRESS_INDEX: u32 = (1 << 22) - 2;
/// MagicDNS's resolver, 100.100.100.100, is never a node address.
const MAGIC_DNS_INDEX: u32 = 0x6464_6464 - IPV4_BASE;
/// The first 48 bits of every node's IPv6 address.
const IPV6_BASE: [u16; 3] = [0xfd7a, 0x115c, 0xa1e0];
/// The text every auth key starts with.
const AUTH_KEY_PREFIX: &str = "wgmesh-auth-";

/// What a control state machine is created with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    /// The tailnet's DNS domain: node `host` is `host.<tailnet_name>`.
    pub tailnet_name: String,
    /// The resolvers nodes are told to use.
    pub nameservers: Vec<IpAddr>,
    /// How long a node key stays valid after registration; `None`: forever.
    pub node_key_expiry: Option<Duration>,
    /// The most endpoints one node may report.
    pub max_endpoints: usize,
    /// The most subnet routes one node may advertise.
    pub max_advertised_routes: usize,
    /// The STUN servers and TURN relay nodes are told to use (checked with
    /// [`NatIssuer::check`] by whoever builds the config).
    pub nat: NatIssuer,
}

impl ControlConfig {
    /// Defaults for a tailnet named `tailnet_name`: MagicDNS's resolver,
    /// 180-day key expiry, 64 endpoints and 256 routes per node.
    pub fn new(tailnet_name: impl Into<String>) -> Self {
        Self {
            tailnet_name: tailnet_name.into(),
            nameservers: vec![IpAddr::V4(Ipv4Addr::new(100, 100, 100, 100))],
            node_key_expiry: Some(Duration::from_secs(180 * 24 * 3600)),
            max_endpoints: 64,
            max_advertised_routes: 256,
            nat: NatIssuer::default(),
        }
    }
}

/// A node asks to join the tailnet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// The node's WireGuard public key, its identity from now on.
    pub node_key: NodeKey,
    /// The auth key made by `CreateAuthKey`.
    pub auth_key: String,
    /// The node's host name; sanitised into a DNS label.
    pub hostname: String,
    /// Subnets it offers to route (approved by an admin or the policy).
    #[serde(default)]
    pub advertised_routes: Vec<IpNet>,
    /// An IPv4 tailnet address it wants (its IPv6 address follows from it);
    /// `None` lets control choose.
    #[serde(default)]
    pub requested_ipv4: Option<Ipv4Addr>,
}

/// A node opens its map stream (long-poll): after every start, with its new
/// disco key and its endpoints. The stream's first message is the full
/// netmap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapRequest {
    /// The node's key (authenticated by the transport).
    pub node_key: NodeKey,
    /// Its disco key for this run.
    pub disco_key: DiscoKey,
    /// Its UDP endpoints, best first.
    pub endpoints: Vec<SocketAddr>,
    /// Its relayed address (its TURN allocation), if it holds one.
    #[serde(default)]
    pub relay: Option<SocketAddr>,
}

/// A node reports the endpoints it has now (every local address with its
/// listen port, and what disco pongs revealed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointUpdate {
    /// The node (authenticated by the transport).
    pub node_key: NodeKey,
    /// Its endpoints now, best first.
    pub endpoints: Vec<SocketAddr>,
    /// Its relayed address now (its TURN allocation), if it holds one.
    #[serde(default)]
    pub relay: Option<SocketAddr>,
}

/// An admin command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminCommand {
    /// Makes a pre-auth key.
    CreateAuthKey {
        /// The user nodes registered with it belong to (`user@domain`).
        user: String,
        /// Whether it may register more than one node.
        reusable: bool,
        /// When it stops working; `None`: never.
        expiry: Option<Timestamp>,
        /// Tags given to the nodes it registers (`tag:NAME`).
        tags: Vec<String>,
    },
    /// Sets a node's approved routes (a subset of what it advertises).
    ApproveRoutes {
        /// The node.
        node: NodeKey,
        /// The routes it may route from now on.
        routes: Vec<IpNet>,
    },
    /// Expires a node's key now: it leaves every netmap until it registers again.
    ExpireNode {
        /// The node.
        node: NodeKey,
    },
    /// Deletes a node: it leaves every netmap and its address is freed.
    DeleteNode {
        /// The node.
        node: NodeKey,
    },
}

/// One thing that happened at the server.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Input {
    /// A node registers.
    Register(RegisterRequest),
    /// A node opens its map stream.
    MapRequest(MapRequest),
    /// A node reports new endpoints.
    EndpointUpdate(EndpointUpdate),
    /// A node's map stream closed (the connection dropped).
    Disconnect {
        /// The node.
        node_key: NodeKey,
        /// The stream that closed; a stale one (already replaced) changes nothing.
        stream: StreamId,
    },
    /// A new policy (parsed and checked with [`Policy::parse`]).
    SetPolicy(Box<Policy>),
    /// An admin command.
    Admin(AdminCommand),
    /// A record another replica of the server stored (shared database).
    Replicate(Replicated),
}

/// Names one map stream of one node.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct StreamId(pub u64);

/// What a successful input returns.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum InputOutcome {
    /// The node joined (or re-joined after expiry).
    Registered(Registration),
    /// The node's map stream is open; its full netmap is in the outputs.
    StreamOpened(StreamId),
    /// Endpoints stored; `changed` is false when they were the same.
    EndpointsUpdated {
        /// Whether the peers were told.
        changed: bool,
    },
    /// The disconnect was handled; `current` is false for a stale stream.
    Disconnected {
        /// Whether it was the node's current stream.
        current: bool,
    },
    /// The policy is in force; this many online nodes got a delta.
    PolicyApplied {
        /// Online nodes whose netmap changed.
        nodes_notified: usize,
    },
    /// An auth key was made.
    AuthKeyCreated(AuthKeyCreated),
    /// The node's approved routes are set.
    RoutesApproved,
    /// The node is expired.
    NodeExpired,
    /// The node is deleted.
    NodeDeleted,
    /// Another replica's record is applied.
    Replicated,
}

/// What a node learns when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// Its tailnet addresses.
    pub addresses: Vec<IpNet>,
    /// Its MagicDNS name.
    pub name: String,
    /// When its key expires.
    pub key_expiry: Option<Timestamp>,
    /// The advertised routes that are approved already (by the policy).
    pub approved_routes: Vec<IpNet>,
}

/// A new auth key. The secret is shown once and never again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthKeyCreated {
    /// Its public id (for listing).
    pub id: u64,
    /// The whole key, to give to `wgmeshd --authkey`.
    pub key: String,
}

/// Why a node's stream was closed by control.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The node opened a newer stream.
    Replaced,
    /// The node's key expired.
    KeyExpired,
    /// An admin deleted the node.
    Deleted,
}

/// Something control wants sent or done.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
#[non_exhaustive]
pub enum Output {
    /// Send this on the node's map stream.
    Map {
        /// The node.
        node_key: NodeKey,
        /// Its stream.
        stream: StreamId,
        /// The message.
        response: MapResponse,
    },
    /// Store this node's durable record (it is new or changed).
    StoreNode(Box<StoredNode>),
    /// Forget this node's durable record (an admin deleted it).
    ForgetNode(NodeKey),
    /// Store this auth key (it is new or was used).
    StoreAuthKey(Box<StoredAuthKey>),
    /// Close the node's map stream.
    CloseStream {
        /// The node.
        node_key: NodeKey,
        /// The stream.
        stream: StreamId,
        /// Why.
        reason: CloseReason,
    },
}

/// What control has done and refused since it started.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Counters {
    /// Registrations accepted.
    pub registrations: u64,
    /// Map streams opened.
    pub streams_opened: u64,
    /// Endpoint updates accepted.
    pub endpoint_updates: u64,
    /// Disconnects handled.
    pub disconnects: u64,
    /// Policies put in force.
    pub policy_changes: u64,
    /// Admin commands carried out.
    pub admin_commands: u64,
    /// Nodes expired (by time or by an admin).
    pub nodes_expired: u64,
    /// Full netmaps sent.
    pub full_netmaps_sent: u64,
    /// Deltas sent.
    pub deltas_sent: u64,
    /// Peer entries (added, removed or changed) in the deltas sent.
    pub delta_peer_entries: u64,
    /// Sets of relay credentials issued (full netmaps and refreshes).
    pub relay_credentials_issued: u64,
    /// Refused inputs by [`InputError::kind`].
    pub refused: BTreeMap<&'static str, u64>,
}

/// The durable state of a tailnet: what a server stores, and what a
/// restarted server is built from with [`Control::restore`]. Map streams
/// and online state are not in it (every node is offline after a restart
/// until it polls again).
///
/// A server keeps it current from the [`Output::StoreNode`],
/// [`Output::ForgetNode`] and [`Output::StoreAuthKey`] outputs, one record
/// per change, so it never writes the whole tailnet for one change.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TailnetState {
    /// Every node, expired ones included (their addresses stay reserved).
    pub nodes: Vec<StoredNode>,
    /// Every auth key.
    pub auth_keys: Vec<StoredAuthKey>,
}

/// One node's durable record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredNode {
    /// Its key.
    pub node_key: NodeKey,
    /// Its last disco key.
    pub disco_key: Option<DiscoKey>,
    /// Its last endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// Its last relayed address (its TURN allocation). Stored like the
    /// endpoints so that replicas tell their nodes about it too.
    #[serde(default)]
    pub relay: Option<SocketAddr>,
    /// Its IPv4 tailnet address (the IPv6 one follows from it).
    pub ipv4: Ipv4Addr,
    /// The routes it advertises.
    pub advertised_routes: Vec<IpNet>,
    /// The routes approved for it.
    pub approved_routes: Vec<IpNet>,
    /// Its DNS label (unique in the tailnet).
    pub hostname: String,
    /// Its user.
    pub user: String,
    /// Its tags.
    pub tags: Vec<String>,
    /// When its key expires.
    pub key_expiry: Option<Timestamp>,
    /// Whether its key expired.
    pub expired: bool,
}

/// One auth key's durable record, secret included: the store must be kept
/// private.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAuthKey {
    /// Its id.
    pub id: u64,
    /// Its secret, 16 bytes.
    pub secret: [u8; 16],
    /// The user of the nodes it registers.
    pub user: String,
    /// Whether it may be used more than once.
    pub reusable: bool,
    /// When it stops working.
    pub expiry: Option<Timestamp>,
    /// The tags it gives.
    pub tags: Vec<String>,
    /// How many nodes it registered.
    pub uses: u64,
}

/// Why a stored state could not be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// Two records have the same node key.
    #[error("node {0:?} is stored twice")]
    DuplicateNode(NodeKey),
    /// A node's address is not a node address of the tailnet.
    #[error("node {node:?} has address {addr}, outside the tailnet")]
    AddressOutsideTailnet {
        /// The node.
        node: NodeKey,
        /// Its address.
        addr: Ipv4Addr,
    },
    /// Two nodes have the same address.
    #[error("address {0} is stored for two nodes")]
    DuplicateAddress(Ipv4Addr),
    /// Two nodes have the same disco key.
    #[error("disco key {0:?} is stored for two nodes")]
    DuplicateDiscoKey(DiscoKey),
    /// Two nodes have the same host name, or one is not a DNS label.
    #[error("host name {0:?} is stored twice or is not a DNS label")]
    BadHostname(String),
    /// Two auth keys have the same id.
    #[error("auth key {0} is stored twice")]
    DuplicateAuthKey(u64),
}

/// A read-only view of one node, for admin listings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// Its key.
    pub node_key: NodeKey,
    /// Its current disco key.
    pub disco_key: Option<DiscoKey>,
    /// Its MagicDNS name.
    pub name: String,
    /// Its user.
    pub user: String,
    /// Its tags.
    pub tags: Vec<String>,
    /// Its tailnet addresses.
    pub addresses: Vec<IpNet>,
    /// The routes it advertises.
    pub advertised_routes: Vec<IpNet>,
    /// The routes approved for it.
    pub approved_routes: Vec<IpNet>,
    /// Its endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// Whether its map stream is open.
    pub online: bool,
    /// Whether its key expired.
    pub expired: bool,
    /// When its key expires.
    pub key_expiry: Option<Timestamp>,
}

/// A read-only view of an auth key (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthKeyView {
    /// Its id.
    pub id: u64,
    /// The user of the nodes it registers.
    pub user: String,
    /// Whether it may be used more than once.
    pub reusable: bool,
    /// When it stops working.
    pub expiry: Option<Timestamp>,
    /// The tags it gives.
    pub tags: Vec<String>,
    /// How many nodes it registered.
    pub uses: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct NodeId(u64);

#[derive(Debug, Clone, Copy)]
struct Stream {
    id: StreamId,
    next_seq: u64,
}

#[derive(Debug, Clone)]
struct NodeRecord {
    node_key: NodeKey,
    disco_key: Option<DiscoKey>,
    endpoints: Vec<SocketAddr>,
    address_index: u32,
    addresses: Vec<IpNet>,
    advertised_routes: Vec<IpNet>,
    approved_routes: Vec<IpNet>,
    hostname: String,
    user: String,
    tags: Vec<String>,
    key_expiry: Option<Timestamp>,
    expired: bool,
    stream: Option<Stream>,
    /// The policy class while the node is live (not expired).
    class: Option<usize>,
    /// Its relayed address, as it last reported it.
    relay: Option<SocketAddr>,
    /// When its relay credentials are due to be issued again (while its
    /// stream is open).
    nat_refresh_at: Option<Timestamp>,
}

impl NodeRecord {
    fn facts(&self) -> NodeFacts<'_> {
        NodeFacts {
            user: &self.user,
            tags: &self.tags,
            addresses: &self.addresses,
            routes: &self.approved_routes,
        }
    }

    fn allowed_ips(&self) -> Vec<IpNet> {
        let mut ips = self.addresses.clone();
        ips.extend(self.approved_routes.iter().copied());
        ips
    }
}

#[derive(Debug, Clone)]
struct AuthKey {
    secret: [u8; 16],
    user: String,
    reusable: bool,
    expiry: Option<Timestamp>,
    tags: Vec<String>,
    uses: u64,
}

/// The live nodes grouped by policy class, and which classes see each other.
#[derive(Debug, Clone, Default)]
struct Classes {
    by_key: BTreeMap<ClassKey, usize>,
    keys: Vec<ClassKey>,
    members: Vec<BTreeSet<NodeId>>,
    /// For each class, the classes visible from it (itself included when
    /// its members see each other), sorted.
    visible: Vec<Vec<usize>>,
}

impl Classes {
    fn class_for(&mut self, policy: &Policy, key: ClassKey) -> usize {
        if let Some(id) = self.by_key.get(&key) {
            return *id;
        }
        let id = self.keys.len();
        let mut visible = Vec::new();
        for (other, other_key) in self.keys.iter().enumerate() {
            if policy.visible(&key, other_key) {
                visible.push(other);
                self.visible[other].push(id);
            }
        }
        if policy.visible(&key, &key) {
            visible.push(id);
        }
        self.by_key.insert(key.clone(), id);
        self.keys.push(key);
        self.members.push(BTreeSet::new());
        self.visible.push(visible);
        id
    }

    fn peers_of(&self, class: usize, me: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        self.visible[class]
            .iter()
            .flat_map(|c| self.members[*c].iter().copied())
            .filter(move |m| *m != me)
    }
}

/// What one online node is owed at the end of the current input.
#[derive(Debug, Default)]
struct Pending {
    full: bool,
    added: BTreeSet<NodeId>,
    removed: BTreeSet<NodeKey>,
    changed: BTreeMap<NodeId, PeerChange>,
    filter: bool,
    self_node: bool,
    /// Fresh NAT settings (relay credentials) are due.
    nat: bool,
}

/// The coordination server as a sans-IO state machine.
///
/// One input, then drain [`Control::poll_output`] until `None`, then read
/// [`Control::poll_timeout`] and call [`Control::handle_timeout`] when it
/// passes:
///
/// ```text
/// let mut control = Control::new(config, policy, now, seed);
/// control.handle_input(now, Input::Register(..))?;   // or MapRequest, SetPolicy, Admin, ...
/// while let Some(out) = control.poll_output() { /* send Map on the stream, close streams */ }
/// let deadline = control.poll_timeout();             // the next key expiry
/// control.handle_timeout(now);                       // idempotent; early calls are no-ops
/// ```
///
/// Control never reads a clock or the OS RNG: `now` comes in, and auth-key
/// secrets come from a ChaCha20 RNG seeded by the caller. A refused input is
/// a typed [`InputError`], is counted, and changes nothing.
///
/// Cost: a node's first map is O(its peers + its filter). Every later change
/// of one node (restart with a new disco key, new endpoints, online state)
/// is pushed as a delta to its online peers only, O(its peers) work and
/// bytes: the node table is indexed by policy *class* (the set of policy
/// selectors a node matches), and a node's peers are the members of the
/// classes visible from its own. A policy change recomputes every node.
#[derive(Debug)]
pub struct Control {
    config: ControlConfig,
    policy: Policy,
    rng: ChaCha20Rng,
    now: Timestamp,
    nodes: BTreeMap<NodeId, NodeRecord>,
    next_node_id: u64,
    by_key: BTreeMap<NodeKey, NodeId>,
    by_disco: BTreeMap<DiscoKey, NodeId>,
    by_address_index: BTreeMap<u32, NodeId>,
    by_hostname: BTreeMap<String, NodeId>,
    /// The next `-N` suffix to try per host name, so a thousand nodes
    /// called "laptop" cost one lookup each, not a scan of the taken ones.
    next_hostname_suffix: BTreeMap<String, u64>,
    next_address_index: u32,
    auth_keys: BTreeMap<u64, AuthKey>,
    next_auth_key_id: u64,
    classes: Classes,
    expiries: BTreeSet<(Timestamp, NodeId)>,
    /// When each online node's relay credentials are due again.
    nat_refreshes: BTreeSet<(Timestamp, NodeId)>,
    next_stream_id: u64,
    pending: BTreeMap<NodeId, Pending>,
    outputs: VecDeque<Output>,
    counters: Counters,
}

impl Control {
    /// A tailnet with no nodes under `policy`.
    pub fn new(config: ControlConfig, policy: Policy, now: Timestamp, seed: u64) -> Self {
        Self {
            config,
            policy,
            rng: ChaCha20Rng::seed_from_u64(seed),
            now,
            nodes: BTreeMap::new(),
            next_node_id: 1,
            by_key: BTreeMap::new(),
            by_disco: BTreeMap::new(),
            by_address_index: BTreeMap::new(),
            by_hostname: BTreeMap::new(),
            next_hostname_suffix: BTreeMap::new(),
            next_address_index: 1,
            auth_keys: BTreeMap::new(),
            next_auth_key_id: 1,
            classes: Classes::default(),
            expiries: BTreeSet::new(),
            nat_refreshes: BTreeSet::new(),
            next_stream_id: 1,
            pending: BTreeMap::new(),
            outputs: VecDeque::new(),
            counters: Counters::default(),
        }
    }

    /// A control built from stored state (after a server restart). Every
    /// node starts offline; expiries already passed are applied at the
    /// first [`Control::handle_timeout`]. New addresses are allocated after
    /// the highest stored one, new auth-key ids after the highest stored id.
    pub fn restore(
        config: ControlConfig,
        policy: Policy,
        state: TailnetState,
        now: Timestamp,
        seed: u64,
    ) -> Result<Self, RestoreError> {
        let mut control = Self::new(config, policy, now, seed);
        for stored in state.auth_keys {
            if control.auth_keys.contains_key(&stored.id) {
                return Err(RestoreError::DuplicateAuthKey(stored.id));
            }
            control.next_auth_key_id = control.next_auth_key_id.max(stored.id.saturating_add(1));
            control.auth_keys.insert(
                stored.id,
                AuthKey {
                    secret: stored.secret,
                    user: stored.user,
                    reusable: stored.reusable,
                    expiry: stored.expiry,
                    tags: stored.tags,
                    uses: stored.uses,
                },
            );
        }
        for stored in state.nodes {
            let id = NodeId(control.next_node_id);
            control.next_node_id += 1;
            if control.by_key.insert(stored.node_key, id).is_some() {
                return Err(RestoreError::DuplicateNode(stored.node_key));
            }
            let address_index =
                index_of(stored.ipv4).ok_or(RestoreError::AddressOutsideTailnet {
                    node: stored.node_key,
                    addr: stored.ipv4,
                })?;
            if control.by_address_index.insert(address_index, id).is_some() {
                return Err(RestoreError::DuplicateAddress(stored.ipv4));
            }
            control.next_address_index = control.next_address_index.max(next_index(address_index));
            if let Some(disco) = stored.disco_key {
                if control.by_disco.insert(disco, id).is_some() {
                    return Err(RestoreError::DuplicateDiscoKey(disco));
                }
            }
            if sanitize_hostname(&stored.hostname).as_deref() != Some(stored.hostname.as_str())
                || control
                    .by_hostname
                    .insert(stored.hostname.clone(), id)
                    .is_some()
            {
                return Err(RestoreError::BadHostname(stored.hostname));
            }
            if let (Some(at), false) = (stored.key_expiry, stored.expired) {
                control.expiries.insert((at, id));
            }
            control.nodes.insert(
                id,
                NodeRecord {
                    node_key: stored.node_key,
                    disco_key: stored.disco_key,
                    endpoints: stored.endpoints,
                    address_index,
                    addresses: vec![
                        IpNet::from(IpAddr::V4(ipv4_of(address_index))),
                        IpNet::from(IpAddr::V6(ipv6_of(address_index))),
                    ],
                    advertised_routes: stored.advertised_routes,
                    approved_routes: stored.approved_routes,
                    hostname: stored.hostname,
                    user: stored.user,
                    tags: stored.tags,
                    key_expiry: stored.key_expiry,
                    expired: stored.expired,
                    stream: None,
                    class: None,
                    relay: stored.relay,
                    nat_refresh_at: None,
                },
            );
        }
        let ids: Vec<NodeId> = control.nodes.keys().copied().collect();
        for id in ids {
            let record = &control.nodes[&id];
            if record.expired {
                continue;
            }
            let key = control.policy.class_of(&record.facts());
            let class = control.classes.class_for(&control.policy, key);
            control.classes.members[class].insert(id);
            control.nodes.get_mut(&id).expect("restored node").class = Some(class);
        }
        Ok(control)
    }

    /// The durable state, for a first write of a store or a check of one.
    pub fn state(&self) -> TailnetState {
        TailnetState {
            nodes: self.nodes.keys().map(|id| self.stored_node(*id)).collect(),
            auth_keys: self
                .auth_keys
                .keys()
                .map(|id| self.stored_auth_key(*id))
                .collect(),
        }
    }

    fn stored_node(&self, id: NodeId) -> StoredNode {
        let n = &self.nodes[&id];
        StoredNode {
            node_key: n.node_key,
            disco_key: n.disco_key,
            endpoints: n.endpoints.clone(),
            relay: n.relay,
            ipv4: ipv4_of(n.address_index),
            advertised_routes: n.advertised_routes.clone(),
            approved_routes: n.approved_routes.clone(),
            hostname: n.hostname.clone(),
            user: n.user.clone(),
            tags: n.tags.clone(),
            key_expiry: n.key_expiry,
            expired: n.expired,
        }
    }

    fn stored_auth_key(&self, id: u64) -> StoredAuthKey {
        let k = &self.auth_keys[&id];
        StoredAuthKey {
            id,
            secret: k.secret,
            user: k.user.clone(),
            reusable: k.reusable,
            expiry: k.expiry,
            tags: k.tags.clone(),
            uses: k.uses,
        }
    }

    fn persist_node(&mut self, id: NodeId) {
        let stored = self.stored_node(id);
        self.outputs.push_back(Output::StoreNode(Box::new(stored)));
    }

    fn persist_auth_key(&mut self, id: u64) {
        let stored = self.stored_auth_key(id);
        self.outputs
            .push_back(Output::StoreAuthKey(Box::new(stored)));
    }

    /// Handles one input. On error nothing changed and the refusal is
    /// counted. Drain [`Control::poll_output`] afterwards.
    pub fn handle_input(
        &mut self,
        now: Timestamp,
        input: Input,
    ) -> Result<InputOutcome, InputError> {
        self.now = self.now.max(now);
        let result = match input {
            Input::Register(request) => self.register(request).map_err(InputError::from),
            Input::MapRequest(request) => self.map_request(request).map_err(InputError::from),
            Input::EndpointUpdate(EndpointUpdate {
                node_key,
                endpoints,
                relay,
            }) => self
                .endpoint_update(node_key, endpoints, relay)
                .map_err(InputError::from),
            Input::Disconnect { node_key, stream } => {
                self.disconnect(node_key, stream).map_err(InputError::from)
            }
            Input::SetPolicy(policy) => Ok(self.set_policy(*policy)),
            Input::Admin(command) => self.admin(command).map_err(InputError::from),
            Input::Replicate(record) => self.replicate(record).map_err(InputError::from),
        };
        match &result {
            Ok(_) => self.flush(),
            Err(error) => {
                tracing::debug!(kind = error.kind(), %error, "control input refused");
                *self.counters.refused.entry(error.kind()).or_default() += 1;
                debug_assert!(self.pending.is_empty(), "a refused input queued deltas");
                self.pending.clear();
            }
        }
        result
    }

    /// The next thing to send or do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`Control::handle_timeout`] has work: the next key expiry or
    /// the next node due fresh relay credentials.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let expiry = self.expiries.first().map(|(at, _)| *at);
        let refresh = self.nat_refreshes.first().map(|(at, _)| *at);
        match (expiry, refresh) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Expires the nodes whose key expiry has passed and sends fresh relay
    /// credentials to the nodes whose are half used. Early calls do
    /// nothing.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.now = self.now.max(now);
        while let Some(&(at, id)) = self.expiries.first() {
            if at > self.now {
                break;
            }
            self.expiries.pop_first();
            self.expire(id);
        }
        while let Some(&(at, id)) = self.nat_refreshes.first() {
            if at > self.now {
                break;
            }
            self.nat_refreshes.pop_first();
            let due = self
                .nodes
                .get(&id)
                .is_some_and(|n| n.nat_refresh_at == Some(at));
            if due {
                if let Some(pending) = self.pending_for(id) {
                    pending.nat = true;
                }
            }
        }
        self.flush();
    }

    /// Issues node `id` its NAT settings (fresh relay credentials) and
    /// schedules the next issue.
    fn issue_nat(&mut self, id: NodeId) -> NatMap {
        let Some(record) = self.nodes.get(&id) else {
            return NatMap::default();
        };
        let (nat, refresh_at) = self.config.nat.issue(&record.hostname, self.now);
        let record = self.nodes.get_mut(&id).expect("node checked above");
        if let Some(old) = record.nat_refresh_at.take() {
            self.nat_refreshes.remove(&(old, id));
        }
        record.nat_refresh_at = refresh_at;
        if let Some(at) = refresh_at {
            self.nat_refreshes.insert((at, id));
        }
        if nat.relay.is_some() {
            self.counters.relay_credentials_issued += 1;
        }
        nat
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Every node, in registration order.
    pub fn nodes(&self) -> Vec<NodeView> {
        self.nodes.values().map(|n| self.view(n)).collect()
    }

    /// One node.
    pub fn node(&self, key: &NodeKey) -> Option<NodeView> {
        let id = self.by_key.get(key)?;
        self.nodes.get(id).map(|n| self.view(n))
    }

    /// Every auth key, without secrets.
    pub fn auth_keys(&self) -> Vec<AuthKeyView> {
        self.auth_keys
            .iter()
            .map(|(id, k)| AuthKeyView {
                id: *id,
                user: k.user.clone(),
                reusable: k.reusable,
                expiry: k.expiry,
                tags: k.tags.clone(),
                uses: k.uses,
            })
            .collect()
    }

    /// The full netmap a live node would get now (`None` for an unknown or
    /// expired node). The streams use the same code.
    pub fn netmap(&self, key: &NodeKey) -> Option<Netmap> {
        let id = *self.by_key.get(key)?;
        let record = self.nodes.get(&id)?;
        record.class?;
        Some(self.build_netmap(id))
    }

    fn view(&self, n: &NodeRecord) -> NodeView {
        NodeView {
            node_key: n.node_key,
            disco_key: n.disco_key,
            name: self.fqdn(&n.hostname),
            user: n.user.clone(),
            tags: n.tags.clone(),
            addresses: n.addresses.clone(),
            advertised_routes: n.advertised_routes.clone(),
            approved_routes: n.approved_routes.clone(),
            endpoints: n.endpoints.clone(),
            online: n.stream.is_some(),
            expired: n.expired,
            key_expiry: n.key_expiry,
        }
    }

    fn fqdn(&self, hostname: &str) -> String {
        format!("{hostname}.{}", self.config.tailnet_name)
    }

    // ------------------------------------------------------------------
    // Register
    // ------------------------------------------------------------------

    fn register(&mut self, request: RegisterRequest) -> Result<InputOutcome, RegisterError> {
        if request.node_key.is_zero() {
            return Err(RegisterError::BadNodeKey);
        }
        let key_id = self.check_auth_key(&request.auth_key)?;
        let existing = self.by_key.get(&request.node_key).copied();
        if let Some(id) = existing {
            if !self.nodes[&id].expired {
                return Err(RegisterError::AlreadyRegistered(request.node_key));
            }
        }
        let label = sanitize_hostname(&request.hostname)
            .ok_or_else(|| RegisterError::BadHostname(request.hostname.clone()))?;
        let routes = self.check_routes(&request.advertised_routes)?;
        let address_index = match (existing, request.requested_ipv4) {
            (Some(id), requested) => {
                let held = self.nodes[&id].address_index;
                if let Some(requested) = requested {
                    if requested != ipv4_of(held) {
                        return Err(RegisterError::CannotMoveAddress {
                            held: IpAddr::V4(ipv4_of(held)),
                            requested: IpAddr::V4(requested),
                        });
                    }
                }
                held
            }
            (None, Some(requested)) => {
                let index = index_of(requested)
                    .ok_or(RegisterError::AddressOutsideTailnet(IpAddr::V4(requested)))?;
                if let Some(holder) = self.by_address_index.get(&index) {
                    return Err(RegisterError::AddressInUse {
                        addr: IpAddr::V4(requested),
                        holder: self.nodes[holder].node_key,
                    });
                }
                index
            }
            (None, None) => self.free_address_index()?,
        };

        // Every check passed: from here on the state changes.
        let auth = self.auth_keys.get_mut(&key_id).expect("checked above");
        auth.uses += 1;
        let (user, tags) = (auth.user.clone(), auth.tags.clone());
        let key_expiry = self
            .config
            .node_key_expiry
            .map(|d| self.now.saturating_add(d));
        let id = match existing {
            Some(id) => {
                let record = self.nodes.get_mut(&id).expect("existing node");
                record.expired = false;
                record.user = user;
                record.tags = tags;
                record.key_expiry = key_expiry;
                record.advertised_routes = routes;
                record
                    .approved_routes
                    .retain(|r| record.advertised_routes.contains(r));
                let approved = mem::take(&mut record.approved_routes);
                let kept: Vec<IpNet> = approved
                    .into_iter()
                    .filter(|r| self.single_address_holder(r, id).is_none())
                    .collect();
                self.nodes
                    .get_mut(&id)
                    .expect("existing node")
                    .approved_routes = kept;
                // The node was in no netmap while expired, so a new name
                // reaches its peers with the whole record when it rejoins.
                if self.nodes[&id].hostname != label {
                    let old = self.nodes[&id].hostname.clone();
                    self.by_hostname.remove(&old);
                    let hostname = self.unique_hostname(&label);
                    self.by_hostname.insert(hostname.clone(), id);
                    self.nodes.get_mut(&id).expect("existing node").hostname = hostname;
                }
                id
            }
            None => {
                let id = NodeId(self.next_node_id);
                self.next_node_id += 1;
                let hostname = self.unique_hostname(&label);
                self.by_hostname.insert(hostname.clone(), id);
                self.by_key.insert(request.node_key, id);
                self.by_address_index.insert(address_index, id);
                self.next_address_index = next_index(address_index);
                self.nodes.insert(
                    id,
                    NodeRecord {
                        node_key: request.node_key,
                        disco_key: None,
                        endpoints: Vec::new(),
                        address_index,
                        addresses: vec![
                            IpNet::from(IpAddr::V4(ipv4_of(address_index))),
                            IpNet::from(IpAddr::V6(ipv6_of(address_index))),
                        ],
                        advertised_routes: routes,
                        approved_routes: Vec::new(),
                        hostname,
                        user,
                        tags,
                        key_expiry,
                        expired: false,
                        stream: None,
                        class: None,
                        relay: None,
                        nat_refresh_at: None,
                    },
                );
                id
            }
        };
        self.auto_approve(id);
        if let Some(at) = key_expiry {
            self.expiries.insert((at, id));
        }
        self.reclassify(id, false);
        self.persist_auth_key(key_id);
        self.persist_node(id);
        self.counters.registrations += 1;
        let record = &self.nodes[&id];
        tracing::info!(node = %record.node_key.short(), name = %record.hostname, "node registered");
        Ok(InputOutcome::Registered(Registration {
            addresses: record.addresses.clone(),
            name: self.fqdn(&record.hostname),
            key_expiry: record.key_expiry,
            approved_routes: record.approved_routes.clone(),
        }))
    }

    fn check_auth_key(&self, text: &str) -> Result<u64, RegisterError> {
        let (id, secret) = parse_auth_key(text).ok_or(RegisterError::UnknownAuthKey)?;
        let key = self
            .auth_keys
            .get(&id)
            .ok_or(RegisterError::UnknownAuthKey)?;
        if !constant_time_eq(&key.secret, &secret) {
            return Err(RegisterError::UnknownAuthKey);
        }
        if key.expiry.is_some_and(|at| at <= self.now) {
            return Err(RegisterError::AuthKeyExpired);
        }
        if !key.reusable && key.uses > 0 {
            return Err(RegisterError::AuthKeyUsed);
        }
        Ok(id)
    }

    fn check_routes(&self, routes: &[IpNet]) -> Result<Vec<IpNet>, RegisterError> {
        if routes.len() > self.config.max_advertised_routes {
            return Err(RegisterError::TooManyRoutes {
                count: routes.len(),
                max: self.config.max_advertised_routes,
            });
        }
        let tailnet: [IpNet; 2] = [
            TAILNET_IPV4_RANGE.parse().expect("constant prefix"),
            TAILNET_IPV6_RANGE.parse().expect("constant prefix"),
        ];
        let mut out = Vec::with_capacity(routes.len());
        for route in routes {
            let route = route.trunc();
            if route.prefix_len() == 0 {
                return Err(RegisterError::ExitNodeNotSupported(route));
            }
            if tailnet
                .iter()
                .any(|t| t.contains(&route) || route.contains(t))
            {
                return Err(RegisterError::RouteOverlapsTailnet(route));
            }
            out.push(route);
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn free_address_index(&self) -> Result<u32, RegisterError> {
        let mut index = self.next_address_index;
        for _ in 0..MAX_ADDRESS_INDEX {
            if index != MAGIC_DNS_INDEX && !self.by_address_index.contains_key(&index) {
                return Ok(index);
            }
            index = next_index(index);
        }
        Err(RegisterError::AddressSpaceExhausted)
    }

    fn unique_hostname(&mut self, label: &str) -> String {
        if !self.by_hostname.contains_key(label) {
            return label.to_string();
        }
        let first = self.next_hostname_suffix.get(label).copied().unwrap_or(2);
        let (n, name) = (first..)
            .map(|n| {
                let suffix = format!("-{n}");
                let keep = 63 - suffix.len();
                let base = label.get(..keep.min(label.len())).unwrap_or(label);
                (n, format!("{base}{suffix}"))
            })
            .find(|(_, candidate)| !self.by_hostname.contains_key(candidate))
            .expect("some suffix is free");
        self.next_hostname_suffix.insert(label.to_string(), n + 1);
        name
    }

    /// Approves the advertised routes the policy approves on its own.
    /// Returns whether the approved set grew.
    fn auto_approve(&mut self, id: NodeId) -> bool {
        let record = &self.nodes[&id];
        let approve: Vec<IpNet> = record
            .advertised_routes
            .iter()
            .filter(|r| !record.approved_routes.contains(r))
            .filter(|r| self.policy.auto_approves(&record.facts(), r))
            .filter(|r| self.single_address_holder(r, id).is_none())
            .copied()
            .collect();
        if approve.is_empty() {
            return false;
        }
        let record = self.nodes.get_mut(&id).expect("node exists");
        record.approved_routes.extend(approve);
        record.approved_routes.sort();
        true
    }

    /// The other live node that has `route` approved, when `route` is a
    /// single address: a node's engine refuses a single address in the
    /// AllowedIPs of two peers, so such a route is approved on one node at
    /// a time. Subnets may be approved on several (the engine picks one by
    /// longest-prefix match). The scan over all nodes runs only for
    /// single-address routes, which are rare and only change on admin
    /// commands, registrations and policy changes.
    fn single_address_holder(&self, route: &IpNet, except: NodeId) -> Option<NodeId> {
        if route.prefix_len() != route.max_prefix_len() {
            return None;
        }
        self.nodes
            .iter()
            .find(|(id, n)| **id != except && !n.expired && n.approved_routes.contains(route))
            .map(|(id, _)| *id)
    }

    // ------------------------------------------------------------------
    // Map streams
    // ------------------------------------------------------------------

    fn live_node(&self, key: &NodeKey) -> Result<NodeId, (bool, NodeKey)> {
        let id = *self.by_key.get(key).ok_or((false, *key))?;
        if self.nodes[&id].expired {
            return Err((true, *key));
        }
        Ok(id)
    }

    fn map_request(&mut self, request: MapRequest) -> Result<InputOutcome, MapError> {
        let id = self
            .live_node(&request.node_key)
            .map_err(|(expired, key)| {
                if expired {
                    MapError::NodeExpired(key)
                } else {
                    MapError::UnknownNode(key)
                }
            })?;
        if request.disco_key.is_zero() {
            return Err(MapError::BadDiscoKey);
        }
        if let Some(holder) = self.by_disco.get(&request.disco_key) {
            if *holder != id {
                return Err(MapError::DiscoKeyInUse(self.nodes[holder].node_key));
            }
        }
        if request.endpoints.len() > self.config.max_endpoints {
            return Err(MapError::TooManyEndpoints {
                count: request.endpoints.len(),
                max: self.config.max_endpoints,
            });
        }
        if let Some(relay) = request.relay {
            if !crate::nat::usable_server(relay) {
                return Err(MapError::BadRelay(relay));
            }
        }

        let stream = StreamId(self.next_stream_id);
        self.next_stream_id += 1;
        let record = self.nodes.get_mut(&id).expect("live node");
        let mut change = PeerChange::new(record.node_key);
        if record.disco_key != Some(request.disco_key) {
            if let Some(old) = record.disco_key {
                self.by_disco.remove(&old);
            }
            self.by_disco.insert(request.disco_key, id);
            record.disco_key = Some(request.disco_key);
            change.disco_key = Some(request.disco_key);
        }
        if record.endpoints != request.endpoints {
            record.endpoints = request.endpoints;
            change.endpoints = Some(record.endpoints.clone());
        }
        if record.relay != request.relay {
            record.relay = request.relay;
            change.relay = Some(record.relay);
        }
        let replaced = record.stream.replace(Stream {
            id: stream,
            next_seq: 0,
        });
        match replaced {
            Some(old) => self.outputs.push_back(Output::CloseStream {
                node_key: request.node_key,
                stream: old.id,
                reason: CloseReason::Replaced,
            }),
            None => change.online = Some(true),
        }
        self.notify_peers(id, &change);
        if change.disco_key.is_some() || change.endpoints.is_some() || change.relay.is_some() {
            self.persist_node(id);
        }
        self.pending.insert(
            id,
            Pending {
                full: true,
                ..Pending::default()
            },
        );
        self.counters.streams_opened += 1;
        tracing::debug!(node = %request.node_key.short(), stream = stream.0, "map stream opened");
        Ok(InputOutcome::StreamOpened(stream))
    }

    fn endpoint_update(
        &mut self,
        node_key: NodeKey,
        endpoints: Vec<SocketAddr>,
        relay: Option<SocketAddr>,
    ) -> Result<InputOutcome, EndpointUpdateError> {
        let id = self.live_node(&node_key).map_err(|(expired, key)| {
            if expired {
                EndpointUpdateError::NodeExpired(key)
            } else {
                EndpointUpdateError::UnknownNode(key)
            }
        })?;
        if endpoints.len() > self.config.max_endpoints {
            return Err(EndpointUpdateError::TooManyEndpoints {
                count: endpoints.len(),
                max: self.config.max_endpoints,
            });
        }
        if let Some(relay) = relay {
            if !crate::nat::usable_server(relay) {
                return Err(EndpointUpdateError::BadRelay(relay));
            }
        }
        self.counters.endpoint_updates += 1;
        let record = self.nodes.get_mut(&id).expect("live node");
        if record.endpoints == endpoints && record.relay == relay {
            return Ok(InputOutcome::EndpointsUpdated { changed: false });
        }
        let mut change = PeerChange::new(node_key);
        if record.endpoints != endpoints {
            record.endpoints = endpoints;
            change.endpoints = Some(record.endpoints.clone());
        }
        if record.relay != relay {
            record.relay = relay;
            change.relay = Some(relay);
        }
        self.notify_peers(id, &change);
        self.persist_node(id);
        Ok(InputOutcome::EndpointsUpdated { changed: true })
    }

    fn disconnect(
        &mut self,
        node_key: NodeKey,
        stream: StreamId,
    ) -> Result<InputOutcome, DisconnectError> {
        let id = *self
            .by_key
            .get(&node_key)
            .ok_or(DisconnectError::UnknownNode(node_key))?;
        self.counters.disconnects += 1;
        let record = self.nodes.get_mut(&id).expect("known node");
        if record.stream.map(|s| s.id) != Some(stream) {
            return Ok(InputOutcome::Disconnected { current: false });
        }
        record.stream = None;
        self.pending.remove(&id);
        let change = PeerChange {
            online: Some(false),
            ..PeerChange::new(node_key)
        };
        self.notify_peers(id, &change);
        Ok(InputOutcome::Disconnected { current: true })
    }

    /// Queues `change` (of node `id`) to each of its online peers.
    fn notify_peers(&mut self, id: NodeId, change: &PeerChange) {
        if change.is_empty() {
            return;
        }
        let Some(class) = self.nodes[&id].class else {
            return;
        };
        let peers: Vec<NodeId> = self.classes.peers_of(class, id).collect();
        for peer in peers {
            self.queue_change(peer, id, change.clone());
        }
    }

    // ------------------------------------------------------------------
    // Policy and admin
    // ------------------------------------------------------------------

    fn set_policy(&mut self, policy: Policy) -> InputOutcome {
        // The filters before the change, so only changed ones are sent.
        let online: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.stream.is_some() && n.class.is_some())
            .map(|(id, _)| *id)
            .collect();
        let old_filters: BTreeMap<NodeId, Vec<FilterRule>> = online
            .iter()
            .map(|id| (*id, self.filter_for(*id)))
            .collect();
        let old_classes = mem::take(&mut self.classes);
        let old_class_of: BTreeMap<NodeId, usize> = self
            .nodes
            .iter()
            .filter_map(|(id, n)| n.class.map(|c| (*id, c)))
            .collect();
        self.policy = policy;

        let mut routes_changed = BTreeSet::new();
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in &ids {
            if self.auto_approve(*id) {
                routes_changed.insert(*id);
            }
            let record = &self.nodes[id];
            let class = (!record.expired).then(|| {
                let key = self.policy.class_of(&record.facts());
                self.classes.class_for(&self.policy, key)
            });
            if let Some(class) = class {
                self.classes.members[class].insert(*id);
            }
            self.nodes.get_mut(id).expect("node exists").class = class;
        }
        for id in &ids {
            let old: BTreeSet<NodeId> = old_class_of
                .get(id)
                .map(|c| old_classes.peers_of(*c, *id).collect())
                .unwrap_or_default();
            let new: BTreeSet<NodeId> = self.nodes[id]
                .class
                .map(|c| self.classes.peers_of(c, *id).collect())
                .unwrap_or_default();
            for gone in old.difference(&new) {
                let key = self.nodes[gone].node_key;
                self.queue_removed(*id, *gone, key);
            }
            for came in new.difference(&old) {
                self.queue_added(*id, *came);
            }
            for kept in old.intersection(&new) {
                if routes_changed.contains(kept) {
                    let change = PeerChange {
                        allowed_ips: Some(self.nodes[kept].allowed_ips()),
                        ..PeerChange::new(self.nodes[kept].node_key)
                    };
                    self.queue_change(*id, *kept, change);
                }
            }
            if routes_changed.contains(id) {
                self.queue_self(*id);
            }
        }
        for id in &routes_changed {
            self.persist_node(*id);
        }
        for (id, old_filter) in old_filters {
            if self.nodes[&id].class.is_some() && self.filter_for(id) != old_filter {
                self.queue_filter(id);
            }
        }
        self.counters.policy_changes += 1;
        // Every queued entry is a real change: peers and filters are only
        // queued when they differ.
        let nodes_notified = self.pending.len();
        tracing::info!(nodes_notified, "policy applied");
        InputOutcome::PolicyApplied { nodes_notified }
    }

    fn admin(&mut self, command: AdminCommand) -> Result<InputOutcome, AdminError> {
        let outcome = match command {
            AdminCommand::CreateAuthKey {
                user,
                reusable,
                expiry,
                tags,
            } => {
                let (name, domain) = user.split_once('@').unwrap_or(("", ""));
                if name.is_empty() || domain.is_empty() || user.contains(char::is_whitespace) {
                    return Err(AdminError::BadUser(user));
                }
                for tag in &tags {
                    let valid = tag.strip_prefix("tag:").is_some_and(|name| {
                        !name.is_empty()
                            && name
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                    });
                    if !valid {
                        return Err(AdminError::BadTag(tag.clone()));
                    }
                }
                if expiry.is_some_and(|at| at <= self.now) {
                    return Err(AdminError::ExpiryInPast);
                }
                let id = self.next_auth_key_id;
                self.next_auth_key_id += 1;
                let mut secret = [0u8; 16];
                self.rng.fill_bytes(&mut secret);
                let mut tags = tags;
                tags.sort();
                tags.dedup();
                self.auth_keys.insert(
                    id,
                    AuthKey {
                        secret,
                        user,
                        reusable,
                        expiry,
                        tags,
                        uses: 0,
                    },
                );
                self.persist_auth_key(id);
                InputOutcome::AuthKeyCreated(AuthKeyCreated {
                    id,
                    key: format_auth_key(id, &secret),
                })
            }
            AdminCommand::ApproveRoutes { node, routes } => {
                let id = *self
                    .by_key
                    .get(&node)
                    .ok_or(AdminError::UnknownNode(node))?;
                let mut routes: Vec<IpNet> = routes.iter().map(IpNet::trunc).collect();
                routes.sort();
                routes.dedup();
                let record = &self.nodes[&id];
                if let Some(missing) = routes
                    .iter()
                    .find(|r| !record.advertised_routes.contains(r))
                {
                    return Err(AdminError::RouteNotAdvertised(*missing));
                }
                if let Some((route, holder)) = routes
                    .iter()
                    .find_map(|r| self.single_address_holder(r, id).map(|h| (*r, h)))
                {
                    return Err(AdminError::RouteApprovedElsewhere {
                        route,
                        holder: self.nodes[&holder].node_key,
                    });
                }
                if record.approved_routes != routes {
                    self.nodes
                        .get_mut(&id)
                        .expect("node exists")
                        .approved_routes = routes;
                    self.reclassify(id, true);
                    self.persist_node(id);
                }
                InputOutcome::RoutesApproved
            }
            AdminCommand::ExpireNode { node } => {
                let id = *self
                    .by_key
                    .get(&node)
                    .ok_or(AdminError::UnknownNode(node))?;
                if let Some(at) = self.nodes[&id].key_expiry {
                    self.expiries.remove(&(at, id));
                }
                let was_expired = self.nodes[&id].expired;
                self.nodes.get_mut(&id).expect("node exists").key_expiry = Some(self.now);
                self.expire(id);
                if was_expired {
                    // `expire` stored the record unless it had nothing to do.
                    self.persist_node(id);
                }
                InputOutcome::NodeExpired
            }
            AdminCommand::DeleteNode { node } => {
                let id = *self
                    .by_key
                    .get(&node)
                    .ok_or(AdminError::UnknownNode(node))?;
                if let Some(at) = self.nodes[&id].key_expiry {
                    self.expiries.remove(&(at, id));
                }
                self.take_offline(id, CloseReason::Deleted);
                let record = self.nodes.remove(&id).expect("node exists");
                self.by_key.remove(&record.node_key);
                self.by_address_index.remove(&record.address_index);
                self.by_hostname.remove(&record.hostname);
                if let Some(disco) = record.disco_key {
                    self.by_disco.remove(&disco);
                }
                self.outputs.push_back(Output::ForgetNode(record.node_key));
                tracing::info!(node = %record.node_key.short(), "node deleted");
                InputOutcome::NodeDeleted
            }
        };
        self.counters.admin_commands += 1;
        Ok(outcome)
    }

    /// Marks a node expired: it leaves every netmap and its stream closes.
    fn expire(&mut self, id: NodeId) {
        if self.nodes[&id].expired {
            return;
        }
        self.take_offline(id, CloseReason::KeyExpired);
        self.nodes.get_mut(&id).expect("node exists").expired = true;
        self.counters.nodes_expired += 1;
        self.persist_node(id);
        tracing::info!(node = %self.nodes[&id].node_key.short(), "node expired");
    }

    /// Closes a node's stream and takes it out of every netmap.
    fn take_offline(&mut self, id: NodeId, reason: CloseReason) {
        let record = self.nodes.get_mut(&id).expect("node exists");
        record.expired = true;
        if let Some(stream) = record.stream.take() {
            self.outputs.push_back(Output::CloseStream {
                node_key: record.node_key,
                stream: stream.id,
                reason,
            });
        }
        self.pending.remove(&id);
        self.reclassify(id, false);
    }

    // ------------------------------------------------------------------
    // Classes and deltas
    // ------------------------------------------------------------------

    /// Moves a node to the class its current record belongs in (none when
    /// expired) and queues what that changes: peers added and removed on both
    /// sides, filters that name it, its own filter and record, and, when
    /// `allowed_ips_changed`, its new AllowedIPs to the peers that keep it.
    fn reclassify(&mut self, id: NodeId, allowed_ips_changed: bool) {
        let record = &self.nodes[&id];
        let node_key = record.node_key;
        let old_class = record.class;
        let new_key = (!record.expired).then(|| self.policy.class_of(&record.facts()));
        let nobody = vec![false; self.policy.selectors().len()];
        let old_key = old_class.map_or_else(|| nobody.clone(), |c| self.classes.keys[c].clone());
        let old: BTreeSet<NodeId> = old_class
            .map(|c| self.classes.peers_of(c, id).collect())
            .unwrap_or_default();
        if let Some(c) = old_class {
            self.classes.members[c].remove(&id);
        }
        let new_class = new_key
            .clone()
            .map(|key| self.classes.class_for(&self.policy, key));
        if let Some(c) = new_class {
            self.classes.members[c].insert(id);
        }
        self.nodes.get_mut(&id).expect("node exists").class = new_class;
        let new: BTreeSet<NodeId> = new_class
            .map(|c| self.classes.peers_of(c, id).collect())
            .unwrap_or_default();
        let new_key = new_key.unwrap_or(nobody);

        for gone in old.difference(&new) {
            self.queue_removed(*gone, id, node_key);
            let gone_key = self.nodes[gone].node_key;
            self.queue_removed(id, *gone, gone_key);
        }
        for came in new.difference(&old) {
            self.queue_added(*came, id);
            self.queue_added(id, *came);
        }
        if allowed_ips_changed {
            let change = PeerChange {
                allowed_ips: Some(self.nodes[&id].allowed_ips()),
                ..PeerChange::new(node_key)
            };
            for kept in old.intersection(&new) {
                self.queue_change(*kept, id, change.clone());
            }
            self.queue_self(id);
        }
        if old_key != new_key {
            for other in old.union(&new) {
                let Some(class) = self.nodes[other].class else {
                    continue;
                };
                if self
                    .policy
                    .filter_depends_on(&self.classes.keys[class], &old_key, &new_key)
                {
                    self.queue_filter(*other);
                }
            }
        }
        if allowed_ips_changed || old_key != new_key {
            self.queue_filter(id);
        }
    }

    fn pending_for(&mut self, to: NodeId) -> Option<&mut Pending> {
        let record = self.nodes.get(&to)?;
        if record.stream.is_none() || record.class.is_none() {
            // An offline node gets a full netmap when it next polls.
            return None;
        }
        Some(self.pending.entry(to).or_default())
    }

    fn queue_added(&mut self, to: NodeId, peer: NodeId) {
        if let Some(p) = self.pending_for(to) {
            p.added.insert(peer);
            p.changed.remove(&peer);
        }
    }

    fn queue_removed(&mut self, to: NodeId, peer: NodeId, peer_key: NodeKey) {
        if let Some(p) = self.pending_for(to) {
            p.changed.remove(&peer);
            // A peer added earlier in this same input was never sent.
            if !p.added.remove(&peer) {
                p.removed.insert(peer_key);
            }
        }
    }

    fn queue_change(&mut self, to: NodeId, peer: NodeId, change: PeerChange) {
        if let Some(p) = self.pending_for(to) {
            if p.full || p.added.contains(&peer) {
                return;
            }
            match p.changed.get_mut(&peer) {
                Some(existing) => existing.merge(change),
                None => {
                    p.changed.insert(peer, change);
                }
            }
        }
    }

    fn queue_filter(&mut self, to: NodeId) {
        if let Some(p) = self.pending_for(to) {
            p.filter = true;
        }
    }

    fn queue_self(&mut self, to: NodeId) {
        if let Some(p) = self.pending_for(to) {
            p.self_node = true;
        }
    }

    fn pending_delta(&self, to: NodeId, pending: Pending) -> Option<NetmapDelta> {
        let record = self.nodes.get(&to)?;
        record.stream?;
        let mut delta = NetmapDelta::default();
        let mut added: Vec<Peer> = pending
            .added
            .iter()
            .filter(|id| self.nodes.contains_key(id))
            .map(|id| self.peer_info(*id))
            .collect();
        added.sort_by_key(|p| p.node_key);
        delta.peers_added = added;
        delta.peers_removed = pending.removed.iter().copied().collect();
        let mut changed: Vec<PeerChange> = pending
            .changed
            .into_iter()
            .filter(|(id, c)| !pending.added.contains(id) && !c.is_empty())
            .map(|(_, c)| c)
            .collect();
        changed.sort_by_key(|c| c.node_key);
        delta.peers_changed = changed;
        if pending.filter {
            delta.packet_filter = Some(self.filter_for(to));
        }
        if pending.self_node {
            delta.self_node = Some(self.self_info(to));
        }
        Some(delta)
    }

    /// Turns what each node is owed into outputs.
    fn flush(&mut self) {
        let pending = mem::take(&mut self.pending);
        for (to, p) in pending {
            let Some(record) = self.nodes.get(&to) else {
                continue;
            };
            let Some(stream) = record.stream else {
                continue;
            };
            let node_key = record.node_key;
            let body = if p.full {
                self.counters.full_netmaps_sent += 1;
                let mut netmap = self.build_netmap(to);
                netmap.nat = self.issue_nat(to);
                MapBody::Full(Box::new(netmap))
            } else {
                let nat_due = p.nat;
                let Some(mut delta) = self.pending_delta(to, p) else {
                    continue;
                };
                if nat_due {
                    delta.nat = Some(self.issue_nat(to));
                }
                if delta.is_empty() {
                    continue;
                }
                self.counters.deltas_sent += 1;
                self.counters.delta_peer_entries += (delta.peers_added.len()
                    + delta.peers_removed.len()
                    + delta.peers_changed.len())
                    as u64;
                MapBody::Delta(Box::new(delta))
            };
            let record = self.nodes.get_mut(&to).expect("node exists");
            let stream_state = record.stream.as_mut().expect("stream checked above");
            let seq = stream_state.next_seq;
            stream_state.next_seq += 1;
            self.outputs.push_back(Output::Map {
                node_key,
                stream: stream.id,
                response: MapResponse {
                    wire_version: WIRE_VERSION,
                    seq,
                    body,
                },
            });
        }
    }

    // ------------------------------------------------------------------
    // Netmap building
    // ------------------------------------------------------------------

    fn peer_info(&self, id: NodeId) -> Peer {
        let n = &self.nodes[&id];
        Peer {
            node_key: n.node_key,
            disco_key: n.disco_key,
            name: self.fqdn(&n.hostname),
            allowed_ips: n.allowed_ips(),
            endpoints: n.endpoints.clone(),
            online: n.stream.is_some(),
            tags: n.tags.clone(),
            relay: n.relay,
        }
    }

    fn self_info(&self, id: NodeId) -> SelfNode {
        let n = &self.nodes[&id];
        SelfNode {
            node_key: n.node_key,
            name: self.fqdn(&n.hostname),
            addresses: n.addresses.clone(),
            advertised_routes: n.advertised_routes.clone(),
            primary_routes: n.approved_routes.clone(),
            tags: n.tags.clone(),
            key_expiry: n.key_expiry,
        }
    }

    fn filter_for(&self, id: NodeId) -> Vec<FilterRule> {
        let n = &self.nodes[&id];
        let Some(class) = n.class else {
            return Vec::new();
        };
        let classes = &self.classes;
        let nodes = &self.nodes;
        self.policy
            .filter_for(&n.facts(), &classes.keys[class], |selector| {
                let mut addresses = Vec::new();
                for (c, key) in classes.keys.iter().enumerate() {
                    if key[selector] {
                        for member in &classes.members[c] {
                            addresses.extend(nodes[member].addresses.iter().copied());
                        }
                    }
                }
                // Sorted so the filter's order depends on the addresses only,
                // not on how the nodes happen to be grouped into classes.
                addresses.sort();
                addresses
            })
    }

    fn build_netmap(&self, id: NodeId) -> Netmap {
        let mut peers: Vec<Peer> = match self.nodes[&id].class {
            Some(class) => self
                .classes
                .peers_of(class, id)
                .map(|p| self.peer_info(p))
                .collect(),
            None => Vec::new(),
        };
        peers.sort_by_key(|p| p.node_key);
        Netmap {
            self_node: self.self_info(id),
            peers,
            packet_filter: self.filter_for(id),
            dns: DnsConfig {
                domain: self.config.tailnet_name.clone(),
                nameservers: self.config.nameservers.clone(),
                search_domains: vec![self.config.tailnet_name.clone()],
            },
            // Issued in `flush`, which records when the credentials are due
            // again; a netmap built only to be looked at carries none.
            nat: NatMap::default(),
        }
    }
}

fn ipv4_of(index: u32) -> Ipv4Addr {
    Ipv4Addr::from(IPV4_BASE + index)
}

fn ipv6_of(index: u32) -> Ipv6Addr {
    let [a, b, c] = IPV6_BASE;
    Ipv6Addr::new(a, b, c, 0, 0, 0, (index >> 16) as u16, index as u16)
}

/// The address index of a requested IPv4 address, when it may be a node's.
fn index_of(addr: Ipv4Addr) -> Option<u32> {
    let index = u32::from(addr).checked_sub(IPV4_BASE)?;
    (1..=MAX_ADDRESS_INDEX)
        .contains(&index)
        .then_some(index)
        .filter(|i| *i != MAGIC_DNS_INDEX)
}

fn next_index(index: u32) -> u32 {
    if index >= MAX_ADDRESS_INDEX {
        1
    } else {
        index + 1
    }
}

/// Lowercases a host name into one DNS label: letters, digits and '-',
/// at most 63 characters. `None` when nothing usable is left.
fn sanitize_hostname(hostname: &str) -> Option<String> {
    let first_label = hostname.split('.').next().unwrap_or("");
    let mut label: String = first_label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    label = label.trim_matches('-').to_string();
    label.truncate(63);
    let label = label.trim_end_matches('-').to_string();
    (!label.is_empty()).then_some(label)
}

fn format_auth_key(id: u64, secret: &[u8; 16]) -> String {
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    format!("{AUTH_KEY_PREFIX}{id:08x}-{hex}")
}

fn parse_auth_key(text: &str) -> Option<(u64, [u8; 16])> {
    let rest = text.trim().strip_prefix(AUTH_KEY_PREFIX)?;
    let (id, hex) = rest.split_once('-')?;
    let id = u64::from_str_radix(id, 16).ok()?;
    if hex.len() != 32 || !hex.is_ascii() {
        return None;
    }
    let mut secret = [0u8; 16];
    for (i, byte) in secret.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some((id, secret))
}

/// Compares secrets without an early exit, so timing does not tell how
/// much of a guess was right.
fn constant_time_eq(a: &[u8; 16], b: &[u8; 16]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

mod replicate;
pub use replicate::Replicated;

#[cfg(test)]
mod tests;
