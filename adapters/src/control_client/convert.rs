//! From control's netmap to the engine's inputs.
//!
//! The first netmap of a stream becomes one full [`Reconfig`] (peers sorted
//! by key, as control sends them), its packet filter a [`PacketFilter`] and
//! its names the MagicDNS settings. Every later delta is applied to the
//! node's copy of the netmap ([`Netmap::apply`], a binary search per named
//! peer) and becomes a [`DeltaPlan`]: a [`PeerDelta`] naming exactly the
//! peers it touched, for `Engine::apply_peer_delta` (O(1) per changed peer
//! in the engine), plus a new filter or DNS table only when the delta changed
//! them. A delta that changes what the OS must route (the node's own record,
//! or a peer's subnet routes) asks for a full reconfig instead, because the
//! route set is a property of the whole netmap.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use wgmesh_control::{AppliedDelta, NatMap, Netmap, NetmapDelta, Peer};
use wgmesh_core::filter::{FilterAction, FilterRule, PacketFilter};
use wgmesh_core::{
    DiscoPublicKey, DnsConfig, Knobs, NatConfig, NodePublicKey, PeerConfig, PeerDelta, PeerRelay,
    Reconfig, RouterConfig, WgConfig,
};

use crate::relay::{RelayCredentialSource, RelaySettings};

/// What the node decides for itself, not control: the parts of the reconfig
/// that come from the local config file or flags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalSettings {
    /// The UDP port to listen on (0: any).
    pub listen_port: u16,
    /// The tunnel MTU (0: the adapter's default).
    pub mtu: u16,
    /// The behaviour switches.
    pub knobs: Knobs,
    /// Whether this node runs the MagicDNS resolver. Without it, control's
    /// nameserver 100.100.100.100 (MagicDNS) is left out of the system's
    /// DNS settings: nothing would answer there.
    pub magicdns: bool,
}

/// The MagicDNS names a netmap gives: the tailnet domain and this node's
/// own single-label host name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsNames {
    /// The tailnet's domain (`example.ts.net`).
    pub domain: String,
    /// This node's host label (`laptop` of `laptop.example.ts.net`).
    pub hostname: String,
}

/// The engine's key for a control node key (the same 32 bytes).
pub fn node_public_key(key: &wgmesh_control::NodeKey) -> NodePublicKey {
    NodePublicKey(key.0)
}

/// The first label of `name` when it lies under `domain`
/// (`laptop.example.ts.net` -> `laptop`), otherwise `name` unchanged.
///
/// MagicDNS and status show peers by their host label; a name control sent
/// that is not under the tailnet's domain stays whole, and MagicDNS leaves
/// it out with a warning (it is not a single label).
pub fn host_label(name: &str, domain: &str) -> String {
    let name = name.trim_end_matches('.');
    let domain = domain.trim_end_matches('.');
    match name.strip_suffix(domain) {
        Some(rest) if !domain.is_empty() && rest.ends_with('.') => {
            rest.trim_end_matches('.').to_owned()
        }
        Some(_) | None => name.to_owned(),
    }
}

/// The engine's config of one netmap peer.
pub fn peer_config(peer: &Peer, domain: &str) -> PeerConfig {
    PeerConfig {
        public_key: node_public_key(&peer.node_key),
        disco_key: peer.disco_key.map(|k| DiscoPublicKey(k.0)),
        name: host_label(&peer.name, domain),
        allowed_ips: peer.allowed_ips.clone(),
        endpoints: peer.endpoints.clone(),
        // Control sends no keepalive: disco heartbeats keep active paths
        // open, and idle peers are meant to go quiet (lazy peers).
        persistent_keepalive_secs: None,
        preshared_key: None,
    }
}

/// The engine's inbound filter for a netmap's rules: each rule accepts, and
/// whatever no rule accepts is dropped (replies to our own flows pass
/// through the engine's connection tracking, not through a rule).
pub fn packet_filter(rules: &[wgmesh_control::FilterRule]) -> PacketFilter {
    PacketFilter {
        rules: rules
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

/// The MagicDNS names of a netmap.
pub fn dns_names(netmap: &Netmap) -> DnsNames {
    let domain = netmap.dns.domain.trim_end_matches('.').to_owned();
    DnsNames {
        hostname: host_label(&netmap.self_node.name, &domain),
        domain,
    }
}

/// The full reconfig for a netmap.
pub fn reconfig_from_netmap(netmap: &Netmap, local: &LocalSettings) -> Reconfig {
    let domain = netmap.dns.domain.trim_end_matches('.');
    Reconfig {
        wireguard: Some(WgConfig {
            listen_port: local.listen_port,
            peers: netmap
                .peers
                .iter()
                .map(|p| peer_config(p, domain))
                .collect(),
        }),
        router: Some(RouterConfig {
            local_addrs: netmap.self_node.addresses.clone(),
            routes: routes_for_own_families(netmap),
            advertised_routes: netmap.self_node.advertised_routes.clone(),
            mtu: local.mtu,
        }),
        dns: Some(DnsConfig {
            nameservers: netmap
                .dns
                .nameservers
                .iter()
                .filter(|ip| local.magicdns || !is_magicdns_address(**ip))
                .copied()
                .collect(),
            search_domains: netmap.dns.search_domains.clone(),
        }),
        knobs: local.knobs.clone(),
        primary_routes: netmap.self_node.primary_routes.clone(),
    }
}

/// The netmap's routes of the address families this node has an address
/// of: the engine refuses a route it could not source traffic for, and the
/// netmap always names both tailnet ranges.
fn routes_for_own_families(netmap: &Netmap) -> Vec<IpNet> {
    let own = &netmap.self_node.addresses;
    let has_v4 = own.iter().any(|a| matches!(a, IpNet::V4(_)));
    let has_v6 = own.iter().any(|a| matches!(a, IpNet::V6(_)));
    netmap
        .routes()
        .into_iter()
        .filter(|r| match r {
            IpNet::V4(_) => has_v4,
            IpNet::V6(_) => has_v6,
        })
        .collect()
}

/// Whether `ip` is one of the MagicDNS resolver's addresses.
fn is_magicdns_address(ip: std::net::IpAddr) -> bool {
    ip == std::net::IpAddr::V4(crate::magicdns::QUAD100_V4)
        || ip == std::net::IpAddr::V6(crate::magicdns::QUAD100_V6)
}

/// What one applied delta asks of the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaPlan {
    /// How the engine's peers change.
    pub peers: PeerPlan,
    /// The new inbound filter, when the delta changed it.
    pub filter: Option<PacketFilter>,
    /// Whether MagicDNS must rebuild its names (a peer came, went, or
    /// changed its name or addresses; or this node's own record changed).
    pub dns_changed: bool,
}

/// How the engine's peers change for one delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerPlan {
    /// Nothing to give the engine.
    Unchanged,
    /// Upsert and remove exactly these peers (`Engine::apply_peer_delta`).
    Delta(PeerDelta),
    /// The routes or the node's own record changed: apply this full
    /// reconfig (built from the netmap after the delta).
    Full(Box<Reconfig>),
}

/// Whether `nets` holds a subnet (a prefix wider than one address), i.e.
/// something the OS must route to the tunnel beyond the tailnet ranges.
fn has_subnet(nets: &[IpNet]) -> bool {
    nets.iter().any(|n| n.prefix_len() != n.max_prefix_len())
}

/// Applies `delta` to `netmap` and says what the node must do. On error the
/// netmap is unchanged (the stream is then out of step: reconnect for a
/// full netmap).
pub fn apply_delta(
    netmap: &mut Netmap,
    delta: &NetmapDelta,
    local: &LocalSettings,
) -> Result<DeltaPlan, wgmesh_control::netmap::ApplyError> {
    // Subnet routes of the peers the delta removes or changes, before it:
    // a subnet that goes away must leave the OS's routes too.
    let routes_before = delta
        .peers_removed
        .iter()
        .chain(delta.peers_changed.iter().map(|c| &c.node_key))
        .filter_map(|key| netmap.peer(key))
        .any(|p| has_subnet(&p.allowed_ips));
    let applied: AppliedDelta = netmap.apply(delta)?;
    let routes_after = applied
        .upserted
        .iter()
        .filter_map(|key| netmap.peer(key))
        .any(|p| has_subnet(&p.allowed_ips));

    let dns_changed = applied.self_changed
        || !delta.peers_added.is_empty()
        || !delta.peers_removed.is_empty()
        || delta
            .peers_changed
            .iter()
            .any(|c| c.name.is_some() || c.allowed_ips.is_some());
    let filter = applied
        .filter_changed
        .then(|| packet_filter(&netmap.packet_filter));

    let peers = if applied.self_changed || routes_before || routes_after {
        PeerPlan::Full(Box::new(reconfig_from_netmap(netmap, local)))
    } else if applied.upserted.is_empty() && applied.removed.is_empty() {
        PeerPlan::Unchanged
    } else {
        let domain = netmap.dns.domain.trim_end_matches('.').to_owned();
        PeerPlan::Delta(PeerDelta {
            upsert: applied
                .upserted
                .iter()
                .filter_map(|key| netmap.peer(key))
                .map(|p| peer_config(p, &domain))
                .collect(),
            remove: applied.removed.iter().map(node_public_key).collect(),
        })
    };
    Ok(DeltaPlan {
        peers,
        filter,
        dns_changed,
    })
}

/// The engine's NAT settings for a netmap: control's STUN servers and
/// every peer's relayed address as a candidate path to it.
pub fn nat_config(netmap: &Netmap) -> NatConfig {
    NatConfig {
        stun_servers: netmap.nat.stun_servers.clone(),
        peer_relays: netmap
            .peers
            .iter()
            .filter_map(|p| {
                p.relay.map(|addr| PeerRelay {
                    peer: node_public_key(&p.node_key),
                    addr,
                })
            })
            .collect(),
    }
}

/// Whether a delta can change [`nat_config`]: new NAT settings, a peer's
/// relayed address, or a peer that comes or goes with one.
pub fn delta_touches_nat(delta: &NetmapDelta) -> bool {
    delta.nat.is_some()
        || !delta.peers_removed.is_empty()
        || delta.peers_added.iter().any(|p| p.relay.is_some())
        || delta.peers_changed.iter().any(|c| c.relay.is_some())
}

/// The relay settings for control's credentials; `None` when control
/// issues no relay, or when the credentials have already expired at `now`
/// (a cached netmap's), since the TURN server would only reject them.
pub fn relay_settings(nat: &NatMap, now: SystemTime) -> Option<RelaySettings> {
    let relay = nat.relay.as_ref()?;
    let expires = UNIX_EPOCH + Duration::from_millis(relay.expires.unix_millis());
    if expires <= now {
        return None;
    }
    Some(RelaySettings {
        server: relay.server,
        credentials: RelayCredentialSource::Issued {
            username: relay.username.clone(),
            password: zeroize::Zeroizing::new(relay.password.clone()),
            expires,
        },
    })
}

/// Applies a peer delta to a reconfig whose peers are sorted by key (as
/// [`reconfig_from_netmap`] builds them), keeping them sorted: the daemon's
/// record of the desired state follows the engine. A binary search per
/// named peer.
pub fn apply_peer_delta_to_reconfig(reconfig: &mut Reconfig, delta: &PeerDelta) {
    let peers = &mut reconfig
        .wireguard
        .get_or_insert_with(WgConfig::default)
        .peers;
    for key in &delta.remove {
        if let Ok(at) = peers.binary_search_by(|p| p.public_key.cmp(key)) {
            peers.remove(at);
        }
    }
    for peer in &delta.upsert {
        match peers.binary_search_by(|p| p.public_key.cmp(&peer.public_key)) {
            Ok(at) => peers[at] = peer.clone(),
            Err(at) => peers.insert(at, peer.clone()),
        }
    }
}

#[cfg(test)]
mod tests;
