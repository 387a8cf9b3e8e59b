//! What the TUN's GSO split ([`super::tun_gso`]) and GRO
//! ([`super::tun_gro`]) both read and write: the legacy virtio header's
//! values, the IP protocol numbers and TCP flags they look at, the
//! pseudo-header sum of a transport checksum, and big-endian fields.

use tun_rs::checksum_no_fold;

/// The virtio header's flag: the transport checksum is to be completed
/// from `csum_start` (the field holds the pseudo-header sum).
pub(crate) const F_NEEDS_CSUM: u8 = 1;
/// The virtio header's `gso_type` values (`linux/virtio_net.h`).
pub(crate) const GSO_NONE: u8 = 0;
pub(crate) const GSO_TCPV4: u8 = 1;
pub(crate) const GSO_TCPV6: u8 = 4;
pub(crate) const GSO_UDP_L4: u8 = 5;
/// Set with a TCP type when the sender uses ECN (CWR on the first segment).
pub(crate) const GSO_ECN: u8 = 0x80;

pub(crate) const PROTO_TCP: u8 = 6;
pub(crate) const PROTO_UDP: u8 = 17;

pub(crate) const TCP_FIN: u8 = 0x01;
pub(crate) const TCP_RST: u8 = 0x04;
pub(crate) const TCP_PSH: u8 = 0x08;
pub(crate) const TCP_ACK: u8 = 0x10;
pub(crate) const TCP_CWR: u8 = 0x80;

/// The one's-complement sum (not folded) of the pseudo header for a
/// transport segment of `transport_len` bytes in the IPv4 or IPv6 `packet`.
pub(crate) fn pseudo_header_sum(
    packet: &[u8],
    v6: bool,
    protocol: u8,
    transport_len: usize,
) -> u64 {
    let addresses = if v6 { &packet[8..40] } else { &packet[12..20] };
    checksum_no_fold(addresses, 0) + u64::from(protocol) + transport_len as u64
}

/// Folds a one's-complement sum into 16 bits.
pub(crate) fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

pub(crate) fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

pub(crate) fn be32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// An IPv4 TCP packet of `len` bytes (at least the 40 of its headers) from
/// 10.0.0.1 port `sport` to 10.0.0.2 port 5201, for tests.
#[cfg(test)]
pub(crate) fn test_tcp_v4(sport: u16, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len.max(40)];
    p[0] = 0x45;
    let total = p.len() as u16;
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p[8] = 64;
    p[9] = PROTO_TCP;
    p[12..16].copy_from_slice(&[10, 0, 0, 1]);
    p[16..20].copy_from_slice(&[10, 0, 0, 2]);
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&5201u16.to_be_bytes());
    p[32] = 0x50;
    p
}
