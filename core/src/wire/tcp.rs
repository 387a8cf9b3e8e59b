//! A minimal TCP view: enough to classify a segment (ports and flags) for
//! filtering and reject messages, plus an emitter for test and simulator
//! traffic.

use std::net::SocketAddr;

use super::ip::{self, EmitError, IpHeader, PROTO_TCP, be16, be32, emit_header, patch_checksum};

/// The FIN flag bit.
pub const FLAG_FIN: u8 = 0x01;
/// The SYN flag bit.
pub const FLAG_SYN: u8 = 0x02;
/// The RST flag bit.
pub const FLAG_RST: u8 = 0x04;
/// The PSH flag bit.
pub const FLAG_PSH: u8 = 0x08;
/// The ACK flag bit.
pub const FLAG_ACK: u8 = 0x10;
/// The URG flag bit.
pub const FLAG_URG: u8 = 0x20;

/// Length of a TCP header without options.
pub const TCP_HEADER_LEN: usize = 20;
/// The receive window the emitter advertises.
pub const EMIT_WINDOW: u16 = 65535;

/// The ports and flags of a TCP segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSummary {
    /// The source port.
    pub src_port: u16,
    /// The destination port.
    pub dst_port: u16,
    /// The flags byte (byte 13 of the TCP header).
    pub flags: u8,
}

impl TcpSummary {
    /// Whether SYN is set without ACK: the opening of a new connection.
    pub fn is_syn_only(&self) -> bool {
        self.flags & (FLAG_SYN | FLAG_ACK) == FLAG_SYN
    }

    /// Whether both SYN and ACK are set: the answer to an opening.
    pub fn is_syn_ack(&self) -> bool {
        self.flags & (FLAG_SYN | FLAG_ACK) == FLAG_SYN | FLAG_ACK
    }

    /// Whether RST is set.
    pub fn is_rst(&self) -> bool {
        self.flags & FLAG_RST != 0
    }
}

/// A fuller zero-copy view of a TCP segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSegment<'a> {
    /// Ports and flags.
    pub summary: TcpSummary,
    /// The sequence number.
    pub seq: u32,
    /// The acknowledgement number.
    pub ack: u32,
    /// The advertised window.
    pub window: u16,
    /// The data after the header and its options.
    pub payload: &'a [u8],
}

/// The TCP bytes of `packet` with a validated header length, if `header`
/// says it carries TCP and this is not a later IPv4 fragment.
fn segment_bytes<'a>(header: &IpHeader, packet: &'a [u8]) -> Option<(&'a [u8], usize)> {
    if header.protocol != PROTO_TCP || ip::is_later_fragment(packet) {
        return None;
    }
    let segment = header.payload(packet)?;
    let data_offset = usize::from(segment.get(12)? >> 4) * 4;
    if data_offset < TCP_HEADER_LEN || data_offset > segment.len() {
        return None;
    }
    Some((segment, data_offset))
}

/// Summarises the TCP segment carried by `packet`, whose IP header was parsed
/// into `header`. `None` if it is not TCP or the TCP header is malformed.
/// The checksum is not checked.
pub fn parse(header: &IpHeader, packet: &[u8]) -> Option<TcpSummary> {
    let (segment, _) = segment_bytes(header, packet)?;
    Some(TcpSummary {
        src_port: be16(segment, 0)?,
        dst_port: be16(segment, 2)?,
        flags: *segment.get(13)?,
    })
}

/// Like [`parse`] but also exposes sequence numbers, window and payload.
pub fn parse_segment<'a>(header: &IpHeader, packet: &'a [u8]) -> Option<TcpSegment<'a>> {
    let (segment, data_offset) = segment_bytes(header, packet)?;
    Some(TcpSegment {
        summary: TcpSummary {
            src_port: be16(segment, 0)?,
            dst_port: be16(segment, 2)?,
            flags: *segment.get(13)?,
        },
        seq: be32(segment, 4)?,
        ack: be32(segment, 8)?,
        window: be16(segment, 14)?,
        payload: segment.get(data_offset..)?,
    })
}

/// Whether the TCP checksum (pseudo-header included) of the segment carried
/// by `packet` is correct.
pub fn verify_checksum(header: &IpHeader, packet: &[u8]) -> bool {
    match segment_bytes(header, packet) {
        Some((segment, _)) => {
            ip::pseudo_header_checksum(header.src, header.dst, PROTO_TCP, segment) == 0
        }
        None => false,
    }
}

/// Clears `out` and writes a whole IP packet carrying one TCP segment
/// without options, window 65535 and a correct checksum.
pub fn emit_segment(
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), EmitError> {
    let header_len = emit_header(
        src.ip(),
        dst.ip(),
        PROTO_TCP,
        TCP_HEADER_LEN + payload.len(),
        out,
    )?;
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&ack.to_be_bytes());
    out.extend_from_slice(&[(TCP_HEADER_LEN as u8 / 4) << 4, flags]);
    out.extend_from_slice(&EMIT_WINDOW.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(payload);
    if let Some(segment) = out.get_mut(header_len..) {
        patch_checksum(segment, 16, Some((src.ip(), dst.ip(), PROTO_TCP)), false);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    #[test]
    fn known_syn() {
        let src: SocketAddr = "10.0.0.1:1234".parse().unwrap();
        let dst: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let mut out = Vec::new();
        emit_segment(src, dst, 1, 0, FLAG_SYN, &[], &mut out).unwrap();
        assert_eq!(out.len(), 40);
        // Checksum by hand: pseudo-header 0x0a00+0x0001+0x0a00+0x0002+6+20
        // = 0x141d; header 0x04d2+0x0050+0x0001+0x5002+0xffff = 0x15524,
        // total 0x16941 -> 0x6942, complemented 0x96bd.
        assert_eq!(
            &out[20..],
            &[
                0x04, 0xd2, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0x96, 0xbd,
                0, 0
            ]
        );
        let h = IpHeader::parse(&out).unwrap();
        assert!(verify_checksum(&h, &out));
        let s = parse(&h, &out).unwrap();
        assert_eq!(
            s,
            TcpSummary {
                src_port: 1234,
                dst_port: 80,
                flags: FLAG_SYN
            }
        );
        assert!(s.is_syn_only() && !s.is_syn_ack() && !s.is_rst());
    }

    #[test]
    fn flag_helpers() {
        let s = |flags| TcpSummary {
            src_port: 0,
            dst_port: 0,
            flags,
        };
        assert!(s(FLAG_SYN | FLAG_ACK).is_syn_ack());
        assert!(!s(FLAG_SYN | FLAG_ACK).is_syn_only());
        assert!(s(FLAG_RST | FLAG_ACK).is_rst());
        // ECN bits do not hide a SYN.
        assert!(s(FLAG_SYN | 0xc0).is_syn_only());
    }

    #[test]
    fn rejects_bad_offsets_and_other_protocols() {
        let src: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let mut out = Vec::new();
        emit_segment(src, src, 0, 0, FLAG_ACK, b"data", &mut out).unwrap();
        let h = IpHeader::parse(&out).unwrap();
        let mut bad = out.clone();
        bad[32] = 0x40; // Data offset 4 words.
        assert_eq!(parse(&h, &bad), None);
        bad[32] = 0xf0; // Data offset past the segment.
        assert_eq!(parse(&h, &bad), None);
        let udp_header = IpHeader {
            protocol: ip::PROTO_UDP,
            ..h
        };
        assert_eq!(parse(&udp_header, &out), None);
        assert_eq!(parse_segment(&h, &out).unwrap().payload, b"data");
    }

    fn socket_pair() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
        prop_oneof![
            (any::<u32>(), any::<u16>(), any::<u32>(), any::<u16>()).prop_map(|(a, p, b, q)| (
                SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), p),
                SocketAddr::new(IpAddr::V4(Ipv4Addr::from(b)), q)
            )),
            (any::<u128>(), any::<u16>(), any::<u128>(), any::<u16>()).prop_map(|(a, p, b, q)| (
                SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), p),
                SocketAddr::new(IpAddr::V6(Ipv6Addr::from(b)), q)
            )),
        ]
    }

    proptest! {
        #[test]
        fn emit_then_parse(
            (src, dst) in socket_pair(),
            seq in any::<u32>(),
            ack in any::<u32>(),
            flags in any::<u8>(),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut out = Vec::new();
            emit_segment(src, dst, seq, ack, flags, &payload, &mut out).unwrap();
            let h = IpHeader::parse(&out).unwrap();
            prop_assert!(verify_checksum(&h, &out));
            let s = parse_segment(&h, &out).unwrap();
            prop_assert_eq!(s.summary, TcpSummary { src_port: src.port(), dst_port: dst.port(), flags });
            prop_assert_eq!(parse(&h, &out), Some(s.summary));
            prop_assert_eq!((s.seq, s.ack, s.window), (seq, ack, EMIT_WINDOW));
            prop_assert_eq!(s.payload, &payload[..]);
        }

        #[test]
        fn parse_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..100),
            header_len in 0usize..120,
            total_len in 0usize..120,
        ) {
            let addr = IpAddr::V4(Ipv4Addr::LOCALHOST);
            let header = IpHeader { src: addr, dst: addr, protocol: PROTO_TCP, header_len, total_len, ttl: 1 };
            let _ = parse(&header, &bytes);
            let _ = parse_segment(&header, &bytes);
            let _ = verify_checksum(&header, &bytes);
            if let Ok(real) = IpHeader::parse(&bytes) {
                let _ = parse(&real, &bytes);
                let _ = parse_segment(&real, &bytes);
            }
        }
    }
}
