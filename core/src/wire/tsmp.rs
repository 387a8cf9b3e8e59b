//! TSMP, Tailscale's message protocol inside the tunnel (IP protocol 99).
//!
//! The payload starts with a type byte:
//!
//! - `'p'` ping: 8 opaque bytes (9 bytes in all).
//! - `'o'` pong: the ping's 8 bytes, then optionally the PeerAPI port as a
//!   big-endian `u16` (9 or 11 bytes).
//! - `'!'` reject: the rejected flow's IP protocol, a reason byte, its source
//!   and destination ports (big-endian `u16` each), then an optional flags
//!   byte whose bit 0x1 means "maybe broken" (7 or 8 bytes).
//!
//! A responder sends its answer with the IP source and destination swapped.

use std::net::IpAddr;

use thiserror::Error;

use super::ip::{EmitError, PROTO_TSMP, array_at, be16, emit_header};

/// Type byte of a TSMP ping.
pub const TYPE_PING: u8 = b'p';
/// Type byte of a TSMP pong.
pub const TYPE_PONG: u8 = b'o';
/// Type byte of a TSMP reject.
pub const TYPE_REJECT: u8 = b'!';
/// Reject flag bit: the connection may be broken rather than refused.
pub const REJECT_FLAG_MAYBE_BROKEN: u8 = 0x1;

const PING_LEN: usize = 9;
const PONG_WITH_PORT_LEN: usize = 11;
const REJECT_LEN: usize = 7;

/// Why a flow was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// Blocked by the ACL (`'A'`).
    Acl,
    /// The destination has shields up (`'S'`).
    ShieldsUp,
    /// The destination does not forward to subnets (`'F'`).
    ForwardingOff,
    /// Blocked by the destination host's firewall (`'W'`).
    HostFirewall,
    /// A reason byte this implementation does not know.
    Other(u8),
}

impl RejectReason {
    /// Decodes a reason byte; unknown bytes become [`RejectReason::Other`].
    pub fn from_byte(byte: u8) -> RejectReason {
        match byte {
            b'A' => RejectReason::Acl,
            b'S' => RejectReason::ShieldsUp,
            b'F' => RejectReason::ForwardingOff,
            b'W' => RejectReason::HostFirewall,
            other => RejectReason::Other(other),
        }
    }

    /// The reason byte as sent on the wire.
    pub fn to_byte(self) -> u8 {
        match self {
            RejectReason::Acl => b'A',
            RejectReason::ShieldsUp => b'S',
            RejectReason::ForwardingOff => b'F',
            RejectReason::HostFirewall => b'W',
            RejectReason::Other(other) => other,
        }
    }
}

/// A decoded TSMP payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TsmpMessage {
    /// A ping carrying 8 opaque bytes to echo back.
    Ping {
        /// The bytes the pong must echo.
        data: [u8; 8],
    },
    /// The answer to a ping.
    Pong {
        /// The ping's bytes.
        data: [u8; 8],
        /// The responder's PeerAPI port, if the pong carries one. A carried
        /// port of 0 is reported as `Some(0)`.
        peerapi_port: Option<u16>,
    },
    /// A notice that a flow was refused.
    Reject {
        /// The IP protocol of the rejected flow.
        ip_proto: u8,
        /// Why it was refused.
        reason: RejectReason,
        /// The rejected flow's source port.
        src_port: u16,
        /// The rejected flow's destination port.
        dst_port: u16,
        /// Whether the sender suspects the connection is broken rather than
        /// deliberately refused.
        maybe_broken: bool,
    },
}

/// Why [`TsmpMessage::parse`] rejected a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TsmpError {
    /// The payload holds no bytes.
    #[error("empty TSMP payload")]
    Empty,
    /// The type byte is not one of `'p'`, `'o'`, `'!'`.
    #[error("unknown TSMP type {0:#04x}")]
    UnknownType(u8),
    /// The payload is shorter than its type requires.
    #[error("truncated TSMP message: needed {needed} bytes, got {got}")]
    Truncated {
        /// The minimum length for this message type.
        needed: usize,
        /// The payload's length.
        got: usize,
    },
}

impl TsmpMessage {
    /// Parses a TSMP payload (the bytes after the IP header).
    ///
    /// Bytes past the longest form of each message are ignored, as is a
    /// lone tenth byte of a pong (too short to be a port).
    pub fn parse(payload: &[u8]) -> Result<TsmpMessage, TsmpError> {
        let kind = *payload.first().ok_or(TsmpError::Empty)?;
        let need = |needed: usize| {
            if payload.len() < needed {
                Err(TsmpError::Truncated {
                    needed,
                    got: payload.len(),
                })
            } else {
                Ok(())
            }
        };
        match kind {
            TYPE_PING => {
                need(PING_LEN)?;
                let data = array_at(payload, 1).ok_or(TsmpError::Truncated {
                    needed: PING_LEN,
                    got: payload.len(),
                })?;
                Ok(TsmpMessage::Ping { data })
            }
            TYPE_PONG => {
                need(PING_LEN)?;
                let data = array_at(payload, 1).ok_or(TsmpError::Truncated {
                    needed: PING_LEN,
                    got: payload.len(),
                })?;
                Ok(TsmpMessage::Pong {
                    data,
                    peerapi_port: be16(payload, PING_LEN),
                })
            }
            TYPE_REJECT => {
                need(REJECT_LEN)?;
                let (Some(&ip_proto), Some(&reason), Some(src_port), Some(dst_port)) = (
                    payload.get(1),
                    payload.get(2),
                    be16(payload, 3),
                    be16(payload, 5),
                ) else {
                    return Err(TsmpError::Truncated {
                        needed: REJECT_LEN,
                        got: payload.len(),
                    });
                };
                let flags = payload.get(REJECT_LEN).copied().unwrap_or(0);
                Ok(TsmpMessage::Reject {
                    ip_proto,
                    reason: RejectReason::from_byte(reason),
                    src_port,
                    dst_port,
                    maybe_broken: flags & REJECT_FLAG_MAYBE_BROKEN != 0,
                })
            }
            other => Err(TsmpError::UnknownType(other)),
        }
    }

    /// The number of bytes [`TsmpMessage::emit`] appends.
    pub fn encoded_len(&self) -> usize {
        match self {
            TsmpMessage::Ping { .. } => PING_LEN,
            TsmpMessage::Pong {
                peerapi_port: None, ..
            } => PING_LEN,
            TsmpMessage::Pong {
                peerapi_port: Some(_),
                ..
            } => PONG_WITH_PORT_LEN,
            TsmpMessage::Reject { maybe_broken, .. } => REJECT_LEN + usize::from(*maybe_broken),
        }
    }

    /// Appends the payload encoding to `out`. A pong without a port takes 9
    /// bytes; the reject flags byte is written only when a flag is set.
    pub fn emit(&self, out: &mut Vec<u8>) {
        match self {
            TsmpMessage::Ping { data } => {
                out.push(TYPE_PING);
                out.extend_from_slice(data);
            }
            TsmpMessage::Pong { data, peerapi_port } => {
                out.push(TYPE_PONG);
                out.extend_from_slice(data);
                if let Some(port) = peerapi_port {
                    out.extend_from_slice(&port.to_be_bytes());
                }
            }
            TsmpMessage::Reject {
                ip_proto,
                reason,
                src_port,
                dst_port,
                maybe_broken,
            } => {
                out.extend_from_slice(&[TYPE_REJECT, *ip_proto, reason.to_byte()]);
                out.extend_from_slice(&src_port.to_be_bytes());
                out.extend_from_slice(&dst_port.to_be_bytes());
                if *maybe_broken {
                    out.push(REJECT_FLAG_MAYBE_BROKEN);
                }
            }
        }
    }

    /// Clears `out` and writes a whole IP packet (protocol 99) carrying this
    /// message.
    pub fn emit_packet(
        &self,
        src: IpAddr,
        dst: IpAddr,
        out: &mut Vec<u8>,
    ) -> Result<(), EmitError> {
        emit_header(src, dst, PROTO_TSMP, self.encoded_len(), out)?;
        self.emit(out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ip::IpHeader;
    use proptest::prelude::*;

    const DATA: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

    fn bytes_of(m: &TsmpMessage) -> Vec<u8> {
        let mut out = Vec::new();
        m.emit(&mut out);
        assert_eq!(out.len(), m.encoded_len());
        out
    }

    #[test]
    fn ping_known_bytes() {
        let m = TsmpMessage::Ping { data: DATA };
        assert_eq!(bytes_of(&m), b"p\x01\x02\x03\x04\x05\x06\x07\x08");
        assert_eq!(
            TsmpMessage::parse(b"p\x01\x02\x03\x04\x05\x06\x07\x08"),
            Ok(m)
        );
    }

    #[test]
    fn pong_known_bytes() {
        let with_port = TsmpMessage::Pong {
            data: DATA,
            peerapi_port: Some(0x1234),
        };
        let wire = bytes_of(&with_port);
        assert_eq!(wire, b"o\x01\x02\x03\x04\x05\x06\x07\x08\x12\x34");
        assert_eq!(TsmpMessage::parse(&wire), Ok(with_port));

        let without = TsmpMessage::Pong {
            data: DATA,
            peerapi_port: None,
        };
        assert_eq!(bytes_of(&without), &wire[..9]);
        assert_eq!(TsmpMessage::parse(&wire[..9]), Ok(without));
        // A lone tenth byte is not a port.
        assert_eq!(TsmpMessage::parse(&wire[..10]), Ok(without));
    }

    #[test]
    fn reject_known_bytes() {
        let m = TsmpMessage::Reject {
            ip_proto: 6,
            reason: RejectReason::Acl,
            src_port: 0x1f90,
            dst_port: 443,
            maybe_broken: false,
        };
        let wire = bytes_of(&m);
        assert_eq!(wire, [b'!', 6, b'A', 0x1f, 0x90, 0x01, 0xbb]);
        assert_eq!(TsmpMessage::parse(&wire), Ok(m));

        let broken = TsmpMessage::Reject {
            ip_proto: 17,
            reason: RejectReason::HostFirewall,
            src_port: 1,
            dst_port: 2,
            maybe_broken: true,
        };
        let wire = bytes_of(&broken);
        assert_eq!(wire, [b'!', 17, b'W', 0, 1, 0, 2, 0x1]);
        assert_eq!(TsmpMessage::parse(&wire), Ok(broken));
        // A flags byte without the bit set parses as not broken.
        assert_eq!(
            TsmpMessage::parse(&[b'!', 17, b'S', 0, 1, 0, 2, 0x0]),
            Ok(TsmpMessage::Reject {
                ip_proto: 17,
                reason: RejectReason::ShieldsUp,
                src_port: 1,
                dst_port: 2,
                maybe_broken: false
            })
        );
        assert_eq!(RejectReason::from_byte(b'F'), RejectReason::ForwardingOff);
        assert_eq!(RejectReason::from_byte(b'?'), RejectReason::Other(b'?'));
    }

    #[test]
    fn parse_errors() {
        assert_eq!(TsmpMessage::parse(&[]), Err(TsmpError::Empty));
        assert_eq!(TsmpMessage::parse(b"x"), Err(TsmpError::UnknownType(b'x')));
        assert_eq!(
            TsmpMessage::parse(b"p1234567"),
            Err(TsmpError::Truncated { needed: 9, got: 8 })
        );
        assert_eq!(
            TsmpMessage::parse(b"o"),
            Err(TsmpError::Truncated { needed: 9, got: 1 })
        );
        assert_eq!(
            TsmpMessage::parse(b"!\x06A\x00\x01\x00"),
            Err(TsmpError::Truncated { needed: 7, got: 6 })
        );
    }

    #[test]
    fn packet_form() {
        let src: IpAddr = "100.64.0.1".parse().unwrap();
        let dst: IpAddr = "100.64.0.2".parse().unwrap();
        let m = TsmpMessage::Pong {
            data: DATA,
            peerapi_port: Some(5),
        };
        let mut out = vec![9, 9];
        m.emit_packet(src, dst, &mut out).unwrap();
        let h = IpHeader::parse(&out).unwrap();
        assert_eq!((h.protocol, h.src, h.dst, h.total_len), (99, src, dst, 31));
        assert_eq!(TsmpMessage::parse(h.payload(&out).unwrap()), Ok(m));
    }

    fn message() -> impl Strategy<Value = TsmpMessage> {
        prop_oneof![
            any::<[u8; 8]>().prop_map(|data| TsmpMessage::Ping { data }),
            (any::<[u8; 8]>(), any::<Option<u16>>())
                .prop_map(|(data, peerapi_port)| TsmpMessage::Pong { data, peerapi_port }),
            (
                any::<u8>(),
                any::<u8>(),
                any::<u16>(),
                any::<u16>(),
                any::<bool>()
            )
                .prop_map(|(ip_proto, r, src_port, dst_port, maybe_broken)| {
                    TsmpMessage::Reject {
                        ip_proto,
                        reason: RejectReason::from_byte(r),
                        src_port,
                        dst_port,
                        maybe_broken,
                    }
                }),
        ]
    }

    proptest! {
        #[test]
        fn emit_then_parse(m in message()) {
            prop_assert_eq!(TsmpMessage::parse(&bytes_of(&m)), Ok(m));
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
            let _ = TsmpMessage::parse(&bytes);
        }

        #[test]
        fn parse_never_panics_known_types(
            kind in prop_oneof![Just(b'p'), Just(b'o'), Just(b'!')],
            rest in proptest::collection::vec(any::<u8>(), 0..14),
        ) {
            let mut bytes = vec![kind];
            bytes.extend_from_slice(&rest);
            let _ = TsmpMessage::parse(&bytes);
        }
    }
}
