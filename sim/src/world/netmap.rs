//! The control plane's netmap: the desired state control sends one node,
//! built the same way on both backends from what control knows about every
//! node.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use wgmesh_core::{
    DiscoPublicKey, DnsConfig, Knobs, NodePublicKey, PeerConfig, Reconfig, RouterConfig, WgConfig,
};

use super::address::{WG_PORT, tailnet_ip4, tailnet_ip6};

/// What control knows about one node.
#[derive(Debug, Clone)]
pub(crate) struct NetmapNode {
    /// Its name.
    pub name: String,
    /// Its WireGuard public key.
    pub public_key: NodePublicKey,
    /// Its current disco key.
    pub disco_key: DiscoPublicKey,
    /// Its AllowedIPs: its two tailnet addresses plus what it routes.
    pub allowed_ips: Vec<IpNet>,
    /// The subnets it routes (peers route them to it; it advertises them).
    pub subnets: Vec<IpNet>,
    /// The endpoint it last reported.
    pub endpoint: SocketAddr,
    /// The persistent keepalive its peers configure for it.
    pub persistent_keepalive_secs: Option<u16>,
}

/// The netmap for node `me` of `nodes`: every other node as a peer (in
/// index order), then [`netmap_reconfig`].
pub(crate) fn netmap_for(me: usize, nodes: &[NetmapNode], knobs: Knobs) -> Reconfig {
    let others = || nodes.iter().enumerate().filter(move |(j, _)| *j != me);
    let peers = others()
        .map(|(_, n)| PeerConfig {
            public_key: n.public_key,
            disco_key: Some(n.disco_key),
            name: n.name.clone(),
            allowed_ips: n.allowed_ips.clone(),
            endpoints: vec![n.endpoint],
            persistent_keepalive_secs: n.persistent_keepalive_secs,
            preshared_key: None,
        })
        .collect();
    let other_subnets = others().flat_map(|(_, n)| n.subnets.iter().copied());
    netmap_reconfig(
        (tailnet_ip4(me), tailnet_ip6(me)),
        peers,
        other_subnets,
        nodes[me].subnets.clone(),
        knobs,
    )
}

/// The desired state control sends one node: its tailnet
/// addresses, its peers, routes for the whole tailnet plus every other
/// node's subnets, its own subnets advertised (and primary), the simulated
/// DNS, and its knobs.
fn netmap_reconfig(
    (ip4, ip6): (Ipv4Addr, Ipv6Addr),
    peers: Vec<PeerConfig>,
    other_subnets: impl IntoIterator<Item = IpNet>,
    own_subnets: Vec<IpNet>,
    knobs: Knobs,
) -> Reconfig {
    let mut routes: Vec<IpNet> = vec![
        "100.64.0.0/10".parse().expect("valid prefix"),
        "fd7a:115c:a1e0::/48".parse().expect("valid prefix"),
    ];
    routes.extend(other_subnets);
    Reconfig {
        wireguard: Some(WgConfig {
            listen_port: WG_PORT,
            peers,
        }),
        router: Some(RouterConfig {
            local_addrs: vec![IpNet::from(IpAddr::V4(ip4)), IpNet::from(IpAddr::V6(ip6))],
            routes,
            advertised_routes: own_subnets.clone(),
            mtu: 1280,
        }),
        dns: Some(DnsConfig {
            nameservers: vec![IpAddr::V4(Ipv4Addr::new(100, 100, 100, 100))],
            search_domains: vec!["tailnet.example".into()],
        }),
        knobs,
        primary_routes: own_subnets,
    }
}
