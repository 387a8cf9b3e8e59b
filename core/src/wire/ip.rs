//! IPv4 and IPv6 headers: parsing, address peeking, emission and the
//! internet checksum.
//!
//! Parsing is zero-copy: [`IpHeader::parse`] reads the fixed header (and, for
//! IPv6, walks a bounded number of extension headers) and reports where the
//! upper-layer payload starts and ends. The emitters write whole packets into
//! a caller-owned `Vec<u8>` so the hot path can reuse one buffer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use thiserror::Error;

/// IP protocol number of ICMP (for IPv4).
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// IP protocol number of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;
/// IP protocol number of TSMP, Tailscale's in-tunnel control protocol.
pub const PROTO_TSMP: u8 = 99;
/// IPv6 next-header value of the hop-by-hop options extension header.
pub const PROTO_IPV6_HOP_BY_HOP: u8 = 0;
/// IPv6 next-header value of the routing extension header.
pub const PROTO_IPV6_ROUTING: u8 = 43;
/// IPv6 next-header value of the fragment extension header.
pub const PROTO_IPV6_FRAGMENT: u8 = 44;
/// IPv6 next-header value of the destination options extension header.
pub const PROTO_IPV6_DEST_OPTS: u8 = 60;

/// Length in bytes of an IPv4 header without options.
pub const IPV4_HEADER_LEN: usize = 20;
/// Length in bytes of the fixed IPv6 header.
pub const IPV6_HEADER_LEN: usize = 40;
/// The TTL (IPv4) or hop limit (IPv6) written by the emitters.
pub const DEFAULT_TTL: u8 = 64;

/// The most IPv6 extension headers [`IpHeader::parse`] walks before giving up.
const MAX_EXTENSION_HEADERS: usize = 8;

/// The parsed, validated summary of an IPv4 or IPv6 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpHeader {
    /// The source address.
    pub src: IpAddr,
    /// The destination address.
    pub dst: IpAddr,
    /// The upper-layer protocol. For IPv6 this is the protocol found after
    /// walking hop-by-hop, routing and destination-options headers; a fragment
    /// header stops the walk and is reported as [`PROTO_IPV6_FRAGMENT`].
    pub protocol: u8,
    /// Offset of the upper-layer payload: the IPv4 header length including
    /// options, or 40 plus the walked IPv6 extension headers.
    pub header_len: usize,
    /// The whole packet's length as stated by the header (IPv6: 40 plus the
    /// payload length). Bytes of the buffer past this are not part of it.
    pub total_len: usize,
    /// The IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
}

/// Why [`IpHeader::parse`] rejected a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum IpError {
    /// The buffer holds no bytes at all.
    #[error("empty packet")]
    Empty,
    /// The version nibble is neither 4 nor 6.
    #[error("unknown IP version {0}")]
    UnknownVersion(u8),
    /// The buffer ends before a header that must be present.
    #[error("truncated header: needed {needed} bytes, got {got}")]
    Truncated {
        /// How many bytes the header needs.
        needed: usize,
        /// How many bytes were available.
        got: usize,
    },
    /// The IPv4 IHL is below 5, or the IPv6 extension-header chain is too long.
    #[error("bad header length")]
    BadHeaderLength,
    /// The stated total length is shorter than the header or longer than the
    /// buffer.
    #[error("bad total length")]
    BadTotalLength,
}

impl IpError {
    /// A short snake_case name for this error, suitable as a metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            IpError::Empty => "empty",
            IpError::UnknownVersion(_) => "unknown_version",
            IpError::Truncated { .. } => "truncated_header",
            IpError::BadHeaderLength => "bad_header_length",
            IpError::BadTotalLength => "bad_total_length",
        }
    }
}

/// Why a packet could not be emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum EmitError {
    /// The source and destination addresses are of different IP families.
    #[error("source and destination are of different address families")]
    MixedFamilies,
    /// The packet would exceed what the IP length field can express.
    #[error("packet too large")]
    TooLarge,
}

impl IpHeader {
    /// Parses and validates the IP header at the start of `packet`.
    ///
    /// Trailing bytes beyond the stated total length are allowed and ignored.
    pub fn parse(packet: &[u8]) -> Result<IpHeader, IpError> {
        let first = *packet.first().ok_or(IpError::Empty)?;
        match first >> 4 {
            4 => parse_v4(packet),
            6 => parse_v6(packet),
            other => Err(IpError::UnknownVersion(other)),
        }
    }

    /// The upper-layer payload of `packet` (which must be the packet this
    /// header was parsed from), or `None` if the ranges do not fit.
    pub fn payload<'a>(&self, packet: &'a [u8]) -> Option<&'a [u8]> {
        packet.get(self.header_len..self.total_len)
    }

    /// Whether this is an IPv4 header.
    pub fn is_ipv4(&self) -> bool {
        self.src.is_ipv4()
    }
}

/// Reads a big-endian `u16` at `at`, if present.
pub(crate) fn be16(data: &[u8], at: usize) -> Option<u16> {
    let bytes = data.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([bytes[0], bytes[1]]))
}

/// Reads a big-endian `u32` at `at`, if present.
pub(crate) fn be32(data: &[u8], at: usize) -> Option<u32> {
    let bytes = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// Copies `N` bytes starting at `at`, if present.
pub(crate) fn array_at<const N: usize>(data: &[u8], at: usize) -> Option<[u8; N]> {
    data.get(at..at.checked_add(N)?)?.try_into().ok()
}

fn parse_v4(packet: &[u8]) -> Result<IpHeader, IpError> {
    let got = packet.len();
    if got < IPV4_HEADER_LEN {
        return Err(IpError::Truncated {
            needed: IPV4_HEADER_LEN,
            got,
        });
    }
    let header_len = usize::from(packet[0] & 0x0f) * 4;
    if header_len < IPV4_HEADER_LEN {
        return Err(IpError::BadHeaderLength);
    }
    if got < header_len {
        return Err(IpError::Truncated {
            needed: header_len,
            got,
        });
    }
    let total_len = usize::from(be16(packet, 2).ok_or(IpError::BadTotalLength)?);
    if total_len < header_len || total_len > got {
        return Err(IpError::BadTotalLength);
    }
    let src: [u8; 4] = array_at(packet, 12).ok_or(IpError::BadHeaderLength)?;
    let dst: [u8; 4] = array_at(packet, 16).ok_or(IpError::BadHeaderLength)?;
    Ok(IpHeader {
        src: IpAddr::V4(Ipv4Addr::from(src)),
        dst: IpAddr::V4(Ipv4Addr::from(dst)),
        protocol: packet[9],
        header_len,
        total_len,
        ttl: packet[8],
    })
}

fn parse_v6(packet: &[u8]) -> Result<IpHeader, IpError> {
    let got = packet.len();
    if got < IPV6_HEADER_LEN {
        return Err(IpError::Truncated {
            needed: IPV6_HEADER_LEN,
            got,
        });
    }
    let payload_len = usize::from(be16(packet, 4).ok_or(IpError::BadTotalLength)?);
    let total_len = IPV6_HEADER_LEN + payload_len;
    if total_len > got {
        return Err(IpError::BadTotalLength);
    }
    // Only the bytes the header claims belong to the packet take part in the
    // extension-header walk.
    let bounded = &packet[..total_len];
    let mut protocol = packet[6];
    let mut header_len = IPV6_HEADER_LEN;
    let mut walked = 0;
    while matches!(
        protocol,
        PROTO_IPV6_HOP_BY_HOP | PROTO_IPV6_ROUTING | PROTO_IPV6_DEST_OPTS
    ) {
        if walked == MAX_EXTENSION_HEADERS {
            return Err(IpError::BadHeaderLength);
        }
        walked += 1;
        let (Some(&next), Some(&len_units)) =
            (bounded.get(header_len), bounded.get(header_len + 1))
        else {
            return Err(IpError::Truncated {
                needed: header_len + 2,
                got: total_len,
            });
        };
        let ext_len = (usize::from(len_units) + 1) * 8;
        if header_len + ext_len > total_len {
            return Err(IpError::Truncated {
                needed: header_len + ext_len,
                got: total_len,
            });
        }
        protocol = next;
        header_len += ext_len;
    }
    let src: [u8; 16] = array_at(packet, 8).ok_or(IpError::BadHeaderLength)?;
    let dst: [u8; 16] = array_at(packet, 24).ok_or(IpError::BadHeaderLength)?;
    Ok(IpHeader {
        src: IpAddr::V6(Ipv6Addr::from(src)),
        dst: IpAddr::V6(Ipv6Addr::from(dst)),
        protocol,
        header_len,
        total_len,
        ttl: packet[7],
    })
}

/// Reads the destination address without validating the rest of the header.
///
/// Returns `None` when the version nibble is unknown or the buffer is too
/// short to hold the address.
pub fn dst_addr(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => array_at::<4>(packet, 16).map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        6 => array_at::<16>(packet, 24).map(|a| IpAddr::V6(Ipv6Addr::from(a))),
        _ => None,
    }
}

/// Reads the source address without validating the rest of the header.
///
/// Returns `None` when the version nibble is unknown or the buffer is too
/// short to hold the address.
pub fn src_addr(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => array_at::<4>(packet, 12).map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        6 => array_at::<16>(packet, 8).map(|a| IpAddr::V6(Ipv6Addr::from(a))),
        _ => None,
    }
}

/// Whether `packet` is an IPv4 fragment other than the first one, whose
/// payload therefore does not start with an upper-layer header.
///
/// Always `false` for IPv6 (the parser reports fragments there as protocol
/// [`PROTO_IPV6_FRAGMENT`]) and for buffers too short to tell.
pub fn is_later_fragment(packet: &[u8]) -> bool {
    match packet.first() {
        Some(b) if b >> 4 == 4 => be16(packet, 6).is_some_and(|f| f & 0x1fff != 0),
        _ => false,
    }
}

/// Adds `data` to a running one's-complement sum of big-endian 16-bit words.
/// An odd final byte is padded with a zero byte.
fn sum_words(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        acc += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u64::from(u16::from_be_bytes([*last, 0]));
    }
    acc
}

/// Folds a wide sum to 16 bits and complements it.
fn finish(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    // The loop above leaves at most 16 significant bits.
    !(acc as u16)
}

/// The internet checksum (RFC 1071) of `data`.
///
/// Computing it over data that already contains a correct checksum yields 0.
pub fn checksum(data: &[u8]) -> u16 {
    finish(sum_words(data, 0))
}

/// The internet checksum of `data` (a TCP, UDP or ICMPv6 message) preceded by
/// the IPv4 or IPv6 pseudo-header for `src`, `dst` and `protocol`.
///
/// Over a message that already carries a correct checksum this yields 0. If
/// the families differ, IPv4 addresses are taken in their IPv4-mapped IPv6
/// form and the IPv6 pseudo-header is used.
pub fn pseudo_header_checksum(src: IpAddr, dst: IpAddr, protocol: u8, data: &[u8]) -> u16 {
    let len = data.len() as u64;
    let mut acc = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let acc = sum_words(&s.octets(), 0);
            let acc = sum_words(&d.octets(), acc);
            acc + u64::from(protocol) + len
        }
        (s, d) => {
            let acc = sum_words(&as_v6(s).octets(), 0);
            let acc = sum_words(&as_v6(d).octets(), acc);
            acc + u64::from(protocol) + (len >> 16) + (len & 0xffff)
        }
    };
    acc = sum_words(data, acc);
    finish(acc)
}

fn as_v6(addr: IpAddr) -> Ipv6Addr {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Clears `out` and writes an IP header for a payload of `payload_len` bytes
/// that the caller appends afterwards. Returns the header length.
///
/// IPv4 headers carry TTL 64, identification 0, no flags and a correct header
/// checksum; IPv6 headers carry hop limit 64 and flow label 0.
pub fn emit_header(
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    payload_len: usize,
    out: &mut Vec<u8>,
) -> Result<usize, EmitError> {
    out.clear();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total =
                u16::try_from(IPV4_HEADER_LEN + payload_len).map_err(|_| EmitError::TooLarge)?;
            out.reserve(usize::from(total));
            out.extend_from_slice(&[0x45, 0]);
            out.extend_from_slice(&total.to_be_bytes());
            out.extend_from_slice(&[0, 0, 0, 0, DEFAULT_TTL, protocol, 0, 0]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
            let sum = checksum(out);
            out[10..12].copy_from_slice(&sum.to_be_bytes());
            Ok(IPV4_HEADER_LEN)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let len = u16::try_from(payload_len).map_err(|_| EmitError::TooLarge)?;
            out.reserve(IPV6_HEADER_LEN + payload_len);
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&[protocol, DEFAULT_TTL]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
            Ok(IPV6_HEADER_LEN)
        }
        _ => Err(EmitError::MixedFamilies),
    }
}

/// Clears `out` and writes a whole IP packet: header (see [`emit_header`])
/// followed by `payload`.
pub fn emit_packet(
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), EmitError> {
    emit_header(src, dst, protocol, payload.len(), out)?;
    out.extend_from_slice(payload);
    Ok(())
}

/// The addresses and protocol that make up a pseudo-header.
pub(crate) type Pseudo = (IpAddr, IpAddr, u8);

/// Writes the checksum of the upper-layer `message` into its 2 bytes at
/// `field`, covering the pseudo-header when one is given. With
/// `zero_as_ones`, a computed 0 is sent as 0xffff (UDP's rule, since 0 there
/// means "no checksum"). Shared by the ICMP, TCP and UDP emitters.
pub(crate) fn patch_checksum(
    message: &mut [u8],
    field: usize,
    pseudo: Option<Pseudo>,
    zero_as_ones: bool,
) {
    let Some(slot) = message.get_mut(field..field + 2) else {
        return;
    };
    slot.copy_from_slice(&[0, 0]);
    let mut sum = match pseudo {
        Some((src, dst, protocol)) => pseudo_header_checksum(src, dst, protocol, message),
        None => checksum(message),
    };
    if zero_as_ones && sum == 0 {
        sum = 0xffff;
    }
    if let Some(slot) = message.get_mut(field..field + 2) {
        slot.copy_from_slice(&sum.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CLASSIC: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];

    #[test]
    fn classic_header_checksum() {
        assert_eq!(checksum(&CLASSIC), 0xb861);
        let mut with_sum = CLASSIC;
        with_sum[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(checksum(&with_sum), 0);
    }

    #[test]
    fn odd_length_checksum_pads_with_zero() {
        assert_eq!(checksum(&[0x01]), !0x0100);
        assert_eq!(checksum(&[]), 0xffff);
    }

    #[test]
    fn parse_classic_header_with_trailing_bytes() {
        let mut packet = CLASSIC.to_vec();
        packet.resize(0x73 + 5, 0xaa);
        let h = IpHeader::parse(&packet).unwrap();
        assert_eq!(h.src, "192.168.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(h.dst, "192.168.0.199".parse::<IpAddr>().unwrap());
        assert_eq!(h.protocol, PROTO_UDP);
        assert_eq!(h.header_len, 20);
        assert_eq!(h.total_len, 0x73);
        assert_eq!(h.ttl, 64);
        assert_eq!(h.payload(&packet).unwrap().len(), 0x73 - 20);
        assert!(!is_later_fragment(&packet));
    }

    #[test]
    fn parse_errors() {
        assert_eq!(IpHeader::parse(&[]), Err(IpError::Empty));
        assert_eq!(IpHeader::parse(&[0x50]), Err(IpError::UnknownVersion(5)));
        assert_eq!(
            IpHeader::parse(&[0x45, 0]),
            Err(IpError::Truncated { needed: 20, got: 2 })
        );
        let mut bad_ihl = CLASSIC;
        bad_ihl[0] = 0x44;
        assert_eq!(IpHeader::parse(&bad_ihl), Err(IpError::BadHeaderLength));
        let mut long_ihl = CLASSIC;
        long_ihl[0] = 0x46;
        assert_eq!(
            IpHeader::parse(&long_ihl),
            Err(IpError::Truncated {
                needed: 24,
                got: 20
            })
        );
        // The classic header claims 0x73 bytes but only 20 are present.
        assert_eq!(IpHeader::parse(&CLASSIC), Err(IpError::BadTotalLength));
        let mut short_total = CLASSIC;
        short_total[2..4].copy_from_slice(&19u16.to_be_bytes());
        assert_eq!(IpHeader::parse(&short_total), Err(IpError::BadTotalLength));
        assert_eq!(IpError::BadTotalLength.reason(), "bad_total_length");
        assert_eq!(
            IpError::Truncated { needed: 1, got: 0 }.reason(),
            "truncated_header"
        );
    }

    #[test]
    fn emit_v4_known_bytes() {
        let mut out = vec![1, 2, 3];
        emit_packet(
            "192.168.0.1".parse().unwrap(),
            "192.168.0.199".parse().unwrap(),
            PROTO_UDP,
            &[0xde, 0xad],
            &mut out,
        )
        .unwrap();
        let expected_without_sum = [
            0x45, 0x00, 0x00, 0x16, 0x00, 0x00, 0x00, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        let sum = checksum(&expected_without_sum);
        let mut expected = expected_without_sum.to_vec();
        expected[10..12].copy_from_slice(&sum.to_be_bytes());
        expected.extend_from_slice(&[0xde, 0xad]);
        assert_eq!(out, expected);
        assert_eq!(checksum(&out[..20]), 0);
    }

    #[test]
    fn emit_v6_known_bytes_and_parse() {
        let src: IpAddr = "fd7a:115c:a1e0::1".parse().unwrap();
        let dst: IpAddr = "fd7a:115c:a1e0::2".parse().unwrap();
        let mut out = Vec::new();
        emit_packet(src, dst, PROTO_TSMP, b"abc", &mut out).unwrap();
        assert_eq!(&out[..8], &[0x60, 0, 0, 0, 0, 3, 99, 64]);
        assert_eq!(out.len(), 43);
        let h = IpHeader::parse(&out).unwrap();
        assert_eq!((h.src, h.dst, h.protocol), (src, dst, PROTO_TSMP));
        assert_eq!((h.header_len, h.total_len, h.ttl), (40, 43, 64));
        assert_eq!(dst_addr(&out), Some(dst));
        assert_eq!(src_addr(&out), Some(src));
    }

    #[test]
    fn emit_errors() {
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let v6: IpAddr = "::1".parse().unwrap();
        let mut out = Vec::new();
        assert_eq!(
            emit_packet(v4, v6, 1, &[], &mut out),
            Err(EmitError::MixedFamilies)
        );
        let big = vec![0; 65536 - 20];
        assert_eq!(
            emit_packet(v4, v4, 1, &big, &mut out),
            Err(EmitError::TooLarge)
        );
        assert!(emit_packet(v4, v4, 1, &big[1..], &mut out).is_ok());
        let big6 = vec![0; 65536];
        assert_eq!(
            emit_packet(v6, v6, 1, &big6, &mut out),
            Err(EmitError::TooLarge)
        );
    }

    #[test]
    fn v6_extension_headers_are_walked() {
        let src: IpAddr = "2001:db8::1".parse().unwrap();
        let dst: IpAddr = "2001:db8::2".parse().unwrap();
        // Hop-by-hop (8 bytes) -> destination options (16 bytes) -> UDP.
        let mut payload = vec![PROTO_IPV6_DEST_OPTS, 0, 0, 0, 0, 0, 0, 0];
        payload.extend_from_slice(&[PROTO_UDP, 1]);
        payload.extend_from_slice(&[0; 14]);
        payload.extend_from_slice(&[0xee; 4]);
        let mut out = Vec::new();
        emit_packet(src, dst, PROTO_IPV6_HOP_BY_HOP, &payload, &mut out).unwrap();
        let h = IpHeader::parse(&out).unwrap();
        assert_eq!(h.protocol, PROTO_UDP);
        assert_eq!(h.header_len, 40 + 8 + 16);
        assert_eq!(h.payload(&out), Some(&[0xee; 4][..]));

        // A fragment header stops the walk.
        let frag = [PROTO_IPV6_FRAGMENT, 0, 0, 0, 0, 0, 0, 0, PROTO_TCP, 0, 0, 0];
        emit_packet(src, dst, PROTO_IPV6_ROUTING, &frag, &mut out).unwrap();
        let h = IpHeader::parse(&out).unwrap();
        assert_eq!((h.protocol, h.header_len), (PROTO_IPV6_FRAGMENT, 48));

        // An extension header running past the payload is truncated.
        emit_packet(
            src,
            dst,
            PROTO_IPV6_ROUTING,
            &[PROTO_UDP, 1, 0, 0],
            &mut out,
        )
        .unwrap();
        assert_eq!(
            IpHeader::parse(&out),
            Err(IpError::Truncated {
                needed: 56,
                got: 44
            })
        );

        // An endless chain is cut off.
        let chain = [PROTO_IPV6_DEST_OPTS, 0, 0, 0, 0, 0, 0, 0].repeat(10);
        emit_packet(src, dst, PROTO_IPV6_DEST_OPTS, &chain, &mut out).unwrap();
        assert_eq!(IpHeader::parse(&out), Err(IpError::BadHeaderLength));
    }

    #[test]
    fn later_fragment_detection() {
        let mut packet = CLASSIC;
        packet[6] = 0x20; // More fragments, offset 0: the first fragment.
        assert!(!is_later_fragment(&packet));
        packet[7] = 0x01;
        assert!(is_later_fragment(&packet));
    }

    #[test]
    fn pseudo_header_checksum_verifies_to_zero() {
        let src: IpAddr = "10.1.2.3".parse().unwrap();
        let dst: IpAddr = "10.4.5.6".parse().unwrap();
        let mut msg = vec![0x12, 0x34, 0x00, 0x35, 0x00, 0x0b, 0, 0, 1, 2, 3];
        let sum = pseudo_header_checksum(src, dst, PROTO_UDP, &msg);
        msg[6..8].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(pseudo_header_checksum(src, dst, PROTO_UDP, &msg), 0);
    }

    fn ip_pair() -> impl Strategy<Value = (IpAddr, IpAddr)> {
        prop_oneof![
            (any::<u32>(), any::<u32>())
                .prop_map(|(a, b)| (IpAddr::V4(Ipv4Addr::from(a)), IpAddr::V4(Ipv4Addr::from(b)))),
            (any::<u128>(), any::<u128>())
                .prop_map(|(a, b)| (IpAddr::V6(Ipv6Addr::from(a)), IpAddr::V6(Ipv6Addr::from(b)))),
        ]
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = IpHeader::parse(&bytes);
            let _ = dst_addr(&bytes);
            let _ = src_addr(&bytes);
            let _ = is_later_fragment(&bytes);
        }

        #[test]
        fn parse_never_panics_with_plausible_version(
            first in prop_oneof![0x40u8..0x50, 0x60u8..0x70],
            rest in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut bytes = vec![first];
            bytes.extend_from_slice(&rest);
            if let Ok(h) = IpHeader::parse(&bytes) {
                prop_assert!(h.header_len <= h.total_len);
                prop_assert!(h.total_len <= bytes.len());
            }
        }

        #[test]
        fn emit_then_parse(
            (src, dst) in ip_pair(),
            protocol in prop_oneof![Just(1u8), Just(6), Just(17), Just(58), Just(99)],
            payload in proptest::collection::vec(any::<u8>(), 0..100),
            trailing in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let mut out = Vec::new();
            emit_packet(src, dst, protocol, &payload, &mut out).unwrap();
            out.extend_from_slice(&trailing);
            let h = IpHeader::parse(&out).unwrap();
            prop_assert_eq!(h.src, src);
            prop_assert_eq!(h.dst, dst);
            prop_assert_eq!(h.protocol, protocol);
            prop_assert_eq!(h.ttl, DEFAULT_TTL);
            prop_assert_eq!(h.payload(&out), Some(&payload[..]));
            if src.is_ipv4() {
                prop_assert_eq!(checksum(&out[..20]), 0);
            }
        }
    }
}
