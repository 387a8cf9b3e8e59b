//! Node keys, disco keys and time stamps as control sees them.
//!
//! Control depends on nothing of ours (not even `wgmesh-core`), so it has its
//! own key types. They hold the same 32 bytes as the core's `NodePublicKey`
//! and `DiscoPublicKey` and are written the same way (standard base64), so a
//! node converts one into the other with `NodePublicKey(key.0)`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The error of parsing a key from its base64 text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    /// The text is not valid standard base64.
    #[error("key is not valid base64")]
    NotBase64,
    /// The decoded key is not 32 bytes long.
    #[error("key must decode to 32 bytes, got {0}")]
    WrongLength(usize),
}

fn decode_key(text: &str) -> Result<[u8; 32], KeyParseError> {
    let bytes = BASE64
        .decode(text.trim())
        .map_err(|_| KeyParseError::NotBase64)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyParseError::WrongLength(bytes.len()))
}

macro_rules! key_type {
    ($(#[$doc:meta])* $name:ident, $short:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// A short, log-friendly form: the prefix and the first 8 base64 characters.
            pub fn short(&self) -> String {
                let full = BASE64.encode(self.0);
                format!("{}:{}", $short, &full[..8])
            }

            /// True for the all-zero key, which no real X25519 key is.
            pub fn is_zero(&self) -> bool {
                self.0 == [0; 32]
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&BASE64.encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.short())
            }
        }

        impl FromStr for $name {
            type Err = KeyParseError;
            fn from_str(text: &str) -> Result<Self, Self::Err> {
                decode_key(text).map(Self)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_string())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

key_type!(
    /// A node's WireGuard public key: its identity in the tailnet.
    NodeKey,
    "nodekey"
);
key_type!(
    /// A node's disco public key; a new one on every start of the node.
    DiscoKey,
    "discokey"
);
key_type!(
    /// The coordination server's public key (Curve25519), pinned in every
    /// node's config; requests are sealed to it (see [`crate::wire`]).
    ServerKey,
    "serverkey"
);

/// A point in wall-clock time: milliseconds since the Unix epoch.
///
/// Control never reads a clock: the caller passes `now` in. Wall-clock time
/// (not `Instant`) because expiries outlive the process: the server binary
/// stores them in its database.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The time stamp `secs` seconds after the epoch.
    pub fn from_unix_secs(secs: u64) -> Self {
        Self(secs.saturating_mul(1000))
    }

    /// Milliseconds since the epoch.
    pub fn unix_millis(self) -> u64 {
        self.0
    }

    /// This time plus `d`, saturating at the far future.
    pub fn saturating_add(self, d: Duration) -> Self {
        let millis = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self(self.0.saturating_add(millis))
    }

    /// How long after `earlier` this is (zero when it is not later).
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_text_and_json() {
        let key = NodeKey([7; 32]);
        let text = key.to_string();
        assert_eq!(text.parse::<NodeKey>().unwrap(), key);
        let json = serde_json::to_string(&key).unwrap();
        assert_eq!(json, format!("\"{text}\""));
        assert_eq!(serde_json::from_str::<NodeKey>(&json).unwrap(), key);
        assert_eq!("!!".parse::<DiscoKey>(), Err(KeyParseError::NotBase64));
        assert_eq!(
            "AAAA".parse::<DiscoKey>(),
            Err(KeyParseError::WrongLength(3))
        );
        assert!(serde_json::from_str::<NodeKey>("\"AAAA\"").is_err());
        assert!(NodeKey::default().is_zero());
        assert!(!key.is_zero());
    }

    #[test]
    fn timestamps_add_and_subtract_without_overflow() {
        let t = Timestamp::from_unix_secs(10);
        assert_eq!(t.unix_millis(), 10_000);
        assert_eq!(
            t.saturating_add(Duration::from_millis(5)),
            Timestamp(10_005)
        );
        assert_eq!(
            Timestamp(u64::MAX).saturating_add(Duration::MAX),
            Timestamp(u64::MAX)
        );
        assert_eq!(Timestamp(5).saturating_since(Timestamp(9)), Duration::ZERO);
        assert_eq!(
            Timestamp(9).saturating_since(Timestamp(5)),
            Duration::from_millis(4)
        );
    }
}
