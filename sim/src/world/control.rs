//! The coordination server of the simulated world: the real
//! `wgmesh_control::Control` state machine behind a [`ControlHost`], and the
//! node side of it, one [`ControlClient`] per node. Both backends use them;
//! only how a message travels (the event queue or the turmoil loop) differs.
//!
//! What travels between them is what the HTTP server and a node exchange:
//! registration with the auth key the world created, a map request after
//! every (re)start with the node's disco key and endpoints, endpoint updates,
//! and the control crate's JSON map responses (the full netmap that opens a
//! stream, then deltas). Each message takes the node's control latency
//! (half its control delay each way) and may be lost or cut by a partition
//! like any datagram.
//!
//! The transport under a map stream is modelled the way a long-poll over TCP
//! behaves: the server sends a keep-alive with the stream's last sequence
//! number every [`KEEPALIVE`], a client that sees a sequence gap or hears
//! nothing for [`STREAM_SILENCE`] reconnects (and gets a full netmap), a
//! server restart closes every stream, a killed node's connection closes at
//! the server, and a client whose request goes unanswered retries with
//! exponential backoff from [`RETRY_FIRST`] to [`RETRY_MAX`].
//!
//! What is not control's: the knobs and the persistent keepalive are the
//! node's own settings in the simulator (the control crate's netmap carries
//! neither), so a client builds them into every reconfig it makes.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use wgmesh_control::{
    AdminCommand, Control, ControlConfig, EndpointUpdate, Input, InputOutcome, MapBody, MapRequest,
    MapResponse, Netmap, NodeKey, Output, Policy, RegisterRequest, StoredAuthKey, StoredNode,
    StreamId, TailnetState, Timestamp,
};
use wgmesh_core::filter::{FilterAction, FilterRule, PacketFilter};
use wgmesh_core::{
    DiscoPublicKey, DnsConfig, Knobs, NodePublicKey, PeerConfig, PeerDelta, Reconfig, RouterConfig,
    WgConfig,
};

use super::EPOCH_SECS;
use super::address::WG_PORT;

/// The tailnet's DNS name: node `host` is `host.tailnet.example`.
pub const TAILNET_NAME: &str = "tailnet.example";
/// The user every node is registered by.
pub const SIM_USER: &str = "sim@tailnet.example";
/// How often the server sends a keep-alive on an open map stream.
pub const KEEPALIVE: Duration = Duration::from_secs(30);
/// How long a client waits without any message on its stream before it
/// reconnects: two keep-alives and some slack.
pub const STREAM_SILENCE: Duration = Duration::from_secs(65);
/// How long a client waits for the first message of a stream it asked for.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The first retry delay after a failed request; it doubles on each failure.
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest retry delay.
pub const RETRY_MAX: Duration = Duration::from_secs(30);

/// The control crate's wall-clock time at virtual time `now`.
pub(crate) fn timestamp(now: Duration) -> Timestamp {
    Timestamp::from_unix_secs(EPOCH_SECS).saturating_add(now)
}

/// The control crate's key for a core node key.
pub(crate) fn control_key(key: &NodePublicKey) -> NodeKey {
    NodeKey(*key.as_bytes())
}

/// What the `set_allowed_ips` action asks for a node whose tailnet
/// addresses are `ip4` and `ip6`, on either backend.
pub(crate) struct AllowedIpsChange {
    /// The action's trace detail: the listed prefixes, comma-separated.
    pub(crate) detail: String,
    /// The node's own addresses, which stay its AllowedIPs whatever the list.
    pub(crate) own: [IpNet; 2],
    /// The other listed prefixes: the routes the admin approves.
    pub(crate) routes: Vec<IpNet>,
}

impl AllowedIpsChange {
    /// Splits `allowed_ips` into the node's own addresses and its routes.
    pub(crate) fn new(allowed_ips: &[IpNet], ip4: Ipv4Addr, ip6: Ipv6Addr) -> Self {
        let detail = allowed_ips
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let own = [IpNet::from(IpAddr::V4(ip4)), IpNet::from(IpAddr::V6(ip6))];
        let routes = allowed_ips
            .iter()
            .filter(|n| !own.contains(n))
            .copied()
            .collect();
        Self {
            detail,
            own,
            routes,
        }
    }
}

/// A message from a node to the server.
#[derive(Debug, Clone)]
pub(crate) enum ToControl {
    /// Join the tailnet (once per node key).
    Register(RegisterRequest),
    /// Open a map stream (after every start, and to reconnect).
    Map(MapRequest),
    /// The node's endpoints changed.
    Endpoints(EndpointUpdate),
    /// The node's connection for `stream` closed (the node was killed).
    Disconnect {
        /// The node.
        node_key: NodeKey,
        /// Its stream.
        stream: StreamId,
    },
}

impl ToControl {
    /// A short name for the trace.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            ToControl::Register(_) => "register",
            ToControl::Map(_) => "map-request",
            ToControl::Endpoints(_) => "endpoint-update",
            ToControl::Disconnect { .. } => "disconnect",
        }
    }
}

/// A message from the server to a node.
#[derive(Debug, Clone)]
pub(crate) enum FromControl {
    /// One message of a map stream: the control crate's JSON bytes.
    Map {
        /// The server's incarnation (stream ids restart with the server).
        epoch: u64,
        /// The stream.
        stream: StreamId,
        /// The JSON `MapResponse`.
        bytes: Vec<u8>,
    },
    /// The stream is alive; `last_seq` is the last sequence number sent on it.
    KeepAlive {
        /// The server's incarnation.
        epoch: u64,
        /// The stream.
        stream: StreamId,
        /// The last sequence number sent.
        last_seq: u64,
    },
    /// The server closed the stream (it restarts, or the node opened a newer one).
    Closed {
        /// The server's incarnation.
        epoch: u64,
        /// The stream.
        stream: StreamId,
    },
    /// The request was carried out (an endpoint update: the client sends
    /// it again until it hears this, as an HTTP client retries a request
    /// whose answer never came).
    Accepted {
        /// Which request.
        request: &'static str,
    },
    /// The request was refused (the server is down, or said no).
    Refused {
        /// Which request.
        request: &'static str,
        /// Why.
        reason: String,
    },
}

impl FromControl {
    /// A short name and the bytes on the wire, for the trace.
    pub(crate) fn describe(&self) -> (&'static str, usize) {
        match self {
            FromControl::Map { bytes, .. } => ("map", bytes.len()),
            FromControl::KeepAlive { .. } => ("keepalive", 0),
            FromControl::Closed { .. } => ("closed", 0),
            FromControl::Accepted { .. } => ("accepted", 0),
            FromControl::Refused { .. } => ("refused", 0),
        }
    }
}

/// What the server has sent, for the run report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ControlStats {
    /// Map messages (full netmaps and deltas) sent.
    pub maps_sent: u64,
    /// Full netmaps sent.
    pub full_sent: u64,
    /// Deltas sent.
    pub deltas_sent: u64,
    /// Bytes of map messages sent.
    pub map_bytes: u64,
    /// Bytes of full netmaps sent.
    pub full_bytes: u64,
    /// Bytes of deltas sent.
    pub delta_bytes: u64,
    /// Keep-alives sent.
    pub keepalives: u64,
    /// Requests the server handled (accepted or refused).
    pub requests: u64,
    /// Requests refused (by the control crate, or because the server was down).
    pub refused: u64,
    /// Server restarts.
    pub restarts: u64,
    /// Nodes with an open map stream at the server now.
    pub streams_open: u64,
}

impl ControlStats {
    /// Every count as `(name, value)`, in a fixed order.
    pub fn iter(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("control_maps_sent", self.maps_sent),
            ("control_full_sent", self.full_sent),
            ("control_deltas_sent", self.deltas_sent),
            ("control_map_bytes", self.map_bytes),
            ("control_full_bytes", self.full_bytes),
            ("control_delta_bytes", self.delta_bytes),
            ("control_keepalives", self.keepalives),
            ("control_requests", self.requests),
            ("control_refused", self.refused),
            ("control_restarts", self.restarts),
            ("control_streams_open", self.streams_open),
        ]
    }
}

/// The server's durable store, kept from the control crate's persistence
/// outputs one record at a time, as the server binary's database is.
#[derive(Debug, Default)]
struct Store {
    nodes: BTreeMap<NodeKey, StoredNode>,
    auth_keys: BTreeMap<u64, StoredAuthKey>,
}

impl Store {
    fn state(&self) -> TailnetState {
        TailnetState {
            nodes: self.nodes.values().cloned().collect(),
            auth_keys: self.auth_keys.values().cloned().collect(),
        }
    }
}

/// The coordination server as a host of the simulated world.
#[derive(Debug)]
pub(crate) struct ControlHost {
    /// The running state machine; `None` while the server is down.
    control: Option<Control>,
    config: ControlConfig,
    /// The policy in force (the server's policy file, kept across restarts).
    policy: Policy,
    store: Store,
    auth_key: String,
    seed: u64,
    /// Incremented at every restart; stream ids are per incarnation.
    pub(crate) epoch: u64,
    /// Node index by node key.
    node_index: BTreeMap<NodeKey, usize>,
    /// The open stream and its last sequence number, per node index.
    streams: BTreeMap<usize, (StreamId, u64)>,
    /// What was sent.
    pub(crate) stats: ControlStats,
}

/// A message for node `.0`.
pub(crate) type Outgoing = (usize, FromControl);

impl ControlHost {
    /// A server at virtual time zero under `policy`, with one reusable auth
    /// key (for [`SIM_USER`]) that every node registers with; `keys` are the
    /// nodes' keys by index.
    pub(crate) fn new(seed: u64, policy: Policy, keys: &[NodePublicKey]) -> Self {
        let config = ControlConfig::new(TAILNET_NAME);
        let mut control = Control::new(
            config.clone(),
            policy.clone(),
            timestamp(Duration::ZERO),
            seed,
        );
        let created = control.handle_input(
            timestamp(Duration::ZERO),
            Input::Admin(AdminCommand::CreateAuthKey {
                user: SIM_USER.into(),
                reusable: true,
                expiry: None,
                tags: Vec::new(),
            }),
        );
        let auth_key = match created {
            Ok(InputOutcome::AuthKeyCreated(created)) => created.key,
            // A constant user and no expiry cannot be refused.
            other => panic!("creating the simulator's auth key failed: {other:?}"),
        };
        let mut host = Self {
            control: Some(control),
            config,
            policy,
            store: Store::default(),
            auth_key,
            seed,
            epoch: 1,
            node_index: keys
                .iter()
                .enumerate()
                .map(|(i, k)| (control_key(k), i))
                .collect(),
            streams: BTreeMap::new(),
            stats: ControlStats::default(),
        };
        let mut ignored = Vec::new();
        host.drain(&mut ignored);
        host
    }

    /// The auth key nodes register with.
    pub(crate) fn auth_key(&self) -> &str {
        &self.auth_key
    }

    /// Whether the server is running.
    pub(crate) fn is_up(&self) -> bool {
        self.control.is_some()
    }

    /// The nodes with an open map stream, by index.
    pub(crate) fn open_streams(&self) -> usize {
        self.streams.len()
    }

    /// Handles one request from node `from` at `now`; returns what to send
    /// and a line for the trace.
    pub(crate) fn handle(
        &mut self,
        now: Duration,
        from: usize,
        message: ToControl,
    ) -> (Vec<Outgoing>, String) {
        self.stats.requests += 1;
        let kind = message.kind();
        let mut out = Vec::new();
        let Some(control) = self.control.as_mut() else {
            self.stats.refused += 1;
            if !matches!(message, ToControl::Disconnect { .. }) {
                out.push((
                    from,
                    FromControl::Refused {
                        request: kind,
                        reason: "connection refused: the server is down".into(),
                    },
                ));
            }
            return (out, format!("{kind} refused: server down"));
        };
        let ts = timestamp(now);
        let advertised = match &message {
            ToControl::Register(r) => r.advertised_routes.clone(),
            _ => Vec::new(),
        };
        let node_key = match &message {
            ToControl::Register(r) => r.node_key,
            ToControl::Map(r) => r.node_key,
            ToControl::Endpoints(r) => r.node_key,
            ToControl::Disconnect { node_key, .. } => *node_key,
        };
        let input = match message {
            ToControl::Register(r) => Input::Register(r),
            ToControl::Map(r) => Input::MapRequest(r),
            ToControl::Endpoints(r) => Input::EndpointUpdate(r),
            ToControl::Disconnect { node_key, stream } => Input::Disconnect { node_key, stream },
        };
        let result = control.handle_input(ts, input);
        let line = match &result {
            Ok(outcome) => format!("{kind} ok: {}", outcome_name(outcome)),
            Err(e) => {
                self.stats.refused += 1;
                format!("{kind} refused: {e}")
            }
        };
        if kind == "endpoint-update" && result.is_ok() {
            out.push((
                from,
                FromControl::Accepted {
                    request: "endpoint-update",
                },
            ));
        }
        if let Err(e) = &result {
            if !matches!(kind, "disconnect" | "endpoint-update") {
                out.push((
                    from,
                    FromControl::Refused {
                        request: kind,
                        reason: e.to_string(),
                    },
                ));
            }
        }
        // The world's admin approves every route a node advertises as it
        // joins, as an operator of a small tailnet would.
        if matches!(result, Ok(InputOutcome::Registered(_))) && !advertised.is_empty() {
            let approved = control.handle_input(
                ts,
                Input::Admin(AdminCommand::ApproveRoutes {
                    node: node_key,
                    routes: advertised,
                }),
            );
            if let Err(e) = approved {
                tracing::warn!(%e, "approving a simulated node's routes failed");
            }
        }
        self.drain(&mut out);
        self.stats.streams_open = self.streams.len() as u64;
        (out, line)
    }

    /// Puts a new policy in force now.
    pub(crate) fn set_policy(&mut self, now: Duration, policy: Policy) -> (Vec<Outgoing>, String) {
        self.policy = policy.clone();
        let mut out = Vec::new();
        let Some(control) = self.control.as_mut() else {
            return (out, "stored; the server is down".into());
        };
        let line = match control.handle_input(timestamp(now), Input::SetPolicy(Box::new(policy))) {
            Ok(outcome) => outcome_name(&outcome),
            Err(e) => format!("refused: {e}"),
        };
        self.drain(&mut out);
        (out, line)
    }

    /// Approves `routes` of node `node` (the admin command): the messages
    /// it makes, the trace line, and whether the server took the change.
    pub(crate) fn approve_routes(
        &mut self,
        now: Duration,
        node: NodeKey,
        routes: Vec<IpNet>,
    ) -> (Vec<Outgoing>, String, bool) {
        let mut out = Vec::new();
        let Some(control) = self.control.as_mut() else {
            return (out, "refused: the server is down".into(), false);
        };
        let (line, accepted) = match control.handle_input(
            timestamp(now),
            Input::Admin(AdminCommand::ApproveRoutes { node, routes }),
        ) {
            Ok(outcome) => (outcome_name(&outcome), true),
            Err(e) => (format!("refused: {e}"), false),
        };
        self.drain(&mut out);
        (out, line, accepted)
    }

    /// Stops the server: every open stream closes.
    pub(crate) fn stop(&mut self) -> Vec<Outgoing> {
        self.control = None;
        self.stats.restarts += 1;
        let epoch = self.epoch;
        self.stats.streams_open = 0;
        std::mem::take(&mut self.streams)
            .into_iter()
            .map(|(node, (stream, _))| (node, FromControl::Closed { epoch, stream }))
            .collect()
    }

    /// Starts the server again from its stored records.
    pub(crate) fn start(&mut self, now: Duration) -> String {
        self.epoch += 1;
        let state = self.store.state();
        let nodes = state.nodes.len();
        match Control::restore(
            self.config.clone(),
            self.policy.clone(),
            state,
            timestamp(now),
            self.seed.wrapping_add(self.epoch),
        ) {
            Ok(control) => {
                self.control = Some(control);
                format!("restored {nodes} nodes")
            }
            Err(e) => format!("restore failed: {e}"),
        }
    }

    /// Keep-alives for every open stream.
    pub(crate) fn keepalives(&mut self) -> Vec<Outgoing> {
        let epoch = self.epoch;
        let out: Vec<Outgoing> = self
            .streams
            .iter()
            .map(|(node, (stream, last_seq))| {
                (
                    *node,
                    FromControl::KeepAlive {
                        epoch,
                        stream: *stream,
                        last_seq: *last_seq,
                    },
                )
            })
            .collect();
        self.stats.keepalives += out.len() as u64;
        out
    }

    /// Takes the state machine's outputs: map messages to send (counted),
    /// closes, and records for the store.
    fn drain(&mut self, out: &mut Vec<Outgoing>) {
        let Some(control) = self.control.as_mut() else {
            return;
        };
        let epoch = self.epoch;
        while let Some(output) = control.poll_output() {
            match output {
                Output::Map {
                    node_key,
                    stream,
                    response,
                } => {
                    let Some(&node) = self.node_index.get(&node_key) else {
                        continue;
                    };
                    let bytes = response.to_json();
                    let size = bytes.len() as u64;
                    self.stats.maps_sent += 1;
                    self.stats.map_bytes += size;
                    match response.body {
                        MapBody::Full(_) => {
                            self.stats.full_sent += 1;
                            self.stats.full_bytes += size;
                        }
                        MapBody::Delta(_) => {
                            self.stats.deltas_sent += 1;
                            self.stats.delta_bytes += size;
                        }
                    }
                    self.streams.insert(node, (stream, response.seq));
                    out.push((
                        node,
                        FromControl::Map {
                            epoch,
                            stream,
                            bytes,
                        },
                    ));
                }
                Output::CloseStream {
                    node_key, stream, ..
                } => {
                    if let Some(&node) = self.node_index.get(&node_key) {
                        if self.streams.get(&node).is_some_and(|(s, _)| *s == stream) {
                            self.streams.remove(&node);
                        }
                        out.push((node, FromControl::Closed { epoch, stream }));
                    }
                }
                Output::StoreNode(node) => {
                    self.store.nodes.insert(node.node_key, *node);
                }
                Output::ForgetNode(key) => {
                    self.store.nodes.remove(&key);
                }
                Output::StoreAuthKey(key) => {
                    self.store.auth_keys.insert(key.id, *key);
                }
                other => tracing::warn!(?other, "control output the simulator does not know"),
            }
        }
    }

    /// Notes that node `node`'s stream `stream` closed at the server (a
    /// disconnect was handled), so no keep-alive goes to it any more.
    pub(crate) fn forget_stream(&mut self, node: usize, stream: StreamId) {
        if self.streams.get(&node).is_some_and(|(s, _)| *s == stream) {
            self.streams.remove(&node);
        }
        self.stats.streams_open = self.streams.len() as u64;
    }
}

fn outcome_name(outcome: &InputOutcome) -> String {
    match outcome {
        InputOutcome::Registered(r) => format!("registered {}", r.name),
        InputOutcome::StreamOpened(s) => format!("stream {}", s.0),
        InputOutcome::EndpointsUpdated { changed } => format!("endpoints changed={changed}"),
        InputOutcome::Disconnected { current } => format!("disconnected current={current}"),
        InputOutcome::PolicyApplied { nodes_notified } => {
            format!("policy applied, {nodes_notified} nodes notified")
        }
        InputOutcome::AuthKeyCreated(k) => format!("auth key {}", k.id),
        InputOutcome::RoutesApproved => "routes approved".into(),
        InputOutcome::NodeExpired => "node expired".into(),
        InputOutcome::NodeDeleted => "node deleted".into(),
        other => format!("{other:?}"),
    }
}

/// What a client asks its node (and the network) to do.
#[derive(Debug)]
pub(crate) enum ClientAction {
    /// Send this to the server.
    Send(ToControl),
    /// Give the engine this.
    Apply(Apply),
    /// Write this line into the trace.
    Log(&'static str, String),
}

/// What a client gives its engine.
#[derive(Debug)]
pub(crate) enum Apply {
    /// The whole desired state (the first netmap, or a change of the node's
    /// own record, routes or knobs).
    Reconfig(Box<Reconfig>),
    /// Peers added, changed or removed (`Input::PeerDelta`).
    Delta(PeerDelta),
    /// The packet filter compiled from the policy.
    Filter(PacketFilter),
}

/// Where a client's connection to the server stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting to try again at the deadline.
    Backoff,
    /// A map request is out; waiting for its first message until the deadline.
    Requesting,
    /// A stream is open.
    Streaming { epoch: u64, stream: StreamId },
}

/// How a node's settings that are not control's are built into its config.
#[derive(Debug, Clone, Default)]
pub(crate) struct LocalSettings {
    /// The knobs the node runs with.
    pub knobs: Knobs,
    /// The persistent keepalive configured per peer key (the simulator's
    /// per-node `keepalive_s`).
    pub keepalives: BTreeMap<NodeKey, u16>,
    /// Apply every change as a full reconfig instead of a peer delta (the
    /// turmoil backend: the production driver has no peer-delta request).
    pub deltas_as_reconfig: bool,
}

/// A node's side of control: registration, its map stream, and the netmap
/// it has, turned into engine inputs. Sans-IO: it returns [`ClientAction`]s
/// and a deadline ([`ControlClient::deadline`]).
#[derive(Debug)]
pub(crate) struct ControlClient {
    node_key: NodeKey,
    hostname: String,
    subnets: Vec<IpNet>,
    ipv4: Ipv4Addr,
    registered: bool,
    disco: DiscoPublicKey,
    endpoints: Vec<SocketAddr>,
    /// The endpoints the last map request carried: ones that changed while
    /// it was in flight (a STUN answer right after the start) are sent as
    /// an update once its stream opens, or the server would keep the old
    /// ones until the next reconnect.
    endpoints_requested: Vec<SocketAddr>,
    phase: Phase,
    deadline: Option<Duration>,
    /// When an endpoint update sent on the stream is sent again unless the
    /// server accepted it by then: without it, one lost update left peers
    /// with the old endpoint for good (`sim/tests/soak.rs`: three pairs
    /// never answered after a node moved).
    endpoints_unconfirmed: Option<Duration>,
    backoff: Duration,
    netmap: Option<Netmap>,
    next_seq: u64,
    /// Full netmaps, deltas and refusals seen, for the trace.
    pub(crate) maps_applied: u64,
}

impl ControlClient {
    /// A client for a node that has not registered yet; it asks for the
    /// address `ipv4` (the simulator's address plan).
    pub(crate) fn new(
        node_key: NodeKey,
        hostname: String,
        subnets: Vec<IpNet>,
        ipv4: Ipv4Addr,
    ) -> Self {
        Self {
            node_key,
            hostname,
            subnets,
            ipv4,
            registered: false,
            disco: DiscoPublicKey([0; 32]),
            endpoints: Vec::new(),
            endpoints_requested: Vec::new(),
            phase: Phase::Backoff,
            deadline: None,
            endpoints_unconfirmed: None,
            backoff: RETRY_FIRST,
            netmap: None,
            next_seq: 0,
            maps_applied: 0,
        }
    }

    /// When [`ControlClient::on_timer`] has work.
    pub(crate) fn deadline(&self) -> Option<Duration> {
        match (self.deadline, self.endpoints_unconfirmed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The endpoint update of the open stream's connection, which is sent
    /// again at `now` plus [`REQUEST_TIMEOUT`] unless accepted by then.
    fn endpoint_update(&mut self, now: Duration) -> ClientAction {
        self.endpoints_unconfirmed = Some(now + REQUEST_TIMEOUT);
        ClientAction::Send(ToControl::Endpoints(EndpointUpdate {
            node_key: self.node_key,
            endpoints: self.endpoints.clone(),
            relay: None,
        }))
    }

    /// The open stream, when there is one.
    pub(crate) fn stream(&self) -> Option<(u64, StreamId)> {
        match self.phase {
            Phase::Streaming { epoch, stream } => Some((epoch, stream)),
            Phase::Backoff | Phase::Requesting => None,
        }
    }

    /// The node (re)started with `disco` and `endpoints`: it forgets the
    /// netmap of its previous run (the engine is new) and connects.
    pub(crate) fn start(
        &mut self,
        now: Duration,
        disco: DiscoPublicKey,
        endpoints: Vec<SocketAddr>,
        auth_key: &str,
    ) -> Vec<ClientAction> {
        self.disco = disco;
        self.endpoints = endpoints;
        self.netmap = None;
        self.backoff = RETRY_FIRST;
        self.connect(now, auth_key)
    }

    /// Sends the registration (first time only) and a map request.
    fn connect(&mut self, now: Duration, auth_key: &str) -> Vec<ClientAction> {
        let mut out = Vec::new();
        if !self.registered {
            out.push(ClientAction::Send(ToControl::Register(RegisterRequest {
                node_key: self.node_key,
                auth_key: auth_key.to_string(),
                hostname: self.hostname.clone(),
                advertised_routes: self.subnets.clone(),
                requested_ipv4: Some(self.ipv4),
            })));
        }
        self.endpoints_requested = self.endpoints.clone();
        // The map request carries the endpoints.
        self.endpoints_unconfirmed = None;
        out.push(ClientAction::Send(ToControl::Map(MapRequest {
            node_key: self.node_key,
            disco_key: wgmesh_control::DiscoKey(*self.disco.as_bytes()),
            endpoints: self.endpoints.clone(),
            relay: None,
        })));
        self.phase = Phase::Requesting;
        self.deadline = Some(now + REQUEST_TIMEOUT);
        out
    }

    /// Waits before the next attempt, doubling the wait each time.
    fn back_off(&mut self, now: Duration, why: String) -> Vec<ClientAction> {
        self.phase = Phase::Backoff;
        self.deadline = Some(now + self.backoff);
        let line = format!("{why}; retry in {} ms", self.backoff.as_millis());
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
        vec![ClientAction::Log("control-retry", line)]
    }

    /// The deadline passed.
    pub(crate) fn on_timer(&mut self, now: Duration, auth_key: &str) -> Vec<ClientAction> {
        let mut out = Vec::new();
        if self.endpoints_unconfirmed.is_some_and(|d| d <= now) {
            self.endpoints_unconfirmed = None;
            if matches!(self.phase, Phase::Streaming { .. }) {
                out.push(ClientAction::Log(
                    "control-retry",
                    "endpoint update unanswered; sending it again".into(),
                ));
                out.push(self.endpoint_update(now));
            }
        }
        if self.deadline.is_none_or(|d| d > now) {
            return out;
        }
        out.extend(self.on_deadline(now, auth_key));
        out
    }

    /// The connection's own deadline passed.
    fn on_deadline(&mut self, now: Duration, auth_key: &str) -> Vec<ClientAction> {
        match self.phase {
            Phase::Backoff => self.connect(now, auth_key),
            Phase::Requesting => self.back_off(now, "map request unanswered".into()),
            Phase::Streaming { .. } => self.back_off(now, "map stream silent".into()),
        }
    }

    /// The node's endpoints changed: it tells the server (on its stream's
    /// connection, or with its next map request).
    pub(crate) fn endpoints_changed(
        &mut self,
        now: Duration,
        endpoints: Vec<SocketAddr>,
    ) -> Vec<ClientAction> {
        if endpoints == self.endpoints {
            return Vec::new();
        }
        self.endpoints = endpoints;
        match self.phase {
            Phase::Streaming { .. } => vec![self.endpoint_update(now)],
            Phase::Backoff | Phase::Requesting => Vec::new(),
        }
    }

    /// The node's knobs changed: the netmap it has is applied again with them.
    pub(crate) fn reapply(&self, local: &LocalSettings) -> Option<Apply> {
        self.netmap
            .as_ref()
            .map(|netmap| Apply::Reconfig(Box::new(reconfig_of(netmap, local))))
    }

    /// A message from the server arrived.
    pub(crate) fn on_message(
        &mut self,
        now: Duration,
        message: FromControl,
        local: &LocalSettings,
    ) -> Vec<ClientAction> {
        match message {
            FromControl::Map {
                epoch,
                stream,
                bytes,
            } => self.on_map(now, epoch, stream, &bytes, local),
            FromControl::KeepAlive {
                epoch,
                stream,
                last_seq,
            } => {
                if self.phase != (Phase::Streaming { epoch, stream }) {
                    return Vec::new();
                }
                if last_seq + 1 != self.next_seq {
                    return self.back_off(
                        now,
                        format!("missed map messages (keep-alive says {last_seq})"),
                    );
                }
                self.deadline = Some(now + STREAM_SILENCE);
                Vec::new()
            }
            FromControl::Closed { epoch, stream } => {
                if self.phase != (Phase::Streaming { epoch, stream }) {
                    return Vec::new();
                }
                self.backoff = RETRY_FIRST;
                self.back_off(now, "map stream closed by the server".into())
            }
            FromControl::Accepted { request } => {
                if request == "endpoint-update" {
                    self.endpoints_unconfirmed = None;
                }
                Vec::new()
            }
            FromControl::Refused { request, reason } => {
                if request == "map-request" || request == "register" {
                    if request == "register" && reason.contains("already registered") {
                        self.registered = true;
                        return Vec::new();
                    }
                    if self.phase == Phase::Requesting {
                        return self.back_off(now, format!("{request} refused: {reason}"));
                    }
                }
                vec![ClientAction::Log(
                    "control-refused",
                    format!("{request}: {reason}"),
                )]
            }
        }
    }

    fn on_map(
        &mut self,
        now: Duration,
        epoch: u64,
        stream: StreamId,
        bytes: &[u8],
        local: &LocalSettings,
    ) -> Vec<ClientAction> {
        let response = match MapResponse::from_json(bytes) {
            Ok(r) => r,
            Err(e) => return self.back_off(now, format!("bad map response: {e}")),
        };
        let current = self.phase == (Phase::Streaming { epoch, stream });
        match response.body {
            MapBody::Full(netmap) => {
                // A full netmap opens a stream: the one asked for, or a newer
                // one (a retried request answered after the first).
                let wanted = match self.phase {
                    Phase::Requesting => true,
                    Phase::Streaming {
                        epoch: e,
                        stream: s,
                    } => epoch > e || (epoch == e && stream > s),
                    Phase::Backoff => false,
                };
                if !wanted || response.seq != 0 {
                    return vec![ClientAction::Log(
                        "control-ignored",
                        format!("full netmap of stream {} not asked for", stream.0),
                    )];
                }
                self.registered = true;
                self.phase = Phase::Streaming { epoch, stream };
                self.deadline = Some(now + STREAM_SILENCE);
                self.backoff = RETRY_FIRST;
                self.next_seq = 1;
                self.maps_applied += 1;
                let netmap = *netmap;
                let filter = filter_of(&netmap);
                let reconfig = reconfig_of(&netmap, local);
                let line = format!(
                    "full netmap, {} peers, {} bytes",
                    netmap.peers.len(),
                    bytes.len()
                );
                self.netmap = Some(netmap);
                let mut out = vec![
                    ClientAction::Log("netmap", line),
                    ClientAction::Apply(Apply::Filter(filter)),
                    ClientAction::Apply(Apply::Reconfig(Box::new(reconfig))),
                ];
                if self.endpoints != self.endpoints_requested {
                    self.endpoints_requested = self.endpoints.clone();
                    out.push(self.endpoint_update(now));
                }
                out
            }
            MapBody::Delta(delta) => {
                if !current {
                    return Vec::new();
                }
                if response.seq != self.next_seq {
                    let why = format!(
                        "map sequence gap (expected {}, got {})",
                        self.next_seq, response.seq
                    );
                    return self.back_off(now, why);
                }
                let Some(netmap) = self.netmap.as_mut() else {
                    return self.back_off(now, "delta without a netmap".into());
                };
                let routes_before = netmap.routes();
                let applied = match netmap.apply(&delta) {
                    Ok(a) => a,
                    Err(e) => return self.back_off(now, format!("delta refused: {e}")),
                };
                self.next_seq += 1;
                self.deadline = Some(now + STREAM_SILENCE);
                self.maps_applied += 1;
                let mut out = vec![ClientAction::Log(
                    "delta",
                    format!(
                        "seq {} upsert {} remove {} filter={} self={} {} bytes",
                        response.seq,
                        applied.upserted.len(),
                        applied.removed.len(),
                        applied.filter_changed,
                        applied.self_changed,
                        bytes.len()
                    ),
                )];
                if applied.filter_changed {
                    out.push(ClientAction::Apply(Apply::Filter(filter_of(netmap))));
                }
                let whole = applied.self_changed
                    || local.deltas_as_reconfig
                    || netmap.routes() != routes_before;
                if whole {
                    out.push(ClientAction::Apply(Apply::Reconfig(Box::new(reconfig_of(
                        netmap, local,
                    )))));
                } else if !applied.upserted.is_empty() || !applied.removed.is_empty() {
                    let upsert = applied
                        .upserted
                        .iter()
                        .filter_map(|k| netmap.peer(k))
                        .map(|p| peer_config(p, local))
                        .collect();
                    let remove = applied.removed.iter().map(|k| NodePublicKey(k.0)).collect();
                    out.push(ClientAction::Apply(Apply::Delta(PeerDelta {
                        upsert,
                        remove,
                    })));
                }
                out
            }
        }
    }
}

/// A netmap peer as the engine's peer config (the mapping in
/// `wgmesh_control::netmap`'s docs), with the node's own keepalive setting.
fn peer_config(peer: &wgmesh_control::Peer, local: &LocalSettings) -> PeerConfig {
    PeerConfig {
        public_key: NodePublicKey(peer.node_key.0),
        disco_key: peer.disco_key.map(|k| DiscoPublicKey(k.0)),
        name: peer.name.clone(),
        allowed_ips: peer.allowed_ips.clone(),
        endpoints: peer.endpoints.clone(),
        persistent_keepalive_secs: local.keepalives.get(&peer.node_key).copied(),
        preshared_key: None,
    }
}

/// A netmap as the engine's whole desired state.
pub(crate) fn reconfig_of(netmap: &Netmap, local: &LocalSettings) -> Reconfig {
    Reconfig {
        wireguard: Some(WgConfig {
            listen_port: WG_PORT,
            peers: netmap.peers.iter().map(|p| peer_config(p, local)).collect(),
        }),
        router: Some(RouterConfig {
            local_addrs: netmap.self_node.addresses.clone(),
            routes: netmap.routes(),
            advertised_routes: netmap.self_node.advertised_routes.clone(),
            mtu: 1280,
        }),
        dns: Some(DnsConfig {
            nameservers: netmap.dns.nameservers.clone(),
            search_domains: netmap.dns.search_domains.clone(),
        }),
        knobs: local.knobs.clone(),
        primary_routes: netmap.self_node.primary_routes.clone(),
    }
}

/// The netmap's filter as the engine's: its accept rules, then drop.
pub(crate) fn filter_of(netmap: &Netmap) -> PacketFilter {
    PacketFilter {
        rules: netmap
            .packet_filter
            .iter()
            .map(|r| FilterRule {
                src: r.src,
                dst: r.dst,
                protocol: r.protocol,
                dst_ports: r.dst_ports,
                action: FilterAction::Accept,
            })
            .collect(),
        default_action: FilterAction::Drop,
    }
}
