//! What the driver tests share: node identities and the reconfig that makes
//! two nodes peers of each other.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnet::IpNet;
use wgmesh_core::{
    DiscoPrivateKey, DnsConfig, NodePrivateKey, PeerConfig, Reconfig, RouterConfig, WgConfig,
};

/// A node's keys (derived from a seed, so runs repeat), tunnel address and
/// UDP address.
pub struct Identity {
    pub key: NodePrivateKey,
    pub disco: DiscoPrivateKey,
    pub ip: Ipv4Addr,
    pub addr: SocketAddr,
}

impl Identity {
    pub fn new(seed: u8, ip: Ipv4Addr, addr: SocketAddr) -> Self {
        Self {
            key: NodePrivateKey::from_bytes([seed; 32]),
            disco: DiscoPrivateKey::from_bytes([seed + 100; 32]),
            ip,
            addr,
        }
    }
}

/// `me`'s whole configuration with `other` as its only peer (a /32 each,
/// MTU 1280, no routes, default DNS).
pub fn reconfig_for(me: &Identity, other: &Identity) -> Reconfig {
    let mut peer = PeerConfig::new(
        other.key.public_key(),
        vec![IpNet::new(IpAddr::V4(other.ip), 32).unwrap()],
    );
    peer.disco_key = Some(other.disco.public_key());
    peer.endpoints = vec![other.addr];
    Reconfig {
        wireguard: Some(WgConfig {
            listen_port: me.addr.port(),
            peers: vec![peer],
        }),
        router: Some(RouterConfig {
            local_addrs: vec![IpNet::new(IpAddr::V4(me.ip), 32).unwrap()],
            routes: vec![],
            advertised_routes: vec![],
            mtu: 1280,
        }),
        dns: Some(DnsConfig::default()),
        ..Reconfig::default()
    }
}
