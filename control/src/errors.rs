//! Why a request to control was refused: one error enum per operation.
//!
//! A refused request changes no state; it is counted under its
//! [`InputError::kind`] in [`crate::Counters::refused`].

use std::net::IpAddr;

use ipnet::IpNet;

use crate::keys::NodeKey;

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// The node key is all zeros: no X25519 public key is.
    #[error("node key is not a valid key")]
    BadNodeKey,
    /// No auth key with this text exists (wrong or malformed).
    #[error("unknown auth key")]
    UnknownAuthKey,
    /// The auth key's expiry has passed.
    #[error("auth key has expired")]
    AuthKeyExpired,
    /// The single-use auth key was used already.
    #[error("single-use auth key was already used")]
    AuthKeyUsed,
    /// The node key is registered and not expired: a replayed or repeated
    /// registration. A registered node polls; it registers again only
    /// after its key expired.
    #[error("node {0:?} is already registered")]
    AlreadyRegistered(NodeKey),
    /// The hostname has no usable DNS label characters.
    #[error("hostname {0:?} has no letters or digits")]
    BadHostname(String),
    /// More advertised routes than the server accepts.
    #[error("{count} advertised routes; at most {max}")]
    TooManyRoutes {
        /// How many the node advertised.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// An advertised route overlaps the tailnet's own address ranges.
    #[error("advertised route {0} overlaps the tailnet's addresses")]
    RouteOverlapsTailnet(IpNet),
    /// A default route: exit nodes are not supported.
    #[error("advertised route {0} is a default route; exit nodes are not supported")]
    ExitNodeNotSupported(IpNet),
    /// The requested address is not a node address of the tailnet.
    #[error("requested address {0} is not in 100.64.0.0/10 or is reserved")]
    AddressOutsideTailnet(IpAddr),
    /// The requested address belongs to another node.
    #[error("requested address {addr} belongs to node {holder:?}")]
    AddressInUse {
        /// The address.
        addr: IpAddr,
        /// Its holder.
        holder: NodeKey,
    },
    /// A re-registration asked for an address other than the node's own.
    #[error("node already holds {held}; it cannot move to {requested}")]
    CannotMoveAddress {
        /// The node's address.
        held: IpAddr,
        /// The one it asked for.
        requested: IpAddr,
    },
    /// Every node address of the tailnet is taken.
    #[error("the tailnet's address space is exhausted")]
    AddressSpaceExhausted,
}

/// Why a map request (the long-poll that opens a node's stream) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MapError {
    /// No node has this key.
    #[error("unknown node {0:?}")]
    UnknownNode(NodeKey),
    /// The node's key expired; it must register again.
    #[error("node {0:?} has expired")]
    NodeExpired(NodeKey),
    /// The disco key is all zeros.
    #[error("disco key is not a valid key")]
    BadDiscoKey,
    /// Another node uses this disco key.
    #[error("disco key is in use by node {0:?}")]
    DiscoKeyInUse(NodeKey),
    /// More endpoints than the server accepts.
    #[error("{count} endpoints; at most {max}")]
    TooManyEndpoints {
        /// How many the node sent.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A relayed address no peer can send to.
    #[error("relayed address {0} is not usable (unspecified, multicast or port 0)")]
    BadRelay(std::net::SocketAddr),
}

/// Why an endpoint update was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointUpdateError {
    /// No node has this key.
    #[error("unknown node {0:?}")]
    UnknownNode(NodeKey),
    /// The node's key expired.
    #[error("node {0:?} has expired")]
    NodeExpired(NodeKey),
    /// More endpoints than the server accepts.
    #[error("{count} endpoints; at most {max}")]
    TooManyEndpoints {
        /// How many the node sent.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A relayed address no peer can send to.
    #[error("relayed address {0} is not usable (unspecified, multicast or port 0)")]
    BadRelay(std::net::SocketAddr),
}

/// Why a disconnect was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DisconnectError {
    /// No node has this key.
    #[error("unknown node {0:?}")]
    UnknownNode(NodeKey),
}

/// Why an admin command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// No node has this key.
    #[error("unknown node {0:?}")]
    UnknownNode(NodeKey),
    /// The node does not advertise a route the command approves.
    #[error("node does not advertise {0}")]
    RouteNotAdvertised(IpNet),
    /// A single-address route is approved on another live node already
    /// (an engine refuses one address routed to two peers).
    #[error("{route} is approved on node {holder:?} already")]
    RouteApprovedElsewhere {
        /// The route.
        route: IpNet,
        /// The node that routes it.
        holder: NodeKey,
    },
    /// An auth key's user is not `user@domain`.
    #[error("user {0:?} is not user@domain")]
    BadUser(String),
    /// An auth key's tag is not `tag:NAME`.
    #[error("tag {0:?} is not tag:NAME with letters, digits, '-' and '_'")]
    BadTag(String),
    /// The auth key would be expired from the start.
    #[error("auth key expiry is not in the future")]
    ExpiryInPast,
}

/// Why a record of another replica could not be applied: it conflicts with
/// this replica's state (two replicas raced), which the server resolves by
/// reloading from the shared store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicateError {
    /// The node's address is not a node address of the tailnet.
    #[error("node {node:?} has address {addr}, outside the tailnet")]
    AddressOutsideTailnet {
        /// The node.
        node: NodeKey,
        /// Its address.
        addr: std::net::Ipv4Addr,
    },
    /// Another node holds the node's address here.
    #[error("node {node:?}'s address is held by {holder:?} here")]
    AddressHeldByAnother {
        /// The node.
        node: NodeKey,
        /// The holder.
        holder: NodeKey,
    },
    /// The node has another address here (a node never moves).
    #[error("node {0:?} has another address here")]
    AddressMoved(NodeKey),
    /// Another node holds the node's disco key here.
    #[error("node {node:?}'s disco key is held by {holder:?} here")]
    DiscoKeyHeldByAnother {
        /// The node.
        node: NodeKey,
        /// The holder.
        holder: NodeKey,
    },
    /// Another node has the node's host name here.
    #[error("node {node:?}'s host name is held by {holder:?} here")]
    HostnameHeldByAnother {
        /// The node.
        node: NodeKey,
        /// The holder.
        holder: NodeKey,
    },
    /// The host name is not a DNS label.
    #[error("host name {0:?} is not a DNS label")]
    BadHostname(String),
}

/// Why an input was refused. The state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InputError {
    /// A registration was refused.
    #[error("register: {0}")]
    Register(#[from] RegisterError),
    /// A map request was refused.
    #[error("map request: {0}")]
    Map(#[from] MapError),
    /// An endpoint update was refused.
    #[error("endpoint update: {0}")]
    EndpointUpdate(#[from] EndpointUpdateError),
    /// A disconnect was refused.
    #[error("disconnect: {0}")]
    Disconnect(#[from] DisconnectError),
    /// An admin command was refused.
    #[error("admin: {0}")]
    Admin(#[from] AdminError),
    /// A replicated record was refused.
    #[error("replicate: {0}")]
    Replicate(#[from] ReplicateError),
}

impl InputError {
    /// A stable name for counters and logs, `operation.reason`.
    pub fn kind(&self) -> &'static str {
        match self {
            InputError::Register(e) => match e {
                RegisterError::BadNodeKey => "register.bad_node_key",
                RegisterError::UnknownAuthKey => "register.unknown_auth_key",
                RegisterError::AuthKeyExpired => "register.auth_key_expired",
                RegisterError::AuthKeyUsed => "register.auth_key_used",
                RegisterError::AlreadyRegistered(_) => "register.already_registered",
                RegisterError::BadHostname(_) => "register.bad_hostname",
                RegisterError::TooManyRoutes { .. } => "register.too_many_routes",
                RegisterError::RouteOverlapsTailnet(_) => "register.route_overlaps_tailnet",
                RegisterError::ExitNodeNotSupported(_) => "register.exit_node_not_supported",
                RegisterError::AddressOutsideTailnet(_) => "register.address_outside_tailnet",
                RegisterError::AddressInUse { .. } => "register.address_in_use",
                RegisterError::CannotMoveAddress { .. } => "register.cannot_move_address",
                RegisterError::AddressSpaceExhausted => "register.address_space_exhausted",
            },
            InputError::Map(e) => match e {
                MapError::UnknownNode(_) => "map.unknown_node",
                MapError::NodeExpired(_) => "map.node_expired",
                MapError::BadDiscoKey => "map.bad_disco_key",
                MapError::DiscoKeyInUse(_) => "map.disco_key_in_use",
                MapError::TooManyEndpoints { .. } => "map.too_many_endpoints",
                MapError::BadRelay(_) => "map.bad_relay",
            },
            InputError::EndpointUpdate(e) => match e {
                EndpointUpdateError::UnknownNode(_) => "endpoints.unknown_node",
                EndpointUpdateError::NodeExpired(_) => "endpoints.node_expired",
                EndpointUpdateError::TooManyEndpoints { .. } => "endpoints.too_many_endpoints",
                EndpointUpdateError::BadRelay(_) => "endpoints.bad_relay",
            },
            InputError::Disconnect(e) => match e {
                DisconnectError::UnknownNode(_) => "disconnect.unknown_node",
            },
            InputError::Admin(e) => match e {
                AdminError::UnknownNode(_) => "admin.unknown_node",
                AdminError::RouteNotAdvertised(_) => "admin.route_not_advertised",
                AdminError::RouteApprovedElsewhere { .. } => "admin.route_approved_elsewhere",
                AdminError::BadUser(_) => "admin.bad_user",
                AdminError::BadTag(_) => "admin.bad_tag",
                AdminError::ExpiryInPast => "admin.expiry_in_past",
            },
            InputError::Replicate(e) => match e {
                ReplicateError::AddressOutsideTailnet { .. } => "replicate.address_outside_tailnet",
                ReplicateError::AddressHeldByAnother { .. } => "replicate.address_held_by_another",
                ReplicateError::AddressMoved(_) => "replicate.address_moved",
                ReplicateError::DiscoKeyHeldByAnother { .. } => {
                    "replicate.disco_key_held_by_another"
                }
                ReplicateError::HostnameHeldByAnother { .. } => {
                    "replicate.hostname_held_by_another"
                }
                ReplicateError::BadHostname(_) => "replicate.bad_hostname",
            },
        }
    }
}
