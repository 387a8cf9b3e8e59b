//! The daemon's side of NAT traversal: this host's local endpoints (every
//! address of every interface that is up, with the bound port), handed to
//! the engine, which adds the STUN-reflexive one and reports the set.

use std::net::{IpAddr, SocketAddr};

use nix::ifaddrs::getifaddrs;
use nix::net::if_::InterfaceFlags;
use tracing::{debug, warn};
use wgmesh_core::MAX_LOCAL_ENDPOINTS;

use crate::driver::{DriverHandle, RequestError};

/// Whether a local address could be reached by a peer: not loopback,
/// unspecified, multicast or IPv6 link-local (which would need a scope).
fn peer_reachable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => !(ip.is_loopback() || ip.is_unspecified() || ip.is_multicast()),
        IpAddr::V6(ip) => {
            !(ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || ip.is_unicast_link_local())
        }
    }
}

/// Every address of the interfaces that are up, except `tunnel` (our own
/// TUN: its addresses are tailnet addresses, not underlay ones), with
/// `port`; IPv6 ones only when `ipv6` (a dual-stack socket). At most
/// [`MAX_LOCAL_ENDPOINTS`], in the order the kernel lists them.
pub fn local_endpoints(port: u16, tunnel: &str, ipv6: bool) -> std::io::Result<Vec<SocketAddr>> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for ifaddr in getifaddrs()? {
        if ifaddr.interface_name == tunnel || !ifaddr.flags.contains(InterfaceFlags::IFF_UP) {
            continue;
        }
        let Some(address) = ifaddr.address else {
            continue;
        };
        let ip = if let Some(v4) = address.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = address.as_sockaddr_in6().filter(|_| ipv6) {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        let endpoint = SocketAddr::new(ip, port);
        if peer_reachable(ip) && !out.contains(&endpoint) && out.len() < MAX_LOCAL_ENDPOINTS {
            out.push(endpoint);
        }
    }
    Ok(out)
}

/// Reads the bound port from the engine's status, lists the local
/// endpoints and hands them to the engine. Called at start and after every
/// link change (before the engine hears of it, so its re-discovery offers
/// the new set).
pub async fn report_local_endpoints(
    driver: &DriverHandle,
    tunnel: &str,
) -> Result<(), RequestError> {
    let status = driver.status().await?;
    if status.listen_port == 0 {
        debug!("no bound port yet; local endpoints not reported");
        return Ok(());
    }
    match local_endpoints(status.listen_port, tunnel, true) {
        Ok(endpoints) => {
            debug!(?endpoints, "local endpoints");
            driver.set_local_endpoints(endpoints).await
        }
        Err(error) => {
            warn!(%error, "cannot list the local addresses; local endpoints unchanged");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_a_peer_can_reach_are_endpoints() {
        assert!(peer_reachable("192.168.1.2".parse().unwrap()));
        assert!(peer_reachable("2001:db8::1".parse().unwrap()));
        assert!(!peer_reachable("127.0.0.1".parse().unwrap()));
        assert!(!peer_reachable("fe80::1".parse().unwrap()));
        assert!(!peer_reachable("::".parse().unwrap()));
    }

    #[test]
    fn loopback_and_the_tunnel_are_left_out() {
        let endpoints = local_endpoints(41641, "lo", true).unwrap();
        assert!(endpoints.len() <= MAX_LOCAL_ENDPOINTS);
        assert!(
            endpoints
                .iter()
                .all(|e| e.port() == 41641 && !e.ip().is_loopback())
        );
    }
}
