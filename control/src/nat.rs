//! The NAT traversal settings control hands out: the STUN servers every
//! node asks for its reflexive address, and per-node TURN credentials in
//! the TURN REST-API style (the shared secret stays on the server; a node
//! only ever sees a username and password that stop working at their
//! expiry).

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};

use crate::keys::Timestamp;
use crate::netmap::{NatMap, RelayCredentials};

/// The NAT settings of a tailnet, as the server is configured with them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NatIssuer {
    /// STUN servers every node is told to use.
    pub stun_servers: Vec<SocketAddr>,
    /// The TURN relay, if the tailnet has one.
    pub relay: Option<RelayIssuer>,
}

/// A TURN server and the secret shared with it (coturn's
/// `static-auth-secret`).
#[derive(Clone, PartialEq, Eq)]
pub struct RelayIssuer {
    /// The TURN server's UDP address, as nodes reach it.
    pub server: SocketAddr,
    /// The shared secret. Never leaves the server.
    pub shared_secret: zeroize::Zeroizing<String>,
    /// How long each issued set of credentials is valid. Control issues
    /// fresh ones when half of it has passed.
    pub credential_ttl: Duration,
}

impl std::fmt::Debug for RelayIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayIssuer")
            .field("server", &self.server)
            .field("shared_secret", &"<redacted>")
            .field("credential_ttl", &self.credential_ttl)
            .finish()
    }
}

/// The shortest credential lifetime the server accepts: a node needs time
/// to allocate and refresh with one set before the next arrives.
pub const MIN_CREDENTIAL_TTL: Duration = Duration::from_secs(60);

/// Why NAT settings were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NatSettingsError {
    /// A STUN or TURN server address no node can send to.
    #[error("{what} {addr} is not a usable address (unspecified, multicast or port 0)")]
    BadServer {
        /// Which setting.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
    },
    /// The shared secret is empty.
    #[error("the TURN shared secret is empty")]
    EmptySecret,
    /// The credential lifetime is too short to be used.
    #[error("the TURN credential TTL of {got_secs} s is below the minimum of {min_secs} s")]
    TtlTooShort {
        /// What was given.
        got_secs: u64,
        /// [`MIN_CREDENTIAL_TTL`].
        min_secs: u64,
    },
}

/// Whether `addr` can be a server a node sends to.
pub fn usable_server(addr: SocketAddr) -> bool {
    addr.port() != 0 && !addr.ip().is_unspecified() && !addr.ip().is_multicast()
}

impl NatIssuer {
    /// Checks the settings; the server refuses to start with bad ones.
    pub fn check(&self) -> Result<(), NatSettingsError> {
        for addr in &self.stun_servers {
            if !usable_server(*addr) {
                return Err(NatSettingsError::BadServer {
                    what: "STUN server",
                    addr: *addr,
                });
            }
        }
        if let Some(relay) = &self.relay {
            if !usable_server(relay.server) {
                return Err(NatSettingsError::BadServer {
                    what: "TURN server",
                    addr: relay.server,
                });
            }
            if relay.shared_secret.is_empty() {
                return Err(NatSettingsError::EmptySecret);
            }
            if relay.credential_ttl < MIN_CREDENTIAL_TTL {
                return Err(NatSettingsError::TtlTooShort {
                    got_secs: relay.credential_ttl.as_secs(),
                    min_secs: MIN_CREDENTIAL_TTL.as_secs(),
                });
            }
        }
        Ok(())
    }

    /// The settings for node `node` at `now`: fresh credentials valid for
    /// the TTL, and when to issue the next ones (half-way through, so a
    /// node that misses one refresh still has time for the next).
    pub fn issue(&self, node: &str, now: Timestamp) -> (NatMap, Option<Timestamp>) {
        let relay = self.relay.as_ref().map(|relay| {
            // Whole seconds: the username carries Unix seconds, and the
            // expiry recorded must be the one the TURN server checks.
            let expires_secs = now.saturating_add(relay.credential_ttl).unix_millis() / 1000;
            let (username, password) = rest_credentials(&relay.shared_secret, node, expires_secs);
            RelayCredentials {
                server: relay.server,
                username,
                password,
                expires: Timestamp::from_unix_secs(expires_secs),
            }
        });
        let refresh_at = self
            .relay
            .as_ref()
            .map(|relay| now.saturating_add(relay.credential_ttl / 2));
        (
            NatMap {
                stun_servers: self.stun_servers.clone(),
                relay,
            },
            refresh_at,
        )
    }
}

/// TURN REST-API credentials: username `expiry:node` (expiry in Unix
/// seconds), password base64(HMAC-SHA1(secret, username)). A TURN server
/// holding the same secret checks them without a user database.
pub fn rest_credentials(secret: &str, node: &str, expiry_unix_secs: u64) -> (String, String) {
    let username = format!("{expiry_unix_secs}:{node}");
    let password = match Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()) {
        Ok(mut mac) => {
            mac.update(username.as_bytes());
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        }
        // HMAC accepts a key of any length; this arm cannot be reached,
        // and an empty password is refused by the TURN server if it were.
        Err(_) => String::new(),
    };
    (username, password)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer(ttl_secs: u64) -> NatIssuer {
        NatIssuer {
            stun_servers: vec!["198.51.100.1:3478".parse().unwrap()],
            relay: Some(RelayIssuer {
                server: "198.51.100.1:3478".parse().unwrap(),
                shared_secret: zeroize::Zeroizing::new("secret".into()),
                credential_ttl: Duration::from_secs(ttl_secs),
            }),
        }
    }

    #[test]
    fn rest_credentials_match_the_coturn_formula() {
        // HMAC-SHA1("secret", "1700000000:node0"), base64: computed
        // independently with `openssl dgst -sha1 -hmac secret -binary | base64`.
        let (username, password) = rest_credentials("secret", "node0", 1_700_000_000);
        assert_eq!(username, "1700000000:node0");
        assert_eq!(password, "a2ienbOuyt8FL2mqYxXO7aEtpv4=");
        let (_, other) = rest_credentials("secret2", "node0", 1_700_000_000);
        assert_ne!(password, other);
    }

    #[test]
    fn issued_credentials_expire_after_the_ttl_and_are_refreshed_half_way() {
        let now = Timestamp::from_unix_secs(1_700_000_000);
        let (nat, refresh_at) = issuer(3600).issue("node0", now);
        let relay = nat.relay.expect("a relay is configured");
        assert_eq!(relay.username, "1700003600:node0");
        assert_eq!(
            relay.password,
            rest_credentials("secret", "node0", 1_700_003_600).1
        );
        assert_eq!(relay.expires, Timestamp::from_unix_secs(1_700_003_600));
        assert_eq!(refresh_at, Some(Timestamp::from_unix_secs(1_700_001_800)));
        assert_eq!(nat.stun_servers.len(), 1);
        // The secret never appears in what a node gets, nor in logs.
        let json = serde_json::to_string(&relay).unwrap();
        assert!(!json.contains("\"secret\""), "{json}");
        assert!(!format!("{:?}", issuer(60)).contains("secret\""));
        assert!(!format!("{relay:?}").contains(&relay.password));
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        assert_eq!(issuer(3600).check(), Ok(()));
        assert!(matches!(
            issuer(10).check(),
            Err(NatSettingsError::TtlTooShort { got_secs: 10, .. })
        ));
        let mut bad = issuer(3600);
        bad.stun_servers = vec!["0.0.0.0:3478".parse().unwrap()];
        assert!(matches!(
            bad.check(),
            Err(NatSettingsError::BadServer {
                what: "STUN server",
                ..
            })
        ));
        let mut bad = issuer(3600);
        if let Some(relay) = bad.relay.as_mut() {
            relay.shared_secret = zeroize::Zeroizing::new(String::new());
        }
        assert_eq!(bad.check(), Err(NatSettingsError::EmptySecret));
        // No NAT settings at all issue nothing.
        let (nat, refresh_at) = NatIssuer::default().issue("n", Timestamp::from_unix_secs(1));
        assert!(nat.is_empty());
        assert_eq!(refresh_at, None);
    }
}
