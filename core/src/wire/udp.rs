//! A minimal UDP view and emitter.

use std::net::SocketAddr;

use super::ip::{self, EmitError, IpHeader, PROTO_UDP, be16, emit_header, patch_checksum};

/// Length of the UDP header.
pub const UDP_HEADER_LEN: usize = 8;

/// A zero-copy view of a UDP datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpDatagram<'a> {
    /// The source port.
    pub src_port: u16,
    /// The destination port.
    pub dst_port: u16,
    /// The data after the header, bounded by the UDP length field.
    pub payload: &'a [u8],
}

/// The UDP bytes of `packet` bounded by the UDP length field.
fn datagram_bytes<'a>(header: &IpHeader, packet: &'a [u8]) -> Option<&'a [u8]> {
    if header.protocol != PROTO_UDP || ip::is_later_fragment(packet) {
        return None;
    }
    let segment = header.payload(packet)?;
    let len = usize::from(be16(segment, 4)?);
    if len < UDP_HEADER_LEN {
        return None;
    }
    segment.get(..len)
}

/// Parses the UDP datagram carried by `packet`, whose IP header was parsed
/// into `header`. `None` if it is not UDP, or the UDP length field is below 8
/// or beyond the IP payload. The checksum is not checked.
pub fn parse<'a>(header: &IpHeader, packet: &'a [u8]) -> Option<UdpDatagram<'a>> {
    let datagram = datagram_bytes(header, packet)?;
    Some(UdpDatagram {
        src_port: be16(datagram, 0)?,
        dst_port: be16(datagram, 2)?,
        payload: datagram.get(UDP_HEADER_LEN..)?,
    })
}

/// Whether the UDP checksum of the datagram carried by `packet` is correct.
/// A zero checksum ("none") counts as correct for IPv4 only.
pub fn verify_checksum(header: &IpHeader, packet: &[u8]) -> bool {
    let Some(datagram) = datagram_bytes(header, packet) else {
        return false;
    };
    if header.is_ipv4() && be16(datagram, 6) == Some(0) {
        return true;
    }
    ip::pseudo_header_checksum(header.src, header.dst, PROTO_UDP, datagram) == 0
}

/// Clears `out` and writes a whole IP packet carrying one UDP datagram with a
/// correct checksum.
pub fn emit_datagram(
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), EmitError> {
    let udp_len = u16::try_from(UDP_HEADER_LEN + payload.len()).map_err(|_| EmitError::TooLarge)?;
    let header_len = emit_header(src.ip(), dst.ip(), PROTO_UDP, usize::from(udp_len), out)?;
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out.extend_from_slice(&udp_len.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(payload);
    if let Some(datagram) = out.get_mut(header_len..) {
        patch_checksum(datagram, 6, Some((src.ip(), dst.ip(), PROTO_UDP)), true);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    #[test]
    fn known_datagram() {
        let src: SocketAddr = "10.0.0.1:1234".parse().unwrap();
        let dst: SocketAddr = "10.0.0.2:53".parse().unwrap();
        let mut out = Vec::new();
        emit_datagram(src, dst, &[0xab, 0xcd], &mut out).unwrap();
        // Checksum by hand: pseudo-header 0x0a00+0x0001+0x0a00+0x0002+17+10
        // = 0x141e; header 0x04d2+0x0035+0x000a = 0x0511; data 0xabcd;
        // total 0xc4fc, complemented 0x3b03.
        assert_eq!(
            &out[20..],
            &[0x04, 0xd2, 0x00, 0x35, 0x00, 0x0a, 0x3b, 0x03, 0xab, 0xcd]
        );
        let h = IpHeader::parse(&out).unwrap();
        assert!(verify_checksum(&h, &out));
        assert_eq!(
            parse(&h, &out),
            Some(UdpDatagram {
                src_port: 1234,
                dst_port: 53,
                payload: &[0xab, 0xcd]
            })
        );
    }

    #[test]
    fn length_field_is_enforced() {
        let src: SocketAddr = "[::1]:7".parse().unwrap();
        let mut out = Vec::new();
        emit_datagram(src, src, b"hello", &mut out).unwrap();
        let h = IpHeader::parse(&out).unwrap();
        let mut bad = out.clone();
        bad[45] = 7; // UDP length below the header.
        assert_eq!(parse(&h, &bad), None);
        bad[45] = 14; // Beyond the IP payload.
        assert_eq!(parse(&h, &bad), None);
        bad[45] = 10; // Shorter than the IP payload: bounded.
        assert_eq!(parse(&h, &bad).unwrap().payload, b"he");
        let mixed: SocketAddr = "1.2.3.4:5".parse().unwrap();
        assert_eq!(
            emit_datagram(src, mixed, &[], &mut out),
            Err(EmitError::MixedFamilies)
        );
    }

    proptest! {
        #[test]
        fn emit_then_parse(
            v6 in any::<bool>(),
            a in any::<u128>(),
            b in any::<u128>(),
            p in any::<u16>(),
            q in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let (sa, da) = if v6 {
                (IpAddr::V6(Ipv6Addr::from(a)), IpAddr::V6(Ipv6Addr::from(b)))
            } else {
                (IpAddr::V4(Ipv4Addr::from(a as u32)), IpAddr::V4(Ipv4Addr::from(b as u32)))
            };
            let (src, dst) = (SocketAddr::new(sa, p), SocketAddr::new(da, q));
            let mut out = Vec::new();
            emit_datagram(src, dst, &payload, &mut out).unwrap();
            let h = IpHeader::parse(&out).unwrap();
            prop_assert!(verify_checksum(&h, &out));
            prop_assert_eq!(
                parse(&h, &out),
                Some(UdpDatagram { src_port: p, dst_port: q, payload: &payload })
            );
        }

        #[test]
        fn parse_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..100),
            header_len in 0usize..120,
            total_len in 0usize..120,
        ) {
            let addr = IpAddr::V6(Ipv6Addr::LOCALHOST);
            let header = IpHeader { src: addr, dst: addr, protocol: PROTO_UDP, header_len, total_len, ttl: 1 };
            let _ = parse(&header, &bytes);
            let _ = verify_checksum(&header, &bytes);
            if let Ok(real) = IpHeader::parse(&bytes) {
                let _ = parse(&real, &bytes);
                let _ = verify_checksum(&real, &bytes);
            }
        }
    }
}
