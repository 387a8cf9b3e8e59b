//! Configuration: what the engine is built with and what a reconfig carries.
//!
//! [`EngineConfig`] is fixed for an engine's life (its keys and local knobs).
//! [`Reconfig`] is the full desired state pushed by the control plane: the
//! WireGuard peers, the router and DNS settings and the knobs. The engine
//! diffs every part against the previous one, so pushing the same state twice
//! costs little and reports [`crate::ReconfigOutcome::NoChanges`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::keys::{DiscoPrivateKey, DiscoPublicKey, NodePrivateKey, NodePublicKey};

/// How many packets may wait for one peer's handshake before new ones are
/// dropped (and counted as `drop_queue_overflow`): 1,024, eight times what
/// wireguard-go stages. A bulk flow of full-sized packets keeps sending
/// for a handshake round trip of 12 ms at 1 Gbit/s (120 ms at 100 Mbit/s)
/// without loss.
///
/// It is no larger because the queue leaves at one instant when the session
/// exists, and the receiver refuses as a replay any datagram more than
/// 1,023 counters behind the newest it has seen (boringtun's window is
/// 1,024 packets). A queue of 1,024 fits that window whatever order the
/// network delivers it in; a larger one, reordered by a few milliseconds
/// of jitter, lost about a third of a 1,500-packet wake
/// (`corpus/wake-burst-beyond-the-replay-window.toml`).
pub const DEFAULT_MAX_QUEUED_PACKETS_PER_PEER: usize = 1024;
/// How many bytes of packets may wait for one peer's handshake: 1.5 MiB,
/// the packet bound's worth of 1,500-byte packets.
pub const DEFAULT_MAX_QUEUED_BYTES_PER_PEER: usize = 1536 << 10;
/// How many bytes of packets may wait for handshakes over all peers together:
/// 64 MiB, so that waking many peers at once cannot take the node's memory.
pub const DEFAULT_MAX_QUEUED_BYTES_TOTAL: usize = 64 << 20;

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
    /// The bound, in bytes, of the same queue; the packets beyond it are
    /// dropped and counted as `queue_overflow`.
    pub max_queued_bytes_per_peer: usize,
    /// The bound, in bytes, of all peers' queues together; the packets beyond
    /// it are dropped and counted as `queue_budget_exceeded`.
    pub max_queued_bytes_total: usize,
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
            max_queued_bytes_per_peer: DEFAULT_MAX_QUEUED_BYTES_PER_PEER,
            max_queued_bytes_total: DEFAULT_MAX_QUEUED_BYTES_TOTAL,
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
    /// Fake mode: the engine answers ICMP echo requests that arrive from
    /// peers through the tunnel (for any destination that passes the packet
    /// filter) and sends the reply back through WireGuard; the request does
    /// not reach the TUN. The local OS's own pings go out untouched.
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
    /// The engine is closed and takes no more changes.
    #[error("engine is closed")]
    EngineClosed,
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

/// The validated, normalised form of a reconfig, in the shapes the engine
/// keeps: every part present, AllowedIPs masked to their prefix, sorted and
/// deduplicated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidReconfig {
    /// The WireGuard part.
    pub wireguard: WgConfig,
    /// The router part.
    pub router: RouterConfig,
    /// The DNS part.
    pub dns: DnsConfig,
    /// The knobs.
    pub knobs: Knobs,
    /// The subnet routes this node is the primary router for.
    pub primary_routes: Vec<IpNet>,
}

/// A change to part of the peer list, applied against the running state
/// with [`crate::Input::PeerDelta`]: its cost is proportional to the change,
/// not to the number of peers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerDelta {
    /// Peers to add or replace.
    pub upsert: Vec<PeerConfig>,
    /// Peers to remove.
    pub remove: Vec<NodePublicKey>,
}

impl Reconfig {
    /// Checks the reconfig and normalises it (AllowedIPs masked to their
    /// prefix, sorted and deduplicated), without an engine: this is what a
    /// config check runs, and what the engine runs before it applies a full
    /// reconfig. The rules:
    ///
    /// - the wireguard, router and DNS parts are all present;
    /// - the MTU is 0 (the adapter's default) or in 576..=65535, and at least
    ///   1280 when the node has an IPv6 address;
    /// - every route and AllowedIP is of a family the node has an address of
    ///   (no check while it has no address at all);
    /// - and the peer-set rules: no peer is this node,
    ///   no key, disco key or single-address AllowedIP belongs to two peers.
    pub fn validate(&self, self_key: &NodePublicKey) -> Result<ValidReconfig, ReconfigError> {
        let mut wireguard = self
            .wireguard
            .clone()
            .ok_or(ReconfigError::MissingPart("wireguard"))?;
        let router = self
            .router
            .clone()
            .ok_or(ReconfigError::MissingPart("router"))?;
        let dns = self.dns.clone().ok_or(ReconfigError::MissingPart("dns"))?;

        let has_v6 = router.local_addrs.iter().any(|a| a.addr().is_ipv6());
        if router.mtu != 0 && (router.mtu < 576 || (has_v6 && router.mtu < 1280)) {
            return Err(ReconfigError::BadMtu(router.mtu));
        }
        for route in &router.routes {
            check_family(&router.local_addrs, "route", route)?;
        }
        check_peer_batch(
            &mut wireguard.peers,
            self_key,
            &router.local_addrs,
            None,
            &[],
        )?;
        Ok(ValidReconfig {
            wireguard,
            router,
            dns,
            knobs: self.knobs.clone(),
            primary_routes: self.primary_routes.clone(),
        })
    }
}

/// The running peers a batch of peers is checked against: the engine's, for
/// a peer delta or the changed positions of a reconfig.
pub(crate) trait RunningPeers {
    /// True when `key` belongs to a running peer that the batch does not
    /// replace (so listing it in the batch names it twice).
    fn stays_outside_batch(&self, key: &NodePublicKey) -> bool;
    /// The running peer that holds this disco key.
    fn disco_owner(&self, disco: &DiscoPublicKey) -> Option<NodePublicKey>;
    /// The running peer that holds exactly this AllowedIP.
    fn single_ip_owner(&self, net: &IpNet) -> Option<NodePublicKey>;
}

/// The peer-set rules, the one place they live. Checks `batch` (a full peer
/// list, or the upserts of a change) and normalises its AllowedIPs in place.
///
/// Within the batch: no peer has this node's key, no key is listed twice, no
/// disco key is used twice, every AllowedIP is of a family the node has, and
/// no single address (/32, /128) is claimed twice. Against `running` (when
/// the batch changes a running set): no key of a peer outside the batch is
/// listed, and no disco key or single address of a running peer is claimed,
/// unless that peer is `removed` or replaced by the batch. Each peer is
/// checked in order, each rule in the order above, so the first offending
/// peer decides the error.
pub(crate) fn check_peer_batch(
    batch: &mut [PeerConfig],
    self_key: &NodePublicKey,
    local_addrs: &[IpNet],
    running: Option<&dyn RunningPeers>,
    removed: &[NodePublicKey],
) -> Result<(), ReconfigError> {
    // Keys of the batch release what their running versions held; only
    // needed when there is a running set.
    let batch_keys: BTreeSet<NodePublicKey> = match running {
        Some(_) => batch.iter().map(|p| p.public_key).collect(),
        None => BTreeSet::new(),
    };
    let released = |owner: &NodePublicKey| removed.contains(owner) || batch_keys.contains(owner);
    let mut seen_keys = BTreeSet::new();
    let mut seen_disco = BTreeSet::new();
    let mut single_ip_owner: BTreeMap<IpNet, NodePublicKey> = BTreeMap::new();
    for peer in batch.iter_mut() {
        let key = peer.public_key;
        if key == *self_key {
            return Err(ReconfigError::SelfAsPeer(key));
        }
        if !seen_keys.insert(key) || running.is_some_and(|r| r.stays_outside_batch(&key)) {
            return Err(ReconfigError::DuplicatePeer(key));
        }
        if let Some(disco) = peer.disco_key {
            let held_elsewhere = running
                .and_then(|r| r.disco_owner(&disco))
                .is_some_and(|owner| owner != key && !released(&owner));
            if !seen_disco.insert(disco) || held_elsewhere {
                return Err(ReconfigError::DuplicateDiscoKey(disco));
            }
        }
        for net in &mut peer.allowed_ips {
            *net = net.trunc();
            check_family(local_addrs, "allowed IP", net)?;
            if net.prefix_len() != net.max_prefix_len() {
                continue;
            }
            if let Some(first) = single_ip_owner.insert(*net, key) {
                return Err(ReconfigError::OverlappingAllowedIp {
                    addr: *net,
                    first,
                    second: key,
                });
            }
            if let Some(owner) = running.and_then(|r| r.single_ip_owner(net)) {
                if owner != key && !released(&owner) {
                    return Err(ReconfigError::OverlappingAllowedIp {
                        addr: *net,
                        first: owner,
                        second: key,
                    });
                }
            }
        }
        peer.allowed_ips.sort();
        peer.allowed_ips.dedup();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A running set: who holds which disco key and which single address.
    #[derive(Default)]
    struct Running {
        disco: BTreeMap<DiscoPublicKey, NodePublicKey>,
        addresses: BTreeMap<IpNet, NodePublicKey>,
        outside: BTreeSet<NodePublicKey>,
    }

    impl RunningPeers for Running {
        fn stays_outside_batch(&self, key: &NodePublicKey) -> bool {
            self.outside.contains(key)
        }
        fn disco_owner(&self, disco: &DiscoPublicKey) -> Option<NodePublicKey> {
            self.disco.get(disco).copied()
        }
        fn single_ip_owner(&self, net: &IpNet) -> Option<NodePublicKey> {
            self.addresses.get(net).copied()
        }
    }

    fn peer(key: u8, disco: Option<u8>, address: &str) -> PeerConfig {
        PeerConfig {
            disco_key: disco.map(|d| DiscoPublicKey([d; 32])),
            ..PeerConfig::new(NodePublicKey([key; 32]), vec![address.parse().unwrap()])
        }
    }

    #[test]
    fn a_batch_takes_over_only_what_a_leaving_or_replaced_peer_held() {
        let me = NodePublicKey([9; 32]);
        let a = NodePublicKey([1; 32]);
        let b = NodePublicKey([2; 32]);
        let mut running = Running::default();
        running.disco.insert(DiscoPublicKey([11; 32]), a);
        let a_addr: IpNet = "100.64.0.1/32".parse().unwrap();
        running.addresses.insert(a_addr, a);

        // b takes a's disco key while a stays: refused.
        let mut batch = vec![peer(2, Some(11), "100.64.0.2/32")];
        assert_eq!(
            check_peer_batch(&mut batch, &me, &[], Some(&running), &[]),
            Err(ReconfigError::DuplicateDiscoKey(DiscoPublicKey([11; 32])))
        );
        // ... accepted when a leaves, or when a is in the batch with a new key.
        assert_eq!(
            check_peer_batch(&mut batch, &me, &[], Some(&running), &[a]),
            Ok(())
        );
        let mut batch = vec![
            peer(2, Some(11), "100.64.0.2/32"),
            peer(1, Some(12), "100.64.0.1/32"),
        ];
        assert_eq!(
            check_peer_batch(&mut batch, &me, &[], Some(&running), &[]),
            Ok(())
        );

        // b claims a's address while a stays: a is named as the first owner.
        let mut batch = vec![peer(2, None, "100.64.0.1/32")];
        assert_eq!(
            check_peer_batch(&mut batch, &me, &[], Some(&running), &[]),
            Err(ReconfigError::OverlappingAllowedIp {
                addr: a_addr,
                first: a,
                second: b
            })
        );
        // Without a running set (a full reconfig) only the batch counts.
        assert_eq!(check_peer_batch(&mut batch, &me, &[], None, &[]), Ok(()));

        // A key that stays outside the batch cannot be listed in it.
        running.outside.insert(b);
        let mut batch = vec![peer(2, None, "100.64.0.2/32")];
        assert_eq!(
            check_peer_batch(&mut batch, &me, &[], Some(&running), &[]),
            Err(ReconfigError::DuplicatePeer(b))
        );
    }

    #[test]
    fn validate_normalises_and_refuses_by_the_same_rules() {
        let me = NodePublicKey([9; 32]);
        let mut reconfig = Reconfig {
            wireguard: Some(WgConfig {
                listen_port: 41641,
                peers: vec![PeerConfig::new(
                    NodePublicKey([1; 32]),
                    vec![
                        "10.1.2.3/16".parse().unwrap(),
                        "100.64.0.1/32".parse().unwrap(),
                    ],
                )],
            }),
            router: Some(RouterConfig::default()),
            dns: Some(DnsConfig::default()),
            ..Reconfig::default()
        };
        let valid = reconfig.validate(&me).unwrap();
        assert_eq!(
            valid.wireguard.peers[0].allowed_ips,
            vec![
                "10.1.0.0/16".parse::<IpNet>().unwrap(),
                "100.64.0.1/32".parse().unwrap()
            ],
            "masked to the prefix and sorted"
        );
        reconfig
            .wireguard
            .as_mut()
            .unwrap()
            .peers
            .push(PeerConfig::new(me, vec![]));
        assert_eq!(reconfig.validate(&me), Err(ReconfigError::SelfAsPeer(me)));
        reconfig.dns = None;
        assert_eq!(
            reconfig.validate(&me),
            Err(ReconfigError::MissingPart("dns"))
        );
    }
}
