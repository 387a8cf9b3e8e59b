//! Configuration: what the engine is built with and what a reconfig carries.
//!
//! [`EngineConfig`] is fixed for an engine's life (its keys and local knobs).
//! [`Reconfig`] is the full desired state pushed by the control plane: the
//! WireGuard peers, the router and DNS settings and the knobs. The engine
//! diffs every part against the previous one, so pushing the same state twice
//! costs little and reports [`crate::ReconfigOutcome::NoChanges`].

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::keys::{DiscoPrivateKey, DiscoPublicKey, NodePrivateKey, NodePublicKey};

/// How many packets may wait for one peer's handshake before new ones are dropped.
pub const DEFAULT_MAX_QUEUED_PACKETS_PER_PEER: usize = 64;

/// What an engine is created with. It does not change over the engine's life.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The node's WireGuard private key.
    pub private_key: NodePrivateKey,
    /// The node's disco private key (new on every start of the node).
    pub disco_private_key: DiscoPrivateKey,
    /// A human-readable name for logs, status and ping results.
    pub name: String,
    /// The value of `WGMESH_TRIM_WIREGUARD` as read by the adapters: `Some(true)`
    /// forces lazy peers on, `Some(false)` off, `None` follows the
    /// [`Knobs::keep_full_wg_config`] knob. The core never reads the environment.
    pub trim_override: Option<bool>,
    /// The bound of the queue of packets waiting for a peer's handshake (the
    /// waking packet included); the packets beyond it are dropped and counted
    /// as `queue_overflow`.
    pub max_queued_packets_per_peer: usize,
    /// Switches that exist only so tests can show what a mechanism buys.
    pub testing: TestingKnobs,
}

impl EngineConfig {
    /// A config with the defaults for everything but the keys.
    pub fn new(private_key: NodePrivateKey, disco_private_key: DiscoPrivateKey) -> Self {
        Self {
            private_key,
            disco_private_key,
            name: String::new(),
            trim_override: None,
            max_queued_packets_per_peer: DEFAULT_MAX_QUEUED_PACKETS_PER_PEER,
            testing: TestingKnobs::default(),
        }
    }
}

/// Test-only switches. Production code leaves them at their defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TestingKnobs {
    /// Skip the two-phase WireGuard reconfig on a disco-key change, as an
    /// engine without that mechanism would, to measure the blackout it avoids.
    pub disable_disco_key_flush: bool,
}

/// The full desired state of the node, as pushed by the control plane.
///
/// Every part is required; a missing part is an error rather than "keep the
/// old one", like the reference engine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Reconfig {
    /// The WireGuard part: listen port and the full peer list.
    pub wireguard: Option<WgConfig>,
    /// The OS routing part: local addresses, routes, MTU.
    pub router: Option<RouterConfig>,
    /// The DNS part.
    pub dns: Option<DnsConfig>,
    /// Behaviour switches delivered with the netmap.
    pub knobs: Knobs,
    /// The subnet routes the control plane made this node the primary router
    /// for. With [`RouterConfig::advertised_routes`] it decides whether this
    /// node is an active subnet router (and so whether BIRD is told).
    pub primary_routes: Vec<IpNet>,
}

/// The WireGuard part of a reconfig.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct WgConfig {
    /// The UDP port to listen on; 0 lets the adapter choose.
    pub listen_port: u16,
    /// Every peer of the netmap. Only the active ones are handed to WireGuard
    /// when lazy peers are on.
    pub peers: Vec<PeerConfig>,
}

/// One peer of the full config.
///
/// Its `Debug` output redacts the pre-shared key, and the key is overwritten
/// when the config is dropped: configs are logged and cloned freely.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PeerConfig {
    /// The peer's WireGuard public key (its identity).
    pub public_key: NodePublicKey,
    /// The peer's current disco key; a change means the peer restarted.
    pub disco_key: Option<DiscoPublicKey>,
    /// The peer's name, for status, events and ping results.
    pub name: String,
    /// The addresses and subnets routed to this peer.
    pub allowed_ips: Vec<IpNet>,
    /// Candidate UDP endpoints of the peer, best known first.
    pub endpoints: Vec<SocketAddr>,
    /// WireGuard persistent keepalive, in seconds.
    pub persistent_keepalive_secs: Option<u16>,
    /// Optional WireGuard pre-shared key.
    pub preshared_key: Option<[u8; 32]>,
}

impl fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerConfig")
            .field("public_key", &self.public_key)
            .field("disco_key", &self.disco_key)
            .field("name", &self.name)
            .field("allowed_ips", &self.allowed_ips)
            .field("endpoints", &self.endpoints)
            .field("persistent_keepalive_secs", &self.persistent_keepalive_secs)
            .field("preshared_key", &self.preshared_key.map(|_| "<redacted>"))
            .finish()
    }
}

impl Drop for PeerConfig {
    fn drop(&mut self) {
        if let Some(key) = self.preshared_key.as_mut() {
            zeroize::Zeroize::zeroize(key);
        }
    }
}

impl PeerConfig {
    /// A peer with the given key and allowed IPs and nothing else set.
    pub fn new(public_key: NodePublicKey, allowed_ips: Vec<IpNet>) -> Self {
        Self {
            public_key,
            disco_key: None,
            name: String::new(),
            allowed_ips,
            endpoints: Vec::new(),
            persistent_keepalive_secs: None,
            preshared_key: None,
        }
    }

    /// True when every AllowedIP is a single address (/32 or /128): only such
    /// peers may be trimmed. Subnet routers always stay configured, as in the
    /// reference.
    pub fn is_trimmable(&self) -> bool {
        self.allowed_ips
            .iter()
            .all(|net| net.prefix_len() == net.max_prefix_len())
    }
}

/// The router part of a reconfig: what the adapters apply to the OS.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct RouterConfig {
    /// The node's own tunnel addresses, with their prefix length.
    pub local_addrs: Vec<IpNet>,
    /// Routes to install through the tunnel.
    pub routes: Vec<IpNet>,
    /// The subnets this node advertises as a subnet router.
    pub advertised_routes: Vec<IpNet>,
    /// Tunnel MTU in bytes.
    pub mtu: u16,
}

/// The DNS part of a reconfig.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct DnsConfig {
    /// Resolvers to use.
    pub nameservers: Vec<IpAddr>,
    /// Search domains.
    pub search_domains: Vec<String>,
}

/// Behaviour switches that come with a reconfig.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Knobs {
    /// Give WireGuard every peer of the full config (lazy peers off).
    pub keep_full_wg_config: bool,
    /// Ask the adapters for a random client port instead of the preferred one.
    pub randomize_client_port: bool,
    /// Path-MTU discovery on or off (passed to the adapters).
    pub path_mtu_discovery: bool,
    /// Fake mode: the engine answers ICMP echo requests to any peer itself.
    pub fake_icmp_echo: bool,
    /// The PeerAPI port announced in TSMP pongs.
    pub peerapi_port: Option<u16>,
    /// The BIRD protocol name to switch on while this node is a primary
    /// subnet router; `None` means BIRD is not used.
    pub bird_protocol: Option<String>,
}

/// Why a reconfig was refused. The engine keeps running on the previous state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReconfigError {
    /// One of the required parts (wireguard, router, dns) is absent.
    #[error("reconfig is missing its {0} part")]
    MissingPart(&'static str),
    /// Two peers have the same public key.
    #[error("peer {0} appears twice")]
    DuplicatePeer(NodePublicKey),
    /// Two peers have the same disco key (disco messages could not be told apart).
    #[error("disco key {0} is used by two peers")]
    DuplicateDiscoKey(DiscoPublicKey),
    /// A peer has this node's own public key.
    #[error("peer {0} is this node's own key")]
    SelfAsPeer(NodePublicKey),
    /// The same single address is an AllowedIP of two peers.
    #[error("allowed IP {addr} is claimed by {first} and {second}")]
    OverlappingAllowedIp {
        /// The address claimed twice.
        addr: IpNet,
        /// The first peer that claims it.
        first: NodePublicKey,
        /// The second peer that claims it.
        second: NodePublicKey,
    },
    /// An address or prefix of a family the tunnel has no local address for.
    #[error("{what} {prefix} is {family} but the node has no {family} address")]
    WrongFamily {
        /// Which field holds it.
        what: &'static str,
        /// The offending prefix.
        prefix: IpNet,
        /// "IPv4" or "IPv6".
        family: &'static str,
    },
    /// The MTU is outside 576..=65535 (or below 1280 with IPv6 addresses).
    #[error("mtu {0} is out of range")]
    BadMtu(u16),
}

/// Refuses a prefix of a family the node has no local address for (no check
/// while the node has no addresses at all).
pub(crate) fn check_family(
    local_addrs: &[IpNet],
    what: &'static str,
    prefix: &IpNet,
) -> Result<(), ReconfigError> {
    if local_addrs.is_empty()
        || local_addrs
            .iter()
            .any(|a| a.addr().is_ipv4() == prefix.addr().is_ipv4())
    {
        return Ok(());
    }
    Err(ReconfigError::WrongFamily {
        what,
        prefix: *prefix,
        family: if prefix.addr().is_ipv4() {
            "IPv4"
        } else {
            "IPv6"
        },
    })
}

/// Masks a peer's AllowedIPs to their prefixes, sorts and dedups them, and
/// checks their family.
pub(crate) fn normalize_peer(
    peer: &mut PeerConfig,
    local_addrs: &[IpNet],
) -> Result<(), ReconfigError> {
    for net in &mut peer.allowed_ips {
        *net = net.trunc();
        check_family(local_addrs, "allowed IP", net)?;
    }
    peer.allowed_ips.sort();
    peer.allowed_ips.dedup();
    Ok(())
}

/// The validated, normalised form of a reconfig, in the shapes the engine keeps.
pub(crate) struct ValidReconfig {
    pub wireguard: WgConfig,
    pub router: RouterConfig,
    pub dns: DnsConfig,
    pub knobs: Knobs,
    pub primary_routes: Vec<IpNet>,
}

impl Reconfig {
    /// Checks the reconfig and normalises it (AllowedIPs masked to their prefix).
    pub(crate) fn validate(
        &self,
        self_key: &NodePublicKey,
    ) -> Result<ValidReconfig, ReconfigError> {
        let wireguard = self
            .wireguard
            .clone()
            .ok_or(ReconfigError::MissingPart("wireguard"))?;
        let router = self
            .router
            .clone()
            .ok_or(ReconfigError::MissingPart("router"))?;
        let dns = self.dns.clone().ok_or(ReconfigError::MissingPart("dns"))?;

        let has_v6 = router.local_addrs.iter().any(|a| a.addr().is_ipv6());
        let check_family =
            |what: &'static str, prefix: &IpNet| check_family(&router.local_addrs, what, prefix);
        if router.mtu != 0 && (router.mtu < 576 || (has_v6 && router.mtu < 1280)) {
            return Err(ReconfigError::BadMtu(router.mtu));
        }
        for route in &router.routes {
            check_family("route", route)?;
        }

        let mut seen_keys = std::collections::BTreeSet::new();
        let mut seen_disco = std::collections::BTreeSet::new();
        let mut single_ip_owner: BTreeMap<IpNet, NodePublicKey> = BTreeMap::new();
        let mut wireguard = wireguard;
        for peer in &mut wireguard.peers {
            if peer.public_key == *self_key {
                return Err(ReconfigError::SelfAsPeer(peer.public_key));
            }
            if !seen_keys.insert(peer.public_key) {
                return Err(ReconfigError::DuplicatePeer(peer.public_key));
            }
            if let Some(disco) = peer.disco_key {
                if !seen_disco.insert(disco) {
                    return Err(ReconfigError::DuplicateDiscoKey(disco));
                }
            }
            for net in &mut peer.allowed_ips {
                *net = net.trunc();
                check_family("allowed IP", net)?;
                if net.prefix_len() == net.max_prefix_len() {
                    if let Some(first) = single_ip_owner.insert(*net, peer.public_key) {
                        return Err(ReconfigError::OverlappingAllowedIp {
                            addr: *net,
                            first,
                            second: peer.public_key,
                        });
                    }
                }
            }
            peer.allowed_ips.sort();
            peer.allowed_ips.dedup();
        }
        Ok(ValidReconfig {
            wireguard,
            router,
            dns,
            knobs: self.knobs.clone(),
            primary_routes: self.primary_routes.clone(),
        })
    }
}
