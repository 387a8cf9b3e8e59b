//! The netmap a node receives, its deltas, and their versioned wire form.
//!
//! A node's first message on a map stream is a full [`Netmap`]; every later
//! one is a [`NetmapDelta`] that names only what changed: peers added, peers
//! removed, and for a changed peer only the fields that changed. Both travel
//! inside a [`MapResponse`] that carries the wire version and a per-stream
//! sequence number, serialised as JSON.
//!
//! # How a node feeds its engine (wgmesh-core) from a netmap
//!
//! Control does not depend on the core, so the mapping is by shape, one to
//! one:
//!
//! | netmap | core |
//! |---|---|
//! | [`Peer`] | `PeerConfig { public_key: NodePublicKey(peer.node_key.0), disco_key: peer.disco_key.map(\|k\| DiscoPublicKey(k.0)), name, allowed_ips, endpoints, persistent_keepalive_secs: None, preshared_key: None }` |
//! | [`SelfNode::addresses`] | `RouterConfig::local_addrs` |
//! | [`Netmap::routes`] | `RouterConfig::routes` |
//! | [`SelfNode::advertised_routes`] | `RouterConfig::advertised_routes` |
//! | [`SelfNode::primary_routes`] | `Reconfig::primary_routes` |
//! | [`DnsConfig`] | `DnsConfig { nameservers, search_domains }` |
//! | [`Netmap::packet_filter`] | `PacketFilter { rules: [FilterRule { src, dst, protocol, dst_ports, action: Accept }], default_action: Drop }` |
//! | a delta's touched peers ([`AppliedDelta`]) | `PeerDelta { upsert: [the peers' new PeerConfig], remove }` |
//!
//! A delta therefore costs a node O(peers it names): [`Netmap::apply`] finds
//! each peer by binary search, and the result lists exactly the peers to
//! upsert into and remove from the engine with `Engine::apply_peer_delta`.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::keys::{DiscoKey, NodeKey, Timestamp};

/// The version of the wire form below. A node refuses a response with
/// another version rather than guess at its meaning.
pub const WIRE_VERSION: u32 = 1;

/// The prefix every node's IPv4 tailnet address comes from.
pub const TAILNET_IPV4_RANGE: &str = "100.64.0.0/10";
/// The prefix every node's IPv6 tailnet address comes from.
pub const TAILNET_IPV6_RANGE: &str = "fd7a:115c:a1e0::/48";

/// One message on a node's map stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapResponse {
    /// Always [`WIRE_VERSION`] when sent by this crate.
    pub wire_version: u32,
    /// 0 for the full netmap that opens a stream, then 1, 2, ... for each
    /// delta. A node that sees a gap reconnects and gets a full netmap.
    pub seq: u64,
    /// What the message carries.
    pub body: MapBody,
}

/// The body of a [`MapResponse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MapBody {
    /// The whole netmap (the first message of a stream).
    Full(Box<Netmap>),
    /// What changed since the previous message.
    Delta(Box<NetmapDelta>),
}

/// Why a JSON map response was refused.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a map response.
    #[error("malformed map response: {0}")]
    Malformed(#[from] serde_json::Error),
    /// The response is of a wire version this build does not speak.
    #[error("map response has wire version {got}, this build speaks {WIRE_VERSION}")]
    WrongVersion {
        /// The version in the response.
        got: u32,
    },
}

impl MapResponse {
    /// The JSON bytes sent to the node.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain data with string map keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a response and checks its wire version.
    pub fn from_json(bytes: &[u8]) -> Result<Self, DecodeError> {
        let response: MapResponse = serde_json::from_slice(bytes)?;
        if response.wire_version != WIRE_VERSION {
            return Err(DecodeError::WrongVersion {
                got: response.wire_version,
            });
        }
        Ok(response)
    }
}

/// Everything one node needs to know about the tailnet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Netmap {
    /// The node itself.
    pub self_node: SelfNode,
    /// The peers the policy lets this node reach or be reached by, sorted
    /// by node key.
    pub peers: Vec<Peer>,
    /// The inbound packet filter compiled from the policy: a packet is
    /// accepted when some rule matches it and dropped otherwise.
    pub packet_filter: Vec<FilterRule>,
    /// MagicDNS settings.
    pub dns: DnsConfig,
    /// NAT traversal settings: STUN servers and this node's relay
    /// credentials. Absent from the JSON when control issues none.
    #[serde(default, skip_serializing_if = "NatMap::is_empty")]
    pub nat: NatMap,
}

/// The NAT traversal settings control issues to one node.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NatMap {
    /// STUN servers to learn the node's reflexive address from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stun_servers: Vec<SocketAddr>,
    /// The TURN relay and this node's time-limited credentials for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayCredentials>,
}

impl NatMap {
    /// True when control issues no NAT settings at all.
    pub fn is_empty(&self) -> bool {
        let Self {
            stun_servers,
            relay,
        } = self;
        stun_servers.is_empty() && relay.is_none()
    }
}

/// Time-limited TURN credentials in the TURN REST-API style: the username
/// is `expiry:node` (expiry in Unix seconds) and the password
/// base64(HMAC-SHA1(shared secret, username)). Only the server knows the
/// secret; the TURN server checks the pair with the same secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayCredentials {
    /// The TURN server (UDP).
    pub server: SocketAddr,
    /// `expiry:node`.
    pub username: String,
    /// base64(HMAC-SHA1(secret, username)).
    pub password: String,
    /// When the credentials stop working (the expiry in the username).
    pub expires: Timestamp,
}

impl std::fmt::Debug for RelayCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayCredentials")
            .field("server", &self.server)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("expires", &self.expires)
            .finish()
    }
}

/// The node's own record, as control sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfNode {
    /// The node's key.
    pub node_key: NodeKey,
    /// Its MagicDNS name, `host.tailnet-name`.
    pub name: String,
    /// Its tailnet addresses (/32 and /128).
    pub addresses: Vec<IpNet>,
    /// The subnet routes it advertises.
    pub advertised_routes: Vec<IpNet>,
    /// The advertised routes that are approved: the node routes them.
    pub primary_routes: Vec<IpNet>,
    /// Its tags (a tagged node is owned by its tags, not its user).
    pub tags: Vec<String>,
    /// When its node key expires; `None` for never.
    pub key_expiry: Option<Timestamp>,
}

/// One peer in a netmap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// The peer's WireGuard key.
    pub node_key: NodeKey,
    /// Its current disco key; `None` until it first polls.
    pub disco_key: Option<DiscoKey>,
    /// Its MagicDNS name.
    pub name: String,
    /// Its tailnet addresses followed by its approved subnet routes: the
    /// engine's AllowedIPs for it.
    pub allowed_ips: Vec<IpNet>,
    /// The UDP endpoints it reported, in its order of preference.
    pub endpoints: Vec<SocketAddr>,
    /// Whether it holds a map stream open now.
    pub online: bool,
    /// Its tags.
    pub tags: Vec<String>,
    /// Its relayed address (its TURN allocation), when it reported one: a
    /// candidate path for when no direct one works.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<SocketAddr>,
}

/// Reads a present field as `Some`, even when its value is `null`, so that
/// `"relay": null` (the relay is gone) differs from no `relay` field
/// (unchanged).
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// The fields of one peer that changed. `None` means unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PeerChange {
    /// Which peer.
    pub node_key: NodeKey,
    /// Its new disco key (it restarted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disco_key: Option<DiscoKey>,
    /// Its new name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Its new AllowedIPs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_ips: Option<Vec<IpNet>>,
    /// Its new endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<SocketAddr>>,
    /// Its new online state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
    /// Its new tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    /// Its new relayed address; `Some(None)`: it holds none any more.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub relay: Option<Option<SocketAddr>>,
}

impl PeerChange {
    /// A change of `node_key` that changes nothing yet.
    pub fn new(node_key: NodeKey) -> Self {
        Self {
            node_key,
            ..Self::default()
        }
    }

    /// True when no field changes.
    pub fn is_empty(&self) -> bool {
        let Self {
            node_key: _,
            disco_key,
            name,
            allowed_ips,
            endpoints,
            online,
            tags,
            relay,
        } = self;
        disco_key.is_none()
            && name.is_none()
            && allowed_ips.is_none()
            && endpoints.is_none()
            && online.is_none()
            && tags.is_none()
            && relay.is_none()
    }

    /// Folds a later change of the same peer into this one.
    pub fn merge(&mut self, later: PeerChange) {
        let PeerChange {
            node_key: _,
            disco_key,
            name,
            allowed_ips,
            endpoints,
            online,
            tags,
            relay,
        } = later;
        if disco_key.is_some() {
            self.disco_key = disco_key;
        }
        if name.is_some() {
            self.name = name;
        }
        if allowed_ips.is_some() {
            self.allowed_ips = allowed_ips;
        }
        if endpoints.is_some() {
            self.endpoints = endpoints;
        }
        if online.is_some() {
            self.online = online;
        }
        if tags.is_some() {
            self.tags = tags;
        }
        if relay.is_some() {
            self.relay = relay;
        }
    }

    fn apply_to(self, peer: &mut Peer) {
        let PeerChange {
            node_key: _,
            disco_key,
            name,
            allowed_ips,
            endpoints,
            online,
            tags,
            relay,
        } = self;
        if let Some(disco_key) = disco_key {
            peer.disco_key = Some(disco_key);
        }
        if let Some(name) = name {
            peer.name = name;
        }
        if let Some(allowed_ips) = allowed_ips {
            peer.allowed_ips = allowed_ips;
        }
        if let Some(endpoints) = endpoints {
            peer.endpoints = endpoints;
        }
        if let Some(online) = online {
            peer.online = online;
        }
        if let Some(tags) = tags {
            peer.tags = tags;
        }
        if let Some(relay) = relay {
            peer.relay = relay;
        }
    }
}

/// What changed in a node's netmap since the previous message.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetmapDelta {
    /// Peers that became visible, sorted by key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers_added: Vec<Peer>,
    /// Peers that are gone, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers_removed: Vec<NodeKey>,
    /// Peers whose fields changed, sorted by key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers_changed: Vec<PeerChange>,
    /// The whole new packet filter, when it changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packet_filter: Option<Vec<FilterRule>>,
    /// The node's own new record, when it changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_node: Option<SelfNode>,
    /// New NAT settings: fresh relay credentials before the old ones
    /// expire, or new STUN servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatMap>,
}

impl NetmapDelta {
    /// True when the delta changes nothing.
    pub fn is_empty(&self) -> bool {
        let Self {
            peers_added,
            peers_removed,
            peers_changed,
            packet_filter,
            self_node,
            nat,
        } = self;
        peers_added.is_empty()
            && peers_removed.is_empty()
            && peers_changed.is_empty()
            && packet_filter.is_none()
            && self_node.is_none()
            && nat.is_none()
    }
}

/// Why a delta could not be applied to a netmap. The netmap is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// The delta adds a peer the netmap already has.
    #[error("delta adds peer {0} which is already present")]
    AlreadyPresent(NodeKey),
    /// The delta removes or changes a peer the netmap does not have.
    #[error("delta names peer {0} which is not present")]
    NotPresent(NodeKey),
}

/// The peers a delta touched, for the engine's `apply_peer_delta`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AppliedDelta {
    /// Peers added or changed: upsert their new [`Peer`] into the engine.
    pub upserted: Vec<NodeKey>,
    /// Peers removed.
    pub removed: Vec<NodeKey>,
    /// The packet filter changed.
    pub filter_changed: bool,
    /// The node's own record changed (addresses, routes, name).
    pub self_changed: bool,
    /// The NAT settings changed (new relay credentials, STUN servers).
    pub nat_changed: bool,
}

impl Netmap {
    /// The peer with this key.
    pub fn peer(&self, key: &NodeKey) -> Option<&Peer> {
        self.peers
            .binary_search_by(|p| p.node_key.cmp(key))
            .ok()
            .map(|i| &self.peers[i])
    }

    /// The routes to send into the tunnel: both tailnet ranges plus every
    /// peer's approved subnet routes (its AllowedIPs that are not single
    /// addresses), sorted and without duplicates.
    pub fn routes(&self) -> Vec<IpNet> {
        let mut routes: Vec<IpNet> = vec![
            TAILNET_IPV4_RANGE.parse().expect("constant prefix"),
            TAILNET_IPV6_RANGE.parse().expect("constant prefix"),
        ];
        for peer in &self.peers {
            routes.extend(
                peer.allowed_ips
                    .iter()
                    .filter(|net| net.prefix_len() != net.max_prefix_len())
                    .copied(),
            );
        }
        routes.sort();
        routes.dedup();
        routes
    }

    /// Applies a delta. Every named peer is checked first, so on error the
    /// netmap is left as it was.
    pub fn apply(&mut self, delta: &NetmapDelta) -> Result<AppliedDelta, ApplyError> {
        for key in &delta.peers_removed {
            if self.peer(key).is_none() {
                return Err(ApplyError::NotPresent(*key));
            }
        }
        let removed: std::collections::BTreeSet<NodeKey> =
            delta.peers_removed.iter().copied().collect();
        for peer in &delta.peers_added {
            if self.peer(&peer.node_key).is_some() && !removed.contains(&peer.node_key) {
                return Err(ApplyError::AlreadyPresent(peer.node_key));
            }
        }
        let added: std::collections::BTreeSet<NodeKey> =
            delta.peers_added.iter().map(|p| p.node_key).collect();
        for change in &delta.peers_changed {
            let present = (self.peer(&change.node_key).is_some()
                && !removed.contains(&change.node_key))
                || added.contains(&change.node_key);
            if !present {
                return Err(ApplyError::NotPresent(change.node_key));
            }
        }

        let mut applied = AppliedDelta::default();
        if !removed.is_empty() {
            self.peers.retain(|p| !removed.contains(&p.node_key));
            applied.removed = removed.into_iter().collect();
        }
        for peer in &delta.peers_added {
            let at = self
                .peers
                .binary_search_by(|p| p.node_key.cmp(&peer.node_key))
                .unwrap_or_else(|at| at);
            self.peers.insert(at, peer.clone());
            applied.upserted.push(peer.node_key);
        }
        for change in &delta.peers_changed {
            if let Ok(at) = self
                .peers
                .binary_search_by(|p| p.node_key.cmp(&change.node_key))
            {
                change.clone().apply_to(&mut self.peers[at]);
                applied.upserted.push(change.node_key);
            }
        }
        applied.upserted.sort();
        applied.upserted.dedup();
        if let Some(filter) = &delta.packet_filter {
            self.packet_filter = filter.clone();
            applied.filter_changed = true;
        }
        if let Some(self_node) = &delta.self_node {
            self.self_node = self_node.clone();
            applied.self_changed = true;
        }
        if let Some(nat) = &delta.nat {
            self.nat = nat.clone();
            applied.nat_changed = true;
        }
        Ok(applied)
    }
}

/// One accept rule of a node's inbound packet filter.
///
/// The same shape as the core's `filter::FilterRule` with `action: Accept`:
/// a packet from `src` to `dst` (and, when set, of `protocol` to a
/// destination port in `dst_ports`) is accepted. Packets no rule accepts are
/// dropped, so the core's filter gets `default_action: Drop`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FilterRule {
    /// Source prefix.
    pub src: IpNet,
    /// Destination prefix.
    pub dst: IpNet,
    /// IP protocol number; `None` for any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u8>,
    /// Inclusive destination port range; `None` for any port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_ports: Option<(u16, u16)>,
}

/// MagicDNS settings of the tailnet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsConfig {
    /// The tailnet's domain: every node is `host.domain`.
    pub domain: String,
    /// Resolvers the node should use (MagicDNS's 100.100.100.100 by default).
    pub nameservers: Vec<IpAddr>,
    /// Search domains (the tailnet's domain).
    pub search_domains: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(byte: u8) -> Peer {
        Peer {
            node_key: NodeKey([byte; 32]),
            disco_key: Some(DiscoKey([byte; 32])),
            name: format!("n{byte}.example"),
            allowed_ips: vec![format!("100.64.0.{byte}/32").parse().unwrap()],
            endpoints: vec![],
            online: true,
            tags: vec![],
            relay: None,
        }
    }

    fn netmap(peers: Vec<Peer>) -> Netmap {
        Netmap {
            self_node: SelfNode {
                node_key: NodeKey([0xff; 32]),
                name: "me.example".into(),
                addresses: vec!["100.64.0.99/32".parse().unwrap()],
                advertised_routes: vec![],
                primary_routes: vec![],
                tags: vec![],
                key_expiry: None,
            },
            peers,
            packet_filter: vec![],
            dns: DnsConfig {
                domain: "example".into(),
                nameservers: vec![],
                search_domains: vec![],
            },
            nat: Default::default(),
        }
    }

    #[test]
    fn apply_adds_removes_and_changes_peers_in_key_order() {
        let mut map = netmap(vec![peer(1), peer(3)]);
        let mut change = PeerChange::new(NodeKey([3; 32]));
        change.disco_key = Some(DiscoKey([9; 32]));
        let delta = NetmapDelta {
            peers_added: vec![peer(2)],
            peers_removed: vec![NodeKey([1; 32])],
            peers_changed: vec![change],
            ..NetmapDelta::default()
        };
        let applied = map.apply(&delta).unwrap();
        assert_eq!(applied.upserted, vec![NodeKey([2; 32]), NodeKey([3; 32])]);
        assert_eq!(applied.removed, vec![NodeKey([1; 32])]);
        let keys: Vec<_> = map.peers.iter().map(|p| p.node_key).collect();
        assert_eq!(keys, vec![NodeKey([2; 32]), NodeKey([3; 32])]);
        assert_eq!(map.peers[1].disco_key, Some(DiscoKey([9; 32])));
        assert_eq!(map.peers[1].name, "n3.example", "unnamed fields stay");
    }

    #[test]
    fn a_bad_delta_leaves_the_netmap_unchanged() {
        let original = netmap(vec![peer(1)]);
        let mut map = original.clone();
        let delta = NetmapDelta {
            peers_removed: vec![NodeKey([1; 32])],
            peers_changed: vec![PeerChange {
                online: Some(false),
                ..PeerChange::new(NodeKey([7; 32]))
            }],
            ..NetmapDelta::default()
        };
        assert_eq!(
            map.apply(&delta),
            Err(ApplyError::NotPresent(NodeKey([7; 32])))
        );
        assert_eq!(map, original);
        let twice = NetmapDelta {
            peers_added: vec![peer(1)],
            ..NetmapDelta::default()
        };
        assert_eq!(
            map.apply(&twice),
            Err(ApplyError::AlreadyPresent(NodeKey([1; 32])))
        );
        assert_eq!(map, original);
    }

    #[test]
    fn responses_round_trip_and_refuse_other_versions() {
        let response = MapResponse {
            wire_version: WIRE_VERSION,
            seq: 4,
            body: MapBody::Delta(Box::new(NetmapDelta {
                peers_changed: vec![PeerChange {
                    endpoints: Some(vec!["192.0.2.1:41641".parse().unwrap()]),
                    ..PeerChange::new(NodeKey([1; 32]))
                }],
                ..NetmapDelta::default()
            })),
        };
        let bytes = response.to_json();
        assert_eq!(MapResponse::from_json(&bytes).unwrap(), response);
        let text = String::from_utf8(bytes).unwrap();
        assert!(!text.contains("disco_key"), "unchanged fields are not sent");
        let other = text.replace("\"wire_version\":1", "\"wire_version\":2");
        assert!(matches!(
            MapResponse::from_json(other.as_bytes()),
            Err(DecodeError::WrongVersion { got: 2 })
        ));
        assert!(matches!(
            MapResponse::from_json(b"{"),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn routes_are_the_tailnet_ranges_and_peer_subnets() {
        let mut router = peer(1);
        router.allowed_ips.push("10.1.0.0/16".parse().unwrap());
        let map = netmap(vec![router, peer(2)]);
        let routes: Vec<String> = map.routes().iter().map(|r| r.to_string()).collect();
        assert_eq!(
            routes,
            vec!["10.1.0.0/16", "100.64.0.0/10", "fd7a:115c:a1e0::/48"]
        );
    }
}
