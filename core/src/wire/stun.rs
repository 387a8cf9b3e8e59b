//! STUN (RFC 8489) on the WireGuard socket: telling a STUN message apart
//! from WireGuard and disco datagrams. The messages themselves are built and
//! parsed with `stun-proto` (see `engine::endpoints`); this module only
//! demultiplexes.

/// The fixed value every STUN message carries in bytes 4..8 (RFC 8489 §5).
pub const MAGIC_COOKIE: u32 = stun_proto::types::message::MAGIC_COOKIE;

/// The length of a STUN message header.
pub const HEADER_LEN: usize = 20;

/// Whether `datagram` is a STUN message: the two top bits of the first byte
/// clear, the magic cookie in bytes 4..8, and a length field (a multiple of
/// four) that accounts for exactly the rest of the datagram.
///
/// No WireGuard message passes: its bytes 2..4 are zero, so its length field
/// would say 0 and it would have to be 20 bytes long, which no WireGuard
/// message is (the shortest, an empty transport message, has 32). No disco
/// message passes either: its first byte is `'T'` (0x54), whose top bits are
/// not clear.
pub fn looks_like_stun(datagram: &[u8]) -> bool {
    let Some(header) = datagram.get(..HEADER_LEN) else {
        return false;
    };
    if header[0] & 0xc0 != 0 {
        return false;
    }
    let cookie = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let length = usize::from(u16::from_be_bytes([header[2], header[3]]));
    cookie == MAGIC_COOKIE && length % 4 == 0 && length == datagram.len() - HEADER_LEN
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding_request() -> Vec<u8> {
        use stun_proto::types::message::{
            BINDING, Message, MessageClass, MessageType, MessageWriteVec,
        };
        use stun_proto::types::prelude::*;
        Message::builder(
            MessageType::from_class_method(MessageClass::Request, BINDING),
            7u128.into(),
            MessageWriteVec::new(),
        )
        .finish()
    }

    #[test]
    fn a_binding_request_is_stun() {
        assert!(looks_like_stun(&binding_request()));
    }

    #[test]
    fn wireguard_and_disco_are_not_stun() {
        // A WireGuard transport message whose receiver index happens to
        // spell the magic cookie.
        let mut transport = vec![4, 0, 0, 0, 0x21, 0x12, 0xa4, 0x42];
        transport.resize(32, 0);
        assert!(!looks_like_stun(&transport));
        // An initiation: 148 bytes, length field 0.
        let mut initiation = vec![1, 0, 0, 0, 0x21, 0x12, 0xa4, 0x42];
        initiation.resize(148, 0);
        assert!(!looks_like_stun(&initiation));
        let mut disco = b"TS\xf0\x9f\x92\xac".to_vec();
        disco.resize(100, 0);
        assert!(!looks_like_stun(&disco));
    }

    #[test]
    fn truncated_or_padded_stun_is_not_stun() {
        let request = binding_request();
        assert!(!looks_like_stun(&request[..19]));
        let mut padded = request.clone();
        padded.push(0);
        assert!(!looks_like_stun(&padded));
        let mut bad_cookie = request;
        bad_cookie[4] ^= 1;
        assert!(!looks_like_stun(&bad_cookie));
    }
}
