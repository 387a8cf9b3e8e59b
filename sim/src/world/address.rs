//! The address plan both backends follow: where node *i* lives on the
//! tailnet and on the virtual network, and the ports the harness uses.
//!
//! Node *i* (0-based here, 1-based in the README) has `100.64.x.y/32` and
//! `fd7a:115c:a1e0::(i+1)/128` on the tailnet and the UDP endpoint
//! `10.g.x.y:41641`, where `x.y` is `i + 1` spread over two octets and `g`
//! counts the node's major link changes (event backend; the turmoil backend
//! moves the port instead).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The UDP port every node's WireGuard socket listens on.
pub const WG_PORT: u16 = 41641;
/// The UDP port the harness's datagram streams are sent to.
pub const SINK_PORT: u16 = 9;
/// The UDP source port of the harness's datagram streams.
pub(crate) const STREAM_SOURCE_PORT: u16 = 40000;
/// The TCP port the harness's request/response flows connect to.
pub const FLOW_PORT: u16 = 80;
/// Flow number `k` uses source port `FLOW_SOURCE_PORT_BASE + k % FLOW_SOURCE_PORTS`.
pub(crate) const FLOW_SOURCE_PORT_BASE: u16 = 20000;
/// How many source ports flows cycle through.
pub(crate) const FLOW_SOURCE_PORTS: usize = 40000;

/// The host part of node `index` (0-based; `index + 1` spread over two octets).
pub(crate) fn host_octets(index: usize) -> (u8, u8) {
    let n = index + 1;
    ((n >> 8) as u8, (n & 0xff) as u8)
}

/// Node `index`'s tailnet IPv4 address, `100.64.x.y`.
pub(crate) fn tailnet_ip4(index: usize) -> Ipv4Addr {
    let (hi, lo) = host_octets(index);
    Ipv4Addr::new(100, 64, hi, lo)
}

/// Node `index`'s tailnet IPv6 address, `fd7a:115c:a1e0::(index + 1)`.
pub(crate) fn tailnet_ip6(index: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, (index + 1) as u16)
}

/// Node `index`'s tailnet address of the same family as `dst`: the source
/// address of its traffic to `dst`.
pub(crate) fn tailnet_source(index: usize, dst: IpAddr) -> IpAddr {
    match dst {
        IpAddr::V4(_) => IpAddr::V4(tailnet_ip4(index)),
        IpAddr::V6(_) => IpAddr::V6(tailnet_ip6(index)),
    }
}

/// Node `index`'s UDP endpoint after `generation` major link changes,
/// `10.generation.x.y:41641` (event backend).
pub(crate) fn endpoint(index: usize, generation: u8) -> SocketAddr {
    let (hi, lo) = host_octets(index);
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, generation, hi, lo)), WG_PORT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_300_spreads_over_two_octets() {
        assert_eq!(tailnet_ip4(299), Ipv4Addr::new(100, 64, 1, 44));
        assert_eq!(
            tailnet_ip6(299),
            "fd7a:115c:a1e0::12c".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(endpoint(299, 2), "10.2.1.44:41641".parse().unwrap());
    }
}
