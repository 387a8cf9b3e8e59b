//! ICMP and ICMPv6 echo (ping) messages.
//!
//! The engine keys its outstanding pings by the 4 bytes that follow the ICMP
//! type, code and checksum: the identifier and the sequence number, both
//! big-endian on the wire, read together as one little-endian `u32`
//! ([`ping_key`]).

use std::net::IpAddr;

use super::ip::{
    self, EmitError, IpHeader, PROTO_ICMP, PROTO_ICMPV6, be16, emit_header, patch_checksum,
    pseudo_header_checksum,
};

/// ICMPv4 type of an echo reply.
pub const ICMPV4_ECHO_REPLY: u8 = 0;
/// ICMPv4 type of an echo request.
pub const ICMPV4_ECHO_REQUEST: u8 = 8;
/// ICMPv6 type of an echo request.
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
/// ICMPv6 type of an echo reply.
pub const ICMPV6_ECHO_REPLY: u8 = 129;
/// Length of the echo header: type, code, checksum, identifier, sequence.
pub const ECHO_HEADER_LEN: usize = 8;

/// Whether an echo message asks for a reply or is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EchoKind {
    /// An echo request ("ping").
    Request,
    /// An echo reply ("pong").
    Reply,
}

/// A zero-copy view of an ICMP or ICMPv6 echo message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Echo<'a> {
    /// Request or reply.
    pub kind: EchoKind,
    /// The identifier field.
    pub ident: u16,
    /// The sequence number field.
    pub seq: u16,
    /// The data after the 8-byte echo header.
    pub payload: &'a [u8],
}

impl Echo<'_> {
    /// The ping key of this message; see [`ping_key`].
    pub fn key(&self) -> u32 {
        ping_key(self.ident, self.seq)
    }
}

/// The ICMP type byte for `kind` in the given IP family.
fn type_for(kind: EchoKind, v4: bool) -> u8 {
    match (kind, v4) {
        (EchoKind::Request, true) => ICMPV4_ECHO_REQUEST,
        (EchoKind::Reply, true) => ICMPV4_ECHO_REPLY,
        (EchoKind::Request, false) => ICMPV6_ECHO_REQUEST,
        (EchoKind::Reply, false) => ICMPV6_ECHO_REPLY,
    }
}

/// The ICMP message of `packet` if `header` says it carries the ICMP flavour
/// matching its IP version.
fn icmp_message<'a>(header: &IpHeader, packet: &'a [u8]) -> Option<&'a [u8]> {
    let expected = if header.is_ipv4() {
        PROTO_ICMP
    } else {
        PROTO_ICMPV6
    };
    if header.protocol != expected || ip::is_later_fragment(packet) {
        return None;
    }
    header.payload(packet)
}

/// Parses the echo request or reply carried by `packet`, whose IP header was
/// parsed into `header`.
///
/// Only ICMPv4 types 8/0 inside IPv4 and ICMPv6 types 128/129 inside IPv6 are
/// recognised; the code and the checksum are not checked (see
/// [`verify_checksum`]).
pub fn parse_echo<'a>(header: &IpHeader, packet: &'a [u8]) -> Option<Echo<'a>> {
    let message = icmp_message(header, packet)?;
    let kind = match (*message.first()?, header.is_ipv4()) {
        (ICMPV4_ECHO_REQUEST, true) | (ICMPV6_ECHO_REQUEST, false) => EchoKind::Request,
        (ICMPV4_ECHO_REPLY, true) | (ICMPV6_ECHO_REPLY, false) => EchoKind::Reply,
        _ => return None,
    };
    Some(Echo {
        kind,
        ident: be16(message, 4)?,
        seq: be16(message, 6)?,
        payload: message.get(ECHO_HEADER_LEN..)?,
    })
}

/// Whether the ICMP (or ICMPv6, pseudo-header included) checksum of the
/// message carried by `packet` is correct. `false` if `header` does not
/// describe an ICMP message of the matching family.
pub fn verify_checksum(header: &IpHeader, packet: &[u8]) -> bool {
    let Some(message) = icmp_message(header, packet) else {
        return false;
    };
    if message.len() < 4 {
        return false;
    }
    if header.is_ipv4() {
        ip::checksum(message) == 0
    } else {
        pseudo_header_checksum(header.src, header.dst, PROTO_ICMPV6, message) == 0
    }
}

/// Clears `out` and writes a whole IP packet carrying an echo message with a
/// correct checksum.
pub fn emit_echo(
    src: IpAddr,
    dst: IpAddr,
    kind: EchoKind,
    ident: u16,
    seq: u16,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), EmitError> {
    let v4 = src.is_ipv4();
    let protocol = if v4 { PROTO_ICMP } else { PROTO_ICMPV6 };
    let header_len = emit_header(src, dst, protocol, ECHO_HEADER_LEN + payload.len(), out)?;
    out.extend_from_slice(&[type_for(kind, v4), 0, 0, 0]);
    out.extend_from_slice(&ident.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(payload);
    let pseudo = if v4 { None } else { Some((src, dst, protocol)) };
    if let Some(message) = out.get_mut(header_len..) {
        patch_checksum(message, 2, pseudo, false);
    }
    Ok(())
}

/// ICMPv4 type of a "destination unreachable" message.
pub const ICMPV4_DEST_UNREACHABLE: u8 = 3;
/// ICMPv4 "destination unreachable" code: fragmentation needed and the
/// don't-fragment bit set (RFC 1191).
pub const ICMPV4_CODE_FRAG_NEEDED: u8 = 4;
/// ICMPv6 type of a "packet too big" message (RFC 8201).
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
/// The largest IPv4 packet an ICMP error may make (RFC 1812): the quote of
/// the offending packet is cut to fit.
const ICMPV4_ERROR_MAX: usize = 576;
/// The largest IPv6 packet an ICMPv6 error may make (RFC 4443: the IPv6
/// minimum MTU).
const ICMPV6_ERROR_MAX: usize = 1280;
/// Type, code, checksum and the 4 bytes that carry the MTU.
const TOO_BIG_HEADER_LEN: usize = 8;

/// Clears `out` and writes the ICMP "fragmentation needed" (IPv4) or ICMPv6
/// "packet too big" (IPv6) answer to `packet`, telling its sender that
/// `mtu` bytes is the most that fits the path. The answer comes from the
/// packet's destination to its source and quotes the start of the packet,
/// so the sender's stack finds the socket (TCP lowers its MSS).
///
/// `None` when the packet cannot be answered: not parsable, a later
/// fragment, or itself an ICMP error (errors are never answered with
/// errors, RFC 1122 and RFC 4443).
pub fn emit_too_big(packet: &[u8], mtu: u16, out: &mut Vec<u8>) -> Option<()> {
    let header = IpHeader::parse(packet).ok()?;
    if ip::is_later_fragment(packet) || is_icmp_error(&header, packet) {
        return None;
    }
    let v4 = header.is_ipv4();
    let (kind, code, max, mtu_field) = if v4 {
        let [hi, lo] = mtu.to_be_bytes();
        (
            ICMPV4_DEST_UNREACHABLE,
            ICMPV4_CODE_FRAG_NEEDED,
            ICMPV4_ERROR_MAX - ip::IPV4_HEADER_LEN,
            [0, 0, hi, lo],
        )
    } else {
        (
            ICMPV6_PACKET_TOO_BIG,
            0,
            ICMPV6_ERROR_MAX - ip::IPV6_HEADER_LEN,
            u32::from(mtu).to_be_bytes(),
        )
    };
    let quote = &packet[..packet
        .len()
        .min(header.total_len)
        .min(max - TOO_BIG_HEADER_LEN)];
    let protocol = if v4 { PROTO_ICMP } else { PROTO_ICMPV6 };
    let header_len = emit_header(
        header.dst,
        header.src,
        protocol,
        TOO_BIG_HEADER_LEN + quote.len(),
        out,
    )
    .ok()?;
    out.extend_from_slice(&[kind, code, 0, 0]);
    out.extend_from_slice(&mtu_field);
    out.extend_from_slice(quote);
    let pseudo = if v4 {
        None
    } else {
        Some((header.dst, header.src, protocol))
    };
    if let Some(message) = out.get_mut(header_len..) {
        patch_checksum(message, 2, pseudo, false);
    }
    Some(())
}

/// Whether `packet` carries an ICMP error message (anything but an echo,
/// for IPv4 by type number, for IPv6 every type below 128).
fn is_icmp_error(header: &IpHeader, packet: &[u8]) -> bool {
    let Some(message) = icmp_message(header, packet) else {
        return false;
    };
    match message.first() {
        Some(&kind) if header.is_ipv4() => matches!(kind, 3 | 4 | 5 | 11 | 12),
        Some(&kind) => kind < 128,
        None => false,
    }
}

/// The key under which the engine files a ping: the identifier and sequence
/// bytes as they appear on the wire (each big-endian), read as one
/// little-endian `u32`.
pub fn ping_key(ident: u16, seq: u16) -> u32 {
    let [i0, i1] = ident.to_be_bytes();
    let [s0, s1] = seq.to_be_bytes();
    u32::from_le_bytes([i0, i1, s0, s1])
}

/// The inverse of [`ping_key`]: the identifier and sequence number that put
/// `key` on the wire.
pub fn ident_seq_from_key(key: u32) -> (u16, u16) {
    let [b0, b1, b2, b3] = key.to_le_bytes();
    (u16::from_be_bytes([b0, b1]), u16::from_be_bytes([b2, b3]))
}

/// Clears `out` and writes the reply to the echo request in
/// `request_packet`: addresses swapped, same identifier, sequence and
/// payload. `None` if the packet is not a parsable echo request.
pub fn echo_reply_for(request_packet: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let header = IpHeader::parse(request_packet).ok()?;
    let echo = parse_echo(&header, request_packet)?;
    if echo.kind != EchoKind::Request {
        return None;
    }
    emit_echo(
        header.dst,
        header.src,
        EchoKind::Reply,
        echo.ident,
        echo.seq,
        echo.payload,
        out,
    )
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn icmpv4_echo_known_bytes() {
        let mut out = Vec::new();
        emit_echo(
            v4("100.64.0.1"),
            v4("100.64.0.2"),
            EchoKind::Request,
            0x1234,
            0x0001,
            b"hi",
            &mut out,
        )
        .unwrap();
        // The ICMP part: type 8, code 0, checksum, ident, seq, payload.
        // Checksum by hand: 0x0800 + 0x1234 + 0x0001 + 0x6869 = 0x829e,
        // complemented 0x7d61.
        assert_eq!(
            &out[20..],
            &[8, 0, 0x7d, 0x61, 0x12, 0x34, 0x00, 0x01, b'h', b'i']
        );
        assert_eq!(out[9], PROTO_ICMP);
        let header = IpHeader::parse(&out).unwrap();
        assert!(verify_checksum(&header, &out));
        let echo = parse_echo(&header, &out).unwrap();
        assert_eq!(
            echo,
            Echo {
                kind: EchoKind::Request,
                ident: 0x1234,
                seq: 1,
                payload: b"hi"
            }
        );
        out[25] ^= 1;
        assert!(!verify_checksum(&header, &out));
        // Parsing does not require a correct checksum.
        assert!(parse_echo(&header, &out).is_some());
    }

    #[test]
    fn icmpv6_echo_checksum_covers_pseudo_header() {
        let src: IpAddr = "fd7a:115c:a1e0::1".parse().unwrap();
        let dst: IpAddr = "fd7a:115c:a1e0::2".parse().unwrap();
        let mut out = Vec::new();
        emit_echo(src, dst, EchoKind::Reply, 7, 9, b"xyz", &mut out).unwrap();
        assert_eq!(out[6], PROTO_ICMPV6);
        assert_eq!(out[40], ICMPV6_ECHO_REPLY);
        let header = IpHeader::parse(&out).unwrap();
        assert!(verify_checksum(&header, &out));
        // Without the pseudo-header the sum would not verify.
        assert_ne!(ip::checksum(&out[40..]), 0);
        let echo = parse_echo(&header, &out).unwrap();
        assert_eq!(
            (echo.kind, echo.ident, echo.seq, echo.payload),
            (EchoKind::Reply, 7, 9, &b"xyz"[..])
        );
    }

    #[test]
    fn too_big_v4_quotes_the_packet_and_carries_the_mtu() {
        let mut tcp = Vec::new();
        let segment: Vec<u8> = (0..1400u32).map(|i| i as u8).collect();
        ip::emit_packet(
            v4("10.0.0.1"),
            v4("10.0.0.2"),
            ip::PROTO_TCP,
            &segment,
            &mut tcp,
        )
        .unwrap();
        let mut out = Vec::new();
        emit_too_big(&tcp, 1240, &mut out).unwrap();
        let header = IpHeader::parse(&out).unwrap();
        assert_eq!((header.src, header.dst), (v4("10.0.0.2"), v4("10.0.0.1")));
        assert_eq!(header.protocol, PROTO_ICMP);
        assert!(verify_checksum(&header, &out));
        assert_eq!(out.len(), ICMPV4_ERROR_MAX, "the quote is cut to 576 bytes");
        let message = &out[20..];
        assert_eq!(
            &message[..2],
            &[ICMPV4_DEST_UNREACHABLE, ICMPV4_CODE_FRAG_NEEDED]
        );
        assert_eq!(&message[4..8], &[0, 0, 0x04, 0xd8]);
        assert_eq!(&message[8..], &tcp[..548]);
    }

    #[test]
    fn too_big_v6_covers_the_pseudo_header() {
        let src: IpAddr = "fd7a:115c:a1e0::1".parse().unwrap();
        let dst: IpAddr = "fd7a:115c:a1e0::2".parse().unwrap();
        let mut udp = Vec::new();
        ip::emit_packet(src, dst, ip::PROTO_UDP, &[7; 100], &mut udp).unwrap();
        let mut out = Vec::new();
        emit_too_big(&udp, 1280, &mut out).unwrap();
        let header = IpHeader::parse(&out).unwrap();
        assert_eq!((header.src, header.dst), (dst, src));
        assert!(verify_checksum(&header, &out));
        assert_eq!(
            &out[40..48],
            &[ICMPV6_PACKET_TOO_BIG, 0, out[42], out[43], 0, 0, 5, 0]
        );
        assert_eq!(&out[48..], &udp[..], "a short packet is quoted whole");
    }

    #[test]
    fn errors_and_later_fragments_get_no_too_big() {
        let mut error = Vec::new();
        ip::emit_packet(
            v4("10.0.0.1"),
            v4("10.0.0.2"),
            PROTO_ICMP,
            &[3, 4, 0, 0, 0, 0, 5, 0],
            &mut error,
        )
        .unwrap();
        let mut out = Vec::new();
        assert_eq!(emit_too_big(&error, 1200, &mut out), None);
        let mut fragment = Vec::new();
        ip::emit_packet(
            v4("10.0.0.1"),
            v4("10.0.0.2"),
            ip::PROTO_UDP,
            &[0; 64],
            &mut fragment,
        )
        .unwrap();
        fragment[7] = 8; // fragment offset 64 bytes
        assert_eq!(emit_too_big(&fragment, 1200, &mut out), None);
        assert_eq!(emit_too_big(&[0x45, 0, 0], 1200, &mut out), None);
        // An echo request is answered.
        let mut echo = Vec::new();
        emit_echo(
            v4("10.0.0.1"),
            v4("10.0.0.2"),
            EchoKind::Request,
            1,
            1,
            &[0; 32],
            &mut echo,
        )
        .unwrap();
        assert_eq!(emit_too_big(&echo, 1200, &mut out), Some(()));
    }

    #[test]
    fn family_mismatch_is_not_an_echo() {
        // ICMPv4 type 8 inside IPv6 (protocol 1) is not recognised.
        let src: IpAddr = "::1".parse().unwrap();
        let mut out = Vec::new();
        ip::emit_packet(src, src, PROTO_ICMP, &[8, 0, 0, 0, 0, 1, 0, 2], &mut out).unwrap();
        let header = IpHeader::parse(&out).unwrap();
        assert_eq!(parse_echo(&header, &out), None);
        // ICMPv6 type 128 inside IPv4 with protocol 58 is not either.
        let src = v4("10.0.0.1");
        ip::emit_packet(
            src,
            src,
            PROTO_ICMPV6,
            &[128, 0, 0, 0, 0, 1, 0, 2],
            &mut out,
        )
        .unwrap();
        let header = IpHeader::parse(&out).unwrap();
        assert_eq!(parse_echo(&header, &out), None);
        // Too short for the echo header.
        ip::emit_packet(src, src, PROTO_ICMP, &[8, 0, 0, 0, 0, 1, 0], &mut out).unwrap();
        let header = IpHeader::parse(&out).unwrap();
        assert_eq!(parse_echo(&header, &out), None);
    }

    #[test]
    fn ping_key_layout() {
        // Wire bytes 12 34 56 78 read little-endian.
        assert_eq!(ping_key(0x1234, 0x5678), 0x7856_3412);
        assert_eq!(ident_seq_from_key(0x7856_3412), (0x1234, 0x5678));
    }

    #[test]
    fn reply_to_request() {
        let a = v4("100.64.0.1");
        let b = v4("100.64.0.2");
        let mut req = Vec::new();
        emit_echo(a, b, EchoKind::Request, 0xabcd, 3, b"payload", &mut req).unwrap();
        let mut reply = Vec::new();
        echo_reply_for(&req, &mut reply).unwrap();
        let header = IpHeader::parse(&reply).unwrap();
        assert_eq!((header.src, header.dst), (b, a));
        assert!(verify_checksum(&header, &reply));
        let echo = parse_echo(&header, &reply).unwrap();
        assert_eq!(
            (echo.kind, echo.ident, echo.seq, echo.payload),
            (EchoKind::Reply, 0xabcd, 3, &b"payload"[..])
        );
        // A reply is not answered.
        assert_eq!(echo_reply_for(&reply, &mut req), None);
    }

    proptest! {
        #[test]
        fn emit_then_parse(
            v6 in any::<bool>(),
            a in any::<u128>(),
            b in any::<u128>(),
            request in any::<bool>(),
            ident in any::<u16>(),
            seq in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let (src, dst) = if v6 {
                (IpAddr::V6(Ipv6Addr::from(a)), IpAddr::V6(Ipv6Addr::from(b)))
            } else {
                (IpAddr::V4(Ipv4Addr::from(a as u32)), IpAddr::V4(Ipv4Addr::from(b as u32)))
            };
            let kind = if request { EchoKind::Request } else { EchoKind::Reply };
            let mut out = Vec::new();
            emit_echo(src, dst, kind, ident, seq, &payload, &mut out).unwrap();
            let header = IpHeader::parse(&out).unwrap();
            prop_assert!(verify_checksum(&header, &out));
            let echo = parse_echo(&header, &out).unwrap();
            prop_assert_eq!(echo, Echo { kind, ident, seq, payload: &payload });
            prop_assert_eq!(ident_seq_from_key(echo.key()), (ident, seq));
        }

        #[test]
        fn key_round_trip(key in any::<u32>()) {
            let (ident, seq) = ident_seq_from_key(key);
            prop_assert_eq!(ping_key(ident, seq), key);
        }

        #[test]
        fn parse_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..120),
            header_len in 0usize..200,
            total_len in 0usize..200,
            protocol in prop_oneof![Just(PROTO_ICMP), Just(PROTO_ICMPV6), any::<u8>()],
            v6 in any::<bool>(),
        ) {
            let addr = if v6 { IpAddr::V6(Ipv6Addr::LOCALHOST) } else { IpAddr::V4(Ipv4Addr::LOCALHOST) };
            // A header that may not match the bytes at all.
            let header = IpHeader { src: addr, dst: addr, protocol, header_len, total_len, ttl: 1 };
            let _ = parse_echo(&header, &bytes);
            let _ = verify_checksum(&header, &bytes);
            if let Ok(real) = IpHeader::parse(&bytes) {
                let _ = parse_echo(&real, &bytes);
                let _ = verify_checksum(&real, &bytes);
            }
            let mut out = Vec::new();
            let _ = echo_reply_for(&bytes, &mut out);
        }

        /// Any bytes: no panic; an answer, when there is one, is a valid
        /// ICMP message back to the packet's source quoting its start.
        #[test]
        fn too_big_answers_are_well_formed(
            raw in proptest::collection::vec(any::<u8>(), 0..1600),
            well_formed in any::<bool>(),
            v6 in any::<bool>(),
            protocol in prop_oneof![Just(PROTO_ICMP), Just(PROTO_ICMPV6), Just(ip::PROTO_TCP), any::<u8>()],
            mtu in any::<u16>(),
        ) {
            // Half the cases are real packets (with the random bytes as
            // their payload), so answers are made and checked.
            let mut bytes = raw.clone();
            if well_formed {
                let (src, dst) = if v6 {
                    (IpAddr::V6(Ipv6Addr::LOCALHOST), "fd7a:115c:a1e0::2".parse().unwrap())
                } else {
                    (IpAddr::V4(Ipv4Addr::LOCALHOST), v4("100.64.0.2"))
                };
                ip::emit_packet(src, dst, protocol, &raw, &mut bytes).unwrap();
            }
            let mut out = Vec::new();
            if emit_too_big(&bytes, mtu, &mut out).is_some() {
                let asked = IpHeader::parse(&bytes).unwrap();
                let answer = IpHeader::parse(&out).unwrap();
                prop_assert_eq!((answer.src, answer.dst), (asked.dst, asked.src));
                prop_assert!(verify_checksum(&answer, &out));
                let limit = if answer.is_ipv4() { ICMPV4_ERROR_MAX } else { ICMPV6_ERROR_MAX };
                prop_assert!(out.len() <= limit);
                let quote = &out[answer.header_len + TOO_BIG_HEADER_LEN..];
                prop_assert_eq!(quote, &bytes[..quote.len()]);
            }
        }
    }
}
