//! Node and disco keys.
//!
//! A *node key* is the WireGuard static key of a node; a *disco key* is the
//! key a node uses for the disco protocol and changes every time the node
//! restarts. Both are X25519 keys, written as standard base64 in configs, like
//! `wg` does. Private keys never appear in `Debug` output or logs.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rand_core::{CryptoRng, RngCore};

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

macro_rules! public_key_type {
    ($(#[$doc:meta])* $name:ident, $short:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The raw 32 bytes of the key.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// A short, log-friendly form: the prefix and the first 8 base64 characters.
            pub fn short(&self) -> String {
                let full = BASE64.encode(self.0);
                format!("{}:{}", $short, &full[..8])
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
    };
}

macro_rules! private_key_type {
    ($(#[$doc:meta])* $name:ident, $public:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq)]
        pub struct $name([u8; 32]);

        impl $name {
            /// Wraps raw secret bytes (clamping happens inside X25519).
            pub fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            /// Draws a fresh key from `rng` (the engine's seeded RNG, the OS RNG in the daemon).
            pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
                let mut bytes = [0u8; 32];
                rng.fill_bytes(&mut bytes);
                Self(bytes)
            }

            /// The raw secret bytes. Never log them.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// Encodes the secret as base64, for writing config files.
            pub fn to_base64(&self) -> String {
                BASE64.encode(self.0)
            }

            /// The matching public key.
            pub fn public_key(&self) -> $public {
                // X25519 with the clamped secret, as WireGuard and disco
                // both use it (crypto_box is the disco box's crate).
                $public(crypto_box::SecretKey::from_bytes(self.0).public_key().to_bytes())
            }
        }

        /// The secret bytes are overwritten when the key is dropped, so a
        /// freed key does not linger in memory the allocator hands out again.
        impl Drop for $name {
            fn drop(&mut self) {
                zeroize::Zeroize::zeroize(&mut self.0);
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}(<secret for {:?}>)", stringify!($name), self.public_key())
            }
        }

        impl FromStr for $name {
            type Err = KeyParseError;
            fn from_str(text: &str) -> Result<Self, Self::Err> {
                decode_key(text).map(Self)
            }
        }
    };
}

public_key_type!(
    /// A node's WireGuard public key: the node's identity in the tailnet.
    NodePublicKey,
    "nodekey"
);
public_key_type!(
    /// A node's disco public key; it changes when the node restarts.
    DiscoPublicKey,
    "discokey"
);
private_key_type!(
    /// A node's WireGuard private key.
    NodePrivateKey,
    NodePublicKey
);
private_key_type!(
    /// A node's disco private key.
    DiscoPrivateKey,
    DiscoPublicKey
);

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;

    #[test]
    fn base64_round_trip_and_errors() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let private = NodePrivateKey::generate(&mut rng);
        let public = private.public_key();
        let text = public.to_string();
        assert_eq!(text.parse::<NodePublicKey>().unwrap(), public);
        assert_eq!(
            private.to_base64().parse::<NodePrivateKey>().unwrap(),
            private
        );
        assert_eq!("!!".parse::<NodePublicKey>(), Err(KeyParseError::NotBase64));
        assert_eq!(
            "AAAA".parse::<NodePublicKey>(),
            Err(KeyParseError::WrongLength(3))
        );
        assert!(!format!("{private:?}").contains(&private.to_base64()));
    }
}
