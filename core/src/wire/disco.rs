//! Disco, Tailscale's path-discovery protocol, carried on the WireGuard UDP
//! socket.
//!
//! A disco datagram is `MAGIC (6) || sender disco public key (32) ||
//! nonce (24) || box`, where the box is a NaCl `crypto_box` (X25519 +
//! XSalsa20-Poly1305: a 16-byte tag followed by the ciphertext) of the
//! plaintext `type, version, payload`:
//!
//! - Ping (0x01): 12-byte transaction id, an optional 32-byte node key, then
//!   optional zero padding.
//! - Pong (0x02): the transaction id, then the source address the responder
//!   observed as a 16-byte IP (IPv4 in its IPv4-mapped form) and a big-endian
//!   `u16` port.
//! - CallMeMaybe (0x03): any number of 18-byte endpoints in the same form.
//!
//! Any version byte is accepted, and bytes past what a message needs are
//! ignored, so that newer peers may extend the formats.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crypto_box::aead::AeadInPlace;
use crypto_box::{Nonce, PublicKey, SalsaBox, SecretKey};
use thiserror::Error;

use super::ip::{array_at, be16};

/// The 6 bytes that open every disco datagram: "TS" and U+1F4AC in UTF-8.
pub const MAGIC: [u8; 6] = [0x54, 0x53, 0xf0, 0x9f, 0x92, 0xac];
/// Length of a disco (X25519) public or secret key.
pub const KEY_LEN: usize = 32;
/// Length of the box nonce.
pub const NONCE_LEN: usize = 24;
/// Length of the Poly1305 tag that opens the box.
pub const TAG_LEN: usize = 16;
/// Length of the clear header: magic, sender key and nonce.
pub const HEADER_LEN: usize = MAGIC.len() + KEY_LEN + NONCE_LEN;
/// The shortest datagram that can be disco: header plus an empty box.
pub const MIN_LEN: usize = HEADER_LEN + TAG_LEN;

/// Message type byte of a ping.
pub const TYPE_PING: u8 = 0x01;
/// Message type byte of a pong.
pub const TYPE_PONG: u8 = 0x02;
/// Message type byte of a call-me-maybe.
pub const TYPE_CALL_ME_MAYBE: u8 = 0x03;
/// The version byte this implementation writes.
pub const VERSION: u8 = 0;
/// Length of a transaction id.
pub const TX_ID_LEN: usize = 12;
/// Length of one encoded endpoint: 16-byte IP and 2-byte port.
pub const ENDPOINT_LEN: usize = 18;

const MESSAGE_HEADER_LEN: usize = 2;

/// Whether `datagram` starts with the disco magic and is long enough to hold
/// a header and a box.
pub fn looks_like_disco(datagram: &[u8]) -> bool {
    datagram.len() >= MIN_LEN && datagram.starts_with(&MAGIC)
}

/// The sender's disco public key, read without opening the box. `None` if the
/// datagram does not look like disco.
pub fn sender_key(datagram: &[u8]) -> Option<[u8; 32]> {
    if !looks_like_disco(datagram) {
        return None;
    }
    array_at(datagram, MAGIC.len())
}

/// The box nonce, read without opening the box. `None` if the datagram does
/// not look like disco.
pub fn nonce(datagram: &[u8]) -> Option<[u8; NONCE_LEN]> {
    if !looks_like_disco(datagram) {
        return None;
    }
    array_at(datagram, MAGIC.len() + KEY_LEN)
}

/// A decoded disco plaintext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoMessage {
    /// A probe of a path, to be answered with a pong.
    Ping {
        /// The transaction id the pong echoes.
        tx_id: [u8; 12],
        /// The sender's WireGuard (node) public key. An all-zero key on the
        /// wire, as left by padding without a key, is reported as `None`.
        node_key: Option<[u8; 32]>,
    },
    /// The answer to a ping.
    Pong {
        /// The ping's transaction id.
        tx_id: [u8; 12],
        /// The address the ping was seen coming from.
        src: SocketAddr,
    },
    /// A request to ping the listed endpoints of the sender.
    CallMeMaybe {
        /// The sender's candidate endpoints.
        endpoints: Vec<SocketAddr>,
    },
}

/// Why [`DiscoMessage::parse`] rejected a plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum MessageError {
    /// The plaintext is shorter than the type and version bytes.
    #[error("disco message shorter than its header")]
    TooShort,
    /// The type byte is not one this implementation knows.
    #[error("unknown disco message type {0:#04x}")]
    UnknownType(u8),
    /// The payload is shorter than the message type requires.
    #[error("truncated disco message: needed {needed} payload bytes, got {got}")]
    Truncated {
        /// The minimum payload length for this type.
        needed: usize,
        /// The payload length present.
        got: usize,
    },
}

/// Why [`open`] (or [`DiscoShared::open`]) rejected a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DiscoError {
    /// The datagram does not start with the disco magic.
    #[error("not a disco datagram")]
    NotDisco,
    /// The datagram starts with the magic but is too short to hold a header
    /// and a box.
    #[error("truncated disco datagram")]
    Truncated,
    /// The box failed authentication: wrong keys or tampered bytes.
    #[error("disco box failed authentication")]
    BadBox,
    /// The box opened but its plaintext is not a valid message.
    #[error("bad disco message: {0}")]
    BadMessage(#[from] MessageError),
}

/// Decodes an 18-byte endpoint, unmapping IPv4-mapped addresses.
fn decode_endpoint(bytes: &[u8]) -> Option<SocketAddr> {
    let ip = Ipv6Addr::from(array_at::<16>(bytes, 0)?);
    let port = be16(bytes, 16)?;
    let ip = match ip.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(ip),
    };
    Some(SocketAddr::new(ip, port))
}

/// Appends the 18-byte form of `addr`.
fn encode_endpoint(addr: &SocketAddr, out: &mut Vec<u8>) {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out.extend_from_slice(&ip.octets());
    out.extend_from_slice(&addr.port().to_be_bytes());
}

impl DiscoMessage {
    /// Parses a disco plaintext (`type, version, payload`).
    ///
    /// Any version is accepted. Bytes beyond a ping's key, beyond a pong's
    /// address, and a final partial call-me-maybe endpoint are ignored.
    pub fn parse(plaintext: &[u8]) -> Result<DiscoMessage, MessageError> {
        let (Some(&kind), Some(payload)) = (plaintext.first(), plaintext.get(MESSAGE_HEADER_LEN..))
        else {
            return Err(MessageError::TooShort);
        };
        let truncated = |needed: usize| MessageError::Truncated {
            needed,
            got: payload.len(),
        };
        match kind {
            TYPE_PING => {
                let tx_id = array_at(payload, 0).ok_or_else(|| truncated(TX_ID_LEN))?;
                let node_key = array_at::<KEY_LEN>(payload, TX_ID_LEN)
                    .filter(|key| key.iter().any(|&b| b != 0));
                Ok(DiscoMessage::Ping { tx_id, node_key })
            }
            TYPE_PONG => {
                let needed = TX_ID_LEN + ENDPOINT_LEN;
                let tx_id = array_at(payload, 0).ok_or_else(|| truncated(needed))?;
                let src = payload
                    .get(TX_ID_LEN..needed)
                    .and_then(decode_endpoint)
                    .ok_or_else(|| truncated(needed))?;
                Ok(DiscoMessage::Pong { tx_id, src })
            }
            TYPE_CALL_ME_MAYBE => {
                let endpoints = payload
                    .chunks_exact(ENDPOINT_LEN)
                    .filter_map(decode_endpoint)
                    .collect();
                Ok(DiscoMessage::CallMeMaybe { endpoints })
            }
            other => Err(MessageError::UnknownType(other)),
        }
    }

    /// The number of bytes [`DiscoMessage::emit`] appends.
    pub fn encoded_len(&self) -> usize {
        MESSAGE_HEADER_LEN
            + match self {
                DiscoMessage::Ping { node_key, .. } => {
                    TX_ID_LEN + if node_key.is_some() { KEY_LEN } else { 0 }
                }
                DiscoMessage::Pong { .. } => TX_ID_LEN + ENDPOINT_LEN,
                DiscoMessage::CallMeMaybe { endpoints } => endpoints.len() * ENDPOINT_LEN,
            }
    }

    /// Appends the plaintext encoding (version 0) to `out`. A ping without a
    /// node key carries only the transaction id; no padding is written.
    pub fn emit(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        match self {
            DiscoMessage::Ping { tx_id, node_key } => {
                out.extend_from_slice(&[TYPE_PING, VERSION]);
                out.extend_from_slice(tx_id);
                if let Some(key) = node_key {
                    out.extend_from_slice(key);
                }
            }
            DiscoMessage::Pong { tx_id, src } => {
                out.extend_from_slice(&[TYPE_PONG, VERSION]);
                out.extend_from_slice(tx_id);
                encode_endpoint(src, out);
            }
            DiscoMessage::CallMeMaybe { endpoints } => {
                out.extend_from_slice(&[TYPE_CALL_ME_MAYBE, VERSION]);
                for endpoint in endpoints {
                    encode_endpoint(endpoint, out);
                }
            }
        }
    }
}

/// The X25519 public key of a secret key (the scalar is clamped as usual).
pub fn public_from_secret(secret: &[u8; 32]) -> [u8; 32] {
    SecretKey::from(*secret).public_key().to_bytes()
}

/// A precomputed box for one (our secret, their public) pair.
///
/// Building it costs one Diffie-Hellman; sealing and opening with it do not,
/// so the engine can cache one per peer. It is not `Clone` (the underlying
/// cipher type is not); share it behind an `Rc` or `Arc` if needed.
pub struct DiscoShared {
    inner: SalsaBox,
}

impl fmt::Debug for DiscoShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The shared key is secret, so it is never printed.
        f.write_str("DiscoShared { .. }")
    }
}

impl DiscoShared {
    /// Derives the shared box between `our_secret` and `their_public`.
    pub fn new(our_secret: &[u8; 32], their_public: &[u8; 32]) -> DiscoShared {
        let secret = SecretKey::from(*our_secret);
        let public = PublicKey::from(*their_public);
        DiscoShared {
            inner: SalsaBox::new(&public, &secret),
        }
    }

    /// Clears `out` and writes a sealed datagram
    /// `MAGIC || our_public || nonce || box(message)`.
    ///
    /// `our_public` must be the public key of the secret this box was built
    /// with, or the recipient will not be able to open it. The nonce must
    /// never repeat for the same pair of keys.
    pub fn seal(
        &self,
        our_public: &[u8; 32],
        nonce: [u8; 24],
        message: &DiscoMessage,
        out: &mut Vec<u8>,
    ) {
        out.clear();
        out.reserve(MIN_LEN + message.encoded_len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(our_public);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&[0; TAG_LEN]);
        message.emit(out);
        let (head, body) = out.split_at_mut(MIN_LEN);
        let tag = self
            .inner
            .encrypt_in_place_detached(&Nonce::from(nonce), b"", body);
        // Encryption only fails for non-empty associated data or a message
        // longer than the stream cipher allows; neither can happen here, but
        // if it ever did, the output is emptied rather than sent unsealed.
        match tag {
            Ok(tag) => {
                if let Some(slot) = head.get_mut(HEADER_LEN..MIN_LEN) {
                    slot.copy_from_slice(&tag);
                }
            }
            Err(_) => out.clear(),
        }
    }

    /// Opens a datagram sealed for us by the peer this box was built with.
    ///
    /// The sender key in the datagram is not compared with the key the box
    /// was built from; pick the box by [`sender_key`] first. A datagram from
    /// anyone else fails with [`DiscoError::BadBox`].
    pub fn open(&self, datagram: &[u8]) -> Result<DiscoMessage, DiscoError> {
        let BoxParts {
            nonce,
            tag,
            ciphertext,
        } = split_datagram(datagram)?;
        let mut plaintext = ciphertext.to_vec();
        self.inner
            .decrypt_in_place_detached(&Nonce::from(nonce), b"", &mut plaintext, &tag.into())
            .map_err(|_| DiscoError::BadBox)?;
        Ok(DiscoMessage::parse(&plaintext)?)
    }
}

/// The parts of a disco datagram after the sender key.
struct BoxParts<'a> {
    nonce: [u8; NONCE_LEN],
    tag: [u8; TAG_LEN],
    ciphertext: &'a [u8],
}

/// Splits a datagram into its nonce, tag and ciphertext after checking the
/// magic and the length.
fn split_datagram(datagram: &[u8]) -> Result<BoxParts<'_>, DiscoError> {
    let magic = datagram.get(..MAGIC.len()).ok_or(DiscoError::NotDisco)?;
    if magic != MAGIC {
        return Err(DiscoError::NotDisco);
    }
    let nonce = array_at(datagram, MAGIC.len() + KEY_LEN).ok_or(DiscoError::Truncated)?;
    let tag = array_at(datagram, HEADER_LEN).ok_or(DiscoError::Truncated)?;
    let ciphertext = datagram.get(MIN_LEN..).ok_or(DiscoError::Truncated)?;
    Ok(BoxParts {
        nonce,
        tag,
        ciphertext,
    })
}

/// Clears `out` and writes `MAGIC || sender_public || nonce || box(message)`
/// sealed from `sender_secret` to `recipient_public`.
///
/// This performs a Diffie-Hellman on every call; see [`DiscoShared`] to
/// reuse one. The caller supplies the nonce and must never repeat it for the
/// same pair of keys.
pub fn seal(
    sender_secret: &[u8; 32],
    sender_public: &[u8; 32],
    recipient_public: &[u8; 32],
    nonce: [u8; 24],
    message: &DiscoMessage,
    out: &mut Vec<u8>,
) {
    DiscoShared::new(sender_secret, recipient_public).seal(sender_public, nonce, message, out);
}

/// Opens a disco datagram addressed to `recipient_secret`, returning the
/// sender's disco public key and the message.
///
/// This performs a Diffie-Hellman on every call; see [`DiscoShared`] to
/// reuse one.
pub fn open(
    recipient_secret: &[u8; 32],
    datagram: &[u8],
) -> Result<([u8; 32], DiscoMessage), DiscoError> {
    split_datagram(datagram)?;
    let sender: [u8; 32] = array_at(datagram, MAGIC.len()).ok_or(DiscoError::Truncated)?;
    let message = DiscoShared::new(recipient_secret, &sender).open(datagram)?;
    Ok((sender, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, SocketAddrV6};

    const TX: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    // RFC 7748 section 6.1 X25519 test keys.
    const ALICE_SECRET: [u8; 32] = [
        0x77, 0x07, 0x6d, 0x0a, 0x73, 0x18, 0xa5, 0x7d, 0x3c, 0x16, 0xc1, 0x72, 0x51, 0xb2, 0x66,
        0x45, 0xdf, 0x4c, 0x2f, 0x87, 0xeb, 0xc0, 0x99, 0x2a, 0xb1, 0x77, 0xfb, 0xa5, 0x1d, 0xb9,
        0x2c, 0x2a,
    ];
    const ALICE_PUBLIC: [u8; 32] = [
        0x85, 0x20, 0xf0, 0x09, 0x89, 0x30, 0xa7, 0x54, 0x74, 0x8b, 0x7d, 0xdc, 0xb4, 0x3e, 0xf7,
        0x5a, 0x0d, 0xbf, 0x3a, 0x0d, 0x26, 0x38, 0x1a, 0xf4, 0xeb, 0xa4, 0xa9, 0x8e, 0xaa, 0x9b,
        0x4e, 0x6a,
    ];
    const BOB_SECRET: [u8; 32] = [
        0x5d, 0xab, 0x08, 0x7e, 0x62, 0x4a, 0x8a, 0x4b, 0x79, 0xe1, 0x7f, 0x8b, 0x83, 0x80, 0x0e,
        0xe6, 0x6f, 0x3b, 0xb1, 0x29, 0x26, 0x18, 0xb6, 0xfd, 0x1c, 0x2f, 0x8b, 0x27, 0xff, 0x88,
        0xe0, 0xeb,
    ];
    const BOB_PUBLIC: [u8; 32] = [
        0xde, 0x9e, 0xdb, 0x7d, 0x7b, 0x7d, 0xc1, 0xb4, 0xd3, 0x5b, 0x61, 0xc2, 0xec, 0xe4, 0x35,
        0x37, 0x3f, 0x83, 0x43, 0xc8, 0x5b, 0x78, 0x67, 0x4d, 0xad, 0xfc, 0x7e, 0x14, 0x6f, 0x88,
        0x2b, 0x4f,
    ];
    const NONCE: [u8; 24] = [0x42; 24];

    fn plaintext(m: &DiscoMessage) -> Vec<u8> {
        let mut out = Vec::new();
        m.emit(&mut out);
        assert_eq!(out.len(), m.encoded_len());
        out
    }

    #[test]
    fn public_keys_match_rfc7748() {
        assert_eq!(public_from_secret(&ALICE_SECRET), ALICE_PUBLIC);
        assert_eq!(public_from_secret(&BOB_SECRET), BOB_PUBLIC);
    }

    #[test]
    fn ping_known_bytes() {
        let bare = DiscoMessage::Ping {
            tx_id: TX,
            node_key: None,
        };
        let mut expected = vec![0x01, 0x00];
        expected.extend_from_slice(&TX);
        assert_eq!(plaintext(&bare), expected);
        assert_eq!(DiscoMessage::parse(&expected), Ok(bare.clone()));

        let keyed = DiscoMessage::Ping {
            tx_id: TX,
            node_key: Some([0xab; 32]),
        };
        expected.extend_from_slice(&[0xab; 32]);
        assert_eq!(plaintext(&keyed), expected);
        assert_eq!(DiscoMessage::parse(&expected), Ok(keyed.clone()));

        // Zero padding after the key is accepted and ignored.
        let mut padded = expected.clone();
        padded.extend_from_slice(&[0; 100]);
        assert_eq!(DiscoMessage::parse(&padded), Ok(keyed));
        // Padding without a key reads as an all-zero key: no key.
        let mut pad_only = vec![0x01, 0x00];
        pad_only.extend_from_slice(&TX);
        pad_only.extend_from_slice(&[0; 40]);
        assert_eq!(DiscoMessage::parse(&pad_only), Ok(bare.clone()));
        // A short leftover is not a key either.
        pad_only.truncate(2 + 12 + 5);
        assert_eq!(DiscoMessage::parse(&pad_only), Ok(bare));
    }

    #[test]
    fn pong_known_bytes() {
        let v4 = DiscoMessage::Pong {
            tx_id: TX,
            src: "1.2.3.4:41641".parse().unwrap(),
        };
        let mut expected = vec![0x02, 0x00];
        expected.extend_from_slice(&TX);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 1, 2, 3, 4]);
        expected.extend_from_slice(&[0xa2, 0xa9]);
        assert_eq!(plaintext(&v4), expected);
        assert_eq!(DiscoMessage::parse(&expected), Ok(v4));

        let v6 = DiscoMessage::Pong {
            tx_id: TX,
            src: "[2001:db8::1]:443".parse().unwrap(),
        };
        let mut expected = vec![0x02, 0x00];
        expected.extend_from_slice(&TX);
        expected.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        expected.extend_from_slice(&[0x01, 0xbb]);
        assert_eq!(plaintext(&v6), expected);
        assert_eq!(DiscoMessage::parse(&expected), Ok(v6.clone()));
        // Trailing bytes and another version are tolerated.
        expected[1] = 7;
        expected.push(0xee);
        assert_eq!(DiscoMessage::parse(&expected), Ok(v6));
        assert_eq!(
            DiscoMessage::parse(&expected[..2 + 29]),
            Err(MessageError::Truncated {
                needed: 30,
                got: 29
            })
        );
    }

    #[test]
    fn call_me_maybe_known_bytes() {
        let m = DiscoMessage::CallMeMaybe {
            endpoints: vec![
                "10.0.0.1:1".parse().unwrap(),
                "[fe80::2]:258".parse().unwrap(),
            ],
        };
        let mut expected = vec![0x03, 0x00];
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1, 0, 1]);
        expected.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 1, 2]);
        assert_eq!(plaintext(&m), expected);
        assert_eq!(DiscoMessage::parse(&expected), Ok(m.clone()));
        // A partial trailing endpoint is ignored.
        expected.extend_from_slice(&[9; 5]);
        assert_eq!(DiscoMessage::parse(&expected), Ok(m));
        assert_eq!(
            DiscoMessage::parse(&[0x03, 0x00]),
            Ok(DiscoMessage::CallMeMaybe { endpoints: vec![] })
        );
    }

    #[test]
    fn parse_errors() {
        assert_eq!(DiscoMessage::parse(&[]), Err(MessageError::TooShort));
        assert_eq!(DiscoMessage::parse(&[0x01]), Err(MessageError::TooShort));
        assert_eq!(
            DiscoMessage::parse(&[0x09, 0]),
            Err(MessageError::UnknownType(9))
        );
        assert_eq!(
            DiscoMessage::parse(&[0x01, 0, 1, 2]),
            Err(MessageError::Truncated { needed: 12, got: 2 })
        );
    }

    #[test]
    fn seal_open_round_trip() {
        let message = DiscoMessage::Ping {
            tx_id: TX,
            node_key: Some([7; 32]),
        };
        let mut sealed = Vec::new();
        seal(
            &ALICE_SECRET,
            &ALICE_PUBLIC,
            &BOB_PUBLIC,
            NONCE,
            &message,
            &mut sealed,
        );
        assert_eq!(sealed.len(), MIN_LEN + message.encoded_len());
        assert_eq!(&sealed[..6], &MAGIC);
        assert_eq!(&sealed[6..38], &ALICE_PUBLIC);
        assert_eq!(&sealed[38..62], &NONCE);
        assert!(looks_like_disco(&sealed));
        assert_eq!(sender_key(&sealed), Some(ALICE_PUBLIC));
        assert_eq!(nonce(&sealed), Some(NONCE));
        assert_eq!(nonce(&sealed[..MIN_LEN - 1]), None);
        // The plaintext does not appear in the clear.
        assert_ne!(&sealed[MIN_LEN..], &plaintext(&message)[..]);

        assert_eq!(
            open(&BOB_SECRET, &sealed),
            Ok((ALICE_PUBLIC, message.clone()))
        );
        // The cached box on either side gives the same bytes and result.
        let bob_side = DiscoShared::new(&BOB_SECRET, &ALICE_PUBLIC);
        assert_eq!(bob_side.open(&sealed), Ok(message.clone()));
        let mut again = Vec::new();
        DiscoShared::new(&ALICE_SECRET, &BOB_PUBLIC).seal(
            &ALICE_PUBLIC,
            NONCE,
            &message,
            &mut again,
        );
        assert_eq!(again, sealed);
        // The wrong recipient cannot open it.
        assert_eq!(open(&ALICE_SECRET, &sealed), Err(DiscoError::BadBox));
        assert_eq!(format!("{bob_side:?}"), "DiscoShared { .. }");
    }

    #[test]
    fn tampering_is_detected() {
        let message = DiscoMessage::CallMeMaybe {
            endpoints: vec!["192.0.2.1:41641".parse().unwrap()],
        };
        let mut sealed = Vec::new();
        seal(
            &ALICE_SECRET,
            &ALICE_PUBLIC,
            &BOB_PUBLIC,
            NONCE,
            &message,
            &mut sealed,
        );
        // Flip each byte after the magic in turn: sender key, nonce, tag and
        // ciphertext are all covered.
        for i in MAGIC.len()..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert_eq!(
                open(&BOB_SECRET, &bad).map(|_| ()),
                Err(DiscoError::BadBox),
                "byte {i}"
            );
        }
        let mut bad = sealed.clone();
        bad[0] ^= 1;
        assert_eq!(open(&BOB_SECRET, &bad), Err(DiscoError::NotDisco));
        assert_eq!(
            open(&BOB_SECRET, &sealed[..MIN_LEN - 1]),
            Err(DiscoError::Truncated)
        );
        assert_eq!(open(&BOB_SECRET, &sealed[..3]), Err(DiscoError::NotDisco));
        assert!(!looks_like_disco(&sealed[..MIN_LEN - 1]));
        assert_eq!(sender_key(&sealed[..MIN_LEN - 1]), None);
    }

    #[test]
    fn bad_plaintext_inside_good_box() {
        // Seal a raw plaintext of an unknown type by hand.
        let shared = DiscoShared::new(&ALICE_SECRET, &BOB_PUBLIC);
        let mut body = vec![0x77, 0x00];
        let tag = shared
            .inner
            .encrypt_in_place_detached(&Nonce::from(NONCE), b"", &mut body)
            .unwrap();
        let mut datagram = MAGIC.to_vec();
        datagram.extend_from_slice(&ALICE_PUBLIC);
        datagram.extend_from_slice(&NONCE);
        datagram.extend_from_slice(&tag);
        datagram.extend_from_slice(&body);
        assert_eq!(
            open(&BOB_SECRET, &datagram),
            Err(DiscoError::BadMessage(MessageError::UnknownType(0x77)))
        );
    }

    fn socket_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<u32>(), any::<u16>())
                .prop_map(|(a, p)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), p)),
            (any::<u128>(), any::<u16>()).prop_filter_map(
                "IPv4-mapped addresses decode as IPv4",
                |(a, p)| {
                    let ip = Ipv6Addr::from(a);
                    ip.to_ipv4_mapped()
                        .is_none()
                        .then(|| SocketAddr::V6(SocketAddrV6::new(ip, p, 0, 0)))
                }
            ),
        ]
    }

    fn message() -> impl Strategy<Value = DiscoMessage> {
        prop_oneof![
            (
                any::<[u8; 12]>(),
                proptest::option::of(any::<[u8; 32]>().prop_filter("zero key", |k| k != &[0; 32]))
            )
                .prop_map(|(tx_id, node_key)| DiscoMessage::Ping { tx_id, node_key }),
            (any::<[u8; 12]>(), socket_addr())
                .prop_map(|(tx_id, src)| DiscoMessage::Pong { tx_id, src }),
            proptest::collection::vec(socket_addr(), 0..6)
                .prop_map(|endpoints| DiscoMessage::CallMeMaybe { endpoints }),
        ]
    }

    proptest! {
        #[test]
        fn emit_then_parse(m in message()) {
            prop_assert_eq!(DiscoMessage::parse(&plaintext(&m)), Ok(m));
        }

        #[test]
        fn seal_then_open(m in message(), nonce in any::<[u8; 24]>()) {
            let mut sealed = Vec::new();
            seal(&BOB_SECRET, &BOB_PUBLIC, &ALICE_PUBLIC, nonce, &m, &mut sealed);
            prop_assert_eq!(open(&ALICE_SECRET, &sealed), Ok((BOB_PUBLIC, m)));
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            let _ = DiscoMessage::parse(&bytes);
        }

        #[test]
        fn open_never_panics(
            magic in any::<bool>(),
            rest in proptest::collection::vec(any::<u8>(), 0..160),
        ) {
            let mut datagram = if magic { MAGIC.to_vec() } else { Vec::new() };
            datagram.extend_from_slice(&rest);
            let _ = looks_like_disco(&datagram);
            let _ = sender_key(&datagram);
            let _ = open(&BOB_SECRET, &datagram);
            let _ = DiscoShared::new(&BOB_SECRET, &ALICE_PUBLIC).open(&datagram);
        }
    }
}
