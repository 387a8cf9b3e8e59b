//! The values that cross the engine's boundary: inputs, outputs, effects,
//! events, pings and status.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::config::{DnsConfig, PeerDelta, Reconfig, RouterConfig};
use crate::keys::{DiscoPublicKey, NodePublicKey};

/// One thing that happened outside the engine.
#[derive(Debug)]
#[non_exhaustive]
pub enum Input<'a> {
    /// An IP packet the OS wrote to the TUN device (outbound traffic).
    TunPacket(&'a [u8]),
    /// A UDP datagram that arrived on the engine's socket.
    Datagram {
        /// Where it came from.
        from: SocketAddr,
        /// Its payload: WireGuard or disco.
        data: &'a [u8],
    },
    /// The full desired state from the control plane.
    Reconfig(Box<Reconfig>),
    /// A change to part of the peer list, checked against the running peers
    /// by the same rules as a full reconfig. Answered with
    /// [`InputOutcome::Reconfig`]: `NoChanges`, or `Applied` with
    /// `wireguard`, `peers_changed` and `sessions_flushed` set.
    PeerDelta(&'a PeerDelta),
    /// The network changed under the node.
    LinkChange(LinkChange),
    /// Start a ping.
    Ping(PingRequest),
    /// Ask for a status snapshot (coalesced: see [`Output::Status`]).
    StatusRequest,
    /// Replace the inbound packet filter.
    SetPacketFilter(crate::filter::PacketFilter),
    /// Turn the plaintext capture hook on or off.
    SetCapture(bool),
    /// How an OS subsystem fared when the adapters last acted on it (an
    /// effect applied, a device read or written): a problem is kept in the
    /// status's health section, with the time it was first reported, until
    /// a report without a problem clears it.
    Health(HealthReport),
    /// Replace the NAT traversal settings (STUN servers, peers' relayed
    /// addresses). Refused with [`InputError::Nat`] when malformed; the
    /// previous settings then stay.
    SetNat(NatConfig),
    /// The node's own local endpoints (every local address with the bound
    /// port), as the adapters see them; the engine adds the STUN-reflexive
    /// ones and reports the whole set with [`Effect::EndpointsChanged`].
    SetLocalEndpoints(Vec<SocketAddr>),
    /// Shut the engine down: in order, pending pings time out, peers are
    /// removed, the router and DNS config are withdrawn. Idempotent.
    Close,
}

/// NAT traversal settings: until the control server pushes them, the
/// daemon takes them from its config file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatConfig {
    /// STUN servers asked for this node's reflexive address, on the
    /// WireGuard socket itself (at most [`crate::MAX_STUN_SERVERS`]).
    pub stun_servers: Vec<SocketAddr>,
    /// Peers' relayed addresses (their TURN allocations). Each is a
    /// candidate path to its peer, measured by disco pings like any other
    /// but used only while no direct path answers; a call-me-maybe to a
    /// peer with no direct path goes there.
    pub peer_relays: Vec<PeerRelay>,
}

/// A peer's relayed address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerRelay {
    /// The peer.
    pub peer: NodePublicKey,
    /// Where datagrams to it through the relay go.
    pub addr: SocketAddr,
}

/// Why NAT settings or local endpoints were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NatConfigError {
    /// More STUN servers than the engine keeps.
    #[error("{count} STUN servers given, at most {max} are allowed")]
    TooManyStunServers {
        /// How many were given.
        count: usize,
        /// The bound.
        max: usize,
    },
    /// A STUN server address no datagram can reach (unspecified,
    /// multicast, broadcast or port 0).
    #[error("STUN server {0} is not a usable address")]
    BadStunServer(SocketAddr),
    /// The same STUN server listed twice.
    #[error("STUN server {0} is listed twice")]
    DuplicateStunServer(SocketAddr),
    /// A relayed address no datagram can reach.
    #[error("relay address {addr} of peer {peer:?} is not a usable address")]
    BadRelay {
        /// The peer.
        peer: NodePublicKey,
        /// Its relayed address.
        addr: SocketAddr,
    },
    /// Two relayed addresses for one peer.
    #[error("peer {0:?} has two relay addresses")]
    DuplicateRelayPeer(NodePublicKey),
    /// More local endpoints than the engine keeps.
    #[error("{count} local endpoints given, at most {max} are allowed")]
    TooManyLocalEndpoints {
        /// How many were given.
        count: usize,
        /// The bound.
        max: usize,
    },
    /// A local endpoint no peer could reach (unspecified, multicast or
    /// port 0).
    #[error("local endpoint {0} is not a usable address")]
    BadLocalEndpoint(SocketAddr),
}

/// One of this node's own endpoints: an address peers may reach it at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    /// The address and port.
    pub addr: SocketAddr,
    /// How it was learnt.
    pub kind: EndpointKind,
}

/// How an endpoint of this node was learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EndpointKind {
    /// A local address of the node with the bound port.
    Local,
    /// The reflexive address a STUN server saw our datagrams come from (the
    /// outside of our NAT).
    Stun,
}

impl EndpointKind {
    /// Lowercase name, for logs and status.
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointKind::Local => "local",
            EndpointKind::Stun => "stun",
        }
    }
}

/// What the link monitor saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinkChange {
    /// False when every interface is down: the engine pauses.
    pub any_link_up: bool,
    /// A major change (interface or default route changed): rebind and re-discover.
    pub major: bool,
}

/// An OS subsystem the adapters act on for the engine; each has at most
/// one current problem in the status's health section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HealthSubsystem {
    /// Addresses, routes and MTU on the tunnel interface
    /// ([`Effect::ApplyRouter`]).
    Router,
    /// The system resolver's configuration ([`Effect::ApplyDns`],
    /// [`Effect::FlushDnsCaches`]).
    Dns,
    /// The UDP socket ([`Effect::Rebind`], [`Effect::SetListenPort`],
    /// [`Effect::SetPathMtuDiscovery`], sends).
    Socket,
    /// The TUN device (reads and writes).
    Tun,
    /// The BIRD routing daemon ([`Effect::SetBirdProtocol`]).
    Bird,
    /// Policy routing and forwarding for an exit node.
    ExitNode,
}

impl HealthSubsystem {
    /// Lowercase name, as status and metrics show it.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthSubsystem::Router => "router",
            HealthSubsystem::Dns => "dns",
            HealthSubsystem::Socket => "socket",
            HealthSubsystem::Tun => "tun",
            HealthSubsystem::Bird => "bird",
            HealthSubsystem::ExitNode => "exit-node",
        }
    }
}

/// How bad a health problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HealthSeverity {
    /// Something works less well than asked (a retry is pending, a
    /// best-effort step failed); traffic still flows.
    Warning,
    /// Something the node needs is not in place.
    Error,
}

impl HealthSeverity {
    /// Lowercase name, as status and metrics show it.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthSeverity::Warning => "warning",
            HealthSeverity::Error => "error",
        }
    }
}

/// A problem in one subsystem.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthProblem {
    /// How bad it is.
    pub severity: HealthSeverity,
    /// What failed, as the OS said it (for people, not for parsing).
    pub reason: String,
}

/// What the adapters report about one subsystem ([`Input::Health`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthReport {
    /// The subsystem.
    pub subsystem: HealthSubsystem,
    /// Its problem; `None` says it works again.
    pub problem: Option<HealthProblem>,
}

impl HealthReport {
    /// The subsystem works.
    pub fn ok(subsystem: HealthSubsystem) -> Self {
        Self {
            subsystem,
            problem: None,
        }
    }

    /// The subsystem failed with `severity` for `reason`.
    pub fn failed(
        subsystem: HealthSubsystem,
        severity: HealthSeverity,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            subsystem,
            problem: Some(HealthProblem {
                severity,
                reason: reason.into(),
            }),
        }
    }
}

/// A current problem in a status snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthIssue {
    /// The subsystem.
    pub subsystem: HealthSubsystem,
    /// Its problem, as last reported.
    pub problem: HealthProblem,
    /// How long ago the problem was first reported (a report with another
    /// severity or reason starts it again).
    pub since_ago: Duration,
}

/// Which kind of ping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PingKind {
    /// A disco ping over UDP, outside WireGuard: measures the path.
    Disco,
    /// A TSMP ping inside WireGuard, answered by the peer's engine.
    Tsmp,
    /// An ICMP echo inside WireGuard, answered by the peer's OS.
    Icmp,
}

impl PingKind {
    /// Lowercase name, as used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            PingKind::Disco => "disco",
            PingKind::Tsmp => "tsmp",
            PingKind::Icmp => "icmp",
        }
    }
}

/// A caller-chosen id that ties a ping to its result.
pub type PingId = u64;

/// A ping to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingRequest {
    /// Returned in the result.
    pub id: PingId,
    /// The tailnet IP to ping.
    pub ip: IpAddr,
    /// The kind of ping.
    pub kind: PingKind,
    /// Extra payload bytes (ICMP only; the others have fixed sizes).
    pub size: usize,
}

/// How a ping ended. Every ping ends exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PingResult {
    /// The request's id.
    pub id: PingId,
    /// The IP that was pinged.
    pub ip: IpAddr,
    /// The kind of ping.
    pub kind: PingKind,
    /// The outcome.
    pub outcome: PingOutcome,
}

/// The outcome of a ping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PingOutcome {
    /// The peer answered.
    Pong {
        /// Round-trip time.
        latency: Duration,
        /// The peer's first tailnet address.
        node_ip: Option<IpAddr>,
        /// The peer's name.
        node_name: String,
        /// The peer's key.
        node_key: NodePublicKey,
        /// The UDP endpoint the answer came over (disco: the probed path).
        endpoint: Option<SocketAddr>,
        /// The PeerAPI port announced in a TSMP pong.
        peerapi_port: Option<u16>,
    },
    /// No answer within [`crate::PING_TIMEOUT`].
    Timeout,
    /// The ping could not be sent.
    Error {
        /// "no matching peer", "is local IP", ...
        message: String,
        /// True when the target is one of this node's own addresses.
        is_local_ip: bool,
    },
}

/// One thing the engine wants done or wants known.
///
/// The rare, large variants are boxed so that an `Output` is as small as a
/// [`Transmit`] (56 bytes rather than 160): every datagram and TUN packet
/// of the data plane is an `Output` moved out of the engine's queue and
/// through the driver, and at 160 bytes each move was a `memcpy` call
/// (about 1% of each daemon's samples in the throughput rig).
#[derive(Debug)]
#[must_use]
#[non_exhaustive]
pub enum Output {
    /// Send a UDP datagram. Return its buffer with [`crate::Engine::recycle`].
    Transmit(Transmit),
    /// Write an IP packet to the TUN device. Return its buffer with [`crate::Engine::recycle`].
    TunWrite(Vec<u8>),
    /// Change something in the OS.
    Effect(Box<Effect>),
    /// Something happened worth telling.
    Event(Box<Event>),
    /// A ping ended.
    PingResult(Box<PingResult>),
    /// A status snapshot.
    Status(Box<Status>),
    /// A plaintext packet seen by the capture hook.
    Capture(CapturedPacket),
}

/// A datagram to send.
#[derive(Debug)]
pub struct Transmit {
    /// The destination endpoint.
    pub dst: SocketAddr,
    /// The payload.
    pub data: Vec<u8>,
}

/// A plaintext packet crossing the tunnel, for pcap.
#[derive(Debug, Clone)]
pub struct CapturedPacket {
    /// True for packets leaving towards the network (from the TUN).
    pub outbound: bool,
    /// When.
    pub at: Instant,
    /// The IP packet.
    pub packet: Vec<u8>,
}

/// A change the adapters must make to the OS.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
#[non_exhaustive]
pub enum Effect {
    /// Apply this router config (addresses, routes, MTU) as a diff from the last.
    ApplyRouter(RouterConfig),
    /// Apply this DNS config.
    ApplyDns(DnsConfig),
    /// Flush the OS DNS caches.
    FlushDnsCaches,
    /// Close and reopen the UDP sockets.
    Rebind,
    /// Re-discover our own endpoints (STUN, interfaces).
    ReDiscoverEndpoints {
        /// Why: "link-change-major", "link-change-minor".
        reason: &'static str,
    },
    /// Tell the path layer whether the network is up.
    SetNetworkUp(bool),
    /// Switch the named BIRD protocol on or off.
    SetBirdProtocol {
        /// The protocol name in bird.conf.
        protocol: String,
        /// On or off.
        enabled: bool,
    },
    /// Listen on this UDP port (0: any).
    SetListenPort(u16),
    /// Turn path-MTU discovery on or off.
    SetPathMtuDiscovery(bool),
    /// Whether a configured resolver is reached through the tunnel, so the
    /// OS should attach the DNS config to the tunnel interface (the
    /// reference's "DNS link" choice).
    SetDnsViaTunnel(bool),
    /// This node's endpoints changed (local ones, or the STUN-reflexive
    /// one): the full new set, locals first. The daemon reports it to the
    /// control server, which pushes it to the peers.
    EndpointsChanged(Vec<Endpoint>),
}

/// Why a peer was handed to WireGuard again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WakeReason {
    /// We sent a packet to one of its addresses.
    SendTo(IpAddr),
    /// It sent us data (receive activity).
    Receive,
    /// It sent us a handshake initiation.
    Handshake,
    /// A ping targeted it.
    Ping,
}

/// Something that happened inside the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A peer was handed to WireGuard (a reconfig added it, or it woke).
    PeerConfigured {
        /// The peer.
        peer: NodePublicKey,
        /// `Some` when it was woken from the trimmed state.
        woken: Option<WakeReason>,
    },
    /// A peer was taken out of WireGuard.
    PeerRemoved {
        /// The peer.
        peer: NodePublicKey,
        /// Why it went.
        reason: RemoveReason,
    },
    /// A peer's session keys were dropped in a two-phase reconfig.
    SessionFlushed {
        /// The peer.
        peer: NodePublicKey,
        /// Its old disco key.
        old_disco: DiscoPublicKey,
        /// Its new disco key.
        new_disco: DiscoPublicKey,
    },
    /// A WireGuard handshake with a peer completed.
    HandshakeCompleted {
        /// The peer.
        peer: NodePublicKey,
        /// Its endpoint.
        endpoint: SocketAddr,
    },
    /// The best UDP path to a peer changed.
    PathChanged {
        /// The peer.
        peer: NodePublicKey,
        /// The new endpoint, `None` when none answers.
        endpoint: Option<SocketAddr>,
        /// Its measured latency.
        latency: Option<Duration>,
    },
    /// An outbound TCP connection got no answer within 5 s.
    ConnectionFailed(Box<FailedConnection>),
}

/// Why a peer left WireGuard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RemoveReason {
    /// No traffic for this long (lazy peers).
    Idle {
        /// Seconds since the last activity.
        idle_secs: u64,
    },
    /// The reconfig dropped it from the full config.
    RemovedFromConfig,
    /// First phase of a disco-key flush.
    DiscoKeyChanged,
    /// Its config changed in a way that needs a new session. No change
    /// does today: a preshared key or persistent keepalive change is
    /// applied to the live session in place, as in wireguard-go. Kept so
    /// that consumers matching every reason (the simulator's renderer) keep
    /// building; it can go once they drop it.
    ConfigChanged,
    /// The engine closed.
    Closed,
}

/// A diagnosed outbound connection that never opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedConnection {
    /// Source address and port.
    pub src: SocketAddr,
    /// Destination address and port.
    pub dst: SocketAddr,
    /// The peer the destination routes to, if any.
    pub peer: Option<NodePublicKey>,
    /// The likely cause.
    pub cause: FailureCause,
}

/// The likely cause of a failed outbound connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureCause {
    /// No peer's AllowedIPs cover the destination.
    NoPeerForAddress,
    /// The peer was trimmed and never answered after waking.
    PeerTrimmedNeverAnswered,
    /// No WireGuard handshake completed with the peer.
    NoHandshake,
    /// A session exists but no endpoint of the peer answers disco.
    NoEndpointReachable,
    /// The peer answered with a TSMP reject (ACL, shields up, ...).
    PeerRejected,
    /// Handshake done and paths fine: the remote service did not answer.
    NoAnswerFromService,
}

/// The outcome of a successful reconfig.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum ReconfigOutcome {
    /// Nothing differs from the running state.
    NoChanges,
    /// Something changed; the flags say which parts.
    Applied(ReconfigChanges),
}

/// Which parts of a reconfig changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReconfigChanges {
    /// The WireGuard peer set or a peer's settings.
    pub wireguard: bool,
    /// The router config.
    pub router: bool,
    /// The DNS config.
    pub dns: bool,
    /// The listen port.
    pub listen_port: bool,
    /// Whether this node is an active subnet router.
    pub subnet_router: bool,
    /// The path-MTU knob.
    pub path_mtu: bool,
    /// Other knobs (lazy peers, fake mode, PeerAPI port, ...).
    pub knobs: bool,
    /// Peers added, removed or changed in the full config.
    pub peers_changed: usize,
    /// Peers whose disco key changed while configured (two-phase flushes).
    pub sessions_flushed: usize,
}

/// What [`crate::Engine::handle_input`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputOutcome {
    /// The input was handled (dropped packets are counted, not errors).
    Done,
    /// The outcome of a reconfig.
    Reconfig(ReconfigOutcome),
}

/// Why an input was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InputError {
    /// The reconfig was invalid; the previous state keeps running.
    #[error("reconfig refused: {0}")]
    Reconfig(#[from] crate::config::ReconfigError),
    /// The NAT settings or local endpoints were malformed; the previous
    /// ones stay.
    #[error("NAT settings refused: {0}")]
    Nat(#[from] NatConfigError),
    /// The engine is closed and takes no more input.
    #[error("engine is closed")]
    Closed,
}

/// A status snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Status {
    /// This node's key.
    pub node_key: NodePublicKey,
    /// This node's disco key.
    pub disco_key: DiscoPublicKey,
    /// The listen port in the config.
    pub listen_port: u16,
    /// This node's addresses.
    pub local_addrs: Vec<IpNet>,
    /// This node's endpoints (local and STUN-reflexive), as last reported
    /// with [`Effect::EndpointsChanged`].
    pub endpoints: Vec<Endpoint>,
    /// Every peer of the full config, sorted by key.
    pub peers: Vec<PeerStatus>,
    /// Relays in use: 1 while this node holds a relay allocation (see
    /// `relay`), else 0.
    pub relay_count: usize,
    /// This node's relayed address (its TURN allocation). The engine holds
    /// no allocation itself (the adapters' socket does, under it), so it
    /// leaves this `None` and the adapters fill it in.
    pub relay: Option<SocketAddr>,
    /// Peers currently handed to WireGuard.
    pub configured_peers: usize,
    /// Peers in the full config (configured or trimmed).
    pub full_config_peers: usize,
    /// The counters.
    pub counters: crate::counters::Counters,
    /// Every subsystem with a current problem, sorted by subsystem; empty
    /// when everything is healthy.
    pub health: Vec<HealthIssue>,
}

impl Status {
    /// The worst current problem's severity; `None` when healthy.
    pub fn health_severity(&self) -> Option<HealthSeverity> {
        self.health.iter().map(|h| h.problem.severity).max()
    }
}

/// One peer in a status snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerStatus {
    /// The peer's key.
    pub node_key: NodePublicKey,
    /// Its disco key.
    pub disco_key: Option<DiscoPublicKey>,
    /// Its name.
    pub name: String,
    /// Its AllowedIPs.
    pub allowed_ips: Vec<IpNet>,
    /// True when handed to WireGuard; false when trimmed.
    pub configured: bool,
    /// The endpoint WireGuard sends to.
    pub endpoint: Option<SocketAddr>,
    /// True when that endpoint is the peer's relayed address (no direct
    /// path answers).
    pub via_relay: bool,
    /// Time since the last completed handshake.
    pub last_handshake_ago: Option<Duration>,
    /// Plaintext bytes received.
    pub rx_bytes: u64,
    /// Plaintext bytes sent.
    pub tx_bytes: u64,
    /// Persistent keepalive, seconds.
    pub persistent_keepalive_secs: Option<u16>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every packet of the data plane is an `Output` moved through the
    /// driver; a variant that makes it larger than a `Transmit` belongs in
    /// a box (see the type's docs).
    #[test]
    fn an_output_is_no_larger_than_a_transmit() {
        assert!(
            std::mem::size_of::<Output>() <= std::mem::size_of::<Transmit>() + 8,
            "Output is {} bytes, Transmit {}",
            std::mem::size_of::<Output>(),
            std::mem::size_of::<Transmit>()
        );
    }
}
